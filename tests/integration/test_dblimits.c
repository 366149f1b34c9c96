/*
 * intake when PostgreSQL refuses connections or runs out of space
 * (issue 6, part 4): the real ketenhub-intake binary against a cluster of
 * this test's own (it restarts the server, fills max_connections and puts
 * tables on a small tmpfs, which the shared test cluster must not suffer).
 *
 * For each limit: every SUBMIT meanwhile is answered within 1 s with a
 * retryable refusal, never ACCEPTED; nothing is stored half (a referral
 * and its audit event are there together or not at all); once the limit
 * is lifted intake recovers by itself and the same idempotency key gives
 * exactly one referral.
 *
 * intake connects as a login role that only holds ketenhub_intake, as a
 * deployment would: superusers are exempt from connection limits.
 * Mounting the tmpfs needs root (CI runs as root); without it the
 * out-of-space test fails, it does not skip.
 */
#include <czmq.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_dblimits"
#define S_ROLE "kh_dblimits_intake"
#define S_TABLESPACE "kh_dblimits_small"
#define S_TMPFS_SIZE "16m"
#define S_MAX_CONNECTIONS 20
#define S_ANSWER_MS 1000   /* the bound the issue sets */
#define S_RECOVER_MS 20000 /* generous: a shared machine */
#define S_TRIES 5          /* submissions while the limit holds */
#define S_MAX_FILLERS 400

/* Set in main before the tests fork. */
static char s_top[256];   /* this run's directory */
static char s_pgdir[512]; /* the cluster (scripts/pgtmp.sh directory) */
static char s_tmpfs[512]; /* the small tmpfs, "" if it could not mount */
static char s_mount_error[256];

/* Per test. */
static char s_dir[300]; /* certs, logs */
static char s_endpoint[64];
static char *s_conninfo; /* intake's, as S_ROLE */
static pid_t s_intake = -1;
static PGconn *s_db; /* superuser, for limits and checks */

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_db, sql);
}

static int s_pgtmp(const char *command)
{
    return khproc_sh("'%s/scripts/pgtmp.sh' %s '%s' >/dev/null",
                     KH_TEST_SOURCE_DIR, command, s_pgdir);
}

static void s_start_intake(void)
{
    char *extra[] = {"KH_ROUTING_ENDPOINT=none", "KH_HEALTH_ENDPOINT=none",
                     NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, s_conninfo, extra);
    /* For main to stop it should this test fail before its teardown. */
    char pidfile[600], pid[32];
    snprintf(pidfile, sizeof pidfile, "%s/intake.pid", s_top);
    snprintf(pid, sizeof pid, "%d\n", (int) s_intake);
    khtest_write_file(pidfile, pid);
}

static kh_client_t *s_client(void)
{
    kh_error_t err;
    kh_client_t *client =
        kh_client_new(s_endpoint, s_path("hub.cert"), s_path("vt.cert"), &err);
    ck_assert_msg(client != NULL, "%s", err.message);
    return client;
}

static void s_wait_ready(void)
{
    kh_client_t *client = s_client();
    kh_error_t err;
    int rc = -1;
    for (int i = 0; i < 100 && rc; i++)
        rc = kh_client_ping(client, 200, &err);
    kh_client_destroy(&client);
    if (rc != 0)
        khtest_show_log(s_path("intake.log"), 40);
    ck_assert_msg(rc == 0, "intake did not come up: %s", err.message);
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof s_dir, "%s/t-XXXXXX", s_top);
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    ck_assert_int_eq(khproc_sh("mkdir -p '%s/partners'", s_dir), 0);
    snprintf(s_endpoint, sizeof s_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());

    s_db = khtest_db_fresh(S_DB);
    khtest_db_exec(s_db,
                   "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE"
                   " rolname = '" S_ROLE "') THEN CREATE ROLE " S_ROLE
                   " LOGIN; END IF; END $$",
                   0, NULL);
    /* A failed test may have left its limit behind. */
    khtest_db_exec(s_db, "ALTER ROLE " S_ROLE " CONNECTION LIMIT -1", 0, NULL);
    khtest_db_exec(s_db, "GRANT ketenhub_intake TO " S_ROLE, 0, NULL);

    char *base = khtest_db_conninfo(S_DB);
    size_t size = strlen(base) + 64;
    s_conninfo = malloc(size);
    ck_assert_ptr_nonnull(s_conninfo);
    snprintf(s_conninfo, size, "%s user=" S_ROLE, base);
    free(base);

    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    zcert_t *vt = zcert_new();
    zcert_save(vt, s_path("vt.cert"));
    zcert_save_public(vt, s_path("partners/vt.cert"));
    khtest_register_partner(s_db, "veilig-thuis", "veilig_thuis", true,
                            zcert_public_txt(vt));
    zcert_destroy(&vt);
}

static void s_teardown(void)
{
    if (s_intake > 0) {
        int status = khproc_stop(s_intake, SIGTERM, 8000);
        ck_assert_msg(status != -1 && WIFEXITED(status) &&
                          WEXITSTATUS(status) == 0,
                      "intake did not stop cleanly: %d", status);
    }
    s_intake = -1;
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khtest_rmtree(s_dir);
}

static const char *s_str(const json_t *reply, const char *field)
{
    const char *value = json_string_value(json_object_get(reply, field));
    return value ? value : "";
}

/* SUBMIT once (no client retries) and return the reply; *elapsed_ms is
 * how long the answer took. */
static json_t *s_submit(kh_client_t *client, const json_t *referral,
                        const char *key, int64_t *elapsed_ms)
{
    kh_error_t err;
    int64_t started = zclock_mono();
    json_t *reply = kh_client_submit(client, referral, key, 5000, &err);
    *elapsed_ms = zclock_mono() - started;
    return reply;
}

/* While the limit holds: S_TRIES SUBMITs (the same key and new ones),
 * each answered within S_ANSWER_MS with a retryable refusal. Returns the
 * slowest answer in ms. */
static int64_t s_expect_refusals(const json_t *referral, const char *key)
{
    kh_client_t *client = s_client();
    int64_t slowest = 0;
    for (int i = 0; i < S_TRIES; i++) {
        char other[64];
        snprintf(other, sizeof other, "%s-other-%d", key, i);
        int64_t elapsed;
        json_t *reply =
            s_submit(client, referral, i % 2 ? other : key, &elapsed);
        ck_assert_msg(reply != NULL, "no answer within 5 s (try %d)", i);
        ck_assert_msg(strcmp(kh_client_reply_cmd(reply), "REJECTED") == 0,
                      "answered %s while the database is limited (try %d)",
                      kh_client_reply_cmd(reply), i);
        ck_assert_msg(json_is_true(json_object_get(reply, "retryable")),
                      "refusal %s is not retryable", s_str(reply, "code"));
        ck_assert_int_ge(
            json_integer_value(json_object_get(reply, "retry_after_ms")), 1);
        ck_assert_msg(elapsed < S_ANSWER_MS, "answered after %" PRId64 " ms",
                      elapsed);
        if (elapsed > slowest)
            slowest = elapsed;
        json_decref(reply);
        zclock_sleep(100);
    }
    kh_client_destroy(&client);
    return slowest;
}

/* After the limit is lifted: resend key as a partner would (honouring
 * retry_after_ms) until ACCEPTED; it must be new (nothing of the refused
 * tries was kept), and a repeat must give the same referral. Returns how
 * long recovery took in ms. */
static int64_t s_expect_recovery(const json_t *referral, const char *key)
{
    kh_client_t *client = s_client();
    int64_t started = zclock_mono();
    json_t *reply = NULL;
    while (zclock_mono() - started < S_RECOVER_MS) {
        int64_t elapsed;
        reply = s_submit(client, referral, key, &elapsed);
        if (reply && strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0)
            break;
        ck_assert_msg(!reply ||
                          json_is_true(json_object_get(reply, "retryable")),
                      "refused for good: %s", s_str(reply, "code"));
        int64_t wait =
            reply ? json_integer_value(json_object_get(reply, "retry_after_ms"))
                  : 0;
        json_decref(reply);
        reply = NULL;
        zclock_sleep(wait < 50 ? 50 : wait > 1000 ? 1000 : (int) wait);
    }
    int64_t recovered = zclock_mono() - started;
    if (!reply)
        khtest_show_log(s_path("intake.log"), 40);
    ck_assert_msg(reply != NULL, "intake did not recover in %d ms",
                  S_RECOVER_MS);
    ck_assert(json_is_false(json_object_get(reply, "duplicate")));
    int64_t elapsed;
    json_t *again = s_submit(client, referral, key, &elapsed);
    ck_assert_ptr_nonnull(again);
    ck_assert_str_eq(kh_client_reply_cmd(again), "ACCEPTED");
    ck_assert(json_is_true(json_object_get(again, "duplicate")));
    ck_assert_str_eq(s_str(again, "referral_id"), s_str(reply, "referral_id"));
    json_decref(again);
    json_decref(reply);
    kh_client_destroy(&client);

    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM referrals WHERE idempotency_key = '%s'",
             key);
    ck_assert_int_eq(s_count(sql), 1);
    return recovered;
}

/* Nothing half: every referral has exactly one referral.accepted event
 * from its own transaction, and every such event its referral. */
static void s_expect_whole(void)
{
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM referrals r WHERE (SELECT count(*)"
                " FROM audit_events a WHERE a.referral_id = r.id AND"
                " a.action = 'referral.accepted' AND a.xmin = r.xmin) <> 1"),
        0);
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM audit_events a WHERE a.action ="
                " 'referral.accepted' AND NOT EXISTS (SELECT 1 FROM"
                " referrals r WHERE r.id = a.referral_id)"),
        0);
}

static json_t *s_example(void)
{
    json_t *doc;
    khtest_examples(&doc, 1);
    return doc;
}

/* A referral accepted while all is well: intake is connected. */
static void s_warm_up(const json_t *referral)
{
    kh_client_t *client = s_client();
    int64_t elapsed;
    json_t *reply = s_submit(client, referral, "warm-1", &elapsed);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&client);
}

START_TEST(restarted_with_connection_limit_0)
{
    s_start_intake();
    s_wait_ready();
    json_t *referral = s_example();
    s_warm_up(referral);
    long referrals = s_count("SELECT count(*) FROM referrals");
    long events = s_count("SELECT count(*) FROM audit_events");

    /* The server restarts and refuses intake's role from then on. */
    khtest_db_exec(s_db, "ALTER ROLE " S_ROLE " CONNECTION LIMIT 0", 0, NULL);
    ck_assert_int_eq(s_pgtmp("restart"), 0);
    PQreset(s_db);
    ck_assert_int_eq(PQstatus(s_db), CONNECTION_OK);
    int64_t slowest = s_expect_refusals(referral, "limit-1");
    ck_assert_msg(
        khtest_log_has(s_path("intake.log"), "event=db_connect_failed", 5000),
        "intake never tried to reconnect");
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"), events);

    /* A failed test may have left its limit behind. */
    khtest_db_exec(s_db, "ALTER ROLE " S_ROLE " CONNECTION LIMIT -1", 0, NULL);
    int64_t recovered = s_expect_recovery(referral, "limit-1");
    s_expect_whole();
    printf("dblimits: connection_limit_0 slowest_refusal_ms=%" PRId64
           " recovery_ms=%" PRId64 "\n",
           slowest, recovered);
    json_decref(referral);
}
END_TEST

START_TEST(max_connections_held_by_others)
{
    s_start_intake();
    s_wait_ready();
    json_t *referral = s_example();
    s_warm_up(referral);
    long referrals = s_count("SELECT count(*) FROM referrals");

    /* intake loses its connections, and others take every slot before it
     * can come back (superusers: the reserved slots too). */
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE usename = '" S_ROLE "'",
                   0, NULL);
    ck_assert(khtest_wait_count(s_db,
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE usename = '" S_ROLE "'",
                                0, 5000));
    PGconn *fillers[S_MAX_FILLERS];
    int held = 0;
    char refused[256] = "";
    while (held < S_MAX_FILLERS) {
        PGconn *conn = PQconnectdb(khtest_pg_conninfo());
        if (PQstatus(conn) != CONNECTION_OK) {
            snprintf(refused, sizeof refused, "%s", PQerrorMessage(conn));
            PQfinish(conn);
            break;
        }
        fillers[held++] = conn;
    }
    ck_assert_msg(strstr(refused, "too many clients") != NULL,
                  "held %d connections, then: %s", held, refused);

    int64_t slowest = s_expect_refusals(referral, "full-1");
    ck_assert_msg(
        khtest_log_has(s_path("intake.log"), "event=db_connect_failed", 5000),
        "intake never tried to reconnect");
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);

    for (int i = 0; i < held; i++)
        PQfinish(fillers[i]);
    int64_t recovered = s_expect_recovery(referral, "full-1");
    s_expect_whole();
    printf("dblimits: max_connections held=%d slowest_refusal_ms=%" PRId64
           " recovery_ms=%" PRId64 "\n",
           held, slowest, recovered);
    json_decref(referral);
}
END_TEST

/* The error a statement ended with: its SQLSTATE, "" when it succeeded. */
static void s_try(PGconn *conn, const char *sql, char sqlstate[6])
{
    PGresult *res = PQexec(conn, sql);
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK ||
              PQresultStatus(res) == PGRES_TUPLES_OK;
    snprintf(sqlstate, 6, "%s", ok ? "" : state ? state : "none");
    PQclear(res);
}

START_TEST(out_of_space)
{
    ck_assert_msg(s_tmpfs[0] != '\0',
                  "cannot mount a tmpfs for the tablespace (%s): this test "
                  "needs root",
                  s_mount_error);
    /* The test database's tables and indexes move to a tablespace on the
     * small tmpfs; the cluster's WAL stays where it is (a full WAL disk
     * stops PostgreSQL itself, which the restart tests cover). */
    if (s_count(
            "SELECT count(*) FROM pg_tablespace WHERE spcname = '" S_TABLESPACE
            "'") == 0) {
        char sql[1024];
        snprintf(sql, sizeof sql,
                 "CREATE TABLESPACE " S_TABLESPACE " LOCATION '%s'", s_tmpfs);
        khtest_db_exec(s_db, sql, 0, NULL);
    }
    khtest_db_exec(s_db,
                   "ALTER TABLE ALL IN TABLESPACE pg_default SET "
                   "TABLESPACE " S_TABLESPACE,
                   0, NULL);
    khtest_db_exec(s_db,
                   "ALTER INDEX ALL IN TABLESPACE pg_default SET "
                   "TABLESPACE " S_TABLESPACE,
                   0, NULL);
    ck_assert_int_eq(s_count("SELECT count(*) FROM pg_class c JOIN"
                             " pg_namespace n ON n.oid = c.relnamespace"
                             " WHERE n.nspname = 'public' AND c.relname IN"
                             " ('referrals', 'audit_events') AND"
                             " c.reltablespace = (SELECT oid FROM"
                             " pg_tablespace WHERE spcname = '" S_TABLESPACE
                             "')"),
                     2);
    s_start_intake();
    s_wait_ready();

    /* Fill the tablespace until PostgreSQL says the disk is full (rows
     * under the TOAST threshold are stored as they are, uncompressed). */
    khtest_db_exec(
        s_db, "CREATE TABLE filler (b text) TABLESPACE " S_TABLESPACE, 0, NULL);
    char state[6] = "";
    int rounds = 0;
    for (; rounds < 10000 && !state[0]; rounds++)
        s_try(s_db,
              "INSERT INTO filler SELECT repeat(md5(g::text), 30)"
              " FROM generate_series(1, 100) g",
              state);
    ck_assert_msg(strcmp(state, "53100") == 0,
                  "filling the tablespace ended with sqlstate %s after %d "
                  "rounds",
                  state, rounds);

    json_t *referral = s_example();
    int64_t slowest = s_expect_refusals(referral, "disk-1");
    ck_assert_msg(khtest_log_has(s_path("intake.log"), "sqlstate=53100", 5000),
                  "intake did not meet the full disk");
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"), 0);

    /* DROP TABLE gives the space back at once (the file is truncated). */
    khtest_db_exec(s_db, "DROP TABLE filler", 0, NULL);
    int64_t recovered = s_expect_recovery(referral, "disk-1");
    s_expect_whole();
    printf("dblimits: out_of_space fill_rounds=%d slowest_refusal_ms=%" PRId64
           " recovery_ms=%" PRId64 "\n",
           rounds, slowest, recovered);
    json_decref(referral);
}
END_TEST

/* Start this run's own cluster and mount the tmpfs; 0 or -1. */
static int s_start_cluster(void)
{
    snprintf(s_pgdir, sizeof s_pgdir, "%s/pg", s_top);
    if (s_pgtmp("start")) {
        fprintf(stderr, "test_dblimits: cannot start PostgreSQL in %s\n",
                s_pgdir);
        return -1;
    }
    setenv("KH_TEST_PG_DIR", s_pgdir, 1);
    /* Few slots, so that holding them all is quick. */
    if (khproc_sh(". '%s/env' && psql -qAtc 'ALTER SYSTEM SET max_connections"
                  " = %d' >/dev/null",
                  s_pgdir, S_MAX_CONNECTIONS) ||
        s_pgtmp("restart")) {
        fprintf(stderr, "test_dblimits: cannot lower max_connections\n");
        return -1;
    }
    snprintf(s_tmpfs, sizeof s_tmpfs, "%s/tmpfs", s_top);
    if (geteuid() != 0)
        snprintf(s_mount_error, sizeof s_mount_error, "not running as root");
    else if (khproc_sh("mkdir -p '%s' && mount -t tmpfs -o size=%s,mode=0700 "
                       "kh_dblimits '%s' && chown postgres '%s'",
                       s_tmpfs, S_TMPFS_SIZE, s_tmpfs, s_tmpfs))
        snprintf(s_mount_error, sizeof s_mount_error, "mount -t tmpfs failed");
    if (s_mount_error[0])
        s_tmpfs[0] = '\0';
    return 0;
}

static void s_stop_cluster(void)
{
    char pidfile[600];
    snprintf(pidfile, sizeof pidfile, "%s/intake.pid", s_top);
    char *pid = khtest_read_file(pidfile);
    if (pid && atoi(pid) > 0 && kill(atoi(pid), 0) == 0)
        khproc_stop(atoi(pid), SIGKILL, 2000);
    free(pid);
    s_pgtmp("stop");
    if (s_tmpfs[0])
        khproc_sh("umount '%s'", s_tmpfs);
    khproc_sh("rm -rf '%s'", s_top);
}

int main(void)
{
    snprintf(s_top, sizeof s_top, "/tmp/kh-dblimits-XXXXXX");
    if (!mkdtemp(s_top)) {
        perror("test_dblimits: mkdtemp");
        return 1;
    }
    chmod(s_top, 0755); /* the postgres OS user reaches the tmpfs */
    if (s_start_cluster()) {
        s_stop_cluster();
        return 1;
    }
    Suite *suite = suite_create("dblimits");
    TCase *tc = tcase_create("limits");
    tcase_set_timeout(tc, 120);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, restarted_with_connection_limit_0);
    tcase_add_test(tc, max_connections_held_by_others);
    tcase_add_test(tc, out_of_space);
    suite_add_tcase(suite, tc);
    int rc = khtest_run_suite(suite);
    s_stop_cluster();
    return rc;
}
