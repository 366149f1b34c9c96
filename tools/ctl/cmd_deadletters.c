/*
 * ketenhubctl deadletters list / show / retry: the deliveries the
 * notification service gave up on (state dead: too many attempts, too old,
 * refused for good by the partner, or the partner was revoked), for the
 * administrator who decides what happens next.
 *
 * Nothing here ever reads a delivery's payload, nor may ketenhub_admin
 * (migration 022): list and show select only ids, states, counters, times
 * and the payload's hash and size (payload_bytes, NULL once purged), and
 * retry tells a purged delivery by its size. show also
 * reads the delivery's audit events, and records that look at the trail
 * as trail.queried (filter delivery=ID) in the same transaction. retry puts
 * dead deliveries back to pending (same delivery id, attempts from 0) in
 * one statement together with one delivery.retried audit event each, so
 * the change and its trail commit together (promise 2); the notification
 * service picks them up on its next pass (next_attempt_at = now()).
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/audit.h"
#include "ketenhub/db.h"
#include "ketenhub/partner.h"
#include "ketenhub/trail_db.h"

/* Timestamps as RFC 3339 UTC with milliseconds, like the rest of the hub. */
#define S_TS(col)                                                              \
    "to_char(" col " AT TIME ZONE 'UTC', "                                     \
    "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl deadletters list [--partner P] [--since TIME] "
            "[--json]\n"
            "       ketenhubctl deadletters show ID [--json]\n"
            "       ketenhubctl deadletters retry ID...\n"
            "       ketenhubctl deadletters retry --partner P --all\n"
            "\n"
            "Run `ketenhubctl deadletters list|show|retry --help` for "
            "details.\n");
}

static void s_usage_list(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl deadletters list [--partner P] [--since TIME] "
            "[--json]\n"
            "\n"
            "List the dead deliveries, oldest death first: delivery id, "
            "referral id,\n"
            "partner, priority, attempts, why it died, created and updated "
            "(died) times.\n"
            "\n"
            "  --partner P   only partner P's\n"
            "  --since TIME  only those that died at or after TIME (ISO "
            "8601:\n"
            "                2026-11-28, 2026-11-28T10:00:00Z; UTC when it "
            "names no zone)\n"
            "  --json        one JSON array, for scripts\n"
            "  --help        this text\n");
}

static void s_usage_show(FILE *out)
{
    fprintf(out, "usage: ketenhubctl deadletters show ID [--json]\n"
                 "\n"
                 "Show one delivery (in any state): its ids, state, attempts, "
                 "times,\n"
                 "escalation, the payload's hash and size, and its audit "
                 "events. Never\n"
                 "the payload itself. Reading the events is recorded as "
                 "trail.queried.\n"
                 "\n"
                 "  --json  one JSON object, for scripts\n"
                 "  --help  this text\n");
}

static void s_usage_retry(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl deadletters retry ID...\n"
            "       ketenhubctl deadletters retry --partner P --all\n"
            "\n"
            "Send dead deliveries again, with the same delivery ids: each "
            "becomes pending\n"
            "with its attempts reset, and gets a delivery.retried audit "
            "event. All or\n"
            "nothing: when one ID is unknown, not dead, its payload was "
            "purged, or\n"
            "its partner is revoked, nothing changes and the exit status is "
            "1.\n"
            "\n"
            "  --partner P --all  every dead delivery of partner P (but "
            "those whose\n"
            "                     payload was purged: they cannot be sent)\n"
            "  --help             this text\n");
}

/* Whether s is a UUID in its text form (8-4-4-4-12 hex digits). */
static bool s_uuid_ok(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        char c = s[i];
        bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
                   (c >= 'A' && c <= 'F');
        if (dash ? c != '-' : !hex)
            return false;
    }
    return true;
}

/* Row r of res as a new JSON object keyed by column name; columns listed
 * in ints are numbers, NULLs are null. NULL when out of memory. */
static json_t *s_row_json(const PGresult *res, int r, const char *const *ints)
{
    json_t *o = json_object();
    for (int c = 0; o && c < PQnfields(res); c++) {
        const char *name = PQfname(res, c);
        bool is_int = false;
        for (const char *const *i = ints; *i; i++)
            is_int = is_int || strcmp(*i, name) == 0;
        json_t *v = PQgetisnull(res, r, c) ? json_null()
                    : is_int ? json_integer(atoll(PQgetvalue(res, r, c)))
                             : json_string(PQgetvalue(res, r, c));
        if (!v || json_object_set_new(o, name, v)) {
            json_decref(o);
            return NULL;
        }
    }
    return o;
}

/* The rows of res as a new JSON array of s_row_json objects. NULL when
 * out of memory. */
static json_t *s_rows_json(const PGresult *res, const char *const *ints)
{
    json_t *array = json_array();
    for (int r = 0; array && r < PQntuples(res); r++) {
        json_t *o = s_row_json(res, r, ints);
        if (!o || json_array_append_new(array, o)) {
            json_decref(array);
            return NULL;
        }
    }
    return array;
}

/* Print the rows of res as s_print_json would print s_rows_json's array,
 * one row at a time: a list of a revoked partner's whole backlog is not
 * built as one document first, which took several times the memory of
 * the rows. 0, or -1 when out of memory. */
static int s_print_rows_json(const PGresult *res, const char *const *ints)
{
    int rows = PQntuples(res);
    fputs(rows ? "[\n" : "[]\n", stdout);
    for (int r = 0; r < rows; r++) {
        json_t *o = s_row_json(res, r, ints);
        char *text = o ? json_dumps(o, JSON_INDENT(2)) : NULL;
        json_decref(o);
        if (!text) {
            fprintf(stderr, "ketenhubctl: out of memory\n");
            return -1;
        }
        /* Indented one level, as an element of the array. */
        fputs("  ", stdout);
        for (const char *p = text; *p; p++) {
            putchar(*p);
            if (*p == '\n')
                fputs("  ", stdout);
        }
        fputs(r + 1 < rows ? ",\n" : "\n]\n", stdout);
        free(text);
    }
    return 0;
}

/* Print value (stolen) indented; 0, or -1 when out of memory. */
static int s_print_json(json_t *value)
{
    char *text = value ? json_dumps(value, JSON_INDENT(2)) : NULL;
    if (text)
        puts(text);
    else
        fprintf(stderr, "ketenhubctl: out of memory\n");
    free(text);
    json_decref(value);
    return text ? 0 : -1;
}

/* ---- list ------------------------------------------------------------- */

/* Whether partner is registered (revoked or not): 1 yes, 0 no, -1 when
 * the database could not say (err filled). A list or a retry of the
 * dead letters of a partner that does not exist (a typo) is an error,
 * not "none". */
static int s_partner_known(PGconn *conn, const char *partner, kh_error_t *err)
{
    const char *params[] = {partner};
    PGresult *res = PQexecParams(conn, "SELECT 1 FROM partners WHERE id = $1",
                                 1, NULL, params, NULL, NULL, 0);
    int known = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        known = PQntuples(res) > 0;
    else
        kh_db_error(err, conn, res, "cannot read the partners");
    PQclear(res);
    return known;
}

/* $1 a partner or NULL, $2 a time or NULL: the dead deliveries, oldest
 * death first. */
/* clang-format off */
static const char s_list_sql[] =
    "SELECT id AS delivery_id, referral_id, partner_id AS partner,"
    " priority, attempts, dead_reason,"
    " " S_TS("created_at") " AS created_at,"
    " " S_TS("updated_at") " AS updated_at"
    " FROM deliveries WHERE state = 'dead'"
    " AND ($1::text IS NULL OR partner_id = $1)"
    " AND ($2::timestamptz IS NULL OR updated_at >= $2::timestamptz)"
    " ORDER BY updated_at, id";
/* clang-format on */

static int s_cmd_list(int argc, char **argv)
{
    static const struct option options[] = {
        {"partner", required_argument, NULL, 'p'},
        {"since", required_argument, NULL, 's'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *partner = NULL, *since = NULL;
    char since_s[CTL_TIME_SIZE];
    bool as_json = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "p:s:jh", options, &cli)) != -1) {
        switch (c) {
        case 'p':
            partner = optarg;
            break;
        case 's':
            if (ctl_time_arg("deadletters list: --since", optarg, NULL,
                             since_s) != CTL_OK)
                return CTL_USAGE;
            since = since_s;
            break;
        case 'j':
            as_json = true;
            break;
        case 'h':
            s_usage_list(stdout);
            return CTL_OK;
        default:
            s_usage_list(stderr);
            return CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("deadletters list: unexpected argument '%s'",
                               argv[optind]);
    if (partner && !kh_partner_id_valid(partner))
        return ctl_usage_error("deadletters list: --partner must match "
                               "^[a-z][a-z0-9-]{1,31}$");
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    const char *params[] = {partner, since};
    PGresult *res =
        PQexecParams(conn, s_list_sql, 2, NULL, params, NULL, NULL, 0);
    int rc = CTL_OK, known = 1;
    kh_error_t err;
    kh_error_clear(&err);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(&err, conn, res, "cannot list dead deliveries");
        ctl_print_error(&err);
        rc = CTL_FAIL;
    } else if (partner && PQntuples(res) == 0 &&
               (known = s_partner_known(conn, partner, &err)) < 1) {
        if (known < 0)
            ctl_print_error(&err);
        else
            fprintf(stderr, "ketenhubctl: deadletters list: no partner %s\n",
                    partner);
        rc = CTL_FAIL;
    } else if (as_json) {
        static const char *const ints[] = {"attempts", NULL};
        if (s_print_rows_json(res, ints))
            rc = CTL_FAIL;
    } else {
        printf("%-36s %-36s %-20s %-8s %8s %-15s %-24s %s\n", "delivery_id",
               "referral_id", "partner", "priority", "attempts", "dead_reason",
               "created_at", "updated_at");
        for (int r = 0; r < PQntuples(res); r++)
            printf("%-36s %-36s %-20s %-8s %8s %-15s %-24s %s\n",
                   PQgetvalue(res, r, 0), PQgetvalue(res, r, 1),
                   PQgetvalue(res, r, 2), PQgetvalue(res, r, 3),
                   PQgetvalue(res, r, 4), PQgetvalue(res, r, 5),
                   PQgetvalue(res, r, 6), PQgetvalue(res, r, 7));
        printf("(%d dead %s)\n", PQntuples(res),
               PQntuples(res) == 1 ? "delivery" : "deliveries");
    }
    PQclear(res);
    PQfinish(conn);
    return rc;
}

/* ---- show ------------------------------------------------------------- */

/* The delivery's columns that show prints: never payload, only its hash
 * and size. escalation_of names, for an escalation copy, the delivery
 * whose acknowledgement was overdue. */
/* clang-format off */
static const char s_show_sql[] =
    "SELECT id AS delivery_id, referral_id, partner_id AS partner, priority,"
    " state, attempts, dead_reason, escalate_to, escalation_of,"
    " " S_TS("created_at") " AS created_at,"
    " " S_TS("updated_at") " AS updated_at,"
    " " S_TS("sent_at") " AS sent_at,"
    " " S_TS("acked_at") " AS acked_at,"
    /* when it goes out again: not at all, dead or acknowledged */
    " " S_TS("CASE WHEN state IN ('pending', 'delivered')"
             " THEN next_attempt_at END") " AS next_attempt_at,"
    " " S_TS("escalated_at") " AS escalated_at,"
    " rules_version, encode(payload_hash, 'hex') AS payload_sha256,"
    " payload_bytes"
    " FROM deliveries WHERE id = $1::uuid";

/* $1 the delivery: its audit events, oldest first. */
static const char s_events_sql[] =
    "SELECT seq, " S_TS("at") " AS at, actor_kind, actor_id, action,"
    " outcome, reason_code, partner_id AS partner, origin_service"
    " FROM audit_trail WHERE delivery_id = $1::uuid ORDER BY seq";
/* clang-format on */

static int s_cmd_show(int argc, char **argv)
{
    static const struct option options[] = {{"json", no_argument, NULL, 'j'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    bool as_json = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "jh", options, &cli)) != -1) {
        switch (c) {
        case 'j':
            as_json = true;
            break;
        case 'h':
            s_usage_show(stdout);
            return CTL_OK;
        default:
            s_usage_show(stderr);
            return CTL_USAGE;
        }
    }
    if (optind + 1 != argc)
        return ctl_usage_error("deadletters show: give exactly one delivery "
                               "ID");
    const char *id = argv[optind];
    if (!s_uuid_ok(id))
        return ctl_usage_error("deadletters show: ID must be a delivery id "
                               "(UUID)");
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    const char *params[] = {id};
    PGresult *d =
        PQexecParams(conn, s_show_sql, 1, NULL, params, NULL, NULL, 0);
    PGresult *e = NULL;
    kh_error_t err;
    kh_error_clear(&err);
    int rc = CTL_OK;
    if (PQresultStatus(d) != PGRES_TUPLES_OK) {
        kh_db_error(&err, conn, d, "cannot read the delivery");
        rc = CTL_FAIL;
    } else if (PQntuples(d) == 1) {
        /* The events are the trail: reading them is recorded as
         * trail.queried in the same transaction, as `audit query
         * --delivery` records it, so that the trail says who looked. */
        char filter[64];
        snprintf(filter, sizeof filter, "delivery=%s", PQgetvalue(d, 0, 0));
        if (kh_db_exec(conn, "BEGIN", &err) ||
            kh_trail_db_record_access(conn, "trail.queried", "admin", "ok",
                                      NULL, filter, "ketenhubctl", &err))
            rc = CTL_FAIL;
        else {
            e = PQexecParams(conn, s_events_sql, 1, NULL, params, NULL, NULL,
                             0);
            if (PQresultStatus(e) != PGRES_TUPLES_OK) {
                kh_db_error(&err, conn, e, "cannot read the delivery's trail");
                rc = CTL_FAIL;
            } else if (kh_db_exec(conn, "COMMIT", &err))
                rc = CTL_FAIL;
        }
        if (rc != CTL_OK)
            kh_db_rollback_quietly(conn);
    }
    if (rc != CTL_OK)
        ctl_print_error(&err);
    else if (PQntuples(d) == 0) {
        fprintf(stderr, "ketenhubctl: deadletters show: no delivery %s\n", id);
        rc = CTL_FAIL;
    } else if (as_json) {
        static const char *const ints[] = {"attempts", "payload_bytes", "seq",
                                           NULL};
        json_t *rows = s_rows_json(d, ints);
        json_t *o =
            rows ? json_pack("{s:O, s:o}", "delivery", json_array_get(rows, 0),
                             "events", s_rows_json(e, ints))
                 : NULL;
        json_decref(rows);
        if (s_print_json(o))
            rc = CTL_FAIL;
    } else {
        for (int col = 0; col < PQnfields(d); col++) {
            const char *name = PQfname(d, col);
            const char *v =
                PQgetisnull(d, 0, col) ? "-" : PQgetvalue(d, 0, col);
            if (strcmp(name, "payload_bytes") == 0 && PQgetisnull(d, 0, col))
                v = "purged";
            printf("%-16s %s\n", name, v);
        }
        printf("\naudit events (%d):\n", PQntuples(e));
        printf("%8s %-24s %-8s %-20s %-20s %-8s %-16s %s\n", "seq", "at",
               "actor", "actor_id", "action", "outcome", "reason", "origin");
        for (int r = 0; r < PQntuples(e); r++)
            printf("%8s %-24s %-8s %-20s %-20s %-8s %-16s %s\n",
                   PQgetvalue(e, r, 0), PQgetvalue(e, r, 1),
                   PQgetvalue(e, r, 2), PQgetvalue(e, r, 3),
                   PQgetvalue(e, r, 4), PQgetvalue(e, r, 5),
                   PQgetisnull(e, r, 6) ? "-" : PQgetvalue(e, r, 6),
                   PQgetvalue(e, r, 8));
    }
    PQclear(e);
    PQclear(d);
    PQfinish(conn);
    return rc;
}

/* ---- retry ------------------------------------------------------------ */

/* One statement does the whole retry: it locks the wanted deliveries,
 * changes them only when every one of them is dead with its payload still
 * there and its partner not revoked (the notification service sends a
 * revoked partner nothing: its next sweep would make them dead letters
 * again), writes one delivery.retried event per changed delivery, and
 * returns per wanted id its state, whether its payload is purged, whether
 * it was retried, its partner and whether that partner is revoked. It
 * locks them in the order of their ids, as the notification service's ACK
 * batches lock theirs (a dead letter the partner did take is acknowledged
 * after all): in the order it found them, a retry waiting for a batch
 * could hold what the batch waited for, and one of them failed
 * (deadlock). The first %s is the set of wanted ids: an array parameter
 * or one partner's dead deliveries; the second the gate: for ids, all of
 * them retriable; for a partner, that it is not revoked (one of its
 * dead letters that changed while the statement waited for its lock, an
 * ACK that came after all, is left as it is now). $2 and $3 are the
 * service and the command's origin (USER@HOST); the actor is admin and
 * the login (the defaults, 025). */
static const char s_retry_sql[] =
    "WITH want AS (%s),"
    " cur AS (SELECT d.id, d.state, d.payload_bytes IS NULL AS purged,"
    "  d.partner_id, p.revoked_at IS NOT NULL AS revoked"
    "  FROM deliveries d JOIN want USING (id)"
    "  JOIN partners p ON p.id = d.partner_id ORDER BY d.id FOR UPDATE OF d),"
    " gate AS (SELECT %s AS ok),"
    " upd AS (UPDATE deliveries d SET state = 'pending', attempts = 0,"
    "  next_attempt_at = now(), age_from = now(), dead_reason = NULL,"
    "  updated_at = now()"
    "  FROM gate WHERE gate.ok AND d.state = 'dead'"
    "  AND d.id IN (SELECT id FROM cur WHERE NOT purged)"
    "  RETURNING d.id, d.referral_id, d.partner_id, d.payload_hash,"
    "  d.rules_version),"
    " ins AS (INSERT INTO audit_events (action,"
    "  referral_id, delivery_id, partner_id, outcome, payload_hash,"
    "  rules_version, origin_service, origin_peer)"
    "  SELECT 'delivery.retried', referral_id, id, partner_id,"
    "  'ok', payload_hash, rules_version, $2, $3 FROM upd)"
    /* Retried: changed, with its event (ins runs whether read or not; it
     * returns nothing, as ketenhub_admin may not read the trail). */
    " SELECT w.id, c.state, coalesce(c.purged, false),"
    "  (u.id IS NOT NULL), c.partner_id, coalesce(c.revoked, false)"
    " FROM want w LEFT JOIN cur c USING (id)"
    " LEFT JOIN upd u ON u.id = w.id ORDER BY w.id";

/* COMMIT the retry on conn: CTL_OK when it went through, also when only
 * a new connection could tell (the connection was lost with the answer:
 * said on stderr), else CTL_FAIL with err, *said true when why was said on
 * stderr here already (whether it went through cannot be told). */
static int s_retry_commit(PGconn *conn, kh_error_t *err, bool *said)
{
    *said = false;
    bool lost;
    int outcome = ctl_commit_xact(conn, &lost, err);
    if (outcome == 1 && !lost)
        return CTL_OK;
    if (outcome == 0)
        return CTL_FAIL;
    ctl_print_error(err);
    *said = true;
    if (outcome < 0) {
        fputs("ketenhubctl: deadletters retry: the connection was lost with "
              "the answer to the commit, and whether it went through cannot "
              "be read now; see `ketenhubctl deadletters show ID` once the "
              "database answers\n",
              stderr);
        return CTL_FAIL;
    }
    fputs("ketenhubctl: deadletters retry: the commit went through after all "
          "(its answer was lost with the connection)\n",
          stderr);
    return CTL_OK;
}

/* Retry the deliveries: ids ("{a,b}", a uuid[] literal) or, when partner
 * is not NULL, every dead delivery of partner. Prints what happened. */
static int s_retry(const char *ids, const char *partner)
{
    char sql[sizeof s_retry_sql + 256];
    if (partner)
        snprintf(sql, sizeof sql, s_retry_sql,
                 "SELECT id FROM deliveries WHERE partner_id = $1"
                 " AND state = 'dead' AND payload_bytes IS NOT NULL",
                 "NOT EXISTS (SELECT FROM cur WHERE revoked)");
    else
        snprintf(sql, sizeof sql, s_retry_sql,
                 "SELECT DISTINCT unnest($1::uuid[]) AS id",
                 "(SELECT count(*) FROM want) = (SELECT count(*) FROM cur"
                 " WHERE state = 'dead' AND NOT purged AND NOT revoked)");
    kh_audit_origin_t origin = kh_audit_origin();
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    const char *params[] = {partner ? partner : ids, "ketenhubctl",
                            origin.peer};
    int rc = kh_db_exec(conn, "BEGIN", &err) ? CTL_FAIL : CTL_OK;
    PGresult *res =
        rc == CTL_OK ? PQexecParams(conn, sql, 3, NULL, params, NULL, NULL, 0)
                     : NULL;
    int n = 0, retried = 0, revoked = 0, known = 1;
    bool said = false;
    if (rc == CTL_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(&err, conn, res, "cannot retry");
        rc = CTL_FAIL;
    } else if (rc == CTL_OK) {
        n = PQntuples(res);
        for (int r = 0; r < n; r++) {
            retried += strcmp(PQgetvalue(res, r, 3), "t") == 0;
            revoked += strcmp(PQgetvalue(res, r, 5), "t") == 0;
        }
    }
    /* Named ids: all or nothing, commit only when every one changed. A
     * partner's: those that are still dead letters, unless it is
     * revoked. */
    if (rc == CTL_OK && retried != n && (!partner || revoked))
        rc = CTL_FAIL;
    else if (rc == CTL_OK && retried > 0)
        rc = s_retry_commit(conn, &err, &said);
    if (rc != CTL_OK || retried == 0)
        kh_db_rollback_quietly(conn);
    if (rc != CTL_OK && said)
        ; /* s_retry_commit said why */
    else if (rc != CTL_OK && err.code != KH_E_OK)
        ctl_print_error(&err);
    else if (rc != CTL_OK) {
        for (int r = 0; r < n; r++) {
            const char *id = PQgetvalue(res, r, 0);
            if (PQgetisnull(res, r, 1))
                fprintf(stderr,
                        "ketenhubctl: deadletters retry: no delivery "
                        "%s\n",
                        id);
            else if (strcmp(PQgetvalue(res, r, 1), "dead") != 0)
                fprintf(stderr,
                        "ketenhubctl: deadletters retry: delivery %s is %s, "
                        "not dead\n",
                        id, PQgetvalue(res, r, 1));
            else if (strcmp(PQgetvalue(res, r, 2), "t") == 0)
                fprintf(stderr,
                        "ketenhubctl: deadletters retry: the payload of "
                        "delivery %s was purged; it cannot be sent again\n",
                        id);
            else if (strcmp(PQgetvalue(res, r, 5), "t") == 0)
                fprintf(stderr,
                        "ketenhubctl: deadletters retry: the partner %s of "
                        "delivery %s is revoked; it is sent nothing\n",
                        PQgetvalue(res, r, 4), id);
        }
        fprintf(stderr, "ketenhubctl: deadletters retry: nothing was "
                        "retried\n");
    } else if (n == 0 && partner &&
               (known = s_partner_known(conn, partner, &err)) < 1) {
        if (known < 0)
            ctl_print_error(&err);
        else
            fprintf(stderr, "ketenhubctl: deadletters retry: no partner %s\n",
                    partner);
        rc = CTL_FAIL;
    } else {
        for (int r = 0; r < n; r++)
            if (strcmp(PQgetvalue(res, r, 3), "t") == 0)
                printf("delivery %s: pending again, attempts reset\n",
                       PQgetvalue(res, r, 0));
            else
                printf("delivery %s: %s now, left as it is (it changed "
                       "while the retry waited for it)\n",
                       PQgetvalue(res, r, 0),
                       strcmp(PQgetvalue(res, r, 2), "t") == 0
                           ? "purged"
                           : PQgetvalue(res, r, 1));
        if (retried == 0)
            printf("no dead deliveries for partner %s\n", partner);
        else
            printf("%d %s retried\n", retried,
                   retried == 1 ? "delivery" : "deliveries");
    }
    PQclear(res);
    PQfinish(conn);
    return rc;
}

static int s_cmd_retry(int argc, char **argv)
{
    static const struct option options[] = {
        {"partner", required_argument, NULL, 'p'},
        {"all", no_argument, NULL, 'a'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *partner = NULL;
    bool all = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "p:ah", options, &cli)) != -1) {
        switch (c) {
        case 'p':
            partner = optarg;
            break;
        case 'a':
            all = true;
            break;
        case 'h':
            s_usage_retry(stdout);
            return CTL_OK;
        default:
            s_usage_retry(stderr);
            return CTL_USAGE;
        }
    }
    if (all || partner) {
        if (!all || !partner)
            return ctl_usage_error("deadletters retry: --all needs --partner "
                                   "P (and --partner needs --all)");
        if (optind != argc)
            return ctl_usage_error("deadletters retry: give IDs or --partner "
                                   "P --all, not both");
        if (!kh_partner_id_valid(partner))
            return ctl_usage_error("deadletters retry: --partner must match "
                                   "^[a-z][a-z0-9-]{1,31}$");
        return s_retry(NULL, partner);
    }
    if (optind == argc)
        return ctl_usage_error("deadletters retry: give delivery IDs or "
                               "--partner P --all");
    if (argc - optind > 10000)
        return ctl_usage_error("deadletters retry: at most 10000 IDs at once");
    size_t size = (size_t) (argc - optind) * 37 + 3;
    char *ids = malloc(size);
    if (!ids) {
        fprintf(stderr, "ketenhubctl: out of memory\n");
        return CTL_FAIL;
    }
    size_t used = 0;
    ids[used++] = '{';
    for (int i = optind; i < argc; i++) {
        if (!s_uuid_ok(argv[i])) {
            free(ids);
            return ctl_usage_error("deadletters retry: '%s' is not a "
                                   "delivery id (UUID)",
                                   argv[i]);
        }
        if (i > optind)
            ids[used++] = ',';
        memcpy(ids + used, argv[i], 36);
        used += 36;
    }
    ids[used++] = '}';
    ids[used] = '\0';
    int rc = s_retry(ids, NULL);
    free(ids);
    return rc;
}

int ctl_deadletters(int argc, char **argv)
{
    static const ctl_sub_t subs[] = {{"list", s_cmd_list},
                                     {"show", s_cmd_show},
                                     {"retry", s_cmd_retry},
                                     {NULL, NULL}};
    return ctl_dispatch("deadletters", argc, argv, subs, s_usage);
}
