/*
 * ketenhubctl migrate: apply the schema migrations, or show their state.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ctl.h"
#include "ketenhub/config.h"
#include "ketenhub/migrate.h"

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl migrate [--dir DIR] [--status] [--wait "
            "SECONDS]\n"
            "\n"
            "Apply the pending migrations (DIR/NNN_name.sql, in order, each "
            "in its own\n"
            "transaction). Refuses to run when an applied file changed or "
            "is missing.\n"
            "\n"
            "  --dir DIR   migrations directory (default: $KH_MIGRATIONS_DIR, "
            "else\n"
            "              %s if present, else\n"
            "              %s)\n"
            "  --status    show applied and pending migrations; change "
            "nothing\n"
            "  --wait S    wait up to S seconds for the database to accept "
            "connections\n"
            "              (a one-shot job started beside it)\n"
            "  --help      this text\n",
            KH_SOURCE_MIGRATIONS_DIR, KH_INSTALLED_MIGRATIONS_DIR);
}

static const char *s_default_dir(void)
{
    const char *env = getenv("KH_MIGRATIONS_DIR");
    if (env && *env)
        return env;
    struct stat st;
    if (stat(KH_SOURCE_MIGRATIONS_DIR, &st) == 0 && S_ISDIR(st.st_mode))
        return KH_SOURCE_MIGRATIONS_DIR;
    return KH_INSTALLED_MIGRATIONS_DIR;
}

static void s_report_applied(const kh_migration_t *m, void *arg)
{
    (void) arg;
    printf("applied %s (sha256 %.12s)\n", m->file, m->sha256);
}

static void s_report_status(const kh_migration_t *m, void *arg)
{
    fprintf(arg, "%-8s %-36s %s\n", kh_migration_state_name(m->state), m->file,
            m->applied_at[0] ? m->applied_at : "-");
}

/* migrate --status: the table goes to stdout only once the whole state is
 * known, so that a failure leaves nothing there. Returns the number
 * pending, or -1 with err. */
static int s_status(PGconn *conn, const char *dir, kh_error_t *err)
{
    char *text = NULL;
    size_t size = 0;
    FILE *table = open_memstream(&text, &size);
    if (!table)
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    fprintf(table, "%-8s %-36s %s\n", "state", "file", "applied_at");
    int rc = kh_migrate_status(conn, dir, s_report_status, table, err);
    if (fclose(table) != 0 && rc >= 0)
        rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    if (rc >= 0)
        printf("%s%d pending\n", text, rc);
    free(text);
    return rc;
}

int ctl_migrate(int argc, char **argv)
{
    static const struct option options[] = {
        {"dir", required_argument, NULL, 'd'},
        {"status", no_argument, NULL, 's'},
        {"wait", required_argument, NULL, 'w'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *dir = NULL;
    int status = 0;
    int wait_s = 0;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "d:sw:h", options, &cli)) != -1) {
        switch (c) {
        case 'd':
            dir = optarg;
            break;
        case 's':
            status = 1;
            break;
        case 'w': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (*optarg == '\0' || *end || v < 0 || v > 3600)
                return ctl_usage_error("migrate: --wait wants seconds, "
                                       "0 to 3600");
            wait_s = (int) v;
            break;
        }
        case 'h':
            s_usage(stdout);
            return CTL_OK;
        default:
            s_usage(stderr);
            return CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("migrate: unexpected argument '%s'",
                               argv[optind]);
    const char *from = "--dir";
    if (!dir) {
        dir = s_default_dir();
        from = kh_config_is_set("KH_MIGRATIONS_DIR")
                   ? "KH_MIGRATIONS_DIR"
                   : "the default migrations directory";
    }
    /* A mistyped directory is a usage error, named before the database
     * is asked anything. */
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ctl_usage_error("migrate: %s %s is not a directory", from, dir);

    PGconn *conn = ctl_connect_wait(wait_s);
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    int rc;
    if (status) {
        rc = s_status(conn, dir, &err);
    } else {
        rc = kh_migrate_apply(conn, dir, s_report_applied, NULL, &err);
        if (rc >= 0)
            printf("database is up to date (%d applied now)\n", rc);
    }
    PQfinish(conn);
    if (rc < 0) {
        ctl_print_error(&err);
        return err.code == KH_E_CONFIG ? CTL_USAGE : CTL_FAIL;
    }
    return CTL_OK;
}
