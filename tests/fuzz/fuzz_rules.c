/*
 * libFuzzer harness for the routing rules (kh_rules_load_buffer: YAML,
 * the checks, the compiled conditions; kh_rules_eval and the projections).
 * The input is a rules file, checked against the referral schema and a
 * registry that holds a partner that does not handle cases (the
 * ketenregisseur). Beyond the sanitizers it checks that:
 *  - every problem reported while loading has a rules.* code (or
 *    KH_E_NOMEM), a message, and a line and column inside the input;
 *  - a file that loads has as its version the SHA-256 of its bytes, and
 *    loads again to the same rules;
 *  - for each example referral (schemas/examples), every target is a
 *    registered partner that handles cases (promise 5), and its
 *    projection, and its escalation copy's, hold no field the rules did
 *    not list for it (deny by default);
 *  - explaining an evaluation does not fail.
 * Seeds: corpus/rules (schemas/rules/default.yaml and
 * schemas/rules/invalid/); dictionary: rules.dict.
 */
#include <dirent.h>
#include <stddef.h>
#include <stdint.h>

#include "fuzz_util.h"
#include "ketenhub/proto.h"
#include "ketenhub/rules.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const kh_rules_partner_t s_partners[] = {
    {"veilig-thuis", true, false},
    {"zorgcoordinator", true, false},
    {"avim", true, false},
    {"arbeidsinspectie", true, false},
    {"meldpunt-hilversum", true, false},
    {"ketenregisseur", false, false},
};
#define S_PARTNERS (sizeof s_partners / sizeof s_partners[0])

#define S_EXAMPLES_MAX 16
static json_t *s_examples[S_EXAMPLES_MAX];
static size_t s_nexamples;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void) argc;
    (void) argv;
    DIR *dir = opendir(KH_FUZZ_EXAMPLES);
    if (!dir) {
        fprintf(stderr, "fuzz_rules: cannot read %s\n", KH_FUZZ_EXAMPLES);
        exit(2);
    }
    for (struct dirent *e;
         (e = readdir(dir)) && s_nexamples < S_EXAMPLES_MAX;) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".json") != 0)
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", KH_FUZZ_EXAMPLES, e->d_name);
        json_error_t jerr;
        json_t *doc = json_load_file(path, 0, &jerr);
        if (!doc) {
            fprintf(stderr, "fuzz_rules: %s: %s\n", path, jerr.text);
            exit(2);
        }
        s_examples[s_nexamples++] = doc;
    }
    closedir(dir);
    if (s_nexamples == 0) {
        fprintf(stderr, "fuzz_rules: no examples in %s\n", KH_FUZZ_EXAMPLES);
        exit(2);
    }
    return 0;
}

/* The input's lines and its longest line (bytes), for the positions.
 * Lines end as YAML ends them: CR LF, CR, LF, and NEL, LS, PS in UTF-8. */
typedef struct {
    int lines;
    int longest;
} s_shape_t;

static size_t s_break(const uint8_t *p, size_t left)
{
    if (p[0] == '\r')
        return left > 1 && p[1] == '\n' ? 2 : 1;
    if (p[0] == '\n')
        return 1;
    if (left > 1 && p[0] == 0xc2 && p[1] == 0x85)
        return 2;
    if (left > 2 && p[0] == 0xe2 && p[1] == 0x80 &&
        (p[2] == 0xa8 || p[2] == 0xa9))
        return 3;
    return 0;
}

static s_shape_t s_shape(const uint8_t *data, size_t size)
{
    s_shape_t shape = {1, 0};
    int col = 0;
    for (size_t i = 0; i < size;) {
        size_t n = s_break(data + i, size - i);
        if (n) {
            shape.lines++;
            col = 0;
            i += n;
            continue;
        }
        if (++col > shape.longest)
            shape.longest = col;
        i++;
    }
    return shape;
}

static void s_check_problem(const kh_error_t *err, const s_shape_t *shape)
{
    const char *name = kh_error_name(err->code);
    KH_FUZZ_CHECK(strncmp(name, "rules.", 6) == 0 || err->code == KH_E_NOMEM,
                  "refused with code %s", name);
    size_t mlen = strnlen(err->message, sizeof err->message);
    KH_FUZZ_CHECK(mlen > 0 && mlen < sizeof err->message,
                  "%s: empty or unterminated message", name);
    /* A position is in the file: YAML counts the line after a last
     * newline, and a column one past a line's end. */
    KH_FUZZ_CHECK(err->line >= 0 && err->line <= shape->lines + 1,
                  "%s: line %d of a file of %d lines", name, err->line,
                  shape->lines);
    KH_FUZZ_CHECK(err->column >= 0 && err->column <= shape->longest + 2,
                  "%s: column %d, the longest line has %d bytes", name,
                  err->column, shape->longest);
}

static void s_report(const kh_error_t *err, bool is_error, void *arg)
{
    (void) is_error;
    s_check_problem(err, arg);
}

/* Whether the path of a projected value ("a.b") is one of the listed
 * fields, or lies below one ("\n"-separated, as kh_rules_result_fields
 * writes them). */
static bool s_listed(const char *fields, const char *path)
{
    size_t plen = strlen(path);
    for (const char *f = fields; *f;) {
        const char *end = strchr(f, '\n');
        size_t flen = end ? (size_t) (end - f) : strlen(f);
        if (flen <= plen && strncmp(f, path, flen) == 0 &&
            (path[flen] == '\0' || path[flen] == '.'))
            return true;
        if (!end)
            break;
        f = end + 1;
    }
    return false;
}

/* Every leaf of projected (an object; arrays and scalars are leaves) is
 * under a listed field. */
static void s_check_projection(const json_t *projected, const char *fields,
                               char *path, size_t len, const char *who)
{
    const char *key;
    json_t *value;
    json_object_foreach((json_t *) projected, key, value)
    {
        int n = snprintf(path + len, 1024 - len, "%s%s", len ? "." : "", key);
        KH_FUZZ_CHECK(n > 0 && len + (size_t) n < 1024, "path too long");
        if (json_is_object(value) && json_object_size(value) > 0)
            s_check_projection(value, fields, path, len + (size_t) n, who);
        else
            KH_FUZZ_CHECK(s_listed(fields, path),
                          "%s receives %s, which its fields do not list:\n%s",
                          who, path, fields);
        path[len] = '\0';
    }
}

static void s_check_targets(const kh_rules_t *rules, const json_t *referral,
                            kh_rules_result_t *result)
{
    kh_rules_eval(rules, referral, result);
    for (size_t t = 0; t < kh_rules_result_target_count(result); t++) {
        const char *partner = kh_rules_result_partner(result, t);
        const kh_rules_partner_t *known = NULL;
        for (size_t p = 0; p < S_PARTNERS; p++)
            if (strcmp(s_partners[p].id, partner) == 0)
                known = &s_partners[p];
        KH_FUZZ_CHECK(known, "target %s is not registered", partner);
        KH_FUZZ_CHECK(known->handles_cases, "target %s does not handle cases",
                      partner);
        const char *esc = kh_rules_result_escalate_to(result, t);
        for (size_t p = 0; esc && p < S_PARTNERS; p++)
            KH_FUZZ_CHECK(strcmp(s_partners[p].id, esc) != 0 ||
                              s_partners[p].handles_cases,
                          "escalation to %s, which does not handle cases", esc);

        char *fields = NULL;
        size_t flen = 0;
        FILE *out = open_memstream(&fields, &flen);
        KH_FUZZ_CHECK(out, "open_memstream");
        kh_rules_result_fields(result, t, out);
        fclose(out);
        char path[1024] = "";
        json_t *projected = kh_rules_result_project(result, t, referral);
        KH_FUZZ_CHECK(projected, "no projection for %s", partner);
        s_check_projection(projected, fields, path, 0, partner);
        json_decref(projected);
        free(fields);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    s_shape_t shape = s_shape(data, size);
    kh_rules_options_t opts = {.schema_path = KH_FUZZ_SCHEMA,
                               .partners = s_partners,
                               .partner_count = S_PARTNERS,
                               .report = s_report,
                               .report_arg = &shape};
    const char *schema = getenv("KH_FUZZ_SCHEMA");
    if (schema)
        opts.schema_path = schema;
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(data, size, &opts, &err);
    if (!rules) {
        s_check_problem(&err, &shape);
        return 0;
    }

    unsigned char digest[32];
    char hex[65];
    kh_sha256(data, size, digest);
    for (size_t i = 0; i < sizeof digest; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    KH_FUZZ_CHECK(strcmp(kh_rules_version(rules), hex) == 0,
                  "version %s is not the file's SHA-256",
                  kh_rules_version(rules));
    kh_rules_t *again = kh_rules_load_buffer(data, size, &opts, &err);
    KH_FUZZ_CHECK(again, "loads once, then not: %s", err.message);
    KH_FUZZ_CHECK(kh_rules_count(again) == kh_rules_count(rules),
                  "two loads, two rule counts");
    kh_rules_destroy(&again);

    kh_rules_result_t *result = kh_rules_result_new(rules);
    KH_FUZZ_CHECK(result, "kh_rules_result_new");
    for (size_t i = 0; i < s_nexamples; i++) {
        s_check_targets(rules, s_examples[i], result);
        FILE *sink = fopen("/dev/null", "w");
        KH_FUZZ_CHECK(sink, "/dev/null");
        kh_rules_explain(rules, s_examples[i], sink);
        fclose(sink);
    }
    kh_rules_result_destroy(&result);
    kh_rules_destroy(&rules);
    return 0;
}
