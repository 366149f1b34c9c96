/*
 * ketenhubctl audit report: what the trail says about a period, in figures
 * an auditor or the chain's coordinator reads: referrals accepted, refused
 * and routed (by submitting partner and by rule), deliveries per partner
 * (sent, sent again, acknowledged, refused, dead, escalated, escalations
 * received, and how long each partner took to acknowledge), refusals and
 * failures by reason, and who administered the hub or looked at the trail.
 * Counted from the trail alone (the audit_trail view the auditors' role reads),
 * so the figures are what the sealed record shows, not what the queues hold
 * now. Like every read of the trail, the report is itself recorded in it
 * (trail.queried, filter "report since=... until=...").
 */
#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ketenhub/db.h"
#include "ketenhub/trail_db.h"

/* The period: $1 from (or NULL: the trail's start), $2 until (excluded;
 * NULL: now). */
#define S_PERIOD                                                               \
    " at >= coalesce($1::timestamptz, '-infinity')"                            \
    " AND at < coalesce($2::timestamptz, 'infinity')"

/* One section of the report: its name in the JSON document, its title in
 * the table (NULL: totals, one row, which s_print_table words itself),
 * its query over the period, and its columns' names and kinds ('s' text,
 * 'i' integer, 'f' a number of seconds). */
typedef struct {
    const char *name, *title, *sql;
    const char *columns[12];
    const char *kinds;
} s_section_t;

/* clang-format off */
static const s_section_t s_sections[] = {
    {"events", NULL,
     "SELECT count(*), min(seq), max(seq) FROM audit_trail WHERE" S_PERIOD,
     {"events", "first_seq", "last_seq"}, "iii"},
    {"referrals", NULL,
     "SELECT"
     " count(*) FILTER (WHERE action = 'referral.accepted' AND outcome = 'ok'),"
     " count(*) FILTER (WHERE action = 'referral.rejected'),"
     " count(*) FILTER (WHERE action = 'referral.routed' AND outcome = 'ok'),"
     " count(*) FILTER (WHERE action = 'referral.routed' AND outcome = 'ok'"
     "  AND reason_code = 'no_rule_matched'),"
     " count(*) FILTER (WHERE action = 'referral.routed' AND outcome = 'ok'"
     "  AND reason_code = 'no_registered_target'),"
     " count(*) FILTER (WHERE action = 'referral.routed' AND outcome <> 'ok'),"
     " count(*) FILTER (WHERE action = 'referral.purged' AND outcome = 'ok')"
     " FROM audit_trail WHERE action IN ('referral.accepted',"
     " 'referral.rejected', 'referral.routed', 'referral.purged') AND" S_PERIOD,
     {"accepted", "rejected", "routed", "routed_no_rule_matched",
      "routed_no_registered_target", "unroutable", "purged"},
     "iiiiiii"},
    {"accepted_by_partner", "ACCEPTED BY SUBMITTING PARTNER",
     "SELECT actor_id, count(*) FROM audit_trail"
     " WHERE action = 'referral.accepted' AND outcome = 'ok' AND" S_PERIOD
     " GROUP BY actor_id ORDER BY count(*) DESC, actor_id",
     {"partner", "accepted"}, "si"},
    /* A list too long for the trail ends in "+N", the number of rules
     * left out (routing.c): no rule's name, and not counted as one. */
    {"rules_matched", "RULES MATCHED",
     "SELECT rule, count(*) FROM audit_trail,"
     " unnest(string_to_array(rules_matched, ',')) AS rule"
     " WHERE action = 'referral.routed' AND outcome = 'ok'"
     " AND rule NOT LIKE '+%' AND" S_PERIOD
     " GROUP BY rule ORDER BY count(*) DESC, rule",
     {"rule", "referrals"}, "si"},
    /* A delivery counts as sent in the period when its first send is in
     * it, looked for in the whole trail (first.new): one sent before the
     * period and again in it was sent again, and its wait is not from the
     * send in the period. Time to acknowledge: from a delivery's first
     * send to its ACK, for the deliveries both sent and acknowledged in
     * the period. A send that never left (delivery.unsent, of the same
     * delivery) is no send: a delivery none of whose sends left is not
     * sent, and not sent again. */
    {"deliveries",
     "DELIVERIES BY PARTNER (ack_*: seconds from first send to ACK)",
     "WITH e AS (SELECT action, outcome, reason_code, partner_id,"
     "  delivery_id, at"
     "  FROM audit_trail WHERE partner_id IS NOT NULL"
     "  AND action IN ('delivery.created', 'delivery.sent',"
     "   'delivery.unsent', 'delivery.acked', 'delivery.nacked',"
     "   'delivery.dead', 'delivery.escalated')"
     "  AND" S_PERIOD "),"
     " first AS (SELECT d.delivery_id, s.at,"
     "  s.at >= coalesce($1::timestamptz, '-infinity') AS new"
     "  FROM (SELECT DISTINCT delivery_id FROM e WHERE outcome = 'ok'"
     "   AND action IN ('delivery.sent', 'delivery.acked')) d"
     "  CROSS JOIN LATERAL (SELECT min(t.at) AS at FROM audit_trail t"
     "   WHERE t.delivery_id = d.delivery_id AND t.action = 'delivery.sent'"
     "   AND t.outcome = 'ok') s),"
     " waits AS (SELECT a.partner_id,"
     "  extract(epoch FROM a.at - f.at)::float8 AS wait"
     "  FROM (SELECT partner_id, delivery_id, min(at) AS at FROM e"
     "   WHERE action = 'delivery.acked' AND outcome = 'ok'"
     "   GROUP BY partner_id, delivery_id) a"
     "  JOIN first f USING (delivery_id) WHERE f.new),"
     /* per delivery, its sends in the period that left the hub */
     " left_hub AS (SELECT partner_id, delivery_id, coalesce(f.new, false)"
     "  AS new, count(*) FILTER (WHERE action = 'delivery.sent')"
     "  - count(*) FILTER (WHERE action = 'delivery.unsent') AS n"
     "  FROM e LEFT JOIN first f USING (delivery_id) WHERE outcome = 'ok'"
     "  AND action IN ('delivery.sent', 'delivery.unsent')"
     "  GROUP BY partner_id, delivery_id, f.new),"
     " sends AS (SELECT partner_id, count(*) FILTER (WHERE new AND n > 0)"
     "  AS sent, sum(greatest(n - CASE WHEN new THEN 1 ELSE 0 END, 0))::bigint"
     "  AS sent_again FROM left_hub GROUP BY partner_id),"
     " counts AS (SELECT partner_id,"
     "  count(*) FILTER (WHERE action = 'delivery.acked' AND outcome = 'ok')"
     "   AS acked,"
     "  count(*) FILTER (WHERE action = 'delivery.nacked' AND outcome = 'ok')"
     "   AS nacked,"
     "  count(*) FILTER (WHERE action = 'delivery.dead' AND outcome = 'ok')"
     "   AS dead,"
     "  count(*) FILTER (WHERE action = 'delivery.escalated'"
     "   AND outcome = 'ok' AND reason_code = 'ack_overdue') AS escalated,"
     "  count(*) FILTER (WHERE outcome = 'ok' AND ((action ="
     "   'delivery.created' AND reason_code = 'escalation') OR (action ="
     "   'delivery.escalated' AND reason_code = 'raised_to_urgent')))"
     "   AS escalations_received"
     "  FROM e LEFT JOIN first f USING (delivery_id) GROUP BY partner_id)"
     " SELECT c.partner_id, coalesce(s.sent, 0), coalesce(s.sent_again, 0),"
     "  acked, nacked, dead, escalated, escalations_received, w.p50, w.p90,"
     "  w.max"
     " FROM counts c LEFT JOIN sends s USING (partner_id)"
     " LEFT JOIN (SELECT partner_id,"
     "  percentile_cont(0.5) WITHIN GROUP (ORDER BY wait) AS p50,"
     "  percentile_cont(0.9) WITHIN GROUP (ORDER BY wait) AS p90,"
     "  max(wait) AS max FROM waits GROUP BY partner_id) w USING (partner_id)"
     " ORDER BY c.partner_id",
     {"partner", "sent", "sent_again", "acked", "nacked", "dead", "escalated",
      "escalations_received", "ack_p50_s", "ack_p90_s", "ack_max_s"},
     "siiiiiiifff"},
    {"refusals", "REFUSALS AND FAILURES",
     "SELECT outcome, action, coalesce(reason_code, ''), count(*)"
     " FROM audit_trail WHERE outcome <> 'ok' AND" S_PERIOD
     " GROUP BY outcome, action, reason_code"
     " ORDER BY count(*) DESC, outcome, action, reason_code",
     {"outcome", "action", "reason", "events"}, "sssi"},
    /* Who changed the hub's partners, rules or dead letters, purged, or
     * looked at the trail (the services' own rule reloads included, by
     * reason: a reload asked for has none, partners_changed is routing's
     * own when the registry changed the partners it routes with, and a
     * refusal names its error). */
    {"administration", "ADMINISTRATION AND READS OF THE TRAIL",
     "SELECT action, coalesce(reason_code, ''),"
     "  actor_kind || ':' || actor_id, count(*)"
     " FROM audit_trail WHERE (actor_kind IN ('admin', 'auditor')"
     "  OR action IN ('rules.reloaded', 'rules.reload_failed')) AND" S_PERIOD
     " GROUP BY action, reason_code, actor_kind, actor_id"
     " ORDER BY action, reason_code NULLS FIRST, count(*) DESC, actor_kind,"
     "  actor_id",
     {"action", "reason", "actor", "events"}, "sssi"},
};
/* clang-format on */

#define S_SECTIONS (sizeof s_sections / sizeof s_sections[0])

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl audit report [--since TIME] [--until TIME]\n"
            "                 [--format table|json]\n"
            "\n"
            "Figures of the trail for the period (the whole trail by "
            "default;\n"
            "--until excluded): referrals accepted, rejected and routed, by\n"
            "submitting partner and by rule; deliveries per partner (sent, "
            "sent\n"
            "again, acknowledged, refused, dead, escalated, escalations\n"
            "received, seconds from first send to ACK); refusals and "
            "failures\n"
            "by reason; who administered the hub or read the trail. TIME as\n"
            "for audit query. The report is recorded in the trail\n"
            "(trail.queried).\n");
}

/* Row r of res as a JSON object of section's columns. */
static json_t *s_row(const s_section_t *section, const PGresult *res, int r)
{
    json_t *row = json_object();
    for (int c = 0; section->kinds[c]; c++) {
        json_t *v;
        const char *text = PQgetvalue(res, r, c);
        if (PQgetisnull(res, r, c))
            v = json_null();
        else if (section->kinds[c] == 'i')
            v = json_integer(strtoll(text, NULL, 10));
        else if (section->kinds[c] == 'f')
            v = json_real(strtod(text, NULL));
        else
            v = json_string(text);
        json_object_set_new(row, section->columns[c], v);
    }
    return row;
}

/* The sections' figures for the period, into doc (one object for a
 * one-row section, else an array of rows). 0, or -1 with err. */
static int s_read(PGconn *conn, const char *const params[2], json_t *doc,
                  kh_error_t *err)
{
    for (size_t k = 0; k < S_SECTIONS; k++) {
        const s_section_t *section = &s_sections[k];
        PGresult *res =
            PQexecParams(conn, section->sql, 2, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            int rc = kh_db_error(err, conn, res, "cannot read the trail");
            PQclear(res);
            return rc;
        }
        if (PQnfields(res) != (int) strlen(section->kinds)) {
            PQclear(res);
            return kh_error_set(err, KH_E_INTERNAL, section->name,
                                "the section's query gives other columns "
                                "than the report reads");
        }
        json_t *value;
        if (!section->title) /* one row of totals */
            value = s_row(section, res, 0);
        else {
            value = json_array();
            for (int r = 0; r < PQntuples(res); r++)
                json_array_append_new(value, s_row(section, res, r));
        }
        json_object_set_new(doc, section->name, value);
        PQclear(res);
    }
    return 0;
}

/* A value of a row as the table prints it ("-" for none). */
static void s_cell(const json_t *v, char *buf, size_t size)
{
    if (json_is_integer(v))
        snprintf(buf, size, "%lld", (long long) json_integer_value(v));
    else if (json_is_real(v))
        snprintf(buf, size, "%.3f", json_real_value(v));
    else if (json_is_string(v))
        snprintf(buf, size, "%s", json_string_value(v));
    else
        snprintf(buf, size, "-");
}

/* A section's rows as a table under its title, each column as wide as
 * its widest cell, text to the left and figures to the right; "(none)"
 * when empty. */
static void s_table(const s_section_t *section, const json_t *rows)
{
    printf("\n%s\n", section->title);
    if (json_array_size(rows) == 0) {
        printf("  (none)\n");
        return;
    }
    int width[12] = {0};
    size_t i;
    const json_t *row;
    char cell[128];
    for (int c = 0; section->kinds[c]; c++) {
        width[c] = (int) strlen(section->columns[c]);
        json_array_foreach(rows, i, row)
        {
            s_cell(json_object_get(row, section->columns[c]), cell,
                   sizeof cell);
            if ((int) strlen(cell) > width[c])
                width[c] = (int) strlen(cell);
        }
    }
    for (size_t r = 0; r <= json_array_size(rows); r++) {
        row = r ? json_array_get(rows, r - 1) : NULL;
        printf(" ");
        for (int c = 0; section->kinds[c]; c++) {
            if (row)
                s_cell(json_object_get(row, section->columns[c]), cell,
                       sizeof cell);
            else
                snprintf(cell, sizeof cell, "%s", section->columns[c]);
            bool left = section->kinds[c] == 's';
            printf(" %*s", left ? -width[c] : width[c], cell);
        }
        printf("\n");
    }
}

static long long s_int(const json_t *object, const char *key)
{
    return (long long) json_integer_value(json_object_get(object, key));
}

static void s_print_table(const json_t *doc)
{
    const json_t *events = json_object_get(doc, "events");
    const json_t *refs = json_object_get(doc, "referrals");
    printf("trail report from %s until %s: %lld events",
           json_string_value(json_object_get(doc, "since")),
           json_string_value(json_object_get(doc, "until")),
           s_int(events, "events"));
    if (s_int(events, "events") > 0)
        printf(" (seq %lld..%lld)", s_int(events, "first_seq"),
               s_int(events, "last_seq"));
    printf("\n\nREFERRALS\n");
    printf("  accepted %lld, rejected %lld, routed %lld (no rule matched "
           "%lld, no registered target %lld), unroutable %lld, purged "
           "%lld\n",
           s_int(refs, "accepted"), s_int(refs, "rejected"),
           s_int(refs, "routed"), s_int(refs, "routed_no_rule_matched"),
           s_int(refs, "routed_no_registered_target"),
           s_int(refs, "unroutable"), s_int(refs, "purged"));
    for (size_t k = 0; k < S_SECTIONS; k++)
        if (s_sections[k].title)
            s_table(&s_sections[k], json_object_get(doc, s_sections[k].name));
}

int ctl_audit_report(int argc, char **argv)
{
    static const struct option options[] = {
        {"since", required_argument, NULL, 's'},
        {"until", required_argument, NULL, 'u'},
        {"format", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    char since[CTL_TIME_SIZE] = "", until[CTL_TIME_SIZE] = "";
    int64_t since_us = 0, until_us = 0;
    bool json = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "s:u:f:h", options, &cli)) != -1) {
        switch (c) {
        case 's':
        case 'u': {
            char *text = c == 's' ? since : until;
            const char *option =
                c == 's' ? "audit report: --since" : "audit report: --until";
            if (ctl_time_arg(option, optarg, c == 's' ? &since_us : &until_us,
                             text) != CTL_OK)
                return CTL_USAGE;
            break;
        }
        case 'f':
            if (strcmp(optarg, "json") != 0 && strcmp(optarg, "table") != 0)
                return ctl_usage_error("audit report: --format is table or "
                                       "json");
            json = strcmp(optarg, "json") == 0;
            break;
        default:
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("audit report: unexpected argument '%s'",
                               argv[optind]);
    if (*since && *until && until_us <= since_us)
        return ctl_usage_error("audit report: --until %s is not later than "
                               "--since %s",
                               until, since);

    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    const char *params[2] = {*since ? since : NULL, *until ? until : NULL};
    char filter[128];
    snprintf(filter, sizeof filter, "report since=%s until=%s",
             *since ? since : "start", *until ? until : "now");
    json_t *doc = json_object();
    json_object_set_new(doc, "since", json_string(*since ? since : "start"));
    json_object_set_new(doc, "until", json_string(*until ? until : "now"));
    kh_error_t err;
    kh_error_clear(&err);
    /* One snapshot for every section, so that their figures agree; the
     * read is recorded in the same transaction, after it. */
    int rc = kh_db_exec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ", &err);
    if (rc == 0)
        rc = s_read(conn, params, doc, &err);
    if (rc == 0)
        rc = kh_trail_db_record_access(conn, "trail.queried", "auditor", "ok",
                                       NULL, filter, "ketenhubctl", &err);
    if (rc == 0)
        rc = kh_db_exec(conn, "COMMIT", &err);
    if (rc != 0) {
        kh_db_rollback_quietly(conn);
        ctl_print_error(&err);
    } else if (json) {
        char *text = json_dumps(doc, JSON_INDENT(2) | JSON_ENSURE_ASCII);
        if (text)
            puts(text);
        else {
            fprintf(stderr, "ketenhubctl: audit report: out of memory\n");
            rc = -1;
        }
        free(text);
    } else
        s_print_table(doc);
    json_decref(doc);
    PQfinish(conn);
    return rc == 0 ? CTL_OK : CTL_FAIL;
}
