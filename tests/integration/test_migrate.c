/*
 * Integration tests of the migration runner (common/migrate.c) and the
 * PostgreSQL helpers (common/db.c) against the throwaway test cluster.
 * Extra migrations written by these tests use versions 900 and up, so the
 * project's own migrations can grow without touching the tests.
 */
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ketenhub/audit.h"
#include "ketenhub/db.h"
#include "ketenhub/migrate.h"
#include "ketenhub/partner.h"
#include "ketenhub/proto.h"
#include "khproc.h"
#include "khtest.h"

#define DB "kh_test_migrate"

/* Number of migrations in the source tree. */
static int s_source_count(void)
{
    DIR *dir = opendir(khtest_src("migrations"));
    ck_assert_ptr_nonnull(dir);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] != '.' && len > 4 &&
            strcmp(e->d_name + len - 4, ".sql") == 0)
            n++;
    }
    closedir(dir);
    return n;
}

/* A temporary directory holding copies of the source migrations. */
static char *s_copy_migrations(void)
{
    char *tmp = khtest_tmpdir();
    const char *src = khtest_src("migrations");
    char src_dir[1024];
    snprintf(src_dir, sizeof src_dir, "%s", src);
    DIR *dir = opendir(src_dir);
    ck_assert_ptr_nonnull(dir);
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        size_t len = strlen(e->d_name);
        if (e->d_name[0] == '.' || len < 4 ||
            strcmp(e->d_name + len - 4, ".sql") != 0)
            continue;
        char from[2048], to[2048];
        snprintf(from, sizeof from, "%s/%s", src_dir, e->d_name);
        snprintf(to, sizeof to, "%s/%s", tmp, e->d_name);
        char *text = khtest_read_file(from);
        ck_assert_ptr_nonnull(text);
        khtest_write_file(to, text);
        free(text);
    }
    closedir(dir);
    return tmp;
}

static void s_write_in(const char *dir, const char *name, const char *text)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    khtest_write_file(path, text);
}

static bool s_ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

static int s_int(PGconn *conn, const char *sql)
{
    char *v = khtest_db_value(conn, sql);
    ck_assert_ptr_nonnull(v);
    int n = atoi(v);
    free(v);
    return n;
}

static bool s_exists(PGconn *conn, const char *relation)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT to_regclass('%s') IS NOT NULL", relation);
    char *v = khtest_db_value(conn, sql);
    bool exists = v && strcmp(v, "t") == 0;
    free(v);
    return exists;
}

static int s_recorded(PGconn *conn)
{
    if (!s_exists(conn, "kh_schema_migrations"))
        return 0;
    return s_int(conn, "SELECT count(*) FROM kh_schema_migrations");
}

typedef struct {
    int calls;
    int by_state[4];
    char last_file[256];
} s_seen_t;

static void s_count(const kh_migration_t *m, void *arg)
{
    s_seen_t *seen = arg;
    seen->calls++;
    seen->by_state[m->state]++;
    snprintf(seen->last_file, sizeof seen->last_file, "%s", m->file);
}

/* A copy of the source migrations plus 900_extra.sql, all applied to
 * conn; the caller removes the directory (khtest_rmtree) and frees it. */
static char *s_applied_with_extra(PGconn *conn)
{
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_extra.sql", "CREATE TABLE extra_one (x int);\n");
    kh_error_t err;
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err),
                     s_source_count() + 1);
    return dir;
}

START_TEST(test_apply_on_empty_database)
{
    PGconn *conn = khtest_db_empty(DB);
    int n = s_source_count();
    ck_assert_int_ge(n, 1);
    kh_error_t err;
    kh_error_clear(&err);
    s_seen_t seen = {0};
    int rc =
        kh_migrate_apply(conn, khtest_src("migrations"), s_count, &seen, &err);
    ck_assert_msg(rc == n, "applied %d of %d: %s %s", rc, n, err.path,
                  err.message);
    ck_assert_int_eq(seen.calls, n);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_APPLIED], n);
    ck_assert(s_exists(conn, "partners"));
    ck_assert(s_exists(conn, "referrals"));
    ck_assert(s_exists(conn, "audit_events"));
    ck_assert_int_eq(s_recorded(conn), n);

    /* The record of 001 names it and holds the SHA-256 of its bytes. */
    char *name = khtest_db_value(
        conn, "SELECT name FROM kh_schema_migrations WHERE version = 1");
    ck_assert_str_eq(name, "foundation");
    free(name);
    char *text = khtest_read_file(khtest_src("migrations/001_foundation.sql"));
    ck_assert_ptr_nonnull(text);
    const char *params[] = {text};
    int lengths[] = {(int) strlen(text)};
    int formats[] = {1};
    PGresult *res =
        PQexecParams(conn,
                     "SELECT encode(sha256($1::bytea), 'hex') = sha256 "
                     "FROM kh_schema_migrations WHERE version = 1",
                     1, NULL, params, lengths, formats, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    ck_assert_str_eq(PQgetvalue(res, 0, 0), "t");
    PQclear(res);
    free(text);

    /* ANALYZE samples 300 rows per unit of a table's largest statistics
     * target: every column of the two queues has its own small one (or
     * none), a column added without one would make each ANALYZE of the
     * queue under load read ten times the rows. */
    char *defaulted = khtest_db_value(
        conn, "SELECT coalesce(string_agg(attrelid::regclass || '.' || "
              "attname, ' '), '') FROM pg_attribute WHERE attrelid IN "
              "('referrals'::regclass, 'deliveries'::regclass) AND attnum > 0 "
              "AND NOT attisdropped AND (attstattarget IS NULL OR "
              "attstattarget < 0 OR "
              "attstattarget > 10)");
    ck_assert_msg(strcmp(defaulted, "") == 0,
                  "columns with the default statistics target: %s", defaulted);
    free(defaulted);
    /* Nor any expression of their indexes, which ANALYZE samples for. */
    defaulted = khtest_db_value(
        conn, "SELECT coalesce(string_agg(i.indexrelid::regclass || '.' || "
              "a.attname, ' '), '') FROM pg_index i JOIN pg_attribute a ON "
              "a.attrelid = i.indexrelid WHERE i.indrelid IN "
              "('referrals'::regclass, 'deliveries'::regclass) AND "
              "i.indkey[a.attnum - 1] = 0 AND (a.attstattarget IS NULL OR "
              "a.attstattarget < 0 OR a.attstattarget > 10)");
    ck_assert_msg(strcmp(defaulted, "") == 0,
                  "index expressions with the default statistics target: %s",
                  defaulted);
    free(defaulted);

    /* Idempotent: a second run applies nothing and reports nothing. */
    memset(&seen, 0, sizeof seen);
    rc = kh_migrate_apply(conn, khtest_src("migrations"), s_count, &seen, &err);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(seen.calls, 0);
    ck_assert_int_eq(s_recorded(conn), n);
    /* The advisory lock is released. */
    char *locked = khtest_db_value(
        conn, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
              "AND database = (SELECT oid FROM pg_database "
              "WHERE datname = current_database())");
    ck_assert_str_eq(locked, "0");
    free(locked);
    PQfinish(conn);
}
END_TEST

START_TEST(test_status)
{
    PGconn *conn = khtest_db_empty(DB);
    int n = s_source_count();
    kh_error_t err;
    kh_error_clear(&err);
    s_seen_t seen = {0};
    int rc =
        kh_migrate_status(conn, khtest_src("migrations"), s_count, &seen, &err);
    ck_assert_int_eq(rc, n);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_PENDING], n);
    /* Status changes nothing. */
    ck_assert(!s_exists(conn, "kh_schema_migrations"));

    ck_assert_int_eq(
        kh_migrate_apply(conn, khtest_src("migrations"), NULL, NULL, &err), n);
    memset(&seen, 0, sizeof seen);
    rc =
        kh_migrate_status(conn, khtest_src("migrations"), s_count, &seen, &err);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_APPLIED], n);
    ck_assert_int_eq(seen.calls, n);

    /* A new file shows as pending. */
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_extra.sql", "CREATE TABLE extra_one (x int);\n");
    memset(&seen, 0, sizeof seen);
    rc = kh_migrate_status(conn, dir, s_count, &seen, &err);
    ck_assert_int_eq(rc, 1);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_PENDING], 1);
    ck_assert_str_eq(seen.last_file, "900_extra.sql");
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_changed_file_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = s_applied_with_extra(conn);
    kh_error_t err;
    kh_error_clear(&err);

    /* Edit an applied file and add a new one: nothing is applied. */
    char path[4096];
    snprintf(path, sizeof path, "%s/900_extra.sql", dir);
    khtest_append_file(path, "-- an innocent-looking edit\n");
    s_write_in(dir, "901_more.sql", "CREATE TABLE extra_two (x int);\n");
    int rc = kh_migrate_apply(conn, dir, NULL, NULL, &err);
    ck_assert_int_eq(rc, -1);
    ck_assert_int_eq(err.code, KH_E_MIGRATION_CHANGED);
    ck_assert_msg(s_ends_with(err.path, "/900_extra.sql"), "path %s", err.path);
    ck_assert(!s_exists(conn, "extra_two"));
    ck_assert_int_eq(s_recorded(conn), s_source_count() + 1);

    /* Status says so too, and still lists everything. */
    s_seen_t seen = {0};
    kh_error_clear(&err);
    rc = kh_migrate_status(conn, dir, s_count, &seen, &err);
    ck_assert_int_eq(rc, -1);
    ck_assert_int_eq(err.code, KH_E_MIGRATION_CHANGED);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_CHANGED], 1);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_PENDING], 1);
    ck_assert_int_eq(seen.calls, s_source_count() + 2);

    /* An edit of the project's own 001 is refused the same way. */
    khtest_write_file(path, "CREATE TABLE extra_one (x int);\n");
    snprintf(path, sizeof path, "%s/001_foundation.sql", dir);
    khtest_append_file(path, "\n");
    kh_error_clear(&err);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_MIGRATION_CHANGED);
    ck_assert(s_ends_with(err.path, "/001_foundation.sql"));
    ck_assert(!s_exists(conn, "extra_two"));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_renamed_file_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = s_applied_with_extra(conn);
    kh_error_t err;
    kh_error_clear(&err);
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/900_extra.sql", dir);
    snprintf(to, sizeof to, "%s/900_renamed.sql", dir);
    ck_assert_int_eq(rename(from, to), 0);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_MIGRATION_CHANGED);
    ck_assert(s_ends_with(err.path, "/900_renamed.sql"));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_missing_file_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = s_applied_with_extra(conn);
    kh_error_t err;
    kh_error_clear(&err);
    char path[4096];
    snprintf(path, sizeof path, "%s/900_extra.sql", dir);
    ck_assert_int_eq(unlink(path), 0);
    s_write_in(dir, "901_more.sql", "CREATE TABLE extra_two (x int);\n");

    int rc = kh_migrate_apply(conn, dir, NULL, NULL, &err);
    ck_assert_int_eq(rc, -1);
    ck_assert_int_eq(err.code, KH_E_MIGRATION_CHANGED);
    ck_assert_msg(s_ends_with(err.path, "/900_extra.sql"), "path %s", err.path);
    ck_assert(!s_exists(conn, "extra_two"));

    s_seen_t seen = {0};
    ck_assert_int_eq(kh_migrate_status(conn, dir, s_count, &seen, &err), -1);
    ck_assert_int_eq(seen.by_state[KH_MIGRATION_MISSING], 1);
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_bad_names_refused)
{
    static const char *const bad[] = {
        "9_short.sql", "900-dash.sql",     "900_Upper.sql",
        "abc.sql",     "900_.sql",         "000_zero.sql",
        "900_a b.sql", "1234567890_x.sql", "900_extra.sql.sql"};
    PGconn *conn = khtest_db_empty(DB);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *dir = s_copy_migrations();
        s_write_in(dir, bad[i], "CREATE TABLE should_not_exist (x int);\n");
        kh_error_t err;
        kh_error_clear(&err);
        int rc = kh_migrate_apply(conn, dir, NULL, NULL, &err);
        ck_assert_msg(rc == -1, "%s accepted", bad[i]);
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        ck_assert_msg(s_ends_with(err.path, bad[i]), "path %s for %s", err.path,
                      bad[i]);
        ck_assert_int_eq(kh_migrate_status(conn, dir, NULL, NULL, &err), -1);
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        khtest_rmtree(dir);
        free(dir);
    }
    /* Nothing at all was applied. */
    ck_assert(!s_exists(conn, "kh_schema_migrations"));
    ck_assert(!s_exists(conn, "partners"));

    /* Two files with one version are refused as well. */
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_a.sql", "SELECT 1;\n");
    s_write_in(dir, "900_b.sql", "SELECT 2;\n");
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    khtest_rmtree(dir);
    free(dir);

    /* Files that are not .sql, and hidden files, are ignored. */
    dir = s_copy_migrations();
    s_write_in(dir, "README.md", "how migrations work\n");
    s_write_in(dir, ".900_editor_swap.sql", "garbage\n");
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err),
                     s_source_count());
    khtest_rmtree(dir);
    free(dir);

    /* A directory that does not exist is an I/O error. */
    ck_assert_int_eq(
        kh_migrate_apply(conn, "/nonexistent/migrations", NULL, NULL, &err),
        -1);
    ck_assert_int_eq(err.code, KH_E_IO);
    PQfinish(conn);
}
END_TEST

/* A migrations directory that is missing or holds no migration is a
 * usage error: never "up to date" on a database that has no schema. */
START_TEST(test_empty_dir_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = khtest_tmpdir();
    s_write_in(dir, "README.md", "how migrations work\n");
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, dir);
    ck_assert_int_eq(kh_migrate_status(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);

    char *conninfo = khtest_db_conninfo(DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *out = NULL;
    ck_assert_int_eq(KHTEST_CTL(&out, "migrate", "--dir", dir), 2);
    ck_assert_ptr_nonnull(strstr(out, "no migrations"));
    free(out);
    /* --status says why on stderr, and prints nothing on stdout: not the
     * table's header, as if a table followed. */
    ck_assert_int_eq(KHTEST_CTL(&out, "migrate", "--status", "--dir", dir), 2);
    ck_assert_msg(strstr(out, "no migrations") && !strstr(out, "applied_at"),
                  "%s", out);
    free(out);
    ck_assert_int_eq(khproc_sh("test -z \"$('%s/tools/ctl/ketenhubctl' migrate"
                               " --status --dir '%s' 2>/dev/null)\"",
                               KH_TEST_BINARY_DIR, dir),
                     0);
    ck_assert_int_eq(
        KHTEST_CTL(&out, "migrate", "--dir", "/nonexistent/migrations"), 2);
    ck_assert_ptr_nonnull(strstr(out, "--dir /nonexistent/migrations"));
    free(out);
    setenv("KH_MIGRATIONS_DIR", "/nonexistent/migrations", 1);
    ck_assert_int_eq(KHTEST_CTL(&out, "migrate", "--status"), 2);
    ck_assert_ptr_nonnull(strstr(out, "KH_MIGRATIONS_DIR"));
    free(out);
    unsetenv("KH_MIGRATIONS_DIR");
    unsetenv("KH_DATABASE_URL");
    free(conninfo);
    ck_assert(!s_exists(conn, "kh_schema_migrations"));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_broken_migration_rolls_back)
{
    PGconn *conn = khtest_db_empty(DB);
    int n = s_source_count();
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_broken.sql",
               "CREATE TABLE broken_part (x int);\n"
               "INSERT INTO broken_part VALUES (1);\n"
               "SELEC oops;\n");
    s_write_in(dir, "901_after.sql", "CREATE TABLE after_broken (x int);\n");
    kh_error_t err;
    kh_error_clear(&err);
    s_seen_t seen = {0};
    int rc = kh_migrate_apply(conn, dir, s_count, &seen, &err);
    ck_assert_int_eq(rc, -1);
    ck_assert_int_eq(err.code, KH_E_DB);
    ck_assert_msg(s_ends_with(err.path, "/900_broken.sql"), "path %s",
                  err.path);
    ck_assert_int_eq(err.line, 3);
    ck_assert_ptr_nonnull(strstr(err.message, "42601"));
    /* The migrations before it stay applied; it leaves nothing behind;
     * the ones after it are not tried. */
    ck_assert_int_eq(seen.calls, n);
    ck_assert_int_eq(s_recorded(conn), n);
    ck_assert(!s_exists(conn, "broken_part"));
    ck_assert(!s_exists(conn, "after_broken"));
    ck_assert_int_eq(s_int(conn, "SELECT count(*) FROM kh_schema_migrations "
                                 "WHERE version = 900"),
                     0);
    ck_assert_int_eq(PQtransactionStatus(conn), PQTRANS_IDLE);

    /* A runtime failure rolls back the same way. */
    s_write_in(dir, "900_broken.sql",
               "CREATE TABLE broken_part (x int);\nSELECT 1 / 0;\n");
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_DB);
    ck_assert(!s_exists(conn, "broken_part"));

    /* Fixed, it applies: a failed file was never recorded. */
    s_write_in(dir, "900_broken.sql", "CREATE TABLE broken_part (x int);\n");
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), 2);
    ck_assert(s_exists(conn, "broken_part"));
    ck_assert(s_exists(conn, "after_broken"));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_transaction_control_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_commit.sql",
               "CREATE TABLE committed_alone (x int);\nCOMMIT;\n");
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert(s_ends_with(err.path, "/900_commit.sql"));
    ck_assert_int_eq(err.line, 2);
    ck_assert_msg(strncmp(err.message, "COMMIT: ", 8) == 0, "%s", err.message);
    /* Found before anything ran: neither the migrations before it nor
     * its own first statement (which the COMMIT would have kept). */
    ck_assert_int_eq(s_recorded(conn), 0);
    ck_assert(!s_exists(conn, "committed_alone"));

    /* Every statement that starts or ends a transaction, in any case. */
    static const char *const refused[] = {
        "begin;\nCREATE TABLE t (x int);\n",
        "START TRANSACTION;\n",
        "CREATE TABLE t (x int);\nROLLBACK",
        "CREATE TABLE t (x int); End;\n",
        "ABORT;\n",
        "PREPARE TRANSACTION 'x';\n",
        "COMMIT PREPARED 'x';\n",
        "CREATE TABLE t (x int); /* a comment */ rollback;\n",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql BEGIN ATOMIC END;\n"
        "COMMIT;\n",
    };
    for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
        s_write_in(dir, "900_commit.sql", refused[i]);
        kh_error_clear(&err);
        ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
        ck_assert_msg(err.code == KH_E_CONFIG &&
                          strstr(err.message, "transaction control"),
                      "%s: %s", refused[i], err.message);
    }
    ck_assert_int_eq(s_recorded(conn), 0);

    /* The same words where they control no transaction: in comments,
     * strings, quoted names, a DO block, a function body of BEGIN ATOMIC
     * ... END, and ROLLBACK TO a savepoint. */
    s_write_in(dir, "900_commit.sql",
               "-- COMMIT; here is a comment\n"
               "/* BEGIN; /* nested */ COMMIT; */\n"
               "CREATE TABLE \"commit\" (\"begin\" text DEFAULT 'COMMIT;');\n"
               "INSERT INTO \"commit\" VALUES (E'it\\'s; COMMIT;');\n"
               "DO $$ BEGIN PERFORM 1; END $$;\n"
               "DO $body$ BEGIN RAISE NOTICE 'x'; END $body$;\n"
               "CREATE FUNCTION kh_atomic() RETURNS int LANGUAGE sql\n"
               "BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; END;\n"
               "CREATE FUNCTION kh_empty() RETURNS void LANGUAGE sql\n"
               "BEGIN ATOMIC END;\n"
               "SAVEPOINT s; ROLLBACK TO s; RELEASE s;\n");
    kh_error_clear(&err);
    ck_assert_msg(kh_migrate_apply(conn, dir, NULL, NULL, &err) ==
                      s_source_count() + 1,
                  "%s at line %d", err.message, err.line);
    ck_assert(s_exists(conn, "\"commit\""));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

START_TEST(test_out_of_order_refused)
{
    PGconn *conn = khtest_db_empty(DB);
    char *dir = s_copy_migrations();
    s_write_in(dir, "902_later.sql", "CREATE TABLE later (x int);\n");
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_ge(kh_migrate_apply(conn, dir, NULL, NULL, &err), 1);
    s_write_in(dir, "901_earlier.sql", "CREATE TABLE earlier (x int);\n");
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert(s_ends_with(err.path, "/901_earlier.sql"));
    ck_assert(!s_exists(conn, "earlier"));
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

typedef struct {
    const char *dir;
    int rc;
    kh_error_t err;
} s_migrator_t;

static void *s_migrator(void *arg)
{
    s_migrator_t *m = arg;
    char *conninfo = khtest_db_conninfo(DB);
    PGconn *conn = kh_db_connect(conninfo, &m->err);
    free(conninfo);
    m->rc = conn ? kh_migrate_apply(conn, m->dir, NULL, NULL, &m->err) : -1;
    PQfinish(conn);
    return NULL;
}

START_TEST(test_concurrent_migrators)
{
    PGconn *conn = khtest_db_empty(DB);
    int n = s_source_count();
    char *dir = s_copy_migrations();
    s_write_in(dir, "900_slow.sql",
               "SELECT pg_sleep(0.3);\nCREATE TABLE slow_one (x int);\n");
    s_write_in(dir, "901_slow.sql",
               "SELECT pg_sleep(0.3);\nCREATE TABLE slow_two (x int);\n");
    s_migrator_t a = {.dir = dir}, b = {.dir = dir};
    pthread_t ta, tb;
    ck_assert_int_eq(pthread_create(&ta, NULL, s_migrator, &a), 0);
    ck_assert_int_eq(pthread_create(&tb, NULL, s_migrator, &b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    ck_assert_msg(a.rc >= 0, "first migrator: %s", a.err.message);
    ck_assert_msg(b.rc >= 0, "second migrator: %s", b.err.message);
    ck_assert_int_eq(a.rc + b.rc, n + 2);
    ck_assert_int_eq(s_recorded(conn), n + 2);
    khtest_rmtree(dir);
    free(dir);
    PQfinish(conn);
}
END_TEST

/* Whether role has privilege on relation. */
static bool s_may(PGconn *conn, const char *role, const char *relation,
                  const char *privilege)
{
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT has_table_privilege('%s', '%s', '%s')",
             role, relation, privilege);
    char *v = khtest_db_value(conn, sql);
    bool may = v && strcmp(v, "t") == 0;
    free(v);
    return may;
}

/* Run ketenhubctl with args; fails the test unless it exits 0. */
static void s_ctl_ok(const char *const *args)
{
    char *out = NULL;
    int rc = khtest_ctl(&out, args);
    ck_assert_msg(rc == 0, "%s %s: exit %d: %s", args[0], args[1], rc, out);
    free(out);
}

#define S_CTL_OK(...) s_ctl_ok((const char *const[]){__VA_ARGS__, NULL})

/* A hub in service before migration 016 (partner_keys): partners, one of
 * them revoked, and a sealed, signed trail. Upgrading it keeps every key,
 * admits only the active partners' keys, gives the services' roles what
 * they need of partner_keys and no more, and leaves the trail intact. */
/* Apply the migrations numbered below first (a copy of the directory
 * without the others) to conn; returns how many. */
static int s_apply_below(PGconn *conn, const char *first)
{
    char *dir = s_copy_migrations();
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    int before = 0;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.' && strcmp(e->d_name, first) >= 0) {
            char path[4096];
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            ck_assert_int_eq(unlink(path), 0);
        } else if (e->d_name[0] != '.')
            before++;
    closedir(d);
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert_int_eq(kh_migrate_apply(conn, dir, NULL, NULL, &err), before);
    khtest_rmtree(dir);
    free(dir);
    return before;
}

START_TEST(test_upgrade_to_partner_keys)
{
    PGconn *conn = khtest_db_empty(DB);
    int before = s_apply_below(conn, "016");
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert(!s_exists(conn, "partner_keys"));

    khtest_db_exec(conn,
                   "INSERT INTO partners (id, display_name, kind,"
                   " curve_public_key, created_at, revoked_at) VALUES"
                   " ('veilig-thuis', 'VT', 'veilig_thuis', repeat('a', 40),"
                   "  now() - interval '2 days', NULL),"
                   " ('oud-meldpunt', 'Oud', 'municipality', repeat('b', 40),"
                   "  now() - interval '3 days', now() - interval '1 day')",
                   0, NULL);
    /* Their events, as the ketenhubctl of that release wrote them (the
     * actor named by the client: before 025). */
    khtest_db_exec(conn,
                   "INSERT INTO audit_events (actor_kind, actor_id, action,"
                   " partner_id, outcome, origin_service, origin_peer) VALUES"
                   " ('admin', 'root', 'partner.added', 'veilig-thuis', 'ok',"
                   "  'ketenhubctl', 'hub-1'),"
                   " ('admin', 'root', 'partner.revoked', 'oud-meldpunt', 'ok',"
                   "  'ketenhubctl', 'hub-1')",
                   0, NULL);
    char *keys = khtest_tmpdir();
    char *conninfo = khtest_db_conninfo(DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    char *secret = strdup(khtest_path(keys, "hub-audit.key"));
    char *public = strdup(khtest_path(keys, "hub-audit.pub"));
    S_CTL_OK("audit", "keygen", "--out", keys);
    S_CTL_OK("audit", "seal", "--key", secret, "--checkpoint");
    char *trail = khtest_db_value(conn, "SELECT string_agg(s.hash::text, ','"
                                        " ORDER BY s.seq) FROM audit_seals s");

    /* The release's migrations: 016 and after, each once. */
    s_seen_t seen = {0};
    int rc =
        kh_migrate_apply(conn, khtest_src("migrations"), s_count, &seen, &err);
    ck_assert_msg(rc == s_source_count() - before, "applied %d: %s %s", rc,
                  err.path, err.message);
    ck_assert_int_eq(
        kh_migrate_apply(conn, khtest_src("migrations"), NULL, NULL, &err), 0);

    /* Every key, the revoked partner's too, as each partner's current. */
    ck_assert_int_eq(s_int(conn,
                           "SELECT count(*) FROM partner_keys k JOIN partners p"
                           " ON p.id = k.partner_id AND p.curve_public_key ="
                           " k.curve_public_key AND k.added_at = p.created_at"
                           " AND k.expires_at IS NULL"),
                     2);
    /* Only the active partner's key admits anyone. */
    char *admitted = khtest_db_value(
        conn,
        "SELECT string_agg(partner_id, ',') FROM (" KH_PARTNER_KEYS_SQL ") a");
    ck_assert_str_eq(admitted, "veilig-thuis");
    free(admitted);

    /* The services read partner_keys and change nothing in it; the audit
     * service and auditors do not see it; administrators rotate. */
    const char *readers[] = {"ketenhub_intake", "ketenhub_routing",
                             "ketenhub_notification"};
    const char *changes[] = {"INSERT", "UPDATE", "DELETE", "TRUNCATE"};
    for (size_t i = 0; i < 3; i++) {
        ck_assert_msg(s_may(conn, readers[i], "partner_keys", "SELECT"), "%s",
                      readers[i]);
        for (size_t j = 0; j < 4; j++)
            ck_assert_msg(!s_may(conn, readers[i], "partner_keys", changes[j]),
                          "%s %s", readers[i], changes[j]);
    }
    ck_assert(!s_may(conn, "ketenhub_audit", "partner_keys", "SELECT"));
    ck_assert(!s_may(conn, "ketenhub_auditor", "partner_keys", "SELECT"));
    ck_assert(!s_may(conn, "public", "partner_keys", "SELECT"));
    ck_assert(!s_may(conn, "ketenhub_admin", "partner_keys", "DELETE"));
    /* Of a key, an administrator changes only when it ends (018). */
    const char *columns[] = {"curve_public_key", "partner_id", "added_at"};
    for (size_t i = 0; i < 3; i++) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT has_column_privilege('ketenhub_admin',"
                 " 'partner_keys', '%s', 'UPDATE')::int",
                 columns[i]);
        ck_assert_msg(s_int(conn, sql) == 0, "admin may update %s", columns[i]);
    }
    ck_assert_int_eq(s_int(conn, "SELECT has_column_privilege("
                                 "'ketenhub_admin', 'partner_keys',"
                                 " 'expires_at', 'UPDATE')::int"),
                     1);

    khtest_db_exec(conn, "SET ROLE ketenhub_intake", 0, NULL);
    ck_assert_int_eq(
        s_int(conn, "SELECT count(*) FROM (" KH_PARTNER_KEYS_SQL ") a"), 1);
    khtest_db_exec(conn, "RESET ROLE", 0, NULL);

    khtest_db_exec(conn, "BEGIN", 0, NULL);
    khtest_db_exec(conn, "SET LOCAL ROLE ketenhub_admin", 0, NULL);
    char previous[KH_PARTNER_KEY_LEN + 1], until[40];
    char fresh[KH_PARTNER_KEY_LEN + 1];
    memset(fresh, 'c', KH_PARTNER_KEY_LEN);
    fresh[KH_PARTNER_KEY_LEN] = '\0';
    rc = kh_partner_rotate(conn, "veilig-thuis", fresh, 3600, previous, until,
                           &err);
    ck_assert_msg(rc == 0, "rotate: %s", err.message);
    ck_assert_int_eq(kh_audit_admin(conn, "partner.key_rotated", "veilig-thuis",
                                    "ketenhubctl", &err),
                     0);
    khtest_db_exec(conn, "COMMIT", 0, NULL);
    ck_assert_int_eq(
        s_int(conn, "SELECT count(*) FROM (" KH_PARTNER_KEYS_SQL ") a"), 2);

    /* The old trail is as it was, and the new event seals and verifies. */
    char *after = khtest_db_value(conn, "SELECT string_agg(s.hash::text, ','"
                                        " ORDER BY s.seq) FROM audit_seals s");
    ck_assert_str_eq(after, trail);
    S_CTL_OK("audit", "seal", "--key", secret, "--checkpoint");
    S_CTL_OK("audit", "verify", "--public-key", public);

    free(after);
    free(trail);
    free(secret);
    free(public);
    free(conninfo);
    khtest_rmtree(keys);
    free(keys);
    PQfinish(conn);
}
END_TEST

/* sql as role (SET LOCAL ROLE, rolled back): its SQLSTATE, "" when it
 * ran. */
static char *s_as(PGconn *conn, const char *role, const char *sql)
{
    static char state[6];
    char set[128];
    snprintf(set, sizeof set, "SET LOCAL ROLE %s", role);
    khtest_db_exec(conn, "BEGIN", 0, NULL);
    khtest_db_exec(conn, set, 0, NULL);
    PGresult *res = PQexec(conn, sql);
    const char *code = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    snprintf(state, sizeof state, "%s", code ? code : "");
    PQclear(res);
    PQclear(PQexec(conn, "ROLLBACK"));
    return state;
}

/* Auditors tie a key the trail names (actor "key:KEY" of a refused
 * handshake) to its partner, and see when each key admitted it, through
 * a view (023); the tables stay closed to them. */
START_TEST(test_auditor_reads_partner_keys)
{
    PGconn *conn = khtest_db_fresh(DB);
    khtest_db_exec(conn,
                   "INSERT INTO partners (id, display_name, kind,"
                   " curve_public_key) VALUES ('avim', 'AVIM', 'police',"
                   " repeat('a', 39) || '1')",
                   0, NULL);
    khtest_db_exec(conn,
                   "UPDATE partners SET curve_public_key = repeat('b', 39)"
                   " || '1' WHERE id = 'avim'",
                   0, NULL);
    const char *view = "SELECT partner_id, curve_public_key, added_at,"
                       " expires_at, revoked_at FROM audit_partner_keys";
    ck_assert_str_eq(s_as(conn, "ketenhub_auditor", view), "");
    ck_assert_str_eq(s_as(conn, "ketenhub_admin", view), "");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_auditor", "SELECT 1 FROM partner_keys"), "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_auditor", "SELECT 1 FROM partners"),
                     "42501");
    char *keys = khtest_db_value(
        conn, "SELECT string_agg(left(curve_public_key, 1) || ':' ||"
              " (expires_at IS NULL)::text, ',' ORDER BY added_at,"
              " expires_at NULLS LAST) FROM audit_partner_keys"
              " WHERE partner_id = 'avim'");
    ck_assert_str_eq(keys, "a:false,b:true");
    free(keys);
    PQfinish(conn);
}
END_TEST

/* Intake reads the state of deliveries, as STATUS does, and never a
 * payload; routing claims referrals and sets their state, and changes
 * nothing else of them (021); notification reads no referral (022). */
START_TEST(test_services_hold_least_privilege)
{
    PGconn *conn = khtest_db_fresh(DB);
    ck_assert_str_eq(
        s_as(conn, "ketenhub_intake",
             "SELECT r.state, coalesce((SELECT json_agg(json_strip_nulls("
             "json_build_object('delivery_id', d.id, 'partner', d.partner_id,"
             " 'priority', d.priority, 'state', d.state, 'updated_at',"
             " d.updated_at, 'escalation_of', (SELECT o.partner_id FROM"
             " deliveries o WHERE o.id = d.escalation_of))) ORDER BY"
             " d.partner_id, d.escalation_of NULLS FIRST) FROM deliveries d"
             " WHERE d.referral_id = r.id), '[]') FROM referrals r"),
        "");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_intake", "SELECT payload FROM deliveries"),
        "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_intake",
                          "SELECT escalation_payload FROM deliveries"),
                     "42501");
    /* Of a stored referral intake reads what a resubmission's first
     * answer and STATUS say, never its payload (022). */
    ck_assert_str_eq(s_as(conn, "ketenhub_intake",
                          "SELECT id, payload_hash, accepted_at, state"
                          " FROM referrals WHERE partner_id = 'x'"
                          " AND idempotency_key = 'k'"),
                     "");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_intake", "SELECT payload FROM referrals"),
        "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_routing",
                          "SELECT id, payload FROM referrals WHERE state ="
                          " 'accepted' FOR UPDATE SKIP LOCKED"),
                     "");
    ck_assert_str_eq(s_as(conn, "ketenhub_routing",
                          "WITH r AS (SELECT gen_random_uuid() AS id) UPDATE"
                          " referrals SET state = 'routed' FROM r WHERE"
                          " referrals.id = r.id RETURNING r.*"),
                     "");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_routing", "UPDATE referrals SET payload = NULL"),
        "42501");
    /* It holds a referral back, and lets it go (027); an administrator
     * counts those held (status). */
    ck_assert_str_eq(
        s_as(conn, "ketenhub_routing",
             "UPDATE referrals r SET held_until = now() FROM (SELECT id,"
             " held_until IS NOT NULL AS again FROM referrals WHERE state ="
             " 'accepted' FOR UPDATE) o WHERE r.id = o.id RETURNING o.again"),
        "");
    ck_assert_str_eq(s_as(conn, "ketenhub_routing",
                          "UPDATE referrals SET held_until = NULL"
                          " WHERE state = 'accepted'"),
                     "");
    ck_assert_str_eq(s_as(conn, "ketenhub_admin",
                          "SELECT count(*) FILTER (WHERE held_until > now())"
                          " FROM referrals WHERE state = 'accepted'"),
                     "");
    /* Routing writes deliveries, with the ON CONFLICT of its insert, and
     * reads none of their payloads (022). */
    ck_assert_str_eq(
        s_as(
            conn, "ketenhub_routing",
            "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
            " payload, payload_hash, rules_version, escalate_to,"
            " escalation_payload, escalation_payload_hash)"
            " SELECT * FROM (VALUES (NULL::uuid, NULL::uuid, NULL::text,"
            " NULL::text, NULL::bytea, NULL::bytea, NULL::text, NULL::text,"
            " NULL::bytea, NULL::bytea)) v WHERE false"
            " ON CONFLICT (referral_id, partner_id, escalation_of) DO NOTHING"),
        "");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_routing", "SELECT payload FROM deliveries"),
        "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_routing",
                          "SELECT escalation_payload FROM deliveries"),
                     "42501");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_routing", "UPDATE referrals SET partner_id = 'x'"),
        "42501");
    /* Notification: what its claims, ACKs, NACKs and sweeps set. */
    ck_assert_str_eq(
        s_as(conn, "ketenhub_notification",
             "UPDATE deliveries SET state = 'delivered', attempts = 1,"
             " sent_at = now(), next_attempt_at = now(), acked_at = now(),"
             " dead_reason = NULL, escalated_at = now(), updated_at = now()"
             " WHERE id IN (SELECT id FROM deliveries WHERE state = 'pending'"
             " FOR UPDATE SKIP LOCKED)"),
        "");
    ck_assert_str_eq(s_as(conn, "ketenhub_notification",
                          "UPDATE deliveries SET payload = NULL"),
                     "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_notification",
                          "UPDATE deliveries SET partner_id = 'x'"),
                     "42501");
    /* Notification sends deliveries and reads no referral (022). */
    ck_assert_str_eq(
        s_as(conn, "ketenhub_notification", "SELECT id FROM referrals"),
        "42501");
    PQfinish(conn);
}
END_TEST

/* The roles that write audit events choose what an event says, never
 * its seq or its time (024): an event dated in the past, or a seq taken
 * ahead of the sequence (on which every later insert failed), is refused
 * them; an event as they write it passes. */
START_TEST(test_writers_choose_no_seq_nor_time_of_events)
{
    PGconn *conn = khtest_db_fresh(DB);
    const char *writers[] = {"ketenhub_intake", "ketenhub_routing",
                             "ketenhub_notification", "ketenhub_admin"};
    for (size_t r = 0; r < sizeof writers / sizeof writers[0]; r++) {
        /* The administrators' actor is theirs by default (025). */
        ck_assert_str_eq(
            s_as(conn, writers[r],
                 strcmp(writers[r], "ketenhub_admin") == 0
                     ? "INSERT INTO audit_events (action, outcome,"
                       " origin_service) VALUES ('rules.reloaded', 'ok',"
                       " 'test')"
                     : "INSERT INTO audit_events (actor_kind, actor_id,"
                       " action, outcome, origin_service) VALUES"
                       " ('service', 'x', 'rules.reloaded', 'ok', 'test')"),
            "");
        ck_assert_str_eq(
            s_as(conn, writers[r],
                 "INSERT INTO audit_events (seq, actor_kind, actor_id,"
                 " action, outcome, origin_service) VALUES (1000000,"
                 " 'service', 'x', 'rules.reloaded', 'ok', 'test')"),
            "42501");
        ck_assert_str_eq(
            s_as(conn, writers[r],
                 "INSERT INTO audit_events (at, actor_kind, actor_id,"
                 " action, outcome, origin_service) VALUES ('2020-01-01',"
                 " 'service', 'x', 'rules.reloaded', 'ok', 'test')"),
            "42501");
    }
    PQfinish(conn);
}
END_TEST

/* An administrator's or an auditor's event names the login that wrote
 * it, never a name or kind the client gives (025): an administrator may
 * write neither actor_kind nor actor_id and gets admin and the login by
 * their defaults; audit_record_access records the login, of the kind its
 * group role makes it, and puts the name it was given before the host in
 * origin_peer. A login with white space in its name is named with '_'. */
START_TEST(test_admin_and_auditor_events_name_their_login)
{
    PGconn *conn = khtest_db_fresh(DB);
    PGconn *admin =
        khtest_db_login(conn, DB, "kh_test_m_admin", "ketenhub_admin");
    PGconn *auditor =
        khtest_db_login(conn, DB, "kh test m auditor", "ketenhub_auditor");
    const char *const forged[] = {
        "INSERT INTO audit_events (actor_id, action, outcome,"
        " origin_service) VALUES ('mallory', 'partner.added', 'ok', 'test')",
        "INSERT INTO audit_events (actor_kind, action, outcome,"
        " origin_service) VALUES ('partner', 'delivery.acked', 'ok', 'test')"};
    for (size_t i = 0; i < sizeof forged / sizeof forged[0]; i++) {
        PGresult *res = PQexec(admin, forged[i]);
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        ck_assert_msg(state && strcmp(state, "42501") == 0, "%s: %s", forged[i],
                      PQresultErrorMessage(res));
        PQclear(res);
    }
    PGresult *res =
        PQexec(admin, "INSERT INTO audit_events (action, outcome,"
                      " origin_service, origin_peer) VALUES"
                      " ('partner.added', 'ok', 'test', 'x@y');"
                      " SELECT audit_record_access('trail.queried', 'auditor',"
                      " NULL, 'ok', NULL, NULL, 'test', 'x@y')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);
    res = PQexec(auditor, "SELECT audit_record_access('trail.queried',"
                          " 'admin', 'mallory', 'ok', NULL, NULL, 'test',"
                          " 'host-a'), audit_record_access('trail.exported',"
                          " 'auditor', NULL, 'ok', NULL, NULL, 'test',"
                          " 'jan@host-b')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    PQclear(res);
    char *got = khtest_db_value(
        conn, "SELECT string_agg(action || ' ' || actor_kind || ':' ||"
              " actor_id || ' ' || origin_peer, ', ' ORDER BY seq)"
              " FROM audit_events");
    ck_assert_str_eq(got, "partner.added admin:kh_test_m_admin x@y, "
                          "trail.queried admin:kh_test_m_admin x@y, "
                          "trail.queried auditor:kh_test_m_auditor "
                          "mallory@host-a, trail.exported "
                          "auditor:kh_test_m_auditor jan@host-b");
    free(got);
    PQfinish(admin);
    PQfinish(auditor);
    PQfinish(conn);
}
END_TEST

/* audit_record_access runs as the owner and looks up nothing in a schema
 * its caller writes (028): an auditor's temporary audit_events, with a
 * trigger that would run as the owner, neither takes the access event
 * nor sees its trigger fire; the event lands in the trail. */
START_TEST(test_access_event_is_not_captured_by_a_temporary_table)
{
    PGconn *conn = khtest_db_fresh(DB);
    PGconn *auditor =
        khtest_db_login(conn, DB, "kh_test_m_temp", "ketenhub_auditor");
    PGresult *res = PQexec(
        auditor,
        "CREATE TEMP TABLE audit_events (seq bigint, actor_kind text,"
        " actor_id text, action text, outcome text, reason_code text,"
        " query_filter text, origin_service text, origin_peer text);"
        " CREATE TEMP TABLE ran_as (who text);"
        " CREATE FUNCTION pg_temp.capture() RETURNS trigger LANGUAGE plpgsql"
        " AS $$ BEGIN INSERT INTO pg_temp.ran_as VALUES (current_user::text);"
        " RETURN NULL; END $$;"
        " CREATE TRIGGER capture BEFORE INSERT ON pg_temp.audit_events"
        " FOR EACH ROW EXECUTE FUNCTION pg_temp.capture();"
        " GRANT ALL ON pg_temp.audit_events, pg_temp.ran_as TO PUBLIC;"
        " SELECT audit_record_access('trail.queried', 'auditor', NULL,"
        " 'ok', NULL, NULL, 'test', 'x@y')");
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK, "%s",
                  PQresultErrorMessage(res));
    PQclear(res);
    ck_assert_int_eq(
        khtest_db_count(auditor, "SELECT count(*) FROM pg_temp.ran_as"), 0);
    ck_assert_int_eq(khtest_db_count(auditor, "SELECT count(*)"
                                              " FROM pg_temp.audit_events"),
                     0);
    ck_assert_int_eq(khtest_db_count(conn,
                                     "SELECT count(*) FROM public.audit_events"
                                     " WHERE action = 'trail.queried'"
                                     " AND actor_id = 'kh_test_m_temp'"),
                     1);
    PQfinish(auditor);
    PQfinish(conn);
}
END_TEST

/* Administrators read no payload (022): not a referral's, not a
 * delivery's, not an escalation copy's, not even in a condition; they
 * read each payload's size, and their commands' statements run: list,
 * show and retry of dead letters, and purge, which writes NULL over
 * payloads it may not read. Nor do the audit service, the auditors or
 * the owner of their views read a payload. */
/* A stored payload is only ever purged: no role, the owner's included,
 * writes other bytes over it (022); NULL it may write. */
START_TEST(test_payloads_are_only_purged)
{
    PGconn *conn = khtest_db_fresh(DB);
    zcert_t *cert = zcert_new();
    khtest_register_partner(conn, "veilig-thuis", "veilig_thuis", true,
                            zcert_public_txt(cert));
    zcert_destroy(&cert);
    char referral[37], payload[128], hash[65], delivery[37];
    khtest_routed_referral(conn, 1, referral, payload, hash);
    kh_uuid_new(delivery);
    const char *params[] = {delivery, referral, hash};
    khtest_db_exec(conn,
                   "INSERT INTO deliveries (id, referral_id, partner_id,"
                   " priority, payload, payload_hash, rules_version,"
                   " escalate_to, escalation_payload, escalation_payload_hash)"
                   " VALUES ($1, $2, 'veilig-thuis', 'urgent', '\\x7b7d',"
                   " decode($3, 'hex'), 'v1', 'veilig-thuis', '\\x7b7d',"
                   " decode($3, 'hex'))",
                   3, params);
    static const char *const rewrites[] = {
        "UPDATE referrals SET payload = '\\x7b7d'",
        "UPDATE deliveries SET payload = '\\x7b2278223a317d'",
        "UPDATE deliveries SET escalation_payload = '\\x00'"};
    for (size_t i = 0; i < sizeof rewrites / sizeof rewrites[0]; i++) {
        PGresult *res = PQexec(conn, rewrites[i]);
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        ck_assert_msg(state && strcmp(state, "42501") == 0, "%s: %s",
                      rewrites[i], PQresultErrorMessage(res));
        PQclear(res);
    }
    ck_assert_str_eq(
        s_as(conn, "ketenhub_admin", "UPDATE referrals SET payload = '\\x00'"),
        "42501");
    /* The same bytes again change nothing, and a purge goes through. */
    khtest_db_exec(conn, "UPDATE deliveries SET payload = payload", 0, NULL);
    khtest_db_exec(conn,
                   "UPDATE deliveries SET payload = NULL,"
                   " escalation_payload = NULL",
                   0, NULL);
    khtest_db_exec(conn, "UPDATE referrals SET payload = NULL", 0, NULL);
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM referrals"
                                           " WHERE payload_bytes IS NULL"),
                     1);
    PQfinish(conn);
}
END_TEST

START_TEST(test_admin_reads_no_payload)
{
    PGconn *conn = khtest_db_fresh(DB);
    const char *payload_reads[] = {
        "SELECT payload FROM referrals",
        "SELECT payload FROM deliveries",
        "SELECT escalation_payload FROM deliveries",
        "SELECT id FROM referrals WHERE payload IS NOT NULL",
        "SELECT octet_length(payload) FROM deliveries",
        "SELECT id FROM deliveries WHERE escalation_payload IS NULL",
        "SELECT * FROM deliveries",
        "UPDATE referrals SET payload = NULL RETURNING payload",
        "UPDATE deliveries SET payload = NULL WHERE payload IS NOT NULL"};
    const char *roles[] = {"ketenhub_admin", "ketenhub_auditor",
                           "ketenhub_audit", "ketenhub_owner"};
    for (size_t r = 0; r < sizeof roles / sizeof *roles; r++)
        for (size_t i = 0; i < sizeof payload_reads / sizeof *payload_reads;
             i++)
            ck_assert_msg(
                strcmp(s_as(conn, roles[r], payload_reads[i]), "42501") == 0,
                "%s may run %s", roles[r], payload_reads[i]);
    /* What the auditors' views read of deliveries, the owner reads. */
    ck_assert_str_eq(s_as(conn, "ketenhub_auditor",
                          "SELECT id, referral_id, partner_id"
                          " FROM audit_delivery_ids"),
                     "");
    /* Nor does an administrator change what a delivery is. */
    ck_assert_str_eq(
        s_as(conn, "ketenhub_admin", "UPDATE deliveries SET partner_id = 'x'"),
        "42501");
    ck_assert_str_eq(s_as(conn, "ketenhub_admin",
                          "UPDATE deliveries SET payload_hash = sha256('x')"),
                     "42501");
    ck_assert_str_eq(
        s_as(conn, "ketenhub_admin", "UPDATE referrals SET partner_id = 'x'"),
        "42501");
    /* What the commands read and write (tools/ctl: deadletters list,
     * show and retry, purge, status). */
    const char *admin_runs[] = {
        "SELECT id, referral_id, partner_id, priority, state, attempts,"
        " dead_reason, escalate_to, escalation_of, created_at, updated_at,"
        " sent_at, acked_at, next_attempt_at, escalated_at, rules_version,"
        " payload_hash, payload_bytes, escalation_payload_bytes"
        " FROM deliveries WHERE state = 'dead'",
        "SELECT d.id, d.payload_bytes IS NULL FROM deliveries d"
        " JOIN partners p ON p.id = d.partner_id FOR UPDATE OF d",
        "UPDATE deliveries SET state = 'pending', attempts = 0,"
        " next_attempt_at = now(), age_from = now(), dead_reason = NULL,"
        " updated_at = now() WHERE state = 'dead'"
        " RETURNING id, referral_id, partner_id, payload_hash, rules_version",
        "SELECT r.id, r.payload_hash FROM referrals r WHERE"
        " r.payload_bytes IS NOT NULL AND r.state IN ('routed', 'unroutable')"
        " AND r.accepted_at < now() FOR NO KEY UPDATE OF r SKIP LOCKED",
        "SELECT referral_id FROM deliveries FOR NO KEY UPDATE SKIP LOCKED",
        "UPDATE referrals SET payload = NULL WHERE payload_bytes IS NOT NULL"
        " RETURNING id",
        "UPDATE deliveries SET payload = NULL, escalation_payload = NULL"
        " WHERE payload_bytes IS NOT NULL"
        " OR escalation_payload_bytes IS NOT NULL RETURNING id",
        "SELECT count(*) FROM deliveries WHERE escalated_at IS NOT NULL"
        " AND acked_at IS NULL AND dead_reason IS NULL"};
    for (size_t i = 0; i < sizeof admin_runs / sizeof *admin_runs; i++)
        ck_assert_msg(strcmp(s_as(conn, "ketenhub_admin", admin_runs[i]), "") ==
                          0,
                      "ketenhub_admin may not run %s", admin_runs[i]);
    PQfinish(conn);
}
END_TEST

/* A hub upgraded to migration 022 with payloads, a purged referral and an
 * escalation payload: each payload's size is there, NULL for what was
 * purged or never was, and it follows the payload when purge writes NULL
 * over it as the administrator. */
START_TEST(test_upgrade_to_admin_no_payloads)
{
    PGconn *conn = khtest_db_empty(DB);
    s_apply_below(conn, "022");
    khtest_db_exec(conn,
                   "INSERT INTO partners (id, display_name, kind,"
                   " curve_public_key) VALUES"
                   " ('avim', 'AVIM', 'police', repeat('a', 40)),"
                   " ('zorgcoordinator', 'ZC', 'zorgcoordinator',"
                   "  repeat('b', 40)),"
                   " ('veilig-thuis', 'VT', 'veilig_thuis', repeat('c', 40))",
                   0, NULL);
    char r1[37], r2[37], payload[128], hash[65];
    khtest_routed_referral(conn, 1, r1, payload, hash);
    khtest_routed_referral(conn, 2, r2, payload, hash);
    const char *params[] = {r1, r2};
    khtest_db_exec(conn, "UPDATE referrals SET payload = NULL WHERE id = $1", 1,
                   params + 1);
    khtest_db_exec(
        conn,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalate_to,"
        " escalation_payload, escalation_payload_hash) VALUES"
        " ('00000000-0000-4000-8000-000000000001', $1, 'avim', 'urgent',"
        "  'xxx', sha256('xxx'), 'v', 'zorgcoordinator', 'yyyyy',"
        "  sha256('yyyyy')),"
        " ('00000000-0000-4000-8000-000000000002', $1, 'zorgcoordinator',"
        "  'normal', 'zz', sha256('zz'), 'v', NULL, NULL, NULL),"
        " ('00000000-0000-4000-8000-000000000003', $2, 'veilig-thuis',"
        "  'normal', NULL, sha256('w'), 'v', NULL, NULL, NULL)",
        2, params);
    kh_error_t err;
    int rc = kh_migrate_apply(conn, khtest_src("migrations"), NULL, NULL, &err);
    ck_assert_msg(rc >= 1, "%s %s", err.path, err.message);
    PGresult *res =
        PQexecParams(conn,
                     "SELECT string_agg(coalesce(payload_bytes::text, '-'), ' '"
                     " ORDER BY id = $1 DESC) FROM referrals",
                     1, NULL, params, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    char *refs = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    ck_assert_str_eq(refs, "24 -");
    free(refs);
    char *dels = khtest_db_value(
        conn, "SELECT string_agg(coalesce(payload_bytes::text, '-') || '/' ||"
              " coalesce(escalation_payload_bytes::text, '-'), ' '"
              " ORDER BY id) FROM deliveries");
    ck_assert_str_eq(dels, "3/5 2/- -/-");
    free(dels);
    /* The administrator purges r1, reading no payload. */
    khtest_db_exec(conn, "BEGIN", 0, NULL);
    khtest_db_exec(conn, "SET LOCAL ROLE ketenhub_admin", 0, NULL);
    khtest_db_exec(conn,
                   "WITH refs AS (UPDATE referrals SET payload = NULL"
                   " WHERE id = $1 AND payload_bytes IS NOT NULL RETURNING id)"
                   " UPDATE deliveries d SET payload = NULL,"
                   " escalation_payload = NULL FROM refs"
                   " WHERE d.referral_id = refs.id",
                   1, params);
    khtest_db_exec(conn, "COMMIT", 0, NULL);
    ck_assert_int_eq(s_int(conn, "SELECT count(*) FROM referrals"
                                 " WHERE payload IS NOT NULL"
                                 " OR payload_bytes IS NOT NULL"),
                     0);
    ck_assert_int_eq(s_int(conn, "SELECT count(*) FROM deliveries"
                                 " WHERE payload_bytes IS NOT NULL"
                                 " OR escalation_payload_bytes IS NOT NULL"
                                 " OR payload IS NOT NULL"
                                 " OR escalation_payload IS NOT NULL"),
                     0);
    PQfinish(conn);
}
END_TEST

/* A hub upgraded to migration 020 with escalation copies made before it:
 * each copy names the delivery it was made for (the one whose
 * escalated_at is the copy's created_at), the partner's own delivery of
 * another referral names none, and after 020 a second copy beside the
 * partner's own delivery is allowed, a second own delivery is not. */
START_TEST(test_upgrade_to_escalation_copies)
{
    PGconn *conn = khtest_db_empty(DB);
    s_apply_below(conn, "020");
    khtest_db_exec(conn,
                   "INSERT INTO partners (id, display_name, kind,"
                   " curve_public_key) VALUES"
                   " ('avim', 'AVIM', 'police', repeat('a', 40)),"
                   " ('zorgcoordinator', 'ZC', 'zorgcoordinator',"
                   "  repeat('b', 40)),"
                   " ('veilig-thuis', 'VT', 'veilig_thuis', repeat('c', 40))",
                   0, NULL);
    char r1[37], r2[37], payload[128], hash[65];
    khtest_routed_referral(conn, 1, r1, payload, hash);
    khtest_routed_referral(conn, 2, r2, payload, hash);
    const char *params[] = {r1, r2};
    /* r1: avim's urgent delivery escalated at 10:00, the copy made then;
     * r2: the zorgcoordinator's own delivery, routed at 10:00 too but of
     * a referral nothing escalated. */
    khtest_db_exec(
        conn,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalate_to,"
        " escalation_payload, escalation_payload_hash, escalated_at,"
        " created_at) VALUES"
        " ('00000000-0000-4000-8000-000000000001', $1, 'avim', 'urgent',"
        "  'x', sha256('x'), 'v', 'zorgcoordinator', 'y', sha256('y'),"
        "  '2026-11-30 10:00+00', '2026-11-30 09:45+00'),"
        " ('00000000-0000-4000-8000-000000000002', $1, 'zorgcoordinator',"
        "  'urgent', 'y', sha256('y'), 'v', NULL, NULL, NULL, NULL,"
        "  '2026-11-30 10:00+00'),"
        " ('00000000-0000-4000-8000-000000000003', $2, 'zorgcoordinator',"
        "  'normal', 'z', sha256('z'), 'v', NULL, NULL, NULL, NULL,"
        "  '2026-11-30 10:00+00')",
        2, params);
    kh_error_t err;
    int rc = kh_migrate_apply(conn, khtest_src("migrations"), NULL, NULL, &err);
    ck_assert_msg(rc >= 1, "%s %s", err.path, err.message);
    char *named = khtest_db_value(
        conn, "SELECT string_agg(right(id::text, 1) || '>' ||"
              " coalesce(right(escalation_of::text, 1), '-'), ' ' ORDER BY id)"
              " FROM deliveries");
    ck_assert_str_eq(named, "1>- 2>1 3>-");
    free(named);
    /* Beside its copy of r1, the zorgcoordinator may get its own delivery
     * of r1, once: a second one is refused. */
    khtest_db_exec(
        conn,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version, escalation_of) VALUES"
        " ('00000000-0000-4000-8000-000000000004', $1, 'zorgcoordinator',"
        "  'normal', 'w', sha256('w'), 'v', NULL)",
        1, params);
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
        " payload, payload_hash, rules_version) VALUES"
        " ('00000000-0000-4000-8000-000000000005', $1, 'zorgcoordinator',"
        "  'normal', 'w', sha256('w'), 'v')",
        1, NULL, params, NULL, NULL, 0);
    ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "23505");
    PQclear(res);
    PQfinish(conn);
}
END_TEST

START_TEST(test_db_errors)
{
    PGconn *conn = khtest_db_fresh(DB);
    kh_error_t err;
    kh_error_clear(&err);

    /* A data error quotes the input value; the error record must not. */
    const char *params[] = {"Jansen-secret-value"};
    PGresult *res =
        PQexecParams(conn, "SELECT $1::uuid", 1, NULL, params, NULL, NULL, 0);
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_int_eq(kh_db_error(&err, conn, res, "lookup"), -1);
    PQclear(res);
    ck_assert_int_eq(err.code, KH_E_DB);
    ck_assert_ptr_null(strstr(err.message, "secret"));
    ck_assert_ptr_nonnull(strstr(err.message, "22P02"));
    ck_assert_ptr_nonnull(strstr(err.message, "lookup: "));

    /* A unique violation names the constraint, never the key's value. */
    ck_assert_int_eq(
        kh_db_exec(conn, "CREATE TEMP TABLE u (v text UNIQUE)", &err), 0);
    ck_assert_int_eq(
        kh_db_exec(conn, "INSERT INTO u VALUES ('Jansen-secret')", &err), 0);
    const char *dup[] = {"Jansen-secret"};
    res = PQexecParams(conn, "INSERT INTO u VALUES ($1)", 1, NULL, dup, NULL,
                       NULL, 0);
    kh_db_error(&err, conn, res, NULL);
    PQclear(res);
    ck_assert_ptr_null(strstr(err.message, "secret"));
    ck_assert_ptr_nonnull(strstr(err.message, "u_v_key"));

    /* kh_db_exec reports failures; the trail refuses to be rewritten. */
    ck_assert_int_eq(
        kh_db_exec(conn,
                   "INSERT INTO audit_events (actor_kind, actor_id, action, "
                   "outcome, origin_service) VALUES ('service', 'test', "
                   "'rules.reloaded', 'ok', 'test')",
                   &err),
        0);
    ck_assert_int_eq(
        kh_db_exec(conn, "UPDATE audit_events SET outcome = 'failed'", &err),
        -1);
    ck_assert_int_eq(kh_db_exec(conn, "DELETE FROM audit_events", &err), -1);
    ck_assert_int_eq(err.code, KH_E_DB);
    ck_assert_ptr_nonnull(strstr(err.message, "append-only"));

    /* A server that cannot be reached is unavailable (retryable). */
    PGconn *none = kh_db_connect("host=/nonexistent port=1", &err);
    ck_assert_ptr_null(none);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    ck_assert(kh_error_retryable(err.code));

    /* An administrator terminating the session: 57P01, retryable. */
    char *conninfo = khtest_db_conninfo(DB);
    PGconn *victim = kh_db_connect(conninfo, &err);
    free(conninfo);
    ck_assert_ptr_nonnull(victim);
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)",
             PQbackendPID(victim));
    ck_assert_int_eq(kh_db_exec(conn, sql, &err), 0);
    usleep(100 * 1000);
    ck_assert_int_eq(kh_db_exec(victim, "SELECT 1", &err), -1);
    ck_assert_int_eq(err.code, KH_E_UNAVAILABLE);
    PQfinish(victim);

    ck_assert(kh_db_retryable_sqlstate("08006"));
    ck_assert(kh_db_retryable_sqlstate("40001"));
    ck_assert(kh_db_retryable_sqlstate("40P01"));
    ck_assert(kh_db_retryable_sqlstate("57P01"));
    ck_assert(kh_db_retryable_sqlstate("53300"));
    ck_assert(!kh_db_retryable_sqlstate("23505"));
    ck_assert(!kh_db_retryable_sqlstate("42601"));
    ck_assert(!kh_db_retryable_sqlstate(NULL));
    ck_assert(!kh_db_retryable_sqlstate("08"));
    PQfinish(conn);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("migrate");
    TCase *tc = tcase_create("migrate");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_apply_on_empty_database);
    tcase_add_test(tc, test_status);
    tcase_add_test(tc, test_changed_file_refused);
    tcase_add_test(tc, test_renamed_file_refused);
    tcase_add_test(tc, test_missing_file_refused);
    tcase_add_test(tc, test_bad_names_refused);
    tcase_add_test(tc, test_empty_dir_refused);
    tcase_add_test(tc, test_broken_migration_rolls_back);
    tcase_add_test(tc, test_transaction_control_refused);
    tcase_add_test(tc, test_out_of_order_refused);
    tcase_add_test(tc, test_concurrent_migrators);
    tcase_add_test(tc, test_db_errors);
    tcase_add_test(tc, test_upgrade_to_partner_keys);
    tcase_add_test(tc, test_upgrade_to_escalation_copies);
    tcase_add_test(tc, test_services_hold_least_privilege);
    tcase_add_test(tc, test_writers_choose_no_seq_nor_time_of_events);
    tcase_add_test(tc, test_admin_and_auditor_events_name_their_login);
    tcase_add_test(tc, test_access_event_is_not_captured_by_a_temporary_table);
    tcase_add_test(tc, test_admin_reads_no_payload);
    tcase_add_test(tc, test_auditor_reads_partner_keys);
    tcase_add_test(tc, test_payloads_are_only_purged);
    tcase_add_test(tc, test_upgrade_to_admin_no_payloads);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
