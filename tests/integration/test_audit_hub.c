/*
 * The trail of a whole hub: the real intake, routing, notification and
 * audit services with partners that acknowledge, refuse and stay away.
 * Referrals carry a unique canary string in every free-text and
 * identifying field; afterwards the trail, every service's log, the
 * query outputs and the exports hold none of them. Every action of the
 * closed list is produced, one referral's history reads back complete in
 * one command, and the sealed trail verifies, also after every payload
 * was purged (and stops verifying once a superuser edits one event).
 */
#include <czmq.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "ketenhub/trail.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_audit_hub"
#define S_CTL KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl"
#define S_PARTNER KH_TEST_BINARY_DIR "/tools/partner/ketenhub-partner"
#define S_MAX_CANARIES 128
#define S_END ((const char *) NULL) /* ends s_run's arguments */

static char *s_dir;
static char *s_conninfo;
static PGconn *s_db;
static char s_intake[64], s_routing[64], s_notify[64], s_wake[64];
static char *s_canaries[S_MAX_CANARIES];
static int s_ncanaries;

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

/* Run ketenhubctl (or another binary) with args; returns the exit status
 * and its output in *out (may be NULL). */
static int s_run(char **out, const char *bin, ...)
{
    char *argv[32];
    int n = 0;
    argv[n++] = (char *) bin;
    va_list ap;
    va_start(ap, bin);
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL && n < 31)
        argv[n++] = (char *) a;
    va_end(ap);
    argv[n] = NULL;
    char *output = NULL;
    int rc = khtest_run(argv, &output);
    if (out)
        *out = output;
    else
        free(output);
    return rc;
}

static pid_t s_spawn(const char *bin, const char *log, char **env)
{
    char *argv[] = {(char *) bin, NULL};
    pid_t pid = khproc_spawn(bin, argv, env, s_path(log));
    ck_assert_int_gt(pid, 0);
    return pid;
}

static bool s_log_has(const char *log, const char *text, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 50) {
        char *content = khtest_read_file(s_path(log));
        bool found = content && strstr(content, text);
        free(content);
        if (found)
            return true;
        zclock_sleep(50);
    }
    return false;
}

static bool s_wait_count(const char *sql, long at_least, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 50) {
        if (khtest_db_count(s_db, sql) >= at_least)
            return true;
        zclock_sleep(50);
    }
    return false;
}

static void s_add_partner(const char *id, const char *kind, bool cases)
{
    char *out = NULL;
    int rc = cases ? s_run(&out, S_CTL, "partner", "add", id, "--name", id,
                           "--kind", kind, "--cert-dir", s_path("partners"),
                           "--out", s_path("keys"), S_END)
                   : s_run(&out, S_CTL, "partner", "add", id, "--name", id,
                           "--kind", kind, "--no-cases", "--cert-dir",
                           s_path("partners"), "--out", s_path("keys"), S_END);
    ck_assert_msg(rc == 0, "partner add %s: %s", id, out);
    free(out);
}

/* A new canary: prefix, the referral's number, suffix. */
static char *s_canary(const char *prefix, int i, const char *suffix)
{
    ck_assert_int_lt(s_ncanaries, S_MAX_CANARIES);
    char text[160];
    if (i > 0)
        snprintf(text, sizeof text, "%s%d%s", prefix, i, suffix);
    else
        snprintf(text, sizeof text, "%s", prefix);
    s_canaries[s_ncanaries] = strdup(text);
    return s_canaries[s_ncanaries++];
}

/* Put a unique canary into every free-text and identifying field the
 * example has; the birth date stays, and is searched for as it is. */
static void s_plant(json_t *doc, int i)
{
    json_t *by = json_object_get(doc, "submitted_by");
    json_t *pro = json_object_get(by, "professional");
    json_t *subject = json_object_get(doc, "subject");
    json_t *expl = json_object_get(doc, "exploitation");
    json_object_set_new(by, "organisation",
                        json_string(s_canary("Kanarie Organisatie ", i, "Q")));
    struct {
        json_t *obj;
        const char *key, *prefix, *suffix;
    } fields[] = {
        {pro, "name", "Kanarie Persoon ", "Q"},
        {pro, "role", "Kanarie Functie ", "Q"},
        {pro, "phone", "+31 (970) 4471-", "9"},
        {pro, "email", "kanarie.", "q@example.org"},
        {subject, "reference", "KANARIE-REF-", "Q"},
        {expl, "other_description", "Kanarie vorm ", "Q"},
        {expl, "sector_description", "Kanarie sector ", "Q"},
        {doc, "indicators_other", "Kanarie indicator ", "Q"},
        {doc, "needs_other", "Kanarie behoefte ", "Q"},
        {doc, "suspects", "Kanarie verdachte ", "Q Jansen"},
        {doc, "summary", "Kanarie samenvatting ", "Q"},
    };
    for (size_t k = 0; k < sizeof fields / sizeof *fields; k++)
        if (fields[k].obj && json_object_get(fields[k].obj, fields[k].key))
            json_object_set_new(
                fields[k].obj, fields[k].key,
                json_string(s_canary(fields[k].prefix, i, fields[k].suffix)));
    const char *birth =
        json_string_value(json_object_get(subject, "birth_date"));
    if (birth)
        s_canary(birth, 0, "");
}

/* The referral id in the partner tool's answer. */
static char *s_referral_id(const char *answer)
{
    const char *p = strstr(answer, "\"referral_id\":\"");
    ck_assert_msg(p != NULL, "no referral id in: %s", answer);
    p += strlen("\"referral_id\":\"");
    return strndup(p, 36);
}

/* Fail when any canary occurs in text (named by what). */
static void s_no_canary(const char *what, const char *text)
{
    ck_assert_ptr_nonnull(text);
    for (int i = 0; i < s_ncanaries; i++)
        ck_assert_msg(strstr(text, s_canaries[i]) == NULL,
                      "canary '%s' found in %s", s_canaries[i], what);
    ck_assert_msg(strstr(text, "Kanarie") == NULL &&
                      strstr(text, "KANARIE") == NULL &&
                      strstr(text, "kanarie") == NULL,
                  "canary found in %s", what);
}

START_TEST(a_hub_trail_is_complete_sealed_and_free_of_personal_data)
{
    s_dir = khtest_tmpdir();
    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    snprintf(s_intake, sizeof s_intake, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(s_routing, sizeof s_routing, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(s_notify, sizeof s_notify, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(s_wake, sizeof s_wake, "tcp://127.0.0.1:%d", khproc_free_port());

    ck_assert_int_eq(
        s_run(NULL, S_CTL, "hub", "keygen", "--out", s_path("hub"), S_END), 0);
    ck_assert_int_eq(
        s_run(NULL, S_CTL, "audit", "keygen", "--out", s_path("audit"), S_END),
        0);
    khtest_run((char *[]){"/bin/mkdir", "-p", s_path("partners"),
                          s_path("keys"), s_path("in-vt"), s_path("in-zc"),
                          s_path("marks"), NULL},
               NULL);
    s_add_partner("meldpunt-hilversum", "municipality", true);
    s_add_partner("veilig-thuis", "veilig_thuis", true);
    s_add_partner("zorgcoordinator", "zorgcoordinator", true);
    s_add_partner("avim", "police", true);
    s_add_partner("ketenregisseur", "chain_director", false);
    s_add_partner("oud-meldpunt", "municipality", true);
    char *rules = khtest_read_file(khtest_src("schemas/rules/default.yaml"));
    ck_assert_ptr_nonnull(rules);
    khtest_write_file(s_path("rules.yaml"), rules);

    char e_db[1024], e_cert[600], e_dir[600], e_schema[600], e_rules[600],
        e_intake[128], e_routing[128], e_notify[128], e_wake[128], e_key[600];
    snprintf(e_db, sizeof e_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(e_cert, sizeof e_cert, "KH_HUB_CERT=%s", s_path("hub/hub.cert"));
    snprintf(e_dir, sizeof e_dir, "KH_PARTNER_CERT_DIR=%s", s_path("partners"));
    snprintf(e_schema, sizeof e_schema, "KH_SCHEMA_DIR=%s",
             khtest_src("schemas"));
    snprintf(e_rules, sizeof e_rules, "KH_RULES_FILE=%s", s_path("rules.yaml"));
    snprintf(e_intake, sizeof e_intake, "KH_INTAKE_ENDPOINT=%s", s_intake);
    snprintf(e_routing, sizeof e_routing, "KH_ROUTING_ENDPOINT=%s", s_routing);
    snprintf(e_notify, sizeof e_notify, "KH_NOTIFY_ENDPOINT=%s", s_notify);
    snprintf(e_wake, sizeof e_wake, "KH_NOTIFY_WAKE_ENDPOINT=%s", s_wake);
    snprintf(e_key, sizeof e_key, "KH_AUDIT_KEY=%s",
             s_path("audit/hub-audit.key"));
    /* Each service's health endpoint (where it has one) on a port of its
     * own, never a fixed default another test may hold. */
    char h_routing[64], h_notify[64], h_intake[64], h_audit[64];
    snprintf(h_routing, sizeof h_routing, "KH_HEALTH_ENDPOINT=127.0.0.1:%d",
             khproc_free_port());
    snprintf(h_notify, sizeof h_notify, "KH_HEALTH_ENDPOINT=127.0.0.1:%d",
             khproc_free_port());
    snprintf(h_intake, sizeof h_intake, "KH_HEALTH_ENDPOINT=127.0.0.1:%d",
             khproc_free_port());
    snprintf(h_audit, sizeof h_audit, "KH_HEALTH_ENDPOINT=127.0.0.1:%d",
             khproc_free_port());
    char *routing_env[] = {e_db,
                           e_cert,
                           e_schema,
                           e_rules,
                           e_routing,
                           e_wake,
                           "KH_ROUTING_POLL_MS=100",
                           h_routing,
                           NULL};
    char *notify_env[] = {e_db,
                          e_cert,
                          e_dir,
                          e_notify,
                          e_wake,
                          "KH_NOTIFY_ACK_TIMEOUT_MS=400",
                          "KH_NOTIFY_BACKOFF_MAX_MS=800",
                          "KH_NOTIFY_MAX_ATTEMPTS=3",
                          "KH_NOTIFY_ESCALATE_MS=1000",
                          "KH_NOTIFY_SWEEP_MS=50",
                          "KH_PARTNER_REFRESH_MS=200",
                          "KH_LOG_LEVEL=debug",
                          h_notify,
                          NULL};
    char *intake_env[] = {e_db,
                          e_cert,
                          e_dir,
                          e_schema,
                          e_intake,
                          e_routing,
                          "KH_LOG_LEVEL=debug",
                          h_intake,
                          NULL};
    char *audit_env[] = {e_db,
                         e_key,
                         "KH_AUDIT_POLL_MS=50",
                         "KH_AUDIT_CHECKPOINT_EVERY=20",
                         "KH_AUDIT_CHECKPOINT_MS=300",
                         "KH_LOG_LEVEL=debug",
                         h_audit,
                         NULL};
    pid_t routing =
        s_spawn(KH_TEST_BINARY_DIR "/services/routing/ketenhub-routing",
                "routing.log", routing_env);
    pid_t notify = s_spawn(KH_TEST_BINARY_DIR
                           "/services/notification/ketenhub-notification",
                           "notification.log", notify_env);
    pid_t intake =
        s_spawn(KH_TEST_BINARY_DIR "/services/intake/ketenhub-intake",
                "intake.log", intake_env);
    pid_t audit = s_spawn(KH_TEST_BINARY_DIR "/services/audit/ketenhub-audit",
                          "audit.log", audit_env);
    ck_assert(s_log_has("routing.log", "event=ready", 10000));
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    ck_assert(s_log_has("intake.log", "event=ready", 10000));
    ck_assert(s_log_has("audit.log", "event=ready", 10000));

    /* Veilig Thuis and the zorgcoordinator acknowledge at once; AVIM is
     * away for now. */
    char ep[128], hubcert[600], vt_cert[600], zc_cert[600], avim_cert[600],
        mp_cert[600];
    snprintf(ep, sizeof ep, "--endpoint=%s", s_notify);
    snprintf(hubcert, sizeof hubcert, "--hub-cert=%s", s_path("hub/hub.cert"));
    snprintf(vt_cert, sizeof vt_cert, "--cert=%s",
             s_path("keys/veilig-thuis.cert"));
    snprintf(zc_cert, sizeof zc_cert, "--cert=%s",
             s_path("keys/zorgcoordinator.cert"));
    snprintf(avim_cert, sizeof avim_cert, "--cert=%s",
             s_path("keys/avim.cert"));
    snprintf(mp_cert, sizeof mp_cert, "--cert=%s",
             s_path("keys/meldpunt-hilversum.cert"));
    char *vt_argv[] = {S_PARTNER, ep,      hubcert,         vt_cert,
                       "listen",  "--dir", s_path("in-vt"), NULL};
    char *zc_argv[] = {S_PARTNER, ep,      hubcert,         zc_cert,
                       "listen",  "--dir", s_path("in-zc"), NULL};
    pid_t vt = khproc_spawn(S_PARTNER, vt_argv, NULL, s_path("vt.log"));
    pid_t zc = khproc_spawn(S_PARTNER, zc_argv, NULL, s_path("zc.log"));
    ck_assert_int_gt(vt, 0);
    ck_assert_int_gt(zc, 0);

    /* The examples, each with its canaries. */
    json_t *docs[16];
    size_t ndocs = khtest_examples(docs, 15);
    /* An adult in acute danger with no care needs goes to AVIM alone: its
     * escalation makes a copy for the zorgcoordinator (delivery.created). */
    docs[ndocs] = json_deep_copy(docs[0]);
    json_object_set_new(json_object_get(docs[ndocs], "subject"), "minor",
                        json_false());
    json_object_set_new(json_object_get(docs[ndocs], "risk"), "acute_danger",
                        json_true());
    json_object_set_new(json_object_get(docs[ndocs], "risk"), "urgency",
                        json_string("immediate"));
    json_object_set_new(docs[ndocs], "needs", json_array());
    json_object_del(docs[ndocs], "needs_other");
    ndocs++;
    char *ids[16] = {0};
    char iep[128];
    snprintf(iep, sizeof iep, "--endpoint=%s", s_intake);
    for (size_t i = 0; i < ndocs; i++) {
        s_plant(docs[i], (int) i + 1);
        char name[64];
        snprintf(name, sizeof name, "referral-%zu.json", i);
        ck_assert_int_eq(json_dump_file(docs[i], s_path(name), 0), 0);
        char *answer = NULL;
        int rc = s_run(&answer, S_PARTNER, iep, hubcert, mp_cert, "submit",
                       s_path(name), S_END);
        ck_assert_msg(rc == 0, "submit %s: %s", name, answer);
        ids[i] = s_referral_id(answer);
        free(answer);
    }
    /* A referral that breaks the contract; a key the hub does not know. */
    json_object_set_new(docs[0], "schema_version", json_string("referral.v9"));
    ck_assert_int_eq(json_dump_file(docs[0], s_path("bad.json"), 0), 0);
    ck_assert_int_ne(s_run(NULL, S_PARTNER, iep, hubcert, mp_cert, "submit",
                           s_path("bad.json"), S_END),
                     0);
    ck_assert_int_eq(
        s_run(NULL, S_CTL, "hub", "keygen", "--out", s_path("stranger"), S_END),
        0);
    char stranger[600];
    snprintf(stranger, sizeof stranger, "--cert=%s",
             s_path("stranger/hub.cert"));
    ck_assert_int_ne(s_run(NULL, S_PARTNER, iep, hubcert, stranger,
                           "--timeout=1000", "--retries=0", "submit",
                           s_path("referral-0.json"), S_END),
                     0);
    /* A status request that is not well formed. */
    kh_error_t cerr;
    kh_client_t *client =
        kh_client_new(s_intake, s_path("hub/hub.cert"),
                      s_path("keys/meldpunt-hilversum.cert"), &cerr);
    ck_assert_ptr_nonnull(client);
    json_t *req =
        json_pack("{s:s, s:s}", "cmd", "STATUS", "referral_id", "geen-id");
    json_t *rep = kh_client_request(client, req, 5000, &cerr);
    ck_assert_ptr_nonnull(rep);
    ck_assert_str_eq(kh_client_reply_cmd(rep), "REJECTED");
    json_decref(rep);
    json_decref(req);
    kh_client_destroy(&client);
    /* Rules reloaded, then a broken file refused. */
    kill(routing, SIGHUP);
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'rules.reloaded' AND reason_code IS NULL",
                           1, 5000));
    khtest_write_file(s_path("rules.yaml"), "rules: [\n");
    kill(routing, SIGHUP);
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'rules.reload_failed'",
                           1, 5000));
    khtest_write_file(s_path("rules.yaml"), rules);
    free(rules);
    ck_assert_int_eq(s_run(NULL, S_CTL, "partner", "rotate", "oud-meldpunt",
                           "--cert-dir", s_path("partners"), "--out",
                           s_path("rotated"), S_END),
                     0);
    ck_assert_int_eq(s_run(NULL, S_CTL, "partner", "revoke", "oud-meldpunt",
                           "--cert-dir", s_path("partners"), S_END),
                     0);

    /* Urgent AVIM deliveries wait past the escalation time: escalated,
     * with a copy to the zorgcoordinator. Then AVIM comes and refuses
     * each delivery, first for now, then for good: dead letters. */
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'delivery.created'",
                           1, 15000));
    char script[1024];
    snprintf(script, sizeof script,
             "cat >/dev/null; m=%s/$KH_DELIVERY_ID; if [ -e $m ]; then exit"
             " 3; fi; touch $m; exit 1",
             s_path("marks"));
    char *avim_argv[] = {S_PARTNER, ep,       hubcert, avim_cert,
                         "listen",  "--exec", script,  NULL};
    pid_t avim = khproc_spawn(S_PARTNER, avim_argv, NULL, s_path("avim.log"));
    ck_assert_int_gt(avim, 0);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE partner_id ="
                           " 'avim' AND state = 'dead'",
                           1, 15000));
    ck_assert_int_eq(s_run(NULL, S_CTL, "deadletters", "retry", "--partner",
                           "avim", "--all", S_END),
                     0);
    /* Everything for VT and the zorgcoordinator is acknowledged. */
    ck_assert(s_wait_count(
        "SELECT (count(*) FILTER (WHERE state = 'acknowledged') = count(*)"
        " AND count(*) > 0)::int FROM deliveries WHERE partner_id IN"
        " ('veilig-thuis', 'zorgcoordinator')",
        1, 15000));

    /* Once nothing is in work, an administrator purges every payload: the
     * trail verifies below all the same (only hashes were chained). */
    ck_assert(s_wait_count("SELECT (count(*) = 0)::int FROM deliveries"
                           " WHERE state IN ('pending', 'delivered')",
                           1, 15000));
    char *out = NULL;
    char *now = khtest_db_value(s_db, "SELECT to_char(now() AT TIME ZONE 'UTC',"
                                      " 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')");
    ck_assert_int_eq(s_run(&out, S_CTL, "purge", "--before", now, S_END), 0);
    free(now);
    ck_assert_msg(strstr(out, "purged 0 ") == NULL, "%s", out);
    free(out);
    /* Every routed referral lost its payloads, its deliveries' too, and
     * has exactly one referral.purged event. */
    ck_assert_int_eq(khtest_db_count(s_db, "SELECT count(payload) FROM"
                                           " referrals WHERE state <>"
                                           " 'accepted'"),
                     0);
    ck_assert_int_eq(
        khtest_db_count(s_db, "SELECT count(payload) +"
                              " count(escalation_payload) FROM deliveries"),
        0);
    ck_assert_int_eq(
        khtest_db_count(
            s_db, "SELECT count(*) FROM referrals r WHERE r.state <>"
                  " 'accepted' AND (SELECT count(*) FROM audit_events e"
                  " WHERE e.action = 'referral.purged' AND e.referral_id ="
                  " r.id AND e.payload_hash = r.payload_hash) <> 1"),
        0);

    /* Auditors at work. */
    char aud_pub[600], export_all[600], export_cps[600];
    snprintf(aud_pub, sizeof aud_pub, "--public-key=%s",
             s_path("audit/hub-audit.pub"));
    snprintf(export_all, sizeof export_all, "--out=%s", s_path("export.jsonl"));
    snprintf(export_cps, sizeof export_cps, "--out=%s",
             s_path("checkpoints.jsonl"));
    ck_assert(s_wait_count("SELECT (count(*) = 0)::int FROM audit_events e"
                           " WHERE NOT EXISTS (SELECT 1 FROM audit_seals s"
                           " WHERE s.seq = e.seq)",
                           1, 10000));
    char *all_outputs = strdup("");
    const char *formats[] = {"--format=table", "--format=json", "--format=csv"};
    for (int f = 0; f < 3; f++) {
        ck_assert_int_eq(s_run(&out, S_CTL, "audit", "query", formats[f],
                               "--limit=100000", S_END),
                         0);
        char *joined = NULL;
        ck_assert_int_gt(asprintf(&joined, "%s%s", all_outputs, out), 0);
        free(all_outputs);
        free(out);
        all_outputs = joined;
    }
    /* The checkpoints are published first; the export made later covers
     * them all (the other way round, newer checkpoints would rightly make
     * the export look cut short). */
    ck_assert_int_eq(s_run(&out, S_CTL, "audit", "export", export_cps,
                           "--checkpoints-only", S_END),
                     0);
    free(out);
    ck_assert_int_eq(s_run(&out, S_CTL, "audit", "export", export_all, S_END),
                     0);
    free(out);
    char published[600], file[600];
    snprintf(published, sizeof published, "--published=%s",
             s_path("checkpoints.jsonl"));
    snprintf(file, sizeof file, "--file=%s", s_path("export.jsonl"));
    ck_assert_int_eq(
        s_run(&out, S_CTL, "audit", "verify", aud_pub, published, S_END), 0);
    ck_assert_msg(strstr(out, "intact") != NULL, "%s", out);
    free(out);
    ck_assert_int_eq(
        s_run(&out, S_CTL, "audit", "verify", aud_pub, file, published, S_END),
        0);
    ck_assert_msg(strstr(out, "intact") != NULL, "%s", out);
    free(out);

    /* One referral's whole history in one command: accepted, routed by
     * which rules version, and each of its deliveries sent and
     * acknowledged (or refused, dead, escalated). */
    for (size_t i = 0; i < ndocs; i++) {
        char flag[64];
        snprintf(flag, sizeof flag, "--referral=%s", ids[i]);
        ck_assert_int_eq(
            s_run(&out, S_CTL, "audit", "query", flag, "--format=json", S_END),
            0);
        char *joined = NULL;
        ck_assert_int_gt(asprintf(&joined, "%s%s", all_outputs, out), 0);
        free(all_outputs);
        all_outputs = joined;
        char sql[512];
        snprintf(sql, sizeof sql,
                 "SELECT rules_version FROM deliveries WHERE referral_id ="
                 " '%s' LIMIT 1",
                 ids[i]);
        char *version = khtest_db_value(s_db, sql);
        ck_assert_ptr_nonnull(version);
        char want[256];
        snprintf(want, sizeof want, "\"action\":\"referral.routed\"");
        ck_assert_msg(strstr(out, "\"action\":\"referral.accepted\"") &&
                          strstr(out, want) && strstr(out, version),
                      "history of %s: %s", ids[i], out);
        snprintf(sql, sizeof sql,
                 "SELECT id, state FROM deliveries WHERE referral_id = '%s'",
                 ids[i]);
        PGresult *res = PQexec(s_db, sql);
        ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
        ck_assert_int_gt(PQntuples(res), 0);
        for (int r = 0; r < PQntuples(res); r++) {
            const char *d = PQgetvalue(res, r, 0);
            char line[160];
            snprintf(line, sizeof line, "\"delivery_id\":\"%s\"", d);
            ck_assert_msg(strstr(out, line), "delivery %s missing: %s", d, out);
            if (strcmp(PQgetvalue(res, r, 1), "acknowledged") == 0) {
                /* sent and acked, both naming the delivery */
                int sent = 0, acked = 0;
                for (char *p = strstr(out, line); p; p = strstr(p + 1, line)) {
                    char *start = p;
                    while (start > out && start[-1] != '\n')
                        start--;
                    char *end = strchr(p, '\n');
                    size_t len = end ? (size_t) (end - start) : strlen(start);
                    char *one = strndup(start, len);
                    sent += strstr(one, "delivery.sent") != NULL;
                    acked += strstr(one, "delivery.acked") != NULL;
                    free(one);
                }
                ck_assert_msg(sent >= 1 && acked >= 1,
                              "delivery %s: sent %d acked %d", d, sent, acked);
            }
        }
        PQclear(res);
        free(version);
        free(out);
    }

    /* Every action of the closed list happened. */
    for (int i = 0; kh_trail_actions[i]; i++) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM audit_events WHERE action = '%s'",
                 kh_trail_actions[i]);
        /* A send that never left takes a connection that goes between
         * the commit of its claim and its send: not in a run that goes
         * well (test_notification makes one). */
        if (strcmp(kh_trail_actions[i], "delivery.unsent") == 0)
            continue;
        if (strcmp(kh_trail_actions[i], "trail.verified") == 0 ||
            strcmp(kh_trail_actions[i], "trail.exported") == 0 ||
            strcmp(kh_trail_actions[i], "trail.queried") == 0)
            ck_assert(s_wait_count(sql, 1, 100));
        ck_assert_msg(khtest_db_count(s_db, sql) > 0, "no %s event",
                      kh_trail_actions[i]);
    }
    long unknown = khtest_db_count(
        s_db, "SELECT count(*) FROM audit_events WHERE action NOT IN ("
              "'referral.accepted', 'referral.rejected', 'referral.routed',"
              " 'referral.purged', 'request.rejected',"
              " 'delivery.created', 'delivery.sent', 'delivery.unsent',"
              " 'delivery.acked',"
              " 'delivery.nacked', 'delivery.dead', 'delivery.escalated',"
              " 'delivery.retried', 'rules.reloaded', 'rules.reload_failed',"
              " 'auth.refused', 'partner.added', 'partner.revoked',"
              " 'partner.key_rotated', 'trail.queried', 'trail.exported',"
              " 'trail.verified')");
    ck_assert_int_eq(unknown, 0);

    /* Stop everything (the logs are complete then). */
    ck_assert_int_ge(khproc_stop(avim, SIGTERM, 5000), 0);
    ck_assert_int_ge(khproc_stop(vt, SIGTERM, 5000), 0);
    ck_assert_int_ge(khproc_stop(zc, SIGTERM, 5000), 0);
    ck_assert_int_eq(khproc_stop(intake, SIGTERM, 5000), 0);
    ck_assert_int_eq(khproc_stop(notify, SIGTERM, 5000), 0);
    ck_assert_int_eq(khproc_stop(routing, SIGTERM, 5000), 0);
    ck_assert_int_eq(khproc_stop(audit, SIGTERM, 5000), 0);

    /* No canary anywhere: the trail, the logs, the outputs, the exports. */
    ck_assert_int_gt(s_ncanaries, 20);
    char *trail = khtest_db_value(
        s_db, "SELECT string_agg(t::text, E'\\n' ORDER BY seq) FROM"
              " audit_events t");
    s_no_canary("the trail", trail);
    free(trail);
    const char *files[] = {"routing.log",  "notification.log",
                           "intake.log",   "audit.log",
                           "export.jsonl", "checkpoints.jsonl"};
    for (size_t i = 0; i < sizeof files / sizeof *files; i++) {
        char *text = khtest_read_file(s_path(files[i]));
        s_no_canary(files[i], text);
        free(text);
    }
    s_no_canary("the query outputs", all_outputs);
    free(all_outputs);
    /* ... while the partners did receive them (the test is not blind). */
    ck_assert(khproc_sh("grep -rq Kanarie %s", s_path("in-vt")) == 0 ||
              khproc_sh("grep -rq Kanarie %s", s_path("in-zc")) == 0);

    /* A superuser's edit of one event is found, and named. (One right
     * after a rolled-back seq would be named with the gap before it: an
     * event removed there with its seal reads the same.) */
    char *victim = khtest_db_value(
        s_db, "SELECT min(seq) FROM audit_events e WHERE action ="
              " 'referral.routed' AND EXISTS (SELECT 1 FROM audit_events p"
              " WHERE p.seq = e.seq - 1)");
    ck_assert_ptr_nonnull(victim);
    char sql[256], want[128];
    snprintf(sql, sizeof sql,
             "UPDATE audit_events SET outcome = 'failed' WHERE seq = %s",
             victim);
    PQclear(PQexec(s_db, "ALTER TABLE audit_events DISABLE TRIGGER USER"));
    PQclear(PQexec(s_db, sql));
    PQclear(PQexec(s_db, "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER"
                         " audit_events_no_update_delete"));
    ck_assert_int_eq(s_run(&out, S_CTL, "audit", "verify", aud_pub, S_END), 1);
    snprintf(want, sizeof want, "FIRST PROBLEM at seq %s: altered", victim);
    ck_assert_msg(strstr(out, want), "%s", out);
    free(out);
    free(victim);

    for (size_t i = 0; i < ndocs; i++) {
        json_decref(docs[i]);
        free(ids[i]);
    }
    for (int i = 0; i < s_ncanaries; i++)
        free(s_canaries[i]);
    PQfinish(s_db);
    free(s_conninfo);
    khtest_rmtree(s_dir);
    free(s_dir);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("audit_hub");
    TCase *tc = tcase_create("audit_hub");
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc,
                   a_hub_trail_is_complete_sealed_and_free_of_personal_data);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
