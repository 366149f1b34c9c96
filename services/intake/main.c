/*
 * ketenhub-intake: accepts referrals from partner systems over CURVE and
 * commits them, with their audit events, before answering ACCEPTED.
 * Settings come from the environment (see the table below and --help).
 */
#include <czmq.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "intake.h"
#include "ketenhub/config.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"
#include "ketenhub/service.h"

#ifndef KH_DEFAULT_SHARE_DIR
#define KH_DEFAULT_SHARE_DIR "/usr/local/share/ketenhub"
#endif

static kh_cfg_t s_config[] = {
    KH_CFG("KH_INTAKE_ENDPOINT", KH_CFG_ENDPOINT, "tcp://*:7701", 0, 0, false,
           "ZeroMQ endpoint partners connect to"),
    KH_CFG("KH_HUB_CERT", KH_CFG_STRING, NULL, 0, 0, false,
           "hub certificate file (its _secret file beside it)"),
    KH_CFG("KH_HUB_CERT_NEXT", KH_CFG_STRING, "none", 0, 0, false,
           "the next hub certificate, served beside it (\"none\": none)"),
    KH_CFG("KH_INTAKE_ENDPOINT_NEXT", KH_CFG_ENDPOINT_OR_NONE, "none", 0, 0,
           false, "endpoint of KH_HUB_CERT_NEXT (\"none\": none)"),
    KH_CFG("KH_PARTNER_CERT_DIR", KH_CFG_STRING, NULL, 0, 0, false,
           "directory of partners' public certificates"),
    KH_CFG_DATABASE,
    KH_CFG("KH_SCHEMA_DIR", KH_CFG_STRING, KH_DEFAULT_SHARE_DIR "/schemas", 0,
           0, false, "directory holding referral.v1.json"),
    KH_CFG("KH_MAX_FRAME", KH_CFG_INT, "262144", 1024, 16777216, false,
           "largest accepted frame in bytes"),
    KH_CFG("KH_INTAKE_BATCH", KH_CFG_INT, "256", 1, 4096, false,
           "most requests committed in one transaction"),
    KH_CFG("KH_PARTNER_RATE", KH_CFG_INT, "0", 0, 1000000, false,
           "SUBMITs a second one partner may send (0: no limit)"),
    KH_CFG("KH_PARTNER_BURST", KH_CFG_INT, "0", 0, 10000000, false,
           "SUBMITs a partner may send at once above its rate (0: a second's)"),
    KH_CFG("KH_PARTNER_REFUSALS", KH_CFG_INT, "20", 0, 1000000, false,
           "refused requests a second one partner may cause (0: no limit)"),
    KH_CFG("KH_INTAKE_MAX_CONNECTIONS", KH_CFG_INT, "16", 1, 1024, false,
           "most open connections of one partner"),
    KH_CFG("KH_PARTNER_REFRESH_MS", KH_CFG_INT, "5000", 100, 3600000, false,
           "how often the partner registry is re-read besides when it "
           "changes"),
    KH_CFG("KH_DB_COMMIT_TIMEOUT_MS", KH_CFG_INT, "5000", 100, 600000, false,
           "a commit taking longer is given up (retryable refusal)"),
    KH_CFG("KH_ROUTING_ENDPOINT", KH_CFG_ENDPOINT_OR_NONE,
           "tcp://127.0.0.1:7702", 0, 0, false,
           "routing's wake-up endpoint (\"none\" to send none)"),
    KH_CFG("KH_HEALTH_ENDPOINT", KH_CFG_STRING, "127.0.0.1:9701", 0, 0, false,
           "HOST:PORT of /livez, /readyz, /metrics (\"none\": off)"),
    KH_CFG_WATCHDOG,
    KH_CFG("KH_LOG_LEVEL", KH_CFG_STRING, "info", 0, 0, false,
           "debug, info, warn or error"),
};
#define S_CONFIG_COUNT (sizeof s_config / sizeof s_config[0])

static const char *s_get(const char *name)
{
    return kh_config_get(s_config, S_CONFIG_COUNT, name)->str;
}

static int s_main(int argc, char **argv)
{
    int signal_fd = -1;
    int status = kh_service_start("intake", argc, argv, s_config,
                                  S_CONFIG_COUNT, &signal_fd);
    if (status >= 0)
        return status;
    kh_error_t err;

    intake_config_t config = {
        .endpoint = s_get("KH_INTAKE_ENDPOINT"),
        .hub_cert = s_get("KH_HUB_CERT"),
        .hub_cert_next = s_get("KH_HUB_CERT_NEXT"),
        .partner_certs = s_get("KH_PARTNER_CERT_DIR"),
        .conninfo = s_get("KH_DATABASE_URL"),
        .schema_dir = s_get("KH_SCHEMA_DIR"),
        .limits = kh_limits_default(),
        .batch_max =
            (size_t) kh_config_get(s_config, S_CONFIG_COUNT, "KH_INTAKE_BATCH")
                ->num,
        .partner_refresh_ms = (int) kh_config_get(s_config, S_CONFIG_COUNT,
                                                  "KH_PARTNER_REFRESH_MS")
                                  ->num,
    };
    config.endpoint_next = strcmp(s_get("KH_INTAKE_ENDPOINT_NEXT"), "none")
                               ? s_get("KH_INTAKE_ENDPOINT_NEXT")
                               : "";
    config.routing_endpoint = strcmp(s_get("KH_ROUTING_ENDPOINT"), "none")
                                  ? s_get("KH_ROUTING_ENDPOINT")
                                  : "";
    config.commit_timeout_ms =
        (int) kh_config_get(s_config, S_CONFIG_COUNT, "KH_DB_COMMIT_TIMEOUT_MS")
            ->num;
    config.limits.max_frame =
        (size_t) kh_config_get(s_config, S_CONFIG_COUNT, "KH_MAX_FRAME")->num;
    config.partner_rate =
        (int) kh_config_get(s_config, S_CONFIG_COUNT, "KH_PARTNER_RATE")->num;
    config.partner_burst =
        (int) kh_config_get(s_config, S_CONFIG_COUNT, "KH_PARTNER_BURST")->num;
    config.partner_refusals =
        (int) kh_config_get(s_config, S_CONFIG_COUNT, "KH_PARTNER_REFUSALS")
            ->num;
    config.max_connections = (size_t) kh_config_get(s_config, S_CONFIG_COUNT,
                                                    "KH_INTAKE_MAX_CONNECTIONS")
                                 ->num;

    /* First, so that a bad KH_HEALTH_ENDPOINT is named before anything
     * else; not ready until the sockets are bound. */
    kh_health_config_t hc = {
        .service = "intake",
        .endpoint = s_get("KH_HEALTH_ENDPOINT"),
        .bind_optional = !kh_config_is_set("KH_HEALTH_ENDPOINT"),
        .conninfo = config.conninfo,
        .watchdog_ms =
            (int) kh_config_get(s_config, S_CONFIG_COUNT, "KH_WATCHDOG_S")
                ->num *
            1000};
    kh_health_t *health = kh_health_new(&hc, &err);
    if (!health) {
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        return err.code == KH_E_CONFIG ? 2 : 1;
    }
    intake_t *intake = intake_new(&config, &err);
    if (!intake) {
        kh_health_destroy(&health);
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        return err.code == KH_E_CONFIG || err.code == KH_E_SCHEMA_INVALID ? 2
                                                                          : 1;
    }
    kh_health_set_sockets(health, true); /* intake_new bound them */
    int rc = intake_run(intake, signal_fd);
    kh_health_destroy(&health);
    intake_destroy(&intake);
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
