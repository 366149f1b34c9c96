/*
 * The harness's checks after the drain: what the database, the audit
 * trail and the partners' inboxes must hold once every fault is over.
 * Each check prints one line, "check <name>: passed (...)" or
 * "check <name>: FAILED ...", with counts and at most a few ids (never a
 * referral's values).
 */
#include <dirent.h>
#include <libpq-fe.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "e2e.h"
#include "ketenhub/proto.h"
#include "ketenhub/rules.h"
#include "khproc.h"

static int s_passed, s_failed;

void e2e_check(const char *name, bool passed, const char *fmt, ...)
{
    char details[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(details, sizeof details, fmt, ap);
    va_end(ap);
    printf("check %s: %s (%s)\n", name, passed ? "passed" : "FAILED", details);
    if (passed)
        s_passed++;
    else
        s_failed++;
}

int e2e_report(void)
{
    printf("e2e: %d passed, %d failed\n", s_passed, s_failed);
    return s_failed;
}

/* ---- data -------------------------------------------------------------- */

typedef struct {
    char id[37], referral_id[37], partner[33], priority[8], hash[65];
    char state[16];
    bool copy;  /* an escalation copy (delivery.created), not from the rules */
    int stored; /* files in its partner's inbox that name it */
} s_delivery_t;

static s_delivery_t *s_dl;       /* by referral_id, partner */
static s_delivery_t **s_dl_byid; /* by id */
static size_t s_dl_count;

static long s_count(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    long n = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        n = atol(PQgetvalue(res, 0, 0));
    else
        printf("e2e: query failed: %s", PQerrorMessage(conn));
    PQclear(res);
    return n;
}

static int s_byid(const void *a, const void *b)
{
    return strcmp((*(s_delivery_t *const *) a)->id,
                  (*(s_delivery_t *const *) b)->id);
}

static s_delivery_t *s_find(const char *id)
{
    s_delivery_t key, *k = &key;
    snprintf(key.id, sizeof key.id, "%s", id);
    s_delivery_t **hit =
        bsearch(&k, s_dl_byid, s_dl_count, sizeof *s_dl_byid, s_byid);
    return hit ? *hit : NULL;
}

static int s_load_deliveries(PGconn *conn)
{
    PGresult *res = PQexec(
        conn, "SELECT d.id, d.referral_id, d.partner_id, d.priority,"
              " encode(d.payload_hash, 'hex'), d.state,"
              " EXISTS (SELECT 1 FROM audit_events e WHERE e.action ="
              " 'delivery.created' AND e.delivery_id = d.id)"
              " FROM deliveries d ORDER BY d.referral_id::text, d.partner_id");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        printf("e2e: cannot read deliveries: %s", PQerrorMessage(conn));
        PQclear(res);
        return -1;
    }
    s_dl_count = (size_t) PQntuples(res);
    s_dl = calloc(s_dl_count + 1, sizeof *s_dl);
    s_dl_byid = calloc(s_dl_count + 1, sizeof *s_dl_byid);
    if (!s_dl || !s_dl_byid) {
        PQclear(res);
        return -1;
    }
    for (size_t i = 0; i < s_dl_count; i++) {
        s_delivery_t *d = &s_dl[i];
        int row = (int) i;
        snprintf(d->id, sizeof d->id, "%s", PQgetvalue(res, row, 0));
        snprintf(d->referral_id, sizeof d->referral_id, "%s",
                 PQgetvalue(res, row, 1));
        snprintf(d->partner, sizeof d->partner, "%s", PQgetvalue(res, row, 2));
        snprintf(d->priority, sizeof d->priority, "%s",
                 PQgetvalue(res, row, 3));
        snprintf(d->hash, sizeof d->hash, "%s", PQgetvalue(res, row, 4));
        snprintf(d->state, sizeof d->state, "%s", PQgetvalue(res, row, 5));
        d->copy = strcmp(PQgetvalue(res, row, 6), "t") == 0;
        s_dl_byid[i] = d;
    }
    PQclear(res);
    qsort(s_dl_byid, s_dl_count, sizeof *s_dl_byid, s_byid);
    return 0;
}

/* ---- (a) and (f): what the generator was told ------------------------- */

static void s_check_accepted(PGconn *conn, const e2e_run_t *run)
{
    PGresult *res = PQexec(conn, "CREATE TEMP TABLE e2e_accepted (key text"
                                 " PRIMARY KEY, id uuid NOT NULL)");
    PQclear(res);
    res = PQexec(conn, "COPY e2e_accepted FROM STDIN");
    bool ok = PQresultStatus(res) == PGRES_COPY_IN;
    PQclear(res);
    long told = 0, mismatched = 0;
    for (size_t i = 0; ok && i < run->key_count; i++) {
        const e2e_key_t *k = &run->keys[i];
        mismatched += k->mismatch;
        if (!k->referral_id[0])
            continue;
        char line[128];
        int len =
            snprintf(line, sizeof line, "%s\t%s\n", k->key, k->referral_id);
        ok = PQputCopyData(conn, line, len) == 1;
        told++;
    }
    ok = ok && PQputCopyEnd(conn, NULL) == 1;
    res = PQgetResult(conn);
    ok = ok && PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    while ((res = PQgetResult(conn)))
        PQclear(res);
    if (!ok) {
        e2e_check("accepted", false, "cannot load the accepted ids: %s",
                  PQerrorMessage(conn));
        return;
    }
    long lost = s_count(conn, "SELECT count(*) FROM e2e_accepted a WHERE NOT"
                              " EXISTS (SELECT 1 FROM referrals r WHERE"
                              " r.id = a.id)");
    long unrouted = s_count(conn, "SELECT count(*) FROM e2e_accepted a JOIN"
                                  " referrals r ON r.id = a.id WHERE r.state"
                                  " <> 'routed'");
    e2e_check("accepted", lost == 0 && unrouted == 0,
              "%ld ACCEPTED ids: %ld not in referrals (lost), %ld not routed",
              told, lost, unrouted);

    long other_id = s_count(
        conn, "SELECT count(*) FROM e2e_accepted a JOIN referrals r ON"
              " r.partner_id = '" E2E_SUBMITTER "' AND r.idempotency_key ="
              " a.key WHERE r.id <> a.id");
    long twice = s_count(conn, "SELECT count(*) FROM (SELECT 1 FROM"
                               " referrals GROUP BY partner_id,"
                               " idempotency_key HAVING count(*) > 1) t");
    long unknown = s_count(conn, "SELECT count(*) FROM referrals r WHERE NOT"
                                 " EXISTS (SELECT 1 FROM e2e_accepted a"
                                 " WHERE a.id = r.id)");
    e2e_check("idempotency",
              other_id == 0 && twice == 0 && unknown == 0 && mismatched == 0,
              "%ld keys stored under another id than the one ACCEPTED named,"
              " %ld keys with two referrals, %ld referrals no ACCEPTED named,"
              " %ld resubmissions answered with another id or not as"
              " duplicate",
              other_id, twice, unknown, mismatched);
}

/* ---- (b): the deliveries are exactly what the rules name --------------- */

static void s_check_routes(PGconn *conn, const e2e_run_t *run)
{
    static const kh_rules_partner_t partners[] = {
        {E2E_SUBMITTER, true, false},
        {"veilig-thuis", true, false},
        {"zorgcoordinator", true, false},
        {"avim", true, false}};
    char rules_path[512], schema_path[512];
    snprintf(rules_path, sizeof rules_path, "%s/schemas/rules/default.yaml",
             run->source_dir);
    snprintf(schema_path, sizeof schema_path, "%s/schemas/referral.v1.json",
             run->source_dir);
    kh_rules_options_t opts = {
        .schema_path = schema_path, .partners = partners, .partner_count = 4};
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load(rules_path, &opts, &err);
    kh_rules_result_t *result = rules ? kh_rules_result_new(rules) : NULL;
    PGresult *res = PQexec(conn, "SELECT id, convert_from(payload, 'UTF8')"
                                 " FROM referrals ORDER BY id::text");
    if (!result || PQresultStatus(res) != PGRES_TUPLES_OK) {
        e2e_check("routes", false, "cannot load the rules or the referrals");
        PQclear(res);
        kh_rules_result_destroy(&result);
        kh_rules_destroy(&rules);
        return;
    }
    long wrong = 0, copies = 0, checked = 0;
    char first[160] = "";
    size_t d = 0;
    for (int row = 0; row < PQntuples(res); row++) {
        const char *id = PQgetvalue(res, row, 0);
        while (d < s_dl_count && strcmp(s_dl[d].referral_id, id) < 0)
            d++; /* deliveries of no referral: counted below */
        json_error_t jerr;
        json_t *doc = json_loads(PQgetvalue(res, row, 1), 0, &jerr);
        kh_rules_eval(rules, doc, result);
        size_t targets = kh_rules_result_target_count(result);
        size_t seen = 0;
        bool bad = doc == NULL;
        for (; d < s_dl_count && strcmp(s_dl[d].referral_id, id) == 0; d++) {
            const s_delivery_t *dl = &s_dl[d];
            if (dl->copy) {
                copies++;
                continue;
            }
            seen++;
            int t = kh_rules_result_find(result, dl->partner);
            if (t < 0) {
                bad = true;
                continue;
            }
            json_t *proj = kh_rules_result_project(result, (size_t) t, doc);
            char hash[65] = "";
            if (!proj || kh_payload_hash(proj, hash) != 0 ||
                strcmp(hash, dl->hash) != 0 ||
                strcmp(kh_priority_name(
                           kh_rules_result_priority(result, (size_t) t)),
                       dl->priority) != 0)
                bad = true;
            json_decref(proj);
        }
        if (seen != targets)
            bad = true;
        if (bad && !wrong++)
            snprintf(first, sizeof first,
                     ", first: referral %s (%zu rule"
                     " targets, %zu deliveries)",
                     id, targets, seen);
        checked++;
        json_decref(doc);
    }
    PQclear(res);
    long orphans = s_count(conn, "SELECT count(*) FROM deliveries d WHERE NOT"
                                 " EXISTS (SELECT 1 FROM referrals r WHERE"
                                 " r.id = d.referral_id)");
    e2e_check("routes", wrong == 0 && orphans == 0,
              "%ld referrals re-evaluated with the rules, %zu deliveries:"
              " %ld referrals whose deliveries differ from the rules'"
              " targets, priorities or projections%s, %ld deliveries of no"
              " referral, %ld escalation copies",
              checked, s_dl_count, wrong, first, orphans, copies);
    kh_rules_result_destroy(&result);
    kh_rules_destroy(&rules);
}

/* ---- (d) and (e): the partners' inboxes ------------------------------- */

typedef struct {
    char referral_id[37], delivery_id[37];
} s_seen_t;

static int s_seen_cmp(const void *a, const void *b)
{
    const s_seen_t *x = a, *y = b;
    int c = strcmp(x->referral_id, y->referral_id);
    return c ? c : strcmp(x->delivery_id, y->delivery_id);
}

static void s_check_inboxes(const e2e_run_t *run)
{
    long files = 0, foreign = 0, unknown = 0, damaged = 0, dups = 0;
    char first[200] = "";
    for (int p = 0; p < E2E_LISTENERS; p++) {
        const char *partner = e2e_listener_ids[p];
        char dir[512];
        snprintf(dir, sizeof dir, "%s/inbox/%s", run->run_dir, partner);
        DIR *dh = opendir(dir);
        s_seen_t *seen = NULL;
        size_t count = 0, cap = 0;
        struct dirent *ent;
        while (dh && (ent = readdir(dh))) {
            size_t len = strlen(ent->d_name);
            if (ent->d_name[0] == '.' || len != 41 ||
                strcmp(ent->d_name + 36, ".json") != 0)
                continue;
            files++;
            char path[1024], id[37];
            snprintf(path, sizeof path, "%s/%s", dir, ent->d_name);
            snprintf(id, sizeof id, "%.36s", ent->d_name);
            json_error_t jerr;
            json_t *doc = json_load_file(path, 0, &jerr);
            const char *did =
                json_string_value(json_object_get(doc, "delivery_id"));
            const char *rid =
                json_string_value(json_object_get(doc, "referral_id"));
            const char *sha =
                json_string_value(json_object_get(doc, "payload_sha256"));
            s_delivery_t *d = s_find(id);
            char hash[65] = "";
            json_t *payload = json_object_get(doc, "payload");
            if (!d) {
                unknown++;
            } else if (strcmp(d->partner, partner) != 0) {
                if (!foreign++)
                    snprintf(first, sizeof first,
                             ", first: delivery %s for %s in %s's inbox", id,
                             d->partner, partner);
            } else if (!did || strcmp(did, id) != 0 || !rid ||
                       strcmp(rid, d->referral_id) != 0 || !sha ||
                       strcmp(sha, d->hash) != 0 || !payload ||
                       kh_payload_hash(payload, hash) != 0 ||
                       strcmp(hash, d->hash) != 0) {
                damaged++;
            } else {
                d->stored++;
            }
            if (rid && count < (size_t) -1) {
                if (count == cap) {
                    cap = cap ? cap * 2 : 1024;
                    s_seen_t *grown = realloc(seen, cap * sizeof *seen);
                    if (!grown)
                        break;
                    seen = grown;
                }
                snprintf(seen[count].referral_id, 37, "%s", rid);
                snprintf(seen[count].delivery_id, 37, "%s", id);
                count++;
            }
            json_decref(doc);
        }
        if (dh)
            closedir(dh);
        qsort(seen, count, sizeof *seen, s_seen_cmp);
        for (size_t i = 1; i < count; i++)
            dups += strcmp(seen[i].referral_id, seen[i - 1].referral_id) == 0;
        free(seen);
    }
    long acked = 0, unstored = 0;
    for (size_t i = 0; i < s_dl_count; i++) {
        if (strcmp(s_dl[i].state, "acknowledged") != 0)
            continue;
        acked++;
        unstored += s_dl[i].stored != 1;
    }
    e2e_check("need-to-know", foreign == 0 && unknown == 0 && damaged == 0,
              "%ld files in %d inboxes: %ld addressed to another partner%s,"
              " %ld of no delivery, %ld not matching their delivery or hash",
              files, E2E_LISTENERS, foreign, first, unknown, damaged);
    e2e_check("stored", unstored == 0,
              "%ld acknowledged deliveries, %ld without their file in the"
              " partner's inbox",
              acked, unstored);
    e2e_check("duplicates", dups == 0,
              "%ld referrals a partner holds under two delivery ids", dups);
}

/* ---- (c), (g), (h) ---------------------------------------------------- */

static void s_check_states(PGconn *conn)
{
    long unacked = s_count(conn, "SELECT count(*) FROM deliveries WHERE"
                                 " state <> 'acknowledged'");
    e2e_check("acknowledged", unacked == 0,
              "%zu deliveries, %ld not acknowledged", s_dl_count, unacked);
    char buf[512] = "";
    PGresult *res =
        PQexec(conn, "SELECT 'referrals ' || state, count(*) FROM referrals"
                     " WHERE state <> 'routed' GROUP BY state UNION ALL"
                     " SELECT 'deliveries ' || state, count(*) FROM"
                     " deliveries WHERE state <> 'acknowledged' GROUP BY"
                     " state ORDER BY 1");
    long stuck = 0;
    for (int i = 0;
         PQresultStatus(res) == PGRES_TUPLES_OK && i < PQntuples(res); i++) {
        size_t len = strlen(buf);
        snprintf(buf + len, sizeof buf - len, "%s%s %s", len ? ", " : "",
                 PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
        stuck += atol(PQgetvalue(res, i, 1));
    }
    bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    e2e_check("stuck", ok && stuck == 0, "%s",
              ok ? (stuck ? buf
                          : "nothing in accepted, pending, delivered"
                            " or dead")
                 : "cannot query");
}

static void s_check_trail(PGconn *conn, const e2e_run_t *run)
{
    char out[512];
    snprintf(out, sizeof out, "%s/verify.out", run->run_dir);
    int rc = khproc_sh("%s audit verify --public-key=%s/audit/hub-audit.pub"
                       " >%s 2>&1",
                       run->ctl, run->run_dir, out);
    /* The first line has the figures; "intact" comes last. */
    char line[256] = "", buf[256];
    bool intact = false;
    FILE *f = fopen(out, "r");
    while (f && fgets(buf, sizeof buf, f)) {
        if (!line[0])
            snprintf(line, sizeof line, "%s", buf);
        if (strncmp(buf, "intact", 6) == 0)
            intact = true;
    }
    if (f)
        fclose(f);
    line[strcspn(line, "\n")] = 0;
    e2e_check("audit-verify", rc == 0 && intact,
              "ketenhubctl audit verify: exit %d, %s, \"%s\"", rc,
              intact ? "intact" : "NOT intact", line);

    /* One event of each kind per object, by construction. */
    long acc = s_count(
        conn, "SELECT count(*) FROM referrals r LEFT JOIN (SELECT"
              " referral_id, count(*) n FROM audit_events WHERE action ="
              " 'referral.accepted' AND outcome = 'ok' GROUP BY 1) e ON"
              " e.referral_id = r.id WHERE coalesce(e.n, 0) <> 1");
    long routed = s_count(
        conn, "SELECT count(*) FROM referrals r LEFT JOIN (SELECT"
              " referral_id, count(*) n FROM audit_events WHERE action ="
              " 'referral.routed' AND outcome = 'ok' GROUP BY 1) e ON"
              " e.referral_id = r.id WHERE coalesce(e.n, 0) <> 1");
    long sent = s_count(
        conn, "SELECT count(*) FROM deliveries d LEFT JOIN (SELECT"
              " delivery_id, count(*) n FROM audit_events WHERE action ="
              " 'delivery.sent' GROUP BY 1) e ON e.delivery_id = d.id WHERE"
              " coalesce(e.n, 0) < 1");
    /* Each send counts an attempt in the same statement as its event,
     * and one that never left gives it back in the same statement as
     * its delivery.unsent. */
    long attempts = s_count(
        conn, "SELECT count(*) FROM deliveries d LEFT JOIN (SELECT"
              " delivery_id, count(*) FILTER (WHERE action = 'delivery.sent')"
              " - count(*) FILTER (WHERE action = 'delivery.unsent') n FROM"
              " audit_events WHERE action IN ('delivery.sent',"
              " 'delivery.unsent') GROUP BY 1) e ON e.delivery_id = d.id"
              " WHERE coalesce(e.n, 0) <> d.attempts");
    long acked = s_count(
        conn, "SELECT count(*) FROM deliveries d LEFT JOIN (SELECT"
              " delivery_id, count(*) n FROM audit_events WHERE action ="
              " 'delivery.acked' AND outcome = 'ok' GROUP BY 1) e ON"
              " e.delivery_id = d.id WHERE coalesce(e.n, 0) <> 1");
    /* Events of objects that do not exist, and events no fault explains. */
    long orphans = s_count(
        conn, "SELECT count(*) FROM audit_events e WHERE (e.referral_id IS"
              " NOT NULL AND e.action LIKE 'referral.%' AND NOT EXISTS"
              " (SELECT 1 FROM referrals r WHERE r.id = e.referral_id)) OR"
              " (e.delivery_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM"
              " deliveries d WHERE d.id = e.delivery_id))");
    long odd = s_count(
        conn, "SELECT count(*) FROM audit_events WHERE action IN"
              " ('referral.rejected', 'delivery.nacked', 'delivery.dead',"
              " 'delivery.escalated', 'delivery.created', 'delivery.retried',"
              " 'request.rejected') OR (action = 'delivery.acked' AND outcome"
              " <> 'ok')");
    char counts[600] = "";
    PGresult *res = PQexec(conn, "SELECT action || '/' || outcome, count(*)"
                                 " FROM audit_events GROUP BY 1 ORDER BY 1");
    for (int i = 0;
         PQresultStatus(res) == PGRES_TUPLES_OK && i < PQntuples(res); i++) {
        size_t len = strlen(counts);
        snprintf(counts + len, sizeof counts - len, "%s%s %s", len ? ", " : "",
                 PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
    }
    PQclear(res);
    e2e_check("audit-events",
              acc == 0 && routed == 0 && sent == 0 && attempts == 0 &&
                  acked == 0 && orphans == 0 && odd == 0,
              "referrals without exactly one referral.accepted: %ld, one"
              " referral.routed: %ld; deliveries without a delivery.sent:"
              " %ld, whose attempts differ from their delivery.sent events:"
              " %ld, without exactly one delivery.acked ok: %ld; events of"
              " no object: %ld; rejections, NACKs, dead letters,"
              " escalations: %ld; all: %s",
              acc, routed, sent, attempts, acked, orphans, odd, counts);
}

void e2e_check_all(const e2e_run_t *run)
{
    PGconn *conn = PQconnectdb("");
    if (PQstatus(conn) != CONNECTION_OK || s_load_deliveries(conn) != 0) {
        e2e_check("database", false, "cannot read the hub's database: %s",
                  PQerrorMessage(conn));
        PQfinish(conn);
        return;
    }
    s_check_accepted(conn, run);
    s_check_routes(conn, run);
    s_check_states(conn);
    s_check_inboxes(run);
    s_check_trail(conn, run);
    PQfinish(conn);
    free(s_dl);
    free(s_dl_byid);
    s_dl = NULL;
    s_dl_byid = NULL;
}
