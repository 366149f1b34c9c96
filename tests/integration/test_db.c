/*
 * Connection helpers against the real test cluster: default timeouts and
 * keepalives, which a connection string may override, SQLSTATE
 * classes, binary array parameters as the server reads them, and BEGIN
 * sent with a statement in one round trip.
 */
#include <arpa/inet.h>
#include <czmq.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "ketenhub/db.h"
#include "ketenhub/pgarray.h"
#include "khtest.h"

/* The value of keyword on a live connection. */
static char *s_setting(PGconn *conn, const char *keyword)
{
    PQconninfoOption *options = PQconninfo(conn);
    char *value = NULL;
    for (PQconninfoOption *o = options; o && o->keyword; o++)
        if (strcmp(o->keyword, keyword) == 0 && o->val)
            value = strdup(o->val);
    PQconninfoFree(options);
    return value;
}

START_TEST(connections_have_bounded_timeouts)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    char *timeout = s_setting(conn, "connect_timeout");
    char *user_timeout = s_setting(conn, "tcp_user_timeout");
    ck_assert_str_eq(timeout, "5");
    ck_assert_str_eq(user_timeout, "10000");
    free(timeout);
    free(user_timeout);
    PQfinish(conn);

    char conninfo[2048];
    snprintf(conninfo, sizeof conninfo, "%s connect_timeout=17",
             khtest_pg_conninfo());
    conn = kh_db_connect(conninfo, &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    timeout = s_setting(conn, "connect_timeout");
    ck_assert_str_eq(timeout, "17");
    free(timeout);
    PQfinish(conn);
}
END_TEST

/* No GSSAPI encryption (nor libkrb5 on the connecting threads) unless the
 * connection string or PGGSSENCMODE asks for it. */
START_TEST(connections_ask_for_no_gssapi_unless_told)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    char *mode = s_setting(conn, "gssencmode");
    ck_assert_str_eq(mode, "disable");
    free(mode);
    PQfinish(conn);

    char conninfo[2048];
    snprintf(conninfo, sizeof conninfo, "%s gssencmode=prefer",
             khtest_pg_conninfo());
    conn = kh_db_connect(conninfo, &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    mode = s_setting(conn, "gssencmode");
    ck_assert_str_eq(mode, "prefer");
    free(mode);
    PQfinish(conn);

    /* Nor does it override PGGSSENCMODE. */
    setenv("PGGSSENCMODE", "prefer", 1);
    conn = kh_db_connect(khtest_pg_conninfo(), &err);
    unsetenv("PGGSSENCMODE");
    ck_assert_msg(conn != NULL, "%s", err.message);
    mode = s_setting(conn, "gssencmode");
    ck_assert_str_eq(mode, "prefer");
    free(mode);
    PQfinish(conn);
}
END_TEST

/* The value of setting name in conn's session. */
static void s_show(PGconn *conn, const char *name, const char *want)
{
    char sql[64];
    snprintf(sql, sizeof sql, "SHOW %s", name);
    PGresult *res = PQexec(conn, sql);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), want);
    PQclear(res);
}

/* The hub's sessions never compile plans (common/db.c says why), and
 * server options from PGOPTIONS still reach the server. */
START_TEST(sessions_have_no_jit)
{
    setenv("PGOPTIONS", "-c statement_timeout=1234", 1);
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    unsetenv("PGOPTIONS");
    ck_assert_msg(conn != NULL, "%s", err.message);
    s_show(conn, "jit", "off");
    s_show(conn, "statement_timeout", "1234ms");
    PQfinish(conn);
}
END_TEST

START_TEST(unreachable_database_is_unavailable)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect("host=/nonexistent-kh port=1", &err);
    ck_assert_ptr_null(conn);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert(kh_db_retryable_sqlstate("08006"));
    ck_assert(kh_db_retryable_sqlstate("40001"));
    ck_assert(kh_db_retryable_sqlstate("57P01"));
    ck_assert(!kh_db_retryable_sqlstate("23505"));
    ck_assert(!kh_db_retryable_sqlstate("42P01"));
}
END_TEST

/* A failure without a SQLSTATE is libpq's own: the connection broke, even
 * when PQstatus has not noticed yet, as in pipeline mode after PostgreSQL's
 * immediate shutdown (a result "server closed the connection unexpectedly"
 * on a connection still CONNECTION_OK). It is retryable, as a server's
 * error with a SQLSTATE is not. */
START_TEST(a_failure_without_sqlstate_is_unavailable)
{
    PGconn *conn = PQconnectdb(khtest_pg_conninfo());
    ck_assert_int_eq(PQstatus(conn), CONNECTION_OK);
    kh_error_t err;
    PGresult *res = PQmakeEmptyPGresult(conn, PGRES_FATAL_ERROR);
    ck_assert_ptr_null(PQresultErrorField(res, PG_DIAG_SQLSTATE));
    ck_assert_int_eq(kh_db_error(&err, conn, res, "claim"), -1);
    PQclear(res);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert_int_eq(kh_db_error(&err, conn, NULL, "cannot send"), -1);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);

    /* A server's error keeps its SQLSTATE's class. */
    res = PQexec(conn, "SELECT 1/0");
    ck_assert_int_eq(kh_db_error(&err, conn, res, NULL), -1);
    PQclear(res);
    ck_assert_int_eq(err.code, KH_E_DB);
    res = PQexec(conn, "SELECT 1");
    kh_db_error(&err, conn, res, NULL); /* a result it did not expect */
    PQclear(res);
    ck_assert_int_eq(err.code, KH_E_DB);
    PQfinish(conn);
}
END_TEST

/* A TCP port on 127.0.0.1 that takes connections and never answers them
 * (bound and listening, never accepting): a database whose postmaster
 * hangs, or a host whose answers are lost, looks the same to a client. */
static int s_silent_port(int *fd)
{
    *fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(*fd, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET,
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    ck_assert_int_eq(bind(*fd, (struct sockaddr *) &addr, sizeof addr), 0);
    ck_assert_int_eq(listen(*fd, 16), 0);
    ck_assert_int_eq(getsockname(*fd, (struct sockaddr *) &addr, &len), 0);
    return ntohs(addr.sin_port);
}

/* An attempt to connect runs on a thread of its own: the caller gets its
 * answer at once while it runs, then the connection or the attempt's
 * error; an attempt given up costs the caller nothing. */
START_TEST(connecting_does_not_block_the_caller)
{
    int fd;
    char silent[128];
    snprintf(silent, sizeof silent,
             "host=127.0.0.1 port=%d dbname=x user=x connect_timeout=2",
             s_silent_port(&fd));
    kh_db_connecting_t *pending = NULL;
    kh_error_t err;
    int64_t started = zclock_mono();
    ck_assert_ptr_null(kh_db_connect_async(&pending, silent, "t", &err));
    ck_assert_ptr_nonnull(pending);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert_int_lt(zclock_mono() - started, 500);
    PGconn *conn = NULL;
    while (pending && zclock_mono() - started < 10000) {
        conn = kh_db_connect_async(&pending, silent, "t", &err);
        usleep(10000);
    }
    int64_t elapsed = zclock_mono() - started;
    ck_assert_ptr_null(pending);
    ck_assert_ptr_null(conn);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert_int_ge(elapsed,
                     900); /* its own timeout (libpq counts whole seconds) */

    started = zclock_mono();
    ck_assert_ptr_null(kh_db_connect_async(&pending, silent, "t", &err));
    kh_db_connect_abandon(&pending);
    ck_assert_ptr_null(pending);
    kh_db_connect_abandon(&pending); /* NULL: nothing */
    ck_assert_int_lt(zclock_mono() - started, 500);

    while (!(conn = kh_db_connect_async(&pending, khtest_pg_conninfo(), "t",
                                        &err)) &&
           pending)
        usleep(10000);
    ck_assert_msg(conn != NULL, "%s", err.message);
    ck_assert_ptr_null(pending);
    s_show(conn, "jit", "off");
    s_show(conn, "application_name", "t");
    PQfinish(conn);

    /* A pair: nothing is handed out before both attempts ended; then both,
     * or neither with the failure. */
    kh_db_pair_t pair = {0};
    static const bool both[2] = {true, true};
    PGconn *conns[2] = {NULL, NULL};
    int rc;
    started = zclock_mono();
    while ((rc = kh_db_connect_pair(&pair, both, silent, "t", conns, &err)) ==
           0) {
        ck_assert(kh_db_pair_connecting(&pair));
        ck_assert(!conns[0] && !conns[1]);
        usleep(10000);
    }
    ck_assert_int_eq(rc, -1);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert(!conns[0] && !conns[1]);
    ck_assert_int_ge(zclock_mono() - started, 900);
    while ((rc = kh_db_connect_pair(&pair, both, khtest_pg_conninfo(), "t",
                                    conns, &err)) == 0)
        usleep(10000);
    ck_assert_msg(rc == 1, "%s", err.message);
    ck_assert(conns[0] && conns[1] && conns[0] != conns[1]);
    PQfinish(conns[0]);
    PQfinish(conns[1]);
    /* Given up in flight: nothing left behind. */
    ck_assert_int_eq(kh_db_connect_pair(&pair, both, silent, "t", conns, &err),
                     0);
    kh_db_pair_abandon(&pair);
    ck_assert(!kh_db_pair_connecting(&pair));
    close(fd);
}
END_TEST

/* Write text to a new file in the test's temp dir; returns its path. */
static void s_write(char *path, size_t size, const char *name, const char *text)
{
    const char *dir = getenv("TMPDIR");
    snprintf(path, size, "%s/kh-test-db-%d-%s", dir && *dir ? dir : "/tmp",
             (int) getpid(), name);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

START_TEST(password_comes_from_the_password_file)
{
    char path[512];
    s_write(path, sizeof path, "pw", "s3cret\n");
    setenv("KH_DATABASE_PASSWORD_FILE", path, 1);
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    char *password = s_setting(conn, "password");
    ck_assert_str_eq(password, "s3cret");
    free(password);
    PQfinish(conn);
    /* The longest, 255 bytes, with its line's CRLF across the end of the
     * 256 read. */
    char longest[300];
    memset(longest, 'p', 255);
    snprintf(longest + 255, sizeof longest - 255, "\r\n");
    s_write(path, sizeof path, "pw", longest);
    conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    password = s_setting(conn, "password");
    longest[255] = '\0';
    ck_assert_str_eq(password, longest);
    free(password);
    PQfinish(conn);

    /* A password in the connection string wins. */
    char conninfo[2048];
    snprintf(conninfo, sizeof conninfo, "%s password=other",
             khtest_pg_conninfo());
    conn = kh_db_connect(conninfo, &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    password = s_setting(conn, "password");
    ck_assert_str_eq(password, "other");
    free(password);
    PQfinish(conn);
    unlink(path);

    /* Missing, empty or two-line files are configuration errors that name
     * the variable; no connection is tried. */
    /* A first line that fills the 256 bytes read, and more after it. */
    char filled[300];
    memset(filled, 'a', 255);
    snprintf(filled + 255, sizeof filled - 255, "\njunk\n");
    const char *bad[] = {NULL, "", "\n", "one\ntwo\n", filled};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        if (bad[i])
            s_write(path, sizeof path, "pw", bad[i]);
        kh_error_clear(&err);
        conn = kh_db_connect(khtest_pg_conninfo(), &err);
        ck_assert_ptr_null(conn);
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        ck_assert_str_eq(err.path, "KH_DATABASE_PASSWORD_FILE");
        unlink(path);
    }
    unsetenv("KH_DATABASE_PASSWORD_FILE");
}
END_TEST

/* A connection string that libpq cannot read is a setting to correct,
 * named without quoting it (it may hold a password), not a database that
 * is away; a database name alone is one libpq reads. */
START_TEST(a_connection_string_that_does_not_parse_is_a_setting)
{
    const char *bad[] = {"host=127.0.0.1 prot=1 password=hunter2",
                         "password=hunter2 port",
                         "postgresql://u:hunter2@h/d?bogus=1",
                         "host='127.0.0.1 password=hunter2"};
    kh_error_t err;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kh_error_clear(&err);
        ck_assert_ptr_null(kh_db_connect(bad[i], &err));
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        ck_assert_str_eq(err.path, "KH_DATABASE_URL");
        ck_assert_ptr_null(strstr(err.message, "hunter2"));
    }
    ck_assert_int_eq(kh_db_conninfo_check("ketenhub", &err), 0);
    ck_assert_int_eq(kh_db_conninfo_check("", &err), 0);
    ck_assert_int_eq(kh_db_conninfo_check(khtest_pg_conninfo(), &err), 0);

    /* ketenhubctl: a usage error (exit 2) naming the variable. */
    char *before =
        getenv("KH_DATABASE_URL") ? strdup(getenv("KH_DATABASE_URL")) : NULL;
    setenv("KH_DATABASE_URL", bad[0], 1);
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(&out, "partner", "list"), 2);
    ck_assert_ptr_nonnull(strstr(out, "KH_DATABASE_URL"));
    ck_assert_ptr_null(strstr(out, "hunter2"));
    free(out);
    if (before)
        setenv("KH_DATABASE_URL", before, 1);
    else
        unsetenv("KH_DATABASE_URL");
    free(before);
}
END_TEST

/* Binary arrays of every element type the hub sends arrive as the same
 * values a text literal would give: NULLs, empty and non-ASCII strings,
 * bytes with a NUL, quotes and backslashes, uuids; an empty array. */
START_TEST(binary_arrays_reach_the_server_intact)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    kh_pgarray_t uuids = {0}, texts = {0}, bytes = {0}, empty = {0};
    kh_pgarray_reset(&uuids, KH_PG_UUID);
    kh_pgarray_add_uuid(&uuids, "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6");
    kh_pgarray_add_uuid(&uuids, NULL);
    kh_pgarray_reset(&texts, KH_PG_TEXT);
    kh_pgarray_add_str(&texts, "{\"naam\": \"Zoë \\\" \\\\\"}");
    kh_pgarray_add_str(&texts, "");
    kh_pgarray_add_str(&texts, NULL);
    kh_pgarray_reset(&bytes, KH_PG_BYTEA);
    kh_pgarray_add(&bytes, "\x00\xff,\"", 4);
    kh_pgarray_reset(&empty, KH_PG_TEXT);
    const char *values[4];
    int lengths[4];
    const int formats[4] = {1, 1, 1, 1};
    kh_pgarray_t *arrays[4] = {&uuids, &texts, &bytes, &empty};
    for (int i = 0; i < 4; i++)
        ck_assert_ptr_nonnull(values[i] =
                                  kh_pgarray_data(arrays[i], &lengths[i]));
    PGresult *res = PQexecParams(
        conn,
        "SELECT $1::uuid[] = ARRAY['0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6',"
        " NULL]::uuid[],"
        " $2::text[] = ARRAY['{\"naam\": \"Zoë \\\" \\\\\"}', '', NULL],"
        " $3::bytea[] = ARRAY['\\x00ff2c22'::bytea],"
        " cardinality($4::text[]), array_ndims($1::uuid[])",
        4, NULL, values, lengths, formats, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK, "%s",
                  PQresultErrorMessage(res));
    for (int c = 0; c < 3; c++)
        ck_assert_msg(strcmp(PQgetvalue(res, 0, c), "t") == 0,
                      "column %d differs", c + 1);
    ck_assert_str_eq(PQgetvalue(res, 0, 3), "0");
    ck_assert_str_eq(PQgetvalue(res, 0, 4), "1");
    PQclear(res);
    /* The element type is checked: a text array where uuids are wanted is
     * refused, not misread. */
    res = PQexecParams(conn, "SELECT $1::uuid[]", 1, NULL, &values[1],
                       &lengths[1], formats, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    PQclear(res);
    for (int i = 0; i < 4; i++)
        kh_pgarray_free(arrays[i]);
    PQfinish(conn);
}
END_TEST

/* The number of rows of table, as another session sees them. */
static int s_rows(const char *table)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s", table);
    PGresult *res = PQexec(conn, sql);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    int rows = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    PQfinish(conn);
    return rows;
}

/* BEGIN and a statement in one round trip give the statement's result,
 * in a transaction left open for the caller; a failing statement leaves
 * it open and failed, and a failing BEGIN runs nothing. */
START_TEST(begin_and_statement_go_in_one_round_trip)
{
    kh_error_t err;
    PGconn *conn = kh_db_connect(khtest_pg_conninfo(), &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    char table[32], sql[160];
    snprintf(table, sizeof table, "begun_%d", (int) getpid());
    snprintf(sql, sizeof sql,
             "DROP TABLE IF EXISTS %s; CREATE TABLE %s (k integer)", table,
             table);
    ck_assert_int_eq(kh_db_exec(conn, sql, &err), 0);
    snprintf(sql, sizeof sql, "INSERT INTO %s VALUES ($1) RETURNING k * 10",
             table);
    PQclear(PQprepare(conn, "ins", sql, 1, NULL));
    PQclear(PQprepare(conn, "div", "SELECT 1 / $1::integer", 1, NULL));

    const char *one[] = {"1"};
    PGresult *res =
        kh_db_begin_exec(conn, "BEGIN", "ins", 1, one, NULL, NULL, 0, &err);
    ck_assert_msg(res != NULL, "%s", err.message);
    ck_assert_int_eq(PQntuples(res), 1);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "10");
    PQclear(res);
    ck_assert_int_eq(PQtransactionStatus(conn), PQTRANS_INTRANS);
    ck_assert_int_eq(s_rows(table), 0); /* not committed yet */
    ck_assert_int_eq(kh_db_exec(conn, "COMMIT", &err), 0);
    ck_assert_int_eq(s_rows(table), 1);

    const char *zero[] = {"0"};
    res = kh_db_begin_exec(conn, "BEGIN", "div", 1, zero, NULL, NULL, 0, &err);
    ck_assert_ptr_null(res);
    ck_assert_int_eq(err.code, KH_E_DB);
    ck_assert_msg(strstr(err.message, "22012"), "%s", err.message);
    ck_assert_int_eq(PQtransactionStatus(conn), PQTRANS_INERROR);
    kh_db_rollback_quietly(conn);

    res = kh_db_begin_exec(conn, "BEGIN ISOLATION LEVEL NONE", "ins", 1, one,
                           NULL, NULL, 0, &err);
    ck_assert_ptr_null(res);
    ck_assert_msg(strstr(err.message, "42601"), "%s", err.message);
    ck_assert_int_eq(PQtransactionStatus(conn), PQTRANS_IDLE);
    ck_assert_int_eq(s_rows(table), 1);

    snprintf(sql, sizeof sql, "DROP TABLE %s", table);
    ck_assert_int_eq(kh_db_exec(conn, sql, &err), 0);
    PQfinish(conn);
}
END_TEST

/* The connection of kh_db_connect_async (a service's), waited for. */
static PGconn *s_service_connection(const char *conninfo, kh_error_t *err)
{
    kh_db_connecting_t *pending = NULL;
    PGconn *conn;
    while (!(conn = kh_db_connect_async(&pending, conninfo, "t", err)) &&
           pending)
        usleep(10000);
    return conn;
}

/* A service's connection takes a session that takes writes: of the hosts
 * a connection string names, one that does not (a standby, a server set
 * read-only: here the session is made so) is passed over, and with none
 * left the attempt fails as the database being away. The tools' may read
 * from one. PGTARGETSESSIONATTRS, or the connection string, says
 * otherwise. */
START_TEST(a_services_connection_passes_over_a_server_that_takes_no_writes)
{
    char read_only[1400];
    snprintf(read_only, sizeof read_only,
             "%s options='-c default_transaction_read_only=on'",
             khtest_pg_conninfo());
    kh_error_t err;
    PGconn *conn = s_service_connection(read_only, &err);
    ck_assert_ptr_null(conn);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert_msg(strstr(err.message, "read-only") != NULL, "%s", err.message);

    conn = kh_db_connect_app(read_only, "t", &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    s_show(conn, "transaction_read_only", "on");
    PQfinish(conn);

    setenv("PGTARGETSESSIONATTRS", "any", 1);
    conn = s_service_connection(read_only, &err);
    unsetenv("PGTARGETSESSIONATTRS");
    ck_assert_msg(conn != NULL, "%s", err.message);
    PQfinish(conn);
    char told[1500];
    snprintf(told, sizeof told, "%s target_session_attrs=any", read_only);
    conn = s_service_connection(told, &err);
    ck_assert_msg(conn != NULL, "%s", err.message);
    PQfinish(conn);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("db");
    TCase *tc = tcase_create("db");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, connections_have_bounded_timeouts);
    tcase_add_test(tc, connections_ask_for_no_gssapi_unless_told);
    tcase_add_test(tc, sessions_have_no_jit);
    tcase_add_test(tc, unreachable_database_is_unavailable);
    tcase_add_test(tc, a_failure_without_sqlstate_is_unavailable);
    tcase_add_test(tc, connecting_does_not_block_the_caller);
    tcase_add_test(tc, password_comes_from_the_password_file);
    tcase_add_test(tc, a_connection_string_that_does_not_parse_is_a_setting);
    tcase_add_test(tc, binary_arrays_reach_the_server_intact);
    tcase_add_test(tc, begin_and_statement_go_in_one_round_trip);
    tcase_add_test(
        tc, a_services_connection_passes_over_a_server_that_takes_no_writes);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
