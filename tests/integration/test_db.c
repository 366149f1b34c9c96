/*
 * Connection helpers against the real test cluster: default timeouts and
 * keepalives, which a connection string may override, and SQLSTATE
 * classes.
 */
#include <stdlib.h>
#include <string.h>

#include "ketenhub/db.h"
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

int main(void)
{
    Suite *suite = suite_create("db");
    TCase *tc = tcase_create("db");
    tcase_add_test(tc, connections_have_bounded_timeouts);
    tcase_add_test(tc, unreachable_database_is_unavailable);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
