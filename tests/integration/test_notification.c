/*
 * notification against a real PostgreSQL and real CURVE sockets: the real
 * ketenhub-notification binary, deliveries inserted as routing makes
 * them, and partners played by DEALER sockets in this process speaking
 * schemas/protocol.md (section Deliveries).
 */
#include <czmq.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dstore_sql.h"
#include "ketenhub/client.h"
#include "ketenhub/codec.h"
#include "ketenhub/partner.h"
#include "ketenhub/proto.h"
#include "ketenhub/throttle.h"
#include "ketenhub/zap.h"
#include "khpartner.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_notification"

static char s_dir[256];  /* temp dir: certs, logs */
static char *s_conninfo; /* the test database */
static PGconn *s_db;     /* for inserts and checks */
static char s_endpoint[64];
static int s_seq; /* idempotency keys */

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_db, sql);
}

static void s_register(const char *id, const char *kind, bool cases)
{
    khpartner_make(s_db, s_dir, id, kind, cases);
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof s_dir, "/tmp/kh-notification-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    ck_assert_int_eq(khproc_sh("mkdir -p '%s/partners'", s_dir), 0);
    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    s_register("veilig-thuis", "veilig_thuis", true);
    s_register("zorgcoordinator", "zorgcoordinator", true);
    s_register("avim", "police", true);
    snprintf(s_endpoint, sizeof s_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
}

static void s_teardown(void)
{
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khproc_sh("rm -rf '%s'", s_dir);
}

/* A referral and one delivery of it to partner, as routing makes them;
 * created age_ms ago. The delivery id into id (37 bytes). */
static void s_delivery(const char *partner, const char *priority, int age_ms,
                       const char *escalate_to, char *id)
{
    char referral[37], age[32], payload[128], hash[65];
    khtest_routed_referral(s_db, ++s_seq, referral, payload, hash);
    kh_uuid_new(id);
    snprintf(age, sizeof age, "%d", age_ms);
    /* The escalation copy has its own, smaller projection. */
    char copy[128], copy_hash[65];
    snprintf(copy, sizeof copy, "{\"copy\":%d}", s_seq);
    kh_sha256_hex(copy, strlen(copy), copy_hash);
    const char *dparams[] = {id,
                             referral,
                             partner,
                             priority,
                             payload,
                             hash,
                             escalate_to,
                             age,
                             escalate_to ? copy : NULL,
                             escalate_to ? copy_hash : NULL};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalate_to, created_at,"
        " updated_at, escalation_payload, escalation_payload_hash)"
        " VALUES ($1, $2, $3, $4, convert_to($5, 'UTF8'),"
        " decode($6, 'hex'), 'test', $7,"
        " now() - make_interval(secs => $8 / 1000.0), now(),"
        " convert_to($9, 'UTF8'), decode($10, 'hex'))",
        10, dparams);
}

/* The state of delivery id, into state (16 bytes). */
static const char *s_state(const char *id, char *state)
{
    const char *params[] = {id};
    PGresult *res =
        PQexecParams(s_db, "SELECT state FROM deliveries WHERE id = $1", 1,
                     NULL, params, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    ck_assert_int_eq(PQntuples(res), 1);
    snprintf(state, 16, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    return state;
}

/* Start notification with short timers; extra: more NAME=value settings,
 * up to a NULL. */
static pid_t s_start_env(const char *log, char *const extra[])
{
    char env_db[1024], env_cert[600], env_dir[600], env_endpoint[128];
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(env_cert, sizeof env_cert, "KH_HUB_CERT=%s", s_path("hub.cert"));
    snprintf(env_dir, sizeof env_dir, "KH_PARTNER_CERT_DIR=%s",
             s_path("partners"));
    snprintf(env_endpoint, sizeof env_endpoint, "KH_NOTIFY_ENDPOINT=%s",
             s_endpoint);
    char *env[24] = {env_db,
                     env_cert,
                     env_dir,
                     env_endpoint,
                     "KH_NOTIFY_WAKE_ENDPOINT=none",
                     "KH_NOTIFY_ACK_TIMEOUT_MS=400",
                     "KH_NOTIFY_BACKOFF_MAX_MS=800",
                     "KH_NOTIFY_MAX_ATTEMPTS=3",
                     "KH_NOTIFY_ESCALATE_MS=1000",
                     "KH_NOTIFY_SWEEP_MS=50",
                     "KH_NOTIFY_WINDOW=64",
                     "KH_LOG_LEVEL=debug"};
    size_t n = 0;
    while (env[n])
        n++;
    for (size_t i = 0; extra[i]; i++) {
        ck_assert_uint_lt(n, sizeof env / sizeof env[0] - 1);
        env[n++] = extra[i];
    }
    char *argv[] = {"ketenhub-notification", NULL};
    pid_t pid = khproc_spawn(KH_TEST_BINARY_DIR
                             "/services/notification/ketenhub-notification",
                             argv, env, s_path(log));
    ck_assert_int_gt(pid, 0);
    return pid;
}

/* The same with up to three settings (the first NULL ends them). */
static pid_t s_start3(const char *log, const char *extra, const char *extra2,
                      const char *extra3)
{
    char *const env[] = {(char *) extra, (char *) extra2, (char *) extra3,
                         NULL};
    return s_start_env(log, env);
}

static pid_t s_start(const char *log, const char *extra, const char *extra2)
{
    return s_start3(log, extra, extra2, NULL);
}

static void s_stop(pid_t pid)
{
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "notification did not stop cleanly: status %d", status);
}

static bool s_log_has(const char *log, const char *text, int timeout_ms)
{
    return khtest_log_has(s_path(log), text, timeout_ms);
}

/* Whether log's escalation alert for delivery id says what (e.g.
 * "copy=none reason=payload_purged"), within timeout_ms. */
static bool s_alert_says(const char *log, const char *id, const char *what,
                         int timeout_ms)
{
    char head[96];
    snprintf(head, sizeof head, "kind=escalation delivery=%s ", id);
    for (int waited = 0; waited <= timeout_ms; waited += 20) {
        char *text = khtest_read_file(s_path(log));
        const char *line = text ? strstr(text, head) : NULL;
        const char *end = line ? strchr(line, '\n') : NULL;
        const char *at = line ? strstr(line, what) : NULL;
        bool found = at && (!end || at < end);
        free(text);
        if (found)
            return true;
        zclock_sleep(20);
    }
    return false;
}

/* Notification with a back-off far beyond a test's waits, the ACK timeout
 * and silence limit given, ready. */
static pid_t s_start_slow(int ack_timeout_ms, int peer_timeout_ms)
{
    char ack[64], peer[64];
    snprintf(ack, sizeof ack, "KH_NOTIFY_ACK_TIMEOUT_MS=%d", ack_timeout_ms);
    snprintf(peer, sizeof peer, "KH_NOTIFY_PEER_TIMEOUT_MS=%d",
             peer_timeout_ms);
    pid_t pid = s_start3("notification.log", ack,
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000", peer);
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    return pid;
}

static bool s_wait_count(const char *sql, long want, int timeout_ms)
{
    return khtest_wait_count(s_db, sql, want, timeout_ms);
}

/* --- a partner -------------------------------------------------------- */

static zsock_t *s_partner(const char *id)
{
    char name[128];
    snprintf(name, sizeof name, "%s.cert", id);
    zsock_t *dealer =
        khpartner_connect(s_path(name), s_path("hub.cert"), s_endpoint);
    zsock_set_rcvtimeo(dealer, 3000);
    return dealer;
}

static const char *s_str(const json_t *msg, const char *key)
{
    const char *value = json_string_value(json_object_get(msg, key));
    return value ? value : "";
}

/* A partner's DEALER that sets its own routing id (rid, len bytes). */
static zsock_t *s_partner_rid(const char *id, const char *rid, size_t len)
{
    char name[128];
    snprintf(name, sizeof name, "%s.cert", id);
    zsock_t *dealer = khpartner_connect_rid(s_path(name), s_path("hub.cert"),
                                            s_endpoint, rid, len);
    zsock_set_rcvtimeo(dealer, 3000);
    return dealer;
}

/* HELLO with window and wait for WELCOME (DELIVERs that come first are
 * kept back by the caller's next s_recv: none can come before it). */
static void s_hello(zsock_t *sock, int window)
{
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h1");
    json_object_set_new(hello, "window", json_integer(window));
    khpartner_send(sock, hello);
    json_t *reply = khpartner_recv(sock, 5000);
    ck_assert_msg(reply != NULL, "no WELCOME");
    ck_assert_str_eq(s_str(reply, "cmd"), "WELCOME");
    ck_assert_int_eq(json_integer_value(json_object_get(reply, "window")),
                     window);
    json_decref(reply);
}

static void s_answer(zsock_t *sock, const char *delivery_id, const char *nack)
{
    json_t *msg = kh_proto_new(nack ? KH_CMD_NACK : KH_CMD_ACK, delivery_id);
    json_object_set_new(msg, "delivery_id", json_string(delivery_id));
    if (nack)
        json_object_set_new(msg, "reason", json_string(nack));
    khpartner_send(sock, msg);
}

/* The reply to a HELLO on sock, or NULL. */
static json_t *s_hello_reply(zsock_t *sock)
{
    khpartner_send(sock, kh_proto_new(KH_CMD_HELLO, "h2"));
    return khpartner_recv(sock, 3000);
}

/* How often text occurs in the log file named log. */
static int s_log_count(const char *log, const char *text)
{
    return khtest_log_count(s_path(log), text);
}

/* Receive until a message with cmd arrives (DELIVERs on the way are
 * dropped and counted); NULL after timeout_ms. */
static json_t *s_expect(zsock_t *sock, const char *cmd, int timeout_ms)
{
    int64_t deadline = zclock_mono() + timeout_ms;
    while (zclock_mono() < deadline) {
        json_t *msg =
            khpartner_recv(sock, (int) (deadline - zclock_mono()) + 1);
        if (!msg)
            return NULL;
        if (strcmp(s_str(msg, "cmd"), cmd) == 0)
            return msg;
        json_decref(msg);
    }
    return NULL;
}

/* Wait up to timeout_ms for the DELIVER of id on sock, of attempt
 * attempt unless that is 0; fail the test when another comes, or none. */
static void s_expect_delivery(zsock_t *sock, const char *id, int attempt,
                              int timeout_ms)
{
    json_t *msg = s_expect(sock, "DELIVER", timeout_ms);
    ck_assert_msg(msg != NULL, "the DELIVER of %s did not come", id);
    ck_assert_str_eq(s_str(msg, "delivery_id"), id);
    if (attempt)
        ck_assert_int_eq(json_integer_value(json_object_get(msg, "attempt")),
                         attempt);
    json_decref(msg);
}

/* --- tests ------------------------------------------------------------ */

/* An urgent delivery NACKed for a retry, on a partner with a backlog of
 * normal ones that keeps its window full (each ACK frees a place that
 * the next claim fills): once its backoff is over it takes the next place
 * an ACK frees, as the most urgent, rather than wait for the backlog to
 * drain. */
START_TEST(an_urgent_retry_goes_before_a_backlog_that_fills_the_window)
{
    enum { N = 300 };
    char urgent[37], id[37];
    for (int i = 0; i < N; i++)
        s_delivery("avim", "normal", 100000 - i, NULL, id);
    s_delivery("avim", "urgent", 0, NULL, urgent);
    pid_t pid = s_start3("notification.log", "KH_NOTIFY_MAX_ATTEMPTS=10",
                         "KH_NOTIFY_ESCALATE_MS=600000", NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    s_expect_delivery(avim, urgent, 0, 5000);
    json_t *msg;
    s_answer(avim, urgent, "retry");
    int normals = 0;
    bool again = false;
    while (!again && (msg = s_expect(avim, "DELIVER", 5000)) != NULL) {
        char did[37];
        snprintf(did, sizeof did, "%s", s_str(msg, "delivery_id"));
        json_decref(msg);
        again = strcmp(did, urgent) == 0;
        if (!again) {
            normals++;
            zclock_sleep(10); /* the partner stores it */
            s_answer(avim, did, NULL);
        }
    }
    ck_assert_msg(again, "the urgent delivery never came again");
    /* Its backoff (about 400 ms) is some tens of normal deliveries. */
    ck_assert_msg(normals < N / 2, "it came after %d of the %d normal ones",
                  normals, N);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

#define S_BACKLOG 40

START_TEST(offline_backlog_drains_in_order_within_the_window)
{
    /* Deliveries made while avim is offline: ages give the order, two are
     * urgent and one high, and they come first. */
    char ids[S_BACKLOG][37];
    for (int i = 0; i < S_BACKLOG; i++) {
        const char *priority = i == 30 || i == 35 ? "urgent"
                               : i == 20          ? "high"
                                                  : "normal";
        s_delivery("avim", priority, 10000 - i * 10, NULL, ids[i]);
    }
    char other[37];
    s_delivery("zorgcoordinator", "urgent", 20000, NULL, other);
    /* An ACK timeout longer than the test's waits: no re-sends here. */
    pid_t pid = s_start("notification.log", "KH_NOTIFY_ACK_TIMEOUT_MS=10000",
                        "KH_NOTIFY_BACKOFF_MAX_MS=20000");
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zclock_sleep(300);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE state = 'pending'"),
                     S_BACKLOG + 1);

    zsock_t *avim = s_partner("avim");
    s_hello(avim, 8);
    /* The window: exactly 8 come while none is acknowledged. */
    json_t *got[S_BACKLOG];
    int n = 0;
    for (json_t *msg;
         n < S_BACKLOG && (msg = khpartner_recv(avim, n ? 700 : 5000)) != NULL;)
        got[n++] = msg;
    ck_assert_int_eq(n, 8);
    /* Then everything, in order, acknowledging as it comes. */
    const char *want_order[S_BACKLOG];
    int w = 0;
    want_order[w++] = ids[30];
    want_order[w++] = ids[35];
    want_order[w++] = ids[20];
    for (int i = 0; i < S_BACKLOG; i++)
        if (i != 20 && i != 30 && i != 35)
            want_order[w++] = ids[i];
    for (int i = 0; i < S_BACKLOG; i++) {
        if (i >= n) {
            got[n] = s_expect(avim, "DELIVER", 5000);
            ck_assert_msg(got[n] != NULL, "delivery %d did not come", i);
            n++;
        }
        ck_assert_str_eq(s_str(got[i], "cmd"), "DELIVER");
        ck_assert_str_eq(s_str(got[i], "delivery_id"), want_order[i]);
        ck_assert_int_eq(json_integer_value(json_object_get(got[i], "attempt")),
                         1);
        const char *payload = s_str(got[i], "payload");
        char hash[65];
        kh_sha256_hex(payload, strlen(payload), hash);
        ck_assert_str_eq(s_str(got[i], "payload_sha256"), hash);
        s_answer(avim, want_order[i], NULL);
    }
    for (int i = 0; i < S_BACKLOG; i++)
        json_decref(got[i]);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE partner_id"
                           " = 'avim' AND state = 'acknowledged'",
                           S_BACKLOG, 5000));
    /* Each sent once and acknowledged once, in the trail; the other
     * partner's delivery never left. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent' AND partner_id = 'avim'"),
                     S_BACKLOG);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.acked' AND outcome = 'ok'"
                             " AND actor_id = 'avim'"),
                     S_BACKLOG);
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM (SELECT delivery_id FROM audit_events"
                " WHERE action = 'delivery.acked' GROUP BY delivery_id"
                " HAVING count(*) > 1) d"),
        0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE"
                             " partner_id = 'zorgcoordinator' AND state ="
                             " 'pending'"),
                     1);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

START_TEST(ack_twice_changes_once_and_foreign_ack_is_refused)
{
    char mine[37], theirs[37], never_sent[37], unknown[37];
    s_delivery("avim", "normal", 1000, NULL, mine);
    s_delivery("zorgcoordinator", "normal", 1000, NULL, theirs);
    s_delivery("avim", "normal", 1000, NULL, never_sent);
    kh_uuid_new(unknown);
    pid_t pid = s_start("notification.log", "KH_NOTIFY_ACK_TIMEOUT_MS=2000",
                        "KH_NOTIFY_BACKOFF_MAX_MS=4000");
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1); /* only mine is sent (the oldest; same age: either) */
    json_t *msg = s_expect(avim, "DELIVER", 5000);
    ck_assert_ptr_nonnull(msg);
    char sent[37];
    snprintf(sent, sizeof sent, "%s", s_str(msg, "delivery_id"));
    json_decref(msg);
    const char *held = strcmp(sent, mine) == 0 ? never_sent : mine;

    s_answer(avim, sent, NULL);
    msg = s_expect(avim, "ACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "delivery_id"), sent);
    ck_assert(json_is_false(json_object_get(msg, "duplicate")));
    json_decref(msg);
    /* The second ACK: answered, nothing changes. */
    s_answer(avim, sent, NULL);
    msg = s_expect(avim, "ACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert(json_is_true(json_object_get(msg, "duplicate")));
    json_decref(msg);

    /* Another partner's delivery, one never sent, and an unknown id. */
    const char *foreign[] = {theirs, unknown};
    for (int i = 0; i < 2; i++) {
        s_answer(avim, foreign[i], NULL);
        msg = s_expect(avim, "REJECTED", 5000);
        ck_assert_ptr_nonnull(msg);
        ck_assert_str_eq(s_str(msg, "code"), "not_found");
        ck_assert_str_eq(s_str(msg, "path"), "delivery_id");
        json_decref(msg);
    }
    s_answer(avim, theirs, "permanent");
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "not_found");
    json_decref(msg);

    const char *params[] = {sent};
    PGresult *res = PQexecParams(s_db,
                                 "SELECT count(*) FROM audit_events WHERE"
                                 " delivery_id = $1 AND action ="
                                 " 'delivery.acked'",
                                 1, NULL, params, NULL, NULL, 0);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "1");
    PQclear(res);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " outcome = 'refused' AND reason_code ="
                             " 'not_found' AND actor_id = 'avim'"),
                     3);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE"
                             " partner_id = 'zorgcoordinator' AND state ="
                             " 'pending' AND attempts = 0"),
                     1);
    /* The one the window held back went out when the first was
     * acknowledged (s_expect passed over its DELIVER). */
    char state[16];
    ck_assert_str_eq(s_state(held, state), "delivered");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A delivery for avim (its id in id), notification started (*pid, with
 * the settings of env, or none: NULL) and avim connected with window and
 * sent it: avim's socket. */
static zsock_t *s_sent_to_avim_env(char *id, pid_t *pid, char *const env[],
                                   int window)
{
    s_delivery("avim", "normal", 1000, NULL, id);
    *pid = s_start_env("notification.log", env ? env : (char *const[]){NULL});
    zsock_t *avim = s_partner("avim");
    s_hello(avim, window);
    s_expect_delivery(avim, id, 0, 5000);
    return avim;
}

static zsock_t *s_sent_to_avim(char *id, pid_t *pid)
{
    return s_sent_to_avim_env(id, pid, NULL, 1);
}

/* Each ACK refused as not_found is an audit event: a partner refused
 * more often than KH_PARTNER_REFUSALS a second (past 10 s worth) gets
 * throttled refusals without database work for the ids it does not hold,
 * while its ACKs of what it was sent still count. */
START_TEST(a_partner_refused_too_often_is_throttled_before_the_trail)
{
    char mine[37];
    pid_t pid;
    /* A window below the 20 refusals at once (the limit is never less
     * than a window). */
    char *const env[] = {"KH_PARTNER_REFUSALS=2", "KH_NOTIFY_WINDOW=4",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=30000",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000", NULL};
    zsock_t *avim = s_sent_to_avim_env(mine, &pid, env, 4);
    json_t *msg;
    enum { S_PROBES = 60 };
    int64_t start = zclock_mono();
    for (int i = 0; i < S_PROBES; i++) {
        char id[37];
        kh_uuid_new(id);
        s_answer(avim, id, i % 2 ? "permanent" : NULL);
    }
    int not_found = 0, throttled = 0;
    while (not_found + throttled < S_PROBES &&
           (msg = s_expect(avim, "REJECTED", 5000)) != NULL) {
        if (strcmp(s_str(msg, "code"), "not_found") == 0)
            not_found++;
        else {
            ck_assert_str_eq(s_str(msg, "code"), "throttled");
            ck_assert(json_is_true(json_object_get(msg, "retryable")));
            ck_assert_int_ge(
                json_integer_value(json_object_get(msg, "retry_after_ms")), 1);
            throttled++;
        }
        json_decref(msg);
    }
    int64_t elapsed = zclock_mono() - start;
    ck_assert_int_eq(not_found + throttled, S_PROBES);
    ck_assert_int_ge(not_found, 20);
    ck_assert_int_le(not_found, khtest_bucket_max(20, 2, elapsed));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'not_found'"),
                     not_found);
    ck_assert(s_log_has("notification.log", "over=refusals", 1000));
    /* What it was sent it acknowledges as ever. */
    s_answer(avim, mine, NULL);
    msg = s_expect(avim, "ACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert(json_is_false(json_object_get(msg, "duplicate")));
    json_decref(msg);
    char state[16];
    ck_assert_str_eq(s_state(mine, state), "acknowledged");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A partner that ACKs again what it acknowledged (its own retry, after an
 * ACKED it missed) is answered ACKED with duplicate true, and that is no
 * refusal: not even while its refusals are over KH_PARTNER_REFUSALS, when
 * its answers for ids none of its connections holds are refused
 * throttled, does a repeated ACK get anything but its idempotent answer. */
START_TEST(a_repeated_ack_is_no_refusal_even_when_throttled)
{
    char mine[37];
    pid_t pid;
    /* 1 a second, 10 at once (a window is less). */
    char *const env[] = {"KH_PARTNER_REFUSALS=1", "KH_NOTIFY_WINDOW=1",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=30000",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000", NULL};
    zsock_t *avim = s_sent_to_avim_env(mine, &pid, env, 1);
    s_answer(avim, mine, NULL);
    json_t *msg = s_expect(avim, "ACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert(json_is_false(json_object_get(msg, "duplicate")));
    json_decref(msg);

    /* Its refusals used up: 10 not_found, the rest throttled. */
    enum { S_PROBES = 30 };
    for (int i = 0; i < S_PROBES; i++) {
        char id[37];
        kh_uuid_new(id);
        s_answer(avim, id, NULL);
    }
    int throttled = 0;
    for (int i = 0; i < S_PROBES; i++) {
        msg = s_expect(avim, "REJECTED", 5000);
        ck_assert_ptr_nonnull(msg);
        throttled += strcmp(s_str(msg, "code"), "throttled") == 0;
        json_decref(msg);
    }
    ck_assert_int_ge(throttled, 1);
    int refused = s_count("SELECT count(*) FROM audit_events WHERE"
                          " reason_code = 'not_found'");

    /* Its ACK, again and again: each answered as the duplicate it is. */
    enum { S_AGAIN = 12 };
    for (int i = 0; i < S_AGAIN; i++)
        s_answer(avim, mine, NULL);
    for (int i = 0; i < S_AGAIN; i++) {
        msg = khpartner_recv(avim, 5000);
        ck_assert_ptr_nonnull(msg);
        ck_assert_str_eq(s_str(msg, "cmd"), "ACKED");
        ck_assert_str_eq(s_str(msg, "delivery_id"), mine);
        ck_assert(json_is_true(json_object_get(msg, "duplicate")));
        json_decref(msg);
    }
    /* Nothing more in the trail: one acknowledgement, no refusal. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'not_found'"),
                     refused);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'delivery.acked' AND outcome = 'ok'"),
                     1);
    char state[16];
    ck_assert_str_eq(s_state(mine, state), "acknowledged");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* avim ACKs id and gets ACKED (why: the failure message), and id is
 * acknowledged. */
static void s_acked(zsock_t *avim, const char *id, const char *why)
{
    s_answer(avim, id, NULL);
    json_t *msg = s_expect(avim, "ACKED", 5000);
    ck_assert_msg(msg != NULL, "%s", why);
    json_decref(msg);
    char state[16];
    ck_assert_str_eq(s_state(id, state), "acknowledged");
}

/* Make a commit fail when it updated a delivery for which when (over NEW)
 * holds: a deferred constraint trigger, s_refuse, until DROP TRIGGER
 * s_refuse ON deliveries. */
static void s_refuse_commits(const char *when)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "CREATE OR REPLACE FUNCTION s_refuse() RETURNS trigger LANGUAGE"
             " plpgsql AS $$BEGIN RAISE EXCEPTION 'refused at commit'; END$$;"
             " CREATE CONSTRAINT TRIGGER s_refuse AFTER UPDATE ON deliveries"
             " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (%s) EXECUTE"
             " FUNCTION s_refuse()",
             when);
    khtest_db_exec(s_db, sql, 0, NULL);
}

/* An ACK batch commits after PostgreSQL has sent its rows: when that
 * commit fails, nothing was acknowledged, and the partner hears so (to
 * send the ACK again) rather than ACKED. */
START_TEST(an_ack_whose_commit_fails_is_not_acked)
{
    char id[37];
    s_refuse_commits("NEW.state = 'acknowledged'");
    pid_t pid;
    zsock_t *avim = s_sent_to_avim(id, &pid);
    s_answer(avim, id, NULL);
    json_t *msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_msg(msg != NULL, "no REJECTED for an ACK that did not commit");
    ck_assert_str_eq(s_str(msg, "code"), "unavailable");
    json_decref(msg);
    char state[16];
    ck_assert_str_eq(s_state(id, state), "delivered");
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"
                             " WHERE action = 'delivery.acked'"),
                     0);
    /* Sent again once the commit can succeed: acknowledged. */
    khtest_db_exec(s_db, "DROP TRIGGER s_refuse ON deliveries", 0, NULL);
    s_acked(avim, id, "the ACK sent again was refused");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A partner that took a delivery and ACKs it late, after it became a
 * dead letter and an administrator retried it (its attempts start again
 * from 0), has it acknowledged: it was sent, and the partner has it. */
START_TEST(a_late_ack_of_a_retried_dead_letter_counts)
{
    char id[37];
    pid_t pid;
    zsock_t *avim = s_sent_to_avim(id, &pid);
    /* Dead, then retried as deadletters retry does, not yet due. */
    const char *params[] = {id};
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'pending', attempts = 0,"
                   " next_attempt_at = now() + interval '1 hour',"
                   " dead_reason = NULL WHERE id = $1",
                   1, params);
    s_acked(avim, id, "the late ACK was refused");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

START_TEST(unacknowledged_is_resent_with_its_id_then_dead)
{
    char id[37];
    s_delivery("avim", "normal", 0, NULL, id);
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    /* Three attempts (KH_NOTIFY_MAX_ATTEMPTS=3), the same id each time. */
    for (int attempt = 1; attempt <= 3; attempt++) {
        s_expect_delivery(avim, id, attempt, 5000);
        /* Keep the connection alive while waiting. */
        khpartner_send(avim, kh_proto_new(KH_CMD_PING, "p"));
    }
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'dead' AND dead_reason = 'max_attempts'",
                           1, 5000));
    ck_assert(s_log_has("notification.log", "kind=dead_letter", 2000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.dead' AND reason_code ="
                             " 'max_attempts'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     3);
    /* No fourth send. */
    json_t *msg = s_expect(avim, "DELIVER", 1500);
    ck_assert_ptr_null(msg);

    /* An administrator retries it: it comes again, same id, and the ACK
     * ends it. */
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl", "deadletters",
                    "retry", id, NULL};
    char *out = NULL;
    ck_assert_int_eq(khtest_run(argv, &out), 0);
    free(out);
    unsetenv("KH_DATABASE_URL");
    khpartner_send(avim, kh_proto_new(KH_CMD_PING, "p"));
    s_expect_delivery(avim, id, 1, 5000);
    s_answer(avim, id, NULL);
    msg = s_expect(avim, "ACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    json_decref(msg);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE state ="
                             " 'acknowledged'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.retried'"),
                     1);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A revoked partner's deliveries become dead letters: the waiting ones at
 * the next sweep, the one sent to it when its ACK is overdue. Another
 * partner's delivery stays as it was. */
START_TEST(a_revoked_partners_deliveries_become_dead_letters)
{
    char waiting[37], other[37], sent[37], state[16];
    s_delivery("avim", "normal", 0, NULL, waiting);
    s_delivery("zorgcoordinator", "normal", 0, NULL, other);
    s_delivery("avim", "urgent", 0, NULL, sent);
    const char *params[] = {sent};
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'delivered', attempts = 1,"
                   " sent_at = now(), next_attempt_at = now() + '5 s'"
                   " WHERE id = $1",
                   1, params);
    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now() WHERE id = 'avim'",
                   0, NULL);
    pid_t pid = s_start("notification.log", NULL, NULL);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'dead' AND dead_reason = 'partner_revoked'",
                           1, 5000));
    ck_assert_str_eq(s_state(waiting, state), "dead");
    ck_assert_str_eq(s_state(sent, state), "delivered");
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'dead' AND dead_reason = 'partner_revoked'",
                           2, 12000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.dead' AND reason_code ="
                             " 'partner_revoked' AND partner_id = 'avim'"),
                     2);
    ck_assert_str_eq(s_state(sent, state), "dead");
    ck_assert_str_eq(s_state(other, state), "pending");
    s_stop(pid);
}
END_TEST

/* A partner revoked after notification read the registry is sent
 * nothing, even before a sweep has made its deliveries dead letters or
 * notification has read the registry again: the claims themselves leave it
 * out. The registry's notification of the change is lost here (as one is
 * while notification's connection is down); no refresh comes either. */
START_TEST(a_revoked_partner_is_claimed_nothing)
{
    char id[37], state[16];
    s_delivery("avim", "urgent", 0, NULL, id);
    /* No sweep and no registry refresh within the test. */
    pid_t pid = s_start3("notification.log", "KH_NOTIFY_SWEEP_MS=60000",
                         "KH_PARTNER_REFRESH_MS=60000", NULL);
    /* The registry is read right after connecting; then avim is revoked. */
    ck_assert(s_log_has("notification.log", "event=db_connected", 10000));
    zclock_sleep(300);
    khtest_db_exec(s_db,
                   "BEGIN; ALTER TABLE partners DISABLE TRIGGER"
                   " partners_changed; UPDATE partners SET revoked_at = now()"
                   " WHERE id = 'avim'; ALTER TABLE partners ENABLE TRIGGER"
                   " partners_changed; COMMIT",
                   0, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    json_t *msg = s_expect(avim, "DELIVER", 1500);
    ck_assert_msg(msg == NULL, "a revoked partner was sent a delivery");
    ck_assert_str_eq(s_state(id, state), "pending");
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     0);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* Notification with no refresh of the registry and no re-send within a
 * test: only what the registry notifies changes what it knows. */
static pid_t s_start_unhurried(void)
{
    return s_start3("notification.log", "KH_PARTNER_REFRESH_MS=3600000",
                    "KH_NOTIFY_BACKOFF_MAX_MS=60000",
                    "KH_NOTIFY_ACK_TIMEOUT_MS=30000");
}

/* A connection of name (its certificate) with window, once it has been
 * sent the delivery id first: for the caller to close. */
static zsock_t *s_sent_first(const char *name, int window, const char *first)
{
    zsock_t *sock = s_partner(name);
    s_hello(sock, window);
    s_expect_delivery(sock, first, 0, 5000);
    return sock;
}

/* A partner revoked while its connection is open is sent nothing more
 * from the next tick, frame or wake-up on: PostgreSQL tells notification
 * of the change as it commits, long before the refresh of the registry
 * (an hour here) would find it. */
START_TEST(a_revoked_partners_connection_is_forgotten_at_once)
{
    char first[37], second[37];
    s_delivery("avim", "normal", 0, NULL, first);
    pid_t pid = s_start_unhurried();
    zsock_t *avim = s_sent_first("avim", 4, first);

    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now() WHERE id = 'avim'",
                   0, NULL);
    ck_assert(s_log_has("notification.log",
                        "partner=avim peer=127.0.0.1 reason=key_not_admitted",
                        3000));
    s_delivery("avim", "normal", 0, NULL, second);
    json_t *msg = s_expect(avim, "DELIVER", 1000);
    ck_assert_msg(msg == NULL, "a revoked partner was sent a delivery");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A send that committed while its connection went never left the hub:
 * held for another connection of the partner, and none came in time, it
 * gets its attempt back, with a delivery.unsent event, and is pending
 * again (it was the first; its sent_at stays, as after an administrator's
 * retry, which a send that did leave may come before). Here its one attempt
 * allowed: it was a dead letter without ever being sent. The claim is slowed
 * down (a trigger sleeps in it) so that the connection can go while it commits.
 */
START_TEST(a_send_that_never_left_gives_its_attempt_back)
{
    char first[37], state[16];
    s_delivery("avim", "normal", 0, NULL, first);
    khtest_db_exec(s_db,
                   "CREATE FUNCTION kh_test_slow_claim() RETURNS trigger"
                   " LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(1.5);"
                   " RETURN NEW; END $$;"
                   " CREATE TRIGGER kh_test_slow_claim BEFORE UPDATE ON"
                   " deliveries FOR EACH ROW WHEN (OLD.state = 'pending' AND"
                   " NEW.state = 'delivered') EXECUTE FUNCTION"
                   " kh_test_slow_claim()",
                   0, NULL);
    char *env[] = {
        "KH_NOTIFY_ACK_TIMEOUT_MS=4000", "KH_NOTIFY_BACKOFF_MAX_MS=60000",
        "KH_NOTIFY_MAX_ATTEMPTS=1",      "KH_NOTIFY_ESCALATE_MS=600000",
        "KH_PARTNER_REFRESH_MS=3600000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    zsock_destroy(&avim); /* while its claim sleeps */
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE delivery_id = '%s'"
             " AND action = 'delivery.sent'",
             first);
    ck_assert(s_wait_count(sql, 1, 5000));
    khtest_db_exec(s_db,
                   "DROP TRIGGER kh_test_slow_claim ON deliveries;"
                   " DROP FUNCTION kh_test_slow_claim()",
                   0, NULL);
    /* Held 70 % of the ACK timeout, then given back: before the sweep
     * would have made it a dead letter at its ACK timeout (80 % or more
     * of it, with jitter). */
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE delivery_id = '%s'"
             " AND action = 'delivery.unsent' AND outcome = 'ok' AND"
             " reason_code = 'not_sent' AND actor_id = 'notification'",
             first);
    ck_assert_msg(s_wait_count(sql, 1, 8000), "no delivery.unsent; state %s",
                  s_state(first, state));
    ck_assert_str_eq(s_state(first, state), "pending");
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM deliveries WHERE id = '%s' AND attempts ="
             " 0 AND sent_at IS NOT NULL",
             first);
    ck_assert_int_eq(s_count(sql), 1);
    ck_assert(
        s_log_has("notification.log", "event=delivery_unsent delivery=", 100));

    /* Past the time it would have died: the partner gets it, and its ACK
     * counts. */
    zclock_sleep(2000);
    ck_assert_str_eq(s_state(first, state), "pending");
    avim = s_partner("avim");
    s_hello(avim, 4);
    s_expect_delivery(avim, first, 1, 5000);
    s_answer(avim, first, NULL);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           1, 5000));
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A revoked partner's key is refused as such whatever its frame holds, as
 * intake does: a body that does not decode, a message of two frames, a
 * command of another socket; each answer under the frame's cid where it
 * has one, and the refusal in the trail under the key. */
START_TEST(a_revoked_key_is_refused_as_unknown_before_its_frame)
{
    pid_t pid = s_start_unhurried();
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now() WHERE id = 'avim'",
                   0, NULL);
    /* Told of the change as it commits: refused for good from the next
     * frame on, or at most until the registry has been read again. */
    json_t *msg = NULL;
    int64_t until_ms = zclock_mono() + 10000;
    do {
        json_decref(msg);
        khpartner_send(avim, kh_proto_new(KH_CMD_PING, "p1"));
        msg = s_expect(avim, "REJECTED", 3000);
        ck_assert_msg(msg != NULL, "a PING of a revoked partner was answered");
    } while (strcmp(s_str(msg, "code"), "unavailable") == 0 &&
             zclock_mono() < until_ms);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_partner");
    json_decref(msg);

    json_t *submit = kh_proto_new(KH_CMD_SUBMIT, "c-submit");
    json_object_set_new(submit, "bogus", json_true());
    khpartner_send(avim, submit);
    zframe_t *bad = zframe_new("\xc1", 1);
    zframe_send(&bad, avim, 0);
    zmsg_t *two = zmsg_new();
    zmsg_addstr(two, "one");
    zmsg_addstr(two, "two");
    zmsg_send(&two, avim);
    const char *cids[] = {"c-submit", "", ""};
    for (size_t i = 0; i < 3; i++) {
        msg = khpartner_recv(avim, 3000);
        ck_assert_msg(msg != NULL, "frame %zu: no answer", i);
        ck_assert_str_eq(s_str(msg, "cmd"), "REJECTED");
        ck_assert_str_eq(s_str(msg, "code"), "unknown_partner");
        ck_assert_str_eq(s_str(msg, "cid"), cids[i]);
        json_decref(msg);
    }
    zsock_destroy(&avim);
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND origin_service ="
                           " 'notification' AND reason_code ="
                           " 'unknown_partner' AND actor_id LIKE 'key:%'",
                           1, 3000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " origin_service = 'notification' AND"
                             " reason_code <> 'unknown_partner'"),
                     0);
    s_stop(pid);
}
END_TEST

/* A change to the registry that notification cannot read yet (the read
 * waits on a lock past its lock_timeout) leaves the registry as read
 * before stale: until the read succeeds it admits no key, since any may
 * be revoked by now. A frame is refused retryably (the partner sends it
 * again) and not taken: an ACK of a partner revoked meanwhile acknowledges
 * nothing; and no partner is sent anything. Once the read succeeds, the
 * revoked partner is refused for good, and the others are served. */
START_TEST(a_registry_change_not_yet_read_admits_no_key)
{
    char first[37], theirs[37], state[16];
    s_delivery("avim", "normal", 0, NULL, first);
    /* The loop waits for the lock: connections are not silent for it. */
    char *env[] = {"KH_PARTNER_REFRESH_MS=3600000",
                   "KH_NOTIFY_PEER_TIMEOUT_MS=120000",
                   "KH_NOTIFY_BACKOFF_MAX_MS=60000",
                   "KH_NOTIFY_ACK_TIMEOUT_MS=30000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *avim = s_sent_first("avim", 4, first);
    zsock_t *zc = s_partner("zorgcoordinator");
    s_hello(zc, 4);

    PGconn *locker = khtest_revoke_unreadably(s_db, s_conninfo, "avim");
    /* Told of the change, notification waits for the lock in vain, half
     * a second a read (a read a second), not holding up its loop for
     * the session's lock_timeout of 5 s a read. */
    ck_assert(s_log_has("notification.log", "event=partners_unread", 10000));
    zclock_sleep(5000);
    int reads = s_log_count("notification.log", "event=partners_unread");
    ck_assert_msg(reads >= 3, "%d reads in 5 s", reads);
    s_delivery("zorgcoordinator", "normal", 0, NULL, theirs);
    s_answer(avim, first, NULL);
    json_t *msg = s_expect(avim, "REJECTED", 15000);
    json_t *sent = s_expect(zc, "DELIVER", 1000);
    khtest_db_exec(locker, "COMMIT", 0, NULL);
    PQfinish(locker);
    ck_assert_msg(msg != NULL, "the ACK was not refused");
    ck_assert_str_eq(s_str(msg, "code"), "unavailable");
    json_decref(msg);
    ck_assert_str_eq(s_state(first, state), "delivered");
    ck_assert_msg(sent == NULL, "a delivery went out while stale");
    /* Read at last: the zorgcoordinator's goes. */
    s_expect_delivery(zc, theirs, 1, 10000);

    /* Sent again, as a partner does, until the registry is read. */
    int64_t until_ms = zclock_mono() + 10000;
    do {
        zclock_sleep(200);
        s_answer(avim, first, NULL);
        msg = s_expect(avim, "REJECTED", 5000);
        ck_assert_msg(msg != NULL, "the ACK was not refused once read");
        if (strcmp(s_str(msg, "code"), "unavailable") == 0 &&
            zclock_mono() < until_ms) {
            json_decref(msg);
            msg = NULL;
        }
    } while (!msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_partner");
    json_decref(msg);
    ck_assert_str_ne(s_state(first, state), "acknowledged");
    zsock_destroy(&avim);
    zsock_destroy(&zc);
    s_stop(pid);
}
END_TEST

START_TEST(nack_retry_resends_and_nack_permanent_is_dead_at_once)
{
    char retry[37], permanent[37];
    s_delivery("avim", "normal", 2000, NULL, retry);
    s_delivery("avim", "normal", 1000, NULL, permanent);
    pid_t pid = s_start("notification.log", "KH_NOTIFY_ACK_TIMEOUT_MS=2000",
                        "KH_NOTIFY_BACKOFF_MAX_MS=4000");
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    for (int i = 0; i < 2; i++) {
        json_t *msg = s_expect(avim, "DELIVER", 5000);
        ck_assert_ptr_nonnull(msg);
        json_decref(msg);
    }
    s_answer(avim, retry, "retry");
    json_t *msg = s_expect(avim, "NACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert(json_is_false(json_object_get(msg, "dead")));
    json_decref(msg);
    s_answer(avim, permanent, "permanent");
    msg = s_expect(avim, "NACKED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "delivery_id"), permanent);
    ck_assert(json_is_true(json_object_get(msg, "dead")));
    json_decref(msg);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE state ="
                             " 'dead' AND dead_reason = 'nack_permanent'"),
                     1);
    /* The alert names the delivery, its referral, partner and reason, as
     * the sweep's alerts do. */
    char *referral = khtest_db_value(
        s_db, "SELECT referral_id FROM deliveries WHERE state = 'dead'");
    char alert[256];
    snprintf(alert, sizeof alert,
             "kind=dead_letter delivery=%s referral=%s partner=avim"
             " reason=nack_permanent",
             permanent, referral);
    free(referral);
    ck_assert_msg(s_log_has("notification.log", alert, 2000),
                  "no alert line: %s", alert);
    /* The retried one comes again, same id, attempt 2. */
    s_expect_delivery(avim, retry, 2, 5000);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.nacked' AND outcome = 'ok'"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.dead' AND reason_code ="
                             " 'nack_permanent'"),
                     1);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* The escalation partner has the referral already, waiting in its queue
 * at normal priority, and two of the referral's deliveries escalate to it
 * at the same time: it gets a copy of each, urgent, before its own
 * delivery, and each copy says whose acknowledgement is overdue; its own
 * delivery stays as it was. Notification logs in with its service role
 * alone, as the containers run it: it claims, sends, escalates and makes
 * copies with the grants of migrations 021 and 022, reading no referral. */
START_TEST(each_overdue_delivery_gives_its_escalation_partner_a_copy)
{
    khtest_db_exec(s_db,
                   "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE"
                   " rolname = 'kh_test_notification_login') THEN CREATE ROLE"
                   " kh_test_notification_login LOGIN IN ROLE"
                   " ketenhub_notification; END IF; END $$",
                   0, NULL);
    char *conninfo = s_conninfo;
    char login[1400];
    snprintf(login, sizeof login, "%s user=kh_test_notification_login",
             conninfo);
    char urgent[37], zc[37], vt[37];
    s_delivery("avim", "urgent", 0, "zorgcoordinator", urgent);
    kh_uuid_new(zc);
    kh_uuid_new(vt);
    const char *params[] = {urgent, zc, vt};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalate_to,"
        " escalation_payload, escalation_payload_hash)"
        " SELECT $2::uuid, referral_id, 'zorgcoordinator', 'normal', payload,"
        " payload_hash, 'test', NULL, NULL, NULL FROM deliveries WHERE id = $1"
        " UNION ALL"
        " SELECT $3::uuid, referral_id, 'veilig-thuis', 'urgent', payload,"
        " payload_hash, 'test', escalate_to, escalation_payload,"
        " escalation_payload_hash FROM deliveries WHERE id = $1",
        3, params);
    s_conninfo = login;
    pid_t pid = s_start("notification.log", NULL, NULL);
    s_conninfo = conninfo;
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE"
                           " escalated_at IS NOT NULL",
                           2, 5000));
    const char *zc_params[] = {zc};
    PGresult *res = PQexecParams(
        s_db,
        "SELECT priority, escalated_at IS NULL, (SELECT count(*) FROM"
        " deliveries c JOIN deliveries o ON o.id = c.escalation_of WHERE"
        " c.partner_id = 'zorgcoordinator' AND c.priority = 'urgent' AND"
        " c.payload = o.escalation_payload AND c.referral_id ="
        " o.referral_id), (SELECT count(*) FROM audit_events WHERE action ="
        " 'delivery.created' AND reason_code = 'escalation' AND partner_id ="
        " 'zorgcoordinator'), (SELECT count(*) FROM audit_events WHERE"
        " delivery_id = $1) FROM deliveries WHERE id = $1",
        1, NULL, zc_params, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "normal"); /* its own stays */
    ck_assert_str_eq(PQgetvalue(res, 0, 1), "t");
    ck_assert_str_eq(PQgetvalue(res, 0, 2), "2"); /* a copy of each */
    ck_assert_str_eq(PQgetvalue(res, 0, 3), "2"); /* each audited */
    ck_assert_str_eq(PQgetvalue(res, 0, 4), "0");
    PQclear(res);
    ck_assert(s_alert_says("notification.log", urgent,
                           "escalated_to=zorgcoordinator copy=made", 2000));
    ck_assert(s_alert_says("notification.log", vt,
                           "escalated_to=zorgcoordinator copy=made", 2000));
    /* The copies come first, each naming the partner that did not answer
     * and when its wait began; then the partner's own delivery, which
     * names nothing. */
    zsock_t *sock = s_partner("zorgcoordinator");
    s_hello(sock, 8);
    bool named[2] = {false, false};
    for (int i = 0; i < 3; i++) {
        json_t *msg = s_expect(sock, "DELIVER", 5000);
        ck_assert_ptr_nonnull(msg);
        json_t *of = json_object_get(msg, "escalation_of");
        if (i < 2) {
            ck_assert_str_eq(s_str(msg, "priority"), "urgent");
            ck_assert_ptr_nonnull(of);
            const char *who = json_string_value(json_object_get(of, "partner"));
            ck_assert_ptr_nonnull(who);
            named[strcmp(who, "avim") == 0] = true;
            const char *since =
                json_string_value(json_object_get(of, "waiting_since"));
            ck_assert_ptr_nonnull(since);
            ck_assert_int_eq(strlen(since),
                             27); /* ....-..-..T..:..:........Z */
            ck_assert_int_eq(since[26], 'Z');
        } else {
            ck_assert_str_eq(s_str(msg, "delivery_id"), zc);
            ck_assert_ptr_null(of);
        }
        json_decref(msg);
    }
    ck_assert(named[0] && named[1]); /* veilig-thuis and avim */
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* A delivery out on a connection that another notification process makes
 * a dead letter (its sweep got there first: each sweep takes what no
 * other holds) is not answered on that connection, nor re-sent: it frees
 * the window it took once its re-send would be overdue, and the partner
 * gets its next delivery. Here the other process is an UPDATE. */
START_TEST(a_delivery_another_process_gave_up_frees_its_window)
{
    char first[37], second[37];
    s_delivery("avim", "normal", 2000, NULL, first);
    s_delivery("avim", "normal", 1000, NULL, second);
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    s_expect_delivery(avim, first, 0, 5000);
    json_t *msg;
    const char *params[] = {first};
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'dead', dead_reason ="
                   " 'max_attempts' WHERE id = $1",
                   1, params);
    /* BACKOFF_MAX_MS 800 (s_start): its re-send, had it still been out,
     * was due within 1 s. */
    int64_t deadline = zclock_mono() + 6000;
    bool got = false;
    while (!got && zclock_mono() < deadline) {
        khpartner_send(avim, kh_proto_new(KH_CMD_PING, "p"));
        msg = khpartner_recv(avim, 500);
        got = msg && strcmp(s_str(msg, "cmd"), "DELIVER") == 0 &&
              strcmp(s_str(msg, "delivery_id"), second) == 0;
        json_decref(msg);
    }
    ck_assert_msg(got, "the next delivery never came: the window stayed full");
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* The sum of the values of key (as "key=") over log's stats lines. */
static long s_stats_sum(const char *log, const char *key)
{
    char *text = khtest_read_file(s_path(log));
    ck_assert_ptr_nonnull(text);
    long sum = 0;
    size_t len = strlen(key);
    for (const char *line = text; line && *line;) {
        const char *end = strchr(line, '\n');
        if (strstr(line, "event=stats")) {
            for (const char *at = strstr(line, key); at && (!end || at < end);
                 at = strstr(at + 1, key))
                if (at[-1] == ' ' && at[len] == '=')
                    sum += strtol(at + len + 1, NULL, 10);
        }
        line = end ? end + 1 : NULL;
    }
    free(text);
    return sum;
}

/* A NACK of a delivery that is no longer out (a dead letter already)
 * changes nothing and writes nothing: the stats do not count it as NACKed
 * either. */
START_TEST(a_nack_that_changes_nothing_is_not_counted)
{
    char id[37];
    s_delivery("avim", "normal", 0, NULL, id);
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    json_t *msg = s_expect(avim, "DELIVER", 5000);
    ck_assert_ptr_nonnull(msg);
    json_decref(msg);
    for (int i = 0; i < 2; i++) {
        s_answer(avim, id, "permanent");
        msg = s_expect(avim, "NACKED", 5000);
        ck_assert_ptr_nonnull(msg);
        ck_assert(json_is_boolean(json_object_get(msg, "dead")));
        ck_assert(json_boolean_value(json_object_get(msg, "dead")) == (i == 0));
        json_decref(msg);
    }
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.nacked'"),
                     1);
    zsock_destroy(&avim);
    s_stop(pid);
    ck_assert_int_eq(s_stats_sum("notification.log", "nacked"), 1);
    ck_assert_int_eq(s_stats_sum("notification.log", "dead"), 1);
}
END_TEST

/* A delivery that an escalation of a release before migration 020
 * raised to urgent (routed long ago at normal priority) has its own
 * KH_NOTIFY_ESCALATE_MS from the raise (urgent_since) to be acknowledged:
 * it does not escalate at the first sweep, before it could even be sent;
 * once that time has passed unacknowledged, it does. */
START_TEST(a_delivery_raised_to_urgent_escalates_after_its_own_time)
{
    char own[37], zc[37];
    s_delivery("avim", "normal", 0, NULL, own);
    kh_uuid_new(zc);
    const char *params[] = {own, zc};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, created_at, urgent_since)"
        " SELECT $2::uuid, referral_id, 'zorgcoordinator', 'urgent', payload,"
        " payload_hash, 'test', now() - interval '1 hour', now() FROM"
        " deliveries WHERE id = $1",
        2, params);
    /* ESCALATE_MS 1000 (s_start), sweeps every 50 ms. */
    pid_t pid = s_start("notification.log", NULL, NULL);
    /* Unacknowledged a whole ESCALATE_MS after the raise: it escalates. */
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'delivery.escalated' AND reason_code ="
                           " 'ack_overdue' AND partner_id ="
                           " 'zorgcoordinator'",
                           1, 5000));
    /* Not before (however slowly the service started, which a check at a
     * fixed moment could not tell from an escalation too early). */
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE"
                             " partner_id = 'zorgcoordinator' AND priority ="
                             " 'urgent' AND escalated_at >= urgent_since +"
                             " interval '1 second'"),
                     1);
    s_stop(pid);
}
END_TEST

/* Two urgent deliveries of one referral that escalate to each other
 * escalate in the same sweep, each with a copy to the other's partner,
 * and hold up no other overdue urgent delivery. */
START_TEST(urgent_deliveries_escalating_to_each_other_escalate)
{
    char avim[37], zc[37], other[37];
    s_delivery("avim", "urgent", 0, "zorgcoordinator", avim);
    s_delivery("veilig-thuis", "urgent", 0, NULL, other);
    kh_uuid_new(zc);
    const char *params[] = {avim, zc};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalate_to,"
        " escalation_payload, escalation_payload_hash, created_at)"
        " SELECT $2::uuid, referral_id, 'zorgcoordinator', 'urgent',"
        " escalation_payload, escalation_payload_hash, 'test', 'avim',"
        " payload, payload_hash, created_at FROM deliveries WHERE id = $1",
        2, params);
    pid_t pid = s_start("notification.log", NULL, NULL);
    ck_assert_msg(s_wait_count("SELECT count(*) FROM deliveries WHERE"
                               " escalated_at IS NOT NULL AND escalation_of"
                               " IS NULL",
                               3, 5000),
                  "the escalations did not happen");
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries c JOIN"
                             " deliveries o ON o.id = c.escalation_of AND"
                             " o.escalate_to = c.partner_id AND"
                             " c.referral_id = o.referral_id"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.created'"),
                     2);
    ck_assert(!s_log_has("notification.log", "event=db_failed", 0));
    s_stop(pid);
}
END_TEST

/* When an escalation makes no copy, its alert says why, one reason per
 * cause, and the trail has the escalation's own event and no other: no
 * escalation partner in the rules; the escalation partner revoked, or
 * marked as not handling cases since; the escalation payload purged.
 * When it makes one, the alert says so: also when the escalation
 * partner's own delivery of the referral was sent already. */
START_TEST(an_escalation_alert_says_why_no_copy_went_out)
{
    char none[37], revoked[37], purged[37], no_cases[37], sent[37], own[37];
    char made[37];
    s_register("adviseur", "other", true);
    s_register("gemeente", "municipality", true);
    s_delivery("veilig-thuis", "urgent", 0, NULL, none);
    s_delivery("avim", "urgent", 0, "gemeente", revoked);
    s_delivery("avim", "urgent", 0, "zorgcoordinator", purged);
    s_delivery("avim", "urgent", 0, "adviseur", no_cases);
    s_delivery("avim", "urgent", 0, "veilig-thuis", sent);
    s_delivery("veilig-thuis", "urgent", 0, "zorgcoordinator", made);
    /* The escalation partner's own delivery of sent's referral, sent
     * already (out, not acknowledged). */
    kh_uuid_new(own);
    const char *own_params[] = {sent, own};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, state, attempts, sent_at,"
        " next_attempt_at)"
        " SELECT $2::uuid, referral_id, 'veilig-thuis', 'normal', payload,"
        " payload_hash, 'test', 'delivered', 1, now(), now() + interval"
        " '1 hour' FROM deliveries WHERE id = $1",
        2, own_params);
    const char *purged_params[] = {purged};
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET escalation_payload = NULL"
                   " WHERE id = $1",
                   1, purged_params);
    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now() WHERE id ="
                   " 'gemeente'",
                   0, NULL);
    khtest_db_exec(s_db,
                   "UPDATE partners SET handles_cases = false WHERE id ="
                   " 'adviseur'",
                   0, NULL);
    pid_t pid = s_start("notification.log", NULL, NULL);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE"
                           " escalated_at IS NOT NULL",
                           6, 5000));
    ck_assert(s_alert_says("notification.log", none,
                           "escalated_to=none copy=none"
                           " reason=no_escalation_partner",
                           2000));
    ck_assert(s_alert_says("notification.log", revoked,
                           "escalated_to=none copy=none"
                           " reason=partner_revoked"
                           " escalation_partner=gemeente",
                           2000));
    ck_assert(s_alert_says("notification.log", purged,
                           "escalated_to=none copy=none"
                           " reason=payload_purged"
                           " escalation_partner=zorgcoordinator",
                           2000));
    ck_assert(s_alert_says("notification.log", no_cases,
                           "escalated_to=none copy=none"
                           " reason=partner_not_handling_cases"
                           " escalation_partner=adviseur",
                           2000));
    ck_assert(s_alert_says("notification.log", sent,
                           "escalated_to=veilig-thuis copy=made", 2000));
    ck_assert(s_alert_says("notification.log", made,
                           "escalated_to=zorgcoordinator copy=made", 2000));
    /* The trail: six escalations, two copies (sent's and made's). */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.escalated' AND reason_code ="
                             " 'ack_overdue'"),
                     6);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.escalated' AND reason_code <>"
                             " 'ack_overdue'"),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.created'"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"), 9);
    s_stop(pid);
}
END_TEST

/* An urgent delivery that died before anyone acknowledged it (here: its
 * partner was revoked, so it died at the first sweep; a NACK permanent or
 * its last attempt does the same) is not acknowledged within
 * KH_NOTIFY_ESCALATE_MS either: it escalates like one still waiting, and
 * the escalation partner gets its copy. Once: a retry does not escalate
 * it again. */
START_TEST(an_urgent_dead_letter_escalates_too)
{
    char id[37], state[16];
    s_delivery("avim", "urgent", 0, "zorgcoordinator", id);
    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now() WHERE id = 'avim'",
                   0, NULL);
    pid_t pid = s_start("notification.log", NULL, NULL);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'dead' AND dead_reason = 'partner_revoked'",
                           1, 5000));
    ck_assert_msg(s_wait_count("SELECT count(*) FROM deliveries WHERE"
                               " escalated_at IS NOT NULL",
                               1, 5000),
                  "the dead urgent delivery was not escalated");
    ck_assert_str_eq(s_state(id, state), "dead");
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE partner_id"
                           " = 'zorgcoordinator' AND priority = 'urgent'",
                           1, 2000));
    ck_assert(s_log_has("notification.log", "kind=escalation", 2000));
    /* Each change with its event: dead, escalated, the copy made. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.dead' AND partner_id = 'avim'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.escalated' AND partner_id ="
                             " 'avim'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.created' AND reason_code ="
                             " 'escalation' AND partner_id ="
                             " 'zorgcoordinator'"),
                     1);
    zclock_sleep(300);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.escalated'"),
                     1);
    s_stop(pid);
}
END_TEST

START_TEST(overdue_urgent_escalates_with_a_copy_normal_does_not)
{
    char urgent[37], normal[37], plain[37];
    s_delivery("avim", "urgent", 0, "zorgcoordinator", urgent);
    s_delivery("avim", "normal", 0, "zorgcoordinator", normal);
    s_delivery("veilig-thuis", "urgent", 0, NULL, plain);
    pid_t pid = s_start("notification.log", NULL, NULL);
    /* Nobody connected: after KH_NOTIFY_ESCALATE_MS (1 s) both urgent ones
     * escalate; avim's gets a copy to the zorgcoordinator. */
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE"
                           " escalated_at IS NOT NULL",
                           2, 5000));
    ck_assert(s_log_has("notification.log", "kind=escalation", 2000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.escalated'"),
                     2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries d JOIN"
                             " deliveries o ON o.referral_id = d.referral_id"
                             " WHERE d.partner_id = 'zorgcoordinator' AND"
                             " o.partner_id = 'avim' AND o.priority ="
                             " 'urgent' AND d.priority = 'urgent' AND"
                             " d.payload = o.escalation_payload AND"
                             " d.payload_hash = o.escalation_payload_hash AND"
                             " d.payload <> o.payload"),
                     1);
    /* The copy's id is time-ordered like every id the hub makes: version
     * 7, its first 48 bits the time it was made (within a minute). */
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM deliveries WHERE partner_id ="
                " 'zorgcoordinator' AND substring(id::text, 15, 1) = '7'"
                " AND abs(('x' || lpad(replace(left(id::text, 13), '-', ''),"
                " 16, '0'))::bit(64)::bigint - extract(epoch FROM now())"
                " * 1000) < 60000"),
        1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.created' AND reason_code ="
                             " 'escalation' AND partner_id ="
                             " 'zorgcoordinator'"),
                     1);
    zclock_sleep(300);
    const char *params[] = {normal};
    PGresult *res = PQexecParams(s_db,
                                 "SELECT escalated_at IS NULL FROM deliveries"
                                 " WHERE id = $1",
                                 1, NULL, params, NULL, NULL, 0);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "t");
    PQclear(res);
    /* The copy reaches the zorgcoordinator. */
    zsock_t *zc = s_partner("zorgcoordinator");
    s_hello(zc, 4);
    json_t *msg = s_expect(zc, "DELIVER", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "priority"), "urgent");
    json_t *of = json_object_get(msg, "escalation_of");
    ck_assert_str_eq(json_string_value(json_object_get(of, "partner")), "avim");
    json_decref(msg);
    zsock_destroy(&zc);
    s_stop(pid);
}
END_TEST

#define S_RECONNECT_OLD 3
#define S_RECONNECT_NEW 12

/* Receive DELIVERs for up to timeout_ms until all count ids came, ACKing
 * each as it comes (a repeat is ACKed again); the number of distinct ids
 * received. */
static int s_collect(zsock_t *sock, char ids[][37], int count, bool *got,
                     int timeout_ms)
{
    int distinct = 0;
    for (int i = 0; i < count; i++)
        distinct += got[i];
    int64_t deadline = zclock_mono() + timeout_ms;
    while (distinct < count && zclock_mono() < deadline) {
        json_t *msg =
            khpartner_recv(sock, (int) (deadline - zclock_mono()) + 1);
        if (!msg)
            break;
        if (strcmp(s_str(msg, "cmd"), "DELIVER") == 0) {
            const char *id = s_str(msg, "delivery_id");
            for (int i = 0; i < count; i++)
                if (strcmp(ids[i], id) == 0 && !got[i]) {
                    got[i] = true;
                    distinct++;
                }
            s_answer(sock, id, NULL);
        }
        json_decref(msg);
    }
    return distinct;
}

/* Run twice: _i 0, the partner reconnects and then deliveries come
 * (some are claimed for the old connection, still registered); _i 1,
 * deliveries come while the old connection is gone and no other is there
 * (the sends fail and the DELIVERs are held), then the partner
 * reconnects. */
START_TEST(a_partner_that_reconnects_gets_its_deliveries_at_once)
{
    const bool gone_first = _i == 1;
    /* An ACK timeout and a silence limit far beyond the test's waits: only
     * noticing that the old connection is gone can make things prompt. */
    pid_t pid = s_start_slow(30000, 60000);
    char old_ids[S_RECONNECT_OLD][37];
    for (int i = 0; i < S_RECONNECT_OLD; i++)
        s_delivery("avim", "normal", 1000 - i, NULL, old_ids[i]);
    zsock_t *first = s_partner("avim");
    s_hello(first, 8);
    /* All three come; the last one is left unacknowledged. */
    json_t *got[S_RECONNECT_OLD];
    for (int i = 0; i < S_RECONNECT_OLD; i++) {
        got[i] = s_expect(first, "DELIVER", 5000);
        ck_assert_msg(got[i] != NULL, "delivery %d did not come", i);
        ck_assert_str_eq(s_str(got[i], "delivery_id"), old_ids[i]);
        json_decref(got[i]);
    }
    for (int i = 0; i < S_RECONNECT_OLD - 1; i++) {
        s_answer(first, old_ids[i], NULL);
        json_t *acked = s_expect(first, "ACKED", 5000);
        ck_assert_ptr_nonnull(acked);
        json_decref(acked);
    }
    /* The partner's socket goes without a word; ZeroMQ reports it closed
     * and the hub forgets the connection. New deliveries, more than the new
     * connection's window, go to the new one only: none is claimed for the
     * old one, whose routing id another peer may have taken by then. The
     * one left unacknowledged on the old connection comes again on the new
     * one, at once, as its second attempt (the last of the list). */
    zsock_destroy(&first);
    zclock_sleep(200);
    zsock_t *second = NULL;
    if (!gone_first) {
        second = s_partner("avim");
        s_hello(second, 2);
    }
    char want[S_RECONNECT_NEW + 1][37];
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int i = 0; i < S_RECONNECT_NEW; i++)
        s_delivery("avim", "normal", 0, NULL, want[i]);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    if (gone_first) {
        ck_assert(s_log_has("notification.log", "reason=disconnected", 5000));
        second = s_partner("avim");
        s_hello(second, 2);
    }
    char *left = want[S_RECONNECT_NEW];
    snprintf(left, 37, "%s", old_ids[S_RECONNECT_OLD - 1]);
    int64_t started = zclock_mono();
    bool came[S_RECONNECT_NEW + 1] = {false};
    int n = s_collect(second, want, S_RECONNECT_NEW + 1, came, 5000);
    int64_t took = zclock_mono() - started;
    fprintf(stderr, "reconnect: %d of %d deliveries in %" PRId64 " ms\n", n,
            S_RECONNECT_NEW + 1, took);
    for (int i = 0; i <= S_RECONNECT_NEW; i++)
        ck_assert_msg(came[i],
                      "%s %d did not come within 5 s (ACK timeout "
                      "30 s)",
                      i < S_RECONNECT_NEW ? "new delivery"
                                          : "the "
                                            "unacknowledged one",
                      i);
    /* Nothing was sent to the old connection's routing id. */
    ck_assert(s_log_has("notification.log", "reason=disconnected", 0));
    ck_assert(!s_log_has("notification.log", "reason=unreachable", 0));
    ck_assert(!s_log_has("notification.log", "event=delivery_moved", 0));
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           S_RECONNECT_OLD + S_RECONNECT_NEW, 5000));
    /* Each acknowledged once; a send that never left is no attempt: each
     * new delivery went out once, with one delivery.sent. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM (SELECT delivery_id FROM"
                             " audit_events WHERE action = 'delivery.acked'"
                             " AND outcome = 'ok' GROUP BY 1 HAVING"
                             " count(*) = 1) a"),
                     S_RECONNECT_OLD + S_RECONNECT_NEW);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.acked' AND outcome <> 'ok'"),
                     0);
    char sql[512];
    int at_one = 0;
    for (int i = 0; i < S_RECONNECT_NEW; i++) {
        const char *params[] = {want[i]};
        PGresult *res = PQexecParams(
            s_db,
            "SELECT d.attempts, (SELECT count(*) FROM audit_events e WHERE"
            " e.delivery_id = d.id AND e.action = 'delivery.sent')"
            " FROM deliveries d WHERE d.id = $1",
            1, NULL, params, NULL, NULL, 0);
        ck_assert_int_eq(PQntuples(res), 1);
        ck_assert_str_eq(PQgetvalue(res, 0, 0), PQgetvalue(res, 0, 1));
        at_one += strcmp(PQgetvalue(res, 0, 0), "1") == 0;
        PQclear(res);
    }
    ck_assert_int_eq(at_one, S_RECONNECT_NEW);
    snprintf(sql, sizeof sql, "SELECT attempts FROM deliveries WHERE id = '%s'",
             left);
    ck_assert_int_eq(s_count(sql), 2);
    zsock_destroy(&second);
    s_stop(pid);
}
END_TEST

#define S_EACH 6 /* deliveries per partner */

/* Three partners connected when their deliveries come: one claim serves
 * them all, and each gets its own, once, with the right trail. */
START_TEST(partners_connected_together_each_get_their_own)
{
    static const char *partners[] = {"veilig-thuis", "zorgcoordinator", "avim"};
    pid_t pid = s_start("notification.log", "KH_NOTIFY_ACK_TIMEOUT_MS=10000",
                        "KH_NOTIFY_BACKOFF_MAX_MS=20000");
    zsock_t *socks[3];
    for (int p = 0; p < 3; p++) {
        socks[p] = s_partner(partners[p]);
        s_hello(socks[p], 4);
    }
    char ids[3][S_EACH][37];
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int i = 0; i < S_EACH; i++)
        for (int p = 0; p < 3; p++)
            s_delivery(partners[p], i % 3 ? "normal" : "urgent", 1000 - i, NULL,
                       ids[p][i]);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    for (int p = 0; p < 3; p++) {
        bool came[S_EACH] = {false};
        ck_assert_int_eq(s_collect(socks[p], ids[p], S_EACH, came, 5000),
                         S_EACH);
    }
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           3 * S_EACH, 5000));
    /* Nobody got (and ACKed) another partner's delivery, each was sent
     * once, and each sent event names the delivery's own partner. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " outcome <> 'ok'"),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events e JOIN"
                             " deliveries d ON d.id = e.delivery_id WHERE"
                             " e.action = 'delivery.sent' AND e.partner_id ="
                             " d.partner_id AND d.attempts = 1"),
                     3 * S_EACH);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     3 * S_EACH);
    for (int p = 0; p < 3; p++)
        zsock_destroy(&socks[p]);
    s_stop(pid);
}
END_TEST

/* The next hub key served beside the current one (KH_HUB_CERT_NEXT on
 * KH_NOTIFY_ENDPOINT_NEXT): a partner that has moved to it gets its
 * deliveries there and its ACKs count, while another one stays with the
 * current key where it always was. */
START_TEST(the_next_hub_key_is_served_beside_the_current_one)
{
    zcert_t *next = zcert_new();
    zcert_save(next, s_path("hub-next.cert"));
    zcert_destroy(&next);
    char cert[600], endpoint[128], next_endpoint[64];
    snprintf(next_endpoint, sizeof next_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(cert, sizeof cert, "KH_HUB_CERT_NEXT=%s", s_path("hub-next.cert"));
    snprintf(endpoint, sizeof endpoint, "KH_NOTIFY_ENDPOINT_NEXT=%s",
             next_endpoint);
    pid_t pid = s_start("notification.log", cert, endpoint);
    zsock_t *moved = khpartner_connect(s_path("avim.cert"),
                                       s_path("hub-next.cert"), next_endpoint);
    zsock_set_rcvtimeo(moved, 3000);
    zsock_t *stayed = s_partner("veilig-thuis");
    s_hello(moved, 4);
    s_hello(stayed, 4);
    char ids[2][1][37];
    s_delivery("avim", "normal", 0, NULL, ids[0][0]);
    s_delivery("veilig-thuis", "normal", 0, NULL, ids[1][0]);
    bool came[1] = {false};
    ck_assert_int_eq(s_collect(moved, ids[0], 1, came, 5000), 1);
    came[0] = false;
    ck_assert_int_eq(s_collect(stayed, ids[1], 1, came, 5000), 1);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           2, 5000));
    ck_assert(s_log_has("notification.log", "hub_key=next", 0));
    ck_assert(s_log_has("notification.log", "hub_key=current", 0));
    zsock_destroy(&moved);
    zsock_destroy(&stayed);
    s_stop(pid);
}
END_TEST

/* A payload is sent as it is stored, with its hash: bytes that are not
 * text (a NUL, a byte no UTF-8 has) make neither the claims of that
 * partner nor those of the others fail, where converting the payloads to
 * text failed every claim statement, for all partners, at every round. */
START_TEST(a_payload_that_is_not_text_is_sent_as_stored)
{
    char odd[37], other[37];
    s_delivery("avim", "normal", 1000, NULL, odd);
    s_delivery("zorgcoordinator", "normal", 1000, NULL, other);
    const char *params[] = {odd};
    /* A stored payload is never rewritten (022): the test does it
     * anyway, past the trigger that refuses it. */
    khtest_db_exec(s_db,
                   "ALTER TABLE deliveries"
                   " DISABLE TRIGGER deliveries_payload_purge_only",
                   0, NULL);
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET payload = '\\xff007b7d'::bytea,"
                   " payload_hash = sha256('\\xff007b7d'::bytea)"
                   " WHERE id = $1",
                   1, params);
    khtest_db_exec(s_db,
                   "ALTER TABLE deliveries"
                   " ENABLE TRIGGER deliveries_payload_purge_only",
                   0, NULL);
    pid_t pid = s_start("notification.log", "KH_NOTIFY_ACK_TIMEOUT_MS=10000",
                        "KH_NOTIFY_BACKOFF_MAX_MS=20000");
    zsock_t *avim = s_partner("avim");
    zsock_t *zorg = s_partner("zorgcoordinator");
    s_hello(avim, 4);
    s_hello(zorg, 4);

    s_expect_delivery(zorg, other, 0, 5000);

    zsock_set_rcvtimeo(avim, 5000);
    zframe_t *frame = zframe_recv(avim);
    ck_assert_msg(frame != NULL, "the partner of the odd payload got nothing");
    static const char stored[] = {
        (char) 0xa7, 'p',         'a',         'y', 'l', 'o', 'a',
        'd',         (char) 0xa4, (char) 0xff, 0,   '{', '}'};
    ck_assert_ptr_nonnull(
        memmem(zframe_data(frame), zframe_size(frame), stored, sizeof stored));
    ck_assert_ptr_nonnull(
        memmem(zframe_data(frame), zframe_size(frame), odd, strlen(odd)));
    char *hash = khtest_db_value(
        s_db, "SELECT encode(sha256('\\xff007b7d'::bytea), 'hex')");
    ck_assert_ptr_nonnull(
        memmem(zframe_data(frame), zframe_size(frame), hash, strlen(hash)));
    free(hash);
    zframe_destroy(&frame);

    s_answer(avim, odd, NULL);
    s_answer(zorg, other, NULL);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           2, 5000));
    zsock_destroy(&avim);
    zsock_destroy(&zorg);
    s_stop(pid);
}
END_TEST

/* Notification with wake-ups at a free port (into wake) and its health
 * endpoint (into health), no sweep within a test (sweep_ms, and re-sends
 * far later), the largest window, ready. */
static pid_t s_start_waking(char wake[64], char health[64], int sweep_ms)
{
    char env_wake[128], env_health[128], env_sweep[64];
    snprintf(wake, 64, "tcp://127.0.0.1:%d", khproc_free_port());
    snprintf(env_wake, sizeof env_wake, "KH_NOTIFY_WAKE_ENDPOINT=%s", wake);
    snprintf(health, 64, "127.0.0.1:%d", khproc_free_port());
    snprintf(env_health, sizeof env_health, "KH_HEALTH_ENDPOINT=%s", health);
    snprintf(env_sweep, sizeof env_sweep, "KH_NOTIFY_SWEEP_MS=%d", sweep_ms);
    char *const env[] = {env_wake,
                         env_health,
                         env_sweep,
                         "KH_NOTIFY_WINDOW=1024",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=60000",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000",
                         NULL};
    pid_t pid = s_start_env("notification.log", env);
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    return pid;
}

/* A wake-up socket like routing's, to notification's wake endpoint (the
 * NOTIFYs it sends wait for its handshake). */
static zsock_t *s_waker(const char *endpoint)
{
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    ck_assert_ptr_nonnull(hub);
    kh_error_t err;
    zsock_t *push = kh_wake_push_new(hub, endpoint, "wake", &err);
    zcert_destroy(&hub);
    ck_assert_msg(push != NULL, "%s", err.message);
    return push;
}

/* A NOTIFY for count partners, as routing sends it. */
static void s_wake(zsock_t *push, const char *const *partners, size_t count)
{
    json_t *ids = json_array();
    for (size_t i = 0; i < count; i++)
        json_array_append_new(ids, json_string(partners[i]));
    khpartner_send(push, json_pack("{s:i, s:s, s:o}", "v", KH_PROTO_VERSION,
                                   "cmd", "NOTIFY", "partners", ids));
}

/* The claims counted at health once the count stays put for 300 ms (the
 * claims of what came before are done). */
static double s_claims_settled(const char *health)
{
    double last = khtest_metric(health, "delivery_claims_total");
    for (int i = 0; i < 50; i++) {
        zclock_sleep(300);
        double now = khtest_metric(health, "delivery_claims_total");
        if (now == last)
            return now;
        last = now;
    }
    ck_abort_msg("the claims never settled");
    return last;
}

#define S_OVER_SHARE 600 /* more than a third of a claim's 1,024 rows */

/* With wake-ups from routing, three partners with the largest window a
 * partner may ask for get what one wake-up announces from one claim
 * statement (a statement costs PostgreSQL about as much for one partner
 * as for three), and their ACKs start no claim: their last claims found
 * less than their credit, so nothing more is due until a wake-up says
 * so. Run twice: _i 0, a few deliveries each; _i 1, one partner has more
 * than its share of the statement and gets the rest from a second one in
 * the same round, before it has ACKed anything. */
START_TEST(one_claim_serves_a_wake_up_for_three_partners)
{
    int counts[3] = {S_EACH, S_EACH, _i ? S_OVER_SHARE : S_EACH};
    static const char *partners[] = {"veilig-thuis", "zorgcoordinator", "avim"};
    char wake[64], health[64];
    /* No tick within the test: only the wake-up says there is work. */
    pid_t pid = s_start_waking(wake, health, 60000);
    zsock_t *socks[3];
    for (int p = 0; p < 3; p++) {
        socks[p] = s_partner(partners[p]);
        s_hello(socks[p], KH_WINDOW_MAX);
    }
    double before = s_claims_settled(health); /* the HELLOs' */

    char(*ids[3])[37];
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int p = 0; p < 3; p++) {
        ids[p] = calloc((size_t) counts[p], sizeof *ids[p]);
        ck_assert_ptr_nonnull(ids[p]);
        for (int i = 0; i < counts[p]; i++)
            s_delivery(partners[p], "normal", 1000 - i, NULL, ids[p][i]);
    }
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    zsock_t *push = s_waker(wake);
    s_wake(push, partners, 3);

    /* All of them before any ACK: what one round claimed. */
    for (int p = 0; p < 3; p++) {
        int came = 0;
        for (json_t *msg;
             came < counts[p] && (msg = khpartner_recv(socks[p], 2000)) != NULL;
             json_decref(msg))
            came += strcmp(s_str(msg, "cmd"), "DELIVER") == 0;
        ck_assert_int_eq(came, counts[p]);
    }
    for (int p = 0; p < 3; p++) {
        for (int i = 0; i < counts[p]; i++)
            s_answer(socks[p], ids[p][i], NULL);
        free(ids[p]);
    }
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           counts[0] + counts[1] + counts[2], 5000));
    zclock_sleep(300); /* any claim the ACKs would start */
    ck_assert_double_eq(khtest_metric(health, "delivery_claims_total"),
                        before + (_i ? 2 : 1));
    zsock_destroy(&push);
    for (int p = 0; p < 3; p++)
        zsock_destroy(&socks[p]);
    s_stop(pid);
}
END_TEST

/* With wake-ups and no sweep within the test, a partner whose window is
 * full gets the rest as its ACKs free room: its claims took all they
 * asked, so there may be more. Run twice: _i 0, one connection with a
 * window of 4 and 40 deliveries; _i 1, two connections of the partner
 * with windows of 3 and 30 deliveries. */
START_TEST(with_wake_ups_a_full_window_drains_through_acks)
{
    int conns = _i ? 2 : 1, window = _i ? 3 : 4, count = _i ? 30 : 40;
    char wake[64], health[64];
    pid_t pid = s_start_waking(wake, health, 60000);
    zsock_t *socks[2];
    for (int c = 0; c < conns; c++) {
        socks[c] = s_partner("avim");
        s_hello(socks[c], window);
    }
    char ids[40][37];
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int i = 0; i < count; i++)
        s_delivery("avim", "normal", 1000 - i, NULL, ids[i]);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    zsock_t *push = s_waker(wake);
    s_wake(push, (const char *const[]){"avim"}, 1);
    bool got[40] = {false};
    int n = 0;
    for (int64_t deadline = zclock_mono() + 10000;
         n < count && zclock_mono() < deadline;)
        for (int c = 0; c < conns; c++)
            n = s_collect(socks[c], ids, count, got, 100);
    ck_assert_int_eq(n, count);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           count, 5000));
    zsock_destroy(&push);
    for (int c = 0; c < conns; c++)
        zsock_destroy(&socks[c]);
    s_stop(pid);
}
END_TEST

/* With wake-ups, what no wake-up announces (here a delivery made while
 * the partner held another) comes on the partner's next ACK once its last
 * claim is a quarter of a sweep old, well before the sweep. */
START_TEST(with_wake_ups_an_ack_finds_what_no_wake_up_announced)
{
    char wake[64], health[64];
    pid_t pid = s_start_waking(wake, health, 8000);
    zsock_t *sock = s_partner("avim");
    s_hello(sock, 8);
    char first[37], second[37];
    s_delivery("avim", "normal", 0, NULL, first);
    zsock_t *push = s_waker(wake);
    s_wake(push, (const char *const[]){"avim"}, 1);
    s_expect_delivery(sock, first, 0, 3000);
    s_delivery("avim", "normal", 0, NULL, second); /* no wake-up */
    zclock_sleep(2200);                            /* > 8000 / 4 ms */
    int64_t acked = zclock_mono();
    s_answer(sock, first, NULL);
    bool got[1] = {false};
    char ids[1][37];
    snprintf(ids[0], sizeof ids[0], "%s", second);
    ck_assert_int_eq(s_collect(sock, ids, 1, got, 5000), 1);
    /* The sweep comes 8 s after the start, over 5 s after the ACK. */
    ck_assert_msg(zclock_mono() - acked < 2500,
                  "came %" PRId64 " ms after the ACK: the sweep's, not the "
                  "ACK's",
                  zclock_mono() - acked);
    zsock_destroy(&push);
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

START_TEST(two_connections_of_one_partner_both_keep_working)
{
    pid_t pid = s_start_slow(30000, 60000);
    zsock_t *one = s_partner("avim");
    s_hello(one, 2);
    zsock_t *two = s_partner("avim");
    s_hello(two, 2);
    /* One HELLO after the other, from the same address: both stay. */
    s_hello(one, 2);
    char ids[8][37];
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int i = 0; i < 8; i++)
        s_delivery("avim", "normal", 0, NULL, ids[i]);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    /* Neither acknowledges yet: each gets its window of two. */
    json_t *first[2][2];
    zsock_t *socks[2] = {one, two};
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 2; i++) {
            first[c][i] = s_expect(socks[c], "DELIVER", 5000);
            ck_assert_msg(first[c][i] != NULL, "connection %d got %d", c, i);
        }
    ck_assert_ptr_null(khpartner_recv(one, 300));
    ck_assert_ptr_null(khpartner_recv(two, 100));
    /* Then each acknowledges what it got, and all of it comes, on both. */
    bool got[8] = {false};
    for (int c = 0; c < 2; c++)
        for (int i = 0; i < 2; i++) {
            for (int k = 0; k < 8; k++)
                if (strcmp(ids[k], s_str(first[c][i], "delivery_id")) == 0)
                    got[k] = true;
            s_answer(socks[c], s_str(first[c][i], "delivery_id"), NULL);
            json_decref(first[c][i]);
        }
    int64_t deadline = zclock_mono() + 10000;
    int n = 0;
    while (n < 8 && zclock_mono() < deadline) {
        s_collect(one, ids, 8, got, 100);
        n = s_collect(two, ids, 8, got, 100);
    }
    ck_assert_int_eq(n, 8);
    ck_assert(s_wait_count("SELECT count(*) FROM deliveries WHERE state ="
                           " 'acknowledged'",
                           8, 5000));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     8);
    ck_assert(!khtest_log_has(s_path("notification.log"),
                              "event=partner_disconnected", 0));
    zsock_destroy(&one);
    zsock_destroy(&two);
    s_stop(pid);
}
END_TEST

#define S_KILL_COUNT 2000

START_TEST(killed_mid_stream_loses_nothing)
{
    for (int i = 0; i < S_KILL_COUNT; i++) {
        char id[37];
        s_delivery("avim", i % 10 ? "normal" : "high", S_KILL_COUNT - i, NULL,
                   id);
    }
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 32);
    zhashx_t *seen = zhashx_new();
    int received = 0, duplicates = 0;
    bool killed = false;
    int64_t deadline = zclock_mono() + 60000;
    int64_t last_hello = zclock_mono();
    while (zclock_mono() < deadline &&
           s_count("SELECT count(*) FROM deliveries WHERE state ="
                   " 'acknowledged'") < S_KILL_COUNT) {
        for (json_t *msg; (msg = khpartner_recv(avim, 100)) != NULL;) {
            if (strcmp(s_str(msg, "cmd"), "DELIVER") == 0) {
                const char *id = s_str(msg, "delivery_id");
                if (zhashx_lookup(seen, id))
                    duplicates++;
                else
                    zhashx_insert(seen, id, (void *) 1);
                received++;
                s_answer(avim, id, NULL);
            }
            json_decref(msg);
            if (!killed && received >= S_KILL_COUNT / 3) {
                ck_assert_int_eq(khproc_stop(pid, SIGKILL, 5000) & 0x7f,
                                 SIGKILL);
                killed = true;
                pid = s_start("notification2.log", NULL, NULL);
            }
        }
        /* The heartbeat that re-registers after a restart. */
        if (zclock_mono() - last_hello > 500) {
            json_t *hello = kh_proto_new(KH_CMD_HELLO, "h");
            json_object_set_new(hello, "window", json_integer(32));
            khpartner_send(avim, hello);
            last_hello = zclock_mono();
        }
    }
    ck_assert(killed);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE state ="
                             " 'acknowledged'"),
                     S_KILL_COUNT);
    /* Every delivery came, under its own id; repeats only of those ids. */
    ck_assert_int_eq((int) zhashx_size(seen), S_KILL_COUNT);
    ck_assert_int_eq(received, S_KILL_COUNT + duplicates);
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM (SELECT delivery_id FROM audit_events"
                " WHERE action = 'delivery.acked' AND outcome = 'ok'"
                " GROUP BY delivery_id HAVING count(*) > 1) d"),
        0);
    zhashx_destroy(&seen);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

START_TEST(unknown_key_and_bad_frames_are_refused)
{
    pid_t pid = s_start("notification.log", NULL, NULL);
    /* A key outside the partner directory never completes its handshake. */
    zcert_t *stranger = zcert_new();
    zcert_save(stranger, s_path("stranger.cert"));
    zcert_destroy(&stranger);
    zsock_t *sock = s_partner("stranger");
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h");
    khpartner_send(sock, hello);
    ck_assert_ptr_null(khpartner_recv(sock, 1000));
    ck_assert(s_log_has("notification.log", "event=auth_refused", 3000));
    zsock_destroy(&sock);
    /* In the trail, once however often the client retried. */
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND origin_service ="
                           " 'notification' AND outcome = 'refused'",
                           1, 3000));

    zsock_t *avim = s_partner("avim");
    zstr_send(avim, "not messagepack");
    json_t *msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "malformed");
    json_decref(msg);
    /* A frame that does not decode is still answered under its cid, which
     * the partner's client matches replies by: an ACK whose delivery id is
     * bin, not str. */
    static const char ack_bin[] = "\x84\xa1"
                                  "v\x01\xa3"
                                  "cmd\xa3"
                                  "ACK\xa3"
                                  "cid\xa4"
                                  "ab-1\xab"
                                  "delivery_id\xc4\x02"
                                  "xy";
    zframe_t *frame = zframe_new(ack_bin, sizeof ack_bin - 1);
    ck_assert_int_eq(zframe_send(&frame, avim, 0), 0);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unsupported_type");
    ck_assert_str_eq(s_str(msg, "cid"), "ab-1");
    json_decref(msg);
    /* v is checked before anything else: the same frame as version 2,
     * which this version's rules cannot decode, is refused for its
     * version. */
    static const char ack_v2[] = "\x84\xa1"
                                 "v\x02\xa3"
                                 "cmd\xa3"
                                 "ACK\xa3"
                                 "cid\xa4"
                                 "ab-2\xab"
                                 "delivery_id\xc4\x02"
                                 "xy";
    frame = zframe_new(ack_v2, sizeof ack_v2 - 1);
    ck_assert_int_eq(zframe_send(&frame, avim, 0), 0);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_version");
    ck_assert_str_eq(s_str(msg, "path"), "v");
    ck_assert_str_eq(s_str(msg, "cid"), "ab-2");
    json_decref(msg);
    /* A SUBMIT belongs to intake. */
    msg = kh_proto_new(KH_CMD_SUBMIT, "s");
    json_object_set_new(msg, "idempotency_key", json_string("k"));
    json_object_set_new(msg, "referral", json_object());
    khpartner_send(avim, msg);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_command");
    json_decref(msg);
    /* So does one without its fields, and a STATUS without its id: the
     * refusal is for the command, not for a field of it. */
    msg = kh_proto_new(KH_CMD_SUBMIT, "s2");
    khpartner_send(avim, msg);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_command");
    ck_assert_str_eq(s_str(msg, "path"), "cmd");
    ck_assert_str_eq(s_str(msg, "cid"), "s2");
    json_decref(msg);
    msg = kh_proto_new(KH_CMD_STATUS, "s3");
    khpartner_send(avim, msg);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_command");
    ck_assert_str_eq(s_str(msg, "cid"), "s3");
    json_decref(msg);
    /* A NACK without a valid reason, an ACK with a bad id. */
    msg = kh_proto_new(KH_CMD_NACK, "n");
    json_object_set_new(msg, "delivery_id",
                        json_string("00000000-0000-4000-8000-000000000000"));
    json_object_set_new(msg, "reason", json_string("whenever"));
    khpartner_send(avim, msg);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "bad_envelope");
    ck_assert_str_eq(s_str(msg, "path"), "reason");
    json_decref(msg);
    msg = kh_proto_new(KH_CMD_ACK, "a");
    json_object_set_new(msg, "delivery_id", json_string("Robert'); DROP"));
    khpartner_send(avim, msg);
    msg = s_expect(avim, "REJECTED", 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "path"), "delivery_id");
    json_decref(msg);
    /* Still serving. */
    s_hello(avim, 2);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* Whether the test database takes new connections (those made stay). */
static void s_allow_connections(bool allow)
{
    khtest_db_allow_connections(S_DB, allow);
}

/* A database that refuses connections for a while: notification tries
 * again ever more slowly, a warning per attempt that says when the next
 * one comes, not one per sweep (20 a second here, 4 by default: a log
 * flooded for as long as the outage lasts), and connects by itself once
 * it may. */
START_TEST(a_database_away_is_tried_ever_more_slowly)
{
    s_allow_connections(false);
    pid_t pid = s_start("away.log", NULL, NULL);
    bool failed = s_log_has("away.log", "event=db_connect_failed", 10000);
    /* A partner that comes meanwhile cannot be told whether its key is
     * still admitted: it is asked to send its HELLO again. */
    zsock_t *avim = s_partner("avim");
    json_t *refused = s_hello_reply(avim);
    usleep(2000 * 1000);
    int warnings = s_log_count("away.log", "event=db_connect_failed");
    bool early = s_log_has("away.log", "event=ready", 0);
    s_allow_connections(true);
    ck_assert(failed);
    ck_assert_msg(refused != NULL, "no answer to HELLO while away");
    ck_assert_str_eq(s_str(refused, "cmd"), "REJECTED");
    ck_assert_str_eq(s_str(refused, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(refused, "retryable")));
    ck_assert_msg(strstr(s_str(refused, "message"), "same request again"), "%s",
                  s_str(refused, "message"));
    json_decref(refused);
    ck_assert_msg(warnings <= 6, "%d warnings in 2 s: see %s", warnings,
                  s_path("away.log"));
    ck_assert(s_log_has("away.log", "retry_ms=", 0));
    /* Not ready while the database is away (a start script waits for
     * event=ready), ready once it answers. */
    ck_assert_msg(!early, "ready without a database: see %s",
                  s_path("away.log"));
    ck_assert(s_log_has("away.log", "event=db_connected", 10000));
    ck_assert(s_log_has("away.log", "event=ready", 5000));
    s_hello(avim, 4);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* The database goes away and comes back while a partner holds a delivery
 * it has not acknowledged yet: its first ACK afterwards is acknowledged.
 * (Only the connection that found the loss used to be made anew; the idle
 * ACK connection, as lost, refused the first ACKs as unavailable.) */
START_TEST(the_first_ack_after_the_database_was_away_is_acked)
{
    char id[37];
    pid_t pid;
    zsock_t *avim = s_sent_to_avim(id, &pid);
    s_allow_connections(false);
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'ketenhub-notification'",
                   0, NULL);
    bool lost = s_log_has("notification.log", "event=db_connect_failed", 10000);
    s_allow_connections(true);
    ck_assert_msg(lost, "the loss went unnoticed: see %s",
                  s_path("notification.log"));
    /* Connected again: a second db_connected after the first one. */
    for (int i = 0; i < 100; i++) {
        if (s_log_count("notification.log", "event=db_connected") >= 2)
            break;
        zclock_sleep(100);
    }
    ck_assert_int_ge(s_log_count("notification.log", "event=db_connected"), 2);
    s_acked(avim, id, "the first ACK after the outage was refused");
    ck_assert_msg(!s_log_has("notification.log", "during=ack", 0),
                  "an ACK failed: see %s", s_path("notification.log"));
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A key refused at its handshake while the database is away cannot be
 * audited, but it is still logged: the log is then all that says someone
 * knocked. */
START_TEST(a_key_refused_while_the_database_is_away_is_logged)
{
    char *conninfo = s_conninfo;
    s_conninfo = "host=127.0.0.1 port=1 connect_timeout=1";
    pid_t pid = s_start("notification.log", NULL, NULL);
    s_conninfo = conninfo;
    zcert_t *stranger = zcert_new();
    zcert_save(stranger, s_path("stranger.cert"));
    zcert_destroy(&stranger);
    zsock_t *sock = s_partner("stranger");
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h");
    khpartner_send(sock, hello);
    ck_assert_ptr_null(khpartner_recv(sock, 1000));
    ck_assert(s_log_has("notification.log", "event=auth_refused", 3000));
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* Made-up keys, each refused at its handshake, cannot fill the trail nor
 * hold up the loop with a write each: past a burst, their refusals are
 * counted in the log, not audited one by one. */
#define S_MADE_UP_KEYS 150
START_TEST(made_up_keys_at_the_handshake_are_audited_within_a_bound)
{
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 2);
    int64_t elapsed;
    ck_assert_int_eq(khtest_strangers_refused(s_path("hub.cert"), s_endpoint,
                                              S_MADE_UP_KEYS, 60000, &elapsed),
                     S_MADE_UP_KEYS);
    ck_assert(
        s_log_has("notification.log", "event=auth_refusals_unaudited", 5000));
    /* Past the burst, the bucket refills at KH_REFUSAL_RATE while the
     * flood lasts. */
    ck_assert_int_le(
        s_count("SELECT count(*) FROM audit_events WHERE"
                " action = 'auth.refused'"),
        khtest_bucket_max(KH_REFUSAL_BURST, KH_REFUSAL_RATE, elapsed));
    /* The partner is served all the same. */
    s_hello(avim, 2);
    zsock_destroy(&avim);
    s_stop(pid);
    /* Each key's refusal is told once (its retries from the same address
     * within a minute not at all), audited or counted: the count left
     * when the flood stopped, well within 10 s of the last, at the stop. */
    ck_assert_int_eq(khtest_refusals_told(s_path("notification.log")),
                     S_MADE_UP_KEYS);
}
END_TEST

/* A partner that sends bad frames without end is answered each time but
 * cannot fill the hub's log: one line per partner every 10 s. */
START_TEST(bad_frames_without_end_do_not_fill_the_log)
{
    pid_t pid = s_start("notification.log", NULL, NULL);
    zsock_t *avim = s_partner("avim");
    for (int i = 0; i < 50; i++) {
        zstr_send(avim, "not messagepack");
        json_t *msg = s_expect(avim, "REJECTED", 5000);
        ck_assert_ptr_nonnull(msg);
        ck_assert_str_eq(s_str(msg, "code"), "malformed");
        json_decref(msg);
    }
    zsock_destroy(&avim);
    char *log = khtest_read_file(s_path("notification.log"));
    ck_assert_ptr_nonnull(log);
    int lines = 0;
    for (const char *p = log; (p = strstr(p, "event=request_refused")); p++)
        lines++;
    free(log);
    ck_assert_int_ge(lines, 1);
    ck_assert_int_le(lines, 2);
    s_stop(pid);
}
END_TEST

/* VmRSS of pid in KiB. */
static long s_rss_kib(pid_t pid)
{
    long kib = khproc_mem_kib(pid, "VmRSS");
    ck_assert_int_ge(kib, 0);
    return kib;
}

#define S_DRAIN_COUNT 100000
#define S_DRAIN_WINDOW 256
/* Bytes of each delivery's payload: a backlog held in memory would take
 * at least S_DRAIN_COUNT times as many, 100 MiB. */
#define S_DRAIN_PAYLOAD 1000
/* What the allocator may keep beside the baseline whatever the backlog:
 * a run on a busy machine once peaked 17 MiB above it (the heap of
 * glibc's arenas, ZeroMQ's and libpq's buffers grown once), in the steps
 * of a few MiB that no delivery's bytes make. A fraction of what the
 * backlog would take. */
#define S_DRAIN_SLACK_KIB (24 * 1024)

START_TEST(a_large_backlog_drains_with_flat_memory)
{
    char count[16], size[16];
    snprintf(count, sizeof count, "%d", S_DRAIN_COUNT);
    snprintf(size, sizeof size, "%d", S_DRAIN_PAYLOAD);
    const char *params[] = {count, size};
    khtest_db_exec(
        s_db,
        "WITH r AS (INSERT INTO referrals (id, partner_id,"
        " idempotency_key, schema_version, payload, payload_hash, state)"
        " SELECT gen_random_uuid(), 'veilig-thuis', 'bulk-' || g,"
        " 'referral.v1', convert_to(p, 'UTF8'),"
        " sha256(convert_to(p, 'UTF8')), 'routed'"
        " FROM generate_series(1, $1::int) g,"
        " (SELECT '{\"summary\":\"' || repeat('b', $2::int - 14) || '\"}'"
        "  AS p) x"
        " RETURNING id, payload, payload_hash)"
        " INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version)"
        " SELECT gen_random_uuid(), id, 'avim', 'normal', payload,"
        " payload_hash, 'test' FROM r",
        2, params);
    khtest_db_exec(s_db, "VACUUM ANALYZE deliveries", 0, NULL);
#if defined(__SANITIZE_ADDRESS__)
    /* Memory is what is measured: ASan must not hold freed blocks back. */
    char asan[512];
    const char *was = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "%s%squarantine_size_mb=1", was ? was : "",
             was && *was ? ":" : "");
    setenv("ASAN_OPTIONS", asan, 1);
#endif
    /* No re-sends on a slow machine (the ACK timeout is 400 ms unless
     * set): what is measured is the backlog, not a window sent twice. */
    pid_t pid = s_start3("notification.log", "KH_NOTIFY_WINDOW=256",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=60000");
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zsock_t *avim = s_partner("avim");
    s_hello(avim, S_DRAIN_WINDOW);
    /* The baseline: warmed up, with a connected partner and a full window
     * behind it; from then on the backlog must not cost memory. */
    long acked = 0, idle = 0, peak = 0, idle_anon = 0, peak_anon = 0;
    int64_t deadline = zclock_mono() + 240000;
    while (acked < S_DRAIN_COUNT && zclock_mono() < deadline) {
        json_t *msg = khpartner_recv(avim, 1000);
        if (!msg)
            continue;
        const char *cmd = s_str(msg, "cmd");
        if (strcmp(cmd, "DELIVER") == 0)
            s_answer(avim, s_str(msg, "delivery_id"), NULL);
        else if (strcmp(cmd, "ACKED") == 0 &&
                 !json_is_true(json_object_get(msg, "duplicate"))) {
            /* A slow machine may see re-sends: count each delivery once. */
            if (++acked == 2000) {
                idle = peak = s_rss_kib(pid);
                idle_anon = peak_anon = khproc_mem_kib(pid, "RssAnon");
            } else if (acked > 2000 && acked % 1000 == 0) { /* now and then */
                long now = s_rss_kib(pid);
                peak = now > peak ? now : peak;
                now = khproc_mem_kib(pid, "RssAnon");
                peak_anon = now > peak_anon ? now : peak_anon;
            }
        }
        json_decref(msg);
    }
    long now = s_rss_kib(pid);
    peak = now > peak ? now : peak;
    ck_assert_int_eq(acked, S_DRAIN_COUNT);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries WHERE state ="
                             " 'acknowledged'"),
                     S_DRAIN_COUNT);
    /* Within 10 % of the baseline plus the window (a generous 4 KiB for each
     * delivery in it: the frame, its claim row and ZeroMQ's copy) and the
     * allocator's slack. */
    long bound = idle + idle / 10 + S_DRAIN_WINDOW * 4 + S_DRAIN_SLACK_KIB;
#if defined(__SANITIZE_ADDRESS__)
    /* ASan's allocator keeps per-size-class caches and its quarantine:
     * twice the slack, still far below what a backlog held in memory
     * would take. */
    bound += idle / 10 + S_DRAIN_SLACK_KIB;
#endif
    fprintf(stderr,
            "backlog of %d drained: rss after 2000 acks=%ld KiB (anonymous "
            "%ld), peak after=%ld KiB (anonymous %ld), bound=%ld KiB\n",
            S_DRAIN_COUNT, idle, idle_anon, peak, peak_anon, bound);
    ck_assert_msg(peak <= bound,
                  "RSS peaked at %ld KiB (anonymous %ld); idle %ld KiB "
                  "(anonymous %ld), bound %ld KiB",
                  peak, peak_anon, idle, idle_anon, bound);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* count deliveries to avim, each of a referral of its own, acknowledged
 * or pending; then 200 pending ones of priority for avim and the
 * zorgcoordinator; statistics taken. */
static void s_many(int count, bool acknowledged, const char *priority)
{
    char sql[1024];
    snprintf(sql, sizeof sql,
             "WITH r AS (INSERT INTO referrals (id, partner_id,"
             " idempotency_key, schema_version, payload, payload_hash, state)"
             " SELECT gen_random_uuid(), 'veilig-thuis', 'many-' || g,"
             " 'referral.v1', '\\x7b7d', sha256(g::text::bytea), 'routed'"
             " FROM generate_series(1, %d) g RETURNING id)"
             " INSERT INTO deliveries (id, referral_id, partner_id, payload,"
             " payload_hash, rules_version, state, attempts, acked_at)"
             " SELECT gen_random_uuid(), id, 'avim', '\\x7b7d',"
             " sha256(id::text::bytea), 'test', %s FROM r",
             count,
             acknowledged ? "'acknowledged', 1, now()" : "'pending', 0, NULL");
    khtest_db_exec(s_db, sql, 0, NULL);
    for (int i = 0; i < 200; i++) {
        char id[37];
        s_delivery(i % 2 ? "avim" : "zorgcoordinator", priority, 0, NULL, id);
    }
    khtest_db_exec(s_db, "ANALYZE deliveries", 0, NULL);
}

/* A claim can only use the index made for it: without that index no other
 * index serves it, so statistics that make its own index look dear (taken
 * when the queue was empty) cannot send the planner to an index over every
 * open delivery (migrations/006). */
START_TEST(claims_have_no_index_but_their_own)
{
    /* Many closed deliveries and some open ones, statistics taken. */
    s_many(4000, true, "normal");
    static const struct {
        const char *index, *claim;
    } claims[] = {
        {"deliveries_pending_partner_rank_created",
         "SELECT id FROM deliveries WHERE partner_id = 'avim'"
         " AND state = 'pending' AND payload IS NOT NULL"
         " AND next_attempt_at <= now()"
         " ORDER BY priority_rank DESC, created_at LIMIT 100"
         " FOR UPDATE SKIP LOCKED"},
        {"deliveries_delivered_next_attempt",
         "SELECT id FROM deliveries WHERE state = 'delivered'"
         " AND partner_id = 'avim' AND attempts < 10"
         " AND next_attempt_at <= now() ORDER BY next_attempt_at LIMIT 100"
         " FOR UPDATE SKIP LOCKED"},
    };
    for (size_t i = 0; i < sizeof claims / sizeof claims[0]; i++) {
        char *plan = khtest_db_plan(s_db, claims[i].claim);
        ck_assert_msg(strstr(plan, claims[i].index), "%s", plan);
        free(plan);
        char drop[128];
        snprintf(drop, sizeof drop, "DROP INDEX %s", claims[i].index);
        khtest_db_exec(s_db, "BEGIN", 0, NULL);
        khtest_db_exec(s_db, drop, 0, NULL);
        plan = khtest_db_plan(s_db, claims[i].claim);
        khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
        ck_assert_msg(!strstr(plan, "Index"), "another index serves: %s", plan);
        free(plan);
    }
}
END_TEST

/* Whether plan (EXPLAIN's text) reads all deliveries: a seq scan, or a
 * scan of an index over the whole table (one of the names in whole, each
 * followed by a space) with no Index Cond, as the generic plan of a join
 * with a claim's CTE once did. A partial index (the claims' own) may be
 * read whole: it holds the rows of one state only. */
static bool s_walks_all_deliveries(const char *plan, const char *whole)
{
    for (const char *line = plan; line && *line;) {
        const char *end = strchr(line, '\n');
        size_t len = end ? (size_t) (end - line) : strlen(line);
        char node[512];
        snprintf(node, sizeof node, "%.*s", (int) len, line);
        line = end ? end + 1 : NULL;
        if (strstr(node, "Seq Scan on deliveries"))
            return true;
        const char *using = strstr(node, "Scan using ");
        if (!using || !strstr(node, " on deliveries"))
            continue;
        char index[128];
        if (sscanf(using, "Scan using %127s", index) != 1)
            continue;
        strcat(index, " ");
        if (!strstr(whole, index))
            continue;
        /* The node's details come before its first child or sibling. */
        bool cond = false;
        for (const char *next = line; next && *next && !cond;) {
            const char *stop = strchr(next, '\n');
            size_t n = stop ? (size_t) (stop - next) : strlen(next);
            char detail[512];
            snprintf(detail, sizeof detail, "%.*s", (int) n, next);
            if (strstr(detail, "->"))
                break;
            cond = strstr(detail, "Index Cond:") != NULL;
            next = stop ? stop + 1 : NULL;
        }
        if (!cond)
            return true;
    }
    return false;
}

/* Every statement of the service, planned as the service plans it (a
 * generic plan, no seq scans), reaches deliveries through an index
 * condition: none walks the table, however large it or its backlog grows
 * (with a backlog of 200,000, joining a claim's CTE hashed every
 * delivery). */
START_TEST(statements_never_walk_all_deliveries)
{
    s_many(200000, false, "urgent");
    /* The indexes over every row, each name followed by a space. */
    PGresult *names = PQexec(s_db, "SELECT string_agg(indexname || ' ', '')"
                                   " FROM pg_indexes WHERE tablename ="
                                   " 'deliveries' AND indexdef NOT LIKE"
                                   " '% WHERE %'");
    ck_assert_int_eq(PQresultStatus(names), PGRES_TUPLES_OK);
    const char *whole = PQgetvalue(names, 0, 0);
    ck_assert_ptr_nonnull(strstr(whole, "deliveries_pkey "));
    khtest_db_exec(s_db,
                   "SET plan_cache_mode = force_generic_plan;"
                   " SET enable_seqscan = off",
                   0, NULL);
    static const char *const args[S_STATEMENTS] = {
        [S_RESEND] = "'avim', 1024, true, 400, 800, 3, 'x', '{}', '{}', 'k'",
        [S_CLAIM_PENDING] = "'{avim,zorgcoordinator}', '{1024,1024}',"
                            " '{x,y}', 400, 800, '{k,l}'",
        [S_ACK] = "'{00000000-0000-7000-8000-000000000000}', '{avim}',"
                  " '{x}', '{k}'",
        [S_NACK] = "'00000000-0000-7000-8000-000000000000', 'avim', 'x',"
                   " false, 3, 400, 800, 'k'",
        [S_DEAD] = "3, 259200",
        [S_ESCALATE] = "1000",
        [S_DUE] = "'{00000000-0000-7000-8000-000000000000}', 'avim', 3",
        [S_UNSENT] = "'{00000000-0000-7000-8000-000000000000}',"
                     " '{2026-01-01T00:00:00.000000Z}'",
    };
    for (int i = 0; i < S_STATEMENTS; i++) {
        char *plan = khtest_db_plan_prepared(s_db, s_statements[i].name,
                                             *s_statements[i].sql, args[i]);
        ck_assert_msg(!s_walks_all_deliveries(plan, whole),
                      "%s walks deliveries:\n%s", s_statements[i].name, plan);
        free(plan);
    }
    PQclear(names);
}
END_TEST

/* The statements that read sent deliveries, as the service plans them
 * (generic plans, no seq scans), read only their own rows: a NACK and the
 * deliveries of a connection that went away find theirs by key, never
 * through the index of sent deliveries (statistics taken when few were
 * out once made that look cheaper, so that each NACK read every delivery
 * in flight); a re-send reads the overdue range of that index, not all
 * that is in flight for every partner (every connection re-sends at every
 * sweep). */
START_TEST(sent_deliveries_are_read_by_key_or_due_time)
{
    s_many(4000, true, "normal");
    /* Out after the statistics were taken, none of them due. */
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'delivered', acked_at = NULL,"
                   " next_attempt_at = now() + interval '1 hour'"
                   " WHERE id IN (SELECT id FROM deliveries"
                   "  WHERE state = 'acknowledged' LIMIT 2000)",
                   0, NULL);
    khtest_db_exec(s_db,
                   "SET plan_cache_mode = force_generic_plan;"
                   " SET enable_seqscan = off",
                   0, NULL);
    static const struct {
        s_stmt_t stmt;
        const char *args, *want, *unwanted;
    } runs[] = {
        {S_NACK,
         "'00000000-0000-7000-8000-000000000000', 'avim', 'x', false, 3,"
         " 400, 800, 'k'",
         "deliveries_pkey", "deliveries_delivered_next_attempt"},
        {S_DUE, "'{00000000-0000-7000-8000-000000000000}', 'avim', 3",
         "deliveries_pkey", "deliveries_delivered_next_attempt"},
        {S_RESEND, "'avim', 1024, false, 400, 800, 3, 'x', '{}', '{}', 'k'",
         "Index Cond: (next_attempt_at <= now())", "Seq Scan"},
    };
    for (size_t i = 0; i < sizeof runs / sizeof runs[0]; i++) {
        const char *name = s_statements[runs[i].stmt].name;
        char *plan = khtest_db_plan_prepared(
            s_db, name, *s_statements[runs[i].stmt].sql, runs[i].args);
        ck_assert_msg(strstr(plan, runs[i].want) &&
                          !strstr(plan, runs[i].unwanted),
                      "%s:\n%s", name, plan);
        free(plan);
    }
}
END_TEST

/* A re-send with nothing due reads none of the partner's pending
 * deliveries: every connection re-sends at every sweep, and reading the
 * pending ones that would share its credit (up to the whole window) when
 * there was nothing to share it with cost a few per cent of the server's
 * time under load. */
START_TEST(a_resend_with_nothing_due_reads_no_pending_delivery)
{
    s_many(2000, false, "normal");
    khtest_db_exec(s_db,
                   "SET plan_cache_mode = force_generic_plan;"
                   " SET enable_seqscan = off",
                   0, NULL);
    free(khtest_db_plan_prepared(
        s_db, s_statements[S_RESEND].name, *s_statements[S_RESEND].sql,
        "'avim', 1024, false, 400, 800, 3, 'x', '{}', '{}', 'k'"));
    char *key = khtest_db_value(
        s_db, "SELECT curve_public_key FROM partners WHERE id = 'avim'");
    char execute[256];
    snprintf(execute, sizeof execute,
             "(ANALYZE, TIMING OFF) EXECUTE resend('avim', 1024, false, 400,"
             " 800, 3, 'x', '{}', '{}', '%s')",
             key);
    free(key);
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    char *plan = khtest_db_plan(s_db, execute);
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
    const char *scan = strstr(plan, "deliveries_pending_partner_rank_created");
    ck_assert_ptr_nonnull(scan);
    const char *eol = strchr(scan, '\n');
    const char *never = strstr(scan, "(never executed)");
    ck_assert_msg(never && (!eol || never < eol), "the re-send read %.*s",
                  eol ? (int) (eol - scan) : (int) strlen(scan), scan);
    free(plan);
}
END_TEST

/* A claim of a window of rows compares each with only the few requests
 * of its statement, and an ACK batch joins no CTEs row by row. The
 * planner cannot index a CTE, and a generic plan made on statistics that
 * knew no pending delivery expects a row or two of each: matched by id
 * against the pending rows, every claimed row was compared with every
 * pending one, a million comparisons, twice, for a claim of 1,024 (0.3 s
 * here, up to 0.8 s under load, which let a hub at 1,000/s fall seconds
 * behind). */
START_TEST(batch_statements_join_no_ctes_row_by_row)
{
    s_many(4000, true, "normal");
    /* Statistics that know no pending delivery, then a batch of them. */
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'acknowledged', attempts = 1,"
                   " acked_at = now() WHERE state = 'pending';"
                   " ANALYZE deliveries;"
                   " UPDATE deliveries SET state = 'pending', attempts = 0,"
                   " acked_at = NULL WHERE id IN (SELECT id FROM deliveries"
                   "  WHERE partner_id = 'avim' LIMIT 1024)",
                   0, NULL);
    khtest_db_exec(s_db, "SET plan_cache_mode = force_generic_plan", 0, NULL);
    char *plan = khtest_db_plan_prepared(
        s_db, s_statements[S_ACK].name, *s_statements[S_ACK].sql,
        "'{00000000-0000-7000-8000-000000000000}', '{avim}', '{x}', '{k}'");
    ck_assert_msg(!strstr(plan, "Join Filter"), "ack:\n%s", plan);
    free(plan);
    free(khtest_db_plan_prepared(s_db, s_statements[S_CLAIM_PENDING].name,
                                 *s_statements[S_CLAIM_PENDING].sql,
                                 "'{avim}', '{1024}', '{x}', 400, 800,"
                                 " '{k}'"));
    char *key = khtest_db_value(
        s_db, "SELECT curve_public_key FROM partners WHERE id = 'avim'");
    /* With a second request, on a key that admits no partner. */
    char execute[256];
    snprintf(execute, sizeof execute,
             "EXECUTE claim_pending('{avim,zorgcoordinator}', '{1024,1}',"
             " '{x,y}', 400, 800, '{\"%s\",none}')",
             key);
    free(key);
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    char analyze[320];
    snprintf(analyze, sizeof analyze, "(ANALYZE, TIMING OFF) %s", execute);
    plan = khtest_db_plan(s_db, analyze);
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
    /* The whole batch is claimed, and the rows a join compared in vain
     * are fewer than the rows. */
    ck_assert_msg(strstr(plan, "rows=1024 loops=1"), "%s", plan);
    long compared = 0;
    for (const char *at = plan;
         (at = strstr(at, "Rows Removed by Join Filter: ")) != NULL;)
        compared += strtol(at += 29, NULL, 10);
    ck_assert_msg(compared < 1024, "%ld rows compared in vain:\n%s", compared,
                  plan);
    free(plan);
    /* The request not admitted has one row, of NULLs, after the others'. */
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    PGresult *res = PQexec(s_db, execute);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK, "%s",
                  PQresultErrorMessage(res));
    ck_assert_int_eq(PQntuples(res), 1025);
    for (int row = 0; row < 1025; row++) {
        ck_assert_str_eq(PQgetvalue(res, row, 0), row < 1024 ? "1" : "2");
        ck_assert_int_eq(PQgetisnull(res, row, 1), row == 1024);
    }
    PQclear(res);
    khtest_db_exec(s_db, "ROLLBACK", 0, NULL);
}
END_TEST

/* A connection of its own to the test database, with stmt prepared,
 * planned as over a table of many deliveries (no seq scans: a handful of
 * rows would be read in the order they were written). */
static PGconn *s_connect_prepared(s_stmt_t stmt)
{
    PGconn *conn = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(conn), CONNECTION_OK);
    khtest_db_exec(conn, "SET enable_seqscan = off", 0, NULL);
    PGresult *res = PQprepare(conn, s_statements[stmt].name,
                              *s_statements[stmt].sql, 0, NULL);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s",
                  PQresultErrorMessage(res));
    PQclear(res);
    return conn;
}

/* Wait until conn's backend waits for a lock. */
static void s_waits_for_lock(PGconn *conn)
{
    char sql[160];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity WHERE pid = %d"
             " AND wait_event_type = 'Lock'",
             PQbackendPID(conn));
    ck_assert_msg(khtest_wait_count(s_db, sql, 1, 10000),
                  "backend %d never waited for a lock", PQbackendPID(conn));
}

/* The SQLSTATE of the statement sent on conn ("" when it succeeded), into
 * state (6 bytes); its rows' first column, in order, into outcomes. */
static void s_statement_end(PGconn *conn, char *state, char *outcomes,
                            size_t size)
{
    *state = *outcomes = '\0';
    PGresult *res;
    while ((res = PQgetResult(conn)) != NULL) {
        if (PQresultStatus(res) == PGRES_TUPLES_OK)
            for (int i = 0; i < PQntuples(res); i++)
                snprintf(outcomes + strlen(outcomes), size - strlen(outcomes),
                         "%s ", PQgetvalue(res, i, 0));
        else if (PQresultErrorField(res, PG_DIAG_SQLSTATE))
            snprintf(state, 6, "%s", PQresultErrorField(res, PG_DIAG_SQLSTATE));
        PQclear(res);
    }
}

/* Statement a then statement b (each with its parameters, up to a NULL),
 * sent on
 * connections of their own while a third transaction holds delivery
 * held: b is sent once a waits for a lock, the holder commits once b
 * does. Their SQLSTATEs ("" for success) into state_a and state_b, their
 * rows' first columns into out_a and out_b (100 bytes each). Taking their
 * deliveries in different orders, the first to wait then holds one the
 * other has taken before it and waits for one the other holds: the
 * deadlock is certain, not a matter of timing. */
static void s_race(const char *held, s_stmt_t a, const char *const *pa,
                   s_stmt_t b, const char *const *pb, char *state_a,
                   char *state_b, char *out_a, char *out_b)
{
    PGconn *holder = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(holder), CONNECTION_OK);
    khtest_db_exec(holder, "BEGIN", 0, NULL);
    khtest_db_exec(holder, "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
                   1, &held);
    PGconn *one = s_connect_prepared(a), *two = s_connect_prepared(b);
    int na = 0, nb = 0;
    while (pa[na])
        na++;
    while (pb[nb])
        nb++;
    ck_assert(
        PQsendQueryPrepared(one, s_statements[a].name, na, pa, NULL, NULL, 0));
    s_waits_for_lock(one);
    ck_assert(
        PQsendQueryPrepared(two, s_statements[b].name, nb, pb, NULL, NULL, 0));
    s_waits_for_lock(two);
    khtest_db_exec(holder, "COMMIT", 0, NULL);
    s_statement_end(one, state_a, out_a, 100);
    s_statement_end(two, state_b, out_b, 100);
    PQfinish(one);
    PQfinish(two);
    PQfinish(holder);
}

/* avim's key three times, an array's text for an ACK batch of three. */
static void s_avim_keys(char *keys, size_t size)
{
    char *key = khtest_db_value(
        s_db, "SELECT curve_public_key FROM partners WHERE id = 'avim'");
    snprintf(keys, size, "{\"%s\",\"%s\",\"%s\"}", key, key, key);
    free(key);
}

/* Three deliveries to avim, sent, their ids in ascending order in ids;
 * sent in the order of order (indexes into ids), so that they lie in
 * the table in that order. */
static void s_sent_three(char ids[3][37], const int order[3])
{
    for (int i = 0; i < 3; i++)
        s_delivery("avim", "normal", 0, NULL, ids[i]);
    qsort(ids, 3, sizeof ids[0], (int (*)(const void *, const void *)) strcmp);
    for (int i = 0; i < 3; i++) {
        const char *params[] = {ids[order[i]]};
        /* A new version of the row (its indexed columns change), at the
         * end of the table. */
        khtest_db_exec(s_db,
                       "UPDATE deliveries SET state = 'delivered',"
                       " attempts = 1, sent_at = now(),"
                       " next_attempt_at = now() + '1 hour' WHERE id = $1",
                       1, params);
    }
}

/* Two ACK batches of the same deliveries in opposite orders, side by side
 * (two replicas, a partner answering on a connection to each, or a
 * re-sent delivery ACKed twice): each takes its deliveries in the order of
 * the deliveries' ids, whatever the order of its requests, so they never
 * deadlock (SQLSTATE 40P01, which made the partner send its ACKs again).
 * Taking them in the requests' order, the first batch held the smallest
 * and waited for the middle one, which the second held. */
START_TEST(ack_batches_in_opposite_orders_do_not_deadlock)
{
    char ids[3][37];
    s_sent_three(ids, (const int[]){0, 1, 2});
    /* The smallest, the largest, the middle id; and the other way. */
    char first[200], second[200];
    snprintf(first, sizeof first, "{%s,%s,%s}", ids[0], ids[2], ids[1]);
    snprintf(second, sizeof second, "{%s,%s,%s}", ids[1], ids[2], ids[0]);
    char keys[160];
    s_avim_keys(keys, sizeof keys);
    const char *p1[] = {first, "{avim,avim,avim}", "{a,a,a}", keys, NULL};
    const char *p2[] = {second, "{avim,avim,avim}", "{b,b,b}", keys, NULL};
    char state1[6], state2[6], out1[100], out2[100];
    s_race(ids[2], S_ACK, p1, S_ACK, p2, state1, state2, out1, out2);
    ck_assert_msg(!*state1 && !*state2, "SQLSTATE %s and %s", state1, state2);
    /* One batch acknowledged all three, the other found them done. */
    ck_assert_str_eq(out1, "done done done ");
    ck_assert_str_eq(out2, "duplicate duplicate duplicate ");
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE state = 'acknowledged'"),
                     3);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"
                             " WHERE action = 'delivery.acked'"
                             " AND outcome = 'ok'"),
                     3);
}
END_TEST

/* The deliveries of a connection that went away made due at once, while
 * an ACK batch of the same deliveries runs: both take them by id, so
 * neither deadlocks. Read from a bitmap of them, in the table's order
 * (here the reverse of the ids'), the deliveries made due were taken
 * largest first. */
START_TEST(an_ack_batch_and_deliveries_made_due_do_not_deadlock)
{
    char ids[3][37];
    s_sent_three(ids, (const int[]){2, 1, 0});
    char all[200];
    snprintf(all, sizeof all, "{%s,%s,%s}", ids[0], ids[1], ids[2]);
    char keys[160];
    s_avim_keys(keys, sizeof keys);
    const char *pack[] = {all, "{avim,avim,avim}", "{a,a,a}", keys, NULL};
    const char *pdue[] = {all, "avim", "3", NULL};
    char state1[6], state2[6], out1[100], out2[100];
    /* Bitmap scans (s_connect_prepared turns seq scans off), as for a
     * batch among many deliveries. */
    setenv("PGOPTIONS", "-c enable_indexscan=off", 1);
    s_race(ids[1], S_ACK, pack, S_DUE, pdue, state1, state2, out1, out2);
    unsetenv("PGOPTIONS");
    ck_assert_msg(!*state1 && !*state2, "SQLSTATE %s and %s", state1, state2);
    ck_assert_str_eq(out1, "done done done ");
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE state = 'acknowledged'"),
                     3);
}
END_TEST

/* A transaction of its own that holds delivery id locked. */
static PGconn *s_hold(const char *id)
{
    PGconn *holder = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(holder), CONNECTION_OK);
    khtest_db_exec(holder, "BEGIN", 0, NULL);
    khtest_db_exec(holder, "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
                   1, &id);
    return holder;
}

/* Wait until another backend waits for holder's lock. */
static void s_blocked_by(PGconn *holder)
{
    char sql[200];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity"
             " WHERE %d = ANY (pg_blocking_pids(pid))",
             PQbackendPID(holder));
    ck_assert_msg(khtest_wait_count(s_db, sql, 1, 10000),
                  "nothing waited for backend %d", PQbackendPID(holder));
}

/* A round's NACKs take their deliveries in the order of their ids, as
 * ACK batches (and other replicas' rounds) do, whatever the order they
 * came in: taken in that order, two replicas NACKing the same deliveries,
 * or a round NACKing what an ACK batch acknowledges, could each hold one
 * the other waits for. Deterministic: a first round waits for a delivery
 * a test transaction holds while the partner NACKs two more, the larger
 * id first; the next round reads both and waits for the smaller, which
 * another test transaction holds. Meanwhile the larger is not locked. */
START_TEST(a_rounds_nacks_take_their_deliveries_by_id)
{
    char ids[3][37];
    s_sent_three(ids, (const int[]){0, 1, 2});
    PGconn *first = s_hold(ids[2]), *second = s_hold(ids[0]);
    pid_t pid = s_start("notification.log", NULL, NULL);
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    s_answer(avim, ids[2], "retry");
    s_blocked_by(first);
    s_answer(avim, ids[1], "retry");
    s_answer(avim, ids[0], "retry");
    zclock_sleep(300); /* both are there when the round ends */
    khtest_db_exec(first, "COMMIT", 0, NULL);
    s_blocked_by(second);
    const char *larger[] = {ids[1]};
    PGresult *res = PQexecParams(s_db,
                                 "SELECT 1 FROM deliveries WHERE id = $1"
                                 " FOR UPDATE NOWAIT",
                                 1, NULL, larger, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK,
                  "the round holds the larger id: %s",
                  PQresultErrorMessage(res));
    PQclear(res);
    khtest_db_exec(second, "COMMIT", 0, NULL);
    for (int i = 0; i < 3; i++) {
        json_t *msg = s_expect(avim, "NACKED", 5000);
        ck_assert_ptr_nonnull(msg);
        json_decref(msg);
    }
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.nacked' AND outcome = 'ok'"),
                     3);
    zsock_destroy(&avim);
    s_stop(pid);
    PQfinish(first);
    PQfinish(second);
}
END_TEST

/* The next message but DELIVERs, which go into got (up to max; their
 * count in *ngot); NULL after timeout_ms. */
static json_t *s_next_noting(zsock_t *sock, int timeout_ms, char got[][37],
                             int max, int *ngot)
{
    int64_t deadline = zclock_mono() + timeout_ms;
    while (zclock_mono() < deadline) {
        json_t *msg =
            khpartner_recv(sock, (int) (deadline - zclock_mono()) + 1);
        if (!msg)
            return NULL;
        if (strcmp(s_str(msg, "cmd"), "DELIVER") != 0)
            return msg;
        if (*ngot < max)
            snprintf(got[(*ngot)++], 37, "%s", s_str(msg, "delivery_id"));
        json_decref(msg);
    }
    return NULL;
}

/* Overdue deliveries that are not out on the connection (sent before a
 * restart, or on a connection since gone) take its credit like new ones:
 * claimed beyond its window they would wait in memory, sent in the trail
 * (an attempt and a delivery.sent event each) but not on the wire, again
 * at every sweep, until given up. */
START_TEST(overdue_resends_take_credit_like_new_deliveries)
{
    char ids[3][37], got[8][37];
    int ngot = 0;
    for (int i = 0; i < 3; i++)
        s_delivery("avim", "normal", 1000 - i * 10, NULL, ids[i]);
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'delivered', attempts = 1,"
                   " sent_at = now() - interval '1 hour',"
                   " next_attempt_at = now() - interval '1 minute'",
                   0, NULL);
    pid_t pid = s_start_slow(60000, 60000);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    /* Sweeps come every 250 ms: one delivery, the window's, goes out. */
    ck_assert_ptr_null(s_next_noting(avim, 1500, got, 8, &ngot));
    ck_assert_int_eq(ngot, 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"
                             " WHERE action = 'delivery.sent'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM deliveries"
                             " WHERE attempts = 1"),
                     2);
    /* Its ACK makes room for the next, sent as it is claimed. */
    s_answer(avim, got[0], NULL);
    json_t *msg = s_next_noting(avim, 1500, got, 8, &ngot);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "ACKED");
    json_decref(msg);
    ck_assert_ptr_null(s_next_noting(avim, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"
                             " WHERE action = 'delivery.sent'"),
                     2);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* An overdue re-send shares the window with the pending deliveries by
 * the same rule as they do among themselves: an urgent delivery routed
 * while a normal one waits for its re-send goes first, and the re-send
 * follows in the room its ACK makes. */
START_TEST(an_urgent_delivery_goes_before_an_overdue_normal_resend)
{
    char normal[37], urgent[37], got[8][37];
    int ngot = 0;
    s_delivery("avim", "normal", 60000, NULL, normal);
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET state = 'delivered', attempts = 1,"
                   " sent_at = now() - interval '1 hour',"
                   " next_attempt_at = now() - interval '1 minute'",
                   0, NULL);
    s_delivery("avim", "urgent", 0, NULL, urgent);
    pid_t pid = s_start_slow(60000, 60000);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    ck_assert_ptr_null(s_next_noting(avim, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 1);
    ck_assert_str_eq(got[0], urgent);
    char state[16];
    ck_assert_str_eq(s_state(normal, state), "delivered");
    ck_assert_int_eq(s_count("SELECT attempts FROM deliveries WHERE"
                             " priority = 'normal'"),
                     1);
    s_answer(avim, urgent, NULL);
    json_t *msg = s_next_noting(avim, 1500, got, 8, &ngot);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "ACKED");
    json_decref(msg);
    ck_assert_ptr_null(s_next_noting(avim, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 2);
    ck_assert_str_eq(got[1], normal);
    ck_assert_int_eq(s_count("SELECT attempts FROM deliveries WHERE"
                             " priority = 'normal'"),
                     2);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* Sent deliveries to avim, two normal and then one urgent, whose re-sends
 * are due at the times given (intervals from now, the urgent one's
 * last): with a window of 1 the urgent one is re-sent first all the same,
 * then the normal ones, the one sent first first; count of them are
 * waited for. */
static void s_urgent_resent_first(const char *normal_due,
                                  const char *urgent_due, int count)
{
    char ids[3][37], got[8][37];
    int ngot = 0;
    s_delivery("avim", "normal", 60000, NULL, ids[0]);
    s_delivery("avim", "normal", 50000, NULL, ids[1]);
    s_delivery("avim", "urgent", 40000, NULL, ids[2]);
    for (int i = 0; i < 3; i++) {
        /* the first normal one due a minute before the second */
        const char *params[] = {ids[i], i < 2 ? normal_due : urgent_due,
                                i == 0 ? "1 minute" : "0"};
        khtest_db_exec(s_db,
                       "UPDATE deliveries SET state = 'delivered',"
                       " attempts = 1, sent_at = now() - interval '1 hour',"
                       " next_attempt_at = now() + $2::interval - $3::interval"
                       " WHERE id = $1",
                       3, params);
    }
    pid_t pid = s_start_slow(60000, 60000);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    for (int i = 0; i < count; i++) {
        int want = (i + 2) % 3; /* urgent, then the normal ones */
        ck_assert_ptr_null(s_next_noting(avim, 1000, got, 8, &ngot));
        ck_assert_int_eq(ngot, i + 1);
        ck_assert_msg(strcmp(got[i], ids[want]) == 0,
                      "re-send %d is %s, not %s", i, got[i], ids[want]);
        s_answer(avim, got[i], NULL);
        json_t *msg = s_expect(avim, "ACKED", 1500);
        ck_assert_ptr_nonnull(msg);
        json_decref(msg);
    }
    zsock_destroy(&avim);
    s_stop(pid);
}

/* More re-sends due than the window holds: they take it most urgent
 * first, as pending deliveries do, not in the order they fell due (an
 * urgent one waited behind normal ones due sooner). */
START_TEST(overdue_resends_go_most_urgent_first)
{
    s_urgent_resent_first("-2 minutes", "-10 seconds", 3);
}
END_TEST

/* So does a reclaim, which re-sends at once, as far as the window goes,
 * what a partner coming back had unanswered (the rest when due). */
START_TEST(a_reclaim_resends_most_urgent_first)
{
    s_urgent_resent_first("10 minutes", "50 minutes", 1);
}
END_TEST

/* A loop held up by the database (an ACK batch waiting out its
 * lock_timeout of 5 s) finds no connection silent afterwards for the
 * frames it had not read meanwhile: the partner, PINGing every 300 ms,
 * stays connected with a peer timeout of 1 s. */
START_TEST(a_loop_held_up_finds_no_connection_silent)
{
    char id[37];
    s_delivery("avim", "normal", 0, NULL, id);
    pid_t pid = s_start_slow(60000, 1000);
    zsock_t *sock = s_partner("avim");
    s_hello(sock, 2);
    s_expect_delivery(sock, id, 1, 5000);

    PGconn *locker = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(locker), CONNECTION_OK);
    const char *params[] = {id};
    khtest_db_exec(locker, "BEGIN", 0, NULL);
    khtest_db_exec(locker, "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
                   1, params);
    s_answer(sock, id, NULL);
    /* PING throughout, until 2 s after the ACK was refused. */
    int64_t refused_at = 0, until = zclock_mono() + 20000;
    while (zclock_mono() < until &&
           (!refused_at || zclock_mono() < refused_at + 2000)) {
        khpartner_send(sock, kh_proto_new(KH_CMD_PING, "p"));
        json_t *reply;
        while ((reply = khpartner_recv(sock, 300)) != NULL) {
            const char *cmd = s_str(reply, "cmd");
            ck_assert_msg(strcmp(cmd, "PONG") == 0 ||
                              strcmp(cmd, "REJECTED") == 0,
                          "%s", cmd);
            if (strcmp(cmd, "REJECTED") == 0)
                refused_at = zclock_mono();
            json_decref(reply);
        }
    }
    ck_assert_msg(refused_at, "the ACK was not refused");
    khtest_db_exec(locker, "ROLLBACK", 0, NULL);
    PQfinish(locker);
    ck_assert_int_eq(s_log_count("notification.log", "reason=silent"), 0);
    s_answer(sock, id, NULL);
    json_t *reply = s_expect(sock, "ACKED", 5000);
    ck_assert_msg(reply != NULL, "the ACK sent again was not taken");
    json_decref(reply);
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* A round claims with the credit its ACK batch frees. When that batch
 * fails (a row it changes is locked past lock_timeout), what the claim
 * took waits until an ACK commits: the window holds throughout. */
START_TEST(a_failed_ack_batch_never_overfills_the_window)
{
    char ids[3][37], got[8][37];
    int ngot = 0;
    for (int i = 0; i < 3; i++)
        s_delivery("avim", "normal", 10000 - i * 10, NULL, ids[i]);
    /* Nothing is re-sent, and the partner, silent while the batch waits,
     * is not forgotten meanwhile. */
    pid_t pid = s_start_slow(60000, 60000);
    zsock_t *sock = s_partner("avim");
    s_hello(sock, 2);
    ck_assert_ptr_null(s_next_noting(sock, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 2);
    ck_assert_str_eq(got[0], ids[0]);
    ck_assert_str_eq(got[1], ids[1]);

    PGconn *locker = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(locker), CONNECTION_OK);
    const char *first[] = {ids[0]};
    khtest_db_exec(locker, "BEGIN", 0, NULL);
    khtest_db_exec(locker, "SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE",
                   1, first);
    s_answer(sock, ids[0], NULL);
    json_t *reply = s_next_noting(sock, 15000, got, 8, &ngot);
    ck_assert_msg(reply != NULL, "no answer to the ACK");
    ck_assert_str_eq(s_str(reply, "cmd"), "REJECTED");
    json_decref(reply);
    /* The third was claimed beside the failed batch: it must not come
     * while the first two are still out. */
    ck_assert_ptr_null(s_next_noting(sock, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 2);
    char state[16];
    ck_assert_str_eq(s_state(ids[0], state), "delivered");
    ck_assert_str_eq(s_state(ids[2], state), "delivered"); /* claimed */

    khtest_db_exec(locker, "ROLLBACK", 0, NULL);
    PQfinish(locker);
    s_answer(sock, ids[0], NULL);
    reply = s_next_noting(sock, 5000, got, 8, &ngot);
    ck_assert_msg(reply != NULL, "no answer to the second ACK");
    ck_assert_str_eq(s_str(reply, "cmd"), "ACKED");
    json_decref(reply);
    ck_assert_ptr_null(s_next_noting(sock, 1000, got, 8, &ngot));
    ck_assert_int_eq(ngot, 3);
    ck_assert_str_eq(got[2], ids[2]);
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* A round whose re-send of what a connection has out does not commit
 * leaves it out there: the partner still holds the earlier send, so its
 * place in the window stays taken, and a round before the next sweep
 * claims nothing new on top of it. */
START_TEST(a_resend_rolled_back_still_takes_its_place_in_the_window)
{
    char x[37], y[37], got[8][37];
    int ngot = 0;
    s_delivery("avim", "normal", 1000, NULL, x);
    /* Sweeps (and with them re-sends) 4 s apart; x is overdue at once. */
    pid_t pid = s_start3("notification.log", "KH_NOTIFY_SWEEP_MS=4000",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=100",
                         "KH_NOTIFY_PEER_TIMEOUT_MS=60000");
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zsock_t *sock = s_partner("avim");
    s_hello(sock, 1);
    for (int64_t until = zclock_mono() + 5000;
         ngot < 1 && zclock_mono() < until;)
        json_decref(s_next_noting(sock, 100, got, 8, &ngot));
    ck_assert_int_eq(ngot, 1);
    ck_assert_str_eq(got[0], x);
    /* The next sweep re-sends x, and its round fails to commit. */
    s_refuse_commits("NEW.attempts >= 2");
    ck_assert(s_log_has("notification.log", "during=commit", 10000));
    /* What did not commit was not sent, and is not logged as sent. */
    ck_assert_int_eq(s_log_count("notification.log", "attempt=2"), 0);
    khtest_db_exec(s_db, "DROP TRIGGER s_refuse ON deliveries", 0, NULL);
    s_delivery("avim", "normal", 1000, NULL, y);
    /* A frame's round, well before the next sweep: x is still out. */
    khpartner_send(sock, kh_proto_new(KH_CMD_PING, "p"));
    json_t *msg = s_next_noting(sock, 1000, got, 8, &ngot);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "PONG");
    json_decref(msg);
    ck_assert_ptr_null(s_next_noting(sock, 500, got, 8, &ngot));
    ck_assert_msg(ngot == 1, "%s came while %s was out in a window of 1",
                  got[ngot - 1], x);
    /* The next sweep sends x again; its ACK makes room for y. */
    for (int64_t until = zclock_mono() + 6000;
         ngot < 2 && zclock_mono() < until;)
        json_decref(s_next_noting(sock, 100, got, 8, &ngot));
    ck_assert_int_eq(ngot, 2);
    ck_assert_str_eq(got[1], x);
    s_answer(sock, x, NULL);
    for (int64_t until = zclock_mono() + 3000;
         zclock_mono() < until && strcmp(got[ngot - 1], y) != 0;)
        json_decref(s_next_noting(sock, 100, got, 8, &ngot));
    ck_assert_str_eq(got[ngot - 1], y);
    for (int i = 0; i < ngot - 1; i++)
        ck_assert_str_eq(got[i], x);
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* A delivery out on a connection that is made due at once while its
 * send is young (as a connection of the partner that also had it went
 * away) is re-sent with its id, not only once the ACK timeout could be
 * over: the re-send asks the database about the young ones of its window
 * only as others, with the credit. */
START_TEST(a_young_delivery_made_due_at_once_is_resent)
{
    char first[37];
    s_delivery("avim", "normal", 0, NULL, first);
    char *env[] = {"KH_NOTIFY_ACK_TIMEOUT_MS=30000",
                   "KH_NOTIFY_BACKOFF_MAX_MS=60000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    s_expect_delivery(avim, first, 1, 5000);
    const char *params[] = {first};
    khtest_db_exec(s_db,
                   "UPDATE deliveries SET next_attempt_at = now()"
                   " WHERE id = $1",
                   1, params);
    s_expect_delivery(avim, first, 2, 3000);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A partner's reconnection whose reclaim does not commit makes it again
 * at the next round: what its old connection had out comes at once, not
 * after its ACK timeout. */
START_TEST(a_reclaim_rolled_back_is_made_again)
{
    char x[37];
    s_delivery("avim", "normal", 1000, NULL, x);
    pid_t pid = s_start_slow(60000, 60000);
    zsock_t *sock = s_partner("avim");
    s_hello(sock, 1);
    s_expect_delivery(sock, x, 0, 5000);
    /* Gone unanswered; the reconnection's reclaim fails to commit. */
    zsock_destroy(&sock);
    ck_assert(s_log_has("notification.log", "reason=disconnected", 5000));
    s_refuse_commits("NEW.attempts >= 2");
    sock = s_partner("avim");
    s_hello(sock, 1);
    ck_assert(s_log_has("notification.log", "during=commit", 5000));
    khtest_db_exec(s_db, "DROP TRIGGER s_refuse ON deliveries", 0, NULL);
    s_expect_delivery(sock, x, 2, 3000);
    zsock_destroy(&sock);
    s_stop(pid);
}
END_TEST

/* A connection that goes leaves its DELIVERs due at once on another
 * connection of the partner; they come there only as its window has
 * room, never on top of what it has out. */
START_TEST(a_gone_connections_deliveries_wait_for_room_on_another)
{
    pid_t pid = s_start_slow(30000, 1500);
    zsock_t *one = s_partner("avim");
    s_hello(one, 2);
    zsock_t *two = s_partner("avim");
    s_hello(two, 2);
    char ids[4][37], mine[8][37], theirs[4][37];
    int nmine = 0, ntheirs = 0;
    for (int i = 0; i < 4; i++)
        s_delivery("avim", "normal", 1000 - i * 10, NULL, ids[i]);
    int64_t until = zclock_mono() + 3000;
    while ((nmine < 2 || ntheirs < 2) && zclock_mono() < until) {
        json_decref(s_next_noting(one, 100, mine, 8, &nmine));
        json_decref(s_next_noting(two, 100, theirs, 4, &ntheirs));
    }
    ck_assert_int_eq(nmine, 2);
    ck_assert_int_eq(ntheirs, 2);
    zsock_destroy(&two);
    /* one stays in touch while two is forgotten and its two are due. */
    until = zclock_mono() + 5000;
    while (zclock_mono() < until &&
           !s_log_has("notification.log", "event=resend_now", 0)) {
        khpartner_send(one, kh_proto_new(KH_CMD_PING, "p"));
        json_decref(s_next_noting(one, 200, mine, 8, &nmine));
    }
    ck_assert(s_log_has("notification.log", "event=resend_now", 0));
    khpartner_send(one, kh_proto_new(KH_CMD_PING, "p"));
    json_decref(s_next_noting(one, 500, mine, 8, &nmine));
    ck_assert_int_eq(nmine, 2);
    for (int i = 0; i < 2; i++)
        s_answer(one, mine[i], NULL);
    until = zclock_mono() + 5000;
    while (nmine < 4 && zclock_mono() < until)
        json_decref(s_next_noting(one, 200, mine, 8, &nmine));
    ck_assert_int_eq(nmine, 4);
    for (int i = 0; i < 2; i++)
        ck_assert_msg(strcmp(mine[2 + i], theirs[0]) == 0 ||
                          strcmp(mine[2 + i], theirs[1]) == 0,
                      "%s was not two's", mine[2 + i]);
    zsock_destroy(&one);
    s_stop(pid);
}
END_TEST

/* A partner may acknowledge on any of its connections what came on
 * another: the connection it came on gets its credit back, and the
 * answered delivery is no longer counted out there. */
START_TEST(an_ack_on_another_connection_frees_the_window_it_came_in)
{
    pid_t pid = s_start_slow(30000, 60000);
    zsock_t *one = s_partner("avim");
    s_hello(one, 1);
    zsock_t *two = s_partner("avim");
    s_hello(two, 1);
    char ids[6][37], mine[6][37], theirs[6][37];
    int nmine = 0, ntheirs = 0;
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    for (int i = 0; i < 6; i++)
        s_delivery("avim", "normal", 1000 - i * 10, NULL, ids[i]);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    int64_t until = zclock_mono() + 5000;
    while ((nmine < 1 || ntheirs < 1) && zclock_mono() < until) {
        json_decref(s_next_noting(one, 100, mine, 6, &nmine));
        json_decref(s_next_noting(two, 100, theirs, 6, &ntheirs));
    }
    ck_assert_int_eq(nmine, 1);
    ck_assert_int_eq(ntheirs, 1);
    /* Both of them acknowledged on one: each connection has room again. */
    s_answer(one, mine[0], NULL);
    json_t *msg = s_expect(one, "ACKED", 3000);
    ck_assert_ptr_nonnull(msg);
    json_decref(msg);
    s_answer(one, theirs[0], NULL);
    msg = s_next_noting(one, 3000, mine, 6, &nmine);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "ACKED");
    ck_assert(!json_is_true(json_object_get(msg, "duplicate")));
    json_decref(msg);
    /* two gets its next one, not only one. */
    until = zclock_mono() + 3000;
    while (ntheirs < 2 && zclock_mono() < until) {
        khpartner_send(two, kh_proto_new(KH_CMD_PING, "p"));
        json_decref(s_next_noting(two, 200, theirs, 6, &ntheirs));
        json_decref(s_next_noting(one, 10, mine, 6, &nmine));
    }
    ck_assert_msg(ntheirs == 2, "the second connection got %d", ntheirs);
    zsock_destroy(&one);
    zsock_destroy(&two);
    s_stop(pid);
}
END_TEST

/* Give avim a new key (a rotation): avim-new.cert here, its public half
 * in the partner directory; avim.cert is the key before (its public key
 * in previous), admitted for an hour more. */
static void s_rotate_avim(char previous[KH_PARTNER_KEY_LEN + 1])
{
    zcert_t *fresh = zcert_new();
    ck_assert_int_eq(zcert_save(fresh, s_path("avim-new.cert")), 0);
    ck_assert_int_eq(zcert_save_public(fresh, s_path("partners/avim-new.cert")),
                     0);
    char until[40];
    kh_error_t err;
    khtest_db_exec(s_db, "BEGIN", 0, NULL);
    ck_assert_int_eq(kh_partner_rotate(s_db, "avim", zcert_public_txt(fresh),
                                       3600, previous, until, &err),
                     0);
    khtest_db_exec(s_db, "COMMIT", 0, NULL);
    zcert_destroy(&fresh);
}

/* Within 5 s, sock is sent the deliveries a and b, in either order. */
static void s_expect_both(zsock_t *sock, const char *a, const char *b)
{
    char got[2][37];
    int ngot = 0;
    int64_t until_ms = zclock_mono() + 5000;
    while (ngot < 2 && zclock_mono() < until_ms) {
        json_t *msg = s_expect(sock, "DELIVER", 500);
        if (msg)
            snprintf(got[ngot++], 37, "%s", s_str(msg, "delivery_id"));
        json_decref(msg);
    }
    ck_assert_int_eq(ngot, 2);
    ck_assert(strcmp(got[0], a) == 0 || strcmp(got[1], a) == 0);
    ck_assert(strcmp(got[0], b) == 0 || strcmp(got[1], b) == 0);
}

/* A connection made with the key before a rotation is served during the
 * overlap; once the overlap ends it is forgotten and sent nothing more,
 * and what it held goes to the partner's connection with the new key. */
START_TEST(a_connection_whose_key_overlap_ended_is_sent_nothing_more)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous);
    char first[37], second[37];
    s_delivery("avim", "normal", 0, NULL, first);

    pid_t pid = s_start3("notification.log", "KH_PARTNER_REFRESH_MS=200",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=30000");
    zsock_t *old = s_partner("avim");
    s_hello(old, 4);
    s_expect_delivery(old, first, 0, 5000);
    json_t *msg;
    zsock_t *now = s_partner("avim-new");
    s_hello(now, 4);

    khtest_db_exec(s_db,
                   "UPDATE partner_keys SET expires_at = now() WHERE "
                   "partner_id = 'avim' AND expires_at IS NOT NULL",
                   0, NULL);
    ck_assert(s_log_has("notification.log",
                        "partner=avim peer=127.0.0.1 reason=key_not_admitted",
                        5000));
    s_delivery("avim", "normal", 0, NULL, second);
    /* The new key's connection gets both: the one the old connection held
     * (due again at once, as for any connection that goes) and the new. */
    s_expect_both(now, first, second);
    msg = s_expect(old, "DELIVER", 1000);
    ck_assert_msg(msg == NULL, "a key past its overlap was sent a delivery");
    /* Its frames are refused now. */
    s_answer(old, first, NULL);
    msg = s_expect(old, "REJECTED", 3000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "code"), "unknown_partner");
    json_decref(msg);
    /* ... and in the trail, under the key, as intake records it. */
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND origin_service ="
                           " 'notification' AND reason_code ="
                           " 'unknown_partner' AND actor_id LIKE 'key:%'",
                           1, 3000));
    zsock_destroy(&old);
    zsock_destroy(&now);
    s_stop(pid);
}
END_TEST

/* sock answers delivery id (ACK, or NACK with reason nack) and is refused
 * with code. */
static void s_answer_refused(zsock_t *sock, const char *id, const char *nack,
                             const char *code)
{
    s_answer(sock, id, nack);
    json_t *msg = s_expect(sock, "REJECTED", 3000);
    ck_assert_msg(msg != NULL, "no refusal, %s expected", code);
    ck_assert_str_eq(s_str(msg, "code"), code);
    json_decref(msg);
}

/* What notification does for a connection checks in the same statement
 * that its key still admits its partner: a key whose overlap ended, by a
 * change notification has not heard of yet, is sent nothing, neither new
 * deliveries nor re-sends; the claim that finds it so makes notification
 * read the registry, and the key's ACK is refused for good. The partner's
 * new key gets it all. */
START_TEST(a_key_whose_overlap_ended_untold_is_served_nothing)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous);
    char first[37], second[37], state[16];
    s_delivery("avim", "normal", 0, NULL, first);
    /* No refresh but the notices; re-sends due 0.8-1.2 s after a send
     * (after the change below, and before the 2 s that the test waits
     * for them), and a claim every sweep (50 ms). */
    char *env[] = {
        "KH_PARTNER_REFRESH_MS=3600000", "KH_NOTIFY_PEER_TIMEOUT_MS=120000",
        "KH_NOTIFY_ACK_TIMEOUT_MS=1000", "KH_NOTIFY_BACKOFF_MAX_MS=2000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *old = s_partner("avim");
    s_hello(old, 4);
    s_expect_delivery(old, first, 0, 5000);

    khtest_change_untold(s_db,
                         "UPDATE partner_keys SET expires_at = now() WHERE"
                         " partner_id = 'avim' AND expires_at IS NOT NULL");
    s_delivery("avim", "normal", 0, NULL, second);
    json_t *msg = s_expect(old, "DELIVER", 2000);
    ck_assert_msg(msg == NULL, "a key past its overlap was sent %s",
                  msg ? s_str(msg, "delivery_id") : "");
    ck_assert_str_eq(s_state(second, state), "pending");
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT attempts FROM deliveries WHERE id = '%s'",
             first);
    ck_assert_int_eq(s_count(sql), 1); /* not re-sent */
    s_answer_refused(old, first, NULL, "unknown_partner");
    ck_assert_str_eq(s_state(first, state), "delivered");
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND origin_service ="
                           " 'notification' AND reason_code ="
                           " 'unknown_partner'",
                           1, 3000));
    /* Both were there to claim all along: the new key gets them. */
    zsock_t *now = s_partner("avim-new");
    s_hello(now, 4);
    s_expect_both(now, first, second);
    zsock_destroy(&old);
    zsock_destroy(&now);
    s_stop(pid);
}
END_TEST

/* A connection that only receives, on a key whose rotation's overlap ended
 * by a change notification has not heard of: the next claim or re-send for
 * it finds the key no longer admitting avim, so the registry is read again
 * and the connection dropped, and what it had out goes at once on avim's
 * other connection: not after the ACK timeout, nor at the next refresh. */
START_TEST(a_receiving_key_whose_overlap_ended_untold_is_dropped_at_once)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous);
    char first[37], second[37];
    s_delivery("avim", "normal", 0, NULL, first);
    char *env[] = {"KH_PARTNER_REFRESH_MS=3600000",
                   "KH_NOTIFY_PEER_TIMEOUT_MS=120000",
                   "KH_NOTIFY_ACK_TIMEOUT_MS=30000",
                   "KH_NOTIFY_BACKOFF_MAX_MS=60000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *old = s_partner("avim");
    s_hello(old, 4);
    s_expect_delivery(old, first, 0, 5000);
    zsock_t *now = s_partner("avim-new");
    s_hello(now, 4);

    khtest_change_untold(s_db,
                         "UPDATE partner_keys SET expires_at = now() WHERE"
                         " partner_id = 'avim' AND expires_at IS NOT NULL");
    s_delivery("avim", "normal", 0, NULL, second);
    s_expect_both(now, first, second);
    ck_assert(s_log_has("notification.log",
                        "partner=avim peer=127.0.0.1 reason=key_not_admitted"
                        " unacknowledged=1",
                        3000));
    json_t *msg = s_expect(old, "DELIVER", 500);
    ck_assert_msg(msg == NULL, "a key past its overlap was sent %s",
                  msg ? s_str(msg, "delivery_id") : "");
    zsock_destroy(&old);
    zsock_destroy(&now);
    s_stop(pid);
}
END_TEST

/* A PING on the key a rotation left is answered while its overlap lasts
 * and refused once it ended: no change is committed, and none told, when
 * it does, so notification reads the registry again at that time itself
 * (here with no periodic refresh). */
START_TEST(a_ping_on_a_key_whose_overlap_ended_is_refused)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous);
    /* No sweep either, whose claim for the connection would find the key
     * ended (a_receiving_key_whose_overlap_ended_untold_is_dropped_at_once). */
    char *env[] = {"KH_PARTNER_REFRESH_MS=3600000",
                   "KH_NOTIFY_PEER_TIMEOUT_MS=120000",
                   "KH_NOTIFY_SWEEP_MS=60000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *old = s_partner("avim");
    s_hello(old, 4);
    /* told: the registry is read again with the overlap's end */
    khtest_db_exec(s_db,
                   "UPDATE partner_keys SET expires_at = now() + '2 s' WHERE"
                   " partner_id = 'avim' AND expires_at IS NOT NULL",
                   0, NULL);
    khpartner_send(old, kh_proto_new(KH_CMD_PING, "p1"));
    json_t *msg = s_expect(old, "PONG", 3000);
    ck_assert_ptr_nonnull(msg);
    json_decref(msg);
    ck_assert(s_wait_count("SELECT count(*) FROM partner_keys WHERE"
                           " partner_id = 'avim' AND expires_at <= now()",
                           1, 5000));
    khpartner_send(old, kh_proto_new(KH_CMD_PING, "p2"));
    msg = s_expect(old, "REJECTED", 3000);
    ck_assert_msg(msg != NULL, "a PING on a key past its overlap was answered");
    ck_assert_str_eq(s_str(msg, "code"), "unknown_partner");
    json_decref(msg);
    zsock_destroy(&old);
    s_stop(pid);
}
END_TEST

/* An ACK, or a NACK with reason nack, of what avim had out, on its key,
 * after avim was revoked by a change notification has not heard of yet:
 * it changes nothing and writes nothing, and is refused as while the
 * registry is stale, which makes notification read it; sent again, it is
 * refused for good. No sweep comes between (its re-send would find the
 * key not admitting avim first, and the connection be dropped). */
static void s_answer_revoked_untold(const char *nack)
{
    char first[37], state[16];
    s_delivery("avim", "normal", 0, NULL, first);
    char *env[] = {
        "KH_PARTNER_REFRESH_MS=3600000",  "KH_NOTIFY_PEER_TIMEOUT_MS=120000",
        "KH_NOTIFY_ACK_TIMEOUT_MS=30000", "KH_NOTIFY_BACKOFF_MAX_MS=60000",
        "KH_NOTIFY_SWEEP_MS=60000",       NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    s_expect_delivery(avim, first, 0, 5000);

    khtest_change_untold(
        s_db, "UPDATE partners SET revoked_at = now() WHERE id = 'avim'");
    s_answer_refused(avim, first, nack, "unavailable");
    ck_assert_str_eq(s_state(first, state), "delivered");
    ck_assert_int_eq(
        s_count("SELECT count(*) FROM audit_events WHERE"
                " action IN ('delivery.acked', 'delivery.nacked')"),
        0);
    ck_assert(s_log_has("notification.log",
                        nack ? "NACK reason=key_not_admitted"
                             : "ACK reason=key_not_admitted",
                        3000));
    s_answer_refused(avim, first, nack, "unknown_partner");
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND origin_service ="
                           " 'notification' AND reason_code ="
                           " 'unknown_partner'",
                           1, 3000));
    zsock_destroy(&avim);
    s_stop(pid);
}

START_TEST(an_ack_of_a_partner_revoked_untold_changes_nothing)
{
    s_answer_revoked_untold(NULL);
}
END_TEST

/* A permanent NACK makes no dead letter. */
START_TEST(a_nack_of_a_partner_revoked_untold_changes_nothing)
{
    s_answer_revoked_untold("permanent");
}
END_TEST

/* An administrator moves key (avim's before its rotation) to the
 * zorgcoordinator; a partner added now, whose first frame makes the
 * registry be read again, is welcomed: its connection, for the caller to
 * close. */
static zsock_t *s_move_key_to_zorgcoordinator(const char *key)
{
    const char *params[] = {key};
    khtest_db_exec(s_db,
                   "UPDATE partner_keys SET partner_id = 'zorgcoordinator'"
                   " WHERE curve_public_key = $1",
                   1, params);
    s_register("meldpunt-hilversum", "municipality", true);
    zsock_t *added = s_partner("meldpunt-hilversum");
    s_hello(added, 1);
    return added;
}

/* A key an administrator moved to another partner: once the registry is
 * read again (here for a partner added at run time, whose first frame
 * re-reads it at once), the connection made with that key is its old
 * partner's no more, and what that connection had out goes again at once
 * on the partner's other connection, not after the ACK timeout. */
START_TEST(a_moved_keys_deliveries_go_again_once_the_registry_says_so)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous); /* its second key, in the overlap */
    char first[37];
    s_delivery("avim", "normal", 0, NULL, first);

    pid_t pid = s_start_unhurried();
    zsock_t *old = s_sent_first("avim", 1, first);
    zsock_t *now = s_partner("avim-new");
    s_hello(now, 1);

    zsock_t *added = s_move_key_to_zorgcoordinator(previous);
    /* The moved key's connection speaks (its HELLO every second). */
    khpartner_send(old, kh_proto_new(KH_CMD_PING, "p"));

    ck_assert(s_log_has("notification.log",
                        "partner=avim peer=127.0.0.1 reason=key_not_admitted",
                        3000));
    s_expect_delivery(now, first, 0, 3000);
    zsock_destroy(&added);
    zsock_destroy(&old);
    zsock_destroy(&now);
    s_stop(pid);
}
END_TEST

/* A partner registered while notification runs is known at its first
 * HELLO, also when the registry was read less than a second before (the
 * periodic refresh, or another new partner's first frame): its client
 * (ketenhub-partner listen) stops for good at an unknown_partner. Two
 * partners added one after the other are each welcomed at once. */
START_TEST(partners_added_at_run_time_are_each_known_at_their_first_hello)
{
    pid_t pid =
        s_start("notification.log", "KH_PARTNER_REFRESH_MS=3600000", NULL);
    ck_assert(s_log_has("notification.log", "event=db_connected", 10000));
    const char *added[] = {"meldpunt-hilversum", "arbeidsinspectie"};
    const char *kinds[] = {"municipality", "inspectorate"};
    for (size_t i = 0; i < 2; i++) {
        s_register(added[i], kinds[i], true);
        zsock_t *sock = s_partner(added[i]);
        json_t *hello = kh_proto_new(KH_CMD_HELLO, "h1");
        khpartner_send(sock, hello);
        json_t *reply = khpartner_recv(sock, 5000);
        ck_assert_msg(reply != NULL, "no answer to %s's HELLO", added[i]);
        ck_assert_msg(strcmp(s_str(reply, "cmd"), "WELCOME") == 0,
                      "%s's HELLO: %s %s", added[i], s_str(reply, "cmd"),
                      s_str(reply, "code"));
        json_decref(reply);
        zsock_destroy(&sock);
    }
    s_stop(pid);
}
END_TEST

/* The log's partner_connected line gives the window the connection is
 * sent within, the one its HELLO asked for, not the hub's largest: it is
 * what an administrator reads to see why a partner gets one delivery at a
 * time. Its HELLOs every second add no line. */
START_TEST(partner_connected_tells_the_window_its_hello_asked_for)
{
    pid_t pid = s_start_slow(30000, 60000);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    s_hello(avim, 1);
    ck_assert_msg(s_log_has("notification.log",
                            "event=partner_connected partner=avim"
                            " peer=127.0.0.1 window=1\n",
                            3000),
                  "see %s", s_path("notification.log"));
    ck_assert_int_eq(s_log_count("notification.log", "event=partner_connected"),
                     1);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* Only a connection that said HELLO is sent deliveries: a probe that
 * PINGs the delivery socket (ketenhub-partner ping), or a connection that
 * only answers, is answered and takes none, so that none waits for an ACK
 * on a connection that never reads it, or spends its attempts there. */
START_TEST(a_connection_without_hello_is_sent_no_deliveries)
{
    pid_t pid = s_start_slow(30000, 60000);
    char ids[2][37];
    s_delivery("avim", "normal", 100, NULL, ids[0]);
    s_delivery("avim", "normal", 0, NULL, ids[1]);
    zsock_t *probe = s_partner("avim");
    khpartner_send(probe, kh_proto_new(KH_CMD_PING, "p"));
    json_t *msg = khpartner_recv(probe, 3000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "PONG");
    json_decref(msg);
    msg = khpartner_recv(probe, 1000);
    ck_assert_msg(msg == NULL, "a PING got %s", s_str(msg, "cmd"));
    char state[16];
    ck_assert_str_eq(s_state(ids[0], state), "pending");
    ck_assert_str_eq(s_state(ids[1], state), "pending");
    /* A listener gets them; the probe may still answer for it. */
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 1);
    s_expect_delivery(avim, ids[0], 0, 3000);
    s_answer(probe, ids[0], NULL);
    msg = khpartner_recv(probe, 3000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "ACKED");
    json_decref(msg);
    s_expect_delivery(avim, ids[1], 0, 3000);
    ck_assert_ptr_null(khpartner_recv(probe, 500));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     2);
    zsock_destroy(&probe);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A partner that does not handle cases (the ketenregisseur) is sent no
 * delivery, even one addressed to it (routing never makes one: this is
 * the second line), while the others are sent theirs. */
START_TEST(a_partner_without_cases_is_sent_nothing)
{
    s_register("regie", "chain_director", false);
    pid_t pid = s_start_slow(30000, 60000);
    char to_regie[37], to_avim[37];
    s_delivery("regie", "urgent", 100, NULL, to_regie);
    s_delivery("avim", "normal", 0, NULL, to_avim);
    zsock_t *regie = s_partner("regie");
    s_hello(regie, 4);
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 4);
    s_expect_delivery(avim, to_avim, 0, 3000);
    json_t *msg = khpartner_recv(regie, 1500);
    ck_assert_msg(msg == NULL, "the ketenregisseur got %s", s_str(msg, "cmd"));
    char state[16];
    ck_assert_str_eq(s_state(to_regie, state), "pending");
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent' AND partner_id = 'regie'"),
                     0);
    zsock_destroy(&regie);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

/* A partner's connections beyond KH_NOTIFY_MAX_CONNECTIONS are refused as
 * throttled, retryable once a connection could have been forgotten; the
 * ones it has go on, another partner's are not counted, and a connection
 * that goes makes room. */
START_TEST(a_partner_over_its_connections_is_throttled)
{
    /* No re-send within the test: a connection gets one DELIVER. */
    char *const env[] = {"KH_NOTIFY_MAX_CONNECTIONS=2",
                         "KH_NOTIFY_PEER_TIMEOUT_MS=60000",
                         "KH_NOTIFY_ACK_TIMEOUT_MS=30000",
                         "KH_NOTIFY_BACKOFF_MAX_MS=60000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zsock_t *a = s_partner("avim"), *b = s_partner("avim");
    zsock_t *c = s_partner("avim"), *vt = s_partner("veilig-thuis");
    s_hello(a, 4);
    s_hello(b, 4);
    json_t *reply = s_hello_reply(c);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "cmd"), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "throttled");
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    ck_assert_int_eq(
        json_integer_value(json_object_get(reply, "retry_after_ms")), 60000);
    json_decref(reply);
    /* No delivery goes to the refused connection. */
    char id[37];
    s_delivery("avim", "normal", 0, NULL, id);
    json_t *msg = NULL;
    for (int i = 0; i < 2 && !msg; i++) {
        zpoller_t *poller = zpoller_new(a, b, NULL);
        zsock_t *which = zpoller_wait(poller, 3000);
        zpoller_destroy(&poller);
        if (which)
            msg = s_expect(which, "DELIVER", 1000);
    }
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "delivery_id"), id);
    json_decref(msg);
    ck_assert_ptr_null(khpartner_recv(c, 500));
    /* Heartbeats of the connections it has, and another partner's. */
    s_hello(a, 4);
    s_hello(vt, 4);
    /* One goes: the next HELLO is welcome. */
    zsock_destroy(&b);
    bool welcome = false;
    for (int i = 0; i < 50 && !welcome; i++) {
        reply = s_hello_reply(c);
        welcome = reply && strcmp(s_str(reply, "cmd"), "WELCOME") == 0;
        json_decref(reply);
        if (!welcome)
            zclock_sleep(100);
    }
    ck_assert_msg(welcome, "a connection that went made no room");
    ck_assert(s_log_has("notification.log", "code=throttled", 1000));
    zsock_destroy(&a);
    zsock_destroy(&c);
    zsock_destroy(&vt);
    s_stop(pid);
}
END_TEST

/* All of a partner's open connections count, whatever they send: past
 * twice KH_NOTIFY_MAX_CONNECTIONS its handshakes are refused for now (the
 * client is told so, not that its key is refused), nothing of it goes
 * into the trail, and a connection closed makes room. */
START_TEST(a_partner_opens_at_most_twice_its_connections)
{
    char *const env[] = {"KH_NOTIFY_MAX_CONNECTIONS=1", NULL};
    pid_t pid = s_start_env("notification.log", env);
    ck_assert(s_log_has("notification.log", "event=ready", 10000));
    zsock_t *probes[2];
    for (int i = 0; i < 2; i++) {
        probes[i] = s_partner("avim");
        khpartner_send(probes[i], kh_proto_new(KH_CMD_PING, "probe"));
        json_t *pong = s_expect(probes[i], "PONG", 3000);
        ck_assert_ptr_nonnull(pong);
        json_decref(pong);
    }
    kh_error_t err;
    kh_client_t *more = kh_client_new(s_endpoint, s_path("hub.cert"),
                                      s_path("avim.cert"), &err);
    ck_assert_msg(more != NULL, "%s", err.message);
    kh_client_set_retries(more, 0);
    ck_assert_int_ne(kh_client_ping(more, 3000, &err), 0);
    ck_assert_msg(err.code == KH_E_THROTTLED, "%s (%s)", err.message,
                  kh_error_name(err.code));
    ck_assert(s_log_has("notification.log", "over=connections", 3000));
    /* Another partner is not counted with it. */
    zsock_t *vt = s_partner("veilig-thuis");
    s_hello(vt, 4);
    zsock_destroy(&probes[1]);
    kh_client_set_retries(more, 2);
    ck_assert_msg(kh_client_ping(more, 3000, &err) == 0, "%s (%s)", err.message,
                  kh_error_name(err.code));
    kh_client_destroy(&more);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'auth.refused'"),
                     0);
    zsock_destroy(&vt);
    zsock_destroy(&probes[0]);
    s_stop(pid);
}
END_TEST

/* A key moved to a partner that has all the connections it may have
 * already: the moved key's connection, registered for its partner before,
 * is that partner's one too many at its next HELLO, refused as throttled
 * like any other (also when that HELLO comes in the drain that read the
 * registry again, before the round drops the connection as its old
 * partner's: a window this test does not reach). */
START_TEST(a_moved_key_counts_among_its_new_partners_connections)
{
    char previous[KH_PARTNER_KEY_LEN + 1];
    s_rotate_avim(previous); /* its second key, in the overlap */
    char *const env[] = {"KH_NOTIFY_MAX_CONNECTIONS=1",
                         "KH_PARTNER_REFRESH_MS=3600000",
                         "KH_NOTIFY_PEER_TIMEOUT_MS=60000", NULL};
    pid_t pid = s_start_env("notification.log", env);
    zsock_t *old = s_partner("avim");
    s_hello(old, 1);
    zsock_t *zc = s_partner("zorgcoordinator");
    s_hello(zc, 1);
    zsock_t *added = s_move_key_to_zorgcoordinator(previous);
    json_t *reply = s_hello_reply(old);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "cmd"), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "throttled");
    json_decref(reply);
    zsock_destroy(&added);
    zsock_destroy(&zc);
    zsock_destroy(&old);
    s_stop(pid);
}
END_TEST

/* The next message on sock within timeout_ms, or NULL; never a DELIVER
 * (the caller's socket has none due). */
static json_t *s_next_no_deliver(zsock_t *sock, int timeout_ms)
{
    json_t *msg = khpartner_recv(sock, timeout_ms);
    ck_assert_msg(!msg || strcmp(s_str(msg, "cmd"), "DELIVER") != 0,
                  "got a DELIVER of referral %s meant for another partner",
                  s_str(msg, "referral_id"));
    return msg;
}

/* A connection that goes leaves its routing id free; another partner's
 * connection that takes it, silent or not, gets none of the deliveries of
 * the one that went, which come to that partner's next connection. The
 * routing id begins with a zero byte, as ZeroMQ's own do: one the hub
 * cannot tell apart from an id it gave. */
START_TEST(a_connection_on_a_gone_ones_routing_id_gets_none_of_its_deliveries)
{
    /* An ACK timeout and a silence limit far beyond the test's waits: only
     * noticing that avim's connection went keeps its deliveries off the
     * routing id. */
    pid_t pid = s_start_slow(30000, 60000);
    static const char rid[] = "\0kh-a";
    zsock_t *avim = s_partner_rid("avim", rid, 5);
    s_hello(avim, 8);
    zsock_destroy(&avim);
    zclock_sleep(300);
    /* Another partner's connection takes the routing id (its handshake
     * done, it is the id's peer) and says nothing while a delivery for
     * avim comes, for longer than several sweeps. */
    zsock_t *zc = s_partner_rid("zorgcoordinator", rid, 5);
    zclock_sleep(300);
    char id[37];
    s_delivery("avim", "urgent", 0, NULL, id);
    ck_assert_ptr_null(s_next_no_deliver(zc, 1500));
    /* A bad frame is refused and changes nothing; a HELLO is its own. */
    zstr_send(zc, "not messagepack");
    json_t *msg = s_next_no_deliver(zc, 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "REJECTED");
    ck_assert_str_eq(s_str(msg, "code"), "malformed");
    json_decref(msg);
    ck_assert_ptr_null(s_next_no_deliver(zc, 500));
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h");
    khpartner_send(zc, hello);
    msg = s_next_no_deliver(zc, 5000);
    ck_assert_ptr_nonnull(msg);
    ck_assert_str_eq(s_str(msg, "cmd"), "WELCOME");
    ck_assert_str_eq(s_str(msg, "partner"), "zorgcoordinator");
    json_decref(msg);
    ck_assert_ptr_null(s_next_no_deliver(zc, 1000));
    /* avim's next connection gets it, as its first attempt. */
    avim = s_partner("avim");
    s_hello(avim, 8);
    s_expect_delivery(avim, id, 1, 5000);
    ck_assert_ptr_null(s_next_no_deliver(zc, 200));
    char state[16];
    ck_assert_str_eq(s_state(id, state), "delivered");
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'delivery.sent'"),
                     1);
    ck_assert(s_log_has("notification.log", "reason=disconnected", 0));
    zsock_destroy(&avim);
    zsock_destroy(&zc);
    s_stop(pid);
}
END_TEST

/* A connection that sets its own routing id is refused and gets nothing;
 * the refusal is in the trail once. */
START_TEST(a_connection_that_sets_its_own_routing_id_is_refused)
{
    pid_t pid = s_start_slow(30000, 60000);
    char id[37];
    s_delivery("avim", "normal", 0, NULL, id);
    zsock_t *named = s_partner_rid("avim", "avim1", 5);
    for (int i = 0; i < 2; i++) {
        /* Answered under its cid, like any refusal: a partner matches
         * replies by it (protocol.md). */
        char cid[16];
        snprintf(cid, sizeof cid, "rid-%d", i);
        khpartner_send(named, kh_proto_new(KH_CMD_HELLO, cid));
        json_t *msg = s_next_no_deliver(named, 5000);
        ck_assert_ptr_nonnull(msg);
        ck_assert_str_eq(s_str(msg, "cmd"), "REJECTED");
        ck_assert_str_eq(s_str(msg, "code"), "bad_envelope");
        ck_assert_str_eq(s_str(msg, "cid"), cid);
        json_decref(msg);
    }
    ck_assert_ptr_null(s_next_no_deliver(named, 1000));
    char state[16];
    ck_assert_str_eq(s_state(id, state), "pending");
    ck_assert(s_wait_count("SELECT count(*) FROM audit_events WHERE action ="
                           " 'auth.refused' AND reason_code ="
                           " 'routing_id_chosen' AND outcome = 'refused'",
                           1, 3000));
    /* The same key without a chosen id is served. */
    zsock_t *avim = s_partner("avim");
    s_hello(avim, 8);
    s_expect_delivery(avim, id, 0, 5000);
    ck_assert_ptr_null(s_next_no_deliver(named, 200));
    zsock_destroy(&named);
    zsock_destroy(&avim);
    s_stop(pid);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *suite = suite_create("notification");
    TCase *tc = tcase_create("service");
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, offline_backlog_drains_in_order_within_the_window);
    tcase_add_test(tc, ack_twice_changes_once_and_foreign_ack_is_refused);
    tcase_add_test(tc, an_ack_whose_commit_fails_is_not_acked);
    tcase_add_test(tc, a_late_ack_of_a_retried_dead_letter_counts);
    tcase_add_test(tc, overdue_resends_take_credit_like_new_deliveries);
    tcase_add_test(tc, unacknowledged_is_resent_with_its_id_then_dead);
    tcase_add_test(tc, nack_retry_resends_and_nack_permanent_is_dead_at_once);
    tcase_add_test(tc, a_revoked_partners_deliveries_become_dead_letters);
    tcase_add_test(tc, a_revoked_partner_is_claimed_nothing);
    tcase_add_test(tc, overdue_urgent_escalates_with_a_copy_normal_does_not);
    tcase_add_test(tc,
                   each_overdue_delivery_gives_its_escalation_partner_a_copy);
    tcase_add_test(tc, killed_mid_stream_loses_nothing);
    tcase_add_loop_test(
        tc, a_partner_that_reconnects_gets_its_deliveries_at_once, 0, 2);
    tcase_add_test(tc, two_connections_of_one_partner_both_keep_working);
    tcase_add_test(tc, partners_connected_together_each_get_their_own);
    tcase_add_test(tc, the_next_hub_key_is_served_beside_the_current_one);
    tcase_add_test(tc, a_payload_that_is_not_text_is_sent_as_stored);
    tcase_add_loop_test(tc, one_claim_serves_a_wake_up_for_three_partners, 0,
                        2);
    tcase_add_loop_test(tc, with_wake_ups_a_full_window_drains_through_acks, 0,
                        2);
    tcase_add_test(tc, with_wake_ups_an_ack_finds_what_no_wake_up_announced);
    tcase_add_test(tc, unknown_key_and_bad_frames_are_refused);
    tcase_add_test(tc, a_key_refused_while_the_database_is_away_is_logged);
    tcase_add_test(tc, a_failed_ack_batch_never_overfills_the_window);
    tcase_add_test(tc, a_loop_held_up_finds_no_connection_silent);

    tcase_add_test(tc, a_gone_connections_deliveries_wait_for_room_on_another);
    tcase_add_test(tc, claims_have_no_index_but_their_own);
    tcase_add_test(tc, statements_never_walk_all_deliveries);
    tcase_add_test(tc, sent_deliveries_are_read_by_key_or_due_time);
    tcase_add_test(tc, batch_statements_join_no_ctes_row_by_row);
    tcase_add_test(tc, a_resend_with_nothing_due_reads_no_pending_delivery);
    suite_add_tcase(suite, tc);
    /* Escalations and dead letters against each other. */
    TCase *esc = tcase_create("escalation");
    tcase_add_checked_fixture(esc, s_setup, s_teardown);
    tcase_set_timeout(esc, 60);
    tcase_add_test(esc, urgent_deliveries_escalating_to_each_other_escalate);
    tcase_add_test(esc, an_urgent_dead_letter_escalates_too);
    tcase_add_test(esc, an_escalation_alert_says_why_no_copy_went_out);
    tcase_add_test(esc,
                   a_delivery_raised_to_urgent_escalates_after_its_own_time);
    tcase_add_test(esc, a_delivery_another_process_gave_up_frees_its_window);
    tcase_add_test(esc, a_nack_that_changes_nothing_is_not_counted);
    suite_add_tcase(suite, esc);

    TCase *refusals = tcase_create("refusals");
    tcase_add_checked_fixture(refusals, s_setup, s_teardown);
    tcase_set_timeout(refusals, 60);
    tcase_add_test(refusals, a_repeated_ack_is_no_refusal_even_when_throttled);
    suite_add_tcase(suite, refusals);

    TCase *moved = tcase_create("key_moved");
    tcase_add_checked_fixture(moved, s_setup, s_teardown);
    tcase_set_timeout(moved, 60);
    tcase_add_test(moved,
                   a_moved_keys_deliveries_go_again_once_the_registry_says_so);
    tcase_add_test(moved,
                   a_moved_key_counts_among_its_new_partners_connections);
    tcase_add_test(moved, a_revoked_partners_connection_is_forgotten_at_once);
    tcase_add_test(moved, a_revoked_key_is_refused_as_unknown_before_its_frame);
    tcase_add_test(moved, a_send_that_never_left_gives_its_attempt_back);
    tcase_add_test(moved, a_registry_change_not_yet_read_admits_no_key);
    suite_add_tcase(suite, moved);

    TCase *priority = tcase_create("resend_priority");
    tcase_add_checked_fixture(priority, s_setup, s_teardown);
    tcase_set_timeout(priority, 60);
    tcase_add_test(priority,
                   an_urgent_delivery_goes_before_an_overdue_normal_resend);
    tcase_add_test(priority, overdue_resends_go_most_urgent_first);
    tcase_add_test(priority, a_reclaim_resends_most_urgent_first);
    tcase_add_test(priority,
                   an_urgent_retry_goes_before_a_backlog_that_fills_the_window);
    suite_add_tcase(suite, priority);

    TCase *window = tcase_create("window");
    tcase_add_checked_fixture(window, s_setup, s_teardown);
    tcase_set_timeout(window, 60);
    tcase_add_test(window,
                   a_resend_rolled_back_still_takes_its_place_in_the_window);
    tcase_add_test(window, a_reclaim_rolled_back_is_made_again);
    tcase_add_test(window, a_young_delivery_made_due_at_once_is_resent);
    suite_add_tcase(suite, window);

    TCase *rid = tcase_create("routing_id");
    tcase_add_checked_fixture(rid, s_setup, s_teardown);
    tcase_set_timeout(rid, 60);
    tcase_add_test(
        rid,
        a_connection_on_a_gone_ones_routing_id_gets_none_of_its_deliveries);
    tcase_add_test(rid, a_connection_that_sets_its_own_routing_id_is_refused);
    suite_add_tcase(suite, rid);
    TCase *stranger = tcase_create("stranger");
    tcase_add_checked_fixture(stranger, s_setup, s_teardown);
    tcase_set_timeout(stranger, 60);
    tcase_add_test(stranger,
                   made_up_keys_at_the_handshake_are_audited_within_a_bound);
    tcase_add_test(stranger, bad_frames_without_end_do_not_fill_the_log);
    suite_add_tcase(suite, stranger);
    TCase *added = tcase_create("partner_added");
    tcase_add_checked_fixture(added, s_setup, s_teardown);
    tcase_set_timeout(added, 60);
    tcase_add_test(
        added, partners_added_at_run_time_are_each_known_at_their_first_hello);
    suite_add_tcase(suite, added);
    /* What a partner may do that the reference client never does. */
    TCase *odd = tcase_create("odd_partner");
    tcase_add_checked_fixture(odd, s_setup, s_teardown);
    tcase_set_timeout(odd, 60);
    tcase_add_test(odd,
                   an_ack_on_another_connection_frees_the_window_it_came_in);
    tcase_add_test(odd, a_connection_without_hello_is_sent_no_deliveries);
    tcase_add_test(odd, a_partner_without_cases_is_sent_nothing);
    tcase_add_test(odd, partner_connected_tells_the_window_its_hello_asked_for);
    tcase_add_test(odd,
                   a_connection_whose_key_overlap_ended_is_sent_nothing_more);
    tcase_add_test(odd, a_key_whose_overlap_ended_untold_is_served_nothing);
    tcase_add_test(odd, a_ping_on_a_key_whose_overlap_ended_is_refused);
    tcase_add_test(
        odd, a_receiving_key_whose_overlap_ended_untold_is_dropped_at_once);
    tcase_add_test(odd, an_ack_of_a_partner_revoked_untold_changes_nothing);
    tcase_add_test(odd, a_nack_of_a_partner_revoked_untold_changes_nothing);
    tcase_add_test(odd,
                   a_partner_refused_too_often_is_throttled_before_the_trail);
    tcase_add_test(odd, a_partner_over_its_connections_is_throttled);
    tcase_add_test(odd, a_partner_opens_at_most_twice_its_connections);
    suite_add_tcase(suite, odd);
    TCase *big = tcase_create("backlog");
    tcase_add_checked_fixture(big, s_setup, s_teardown);
    tcase_set_timeout(big, 280);
    tcase_add_test(big, a_large_backlog_drains_with_flat_memory);
    suite_add_tcase(suite, big);
    /* Statements of processes side by side on the same deliveries. */
    TCase *locks = tcase_create("locking");
    tcase_add_checked_fixture(locks, s_setup, s_teardown);
    tcase_set_timeout(locks, 60);
    tcase_add_test(locks, ack_batches_in_opposite_orders_do_not_deadlock);
    tcase_add_test(locks, an_ack_batch_and_deliveries_made_due_do_not_deadlock);
    tcase_add_test(locks, a_rounds_nacks_take_their_deliveries_by_id);
    suite_add_tcase(suite, locks);
    /* A database that refuses connections for a while. */
    TCase *away = tcase_create("database_away");
    tcase_add_checked_fixture(away, s_setup, s_teardown);
    tcase_set_timeout(away, 60);
    tcase_add_test(away, a_database_away_is_tried_ever_more_slowly);
    tcase_add_test(away, the_first_ack_after_the_database_was_away_is_acked);
    suite_add_tcase(suite, away);
    return suite;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
