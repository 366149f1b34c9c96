/*
 * libFuzzer harness for the MessagePack envelope decoder
 * (kh_msgpack_decode). Any bytes must decode or be refused, never crash,
 * leak or hang. Beyond the sanitizers it checks that:
 *  - a refusal has a codec code, a message and a safe path;
 *  - what decodes under tight limits decodes under the defaults too, to an
 *    equal value (limits refuse, they never change a value);
 *  - a decoded value survives encode + decode unchanged, and its encoding
 *    is a fixed point;
 *  - kh_utf8_valid agrees with jansson's own UTF-8 check on the input;
 *  - kh_msgpack_peek_str finds the cid of a map that decodes, as decoded.
 * Seeds: corpus/decode (SUBMIT envelopes of the example referrals, odd
 * encodings, truncated and oversized headers).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "fuzz_util.h"
#include "ketenhub/codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Differential check of the UTF-8 validator against jansson's. */
    json_t *str = json_stringn((const char *) data, size);
    KH_FUZZ_CHECK(kh_utf8_valid((const char *) data, size) == (str != NULL),
                  "kh_utf8_valid disagrees with jansson");
    json_decref(str);

    kh_error_t err;
    kh_error_clear(&err);
    json_t *value = NULL;
    int rc = kh_msgpack_decode(data, size, NULL, &value, &err);
    if (rc) {
        KH_FUZZ_CHECK(value == NULL, "refused but *out is set");
        kh_fuzz_check_error(&err, "decode");
        KH_FUZZ_CHECK(kh_fuzz_codec_code(err.code), "decode: code %s",
                      kh_error_name(err.code));
    } else {
        KH_FUZZ_CHECK(value != NULL, "accepted but *out is NULL");
        kh_fuzz_roundtrip(value, "decode");
    }
    char cid[65];
    bool peeked = kh_msgpack_peek_str(data, size, "cid", cid, sizeof cid);
    const json_t *want = rc ? NULL : json_object_get(value, "cid");
    if (want && json_is_string(want) && json_string_length(want) >= 1 &&
        json_string_length(want) < sizeof cid)
        KH_FUZZ_CHECK(peeked && strcmp(cid, json_string_value(want)) == 0,
                      "peek misses the cid of a decoded map");
    else if (!rc)
        KH_FUZZ_CHECK(!peeked, "peek finds a cid the decoded map lacks");

    /* Tight limits reach every limit branch with small inputs. */
    kh_limits_t tight = {
        .max_frame = 4096,
        .max_depth = 3,
        .max_elements = 6,
        .max_total = 40,
        .max_string = 24,
    };
    json_t *small = NULL;
    kh_error_clear(&err);
    if (kh_msgpack_decode(data, size, &tight, &small, &err)) {
        KH_FUZZ_CHECK(small == NULL, "refused but *out is set (tight)");
        kh_fuzz_check_error(&err, "decode (tight)");
        KH_FUZZ_CHECK(kh_fuzz_codec_code(err.code), "decode (tight): code %s",
                      kh_error_name(err.code));
    } else {
        KH_FUZZ_CHECK(rc == 0, "accepted under tight limits only");
        KH_FUZZ_CHECK(json_equal(small, value),
                      "tight and default limits decode differently");
        json_decref(small);
    }
    json_decref(value);
    return 0;
}
