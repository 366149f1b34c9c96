/*
 * The routing service's core (see routing.h).
 *
 * Database calls are synchronous but bounded: every connection runs with a
 * statement_timeout and a lock_timeout, so a stalled database ends a pass
 * with an error (the transaction rolls back, the referrals stay accepted)
 * instead of stopping the loop for good.
 */
#include "routing.h"

#include <czmq.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/jarena.h"
#include "ketenhub/log.h"
#include "ketenhub/partner.h"
#include "ketenhub/pgarray.h"
#include "ketenhub/proto.h"
#include "ketenhub/rules.h"
#include "ketenhub/service.h"
#include "ketenhub/throttle.h"
#include "ketenhub/zap.h"
#include "routing_sql.h"

#define S_STATS_MS 60000
#define S_AUTH_LOG_MS 10000        /* one auth_refused line in this time */
#define S_WAKEUP_MAX (1024 * 1024) /* bytes of a wake-up message */
#define S_MATCHED_MAX 4096         /* bytes of audit_events.rules_matched */
#define S_ARENA_KEEP (256 * 1024)
/* A referral whose writes fail on its own (a constraint, a limit) is held
 * back from the claims of every routing process for the configured hold
 * (referrals.held_until), while the others are routed; then tried again.
 * One that fails again is held again, and counted once. S_HELD_IN_A_ROW
 * different ones held with no pass routed between them may say the
 * failure is the database's (a constraint added by hand, say), not each
 * referral's: for one hold they stay held, and passes are tried whole,
 * with no more held; when a whole pass fails without them and a later
 * one routes, they go free. */
#define S_HELD_IN_A_ROW 8
/* s_pass: it failed, and the next one is to come at once (isolating). */
#define S_PASS_AGAIN (-2)

struct _routing_t {
    routing_config_t config;
    PGconn *conn;
    kh_db_connecting_t *connecting; /* an attempt to connect under way */
    bool connect_poll;              /* a timer looks at it soon */
    int retry_ms;          /* the wait after the last failed attempt, or 0 */
    int64_t connect_after; /* zclock_mono before which no pass tries */
    kh_rules_t *rules;
    kh_rules_result_t *result;
    /* What the trail records with each decision: the rules version, and
     * the schema and partners they route with (kh_rules_decision_version). */
    char version[KH_RULES_DECISION_VERSION_MAX + 1];
    kh_jarena_t *arena; /* the referral being routed and its projections */
    kh_zap_t *zap;
    zcert_t *cert;
    zsock_t *pull;
    zsock_t *notify;      /* wake-ups for notification, or NULL */
    zhashx_t *targets;    /* partners with new deliveries in this pass */
    zlistx_t *unroutable; /* "referral=ID reason=R" of the pass, alerted
                             once it commits */
    /* The pass's writes as binary array parameters: deliveries, routed and
     * unroutable referrals (columns as the statements take them). */
    kh_pgarray_t deliveries_cols[S_DELIVERY_COLUMNS];
    kh_pgarray_t routed_cols[S_ROUTED_COLUMNS];
    kh_pgarray_t unroutable_cols[S_UNROUTABLE_COLUMNS];
    zloop_t *loop;
    int signal_fd;
    bool stopping;
    bool reload_again;     /* a SIGHUP the database was away for: retried */
    bool start_recorded;   /* the trail has the version it started with */
    int64_t partners_read; /* zclock_mono of the last read of the registry */
    bool registry_unheard; /* connected since: changes may have gone by */
    /* After a pass that failed on its data: passes of one referral left,
     * to find which fails; the one found, to hold at the start of the
     * next pass (once the failed one is rolled back), and why it failed.
     * The streak: those newly held with no pass routed since; until
     * whole_until (zclock_mono) passes are tried whole, and whole_failed
     * says one of them failed. */
    size_t isolate;
    char to_hold[37];
    kh_error_t hold_why;
    char streak_ids[S_HELD_IN_A_ROW][37];
    size_t streak;
    int64_t whole_until;
    bool whole_failed;
    char missing[640];       /* partners the rules need and the registry
                                lacks, as last told ("a,b"; "": none) */
    kh_tally_t auth_refused; /* refused handshakes, one line a while */
    /* A pass whose COMMIT's answer was lost with the connection: its
     * transaction's id ("": none), the referrals it routed, the
     * deliveries it made and its alerts. s_settle tells them once
     * txid_status on a later connection says it committed. */
    char unsure_xid[24];
    int unsure_routed;
    size_t unsure_made;
    zlistx_t *unsure_alerts;
    /* A reload event (s_audit_reload) whose COMMIT's answer was lost: its
     * transaction's id ("": none) and what it recorded, so that the same
     * event, written again, is not written twice. */
    char reload_xid[24];
    char reload_event[1024];
    /* Counters for the stats line. */
    size_t routed, deliveries, passes, failures, wakeups, malformed;
};

/* The element types of the pass's arrays, column by column as the
 * statements in routing_sql.h take them. */
static const unsigned s_delivery_types[S_DELIVERY_COLUMNS] = {
    KH_PG_UUID,  KH_PG_UUID, KH_PG_TEXT,  KH_PG_TEXT, KH_PG_BYTEA,
    KH_PG_BYTEA, KH_PG_TEXT, KH_PG_BYTEA, KH_PG_BYTEA};
static const unsigned s_routed_types[S_ROUTED_COLUMNS] = {
    KH_PG_UUID, KH_PG_TEXT, KH_PG_TEXT, KH_PG_TEXT};
static const unsigned s_unroutable_types[S_UNROUTABLE_COLUMNS] = {
    KH_PG_UUID, KH_PG_TEXT, KH_PG_TEXT};

/* Run one of s_statements (lengths and formats NULL: text parameters);
 * 0 or -1 with err. */
static int s_exec(PGconn *conn, int stmt, const char *const *params,
                  const int *lengths, const int *formats, kh_error_t *err)
{
    const char *name = s_statements[stmt].name;
    int nparams = s_statements[stmt].nparams;
    /* In a pipeline the statement is only sent; kh_db_pipeline_end reads
     * the outcomes of all of them. */
    if (PQpipelineStatus(conn) != PQ_PIPELINE_OFF)
        return PQsendQueryPrepared(conn, name, nparams, params, lengths,
                                   formats, 0)
                   ? 0
                   : kh_db_error(err, conn, NULL, "cannot send a statement");
    PGresult *res =
        PQexecPrepared(conn, name, nparams, params, lengths, formats, 0);
    ExecStatusType status = PQresultStatus(res);
    int rc = 0;
    if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK)
        rc = kh_db_error(err, conn, res, NULL);
    PQclear(res);
    return rc;
}

/* Connect (again) when there is no working connection, on a thread of its
 * own: -1 with err while the attempt runs (self->connecting set). */
static int s_connect(routing_t *self, kh_error_t *err)
{
    if (self->conn && PQstatus(self->conn) == CONNECTION_OK)
        return 0;
    PQfinish(self->conn);
    self->conn = kh_db_connect_async(&self->connecting, self->config.conninfo,
                                     "ketenhub-routing", err);
    if (!self->conn)
        return -1;
    /* The statements' plans do not depend on their parameters, and find
     * their rows through an index however large the tables are (a plan
     * cached while they were small must not scan them whole later). */
    int rc = kh_db_exec(self->conn,
                        "SET statement_timeout = '30s'; SET lock_timeout ="
                        " '10s'; SET idle_in_transaction_session_timeout ="
                        " '60s'; SET plan_cache_mode = force_generic_plan;"
                        " SET enable_seqscan = off; LISTEN " KH_PARTNER_CHANNEL,
                        err);
    for (int i = 0; rc == 0 && i < S_STATEMENTS; i++) {
        PGresult *res =
            PQprepare(self->conn, s_statements[i].name, s_statements[i].sql,
                      s_statements[i].nparams, NULL);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            rc = kh_db_error(err, self->conn, res, "cannot prepare statements");
        PQclear(res);
    }
    if (rc) {
        PQfinish(self->conn);
        self->conn = NULL;
    } else {
        kh_log_info("db_connected", NULL); /* the outage, if any, is over */
        /* What the registry told while no connection listened is lost:
         * it is read again at the next chance. */
        self->registry_unheard = true;
    }
    return rc;
}

/* A growing list of the registered partners, revoked ones too (a
 * fallback none of whose partners is left sends to those), for the rules. */
typedef struct {
    kh_rules_partner_t *items;
    size_t count, cap;
    size_t active; /* of count, those not revoked */
    bool oom;
} s_partners_t;

static void s_partner_add(const kh_partner_t *partner, void *arg)
{
    s_partners_t *list = arg;
    if (list->oom)
        return;
    if (list->count == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 16;
        kh_rules_partner_t *items = realloc(list->items, cap * sizeof *items);
        if (!items) {
            list->oom = true;
            return;
        }
        list->items = items;
        list->cap = cap;
    }
    char *id = strdup(partner->id);
    if (!id) {
        list->oom = true;
        return;
    }
    list->items[list->count].id = id;
    list->items[list->count].handles_cases = partner->handles_cases;
    list->items[list->count].revoked = partner->revoked;
    list->count++;
    list->active += !partner->revoked;
}

static void s_partners_free(s_partners_t *list)
{
    for (size_t i = 0; i < list->count; i++)
        free((char *) list->items[i].id);
    free(list->items);
}

/* Every problem the rules loader finds goes to the log with its place. */
static void s_report(const kh_error_t *err, bool is_error, void *arg)
{
    (void) arg;
    kh_log(is_error ? KH_LOG_ERROR : KH_LOG_INFO, "rules_problem",
           "code=%s path=%s line=%d column=%d msg=\"%s\"",
           kh_error_name(err->code), err->path[0] ? err->path : "none",
           err->line, err->column, KH_LOG_Q(err->message));
}

/* The registered partners, revoked ones too, into list (s_partners_free it,
 * also on failure). 0, or -1 with err. */
static int s_list_partners(routing_t *self, s_partners_t *list, kh_error_t *err)
{
    if (s_connect(self, err) ||
        kh_partner_list(self->conn, true, s_partner_add, list, err) < 0)
        return -1;
    if (list->oom)
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    self->partners_read = zclock_mono();
    return 0;
}

/* Load the rules file against the partners registered now. Returns new
 * rules, their decision version in version, or NULL with err; file_sha256
 * (65 bytes, may be NULL) gets the hex SHA-256 of the bytes read, loaded
 * or refused ("" when none were). */
static kh_rules_t *s_load_rules(routing_t *self, char *file_sha256,
                                char version[KH_RULES_DECISION_VERSION_MAX + 1],
                                kh_error_t *err)
{
    s_partners_t list = {0};
    kh_rules_t *rules = NULL;
    if (file_sha256)
        file_sha256[0] = '\0';
    if (s_list_partners(self, &list, err) == 0) {
        /* An empty registry (a fresh hub, every partner revoked) is still
         * a registry: a NULL list would load the rules unchecked, so that
         * a ketenregisseur registered afterwards could be a target. */
        static const kh_rules_partner_t none = {0};
        kh_rules_options_t opts = {
            .schema_path = self->config.schema_path,
            .partners = list.count ? list.items : &none,
            .partner_count = list.count,
            .report = s_report,
            .sha256_out = file_sha256,
        };
        rules = kh_rules_load(self->config.rules_file, &opts, err);
        if (rules &&
            kh_rules_decision_version(rules, list.items, list.count, version)) {
            kh_rules_destroy(&rules);
            kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        }
    }
    s_partners_free(&list);
    return rules;
}

/* Tell when the partners that the rules in force need (targets that are
 * not optional) and the registry lacks change: revoked since the rules
 * were loaded, their deliveries become dead letters, and a reload or a
 * restart with these rules is refused (rules.unknown_partner). Said once
 * per change, and as a gauge. */
static void s_tell_missing(routing_t *self, const s_partners_t *list)
{
    const char *ids[16];
    size_t n = kh_rules_missing_partners(self->rules, list->items, list->count,
                                         ids, sizeof ids / sizeof ids[0]);
    char missing[sizeof self->missing] = "";
    size_t len = 0;
    for (size_t i = 0;
         i < n && i < sizeof ids / sizeof ids[0] && len < sizeof missing; i++)
        len += (size_t) snprintf(missing + len, sizeof missing - len, "%s%s",
                                 i ? "," : "", ids[i]);
    if (n > sizeof ids / sizeof ids[0] && len < sizeof missing)
        snprintf(missing + len, sizeof missing - len, ",and_%zu_more",
                 n - sizeof ids / sizeof ids[0]);
    kh_metric_set("rules_partners_missing", NULL, (double) n);
    if (strcmp(missing, self->missing) == 0)
        return;
    if (n)
        kh_log_warn("rules_partners_missing",
                    "partners=%s rules_version=%s msg=\"the rules need "
                    "these partners (targets not optional, or the last a "
                    "fallback has), and they are revoked or not registered: "
                    "their deliveries become dead letters and these rules "
                    "are refused at a reload; name their successors, or "
                    "make their targets optional, and reload\"",
                    missing, self->version);
    else
        kh_log_info("rules_partners_back", "partners=%s rules_version=%s",
                    self->missing, self->version);
    snprintf(self->missing, sizeof self->missing, "%s", missing);
}

/* Whether transaction xid committed, as conn's server tells (txid_status):
 * committed, aborted, in_progress, or unknown (too old for it to know),
 * into status (24 bytes). 0, or -1 with err (status left as it was). */
static int s_txid_status(PGconn *conn, const char *xid, char *status,
                         kh_error_t *err)
{
    const char *params[] = {xid};
    PGresult *res = PQexecParams(conn,
                                 "SELECT coalesce(replace(txid_status("
                                 "$1::bigint), ' ', '_'), 'unknown')",
                                 1, NULL, params, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_TUPLES_OK
                 ? 0
                 : kh_db_error(err, conn, res, "txid_status");
    if (rc == 0)
        snprintf(status, 24, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return rc;
}

/* Write a rules.reloaded event (cause NULL) for the rules of decision
 * version version, with reason (NULL: none), or a rules.reload_failed one
 * naming cause's code and path (version is then the one kept), in its own
 * transaction. Either way its payload_hash is file_sha256, the file
 * loaded or refused ("": none, when its bytes could not be read). 0, or
 * -1 with err. */
static int s_audit_reload(routing_t *self, const char *version,
                          const char *file_sha256, const char *reason,
                          const kh_error_t *cause, kh_error_t *err)
{
    const char *params[] = {
        "rules.reloaded", "ok",
        reason,           NULL,
        version,          file_sha256[0] ? file_sha256 : NULL};
    if (cause) {
        params[0] = "rules.reload_failed";
        params[1] = "failed";
        params[2] = kh_error_name(cause->code);
        params[3] = cause->path[0] ? cause->path : NULL;
    }
    char event[sizeof self->reload_event];
    snprintf(event, sizeof event, "%s %s %s %s %s %s", params[0], params[1],
             params[2] ? params[2] : "-", params[3] ? params[3] : "-", version,
             file_sha256);
    if (s_connect(self, err))
        return -1;
    /* The same event as the one whose COMMIT's answer was lost, and that
     * one committed after all: it is in the trail once already. */
    if (*self->reload_xid) {
        char status[24];
        if (s_txid_status(self->conn, self->reload_xid, status, err))
            return -1;
        if (strcmp(status, "in_progress") == 0)
            return kh_error_set(err, KH_E_UNAVAILABLE, "",
                                "the last reload's event is still being "
                                "committed");
        bool written = strcmp(status, "committed") == 0 &&
                       strcmp(event, self->reload_event) == 0;
        kh_log_warn("reload_settled", "xid=%s status=%s written=%s",
                    self->reload_xid, status, written ? "true" : "false");
        *self->reload_xid = '\0';
        if (written)
            return 0;
    }
    PGresult *res =
        kh_db_begin_exec(self->conn, "BEGIN", s_statements[S_RELOAD].name, 6,
                         params, NULL, NULL, 0, err);
    if (!res) {
        kh_db_rollback_quietly(self->conn);
        return -1;
    }
    char xid[sizeof self->reload_xid];
    snprintf(xid, sizeof xid, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    res = PQexec(self->conn, "COMMIT");
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK
                 ? 0
                 : kh_db_error(err, self->conn, res, "reload");
    PQclear(res);
    if (rc && PQstatus(self->conn) != CONNECTION_OK) {
        /* Committed or not: txid_status tells, before the next event. */
        snprintf(self->reload_xid, sizeof self->reload_xid, "%s", xid);
        snprintf(self->reload_event, sizeof self->reload_event, "%s", event);
    } else if (rc)
        kh_db_rollback_quietly(self->conn);
    return rc;
}

/* Between two passes, when the registry changed (PostgreSQL tells as the
 * change commits), after a reconnection, and every partner_refresh_ms: the
 * optional targets of the rules in force follow the registry (a partner
 * registered or revoked since), with no SIGHUP. A registry that cannot be
 * read now is read at the next chance; the rules stay as they are
 * meanwhile. */
static void s_refresh_partners(routing_t *self)
{
    bool told = kh_db_notified(self->conn) || self->registry_unheard;
    if (!told &&
        zclock_mono() - self->partners_read < self->config.partner_refresh_ms)
        return;
    self->registry_unheard = false;
    s_partners_t list = {0};
    kh_error_t err;
    char version[sizeof self->version];
    if (s_list_partners(self, &list, &err) ||
        (kh_rules_decision_version(self->rules, list.items, list.count,
                                   version) &&
         kh_error_set(&err, KH_E_NOMEM, "", "out of memory"))) {
        self->partners_read = zclock_mono();
        kh_log_warn("partners_unread", "code=%s msg=\"%s\"",
                    kh_error_name(err.code), KH_LOG_Q(err.message));
    } else if (strcmp(version, self->version) != 0 &&
               s_audit_reload(self, version, kh_rules_version(self->rules),
                              "partners_changed", NULL, &err)) {
        /* The partners stay as they were until the trail records the
         * version they make: tried again at the next read. */
        kh_log_warn("audit_failed",
                    "action=rules.reloaded reason=partners_changed "
                    "msg=\"%s\"",
                    KH_LOG_Q(err.message));
    } else {
        size_t changed =
            kh_rules_set_partners(self->rules, list.items, list.count);
        if (strcmp(version, self->version) != 0) {
            snprintf(self->version, sizeof self->version, "%s", version);
            kh_health_note("rules", self->version);
            kh_log_info("partners_changed",
                        "targets=%zu registered=%zu rules_version=%s", changed,
                        list.active, self->version);
        }
        s_tell_missing(self, &list);
    }
    s_partners_free(&list);
}

static char s_present; /* the value of every entry of targets */

/* The canonical JSON of a projection (consumed), its length in *len and
 * its SHA-256 in hash; NULL on allocation failure. */
static char *s_canonical(json_t *projected, size_t *len, unsigned char hash[32])
{
    char *text = projected ? kh_payload_canonical(projected, len) : NULL;
    json_decref(projected);
    if (text)
        kh_sha256(text, *len, hash);
    return text;
}

/* Add the deliveries of the evaluated referral to the pass: each with its
 * target's projection and, where the rules name an escalation partner,
 * the escalation copy's own projection. */
static int s_add_deliveries(routing_t *self, const char *referral_id,
                            const json_t *referral, kh_error_t *err)
{
    const kh_rules_result_t *result = self->result;
    for (size_t i = 0; i < kh_rules_result_target_count(result); i++) {
        const char *escalate_to = kh_rules_result_escalate_to(result, i);
        unsigned char hash[32], esc_hash[32];
        size_t len = 0, esc_len = 0;
        char id[37];
        char *payload = s_canonical(
            kh_rules_result_project(result, i, referral), &len, hash);
        char *esc_payload =
            escalate_to ? s_canonical(kh_rules_result_project_escalation(
                                          result, i, referral),
                                      &esc_len, esc_hash)
                        : NULL;
        if (!payload || (escalate_to && !esc_payload)) {
            free(payload);
            free(esc_payload);
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        }
        kh_uuid_new(id);
        kh_pgarray_t *cols = self->deliveries_cols;
        kh_pgarray_add_uuid(&cols[0], id);
        kh_pgarray_add_uuid(&cols[1], referral_id);
        kh_pgarray_add_str(&cols[2], kh_rules_result_partner(result, i));
        kh_pgarray_add_str(
            &cols[3], kh_priority_name(kh_rules_result_priority(result, i)));
        kh_pgarray_add(&cols[4], payload, len);
        kh_pgarray_add(&cols[5], hash, sizeof hash);
        kh_pgarray_add_str(&cols[6], escalate_to);
        kh_pgarray_add(&cols[7], esc_payload, esc_len);
        kh_pgarray_add(&cols[8], escalate_to ? esc_hash : NULL,
                       sizeof esc_hash);
        free(payload);
        free(esc_payload);
        zhashx_insert(self->targets, kh_rules_result_partner(result, i),
                      &s_present);
    }
    return 0;
}

/* The matched rules' names, comma separated, into out. When they do not
 * all fit, the names that fit are followed by ",+N", N the number of
 * matched rules left out ('+' is in no rule's name): the trail never
 * passes a shortened list for the whole one. */
static void s_matched(const kh_rules_result_t *result, char *out, size_t size)
{
    enum { S_MORE = 24 }; /* room kept for ",+N" */
    out[0] = '\0';
    size_t used = 0, count = kh_rules_result_matched_count(result);
    for (size_t i = 0; i < count; i++) {
        const char *name = kh_rules_result_matched(result, i);
        size_t room = size - used - (i + 1 < count ? S_MORE : 0);
        int n = snprintf(out + used, room, "%s%s", i ? "," : "", name);
        if (n < 0 || (size_t) n >= room) {
            snprintf(out + used, size - used, "%s+%zu", i ? "," : "",
                     count - i);
            return;
        }
        used += (size_t) n;
    }
}

/* Route one claimed referral (payload: its stored bytes, len of them,
 * NULL once purged): add its deliveries and its audit event to the pass.
 * Returns 1 when routed, 0 when it cannot be read (set aside as
 * unroutable: a referral.routed event with outcome failed), -1 when out of
 * memory. */
static int s_route(routing_t *self, const char *id, const char *payload,
                   size_t len, const char *hash, kh_error_t *err)
{
    json_error_t jerr;
    /* What is not UTF-8 JSON (a stray byte, a NUL) is unreadable like any
     * other malformed payload. */
    json_t *referral = payload ? json_loadb(payload, len, 0, &jerr) : NULL;
    if (!json_is_object(referral)) {
        /* Set aside, audited, so that it is not claimed again and again
         * (and cannot block the referrals behind it). */
        const char *reason = payload ? "payload_unreadable" : "payload_purged";
        json_decref(referral);
        /* The alert once the pass commits: a pass that rolls back set
         * nothing aside. */
        char *alert = zsys_sprintf("referral=%s reason=%s", id, reason);
        if (!alert || !zlistx_add_end(self->unroutable, alert)) {
            zstr_free(&alert);
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        }
        kh_pgarray_add_uuid(&self->unroutable_cols[0], id);
        kh_pgarray_add_str(&self->unroutable_cols[1], reason);
        kh_pgarray_add_str(&self->unroutable_cols[2], hash);
        return 0;
    }
    kh_rules_eval(self->rules, referral, self->result);
    int rc = s_add_deliveries(self, id, referral, err);
    json_decref(referral);
    if (rc)
        return -1;
    char matched[S_MATCHED_MAX];
    s_matched(self->result, matched, sizeof matched);
    bool fallback = kh_rules_result_fallback(self->result);
    kh_pgarray_add_uuid(&self->routed_cols[0], id);
    kh_pgarray_add_str(&self->routed_cols[1],
                       kh_rules_result_fallback_reason(self->result));
    kh_pgarray_add_str(&self->routed_cols[2], hash);
    kh_pgarray_add_str(&self->routed_cols[3], matched[0] ? matched : NULL);
    size_t targets = kh_rules_result_target_count(self->result);
    self->deliveries += targets;
    kh_log_debug("referral_routed",
                 "referral=%s targets=%zu fallback=%d rules=%s", id, targets,
                 fallback, matched[0] ? matched : "none");
    return 1;
}

/* s_route, with the referral's values and its projections in the arena,
 * which forgets them once it is done. */
static int s_route_one(routing_t *self, const char *id, const char *payload,
                       size_t len, const char *hash, kh_error_t *err)
{
    kh_jarena_t *was = kh_jarena_enter(self->arena);
    int rc = s_route(self, id, payload, len, hash, err);
    kh_jarena_enter(was);
    kh_jarena_reset(self->arena);
    return rc;
}

/* Send one of the pass's array statements (when it has rows): its
 * columns' binary arrays, then the rules version when the statement takes
 * one more parameter. */
static int s_send_arrays(routing_t *self, int stmt, kh_pgarray_t *cols,
                         int ncols, kh_error_t *err)
{
    if (cols[0].count == 0)
        return 0;
    const char *params[S_DELIVERY_COLUMNS + 1];
    int lengths[S_DELIVERY_COLUMNS + 1];
    int formats[S_DELIVERY_COLUMNS + 1];
    for (int c = 0; c < ncols; c++) {
        /* Every add failed the array at once: an out-of-memory, or an id
         * that is no uuid (never from PostgreSQL or kh_uuid_new). */
        if (!(params[c] = kh_pgarray_data(&cols[c], &lengths[c])))
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        formats[c] = 1;
    }
    params[ncols] = self->version;
    lengths[ncols] = 0;
    formats[ncols] = 0;
    return s_exec(self->conn, stmt, params, lengths, formats, err);
}

/* Empty the pass's arrays (of their columns' element types). */
static void s_writes_reset(routing_t *self)
{
    for (int c = 0; c < S_DELIVERY_COLUMNS; c++)
        kh_pgarray_reset(&self->deliveries_cols[c], s_delivery_types[c]);
    for (int c = 0; c < S_ROUTED_COLUMNS; c++)
        kh_pgarray_reset(&self->routed_cols[c], s_routed_types[c]);
    for (int c = 0; c < S_UNROUTABLE_COLUMNS; c++)
        kh_pgarray_reset(&self->unroutable_cols[c], s_unroutable_types[c]);
    zlistx_purge(self->unroutable);
}

/* Tell notification which partners have new deliveries (services.md,
 * NOTIFY); a wake-up that cannot be sent at once is dropped, notification
 * finds the deliveries on its own sweep. */
static void s_notify(routing_t *self)
{
    if (!self->notify || zhashx_size(self->targets) == 0) {
        zhashx_purge(self->targets);
        return;
    }
    json_t *partners = json_array();
    for (void *item = zhashx_first(self->targets); item && partners;
         item = zhashx_next(self->targets))
        json_array_append_new(partners,
                              json_string(zhashx_cursor(self->targets)));
    zhashx_purge(self->targets);
    json_t *msg = json_pack("{s:i, s:s, s:o}", "v", KH_PROTO_VERSION, "cmd",
                            "NOTIFY", "partners", partners);
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    if (msg && kh_msgpack_encode(msg, &data, &size, &err) == 0) {
        zframe_t *frame = zframe_new(data, size);
        if (frame && zframe_send(&frame, self->notify, ZFRAME_DONTWAIT))
            zframe_destroy(&frame);
    }
    free(data);
    json_decref(msg);
}

static int s_on_timer(zloop_t *loop, int timer_id, void *arg);

/* A look at the attempt to connect, before the next timer. */
static int s_on_connect_poll(zloop_t *loop, int timer_id, void *arg)
{
    routing_t *self = arg;
    self->connect_poll = false;
    return s_on_timer(loop, timer_id, arg);
}

/* A working connection for a pass: 0, or -1 when there is none yet (an
 * attempt is under way, and a timer looks at it soon; or the database is
 * away, and it is tried again ever more slowly). */
static int s_pass_connect(routing_t *self)
{
    kh_error_t err;
    if ((!self->conn || PQstatus(self->conn) != CONNECTION_OK) &&
        !self->connecting && zclock_mono() < self->connect_after)
        return -1; /* the database is away: not yet again */
    if (s_connect(self, &err)) {
        if (!self->connecting) {
            self->retry_ms = kh_db_retry_next(self->retry_ms);
            self->connect_after = zclock_mono() + self->retry_ms;
            kh_log_warn("db_unavailable", "retry_ms=%d msg=\"%s\"",
                        self->retry_ms, KH_LOG_Q(err.message));
            self->failures++;
        } else if (!self->connect_poll) /* look again soon */
            self->connect_poll = zloop_timer(self->loop, KH_DB_CONNECT_POLL_MS,
                                             1, s_on_connect_poll, self) != -1;
        return -1;
    }
    self->retry_ms = 0;
    return 0;
}

/* How many referrals the next pass claims: one at a time while the
 * referrals of a pass that failed on its data are tried alone. */
static size_t s_limit(const routing_t *self)
{
    return self->isolate ? 1 : self->config.batch;
}

/* Whether err is a failure that the referrals of a pass may cause: a value
 * or a constraint refused, a limit passed, no memory for its arrays. The
 * others (the database away, a lock, a full disk) fail any pass alike. */
static bool s_data_failure(const kh_error_t *err)
{
    static const char *const classes[] = {"22", "23", "54"};
    for (size_t i = 0; err->code == KH_E_DB && i < 3; i++)
        if (strncmp(err->sqlstate, classes[i], 2) == 0)
            return true;
    return err->code == KH_E_NOMEM;
}

/* The streak's referrals as a uuid[] literal, into out. */
static void s_streak_param(const routing_t *self, char *out, size_t size)
{
    size_t used = (size_t) snprintf(out, size, "{");
    for (size_t i = 0; i < self->streak; i++)
        used += (size_t) snprintf(out + used, size - used, "%s%s", i ? "," : "",
                                  self->streak_ids[i]);
    snprintf(out + used, size - used, "}");
}

/* Hold the referrals of ids (a uuid[] literal) back for one hold: the
 * number held, of them *again held before, or -1 with err. */
static int s_hold_ids(routing_t *self, const char *ids, int *again,
                      kh_error_t *err)
{
    char ms[24];
    snprintf(ms, sizeof ms, "%d", self->config.hold_ms);
    const char *params[] = {ids, ms};
    PGresult *res = PQexecPrepared(self->conn, s_statements[S_HOLD].name, 2,
                                   params, NULL, NULL, 0);
    int n = -1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        kh_db_error(err, self->conn, res, "cannot hold a referral back");
    else {
        n = PQntuples(res);
        *again = 0;
        for (int i = 0; i < n; i++)
            *again += strcmp(PQgetvalue(res, i, 0), "t") == 0;
    }
    PQclear(res);
    return n;
}

/* At the start of a pass: hold back the referral that the last one found
 * failing alone, with an alert, and count it in the streak when it was
 * never held before; after S_HELD_IN_A_ROW, the streak is held for one
 * more hold from now, while passes are tried whole. 0, or -1 with err
 * (it is held at the next pass). */
static int s_hold_found(routing_t *self, kh_error_t *err)
{
    if (!self->to_hold[0])
        return 0;
    char ids[40];
    snprintf(ids, sizeof ids, "{%s}", self->to_hold);
    int again = 0;
    int held = s_hold_ids(self, ids, &again, err);
    if (held < 0)
        return -1;
    if (held == 1) {
        kh_log_error("alert",
                     "kind=referral_failing referral=%s code=%s retry_ms=%d "
                     "again=%s msg=\"%s\"",
                     self->to_hold, kh_error_name(self->hold_why.code),
                     self->config.hold_ms, again ? "yes" : "no",
                     KH_LOG_Q(self->hold_why.message));
        kh_metric_add("referrals_held_total", NULL, 1);
    }
    if (held == 1 && !again) {
        snprintf(self->streak_ids[self->streak], sizeof self->streak_ids[0],
                 "%s", self->to_hold);
        self->streak++;
    }
    self->to_hold[0] = '\0';
    if (self->streak < S_HELD_IN_A_ROW)
        return 0;
    /* Each held for one hold from now: passes tried whole meanwhile are
     * tried without them. */
    char streak[S_HELD_IN_A_ROW * 37 + 3];
    s_streak_param(self, streak, sizeof streak);
    kh_error_t extend_err;
    if (s_hold_ids(self, streak, &again, &extend_err) < 0)
        kh_log_warn("held_extend_failed",
                    "msg=\"%s\" (each is held until its own hold ends)",
                    KH_LOG_Q(extend_err.message));
    self->whole_until = zclock_mono() + self->config.hold_ms;
    kh_log_warn("held_in_a_row",
                "referrals=%d retry_ms=%d msg=\"each failed alone, with no "
                "referral routed between them: passes are tried whole "
                "without them for a while, and if those fail too, they go "
                "free once one routes\"",
                S_HELD_IN_A_ROW, self->config.hold_ms);
    return 0;
}

/* A pass that failed on its data (claim: its claimed referrals), so that
 * one referral does not hold up the others for good: several are routed
 * one at a time from now on, to find which fails; a single one is held
 * back at the next pass (s_hold_found: it stays accepted, and is tried
 * again after its hold), and the others go in batches again. While passes
 * are tried whole, none. Returns true when the next pass is to come at
 * once. */
static bool s_isolate(routing_t *self, const PGresult *claim,
                      const kh_error_t *err)
{
    int n = PQntuples(claim);
    if (self->whole_until) {
        if (zclock_mono() < self->whole_until) {
            self->whole_failed = true;
            return false;
        }
        /* A hold on: each alone again, in case some referrals are the
         * cause after all. */
        self->whole_until = 0;
        self->whole_failed = false;
        self->streak = 0;
    }
    if (n > 1) {
        self->isolate = (size_t) n;
        kh_log_warn("pass_isolating", "referrals=%d", n);
        return true;
    }
    if (n != 1)
        return false;
    snprintf(self->to_hold, sizeof self->to_hold, "%s",
             PQgetvalue(claim, 0, 0));
    self->hold_why = *err;
    /* Found: the others go in batches again. */
    self->isolate = 0;
    return true;
}

/* A pass routed: a streak of referrals held ends; when passes tried whole
 * without them failed too, the cause was the database's, and they go
 * free. */
static void s_routed_again(routing_t *self)
{
    if (self->whole_failed) {
        char streak[S_HELD_IN_A_ROW * 37 + 3];
        s_streak_param(self, streak, sizeof streak);
        const char *params[] = {streak};
        kh_error_t err;
        if (s_exec(self->conn, S_RELEASE, params, NULL, NULL, &err))
            kh_log_warn("held_release_failed",
                        "msg=\"%s\" (they are tried after their hold)",
                        KH_LOG_Q(err.message));
        else
            kh_log_info("held_released",
                        "referrals=%zu msg=\"passes failed without them "
                        "too\"",
                        self->streak);
    }
    self->streak = 0;
    self->whole_until = 0;
    self->whole_failed = false;
}

/* Log the alerts of the referrals a pass set aside (each with suffix)
 * and forget them. */
static void s_alert_unroutable(zlistx_t *alerts, const char *suffix)
{
    for (const char *alert = zlistx_first(alerts); alert;
         alert = zlistx_next(alerts))
        kh_log_error("alert", "kind=referral_unroutable %s%s", alert, suffix);
    zlistx_purge(alerts);
}

/* What follows a pass's commit (routed referrals, made deliveries, with
 * alerts): the alerts, the counters, the held referrals let go. */
static void s_committed(routing_t *self, int routed, size_t made,
                        zlistx_t *alerts)
{
    s_alert_unroutable(alerts, "");
    kh_metric_add("referrals_routed_total", NULL, (uint64_t) routed);
    kh_metric_add("deliveries_created_total", NULL, (uint64_t) made);
    self->routed += (size_t) routed;
    if (routed)
        s_routed_again(self);
}

/* The pass whose COMMIT's answer was lost: on a later connection,
 * txid_status tells whether it committed (its alerts and counts are told
 * then), or was rolled back (its referrals are claimed again, and alerted
 * by the pass that sets them aside). While its server process still runs
 * (it lost its client, not its transaction) it is "in progress": asked
 * again at the next pass, while passes go on (the claims skip what it
 * holds). When it cannot be told (final: the server no longer knows it,
 * or routing stops first), its alerts are told with committed=unknown:
 * an alert twice beats one missed. Returns -1 when the connection failed
 * (the next pass asks again). */
static int s_settle(routing_t *self, bool final)
{
    if (!*self->unsure_xid)
        return 0;
    char status[24] = "unknown";
    bool up = self->conn && PQstatus(self->conn) == CONNECTION_OK;
    if (!up && !final)
        return -1;
    kh_error_t err;
    if (up && s_txid_status(self->conn, self->unsure_xid, status, &err) &&
        PQstatus(self->conn) != CONNECTION_OK && !final)
        return -1;
    bool committed = strcmp(status, "committed") == 0;
    bool open = strcmp(status, "in_progress") == 0;
    if (!open || final)
        kh_log_warn("pass_settled", "xid=%s status=%s routed=%d",
                    self->unsure_xid, status, self->unsure_routed);
    if (committed) {
        self->deliveries += self->unsure_made;
        s_committed(self, self->unsure_routed, self->unsure_made,
                    self->unsure_alerts);
    } else if (strcmp(status, "aborted") == 0)
        zlistx_purge(self->unsure_alerts);
    else if (!open || final)
        s_alert_unroutable(self->unsure_alerts, " committed=unknown");
    if (!open || final)
        *self->unsure_xid = '\0';
    return 0;
}

/* One pass: claim up to batch referrals (and batch_bytes of them) and
 * route them in one transaction (those that cannot be read are set
 * aside). Returns the number claimed (the batch when some were left to
 * the next pass, past the bytes), -1 (rolled back, or no
 * connection), or S_PASS_AGAIN (rolled back, and the next pass is to come
 * at once: s_isolate). */
static int s_pass(routing_t *self)
{
    if (s_pass_connect(self) || s_settle(self, false))
        return -1;
    kh_error_t err;
    kh_error_clear(&err);
    int64_t started = zclock_mono();
    size_t deliveries = self->deliveries;
    char limit[24], bytes[24];
    snprintf(limit, sizeof limit, "%zu", s_limit(self));
    snprintf(bytes, sizeof bytes, "%zu", self->config.batch_bytes);
    const char *params[] = {limit, bytes};
    int routed = 0;
    bool committing = false; /* the COMMIT is on its way */
    PGresult *res = NULL;
    if (s_hold_found(self, &err))
        goto fail;
    /* BEGIN and the claim in one round trip. */
    res = kh_db_begin_exec(self->conn, "BEGIN", s_statements[S_CLAIM].name, 2,
                           params, NULL, NULL, 1, &err);
    if (!res)
        goto fail;
    /* The writes of the whole batch, and the COMMIT, in one round trip. */
    if (!PQenterPipelineMode(self->conn)) {
        kh_db_error(&err, self->conn, NULL, "cannot start a pipeline");
        goto fail;
    }
    int sent = 0;
    s_writes_reset(self);
    for (int row = 0; row < PQntuples(res) && sent == 0; row++) {
        const char *payload =
            PQgetisnull(res, row, 1) ? NULL : PQgetvalue(res, row, 1);
        int rc = s_route_one(self, PQgetvalue(res, row, 0), payload,
                             (size_t) PQgetlength(res, row, 1),
                             PQgetvalue(res, row, 2), &err);
        if (rc < 0)
            sent = -1;
        else
            routed += rc;
    }
    /* The whole pass in three statements, then the commit. */
    if (sent == 0)
        sent = s_send_arrays(self, S_DELIVERIES, self->deliveries_cols,
                             S_DELIVERY_COLUMNS, &err);
    if (sent == 0)
        sent = s_send_arrays(self, S_ROUTED, self->routed_cols,
                             S_ROUTED_COLUMNS, &err);
    if (sent == 0)
        sent = s_send_arrays(self, S_UNROUTABLE, self->unroutable_cols,
                             S_UNROUTABLE_COLUMNS, &err);
    if (sent == 0)
        sent = PQsendQueryParams(self->conn, "COMMIT", 0, NULL, NULL, NULL,
                                 NULL, 0)
                   ? 0
                   : kh_db_error(&err, self->conn, NULL,
                                 "cannot send a statement");
    committing = sent == 0;
    kh_error_t end_err;
    if (kh_db_pipeline_end(self->conn, -1, NULL, &end_err) && sent == 0) {
        err = end_err;
        sent = -1;
    }
    if (sent)
        goto fail;
    s_notify(self);
    s_committed(self, routed, self->deliveries - deliveries, self->unroutable);
    if (routed)
        kh_metric_observe("routing_pass_seconds", NULL,
                          (double) (zclock_mono() - started) / 1000.0);
    self->passes++;
    /* Claimed: those read; those past the bytes were locked alone, and
     * the next pass is due at once, as after a full batch. */
    int claimed = PQntuples(res);
    int locked = claimed ? atoi(PQgetvalue(res, 0, 3)) : 0;
    if (self->isolate)
        self->isolate = claimed ? self->isolate - 1 : 0;
    kh_log_debug("pass", "claimed=%d routed=%d locked=%d ms=%lld", claimed,
                 routed, locked, (long long) (zclock_mono() - started));
    PQclear(res);
    return locked > claimed ? (int) self->config.batch : claimed;
fail:;
    bool again = res && s_data_failure(&err) && s_isolate(self, res, &err);
    /* The connection lost with the COMMIT's answer: whether the pass
     * committed is asked on the next one (s_settle). Notification finds
     * its deliveries at its next sweep. A server gone away in pipeline
     * mode can leave PQstatus at CONNECTION_OK with a failure of no
     * SQLSTATE (db.c, kh_db_pipeline_end): that too is a lost answer. */
    zhashx_purge(self->targets);
    if (committing && PQntuples(res) > 0 &&
        (PQstatus(self->conn) != CONNECTION_OK || !*err.sqlstate ||
         kh_db_session_ended(err.sqlstate))) {
        s_settle(self, true); /* one before it still in progress */
        snprintf(self->unsure_xid, sizeof self->unsure_xid, "%s",
                 PQgetvalue(res, 0, 4));
        self->unsure_routed = routed;
        self->unsure_made = self->deliveries - deliveries;
        zlistx_t *alerts = self->unsure_alerts;
        self->unsure_alerts = self->unroutable;
        self->unroutable = alerts;
    }
    zlistx_purge(self->unroutable);
    PQclear(res);
    self->deliveries = deliveries; /* rolled back, or not known yet */
    self->failures++;
    kh_log_warn("pass_failed", "code=%s msg=\"%s\"", kh_error_name(err.code),
                KH_LOG_Q(err.message));
    kh_db_rollback_quietly(self->conn);
    /* A connection that could not leave its pipeline refuses every
     * statement after, as one the server ended or that takes no more
     * writes does; the next pass opens a new one. */
    if (PQstatus(self->conn) != CONNECTION_OK ||
        PQpipelineStatus(self->conn) != PQ_PIPELINE_OFF ||
        kh_db_session_ended(err.sqlstate)) {
        PQfinish(self->conn);
        self->conn = NULL;
    }
    return again ? S_PASS_AGAIN : -1;
}

/* SIGHUP: a valid file replaces the rules between two transactions, so
 * every referral is routed by exactly one version; an invalid one keeps
 * the old rules. The new rules take over only once their rules.reloaded
 * event is committed: no referral is routed by a version that the trail
 * does not say was loaded. */
static void s_reload(routing_t *self)
{
    kh_error_t err;
    char file_sha256[65], version[sizeof self->version];
    kh_rules_t *rules = s_load_rules(self, file_sha256, version, &err);
    kh_rules_result_t *result = rules ? kh_rules_result_new(rules) : NULL;
    if (rules && !result)
        kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
    if (result && s_audit_reload(self, version, file_sha256, NULL, NULL, &err))
        kh_rules_result_destroy(&result);
    if (!result) {
        kh_rules_destroy(&rules);
        /* Without the database the file cannot be checked against the
         * registry, nor its loading recorded: it is tried again once the
         * database is back, as if SIGHUP came then. */
        self->reload_again = err.code == KH_E_UNAVAILABLE;
        kh_log_error("rules_reload_failed",
                     "file=%s refused_sha256=%s code=%s path=%s line=%d "
                     "column=%d msg=\"%s\" kept=%s again=%s",
                     self->config.rules_file,
                     file_sha256[0] ? file_sha256 : "none",
                     kh_error_name(err.code), err.path[0] ? err.path : "none",
                     err.line, err.column, KH_LOG_Q(err.message), self->version,
                     self->reload_again ? "when_database_is_back" : "no");
        kh_metric_add("rules_reloads_total", "failed", 1);
        /* One tried again is recorded as it ends then (its event, whose
         * COMMIT's answer was lost, may be in already: s_audit_reload). */
        kh_error_t audit_err;
        if (!self->reload_again &&
            s_audit_reload(self, self->version, file_sha256, NULL, &err,
                           &audit_err))
            kh_log_error("audit_failed",
                         "action=rules.reload_failed msg=\"%s\"",
                         KH_LOG_Q(audit_err.message));
        return;
    }
    self->reload_again = false;
    /* What the new rules lack of the registry is told at once (the next
     * pass reads it), not at its next read. */
    self->registry_unheard = true;
    kh_rules_result_destroy(&self->result);
    kh_rules_destroy(&self->rules);
    self->rules = rules;
    self->result = result;
    snprintf(self->version, sizeof self->version, "%s", version);
    kh_health_note("rules", self->version);
    kh_log_info("rules_reloaded", "file=%s file_sha256=%s version=%s rules=%zu",
                self->config.rules_file, kh_rules_version(rules), self->version,
                kh_rules_count(rules));
    kh_metric_add("rules_reloads_total", "ok", 1);
}

/* Handle one signal; returns -1 when the loop must end. */
static int s_signal(routing_t *self, int sig)
{
    if (sig == SIGHUP)
        s_reload(self);
    else if (sig == SIGTERM || sig == SIGINT) {
        kh_log_info("stopping", "signal=%d", sig);
        self->stopping = true;
        return -1;
    }
    return 0;
}

/* Passes until one claims less than a batch (the backlog is gone; a
 * batch that was all set aside says nothing of the referrals behind it);
 * signals that arrive meanwhile are handled between two transactions.
 * Before each pass, once connected, a SIGHUP that waited for the database
 * is handled and the registry followed (a change, or a reconnection that
 * may have missed one): through a long backlog too, each referral is
 * routed by the rules and the registry as they are when its pass starts. */
static int s_drain(routing_t *self)
{
    while (!self->stopping) {
        kh_health_beat(); /* a long backlog is progress, not a hang */
        if (s_pass_connect(self))
            break;
        if (self->reload_again)
            s_reload(self);
        s_refresh_partners(self);
        size_t limit = s_limit(self);
        int claimed = s_pass(self);
        if (claimed == S_PASS_AGAIN)
            continue;
        if (claimed < (int) limit)
            break;
        int sig = kh_signals_read(self->signal_fd);
        if (sig && s_signal(self, sig))
            return -1;
    }
    return self->stopping ? -1 : 0;
}

static void s_stats(routing_t *self)
{
    kh_log_info("stats",
                "routed=%zu deliveries=%zu passes=%zu failures=%zu "
                "wakeups=%zu malformed=%zu rules_version=%s",
                self->routed, self->deliveries, self->passes, self->failures,
                self->wakeups, self->malformed, self->version);
}

static int s_on_timer(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    return s_drain(arg);
}

/* The refused handshakes counted since the last auth_refused line, once
 * the flood that caused them has stopped (or at once when final, on the
 * way out): a line for each refusal would let strangers fill the log, a
 * count that waits for the next refusal may never be told. */
static void s_tell_refused(routing_t *self, bool final)
{
    uint64_t refused = kh_tally_flush(&self->auth_refused,
                                      final ? 0 : S_AUTH_LOG_MS, zclock_mono());
    if (refused)
        kh_log_warn("auth_refused", "socket=wakeup refused=%" PRIu64, refused);
}

static int s_on_stats(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    s_stats(arg);
    s_tell_refused(arg, false);
    return 0;
}

static int s_on_signal(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void) loop;
    (void) item;
    routing_t *self = arg;
    int sig;
    while ((sig = kh_signals_read(self->signal_fd)) > 0)
        if (s_signal(self, sig))
            return -1;
    return 0;
}

static int s_on_zap(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    (void) sock;
    routing_t *self = arg;
    char key[41], peer[64];
    if (kh_zap_handle(self->zap, key, peer) == 0)
        return 0;
    /* Anyone who reaches the port can make up keys without end: one line
     * every S_AUTH_LOG_MS, with the refusals left out before it. */
    uint64_t refused =
        kh_tally_add(&self->auth_refused, S_AUTH_LOG_MS, zclock_mono());
    if (refused)
        kh_log_warn("auth_refused",
                    "socket=wakeup key=%s peer=%s refused=%" PRIu64,
                    *key ? key : "none", peer, refused);
    return 0;
}

/* Whether msg is a well-formed wake-up: one frame, a MessagePack map
 * {"v":1,"cmd":"ROUTE","referral_ids":[uuid, ...]}. */
static bool s_wakeup_valid(zmsg_t *msg, size_t *count)
{
    if (zmsg_size(msg) != 1)
        return false;
    zframe_t *frame = zmsg_first(msg);
    kh_limits_t limits = kh_limits_default();
    json_t *body = NULL;
    kh_error_t err;
    if (kh_msgpack_decode(zframe_data(frame), zframe_size(frame), &limits,
                          &body, &err))
        return false;
    json_t *ids = json_object_get(body, "referral_ids");
    const char *cmd = json_string_value(json_object_get(body, "cmd"));
    bool ok = json_is_object(body) &&
              json_integer_value(json_object_get(body, "v")) == 1 &&
              json_is_integer(json_object_get(body, "v")) && cmd &&
              strcmp(cmd, "ROUTE") == 0 && json_is_array(ids);
    size_t i;
    json_t *id;
    json_array_foreach(ids, i, id)
    {
        if (!json_is_string(id) || !kh_uuid_valid(json_string_value(id)))
            ok = false;
    }
    *count = ok ? json_array_size(ids) : 0;
    json_decref(body);
    return ok;
}

/* Wake-ups: take every waiting message, then one drain if any of them
 * was well-formed. */
static int s_on_wakeup(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    routing_t *self = arg;
    size_t ids = 0, valid = 0;
    for (int i = 0; i < 1000 && (zsock_events(sock) & ZMQ_POLLIN); i++) {
        zmsg_t *msg = zmsg_recv(sock);
        if (!msg)
            break;
        size_t count = 0;
        if (s_wakeup_valid(msg, &count)) {
            self->wakeups++;
            valid++;
            ids += count;
        } else {
            self->malformed++;
            kh_log_warn("wakeup_malformed", "frames=%zu", zmsg_size(msg));
        }
        zmsg_destroy(&msg);
    }
    if (!valid)
        return 0; /* only a well-formed wake-up hastens the next pass */
    kh_log_debug("wakeup", "messages=%zu referrals=%zu", valid, ids);
    return s_drain(self);
}

/* A rules file or referral schema that cannot be read at start is a bad
 * setting, like a missing hub certificate: the service exits 2 naming it.
 * (On a reload the old rules stay and the error is kept as it is.) */
static void s_rules_error_is_setting(const routing_t *self, kh_error_t *err)
{
    if (err->code == KH_E_IO) {
        err->code = KH_E_CONFIG;
        snprintf(err->path, sizeof err->path, "KH_RULES_FILE");
    } else if (err->code == KH_E_CONFIG &&
               strcmp(err->path, self->config.schema_path) == 0)
        kh_error_as_setting(err, "KH_SCHEMA_DIR", self->config.schema_path);
}

/* Only the errors: the notes (an optional partner that is absent) make
 * sense once the partners are known. */
static void s_report_errors(const kh_error_t *err, bool is_error, void *arg)
{
    if (is_error)
        s_report(err, is_error, arg);
}

/* Load the rules without the partners and drop them: 0, or -1 with err
 * for a file or schema that cannot be read or rules that are wrong
 * whoever is registered. */
static int s_check_rules(const routing_t *self, kh_error_t *err)
{
    kh_rules_options_t opts = {.schema_path = self->config.schema_path,
                               .report = s_report_errors};
    kh_rules_t *rules = kh_rules_load(self->config.rules_file, &opts, err);
    if (!rules) {
        s_rules_error_is_setting(self, err);
        return -1;
    }
    kh_rules_destroy(&rules);
    return 0;
}

static void s_free_string(void **item)
{
    zstr_free((char **) item);
}

routing_t *routing_new(const routing_config_t *config, kh_error_t *err)
{
    routing_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    self->config = *config;
    self->signal_fd = -1;
    /* Everything that needs no database first: a bad setting stops the
     * service at once, not once PostgreSQL answers (it may be away for
     * long). The rules are read here without the partners, so that an
     * unreadable or malformed file, or schema, is named now. */
    if (s_check_rules(self, err))
        goto fail;
    self->cert = kh_hub_cert_load(config->hub_cert, err);
    if (!self->cert)
        goto fail;
    /* The authenticator must be bound before the CURVE socket. */
    self->zap = kh_zap_new(NULL, zcert_public_txt(self->cert), err);
    if (!self->zap)
        goto fail;
    self->pull = kh_curve_server_new(ZMQ_PULL, self->cert, S_WAKEUP_MAX, err);
    if (!self->pull)
        goto fail;
    zsock_set_linger(self->pull, 0);
    if (zsock_bind(self->pull, "%s", config->endpoint) == -1) {
        kh_error_set(err, KH_E_CONFIG, "KH_ROUTING_ENDPOINT",
                     "cannot bind %s: %s", config->endpoint,
                     zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (config->notify_endpoint && *config->notify_endpoint &&
        strcmp(config->notify_endpoint, "none") != 0 &&
        !(self->notify = kh_wake_push_new(self->cert, config->notify_endpoint,
                                          "KH_NOTIFY_WAKE_ENDPOINT", err)))
        goto fail;
    self->arena = kh_jarena_new(S_ARENA_KEEP);
    self->targets = zhashx_new();
    self->unroutable = zlistx_new();
    if (self->unroutable)
        zlistx_set_destructor(self->unroutable, s_free_string);
    self->unsure_alerts = zlistx_new();
    if (self->unsure_alerts)
        zlistx_set_destructor(self->unsure_alerts, s_free_string);
    self->loop = zloop_new();
    if (!self->arena || !self->targets || !self->unroutable ||
        !self->unsure_alerts || !self->loop) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        goto fail;
    }
    return self;
fail:
    routing_destroy(&self);
    return NULL;
}

int routing_start(routing_t *self, kh_error_t *err)
{
    if (!self->rules) {
        if (s_connect(self, err))
            return -1;
        self->rules = s_load_rules(self, NULL, self->version, err);
        if (!self->rules) {
            s_rules_error_is_setting(self, err);
            return -1;
        }
        self->result = kh_rules_result_new(self->rules);
        if (!self->result)
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        kh_health_note("rules", self->version);
    }
    /* The version it starts with is in the trail before a referral is
     * routed by it, as a reload's is: a rules.reloaded event with reason
     * started (tried again, with the connection, until it commits). */
    if (!self->start_recorded &&
        s_audit_reload(self, self->version, kh_rules_version(self->rules),
                       "started", NULL, err))
        return -1;
    self->start_recorded = true;
    return 0;
}

bool routing_connecting(const routing_t *self)
{
    return self->connecting != NULL;
}

void routing_destroy(routing_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    routing_t *self = *self_p;
    kh_db_connect_abandon(&self->connecting);
    zloop_destroy(&self->loop);
    zsock_destroy(&self->pull);
    zsock_destroy(&self->notify);
    s_settle(self, true); /* a pass still unsure is told as it stands */
    zhashx_destroy(&self->targets);
    zlistx_destroy(&self->unroutable);
    zlistx_destroy(&self->unsure_alerts);
    for (int c = 0; c < S_DELIVERY_COLUMNS; c++)
        kh_pgarray_free(&self->deliveries_cols[c]);
    for (int c = 0; c < S_ROUTED_COLUMNS; c++)
        kh_pgarray_free(&self->routed_cols[c]);
    for (int c = 0; c < S_UNROUTABLE_COLUMNS; c++)
        kh_pgarray_free(&self->unroutable_cols[c]);
    kh_zap_destroy(&self->zap);
    zcert_destroy(&self->cert);
    kh_rules_result_destroy(&self->result);
    kh_jarena_destroy(&self->arena);
    kh_rules_destroy(&self->rules);
    PQfinish(self->conn);
    free(self);
    *self_p = NULL;
}

int routing_run(routing_t *self, int signal_fd)
{
    self->signal_fd = signal_fd;
    zmq_pollitem_t signals = {NULL, signal_fd, ZMQ_POLLIN, 0};
    if (zloop_reader(self->loop, kh_zap_socket(self->zap), s_on_zap, self) ||
        zloop_reader(self->loop, self->pull, s_on_wakeup, self) ||
        zloop_poller(self->loop, &signals, s_on_signal, self) ||
        zloop_timer(self->loop, (size_t) self->config.poll_ms, 0, s_on_timer,
                    self) == -1 ||
        zloop_timer(self->loop, S_STATS_MS, 0, s_on_stats, self) == -1 ||
        kh_health_attach(self->loop)) {
        kh_log_error("start_failed", "reason=\"cannot set up the loop\"");
        return -1;
    }
    kh_log_info(
        "ready", "endpoint=%s rules_version=%s rules=%zu batch=%zu poll_ms=%d",
        self->config.endpoint, self->version, kh_rules_count(self->rules),
        self->config.batch, self->config.poll_ms);
    /* Referrals accepted while routing was down are routed at once. */
    if (s_drain(self) == 0)
        zloop_start(self->loop);
    s_stats(self);
    s_tell_refused(self, true);
    if (!self->stopping)
        return -1;
    kh_log_info("stopped", NULL);
    return 0;
}
