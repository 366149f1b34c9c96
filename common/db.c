/*
 * PostgreSQL helpers: connect, classify SQLSTATEs, and turn libpq failures
 * into error records that never carry a statement's parameters.
 */
#include "ketenhub/db.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* libpq prints notices on stderr by default; the hub logs in logfmt and
 * decides itself what to log, so notices are dropped. */
static void s_drop_notice(void *arg, const PGresult *res)
{
    (void) arg;
    (void) res;
}

int kh_db_password(char *buf, size_t size, kh_error_t *err)
{
    static const char *const var = "KH_DATABASE_PASSWORD_FILE";
    const char *path = getenv(var);
    buf[0] = '\0';
    if (!path || !*path)
        return 0;
    FILE *f = fopen(path, "r");
    if (!f)
        return kh_error_set(err, KH_E_CONFIG, var, "cannot read %s: %s", path,
                            strerror(errno));
    size_t n = fread(buf, 1, size, f);
    bool failed = ferror(f) != 0;
    /* A file that fills buf and holds more is too long, whatever the
     * last byte read was (a line break, which is trimmed next), but for
     * the line's CRLF across the end of buf. */
    int next = n == size ? fgetc(f) : EOF;
    if (next == '\n' && buf[size - 1] == '\r' && fgetc(f) == EOF) {
        next = EOF;
        n = size - 1;
    }
    fclose(f);
    if (next != EOF)
        n = size;
    else if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    if (failed || n == 0 || n >= size || memchr(buf, '\0', n) ||
        memchr(buf, '\n', n)) {
        explicit_bzero(buf, size);
        return kh_error_set(err, KH_E_CONFIG, var,
                            failed   ? "cannot read %s"
                            : n == 0 ? "%s is empty"
                                     : "%s does not hold one password",
                            path);
    }
    buf[n] = '\0';
    return 1;
}

int kh_db_conninfo_check(const char *conninfo, kh_error_t *err)
{
    /* libpq expands dbname only when it holds '=' or starts as a URI;
     * anything else is a database name. */
    if (!conninfo || (!strchr(conninfo, '=') &&
                      strncmp(conninfo, "postgresql://", 13) != 0 &&
                      strncmp(conninfo, "postgres://", 11) != 0))
        return 0;
    char *why = NULL;
    PQconninfoOption *options = PQconninfoParse(conninfo, &why);
    PQfreemem(why);
    if (!options)
        return kh_error_set(err, KH_E_CONFIG, "KH_DATABASE_URL",
                            "not a libpq connection "
                            "string (key=value ...) or URI "
                            "(postgresql://...)");
    PQconninfoFree(options);
    return 0;
}

const char *kh_db_gssencmode(const char *conninfo)
{
    const char *env[] = {"PGGSSENCMODE", "PGSERVICE"};
    for (size_t i = 0; i < 2; i++) {
        const char *value = getenv(env[i]);
        if (value && *value)
            return "";
    }
    PQconninfoOption *options =
        conninfo && *conninfo ? PQconninfoParse(conninfo, NULL) : NULL;
    bool told = false;
    for (PQconninfoOption *o = options; o && o->keyword; o++)
        if (o->val && *o->val &&
            (strcmp(o->keyword, "gssencmode") == 0 ||
             strcmp(o->keyword, "service") == 0))
            told = true;
    PQconninfoFree(options);
    return told ? "" : "disable";
}

/* The target_session_attrs a service's connections give libpq:
 * "read-write", unless PGTARGETSESSIONATTRS says otherwise (""; a
 * connection string's own setting comes after it, and wins). */
static const char *s_writer_attrs(void)
{
    const char *env = getenv("PGTARGETSESSIONATTRS");
    return env && *env ? "" : "read-write";
}

/* kh_db_connect_app; writer: for a service, which writes, so that of the
 * hosts a connection string names (host=a,b) one that takes no writes (a
 * standby, a primary set read-only) is passed over for the next. */
static PGconn *s_connect(const char *conninfo, const char *application_name,
                         bool writer, kh_error_t *err)
{
    if (kh_db_conninfo_check(conninfo, err) < 0)
        return NULL;
    char password[256];
    if (kh_db_password(password, sizeof password, err) < 0)
        return NULL;
    /* A database that stops answering must not hang a service: bounded
     * connection attempts, and dead TCP peers noticed within seconds. These
     * come first, so that the same settings in conninfo win. No GSSAPI
     * encryption unless asked for (kh_db_gssencmode). */
    const char *keywords[] = {"connect_timeout",
                              "keepalives",
                              "keepalives_idle",
                              "keepalives_interval",
                              "keepalives_count",
                              "tcp_user_timeout",
                              "gssencmode",
                              "target_session_attrs",
                              "password",
                              "dbname",
                              "fallback_application_name",
                              NULL};
    const char *values[] = {"5",
                            "1",
                            "10",
                            "5",
                            "3",
                            "10000",
                            kh_db_gssencmode(conninfo),
                            writer ? s_writer_attrs() : "",
                            password, /* "" is ignored by libpq */
                            conninfo ? conninfo : "",
                            application_name ? application_name : "ketenhub",
                            NULL};
    /* expand_dbname = 1: dbname may be a whole connection string or URI,
     * whose settings override the ones before it. */
    PGconn *conn = PQconnectdbParams(keywords, values, 1);
    explicit_bzero(password, sizeof password);
    if (!conn) {
        kh_error_set(err, KH_E_NOMEM, NULL, "out of memory connecting");
        return NULL;
    }
    if (PQstatus(conn) != CONNECTION_OK) {
        kh_db_error(err, conn, NULL, "cannot connect to the database");
        PQfinish(conn);
        return NULL;
    }
    PQsetNoticeReceiver(conn, s_drop_notice, NULL);
    /* No JIT: the hub's statements are short, and PostgreSQL compiles a
     * plan at every execution once its estimated cost passes
     * jit_above_cost, which a seq scan that enable_seqscan = off rules out
     * always does (it costs 10^10): 0.5-0.8 s an execution, measured on a
     * dead-letter sweep of 0.2 ms.
     * UTF-8 whatever PGCLIENTENCODING or the connection string ask for:
     * every text the hub and its tools send and read is UTF-8 (a name
     * matched in other bytes would match nothing, and one printed in
     * them would not be the trail's). */
    if (kh_db_exec(conn, "SET jit = off; SET client_encoding = 'UTF8'", err)) {
        PQfinish(conn);
        return NULL;
    }
    return conn;
}

PGconn *kh_db_connect_app(const char *conninfo, const char *application_name,
                          kh_error_t *err)
{
    return s_connect(conninfo, application_name, false, err);
}

PGconn *kh_db_connect(const char *conninfo, kh_error_t *err)
{
    return kh_db_connect_app(conninfo, NULL, err);
}

struct _kh_db_connecting_t {
    pthread_mutex_t mutex;
    int refs;  /* the caller's and the thread's */
    bool done; /* the thread has set conn and err */
    PGconn *conn;
    kh_error_t err;
    char *conninfo, *application_name;
};

/* Drop one reference, with the mutex held; frees on the last. */
static void s_connecting_release(kh_db_connecting_t *self)
{
    bool last = --self->refs == 0;
    pthread_mutex_unlock(&self->mutex);
    if (!last)
        return;
    PQfinish(self->conn);
    free(self->conninfo);
    free(self->application_name);
    pthread_mutex_destroy(&self->mutex);
    free(self);
}

/* The attempts' threads that have not yet left libpq. */
static atomic_int s_attempts_running;

static void *s_connecting_main(void *arg)
{
    kh_db_connecting_t *self = arg;
    kh_error_t err;
    kh_error_clear(&err);
    PGconn *conn =
        s_connect(self->conninfo, self->application_name, true, &err);
    pthread_mutex_lock(&self->mutex);
    self->conn = conn;
    self->err = err;
    self->done = true;
    s_connecting_release(self); /* an abandoned attempt's PQfinish */
    atomic_fetch_sub(&s_attempts_running, 1);
    return NULL;
}

int kh_db_attempts_running(void)
{
    return atomic_load(&s_attempts_running);
}

void kh_db_thread_left(void)
{
    atomic_fetch_add(&s_attempts_running, 1);
}

static kh_db_connecting_t *s_connecting_start(const char *conninfo,
                                              const char *application_name,
                                              kh_error_t *err)
{
    kh_db_connecting_t *self = calloc(1, sizeof *self);
    if (self) {
        self->conninfo = strdup(conninfo ? conninfo : "");
        self->application_name =
            application_name ? strdup(application_name) : NULL;
    }
    if (!self || !self->conninfo ||
        (application_name && !self->application_name)) {
        if (self) {
            free(self->conninfo);
            free(self->application_name);
        }
        free(self);
        kh_error_set(err, KH_E_NOMEM, NULL, "out of memory connecting");
        return NULL;
    }
    pthread_mutex_init(&self->mutex, NULL);
    self->refs = 2;
    pthread_attr_t attr;
    pthread_t thread;
    int rc = pthread_attr_init(&attr);
    if (rc == 0) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        atomic_fetch_add(&s_attempts_running, 1);
        rc = pthread_create(&thread, &attr, s_connecting_main, self);
        if (rc != 0)
            atomic_fetch_sub(&s_attempts_running, 1);
        pthread_attr_destroy(&attr);
    }
    if (rc != 0) {
        self->refs = 1;
        pthread_mutex_lock(&self->mutex);
        s_connecting_release(self);
        kh_error_set(err, KH_E_NOMEM, NULL,
                     "cannot start a thread to connect: %s", strerror(rc));
        return NULL;
    }
    return self;
}

PGconn *kh_db_connect_async(kh_db_connecting_t **pending, const char *conninfo,
                            const char *application_name, kh_error_t *err)
{
    if (!*pending) {
        *pending = s_connecting_start(conninfo, application_name, err);
        if (!*pending)
            return NULL;
    }
    kh_db_connecting_t *self = *pending;
    pthread_mutex_lock(&self->mutex);
    if (!self->done) {
        pthread_mutex_unlock(&self->mutex);
        kh_error_set(err, KH_E_UNAVAILABLE, NULL, "connecting to the database");
        return NULL;
    }
    PGconn *conn = self->conn;
    self->conn = NULL;
    if (!conn && err)
        *err = self->err;
    s_connecting_release(self);
    *pending = NULL;
    return conn;
}

void kh_db_connect_abandon(kh_db_connecting_t **pending)
{
    if (!pending || !*pending)
        return;
    pthread_mutex_lock(&(*pending)->mutex);
    s_connecting_release(*pending);
    *pending = NULL;
}

bool kh_db_pair_connecting(const kh_db_pair_t *pair)
{
    return pair->pending[0] || pair->pending[1];
}

int kh_db_connect_pair(kh_db_pair_t *pair, const bool want[2],
                       const char *conninfo, const char *application_name,
                       PGconn *conns[2], kh_error_t *err)
{
    for (int k = 0; k < 2; k++) {
        /* Each wanted one is tried once a round: one that failed waits
         * for the other to end. */
        if (!want[k] || pair->made[k] || (pair->tried[k] && !pair->pending[k]))
            continue;
        pair->tried[k] = true;
        kh_error_t e;
        kh_error_clear(&e);
        pair->made[k] = kh_db_connect_async(&pair->pending[k], conninfo,
                                            application_name, &e);
        if (!pair->made[k] && !pair->pending[k] && !pair->failed) {
            pair->failed = true;
            pair->err = e;
        }
    }
    if (kh_db_pair_connecting(pair)) {
        kh_error_set(err, KH_E_UNAVAILABLE, NULL, "connecting to the database");
        return 0;
    }
    bool failed = pair->failed;
    if (failed && err)
        *err = pair->err;
    for (int k = 0; k < 2; k++) {
        if (failed || !want[k])
            PQfinish(pair->made[k]);
        else
            conns[k] = pair->made[k];
        pair->made[k] = NULL;
        pair->tried[k] = false;
    }
    pair->failed = false;
    return failed ? -1 : 1;
}

void kh_db_pair_abandon(kh_db_pair_t *pair)
{
    for (int k = 0; k < 2; k++) {
        kh_db_connect_abandon(&pair->pending[k]);
        PQfinish(pair->made[k]);
        pair->made[k] = NULL;
        pair->tried[k] = false;
    }
    pair->failed = false;
}

const char *kh_db_env_conninfo(void)
{
    const char *url = getenv("KH_DATABASE_URL");
    return url && *url ? url : "";
}

bool kh_db_session_ended(const char *sqlstate)
{
    return sqlstate &&
           (strncmp(sqlstate, "08", 2) == 0 ||
            strncmp(sqlstate, "57P", 3) == 0 || strcmp(sqlstate, "25006") == 0);
}

bool kh_db_retryable_sqlstate(const char *sqlstate)
{
    static const char *const retryable[] = {
        "40001", /* serialization_failure */
        "40P01", /* deadlock_detected */
        "57P01", /* admin_shutdown */
        "57P02", /* crash_shutdown */
        "57P03", /* cannot_connect_now (starting up, recovering) */
        "53000", /* insufficient_resources */
        "53100", /* disk_full */
        "53200", /* out_of_memory */
        "53300", /* too_many_connections */
        "55P03", /* lock_not_available (lock_timeout) */
        "25006", /* read_only_sql_transaction: primary became a standby */
    };
    if (!sqlstate || strlen(sqlstate) != 5)
        return false;
    if (strncmp(sqlstate, "08", 2) == 0) /* connection_exception class */
        return true;
    for (size_t i = 0; i < sizeof retryable / sizeof retryable[0]; i++)
        if (strcmp(sqlstate, retryable[i]) == 0)
            return true;
    return false;
}

/* Copy the first line of src into dst (size n), trimmed. When redact is
 * set, the text between double quotes is replaced by "...": data-exception
 * messages quote the offending input value there. */
static void s_copy_message(char *dst, size_t n, const char *src, bool redact)
{
    size_t o = 0;
    bool quoted = false;
    if (!src)
        src = "";
    while (*src == ' ' || *src == '\t')
        src++;
    for (; *src && *src != '\n' && o + 1 < n; src++) {
        if (redact && *src == '"') {
            if (!quoted) {
                const char *mark = "\"...";
                for (size_t k = 0; mark[k] && o + 1 < n; k++)
                    dst[o++] = mark[k];
            } else
                dst[o++] = '"';
            quoted = !quoted;
            continue;
        }
        if (quoted && redact)
            continue;
        dst[o++] = *src;
    }
    while (o > 0 && (dst[o - 1] == ' ' || dst[o - 1] == '\r'))
        o--;
    dst[o] = '\0';
}

int kh_db_error(kh_error_t *err, PGconn *conn, const PGresult *res,
                const char *context)
{
    if (!err)
        return -1;
    const char *sqlstate =
        res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    const char *primary =
        res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    bool bad_conn = !conn || PQstatus(conn) == CONNECTION_BAD;

    char message[KH_ERROR_MESSAGE_MAX];
    if (primary)
        s_copy_message(message, sizeof message, primary,
                       sqlstate && strncmp(sqlstate, "22", 2) == 0);
    else if (res && PQresultErrorMessage(res)[0])
        s_copy_message(message, sizeof message, PQresultErrorMessage(res),
                       true);
    else if (conn)
        s_copy_message(message, sizeof message, PQerrorMessage(conn), false);
    else
        snprintf(message, sizeof message, "no connection");
    if (!message[0]) {
        if (res && PQresultStatus(res) != PGRES_FATAL_ERROR)
            snprintf(message, sizeof message, "unexpected result %s",
                     PQresStatus(PQresultStatus(res)));
        else
            snprintf(message, sizeof message, "unknown database error");
    }

    /* The server sends a SQLSTATE with every error: a failure without one
     * is libpq's own, a connection that broke. In pipeline mode libpq
     * reports a server that went away (PostgreSQL's immediate shutdown,
     * a crash) as "server closed the connection unexpectedly" while
     * PQstatus still says CONNECTION_OK; taken for a database error, it
     * made routing give up a rules reload instead of trying again. */
    bool lost = !sqlstate && (!res || PQresultStatus(res) == PGRES_FATAL_ERROR);
    kh_errcode_t code = KH_E_DB;
    if (bad_conn || lost || kh_db_retryable_sqlstate(sqlstate))
        code = KH_E_UNAVAILABLE;

    const char *pre = context && *context ? context : "";
    const char *sep = context && *context ? ": " : "";
    if (sqlstate) {
        kh_error_set(err, code, NULL, "%s%s%s (sqlstate %s)", pre, sep, message,
                     sqlstate);
        snprintf(err->sqlstate, sizeof err->sqlstate, "%s", sqlstate);
    } else
        kh_error_set(err, code, NULL, "%s%s%s", pre, sep, message);
    return -1;
}

int kh_db_exec(PGconn *conn, const char *sql, kh_error_t *err)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        rc = kh_db_error(err, conn, res, NULL);
    PQclear(res);
    return rc;
}

bool kh_db_notified(PGconn *conn)
{
    if (!conn)
        return false;
    bool told = !PQconsumeInput(conn);
    for (PGnotify *note; (note = PQnotifies(conn)) != NULL;) {
        PQfreemem(note);
        told = true;
    }
    return told;
}

int kh_db_pipeline_end(PGconn *conn, int keep_index, PGresult **keep,
                       kh_error_t *err)
{
    if (keep)
        *keep = NULL;
    int rc = PQpipelineSync(conn) ? 0 : -1;
    if (rc)
        kh_db_error(err, conn, NULL, "cannot send the pipeline");
    /* Results come query by query, each list ended by NULL, and the sync
     * last; a broken connection ends the loop through the guard. */
    for (int nulls = 0, query = 0; rc == 0 || nulls < 2;) {
        PGresult *res = PQgetResult(conn);
        if (!res) {
            query++;
            if (++nulls > 1 && PQstatus(conn) != CONNECTION_OK)
                break;
            continue;
        }
        nulls = 0;
        ExecStatusType status = PQresultStatus(res);
        if (status == PGRES_PIPELINE_SYNC) {
            PQclear(res);
            break;
        }
        if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
            if (rc == 0)
                rc = kh_db_error(err, conn, res, NULL);
        } else if (keep && query == keep_index && !*keep) {
            *keep = res;
            continue;
        }
        PQclear(res);
    }
    if (!PQexitPipelineMode(conn) && rc == 0)
        rc = kh_db_error(err, conn, NULL, "cannot leave the pipeline");
    if (rc && keep) {
        PQclear(*keep);
        *keep = NULL;
    }
    return rc;
}

PGresult *kh_db_begin_exec(PGconn *conn, const char *begin, const char *name,
                           int nparams, const char *const *params,
                           const int *lengths, const int *formats,
                           int result_format, kh_error_t *err)
{
    if (!PQenterPipelineMode(conn)) {
        kh_db_error(err, conn, NULL, "cannot start a pipeline");
        return NULL;
    }
    kh_error_t send_err;
    bool sent = PQsendQueryParams(conn, begin, 0, NULL, NULL, NULL, NULL, 0) &&
                PQsendQueryPrepared(conn, name, nparams, params, lengths,
                                    formats, result_format);
    if (!sent)
        kh_db_error(&send_err, conn, NULL, "cannot send a statement");
    PGresult *res = NULL;
    int rc = kh_db_pipeline_end(conn, 1, &res, err);
    if (sent)
        return rc ? NULL : res;
    if (rc == 0)
        *err = send_err;
    PQclear(res);
    return NULL;
}

void kh_db_rollback_quietly(PGconn *conn)
{
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return;
    PGTransactionStatusType ts = PQtransactionStatus(conn);
    if (ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR)
        PQclear(PQexec(conn, "ROLLBACK"));
}

int kh_db_retry_next(int last_ms)
{
    if (last_ms <= 0)
        return KH_DB_RETRY_MIN_MS;
    return last_ms >= KH_DB_RETRY_MAX_MS / 2 ? KH_DB_RETRY_MAX_MS : last_ms * 2;
}
