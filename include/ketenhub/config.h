/*
 * Deployment settings from environment variables, declared in one table
 * per program: name, type, default, bounds, whether it is a secret. The
 * table is validated as a whole at start; a bad value names the variable,
 * and the program exits 2 (STYLE.md).
 */
#ifndef KH_CONFIG_H_INCLUDED
#define KH_CONFIG_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* KH_CFG_ENDPOINT: a ZeroMQ endpoint; KH_CFG_ENDPOINT_OR_NONE: one, or
 * "none" for a wake-up socket the service may go without (intake and
 * routing then send no wake-ups, notification binds none and waits for
 * its timers). libzmq takes the port of
 * a tcp:// endpoint modulo 65536 and ignores what follows its digits, so
 * "tcp://HOST:99999" would bind port 34463 and report success: a tcp port
 * must be "*" or 1..65535, digits only. Other transports are left to
 * libzmq, which refuses what it cannot bind or connect. */
typedef enum {
    KH_CFG_STRING,
    KH_CFG_INT,
    KH_CFG_BOOL,
    KH_CFG_ENDPOINT,
    KH_CFG_ENDPOINT_OR_NONE
} kh_cfg_type_t;

typedef struct {
    const char *name;   /* environment variable, KH_* */
    kh_cfg_type_t type; /* how to read it */
    const char *defval; /* default as text; NULL means required */
    long min, max;      /* bounds for KH_CFG_INT */
    bool secret;        /* never logged */
    const char *help;   /* one line for --help and the README */
    /* Filled by kh_config_load: */
    const char *str; /* the text in force (points into environ or defval) */
    long num;        /* KH_CFG_INT value, KH_CFG_BOOL as 0/1 */
} kh_cfg_t;

/* A table row; the outputs start empty. */
#define KH_CFG(name, type, defval, min, max, secret, help)                     \
    {                                                                          \
        (name), (type), (defval), (min), (max), (secret), (help), NULL, 0      \
    }

/* The database settings of every service: the libpq connection string
 * (a secret: it may hold a password) and a file holding the password,
 * which kh_db_connect_app reads at each connection (kh_db_password). */
#define KH_CFG_DATABASE                                                        \
    KH_CFG("KH_DATABASE_URL", KH_CFG_STRING, "", 0, 0, true,                   \
           "libpq connection string (empty: PG* environment)"),                \
        KH_CFG("KH_DATABASE_PASSWORD_FILE", KH_CFG_STRING, "", 0, 0, false,    \
               "file holding the database password, e.g. a mounted secret")

/* Every service's watchdog (kh_health_config_t.watchdog_ms): longer than
 * any statement a loop may wait for (audit's statement_timeout is 300 s),
 * and at least twice the longest wait between two beats of a loop (5 s,
 * KH_DB_RETRY_MAX_MS, while a service waits for PostgreSQL). */
#define KH_CFG_WATCHDOG                                                        \
    KH_CFG("KH_WATCHDOG_S", KH_CFG_INT, "600", 10, 86400, false,               \
           "exit 1 (to be restarted) when the loop is silent this long")

/* Read every entry of table[0..count) from the environment. Returns 0, or
 * -1 with err (KH_E_CONFIG, path = the variable's name) for the first
 * missing required variable or malformed / out-of-bounds value. */
int kh_config_load(kh_cfg_t *table, size_t count, kh_error_t *err);

/* Whether the environment sets name, as kh_config_load reads it: unset
 * and empty both mean the default. */
bool kh_config_is_set(const char *name);

/* The entry called name; NULL if the table has none. */
const kh_cfg_t *kh_config_get(const kh_cfg_t *table, size_t count,
                              const char *name);

/* Log the settings in force at info level (secrets as "***"). */
void kh_config_log(const kh_cfg_t *table, size_t count);

/* Print "NAME  default  help" lines for --help. */
void kh_config_usage(const kh_cfg_t *table, size_t count);

#ifdef __cplusplus
}
#endif
#endif
