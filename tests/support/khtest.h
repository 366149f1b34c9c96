/*
 * Helpers shared by the tests: source-tree paths, the throwaway PostgreSQL
 * cluster of the integration tests (started by the ctest `pg` fixture,
 * scripts/pgtmp.sh, found through $KH_TEST_PG_DIR), temporary directories
 * and running the built binaries.
 *
 * Every helper that cannot do its job fails the current test with
 * ck_abort_msg: a test that needs PostgreSQL fails, it never skips.
 */
#ifndef KHTEST_H_INCLUDED
#define KHTEST_H_INCLUDED

#include <check.h>
#include <czmq.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/* Run every test of suite (and free it); the exit status for main: 0
 * when all passed, 1 otherwise. */
int khtest_run_suite(Suite *suite);

/* Path of a file in the source tree, e.g. khtest_src ("schemas/x.json").
 * Returns a static buffer, overwritten by the next call. */
const char *khtest_src(const char *relative);

/* Connection string of the test cluster's maintenance database
 * ("host=... port=... user=postgres dbname=postgres"), read from
 * $KH_TEST_PG_DIR/env. Static; aborts the test when the variable or the
 * file is missing. */
const char *khtest_pg_conninfo(void);

/* Run scripts/pgtmp.sh COMMAND on the test cluster ($KH_TEST_PG_DIR),
 * with mode after it unless NULL: khtest_pgtmp("down", "fast"),
 * khtest_pgtmp("up", NULL). Returns its exit status (-1 when it could
 * not run); aborts the test when the variable is missing. */
int khtest_pgtmp(const char *command, const char *mode);

/* Connection string for database dbname of the test cluster. The caller
 * frees it. */
char *khtest_db_conninfo(const char *dbname);

/* A connection to database dbname as login user, made on conn (a
 * superuser's) as a member of group unless it exists: roles are
 * cluster-wide, so each test file uses its own names. user may hold white
 * space, never a quote. Caller PQfinish-es. */
PGconn *khtest_db_login(PGconn *conn, const char *dbname, const char *user,
                        const char *group);

/* Drop (with FORCE) and create database dbname ([a-z0-9_]), and return a
 * connection to it without any migration applied. Caller PQfinish-es. */
PGconn *khtest_db_empty(const char *dbname);

/* As khtest_db_empty, then apply all migrations of the source tree. Each
 * test file uses its own dbname, so test files can run side by side. */
PGconn *khtest_db_fresh(const char *dbname);

/* Run a query that must succeed and return its first value as a new
 * string (caller frees), or NULL when it returns no row or NULL. */
char *khtest_db_value(PGconn *conn, const char *sql);

/* Parse JSON written with single quotes (for readable C literals);
 * duplicate keys refused, any value allowed. Aborts the test on bad JSON. */
json_t *khtest_json(const char *text);

/* Run sql with nparams text parameters (none: params NULL, and sql may
 * hold several statements); fails the test unless it succeeds. */
void khtest_db_exec(PGconn *conn, const char *sql, int nparams,
                    const char *const *params);

/* Make n strangers (DEALERs with made-up CURVE keys, never registered,
 * connected to endpoint for the hub of the certificate at hub_cert), each
 * sending one frame, and wait until the hub has refused every one's
 * handshake, seen by each stranger's ZMQ_EVENT_HANDSHAKE_FAILED_AUTH, or
 * timeout_ms have passed; then destroy them. Returns how many were refused;
 * *elapsed_ms is the time from the first connection to the last refusal. */
int khtest_strangers_refused(const char *hub_cert, const char *endpoint, int n,
                             int timeout_ms, int64_t *elapsed_ms);

/* The most a token bucket of burst tokens that refills at rate a second
 * can let through in elapsed_ms (one more for the rounding): what a
 * limit's test may count, however slowly the machine served the flood. */
static inline long khtest_bucket_max(double burst, double rate,
                                     int64_t elapsed_ms)
{
    return (long) (burst + rate * (double) elapsed_ms / 1000.0) + 1;
}

/* The refused handshakes a service's log at path tells: one for each
 * event=auth_refused line, plus the count=N of each
 * event=auth_refusals_unaudited line. */
long khtest_refusals_told(const char *path);

/* Whether database name takes new connections (those made stay): a
 * database that is away, for the services' outage tests. */
void khtest_db_allow_connections(const char *name, bool allow);

/* A routed referral of veilig-thuis, number n (its idempotency key
 * "key-n"), as routing leaves it: a new id in referral, its payload
 * {"summary":"delivery n"} in payload and the payload's SHA-256 (hex) in
 * hash, for the caller's deliveries of it. */
void khtest_routed_referral(PGconn *conn, int n, char referral[37],
                            char payload[128], char hash[65]);

/* dir/name in one of 8 static buffers used in turn, so that a few paths
 * can be used in one call. */
char *khtest_path(const char *dir, const char *name);

/* The text of PostgreSQL's plan of sql on conn (EXPLAIN, its lines
 * joined with newlines), a new string the caller frees. */
char *khtest_db_plan(PGconn *conn, const char *sql);

/* khtest_db_plan of "EXECUTE name(args)", sql prepared as name first (the
 * parameter types as its casts give them), as a service runs it. */
char *khtest_db_plan_prepared(PGconn *conn, const char *name, const char *sql,
                              const char *args);

/* As khtest_db_value, for a query that returns one count. */
long khtest_db_count(PGconn *conn, const char *sql);

/* Wait until sql counts want (true) or timeout_ms pass (false). */
bool khtest_wait_count(PGconn *conn, const char *sql, long want,
                       int timeout_ms);

/* The value of one series ("name" or "name{label=\"x\"}", without the
 * ketenhub_ prefix) in the /metrics of the health endpoint health
 * (host:port); 0 when it is absent (a counter that never moved). */
double khtest_metric(const char *health, const char *series);

/* Wait until the file at path holds text (true) or timeout_ms pass
 * (false): a service's log line. */
bool khtest_log_has(const char *path, const char *text, int timeout_ms);

/* Set the cluster's synchronous_standby_names (NULL: reset it) and wait
 * until conn's session has it: with a standby that never comes, every
 * commit of a session with synchronous_commit on (PGOPTIONS="-c
 * synchronous_commit=on": the test cluster has it off) is written here
 * and then waits for it, and ending that server process loses the
 * answer to a commit that went through. */
void khtest_sync_standby(PGconn *conn, const char *name);

/* End the server process of database db whose commit waits for the
 * synchronous standby, once one does (within 10 s): whether one did and
 * was ended. */
bool khtest_end_commit_waiter(PGconn *conn, const char *db);

/* Revoke partner id through db while a connection of its own (returned,
 * for the caller to COMMIT and PQfinish) holds the registry's keys
 * locked: the services are told of the change, and cannot read it until
 * the lock goes. */
PGconn *khtest_revoke_unreadably(PGconn *db, const char *conninfo,
                                 const char *id);

/* Run sql (a change to the registry) on db, a superuser's connection,
 * without telling the services: triggers off for it
 * (session_replication_role), so no NOTIFY goes out. As if the notice
 * came late: a service's key map still admits what the change ended.
 * Every ordinary trigger is off, and the foreign keys' checks with them:
 * for revocations and ends of overlaps, not for a change that
 * partners_keys_follow must follow (a new key). */
void khtest_change_untold(PGconn *db, const char *sql);

/* How often text occurs in the file at path (0 when it cannot be read). */
int khtest_log_count(const char *path, const char *text);

/* Print the last lines of the log at path (but its config lines) to
 * stderr, for a failure to show why: the test's directory, and the log
 * with it, is gone by the time the output is read. */
void khtest_show_log(const char *path, int lines);

/* Register partner id (kind, handles_cases) with public_key (Z85) by SQL,
 * aborting the test on failure. */
void khtest_register_partner(PGconn *conn, const char *id, const char *kind,
                             bool handles_cases, const char *public_key);

/* Load the example referrals of schemas/examples/, sorted by file name,
 * into docs[0..max); returns how many (at least one, or the test fails).
 * The caller json_decref-s them. */
size_t khtest_examples(json_t **docs, size_t max);

/* A new directory under /tmp; the caller removes it with khtest_rmtree
 * and frees the string. */
char *khtest_tmpdir(void);

/* Remove path and everything below it (no error if it is gone). */
void khtest_rmtree(const char *path);

/* Write / append text to a file, aborting the test on failure. */
void khtest_write_file(const char *path, const char *text);
void khtest_append_file(const char *path, const char *text);

/* Whole file as a new NUL-terminated string (caller frees), or NULL when
 * it cannot be read. */
char *khtest_read_file(const char *path);

/* Start the built ketenhub-intake on endpoint with dir's certificates
 * (dir/hub.cert, dir/partners), the database conninfo, the source tree's
 * schemas and debug logs appended to dir/intake.log; extra (NULL-ended
 * "NAME=value" strings, may be NULL) comes after and wins. Returns the
 * pid; fails the test when it cannot start. */
pid_t khtest_start_intake(const char *dir, const char *endpoint,
                          const char *conninfo, char *const extra[]);

/* Run argv (argv[0] is a path, argv NULL-terminated) with the test's
 * environment, stdin from /dev/null. Returns the exit status (128 + the
 * signal when killed). When output is not NULL, *output receives stdout
 * and stderr together (caller frees). */
int khtest_run(char *const argv[], char **output);

/* Run the built ketenhubctl with args (NULL-terminated, at most 30), as
 * khtest_run. KHTEST_CTL (&out, "partner", "list") builds the array. */
int khtest_ctl(char **output, const char *const *args);

#define KHTEST_CTL(output, ...)                                                \
    khtest_ctl(output, (const char *const[]){__VA_ARGS__, NULL})

#endif
