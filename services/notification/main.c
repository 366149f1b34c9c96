/*
 * ketenhub-notification: delivers routed referrals to the partners that
 * connect to it, until each partner acknowledges them; re-sends, makes
 * dead letters and escalates. Settings come from the environment (see the
 * table below and --help).
 */
#include <czmq.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ketenhub/codec.h"
#include "ketenhub/config.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"
#include "ketenhub/proto.h"
#include "ketenhub/service.h"
#include "notify.h"

static kh_cfg_t s_config[] = {
    KH_CFG_DATABASE,
    KH_CFG("KH_NOTIFY_ENDPOINT", KH_CFG_ENDPOINT, "tcp://*:7703", 0, 0, false,
           "ZeroMQ endpoint partners connect to for their deliveries"),
    KH_CFG("KH_NOTIFY_WAKE_ENDPOINT", KH_CFG_ENDPOINT_OR_NONE,
           "tcp://127.0.0.1:7704", 0, 0, false,
           "endpoint bound for routing's wake-ups (\"none\": none)"),
    KH_CFG("KH_HUB_CERT", KH_CFG_STRING, NULL, 0, 0, false,
           "hub certificate file (its _secret file beside it)"),
    KH_CFG("KH_HUB_CERT_NEXT", KH_CFG_STRING, "none", 0, 0, false,
           "the next hub certificate, served beside it (\"none\": none)"),
    KH_CFG("KH_NOTIFY_ENDPOINT_NEXT", KH_CFG_ENDPOINT_OR_NONE, "none", 0, 0,
           false, "endpoint of KH_HUB_CERT_NEXT (\"none\": none)"),
    KH_CFG("KH_PARTNER_CERT_DIR", KH_CFG_STRING, NULL, 0, 0, false,
           "directory of partners' public certificates"),
    KH_CFG("KH_NOTIFY_WINDOW", KH_CFG_INT, "1024", 1, KH_WINDOW_MAX, false,
           "most unacknowledged deliveries per partner connection"),
    KH_CFG("KH_PARTNER_REFUSALS", KH_CFG_INT, "20", 0, 1000000, false,
           "refused ACKs/NACKs a second one partner may cause (0: no limit)"),
    KH_CFG("KH_NOTIFY_MAX_CONNECTIONS", KH_CFG_INT, "8", 1, 1024, false,
           "most connections of one partner that are sent deliveries"),
    KH_CFG("KH_NOTIFY_ACK_TIMEOUT_MS", KH_CFG_INT, "30000", 100, 86400000,
           false, "re-send when no ACK came this long after a send"),
    KH_CFG("KH_NOTIFY_BACKOFF_MAX_MS", KH_CFG_INT, "600000", 100, 86400000,
           false,
           "longest wait between sends (the wait doubles), before its "
           "jitter of up to 20 %"),
    KH_CFG("KH_NOTIFY_MAX_ATTEMPTS", KH_CFG_INT, "10", 1, 1000, false,
           "sends before a delivery becomes a dead letter"),
    KH_CFG("KH_NOTIFY_MAX_AGE_S", KH_CFG_INT, "259200", 1, 31536000, false,
           "an unacknowledged delivery this old becomes a dead letter"),
    KH_CFG("KH_NOTIFY_ESCALATE_MS", KH_CFG_INT, "900000", 100, 604800000, false,
           "an urgent delivery unacknowledged this long escalates"),
    KH_CFG("KH_NOTIFY_PEER_TIMEOUT_MS", KH_CFG_INT, "5000", 500, 3600000, false,
           "a partner connection silent this long is forgotten"),
    KH_CFG("KH_NOTIFY_SWEEP_MS", KH_CFG_INT, "250", 10, 60000, false,
           "re-sends, dead letters and escalations are looked for this often"),
    KH_CFG("KH_PARTNER_REFRESH_MS", KH_CFG_INT, "5000", 100, 3600000, false,
           "how often the partner registry is re-read besides when it "
           "changes"),
    KH_CFG("KH_MAX_FRAME", KH_CFG_INT, "65536", 1024, 16777216, false,
           "largest frame a partner may send on this socket"),
    KH_CFG("KH_HEALTH_ENDPOINT", KH_CFG_STRING, "127.0.0.1:9703", 0, 0, false,
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

static int s_main(int argc, char **argv)
{
    int signal_fd = -1;
    int status = kh_service_start("notification", argc, argv, s_config,
                                  S_CONFIG_COUNT, &signal_fd);
    if (status >= 0)
        return status;
    notify_config_t config = {
        .conninfo = s_cfg("KH_DATABASE_URL")->str,
        .endpoint = s_cfg("KH_NOTIFY_ENDPOINT")->str,
        .wake_endpoint = s_cfg("KH_NOTIFY_WAKE_ENDPOINT")->str,
        .hub_cert = s_cfg("KH_HUB_CERT")->str,
        .hub_cert_next = s_cfg("KH_HUB_CERT_NEXT")->str,
        .endpoint_next = strcmp(s_cfg("KH_NOTIFY_ENDPOINT_NEXT")->str, "none")
                             ? s_cfg("KH_NOTIFY_ENDPOINT_NEXT")->str
                             : "",
        .partner_certs = s_cfg("KH_PARTNER_CERT_DIR")->str,
        .policy =
            {
                .ack_timeout_ms = (int) s_cfg("KH_NOTIFY_ACK_TIMEOUT_MS")->num,
                .backoff_max_ms = (int) s_cfg("KH_NOTIFY_BACKOFF_MAX_MS")->num,
                .max_attempts = (int) s_cfg("KH_NOTIFY_MAX_ATTEMPTS")->num,
                .max_age_s = (int) s_cfg("KH_NOTIFY_MAX_AGE_S")->num,
                .escalate_ms = (int) s_cfg("KH_NOTIFY_ESCALATE_MS")->num,
            },
        .window = (size_t) s_cfg("KH_NOTIFY_WINDOW")->num,
        .max_connections = (size_t) s_cfg("KH_NOTIFY_MAX_CONNECTIONS")->num,
        .partner_refusals = (int) s_cfg("KH_PARTNER_REFUSALS")->num,
        .peer_timeout_ms = (int) s_cfg("KH_NOTIFY_PEER_TIMEOUT_MS")->num,
        .sweep_ms = (int) s_cfg("KH_NOTIFY_SWEEP_MS")->num,
        .partner_refresh_ms = (int) s_cfg("KH_PARTNER_REFRESH_MS")->num,
        .max_frame = (size_t) s_cfg("KH_MAX_FRAME")->num,
    };
    kh_error_t err;
    if (config.policy.backoff_max_ms < config.policy.ack_timeout_ms) {
        kh_log_error("start_failed",
                     "code=config path=KH_NOTIFY_BACKOFF_MAX_MS msg=\"must "
                     "not be less than KH_NOTIFY_ACK_TIMEOUT_MS\"");
        close(signal_fd);
        return 2;
    }
    /* First, so that a bad KH_HEALTH_ENDPOINT is named before anything
     * else; not ready until the sockets are bound. The probe also reads
     * the backlog per partner for /metrics. */
    kh_health_config_t hc = {
        .service = "notification",
        .endpoint = s_cfg("KH_HEALTH_ENDPOINT")->str,
        .bind_optional = !kh_config_is_set("KH_HEALTH_ENDPOINT"),
        .conninfo = config.conninfo,
        .watchdog_ms = (int) s_cfg("KH_WATCHDOG_S")->num * 1000};
    kh_health_t *health = kh_health_new(&hc, &err);
    if (!health) {
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        close(signal_fd);
        return err.code == KH_E_CONFIG ? 2 : 1;
    }
    notify_t *notify = notify_new(&config, &err);
    if (!notify) {
        kh_health_destroy(&health);
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path[0] ? err.path : "none",
                     KH_LOG_Q(err.message));
        close(signal_fd);
        return err.code == KH_E_CONFIG ? 2 : 1;
    }
    kh_health_set_sockets(health, true); /* notify_new bound them */
    int rc = notify_run(notify, signal_fd);
    kh_health_destroy(&health);
    notify_destroy(&notify);
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
