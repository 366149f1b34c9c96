/*
 * Integration test of `ketenhub-partner listen` (tools/partner/listen.c and
 * the delivery calls of common/client.c), the built binary against a hub
 * side played by the test itself: a real CURVE ROUTER with zauth and a
 * partner certificate directory, speaking the Deliveries section of
 * schemas/protocol.md (WELCOME, DELIVER, ACKED, NACKED). It checks HELLO
 * and its heartbeat, files written before the ACK and never rewritten for
 * a re-send, NACKs for a damaged or malformed delivery, --exec and its
 * exit codes, reconnection after the hub went away, a refused key, clean
 * stops, and that the log holds no payload value. No database.
 */
#include <czmq.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/codec.h"
#include "ketenhub/proto.h"
#include "khproc.h"
#include "khtest.h"

#define PARTNER KH_TEST_BINARY_DIR "/tools/partner/ketenhub-partner"
#define CANARY "CANARY-91c4-personal-data"

#define D1 "bbbbbbbb-0000-4000-8000-000000000001"
#define D2 "bbbbbbbb-0000-4000-8000-000000000002"
#define D3 "bbbbbbbb-0000-4000-8000-000000000003"
#define D4 "bbbbbbbb-0000-4000-8000-000000000004"
#define D5 "bbbbbbbb-0000-4000-8000-000000000005"
#define D6 "bbbbbbbb-0000-4000-8000-000000000006"
#define REF "cccccccc-0000-4000-8000-000000000001"

/* The hub side: keys, zauth, the ROUTER and the partner's routing id. */
typedef struct {
    char *dir; /* hub.cert, px.cert(+_secret), certs/ (allowed keys) */
    zcert_t *hub;
    zactor_t *auth;
    zsock_t *router;
    int port;
    zframe_t *peer;
    int hellos;
    json_int_t hello_window; /* the last HELLO's window, 0 when absent */
    bool revoked;            /* answer HELLO with REJECTED unknown_partner */
    int throttle_ms; /* > 0: answer HELLO with REJECTED throttled, this wait */
    char *out;       /* a directory for the listener's output */
    char *log;       /* the listener's log (in dir) */
} s_hub_t;

static void s_hub_bind(s_hub_t *h)
{
    h->router = zsock_new(ZMQ_ROUTER);
    ck_assert_ptr_nonnull(h->router);
    zcert_apply(h->hub, h->router);
    zsock_set_curve_server(h->router, 1);
    zsock_set_zap_domain(h->router, "global");
    zsock_set_linger(h->router, 0);
    if (h->port == 0) {
        h->port = zsock_bind(h->router, "tcp://127.0.0.1:*");
        ck_assert_int_gt(h->port, 0);
    } else
        ck_assert_int_eq(zsock_bind(h->router, "tcp://127.0.0.1:%d", h->port),
                         h->port);
}

/* Keys and a bound ROUTER; the partner's key is allowed when admit. Also
 * an output directory and a log path for the listener under test. */
static void s_hub_new(s_hub_t *h, bool admit)
{
    memset(h, 0, sizeof *h);
    h->dir = khtest_tmpdir();
    h->out = khtest_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/listen.log", h->dir);
    h->log = strdup(path);
    snprintf(path, sizeof path, "%s/certs", h->dir);
    ck_assert_int_eq(mkdir(path, 0700), 0);
    h->hub = zcert_new();
    snprintf(path, sizeof path, "%s/hub.cert", h->dir);
    ck_assert_int_eq(zcert_save_public(h->hub, path), 0);
    zcert_t *px = zcert_new();
    snprintf(path, sizeof path, "%s/px.cert", h->dir);
    ck_assert_int_eq(zcert_save(px, path), 0);
    if (admit) {
        snprintf(path, sizeof path, "%s/certs/px.cert", h->dir);
        ck_assert_int_eq(zcert_save_public(px, path), 0);
    }
    zcert_destroy(&px);
    h->auth = zactor_new(zauth, NULL);
    ck_assert_ptr_nonnull(h->auth);
    snprintf(path, sizeof path, "%s/certs", h->dir);
    zstr_sendx(h->auth, "CURVE", path, NULL);
    zsock_wait(h->auth);
    s_hub_bind(h);
}

static void s_hub_destroy(s_hub_t *h)
{
    zframe_destroy(&h->peer);
    zsock_destroy(&h->router);
    zactor_destroy(&h->auth);
    zcert_destroy(&h->hub);
    khtest_rmtree(h->dir);
    free(h->dir);
    khtest_rmtree(h->out);
    free(h->out);
    free(h->log);
}

/* The next message from the partner other than HELLO (HELLOs are counted
 * and answered with WELCOME), or NULL after timeout_ms. */
static json_t *s_hub_recv(s_hub_t *h, int timeout_ms)
{
    zpoller_t *poller = zpoller_new(h->router, NULL);
    int64_t deadline = zclock_mono() + timeout_ms;
    json_t *out = NULL;
    while (!out && zclock_mono() < deadline) {
        if (!zpoller_wait(poller, (int) (deadline - zclock_mono())))
            break;
        zmsg_t *msg = zmsg_recv(h->router);
        ck_assert_ptr_nonnull(msg);
        ck_assert_uint_eq(zmsg_size(msg), 2);
        zframe_destroy(&h->peer);
        h->peer = zmsg_pop(msg);
        zframe_t *body = zmsg_pop(msg);
        json_t *doc = NULL;
        kh_error_t err;
        ck_assert_int_eq(kh_msgpack_decode(zframe_data(body), zframe_size(body),
                                           NULL, &doc, &err),
                         0);
        kh_cmd_t cmd;
        const char *cid;
        ck_assert_msg(kh_proto_check(doc, &cmd, &cid, &err) == 0, "%s %s",
                      err.path, err.message);
        if (cmd == KH_CMD_HELLO) {
            h->hellos++;
            h->hello_window =
                json_integer_value(json_object_get(doc, "window"));
            json_t *w =
                h->throttle_ms > 0
                    ? json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:b, s:i}", "v",
                                1, "cmd", "REJECTED", "cid", cid, "code",
                                "throttled", "path", "", "message",
                                "too many connections", "retryable", 1,
                                "retry_after_ms", h->throttle_ms)
                : h->revoked ? json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:b}",
                                         "v", 1, "cmd", "REJECTED", "cid", cid,
                                         "code", "unknown_partner", "path", "",
                                         "message", "revoked", "retryable", 0)
                             : json_pack("{s:i, s:s, s:s, s:s, s:i}", "v", 1,
                                         "cmd", "WELCOME", "cid", cid,
                                         "partner", "px", "window", 8);
            char *data;
            size_t size;
            ck_assert_int_eq(kh_msgpack_encode(w, &data, &size, &err), 0);
            zmsg_t *reply = zmsg_new();
            zmsg_append(reply, &(zframe_t *){zframe_dup(h->peer)});
            zmsg_addmem(reply, data, size);
            ck_assert_int_eq(zmsg_send(&reply, h->router), 0);
            free(data);
            json_decref(w);
            json_decref(doc);
        } else
            out = doc;
        zframe_destroy(&body);
        zmsg_destroy(&msg);
    }
    zpoller_destroy(&poller);
    return out;
}

/* Wait for the first HELLO (answered). */
static void s_hub_await_hello(s_hub_t *h, int timeout_ms)
{
    int before = h->hellos;
    int64_t deadline = zclock_mono() + timeout_ms;
    while (h->hellos == before && zclock_mono() < deadline) {
        json_t *other = s_hub_recv(h, 100);
        ck_assert_ptr_null(other);
    }
    ck_assert_int_gt(h->hellos, before);
}

static void s_hub_send(s_hub_t *h, json_t *msg)
{
    ck_assert_ptr_nonnull(h->peer);
    char *data;
    size_t size;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_encode(msg, &data, &size, &err), 0);
    zmsg_t *m = zmsg_new();
    zmsg_append(m, &(zframe_t *){zframe_dup(h->peer)});
    zmsg_addmem(m, data, size);
    ck_assert_int_eq(zmsg_send(&m, h->router), 0);
    free(data);
    json_decref(msg);
}

/* A DELIVER of payload (JSON text); sha NULL: the right hash. */
static json_t *s_deliver(const char *id, int attempt, const char *payload,
                         const char *sha, const char *priority)
{
    char hash[65];
    kh_sha256_hex(payload, strlen(payload), hash);
    return json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:i, s:s, s:s, s:s}", "v",
                     1, "cmd", "DELIVER", "cid", id, "delivery_id", id,
                     "referral_id", REF, "priority", priority, "attempt",
                     attempt, "routed_at", "2026-11-28T21:09:27.125Z",
                     "payload", payload, "payload_sha256", sha ? sha : hash);
}

/* Expect an ACK (reason NULL) or NACK with reason for id, and answer it. */
static void s_expect(s_hub_t *h, const char *id, const char *reason)
{
    json_t *m = s_hub_recv(h, 5000);
    ck_assert_msg(m != NULL, "no answer for %s", id);
    const char *cmd = json_string_value(json_object_get(m, "cmd"));
    ck_assert_str_eq(cmd, reason ? "NACK" : "ACK");
    ck_assert_str_eq(json_string_value(json_object_get(m, "delivery_id")), id);
    if (reason)
        ck_assert_str_eq(json_string_value(json_object_get(m, "reason")),
                         reason);
    const char *cid = json_string_value(json_object_get(m, "cid"));
    json_t *reply =
        reason ? json_pack("{s:i, s:s, s:s, s:s, s:b}", "v", 1, "cmd", "NACKED",
                           "cid", cid, "delivery_id", id, "dead",
                           strcmp(reason, "permanent") == 0)
               : json_pack("{s:i, s:s, s:s, s:s, s:b}", "v", 1, "cmd", "ACKED",
                           "cid", cid, "delivery_id", id, "duplicate", 0);
    s_hub_send(h, reply);
    json_decref(m);
}

/* Answer the ACK of id with ACKED (the ACK itself already received). */
static void s_expect_acked(s_hub_t *h, const char *id)
{
    char cid[64];
    snprintf(cid, sizeof cid, "ack:%s", id);
    s_hub_send(h, json_pack("{s:i, s:s, s:s, s:s, s:b}", "v", 1, "cmd", "ACKED",
                            "cid", cid, "delivery_id", id, "duplicate", 0));
}

static char *s_path(const char *dir, const char *name)
{
    char *p = malloc(4096);
    ck_assert_ptr_nonnull(p);
    snprintf(p, 4096, "%s/%s", dir, name);
    return p;
}

static pid_t s_spawn(s_hub_t *h, const char *log, char **mode, char **env)
{
    char endpoint[64], hub_cert[4096], cert[4096];
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%d", h->port);
    snprintf(hub_cert, sizeof hub_cert, "%s/hub.cert", h->dir);
    snprintf(cert, sizeof cert, "%s/px.cert", h->dir);
    char *argv[16] = {PARTNER,  "--endpoint", endpoint, "--hub-cert",
                      hub_cert, "--cert",     cert,     "listen"};
    int n = 8;
    for (int i = 0; mode[i] && n < 15; i++)
        argv[n++] = mode[i];
    argv[n] = NULL;
    pid_t pid = khproc_spawn(PARTNER, argv, env, log);
    ck_assert_int_gt(pid, 0);
    return pid;
}

/* listen --exec cmd against h, $T_DIR in its environment naming out;
 * returns once the hub has its HELLO. */
static pid_t s_spawn_exec(s_hub_t *h, const char *log, const char *out,
                          const char *cmd)
{
    char env_dir[4200];
    snprintf(env_dir, sizeof env_dir, "T_DIR=%s", out);
    char *env[] = {env_dir, NULL};
    char *mode[] = {"--exec", (char *) cmd, NULL};
    pid_t pid = s_spawn(h, log, mode, env);
    s_hub_await_hello(h, 5000);
    return pid;
}

START_TEST(test_usage)
{
    char *out = NULL;
    char *none[] = {PARTNER, "--hub-cert", "x", "--cert", "y", "listen", NULL};
    ck_assert_int_eq(khtest_run(none, &out), 2);
    free(out);
    char *both[] = {PARTNER, "--hub-cert", "x",      "--cert", "y", "listen",
                    "--dir", "/tmp",       "--exec", "true",   NULL};
    ck_assert_int_eq(khtest_run(both, &out), 2);
    free(out);
    char *window[] = {PARTNER,    "--hub-cert", "x",     "--cert",
                      "y",        "listen",     "--dir", "/tmp",
                      "--window", "0",          NULL};
    ck_assert_int_eq(khtest_run(window, &out), 2);
    free(out);
    char *nodir[] = {PARTNER, "--hub-cert",       "x", "--cert", "y", "listen",
                     "--dir", "/nonexistent/dir", NULL};
    ck_assert_int_eq(khtest_run(nodir, &out), 2);
    free(out);
    /* An empty command would run sh -c '' and ACK every delivery. */
    const char *empties[] = {"", " \t"};
    for (size_t i = 0; i < 2; i++) {
        char *empty[] = {PARTNER, "--hub-cert", "x",      "--cert",
                         "y",     "listen",     "--exec", (char *) empties[i],
                         NULL};
        ck_assert_int_eq(khtest_run(empty, &out), 2);
        ck_assert_ptr_nonnull(strstr(out, "--exec needs a command"));
        free(out);
    }
    char *help[] = {PARTNER, "listen", "--help", NULL};
    ck_assert_int_eq(khtest_run(help, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "--exec CMD"));
    free(out);
}
END_TEST

START_TEST(test_dir)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    char *mode[] = {"--dir", out, "--window", "8", "--count", "3", NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);

    s_hub_await_hello(&h, 5000);
    const char *payload = "{\"risk\":{\"acute_danger\":true},"
                          "\"summary\":\"" CANARY "\"}";
    /* Stored, then ACKed: the file is there when the ACK comes. */
    s_hub_send(&h, s_deliver(D1, 1, payload, NULL, "urgent"));
    char *f1 = s_path(out, D1 ".json");
    json_t *m = s_hub_recv(&h, 5000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "cmd")), "ACK");
    ck_assert_str_eq(json_string_value(json_object_get(m, "cid")), "ack:" D1);
    struct stat st;
    ck_assert_int_eq(stat(f1, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    json_error_t jerr;
    json_t *doc = json_load_file(f1, 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "delivery_id")),
                     D1);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "referral_id")),
                     REF);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "priority")),
                     "urgent");
    ck_assert_int_eq(json_integer_value(json_object_get(doc, "attempt")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "routed_at")),
                     "2026-11-28T21:09:27.125Z");
    json_t *want = json_loads(payload, 0, &jerr);
    ck_assert(json_equal(json_object_get(doc, "payload"), want));
    json_decref(want);
    json_decref(doc);
    s_hub_send(&h,
               json_pack("{s:i, s:s, s:s, s:s, s:b}", "v", 1, "cmd", "ACKED",
                         "cid", "ack:" D1, "delivery_id", D1, "duplicate", 0));
    json_decref(m);

    /* A damaged payload: NACK retry, nothing written. */
    s_hub_send(&h, s_deliver(D2, 1, payload,
                             "0000000000000000000000000000000000000000000000"
                             "000000000000000000",
                             "high"));
    s_expect(&h, D2, "retry");
    char *f2 = s_path(out, D2 ".json");
    ck_assert_int_ne(access(f2, F_OK), 0);

    /* A re-send of D1: ACKed again, the file is not rewritten. */
    khtest_write_file(f1, "kept");
    s_hub_send(&h, s_deliver(D1, 2, payload, NULL, "urgent"));
    s_expect(&h, D1, NULL);
    char *kept = khtest_read_file(f1);
    ck_assert_str_eq(kept, "kept");
    free(kept);

    /* Malformed (an unknown priority; an escalation_of that is not a
     * map of strings): NACK permanent. */
    s_hub_send(&h, s_deliver(D3, 1, payload, NULL, "bogus"));
    s_expect(&h, D3, "permanent");
    json_t *bad = s_deliver(D6, 1, payload, NULL, "urgent");
    json_object_set_new(bad, "escalation_of",
                        json_pack("{s:i, s:s}", "partner", 7, "waiting_since",
                                  "2026-11-28T21:09:27.125Z"));
    s_hub_send(&h, bad);
    s_expect(&h, D6, "permanent");

    /* The heartbeat goes on while nothing happens. */
    int before = h.hellos;
    ck_assert_ptr_null(s_hub_recv(&h, 2500));
    ck_assert_int_ge(h.hellos - before, 2);

    /* Two more stored: with D1 that makes --count 3, and it exits 0 once
     * its ACKs are answered. D4 is an escalation copy: its file says whose
     * delivery was overdue. */
    json_t *copy = s_deliver(D4, 1, "{\"summary\":\"x\"}", NULL, "urgent");
    json_object_set_new(copy, "escalation_of",
                        json_pack("{s:s, s:s}", "partner", "avim",
                                  "waiting_since",
                                  "2026-11-28T21:09:27.125318Z"));
    s_hub_send(&h, copy);
    s_expect(&h, D4, NULL);
    char *f4 = s_path(out, D4 ".json");
    doc = json_load_file(f4, 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    json_t *of = json_object_get(doc, "escalation_of");
    ck_assert_str_eq(json_string_value(json_object_get(of, "partner")), "avim");
    ck_assert_str_eq(json_string_value(json_object_get(of, "waiting_since")),
                     "2026-11-28T21:09:27.125318Z");
    json_decref(doc);
    free(f4);
    s_hub_send(&h, s_deliver(D5, 1, "{\"summary\":\"y\"}", NULL, "normal"));
    s_expect(&h, D5, NULL);
    int status = khproc_stop(pid, 0, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);

    /* Only the three files, no temp file left; the log has ids only. */
    char *listing = NULL;
    char *ls[] = {"/bin/ls", "-A", out, NULL};
    ck_assert_int_eq(khtest_run(ls, &listing), 0);
    ck_assert_str_eq(listing, D1 ".json\n" D4 ".json\n" D5 ".json\n");
    free(listing);
    char *text = khtest_read_file(log);
    ck_assert_ptr_nonnull(text);
    ck_assert_ptr_null(strstr(text, CANARY));
    ck_assert_ptr_nonnull(strstr(text, "delivery_id=" D1));
    ck_assert_ptr_nonnull(strstr(text, "outcome=stored"));
    ck_assert_ptr_nonnull(strstr(text, "outcome=duplicate"));
    ck_assert_ptr_nonnull(strstr(text, "payload_sha256_mismatch"));
    ck_assert_ptr_nonnull(strstr(text, "event=welcome"));
    free(text);
    free(f1);
    free(f2);
    s_hub_destroy(&h);
}
END_TEST

START_TEST(test_exec_reconnect_stop)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    pid_t pid =
        s_spawn_exec(&h, log, out,
                     "f=\"$T_DIR/$KH_DELIVERY_ID.in\"; cat > \"$f\";"
                     " if grep -q perm \"$f\"; then exit 3; fi;"
                     " if grep -q again \"$f\"; then exit 1; fi; exit 0");

    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"ok\"}", NULL, "high"));
    s_expect(&h, D1, NULL);
    char *in = s_path(out, D1 ".in");
    json_error_t jerr;
    json_t *doc = json_load_file(in, 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    ck_assert_str_eq(json_string_value(json_object_get(doc, "delivery_id")),
                     D1);
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_object_get(doc, "payload"), "summary")),
                     "ok");
    json_decref(doc);
    free(in);
    s_hub_send(&h, s_deliver(D2, 1, "{\"summary\":\"perm\"}", NULL, "high"));
    s_expect(&h, D2, "permanent");
    s_hub_send(&h, s_deliver(D3, 1, "{\"summary\":\"again\"}", NULL, "high"));
    s_expect(&h, D3, "retry");

    /* The hub goes away and comes back on the same port: the listener
     * reconnects and says HELLO again. */
    zsock_destroy(&h.router);
    zframe_destroy(&h.peer);
    zclock_sleep(1500);
    s_hub_bind(&h);
    s_hub_await_hello(&h, 10000);
    s_hub_send(&h, s_deliver(D4, 1, "{\"summary\":\"ok\"}", NULL, "normal"));
    s_expect(&h, D4, NULL);

    /* SIGTERM stops it cleanly. */
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "outcome=nack_permanent"));
    ck_assert_ptr_nonnull(strstr(text, "event=stopped"));
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* A listener started with SIGCHLD ignored (a parent's setting that exec
 * keeps) still reads its command's exit status: ACK on 0, NACK permanent
 * on 3, not "cannot start the command" for both. */
START_TEST(test_exec_sigchld_ignored)
{
    s_hub_t h;
    s_hub_new(&h, true);
    struct sigaction ignore = {.sa_handler = SIG_IGN}, was;
    ck_assert_int_eq(sigaction(SIGCHLD, &ignore, &was), 0);
    char *mode[] = {"--exec", "if grep -q perm; then exit 3; fi", NULL};
    pid_t pid = s_spawn(&h, h.log, mode, NULL);
    ck_assert_int_eq(sigaction(SIGCHLD, &was, NULL), 0);
    s_hub_await_hello(&h, 5000);
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"ok\"}", NULL, "high"));
    s_expect(&h, D1, NULL);
    s_hub_send(&h, s_deliver(D2, 1, "{\"summary\":\"perm\"}", NULL, "high"));
    s_expect(&h, D2, "permanent");
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(h.log);
    ck_assert_ptr_null(strstr(text, "cannot_start_command"));
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* A re-send is ACKed again only when what has its name in DIR is a file
 * that could be made durable: something else there (here a directory) is
 * not the delivery stored, so it is NACKed for a re-send, and stored once
 * the name is free. */
START_TEST(test_dir_name_taken)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    char *taken = s_path(out, D1 ".json");
    ck_assert_int_eq(mkdir(taken, 0700), 0);
    char *mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    s_hub_await_hello(&h, 5000);

    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"x\"}", NULL, "high"));
    s_expect(&h, D1, "retry");
    ck_assert_int_eq(rmdir(taken), 0);
    s_hub_send(&h, s_deliver(D1, 2, "{\"summary\":\"x\"}", NULL, "high"));
    s_expect(&h, D1, NULL);
    /* A symbolic link at the name, even to a regular file, is not the
     * delivery stored: never followed, it is NACKed too. */
    char *linked = s_path(out, D2 ".json");
    ck_assert_int_eq(symlink(taken, linked), 0);
    s_hub_send(&h, s_deliver(D2, 1, "{\"summary\":\"y\"}", NULL, "high"));
    s_expect(&h, D2, "retry");
    free(linked);
    json_error_t jerr;
    json_t *doc = json_load_file(taken, 0, &jerr);
    ck_assert_ptr_nonnull(doc);
    ck_assert_int_eq(json_integer_value(json_object_get(doc, "attempt")), 2);
    json_decref(doc);

    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    free(taken);
    s_hub_destroy(&h);
}
END_TEST

/* Temp files that a listener left when it died while writing hold a
 * delivery's personal data: the next start removes them (those of
 * earlier versions' names too), not one that a live listener holds
 * locked while it writes it, nor other files. A command runs one
 * delivery at a time, so --exec asks for a window of 1 unless told
 * otherwise. */
START_TEST(test_dir_stale_and_exec_window)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out;
    const char *names[] = {
        "." D1 ".0123456789abcdef.tmp", "." D2 ".2147483646.tmp",
        "." D2 ".fedcba9876543210.tmp", ".keep.tmp", D3 ".json"};
    enum { S_DEAD = 2, S_LIVE = 2, S_NAMES = 5 };
    int live = -1;
    for (size_t i = 0; i < S_NAMES; i++) {
        char *path = s_path(out, names[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        ck_assert_int_ge(fd, 0);
        static const char text[] = "{\"summary\":\"" CANARY "\"}";
        ck_assert_int_eq(write(fd, text, sizeof text - 1),
                         (ssize_t) sizeof text - 1);
        if (i == S_LIVE) {
            ck_assert_int_eq(flock(fd, LOCK_EX), 0);
            live = fd;
        } else
            close(fd);
        free(path);
    }
    char *log = h.log;
    char *dir_mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, log, dir_mode, NULL);
    s_hub_await_hello(&h, 5000);
    ck_assert_int_eq(h.hello_window, 0); /* the hub's default */
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    close(live);
    for (size_t i = 0; i < S_NAMES; i++) {
        char *path = s_path(out, names[i]);
        ck_assert_msg((access(path, F_OK) == 0) == (i >= S_DEAD), "%s",
                      names[i]);
        free(path);
    }
    char *text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "event=stale_removed files=2"));
    free(text);

    char *exec_mode[] = {"--exec", "cat >/dev/null", NULL};
    pid = s_spawn(&h, log, exec_mode, NULL);
    s_hub_await_hello(&h, 5000);
    ck_assert_int_eq(h.hello_window, 1);
    status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    s_hub_destroy(&h);
}
END_TEST

static bool s_alive(pid_t pid);

/* --exec-timeout: a command that runs too long is ended, with what it
 * started, and its delivery NACKed for a re-send. The delivery goes to its
 * stdin as it reads: one that never reads a delivery larger than a pipe
 * holds does not hold the listener in the write either. */
START_TEST(test_exec_timeout)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    char env_dir[4200];
    snprintf(env_dir, sizeof env_dir, "T_DIR=%s", out);
    char *env[] = {env_dir, NULL};
    char *mode[] = {"--exec",
                    "sleep 60 & echo $! > \"$T_DIR/pid\"; wait; exit 0",
                    "--exec-timeout", "1", NULL};
    pid_t pid = s_spawn(&h, log, mode, env);
    s_hub_await_hello(&h, 5000);
    size_t big = 200 * 1024; /* more than a pipe holds */
    char *payload = malloc(big + 32);
    ck_assert_ptr_nonnull(payload);
    strcpy(payload, "{\"summary\":\"");
    size_t at = strlen(payload);
    memset(payload + at, 'x', big);
    strcpy(payload + at + big, "\"}");
    int64_t started = zclock_mono();
    s_hub_send(&h, s_deliver(D1, 1, payload, NULL, "high"));
    s_expect(&h, D1, "retry");
    int64_t took = zclock_mono() - started;
    ck_assert_msg(took < 6000, "NACKed after %lld ms", (long long) took);
    char *pidfile = s_path(out, "pid");
    char *text = khtest_read_file(pidfile);
    free(pidfile);
    ck_assert_ptr_nonnull(text);
    pid_t sleeper = (pid_t) atol(text);
    free(text);
    ck_assert_int_gt(sleeper, 1);
    ck_assert(!s_alive(sleeper));
    text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "event=command_timeout"));
    free(text);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);

    /* A command that reads slowly gets the whole delivery. */
    char *mode2[] = {"--exec", "sleep 0.3; cat > \"$T_DIR/in\"", NULL};
    pid = s_spawn(&h, log, mode2, env);
    s_hub_await_hello(&h, 5000);
    s_hub_send(&h, s_deliver(D2, 1, payload, NULL, "high"));
    s_expect(&h, D2, NULL);
    json_error_t jerr;
    char *in = s_path(out, "in");
    json_t *doc = json_load_file(in, 0, &jerr);
    free(in);
    ck_assert_msg(doc != NULL, "%s", jerr.text);
    const json_t *summary =
        json_object_get(json_object_get(doc, "payload"), "summary");
    ck_assert_uint_eq(json_string_length(summary), big);
    json_decref(doc);
    status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    free(payload);
    s_hub_destroy(&h);
}
END_TEST

/* A command that takes longer than the listener waits for a WELCOME
 * before it calls the hub silent: the hub answered every HELLO meanwhile
 * (they wait unread while CMD runs), so the log must not say it fell
 * silent. */
START_TEST(test_exec_slow_hub_not_silent)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *log = h.log;
    char *mode[] = {"--exec", "cat > /dev/null; sleep 4", NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"slow\"}", NULL, "high"));
    int before = h.hellos;
    s_expect(&h, D1, NULL);
    ck_assert_int_ge(h.hellos - before, 3); /* the heartbeat went on */
    /* A little longer, for the WELCOMEs that waited to be read. */
    ck_assert_ptr_null(s_hub_recv(&h, 1500));
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "outcome=accepted"));
    ck_assert_msg(strstr(text, "hub_silent") == NULL, "%s", text);
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* Whether pid runs (a zombie does not). */
static bool s_alive(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", (int) pid);
    char *stat = khtest_read_file(path);
    if (!stat)
        return false;
    const char *end = strrchr(stat, ')');
    bool alive = end && end[1] == ' ' && end[2] != 'Z' && end[2] != 'X';
    free(stat);
    return alive;
}

/* A stop signal while CMD runs: the listener does not wait for a command
 * that takes its time (a container's stop grants 10 s). It ends CMD, with
 * everything CMD started, NACKs the delivery for a re-send and exits 0. */
START_TEST(test_exec_stop_while_running)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    pid_t pid =
        s_spawn_exec(&h, log, out,
                     "cat > /dev/null; sleep 60 & echo $! > \"$T_DIR/pid.tmp\";"
                     " mv \"$T_DIR/pid.tmp\" \"$T_DIR/pid\"; wait; exit 0");
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"slow\"}", NULL, "high"));

    /* CMD is running (it wrote its sleep's pid) when the listener is told to
     * stop. */
    char *pidfile = s_path(out, "pid");
    int64_t deadline = zclock_mono() + 5000;
    while (access(pidfile, F_OK) != 0 && zclock_mono() < deadline)
        ck_assert_ptr_null(s_hub_recv(&h, 50));
    char *text = khtest_read_file(pidfile);
    ck_assert_ptr_nonnull(text);
    pid_t cmd = (pid_t) atol(text);
    ck_assert_int_gt(cmd, 1);
    free(text);
    ck_assert_int_eq(kill(pid, SIGTERM), 0);
    int64_t started = zclock_mono();
    s_expect(&h, D1, "retry");
    int status = khproc_stop(pid, 0, 10000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    ck_assert_int_lt(zclock_mono() - started, 6000);
    /* Nothing of CMD is left: not even what it started. */
    ck_assert_msg(!s_alive(cmd), "CMD's sleep %d still runs", (int) cmd);
    text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "outcome=nack_retry"));
    ck_assert_ptr_nonnull(strstr(text, "event=stopped"));
    free(text);
    free(pidfile);
    s_hub_destroy(&h);
}
END_TEST

START_TEST(test_key_refused)
{
    s_hub_t h;
    s_hub_new(&h, false);
    char *out = h.out;
    char *mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, NULL, mode, NULL);
    /* Nothing gets through; the listener gives up with exit 3. */
    ck_assert_ptr_null(s_hub_recv(&h, 1000));
    int status = khproc_stop(pid, 0, 10000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 3, "status %d",
                  status);
    s_hub_destroy(&h);

    /* In the directory but revoked in the registry: the hub answers HELLO
     * with REJECTED unknown_partner, and the listener gives up too. */
    s_hub_new(&h, true);
    h.revoked = true;
    out = h.out;
    char *mode2[] = {"--dir", out, NULL};
    pid = s_spawn(&h, NULL, mode2, NULL);
    s_hub_await_hello(&h, 5000);
    status = khproc_stop(pid, 0, 10000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 3, "status %d",
                  status);
    s_hub_destroy(&h);
}
END_TEST

/* A command ended by the listener (--exec-timeout, or a stop) has not
 * finished its work, whatever status it exits with: one that catches
 * SIGTERM and exits 0 must not have its delivery ACKed. */
START_TEST(test_exec_ended_exit_0)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *log = h.log;
    char *mode[] = {"--exec",
                    "trap 'exit 0' TERM; cat > /dev/null; sleep 60 & wait",
                    "--exec-timeout", "1", NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"x\"}", NULL, "high"));
    s_expect(&h, D1, "retry");
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(log);
    ck_assert_ptr_nonnull(strstr(text, "event=command_timeout"));
    ck_assert_ptr_null(strstr(text, "outcome=accepted"));
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* A DELIVER larger than what a partner may send (the payload of a large
 * referral, its non-ASCII text escaped in canonical JSON): the client
 * takes frames and strings up to 1 MiB on this connection
 * (schemas/protocol.md), so it is stored and ACKed, not dropped unread. */
START_TEST(test_dir_large_delivery)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    char *mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    size_t big = 1000 * 1024;
    char *payload = malloc(big + 32);
    ck_assert_ptr_nonnull(payload);
    strcpy(payload, "{\"summary\":\"");
    size_t at = strlen(payload);
    memset(payload + at, 'x', big - at - 2);
    strcpy(payload + big - 2, "\"}");
    ck_assert_uint_eq(strlen(payload), big);
    s_hub_send(&h, s_deliver(D1, 1, payload, NULL, "normal"));
    s_expect(&h, D1, NULL);
    char *f1 = s_path(out, D1 ".json");
    json_error_t jerr;
    json_t *doc = json_load_file(f1, 0, &jerr);
    ck_assert_msg(doc != NULL, "%s", jerr.text);
    ck_assert_uint_eq(json_string_length(json_object_get(
                          json_object_get(doc, "payload"), "summary")),
                      big - at - 2);
    json_decref(doc);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    free(f1);
    free(payload);
    s_hub_destroy(&h);
}
END_TEST

/* A listener in a container runs with the same pid after each restart: a
 * temp file of an earlier version, named with the pid of this run, is a
 * dead run's all the same (no writer holds it locked), and is removed. */
START_TEST(test_dir_stale_same_pid)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out;
    char endpoint[64], hub_cert[4096], cert[4096];
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%d", h.port);
    snprintf(hub_cert, sizeof hub_cert, "%s/hub.cert", h.dir);
    snprintf(cert, sizeof cert, "%s/px.cert", h.dir);
    /* The shell writes the temp file with its pid, which exec keeps. */
    char *argv[] = {"/bin/sh",
                    "-c",
                    "printf '%s' '" CANARY "' > \"$1/." D1 ".$$.tmp\"; "
                    "exec \"$2\" --endpoint \"$3\" --hub-cert \"$4\" --cert "
                    "\"$5\" listen --dir \"$1\"",
                    "sh",
                    out,
                    PARTNER,
                    endpoint,
                    hub_cert,
                    cert,
                    NULL};
    pid_t pid = khproc_spawn("/bin/sh", argv, NULL, h.log);
    ck_assert_int_gt(pid, 0);
    s_hub_await_hello(&h, 5000);
    char name[128];
    snprintf(name, sizeof name, "." D1 ".%ld.tmp", (long) pid);
    char *path = s_path(out, name);
    ck_assert_msg(access(path, F_OK) != 0, "%s is left", name);
    free(path);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    char *text = khtest_read_file(h.log);
    ck_assert_ptr_nonnull(strstr(text, "event=stale_removed files=1"));
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* A listener that the hub never answers (here: a hub certificate that is
 * not the hub's, which ZeroMQ retries quietly for ever) says so in its
 * log instead of saying nothing after "listening". */
START_TEST(test_hub_silent_from_start)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    zcert_t *other = zcert_new();
    char *hub_cert = s_path(h.dir, "hub.cert");
    ck_assert_int_eq(zcert_save_public(other, hub_cert), 0);
    zcert_destroy(&other);
    free(hub_cert);
    char *mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    ck_assert_msg(khtest_log_has(log, "event=hub_silent", 8000), "no warning");
    ck_assert_int_eq(h.hellos, 0);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    s_hub_destroy(&h);
}
END_TEST

/* A frame from the hub that is no message (not MessagePack, or no map
 * with a cmd) cannot be answered: the log says it was dropped and why,
 * and the deliveries after it are stored as ever. */
START_TEST(test_frame_dropped_is_logged)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *out = h.out, *log = h.log;
    char *mode[] = {"--dir", out, NULL};
    pid_t pid = s_spawn(&h, log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    zmsg_t *m = zmsg_new();
    zmsg_append(m, &(zframe_t *){zframe_dup(h.peer)});
    zmsg_addmem(m, "\xc1", 1); /* a byte MessagePack never uses */
    ck_assert_int_eq(zmsg_send(&m, h.router), 0);
    ck_assert_msg(khtest_log_has(log, "event=frame_dropped count=1", 5000),
                  "no frame_dropped in %s", log);
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"x\"}", NULL, "high"));
    s_expect(&h, D1, NULL);
    int status = khproc_stop(pid, SIGTERM, 5000);
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status %d",
                  status);
    s_hub_destroy(&h);
}
END_TEST

/* A HELLO refused throttled (the partner has as many connections as the
 * hub serves) is sent again only after retry_after_ms, and the hub, which
 * answered, is not taken for silent meanwhile. */
START_TEST(test_hello_throttled_waits)
{
    s_hub_t h;
    s_hub_new(&h, true);
    h.throttle_ms = 4000;
    char *mode[] = {"--dir", h.out, NULL};
    pid_t pid = s_spawn(&h, h.log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    int first = h.hellos;
    ck_assert_ptr_null(s_hub_recv(&h, 3000));
    ck_assert_int_eq(h.hellos, first);
    h.throttle_ms = 0;
    s_hub_await_hello(&h, 3000);
    ck_assert_int_eq(khproc_stop(pid, SIGTERM, 5000), 0);
    char *text = khtest_read_file(h.log);
    ck_assert_ptr_null(strstr(text, "event=hub_silent"));
    free(text);
    s_hub_destroy(&h);
}
END_TEST

/* An ACK the hub could not commit (REJECTED unavailable) is sent again
 * after retry_after_ms, not sooner. */
START_TEST(test_ack_unavailable_waits)
{
    s_hub_t h;
    s_hub_new(&h, true);
    char *mode[] = {"--dir", h.out, NULL};
    pid_t pid = s_spawn(&h, h.log, mode, NULL);
    s_hub_await_hello(&h, 5000);
    s_hub_send(&h, s_deliver(D1, 1, "{\"summary\":\"x\"}", NULL, "normal"));
    json_t *m = s_hub_recv(&h, 5000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "cmd")), "ACK");
    json_decref(m);
    s_hub_send(&h, json_pack("{s:i, s:s, s:s, s:s, s:s, s:s, s:b, s:i}", "v", 1,
                             "cmd", "REJECTED", "cid", "ack:" D1, "code",
                             "unavailable", "path", "", "message", "later",
                             "retryable", 1, "retry_after_ms", 6500));
    int64_t sent = zclock_mono();
    m = s_hub_recv(&h, 8000);
    ck_assert_ptr_nonnull(m);
    ck_assert_str_eq(json_string_value(json_object_get(m, "cmd")), "ACK");
    ck_assert_int_ge(zclock_mono() - sent, 6400);
    json_decref(m);
    s_expect_acked(&h, D1);
    ck_assert_int_eq(khproc_stop(pid, SIGTERM, 5000), 0);
    s_hub_destroy(&h);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("listen");
    TCase *tc = tcase_create("listen");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_usage);
    tcase_add_test(tc, test_dir);
    tcase_add_test(tc, test_dir_name_taken);
    tcase_add_test(tc, test_dir_stale_and_exec_window);
    tcase_add_test(tc, test_exec_reconnect_stop);
    tcase_add_test(tc, test_exec_sigchld_ignored);
    tcase_add_test(tc, test_exec_stop_while_running);
    tcase_add_test(tc, test_exec_timeout);
    tcase_add_test(tc, test_exec_slow_hub_not_silent);
    tcase_add_test(tc, test_key_refused);
    tcase_add_test(tc, test_exec_ended_exit_0);
    tcase_add_test(tc, test_dir_large_delivery);
    tcase_add_test(tc, test_dir_stale_same_pid);
    tcase_add_test(tc, test_hub_silent_from_start);
    tcase_add_test(tc, test_frame_dropped_is_logged);
    tcase_add_test(tc, test_hello_throttled_waits);
    tcase_add_test(tc, test_ack_unavailable_waits);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
