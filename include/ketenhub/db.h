/*
 * PostgreSQL helpers shared by the services and the tools: connecting,
 * telling retryable failures from permanent ones, and turning a libpq
 * failure into a kh_error_t.
 *
 * Error messages come from the server's primary message only. The detail
 * (which for a unique violation quotes the key's value) is never copied,
 * and quoted values in data-exception messages ("invalid input syntax for
 * type uuid: ...") are blanked, so a statement's parameters (which may be
 * personal data) never reach an error record, a log line or the trail.
 */
#ifndef KH_DB_H_INCLUDED
#define KH_DB_H_INCLUDED

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Connect to PostgreSQL. conninfo is a libpq connection string or URI;
 * NULL or "" uses libpq's defaults (PGHOST, PGPORT, PGUSER, PGDATABASE,
 * PGPASSWORD, ...); a password in conninfo wins over the one in
 * $KH_DATABASE_PASSWORD_FILE (kh_db_password), which wins over PGPASSWORD.
 * The application name falls back to "ketenhub".
 * Notices (NOTICE, WARNING sent by the server) are dropped: library code
 * does not log, and nothing in the hub depends on them.
 * Returns a connection the caller owns (PQfinish), or NULL with err:
 * KH_E_UNAVAILABLE when the server cannot be reached or refuses the
 * login, KH_E_NOMEM. */
PGconn *kh_db_connect(const char *conninfo, kh_error_t *err);

/* The database password from the file named by $KH_DATABASE_PASSWORD_FILE
 * (a container secret), read again at every connection so that a rotated
 * password is picked up on reconnect. The file holds the password alone;
 * one trailing newline is dropped. Returns 1 with the password in buf,
 * 0 when the variable is unset or empty (buf ""), or -1 with err
 * (KH_E_CONFIG, path = the variable) when the file cannot be read, is
 * empty, or does not fit in size bytes. */
int kh_db_password(char *buf, size_t size, kh_error_t *err);

/* Whether conninfo is one that libpq can read: "", a database name, or a
 * connection string (key=value ...) or URI (postgresql://...) that
 * parses. Returns 0, or -1 with err (KH_E_CONFIG, path KH_DATABASE_URL)
 * that neither quotes conninfo nor libpq's message, which may hold the
 * password. kh_db_connect_app checks it first: a setting that does not
 * parse is not a database that is away. */
int kh_db_conninfo_check(const char *conninfo, kh_error_t *err);

/* The gssencmode the hub's connections give libpq: "disable", unless the
 * connection string sets gssencmode or names a service, or PGGSSENCMODE
 * or PGSERVICE is set: then "" (libpq takes it from there). With libpq's
 * default, prefer, every TCP connection first looks for Kerberos
 * credentials, which costs a little each time and, with connections made
 * on several threads at once (kh_db_connect_async, the health probe),
 * runs into libkrb5's thread-key setup, which aborts the process now and
 * then. */
const char *kh_db_gssencmode(const char *conninfo);

/* As kh_db_connect, with an application_name for pg_stat_activity (e.g.
 * the service's name); application_name NULL means "ketenhub". */
PGconn *kh_db_connect_app(const char *conninfo, const char *application_name,
                          kh_error_t *err);

/* ---- connecting without blocking the caller ---------------------------- */

/* An attempt to connect, made on a thread of its own. */
typedef struct _kh_db_connecting_t kh_db_connecting_t;

/* The connection of the attempt *pending, once it is made. The first call
 * (*pending NULL) starts kh_db_connect_app on a thread of its own, for a
 * service: one that takes writes (target_session_attrs read-write, unless
 * the connection string or PGTARGETSESSIONATTRS says otherwise); while
 * it runs, every call returns NULL with err KH_E_UNAVAILABLE and *pending
 * stays set; then a call returns the connection (the caller owns it), or
 * NULL with the attempt's error, and sets *pending to NULL. A database
 * that takes its time to answer (packets dropped, a server that accepts
 * and says nothing, a host name that takes its time to resolve) costs the
 * caller's loop nothing: it goes on answering, and stops when told. */
PGconn *kh_db_connect_async(kh_db_connecting_t **pending, const char *conninfo,
                            const char *application_name, kh_error_t *err);

/* How often a service's loop looks at an attempt under way (ms). */
#define KH_DB_CONNECT_POLL_MS 10

/* The wait before the next attempt to reach a database that is away,
 * given the wait after the last failed one (0: this is the first):
 * KH_DB_RETRY_MIN_MS, then twice the last, up to KH_DB_RETRY_MAX_MS. Each
 * service waits so, with one warning per attempt, not one per poll, for
 * as long as an outage lasts. */
#define KH_DB_RETRY_MIN_MS 200
#define KH_DB_RETRY_MAX_MS 5000
int kh_db_retry_next(int last_ms);

/* Give up the attempt *pending (accepts NULL; nulls the pointer): its
 * thread ends on its own and closes the connection it made, if any. */
void kh_db_connect_abandon(kh_db_connecting_t **pending);

/* How many attempts' threads are still in libpq: abandoned ones too,
 * until they give up (kh_service_exit). */
int kh_db_attempts_running(void);

/* Count a thread of libpq's left running for good (the health probe given
 * up at a stop, in a host name's lookup) as an attempt: kh_service_exit
 * then ends the process with _exit, not under that thread. */
void kh_db_thread_left(void);

/* Two connections made side by side, each with kh_db_connect_async:
 * neither is handed out before both attempts ended (a service must not use
 * one half of a pair that is not ready), and a failed one is not tried
 * again before the other ended. Zero-initialise. */
typedef struct {
    kh_db_connecting_t *pending[2];
    PGconn *made[2];
    bool tried[2];  /* attempted in this round */
    kh_error_t err; /* the first failure of this round */
    bool failed;
} kh_db_pair_t;

/* Make, or go on making, conns[k] for each k where want[k]. 1 when every
 * one wanted is made (into conns[k]; the caller owns them); 0 while the
 * attempts run (err KH_E_UNAVAILABLE: call again soon); -1 with err when
 * one failed (what the other made is closed). */
int kh_db_connect_pair(kh_db_pair_t *pair, const bool want[2],
                       const char *conninfo, const char *application_name,
                       PGconn *conns[2], kh_error_t *err);

/* Whether attempts of the pair are under way. */
bool kh_db_pair_connecting(const kh_db_pair_t *pair);

/* Give up the pair's attempts and close what it made. */
void kh_db_pair_abandon(kh_db_pair_t *pair);

/* The connection string the tools and services use: $KH_DATABASE_URL if
 * set and not empty, else "" (libpq's environment defaults). Never NULL. */
const char *kh_db_env_conninfo(void);

/* Whether a failure with this SQLSTATE leaves the connection of no more
 * use, so that only a new one can succeed: connection exceptions (class
 * 08), the server ending the session (57P01 admin_shutdown, 57P02, 57P03,
 * and the rest of 57P), and a server that takes no more writes (25006: a
 * primary demoted to a standby, or set read-only; a new connection finds
 * the primary, kh_db_connect_async). A deadlock, a serialization failure
 * or a lock timeout leaves the connection as good as it was. NULL or ""
 * -> false. */
bool kh_db_session_ended(const char *sqlstate);

/* Whether a failure with this SQLSTATE may succeed if the transaction is
 * retried (possibly on a new connection): connection exceptions (class
 * 08), serialization failure (40001), deadlock (40P01), server shutdown
 * or start-up (57P01, 57P02, 57P03), insufficient resources (53000,
 * 53100, 53200, 53300), lock not available (55P03) and a read-only
 * transaction on a server that was just demoted (25006). NULL -> false. */
bool kh_db_retryable_sqlstate(const char *sqlstate);

/* Fill err from a failed command and return -1, for
 * `return kh_db_error (err, conn, res, "cannot insert partner");`.
 * res may be NULL (then the connection's error is used). The code is
 * KH_E_UNAVAILABLE when the connection is bad or the SQLSTATE is
 * retryable, else KH_E_DB. The message is "<context>: <primary message>
 * (sqlstate XXXXX)", and err->sqlstate holds that SQLSTATE ("" when
 * there is none); context may be NULL. Does not clear res. */
int kh_db_error(kh_error_t *err, PGconn *conn, const PGresult *res,
                const char *context);

/* Run one parameterless command (BEGIN, COMMIT, SET ..., DDL) and discard
 * its result. Returns 0, or -1 with err as kh_db_error. */
int kh_db_exec(PGconn *conn, const char *sql, kh_error_t *err);

/* Send a sync, read every result of the pipeline the connection is in and
 * leave pipeline mode. Returns 0 when every query succeeded, else -1 with
 * the first error in err. keep (or NULL) gets the result of the query at
 * index keep_index (from 0, in the order they were sent) when it
 * succeeded, else NULL; the caller clears it. */
int kh_db_pipeline_end(PGconn *conn, int keep_index, PGresult **keep,
                       kh_error_t *err);

/* Run begin (a parameterless command such as "BEGIN") and then the
 * prepared statement name (parameters and result_format as PQexecPrepared
 * takes them) in one round trip: a pipeline. Returns the statement's result
 * (rows or a command status) when both succeeded, else NULL with the first
 * error in err; the transaction begin opened is then open and failed, for the
 * caller to roll back. */
PGresult *kh_db_begin_exec(PGconn *conn, const char *begin, const char *name,
                           int nparams, const char *const *params,
                           const int *lengths, const int *formats,
                           int result_format, kh_error_t *err);

/* Whether conn got a notification (of a channel it LISTENs on) since
 * this was last asked: what the server sent meanwhile is read without
 * waiting, and every notification is taken. A connection that cannot be
 * read (it broke) counts as told: what its caller reads again on it then
 * fails, and says so, rather than a change going unnoticed. false for
 * NULL. */
bool kh_db_notified(PGconn *conn);

/* Roll back the connection's open transaction, if any, ignoring errors:
 * for cleanup paths that already carry an error. Safe on NULL. */
void kh_db_rollback_quietly(PGconn *conn);

#ifdef __cplusplus
}
#endif
#endif
