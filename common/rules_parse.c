/*
 * Loading a rules file (schemas/rules.md): the bytes are checked (size,
 * UTF-8, no binary), parsed with libyaml's event API into a small tree
 * (anchors, aliases and tags are refused as they come, so an alias bomb
 * costs nothing), and the tree is checked and compiled against the referral
 * schema and the partner list. Every problem is reported with its line and
 * column; loading fails if there was any error.
 */
#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "ketenhub/codec.h"
#include "ketenhub/partner.h"
#include "ketenhub/proto.h"
#include "rules_internal.h"

/* What a partner id is, for a target that names none (%s: the value). */
#define S_NOT_PARTNER_ID                                                       \
    "%s is not a partner id: 2 to 32 of a-z, 0-9 and -, starting with a "      \
    "letter, as ketenhubctl partner list shows them"

/* ---- a small YAML tree ------------------------------------------------ */

typedef enum { S_YSCALAR, S_YSEQ, S_YMAP } s_ykind_t;

typedef struct s_ynode s_ynode_t;
struct s_ynode {
    s_ykind_t kind;
    char *str; /* scalars */
    size_t len;
    bool plain;
    int line, column;  /* 1-based */
    s_ynode_t **items; /* sequences; maps: key, value, key, value... */
    size_t n, cap;
};

static void s_ynode_free(s_ynode_t *node)
{
    if (!node)
        return;
    for (size_t i = 0; i < node->n; i++)
        s_ynode_free(node->items[i]);
    free(node->items);
    free(node->str);
    free(node);
}

static int s_ynode_push(s_ynode_t *parent, s_ynode_t *child)
{
    if (parent->n == parent->cap) {
        size_t cap = parent->cap ? parent->cap * 2 : 8;
        s_ynode_t **items = realloc(parent->items, cap * sizeof *items);
        if (!items)
            return -1;
        parent->items = items;
        parent->cap = cap;
    }
    parent->items[parent->n++] = child;
    return 0;
}

/* ---- load context and reporting --------------------------------------- */

typedef struct {
    kh_rules_t *rules;
    const kh_rules_options_t *opts;
    kh_error_t *err;
    int errors;
    zhashx_t *partner_index; /* partner id -> its index in rules + 1 */
    size_t partner_cap;      /* room in rules->partner_ids */
} s_ctx_t;

static void s_vreport(s_ctx_t *ctx, bool is_error, kh_errcode_t code,
                      const char *path, int line, int column, const char *fmt,
                      va_list ap) __attribute__((format(printf, 7, 0)));

static void s_vreport(s_ctx_t *ctx, bool is_error, kh_errcode_t code,
                      const char *path, int line, int column, const char *fmt,
                      va_list ap)
{
    kh_error_t e;
    kh_error_clear(&e);
    e.code = code;
    snprintf(e.path, sizeof e.path, "%s", path ? path : "");
    e.line = line;
    e.column = column;
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    /* A message names what the file says (a key, a code, a field), and a
     * quoted value may hold a line break: one problem stays one line. */
    for (char *c = e.message; *c; c++)
        if ((unsigned char) *c < 0x20 || *c == 0x7f)
            *c = '?';
    if (is_error) {
        if (ctx->errors++ == 0 && ctx->err)
            *ctx->err = e;
    }
    if (ctx->opts && ctx->opts->report)
        ctx->opts->report(&e, is_error, ctx->opts->report_arg);
}

__attribute__((format(printf, 5, 6))) static void
s_error(s_ctx_t *ctx, kh_errcode_t code, const char *path, const s_ynode_t *at,
        const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_vreport(ctx, true, code, path, at ? at->line : 0, at ? at->column : 0,
              fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 5, 6))) static void
s_note(s_ctx_t *ctx, kh_errcode_t code, const char *path, const s_ynode_t *at,
       const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_vreport(ctx, false, code, path, at ? at->line : 0, at ? at->column : 0,
              fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 6, 7))) static void
s_error_at(s_ctx_t *ctx, kh_errcode_t code, const char *path, int line,
           int column, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_vreport(ctx, true, code, path, line, column, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 6, 7))) static void
s_note_at(s_ctx_t *ctx, kh_errcode_t code, const char *path, int line,
          int column, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    s_vreport(ctx, false, code, path, line, column, fmt, ap);
    va_end(ap);
}

/* Child path: parent + key or parent + [index]. */
static void s_path_key(char *out, const char *parent, const char *key)
{
    snprintf(out, KH_ERROR_PATH_MAX, "%s", parent);
    kh_path_append_key(out, KH_ERROR_PATH_MAX, key, strlen(key));
}

static void s_path_index(char *out, const char *parent, size_t index)
{
    snprintf(out, KH_ERROR_PATH_MAX, "%s", parent);
    kh_path_append_index(out, KH_ERROR_PATH_MAX, index);
}

/* ---- bytes: size, UTF-8, no control characters -------------------------- */

/* Returns 0 when data is UTF-8 text without NUL or control characters
 * other than tab, newline and carriage return; otherwise reports where.
 * The C1 controls (U+0080 to U+009F) are refused as much as the C0 ones,
 * and so are the line and paragraph separators U+2028 and U+2029: the
 * YAML parser takes NEL (U+0085) and those two for line breaks where an
 * editor, a diff and YAML 1.2 see none, so that a "comment" holding one
 * could hide a key (`# note<U+2028>  continue: false`) from whoever
 * reviews the file. The noncharacters U+FFFE and U+FFFF, which the parser
 * refuses without saying where, are refused here with their place. Lines
 * are counted as the parser counts them (LF, CR
 * LF or a lone CR), so that every problem has the same place. */
static int s_check_text(s_ctx_t *ctx, const unsigned char *data, size_t len)
{
    int line = 1, column = 1;
    /* A leading byte order mark takes no column (see s_parse_yaml). */
    size_t i = len >= 3 && memcmp(data, "\xEF\xBB\xBF", 3) == 0 ? 3 : 0;
    while (i < len) {
        unsigned char c = data[i];
        size_t n = 1;
        uint32_t cp = c;
        if (c >= 0x80) {
            if (c >= 0xC2 && c <= 0xDF)
                n = 2, cp = c & 0x1F;
            else if (c >= 0xE0 && c <= 0xEF)
                n = 3, cp = c & 0x0F;
            else if (c >= 0xF0 && c <= 0xF4)
                n = 4, cp = c & 0x07;
            else
                goto bad;
            if (i + n > len)
                goto bad;
            for (size_t k = 1; k < n; k++) {
                if ((data[i + k] & 0xC0) != 0x80)
                    goto bad;
                cp = (cp << 6) | (data[i + k] & 0x3F);
            }
            if ((n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
                cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
                goto bad;
            if (cp <= 0x9F) {
                s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
                           "control character or binary data in the file");
                return -1;
            }
            if (cp == 0xFFFE || cp == 0xFFFF) {
                /* The YAML parser refuses them too, but with no place. */
                s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
                           "a Unicode noncharacter (U+%04X) in the file",
                           (unsigned) cp);
                return -1;
            }
            if (cp == 0x2028 || cp == 0x2029) {
                s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
                           "a Unicode line or paragraph separator (U+%04X):"
                           " end the line with a new line instead",
                           (unsigned) cp);
                return -1;
            }
        } else if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') ||
                   c == 0x7F) {
            s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
                       "control character or binary data in the file");
            return -1;
        }
        if (c == '\n' || (c == '\r' && (i + 1 == len || data[i + 1] != '\n')))
            line++, column = 1;
        else
            column++;
        i += n;
    }
    return 0;
bad:
    s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
               "the file is not valid UTF-8");
    return -1;
}

/* ---- YAML events into a tree ------------------------------------------ */

/* Whether a scalar's value (escapes resolved) holds a control character
 * other than tab and line breaks: a quoted "\0" or "\x01" is binary input
 * as much as the raw byte that s_check_text refuses, and cut at a NUL the
 * text would mean something else than it says. The C1 controls and U+2028
 * and U+2029 ("\x85", "\N", "\L", "\P") are refused here as they are in
 * the file: the parser hands over UTF-8, where they are C2 80 to C2 9F and
 * E2 80 A8 or A9. */
static bool s_scalar_binary(const unsigned char *value, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if ((value[i] < 0x20 && value[i] != '\t' && value[i] != '\n' &&
             value[i] != '\r') ||
            value[i] == 0x7F)
            return true;
        if (value[i] == 0xC2 && i + 1 < len && value[i + 1] >= 0x80 &&
            value[i + 1] <= 0x9F)
            return true;
        if (value[i] == 0xE2 && i + 2 < len && value[i + 1] == 0x80 &&
            (value[i + 2] == 0xA8 || value[i + 2] == 0xA9))
            return true;
        /* U+FFFE and U+FFFF, which s_check_text refuses as bytes */
        if (value[i] == 0xEF && i + 2 < len && value[i + 1] == 0xBF &&
            (value[i + 2] == 0xBE || value[i + 2] == 0xBF))
            return true;
    }
    return false;
}

static int s_refuse_anchor(s_ctx_t *ctx, const yaml_event_t *ev,
                           const yaml_char_t *anchor, const yaml_char_t *tag)
{
    int line = (int) ev->start_mark.line + 1;
    int column = (int) ev->start_mark.column + 1;
    if (anchor) {
        s_error_at(ctx, KH_E_RULES_ALIAS, "", line, column,
                   "anchors and aliases are not allowed: write the "
                   "value out in full at each place it is used");
        return -1;
    }
    if (tag) {
        s_error_at(ctx, KH_E_RULES_SYNTAX, "", line, column,
                   "tags are not allowed: remove the !tag; quote a value "
                   "that must be text");
        return -1;
    }
    return 0;
}

/* What to do about a problem libyaml found, or "": its messages say what
 * the parser expected, and an administrator's usual cause is a tab or a
 * line indented more or less than its neighbours. */
static const char *s_yaml_hint(const yaml_parser_t *parser)
{
    const char *problem = parser->problem ? parser->problem : "";
    const char *context = parser->context ? parser->context : "";
    if (strstr(problem, "tab"))
        return "; indent with spaces, not tabs";
    if (strstr(context, "block") || strstr(problem, "indentation") ||
        strstr(problem, "mapping values are not allowed"))
        return "; check the indentation of this line against the lines "
               "above it (the same depth lines up exactly, with spaces)";
    return "";
}

/* Parse len bytes into a tree. NULL after reporting the first problem. */
static s_ynode_t *s_parse_yaml(s_ctx_t *ctx, const unsigned char *data,
                               size_t len)
{
    yaml_parser_t parser;
    if (!yaml_parser_initialize(&parser)) {
        s_error_at(ctx, KH_E_NOMEM, "", 0, 0, "out of memory");
        return NULL;
    }
    /* A byte order mark may open the stream (YAML 1.2, 5.2). With the
     * encoding given, libyaml would take it for content; it is no part of
     * the document, and the columns of line 1 count from after it. */
    if (len >= 3 && memcmp(data, "\xEF\xBB\xBF", 3) == 0)
        data += 3, len -= 3;
    yaml_parser_set_input_string(&parser, data, len);
    yaml_parser_set_encoding(&parser, YAML_UTF8_ENCODING);

    s_ynode_t *stack[KH_RULES_DEPTH_MAX + 1];
    int depth = 0;
    s_ynode_t *root = NULL;
    int documents = 0;
    bool done = false, failed = false;
    while (!done && !failed) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            s_error_at(ctx, KH_E_RULES_SYNTAX, "",
                       (int) parser.problem_mark.line + 1,
                       (int) parser.problem_mark.column + 1, "%s%s%s%s",
                       parser.context ? parser.context : "",
                       parser.context ? ": " : "",
                       parser.problem ? parser.problem : "invalid YAML",
                       s_yaml_hint(&parser));
            failed = true;
            break;
        }
        int line = (int) ev.start_mark.line + 1;
        int column = (int) ev.start_mark.column + 1;
        s_ynode_t *node = NULL;
        switch (ev.type) {
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (++documents > 1) {
                s_error_at(ctx, KH_E_RULES_SYNTAX, "", line, column,
                           "a rules file holds one document");
                failed = true;
            }
            break;
        case YAML_ALIAS_EVENT:
            s_error_at(ctx, KH_E_RULES_ALIAS, "", line, column,
                       "anchors and aliases are not allowed: write the "
                       "value out in full at each place it is used");
            failed = true;
            break;
        case YAML_SCALAR_EVENT:
            if (s_refuse_anchor(ctx, &ev, ev.data.scalar.anchor,
                                ev.data.scalar.tag)) {
                failed = true;
                break;
            }
            if (s_scalar_binary(ev.data.scalar.value, ev.data.scalar.length)) {
                s_error_at(ctx, KH_E_RULES_ENCODING, "", line, column,
                           "control character or binary data in a value");
                failed = true;
                break;
            }
            node = calloc(1, sizeof *node);
            if (node) {
                node->kind = S_YSCALAR;
                node->len = ev.data.scalar.length;
                node->str = malloc(node->len + 1);
                node->plain = ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
                if (node->str) {
                    memcpy(node->str, ev.data.scalar.value, node->len);
                    node->str[node->len] = '\0';
                }
            }
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT: {
            bool seq = ev.type == YAML_SEQUENCE_START_EVENT;
            const yaml_char_t *anchor = seq ? ev.data.sequence_start.anchor
                                            : ev.data.mapping_start.anchor;
            const yaml_char_t *tag =
                seq ? ev.data.sequence_start.tag : ev.data.mapping_start.tag;
            if (s_refuse_anchor(ctx, &ev, anchor, tag)) {
                failed = true;
                break;
            }
            if (depth == KH_RULES_DEPTH_MAX) {
                s_error_at(ctx, KH_E_RULES_TOO_DEEP, "", line, column,
                           "nesting deeper than %d", KH_RULES_DEPTH_MAX);
                failed = true;
                break;
            }
            node = calloc(1, sizeof *node);
            if (node)
                node->kind = seq ? S_YSEQ : S_YMAP;
            break;
        }
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            depth--;
            break;
        default:
            break;
        }
        bool wanted = ev.type == YAML_SCALAR_EVENT ||
                      ev.type == YAML_SEQUENCE_START_EVENT ||
                      ev.type == YAML_MAPPING_START_EVENT;
        yaml_event_delete(&ev);
        if (failed || (!node && !wanted))
            continue;
        /* A node left out would shift the keys and values of its mapping,
         * and its end would close its parent. */
        if (!node || (node->kind == S_YSCALAR && !node->str)) {
            s_ynode_free(node);
            s_error_at(ctx, KH_E_NOMEM, "", line, column, "out of memory");
            failed = true;
            continue;
        }
        node->line = line;
        node->column = column;
        if (depth == 0) {
            s_ynode_free(root);
            root = node;
        } else {
            s_ynode_t *parent = stack[depth - 1];
            if (parent->kind == S_YMAP && parent->n % 2 == 0 &&
                node->kind != S_YSCALAR) {
                s_error_at(ctx, KH_E_RULES_SYNTAX, "", line, column,
                           "a mapping key must be a plain name");
                s_ynode_free(node);
                failed = true;
                continue;
            }
            if (s_ynode_push(parent, node)) {
                s_ynode_free(node);
                s_error_at(ctx, KH_E_NOMEM, "", line, column, "out of memory");
                failed = true;
                continue;
            }
        }
        if (node->kind != S_YSCALAR)
            stack[depth++] = node;
    }
    yaml_parser_delete(&parser);
    if (failed) {
        s_ynode_free(root);
        return NULL;
    }
    if (!root) {
        s_error_at(ctx, KH_E_RULES_SYNTAX, "", 1, 1, "the file is empty");
        return NULL;
    }
    return root;
}

/* ---- tree helpers ------------------------------------------------------- */

typedef enum { S_TNULL, S_TBOOL, S_TINT, S_TFLOAT, S_TSTR } s_stype_t;

/* The type of a scalar under the YAML 1.2 core schema (quoted scalars are
 * strings; "yes" and "no" are strings too). */
static s_stype_t s_scalar_type(const s_ynode_t *n, bool *b, double *d)
{
    if (!n->plain)
        return S_TSTR;
    const char *s = n->str;
    if (n->len == 0 || strcmp(s, "~") == 0 || strcmp(s, "null") == 0 ||
        strcmp(s, "Null") == 0 || strcmp(s, "NULL") == 0)
        return S_TNULL;
    if (strcmp(s, "true") == 0 || strcmp(s, "True") == 0 ||
        strcmp(s, "TRUE") == 0) {
        *b = true;
        return S_TBOOL;
    }
    if (strcmp(s, "false") == 0 || strcmp(s, "False") == 0 ||
        strcmp(s, "FALSE") == 0) {
        *b = false;
        return S_TBOOL;
    }
    /* .inf, -.inf and .nan, in the spellings the core schema has: numbers
     * to YAML (so that a text field does not take them for text, as it
     * takes no other number), though none a referral can hold (JSON has no
     * infinity and no NaN): the callers that want a number refuse them. */
    const char *inf = s + (s[0] == '-' || s[0] == '+');
    if (strcmp(inf, ".inf") == 0 || strcmp(inf, ".Inf") == 0 ||
        strcmp(inf, ".INF") == 0) {
        *d = s[0] == '-' ? -INFINITY : INFINITY;
        return S_TFLOAT;
    }
    if (strcmp(s, ".nan") == 0 || strcmp(s, ".NaN") == 0 ||
        strcmp(s, ".NAN") == 0) {
        *d = NAN;
        return S_TFLOAT;
    }
    /* 0o17 and 0x1F: whole numbers in another base (no sign, as in the
     * core schema). */
    if (n->len > 2 && s[0] == '0' && (s[1] == 'o' || s[1] == 'x')) {
        double v = 0;
        for (size_t k = 2; k < n->len; k++) {
            int digit = s[k] >= '0' && s[k] <= '9'   ? s[k] - '0'
                        : s[k] >= 'a' && s[k] <= 'f' ? s[k] - 'a' + 10
                        : s[k] >= 'A' && s[k] <= 'F' ? s[k] - 'A' + 10
                                                     : 99;
            int base = s[1] == 'o' ? 8 : 16;
            if (digit >= base)
                return S_TSTR;
            v = v * base + digit;
        }
        if (!isfinite(v))
            return S_TSTR;
        *d = v;
        return S_TFLOAT;
    }
    /* [-+]? ( . [0-9]+ | [0-9]+ ( . [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?:
     * strtod alone would also take hexadecimal fractions (0x1p4), which
     * the core schema leaves text. */
    size_t i = (s[0] == '-' || s[0] == '+') ? 1 : 0;
    size_t k = i, int_digits = 0, frac_digits = 0;
    while (k < n->len && s[k] >= '0' && s[k] <= '9')
        k++, int_digits++;
    bool point = k < n->len && s[k] == '.';
    if (point)
        for (k++; k < n->len && s[k] >= '0' && s[k] <= '9'; k++)
            frac_digits++;
    if (int_digits == 0 && frac_digits == 0)
        return S_TSTR;
    bool exponent = k < n->len && (s[k] == 'e' || s[k] == 'E');
    if (exponent) {
        size_t e = ++k;
        if (k < n->len && (s[k] == '-' || s[k] == '+'))
            e = ++k;
        while (k < n->len && s[k] >= '0' && s[k] <= '9')
            k++;
        if (k == e)
            return S_TSTR;
    }
    if (k != n->len)
        return S_TSTR;
    errno = 0;
    double v = strtod(s, NULL);
    if (errno != 0 || !isfinite(v))
        return S_TSTR;
    *d = v;
    /* Whole numbers of up to 15 significant digits are exact in a double
     * (leading zeros count for none). */
    size_t zeros = 0;
    while (zeros + 1 < int_digits && s[i + zeros] == '0')
        zeros++;
    return !point && !exponent && int_digits - zeros <= 15 ? S_TINT : S_TFLOAT;
}

/* Why scalar n (of type t) is not of kind, for a message: a value that
 * is right but quoted, null where none is allowed, a fraction for a whole
 * number, a number too large to hold; "" when the type says it all. */
static const char *s_type_hint(const s_ynode_t *n, s_stype_t t, bool numeric,
                               bool whole, bool boolean)
{
    bool b;
    double d = 0;
    if (t == S_TNULL)
        return " and may not be null";
    if (!n->plain) {
        s_ynode_t plain = *n;
        plain.plain = true;
        s_stype_t pt = s_scalar_type(&plain, &b, &d);
        if ((boolean && pt == S_TBOOL) ||
            (numeric &&
             (pt == S_TINT || (pt == S_TFLOAT && !whole && isfinite(d)))))
            return ": write the value without quotes";
        return "";
    }
    if (numeric && t == S_TFLOAT && s_scalar_type(n, &b, &d) == S_TFLOAT &&
        !isfinite(d))
        return ": infinity and NaN are no values a referral can hold (JSON "
               "has neither)";
    if (boolean &&
        (strcasecmp(n->str, "yes") == 0 || strcasecmp(n->str, "no") == 0 ||
         strcasecmp(n->str, "on") == 0 || strcasecmp(n->str, "off") == 0))
        return ": write true or false (yes, no, on and off are text)";
    /* 1e1, 18.0 and 0x12 are whole, but written as a fraction or in
     * another base, which a whole-number field does not take. */
    if (numeric && whole && t == S_TFLOAT)
        return strtod(n->str, NULL) == floor(strtod(n->str, NULL))
                   ? ": write it in decimal digits only"
                   : ", not a fraction";
    if (numeric && t == S_TSTR && n->len > 0 &&
        strchr("+-0123456789", n->str[0]) && strpbrk(n->str, "0123456789") &&
        strtod(n->str, NULL) != 0 && !isfinite(strtod(n->str, NULL)))
        return ": the value is too large to be a number";
    return "";
}

static const char *s_ykind_name(const s_ynode_t *n)
{
    return n->kind == S_YMAP   ? "a mapping"
           : n->kind == S_YSEQ ? "a list"
                               : "a single value";
}

/* The value under key in map, or NULL. */
static const s_ynode_t *s_get(const s_ynode_t *map, const char *key)
{
    for (size_t i = 0; i + 1 < map->n; i += 2)
        if (strcmp(map->items[i]->str, key) == 0)
            return map->items[i + 1];
    return NULL;
}

/* ---- lists for messages ------------------------------------------------ */

/* A list of names for a message ("a, b, c"), ended by "..." where the
 * next name would not fit: a message stays within its error record. */
typedef struct {
    char text[150];
    size_t used;
    bool full;
} s_list_t;

static void s_list_add(s_list_t *l, const char *name, size_t len)
{
    if (l->full)
        return;
    const char *sep = l->used ? ", " : "";
    if (l->used + strlen(sep) + len + sizeof ", ..." > sizeof l->text) {
        snprintf(l->text + l->used, sizeof l->text - l->used, "%s...", sep);
        l->full = true;
        return;
    }
    l->used += (size_t) snprintf(l->text + l->used, sizeof l->text - l->used,
                                 "%s%.*s", sep, (int) len, name);
}

/* The most keys a mapping of the format may have: far more than any of
 * its mappings allows, and few enough that checking each key against the
 * others, with the allowed keys listed in each message, stays cheap. */
#define S_KEYS_MAX 64

/* Report keys of map that are not in allowed (NULL-terminated), and keys
 * given twice; a map of more than S_KEYS_MAX keys only as too large.
 * Returns the number of problems. Callers go on checking the known keys
 * (the first of a repeated one), so that one check reports every error,
 * not only the first typo. */
static int s_check_keys(s_ctx_t *ctx, const s_ynode_t *map, const char *path,
                        const char *const *allowed)
{
    int problems = 0;
    /* map->items holds the keys and their values. */
    if (map->n / 2 > S_KEYS_MAX) {
        s_error(ctx, KH_E_RULES_TOO_LARGE, path, map,
                "a mapping of %zu keys; no mapping of the rules format has "
                "more than %d",
                map->n / 2, S_KEYS_MAX);
        return 1;
    }
    for (size_t i = 0; i + 1 < map->n; i += 2) {
        const s_ynode_t *key = map->items[i];
        char p[KH_ERROR_PATH_MAX];
        snprintf(p, sizeof p, "%s", path);
        kh_path_append_key(p, sizeof p, key->str, key->len);
        bool known = false;
        for (const char *const *a = allowed; *a; a++)
            if (strcmp(*a, key->str) == 0)
                known = true;
        if (!known) {
            s_list_t l = {0};
            for (const char *const *a = allowed; *a; a++)
                s_list_add(&l, *a, strlen(*a));
            s_error(ctx, KH_E_RULES_UNKNOWN_KEY, p, key,
                    "%.40s is not a key of the rules format here; the keys "
                    "are: %s",
                    key->len ? key->str : "an empty key", l.text);
            problems++;
            continue;
        }
        for (size_t k = 0; k < i; k += 2)
            if (strcmp(map->items[k]->str, key->str) == 0) {
                s_error(ctx, KH_E_RULES_DUPLICATE_KEY, p, key,
                        "key given twice");
                problems++;
                break;
            }
    }
    return problems;
}

static bool s_want(s_ctx_t *ctx, const s_ynode_t *n, s_ykind_t kind,
                   const char *path, const char *what)
{
    if (n->kind == kind)
        return true;
    s_error(ctx, KH_E_RULES_SYNTAX, path, n, "%s must be %s, not %s", what,
            kind == S_YMAP   ? "a mapping"
            : kind == S_YSEQ ? "a list"
                             : "a single value",
            s_ykind_name(n));
    return false;
}

/* A scalar that must be a string (a name, a path). */
static const char *s_want_string(s_ctx_t *ctx, const s_ynode_t *n,
                                 const char *path, const char *what)
{
    if (!s_want(ctx, n, S_YSCALAR, path, what))
        return NULL;
    bool b;
    double d;
    if (s_scalar_type(n, &b, &d) != S_TSTR) {
        s_error(ctx, KH_E_RULES_TYPE, path, n, "%s must be text", what);
        return NULL;
    }
    return n->str;
}

static int s_want_bool(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                       const char *what, bool *out)
{
    double d;
    if (!s_want(ctx, n, S_YSCALAR, path, what))
        return -1;
    if (s_scalar_type(n, out, &d) != S_TBOOL) {
        s_error(ctx, KH_E_RULES_TYPE, path, n, "%s must be true or false",
                what);
        return -1;
    }
    return 0;
}

/* ---- the referral schema's fields ------------------------------------- */

static kh_rkind_t s_kind_of(const char *type, bool *ok)
{
    *ok = true;
    if (strcmp(type, "object") == 0)
        return KH_RK_OBJECT;
    if (strcmp(type, "array") == 0)
        return KH_RK_ARRAY;
    if (strcmp(type, "string") == 0)
        return KH_RK_STRING;
    if (strcmp(type, "boolean") == 0)
        return KH_RK_BOOLEAN;
    if (strcmp(type, "integer") == 0)
        return KH_RK_INTEGER;
    if (strcmp(type, "number") == 0)
        return KH_RK_NUMBER;
    *ok = false;
    return KH_RK_STRING;
}

/* The kind of a property schema: from "type" (a name, or a list with
 * "null"), else from "const"/"enum" (strings). Returns -1 if unknown. */
static int s_prop_kind(const json_t *prop, kh_rkind_t *kind, bool *nullable)
{
    const json_t *type = json_object_get(prop, "type");
    *nullable = false;
    bool ok = false;
    if (json_is_string(type)) {
        *kind = s_kind_of(json_string_value(type), &ok);
        return ok ? 0 : -1;
    }
    if (json_is_array(type)) {
        size_t i;
        const json_t *t;
        int kinds = 0;
        json_array_foreach(type, i, t)
        {
            if (!json_is_string(t))
                return -1;
            if (strcmp(json_string_value(t), "null") == 0)
                *nullable = true;
            else {
                *kind = s_kind_of(json_string_value(t), &ok);
                if (!ok)
                    return -1;
                kinds++;
            }
        }
        return kinds == 1 ? 0 : -1;
    }
    const json_t *c = json_object_get(prop, "const");
    if (json_is_string(c) || json_is_array(json_object_get(prop, "enum"))) {
        *kind = KH_RK_STRING;
        return 0;
    }
    return -1;
}

static bool s_in_required(const json_t *schema, const char *key)
{
    size_t i;
    const json_t *r;
    json_array_foreach(json_object_get(schema, "required"), i, r)
    {
        if (json_is_string(r) && strcmp(json_string_value(r), key) == 0)
            return true;
    }
    return false;
}

static int s_bound(const json_t *prop, const char *incl, const char *excl,
                   double *out, bool lower, bool integer)
{
    const json_t *v = json_object_get(prop, incl);
    if (json_is_number(v)) {
        *out = json_number_value(v);
        return 1;
    }
    v = json_object_get(prop, excl);
    if (json_is_number(v)) {
        /* An exclusive bound is kept as inclusive only for integers. */
        *out = json_number_value(v) + (integer ? (lower ? 1 : -1) : 0);
        return 1;
    }
    return 0;
}

static int s_load_fields(kh_rules_t *rules, const json_t *schema, int parent,
                         const char *prefix, bool always, int depth)
{
    const char *key;
    const json_t *prop;
    json_object_foreach((json_t *) json_object_get(schema, "properties"), key,
                        prop)
    {
        if (rules->nfields == KH_RFIELDS_MAX)
            return -1;
        kh_rfield_t *f = &rules->fields[rules->nfields];
        memset(f, 0, sizeof *f);
        size_t plen = strlen(prefix), klen = strlen(key);
        f->path = malloc(plen + klen + 2);
        if (!f->path)
            return -1;
        if (plen)
            snprintf(f->path, plen + klen + 2, "%s.%s", prefix, key);
        else
            snprintf(f->path, plen + klen + 2, "%s", key);
        f->key = f->path + (plen ? plen + 1 : 0);
        f->key_len = klen;
        f->parent = parent;
        f->depth = depth;
        rules->nfields++;
        if (s_prop_kind(prop, &f->kind, &f->nullable))
            return -1;
        f->always = always && s_in_required(schema, key) && !f->nullable;
        f->enums = json_object_get(prop, "enum");
        if (!f->enums && json_object_get(prop, "const")) {
            /* Keep a one-value enum for a const, owned by the schema. */
            json_t *one = json_array();
            if (!one ||
                json_array_append(one, json_object_get(prop, "const")) ||
                json_object_set_new((json_t *) prop, "x-kh-enum", one))
                return -1;
            f->enums = one;
        }
        /* POSIX ERE, as common/schema.c checks the referral's (the hub
         * never calls setlocale: the C locale); one that does not compile
         * here checks nothing. */
        f->pattern_text = json_string_value(json_object_get(prop, "pattern"));
        if (f->pattern_text) {
            if (!(f->pattern = malloc(sizeof *f->pattern)))
                return -1;
            if (regcomp(f->pattern, f->pattern_text,
                        REG_EXTENDED | REG_NOSUB) != 0) {
                free(f->pattern);
                f->pattern = NULL;
            }
        }
        json_int_t len = json_integer_value(json_object_get(prop, "minLength"));
        f->min_len = len > 0 ? (size_t) len : 0;
        len = json_integer_value(json_object_get(prop, "maxLength"));
        f->max_len = len > 0 ? (size_t) len : 0;
        bool integer = f->kind == KH_RK_INTEGER;
        f->has_min = s_bound(prop, "minimum", "exclusiveMinimum", &f->min, true,
                             integer);
        f->has_max = s_bound(prop, "maximum", "exclusiveMaximum", &f->max,
                             false, integer);
        if (f->kind == KH_RK_ARRAY) {
            const json_t *items = json_object_get(prop, "items");
            bool nullable;
            if (s_prop_kind(items, &f->item_kind, &nullable))
                return -1;
            f->item_enum = json_object_get(items, "enum");
        }
        /* Deeper objects than a projection builds (rules_eval.c) would
         * be cut from the deliveries unseen: the schema is refused. */
        if (f->kind == KH_RK_OBJECT && depth >= KH_RULES_DEPTH_MAX)
            return -1;
        if (f->kind == KH_RK_OBJECT) {
            int self = (int) rules->nfields - 1;
            if (s_load_fields(rules, prop, self, rules->fields[self].path,
                              rules->fields[self].always, depth + 1))
                return -1;
        }
    }
    return 0;
}

static int s_field_find(const kh_rules_t *rules, const char *path)
{
    for (size_t i = 0; i < rules->nfields; i++)
        if (strcmp(rules->fields[i].path, path) == 0)
            return (int) i;
    return -1;
}

/* ---- partners ------------------------------------------------------------ */

/* The index of id in rules->partner_ids, where it is added when new; -1
 * when out of memory. Looked up by hash, so that a file naming many
 * partners takes time in proportion to their number, not its square. */
static int s_partner_intern(s_ctx_t *ctx, const char *id)
{
    kh_rules_t *rules = ctx->rules;
    if (!ctx->partner_index && !(ctx->partner_index = zhashx_new()))
        return -1;
    uintptr_t known = (uintptr_t) zhashx_lookup(ctx->partner_index, id);
    if (known)
        return (int) (known - 1);
    if (rules->npartners == ctx->partner_cap) {
        size_t cap = ctx->partner_cap ? ctx->partner_cap * 2 : 16;
        char **ids = realloc(rules->partner_ids, cap * sizeof *ids);
        if (!ids)
            return -1;
        rules->partner_ids = ids;
        ctx->partner_cap = cap;
    }
    char *copy = strdup(id);
    if (!copy || zhashx_insert(ctx->partner_index, id,
                               (void *) (uintptr_t) (rules->npartners + 1))) {
        free(copy);
        return -1;
    }
    rules->partner_ids[rules->npartners] = copy;
    return (int) rules->npartners++;
}

/* The entry of id among the count partners, revoked or not, or NULL. */
static const kh_rules_partner_t *s_find(const kh_rules_partner_t *partners,
                                        size_t count, const char *id)
{
    for (size_t i = 0; i < count; i++)
        if (partners[i].id && strcmp(partners[i].id, id) == 0)
            return &partners[i];
    return NULL;
}

static const kh_rules_partner_t *s_registered(const kh_rules_options_t *opts,
                                              const char *id)
{
    const kh_rules_partner_t *p =
        s_find(opts->partners, opts->partner_count, id);
    return p && !p->revoked ? p : NULL;
}

/* Whether id is among the count partners, not revoked, and handles cases. */
static bool s_may_receive(const kh_rules_partner_t *partners, size_t count,
                          const char *id)
{
    const kh_rules_partner_t *p = s_find(partners, count, id);
    return p && !p->revoked && p->handles_cases;
}

/* Whether a target of the fallback is left: one not optional, or an
 * optional one whose partner may receive. */
static bool s_fallback_left(const kh_rules_t *self,
                            const kh_rules_partner_t *partners, size_t count)
{
    for (size_t i = 0; i < self->nfallback; i++)
        if (!self->fallback[i].optional ||
            s_may_receive(partners, count,
                          self->partner_ids[self->fallback[i].partner]))
            return true;
    return false;
}

/* Whether optional target t takes part: its partner may receive or, for
 * a fallback none of whose partners is left, the registry holds it,
 * revoked, as handling cases (never a partner not registered, nor one
 * that may not receive case data: promise 5). */
static bool s_takes_part(const kh_rules_t *self, const kh_rtarget_t *t,
                         const kh_rules_partner_t *partners, size_t count,
                         bool none_left)
{
    const char *id = self->partner_ids[t->partner];
    if (s_may_receive(partners, count, id))
        return true;
    const kh_rules_partner_t *p = s_find(partners, count, id);
    return none_left && p && p->revoked && p->handles_cases;
}

/* The optional targets of n in targets, as the registry is now (for a
 * fallback with none of its partners left when none_left); returns how
 * many changed. */
static size_t s_set_optional(const kh_rules_t *self, kh_rtarget_t *targets,
                             size_t n, const kh_rules_partner_t *partners,
                             size_t count, bool none_left)
{
    size_t changed = 0;
    for (size_t i = 0; i < n; i++) {
        kh_rtarget_t *t = &targets[i];
        if (!t->optional)
            continue;
        bool active = s_takes_part(self, t, partners, count, none_left);
        int escalate =
            t->escalate_named >= 0 &&
                    s_may_receive(partners, count,
                                  self->partner_ids[t->escalate_named])
                ? t->escalate_named
                : -1;
        changed += active != t->active || escalate != t->escalate;
        t->active = active;
        t->escalate = escalate;
    }
    return changed;
}

size_t kh_rules_set_partners(kh_rules_t *self,
                             const kh_rules_partner_t *partners, size_t count)
{
    size_t changed = 0;
    for (size_t r = 0; r < self->nrules; r++)
        changed +=
            s_set_optional(self, self->rules[r].targets,
                           self->rules[r].ntargets, partners, count, false);
    /* With none of its partners left, the fallback's revoked partners take
     * part (their deliveries die, with their alerts, as a required
     * target's revoked since): what the referral gets follows from the
     * registry now, as the decision version says, not from which partner
     * was left last. */
    changed += s_set_optional(self, self->fallback, self->nfallback, partners,
                              count, !s_fallback_left(self, partners, count));
    return changed;
}

/* Mark in missing[] the partners that targets[0..n) name without being
 * optional (and their escalation partners) that the registry does not
 * hold as receiving cases. */
static void s_mark_missing(const kh_rules_t *self, const kh_rtarget_t *targets,
                           size_t n, const kh_rules_partner_t *partners,
                           size_t count, bool *missing)
{
    for (size_t i = 0; i < n; i++) {
        const kh_rtarget_t *t = &targets[i];
        if (t->optional)
            continue;
        int named[2] = {t->partner, t->escalate_named};
        for (size_t k = 0; k < 2; k++)
            if (named[k] >= 0 &&
                !s_may_receive(partners, count, self->partner_ids[named[k]]))
                missing[named[k]] = true;
    }
}

size_t kh_rules_missing_partners(const kh_rules_t *self,
                                 const kh_rules_partner_t *partners,
                                 size_t count, const char **out, size_t max)
{
    bool *missing = calloc(self->npartners ? self->npartners : 1, 1);
    if (!missing)
        return 0;
    for (size_t r = 0; r < self->nrules; r++)
        s_mark_missing(self, self->rules[r].targets, self->rules[r].ntargets,
                       partners, count, missing);
    s_mark_missing(self, self->fallback, self->nfallback, partners, count,
                   missing);
    /* A fallback none of whose partners is left sends to its revoked ones
     * as if they were required. */
    bool none_left = !s_fallback_left(self, partners, count);
    for (size_t i = 0; none_left && i < self->nfallback; i++)
        if (s_takes_part(self, &self->fallback[i], partners, count, true))
            missing[self->fallback[i].partner] = true;
    size_t n = 0;
    for (size_t i = 0; i < self->npartners; i++)
        if (missing[i] && n++ < max)
            out[n - 1] = self->partner_ids[i];
    free(missing);
    return n;
}

/* ---- conditions ---------------------------------------------------------- */

void kh_rcond_free(kh_rcond_t *cond)
{
    if (!cond)
        return;
    for (size_t i = 0; i < cond->nkids; i++)
        kh_rcond_free(cond->kids[i]);
    for (size_t i = 0; i < cond->nvals; i++)
        free(cond->vals[i].s);
    free(cond->kids);
    free(cond->vals);
    free(cond->path);
    free(cond);
}

static const char *s_kind_name(kh_rkind_t kind)
{
    static const char *names[] = {"an object",  "a list",         "text",
                                  "true/false", "a whole number", "a number"};
    return names[kind];
}

static bool s_enum_has(const json_t *enums, const char *s)
{
    size_t i;
    const json_t *v;
    json_array_foreach(enums, i, v)
    {
        if (json_is_string(v) && strcmp(json_string_value(v), s) == 0)
            return true;
    }
    return false;
}

/* Report that path names no field of the schema, with the fields of the
 * nearest object above it that exists (the top level when none does),
 * so that the administrator sees what may be written there. */
static void s_no_field(s_ctx_t *ctx, kh_errcode_t code, const char *where,
                       const s_ynode_t *at, const char *path)
{
    const kh_rules_t *rules = ctx->rules;
    char parent[KH_ERROR_PATH_MAX];
    snprintf(parent, sizeof parent, "%s", path);
    int p = -1;
    for (char *dot = strrchr(parent, '.'); dot; dot = strrchr(parent, '.')) {
        *dot = '\0';
        p = s_field_find(rules, parent);
        if (p >= 0)
            break;
    }
    if (p >= 0 && rules->fields[p].kind != KH_RK_OBJECT) {
        s_error(ctx, code, where, at,
                "no field %.64s in the referral schema: %s is %s and has no "
                "fields inside it",
                path, rules->fields[p].path,
                s_kind_name(rules->fields[p].kind));
        return;
    }
    s_list_t l = {0};
    for (size_t i = 0; i < rules->nfields; i++)
        if (rules->fields[i].parent == p)
            s_list_add(&l, rules->fields[i].key, rules->fields[i].key_len);
    s_error(ctx, code, where, at,
            "no field %.64s in the referral schema; %s has: %s", path,
            p >= 0 ? rules->fields[p].path : "the top level", l.text);
}

/* Whether text s (UTF-8, len bytes) is one that text field f may hold:
 * its length in code points and its pattern. false with why (size bytes)
 * when it is not. */
static bool s_text_fits(const kh_rfield_t *f, const char *s, size_t len,
                        char *why, size_t size)
{
    size_t points = kh_utf8_length(s, len);
    if (points < f->min_len || (f->max_len && points > f->max_len)) {
        if (f->max_len)
            snprintf(why, size, "it has %zu characters, and %s has %zu to %zu",
                     points, f->path, f->min_len, f->max_len);
        else
            snprintf(why, size, "it has %zu characters, and %s at least %zu",
                     points, f->path, f->min_len);
        return false;
    }
    if (f->pattern && regexec(f->pattern, s, 0, NULL, 0) != 0) {
        snprintf(why, size, "%s matches %.80s", f->path, f->pattern_text);
        return false;
    }
    return true;
}

/* Convert scalar n to a constant for a field of kind (nullable, enums,
 * bounds from f when not items). Reports and returns -1 on a mismatch. */
static int s_value(s_ctx_t *ctx, const kh_rfield_t *f, bool items,
                   const s_ynode_t *n, const char *path, kh_rval_t *out)
{
    memset(out, 0, sizeof *out);
    if (!s_want(ctx, n, S_YSCALAR, path, "the value"))
        return -1;
    kh_rkind_t kind = items ? f->item_kind : f->kind;
    const json_t *enums = items ? f->item_enum : f->enums;
    bool b = false;
    double d = 0;
    s_stype_t t = s_scalar_type(n, &b, &d);
    if (t == S_TNULL && !items && f->nullable) {
        out->kind = KH_RV_NULL;
        return 0;
    }
    switch (kind) {
    case KH_RK_BOOLEAN:
        if (t == S_TBOOL) {
            out->kind = KH_RV_BOOL;
            out->b = b;
            return 0;
        }
        break;
    case KH_RK_INTEGER:
    case KH_RK_NUMBER:
        if (t == S_TINT ||
            (t == S_TFLOAT && kind == KH_RK_NUMBER && isfinite(d))) {
            out->kind = KH_RV_NUM;
            out->d = d;
            if (!items &&
                ((f->has_min && d < f->min) || (f->has_max && d > f->max))) {
                char range[64] = "";
                if (f->has_min && f->has_max)
                    snprintf(range, sizeof range, "%g to %g", f->min, f->max);
                else
                    snprintf(range, sizeof range, "%s %g",
                             f->has_min ? "at least" : "at most",
                             f->has_min ? f->min : f->max);
                s_error(ctx, KH_E_RULES_TYPE, path, n,
                        "%.32s is outside the range of %s (%s)", n->str,
                        f->path, range);
                return -1;
            }
            return 0;
        }
        break;
    case KH_RK_STRING:
        if (t == S_TSTR) {
            if (enums && !s_enum_has(enums, n->str)) {
                s_list_t l = {0};
                size_t i;
                const json_t *code;
                json_array_foreach(enums, i, code)
                {
                    if (json_is_string(code))
                        s_list_add(&l, json_string_value(code),
                                   json_string_length(code));
                }
                s_error(ctx, KH_E_RULES_TYPE, path, n,
                        "%.40s is not one of the codes of %s%s: %s", n->str,
                        f->path, items ? " items" : "", l.text);
                return -1;
            }
            /* A value no referral can hold (GM363 for a municipality, PL
             * for a language) makes its test never hold: a note, not an
             * error, so that a file that loaded before this check still
             * loads (as for the other checks of s_note_no_value). */
            char why[160];
            if (!items && !s_text_fits(f, n->str, n->len, why, sizeof why))
                s_note(ctx, KH_E_RULES_NEVER_MATCHES, path, n,
                       "%.40s is no value a referral can have (%s), so a "
                       "test for it never holds",
                       n->str, why);
            out->kind = KH_RV_STR;
            out->s = strdup(n->str);
            out->len = n->len;
            if (!out->s) {
                s_error(ctx, KH_E_NOMEM, path, n, "out of memory");
                return -1;
            }
            return 0;
        }
        break;
    default:
        s_error(ctx, KH_E_RULES_TYPE, path, n,
                "%s is %s and cannot be compared with a value%s", f->path,
                s_kind_name(kind),
                kind == KH_RK_ARRAY ? ": contains tests for a value in it"
                : kind == KH_RK_OBJECT
                    ? "; name one of its fields, or test it with present"
                    : "");
        return -1;
    }
    bool numeric = kind == KH_RK_INTEGER || kind == KH_RK_NUMBER;
    s_error(ctx, KH_E_RULES_TYPE, path, n, "%s %s %s%s", f->path,
            items ? "holds items that are" : "is", s_kind_name(kind),
            s_type_hint(n, t, numeric, kind == KH_RK_INTEGER,
                        kind == KH_RK_BOOLEAN));
    return -1;
}

static bool s_val_same(const kh_rval_t *a, const kh_rval_t *b)
{
    if (a->kind != b->kind)
        return false;
    switch (a->kind) {
    case KH_RV_NULL:
        return true;
    case KH_RV_BOOL:
        return a->b == b->b;
    case KH_RV_NUM:
        return a->d == b->d;
    default:
        return a->len == b->len && memcmp(a->s, b->s, a->len) == 0;
    }
}

static const char *const s_ops[] = {"equals", "in",  "contains", "lt",
                                    "le",     "gt",  "ge",       "present",
                                    "all",    "any", "not"};

static kh_rcond_t *s_cond(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                          bool *failed);

/* The leaves of an `all`, those of the `all`s nested in it included (they
 * must hold together with the outer ones), into out when it is not NULL;
 * returns how many there are. The nesting is bounded by the YAML depth. */
static size_t s_all_leaves(const kh_rcond_t *c, const kh_rcond_t **out,
                           size_t n)
{
    for (size_t i = 0; i < c->nkids; i++) {
        const kh_rcond_t *k = c->kids[i];
        if (k->op == KH_RC_ALL)
            n = s_all_leaves(k, out, n);
        else if (k->op <= KH_RC_PRESENT) {
            if (out)
                out[n] = k;
            n++;
        }
    }
    return n;
}

/* Whether the leaves on field leave no value that satisfies all of them:
 * two different equals, numeric bounds that leave no number, an equals or
 * every value of an in outside the others, a comparison or a contains with
 * present: false (or with equals null: a null is no number and no list). */
static bool s_field_contradicts(const kh_rules_t *rules,
                                const kh_rcond_t *const *leaves, size_t n,
                                int field)
{
    const kh_rfield_t *f = &rules->fields[field];
    double lo = f->has_min ? f->min : -INFINITY;
    double hi = f->has_max ? f->max : INFINITY;
    bool integer = f->kind == KH_RK_INTEGER;
    bool ranged = false, present = false, absent = false, contains = false;
    const kh_rval_t *eq = NULL;
    for (size_t i = 0; i < n; i++) {
        const kh_rcond_t *b = leaves[i];
        if (b->field != field)
            continue;
        double v = b->nvals ? b->vals[0].d : 0;
        switch (b->op) {
        case KH_RC_EQ:
            if (eq && !s_val_same(eq, &b->vals[0]))
                return true;
            eq = &b->vals[0];
            break;
        case KH_RC_PRESENT:
            *(b->vals[0].b ? &present : &absent) = true;
            break;
        case KH_RC_CONTAINS:
            contains = true;
            break;
        case KH_RC_LT:
            hi = fmin(hi, integer ? ceil(v) - 1 : v), ranged = true;
            break;
        case KH_RC_LE:
            hi = fmin(hi, integer ? floor(v) : v), ranged = true;
            break;
        case KH_RC_GT:
            lo = fmax(lo, integer ? floor(v) + 1 : v), ranged = true;
            break;
        case KH_RC_GE:
            lo = fmax(lo, integer ? ceil(v) : v), ranged = true;
            break;
        default:
            break;
        }
    }
    if (ranged && lo > hi)
        return true;
    /* What holds only for a value that is there and not null. */
    bool valued = ranged || contains || present;
    if (absent && valued)
        return true;
    if (eq) {
        if (eq->kind == KH_RV_NULL ? valued : absent)
            return true;
        if (eq->kind == KH_RV_NUM && ranged && (eq->d < lo || eq->d > hi))
            return true;
    }
    for (size_t i = 0; i < n; i++) {
        const kh_rcond_t *b = leaves[i];
        if (b->field != field || b->op != KH_RC_IN)
            continue;
        bool possible = false;
        for (size_t k = 0; k < b->nvals && !possible; k++) {
            const kh_rval_t *v = &b->vals[k];
            possible =
                (!eq || s_val_same(eq, v)) &&
                (v->kind == KH_RV_NULL ? !valued : !absent) &&
                (v->kind != KH_RV_NUM || !ranged || (v->d >= lo && v->d <= hi));
        }
        if (!possible)
            return true;
    }
    return false;
}

/* The leaves that are negated in an `all` ({not: LEAF}), the `all`s
 * nested in it included, into out (when not NULL); returns how many. */
static size_t s_all_negated(const kh_rcond_t *c, const kh_rcond_t **out,
                            size_t n)
{
    for (size_t i = 0; i < c->nkids; i++) {
        const kh_rcond_t *k = c->kids[i];
        if (k->op == KH_RC_ALL)
            n = s_all_negated(k, out, n);
        else if (k->op == KH_RC_NOT && k->kids[0]->op <= KH_RC_PRESENT) {
            if (out)
                out[n] = k->kids[0];
            n++;
        }
    }
    return n;
}

/* Whether leaves a and b test the same thing. */
static bool s_leaf_same(const kh_rcond_t *a, const kh_rcond_t *b)
{
    if (a->op != b->op || a->field != b->field || a->nvals != b->nvals)
        return false;
    for (size_t i = 0; i < a->nvals; i++)
        if (!s_val_same(&a->vals[i], &b->vals[i]))
            return false;
    return true;
}

/* Comparisons of a leaf with a negated leaf at most, a pair counting one
 * and each value compared one more: beyond, a hostile file (long lists of
 * the same values, under many nested alls) would make the check slow, and
 * it is given up. */
#define S_NEGATED_PAIRS_MAX 1000000

/* Values compared at most by the check that no value of a field is left
 * (s_field_left_empty), counting as many for the codes of a field as
 * S_CODES_MAX. */
#define S_VALUE_PAIRS_MAX 4000000
#define S_CODES_MAX 256

/* Contradictions between the leaves of an `all` (see s_field_contradicts),
 * field by field, and a leaf that the same `all` also negates ({field:
 * scope, equals: domestic} with {not: {field: scope, equals: domestic}}). */
static bool s_all_contradicts(const kh_rules_t *rules, const kh_rcond_t *c)
{
    size_t n = s_all_leaves(c, NULL, 0);
    size_t nn = s_all_negated(c, NULL, 0);
    if (n == 0 || n + nn < 2)
        return false;
    const kh_rcond_t **leaves = malloc((n + nn) * sizeof *leaves);
    if (!leaves)
        return false; /* a check the less, never a wrong one */
    s_all_leaves(c, leaves, 0);
    s_all_negated(c, leaves + n, 0);
    bool never = false;
    size_t work = 0;
    for (size_t i = 0; i < n && !never && work <= S_NEGATED_PAIRS_MAX; i++)
        for (size_t k = n; k < n + nn && !never; k++) {
            /* s_leaf_same compares values only for the same test of the
             * same field with as many values */
            const kh_rcond_t *a = leaves[i], *b = leaves[k];
            work += 1 + (a->op == b->op && a->field == b->field &&
                                 a->nvals == b->nvals
                             ? a->nvals
                             : 0);
            if (work > S_NEGATED_PAIRS_MAX)
                break;
            never = s_leaf_same(leaves[i], leaves[k]);
        }
    for (size_t i = 0; i < n && !never; i++) {
        bool first = true; /* each field once */
        for (size_t k = 0; k < i && first; k++)
            first = leaves[k]->field != leaves[i]->field;
        never =
            first && s_field_contradicts(rules, leaves, n, leaves[i]->field);
    }
    free(leaves);
    return never;
}

/* Whether equals or in with vals holds for every referral: the field is
 * always there and not null, and vals hold each value it can take (true and
 * false, or every code of its list). Such a leaf is always true: a rule
 * made of it with continue: false hides the rules after it, and its `not`
 * never holds. */
static bool s_vals_cover_field(const kh_rfield_t *f, const kh_rval_t *vals,
                               size_t nvals)
{
    if (!f->always)
        return false;
    if (f->kind == KH_RK_BOOLEAN) {
        bool t = false, fl = false;
        for (size_t i = 0; i < nvals; i++)
            if (vals[i].kind == KH_RV_BOOL && vals[i].b)
                t = true;
            else if (vals[i].kind == KH_RV_BOOL)
                fl = true;
        return t && fl;
    }
    if (f->kind != KH_RK_STRING || !json_is_array(f->enums) ||
        json_array_size(f->enums) == 0)
        return false;
    size_t i;
    const json_t *code;
    json_array_foreach(f->enums, i, code)
    {
        bool found = false;
        for (size_t k = 0; k < nvals && !found; k++)
            found =
                json_is_string(code) && vals[k].kind == KH_RV_STR &&
                vals[k].len == json_string_length(code) &&
                memcmp(vals[k].s, json_string_value(code), vals[k].len) == 0;
        if (!found)
            return false;
    }
    return true;
}

/* A leaf: {field: PATH, OP: VALUE}. */
static kh_rcond_t *s_leaf(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                          kh_rcond_t *c, bool *failed)
{
    static const char *const allowed[] = {"field",   "equals", "in", "contains",
                                          "lt",      "le",     "gt", "ge",
                                          "present", NULL};
    if (s_check_keys(ctx, n, path, allowed))
        *failed = true;
    char p[KH_ERROR_PATH_MAX];
    s_path_key(p, path, "field");
    const s_ynode_t *fn = s_get(n, "field");
    int ops = 0;
    const s_ynode_t *vn = NULL;
    for (int op = KH_RC_EQ; op <= KH_RC_PRESENT; op++)
        if (s_get(n, s_ops[op])) {
            ops++;
            c->op = (kh_rcop_t) op;
            vn = s_get(n, s_ops[op]);
        }
    if (fn && ops == 0) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "the condition has no operator: add one of equals, in, "
                "contains, lt, le, gt, ge or present");
        *failed = true;
        return c;
    }
    if (fn && ops > 1) {
        /* Two bounds in one mapping is the usual way to write a range. */
        char names[96] = "";
        for (int op = KH_RC_EQ, seen = 0; op <= KH_RC_PRESENT; op++)
            if (s_get(n, s_ops[op])) {
                seen++;
                snprintf(names + strlen(names), sizeof names - strlen(names),
                         "%s%s",
                         seen == 1     ? ""
                         : seen == ops ? " and "
                                       : ", ",
                         s_ops[op]);
            }
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "the condition has %d operators (%s) and takes one: give "
                "each its own condition under all: [...]",
                ops, names);
        *failed = true;
        return c;
    }
    if (!fn || ops != 1) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "a condition is {field, one operator} or all, any, not");
        *failed = true;
        return c;
    }
    const char *fpath = s_want_string(ctx, fn, p, "field");
    if (!fpath) {
        *failed = true;
        return c;
    }
    c->field = s_field_find(ctx->rules, fpath);
    if (c->field < 0) {
        s_no_field(ctx, KH_E_RULES_UNKNOWN_FIELD, p, fn, fpath);
        *failed = true;
        return c;
    }
    const kh_rfield_t *f = &ctx->rules->fields[c->field];
    s_path_key(p, path, s_ops[c->op]);
    size_t count = vn->kind == S_YSEQ ? vn->n : 1;
    c->vals = calloc(count ? count : 1, sizeof *c->vals);
    if (!c->vals) {
        s_error(ctx, KH_E_NOMEM, p, vn, "out of memory");
        *failed = true;
        return c;
    }
    switch (c->op) {
    case KH_RC_EQ:
        c->nvals = 1;
        if (s_value(ctx, f, false, vn, p, &c->vals[0]))
            *failed = true;
        else if (s_vals_cover_field(f, c->vals, c->nvals))
            c->state = KH_RS_ALWAYS;
        break;
    case KH_RC_CONTAINS:
        c->nvals = 1;
        if (f->kind != KH_RK_ARRAY) {
            s_error(ctx, KH_E_RULES_TYPE, p, vn,
                    "contains needs a list field; %s is %s", f->path,
                    s_kind_name(f->kind));
            *failed = true;
        } else if (s_value(ctx, f, true, vn, p, &c->vals[0]))
            *failed = true;
        break;
    case KH_RC_IN:
        if (!s_want(ctx, vn, S_YSEQ, p, "in")) {
            *failed = true;
            break;
        }
        for (size_t i = 0; i < vn->n; i++) {
            char q[KH_ERROR_PATH_MAX];
            s_path_index(q, p, i);
            if (s_value(ctx, f, false, vn->items[i], q, &c->vals[c->nvals++]))
                *failed = true;
        }
        if (vn->n == 0)
            c->state = KH_RS_NEVER;
        else if (!*failed && s_vals_cover_field(f, c->vals, c->nvals))
            c->state = KH_RS_ALWAYS;
        break;
    case KH_RC_PRESENT:
        c->nvals = 1;
        c->vals[0].kind = KH_RV_BOOL;
        if (s_want_bool(ctx, vn, p, "present", &c->vals[0].b))
            *failed = true;
        else if (f->always)
            c->state = c->vals[0].b ? KH_RS_ALWAYS : KH_RS_NEVER;
        break;
    default: { /* lt le gt ge */
        c->nvals = 1;
        bool b;
        if (f->kind != KH_RK_INTEGER && f->kind != KH_RK_NUMBER) {
            s_error(ctx, KH_E_RULES_TYPE, p, vn,
                    "%s needs a numeric field; %s is %s", s_ops[c->op], f->path,
                    s_kind_name(f->kind));
            *failed = true;
            break;
        }
        s_stype_t t = S_TSTR;
        if (vn->kind == S_YSCALAR)
            t = s_scalar_type(vn, &b, &c->vals[0].d);
        if (t != S_TINT && (t != S_TFLOAT || !isfinite(c->vals[0].d))) {
            s_error(ctx, KH_E_RULES_TYPE, p, vn, "%s needs a number%s",
                    s_ops[c->op],
                    vn->kind == S_YSCALAR
                        ? s_type_hint(vn, t, true, false, false)
                        : "");
            *failed = true;
            break;
        }
        c->vals[0].kind = KH_RV_NUM;
        double v = c->vals[0].d;
        bool never = (c->op == KH_RC_LT && f->has_min && v <= f->min) ||
                     (c->op == KH_RC_LE && f->has_min && v < f->min) ||
                     (c->op == KH_RC_GT && f->has_max && v >= f->max) ||
                     (c->op == KH_RC_GE && f->has_max && v > f->max);
        bool always =
            f->always && ((c->op == KH_RC_LT && f->has_max && v > f->max) ||
                          (c->op == KH_RC_LE && f->has_max && v >= f->max) ||
                          (c->op == KH_RC_GT && f->has_min && v < f->min) ||
                          (c->op == KH_RC_GE && f->has_min && v <= f->min));
        c->state = never ? KH_RS_NEVER : always ? KH_RS_ALWAYS : KH_RS_MAYBE;
        break;
    }
    }
    return c;
}

/* Compile condition n; NULL only on allocation failure. *failed is set when
 * something was reported (the tree is then only good for freeing). */
static kh_rcond_t *s_cond(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                          bool *failed)
{
    kh_rcond_t *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup(path))) {
        free(c);
        s_error(ctx, KH_E_NOMEM, path, n, "out of memory");
        *failed = true;
        return NULL;
    }
    c->line = n->line;
    c->column = n->column;
    c->field = -1;
    if (!s_want(ctx, n, S_YMAP, path, "a condition")) {
        *failed = true;
        return c;
    }
    const s_ynode_t *all = s_get(n, "all"), *any = s_get(n, "any"),
                    *not = s_get(n, "not");
    if (!all && !any && !not )
        return s_leaf(ctx, n, path, c, failed);
    if (n->n != 2) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "all, any and not stand alone in their condition");
        *failed = true;
        return c;
    }
    char p[KH_ERROR_PATH_MAX];
    if (not ) {
        c->op = KH_RC_NOT;
        s_path_key(p, path, "not");
        c->kids = calloc(1, sizeof *c->kids);
        if (!c->kids)
            s_error(ctx, KH_E_NOMEM, p, not, "out of memory");
        if (!c->kids || !(c->kids[0] = s_cond(ctx, not, p, failed))) {
            *failed = true;
            return c;
        }
        c->nkids = 1;
        kh_rstate_t s = c->kids[0]->state;
        c->state = s == KH_RS_ALWAYS  ? KH_RS_NEVER
                   : s == KH_RS_NEVER ? KH_RS_ALWAYS
                                      : KH_RS_MAYBE;
        return c;
    }
    const s_ynode_t *list = all ? all : any;
    c->op = all ? KH_RC_ALL : KH_RC_ANY;
    s_path_key(p, path, all ? "all" : "any");
    if (!s_want(ctx, list, S_YSEQ, p, all ? "all" : "any")) {
        *failed = true;
        return c;
    }
    c->kids = calloc(list->n ? list->n : 1, sizeof *c->kids);
    if (!c->kids) {
        /* Reported: an all left empty would hold for every referral. */
        s_error(ctx, KH_E_NOMEM, p, list, "out of memory");
        *failed = true;
        return c;
    }
    bool any_never = false, all_always = true, any_always = false,
         all_never = true;
    for (size_t i = 0; i < list->n; i++) {
        char q[KH_ERROR_PATH_MAX];
        s_path_index(q, p, i);
        kh_rcond_t *k = s_cond(ctx, list->items[i], q, failed);
        if (!k)
            return c;
        c->kids[c->nkids++] = k;
        any_never = any_never || k->state == KH_RS_NEVER;
        any_always = any_always || k->state == KH_RS_ALWAYS;
        all_always = all_always && k->state == KH_RS_ALWAYS;
        all_never = all_never && k->state == KH_RS_NEVER;
    }
    if (*failed)
        return c;
    if (c->op == KH_RC_ALL)
        c->state = any_never || s_all_contradicts(ctx->rules, c) ? KH_RS_NEVER
                   : all_always                                  ? KH_RS_ALWAYS
                                                                 : KH_RS_MAYBE;
    else
        c->state = any_always  ? KH_RS_ALWAYS
                   : all_never ? KH_RS_NEVER
                               : KH_RS_MAYBE;
    /* The rule still fires through the other parts, but a part that can
     * never hold is most likely a slip (lt: 0 for lt: 10): say so. */
    if (c->op == KH_RC_ANY && any_never && !all_never)
        for (size_t i = 0; i < c->nkids; i++)
            if (c->kids[i]->state == KH_RS_NEVER)
                s_note(ctx, KH_E_RULES_NEVER_MATCHES, c->kids[i]->path,
                       list->items[i],
                       "this part of the any can never hold; the any holds "
                       "only through its other parts");
    return c;
}

/* The innermost part of a never-matching condition that makes it so. */
static const kh_rcond_t *s_never_origin(const kh_rcond_t *c)
{
    if (c->op == KH_RC_ALL) {
        for (size_t i = 0; i < c->nkids; i++)
            if (c->kids[i]->state == KH_RS_NEVER)
                return s_never_origin(c->kids[i]);
        return c;
    }
    if (c->op == KH_RC_ANY && c->nkids > 0)
        return s_never_origin(c->kids[0]);
    return c;
}

/* ---- never-matching values: notes --------------------------------------- */

/* The checks above refuse a rule that can never fire. Those below find
 * more such rules (a value that one part requires and another excludes,
 * `in`s that share no value, `not` of every value written as several
 * parts) and only note them: files that loaded before they existed must
 * still load, at a reload and at a start. */

/* The equals and in leaves that condition c requires (negated false) or
 * excludes (negated true) of every referral it holds for: those of an
 * `all`, of the `all`s in it, and, by De Morgan, each part of a negated
 * `any` ({not: {any: [A, B]}} excludes A and B). Other parts are left
 * out, which can only widen what seems possible. Into pos and neg when
 * not NULL; counts in *npos and *nneg. */
static void s_value_parts(const kh_rcond_t *c, bool negated,
                          const kh_rcond_t **pos, size_t *npos,
                          const kh_rcond_t **neg, size_t *nneg)
{
    if (c->op == KH_RC_EQ || c->op == KH_RC_IN) {
        if (negated && neg)
            neg[*nneg] = c;
        else if (!negated && pos)
            pos[*npos] = c;
        (*(negated ? nneg : npos))++;
    } else if (c->op == KH_RC_NOT)
        s_value_parts(c->kids[0], !negated, pos, npos, neg, nneg);
    else if ((c->op == KH_RC_ALL && !negated) ||
             (c->op == KH_RC_ANY && negated))
        for (size_t i = 0; i < c->nkids; i++)
            s_value_parts(c->kids[i], negated, pos, npos, neg, nneg);
}

static bool s_leaf_has(const kh_rcond_t *leaf, const kh_rval_t *v)
{
    for (size_t i = 0; i < leaf->nvals; i++)
        if (s_val_same(&leaf->vals[i], v))
            return true;
    return false;
}

/* Whether value v of field passes every part in pos (it is one of their
 * values) and in neg (it is none of theirs). A negated part that names
 * null is left out: whether an absent field counts as null is not this
 * check's to decide. */
static bool s_value_passes(const kh_rval_t *v, int field,
                           const kh_rcond_t *const *pos, size_t npos,
                           const kh_rcond_t *const *neg, size_t nneg)
{
    for (size_t i = 0; i < npos; i++)
        if (pos[i]->field == field && !s_leaf_has(pos[i], v))
            return false;
    kh_rval_t null = {.kind = KH_RV_NULL};
    for (size_t i = 0; i < nneg; i++)
        if (neg[i]->field == field && !s_leaf_has(neg[i], &null) &&
            s_leaf_has(neg[i], v))
            return false;
    return true;
}

/* Whether no value of field passes pos and neg: the values to try are
 * those of the first part in pos on field, or, when none is, every value
 * the field can take (true and false, or its codes) when it is in every
 * referral; a field of other values is not judged. */
static bool s_no_value_passes(const kh_rules_t *rules, int field,
                              const kh_rcond_t *const *pos, size_t npos,
                              const kh_rcond_t *const *neg, size_t nneg)
{
    for (size_t i = 0; i < npos; i++)
        if (pos[i]->field == field) {
            for (size_t k = 0; k < pos[i]->nvals; k++)
                if (s_value_passes(&pos[i]->vals[k], field, pos, npos, neg,
                                   nneg))
                    return false;
            return true;
        }
    const kh_rfield_t *f = &rules->fields[field];
    if (!f->always)
        return false;
    if (f->kind == KH_RK_BOOLEAN) {
        kh_rval_t t = {.kind = KH_RV_BOOL, .b = true};
        kh_rval_t fl = {.kind = KH_RV_BOOL, .b = false};
        return !s_value_passes(&t, field, pos, npos, neg, nneg) &&
               !s_value_passes(&fl, field, pos, npos, neg, nneg);
    }
    if (f->kind != KH_RK_STRING || !json_is_array(f->enums) ||
        json_array_size(f->enums) == 0)
        return false;
    size_t i;
    const json_t *code;
    json_array_foreach(f->enums, i, code)
    {
        if (!json_is_string(code))
            return false;
        kh_rval_t v = {.kind = KH_RV_STR,
                       .s = (char *) json_string_value(code),
                       .len = json_string_length(code)};
        if (s_value_passes(&v, field, pos, npos, neg, nneg))
            return false;
    }
    return true;
}

/* The field of which condition c leaves no value (see s_value_parts), or
 * -1 when it leaves one for every field, or is too large to judge. */
static int s_field_left_empty(const kh_rules_t *rules, const kh_rcond_t *c)
{
    size_t npos = 0, nneg = 0;
    s_value_parts(c, false, NULL, &npos, NULL, &nneg);
    if (npos + nneg == 0 || npos + nneg > S_NEGATED_PAIRS_MAX / (npos + nneg))
        return -1;
    const kh_rcond_t **parts = malloc((npos + nneg) * sizeof *parts);
    if (!parts)
        return -1; /* a note the less, never a wrong one */
    size_t p = 0, q = 0;
    s_value_parts(c, false, parts, &p, parts + npos, &q);
    /* Each value tried (one of a part's, or of a field's codes) is looked
     * for among the values of every part: two long `in`s on one field
     * would cost the square of their length (minutes for a file of a
     * few hundred KiB, at every load and reload), so past a bound the
     * note is left out. */
    size_t values = S_CODES_MAX;
    for (size_t i = 0; i < npos + nneg; i++)
        values += parts[i]->nvals;
    if (values > S_VALUE_PAIRS_MAX / values) {
        free(parts);
        return -1;
    }
    int empty = -1;
    for (size_t i = 0; i < npos + nneg && empty < 0; i++) {
        int field = parts[i]->field;
        bool first = true; /* each field once */
        for (size_t k = 0; k < i && first; k++)
            first = parts[k]->field != field;
        if (first &&
            s_no_value_passes(rules, field, parts, npos, parts + npos, nneg))
            empty = field;
    }
    free(parts);
    return empty;
}

/* Note each part of condition c (c itself, or the parts of the `any`s in
 * it) that leaves no value of a field, unless the checks above found it
 * already. */
static void s_note_no_value(s_ctx_t *ctx, const kh_rcond_t *c)
{
    if (c->state == KH_RS_NEVER)
        return;
    if (c->op == KH_RC_ALL || c->op == KH_RC_NOT) {
        int field = s_field_left_empty(ctx->rules, c);
        if (field >= 0) {
            s_note_at(ctx, KH_E_RULES_NEVER_MATCHES, c->path, c->line,
                      c->column,
                      "no value of %s meets every part of this condition, "
                      "so it can never hold and the rule never fires "
                      "through it",
                      ctx->rules->fields[field].path);
            return;
        }
    }
    if (c->op == KH_RC_ALL || c->op == KH_RC_ANY)
        for (size_t i = 0; i < c->nkids; i++)
            s_note_no_value(ctx, c->kids[i]);
}

/* ---- targets ------------------------------------------------------------- */

static int s_priority(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                      kh_priority_t *out)
{
    /* A number (priority: 1) gets the three names, not "must be text":
     * they are what to write. */
    if (!s_want(ctx, n, S_YSCALAR, path, "priority"))
        return -1;
    bool b;
    double d;
    const char *s = s_scalar_type(n, &b, &d) == S_TSTR ? n->str : "";
    for (int p = KH_PRIORITY_NORMAL; p <= KH_PRIORITY_URGENT; p++)
        if (strcmp(s, kh_priority_name((kh_priority_t) p)) == 0) {
            *out = (kh_priority_t) p;
            return 0;
        }
    s_error(ctx, KH_E_RULES_TYPE, path, n,
            "priority is normal, high or urgent");
    return -1;
}

/* Compile the projection list n (field paths of the referral schema, at
 * least one) into bits. Returns -1 when an error was reported. */
static int s_fields(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                    uint64_t *bits)
{
    if (!s_want(ctx, n, S_YSEQ, path, "fields"))
        return -1;
    if (n->n == 0) {
        s_error(ctx, KH_E_RULES_PROJECTION, path, n,
                "a target receives at least one field");
        return -1;
    }
    int rc = 0;
    for (size_t k = 0; k < n->n; k++) {
        char q[KH_ERROR_PATH_MAX];
        s_path_index(q, path, k);
        const char *fp = s_want_string(ctx, n->items[k], q, "a field");
        if (!fp) {
            rc = -1;
            continue;
        }
        int field = s_field_find(ctx->rules, fp);
        if (field < 0) {
            s_no_field(ctx, KH_E_RULES_PROJECTION, q, n->items[k], fp);
            rc = -1;
            continue;
        }
        uint64_t bit = UINT64_C(1) << (field % 64);
        if (bits[field / 64] & bit)
            s_note(ctx, KH_E_RULES_PROJECTION, q, n->items[k],
                   "%s is listed twice: once is enough (or was another "
                   "field meant?)",
                   fp);
        bits[field / 64] |= bit;
    }
    return rc;
}

/* Check and compile the escalate_to mapping n of the target for partner
 * id: {partner: P, fields: [...]}, the partner that gets a copy when the
 * target's urgent delivery is not acknowledged in time, and the fields the
 * copy carries (its own projection: need to know holds for a copy too).
 * The partner is checked like a target partner (registered unless the
 * target is optional, handles cases, not the target itself). Only urgent
 * deliveries are escalated, and a merged delivery takes its escalation from
 * its highest-priority targets, so escalate_to on a target that is not
 * urgent never takes effect: a note says so. Returns -1 when an error was
 * reported. */
static int s_escalate_to(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                         const char *id, kh_rtarget_t *target)
{
    static const char *const allowed[] = {"partner", "fields", NULL};
    if (!s_want(ctx, n, S_YMAP, path, "escalate_to"))
        return -1;
    int rc = s_check_keys(ctx, n, path, allowed) ? -1 : 0;
    const s_ynode_t *pn = s_get(n, "partner"), *fn = s_get(n, "fields");
    if (!pn || !fn) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "escalate_to needs a partner and the fields its copy "
                "carries");
        return -1;
    }
    char p[KH_ERROR_PATH_MAX];
    s_path_key(p, path, "fields");
    if (s_fields(ctx, fn, p, target->escalate_fields))
        rc = -1;
    s_path_key(p, path, "partner");
    path = p;
    n = pn;
    const char *to = s_want_string(ctx, n, path, "partner");
    if (!to)
        return -1;
    if (!kh_partner_id_valid(to)) {
        s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, path, n, S_NOT_PARTNER_ID, to);
        return -1;
    }
    if (strcmp(to, id) == 0) {
        s_error(ctx, KH_E_RULES_ESCALATION, path, n,
                "a target cannot escalate to its own partner");
        return -1;
    }
    target->escalate_named = s_partner_intern(ctx, to);
    if (target->escalate_named < 0) {
        s_error(ctx, KH_E_NOMEM, path, n, "out of memory");
        return -1;
    }
    /* An optional target's escalation partner that is absent makes no
     * copy now, but one once it is registered (kh_rules_set_partners): the
     * note on the priority below holds all the same. */
    bool absent = false;
    if (ctx->opts->partners) {
        const kh_rules_partner_t *reg = s_registered(ctx->opts, to);
        if (!reg && target->optional) {
            s_note(ctx, KH_E_RULES_PARTNER_ABSENT, path, n,
                   "escalation partner %s is not registered; no copy on "
                   "escalation",
                   to);
            absent = true;
        } else if (!reg) {
            s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, path, n,
                    "escalation partner %s is not registered (or was "
                    "revoked): correct the id, or register the partner "
                    "first (ketenhubctl partner add)",
                    to);
            return -1;
        } else if (!reg->handles_cases) {
            s_error(ctx, KH_E_RULES_NO_CASES_PARTNER, path, n,
                    "partner %s does not handle cases and may not receive "
                    "a copy of case data: name a partner that handles cases",
                    to);
            return -1;
        }
    }
    if (target->priority != KH_PRIORITY_URGENT)
        s_note(ctx, KH_E_RULES_ESCALATION, path, n,
               "only urgent deliveries are escalated; this target is %s",
               kh_priority_name(target->priority));
    if (!absent)
        target->escalate = target->escalate_named;
    return rc;
}

/* Parse the targets list n into *out. Returns -1 when anything was
 * reported. */
static int s_targets(s_ctx_t *ctx, const s_ynode_t *n, const char *path,
                     kh_rtarget_t **out, size_t *count)
{
    static const char *const allowed[] = {"partner",  "fields",      "priority",
                                          "optional", "escalate_to", NULL};
    if (!s_want(ctx, n, S_YSEQ, path, "targets"))
        return -1;
    if (n->n == 0) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n, "targets must not be empty");
        return -1;
    }
    *out = calloc(n->n, sizeof **out);
    if (!*out) {
        s_error(ctx, KH_E_NOMEM, path, n, "out of memory");
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < n->n; i++) {
        const s_ynode_t *t = n->items[i];
        kh_rtarget_t *target = &(*out)[*count];
        target->escalate = target->escalate_named = -1;
        char tp[KH_ERROR_PATH_MAX], p[KH_ERROR_PATH_MAX];
        s_path_index(tp, path, i);
        if (!s_want(ctx, t, S_YMAP, tp, "a target")) {
            rc = -1;
            continue;
        }
        if (s_check_keys(ctx, t, tp, allowed))
            rc = -1;
        const s_ynode_t *pn = s_get(t, "partner"), *fn = s_get(t, "fields"),
                        *prn = s_get(t, "priority"), *on = s_get(t, "optional");
        if (!pn || !fn) {
            s_error(ctx, KH_E_RULES_SYNTAX, tp, t,
                    "a target needs a partner and its fields");
            rc = -1;
            continue;
        }
        s_path_key(p, tp, "priority");
        if (prn && s_priority(ctx, prn, p, &target->priority))
            rc = -1;
        s_path_key(p, tp, "optional");
        if (on && s_want_bool(ctx, on, p, "optional", &target->optional))
            rc = -1;
        s_path_key(p, tp, "fields");
        if (s_fields(ctx, fn, p, target->fields))
            rc = -1;
        s_path_key(p, tp, "partner");
        const char *id = s_want_string(ctx, pn, p, "partner");
        if (!id) {
            rc = -1;
            continue;
        }
        if (!kh_partner_id_valid(id)) {
            s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, p, pn, S_NOT_PARTNER_ID,
                    id);
            rc = -1;
            continue;
        }
        target->active = true;
        if (ctx->opts->partners) {
            const kh_rules_partner_t *reg = s_registered(ctx->opts, id);
            if (!reg && target->optional) {
                s_note(ctx, KH_E_RULES_PARTNER_ABSENT, p, pn,
                       "optional partner %s is not registered; target skipped",
                       id);
                target->active = false;
            } else if (!reg) {
                s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, p, pn,
                        "partner %s is not registered (or was revoked): "
                        "correct the id, register the partner first "
                        "(ketenhubctl partner add), or mark this target "
                        "optional: true",
                        id);
                rc = -1;
            } else if (!reg->handles_cases) {
                s_error(ctx, KH_E_RULES_NO_CASES_PARTNER, p, pn,
                        "partner %s does not handle cases and may not "
                        "receive case data: remove this target",
                        id);
                rc = -1;
            }
        }
        target->partner = s_partner_intern(ctx, id);
        if (target->partner < 0) {
            s_error(ctx, KH_E_NOMEM, p, pn, "out of memory");
            return -1;
        }
        /* One error per repeat, at the repeat: not one per earlier
         * mention, which a list naming a partner often would make many. */
        for (size_t k = 0; k < *count; k++)
            if ((*out)[k].partner == target->partner) {
                s_error(ctx, KH_E_RULES_DUPLICATE_NAME, p, pn,
                        "partner %s is named twice in these targets", id);
                rc = -1;
                break;
            }
        const s_ynode_t *en = s_get(t, "escalate_to");
        s_path_key(p, tp, "escalate_to");
        if (en && s_escalate_to(ctx, en, p, id, target))
            rc = -1;
        (*count)++;
    }
    return rc;
}

/* ---- rules and the document -----------------------------------------------
 */

static bool s_name_ok(const char *s)
{
    size_t len = strlen(s);
    if (len == 0 || len > 64)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              (i > 0 && (c == '-' || c == '_'))))
            return false;
    }
    return true;
}

static void s_rule(s_ctx_t *ctx, const s_ynode_t *n, size_t index)
{
    static const char *const allowed[] = {"name", "description", "when", "then",
                                          NULL};
    static const char *const then_allowed[] = {"targets", "continue", NULL};
    char path[KH_ERROR_PATH_MAX], p[KH_ERROR_PATH_MAX];
    snprintf(path, sizeof path, "rules");
    kh_path_append_index(path, sizeof path, index);
    if (!s_want(ctx, n, S_YMAP, path, "a rule"))
        return;
    (void) s_check_keys(ctx, n, path, allowed);
    /* Evaluation ends at a matched rule with continue: false; after one
     * whose condition always holds, no rule is ever reached. */
    for (size_t i = 0; i < ctx->rules->nrules; i++) {
        const kh_rrule_t *r = &ctx->rules->rules[i];
        if (r->when && r->when->state == KH_RS_ALWAYS && !r->cont) {
            s_error(ctx, KH_E_RULES_NEVER_MATCHES, path, n,
                    "rule %s before this one always fires and stops the "
                    "evaluation, so this rule is never reached",
                    r->name ? r->name : "");
            break;
        }
    }
    kh_rrule_t *rule = &ctx->rules->rules[ctx->rules->nrules++];
    rule->cont = true;
    const s_ynode_t *name = s_get(n, "name"), *when = s_get(n, "when"),
                    *then = s_get(n, "then"), *desc = s_get(n, "description");
    if (!name || !when || !then) {
        s_error(ctx, KH_E_RULES_SYNTAX, path, n,
                "a rule needs a name, when and then");
        return;
    }
    s_path_key(p, path, "name");
    const char *s = s_want_string(ctx, name, p, "name");
    if (s && !s_name_ok(s)) {
        s_error(ctx, KH_E_RULES_SYNTAX, p, name,
                "a name is 1 to 64 of a-z, 0-9, - and _, starting with a "
                "letter or digit");
        s = NULL;
    }
    if (s) {
        for (size_t i = 0; i + 1 < ctx->rules->nrules; i++)
            if (ctx->rules->rules[i].name &&
                strcmp(ctx->rules->rules[i].name, s) == 0) {
                s_error(ctx, KH_E_RULES_DUPLICATE_NAME, p, name,
                        "rule name %s is used twice", s);
                break;
            }
        if (!(rule->name = strdup(s)))
            s_error(ctx, KH_E_NOMEM, p, name, "out of memory");
    }
    s_path_key(p, path, "description");
    if (desc)
        (void) s_want_string(ctx, desc, p, "description");
    s_path_key(p, path, "when");
    bool failed = false;
    rule->when = s_cond(ctx, when, p, &failed);
    if (rule->when && !failed && rule->when->state == KH_RS_NEVER) {
        const kh_rcond_t *o = s_never_origin(rule->when);
        s_error_at(ctx, KH_E_RULES_NEVER_MATCHES, o->path, o->line, o->column,
                   "this condition can never hold, so the rule never fires");
    } else if (rule->when && !failed)
        s_note_no_value(ctx, rule->when);
    s_path_key(p, path, "then");
    if (!s_want(ctx, then, S_YMAP, p, "then"))
        return;
    (void) s_check_keys(ctx, then, p, then_allowed);
    const s_ynode_t *targets = s_get(then, "targets"),
                    *cont = s_get(then, "continue");
    char q[KH_ERROR_PATH_MAX];
    if (cont) {
        s_path_key(q, p, "continue");
        (void) s_want_bool(ctx, cont, q, "continue", &rule->cont);
    }
    if (!targets) {
        s_error(ctx, KH_E_RULES_SYNTAX, p, then, "then needs targets");
        return;
    }
    s_path_key(q, p, "targets");
    (void) s_targets(ctx, targets, q, &rule->targets, &rule->ntargets);
}

static void s_document(s_ctx_t *ctx, const s_ynode_t *root)
{
    static const char *const allowed[] = {"version", "partners_required",
                                          "fallback", "rules", NULL};
    static const char *const fb_allowed[] = {"targets", NULL};
    if (!s_want(ctx, root, S_YMAP, "", "the file"))
        return;
    const s_ynode_t *version = s_get(root, "version");
    bool b;
    double d = 0;
    if (!version || version->kind != S_YSCALAR ||
        s_scalar_type(version, &b, &d) != S_TINT || d != 1) {
        s_error(ctx, KH_E_RULES_VERSION, "version", version ? version : root,
                "unsupported rules format version; this hub reads version 1");
        return;
    }
    (void) s_check_keys(ctx, root, "", allowed);
    const s_ynode_t *req = s_get(root, "partners_required");
    if (req &&
        s_want(ctx, req, S_YSEQ, "partners_required", "partners_required"))
        for (size_t i = 0; i < req->n; i++) {
            char p[KH_ERROR_PATH_MAX];
            s_path_index(p, "partners_required", i);
            const char *id = s_want_string(ctx, req->items[i], p, "partner");
            if (id && ctx->opts->partners && !s_registered(ctx->opts, id))
                s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, p, req->items[i],
                        "required partner %s is not registered (or was "
                        "revoked): register it first (ketenhubctl partner "
                        "add), or take it out of partners_required",
                        id);
        }
    const s_ynode_t *fb = s_get(root, "fallback");
    if (!fb)
        s_error(ctx, KH_E_RULES_SYNTAX, "", root,
                "the file needs a fallback: where unmatched referrals go");
    else if (s_want(ctx, fb, S_YMAP, "fallback", "fallback")) {
        (void) s_check_keys(ctx, fb, "fallback", fb_allowed);
        const s_ynode_t *t = s_get(fb, "targets");
        if (!t)
            s_error(ctx, KH_E_RULES_SYNTAX, "fallback", fb,
                    "fallback needs targets");
        else if (s_targets(ctx, t, "fallback.targets", &ctx->rules->fallback,
                           &ctx->rules->nfallback) == 0) {
            bool any = false;
            for (size_t i = 0; i < ctx->rules->nfallback; i++)
                any = any || ctx->rules->fallback[i].active;
            if (!any)
                s_error(ctx, KH_E_RULES_UNKNOWN_PARTNER, "fallback.targets", t,
                        "the fallback needs a registered partner");
        }
    }
    const s_ynode_t *rules = s_get(root, "rules");
    if (!rules) {
        s_error(ctx, KH_E_RULES_SYNTAX, "", root, "the file needs rules");
        return;
    }
    if (!s_want(ctx, rules, S_YSEQ, "rules", "rules"))
        return;
    ctx->rules->rules = calloc(rules->n ? rules->n : 1, sizeof(kh_rrule_t));
    if (!ctx->rules->rules) {
        s_error(ctx, KH_E_NOMEM, "rules", rules, "out of memory");
        return;
    }
    for (size_t i = 0; i < rules->n; i++)
        s_rule(ctx, rules->items[i], i);
}

/* ---- public -----------------------------------------------------------------
 */

const char *kh_priority_name(kh_priority_t priority)
{
    switch (priority) {
    case KH_PRIORITY_NORMAL:
        return "normal";
    case KH_PRIORITY_HIGH:
        return "high";
    case KH_PRIORITY_URGENT:
        return "urgent";
    }
    return "unknown";
}

void kh_rules_destroy(kh_rules_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_rules_t *self = *self_p;
    for (size_t i = 0; i < self->nrules; i++) {
        free(self->rules[i].name);
        kh_rcond_free(self->rules[i].when);
        free(self->rules[i].targets);
    }
    free(self->rules);
    free(self->fallback);
    for (size_t i = 0; i < self->npartners; i++)
        free(self->partner_ids[i]);
    free(self->partner_ids);
    for (size_t i = 0; i < self->nfields; i++) {
        free(self->fields[i].path);
        if (self->fields[i].pattern)
            regfree(self->fields[i].pattern);
        free(self->fields[i].pattern);
    }
    free(self->fields);
    json_decref(self->schema);
    free(self);
    *self_p = NULL;
}

/* The referral schema at path, parsed, and the SHA-256 of its bytes into
 * sha256 (what a routing decision depends on besides the rules: the
 * fields a projection holds, the codes a field can take); NULL when it
 * cannot be read or is not JSON. */
static json_t *s_load_schema(const char *path, char sha256[65])
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    /* The schema comes with the hub, not from a partner: the bound only
     * keeps a wrong path (a device) from being read without end. */
    size_t cap = 16 * 1024 * 1024, len = 0, size = 0;
    char *buf = NULL;
    bool bad = false;
    while (!bad) {
        if (len == size) {
            size = size ? size * 2 : 64 * 1024;
            char *more = size <= cap ? realloc(buf, size) : NULL;
            if (!more) {
                bad = true;
                break;
            }
            buf = more;
        }
        size_t n = fread(buf + len, 1, size - len, f);
        len += n;
        if (n == 0) {
            bad = ferror(f) != 0;
            break;
        }
    }
    fclose(f);
    json_t *schema = NULL;
    if (!bad) {
        kh_sha256_hex(buf, len, sha256);
        json_error_t jerr;
        schema = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    }
    free(buf);
    return schema;
}

kh_rules_t *kh_rules_load_buffer(const void *data, size_t len,
                                 const kh_rules_options_t *opts,
                                 kh_error_t *err)
{
    kh_error_clear(err);
    if (opts && opts->sha256_out)
        opts->sha256_out[0] = '\0';
    if (!opts || !opts->schema_path) {
        kh_error_set(err, KH_E_CONFIG, "", "no referral schema given");
        return NULL;
    }
    s_ctx_t ctx = {.opts = opts, .err = err};
    if (len > KH_RULES_FILE_MAX) {
        s_error_at(&ctx, KH_E_RULES_TOO_LARGE, "", 0, 0,
                   "the file is larger than %d bytes", KH_RULES_FILE_MAX);
        return NULL;
    }
    if (opts->sha256_out)
        kh_sha256_hex(data, len, opts->sha256_out);
    if (s_check_text(&ctx, data, len))
        return NULL;
    kh_rules_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    ctx.rules = self;
    kh_sha256_hex(data, len, self->version);
    self->schema = s_load_schema(opts->schema_path, self->schema_version);
    self->fields = calloc(KH_RFIELDS_MAX, sizeof *self->fields);
    if (!self->schema || !self->fields ||
        s_load_fields(self, self->schema, -1, "", true, 0)) {
        kh_error_set(err, KH_E_CONFIG, opts->schema_path,
                     "cannot read the referral schema's fields");
        kh_rules_destroy(&self);
        return NULL;
    }
    /* JSON without properties (another file given for the schema) would
     * make every field of the rules unknown: the schema is wrong, not the
     * rules, and the file is not checked against it. */
    if (self->nfields == 0) {
        kh_error_set(err, KH_E_CONFIG, opts->schema_path,
                     "the referral schema has no fields: not a referral "
                     "schema");
        kh_rules_destroy(&self);
        return NULL;
    }
    s_ynode_t *root = s_parse_yaml(&ctx, data, len);
    if (root)
        s_document(&ctx, root);
    s_ynode_free(root);
    zhashx_destroy(&ctx.partner_index);
    if (ctx.errors > 0)
        kh_rules_destroy(&self);
    return self;
}

kh_rules_t *kh_rules_load(const char *path, const kh_rules_options_t *opts,
                          kh_error_t *err)
{
    /* Opened without blocking and checked before reading: a FIFO would
     * otherwise hold the reader (a routing reload, the whole service) until
     * some writer came, and a device could be read without end. A rules
     * file is what an administrator edits, a regular file. */
    if (opts && opts->sha256_out)
        opts->sha256_out[0] = '\0';
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        kh_error_set(err, KH_E_IO, "", "cannot open the rules file: %s",
                     strerror(errno));
        return NULL;
    }
    struct stat st;
    int rc = fstat(fd, &st);
    if (rc != 0 || !S_ISREG(st.st_mode)) {
        kh_error_set(err, KH_E_IO, "", "cannot read the rules file: %s",
                     rc != 0 ? strerror(errno) : "not a regular file");
        close(fd);
        return NULL;
    }
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    /* Read one byte more than allowed, to tell "too large" from "full". */
    char *buf = malloc(KH_RULES_FILE_MAX + 1);
    size_t len = buf ? fread(buf, 1, KH_RULES_FILE_MAX + 1, f) : 0;
    bool bad = !buf || ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        kh_error_set(err, KH_E_IO, "", "cannot read the rules file");
        return NULL;
    }
    kh_rules_t *self = kh_rules_load_buffer(buf, len, opts, err);
    free(buf);
    return self;
}

const char *kh_rules_version(const kh_rules_t *self)
{
    return self->version;
}

const char *kh_rules_schema_version(const kh_rules_t *self)
{
    return self->schema_version;
}

static int s_strptr_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}

int kh_rules_decision_version(const kh_rules_t *self,
                              const kh_rules_partner_t *partners, size_t count,
                              char out[KH_RULES_DECISION_VERSION_MAX + 1])
{
    /* The partners that the file names and that take part: registered,
     * handling cases. Sorted, so that the order of the registry and of the
     * file make no difference. */
    const char **ids =
        calloc(self->npartners ? self->npartners : 1, sizeof *ids);
    if (!ids)
        return -1;
    size_t n = 0, len = 0;
    for (size_t i = 0; partners && i < self->npartners; i++)
        if (s_may_receive(partners, count, self->partner_ids[i])) {
            ids[n++] = self->partner_ids[i];
            len += strlen(self->partner_ids[i]) + 9;
        }
    qsort(ids, n, sizeof *ids, s_strptr_cmp);
    /* Then the fallback's targets that take part revoked. */
    size_t active = n;
    bool none_left = partners && !s_fallback_left(self, partners, count);
    for (size_t i = 0; none_left && i < self->nfallback; i++)
        if (s_takes_part(self, &self->fallback[i], partners, count, true)) {
            ids[n++] = self->partner_ids[self->fallback[i].partner];
            len += strlen(ids[n - 1]) + 9;
        }
    qsort(ids + active, n - active, sizeof *ids, s_strptr_cmp);
    static const char head[] = "ketenhub rules context 1\nschema ";
    len += sizeof head + 64 + 1;
    char *text = malloc(len + 1);
    if (!text) {
        free(ids);
        return -1;
    }
    size_t used =
        (size_t) snprintf(text, len + 1, "%s%s\n", head, self->schema_version);
    for (size_t i = 0; i < n; i++)
        used += (size_t) snprintf(text + used, len + 1 - used, "%s %s\n",
                                  i < active ? "partner" : "revoked", ids[i]);
    char context[65];
    kh_sha256_hex(text, used, context);
    free(text);
    free(ids);
    snprintf(out, KH_RULES_DECISION_VERSION_MAX + 1, "%s.%.32s", self->version,
             context);
    return 0;
}

size_t kh_rules_count(const kh_rules_t *self)
{
    return self->nrules;
}

const char *kh_rules_name(const kh_rules_t *self, size_t index)
{
    return index < self->nrules ? self->rules[index].name : NULL;
}
