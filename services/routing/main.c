/*
 * ketenhub-routing: applies the routing rules to accepted referrals and
 * commits one delivery per target partner, with that partner's projection,
 * and the audit event. Settings come from the environment (see the table
 * below and --help).
 */
#include <czmq.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ketenhub/config.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"
#include "ketenhub/service.h"
#include "routing.h"

#ifndef KH_DEFAULT_SHARE_DIR
#define KH_DEFAULT_SHARE_DIR "/usr/local/share/ketenhub"
#endif

static kh_cfg_t s_config[] = {
    KH_CFG_DATABASE,
    KH_CFG("KH_RULES_FILE", KH_CFG_STRING,
           KH_DEFAULT_SHARE_DIR "/schemas/rules/default.yaml", 0, 0, false,
           "the routing rules (SIGHUP reloads them)"),
    KH_CFG("KH_SCHEMA_DIR", KH_CFG_STRING, KH_DEFAULT_SHARE_DIR "/schemas", 0,
           0, false, "directory holding referral.v1.json"),
    KH_CFG("KH_ROUTING_ENDPOINT", KH_CFG_ENDPOINT, "tcp://127.0.0.1:7702", 0, 0,
           false, "ZeroMQ endpoint bound for wake-ups from intake"),
    KH_CFG("KH_NOTIFY_WAKE_ENDPOINT", KH_CFG_ENDPOINT_OR_NONE,
           "tcp://127.0.0.1:7704", 0, 0, false,
           "notification's wake-up endpoint (\"none\" to send none)"),
    KH_CFG("KH_HUB_CERT", KH_CFG_STRING, NULL, 0, 0, false,
           "hub certificate file (its _secret file beside it)"),
    KH_CFG("KH_ROUTING_BATCH", KH_CFG_INT, "100", 1, 10000, false,
           "most referrals routed in one transaction"),
    KH_CFG("KH_ROUTING_BATCH_BYTES", KH_CFG_INT, "8388608", 65536, 1073741824,
           false,
           "most bytes of stored referrals routed in one transaction (the "
           "first of a pass whatever its size)"),
    KH_CFG("KH_ROUTING_POLL_MS", KH_CFG_INT, "1000", 10, 3600000, false,
           "look for accepted referrals at least this often"),
    KH_CFG("KH_ROUTING_HOLD_MS", KH_CFG_INT, "60000", 100, 86400000, false,
           "how long a referral whose writes fail on their own is held "
           "back before it is tried again"),
    KH_CFG("KH_PARTNER_REFRESH_MS", KH_CFG_INT, "5000", 100, 3600000, false,
           "how often the partner registry is re-read besides when it "
           "changes (optional targets)"),
    KH_CFG("KH_HEALTH_ENDPOINT", KH_CFG_STRING, "127.0.0.1:9702", 0, 0, false,
           "HOST:PORT of /livez, /readyz, /metrics (\"none\": off)"),
    KH_CFG_WATCHDOG,
    KH_CFG("KH_LOG_LEVEL", KH_CFG_STRING, "info", 0, 0, false,
           "debug, info, warn or error"),
};
#define S_CONFIG_COUNT (sizeof s_config / sizeof s_config[0])

static const kh_cfg_t *s_cfg(const char *name)
{
    return kh_config_get(s_config, S_CONFIG_COUNT, name);
}

/* The default path when it exists, else the source tree's copy (a build
 * that was not installed); a path set in the environment is kept. */
static const char *s_path(const char *name, const char *relative, char *buf,
                          size_t size)
{
    const char *path = s_cfg(name)->str;
    if (getenv(name) || access(path, R_OK) == 0)
        return path;
#ifdef KH_ROUTING_SOURCE_DIR
    snprintf(buf, size, "%s/%s", KH_ROUTING_SOURCE_DIR, relative);
    if (access(buf, R_OK) == 0)
        return buf;
#else
    (void) relative;
    (void) buf;
    (void) size;
#endif
    return path;
}

static int s_main(int argc, char **argv)
{
    int signal_fd = -1;
    int status = kh_service_start("routing", argc, argv, s_config,
                                  S_CONFIG_COUNT, &signal_fd);
    if (status >= 0)
        return status;
    kh_error_t err;

    char rules[1024], schemas[1024], schema[1100];
    const char *rules_file = s_path(
        "KH_RULES_FILE", "schemas/rules/default.yaml", rules, sizeof rules);
    const char *schema_dir =
        s_path("KH_SCHEMA_DIR", "schemas", schemas, sizeof schemas);
    snprintf(schema, sizeof schema, "%s/referral.v1.json", schema_dir);
    routing_config_t config = {
        .conninfo = s_cfg("KH_DATABASE_URL")->str,
        .rules_file = rules_file,
        .schema_path = schema,
        .endpoint = s_cfg("KH_ROUTING_ENDPOINT")->str,
        .hub_cert = s_cfg("KH_HUB_CERT")->str,
        .notify_endpoint = s_cfg("KH_NOTIFY_WAKE_ENDPOINT")->str,
        .batch = (size_t) s_cfg("KH_ROUTING_BATCH")->num,
        .batch_bytes = (size_t) s_cfg("KH_ROUTING_BATCH_BYTES")->num,
        .poll_ms = (int) s_cfg("KH_ROUTING_POLL_MS")->num,
        .partner_refresh_ms = (int) s_cfg("KH_PARTNER_REFRESH_MS")->num,
        .hold_ms = (int) s_cfg("KH_ROUTING_HOLD_MS")->num,
    };
    kh_log_info("files", "rules=%s schema=%s", rules_file, schema);

    /* First, so that a bad KH_HEALTH_ENDPOINT is named before anything
     * else; ready once the socket is bound and the rules are loaded. */
    kh_health_config_t hc = {
        .service = "routing",
        .endpoint = s_cfg("KH_HEALTH_ENDPOINT")->str,
        .bind_optional = !kh_config_is_set("KH_HEALTH_ENDPOINT"),
        .conninfo = config.conninfo,
        .needs_rules = true,
        .watchdog_ms = (int) s_cfg("KH_WATCHDOG_S")->num * 1000};
    kh_health_t *health = kh_health_new(&hc, &err);
    if (!health) {
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        close(signal_fd);
        return err.code == KH_E_CONFIG ? 2 : 1;
    }
    /* PostgreSQL may come up after routing (a host that restarts, a
     * database that is being restarted), or be migrated after it starts
     * (its tables or columns missing: 42P01, 42703): wait for it, as the
     * other services do, until it answers or a SIGTERM comes. */
    routing_t *routing = routing_new(&config, &err);
    bool stopping = false, hup = false;
    for (int wait_ms = 0; routing && routing_start(routing, &err);) {
        if (err.code != KH_E_UNAVAILABLE &&
            strcmp(err.sqlstate, "42P01") != 0 &&
            strcmp(err.sqlstate, "42703") != 0) {
            routing_destroy(&routing);
            break;
        }
        kh_health_beat(); /* waiting is not hanging (/livez, watchdog) */
        int ms = KH_DB_CONNECT_POLL_MS; /* an attempt under way */
        if (!routing_connecting(routing)) {
            ms = wait_ms = kh_db_retry_next(wait_ms);
            kh_log_warn("db_unavailable", "retry_ms=%d msg=\"%s\"", wait_ms,
                        KH_LOG_Q(err.message));
        }
        struct pollfd pfd = {signal_fd, POLLIN, 0};
        if (poll(&pfd, 1, ms) > 0 &&
            kh_signals_take(signal_fd, &stopping, &hup) < 0) {
            routing_destroy(&routing);
            kh_health_destroy(&health);
            close(signal_fd);
            return 0;
        }
    }
    if (!routing) {
        kh_health_destroy(&health);
        kh_log_error("start_failed",
                     "code=%s path=%s line=%d column=%d msg=\"%s\"",
                     kh_error_name(err.code), err.path[0] ? err.path : "none",
                     err.line, err.column, KH_LOG_Q(err.message));
        bool usage = err.code == KH_E_CONFIG ||
                     strncmp(kh_error_name(err.code), "rules.", 6) == 0;
        close(signal_fd);
        return usage ? 2 : 1;
    }
    /* routing_new bound the socket, routing_start loaded the rules; a
     * failed reload keeps them. */
    kh_health_set_sockets(health, true);
    kh_health_set_rules(health, true);
    /* A SIGHUP while it waited may have come after the rules were read
     * (the first attempt that connects reads them): the loop reloads for
     * it, as for one that comes now (blocked, it is read from
     * signal_fd). */
    if (hup)
        raise(SIGHUP);
    int rc = routing_run(routing, signal_fd);
    kh_health_destroy(&health);
    routing_destroy(&routing);
    kh_metrics_reset();
    close(signal_fd);
    return rc == 0 ? 0 : 1;
}

/* The status, or _exit(status) while an abandoned attempt to connect is
 * still under way (kh_service_exit). */
int main(int argc, char **argv)
{
    return kh_service_exit(s_main(argc, argv));
}
