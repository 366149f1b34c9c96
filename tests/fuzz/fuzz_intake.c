/*
 * libFuzzer harness for intake's request path, everything but the network
 * and the database: decode the frame (default limits), check the envelope
 * (kh_proto_check), validate a SUBMIT's referral against
 * schemas/referral.v1.json, take its canonical JSON (kh_payload_canonical,
 * what the hub stores and hashes), and build the REJECTED reply for any
 * refusal. Beyond the sanitizers it checks that:
 *  - every refusal has a code of its stage, a message and a safe path;
 *  - a refusal's cid, when given, is the envelope's own 1-64 byte string;
 *  - the envelope survives MessagePack encode + decode unchanged
 *    (json_equal), and the encoding is a fixed point;
 *  - the canonical JSON is ASCII (control characters escaped, DEL aside),
 *    parses back to an equal referral (whole numbers held as reals as
 *    integers, tests/support/khcanon.h), is jansson's form of it, and is
 *    the same bytes for the round-tripped referral;
 *  - a REJECTED reply carries code, path and message as strings and, with
 *    a cid, passes the hub's own envelope check after encode + decode;
 *  - the refusal's path as the trail holds it (kh_proto_trail_path) has
 *    the reply's segments, each the same or "?", keeps below the root only
 *    names of the schema, and hides the name an unknown_field or
 *    duplicate_key refusal is about.
 * The canonical JSON is taken for every SUBMIT that passes the envelope
 * check, valid referral or not, so the property is tried on more shapes.
 * Seeds: corpus/intake (SUBMIT, STATUS and PING envelopes, broken ones).
 * KH_FUZZ_SCHEMA in the environment overrides the schema file.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_util.h"
#include "ketenhub/codec.h"
#include "ketenhub/proto.h"
#include "ketenhub/schema.h"
#include "khcanon.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kh_schema_t *s_schema;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void) argc;
    (void) argv;
    s_schema = kh_fuzz_load_schema("fuzz_intake");
    return 0;
}

/* Build the REJECTED reply for err as intake does and check it. */
static void s_check_reply(const char *cid, const kh_error_t *err)
{
    json_t *reply = kh_proto_rejected(cid, err, 250);
    if (!reply)
        return; /* out of memory */
    static const char *fields[] = {"code", "path", "message"};
    for (size_t i = 0; i < sizeof fields / sizeof *fields; i++)
        KH_FUZZ_CHECK(json_is_string(json_object_get(reply, fields[i])),
                      "REJECTED for %s lacks %s", kh_error_name(err->code),
                      fields[i]);
    if (cid) {
        char *bytes = NULL;
        size_t size = 0;
        kh_error_t e2;
        json_t *back = NULL;
        if (kh_msgpack_encode(reply, &bytes, &size, &e2) == 0 &&
            kh_msgpack_decode(bytes, size, NULL, &back, &e2) == 0) {
            kh_cmd_t cmd;
            const char *cid2 = NULL;
            KH_FUZZ_CHECK(kh_proto_check(back, &cmd, &cid2, &e2) == 0 &&
                              cmd == KH_CMD_REJECTED,
                          "own REJECTED fails the envelope check (%s at '%s')",
                          kh_error_name(e2.code), e2.path);
        }
        json_decref(back);
        free(bytes);
    }
    json_decref(reply);
}

/* The next segment of a path at *p: a key or an index with its brackets,
 * without the dot before it; its length in *len, 0 at the end. */
static const char *s_segment(const char **p, size_t *len)
{
    if (**p == '.')
        (*p)++;
    const char *at = *p;
    if (*at == '[')
        *len = strcspn(at, "]") + (at[strcspn(at, "]")] == ']');
    else
        *len = strcspn(at, ".[");
    *p += *len;
    return at;
}

/* The trail's form of a refusal at path (from the envelope's root). */
static void s_check_trail(kh_errcode_t code, const char *path)
{
    char trail[KH_ERROR_PATH_MAX];
    kh_proto_trail_path(code, path, s_schema, trail, sizeof trail);
    KH_FUZZ_CHECK(strlen(trail) <= strlen(path), "trail path %s longer than %s",
                  trail, path);
    bool names_last =
        code == KH_E_SCHEMA_UNKNOWN_FIELD || code == KH_E_DUPLICATE_KEY;
    const char *p = path, *t = trail;
    for (bool root = true;; root = false) {
        size_t plen, tlen;
        const char *pseg = s_segment(&p, &plen);
        const char *tseg = s_segment(&t, &tlen);
        KH_FUZZ_CHECK((plen == 0) == (tlen == 0),
                      "trail path %s does not follow %s", trail, path);
        if (plen == 0)
            break;
        bool hidden = tlen == 1 && *tseg == '?';
        KH_FUZZ_CHECK(hidden || (plen == tlen && memcmp(pseg, tseg, plen) == 0),
                      "trail path %s changes %s", trail, path);
        if (*tseg == '[' || hidden)
            continue;
        KH_FUZZ_CHECK(root || kh_schema_has_name(s_schema, tseg, tlen),
                      "trail path %s keeps a name not in the schema", trail);
        KH_FUZZ_CHECK(!names_last || *p, "trail path %s names the refused key",
                      trail);
    }
}

/* The canonical JSON of referral and its properties. */
static void s_check_canonical(const json_t *referral)
{
    size_t len = 0;
    char *text = kh_payload_canonical(referral, &len);
    if (!text)
        return; /* out of memory */
    KH_FUZZ_CHECK(len == strlen(text), "canonical length is wrong");
    for (size_t i = 0; i < len; i++)
        KH_FUZZ_CHECK(
            (unsigned char) text[i] >= 0x20 && (unsigned char) text[i] < 0x80,
            "canonical JSON has byte 0x%02x", (unsigned char) text[i]);
    /* It parses back to the referral with whole numbers held as reals
     * (120.0) as the integers they are, and is byte for byte the form
     * jansson writes of that, which the hub has always stored and hashed. */
    json_t *expect = khcanon_whole_reals_as_integers(referral);
    json_error_t jerr;
    json_t *parsed = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    KH_FUZZ_CHECK(parsed != NULL, "canonical JSON does not parse: %s",
                  jerr.text);
    KH_FUZZ_CHECK(!expect || json_equal(parsed, expect),
                  "canonical JSON parses to another value");
    json_decref(parsed);
    json_decref(expect);
    char *ref = khcanon_reference(referral);
    if (ref) {
        KH_FUZZ_CHECK(strcmp(ref, text) == 0,
                      "canonical JSON differs from jansson's");
        free(ref);
    }

    /* The same referral after a trip over the wire: same bytes. */
    char *bytes = NULL;
    size_t size = 0;
    kh_error_t err;
    json_t *wire = NULL;
    if (kh_msgpack_encode(referral, &bytes, &size, &err) == 0 &&
        kh_msgpack_decode(bytes, size, NULL, &wire, &err) == 0) {
        size_t len2 = 0;
        char *text2 = kh_payload_canonical(wire, &len2);
        if (text2) {
            KH_FUZZ_CHECK(len2 == len && memcmp(text, text2, len) == 0,
                          "canonical JSON changed over the wire");
            free(text2);
        }
    }
    json_decref(wire);
    free(bytes);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kh_error_t err;
    kh_error_clear(&err);
    json_t *msg = NULL;
    if (kh_msgpack_decode(data, size, NULL, &msg, &err)) {
        kh_fuzz_check_error(&err, "decode");
        KH_FUZZ_CHECK(kh_fuzz_codec_code(err.code), "decode: code %s",
                      kh_error_name(err.code));
        s_check_reply(NULL, &err);
        s_check_trail(err.code, err.path);
        return 0;
    }
    kh_fuzz_roundtrip(msg, "envelope");

    kh_cmd_t cmd;
    const char *cid = NULL;
    kh_error_clear(&err);
    int rc = kh_proto_check(msg, &cmd, &cid, &err);
    if (cid) {
        const json_t *own = json_object_get(msg, "cid");
        KH_FUZZ_CHECK(json_is_string(own) && json_string_value(own) == cid &&
                          strlen(cid) >= 1 && strlen(cid) <= KH_CID_MAX,
                      "cid is not the envelope's own 1-%d byte string",
                      KH_CID_MAX);
    }
    if (rc) {
        kh_fuzz_check_error(&err, "envelope");
        KH_FUZZ_CHECK(err.code >= KH_E_UNKNOWN_VERSION &&
                          err.code <= KH_E_BAD_ENVELOPE,
                      "envelope: code %s", kh_error_name(err.code));
        s_check_reply(cid, &err);
        s_check_trail(err.code, err.path);
    } else if (cmd == KH_CMD_SUBMIT) {
        const json_t *referral = json_object_get(msg, "referral");
        KH_FUZZ_CHECK(json_is_object(referral), "SUBMIT without a referral");
        kh_error_clear(&err);
        if (kh_schema_validate(s_schema, referral, &err)) {
            kh_fuzz_check_error(&err, "validate");
            KH_FUZZ_CHECK(err.code >= KH_E_SCHEMA_TYPE &&
                              err.code <= KH_E_SCHEMA_CONDITION,
                          "validate: code %s", kh_error_name(err.code));
            s_check_reply(cid, &err);
            char path[KH_ERROR_PATH_MAX + 16];
            snprintf(path, sizeof path, "referral%s%s", *err.path ? "." : "",
                     err.path);
            path[KH_ERROR_PATH_MAX - 1] = '\0'; /* as intake cuts it */
            s_check_trail(err.code, path);
        }
        s_check_canonical(referral);
    }
    json_decref(msg);
    return 0;
}
