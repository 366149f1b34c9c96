/*
 * ketenhubctl internals: one file per command group (migrate, hub,
 * partner) plus the helpers they share. Each command returns the exit code
 * of the program: 0 ok, 1 runtime failure, 2 usage or configuration error.
 */
#ifndef KH_CTL_H_INCLUDED
#define KH_CTL_H_INCLUDED

#include <getopt.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "ketenhub/error.h"

#define CTL_OK 0
#define CTL_FAIL 1
#define CTL_USAGE 2

/* Command groups: argv[0] is the group's name. */
int ctl_migrate(int argc, char **argv);
int ctl_hub(int argc, char **argv);
int ctl_partner(int argc, char **argv);
int ctl_rules(int argc, char **argv);
int ctl_deadletters(int argc, char **argv);
int ctl_purge(int argc, char **argv);
int ctl_audit(int argc, char **argv);
/* audit report (cmd_report.c), a subcommand of ctl_audit. */
int ctl_audit_report(int argc, char **argv);
int ctl_status(int argc, char **argv);
int ctl_health(int argc, char **argv);

/* Print "ketenhubctl: <path>:<line>: <message> (<code>)" on stderr. */
void ctl_print_error(const kh_error_t *err);

/* Whether sqlstate says that a table, a column or a function the command
 * uses is not there: the database is not (fully) migrated for this
 * ketenhubctl. */
bool ctl_sqlstate_unmigrated(const char *sqlstate);

/* Print "ketenhubctl: <message>" on stderr and return CTL_USAGE. */
int ctl_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* What ctl_getopt keeps of one command's options: start it as
 * {.repeatable = "k"} (the short names of the options that may be given
 * again, "" for none). */
typedef struct {
    const char *repeatable;
    bool seen[256];
} ctl_opts_t;

/* getopt_long, for a command whose options each take one value: an
 * option with an argument given a second time (not one of
 * opts->repeatable) is refused like getopt_long's own errors, with
 * "COMMAND: option '--NAME' given twice" on stderr and '?' returned, and
 * never silently overrides the first. */
int ctl_getopt(int argc, char **argv, const char *shortopts,
               const struct option *longopts, ctl_opts_t *opts);

/* Whether out, an --out DIR that a command makes when it is missing (the
 * last directory only), can be that: CTL_OK, or a usage error named after
 * command when out is there but no directory, or its parent directory is
 * not there (a mistyped path, as a mistyped --cert-dir). */
int ctl_out_dir_check(const char *command, const char *out);

/* Whether the directory an --out FILE goes into is there: CTL_OK, or a
 * usage error named after command. */
int ctl_out_parent_check(const char *command, const char *out);

/* Bytes of a time in the trail's own form, the NUL included:
 * 2026-11-28T21:00:00.000000Z. */
#define CTL_TIME_SIZE 28

/* Read a time option's text, the one way every command reads a time:
 * ISO 8601, YYYY-MM-DD, optionally followed by T (or a space) and
 * HH:MM[:SS[.FFFFFF]] and then a zone (Z, +HH, +HH:MM, +HHMM; - likewise),
 * within 0001-01-01 .. 9999-12-31 UTC. A time without a zone is UTC, as
 * the trail prints its times, whatever the session's or the server's zone.
 * Nothing else is a time here: not PostgreSQL's words (now, today,
 * yesterday, epoch, infinity, J2461373), nor BC, nor a date that is not
 * year first. Every field is checked here, so that a bad time is a usage
 * error naming its option before the database is asked anything.
 *
 * option names the option in the message ("purge: --before"). On success
 * returns CTL_OK, *at_us (when not NULL) gets microseconds since 1970 UTC
 * and out (when not NULL) the time in the trail's form, to pass to
 * PostgreSQL and to print: what is printed is what is used. Otherwise
 * prints why on stderr and returns CTL_USAGE. */
int ctl_time_arg(const char *option, const char *text, int64_t *at_us,
                 char out[CTL_TIME_SIZE]);

/* A subcommand of a command group: its name and what runs it (argv[0] is
 * the subcommand's name). */
typedef struct {
    const char *name;
    int (*run)(int argc, char **argv);
} ctl_sub_t;

/* Make argv[1], a command's or subcommand's name, its whole name
 * ("ketenhubctl partner", then "ketenhubctl partner list"), argv[0]
 * being the whole name of what it is a part of: getopt's messages name
 * the command after argv[0] of what it is given. */
void ctl_name_command(char **argv);

/* Run the subcommand named in argv[1] from subs (ended by a NULL name).
 * No subcommand, or an unknown one: usage on stderr, CTL_USAGE; --help or
 * -h: usage on stdout, CTL_OK. */
int ctl_dispatch(const char *group, int argc, char **argv,
                 const ctl_sub_t *subs, void (*usage)(FILE *out));

/* Connect using $KH_DATABASE_URL (and $KH_DATABASE_PASSWORD_FILE) or the
 * libpq environment, the session's time zone set to UTC. Prints the error and
 * returns NULL on failure; exits with CTL_USAGE on a bad setting (a password
 * file that cannot be read). */
PGconn *ctl_connect(void);

/* As ctl_connect, trying again every second for up to wait_s seconds
 * while the server cannot be reached (a database container starting). */
PGconn *ctl_connect_wait(int wait_s);

/* COMMIT the transaction open on conn, having read its id first: 1 when
 * it went through, also when only a new connection could tell
 * (txid_status: the connection was lost with the answer, *lost set), 0
 * when it did not, -1 when whether it did cannot be found out; err is set
 * unless it went through and nothing was lost. */
int ctl_commit_xact(PGconn *conn, bool *lost, kh_error_t *err);

/* The decision of ctl_commit_xact from conn's status after the failed
 * COMMIT and check's result (not read when status is CONNECTION_OK). */
int ctl_commit_checked(ConnStatusType status, const PGresult *res);

#endif
