/*
 * ketenhub-bench: measures intake from the outside, as partners see it.
 * N client threads, each its own CURVE connection with up to --window
 * requests in flight, SUBMIT a referral under fresh idempotency keys; it
 * prints accepted/s and the submit -> ACCEPTED latency percentiles.
 * --referral may be given more than once (up to S_REFERRALS_MAX): each
 * client then submits the referrals in turn, so that a mix of referrals
 * (the examples, whose rules give one, two or three partners) is offered.
 *
 *   closed loop: a client sends its next referral as soon as an answer
 *                frees a place in its window (maximum throughput);
 *   open loop:   referrals are sent on a fixed schedule (--rate per second
 *                in all) and latency counts from the scheduled time, so a
 *                slow answer cannot hide the queue behind it.
 *
 * --times FILE writes a line "S,,REFERRAL_ID,US" for each referral accepted
 * in the measured window: US is its submit time (the scheduled one in the
 * open loop) on CLOCK_MONOTONIC, the clock of ketenhub-bench-receive's
 * lines, so that the two files give submit -> delivered and submit ->
 * acknowledged per delivery.
 */
#include <czmq.h>
#include <getopt.h>
#include <msgpack.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/client.h"
#include "ketenhub/codec.h"
#include "ketenhub/rules.h"
#include "percentiles.h"

#define S_REFERRALS_MAX 16

/* A referral, encoded once as MessagePack for all the clients. */
typedef struct {
    char *bytes;
    size_t size;
} s_referral_t;

typedef struct {
    int index;
    const char *endpoint, *hub_cert, *cert;
    const s_referral_t *referrals; /* submitted in turn */
    size_t nreferrals;
    int window;               /* requests in flight at most */
    int64_t start_us, end_us; /* the measured window */
    double interval_us;       /* open loop: between this client's sends */
    FILE *times;              /* --times, or NULL (shared, stdio locks) */
    /* results */
    int64_t *latencies; /* microseconds */
    size_t count, capacity;
    size_t refused, failed;
    size_t accepted_all; /* ACCEPTED, the warm-up second's too */
    size_t throttled;    /* refused with code throttled */
} s_worker_t;

static char s_run_id[16];

static void s_record(s_worker_t *w, int64_t latency)
{
    if (w->count == w->capacity) {
        w->capacity = w->capacity ? w->capacity * 2 : 4096;
        w->latencies = realloc(w->latencies, w->capacity * sizeof(int64_t));
    }
    w->latencies[w->count++] = latency;
}

static void s_pack_str(msgpack_packer *pk, const char *s)
{
    size_t len = strlen(s);
    msgpack_pack_str(pk, len);
    msgpack_pack_str_body(pk, s, len);
}

/* Encode one SUBMIT with a fresh idempotency key; cid is the sequence.
 * The referrals' bytes were encoded once: the load costs the machine it
 * shares with the hub as little as it can. The clients start at different
 * referrals of the mix, so that each moment sees all of it. */
static zframe_t *s_submit_frame(s_worker_t *w, uint64_t seq)
{
    char key[64], cid[24];
    snprintf(key, sizeof key, "bench-%s-%d-%" PRIu64, s_run_id, w->index, seq);
    snprintf(cid, sizeof cid, "%" PRIu64, seq);
    msgpack_sbuffer buf;
    msgpack_sbuffer_init(&buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    s_pack_str(&pk, "v");
    msgpack_pack_int(&pk, 1);
    s_pack_str(&pk, "cmd");
    s_pack_str(&pk, "SUBMIT");
    s_pack_str(&pk, "cid");
    s_pack_str(&pk, cid);
    s_pack_str(&pk, "idempotency_key");
    s_pack_str(&pk, key);
    s_pack_str(&pk, "referral");
    const s_referral_t *referral =
        &w->referrals[((uint64_t) w->index + seq) % w->nreferrals];
    msgpack_sbuffer_write(&buf, referral->bytes, referral->size);
    zframe_t *frame = buf.data ? zframe_new(buf.data, buf.size) : NULL;
    msgpack_sbuffer_destroy(&buf);
    return frame;
}

/* One partner connection: keeps up to window requests in flight, sent as
 * fast as answers come (closed loop) or on a schedule (open loop). */
static void *s_work(void *arg)
{
    s_worker_t *w = arg;
    zcert_t *hub = zcert_load(w->hub_cert);
    zcert_t *mine = zcert_load(w->cert);
    zsock_t *dealer = zsock_new(ZMQ_DEALER);
    if (!hub || !mine || !dealer) {
        fprintf(stderr, "ketenhub-bench: cannot load %s or %s\n", w->hub_cert,
                w->cert);
        w->failed++;
        goto done;
    }
    zcert_apply(mine, dealer);
    zsock_set_curve_serverkey(dealer, zcert_public_txt(hub));
    zsock_set_sndhwm(dealer, 0);
    zsock_set_rcvhwm(dealer, 0);
    zsock_connect(dealer, "%s", w->endpoint);

    size_t slots = (size_t) w->window;
    int64_t *sent_at = calloc(slots, sizeof(int64_t));
    uint64_t next_seq = 0, answered = 0;
    double next_send =
        (double) w->start_us - 1e6 + w->interval_us * (w->index % 16) / 16.0;
    int64_t deadline = w->end_us;
    for (;;) {
        int64_t now = zclock_usecs();
        bool open = w->interval_us > 0;
        /* Ctrl-C (CZMQ's handler only sets zsys_interrupted): stop
         * offering, and give what is in flight two seconds to come back,
         * so that the figures cover what was measured until then. */
        if (zsys_interrupted && now < w->end_us) {
            w->end_us = now > w->start_us ? now : w->start_us;
            deadline = w->end_us - 8000000;
        }
        /* Send what the window (and, open loop, the schedule) allows. */
        while (now < w->end_us && next_seq - answered < slots &&
               (!open || (double) now >= next_send)) {
            zframe_t *frame = s_submit_frame(w, next_seq);
            if (!frame || zframe_send(&frame, dealer, 0)) {
                zframe_destroy(&frame);
                w->failed++;
                break;
            }
            sent_at[next_seq % slots] = open ? (int64_t) next_send : now;
            next_seq++;
            if (open)
                next_send += w->interval_us;
        }
        if (now >= w->end_us && answered == next_seq)
            break;
        if (now >= deadline + 10000000) { /* 10 s for the stragglers */
            w->failed += next_seq - answered;
            break;
        }
        /* Wait for answers, or until the next scheduled send, with
         * microsecond precision (ZeroMQ's own timeouts count in ms, which
         * would make the schedule, and so the latencies, late). */
        if (!(zsock_events(dealer) & ZMQ_POLLIN)) {
            int64_t wait_us = 10000;
            if (open && (double) now < next_send)
                wait_us = (int64_t) next_send - now;
            struct pollfd pfd = {zsock_fd(dealer), POLLIN, 0};
            struct timespec timeout = {wait_us / 1000000,
                                       (wait_us % 1000000) * 1000};
            ppoll(&pfd, 1, &timeout, NULL);
        }
        while (zsock_events(dealer) & ZMQ_POLLIN) {
            zframe_t *reply = zframe_recv(dealer);
            if (!reply)
                break;
            int64_t done = zclock_usecs();
            json_t *msg = NULL;
            kh_error_t err;
            if (kh_msgpack_decode(zframe_data(reply), zframe_size(reply), NULL,
                                  &msg, &err) == 0) {
                uint64_t seq = strtoull(
                    json_string_value(json_object_get(msg, "cid")), NULL, 10);
                bool accepted =
                    strcmp(kh_client_reply_cmd(msg), "ACCEPTED") == 0;
                const char *code =
                    json_string_value(json_object_get(msg, "code"));
                w->accepted_all += accepted;
                w->throttled += code && strcmp(code, "throttled") == 0;
                const char *referral_id =
                    json_string_value(json_object_get(msg, "referral_id"));
                if (!accepted)
                    w->refused++;
                else if (sent_at[seq % slots] >= w->start_us) {
                    s_record(w, done - sent_at[seq % slots]);
                    if (w->times && referral_id)
                        fprintf(w->times, "S,,%s,%" PRId64 "\n", referral_id,
                                sent_at[seq % slots]);
                }
                answered++;
            }
            json_decref(msg);
            zframe_destroy(&reply);
        }
    }
    free(sent_at);
done:
    zsock_destroy(&dealer);
    zcert_destroy(&hub);
    zcert_destroy(&mine);
    return NULL;
}

static void s_usage(FILE *out)
{
    fprintf(out, "usage: ketenhub-bench --hub-cert F --cert F --referral F\n"
                 "         [--referral F]... (submitted in turn)\n"
                 "         [--endpoint E] [--clients N] [--seconds S]\n"
                 "         [--window W (requests in flight per client)]\n"
                 "         [--rate R (open loop, per second in all)]\n"
                 "         [--json FILE] [--times FILE]\n"
                 "       ketenhub-bench --rules FILE --referral F [--referral "
                 "F]...\n"
                 "         [--seconds S]\n"
                 "         (rule evaluations per second on one core; the\n"
                 "         rules' partner checks are skipped)\n");
}

/* Evaluate the rules on the referrals, in turn, as often as one core
 * allows. */
static int s_bench_rules(const char *rules_file, const char *const *files,
                         size_t nfiles, int seconds)
{
    char schema[4096];
    const char *slash = strrchr(rules_file, '/');
    /* The schema sits in schemas/, the rules in schemas/rules/. */
    snprintf(schema, sizeof schema, "%.*s/../referral.v1.json",
             slash ? (int) (slash - rules_file) : 1, slash ? rules_file : ".");
    kh_rules_options_t options = {.schema_path = schema};
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load(rules_file, &options, &err);
    if (!rules) {
        fprintf(stderr, "ketenhub-bench: %s\n", err.message);
        return 2;
    }
    json_t *referrals[S_REFERRALS_MAX] = {NULL};
    int rc = 0;
    for (size_t i = 0; i < nfiles && rc == 0; i++) {
        json_error_t jerr;
        referrals[i] = json_load_file(files[i], 0, &jerr);
        if (!referrals[i]) {
            fprintf(stderr, "ketenhub-bench: %s:%d: %s\n", files[i], jerr.line,
                    jerr.text);
            rc = 2;
        }
    }
    kh_rules_result_t *result = kh_rules_result_new(rules);
    uint64_t count = 0;
    size_t targets = 0;
    int64_t end = zclock_usecs() + (int64_t) seconds * 1000000;
    int64_t started = zclock_usecs();
    while (rc == 0 && zclock_usecs() < end)
        for (int i = 0; i < 1000; i++, count++) {
            kh_rules_eval(rules, referrals[count % nfiles], result);
            targets += kh_rules_result_target_count(result);
        }
    double elapsed = (double) (zclock_usecs() - started) / 1e6;
    if (rc == 0)
        printf("rules=%zu referrals=%zu targets_per_referral=%.2f "
               "evaluations=%" PRIu64 " evaluations_per_s=%.0f\n",
               kh_rules_count(rules), nfiles,
               count ? (double) targets / (double) count : 0.0, count,
               (double) count / elapsed);
    kh_rules_result_destroy(&result);
    kh_rules_destroy(&rules);
    for (size_t i = 0; i < nfiles; i++)
        json_decref(referrals[i]);
    return rc;
}

static void s_free_referrals(s_referral_t *referrals, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(referrals[i].bytes);
}

/* Encode each referral file once; 0, or 2 with the reason on stderr. */
static int s_encode_referrals(const char *const *files, size_t nfiles,
                              s_referral_t *out)
{
    for (size_t i = 0; i < nfiles; i++) {
        json_error_t jerr;
        json_t *referral = json_load_file(files[i], 0, &jerr);
        if (!referral) {
            fprintf(stderr, "ketenhub-bench: %s:%d: %s\n", files[i], jerr.line,
                    jerr.text);
            return 2;
        }
        kh_error_t err;
        int rc = kh_msgpack_encode(referral, &out[i].bytes, &out[i].size, &err);
        json_decref(referral);
        if (rc) {
            fprintf(stderr, "ketenhub-bench: %s: %s\n", files[i], err.message);
            return 2;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *endpoint = "tcp://127.0.0.1:7701", *hub_cert = NULL,
               *cert = NULL, *json_out = NULL, *rules_file = NULL,
               *times_out = NULL;
    const char *referral_files[S_REFERRALS_MAX];
    size_t nreferrals = 0;
    int clients = 16, seconds = 10, window = 1;
    double rate = 0;
    static const struct option options[] = {
        {"endpoint", required_argument, NULL, 'e'},
        {"hub-cert", required_argument, NULL, 'H'},
        {"cert", required_argument, NULL, 'c'},
        {"referral", required_argument, NULL, 'f'},
        {"clients", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},
        {"json", required_argument, NULL, 'j'},
        {"times", required_argument, NULL, 't'},
        {"rules", required_argument, NULL, 'R'},
        {"window", required_argument, NULL, 'w'},
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
            cert = optarg;
            break;
        case 'f':
            if (nreferrals == S_REFERRALS_MAX) {
                fprintf(stderr, "ketenhub-bench: at most %d --referral\n",
                        S_REFERRALS_MAX);
                return 2;
            }
            referral_files[nreferrals++] = optarg;
            break;
        case 'n':
            clients = atoi(optarg);
            break;
        case 's':
            seconds = atoi(optarg);
            break;
        case 'r':
            rate = atof(optarg);
            break;
        case 'j':
            json_out = optarg;
            break;
        case 't':
            times_out = optarg;
            break;
        case 'w':
            window = atoi(optarg);
            break;
        case 'R':
            rules_file = optarg;
            break;
        case 'h':
            s_usage(stdout);
            return 0;
        default:
            s_usage(stderr);
            return 2;
        }
    }
    if (rules_file && nreferrals && seconds >= 1)
        return s_bench_rules(rules_file, referral_files, nreferrals, seconds);
    if (!hub_cert || !cert || !nreferrals || clients < 1 || seconds < 1 ||
        rate < 0 || window < 1) {
        s_usage(stderr);
        return 2;
    }
    s_referral_t referrals[S_REFERRALS_MAX] = {{NULL, 0}};
    if (s_encode_referrals(referral_files, nreferrals, referrals)) {
        s_free_referrals(referrals, nreferrals);
        return 2;
    }
    FILE *times = times_out ? fopen(times_out, "w") : NULL;
    if (times_out && !times) {
        fprintf(stderr, "ketenhub-bench: cannot write %s\n", times_out);
        s_free_referrals(referrals, nreferrals);
        return 2;
    }
    snprintf(s_run_id, sizeof s_run_id, "%" PRIx64,
             (uint64_t) zclock_time() & UINT64_C(0xffffffffff));

    zsys_init(); /* before the threads: CZMQ's set-up is not thread-safe */
    /* One second of warm-up before the measured window. */
    int64_t start = zclock_usecs() + 1000000;
    int64_t end = start + (int64_t) seconds * 1000000;
    s_worker_t *workers = calloc((size_t) clients, sizeof *workers);
    pthread_t *threads = calloc((size_t) clients, sizeof *threads);
    for (int i = 0; i < clients; i++) {
        workers[i] =
            (s_worker_t){.index = i,
                         .endpoint = endpoint,
                         .hub_cert = hub_cert,
                         .cert = cert,
                         .referrals = referrals,
                         .nreferrals = nreferrals,
                         .window = window,
                         .start_us = start,
                         .end_us = end,
                         .times = times,
                         .interval_us = rate > 0 ? 1e6 * clients / rate : 0};
        pthread_create(&threads[i], NULL, s_work, &workers[i]);
    }
    size_t total = 0, refused = 0, failed = 0, accepted_all = 0, throttled = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(threads[i], NULL);
        total += workers[i].count;
        refused += workers[i].refused;
        failed += workers[i].failed;
        accepted_all += workers[i].accepted_all;
        throttled += workers[i].throttled;
    }
    int64_t *all = malloc((total ? total : 1) * sizeof(int64_t));
    size_t k = 0;
    for (int i = 0; i < clients; i++) {
        memcpy(all + k, workers[i].latencies,
               workers[i].count * sizeof(int64_t));
        k += workers[i].count;
        free(workers[i].latencies);
    }
    if (times && fclose(times) != 0) {
        fprintf(stderr, "ketenhub-bench: cannot write %s\n", times_out);
        failed++;
    }
    qsort(all, total, sizeof(int64_t), bench_cmp_us);
    /* An interrupted run measured until the Ctrl-C (as the last of the
     * workers to see it saw it). */
    int64_t stopped = start;
    for (int i = 0; i < clients; i++)
        if (workers[i].end_us > stopped)
            stopped = workers[i].end_us;
    double measured = (double) (stopped - start) / 1e6;
    if (measured < seconds)
        fprintf(stderr, "ketenhub-bench: interrupted after %.1f s\n", measured);
    double per_second = measured > 0 ? (double) total / measured : 0;
    printf("mode=%s clients=%d window=%d seconds=%d\n",
           rate > 0 ? "open" : "closed", clients, window, seconds);
    if (rate > 0)
        printf("offered_per_s=%.0f\n", rate);
    printf("accepted=%zu accepted_per_s=%.0f refused=%zu failed=%zu\n", total,
           per_second, refused, failed);
    /* With the warm-up second: what the hub must have stored. */
    printf("accepted_total=%zu throttled=%zu\n", accepted_all, throttled);
    printf("latency_ms p50=%.3f p90=%.3f p99=%.3f p99.9=%.3f max=%.3f\n",
           bench_pct_ms(all, total, 50), bench_pct_ms(all, total, 90),
           bench_pct_ms(all, total, 99), bench_pct_ms(all, total, 99.9),
           total ? (double) all[total - 1] / 1000 : 0);
    double cpu_s = bench_cpu_s();
    printf("cpu_s=%.2f (this program's own)\n", cpu_s);
    if (json_out) {
        json_t *doc = json_pack(
            "{s:s, s:i, s:i, s:i, s:f, s:I, s:f, s:I, s:I, s:I, s:I, "
            "s:{s:f,s:f,s:f,s:f,s:f}, s:f}",
            "mode", rate > 0 ? "open" : "closed", "clients", clients, "window",
            window, "seconds", seconds, "offered_per_s", rate, "accepted",
            (json_int_t) total, "accepted_per_s", per_second, "refused",
            (json_int_t) refused, "failed", (json_int_t) failed,
            "accepted_total", (json_int_t) accepted_all, "throttled",
            (json_int_t) throttled, "latency_ms", "p50",
            bench_pct_ms(all, total, 50), "p90", bench_pct_ms(all, total, 90),
            "p99", bench_pct_ms(all, total, 99), "p99.9",
            bench_pct_ms(all, total, 99.9), "max",
            total ? (double) all[total - 1] / 1000 : 0.0, "cpu_s", cpu_s);
        json_dump_file(doc, json_out, JSON_INDENT(2));
        json_decref(doc);
    }
    free(all);
    free(workers);
    free(threads);
    s_free_referrals(referrals, nreferrals);
    return failed ? 1 : 0;
}
