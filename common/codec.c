/*
 * MessagePack envelope codec: jansson values to MessagePack (through
 * msgpack-c's packer) and back (through a byte-level walker of our own).
 *
 * The decoder does not use msgpack-c's unpacker on purpose: msgpack-c
 * allocates from the element counts in a header before it knows whether
 * the bytes exist, and it has no depth limit of its own. The walker below
 * checks every count against the limits and against the bytes left in the
 * frame before it builds anything, recurses at most KH_CODEC_DEPTH_MAX
 * levels (the depth check comes before the recursion), and decodes straight
 * into json_t, so a frame is read once and allocated for once.
 */
#include "ketenhub/codec.h"

#include <math.h>
#include <msgpack.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* Hard ceiling on nesting, whatever the caller's limits say: it bounds the
 * recursion of both directions and the path stack below. */
#define KH_CODEC_DEPTH_MAX 16

kh_limits_t kh_limits_default(void)
{
    kh_limits_t limits = {
        .max_frame = 256 * 1024,
        .max_depth = KH_CODEC_DEPTH_MAX,
        .max_elements = 1024,
        .max_total = 65536,
        .max_string = 64 * 1024,
    };
    return limits;
}

/* ---------------------------------------------------------------------- */
/* UTF-8                                                                   */

typedef enum { S_UTF8_OK, S_UTF8_INVALID, S_UTF8_NUL } s_utf8_t;

/* Check s[0..len) as UTF-8 per Unicode's table 3-7 (no overlongs, no
 * surrogates, nothing above U+10FFFF). With allow_nul false a NUL byte is
 * refused too. On failure *bad is the offset of the first byte of the
 * offending sequence. ASCII, the common case, goes eight bytes at a time. */
static s_utf8_t s_utf8_scan(const unsigned char *s, size_t len, bool allow_nul,
                            size_t *bad)
{
    const uint64_t ones = 0x0101010101010101ULL;
    const uint64_t highs = 0x8080808080808080ULL;
    size_t i = 0;
    while (i < len) {
        if (len - i >= 8) {
            uint64_t v;
            memcpy(&v, s + i, sizeof v);
            bool ascii = (v & highs) == 0;
            if (ascii && (allow_nul || ((v - ones) & ~v & highs) == 0)) {
                i += 8;
                continue;
            }
        }
        unsigned char c = s[i];
        if (c < 0x80) {
            if (c == 0 && !allow_nul) {
                *bad = i;
                return S_UTF8_NUL;
            }
            i++;
            continue;
        }
        size_t need;
        unsigned char lo = 0x80, hi = 0xbf; /* range of the second byte */
        if (c >= 0xc2 && c <= 0xdf)
            need = 1;
        else if (c >= 0xe0 && c <= 0xef) {
            need = 2;
            if (c == 0xe0)
                lo = 0xa0; /* overlong below U+0800 */
            else if (c == 0xed)
                hi = 0x9f; /* surrogates U+D800..U+DFFF */
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3;
            if (c == 0xf0)
                lo = 0x90; /* overlong below U+10000 */
            else if (c == 0xf4)
                hi = 0x8f; /* above U+10FFFF */
        } else {
            /* bare continuation, 0xc0/0xc1 overlongs, 0xf5..0xff */
            *bad = i;
            return S_UTF8_INVALID;
        }
        if (len - i - 1 < need || s[i + 1] < lo || s[i + 1] > hi) {
            *bad = i;
            return S_UTF8_INVALID;
        }
        for (size_t k = 2; k <= need; k++)
            if ((s[i + k] & 0xc0) != 0x80) {
                *bad = i;
                return S_UTF8_INVALID;
            }
        i += need + 1;
    }
    return S_UTF8_OK;
}

size_t kh_utf8_length(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++)
        n += ((unsigned char) s[i] & 0xC0) != 0x80;
    return n;
}

bool kh_utf8_valid(const char *s, size_t len)
{
    size_t bad;
    if (!s)
        return len == 0;
    return s_utf8_scan((const unsigned char *) s, len, true, &bad) == S_UTF8_OK;
}

bool kh_text_plain(const char *s)
{
    const unsigned char *p = (const unsigned char *) s;
    size_t len = strlen(s);
    if (!kh_utf8_valid(s, len))
        return false;
    for (size_t i = 0; i < len; i++)
        if (p[i] < 0x20 || p[i] == 0x7F ||
            (p[i] == 0xC2 && p[i + 1] >= 0x80 && p[i + 1] <= 0x9F))
            return false;
    return true;
}

/* ---------------------------------------------------------------------- */
/* Paths                                                                   */

/* One step of a path: a map key (key != NULL) or an array index. */
typedef struct {
    const char *key;
    size_t key_len;
    size_t index;
} s_step_t;

/* Write the path of steps[0..n) into buf (see kh_path_append_key). */
static void s_path(const s_step_t *steps, size_t n, char *buf, size_t size)
{
    buf[0] = '\0';
    for (size_t i = 0; i < n; i++)
        if (steps[i].key)
            kh_path_append_key(buf, size, steps[i].key, steps[i].key_len);
        else
            kh_path_append_index(buf, size, steps[i].index);
}

/* ---------------------------------------------------------------------- */
/* Decoder                                                                 */

typedef struct {
    const unsigned char *base; /* start of the frame, for byte offsets */
    const unsigned char *p;    /* next byte to read */
    const unsigned char *end;  /* one past the last byte */
    kh_limits_t lim;
    size_t total; /* values seen so far, keys included */
    size_t depth; /* containers open around p */
    s_step_t steps[KH_CODEC_DEPTH_MAX];
    kh_error_t *err;
} s_dec_t;

/* Fill the error record with the path of the first npath steps. */
static int s_fail(s_dec_t *d, size_t npath, kh_errcode_t code, const char *fmt,
                  ...) __attribute__((format(printf, 4, 5)));

static int s_fail(s_dec_t *d, size_t npath, kh_errcode_t code, const char *fmt,
                  ...)
{
    if (!d->err)
        return -1;
    char path[KH_ERROR_PATH_MAX];
    char message[KH_ERROR_MESSAGE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    s_path(d->steps, npath, path, sizeof path);
    return kh_error_set(d->err, code, path, "%s", message);
}

static size_t s_at(const s_dec_t *d, const unsigned char *p)
{
    return (size_t) (p - d->base);
}

static size_t s_left(const s_dec_t *d)
{
    return (size_t) (d->end - d->p);
}

/* Read an n-byte big-endian unsigned integer (n = 1, 2, 4 or 8), or fail
 * as interrupted if the frame ends first. */
static int s_read_be(s_dec_t *d, size_t n, size_t npath, uint64_t *v)
{
    if (s_left(d) < n)
        return s_fail(d, npath, KH_E_INTERRUPTED, "truncated at byte %zu",
                      s_at(d, d->end));
    uint64_t r = 0;
    for (size_t i = 0; i < n; i++)
        r = (r << 8) | d->p[i];
    d->p += n;
    *v = r;
    return 0;
}

/* Read the body of a str of n bytes whose header starts at byte `at`:
 * length limit, then the bytes left, then UTF-8 and NUL. On success *s
 * points into the frame. Errors carry the path of the first npath steps. */
static int s_read_str(s_dec_t *d, uint64_t n, size_t at, size_t npath,
                      const char *what, const char **s)
{
    if (n > d->lim.max_string)
        return s_fail(d, npath, KH_E_STRING_TOO_LONG,
                      "%s at byte %zu is longer than %zu bytes", what, at,
                      d->lim.max_string);
    if (n > s_left(d))
        return s_fail(d, npath, KH_E_INTERRUPTED,
                      "%s at byte %zu truncated at byte %zu", what, at,
                      s_at(d, d->end));
    size_t bad;
    switch (s_utf8_scan(d->p, (size_t) n, false, &bad)) {
    case S_UTF8_OK:
        break;
    case S_UTF8_NUL:
        return s_fail(d, npath, KH_E_INVALID_UTF8,
                      "%s at byte %zu holds a nul byte at byte %zu", what, at,
                      s_at(d, d->p) + bad);
    default:
        return s_fail(d, npath, KH_E_INVALID_UTF8,
                      "%s at byte %zu is not valid utf-8 at byte %zu", what, at,
                      s_at(d, d->p) + bad);
    }
    *s = (const char *) d->p;
    d->p += n;
    return 0;
}

static int s_value(s_dec_t *d, json_t **out);

/* Check a container header claiming n entries of `per` values each (1 for
 * an array, 2 for a map) at byte `at`, in this order: depth (too_deep),
 * entries (too_many_elements), bytes left, since each value takes at least
 * one byte (interrupted), values in the frame (too_many_elements). Nothing
 * has been allocated for the container yet. */
static int s_check_container(s_dec_t *d, uint64_t n, unsigned per, size_t at,
                             const char *what)
{
    if (d->depth >= d->lim.max_depth)
        return s_fail(d, d->depth, KH_E_TOO_DEEP,
                      "%s at byte %zu nests deeper than %zu levels", what, at,
                      d->lim.max_depth);
    if (n > d->lim.max_elements)
        return s_fail(d, d->depth, KH_E_TOO_MANY,
                      "%s at byte %zu has more than %zu entries", what, at,
                      d->lim.max_elements);
    /* n <= max_elements, a size_t, so n * per cannot overflow 64 bits */
    if (n * per > s_left(d))
        return s_fail(d, d->depth, KH_E_INTERRUPTED,
                      "%s at byte %zu claims more entries than the %zu "
                      "bytes left",
                      what, at, s_left(d));
    if (n * per > d->lim.max_total - d->total)
        return s_fail(d, d->depth, KH_E_TOO_MANY,
                      "%s at byte %zu takes the frame past %zu values", what,
                      at, d->lim.max_total);
    return 0;
}

static int s_array(s_dec_t *d, uint64_t n, size_t at, json_t **out)
{
    if (s_check_container(d, n, 1, at, "array") != 0)
        return -1;
    json_t *array = json_array();
    if (!array)
        return s_fail(d, d->depth, KH_E_NOMEM, "out of memory");
    s_step_t *step = &d->steps[d->depth++];
    step->key = NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *item;
        step->index = i;
        if (s_value(d, &item) != 0)
            goto fail;
        if (json_array_append_new(array, item) != 0) {
            s_fail(d, d->depth, KH_E_NOMEM, "out of memory");
            goto fail;
        }
    }
    d->depth--;
    *out = array;
    return 0;
fail:
    json_decref(array);
    return -1;
}

static int s_map(s_dec_t *d, uint64_t n, size_t at, json_t **out)
{
    if (s_check_container(d, n, 2, at, "map") != 0)
        return -1;
    json_t *object = json_object();
    if (!object)
        return s_fail(d, d->depth, KH_E_NOMEM, "out of memory");
    size_t map_path = d->depth;
    s_step_t *step = &d->steps[d->depth++];
    for (size_t i = 0; i < n; i++) {
        const unsigned char *key_at = d->p;
        size_t key_off = s_at(d, key_at);
        uint64_t len;
        const char *key;
        json_t *value;

        /* A key is a value of the frame too (max_total counts it); the
         * header check above already made room for it. */
        d->total++;
        /* s_check_container left at least 2 bytes per entry; belt and
         * braces in case that ever changes */
        if (d->p >= d->end) {
            s_fail(d, map_path, KH_E_INTERRUPTED, "truncated at byte %zu",
                   key_off);
            goto fail;
        }
        unsigned char b = *d->p++;
        if ((b & 0xe0) == 0xa0)
            len = b & 0x1f;
        else if (b == 0xd9 || b == 0xda || b == 0xdb) {
            if (s_read_be(d, (size_t) 1 << (b - 0xd9), map_path, &len) != 0)
                goto fail;
        } else {
            s_fail(d, map_path, KH_E_MALFORMED,
                   "key %zu of the map at byte %zu is not a string (byte %zu)",
                   i, at, key_off);
            goto fail;
        }
        if (s_read_str(d, len, key_off, map_path, "key", &key) != 0)
            goto fail;
        step->key = key;
        step->key_len = (size_t) len;
        if (json_object_getn(object, key, (size_t) len)) {
            s_fail(d, d->depth, KH_E_DUPLICATE_KEY,
                   "key at byte %zu repeats a key of the map at byte %zu",
                   key_off, at);
            goto fail;
        }
        if (s_value(d, &value) != 0)
            goto fail;
        /* steals value, even on failure */
        if (json_object_setn_new_nocheck(object, key, (size_t) len, value) !=
            0) {
            s_fail(d, d->depth, KH_E_NOMEM, "out of memory");
            goto fail;
        }
    }
    d->depth--;
    *out = object;
    return 0;
fail:
    json_decref(object);
    return -1;
}

/* Decode one value at d->p into *out (a new reference). On failure returns
 * -1 with the error filled and nothing left allocated. */
static int s_value(s_dec_t *d, json_t **out)
{
    const unsigned char *start = d->p;
    size_t at = s_at(d, start);
    uint64_t v;
    json_t *json = NULL;

    *out = NULL;
    if (d->p >= d->end)
        return s_fail(d, d->depth, KH_E_INTERRUPTED, "truncated at byte %zu",
                      at);
    if (d->total >= d->lim.max_total)
        return s_fail(d, d->depth, KH_E_TOO_MANY,
                      "value at byte %zu takes the frame past %zu values", at,
                      d->lim.max_total);
    d->total++;

    unsigned char b = *d->p++;
    if (b <= 0x7f) {
        json = json_integer(b);
    } else if (b >= 0xe0) {
        json = json_integer((int8_t) b);
    } else if (b <= 0x8f) {
        return s_map(d, b & 0x0f, at, out);
    } else if (b <= 0x9f) {
        return s_array(d, b & 0x0f, at, out);
    } else if (b <= 0xbf) {
        const char *s;
        if (s_read_str(d, b & 0x1f, at, d->depth, "string", &s) != 0)
            return -1;
        json = json_stringn_nocheck(s, b & 0x1f);
    } else {
        switch (b) {
        case 0xc0:
            json = json_null();
            break;
        case 0xc2:
            json = json_false();
            break;
        case 0xc3:
            json = json_true();
            break;
        case 0xc4:
        case 0xc5:
        case 0xc6:
            return s_fail(d, d->depth, KH_E_UNSUPPORTED_TYPE,
                          "bin at byte %zu is not accepted", at);
        case 0xc7:
        case 0xc8:
        case 0xc9:
        case 0xd4:
        case 0xd5:
        case 0xd6:
        case 0xd7:
        case 0xd8:
            return s_fail(d, d->depth, KH_E_UNSUPPORTED_TYPE,
                          "ext at byte %zu is not accepted", at);
        case 0xca:
        case 0xcb: {
            double x;
            if (s_read_be(d, b == 0xca ? 4 : 8, d->depth, &v) != 0)
                return -1;
            if (b == 0xca) {
                uint32_t u = (uint32_t) v;
                float f;
                memcpy(&f, &u, sizeof f);
                x = f;
            } else
                memcpy(&x, &v, sizeof x);
            if (!isfinite(x))
                return s_fail(d, d->depth, KH_E_UNSUPPORTED_TYPE,
                              "float at byte %zu is not finite", at);
            json = json_real(x);
            break;
        }
        case 0xcc:
        case 0xcd:
        case 0xce:
        case 0xcf:
            if (s_read_be(d, (size_t) 1 << (b - 0xcc), d->depth, &v) != 0)
                return -1;
            if (v > (uint64_t) INT64_MAX)
                return s_fail(d, d->depth, KH_E_UNSUPPORTED_TYPE,
                              "integer at byte %zu is above the int64 range",
                              at);
            json = json_integer((json_int_t) v);
            break;
        case 0xd0:
        case 0xd1:
        case 0xd2:
        case 0xd3: {
            size_t n = (size_t) 1 << (b - 0xd0);
            if (s_read_be(d, n, d->depth, &v) != 0)
                return -1;
            /* sign-extend from n bytes without shifting into the sign */
            int64_t x;
            if (n == 8)
                memcpy(&x, &v, sizeof x);
            else if (v >> (8 * n - 1))
                x = -(int64_t) ((((uint64_t) 1) << (8 * n)) - v);
            else
                x = (int64_t) v;
            json = json_integer((json_int_t) x);
            break;
        }
        case 0xd9:
        case 0xda:
        case 0xdb: {
            const char *s;
            if (s_read_be(d, (size_t) 1 << (b - 0xd9), d->depth, &v) != 0)
                return -1;
            if (s_read_str(d, v, at, d->depth, "string", &s) != 0)
                return -1;
            json = json_stringn_nocheck(s, (size_t) v);
            break;
        }
        case 0xdc:
        case 0xdd:
            if (s_read_be(d, b == 0xdc ? 2 : 4, d->depth, &v) != 0)
                return -1;
            return s_array(d, v, at, out);
        case 0xde:
        case 0xdf:
            if (s_read_be(d, b == 0xde ? 2 : 4, d->depth, &v) != 0)
                return -1;
            return s_map(d, v, at, out);
        default: /* 0xc1, never used */
            return s_fail(d, d->depth, KH_E_MALFORMED,
                          "byte %zu is not a messagepack type", at);
        }
    }
    if (!json)
        return s_fail(d, d->depth, KH_E_NOMEM, "out of memory");
    *out = json;
    return 0;
}

int kh_msgpack_decode(const void *data, size_t size, const kh_limits_t *limits,
                      json_t **out, kh_error_t *err)
{
    s_dec_t d = {0};

    if (!out)
        return kh_error_set(err, KH_E_INTERNAL, "", "no place for the value");
    *out = NULL;
    if (!data && size > 0)
        return kh_error_set(err, KH_E_INTERNAL, "", "no input");
    d.lim = limits ? *limits : kh_limits_default();
    if (d.lim.max_depth > KH_CODEC_DEPTH_MAX)
        d.lim.max_depth = KH_CODEC_DEPTH_MAX;
    if (size > d.lim.max_frame)
        return kh_error_set(err, KH_E_TOO_LARGE, "",
                            "frame of %zu bytes is larger than %zu", size,
                            d.lim.max_frame);
    d.base = data ? data : (const unsigned char *) "";
    d.p = d.base;
    d.end = d.base + size;
    d.err = err;

    json_t *value;
    if (s_value(&d, &value) != 0)
        return -1;
    if (d.p != d.end) {
        json_decref(value);
        return kh_error_set(err, KH_E_MALFORMED, "",
                            "%zu trailing bytes after the value at byte %zu",
                            s_left(&d), s_at(&d, d.p));
    }
    *out = value;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Peeking                                                                 */

/* Read an n-byte big-endian count at *p, if the bytes are there. */
static bool s_peek_be(const unsigned char **p, const unsigned char *end,
                      size_t n, uint64_t *v)
{
    if ((size_t) (end - *p) < n)
        return false;
    uint64_t r = 0;
    for (size_t i = 0; i < n; i++)
        r = (r << 8) | (*p)[i];
    *p += n;
    *v = r;
    return true;
}

/* Step over one whole value at *p without building or checking it. No
 * recursion: a count of values still to skip, each at least one byte, so
 * a count beyond the bytes left fails at once and the loop ends with the
 * bytes. */
static bool s_skip(const unsigned char **p, const unsigned char *end)
{
    uint64_t pending = 1;
    while (pending) {
        if (*p >= end)
            return false;
        unsigned char b = *(*p)++;
        pending--;
        uint64_t bytes = 0, values = 0, n;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
            ;
        else if (b <= 0x8f)
            values = 2 * (uint64_t) (b & 0x0f);
        else if (b <= 0x9f)
            values = b & 0x0f;
        else if (b <= 0xbf)
            bytes = b & 0x1f;
        else if (b >= 0xc4 && b <= 0xc6) { /* bin 8/16/32 */
            if (!s_peek_be(p, end, (size_t) 1 << (b - 0xc4), &bytes))
                return false;
        } else if (b >= 0xc7 && b <= 0xc9) { /* ext 8/16/32: length, type */
            if (!s_peek_be(p, end, (size_t) 1 << (b - 0xc7), &n))
                return false;
            bytes = n + 1;
        } else if (b == 0xca || b == 0xcb)
            bytes = b == 0xca ? 4 : 8;
        else if (b >= 0xcc && b <= 0xd3)
            bytes = (uint64_t) 1 << ((b - 0xcc) & 3);
        else if (b >= 0xd4 && b <= 0xd8) /* fixext: type, data */
            bytes = 1 + ((uint64_t) 1 << (b - 0xd4));
        else if (b >= 0xd9 && b <= 0xdb) { /* str 8/16/32 */
            if (!s_peek_be(p, end, (size_t) 1 << (b - 0xd9), &bytes))
                return false;
        } else if (b == 0xdc || b == 0xdd) {
            if (!s_peek_be(p, end, b == 0xdc ? 2 : 4, &values))
                return false;
        } else if (b == 0xde || b == 0xdf) {
            if (!s_peek_be(p, end, b == 0xde ? 2 : 4, &n))
                return false;
            values = 2 * n;
        } else /* 0xc1 */
            return false;
        uint64_t left = (uint64_t) (end - *p);
        if (bytes > left || values > left - bytes ||
            pending > left - bytes - values)
            return false;
        *p += bytes;
        pending += values;
    }
    return true;
}

/* Read a str header at *p (none there: false) and check that its len
 * bytes follow; *p is left on the first of them. */
static bool s_peek_str(const unsigned char **p, const unsigned char *end,
                       uint64_t *len)
{
    if (*p >= end)
        return false;
    unsigned char b = **p;
    if ((b & 0xe0) == 0xa0) {
        (*p)++;
        *len = b & 0x1f;
    } else if (b >= 0xd9 && b <= 0xdb) {
        (*p)++;
        if (!s_peek_be(p, end, (size_t) 1 << (b - 0xd9), len))
            return false;
    } else
        return false;
    return *len <= (uint64_t) (end - *p);
}

/* Leave *p on the value of key at the top of the map that starts at *p
 * (see kh_msgpack_peek_str); false when there is no map or no such key
 * before the bytes run out. */
static bool s_peek_key(const unsigned char **p, const unsigned char *end,
                       const char *key)
{
    uint64_t n, len;
    if (*p >= end)
        return false;
    unsigned char b = *(*p)++;
    if (b >= 0x80 && b <= 0x8f)
        n = b & 0x0f;
    else if (b != 0xde && b != 0xdf)
        return false;
    else if (!s_peek_be(p, end, b == 0xde ? 2 : 4, &n))
        return false;
    size_t key_len = strlen(key);
    for (uint64_t i = 0; i < n; i++) {
        const unsigned char *at = *p;
        if (s_peek_str(p, end, &len)) {
            bool found = len == key_len && memcmp(*p, key, key_len) == 0;
            *p += len;
            if (found)
                return true;
        } else {
            *p = at; /* a key of another type: stepped over */
            if (!s_skip(p, end))
                return false;
        }
        if (!s_skip(p, end)) /* the key's value */
            return false;
    }
    return false;
}

bool kh_msgpack_peek_str(const void *data, size_t size, const char *key,
                         char *out, size_t out_size)
{
    if (!data || !key || !out || out_size == 0)
        return false;
    out[0] = '\0';
    const unsigned char *p = data, *end = p + size;
    uint64_t len;
    if (!s_peek_key(&p, end, key) || !s_peek_str(&p, end, &len) || len == 0 ||
        len >= out_size || memchr(p, 0, (size_t) len) ||
        !kh_utf8_valid((const char *) p, len))
        return false;
    memcpy(out, p, (size_t) len);
    out[len] = '\0';
    return true;
}

bool kh_msgpack_peek_int(const void *data, size_t size, const char *key,
                         int64_t *out)
{
    if (!data || !key || !out)
        return false;
    const unsigned char *p = data, *end = p + size;
    if (!s_peek_key(&p, end, key) || p >= end)
        return false;
    unsigned char b = *p++;
    uint64_t v;
    if (b <= 0x7f || b >= 0xe0) { /* positive and negative fixint */
        *out = (int8_t) b;
        return true;
    }
    if (b < 0xcc || b > 0xd3)
        return false; /* not an integer */
    size_t n = (size_t) 1 << ((b - 0xcc) & 3);
    if (!s_peek_be(&p, end, n, &v))
        return false;
    if (b <= 0xcf) { /* uint 8/16/32/64 */
        if (v > INT64_MAX)
            return false;
        *out = (int64_t) v;
    } else if (n == 1)
        *out = (int8_t) v;
    else if (n == 2)
        *out = (int16_t) v;
    else if (n == 4)
        *out = (int32_t) v;
    else
        *out = (int64_t) v;
    return true;
}

/* ---------------------------------------------------------------------- */
/* Encoder                                                                 */

typedef struct {
    msgpack_packer pk;
    size_t depth;
    s_step_t steps[KH_CODEC_DEPTH_MAX];
    kh_error_t *err;
} s_enc_t;

static int s_enc_fail(s_enc_t *e, kh_errcode_t code, const char *message)
{
    char path[KH_ERROR_PATH_MAX];
    if (!e->err)
        return -1;
    s_path(e->steps, e->depth, path, sizeof path);
    return kh_error_set(e->err, code, path, "%s", message);
}

/* Pack one value. A packer call fails only when the buffer cannot grow. */
static int s_pack(s_enc_t *e, const json_t *value)
{
    msgpack_packer *pk = &e->pk;
    int rc;

    switch (json_typeof(value)) {
    case JSON_NULL:
        rc = msgpack_pack_nil(pk);
        break;
    case JSON_TRUE:
        rc = msgpack_pack_true(pk);
        break;
    case JSON_FALSE:
        rc = msgpack_pack_false(pk);
        break;
    case JSON_INTEGER:
        rc = msgpack_pack_int64(pk, (int64_t) json_integer_value(value));
        break;
    case JSON_REAL:
        rc = msgpack_pack_double(pk, json_real_value(value));
        break;
    case JSON_STRING:
        rc = msgpack_pack_str_with_body(pk, json_string_value(value),
                                        json_string_length(value));
        break;
    case JSON_ARRAY: {
        if (e->depth >= KH_CODEC_DEPTH_MAX)
            return s_enc_fail(e, KH_E_TOO_DEEP,
                              "value nests deeper than 16 levels");
        size_t n = json_array_size(value);
        if (msgpack_pack_array(pk, n) != 0)
            return s_enc_fail(e, KH_E_NOMEM, "out of memory");
        s_step_t *step = &e->steps[e->depth++];
        step->key = NULL;
        for (size_t i = 0; i < n; i++) {
            step->index = i;
            if (s_pack(e, json_array_get(value, i)) != 0)
                return -1;
        }
        e->depth--;
        return 0;
    }
    case JSON_OBJECT: {
        if (e->depth >= KH_CODEC_DEPTH_MAX)
            return s_enc_fail(e, KH_E_TOO_DEEP,
                              "value nests deeper than 16 levels");
        const char *key;
        size_t key_len;
        json_t *member;
        if (msgpack_pack_map(pk, json_object_size(value)) != 0)
            return s_enc_fail(e, KH_E_NOMEM, "out of memory");
        s_step_t *step = &e->steps[e->depth++];
        /* json_object_foreach takes a non-const object; it only reads */
        json_t *object = (json_t *) value;
        json_object_keylen_foreach(object, key, key_len, member)
        {
            step->key = key;
            step->key_len = key_len;
            if (msgpack_pack_str_with_body(pk, key, key_len) != 0)
                return s_enc_fail(e, KH_E_NOMEM, "out of memory");
            if (s_pack(e, member) != 0)
                return -1;
        }
        e->depth--;
        return 0;
    }
    default:
        return s_enc_fail(e, KH_E_INTERNAL, "value of unknown type");
    }
    if (rc != 0)
        return s_enc_fail(e, KH_E_NOMEM, "out of memory");
    return 0;
}

int kh_msgpack_encode(const json_t *value, char **data, size_t *size,
                      kh_error_t *err)
{
    msgpack_sbuffer sbuf;
    s_enc_t e = {.depth = 0, .err = err};

    if (!data || !size)
        return kh_error_set(err, KH_E_INTERNAL, "", "no place for the frame");
    *data = NULL;
    *size = 0;
    if (!value)
        return kh_error_set(err, KH_E_INTERNAL, "", "no value to encode");
    msgpack_sbuffer_init(&sbuf);
    msgpack_packer_init(&e.pk, &sbuf, msgpack_sbuffer_write);
    if (s_pack(&e, value) != 0) {
        msgpack_sbuffer_destroy(&sbuf);
        return -1;
    }
    *size = sbuf.size;
    *data = msgpack_sbuffer_release(&sbuf);
    return 0;
}
