/*
 * Garbage on the partner sockets (issue 6, part 6): a thousand raw TCP
 * connections to intake's partner socket, and to notification's delivery
 * socket, that never speak (half-open), send random bytes, or send a
 * ZMTP greeting the hub cannot take (wrong mechanism, or CURVE followed by
 * a broken command) -- and more opened and closed all along -- while a
 * real partner with its CURVE key submits referrals (intake) or receives
 * and acknowledges deliveries (notification). The real partner's requests
 * must complete within a bound, the services stay up, the silent
 * connections are dropped by the handshake timeout (KH_HANDSHAKE_MS) and
 * every file descriptor comes back once the garbage is gone.
 *
 * The test raises its own open-file limit to the hard limit (the services
 * inherit it); a hard limit too low for the test fails it.
 */
#include <arpa/inet.h>
#include <czmq.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "ketenhub/codec.h"
#include "ketenhub/proto.h"
#include "ketenhub/zap.h"
#include "khpartner.h"
#include "khproc.h"
#include "khtest.h"

#define S_DB "kh_test_rawtcp"
#define S_GARBAGE 1000    /* connections held at once */
#define S_REQUESTS 40     /* the real partner's SUBMITs */
#define S_DELIVERIES 40   /* deliveries to the real partner */
#define S_NOISY_MS 5000   /* the real partner works amid garbage */
#define S_BOUND_MS 2000   /* one request, answered (generous: 2 cores) */
#define S_FD_SLACK 40     /* fds a service may keep over its baseline */
#define S_NEEDED_FDS 2600 /* this process: garbage, churn, ZeroMQ */

static char s_dir[256];
static char *s_conninfo;
static PGconn *s_db;
static int s_port;
static char s_endpoint[64];
static int s_seq;

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

static void s_register(const char *id, const char *kind)
{
    khpartner_make(s_db, s_dir, id, kind, true);
}

static void s_setup(void)
{
    struct rlimit limit;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &limit), 0);
    ck_assert_msg(limit.rlim_max >= S_NEEDED_FDS,
                  "the hard open-file limit %lu is below the %d this test "
                  "needs (ulimit -Hn)",
                  (unsigned long) limit.rlim_max, S_NEEDED_FDS);
    limit.rlim_cur = limit.rlim_max;
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &limit), 0);

    snprintf(s_dir, sizeof s_dir, "/tmp/kh-rawtcp-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    ck_assert_int_eq(khproc_sh("mkdir -p '%s/partners'", s_dir), 0);
    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    s_register("veilig-thuis", "veilig_thuis");
    s_register("avim", "police");
    s_port = khproc_free_port();
    snprintf(s_endpoint, sizeof s_endpoint, "tcp://127.0.0.1:%d", s_port);
}

static void s_teardown(void)
{
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khtest_rmtree(s_dir);
}

/* Start service binary (a path under the build dir) with env_extra. */
static pid_t s_spawn(const char *binary, const char *log, char **env_extra)
{
    char env_db[1024], env_cert[600], env_dir[600], env_schema[600];
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(env_cert, sizeof env_cert, "KH_HUB_CERT=%s", s_path("hub.cert"));
    snprintf(env_dir, sizeof env_dir, "KH_PARTNER_CERT_DIR=%s",
             s_path("partners"));
    snprintf(env_schema, sizeof env_schema, "KH_SCHEMA_DIR=%s",
             khtest_src("schemas"));
    char *env[16] = {env_db,
                     env_cert,
                     env_dir,
                     env_schema,
                     "KH_LOG_LEVEL=info",
                     "KH_HEALTH_ENDPOINT=none"};
    int n = 6;
    for (int i = 0; env_extra[i] && n < 15; i++)
        env[n++] = env_extra[i];
    env[n] = NULL;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", KH_TEST_BINARY_DIR, binary);
    const char *slash = strrchr(binary, '/');
    char *argv[] = {(char *) (slash ? slash + 1 : binary), NULL};
    pid_t pid = khproc_spawn(path, argv, env, s_path(log));
    ck_assert_int_gt(pid, 0);
    return pid;
}

static void s_stop(pid_t pid, const char *what)
{
    ck_assert_msg(kill(pid, 0) == 0, "%s is gone", what);
    int status = khproc_stop(pid, SIGTERM, 8000);
    ck_assert_msg(status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "%s did not stop cleanly: status %d", what, status);
}

/* Open file descriptors of process pid. */
static int s_fds(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd", (int) pid);
    DIR *dir = opendir(path);
    ck_assert_ptr_nonnull(dir);
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL)
        count += entry->d_name[0] != '.';
    closedir(dir);
    return count;
}

/* Wait until pid holds at most max fds; the last count. */
static int s_wait_fds(pid_t pid, int max, int timeout_ms)
{
    int64_t deadline = zclock_mono() + timeout_ms;
    int fds = s_fds(pid);
    while (fds > max && zclock_mono() < deadline) {
        zclock_sleep(200);
        fds = s_fds(pid);
    }
    return fds;
}

/* --- garbage ----------------------------------------------------------- */

typedef enum {
    S_SILENT,    /* connects and never speaks */
    S_RANDOM,    /* random bytes */
    S_NULL_MECH, /* a ZMTP 3.0 greeting for the NULL mechanism */
    S_BAD_CURVE, /* a CURVE greeting, then a broken HELLO command */
    S_KINDS
} s_kind_t;

/* A ZMTP 3.0 greeting (64 bytes) offering mechanism. */
static void s_greeting(unsigned char *out, const char *mechanism)
{
    memset(out, 0, 64);
    out[0] = 0xff;
    out[9] = 0x7f;
    out[10] = 3; /* version 3.0 */
    memcpy(out + 12, mechanism, strlen(mechanism));
}

/* Send kind's bytes on fd (non-blocking; what does not fit is dropped). */
static void s_speak(int fd, s_kind_t kind, unsigned seed)
{
    unsigned char buf[512];
    size_t len = 0;
    if (kind == S_RANDOM) {
        len = 64 + seed % 400;
        for (size_t i = 0; i < len; i++)
            buf[i] = (unsigned char) rand_r(&seed);
    } else if (kind == S_NULL_MECH) {
        s_greeting(buf, "NULL");
        len = 64;
    } else if (kind == S_BAD_CURVE) {
        s_greeting(buf, "CURVE");
        /* A long command frame claiming 2^62 bytes, then a few. */
        unsigned char bad[] = {0x06, 0x40, 0, 0, 0, 0, 0, 0, 0, 5, 'H', 'E'};
        memcpy(buf + 64, bad, sizeof bad);
        len = 64 + sizeof bad;
    }
    /* The hub may have closed it already: that is its right. */
    ssize_t sent = len ? send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
    (void) sent;
}

/* A non-blocking TCP connection to 127.0.0.1:port, or -1. */
static int s_connect(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t) port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *) &addr, sizeof addr) < 0 &&
        errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Open S_GARBAGE connections to port, each of one kind in turn, and wait
 * until they are established (the hub's backlog is short, so this may take
 * a moment). Returns how many got through; fds[] holds them all. */
static int s_open_garbage(int port, int *fds)
{
    for (int i = 0; i < S_GARBAGE; i++) {
        fds[i] = s_connect(port);
        ck_assert_msg(fds[i] >= 0, "socket %d: %s", i, strerror(errno));
    }
    int established = 0;
    int64_t deadline = zclock_mono() + 20000;
    bool *done = calloc(S_GARBAGE, sizeof *done);
    ck_assert_ptr_nonnull(done);
    while (established < S_GARBAGE && zclock_mono() < deadline) {
        for (int i = 0; i < S_GARBAGE; i++) {
            if (done[i])
                continue;
            struct pollfd pfd = {fds[i], POLLOUT, 0};
            if (poll(&pfd, 1, 0) == 1) {
                int error = 0;
                socklen_t len = sizeof error;
                getsockopt(fds[i], SOL_SOCKET, SO_ERROR, &error, &len);
                done[i] = true;
                if (error == 0) {
                    established++;
                    s_speak(fds[i], (s_kind_t) (i % S_KINDS), (unsigned) i);
                }
            }
        }
        zclock_sleep(10);
    }
    free(done);
    return established;
}

static void s_close_garbage(int *fds)
{
    for (int i = 0; i < S_GARBAGE; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* More garbage all along: connections opened, fed something bad and
 * closed, until told to stop. */
typedef struct {
    int port;
    pid_t service; /* whose open fds are sampled */
    volatile int stop;
    int opened;
    int max_fds; /* the most the service held meanwhile */
} s_churn_t;

static void *s_churn(void *arg)
{
    s_churn_t *churn = arg;
    unsigned seed = 7;
    while (!churn->stop) {
        int batch[20];
        for (int i = 0; i < 20; i++) {
            batch[i] = s_connect(churn->port);
            if (batch[i] >= 0)
                churn->opened++;
        }
        zclock_sleep(20);
        int fds = s_fds(churn->service);
        churn->max_fds = fds > churn->max_fds ? fds : churn->max_fds;
        for (int i = 0; i < 20; i++)
            if (batch[i] >= 0) {
                s_speak(batch[i], (s_kind_t) (rand_r(&seed) % S_KINDS), seed);
                close(batch[i]);
            }
    }
    return NULL;
}

/* --- intake ------------------------------------------------------------ */

static const char *s_str(const json_t *msg, const char *field)
{
    const char *value = json_string_value(json_object_get(msg, field));
    return value ? value : "";
}

/* The real partner: SUBMITs under keys prefix-i, one at a time, at least
 * S_REQUESTS and for at least min_ms, each ACCEPTED within S_BOUND_MS.
 * Returns the slowest in ms; *count: how many. */
static int64_t s_real_submits(const char *prefix, int min_ms, int *count)
{
    kh_error_t err;
    kh_client_t *client = kh_client_new(s_endpoint, s_path("hub.cert"),
                                        s_path("veilig-thuis.cert"), &err);
    ck_assert_msg(client != NULL, "%s", err.message);
    json_t *referral;
    khtest_examples(&referral, 1);
    int64_t slowest = 0, begin = zclock_mono();
    int i = 0;
    for (; i < S_REQUESTS || zclock_mono() - begin < min_ms; i++) {
        char key[64];
        snprintf(key, sizeof key, "%s-%d", prefix, i);
        int64_t started = zclock_mono();
        json_t *reply =
            kh_client_submit(client, referral, key, 3 * S_BOUND_MS, &err);
        int64_t elapsed = zclock_mono() - started;
        ck_assert_msg(reply != NULL, "no answer to %s: %s", key, err.message);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
        ck_assert_msg(elapsed < S_BOUND_MS, "%s answered after %" PRId64 " ms",
                      key, elapsed);
        slowest = elapsed > slowest ? elapsed : slowest;
        json_decref(reply);
    }
    json_decref(referral);
    kh_client_destroy(&client);
    *count = i;
    return slowest;
}

static void s_wait_intake(void)
{
    kh_error_t err;
    kh_client_t *client = kh_client_new(s_endpoint, s_path("hub.cert"),
                                        s_path("veilig-thuis.cert"), &err);
    ck_assert_ptr_nonnull(client);
    int rc = -1;
    for (int i = 0; i < 100 && rc; i++)
        rc = kh_client_ping(client, 200, &err);
    kh_client_destroy(&client);
    ck_assert_msg(rc == 0, "intake did not come up: see %s",
                  s_path("intake.log"));
}

START_TEST(intake_serves_a_real_partner_through_garbage)
{
    char env_endpoint[128];
    snprintf(env_endpoint, sizeof env_endpoint, "KH_INTAKE_ENDPOINT=%s",
             s_endpoint);
    char *extra[] = {env_endpoint, "KH_ROUTING_ENDPOINT=none", NULL};
    pid_t intake =
        s_spawn("services/intake/ketenhub-intake", "intake.log", extra);
    s_wait_intake();
    int submitted[3];
    int64_t quiet = s_real_submits("quiet", 0, &submitted[0]);
    int baseline = s_fds(intake);

    int *fds = calloc(S_GARBAGE, sizeof *fds);
    ck_assert_ptr_nonnull(fds);
    int64_t started = zclock_mono();
    int established = s_open_garbage(s_port, fds);
    int64_t open_ms = zclock_mono() - started;
    ck_assert_int_eq(established, S_GARBAGE);
    s_churn_t churn = {.port = s_port, .service = intake};
    pthread_t thread;
    ck_assert_int_eq(pthread_create(&thread, NULL, s_churn, &churn), 0);
    int64_t noisy = s_real_submits("noisy", S_NOISY_MS, &submitted[1]);
    churn.stop = 1;
    pthread_join(thread, NULL);
    int held = churn.max_fds;
    ck_assert_msg(kill(intake, 0) == 0, "intake died under garbage");

    /* The silent ones are dropped by the handshake timeout while this
     * test still holds them. */
    int after_timeout =
        s_wait_fds(intake, baseline + S_FD_SLACK, KH_HANDSHAKE_MS + 15000);
    ck_assert_msg(after_timeout <= baseline + S_FD_SLACK,
                  "intake still holds %d fds (baseline %d)", after_timeout,
                  baseline);
    s_close_garbage(fds);
    free(fds);
    int64_t after = s_real_submits("after", 0, &submitted[2]);
    ck_assert_int_le(s_wait_fds(intake, baseline + S_FD_SLACK, 10000),
                     baseline + S_FD_SLACK);
    long stored = khtest_db_count(s_db, "SELECT count(*) FROM referrals");
    ck_assert_int_eq(stored, submitted[0] + submitted[1] + submitted[2]);
    printf("rawtcp: intake garbage=%d open_ms=%" PRId64 " churned=%d"
           " fds baseline=%d held=%d after_handshake_timeout=%d"
           " submits=%d slowest_submit_ms quiet=%" PRId64 " noisy=%" PRId64
           " after=%" PRId64 "\n",
           established, open_ms, churn.opened, baseline, held, after_timeout,
           submitted[1], quiet, noisy, after);
    s_stop(intake, "intake");
}
END_TEST

/* --- notification ------------------------------------------------------ */

/* A referral and one delivery of it to partner, as routing makes them. */
static void s_delivery(const char *partner)
{
    char referral[37], id[37], payload[128], hash[65];
    khtest_routed_referral(s_db, ++s_seq, referral, payload, hash);
    kh_uuid_new(id);
    const char *dparams[] = {id, referral, partner, payload, hash};
    khtest_db_exec(
        s_db,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version) VALUES ($1, $2, $3,"
        " 'normal', convert_to($4, 'UTF8'), decode($5, 'hex'), 'test')",
        5, dparams);
}

static zsock_t *s_partner(const char *id)
{
    char name[128];
    snprintf(name, sizeof name, "%s.cert", id);
    zsock_t *dealer =
        khpartner_connect(s_path(name), s_path("hub.cert"), s_endpoint);
    return dealer;
}

/* The real partner avim, connected once for the whole test (as a
 * partner system stays connected), with its window. */
static zsock_t *s_avim(void)
{
    zsock_t *avim = s_partner("avim");
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h1");
    json_object_set_new(hello, "window", json_integer(S_DELIVERIES));
    khpartner_send(avim, hello);
    json_t *welcome = khpartner_recv(avim, 3 * S_BOUND_MS);
    ck_assert_msg(welcome != NULL, "no WELCOME");
    ck_assert_str_eq(s_str(welcome, "cmd"), "WELCOME");
    json_decref(welcome);
    return avim;
}

/* S_DELIVERIES new deliveries for avim, each delivered and its ACK
 * answered within S_BOUND_MS of the message before (the hub finds them
 * by its sweep). Returns the longest gap in ms. */
static int64_t s_real_deliveries(zsock_t *avim)
{
    /* The heartbeat a partner sends about every second. */
    json_t *hello = kh_proto_new(KH_CMD_HELLO, "h2");
    json_object_set_new(hello, "window", json_integer(S_DELIVERIES));
    khpartner_send(avim, hello);
    for (int i = 0; i < S_DELIVERIES; i++)
        s_delivery("avim");
    int delivered = 0, acked = 0;
    int64_t last = zclock_mono(), slowest = 0;
    while (acked < S_DELIVERIES) {
        json_t *msg = khpartner_recv(avim, 3 * S_BOUND_MS);
        ck_assert_msg(msg != NULL,
                      "nothing from notification for %d ms (%d delivered, "
                      "%d acked)",
                      3 * S_BOUND_MS, delivered, acked);
        int64_t now = zclock_mono();
        slowest = now - last > slowest ? now - last : slowest;
        last = now;
        const char *cmd = s_str(msg, "cmd");
        if (strcmp(cmd, "DELIVER") == 0) {
            delivered++;
            json_t *ack = kh_proto_new(KH_CMD_ACK, s_str(msg, "delivery_id"));
            json_object_set_new(ack, "delivery_id",
                                json_string(s_str(msg, "delivery_id")));
            khpartner_send(avim, ack);
        } else if (strcmp(cmd, "ACKED") == 0)
            acked++;
        else
            ck_assert_msg(strcmp(cmd, "WELCOME") == 0, "unexpected %s", cmd);
        json_decref(msg);
    }
    ck_assert_msg(slowest < S_BOUND_MS, "a gap of %" PRId64 " ms", slowest);
    return slowest;
}

static void s_wait_log(const char *log, const char *text)
{
    ck_assert_msg(khtest_log_has(s_path(log), text, 10000), "no %s in %s", text,
                  s_path(log));
}

START_TEST(notification_serves_a_real_partner_through_garbage)
{
    char env_endpoint[128];
    snprintf(env_endpoint, sizeof env_endpoint, "KH_NOTIFY_ENDPOINT=%s",
             s_endpoint);
    /* The partner's silence while the handshake timeout runs is not a
     * disconnection. */
    char *extra[] = {env_endpoint, "KH_NOTIFY_WAKE_ENDPOINT=none",
                     "KH_NOTIFY_SWEEP_MS=50", "KH_NOTIFY_PEER_TIMEOUT_MS=60000",
                     NULL};
    pid_t notification = s_spawn("services/notification/ketenhub-notification",
                                 "notification.log", extra);
    s_wait_log("notification.log", "event=ready");
    zsock_t *avim = s_avim();
    int64_t quiet = s_real_deliveries(avim);
    int baseline = s_fds(notification);

    int *fds = calloc(S_GARBAGE, sizeof *fds);
    ck_assert_ptr_nonnull(fds);
    int established = s_open_garbage(s_port, fds);
    ck_assert_int_eq(established, S_GARBAGE);
    s_churn_t churn = {.port = s_port, .service = notification};
    pthread_t thread;
    ck_assert_int_eq(pthread_create(&thread, NULL, s_churn, &churn), 0);
    int64_t noisy = 0, begin = zclock_mono();
    int rounds = 0;
    for (; rounds == 0 || zclock_mono() - begin < S_NOISY_MS; rounds++) {
        int64_t gap = s_real_deliveries(avim);
        noisy = gap > noisy ? gap : noisy;
    }
    churn.stop = 1;
    pthread_join(thread, NULL);
    int held = churn.max_fds;
    ck_assert_msg(kill(notification, 0) == 0,
                  "notification died under garbage");

    int after_timeout = s_wait_fds(notification, baseline + S_FD_SLACK,
                                   KH_HANDSHAKE_MS + 15000);
    ck_assert_msg(after_timeout <= baseline + S_FD_SLACK,
                  "notification still holds %d fds (baseline %d)",
                  after_timeout, baseline);
    s_close_garbage(fds);
    free(fds);
    int64_t after = s_real_deliveries(avim);
    zsock_destroy(&avim);
    ck_assert_int_eq(khtest_db_count(s_db,
                                     "SELECT count(*) FROM deliveries WHERE"
                                     " state = 'acknowledged'"),
                     (rounds + 2) * S_DELIVERIES);
    ck_assert_int_eq(khtest_db_count(s_db,
                                     "SELECT count(*) FROM deliveries WHERE"
                                     " state <> 'acknowledged'"),
                     0);
    printf("rawtcp: notification garbage=%d churned=%d fds baseline=%d"
           " held=%d after_handshake_timeout=%d deliveries=%d"
           " longest_gap_ms quiet=%" PRId64 " noisy=%" PRId64 " after=%" PRId64
           "\n",
           established, churn.opened, baseline, held, after_timeout,
           rounds * S_DELIVERIES, quiet, noisy, after);
    s_stop(notification, "notification");
}
END_TEST

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    Suite *suite = suite_create("rawtcp");
    TCase *tc = tcase_create("garbage");
    tcase_set_timeout(tc, 240);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, intake_serves_a_real_partner_through_garbage);
    tcase_add_test(tc, notification_serves_a_real_partner_through_garbage);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
