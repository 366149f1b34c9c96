/*
 * Health, readiness and metrics of a service, served over HTTP for
 * orchestrators and Prometheus (GET /livez, /readyz, /metrics).
 *
 * Two parts:
 * - A process-wide metrics registry. Counters are bumped where the thing
 *   happens, deep inside a service's core, without threading a pointer
 *   through every struct (as Prometheus clients' default registry does).
 *   It is guarded by one mutex: an update is a short lookup among a few
 *   dozen series, cheap next to the commit or send it counts, and a scrape
 *   holds the lock only while it copies the text out.
 * - kh_health_t: the HTTP endpoint (libmicrohttpd, on its own thread) plus
 *   a database probe thread. The probe keeps one connection, runs SELECT 1
 *   every second with a bounded wait, and refreshes database gauges
 *   (backlog, trail head) every few seconds. A scrape never touches the
 *   database, and the service's own loop stays single-threaded.
 *
 * Readiness: the socket check (and the rules check when required) are set
 * by the service; the database check by the probe. Liveness: the service's
 * loop beats (kh_health_beat, or a zloop timer from kh_health_attach); a
 * loop that has not beaten for 60 s makes /livez answer 503 (generous: a
 * first seal of a long trail or a large routing backlog takes a while),
 * and one silent for the watchdog's time (config.watchdog_ms) ends the
 * process, for orchestrators that do not act on /livez (a compose file's
 * restart policy acts only on an exit).
 */
#ifndef KH_HEALTH_H_INCLUDED
#define KH_HEALTH_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The project's version ("0.4.0"). */
const char *kh_version(void);

/* ---- metrics registry (process-wide, thread-safe) ---------------------- */

typedef enum {
    KH_METRIC_COUNTER,
    KH_METRIC_GAUGE,
    KH_METRIC_HISTOGRAM
} kh_metric_type_t;

/* Declare a family: name without the "ketenhub_" prefix (a counter's name
 * ends in _total, a histogram's in _seconds), its type, the name of its
 * one label or NULL, and a help line. Declaring again is a no-op. Returns
 * 0, or -1 when out of memory. Families show in /metrics in declaration
 * order; a family without series shows its HELP and TYPE only. */
int kh_metric_declare(const char *name, kh_metric_type_t type,
                      const char *label, const char *help);

/* Add n to a counter (label_value NULL for a family without a label).
 * Unknown families are ignored: counting never fails the caller. */
void kh_metric_add(const char *name, const char *label_value, uint64_t n);

/* Set a gauge. */
void kh_metric_set(const char *name, const char *label_value, double value);

/* Record one observation (seconds) in a histogram. */
void kh_metric_observe(const char *name, const char *label_value,
                       double seconds);

/* A series' value (a histogram's count); 0 when it does not exist. For
 * tests and the service's own logs. */
double kh_metric_value(const char *name, const char *label_value);

/* The registry in the Prometheus text format 0.0.4, with prefix
 * "ketenhub_", as a new string (caller frees); NULL when out of memory. */
char *kh_metrics_render(void);

/* Declare the families of service ("intake", "routing", "notification",
 * "audit"; kh_health_new does it). 0, or -1 when out of memory. */
int kh_metrics_declare_service(const char *service);

/* Every service's metrics as a Markdown table (for the README). */
void kh_metrics_table(FILE *out);

/* Forget every family and series (frees the registry's memory). */
void kh_metrics_reset(void);

/* ---- readiness and liveness -------------------------------------------- */

typedef struct _kh_health_t kh_health_t;

typedef struct {
    const char *service;  /* "intake", ...: in build_info and /readyz */
    const char *endpoint; /* "HOST:PORT" (HOST "*" = all); "none": no HTTP */
    const char *conninfo; /* database to probe; NULL: no database check */
    bool needs_rules;     /* readiness waits for kh_health_set_rules */
    /* The endpoint is the default, not the administrator's choice: when
     * it cannot be bound (a second process on the host), log a warning
     * and go on without HTTP instead of failing. */
    bool bind_optional;
    /* Optional: a query refreshed every few seconds on the probe's
     * connection, returning rows (family, label or NULL, value) that set
     * gauges. NULL: the service's own (backlog per partner for
     * notification, trail head for audit). Families must be declared. */
    const char *gauge_sql;
    /* The loop silent this long (ms) is hung: the process logs an alert
     * and exits 1, for its supervisor to restart it. 0: never. */
    int watchdog_ms;
} kh_health_config_t;

/* Start the HTTP endpoint and the database probe. Returns the object, or
 * NULL with err: KH_E_CONFIG (path "KH_HEALTH_ENDPOINT") when the endpoint
 * is malformed or cannot be bound (unless bind_optional), KH_E_NOMEM.
 * With endpoint "none" only the probe runs (the registry still counts). */
kh_health_t *kh_health_new(const kh_health_config_t *config, kh_error_t *err);

/* Stop the threads and free; accepts NULL; nulls the pointer. */
void kh_health_destroy(kh_health_t **self_p);

/* The port bound (useful with "127.0.0.1:0"); 0 without HTTP. */
int kh_health_port(const kh_health_t *self);

/* Readiness inputs from the service: its sockets are bound; its rules are
 * loaded (only asked for when config.needs_rules). Thread-safe. */
void kh_health_set_sockets(kh_health_t *self, bool bound);
void kh_health_set_rules(kh_health_t *self, bool loaded);

/* A fault of the service's own that keeps it from doing its work (audit:
 * the trail is broken), as /readyz's reason; NULL clears it. why must
 * outlive the service (a string literal). Thread-safe. */
void kh_health_set_fault(kh_health_t *self, const char *why);

/* Whether the last database probe succeeded. */
bool kh_health_db_up(const kh_health_t *self);

/* The service's loop is alive (call at least every few seconds). One
 * service per process, so this needs no kh_health_t: a service core beats
 * without knowing whether an endpoint runs. */
void kh_health_beat(void);

/* The service's own connection to the database is up (true), or not yet,
 * or lost (false): from a false until a true, /readyz answers 503 "not
 * ready: database not connected" even while the probe reaches the
 * database (the service is still connecting, or reconnecting). A service
 * that never tells is not held by it. One service per process, as for
 * the beat; thread-safe. */
void kh_health_connected(bool up);

/* The longest value kh_health_note keeps. */
#define KH_HEALTH_NOTE_MAX 128

/* A fact /readyz tells after the service's version, as " name=value":
 * routing's rules version (at start and at each reload), "ready routing
 * VERSION rules=RULES_VERSION"; intake's and notification's hub keys,
 * hub_key and, while it is served, hub_key_next (CURVE public keys, Z85).
 * A name noted again changes its value, in its place; NULL or "" leaves
 * the name out. name is a word of at most 15 characters, value has no
 * white space (at most KH_HEALTH_NOTE_MAX characters are kept); up to
 * four names, one service per process, as for the beat. Thread-safe. */
void kh_health_note(const char *name, const char *value);

/* Add a 1 s timer to loop that beats for it. 0, or -1. */
int kh_health_attach(zloop_t *loop);

/* ---- client side (ketenhubctl status, tests) ---------------------------- */

/* GET http://HOSTPORT/path with a timeout. Returns the HTTP status and the
 * body as a new string in *body (caller frees; may be NULL), or -1 with
 * err (KH_E_UNAVAILABLE: cannot connect or no answer in time). */
int kh_http_get(const char *hostport, const char *path, int timeout_ms,
                char **body, kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
