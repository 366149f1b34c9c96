/*
 * ketenhub-audit: seals the audit trail. Every KH_AUDIT_POLL_MS it chains
 * the events whose seq values can no longer change (see schemas/audit.md)
 * into audit_seals and signs checkpoints with the hub's audit key every
 * KH_AUDIT_CHECKPOINT_EVERY events and at least every
 * KH_AUDIT_CHECKPOINT_MS. Several replicas may run: an advisory lock lets
 * one seal at a time. Settings come from the environment (--help).
 */
#include <poll.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ketenhub/config.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"
#include "ketenhub/service.h"
#include "ketenhub/trail_db.h"

static kh_cfg_t s_config[] = {
    KH_CFG_DATABASE,
    KH_CFG("KH_AUDIT_KEY", KH_CFG_STRING, NULL, 0, 0, false,
           "the hub's Ed25519 audit secret key file (hub-audit.key)"),
    KH_CFG("KH_AUDIT_POLL_MS", KH_CFG_INT, "200", 10, 3600000, false,
           "look for new events this often"),
    KH_CFG("KH_AUDIT_CHECKPOINT_EVERY", KH_CFG_INT, "1000", 1, 100000000, false,
           "a signed checkpoint after this many events"),
    KH_CFG("KH_AUDIT_CHECKPOINT_MS", KH_CFG_INT, "60000", 10, 86400000, false,
           "and at least this often while events come in"),
    KH_CFG("KH_AUDIT_BATCH", KH_CFG_INT, "10000", 1, 1000000, false,
           "events read per statement while sealing"),
    KH_CFG("KH_AUDIT_DELAY_WARN_MS", KH_CFG_INT, "60000", 100, 86400000, false,
           "warn when a running transaction holds sealing back this long"),
    KH_CFG("KH_HEALTH_ENDPOINT", KH_CFG_STRING, "127.0.0.1:9704", 0, 0, false,
           "HOST:PORT of /livez, /readyz, /metrics (\"none\": off)"),
    KH_CFG_WATCHDOG,
    KH_CFG("KH_LOG_LEVEL", KH_CFG_STRING, "info", 0, 0, false,
           "debug, info, warn or error"),
};
#define S_CONFIG_COUNT (sizeof s_config / sizeof s_config[0])

/* What /readyz says while the service cannot seal (after "not ready: "). */
#define S_FAULT_DB "database unreachable"
#define S_FAULT_SEAL "sealing fails: see seal_failed in the log"
#define S_FAULT_BROKEN "trail broken: run ketenhubctl audit verify"
#define S_FAULT_REPLACED "signing key replaced: start with the current key"

/* Sealing runs every KH_AUDIT_POLL_MS (5 times a second by default): a
 * line per step at info level flooded the log (some 400,000 lines a day
 * under steady load, drowning the warnings an operator looks for). Each
 * step is logged at debug level; at info, an event=stats line sums them up
 * every S_STATS_MS while something is sealed, as intake and notification
 * do, and once more at the stop. */
#define S_STATS_MS 10000

typedef struct {
    long events, checkpoints, steps;
    double ms_max;
    struct timespec since; /* the first step summed up */
} s_stats_t;

static void s_stats_log(s_stats_t *st)
{
    if (st->steps > 0)
        kh_log_info("stats",
                    "sealed=%ld checkpoints=%ld steps=%ld step_ms_max=%.2f",
                    st->events, st->checkpoints, st->steps, st->ms_max);
    memset(st, 0, sizeof *st);
}

/* An attempt failed now: the next waits retry_ms, twice as long as the
 * last wait when the one before failed too. */
static void s_failed(int *retry_ms, struct timespec *failed_at)
{
    if (failed_at->tv_sec)
        *retry_ms = kh_db_retry_next(*retry_ms);
    clock_gettime(CLOCK_MONOTONIC, failed_at);
}

static const kh_cfg_t *s_cfg(const char *name)
{
    return kh_config_get(s_config, S_CONFIG_COUNT, name);
}

static double s_ms_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double) (t1.tv_sec - t0->tv_sec) * 1e3 +
           (double) (t1.tv_nsec - t0->tv_nsec) / 1e6;
}

/* Wait wait_ms for a stop (SIGTERM, SIGINT on signal_fd), in slices of a
 * second that each beat: a long KH_AUDIT_POLL_MS is no silence for /livez
 * and the watchdog. Returns false once a stop came. */
static bool s_wait_stop(int signal_fd, int wait_ms)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int left = wait_ms - (int) s_ms_since(&t0);
        struct pollfd pfd = {.fd = signal_fd, .events = POLLIN};
        if (poll(&pfd, 1, left > 1000 ? 1000 : left > 0 ? left : 0) > 0) {
            int sig = kh_signals_read(signal_fd);
            if (sig == SIGTERM || sig == SIGINT) {
                kh_log_info("stopping", "signal=%d", sig);
                return false;
            }
        }
        kh_health_beat();
        if (left <= 1000)
            return true;
    }
}

static int s_main(int argc, char **argv)
{
    int signal_fd = -1;
    int status = kh_service_start("audit", argc, argv, s_config, S_CONFIG_COUNT,
                                  &signal_fd);
    if (status >= 0)
        return status;
    kh_error_t err;
    kh_error_clear(&err);
    /* First, so that a bad KH_HEALTH_ENDPOINT is named before anything
     * else. audit binds no socket; the probe reads the trail head. */
    kh_health_config_t hc = {
        .service = "audit",
        .endpoint = s_cfg("KH_HEALTH_ENDPOINT")->str,
        .bind_optional = !kh_config_is_set("KH_HEALTH_ENDPOINT"),
        .conninfo = s_cfg("KH_DATABASE_URL")->str,
        .watchdog_ms = (int) s_cfg("KH_WATCHDOG_S")->num * 1000};
    kh_health_t *health = kh_health_new(&hc, &err);
    if (!health) {
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        close(signal_fd);
        return err.code == KH_E_CONFIG ? 2 : 1;
    }
    kh_health_set_sockets(health, true);
    unsigned char sk[KH_TRAIL_SECRET_KEY_SIZE];
    if (kh_trail_load_secret(s_cfg("KH_AUDIT_KEY")->str, sk, &err) != 0) {
        /* The setting, not the file, is what to correct: name it. */
        kh_log_error("start_failed",
                     "code=config path=KH_AUDIT_KEY "
                     "file=\"%s\" msg=\"%s\"",
                     KH_LOG_Q(s_cfg("KH_AUDIT_KEY")->str),
                     KH_LOG_Q(err.message));
        kh_health_destroy(&health);
        close(signal_fd);
        return 2;
    }
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = s_cfg("KH_AUDIT_CHECKPOINT_EVERY")->num,
        .checkpoint_ms = s_cfg("KH_AUDIT_CHECKPOINT_MS")->num,
        .batch = s_cfg("KH_AUDIT_BATCH")->num,
    };
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(sk, &cfg);
    /* The public half, for the ready line: after a rotation of the audit
     * key it shows which key signs (the last line of hub-audit.pub). */
    unsigned char pk[KH_TRAIL_PUBLIC_KEY_SIZE];
    char pk_hex[2 * KH_TRAIL_PUBLIC_KEY_SIZE + 1];
    crypto_sign_ed25519_sk_to_pk(pk, sk);
    kh_trail_hex(pk, sizeof pk, pk_hex);
    sodium_memzero(sk, sizeof sk);
    if (!sealer) {
        kh_log_error("start_failed", "reason=\"out of memory\"");
        kh_health_destroy(&health);
        close(signal_fd);
        return 1;
    }
    int poll_ms = (int) s_cfg("KH_AUDIT_POLL_MS")->num;
    int64_t warn_ms = s_cfg("KH_AUDIT_DELAY_WARN_MS")->num, warned = 0;
    PGconn *conn = NULL;
    kh_db_connecting_t *connecting = NULL; /* an attempt under way */
    bool ready = false, running = true;
    const char *broken = NULL; /* why nothing is sealed: S_FAULT_BROKEN... */
    /* Why the service cannot seal, for /readyz: set by a connection or a
     * step that failed, cleared by a step that succeeds. The trail found
     * broken comes first (it lasts until someone repairs it). Until the
     * first connection the service is not ready either, as its
     * event=ready says. */
    const char *fault = S_FAULT_DB;
    /* Attempts to connect or to seal that fail come ever more slowly (and
     * are logged one by one), as in intake and routing: not one a poll. */
    int retry_ms = KH_DB_RETRY_MIN_MS;
    struct timespec failed_at = {0, 0}; /* the last failed attempt */
    s_stats_t stats;
    memset(&stats, 0, sizeof stats);
    int rc = 0;
    while (running) {
        kh_health_beat();
        bool held = !connecting && failed_at.tv_sec &&
                    s_ms_since(&failed_at) < retry_ms;
        if (!conn && !held) {
            conn = kh_db_connect_async(
                &connecting, s_cfg("KH_DATABASE_URL")->str, "audit", &err);
            /* A stalled database ends a round rather than the service's
             * loop (its liveness beat), as in routing and notification. */
            if (conn && kh_db_exec(conn,
                                   "SET statement_timeout = '300s'; SET"
                                   " lock_timeout = '10s'; SET"
                                   " idle_in_transaction_session_timeout ="
                                   " '120s'",
                                   &err) != 0) {
                PQfinish(conn);
                conn = NULL;
            }
            if (!conn && !connecting) {
                fault = S_FAULT_DB;
                s_failed(&retry_ms, &failed_at);
                kh_log_warn("db_unavailable", "retry_ms=%d msg=\"%s\"",
                            retry_ms, KH_LOG_Q(err.message));
            } else if (conn) {
                /* The first time ready; after an outage, back. */
                if (!ready)
                    kh_log_info("ready", "public_key=%s", pk_hex);
                else
                    kh_log_info("db_connected", NULL);
                ready = true;
                retry_ms = KH_DB_RETRY_MIN_MS;
                failed_at.tv_sec = failed_at.tv_nsec = 0;
            }
        }
        if (conn && !held) {
            struct timespec t0;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            long cps = 0;
            long n = kh_trail_sealer_step(sealer, conn, &cps, &err);
            if (n < 0 && (err.code == KH_E_TRAIL_BROKEN ||
                          err.code == KH_E_TRAIL_KEY_REPLACED)) {
                /* Seals were removed or rewritten (verify names the
                 * event), or another key signs now: nothing is sealed or
                 * signed until someone acts. One alert while it lasts,
                 * not one a round. */
                const char *why = err.code == KH_E_TRAIL_BROKEN
                                      ? S_FAULT_BROKEN
                                      : S_FAULT_REPLACED;
                if (broken != why)
                    kh_log_error("alert", "kind=%s msg=\"%s\"",
                                 kh_error_name(err.code),
                                 KH_LOG_Q(err.message));
                broken = why;
            } else if (n < 0) {
                fault = S_FAULT_SEAL;
                s_failed(&retry_ms, &failed_at);
                kh_log_warn("seal_failed", "code=%s retry_ms=%d msg=\"%s\"",
                            kh_error_name(err.code), retry_ms,
                            KH_LOG_Q(err.message));
                if (PQstatus(conn) != CONNECTION_OK ||
                    kh_db_session_ended(err.sqlstate)) {
                    PQfinish(conn);
                    conn = NULL;
                    fault = S_FAULT_DB;
                }
            } else {
                broken = NULL;
                fault = NULL;
                retry_ms = KH_DB_RETRY_MIN_MS;
                failed_at.tv_sec = failed_at.tv_nsec = 0;
                if (n > 0 || cps > 0) {
                    kh_metric_add("trail_events_sealed_total", NULL,
                                  (uint64_t) n);
                    kh_metric_add("trail_checkpoints_total", NULL,
                                  (uint64_t) cps);
                    double ms = s_ms_since(&t0);
                    kh_log_debug("sealed", "events=%ld checkpoints=%ld ms=%.2f",
                                 n, cps, ms);
                    if (stats.steps++ == 0)
                        clock_gettime(CLOCK_MONOTONIC, &stats.since);
                    stats.events += n;
                    stats.checkpoints += cps;
                    if (ms > stats.ms_max)
                        stats.ms_max = ms;
                }
                if (stats.steps > 0 && s_ms_since(&stats.since) >= S_STATS_MS)
                    s_stats_log(&stats);
            }
            /* Events that stay unsealed are a finding (NOTES.md): say so,
             * once per warning period. */
            int64_t waiting = kh_trail_sealer_waiting_ms(sealer);
            if (waiting >= warn_ms * (warned + 1)) {
                kh_log_warn("seal_delayed",
                            "waiting_ms=%lld reason=\"a transaction that "
                            "may hold a lower seq is still running, or "
                            "prepared (pg_prepared_xacts)\"",
                            (long long) waiting);
                warned++;
            } else if (waiting == 0)
                warned = 0;
        }
        kh_health_set_fault(health, broken ? broken : fault);
        int wait_ms = connecting ? KH_DB_CONNECT_POLL_MS
                      : failed_at.tv_sec
                          ? retry_ms - (int) s_ms_since(&failed_at)
                      : conn && kh_trail_sealer_behind(sealer)
                          ? 0 /* a backlog: on at once, a stop seen */
                          : poll_ms;
        running = s_wait_stop(signal_fd, wait_ms);
    }
    /* Seal what is final before leaving; a failure only means the next
     * start does it, as it does a backlog being sealed. */
    if (conn && !kh_trail_sealer_behind(sealer)) {
        long n = kh_trail_sealer_flush(sealer, conn, 2000, &err);
        if (n < 0)
            kh_log_warn("seal_failed", "code=%s msg=\"%s\"",
                        kh_error_name(err.code), KH_LOG_Q(err.message));
        else if (n > 0) {
            stats.steps++;
            stats.events += n;
        }
    }
    PQfinish(conn);
    kh_db_connect_abandon(&connecting);
    kh_trail_sealer_destroy(&sealer);
    kh_health_destroy(&health);
    kh_metrics_reset();
    close(signal_fd);
    s_stats_log(&stats);
    kh_log_info("stopped", NULL);
    return rc;
}

/* The status, or _exit(status) while an abandoned attempt to connect is
 * still under way (kh_service_exit). */
int main(int argc, char **argv)
{
    return kh_service_exit(s_main(argc, argv));
}
