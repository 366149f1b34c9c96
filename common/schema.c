/*
 * JSON Schema validator for the contracts in schemas/ (see schema.h for the
 * subset it implements and why it refuses everything else).
 *
 * kh_schema_load reads a schema file once and compiles it into a tree of
 * node_t: keywords become fields, enumerations of strings become sorted
 * arrays, patterns become compiled regex_t, $ref becomes a pointer. A
 * document is then checked by one walk over that tree, so validating costs
 * no parsing and no allocation. The walk reports only the first violation,
 * in a fixed order (see s_validate), so the same document always gets the
 * same error.
 *
 * Nothing in an error message comes from the document: messages are fixed
 * text or text from the schema (a bound, a title), and a field name that
 * is not a plain identifier is shown as "?" in paths.
 */
#include "ketenhub/schema.h"

#include <errno.h>
#include <locale.h>
#include <math.h>
#include <regex.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"

/* Bounds that keep a schema (not a document) reasonable. */
#define S_FILE_MAX (4 * 1024 * 1024) /* bytes of a schema file */
#define S_DEPTH_MAX 32               /* nesting of instance levels */
#define S_SEG_MAX 128                /* nesting of the schema's JSON */
#define S_NAME_MAX KH_PATH_KEY_MAX   /* length of a property name */

#define S_DRAFT "https://json-schema.org/draft/2020-12/schema"
#define S_REF_PREFIX "#/$defs/"

/* Instance types as a bit set; "integer" is its own bit so that a schema
 * can ask for it, and a number with no fraction satisfies it. */
enum {
    T_NULL = 1u << 0,
    T_BOOLEAN = 1u << 1,
    T_OBJECT = 1u << 2,
    T_ARRAY = 1u << 3,
    T_NUMBER = 1u << 4,
    T_STRING = 1u << 5,
    T_INTEGER = 1u << 6
};

static const struct {
    const char *name;
    unsigned bit;
} s_types[] = {{"null", T_NULL},      {"boolean", T_BOOLEAN},
               {"object", T_OBJECT},  {"array", T_ARRAY},
               {"number", T_NUMBER},  {"string", T_STRING},
               {"integer", T_INTEGER}};

enum { F_NONE, F_DATE, F_DATE_TIME };
enum { A_ANY, A_NONE, A_SCHEMA }; /* additionalProperties */

typedef struct s_node node_t;

typedef struct {
    const char *name; /* borrowed from the schema's JSON */
    size_t len;
    node_t *schema;
    bool required;
} prop_t;

typedef struct {
    const char *str; /* borrowed */
    size_t len;
} str_t;

typedef struct {
    node_t **v;
    size_t n;
} nodes_t;

struct s_node {
    bool is_bool; /* a boolean schema: true accepts all, false nothing */
    bool bool_value;
    const char *title; /* used as the message of a failed condition */
    node_t *ref;       /* resolved "$ref", or NULL */
    const char *ref_name;
    unsigned types; /* 0: any type */
    const json_t *const_value;
    const json_t *enum_values; /* the enum array, or NULL */
    str_t *enum_strings;       /* sorted, when every enum value is a string */
    size_t n_enum_strings;
    const json_t *minimum, *maximum, *xminimum, *xmaximum;
    long long min_length, max_length; /* -1: none */
    bool has_pattern;
    regex_t pattern;
    int format;
    node_t *items, *contains;
    long long min_items, max_items; /* -1: none */
    bool unique_items;
    prop_t *props; /* in schema order */
    size_t n_props;
    prop_t **props_sorted; /* by name, for looking up a document's keys */
    str_t *extra_required; /* required names that are not in properties */
    size_t n_extra_required;
    int additional;
    node_t *additional_schema;
    nodes_t all_of, any_of, one_of;
    node_t *not_, *if_, *then_, *else_;
    bool object_checks; /* any of the object keywords present */
    bool array_checks;
    bool string_checks;
    bool number_checks;
    int visit; /* for the cycle check at load: 0 new, 1 open, 2 done */
    int depth; /* instance depth below this node, computed at load */
};

struct _kh_schema_t {
    json_t *json;   /* the parsed file; nodes borrow strings and values */
    node_t **nodes; /* every allocated node, for destroy */
    size_t n_nodes, cap_nodes;
    node_t *root;
    const char **def_names; /* $defs, compiled, for resolving $ref */
    node_t **def_nodes;
    size_t n_defs;
    locale_t c_locale; /* patterns compile and run in the C locale */
};

/* ------------------------------------------------------------------ */
/* Small helpers shared by loading and validating                      */
/* ------------------------------------------------------------------ */

static bool s_is_number(const json_t *v)
{
    return json_is_integer(v) || json_is_real(v);
}

static double s_num(const json_t *v)
{
    return json_is_integer(v) ? (double) json_integer_value(v)
                              : json_real_value(v);
}

/* Compare two JSON numbers by value: -1, 0 or 1. Integers compare
 * exactly; otherwise as doubles. */
static int s_num_cmp(const json_t *a, const json_t *b)
{
    if (json_is_integer(a) && json_is_integer(b)) {
        json_int_t x = json_integer_value(a), y = json_integer_value(b);
        return x < y ? -1 : x > y;
    }
    double x = s_num(a), y = s_num(b);
    return x < y ? -1 : x > y;
}

/* JSON Schema equality: numbers by value (1 equals 1.0), strings by bytes,
 * arrays element by element, objects by their sets of members. */
static bool s_equal(const json_t *a, const json_t *b)
{
    if (s_is_number(a) && s_is_number(b))
        return s_num_cmp(a, b) == 0;
    if (json_typeof(a) != json_typeof(b))
        return false;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b),
                      json_string_length(a)) == 0;
    case JSON_ARRAY: {
        size_t n = json_array_size(a);
        if (n != json_array_size(b))
            return false;
        for (size_t i = 0; i < n; i++)
            if (!s_equal(json_array_get(a, i), json_array_get(b, i)))
                return false;
        return true;
    }
    case JSON_OBJECT: {
        if (json_object_size(a) != json_object_size(b))
            return false;
        json_t *oa = (json_t *) a; /* jansson's iterators are not const */
        for (void *it = json_object_iter(oa); it;
             it = json_object_iter_next(oa, it)) {
            const json_t *other = json_object_getn(
                b, json_object_iter_key(it), json_object_iter_key_len(it));
            if (!other || !s_equal(json_object_iter_value(it), other))
                return false;
        }
        return true;
    }
    default:
        return true; /* null, true, false: same type is same value */
    }
}

static int s_str_cmp(const void *pa, const void *pb)
{
    const str_t *a = pa, *b = pb;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->str, b->str, n);
    if (c)
        return c;
    return a->len < b->len ? -1 : a->len > b->len;
}

static int s_prop_cmp(const void *pa, const void *pb)
{
    const prop_t *a = *(prop_t *const *) pa, *b = *(prop_t *const *) pb;
    str_t x = {a->name, a->len}, y = {b->name, b->len};
    return s_str_cmp(&x, &y);
}

static prop_t *s_find_prop(const node_t *n, const char *name, size_t len)
{
    size_t lo = 0, hi = n->n_props;
    str_t key = {name, len};
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        str_t probe = {n->props_sorted[mid]->name, n->props_sorted[mid]->len};
        int c = s_str_cmp(&key, &probe);
        if (c == 0)
            return n->props_sorted[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

static bool s_is_leap(int y)
{
    return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

static int s_days_in_month(int y, int m)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return m == 2 && s_is_leap(y) ? 29 : days[m - 1];
}

/* Parse n decimal digits at s; -1 if any is not a digit. */
static int s_digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

/* RFC 3339 full-date "YYYY-MM-DD" naming a real calendar day, year 0001
 * to 9999. */
static bool s_is_date(const char *s, size_t len)
{
    if (len != 10 || s[4] != '-' || s[7] != '-')
        return false;
    int y = s_digits(s, 4), m = s_digits(s + 5, 2), d = s_digits(s + 8, 2);
    if (y < 1 || m < 1 || m > 12 || d < 1)
        return false; /* year 0000 too: most date libraries have no year 0 */
    return d <= s_days_in_month(y, m);
}

/* RFC 3339 date-time: full-date "T" HH:MM:SS[.frac] ("Z" / +HH:MM /
 * -HH:MM); "T" and "Z" in either case. Leap seconds (:60) are refused, as
 * common validators (Python's rfc3339-validator) refuse them. */
static bool s_is_date_time(const char *s, size_t len)
{
    if (len < 20 || !s_is_date(s, 10) || (s[10] != 'T' && s[10] != 't'))
        return false;
    const char *t = s + 11;
    if (t[2] != ':' || t[5] != ':')
        return false;
    int h = s_digits(t, 2), mi = s_digits(t + 3, 2), sec = s_digits(t + 6, 2);
    if (h < 0 || h > 23 || mi < 0 || mi > 59 || sec < 0 || sec > 59)
        return false;
    size_t i = 19;
    if (i < len && s[i] == '.') {
        size_t start = ++i;
        while (i < len && s[i] >= '0' && s[i] <= '9')
            i++;
        if (i == start)
            return false;
    }
    if (i == len)
        return false;
    if ((s[i] == 'Z' || s[i] == 'z') && i + 1 == len)
        return true;
    if ((s[i] != '+' && s[i] != '-') || len - i != 6 || s[i + 3] != ':')
        return false;
    int oh = s_digits(s + i + 1, 2), om = s_digits(s + i + 4, 2);
    return oh >= 0 && oh <= 23 && om >= 0 && om <= 59;
}

/* ------------------------------------------------------------------ */
/* Loading                                                             */
/* ------------------------------------------------------------------ */

/* Compile context: where in the schema's JSON the compiler is, so that an
 * error can name the keyword by JSON Pointer and find its line. */
typedef struct {
    kh_schema_t *self;
    const char *text;
    size_t text_len;
    kh_error_t *err;
    const char *segs[S_SEG_MAX];
    char index_buf[S_SEG_MAX][24];
    size_t depth;
    bool at_root;
} cc_t;

static int s_push(cc_t *cc, const char *seg)
{
    if (cc->depth >= S_SEG_MAX)
        return kh_error_set(cc->err, KH_E_SCHEMA_INVALID, "",
                            "schema nested too deeply");
    cc->segs[cc->depth++] = seg;
    return 0;
}

static int s_push_index(cc_t *cc, size_t index)
{
    if (cc->depth >= S_SEG_MAX)
        return kh_error_set(cc->err, KH_E_SCHEMA_INVALID, "",
                            "schema nested too deeply");
    snprintf(cc->index_buf[cc->depth], sizeof cc->index_buf[0], "%zu", index);
    cc->segs[cc->depth] = cc->index_buf[cc->depth];
    cc->depth++;
    return 0;
}

static void s_pop(cc_t *cc)
{
    cc->depth--;
}

/* Decode one JSON string starting after its opening quote at text[*pos];
 * leaves *pos after the closing quote. Simple escapes are decoded, \u
 * escapes are kept verbatim (schema keys we look for are plain ASCII).
 * Returns the decoded length, truncated to cap - 1. */
static size_t s_scan_string(const char *text, size_t len, size_t *pos,
                            char *out, size_t cap)
{
    size_t n = 0, i = *pos;
    while (i < len && text[i] != '"') {
        char c = text[i++];
        if (c == '\\' && i < len) {
            char e = text[i++];
            switch (e) {
            case 'n':
                c = '\n';
                break;
            case 't':
                c = '\t';
                break;
            case 'r':
                c = '\r';
                break;
            case 'b':
                c = '\b';
                break;
            case 'f':
                c = '\f';
                break;
            case 'u':
                c = '\\';
                i--;
                break;
            default:
                c = e;
                break;
            }
        }
        if (n + 1 < cap)
            out[n++] = c;
    }
    if (cap)
        out[n < cap ? n : cap - 1] = '\0';
    *pos = i < len ? i + 1 : i;
    return n;
}

/* Find the line and column of the member or element that the JSON Pointer
 * segs[0..n) names in text, by scanning the JSON text while tracking the
 * path. Leaves *line and *col 0 when it cannot be found. */
static void s_locate(const char *text, size_t len, const char *const *segs,
                     size_t n, int *line, int *col)
{
    /* matched[d]: the container at depth d lies on the target path. */
    bool matched[S_SEG_MAX + 1];
    bool is_obj[S_SEG_MAX + 1];
    size_t index[S_SEG_MAX + 1];
    size_t depth = 0, pos = 0;
    int ln = 1, cl = 1;
    bool next_matches = true; /* the root lies on every path */
    bool expect_key = false;
    char key[256];
    size_t line_start = 0;

    *line = 0;
    *col = 0;
    if (n == 0) {
        *line = 1;
        *col = 1;
        return;
    }
    while (pos < len) {
        char c = text[pos];
        if (c == '\n') {
            ln++;
            line_start = pos + 1;
            pos++;
            continue;
        }
        if (c == ' ' || c == '\t' || c == '\r' || c == ',' || c == ':') {
            pos++;
            continue;
        }
        cl = (int) (pos - line_start) + 1;
        if (depth > 0 && !is_obj[depth - 1] && c != ']') {
            /* An array element starts here. */
            size_t d = depth - 1;
            char want[24];
            snprintf(want, sizeof want, "%zu", index[d]);
            next_matches = d < n && matched[d] && strcmp(segs[d], want) == 0;
            if (next_matches && d + 1 == n) {
                *line = ln;
                *col = cl;
                return;
            }
            index[d]++;
        }
        if (expect_key && c == '"') {
            size_t d = depth - 1;
            size_t start = pos++;
            s_scan_string(text, len, &pos, key, sizeof key);
            next_matches = d < n && matched[d] && strcmp(segs[d], key) == 0;
            if (next_matches && d + 1 == n) {
                *line = ln;
                *col = (int) (start - line_start) + 1;
                return;
            }
            expect_key = false;
            continue;
        }
        if (c == '{' || c == '[') {
            if (depth >= S_SEG_MAX)
                return;
            matched[depth] = next_matches;
            is_obj[depth] = c == '{';
            index[depth] = 0;
            depth++;
            expect_key = c == '{';
            pos++;
            continue;
        }
        if (c == '}' || c == ']') {
            if (depth == 0)
                return;
            depth--;
            pos++;
            expect_key = depth > 0 && is_obj[depth - 1];
            continue;
        }
        /* A scalar value: skip it; in an object a key comes next. */
        if (c == '"') {
            pos++;
            s_scan_string(text, len, &pos, key, sizeof key);
        } else {
            while (pos < len && !strchr(",]} \t\r\n", text[pos]))
                pos++;
        }
        if (depth > 0 && is_obj[depth - 1])
            expect_key = true;
    }
}

/* Render segs as a JSON Pointer ("/properties/age/maximum"). */
static void s_pointer(const cc_t *cc, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n && o + 1 < cap; i++) {
        out[o++] = '/';
        for (const char *p = cc->segs[i]; *p && o + 2 < cap; p++) {
            if (*p == '~' || *p == '/') {
                out[o++] = '~';
                out[o++] = *p == '~' ? '0' : '1';
            } else
                out[o++] = *p;
        }
    }
    out[o < cap ? o : cap - 1] = '\0';
}

/* Fail the load at the current position plus keyword (NULL: the current
 * position itself), with its line and column. */
static int s_invalid(cc_t *cc, const char *keyword, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int s_invalid(cc_t *cc, const char *keyword, const char *fmt, ...)
{
    char pointer[KH_ERROR_PATH_MAX], message[KH_ERROR_MESSAGE_MAX];
    int line = 0, col = 0;
    size_t n = cc->depth;
    if (keyword && n < S_SEG_MAX)
        cc->segs[n++] = keyword;
    s_pointer(cc, n, pointer, sizeof pointer);
    s_locate(cc->text, cc->text_len, cc->segs, n, &line, &col);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return kh_error_set_at(cc->err, KH_E_SCHEMA_INVALID, pointer, line, col,
                           "%s", message);
}

static node_t *s_node_new(cc_t *cc)
{
    kh_schema_t *self = cc->self;
    if (self->n_nodes == self->cap_nodes) {
        size_t cap = self->cap_nodes ? self->cap_nodes * 2 : 64;
        node_t **v = realloc(self->nodes, cap * sizeof *v);
        if (!v)
            return NULL;
        self->nodes = v;
        self->cap_nodes = cap;
    }
    node_t *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->min_length = n->max_length = -1;
    n->min_items = n->max_items = -1;
    self->nodes[self->n_nodes++] = n;
    return n;
}

static void s_node_free(node_t *n)
{
    if (n->has_pattern)
        regfree(&n->pattern);
    free(n->enum_strings);
    free(n->props);
    free(n->props_sorted);
    free(n->extra_required);
    free(n->all_of.v);
    free(n->any_of.v);
    free(n->one_of.v);
    free(n);
}

static int s_nomem(cc_t *cc)
{
    return kh_error_set(cc->err, KH_E_NOMEM, "", "out of memory");
}

static int s_compile(cc_t *cc, const json_t *js, node_t **out);

/* Compile js[keyword] as a subschema into *out (left NULL if absent). */
static int s_sub(cc_t *cc, const json_t *js, const char *keyword, node_t **out)
{
    const json_t *v = json_object_get(js, keyword);
    if (!v)
        return 0;
    if (s_push(cc, keyword))
        return -1;
    int rc = s_compile(cc, v, out);
    s_pop(cc);
    return rc;
}

/* Compile js[keyword], a non-empty array of subschemas. */
static int s_sub_list(cc_t *cc, const json_t *js, const char *keyword,
                      nodes_t *out)
{
    const json_t *v = json_object_get(js, keyword);
    if (!v)
        return 0;
    if (!json_is_array(v) || json_array_size(v) == 0)
        return s_invalid(cc, keyword, "must be a non-empty array of schemas");
    out->v = calloc(json_array_size(v), sizeof *out->v);
    if (!out->v)
        return s_nomem(cc);
    if (s_push(cc, keyword))
        return -1;
    for (size_t i = 0; i < json_array_size(v); i++) {
        if (s_push_index(cc, i) ||
            s_compile(cc, json_array_get(v, i), &out->v[i]))
            return -1;
        out->n++;
        s_pop(cc);
    }
    s_pop(cc);
    return 0;
}

/* A non-negative integer keyword (minLength, maxItems, ...) into *out. */
static int s_count(cc_t *cc, const json_t *js, const char *keyword,
                   long long *out)
{
    const json_t *v = json_object_get(js, keyword);
    if (!v)
        return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return s_invalid(cc, keyword, "must be a non-negative integer");
    *out = (long long) json_integer_value(v);
    return 0;
}

static int s_number_kw(cc_t *cc, const json_t *js, const char *keyword,
                       const json_t **out)
{
    const json_t *v = json_object_get(js, keyword);
    if (!v)
        return 0;
    if (!s_is_number(v))
        return s_invalid(cc, keyword, "must be a number");
    *out = v;
    return 0;
}

static int s_string_kw(cc_t *cc, const json_t *js, const char *keyword,
                       const char **out)
{
    const json_t *v = json_object_get(js, keyword);
    if (!v)
        return 0;
    if (!json_is_string(v))
        return s_invalid(cc, keyword, "must be a string");
    if (out)
        *out = json_string_value(v);
    return 0;
}

/*
 * Whether a pattern means the same in ECMA-262 (what JSON Schema
 * specifies) and in POSIX ERE run by regexec in the C locale, where a
 * "character" is a byte. The accepted subset: printable ASCII only; "^"
 * first and "$" last and nowhere else; no backslash, no "." (the two
 * disagree on newlines), no "(?", no lazy or possessive quantifiers, no
 * "|" outside parentheses, no empty alternatives; bracket expressions of
 * literal characters and ranges only (no "[:", "[=", "[.", not empty);
 * a negated bracket expression only under "*" or "+" (a count of bytes
 * and of code points differ for non-ASCII text, "one or more" does not);
 * braces only as {m}, {m,} or {m,n}. On failure *why says what.
 */
static bool s_pattern_portable(const char *p, const char **why)
{
    size_t len = strlen(p);
    int parens = 0;
    bool have_atom = false; /* a quantifier may follow */
    bool negated_atom = false;
    bool quantified = false;

    if (len < 2 || p[0] != '^' || p[len - 1] != '$') {
        *why = "must be anchored with ^ and $";
        return false;
    }
    for (size_t i = 1; i + 1 < len; i++) {
        unsigned char c = (unsigned char) p[i];
        if (c < 0x20 || c > 0x7e) {
            *why = "must be printable ASCII";
            return false;
        }
        if (negated_atom && c != '*' && c != '+') {
            *why = "a negated bracket expression needs * or +";
            return false;
        }
        switch (c) {
        case '\\':
            *why = "backslash escapes differ between ECMA-262 and POSIX";
            return false;
        case '.':
            *why = "\".\" differs on newlines; use a bracket expression";
            return false;
        case '^':
        case '$':
            *why = "^ and $ only at the ends";
            return false;
        case '(':
            if (p[i + 1] == '?' || p[i + 1] == ')' || p[i + 1] == '|') {
                *why = "no (? groups and no empty alternatives";
                return false;
            }
            parens++;
            have_atom = false;
            quantified = false;
            break;
        case ')':
            if (parens == 0) {
                *why = "unbalanced parentheses";
                return false;
            }
            parens--;
            have_atom = true;
            quantified = false;
            break;
        case '|':
            if (parens == 0) {
                *why = "put alternatives in parentheses";
                return false;
            }
            if (p[i + 1] == '|' || p[i + 1] == ')') {
                *why = "no empty alternatives";
                return false;
            }
            have_atom = false;
            quantified = false;
            break;
        case '*':
        case '+':
        case '?':
            if (!have_atom || quantified) {
                *why = "a quantifier must follow a single atom";
                return false;
            }
            if (c == '?' && negated_atom) {
                *why = "a negated bracket expression needs * or +";
                return false;
            }
            quantified = true;
            negated_atom = false;
            break;
        case '{': {
            size_t j = i + 1, digits = 0;
            while (p[j] >= '0' && p[j] <= '9')
                j++, digits++;
            if (digits && p[j] == ',') {
                j++;
                while (p[j] >= '0' && p[j] <= '9')
                    j++;
            }
            if (!have_atom || quantified || !digits || p[j] != '}') {
                *why = "braces only as {m}, {m,} or {m,n} after an atom";
                return false;
            }
            i = j;
            quantified = true;
            break;
        }
        case '}':
        case ']':
            *why = "unmatched } or ]";
            return false;
        case '[': {
            size_t j = i + 1;
            bool negated = p[j] == '^';
            if (negated)
                j++;
            if (p[j] == ']') {
                *why = "empty bracket expression";
                return false;
            }
            for (; j + 1 < len && p[j] != ']'; j++) {
                if (p[j] == '[' || p[j] == '\\' || p[j] < 0x20 || p[j] > 0x7e) {
                    *why = "brackets hold only literals and ranges";
                    return false;
                }
            }
            if (j + 1 >= len) {
                *why = "unterminated bracket expression";
                return false;
            }
            i = j;
            have_atom = true;
            quantified = false;
            negated_atom = negated;
            break;
        }
        default:
            have_atom = true;
            quantified = false;
            break;
        }
    }
    if (negated_atom) {
        *why = "a negated bracket expression needs * or +";
        return false;
    }
    if (parens) {
        *why = "unbalanced parentheses";
        return false;
    }
    return true;
}

static int s_compile_pattern(cc_t *cc, node_t *n, const json_t *js)
{
    const char *src = NULL;
    if (s_string_kw(cc, js, "pattern", &src))
        return -1;
    if (!src)
        return 0;
    const char *why = NULL;
    if (!s_pattern_portable(src, &why))
        return s_invalid(cc, "pattern",
                         "pattern not in the portable subset: %s", why);
    locale_t old = uselocale(cc->self->c_locale);
    int rc = regcomp(&n->pattern, src, REG_EXTENDED | REG_NOSUB);
    uselocale(old);
    if (rc != 0)
        return s_invalid(cc, "pattern", "pattern does not compile");
    n->has_pattern = true;
    return 0;
}

static int s_compile_type(cc_t *cc, node_t *n, const json_t *js)
{
    const json_t *v = json_object_get(js, "type");
    if (!v)
        return 0;
    size_t count = json_is_array(v) ? json_array_size(v) : 1;
    if (!(json_is_string(v) || (json_is_array(v) && count > 0)))
        return s_invalid(cc, "type", "must be a type name or an array of them");
    for (size_t i = 0; i < count; i++) {
        const json_t *t = json_is_array(v) ? json_array_get(v, i) : v;
        unsigned bit = 0;
        for (size_t k = 0; json_is_string(t) && k < 7; k++)
            if (strcmp(json_string_value(t), s_types[k].name) == 0)
                bit = s_types[k].bit;
        if (!bit || (n->types & bit))
            return s_invalid(cc, "type", "unknown or repeated type name");
        n->types |= bit;
    }
    return 0;
}

static int s_compile_enum(cc_t *cc, node_t *n, const json_t *js)
{
    const json_t *v = json_object_get(js, "enum");
    if (!v)
        return 0;
    size_t count = json_array_size(v);
    if (!json_is_array(v) || count == 0)
        return s_invalid(cc, "enum", "must be a non-empty array");
    n->enum_values = v;
    for (size_t i = 0; i < count; i++)
        if (!json_is_string(json_array_get(v, i)))
            return 0; /* mixed: compared one by one */
    n->enum_strings = calloc(count, sizeof *n->enum_strings);
    if (!n->enum_strings)
        return s_nomem(cc);
    for (size_t i = 0; i < count; i++) {
        const json_t *s = json_array_get(v, i);
        n->enum_strings[i].str = json_string_value(s);
        n->enum_strings[i].len = json_string_length(s);
    }
    qsort(n->enum_strings, count, sizeof *n->enum_strings, s_str_cmp);
    n->n_enum_strings = count;
    return 0;
}

static int s_compile_properties(cc_t *cc, node_t *n, const json_t *js)
{
    const json_t *props = json_object_get(js, "properties");
    const json_t *req = json_object_get(js, "required");

    if (props) {
        if (!json_is_object(props))
            return s_invalid(cc, "properties", "must be an object");
        size_t count = json_object_size(props);
        n->props = calloc(count ? count : 1, sizeof *n->props);
        n->props_sorted = calloc(count ? count : 1, sizeof *n->props_sorted);
        if (!n->props || !n->props_sorted)
            return s_nomem(cc);
        if (s_push(cc, "properties"))
            return -1;
        json_t *obj = (json_t *) props;
        for (void *it = json_object_iter(obj); it;
             it = json_object_iter_next(obj, it)) {
            const char *name = json_object_iter_key(it);
            size_t len = json_object_iter_key_len(it);
            if (!kh_path_is_identifier(name, len))
                return s_invalid(cc, name,
                                 "property names must be identifiers "
                                 "([A-Za-z_][A-Za-z0-9_]*, at most %d)",
                                 S_NAME_MAX);
            prop_t *p = &n->props[n->n_props];
            p->name = name;
            p->len = len;
            if (s_push(cc, name) ||
                s_compile(cc, json_object_iter_value(it), &p->schema))
                return -1;
            s_pop(cc);
            n->props_sorted[n->n_props++] = p;
        }
        s_pop(cc);
        qsort(n->props_sorted, n->n_props, sizeof *n->props_sorted, s_prop_cmp);
    }
    if (req) {
        size_t count = json_array_size(req);
        if (!json_is_array(req))
            return s_invalid(cc, "required", "must be an array of names");
        n->extra_required =
            calloc(count ? count : 1, sizeof *n->extra_required);
        if (!n->extra_required)
            return s_nomem(cc);
        for (size_t i = 0; i < count; i++) {
            const json_t *name = json_array_get(req, i);
            size_t len = json_string_length(name);
            bool repeated = false;
            for (size_t k = 0; json_is_string(name) && k < i; k++)
                repeated |= s_equal(name, json_array_get(req, k));
            if (!json_is_string(name) ||
                !kh_path_is_identifier(json_string_value(name), len) ||
                repeated) {
                if (s_push(cc, "required"))
                    return -1;
                s_push_index(cc, i);
                return s_invalid(cc, NULL, "must be a distinct identifier");
            }
            prop_t *p = n->n_props
                            ? s_find_prop(n, json_string_value(name), len)
                            : NULL;
            if (p)
                p->required = true;
            else {
                n->extra_required[n->n_extra_required].str =
                    json_string_value(name);
                n->extra_required[n->n_extra_required++].len = len;
            }
        }
    }
    return 0;
}

static int s_compile_additional(cc_t *cc, node_t *n, const json_t *js)
{
    const json_t *v = json_object_get(js, "additionalProperties");
    if (!v)
        return 0;
    if (json_is_false(v)) {
        n->additional = A_NONE;
        return 0;
    }
    if (json_is_true(v))
        return 0;
    n->additional = A_SCHEMA;
    return s_sub(cc, js, "additionalProperties", &n->additional_schema);
}

static int s_compile_ref(cc_t *cc, node_t *n, const json_t *js)
{
    const char *ref = NULL;
    if (s_string_kw(cc, js, "$ref", &ref))
        return -1;
    if (!ref)
        return 0;
    size_t plen = strlen(S_REF_PREFIX);
    const char *name = ref + plen;
    const json_t *defs = json_object_get(cc->self->json, "$defs");
    if (strncmp(ref, S_REF_PREFIX, plen) != 0 || strpbrk(name, "/~") ||
        !json_object_get(defs, name))
        return s_invalid(cc, "$ref",
                         "only local references \"#/$defs/name\" to an "
                         "existing definition are supported");
    n->ref_name = name;
    return 0;
}

/* Every keyword of the subset; anything else is refused at load. */
static const char *const s_keywords[] = {"$schema",
                                         "$id",
                                         "$defs",
                                         "$ref",
                                         "$comment",
                                         "title",
                                         "description",
                                         "examples",
                                         "type",
                                         "properties",
                                         "required",
                                         "additionalProperties",
                                         "enum",
                                         "const",
                                         "minimum",
                                         "maximum",
                                         "exclusiveMinimum",
                                         "exclusiveMaximum",
                                         "minLength",
                                         "maxLength",
                                         "pattern",
                                         "format",
                                         "items",
                                         "minItems",
                                         "maxItems",
                                         "uniqueItems",
                                         "contains",
                                         "allOf",
                                         "anyOf",
                                         "oneOf",
                                         "not",
                                         "if",
                                         "then",
                                         "else"};

static int s_check_keywords(cc_t *cc, const json_t *js)
{
    json_t *obj = (json_t *) js;
    for (void *it = json_object_iter(obj); it;
         it = json_object_iter_next(obj, it)) {
        const char *key = json_object_iter_key(it);
        bool known = false;
        for (size_t i = 0; i < sizeof s_keywords / sizeof *s_keywords; i++)
            known |= strcmp(key, s_keywords[i]) == 0;
        if (!known)
            return s_invalid(cc, key, "unsupported keyword");
        bool root_only = strcmp(key, "$schema") == 0 ||
                         strcmp(key, "$id") == 0 || strcmp(key, "$defs") == 0;
        if (root_only && !cc->at_root)
            return s_invalid(cc, key, "only allowed at the top level");
    }
    return 0;
}

static int s_compile_meta(cc_t *cc, node_t *n, const json_t *js)
{
    const char *draft = NULL;
    if (s_string_kw(cc, js, "$schema", &draft) ||
        s_string_kw(cc, js, "$id", NULL) ||
        s_string_kw(cc, js, "$comment", NULL) ||
        s_string_kw(cc, js, "title", &n->title) ||
        s_string_kw(cc, js, "description", NULL))
        return -1;
    if (draft && strcmp(draft, S_DRAFT) != 0)
        return s_invalid(cc, "$schema", "only draft 2020-12 is supported");
    const json_t *examples = json_object_get(js, "examples");
    if (examples && !json_is_array(examples))
        return s_invalid(cc, "examples", "must be an array");
    return 0;
}

static int s_compile_string_kws(cc_t *cc, node_t *n, const json_t *js)
{
    const char *format = NULL;
    if (s_count(cc, js, "minLength", &n->min_length) ||
        s_count(cc, js, "maxLength", &n->max_length) ||
        s_compile_pattern(cc, n, js) || s_string_kw(cc, js, "format", &format))
        return -1;
    if (format) {
        if (strcmp(format, "date") == 0)
            n->format = F_DATE;
        else if (strcmp(format, "date-time") == 0)
            n->format = F_DATE_TIME;
        else
            return s_invalid(cc, "format",
                             "only formats \"date\" and \"date-time\" are "
                             "supported");
    }
    n->string_checks = n->min_length >= 0 || n->max_length >= 0 ||
                       n->has_pattern || n->format != F_NONE;
    return 0;
}

static int s_compile_array_kws(cc_t *cc, node_t *n, const json_t *js)
{
    const json_t *unique = json_object_get(js, "uniqueItems");
    if (unique && !json_is_boolean(unique))
        return s_invalid(cc, "uniqueItems", "must be a boolean");
    n->unique_items = json_is_true(unique);
    const json_t *items = json_object_get(js, "items");
    if (json_is_array(items))
        return s_invalid(cc, "items",
                         "must be a schema (prefixItems is not supported)");
    if (s_count(cc, js, "minItems", &n->min_items) ||
        s_count(cc, js, "maxItems", &n->max_items) ||
        s_sub(cc, js, "items", &n->items) ||
        s_sub(cc, js, "contains", &n->contains))
        return -1;
    n->array_checks = n->min_items >= 0 || n->max_items >= 0 ||
                      n->unique_items || n->items || n->contains;
    return 0;
}

/* Compile the $defs of the root, so that $ref can point at them. */
static int s_compile_defs(cc_t *cc, const json_t *js)
{
    const json_t *defs = json_object_get(js, "$defs");
    if (!defs)
        return 0;
    if (!json_is_object(defs))
        return s_invalid(cc, "$defs", "must be an object of schemas");
    size_t count = json_object_size(defs);
    kh_schema_t *self = cc->self;
    self->def_names = calloc(count ? count : 1, sizeof *self->def_names);
    self->def_nodes = calloc(count ? count : 1, sizeof *self->def_nodes);
    if (!self->def_names || !self->def_nodes)
        return s_nomem(cc);
    if (s_push(cc, "$defs"))
        return -1;
    json_t *obj = (json_t *) defs;
    for (void *it = json_object_iter(obj); it;
         it = json_object_iter_next(obj, it)) {
        const char *name = json_object_iter_key(it);
        if (s_push(cc, name) || s_compile(cc, json_object_iter_value(it),
                                          &self->def_nodes[self->n_defs]))
            return -1;
        s_pop(cc);
        self->def_names[self->n_defs++] = name;
    }
    s_pop(cc);
    return 0;
}

/* Compile one schema (an object or a boolean) into *out. */
static int s_compile(cc_t *cc, const json_t *js, node_t **out)
{
    node_t *n = s_node_new(cc);
    if (!n)
        return s_nomem(cc);
    *out = n;
    if (json_is_boolean(js)) {
        n->is_bool = true;
        n->bool_value = json_is_true(js);
        return 0;
    }
    if (!json_is_object(js))
        return s_invalid(cc, NULL, "a schema must be an object or a boolean");
    if (s_check_keywords(cc, js))
        return -1;
    bool root = cc->at_root;
    cc->at_root = false;
    if (root && s_compile_defs(cc, js))
        return -1;

    const json_t *c = json_object_get(js, "const");
    n->const_value = c;
    if (s_compile_meta(cc, n, js) || s_compile_ref(cc, n, js) ||
        s_compile_type(cc, n, js) || s_compile_enum(cc, n, js) ||
        s_number_kw(cc, js, "minimum", &n->minimum) ||
        s_number_kw(cc, js, "maximum", &n->maximum) ||
        s_number_kw(cc, js, "exclusiveMinimum", &n->xminimum) ||
        s_number_kw(cc, js, "exclusiveMaximum", &n->xmaximum) ||
        s_compile_string_kws(cc, n, js) || s_compile_array_kws(cc, n, js) ||
        s_compile_properties(cc, n, js) || s_compile_additional(cc, n, js) ||
        s_sub_list(cc, js, "allOf", &n->all_of) ||
        s_sub_list(cc, js, "anyOf", &n->any_of) ||
        s_sub_list(cc, js, "oneOf", &n->one_of) ||
        s_sub(cc, js, "not", &n->not_) || s_sub(cc, js, "if", &n->if_) ||
        s_sub(cc, js, "then", &n->then_) || s_sub(cc, js, "else", &n->else_))
        return -1;
    n->number_checks = n->minimum || n->maximum || n->xminimum || n->xmaximum;
    n->object_checks =
        n->n_props || n->n_extra_required || n->additional != A_ANY;
    return 0;
}

/* Resolve every $ref to its compiled definition. */
static void s_resolve_refs(kh_schema_t *self)
{
    for (size_t i = 0; i < self->n_nodes; i++) {
        node_t *n = self->nodes[i];
        for (size_t d = 0; n->ref_name && d < self->n_defs; d++)
            if (strcmp(n->ref_name, self->def_names[d]) == 0)
                n->ref = self->def_nodes[d];
    }
}

/* Depth-first walk: refuse $ref cycles (a recursive schema could make a
 * walk unbounded) and compute how deep in a document the node reaches.
 * Returns -1 on a cycle. */
static int s_walk(node_t *n)
{
    if (!n)
        return 0;
    if (n->visit == 1)
        return -1;
    if (n->visit == 2)
        return 0;
    n->visit = 1;
    int below = 0; /* deepest instance level reached beneath n */
    node_t *same_level[] = {n->ref, n->not_, n->if_, n->then_, n->else_};
    node_t *next_level[] = {n->items, n->contains, n->additional_schema};
    for (size_t i = 0; i < sizeof same_level / sizeof *same_level; i++) {
        if (s_walk(same_level[i]))
            return -1;
        if (same_level[i] && same_level[i]->depth > below)
            below = same_level[i]->depth;
    }
    for (size_t i = 0; i < sizeof next_level / sizeof *next_level; i++) {
        if (s_walk(next_level[i]))
            return -1;
        if (next_level[i] && next_level[i]->depth + 1 > below)
            below = next_level[i]->depth + 1;
    }
    for (size_t i = 0; i < n->n_props; i++) {
        if (s_walk(n->props[i].schema))
            return -1;
        if (n->props[i].schema->depth + 1 > below)
            below = n->props[i].schema->depth + 1;
    }
    const nodes_t *lists[] = {&n->all_of, &n->any_of, &n->one_of};
    for (size_t l = 0; l < 3; l++)
        for (size_t i = 0; i < lists[l]->n; i++) {
            if (s_walk(lists[l]->v[i]))
                return -1;
            if (lists[l]->v[i]->depth > below)
                below = lists[l]->v[i]->depth;
        }
    n->depth = below;
    n->visit = 2;
    return 0;
}

/* Read a whole file into a NUL-terminated buffer. */
static char *s_read_file(const char *path, size_t *len_p, kh_error_t *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        kh_error_set(err, KH_E_IO, "", "cannot open schema file: %s",
                     strerror(errno));
        return NULL;
    }
    char *buf = malloc(S_FILE_MAX + 1);
    if (!buf) {
        fclose(f);
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    size_t len = fread(buf, 1, S_FILE_MAX + 1, f);
    bool failed = ferror(f) != 0;
    fclose(f);
    if (failed || len > S_FILE_MAX) {
        free(buf);
        kh_error_set(err, KH_E_IO, "",
                     failed ? "cannot read schema file"
                            : "schema file too large");
        return NULL;
    }
    buf[len] = '\0';
    *len_p = len;
    return buf;
}

kh_schema_t *kh_schema_load(const char *path, kh_error_t *err)
{
    kh_error_clear(err);
    size_t len = 0;
    char *text = s_read_file(path, &len, err);
    if (!text)
        return NULL;

    cc_t cc = {.text = text, .text_len = len, .err = err, .at_root = true};
    kh_schema_t *self = calloc(1, sizeof *self);
    if (!self) {
        free(text);
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    json_error_t jerr;
    self->json =
        json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    if (!self->json) {
        kh_error_set_at(err, KH_E_SCHEMA_INVALID, "", jerr.line, jerr.column,
                        "schema is not valid JSON: %s", jerr.text);
        goto fail;
    }
    self->c_locale = newlocale(LC_ALL_MASK, "C", (locale_t) 0);
    if (!self->c_locale) {
        kh_error_set(err, KH_E_NOMEM, "", "cannot create the C locale");
        goto fail;
    }
    cc.self = self;
    if (s_compile(&cc, self->json, &self->root))
        goto fail;
    s_resolve_refs(self);
    for (size_t d = 0; d < self->n_defs; d++)
        if (s_walk(self->def_nodes[d])) {
            cc.depth = 0;
            s_push(&cc, "$defs");
            s_push(&cc, self->def_names[d]);
            s_invalid(&cc, NULL, "recursive $ref is not supported");
            goto fail;
        }
    if (s_walk(self->root))
        goto fail; /* not reached: cycles run through $defs */
    if (self->root->depth > S_DEPTH_MAX) {
        kh_error_set(err, KH_E_SCHEMA_INVALID, "",
                     "schema nests more than %d levels", S_DEPTH_MAX);
        goto fail;
    }
    free(text);
    return self;
fail:
    free(text);
    kh_schema_destroy(&self);
    return NULL;
}

void kh_schema_destroy(kh_schema_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_schema_t *self = *self_p;
    for (size_t i = 0; i < self->n_nodes; i++)
        s_node_free(self->nodes[i]);
    free(self->nodes);
    free(self->def_names);
    free(self->def_nodes);
    if (self->c_locale)
        freelocale(self->c_locale);
    json_decref(self->json);
    free(self);
    *self_p = NULL;
}

const char *kh_schema_id(const kh_schema_t *self)
{
    if (!self)
        return "";
    const char *id = json_string_value(json_object_get(self->json, "$id"));
    return id ? id : "";
}

bool kh_schema_has_name(const kh_schema_t *self, const char *name, size_t len)
{
    /* Looked up only for refusals, so a walk over every node is cheaper
     * to keep right than another index. */
    for (size_t i = 0; self && name && i < self->n_nodes; i++) {
        const node_t *n = self->nodes[i];
        if (n->n_props && s_find_prop(n, name, len))
            return true;
        str_t key = {name, len};
        for (size_t r = 0; r < n->n_extra_required; r++)
            if (s_str_cmp(&key, &n->extra_required[r]) == 0)
                return true;
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* Validating                                                          */
/* ------------------------------------------------------------------ */

typedef struct {
    const char *key; /* NULL: an array index */
    size_t len;
    size_t index;
} seg_t;

/* Validation context. err is NULL while a subschema is only tried (if,
 * anyOf, oneOf, not, contains): then failures cost no formatting. */
typedef struct {
    const kh_schema_t *self;
    kh_error_t *err;
    seg_t path[S_DEPTH_MAX + 1];
    size_t depth;
} vc_t;

/* Render the path ("subject.age", "indicators[2]"); a key that is not a
 * plain identifier (it may carry data) is shown as "?". */
static void s_render_path(const vc_t *vc, char *out, size_t cap)
{
    out[0] = '\0';
    for (size_t i = 0; i < vc->depth; i++) {
        const seg_t *seg = &vc->path[i];
        if (seg->key)
            kh_path_append_key(out, cap, seg->key, seg->len);
        else
            kh_path_append_index(out, cap, seg->index);
    }
}

static int s_fail(vc_t *vc, kh_errcode_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int s_fail(vc_t *vc, kh_errcode_t code, const char *fmt, ...)
{
    if (!vc->err)
        return -1;
    char path[KH_ERROR_PATH_MAX];
    s_render_path(vc, path, sizeof path);
    kh_error_set(vc->err, code, path, "%s", "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(vc->err->message, sizeof vc->err->message, fmt, ap);
    va_end(ap);
    return -1;
}

/* Descend one level into a document; the schema's depth bound (checked at
 * load) keeps this within path[]. */
static void s_enter_key(vc_t *vc, const char *key, size_t len)
{
    vc->path[vc->depth++] = (seg_t){.key = key, .len = len};
}

static void s_enter_index(vc_t *vc, size_t index)
{
    vc->path[vc->depth++] = (seg_t){.key = NULL, .index = index};
}

static int s_validate(vc_t *vc, const node_t *n, const json_t *v);

/* Try a subschema without reporting: whether v satisfies it. */
static bool s_try(vc_t *vc, const node_t *n, const json_t *v)
{
    kh_error_t *saved = vc->err;
    size_t depth = vc->depth;
    vc->err = NULL;
    int rc = s_validate(vc, n, v);
    vc->err = saved;
    vc->depth = depth;
    return rc == 0;
}

static unsigned s_type_of(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return T_OBJECT;
    case JSON_ARRAY:
        return T_ARRAY;
    case JSON_STRING:
        return T_STRING;
    case JSON_INTEGER:
        return T_NUMBER | T_INTEGER;
    case JSON_REAL: {
        double d = json_real_value(v);
        return d == floor(d) ? T_NUMBER | T_INTEGER : T_NUMBER;
    }
    case JSON_TRUE:
    case JSON_FALSE:
        return T_BOOLEAN;
    default:
        return T_NULL;
    }
}

static int s_fail_type(vc_t *vc, unsigned types)
{
    char names[96] = "";
    size_t o = 0;
    for (size_t k = 0; k < 7; k++) {
        if (!(types & s_types[k].bit))
            continue;
        int w = snprintf(names + o, sizeof names - o, "%s%s", o ? " or " : "",
                         s_types[k].name);
        if (w > 0 && (size_t) w < sizeof names - o)
            o += (size_t) w;
    }
    return s_fail(vc, KH_E_SCHEMA_TYPE, "must be of type %s", names);
}

static bool s_in_enum(const node_t *n, const json_t *v)
{
    if (n->enum_strings) {
        if (!json_is_string(v))
            return false;
        str_t key = {json_string_value(v), json_string_length(v)};
        return bsearch(&key, n->enum_strings, n->n_enum_strings,
                       sizeof *n->enum_strings, s_str_cmp) != NULL;
    }
    for (size_t i = 0; i < json_array_size(n->enum_values); i++)
        if (s_equal(json_array_get(n->enum_values, i), v))
            return true;
    return false;
}

static int s_check_string(vc_t *vc, const node_t *n, const json_t *v)
{
    const char *s = json_string_value(v);
    size_t len = json_string_length(v);
    if (n->min_length >= 0 || n->max_length >= 0) {
        size_t chars = kh_utf8_length(s, len);
        if (n->min_length >= 0 && chars < (size_t) n->min_length)
            return s_fail(vc, KH_E_SCHEMA_LENGTH,
                          "must have at least %lld characters", n->min_length);
        if (n->max_length >= 0 && chars > (size_t) n->max_length)
            return s_fail(vc, KH_E_SCHEMA_LENGTH,
                          "must have at most %lld characters", n->max_length);
    }
    if (n->has_pattern) {
        /* regexec stops at a NUL byte: a string holding one never
         * matches, rather than matching by its prefix. */
        bool match = false;
        if (strlen(s) == len) {
            locale_t old = uselocale(vc->self->c_locale);
            match = regexec(&n->pattern, s, 0, NULL, 0) == 0;
            uselocale(old);
        }
        if (!match)
            return s_fail(vc, KH_E_SCHEMA_PATTERN,
                          "does not have the required form");
    }
    if (n->format == F_DATE && !s_is_date(s, len))
        return s_fail(vc, KH_E_SCHEMA_FORMAT,
                      "must be a calendar date YYYY-MM-DD");
    if (n->format == F_DATE_TIME && !s_is_date_time(s, len))
        return s_fail(vc, KH_E_SCHEMA_FORMAT, "must be an RFC 3339 date-time");
    return 0;
}

static int s_check_number(vc_t *vc, const node_t *n, const json_t *v)
{
    if (n->minimum && s_num_cmp(v, n->minimum) < 0)
        return s_fail(vc, KH_E_SCHEMA_RANGE, "must be at least %g",
                      s_num(n->minimum));
    if (n->maximum && s_num_cmp(v, n->maximum) > 0)
        return s_fail(vc, KH_E_SCHEMA_RANGE, "must be at most %g",
                      s_num(n->maximum));
    if (n->xminimum && s_num_cmp(v, n->xminimum) <= 0)
        return s_fail(vc, KH_E_SCHEMA_RANGE, "must be more than %g",
                      s_num(n->xminimum));
    if (n->xmaximum && s_num_cmp(v, n->xmaximum) >= 0)
        return s_fail(vc, KH_E_SCHEMA_RANGE, "must be less than %g",
                      s_num(n->xmaximum));
    return 0;
}

/* Arrays: the size first (so an oversized array costs nothing more), then
 * each item in order, checked against items and against the items before
 * it for uniqueItems, then contains. */
static int s_check_array(vc_t *vc, const node_t *n, const json_t *v)
{
    size_t count = json_array_size(v);
    if (n->min_items >= 0 && count < (size_t) n->min_items)
        return s_fail(vc, KH_E_SCHEMA_ITEMS, "must have at least %lld items",
                      n->min_items);
    if (n->max_items >= 0 && count > (size_t) n->max_items)
        return s_fail(vc, KH_E_SCHEMA_ITEMS, "must have at most %lld items",
                      n->max_items);
    for (size_t i = 0; i < count; i++) {
        const json_t *item = json_array_get(v, i);
        s_enter_index(vc, i);
        if (n->items && s_validate(vc, n->items, item))
            return -1;
        for (size_t k = 0; n->unique_items && k < i; k++)
            if (s_equal(json_array_get(v, k), item))
                return s_fail(vc, KH_E_SCHEMA_UNIQUE,
                              "repeats an earlier item");
        vc->depth--;
    }
    if (n->contains) {
        bool found = false;
        for (size_t i = 0; !found && i < count; i++) {
            s_enter_index(vc, i);
            found = s_try(vc, n->contains, json_array_get(v, i));
            vc->depth--;
        }
        if (!found)
            return s_fail(vc, KH_E_SCHEMA_ITEMS,
                          "does not contain a required item");
    }
    return 0;
}

/* Objects: first any field the schema does not allow (in the document's
 * order: a misspelt name is reported as itself, not as a missing field),
 * then the properties in the schema's order, a missing required one where
 * it stands, then required names the properties do not list. */
static int s_check_object(vc_t *vc, const node_t *n, const json_t *v)
{
    json_t *obj = (json_t *) v; /* jansson's iterators are not const */
    if (n->additional != A_ANY) {
        for (void *it = json_object_iter(obj); it;
             it = json_object_iter_next(obj, it)) {
            const char *key = json_object_iter_key(it);
            size_t len = json_object_iter_key_len(it);
            if (s_find_prop(n, key, len))
                continue;
            s_enter_key(vc, key, len);
            if (n->additional == A_NONE)
                return s_fail(vc, KH_E_SCHEMA_UNKNOWN_FIELD, "unknown field");
            if (s_validate(vc, n->additional_schema,
                           json_object_iter_value(it)))
                return -1;
            vc->depth--;
        }
    }
    for (size_t i = 0; i < n->n_props; i++) {
        const prop_t *p = &n->props[i];
        const json_t *value = json_object_getn(v, p->name, p->len);
        if (!value && !p->required)
            continue;
        s_enter_key(vc, p->name, p->len);
        if (!value)
            return s_fail(vc, KH_E_SCHEMA_REQUIRED, "required field missing");
        if (s_validate(vc, p->schema, value))
            return -1;
        vc->depth--;
    }
    for (size_t i = 0; i < n->n_extra_required; i++) {
        const str_t *r = &n->extra_required[i];
        if (json_object_getn(v, r->str, r->len))
            continue;
        s_enter_key(vc, r->str, r->len);
        return s_fail(vc, KH_E_SCHEMA_REQUIRED, "required field missing");
    }
    return 0;
}

/* A failed condition: code CONDITION, the message from the schema's title
 * (written for people), else fallback. */
static int s_fail_condition(vc_t *vc, const char *title, const char *fallback)
{
    return s_fail(vc, KH_E_SCHEMA_CONDITION, "%s", title ? title : fallback);
}

/* if/then/else: a failing branch is reported at the path inside it where
 * it failed ("subject.minor"), with code CONDITION, because what is wrong
 * is the combination of fields the condition names. */
static int s_check_conditional(vc_t *vc, const node_t *n, const json_t *v)
{
    const node_t *branch = s_try(vc, n->if_, v) ? n->then_ : n->else_;
    if (!branch)
        return 0;
    if (!vc->err)
        return s_validate(vc, branch, v);
    kh_error_t inner, *outer = vc->err;
    kh_error_clear(&inner);
    size_t depth = vc->depth;
    vc->err = &inner;
    int rc = s_validate(vc, branch, v);
    vc->err = outer;
    vc->depth = depth;
    if (rc == 0)
        return 0;
    const char *title = n->title ? n->title : branch->title;
    *outer = inner;
    outer->code = KH_E_SCHEMA_CONDITION;
    if (title)
        snprintf(outer->message, sizeof outer->message, "%s", title);
    return -1;
}

/*
 * Validate v against n. The order of checks, and so which violation of
 * several is reported: $ref; type; const; enum; the string, number,
 * array or object keywords; then allOf, anyOf, oneOf, not, if/then/else.
 */
static int s_validate(vc_t *vc, const node_t *n, const json_t *v)
{
    if (n->is_bool)
        return n->bool_value
                   ? 0
                   : s_fail(vc, KH_E_SCHEMA_CONDITION, "not allowed here");
    if (n->ref && s_validate(vc, n->ref, v))
        return -1;
    if (n->types && !(n->types & s_type_of(v)))
        return s_fail_type(vc, n->types);
    if (n->const_value && !s_equal(n->const_value, v))
        return s_fail(vc, KH_E_SCHEMA_CONST, "must be the one fixed value");
    if (n->enum_values && !s_in_enum(n, v))
        return s_fail(vc, KH_E_SCHEMA_ENUM, "not one of the allowed values");

    int rc = 0;
    switch (json_typeof(v)) {
    case JSON_STRING:
        rc = n->string_checks ? s_check_string(vc, n, v) : 0;
        break;
    case JSON_INTEGER:
    case JSON_REAL:
        rc = n->number_checks ? s_check_number(vc, n, v) : 0;
        break;
    case JSON_ARRAY:
        rc = n->array_checks ? s_check_array(vc, n, v) : 0;
        break;
    case JSON_OBJECT:
        rc = n->object_checks ? s_check_object(vc, n, v) : 0;
        break;
    default:
        break;
    }
    if (rc)
        return -1;

    for (size_t i = 0; i < n->all_of.n; i++)
        if (s_validate(vc, n->all_of.v[i], v))
            return -1;
    if (n->any_of.n) {
        bool any = false;
        for (size_t i = 0; !any && i < n->any_of.n; i++)
            any = s_try(vc, n->any_of.v[i], v);
        if (!any)
            return s_fail_condition(vc, n->title,
                                    "matches none of the allowed forms");
    }
    if (n->one_of.n) {
        size_t matches = 0;
        for (size_t i = 0; matches < 2 && i < n->one_of.n; i++)
            matches += s_try(vc, n->one_of.v[i], v);
        if (matches != 1)
            return s_fail_condition(vc, n->title,
                                    matches ? "matches more than one form"
                                            : "matches none of the forms");
    }
    if (n->not_ && s_try(vc, n->not_, v))
        return s_fail_condition(vc, n->not_->title ? n->not_->title : n->title,
                                "has a form that is not allowed");
    if (n->if_ && s_check_conditional(vc, n, v))
        return -1;
    return 0;
}

int kh_schema_validate(const kh_schema_t *self, const json_t *doc,
                       kh_error_t *err)
{
    kh_error_clear(err);
    if (!self || !doc)
        return kh_error_set(err, KH_E_INTERNAL, "", "no schema or document");
    vc_t vc = {.self = self, .err = err, .depth = 0};
    kh_error_t scratch;
    if (!vc.err)
        vc.err = &scratch; /* keep the reporting path even without err */
    return s_validate(&vc, self->root, doc);
}
