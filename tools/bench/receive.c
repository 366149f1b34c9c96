/*
 * ketenhub-bench-receive: measures notification from the outside, as
 * partners see it. One thread per partner certificate connects to the
 * delivery socket, says HELLO with --window, and ACKs every DELIVER at
 * once; it prints acknowledged deliveries per second and the routed ->
 * received latency (from each delivery's routed_at, so run it on the
 * hub's machine or one with the same clock).
 *
 *   ketenhub-bench-receive --endpoint E --hub-cert H --cert P.cert
 *       [--cert Q.cert ...] [--window N] [--count N] [--seconds S]
 *       [--idle-ms MS]
 *
 * It stops when --count deliveries are acknowledged in all, after
 * --seconds, or when nothing came for --idle-ms after the first delivery.
 *
 * --times FILE writes a line "D,DELIVERY_ID,REFERRAL_ID,US" for each
 * DELIVER received and "A,DELIVERY_ID,,US" for each ACKED, US on
 * CLOCK_MONOTONIC (see ketenhub-bench --times).
 */
#include <czmq.h>
#include <getopt.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ketenhub/codec.h"
#include "percentiles.h"

#define S_CERTS_MAX 16

typedef struct {
    const char *endpoint, *hub_cert, *cert;
    int window, idle_ms;
    int64_t deadline_us;
    FILE *times; /* --times, or NULL (shared, stdio locks) */
    /* results */
    int64_t *latencies; /* microseconds */
    size_t count, capacity;
    size_t acked, refused;
    int64_t first_us, last_us;
} s_receiver_t;

static atomic_long s_acked; /* in all threads */
static long s_want;         /* --count, 0: no limit */

static int64_t s_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* "2026-11-28T21:09:27.123456Z" as microseconds since the epoch; 0 when
 * it does not parse. */
static int64_t s_parse_utc(const char *text)
{
    struct tm tm;
    memset(&tm, 0, sizeof tm);
    const char *rest = strptime(text, "%Y-%m-%dT%H:%M:%S", &tm);
    if (!rest)
        return 0;
    int64_t us = (int64_t) timegm(&tm) * 1000000;
    if (*rest == '.') {
        int64_t scale = 100000;
        for (rest++; *rest >= '0' && *rest <= '9'; rest++, scale /= 10)
            us += (*rest - '0') * scale;
    }
    return us;
}

static void s_record(s_receiver_t *r, int64_t latency)
{
    if (r->count == r->capacity) {
        size_t capacity = r->capacity ? r->capacity * 2 : 65536;
        int64_t *grown = realloc(r->latencies, capacity * sizeof *grown);
        if (!grown)
            return;
        r->latencies = grown;
        r->capacity = capacity;
    }
    r->latencies[r->count++] = latency;
}

static int s_send(zsock_t *sock, json_t *msg)
{
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    int rc = -1;
    if (msg && kh_msgpack_encode(msg, &data, &size, &err) == 0) {
        zframe_t *frame = zframe_new(data, size);
        rc = zframe_send(&frame, sock, 0);
        if (rc)
            zframe_destroy(&frame);
    }
    free(data);
    json_decref(msg);
    return rc;
}

static void s_hello(zsock_t *sock, int window)
{
    s_send(sock, json_pack("{s:i, s:s, s:s, s:i}", "v", 1, "cmd", "HELLO",
                           "cid", "hello", "window", window));
}

static void *s_receive(void *arg)
{
    s_receiver_t *r = arg;
    zcert_t *mine = zcert_load(r->cert);
    zcert_t *hub = zcert_load(r->hub_cert);
    if (!mine || !hub) {
        fprintf(stderr, "ketenhub-bench-receive: cannot load %s or %s\n",
                r->cert, r->hub_cert);
        zcert_destroy(&mine);
        zcert_destroy(&hub);
        return NULL;
    }
    zsock_t *sock = zsock_new(ZMQ_DEALER);
    zcert_apply(mine, sock);
    zsock_set_curve_serverkey(sock, zcert_public_txt(hub));
    zsock_set_linger(sock, 0);
    zsock_set_rcvhwm(sock, 100000);
    zsock_connect(sock, "%s", r->endpoint);
    zcert_destroy(&mine);
    zcert_destroy(&hub);
    s_hello(sock, r->window);
    int64_t last_hello = zclock_mono();
    kh_limits_t limits = kh_limits_default();
    limits.max_frame = 16 * 1024 * 1024;
    zpoller_t *poller = zpoller_new(sock, NULL);
    while (!zsys_interrupted && s_now_us() < r->deadline_us &&
           (s_want == 0 || atomic_load(&s_acked) < s_want)) {
        if (r->last_us && s_now_us() - r->last_us > r->idle_ms * 1000LL)
            break;
        if (zclock_mono() - last_hello > 1000) {
            s_hello(sock, r->window);
            last_hello = zclock_mono();
        }
        if (!zpoller_wait(poller, 100))
            continue;
        for (int i = 0; i < 1000 && (zsock_events(sock) & ZMQ_POLLIN); i++) {
            zframe_t *frame = zframe_recv(sock);
            json_t *msg = NULL;
            kh_error_t err;
            if (frame &&
                kh_msgpack_decode(zframe_data(frame), zframe_size(frame),
                                  &limits, &msg, &err) == 0) {
                const char *cmd =
                    json_string_value(json_object_get(msg, "cmd"));
                int64_t now = s_now_us();
                if (cmd && strcmp(cmd, "DELIVER") == 0) {
                    if (!r->first_us)
                        r->first_us = now;
                    int64_t routed = s_parse_utc(
                        json_string_value(json_object_get(msg, "routed_at")));
                    if (routed)
                        s_record(r, now - routed);
                    const char *id =
                        json_string_value(json_object_get(msg, "delivery_id"));
                    const char *referral_id =
                        json_string_value(json_object_get(msg, "referral_id"));
                    if (r->times && id && referral_id)
                        fprintf(r->times, "D,%s,%s,%" PRId64 "\n", id,
                                referral_id, zclock_usecs());
                    s_send(sock,
                           json_pack("{s:i, s:s, s:s, s:s}", "v", 1, "cmd",
                                     "ACK", "cid", id, "delivery_id", id));
                } else if (cmd && strcmp(cmd, "ACKED") == 0) {
                    const char *id =
                        json_string_value(json_object_get(msg, "cid"));
                    if (r->times && id)
                        fprintf(r->times, "A,%s,,%" PRId64 "\n", id,
                                zclock_usecs());
                    r->acked++;
                    r->last_us = now;
                    atomic_fetch_add(&s_acked, 1);
                } else if (cmd && strcmp(cmd, "REJECTED") == 0)
                    r->refused++;
            }
            json_decref(msg);
            zframe_destroy(&frame);
        }
    }
    zpoller_destroy(&poller);
    zsock_destroy(&sock);
    return NULL;
}

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhub-bench-receive --endpoint E --hub-cert H "
            "--cert P.cert [--cert Q.cert ...]\n"
            "         [--window N] [--count N] [--seconds S] [--idle-ms MS]\n"
            "         [--times FILE]\n");
}

int main(int argc, char **argv)
{
    const char *endpoint = "tcp://127.0.0.1:7703", *hub_cert = NULL,
               *times_out = NULL;
    const char *certs[S_CERTS_MAX];
    int ncerts = 0, window = 1024, seconds = 60, idle_ms = 2000;
    static const struct option options[] = {
        {"endpoint", required_argument, NULL, 'e'},
        {"hub-cert", required_argument, NULL, 'H'},
        {"cert", required_argument, NULL, 'c'},
        {"window", required_argument, NULL, 'w'},
        {"count", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'},
        {"idle-ms", required_argument, NULL, 'i'},
        {"times", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "h", options, NULL)) != -1) {
        switch (opt) {
        case 'e':
            endpoint = optarg;
            break;
        case 'H':
            hub_cert = optarg;
            break;
        case 'c':
            if (ncerts == S_CERTS_MAX) {
                s_usage(stderr);
                return 2;
            }
            certs[ncerts++] = optarg;
            break;
        case 'w':
            window = atoi(optarg);
            break;
        case 'n':
            s_want = atol(optarg);
            break;
        case 's':
            seconds = atoi(optarg);
            break;
        case 'i':
            idle_ms = atoi(optarg);
            break;
        case 't':
            times_out = optarg;
            break;
        case 'h':
            s_usage(stdout);
            return 0;
        default:
            s_usage(stderr);
            return 2;
        }
    }
    if (!hub_cert || ncerts == 0 || window < 1 || seconds < 1 || idle_ms < 1) {
        s_usage(stderr);
        return 2;
    }
    FILE *times = times_out ? fopen(times_out, "w") : NULL;
    if (times_out && !times) {
        fprintf(stderr, "ketenhub-bench-receive: cannot write %s\n", times_out);
        return 2;
    }
    zsys_init(); /* before the threads: CZMQ's set-up is not thread-safe */
    s_receiver_t receivers[S_CERTS_MAX];
    pthread_t threads[S_CERTS_MAX];
    int64_t deadline = s_now_us() + (int64_t) seconds * 1000000;
    for (int i = 0; i < ncerts; i++) {
        receivers[i] = (s_receiver_t){.endpoint = endpoint,
                                      .hub_cert = hub_cert,
                                      .cert = certs[i],
                                      .window = window,
                                      .idle_ms = idle_ms,
                                      .deadline_us = deadline,
                                      .times = times};
        pthread_create(&threads[i], NULL, s_receive, &receivers[i]);
    }
    size_t acked = 0, refused = 0, total = 0;
    int64_t first = 0, last = 0;
    for (int i = 0; i < ncerts; i++) {
        pthread_join(threads[i], NULL);
        acked += receivers[i].acked;
        refused += receivers[i].refused;
        total += receivers[i].count;
        if (receivers[i].first_us && (!first || receivers[i].first_us < first))
            first = receivers[i].first_us;
        if (receivers[i].last_us > last)
            last = receivers[i].last_us;
    }
    bool written = !times || fclose(times) == 0;
    if (!written)
        fprintf(stderr, "ketenhub-bench-receive: cannot write %s\n", times_out);
    int64_t *all = malloc((total ? total : 1) * sizeof *all);
    size_t k = 0;
    for (int i = 0; i < ncerts; i++) {
        if (all && receivers[i].count)
            memcpy(all + k, receivers[i].latencies,
                   receivers[i].count * sizeof *all);
        k += receivers[i].count;
        free(receivers[i].latencies);
    }
    if (all)
        qsort(all, total, sizeof *all, bench_cmp_us);
    double elapsed = last > first ? (double) (last - first) / 1e6 : 0;
    printf("partners=%d window=%d acked=%zu refused=%zu seconds=%.2f "
           "acked_per_s=%.0f\n",
           ncerts, window, acked, refused, elapsed,
           elapsed > 0 ? (double) acked / elapsed : 0.0);
    printf("routed_to_received_ms p50=%.3f p90=%.3f p99=%.3f max=%.3f\n",
           all ? bench_pct_ms(all, total, 50) : 0,
           all ? bench_pct_ms(all, total, 90) : 0,
           all ? bench_pct_ms(all, total, 99) : 0,
           all && total ? (double) all[total - 1] / 1000 : 0);
    printf("cpu_s=%.2f (this program's own)\n", bench_cpu_s());
    free(all);
    return acked && written ? 0 : 1;
}
