/*
 * ketenhubctl purge: erase the personal data of referrals whose retention
 * period is over and whose work is done (promise 6).
 *
 * A referral is done when it was routed (or set aside as unroutable) and
 * every delivery of it is acknowledged or dead. Its purge sets the
 * referral's payload and its deliveries' payloads and escalation payloads
 * to NULL and writes one referral.purged audit event with the payload's
 * hash, in one transaction (promise 2). Ids, states, times and hashes stay,
 * so the trail stays whole and verifiable. The purge never reads a payload
 * (ketenhub_admin may not, migration 022): what is left to purge it tells
 * by the payloads' sizes (payload_bytes, NULL once purged), and it writes
 * NULL over them. A referral still in work is
 * never touched, however old: its partners would lose what they have not
 * received yet.
 *
 * Work goes in batches, each its own transaction: first the batch's
 * referrals are locked, then their deliveries, and only then, on a
 * snapshot taken after the locks, does the purge check again that each is
 * done. A delivery that became pending meanwhile (a dead letter retried)
 * keeps its referral from the purge. Nothing waits for a lock: a referral,
 * or a delivery of one, that another transaction holds (an ACK batch, a
 * retry) is left for the next run, so the purge can neither deadlock with
 * the services nor hold them up. An interrupted purge can be run again:
 * what it did is committed batch by batch, and the rest is found again.
 */
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ketenhub/audit.h"
#include "ketenhub/db.h"
#include "ketenhub/pgarray.h"

#define S_BATCH_DEFAULT 1000
#define S_BATCH_MAX 100000
#define S_DAYS_MAX 36500

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl purge (--before TIME | --older-than DAYS) "
            "[--dry-run]\n"
            "         [--batch N] [--json]\n"
            "\n"
            "Erase the personal data of the referrals accepted before a "
            "cutoff whose work\n"
            "is done (routed or unroutable, every delivery acknowledged or "
            "dead since\n"
            "before the cutoff, an urgent dead letter escalated too): the\n"
            "referral's payload and its deliveries' payloads become NULL. "
            "Ids, states,\n"
            "times and payload hashes stay, so the audit trail stays whole "
            "and verifiable.\n"
            "Each purged referral gets a referral.purged audit event naming "
            "you, in the\n"
            "same transaction. Referrals still in work are kept, however "
            "old, and so are\n"
            "those with a dead letter that died after the cutoff. A dead "
            "letter that is\n"
            "purged can no longer be retried. When this login owns the "
            "tables, it then\n"
            "runs VACUUM on referrals and deliveries, which removes the row "
            "versions that\n"
            "held the purged payloads; otherwise autovacuum does, later.\n"
            "\n"
            "  --before TIME      cutoff: an ISO 8601 time (2025-11-29,\n"
            "                     2025-11-29T00:00:00Z; UTC when no zone is "
            "given),\n"
            "                     not in the future\n"
            "  --older-than DAYS  cutoff: DAYS (1..%d) days before now\n"
            "  --dry-run          count what would be purged; change nothing\n"
            "  --batch N          referrals per transaction (1..%d, default "
            "%d)\n"
            "  --json             the counts as one JSON object, for scripts\n"
            "  --help             this text\n"
            "\n"
            "Exit status: 0 done (also when there was nothing to purge), 1 "
            "the database\n"
            "failed (batches committed before stay purged; run it again), 2 "
            "usage.\n",
            S_DAYS_MAX, S_BATCH_MAX, S_BATCH_DEFAULT);
}

/* The cutoff, from $1: a time (--before, as ctl_time_arg wrote it) or a
 * number of days before now (--older-than), as the exact text of the
 * timestamp in RFC 3339 UTC, to the microsecond (as the other commands
 * write times; the statements below read it back as it is, and it is what
 * the report prints). No row: in the future, or not finite. */
#define S_CUTOFF(expr)                                                         \
    "SELECT to_char(c AT TIME ZONE 'UTC',"                                     \
    " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') FROM (SELECT " expr " AS c) t"      \
    " WHERE c <= now() AND isfinite(c)"
static const char s_cutoff_before_sql[] = S_CUTOFF("$1::timestamptz");
static const char s_cutoff_days_sql[] =
    S_CUTOFF("now() - make_interval(days => $1::int)");

/* clang-format off */
/* Whether the referral r is done by the cutoff: routed or set aside as
 * unroutable, and no delivery of it pending or delivered, nor dead since
 * the cutoff: a dead letter is the administrator's to retry, and its
 * retention runs from when it died, not from when its referral came.
 * Nor an urgent dead letter not escalated yet whose escalation partner
 * is to get a copy (migration 015: it escalates when its time comes, and
 * one that died under an older release at the next sweep): the copy is
 * made from its escalation payload. */
#define S_DONE(r, cutoff)                                                      \
    r ".state IN ('routed', 'unroutable') AND NOT EXISTS (SELECT 1"            \
    " FROM deliveries d WHERE d.referral_id = " r ".id"                        \
    " AND (d.state IN ('pending', 'delivered')"                                \
    " OR (d.state = 'dead' AND d.updated_at >= " cutoff ")"                    \
    " OR (d.state = 'dead' AND d.priority = 'urgent'"                          \
    " AND d.escalated_at IS NULL"                                              \
    " AND d.escalation_payload_bytes IS NOT NULL)))"

/* $1 cutoff: the referrals to purge and their deliveries with a payload,
 * and the referrals before the cutoff kept because they are in work. */
static const char s_count_sql[] =
    "SELECT count(*) FILTER (WHERE done),"
    " coalesce(sum(dlv) FILTER (WHERE done), 0),"
    " count(*) FILTER (WHERE NOT done)"
    " FROM (SELECT " S_DONE("r", "$1::timestamptz") " AS done,"
    "  (SELECT count(*) FROM deliveries d WHERE d.referral_id = r.id"
    "   AND (d.payload_bytes IS NOT NULL"
    "   OR d.escalation_payload_bytes IS NOT NULL))"
    "  AS dlv"
    "  FROM referrals r WHERE r.accepted_at < $1::timestamptz"
    "  AND r.payload_bytes IS NOT NULL) t";

/* $1 the referrals this run left already, $2 cutoff, $3 batch size: lock
 * a batch of done referrals, oldest first. */
static const char s_lock_sql[] =
    "SELECT r.id FROM referrals r WHERE r.accepted_at < $2::timestamptz"
    " AND r.payload_bytes IS NOT NULL AND r.id <> ALL ($1::uuid[])"
    " AND " S_DONE("r", "$2::timestamptz")
    " ORDER BY r.accepted_at LIMIT $3::int"
    " FOR NO KEY UPDATE OF r SKIP LOCKED";

/* $1 the batch's ids: lock their deliveries, so that none changes state
 * before the purge commits. Returns each referral and whether its
 * deliveries are all locked now (false: one is held elsewhere). */
static const char s_lock_deliveries_sql[] =
    "WITH locked AS (SELECT referral_id FROM deliveries"
    "  WHERE referral_id = ANY ($1::uuid[])"
    "  FOR NO KEY UPDATE SKIP LOCKED),"
    " counted AS (SELECT referral_id, count(*) AS n FROM locked"
    "  GROUP BY referral_id)"
    " SELECT r.id, coalesce(c.n, 0) ="
    "  (SELECT count(*) FROM deliveries d WHERE d.referral_id = r.id)"
    " FROM unnest($1::uuid[]) r(id)"
    " LEFT JOIN counted c ON c.referral_id = r.id";

/* $1 the batch's ids, $2 the command's origin (USER@HOST), $3 the cutoff;
 * the event's actor is admin and the login (the defaults, 025).
 * Checks once more
 * (on a snapshot taken after the locks) that each referral is done, erases
 * the payloads and writes the events. Returns the referrals and
 * deliveries purged. */
static const char s_purge_sql[] =
    "WITH done AS (SELECT r.id, r.payload_hash FROM referrals r"
    "  WHERE r.id = ANY ($1::uuid[]) AND r.payload_bytes IS NOT NULL"
    "  AND " S_DONE("r", "$3::timestamptz") "),"
    " refs AS (UPDATE referrals r SET payload = NULL FROM done"
    "  WHERE r.id = done.id RETURNING r.id),"
    " dels AS (UPDATE deliveries d SET payload = NULL,"
    "  escalation_payload = NULL FROM done WHERE d.referral_id = done.id"
    "  AND (d.payload_bytes IS NOT NULL"
    "  OR d.escalation_payload_bytes IS NOT NULL)"
    "  RETURNING d.id),"
    " events AS (INSERT INTO audit_events (action,"
    "  referral_id, outcome, payload_hash, origin_service, origin_peer)"
    "  SELECT 'referral.purged', id, 'ok', payload_hash,"
    "  'ketenhubctl', $2 FROM done ORDER BY id RETURNING 1)"
    " SELECT (SELECT count(*) FROM refs), (SELECT count(*) FROM dels),"
    " (SELECT count(*) FROM events)";
/* clang-format on */

/* Whether this login may VACUUM referrals and deliveries: it owns them
 * (is a member of their owner's role), owns the database, or is a
 * superuser. */
static const char s_may_vacuum_sql[] =
    "SELECT bool_and(pg_has_role(relowner, 'USAGE')) OR pg_has_role("
    " (SELECT datdba FROM pg_database WHERE datname = current_database()),"
    " 'USAGE') FROM pg_class"
    " WHERE oid IN ('referrals'::regclass, 'deliveries'::regclass)";

/* Referrals (and their deliveries) purged or to purge, referrals kept
 * because still in work, and done ones that another transaction held (a
 * next run takes them); the tables vacuumed after (s_vacuum: 1 done, 0
 * not this login's to do, -1 failed; 0 too when nothing was purged). */
typedef struct {
    long referrals, deliveries, kept, busy;
    int vacuumed;
} s_counts_t;

/* The arrays of one run: the batch locked, the part of it to purge, and the
 * referrals left because another transaction held one of their deliveries
 * (kept across batches, so that no later batch of this run takes them
 * again). All uuid[], sent in binary. */
typedef struct {
    kh_pgarray_t locked, whole, held;
} s_arrays_t;

/* Run sql with its text params; when array is not NULL, $1 is that binary
 * array (params[0] is filled in). The result, or NULL with err. */
static PGresult *s_query(PGconn *conn, const char *sql, int nparams,
                         kh_pgarray_t *array, const char **params,
                         const char *what, kh_error_t *err)
{
    int lengths[4] = {0}, formats[4] = {0};
    if (array && !(params[0] = kh_pgarray_data(array, &lengths[0]))) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    formats[0] = array != NULL;
    PGresult *res =
        PQexecParams(conn, sql, nparams, NULL, params, lengths, formats, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        return res;
    kh_db_error(err, conn, res, what);
    PQclear(res);
    return NULL;
}

/* The counts before the cutoff (s_count_sql). */
static int s_count(PGconn *conn, const char *cutoff, s_counts_t *counts,
                   kh_error_t *err)
{
    const char *params[] = {cutoff};
    PGresult *res = s_query(conn, s_count_sql, 1, NULL, params,
                            "cannot count referrals", err);
    if (!res)
        return -1;
    counts->referrals = atol(PQgetvalue(res, 0, 0));
    counts->deliveries = atol(PQgetvalue(res, 0, 1));
    counts->kept = atol(PQgetvalue(res, 0, 2));
    PQclear(res);
    return 0;
}

/* One batch in its own transaction; adds what it purged to done once it
 * committed, and to a->held the referrals it left. Returns the number of
 * referrals it locked (0: nothing left), or -1 with err: the batch rolled
 * back, or the connection was lost with its commit's answer (said on
 * stderr, and counted in done when a new connection tells it went
 * through). */
static int s_batch(PGconn *conn, const char *cutoff, const char *batch,
                   s_arrays_t *a, const kh_audit_origin_t *origin,
                   s_counts_t *done, kh_error_t *err)
{
    if (kh_db_exec(conn, "BEGIN", err))
        return -1;
    const char *lock_params[] = {NULL, cutoff, batch};
    PGresult *res = s_query(conn, s_lock_sql, 3, &a->held, lock_params,
                            "cannot lock referrals", err);
    int locked = res ? PQntuples(res) : -1;
    kh_pgarray_reset(&a->locked, KH_PG_UUID);
    for (int r = 0; r < locked; r++)
        kh_pgarray_add_uuid(&a->locked, PQgetvalue(res, r, 0));
    PQclear(res);
    if (locked > 0) {
        /* Only the referrals whose deliveries are all locked too go on. */
        const char *params[] = {NULL};
        res = s_query(conn, s_lock_deliveries_sql, 1, &a->locked, params,
                      "cannot lock deliveries", err);
        kh_pgarray_reset(&a->whole, KH_PG_UUID);
        for (int r = 0; res && r < PQntuples(res); r++)
            kh_pgarray_add_uuid(
                strcmp(PQgetvalue(res, r, 1), "t") == 0 ? &a->whole : &a->held,
                PQgetvalue(res, r, 0));
        if (!res)
            locked = -1;
        PQclear(res);
    }
    long referrals = 0, deliveries = 0;
    if (locked > 0) {
        const char *params[] = {NULL, origin->peer, cutoff};
        res = s_query(conn, s_purge_sql, 3, &a->whole, params, "cannot purge",
                      err);
        if (res) {
            referrals = atol(PQgetvalue(res, 0, 0));
            deliveries = atol(PQgetvalue(res, 0, 1));
        } else
            locked = -1;
        PQclear(res);
    }
    bool lost = false;
    int committed = locked >= 0 ? ctl_commit_xact(conn, &lost, err) : 0;
    if (committed == 1) {
        done->referrals += referrals;
        done->deliveries += deliveries;
    }
    if (committed == 1 && !lost)
        return locked;
    if (committed == 0)
        kh_db_rollback_quietly(conn);
    else
        fprintf(stderr,
                "ketenhubctl: purge: the connection was lost with the answer "
                "to a batch's commit, which %s\n",
                lost ? "went through after all"
                     : "may or may not have gone through (purge --dry-run "
                       "counts what is left)");
    return -1;
}

/* After a purge that erased payloads: the row versions that held them
 * stay in the tables' files until VACUUM removes them, which autovacuum
 * does only after thousands of changes (migration 003), so a quiet hub
 * could keep them for days. Run it now when this login may: 1 done, 0
 * it may not (said on stdout: the tables' owner's to run), -1 failed with
 * err (the purge itself is committed). */
static int s_vacuum(PGconn *conn, kh_error_t *err)
{
    PGresult *res = PQexec(conn, s_may_vacuum_sql);
    int may = PQresultStatus(res) == PGRES_TUPLES_OK
                  ? strcmp(PQgetvalue(res, 0, 0), "t") == 0
                  : -1;
    if (may < 0)
        kh_db_error(err, conn, res, "cannot read who owns the tables");
    PQclear(res);
    if (may != 1)
        return may;
    return kh_db_exec(conn, "VACUUM referrals, deliveries", err) ? -1 : 1;
}

static void s_report(const char *cutoff, bool dry_run, bool json,
                     const s_counts_t *counts)
{
    if (json) {
        json_t *o = json_pack(
            "{s:s, s:b, s:I, s:I, s:I, s:I, s:b}", "cutoff", cutoff, "dry_run",
            dry_run, "referrals", (json_int_t) counts->referrals, "deliveries",
            (json_int_t) counts->deliveries, "kept_in_work",
            (json_int_t) counts->kept, "busy", (json_int_t) counts->busy,
            "vacuumed", counts->vacuumed == 1);
        char *text = o ? json_dumps(o, JSON_COMPACT) : NULL;
        if (text)
            printf("%s\n", text);
        free(text);
        json_decref(o);
        return;
    }
    printf("%s %ld %s (%ld %s) accepted before %s\n",
           dry_run ? "would purge" : "purged", counts->referrals,
           counts->referrals == 1 ? "referral" : "referrals",
           counts->deliveries,
           counts->deliveries == 1 ? "delivery" : "deliveries", cutoff);
    if (counts->kept)
        printf("kept %ld %s accepted before %s: still in work, or holding a "
               "dead letter to retry or to escalate\n",
               counts->kept, counts->kept == 1 ? "referral" : "referrals",
               cutoff);
    if (counts->busy)
        printf("left %ld done %s: held by another transaction, or done "
               "only since the purge began; run it again\n",
               counts->busy, counts->busy == 1 ? "referral" : "referrals");
    if (counts->vacuumed == 1)
        printf("vacuumed referrals and deliveries: the row versions that "
               "held the purged payloads are gone\n"
               "(but for those a transaction older than the purge may still "
               "read)\n");
    else if (counts->vacuumed == 0 && !dry_run && counts->referrals)
        printf("not vacuumed: this login does not own referrals and "
               "deliveries; the row versions\n"
               "that held the purged payloads stay in their files until "
               "autovacuum removes\n"
               "them, or the owner runs VACUUM referrals, deliveries\n");
}

static int s_purge(const char *value, bool days, bool dry_run, int batch,
                   bool json)
{
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    int rc = CTL_OK;
    /* A lock held elsewhere (other than the rows it skips) must not stop
     * the purge for long. */
    if (kh_db_exec(conn, "SET lock_timeout = '10s'", &err))
        rc = CTL_FAIL;
    char cutoff[64] = "";
    if (rc == CTL_OK) {
        const char *params[] = {value};
        PGresult *res =
            PQexecParams(conn, days ? s_cutoff_days_sql : s_cutoff_before_sql,
                         1, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
            snprintf(cutoff, sizeof cutoff, "%s", PQgetvalue(res, 0, 0));
        else if (PQresultStatus(res) == PGRES_TUPLES_OK)
            rc = ctl_usage_error("purge: --before %s is not a time in the past",
                                 value);
        else {
            kh_db_error(&err, conn, res, "cannot read the cutoff");
            rc = CTL_FAIL;
        }
        PQclear(res);
    }
    s_counts_t counts = {0, 0, 0, 0, 0};
    if (rc == CTL_OK && dry_run) {
        if (s_count(conn, cutoff, &counts, &err))
            rc = CTL_FAIL;
    } else if (rc == CTL_OK) {
        kh_audit_origin_t origin = kh_audit_origin();
        char size[16];
        snprintf(size, sizeof size, "%d", batch);
        s_arrays_t arrays;
        memset(&arrays, 0, sizeof arrays);
        kh_pgarray_reset(&arrays.held, KH_PG_UUID);
        int locked = 1;
        while (locked > 0)
            locked =
                s_batch(conn, cutoff, size, &arrays, &origin, &counts, &err);
        kh_pgarray_free(&arrays.locked);
        kh_pgarray_free(&arrays.whole);
        kh_pgarray_free(&arrays.held);
        s_counts_t after;
        if (locked < 0 || s_count(conn, cutoff, &after, &err))
            rc = CTL_FAIL;
        else {
            counts.kept = after.kept;
            counts.busy = after.referrals;
        }
        if (rc == CTL_OK && counts.referrals)
            counts.vacuumed = s_vacuum(conn, &err);
    }
    if (rc == CTL_FAIL) {
        ctl_print_error(&err);
        if (!dry_run && counts.referrals)
            fprintf(stderr,
                    "ketenhubctl: purge: %ld referrals were purged before "
                    "the failure; run it again for the rest\n",
                    counts.referrals);
    } else if (rc == CTL_OK)
        s_report(cutoff, dry_run, json, &counts);
    if (counts.vacuumed < 0) {
        ctl_print_error(&err);
        fprintf(stderr, "ketenhubctl: purge: the purge is committed, but the "
                        "tables were not vacuumed: VACUUM referrals, "
                        "deliveries as their owner, or leave it to "
                        "autovacuum\n");
        rc = CTL_FAIL;
    }
    PQfinish(conn);
    return rc;
}

int ctl_purge(int argc, char **argv)
{
    static const struct option options[] = {
        {"before", required_argument, NULL, 'b'},
        {"older-than", required_argument, NULL, 'o'},
        {"dry-run", no_argument, NULL, 'n'},
        {"batch", required_argument, NULL, 'B'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *before = NULL, *older = NULL;
    bool dry_run = false, json = false;
    long batch = S_BATCH_DEFAULT;
    char *end;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "b:o:nB:jh", options, &cli)) != -1) {
        switch (c) {
        case 'b':
            before = optarg;
            break;
        case 'o':
            older = optarg;
            break;
        case 'n':
            dry_run = true;
            break;
        case 'B':
            batch = strtol(optarg, &end, 10);
            if (*optarg == '\0' || *end != '\0' || batch < 1 ||
                batch > S_BATCH_MAX)
                return ctl_usage_error("purge: --batch must be a number "
                                       "from 1 to %d",
                                       S_BATCH_MAX);
            break;
        case 'j':
            json = true;
            break;
        case 'h':
            s_usage(stdout);
            return CTL_OK;
        default:
            s_usage(stderr);
            return CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("purge: unexpected argument '%s'", argv[optind]);
    if (!before == !older)
        return ctl_usage_error("purge: give either --before TIME or "
                               "--older-than DAYS");
    char cutoff[CTL_TIME_SIZE];
    if (before &&
        ctl_time_arg("purge: --before", before, NULL, cutoff) != CTL_OK)
        return CTL_USAGE;
    if (older) {
        long days = strtol(older, &end, 10);
        if (*older == '\0' || *end != '\0' || days < 1 || days > S_DAYS_MAX)
            return ctl_usage_error("purge: --older-than must be a number of "
                                   "days from 1 to %d",
                                   S_DAYS_MAX);
    }
    return s_purge(before ? cutoff : older, older != NULL, dry_run, (int) batch,
                   json);
}
