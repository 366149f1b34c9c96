/*
 * ketenhubctl status: one screen for an administrator. Each service's
 * /readyz (up, not ready and why, or down) with its version, and the hub
 * keys (current and next) intake and notification say they serve; from
 * PostgreSQL the rules version in force, the trail head and the last
 * signed checkpoint, dead letters, open escalations, and per partner the
 * backlog of unacknowledged deliveries and the oldest of them.
 *
 * Everything is gathered into one JSON document first; --json prints it,
 * otherwise it is laid out as text. Nothing here reads a payload. Exit
 * status 0 when every service checked is ready and the database answers,
 * 1 when something is down, 2 for usage.
 */
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "ketenhub/health.h"

#define S_PROBE_MS 2000

#define S_TS(col)                                                              \
    "to_char(" col " AT TIME ZONE 'UTC', "                                     \
    "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"

/* Each partner's open deliveries (named as their index names them,
 * migrations/006: a status never reads the acknowledged history): how many,
 * the oldest and its age in seconds; and whether the partner is revoked. */
/* clang-format off */
static const char s_backlog_sql[] =
    "SELECT p.id, count(d.id), " S_TS("min(d.created_at)") ","
    " extract(epoch FROM now() - min(d.created_at))::bigint,"
    " p.revoked_at IS NOT NULL"
    " FROM partners p LEFT JOIN deliveries d ON d.partner_id = p.id"
    " AND d.acked_at IS NULL AND d.dead_reason IS NULL"
    " GROUP BY p.id, p.revoked_at ORDER BY p.id";

/* Dead letters and open escalations, as their indexes name them
 * (migrations/003, 006); the referrals accepted and not yet routed, with
 * the oldest one's time and age, from the index routing claims them by,
 * and how many of them routing holds back (their writes failed, 027). */
static const char s_counts_sql[] =
    "SELECT (SELECT count(*) FROM deliveries WHERE state = 'dead'),"
    " (SELECT count(*) FROM deliveries"
    "  WHERE escalated_at IS NOT NULL AND acked_at IS NULL"
    "  AND dead_reason IS NULL),"
    " u.n, " S_TS("u.oldest") ","
    " extract(epoch FROM now() - u.oldest)::bigint, u.held"
    " FROM (SELECT count(*) AS n, min(accepted_at) AS oldest,"
    "  count(*) FILTER (WHERE held_until > now()) AS held"
    "  FROM referrals WHERE state = 'accepted') u";
/* clang-format on */

typedef struct {
    const char *name;     /* service */
    const char *env;      /* variable with its health endpoint */
    const char *defval;   /* default endpoint */
    const char *endpoint; /* in force */
    const char *from;     /* where it came from: option or variable */
} s_service_t;

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl status [--intake H:P] [--routing H:P]\n"
            "                          [--notification H:P] [--audit H:P] "
            "[--json]\n"
            "\n"
            "One screen: each service up or down (its /readyz) with its "
            "version;\n"
            "the hub keys served (current and next, by intake and "
            "notification);\n"
            "rules version, trail head and last checkpoint, dead letters, "
            "open\n"
            "escalations, referrals not yet routed, and per partner the "
            "backlog of\n"
            "unacknowledged deliveries with the oldest one's time.\n"
            "\n"
            "  --intake H:P        intake's KH_HEALTH_ENDPOINT (default "
            "$KH_INTAKE_HEALTH,\n"
            "                      else 127.0.0.1:9701); \"none\" skips it\n"
            "  --routing H:P       likewise ($KH_ROUTING_HEALTH, 9702)\n"
            "  --notification H:P  likewise ($KH_NOTIFY_HEALTH, 9703)\n"
            "  --audit H:P         likewise ($KH_AUDIT_HEALTH, 9704)\n"
            "  --json              one JSON document, for scripts\n"
            "\n"
            "exit status: 0 all up, 1 something down, the database "
            "unreachable or the\n"
            "trail's seals broken, 2 usage\n");
}

/* "http://h:p/" -> "h:p" in buf. */
static const char *s_hostport(const char *endpoint, char *buf, size_t size)
{
    if (strncmp(endpoint, "http://", 7) == 0)
        endpoint += 7;
    snprintf(buf, size, "%s", endpoint);
    size_t len = strlen(buf);
    while (len > 0 && buf[len - 1] == '/')
        buf[--len] = '\0';
    return buf;
}

/* Whether endpoint is one that s_hostport and kh_http_get can use:
 * "none", or [http://]HOST:PORT[/] with a port of 1 to 65535 (HOST may be
 * empty or "*": this machine). A word that is none of these ("intake",
 * a port alone) is a usage error, not a service that is down. */
static bool s_endpoint_valid(const char *endpoint)
{
    if (strcmp(endpoint, "none") == 0)
        return true;
    /* Printable ASCII, as a HOST:PORT is: the report holds it as JSON
     * text (which a byte that is no UTF-8 cannot be). */
    for (const char *p = endpoint; *p; p++)
        if (*p < 0x21 || *p > 0x7e)
            return false;
    char buf[256];
    const char *hp = s_hostport(endpoint, buf, sizeof buf);
    const char *colon = strrchr(hp, ':');
    if (!colon || strlen(endpoint) >= sizeof buf)
        return false;
    const char *port = colon + 1;
    size_t digits = strspn(port, "0123456789");
    if (digits == 0 || digits > 5 || port[digits] != '\0')
        return false;
    long n = strtol(port, NULL, 10);
    return n >= 1 && n <= 65535;
}

/* The value a /readyz body tells after " name=" (kh_health_note) into
 * out under key; nothing when it tells none. */
static void s_told(const char *body, const char *name, json_t *out,
                   const char *key)
{
    char word[24];
    snprintf(word, sizeof word, " %s=", name);
    const char *at = strstr(body, word);
    if (!at)
        return;
    at += strlen(word);
    size_t len = strcspn(at, " \t\r\n");
    if (len > 0 && len <= KH_HEALTH_NOTE_MAX)
        json_object_set_new(out, key, json_stringn(at, len));
}

/* {"name", "endpoint", "state": up|not_ready|down|skipped, "version",
 * "detail", and what the service tells: "rules_version", "hub_key",
 * "hub_key_next"} for one service. */
static json_t *s_probe(const s_service_t *svc)
{
    json_t *out =
        json_pack("{s:s, s:s}", "name", svc->name, "endpoint", svc->endpoint);
    if (strcmp(svc->endpoint, "none") == 0) {
        json_object_set_new(out, "state", json_string("skipped"));
        return out;
    }
    char hostport[256];
    char *body = NULL;
    kh_error_t err;
    int status =
        kh_http_get(s_hostport(svc->endpoint, hostport, sizeof hostport),
                    "/readyz", S_PROBE_MS, &body, &err);
    if (status < 0) {
        json_object_set_new(out, "state", json_string("down"));
        json_object_set_new(out, "detail", json_string(err.message));
        return out;
    }
    char *nl = body ? strchr(body, '\n') : NULL;
    if (nl)
        *nl = '\0';
    char service[64] = "", version[64] = "";
    if (status == 200 && body &&
        sscanf(body, "ready %63s %63s", service, version) == 2) {
        json_object_set_new(out, "state", json_string("up"));
        json_object_set_new(out, "version", json_string(version));
        /* routing tells the rules version it routes by; intake and
         * notification the hub keys they serve */
        s_told(body, "rules", out, "rules_version");
        s_told(body, "hub_key", out, "hub_key");
        s_told(body, "hub_key_next", out, "hub_key_next");
        if (strcmp(service, svc->name) != 0)
            json_object_set_new(out, "detail",
                                json_sprintf("answered as %s", service));
    } else {
        json_object_set_new(out, "state", json_string("not_ready"));
        json_object_set_new(out, "detail",
                            body && *body
                                ? json_string(body)
                                : json_sprintf("HTTP status %d", status));
    }
    free(body);
    return out;
}

/* A query of the database part failed: say why under "error" in db, in
 * words an administrator can act on when the schema is not (all) there.
 * That case is said once, in the report; the server's own text (the
 * relation missing, the statement quoted) would only bury it. Any other
 * failure is unexpected, and its text goes to stderr as it came. */
static void s_query_failed(json_t *db, const PGresult *res)
{
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *primary = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    bool unmigrated = ctl_sqlstate_unmigrated(state);
    if (!unmigrated)
        fprintf(stderr, "ketenhubctl: status: %s", PQresultErrorMessage(res));
    json_object_set_new(
        db, "error",
        json_string(unmigrated ? "the schema is not migrated: run ketenhubctl "
                                 "migrate"
                    : primary  ? primary
                               : "a query failed"));
}

/* The first row's values as strings into obj under keys (NULL values are
 * left out). 0, or -1 with "error" set when the query failed. */
static int s_row(PGconn *conn, const char *sql, json_t *obj,
                 const char *const *keys, const bool *numeric)
{
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        s_query_failed(obj, res);
        PQclear(res);
        return -1;
    }
    for (int c = 0; PQntuples(res) > 0 && keys[c]; c++)
        if (!PQgetisnull(res, 0, c))
            json_object_set_new(
                obj, keys[c],
                numeric[c]
                    ? json_integer(strtoll(PQgetvalue(res, 0, c), NULL, 10))
                    : json_string(PQgetvalue(res, 0, c)));
    PQclear(res);
    return 0;
}

/* The rules version in force and since when it was last used: the last
 * rules.reloaded, or the last referral.routed (an action that the
 * index of actions leaves out, migration 013: read from the newest
 * events back) when it is newer. */
#define S_IN_FORCE                                                             \
    "((SELECT rules_version, at FROM audit_trail"                              \
    "  WHERE action = 'rules.reloaded' AND outcome = 'ok'"                     \
    "  ORDER BY at DESC LIMIT 1) UNION ALL"                                    \
    " (SELECT rules_version, at FROM audit_trail"                              \
    "  WHERE action = 'referral.routed'"                                       \
    "  ORDER BY seq DESC LIMIT 1) ORDER BY at DESC LIMIT 1) r"

/* A reload refused since the rules in force were loaded: routing kept
 * them (the failure names the version it kept), and the file on disk is
 * not what routes. Once a reload succeeds, or routing starts with a file
 * that routes by another version, it is no longer news. A change of the
 * partners (rules.reloaded, partners_changed) keeps the same file: the
 * versions are compared by their file part (before the dot, schemas/
 * rules.md), and such a change is no successful reload. */
/* clang-format off */
static const char s_refused_sql[] =
    "SELECT " S_TS("f.at") ", f.reason_code, coalesce(f.reason_path, '')"
    " FROM audit_trail f"
    " WHERE f.action = 'rules.reload_failed'"
    "  AND split_part(f.rules_version, '.', 1) ="
    "   (SELECT split_part(rules_version, '.', 1) FROM " S_IN_FORCE ")"
    "  AND NOT EXISTS (SELECT 1 FROM audit_trail o"
    "   WHERE o.action = 'rules.reloaded' AND o.outcome = 'ok'"
    "    AND o.reason_code IS DISTINCT FROM 'partners_changed'"
    "    AND o.at > f.at)"
    " ORDER BY f.at DESC LIMIT 1";
/* clang-format on */

/* The database part: {"reachable", ...} and the partners' backlog. */
static json_t *s_database(json_t **partners)
{
    json_t *db = json_object();
    *partners = json_array();
    PGconn *conn = ctl_connect();
    if (!conn) {
        json_object_set_new(db, "reachable", json_false());
        return db;
    }
    json_object_set_new(db, "reachable", json_true());
    /* Promises 1 and 3 hold only while a commit is on disk when PostgreSQL
     * says so: with fsync or synchronous_commit off (a benchmark's or a
     * test cluster's setting, or a tuning), a crash of the database loses
     * the last commits: referrals answered ACCEPTED, deliveries a partner
     * already stored (it gets the referral again under a new delivery
     * id). Said here, where an administrator looks; readable by any
     * role. */
    PGresult *dur = PQexec(
        conn,
        "SELECT concat_ws(', ',"
        " CASE WHEN current_setting('fsync') = 'off' THEN 'fsync=off' END,"
        " CASE WHEN current_setting('synchronous_commit') = 'off'"
        "  THEN 'synchronous_commit=off' END,"
        " CASE WHEN current_setting('full_page_writes') = 'off'"
        "  THEN 'full_page_writes=off' END)");
    if (PQresultStatus(dur) == PGRES_TUPLES_OK && PQntuples(dur) == 1 &&
        *PQgetvalue(dur, 0, 0))
        json_object_set_new(db, "not_durable",
                            json_string(PQgetvalue(dur, 0, 0)));
    PQclear(dur);
    static const char *k_rules[] = {"rules_version", "rules_version_at", NULL};
    static const bool n_rules[] = {false, false};
    static const char *k_refused[] = {"rules_reload_refused_at",
                                      "rules_reload_refused_code",
                                      "rules_reload_refused_path", NULL};
    static const bool n_refused[] = {false, false, false};
    static const char *k_trail[] = {"trail_head", "trail_sealed", NULL};
    static const bool n_trail[] = {true, true};
    static const char *k_cp[] = {"checkpoint_seq", "checkpoint_at", NULL};
    static const bool n_cp[] = {true, false};
    static const char *k_counts[] = {"dead_letters",
                                     "escalations_open",
                                     "referrals_unrouted",
                                     "referrals_unrouted_oldest",
                                     "referrals_unrouted_oldest_age_s",
                                     "referrals_held",
                                     NULL};
    static const bool n_counts[] = {true, true, true, false, true, true};
    /* Through the views that ketenhub_admin may read. */
    int rc =
        s_row(conn, "SELECT rules_version, " S_TS("at") " FROM " S_IN_FORCE, db,
              k_rules, n_rules);
    rc = rc ? rc : s_row(conn, s_refused_sql, db, k_refused, n_refused);
    rc = rc ? rc
            : s_row(conn,
                    "SELECT (SELECT coalesce(max(seq), 0) FROM audit_trail),"
                    " (SELECT coalesce(max(seq), 0) FROM audit_trail_seals)",
                    db, k_trail, n_trail);
    rc = rc ? rc
            : s_row(conn,
                    "SELECT seq, " S_TS("at") " FROM audit_trail_checkpoints"
                                              " ORDER BY seq DESC LIMIT 1",
                    db, k_cp, n_cp);
    /* Seals that stop below the last checkpoint were removed: the sealer
     * then seals nothing more (trail_broken), and only verify says where. */
    const json_t *cp = json_object_get(db, "checkpoint_seq");
    if (rc == 0 && cp &&
        json_integer_value(json_object_get(db, "trail_sealed")) <
            json_integer_value(cp))
        json_object_set_new(db, "trail_broken", json_true());
    rc = rc ? rc : s_row(conn, s_counts_sql, db, k_counts, n_counts);
    PGresult *res = rc ? NULL : PQexec(conn, s_backlog_sql);
    if (res && PQresultStatus(res) == PGRES_TUPLES_OK) {
        for (int i = 0; i < PQntuples(res); i++) {
            json_t *row = json_pack(
                "{s:s, s:I, s:b}", "partner", PQgetvalue(res, i, 0), "backlog",
                (json_int_t) strtoll(PQgetvalue(res, i, 1), NULL, 10),
                "revoked", strcmp(PQgetvalue(res, i, 4), "t") == 0);
            if (row && !PQgetisnull(res, i, 2)) {
                json_object_set_new(row, "oldest",
                                    json_string(PQgetvalue(res, i, 2)));
                json_object_set_new(
                    row, "oldest_age_s",
                    json_integer(strtoll(PQgetvalue(res, i, 3), NULL, 10)));
            }
            json_array_append_new(*partners, row);
        }
    } else if (res) {
        s_query_failed(db, res);
        rc = -1;
    }
    PQclear(res);
    PQfinish(conn);
    return db;
}

/* "3d 4h", "2h 5m", "7m 3s", "12s". */
static void s_age(long long s, char *buf, size_t size)
{
    if (s >= 86400)
        snprintf(buf, size, "%lldd %lldh", s / 86400, s % 86400 / 3600);
    else if (s >= 3600)
        snprintf(buf, size, "%lldh %lldm", s / 3600, s % 3600 / 60);
    else if (s >= 60)
        snprintf(buf, size, "%lldm %llds", s / 60, s % 60);
    else
        snprintf(buf, size, "%llds", s);
}

static const char *s_str(const json_t *obj, const char *key, const char *dflt)
{
    const char *value = json_string_value(json_object_get(obj, key));
    return value ? value : dflt;
}

static long long s_int(const json_t *obj, const char *key)
{
    return (long long) json_integer_value(json_object_get(obj, key));
}

/* The hub keys the services serve, as {"current": [{"key", "services":
 * [names]}], "next": [...]}, one entry per key, in the services' order;
 * "differ": true when the services that tell a current key do not tell
 * the same one (partners of one connect with a key the other does not
 * serve). NULL when no service tells a key (none up, or of a release
 * before). */
static json_t *s_hub_keys(const json_t *services)
{
    static const char *const told[] = {"hub_key", "hub_key_next"};
    static const char *const named[] = {"current", "next"};
    json_t *keys = json_object();
    bool any = false;
    for (size_t k = 0; k < 2; k++) {
        json_t *list = json_array();
        size_t i;
        const json_t *svc;
        json_array_foreach(services, i, svc)
        {
            const char *key = s_str(svc, told[k], NULL);
            if (!key)
                continue;
            any = true;
            json_t *entry = NULL;
            size_t j;
            json_t *e;
            json_array_foreach(list, j, e)
            {
                if (strcmp(s_str(e, "key", ""), key) == 0)
                    entry = e;
            }
            if (!entry) {
                entry = json_pack("{s:s, s:[]}", "key", key, "services");
                json_array_append_new(list, entry);
            }
            json_array_append_new(json_object_get(entry, "services"),
                                  json_string(s_str(svc, "name", "")));
        }
        json_object_set_new(keys, named[k], list);
    }
    json_object_set_new(
        keys, "differ",
        json_boolean(json_array_size(json_object_get(keys, "current")) > 1));
    if (!any)
        json_decref(keys);
    return any ? keys : NULL;
}

/* One line per key of list (an array of s_hub_keys): the key and the
 * services that serve it; "none" for none. */
static void s_print_keys(const char *label, const json_t *list)
{
    if (json_array_size(list) == 0)
        printf("%-17s none\n", label);
    size_t i;
    const json_t *entry;
    json_array_foreach(list, i, entry)
    {
        printf("%-17s %s (", i == 0 ? label : "", s_str(entry, "key", ""));
        size_t j;
        const json_t *name;
        json_array_foreach(json_object_get(entry, "services"), j, name)
        {
            printf("%s%s", j ? ", " : "", json_string_value(name));
        }
        printf(")\n");
    }
}

static void s_print_text(const json_t *doc)
{
    printf("services\n");
    size_t i;
    json_t *svc;
    const char *loaded = NULL; /* the rules version routing tells */
    json_array_foreach(json_object_get(doc, "services"), i, svc)
    {
        const char *state = s_str(svc, "state", "down");
        const char *rules = s_str(svc, "rules_version", NULL);
        if (rules && !loaded)
            loaded = rules;
        printf("  %-13s %-9s %-7s %-21s %s%s%s\n", s_str(svc, "name", ""),
               strcmp(state, "not_ready") == 0 ? "NOT READY"
               : strcmp(state, "down") == 0    ? "DOWN"
                                               : state,
               s_str(svc, "version", "-"), s_str(svc, "endpoint", ""),
               s_str(svc, "detail", ""),
               !rules                      ? ""
               : *s_str(svc, "detail", "") ? " rules "
                                           : "rules ",
               rules ? rules : "");
    }
    const json_t *keys = json_object_get(doc, "hub_keys");
    if (keys) {
        s_print_keys("hub key", json_object_get(keys, "current"));
        if (json_is_true(json_object_get(keys, "differ")))
            printf("HUB KEYS DIFFER   partners of one service connect with a "
                   "key the other\n                  does not serve: give "
                   "both the same KH_HUB_CERT\n");
        s_print_keys("next hub key", json_object_get(keys, "next"));
    }
    const json_t *db = json_object_get(doc, "database");
    if (!json_is_true(json_object_get(db, "reachable"))) {
        printf("database          UNREACHABLE\n");
        return;
    }
    /* What was not read is not shown: zeros would pass for facts. */
    if (json_object_get(db, "error")) {
        printf("database          reachable, but %s\n", s_str(db, "error", ""));
        return;
    }
    if (json_object_get(db, "not_durable"))
        printf("database          reachable, NOT DURABLE: %s\n"
               "                  (a crash of PostgreSQL can lose referrals "
               "it ACCEPTED)\n",
               s_str(db, "not_durable", ""));
    else
        printf("database          reachable\n");
    if (json_object_get(db, "rules_version") || !loaded)
        printf("rules version     %s", s_str(db, "rules_version", "-"));
    else /* a routing of a release before the start event (it writes a
          * rules.reloaded, reason started), nothing routed by it yet */
        printf("rules version     %s (loaded by routing, nothing routed by it "
               "yet)",
               loaded);
    if (json_object_get(db, "rules_version_at"))
        printf("\n                  last used %s",
               s_str(db, "rules_version_at", ""));
    if (json_object_get(db, "rules_reload_refused_at"))
        printf("\nRULES REFUSED     a reload at %s was refused (%s%s%s);"
               "\n                  the version above still routes (the "
               "routing log has the line)",
               s_str(db, "rules_reload_refused_at", ""),
               s_str(db, "rules_reload_refused_code", ""),
               *s_str(db, "rules_reload_refused_path", "") ? " at " : "",
               s_str(db, "rules_reload_refused_path", ""));
    printf("\ntrail head        seq %lld (sealed up to %lld)\n",
           s_int(db, "trail_head"), s_int(db, "trail_sealed"));
    if (json_object_get(db, "checkpoint_seq"))
        printf("last checkpoint   seq %lld at %s\n",
               s_int(db, "checkpoint_seq"), s_str(db, "checkpoint_at", ""));
    else
        printf("last checkpoint   none\n");
    if (json_object_get(db, "trail_broken"))
        printf("TRAIL BROKEN      the seals stop below the last checkpoint: "
               "seals were removed;\n                  nothing is sealed "
               "until that is repaired (ketenhubctl audit verify)\n");
    printf("dead letters      %lld\nescalations open  %lld\n",
           s_int(db, "dead_letters"), s_int(db, "escalations_open"));
    char unrouted_age[32] = "";
    if (json_object_get(db, "referrals_unrouted_oldest"))
        s_age(s_int(db, "referrals_unrouted_oldest_age_s"), unrouted_age,
              sizeof unrouted_age);
    printf("not yet routed    %lld%s%s%s%s%s\n",
           s_int(db, "referrals_unrouted"), *unrouted_age ? " (oldest " : "",
           s_str(db, "referrals_unrouted_oldest", ""),
           *unrouted_age ? ", " : "", unrouted_age,
           *unrouted_age ? " ago)" : "");
    if (s_int(db, "referrals_held") > 0)
        printf("  held back       %lld (their writes failed: see the "
               "routing log, kind=referral_failing)\n",
               s_int(db, "referrals_held"));
    printf("backlog (unacknowledged deliveries per partner)\n");
    printf("  %-24s %8s  %s\n", "partner", "backlog", "oldest");
    json_t *p;
    json_array_foreach(json_object_get(doc, "partners"), i, p)
    {
        char age[32] = "";
        if (json_object_get(p, "oldest"))
            s_age(s_int(p, "oldest_age_s"), age, sizeof age);
        printf("  %-24s %8lld  %s%s%s%s%s\n", s_str(p, "partner", ""),
               s_int(p, "backlog"), s_str(p, "oldest", "-"), *age ? " (" : "",
               age, *age ? " ago)" : "",
               json_is_true(json_object_get(p, "revoked")) ? "  revoked" : "");
    }
}

int ctl_status(int argc, char **argv)
{
    s_service_t services[] = {
        {"intake", "KH_INTAKE_HEALTH", "127.0.0.1:9701", NULL, NULL},
        {"routing", "KH_ROUTING_HEALTH", "127.0.0.1:9702", NULL, NULL},
        {"notification", "KH_NOTIFY_HEALTH", "127.0.0.1:9703", NULL, NULL},
        {"audit", "KH_AUDIT_HEALTH", "127.0.0.1:9704", NULL, NULL},
    };
    const size_t nservices = sizeof services / sizeof services[0];
    for (size_t i = 0; i < nservices; i++) {
        const char *env = getenv(services[i].env);
        services[i].endpoint = env && *env ? env : services[i].defval;
        services[i].from = services[i].env;
    }
    static const struct option options[] = {
        {"intake", required_argument, NULL, 'i'},
        {"routing", required_argument, NULL, 'r'},
        {"notification", required_argument, NULL, 'n'},
        {"audit", required_argument, NULL, 'a'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    bool as_json = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "jh", options, &cli)) != -1) {
        switch (c) {
        case 'i':
            services[0].endpoint = optarg;
            services[0].from = "--intake";
            break;
        case 'r':
            services[1].endpoint = optarg;
            services[1].from = "--routing";
            break;
        case 'n':
            services[2].endpoint = optarg;
            services[2].from = "--notification";
            break;
        case 'a':
            services[3].endpoint = optarg;
            services[3].from = "--audit";
            break;
        case 'j':
            as_json = true;
            break;
        case 'h':
            s_usage(stdout);
            return CTL_OK;
        default:
            s_usage(stderr);
            return CTL_USAGE;
        }
    }
    if (optind < argc)
        return ctl_usage_error("status: unexpected argument '%s'",
                               argv[optind]);
    for (size_t i = 0; i < nservices; i++)
        if (!s_endpoint_valid(services[i].endpoint))
            return ctl_usage_error("status: %s '%s' is not HOST:PORT "
                                   "(or none)",
                                   services[i].from, services[i].endpoint);

    bool ok = true;
    json_t *list = json_array();
    for (size_t i = 0; i < nservices; i++) {
        json_t *svc = s_probe(&services[i]);
        const char *state = s_str(svc, "state", "down");
        ok = ok && (strcmp(state, "up") == 0 || strcmp(state, "skipped") == 0);
        json_array_append_new(list, svc);
    }
    json_t *partners = NULL;
    json_t *db = s_database(&partners);
    ok = ok && json_is_true(json_object_get(db, "reachable")) &&
         !json_object_get(db, "error") && !json_object_get(db, "trail_broken");
    json_t *keys = s_hub_keys(list);
    json_t *doc =
        json_pack("{s:s, s:b, s:o, s:o*, s:o, s:o}", "version", kh_version(),
                  "ok", ok, "services", list, "hub_keys", keys, "database", db,
                  "partners", partners);
    if (!doc) {
        fprintf(stderr, "ketenhubctl: out of memory\n");
        return CTL_FAIL;
    }
    if (as_json) {
        char *text = json_dumps(doc, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        if (text)
            printf("%s\n", text);
        free(text);
    } else {
        printf("ketenhub %s: %s\n", kh_version(),
               ok                                    ? "all up"
               : json_object_get(db, "trail_broken") ? "THE TRAIL IS BROKEN"
                                                     : "SOMETHING IS DOWN");
        s_print_text(doc);
    }
    json_decref(doc);
    return ok ? CTL_OK : CTL_FAIL;
}

static void s_usage_health(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl health [--live] [H:P]\n"
            "\n"
            "Ask one service's health endpoint (default 127.0.0.1:9701) "
            "whether it is\n"
            "ready (/readyz), or with --live only alive (/livez); print its "
            "answer.\n"
            "For container health checks: needs no database and no key.\n"
            "\n"
            "exit status: 0 ready (alive), 1 not, 2 usage\n");
}

int ctl_health(int argc, char **argv)
{
    static const struct option options[] = {{"live", no_argument, NULL, 'l'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    bool live = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "lh", options, &cli)) != -1) {
        if (c == 'l')
            live = true;
        else if (c == 'h') {
            s_usage_health(stdout);
            return CTL_OK;
        } else {
            s_usage_health(stderr);
            return CTL_USAGE;
        }
    }
    if (argc - optind > 1)
        return ctl_usage_error("health: one endpoint at most");
    if (optind < argc &&
        (strcmp(argv[optind], "none") == 0 || !s_endpoint_valid(argv[optind])))
        return ctl_usage_error("health: '%s' is not HOST:PORT", argv[optind]);
    char hostport[256];
    s_hostport(optind < argc ? argv[optind] : "127.0.0.1:9701", hostport,
               sizeof hostport);
    char *body = NULL;
    kh_error_t err;
    int status = kh_http_get(hostport, live ? "/livez" : "/readyz", S_PROBE_MS,
                             &body, &err);
    if (status < 0) {
        ctl_print_error(&err);
        return CTL_FAIL;
    }
    printf("%s", body ? body : "");
    free(body);
    return status == 200 ? CTL_OK : CTL_FAIL;
}
