/*
 * Integration test of `ketenhubctl purge`, run as the built binary against
 * the throwaway test cluster. Referrals in every state are made by SQL, a
 * year and more old or new: only the old ones whose work is done lose
 * their payloads (the referral's and its deliveries'), each with one
 * referral.purged event; the rest, a dry run, a second run and every bad
 * argument change nothing. A referral, or a delivery of one, that another
 * transaction holds is left for the next run (never waited for); a dead
 * letter retried meanwhile keeps its referral. The purge runs as a login
 * of the ketenhub_admin role, with no more rights than that.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "khtest.h"

#define DB "kh_test_purge"
#define CANARY "CANARY-5b1d-personal-data"
#define PAYLOAD "convert_to('{\"summary\":\"" CANARY "\"}', 'UTF8')"

/* Old (accepted 400 days ago) unless said otherwise. */
#define R_ACKED "10000000-0000-4000-8000-000000000001"  /* done */
#define R_DEAD "10000000-0000-4000-8000-000000000002"   /* done: dead+acked */
#define R_UNROUT "10000000-0000-4000-8000-000000000003" /* done: unroutable */
#define R_OPEN "10000000-0000-4000-8000-000000000004"   /* a pending one */
#define R_SENT "10000000-0000-4000-8000-000000000005"   /* a delivered one */
#define R_ACCEPT "10000000-0000-4000-8000-000000000006" /* not routed */
#define R_NEW "10000000-0000-4000-8000-000000000007"    /* done, 10 days */
#define R_HELD "10000000-0000-4000-8000-000000000008"   /* done, locked */

static PGconn *s_conn;

static void s_sql(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK ||
                      PQresultStatus(res) == PGRES_TUPLES_OK,
                  "%s: %s", sql, PQerrorMessage(conn));
    PQclear(res);
}

static void s_referral(const char *id, const char *state, int age_days)
{
    char sql[1024];
    snprintf(sql, sizeof sql,
             "INSERT INTO referrals (id, partner_id, idempotency_key,"
             " schema_version, payload, payload_hash, state, accepted_at)"
             " VALUES ('%s', 'meldpunt', 'k-%s', 'referral.v1', " PAYLOAD ","
             " sha256(" PAYLOAD "), '%s', now() - interval '%d days')",
             id, id, state, age_days);
    s_sql(s_conn, sql);
}

/* A delivery of ref to partner in state (with an escalation copy's
 * payload when escalate is true). */
static void s_delivery(const char *ref, const char *partner, const char *state,
                       bool escalate)
{
    char sql[2048];
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, state, rules_version, attempts,"
             " dead_reason, acked_at, escalate_to, escalation_payload,"
             " escalation_payload_hash, updated_at) VALUES (gen_random_uuid(),"
             " '%s', '%s', 'urgent', " PAYLOAD ", sha256(" PAYLOAD "), '%s',"
             " 'r1', 1, %s, %s, %s, %s, %s, now() - interval '%s days')",
             ref, partner, state,
             strcmp(state, "dead") == 0 ? "'max_attempts'" : "NULL",
             strcmp(state, "acknowledged") == 0 ? "now()" : "NULL",
             escalate ? "'zorgcoordinator'" : "NULL",
             escalate ? PAYLOAD : "NULL",
             escalate ? "sha256(" PAYLOAD ")" : "NULL",
             /* a dead letter dead as long as its referral is old */
             strcmp(state, "dead") == 0 ? "400" : "0");
    s_sql(s_conn, sql);
}

static void s_setup(void)
{
    s_conn = khtest_db_fresh(DB);
    char *conninfo = khtest_db_conninfo(DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    khtest_register_partner(s_conn, "meldpunt", "municipality", true,
                            "0000000000000000000000000000000000000001");
    khtest_register_partner(s_conn, "avim", "police", true,
                            "0000000000000000000000000000000000000002");
    khtest_register_partner(s_conn, "zorgcoordinator", "zorgcoordinator", true,
                            "0000000000000000000000000000000000000004");
    s_referral(R_ACKED, "routed", 400);
    s_delivery(R_ACKED, "avim", "acknowledged", true);
    s_delivery(R_ACKED, "zorgcoordinator", "acknowledged", false);
    s_referral(R_DEAD, "routed", 400);
    s_delivery(R_DEAD, "avim", "dead", false);
    s_delivery(R_DEAD, "zorgcoordinator", "acknowledged", false);
    s_referral(R_UNROUT, "unroutable", 400);
    s_referral(R_OPEN, "routed", 400);
    s_delivery(R_OPEN, "avim", "acknowledged", false);
    s_delivery(R_OPEN, "zorgcoordinator", "pending", false);
    s_referral(R_SENT, "routed", 400);
    s_delivery(R_SENT, "avim", "delivered", false);
    s_referral(R_ACCEPT, "accepted", 400);
    s_referral(R_NEW, "routed", 10);
    s_delivery(R_NEW, "avim", "acknowledged", false);
    s_referral(R_HELD, "routed", 500);
    s_delivery(R_HELD, "avim", "acknowledged", false);
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_conn, sql);
}

/* Payloads left on referral id: its own (0 or 1) plus its deliveries'
 * payloads and escalation payloads. */
static long s_payloads(const char *id)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT (SELECT count(payload) FROM referrals WHERE id = '%s')"
             " + (SELECT count(payload) + count(escalation_payload)"
             " FROM deliveries WHERE referral_id = '%s')",
             id, id);
    return s_count(sql);
}

/* The purge events of id that name the administrator and the referral's
 * payload hash. */
static long s_purge_events(const char *id)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events e JOIN referrals r ON"
             " r.id = e.referral_id WHERE e.action = 'referral.purged' AND"
             " e.referral_id = '%s' AND e.actor_kind = 'admin' AND"
             " e.outcome = 'ok' AND e.origin_service = 'ketenhubctl' AND"
             " e.payload_hash = r.payload_hash AND e.delivery_id IS NULL",
             id);
    return s_count(sql);
}

static const char s_all_payloads[] =
    "SELECT (SELECT count(payload) FROM referrals) + (SELECT count(payload)"
    " + count(escalation_payload) FROM deliveries)";
static const char s_all_events[] = "SELECT count(*) FROM audit_events";

START_TEST(test_bad_arguments_change_nothing)
{
    s_setup();
    long payloads = s_count(s_all_payloads), events = s_count(s_all_events);
    ck_assert_int_eq(KHTEST_CTL(NULL, "purge", "--help"), 0);
    char *out = NULL;
    const char *const bad[][3] = {
        {"--dry-run", NULL, NULL},
        {"--before", "2025-01-01", "--older-than=30"},
        {"--older-than", "0", NULL},
        {"--older-than", "-3", NULL},
        {"--older-than", "30x", NULL},
        {"--older-than", "", NULL},
        {"--older-than", "99999", NULL},
        {"--before", "garbage", NULL},
        {"--before", "2999-01-01", NULL},
        {"--before", "now + 1", NULL},
        {"--before", "infinity", NULL},
        {"--before", "-infinity", NULL},
        /* December or November, as the server's or the client's DateStyle
         * would have it: a cutoff a month apart, so neither. */
        {"--before", "12/11/2025", NULL},
        {"--before", "11-12-2025", NULL},
        /* Only the ISO 8601 forms audit query reads: not BC (which was
         * used while the report left it out), not PostgreSQL's words. */
        {"--before", "2026-11-28 BC", NULL},
        {"--before", "2026-11-28T00:00:00Z BC", NULL},
        {"--before", "yesterday", NULL},
        {"--before", "today", NULL},
        {"--before", "epoch", NULL},
        {"--before", "now", NULL},
        {"--before", "J2461373", NULL},
        {"--before", "allballs", NULL},
        {"--older-than=30", "--batch", "0"},
        {"--older-than=30", "--batch", "lots"},
        {"--older-than=30", "stray", NULL},
        {"--older-than=30", "--frob", NULL},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = KHTEST_CTL(&out, "purge", bad[i][0], bad[i][1], bad[i][2]);
        ck_assert_msg(rc == 2, "case %zu: exit %d: %s", i, rc, out);
        ck_assert_msg(strstr(out, "ketenhubctl") != NULL, "case %zu: %s", i,
                      out);
        free(out);
    }
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--before", "garbage"), 2);
    ck_assert_msg(strstr(out, "--before takes one ISO 8601 time") &&
                      strstr(out, "'garbage'"),
                  "%s", out);
    free(out);
    /* The cutoff printed is the one used, to the microsecond, in UTC. */
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--before",
                                "2025-11-12T10:30:00.25+01:00", "--dry-run"),
                     0);
    ck_assert_msg(strstr(out, "before 2025-11-12T09:30:00.250000Z\n"), "%s",
                  out);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--before", "2999-01-01"), 2);
    ck_assert_ptr_nonnull(strstr(out, "is not a time in the past"));
    free(out);
    const char *const styles[] = {"ISO, MDY", "ISO, DMY", "SQL, DMY"};
    for (size_t i = 0; i < sizeof styles / sizeof styles[0]; i++) {
        setenv("PGDATESTYLE", styles[i], 1);
        int rc = KHTEST_CTL(&out, "purge", "--before", "12/11/2025");
        ck_assert_msg(rc == 2, "%s: exit %d: %s", styles[i], rc, out);
        free(out);
        rc = KHTEST_CTL(&out, "deadletters", "list", "--since", "12/11/2025");
        ck_assert_msg(rc == 2, "%s: exit %d: %s", styles[i], rc, out);
        free(out);
        /* Year first reads as itself whatever the style. */
        rc = KHTEST_CTL(&out, "purge", "--before", "2025-11-12", "--dry-run");
        ck_assert_msg(rc == 0 && strstr(out, "before 2025-11-12T00:00:00"),
                      "%s: exit %d: %s", styles[i], rc, out);
        free(out);
    }
    unsetenv("PGDATESTYLE");
    ck_assert_int_eq(s_count(s_all_payloads), payloads);
    ck_assert_int_eq(s_count(s_all_events), events);

    /* No database: a runtime failure, and still nothing changed; a time
     * that is not one is refused before the database is asked. */
    char *conninfo = khtest_db_conninfo(DB);
    setenv("KH_DATABASE_URL", "host=/nonexistent port=1", 1);
    ck_assert_int_eq(KHTEST_CTL(NULL, "purge", "--older-than", "365"), 1);
    ck_assert_int_eq(KHTEST_CTL(NULL, "purge", "--before", "yesterday"), 2);
    ck_assert_int_eq(
        KHTEST_CTL(NULL, "deadletters", "list", "--since", "epoch"), 2);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    ck_assert_int_eq(s_count(s_all_payloads), payloads);
    PQfinish(s_conn);
}
END_TEST

START_TEST(test_purge_done_referrals_only)
{
    s_setup();
    long events = s_count(s_all_events);
    char *out = NULL;

    /* The administrator's login: ketenhub_admin's rights and no more. */
    khtest_db_exec(s_conn,
                   "DO $$ BEGIN CREATE ROLE kh_test_purger LOGIN;"
                   " EXCEPTION WHEN duplicate_object OR unique_violation"
                   " THEN NULL; END $$",
                   0, NULL);
    khtest_db_exec(s_conn, "GRANT ketenhub_admin TO kh_test_purger", 0, NULL);
    char *conninfo = khtest_db_conninfo(DB);
    char admin[1400];
    snprintf(admin, sizeof admin, "%s user=kh_test_purger", conninfo);
    setenv("KH_DATABASE_URL", admin, 1);

    /* Another transaction holds R_HELD, and the dead delivery of R_DEAD
     * (as a retry would): both are left, and the purge does not wait. */
    PGconn *holder = PQconnectdb(conninfo);
    free(conninfo);
    ck_assert_int_eq(PQstatus(holder), CONNECTION_OK);
    s_sql(holder, "BEGIN");
    s_sql(holder,
          "SELECT 1 FROM referrals WHERE id = '" R_HELD "' FOR NO KEY UPDATE");
    s_sql(holder, "SELECT 1 FROM deliveries WHERE referral_id = '" R_DEAD
                  "' AND state = 'dead' FOR UPDATE");

    /* A dry run counts and changes nothing. */
    ck_assert_int_eq(
        KHTEST_CTL(&out, "purge", "--older-than", "365", "--dry-run"), 0);
    ck_assert_msg(strstr(out, "would purge 4 referrals (5 deliveries)"), "%s",
                  out);
    ck_assert_msg(strstr(out, "kept 3 referrals"), "%s", out);
    free(out);
    ck_assert_int_eq(s_count(s_all_events), events);
    ck_assert_int_eq(s_payloads(R_ACKED), 4);

    ck_assert_int_eq(
        KHTEST_CTL(&out, "purge", "--older-than", "365", "--batch", "1"), 0);
    ck_assert_msg(strstr(out, "purged 2 referrals (2 deliveries)"), "%s", out);
    ck_assert_msg(strstr(out, "kept 3 referrals"), "%s", out);
    ck_assert_msg(strstr(out, "left 2 done referrals: held by another"), "%s",
                  out);
    /* The tables are not its login's to vacuum: it says so. */
    ck_assert_msg(strstr(out, "not vacuumed: this login does not own"), "%s",
                  out);
    ck_assert_ptr_null(strstr(out, CANARY));
    free(out);

    /* Done and old: every payload gone, one event each. */
    const char *purged[] = {R_ACKED, R_UNROUT};
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(s_payloads(purged[i]), 0);
        ck_assert_int_eq(s_purge_events(purged[i]), 1);
    }
    /* Each names the administrator's login (025). */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.purged' AND actor_id <>"
                             " 'kh_test_purger'"),
                     0);
    /* In work, not routed, too new or held: untouched. */
    ck_assert_int_eq(s_payloads(R_DEAD), 3);
    ck_assert_int_eq(s_payloads(R_OPEN), 3);
    ck_assert_int_eq(s_payloads(R_SENT), 2);
    ck_assert_int_eq(s_payloads(R_ACCEPT), 1);
    ck_assert_int_eq(s_payloads(R_NEW), 2);
    ck_assert_int_eq(s_payloads(R_HELD), 2);
    ck_assert_int_eq(s_count(s_all_events), events + 2);
    /* Hashes, states and times stay for the trail. */
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM deliveries WHERE payload IS NULL AND"
                " payload_hash IS NOT NULL AND state = 'acknowledged'"),
        2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE"
                             " escalation_payload IS NULL AND"
                             " escalation_payload_hash IS NOT NULL"),
                     1);

    /* The holder retried the dead letter: R_DEAD is in work again and is
     * kept; the held referral goes on this run; then nothing is left. */
    s_sql(holder, "UPDATE deliveries SET state = 'pending', attempts = 0,"
                  " dead_reason = NULL WHERE referral_id = '" R_DEAD
                  "' AND state = 'dead'");
    s_sql(holder, "COMMIT");
    PQfinish(holder);
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365", "--json"),
                     0);
    ck_assert_msg(strstr(out, "\"referrals\":1,\"deliveries\":1,"
                              "\"kept_in_work\":4,\"busy\":0"),
                  "%s", out);
    free(out);
    ck_assert_int_eq(s_payloads(R_HELD), 0);
    ck_assert_int_eq(s_purge_events(R_HELD), 1);
    ck_assert_int_eq(s_payloads(R_DEAD), 3);
    ck_assert_int_eq(s_purge_events(R_DEAD), 0);
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    ck_assert_msg(strstr(out, "purged 0 referrals (0 deliveries)"), "%s", out);
    free(out);
    ck_assert_int_eq(s_count(s_all_events), events + 3);

    /* Its dead letter back (a partner refused it for good): dead since
     * the cutoff, it is the administrator's to retry, and kept. */
    s_sql(s_conn,
          "UPDATE deliveries SET state = 'dead', dead_reason ="
          " 'nack_permanent', updated_at = now() WHERE referral_id = '" R_DEAD
          "' AND state = 'pending'");
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    ck_assert_msg(strstr(out, "purged 0 referrals (0 deliveries)"), "%s", out);
    free(out);
    ck_assert_int_eq(s_payloads(R_DEAD), 3);
    /* Dead for as long as the retention: done; purged, it can no longer
     * be retried. */
    s_sql(s_conn,
          "UPDATE deliveries SET updated_at = now() - interval"
          " '400 days' WHERE referral_id = '" R_DEAD "' AND state = 'dead'");
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    ck_assert_msg(strstr(out, "purged 1 referral (2 deliveries)"), "%s", out);
    free(out);
    ck_assert_int_eq(s_payloads(R_DEAD), 0);
    int rc =
        KHTEST_CTL(&out, "deadletters", "retry", "--partner", "avim", "--all");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_ptr_nonnull(strstr(out, "no dead deliveries for partner avim"));
    free(out);

    /* The administrator sees what a purged dead letter was, and the state
     * of the hub, through what ketenhub_admin may read. */
    char *dead = khtest_db_value(s_conn, "SELECT id FROM deliveries WHERE"
                                         " referral_id = '" R_DEAD
                                         "' AND state = 'dead'");
    rc = KHTEST_CTL(&out, "deadletters", "show", dead);
    ck_assert_msg(rc == 0 && strstr(out, "nack_permanent"), "exit %d: %s", rc,
                  out);
    free(out);
    free(dead);
    KHTEST_CTL(&out, "status", "--json");
    ck_assert_msg(strstr(out, "\"trail_head\"") && !strstr(out, "denied"), "%s",
                  out);
    free(out);

    /* A cutoff of now takes the new one too, once its work is done. */
    char *now =
        khtest_db_value(s_conn, "SELECT to_char(now() AT TIME ZONE 'UTC',"
                                " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--before", now), 0);
    free(now);
    ck_assert_msg(strstr(out, "purged 1 referral (1 delivery)"), "%s", out);
    free(out);
    ck_assert_int_eq(s_payloads(R_NEW), 0);
    ck_assert_int_eq(s_payloads(R_OPEN), 3);
    PQfinish(s_conn);
}
END_TEST

/* An urgent delivery that died before it was acknowledged escalates when
 * its time comes (migration 015), also one that died long ago under an
 * older release and was never escalated: the escalation partner's copy is
 * made from its escalation payload. Until then its referral is in work,
 * and the purge keeps it; escalated, it is done. */
#define R_ESC "10000000-0000-4000-8000-000000000009"

START_TEST(test_urgent_dead_letter_kept_until_escalated)
{
    s_setup();
    s_referral(R_ESC, "routed", 400);
    s_delivery(R_ESC, "avim", "dead", true);
    char *out = NULL;
    ck_assert_int_eq(
        KHTEST_CTL(&out, "purge", "--older-than", "365", "--dry-run"), 0);
    ck_assert_msg(strstr(out, "kept 4 referrals"), "%s", out);
    ck_assert_msg(strstr(out, "dead letter to retry or to escalate"), "%s",
                  out);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    free(out);
    ck_assert_int_eq(s_payloads(R_ESC), 3);
    ck_assert_int_eq(s_purge_events(R_ESC), 0);
    /* Escalated (notification's sweep): nothing is left to send. */
    s_sql(s_conn, "UPDATE deliveries SET escalated_at = now() WHERE"
                  " referral_id = '" R_ESC "'");
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    ck_assert_msg(strstr(out, "purged 1 referral (1 delivery)"), "%s", out);
    free(out);
    ck_assert_int_eq(s_payloads(R_ESC), 0);
    ck_assert_int_eq(s_purge_events(R_ESC), 1);
    PQfinish(s_conn);
}
END_TEST

/* Row versions of referrals and deliveries, live or dead, whose bytes
 * hold the canary: what the tables' files hold (pageinspect), which a
 * SELECT does not show. */
static long s_versions_with_canary(void)
{
    return s_count(
        "SELECT count(*) FROM (VALUES ('referrals'), ('deliveries')) r(t),"
        " generate_series(0, pg_relation_size(r.t) /"
        " current_setting('block_size')::int - 1) b,"
        " heap_page_items(get_raw_page(r.t, b::int)) i"
        " WHERE position(convert_to('" CANARY "', 'UTF8') IN i.t_data) > 0");
}

/* The live rows that hold a payload. */
static const char s_rows_with_payloads[] =
    "SELECT (SELECT count(*) FROM referrals WHERE payload IS NOT NULL) +"
    " (SELECT count(*) FROM deliveries WHERE payload IS NOT NULL OR"
    " escalation_payload IS NOT NULL)";

/* An UPDATE leaves the row version before it, payload and all, in the
 * table's file until VACUUM removes it. A purge run by the tables' owner
 * vacuums them, so that no row version holds a purged payload any more:
 * those that hold the canary afterwards are the live rows kept. */
START_TEST(test_purge_by_the_owner_vacuums)
{
    s_setup();
    khtest_db_exec(s_conn, "CREATE EXTENSION IF NOT EXISTS pageinspect", 0,
                   NULL);
    long before = s_count(s_rows_with_payloads);
    ck_assert_int_eq(s_versions_with_canary(), before);
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365"), 0);
    ck_assert_msg(strstr(out, "purged 4 referrals (5 deliveries)") &&
                      strstr(out, "vacuumed referrals and deliveries"),
                  "%s", out);
    free(out);
    long kept = s_count(s_rows_with_payloads);
    ck_assert_int_lt(kept, before);
    ck_assert_int_eq(s_versions_with_canary(), kept);
    /* Nothing purged: nothing to vacuum. */
    ck_assert_int_eq(KHTEST_CTL(&out, "purge", "--older-than", "365", "--json"),
                     0);
    ck_assert_msg(strstr(out, "\"referrals\":0,") &&
                      strstr(out, "\"vacuumed\":false"),
                  "%s", out);
    free(out);
    PQfinish(s_conn);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("purge");
    TCase *tc = tcase_create("purge");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_bad_arguments_change_nothing);
    tcase_add_test(tc, test_purge_done_referrals_only);
    tcase_add_test(tc, test_urgent_dead_letter_kept_until_escalated);
    tcase_add_test(tc, test_purge_by_the_owner_vacuums);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
