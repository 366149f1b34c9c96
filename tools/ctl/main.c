/*
 * ketenhubctl: what administrators do to a hub from the command line:
 * migrate the database, make the hub's key pair, add, list and revoke
 * partners. The database comes from $KH_DATABASE_URL or the libpq
 * environment (PGHOST, PGPORT, PGUSER, PGDATABASE, ...).
 */
#include <errno.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/trail.h"

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl COMMAND [ARGS]\n"
            "\n"
            "commands:\n"
            "  migrate [--dir DIR] [--status] [--wait S]\n"
            "                                   apply or show schema "
            "migrations\n"
            "  hub keygen --out DIR             make the hub's CURVE key "
            "pair\n"
            "  partner add ID ...               register a partner and make "
            "its keys\n"
            "  partner list [--active] [--json] list partners\n"
            "  partner rotate ID ...            replace a partner's key, "
            "same id\n"
            "  partner revoke ID ...            revoke a partner's key\n"
            "  rules check|explain|test FILE ...\n"
            "                                   validate routing rules, "
            "explain them,\n"
            "                                   hold them to cases\n"
            "  deadletters list|show|retry      dead deliveries: look at "
            "them, send again\n"
            "  purge --before T | --older-than D\n"
            "                                   erase the payloads of "
            "finished referrals\n"
            "  audit keygen|seal|query|export|verify|report\n"
            "                                   the audit trail: query, "
            "export, verify, report\n"
            "  status [--json]                  services up or down, "
            "backlog, trail head\n"
            "  health [--live] [H:P]            one service ready (alive)? "
            "exit 0 or 1\n"
            "\n"
            "Run `ketenhubctl COMMAND --help` for a command's options.\n"
            "\n"
            "environment:\n"
            "  KH_DATABASE_URL      libpq connection string or URI; when "
            "unset, the\n"
            "                       libpq variables PGHOST, PGPORT, PGUSER, "
            "PGDATABASE\n"
            "  KH_DATABASE_PASSWORD_FILE\n"
            "                       file holding the database password "
            "(a secret)\n"
            "  KH_MIGRATIONS_DIR    default for migrate --dir\n"
            "  KH_PARTNER_CERT_DIR  default for partner --cert-dir\n"
            "  KH_SCHEMA_DIR        where rules --schema's default, "
            "referral.v1.json, is\n"
            "  KH_AUDIT_PUBLIC_KEY  default for audit verify --public-key\n"
            "  KH_AUDIT_KEY         default for audit seal --key\n"
            "  KH_INTAKE_HEALTH, KH_ROUTING_HEALTH, KH_NOTIFY_HEALTH, "
            "KH_AUDIT_HEALTH\n"
            "                       the services' health endpoints for "
            "status\n"
            "\n"
            "exit status: 0 ok, 1 runtime failure, 2 usage or configuration "
            "error\n");
}

bool ctl_sqlstate_unmigrated(const char *sqlstate)
{
    return sqlstate && (strcmp(sqlstate, "42P01") == 0 || /* table */
                        strcmp(sqlstate, "42703") == 0 || /* column */
                        strcmp(sqlstate, "42883") == 0);  /* function */
}

void ctl_print_error(const kh_error_t *err)
{
    fprintf(stderr, "ketenhubctl: ");
    if (err->path[0]) {
        if (err->line > 0)
            fprintf(stderr, "%s:%d: ", err->path, err->line);
        else
            fprintf(stderr, "%s: ", err->path);
    }
    fprintf(stderr, "%s (%s)\n", err->message[0] ? err->message : "failed",
            kh_error_name(err->code));
    if (ctl_sqlstate_unmigrated(err->sqlstate))
        fprintf(stderr, "ketenhubctl: hint: the database is not migrated for "
                        "this ketenhubctl: run ketenhubctl migrate\n");
}

int ctl_usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ketenhubctl: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    return CTL_USAGE;
}

/* Whether text is one of the options (--name, --name=..., -c). */
static bool s_names_option(const char *text, const char *shortopts,
                           const struct option *longopts)
{
    if (strncmp(text, "--", 2) == 0) {
        size_t len = strcspn(text + 2, "=");
        for (const struct option *o = longopts; o->name; o++)
            if (strlen(o->name) == len && strncmp(o->name, text + 2, len) == 0)
                return true;
        return false;
    }
    return text[0] == '-' && text[1] && text[1] != ':' && !text[2] &&
           strchr(shortopts, text[1]);
}

int ctl_getopt(int argc, char **argv, const char *shortopts,
               const struct option *longopts, ctl_opts_t *opts)
{
    int c = getopt_long(argc, argv, shortopts, longopts, NULL);
    if (c <= 0 || c == '?' || c == ':')
        return c;
    const struct option *o = longopts;
    while (o->name && o->val != c)
        o++;
    const char *spec = c <= UCHAR_MAX ? strchr(shortopts, c) : NULL;
    bool value =
        o->name ? o->has_arg == required_argument : spec && spec[1] == ':';
    /* The word after an option that takes a value is its value, also when
     * it is another option (a value forgotten: --name --no-cases named a
     * partner "--no-cases" that handles cases). Attached (--name=--x), it
     * is meant. */
    if (value && optarg == argv[optind - 1] &&
        s_names_option(optarg, shortopts, longopts)) {
        if (o->name)
            fprintf(stderr,
                    "%s: option '--%s' takes a value, and '%s' is an "
                    "option (--%s=%s for that value)\n",
                    argv[0], o->name, optarg, o->name, optarg);
        else
            fprintf(stderr,
                    "%s: option '-%c' takes a value, and '%s' is an "
                    "option\n",
                    argv[0], c, optarg);
        return '?';
    }
    /* (an option of a value past a char is not counted) */
    if (c > UCHAR_MAX || strchr(opts->repeatable, c))
        return c;
    if (!value) /* a flag: once or twice says the same */
        return c;
    if (!opts->seen[(unsigned char) c]) {
        opts->seen[(unsigned char) c] = true;
        return c;
    }
    if (o->name)
        fprintf(stderr, "%s: option '--%s' given twice: it takes one value\n",
                argv[0], o->name);
    else
        fprintf(stderr, "%s: option '-%c' given twice: it takes one value\n",
                argv[0], c);
    return '?';
}

/* Read n digits at *p into *out, moving *p past them. */
static bool s_digits(const char **p, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if ((*p)[i] < '0' || (*p)[i] > '9')
            return false;
        v = v * 10 + ((*p)[i] - '0');
    }
    *p += n;
    *out = v;
    return true;
}

/* The time text as ctl_time_arg reads it; see there. */
static bool s_time_parse(const char *text, int64_t *at_us)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const char *p = text;
    int y, mo, d, h = 0, mi = 0, s = 0, us = 0, zh = 0, zm = 0, sign = 0;
    if (!s_digits(&p, 4, &y) || *p++ != '-' || !s_digits(&p, 2, &mo) ||
        *p++ != '-' || !s_digits(&p, 2, &d))
        return false;
    if (*p == 'T' || *p == 't' || *p == ' ') {
        p++;
        if (!s_digits(&p, 2, &h) || *p++ != ':' || !s_digits(&p, 2, &mi))
            return false;
        if (*p == ':') {
            p++;
            if (!s_digits(&p, 2, &s))
                return false;
            if (*p == '.' || *p == ',') {
                p++;
                int n = 0;
                for (; *p >= '0' && *p <= '9'; p++, n++)
                    if (n < 6)
                        us = us * 10 + (*p - '0');
                    else
                        return false; /* finer than the trail's µs */
                if (n == 0)
                    return false;
                for (; n < 6; n++)
                    us *= 10;
            }
        }
        if (*p == 'Z' || *p == 'z')
            p++;
        else if (*p == '+' || *p == '-') {
            sign = *p++ == '-' ? -1 : 1;
            if (!s_digits(&p, 2, &zh))
                return false;
            if (*p == ':')
                p++;
            if ((*p || p[-1] == ':') && !s_digits(&p, 2, &zm))
                return false;
        }
    }
    if (*p)
        return false;
    bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 ||
        d > days[mo - 1] + (mo == 2 && leap) || h > 23 || mi > 59 || s > 59 ||
        zh > 23 || zm > 59)
        return false;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = s};
    int64_t secs = (int64_t) timegm(&tm) - sign * (zh * 3600 + zm * 60);
    /* In UTC too within 0001-01-01 .. 9999-12-31, as PostgreSQL and the
     * trail's own form have it. */
    if (secs < INT64_C(-62135596800) || secs >= INT64_C(253402300800))
        return false;
    *at_us = secs * 1000000 + us;
    return true;
}

int ctl_out_parent_check(const char *command, const char *out)
{
    char copy[4096];
    if ((size_t) snprintf(copy, sizeof copy, "%s", out) >= sizeof copy)
        return ctl_usage_error("%s: --out path is too long", command);
    const char *parent = dirname(copy);
    struct stat st;
    if (stat(parent, &st) != 0 || !S_ISDIR(st.st_mode))
        return ctl_usage_error("%s: --out %s: %s is not a directory", command,
                               out, parent);
    return CTL_OK;
}

int ctl_out_dir_check(const char *command, const char *out)
{
    struct stat st;
    if (stat(out, &st) == 0)
        return S_ISDIR(st.st_mode)
                   ? CTL_OK
                   : ctl_usage_error("%s: --out %s is not a directory", command,
                                     out);
    if (errno != ENOENT)
        return CTL_OK; /* the command says why when it makes it */
    return ctl_out_parent_check(command, out);
}

int ctl_time_arg(const char *option, const char *text, int64_t *at_us,
                 char out[CTL_TIME_SIZE])
{
    int64_t at;
    if (!text || !s_time_parse(text, &at))
        return ctl_usage_error("%s takes one ISO 8601 time, e.g. 2026-11-28 "
                               "or 2026-11-28T21:00:00Z (UTC when no zone "
                               "is given), not '%s'",
                               option, text ? text : "");
    if (at_us)
        *at_us = at;
    if (out)
        kh_trail_format_time(at, out);
    return CTL_OK;
}

void ctl_name_command(char **argv)
{
    /* Two levels at most (ketenhubctl partner list), each name short and
     * fixed, so one buffer per level lasts as long as the command runs. */
    static char names[2][64];
    static int level;
    if (level >= 2)
        return;
    char *name = names[level++];
    if ((size_t) snprintf(name, sizeof names[0], "%s %s", argv[0], argv[1]) <
        sizeof names[0])
        argv[1] = name;
}

int ctl_dispatch(const char *group, int argc, char **argv,
                 const ctl_sub_t *subs, void (*usage)(FILE *out))
{
    if (argc < 2) {
        usage(stderr);
        return CTL_USAGE;
    }
    const char *sub = argv[1];
    if (strcmp(sub, "--help") == 0 || strcmp(sub, "-h") == 0) {
        usage(stdout);
        return CTL_OK;
    }
    for (const ctl_sub_t *s = subs; s->name; s++)
        if (strcmp(sub, s->name) == 0) {
            ctl_name_command(argv);
            return s->run(argc - 1, argv + 1);
        }
    ctl_usage_error("%s: unknown command '%s'", group, sub);
    usage(stderr);
    return CTL_USAGE;
}

PGconn *ctl_connect_wait(int wait_s)
{
    for (int waited = 0;; waited++) {
        kh_error_t err;
        kh_error_clear(&err);
        PGconn *conn =
            kh_db_connect_app(kh_db_env_conninfo(), "ketenhubctl", &err);
        /* Times are read and written in UTC, whatever the session's zone:
         * a time given without a zone means the same in every command.
         * Dates are read year first, whatever the server's or PGDATESTYLE's
         * DateStyle: 12/11/2025 would be November to one and December to
         * another (a purge's cutoff a month apart), so it is refused. */
        if (conn && kh_db_exec(conn,
                               "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, "
                               "YMD'",
                               &err) != 0) {
            PQfinish(conn);
            ctl_print_error(&err);
            return NULL;
        }
        if (conn)
            return conn;
        if (err.code == KH_E_CONFIG) {
            /* A bad setting (a password file that cannot be read), not a
             * database that is away: a usage error, before anything. */
            ctl_print_error(&err);
            exit(CTL_USAGE);
        }
        if (err.code != KH_E_UNAVAILABLE || waited >= wait_s) {
            ctl_print_error(&err);
            return NULL;
        }
        if (waited == 0)
            fprintf(stderr,
                    "ketenhubctl: waiting up to %d s for the "
                    "database\n",
                    wait_s);
        sleep(1);
    }
}

PGconn *ctl_connect(void)
{
    return ctl_connect_wait(0);
}

int ctl_commit_checked(ConnStatusType status, const PGresult *res)
{
    if (status == CONNECTION_OK)
        return 0; /* the server answered: it refused the commit */
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return -1;
    if (PQntuples(res) == 0)
        return 0;
    if (PQgetisnull(res, 0, 0))
        return -1;
    return strcmp(PQgetvalue(res, 0, 0), "t") == 0 ? 1 : 0;
}

/* After a COMMIT that failed on conn: 0 when it did not go through (the
 * server answered, refusing it, or check says not), 1 when it did after all
 * (the connection was lost with the answer, and check, a query with
 * nparams params run on a new connection, answers true in the first column
 * of its one row), -1 when that cannot be found out (no new connection,
 * check failed or answered NULL). No row is "not". */
static int s_commit_outcome(PGconn *conn, const char *check, int nparams,
                            const char *const *params)
{
    if (PQstatus(conn) == CONNECTION_OK)
        return ctl_commit_checked(CONNECTION_OK, NULL);
    PGconn *again = ctl_connect_wait(10);
    if (!again)
        return -1;
    PGresult *res =
        PQexecParams(again, check, nparams, NULL, params, NULL, NULL, 0);
    int outcome = ctl_commit_checked(CONNECTION_BAD, res);
    PQclear(res);
    PQfinish(again);
    return outcome;
}

int ctl_commit_xact(PGconn *conn, bool *lost, kh_error_t *err)
{
    *lost = false;
    PGresult *res = PQexec(conn, "SELECT txid_current()::text");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot read the transaction's id");
        PQclear(res);
        return 0;
    }
    char xid[32];
    snprintf(xid, sizeof xid, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    if (kh_db_exec(conn, "COMMIT", err) == 0)
        return 1;
    /* Whether the transaction committed, as the server knows it: true,
     * false, or NULL while that cannot be told. */
    const char *params[] = {xid};
    int outcome = s_commit_outcome(
        conn,
        "SELECT CASE txid_status($1::bigint) WHEN 'committed' THEN true"
        " WHEN 'aborted' THEN false END",
        1, params);
    *lost = outcome == 1;
    return outcome;
}

static int s_run(int argc, char **argv)
{
    if (argc < 2) {
        s_usage(stderr);
        return CTL_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 ||
        strcmp(cmd, "help") == 0) {
        s_usage(stdout);
        return CTL_OK;
    }
    /* getopt names what it complains about after argv[0]: the command's
     * whole name, not its last word. */
    static char program[] = "ketenhubctl";
    argv[0] = program;
    ctl_name_command(argv);
    if (strcmp(cmd, "migrate") == 0)
        return ctl_migrate(argc - 1, argv + 1);
    if (strcmp(cmd, "hub") == 0)
        return ctl_hub(argc - 1, argv + 1);
    if (strcmp(cmd, "partner") == 0)
        return ctl_partner(argc - 1, argv + 1);
    if (strcmp(cmd, "rules") == 0)
        return ctl_rules(argc - 1, argv + 1);
    if (strcmp(cmd, "deadletters") == 0)
        return ctl_deadletters(argc - 1, argv + 1);
    if (strcmp(cmd, "purge") == 0)
        return ctl_purge(argc - 1, argv + 1);
    if (strcmp(cmd, "audit") == 0)
        return ctl_audit(argc - 1, argv + 1);
    if (strcmp(cmd, "status") == 0)
        return ctl_status(argc - 1, argv + 1);
    if (strcmp(cmd, "health") == 0)
        return ctl_health(argc - 1, argv + 1);
    if (strcmp(cmd, "--version") == 0) {
        printf("ketenhubctl %s\n", kh_version());
        return CTL_OK;
    }
    ctl_usage_error("unknown command '%s'", cmd);
    s_usage(stderr);
    return CTL_USAGE;
}

/* Whether all that went to stdout got there: an auditor's CSV or JSON
 * redirected to a file on a full disk, or an administrator's report, is
 * otherwise cut short while the command exits 0. rc is the command's
 * exit status; returns it, or CTL_FAIL when the output was lost. */
static int s_close_stdout(int rc)
{
    errno = 0;
    bool failed = fflush(stdout) != 0 || ferror(stdout);
    int saved = errno;
    if (fclose(stdout) != 0 && !failed) {
        failed = true;
        saved = errno;
    }
    if (!failed)
        return rc;
    fprintf(stderr, "ketenhubctl: cannot write the output: %s\n",
            saved ? strerror(saved) : "write error");
    return rc == CTL_OK ? CTL_FAIL : rc;
}

int main(int argc, char **argv)
{
    return s_close_stdout(s_run(argc, argv));
}
