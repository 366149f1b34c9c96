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
 *    parses back to an equal referral, and is the same bytes for the
 *    round-tripped referral;
 *  - a REJECTED reply carries code, path and message as strings and, with
 *    a cid, passes the hub's own envelope check after encode + decode.
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
    json_error_t jerr;
    json_t *parsed = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    KH_FUZZ_CHECK(parsed != NULL, "canonical JSON does not parse: %s",
                  jerr.text);
    KH_FUZZ_CHECK(json_equal(parsed, referral),
                  "canonical JSON parses to another value");
    json_decref(parsed);
    /* Byte for byte the form jansson writes, which the hub has always
     * stored and hashed. */
    char *ref = json_dumps(referral, JSON_COMPACT | JSON_SORT_KEYS |
                                         JSON_ENSURE_ASCII | JSON_ENCODE_ANY);
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
        }
        s_check_canonical(referral);
    }
    json_decref(msg);
    return 0;
}
