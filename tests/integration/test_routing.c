/*
 * routing against a real PostgreSQL: the real ketenhub-routing binary,
 * referrals inserted as intake stores them, deliveries and audit events
 * checked against the rules evaluated here with the same library.
 */
#include <czmq.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/codec.h"
#include "ketenhub/proto.h"
#include "ketenhub/rules.h"
#include "khpartner.h"
#include "khproc.h"
#include "khtest.h"
#include "routing_sql.h"

#define S_DB "kh_test_routing"
#define S_EXAMPLES_MAX 16

static char s_dir[256];  /* temp dir: certs, rules, logs */
static char *s_conninfo; /* the test database */
static PGconn *s_db;     /* for inserts and checks */
static json_t *s_examples[S_EXAMPLES_MAX];
static size_t s_example_count;
static kh_rules_t *s_rules; /* the default rules, as routing loads them */
/* The decision version that routing records with them and s_partners. */
static char s_version[KH_RULES_DECISION_VERSION_MAX + 1];
static int s_seq; /* idempotency keys */

static const kh_rules_partner_t s_partners[] = {
    {"avim", true, false},
    {"ketenregisseur", false, false},
    {"veilig-thuis", true, false},
    {"zorgcoordinator", true, false},
};

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

static void s_sql(const char *sql, int nparams, const char *const *params)
{
    PGresult *res =
        PQexecParams(s_db, sql, nparams, NULL, params, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s: %s", sql,
                  PQerrorMessage(s_db));
    PQclear(res);
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_db, sql);
}

static void s_register(const char *id, const char *kind, bool cases)
{
    zcert_t *cert = zcert_new();
    khtest_register_partner(s_db, id, kind, cases, zcert_public_txt(cert));
    zcert_destroy(&cert);
}

/* The example referrals, sorted by file name. */
static void s_load_examples(void)
{
    s_example_count = khtest_examples(s_examples, S_EXAMPLES_MAX);
    ck_assert_int_ge(s_example_count, 5);
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof s_dir, "/tmp/kh-routing-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    s_register("veilig-thuis", "veilig_thuis", true);
    s_register("zorgcoordinator", "zorgcoordinator", true);
    s_register("avim", "police", true);
    s_register("ketenregisseur", "chain_director", false);
    s_load_examples();
    /* khtest_src returns a static buffer: keep one path aside. */
    char schema[512];
    snprintf(schema, sizeof schema, "%s",
             khtest_src("schemas/referral.v1.json"));
    kh_rules_options_t opts = {
        .schema_path = schema,
        .partners = s_partners,
        .partner_count = sizeof s_partners / sizeof s_partners[0],
    };
    kh_error_t err;
    s_rules =
        kh_rules_load(khtest_src("schemas/rules/default.yaml"), &opts, &err);
    ck_assert_msg(s_rules != NULL, "%s", err.message);
    ck_assert_int_eq(kh_rules_decision_version(
                         s_rules, s_partners,
                         sizeof s_partners / sizeof s_partners[0], s_version),
                     0);
}

static void s_teardown(void)
{
    for (size_t i = 0; i < s_example_count; i++)
        json_decref(s_examples[i]);
    s_example_count = 0;
    kh_rules_destroy(&s_rules);
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khproc_sh("rm -rf '%s'", s_dir);
}

/* Insert doc as intake stores an accepted referral; its id into id. */
static void s_insert(const json_t *doc, char id[37])
{
    size_t len;
    char *payload = kh_payload_canonical(doc, &len);
    ck_assert_ptr_nonnull(payload);
    char hash[65], key[32];
    kh_sha256_hex(payload, len, hash);
    kh_uuid_new(id);
    snprintf(key, sizeof key, "key-%d", ++s_seq);
    const char *version =
        json_string_value(json_object_get(doc, "schema_version"));
    const char *params[] = {id, key, version ? version : "referral.v1", payload,
                            hash};
    s_sql("INSERT INTO referrals (id, partner_id, idempotency_key,"
          " schema_version, payload, payload_hash) VALUES ($1,"
          " 'veilig-thuis', $2, $3, convert_to($4, 'UTF8'),"
          " decode($5, 'hex'))",
          5, params);
    free(payload);
}

/* Insert count referrals, cycling through the examples; returns the
 * number of deliveries the default rules make for them. */
static long s_insert_many(int count)
{
    kh_rules_result_t *result = kh_rules_result_new(s_rules);
    long deliveries = 0;
    for (int i = 0; i < count; i++) {
        const json_t *doc = s_examples[(size_t) i % s_example_count];
        char id[37];
        s_insert(doc, id);
        kh_rules_eval(s_rules, doc, result);
        deliveries += (long) kh_rules_result_target_count(result);
    }
    kh_rules_result_destroy(&result);
    return deliveries;
}

/* KH_PARTNER_REFRESH_MS of the routing that s_start starts. */
static const char *s_refresh_ms = "200";
/* KH_ROUTING_HOLD_MS of the routing that s_start starts. */
static const char *s_hold_ms = "60000";
/* KH_ROUTING_BATCH_BYTES of the routing that s_start starts. */
static const char *s_batch_bytes = "8388608";

static pid_t s_start(const char *endpoint, const char *rules, int poll_ms,
                     const char *log)
{
    char env_db[1024], env_cert[600], env_endpoint[128], env_rules[600],
        env_schema[600], env_poll[64], env_refresh[64], env_hold[64],
        env_bytes[64];
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(env_cert, sizeof env_cert, "KH_HUB_CERT=%s", s_path("hub.cert"));
    snprintf(env_endpoint, sizeof env_endpoint, "KH_ROUTING_ENDPOINT=%s",
             endpoint);
    snprintf(env_rules, sizeof env_rules, "KH_RULES_FILE=%s",
             rules ? rules : khtest_src("schemas/rules/default.yaml"));
    snprintf(env_schema, sizeof env_schema, "KH_SCHEMA_DIR=%s",
             khtest_src("schemas"));
    snprintf(env_poll, sizeof env_poll, "KH_ROUTING_POLL_MS=%d", poll_ms);
    snprintf(env_refresh, sizeof env_refresh, "KH_PARTNER_REFRESH_MS=%s",
             s_refresh_ms);
    snprintf(env_hold, sizeof env_hold, "KH_ROUTING_HOLD_MS=%s", s_hold_ms);
    snprintf(env_bytes, sizeof env_bytes, "KH_ROUTING_BATCH_BYTES=%s",
             s_batch_bytes);
    char *env[] = {env_db,
                   env_cert,
                   env_endpoint,
                   env_rules,
                   env_schema,
                   env_poll,
                   "KH_ROUTING_BATCH=7",
                   "KH_LOG_LEVEL=debug",
                   env_refresh,
                   env_hold,
                   env_bytes,
                   NULL};
    char *argv[] = {"ketenhub-routing", NULL};
    pid_t pid =
        khproc_spawn(KH_TEST_BINARY_DIR "/services/routing/ketenhub-routing",
                     argv, env, s_path(log));
    ck_assert_int_gt(pid, 0);
    return pid;
}

static char *s_endpoint(void)
{
    static char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    return endpoint;
}

static bool s_log_has(const char *log, const char *text, int timeout_ms)
{
    return khtest_log_has(s_path(log), text, timeout_ms);
}

static bool s_wait_count(const char *sql, long want, int timeout_ms)
{
    return khtest_wait_count(s_db, sql, want, timeout_ms);
}

/* Every referral routed exactly once, with exactly deliveries rows. */
static void s_assert_routed_once(long referrals, long deliveries)
{
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM referrals WHERE state = 'routed'"),
        referrals);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    ck_assert_int_eq(s_count("SELECT count(*) FROM (SELECT 1 FROM deliveries"
                             " GROUP BY referral_id, partner_id"
                             " HAVING count(*) <> 1) d"),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"
                             " WHERE action = 'referral.routed'"),
                     referrals);
    ck_assert_int_eq(s_count("SELECT count(DISTINCT referral_id) FROM"
                             " audit_events WHERE action = 'referral.routed'"),
                     referrals);
}

#define S_ROUTED "SELECT count(*) FROM referrals WHERE state = 'routed'"

/* The matched rule names as routing writes them, "" for none. */
static void s_matched(const kh_rules_result_t *result, char *out, size_t size)
{
    out[0] = '\0';
    for (size_t i = 0; i < kh_rules_result_matched_count(result); i++) {
        size_t used = strlen(out);
        snprintf(out + used, size - used, "%s%s", i ? "," : "",
                 kh_rules_result_matched(result, i));
    }
}

START_TEST(examples_get_exactly_the_projected_deliveries)
{
    char ids[S_EXAMPLES_MAX][37];
    for (size_t i = 0; i < s_example_count; i++)
        s_insert(s_examples[i], ids[i]);
    /* Accepted before routing started: routed at once when it starts. */
    pid_t pid = s_start(s_endpoint(), NULL, 60000, "routing.log");
    ck_assert_msg(s_wait_count(S_ROUTED, (long) s_example_count, 10000),
                  "not routed: see %s", s_path("routing.log"));

    kh_rules_result_t *result = kh_rules_result_new(s_rules);
    long total = 0, escalations = 0;
    for (size_t i = 0; i < s_example_count; i++) {
        kh_rules_eval(s_rules, s_examples[i], result);
        size_t targets = kh_rules_result_target_count(result);
        total += (long) targets;
        const char *params[] = {ids[i]};
        PGresult *res = PQexecParams(
            s_db,
            "SELECT partner_id, priority, convert_from(payload, 'UTF8'),"
            " encode(payload_hash, 'hex'), state, rules_version,"
            " coalesce(escalate_to, ''),"
            " coalesce(convert_from(escalation_payload, 'UTF8'), ''),"
            " coalesce(encode(escalation_payload_hash, 'hex'), '')"
            " FROM deliveries WHERE referral_id = $1",
            1, NULL, params, NULL, NULL, 0);
        ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
        ck_assert_int_eq(PQntuples(res), (int) targets);
        for (int row = 0; row < PQntuples(res); row++) {
            int t = kh_rules_result_find(result, PQgetvalue(res, row, 0));
            ck_assert_msg(t >= 0, "unexpected delivery to %s",
                          PQgetvalue(res, row, 0));
            ck_assert_str_eq(
                PQgetvalue(res, row, 1),
                kh_priority_name(kh_rules_result_priority(result, (size_t) t)));
            /* Byte for byte the projection: no field outside it. */
            json_t *projected =
                kh_rules_result_project(result, (size_t) t, s_examples[i]);
            size_t len;
            char *want = kh_payload_canonical(projected, &len);
            ck_assert_str_eq(PQgetvalue(res, row, 2), want);
            char hash[65];
            kh_sha256_hex(want, len, hash);
            ck_assert_str_eq(PQgetvalue(res, row, 3), hash);
            free(want);
            json_decref(projected);
            ck_assert_str_eq(PQgetvalue(res, row, 4), "pending");
            ck_assert_str_eq(PQgetvalue(res, row, 5), s_version);
            const char *escalate =
                kh_rules_result_escalate_to(result, (size_t) t);
            ck_assert_str_eq(PQgetvalue(res, row, 6), escalate ? escalate : "");
            /* The copy's own projection, byte for byte. */
            json_t *copy = kh_rules_result_project_escalation(
                result, (size_t) t, s_examples[i]);
            char *copy_text = copy ? kh_payload_canonical(copy, &len) : NULL;
            ck_assert_str_eq(PQgetvalue(res, row, 7),
                             copy_text ? copy_text : "");
            if (copy_text) {
                kh_sha256_hex(copy_text, len, hash);
                ck_assert_str_eq(PQgetvalue(res, row, 8), hash);
            }
            free(copy_text);
            json_decref(copy);
            escalations += escalate != NULL;
        }
        PQclear(res);

        res = PQexecParams(
            s_db,
            "SELECT a.rules_version, coalesce(a.rules_matched, ''),"
            " coalesce(a.reason_code, ''), a.payload_hash = r.payload_hash,"
            " a.actor_kind, a.actor_id, a.outcome, a.origin_service"
            " FROM audit_events a JOIN referrals r ON r.id = a.referral_id"
            " WHERE a.action = 'referral.routed' AND a.referral_id = $1",
            1, NULL, params, NULL, NULL, 0);
        ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
        ck_assert_int_eq(PQntuples(res), 1);
        char matched[1024];
        s_matched(result, matched, sizeof matched);
        ck_assert_str_eq(PQgetvalue(res, 0, 0), s_version);
        ck_assert_str_eq(PQgetvalue(res, 0, 1), matched);
        ck_assert_str_eq(PQgetvalue(res, 0, 2),
                         !kh_rules_result_fallback(result) ? ""
                         : kh_rules_result_matched_count(result)
                             ? "no_registered_target"
                             : "no_rule_matched");
        ck_assert_str_eq(PQgetvalue(res, 0, 3), "t");
        ck_assert_str_eq(PQgetvalue(res, 0, 4), "service");
        ck_assert_str_eq(PQgetvalue(res, 0, 5), "routing");
        ck_assert_str_eq(PQgetvalue(res, 0, 6), "ok");
        ck_assert_str_eq(PQgetvalue(res, 0, 7), "routing");
        PQclear(res);
    }
    kh_rules_result_destroy(&result);
    /* The default rules escalate some urgent deliveries of the examples. */
    ck_assert_int_gt(escalations, 0);
    s_assert_routed_once((long) s_example_count, total);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE partner_id = 'ketenregisseur'"),
                     0);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* It says it stopped, as the other services do: a log that ends
     * without it is a service that died. */
    ck_assert(s_log_has("routing.log", "event=stopping signal=15", 0));
    ck_assert(s_log_has("routing.log", "event=stopped", 0));
}
END_TEST

START_TEST(killed_then_restarted_routes_each_once)
{
    long deliveries = s_insert_many(400);
    const char *endpoint = s_endpoint();
    pid_t pid = s_start(endpoint, NULL, 20, "routing.log");
    for (int i = 0; i < 500 && s_count(S_ROUTED) == 0; i++)
        zclock_sleep(10);
    ck_assert_int_eq(khproc_stop(pid, SIGKILL, 5000) & 0x7f, SIGKILL);
    ck_assert_int_lt(s_count(S_ROUTED), 400); /* killed mid-stream */
    /* Accepted while routing is down. */
    deliveries += s_insert_many(50);
    ck_assert_int_gt(s_count("SELECT count(*) FROM referrals"
                             " WHERE state = 'accepted'"),
                     0);
    pid = s_start(endpoint, NULL, 20, "routing2.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 450, 20000), "not routed: see %s",
                  s_path("routing2.log"));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(450, deliveries);
    /* Each start put the version it routes by in the trail before the
     * first referral it routed: a rules.reloaded with reason started and
     * the file's hash. */
    char sql[768];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action ="
             " 'rules.reloaded' AND reason_code = 'started' AND outcome ="
             " 'ok' AND rules_version = '%s' AND encode(payload_hash, 'hex')"
             " = left(rules_version, 64) AND seq < (SELECT min(seq) FROM"
             " audit_events WHERE action = 'referral.routed')",
             s_version);
    ck_assert_int_eq(s_count(sql), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'rules.reloaded' AND reason_code ="
                             " 'started'"),
                     2);
}
END_TEST

START_TEST(two_processes_route_each_once)
{
    long deliveries = s_insert_many(200);
    pid_t one = s_start(s_endpoint(), NULL, 10, "one.log");
    pid_t two = s_start(s_endpoint(), NULL, 10, "two.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 200, 20000), "not routed: see %s",
                  s_path("one.log"));
    int status = khproc_stop(one, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    status = khproc_stop(two, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(200, deliveries);
}
END_TEST

/* A PUSH socket that authenticates with cert_file's key. */
static zsock_t *s_push(const char *endpoint, const char *cert_file)
{
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    zcert_t *mine = zcert_load(cert_file);
    ck_assert_ptr_nonnull(hub);
    ck_assert_ptr_nonnull(mine);
    zsock_t *push = zsock_new(ZMQ_PUSH);
    zcert_apply(mine, push);
    zsock_set_curve_serverkey(push, zcert_public_txt(hub));
    zsock_set_linger(push, 1000);
    ck_assert_int_eq(zsock_connect(push, "%s", endpoint), 0);
    zcert_destroy(&hub);
    zcert_destroy(&mine);
    return push;
}

static void s_send_route(zsock_t *push, const char *id)
{
    khpartner_send(push, json_pack("{s:i, s:s, s:[s]}", "v", 1, "cmd", "ROUTE",
                                   "referral_ids", id));
}

START_TEST(wakeup_from_the_hub_routes_before_the_poll)
{
    const char *endpoint = s_endpoint();
    pid_t pid = s_start(endpoint, NULL, 60000, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    /* The hub's key but a malformed body: ignored with a warning. Routing
     * reads its wake-ups only after the first pass at start, which is
     * over then. */
    zsock_t *push = s_push(endpoint, s_path("hub.cert"));
    zstr_send(push, "not messagepack");
    ck_assert(s_log_has("routing.log", "event=wakeup_malformed", 5000));
    char id[37];
    s_insert(s_examples[0], id);

    /* Another key: the handshake is refused, nothing happens. */
    zcert_t *stranger = zcert_new();
    zcert_save(stranger, s_path("stranger.cert"));
    zcert_destroy(&stranger);
    zsock_t *refused_push = s_push(endpoint, s_path("stranger.cert"));
    s_send_route(refused_push, id);
    zsock_destroy(&refused_push);
    ck_assert(s_log_has("routing.log", "event=auth_refused", 5000));
    ck_assert_int_eq(s_count(S_ROUTED), 0);
    /* Made-up keys without end cannot fill the log: one line every 10 s
     * counts their refusals. */
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    for (int i = 0; i < 30; i++) {
        zcert_t *made_up = zcert_new();
        zsock_t *sock = zsock_new(ZMQ_PUSH);
        zcert_apply(made_up, sock);
        zsock_set_curve_serverkey(sock, zcert_public_txt(hub));
        zsock_set_linger(sock, 200);
        ck_assert_int_eq(zsock_connect(sock, "%s", endpoint), 0);
        zstr_send(sock, "x");
        zsock_destroy(&sock);
        zcert_destroy(&made_up);
    }
    zcert_destroy(&hub);
    zclock_sleep(500);
    char *log = khtest_read_file(s_path("routing.log"));
    ck_assert_ptr_nonnull(log);
    int lines = 0;
    for (const char *p = log; (p = strstr(p, "event=auth_refused")); p++)
        lines++;
    free(log);
    ck_assert_int_le(lines, 2);

    s_send_route(push, id);
    ck_assert_msg(s_wait_count(S_ROUTED, 1, 5000), "not woken: see %s",
                  s_path("routing.log"));
    zsock_destroy(&push);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(1, s_count("SELECT count(*) FROM deliveries"));
    /* Yet every refusal is told: the count left when they stopped, well
     * within 10 s of the last line, at the stop. The stranger and each
     * made-up key were refused at least once. */
    log = khtest_read_file(s_path("routing.log"));
    ck_assert_ptr_nonnull(log);
    long refused = 0;
    for (const char *p = log; (p = strstr(p, "event=auth_refused")); p++) {
        const char *count = strstr(p, "refused=");
        ck_assert_ptr_nonnull(count);
        refused += strtol(count + 8, NULL, 10);
    }
    free(log);
    ck_assert_int_ge(refused, 31);
}
END_TEST

/* rules.yaml: a copy of the default rules. */
static void s_write_default_rules(void)
{
    char *rules = khtest_read_file(khtest_src("schemas/rules/default.yaml"));
    ck_assert_ptr_nonnull(rules);
    khtest_write_file(s_path("rules.yaml"), rules);
    free(rules);
}

/* routing with a copy of the default rules in rules.yaml, ready. */
static pid_t s_start_editable(void)
{
    s_write_default_rules();
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    return pid;
}

/* Edit rules.yaml as a reviewer would (a comment more); its version (the
 * file's SHA-256) into want. */
static void s_edit_rules(char want[65])
{
    khtest_append_file(s_path("rules.yaml"), "# reviewed\n");
    char *changed = khtest_read_file(s_path("rules.yaml"));
    kh_sha256_hex(changed, strlen(changed), want);
    free(changed);
}

/* The trail records one rules.reloaded, of the file whose hash is want
 * (with the schema and partners of s_version), within timeout_ms. */
static void s_assert_reloaded(const char *want, int timeout_ms)
{
    ck_assert_msg(s_wait_count("SELECT count(*) FROM audit_events WHERE"
                               " action = 'rules.reloaded' AND outcome = 'ok'"
                               " AND reason_code IS NULL",
                               1, timeout_ms),
                  "not reloaded: see %s", s_path("routing.log"));
    char *version = khtest_db_value(
        s_db, "SELECT rules_version FROM audit_events"
              " WHERE action = 'rules.reloaded' AND reason_code IS NULL");
    char decision[KH_RULES_DECISION_VERSION_MAX + 1];
    snprintf(decision, sizeof decision, "%s%s", want, s_version + 64);
    ck_assert_str_eq(version, decision);
    free(version);
    char *hash = khtest_db_value(
        s_db, "SELECT encode(payload_hash, 'hex') FROM audit_events"
              " WHERE action = 'rules.reloaded' AND reason_code IS NULL");
    ck_assert_str_eq(hash, want);
    free(hash);
}

/* The deliveries of referral id to partner. */
static long s_deliveries_to(const char *id, const char *partner)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM deliveries WHERE referral_id = '%s' AND"
             " partner_id = '%s'",
             id, partner);
    return s_count(sql);
}

/* The default rules name the Arbeidsinspectie as an optional target of
 * labour exploitation. Registered while routing runs, it gets the next
 * such referral, without a SIGHUP (and without the rules file being read
 * again); revoked, it is skipped again. The registry tells routing of each
 * change as it commits: no refresh (an hour here) comes within the test.
 * The zorgcoordinator gets each one all the while. */
START_TEST(an_optional_partner_follows_the_registry_without_sighup)
{
    const json_t *labour = s_examples[0]; /* adult-labour-agriculture-... */
    ck_assert_str_eq(
        json_string_value(json_array_get(
            json_object_get(json_object_get(labour, "exploitation"), "forms"),
            0)),
        "labour");
    s_refresh_ms = "3600000";
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    s_refresh_ms = "200";
    char before[37], registered[37], revoked[37];
    s_insert(labour, before);
    ck_assert(s_wait_count(S_ROUTED, 1, 5000));
    ck_assert_int_eq(s_deliveries_to(before, "arbeidsinspectie"), 0);
    s_register("arbeidsinspectie", "inspectorate", true);
    ck_assert(s_log_has("routing.log", "event=partners_changed", 3000));
    s_insert(labour, registered);
    ck_assert(s_wait_count(S_ROUTED, 2, 5000));
    ck_assert_int_eq(s_deliveries_to(registered, "arbeidsinspectie"), 1);
    int changed =
        khtest_log_count(s_path("routing.log"), "event=partners_changed");
    s_sql("UPDATE partners SET revoked_at = now() WHERE id ="
          " 'arbeidsinspectie'",
          0, NULL);
    /* the notification's way, not an hour */
    for (int i = 0;
         i < 150 && khtest_log_count(s_path("routing.log"),
                                     "event=partners_changed") == changed;
         i++)
        zclock_sleep(20);
    ck_assert_int_gt(
        khtest_log_count(s_path("routing.log"), "event=partners_changed"),
        changed);
    s_insert(labour, revoked);
    ck_assert(s_wait_count(S_ROUTED, 3, 5000));
    ck_assert_int_eq(s_deliveries_to(revoked, "arbeidsinspectie"), 0);
    ck_assert_int_eq(s_deliveries_to(before, "zorgcoordinator") +
                         s_deliveries_to(registered, "zorgcoordinator") +
                         s_deliveries_to(revoked, "zorgcoordinator"),
                     3);
    khproc_stop(pid, SIGTERM, 5000);

    /* The same rules file routed the three differently: the version in
     * the trail says with which partners, and each change of them was
     * recorded before a referral was routed by it. */
    static const kh_rules_partner_t with[] = {
        {"arbeidsinspectie", true, false}, {"avim", true, false},
        {"ketenregisseur", false, false},  {"veilig-thuis", true, false},
        {"zorgcoordinator", true, false},
    };
    char version_with[KH_RULES_DECISION_VERSION_MAX + 1];
    ck_assert_int_eq(kh_rules_decision_version(s_rules, with,
                                               sizeof with / sizeof with[0],
                                               version_with),
                     0);
    ck_assert_str_ne(version_with, s_version);
    ck_assert_int_eq(strncmp(version_with, s_version, 65), 0);
    const char *ids[] = {before, registered, revoked};
    const char *want[] = {s_version, version_with, s_version};
    for (size_t i = 0; i < 3; i++) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT rules_version FROM audit_events WHERE"
                 " action = 'referral.routed' AND referral_id = '%s'",
                 ids[i]);
        char *got = khtest_db_value(s_db, sql);
        ck_assert_str_eq(got, want[i]);
        free(got);
    }
    PGresult *res =
        PQexec(s_db, "SELECT rules_version, encode(payload_hash, 'hex'),"
                     " seq < (SELECT seq FROM audit_events WHERE action ="
                     "  'referral.routed' AND rules_version = e.rules_version"
                     "  AND seq > e.seq ORDER BY seq LIMIT 1)"
                     " FROM audit_events e WHERE action = 'rules.reloaded'"
                     " AND outcome = 'ok' AND reason_code = 'partners_changed'"
                     " ORDER BY seq");
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    ck_assert_int_eq(PQntuples(res), 2);
    for (int row = 0; row < 2; row++) {
        ck_assert_str_eq(PQgetvalue(res, row, 0),
                         row ? s_version : version_with);
        ck_assert_str_eq(PQgetvalue(res, row, 1), kh_rules_version(s_rules));
        ck_assert_str_eq(PQgetvalue(res, row, 2), "t");
    }
    PQclear(res);
}
END_TEST

/* How many times text is in the log. */
static int s_log_count(const char *log, const char *text)
{
    return khtest_log_count(s_path(log), text);
}

/* AVIM, a target the default rules name without optional, revoked while
 * routing runs: routing says so once (its deliveries will be dead
 * letters, and a reload with these rules would be refused), not at every
 * read of the registry, and says when it is back. The Arbeidsinspectie,
 * optional and never registered, is not named (partners=avim alone). */
START_TEST(a_required_partner_revoked_is_told_once)
{
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 5000));
    s_sql("UPDATE partners SET revoked_at = now() WHERE id = 'avim'", 0, NULL);
    ck_assert_msg(s_log_has("routing.log",
                            "event=rules_partners_missing partners=avim ",
                            3000),
                  "see %s", s_path("routing.log"));
    zclock_sleep(400); /* several reads of the registry */
    ck_assert_int_eq(s_log_count("routing.log", "rules_partners_missing"), 1);
    s_sql("UPDATE partners SET revoked_at = NULL WHERE id = 'avim'", 0, NULL);
    ck_assert(s_log_has("routing.log",
                        "event=rules_partners_back partners=avim ", 3000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* Rules that a revoked partner left wanting, reloaded without it: the
 * warning is taken back at once, not at the next read of the registry. */
START_TEST(a_reload_without_a_missing_partner_tells_it_back)
{
    s_refresh_ms = "3600000";
    char *rules = khtest_read_file(khtest_src("schemas/rules/default.yaml"));
    ck_assert_ptr_nonnull(rules);
    khtest_write_file(s_path("rules.yaml"), rules);
    free(rules);
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    s_refresh_ms = "200";
    ck_assert(s_log_has("routing.log", "event=ready", 5000));
    s_sql("UPDATE partners SET revoked_at = now() WHERE id = 'avim'", 0, NULL);
    ck_assert_msg(s_log_has("routing.log",
                            "event=rules_partners_missing partners=avim ",
                            3000),
                  "see %s", s_path("routing.log"));
    khtest_write_file(s_path("rules.yaml"),
                      "version: 1\n"
                      "fallback:\n"
                      "  targets: [{partner: zorgcoordinator, fields: "
                      "[subject]}]\n"
                      "rules: []\n");
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert(s_log_has("routing.log", "event=rules_reloaded", 3000));
    ck_assert_msg(s_log_has("routing.log",
                            "event=rules_partners_back partners=avim ", 2000),
                  "see %s", s_path("routing.log"));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* A fallback of two optional partners: the zorgcoordinator and the
 * ketenregisseur's "regie", not registered when the rules load. */
static const char s_optional_fallback[] =
    "version: 1\n"
    "fallback:\n"
    "  targets:\n"
    "    - {partner: zorgcoordinator, optional: true, fields: [subject]}\n"
    "    - {partner: regie, optional: true, fields: [subject]}\n"
    "rules:\n"
    "  - name: acute\n"
    "    when: {field: risk.acute_danger, equals: true}\n"
    "    then: {targets: [{partner: avim, fields: [summary]}]}\n";

/* With none of the fallback's partners left (the zorgcoordinator revoked,
 * regie registered since as a ketenregisseur, who may not receive case
 * data), a referral no rule matches goes to the revoked zorgcoordinator
 * (a dead letter, with its alert, and routing warns as of a required
 * partner revoked): never to regie, nor does a delivery to a partner
 * that was never registered fail every pass, and the referrals behind it
 * with it. */
START_TEST(a_fallback_with_none_left_sends_to_its_revoked_partners_alone)
{
    khtest_write_file(s_path("rules.yaml"), s_optional_fallback);
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 5000));
    char unmatched[37], acute[37];
    s_insert(s_examples[0], unmatched); /* adult-labour-...: no rule */
    ck_assert(s_wait_count(S_ROUTED, 1, 5000));
    ck_assert_int_eq(s_deliveries_to(unmatched, "zorgcoordinator"), 1);

    s_register("regie", "chain_director", false);
    s_sql("UPDATE partners SET revoked_at = now() WHERE id ="
          " 'zorgcoordinator'",
          0, NULL);
    ck_assert_msg(s_log_has("routing.log",
                            "event=rules_partners_missing"
                            " partners=zorgcoordinator ",
                            3000),
                  "see %s", s_path("routing.log"));
    s_insert(s_examples[0], unmatched);
    s_insert(s_examples[3], acute); /* minor-sexual-acute: avim */
    ck_assert(s_wait_count(S_ROUTED, 3, 5000));
    ck_assert_int_eq(s_deliveries_to(unmatched, "zorgcoordinator"), 1);
    ck_assert_int_eq(s_deliveries_to(acute, "avim"), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE partner_id = 'regie'"),
                     0);
    ck_assert_int_eq(s_log_count("routing.log", "event=pass_failed"), 0);
    khproc_stop(pid, SIGTERM, 5000);
}
END_TEST

/* A registry change while routing drains a backlog counts from the next
 * pass: the referrals behind it go by the new decision version (the
 * Arbeidsinspectie, registered meanwhile, gets each labour one of them),
 * not by the one the drain started with. */
START_TEST(a_registry_change_applies_within_a_backlog)
{
    s_insert_many(3000);
    /* Each pass takes 20 ms at least (430 passes of 7): the change comes
     * well before the backlog is gone, however slow the machine. */
    s_sql("CREATE FUNCTION test_slow() RETURNS trigger LANGUAGE plpgsql AS"
          " $$BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END$$",
          0, NULL);
    s_sql("CREATE TRIGGER test_slow AFTER INSERT ON audit_events"
          " FOR EACH STATEMENT EXECUTE FUNCTION test_slow()",
          0, NULL);
    s_refresh_ms = "3600000";
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    s_refresh_ms = "200";
    ck_assert(s_wait_count("SELECT ((" S_ROUTED ") >= 50)::int", 1, 10000));
    s_register("arbeidsinspectie", "inspectorate", true);
    ck_assert(s_wait_count(S_ROUTED, 3000, 120000));
    khproc_stop(pid, SIGTERM, 5000);
    long later = s_count("SELECT count(*) FROM audit_events e"
                         " WHERE action = 'referral.routed' AND seq >"
                         " (SELECT min(seq) FROM audit_events WHERE"
                         "  reason_code = 'partners_changed')"
                         " AND rules_matched LIKE '%labour-exploitation%'");
    ck_assert_int_gt(s_count(S_ROUTED " AND id IN (SELECT referral_id FROM"
                                      " deliveries WHERE partner_id ="
                                      " 'arbeidsinspectie')"),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE"
                             " partner_id = 'arbeidsinspectie'"),
                     later);
    ck_assert_int_lt(later, 3000);
}
END_TEST

START_TEST(sighup_reload_keeps_old_rules_when_broken)
{
    pid_t pid = s_start_editable();

    khtest_write_file(s_path("rules.yaml"), "version: 1\nrules: [\n");
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE"
                           " action = 'rules.reload_failed'"
                           " AND outcome = 'failed'",
                           1, 5000));
    ck_assert(s_log_has("routing.log", "event=rules_reload_failed", 1000));
    ck_assert(s_log_has("routing.log", "line=", 1000));
    char *version =
        khtest_db_value(s_db, "SELECT rules_version FROM audit_events"
                              " WHERE action = 'rules.reload_failed'");
    ck_assert_str_eq(version, s_version);
    free(version);
    /* The refused file is named too, by its own hash: an auditor must
     * know which file was refused, not only which rules stayed. */
    char refused[65];
    kh_sha256_hex("version: 1\nrules: [\n", strlen("version: 1\nrules: [\n"),
                  refused);
    char *hash = khtest_db_value(
        s_db, "SELECT encode(payload_hash, 'hex') FROM audit_events"
              " WHERE action = 'rules.reload_failed'");
    ck_assert_str_eq(hash, refused);
    free(hash);
    char line[128];
    snprintf(line, sizeof line, "refused_sha256=%s ", refused);
    ck_assert(s_log_has("routing.log", line, 1000));

    /* Still routing, by the old rules. */
    long deliveries = s_insert_many(5);
    ck_assert(s_wait_count(S_ROUTED, 5, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'referral.routed'"
                             " AND rules_version = (SELECT rules_version FROM"
                             " audit_events WHERE"
                             " action = 'rules.reload_failed')"),
                     5);

    /* A valid file replaces them. */
    s_write_default_rules();
    char want[65];
    s_edit_rules(want);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    s_assert_reloaded(want, 5000);
    deliveries += s_insert_many(5);
    ck_assert(s_wait_count(S_ROUTED, 10, 5000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(10, deliveries);
}
END_TEST

/* A valid file whose rules.reloaded event cannot be committed does not
 * take over: the referrals after it are routed by the old rules, which
 * the trail says are in force, and a later SIGHUP loads it. */
START_TEST(sighup_reload_that_cannot_be_audited_keeps_old_rules)
{
    pid_t pid = s_start_editable();

    s_sql("ALTER TABLE audit_events ADD CONSTRAINT test_no_reload"
          " CHECK (action::text <> 'rules.reloaded') NOT VALID",
          0, NULL);
    char want[65];
    s_edit_rules(want);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert(s_log_has("routing.log", "event=rules_reload_failed", 5000));
    long deliveries = s_insert_many(5);
    ck_assert(s_wait_count(S_ROUTED, 5, 5000));
    char old_version[256];
    snprintf(old_version, sizeof old_version,
             "SELECT count(*) FROM audit_events WHERE action ="
             " 'referral.routed' AND rules_version = '%s'",
             s_version);
    ck_assert_int_eq(s_count(old_version), 5);

    s_sql("ALTER TABLE audit_events DROP CONSTRAINT test_no_reload", 0, NULL);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    s_assert_reloaded(want, 5000);
    deliveries += s_insert_many(5);
    ck_assert(s_wait_count(S_ROUTED, 10, 5000));
    ck_assert_int_eq(s_count(old_version), 5);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(10, deliveries);
}
END_TEST

/* A reload whose COMMIT's answer was lost (the server committed it, and
 * the connection went before it said so) is tried again once routing is
 * connected again, as one the database was away for: txid_status says its
 * event is in, and it is not written twice; the new rules take over. */
START_TEST(a_reload_whose_commit_answer_was_lost_is_recorded_once)
{
    setenv("PGOPTIONS", "-c synchronous_commit=on", 1);
    pid_t pid = s_start_editable();
    unsetenv("PGOPTIONS");
    char want[65];
    s_edit_rules(want);
    khtest_sync_standby(s_db, "kh_test_nobody");
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    bool ended = khtest_end_commit_waiter(s_db, S_DB);
    khtest_sync_standby(s_db, NULL);
    ck_assert_msg(ended, "no commit waited: see %s", s_path("routing.log"));
    s_assert_reloaded(want, 10000);
    long deliveries = s_insert_many(3);
    ck_assert(s_wait_count(S_ROUTED, 3, 10000));
    char routed[256];
    snprintf(routed, sizeof routed,
             "SELECT count(*) FROM audit_events WHERE action ="
             " 'referral.routed' AND rules_version LIKE '%s%%'",
             want);
    ck_assert_int_eq(s_count(routed), 3);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* The reload once, and no failure (one tried again is not refused). */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action LIKE 'rules.reload%'"
                             " AND reason_code IS DISTINCT FROM 'started'"),
                     1);
    ck_assert_msg(s_log_count("routing.log", "status=committed written=true"),
                  "not settled: see %s", s_path("routing.log"));
    s_assert_routed_once(3, deliveries);
}
END_TEST

/* A SIGHUP while the database is away: the file cannot be checked
 * against the registry nor its loading recorded, so it is refused, and
 * tried again once the database is back, without another SIGHUP. */
START_TEST(sighup_while_the_database_is_away_is_retried_when_it_is_back)
{
    pid_t pid = s_start_editable();
    char want[65];
    s_edit_rules(want);

    ck_assert_int_eq(khtest_pgtmp("down", "fast"), 0);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    bool refused =
        s_log_has("routing.log", "again=when_database_is_back", 5000);
    ck_assert_int_eq(khtest_pgtmp("up", NULL), 0);
    ck_assert_msg(refused, "no retried reload: see %s", s_path("routing.log"));
    PQreset(s_db);
    s_assert_reloaded(want, 15000);
    long deliveries = s_insert_many(3);
    ck_assert(s_wait_count(S_ROUTED, 3, 10000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(3, deliveries);
    /* The log says when the database was back, as it said it was gone:
     * a db_connected at start and one after the outage. */
    char *log = khtest_read_file(s_path("routing.log"));
    ck_assert_ptr_nonnull(log);
    int connected = 0;
    for (const char *at = log; (at = strstr(at, "event=db_connected")); at++)
        connected++;
    free(log);
    ck_assert_int_ge(connected, 2);
}
END_TEST

/* Whether the test database takes new connections (those made stay). */
static void s_allow_connections(bool allow)
{
    khtest_db_allow_connections(S_DB, allow);
}

/* Routing loses its connection and the database refuses new ones for a
 * while: it tries again ever more slowly, a warning per attempt that says
 * when the next one comes, not one per poll (50 a second here), and
 * routes again by itself once it may connect. */
START_TEST(a_database_away_is_tried_ever_more_slowly)
{
    pid_t pid = s_start(s_endpoint(), NULL, 20, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    s_allow_connections(false);
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'ketenhub-routing'",
                   0, NULL);
    bool failed = s_log_has("routing.log", "event=db_unavailable", 10000);
    usleep(2000 * 1000);
    int warnings = s_log_count("routing.log", "event=db_unavailable");
    s_allow_connections(true);
    ck_assert_msg(failed, "no db_unavailable: see %s", s_path("routing.log"));
    ck_assert_msg(warnings <= 6, "%d warnings in 2 s: see %s", warnings,
                  s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "retry_ms=", 0));
    long deliveries = s_insert_many(3);
    ck_assert(s_wait_count(S_ROUTED, 3, 15000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(3, deliveries);
}
END_TEST

/* Routing started before the migrations (a fresh deployment whose
 * migrate job is still running): it waits for its tables as it waits for
 * the database, instead of exiting, beating all the while (its watchdog
 * would end it), and starts once they are there. */
START_TEST(started_before_the_migrations_it_waits_for_them)
{
    khtest_db_exec(s_db, "ALTER TABLE referrals RENAME TO referrals_later", 0,
                   NULL);
    /* Waiting longer than its watchdog's time: waiting is not hanging. */
    setenv("KH_WATCHDOG_S", "10", 1);
    pid_t pid = s_start(s_endpoint(), NULL, 20, "routing.log");
    unsetenv("KH_WATCHDOG_S");
    bool waited = s_log_has("routing.log", "sqlstate 42P01", 10000);
    usleep(12 * 1000 * 1000);
    bool alive = kill(pid, 0) == 0 &&
                 !s_log_has("routing.log", "event=start_failed", 0) &&
                 !s_log_has("routing.log", "kind=hung", 0);
    khtest_db_exec(s_db, "ALTER TABLE referrals_later RENAME TO referrals", 0,
                   NULL);
    ck_assert_msg(waited && alive, "see %s", s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "event=ready", 15000));
    long deliveries = s_insert_many(2);
    ck_assert(s_wait_count(S_ROUTED, 2, 15000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(2, deliveries);
}
END_TEST

/* A SIGHUP while routing waits to record its start (the rules read, the
 * trail's table not there yet) is not lost: once started, it reloads the
 * file as it is now. */
START_TEST(sighup_while_it_waits_to_start_reloads_once_started)
{
    khtest_db_exec(s_db, "ALTER TABLE audit_events RENAME TO audit_later", 0,
                   NULL);
    s_write_default_rules();
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    bool waited = s_log_has("routing.log", "sqlstate 42P01", 10000);
    char want[65];
    s_edit_rules(want);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    /* read while it waits */
    bool told = s_log_has("routing.log", "event=sighup", 5000);
    khtest_db_exec(s_db, "ALTER TABLE audit_later RENAME TO audit_events", 0,
                   NULL);
    ck_assert_msg(waited && told, "see %s", s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "event=ready", 15000));
    s_assert_reloaded(want, 15000);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* A rules file replaced by a FIFO (or anything that is not a regular
 * file): the reload is refused at once and audited, routing goes on by the
 * old rules instead of waiting for a writer that never comes. */
START_TEST(sighup_reload_refuses_a_fifo_without_hanging)
{
    pid_t pid = s_start_editable();

    ck_assert_int_eq(unlink(s_path("rules.yaml")), 0);
    ck_assert_int_eq(mkfifo(s_path("rules.yaml"), 0600), 0);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert_msg(s_wait_count("SELECT count(*) FROM audit_events WHERE"
                               " action = 'rules.reload_failed'",
                               1, 5000),
                  "reload not refused: see %s", s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "not a regular file", 1000));
    long deliveries = s_insert_many(3);
    ck_assert(s_wait_count(S_ROUTED, 3, 5000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(3, deliveries);
}
END_TEST

/* A reload naming a partner that does not handle cases (the
 * ketenregisseur, registered) as a target: refused with its code, path and
 * line, audited, and no referral ever reaches that partner (promise 5). */
START_TEST(sighup_reload_refuses_a_partner_without_cases)
{
    pid_t pid = s_start_editable();

    khtest_write_file(s_path("rules.yaml"),
                      "version: 1\n"
                      "fallback: {targets: [{partner: zorgcoordinator,"
                      " fields: [needs]}]}\n"
                      "rules:\n"
                      "  - name: everything\n"
                      "    when: {all: []}\n"
                      "    then:\n"
                      "      targets:\n"
                      "        - partner: ketenregisseur\n"
                      "          fields: [subject, suspects, summary]\n");
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert_msg(
        s_wait_count("SELECT count(*) FROM audit_events WHERE"
                     " action = 'rules.reload_failed'"
                     " AND reason_code = 'rules.no_cases_partner'"
                     " AND reason_path = 'rules[0].then.targets[0].partner'",
                     1, 5000),
        "reload not refused: see %s", s_path("routing.log"));
    ck_assert(s_log_has("routing.log",
                        "event=rules_problem code=rules.no_cases_partner"
                        " path=rules[0].then.targets[0].partner line=8"
                        " column=20",
                        1000));
    long deliveries = s_insert_many(3);
    ck_assert(s_wait_count(S_ROUTED, 3, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE partner_id = 'ketenregisseur'"),
                     0);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_assert_routed_once(3, deliveries);
}
END_TEST

/* An accepted referral of veilig-thuis stored an hour ago under key
 * PREFIX-I with payload (bytea input: text, or \x and hex; NULL: purged),
 * as no intake would store it. */
static void s_stored_referral(const char *prefix, int i, const char *payload)
{
    char id[37], key[32];
    kh_uuid_new(id);
    snprintf(key, sizeof key, "%s-%d", prefix, i);
    const char *params[] = {id, key, payload};
    s_sql("INSERT INTO referrals (id, partner_id, idempotency_key,"
          " schema_version, payload, payload_hash, accepted_at)"
          " VALUES ($1, 'veilig-thuis', $2, 'referral.v1', $3::bytea,"
          " sha256(''::bytea), now() - interval '1 hour')",
          3, params);
}

/* More unreadable referrals than a batch, oldest first, then good ones:
 * the bad ones are set aside (audited) and the good ones routed. */
START_TEST(unreadable_referrals_are_set_aside_not_retried)
{
    for (int i = 0; i < 10; i++)
        s_stored_referral("bad", i, i % 2 ? "not json" : NULL);
    long deliveries = s_insert_many(5);
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 5, 10000), "not routed: see %s",
                  s_path("routing.log"));
    ck_assert(s_wait_count("SELECT count(*) FROM referrals"
                           " WHERE state = 'unroutable'",
                           10, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.routed' AND outcome = 'failed'"
                             " AND reason_code = 'payload_unreadable'"),
                     5);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.routed' AND outcome = 'failed'"
                             " AND reason_code = 'payload_purged'"),
                     5);
    ck_assert(s_log_has("routing.log", "kind=referral_unroutable", 1000));
    /* Set aside once: later passes do not touch them again. */
    zclock_sleep(300);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " outcome = 'failed'"),
                     10);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* A backlog is drained in passes until one claims less than a batch: a
 * pass whose batch was all set aside is no sign that the backlog is
 * gone. The referrals behind a batch of unreadable ones are routed at
 * once, not at the next poll (a minute here). */
START_TEST(a_batch_all_set_aside_does_not_end_the_drain)
{
    for (int i = 0; i < 7; i++) /* KH_ROUTING_BATCH */
        s_stored_referral("bad", i, "not json");
    long deliveries = s_insert_many(3);
    pid_t pid = s_start(s_endpoint(), NULL, 60000, "routing.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 3, 10000), "not routed: see %s",
                  s_path("routing.log"));
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"
                             " WHERE state = 'unroutable'"),
                     7);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* Passes that fail at their writes (a full disk, say) roll back: an
 * unreadable referral in them is not set aside, so no alert says it was;
 * the alert comes once, with the pass that commits, and the stats count
 * only the deliveries that were committed. */
START_TEST(a_failed_pass_neither_alerts_nor_counts)
{
    s_sql("CREATE TABLE test_full (x int)", 0, NULL);
    s_sql("INSERT INTO test_full VALUES (1)", 0, NULL);
    s_sql("CREATE FUNCTION test_full() RETURNS trigger LANGUAGE plpgsql AS"
          " $$BEGIN IF NEW.action <> 'rules.reloaded' AND EXISTS"
          " (SELECT 1 FROM test_full) THEN RAISE"
          " EXCEPTION 'no space left' USING ERRCODE = '53100'; END IF;"
          " RETURN NEW; END$$",
          0, NULL);
    s_sql("CREATE TRIGGER test_full BEFORE INSERT ON audit_events"
          " FOR EACH ROW EXECUTE FUNCTION test_full()",
          0, NULL);
    s_stored_referral("bad", 0, "not json");
    long deliveries = s_insert_many(2);
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    for (int i = 0;
         i < 100 && s_log_count("routing.log", "event=pass_failed") < 3; i++)
        zclock_sleep(50);
    ck_assert_int_ge(s_log_count("routing.log", "event=pass_failed"), 3);
    ck_assert_int_eq(s_log_count("routing.log", "kind=referral_unroutable"), 0);

    s_sql("DELETE FROM test_full", 0, NULL);
    ck_assert(s_wait_count(S_ROUTED, 2, 10000));
    ck_assert(s_wait_count("SELECT count(*) FROM referrals"
                           " WHERE state = 'unroutable'",
                           1, 5000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ck_assert_int_eq(s_log_count("routing.log", "kind=referral_unroutable"), 1);
    char stats[64];
    snprintf(stats, sizeof stats, "event=stats routed=2 deliveries=%ld ",
             deliveries);
    ck_assert_msg(s_log_count("routing.log", stats) == 1, "no '%s' in %s",
                  stats, s_path("routing.log"));
}
END_TEST

/* A pass refused because the server takes no more writes (25006: a
 * primary demoted, or set read-only; here a trigger says so) leaves that
 * session for a new connection, which finds the primary where the
 * connection string names several hosts: routing does not keep failing
 * on the one it had. */
START_TEST(a_server_that_takes_no_writes_is_left_for_a_new_connection)
{
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    char *first = khtest_db_value(s_db, "SELECT pid FROM pg_stat_activity"
                                        " WHERE application_name ="
                                        " 'ketenhub-routing'");
    s_sql("CREATE TABLE test_read_only (x int)", 0, NULL);
    s_sql("INSERT INTO test_read_only VALUES (1)", 0, NULL);
    s_sql("CREATE FUNCTION test_read_only() RETURNS trigger LANGUAGE plpgsql"
          " AS $$BEGIN IF EXISTS (SELECT 1 FROM test_read_only) THEN RAISE"
          " EXCEPTION 'cannot execute INSERT in a read-only transaction'"
          " USING ERRCODE = '25006'; END IF; RETURN NEW; END$$",
          0, NULL);
    s_sql("CREATE TRIGGER test_read_only BEFORE INSERT ON deliveries"
          " FOR EACH ROW EXECUTE FUNCTION test_read_only()",
          0, NULL);
    s_insert_many(2);
    ck_assert(s_log_has("routing.log", "event=pass_failed", 10000));
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
             " 'ketenhub-routing' AND pid <> %s",
             first);
    ck_assert_msg(s_wait_count(sql, 1, 10000),
                  "routing kept its session (pid %s)", first);
    free(first);
    s_sql("DELETE FROM test_read_only", 0, NULL);
    ck_assert(s_wait_count(S_ROUTED, 2, 10000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* The connection lost with the answer to the COMMIT of a pass that went
 * through: routing asks txid_status on its next connection and, told it
 * committed, alerts the referral the pass set aside, as after any
 * commit; the referral is set aside once. The answer is lost by holding
 * the commit, written, in a wait for a synchronous standby that never
 * comes and ending the server process while it waits. */
START_TEST(a_pass_whose_commit_answer_was_lost_alerts_once_it_is_known)
{
    setenv("PGOPTIONS", "-c synchronous_commit=on", 1);
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    unsetenv("PGOPTIONS");
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    zclock_sleep(200); /* its first pass done */
    khtest_sync_standby(s_db, "kh_test_nobody");
    s_stored_referral("lost", 0, "not json");
    bool ended = khtest_end_commit_waiter(s_db, S_DB);
    khtest_sync_standby(s_db, NULL);
    ck_assert_msg(ended, "no commit waited: see %s", s_path("routing.log"));
    ck_assert_msg(s_log_has("routing.log", "status=committed", 10000),
                  "not settled: see %s", s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "kind=referral_unroutable", 2000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ck_assert_int_eq(s_log_count("routing.log", "kind=referral_unroutable"), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.routed' AND outcome = 'failed'"),
                     1);
}
END_TEST

/* A trigger that refuses the deliveries for which cond holds, as a
 * constraint would. */
static void s_refuse_deliveries(const char *cond)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql"
             " AS $$BEGIN IF %s THEN RAISE EXCEPTION 'refused' USING"
             " ERRCODE = '23514'; END IF; RETURN NEW; END$$",
             cond);
    s_sql(sql, 0, NULL);
    s_sql("CREATE TRIGGER test_refuse BEFORE INSERT ON deliveries"
          " FOR EACH ROW EXECUTE FUNCTION test_refuse()",
          0, NULL);
}

/* A referral whose writes fail on their own (here a trigger refuses its
 * deliveries as a constraint would) does not hold up the others of its
 * pass, nor the ones behind it: they are routed one at a time until it is
 * found, and it is held back with an alert, still accepted, nothing
 * written for it. Another routing process holds it back as well, until
 * its hold is over; then it is tried again, and routed once what refused
 * it is gone. */
START_TEST(a_referral_that_fails_alone_holds_up_no_other)
{
    long deliveries = s_insert_many(3);
    char poison[37];
    s_insert(s_examples[3], poison);
    deliveries += s_insert_many(10);
    char cond[64];
    snprintf(cond, sizeof cond, "NEW.referral_id = '%s'", poison);
    s_refuse_deliveries(cond);

    s_hold_ms = "12000"; /* not over before the restart is checked */
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert(s_wait_count(S_ROUTED, 13, 10000));
    char alert[128];
    snprintf(alert, sizeof alert, "kind=referral_failing referral=%s ", poison);
    ck_assert_msg(s_log_has("routing.log", alert, 5000), "see %s",
                  s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "event=pass_isolating", 100));
    char state[160];
    snprintf(state, sizeof state,
             "SELECT count(*) FROM referrals WHERE id = '%s' AND"
             " state = 'accepted' AND held_until > now()",
             poison);
    ck_assert_int_eq(s_count(state), 1);
    khproc_stop(pid, SIGTERM, 5000);
    /* Another process (or this one restarted) holds it back too. */
    s_sql("DROP TRIGGER test_refuse ON deliveries", 0, NULL);
    pid = s_start(s_endpoint(), NULL, 50, "routing2.log");
    s_hold_ms = "60000";
    zclock_sleep(300); /* several polls: it is not tried meanwhile */
    ck_assert_int_eq(s_count(S_ROUTED), 13);
    ck_assert_int_eq(s_log_count("routing.log", "kind=referral_failing"), 1);
    snprintf(state, sizeof state,
             "SELECT count(*) FROM audit_events WHERE referral_id = '%s'",
             poison);
    ck_assert_int_eq(s_count(state), 0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    /* Its hold over, it is routed. */
    ck_assert(s_wait_count(S_ROUTED, 14, 30000));
    khproc_stop(pid, SIGTERM, 5000);
    ck_assert_int_gt(s_count("SELECT count(*) FROM deliveries"), deliveries);
}
END_TEST

/* A failure of that kind for every referral (a constraint added by
 * hand, say) is the database's: after eight referrals found failing alone
 * in a row, passes are tried whole, with no alert for each referral,
 * until the cause is gone; then all are routed at once, the eight held
 * too, since passes without them failed as well. */
START_TEST(referrals_failing_alone_in_a_row_are_the_databases_failure)
{
    long deliveries = s_insert_many(20);
    s_refuse_deliveries("true");
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert_msg(s_log_has("routing.log", "event=held_in_a_row", 10000),
                  "see %s", s_path("routing.log"));
    zclock_sleep(500); /* ten polls */
    ck_assert_int_eq(s_log_count("routing.log", "kind=referral_failing"), 8);
    ck_assert_int_eq(s_log_count("routing.log", "event=held_in_a_row"), 1);
    ck_assert_int_eq(s_count(S_ROUTED), 0);
    s_sql("DROP TRIGGER test_refuse ON deliveries", 0, NULL);
    ck_assert(s_wait_count(S_ROUTED, 20, 5000));
    ck_assert(s_log_has("routing.log", "event=held_released referrals=8", 100));
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    khproc_stop(pid, SIGTERM, 5000);
}
END_TEST

/* One referral that keeps failing, with nothing else to route, is held
 * again after each hold, and counted once: it never makes the others
 * that come later wait for passes tried whole. */
START_TEST(a_referral_failing_again_and_again_is_counted_once)
{
    char poison[37];
    s_insert(s_examples[3], poison);
    char cond[64];
    snprintf(cond, sizeof cond, "NEW.referral_id = '%s'", poison);
    s_refuse_deliveries(cond);
    s_hold_ms = "100";
    pid_t pid = s_start(s_endpoint(), NULL, 20, "routing.log");
    s_hold_ms = "60000";
    for (int i = 0;
         i < 150 && s_log_count("routing.log", "kind=referral_failing") < 12;
         i++)
        zclock_sleep(100);
    ck_assert_msg(s_log_count("routing.log", "kind=referral_failing") >= 12,
                  "see %s", s_path("routing.log"));
    ck_assert_int_eq(s_log_count("routing.log", "again=no"), 1);
    ck_assert_int_eq(s_log_count("routing.log", "event=held_in_a_row"), 0);
    long deliveries = s_insert_many(10);
    ck_assert(s_wait_count(S_ROUTED, 10, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    khproc_stop(pid, SIGTERM, 5000);
}
END_TEST

/* Seventy referrals that fail, oldest first, more than a process could
 * once keep held: after each eight, passes tried whole fail on the next
 * one, but only for one hold; then each goes alone again, more are
 * found, and the referrals behind them are routed. The seventy stay
 * accepted, held, nothing written for them. */
START_TEST(more_failing_referrals_than_a_streak_hold_up_no_other_for_good)
{
    s_sql("CREATE TABLE test_poison (id uuid PRIMARY KEY)", 0, NULL);
    for (int i = 0; i < 70; i++) {
        char id[37];
        s_insert(s_examples[(size_t) i % s_example_count], id);
        const char *params[] = {id};
        s_sql("INSERT INTO test_poison VALUES ($1)", 1, params);
    }
    s_refuse_deliveries("EXISTS (SELECT FROM test_poison p"
                        " WHERE p.id = NEW.referral_id)");
    long deliveries = s_insert_many(20);
    s_hold_ms = "500";
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    s_hold_ms = "60000";
    ck_assert_msg(s_wait_count(S_ROUTED, 20, 40000), "see %s",
                  s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "event=held_in_a_row", 100));
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals r JOIN"
                             " test_poison p USING (id)"
                             " WHERE r.state = 'accepted'"),
                     70);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    khproc_stop(pid, SIGTERM, 5000);
}
END_TEST

/* A pass reads up to KH_ROUTING_BATCH_BYTES of stored referrals, not a
 * batch whatever their size: of large ones it claims fewer, and the next
 * pass goes on at once with the rest. */
START_TEST(a_pass_reads_at_most_its_bytes)
{
    json_t *big = json_deep_copy(s_examples[0]);
    char *filler = malloc(20001);
    ck_assert_ptr_nonnull(filler);
    memset(filler, 'x', 20000);
    filler[20000] = '\0';
    json_object_set_new(big, "filler", json_string(filler));
    free(filler);
    for (int i = 0; i < 30; i++) {
        char id[37];
        s_insert(big, id);
    }
    json_decref(big);
    s_batch_bytes = "65536";
    pid_t pid = s_start(s_endpoint(), NULL, 60000, "routing.log");
    s_batch_bytes = "8388608";
    ck_assert_msg(s_wait_count(S_ROUTED, 30, 10000), "see %s",
                  s_path("routing.log"));
    khproc_stop(pid, SIGTERM, 5000);
    /* About 20 kB each: three a pass (a fourth would pass 64 KiB),
     * though the batch is seven; every pass past the first came at once,
     * not after the minute of KH_ROUTING_POLL_MS. */
    ck_assert_int_ge(s_log_count("routing.log", "claimed=3 routed=3 "), 10);
    for (int n = 4; n <= 7; n++) {
        char pass[32];
        snprintf(pass, sizeof pass, "claimed=%d ", n);
        ck_assert_int_eq(s_log_count("routing.log", pass), 0);
    }
}
END_TEST

/* Stored payloads that are not UTF-8 text (a stray byte, a NUL) cannot
 * be read either: they are set aside like the others, and never make the
 * claim itself fail, which would hold up every referral behind them. */
START_TEST(payloads_that_are_not_text_are_set_aside)
{
    static const char *const bad[] = {"\\xff7b7d", "\\x7b007d", "\\xc0af"};
    for (int i = 0; i < 3; i++)
        s_stored_referral("binary", i, bad[i]);
    long deliveries = s_insert_many(5);
    pid_t pid = s_start(s_endpoint(), NULL, 50, "routing.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 5, 10000), "not routed: see %s",
                  s_path("routing.log"));
    ck_assert(s_wait_count("SELECT count(*) FROM referrals"
                           " WHERE state = 'unroutable'",
                           3, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), deliveries);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.routed' AND outcome = 'failed'"
                             " AND reason_code = 'payload_unreadable'"),
                     3);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* The statements that write a pass, as PostgreSQL plans them for routing
 * (generic plans, no seq scans), reach the referrals they name by key:
 * never through the index of accepted ones. Planned on statistics that
 * know of no accepted referral (a backlog that came after the last
 * ANALYZE), a join on that index, or a probe of it per referral, read in
 * each pass every entry that the referrals routed since the last vacuum
 * left in it. */
START_TEST(pass_statements_reach_referrals_by_key)
{
    static const char insert[] =
        "INSERT INTO referrals (id, partner_id, idempotency_key,"
        " schema_version, payload, payload_hash, state)"
        " SELECT gen_random_uuid(), 'veilig-thuis', $1 || g, 'referral.v1',"
        " convert_to('{}', 'UTF8'), sha256(convert_to($1 || g, 'UTF8')), $2"
        " FROM generate_series(1, $3::integer) g";
    const char *routed[] = {"r-", "routed", "20000"};
    const char *backlog[] = {"a-", "accepted", "2000"};
    khtest_db_exec(s_db, insert, 3, routed);
    khtest_db_exec(s_db, "ANALYZE referrals", 0, NULL);
    khtest_db_exec(s_db, insert, 3, backlog);
    khtest_db_exec(s_db,
                   "SET plan_cache_mode = force_generic_plan;"
                   " SET enable_seqscan = off",
                   0, NULL);
    static const struct {
        const char *name, *args;
    } runs[] = {
        {"routed", "'{00000000-0000-7000-8000-000000000000}', '{NULL}',"
                   " '{00}', '{NULL}', 'v'"},
        {"unroutable", "'{00000000-0000-7000-8000-000000000000}',"
                       " '{payload_unreadable}', '{00}'"},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        const char *name = runs[i].name, *sql = NULL;
        for (int j = 0; j < S_STATEMENTS; j++)
            if (strcmp(s_statements[j].name, name) == 0)
                sql = s_statements[j].sql;
        ck_assert_ptr_nonnull(sql);
        char *plan = khtest_db_plan_prepared(s_db, name, sql, runs[i].args);
        ck_assert_msg(!strstr(plan, "referrals_state_accepted_at") &&
                          !strstr(plan, "Seq Scan on referrals") &&
                          strstr(plan, "referrals_pkey") &&
                          strstr(plan, "Index Cond: (id = "),
                      "%s:\n%s", name, plan);
        free(plan);
    }
}
END_TEST

/* More matched rules than the trail's column holds names of: the names
 * that fit, then ",+N" for the N left out, never a shortened list that
 * passes for the whole one. */
START_TEST(more_matched_rules_than_fit_are_counted)
{
    enum { S_RULES = 70 };
    char *yaml = strdup("version: 1\nfallback:\n  targets:\n"
                        "    - {partner: zorgcoordinator, fields: [summary]}\n"
                        "rules:\n");
    for (int i = 0; i < S_RULES; i++) {
        char rule[512];
        snprintf(
            rule, sizeof rule,
            "  - name: r%02d-%s\n"
            "    when: {field: summary, present: true}\n"
            "    then:\n      targets:\n"
            "        - {partner: zorgcoordinator, fields: [summary]}\n",
            i, "a-rule-name-as-long-as-names-go-in-this-hub-0123456789-abcde");
        size_t len = strlen(yaml) + strlen(rule) + 1;
        char *grown = realloc(yaml, len);
        ck_assert_ptr_nonnull(grown);
        yaml = grown;
        strcat(yaml, rule);
    }
    khtest_write_file(s_path("many.yaml"), yaml);
    free(yaml);
    char id[37];
    s_insert(s_examples[0], id);
    pid_t pid = s_start(s_endpoint(), s_path("many.yaml"), 50, "routing.log");
    ck_assert_msg(s_wait_count(S_ROUTED, 1, 10000), "not routed: see %s",
                  s_path("routing.log"));
    char *matched =
        khtest_db_value(s_db, "SELECT rules_matched FROM audit_events"
                              " WHERE action = 'referral.routed'");
    ck_assert_uint_le(strlen(matched), 4096);
    const char *more = strrchr(matched, ',');
    ck_assert_msg(more && more[1] == '+', "%s", matched);
    size_t names = 1;
    for (const char *c = matched; c < more; c++)
        names += *c == ',';
    ck_assert_uint_gt(names, 10);
    ck_assert_uint_eq(names + strtoul(more + 2, NULL, 10), S_RULES);
    free(matched);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

START_TEST(invalid_rules_at_start_exit_2)
{
    khtest_write_file(s_path("rules.yaml"),
                      "version: 1\nrules:\n  - name: x\n    when: {field: "
                      "nope, equals: 1}\n    then: {targets: []}\n");
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    int status = khproc_stop(pid, 0, 10000);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 2);
    ck_assert(s_log_has("routing.log", "line=", 0));
}
END_TEST

/* With no partner registered (a fresh hub, or every partner revoked) the
 * rules are still checked against the registry, an empty one: a rules file
 * naming the ketenregisseur as a target, or partners nobody registered, is
 * refused at start. Were it loaded unchecked, a ketenregisseur registered
 * afterwards would receive case data (promise 5) until the next reload. */
START_TEST(no_partners_registered_still_checks_the_rules)
{
    s_sql("UPDATE partners SET revoked_at = now()", 0, NULL);
    khtest_write_file(s_path("rules.yaml"),
                      "version: 1\n"
                      "fallback: {targets: [{partner: zorgcoordinator,"
                      " fields: [needs]}]}\n"
                      "rules:\n"
                      "  - name: everything\n"
                      "    when: {all: []}\n"
                      "    then: {targets: [{partner: ketenregisseur,"
                      " fields: [subject, suspects, summary]}]}\n");
    pid_t pid = s_start(s_endpoint(), s_path("rules.yaml"), 50, "routing.log");
    int status = khproc_stop(pid, 0, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 2,
                  "routing started on unchecked rules: see %s",
                  s_path("routing.log"));
    ck_assert(s_log_has("routing.log", "code=rules.unknown_partner", 0));
    ck_assert(s_log_has("routing.log", "line=6 column=", 0));

    /* A reload is checked against the registry of the moment too, even
     * when it has become empty: the old rules stay. */
    s_sql("UPDATE partners SET revoked_at = NULL", 0, NULL);
    pid = s_start(s_endpoint(), NULL, 50, "routing2.log");
    ck_assert(s_log_has("routing2.log", "event=ready", 10000));
    s_sql("UPDATE partners SET revoked_at = now()", 0, NULL);
    ck_assert_int_eq(kill(pid, SIGHUP), 0);
    ck_assert_msg(s_log_has("routing2.log", "event=rules_reload_failed", 10000),
                  "reload with no partner registered was not checked");
    status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* A rules file that is missing or cannot be read at start is a bad
 * setting, like a missing hub certificate: exit 2, naming the variable. */
START_TEST(unreadable_rules_at_start_exit_2)
{
    char missing[512];
    snprintf(missing, sizeof missing, "%s", s_path("missing.yaml"));
    const char *files[] = {missing, s_dir};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char log[32];
        snprintf(log, sizeof log, "routing%zu.log", i);
        pid_t pid = s_start(s_endpoint(), files[i], 50, log);
        int status = khproc_stop(pid, 0, 10000);
        ck_assert(WIFEXITED(status));
        ck_assert_msg(WEXITSTATUS(status) == 2, "%s: exit %d", files[i],
                      WEXITSTATUS(status));
        ck_assert(s_log_has(log, "path=KH_RULES_FILE", 0));
    }
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("routing");
    TCase *tc = tcase_create("routing");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, examples_get_exactly_the_projected_deliveries);
    tcase_add_test(tc, killed_then_restarted_routes_each_once);
    tcase_add_test(tc, two_processes_route_each_once);
    tcase_add_test(tc, wakeup_from_the_hub_routes_before_the_poll);
    tcase_add_test(tc, sighup_reload_keeps_old_rules_when_broken);
    tcase_add_test(tc, an_optional_partner_follows_the_registry_without_sighup);
    tcase_add_test(tc, a_required_partner_revoked_is_told_once);
    tcase_add_test(tc, a_reload_without_a_missing_partner_tells_it_back);
    tcase_add_test(
        tc, a_fallback_with_none_left_sends_to_its_revoked_partners_alone);
    tcase_add_test(tc, sighup_reload_refuses_a_fifo_without_hanging);
    tcase_add_test(tc, sighup_reload_refuses_a_partner_without_cases);
    tcase_add_test(tc, sighup_reload_that_cannot_be_audited_keeps_old_rules);
    tcase_add_test(
        tc, sighup_while_the_database_is_away_is_retried_when_it_is_back);
    tcase_add_test(tc, a_reload_whose_commit_answer_was_lost_is_recorded_once);
    tcase_add_test(tc, unreadable_referrals_are_set_aside_not_retried);
    tcase_add_test(tc, payloads_that_are_not_text_are_set_aside);
    tcase_add_test(tc, pass_statements_reach_referrals_by_key);
    tcase_add_test(tc, more_matched_rules_than_fit_are_counted);
    tcase_add_test(tc, invalid_rules_at_start_exit_2);
    tcase_add_test(tc, no_partners_registered_still_checks_the_rules);
    tcase_add_test(tc, unreadable_rules_at_start_exit_2);
    suite_add_tcase(suite, tc);
    /* A backlog drained pass after pass. */
    TCase *tc_drain = tcase_create("drain");
    tcase_add_checked_fixture(tc_drain, s_setup, s_teardown);
    tcase_set_timeout(tc_drain, 180);
    tcase_add_test(tc_drain, a_batch_all_set_aside_does_not_end_the_drain);
    tcase_add_test(tc_drain, a_pass_reads_at_most_its_bytes);
    tcase_add_test(tc_drain, a_registry_change_applies_within_a_backlog);
    suite_add_tcase(suite, tc_drain);
    /* Passes that fail at their writes. */
    TCase *tc_failed = tcase_create("failed");
    tcase_add_checked_fixture(tc_failed, s_setup, s_teardown);
    tcase_set_timeout(tc_failed, 60);
    tcase_add_test(tc_failed, a_failed_pass_neither_alerts_nor_counts);
    tcase_add_test(tc_failed,
                   a_server_that_takes_no_writes_is_left_for_a_new_connection);
    tcase_add_test(tc_failed,
                   a_pass_whose_commit_answer_was_lost_alerts_once_it_is_known);
    tcase_add_test(tc_failed, a_referral_that_fails_alone_holds_up_no_other);
    tcase_add_test(tc_failed,
                   referrals_failing_alone_in_a_row_are_the_databases_failure);
    tcase_add_test(tc_failed,
                   a_referral_failing_again_and_again_is_counted_once);
    tcase_add_test(
        tc_failed,
        more_failing_referrals_than_a_streak_hold_up_no_other_for_good);
    suite_add_tcase(suite, tc_failed);
    /* A database that refuses connections for a while. */
    TCase *away = tcase_create("database_away");
    tcase_add_checked_fixture(away, s_setup, s_teardown);
    tcase_set_timeout(away, 60);
    tcase_add_test(away, a_database_away_is_tried_ever_more_slowly);
    tcase_add_test(away, started_before_the_migrations_it_waits_for_them);
    tcase_add_test(away, sighup_while_it_waits_to_start_reloads_once_started);
    suite_add_tcase(suite, away);
    return khtest_run_suite(suite);
}
