/*
 * The trail in PostgreSQL: reading events and seals in seq order (through
 * the auditors' views), verifying, sealing, and recording an auditor's
 * access. See trail.h for the chain itself and schemas/audit.md for why
 * the sealer only seals a prefix of seq values that can no longer change.
 */
#ifndef KH_TRAIL_DB_H_INCLUDED
#define KH_TRAIL_DB_H_INCLUDED

#include <libpq-fe.h>

#include "ketenhub/trail.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Called for each seq that has an event or a seal, in ascending order;
 * ev or seal is NULL when that half is absent. Return 0 to go on. */
typedef int(kh_trail_scan_fn)(void *arg, int64_t seq,
                              const kh_trail_event_t *ev,
                              const unsigned char *seal);

/* Read events and seals with after < seq <= upto in seq order from the
 * views audit_trail and audit_trail_seals, in the caller's transaction
 * when one is open (else in a REPEATABLE READ one of its own, so that
 * both are read from one snapshot; a caller's transaction must be
 * REPEATABLE READ too, or a sealing round that commits between the two
 * reads shows seals without their events). after INT64_MIN: from the very first
 * row, also one at a seq at or below 0 that the sequence never hands out
 * (put there by hand). Text comes as UTF-8 whatever the session's
 * client_encoding (the canonical encoding's bytes). Returns 0, the
 * callback's non-zero value, or -1 with err. */
int kh_trail_db_scan(PGconn *conn, int64_t after, int64_t upto,
                     kh_trail_scan_fn *fn, void *arg, kh_error_t *err);

/* All checkpoints (audit_trail_checkpoints), ascending; *out is the
 * caller's to free. 0 or -1 with err. */
int kh_trail_db_checkpoints(PGconn *conn, kh_trail_checkpoint_t **out,
                            size_t *count, kh_error_t *err);

/* Verify the trail in the database against public_key: from the genesis
 * (from_checkpoint 0) or from the checkpoint at seq from_checkpoint, with
 * the published checkpoints (may be none) as well as the database's own.
 * Returns 0 intact, 1 with a finding in report, -1 with err. */
int kh_trail_db_verify(PGconn *conn, const unsigned char *public_key,
                       int64_t from_checkpoint,
                       const kh_trail_checkpoint_t *published,
                       size_t npublished, kh_trail_report_t *report,
                       kh_error_t *err);
/* The same against a set of keys used in turn (kh_trail_keys_t). */
int kh_trail_db_verify_keys(PGconn *conn, const kh_trail_keys_t *keys,
                            int64_t from_checkpoint,
                            const kh_trail_checkpoint_t *published,
                            size_t npublished, kh_trail_report_t *report,
                            kh_error_t *err);

/* Write an access event (trail.queried, trail.exported, trail.verified)
 * through audit_record_access, in the caller's transaction if any. The
 * actor is the database login (audit_login(), migration 025); this
 * process's OS user and host go to origin_peer as USER@HOST. Returns 0 or
 * -1 with err. */
int kh_trail_db_record_access(PGconn *conn, const char *action,
                              const char *actor_kind, const char *outcome,
                              const char *reason_code, const char *filter,
                              const char *origin_service, kh_error_t *err);

/* The sealer: seals events in seq order once no transaction that could
 * still commit a lower seq is running, and signs checkpoints. */
typedef struct kh_trail_sealer_t kh_trail_sealer_t;

typedef struct {
    long checkpoint_every; /* events between checkpoints (>= 1) */
    long checkpoint_ms;    /* a checkpoint at least this often when new
                            * events were sealed */
    long batch;            /* events read per statement */
} kh_trail_sealer_config_t;

/* secret_key is copied (and wiped on destroy). NULL on out of memory. */
kh_trail_sealer_t *kh_trail_sealer_new(const unsigned char *secret_key,
                                       const kh_trail_sealer_config_t *cfg);
void kh_trail_sealer_destroy(kh_trail_sealer_t **self_p);

/* One round on conn (autocommit): seal what has become final since the
 * last round, then note the bound for the next; a transaction seals at
 * most 5 batches (cfg.batch events each), the rest in the rounds after
 * (kh_trail_sealer_behind). Returns the number of
 * events sealed (>= 0), or -1 with err when nothing was. A round that
 * sealed and then failed (noting the next bound, or sealing up to it)
 * returns what it sealed, with err set: the failure comes again at the
 * next round. *checkpoints (may be NULL) gets the number of checkpoints
 * written and committed. A sequence that caches values per session
 * (CACHE above 1) is refused: KH_E_CONFIG. The code KH_E_TRAIL_BROKEN says the
 * seals no longer reach the last checkpoint, or differ from its head
 * there (seals were removed or rewritten): nothing was sealed or signed,
 * and nothing will be while that lasts. */
long kh_trail_sealer_step(kh_trail_sealer_t *self, PGconn *conn,
                          long *checkpoints, kh_error_t *err);

/* Whether the last round sealed only part of what is final: the next
 * round goes on with it (a caller that loops goes on at once). */
bool kh_trail_sealer_behind(const kh_trail_sealer_t *self);

/* Seal until everything committed before the call is sealed (rounds
 * until the bound taken at the start is final); for tools and tests.
 * Gives up after timeout_ms without a round that sealed something
 * (KH_E_TIMEOUT). Returns events sealed. */
long kh_trail_sealer_flush(kh_trail_sealer_t *self, PGconn *conn,
                           int timeout_ms, kh_error_t *err);

/* The checkpoints this sealer has written and committed since it was
 * made, by its rounds (every checkpoint_every events, every
 * checkpoint_ms) and by kh_trail_sealer_checkpoint. */
long kh_trail_sealer_checkpoints_written(const kh_trail_sealer_t *self);

/* How long (ms) the sealer has been waiting for transactions that were
 * running when it took its bound, or for prepared ones (0: not waiting).
 * A long wait means a long transaction, or one prepared and left open,
 * holds events back from the seal: worth a warning. */
int64_t kh_trail_sealer_waiting_ms(const kh_trail_sealer_t *self);

/* Write a checkpoint at the sealed head now (if there is one that has
 * no checkpoint yet), once a sealing round in progress elsewhere has
 * ended (it waits for the sealers' lock). Returns 1 written, 0 nothing
 * to do, -1 error (KH_E_TRAIL_BROKEN as for kh_trail_sealer_step). */
int kh_trail_sealer_checkpoint(kh_trail_sealer_t *self, PGconn *conn,
                               kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
