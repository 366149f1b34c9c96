/*
 * The sealed trail on a real PostgreSQL: sealing in seq order while
 * transactions commit out of order, the protections of migration 004 for
 * every role, randomised tamper trials by a superuser who bypasses them
 * (each must be found with the right kind and sequence number), and the
 * export file verified offline.
 */
#include <dirent.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/health.h"
#include "ketenhub/proto.h"
#include "ketenhub/trail_db.h"
#include "ketenhub/trail_file.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_audit"

static PGconn *s_db;
static unsigned char s_pk[KH_TRAIL_PUBLIC_KEY_SIZE];
static unsigned char s_sk[KH_TRAIL_SECRET_KEY_SIZE];

static void s_setup(void)
{
    ck_assert_int_ge(sodium_init(), 0);
    crypto_sign_keypair(s_pk, s_sk);
    s_db = khtest_db_fresh(S_DB);
}

static void s_teardown(void)
{
    PQfinish(s_db);
    s_db = NULL;
}

/* Whether sql fails (and the failure is rolled back to a savepoint). */
static bool s_refused(PGconn *conn, const char *sql)
{
    khtest_db_exec(conn, "SAVEPOINT try", 0, NULL);
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    PQclear(res);
    bool failed = st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK;
    khtest_db_exec(conn, failed ? "ROLLBACK TO SAVEPOINT try" : "RELEASE try",
                   0, NULL);
    return failed;
}

/* An event with varied fields, as the services write them. */
static const char *s_insert_sql =
    "INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    " delivery_id, partner_id, outcome, reason_code, payload_hash,"
    " rules_version, origin_service, origin_peer)"
    " SELECT 'partner', 'veilig-thuis', 'referral.accepted',"
    "  gen_random_uuid(), CASE WHEN random() < 0.5 THEN gen_random_uuid()"
    "  END, 'avim', 'ok', NULL, sha256(random()::text::bytea),"
    "  'v' || (random() * 100)::int, 'intake', '10.0.0.' ||"
    "  (random() * 250)::int";

/* n events; about one in ten is rolled back and leaves a gap. */
static void s_events(PGconn *conn, int n)
{
    for (int i = 0; i < n; i++) {
        bool gap = random() % 10 == 0;
        if (gap)
            khtest_db_exec(conn, "BEGIN", 0, NULL);
        khtest_db_exec(conn, s_insert_sql, 0, NULL);
        if (gap)
            khtest_db_exec(conn, "ROLLBACK", 0, NULL);
    }
}

/* n events without a gap in seq (the tests below name exact seqs). */
static void s_events_dense(int n)
{
    for (int i = 0; i < n; i++)
        khtest_db_exec(s_db, s_insert_sql, 0, NULL);
}

static kh_trail_sealer_t *s_sealer(long every)
{
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = every, .checkpoint_ms = 3600000, .batch = 500};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(s_sk, &cfg);
    ck_assert_ptr_nonnull(sealer);
    return sealer;
}

static long s_flush(kh_trail_sealer_t *sealer)
{
    kh_error_t err;
    kh_error_clear(&err);
    long n = kh_trail_sealer_flush(sealer, s_db, 10000, &err);
    ck_assert_msg(n >= 0, "flush: %s", err.message);
    return n;
}

/* A sealing step that refuses: taken again while it only waits for its
 * bound (a transaction of the database, such as autovacuum's, was running
 * when it took it), for up to 5 s. Its result and err. */
static long s_step_refused(kh_trail_sealer_t *sealer, kh_error_t *err)
{
    long rc = 0;
    kh_error_clear(err);
    for (int i = 0;
         i < 250 && (rc = kh_trail_sealer_step(sealer, s_db, NULL, err)) == 0;
         i++)
        zclock_sleep(20);
    return rc;
}

static int s_verify(const kh_trail_checkpoint_t *published, size_t np,
                    kh_trail_report_t *report)
{
    kh_error_t err;
    kh_error_clear(&err);
    int rc = kh_trail_db_verify(s_db, s_pk, 0, published, np, report, &err);
    ck_assert_msg(rc >= 0, "verify: %s", err.message);
    return rc;
}

START_TEST(sealed_trail_verifies)
{
    s_events(s_db, 500);
    kh_trail_sealer_t *sealer = s_sealer(100);
    long n = s_flush(sealer);
    long events = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    ck_assert_int_eq(n, events);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     events);
    ck_assert_int_ge(
        khtest_db_count(s_db, "SELECT count(*) FROM audit_checkpoints"),
        events / 100);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.events, events);
    ck_assert_int_eq(report.sealed, events);
    ck_assert_int_gt(report.checkpoints, 0);

    /* More events continue the chain; an explicit checkpoint covers the
     * head; nothing to do twice. */
    s_events(s_db, 50);
    s_flush(sealer);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_sealer_checkpoint(sealer, s_db, &err), 1);
    ck_assert_int_eq(kh_trail_sealer_checkpoint(sealer, s_db, &err), 0);
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.signed_seq, report.last_seq);

    /* Another key's checkpoints are refused. */
    unsigned char pk2[32], sk2[64];
    crypto_sign_keypair(pk2, sk2);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_db_verify(s_db, pk2, 0, NULL, 0, &report, &err),
                     1);
    ck_assert_int_eq(report.kind, KH_TRAIL_BAD_SIGNATURE);
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

START_TEST(seals_wait_for_a_lower_seq_still_in_flight)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *slow = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(slow), CONNECTION_OK);
    s_events(s_db, 3);
    /* slow takes the next seq and keeps it uncommitted; later events
     * commit with higher seqs. */
    khtest_db_exec(slow, "BEGIN", 0, NULL);
    khtest_db_exec(slow, s_insert_sql, 0, NULL);
    char *held = khtest_db_value(slow, "SELECT max(seq) FROM audit_events");
    khtest_db_exec(s_db, s_insert_sql, 0, NULL);
    khtest_db_exec(s_db, s_insert_sql, 0, NULL);

    kh_trail_sealer_t *sealer = s_sealer(1000);
    kh_error_t err;
    for (int i = 0; i < 5; i++)
        ck_assert_int_ge(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
    /* Nothing at or above the held seq is sealed while it may commit (nor,
     * as the bound was taken with it running, what came before). */
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_seals WHERE seq >= %s", held);
    ck_assert_int_eq(khtest_db_count(s_db, sql), 0);
    ck_assert_int_le(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     3);
    /* The wait is visible (the service warns when it lasts). */
    usleep(20000);
    ck_assert_int_ge(kh_trail_sealer_waiting_ms(sealer), 20);
    khtest_db_exec(slow, "COMMIT", 0, NULL);
    s_flush(sealer);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     6);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.sealed, 6);
    kh_trail_sealer_destroy(&sealer);
    free(held);
    free(conninfo);
    PQfinish(slow);
}
END_TEST

/* Nothing at or above seq held is sealed. */
static void s_nothing_sealed_from(const char *held)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_seals WHERE seq >= %s", held);
    ck_assert_int_eq(khtest_db_count(s_db, sql), 0);
}

/* A transaction left open (a backup, a long export, a session idle in
 * one) holds up sealing past the bound taken while it runs, never the
 * signing of what is sealed: the sealed head gets its checkpoint every
 * checkpoint_ms all the same. It stayed unsigned for as long as that
 * transaction lasted. */
START_TEST(a_transaction_left_open_does_not_hold_up_checkpoints)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *slow = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(slow), CONNECTION_OK);
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = 1000000, .checkpoint_ms = 1500, .batch = 500};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(s_sk, &cfg);
    ck_assert_ptr_nonnull(sealer);
    s_events_dense(3);
    s_flush(sealer); /* and its first checkpoint */
    s_events_dense(3);
    s_flush(sealer); /* within checkpoint_ms: sealed, not signed */
    const char *signed_sql = "SELECT count(*) FROM audit_checkpoints WHERE"
                             " seq = (SELECT max(seq) FROM audit_seals)";
    ck_assert_int_eq(khtest_db_count(s_db, signed_sql), 0);

    khtest_db_exec(slow, "BEGIN", 0, NULL);
    khtest_db_exec(slow, s_insert_sql, 0, NULL);
    char *held = khtest_db_value(slow, "SELECT max(seq) FROM audit_events");
    khtest_db_exec(s_db, s_insert_sql, 0, NULL);
    kh_error_t err;
    bool signed_head = false;
    for (int i = 0; i < 80 && !signed_head; i++) {
        ck_assert_int_ge(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
        signed_head = khtest_db_count(s_db, signed_sql) == 1;
        usleep(50000);
    }
    ck_assert_msg(signed_head, "the sealed head was not signed in 4 s");
    s_nothing_sealed_from(held);
    khtest_db_exec(slow, "COMMIT", 0, NULL);
    s_flush(sealer);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.sealed, 8);
    kh_trail_sealer_destroy(&sealer);
    free(held);
    free(conninfo);
    PQfinish(slow);
}
END_TEST

/* A prepared transaction (PREPARE TRANSACTION) holds no virtualxid lock:
 * one that holds a seq is waited for like a running one, whether it was
 * prepared before the sealer took its bound or while the bound waited for
 * it. Both then commit, and the trail verifies. */
START_TEST(seals_wait_for_a_prepared_transaction)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *slow = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(slow), CONNECTION_OK);
    s_events(s_db, 3);
    long before = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    kh_trail_sealer_t *sealer = s_sealer(1000);
    s_flush(sealer);

    /* Prepared before the bound. */
    khtest_db_exec(slow, "BEGIN", 0, NULL);
    khtest_db_exec(slow, s_insert_sql, 0, NULL);
    char *held = khtest_db_value(slow, "SELECT max(seq) FROM audit_events");
    khtest_db_exec(slow, "PREPARE TRANSACTION 'kh-test-before'", 0, NULL);
    khtest_db_exec(s_db, s_insert_sql, 0, NULL);
    kh_error_t err;
    for (int i = 0; i < 5; i++)
        ck_assert_int_ge(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
    s_nothing_sealed_from(held);
    usleep(20000);
    ck_assert_int_ge(kh_trail_sealer_waiting_ms(sealer), 20);
    khtest_db_exec(s_db, "COMMIT PREPARED 'kh-test-before'", 0, NULL);
    s_flush(sealer);
    free(held);

    /* Running when the bound is taken, prepared while it waits. */
    khtest_db_exec(slow, "BEGIN", 0, NULL);
    khtest_db_exec(slow, s_insert_sql, 0, NULL);
    held = khtest_db_value(slow, "SELECT max(seq) FROM audit_events");
    khtest_db_exec(s_db, s_insert_sql, 0, NULL);
    ck_assert_int_ge(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
    khtest_db_exec(slow, "PREPARE TRANSACTION 'kh-test-while'", 0, NULL);
    for (int i = 0; i < 5; i++)
        ck_assert_int_ge(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
    s_nothing_sealed_from(held);
    khtest_db_exec(s_db, "COMMIT PREPARED 'kh-test-while'", 0, NULL);
    s_flush(sealer);

    long events = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    ck_assert_int_eq(events, before + 4);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     events);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.sealed, events);
    kh_trail_sealer_destroy(&sealer);
    free(held);
    free(conninfo);
    PQfinish(slow);
}
END_TEST

START_TEST(roles_cannot_change_the_trail)
{
    static const char *roles[] = {"ketenhub_intake",       "ketenhub_routing",
                                  "ketenhub_notification", "ketenhub_audit",
                                  "ketenhub_admin",        "ketenhub_auditor"};
    static const char *tables[] = {"audit_events", "audit_seals",
                                   "audit_checkpoints"};
    s_events(s_db, 5);
    kh_trail_sealer_t *sealer = s_sealer(2);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    int refused = 0;
    for (size_t r = 0; r < sizeof roles / sizeof *roles; r++) {
        khtest_db_exec(s_db, "BEGIN", 0, NULL);
        char sql[256];
        snprintf(sql, sizeof sql, "SET LOCAL ROLE %s", roles[r]);
        khtest_db_exec(s_db, sql, 0, NULL);
        for (size_t t = 0; t < 3; t++) {
            static const char *attempts[][2] = {
                {"UPDATE ", " SET seq = seq"},
                {"DELETE FROM ", ""},
                {"TRUNCATE ", ""},
                {"ALTER TABLE ", " DISABLE TRIGGER USER"},
                {"ALTER TABLE ", " DISABLE TRIGGER ALL"},
                {"DROP TABLE ", ""},
                {"ALTER TABLE ", " OWNER TO CURRENT_USER"}};
            for (size_t a = 0; a < sizeof attempts / sizeof *attempts; a++) {
                snprintf(sql, sizeof sql, "%s%s%s", attempts[a][0], tables[t],
                         attempts[a][1]);
                ck_assert_msg(s_refused(s_db, sql), "%s may: %s", roles[r],
                              sql);
                refused++;
            }
        }
        /* The auditor reads only the views. */
        if (strcmp(roles[r], "ketenhub_auditor") == 0) {
            ck_assert(s_refused(s_db, "SELECT * FROM audit_events"));
            ck_assert(s_refused(s_db, "INSERT INTO audit_events (actor_kind,"
                                      " actor_id, action, outcome,"
                                      " origin_service) VALUES ('auditor',"
                                      " 'x', 'trail.queried', 'ok', 'x')"));
            ck_assert(!s_refused(s_db, "SELECT count(*) FROM audit_trail"));
            ck_assert(!s_refused(s_db, "SELECT audit_record_access("
                                       "'trail.queried', 'auditor', 'x',"
                                       " 'ok', NULL, NULL, 'test', NULL)"));
            ck_assert(s_refused(s_db, "SELECT audit_record_access("
                                      "'referral.accepted', 'auditor', 'x',"
                                      " 'ok', NULL, NULL, 'test', NULL)"));
        }
        khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
    }
    ck_assert_int_eq(refused, 6 * 3 * 7);
    /* Even a superuser, and in replica mode, meets the triggers. */
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    khtest_db_exec(s_db, "SET LOCAL session_replication_role = replica", 0,
                   NULL);
    for (size_t t = 0; t < 3; t++) {
        char sql[128];
        snprintf(sql, sizeof sql, "DELETE FROM %s", tables[t]);
        ck_assert(s_refused(s_db, sql));
        snprintf(sql, sizeof sql, "TRUNCATE %s", tables[t]);
        ck_assert(s_refused(s_db, sql));
    }
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
}
END_TEST

/* Each role does its work with its grants alone: a service writes events,
 * the audit service seals, the auditor verifies, exports and has its
 * access recorded, through the views. */
START_TEST(least_privilege_roles_do_their_work)
{
    PGconn *intake =
        khtest_db_login(s_db, S_DB, "kh_test_intake", "ketenhub_intake");
    PGconn *sealer_db =
        khtest_db_login(s_db, S_DB, "kh_test_sealer", "ketenhub_audit");
    PGconn *auditor =
        khtest_db_login(s_db, S_DB, "kh_test_auditor", "ketenhub_auditor");
    s_events(intake, 50);
    PGresult *res = PQexec(intake, "SELECT count(*) FROM audit_events");
    ck_assert_int_ne(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);

    kh_trail_sealer_t *sealer = s_sealer(10);
    kh_error_t err;
    kh_error_clear(&err);
    long events = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    long n = kh_trail_sealer_flush(sealer, sealer_db, 10000, &err);
    ck_assert_msg(n == events, "sealed %ld: %s", n, err.message);
    kh_trail_sealer_destroy(&sealer);

    kh_trail_report_t report;
    ck_assert_int_eq(
        kh_trail_db_verify(auditor, s_pk, 0, NULL, 0, &report, &err), 0);
    ck_assert_int_eq(report.sealed, events);
    /* The auditor's own second connection shares the snapshot. */
    ck_assert_int_eq(report.streams, 2);
    ck_assert_int_eq(
        kh_trail_db_record_access(auditor, "trail.verified", "auditor", "ok",
                                  NULL, "from_checkpoint=0", "test", &err),
        0);
    /* The access names the login, whatever the client says of itself
     * (025): that goes to origin_peer as USER@HOST. */
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT count(*) FROM audit_events WHERE action"
                              " = 'trail.verified' AND actor_kind = 'auditor'"
                              " AND actor_id = 'kh_test_auditor'"
                              " AND origin_peer LIKE '_%@_%'"),
        1);
    char *dir = khtest_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/x.jsonl", dir);
    FILE *f = fopen(path, "w");
    long count = 0;
    ck_assert_int_eq(kh_trail_export(auditor, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    ck_assert_int_eq(count, events + 1);
    khtest_rmtree(dir);
    free(dir);
    res = PQexec(auditor, "SELECT count(*) FROM audit_events");
    ck_assert_int_ne(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);

    /* A superuser's edit: the auditor's verification names it. */
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(
        s_db, "UPDATE audit_events SET actor_id = 'x' WHERE seq = 20", 0, NULL);
    ck_assert_int_eq(
        kh_trail_db_verify(auditor, s_pk, 0, NULL, 0, &report, &err), 1);
    ck_assert_int_eq(report.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(report.seq, 20);
    PQfinish(intake);
    PQfinish(sealer_db);
    PQfinish(auditor);
}
END_TEST

/* ---- tamper trials ---- */

typedef struct {
    int64_t *seqs; /* sealed events, ascending */
    int nseqs;
    int64_t *gaps; /* unused seq values inside the sealed range */
    int ngaps;
    kh_trail_checkpoint_t *cps;
    size_t ncps;
} s_trail_t;

static int64_t *s_int_list(const char *sql, int *n)
{
    PGresult *res = PQexec(s_db, sql);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    *n = PQntuples(res);
    int64_t *out = calloc((size_t) *n + 1, sizeof *out);
    for (int i = 0; i < *n; i++)
        out[i] = strtoll(PQgetvalue(res, i, 0), NULL, 10);
    PQclear(res);
    return out;
}

static void s_trail_load(s_trail_t *t)
{
    t->seqs = s_int_list("SELECT seq FROM audit_seals ORDER BY seq", &t->nseqs);
    t->gaps = s_int_list(
        "SELECT g FROM generate_series((SELECT min(seq) FROM audit_seals),"
        " (SELECT max(seq) FROM audit_seals)) g WHERE NOT EXISTS (SELECT 1"
        " FROM audit_events WHERE seq = g)",
        &t->ngaps);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_db_checkpoints(s_db, &t->cps, &t->ncps, &err), 0);
    ck_assert_int_gt(t->nseqs, 100);
    ck_assert_int_gt(t->ngaps, 5);
    ck_assert_int_gt((int) t->ncps, 5);
}

static void s_sqlf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void s_sqlf(const char *fmt, ...)
{
    char sql[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    khtest_db_exec(s_db, sql, 0, NULL);
}

/* One trial of kind k; checks the verdict. The tampering is rolled back
 * after verification in its own transaction, or (commit) committed and
 * verified afterwards, as `ketenhubctl audit verify` does it. */
static void s_trial(const s_trail_t *t, kh_trail_finding_t k, int trial,
                    bool commit)
{
    kh_trail_report_t report;
    kh_trail_finding_t want_kind = k;
    int64_t want = 0, other = -1;
    const kh_trail_checkpoint_t *published = NULL;
    size_t npublished = 0;
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db, "ALTER TABLE audit_seals DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db, "ALTER TABLE audit_checkpoints DISABLE TRIGGER USER",
                   0, NULL);
    /* Never the last event: removing it is truncation. */
    int si = (int) (random() % (t->nseqs - 1));
    int64_t s = t->seqs[si];
    /* The event before s; when a rollback left a gap between them, an
     * event removed there with its seal would break the chain at s just
     * as s altered does, and the verifier names the seq after it. */
    int64_t before = si ? t->seqs[si - 1] : 0;
    switch (k) {
    case KH_TRAIL_ALTERED:
        want = s;
        if (before != s - 1) {
            want_kind = KH_TRAIL_MISSING;
            want = before + 1;
        }
        switch (random() % 4) {
        case 0: /* one character of the actor */
            s_sqlf("UPDATE audit_events SET actor_id = overlay(actor_id"
                   " placing CASE WHEN substr(actor_id, 2, 1) = 'q' THEN 'r'"
                   " ELSE 'q' END from 2 for 1) WHERE seq = %lld",
                   (long long) s);
            break;
        case 1: /* one microsecond */
            s_sqlf("UPDATE audit_events SET at = at + interval '1 microsecond'"
                   " WHERE seq = %lld",
                   (long long) s);
            break;
        case 2: { /* one bit of the payload hash */
            int byte = (int) (random() % 32);
            s_sqlf("UPDATE audit_events SET payload_hash = set_byte("
                   "payload_hash, %d, get_byte(payload_hash, %d) # 1)"
                   " WHERE seq = %lld",
                   byte, byte, (long long) s);
            break;
        }
        default: /* one byte of the peer */
            s_sqlf("UPDATE audit_events SET origin_peer = origin_peer || '0'"
                   " WHERE seq = %lld",
                   (long long) s);
            break;
        }
        break;
    case KH_TRAIL_MISSING:
        want = s;
        s_sqlf("DELETE FROM audit_events WHERE seq = %lld", (long long) s);
        /* Half the time its seal goes too: only the chain tells, at the
         * next event, and the first seq that may be wrong is named. */
        if (trial / 6 % 2) {
            s_sqlf("DELETE FROM audit_seals WHERE seq = %lld", (long long) s);
            want = before + 1;
        }
        break;
    case KH_TRAIL_INSERTED:
        want = t->gaps[random() % t->ngaps];
        s_sqlf("INSERT INTO audit_events (seq, actor_kind, actor_id, action,"
               " outcome, origin_service) VALUES (%lld, 'admin', 'mallory',"
               " 'partner.added', 'ok', 'ketenhubctl')",
               (long long) want);
        break;
    case KH_TRAIL_REORDERED: {
        int i = (int) (random() % (t->nseqs - 1));
        int j = i + 1 + (int) (random() % (t->nseqs - 1 - i));
        want = t->seqs[i];
        other = t->seqs[j];
        s_sqlf("UPDATE audit_events SET seq = -1 WHERE seq = %lld",
               (long long) want);
        s_sqlf("UPDATE audit_events SET seq = %lld WHERE seq = %lld",
               (long long) want, (long long) other);
        s_sqlf("UPDATE audit_events SET seq = %lld WHERE seq = -1",
               (long long) other);
        break;
    }
    case KH_TRAIL_TRUNCATED: {
        /* After a checkpoint that is not the last; half the time the
         * seals and later checkpoints go too, and only the published
         * checkpoints tell. */
        const kh_trail_checkpoint_t *c = &t->cps[random() % (t->ncps - 1)];
        want = c->seq + 1;
        other = c->seq;
        s_sqlf("DELETE FROM audit_events WHERE seq > %lld", (long long) c->seq);
        if (trial / 6 % 2) {
            s_sqlf("DELETE FROM audit_seals WHERE seq > %lld",
                   (long long) c->seq);
            s_sqlf("DELETE FROM audit_checkpoints WHERE seq > %lld",
                   (long long) c->seq);
            published = t->cps;
            npublished = t->ncps;
        }
        break;
    }
    case KH_TRAIL_BAD_SIGNATURE: {
        const kh_trail_checkpoint_t *c = &t->cps[random() % t->ncps];
        int byte = (int) (random() % 64);
        want = c->seq;
        s_sqlf("UPDATE audit_checkpoints SET signature = set_byte(signature,"
               " %d, get_byte(signature, %d) # %d) WHERE seq = %lld",
               byte, byte, 1 + (int) (random() % 255), (long long) c->seq);
        break;
    }
    default:
        break;
    }
    int rc;
    if (commit) {
        khtest_db_exec(s_db, "COMMIT", 0, NULL);
        rc = s_verify(published, npublished, &report);
    } else {
        rc = s_verify(published, npublished, &report);
        khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
    }
    ck_assert_msg(rc == 1 && report.kind == want_kind && report.seq == want &&
                      (other < 0 || report.other_seq == other),
                  "trial %d (%s): got %s at %lld (other %lld), want %s at "
                  "%lld (other %lld): %s",
                  trial, kh_trail_finding_name(k),
                  kh_trail_finding_name(report.kind), (long long) report.seq,
                  (long long) report.other_seq,
                  kh_trail_finding_name(want_kind), (long long) want,
                  (long long) other, report.detail);
}

START_TEST(every_tampering_is_found_with_its_seq)
{
    srandom(7513);
    s_events(s_db, 1200);
    kh_trail_sealer_t *sealer = s_sealer(100);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    s_trail_t t;
    s_trail_load(&t);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(t.cps, t.ncps, &report), 0);

    static const kh_trail_finding_t kinds[] = {
        KH_TRAIL_ALTERED,   KH_TRAIL_MISSING,   KH_TRAIL_INSERTED,
        KH_TRAIL_REORDERED, KH_TRAIL_TRUNCATED, KH_TRAIL_BAD_SIGNATURE};
    const char *env = getenv("KH_AUDIT_TRIALS");
    /* 1,000 per kind; under the sanitizers (several times slower) 200
     * per kind, still 1,200 in all. */
#if defined(__SANITIZE_ADDRESS__)
    int trials = env && atoi(env) > 0 ? atoi(env) : 1200;
#else
    int trials = env && atoi(env) > 0 ? atoi(env) : 6000;
#endif
    int per_kind[6] = {0};
    for (int i = 0; i < trials; i++) {
        s_trial(&t, kinds[i % 6], i, false);
        per_kind[i % 6]++;
    }
    printf("tamper trials: %d, all found (altered %d, missing %d, inserted "
           "%d, reordered %d, truncated %d, bad signature %d)\n",
           trials, per_kind[0], per_kind[1], per_kind[2], per_kind[3],
           per_kind[4], per_kind[5]);
    /* The trials left nothing behind. */
    ck_assert_int_eq(s_verify(t.cps, t.ncps, &report), 0);
    free(t.seqs);
    free(t.gaps);
    free(t.cps);
}
END_TEST

/* Verify from checkpoint from (0: the start) on the fast path, which must
 * read the intact trail in two streams, and again in a transaction (the
 * full pass): both say intact and count the same. The fast report. */
static kh_trail_report_t s_verify_both(int64_t from)
{
    kh_error_t err;
    kh_trail_report_t fast, full;
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, from, NULL, 0, &fast, &err),
                     0);
    ck_assert_int_eq(fast.streams, 2);
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, from, NULL, 0, &full, &err),
                     0);
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
    ck_assert_int_eq(full.streams, 0);
    ck_assert_int_eq(fast.events, full.events);
    ck_assert_int_eq(fast.sealed, full.sealed);
    ck_assert_int_eq(fast.unsealed, full.unsealed);
    ck_assert_int_eq(fast.checkpoints, full.checkpoints);
    ck_assert_int_eq(fast.first_seq, full.first_seq);
    ck_assert_int_eq(fast.last_seq, full.last_seq);
    ck_assert_int_eq(fast.signed_seq, full.signed_seq);
    return fast;
}

/* Verification in a transaction of its own takes the fast path first;
 * every kind of tampering, committed, sends it to the full pass. */
START_TEST(committed_tampering_is_found_too)
{
    static const kh_trail_finding_t kinds[] = {
        KH_TRAIL_ALTERED,   KH_TRAIL_MISSING,   KH_TRAIL_INSERTED,
        KH_TRAIL_REORDERED, KH_TRAIL_TRUNCATED, KH_TRAIL_BAD_SIGNATURE};
    srandom(8151);
    for (int k = 0; k < 12; k++) {
        if (k > 0) {
            PQfinish(s_db);
            s_db = khtest_db_fresh(S_DB);
        }
        s_events(s_db, 400);
        kh_trail_sealer_t *sealer = s_sealer(40);
        s_flush(sealer);
        kh_trail_sealer_destroy(&sealer);
        s_trail_t t;
        s_trail_load(&t);
        /* Intact: the fast path said so, reading two halves side by
         * side, and counted what the full pass counts. */
        ck_assert_int_eq(s_verify_both(0).sealed, t.nseqs);
        s_trial(&t, kinds[k % 6], k, true);
        free(t.seqs);
        free(t.gaps);
        free(t.cps);
    }
}
END_TEST

/* Verification from a checkpoint (--from-checkpoint) trusts the trail up
 * to it: the fast path starts at its signed head, counts as the full pass
 * does, and a change after it is found while one before it is not looked
 * at. */
START_TEST(verify_from_a_checkpoint)
{
    s_events(s_db, 400);
    kh_trail_sealer_t *sealer = s_sealer(40);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    s_trail_t t;
    s_trail_load(&t);
    ck_assert_uint_ge(t.ncps, 6);
    int64_t from = t.cps[2].seq;
    kh_trail_report_t fast = s_verify_both(from);
    ck_assert_int_gt(fast.first_seq, from);
    kh_error_t err;
    /* Changed before the checkpoint: outside what was asked for. */
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    char sql[160];
    snprintf(sql, sizeof sql,
             "UPDATE audit_events SET outcome = 'failed' WHERE seq = %lld",
             (long long) t.seqs[1]);
    khtest_db_exec(s_db, sql, 0, NULL);
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, from, NULL, 0, &fast, &err),
                     0);
    /* Changed after it, in the second half: named. */
    int64_t late = t.seqs[t.nseqs - 3];
    snprintf(sql, sizeof sql,
             "UPDATE audit_events SET outcome = 'failed' WHERE seq = %lld",
             (long long) late);
    khtest_db_exec(s_db, sql, 0, NULL);
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, from, NULL, 0, &fast, &err),
                     1);
    ck_assert_int_eq(fast.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(fast.seq, late);
    free(t.seqs);
    free(t.gaps);
    free(t.cps);
}
END_TEST

/* Long stretches between checkpoints (more events than one batch of the
 * fast pass) verify, and an edit in the middle of one is found. */
START_TEST(long_stretches_between_checkpoints)
{
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " referral_id, outcome, payload_hash, origin_service)"
                   " SELECT 'partner', 'veilig-thuis', 'referral.accepted',"
                   " md5(i::text)::uuid, 'ok', sha256(i::text::bytea), 'intake'"
                   " FROM generate_series(1, 30000) i",
                   0, NULL);
    kh_trail_sealer_t *sealer = s_sealer(100000);
    ck_assert_int_eq(s_flush(sealer), 30000);
    /* (The first seal already signed its head: no checkpoint existed.) */
    kh_error_t err;
    ck_assert_int_ge(kh_trail_sealer_checkpoint(sealer, s_db, &err), 0);
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, origin_service) SELECT 'service', 'routing',"
                   " 'rules.reloaded', 'ok', 'routing' FROM generate_series(1,"
                   " 20000)",
                   0, NULL);
    ck_assert_int_eq(s_flush(sealer), 20000);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    ck_assert_int_eq(report.sealed, 50000);
    ck_assert_int_eq(report.signed_seq, 30000);
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db,
                   "UPDATE audit_events SET outcome = 'failed' WHERE seq ="
                   " 15000",
                   0, NULL);
    khtest_db_exec(s_db,
                   "UPDATE audit_events SET outcome = 'failed' WHERE seq ="
                   " 45000",
                   0, NULL);
    ck_assert_int_eq(s_verify(NULL, 0, &report), 1);
    ck_assert_int_eq(report.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(report.seq, 15000);
    khtest_db_exec(s_db,
                   "UPDATE audit_events SET outcome = 'ok' WHERE seq = 15000",
                   0, NULL);
    ck_assert_int_eq(s_verify(NULL, 0, &report), 1);
    ck_assert_int_eq(report.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(report.seq, 45000);
}
END_TEST

/* The audit service killed with SIGKILL while it seals, again and again:
 * each restart goes on from the sealed head, and the trail verifies. */
START_TEST(service_killed_while_sealing_loses_nothing)
{
    char *dir = khtest_tmpdir();
    char sk_path[512], pk_path[512], log[512], env_db[1200], env_key[600];
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", dir);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", dir);
    snprintf(log, sizeof log, "%s/audit.log", dir);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    unsigned char pk[32], sk[64];
    ck_assert_int_eq(kh_trail_load_public(pk_path, pk, &err), 0);
    ck_assert_int_eq(kh_trail_load_secret(sk_path, sk, &err), 0);
    char *conninfo = khtest_db_conninfo(S_DB);
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", conninfo);
    snprintf(env_key, sizeof env_key, "KH_AUDIT_KEY=%s", sk_path);
    char *env[] = {env_db,
                   env_key,
                   "KH_AUDIT_POLL_MS=10",
                   "KH_LOG_LEVEL=debug", /* a line per sealing step */
                   "KH_AUDIT_CHECKPOINT_EVERY=50",
                   "KH_AUDIT_CHECKPOINT_MS=20",
                   "KH_AUDIT_BATCH=100",
                   NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    const char *bin = KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit";
    char last[512];
    snprintf(last, sizeof last, "%s/audit-last.log", dir);
    for (int round = 0; round < 6; round++) {
        pid_t pid = khproc_spawn(bin, argv, env, round == 5 ? last : log);
        ck_assert_int_gt(pid, 0);
        /* The SIGTERM of the last round must find the signals taken over
         * (a busy machine can take longer than the round's wait to get
         * there, and the default action would end the process). */
        if (round == 5)
            ck_assert(khtest_log_has(last, "event=config", 10000));
        /* The ready line names the public key that signs (after a
         * rotation of the audit key: the new one). */
        if (round == 5) {
            char ready[128], hex[65];
            kh_trail_hex(pk, sizeof pk, hex);
            snprintf(ready, sizeof ready, "event=ready public_key=%s", hex);
            ck_assert(khtest_log_has(last, ready, 10000));
        }
        khtest_db_exec(s_db,
                       "INSERT INTO audit_events (actor_kind, actor_id, action,"
                       " outcome, origin_service) SELECT 'service', 'routing',"
                       " 'rules.reloaded', 'ok', 'routing' FROM"
                       " generate_series(1, 3000)",
                       0, NULL);
        usleep(20000 + 15000 * round);
        int status = khproc_stop(pid, round == 5 ? SIGTERM : SIGKILL, 5000);
        if (round == 5)
            ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                          "status %d", status);
    }
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = 50, .checkpoint_ms = 3600000, .batch = 1000};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(sk, &cfg);
    ck_assert_ptr_nonnull(sealer);
    ck_assert_int_ge(kh_trail_sealer_flush(sealer, s_db, 10000, &err), 0);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_report_t report;
    ck_assert_int_eq(kh_trail_db_verify(s_db, pk, 0, NULL, 0, &report, &err),
                     0);
    ck_assert_int_eq(report.sealed, 18000);
    ck_assert_int_gt(report.checkpoints, 300);
    char *text = khtest_read_file(log), *text_last = khtest_read_file(last);
    ck_assert(strstr(text ? text : "", "event=sealed") ||
              strstr(text_last ? text_last : "", "event=sealed"));
    free(text);
    free(text_last);
    free(conninfo);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Sealing steps come every KH_AUDIT_POLL_MS while events keep coming in:
 * at info level the service sums them up (event=stats, at most every
 * 10 s and at its stop) rather than a line a step, which flooded the log
 * at 5 lines a second under steady load. */
START_TEST(steady_sealing_is_summed_up_not_logged_step_by_step)
{
    char *dir = khtest_tmpdir();
    char sk_path[512], pk_path[512], log[512], env_db[1200], env_key[600];
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", dir);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", dir);
    snprintf(log, sizeof log, "%s/audit.log", dir);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    char *conninfo = khtest_db_conninfo(S_DB);
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", conninfo);
    snprintf(env_key, sizeof env_key, "KH_AUDIT_KEY=%s", sk_path);
    char *env[] = {env_db, env_key, "KH_AUDIT_POLL_MS=10",
                   "KH_HEALTH_ENDPOINT=none", NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    ck_assert(khtest_log_has(log, "event=ready", 10000));
    long before = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    for (int i = 0; i < 20; i++) { /* 20 steps or more, 2 events each */
        s_events(s_db, 2);
        usleep(50 * 1000);
    }
    long total = khtest_db_count(s_db, "SELECT count(*) FROM audit_events");
    ck_assert(khtest_wait_count(s_db,
                                "SELECT count(*) FROM audit_events e WHERE"
                                " NOT EXISTS (SELECT 1 FROM audit_seals s"
                                " WHERE s.seq = e.seq)",
                                0, 10000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(log);
    int steps = 0;
    for (const char *p = text; p && (p = strstr(p, "event=sealed")); p++)
        steps++;
    ck_assert_msg(steps == 0, "%d lines event=sealed at info level: see %s",
                  steps, log);
    /* The sum says what was sealed: all of it, in one or two lines. */
    long sealed = 0;
    int lines = 0;
    for (const char *p = text; p && (p = strstr(p, "event=stats")); p++) {
        const char *n = strstr(p, "sealed=");
        ck_assert_ptr_nonnull(n);
        sealed += strtol(n + 7, NULL, 10);
        lines++;
    }
    free(text);
    ck_assert_int_le(lines, 2);
    ck_assert_int_eq(sealed, total - before);
    free(conninfo);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Wait until the service at health answers /readyz with code and a body
 * holding text (NULL: any). */
static bool s_readyz(const char *health, int code, const char *text,
                     int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 50) {
        char *body = NULL;
        kh_error_t err;
        int got = kh_http_get(health, "/readyz", 2000, &body, &err);
        bool ok = got == code && (!text || (body && strstr(body, text)));
        free(body);
        if (ok)
            return true;
        usleep(50 * 1000);
    }
    return false;
}

/* Whether the test database takes new connections (those made stay). */
static void s_allow_connections(bool allow)
{
    khtest_db_allow_connections(S_DB, allow);
}

/* A backlog is sealed a few batches a transaction (five), each round
 * going on from the last, which the service sees between them (a stop
 * among them); the trail is whole at the end. */
START_TEST(a_backlog_is_sealed_a_few_batches_a_transaction)
{
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, origin_service) SELECT 'service', 'routing',"
                   " 'rules.reloaded', 'ok', 'routing'"
                   " FROM generate_series(1, 1234)",
                   0, NULL);
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = 100000, .checkpoint_ms = 3600000, .batch = 100};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(s_sk, &cfg);
    ck_assert_ptr_nonnull(sealer);
    kh_error_t err;
    long total = 0;
    int rounds = 0;
    for (long n = 0; rounds == 0 || kh_trail_sealer_behind(sealer); rounds++) {
        n = s_step_refused(sealer, &err);
        ck_assert_msg(n >= 0, "%s", err.message);
        ck_assert_int_le(n, 500);
        ck_assert_int_eq(kh_trail_sealer_waiting_ms(sealer), 0);
        total += n;
        ck_assert_int_lt(rounds, 10);
    }
    ck_assert_int_eq(total, 1234);
    ck_assert_int_eq(rounds, 3);
    /* While another sealer holds the lock, a round seals nothing and is
     * not behind: the service waits its poll, it does not spin. */
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *other = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(other), CONNECTION_OK);
    khtest_db_exec(other, "SELECT pg_advisory_lock(7513815)", 0, NULL);
    s_events(s_db, 3);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
        ck_assert(!kh_trail_sealer_behind(sealer));
    }
    PQfinish(other);
    free(conninfo);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     1234);
    kh_trail_report_t report;
    ck_assert_int_eq(s_verify(NULL, 0, &report), 0);
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

/* A run of the audit service in a test: a key pair and its log in a new
 * directory, a health endpoint on a free port, and the settings for them
 * and the test database. */
typedef struct {
    char *dir, *conninfo;
    char sk_path[512], pk_path[512], log[512], health[64];
    char env_db[1200], env_key[600], env_health[100];
} s_svc_t;

static void s_svc_new(s_svc_t *svc)
{
    svc->dir = khtest_tmpdir();
    snprintf(svc->health, sizeof svc->health, "127.0.0.1:%d",
             khproc_free_port());
    snprintf(svc->env_health, sizeof svc->env_health, "KH_HEALTH_ENDPOINT=%s",
             svc->health);
    snprintf(svc->sk_path, sizeof svc->sk_path, "%s/hub-audit.key", svc->dir);
    snprintf(svc->pk_path, sizeof svc->pk_path, "%s/hub-audit.pub", svc->dir);
    snprintf(svc->log, sizeof svc->log, "%s/audit.log", svc->dir);
    kh_error_t err;
    ck_assert_int_eq(
        kh_trail_keygen(svc->sk_path, svc->pk_path, NULL, false, &err), 0);
    svc->conninfo = khtest_db_conninfo(S_DB);
    snprintf(svc->env_db, sizeof svc->env_db, "KH_DATABASE_URL=%s",
             svc->conninfo);
    snprintf(svc->env_key, sizeof svc->env_key, "KH_AUDIT_KEY=%s",
             svc->sk_path);
}

static void s_svc_free(s_svc_t *svc)
{
    free(svc->conninfo);
    khtest_rmtree(svc->dir);
    free(svc->dir);
}

/* A poll longer than the watchdog's limit (KH_AUDIT_POLL_MS 30 s,
 * KH_WATCHDOG_S 10): the service waits in slices that beat, so it is not
 * taken for hung, and a SIGTERM during the wait ends it at once. */
START_TEST(a_long_poll_is_no_silence)
{
    s_svc_t svc;
    s_svc_new(&svc);
    const char *log = svc.log, *health = svc.health;
    char *env_db = svc.env_db, *env_key = svc.env_key;
    char *env_health = svc.env_health;
    kh_error_t err;
    char *env[] = {
        env_db,     env_key, "KH_AUDIT_POLL_MS=30000", "KH_WATCHDOG_S=10",
        env_health, NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    ck_assert(s_readyz(health, 200, "ready audit", 10000));
    sleep(12);
    ck_assert_msg(waitpid(pid, NULL, WNOHANG) == 0, "audit ended: see %s", log);
    char *body = NULL;
    ck_assert_int_eq(kh_http_get(health, "/livez", 2000, &body, &err), 200);
    free(body);
    int64_t t0 = zclock_mono();
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ck_assert_int_lt(zclock_mono() - t0, 3000);
    ck_assert(!khtest_log_has(log, "kind=hung", 0));
    s_svc_free(&svc);
}
END_TEST

/* The audit service started while its database refuses connections, then
 * losing its connection: it tries again ever more slowly (a warning per
 * attempt, not one per poll), and says when it has its database back.
 * Meanwhile /readyz answers 503, even while the health probe's own
 * connection still answers. */
START_TEST(service_waits_for_its_database_and_says_when_it_is_back)
{
    s_svc_t svc;
    s_svc_new(&svc);
    const char *log = svc.log, *health = svc.health;
    char *env_db = svc.env_db, *env_key = svc.env_key;
    char *env_health = svc.env_health;
    char *env[] = {env_db, env_key, "KH_AUDIT_POLL_MS=10", env_health, NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    s_allow_connections(false);
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    ck_assert(khtest_log_has(log, "event=db_unavailable", 10000));
    usleep(1500 * 1000);
    char *text = khtest_read_file(log);
    int warnings = 0;
    for (const char *p = text; p && (p = strstr(p, "event=db_unavailable"));
         p++)
        warnings++;
    free(text);
    ck_assert_msg(warnings <= 6, "%d warnings in 1.5 s", warnings);

    ck_assert(s_readyz(health, 503, "not ready: database unreachable", 5000));

    s_allow_connections(true);
    ck_assert(khtest_log_has(log, "event=ready", 10000));
    ck_assert(s_readyz(health, 200, "ready audit", 5000));
    /* Its connection is lost, and it cannot connect for a while; the
     * health probe keeps the connection it has. */
    s_allow_connections(false);
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'audit'",
                   0, NULL);
    ck_assert(khtest_wait_count(s_db,
                                "SELECT count(*) FROM pg_stat_activity"
                                " WHERE application_name = 'audit'",
                                0, 5000));
    s_events(s_db, 1); /* a step to fail on the lost connection */
    ck_assert(s_readyz(health, 503, "not ready: database unreachable", 5000));
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM"
                                           " pg_stat_activity WHERE"
                                           " application_name ="
                                           " 'ketenhub-health'"),
                     1);
    s_allow_connections(true);
    ck_assert(khtest_log_has(log, "event=db_connected", 10000));
    ck_assert(s_readyz(health, 200, "ready audit", 5000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    s_svc_free(&svc);
}
END_TEST

/* Seals that cannot be written (a full disk, say) while the database
 * answers: the service tries again ever more slowly, a warning per
 * attempt, not one a poll, is not ready meanwhile, and seals (and is
 * ready) as soon as it can. */
START_TEST(sealing_that_fails_is_tried_again_ever_more_slowly)
{
    s_svc_t svc;
    s_svc_new(&svc);
    const char *log = svc.log, *health = svc.health;
    char *env_db = svc.env_db, *env_key = svc.env_key;
    char *env_health = svc.env_health;
    char *env[] = {env_db, env_key, "KH_AUDIT_POLL_MS=10", env_health, NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    khtest_db_exec(s_db, "CREATE TABLE test_full (x int)", 0, NULL);
    khtest_db_exec(s_db, "INSERT INTO test_full VALUES (1)", 0, NULL);
    khtest_db_exec(s_db,
                   "CREATE FUNCTION test_full() RETURNS trigger LANGUAGE"
                   " plpgsql AS $$BEGIN IF EXISTS (SELECT 1 FROM test_full)"
                   " THEN RAISE EXCEPTION 'no space left' USING ERRCODE ="
                   " '53100'; END IF; RETURN NEW; END$$",
                   0, NULL);
    khtest_db_exec(s_db,
                   "CREATE TRIGGER test_full BEFORE INSERT ON audit_seals"
                   " FOR EACH ROW EXECUTE FUNCTION test_full()",
                   0, NULL);
    s_events(s_db, 5);
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    ck_assert(khtest_log_has(log, "event=seal_failed", 10000));
    usleep(1500 * 1000);
    char *text = khtest_read_file(log);
    int warnings = 0;
    for (const char *p = text; p && (p = strstr(p, "event=seal_failed")); p++)
        warnings++;
    free(text);
    ck_assert_msg(warnings <= 6, "%d warnings in 1.5 s", warnings);
    /* The database answers (the probe says so), yet nothing is sealed. */
    ck_assert(
        s_readyz(health, 503, "not ready: sealing fails: see seal_failed", 0));

    khtest_db_exec(s_db, "DELETE FROM test_full", 0, NULL);
    ck_assert(khtest_wait_count(s_db,
                                "SELECT count(*) FROM audit_events e WHERE"
                                " NOT EXISTS (SELECT 1 FROM audit_seals s"
                                " WHERE s.seq = e.seq)",
                                0, 10000));
    ck_assert(s_readyz(health, 200, "ready audit", 5000));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    s_svc_free(&svc);
}
END_TEST

START_TEST(export_verifies_offline)
{
    s_events(s_db, 400);
    kh_trail_sealer_t *sealer = s_sealer(50);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    char *dir = khtest_tmpdir();
    char path[512], part[512], cps[512], bad[512];
    snprintf(path, sizeof path, "%s/all.jsonl", dir);
    snprintf(part, sizeof part, "%s/part.jsonl", dir);
    snprintf(cps, sizeof cps, "%s/checkpoints.jsonl", dir);
    snprintf(bad, sizeof bad, "%s/bad.jsonl", dir);
    kh_error_t err;
    long count = 0;
    FILE *f = fopen(path, "w");
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    ck_assert_int_eq(
        count, khtest_db_count(s_db, "SELECT count(*) FROM audit_events"));
    kh_trail_report_t report;
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &report, &err),
                     0);
    ck_assert_int_eq(report.events, count);

    /* A middle range starts at the checkpoint before it. */
    f = fopen(part, "w");
    ck_assert_int_eq(kh_trail_export(s_db, f, 120, 260, true, &count, &err), 0);
    fclose(f);
    ck_assert_int_gt(count, 0);
    ck_assert_int_lt(count, 260);
    ck_assert_int_eq(kh_trail_file_verify(part, s_pk, NULL, 0, &report, &err),
                     0);
    ck_assert_int_le(report.first_seq, 120);
    ck_assert_int_ge(report.last_seq, 260);
    /* Its header gives the range widened, both ends: from the seq after
     * its anchor to the checkpoint it ends at. */
    char *head = khtest_read_file(part);
    *strchr(head, '\n') = '\0';
    json_t *h = json_loads(head, 0, NULL);
    ck_assert_ptr_nonnull(h);
    json_t *anchor = json_object_get(h, "anchor");
    ck_assert_int_eq(json_integer_value(json_object_get(h, "from")),
                     json_integer_value(json_object_get(anchor, "seq")) + 1);
    ck_assert_int_le(json_integer_value(json_object_get(h, "from")),
                     report.first_seq);
    ck_assert_int_eq(json_integer_value(json_object_get(h, "to")),
                     report.last_seq);
    json_decref(h);
    free(head);

    /* The published checkpoints alone. */
    f = fopen(cps, "w");
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, false, &count, &err), 0);
    fclose(f);
    kh_trail_checkpoint_t *pub = NULL;
    size_t npub = 0;
    ck_assert_int_eq(kh_trail_file_checkpoints(cps, &pub, &npub, &err), 0);
    ck_assert_int_ge((int) npub, 7);
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, pub, npub, &report, &err),
                     0);
    /* The checkpoints published after a range's end are no part of it:
     * a month's export verifies with the checkpoints of later months. */
    ck_assert_int_eq(kh_trail_file_verify(part, s_pk, pub, npub, &report, &err),
                     0);
    ck_assert_int_ge(report.signed_seq, 260);

    /* One byte changed in the file is found; so is a line removed. */
    char *text = khtest_read_file(path);
    char *hit = strstr(text, "\"actor_id\":\"veilig-thuis\"");
    ck_assert_ptr_nonnull(hit);
    hit[12] = 'V';
    khtest_write_file(bad, text);
    ck_assert_int_eq(kh_trail_file_verify(bad, s_pk, pub, npub, &report, &err),
                     1);
    ck_assert_int_eq(report.kind, KH_TRAIL_ALTERED);
    free(text);
    free(pub);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* An export read once, as it streams in: from a pipe (`--file
 * /dev/stdin`, `--file <(...)`) or a FIFO, which cannot be read twice. */
START_TEST(an_export_is_verified_from_a_pipe)
{
    s_events(s_db, 300);
    kh_trail_sealer_t *sealer = s_sealer(50);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    char *dir = khtest_tmpdir();
    const char *path = khtest_path(dir, "all.jsonl");
    kh_error_t err;
    kh_error_clear(&err);
    long count = 0;
    FILE *f = fopen(path, "w");
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    char *text = khtest_read_file(path);
    int fds[2];
    ck_assert_int_eq(pipe(fds), 0);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        size_t len = strlen(text), o = 0;
        while (o < len) {
            ssize_t w = write(fds[1], text + o, len - o);
            if (w <= 0)
                _exit(1);
            o += (size_t) w;
        }
        _exit(0);
    }
    close(fds[1]);
    char fd_path[64];
    snprintf(fd_path, sizeof fd_path, "/dev/fd/%d", fds[0]);
    kh_trail_report_t report;
    int rc = kh_trail_file_verify(fd_path, s_pk, NULL, 0, &report, &err);
    close(fds[0]);
    int status = 0;
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_msg(rc == 0, "verify from a pipe: %d: %s", rc, err.message);
    ck_assert_int_eq(report.events, count);

    /* A directory is not read as an empty file. */
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_file_verify(dir, s_pk, NULL, 0, &report, &err),
                     -1);
    ck_assert_msg(strstr(err.message, "cannot read") != NULL, "%s",
                  err.message);

    /* A NUL byte in place of the newline before a checkpoint: the line
     * after it is not dropped unseen, the file is refused. */
    char *cp = NULL; /* the last checkpoint line */
    for (char *at = text; (at = strstr(at, "\n{\"type\":\"checkpoint\"")); at++)
        cp = at + 1;
    ck_assert_ptr_nonnull(cp);
    ck_assert_int_eq(cp[-1], '\n');
    const char *nul = khtest_path(dir, "nul.jsonl");
    FILE *nf = fopen(nul, "w");
    ck_assert_ptr_nonnull(nf);
    size_t before = (size_t) (cp - 1 - text);
    ck_assert_uint_eq(fwrite(text, 1, before, nf), before);
    fputc('\0', nf);
    fputs(cp, nf);
    fclose(nf);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_file_verify(nul, s_pk, NULL, 0, &report, &err),
                     -1);
    ck_assert_msg(strstr(err.message, "NUL") != NULL, "%s", err.message);

    /* Two lines swapped: the message names the events, not only the
     * line. */
    char *first = strstr(text, "{\"seq\":");
    ck_assert_ptr_nonnull(first);
    char *second = strchr(first, '\n');
    ck_assert_ptr_nonnull(second);
    second++;
    char *third = strchr(second, '\n');
    ck_assert_ptr_nonnull(third);
    third++;
    size_t l1 = (size_t) (second - first), l2 = (size_t) (third - second);
    char *tmp = malloc(l1);
    memcpy(tmp, first, l1);
    memmove(first, second, l2);
    memcpy(first + l2, tmp, l1);
    free(tmp);
    const char *swapped = khtest_path(dir, "swapped.jsonl");
    khtest_write_file(swapped, text);
    kh_error_clear(&err);
    ck_assert_int_eq(
        kh_trail_file_verify(swapped, s_pk, NULL, 0, &report, &err), -1);
    ck_assert_msg(strstr(err.message, "event at seq") != NULL, "%s",
                  err.message);
    free(text);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Run ketenhubctl audit with args against the test database; its exit
 * status, its output in *out (caller frees). */
#define S_AUDIT(out, ...) KHTEST_CTL(out, "audit", __VA_ARGS__)

static long s_accesses(void)
{
    return khtest_db_count(s_db, "SELECT count(*) FROM audit_events WHERE"
                                 " action LIKE 'trail.%'");
}

/* A refused option exits 2 naming it, and neither reads nor records. */
static void s_refused_option(const char *option, const char *const *args)
{
    long before = s_accesses();
    char *out = NULL;
    int rc = khtest_ctl(&out, args);
    ck_assert_msg(rc == 2, "%s %s %s: exit %d: %s", args[1], args[2],
                  args[3] ? args[3] : "", rc, out);
    ck_assert_msg(strstr(out, option) != NULL, "%s not named: %s", option, out);
    ck_assert_int_eq(s_accesses(), before);
    free(out);
}

#define S_REFUSED(option, ...)                                                 \
    s_refused_option(option, (const char *const[]){"audit", __VA_ARGS__, NULL})

/* The number of events `audit query` prints as JSON lines for args. */
static int s_query_count(const char *const *args)
{
    char *out = NULL;
    int rc = khtest_ctl(&out, args);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    int n = 0;
    for (const char *p = out; (p = strstr(p, "{\"seq\":")) != NULL; p++)
        n++;
    free(out);
    return n;
}

#define S_QUERY_COUNT(...)                                                     \
    s_query_count((const char *const[]){"audit", "query", "--format=json",     \
                                        "--limit=1000", __VA_ARGS__, NULL})

/* `audit seal` says every checkpoint it wrote. Its round writes one by
 * itself when none was made in the last minute (the first seal of a
 * trail, or a hub whose audit service is down), and it said "sealed 26
 * events" for that, also with --checkpoint, as if none had been signed. */
START_TEST(audit_seal_verify_export_say_what_they_did)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *keys = khtest_tmpdir();
    char sk_path[512];
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", keys);
    char pk_path[512];
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", keys);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    /* An empty trail has no range to print ("0 events (seq 0..0)" read
     * as an event at seq 0). */
    char *out = NULL;
    int rc = S_AUDIT(&out, "verify", "--public-key", pk_path);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "the database: 0 events, 0 sealed") != NULL, "%s",
                  out);
    free(out);
    s_events_dense(25);
    rc = S_AUDIT(&out, "seal", "--key", sk_path);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT count(*) FROM audit_checkpoints"), 1);
    /* The 25 and the verification's own trail.verified. */
    ck_assert_msg(strstr(out, "sealed 26 events, 1 checkpoint written") != NULL,
                  "%s", out);
    free(out);
    /* Within the minute: the round writes none, --checkpoint does. */
    s_events_dense(5);
    rc = S_AUDIT(&out, "seal", "--key", sk_path);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "sealed 5 events\n") != NULL, "%s", out);
    free(out);
    s_events_dense(5);
    rc = S_AUDIT(&out, "seal", "--key", sk_path, "--checkpoint");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "sealed 5 events, 1 checkpoint written") != NULL,
                  "%s", out);
    free(out);
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT count(*) FROM audit_checkpoints"), 2);
    /* The checkpoints to publish: it said "exported 0 events with their
     * checkpoints", as if the trail were empty. */
    char cps_path[600];
    snprintf(cps_path, sizeof cps_path, "%s/checkpoints.jsonl", keys);
    rc = S_AUDIT(&out, "export", "--out", cps_path, "--checkpoints-only");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "exported the checkpoints (no events)") != NULL,
                  "%s", out);
    free(out);
    khtest_rmtree(keys);
    free(keys);
    free(conninfo);
}
END_TEST

/* The audit key replaced as the README says (`audit keygen --force`, the
 * sealer started again with the new key): the administrator's
 * hub-audit.pub keeps the replaced key before the new one, and with it an
 * auditor verifies the whole trail, in the database, from an export and
 * with published checkpoints. Before, verify took one key and found the
 * first checkpoint of the other a bad signature, whichever key it was
 * given, and keygen --force threw the old public key away. */
START_TEST(the_trail_verifies_across_an_audit_key_rotation)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *dir = khtest_tmpdir();
    char keys[600], sk_path[700], pk_path[700], old_pk[700], trail[700],
        cps[700];
    snprintf(keys, sizeof keys, "%s/audit", dir);
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", keys);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", keys);
    snprintf(old_pk, sizeof old_pk, "%s/old.pub", dir);
    snprintf(trail, sizeof trail, "%s/trail.jsonl", dir);
    snprintf(cps, sizeof cps, "%s/checkpoints.jsonl", dir);
    char *out = NULL;
    int rc = S_AUDIT(&out, "keygen", "--out", keys);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    char *first = khtest_read_file(pk_path);
    khtest_write_file(old_pk, first);
    s_events_dense(20);
    rc = S_AUDIT(&out, "seal", "--key", sk_path, "--checkpoint");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);

    rc = S_AUDIT(&out, "keygen", "--out", keys, "--force");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "replaced public key(s) kept before it"), "%s",
                  out);
    free(out);
    char *both = khtest_read_file(pk_path);
    ck_assert_uint_eq(strlen(both), 2 * 65);
    ck_assert(strncmp(both, first, 65) == 0);
    /* A keygen --force that cannot write (a full disk: here no file may
     * grow) changes neither file: the old public keys and the secret key
     * stay. It rewrote both in place, and lost the keys before. */
    char *secret = khtest_read_file(sk_path);
    char *const full[] = {"/bin/sh",
                          "-c",
                          "trap '' XFSZ; ulimit -f 0; "
                          "exec \"$0\" audit keygen --out \"$1\" --force",
                          KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                          keys,
                          NULL};
    rc = khtest_run(full, &out);
    ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
    free(out);
    char *after = khtest_read_file(pk_path);
    ck_assert_str_eq(after, both);
    free(after);
    after = khtest_read_file(sk_path);
    ck_assert_str_eq(after, secret);
    free(after);
    free(secret);
    s_events_dense(20);
    rc = S_AUDIT(&out, "seal", "--key", sk_path, "--checkpoint");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    s_events_dense(3); /* not yet sealed */

    rc = S_AUDIT(&out, "verify", "--public-key", pk_path);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "2 checkpoints valid"), "%s", out);
    free(out);
    /* One key alone: the other's checkpoints are not its. */
    rc = S_AUDIT(&out, "verify", "--public-key", old_pk);
    ck_assert_msg(rc == 1 && strstr(out, "bad_signature"), "exit %d: %s", rc,
                  out);
    free(out);
    /* The keys as two files, oldest first, do as well as one. */
    char new_pk[700];
    snprintf(new_pk, sizeof new_pk, "%s/new.pub", dir);
    khtest_write_file(new_pk, both + 65);
    rc =
        S_AUDIT(&out, "verify", "--public-key", old_pk, "--public-key", new_pk);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    free(out);
    rc =
        S_AUDIT(&out, "verify", "--public-key", new_pk, "--public-key", old_pk);
    ck_assert_msg(rc == 1 && strstr(out, "after key 2 signed"), "exit %d: %s",
                  rc, out);
    free(out);
    /* The auditor's old key, then the hub-audit.pub that holds it too:
     * the same keys in the same order. */
    rc = S_AUDIT(&out, "verify", "--public-key", old_pk, "--public-key",
                 pk_path);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    free(out);

    /* Offline, with the checkpoints published. */
    rc = S_AUDIT(&out, "export", "--out", trail);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    rc = S_AUDIT(&out, "export", "--out", cps, "--checkpoints-only");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    rc = S_AUDIT(&out, "verify", "--public-key", pk_path, "--file", trail,
                 "--published", cps);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    free(out);
    rc = S_AUDIT(&out, "verify", "--public-key", pk_path, "--published", cps);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    free(out);
    free(first);
    free(both);
    khtest_rmtree(dir);
    free(dir);
    free(conninfo);
}
END_TEST

/* An audit replica left running with the key that keygen --force
 * replaced (or started again with a copy of it) signs nothing after the
 * new key signed: verify would refuse all it signs ("signed by key 1
 * after key 2 signed"). It seals nothing either, says why (exit 1; the
 * service: one alert, not ready) and leaves the trail to the new key. */
START_TEST(a_replaced_audit_key_signs_nothing_more)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *dir = khtest_tmpdir();
    char old_sk[600], old_pk[600], new_sk[600], new_pk[600], log[600];
    snprintf(old_sk, sizeof old_sk, "%s/old.key", dir);
    snprintf(old_pk, sizeof old_pk, "%s/old.pub", dir);
    snprintf(new_sk, sizeof new_sk, "%s/new.key", dir);
    snprintf(new_pk, sizeof new_pk, "%s/new.pub", dir);
    snprintf(log, sizeof log, "%s/audit.log", dir);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(old_sk, old_pk, NULL, false, &err), 0);
    ck_assert_int_eq(kh_trail_keygen(new_sk, new_pk, NULL, false, &err), 0);
    char *out = NULL;
    s_events_dense(20);
    int rc = S_AUDIT(&out, "seal", "--key", old_sk, "--checkpoint");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    /* The new key signs on from the old one's checkpoints. */
    s_events_dense(20);
    rc = S_AUDIT(&out, "seal", "--key", new_sk, "--checkpoint");
    ck_assert_msg(rc == 0 && strstr(out, "checkpoint"), "exit %d: %s", rc, out);
    free(out);
    s_events_dense(3);
    const char *count_sql = "SELECT (SELECT count(*) FROM audit_seals) * 1000"
                            " + (SELECT count(*) FROM audit_checkpoints)";
    long before = khtest_db_count(s_db, count_sql);
    ck_assert_int_eq(before, 40 * 1000 + 2);

    rc = S_AUDIT(&out, "seal", "--key", old_sk, "--checkpoint");
    ck_assert_msg(rc == 1 && strstr(out, "trail_key_replaced") &&
                      strstr(out, "seq 40"),
                  "exit %d: %s", rc, out);
    free(out);
    ck_assert_int_eq(khtest_db_count(s_db, count_sql), before);

    /* The service with the old key: one alert, up, not ready, and still
     * nothing sealed or signed. */
    char health[64], env_health[100], env_db[1200], env_key[700];
    snprintf(health, sizeof health, "127.0.0.1:%d", khproc_free_port());
    snprintf(env_health, sizeof env_health, "KH_HEALTH_ENDPOINT=%s", health);
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", conninfo);
    snprintf(env_key, sizeof env_key, "KH_AUDIT_KEY=%s", old_sk);
    char *env[] = {env_db,
                   env_key,
                   env_health,
                   "KH_AUDIT_POLL_MS=10",
                   "KH_AUDIT_CHECKPOINT_MS=20",
                   NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    ck_assert(s_readyz(health, 503, "not ready: signing key replaced", 5000));
    usleep(100000); /* several more rounds */
    ck_assert_int_eq(kill(pid, 0), 0);
    ck_assert_int_eq(khtest_db_count(s_db, count_sql), before);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(log);
    const char *alert = strstr(text, "event=alert kind=trail_key_replaced");
    ck_assert_msg(alert, "%s", text);
    ck_assert_ptr_null(strstr(alert + 1, "event=alert"));
    free(text);

    /* The trail is whole, and the new key seals what waited. */
    rc = S_AUDIT(&out, "seal", "--key", new_sk);
    ck_assert_msg(rc == 0 && strstr(out, "sealed 3 events"), "exit %d: %s", rc,
                  out);
    free(out);
    rc =
        S_AUDIT(&out, "verify", "--public-key", old_pk, "--public-key", new_pk);
    ck_assert_msg(rc == 0 && strstr(out, "intact"), "exit %d: %s", rc, out);
    free(out);
    khtest_rmtree(dir);
    free(dir);
    free(conninfo);
}
END_TEST

START_TEST(auditor_options_are_checked_before_anything_runs)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    s_events_dense(20);

    /* Times the pattern let through to the database, where they failed
     * as a database error (exit 1) without naming the option. */
    S_REFUSED("--since", "query", "--since", "2026-13-45");
    S_REFUSED("--since", "query", "--since", "2026-11-01T25:99");
    S_REFUSED("--until", "query", "--until", "2026-02-30");
    S_REFUSED("--since", "query", "--since", "2026-11-01T00:00:00+99:99");
    S_REFUSED("--since", "query", "--since", "0000-01-01");
    S_REFUSED("--since", "query", "--since", "2026-11-01T0:0");
    S_REFUSED("--since", "query", "--since", "");
    S_REFUSED("--until", "query", "--until", "tomorrow");
    S_REFUSED("--since", "query", "--since", "2026-11-28 BC");
    S_REFUSED("--since", "query", "--since", "2026-11-01", "--since",
              "2026-11-02");
    /* A filter given twice: both must hold, so it could only select
     * nothing, and said nothing about why. */
    S_REFUSED("--action", "query", "--action", "referral.accepted", "--action",
              "referral.routed");
    S_REFUSED("--partner", "query", "--partner", "avim", "--partner", "avim");
    /* A period that ends before it starts. */
    S_REFUSED("--until", "query", "--since", "2027-01-01", "--until",
              "2026-01-01");
    S_REFUSED("--limit", "query", "--limit", "-1");
    S_REFUSED("--referral", "query", "--referral", "not-a-uuid");
    S_REFUSED("--to", "export", "--out", "/nonexistent/x", "--from", "200",
              "--to", "100");
    S_REFUSED("--out", "export", "--out", "");
    /* No checkpoint at or after --to to end at: refused before the access
     * is recorded, and no file made. */
    char *dir = khtest_tmpdir();
    char to_path[512];
    snprintf(to_path, sizeof to_path, "%s/trail.jsonl", dir);
    S_REFUSED("--to", "export", "--out", to_path, "--to", "1000");
    ck_assert_int_ne(access(to_path, F_OK), 0);
    khtest_rmtree(dir);
    free(dir);
    /* A file whose directory is not there: a mistyped path, as for every
     * --out and --cert-dir. */
    S_REFUSED("--out", "export", "--out", "/nonexistent/a/trail.jsonl");
    S_REFUSED("--from-checkpoint", "verify", "--public-key", "/dev/null",
              "--file", "/dev/null", "--from-checkpoint", "10");
    /* A seq that is no checkpoint is a bad option, not a finding (exit 1
     * would say the trail was tampered with). */
    char *keys = khtest_tmpdir();
    char sk_path[512], pk_path[512];
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", keys);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", keys);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    S_REFUSED("--from-checkpoint 7", "verify", "--public-key", pk_path,
              "--from-checkpoint", "7");
    /* 0 is no checkpoint either (it verified from the start, unasked). */
    S_REFUSED("--from-checkpoint", "verify", "--public-key", pk_path,
              "--from-checkpoint", "0");
    khtest_rmtree(keys);
    free(keys);

    /* Every filter at once, the format and the page size after them: as
     * good as in any other order. */
    char *out = NULL;
    int rc = KHTEST_CTL(&out, "audit", "query", "--referral",
                        "6f1c2e1a-8a55-4b53-9c55-0a3f3f0f6f2b", "--delivery",
                        "0b7d9b6e-3c0e-4a51-8f3e-2f9a3c1d7e55", "--partner",
                        "avim", "--actor", "jdevries", "--action",
                        "delivery.retried", "--outcome", "ok", "--since",
                        "2026-01-01", "--until", "2027-01-01", "--after", "1",
                        "--format", "json", "--limit", "10");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);

    /* An unknown key's refusals carry "key:" and its Z85 text as the
     * actor, Z85 being letters, digits and 23 signs (!#$%&()*+-./:<=>?@[]^{}):
     * the auditor asks for that actor as the trail writes it. A space or a
     * control character, which the trail refuses, is refused here. */
    static const char z85[] = "key:rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7";
    const char *const refusal[] = {z85};
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, reason_code, origin_service, origin_peer)"
                   " VALUES ('partner', $1, 'auth.refused', 'refused',"
                   " 'unknown_partner', 'intake', '10.0.0.9')",
                   1, refusal);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", z85), 1);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", "key:#$%&()*+"), 0);
    /* A login's name outside ASCII, as audit_login() records it (025). */
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, origin_service) VALUES ('auditor',"
                   " 'm\xc3\xbcller', 'trail.queried', 'ok', 'ketenhubctl')",
                   0, NULL);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", "auditor:m\xc3\xbcller"), 1);
    /* ketenhubctl speaks UTF-8 to the database whatever the environment
     * asks for: with LATIN1 the name would be matched and printed in
     * other bytes (and a name LATIN1 lacks refused). */
    setenv("PGCLIENTENCODING", "LATIN1", 1);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", "auditor:m\xc3\xbcller"), 1);
    out = NULL;
    rc = KHTEST_CTL(&out, "audit", "query", "--format", "json", "--actor",
                    "auditor:m\xc3\xbcller");
    ck_assert_msg(rc == 0 &&
                      strstr(out, "\"actor_id\":\"m\\u00FCller\"") != NULL,
                  "exit %d: %s", rc, out);
    free(out);
    unsetenv("PGCLIENTENCODING");
    S_REFUSED("--actor", "query", "--actor", "two words");
    S_REFUSED("--actor", "query", "--actor", "tab\there");
    S_REFUSED("--actor", "query", "--actor", "");
    /* No UTF-8, or a C1 control: refused here, not by the database. */
    S_REFUSED("--actor", "query", "--actor", "jan\xff");
    S_REFUSED("--actor", "query", "--actor", "jan\xc2\x85");
    /* 1 to 64 characters as the trail counts them, not bytes: 65 ASCII
     * letters are refused, 64 characters of 4 bytes each taken. */
    char longest[4 * 64 + 16] = "auditor:", too_long[66] = "";
    for (int i = 0; i < 64; i++)
        strcat(longest, "\xf0\x9f\x98\x80");
    memset(too_long, 'a', 65);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", longest), 0);
    ck_assert_int_eq(S_QUERY_COUNT("--actor", longest + strlen("auditor:")), 0);
    S_REFUSED("--actor", "query", "--actor", too_long);

    /* A time without a zone is UTC, as the trail prints it, whatever the
     * time zone of the session: event 10 and those after it are at or
     * after its own time. */
    char *at = khtest_db_value(
        s_db, "SELECT to_char(at AT TIME ZONE 'UTC',"
              " 'YYYY-MM-DD\"T\"HH24:MI:SS.US') FROM audit_events"
              " WHERE seq = 10");
    char *plus1 = khtest_db_value(
        s_db, "SELECT to_char((at + interval '1 hour') AT TIME ZONE 'UTC',"
              " 'YYYY-MM-DD\"T\"HH24:MI:SS.US') || '+01:00' FROM"
              " audit_events WHERE seq = 10");
    char *until = NULL;
    ck_assert_int_gt(asprintf(&until, "%sZ", at), 0);
    const char *zones[] = {"UTC", "Europe/Amsterdam", "America/New_York"};
    for (int z = 0; z < 3; z++) {
        setenv("PGTZ", zones[z], 1);
        ck_assert_int_eq(S_QUERY_COUNT("--until", at), 9);
        ck_assert_int_eq(S_QUERY_COUNT("--until", until), 9);
        ck_assert_int_eq(S_QUERY_COUNT("--until", plus1), 9);
        ck_assert_int_eq(
            S_QUERY_COUNT("--since", at, "--action", "referral.accepted"), 11);
    }
    unsetenv("PGTZ");
    /* The trail records the period asked for, in UTC. */
    char *filter = khtest_db_value(
        s_db, "SELECT query_filter FROM audit_events WHERE action ="
              " 'trail.queried' ORDER BY seq DESC LIMIT 1");
    ck_assert_ptr_nonnull(strstr(filter, until));
    free(filter);
    free(until);
    free(plus1);
    free(at);
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
}
END_TEST

/* One event of the report's trail (at: its time, UTC). */
static void s_report_event(const char *at, const char *kind, const char *actor,
                           const char *action, const char *delivery,
                           const char *partner, const char *outcome,
                           const char *reason, const char *matched)
{
    const char *params[] = {at,      kind,    actor,  action, delivery,
                            partner, outcome, reason, matched};
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (at, actor_kind, actor_id,"
                   " action, referral_id, delivery_id, partner_id, outcome,"
                   " reason_code, rules_matched, origin_service)"
                   " VALUES ($1, $2, $3, $4, gen_random_uuid(), $5, $6, $7,"
                   " $8, $9, 'test')",
                   9, params);
}

/* The member of the report's array section whose key is value. */
static json_t *s_report_row(json_t *doc, const char *section, const char *key,
                            const char *value)
{
    size_t i;
    json_t *row;
    json_array_foreach(json_object_get(doc, section), i, row)
    {
        if (strcmp(json_string_value(json_object_get(row, key)), value) == 0)
            return row;
    }
    ck_abort_msg("%s: no %s %s", section, key, value);
    return NULL;
}

static long s_report_int(json_t *row, const char *key)
{
    json_t *v = json_object_get(row, key);
    ck_assert_msg(json_is_integer(v), "%s is no integer", key);
    return (long) json_integer_value(v);
}

/* `audit report --format json` over [since, until), which must succeed:
 * its document (the caller frees it). */
static json_t *s_report_json(const char *since, const char *until)
{
    char *out = NULL;
    int rc = KHTEST_CTL(&out, "audit", "report", "--since", since, "--until",
                        until, "--format", "json");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    json_error_t jerr;
    json_t *doc = json_loads(out, 0, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s", jerr.text, out);
    free(out);
    return doc;
}

/* The report counts what the trail says, in its period only, for an
 * auditor's login, and is recorded in the trail like every read. */
START_TEST(report_counts_what_the_trail_says)
{
    PGconn *auditor =
        khtest_db_login(s_db, S_DB, "kh_test_auditor", "ketenhub_auditor");
    PQfinish(auditor);
    char *base = khtest_db_conninfo(S_DB);
    char conninfo[1400];
    snprintf(conninfo, sizeof conninfo, "%s user=kh_test_auditor", base);
    free(base);
    setenv("KH_DATABASE_URL", conninfo, 1);

    /* Before the period. */
    s_report_event("2026-10-15T12:00:00Z", "partner", "meldpunt",
                   "referral.accepted", NULL, NULL, "ok", NULL, NULL);
    /* In it: three accepted, one rejected, three routed. */
    s_report_event("2026-11-02T10:00:00Z", "partner", "meldpunt",
                   "referral.accepted", NULL, NULL, "ok", NULL, NULL);
    s_report_event("2026-11-02T10:00:01Z", "partner", "meldpunt",
                   "referral.accepted", NULL, NULL, "ok", NULL, NULL);
    s_report_event("2026-11-02T10:00:02Z", "partner", "veilig-thuis",
                   "referral.accepted", NULL, NULL, "ok", NULL, NULL);
    s_report_event("2026-11-02T10:00:03Z", "partner", "meldpunt",
                   "referral.rejected", NULL, NULL, "refused",
                   "schema.required", NULL);
    s_report_event("2026-11-02T10:00:04Z", "service", "routing",
                   "referral.routed", NULL, NULL, "ok", NULL,
                   "minor,acute-danger");
    s_report_event("2026-11-02T10:00:05Z", "service", "routing",
                   "referral.routed", NULL, NULL, "ok", NULL, "minor");
    s_report_event("2026-11-02T10:00:06Z", "service", "routing",
                   "referral.routed", NULL, NULL, "ok", "no_rule_matched",
                   NULL);
    /* avim: sent, sent again, acknowledged 30 s after the first send. */
    const char *d1 = "11111111-1111-7111-8111-111111111111";
    s_report_event("2026-11-03T08:00:00Z", "service", "notification",
                   "delivery.sent", d1, "avim", "ok", NULL, NULL);
    s_report_event("2026-11-03T08:00:10Z", "service", "notification",
                   "delivery.sent", d1, "avim", "ok", NULL, NULL);
    s_report_event("2026-11-03T08:00:30Z", "partner", "avim", "delivery.acked",
                   d1, "avim", "ok", NULL, NULL);
    /* An ACK of no delivery of avim's: refused. */
    s_report_event("2026-11-03T08:00:31Z", "partner", "avim", "delivery.acked",
                   d1, NULL, "refused", "not_found", NULL);
    /* veilig-thuis: one acknowledged after 2 s, one dead and escalated. */
    const char *d2 = "22222222-2222-7222-8222-222222222222";
    const char *d3 = "33333333-3333-7333-8333-333333333333";
    s_report_event("2026-11-04T08:00:00Z", "service", "notification",
                   "delivery.sent", d2, "veilig-thuis", "ok", NULL, NULL);
    s_report_event("2026-11-04T08:00:02Z", "partner", "veilig-thuis",
                   "delivery.acked", d2, "veilig-thuis", "ok", NULL, NULL);
    s_report_event("2026-11-04T08:00:00Z", "service", "notification",
                   "delivery.sent", d3, "veilig-thuis", "ok", NULL, NULL);
    s_report_event("2026-11-04T09:00:00Z", "service", "notification",
                   "delivery.escalated", d3, "veilig-thuis", "ok",
                   "ack_overdue", NULL);
    s_report_event("2026-11-05T09:00:00Z", "service", "notification",
                   "delivery.dead", d3, "veilig-thuis", "ok", "max_attempts",
                   NULL);
    /* veilig-thuis: a send that never left (its connection went), then
     * the one that did: sent once, not again. */
    const char *d5 = "55555555-5555-7555-8555-555555555555";
    s_report_event("2026-11-04T10:00:00Z", "service", "notification",
                   "delivery.sent", d5, "veilig-thuis", "ok", NULL, NULL);
    s_report_event("2026-11-04T10:00:03Z", "service", "notification",
                   "delivery.unsent", d5, "veilig-thuis", "ok", "not_sent",
                   NULL);
    s_report_event("2026-11-04T10:00:04Z", "service", "notification",
                   "delivery.sent", d5, "veilig-thuis", "ok", NULL, NULL);
    /* ... and one whose only send never left: not sent. */
    const char *d6 = "66666666-6666-7666-8666-666666666666";
    s_report_event("2026-11-04T11:00:00Z", "service", "notification",
                   "delivery.sent", d6, "veilig-thuis", "ok", NULL, NULL);
    s_report_event("2026-11-04T11:00:03Z", "service", "notification",
                   "delivery.unsent", d6, "veilig-thuis", "ok", "not_sent",
                   NULL);
    /* The escalation's copy, to avim. */
    s_report_event("2026-11-04T09:00:00Z", "service", "notification",
                   "delivery.created", "44444444-4444-7444-8444-444444444444",
                   "avim", "ok", "escalation", NULL);
    s_report_event("2026-11-06T09:00:00Z", "admin", "root", "partner.added",
                   NULL, "avim", "ok", NULL, NULL);
    /* A reload asked for, and routing's own when the partners changed. */
    s_report_event("2026-11-07T09:00:00Z", "service", "routing",
                   "rules.reloaded", NULL, NULL, "ok", NULL, NULL);
    s_report_event("2026-11-07T10:00:00Z", "service", "routing",
                   "rules.reloaded", NULL, NULL, "ok", "partners_changed",
                   NULL);
    /* After it. */
    s_report_event("2026-12-01T00:00:00Z", "partner", "meldpunt",
                   "referral.accepted", NULL, NULL, "ok", NULL, NULL);

    json_t *doc = s_report_json("2026-11-01", "2026-12-01");

    json_t *refs = json_object_get(doc, "referrals");
    ck_assert_int_eq(s_report_int(refs, "accepted"), 3);
    ck_assert_int_eq(s_report_int(refs, "rejected"), 1);
    ck_assert_int_eq(s_report_int(refs, "routed"), 3);
    ck_assert_int_eq(s_report_int(refs, "routed_no_rule_matched"), 1);
    ck_assert_int_eq(s_report_int(json_object_get(doc, "events"), "events"),
                     25);
    ck_assert_int_eq(s_report_int(s_report_row(doc, "accepted_by_partner",
                                               "partner", "meldpunt"),
                                  "accepted"),
                     2);
    ck_assert_int_eq(
        s_report_int(s_report_row(doc, "rules_matched", "rule", "minor"),
                     "referrals"),
        2);
    ck_assert_int_eq(
        s_report_int(s_report_row(doc, "rules_matched", "rule", "acute-danger"),
                     "referrals"),
        1);

    json_t *avim = s_report_row(doc, "deliveries", "partner", "avim");
    ck_assert_int_eq(s_report_int(avim, "sent"), 1);
    ck_assert_int_eq(s_report_int(avim, "sent_again"), 1);
    ck_assert_int_eq(s_report_int(avim, "acked"), 1);
    ck_assert_int_eq(s_report_int(avim, "escalations_received"), 1);
    ck_assert_int_eq(s_report_int(avim, "escalated"), 0);
    ck_assert_double_eq_tol(json_real_value(json_object_get(avim, "ack_p50_s")),
                            30.0, 1e-6);
    json_t *vt = s_report_row(doc, "deliveries", "partner", "veilig-thuis");
    ck_assert_int_eq(s_report_int(vt, "sent"), 3);
    ck_assert_int_eq(s_report_int(vt, "sent_again"), 0);
    ck_assert_int_eq(s_report_int(vt, "acked"), 1);
    ck_assert_int_eq(s_report_int(vt, "dead"), 1);
    ck_assert_int_eq(s_report_int(vt, "escalated"), 1);
    ck_assert_double_eq_tol(json_real_value(json_object_get(vt, "ack_max_s")),
                            2.0, 1e-6);

    json_t *refused = s_report_row(doc, "refusals", "reason", "not_found");
    ck_assert_str_eq(json_string_value(json_object_get(refused, "action")),
                     "delivery.acked");
    ck_assert_int_eq(s_report_int(refused, "events"), 1);
    ck_assert_int_eq(
        s_report_int(s_report_row(doc, "refusals", "reason", "schema.required"),
                     "events"),
        1);
    json_t *admin =
        s_report_row(doc, "administration", "action", "partner.added");
    ck_assert_str_eq(json_string_value(json_object_get(admin, "actor")),
                     "admin:root");
    /* The two reloads apart, by reason. */
    json_t *reload =
        s_report_row(doc, "administration", "reason", "partners_changed");
    ck_assert_str_eq(json_string_value(json_object_get(reload, "action")),
                     "rules.reloaded");
    ck_assert_int_eq(s_report_int(reload, "events"), 1);
    size_t i, reloads = 0;
    json_t *row;
    json_array_foreach(json_object_get(doc, "administration"), i, row)
    {
        reloads += strcmp(json_string_value(json_object_get(row, "action")),
                          "rules.reloaded") == 0;
    }
    ck_assert_uint_eq(reloads, 2);
    json_decref(doc);

    /* The read is in the trail, with the period asked for. */
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT count(*) FROM audit_events WHERE action ="
                              " 'trail.queried' AND actor_kind = 'auditor' AND"
                              " query_filter ="
                              " 'report since=2026-11-01T00:00:00.000000Z"
                              " until=2026-12-01T00:00:00.000000Z'"),
        1);
    /* The whole trail by default; the table names every section. */
    char *out = NULL;
    int rc = KHTEST_CTL(&out, "audit", "report");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "accepted 5, rejected 1, routed 3") != NULL, "%s",
                  out);
    ck_assert_ptr_nonnull(strstr(out, "DELIVERIES BY PARTNER"));
    ck_assert_ptr_nonnull(strstr(out, "veilig-thuis"));
    free(out);

    /* Bad options exit 2, naming the option, and record nothing. */
    S_REFUSED("--since", "report", "--since", "yesterday");
    S_REFUSED("--format", "report", "--format", "xml");
    S_REFUSED("--until", "report", "--since", "2026-11-02", "--until",
              "2026-11-01");
    S_REFUSED("--since", "report", "--since", "2026-11-02", "--since",
              "2026-11-03");
    unsetenv("KH_DATABASE_URL");
}
END_TEST

/* A referral.routed event whose matched rules did not all fit names
 * those that did and then "+N" (routing.c): N rules left out, no rule
 * named "+N", which the report must not count as one. */
START_TEST(report_counts_no_rule_for_the_rules_left_out)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    s_report_event("2027-05-02T10:00:00Z", "service", "routing",
                   "referral.routed", NULL, NULL, "ok", NULL, "minor,+2");
    json_t *doc = s_report_json("2027-05-01", "2027-06-01");
    json_t *rules = json_object_get(doc, "rules_matched");
    ck_assert_int_eq(json_array_size(rules), 1);
    ck_assert_int_eq(
        s_report_int(s_report_row(doc, "rules_matched", "rule", "minor"),
                     "referrals"),
        1);
    json_decref(doc);
    unsetenv("KH_DATABASE_URL");
}
END_TEST

/* The seconds to ACK count from a delivery's first send, which may be
 * in the trail before the period: a delivery first sent before it and
 * sent again in it is not one first sent in it (it is sent again), and
 * its wait is not the one from the send again. */
START_TEST(report_waits_count_from_the_first_send)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    /* Sent first before the period, again in it, acknowledged in it. */
    const char *early = "55555555-5555-7555-8555-555555555555";
    s_report_event("2027-02-28T23:59:00Z", "service", "notification",
                   "delivery.sent", early, "zorgcoordinator", "ok", NULL, NULL);
    s_report_event("2027-03-01T00:00:50Z", "service", "notification",
                   "delivery.sent", early, "zorgcoordinator", "ok", NULL, NULL);
    s_report_event("2027-03-01T00:01:00Z", "partner", "zorgcoordinator",
                   "delivery.acked", early, "zorgcoordinator", "ok", NULL,
                   NULL);
    /* Sent first in the period, acknowledged 4 s later. */
    const char *late = "66666666-6666-7666-8666-666666666666";
    s_report_event("2027-03-02T00:00:00Z", "service", "notification",
                   "delivery.sent", late, "zorgcoordinator", "ok", NULL, NULL);
    s_report_event("2027-03-02T00:00:04Z", "partner", "zorgcoordinator",
                   "delivery.acked", late, "zorgcoordinator", "ok", NULL, NULL);

    json_t *doc = s_report_json("2027-03-01", "2027-04-01");
    json_t *zorg =
        s_report_row(doc, "deliveries", "partner", "zorgcoordinator");
    ck_assert_int_eq(s_report_int(zorg, "acked"), 2);
    /* One delivery first sent in the period, one sent again in it. */
    ck_assert_int_eq(s_report_int(zorg, "sent"), 1);
    ck_assert_int_eq(s_report_int(zorg, "sent_again"), 1);
    /* Only the delivery first sent in the period has a wait here: 4 s
     * (the other's 10 s from its send again is no wait from a first
     * send). */
    ck_assert_double_eq_tol(json_real_value(json_object_get(zorg, "ack_max_s")),
                            4.0, 1e-6);
    ck_assert_double_eq_tol(json_real_value(json_object_get(zorg, "ack_p50_s")),
                            4.0, 1e-6);
    json_decref(doc);

    /* Over both months, the first send is in the period: 120 s. */
    doc = s_report_json("2027-02-01", "2027-04-01");
    zorg = s_report_row(doc, "deliveries", "partner", "zorgcoordinator");
    ck_assert_double_eq_tol(json_real_value(json_object_get(zorg, "ack_max_s")),
                            120.0, 1e-6);
    json_decref(doc);
    unsetenv("KH_DATABASE_URL");
}
END_TEST

/* What an auditor redirects into a file must arrive whole: when it
 * cannot be written (a full disk), the command says so and exits 1,
 * never 0 with the file cut short. */
START_TEST(output_that_cannot_be_written_is_a_failure)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    s_events_dense(20);
    static const char *const commands[] = {
        "audit query --format csv",
        "audit query --format json",
        "audit query",
        "deadletters list --json",
        "purge --older-than 1 --dry-run --json",
        "audit report",
        "audit report --format json"};
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        char cmd[512];
        snprintf(cmd, sizeof cmd,
                 "exec '%s/tools/ctl/ketenhubctl' %s >/dev/full",
                 KH_TEST_BINARY_DIR, commands[i]);
        char *argv[] = {"/bin/sh", "-c", cmd, NULL};
        char *out = NULL;
        int rc = khtest_run(argv, &out);
        ck_assert_msg(rc == 1, "%s: exit %d: %s", commands[i], rc, out);
        ck_assert_msg(strstr(out, "cannot write") != NULL, "%s: %s",
                      commands[i], out);
        free(out);
    }
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
}
END_TEST

/* Every read of the trail is recorded, or gives nothing: a role that
 * reads the trail but may not record its access (the audit service's own,
 * ketenhub_audit) gets no verdict from `audit verify` and exit 1, as it
 * gets no page from `audit query`. */
START_TEST(a_verify_that_cannot_be_recorded_is_a_failure)
{
    s_events_dense(20);
    PQfinish(khtest_db_login(s_db, S_DB, "kh_sealer_reads", "ketenhub_audit"));
    char *base = khtest_db_conninfo(S_DB);
    char conninfo[1400];
    snprintf(conninfo, sizeof conninfo, "%s user=kh_sealer_reads", base);
    free(base);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *dir = khtest_tmpdir();
    const char *pk_path = khtest_path(dir, "hub-audit.pub");
    char hex[2 * KH_TRAIL_PUBLIC_KEY_SIZE + 2];
    kh_trail_hex(s_pk, sizeof s_pk, hex);
    strcat(hex, "\n");
    khtest_write_file(pk_path, hex);
    long before = s_accesses();
    static const char *const commands[][2] = {{"query", "--limit=5"},
                                              {"verify", "--public-key"}};
    for (size_t i = 0; i < 2; i++) {
        char *out = NULL;
        int rc = i ? KHTEST_CTL(&out, "audit", commands[i][0], commands[i][1],
                                pk_path)
                   : KHTEST_CTL(&out, "audit", commands[i][0], commands[i][1]);
        ck_assert_msg(rc == 1, "%s: exit %d: %s", commands[i][0], rc, out);
        ck_assert_msg(strstr(out, "cannot record the access") != NULL, "%s: %s",
                      commands[i][0], out);
        ck_assert_msg(strstr(out, "intact") == NULL &&
                          strstr(out, "veilig-thuis") == NULL,
                      "%s: %s", commands[i][0], out);
        free(out);
    }
    ck_assert_int_eq(s_accesses(), before);
    unsetenv("KH_DATABASE_URL");
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* An export that dies half-way (here at the file size limit; a kill, a
 * closed terminal or a crash alike) leaves no file, under the name asked
 * for or another: a cut export would stand there looking whole, and its events
 * after its last checkpoint would verify intact. The next run can have the
 * name. */
START_TEST(an_interrupted_export_leaves_no_file_under_its_name)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    s_events_dense(3000);
    char *dir = khtest_tmpdir();
    const char *path = khtest_path(dir, "trail.jsonl");
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "ulimit -f 64; exec '%s/tools/ctl/ketenhubctl' audit export"
             " --out '%s'",
             KH_TEST_BINARY_DIR, path);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    char *out = NULL;
    int rc = khtest_run(argv, &out);
    ck_assert_msg(rc != 0, "exit %d: %s", rc, out);
    free(out);
    ck_assert_msg(access(path, F_OK) != 0, "%s is there after exit %d", path,
                  rc);
    /* nor any file under another name */
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    for (struct dirent *e = readdir(d); e; e = readdir(d))
        ck_assert_msg(strcmp(e->d_name, ".") == 0 ||
                          strcmp(e->d_name, "..") == 0,
                      "%s is left in %s", e->d_name, dir);
    closedir(d);
    rc = KHTEST_CTL(&out, "audit", "export", "--out", path);
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    /* The events, the cut run's trail.exported and this run's. */
    ck_assert_msg(strstr(out, "exported 3002 events"), "%s", out);
    free(out);
    /* A name that is taken stays as it was. */
    rc = KHTEST_CTL(&out, "audit", "export", "--out", path,
                    "--checkpoints-only");
    ck_assert_msg(rc == 1 && strstr(out, "never replaces"), "exit %d: %s", rc,
                  out);
    free(out);
    char *text = khtest_read_file(path);
    ck_assert_ptr_nonnull(strstr(text, "\"seq\":3000,"));
    free(text);
    khtest_rmtree(dir);
    free(dir);
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
}
END_TEST

/* As a superuser who bypasses the protections of migration 004: remove
 * the event at seq and, if seal, its seal. */
static void s_remove(int64_t seq, bool seal)
{
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db, "ALTER TABLE audit_seals DISABLE TRIGGER USER", 0,
                   NULL);
    s_sqlf("DELETE FROM audit_events WHERE seq = %lld", (long long) seq);
    if (seal)
        s_sqlf("DELETE FROM audit_seals WHERE seq = %lld", (long long) seq);
}

/* Verify the database (fast pass, then the full one), again with the
 * published checkpoints, and an export of it offline; each must name
 * kind at seq. */
static void s_expect_everywhere(kh_trail_finding_t kind, int64_t seq,
                                const kh_trail_checkpoint_t *published,
                                size_t npublished)
{
    kh_trail_report_t r;
    for (int with = 0; with < 2; with++) {
        int rc = s_verify(with ? published : NULL, with ? npublished : 0, &r);
        ck_assert_msg(rc == 1 && r.kind == kind && r.seq == seq,
                      "database%s: %s at %lld: %s",
                      with ? " with published checkpoints" : "",
                      kh_trail_finding_name(r.kind), (long long) r.seq,
                      r.detail);
    }
    char *dir = khtest_tmpdir();
    char path[512];
    snprintf(path, sizeof path, "%s/trail.jsonl", dir);
    kh_error_t err;
    long count = 0;
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    for (int with = 0; with < 2; with++) {
        int rc = kh_trail_file_verify(path, s_pk, with ? published : NULL,
                                      with ? npublished : 0, &r, &err);
        ck_assert_msg(rc == 1 && r.kind == kind && r.seq == seq,
                      "export%s: %s at %lld: %s",
                      with ? " with published checkpoints" : "",
                      kh_trail_finding_name(r.kind), (long long) r.seq,
                      r.detail);
    }
    khtest_rmtree(dir);
    free(dir);
}

/* Events sealed up to a checkpoint and three more committed but not
 * sealed yet (the sealer comes round every 200 ms, or the audit service
 * is down): the checkpointed event removed with its seal is found, in
 * the database and in an export. */
START_TEST(a_removal_below_unsealed_events_is_found)
{
    s_events_dense(25);
    kh_trail_sealer_t *sealer = s_sealer(10);
    s_flush(sealer);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_sealer_checkpoint(sealer, s_db, &err), 1);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    ck_assert_int_eq(kh_trail_db_checkpoints(s_db, &cps, &ncps, &err), 0);
    ck_assert_uint_eq(ncps, 3);
    ck_assert_int_eq(cps[ncps - 1].seq, 25);
    s_events_dense(3);
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(cps, ncps, &r), 0);
    ck_assert_int_eq(r.unsealed, 3);

    s_remove(25, true);
    s_expect_everywhere(KH_TRAIL_MISSING, 25, cps, ncps);
    free(cps);
}
END_TEST

/* An event removed with its seal breaks the chain at the next event: the
 * report names the removed seq, not the next event as altered. */
START_TEST(a_removal_with_its_seal_is_named)
{
    s_events_dense(40);
    kh_trail_sealer_t *sealer = s_sealer(20);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    kh_error_t err;
    ck_assert_int_eq(kh_trail_db_checkpoints(s_db, &cps, &ncps, &err), 0);
    s_remove(13, true);
    s_expect_everywhere(KH_TRAIL_MISSING, 13, cps, ncps);
    kh_trail_report_t r;
    s_verify(NULL, 0, &r);
    ck_assert_ptr_nonnull(
        strstr(r.detail, "event 14 does not follow event 12"));
    free(cps);
}
END_TEST

/* An auditor copies an actor from the table, which prints KIND:ID
 * (admin:jan, partner:avim): that finds the actor's events, of that kind
 * only. Before, --actor admin:jan matched no actor_id and printed an
 * empty page, as if jan had done nothing. */
START_TEST(query_takes_the_actor_as_the_table_prints_it)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " partner_id, outcome, origin_service) VALUES"
                   " ('admin', 'jan', 'partner.revoked', 'avim', 'ok',"
                   "  'ketenhubctl'),"
                   " ('auditor', 'jan', 'trail.queried', NULL, 'ok',"
                   "  'ketenhubctl'),"
                   " ('partner', 'avim', 'delivery.acked', 'avim', 'ok',"
                   "  'notification')",
                   0, NULL);
    char *out = NULL;
    int rc = S_AUDIT(&out, "query", "--actor", "jan");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "admin:jan") && strstr(out, "auditor:jan"), "%s",
                  out);
    free(out);
    rc = S_AUDIT(&out, "query", "--actor", "admin:jan", "--format", "csv");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, ",admin,jan,partner.revoked,"), "%s", out);
    ck_assert_msg(!strstr(out, ",auditor,jan,"), "%s", out);
    free(out);
    rc = S_AUDIT(&out, "query", "--actor", "partner:avim", "--format", "csv");
    ck_assert_msg(rc == 0 && strstr(out, ",partner,avim,delivery.acked,"),
                  "exit %d: %s", rc, out);
    free(out);
    /* A kind that is not the actor's finds nothing; the filter is
     * recorded as typed. */
    rc = S_AUDIT(&out, "query", "--actor", "service:jan", "--format", "csv");
    ck_assert_msg(rc == 0 && !strstr(out, ",jan,"), "exit %d: %s", rc, out);
    free(out);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_events"
                                           " WHERE query_filter ="
                                           " 'actor=admin:jan limit=100'"),
                     1);
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
}
END_TEST

/* On a finding, the summary line counts what was judged before it: it
 * said "verified the database: 40 events (seq 1..40), 12 sealed, 0 not
 * yet sealed", of a trail whose 40 events were all sealed. */
START_TEST(a_finding_says_how_far_the_trail_held)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *keys = khtest_tmpdir();
    char sk_path[512], pk_path[512];
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", keys);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", keys);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    s_events_dense(40);
    char *out = NULL;
    int rc = S_AUDIT(&out, "seal", "--key", sk_path, "--checkpoint");
    ck_assert_msg(rc == 0, "exit %d: %s", rc, out);
    free(out);
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db,
                   "UPDATE audit_events SET actor_id = 'avim' WHERE seq = 13",
                   0, NULL);
    rc = S_AUDIT(&out, "verify", "--public-key", pk_path);
    ck_assert_msg(rc == 1, "exit %d: %s", rc, out);
    ck_assert_msg(strstr(out, "checked the database: 40 events (seq 1..40); "
                              "of those judged 12 matched their "
                              "seals, 0 checkpoints held"),
                  "%s", out);
    ck_assert_msg(!strstr(out, "not yet sealed") && !strstr(out, "verified"),
                  "%s", out);
    ck_assert_msg(strstr(out, "FIRST PROBLEM at seq 13: altered"), "%s", out);
    free(out);
    khtest_rmtree(keys);
    free(keys);
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
}
END_TEST

/* A new trail of 25 events sealed, signed at 20 (every 10): its sealer. */
static kh_trail_sealer_t *s_sealed_past_checkpoint(void)
{
    PQfinish(s_db);
    s_db = khtest_db_fresh(S_DB);
    s_events_dense(20);
    kh_trail_sealer_t *sealer = s_sealer(10);
    s_flush(sealer);
    s_events_dense(5);
    s_flush(sealer);
    return sealer;
}

/* Seals removed down below the last checkpoint: a sealer that went on
 * from what is left would chain the later events over the gap and sign
 * the result. It refuses, says why, and writes nothing; the audit service
 * raises an alert and keeps running. */
START_TEST(sealer_refuses_a_head_below_its_checkpoint)
{
    s_events_dense(20);
    kh_trail_sealer_t *sealer = s_sealer(10);
    s_flush(sealer);
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT max(seq) FROM audit_checkpoints"), 20);
    s_events_dense(5);
    khtest_db_exec(s_db, "ALTER TABLE audit_seals DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db, "DELETE FROM audit_seals WHERE seq > 15", 0, NULL);
    const char *count_sql = "SELECT (SELECT count(*) FROM audit_seals) * 1000"
                            " + (SELECT count(*) FROM audit_checkpoints)";
    long before = khtest_db_count(s_db, count_sql);

    kh_error_t err;
    ck_assert_int_eq(s_step_refused(sealer, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TRAIL_BROKEN);
    ck_assert_msg(strstr(err.message, "seq 15") && strstr(err.message, "20"),
                  "%s", err.message);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_sealer_flush(sealer, s_db, 1000, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TRAIL_BROKEN);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_sealer_checkpoint(sealer, s_db, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TRAIL_BROKEN);
    kh_trail_sealer_destroy(&sealer);
    ck_assert_int_eq(khtest_db_count(s_db, count_sql), before);

    /* ketenhubctl status says so (and fails). */
    char *conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(&out, "status", "--json", "--intake", "none",
                                "--routing", "none", "--notification", "none",
                                "--audit", "none"),
                     1);
    ck_assert_msg(strstr(out, "\"trail_broken\": true"), "%s", out);
    free(out);
    ck_assert_int_eq(KHTEST_CTL(&out, "status", "--intake", "none", "--routing",
                                "none", "--notification", "none", "--audit",
                                "none"),
                     1);
    ck_assert_msg(strstr(out, "THE TRAIL IS BROKEN"), "%s", out);
    free(out);

    /* The audit service: an alert, no seal, no checkpoint, still up, and
     * not ready, saying why. */
    char *dir = khtest_tmpdir();
    char sk_path[512], pk_path[512], log[512], env_db[1200], env_key[600];
    char health[64], env_health[100];
    snprintf(health, sizeof health, "127.0.0.1:%d", khproc_free_port());
    snprintf(env_health, sizeof env_health, "KH_HEALTH_ENDPOINT=%s", health);
    snprintf(sk_path, sizeof sk_path, "%s/hub-audit.key", dir);
    snprintf(pk_path, sizeof pk_path, "%s/hub-audit.pub", dir);
    snprintf(log, sizeof log, "%s/audit.log", dir);
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", conninfo);
    snprintf(env_key, sizeof env_key, "KH_AUDIT_KEY=%s", sk_path);
    char *env[] = {env_db,
                   env_key,
                   env_health,
                   "KH_AUDIT_POLL_MS=10",
                   "KH_AUDIT_CHECKPOINT_MS=20",
                   NULL};
    char *argv[] = {"ketenhub-audit", NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit", argv, env, log);
    ck_assert_int_gt(pid, 0);
    char *text = NULL;
    for (int i = 0; i < 500; i++) {
        free(text);
        usleep(10000);
        text = khtest_read_file(log);
        if (text && strstr(text, "event=alert"))
            break;
    }
    ck_assert_msg(text && strstr(text, "event=alert kind=trail_broken"), "%s",
                  text ? text : "(no log)");
    usleep(100000); /* several more rounds */
    ck_assert_int_eq(kill(pid, 0), 0);
    ck_assert_int_eq(khtest_db_count(s_db, count_sql), before);
    char *ready = NULL;
    int code = -1;
    for (int i = 0; i < 100 && !(ready && strstr(ready, "trail")); i++) {
        free(ready);
        ready = NULL;
        usleep(50000);
        code = kh_http_get(health, "/readyz", 2000, &ready, &err);
    }
    ck_assert_int_eq(code, 503);
    ck_assert_msg(ready && strstr(ready, "not ready: trail broken"), "%s",
                  ready ? ready : "(no body)");
    free(ready);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    free(text);
    text = khtest_read_file(log);
    /* One alert for as long as the trail stays broken, not one a round. */
    ck_assert_ptr_null(strstr(strstr(text, "event=alert") + 1, "event=alert"));
    free(text);
    free(conninfo);
    khtest_rmtree(dir);
    free(dir);

    /* The seal at the last checkpoint rewritten, the head above it. */
    sealer = s_sealed_past_checkpoint();
    khtest_db_exec(s_db, "ALTER TABLE audit_seals DISABLE TRIGGER USER", 0,
                   NULL);
    khtest_db_exec(s_db,
                   "UPDATE audit_seals SET hash = sha256(hash) WHERE seq = 20",
                   0, NULL);
    s_events_dense(1);
    ck_assert_int_eq(s_step_refused(sealer, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TRAIL_BROKEN);
    ck_assert_msg(strstr(err.message, "seal at seq 20"), "%s", err.message);
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

/* The sealer's next flush refuses the trail as broken, saying says, and
 * writes no seal and no checkpoint. */
static void s_flush_refused(kh_trail_sealer_t *sealer, const char *says)
{
    const char *count_sql = "SELECT (SELECT count(*) FROM audit_seals) * 1000"
                            " + (SELECT count(*) FROM audit_checkpoints)";
    long before = khtest_db_count(s_db, count_sql);
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_sealer_flush(sealer, s_db, 1000, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TRAIL_BROKEN);
    ck_assert_msg(strstr(err.message, says), "%s", err.message);
    ck_assert_int_eq(khtest_db_count(s_db, count_sql), before);
}

/* The end of the trail removed whole, its events with their seals and
 * checkpoints: what is left agrees with itself (its head is its last
 * checkpoint's), so only what the sealer saw before tells. A sealer that
 * went on would chain the next events over the gap and sign them, which
 * verify then finds only against published checkpoints. It refuses, and
 * writes nothing. */
START_TEST(sealer_refuses_a_trail_whose_end_was_removed)
{
    s_events_dense(20);
    kh_trail_sealer_t *sealer = s_sealer(10);
    s_flush(sealer);
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT max(seq) FROM audit_checkpoints"), 20);
    const char *tables[] = {"audit_events", "audit_seals", "audit_checkpoints"};
    for (size_t i = 0; i < 3; i++) {
        s_sqlf("ALTER TABLE %s DISABLE TRIGGER USER", tables[i]);
        s_sqlf("DELETE FROM %s WHERE seq > 10", tables[i]);
    }
    s_events_dense(5);
    s_flush_refused(sealer, "removed");
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

/* A sealer signs only what it computed itself or checked: the seals
 * after the last checkpoint that another sealer wrote (a replica, a run
 * before) it checks against their events before it chains on from them;
 * a seal it wrote must still be as it wrote it. Either found altered, it
 * refuses and writes nothing. */
START_TEST(sealer_signs_only_seals_it_computed_or_checked)
{
    kh_trail_sealer_t *sealer = s_sealed_past_checkpoint();
    kh_trail_sealer_destroy(&sealer);
    /* Another sealer checks 21..25 and goes on. */
    s_events_dense(3);
    sealer = s_sealer(10);
    ck_assert_int_eq(s_flush(sealer), 3);
    kh_trail_sealer_destroy(&sealer);

    /* An event among them altered: the next sealer finds it. */
    s_sqlf("ALTER TABLE audit_events DISABLE TRIGGER USER");
    s_sqlf("UPDATE audit_events SET actor_id = 'avim' WHERE seq = 23");
    s_sqlf("ALTER TABLE audit_events ENABLE TRIGGER USER");
    s_events_dense(10);
    sealer = s_sealer(10);
    s_flush_refused(sealer, "seq 23: the event does not match");
    kh_trail_sealer_destroy(&sealer);

    /* The head this sealer wrote, rewritten: it refuses to chain on. */
    sealer = s_sealed_past_checkpoint();
    s_sqlf("ALTER TABLE audit_seals DISABLE TRIGGER USER");
    s_sqlf("UPDATE audit_seals SET hash = sha256(hash) WHERE seq = 25");
    s_events_dense(1);
    s_flush_refused(sealer, "seq 25, which this sealer wrote");
    kh_trail_sealer_destroy(&sealer);

    /* The same with a seal and a checkpoint row added above it, signed by
     * no key of this sealer's: it checks from its own seal all the same,
     * not from that checkpoint. */
    sealer = s_sealed_past_checkpoint();
    s_sqlf("ALTER TABLE audit_seals DISABLE TRIGGER USER");
    s_sqlf("UPDATE audit_seals SET hash = sha256(hash) WHERE seq = 25");
    s_events_dense(1);
    s_sqlf("INSERT INTO audit_seals (seq, hash) VALUES (26, sha256('x'))");
    s_sqlf("INSERT INTO audit_checkpoints (seq, head, at, public_key,"
           " signature) VALUES (26, sha256('x'), now(), sha256('k'),"
           " sha256('s') || sha256('t'))");
    s_events_dense(1);
    s_flush_refused(sealer, "seq 25: the event does not match its seal");
    kh_trail_sealer_destroy(&sealer);

    /* Its last seal removed with its event, another replica's seals
     * after it: there is nothing it chains on from. */
    sealer = s_sealed_past_checkpoint();
    s_events_dense(3);
    kh_trail_sealer_t *other = s_sealer(10);
    ck_assert_int_eq(s_flush(other), 3);
    kh_trail_sealer_destroy(&other);
    s_sqlf("ALTER TABLE audit_events DISABLE TRIGGER USER");
    s_sqlf("ALTER TABLE audit_seals DISABLE TRIGGER USER");
    s_sqlf("DELETE FROM audit_events WHERE seq = 25");
    s_sqlf("DELETE FROM audit_seals WHERE seq = 25");
    s_events_dense(1);
    s_flush_refused(sealer, "the seal it chains on from is gone");
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

/* The columns of an event in s_try_event, with values the services write. */
enum {
    S_COL_ACTOR_KIND,
    S_COL_ACTOR_ID,
    S_COL_ACTION,
    S_COL_PARTNER_ID,
    S_COL_OUTCOME,
    S_COL_REASON_CODE,
    S_COL_REASON_PATH,
    S_COL_ORIGIN_SERVICE,
    S_COL_ORIGIN_PEER,
    S_COL_RULES_MATCHED,
    S_COL_RULES_VERSION,
    S_NCOLS
};

/* Inserts one event whose column col is value (NULL for SQL NULL), the
 * others as a NACK from a partner, inside a savepoint that is rolled back
 * either way. Returns NULL when the row was accepted, else the name of the
 * CHECK constraint that refused it (a static buffer); any other failure
 * fails the test. */
static const char *s_try_event(int col, const char *value)
{
    static char refused_by[64];
    const char *params[S_NCOLS] = {
        "partner",    "veilig-thuis", "delivery.nacked", "avim",
        "ok",         "nack_retry",   "delivery_id",     "notification",
        "10.0.0.1:5", "a,b",          "3f1c.50d8"};
    params[col] = value;
    khtest_db_exec(s_db, "SAVEPOINT try", 0, NULL);
    PGresult *res = PQexecParams(
        s_db,
        "INSERT INTO audit_events (actor_kind, actor_id, action, partner_id,"
        " outcome, reason_code, reason_path, origin_service, origin_peer,"
        " rules_matched, rules_version)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        S_NCOLS, NULL, params, NULL, NULL, 0);
    const char *result = NULL;
    if (PQresultStatus(res) != PGRES_COMMAND_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        const char *name = PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME);
        ck_assert_msg(state && strcmp(state, "23514") == 0 && name,
                      "column %d: not a check violation: %s", col,
                      PQresultErrorMessage(res));
        snprintf(refused_by, sizeof refused_by, "%s", name);
        result = refused_by;
    }
    PQclear(res);
    khtest_db_exec(s_db, "ROLLBACK TO SAVEPOINT try", 0, NULL);
    return result;
}

/* Whether value matches the regular expression re in this database (the
 * check of migration 001, evaluated by PostgreSQL itself). */
static bool s_old_check(const char *value, const char *re)
{
    const char *params[] = {value, re};
    PGresult *res =
        PQexecParams(s_db, "SELECT $1 ~ $2", 2, NULL, params, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    bool match = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return match;
}

#define S_AS "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define S_DASHES "------------------------------------------"

/* The checks on audit_events (001, made cheaper by 005) still refuse what
 * 001 refused: free text, spaces and control characters, upper case,
 * over-long values, and any action outside the closed list. partner_id,
 * reason_code and origin_service decide every value as the patterns of 001
 * did; action admits exactly the closed list. */
START_TEST(checks_refuse_what_they_refused)
{
    char len32[40], len33[40], len64[80], len65[80], len31dash[40];
    snprintf(len32, sizeof len32, "%.32s", S_AS);
    snprintf(len33, sizeof len33, "%.33s", S_AS);
    snprintf(len64, sizeof len64, "%.64s", S_AS S_AS);
    snprintf(len65, sizeof len65, "%.65s", S_AS S_AS);
    snprintf(len31dash, sizeof len31dash, "z%.30s", S_DASHES);
    /* clang-format off */
    const char *values[] = {
        "avim", "veilig-thuis", "meldpunt-hilversum", "a", "ab", "a-", "a1",
        "a--", "a_b", "a.b", "a..b", "zorg.v2", "not_found", "1a", "-a",
        "_a", ".a", "A", "Avim", "aVim", "avim ", " avim", "a b", "avim\n",
        "avim\t", "av\x01im", "av\x7fim", "", "zo\xc3\xab", "caf\xc3\xa9",
        "a\xe2\x80\xa8", "jan.jansen@example.nl", "j.jansen 12-03-1990",
        "a;b", "a/b", "a'b", "a,b", len32, len33, len64, len65, len31dash,
        "referral.accepted", "referral.rejected", "referral.routed",
        "delivery.sent", "delivery.acked", "trail.verified",
        "delivery.eaten", "test.event", "Referral.accepted",
        "referral.accepted ", "referral.accepted\n", "referral.accepted;",
        "referral.accepted.x", "referral", "referral.accepted-"};
    /* clang-format on */
    static const struct {
        int col;
        const char *re;
        const char *constraint;
    } formats[] = {{S_COL_PARTNER_ID, "^[a-z][a-z0-9-]{1,31}$",
                    "audit_events_partner_id_format"},
                   {S_COL_REASON_CODE, "^[a-z][a-z0-9_.-]{0,63}$",
                    "audit_events_reason_code_format"},
                   {S_COL_ORIGIN_SERVICE, "^[a-z][a-z0-9_.-]{0,31}$",
                    "audit_events_origin_service_format"},
                   {S_COL_ACTION, "^[a-z][a-z0-9_.-]{0,63}$",
                    "audit_events_action_known"}};
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    int refused = 0;
    for (size_t f = 0; f < sizeof formats / sizeof *formats; f++)
        for (size_t v = 0; v < sizeof values / sizeof *values; v++) {
            bool old_ok = s_old_check(values[v], formats[f].re);
            const char *by = s_try_event(formats[f].col, values[v]);
            if (by) {
                ck_assert_str_eq(by, formats[f].constraint);
                refused++;
            }
            if (formats[f].col == S_COL_ACTION) {
                /* Stricter: never admits what 001 refused, and admits
                 * nothing but the closed list. */
                ck_assert_msg(old_ok || by, "action '%s' admitted", values[v]);
                ck_assert_msg((by == NULL) == kh_trail_action_known(values[v]),
                              "action '%s': %s", values[v],
                              by ? "refused" : "admitted");
            } else
                ck_assert_msg((by == NULL) == old_ok, "%s '%s': %s (001: %s)",
                              formats[f].constraint, values[v],
                              by ? "refused" : "admitted",
                              old_ok ? "admitted" : "refused");
        }
    ck_assert_int_gt(refused, 100);

    /* Every action of the closed list is admitted (the database and
     * kh_trail_actions agree). */
    for (int i = 0; kh_trail_actions[i]; i++)
        ck_assert_msg(s_try_event(S_COL_ACTION, kh_trail_actions[i]) == NULL,
                      "action %s refused", kh_trail_actions[i]);

    /* NULL stays allowed where 001 allowed it. */
    ck_assert_ptr_null(s_try_event(S_COL_PARTNER_ID, NULL));
    ck_assert_ptr_null(s_try_event(S_COL_REASON_CODE, NULL));

    /* The other checks: no space or control character in an actor (a key
     * as auth.refused names it is fine), none in paths, peers and rule
     * names, only known kinds and outcomes. */
    const struct {
        int col;
        const char *value;
        const char *constraint;
    } others[] = {
        {S_COL_ACTOR_ID, "veilig thuis", "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, "veilig-thuis\t", "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, "vt\x01", "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, "jan\xc2\x85", "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, "", "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, len65, "audit_events_actor_id_format"},
        {S_COL_ACTOR_ID, "key:rq:^V?Bj&kW$ak*n]Nx=gvh!Bg(7-5SEPw0AkqsP", NULL},
        {S_COL_ACTOR_ID, "uid:1000", NULL},
        {S_COL_ACTOR_KIND, "person", "audit_events_actor_kind_known"},
        {S_COL_OUTCOME, "maybe", "audit_events_outcome_known"},
        {S_COL_REASON_PATH, "subject\nage", "audit_events_reason_path_length"},
        {S_COL_ORIGIN_PEER, "10.0.0.1\r", "audit_events_origin_peer_length"},
        {S_COL_RULES_MATCHED, "minor always",
         "audit_events_rules_matched_format"},
        /* 030: no control character in a rules version either */
        {S_COL_RULES_VERSION, "3f1c\r\x1b[2K",
         "audit_events_rules_version_format"},
        {S_COL_RULES_VERSION, "", "audit_events_rules_version_format"},
        {S_COL_RULES_VERSION, "test", NULL},
    };
    for (size_t i = 0; i < sizeof others / sizeof *others; i++) {
        const char *by = s_try_event(others[i].col, others[i].value);
        if (others[i].constraint)
            ck_assert_msg(by && strcmp(by, others[i].constraint) == 0,
                          "%zu: %s", i, by ? by : "admitted");
        else
            ck_assert_msg(by == NULL, "%zu: refused by %s", i, by);
    }
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
}
END_TEST

/* The format checks on referrals (001, made cheaper by 009) admit and
 * refuse every value as the patterns of 001 did. */
START_TEST(referral_checks_decide_as_before)
{
    char len64[80], len65[80], len128[140], len129[140];
    snprintf(len64, sizeof len64, "%.64s", S_AS S_AS);
    snprintf(len65, sizeof len65, "%.65s", S_AS S_AS);
    snprintf(len128, sizeof len128, "%.128s", S_AS S_AS S_AS S_AS);
    snprintf(len129, sizeof len129, "%.129s", S_AS S_AS S_AS S_AS);
    /* clang-format off */
    const char *values[] = {
        "referral.v1", "referral.v2", "k-1", "K.1:2_3", "a", "1", "-",
        "a b", " a", "a ", "a\n", "a\t", "a\x01", "a\x7f", "",
        "caf\xc3\xa9", "a\xe2\x80\xa8", "a;b", "a/b", "a'b", "a,b",
        "Referral.v1", "1referral", "_a", ".a", "a..b", "a--b",
        len64, len65, len128, len129};
    /* clang-format on */
    static const struct {
        const char *column, *re, *constraint;
    } formats[] = {{"idempotency_key", "^[A-Za-z0-9._:-]{1,128}$",
                    "referrals_idempotency_key_format"},
                   {"schema_version", "^[a-z][a-z0-9_.-]{0,63}$",
                    "referrals_schema_version_format"}};
    khtest_register_partner(s_db, "meldpunt", "municipality", true,
                            "0000000000000000000000000000000000000001");
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    int refused = 0;
    for (size_t f = 0; f < sizeof formats / sizeof *formats; f++)
        for (size_t v = 0; v < sizeof values / sizeof *values; v++) {
            bool old_ok = s_old_check(values[v], formats[f].re);
            char sql[512];
            snprintf(sql, sizeof sql,
                     "INSERT INTO referrals (id, partner_id, idempotency_key,"
                     " schema_version, payload_hash) VALUES"
                     " (gen_random_uuid(), 'meldpunt', %s, %s,"
                     " sha256('x'::bytea))",
                     f == 0 ? "$1" : "'k-1'", f == 1 ? "$1" : "'referral.v1'");
            const char *params[] = {values[v]};
            khtest_db_exec(s_db, "SAVEPOINT try", 0, NULL);
            PGresult *res =
                PQexecParams(s_db, sql, 1, NULL, params, NULL, NULL, 0);
            bool admitted = PQresultStatus(res) == PGRES_COMMAND_OK;
            if (!admitted) {
                const char *name =
                    PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME);
                ck_assert_msg(name && strcmp(name, formats[f].constraint) == 0,
                              "%s '%s': %s", formats[f].column, values[v],
                              PQresultErrorMessage(res));
                refused++;
            }
            PQclear(res);
            khtest_db_exec(s_db, "ROLLBACK TO SAVEPOINT try", 0, NULL);
            ck_assert_msg(admitted == old_ok, "%s '%s': %s (001: %s)",
                          formats[f].column, values[v],
                          admitted ? "admitted" : "refused",
                          old_ok ? "admitted" : "refused");
        }
    ck_assert_int_gt(refused, 30);
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
}
END_TEST

/* The page of a delivery's current version, from ctid "(page,item)". */
static long s_page(PGconn *conn, const char *sql, const char *id)
{
    const char *params[] = {id};
    PGresult *res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK, "%s",
                  PQresultErrorMessage(res));
    ck_assert_int_eq(PQntuples(res), 1);
    long page = strtol(PQgetvalue(res, 0, 0) + 1, NULL, 10);
    PQclear(res);
    return page;
}

/* A delivery's claim writes the new version of its row on the page of the
 * old one, even while a concurrent transaction keeps the old versions
 * from being pruned (as under load): migration 012 keeps room there, so
 * that the WAL holds the changed bytes rather than the whole row with its
 * payload. */
START_TEST(delivery_state_changes_stay_on_their_page)
{
    khtest_register_partner(s_db, "avim", "police", true,
                            "0000000000000000000000000000000000000002");
    khtest_db_exec(s_db,
                   "INSERT INTO referrals (id, partner_id, idempotency_key,"
                   " schema_version, payload_hash) VALUES"
                   " ('00000000-0000-4000-8000-000000000001', 'avim', 'k-1',"
                   " 'referral.v1', sha256('x'::bytea))",
                   0, NULL);
    /* 100 partners' deliveries with payloads of 960 bytes, packed as
     * inserts pack them. */
    khtest_db_exec(s_db,
                   "INSERT INTO partners (id, display_name, kind,"
                   " curve_public_key, handles_cases)"
                   " SELECT 'p' || g, 'p' || g, 'other',"
                   " lpad(g::text, 40, 'a'), true"
                   " FROM generate_series(1, 100) g",
                   0, NULL);
    khtest_db_exec(s_db,
                   "INSERT INTO deliveries (id, referral_id, partner_id,"
                   " payload, payload_hash, rules_version)"
                   " SELECT gen_random_uuid(),"
                   " '00000000-0000-4000-8000-000000000001', 'p' || g,"
                   " convert_to(repeat('{\"summary\":\"x\"}', 60), 'UTF8'),"
                   " sha256('x'::bytea), 'v1' FROM generate_series(1, 100) g",
                   0, NULL);
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *other = PQconnectdb(conninfo);
    free(conninfo);
    ck_assert_int_eq(PQstatus(other), CONNECTION_OK);
    khtest_db_exec(other, "BEGIN ISOLATION LEVEL REPEATABLE READ", 0, NULL);
    khtest_db_exec(other, "SELECT count(*) FROM deliveries", 0, NULL);
    PGresult *ids = PQexec(s_db, "SELECT id, (ctid::text::point)[0]"
                                 " FROM deliveries ORDER BY ctid");
    ck_assert_int_eq(PQntuples(ids), 100);
    int stayed = 0;
    for (int i = 0; i < PQntuples(ids); i++) {
        long page = strtol(PQgetvalue(ids, i, 1), NULL, 10);
        stayed += s_page(s_db,
                         "UPDATE deliveries SET state = 'delivered',"
                         " attempts = 1, sent_at = now(), updated_at ="
                         " now() WHERE id = $1 RETURNING ctid",
                         PQgetvalue(ids, i, 0)) == page;
    }
    PQclear(ids);
    khtest_db_exec(other, "COMMIT", 0, NULL);
    PQfinish(other);
    ck_assert_msg(stayed >= 50, "%d of 100 new versions on their page", stayed);
}
END_TEST

/* Whether the plan PostgreSQL makes for sql reads index. */
static bool s_plan_reads(const char *sql, const char *index)
{
    char *plan = khtest_db_plan(s_db, sql);
    bool reads = strstr(plan, index) != NULL;
    free(plan);
    return reads;
}

/* Migration 013: the trail's action and actor indexes hold the rare
 * values an auditor looks for, and a query for one of them (as `audit
 * query` asks it) reads its index; the events every referral has
 * (accepted, routed, sent, acknowledged; the actors routing and
 * notification) are in neither. A period and the refusals have indexes of
 * their own. */
START_TEST(rare_events_are_found_through_small_indexes)
{
    khtest_db_exec(s_db,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " referral_id, delivery_id, partner_id, outcome,"
                   " origin_service, at)"
                   " SELECT k, a, x, gen_random_uuid(), gen_random_uuid(),"
                   " 'avim', 'ok', 'notification',"
                   " '2026-01-01'::timestamptz + g * interval '1 s'"
                   " FROM generate_series(1, 20000) g,"
                   " LATERAL (SELECT (ARRAY['partner', 'service',"
                   " 'service', 'partner'])[g % 4 + 1] AS k,"
                   " (ARRAY['veilig-thuis', 'routing', 'notification',"
                   " 'avim'])[g % 4 + 1] AS a,"
                   " (ARRAY['referral.accepted', 'referral.routed',"
                   " 'delivery.sent', 'delivery.acked'])[g % 4 + 1] AS x) e;"
                   " INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, reason_code, origin_service)"
                   " SELECT 'admin', 'admin:jan', 'delivery.retried', 'ok',"
                   " NULL, 'ketenhubctl' FROM generate_series(1, 5);"
                   " INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, reason_code, origin_service)"
                   " SELECT 'service', 'notification', 'delivery.dead', 'ok',"
                   " 'max_attempts', 'notification'"
                   " FROM generate_series(1, 5);"
                   " INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " outcome, reason_code, origin_service)"
                   " SELECT 'partner', 'avim', 'delivery.acked', 'refused',"
                   " 'not_found', 'notification' FROM generate_series(1, 5);"
                   " ANALYZE audit_events",
                   0, NULL);
    static const struct {
        const char *where, *index;
    } finds[] = {
        {"action = 'delivery.dead'", "audit_events_action_at"},
        {"actor_id = 'admin:jan'", "audit_events_actor_id"},
        {"at >= '2026-01-01 02:00' AND at < '2026-01-01 02:01'",
         "audit_events_at"},
        {"outcome = 'refused'", "audit_events_not_ok"},
    };
    char sql[256];
    for (size_t i = 0; i < sizeof finds / sizeof *finds; i++) {
        snprintf(sql, sizeof sql,
                 "SELECT seq FROM audit_trail WHERE %s ORDER BY seq LIMIT 101",
                 finds[i].where);
        ck_assert_msg(s_plan_reads(sql, finds[i].index), "%s: not through %s",
                      finds[i].where, finds[i].index);
    }
    /* Not even when told to use any index rather than read the table. */
    static const struct {
        const char *where, *index;
    } common[] = {
        {"action = 'delivery.sent'", "audit_events_action_at"},
        {"outcome = 'ok'", "audit_events_not_ok"},
        {"actor_id = 'routing'", "audit_events_actor_id"},
        {"actor_id = 'notification'", "audit_events_actor_id"},
    };
    khtest_db_exec(s_db, "SET enable_seqscan = off", 0, NULL);
    for (size_t i = 0; i < sizeof common / sizeof *common; i++) {
        snprintf(sql, sizeof sql, "SELECT count(*) FROM audit_trail WHERE %s",
                 common[i].where);
        ck_assert_msg(!s_plan_reads(sql, common[i].index), "%s: through %s",
                      common[i].where, common[i].index);
    }
    khtest_db_exec(s_db, "RESET enable_seqscan", 0, NULL);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_trail"
                                           " WHERE actor_id = 'notification'"),
                     5005);
}
END_TEST

/* kh_uuid_v7() (migration 014) makes ids as kh_uuid_new does: version 7,
 * variant 10, in the order they were made, whichever of the two made
 * them. */
START_TEST(database_ids_sort_with_the_services_ids)
{
    char before[37], after[37];
    kh_uuid_new(before);
    usleep(2000);
    char *id = khtest_db_value(s_db, "SELECT kh_uuid_v7()::text");
    usleep(2000);
    kh_uuid_new(after);
    ck_assert(kh_uuid_valid(id));
    ck_assert_int_eq(id[14], '7');
    ck_assert_ptr_nonnull(strchr("89ab", id[19]));
    ck_assert_msg(strcmp(before, id) < 0 && strcmp(id, after) < 0, "%s, %s, %s",
                  before, id, after);
    /* Many in one statement (one millisecond or a few) are all new. */
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(DISTINCT kh_uuid_v7())"
                                           " FROM generate_series(1, 10000)"),
                     10000);
    free(id);
}
END_TEST

/* 30 events sealed with a checkpoint every 10 (seqs 1..30, no gap); the
 * checkpoints in *cps (caller frees). */
static size_t s_sealed_thirty(kh_trail_checkpoint_t **cps)
{
    s_events_dense(30);
    kh_trail_sealer_t *sealer = s_sealer(10);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    size_t ncps = 0;
    kh_error_t err;
    ck_assert_int_eq(kh_trail_db_checkpoints(s_db, cps, &ncps, &err), 0);
    ck_assert_uint_eq(ncps, 3);
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(*cps, ncps, &r), 0);
    return ncps;
}

/* The sequence hands out 1 and up. An event a superuser puts at seq 0 or
 * below, where a reader that starts after 0 never looks, shows in every
 * query; every verification finds it. */
START_TEST(an_event_below_the_sequence_is_found)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
#define S_COPY_FIRST_AT                                                        \
    "INSERT INTO audit_events SELECT %d, at, actor_kind, actor_id,"            \
    " action, referral_id, delivery_id, partner_id, outcome,"                  \
    " reason_code, reason_path, payload_hash, rules_version,"                  \
    " origin_service, origin_peer, rules_matched, query_filter"                \
    " FROM audit_events WHERE seq = 1"
    s_sqlf(S_COPY_FIRST_AT, 0);
    s_expect_everywhere(KH_TRAIL_INSERTED, 0, cps, ncps);
    /* The summary's range starts at it, as its count includes it (it
     * said "31 events (seq 1..30)"). */
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(NULL, 0, &r), 1);
    ck_assert_int_eq(r.events, 31);
    ck_assert_int_eq(r.first_seq, 0);
    s_sqlf(S_COPY_FIRST_AT, -3);
    s_expect_everywhere(KH_TRAIL_INSERTED, -3, cps, ncps);
    ck_assert_int_eq(s_verify(NULL, 0, &r), 1);
    ck_assert_int_eq(r.first_seq, -3);
    free(cps);
}
END_TEST

/* A seal removed or rewritten below the head leaves its event as it was.
 * The full pass, an export and the sealer all see it; so must the fast
 * pass that `ketenhubctl audit verify` runs first, or the same trail is
 * intact in the database and not in its own export. */
START_TEST(a_seal_removed_or_rewritten_is_found_by_every_pass)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
    khtest_db_exec(s_db, "ALTER TABLE audit_seals DISABLE TRIGGER USER", 0,
                   NULL);
    s_sqlf("CREATE TABLE kept AS SELECT * FROM audit_seals WHERE seq IN "
           "(15, 20)");
    s_sqlf("DELETE FROM audit_seals WHERE seq = 15");
    s_expect_everywhere(KH_TRAIL_INSERTED, 15, cps, ncps);
    /* An event without a seal is an event inserted or a seal removed:
     * the detail gives both readings, as for an event removed with its
     * seal. */
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(NULL, 0, &r), 1);
    ck_assert_msg(strstr(r.detail, "seal removed") != NULL, "%s", r.detail);
    s_sqlf("INSERT INTO audit_seals SELECT * FROM kept WHERE seq = 15");
    ck_assert_int_eq(s_verify(cps, ncps, &r), 0);
    s_sqlf("UPDATE audit_seals SET hash = sha256(hash) WHERE seq = 15");
    s_expect_everywhere(KH_TRAIL_ALTERED, 15, cps, ncps);
    s_sqlf("DELETE FROM audit_seals WHERE seq = 15");
    s_sqlf("INSERT INTO audit_seals SELECT * FROM kept WHERE seq = 15");
    /* The seal a checkpoint signed (the sealer stops there too). */
    s_sqlf("DELETE FROM audit_seals WHERE seq = 20");
    s_expect_everywhere(KH_TRAIL_INSERTED, 20, cps, ncps);
    s_sqlf("INSERT INTO audit_seals SELECT * FROM kept WHERE seq = 20");
    free(cps);
}
END_TEST

/* The checkpoints an auditor publishes (export --checkpoints-only) hold
 * no event: verified as an export they read as a trail cut before its
 * first event. The finding stays (a trail cut to its checkpoints looks
 * the same), but it named "checkpoint at seq 0", which does not exist,
 * and did not say the file is for --published. */
START_TEST(a_checkpoints_only_export_verified_says_what_it_is)
{
    kh_trail_checkpoint_t *cps = NULL;
    s_sealed_thirty(&cps);
    free(cps);
    char *dir = khtest_tmpdir();
    const char *path = khtest_path(dir, "checkpoints.jsonl");
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    kh_error_t err;
    long count = 0;
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, false, &count, &err), 0);
    fclose(f);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &r, &err), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 1);
    ck_assert_msg(strstr(r.detail, "seq 0") == NULL, "%s", r.detail);
    ck_assert_msg(strstr(r.detail, "before its first checkpoint") != NULL, "%s",
                  r.detail);
    ck_assert_msg(strstr(r.detail, "--published") != NULL, "%s", r.detail);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* A published checkpoint whose signature fails, while the trail's own
 * copy is sound: the auditor's copy was altered (or forged), not the
 * trail, and the detail says which. A checkpoint the trail holds as
 * published and that fails is the trail's. */
START_TEST(a_bad_published_checkpoint_is_named_as_published)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
    cps[0].signature[0] ^= 1;
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(cps, ncps, &r), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, 10);
    ck_assert_msg(strncmp(r.detail, "published checkpoint at seq 10", 30) == 0,
                  "%s", r.detail);
    cps[0].signature[0] ^= 1;
    khtest_db_exec(s_db, "ALTER TABLE audit_checkpoints DISABLE TRIGGER USER",
                   0, NULL);
    s_sqlf("UPDATE audit_checkpoints SET signature = set_byte(signature, 0,"
           " get_byte(signature, 0) # 1) WHERE seq = 10");
    for (int with = 0; with < 2; with++) {
        ck_assert_int_eq(s_verify(with ? cps : NULL, with ? ncps : 0, &r), 1);
        ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
        ck_assert_msg(strncmp(r.detail, "checkpoint at seq 10", 20) == 0, "%s",
                      r.detail);
    }
    free(cps);
}
END_TEST

/* A checkpoint the auditor published, removed from the database: the
 * events still match it, but the trail's own checkpoints were cut, and
 * verification with the published ones says so. */
START_TEST(a_published_checkpoint_gone_from_the_database_is_found)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
    khtest_db_exec(s_db, "ALTER TABLE audit_checkpoints DISABLE TRIGGER USER",
                   0, NULL);
    s_sqlf("DELETE FROM audit_checkpoints WHERE seq = 20");
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(cps, ncps, &r), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_MISSING);
    ck_assert_int_eq(r.seq, 20);
    /* Also when verification starts at it (--from-checkpoint 20), which
     * only the published list still holds; from one after it, the events
     * after 20 and the checkpoint at 30 hold. */
    kh_error_t err;
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, 20, cps, ncps, &r, &err),
                     1);
    ck_assert_int_eq(r.kind, KH_TRAIL_MISSING);
    ck_assert_int_eq(r.seq, 20);
    ck_assert_msg(strstr(r.detail, "where verification starts"), "%s",
                  r.detail);
    /* A published copy of it that the key did not sign (forged, or
     * another hub's): the copy is at fault, not the database. */
    cps[1].signature[0] ^= 1;
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, 20, cps, ncps, &r, &err),
                     1);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, 20);
    ck_assert_msg(strstr(r.detail, "signed by none of the keys given"), "%s",
                  r.detail);
    cps[1].signature[0] ^= 1;
    ck_assert_int_eq(kh_trail_db_verify(s_db, s_pk, 30, cps, ncps, &r, &err),
                     0);
    /* Without them the database cannot know (README, Verify). */
    ck_assert_int_eq(s_verify(NULL, 0, &r), 0);
    /* An event altered below it is still named first. */
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    s_sqlf("UPDATE audit_events SET actor_id = 'avim' WHERE seq = 12");
    ck_assert_int_eq(s_verify(cps, ncps, &r), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(r.seq, 12);
    free(cps);
}
END_TEST

/* Export line i (1-based) of src to dst with text put before its closing
 * brace. */
static void s_edit_line(const char *src, const char *dst, int line,
                        const char *text)
{
    FILE *in = fopen(src, "r"), *out = fopen(dst, "w");
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    char buf[8192];
    for (int n = 1; fgets(buf, sizeof buf, in); n++) {
        size_t len = strlen(buf);
        if (n == line && len >= 2 && buf[len - 2] == '}') {
            buf[len - 2] = '\0';
            fprintf(out, "%s%s}\n", buf, text);
        } else
            fputs(buf, out);
    }
    fclose(in);
    fclose(out);
}

/* A key the export format does not define is covered by no seal and no
 * signature: a file that carries one (a name beside an event, a note on
 * the header) is no well-formed export, and one that lacks a key neither. */
START_TEST(an_export_with_keys_of_its_own_is_refused)
{
    kh_trail_checkpoint_t *cps = NULL;
    s_sealed_thirty(&cps);
    free(cps);
    char *dir = khtest_tmpdir();
    char path[512], edited[512];
    snprintf(path, sizeof path, "%s/trail.jsonl", dir);
    snprintf(edited, sizeof edited, "%s/edited.jsonl", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    kh_error_t err;
    long count = 0;
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &r, &err), 0);
    /* Line 1 the header, 2-4 the checkpoints, 5 on the events. */
    static const struct {
        int line;
        const char *text;
    } edits[] = {{1, ",\"note\":\"x\""},
                 {3, ",\"by\":\"x\""},
                 {10, ",\"name\":\"Fatima Yilmaz\""},
                 {10, ",\"Actor_id\":\"avim\""}};
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        s_edit_line(path, edited, edits[i].line, edits[i].text);
        kh_error_clear(&err);
        ck_assert_msg(
            kh_trail_file_verify(edited, s_pk, NULL, 0, &r, &err) == -1,
            "line %d with %s: verified", edits[i].line, edits[i].text);
        ck_assert_int_eq(err.code, KH_E_MALFORMED);
        ck_assert_int_eq(err.line, edits[i].line);
    }
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Copy the export src to dst with its header replaced by header. */
static void s_replace_header(const char *src, const char *dst,
                             const char *header)
{
    FILE *in = fopen(src, "r"), *out = fopen(dst, "w");
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    char buf[8192];
    for (int n = 1; fgets(buf, sizeof buf, in); n++)
        fputs(n == 1 ? header : buf, out);
    fclose(in);
    fclose(out);
}

/* The header's from is the seq after its anchor, or 1 (schemas/audit.md);
 * the releases before wrote the first seq asked for, after the last
 * checkpoint below it, and their exports verify still. A from below the
 * seq after the anchor, an anchor that is a number, or a checkpoint in
 * the file between the anchor and from (it would have been the anchor:
 * the header says the export starts after events it holds) is refused. */
START_TEST(an_export_header_that_does_not_fit_its_anchor_is_refused)
{
    kh_trail_checkpoint_t *cps = NULL;
    s_sealed_thirty(&cps);
    free(cps);
    char *dir = khtest_tmpdir();
    char path[512], edited[512];
    snprintf(path, sizeof path, "%s/trail.jsonl", dir);
    snprintf(edited, sizeof edited, "%s/edited.jsonl", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    kh_error_t err;
    long count = 0;
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 0, true, &count, &err), 0);
    fclose(f);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &r, &err), 0);
    static const struct {
        const char *header;
        int line; /* where it is refused, 0: it verifies */
    } cases[] = {
        /* What export --from 5 (or --from 0) of a release before wrote:
         * no checkpoint below 5, so no anchor, and the events from seq 1. */
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":5,\"to\":0,"
         "\"anchor\":null}\n",
         0},
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":0,\"to\":0,"
         "\"anchor\":null}\n",
         0},
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":-1,\"to\":0,"
         "\"anchor\":null}\n",
         1},
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":1,\"to\":0,"
         "\"anchor\":5}\n",
         1},
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":\"1\",\"to\":0,"
         "\"anchor\":null}\n",
         1},
        /* The checkpoint at seq 10 (line 2) lies below from 15: the
         * header says the export starts after the events 1 to 14. */
        {"{\"format\":\"ketenhub.trail.export.v1\",\"from\":15,\"to\":0,"
         "\"anchor\":null}\n",
         2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        s_replace_header(path, edited, cases[i].header);
        kh_error_clear(&err);
        int rc = kh_trail_file_verify(edited, s_pk, NULL, 0, &r, &err);
        if (cases[i].line == 0) {
            ck_assert_msg(rc == 0, "not intact with %s: %s", cases[i].header,
                          err.message);
            continue;
        }
        ck_assert_msg(rc == -1, "verified with %s", cases[i].header);
        ck_assert_int_eq(err.code, KH_E_MALFORMED);
        ck_assert_int_eq(err.line, cases[i].line);
    }
    /* An export from the checkpoint at seq 10 on starts at 11. */
    unlink(path);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(kh_trail_export(s_db, f, 15, 0, true, &count, &err), 0);
    fclose(f);
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &r, &err), 0);
    ck_assert_int_eq(r.first_seq, 11);
    /* As a release before wrote it, from 15 after the same anchor. */
    FILE *in = fopen(path, "r");
    ck_assert_ptr_nonnull(in);
    char header[4096];
    ck_assert_ptr_nonnull(fgets(header, sizeof header, in));
    fclose(in);
    char *at = strstr(header, "\"from\":11,");
    ck_assert_ptr_nonnull(at);
    memcpy(at, "\"from\":15,", strlen("\"from\":15,"));
    s_replace_header(path, edited, header);
    kh_error_clear(&err);
    ck_assert_msg(kh_trail_file_verify(edited, s_pk, NULL, 0, &r, &err) == 0,
                  "%s", err.message);
    ck_assert_int_eq(r.first_seq, 11);
    /* From at the anchor's own seq is no export's. */
    memcpy(at, "\"from\":10,", strlen("\"from\":10,"));
    s_replace_header(path, edited, header);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_file_verify(edited, s_pk, NULL, 0, &r, &err), -1);
    ck_assert_int_eq(err.code, KH_E_MALFORMED);
    ck_assert_int_eq(err.line, 1);
    /* Nor is one at the largest seq, with an anchor there too: the seq
     * after it does not exist (and computing it overflowed). */
    char *seq = strstr(header, "\"seq\":10,");
    ck_assert_ptr_nonnull(seq);
    char huge[4200];
    snprintf(huge, sizeof huge, "%.*s\"seq\":9223372036854775807,%s",
             (int) (seq - header), header, seq + strlen("\"seq\":10,"));
    at = strstr(huge, "\"from\":10,");
    ck_assert_ptr_nonnull(at);
    char last[4300];
    snprintf(last, sizeof last, "%.*s\"from\":9223372036854775807,%s",
             (int) (at - huge), huge, at + strlen("\"from\":10,"));
    s_replace_header(path, edited, last);
    kh_error_clear(&err);
    ck_assert_msg(kh_trail_file_verify(edited, s_pk, NULL, 0, &r, &err) == -1,
                  "not refused: %s", last);
    ck_assert_int_eq(err.code, KH_E_MALFORMED);
    ck_assert_int_eq(err.line, 1);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Copy the export src to dst without the checkpoint at seq cp and the
 * events and seals above seq last (0: keep them all). */
static void s_cut_export(const char *src, const char *dst, int64_t cp,
                         int64_t last)
{
    FILE *in = fopen(src, "r"), *out = fopen(dst, "w");
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    char buf[8192];
    while (fgets(buf, sizeof buf, in)) {
        json_t *o = json_loads(buf, 0, NULL);
        ck_assert_ptr_nonnull(o);
        const char *type = json_string_value(json_object_get(o, "type"));
        int64_t seq = json_integer_value(json_object_get(o, "seq"));
        bool cut =
            type && (strcmp(type, "checkpoint") == 0 ? seq == cp
                                                     : last > 0 && seq > last);
        if (!cut)
            fputs(buf, out);
        json_decref(o);
    }
    fclose(in);
    fclose(out);
}

/* An export with --to ends at the checkpoint its header names (`to`): cut
 * together with that checkpoint but under the same header, it is found,
 * as is an event added after its end. Only a header rewritten too needs
 * the published checkpoints (README, What verify cannot see). */
START_TEST(an_export_cut_before_the_end_its_header_names_is_found)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
    int64_t last_cp = cps[ncps - 1].seq;
    free(cps);
    char *dir = khtest_tmpdir();
    char path[512], cut[512];
    snprintf(path, sizeof path, "%s/trail.jsonl", dir);
    snprintf(cut, sizeof cut, "%s/cut.jsonl", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    kh_error_t err;
    kh_error_clear(&err);
    long count = 0;
    /* Past the last checkpoint there is none to end at: refused, nothing
     * written, rather than a file that verify finds cut short. */
    ck_assert_int_eq(
        kh_trail_export(s_db, f, 1, last_cp + 1, true, &count, &err), -1);
    ck_assert_int_eq(err.code, KH_E_NOT_FOUND);
    ck_assert_str_eq(err.path, "to");
    char said[64];
    snprintf(said, sizeof said, "the last is at seq %lld", (long long) last_cp);
    ck_assert_msg(strstr(err.message, said), "%s", err.message);
    ck_assert_int_eq(ftell(f), 0);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_export(s_db, f, 1, 20, true, &count, &err), 0);
    fclose(f);
    ck_assert_int_eq(count, 20);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_file_verify(path, s_pk, NULL, 0, &r, &err), 0);

    /* The events after checkpoint 10 cut with checkpoint 20. */
    s_cut_export(path, cut, 20, 15);
    ck_assert_int_eq(kh_trail_file_verify(cut, s_pk, NULL, 0, &r, &err), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 16);
    ck_assert_int_eq(r.other_seq, 10);
    /* Nothing left but the header. */
    char *text = khtest_read_file(path);
    *strchr(text, '\n') = '\0';
    khtest_write_file(cut, text);
    ck_assert_int_eq(kh_trail_file_verify(cut, s_pk, NULL, 0, &r, &err), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 1);
    free(text);

    /* Only the checkpoint gone: the events after 10 are signed by none. */
    s_cut_export(path, cut, 20, 0);
    ck_assert_int_eq(kh_trail_file_verify(cut, s_pk, NULL, 0, &r, &err), 1);
    ck_assert_int_eq(r.kind, KH_TRAIL_MISSING);
    ck_assert_int_eq(r.seq, 20);

    /* An event after the end: no export writes one. */
    text = khtest_read_file(path);
    char *last = strstr(text, "{\"seq\":20,");
    ck_assert_ptr_nonnull(last);
    char *added = NULL;
    ck_assert_int_gt(asprintf(&added, "%s%.*s21,%s", text,
                              (int) strlen("{\"seq\":"), last,
                              last + strlen("{\"seq\":20,")),
                     0);
    khtest_write_file(cut, added);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_file_verify(cut, s_pk, NULL, 0, &r, &err), -1);
    ck_assert_int_eq(err.code, KH_E_MALFORMED);
    ck_assert_int_eq(err.line, 24);
    free(added);
    free(text);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* The canonical encoding is of UTF-8 text. A sealer or an auditor whose
 * session speaks another client_encoding (PGCLIENTENCODING, a Latin-1
 * locale) must chain the same bytes: else every event with a character
 * outside ASCII (an OS user josé) looks altered, or is sealed so. */
START_TEST(the_chain_is_over_utf8_whatever_the_session_encoding)
{
    s_events_dense(3);
    s_sqlf("INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
           " origin_service, query_filter) VALUES ('auditor', 'jos\xc3\xa9',"
           " 'trail.queried', 'ok', 'ketenhubctl', 'actor=jos\xc3\xa9')");
    s_events_dense(2);
    kh_trail_sealer_t *sealer = s_sealer(3);
    khtest_db_exec(s_db, "SET client_encoding = 'LATIN1'", 0, NULL);
    s_flush(sealer);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(NULL, 0, &r), 0);
    khtest_db_exec(s_db, "SET client_encoding = 'UTF8'", 0, NULL);
    ck_assert_int_eq(s_verify(NULL, 0, &r), 0);
    ck_assert_int_eq(r.sealed, 6);
}
END_TEST

/* A time PostgreSQL holds and C cannot add to: an event's at set to
 * infinity (or -infinity) by whoever bypasses the trail's protections is
 * an alteration that every verification names, not an overflow that
 * stops it (the sanitizers abort on it; without them it is undefined). */
START_TEST(an_event_at_an_infinite_time_is_found_altered)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = s_sealed_thirty(&cps);
    khtest_db_exec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER", 0,
                   NULL);
    const char *const times[] = {"infinity", "-infinity"};
    for (size_t i = 0; i < 2; i++) {
        s_sqlf("CREATE TABLE kept AS SELECT at FROM audit_events"
               " WHERE seq = 14");
        s_sqlf("UPDATE audit_events SET at = '%s' WHERE seq = 14", times[i]);
        kh_trail_report_t r;
        for (int with = 0; with < 2; with++) {
            int rc = s_verify(with ? cps : NULL, with ? ncps : 0, &r);
            ck_assert_msg(rc == 1 && r.kind == KH_TRAIL_ALTERED && r.seq == 14,
                          "%s: %s at %lld: %s", times[i],
                          kh_trail_finding_name(r.kind), (long long) r.seq,
                          r.detail);
        }
        s_sqlf("UPDATE audit_events SET at = (SELECT at FROM kept)"
               " WHERE seq = 14");
        s_sqlf("DROP TABLE kept");
        ck_assert_int_eq(s_verify(cps, ncps, &r), 0);
    }
    /* The last checkpoint's time, which its signature covers; the sealer
     * goes on from it all the same. */
    khtest_db_exec(s_db, "ALTER TABLE audit_checkpoints DISABLE TRIGGER USER",
                   0, NULL);
    s_sqlf("UPDATE audit_checkpoints SET at = 'infinity' WHERE seq = 30");
    s_events_dense(3);
    kh_trail_sealer_t *sealer = s_sealer(10);
    ck_assert_int_eq(s_flush(sealer), 3);
    kh_trail_sealer_destroy(&sealer);
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(NULL, 0, &r), 1);
    ck_assert_msg(r.kind == KH_TRAIL_BAD_SIGNATURE && r.seq == 30,
                  "%s at %lld: %s", kh_trail_finding_name(r.kind),
                  (long long) r.seq, r.detail);
    free(cps);
}
END_TEST

/* kh_trail_sealer_checkpoint on a thread of its own. */
typedef struct {
    kh_trail_sealer_t *sealer;
    int rc;
    bool done;
    kh_error_t err;
} s_checkpoint_call_t;

static void *s_checkpoint_thread(void *arg)
{
    s_checkpoint_call_t *call = arg;
    call->rc = kh_trail_sealer_checkpoint(call->sealer, s_db, &call->err);
    __atomic_store_n(&call->done, true, __ATOMIC_SEQ_CST);
    return NULL;
}

/* A checkpoint asked for (ketenhubctl audit seal --checkpoint) while the
 * audit service is in a sealing round waits for the round to end: read
 * halfway through its commit, the head and the last checkpoint disagree
 * (a false "seals were removed"), and both could sign the same seq. */
START_TEST(a_checkpoint_asked_for_waits_for_a_sealing_round)
{
    s_events_dense(5);
    kh_trail_sealer_t *sealer = s_sealer(1000);
    s_flush(sealer);
    s_events_dense(3);
    s_flush(sealer);
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *round = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(round), CONNECTION_OK);
    /* The lock a sealing round holds (S_LOCK_KEY in trail_db.c). */
    khtest_db_exec(round, "BEGIN", 0, NULL);
    khtest_db_exec(round, "SELECT pg_advisory_xact_lock(7513815)", 0, NULL);
    s_checkpoint_call_t call = {.sealer = sealer};
    pthread_t thread;
    ck_assert_int_eq(pthread_create(&thread, NULL, s_checkpoint_thread, &call),
                     0);
    usleep(300000);
    bool early = __atomic_load_n(&call.done, __ATOMIC_SEQ_CST);
    khtest_db_exec(round, "COMMIT", 0, NULL);
    pthread_join(thread, NULL);
    ck_assert_msg(!early, "the checkpoint did not wait for the round");
    ck_assert_msg(call.rc == 1, "checkpoint: %d %s", call.rc, call.err.message);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT max(seq) FROM"
                                           " audit_checkpoints"),
                     8);
    kh_trail_report_t r;
    ck_assert_int_eq(s_verify(NULL, 0, &r), 0);
    kh_trail_sealer_destroy(&sealer);
    PQfinish(round);
    free(conninfo);
}
END_TEST

/* A sequence that caches values per session (ALTER SEQUENCE ... CACHE
 * n, by a database administrator) would let a session write an event
 * below the sealed head, unsealed for good: the sealer refuses to seal,
 * saying what to run, and seals again once the cache is 1. */
START_TEST(a_cached_sequence_is_refused_for_sealing)
{
    s_events_dense(3);
    khtest_db_exec(s_db, "ALTER SEQUENCE audit_events_seq_seq CACHE 10", 0,
                   NULL);
    kh_trail_sealer_t *sealer = s_sealer(1000);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_sealer_step(sealer, s_db, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_ptr_nonnull(strstr(err.message, "CACHE 1"));
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     0);
    khtest_db_exec(s_db, "ALTER SEQUENCE audit_events_seq_seq CACHE 1", 0,
                   NULL);
    s_flush(sealer);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     3);
    kh_trail_sealer_destroy(&sealer);
}
END_TEST

/* A round that seals and then fails to note the next bound (here: the
 * sequence altered to cache values meanwhile) reports what it sealed, so
 * that the service counts it; the failure comes again at the next round. */
START_TEST(a_round_that_fails_after_sealing_reports_what_it_sealed)
{
    char *conninfo = khtest_db_conninfo(S_DB);
    PGconn *slow = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(slow), CONNECTION_OK);
    s_events_dense(2);
    khtest_db_exec(slow, "BEGIN", 0, NULL);
    khtest_db_exec(slow, s_insert_sql, 0, NULL);
    s_events_dense(1);
    kh_trail_sealer_t *sealer = s_sealer(1000);
    kh_error_t err;
    /* The bound is taken with slow running: nothing final yet. */
    ck_assert_int_eq(kh_trail_sealer_step(sealer, s_db, NULL, &err), 0);
    khtest_db_exec(slow, "COMMIT", 0, NULL);
    khtest_db_exec(s_db, "ALTER SEQUENCE audit_events_seq_seq CACHE 10", 0,
                   NULL);
    long cps = -1;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_trail_sealer_step(sealer, s_db, &cps, &err), 4);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(*) FROM audit_seals"),
                     4);
    ck_assert_int_eq(kh_trail_sealer_step(sealer, s_db, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    khtest_db_exec(s_db, "ALTER SEQUENCE audit_events_seq_seq CACHE 1", 0,
                   NULL);
    kh_trail_sealer_destroy(&sealer);
    PQfinish(slow);
    free(conninfo);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("audit");
    TCase *tc = tcase_create("audit");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 280);
    tcase_add_test(tc, sealed_trail_verifies);
    tcase_add_test(tc, seals_wait_for_a_lower_seq_still_in_flight);
    tcase_add_test(tc, a_transaction_left_open_does_not_hold_up_checkpoints);
    tcase_add_test(tc, seals_wait_for_a_prepared_transaction);
    tcase_add_test(tc, roles_cannot_change_the_trail);
    tcase_add_test(tc, least_privilege_roles_do_their_work);
    tcase_add_test(tc, every_tampering_is_found_with_its_seq);
    tcase_add_test(tc, committed_tampering_is_found_too);
    tcase_add_test(tc, verify_from_a_checkpoint);
    tcase_add_test(tc, long_stretches_between_checkpoints);
    tcase_add_test(tc, service_killed_while_sealing_loses_nothing);
    tcase_add_test(tc, export_verifies_offline);
    tcase_add_test(tc, a_removal_below_unsealed_events_is_found);
    tcase_add_test(tc, a_removal_with_its_seal_is_named);
    tcase_add_test(tc, sealer_refuses_a_head_below_its_checkpoint);
    tcase_add_test(tc, sealer_refuses_a_trail_whose_end_was_removed);
    tcase_add_test(tc, sealer_signs_only_seals_it_computed_or_checked);
    tcase_add_test(tc, checks_refuse_what_they_refused);
    tcase_add_test(tc, referral_checks_decide_as_before);
    tcase_add_test(tc, delivery_state_changes_stay_on_their_page);
    tcase_add_test(tc, rare_events_are_found_through_small_indexes);
    tcase_add_test(tc, database_ids_sort_with_the_services_ids);
    tcase_add_test(tc, an_event_below_the_sequence_is_found);
    tcase_add_test(tc, a_seal_removed_or_rewritten_is_found_by_every_pass);
    tcase_add_test(tc, a_checkpoints_only_export_verified_says_what_it_is);
    tcase_add_test(tc, a_bad_published_checkpoint_is_named_as_published);
    tcase_add_test(tc, a_published_checkpoint_gone_from_the_database_is_found);
    tcase_add_test(tc, the_chain_is_over_utf8_whatever_the_session_encoding);
    suite_add_tcase(suite, tc);
    /* Times C cannot compute with, and the sealer beside others
     * (CK_RUN_CASE=sealer). */
    TCase *tc_sealer = tcase_create("sealer");
    tcase_add_checked_fixture(tc_sealer, s_setup, s_teardown);
    tcase_set_timeout(tc_sealer, 120);
    tcase_add_test(tc_sealer, an_event_at_an_infinite_time_is_found_altered);
    tcase_add_test(tc_sealer, a_checkpoint_asked_for_waits_for_a_sealing_round);
    tcase_add_test(tc_sealer, a_cached_sequence_is_refused_for_sealing);
    tcase_add_test(tc_sealer, a_backlog_is_sealed_a_few_batches_a_transaction);
    tcase_add_test(tc_sealer,
                   a_round_that_fails_after_sealing_reports_what_it_sealed);
    suite_add_tcase(suite, tc_sealer);
    /* What an auditor types and reads: options, files, pipes. */
    TCase *tc_auditor = tcase_create("auditor");
    tcase_add_checked_fixture(tc_auditor, s_setup, s_teardown);
    tcase_set_timeout(tc_auditor, 120);
    tcase_add_test(tc_auditor, an_export_is_verified_from_a_pipe);
    tcase_add_test(tc_auditor, an_export_with_keys_of_its_own_is_refused);
    tcase_add_test(tc_auditor,
                   an_export_header_that_does_not_fit_its_anchor_is_refused);
    tcase_add_test(tc_auditor,
                   an_export_cut_before_the_end_its_header_names_is_found);
    tcase_add_test(tc_auditor,
                   auditor_options_are_checked_before_anything_runs);
    tcase_add_test(tc_auditor, output_that_cannot_be_written_is_a_failure);
    tcase_add_test(tc_auditor, audit_seal_verify_export_say_what_they_did);
    tcase_add_test(tc_auditor, the_trail_verifies_across_an_audit_key_rotation);
    tcase_add_test(tc_auditor, a_replaced_audit_key_signs_nothing_more);
    tcase_add_test(tc_auditor, a_verify_that_cannot_be_recorded_is_a_failure);
    tcase_add_test(tc_auditor, report_counts_what_the_trail_says);
    tcase_add_test(tc_auditor, report_waits_count_from_the_first_send);
    tcase_add_test(tc_auditor, report_counts_no_rule_for_the_rules_left_out);
    tcase_add_test(tc_auditor,
                   an_interrupted_export_leaves_no_file_under_its_name);
    tcase_add_test(tc_auditor, query_takes_the_actor_as_the_table_prints_it);
    tcase_add_test(tc_auditor, a_finding_says_how_far_the_trail_held);
    suite_add_tcase(suite, tc_auditor);
    /* The service through its database's outages. */
    TCase *tc_outage = tcase_create("outage");
    tcase_add_checked_fixture(tc_outage, s_setup, s_teardown);
    tcase_set_timeout(tc_outage, 60);
    tcase_add_test(tc_outage,
                   service_waits_for_its_database_and_says_when_it_is_back);
    tcase_add_test(tc_outage,
                   sealing_that_fails_is_tried_again_ever_more_slowly);
    tcase_add_test(tc_outage,
                   steady_sealing_is_summed_up_not_logged_step_by_step);
    tcase_add_test(tc_outage, a_long_poll_is_no_silence);
    suite_add_tcase(suite, tc_outage);
    return khtest_run_suite(suite);
}
