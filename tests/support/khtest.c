/*
 * Helpers shared by the tests (see khtest.h).
 */
#include "khtest.h"

#include "khproc.h"

#include <dirent.h>

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/health.h"
#include "ketenhub/migrate.h"
#include "ketenhub/proto.h"

int khtest_run_suite(Suite *suite)
{
    SRunner *runner = srunner_create(suite);
    srunner_run_all(runner, CK_NORMAL);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    return failed ? 1 : 0;
}

const char *khtest_src(const char *relative)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", KH_TEST_SOURCE_DIR, relative);
    return path;
}

/* Value of NAME in a line "export NAME='value'" or "NAME=value". */
static int s_env_value(const char *line, const char *name, char *out,
                       size_t size)
{
    if (strncmp(line, "export ", 7) == 0)
        line += 7;
    size_t n = strlen(name);
    if (strncmp(line, name, n) != 0 || line[n] != '=')
        return -1;
    const char *v = line + n + 1;
    size_t len = strcspn(v, "\r\n");
    if (len >= 2 && v[0] == '\'' && v[len - 1] == '\'') {
        v++;
        len -= 2;
    }
    if (len >= size)
        return -1;
    memcpy(out, v, len);
    out[len] = '\0';
    return 0;
}

/* Append " key='value'" to a conninfo string, quoting as libpq wants. */
static void s_conninfo_add(char *buf, size_t size, const char *key,
                           const char *value)
{
    size_t o = strlen(buf);
    o += (size_t) snprintf(buf + o, size - o, "%s%s='", o ? " " : "", key);
    for (const char *p = value; *p && o + 3 < size; p++) {
        if (*p == '\'' || *p == '\\')
            buf[o++] = '\\';
        buf[o++] = *p;
    }
    if (o + 2 > size)
        ck_abort_msg("khtest: connection string too long");
    buf[o++] = '\'';
    buf[o] = '\0';
}

int khtest_pgtmp(const char *command, const char *mode)
{
    const char *dir = getenv("KH_TEST_PG_DIR");
    if (!dir || !*dir)
        ck_abort_msg("KH_TEST_PG_DIR is not set");
    return khproc_sh("'%s/scripts/pgtmp.sh' %s '%s' %s", KH_TEST_SOURCE_DIR,
                     command, dir, mode ? mode : "");
}

/* host/port/user of the test cluster, without a dbname. */
static const char *s_pg_base(void)
{
    static char base[1024];
    if (base[0])
        return base;
    const char *dir = getenv("KH_TEST_PG_DIR");
    if (!dir || !*dir)
        ck_abort_msg("KH_TEST_PG_DIR is not set: run the integration tests "
                     "through ctest (its pg fixture starts PostgreSQL with "
                     "scripts/pgtmp.sh), or set it to a pgtmp.sh directory");
    char path[4096];
    snprintf(path, sizeof path, "%s/env", dir);
    FILE *fp = fopen(path, "r");
    if (!fp)
        ck_abort_msg("cannot read %s (%s): is the test PostgreSQL running? "
                     "(scripts/pgtmp.sh start %s)",
                     path, strerror(errno), dir);
    char host[512] = "", port[32] = "", user[128] = "";
    char line[1024];
    while (fgets(line, sizeof line, fp)) {
        s_env_value(line, "PGHOST", host, sizeof host);
        s_env_value(line, "PGPORT", port, sizeof port);
        s_env_value(line, "PGUSER", user, sizeof user);
    }
    fclose(fp);
    if (!host[0] || !port[0])
        ck_abort_msg("%s has no PGHOST or PGPORT", path);
    s_conninfo_add(base, sizeof base, "host", host);
    s_conninfo_add(base, sizeof base, "port", port);
    s_conninfo_add(base, sizeof base, "user", user[0] ? user : "postgres");
    return base;
}

const char *khtest_pg_conninfo(void)
{
    static char conninfo[1200];
    if (!conninfo[0]) {
        snprintf(conninfo, sizeof conninfo, "%s", s_pg_base());
        s_conninfo_add(conninfo, sizeof conninfo, "dbname", "postgres");
    }
    return conninfo;
}

char *khtest_db_conninfo(const char *dbname)
{
    char conninfo[1200];
    snprintf(conninfo, sizeof conninfo, "%s", s_pg_base());
    s_conninfo_add(conninfo, sizeof conninfo, "dbname", dbname);
    char *copy = strdup(conninfo);
    ck_assert_ptr_nonnull(copy);
    return copy;
}

static PGconn *s_connect(const char *conninfo)
{
    PGconn *conn = PQconnectdb(conninfo);
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        ck_abort_msg("cannot connect to the test PostgreSQL (%s): %s", conninfo,
                     conn ? PQerrorMessage(conn) : "no memory");
    return conn;
}

PGconn *khtest_db_login(PGconn *conn, const char *dbname, const char *user,
                        const char *group)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname"
             " = '%s') THEN CREATE ROLE \"%s\" LOGIN IN ROLE %s; END IF;"
             " END $$",
             user, user, group);
    khtest_db_exec(conn, sql, 0, NULL);
    char conninfo[1200];
    snprintf(conninfo, sizeof conninfo, "%s", s_pg_base());
    s_conninfo_add(conninfo, sizeof conninfo, "dbname", dbname);
    s_conninfo_add(conninfo, sizeof conninfo, "user", user);
    return s_connect(conninfo);
}

static void s_exec(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_COMMAND_OK &&
        PQresultStatus(res) != PGRES_TUPLES_OK)
        ck_abort_msg("%s: %s", sql, PQerrorMessage(conn));
    PQclear(res);
}

/* Roll back what a test that failed left prepared in dbname (PREPARE
 * TRANSACTION): DROP DATABASE refuses a database with a prepared
 * transaction, and it can be rolled back only from that database. */
static void s_rollback_prepared(PGconn *admin, const char *dbname)
{
    const char *params[] = {dbname};
    PGresult *res = PQexecParams(admin,
                                 "SELECT format('ROLLBACK PREPARED %L', gid)"
                                 " FROM pg_prepared_xacts WHERE database = $1",
                                 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0) {
        char *conninfo = khtest_db_conninfo(dbname);
        PGconn *conn = s_connect(conninfo);
        free(conninfo);
        for (int i = 0; i < PQntuples(res); i++)
            s_exec(conn, PQgetvalue(res, i, 0));
        PQfinish(conn);
    }
    PQclear(res);
}

PGconn *khtest_db_empty(const char *dbname)
{
    size_t len = strlen(dbname);
    if (len == 0 || len > 60 ||
        strspn(dbname, "abcdefghijklmnopqrstuvwxyz"
                       "0123456789_") != len)
        ck_abort_msg("khtest: bad database name '%s'", dbname);
    PGconn *admin = s_connect(khtest_pg_conninfo());
    s_exec(admin, "SET client_min_messages = warning");
    s_rollback_prepared(admin, dbname);
    char sql[256];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)",
             dbname);
    s_exec(admin, sql);
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", dbname);
    s_exec(admin, sql);
    PQfinish(admin);

    char *conninfo = khtest_db_conninfo(dbname);
    PGconn *conn = s_connect(conninfo);
    free(conninfo);
    PQclear(PQexec(conn, "SET client_min_messages = warning"));
    return conn;
}

PGconn *khtest_db_fresh(const char *dbname)
{
    PGconn *conn = khtest_db_empty(dbname);
    kh_error_t err;
    kh_error_clear(&err);
    if (kh_migrate_apply(conn, khtest_src("migrations"), NULL, NULL, &err) < 0)
        ck_abort_msg("cannot migrate test database %s: %s: %s (%s)", dbname,
                     err.path, err.message, kh_error_name(err.code));
    return conn;
}

char *khtest_db_value(PGconn *conn, const char *sql)
{
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        ck_abort_msg("%s: %s", sql, PQerrorMessage(conn));
    char *value = NULL;
    if (PQntuples(res) > 0 && !PQgetisnull(res, 0, 0)) {
        value = strdup(PQgetvalue(res, 0, 0));
        ck_assert_ptr_nonnull(value);
    }
    PQclear(res);
    return value;
}

json_t *khtest_json(const char *text)
{
    char *copy = strdup(text);
    ck_assert_ptr_nonnull(copy);
    for (char *p = copy; *p; p++)
        if (*p == '\'')
            *p = '"';
    json_error_t jerr;
    json_t *doc =
        json_loads(copy, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    ck_assert_msg(doc != NULL, "bad test JSON: %s", jerr.text);
    free(copy);
    return doc;
}

void khtest_db_exec(PGconn *conn, const char *sql, int nparams,
                    const char *const *params)
{
    PGresult *res =
        nparams == 0
            ? PQexec(conn, sql) /* may hold several statements */
            : PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK ||
                      PQresultStatus(res) == PGRES_TUPLES_OK,
                  "%s: %s", sql, PQerrorMessage(conn));
    PQclear(res);
}

int khtest_strangers_refused(const char *hub_cert, const char *endpoint, int n,
                             int timeout_ms, int64_t *elapsed_ms)
{
    zcert_t *hub = zcert_load(hub_cert);
    ck_assert_ptr_nonnull(hub);
    zsock_t **socks = calloc((size_t) n, sizeof *socks);
    zsock_t **monitors = calloc((size_t) n, sizeof *monitors);
    bool *refused = calloc((size_t) n, sizeof *refused);
    ck_assert(socks && monitors && refused);
    int64_t start = zclock_mono(), last = start;
    for (int i = 0; i < n; i++) {
        zcert_t *cert = zcert_new();
        socks[i] = zsock_new(ZMQ_DEALER);
        ck_assert_ptr_nonnull(socks[i]);
        zcert_apply(cert, socks[i]);
        zcert_destroy(&cert);
        zsock_set_curve_serverkey(socks[i], zcert_public_txt(hub));
        zsock_set_linger(socks[i], 0);
        char monitor[64];
        snprintf(monitor, sizeof monitor, "inproc://khtest-stranger-%d", i);
        ck_assert_int_eq(zmq_socket_monitor(zsock_resolve(socks[i]), monitor,
                                            ZMQ_EVENT_HANDSHAKE_FAILED_AUTH),
                         0);
        monitors[i] = zsock_new_pair(monitor);
        ck_assert_ptr_nonnull(monitors[i]);
        ck_assert_int_eq(zsock_connect(socks[i], "%s", endpoint), 0);
        zstr_send(socks[i], "x");
    }
    zcert_destroy(&hub);
    int count = 0;
    while (count < n && zclock_mono() - start < timeout_ms) {
        bool seen = false;
        for (int i = 0; i < n; i++) {
            if (refused[i] || !(zsock_events(monitors[i]) & ZMQ_POLLIN))
                continue;
            zmsg_t *event = zmsg_recv(monitors[i]);
            zmsg_destroy(&event);
            refused[i] = seen = true;
            count++;
            last = zclock_mono();
        }
        if (!seen)
            zclock_sleep(10);
    }
    for (int i = 0; i < n; i++) {
        zmq_socket_monitor(zsock_resolve(socks[i]), NULL, 0);
        zsock_destroy(&monitors[i]);
        zsock_destroy(&socks[i]);
    }
    free(socks);
    free(monitors);
    free(refused);
    *elapsed_ms = last - start;
    return count;
}

long khtest_refusals_told(const char *path)
{
    char *text = khtest_read_file(path);
    ck_assert_ptr_nonnull(text);
    long told = 0;
    for (const char *p = text; (p = strstr(p, "event=auth_refused ")); p++)
        told++;
    for (const char *p = text;
         (p = strstr(p, "event=auth_refusals_unaudited ")); p++) {
        const char *count = strstr(p, "count=");
        ck_assert_ptr_nonnull(count);
        told += strtol(count + 6, NULL, 10);
    }
    free(text);
    return told;
}

void khtest_db_allow_connections(const char *name, bool allow)
{
    PGconn *admin = PQconnectdb(khtest_pg_conninfo());
    ck_assert_int_eq(PQstatus(admin), CONNECTION_OK);
    char sql[256];
    snprintf(sql, sizeof sql, "ALTER DATABASE %s ALLOW_CONNECTIONS %s", name,
             allow ? "true" : "false");
    khtest_db_exec(admin, sql, 0, NULL);
    PQfinish(admin);
}

void khtest_routed_referral(PGconn *conn, int n, char referral[37],
                            char payload[128], char hash[65])
{
    char key[32];
    kh_uuid_new(referral);
    snprintf(key, sizeof key, "key-%d", n);
    snprintf(payload, 128, "{\"summary\":\"delivery %d\"}", n);
    kh_sha256_hex(payload, strlen(payload), hash);
    const char *params[] = {referral, key, payload, hash};
    khtest_db_exec(conn,
                   "INSERT INTO referrals (id, partner_id, idempotency_key,"
                   " schema_version, payload, payload_hash, state) VALUES ($1,"
                   " 'veilig-thuis', $2, 'referral.v1', convert_to($3, 'UTF8'),"
                   " decode($4, 'hex'), 'routed')",
                   4, params);
}

char *khtest_path(const char *dir, const char *name)
{
    static char path[8][1024];
    static int next;
    char *out = path[next++ % 8];
    snprintf(out, sizeof path[0], "%s/%s", dir, name);
    return out;
}

char *khtest_db_plan(PGconn *conn, const char *sql)
{
    size_t size = strlen("EXPLAIN ") + strlen(sql) + 1;
    char *explain = malloc(size);
    ck_assert_ptr_nonnull(explain);
    snprintf(explain, size, "EXPLAIN %s", sql);
    PGresult *res = PQexec(conn, explain);
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        ck_abort_msg("%s: %s", explain, PQerrorMessage(conn));
    free(explain);
    size_t len = 1;
    for (int i = 0; i < PQntuples(res); i++)
        len += strlen(PQgetvalue(res, i, 0)) + 1;
    char *plan = calloc(1, len);
    ck_assert_ptr_nonnull(plan);
    for (int i = 0; i < PQntuples(res); i++) {
        strcat(plan, PQgetvalue(res, i, 0));
        strcat(plan, "\n");
    }
    PQclear(res);
    return plan;
}

char *khtest_db_plan_prepared(PGconn *conn, const char *name, const char *sql,
                              const char *args)
{
    PGresult *res = PQprepare(conn, name, sql, 0, NULL);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s: %s", name,
                  PQerrorMessage(conn));
    PQclear(res);
    size_t size = strlen("EXECUTE ()") + strlen(name) + strlen(args) + 1;
    char *execute = malloc(size);
    ck_assert_ptr_nonnull(execute);
    snprintf(execute, size, "EXECUTE %s(%s)", name, args);
    char *plan = khtest_db_plan(conn, execute);
    free(execute);
    return plan;
}

long khtest_db_count(PGconn *conn, const char *sql)
{
    char *value = khtest_db_value(conn, sql);
    ck_assert_msg(value != NULL, "%s: no count", sql);
    long n = atol(value);
    free(value);
    return n;
}

bool khtest_wait_count(PGconn *conn, const char *sql, long want, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 20) {
        if (khtest_db_count(conn, sql) == want)
            return true;
        usleep(20 * 1000);
    }
    return false;
}

double khtest_metric(const char *health, const char *series)
{
    char *body = NULL;
    kh_error_t err;
    ck_assert_int_eq(kh_http_get(health, "/metrics", 2000, &body, &err), 200);
    ck_assert_ptr_nonnull(body);
    char want[256];
    snprintf(want, sizeof want, "\nketenhub_%s ", series);
    const char *at = strstr(body, want);
    double value = at ? strtod(at + strlen(want), NULL) : 0;
    free(body);
    return value;
}

bool khtest_log_has(const char *path, const char *text, int timeout_ms)
{
    for (int waited = 0; waited <= timeout_ms; waited += 20) {
        char *content = khtest_read_file(path);
        bool found = content && strstr(content, text);
        free(content);
        if (found)
            return true;
        usleep(20 * 1000);
    }
    return false;
}

void khtest_register_partner(PGconn *conn, const char *id, const char *kind,
                             bool handles_cases, const char *public_key)
{
    const char *params[] = {id, kind, handles_cases ? "true" : "false",
                            public_key};
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO partners (id, display_name, kind, handles_cases,"
        " curve_public_key) VALUES ($1, $1, $2, $3, $4)",
        4, NULL, params, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK,
                  "cannot register %s: %s", id, PQerrorMessage(conn));
    PQclear(res);
}

static int s_name_order(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}

size_t khtest_examples(json_t **docs, size_t max)
{
    char dir_path[4096];
    snprintf(dir_path, sizeof dir_path, "%s", khtest_src("schemas/examples"));
    DIR *dir = opendir(dir_path);
    ck_assert_msg(dir != NULL, "cannot open %s", dir_path);
    char *names[64] = {NULL};
    size_t count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) && count < 64) {
        size_t len = strlen(entry->d_name);
        if (len > 5 && strcmp(entry->d_name + len - 5, ".json") == 0)
            names[count++] = strdup(entry->d_name);
    }
    closedir(dir);
    qsort(names, count, sizeof names[0], s_name_order);
    size_t loaded = 0;
    for (size_t i = 0; i < count; i++) {
        if (loaded < max) {
            char path[4200];
            snprintf(path, sizeof path, "%s/%s", dir_path, names[i]);
            json_error_t jerr;
            docs[loaded] = json_load_file(path, 0, &jerr);
            ck_assert_msg(docs[loaded] != NULL, "%s:%d: %s", path, jerr.line,
                          jerr.text);
            loaded++;
        }
        free(names[i]);
    }
    ck_assert_msg(loaded > 0, "no example referrals in %s", dir_path);
    return loaded;
}

char *khtest_tmpdir(void)
{
    char *path = strdup("/tmp/khtest.XXXXXX");
    ck_assert_ptr_nonnull(path);
    if (!mkdtemp(path))
        ck_abort_msg("cannot create a temporary directory: %s",
                     strerror(errno));
    return path;
}

static int s_remove(const char *path, const struct stat *st, int flag,
                    struct FTW *ftw)
{
    (void) st;
    (void) flag;
    (void) ftw;
    remove(path);
    return 0;
}

void khtest_rmtree(const char *path)
{
    if (path && *path)
        nftw(path, s_remove, 16, FTW_DEPTH | FTW_PHYS);
}

static void s_write(const char *path, const char *text, const char *mode)
{
    FILE *fp = fopen(path, mode);
    if (!fp) {
        ck_abort_msg("cannot write %s: %s", path, strerror(errno));
        return;
    }
    size_t len = strlen(text);
    if (fwrite(text, 1, len, fp) != len || fclose(fp) != 0)
        ck_abort_msg("cannot write %s", path);
}

void khtest_write_file(const char *path, const char *text)
{
    s_write(path, text, "w");
}

void khtest_append_file(const char *path, const char *text)
{
    s_write(path, text, "a");
}

void khtest_sync_standby(PGconn *conn, const char *name)
{
    char sql[256];
    if (name)
        snprintf(sql, sizeof sql,
                 "ALTER SYSTEM SET synchronous_standby_names = '%s'", name);
    else
        snprintf(sql, sizeof sql,
                 "ALTER SYSTEM RESET synchronous_standby_names");
    khtest_db_exec(conn, sql, 0, NULL);
    khtest_db_exec(conn, "SELECT pg_reload_conf()", 0, NULL);
    for (int i = 0; i < 100; i++) {
        char *v = khtest_db_value(
            conn, "SELECT current_setting('synchronous_standby_names')");
        bool set = v && strcmp(v, name ? name : "") == 0;
        free(v);
        if (set)
            return;
        usleep(50 * 1000);
    }
    ck_abort_msg("synchronous_standby_names did not become '%s'",
                 name ? name : "");
}

bool khtest_end_commit_waiter(PGconn *conn, const char *db)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT coalesce(max(pid), 0) FROM pg_stat_activity"
             " WHERE datname = '%s' AND wait_event = 'SyncRep'",
             db);
    long pid = 0;
    for (int i = 0; i < 200 && !(pid = khtest_db_count(conn, sql)); i++)
        usleep(50 * 1000);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_terminate_backend(%ld) AS t WHERE t",
             pid);
    return pid && khtest_db_count(conn, sql) == 1;
}

PGconn *khtest_revoke_unreadably(PGconn *db, const char *conninfo,
                                 const char *id)
{
    PGconn *locker = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(locker), CONNECTION_OK);
    khtest_db_exec(locker,
                   "BEGIN; LOCK TABLE partner_keys IN ACCESS EXCLUSIVE MODE", 0,
                   NULL);
    const char *params[] = {id};
    khtest_db_exec(db, "UPDATE partners SET revoked_at = now() WHERE id = $1",
                   1, params);
    return locker;
}

void khtest_change_untold(PGconn *db, const char *sql)
{
    khtest_db_exec(db, "SET session_replication_role = replica", 0, NULL);
    khtest_db_exec(db, sql, 0, NULL);
    khtest_db_exec(db, "RESET session_replication_role", 0, NULL);
}

int khtest_log_count(const char *path, const char *text)
{
    char *all = khtest_read_file(path);
    int n = 0;
    for (const char *p = all; p && (p = strstr(p, text)); p++)
        n++;
    free(all);
    return n;
}

void khtest_show_log(const char *path, int lines)
{
    fprintf(stderr, "--- the last %d lines of %s:\n", lines, path);
    fflush(stderr);
    khproc_sh("grep -v ' event=config ' '%s' | tail -n %d >&2", path, lines);
}

char *khtest_read_file(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    size_t size = 0, cap = 4096;
    char *buf = malloc(cap);
    size_t n;
    while (buf && (n = fread(buf + size, 1, cap - size - 1, fp)) > 0) {
        size += n;
        if (cap - size - 1 == 0) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = grown;
            cap *= 2;
        }
    }
    fclose(fp);
    if (buf)
        buf[size] = '\0';
    return buf;
}

int khtest_run(char *const argv[], char **output)
{
    int fds[2];
    if (pipe(fds) != 0)
        ck_abort_msg("pipe: %s", strerror(errno));
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        ck_abort_msg("fork: %s", strerror(errno));
    if (pid == 0) {
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, 0);
        dup2(fds[1], 1);
        dup2(fds[1], 2);
        close(fds[0]);
        close(fds[1]);
        execv(argv[0], argv);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    size_t size = 0, cap = 4096;
    char *buf = malloc(cap);
    ck_assert_ptr_nonnull(buf);
    for (;;) {
        if (cap - size < 1024) {
            cap *= 2;
            char *grown = realloc(buf, cap);
            ck_assert_ptr_nonnull(grown);
            buf = grown;
        }
        ssize_t n = read(fds[0], buf + size, cap - size - 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        size += (size_t) n;
    }
    buf[size] = '\0';
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            ck_abort_msg("waitpid: %s", strerror(errno));
    if (output)
        *output = buf;
    else
        free(buf);
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

pid_t khtest_start_intake(const char *dir, const char *endpoint,
                          const char *conninfo, char *const extra[])
{
    char vars[5][2048];
    snprintf(vars[0], sizeof vars[0], "KH_INTAKE_ENDPOINT=%s", endpoint);
    snprintf(vars[1], sizeof vars[1], "KH_HUB_CERT=%s/hub.cert", dir);
    snprintf(vars[2], sizeof vars[2], "KH_PARTNER_CERT_DIR=%s/partners", dir);
    snprintf(vars[3], sizeof vars[3], "KH_DATABASE_URL=%s", conninfo);
    snprintf(vars[4], sizeof vars[4], "KH_SCHEMA_DIR=%s/schemas",
             KH_TEST_SOURCE_DIR);
    char *env[32] = {vars[0], vars[1], vars[2],
                     vars[3], vars[4], "KH_LOG_LEVEL=debug"};
    size_t n = 6;
    for (size_t i = 0; extra && extra[i]; i++) {
        ck_assert_uint_lt(n, sizeof env / sizeof env[0] - 1);
        env[n++] = extra[i];
    }
    env[n] = NULL;
    char log[2048];
    snprintf(log, sizeof log, "%s/intake.log", dir);
    char *argv[] = {"ketenhub-intake", NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/services/intake/ketenhub-intake", argv, env, log);
    ck_assert_int_gt(pid, 0);
    return pid;
}

int khtest_ctl(char **output, const char *const *args)
{
    char *argv[32] = {(char *) KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl"};
    int i = 1;
    for (; args[i - 1] && i < 31; i++)
        argv[i] = (char *) args[i - 1];
    argv[i] = NULL;
    return khtest_run(argv, output);
}
