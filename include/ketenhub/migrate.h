/*
 * Schema migrations: the numbered SQL files in migrations/ (NNN_name.sql)
 * applied in numeric order, each in its own transaction together with its
 * row in kh_schema_migrations:
 *
 *   kh_schema_migrations (version int PRIMARY KEY, name text,
 *                         sha256 text (64 lower-case hex digits of the
 *                         file's bytes), applied_at timestamptz)
 *
 * The runner creates that table itself. It holds a session advisory lock
 * (KH_MIGRATE_LOCK_KEY) while it works, so two migrators started at once
 * (two replicas of a service, say) apply each file once: the second waits,
 * then finds nothing to do.
 *
 * It refuses to run, applying nothing, when an applied file's bytes
 * changed, an applied file is missing or renamed (KH_E_MIGRATION_CHANGED,
 * path = the file), or a .sql file in the directory is not named
 * NNN_name.sql (at least three digits, version >= 1, name of [a-z0-9_]) or
 * repeats a version (KH_E_CONFIG, path = the file). Files not ending in
 * .sql (a README) and hidden files are ignored.
 *
 * A migration file must not contain transaction control (BEGIN, COMMIT)
 * or statements that cannot run inside a transaction (CREATE INDEX
 * CONCURRENTLY); a file that ends the runner's transaction is reported
 * as an error.
 */
#ifndef KH_MIGRATE_H_INCLUDED
#define KH_MIGRATE_H_INCLUDED

#include <libpq-fe.h>
#include <stdbool.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* bigint key of the session advisory lock the runner holds (the bytes of
 * "khmigrat"). Other code must not use it. */
#define KH_MIGRATE_LOCK_KEY 0x6b686d6967726174LL

#define KH_MIGRATION_NAME_MAX 128

typedef enum {
    KH_MIGRATION_APPLIED, /* recorded and the file matches */
    KH_MIGRATION_PENDING, /* file present, not yet applied */
    KH_MIGRATION_CHANGED, /* recorded, but the file's bytes or name differ */
    KH_MIGRATION_MISSING  /* recorded, but no file has its version */
} kh_migration_state_t;

typedef struct {
    int version;                           /* 1 for 001_foundation.sql */
    char name[KH_MIGRATION_NAME_MAX];      /* "foundation" */
    char file[KH_MIGRATION_NAME_MAX + 16]; /* "001_foundation.sql" */
    char sha256[65];                       /* of the file; "" if missing */
    kh_migration_state_t state;
    char applied_at[40]; /* UTC, "2026-11-28T21:09:27Z"; "" if pending */
} kh_migration_t;

/* Called once per migration, in version order. The record is only valid
 * during the call. */
typedef void(kh_migrate_report_fn)(const kh_migration_t *migration, void *arg);

/* Apply the pending migrations of dir to the database of conn, which must
 * not be inside a transaction. fn (may be NULL) is called after each
 * migration commits, with state KH_MIGRATION_APPLIED. Returns the number
 * applied (0 when the database is up to date), or -1 with err: refusals
 * as described above (nothing applied), KH_E_IO when dir or a file cannot
 * be read, KH_E_DB / KH_E_UNAVAILABLE when a statement fails (path = the
 * file, line = the line of the failing statement when the server says;
 * that migration is rolled back, the earlier ones stay applied). */
int kh_migrate_apply(PGconn *conn, const char *dir, kh_migrate_report_fn *fn,
                     void *arg, kh_error_t *err);

/* Report every migration known to the directory or the database, in
 * version order, with its state; takes no lock and changes nothing.
 * Returns the number pending, or -1 with err: KH_E_MIGRATION_CHANGED
 * (after reporting everything) when any entry is changed or missing,
 * the refusals for bad file names, KH_E_IO, KH_E_DB. */
int kh_migrate_status(PGconn *conn, const char *dir, kh_migrate_report_fn *fn,
                      void *arg, kh_error_t *err);

/* Human name of a state: "applied", "pending", "changed", "missing". */
const char *kh_migration_state_name(kh_migration_state_t state);

#ifdef __cplusplus
}
#endif
#endif
