/*
 * Unit tests of the MessagePack envelope codec (common/codec.c): round
 * trips of every accepted type, every limit at its edge and one past it,
 * truncation at every byte, hostile headers, and the refusals (bad UTF-8,
 * NUL, duplicate keys, trailing bytes, unused and unsupported types). Each
 * failure is checked for its code and its path.
 */
#include "khtest.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"

/* ---------------------------------------------------------------------- */
/* A byte builder for hand-made frames                                     */

typedef struct {
    unsigned char *p;
    size_t len;
    size_t cap;
} bb_t;

static void bb_put(bb_t *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->len + n)
            cap *= 2;
        unsigned char *p = realloc(b->p, cap);
        ck_assert_ptr_nonnull(p);
        b->p = p;
        b->cap = cap;
    }
    if (n > 0)
        memcpy(b->p + b->len, data, n);
    b->len += n;
}

static void bb_u8(bb_t *b, unsigned v)
{
    unsigned char c = (unsigned char) v;
    bb_put(b, &c, 1);
}

static void bb_be(bb_t *b, uint64_t v, size_t n)
{
    for (size_t i = n; i-- > 0;)
        bb_u8(b, (unsigned) (v >> (8 * i)) & 0xff);
}

/* str header (smallest form) and body */
static void bb_str(bb_t *b, const char *s, size_t n)
{
    if (n < 32)
        bb_u8(b, 0xa0 | (unsigned) n);
    else if (n < 256) {
        bb_u8(b, 0xd9);
        bb_be(b, n, 1);
    } else if (n < 65536) {
        bb_u8(b, 0xda);
        bb_be(b, n, 2);
    } else {
        bb_u8(b, 0xdb);
        bb_be(b, n, 4);
    }
    bb_put(b, s, n);
}

static void bb_cstr(bb_t *b, const char *s)
{
    bb_str(b, s, strlen(s));
}

static void bb_array(bb_t *b, size_t n)
{
    if (n < 16)
        bb_u8(b, 0x90 | (unsigned) n);
    else if (n < 65536) {
        bb_u8(b, 0xdc);
        bb_be(b, n, 2);
    } else {
        bb_u8(b, 0xdd);
        bb_be(b, n, 4);
    }
}

static void bb_map(bb_t *b, size_t n)
{
    if (n < 16)
        bb_u8(b, 0x80 | (unsigned) n);
    else if (n < 65536) {
        bb_u8(b, 0xde);
        bb_be(b, n, 2);
    } else {
        bb_u8(b, 0xdf);
        bb_be(b, n, 4);
    }
}

static void bb_free(bb_t *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---------------------------------------------------------------------- */
/* Helpers                                                                 */

/* Decode that must succeed; returns the value (caller decrefs). */
static json_t *dec_ok(const void *data, size_t size, const kh_limits_t *lim)
{
    kh_error_t err;
    json_t *out = (json_t *) 1;
    kh_error_clear(&err);
    int rc = kh_msgpack_decode(data, size, lim, &out, &err);
    ck_assert_msg(rc == 0, "decode failed: %s at '%s': %s",
                  kh_error_name(err.code), err.path, err.message);
    ck_assert_ptr_nonnull(out);
    return out;
}

/* Decode that must fail with code at path; returns the error record. */
static kh_error_t dec_fail(const void *data, size_t size,
                           const kh_limits_t *lim, kh_errcode_t code,
                           const char *path)
{
    kh_error_t err;
    json_t *out = (json_t *) 1;
    kh_error_clear(&err);
    int rc = kh_msgpack_decode(data, size, lim, &out, &err);
    ck_assert_int_eq(rc, -1);
    ck_assert_ptr_null(out);
    ck_assert_msg(err.code == code, "expected %s, got %s at '%s': %s",
                  kh_error_name(code), kh_error_name(err.code), err.path,
                  err.message);
    if (path)
        ck_assert_str_eq(err.path, path);
    ck_assert_msg(strstr(err.message, "byte") != NULL,
                  "message names no byte offset: %s", err.message);
    return err;
}

/* Encode, check the encoded size if want_size > 0, decode, compare. */
static void round_trip(json_t *value, size_t want_size)
{
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    kh_limits_t lim = kh_limits_default();
    lim.max_frame = SIZE_MAX;
    lim.max_elements = SIZE_MAX;
    lim.max_total = SIZE_MAX;
    lim.max_string = SIZE_MAX;

    ck_assert_ptr_nonnull(value);
    kh_error_clear(&err);
    ck_assert_int_eq(kh_msgpack_encode(value, &data, &size, &err), 0);
    ck_assert_ptr_nonnull(data);
    if (want_size > 0)
        ck_assert_uint_eq(size, want_size);
    json_t *back = dec_ok(data, size, &lim);
    ck_assert_msg(json_equal(value, back), "round trip changed the value");
    ck_assert_int_eq(json_typeof(value), json_typeof(back));
    json_decref(back);
    free(data);
    json_decref(value);
}

/* A referral-like nested value, with multi-byte UTF-8 in it. */
static json_t *referral(void)
{
    json_t *v = json_pack(
        "{s:s, s:s, s:{s:s, s:s, s:{s:s, s:i, s:b, s:s, s:n}, "
        "s:[s,s,s,s], s:[{s:s, s:f}, {s:s, s:f}], s:{s:b, s:b, s:b}, "
        "s:s, s:I}}",
        "schema_version", "1.0", "idempotency_key", "vt-2024-000123",
        "referral", "reported_at", "2024-03-01T09:30:00Z", "form",
        "arbeidsuitbuiting", "subject", "name", "Zoë Jansen-Brønsted", "age",
        17, "minor", 1, "nationality", "NL", "phone", "indicators",
        "geen eigen paspoort", "schuld bij werkgever", "woont op werkplek",
        "€ 0 loon", "observations", "by", "wijkteam", "certainty", 0.75, "by",
        "huisarts", "certainty", 0.5, "needs", "care", 1, "shelter", 0,
        "acute_danger", 1, "summary",
        "Signalen van uitbuiting in een nagelstudio; cliënt spreekt "
        "weinig Nederlands.",
        "case_number", (json_int_t) 5000000000LL);
    ck_assert_ptr_nonnull(v);
    return v;
}

static void encode_referral(char **data, size_t *size)
{
    kh_error_t err;
    json_t *v = referral();
    ck_assert_int_eq(kh_msgpack_encode(v, data, size, &err), 0);
    json_decref(v);
}

/* ---------------------------------------------------------------------- */
/* Round trips                                                             */

START_TEST(test_round_trip_scalars)
{
    round_trip(json_null(), 1);
    round_trip(json_true(), 1);
    round_trip(json_false(), 1);

    /* integers take the smallest form */
    static const struct {
        json_int_t v;
        size_t size;
    } ints[] = {
        {0, 1},
        {1, 1},
        {127, 1},
        {128, 2},
        {255, 2},
        {256, 3},
        {65535, 3},
        {65536, 5},
        {4294967295LL, 5},
        {4294967296LL, 9},
        {INT64_MAX, 9},
        {-1, 1},
        {-32, 1},
        {-33, 2},
        {-128, 2},
        {-129, 3},
        {-32768, 3},
        {-32769, 5},
        {INT32_MIN, 5},
        {(json_int_t) INT32_MIN - 1, 9},
        {INT64_MIN, 9},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        round_trip(json_integer(ints[i].v), ints[i].size);

    static const double reals[] = {
        0.0, -0.0, 0.5, -1.25, 1e300, -1e-300, 3.141592653589793, 1.0};
    for (size_t i = 0; i < sizeof reals / sizeof reals[0]; i++)
        round_trip(json_real(reals[i]), 9);

    /* strings across the fixstr / str8 / str16 / str32 boundaries */
    static const struct {
        size_t len;
        size_t header;
    } strs[] = {{0, 1},   {1, 1},     {31, 1},    {32, 2},    {255, 2},
                {256, 3}, {65535, 3}, {65536, 5}, {100000, 5}};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        char *s = malloc(strs[i].len + 1);
        ck_assert_ptr_nonnull(s);
        memset(s, 'x', strs[i].len);
        s[strs[i].len] = '\0';
        round_trip(json_stringn(s, strs[i].len), strs[i].header + strs[i].len);
        free(s);
    }
    round_trip(json_string("Zoë € 𝄞 \xf4\x8f\xbf\xbf"), 0);
}
END_TEST

START_TEST(test_round_trip_containers)
{
    round_trip(json_array(), 1);
    round_trip(json_object(), 1);
    round_trip(referral(), 0);

    /* fixarray / array16 / array32 and fixmap / map16 boundaries */
    static const struct {
        size_t n;
        size_t header;
    } sizes[] = {{15, 1}, {16, 3}, {65535, 3}, {65536, 5}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        json_t *a = json_array();
        for (size_t k = 0; k < sizes[i].n; k++)
            json_array_append_new(a, json_null());
        round_trip(a, sizes[i].header + sizes[i].n);
    }
    for (size_t i = 0; i < 3; i++) {
        json_t *o = json_object();
        size_t n = sizes[i].n;
        for (size_t k = 0; k < n; k++) {
            char key[32];
            snprintf(key, sizeof key, "k%05zu", k);
            json_object_set_new(o, key, json_integer((json_int_t) k));
        }
        round_trip(o, 0);
    }

    /* 16 levels is the most the encoder and the decoder take */
    json_t *deep = json_integer(1);
    for (int i = 0; i < 16; i++) {
        json_t *a = i % 2 ? json_array() : json_object();
        if (json_is_array(a))
            json_array_append_new(a, deep);
        else
            json_object_set_new(a, "k", deep);
        deep = a;
    }
    round_trip(deep, 0);
}
END_TEST

START_TEST(test_decode_hand_made)
{
    /* non-minimal forms are accepted, and float32 widens exactly */
    static const struct {
        unsigned char bytes[9];
        size_t len;
        json_int_t want;
    } ints[] = {
        {{0xcc, 0x05}, 2, 5},
        {{0xcd, 0x00, 0x05}, 3, 5},
        {{0xce, 0x00, 0x00, 0x00, 0x05}, 5, 5},
        {{0xcf, 0, 0, 0, 0, 0, 0, 0, 0x05}, 9, 5},
        {{0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 9, INT64_MAX},
        {{0xd0, 0x80}, 2, -128},
        {{0xd0, 0x05}, 2, 5},
        {{0xd1, 0x80, 0x00}, 3, -32768},
        {{0xd1, 0xff, 0xfe}, 3, -2},
        {{0xd2, 0x80, 0, 0, 0}, 5, INT32_MIN},
        {{0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0}, 9, INT64_MIN},
        {{0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 9, -1},
        {{0xe0}, 1, -32},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        json_t *v = dec_ok(ints[i].bytes, ints[i].len, NULL);
        ck_assert(json_is_integer(v));
        ck_assert_int_eq(json_integer_value(v), ints[i].want);
        json_decref(v);
    }

    const unsigned char f32[] = {0xca, 0x3f, 0xc0, 0x00, 0x00}; /* 1.5 */
    json_t *v = dec_ok(f32, sizeof f32, NULL);
    ck_assert(json_is_real(v));
    ck_assert_double_eq(json_real_value(v), 1.5);
    json_decref(v);

    const unsigned char str8[] = {0xd9, 0x02, 'h', 'i'};
    v = dec_ok(str8, sizeof str8, NULL);
    ck_assert_str_eq(json_string_value(v), "hi");
    json_decref(v);

    /* array16 / map16 holding few entries */
    const unsigned char a16[] = {0xdc, 0x00, 0x02, 0xc3, 0xc2};
    v = dec_ok(a16, sizeof a16, NULL);
    ck_assert_uint_eq(json_array_size(v), 2);
    ck_assert(json_is_true(json_array_get(v, 0)));
    ck_assert(json_is_false(json_array_get(v, 1)));
    json_decref(v);
    const unsigned char m32[] = {0xdf, 0, 0, 0, 1, 0xa1, 'a', 0xc0};
    v = dec_ok(m32, sizeof m32, NULL);
    ck_assert(json_is_null(json_object_get(v, "a")));
    json_decref(v);
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Limits at their edge and one past                                       */

START_TEST(test_limit_frame)
{
    char *data;
    size_t size;
    encode_referral(&data, &size);
    kh_limits_t lim = kh_limits_default();

    lim.max_frame = size;
    json_decref(dec_ok(data, size, &lim));
    lim.max_frame = size - 1;
    dec_fail(data, size, &lim, KH_E_TOO_LARGE, "");
    free(data);

    /* the default: 256 KiB */
    bb_t b = {0};
    bb_u8(&b, 0xdb);
    bb_be(&b, 256 * 1024 - 5, 4);
    for (size_t i = 0; i < 256 * 1024 - 5; i++)
        bb_u8(&b, 'x');
    lim = kh_limits_default();
    lim.max_string = SIZE_MAX;
    json_decref(dec_ok(b.p, b.len, &lim));
    bb_u8(&b, 'x');
    b.p[4]++;
    dec_fail(b.p, b.len, &lim, KH_E_TOO_LARGE, "");
    bb_free(&b);
}
END_TEST

/* n nested arrays around a nil, or n nested maps with key "k". */
static void build_nested(bb_t *b, size_t n, bool maps)
{
    for (size_t i = 0; i < n; i++) {
        if (maps) {
            bb_u8(b, 0x81);
            bb_cstr(b, "k");
        } else
            bb_u8(b, 0x91);
    }
    bb_u8(b, 0xc0);
}

START_TEST(test_limit_depth)
{
    bb_t b = {0};
    char want[256] = "";

    build_nested(&b, 16, false);
    json_decref(dec_ok(b.p, b.len, NULL));
    bb_free(&b);
    build_nested(&b, 17, false);
    for (int i = 0; i < 16; i++)
        strcat(want, "[0]");
    dec_fail(b.p, b.len, NULL, KH_E_TOO_DEEP, want);
    bb_free(&b);

    build_nested(&b, 16, true);
    json_decref(dec_ok(b.p, b.len, NULL));
    bb_free(&b);
    build_nested(&b, 17, true);
    strcpy(want, "k");
    for (int i = 1; i < 16; i++)
        strcat(want, ".k");
    dec_fail(b.p, b.len, NULL, KH_E_TOO_DEEP, want);
    bb_free(&b);

    /* a smaller limit, and a larger one is held at 16 */
    kh_limits_t lim = kh_limits_default();
    lim.max_depth = 3;
    build_nested(&b, 3, false);
    json_decref(dec_ok(b.p, b.len, &lim));
    bb_free(&b);
    build_nested(&b, 4, false);
    dec_fail(b.p, b.len, &lim, KH_E_TOO_DEEP, "[0][0][0]");
    bb_free(&b);
    lim.max_depth = 1000;
    build_nested(&b, 17, true);
    dec_fail(b.p, b.len, &lim, KH_E_TOO_DEEP, NULL);
    bb_free(&b);
    lim.max_depth = 0;
    const unsigned char scalar = 0x05, empty = 0x90;
    json_decref(dec_ok(&scalar, 1, &lim));
    dec_fail(&empty, 1, &lim, KH_E_TOO_DEEP, "");

    /* 10,000 levels: refused at level 17, no stack overflow */
    build_nested(&b, 10000, false);
    dec_fail(b.p, b.len, NULL, KH_E_TOO_DEEP, NULL);
    bb_free(&b);
    build_nested(&b, 10000, true);
    dec_fail(b.p, b.len, NULL, KH_E_TOO_DEEP, NULL);
    bb_free(&b);
    for (int i = 0; i < 10000; i++)
        bb_u8(&b, 0x91);
    dec_fail(b.p, b.len, NULL, KH_E_TOO_DEEP, NULL); /* and truncated */
    bb_free(&b);
}
END_TEST

START_TEST(test_limit_elements)
{
    kh_limits_t lim = kh_limits_default();
    bb_t b = {0};

    /* the default: 1024 entries */
    bb_array(&b, 1024);
    for (int i = 0; i < 1024; i++)
        bb_u8(&b, 0xc0);
    json_decref(dec_ok(b.p, b.len, NULL));
    bb_free(&b);
    bb_array(&b, 1025);
    for (int i = 0; i < 1025; i++)
        bb_u8(&b, 0xc0);
    dec_fail(b.p, b.len, NULL, KH_E_TOO_MANY, "");
    bb_free(&b);

    lim.max_elements = 4;
    for (size_t n = 4; n <= 5; n++) {
        /* {"list": [nil * n]} and {"map": {k0..kn: 0}} */
        bb_map(&b, 2);
        bb_cstr(&b, "list");
        bb_array(&b, n);
        for (size_t i = 0; i < n; i++)
            bb_u8(&b, 0xc0);
        bb_cstr(&b, "map");
        bb_map(&b, n);
        for (size_t i = 0; i < n; i++) {
            char key[8];
            snprintf(key, sizeof key, "k%zu", i);
            bb_cstr(&b, key);
            bb_u8(&b, 0x00);
        }
        if (n == 4)
            json_decref(dec_ok(b.p, b.len, &lim));
        else
            dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "list");
        bb_free(&b);
    }
    bb_map(&b, 1);
    bb_cstr(&b, "map");
    bb_map(&b, 5);
    for (size_t i = 0; i < 5; i++) {
        bb_u8(&b, 0xa1);
        bb_u8(&b, 'a' + (unsigned) i);
        bb_u8(&b, 0x00);
    }
    dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "map");
    bb_free(&b);
}
END_TEST

START_TEST(test_limit_total)
{
    kh_limits_t lim = kh_limits_default();
    bb_t b = {0};

    /* [[nil, nil], {"a": nil}] is 1 + 1 + 2 + 1 + 2 = 7 values */
    bb_array(&b, 2);
    bb_array(&b, 2);
    bb_u8(&b, 0xc0);
    bb_u8(&b, 0xc0);
    bb_map(&b, 1);
    bb_cstr(&b, "a");
    bb_u8(&b, 0xc0);
    lim.max_total = 7;
    json_decref(dec_ok(b.p, b.len, &lim));
    lim.max_total = 6;
    dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "[1]");
    lim.max_total = 4;
    dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "[1]");
    lim.max_total = 3;
    dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "[0]");
    lim.max_total = 0;
    dec_fail(b.p, b.len, &lim, KH_E_TOO_MANY, "");
    bb_free(&b);

    /* the default: 65536 values, as 64 arrays of 1023 ints plus 63
     * arrays and the root: 1 + 64 + 64 * 1023 = 65537 values */
    lim = kh_limits_default();
    for (size_t extra = 0; extra <= 1; extra++) {
        bb_array(&b, 64);
        for (size_t i = 0; i < 64; i++) {
            size_t n = i == 63 ? 1022 + extra : 1023;
            bb_array(&b, n);
            for (size_t k = 0; k < n; k++)
                bb_u8(&b, 0x01);
        }
        if (extra == 0)
            json_decref(dec_ok(b.p, b.len, NULL));
        else
            dec_fail(b.p, b.len, NULL, KH_E_TOO_MANY, "[63]");
        bb_free(&b);
    }
}
END_TEST

START_TEST(test_limit_string)
{
    kh_limits_t lim = kh_limits_default();
    bb_t b = {0};
    const char *ten = "0123456789x";

    lim.max_string = 10;
    /* value */
    bb_map(&b, 1);
    bb_cstr(&b, "s");
    bb_str(&b, ten, 10);
    json_decref(dec_ok(b.p, b.len, &lim));
    bb_free(&b);
    bb_map(&b, 1);
    bb_cstr(&b, "s");
    bb_str(&b, ten, 11);
    dec_fail(b.p, b.len, &lim, KH_E_STRING_TOO_LONG, "s");
    bb_free(&b);
    /* key: the path is the map's, since the key is not taken */
    bb_map(&b, 1);
    bb_cstr(&b, "m");
    bb_map(&b, 1);
    bb_str(&b, ten, 10);
    bb_u8(&b, 0xc0);
    json_decref(dec_ok(b.p, b.len, &lim));
    bb_free(&b);
    bb_map(&b, 1);
    bb_cstr(&b, "m");
    bb_map(&b, 1);
    bb_str(&b, ten, 11);
    bb_u8(&b, 0xc0);
    dec_fail(b.p, b.len, &lim, KH_E_STRING_TOO_LONG, "m");
    bb_free(&b);

    /* the default: 64 KiB */
    char *big = malloc(65537);
    ck_assert_ptr_nonnull(big);
    memset(big, 'y', 65537);
    bb_str(&b, big, 65536);
    json_decref(dec_ok(b.p, b.len, NULL));
    bb_free(&b);
    bb_str(&b, big, 65537);
    dec_fail(b.p, b.len, NULL, KH_E_STRING_TOO_LONG, "");
    bb_free(&b);
    free(big);
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Truncation and hostile headers                                          */

START_TEST(test_truncated_everywhere)
{
    char *data;
    size_t size;
    encode_referral(&data, &size);
    ck_assert_uint_gt(size, 200);
    json_decref(dec_ok(data, size, NULL));
    for (size_t n = 0; n < size; n++) {
        /* a copy of exactly n bytes, so ASan sees any read past it */
        char *cut = malloc(n ? n : 1);
        ck_assert_ptr_nonnull(cut);
        memcpy(cut, data, n);
        kh_error_t err = dec_fail(cut, n, NULL, KH_E_INTERRUPTED, NULL);
        ck_assert_msg(strstr(err.message, "byte") != NULL, "%s", err.message);
        free(cut);
    }
    free(data);

    kh_error_t err = dec_fail("\x92\xc0\xd9\x05"
                              "ab",
                              6, NULL, KH_E_INTERRUPTED, "[1]");
    ck_assert_str_eq(err.message, "string at byte 2 truncated at byte 6");
    dec_fail(NULL, 0, NULL, KH_E_INTERRUPTED, "");
}
END_TEST

START_TEST(test_huge_headers)
{
    static const unsigned char array32[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
    static const unsigned char map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff};
    static const unsigned char str32[] = {0xdb, 0xff, 0xff, 0xff, 0xff};
    static const unsigned char nested[] = {0x81, 0xa1, 'a',  0xdd,
                                           0xff, 0xff, 0xff, 0xff};
    kh_limits_t wide = kh_limits_default();
    wide.max_elements = SIZE_MAX;
    wide.max_total = SIZE_MAX;
    wide.max_string = SIZE_MAX;

    /* within the default limits the count itself is refused */
    dec_fail(array32, sizeof array32, NULL, KH_E_TOO_MANY, "");
    dec_fail(map32, sizeof map32, NULL, KH_E_TOO_MANY, "");
    dec_fail(str32, sizeof str32, NULL, KH_E_STRING_TOO_LONG, "");
    dec_fail(nested, sizeof nested, NULL, KH_E_TOO_MANY, "a");
    /* with no count limits, the bytes left refuse it, before allocating */
    dec_fail(array32, sizeof array32, &wide, KH_E_INTERRUPTED, "");
    dec_fail(map32, sizeof map32, &wide, KH_E_INTERRUPTED, "");
    dec_fail(str32, sizeof str32, &wide, KH_E_INTERRUPTED, "");
    dec_fail(nested, sizeof nested, &wide, KH_E_INTERRUPTED, "a");

    /* a map needs two bytes per entry: 2 entries in 3 bytes is cut */
    static const unsigned char map2[] = {0x82, 0xa0, 0xc0, 0xa1};
    dec_fail(map2, 3, NULL, KH_E_INTERRUPTED, "");
    dec_fail(map2, 4, NULL, KH_E_INTERRUPTED, "");
    /* the headers themselves cut short */
    dec_fail(array32, 3, NULL, KH_E_INTERRUPTED, "");
    dec_fail("\xcb\x00", 2, NULL, KH_E_INTERRUPTED, "");
}
END_TEST

/* ---------------------------------------------------------------------- */
/* Refusals                                                                */

START_TEST(test_utf8_valid)
{
    static const struct {
        const char *s;
        bool ok;
    } cases[] = {
        {"", true},
        {"plain ascii text, long enough for words", true},
        {"\x7f", true},
        {"\xc2\x80", true},          /* U+0080 */
        {"\xdf\xbf", true},          /* U+07FF */
        {"\xe0\xa0\x80", true},      /* U+0800 */
        {"\xed\x9f\xbf", true},      /* U+D7FF */
        {"\xee\x80\x80", true},      /* U+E000 */
        {"\xef\xbf\xbf", true},      /* U+FFFF */
        {"\xf0\x90\x80\x80", true},  /* U+10000 */
        {"\xf4\x8f\xbf\xbf", true},  /* U+10FFFF */
        {"\xc0\x80", false},         /* overlong NUL */
        {"\xc1\xbf", false},         /* overlong */
        {"\xe0\x9f\xbf", false},     /* overlong */
        {"\xf0\x8f\xbf\xbf", false}, /* overlong */
        {"\xed\xa0\x80", false},     /* U+D800 */
        {"\xed\xbf\xbf", false},     /* U+DFFF */
        {"\xf4\x90\x80\x80", false}, /* U+110000 */
        {"\xf5\x80\x80\x80", false},
        {"\xff", false},
        {"\x80", false},     /* bare continuation */
        {"ab\xbf", false},   /* bare continuation */
        {"\xe2\x82", false}, /* truncated sequence */
        {"\xf0\x9f\x98", false},
        {"\xc3", false},
        {"\xc3\x28", false}, /* continuation expected */
        {"\xe2\x28\xa1", false},
        {"\xf0\x90\x28\xbc", false},
        {"01234567890123456789\xe2\x82", false}, /* after the fast path */
        {"0123456789abcdef\x80zzzzzzzz", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        ck_assert_msg(kh_utf8_valid(cases[i].s, strlen(cases[i].s)) ==
                          cases[i].ok,
                      "case %zu", i);
    /* NUL is valid UTF-8; only the decoder refuses it */
    ck_assert(kh_utf8_valid("a\0b", 3));
    ck_assert(kh_utf8_valid("01234567\0abcdefgh", 17));
    ck_assert(kh_utf8_valid(NULL, 0));
    ck_assert(!kh_utf8_valid(NULL, 1));
    /* Plain text: UTF-8 without C0, DEL or C1 controls. */
    ck_assert(kh_text_plain("co\xc3\xb6rdinatie \xe2\x82\xac"));
    ck_assert(kh_text_plain("\xc2\xa0 after C1: U+00A0"));
    ck_assert(kh_text_plain(""));
    ck_assert(!kh_text_plain("tab\there"));
    ck_assert(!kh_text_plain("del\x7f"));
    ck_assert(!kh_text_plain("c1 \xc2\x80"));
    ck_assert(!kh_text_plain("c1 \xc2\x9f"));
    ck_assert(!kh_text_plain("bad \xff"));
    ck_assert(!kh_text_plain("cut \xc2"));
}
END_TEST

/* {"referral": {"name": "ok", "tags": ["ok", <bad>]}} with bad as a value,
 * and {"referral": {<bad>: 1}} with bad as a key. */
static void check_bad_string(const char *bad, size_t len, kh_errcode_t code)
{
    bb_t b = {0};
    bb_map(&b, 1);
    bb_cstr(&b, "referral");
    bb_map(&b, 2);
    bb_cstr(&b, "name");
    bb_cstr(&b, "ok");
    bb_cstr(&b, "tags");
    bb_array(&b, 2);
    bb_cstr(&b, "ok");
    bb_str(&b, bad, len);
    kh_error_t err = dec_fail(b.p, b.len, NULL, code, "referral.tags[1]");
    bb_free(&b);

    bb_map(&b, 1);
    bb_cstr(&b, "referral");
    bb_map(&b, 1);
    bb_str(&b, bad, len);
    bb_u8(&b, 0x01);
    err = dec_fail(b.p, b.len, NULL, code, "referral");
    ck_assert_ptr_nonnull(strstr(err.message, "key"));
    bb_free(&b);
}

START_TEST(test_bad_strings)
{
    static const char *const bad[] = {
        "\xc0\xaf",                            /* overlong '/' */
        "\xe0\x80\xaf",                        /* overlong '/' */
        "\xf0\x80\x80\xaf",                    /* overlong '/' */
        "\xed\xa0\x80",                        /* surrogate */
        "x\xed\xb2\x80",                       /* surrogate */
        "\xf4\x90\x80\x80",                    /* above U+10FFFF */
        "\xf7\xbf\xbf\xbf",                    /* above U+10FFFF */
        "ab\xe2\x82",                          /* truncated sequence */
        "\x80",                                /* bare continuation */
        "Jansen \xbf Amsterdam, long enough!", /* bare continuation */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        check_bad_string(bad[i], strlen(bad[i]), KH_E_INVALID_UTF8);

    /* NUL bytes: anywhere, in short and long strings */
    check_bad_string("a\0b", 3, KH_E_INVALID_UTF8);
    check_bad_string("\0", 1, KH_E_INVALID_UTF8);
    check_bad_string("0123456789\0abcdefghij", 21, KH_E_INVALID_UTF8);

    /* the message says where, not what */
    bb_t b = {0};
    bb_cstr(&b, "Jansen \xbf Amsterdam");
    kh_error_t err = dec_fail(b.p, b.len, NULL, KH_E_INVALID_UTF8, "");
    ck_assert_ptr_null(strstr(err.message, "Jansen"));
    ck_assert_ptr_nonnull(strstr(err.message, "byte 8"));
    bb_free(&b);
}
END_TEST

START_TEST(test_duplicate_keys)
{
    bb_t b = {0};
    bb_map(&b, 1);
    bb_cstr(&b, "referral");
    bb_map(&b, 3);
    bb_cstr(&b, "age");
    bb_u8(&b, 0x11);
    bb_cstr(&b, "name");
    bb_cstr(&b, "x");
    bb_cstr(&b, "age");
    bb_u8(&b, 0x12);
    dec_fail(b.p, b.len, NULL, KH_E_DUPLICATE_KEY, "referral.age");
    bb_free(&b);

    /* a big map: 1000 distinct keys pass, a repeat at the end is found */
    for (int dup = 0; dup <= 1; dup++) {
        bb_map(&b, 1000);
        for (int i = 0; i < 1000; i++) {
            char key[16];
            snprintf(key, sizeof key, "key%d", dup && i == 999 ? 3 : i);
            bb_cstr(&b, key);
            bb_u8(&b, 0xc0);
        }
        if (dup)
            dec_fail(b.p, b.len, NULL, KH_E_DUPLICATE_KEY, "key3");
        else
            json_decref(dec_ok(b.p, b.len, NULL));
        bb_free(&b);
    }
}
END_TEST

START_TEST(test_malformed)
{
    /* trailing bytes after a whole value */
    dec_fail("\xc0\xc0", 2, NULL, KH_E_MALFORMED, "");
    dec_fail("\x91\x01\x00", 3, NULL, KH_E_MALFORMED, "");
    /* 0xc1 is never used */
    dec_fail("\xc1", 1, NULL, KH_E_MALFORMED, "");
    dec_fail("\x81\xa1x\x92\x01\xc1", 6, NULL, KH_E_MALFORMED, "x[1]");
    /* map keys must be str */
    dec_fail("\x81\x01\x02", 3, NULL, KH_E_MALFORMED, "");
    dec_fail("\x81\xa1k\x81\xc0\x02", 6, NULL, KH_E_MALFORMED, "k");
    dec_fail("\x81\x90\x02", 3, NULL, KH_E_MALFORMED, "");
}
END_TEST

START_TEST(test_unsupported)
{
    static const struct {
        const char *bytes;
        size_t len;
    } cases[] = {
        {"\xc4\x01z", 3},                            /* bin8 */
        {"\xc5\x00\x01z", 4},                        /* bin16 */
        {"\xc6\x00\x00\x00\x01z", 6},                /* bin32 */
        {"\xc7\x01\x01z", 4},                        /* ext8 */
        {"\xc8\x00\x01\x01z", 5},                    /* ext16 */
        {"\xc9\x00\x00\x00\x01\x01z", 7},            /* ext32 */
        {"\xd4\x01z", 3},                            /* fixext1 */
        {"\xd5\x01zz", 4},                           /* fixext2 */
        {"\xd6\x01zzzz", 6},                         /* fixext4 */
        {"\xd7\x01zzzzzzzz", 10},                    /* fixext8 */
        {"\xd8\x01zzzzzzzzzzzzzzzz", 18},            /* fixext16 */
        {"\xcf\x80\0\0\0\0\0\0\0", 9},               /* 2^63 */
        {"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", 9}, /* 2^64 - 1 */
        {"\xcb\x7f\xf8\0\0\0\0\0\0", 9},             /* NaN */
        {"\xcb\x7f\xf0\0\0\0\0\0\0", 9},             /* +Inf */
        {"\xcb\xff\xf0\0\0\0\0\0\0", 9},             /* -Inf */
        {"\xca\x7f\xc0\0\0", 5},                     /* float32 NaN */
        {"\xca\xff\x80\0\0", 5},                     /* float32 -Inf */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        dec_fail(cases[i].bytes, cases[i].len, NULL, KH_E_UNSUPPORTED_TYPE, "");
        /* and with a path */
        bb_t b = {0};
        bb_map(&b, 1);
        bb_cstr(&b, "items");
        bb_array(&b, 3);
        bb_u8(&b, 0x01);
        bb_u8(&b, 0x02);
        bb_put(&b, cases[i].bytes, cases[i].len);
        dec_fail(b.p, b.len, NULL, KH_E_UNSUPPORTED_TYPE, "items[2]");
        bb_free(&b);
    }
}
END_TEST

START_TEST(test_encode)
{
    char *data = (char *) 1;
    size_t size = 1;
    kh_error_t err;

    /* 17 levels: refused with the path */
    json_t *deep = json_null();
    for (int i = 0; i < 17; i++) {
        json_t *a = json_array();
        json_array_append_new(a, deep);
        deep = a;
    }
    ck_assert_int_eq(kh_msgpack_encode(deep, &data, &size, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TOO_DEEP);
    ck_assert_ptr_null(data);
    ck_assert_uint_eq(size, 0);
    ck_assert_str_eq(err.path, "[0][0][0][0][0][0][0][0][0][0][0][0][0][0]"
                               "[0][0]");
    json_decref(deep);

    /* {"a": {"b": [1, {"c": [[...[2]...]]}]}}: 4 levels, then 13 arrays */
    json_t *inner = json_integer(2);
    for (int i = 0; i < 13; i++) {
        json_t *a = json_array();
        json_array_append_new(a, inner);
        inner = a;
    }
    json_t *o = json_pack("{s:{s:[i,{s:o}]}}", "a", "b", 1, "c", inner);
    ck_assert_ptr_nonnull(o);
    ck_assert_int_eq(kh_msgpack_encode(o, &data, &size, &err), -1);
    ck_assert_int_eq(err.code, KH_E_TOO_DEEP);
    ck_assert_str_eq(err.path, "a.b[1].c[0][0][0][0][0][0][0][0][0][0][0][0]");
    json_decref(o);

    /* keys are str; the bytes are exactly the MessagePack of the value */
    o = json_pack("{s:i}", "ab", 1);
    ck_assert_int_eq(kh_msgpack_encode(o, &data, &size, &err), 0);
    ck_assert_uint_eq(size, 5);
    ck_assert_mem_eq(data,
                     "\x81\xa2"
                     "ab\x01",
                     5);
    free(data);
    json_decref(o);
}
END_TEST

/* The correlation id of a frame the decoder refuses, wherever it stands
 * and whatever bad value stands beside it; nothing from a frame that
 * does not hold it whole. */
START_TEST(test_peek_str)
{
    char cid[65];
    /* {"referral": bin, "cid": "c-1"} and {"cid": "c-1", "x": ext} */
    const char after[] = "\x82\xa8referral\xc4\x02\x00\x01\xa3"
                         "cid\xa3"
                         "c-1";
    ck_assert(
        kh_msgpack_peek_str(after, sizeof after - 1, "cid", cid, sizeof cid));
    ck_assert_str_eq(cid, "c-1");
    const char before[] = "\x82\xa3"
                          "cid\xa3"
                          "c-1\xa1x\xd4\x01\x00";
    ck_assert(
        kh_msgpack_peek_str(before, sizeof before - 1, "cid", cid, sizeof cid));
    ck_assert_str_eq(cid, "c-1");
    /* Over a string with a NUL, a non-str key, nested containers. */
    const char mixed[] = "\x83\xa1s\xa3x\x00y\x01\x92\x81\xa1k\xc0\xdc\x00\x01"
                         "\xcb\x00\x00\x00\x00\x00\x00\x00\x00\xa3"
                         "cid\xd9\x02"
                         "ab";
    ck_assert(
        kh_msgpack_peek_str(mixed, sizeof mixed - 1, "cid", cid, sizeof cid));
    ck_assert_str_eq(cid, "ab");
    /* The frame ends before, or in, the cid. */
    for (size_t cut = 0; cut < sizeof after - 1; cut++)
        ck_assert(!kh_msgpack_peek_str(after, cut, "cid", cid, sizeof cid));
    /* A cid that is no str, empty, too long, not UTF-8 or holding NUL. */
    const char *bad[] = {"\x81\xa3"
                         "cid\x01",
                         "\x81\xa3"
                         "cid\xa0",
                         "\x81\xa3"
                         "cid\xa3\xff\xfe\xfd",
                         "\x81\xa3"
                         "cid\xa3x\x00y",
                         "\x81\xa4"
                         "cidx\xa1x",
                         "\x91\xa3"
                         "cid",
                         "\xc1"};
    size_t bad_len[] = {5, 5, 8, 8, 8, 5, 1};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(
            !kh_msgpack_peek_str(bad[i], bad_len[i], "cid", cid, sizeof cid),
            "case %zu", i);
    ck_assert(!kh_msgpack_peek_str(after, sizeof after - 1, "cid", cid, 3));
    ck_assert_str_eq(cid, "");
    /* Headers that claim far more than the frame holds. */
    const char huge[] = "\xdf\xff\xff\xff\xff\xa1x\xdd\xff\xff\xff\xff";
    ck_assert(
        !kh_msgpack_peek_str(huge, sizeof huge - 1, "cid", cid, sizeof cid));
    /* Deep nesting costs no stack: 200,000 levels before the cid. */
    size_t depth = 200000;
    char *deep = malloc(depth + 16);
    size_t len = 0;
    deep[len++] = '\x82';
    deep[len++] = '\xa1';
    deep[len++] = 'x';
    memset(deep + len, 0x91, depth);
    len += depth;
    deep[len++] = '\xc0';
    memcpy(deep + len,
           "\xa3"
           "cid\xa1z",
           6);
    len += 6;
    ck_assert(kh_msgpack_peek_str(deep, len, "cid", cid, sizeof cid));
    ck_assert_str_eq(cid, "z");
    free(deep);
}
END_TEST

/* The version of a frame the decoder refuses, in any integer encoding;
 * nothing from a v that is no integer or does not fit an int64_t. */
START_TEST(test_peek_int)
{
    int64_t v = 0;
    /* {"x": bin, "v": 2} */
    const char after[] = "\x82\xa1x\xc4\x02\x00\x01\xa1v\x02";
    ck_assert(kh_msgpack_peek_int(after, sizeof after - 1, "v", &v));
    ck_assert_int_eq(v, 2);
    const struct {
        const char *frame;
        size_t len;
        int64_t v;
    } good[] = {
        {"\x81\xa1v\xff", 4, -1},
        {"\x81\xa1v\xcc\xc8", 5, 200},
        {"\x81\xa1v\xcd\x01\x00", 6, 256},
        {"\x81\xa1v\xce\x00\x01\x00\x00", 8, 65536},
        {"\x81\xa1v\xcf\x7f\xff\xff\xff\xff\xff\xff\xff", 12, INT64_MAX},
        {"\x81\xa1v\xd0\x80", 5, -128},
        {"\x81\xa1v\xd1\xff\x00", 6, -256},
        {"\x81\xa1v\xd2\xff\xff\xff\xfe", 8, -2},
        {"\x81\xa1v\xd3\x80\x00\x00\x00\x00\x00\x00\x00", 12, INT64_MIN},
    };
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        ck_assert_msg(kh_msgpack_peek_int(good[i].frame, good[i].len, "v", &v),
                      "case %zu", i);
        ck_assert_int_eq(v, good[i].v);
    }
    const struct {
        const char *frame;
        size_t len;
    } bad[] = {
        {"\x81\xa1v\xa1\x32", 5},                              /* a string */
        {"\x81\xa1v\xca\x40\x00\x00\x00", 8},                  /* a float */
        {"\x81\xa1v\xcf\x80\x00\x00\x00\x00\x00\x00\x00", 12}, /* > int64 */
        {"\x81\xa1v\xcd\x01", 5},                              /* cut short */
        {"\x81\xa1w\x01", 4},                                  /* no v */
        {"\x91\xa1v", 3},                                      /* no map */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(!kh_msgpack_peek_int(bad[i].frame, bad[i].len, "v", &v),
                      "case %zu", i);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("codec");
    TCase *tc = tcase_create("codec");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_round_trip_scalars);
    tcase_add_test(tc, test_round_trip_containers);
    tcase_add_test(tc, test_decode_hand_made);
    tcase_add_test(tc, test_limit_frame);
    tcase_add_test(tc, test_limit_depth);
    tcase_add_test(tc, test_limit_elements);
    tcase_add_test(tc, test_limit_total);
    tcase_add_test(tc, test_limit_string);
    tcase_add_test(tc, test_truncated_everywhere);
    tcase_add_test(tc, test_huge_headers);
    tcase_add_test(tc, test_utf8_valid);
    tcase_add_test(tc, test_bad_strings);
    tcase_add_test(tc, test_duplicate_keys);
    tcase_add_test(tc, test_malformed);
    tcase_add_test(tc, test_unsupported);
    tcase_add_test(tc, test_encode);
    tcase_add_test(tc, test_peek_str);
    tcase_add_test(tc, test_peek_int);
    suite_add_tcase(s, tc);
    return khtest_run_suite(s);
}
