/*
 * Health, readiness and metrics over HTTP (see health.h): the metrics
 * registry, the libmicrohttpd endpoint, the database probe thread and a
 * small HTTP GET for the administrators' tool and the tests.
 */
#include "ketenhub/health.h"

#include "ketenhub/db.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libpq-fe.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "ketenhub/log.h"

#ifndef KH_VERSION
#define KH_VERSION "unknown"
#endif

#define S_STALL_MS 60000     /* /livez fails when the loop is this late */
#define S_PROBE_MS 1000      /* database probe interval */
#define S_PROBE_WAIT_MS 2000 /* longest wait for one probe's answer */
#define S_GAUGE_EVERY 5      /* gauges refreshed every this many probes */
#define S_HTTP_MAX (1024 * 1024)
#define S_HTTP_CONNECTIONS 32 /* open connections to the endpoint */
#define S_HTTP_PER_ADDRESS 8  /* of those, from one address */
/* What the library may hold while connections given way close. */
#define S_HTTP_ACCEPTED (2 * S_HTTP_CONNECTIONS)

const char *kh_version(void)
{
    return KH_VERSION;
}

/* ---- registry ------------------------------------------------------------ */

/* Upper bounds of the histogram buckets in seconds (+Inf implied). */
static const double s_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                  0.1,   0.25,   0.5,   1,    2.5,   5,
                                  10,    30,     60,    300,  1800};
#define S_NBOUNDS (sizeof s_bounds / sizeof s_bounds[0])

typedef struct s_series_t_ {
    struct s_series_t_ *next;
    char *label;                     /* label value, NULL without label */
    uint64_t count;                  /* counter; histogram observations */
    double value;                    /* gauge; histogram sum */
    uint64_t buckets[S_NBOUNDS + 1]; /* histogram, not cumulative */
} s_series_t;

typedef struct s_family_t_ {
    struct s_family_t_ *next;
    char *name, *label, *help;
    kh_metric_type_t type;
    s_series_t *series, **tail;
} s_family_t;

static pthread_mutex_t s_lock = PTHREAD_MUTEX_INITIALIZER;
static s_family_t *s_families;
static s_family_t **s_families_tail = &s_families;

static bool s_same(const char *a, const char *b)
{
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

/* The family called name; NULL if undeclared. Call with the lock held. */
static s_family_t *s_family(const char *name)
{
    for (s_family_t *f = s_families; f; f = f->next)
        if (strcmp(f->name, name) == 0)
            return f;
    return NULL;
}

/* The series of name with label_value, created on first use; NULL when
 * the family is undeclared or memory is short. Lock held. */
static s_series_t *s_series(const char *name, const char *label_value,
                            kh_metric_type_t type)
{
    s_family_t *f = s_family(name);
    if (!f || f->type != type)
        return NULL;
    if (!f->label)
        label_value = NULL;
    else if (!label_value)
        label_value = "";
    for (s_series_t *s = f->series; s; s = s->next)
        if (s_same(s->label, label_value))
            return s;
    s_series_t *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    if (label_value && !(s->label = strdup(label_value))) {
        free(s);
        return NULL;
    }
    *f->tail = s;
    f->tail = &s->next;
    return s;
}

int kh_metric_declare(const char *name, kh_metric_type_t type,
                      const char *label, const char *help)
{
    pthread_mutex_lock(&s_lock);
    int rc = 0;
    if (!s_family(name)) {
        s_family_t *f = calloc(1, sizeof *f);
        if (f) {
            f->name = strdup(name);
            f->label = label ? strdup(label) : NULL;
            f->help = strdup(help ? help : "");
        }
        if (!f || !f->name || !f->help || (label && !f->label)) {
            if (f) {
                free(f->name);
                free(f->label);
                free(f->help);
            }
            free(f);
            rc = -1;
        } else {
            f->type = type;
            f->tail = &f->series;
            *s_families_tail = f;
            s_families_tail = &f->next;
            /* An unlabelled counter or histogram is 0 from the start, so
             * that increase() sees its first step after a restart (an
             * alert on the first dead letter). A gauge has no value until
             * it is set: 0 would be a claim. */
            if (!label && type != KH_METRIC_GAUGE &&
                !s_series(name, NULL, type))
                rc = -1;
        }
    }
    pthread_mutex_unlock(&s_lock);
    return rc;
}

void kh_metric_add(const char *name, const char *label_value, uint64_t n)
{
    pthread_mutex_lock(&s_lock);
    s_series_t *s = s_series(name, label_value, KH_METRIC_COUNTER);
    if (s)
        s->count += n;
    pthread_mutex_unlock(&s_lock);
}

void kh_metric_set(const char *name, const char *label_value, double value)
{
    pthread_mutex_lock(&s_lock);
    s_series_t *s = s_series(name, label_value, KH_METRIC_GAUGE);
    if (s)
        s->value = value;
    pthread_mutex_unlock(&s_lock);
}

void kh_metric_observe(const char *name, const char *label_value,
                       double seconds)
{
    pthread_mutex_lock(&s_lock);
    s_series_t *s = s_series(name, label_value, KH_METRIC_HISTOGRAM);
    if (s) {
        size_t i = 0;
        while (i < S_NBOUNDS && seconds > s_bounds[i])
            i++;
        s->buckets[i]++;
        s->count++;
        s->value += seconds;
    }
    pthread_mutex_unlock(&s_lock);
}

double kh_metric_value(const char *name, const char *label_value)
{
    double value = 0;
    pthread_mutex_lock(&s_lock);
    s_family_t *f = s_family(name);
    if (f) {
        const char *want = !f->label ? NULL : label_value ? label_value : "";
        for (s_series_t *s = f->series; s; s = s->next)
            if (s_same(s->label, want))
                value =
                    f->type == KH_METRIC_GAUGE ? s->value : (double) s->count;
    }
    pthread_mutex_unlock(&s_lock);
    return value;
}

/* A label value with \, " and newline escaped as the text format wants. */
static void s_put_label(FILE *out, const char *value)
{
    for (const char *p = value; *p; p++) {
        if (*p == '\\' || *p == '"')
            fputc('\\', out);
        if (*p == '\n')
            fputs("\\n", out);
        else
            fputc(*p, out);
    }
}

/* "{label="value"" without the closing brace, or nothing. */
static void s_put_labels(FILE *out, const s_family_t *f, const s_series_t *s,
                         bool more)
{
    if (!f->label) {
        if (more)
            fputc('{', out);
        return;
    }
    fprintf(out, "{%s=\"", f->label);
    s_put_label(out, s->label);
    fputc('"', out);
    if (more)
        fputc(',', out);
}

static void s_render_family(FILE *out, const s_family_t *f)
{
    static const char *types[] = {"counter", "gauge", "histogram"};
    fprintf(out, "# HELP ketenhub_%s %s\n# TYPE ketenhub_%s %s\n", f->name,
            f->help, f->name, types[f->type]);
    for (const s_series_t *s = f->series; s; s = s->next) {
        if (f->type == KH_METRIC_COUNTER || f->type == KH_METRIC_GAUGE) {
            fprintf(out, "ketenhub_%s", f->name);
            if (f->label) {
                s_put_labels(out, f, s, false);
                fputc('}', out);
            }
            if (f->type == KH_METRIC_COUNTER)
                fprintf(out, " %" PRIu64 "\n", s->count);
            else
                fprintf(out, " %.15g\n", s->value);
            continue;
        }
        uint64_t cumulative = 0;
        for (size_t i = 0; i <= S_NBOUNDS; i++) {
            cumulative += s->buckets[i];
            fprintf(out, "ketenhub_%s_bucket", f->name);
            s_put_labels(out, f, s, true);
            if (i < S_NBOUNDS)
                fprintf(out, "le=\"%g\"} %" PRIu64 "\n", s_bounds[i],
                        cumulative);
            else
                fprintf(out, "le=\"+Inf\"} %" PRIu64 "\n", cumulative);
        }
        fprintf(out, "ketenhub_%s_sum", f->name);
        if (f->label) {
            s_put_labels(out, f, s, false);
            fputc('}', out);
        }
        fprintf(out, " %.9g\nketenhub_%s_count", s->value, f->name);
        if (f->label) {
            s_put_labels(out, f, s, false);
            fputc('}', out);
        }
        fprintf(out, " %" PRIu64 "\n", s->count);
    }
}

char *kh_metrics_render(void)
{
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (!out)
        return NULL;
    pthread_mutex_lock(&s_lock);
    for (const s_family_t *f = s_families; f; f = f->next)
        s_render_family(out, f);
    pthread_mutex_unlock(&s_lock);
    if (fclose(out) != 0) {
        free(text);
        return NULL;
    }
    return text;
}

void kh_metrics_reset(void)
{
    pthread_mutex_lock(&s_lock);
    while (s_families) {
        s_family_t *f = s_families;
        s_families = f->next;
        while (f->series) {
            s_series_t *s = f->series;
            f->series = s->next;
            free(s->label);
            free(s);
        }
        free(f->name);
        free(f->label);
        free(f->help);
        free(f);
    }
    s_families_tail = &s_families;
    pthread_mutex_unlock(&s_lock);
}

/* ---- each service's metrics (the README's table follows this one) -------- */

typedef struct {
    const char *service, *name;
    kh_metric_type_t type;
    const char *label, *help;
} s_def_t;

#define S_C KH_METRIC_COUNTER
#define S_G KH_METRIC_GAUGE
#define S_H KH_METRIC_HISTOGRAM
static const s_def_t s_defs[] = {
    {"intake", "referrals_received_total", S_C, NULL,
     "SUBMIT requests answered, whatever the answer."},
    {"intake", "referrals_accepted_total", S_C, NULL,
     "Referrals committed and answered ACCEPTED (duplicates not counted)."},
    {"intake", "referrals_duplicate_total", S_C, NULL,
     "Resubmitted idempotency keys answered with the first answer."},
    {"intake", "requests_refused_total", S_C, "code",
     "Requests answered REJECTED, by error code."},
    {"intake", "intake_commit_seconds", S_H, NULL,
     "From sending a batch to PostgreSQL to its commit (ACCEPTED follows)."},
    {"routing", "referrals_routed_total", S_C, NULL,
     "Referrals routed (deliveries and audit event committed)."},
    {"routing", "deliveries_created_total", S_C, NULL,
     "Deliveries created by routing."},
    {"routing", "referrals_held_total", S_C, NULL,
     "Referrals held back (KH_ROUTING_HOLD_MS) because their writes failed "
     "alone "
     "(`kind=referral_failing`)."},
    {"routing", "rules_reloads_total", S_C, "outcome",
     "Rules reloads on SIGHUP, ok or failed (the old rules stay)."},
    {"routing", "rules_partners_missing", S_G, NULL,
     "Partners the rules need (targets not optional, or the last a "
     "fallback has) that are revoked or not registered: their deliveries "
     "become dead letters."},
    {"routing", "routing_pass_seconds", S_H, NULL,
     "One routing pass (claim, evaluate, commit) that routed something."},
    {"notification", "deliveries_sent_total", S_C, NULL,
     "Deliveries sent for the first time."},
    {"notification", "deliveries_retried_total", S_C, NULL,
     "Deliveries sent again (no ACK in time, NACK, reconnection)."},
    {"notification", "deliveries_acked_total", S_C, NULL,
     "Deliveries acknowledged by their partner."},
    {"notification", "deliveries_nacked_total", S_C, NULL, "NACKs received."},
    {"notification", "delivery_requests_refused_total", S_C, "code",
     "Frames on the delivery socket answered REJECTED, by error code."},
    {"notification", "deliveries_dead_total", S_C, NULL,
     "Deliveries that became dead letters."},
    {"notification", "deliveries_escalated_total", S_C, NULL,
     "Urgent deliveries escalated."},
    {"notification", "delivery_claims_total", S_C, NULL,
     "Claim statements for pending deliveries (one serves many partners)."},
    {"notification", "delivery_ack_seconds", S_H, NULL,
     "From a delivery's last send to its partner's ACK, as committed."},
    {"notification", "deliveries_backlog", S_G, "partner",
     "Deliveries not yet acknowledged (pending or sent), per partner."},
    {"notification", "deliveries_oldest_unacked_seconds", S_G, "partner",
     "Age of the oldest unacknowledged delivery, per partner (0: none)."},
    {"notification", "dead_letters", S_G, NULL,
     "Dead letters in the database (until retried)."},
    {"notification", "escalations_open", S_G, NULL,
     "Escalated deliveries not yet acknowledged."},
    {"audit", "trail_head_sequence", S_G, NULL, "Highest seq in audit_events."},
    {"audit", "trail_sealed_sequence", S_G, NULL, "Highest sealed seq."},
    {"audit", "trail_checkpoint_sequence", S_G, NULL,
     "seq of the last signed checkpoint."},
    {"audit", "trail_checkpoint_age_seconds", S_G, NULL,
     "Age of the last signed checkpoint (with none yet, of the first "
     "event: how long the trail has gone unsigned)."},
    {"audit", "trail_events_sealed_total", S_C, NULL,
     "Events sealed by this process."},
    {"audit", "trail_checkpoints_total", S_C, NULL,
     "Checkpoints signed by this process."},
};
#undef S_C
#undef S_G
#undef S_H

/* Gauges read from PostgreSQL by the probe, per service: rows of
 * (family, label, value). Partners without backlog show 0, so a gauge
 * never keeps a stale value. Open deliveries are named as their index
 * names them (acked_at and dead_reason NULL, migrations/006). */
static const char *s_gauge_sql(const char *service)
{
    if (strcmp(service, "notification") == 0)
        return "SELECT 'deliveries_backlog', p.id, count(d.id)"
               " FROM partners p LEFT JOIN deliveries d ON d.partner_id = p.id"
               "  AND d.acked_at IS NULL AND d.dead_reason IS NULL"
               " GROUP BY p.id"
               " UNION ALL SELECT 'deliveries_oldest_unacked_seconds', p.id,"
               "  coalesce(extract(epoch FROM now() - min(d.created_at)), 0)"
               " FROM partners p LEFT JOIN deliveries d ON d.partner_id = p.id"
               "  AND d.acked_at IS NULL AND d.dead_reason IS NULL"
               " GROUP BY p.id"
               " UNION ALL SELECT 'dead_letters', NULL, count(*)"
               " FROM deliveries WHERE state = 'dead'"
               " UNION ALL SELECT 'escalations_open', NULL, count(*)"
               " FROM deliveries WHERE escalated_at IS NOT NULL"
               "  AND acked_at IS NULL AND dead_reason IS NULL";
    if (strcmp(service, "audit") == 0)
        return "SELECT 'trail_head_sequence', NULL,"
               " coalesce((SELECT max(seq) FROM audit_events), 0)"
               " UNION ALL SELECT 'trail_sealed_sequence', NULL,"
               " coalesce((SELECT max(seq) FROM audit_seals), 0)"
               " UNION ALL SELECT 'trail_checkpoint_sequence', NULL,"
               " coalesce((SELECT max(seq) FROM audit_checkpoints), 0)"
               " UNION ALL SELECT 'trail_checkpoint_age_seconds', NULL,"
               " coalesce(extract(epoch FROM now() - coalesce("
               " (SELECT at FROM audit_checkpoints ORDER BY seq DESC LIMIT 1),"
               " (SELECT at FROM audit_events ORDER BY seq LIMIT 1))), 0)";
    return NULL;
}

int kh_metrics_declare_service(const char *service)
{
    for (size_t i = 0; i < sizeof s_defs / sizeof s_defs[0]; i++)
        if (strcmp(s_defs[i].service, service) == 0 &&
            kh_metric_declare(s_defs[i].name, s_defs[i].type, s_defs[i].label,
                              s_defs[i].help))
            return -1;
    return 0;
}

void kh_metrics_table(FILE *out)
{
    static const char *types[] = {"counter", "gauge", "histogram"};
    fprintf(out, "| service | metric | type | label | meaning |\n"
                 "|---|---|---|---|---|\n"
                 "| all | `ketenhub_build_info` | gauge | service, version | "
                 "Always 1; names the service and its version. |\n"
                 "| all | `ketenhub_ready` | gauge |  | 1 when /readyz answers "
                 "200. |\n"
                 "| all | `ketenhub_database_up` | gauge |  | 1 when the last "
                 "database probe (every second) succeeded. |\n");
    for (size_t i = 0; i < sizeof s_defs / sizeof s_defs[0]; i++)
        fprintf(out, "| %s | `ketenhub_%s` | %s | %s | %s |\n",
                s_defs[i].service, s_defs[i].name, types[s_defs[i].type],
                s_defs[i].label ? s_defs[i].label : "", s_defs[i].help);
}

/* ---- the endpoint -------------------------------------------------------- */

typedef struct {
    struct MHD_Connection *conn; /* NULL: free */
    MHD_socket fd;
    unsigned long long accepted; /* its place in the order of accepts */
} s_http_conn_t;

struct _kh_health_t {
    char service[32];
    char *conninfo;  /* NULL: no database check */
    char *gauge_sql; /* NULL: no gauges from the database */
    bool needs_rules;
    struct MHD_Daemon *daemon;
    int port;
    /* The endpoint's open connections (its one thread's alone): the
     * oldest gives way to a new one when all are taken. */
    s_http_conn_t http[S_HTTP_CONNECTIONS];
    unsigned long long accepts; /* connections accepted so far */
    atomic_bool sockets, rules, db;
    bool gauges_failed; /* the last gauge query failed (probe thread) */
    _Atomic(const char *) fault; /* kh_health_set_fault; NULL: none */
    /* /metrics was asked for since the probe last read the gauges: they
     * are read only for someone who looks (a backlog count over a large
     * queue costs the database real work). */
    atomic_bool scraped;
    pthread_t probe;
    bool probing; /* the probe thread runs */
    pthread_t watchdog;
    bool watching;   /* the watchdog thread runs */
    int watchdog_ms; /* 0: no watchdog */
    pthread_mutex_t mutex;
    pthread_cond_t wake; /* the probe's and the watchdog's: stop */
    bool stop;
};

/* Monotonic ms of the loop's last beat: one service per process. */
static atomic_llong s_beat_ms;

/* kh_health_connected(false) told last: the service's own connection to
 * the database is not up. */
static atomic_bool s_unconnected;

/* What the service tells on /readyz after its version (kh_health_note),
 * read by the endpoint's thread: names in the order first noted. */
#define S_NOTES 4
static pthread_mutex_t s_notes_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct {
    char name[16];
    char value[KH_HEALTH_NOTE_MAX + 1];
} s_notes[S_NOTES];

static long long s_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until conn has a whole result ready; false on timeout or a broken
 * connection. */
static bool s_wait(PGconn *conn, long long deadline)
{
    while (PQisBusy(conn)) {
        long long left = deadline - s_now_ms();
        if (left <= 0)
            return false;
        struct pollfd pfd = {PQsocket(conn), POLLIN, 0};
        if (pfd.fd < 0 || poll(&pfd, 1, (int) left) < 0)
            return false;
        if (!PQconsumeInput(conn))
            return false;
    }
    return true;
}

/* Run sql on conn, waiting at most S_PROBE_WAIT_MS. The result when it
 * succeeded with rows (caller clears), else NULL. A query not answered in
 * time is cancelled (the server would go on with it, and the connection
 * could take no other): when even that is not answered, the connection is
 * left busy, and the caller closes it. */
static PGresult *s_query(PGconn *conn, const char *sql)
{
    long long deadline = s_now_ms() + S_PROBE_WAIT_MS;
    if (!PQsendQuery(conn, sql))
        return NULL;
    bool answered = s_wait(conn, deadline);
    if (!answered && PQstatus(conn) == CONNECTION_OK) {
        PGcancel *cancel = PQgetCancel(conn);
        char why[256];
        if (cancel && PQcancel(cancel, why, sizeof why))
            s_wait(conn, s_now_ms() + S_PROBE_WAIT_MS);
        PQfreeCancel(cancel);
    }
    PGresult *res = NULL;
    while (!PQisBusy(conn)) {
        PGresult *next = PQgetResult(conn);
        if (!next)
            break;
        if (res)
            PQclear(next);
        else
            res = next;
        if (!s_wait(conn, deadline + S_PROBE_WAIT_MS))
            break;
    }
    if (!answered || !res || PQresultStatus(res) != PGRES_TUPLES_OK) {
        PQclear(res);
        return NULL;
    }
    return res;
}

/* libpq prints a server's notices on stderr, raw: a probe connection
 * idle when PostgreSQL stops at once got "WARNING:  terminating connection
 * due to immediate shutdown command" into a log of logfmt lines. As the
 * services' own connections (kh_db_connect), the probe drops them; what
 * the probe finds is told by event=health_db. */
static void s_drop_notice(void *arg, const PGresult *res)
{
    (void) arg;
    (void) res;
}

/* One probe: (re)connect when needed, SELECT 1, and the gauges when asked.
 * Returns whether the database answered. */
static bool s_probe_once(kh_health_t *self, PGconn **conn_p, bool gauges)
{
    if (!*conn_p) {
        char password[256];
        kh_error_t err;
        if (kh_db_password(password, sizeof password, &err) < 0)
            return false;
        const char *keys[] = {"gssencmode",      "password",         "dbname",
                              "connect_timeout", "application_name", NULL};
        const char *values[] = {kh_db_gssencmode(self->conninfo),
                                password,
                                self->conninfo,
                                "2",
                                "ketenhub-health",
                                NULL};
        *conn_p = PQconnectdbParams(keys, values, 1);
        explicit_bzero(password, sizeof password);
        if (!*conn_p)
            return false;
        if (PQstatus(*conn_p) != CONNECTION_OK) {
            PQfinish(*conn_p);
            *conn_p = NULL;
            return false;
        }
        PQsetNoticeReceiver(*conn_p, s_drop_notice, NULL);
        /* The server ends a query of the probe's before the probe gives
         * up on it (s_query), so that none runs on unwatched; set here,
         * not in the connection's options, which KH_DATABASE_URL may
         * give. */
        char sql[64];
        snprintf(sql, sizeof sql, "SET statement_timeout = %d",
                 S_PROBE_WAIT_MS * 3 / 4);
        PGresult *set = s_query(*conn_p, sql);
        PQclear(set);
    }
    PGresult *res = s_query(*conn_p, "SELECT 1");
    if (!res) {
        PQfinish(*conn_p);
        *conn_p = NULL;
        return false;
    }
    PQclear(res);
    if (gauges && self->gauge_sql) {
        res = s_query(*conn_p, self->gauge_sql);
        for (int i = 0; res && PQnfields(res) >= 3 && i < PQntuples(res); i++)
            kh_metric_set(PQgetvalue(res, i, 0),
                          PQgetisnull(res, i, 1) ? NULL : PQgetvalue(res, i, 1),
                          strtod(PQgetvalue(res, i, 2), NULL));
        /* The database answered SELECT 1: a gauge query that failed or
         * took too long says nothing of it. Its gauges keep their values;
         * the log says so once, until one is read again. */
        if (!res && !self->gauges_failed)
            kh_log_warn("health_gauges",
                        "state=failed limit_ms=%d msg=\"%s; the gauges keep "
                        "their last values\"",
                        S_PROBE_WAIT_MS * 3 / 4,
                        PQstatus(*conn_p) == CONNECTION_OK && !PQisBusy(*conn_p)
                            ? "the query failed or ran past its limit"
                            : "the connection was lost");
        else if (res && self->gauges_failed)
            kh_log_info("health_gauges", "state=read");
        self->gauges_failed = !res;
        PQclear(res);
        if (PQstatus(*conn_p) != CONNECTION_OK || PQisBusy(*conn_p)) {
            PQfinish(*conn_p); /* a new one at the next probe */
            *conn_p = NULL;
        }
    }
    return true;
}

/* Wait ms, or until stopped; with the mutex held. Returns whether to go
 * on. */
static bool s_nap(kh_health_t *self, int ms)
{
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until); /* the wake's clock */
    until.tv_sec += ms / 1000;
    until.tv_nsec += (long) (ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (!self->stop &&
           pthread_cond_timedwait(&self->wake, &self->mutex, &until) == 0)
        ;
    return !self->stop;
}

static void *s_probe_main(void *arg)
{
    kh_health_t *self = arg;
    PGconn *conn = NULL;
    unsigned round = 0;
    pthread_mutex_lock(&self->mutex);
    while (!self->stop) {
        pthread_mutex_unlock(&self->mutex);
        bool gauges = round++ % S_GAUGE_EVERY == 0 &&
                      atomic_exchange(&self->scraped, false);
        bool up = s_probe_once(self, &conn, gauges);
        if (up != atomic_exchange(&self->db, up)) {
            if (up)
                kh_log_info("health_db", "state=up");
            else
                kh_log_warn("health_db", "state=down");
        }
        pthread_mutex_lock(&self->mutex);
        s_nap(self, S_PROBE_MS);
    }
    pthread_mutex_unlock(&self->mutex);
    PQfinish(conn);
    return NULL;
}

/* The watchdog: a loop silent for watchdog_ms is taken to be hung, and
 * the process exits 1 so that its supervisor (a container's restart
 * policy, systemd) starts it again, which costs nothing that is committed
 * (promise 3: a service may die at any moment). A thread of its own: the
 * probe can wait on a host name's lookup for longer than a beat. When the
 * watchdog itself slept far past its period, the whole process was
 * stopped (SIGSTOP, a paused container): the loop gets a period to beat
 * before it is judged. */
static void *s_watchdog_main(void *arg)
{
    kh_health_t *self = arg;
    int period = self->watchdog_ms < 4000 ? self->watchdog_ms / 4 : 1000;
    long long checked = s_now_ms();
    pthread_mutex_lock(&self->mutex);
    while (s_nap(self, period)) {
        long long now = s_now_ms();
        bool stopped = now - checked > 2LL * period + 1000;
        checked = now;
        long long silent = now - atomic_load(&s_beat_ms);
        if (stopped || silent < self->watchdog_ms)
            continue;
        kh_log_error("alert",
                     "kind=hung silent_ms=%lld watchdog_ms=%d "
                     "msg=\"the service's loop has not run for too long; "
                     "exiting so that it is restarted\"",
                     silent, self->watchdog_ms);
        _exit(1);
    }
    pthread_mutex_unlock(&self->mutex);
    return NULL;
}

/* Why the service is not ready ("" when it is). */
static const char *s_not_ready(const kh_health_t *self)
{
    if (!atomic_load(&self->sockets))
        return "sockets not bound";
    if (self->needs_rules && !atomic_load(&self->rules))
        return "rules not loaded";
    if (self->conninfo && !atomic_load(&self->db))
        return "database unreachable";
    if (atomic_load(&s_unconnected))
        return "database not connected";
    const char *fault = atomic_load(&self->fault);
    return fault ? fault : "";
}

static enum MHD_Result s_respond(struct MHD_Connection *connection,
                                 unsigned int status, char *text,
                                 const char *type)
{
    if (!text)
        return MHD_NO;
    struct MHD_Response *response = MHD_create_response_from_buffer(
        strlen(text), text, MHD_RESPMEM_MUST_FREE);
    if (!response) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(response, "Content-Type", type);
    MHD_add_response_header(response, "Cache-Control", "no-store");
    enum MHD_Result rc = MHD_queue_response(connection, status, response);
    MHD_destroy_response(response);
    return rc;
}

static char *s_printf(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));
static char *s_printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    if (vasprintf(&text, fmt, ap) < 0)
        text = NULL;
    va_end(ap);
    return text;
}

/* The metrics text: build_info, readiness as gauges, then the registry. */
static char *s_metrics(const kh_health_t *self)
{
    char *registry = kh_metrics_render();
    if (!registry)
        return NULL;
    char *text = s_printf(
        "# HELP ketenhub_build_info The running service and its version.\n"
        "# TYPE ketenhub_build_info gauge\n"
        "ketenhub_build_info{service=\"%s\",version=\"%s\"} 1\n"
        "# HELP ketenhub_ready 1 when the service is ready (see /readyz).\n"
        "# TYPE ketenhub_ready gauge\nketenhub_ready %d\n"
        "# HELP ketenhub_database_up 1 when the last database probe "
        "succeeded.\n"
        "# TYPE ketenhub_database_up gauge\nketenhub_database_up %d\n%s",
        self->service, KH_VERSION, *s_not_ready(self) ? 0 : 1,
        atomic_load(&self->db) ? 1 : 0, registry);
    free(registry);
    return text;
}

/* Keeps the endpoint's connections to S_HTTP_CONNECTIONS: a new one past
 * them takes the place of the oldest, which is shut down (the library then
 * closes it). Peers that hold connections open, sending a request a byte
 * at a time, so keep none of them long once others come: a probe's
 * connection ends the oldest. The library calls this on its one thread,
 * and tells of a connection's close before it closes the socket, so the
 * descriptor shut down is still that connection's. */
static void s_http_notify(void *cls, struct MHD_Connection *connection,
                          void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    kh_health_t *self = cls;
    s_http_conn_t *slot = *socket_context;
    if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        if (slot && slot->conn == connection)
            slot->conn = NULL;
        return;
    }
    slot = &self->http[0];
    for (size_t i = 0; i < S_HTTP_CONNECTIONS && slot->conn; i++) {
        s_http_conn_t *next = &self->http[i];
        if (!next->conn || next->accepted < slot->accepted)
            slot = next;
    }
    if (slot->conn)
        shutdown(slot->fd, SHUT_RDWR);
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);
    slot->conn = connection;
    slot->fd = info ? info->connect_fd : MHD_INVALID_SOCKET;
    slot->accepted = ++self->accepts;
    *socket_context = slot;
}

static enum MHD_Result s_handler(void *cls, struct MHD_Connection *connection,
                                 const char *url, const char *method,
                                 const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls)
{
    (void) version;
    (void) upload_data;
    (void) upload_data_size;
    (void) con_cls;
    kh_health_t *self = cls;
    const char *plain = "text/plain; charset=utf-8";
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return s_respond(connection, MHD_HTTP_METHOD_NOT_ALLOWED,
                         strdup("only GET\n"), plain);
    if (strcmp(url, "/livez") == 0) {
        long long late = s_now_ms() - atomic_load(&s_beat_ms);
        if (late > S_STALL_MS)
            return s_respond(
                connection, MHD_HTTP_SERVICE_UNAVAILABLE,
                s_printf("stalled: loop silent for %lld ms\n", late), plain);
        return s_respond(connection, MHD_HTTP_OK, strdup("alive\n"), plain);
    }
    if (strcmp(url, "/readyz") == 0) {
        const char *why = s_not_ready(self);
        if (*why)
            return s_respond(connection, MHD_HTTP_SERVICE_UNAVAILABLE,
                             s_printf("not ready: %s\n", why), plain);
        char notes[S_NOTES * sizeof *s_notes + 1] = "";
        size_t len = 0;
        pthread_mutex_lock(&s_notes_mutex);
        for (size_t i = 0; i < S_NOTES && *s_notes[i].name; i++)
            if (*s_notes[i].value)
                len +=
                    (size_t) snprintf(notes + len, sizeof notes - len, " %s=%s",
                                      s_notes[i].name, s_notes[i].value);
        pthread_mutex_unlock(&s_notes_mutex);
        return s_respond(
            connection, MHD_HTTP_OK,
            s_printf("ready %s %s%s\n", self->service, KH_VERSION, notes),
            plain);
    }
    if (strcmp(url, "/metrics") == 0) {
        atomic_store(&self->scraped, true);
        return s_respond(connection, MHD_HTTP_OK, s_metrics(self),
                         "text/plain; version=0.0.4; charset=utf-8");
    }
    return s_respond(connection, MHD_HTTP_NOT_FOUND,
                     strdup("not found: /livez, /readyz, /metrics\n"), plain);
}

/* Split "HOST:PORT" ("[V6]:PORT", HOST "*" for all addresses) into an
 * address; 0 or -1. */
static int s_parse_endpoint(const char *endpoint, struct sockaddr_storage *addr,
                            socklen_t *len, bool *v6)
{
    const char *colon = strrchr(endpoint, ':');
    if (!colon || colon == endpoint || !colon[1])
        return -1;
    char host[256];
    size_t hlen = (size_t) (colon - endpoint);
    if (hlen >= sizeof host)
        return -1;
    memcpy(host, endpoint, hlen);
    host[hlen] = '\0';
    if (host[0] == '[' && hlen > 2 && host[hlen - 1] == ']') {
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = '\0';
    }
    size_t digits = strspn(colon + 1, "0123456789");
    if (digits == 0 || digits > 5 || colon[1 + digits] != '\0')
        return -1; /* digits only: no sign, no space */
    long port = strtol(colon + 1, NULL, 10);
    if (port < 0 || port > 65535)
        return -1;
    struct addrinfo hints = {0}, *found = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char service[8];
    snprintf(service, sizeof service, "%ld", port);
    bool any = strcmp(host, "*") == 0;
    if (any)
        hints.ai_family = AF_INET;
    if (getaddrinfo(any ? NULL : host, service, &hints, &found) != 0 || !found)
        return -1;
    memcpy(addr, found->ai_addr, found->ai_addrlen);
    *len = found->ai_addrlen;
    *v6 = found->ai_family == AF_INET6;
    freeaddrinfo(found);
    return 0;
}

kh_health_t *kh_health_new(const kh_health_config_t *config, kh_error_t *err)
{
    kh_health_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    snprintf(self->service, sizeof self->service, "%s",
             config->service ? config->service : "ketenhub");
    self->needs_rules = config->needs_rules;
    atomic_init(&self->sockets, false);
    atomic_init(&self->rules, false);
    atomic_init(&self->db, false);
    atomic_init(&self->fault, NULL);
    atomic_init(&self->scraped, false);
    kh_health_beat(); /* alive while the service starts */
    pthread_mutex_init(&self->mutex, NULL);
    /* Naps on the monotonic clock: the wall clock set back (NTP, a
     * restored machine) would have the probe and the watchdog sleep that
     * much longer. */
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&self->wake, &attr);
    pthread_condattr_destroy(&attr);
    const char *gauge_sql =
        config->gauge_sql ? config->gauge_sql : s_gauge_sql(self->service);
    if ((config->conninfo && !(self->conninfo = strdup(config->conninfo))) ||
        (gauge_sql && !(self->gauge_sql = strdup(gauge_sql))) ||
        kh_metrics_declare_service(self->service)) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        goto fail;
    }
    const char *endpoint = config->endpoint ? config->endpoint : "none";
    if (strcmp(endpoint, "none") != 0) {
        struct sockaddr_storage addr;
        socklen_t len = 0;
        bool v6 = false;
        if (s_parse_endpoint(endpoint, &addr, &len, &v6)) {
            kh_error_set(err, KH_E_CONFIG, "KH_HEALTH_ENDPOINT",
                         "KH_HEALTH_ENDPOINT must be HOST:PORT or none");
            goto fail;
        }
        unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL |
                             (v6 ? MHD_USE_IPv6 : 0);
        /* The timeout is one of silence: a client that sends its request
         * a byte every few seconds keeps its connection. One address may
         * hold only a few of them, and when all are taken the oldest
         * gives way (s_http_notify), so that peers reaching the port
         * cannot leave the probes and the scraper without an answer
         * (while 32 such connections stopped /livez for as long as they
         * lasted). */
        self->daemon = MHD_start_daemon(
            flags, 0, NULL, NULL, s_handler, self, MHD_OPTION_SOCK_ADDR,
            (const struct sockaddr *) &addr, MHD_OPTION_CONNECTION_LIMIT,
            (unsigned int) S_HTTP_ACCEPTED, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
            (unsigned int) S_HTTP_PER_ADDRESS, MHD_OPTION_CONNECTION_TIMEOUT,
            (unsigned int) 10, MHD_OPTION_NOTIFY_CONNECTION, s_http_notify,
            self, MHD_OPTION_END);
        if (!self->daemon && !config->bind_optional) {
            kh_error_set(err, KH_E_CONFIG, "KH_HEALTH_ENDPOINT",
                         "cannot bind KH_HEALTH_ENDPOINT %s", endpoint);
            goto fail;
        }
        if (!self->daemon)
            kh_log_warn("health_unbound",
                        "endpoint=%s reason=\"cannot bind the default "
                        "KH_HEALTH_ENDPOINT; set it to serve health\"",
                        endpoint);
        const union MHD_DaemonInfo *info =
            self->daemon
                ? MHD_get_daemon_info(self->daemon, MHD_DAEMON_INFO_BIND_PORT)
                : NULL;
        self->port = info ? (int) info->port : 0;
    }
    if (self->conninfo) {
        if (pthread_create(&self->probe, NULL, s_probe_main, self) != 0) {
            kh_error_set(err, KH_E_INTERNAL, "", "cannot start the probe");
            goto fail;
        }
        self->probing = true;
    }
    self->watchdog_ms = config->watchdog_ms;
    if (self->watchdog_ms > 0) {
        if (pthread_create(&self->watchdog, NULL, s_watchdog_main, self) != 0) {
            kh_error_set(err, KH_E_INTERNAL, "", "cannot start the watchdog");
            goto fail;
        }
        self->watching = true;
    }
    return self;
fail:
    kh_health_destroy(&self);
    return NULL;
}

void kh_health_destroy(kh_health_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_health_t *self = *self_p;
    if (self->daemon)
        MHD_stop_daemon(self->daemon);
    pthread_mutex_lock(&self->mutex);
    self->stop = true;
    pthread_cond_broadcast(&self->wake);
    pthread_mutex_unlock(&self->mutex);
    if (self->watching)
        pthread_join(self->watchdog, NULL);
    if (self->probing) {
        /* A probe can hang in the host name's lookup, which no libpq
         * timeout bounds (with the database's container gone, a lookup
         * waits for the resolver's timeouts, 10 s and more): the service
         * stops without it rather than be killed, and leaves it what it
         * uses. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += S_PROBE_WAIT_MS / 1000;
        if (pthread_timedjoin_np(self->probe, NULL, &until) != 0) {
            kh_log_warn("health_probe_left", "msg=\"the database probe did "
                                             "not end in time\"");
            pthread_detach(self->probe);
            kh_db_thread_left();
            *self_p = NULL;
            return;
        }
    }
    pthread_cond_destroy(&self->wake);
    pthread_mutex_destroy(&self->mutex);
    free(self->conninfo);
    free(self->gauge_sql);
    free(self);
    *self_p = NULL;
}

int kh_health_port(const kh_health_t *self)
{
    return self ? self->port : 0;
}

void kh_health_set_sockets(kh_health_t *self, bool bound)
{
    if (self)
        atomic_store(&self->sockets, bound);
}

void kh_health_set_rules(kh_health_t *self, bool loaded)
{
    if (self)
        atomic_store(&self->rules, loaded);
}

void kh_health_set_fault(kh_health_t *self, const char *why)
{
    if (self)
        atomic_store(&self->fault, why);
}

bool kh_health_db_up(const kh_health_t *self)
{
    return self && atomic_load(&self->db);
}

void kh_health_beat(void)
{
    atomic_store(&s_beat_ms, s_now_ms());
}

void kh_health_connected(bool up)
{
    atomic_store(&s_unconnected, !up);
}

void kh_health_note(const char *name, const char *value)
{
    pthread_mutex_lock(&s_notes_mutex);
    for (size_t i = 0; i < S_NOTES; i++) {
        if (*s_notes[i].name && strcmp(s_notes[i].name, name) != 0)
            continue;
        if (!*s_notes[i].name)
            snprintf(s_notes[i].name, sizeof s_notes[i].name, "%s", name);
        snprintf(s_notes[i].value, sizeof s_notes[i].value, "%s",
                 value ? value : "");
        break;
    }
    pthread_mutex_unlock(&s_notes_mutex);
}

static int s_on_beat(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    (void) arg;
    kh_health_beat();
    return 0;
}

int kh_health_attach(zloop_t *loop)
{
    kh_health_beat();
    return zloop_timer(loop, 1000, 0, s_on_beat, NULL) == -1 ? -1 : 0;
}

/* ---- client -------------------------------------------------------------- */

/* Connect to host:port within the time left; the socket or -1. */
static int s_dial(const char *hostport, long long deadline)
{
    const char *colon = strrchr(hostport, ':');
    if (!colon || !colon[1])
        return -1;
    char host[256];
    size_t hlen = (size_t) (colon - hostport);
    if (hlen >= sizeof host)
        return -1;
    memcpy(host, hostport, hlen);
    host[hlen] = '\0';
    if (host[0] == '[' && hlen > 2 && host[hlen - 1] == ']') {
        memmove(host, host + 1, hlen - 2);
        host[hlen - 2] = '\0';
    }
    /* A wildcard bind is reached on this machine. */
    if (!*host || strcmp(host, "*") == 0 || strcmp(host, "0.0.0.0") == 0)
        snprintf(host, sizeof host, "127.0.0.1");
    struct addrinfo hints = {0}, *found = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, colon + 1, &hints, &found) != 0 || !found)
        return -1;
    int fd = socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        int rc = connect(fd, found->ai_addr, found->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            struct pollfd pfd = {fd, POLLOUT, 0};
            long long left = deadline - s_now_ms();
            int soerr = 0;
            socklen_t slen = sizeof soerr;
            if (left > 0 && poll(&pfd, 1, (int) left) == 1 &&
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &slen) == 0 &&
                soerr == 0)
                rc = 0;
        }
        if (rc != 0) {
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    return fd;
}

int kh_http_get(const char *hostport, const char *path, int timeout_ms,
                char **body, kh_error_t *err)
{
    if (body)
        *body = NULL;
    long long deadline = s_now_ms() + timeout_ms;
    int fd = s_dial(hostport, deadline);
    if (fd < 0)
        return kh_error_set(err, KH_E_UNAVAILABLE, "", "cannot connect to %s",
                            hostport);
    char request[512];
    int len = snprintf(request, sizeof request,
                       "GET %s HTTP/1.0\r\nHost: %s\r\n"
                       "Connection: close\r\n\r\n",
                       path, hostport);
    if (len < 0 || (size_t) len >= sizeof request ||
        send(fd, request, (size_t) len, MSG_NOSIGNAL) != len) {
        close(fd);
        return kh_error_set(err, KH_E_UNAVAILABLE, "", "cannot send to %s",
                            hostport);
    }
    char *reply = malloc(S_HTTP_MAX + 1);
    size_t size = 0;
    bool done = false;
    while (reply && size < S_HTTP_MAX) {
        long long left = deadline - s_now_ms();
        struct pollfd pfd = {fd, POLLIN, 0};
        if (left <= 0 || poll(&pfd, 1, (int) left) != 1)
            break;
        ssize_t n = recv(fd, reply + size, S_HTTP_MAX - size, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0) {
            done = n == 0;
            break;
        }
        size += (size_t) n;
    }
    close(fd);
    if (!reply)
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    reply[size] = '\0';
    int status = 0;
    const char *head_end = strstr(reply, "\r\n\r\n");
    if (!done || sscanf(reply, "HTTP/%*d.%*d %d", &status) != 1 || !head_end) {
        free(reply);
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "no whole HTTP answer from %s in time", hostport);
    }
    /* A status of three digits: any other (a negative one, say) would
     * pass for this function's own failure, with no error said. */
    if (status < 100 || status > 599) {
        free(reply);
        return kh_error_set(err, KH_E_UNAVAILABLE, "",
                            "%s answered status %d, which HTTP has not",
                            hostport, status);
    }
    if (body) {
        *body = strdup(head_end + 4);
        if (!*body) {
            free(reply);
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        }
    }
    free(reply);
    return status;
}
