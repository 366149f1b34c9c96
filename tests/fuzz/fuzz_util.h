/*
 * Checks shared by the libFuzzer harnesses. A broken property is reported
 * on stderr and ends the run with abort(), which libFuzzer records as a
 * crash with the input that caused it (harness code, not library code, so
 * abort is the point here).
 */
#ifndef KH_FUZZ_UTIL_H_INCLUDED
#define KH_FUZZ_UTIL_H_INCLUDED

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"
#include "ketenhub/error.h"
#include "ketenhub/schema.h"

/* Report a broken property and stop. */
#define KH_FUZZ_FAIL(...)                                                      \
    do {                                                                       \
        fprintf(stderr, "fuzz: property broken at %s:%d: ", __FILE__,          \
                __LINE__);                                                     \
        fprintf(stderr, __VA_ARGS__);                                          \
        fputc('\n', stderr);                                                   \
        abort();                                                               \
    } while (0)

#define KH_FUZZ_CHECK(cond, ...)                                               \
    do {                                                                       \
        if (!(cond))                                                           \
            KH_FUZZ_FAIL(__VA_ARGS__);                                         \
    } while (0)

/* The referral schema ($KH_FUZZ_SCHEMA or the source tree's), for
 * harness's LLVMFuzzerInitialize; exits 2 when it cannot be loaded. */
static inline kh_schema_t *kh_fuzz_load_schema(const char *harness)
{
    const char *path = getenv("KH_FUZZ_SCHEMA");
    kh_error_t err;
    kh_schema_t *schema = kh_schema_load(path ? path : KH_FUZZ_SCHEMA, &err);
    if (!schema) {
        fprintf(stderr, "%s: cannot load the schema: %s at %s\n", harness,
                err.message, err.path);
        exit(2);
    }
    return schema;
}

/* A refusal must carry a real code, a message, and a path made only of
 * identifiers, indices, dots and '?' (error.h: a path goes back to the
 * partner, and never carries more of its data than the names of its
 * keys; the trail's paths are checked apart, in fuzz_intake). */
static inline void kh_fuzz_check_error(const kh_error_t *err, const char *what)
{
    KH_FUZZ_CHECK(err->code > KH_E_OK && err->code < KH_E_COUNT_,
                  "%s: refused with code %d", what, (int) err->code);
    size_t plen = strnlen(err->path, sizeof err->path);
    KH_FUZZ_CHECK(plen < sizeof err->path, "%s: path not terminated", what);
    size_t mlen = strnlen(err->message, sizeof err->message);
    KH_FUZZ_CHECK(mlen > 0 && mlen < sizeof err->message,
                  "%s: empty or unterminated message (%s)", what,
                  kh_error_name(err->code));
    for (size_t i = 0; i < plen; i++) {
        char c = err->path[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                  (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '[' ||
                  c == ']' || c == '?';
        KH_FUZZ_CHECK(ok, "%s: byte 0x%02x in path at %zu (%s)", what,
                      (unsigned char) c, i, kh_error_name(err->code));
    }
}

/* Whether code is one the decoder may refuse a frame with. */
static inline bool kh_fuzz_codec_code(kh_errcode_t code)
{
    return (code >= KH_E_MALFORMED && code <= KH_E_UNSUPPORTED_TYPE) ||
           code == KH_E_NOMEM;
}

/* Encode value, decode the bytes again and require an equal value; also
 * require that encoding is a fixed point: encoding the copy gives the same
 * bytes. The decoder's limits are the defaults with room for the frame
 * (a float32 comes back as float64, so the encoding can outgrow the input).
 */
static inline void kh_fuzz_roundtrip(const json_t *value, const char *what)
{
    kh_error_t err;
    kh_error_clear(&err);
    char *bytes = NULL;
    size_t size = 0;
    if (kh_msgpack_encode(value, &bytes, &size, &err)) {
        KH_FUZZ_CHECK(err.code == KH_E_NOMEM, "%s: encode refused (%s: %s)",
                      what, kh_error_name(err.code), err.message);
        return;
    }
    kh_limits_t limits = kh_limits_default();
    if (size > limits.max_frame)
        limits.max_frame = size;
    json_t *again = NULL;
    if (kh_msgpack_decode(bytes, size, &limits, &again, &err)) {
        KH_FUZZ_CHECK(err.code == KH_E_NOMEM,
                      "%s: own encoding refused (%s at '%s': %s)", what,
                      kh_error_name(err.code), err.path, err.message);
        free(bytes);
        return;
    }
    KH_FUZZ_CHECK(json_equal(value, again), "%s: round trip changed the value",
                  what);
    char *bytes2 = NULL;
    size_t size2 = 0;
    if (kh_msgpack_encode(again, &bytes2, &size2, &err) == 0) {
        KH_FUZZ_CHECK(size2 == size && memcmp(bytes, bytes2, size) == 0,
                      "%s: encoding is not a fixed point", what);
        free(bytes2);
    }
    json_decref(again);
    free(bytes);
}

#endif
