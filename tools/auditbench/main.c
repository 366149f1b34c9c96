/*
 * ketenhub-auditbench: figures for the sealed trail on a real database
 * (printed, never asserted): how fast the audit service seals, how fast
 * `ketenhubctl audit verify` checks the chain, and how long the query for
 * one referral's history takes, with N events in the trail (default
 * 10,000,000). Run it against a scratch database with fsync on (see
 * scripts/bench.sh --audit): it fills audit_events with synthetic events
 * of about eight per referral.
 *
 *   ketenhub-auditbench [--events N] [--queries N] [--reuse]
 */
#include <getopt.h>
#include <inttypes.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ketenhub/db.h"
#include "ketenhub/trail_db.h"

/* The history query of `ketenhubctl audit query --referral` (cmd_audit.c),
 * paging included. */
static const char *s_history_sql =
    "SELECT seq, to_char(at AT TIME ZONE 'UTC', "
    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), actor_kind, actor_id, action,"
    " referral_id, delivery_id, partner_id, outcome, reason_code,"
    " reason_path, encode(payload_hash, 'hex'), rules_version,"
    " origin_service, origin_peer, rules_matched, query_filter"
    " FROM audit_trail WHERE (referral_id = $1::uuid OR delivery_id = ANY"
    " (ARRAY(SELECT id FROM audit_delivery_ids WHERE referral_id ="
    " $1::uuid))) ORDER BY seq LIMIT 101";

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

static int s_cmp(const void *a, const void *b)
{
    double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

static void s_die(const char *what, const kh_error_t *err)
{
    fprintf(stderr, "ketenhub-auditbench: %s: %s\n", what,
            err ? err->message : "failed");
    exit(1);
}

static long long s_count(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        fprintf(stderr, "ketenhub-auditbench: %s", PQerrorMessage(conn));
        exit(1);
    }
    long long n = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return n;
}

/* Synthetic events in chunks of a million per transaction: eight per
 * referral (accepted, routed, and sent/acked for three deliveries), ids
 * derived from the row number. */
static void s_fill(PGconn *conn, long long events)
{
    long long have = s_count(conn, "SELECT count(*) FROM audit_events");
    double t0 = s_now();
    for (long long from = have; from < events; from += 1000000) {
        long long to = from + 1000000 < events ? from + 1000000 : events;
        char sql[2048];
        snprintf(sql, sizeof sql,
                 "INSERT INTO audit_events (at, actor_kind, actor_id, action,"
                 " referral_id, delivery_id, partner_id, outcome,"
                 " payload_hash, rules_version, origin_service, origin_peer)"
                 " SELECT now(), CASE WHEN i %% 8 < 2 THEN 'service' ELSE"
                 " 'partner' END, (ARRAY['meldpunt-hilversum', 'routing',"
                 " 'veilig-thuis', 'zorgcoordinator'])[i %% 4 + 1],"
                 " (ARRAY['referral.accepted', 'referral.routed',"
                 " 'delivery.sent', 'delivery.acked'])[i %% 8 / 2 + 1],"
                 " md5((i / 8)::text)::uuid, CASE WHEN i %% 8 >= 2 THEN"
                 " md5('d' || (i / 2)::text)::uuid END, CASE WHEN i %% 8 >= 2"
                 " THEN 'veilig-thuis' END, 'ok', sha256(i::text::bytea),"
                 " CASE WHEN i %% 8 = 1 THEN 'a3f1c2' END, 'intake',"
                 " '10.0.0.' || (i %% 250) FROM generate_series(%lld, %lld) i",
                 from, to - 1);
        kh_error_t err;
        if (kh_db_exec(conn, sql, &err) != 0)
            s_die("cannot fill the trail", &err);
        fprintf(stderr, "filled %lld events (%.0f s)\n", to, s_now() - t0);
    }
    kh_error_t err;
    if (kh_db_exec(conn, "VACUUM ANALYZE audit_events", &err) != 0)
        s_die("cannot vacuum", &err);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"events", required_argument, NULL, 'n'},
        {"queries", required_argument, NULL, 'q'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    long long events = 10000000;
    int queries = 1000, c;
    while ((c = getopt_long(argc, argv, "n:q:h", options, NULL)) != -1) {
        if (c == 'n')
            events = atoll(optarg);
        else if (c == 'q')
            queries = atoi(optarg);
        else {
            fprintf(c == 'h' ? stdout : stderr,
                    "usage: ketenhub-auditbench [--events N] [--queries N]\n"
                    "database: $KH_DATABASE_URL or the PG* environment "
                    "(a scratch database, migrated)\n");
            return c == 'h' ? 0 : 2;
        }
    }
    if (events < 1 || queries < 1 || sodium_init() < 0)
        return 2;
    kh_error_t err;
    kh_error_clear(&err);
    PGconn *conn = kh_db_connect_app(kh_db_env_conninfo(), "auditbench", &err);
    if (!conn)
        s_die("cannot connect", &err);
    s_fill(conn, events);
    long long total = s_count(conn, "SELECT count(*) FROM audit_events");
    printf("trail: %lld events\n", total);

    /* Sealing, as the audit service does it (checkpoint every 1000). */
    unsigned char pk[32], sk[64];
    crypto_sign_keypair(pk, sk);
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = 1000, .checkpoint_ms = 60000, .batch = 10000};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(sk, &cfg);
    double t0 = s_now();
    long sealed = kh_trail_sealer_flush(sealer, conn, 3600 * 1000, &err);
    double dt = s_now() - t0;
    if (sealed < 0)
        s_die("cannot seal", &err);
    if (sealed > 0)
        printf("seal:   %ld events in %.1f s = %.0f events/s\n", sealed, dt,
               (double) sealed / dt);
    kh_trail_sealer_destroy(&sealer);
    /* A trail sealed by an earlier run has another key: verify with the
     * key of the checkpoints found. */
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    if (kh_trail_db_checkpoints(conn, &cps, &ncps, &err) != 0)
        s_die("cannot read checkpoints", &err);
    if (ncps > 0)
        memcpy(pk, cps[0].public_key, sizeof pk);
    free(cps);

    /* Verification of the whole chain, from the genesis. */
    for (int run = 0; run < 3; run++) {
        kh_trail_report_t report;
        t0 = s_now();
        int rc = kh_trail_db_verify(conn, pk, 0, NULL, 0, &report, &err);
        dt = s_now() - t0;
        if (rc < 0)
            s_die("cannot verify", &err);
        printf("verify: %" PRId64 " events, %" PRId64 " checkpoints in %.2f s"
               " = %.0f events/s (%s)\n",
               report.events, report.checkpoints, dt,
               (double) report.events / dt, rc == 0 ? "intact" : "FINDING");
    }

    /* The same as an auditor sees it: through the views only. */
    {
        kh_error_t aerr;
        if (kh_db_exec(conn,
                       "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles"
                       " WHERE rolname = 'kh_bench_auditor') THEN CREATE ROLE"
                       " kh_bench_auditor LOGIN IN ROLE ketenhub_auditor; END"
                       " IF; END $$",
                       &aerr) != 0)
            s_die("cannot make the auditor role", &aerr);
        char conninfo[2048];
        snprintf(conninfo, sizeof conninfo, "%s user=kh_bench_auditor",
                 kh_db_env_conninfo());
        PGconn *auditor = kh_db_connect_app(conninfo, "auditbench", &aerr);
        if (!auditor)
            s_die("cannot connect as the auditor", &aerr);
        kh_trail_report_t report;
        t0 = s_now();
        int rc = kh_trail_db_verify(auditor, pk, 0, NULL, 0, &report, &aerr);
        dt = s_now() - t0;
        if (rc < 0)
            s_die("cannot verify as the auditor", &aerr);
        printf("verify as ketenhub_auditor (views): %" PRId64
               " events in %.2f s = %.0f events/s (%s)\n",
               report.events, dt, (double) report.events / dt,
               rc == 0 ? "intact" : "FINDING");
        PQfinish(auditor);
    }

    /* One referral's history, random referrals. */
    double *ms = calloc((size_t) queries, sizeof *ms);
    long long referrals = total / 8;
    int rows = 0;
    for (int i = 0; i < queries; i++) {
        char id[64];
        long long r = (long long) randombytes_uniform(
            (uint32_t) (referrals > 0 ? referrals : 1));
        char key[32];
        snprintf(key, sizeof key, "%lld", r);
        snprintf(id, sizeof id, "%s", key);
        const char *params[] = {id};
        /* the id is md5(r)::uuid, computed by the server */
        PGresult *res = PQexecParams(conn, "SELECT md5($1)::uuid::text", 1,
                                     NULL, params, NULL, NULL, 0);
        snprintf(id, sizeof id, "%s", PQgetvalue(res, 0, 0));
        PQclear(res);
        t0 = s_now();
        res = PQexecParams(conn, s_history_sql, 1, NULL, params, NULL, NULL, 0);
        ms[i] = (s_now() - t0) * 1e3;
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            fprintf(stderr, "ketenhub-auditbench: %s", PQerrorMessage(conn));
            return 1;
        }
        rows += PQntuples(res);
        PQclear(res);
    }
    qsort(ms, (size_t) queries, sizeof *ms, s_cmp);
    printf("history query (one referral, %.1f events on average): p50 %.2f "
           "ms, p99 %.2f ms, max %.2f ms over %d queries\n",
           (double) rows / queries, ms[queries / 2], ms[(int) (queries * 0.99)],
           ms[queries - 1], queries);
    free(ms);
    PQfinish(conn);
    return 0;
}
