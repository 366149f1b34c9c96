/*
 * Integration test of `ketenhubctl deadletters list / show / retry`, run
 * as the built binary, logged in as an administrator (ketenhub_admin),
 * against the throwaway test cluster: dead deliveries
 * are made by SQL (as the notification service leaves them), then listed,
 * shown (never with their payload: a canary string in it must not appear),
 * retried (state, attempts, next attempt, reason and one delivery.retried
 * audit event each, all in one transaction) and refused when not dead.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "khproc.h"
#include "khtest.h"

#define DB "kh_test_deadletters"
#define CANARY "CANARY-7f3e-personal-data"

#define REF "11111111-1111-4111-8111-111111111111"
#define REF2 "22222222-2222-4222-8222-222222222222"
#define D1 "aaaaaaaa-0000-4000-8000-000000000001" /* avim, dead */
#define D2 "aaaaaaaa-0000-4000-8000-000000000002" /* avim, dead */
#define D3 "aaaaaaaa-0000-4000-8000-000000000003" /* vt, dead */
#define D4 "aaaaaaaa-0000-4000-8000-000000000004" /* vt, acknowledged */
#define D5 "aaaaaaaa-0000-4000-8000-000000000005" /* zc, dead, purged */
#define D6 "aaaaaaaa-0000-4000-8000-000000000006" /* meldpunt, copy of D1 */
#define D7 "aaaaaaaa-0000-4000-8000-000000000007" /* meldpunt, dead */
#define NOPE "aaaaaaaa-0000-4000-8000-0000000000ff"

static PGconn *s_conn;

static void s_sql(const char *sql)
{
    PGresult *res = PQexec(s_conn, sql);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s: %s", sql,
                  PQerrorMessage(s_conn));
    PQclear(res);
}

static void s_delivery(const char *id, const char *ref, const char *partner,
                       const char *priority, const char *state,
                       const char *reason, int attempts, bool purged)
{
    char sql[2048];
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, state, rules_version, attempts,"
             " dead_reason, acked_at, created_at, updated_at)"
             " VALUES ('%s', '%s', '%s', '%s', %s,"
             " sha256(convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8')),"
             " '%s', 'r1', %d, %s, %s, now() - interval '3 days',"
             " now() - interval '%d hours')",
             id, ref, partner, priority,
             purged ? "NULL"
                    : "convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8')",
             state, attempts, reason ? reason : "NULL",
             strcmp(state, "acknowledged") == 0 ? "now()" : "NULL", attempts);
    s_sql(sql);
}

static void s_setup(void)
{
    s_conn = khtest_db_fresh(DB);
    /* The commands run as an administrator's login: ketenhub_admin's
     * rights and no more. */
    khtest_db_exec(s_conn,
                   "DO $$ BEGIN CREATE ROLE kh_test_dl_admin LOGIN;"
                   " EXCEPTION WHEN duplicate_object OR unique_violation"
                   " THEN NULL; END $$",
                   0, NULL);
    khtest_db_exec(s_conn, "GRANT ketenhub_admin TO kh_test_dl_admin", 0, NULL);
    char *conninfo = khtest_db_conninfo(DB);
    char admin[1400];
    snprintf(admin, sizeof admin, "%s user=kh_test_dl_admin", conninfo);
    setenv("KH_DATABASE_URL", admin, 1);
    free(conninfo);
    khtest_register_partner(s_conn, "meldpunt", "municipality", true,
                            "0000000000000000000000000000000000000001");
    khtest_register_partner(s_conn, "avim", "police", true,
                            "0000000000000000000000000000000000000002");
    khtest_register_partner(s_conn, "veilig-thuis", "veilig_thuis", true,
                            "0000000000000000000000000000000000000003");
    khtest_register_partner(s_conn, "zorgcoordinator", "zorgcoordinator", true,
                            "0000000000000000000000000000000000000004");
    s_sql("INSERT INTO referrals (id, partner_id, idempotency_key,"
          " schema_version, payload, payload_hash, state) VALUES ('" REF "',"
          " 'meldpunt', 'k-1', 'referral.v1',"
          " convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8'),"
          " sha256(convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8')),"
          " 'routed'), ('" REF2 "', 'meldpunt', 'k-2', 'referral.v1',"
          " convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8'),"
          " sha256(convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8')),"
          " 'routed')");
    s_delivery(D1, REF, "avim", "urgent", "dead", "'max_attempts'", 10, false);
    s_delivery(D2, REF2, "avim", "high", "dead", "'nack_permanent'", 2, false);
    s_delivery(D3, REF, "veilig-thuis", "normal", "dead", "'max_age'", 5,
               false);
    s_delivery(D4, REF2, "veilig-thuis", "normal", "acknowledged", NULL, 1,
               false);
    s_delivery(D5, REF, "zorgcoordinator", "normal", "dead", "'max_age'", 4,
               true);
    /* The trail the notification service would have left for D1. */
    s_sql("INSERT INTO audit_events (actor_kind, actor_id, action,"
          " referral_id, delivery_id, partner_id, outcome, reason_code,"
          " origin_service) VALUES"
          " ('service', 'notification', 'delivery.sent', '" REF "', '" D1 "',"
          " 'avim', 'ok', NULL, 'notification'),"
          " ('service', 'notification', 'delivery.dead', '" REF "', '" D1 "',"
          " 'avim', 'failed', 'max_attempts', 'notification')");
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_conn, sql);
}

static long s_retried_events(const char *id)
{
    char sql[768];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action ="
             " 'delivery.retried' AND delivery_id = '%s' AND actor_kind ="
             " 'admin' AND outcome = 'ok' AND origin_service = 'ketenhubctl'"
             " AND actor_id = 'kh_test_dl_admin' AND origin_peer LIKE '_%%@_%%'"
             " AND (referral_id, partner_id, payload_hash) = (SELECT"
             " referral_id, partner_id, payload_hash FROM deliveries"
             " WHERE id = '%s')",
             id, id);
    return s_count(sql);
}

static bool s_is_pending_again(const char *id)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM deliveries WHERE id = '%s' AND state ="
             " 'pending' AND attempts = 0 AND dead_reason IS NULL AND"
             " next_attempt_at <= now() AND updated_at > now() - interval"
             " '1 minute'",
             id);
    return s_count(sql) == 1;
}

START_TEST(test_list_and_show)
{
    s_setup();
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "list", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "show", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "frob"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "list", "--partner", "X"),
                     2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "show"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "show", "not-a-uuid"), 2);

    /* Table: every dead delivery, oldest death first, none acknowledged. */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list"), 0);
    ck_assert_ptr_nonnull(strstr(out, "delivery_id"));
    ck_assert_ptr_nonnull(strstr(out, "dead_reason"));
    const char *p1 = strstr(out, D1), *p2 = strstr(out, D2),
               *p3 = strstr(out, D3), *p5 = strstr(out, D5);
    ck_assert(p1 && p2 && p3 && p5);
    ck_assert_ptr_null(strstr(out, D4));
    /* D1 died 10 hours ago, D3 5, D5 4, D2 2. */
    ck_assert(p1 < p3 && p3 < p5 && p5 < p2);
    ck_assert_ptr_nonnull(strstr(out, "max_attempts"));
    ck_assert_ptr_nonnull(strstr(out, "(4 dead deliveries)"));
    ck_assert_ptr_null(strstr(out, CANARY));
    free(out);

    /* JSON, filtered by partner and by time of death. */
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "list", "--partner", "avim", "--json"),
        0);
    json_error_t jerr;
    json_t *list = json_loads(out, 0, &jerr);
    ck_assert_msg(list != NULL, "%s", out);
    ck_assert_uint_eq(json_array_size(list), 2);
    json_t *first = json_array_get(list, 0);
    ck_assert_str_eq(json_string_value(json_object_get(first, "delivery_id")),
                     D1);
    ck_assert_str_eq(json_string_value(json_object_get(first, "referral_id")),
                     REF);
    ck_assert_str_eq(json_string_value(json_object_get(first, "partner")),
                     "avim");
    ck_assert_str_eq(json_string_value(json_object_get(first, "priority")),
                     "urgent");
    ck_assert_int_eq(json_integer_value(json_object_get(first, "attempts")),
                     10);
    ck_assert_str_eq(json_string_value(json_object_get(first, "dead_reason")),
                     "max_attempts");
    ck_assert_uint_eq(
        strlen(json_string_value(json_object_get(first, "created_at"))), 24);
    ck_assert_ptr_nonnull(json_object_get(first, "updated_at"));
    json_decref(list);
    free(out);
    /* A registered partner with no dead letters has none; one that is not
     * registered (a typo) is an error, exit 1. */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list", "--partner",
                                "meldpunt", "--json"),
                     0);
    ck_assert_str_eq(out, "[]\n");
    free(out);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "list", "--partner", "avlm"), 1);
    ck_assert_msg(strstr(out, "no partner avlm") &&
                      !strstr(out, "dead deliveries"),
                  "%s", out);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list", "--since",
                                "now() - interval '3 hours'", "--json"),
                     2);
    free(out);
    char since[64];
    char *ts = khtest_db_value(s_conn, "SELECT to_char(now() - interval"
                                       " '3 hours', 'YYYY-MM-DD HH24:MI:SS')");
    snprintf(since, sizeof since, "%s", ts);
    free(ts);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "list", "--since", since, "--json"), 0);
    list = json_loads(out, 0, &jerr);
    ck_assert_msg(list != NULL, "%s", out);
    ck_assert_uint_eq(json_array_size(list), 1);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(list, 0),
                                                       "delivery_id")),
                     D2);
    json_decref(list);
    free(out);
    /* A time without a zone is UTC, whatever the client's zone: an hour
     * from now (UTC) lists nothing, also at UTC+14. */
    ts = khtest_db_value(s_conn, "SELECT to_char(now() AT TIME ZONE 'UTC'"
                                 " + interval '1 hour',"
                                 " 'YYYY-MM-DD HH24:MI:SS')");
    snprintf(since, sizeof since, "%s", ts);
    free(ts);
    setenv("PGTZ", "Pacific/Kiritimati", 1);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "list", "--since", since, "--json"), 0);
    unsetenv("PGTZ");
    ck_assert_str_eq(out, "[]\n");
    free(out);
    /* --since reads times as audit query does: PostgreSQL's own words
     * and dates that are not ISO 8601 are refused, naming the option. */
    const char *const words[] = {"yesterday", "today",    "epoch",        "now",
                                 "infinity",  "J2461373", "2026-11-28 BC"};
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++) {
        int rc = KHTEST_CTL(&out, "deadletters", "list", "--since", words[i]);
        ck_assert_msg(rc == 2 && strstr(out, "--since takes one ISO 8601") &&
                          !strstr(out, "delivery_id"),
                      "%s: exit %d: %s", words[i], rc, out);
        free(out);
    }
    ts = khtest_db_value(s_conn, "SELECT to_char(now() AT TIME ZONE 'UTC'"
                                 " - interval '1 day', 'YYYY-MM-DD')");
    snprintf(since, sizeof since, "%s", ts);
    free(ts);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list", "--partner",
                                "veilig-thuis", "--since", since),
                     0);
    ck_assert_ptr_nonnull(strstr(out, D3));
    ck_assert_ptr_nonnull(strstr(out, "(1 dead delivery)"));
    free(out);

    /* show: metadata and the trail, never the payload. */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", D1), 0);
    ck_assert_ptr_null(strstr(out, CANARY));
    ck_assert_ptr_nonnull(strstr(out, "max_attempts"));
    ck_assert_ptr_nonnull(strstr(out, "payload_sha256"));
    ck_assert_ptr_nonnull(strstr(out, "audit events (2):"));
    ck_assert_ptr_nonnull(strstr(out, "delivery.sent"));
    ck_assert_ptr_nonnull(strstr(out, "delivery.dead"));
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", D1, "--json"), 0);
    ck_assert_ptr_null(strstr(out, CANARY));
    json_t *shown = json_loads(out, 0, &jerr);
    ck_assert_msg(shown != NULL, "%s", out);
    json_t *d = json_object_get(shown, "delivery");
    ck_assert_str_eq(json_string_value(json_object_get(d, "state")), "dead");
    /* A dead letter is not sent again until retried: no next attempt. */
    ck_assert(json_is_null(json_object_get(d, "next_attempt_at")));
    ck_assert_int_eq(json_integer_value(json_object_get(d, "payload_bytes")),
                     (json_int_t) strlen("{\"summary\":\"" CANARY "\"}"));
    ck_assert_ptr_null(json_object_get(d, "payload"));
    ck_assert_uint_eq(json_array_size(json_object_get(shown, "events")), 2);
    json_decref(shown);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", D5), 0);
    ck_assert_ptr_nonnull(strstr(out, "purged"));
    free(out);
    /* An escalation copy says whose delivery it was made for. */
    s_delivery(D6, REF, "meldpunt", "urgent", "acknowledged", NULL, 1, false);
    s_sql("UPDATE deliveries SET escalation_of = '" D1 "' WHERE id = '" D6 "'");
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", D6), 0);
    ck_assert_msg(strstr(out, "escalation_of    " D1), "%s", out);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", D6, "--json"), 0);
    shown = json_loads(out, 0, &jerr);
    ck_assert_msg(shown != NULL, "%s", out);
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(shown, "delivery"), "escalation_of")),
                     D1);
    json_decref(shown);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show", NOPE), 1);
    ck_assert_ptr_nonnull(strstr(out, "no delivery " NOPE));
    free(out);
    /* show reads the delivery's trail: each look is recorded as
     * trail.queried, naming the administrator and the delivery, like
     * `audit query --delivery` (an id in upper case too). */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "show",
                                "AAAAAAAA-0000-4000-8000-000000000003"),
                     0);
    free(out);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'trail.queried' AND actor_kind = 'admin'"
                             " AND actor_id = 'kh_test_dl_admin'"
                             " AND origin_service = 'ketenhubctl'"
                             " AND query_filter = 'delivery=" D1 "'"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'trail.queried' AND query_filter IN"
                             " ('delivery=" D5 "', 'delivery=" D3 "')"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'trail.queried' AND query_filter ="
                             " 'delivery=" NOPE "'"),
                     0);
    PQfinish(s_conn);
}
END_TEST

START_TEST(test_retry)
{
    s_setup();
    char *out = NULL;
    const char *events = "SELECT count(*) FROM audit_events";
    long before = s_count(events);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry", "--all"), 2);
    ck_assert_int_eq(
        KHTEST_CTL(NULL, "deadletters", "retry", "--partner", "avim"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry", "xyz"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry", "--partner",
                                "avim", "--all", D1),
                     2);

    /* Not dead, unknown or purged: refused, nothing changes at all, not
     * even the dead one named beside it. */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D1, D4), 1);
    ck_assert_ptr_nonnull(
        strstr(out, "delivery " D4 " is acknowledged, not dead"));
    ck_assert_ptr_nonnull(strstr(out, "nothing was retried"));
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", NOPE, D1), 1);
    ck_assert_ptr_nonnull(strstr(out, "no delivery " NOPE));
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D5), 1);
    ck_assert_ptr_nonnull(strstr(out, "purged"));
    free(out);
    /* A revoked partner is sent nothing: its dead letters would only die
     * again at the next sweep, so a retry of them is refused. */
    s_sql("UPDATE partners SET revoked_at = now() WHERE id = 'avim'");
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D1, D3), 1);
    ck_assert_msg(strstr(out, "the partner avim of delivery " D1 " is revoked"),
                  "%s", out);
    ck_assert_ptr_nonnull(strstr(out, "nothing was retried"));
    free(out);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "retry", "--partner", "avim", "--all"),
        1);
    ck_assert_msg(strstr(out, "the partner avim of delivery " D2 " is revoked"),
                  "%s", out);
    free(out);
    s_sql("UPDATE partners SET revoked_at = NULL WHERE id = 'avim'");
    ck_assert_int_eq(s_count(events), before);
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM deliveries WHERE state = 'dead'"), 4);

    /* By id (a repeated id counts once). */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D3, D3), 0);
    ck_assert_ptr_nonnull(strstr(out, "1 delivery retried"));
    free(out);
    ck_assert(s_is_pending_again(D3));
    ck_assert_int_eq(s_retried_events(D3), 1);
    ck_assert_int_eq(s_count(events), before + 1);
    char *actor = khtest_db_value(s_conn, "SELECT actor_id FROM audit_events"
                                          " WHERE action = 'delivery.retried'");
    ck_assert_ptr_nonnull(actor);
    ck_assert_uint_gt(strlen(actor), 0);
    free(actor);
    /* A second retry of the same id is refused: it is pending now. */
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D3), 1);
    ck_assert_ptr_nonnull(strstr(out, "is pending, not dead"));
    free(out);

    /* A partner's dead letters at once. */
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "retry", "--partner", "avim", "--all"),
        0);
    ck_assert_ptr_nonnull(strstr(out, "2 deliveries retried"));
    free(out);
    ck_assert(s_is_pending_again(D1));
    ck_assert(s_is_pending_again(D2));
    ck_assert_int_eq(s_retried_events(D1), 1);
    ck_assert_int_eq(s_retried_events(D2), 1);
    ck_assert_int_eq(s_count(events), before + 3);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "retry", "--partner", "avim", "--all"),
        0);
    ck_assert_ptr_nonnull(strstr(out, "no dead deliveries for partner avim"));
    free(out);
    /* A partner that is not registered (a typo) is an error, not "none
     * dead": exit 1, nothing recorded. */
    long events_now = s_count(events);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "deadletters", "retry", "--partner", "avlm", "--all"),
        1);
    ck_assert_msg(strstr(out, "no partner avlm") &&
                      !strstr(out, "no dead deliveries"),
                  "%s", out);
    free(out);
    ck_assert_int_eq(s_count(events), events_now);
    /* The purged one stays dead; the acknowledged one untouched. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D5
                             "' AND state = 'dead'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D4
                             "' AND state = 'acknowledged'"),
                     1);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list"), 0);
    ck_assert_ptr_nonnull(strstr(out, "(1 dead delivery)"));
    free(out);

    /* A password file that cannot be read is a bad setting, named, not a
     * database that is away: exit 2 before anything is done. */
    setenv("KH_DATABASE_PASSWORD_FILE", "/nonexistent/kh-password", 1);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D5), 2);
    unsetenv("KH_DATABASE_PASSWORD_FILE");
    ck_assert_msg(strstr(out, "KH_DATABASE_PASSWORD_FILE"), "%s", out);
    free(out);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D5
                             "' AND state = 'dead'"),
                     1);

    /* No database: a runtime failure. */
    setenv("KH_DATABASE_URL", "host=/nonexistent port=1", 1);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "list"), 1);
    ck_assert_int_eq(KHTEST_CTL(NULL, "deadletters", "retry", D1), 1);
    PQfinish(s_conn);
}
END_TEST

/* The connection lost with the answer to the commit of a retry that went
 * through: the tool reads on a new connection that it did, says so and
 * exits 0, rather than reporting a failure (after which another retry is
 * refused: "is pending, not dead"). The answer is lost by holding the
 * commit, written, in a wait for a synchronous standby that never comes
 * and ending the server process while it waits. */
START_TEST(test_retry_commit_answer_lost)
{
    s_setup();
    char log[] = "/tmp/kh-dl-retry-XXXXXX";
    int fd = mkstemp(log);
    ck_assert_int_ge(fd, 0);
    close(fd);
    khtest_sync_standby(s_conn, "kh_test_nobody");
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl", "deadletters",
                    "retry", D1, NULL};
    /* The test cluster commits without waiting; this commit waits. */
    char *env[] = {"PGOPTIONS=-c synchronous_commit=on", NULL};
    pid_t pid = khproc_spawn(argv[0], argv, env, log);
    ck_assert_int_gt(pid, 0);
    bool ended = khtest_end_commit_waiter(s_conn, DB);
    khtest_sync_standby(s_conn, NULL);
    int status = khproc_stop(pid, 0, 30000);
    char *out = khtest_read_file(log);
    unlink(log);
    ck_assert_msg(ended, "no commit waited: %s", out);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "retry: status %d: %s", status, out);
    ck_assert_msg(strstr(out, "went through after all") &&
                      strstr(out, "1 delivery retried"),
                  "%s", out);
    free(out);
    ck_assert(s_is_pending_again(D1));
    ck_assert_int_eq(s_retried_events(D1), 1);
    PQfinish(s_conn);
}
END_TEST

/* Whether the administrator's ketenhubctl comes to wait for a lock
 * within 10 s: how many of its sessions wait (0: none came to). */
static long s_admin_waits_for_a_lock(void)
{
    long waiting = 0;
    for (int i = 0; i < 200 && waiting == 0; i++) {
        waiting = s_count("SELECT count(*) FROM pg_stat_activity"
                          " WHERE datname = '" DB "' AND wait_event_type ="
                          " 'Lock' AND usename = 'kh_test_dl_admin'");
        if (waiting == 0)
            usleep(50 * 1000);
    }
    return waiting;
}

/* A retry that waits for a purge's lock on the dead letter finds it
 * purged once the purge commits, and changes nothing: retry reads the
 * payload's size under the row's lock (payload_bytes, migration 022),
 * not on the snapshot its statement began with, as a view or function
 * reading the payload for ketenhub_admin would. */
START_TEST(test_retry_waits_for_purge)
{
    s_setup();
    char *conninfo = khtest_db_conninfo(DB);
    PGconn *purger = PQconnectdb(conninfo);
    free(conninfo);
    ck_assert_int_eq(PQstatus(purger), CONNECTION_OK);
    khtest_db_exec(purger, "BEGIN", 0, NULL);
    khtest_db_exec(purger,
                   "UPDATE deliveries SET payload = NULL,"
                   " escalation_payload = NULL WHERE id = '" D1 "'",
                   0, NULL);
    char log[] = "/tmp/kh-dl-purged-XXXXXX";
    int fd = mkstemp(log);
    ck_assert_int_ge(fd, 0);
    close(fd);
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl", "deadletters",
                    "retry", D1, NULL};
    char *env[] = {NULL};
    pid_t pid = khproc_spawn(argv[0], argv, env, log);
    ck_assert_int_gt(pid, 0);
    long waiting = s_admin_waits_for_a_lock();
    khtest_db_exec(purger, "COMMIT", 0, NULL);
    PQfinish(purger);
    int status = khproc_stop(pid, 0, 30000);
    char *out = khtest_read_file(log);
    unlink(log);
    ck_assert_msg(waiting == 1, "the retry did not wait: %s", out);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 1,
                  "retry: status %d: %s", status, out);
    ck_assert_msg(strstr(out, "the payload of delivery " D1 " was purged"),
                  "%s", out);
    free(out);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D1
                             "' AND state = 'dead'"),
                     1);
    ck_assert_int_eq(s_retried_events(D1), 0);
    PQfinish(s_conn);
}
END_TEST

/* Two dead letters of meldpunt, D6 and D7, stored in the reverse order of
 * their ids (the order in which the retry of a partner's dead letters
 * finds them), and `deadletters retry --partner meldpunt --all` started
 * (*pid, its output in log, a mkstemp template) while the returned
 * connection, an ACK batch, holds D6 locked in its transaction. */
static PGconn *s_retry_behind_a_lock(char *log, pid_t *pid)
{
    s_setup();
    s_delivery(D7, REF2, "meldpunt", "normal", "dead", "'max_age'", 3, false);
    s_delivery(D6, REF, "meldpunt", "normal", "dead", "'max_age'", 3, false);
    char *conninfo = khtest_db_conninfo(DB);
    PGconn *acker = PQconnectdb(conninfo);
    free(conninfo);
    ck_assert_int_eq(PQstatus(acker), CONNECTION_OK);
    khtest_db_exec(acker, "BEGIN", 0, NULL);
    khtest_db_exec(acker,
                   "SELECT 1 FROM deliveries WHERE id = '" D6 "' FOR UPDATE", 0,
                   NULL);
    int fd = mkstemp(log);
    ck_assert_int_ge(fd, 0);
    close(fd);
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                    "deadletters",
                    "retry",
                    "--partner",
                    "meldpunt",
                    "--all",
                    NULL};
    char *env[] = {NULL};
    *pid = khproc_spawn(argv[0], argv, env, log);
    ck_assert_int_gt(*pid, 0);
    return acker;
}

/* A retry locks its dead letters in the order of their ids, as the
 * notification service's ACK batches lock theirs (a dead letter the
 * partner did take is acknowledged after all): while an ACK batch holds
 * the first of two, the retry waits for it holding neither, and the batch
 * takes the second without waiting, so the two never deadlock. */
START_TEST(test_retry_locks_in_id_order)
{
    char log[] = "/tmp/kh-dl-order-XXXXXX";
    pid_t pid;
    PGconn *acker = s_retry_behind_a_lock(log, &pid);
    long waiting = s_admin_waits_for_a_lock();
    /* The batch's next delivery: the retry must not hold it. */
    PGresult *res = PQexec(acker, "SELECT 1 FROM deliveries WHERE id = '" D7
                                  "' FOR UPDATE NOWAIT");
    ExecStatusType second = PQresultStatus(res);
    char *why = strdup(PQerrorMessage(acker));
    PQclear(res);
    khtest_db_exec(acker, second == PGRES_TUPLES_OK ? "COMMIT" : "ROLLBACK", 0,
                   NULL);
    PQfinish(acker);
    int status = khproc_stop(pid, 0, 30000);
    char *out = khtest_read_file(log);
    unlink(log);
    ck_assert_msg(waiting == 1, "the retry did not wait: %s", out);
    ck_assert_msg(second == PGRES_TUPLES_OK,
                  "the retry held the second dead letter while it waited for"
                  " the first: %s",
                  why);
    free(why);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "retry: status %d: %s", status, out);
    ck_assert_msg(strstr(out, "2 deliveries retried"), "%s", out);
    free(out);
    ck_assert(s_is_pending_again(D6));
    ck_assert(s_is_pending_again(D7));
    PQfinish(s_conn);
}
END_TEST

/* A partner's dead letter that its partner acknowledges after all while
 * a retry of all of them waits for its lock is left acknowledged, and the
 * others are retried: the retry neither fails whole nor undoes the ACK. */
START_TEST(test_retry_of_a_partner_skips_one_acknowledged_meanwhile)
{
    char log[] = "/tmp/kh-dl-acked-XXXXXX";
    pid_t pid;
    PGconn *acker = s_retry_behind_a_lock(log, &pid);
    ck_assert_int_eq(s_admin_waits_for_a_lock(), 1);
    khtest_db_exec(
        acker,
        "UPDATE deliveries SET state = 'acknowledged', acked_at = now(),"
        " dead_reason = NULL WHERE id = '" D6 "'",
        0, NULL);
    khtest_db_exec(acker, "COMMIT", 0, NULL);
    PQfinish(acker);
    int status = khproc_stop(pid, 0, 30000);
    char *out = khtest_read_file(log);
    unlink(log);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "retry: status %d: %s", status, out);
    ck_assert_msg(strstr(out, "1 delivery retried") &&
                      strstr(out, "delivery " D6 ": acknowledged now, left"),
                  "%s", out);
    free(out);
    ck_assert(s_is_pending_again(D7));
    ck_assert_int_eq(s_retried_events(D7), 1);
    ck_assert_int_eq(s_retried_events(D6), 0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D6
                             "' AND state = 'acknowledged'"),
                     1);
    PQfinish(s_conn);
}
END_TEST

/* The connection lost during the commit of a retry that did not go
 * through: failure, and the delivery is still dead, to retry again. */
START_TEST(test_retry_commit_lost)
{
    s_setup();
    s_sql("CREATE FUNCTION kh_test_cut() RETURNS trigger LANGUAGE plpgsql"
          " AS $$ BEGIN PERFORM pg_terminate_backend(pg_backend_pid());"
          " RETURN NULL; END $$");
    s_sql("CREATE CONSTRAINT TRIGGER kh_test_cut AFTER UPDATE ON deliveries"
          " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION"
          " kh_test_cut()");
    char *out = NULL;
    int rc = KHTEST_CTL(&out, "deadletters", "retry", D1);
    ck_assert_msg(rc == 1 && !strstr(out, "after all"), "%d: %s", rc, out);
    free(out);
    s_sql("DROP TRIGGER kh_test_cut ON deliveries");
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE id = '" D1
                             "' AND state = 'dead'"),
                     1);
    ck_assert_int_eq(s_retried_events(D1), 0);
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "retry", D1), 0);
    free(out);
    ck_assert(s_is_pending_again(D1));
    PQfinish(s_conn);
}
END_TEST

/* The peak resident memory (KiB) of ketenhubctl deadletters list with
 * extra (NULL or "--json"), its output thrown away; the output's byte
 * count in *bytes. */
static long s_list_rss(const char *extra, long *bytes)
{
    char path[] = "/tmp/kh-dl-list-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    unlink(path);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(fd, 1);
        /* Under AddressSanitizer freed memory waits in a quarantine of
         * 256 MiB, which would count as the streamed rows' peak. */
        const char *asan = getenv("ASAN_OPTIONS");
        char opts[1024];
        snprintf(opts, sizeof opts, "%s%squarantine_size_mb=1",
                 asan ? asan : "", asan && *asan ? ":" : "");
        setenv("ASAN_OPTIONS", opts, 1);
        execl(KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl", "ketenhubctl",
              "deadletters", "list", extra, (char *) NULL);
        _exit(127);
    }
    int status = 0;
    struct rusage ru;
    ck_assert_int_eq(wait4(pid, &status, 0, &ru), pid);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "deadletters list %s: status %d", extra ? extra : "", status);
    *bytes = (long) lseek(fd, 0, SEEK_END);
    close(fd);
    return ru.ru_maxrss;
}

/* A revoked partner's backlog becomes dead letters all at once: a list of
 * 100,000 of them as JSON costs about what the table costs, not the whole
 * document built in memory first (several times the rows). */
START_TEST(test_a_long_list_is_streamed)
{
    s_setup();
    s_sql("INSERT INTO referrals (id, partner_id, idempotency_key,"
          " schema_version, payload, payload_hash, state)"
          " SELECT gen_random_uuid(), 'meldpunt', 'bulk-' || g,"
          " 'referral.v1', '\\x7b7d', sha256('\\x7b7d'), 'routed'"
          " FROM generate_series(1, 100000) g");
    s_sql("INSERT INTO deliveries (id, referral_id, partner_id, priority,"
          " payload, payload_hash, state, rules_version, attempts,"
          " dead_reason) SELECT gen_random_uuid(), id, 'avim', 'normal',"
          " payload, payload_hash, 'dead', 'r1', 10, 'partner_revoked'"
          " FROM referrals WHERE idempotency_key LIKE 'bulk-%'");
    long table_bytes = 0, json_bytes = 0;
    long table = s_list_rss(NULL, &table_bytes);
    long json = s_list_rss("--json", &json_bytes);
    ck_assert_int_gt(table_bytes, 100000L * 150);
    ck_assert_int_gt(json_bytes, 100000L * 250);
    ck_assert_msg(json < table * 3 / 2,
                  "--json peaked at %ld KiB, the table at %ld KiB", json,
                  table);
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(&out, "deadletters", "list", "--json"), 0);
    json_error_t jerr;
    json_t *list = json_loads(out, 0, &jerr);
    ck_assert_msg(list != NULL, "%s", jerr.text);
    ck_assert_uint_eq(json_array_size(list), 100004);
    json_decref(list);
    free(out);
    PQfinish(s_conn);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("deadletters");
    TCase *tc = tcase_create("deadletters");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_list_and_show);
    tcase_add_test(tc, test_retry);
    tcase_add_test(tc, test_retry_commit_answer_lost);
    tcase_add_test(tc, test_retry_commit_lost);
    tcase_add_test(tc, test_retry_waits_for_purge);
    tcase_add_test(tc, test_retry_locks_in_id_order);
    tcase_add_test(tc,
                   test_retry_of_a_partner_skips_one_acknowledged_meanwhile);
    tcase_add_test(tc, test_a_long_list_is_streamed);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
