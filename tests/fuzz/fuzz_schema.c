/*
 * libFuzzer harness for schema validation (kh_schema_validate against
 * schemas/referral.v1.json). The input is JSON text, parsed with jansson
 * (duplicate keys refused, as the wire decoder does; "\u0000" allowed, to
 * reach the validator's NUL handling); text that does not parse is
 * skipped. Beyond the sanitizers it checks that:
 *  - a refusal has a schema.* code, a message and a safe path;
 *  - validating twice gives the same answer (the schema is read-only);
 *  - the document sent over the wire (MessagePack encode + decode) gets
 *    the same answer, code and path, as the JSON text: a referral is
 *    judged the same whichever way it came in.
 * Seeds: corpus/schema (schemas/examples and some of schemas/invalid);
 * dictionary: schema.dict (field names and enum values).
 * KH_FUZZ_SCHEMA in the environment overrides the schema file.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_util.h"
#include "ketenhub/codec.h"
#include "ketenhub/schema.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static kh_schema_t *s_schema;

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void) argc;
    (void) argv;
    s_schema = kh_fuzz_load_schema("fuzz_schema");
    return 0;
}

/* Validate doc; on refusal check the error record. Returns the code. */
static kh_errcode_t s_validate(const json_t *doc, kh_error_t *err)
{
    kh_error_clear(err);
    if (kh_schema_validate(s_schema, doc, err) == 0) {
        KH_FUZZ_CHECK(err->code == KH_E_OK, "valid but err is set");
        return KH_E_OK;
    }
    kh_fuzz_check_error(err, "validate");
    KH_FUZZ_CHECK(err->code >= KH_E_SCHEMA_TYPE &&
                      err->code <= KH_E_SCHEMA_CONDITION,
                  "validate: code %s", kh_error_name(err->code));
    return err->code;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t jerr;
    json_t *doc = json_loadb(
        (const char *) data, size,
        JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
    if (!doc)
        return 0;

    kh_error_t first, second;
    s_validate(doc, &first);
    s_validate(doc, &second);
    KH_FUZZ_CHECK(first.code == second.code &&
                      strcmp(first.path, second.path) == 0,
                  "two validations disagree");

    /* The same document as the wire would carry it. */
    char *bytes = NULL;
    size_t len = 0;
    kh_error_t err;
    if (kh_msgpack_encode(doc, &bytes, &len, &err) == 0) {
        json_t *wire = NULL;
        if (kh_msgpack_decode(bytes, len, NULL, &wire, &err) == 0) {
            kh_error_t third;
            s_validate(wire, &third);
            KH_FUZZ_CHECK(first.code == third.code &&
                              strcmp(first.path, third.path) == 0,
                          "JSON says %s at '%s', MessagePack says %s at '%s'",
                          kh_error_name(first.code), first.path,
                          kh_error_name(third.code), third.path);
            json_decref(wire);
        }
        free(bytes);
    }
    json_decref(doc);
    return 0;
}
