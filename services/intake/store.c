/*
 * intake's PostgreSQL side (see store.h).
 *
 * A batch travels as binary arrays, one per column, and is committed by one
 * statement:
 * PostgreSQL runs a single statement in its own transaction, so the
 * referral rows and their audit events land together or not at all.
 */
#include "store.h"
#include "store_sql.h"

#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <sodium.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/db.h"
#include "ketenhub/log.h"
#include "ketenhub/partner.h"
#include "ketenhub/pgarray.h"

struct _store_t {
    char *conninfo;
    PGconn *writer;          /* batches, asynchronously */
    PGconn *reader;          /* status, look-ups, registry */
    kh_db_pair_t connecting; /* attempts to make them, side by side */
    bool busy;               /* a batch is being committed on the writer */
    bool sending;            /* part of it is still in libpq's buffer */
    PGresult *rows;          /* the batch's result rows, once they arrived */
    int stop_fd;             /* readable when a stop may be asked, or -1 */
    bool (*stop)(void *arg); /* whether one is: see store_watch_stop */
    void *stop_arg;
};

#define S_READ_TIMEOUT_MS 1000
/* How long preparing the statements of a new connection waits for a lock
 * (see store_connect). */
#define S_SETUP_LOCK_TIMEOUT "'1s'"

/* For a key that another intake process committed while our statement
 * waited on it: a new statement sees that commit. */
static const char *s_lookup_sql =
    "SELECT id, encode(payload_hash, 'hex'), to_char(accepted_at AT TIME "
    "ZONE 'UTC', " S_TS_FORMAT ") FROM referrals"
    " WHERE partner_id = $1 AND idempotency_key = $2";

/* Conflicts found after a batch's statement, audited as that statement
 * audits the ones it sees ("conflicts" above). */
static const char *s_conflicts_sql =
    "INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    "  reason_code, reason_path, payload_hash, origin_service, origin_peer)"
    " SELECT 'partner', partner_id, 'referral.rejected', 'refused',"
    "  'idempotency_conflict', 'idempotency_key', hash, 'intake', peer"
    " FROM unnest($1::text[], $2::bytea[], $3::text[]) WITH ORDINALITY"
    "  AS t(partner_id, hash, peer, i) ORDER BY i";

/* $1 referral, $2 partner, $3 the key asking. Whether the key still
 * admits the partner (the key map may not have heard yet of a revocation
 * or an overlap that ended), and only then the referral's state and its
 * deliveries (never their payloads), no row when there is no such
 * referral of the partner; an escalation copy names the partner whose
 * delivery was overdue. */
/* clang-format off */
static const char *s_status_sql =
    "SELECT a.admitted, r.state,"
    "  to_char(r.accepted_at AT TIME ZONE 'UTC', " S_TS_FORMAT "),"
    "  coalesce((SELECT json_agg(json_strip_nulls(json_build_object("
    "    'delivery_id', d.id, 'partner', d.partner_id, 'priority',"
    "    d.priority, 'state', d.state, 'updated_at',"
    "    to_char(d.updated_at AT TIME ZONE 'UTC', " S_TS_FORMAT "),"
    "    'escalation_of', (SELECT o.partner_id FROM deliveries o"
    "     WHERE o.id = d.escalation_of)))"
    "    ORDER BY d.partner_id, d.escalation_of NULLS FIRST)"
    "    FROM deliveries d"
    "    WHERE d.referral_id = r.id), '[]')"
    " FROM (SELECT" KH_PARTNER_ADMITTED("$3", "$2") " AS admitted) a"
    " LEFT JOIN referrals r"
    "  ON a.admitted AND r.id = $1::uuid AND r.partner_id = $2"
    " WHERE r.id IS NOT NULL OR NOT a.admitted";
/* clang-format on */

/* Cancel requests still being sent (s_give_up), by all stores. */
static atomic_int s_cancels;

#define S_CANCEL_WAIT_MS 500

static void *s_cancel_run(void *arg)
{
    PGcancel *cancel = arg;
    char why[256];
    if (!PQcancel(cancel, why, sizeof why)) {
        why[strcspn(why, "\n")] = '\0';
        kh_log_warn("db_cancel_failed", "msg=\"%s\"", KH_LOG_Q(why));
    }
    PQfreeCancel(cancel);
    atomic_fetch_sub(&s_cancels, 1);
    return NULL;
}

/* Give up on what *conn_p is running and close it. Closing alone does not
 * stop the statement: a backend waiting for a lock, or working, notices
 * its client is gone only when it next talks to it, and meanwhile holds
 * its locks (a resubmission of the same key would wait behind them) and
 * may still commit. So the server is asked to cancel it first. libpq's
 * cancel request opens a connection of its own and may block on a
 * network that is gone: it is sent from a thread, and intake's loop goes
 * on. Whatever the statement's fate, a resubmission with the same
 * idempotency key gets the one true answer. */
static void s_give_up(PGconn **conn_p)
{
    PGconn *conn = *conn_p;
    if (!conn)
        return;
    PGcancel *cancel =
        PQtransactionStatus(conn) == PQTRANS_ACTIVE ? PQgetCancel(conn) : NULL;
    if (cancel) {
        atomic_fetch_add(&s_cancels, 1);
        pthread_t thread;
        if (pthread_create(&thread, NULL, s_cancel_run, cancel) == 0)
            pthread_detach(thread);
        else /* no thread: send it here and now */
            s_cancel_run(cancel);
    }
    PQfinish(conn);
    *conn_p = NULL;
}

store_t *store_new(const char *conninfo)
{
    store_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->stop_fd = -1;
    self->conninfo = strdup(conninfo ? conninfo : "");
    if (!self->conninfo) {
        free(self);
        return NULL;
    }
    return self;
}

void store_destroy(store_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    store_t *self = *self_p;
    PQclear(self->rows);
    if (self->busy)
        s_give_up(&self->writer);
    PQfinish(self->writer);
    PQfinish(self->reader);
    /* A cancel request still on its way is let through (briefly): an
     * abandoned statement must not hold its locks after intake is gone. */
    for (int waited = 0;
         atomic_load(&s_cancels) > 0 && waited < S_CANCEL_WAIT_MS; waited += 10)
        zclock_sleep(10);
    kh_db_pair_abandon(&self->connecting);
    free(self->conninfo);
    free(self);
    *self_p = NULL;
}

static bool s_conn_up(PGconn *conn)
{
    return conn && PQstatus(conn) == CONNECTION_OK;
}

/* Whether an idle conn is still fine, as far as can be told without a
 * statement or a wait. libpq learns that the server ended a session (a
 * restart of PostgreSQL ends them all) only when it reads from it: an
 * idle connection that has anything to read has been told its end (an
 * error, then the end of the stream), which is read here. A network that
 * is gone tells nothing: the next read's timeout finds it. */
static bool s_conn_alive(PGconn *conn)
{
    struct pollfd pfd = {conn ? PQsocket(conn) : -1, POLLIN, 0};
    for (int i = 0; i < 8 && s_conn_up(conn) && poll(&pfd, 1, 0) > 0; i++)
        if (!PQconsumeInput(conn))
            return false;
    return s_conn_up(conn);
}

bool store_up(store_t *self)
{
    return s_conn_up(self->writer) && s_conn_up(self->reader);
}

int store_socket(store_t *self)
{
    return self->writer ? PQsocket(self->writer) : -1;
}

/* The answer while there is no connection to try: its loss was logged
 * when a statement found it, and each attempt to connect again logs
 * event=db_connect_failed; a line per request besides would flood the log
 * for as long as the outage lasts (intake's stats line counts them as
 * unavailable). */
static int s_unavailable(kh_error_t *err)
{
    return kh_error_set(err, KH_E_UNAVAILABLE, "",
                        "the hub's database is unavailable; send the "
                        "same request again (a SUBMIT with the same "
                        "idempotency key)");
}

/* Turn a failure on conn into err and clear res. Connection-level
 * failures and the SQLSTATEs that mean "try again" become
 * KH_E_UNAVAILABLE; anything else is KH_E_INTERNAL (a bug or a schema
 * mismatch: the partner can only retry). */
static int s_fail(PGconn *conn, PGresult *res, const char *what,
                  kh_error_t *err)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    /* The server's message may quote a value from the request: log only
     * the SQLSTATE and the constraint or table it names. */
    const char *constraint =
        res ? PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME) : NULL;
    const char *table =
        res ? PQresultErrorField(res, PG_DIAG_TABLE_NAME) : NULL;
    bool retry = !s_conn_up(conn) || !state || kh_db_retryable_sqlstate(state);
    /* Without a SQLSTATE the failure is libpq's own (the connection was
     * lost, say), and the SQLSTATEs that mean "try again" (a terminated
     * session, a server shutting down, a deadlock) have fixed messages:
     * neither quotes anything of the request, and both say what happened
     * where "msg=none" would not. */
    char msg[160] = "";
    const char *words = NULL;
    if (!state && conn)
        words = PQerrorMessage(conn);
    else if (state && kh_db_retryable_sqlstate(state))
        words = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    if (words) {
        snprintf(msg, sizeof msg, "%s", words);
        msg[strcspn(msg, "\n")] = '\0';
    }
    kh_log_warn("db_error",
                "op=%s sqlstate=%s retryable=%d table=%s "
                "constraint=%s msg=\"%s\"",
                what, state ? state : "none", retry, table ? table : "none",
                constraint ? constraint : "none",
                KH_LOG_Q(msg[0] ? msg : "none"));
    char sqlstate[sizeof err->sqlstate] = "";
    if (state)
        snprintf(sqlstate, sizeof sqlstate, "%s", state);
    PQclear(res);
    if (retry)
        return s_unavailable(err);
    kh_error_set(err, KH_E_INTERNAL, "",
                 "the hub could not handle the request; send the same "
                 "request again (a SUBMIT with the same idempotency key)");
    memcpy(err->sqlstate, sqlstate, sizeof sqlstate);
    return -1;
}

/* Whether a failure on conn means the connection is gone (or of no more
 * use), rather than that one statement failed on a connection that goes
 * on: libpq's own failures (no SQLSTATE), and kh_db_session_ended. */
static bool s_lost(PGconn *conn, const char *state)
{
    return !s_conn_up(conn) || !state || kh_db_session_ended(state);
}

/* s_fail for a statement on one of the store's connections, *conn_p: a
 * connection that is lost (s_lost) is closed, so that store_up turns
 * false and intake connects again; one that only failed a statement is
 * kept, and so is the other connection. */
static int s_fail_on(PGconn **conn_p, PGresult *res, const char *what,
                     kh_error_t *err)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    bool lost = s_lost(*conn_p, state);
    int rc = s_fail(*conn_p, res, what, err);
    if (lost && *conn_p)
        s_give_up(conn_p);
    return rc;
}

/* Prepare count statements on conn. */
static int s_prepare(PGconn *conn, const char *const *names,
                     const char *const *sql, const int *nparams, size_t count,
                     kh_error_t *err)
{
    for (size_t i = 0; i < count; i++) {
        PGresult *res = PQprepare(conn, names[i], sql[i], nparams[i], NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            if (s_conn_up(conn) && state && !kh_db_retryable_sqlstate(state)) {
                kh_db_error(err, conn, res, "cannot prepare statements");
                PQclear(res);
                return -1;
            }
            return s_fail(conn, res, "prepare", err);
        }
        PQclear(res);
    }
    return 0;
}

void store_watch_stop(store_t *self, int fd, bool (*stop)(void *arg), void *arg)
{
    self->stop_fd = stop ? fd : -1;
    self->stop = stop;
    self->stop_arg = arg;
}

bool store_connecting(const store_t *self)
{
    return kh_db_pair_connecting(&self->connecting);
}

int store_connect(store_t *self, kh_error_t *err)
{
    if (!store_connecting(self)) {
        if (store_up(self))
            return 0;
        /* A new attempt, for what is not up (both at once when neither
         * is): a connection that is fine stays, with its session; one
         * that the server ended meanwhile (s_conn_alive) does not. */
        PQclear(self->rows);
        self->rows = NULL;
        if (self->busy || !s_conn_alive(self->writer)) {
            PQfinish(self->writer);
            self->writer = NULL;
        }
        self->busy = self->sending = false;
        if (!s_conn_alive(self->reader)) {
            PQfinish(self->reader);
            self->reader = NULL;
        }
    }
    const bool want[2] = {!self->writer, !self->reader};
    PGconn *conns[2] = {NULL, NULL};
    if (kh_db_connect_pair(&self->connecting, want, self->conninfo,
                           "ketenhub-intake", conns, err) <= 0)
        return -1;
    /* The new ones are set up before either is used. The batch
     * statement's plan does not depend on its parameters; planning it
     * anew for every batch would cost more than running it. */
    static const char *const writer_names[] = {"commit"};
    const char *const writer_sql[] = {s_commit_sql};
    static const int writer_nparams[] = {S_COMMIT_PARAMS};
    static const char *const reader_names[] = {"lookup", "status", "partners",
                                               "conflicts"};
    const char *const reader_sql[] = {s_lookup_sql, s_status_sql,
                                      KH_PARTNER_KEYS_SQL, s_conflicts_sql};
    static const int reader_nparams[] = {2, 3, 0, 3};
    /* Preparing takes the tables' locks, on intake's loop: a migration
     * or an administrator's LOCK TABLE that holds them must not stop the
     * loop (no answers, no stop) for as long as it lasts. A lock not had
     * within S_SETUP_LOCK_TIMEOUT fails the attempt, made again later. */
    if ((conns[0] && (kh_db_exec(conns[0],
                                 "SET plan_cache_mode = force_generic_plan; "
                                 "SET lock_timeout = " S_SETUP_LOCK_TIMEOUT,
                                 err) ||
                      s_prepare(conns[0], writer_names, writer_sql,
                                writer_nparams, 1, err) ||
                      kh_db_exec(conns[0], "RESET lock_timeout", err))) ||
        (conns[1] &&
         (kh_db_exec(conns[1], "SET lock_timeout = " S_SETUP_LOCK_TIMEOUT,
                     err) ||
          s_prepare(conns[1], reader_names, reader_sql, reader_nparams, 4,
                    err) ||
          kh_db_exec(conns[1],
                     "LISTEN " KH_PARTNER_CHANNEL "; RESET lock_timeout",
                     err)))) {
        PQfinish(conns[0]);
        PQfinish(conns[1]);
        return -1;
    }
    /* A batch can be larger than the socket holds: sent in blocking mode
     * to a backend that stops reading, it would stop intake's loop with
     * it (no stall check, no answers, no SIGTERM). */
    if (conns[0] && PQsetnonblocking(conns[0], 1)) {
        PQfinish(conns[0]);
        PQfinish(conns[1]);
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "cannot make the database connection "
                            "nonblocking");
    }
    if (conns[0])
        self->writer = conns[0];
    if (conns[1])
        self->reader = conns[1];
    return 0;
}

/* Run a prepared statement on the reader (lengths and formats as libpq
 * takes them; NULL: text) and wait at most S_READ_TIMEOUT_MS for its
 * result: a database that stops answering must not stop intake's
 * loop. On a timeout, or when a stop is asked meanwhile (store_watch_stop:
 * a stop must not wait for a read), the read is given up and the reader
 * closed (store_up turns false, so intake reconnects) and NULL is
 * returned, which the callers treat as a lost connection. */
static PGresult *s_read_binary(store_t *self, const char *name, int nparams,
                               const char *const *params, const int *lengths,
                               const int *formats)
{
    if (!PQsendQueryPrepared(self->reader, name, nparams, params, lengths,
                             formats, 0))
        return NULL;
    int64_t deadline = zclock_mono() + S_READ_TIMEOUT_MS;
    while (PQisBusy(self->reader)) {
        int64_t left = deadline - zclock_mono();
        struct pollfd pfd[2] = {{PQsocket(self->reader), POLLIN, 0},
                                {self->stop_fd, POLLIN, 0}};
        int ready =
            left > 0 ? poll(pfd, self->stop_fd >= 0 ? 2 : 1, (int) left) : 0;
        if (ready == 0) {
            kh_log_warn("db_read_timeout", "op=%s ms=%d", name,
                        S_READ_TIMEOUT_MS);
            s_give_up(&self->reader);
            return NULL;
        }
        if (ready > 0 && (pfd[1].revents & POLLIN) &&
            self->stop(self->stop_arg)) {
            kh_log_info("db_read_abandoned", "op=%s reason=stopping", name);
            s_give_up(&self->reader);
            return NULL;
        }
        if (ready > 0 && !pfd[0].revents)
            continue; /* a signal that asks no stop (SIGHUP) */
        if (!PQconsumeInput(self->reader))
            break;
    }
    /* The statement's result, then drain to the end of the command. */
    PGresult *res = PQgetResult(self->reader);
    PGresult *more;
    while ((more = PQgetResult(self->reader)) != NULL)
        PQclear(more);
    return res;
}

/* s_read_binary with text parameters. */
static PGresult *s_read(store_t *self, const char *name, int nparams,
                        const char *const *params)
{
    return s_read_binary(self, name, nparams, params, NULL, NULL);
}

/* The element types of the commit statement's binary arrays. */
static const unsigned s_commit_types[S_COMMIT_PARAMS] = {
    KH_PG_UUID, KH_PG_TEXT, KH_PG_TEXT,  KH_PG_TEXT, KH_PG_BYTEA, KH_PG_BYTEA,
    KH_PG_TEXT, KH_PG_TEXT, KH_PG_TEXT,  KH_PG_TEXT, KH_PG_TEXT,  KH_PG_TEXT,
    KH_PG_TEXT, KH_PG_TEXT, KH_PG_BYTEA, KH_PG_TEXT};

typedef struct {
    kh_pgarray_t columns[S_COMMIT_PARAMS];
} s_params_t;

/* Fill params from the batch, column by column. */
static void s_build_params(s_params_t *params, const store_submit_t *subs,
                           size_t nsubs, const store_repeat_t *reps,
                           size_t nreps, const store_refusal_t *refs,
                           size_t nrefs)
{
    kh_pgarray_t *col = params->columns;
    for (int i = 0; i < S_COMMIT_PARAMS; i++)
        kh_pgarray_reset(&col[i], s_commit_types[i]);
    for (size_t i = 0; i < nsubs; i++) {
        unsigned char hash[32];
        sodium_hex2bin(hash, sizeof hash, subs[i].hash, 64, NULL, NULL, NULL);
        kh_pgarray_add_uuid(&col[0], subs[i].referral_id);
        kh_pgarray_add_str(&col[1], subs[i].partner_id);
        kh_pgarray_add_str(&col[2], subs[i].idem_key);
        kh_pgarray_add_str(&col[3], json_string_value(json_object_get(
                                        subs[i].referral, "schema_version")));
        kh_pgarray_add(&col[4], subs[i].payload, subs[i].payload_len);
        kh_pgarray_add(&col[5], hash, sizeof hash);
        kh_pgarray_add_str(&col[6], subs[i].peer);
        kh_pgarray_add_str(&col[12], subs[i].key);
    }
    for (size_t i = 0; i < nrefs; i++) {
        kh_pgarray_add_str(&col[7], refs[i].action);
        kh_pgarray_add_str(&col[8], refs[i].actor_id);
        kh_pgarray_add_str(&col[9], refs[i].code);
        kh_pgarray_add_str(&col[10], refs[i].path);
        kh_pgarray_add_str(&col[11], refs[i].peer);
    }
    for (size_t i = 0; i < nreps; i++) {
        char sub[24];
        unsigned char hash[32];
        snprintf(sub, sizeof sub, "%zu", reps[i].sub + 1);
        sodium_hex2bin(hash, sizeof hash, reps[i].hash, 64, NULL, NULL, NULL);
        kh_pgarray_add_str(&col[13], sub);
        kh_pgarray_add(&col[14], hash, sizeof hash);
        kh_pgarray_add_str(&col[15], reps[i].peer);
    }
}

static void s_params_free(s_params_t *params)
{
    for (int i = 0; i < S_COMMIT_PARAMS; i++)
        kh_pgarray_free(&params->columns[i]);
}

/* Fill sub's outputs from the row that holds its key. */
static void s_answer_stored(store_submit_t *sub, const char *id,
                            const char *hash, const char *accepted_at)
{
    snprintf(sub->stored_id, sizeof sub->stored_id, "%s", id);
    snprintf(sub->stored_hash, sizeof sub->stored_hash, "%s", hash);
    snprintf(sub->accepted_at, sizeof sub->accepted_at, "%s", accepted_at);
}

/* A key that was neither inserted by us nor visible to our statement was
 * committed concurrently by another intake process: read it anew. */
static int s_lookup(store_t *self, store_submit_t *sub, kh_error_t *err)
{
    const char *params[] = {sub->partner_id, sub->idem_key};
    PGresult *res = s_read(self, "lookup", 2, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail_on(&self->reader, res, "lookup", err);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, KH_E_INTERNAL, "",
                            "the idempotency key vanished; retry");
    }
    s_answer_stored(sub, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1),
                    PQgetvalue(res, 0, 2));
    PQclear(res);
    return 0;
}

int store_commit_send(store_t *self, store_submit_t *subs, size_t nsubs,
                      const store_repeat_t *reps, size_t nreps,
                      const store_refusal_t *refs, size_t nrefs,
                      kh_error_t *err)
{
    if (!store_up(self))
        return s_unavailable(err);
    if (self->busy)
        return s_fail(self->writer, NULL, "commit", err);
    s_params_t params;
    memset(&params, 0, sizeof params);
    s_build_params(&params, subs, nsubs, reps, nreps, refs, nrefs);
    const char *values[S_COMMIT_PARAMS];
    int lengths[S_COMMIT_PARAMS], formats[S_COMMIT_PARAMS];
    for (int i = 0; i < S_COMMIT_PARAMS; i++) {
        /* An array fails on an allocation (or an id that is no uuid,
         * which kh_uuid_new never makes). */
        if (!(values[i] = kh_pgarray_data(&params.columns[i], &lengths[i]))) {
            s_params_free(&params);
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        }
        formats[i] = 1;
    }
    int sent = PQsendQueryPrepared(self->writer, "commit", S_COMMIT_PARAMS,
                                   values, lengths, formats, 0);
    s_params_free(&params);
    /* What the socket does not take now, store_commit_poll sends. */
    int flushed = sent ? PQflush(self->writer) : -1;
    if (flushed == -1)
        return s_fail_on(&self->writer, NULL, "commit", err);
    self->busy = true;
    self->sending = flushed == 1;
    return 0;
}

bool store_sending(const store_t *self)
{
    return self->sending;
}

/* Fill the outputs of subs from the batch's result rows; every
 * submission must have its row. */
static int s_answer(store_t *self, PGresult *res, store_submit_t *subs,
                    size_t nsubs, kh_error_t *err)
{
    int rows = PQntuples(res);
    size_t answered = 0;
    for (int row = 0; row < rows; row++) {
        long i = strtol(PQgetvalue(res, row, 0), NULL, 10) - 1;
        if (i < 0 || (size_t) i >= nsubs || subs[i].stored_id[0])
            continue;
        store_submit_t *sub = &subs[i];
        sub->admitted = PQgetvalue(res, row, 5)[0] == 't';
        sub->inserted = PQgetvalue(res, row, 1)[0] == 't';
        answered++;
        if (!sub->admitted)
            continue; /* nothing was done for it */
        if (sub->inserted)
            s_answer_stored(sub, sub->referral_id, sub->hash,
                            PQgetvalue(res, row, 4));
        else if (PQgetisnull(res, row, 2)) {
            if (s_lookup(self, sub, err))
                return -1;
            sub->late = true;
        } else
            s_answer_stored(sub, PQgetvalue(res, row, 2),
                            PQgetvalue(res, row, 3), PQgetvalue(res, row, 4));
    }
    if (answered != nsubs)
        return kh_error_set(err, KH_E_INTERNAL, "",
                            "the hub could not confirm the request; resend it "
                            "with the same idempotency key");
    return 0;
}

int store_commit_poll(store_t *self, store_submit_t *subs, size_t nsubs,
                      kh_error_t *err)
{
    if (!self->busy)
        return kh_error_set(err, KH_E_INTERNAL, "", "no batch to wait for");
    int flushed = 0;
    if (!PQconsumeInput(self->writer) ||
        (self->sending && (flushed = PQflush(self->writer)) == -1)) {
        self->busy = self->sending = false;
        PQclear(self->rows);
        self->rows = NULL;
        return s_fail_on(&self->writer, NULL, "commit", err);
    }
    self->sending = flushed == 1;
    /* Collect results until libpq says the command is over. */
    while (!PQisBusy(self->writer)) {
        PGresult *res = PQgetResult(self->writer);
        if (!res)
            break;
        /* Keep the rows, or the first error if there is one. */
        if (!self->rows)
            self->rows = res;
        else if (PQresultStatus(self->rows) == PGRES_TUPLES_OK &&
                 PQresultStatus(res) != PGRES_TUPLES_OK) {
            PQclear(self->rows);
            self->rows = res;
        } else
            PQclear(res);
    }
    if (PQisBusy(self->writer))
        return 1;
    self->busy = false;
    PGresult *res = self->rows;
    self->rows = NULL;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail_on(&self->writer, res, "commit", err);
    int rc = s_answer(self, res, subs, nsubs, err);
    PQclear(res);
    return rc == 0 ? 0 : STORE_COMMITTED_UNREAD;
}

int store_audit_conflicts(store_t *self, const store_conflict_t *conflicts,
                          size_t n, kh_error_t *err)
{
    if (!s_conn_up(self->reader))
        return s_unavailable(err);
    kh_pgarray_t cols[3];
    memset(cols, 0, sizeof cols);
    kh_pgarray_reset(&cols[0], KH_PG_TEXT);
    kh_pgarray_reset(&cols[1], KH_PG_BYTEA);
    kh_pgarray_reset(&cols[2], KH_PG_TEXT);
    for (size_t i = 0; i < n; i++) {
        unsigned char hash[32];
        sodium_hex2bin(hash, sizeof hash, conflicts[i].hash, 64, NULL, NULL,
                       NULL);
        kh_pgarray_add_str(&cols[0], conflicts[i].partner_id);
        kh_pgarray_add(&cols[1], hash, sizeof hash);
        kh_pgarray_add_str(&cols[2], conflicts[i].peer);
    }
    const char *values[3];
    int lengths[3], formats[3] = {1, 1, 1};
    bool built = true;
    for (int i = 0; i < 3; i++)
        built = (values[i] = kh_pgarray_data(&cols[i], &lengths[i])) && built;
    PGresult *res =
        built ? s_read_binary(self, "conflicts", 3, values, lengths, formats)
              : NULL;
    for (int i = 0; i < 3; i++)
        kh_pgarray_free(&cols[i]);
    if (!built)
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        return s_fail_on(&self->reader, res, "conflicts", err);
    PQclear(res);
    return 0;
}

void store_abandon(store_t *self)
{
    PQclear(self->rows);
    self->rows = NULL;
    self->busy = self->sending = false;
    s_give_up(&self->writer);
}

int store_status(store_t *self, const char *partner_id, const char *key,
                 const char *referral_id, bool *admitted, json_t *reply,
                 kh_error_t *err)
{
    *admitted = true;
    if (!s_conn_up(self->reader))
        return s_unavailable(err);
    const char *params[] = {referral_id, partner_id, key};
    PGresult *res = s_read(self, "status", 3, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail_on(&self->reader, res, "status", err);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, KH_E_NOT_FOUND, "referral_id",
                            "no referral with this id was submitted by you");
    }
    if (PQgetvalue(res, 0, 0)[0] != 't') {
        PQclear(res);
        *admitted = false;
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "this key no longer admits its partner");
    }
    json_object_set_new(reply, "referral_id", json_string(referral_id));
    json_object_set_new(reply, "state", json_string(PQgetvalue(res, 0, 1)));
    json_object_set_new(reply, "accepted_at",
                        json_string(PQgetvalue(res, 0, 2)));
    json_t *deliveries = json_loads(PQgetvalue(res, 0, 3), 0, NULL);
    json_object_set_new(reply, "deliveries",
                        deliveries ? deliveries : json_array());
    PQclear(res);
    return 0;
}

bool store_registry_changed(store_t *self)
{
    return s_conn_up(self->reader) && kh_db_notified(self->reader);
}

static void s_free_string(void **item)
{
    free(*item);
    *item = NULL;
}

zhashx_t *store_partners(store_t *self, int64_t *ends_in_ms, kh_error_t *err)
{
    if (!s_conn_up(self->reader)) {
        s_unavailable(err);
        return NULL;
    }
    PGresult *res = s_read(self, "partners", 0, NULL);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        s_fail_on(&self->reader, res, "partners", err);
        return NULL;
    }
    zhashx_t *partners = zhashx_new();
    zhashx_set_destructor(partners, s_free_string);
    *ends_in_ms = PQntuples(res) && !PQgetisnull(res, 0, 2)
                      ? strtoll(PQgetvalue(res, 0, 2), NULL, 10)
                      : -1;
    for (int row = 0; row < PQntuples(res); row++) {
        char *id = strdup(PQgetvalue(res, row, 1));
        if (id)
            zhashx_insert(partners, PQgetvalue(res, row, 0), id);
    }
    PQclear(res);
    return partners;
}
