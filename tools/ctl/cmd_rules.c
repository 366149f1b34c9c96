/*
 * ketenhubctl rules check / explain: validate a routing rules file and show
 * what it does to one referral. check takes the registered partners from
 * the database, or from a file (`partner list --json` output) to work
 * offline; explain needs no database and checks partners only when given
 * --partners.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/partner.h"
#include "ketenhub/rules.h"
#include "ketenhub/schema.h"

#ifndef KH_SOURCE_MIGRATIONS_DIR
#define KH_SOURCE_MIGRATIONS_DIR ""
#endif
#ifndef KH_INSTALLED_MIGRATIONS_DIR
#define KH_INSTALLED_MIGRATIONS_DIR "/usr/local/share/ketenhub/migrations"
#endif

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl rules check FILE [--partners FILE.json] "
            "[--schema FILE]\n"
            "       ketenhubctl rules explain FILE REFERRAL.json "
            "[--partners FILE.json]\n"
            "                                 [--schema FILE]\n"
            "\n"
            "check    validate a rules file: every error as "
            "FILE:LINE:COL: code: message.\n"
            "         Partners come from the database unless --partners "
            "names a file\n"
            "         (the output of `ketenhubctl partner list --json`).\n"
            "explain  show which rules fire for a referral, which condition "
            "parts\n"
            "         held, and what each partner would receive. No "
            "database;\n"
            "         partners are checked only with --partners. It prints "
            "the\n"
            "         referral's values: keep its output local. A "
            "referral that intake\n"
            "         would refuse is an error (code and field path), exit "
            "2.\n"
            "\n"
            "  --schema FILE  the referral schema (default: "
            "$KH_SCHEMA_DIR/referral.v1.json,\n"
            "                 else the source tree's or the installed one)\n"
            "\n"
            "exit status: 0 valid, 1 invalid or not checked (the database "
            "could not be\n"
            "read), 2 usage or unreadable input\n");
}

/* Where referral.v1.json is: $KH_SCHEMA_DIR, the source tree (next to the
 * migrations directory), the installed share directory. */
static const char *s_schema_path(const char *given, char *buf, size_t size)
{
    if (given)
        return given;
    const char *dir = getenv("KH_SCHEMA_DIR");
    if (dir && *dir) {
        snprintf(buf, size, "%s/referral.v1.json", dir);
        return buf;
    }
    const char *bases[] = {KH_SOURCE_MIGRATIONS_DIR,
                           KH_INSTALLED_MIGRATIONS_DIR};
    for (size_t i = 0; i < 2; i++) {
        if (!*bases[i])
            continue;
        snprintf(buf, size, "%s/../schemas/referral.v1.json", bases[i]);
        FILE *f = fopen(buf, "r");
        if (f) {
            fclose(f);
            return buf;
        }
    }
    return buf;
}

typedef struct {
    kh_rules_partner_t *list;
    size_t count;
    char **ids;
} s_partners_t;

static void s_partners_free(s_partners_t *p)
{
    for (size_t i = 0; i < p->count; i++)
        free(p->ids[i]);
    free(p->ids);
    free(p->list);
}

static int s_partners_add(s_partners_t *p, const char *id, bool cases)
{
    kh_rules_partner_t *list = realloc(p->list, (p->count + 1) * sizeof *list);
    if (!list)
        return -1;
    p->list = list;
    char **ids = realloc(p->ids, (p->count + 1) * sizeof *ids);
    if (!ids)
        return -1;
    p->ids = ids;
    if (!(ids[p->count] = strdup(id)))
        return -1;
    list[p->count] = (kh_rules_partner_t){ids[p->count], cases, false};
    p->count++;
    return 0;
}

/* Say on stderr why path could not be loaded as JSON: where jansson
 * knows the place (a syntax error), as FILE:LINE:COLUMN; a file that
 * cannot be opened or read has none (jansson gives -1), so that it does
 * not read as an error inside the file. */
static void s_json_error(const char *path, const json_error_t *jerr)
{
    if (jerr->line > 0)
        fprintf(stderr, "ketenhubctl: %s:%d:%d: %s\n", path, jerr->line,
                jerr->column, jerr->text);
    else
        fprintf(stderr, "ketenhubctl: %s: %s\n", path, jerr->text);
}

/* The JSON document in the regular file at path, or NULL after saying
 * why on stderr. Opened without blocking and checked before reading, as
 * the rules file is (kh_rules_load): a FIFO would hold the command until
 * some writer came, and a directory or device is no document. */
static json_t *s_json_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        fprintf(stderr, "ketenhubctl: %s: cannot open it: %s\n", path,
                strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        fprintf(stderr, "ketenhubctl: %s: not a regular file\n", path);
        close(fd);
        return NULL;
    }
    json_error_t jerr;
    json_t *doc = json_loadfd(fd, JSON_REJECT_DUPLICATES, &jerr);
    close(fd);
    if (!doc)
        s_json_error(path, &jerr);
    return doc;
}

/* Active partners from a JSON array of {id, handles_cases, revoked_at}. */
static int s_partners_file(s_partners_t *p, const char *path)
{
    json_t *doc = s_json_file(path);
    if (!doc)
        return -1;
    if (!json_is_array(doc)) {
        fprintf(stderr,
                "ketenhubctl: %s: not a JSON array of partners (the output "
                "of partner list --json)\n",
                path);
        json_decref(doc);
        return -1;
    }
    size_t i;
    json_t *o;
    int rc = 0;
    json_array_foreach(doc, i, o)
    {
        const json_t *id = json_object_get(o, "id");
        const json_t *cases = json_object_get(o, "handles_cases");
        const json_t *revoked = json_object_get(o, "revoked_at");
        if (!json_is_string(id) || !json_is_boolean(cases)) {
            fprintf(stderr,
                    "ketenhubctl: %s: partner %zu needs an id and "
                    "handles_cases\n",
                    path, i);
            rc = -1;
            break;
        }
        if (revoked && !json_is_null(revoked))
            continue;
        if (s_partners_add(p, json_string_value(id), json_is_true(cases))) {
            rc = -1;
            break;
        }
    }
    json_decref(doc);
    return rc;
}

static void s_from_db(const kh_partner_t *partner, void *arg)
{
    s_partners_t *p = arg;
    if (s_partners_add(p, partner->id, partner->handles_cases))
        fprintf(stderr, "ketenhubctl: out of memory\n");
}

typedef struct {
    const char *file;
    int errors;
} s_report_arg_t;

static void s_report(const kh_error_t *err, bool is_error, void *arg)
{
    s_report_arg_t *r = arg;
    if (is_error)
        r->errors++;
    /* A problem of the whole file (too large) has no place in it: no
     * line 0 that an editor could not jump to. */
    if (err->line > 0)
        fprintf(stderr, "%s:%d:%d: ", r->file, err->line, err->column);
    else
        fprintf(stderr, "%s: ", r->file);
    fprintf(stderr, "%s%s: %s",
            is_error ? "" : "note: ", kh_error_name(err->code), err->message);
    if (err->path[0])
        fprintf(stderr, " (at %s)", err->path);
    fprintf(stderr, "\n");
}

/* Whether referral fails the referral schema at schema_path (said on
 * stderr with the code and the field path, never the value): intake
 * refuses such a document, so routing never sees it, and explaining it
 * would show rules that fail on it (an age in quotes is no minor's) or a
 * fallback for what is no referral at all. */
static bool s_referral_invalid(const char *schema_path, const json_t *referral,
                               const char *file)
{
    kh_error_t err;
    kh_error_clear(&err);
    kh_schema_t *schema = kh_schema_load(schema_path, &err);
    if (schema)
        kh_error_clear(&err);
    bool invalid = !schema || kh_schema_validate(schema, referral, &err) != 0;
    if (invalid)
        fprintf(stderr, "ketenhubctl: %s: %s%s%s (%s)\n",
                schema ? file : schema_path, err.path[0] ? err.path : "",
                err.path[0] ? ": " : "", err.message, kh_error_name(err.code));
    if (schema && invalid)
        fprintf(stderr,
                "ketenhubctl: %s: intake refuses it: not a referral "
                "routing could see\n",
                file);
    kh_schema_destroy(&schema);
    return invalid;
}

/* Whether path opens as a regular file, what (the rules file, the
 * referral schema) naming it on stderr when not, as kh_rules_load would.
 * Asked before the database: a file that is not there is a wrong call
 * (exit 2), not a file left unchecked because the database is away. */
static bool s_regular_file(const char *path, const char *what, const char *code)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    struct stat st;
    const char *why = NULL;
    if (fd < 0)
        why = strerror(errno);
    else if (fstat(fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file";
    if (fd >= 0)
        close(fd);
    if (why)
        fprintf(stderr, "ketenhubctl: %s: cannot read the %s: %s (%s)\n", path,
                what, why, code);
    return why == NULL;
}

static int s_run(int argc, char **argv, bool explain)
{
    static const struct option options[] = {
        {"partners", required_argument, NULL, 'p'},
        {"schema", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *partners_file = NULL, *schema = NULL;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "p:s:h", options, &cli)) != -1) {
        switch (c) {
        case 'p':
            partners_file = optarg;
            break;
        case 's':
            schema = optarg;
            break;
        case 'h':
            s_usage(stdout);
            return CTL_OK;
        default:
            s_usage(stderr);
            return CTL_USAGE;
        }
    }
    int want = explain ? 2 : 1;
    if (argc - optind != want) {
        s_usage(stderr);
        return CTL_USAGE;
    }
    const char *file = argv[optind];
    char schema_buf[4096];
    const char *schema_path =
        s_schema_path(schema, schema_buf, sizeof schema_buf);
    if (!s_regular_file(file, "rules file", "io") ||
        !s_regular_file(schema_path, "referral schema", "config"))
        return CTL_USAGE;
    s_partners_t partners = {0};
    bool have_partners = false;
    if (partners_file) {
        if (s_partners_file(&partners, partners_file)) {
            s_partners_free(&partners);
            return CTL_USAGE;
        }
        have_partners = true;
    } else if (!explain) {
        /* A database that cannot be reached or read is a runtime failure,
         * exit 1 as in every other command: the file is not known to be
         * valid, so a script must not reload it, but it was not called
         * wrongly either (2). --partners checks without the database. */
        kh_error_t err;
        kh_error_clear(&err);
        PGconn *conn = ctl_connect();
        int n = conn ? kh_partner_list(conn, false, s_from_db, &partners, &err)
                     : -1;
        PQfinish(conn);
        if (n < 0) {
            if (conn)
                ctl_print_error(&err);
            fprintf(stderr,
                    "ketenhubctl: rules check: %s not checked: "
                    "cannot read the registered partners (--partners "
                    "FILE checks without the database)\n",
                    file);
            s_partners_free(&partners);
            return CTL_FAIL;
        }
        have_partners = true;
    }
    json_t *referral = NULL;
    if (explain) {
        referral = s_json_file(argv[optind + 1]);
        if (!referral) {
            s_partners_free(&partners);
            return CTL_USAGE;
        }
    }
    s_report_arg_t rep = {.file = file};
    kh_rules_options_t opts = {.schema_path = schema_path,
                               .partners = have_partners ? partners.list : NULL,
                               .partner_count = partners.count,
                               .report = s_report,
                               .report_arg = &rep};
    /* A partner list that is empty but given still counts as given. */
    static const kh_rules_partner_t none = {0};
    if (have_partners && !opts.partners)
        opts.partners = &none;
    kh_error_t err;
    kh_error_clear(&err);
    kh_rules_t *rules = kh_rules_load(file, &opts, &err);
    int rc;
    if (!rules) {
        if (rep.errors == 0) {
            fprintf(stderr, "ketenhubctl: %s: %s (%s)\n",
                    err.code == KH_E_CONFIG ? opts.schema_path : file,
                    err.message, kh_error_name(err.code));
            rc = CTL_USAGE;
        } else {
            fprintf(stderr, "%s: %d error%s\n", file, rep.errors,
                    rep.errors == 1 ? "" : "s");
            rc = CTL_FAIL;
        }
    } else if (explain && s_referral_invalid(opts.schema_path, referral,
                                             argv[optind + 1])) {
        rc = CTL_USAGE;
    } else {
        if (explain && !have_partners)
            /* Routing skips an optional target whose partner is not
             * registered, and uses the fallback when no other partner is
             * left: without the registry explain cannot tell. */
            printf("partners not checked (no --partners): every optional "
                   "target counts as registered; routing skips one whose "
                   "partner is not, and uses the fallback when no other "
                   "partner is left\n");
        if (explain)
            kh_rules_explain(rules, referral, stdout);
        else
            printf("%s: valid, %zu rules, version %s%s\n", file,
                   kh_rules_count(rules), kh_rules_version(rules),
                   have_partners ? "" : " (partners not checked)");
        rc = CTL_OK;
    }
    kh_rules_destroy(&rules);
    json_decref(referral);
    s_partners_free(&partners);
    return rc;
}

static int s_check(int argc, char **argv)
{
    return s_run(argc, argv, false);
}

static int s_explain(int argc, char **argv)
{
    return s_run(argc, argv, true);
}

int ctl_rules(int argc, char **argv)
{
    static const ctl_sub_t subs[] = {
        {"check", s_check}, {"explain", s_explain}, {NULL, NULL}};
    return ctl_dispatch("rules", argc, argv, subs, s_usage);
}
