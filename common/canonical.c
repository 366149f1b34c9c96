/*
 * The canonical JSON of a referral or a projection (proto.h,
 * kh_payload_canonical): compact, object keys sorted bytewise, every
 * non-ASCII character escaped as \uXXXX (a surrogate pair beyond the BMP).
 * The bytes are exactly those of jansson's json_dumps with JSON_COMPACT |
 * JSON_SORT_KEYS | JSON_ENSURE_ASCII | JSON_ENCODE_ANY, the form the hub
 * has always stored and hashed (schemas/protocol.md), written here without
 * jansson's general machinery: it is on the path of every referral and
 * every delivery. test_proto compares the two on many values. One
 * difference: a number with no fractional part is written as an integer
 * (120.0 as 120, -0.0 as 0), so that a referral's hash does not depend on
 * whether its client encoded a whole number as an integer or as a float.
 */
#include "ketenhub/proto.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A growing output buffer; failed is set once memory runs out. */
typedef struct {
    char *data;
    size_t len, cap;
    bool failed;
} s_out_t;

static bool s_reserve(s_out_t *out, size_t more)
{
    if (out->failed)
        return false;
    if (out->len + more + 1 <= out->cap)
        return true;
    size_t cap = out->cap ? out->cap : 256;
    while (cap < out->len + more + 1)
        cap *= 2;
    char *data = realloc(out->data, cap);
    if (!data) {
        out->failed = true;
        return false;
    }
    out->data = data;
    out->cap = cap;
    return true;
}

static void s_put(s_out_t *out, const char *s, size_t n)
{
    if (n && s_reserve(out, n)) {
        memcpy(out->data + out->len, s, n);
        out->len += n;
    }
}

static void s_put_u16(s_out_t *out, unsigned unit)
{
    static const char hex[] = "0123456789ABCDEF";
    char seq[6] = {'\\',
                   'u',
                   hex[(unit >> 12) & 15],
                   hex[(unit >> 8) & 15],
                   hex[(unit >> 4) & 15],
                   hex[unit & 15]};
    s_put(out, seq, sizeof seq);
}

/* The code point of the UTF-8 sequence at s (n bytes left) and its length;
 * 0 when it is not well-formed (jansson's strings always are). */
static size_t s_utf8(const unsigned char *s, size_t n, uint32_t *cp)
{
    size_t len = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC0 ? 2 : 0;
    if (len == 0 || len > n || s[0] > 0xF4)
        return 0;
    uint32_t v = s[0] & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (v < least[len] || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return 0;
    *cp = v;
    return len;
}

/* A JSON string, escaped as jansson escapes it. */
static void s_string(s_out_t *out, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *) str;
    s_put(out, "\"", 1);
    size_t run = 0; /* start of the bytes copied as they are */
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        s_put(out, str + run, i - run);
        if (c < 0x80) {
            const char *esc = c == '"'    ? "\\\""
                              : c == '\\' ? "\\\\"
                              : c == '\b' ? "\\b"
                              : c == '\f' ? "\\f"
                              : c == '\n' ? "\\n"
                              : c == '\r' ? "\\r"
                              : c == '\t' ? "\\t"
                                          : NULL;
            if (esc)
                s_put(out, esc, 2);
            else
                s_put_u16(out, c);
            i++;
        } else {
            uint32_t cp = 0;
            size_t len = s_utf8(s + i, n - i, &cp);
            if (len == 0) {
                out->failed = true;
                return;
            }
            if (cp < 0x10000)
                s_put_u16(out, cp);
            else {
                cp -= 0x10000;
                s_put_u16(out, 0xD800 | ((cp & 0xFFC00) >> 10));
                s_put_u16(out, 0xDC00 | (cp & 0x3FF));
            }
            i += len;
        }
        run = i;
    }
    s_put(out, str + run, n - run);
    s_put(out, "\"", 1);
}

typedef struct {
    const char *key;
    size_t len;
    const json_t *value;
} s_key_t;

/* jansson's order: bytewise, a prefix first. */
static int s_key_cmp(const void *a, const void *b)
{
    const s_key_t *x = a, *y = b;
    int c = memcmp(x->key, y->key, x->len < y->len ? x->len : y->len);
    if (c)
        return c;
    return x->len < y->len ? -1 : x->len > y->len;
}

static void s_value(s_out_t *out, const json_t *v);

static void s_object(s_out_t *out, const json_t *v)
{
    size_t n = json_object_size(v);
    s_key_t small[32];
    s_key_t *keys = n <= 32 ? small : malloc(n * sizeof *keys);
    if (!keys) {
        out->failed = true;
        return;
    }
    size_t i = 0;
    for (void *it = json_object_iter((json_t *) v); it && i < n;
         it = json_object_iter_next((json_t *) v, it), i++) {
        keys[i].key = json_object_iter_key(it);
        keys[i].len = json_object_iter_key_len(it);
        keys[i].value = json_object_iter_value(it);
    }
    qsort(keys, i, sizeof *keys, s_key_cmp);
    s_put(out, "{", 1);
    for (size_t k = 0; k < i && !out->failed; k++) {
        if (k)
            s_put(out, ",", 1);
        s_string(out, keys[k].key, keys[k].len);
        s_put(out, ":", 1);
        s_value(out, keys[k].value);
    }
    s_put(out, "}", 1);
    if (keys != small)
        free(keys);
}

static void s_value(s_out_t *out, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        s_object(out, v);
        break;
    case JSON_ARRAY:
        s_put(out, "[", 1);
        for (size_t i = 0; i < json_array_size(v) && !out->failed; i++) {
            if (i)
                s_put(out, ",", 1);
            s_value(out, json_array_get(v, i));
        }
        s_put(out, "]", 1);
        break;
    case JSON_STRING:
        s_string(out, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER: {
        char num[32];
        int n = snprintf(num, sizeof num, "%" JSON_INTEGER_FORMAT,
                         json_integer_value(v));
        s_put(out, num, (size_t) n);
        break;
    }
    case JSON_REAL: {
        /* A whole number below 2^53 (exact in a double) as the integer it
         * is; others rare in referrals: jansson's own formatting, so the
         * bytes stay the same (into a buffer of ours: nothing for jansson
         * to allocate, whatever arena is entered). */
        char num[64];
        double d = json_real_value(v);
        size_t n;
        if (d > -9007199254740992.0 && d < 9007199254740992.0 &&
            (double) (long long) d == d)
            n = (size_t) snprintf(num, sizeof num, "%lld", (long long) d);
        else
            n = json_dumpb(v, num, sizeof num, JSON_ENCODE_ANY | JSON_COMPACT);
        if (n == 0 || n > sizeof num)
            out->failed = true;
        else
            s_put(out, num, n);
        break;
    }
    case JSON_TRUE:
        s_put(out, "true", 4);
        break;
    case JSON_FALSE:
        s_put(out, "false", 5);
        break;
    case JSON_NULL:
        s_put(out, "null", 4);
        break;
    }
}

char *kh_payload_canonical(const json_t *value, size_t *len)
{
    if (!value)
        return NULL;
    s_out_t out = {NULL, 0, 0, false};
    s_value(&out, value);
    if (out.failed || !s_reserve(&out, 0)) {
        free(out.data);
        return NULL;
    }
    out.data[out.len] = '\0';
    if (len)
        *len = out.len;
    return out.data;
}
