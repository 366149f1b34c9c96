/*
 * ketenhubctl rules check / explain / test: validate a routing rules file,
 * show what it does to one referral, and hold it to cases that say where
 * referrals must go. check takes the registered partners from the
 * database, or from a file (`partner list --json` output) to work offline;
 * explain and test need no database and check partners only when given
 * --partners.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <stdarg.h>
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
            "       ketenhubctl rules test FILE CASE.json... "
            "[--partners FILE.json]\n"
            "                              [--schema FILE]\n"
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
            "test     route the referral of each case file and compare "
            "with what it\n"
            "         expects: the matched rules, the fallback, each "
            "partner with its\n"
            "         priority, fields and escalation (schemas/rules.md). "
            "No database;\n"
            "         a case's own \"partners\" replace --partners for "
            "it.\n"
            "         Prints each case's differences, never the "
            "referral's values.\n"
            "\n"
            "  --schema FILE  the referral schema (default: "
            "$KH_SCHEMA_DIR/referral.v1.json,\n"
            "                 else the source tree's or the installed one)\n"
            "\n"
            "exit status: 0 valid (test: every case as expected), 1 "
            "invalid, not\n"
            "checked (the database could not be read) or a case not as "
            "expected,\n"
            "2 usage or unreadable input (test: a case file that is no "
            "case)\n");
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

/* ---- rules test ------------------------------------------------------ */

/* One case file being run: its name, and how many of its expectations
 * failed so far. */
typedef struct {
    const char *file;
    int failed;
} s_case_t;

/* Say that the expectation at path did not hold (the case's first one
 * heads its list). */
static void s_differs(s_case_t *c, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void s_differs(s_case_t *c, const char *path, const char *fmt, ...)
{
    if (c->failed++ == 0)
        printf("%s: FAIL\n", c->file);
    printf("  %s: ", path);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
}

/* Say why the case file is no case (exit 2): the path inside it. */
static bool s_bad_case(const char *file, const char *path, const char *what)
{
    fprintf(stderr, "ketenhubctl: %s: %s: %s (rules.test)\n", file, path, what);
    return false;
}

/* Whether the object at path holds only the keys in allowed (a key
 * misspelt would make an expectation that is never checked). */
static bool s_keys_only(const char *file, const char *path, const json_t *obj,
                        const char *const *allowed)
{
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *) obj, key, value)
    {
        (void) value;
        size_t i = 0;
        while (allowed[i] && strcmp(allowed[i], key) != 0)
            i++;
        if (!allowed[i]) {
            char where[512];
            snprintf(where, sizeof where, "%s%s%s", path, *path ? "." : "",
                     key);
            return s_bad_case(file, where, "unknown key");
        }
    }
    return true;
}

/* Whether v is an array of distinct strings, none empty. */
static bool s_string_set(const json_t *v)
{
    if (!json_is_array(v))
        return false;
    for (size_t i = 0; i < json_array_size(v); i++) {
        const char *text = json_string_value(json_array_get(v, i));
        if (!text || !*text)
            return false;
        for (size_t j = 0; j < i; j++)
            if (json_equal(json_array_get(v, i), json_array_get(v, j)))
                return false;
    }
    return true;
}

static bool s_priority_known(const char *name)
{
    for (int p = KH_PRIORITY_NORMAL; p <= KH_PRIORITY_URGENT; p++)
        if (strcmp(name, kh_priority_name((kh_priority_t) p)) == 0)
            return true;
    return false;
}

/* Whether doc has the shape of a case (schemas/rules.md), said on stderr
 * with the path inside it when not. */
static bool s_case_valid(const char *file, const json_t *doc)
{
    static const char *const top[] = {"about", "referral", "partners", "expect",
                                      NULL};
    static const char *const expect_keys[] = {"rules", "fallback", "targets",
                                              NULL};
    static const char *const target_keys[] = {"priority", "fields",
                                              "escalate_to", NULL};
    if (!json_is_object(doc))
        return s_bad_case(file, "$", "a case is a JSON object");
    if (!s_keys_only(file, "", doc, top))
        return false;
    const json_t *about = json_object_get(doc, "about");
    if (about && !json_is_string(about))
        return s_bad_case(file, "about", "must be a string");
    const json_t *referral = json_object_get(doc, "referral");
    if (!json_is_object(referral) && !json_is_string(referral))
        return s_bad_case(file, "referral",
                          "must be the referral (an object) or the name of "
                          "its file, relative to the case's directory");
    const json_t *partners = json_object_get(doc, "partners");
    if (partners && !s_string_set(partners))
        return s_bad_case(file, "partners",
                          "must be an array of distinct partner ids, none "
                          "empty: the partners registered for this case");
    const json_t *expect = json_object_get(doc, "expect");
    if (!json_is_object(expect))
        return s_bad_case(file, "expect", "must be an object");
    if (!s_keys_only(file, "expect", expect, expect_keys))
        return false;
    const json_t *rules = json_object_get(expect, "rules");
    if (rules && !s_string_set(rules))
        return s_bad_case(file, "expect.rules",
                          "must be an array of distinct rule names, none "
                          "empty");
    const json_t *fallback = json_object_get(expect, "fallback");
    const char *reason = json_string_value(fallback);
    if (fallback && !json_is_false(fallback) &&
        !(reason && (strcmp(reason, "no_rule_matched") == 0 ||
                     strcmp(reason, "no_registered_target") == 0)))
        return s_bad_case(file, "expect.fallback",
                          "must be false, \"no_rule_matched\" or "
                          "\"no_registered_target\"");
    const json_t *targets = json_object_get(expect, "targets");
    if (!json_is_object(targets))
        return s_bad_case(file, "expect.targets",
                          "must be an object: partner id -> what it gets");
    const char *id;
    const json_t *t;
    json_object_foreach((json_t *) targets, id, t)
    {
        char path[512];
        snprintf(path, sizeof path, "expect.targets.%s", id);
        if (!*id)
            return s_bad_case(file, "expect.targets",
                              "a partner id is never empty");
        if (!json_is_object(t))
            return s_bad_case(file, path, "must be an object");
        if (!s_keys_only(file, path, t, target_keys))
            return false;
        const json_t *priority = json_object_get(t, "priority");
        if (priority && !(json_is_string(priority) &&
                          s_priority_known(json_string_value(priority)))) {
            snprintf(path, sizeof path, "expect.targets.%s.priority", id);
            return s_bad_case(file, path,
                              "must be \"normal\", \"high\" or \"urgent\"");
        }
        const json_t *fields = json_object_get(t, "fields");
        if (fields && !s_string_set(fields)) {
            snprintf(path, sizeof path, "expect.targets.%s.fields", id);
            return s_bad_case(file, path,
                              "must be an array of distinct field paths, "
                              "none empty");
        }
        const json_t *escalate = json_object_get(t, "escalate_to");
        if (escalate && !json_is_null(escalate) &&
            !(json_is_string(escalate) && *json_string_value(escalate))) {
            snprintf(path, sizeof path, "expect.targets.%s.escalate_to", id);
            return s_bad_case(file, path, "must be a partner id or null");
        }
    }
    return true;
}

/* The referral of a valid case: inline, or read from the file it names
 * (relative to the case's directory); NULL after saying why. */
static json_t *s_case_referral(const char *file, const json_t *doc)
{
    const json_t *referral = json_object_get(doc, "referral");
    if (json_is_object(referral))
        return json_incref((json_t *) referral);
    const char *name = json_string_value(referral);
    char path[4096];
    if (name[0] == '/')
        snprintf(path, sizeof path, "%s", name);
    else {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s", file);
        snprintf(path, sizeof path, "%s/%s", dirname(dir), name);
    }
    return s_json_file(path);
}

/* "a, b, c" of the strings of set, or "none"; ending in "..." when out
 * (at least 4 bytes) cannot hold them all. */
static void s_list(const json_t *set, char *out, size_t size)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < json_array_size(set) && used < size; i++)
        used +=
            (size_t) snprintf(out + used, size - used, "%s%s", i ? ", " : "",
                              json_string_value(json_array_get(set, i)));
    if (used >= size)
        memcpy(out + size - 4, "...", 4);
    else if (!out[0])
        snprintf(out, size, "none");
}

/* The projected field paths of target index, as an array; NULL when out
 * of memory. */
static json_t *s_result_fields(const kh_rules_result_t *result, size_t index)
{
    char *text = NULL;
    size_t len = 0;
    FILE *mem = open_memstream(&text, &len);
    if (!mem)
        return NULL;
    kh_rules_result_fields(result, index, mem);
    json_t *fields = fclose(mem) == 0 ? json_array() : NULL;
    for (char *line = text, *end; fields && line && *line; line = end + 1) {
        if (!(end = strchr(line, '\n')))
            break;
        *end = '\0';
        json_array_append_new(fields, json_string(line));
    }
    free(text);
    return fields;
}

/* The strings of a that b lacks. */
static json_t *s_minus(const json_t *a, const json_t *b)
{
    json_t *out = json_array();
    for (size_t i = 0; out && i < json_array_size(a); i++) {
        const json_t *v = json_array_get(a, i);
        bool found = false;
        for (size_t j = 0; j < json_array_size(b) && !found; j++)
            found = json_equal(v, json_array_get(b, j));
        if (!found)
            json_array_append(out, (json_t *) v);
    }
    return out;
}

static void s_compare_fields(s_case_t *c, const char *id, const json_t *want,
                             const json_t *got)
{
    char path[512], missing_s[2048], extra_s[2048];
    json_t *missing = s_minus(want, got), *extra = s_minus(got, want);
    snprintf(path, sizeof path, "expect.targets.%s.fields", id);
    if (!missing || !extra)
        s_differs(c, path, "out of memory");
    else if (json_array_size(missing) || json_array_size(extra)) {
        s_list(missing, missing_s, sizeof missing_s);
        s_list(extra, extra_s, sizeof extra_s);
        s_differs(c, path, "not sent: %s; sent besides: %s", missing_s,
                  extra_s);
    }
    json_decref(missing);
    json_decref(extra);
}

/* Compare what one partner is expected to get with the result. */
static void s_compare_target(s_case_t *c, const kh_rules_result_t *result,
                             const char *id, const json_t *want)
{
    char path[512];
    int index = kh_rules_result_find(result, id);
    if (index < 0) {
        snprintf(path, sizeof path, "expect.targets.%s", id);
        s_differs(c, path, "gets nothing");
        return;
    }
    const char *priority = json_string_value(json_object_get(want, "priority"));
    const char *got_priority =
        kh_priority_name(kh_rules_result_priority(result, (size_t) index));
    if (priority && strcmp(priority, got_priority) != 0) {
        snprintf(path, sizeof path, "expect.targets.%s.priority", id);
        s_differs(c, path, "want %s, got %s", priority, got_priority);
    }
    const json_t *fields = json_object_get(want, "fields");
    if (fields) {
        json_t *got = s_result_fields(result, (size_t) index);
        if (got)
            s_compare_fields(c, id, fields, got);
        else
            s_differs(c, "expect", "out of memory");
        json_decref(got);
    }
    const json_t *escalate = json_object_get(want, "escalate_to");
    const char *got_escalate =
        kh_rules_result_escalate_to(result, (size_t) index);
    if (escalate && (json_is_null(escalate)
                         ? got_escalate != NULL
                         : !got_escalate || strcmp(json_string_value(escalate),
                                                   got_escalate) != 0)) {
        snprintf(path, sizeof path, "expect.targets.%s.escalate_to", id);
        s_differs(c, path, "want %s, got %s",
                  json_is_null(escalate) ? "none" : json_string_value(escalate),
                  got_escalate ? got_escalate : "none");
    }
}

/* Compare the expectations of a valid case with the result. */
static void s_compare(s_case_t *c, const json_t *expect,
                      const kh_rules_result_t *result)
{
    const json_t *rules = json_object_get(expect, "rules");
    json_t *matched = json_array();
    for (size_t i = 0; matched && i < kh_rules_result_matched_count(result);
         i++)
        json_array_append_new(matched,
                              json_string(kh_rules_result_matched(result, i)));
    if (!matched)
        s_differs(c, "expect", "out of memory");
    else if (rules && !json_equal(rules, matched)) {
        char want_s[2048], got_s[2048];
        s_list(rules, want_s, sizeof want_s);
        s_list(matched, got_s, sizeof got_s);
        json_t *missing = s_minus(rules, matched);
        bool reordered = missing && json_array_size(missing) == 0 &&
                         json_array_size(rules) == json_array_size(matched);
        json_decref(missing);
        s_differs(c, "expect.rules", "want %s, got %s%s", want_s, got_s,
                  reordered ? " (the rules fire in file order)" : "");
    }
    json_decref(matched);

    const json_t *fallback = json_object_get(expect, "fallback");
    const char *reason = kh_rules_result_fallback_reason(result);
    if (fallback &&
        (json_is_false(fallback)
             ? reason != NULL
             : !reason || strcmp(json_string_value(fallback), reason) != 0))
        s_differs(c, "expect.fallback", "want %s, got %s",
                  json_is_false(fallback) ? "none"
                                          : json_string_value(fallback),
                  reason ? reason : "none");

    const json_t *targets = json_object_get(expect, "targets");
    const char *id;
    const json_t *want;
    json_object_foreach((json_t *) targets, id, want)
    {
        s_compare_target(c, result, id, want);
    }
    for (size_t i = 0; i < kh_rules_result_target_count(result); i++) {
        const char *partner = kh_rules_result_partner(result, i);
        if (!json_object_get(targets, partner))
            s_differs(c, "expect.targets", "%s gets it too (priority %s)",
                      partner,
                      kh_priority_name(kh_rules_result_priority(result, i)));
    }
}

/* The rules in rules_file (loaded with opts) with the registry that the
 * case file names, ids: each one registered and handling cases, every
 * other partner not. Set as routing sets them when the registry changes.
 * NULL after saying why on stderr. */
static kh_rules_t *s_case_rules(const kh_rules_options_t *opts,
                                const char *rules_file, const char *file,
                                const json_t *ids)
{
    s_partners_t partners = {0};
    bool ok = true;
    for (size_t i = 0; ok && i < json_array_size(ids); i++)
        ok =
            s_partners_add(&partners, json_string_value(json_array_get(ids, i)),
                           true) == 0;
    kh_rules_options_t o = *opts;
    o.report = NULL;
    kh_error_t err;
    kh_error_clear(&err);
    kh_rules_t *rules = ok ? kh_rules_load(rules_file, &o, &err) : NULL;
    if (rules)
        kh_rules_set_partners(rules, partners.list, partners.count);
    else if (!ok)
        fprintf(stderr, "ketenhubctl: %s: out of memory\n", file);
    else
        fprintf(stderr,
                "ketenhubctl: %s: cannot load %s again for its partners:"
                " %s (%s)\n",
                file, rules_file, err.message, kh_error_name(err.code));
    s_partners_free(&partners);
    return rules;
}

/* Run the case files against rules (loaded from rules_file with opts).
 * CTL_OK when every case held, CTL_FAIL when one did not, CTL_USAGE when
 * a file was no case (the others are run all the same). */
static int s_test_cases(const kh_rules_t *rules, const kh_rules_options_t *opts,
                        const char *rules_file, char **files, int count)
{
    int passed = 0, failed = 0, bad = 0;
    for (int i = 0; i < count; i++) {
        json_t *doc = s_json_file(files[i]);
        json_t *referral = doc && s_case_valid(files[i], doc)
                               ? s_case_referral(files[i], doc)
                               : NULL;
        kh_rules_t *own = NULL; /* with the case's own registry */
        kh_rules_result_t *result = NULL;
        const json_t *ids = referral ? json_object_get(doc, "partners") : NULL;
        if (ids)
            own = s_case_rules(opts, rules_file, files[i], ids);
        const kh_rules_t *use = own ? own : rules;
        if (!referral ||
            s_referral_invalid(opts->schema_path, referral, files[i])) {
            bad++;
        } else if (ids && !own) {
            bad++; /* said by s_case_rules */
        } else if (!(result = kh_rules_result_new(use))) {
            fprintf(stderr, "ketenhubctl: %s: out of memory\n", files[i]);
            bad++;
        } else {
            s_case_t c = {.file = files[i]};
            kh_rules_eval(use, referral, result);
            s_compare(&c, json_object_get(doc, "expect"), result);
            if (c.failed)
                failed++;
            else {
                printf("%s: ok\n", files[i]);
                passed++;
            }
        }
        kh_rules_result_destroy(&result);
        kh_rules_destroy(&own);
        json_decref(referral);
        json_decref(doc);
    }
    printf("%d case%s: %d as expected, %d not", count, count == 1 ? "" : "s",
           passed, failed);
    if (bad)
        printf(", %d no case (see stderr)", bad);
    printf("\n");
    return bad ? CTL_USAGE : failed ? CTL_FAIL : CTL_OK;
}

typedef enum { S_CHECK, S_EXPLAIN, S_TEST } s_mode_t;

static int s_run(int argc, char **argv, s_mode_t mode)
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
    bool explain = mode == S_EXPLAIN;
    int given = argc - optind;
    if (mode == S_TEST ? given < 2 : given != (explain ? 2 : 1)) {
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
    } else if (mode == S_CHECK) {
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
    } else if (mode == S_TEST) {
        if (!have_partners)
            printf("partners not checked (no --partners): every optional "
                   "target counts as registered\n");
        rc = s_test_cases(rules, &opts, file, argv + optind + 1, given - 1);
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
    return s_run(argc, argv, S_CHECK);
}

static int s_explain(int argc, char **argv)
{
    return s_run(argc, argv, S_EXPLAIN);
}

static int s_test(int argc, char **argv)
{
    return s_run(argc, argv, S_TEST);
}

int ctl_rules(int argc, char **argv)
{
    static const ctl_sub_t subs[] = {{"check", s_check},
                                     {"explain", s_explain},
                                     {"test", s_test},
                                     {NULL, NULL}};
    return ctl_dispatch("rules", argc, argv, subs, s_usage);
}
