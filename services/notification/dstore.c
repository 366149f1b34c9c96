/*
 * The notification service's store (see dstore.h). Its statements
 * (dstore_sql.h) are prepared once per connection (they are planned in as
 * much time as they run). ACK batches have a connection of their own, so
 * that PostgreSQL commits them on one core while it claims on another.
 */
#include "dstore.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "dstore_sql.h"
#include "ketenhub/db.h"
#include "ketenhub/log.h"
#include "ketenhub/partner.h"
#include "ketenhub/pgarray.h"

struct _dstore_t {
    char *conninfo;
    dstore_policy_t policy;
    PGconn *conn;
    PGconn *ack_conn;        /* ACK batches only, each committing alone */
    kh_db_pair_t connecting; /* attempts to make conn and ack_conn */
    kh_pgarray_t arrays[4];  /* the ACK statement's parameters */
    kh_pgarray_t ids[2];     /* re-send, due and unsent: ids, on conn */
    kh_pgarray_t claims[4];  /* the pending claim's parameters, on conn */
    dstore_answer_t *acks;   /* the batch in flight on ack_conn, or NULL */
    size_t nacks;
    bool begin_pending; /* a transaction begun that has sent no statement */
};

/* $1 actor ("key:" and the Z85 key), $2 peer address. */
static const char *s_refused_sql =
    "INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    " reason_code, origin_service, origin_peer)"
    " VALUES ('partner', $1, 'auth.refused', 'refused', $3,"
    " 'notification', $2)";

#define S_PARAMS_MAX 10 /* the most parameters of a statement (re-send) */
/* The longest wait for a lock of a read of the partner registry. */
#define S_REGISTRY_LOCK_TIMEOUT "'500ms'"

dstore_t *dstore_new(const char *conninfo, const dstore_policy_t *policy)
{
    dstore_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->conninfo = strdup(conninfo ? conninfo : "");
    if (!self->conninfo) {
        free(self);
        return NULL;
    }
    self->policy = *policy;
    return self;
}

void dstore_destroy(dstore_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    dstore_t *self = *self_p;
    PQfinish(self->conn);
    PQfinish(self->ack_conn);
    kh_db_pair_abandon(&self->connecting);
    free(self->conninfo);
    for (int k = 0; k < 4; k++)
        kh_pgarray_free(&self->arrays[k]);
    for (int k = 0; k < 4; k++)
        kh_pgarray_free(&self->claims[k]);
    for (int k = 0; k < 2; k++)
        kh_pgarray_free(&self->ids[k]);
    free(self);
    *self_p = NULL;
}

static bool s_conn_ok(const PGconn *conn)
{
    return conn && PQstatus(conn) == CONNECTION_OK;
}

/* A new connection's settings and prepared statements. 0, or -1 with err. */
static int s_setup(PGconn *conn, kh_error_t *err)
{
    /* Every statement finds its rows through an index, however large the
     * table: a plan cached while the table was small (a new hub, the
     * statistics of its first minutes) kept scanning all deliveries for
     * every claim long after, some 7 ms per claim at 1,000 deliveries.
     * Their plans do not depend on their parameters, so each is planned
     * once: with custom plans, planning the claim at every execution was
     * a sixth of this session's CPU at 300 referrals/s. */
    int rc = kh_db_exec(conn,
                        "SET statement_timeout = '10s'; SET lock_timeout = "
                        "'5s'; SET idle_in_transaction_session_timeout = "
                        "'60s'; SET plan_cache_mode = force_generic_plan; "
                        "SET enable_seqscan = off",
                        err);
    for (int i = 0; rc == 0 && i < S_STATEMENTS; i++) {
        PGresult *res = PQprepare(conn, s_statements[i].name,
                                  *s_statements[i].sql, 0, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            rc = kh_db_error(err, conn, res, s_statements[i].name);
        PQclear(res);
    }
    return rc;
}

int dstore_connect(dstore_t *self, kh_error_t *err)
{
    if (self->acks) /* a batch was in flight on a connection that broke */
        dstore_ack_wait(self, err);
    PGconn **slots[2] = {&self->conn, &self->ack_conn};
    bool want[2] = {!s_conn_ok(self->conn), !s_conn_ok(self->ack_conn)};
    if (!want[0] && !want[1])
        return 0;
    /* A new attempt makes both anew. When one was found broken the other
     * is most likely gone as well (a restarted or failed-over server), but
     * libpq cannot tell until it is used: an idle ACK connection kept
     * would fail the first ACKs after every outage (the partners told
     * unavailable, a warning each) and only then be made again. */
    if (!dstore_connecting(self))
        for (int k = 0; k < 2; k++) {
            PQfinish(*slots[k]);
            *slots[k] = NULL;
            want[k] = true;
        }
    PGconn *made[2] = {NULL, NULL};
    if (kh_db_connect_pair(&self->connecting, want, self->conninfo,
                           "ketenhub-notification", made, err) <= 0)
        return -1;
    /* conn hears of registry changes (dstore_registry_changed). */
    int rc = 0;
    for (int k = 0; k < 2; k++)
        if (want[k] && rc == 0 &&
            (s_setup(made[k], err) ||
             (k == 0 &&
              kh_db_exec(made[k], "LISTEN " KH_PARTNER_CHANNEL, err))))
            rc = -1;
    for (int k = 0; k < 2; k++)
        if (want[k]) {
            if (rc)
                PQfinish(made[k]);
            else
                *slots[k] = made[k];
        }
    return rc;
}

bool dstore_connecting(const dstore_t *self)
{
    return kh_db_pair_connecting(&self->connecting);
}

int dstore_begin(dstore_t *self, kh_error_t *err)
{
    if (!dstore_up(self))
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "no database connection");
    self->begin_pending = true; /* sent with the first statement */
    return 0;
}

int dstore_commit(dstore_t *self, kh_error_t *err)
{
    if (self->begin_pending) { /* nothing was sent: nothing to commit */
        self->begin_pending = false;
        return 0;
    }
    if (kh_db_exec(self->conn, "COMMIT", err) == 0)
        return 0;
    kh_db_rollback_quietly(self->conn);
    return -1;
}

void dstore_rollback(dstore_t *self, const kh_error_t *why)
{
    self->begin_pending = false;
    /* A connection that could not leave its pipeline (the BEGIN goes in
     * one) refuses every statement after, as one the server ended or that
     * takes no more writes does: the next tick opens a new one. */
    if (self->conn && (PQpipelineStatus(self->conn) != PQ_PIPELINE_OFF ||
                       kh_db_session_ended(why->sqlstate))) {
        PQfinish(self->conn);
        self->conn = NULL;
    } else if (dstore_up(self))
        kh_db_rollback_quietly(self->conn);
}

bool dstore_up(const dstore_t *self)
{
    return self->conn && PQstatus(self->conn) == CONNECTION_OK &&
           self->ack_conn && PQstatus(self->ack_conn) == CONNECTION_OK;
}

bool dstore_registry_changed(dstore_t *self)
{
    return s_conn_ok(self->conn) && kh_db_notified(self->conn);
}

/* Run a prepared statement (or, for S_STATEMENTS, the plain sql) with
 * parameters as PQexecParams takes them. The result when it returned rows
 * or a command status, else NULL with err. */
static PGresult *s_exec(dstore_t *self, s_stmt_t stmt, const char *sql,
                        int nparams, const char *const *params,
                        const int *lengths, const int *formats, kh_error_t *err)
{
    if (!dstore_up(self)) {
        kh_error_set(err, KH_E_UNAVAILABLE, "", "no database connection");
        return NULL;
    }
    if (self->begin_pending) {
        self->begin_pending = false;
        /* The transaction's BEGIN and its first statement in one round
         * trip (on failure it is open and failed: the caller rolls back). */
        if (stmt != S_STATEMENTS)
            return kh_db_begin_exec(
                self->conn, "BEGIN", s_statements[stmt].name, nparams, params,
                lengths, formats, s_statements[stmt].result_format, err);
        if (kh_db_exec(self->conn, "BEGIN", err))
            return NULL;
    }
    PGresult *res = stmt == S_STATEMENTS
                        ? PQexecParams(self->conn, sql, nparams, NULL, params,
                                       lengths, formats, 0)
                        : PQexecPrepared(self->conn, s_statements[stmt].name,
                                         nparams, params, lengths, formats,
                                         s_statements[stmt].result_format);
    ExecStatusType status = PQresultStatus(res);
    if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK)
        return res;
    kh_db_error(err, self->conn, res,
                stmt == S_STATEMENTS ? "query" : s_statements[stmt].name);
    PQclear(res);
    return NULL;
}

/* s_exec with text parameters but for the one at index binary (-1: none),
 * a binary array of binary_len bytes. */
static PGresult *s_run(dstore_t *self, s_stmt_t stmt, const char *sql,
                       int nparams, const char *const *params, int binary,
                       int binary_len, kh_error_t *err)
{
    int lengths[S_PARAMS_MAX] = {0}, formats[S_PARAMS_MAX] = {0};
    if (binary >= 0 && binary < S_PARAMS_MAX) {
        lengths[binary] = binary_len;
        formats[binary] = 1;
    }
    return s_exec(self, stmt, sql, nparams, params, lengths, formats, err);
}

zhashx_t *dstore_partners(dstore_t *self, int64_t *ends_in_ms, kh_error_t *err)
{
    /* In a transaction of its own that waits S_REGISTRY_LOCK_TIMEOUT for
     * a lock, not the session's 5 s: the service's loop waits with it, and
     * a registry locked by an administrator's DDL must not keep partners'
     * frames unanswered for long (they are refused as unavailable while
     * the registry cannot be read, and the read is tried again a second
     * later: notify.c, s_registry_check). Never inside a round's
     * transaction, which dstore_begin leaves pending. */
    if (self->begin_pending) {
        kh_error_set(err, KH_E_INTERNAL, "", "registry read in a transaction");
        return NULL;
    }
    if (!dstore_up(self)) {
        kh_error_set(err, KH_E_UNAVAILABLE, "", "no database connection");
        return NULL;
    }
    if (kh_db_exec(self->conn,
                   "BEGIN; SET LOCAL lock_timeout = " S_REGISTRY_LOCK_TIMEOUT,
                   err))
        return NULL;
    PGresult *res =
        s_run(self, S_STATEMENTS, KH_PARTNER_KEYS_SQL, 0, NULL, -1, 0, err);
    if (!res || kh_db_exec(self->conn, "COMMIT", err)) {
        PQclear(res);
        kh_db_rollback_quietly(self->conn);
        return NULL;
    }
    zhashx_t *partners = zhashx_new();
    if (!partners) {
        PQclear(res);
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    zhashx_set_duplicator(partners, (zhashx_duplicator_fn *) strdup);
    zhashx_set_destructor(partners, (zhashx_destructor_fn *) zstr_free);
    for (int i = 0; i < PQntuples(res); i++)
        zhashx_insert(partners, PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
    *ends_in_ms = PQntuples(res) && !PQgetisnull(res, 0, 2)
                      ? strtoll(PQgetvalue(res, 0, 2), NULL, 10)
                      : -1;
    PQclear(res);
    return partners;
}

/* ids (uuids the hub sent) as a binary array in self->ids[which]: its
 * bytes and their count in *len; NULL with err when memory ran out. */
static const char *s_ids(dstore_t *self, int which, const char *const *ids,
                         size_t count, int *len, kh_error_t *err)
{
    kh_pgarray_t *array = &self->ids[which];
    kh_pgarray_reset(array, KH_PG_UUID);
    for (size_t i = 0; i < count; i++)
        kh_pgarray_add_uuid(array, ids[i]);
    const char *data = kh_pgarray_data(array, len);
    if (!data)
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    return data;
}

/* Column c of row i, or NULL when it is NULL. */
static const char *s_value_or_null(const PGresult *res, int i, int c)
{
    return PQgetisnull(res, i, c) ? NULL : PQgetvalue(res, i, c);
}

/* Row i of a claim's result, its columns (S_SENT_COLUMNS) from first on:
 * id, referral id, priority, attempts, routed at, payload, payload hash,
 * overdue partner and since, sent at. */
static dstore_delivery_t s_claimed(const PGresult *res, int i, int first)
{
    return (dstore_delivery_t){
        .id = PQgetvalue(res, i, first),
        .referral_id = PQgetvalue(res, i, first + 1),
        .priority = PQgetvalue(res, i, first + 2),
        .attempt = atoi(PQgetvalue(res, i, first + 3)),
        .routed_at = PQgetvalue(res, i, first + 4),
        .payload = PQgetvalue(res, i, first + 5),
        .payload_len = (size_t) PQgetlength(res, i, first + 5),
        .payload_sha256 = PQgetvalue(res, i, first + 6),
        .overdue_partner = s_value_or_null(res, i, first + 7),
        .overdue_since = s_value_or_null(res, i, first + 8),
        .sent_at = PQgetvalue(res, i, first + 9),
    };
}

int dstore_resend(dstore_t *self, const char *partner, const char *key,
                  const char *peer, size_t credit, bool reclaim,
                  const char *const *keep, size_t nkeep, const char *const *out,
                  size_t nout, dstore_delivery_fn *fn, void *arg,
                  bool *admitted, kh_error_t *err)
{
    *admitted = true;
    int lengths[10] = {0};
    static const int formats[10] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
    const char *skeep = s_ids(self, 0, keep, nkeep, &lengths[7], err);
    const char *sout =
        skeep ? s_ids(self, 1, out, nout, &lengths[8], err) : NULL;
    if (!sout)
        return -1;
    char scredit[24], stimeout[24], smax[24], sattempts[24];
    snprintf(scredit, sizeof scredit, "%zu", credit);
    snprintf(stimeout, sizeof stimeout, "%d", self->policy.ack_timeout_ms);
    snprintf(smax, sizeof smax, "%d", self->policy.backoff_max_ms);
    snprintf(sattempts, sizeof sattempts, "%d", self->policy.max_attempts);
    const char *params[] = {partner,  scredit, reclaim ? "t" : "f",
                            stimeout, smax,    sattempts,
                            peer,     skeep,   sout,
                            key};
    PGresult *res =
        s_exec(self, S_RESEND, NULL, 10, params, lengths, formats, err);
    if (!res)
        return -1;
    int claimed = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        if (PQgetisnull(res, i, 0)) { /* its key does not admit it */
            *admitted = false;
            continue;
        }
        dstore_delivery_t d = s_claimed(res, i, 0);
        fn(&d, arg);
        claimed++;
    }
    PQclear(res);
    return claimed;
}

int dstore_claim_pending(dstore_t *self, dstore_claim_t *claims, size_t count,
                         dstore_claimed_fn *fn, void *arg, kh_error_t *err)
{
    kh_pgarray_t *array = self->claims;
    for (int k = 0; k < 4; k++)
        kh_pgarray_reset(&array[k], KH_PG_TEXT);
    for (size_t i = 0; i < count; i++) {
        char limit[24];
        snprintf(limit, sizeof limit, "%zu", claims[i].limit);
        claims[i].admitted = true;
        kh_pgarray_add_str(&array[0], claims[i].partner);
        kh_pgarray_add_str(&array[1], limit);
        kh_pgarray_add_str(&array[2], claims[i].peer);
        kh_pgarray_add_str(&array[3], claims[i].key);
    }
    char stimeout[24], smax[24];
    snprintf(stimeout, sizeof stimeout, "%d", self->policy.ack_timeout_ms);
    snprintf(smax, sizeof smax, "%d", self->policy.backoff_max_ms);
    const char *params[6] = {NULL, NULL, NULL, stimeout, smax, NULL};
    int lengths[6] = {0};
    static const int formats[6] = {1, 1, 1, 0, 0, 1};
    for (int k = 0; k < 4; k++) {
        int at = k < 3 ? k : 5; /* $1-$3, $6 */
        if (!(params[at] = kh_pgarray_data(&array[k], &lengths[at])))
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    }
    PGresult *res =
        s_exec(self, S_CLAIM_PENDING, NULL, 6, params, lengths, formats, err);
    if (!res)
        return -1;
    int claimed = 0;
    for (int i = 0; i < PQntuples(res); i++) {
        long which = strtol(PQgetvalue(res, i, 0), NULL, 10) - 1;
        if (which < 0 || (size_t) which >= count)
            continue;
        if (PQgetisnull(res, i, 1)) { /* its key does not admit it */
            claims[which].admitted = false;
            continue;
        }
        dstore_delivery_t d = s_claimed(res, i, 1);
        fn((size_t) which, &d, arg);
        claimed++;
    }
    PQclear(res);
    return claimed;
}

static dstore_outcome_t s_outcome(const char *text)
{
    if (strcmp(text, "done") == 0 || strcmp(text, "delivered") == 0)
        return DSTORE_DONE;
    if (strcmp(text, "duplicate") == 0)
        return DSTORE_DUPLICATE;
    if (strcmp(text, "dead") == 0)
        return DSTORE_DEAD;
    if (strcmp(text, "unchanged") == 0)
        return DSTORE_UNCHANGED;
    if (strcmp(text, "not_admitted") == 0)
        return DSTORE_NOT_ADMITTED;
    return DSTORE_NOT_FOUND;
}

int dstore_ack_send(dstore_t *self, dstore_answer_t *acks, size_t count,
                    kh_error_t *err)
{
    if (self->acks)
        return kh_error_set(err, KH_E_INTERNAL, "", "an ack batch is out");
    if (!dstore_up(self))
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "no database connection");
    kh_pgarray_t *array = self->arrays;
    kh_pgarray_reset(&array[0], KH_PG_UUID);
    kh_pgarray_reset(&array[1], KH_PG_TEXT);
    kh_pgarray_reset(&array[2], KH_PG_TEXT);
    kh_pgarray_reset(&array[3], KH_PG_TEXT);
    for (size_t i = 0; i < count; i++) {
        kh_pgarray_add_uuid(&array[0], acks[i].id);
        kh_pgarray_add_str(&array[1], acks[i].partner);
        kh_pgarray_add_str(&array[2], acks[i].peer);
        kh_pgarray_add_str(&array[3], acks[i].key);
    }
    const char *params[4];
    int lengths[4];
    static const int formats[4] = {1, 1, 1, 1};
    for (int k = 0; k < 4; k++)
        if (!(params[k] = kh_pgarray_data(&array[k], &lengths[k])))
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    if (!PQsendQueryPrepared(self->ack_conn, s_statements[S_ACK].name, 4,
                             params, lengths, formats, 0))
        return kh_db_error(err, self->ack_conn, NULL, "ack");
    self->acks = acks;
    self->nacks = count;
    return 0;
}

int dstore_ack_wait(dstore_t *self, kh_error_t *err)
{
    if (!self->acks)
        return kh_error_set(err, KH_E_INTERNAL, "", "no ack batch is out");
    int rc = -1;
    bool first = true;
    PGresult *res;
    /* Every result is read, so that the connection is free again. The
     * batch commits after its rows came (an implicit transaction ends at
     * the Sync): an error after them, at commit, undoes all of it. */
    while ((res = PQgetResult(self->ack_conn)) != NULL) {
        if (first && PQresultStatus(res) == PGRES_TUPLES_OK &&
            (size_t) PQntuples(res) == self->nacks) {
            for (size_t i = 0; i < self->nacks; i++) {
                self->acks[i].outcome = s_outcome(PQgetvalue(res, (int) i, 0));
                self->acks[i].wait_s =
                    PQgetisnull(res, (int) i, 1)
                        ? -1
                        : strtod(PQgetvalue(res, (int) i, 1), NULL);
            }
            rc = 0;
        } else if (rc == 0 || first) {
            kh_db_error(err, self->ack_conn, res, "ack");
            rc = -1;
        }
        first = false;
        PQclear(res);
    }
    if (first) /* no result at all: the connection is gone */
        kh_db_error(err, self->ack_conn, NULL, "ack");
    if (rc && kh_db_session_ended(err->sqlstate)) {
        /* of no more use: the next tick connects again */
        PQfinish(self->ack_conn);
        self->ack_conn = NULL;
    }
    self->acks = NULL;
    self->nacks = 0;
    return rc;
}

int dstore_nack(dstore_t *self, dstore_answer_t *nack, bool permanent,
                kh_error_t *err)
{
    char sattempts[24], stimeout[24], smax[24];
    snprintf(sattempts, sizeof sattempts, "%d", self->policy.max_attempts);
    snprintf(stimeout, sizeof stimeout, "%d", self->policy.ack_timeout_ms);
    snprintf(smax, sizeof smax, "%d", self->policy.backoff_max_ms);
    const char *params[] = {
        nack->id,  nack->partner, nack->peer, permanent ? "t" : "f",
        sattempts, stimeout,      smax,       nack->key};
    PGresult *res = s_run(self, S_NACK, NULL, 8, params, -1, 0, err);
    if (!res)
        return -1;
    nack->outcome = s_outcome(PQntuples(res) ? PQgetvalue(res, 0, 0) : "");
    snprintf(nack->referral, sizeof nack->referral, "%s",
             PQntuples(res) && PQnfields(res) > 1 ? PQgetvalue(res, 0, 1) : "");
    PQclear(res);
    return 0;
}

int dstore_due_now(dstore_t *self, const char *partner, const char *const *ids,
                   size_t count, kh_error_t *err)
{
    if (count == 0)
        return 0;
    int ids_len = 0;
    const char *sids = s_ids(self, 0, ids, count, &ids_len, err);
    if (!sids)
        return -1;
    char sattempts[24];
    snprintf(sattempts, sizeof sattempts, "%d", self->policy.max_attempts);
    const char *params[] = {sids, partner, sattempts};
    PGresult *res = s_run(self, S_DUE, NULL, 3, params, 0, ids_len, err);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    return rows;
}

int dstore_unsent(dstore_t *self, const char *const *ids,
                  const char *const *sent_at, size_t count, kh_error_t *err)
{
    if (count == 0)
        return 0;
    int lengths[2] = {0};
    static const int formats[2] = {1, 1};
    const char *sids = s_ids(self, 0, ids, count, &lengths[0], err);
    if (!sids)
        return -1;
    kh_pgarray_t *array = &self->ids[1];
    kh_pgarray_reset(array, KH_PG_TEXT);
    for (size_t i = 0; i < count; i++)
        kh_pgarray_add_str(array, sent_at[i]);
    const char *params[] = {sids, kh_pgarray_data(array, &lengths[1])};
    if (!params[1])
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    PGresult *res =
        s_exec(self, S_UNSENT, NULL, 2, params, lengths, formats, err);
    if (!res)
        return -1;
    int rows = atoi(PQcmdTuples(res));
    PQclear(res);
    return rows;
}

int dstore_audit_refused(dstore_t *self, const char *key, const char *peer,
                         const char *reason, kh_error_t *err)
{
    char actor[64];
    snprintf(actor, sizeof actor, "key:%s", *key ? key : "none");
    const char *params[] = {actor, peer, reason};
    PGresult *res =
        s_run(self, S_STATEMENTS, s_refused_sql, 3, params, -1, 0, err);
    PQclear(res);
    return res ? 0 : -1;
}

int dstore_sweep(dstore_t *self, dstore_event_fn *fn, void *arg,
                 kh_error_t *err)
{
    char sattempts[24], sage[24], sesc[24];
    snprintf(sattempts, sizeof sattempts, "%d", self->policy.max_attempts);
    snprintf(sage, sizeof sage, "%d", self->policy.max_age_s);
    snprintf(sesc, sizeof sesc, "%d", self->policy.escalate_ms);
    const char *dead_params[] = {sattempts, sage};
    PGresult *res = s_run(self, S_DEAD, NULL, 2, dead_params, -1, 0, err);
    if (!res)
        return -1;
    int changes = PQntuples(res);
    for (int i = 0; i < PQntuples(res); i++) {
        dstore_event_t event = {.kind = "dead",
                                .delivery_id = PQgetvalue(res, i, 0),
                                .referral_id = PQgetvalue(res, i, 1),
                                .partner = PQgetvalue(res, i, 2),
                                .reason = PQgetvalue(res, i, 3)};
        fn(&event, arg);
    }
    PQclear(res);
    const char *esc_params[] = {sesc};
    res = s_run(self, S_ESCALATE, NULL, 1, esc_params, -1, 0, err);
    if (!res)
        return -1;
    changes += PQntuples(res);
    for (int i = 0; i < PQntuples(res); i++) {
        dstore_event_t event = {.kind = "escalated",
                                .delivery_id = PQgetvalue(res, i, 0),
                                .referral_id = PQgetvalue(res, i, 1),
                                .partner = PQgetvalue(res, i, 2),
                                .escalate_to = s_value_or_null(res, i, 3),
                                .copy = PQgetvalue(res, i, 4),
                                .reason = s_value_or_null(res, i, 5)};
        fn(&event, arg);
    }
    PQclear(res);
    return changes;
}
