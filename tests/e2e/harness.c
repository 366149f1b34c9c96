/*
 * ketenhub-e2e: the fault-injection harness. It starts a throwaway
 * PostgreSQL (fsync on), the four services (intake, routing, notification,
 * audit), three simulated partner systems (ketenhub-partner listen for
 * veilig-thuis, zorgcoordinator and avim) and a load generator that
 * submits the example referrals as the partner "meldpunt" under recorded
 * idempotency keys, resending a timed-out or retryably refused one with
 * the SAME key, and records every ACCEPTED referral id
 * (<run>/accepted.txt). Meanwhile a fault driver, at random moments:
 * kill -9s a service and restarts it, sends one SIGTERM and checks it
 * exits 0 within 5 s (graceful shutdown under load), pauses a service with
 * SIGSTOP for a few seconds, restarts PostgreSQL (fast and immediate
 * mode, alternately; during an immediate one's outage of 1-4 s a random
 * service is killed and started again, so it starts without a database)
 * and disconnects partners (kill -9 of a listener, back a few seconds
 * later). Then it drains and checks (check.c); one line per
 * check and a last line "e2e: N passed, M failed". Exit 0 only when all
 * passed.
 *
 *   ketenhub-e2e [--referrals N] [--seconds S] [--kills N]
 *                [--pg-restarts N] [--pauses N] [--disconnects N]
 *                [--terms N] [--clients N] [--drain S] [--seed S]
 *                [--replicas 1] [--keep]
 *
 * --kills counts kill -9s in all, spread over the services in turn (each
 * gets at least N/4); --terms likewise for graceful SIGTERMs. The seed is
 * printed; the same seed gives the same schedule (the moments are
 * relative to the start of the load, so the interleaving still varies).
 * The run directory (/tmp/khe2e.XXXXXX, logs of every process) is removed
 * unless --keep or a check failed.
 *
 * Short configuration (ctest e2e.short, about a minute; e2e.replicas is
 * the same with --replicas 2 and 8 kills):
 *   ketenhub-e2e --referrals 2000 --seconds 60 --kills 6 --pg-restarts 2 \
 *                --pauses 2 --disconnects 2 --terms 4
 * Long configuration (the figures: >= 50,000 referrals, each
 * service killed >= 20 times, PostgreSQL restarted >= 3 times; about
 * 20 minutes on a 2-core machine):
 *   ketenhub-e2e --referrals 50000 --seconds 900 --kills 80 \
 *                --pg-restarts 4 --pauses 8 --disconnects 8 --terms 8
 *
 * --replicas 2 runs two processes of each service side by side, each on
 * ports of its own: the load's clients are spread over the two intakes,
 * intake replica r wakes routing replica r, which wakes notification
 * replica r, and every partner has one listener per notification replica,
 * both storing into the partner's one inbox. Each fault hits one of the two
 * at random; the checks are the same.
 */
#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <glob.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "e2e.h"
#include "ketenhub/client.h"
#include "khproc.h"

extern char **environ;

const char *const e2e_listener_ids[E2E_LISTENERS] = {"veilig-thuis",
                                                     "zorgcoordinator", "avim"};

/* ---- settings ---------------------------------------------------------- */

static struct {
    long referrals;
    double seconds;
    int kills, pg_restarts, pauses, disconnects, terms, clients;
    double drain_s;
    unsigned long seed;
    bool keep;
} s_opt = {2000, 60, 6, 1, 2, 2, 4, 4, 180, 0, false};

static char s_run[64]; /* the run directory */
static char s_src[] = KH_E2E_SOURCE_DIR;
static char s_bin[] = KH_E2E_BINARY_DIR;
static char s_ctl[512];
#define S_SERVICES 4 /* intake, routing, notification, audit */
/* Ports of replica r (0 or 1): each replica of a service binds its own. */
static int s_port_intake[2], s_port_routing[2], s_port_notify[2],
    s_port_wake[2], s_port_health[2][S_SERVICES];
static int s_replicas = 1;
static struct timespec s_t0; /* the start of the load */

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double) t.tv_sec + (double) t.tv_nsec / 1e9;
}

static double s_elapsed(void)
{
    return s_now() - ((double) s_t0.tv_sec + (double) s_t0.tv_nsec / 1e9);
}

static void s_sleep_ms(long ms)
{
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) == -1 && errno == EINTR)
        ;
}

/* xorshift64*: the schedule's randomness, repeatable from the seed. */
static uint64_t s_rng;
static uint64_t s_rand(void)
{
    s_rng ^= s_rng >> 12;
    s_rng ^= s_rng << 25;
    s_rng ^= s_rng >> 27;
    return s_rng * 2685821657736338717ULL;
}
static double s_rand01(void)
{
    return (double) (s_rand() >> 11) / 9007199254740992.0;
}

/* ---- processes --------------------------------------------------------- */

typedef struct {
    const char *name; /* "intake", ..., or a listener's partner id */
    bool listener;
    int replica;     /* 0, or 1 for the second of each (--replicas 2) */
    char label[48];  /* name, or name-2 for the second replica */
    char argv0[48];  /* the program name it runs under */
    char dir[256];   /* a listener's inbox (shared by both replicas) */
    pid_t pid;       /* 0 when not running */
    int incarnation; /* log file <run>/<name>.<incarnation>.log */
    int kills, terms, pauses, restarts, unexpected;
    int term_failures;
    double term_max_s;
} s_proc_t;

#define S_KINDS (S_SERVICES + E2E_LISTENERS)
static const char *const s_service_names[S_SERVICES] = {
    "intake", "routing", "notification", "audit"};
/* Replica r of kind k (a service, then the listeners) is s_procs[r *
 * S_KINDS + k]; s_proc_count is S_KINDS times the replicas. Listener
 * replica r connects to notification replica r. */
static s_proc_t s_procs[2 * S_KINDS];
static int s_proc_count;

static int s_pg_restarts[2]; /* fast, immediate */
static int s_failures;       /* setup or restart problems */

/* Start p with its environment; its output goes to a log of its own. The
 * child dies with the harness (PR_SET_PDEATHSIG), so a killed run leaves
 * no services behind. */
static int s_spawn(s_proc_t *p)
{
    char path[512], log[512], hub[256], certs[256], schemas[256];
    char *argv[6] = {NULL};
    char *extra[16] = {NULL};
    char env[16][320];
    int n = 0;
#define S_ENV(...)                                                             \
    do {                                                                       \
        snprintf(env[n], sizeof env[n], __VA_ARGS__);                          \
        extra[n] = env[n];                                                     \
        n++;                                                                   \
    } while (0)
    snprintf(hub, sizeof hub, "%s/hub/hub.cert", s_run);
    snprintf(certs, sizeof certs, "%s/partners", s_run);
    snprintf(schemas, sizeof schemas, "%s/schemas", s_src);
    int r = p->replica;
    p->incarnation++;
    if (!p->listener) /* a health endpoint of its own, for the replicas */
        S_ENV("KH_HEALTH_ENDPOINT=127.0.0.1:%d",
              s_port_health[r][(p - s_procs) % S_KINDS]);
    snprintf(log, sizeof log, "%s/%s.%d.log", s_run, p->label, p->incarnation);
    if (p->listener) {
        char cert[256];
        snprintf(path, sizeof path, "%s/tools/partner/ketenhub-partner", s_bin);
        snprintf(p->dir, sizeof p->dir, "%s/inbox/%s", s_run, p->name);
        mkdir(p->dir, 0700);
        snprintf(cert, sizeof cert, "%s/keys/%s.cert", s_run, p->name);
        S_ENV("KH_DELIVERY_ENDPOINT=tcp://127.0.0.1:%d", s_port_notify[r]);
        S_ENV("KH_HUB_PUBLIC_CERT=%s", hub);
        S_ENV("KH_PARTNER_CERT=%s", cert);
        static char a1[] = "listen", a2[] = "--dir";
        snprintf(p->argv0, sizeof p->argv0, "ketenhub-partner");
        argv[0] = p->argv0;
        argv[1] = a1;
        argv[2] = a2;
        argv[3] = p->dir;
    } else {
        snprintf(path, sizeof path, "%s/services/%s/ketenhub-%s", s_bin,
                 p->name, p->name);
        snprintf(p->argv0, sizeof p->argv0, "ketenhub-%s", p->name);
        argv[0] = p->argv0;
        if (strcmp(p->name, "intake") == 0) {
            S_ENV("KH_INTAKE_ENDPOINT=tcp://127.0.0.1:%d", s_port_intake[r]);
            S_ENV("KH_ROUTING_ENDPOINT=tcp://127.0.0.1:%d", s_port_routing[r]);
            S_ENV("KH_HUB_CERT=%s", hub);
            S_ENV("KH_PARTNER_CERT_DIR=%s", certs);
            S_ENV("KH_SCHEMA_DIR=%s", schemas);
        } else if (strcmp(p->name, "routing") == 0) {
            S_ENV("KH_ROUTING_ENDPOINT=tcp://127.0.0.1:%d", s_port_routing[r]);
            S_ENV("KH_NOTIFY_WAKE_ENDPOINT=tcp://127.0.0.1:%d", s_port_wake[r]);
            S_ENV("KH_HUB_CERT=%s", hub);
            S_ENV("KH_SCHEMA_DIR=%s", schemas);
            S_ENV("KH_RULES_FILE=%s/schemas/rules/default.yaml", s_src);
        } else if (strcmp(p->name, "notification") == 0) {
            S_ENV("KH_NOTIFY_ENDPOINT=tcp://127.0.0.1:%d", s_port_notify[r]);
            S_ENV("KH_NOTIFY_WAKE_ENDPOINT=tcp://127.0.0.1:%d", s_port_wake[r]);
            S_ENV("KH_HUB_CERT=%s", hub);
            S_ENV("KH_PARTNER_CERT_DIR=%s", certs);
            /* Re-sends after a crash come within seconds, not 30 s. */
            S_ENV("KH_NOTIFY_ACK_TIMEOUT_MS=3000");
            S_ENV("KH_NOTIFY_BACKOFF_MAX_MS=10000");
        } else {
            S_ENV("KH_AUDIT_KEY=%s/audit/hub-audit.key", s_run);
            S_ENV("KH_AUDIT_CHECKPOINT_EVERY=500");
            S_ENV("KH_AUDIT_CHECKPOINT_MS=2000");
        }
    }
#undef S_ENV
    /* The environment: ours plus the extra settings. */
    size_t count = 0;
    while (environ[count])
        count++;
    char **envp = calloc(count + (size_t) n + 1, sizeof *envp);
    if (!envp)
        return -1;
    for (size_t i = 0; i < count; i++)
        envp[i] = environ[i];
    for (int i = 0; i < n; i++)
        envp[count + (size_t) i] = extra[i];

    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execve(path, argv, envp);
        _exit(127);
    }
    free(envp);
    if (pid < 0)
        return -1;
    p->pid = pid;
    return 0;
}

/* Whether p's current log holds its ready line. */
static bool s_log_ready(const s_proc_t *p)
{
    char log[512], line[2048];
    snprintf(log, sizeof log, "%s/%s.%d.log", s_run, p->label, p->incarnation);
    FILE *f = fopen(log, "r");
    bool ready = false;
    while (f && !ready && fgets(line, sizeof line, f))
        ready = strstr(line, "event=ready") != NULL;
    if (f)
        fclose(f);
    return ready;
}

/* Wait up to 30 s from t0 for the ready line of service p, started
 * already; one that ends meanwhile is counted and started again. Returns
 * the seconds since t0, or -1 (counted as a failure). */
static double s_await(s_proc_t *p, double t0)
{
    while (s_now() - t0 < 30) {
        if (s_log_ready(p))
            return s_now() - t0;
        int status;
        if (waitpid(p->pid, &status, WNOHANG) == p->pid) {
            /* It ended while starting (the database was still coming
             * back, say): try again. */
            p->pid = 0;
            p->unexpected++;
            printf("e2e: t=%.1fs %s exited while starting (status %d);"
                   " starting it again\n",
                   s_elapsed(), p->label, status);
            s_sleep_ms(500);
            if (s_spawn(p) != 0)
                break;
            continue;
        }
        s_sleep_ms(20);
    }
    printf("e2e: %s did not become ready in 30 s (see %s/%s.%d.log)\n",
           p->label, s_run, p->label, p->incarnation);
    s_failures++;
    return -1;
}

/* Start p and, for a service, wait for its ready line (s_await). */
static double s_start(s_proc_t *p)
{
    double t0 = s_now();
    if (s_spawn(p) != 0) {
        printf("e2e: cannot start %s\n", p->label);
        s_failures++;
        return -1;
    }
    return p->listener ? 0 : s_await(p, t0);
}

/* Reap any process that ended on its own (a crash, or an exit on losing
 * the database): count it and start it again. */
static void s_supervise(void)
{
    for (int i = 0; i < s_proc_count; i++) {
        s_proc_t *p = &s_procs[i];
        int status;
        if (p->pid > 0 && waitpid(p->pid, &status, WNOHANG) == p->pid) {
            p->pid = 0;
            p->unexpected++;
            printf("e2e: t=%.1fs %s ended on its own (%s %d); restarting it\n",
                   s_elapsed(), p->label, WIFEXITED(status) ? "exit" : "signal",
                   WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
            p->restarts++;
            s_start(p);
        }
    }
}

/* Sleep ms while supervising the processes. */
static void s_wait(long ms)
{
    double end = s_now() + (double) ms / 1000.0;
    while (s_now() < end) {
        s_supervise();
        double left = end - s_now();
        s_sleep_ms(left > 0.1 ? 100 : (long) (left * 1000) + 1);
    }
}

/* ---- load -------------------------------------------------------------- */

static json_t *s_examples[16];
static size_t s_example_count;
static e2e_key_t *s_keys;
static atomic_long s_next;      /* next key index to submit */
static atomic_long s_accepted;  /* keys ACCEPTED */
static atomic_long s_timeouts;  /* requests without an answer in time */
static atomic_long s_retryable; /* retryable refusals */
static atomic_long s_refused;   /* final refusals */
static atomic_long s_resubmits; /* deliberate resubmissions of a key */
static atomic_bool s_give_up;   /* stop retrying (the drain timed out) */
static atomic_int s_finished;   /* load threads that have answered all */
static pthread_mutex_t s_out_lock = PTHREAD_MUTEX_INITIALIZER;
static FILE *s_accepted_file;

/* A connection to intake replica r. */
static kh_client_t *s_client(int r)
{
    char endpoint[64], hub[256], cert[256];
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%d", s_port_intake[r]);
    snprintf(hub, sizeof hub, "%s/hub/hub.cert", s_run);
    snprintf(cert, sizeof cert, "%s/keys/%s.cert", s_run, E2E_SUBMITTER);
    kh_error_t err;
    return kh_client_new(endpoint, hub, cert, &err);
}

/* Submit key k until it gets a final answer: a timeout or a retryable
 * refusal is resent with the same key (the contract), on a fresh
 * connection after a timeout. Returns the ACCEPTED reply or NULL. */
static json_t *s_submit(kh_client_t **client, int r, e2e_key_t *k,
                        const json_t *doc)
{
    for (;;) {
        if (!*client)
            *client = s_client(r);
        if (atomic_load(&s_give_up))
            return NULL;
        if (!*client) { /* its intake is down just now: try again */
            s_sleep_ms(100);
            continue;
        }
        kh_error_t err;
        json_t *reply = kh_client_submit(*client, doc, k->key, 3000, &err);
        if (!reply) {
            atomic_fetch_add(&s_timeouts, 1);
            kh_client_destroy(client);
            continue;
        }
        if (strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0) {
            k->answered = true;
            return reply;
        }
        bool retryable = json_is_true(json_object_get(reply, "retryable")) ||
                         !json_is_string(json_object_get(reply, "code"));
        json_int_t after =
            json_integer_value(json_object_get(reply, "retry_after_ms"));
        if (!retryable) {
            /* The first few are named; the count says the rest. */
            if (atomic_fetch_add(&s_refused, 1) < 5) {
                pthread_mutex_lock(&s_out_lock);
                printf("e2e: t=%.1fs key %s refused: %s %s\n", s_elapsed(),
                       k->key,
                       json_string_value(json_object_get(reply, "code")),
                       json_string_value(json_object_get(reply, "path")));
                pthread_mutex_unlock(&s_out_lock);
            }
            k->answered = true;
            json_decref(reply);
            return NULL;
        }
        atomic_fetch_add(&s_retryable, 1);
        json_decref(reply);
        s_sleep_ms(after < 50 ? 50 : after > 2000 ? 2000 : (long) after);
    }
}

/* A client thread: takes the next key, waits for its moment (the load is
 * spread evenly over --seconds), submits it until answered. One key in
 * twenty is submitted once more after its ACCEPTED: the answer must name
 * the same referral. */
static void *s_load(void *arg)
{
    int r = (int) (intptr_t) arg % s_replicas; /* the intake it talks to */
    kh_client_t *client = NULL;
    double rate = (double) s_opt.referrals / (s_opt.seconds * 0.9);
    for (;;) {
        long i = atomic_fetch_add(&s_next, 1);
        if (i >= s_opt.referrals)
            break;
        double due = (double) i / rate;
        double wait = due - s_elapsed();
        if (wait > 0)
            s_sleep_ms((long) (wait * 1000));
        e2e_key_t *k = &s_keys[i];
        const json_t *doc = s_examples[(size_t) i % s_example_count];
        json_t *reply = s_submit(&client, r, k, doc);
        if (!reply)
            continue;
        const char *id =
            json_string_value(json_object_get(reply, "referral_id"));
        snprintf(k->referral_id, sizeof k->referral_id, "%s", id ? id : "");
        json_decref(reply);
        atomic_fetch_add(&s_accepted, 1);
        pthread_mutex_lock(&s_out_lock);
        fprintf(s_accepted_file, "%s %s\n", k->key, k->referral_id);
        fflush(s_accepted_file);
        pthread_mutex_unlock(&s_out_lock);
        if (i % 20 == 7) {
            atomic_fetch_add(&s_resubmits, 1);
            reply = s_submit(&client, r, k, doc);
            const char *again =
                reply ? json_string_value(json_object_get(reply, "referral_id"))
                      : NULL;
            if (reply && (!again || strcmp(again, k->referral_id) != 0 ||
                          !json_is_true(json_object_get(reply, "duplicate"))))
                k->mismatch = true;
            json_decref(reply);
        }
    }
    kh_client_destroy(&client);
    atomic_fetch_add(&s_finished, 1);
    return NULL;
}

/* ---- faults ------------------------------------------------------------ */

typedef enum {
    S_KILL,
    S_TERM,
    S_PAUSE,
    S_PG_RESTART,
    S_DISCONNECT
} s_fault_kind_t;

typedef struct {
    double at; /* seconds after the start of the load */
    s_fault_kind_t kind;
    int target; /* kind (s_procs[replica * S_KINDS + target]); for
                   S_PG_RESTART 0 fast, 1 immediate */
} s_fault_t;

static int s_fault_cmp(const void *a, const void *b)
{
    double x = ((const s_fault_t *) a)->at, y = ((const s_fault_t *) b)->at;
    return (x > y) - (x < y);
}

/* n faults of one kind over targets [first, first + span): each round
 * of span takes every target once, in a random order. */
static void s_plan(s_fault_t *plan, int *count, int n, s_fault_kind_t kind,
                   int first, int span)
{
    int order[8];
    for (int i = 0; i < n; i++) {
        if (i % span == 0) {
            for (int j = 0; j < span; j++)
                order[j] = j;
            for (int j = span - 1; j > 0; j--) {
                int r = (int) (s_rand() % (uint64_t) (j + 1));
                int t = order[j];
                order[j] = order[r];
                order[r] = t;
            }
        }
        s_fault_t *f = &plan[(*count)++];
        f->at = s_opt.seconds * (0.05 + 0.85 * s_rand01());
        f->kind = kind;
        f->target = first + order[i % span];
    }
}

static void s_fault(const s_fault_t *f)
{
    /* With two replicas, one of the two, at random. */
    int r = (int) (s_rand() % (uint64_t) s_replicas);
    s_proc_t *p =
        f->kind == S_PG_RESTART ? NULL : &s_procs[r * S_KINDS + f->target];
    if (p && p->pid <= 0)
        return; /* being restarted by the supervisor; skip */
    double t = s_elapsed();
    if (f->kind == S_KILL || f->kind == S_DISCONNECT) {
        kill(p->pid, SIGKILL);
        waitpid(p->pid, NULL, 0);
        p->pid = 0;
        p->kills++;
        s_wait(f->kind == S_KILL ? (long) (s_rand() % 500)
                                 : 1000 + (long) (s_rand() % 3000));
        double ready = s_start(p);
        p->restarts++;
        printf("e2e: t=%.1fs %s %s, back in %.2f s\n", t,
               f->kind == S_KILL ? "kill -9" : "disconnected partner", p->label,
               s_elapsed() - t);
        (void) ready;
    } else if (f->kind == S_TERM) {
        double t0 = s_now();
        int status = khproc_stop(p->pid, SIGTERM, 5000);
        double took = s_now() - t0;
        p->pid = 0;
        p->terms++;
        if (took > p->term_max_s)
            p->term_max_s = took;
        bool ok = status != -1 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok)
            p->term_failures++;
        printf("e2e: t=%.1fs SIGTERM %s: %s in %.2f s\n", t, p->label,
               status == -1        ? "still running after 5 s (killed)"
               : WIFEXITED(status) ? (ok ? "exit 0" : "exit non-zero")
                                   : "killed by a signal",
               took);
        s_start(p);
        p->restarts++;
    } else if (f->kind == S_PAUSE) {
        long ms = 2000 + (long) (s_rand() % 4000);
        kill(p->pid, SIGSTOP);
        s_sleep_ms(ms);
        kill(p->pid, SIGCONT);
        p->pauses++;
        printf("e2e: t=%.1fs SIGSTOP %s for %.1f s\n", t, p->label,
               (double) ms / 1000);
    } else if (f->target == 1) {
        /* A crash (immediate stop), and a random service killed and
         * started again while PostgreSQL is down: it must come up and
         * serve once the database is back. */
        s_proc_t *q = &s_procs[r * S_KINDS + (int) (s_rand() % S_SERVICES)];
        int rc = khproc_sh("%s/scripts/pgtmp.sh down %s/pg immediate"
                           " >>%s/pgtmp.log 2>&1",
                           s_src, s_run, s_run);
        if (q->pid > 0) {
            kill(q->pid, SIGKILL);
            waitpid(q->pid, NULL, 0);
            q->pid = 0;
            q->kills++;
        }
        double t0 = s_now();
        if (s_spawn(q) == 0)
            q->restarts++;
        s_sleep_ms(1000 + (long) (s_rand() % 3000));
        rc |= khproc_sh("%s/scripts/pgtmp.sh up %s/pg >>%s/pgtmp.log 2>&1",
                        s_src, s_run, s_run);
        s_pg_restarts[1]++;
        if (rc != 0) {
            printf("e2e: PostgreSQL restart (immediate) failed\n");
            s_failures++;
        }
        double ready = q->pid > 0 ? s_await(q, t0) : -1;
        printf("e2e: t=%.1fs PostgreSQL crashed (immediate), back in %.1f s;"
               " %s killed and started during the outage, ready %.1f s"
               " after\n",
               t, s_elapsed() - t, q->label, ready);
    } else {
        const char *mode = f->target ? "immediate" : "fast";
        int rc = khproc_sh("%s/scripts/pgtmp.sh restart %s/pg %s"
                           " >>%s/pgtmp.log 2>&1",
                           s_src, s_run, mode, s_run);
        s_pg_restarts[f->target]++;
        if (rc != 0) {
            printf("e2e: PostgreSQL restart (%s) failed\n", mode);
            s_failures++;
        }
        printf("e2e: t=%.1fs PostgreSQL restarted (%s) in %.1f s\n", t, mode,
               s_elapsed() - t);
    }
}

/* ---- setup ------------------------------------------------------------- */

/* A free port that this run has not handed out yet (the kernel may give
 * the same free port twice in a row). */
static int s_free_port(void)
{
    static int used[32];
    static int count;
    for (int tries = 0; tries < 100; tries++) {
        int port = khproc_free_port();
        bool taken = port <= 0;
        for (int i = 0; i < count && !taken; i++)
            taken = used[i] == port;
        if (!taken && count < 32) {
            used[count++] = port;
            return port;
        }
    }
    return -1;
}

/* Read <run>/pg/env (export NAME='value' lines) into our environment. */
static int s_pg_env(void)
{
    char path[256], line[512];
    snprintf(path, sizeof path, "%s/pg/env", s_run);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f)) {
        char name[64], value[400];
        if (sscanf(line, "export %63[A-Z_]='%399[^']'", name, value) == 2)
            setenv(name, value, 1);
    }
    fclose(f);
    return 0;
}

static int s_setup(void)
{
    char log[256];
    snprintf(log, sizeof log, "%s/setup.log", s_run);
    if (khproc_sh("%s/scripts/pgtmp.sh start %s/pg --fsync >>%s 2>&1", s_src,
                  s_run, log) != 0 ||
        s_pg_env() != 0) {
        printf("e2e: cannot start PostgreSQL (see %s)\n", log);
        return -1;
    }
    PGconn *conn = PQconnectdb("dbname=postgres");
    PGresult *res = PQexec(conn, "CREATE DATABASE ketenhub");
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    PQfinish(conn);
    if (!ok) {
        printf("e2e: cannot create the database\n");
        return -1;
    }
    setenv("PGDATABASE", "ketenhub", 1);
    struct {
        const char *id, *kind;
    } partners[] = {{E2E_SUBMITTER, "municipality"},
                    {"veilig-thuis", "veilig_thuis"},
                    {"zorgcoordinator", "zorgcoordinator"},
                    {"avim", "police"}};
    int rc = khproc_sh("%s migrate --dir %s/migrations >>%s 2>&1", s_ctl, s_src,
                       log);
    rc |= khproc_sh("%s hub keygen --out %s/hub >>%s 2>&1", s_ctl, s_run, log);
    rc |= khproc_sh("%s audit keygen --out %s/audit >>%s 2>&1", s_ctl, s_run,
                    log);
    rc |= khproc_sh("mkdir -p %s/partners", s_run);
    for (size_t i = 0; i < sizeof partners / sizeof partners[0]; i++)
        rc |= khproc_sh("%s partner add %s --name 'E2E %s' --kind %s"
                        " --cert-dir %s/partners --out %s/keys >>%s 2>&1",
                        s_ctl, partners[i].id, partners[i].id, partners[i].kind,
                        s_run, s_run, log);
    if (rc != 0) {
        printf("e2e: setup failed (see %s)\n", log);
        return -1;
    }
    char inbox[256];
    snprintf(inbox, sizeof inbox, "%s/inbox", s_run);
    mkdir(inbox, 0700);

    glob_t g;
    char pattern[256];
    snprintf(pattern, sizeof pattern, "%s/schemas/examples/*.json", s_src);
    if (glob(pattern, 0, NULL, &g) != 0)
        return -1;
    for (size_t i = 0; i < g.gl_pathc && s_example_count < 16; i++) {
        json_error_t jerr;
        json_t *doc = json_load_file(g.gl_pathv[i], 0, &jerr);
        if (doc)
            s_examples[s_example_count++] = doc;
    }
    globfree(&g);
    return s_example_count ? 0 : -1;
}

/* Stop everything: SIGTERM (5 s, then SIGKILL) for every process, listeners
 * first, then PostgreSQL. final: count the services' exits as graceful
 * shutdowns too (the hub is idle by then). */
static void s_stop_all(bool final)
{
    for (int i = s_proc_count - 1; i >= 0; i--) {
        s_proc_t *p = &s_procs[i];
        if (p->pid <= 0)
            continue;
        double t0 = s_now();
        int status = khproc_stop(p->pid, SIGTERM, 5000);
        double took = s_now() - t0;
        p->pid = 0;
        if (final && !p->listener) {
            p->terms++;
            if (took > p->term_max_s)
                p->term_max_s = took;
            if (status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
                p->term_failures++;
        }
    }
}

/* ---- drain ------------------------------------------------------------- */

static long s_count(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    long n = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1
                 ? atol(PQgetvalue(res, 0, 0))
                 : -1;
    PQclear(res);
    return n;
}

/* Wait until nothing is in flight: every referral routed, every delivery
 * acknowledged, every audit event sealed. Returns the seconds it took or
 * -1 on timeout. */
static double s_drain(void)
{
    double t0 = s_now();
    PGconn *conn = NULL;
    while (s_now() - t0 < s_opt.drain_s) {
        s_supervise();
        if (!conn || PQstatus(conn) != CONNECTION_OK) {
            PQfinish(conn);
            conn = PQconnectdb("");
        }
        long busy = s_count(
            conn, "SELECT (SELECT count(*) FROM referrals WHERE state <>"
                  " 'routed') + (SELECT count(*) FROM deliveries WHERE state"
                  " NOT IN ('acknowledged', 'dead')) + (SELECT count(*) FROM"
                  " audit_events e WHERE NOT EXISTS (SELECT 1 FROM"
                  " audit_seals s WHERE s.seq = e.seq))");
        if (busy == 0) {
            PQfinish(conn);
            return s_now() - t0;
        }
        s_wait(500);
    }
    PQfinish(conn);
    return -1;
}

/* ---- main -------------------------------------------------------------- */

static void s_usage(void)
{
    fprintf(stderr,
            "usage: ketenhub-e2e [--referrals N] [--seconds S] [--kills N]"
            " [--pg-restarts N]\n"
            "       [--pauses N] [--disconnects N] [--terms N] [--clients N]"
            " [--drain S]\n"
            "       [--seed S] [--replicas 1] [--keep]\n");
}

static int s_args(int argc, char **argv)
{
    static const struct option options[] = {
        {"referrals", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'},
        {"kills", required_argument, NULL, 'k'},
        {"pg-restarts", required_argument, NULL, 'p'},
        {"pauses", required_argument, NULL, 'z'},
        {"disconnects", required_argument, NULL, 'd'},
        {"terms", required_argument, NULL, 't'},
        {"clients", required_argument, NULL, 'c'},
        {"drain", required_argument, NULL, 'D'},
        {"seed", required_argument, NULL, 'S'},
        {"replicas", required_argument, NULL, 'r'},
        {"keep", no_argument, NULL, 'K'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'n':
            s_opt.referrals = atol(optarg);
            break;
        case 's':
            s_opt.seconds = atof(optarg);
            break;
        case 'k':
            s_opt.kills = atoi(optarg);
            break;
        case 'p':
            s_opt.pg_restarts = atoi(optarg);
            break;
        case 'z':
            s_opt.pauses = atoi(optarg);
            break;
        case 'd':
            s_opt.disconnects = atoi(optarg);
            break;
        case 't':
            s_opt.terms = atoi(optarg);
            break;
        case 'c':
            s_opt.clients = atoi(optarg);
            break;
        case 'D':
            s_opt.drain_s = atof(optarg);
            break;
        case 'S':
            s_opt.seed = strtoul(optarg, NULL, 10);
            break;
        case 'K':
            s_opt.keep = true;
            break;
        case 'r':
            s_replicas = atoi(optarg);
            if (s_replicas != 1 && s_replicas != 2) {
                fprintf(stderr, "ketenhub-e2e: --replicas is 1 or 2\n");
                return 2;
            }
            break;
        case 'h':
            s_usage();
            return 1;
        default:
            s_usage();
            return 2;
        }
    }
    if (optind != argc || s_opt.referrals < 1 || s_opt.seconds < 5 ||
        s_opt.kills < 0 || s_opt.pg_restarts < 0 || s_opt.pauses < 0 ||
        s_opt.disconnects < 0 || s_opt.terms < 0 || s_opt.clients < 1 ||
        s_opt.clients > 64 || s_opt.drain_s < 10) {
        s_usage();
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    int rc = s_args(argc, argv);
    if (rc)
        return rc == 1 ? 0 : 2;
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    zsys_handler_set(NULL);
    if (!s_opt.seed) {
        struct timespec t;
        clock_gettime(CLOCK_REALTIME, &t);
        s_opt.seed = (unsigned long) (t.tv_nsec ^ t.tv_sec) % 1000000000UL + 1;
    }
    s_rng = s_opt.seed * 0x9E3779B97F4A7C15ULL + 1;
    clock_gettime(CLOCK_MONOTONIC, &s_t0); /* again when the load starts */
    snprintf(s_ctl, sizeof s_ctl, "%s/tools/ctl/ketenhubctl", s_bin);
    snprintf(s_run, sizeof s_run, "/tmp/khe2e.XXXXXX");
    if (!mkdtemp(s_run)) {
        perror("ketenhub-e2e: mkdtemp");
        return 1;
    }
    printf("e2e: seed %lu, %ld referrals over %.0f s, %d kills, %d PostgreSQL"
           " restarts, %d pauses, %d disconnects, %d SIGTERMs; run dir %s\n",
           s_opt.seed, s_opt.referrals, s_opt.seconds, s_opt.kills,
           s_opt.pg_restarts, s_opt.pauses, s_opt.disconnects, s_opt.terms,
           s_run);
    s_proc_count = s_replicas * S_KINDS;
    for (int r = 0; r < s_replicas; r++) {
        for (int k = 0; k < S_KINDS; k++) {
            s_proc_t *p = &s_procs[r * S_KINDS + k];
            p->listener = k >= S_SERVICES;
            p->name = p->listener ? e2e_listener_ids[k - S_SERVICES]
                                  : s_service_names[k];
            p->replica = r;
            snprintf(p->label, sizeof p->label, "%s%s", p->name, r ? "-2" : "");
        }
        s_port_intake[r] = s_free_port();
        s_port_routing[r] = s_free_port();
        s_port_notify[r] = s_free_port();
        s_port_wake[r] = s_free_port();
        for (int k = 0; k < S_SERVICES; k++)
            s_port_health[r][k] = s_free_port();
    }

    int failed = 1;
    bool checked = false;
    pthread_t threads[64];
    int started = 0;
    s_keys = calloc((size_t) s_opt.referrals, sizeof *s_keys);
    char path[256];
    snprintf(path, sizeof path, "%s/accepted.txt", s_run);
    s_accepted_file = fopen(path, "w");
    if (!s_keys || !s_accepted_file || s_setup() != 0)
        goto done;
    for (long i = 0; i < s_opt.referrals; i++)
        snprintf(s_keys[i].key, sizeof s_keys[i].key, "e2e-%lu-%ld", s_opt.seed,
                 i);
    /* Downstream first, so the first wake-ups find someone. */
    for (int i = s_proc_count - 1; i >= 0; i--)
        if (s_start(&s_procs[i]) < 0)
            goto done;

    /* The schedule. */
    int planned = s_opt.kills + s_opt.terms + s_opt.pauses + s_opt.pg_restarts +
                  s_opt.disconnects;
    s_fault_t *plan = calloc((size_t) planned + 1, sizeof *plan);
    int count = 0;
    if (!plan)
        goto done;
    s_plan(plan, &count, s_opt.kills, S_KILL, 0, S_SERVICES);
    s_plan(plan, &count, s_opt.terms, S_TERM, 0, S_SERVICES);
    s_plan(plan, &count, s_opt.pauses, S_PAUSE, 0, S_SERVICES);
    s_plan(plan, &count, s_opt.disconnects, S_DISCONNECT, S_SERVICES,
           E2E_LISTENERS);
    s_plan(plan, &count, s_opt.pg_restarts, S_PG_RESTART, 0, 2);
    qsort(plan, (size_t) count, sizeof *plan, s_fault_cmp);

    clock_gettime(CLOCK_MONOTONIC, &s_t0);
    for (; started < s_opt.clients; started++)
        if (pthread_create(&threads[started], NULL, s_load,
                           (void *) (intptr_t) started) != 0)
            break;
    for (int i = 0; i < count; i++) {
        double wait = plan[i].at - s_elapsed();
        if (wait > 0)
            s_wait((long) (wait * 1000));
        s_fault(&plan[i]);
    }
    free(plan);
    while (s_elapsed() < s_opt.seconds * 0.9 ||
           atomic_load(&s_next) < s_opt.referrals)
        s_wait(200);
    printf("e2e: t=%.1fs load sent; draining\n", s_elapsed());

    /* Every key answered first (the generator resends under the same key
     * until it is), within two minutes; then the drain, which also gives
     * up the generator's retries when it times out. */
    for (long waited = 0; atomic_load(&s_finished) < started && waited < 120000;
         waited += 200)
        s_wait(200);
    double drained = s_drain();
    atomic_store(&s_give_up, true);
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    started = 0;
    if (drained < 0)
        drained = s_drain(); /* once more, with every answer in */
    printf("e2e: t=%.1fs %s\n", s_elapsed(),
           drained >= 0 ? "drained" : "did NOT drain");

    long unanswered = 0;
    for (long i = 0; i < s_opt.referrals; i++)
        unanswered += !s_keys[i].answered;
    int kills = 0, terms = 0, pauses = 0, disc = 0, unexpected = 0;
    int per_kind[S_SERVICES] = {0};
    for (int i = 0; i < s_proc_count; i++) {
        s_proc_t *p = &s_procs[i];
        unexpected += p->unexpected;
        if (p->listener) {
            disc += p->kills;
            continue;
        }
        kills += p->kills;
        terms += p->terms;
        pauses += p->pauses;
        per_kind[i % S_KINDS] += p->kills;
    }
    char per[256] = "";
    for (int k = 0; k < S_SERVICES; k++) {
        size_t len = strlen(per);
        snprintf(per + len, sizeof per - len, "%s%s %d", len ? ", " : "",
                 s_service_names[k], per_kind[k]);
    }
    printf("e2e: figures: %ld accepted of %ld keys (%ld unanswered, %ld"
           " refused), %ld timeouts and %ld retryable refusals resent under"
           " the same key, %ld resubmissions; kill -9: %d (%s); SIGTERM: %d;"
           " SIGSTOP: %d; partner disconnects: %d; PostgreSQL restarts: %d"
           " fast, %d immediate; drain %.1f s\n",
           atomic_load(&s_accepted), s_opt.referrals, unanswered,
           atomic_load(&s_refused), atomic_load(&s_timeouts),
           atomic_load(&s_retryable), atomic_load(&s_resubmits), kills, per,
           terms, pauses, disc, s_pg_restarts[0], s_pg_restarts[1], drained);

    e2e_check("load", unanswered == 0 && atomic_load(&s_refused) == 0,
              "%ld of %ld keys accepted, %ld unanswered, %ld refused",
              atomic_load(&s_accepted), s_opt.referrals, unanswered,
              atomic_load(&s_refused));
    e2e_check("drain", drained >= 0,
              drained >= 0 ? "in %.1f s" : "not within %.0f s",
              drained >= 0 ? drained : s_opt.drain_s);
    e2e_check("restarts", s_failures == 0 && unexpected == 0,
              "%d restarts failed, %d processes ended on their own", s_failures,
              unexpected);

    e2e_run_t run = {.run_dir = s_run,
                     .source_dir = s_src,
                     .ctl = s_ctl,
                     .keys = s_keys,
                     .key_count = (size_t) s_opt.referrals};
    e2e_check_all(&run);

    s_stop_all(true);
    int term_fail = 0;
    double term_max = 0;
    terms = 0;
    for (int i = 0; i < s_proc_count; i++) {
        if (s_procs[i].listener)
            continue;
        term_fail += s_procs[i].term_failures;
        terms += s_procs[i].terms;
        if (s_procs[i].term_max_s > term_max)
            term_max = s_procs[i].term_max_s;
    }
    e2e_check("graceful", term_fail == 0,
              "%d SIGTERMs (under load and at the end), %d did not exit 0"
              " within 5 s, slowest %.2f s",
              terms, term_fail, term_max);
    failed = e2e_report();
    checked = true;

done:
    if (!checked) {
        e2e_check("setup", false, "the hub did not start; see the logs");
        e2e_report();
    }
    atomic_store(&s_give_up, true);
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    s_stop_all(false);
    khproc_sh("%s/scripts/pgtmp.sh stop %s/pg >/dev/null 2>&1", s_src, s_run);
    if (s_accepted_file)
        fclose(s_accepted_file);
    for (size_t i = 0; i < s_example_count; i++)
        json_decref(s_examples[i]);
    free(s_keys);
    if (failed || s_opt.keep)
        printf("e2e: logs kept in %s\n", s_run);
    else
        khproc_sh("rm -rf %s", s_run);
    return failed ? 1 : 0;
}
