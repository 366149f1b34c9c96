/*
 * Health, readiness and metrics of the real services, and `ketenhubctl
 * status`: the real ketenhub-intake with KH_HEALTH_ENDPOINT on a free
 * port, fed by the partner client library; readiness while its database
 * is made unreachable (renamed away: the test cluster is shared and stays
 * up) and after; counters that move by exactly what was submitted; a
 * partner's backlog growing while it is offline; bad settings refused with
 * exit 2 by every service binary.
 */
#include <arpa/inet.h>
#include <czmq.h>
#include <errno.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "ketenhub/health.h"
#include "ketenhub/migrate.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_health"
#define S_AWAY "kh_test_health_away"
#define S_BARE "kh_test_health_bare"
#define S_TIMEOUT 3000

static char s_dir[256];     /* temp dir: certs, logs */
static char s_endpoint[64]; /* intake's partner endpoint */
static char s_health[64];   /* intake's health endpoint */
static char *s_conninfo;    /* the test database */
static pid_t s_intake = -1;
static PGconn *s_db;

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

static void s_make_partner(const char *file, const char *id)
{
    zcert_t *cert = zcert_new();
    ck_assert_ptr_nonnull(cert);
    char path[512];
    snprintf(path, sizeof path, "%s/%s.cert", s_dir, file);
    zcert_save(cert, path);
    snprintf(path, sizeof path, "%s/partners/%s.cert", s_dir, file);
    zcert_save_public(cert, path);
    khtest_register_partner(s_db, id, "other", true, zcert_public_txt(cert));
    zcert_destroy(&cert);
}

static void s_start_intake(void)
{
    char health[128];
    snprintf(health, sizeof health, "KH_HEALTH_ENDPOINT=%s", s_health);
    char *extra[] = {health, "KH_ROUTING_ENDPOINT=none", NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, s_conninfo, extra);
}

/* GET path on intake's health endpoint: the HTTP status, -1 when it does
 * not answer; *body when body is not NULL (caller frees). */
static int s_get_at(const char *health, const char *path, char **body)
{
    kh_error_t err;
    return kh_http_get(health, path, 2000, body, &err);
}

static int s_get(const char *path, char **body)
{
    return s_get_at(s_health, path, body);
}

/* Wait up to ms for path on health to answer status want. */
static bool s_wait_status_at(const char *health, const char *path, int want,
                             int ms)
{
    for (int waited = 0; waited <= ms; waited += 100) {
        if (s_get_at(health, path, NULL) == want)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static bool s_wait_status(const char *path, int want, int ms)
{
    return s_wait_status_at(s_health, path, want, ms);
}

static double s_metric(const char *series)
{
    return khtest_metric(s_health, series);
}

/* Wait up to ms for a series of health to reach value. */
static bool s_wait_metric(const char *health, const char *series, double value,
                          int ms)
{
    for (int waited = 0; waited <= ms; waited += 100) {
        if (khtest_metric(health, series) == value)
            return true;
        usleep(100 * 1000);
    }
    return false;
}

static kh_client_t *s_client(void)
{
    kh_error_t err;
    kh_client_t *client =
        kh_client_new(s_endpoint, s_path("hub.cert"), s_path("vt.cert"), &err);
    ck_assert_msg(client != NULL, "%s", err.message);
    return client;
}

/* SUBMIT the first example with key; the reply's cmd ("" on no reply),
 * its code in code when that is not NULL, whether it may be sent again
 * in *retry when that is not NULL. */
static char *s_submit(kh_client_t *client, const char *key, char *code,
                      size_t size, bool *retry)
{
    static char cmd[32];
    json_t *referral;
    khtest_examples(&referral, 1);
    kh_error_t err;
    json_t *reply = kh_client_submit(client, referral, key, S_TIMEOUT, &err);
    json_decref(referral);
    snprintf(cmd, sizeof cmd, "%s", reply ? kh_client_reply_cmd(reply) : "");
    if (code)
        snprintf(code, size, "%s",
                 reply && json_string_value(json_object_get(reply, "code"))
                     ? json_string_value(json_object_get(reply, "code"))
                     : "");
    if (retry)
        *retry = reply && json_is_true(json_object_get(reply, "retryable"));
    json_decref(reply);
    return cmd;
}

/* SUBMIT as s_submit until it is accepted, resending on a retryable
 * refusal as a partner does (the database may be slow to take the first
 * commit of a loaded machine); any other answer fails the test with
 * intake's log. Each refusal shows in the test's output. */
static void s_accept(kh_client_t *client, const char *key)
{
    char code[64];
    const char *cmd = "";
    bool retry = true;
    for (int i = 0; i < 10 && retry; i++) {
        if (i)
            usleep(200 * 1000);
        cmd = s_submit(client, key, code, sizeof code, &retry);
        if (strcmp(cmd, "ACCEPTED") == 0)
            return;
        fprintf(stderr, "%s: %s %s\n", key, *cmd ? cmd : "no reply", code);
        khproc_sh("grep -v level=info '%s' | tail -20 >&2",
                  s_path("intake.log"));
    }
    ck_abort_msg("%s: %s %s", key, *cmd ? cmd : "no reply", code);
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof s_dir, "/tmp/kh-health-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    ck_assert_int_eq(zsys_dir_create("%s/partners", s_dir), 0);
    snprintf(s_endpoint, sizeof s_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(s_health, sizeof s_health, "127.0.0.1:%d", khproc_free_port());
    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    s_make_partner("vt", "veilig-thuis");
    s_make_partner("zc", "zorgcoordinator");
    s_start_intake();
    ck_assert_msg(s_wait_status("/readyz", 200, 10000),
                  "intake did not become ready: see %s", s_path("intake.log"));
}

static void s_teardown(void)
{
    if (s_intake > 0) {
        int status = khproc_stop(s_intake, SIGTERM, 5000);
        ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                      "intake did not stop cleanly: see %s",
                      s_path("intake.log"));
    }
    s_intake = -1;
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khproc_sh("rm -rf '%s'", s_dir);
}

START_TEST(live_ready_and_metrics_in_the_text_format)
{
    char *body = NULL;
    ck_assert_int_eq(s_get("/livez", &body), 200);
    ck_assert_str_eq(body, "alive\n");
    free(body);
    ck_assert_int_eq(s_get("/readyz", &body), 200);
    char want[64];
    snprintf(want, sizeof want, "ready intake %s hub_key=", kh_version());
    ck_assert_msg(strncmp(body, want, strlen(want)) == 0, "%s", body);
    free(body);
    ck_assert_int_eq(s_get("/nothing-here", NULL), 404);

    ck_assert_int_eq(s_get("/metrics", &body), 200);
    snprintf(want, sizeof want,
             "ketenhub_build_info{service=\"intake\",version=\"%s\"} 1\n",
             kh_version());
    ck_assert_ptr_nonnull(strstr(body, want));
    ck_assert_ptr_nonnull(strstr(body, "ketenhub_ready 1\n"));
    ck_assert_ptr_nonnull(strstr(body, "ketenhub_database_up 1\n"));
    ck_assert_ptr_nonnull(
        strstr(body, "# TYPE ketenhub_referrals_accepted_total counter\n"));
    ck_assert_ptr_nonnull(
        strstr(body, "# TYPE ketenhub_intake_commit_seconds histogram\n"));
    free(body);
}
END_TEST

START_TEST(counters_move_by_exactly_what_was_submitted)
{
    double accepted = s_metric("referrals_accepted_total");
    double received = s_metric("referrals_received_total");
    double duplicate = s_metric("referrals_duplicate_total");
    double commits = s_metric("intake_commit_seconds_count");
    kh_client_t *client = s_client();
    enum { N = 7 };
    for (int i = 0; i <= N; i++) { /* the last, metrics-0 again */
        char key[32];
        snprintf(key, sizeof key, "metrics-%d", i % N);
        s_accept(client, key);
    }
    /* A referral the schema refuses, counted under its code. */
    json_t *bad = khtest_json("{'not_a_referral': true}");
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, bad, "metrics-bad", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    char series[128];
    snprintf(series, sizeof series, "requests_refused_total{code=\"%s\"}",
             json_string_value(json_object_get(reply, "code")));
    json_decref(reply);
    json_decref(bad);
    kh_client_destroy(&client);

    ck_assert_double_eq(s_metric("referrals_accepted_total"), accepted + N);
    ck_assert_double_eq(s_metric("referrals_duplicate_total"), duplicate + 1);
    ck_assert_double_eq(s_metric("referrals_received_total"), received + N + 2);
    ck_assert_double_eq(s_metric(series), 1);
    ck_assert(s_metric("intake_commit_seconds_count") >= commits + 1);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM referrals"),
                     N);
}
END_TEST

/* Rename database from away to to, ending its sessions first (they come
 * back by themselves, so try a few times). */
static void s_rename(PGconn *admin, const char *from, const char *to)
{
    char sql[512];
    for (int i = 0; i < 50; i++) {
        snprintf(sql, sizeof sql,
                 "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                 " WHERE datname = '%s' AND pid <> pg_backend_pid()",
                 from);
        PQclear(PQexec(admin, sql));
        snprintf(sql, sizeof sql, "ALTER DATABASE %s RENAME TO %s", from, to);
        PGresult *res = PQexec(admin, sql);
        bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
        PQclear(res);
        if (ok)
            return;
        usleep(50 * 1000);
    }
    ck_abort_msg("cannot rename database %s", from);
}

START_TEST(readiness_follows_the_database)
{
    PQfinish(s_db);
    s_db = NULL;
    PGconn *admin = PQconnectdb(khtest_pg_conninfo());
    ck_assert_int_eq(PQstatus(admin), CONNECTION_OK);
    char sql[128];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)",
             S_AWAY);
    PQclear(PQexec(admin, sql));

    s_rename(admin, S_DB, S_AWAY);
    ck_assert_msg(s_wait_status("/readyz", 503, 8000),
                  "still ready without its database");
    char *body = NULL;
    ck_assert_int_eq(s_get("/readyz", &body), 503);
    ck_assert_str_eq(body, "not ready: database unreachable\n");
    free(body);
    ck_assert_int_eq(s_get("/livez", NULL), 200); /* alive all the same */
    ck_assert_double_eq(s_metric("database_up"), 0);

    s_rename(admin, S_AWAY, S_DB);
    PQfinish(admin);
    ck_assert_msg(s_wait_status("/readyz", 200, 8000),
                  "not ready again after the database came back");
    ck_assert_double_eq(s_metric("database_up"), 1);
    /* And intake itself works again (its first try may be refused
     * retryably while it reconnects). */
    kh_client_t *client = s_client();
    bool accepted = false;
    for (int i = 0; i < 50 && !accepted; i++) {
        accepted = strcmp(s_submit(client, "after-outage", NULL, 0, NULL),
                          "ACCEPTED") == 0;
        if (!accepted)
            usleep(200 * 1000);
    }
    kh_client_destroy(&client);
    ck_assert(accepted);
    s_db = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(s_db), CONNECTION_OK);
}
END_TEST

/* Intake is ready only once its own connection is up: against a
 * database it cannot work with (not migrated: its statements do not
 * prepare) the probe reaches PostgreSQL and /readyz still answers 503,
 * until the database is migrated and intake's next attempt connects. */
START_TEST(readiness_waits_for_the_services_own_connection)
{
    ck_assert_int_eq(khproc_stop(s_intake, SIGTERM, 5000), 0);
    PGconn *bare = khtest_db_empty(S_BARE);
    char *conninfo = khtest_db_conninfo(S_BARE);
    char health[128];
    snprintf(health, sizeof health, "KH_HEALTH_ENDPOINT=%s", s_health);
    char *extra[] = {health, "KH_ROUTING_ENDPOINT=none", NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, conninfo, extra);
    free(conninfo);
    ck_assert_msg(s_wait_status("/metrics", 200, 10000),
                  "intake did not start");
    /* The probe has reached the database, and intake has tried it. */
    ck_assert(s_wait_metric(s_health, "database_up", 1, 5000));
    char *body = NULL;
    for (int i = 0; i < 50 && !body; i++) {
        usleep(100 * 1000);
        char *log = khtest_read_file(s_path("intake.log"));
        if (log && strstr(log, "event=db_connect_failed"))
            body = log;
        else
            free(log);
    }
    ck_assert_msg(body, "intake did not try the database: see %s",
                  s_path("intake.log"));
    free(body);
    ck_assert_int_eq(s_get("/readyz", &body), 503);
    ck_assert_str_eq(body, "not ready: database not connected\n");
    free(body);
    ck_assert_double_eq(s_metric("ready"), 0);

    kh_error_t err;
    ck_assert_msg(
        kh_migrate_apply(bare, khtest_src("migrations"), NULL, NULL, &err) >= 0,
        "%s", err.message);
    PQfinish(bare);
    ck_assert_msg(s_wait_status("/readyz", 200, 10000),
                  "not ready once the database was migrated: see %s",
                  s_path("intake.log"));
}
END_TEST

/* PostgreSQL stopped at once (immediate shutdown) and started again:
 * every line the service wrote meanwhile is one of its logfmt lines. The
 * health probe's idle connection got the server's parting WARNING, which
 * libpq printed raw on stderr. */
START_TEST(a_database_stopped_at_once_leaves_only_logfmt_lines)
{
    ck_assert(s_wait_status("/readyz", 200, 8000));
    PQfinish(s_db);
    s_db = NULL;
    int down = khtest_pgtmp("down", "immediate");
    bool unready = s_wait_status("/readyz", 503, 8000);
    int up = khtest_pgtmp("up", NULL);
    ck_assert_int_eq(down, 0);
    ck_assert_int_eq(up, 0);
    ck_assert(unready);
    ck_assert_msg(s_wait_status("/readyz", 200, 15000),
                  "not ready again after the database came back");
    s_db = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(s_db), CONNECTION_OK);
    char *text = khtest_read_file(s_path("intake.log"));
    ck_assert_ptr_nonnull(text);
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n"))
        ck_assert_msg(strncmp(line, "ts=", 3) == 0, "not a logfmt line: \"%s\"",
                      line);
    free(text);
}
END_TEST

/* Run ketenhubctl status --json with intake's health endpoint and the
 * given routing endpoint ("none" skips it); the exit status, the
 * document in *doc. */
static int s_status(const char *routing, json_t **doc)
{
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                    "status",
                    "--json",
                    "--intake",
                    s_health,
                    "--routing",
                    (char *) routing,
                    "--notification",
                    "none",
                    "--audit",
                    "none",
                    NULL};
    char *output = NULL;
    int status = khtest_run(argv, &output);
    json_error_t jerr;
    *doc = json_loads(output, 0, &jerr);
    ck_assert_msg(*doc != NULL, "not JSON: %s", output);
    free(output);
    return status;
}

/* partner's backlog in a status document; -1 when it is not listed. */
static long s_backlog(const json_t *doc, const char *partner)
{
    size_t i;
    json_t *row;
    json_array_foreach(json_object_get(doc, "partners"), i, row)
    {
        if (strcmp(json_string_value(json_object_get(row, "partner")),
                   partner) == 0)
            return (long) json_integer_value(json_object_get(row, "backlog"));
    }
    return -1;
}

/* The database part of a status document. */
static json_t *s_db_doc(const json_t *doc)
{
    json_t *db = json_object_get(doc, "database");
    ck_assert_ptr_nonnull(db);
    return db;
}

/* A delivery for partner of the referral submitted with key. */
static void s_add_delivery(const char *key, const char *partner)
{
    char sql[1024];
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, rules_version)"
             " SELECT gen_random_uuid(), id, '%s', 'normal', payload,"
             " payload_hash, 'test' FROM referrals"
             " WHERE idempotency_key = '%s'",
             partner, key);
    PGresult *res = PQexec(s_db, sql);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK &&
                      strcmp(PQcmdTuples(res), "1") == 0,
                  "%s", PQresultErrorMessage(res));
    PQclear(res);
}

START_TEST(status_shows_an_offline_partners_backlog_growing)
{
    kh_client_t *client = s_client();
    for (int i = 0; i < 3; i++) {
        char key[32];
        snprintf(key, sizeof key, "status-%d", i);
        s_accept(client, key);
    }
    kh_client_destroy(&client);

    json_t *doc = NULL;
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert(json_is_true(json_object_get(doc, "ok")));
    json_t *intake = json_array_get(json_object_get(doc, "services"), 0);
    ck_assert_str_eq(json_string_value(json_object_get(intake, "state")), "up");
    ck_assert_str_eq(json_string_value(json_object_get(intake, "version")),
                     kh_version());
    ck_assert_int_eq(s_backlog(doc, "zorgcoordinator"), 0);
    /* No routing runs here: the three wait to be routed. */
    ck_assert_int_eq(json_integer_value(
                         json_object_get(s_db_doc(doc), "referrals_unrouted")),
                     3);
    ck_assert_ptr_nonnull(
        json_object_get(s_db_doc(doc), "referrals_unrouted_oldest"));
    json_decref(doc);
    khtest_db_exec(s_db,
                   "UPDATE referrals SET state = 'routed'"
                   " WHERE idempotency_key = 'status-0'",
                   0, NULL);
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert_int_eq(json_integer_value(
                         json_object_get(s_db_doc(doc), "referrals_unrouted")),
                     2);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "referrals_held")),
        0);
    json_decref(doc);
    /* One held back by routing (its writes failed), counted apart. */
    khtest_db_exec(s_db,
                   "UPDATE referrals SET held_until = now() + interval '1 hour'"
                   " WHERE idempotency_key = 'status-1'",
                   0, NULL);
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "referrals_held")),
        1);
    json_decref(doc);

    /* Nobody of the zorgcoordinator is connected: its deliveries wait. */
    s_add_delivery("status-0", "zorgcoordinator");
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert_int_eq(s_backlog(doc, "zorgcoordinator"), 1);
    ck_assert_int_eq(s_backlog(doc, "veilig-thuis"), 0);
    json_t *zc = json_array_get(json_object_get(doc, "partners"), 1);
    ck_assert_ptr_nonnull(json_object_get(zc, "oldest"));
    json_decref(doc);
    s_add_delivery("status-1", "zorgcoordinator");
    s_add_delivery("status-2", "zorgcoordinator");
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert_int_eq(s_backlog(doc, "zorgcoordinator"), 3);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "dead_letters")), 0);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "escalations_open")),
        0);
    json_decref(doc);
    /* One dead letter (out of the backlog) and one open escalation. */
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'dead',"
                   " dead_reason = 'max_attempts' WHERE referral_id ="
                   " (SELECT id FROM referrals"
                   "  WHERE idempotency_key = 'status-0')",
                   0, NULL);
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET escalated_at = now()"
                   " WHERE referral_id = (SELECT id FROM referrals"
                   "  WHERE idempotency_key = 'status-1')",
                   0, NULL);
    ck_assert_int_eq(s_status("none", &doc), 0);
    ck_assert_int_eq(s_backlog(doc, "zorgcoordinator"), 2);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "dead_letters")), 1);
    ck_assert_int_eq(
        json_integer_value(json_object_get(s_db_doc(doc), "escalations_open")),
        1);
    json_decref(doc);

    /* A service that does not answer makes status say so, exit 1. */
    char down[64];
    snprintf(down, sizeof down, "127.0.0.1:%d", khproc_free_port());
    ck_assert_int_eq(s_status(down, &doc), 1);
    ck_assert(json_is_false(json_object_get(doc, "ok")));
    json_t *routing = json_array_get(json_object_get(doc, "services"), 1);
    ck_assert_str_eq(json_string_value(json_object_get(routing, "state")),
                     "down");
    json_decref(doc);

    /* The text screen names the partner with its backlog. */
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                    "status",
                    "--intake",
                    s_health,
                    "--routing",
                    "none",
                    "--notification",
                    "none",
                    "--audit",
                    "none",
                    NULL};
    char *output = NULL;
    ck_assert_int_eq(khtest_run(argv, &output), 0);
    ck_assert_msg(strstr(output, "zorgcoordinator") &&
                      strstr(output, "intake        up"),
                  "%s", output);
    free(output);
}
END_TEST

/* Start service (routing or notification) with env; its pid. */
static pid_t s_start_service(const char *service, char *const *extra)
{
    char *env[16];
    size_t n = 0;
    static char env_db[1024], env_hub[600], env_dir[600], env_rules[600],
        env_schema[600];
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(env_hub, sizeof env_hub, "KH_HUB_CERT=%s", s_path("hub.cert"));
    snprintf(env_dir, sizeof env_dir, "KH_PARTNER_CERT_DIR=%s",
             s_path("partners"));
    snprintf(env_rules, sizeof env_rules, "KH_RULES_FILE=%s",
             khtest_src("schemas/rules/default.yaml"));
    snprintf(env_schema, sizeof env_schema, "KH_SCHEMA_DIR=%s",
             khtest_src("schemas"));
    env[n++] = env_db;
    env[n++] = env_hub;
    env[n++] = env_dir;
    env[n++] = env_rules;
    env[n++] = env_schema;
    env[n++] = "KH_NOTIFY_WAKE_ENDPOINT=none";
    env[n++] = "KH_LOG_LEVEL=debug";
    for (size_t i = 0; extra[i] && n < 15; i++)
        env[n++] = extra[i];
    env[n] = NULL;
    char binary[512], log[64];
    snprintf(binary, sizeof binary, "%s/services/%s/ketenhub-%s",
             KH_TEST_BINARY_DIR, service, service);
    snprintf(log, sizeof log, "%s.log", service);
    char *argv[] = {binary, NULL};
    pid_t pid = khproc_spawn(binary, argv, env, s_path(log));
    ck_assert_int_gt(pid, 0);
    return pid;
}

START_TEST(routing_and_notification_count_and_report_the_backlog)
{
    zcert_t *avim = zcert_new();
    khtest_register_partner(s_db, "avim", "police", true,
                            zcert_public_txt(avim));
    zcert_destroy(&avim);
    char routing_health[64], notify_health[64], env_rh[128], env_nh[128],
        env_pull[128], env_notify[128];
    snprintf(routing_health, sizeof routing_health, "127.0.0.1:%d",
             khproc_free_port());
    snprintf(notify_health, sizeof notify_health, "127.0.0.1:%d",
             khproc_free_port());
    snprintf(env_rh, sizeof env_rh, "KH_HEALTH_ENDPOINT=%s", routing_health);
    snprintf(env_nh, sizeof env_nh, "KH_HEALTH_ENDPOINT=%s", notify_health);
    snprintf(env_pull, sizeof env_pull,
             "KH_ROUTING_ENDPOINT=tcp://127.0.0.1:%d", khproc_free_port());
    snprintf(env_notify, sizeof env_notify,
             "KH_NOTIFY_ENDPOINT=tcp://127.0.0.1:%d", khproc_free_port());
    char *routing_env[] = {env_rh, env_pull, "KH_ROUTING_POLL_MS=200", NULL};
    char *notify_env[] = {env_nh, env_notify, NULL};
    pid_t routing = s_start_service("routing", routing_env);
    pid_t notify = s_start_service("notification", notify_env);
    ck_assert_msg(s_wait_status_at(routing_health, "/readyz", 200, 10000),
                  "routing not ready: see %s", s_path("routing.log"));
    ck_assert_msg(s_wait_status_at(notify_health, "/readyz", 200, 10000),
                  "notification not ready: see %s", s_path("notification.log"));
    char *body = NULL;
    ck_assert_int_eq(s_get_at(routing_health, "/readyz", &body), 200);
    ck_assert_ptr_nonnull(strstr(body, "ready routing "));
    /* It tells the rules version it routes by, and status shows it: the
     * trail has it from routing's start (nothing routed, nothing
     * reloaded). */
    const char *told = strstr(body, " rules=");
    /* The rules file's hash, a dot, the context's (schema, partners). */
    ck_assert_msg(told && strspn(told + 7, "0123456789abcdef") == 64 &&
                      told[7 + 64] == '.' &&
                      strspn(told + 7 + 65, "0123456789abcdef") == 32,
                  "%s", body);
    char rules[98];
    snprintf(rules, sizeof rules, "%.97s", told + 7);
    free(body);
    json_t *doc = NULL;
    s_status(routing_health, &doc);
    json_t *svc;
    size_t at;
    const char *shown = NULL;
    json_array_foreach(json_object_get(doc, "services"), at, svc)
    {
        if (strcmp(json_string_value(json_object_get(svc, "name")),
                   "routing") == 0)
            shown = json_string_value(json_object_get(svc, "rules_version"));
    }
    ck_assert_msg(shown && strcmp(shown, rules) == 0, "routing told %s",
                  shown ? shown : "nothing");
    json_decref(doc);
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                    "status",
                    "--intake",
                    s_health,
                    "--routing",
                    routing_health,
                    "--notification",
                    "none",
                    "--audit",
                    "none",
                    NULL};
    char *text = NULL;
    khtest_run(argv, &text);
    char want[256];
    snprintf(want, sizeof want, "rules version     %s\n", rules);
    ck_assert_msg(strstr(text, want), "%s", text);
    free(text);

    kh_client_t *client = s_client();
    enum { N = 3 };
    for (int i = 0; i < N; i++) {
        char key[32];
        snprintf(key, sizeof key, "routed-%d", i);
        s_accept(client, key);
    }
    kh_client_destroy(&client);
    ck_assert_msg(
        s_wait_metric(routing_health, "referrals_routed_total", N, 10000),
        "routed: %g", khtest_metric(routing_health, "referrals_routed_total"));
    ck_assert_double_eq(
        khtest_metric(routing_health, "deliveries_created_total"),
        (double) khtest_db_count(s_db, "SELECT count(*) FROM deliveries"));
    ck_assert(khtest_metric(routing_health, "routing_pass_seconds_count") >= 1);

    /* No partner is connected: the backlog per partner is what routing
     * created for it, read by notification's probe. */
    long zc = khtest_db_count(s_db, "SELECT count(*) FROM deliveries"
                                    " WHERE partner_id = 'zorgcoordinator'");
    ck_assert_int_gt(zc, 0);
    ck_assert_msg(
        s_wait_metric(notify_health,
                      "deliveries_backlog{partner=\"zorgcoordinator\"}",
                      (double) zc, 10000),
        "backlog not reported");
    ck_assert(khtest_metric(notify_health,
                            "deliveries_oldest_unacked_seconds{partner="
                            "\"zorgcoordinator\"}") >= 0);

    /* The zorgcoordinator comes online and acknowledges one delivery:
     * sent, acknowledged and its wait are counted, its backlog shrinks. */
    kh_error_t err;
    kh_client_t *zc_client =
        kh_client_new(env_notify + strlen("KH_NOTIFY_ENDPOINT="),
                      s_path("hub.cert"), s_path("zc.cert"), &err);
    ck_assert_msg(zc_client != NULL, "%s", err.message);
    ck_assert_int_eq(kh_client_hello(zc_client, 1, &err), 0);
    char acked_id[64] = "";
    bool acked = false;
    for (int i = 0; i < 50 && !acked; i++) {
        json_t *msg = kh_client_recv(zc_client, 200, &err);
        const char *cmd = msg ? kh_client_reply_cmd(msg) : "";
        if (strcmp(cmd, "DELIVER") == 0 && !*acked_id) {
            snprintf(acked_id, sizeof acked_id, "%s",
                     json_string_value(json_object_get(msg, "delivery_id")));
            ck_assert_int_eq(kh_client_ack(zc_client, acked_id, &err), 0);
        } else if (strcmp(cmd, "ACKED") == 0)
            acked = true;
        else if (!msg)
            kh_client_hello(zc_client, 1, &err);
        json_decref(msg);
    }
    kh_client_destroy(&zc_client);
    ck_assert_msg(acked, "no ACKED for %s", acked_id);
    ck_assert(khtest_metric(notify_health, "deliveries_sent_total") >= 1);
    ck_assert_double_eq(khtest_metric(notify_health, "deliveries_acked_total"),
                        1);
    ck_assert_double_eq(
        khtest_metric(notify_health, "delivery_ack_seconds_count"), 1);
    ck_assert_msg(
        s_wait_metric(notify_health,
                      "deliveries_backlog{partner=\"zorgcoordinator\"}",
                      (double) zc - 1, 10000),
        "backlog did not shrink");

    /* A reload is counted. */
    kill(routing, SIGHUP);
    ck_assert(s_wait_metric(routing_health,
                            "rules_reloads_total{outcome=\"ok\"}", 1, 5000));

    int status = khproc_stop(routing, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    status = khproc_stop(notify, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* status with intake's and notify's health endpoints (routing and audit
 * skipped): its JSON document into *doc, its text into *text. */
static void s_status_keys(const char *notify, json_t **doc, char **text)
{
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    char *json_out = NULL;
    KHTEST_CTL(&json_out, "status", "--json", "--intake", s_health, "--routing",
               "none", "--notification", notify, "--audit", "none");
    json_error_t jerr;
    *doc = json_loads(json_out, 0, &jerr);
    ck_assert_msg(*doc != NULL, "not JSON: %s", json_out);
    free(json_out);
    KHTEST_CTL(text, "status", "--intake", s_health, "--routing", "none",
               "--notification", notify, "--audit", "none");
}

/* notification on free ports with the hub key at hub.cert and, when
 * next is not NULL, the next one served on an endpoint of its own; ready
 * within 10 s. Its health endpoint goes to health. */
static pid_t s_start_notification_keys(const char *next, char *health,
                                       size_t size)
{
    snprintf(health, size, "127.0.0.1:%d", khproc_free_port());
    static char env_health[128], env_endpoint[128], env_next[600],
        env_next_endpoint[128];
    snprintf(env_health, sizeof env_health, "KH_HEALTH_ENDPOINT=%s", health);
    snprintf(env_endpoint, sizeof env_endpoint,
             "KH_NOTIFY_ENDPOINT=tcp://127.0.0.1:%d", khproc_free_port());
    snprintf(env_next, sizeof env_next, "KH_HUB_CERT_NEXT=%s",
             next ? next : "none");
    snprintf(env_next_endpoint, sizeof env_next_endpoint,
             "KH_NOTIFY_ENDPOINT_NEXT=tcp://127.0.0.1:%d", khproc_free_port());
    char *env[] = {env_health, env_endpoint, env_next, env_next_endpoint, NULL};
    pid_t pid = s_start_service("notification", env);
    ck_assert_msg(s_wait_status_at(health, "/readyz", 200, 10000),
                  "notification not ready: see %s", s_path("notification.log"));
    return pid;
}

/* The hub keys each service serves: /readyz tells them (the public
 * halves), status groups them by key, shows the next key while one is
 * served, and says so when intake and notification serve different
 * current keys (partners of one connect with a key the other refuses). */
START_TEST(status_shows_the_hub_keys_served)
{
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    ck_assert_ptr_nonnull(hub);
    char current[41];
    snprintf(current, sizeof current, "%s", zcert_public_txt(hub));
    zcert_destroy(&hub);
    zcert_t *next = zcert_new();
    zcert_save(next, s_path("next.cert"));
    char upcoming[41];
    snprintf(upcoming, sizeof upcoming, "%s", zcert_public_txt(next));
    zcert_destroy(&next);

    char *body = NULL, want[256];
    ck_assert_int_eq(s_get("/readyz", &body), 200);
    snprintf(want, sizeof want, "ready intake %s hub_key=%s\n", kh_version(),
             current);
    ck_assert_str_eq(body, want);
    free(body);

    char notify_health[64];
    pid_t notify = s_start_notification_keys(s_path("next.cert"), notify_health,
                                             sizeof notify_health);
    ck_assert_int_eq(s_get_at(notify_health, "/readyz", &body), 200);
    snprintf(want, sizeof want,
             "ready notification %s hub_key=%s hub_key_next=%s\n", kh_version(),
             current, upcoming);
    ck_assert_str_eq(body, want);
    free(body);

    json_t *doc = NULL;
    char *text = NULL;
    s_status_keys(notify_health, &doc, &text);
    json_t *expect =
        json_pack("{s:[{s:s, s:[s, s]}], s:[{s:s, s:[s]}], s:b}", "current",
                  "key", current, "services", "intake", "notification", "next",
                  "key", upcoming, "services", "notification", "differ", false);
    ck_assert_msg(json_equal(json_object_get(doc, "hub_keys"), expect), "%s",
                  text);
    json_decref(expect);
    json_decref(doc);
    snprintf(want, sizeof want,
             "\nhub key           %s (intake, notification)\n"
             "next hub key      %s (notification)\n",
             current, upcoming);
    ck_assert_msg(strstr(text, want), "%s", text);
    ck_assert_msg(!strstr(text, "DIFFER"), "%s", text);
    free(text);
    int status = khproc_stop(notify, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);

    /* notification restarted with another key than intake's, and no next
     * one. */
    zcert_t *other = zcert_new();
    zcert_save(other, s_path("hub.cert"));
    char elsewhere[41];
    snprintf(elsewhere, sizeof elsewhere, "%s", zcert_public_txt(other));
    zcert_destroy(&other);
    notify =
        s_start_notification_keys(NULL, notify_health, sizeof notify_health);
    s_status_keys(notify_health, &doc, &text);
    expect = json_pack("{s:[{s:s, s:[s]}, {s:s, s:[s]}], s:[], s:b}", "current",
                       "key", current, "services", "intake", "key", elsewhere,
                       "services", "notification", "next", "differ", true);
    ck_assert_msg(json_equal(json_object_get(doc, "hub_keys"), expect), "%s",
                  text);
    json_decref(expect);
    json_decref(doc);
    snprintf(want, sizeof want,
             "\nhub key           %s (intake)\n                  %s "
             "(notification)\nHUB KEYS DIFFER ",
             current, elsewhere);
    ck_assert_msg(strstr(text, want), "%s", text);
    ck_assert_msg(strstr(text, "\nnext hub key      none\n"), "%s", text);
    free(text);
    status = khproc_stop(notify, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
END_TEST

/* One rules event of routing, minutes_ago minutes ago. */
static void s_rules_event(const char *action, const char *outcome,
                          const char *version, const char *code,
                          const char *path, int minutes_ago)
{
    char ago[16];
    snprintf(ago, sizeof ago, "%d", minutes_ago);
    const char *params[] = {action, outcome, version, code, path, ago};
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (at, actor_kind, actor_id,"
                   " action, outcome, rules_version, reason_code,"
                   " reason_path, origin_service) VALUES (now() -"
                   " make_interval(mins => $6::int), 'service', 'routing',"
                   " $1, $2, $3, $4, $5, 'routing')",
                   6, params);
}

/* A refused reload shows in status while the rules it kept are in
 * force, also once the partners they route with changed, and no longer
 * once a reload succeeded. */
START_TEST(status_shows_a_refused_reload_until_rules_load)
{
    s_rules_event("rules.reloaded", "ok", "v1.c1", NULL, NULL, 4);
    s_rules_event("rules.reload_failed", "failed", "v1.c1",
                  "rules.unknown_field", "rules[0].when.agee", 3);
    s_rules_event("rules.reloaded", "ok", "v1.c2", "partners_changed", NULL, 2);
    json_t *doc = NULL;
    ck_assert_int_eq(s_status("none", &doc), 0);
    json_t *db = json_object_get(doc, "database");
    ck_assert_str_eq(json_string_value(json_object_get(db, "rules_version")),
                     "v1.c2");
    ck_assert_str_eq(
        json_string_value(json_object_get(db, "rules_reload_refused_code")),
        "rules.unknown_field");
    ck_assert_str_eq(
        json_string_value(json_object_get(db, "rules_reload_refused_path")),
        "rules[0].when.agee");
    json_decref(doc);

    setenv("KH_DATABASE_URL", s_conninfo, 1);
    char *output = NULL;
    ck_assert_int_eq(KHTEST_CTL(&output, "status", "--intake", s_health,
                                "--routing", "none", "--notification", "none",
                                "--audit", "none"),
                     0);
    ck_assert_msg(strstr(output, "RULES REFUSED") &&
                      strstr(output, "rules.unknown_field at "
                                     "rules[0].when.agee"),
                  "%s", output);
    free(output);

    s_rules_event("rules.reloaded", "ok", "v2.c2", NULL, NULL, 1);
    ck_assert_int_eq(s_status("none", &doc), 0);
    db = json_object_get(doc, "database");
    ck_assert_str_eq(json_string_value(json_object_get(db, "rules_version")),
                     "v2.c2");
    ck_assert_ptr_null(json_object_get(db, "rules_reload_refused_at"));
    json_decref(doc);
}
END_TEST

/* ketenhubctl status of the database alone (no service asked): its exit
 * status, its output in *output (the caller frees it). */
static int s_status_db_only(char **output)
{
    return KHTEST_CTL(output, "status", "--intake", "none", "--routing", "none",
                      "--notification", "none", "--audit", "none");
}

/* status says when PostgreSQL does not keep what it commits (fsync or
 * synchronous_commit off, as on the test cluster): a crash of the database
 * then loses referrals answered ACCEPTED and deliveries a partner already
 * stored, and only this says so. It reads the settings the hub's own
 * sessions get (a database's setting counts). */
START_TEST(status_says_when_the_database_is_not_durable)
{
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    char ctl[512];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    char *output = NULL;
    s_status_db_only(&output);
    ck_assert_msg(strstr(output, "NOT DURABLE") &&
                      strstr(output, "synchronous_commit=off") &&
                      strstr(output, "fsync=off"),
                  "status said: %s", output);
    free(output);
    khtest_db_exec(s_db, "ALTER DATABASE " S_DB " SET synchronous_commit = on",
                   0, NULL);
    s_status_db_only(&output);
    khtest_db_exec(s_db, "ALTER DATABASE " S_DB " RESET synchronous_commit", 0,
                   NULL);
    ck_assert_msg(!strstr(output, "synchronous_commit=off") &&
                      strstr(output, "NOT DURABLE: fsync=off"),
                  "status said: %s", output);
    free(output);
    char *json_argv[] = {"/bin/sh", "-c",
                         "exec \"$0\" status --json --intake none --routing "
                         "none --notification none --audit none 2>/dev/null",
                         ctl, NULL};
    khtest_run(json_argv, &output);
    json_t *doc = json_loads(output, 0, NULL);
    ck_assert_msg(doc != NULL, "not JSON: %s", output);
    free(output);
    const char *why = json_string_value(
        json_object_get(json_object_get(doc, "database"), "not_durable"));
    ck_assert_ptr_nonnull(why);
    ck_assert_ptr_nonnull(strstr(why, "fsync=off"));
    json_decref(doc);
    unsetenv("KH_DATABASE_URL");
}
END_TEST

/* Against a database that was never migrated, status says so and shows
 * none of the numbers it could not read; --json stays one document. */
START_TEST(status_says_when_the_database_is_not_migrated)
{
    PGconn *bare = khtest_db_empty(S_BARE);
    char *conninfo = khtest_db_conninfo(S_BARE);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    char ctl[512];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    char *output = NULL;
    ck_assert_int_eq(s_status_db_only(&output), 1);
    ck_assert_msg(strstr(output, "not migrated") &&
                      !strstr(output, "dead letters") &&
                      !strstr(output, "trail head"),
                  "status said: %s", output);
    /* Said once, in its own words: not the server's error as well. */
    ck_assert_msg(!strstr(output, "ERROR") &&
                      !strstr(output, "does not exist") &&
                      !strstr(output, "LINE 1"),
                  "status said: %s", output);
    free(output);
    char *json_all[] = {"/bin/sh", "-c",
                        "exec \"$0\" status --json --intake none --routing "
                        "none --notification none --audit none 2>&1 >/dev/null",
                        ctl, NULL};
    ck_assert_int_eq(khtest_run(json_all, &output), 1);
    ck_assert_msg(!strstr(output, "does not exist"), "stderr: %s", output);
    free(output);
    char *json_argv[] = {"/bin/sh", "-c",
                         "exec \"$0\" status --json --intake none --routing "
                         "none --notification none --audit none 2>/dev/null",
                         ctl, NULL};
    ck_assert_int_eq(khtest_run(json_argv, &output), 1);
    json_error_t jerr;
    json_t *doc = json_loads(output, 0, &jerr);
    ck_assert_msg(doc != NULL, "not JSON: %s", output);
    free(output);
    const json_t *db = json_object_get(doc, "database");
    ck_assert(json_is_true(json_object_get(db, "reachable")));
    ck_assert(json_is_false(json_object_get(doc, "ok")));
    const char *error = json_string_value(json_object_get(db, "error"));
    ck_assert_msg(error && strstr(error, "ketenhubctl migrate"), "error: %s",
                  error ? error : "(none)");
    ck_assert_ptr_null(json_object_get(db, "dead_letters"));
    json_decref(doc);
    PQfinish(bare);

    /* A failure that is not a missing schema stays visible: a login that
     * may not read the trail sees the server's reason on stderr. */
    khtest_db_exec(s_db,
                   "DO $$ BEGIN CREATE ROLE kh_test_health_nobody LOGIN;"
                   " EXCEPTION WHEN duplicate_object OR unique_violation"
                   " THEN NULL; END $$",
                   0, NULL);
    char nobody[1400];
    snprintf(nobody, sizeof nobody, "%s user=kh_test_health_nobody",
             s_conninfo);
    setenv("KH_DATABASE_URL", nobody, 1);
    ck_assert_int_eq(s_status_db_only(&output), 1);
    ck_assert_msg(strstr(output, "permission denied") &&
                      !strstr(output, "not migrated"),
                  "status said: %s", output);
    free(output);
    setenv("KH_DATABASE_URL", s_conninfo, 1);
}
END_TEST

/* Each service binary with one bad setting: exit 2 naming it. */
/* Whether a line of output other than the settings' own log lines
 * (event=config names every variable) names variable. */
static bool s_names(const char *output, const char *variable)
{
    for (const char *line = output; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t) (end - line) : strlen(line);
        char *copy = strndup(line, len);
        ck_assert_ptr_nonnull(copy);
        bool named = strstr(copy, variable) && !strstr(copy, "event=config");
        free(copy);
        if (named)
            return true;
        line = end ? end + 1 : NULL;
    }
    return false;
}

START_TEST(a_bad_setting_exits_2_naming_the_variable)
{
    static const struct {
        const char *binary, *variable, *value;
    } cases[] = {
        {"services/intake/ketenhub-intake", "KH_HEALTH_ENDPOINT", "nowhere"},
        {"services/intake/ketenhub-intake", "KH_HEALTH_ENDPOINT", "host:99999"},
        {"services/intake/ketenhub-intake", "KH_MAX_FRAME", "lots"},
        {"services/routing/ketenhub-routing", "KH_HEALTH_ENDPOINT", "nowhere"},
        {"services/routing/ketenhub-routing", "KH_ROUTING_BATCH", "0"},
        {"services/notification/ketenhub-notification", "KH_HEALTH_ENDPOINT",
         "nowhere"},
        {"services/notification/ketenhub-notification", "KH_NOTIFY_WINDOW",
         "many"},
        {"services/audit/ketenhub-audit", "KH_HEALTH_ENDPOINT", "nowhere"},
        {"services/audit/ketenhub-audit", "KH_LOG_LEVEL", "loud"},
    };
    /* Required settings with placeholder values, so that the one under
     * test is the first wrong one. */
    setenv("KH_HUB_CERT", "/nonexistent/hub.cert", 1);
    setenv("KH_PARTNER_CERT_DIR", "/nonexistent", 1);
    setenv("KH_AUDIT_KEY", "/nonexistent/hub-audit.key", 1);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv(cases[i].variable, cases[i].value, 1);
        char path[512];
        snprintf(path, sizeof path, "%s/%s", KH_TEST_BINARY_DIR,
                 cases[i].binary);
        char *argv[] = {path, NULL};
        char *output = NULL;
        int status = khtest_run(argv, &output);
        ck_assert_msg(status == 2 && s_names(output, cases[i].variable),
                      "%s with %s=%s: exit %d: %s", cases[i].binary,
                      cases[i].variable, cases[i].value, status, output);
        free(output);
        unsetenv(cases[i].variable);
    }
}
END_TEST

/* Every other setting good and the database out of reach: a bad path,
 * endpoint or password file still stops each service at once with exit
 * 2, in a line that names the variable, and never waits for PostgreSQL. */
START_TEST(a_bad_path_or_endpoint_exits_2_before_the_database)
{
    static const struct {
        const char *service, *variable, *value;
    } cases[] = {
        {"intake", "KH_INTAKE_ENDPOINT", "tcp://127.0.0.1:99999"},
        {"intake", "KH_INTAKE_ENDPOINT", "tcp://127.0.0.1:7701 "},
        {"intake", "KH_ROUTING_ENDPOINT", "tcp://127.0.0.1:70000"},
        {"intake", "KH_SCHEMA_DIR", "/nonexistent"},
        {"intake", "KH_DATABASE_PASSWORD_FILE", "/nonexistent"},
        {"intake", "KH_DATABASE_PASSWORD_FILE", "/tmp"},
        {"routing", "KH_ROUTING_ENDPOINT", "tcp://127.0.0.1:99999"},
        {"routing", "KH_ROUTING_ENDPOINT", "nowhere"},
        {"routing", "KH_NOTIFY_WAKE_ENDPOINT", "tcp://127.0.0.1:65536"},
        {"routing", "KH_HUB_CERT", "/nonexistent/hub.cert"},
        {"routing", "KH_RULES_FILE", "/nonexistent/rules.yaml"},
        {"routing", "KH_SCHEMA_DIR", "/nonexistent"},
        {"routing", "KH_DATABASE_PASSWORD_FILE", "/nonexistent"},
        {"notification", "KH_NOTIFY_ENDPOINT", "tcp://*:99999"},
        {"notification", "KH_NOTIFY_WAKE_ENDPOINT", "tcp://127.0.0.1:x"},
        {"notification", "KH_DATABASE_PASSWORD_FILE", "/nonexistent"},
        {"audit", "KH_AUDIT_KEY", "/nonexistent/hub-audit.key"},
        {"audit", "KH_DATABASE_PASSWORD_FILE", "/nonexistent"},
        {"intake", "KH_DATABASE_URL", "host=127.0.0.1 prot=1"},
        {"routing", "KH_DATABASE_URL", "host=127.0.0.1 port"},
        {"notification", "KH_DATABASE_URL", "postgresql://h:1/d?bogus=1"},
        {"audit", "KH_DATABASE_URL", "host='127.0.0.1"},
        /* The health endpoint's port in digits only. */
        {"intake", "KH_HEALTH_ENDPOINT", "127.0.0.1: 9701"},
        {"routing", "KH_HEALTH_ENDPOINT", "127.0.0.1:+9702"},
        {"audit", "KH_HEALTH_ENDPOINT", "127.0.0.1:97040"},
        /* A socket partners connect to cannot be none (as a wake-up
         * can): the error offers no "none" either. */
        {"intake", "KH_INTAKE_ENDPOINT", "none"},
        {"routing", "KH_ROUTING_ENDPOINT", "none"},
        {"notification", "KH_NOTIFY_ENDPOINT", "none"},
    };
    char *output = NULL;
    ck_assert_int_eq(
        KHTEST_CTL(&output, "audit", "keygen", "--out", s_path("audit")), 0);
    free(output);
    char port[4][32];
    for (int i = 0; i < 4; i++)
        snprintf(port[i], sizeof port[i], "tcp://127.0.0.1:%d",
                 khproc_free_port());
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        /* Port 1 refuses at once; nothing may wait for it. */
        setenv("KH_DATABASE_URL", "host=127.0.0.1 port=1", 1);
        setenv("KH_HUB_CERT", s_path("hub.cert"), 1);
        setenv("KH_PARTNER_CERT_DIR", s_path("partners"), 1);
        setenv("KH_AUDIT_KEY", s_path("audit/hub-audit.key"), 1);
        setenv("KH_SCHEMA_DIR", khtest_src("schemas"), 1);
        setenv("KH_RULES_FILE", khtest_src("schemas/rules/default.yaml"), 1);
        setenv("KH_HEALTH_ENDPOINT", "none", 1);
        setenv("KH_INTAKE_ENDPOINT", port[0], 1);
        setenv("KH_ROUTING_ENDPOINT", port[1], 1);
        setenv("KH_NOTIFY_ENDPOINT", port[2], 1);
        setenv("KH_NOTIFY_WAKE_ENDPOINT", port[3], 1);
        setenv(cases[i].variable, cases[i].value, 1);
        char path[512];
        snprintf(path, sizeof path, "%s/services/%s/ketenhub-%s",
                 KH_TEST_BINARY_DIR, cases[i].service, cases[i].service);
        char *argv[] = {"/usr/bin/timeout", "-s", "KILL", "5", path, NULL};
        int status = khtest_run(argv, &output);
        ck_assert_msg(status == 2 && s_names(output, cases[i].variable),
                      "%s with %s=%s: exit %d: %s", cases[i].service,
                      cases[i].variable, cases[i].value, status, output);
        if (strcmp(cases[i].value, "none") == 0)
            ck_assert_msg(strstr(output, "must be a ZeroMQ endpoint") &&
                              !strstr(output, "or none"),
                          "%s=none: %s", cases[i].variable, output);
        free(output);
        unsetenv(cases[i].variable);
    }
    unsetenv("KH_DATABASE_PASSWORD_FILE");
    static const char *const set[] = {
        "KH_HUB_CERT",        "KH_PARTNER_CERT_DIR",
        "KH_AUDIT_KEY",       "KH_SCHEMA_DIR",
        "KH_RULES_FILE",      "KH_HEALTH_ENDPOINT",
        "KH_INTAKE_ENDPOINT", "KH_ROUTING_ENDPOINT",
        "KH_NOTIFY_ENDPOINT", "KH_NOTIFY_WAKE_ENDPOINT"};
    for (size_t i = 0; i < sizeof set / sizeof set[0]; i++)
        unsetenv(set[i]);
    setenv("KH_DATABASE_URL", s_conninfo, 1);
}
END_TEST

/* Key files and directories that the service's user may not read (a
 * mount owned by another uid, a secret made 0600 by root): exit 2 at
 * start, naming the variable and why, instead of a service that says it
 * is ready and refuses every partner's handshake. Root reads everything,
 * so as root the services run as nobody here. */
START_TEST(an_unreadable_key_directory_or_secret_exits_2)
{
    char *dir = khtest_tmpdir();
    ck_assert_int_eq(chmod(dir, 0755), 0);
    ck_assert_int_eq(khproc_sh("cp '%s' '%s_secret' '%s/' && mkdir '%s/closed'"
                               " && cp '%s' '%s/hub2.cert'"
                               " && cp '%s_secret' '%s/hub2.cert_secret'"
                               " && chmod 0644 '%s/hub.cert' "
                               "'%s/hub.cert_secret' '%s/hub2.cert'"
                               " && chmod 0 '%s/closed' '%s/hub2.cert_secret'",
                               s_path("hub.cert"), s_path("hub.cert"), dir, dir,
                               s_path("hub.cert"), dir, s_path("hub.cert"), dir,
                               dir, dir, dir, dir, dir),
                     0);
    char readable_hub[512], closed[512], closed_hub[512], open_dir[512];
    snprintf(readable_hub, sizeof readable_hub, "%s/hub.cert", dir);
    snprintf(closed, sizeof closed, "%s/closed", dir);
    snprintf(closed_hub, sizeof closed_hub, "%s/hub2.cert", dir);
    snprintf(open_dir, sizeof open_dir, "%s", dir);
    const struct {
        const char *service, *variable, *hub, *partners, *says;
    } cases[] = {
        {"intake", "KH_PARTNER_CERT_DIR", readable_hub, closed,
         "cannot read the directory"},
        {"notification", "KH_PARTNER_CERT_DIR", readable_hub, closed,
         "cannot read the directory"},
        {"intake", "KH_HUB_CERT", closed_hub, open_dir,
         "hub2.cert_secret: Permission denied"},
    };
    char port[3][32];
    for (int i = 0; i < 3; i++)
        snprintf(port[i], sizeof port[i], "tcp://127.0.0.1:%d",
                 khproc_free_port());
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv("KH_DATABASE_URL", "host=127.0.0.1 port=1", 1);
        setenv("KH_HUB_CERT", cases[i].hub, 1);
        setenv("KH_PARTNER_CERT_DIR", cases[i].partners, 1);
        setenv("KH_SCHEMA_DIR", khtest_src("schemas"), 1);
        setenv("KH_HEALTH_ENDPOINT", "none", 1);
        setenv("KH_INTAKE_ENDPOINT", port[0], 1);
        setenv("KH_ROUTING_ENDPOINT", "none", 1);
        setenv("KH_NOTIFY_ENDPOINT", port[1], 1);
        setenv("KH_NOTIFY_WAKE_ENDPOINT", port[2], 1);
        char path[512];
        snprintf(path, sizeof path, "%s/services/%s/ketenhub-%s",
                 KH_TEST_BINARY_DIR, cases[i].service, cases[i].service);
        char *as_root[] = {"/usr/bin/setpriv",
                           "--reuid=65534",
                           "--regid=65534",
                           "--clear-groups",
                           "/usr/bin/timeout",
                           "-s",
                           "KILL",
                           "5",
                           path,
                           NULL};
        char *output = NULL;
        int status =
            khtest_run(geteuid() == 0 ? as_root : as_root + 4, &output);
        ck_assert_msg(
            status == 2 && s_names(output, cases[i].variable) &&
                strstr(output, cases[i].says),
            "%s with %s=%s: exit %d: %s", cases[i].service, cases[i].variable,
            strcmp(cases[i].variable, "KH_HUB_CERT") == 0 ? cases[i].hub
                                                          : cases[i].partners,
            status, output);
        free(output);
    }
    static const char *const set[] = {
        "KH_HUB_CERT",        "KH_PARTNER_CERT_DIR",    "KH_SCHEMA_DIR",
        "KH_HEALTH_ENDPOINT", "KH_INTAKE_ENDPOINT",     "KH_ROUTING_ENDPOINT",
        "KH_NOTIFY_ENDPOINT", "KH_NOTIFY_WAKE_ENDPOINT"};
    for (size_t i = 0; i < sizeof set / sizeof set[0]; i++)
        unsetenv(set[i]);
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* An endpoint that another process holds: exit 2 naming the variable,
 * and saying why, so that the administrator looks for that process
 * rather than at the value. */
START_TEST(an_endpoint_in_use_exits_2_saying_so)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *) &sa, sizeof sa), 0);
    ck_assert_int_eq(listen(fd, 1), 0);
    socklen_t len = sizeof sa;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *) &sa, &len), 0);
    char held[64];
    snprintf(held, sizeof held, "tcp://127.0.0.1:%d", ntohs(sa.sin_port));
    static const struct {
        const char *service, *variable;
    } cases[] = {
        {"intake", "KH_INTAKE_ENDPOINT"},
        {"routing", "KH_ROUTING_ENDPOINT"},
        {"notification", "KH_NOTIFY_ENDPOINT"},
        {"notification", "KH_NOTIFY_WAKE_ENDPOINT"},
    };
    char port[4][32];
    for (int i = 0; i < 4; i++)
        snprintf(port[i], sizeof port[i], "tcp://127.0.0.1:%d",
                 khproc_free_port());
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        setenv("KH_DATABASE_URL", "host=127.0.0.1 port=1", 1);
        setenv("KH_HUB_CERT", s_path("hub.cert"), 1);
        setenv("KH_PARTNER_CERT_DIR", s_path("partners"), 1);
        setenv("KH_SCHEMA_DIR", khtest_src("schemas"), 1);
        setenv("KH_RULES_FILE", khtest_src("schemas/rules/default.yaml"), 1);
        setenv("KH_HEALTH_ENDPOINT", "none", 1);
        setenv("KH_INTAKE_ENDPOINT", port[0], 1);
        setenv("KH_ROUTING_ENDPOINT", port[1], 1);
        setenv("KH_NOTIFY_ENDPOINT", port[2], 1);
        setenv("KH_NOTIFY_WAKE_ENDPOINT", port[3], 1);
        setenv(cases[i].variable, held, 1);
        char path[512];
        snprintf(path, sizeof path, "%s/services/%s/ketenhub-%s",
                 KH_TEST_BINARY_DIR, cases[i].service, cases[i].service);
        char *argv[] = {"/usr/bin/timeout", "-s", "KILL", "5", path, NULL};
        char *output = NULL;
        int status = khtest_run(argv, &output);
        ck_assert_msg(status == 2 && s_names(output, cases[i].variable) &&
                          strstr(output, "Address already in use"),
                      "%s with %s=%s held: exit %d: %s", cases[i].service,
                      cases[i].variable, held, status, output);
        free(output);
    }
    close(fd);
    static const char *const set[] = {"KH_HUB_CERT",
                                      "KH_PARTNER_CERT_DIR",
                                      "KH_SCHEMA_DIR",
                                      "KH_RULES_FILE",
                                      "KH_HEALTH_ENDPOINT",
                                      "KH_INTAKE_ENDPOINT",
                                      "KH_ROUTING_ENDPOINT",
                                      "KH_NOTIFY_ENDPOINT",
                                      "KH_NOTIFY_WAKE_ENDPOINT"};
    for (size_t i = 0; i < sizeof set / sizeof set[0]; i++)
        unsetenv(set[i]);
    setenv("KH_DATABASE_URL", s_conninfo, 1);
}
END_TEST

/* KH_HEALTH_ENDPOINT set but empty means its default, as for every
 * setting: one that cannot be bound is logged, and the service runs
 * (two replicas on one host), instead of stopping as a value set would. */
START_TEST(an_empty_health_endpoint_is_the_default)
{
    /* Audit's default, 127.0.0.1:9704, held here (or by someone else). */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons(9704),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *) &sa, sizeof sa) == 0)
        ck_assert_int_eq(listen(fd, 1), 0);
    else
        ck_assert_int_eq(errno, EADDRINUSE);
    char *output = NULL;
    ck_assert_int_eq(
        KHTEST_CTL(&output, "audit", "keygen", "--out", s_path("audit")), 0);
    free(output);
    setenv("KH_AUDIT_KEY", s_path("audit/hub-audit.key"), 1);
    setenv("KH_HEALTH_ENDPOINT", "", 1);
    char path[512];
    snprintf(path, sizeof path, "%s/services/audit/ketenhub-audit",
             KH_TEST_BINARY_DIR);
    char *argv[] = {"/usr/bin/timeout", "2", path, NULL};
    int status = khtest_run(argv, &output);
    ck_assert_msg(status == 124 && strstr(output, "event=health_unbound"),
                  "exit %d: %s", status, output);
    free(output);
    unsetenv("KH_HEALTH_ENDPOINT");
    unsetenv("KH_AUDIT_KEY");
    close(fd);
}
END_TEST

/* Each line of text must be a line of the README. */
static void s_assert_lines_in(const char *readme, const char *text,
                              const char *what)
{
    char *copy = strdup(text);
    ck_assert_ptr_nonnull(copy);
    int lines = 0;
    for (char *save = NULL, *line = strtok_r(copy, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save), lines++) {
        char want[2048];
        snprintf(want, sizeof want, "\n%s\n", line);
        ck_assert_msg(strstr(readme, want), "README.md lacks this %s line:\n%s",
                      what, line);
    }
    ck_assert_int_gt(lines, 10);
    free(copy);
}

/* The README's configuration reference and metrics table are what the
 * code says; every binary names its version. */
START_TEST(readme_names_every_setting_and_metric)
{
    char *readme = khtest_read_file(khtest_src("README.md"));
    ck_assert_ptr_nonnull(readme);
    char script[600];
    snprintf(script, sizeof script, "%s",
             khtest_src("scripts/config-reference.sh"));
    char *argv[] = {"/bin/sh", script, KH_TEST_BINARY_DIR, NULL};
    char *output = NULL;
    ck_assert_int_eq(khtest_run(argv, &output), 0);
    s_assert_lines_in(readme, output, "configuration");
    ck_assert_ptr_nonnull(strstr(output, "| `KH_HEALTH_ENDPOINT` | audit |"));
    free(output);

    char *table = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&table, &size);
    ck_assert_ptr_nonnull(out);
    kh_metrics_table(out);
    fclose(out);
    s_assert_lines_in(readme, table, "metrics");
    free(table);
    free(readme);

    static const char *binaries[] = {
        "services/intake/ketenhub-intake", "services/routing/ketenhub-routing",
        "services/notification/ketenhub-notification",
        "services/audit/ketenhub-audit", "tools/ctl/ketenhubctl"};
    for (size_t i = 0; i < sizeof binaries / sizeof binaries[0]; i++) {
        char path[600];
        snprintf(path, sizeof path, "%s/%s", KH_TEST_BINARY_DIR, binaries[i]);
        char *vargv[] = {path, "--version", NULL};
        ck_assert_int_eq(khtest_run(vargv, &output), 0);
        ck_assert_msg(strstr(output, kh_version()), "%s: %s", binaries[i],
                      output);
        free(output);
    }
}
END_TEST

/* An endpoint for status or health that is no HOST:PORT is a usage
 * error (exit 2, naming where it came from), not a service reported down
 * (exit 1): a typo must not read as an outage. */
START_TEST(status_and_health_refuse_an_endpoint_that_is_no_host_port)
{
    char *output = NULL;
    ck_assert_int_eq(KHTEST_CTL(&output, "status", "--intake", "intake"), 2);
    ck_assert_msg(strstr(output, "--intake 'intake' is not HOST:PORT"), "%s",
                  output);
    free(output);
    ck_assert_int_eq(
        KHTEST_CTL(&output, "status", "--audit", "127.0.0.1:99999"), 2);
    free(output);
    /* A byte that is no printable ASCII (no UTF-8 at all, here): refused,
     * never a service missing from the report. */
    ck_assert_int_eq(KHTEST_CTL(&output, "status", "--routing",
                                "127.0.0.\xff"
                                "1:9702"),
                     2);
    ck_assert_msg(strstr(output, "--routing '"), "%s", output);
    free(output);
    ck_assert_int_eq(KHTEST_CTL(&output, "health",
                                "127.0.0.1\x01"
                                ":9701"),
                     2);
    free(output);
    setenv("KH_NOTIFY_HEALTH", "9703", 1);
    ck_assert_int_eq(KHTEST_CTL(&output, "status"), 2);
    ck_assert_msg(strstr(output, "KH_NOTIFY_HEALTH '9703'"), "%s", output);
    free(output);
    unsetenv("KH_NOTIFY_HEALTH");
    ck_assert_int_eq(KHTEST_CTL(&output, "health", "nonsense"), 2);
    ck_assert_msg(strstr(output, "'nonsense' is not HOST:PORT"), "%s", output);
    free(output);
    ck_assert_int_eq(KHTEST_CTL(&output, "health", "127.0.0.1:"), 2);
    free(output);
    /* An endpoint that answers a status HTTP has not (-1 would pass for
     * the probe's own failure, its error unset): down, saying so. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    ck_assert_int_eq(bind(fd, (struct sockaddr *) &addr, sizeof addr), 0);
    ck_assert_int_eq(listen(fd, 4), 0);
    socklen_t len = sizeof addr;
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *) &addr, &len), 0);
    pid_t server = fork();
    ck_assert_int_ge(server, 0);
    if (server == 0) {
        for (;;) {
            int c = accept(fd, NULL, NULL);
            char request[512];
            if (c >= 0 && recv(c, request, sizeof request, 0) >= 0) {
                static const char answer[] = "HTTP/1.0 -1 x\r\n\r\nbody";
                ssize_t sent = send(c, answer, sizeof answer - 1, 0);
                (void) sent;
            }
            close(c);
        }
    }
    close(fd);
    char odd[64];
    snprintf(odd, sizeof odd, "127.0.0.1:%d", ntohs(addr.sin_port));
    ck_assert_int_eq(KHTEST_CTL(&output, "health", odd), 1);
    ck_assert_msg(strstr(output, "answered status -1"), "%s", output);
    free(output);
    ck_assert_int_eq(KHTEST_CTL(&output, "status", "--intake", odd), 1);
    ck_assert_msg(strstr(output, "answered status -1"), "%s", output);
    free(output);
    kill(server, SIGKILL);
    waitpid(server, NULL, 0);
    /* A well-formed endpoint where nothing listens is down: exit 1. */
    char down[64];
    snprintf(down, sizeof down, "http://127.0.0.1:%d/", khproc_free_port());
    ck_assert_int_eq(KHTEST_CTL(&output, "health", down), 1);
    ck_assert_ptr_nonnull(strstr(output, "cannot connect"));
    free(output);
}
END_TEST

/* Connections that send their request a byte at a time (each byte within
 * the idle timeout) hold the endpoint's connections: one address may take
 * only a few, and when all are taken by several addresses the oldest gives
 * way, so /livez still answers another address. (127.0.0.0/8 is all
 * loopback.) */
START_TEST(slow_clients_leave_livez_answering)
{
    kh_error_t err;
    kh_health_config_t cfg = {.service = "intake", .endpoint = "127.0.0.1:0"};
    kh_health_t *health = kh_health_new(&cfg, &err);
    ck_assert_msg(health != NULL, "%s", err.message);
    struct sockaddr_in to = {.sin_family = AF_INET,
                             .sin_port =
                                 htons((uint16_t) kh_health_port(health)),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char hostport[64];
    snprintf(hostport, sizeof hostport, "127.0.0.1:%d", kh_health_port(health));
    /* 10 from one address, then 8 from each of 5 more: 48, all taken. */
    enum { S_SLOW = 50, S_ADDRESSES = 6 };
    int slow[S_SLOW];
    for (int i = 0; i < S_SLOW; i++) {
        int address = i < 10 ? 0 : 1 + (i - 10) / 8;
        struct sockaddr_in from = {.sin_family = AF_INET,
                                   .sin_addr.s_addr =
                                       htonl(0x7f000002 + (uint32_t) address)};
        ck_assert_int_lt(address, S_ADDRESSES);
        slow[i] = socket(AF_INET, SOCK_STREAM, 0);
        ck_assert_int_ge(slow[i], 0);
        ck_assert_int_eq(bind(slow[i], (struct sockaddr *) &from, sizeof from),
                         0);
        ck_assert_int_eq(connect(slow[i], (struct sockaddr *) &to, sizeof to),
                         0);
        ck_assert_int_gt(send(slow[i], "GET /livez HTTP/1.1\r\n", 21, 0), 0);
    }
    zclock_sleep(300);
    for (int round = 0; round < 3; round++) {
        char *body = NULL;
        int status = kh_http_get(hostport, "/livez", 2000, &body, &err);
        ck_assert_msg(status == 200, "/livez (%d): %d %s", round, status,
                      status < 0 ? err.message : "");
        free(body);
    }
    /* The connections that gave way were the oldest: the first address's
     * are ended, the newest address's still open. */
    char byte;
    struct pollfd first = {.fd = slow[0], .events = POLLIN};
    ck_assert_int_eq(poll(&first, 1, 2000), 1);
    ck_assert_int_le(recv(slow[0], &byte, 1, MSG_DONTWAIT), 0);
    ck_assert_int_eq(recv(slow[S_SLOW - 1], &byte, 1, MSG_DONTWAIT), -1);
    ck_assert_int_eq(errno, EAGAIN);
    for (int i = 0; i < S_SLOW; i++)
        close(slow[i]);
    kh_health_destroy(&health);
}
END_TEST

/* A gauge query slower than the probe waits (a backlog count over a large
 * table, say): the server ends it, the probe's SELECT 1 still answers, so
 * the service stays ready and the database up, and no abandoned queries
 * pile up on PostgreSQL; the log says once that the gauges were not read. */
START_TEST(a_slow_gauge_query_leaves_the_database_up)
{
    PGconn *db = khtest_db_fresh("kh_test_health_probe");
    char *conninfo = khtest_db_conninfo("kh_test_health_probe");
    kh_metrics_reset();
    kh_health_config_t cfg = {.service = "notification",
                              .endpoint = "127.0.0.1:0",
                              .conninfo = conninfo,
                              .gauge_sql =
                                  "SELECT 'deliveries_backlog', 'slow', 1"
                                  " FROM pg_sleep(3)"};
    kh_error_t err;
    kh_health_t *health = kh_health_new(&cfg, &err);
    ck_assert_msg(health != NULL, "%s", err.message);
    kh_health_set_sockets(health, true);
    char at[64];
    snprintf(at, sizeof at, "127.0.0.1:%d", kh_health_port(health));
    ck_assert(s_wait_status_at(at, "/readyz", 200, 5000));
    for (int second = 0; second < 12; second++) {
        kh_health_beat();
        char *body = NULL;
        ck_assert_int_eq(s_get_at(at, "/metrics", &body), 200);
        ck_assert_msg(strstr(body, "ketenhub_database_up 1\n"),
                      "database down after %d s", second);
        free(body);
        ck_assert_msg(s_get_at(at, "/readyz", NULL) == 200,
                      "not ready after %d s", second);
        long running = khtest_db_count(
            db, "SELECT count(*) FROM pg_stat_activity WHERE application_name"
                " = 'ketenhub-health' AND state = 'active'");
        ck_assert_msg(running <= 1, "%ld probe queries running", running);
        usleep(1000 * 1000);
    }
    kh_health_destroy(&health);
    free(conninfo);
    PQfinish(db);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("health");
    TCase *tc = tcase_create("health");
    tcase_set_timeout(tc, 90);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, live_ready_and_metrics_in_the_text_format);
    tcase_add_test(tc, counters_move_by_exactly_what_was_submitted);
    tcase_add_test(tc, readiness_follows_the_database);
    tcase_add_test(tc, a_database_stopped_at_once_leaves_only_logfmt_lines);
    tcase_add_test(tc, readiness_waits_for_the_services_own_connection);
    tcase_add_test(tc, status_shows_an_offline_partners_backlog_growing);
    tcase_add_test(tc, routing_and_notification_count_and_report_the_backlog);
    tcase_add_test(tc, status_says_when_the_database_is_not_migrated);
    tcase_add_test(tc, status_says_when_the_database_is_not_durable);
    tcase_add_test(tc, status_shows_a_refused_reload_until_rules_load);
    tcase_add_test(tc, status_shows_the_hub_keys_served);
    tcase_add_test(tc, a_bad_setting_exits_2_naming_the_variable);
    tcase_add_test(tc, a_bad_path_or_endpoint_exits_2_before_the_database);
    tcase_add_test(tc, an_empty_health_endpoint_is_the_default);
    tcase_add_test(tc, an_unreadable_key_directory_or_secret_exits_2);
    tcase_add_test(tc, an_endpoint_in_use_exits_2_saying_so);
    suite_add_tcase(suite, tc);
    TCase *reference = tcase_create("reference");
    tcase_add_test(reference, readme_names_every_setting_and_metric);
    tcase_add_test(reference,
                   status_and_health_refuse_an_endpoint_that_is_no_host_port);
    suite_add_tcase(suite, reference);
    TCase *http = tcase_create("http");
    tcase_add_test(http, slow_clients_leave_livez_answering);
    tcase_add_test(http, a_slow_gauge_query_leaves_the_database_up);
    tcase_set_timeout(http, 60);
    suite_add_tcase(suite, http);
    return khtest_run_suite(suite);
}
