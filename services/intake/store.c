/*
 * intake's PostgreSQL side (see store.h).
 *
 * A batch is committed by one statement: PostgreSQL runs a single statement
 * in its own transaction, so the referral rows and their audit events land
 * together or not at all, with one round trip and one commit for the whole
 * batch (group commit). The batch travels as one jsonb parameter.
 */
#include "store.h"

#include <libpq-fe.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/log.h"

struct _store_t {
    char *conninfo;
    PGconn *conn;
};

#define S_TS_FORMAT "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'"

/* $1: submissions, $2: refusals. Rows out: input index, inserted?, id,
 * stored payload hash (only when not inserted), accepted_at. The final
 * SELECT runs on the statement's snapshot, so it finds an earlier row for
 * the same key but not the rows this statement inserts. */
static const char *s_commit_sql =
    "WITH input AS ("
    "  SELECT * FROM jsonb_to_recordset($1::jsonb) AS t(i int, id uuid,"
    "    partner_id text, idem text, version text, payload jsonb,"
    "    hash text, peer text)"
    "), ins AS ("
    "  INSERT INTO referrals (id, partner_id, idempotency_key,"
    "    schema_version, payload, payload_hash)"
    "  SELECT id, partner_id, idem, version, payload, decode(hash, 'hex')"
    "  FROM input ORDER BY i"
    "  ON CONFLICT (partner_id, idempotency_key) DO NOTHING"
    "  RETURNING id, accepted_at"
    "), accepted AS ("
    "  INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "    outcome, payload_hash, origin_service, origin_peer)"
    "  SELECT 'partner', input.partner_id, 'referral.accepted', ins.id, 'ok',"
    "    decode(input.hash, 'hex'), 'intake', input.peer"
    "  FROM ins JOIN input USING (id) ORDER BY input.i"
    "), refused AS ("
    "  INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    "    reason_code, reason_path, origin_service, origin_peer)"
    "  SELECT 'partner', actor_id, action, 'refused', code, path, 'intake',"
    "    peer"
    "  FROM jsonb_to_recordset($2::jsonb) AS t(i int, action text,"
    "    actor_id text, code text, path text, peer text) ORDER BY i"
    ")"
    " SELECT input.i, ins.id IS NOT NULL, coalesce(ins.id, r.id),"
    "   encode(r.payload_hash, 'hex'),"
    "   to_char(coalesce(ins.accepted_at, r.accepted_at) AT TIME ZONE 'UTC',"
    "   " S_TS_FORMAT ")"
    " FROM input LEFT JOIN ins USING (id)"
    /* LATERAL: one index probe per resubmitted key, never a table scan. */
    " LEFT JOIN LATERAL (SELECT id, payload_hash, accepted_at"
    "   FROM referrals WHERE ins.id IS NULL"
    "   AND partner_id = input.partner_id"
    "   AND idempotency_key = input.idem) r ON true";

/* For a key that another intake process committed while our statement
 * waited on it: a new statement sees that commit. */
static const char *s_lookup_sql =
    "SELECT id, encode(payload_hash, 'hex'), to_char(accepted_at AT TIME "
    "ZONE 'UTC', " S_TS_FORMAT ") FROM referrals"
    " WHERE partner_id = $1 AND idempotency_key = $2";

static const char *s_status_sql =
    "SELECT state, to_char(accepted_at AT TIME ZONE 'UTC', " S_TS_FORMAT ")"
    " FROM referrals WHERE id = $1::uuid AND partner_id = $2";

static const char *s_partners_sql =
    "SELECT curve_public_key, id FROM partners WHERE revoked_at IS NULL";

store_t *store_new(const char *conninfo)
{
    store_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
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
    if (self->conn)
        PQfinish(self->conn);
    free(self->conninfo);
    free(self);
    *self_p = NULL;
}

bool store_up(store_t *self)
{
    return self->conn && PQstatus(self->conn) == CONNECTION_OK;
}

/* Turn a failed result into err. Connection-level failures and the
 * SQLSTATEs that mean "try again" become KH_E_UNAVAILABLE. */
static int s_fail(store_t *self, PGresult *res, const char *what,
                  kh_error_t *err)
{
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary =
        res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    bool retry = !store_up(self) || !state || strncmp(state, "08", 2) == 0 ||
                 strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0 ||
                 strncmp(state, "57P", 3) == 0 || strcmp(state, "53300") == 0;
    kh_log_warn("db_error", "op=%s sqlstate=%s retryable=%d msg=\"%s\"", what,
                state ? state : "none", retry,
                primary ? primary : "connection lost");
    if (res)
        PQclear(res);
    if (retry)
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "the hub's database is unavailable; nothing was "
                            "stored, retry with the same idempotency key");
    return kh_error_set(err, KH_E_INTERNAL, "",
                        "the hub could not store the request; nothing was "
                        "stored, retry with the same idempotency key");
}

int store_connect(store_t *self, kh_error_t *err)
{
    if (self->conn)
        PQfinish(self->conn);
    self->conn = PQconnectdb(self->conninfo);
    if (PQstatus(self->conn) != CONNECTION_OK) {
        kh_log_warn("db_connect_failed", "msg=\"%s\"",
                    strtok(PQerrorMessage(self->conn), "\n"));
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "the hub's database is unavailable");
    }
    static const struct {
        const char *name, *sql;
        int nparams;
    } statements[] = {{"commit", NULL, 2},
                      {"lookup", NULL, 2},
                      {"status", NULL, 2},
                      {"partners", NULL, 0}};
    const char *sql[] = {s_commit_sql, s_lookup_sql, s_status_sql,
                         s_partners_sql};
    for (size_t i = 0; i < sizeof statements / sizeof statements[0]; i++) {
        PGresult *res = PQprepare(self->conn, statements[i].name, sql[i],
                                  statements[i].nparams, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            return s_fail(self, res, "prepare", err);
        PQclear(res);
    }
    return 0;
}

static PGresult *s_exec(store_t *self, const char *name, int nparams,
                        const char *const *params)
{
    return PQexecPrepared(self->conn, name, nparams, params, NULL, NULL, 0);
}

/* Build the $1 and $2 parameters. NULL on allocation failure. */
static char *s_submissions_json(const store_submit_t *subs, size_t nsubs)
{
    json_t *rows = json_array();
    for (size_t i = 0; rows && i < nsubs; i++) {
        json_t *row =
            json_pack("{s:I, s:s, s:s, s:s, s:s, s:O, s:s, s:s?}", "i",
                      (json_int_t) i, "id", subs[i].referral_id, "partner_id",
                      subs[i].partner_id, "idem", subs[i].idem_key, "version",
                      json_string_value(
                          json_object_get(subs[i].referral, "schema_version")),
                      "payload", subs[i].referral, "hash", subs[i].hash, "peer",
                      subs[i].peer);
        if (!row || json_array_append_new(rows, row)) {
            json_decref(rows);
            return NULL;
        }
    }
    char *text = rows ? json_dumps(rows, JSON_COMPACT) : NULL;
    json_decref(rows);
    return text;
}

static char *s_refusals_json(const store_refusal_t *refs, size_t nrefs)
{
    json_t *rows = json_array();
    for (size_t i = 0; rows && i < nrefs; i++) {
        json_t *row = json_pack(
            "{s:I, s:s, s:s, s:s, s:s, s:s?}", "i", (json_int_t) i, "action",
            refs[i].action, "actor_id", refs[i].actor_id, "code", refs[i].code,
            "path", refs[i].path, "peer", refs[i].peer);
        if (!row || json_array_append_new(rows, row)) {
            json_decref(rows);
            return NULL;
        }
    }
    char *text = rows ? json_dumps(rows, JSON_COMPACT) : NULL;
    json_decref(rows);
    return text;
}

/* Fill sub's outputs from an existing row (id, hash, accepted_at). */
static void s_answer_existing(store_submit_t *sub, const char *id,
                              const char *hash, const char *accepted_at)
{
    if (strcmp(hash, sub->hash) == 0) {
        sub->duplicate = true;
        snprintf(sub->referral_id, sizeof sub->referral_id, "%s", id);
        snprintf(sub->accepted_at, sizeof sub->accepted_at, "%s", accepted_at);
    } else
        sub->conflict = true;
}

/* A key that was neither inserted by us nor visible to our statement was
 * committed concurrently by another intake process: read it anew. */
static int s_lookup(store_t *self, store_submit_t *sub, kh_error_t *err)
{
    const char *params[] = {sub->partner_id, sub->idem_key};
    PGresult *res = s_exec(self, "lookup", 2, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail(self, res, "lookup", err);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, KH_E_INTERNAL, "",
                            "the idempotency key vanished; retry");
    }
    s_answer_existing(sub, PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1),
                      PQgetvalue(res, 0, 2));
    PQclear(res);
    return 0;
}

int store_commit(store_t *self, store_submit_t *subs, size_t nsubs,
                 const store_refusal_t *refs, size_t nrefs, kh_error_t *err)
{
    if (!store_up(self))
        return s_fail(self, NULL, "commit", err);
    char *p1 = s_submissions_json(subs, nsubs);
    char *p2 = s_refusals_json(refs, nrefs);
    if (!p1 || !p2) {
        free(p1);
        free(p2);
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    }
    const char *params[] = {p1, p2};
    PGresult *res = s_exec(self, "commit", 2, params);
    free(p1);
    free(p2);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail(self, res, "commit", err);

    int rows = PQntuples(res);
    int rc = 0;
    for (int row = 0; row < rows && rc == 0; row++) {
        long i = strtol(PQgetvalue(res, row, 0), NULL, 10);
        if (i < 0 || (size_t) i >= nsubs)
            continue;
        store_submit_t *sub = &subs[i];
        bool inserted = PQgetvalue(res, row, 1)[0] == 't';
        if (inserted)
            snprintf(sub->accepted_at, sizeof sub->accepted_at, "%s",
                     PQgetvalue(res, row, 4));
        else if (PQgetisnull(res, row, 2))
            rc = s_lookup(self, sub, err);
        else
            s_answer_existing(sub, PQgetvalue(res, row, 2),
                              PQgetvalue(res, row, 3), PQgetvalue(res, row, 4));
    }
    PQclear(res);
    return rc;
}

int store_status(store_t *self, const char *partner_id, const char *referral_id,
                 json_t *reply, kh_error_t *err)
{
    if (!store_up(self))
        return s_fail(self, NULL, "status", err);
    const char *params[] = {referral_id, partner_id};
    PGresult *res = s_exec(self, "status", 2, params);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return s_fail(self, res, "status", err);
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, KH_E_NOT_FOUND, "referral_id",
                            "no referral with this id was submitted by you");
    }
    json_object_set_new(reply, "referral_id", json_string(referral_id));
    json_object_set_new(reply, "state", json_string(PQgetvalue(res, 0, 0)));
    json_object_set_new(reply, "accepted_at",
                        json_string(PQgetvalue(res, 0, 1)));
    json_object_set_new(reply, "deliveries", json_array());
    PQclear(res);
    return 0;
}

static void s_free_string(void **item)
{
    free(*item);
    *item = NULL;
}

zhashx_t *store_partners(store_t *self, kh_error_t *err)
{
    if (!store_up(self)) {
        s_fail(self, NULL, "partners", err);
        return NULL;
    }
    PGresult *res = s_exec(self, "partners", 0, NULL);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        s_fail(self, res, "partners", err);
        return NULL;
    }
    zhashx_t *partners = zhashx_new();
    zhashx_set_destructor(partners, s_free_string);
    for (int row = 0; row < PQntuples(res); row++) {
        char *id = strdup(PQgetvalue(res, row, 1));
        if (id)
            zhashx_insert(partners, PQgetvalue(res, row, 0), id);
    }
    PQclear(res);
    return partners;
}
