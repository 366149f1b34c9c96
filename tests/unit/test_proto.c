/*
 * Envelope checks of the partner protocol (schemas/protocol.md), the
 * configuration table, the canonical payload hash, the throttle, the
 * rate limit and the array literals.
 */
#include <czmq.h>
#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ketenhub/codec.h"
#include "ketenhub/config.h"
#include "ketenhub/db.h"
#include "ketenhub/log.h"
#include "ketenhub/pgarray.h"
#include "ketenhub/proto.h"
#include "ketenhub/ratelimit.h"
#include "ketenhub/throttle.h"
#include "khcanon.h"
#include "khtest.h"

static json_t *s_envelope(const char *json)
{
    json_error_t jerr;
    json_t *msg = json_loads(json, JSON_REJECT_DUPLICATES, &jerr);
    ck_assert_msg(msg != NULL, "%s", jerr.text);
    return msg;
}

/* Check json and expect code at path; cid_expected is the cid that must be
 * recovered for correlation (NULL: none). */
static void s_expect(const char *json, kh_errcode_t code, const char *path,
                     const char *cid_expected)
{
    json_t *msg = s_envelope(json);
    kh_cmd_t cmd;
    const char *cid;
    kh_error_t err;
    kh_error_clear(&err);
    int rc = kh_proto_check(msg, &cmd, &cid, &err);
    if (code == KH_E_OK)
        ck_assert_msg(rc == 0, "%s: %s", json, err.message);
    else {
        ck_assert_int_eq(rc, -1);
        ck_assert_msg(err.code == code, "%s: got %s, expected %s", json,
                      kh_error_name(err.code), kh_error_name(code));
        ck_assert_str_eq(err.path, path);
    }
    if (cid_expected)
        ck_assert_str_eq(cid, cid_expected);
    else
        ck_assert_ptr_null(cid);
    json_decref(msg);
}

#define S_UUID "6f1c2e1a-8a55-4b53-9c55-0a3f3f0f6f2b"

START_TEST(valid_envelopes_pass)
{
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":\"a\"}", KH_E_OK, "", "a");
    s_expect(
        "{\"v\":1,\"cmd\":\"STATUS\",\"cid\":\"a\",\"referral_id\":\"" S_UUID
        "\"}",
        KH_E_OK, "", "a");
    s_expect("{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"idempotency_key\":"
             "\"A-z.0_9:x\",\"referral\":{}}",
             KH_E_OK, "", "a");
}
END_TEST

START_TEST(version_and_command_come_first)
{
    s_expect("{\"cmd\":\"PING\",\"cid\":\"a\"}", KH_E_BAD_ENVELOPE, "v", "a");
    s_expect("{\"v\":\"1\",\"cmd\":\"PING\",\"cid\":\"a\"}", KH_E_BAD_ENVELOPE,
             "v", "a");
    /* The envelope's integers are integers: a whole float is not one
     * (protocol.md, MessagePack types), unlike inside the referral. */
    s_expect("{\"v\":1.0,\"cmd\":\"PING\",\"cid\":\"a\"}", KH_E_BAD_ENVELOPE,
             "v", "a");
    s_expect("{\"v\":2,\"cmd\":\"PING\",\"cid\":\"a\",\"new\":1}",
             KH_E_UNKNOWN_VERSION, "v", "a");
    s_expect("{\"v\":1,\"cmd\":\"ping\",\"cid\":\"a\"}", KH_E_UNKNOWN_COMMAND,
             "cmd", "a");
    s_expect("{\"v\":1,\"cid\":\"a\"}", KH_E_BAD_ENVELOPE, "cmd", "a");
    /* A reply command is not a request, but it is a known command. */
    s_expect("{\"v\":1,\"cmd\":\"PONG\",\"cid\":\"a\"}", KH_E_OK, "", "a");
}
END_TEST

START_TEST(cid_is_required_and_bounded)
{
    s_expect("{\"v\":1,\"cmd\":\"PING\"}", KH_E_BAD_ENVELOPE, "cid", NULL);
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":\"\"}", KH_E_BAD_ENVELOPE,
             "cid", NULL);
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":7}", KH_E_BAD_ENVELOPE, "cid",
             NULL);
    char json[256];
    char cid[KH_CID_MAX + 2];
    memset(cid, 'c', sizeof cid);
    cid[KH_CID_MAX] = '\0'; /* exactly at the limit */
    snprintf(json, sizeof json, "{\"v\":1,\"cmd\":\"PING\",\"cid\":\"%s\"}",
             cid);
    s_expect(json, KH_E_OK, "", cid);
    cid[KH_CID_MAX] = 'c';
    cid[KH_CID_MAX + 1] = '\0'; /* one past */
    snprintf(json, sizeof json, "{\"v\":1,\"cmd\":\"PING\",\"cid\":\"%s\"}",
             cid);
    s_expect(json, KH_E_BAD_ENVELOPE, "cid", NULL);
}
END_TEST

START_TEST(fields_are_checked_per_command)
{
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":\"a\",\"from\":\"avim\"}",
             KH_E_BAD_ENVELOPE, "from", "a");
    s_expect("{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"referral\":{}}",
             KH_E_BAD_ENVELOPE, "idempotency_key", "a");
    s_expect("{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"idempotency_key\":"
             "\"has space\",\"referral\":{}}",
             KH_E_BAD_ENVELOPE, "idempotency_key", "a");
    s_expect("{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"idempotency_key\":"
             "\"k\",\"referral\":[]}",
             KH_E_BAD_ENVELOPE, "referral", "a");
    s_expect("{\"v\":1,\"cmd\":\"STATUS\",\"cid\":\"a\",\"referral_id\":"
             "\"6F1C2E1A-8A55-4B53-9C55-0A3F3F0F6F2B\"}",
             KH_E_BAD_ENVELOPE, "referral_id", "a");
    s_expect("{\"v\":1,\"cmd\":\"STATUS\",\"cid\":\"a\",\"referral_id\":"
             "\"" S_UUID "\",\"referral\":{}}",
             KH_E_BAD_ENVELOPE, "referral", "a");

    char key[KH_IDEM_KEY_MAX + 2], json[512];
    memset(key, 'k', sizeof key);
    key[KH_IDEM_KEY_MAX] = '\0';
    snprintf(json, sizeof json,
             "{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"idempotency_key\":"
             "\"%s\",\"referral\":{}}",
             key);
    s_expect(json, KH_E_OK, "", "a");
    key[KH_IDEM_KEY_MAX] = 'k';
    key[KH_IDEM_KEY_MAX + 1] = '\0';
    snprintf(json, sizeof json,
             "{\"v\":1,\"cmd\":\"SUBMIT\",\"cid\":\"a\",\"idempotency_key\":"
             "\"%s\",\"referral\":{}}",
             key);
    s_expect(json, KH_E_BAD_ENVELOPE, "idempotency_key", "a");
}
END_TEST

START_TEST(delivery_commands_are_checked)
{
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\"}", KH_E_OK, "", "h");
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\",\"window\":1024}",
             KH_E_OK, "", "h");
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\",\"window\":0}",
             KH_E_BAD_ENVELOPE, "window", "h");
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\",\"window\":1025}",
             KH_E_BAD_ENVELOPE, "window", "h");
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\",\"window\":\"8\"}",
             KH_E_BAD_ENVELOPE, "window", "h");
    s_expect("{\"v\":1,\"cmd\":\"HELLO\",\"cid\":\"h\",\"window\":8.0}",
             KH_E_BAD_ENVELOPE, "window", "h");
    s_expect("{\"v\":1,\"cmd\":\"ACK\",\"cid\":\"a\",\"delivery_id\":"
             "\"6F1C2E1A-8A55-4B53-9C55-0A3F3F0F6F2B\"}",
             KH_E_BAD_ENVELOPE, "delivery_id", "a");
    s_expect("{\"v\":1,\"cmd\":\"ACK\",\"cid\":\"a\",\"delivery_id\":\"" S_UUID
             "\"}",
             KH_E_OK, "", "a");
    s_expect("{\"v\":1,\"cmd\":\"ACK\",\"cid\":\"a\"}", KH_E_BAD_ENVELOPE,
             "delivery_id", "a");
    s_expect("{\"v\":1,\"cmd\":\"ACK\",\"cid\":\"a\",\"delivery_id\":\"" S_UUID
             "\",\"reason\":\"retry\"}",
             KH_E_BAD_ENVELOPE, "reason", "a");
    s_expect("{\"v\":1,\"cmd\":\"NACK\",\"cid\":\"n\",\"delivery_id\":\"" S_UUID
             "\",\"reason\":\"permanent\"}",
             KH_E_OK, "", "n");
    s_expect("{\"v\":1,\"cmd\":\"NACK\",\"cid\":\"n\",\"delivery_id\":\"" S_UUID
             "\",\"reason\":\"retry\"}",
             KH_E_OK, "", "n");
    s_expect("{\"v\":1,\"cmd\":\"NACK\",\"cid\":\"n\",\"delivery_id\":\"" S_UUID
             "\",\"reason\":\"later\"}",
             KH_E_BAD_ENVELOPE, "reason", "n");
    s_expect("{\"v\":1,\"cmd\":\"NACK\",\"cid\":\"n\",\"delivery_id\":\"" S_UUID
             "\"}",
             KH_E_BAD_ENVELOPE, "reason", "n");
    s_expect("{\"v\":1,\"cmd\":\"NACK\",\"cid\":\"n\",\"delivery_id\":\"x\","
             "\"reason\":\"retry\"}",
             KH_E_BAD_ENVELOPE, "delivery_id", "n");
}
END_TEST

/* A frame that does not decode under version 1's rules (a bin value) is
 * refused for its version when its v is another integer, and left to the
 * decoder's refusal when it is 1 or no integer. */
START_TEST(other_version_is_told_by_the_frame_v)
{
    static const char v2[] = "\x82\xa1v\x02\xa2id\xc4\x01x";
    static const char v1[] = "\x82\xa1v\x01\xa2id\xc4\x01x";
    static const char vs[] = "\x82\xa1v\xa1\x32\xa2id\xc4\x01x";
    kh_error_t err;
    kh_error_clear(&err);
    ck_assert(kh_proto_other_version(v2, sizeof v2 - 1, &err));
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_VERSION);
    ck_assert_str_eq(err.path, "v");
    kh_error_set(&err, KH_E_UNSUPPORTED_TYPE, "id", "bin");
    ck_assert(!kh_proto_other_version(v1, sizeof v1 - 1, &err));
    ck_assert(!kh_proto_other_version(vs, sizeof vs - 1, &err));
    ck_assert(!kh_proto_other_version("\xc1", 1, &err));
    ck_assert_int_eq(err.code, KH_E_UNSUPPORTED_TYPE);
}
END_TEST

START_TEST(throttle_passes_once_per_interval_per_key)
{
    kh_throttle_t *throttle = kh_throttle_new(1000, 2);
    ck_assert_ptr_nonnull(throttle);
    ck_assert(kh_throttle_pass(throttle, "a", 0));
    ck_assert(!kh_throttle_pass(throttle, "a", 999));
    ck_assert(kh_throttle_pass(throttle, "b", 999));
    ck_assert(kh_throttle_pass(throttle, "a", 1000));
    ck_assert(!kh_throttle_pass(throttle, "a", 1500));
    /* A third key forgets the others: memory stays bounded. */
    ck_assert(kh_throttle_pass(throttle, "c", 1500));
    ck_assert(kh_throttle_pass(throttle, "a", 1500));
    kh_throttle_destroy(&throttle);
    ck_assert_ptr_null(throttle);
    kh_throttle_destroy(&throttle);
}
END_TEST

START_TEST(tally_tells_its_count_once_per_interval)
{
    kh_tally_t tally = {0};
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 5), 1); /* never told */
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 6), 0);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 1004), 0);
    /* The events since, this one included, and counting again. */
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 1005), 3);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 1500), 0);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 9000), 2);
}
END_TEST

START_TEST(ratelimit_refills_at_its_rate_up_to_the_burst)
{
    ck_assert_ptr_null(kh_ratelimit_new(0, 1, 10));
    ck_assert_ptr_null(kh_ratelimit_new(10, 0.5, 10));
    kh_ratelimit_t *limit = kh_ratelimit_new(10, 3, 2); /* 10/s, burst 3 */
    ck_assert_ptr_nonnull(limit);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(kh_ratelimit_take(limit, "a", 0), 0);
    /* Empty: the next token comes in 100 ms. */
    ck_assert_int_eq(kh_ratelimit_take(limit, "a", 0), 101);
    ck_assert_int_eq(kh_ratelimit_take(limit, "a", 50000), 51);
    ck_assert_int_eq(kh_ratelimit_take(limit, "a", 100000), 0);
    /* Another key has its own bucket. */
    ck_assert_int_eq(kh_ratelimit_take(limit, "b", 100000), 0);
    /* A long pause refills up to the burst, not beyond. */
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(kh_ratelimit_take(limit, "a", 60000000), 0);
    ck_assert_int_gt(kh_ratelimit_take(limit, "a", 60000000), 0);
    kh_ratelimit_destroy(&limit);
    ck_assert_ptr_null(limit);
}
END_TEST

/* Work counted after it was done: wait takes nothing; charge takes a
 * token even from an empty bucket, down to one burst below empty. */
START_TEST(ratelimit_charges_after_the_fact)
{
    kh_ratelimit_t *limit = kh_ratelimit_new(10, 3, 8); /* 10/s, burst 3 */
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 0), 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 0), 0);
    for (int i = 0; i < 3; i++)
        kh_ratelimit_charge(limit, "a", 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 0), 101);
    /* Overspent by two: 300 ms until a token, not 100. */
    kh_ratelimit_charge(limit, "a", 0);
    kh_ratelimit_charge(limit, "a", 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 0), 301);
    /* Never deeper than one burst below empty: 400 ms at most. */
    for (int i = 0; i < 100; i++)
        kh_ratelimit_charge(limit, "a", 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 0), 401);
    ck_assert_int_gt(kh_ratelimit_wait(limit, "a", 390000), 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "a", 401000), 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "b", 0), 0);
    /* A refund gives a token back, never beyond the burst. */
    for (int i = 0; i < 3; i++)
        kh_ratelimit_charge(limit, "b", 0);
    ck_assert_int_gt(kh_ratelimit_wait(limit, "b", 0), 0);
    kh_ratelimit_refund(limit, "b", 0);
    ck_assert_int_eq(kh_ratelimit_wait(limit, "b", 0), 0);
    for (int i = 0; i < 10; i++)
        kh_ratelimit_refund(limit, "b", 0);
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(kh_ratelimit_take(limit, "b", 0), 0);
    ck_assert_int_gt(kh_ratelimit_take(limit, "b", 0), 0);
    kh_ratelimit_destroy(&limit);
}
END_TEST

/* A message in a quoted logfmt value keeps the line one line, and its
 * quotes and backslashes do not end the value. */
START_TEST(log_quote_keeps_a_value_whole)
{
    char buf[32];
    ck_assert_str_eq(
        kh_log_quote("relation \"x\" does not exist", buf, sizeof buf),
        "relation \\\"x\\\" does not exist");
    ck_assert_str_eq(kh_log_quote("a\\b\nc\td", buf, sizeof buf), "a\\\\b?c?d");
    ck_assert_str_eq(kh_log_quote(NULL, buf, sizeof buf), "");
    /* Cut to fit, never half an escape. */
    char small[4];
    ck_assert_str_eq(kh_log_quote("ab\"c", small, sizeof small), "ab");
    ck_assert_str_eq(KH_LOG_Q("\"q\""), "\\\"q\\\"");
}
END_TEST

static uint32_t s_be32(const char *p)
{
    return (uint32_t) (unsigned char) p[0] << 24 |
           (uint32_t) (unsigned char) p[1] << 16 |
           (uint32_t) (unsigned char) p[2] << 8 |
           (uint32_t) (unsigned char) p[3];
}

START_TEST(pgarray_lays_out_array_recv_format)
{
    kh_pgarray_t array = {0};
    kh_pgarray_reset(&array, KH_PG_UUID);
    int len = 0;
    const char *data = kh_pgarray_data(&array, &len);
    /* Empty: no dimension, no flags, the element type. */
    ck_assert_ptr_nonnull(data);
    ck_assert_int_eq(len, 12);
    ck_assert_uint_eq(s_be32(data), 0);
    ck_assert_uint_eq(s_be32(data + 8), KH_PG_UUID);
    kh_pgarray_add_uuid(&array, "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5A6");
    kh_pgarray_add_uuid(&array, NULL);
    data = kh_pgarray_data(&array, &len);
    ck_assert_int_eq(len, 20 + 4 + 16 + 4);
    ck_assert_uint_eq(s_be32(data), 1);      /* one dimension */
    ck_assert_uint_eq(s_be32(data + 4), 1);  /* has a NULL */
    ck_assert_uint_eq(s_be32(data + 12), 2); /* two elements */
    ck_assert_uint_eq(s_be32(data + 16), 1); /* from index 1 */
    ck_assert_uint_eq(s_be32(data + 20), 16);
    static const unsigned char want[16] = {0x01, 0x92, 0xf3, 0xa4, 0x5b, 0x6c,
                                           0x7d, 0x8e, 0x9f, 0xa0, 0xb1, 0xc2,
                                           0xd3, 0xe4, 0xf5, 0xa6};
    ck_assert_mem_eq(data + 24, want, 16);
    ck_assert_uint_eq(s_be32(data + 40), UINT32_MAX); /* NULL: length -1 */
    /* Bytes as they are, the empty string included; growth past the first
     * allocation. */
    kh_pgarray_reset(&array, KH_PG_BYTEA);
    kh_pgarray_add(&array, "a\0b", 3);
    kh_pgarray_add_str(&array, "");
    for (int i = 0; i < 1000; i++)
        kh_pgarray_add_str(&array, "0123456789");
    data = kh_pgarray_data(&array, &len);
    ck_assert_int_eq(len, 20 + 7 + 4 + 1000 * 14);
    ck_assert_uint_eq(s_be32(data + 4), 0);
    ck_assert_uint_eq(s_be32(data + 8), KH_PG_BYTEA);
    ck_assert_uint_eq(s_be32(data + 12), 1002);
    ck_assert_mem_eq(data + 24, "a\0b", 3);
    ck_assert_uint_eq(s_be32(data + 27), 0);
    kh_pgarray_free(&array);
    ck_assert_ptr_null(array.data);
}
END_TEST

/* A malformed uuid fails the whole array: it is never sent half. */
START_TEST(pgarray_refuses_malformed_uuids)
{
    static const char *const bad[] = {
        "",
        "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a",   /* short */
        "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a67", /* long */
        "0192f3a4x5b6c-7d8e-9fa0-b1c2d3e4f5a6",  /* no hyphen */
        "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5g6",  /* not hex */
        "0192f3a45b6c7d8e9fa0b1c2d3e4f5a6",      /* no hyphens */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kh_pgarray_t array = {0};
        kh_pgarray_reset(&array, KH_PG_UUID);
        kh_pgarray_add_uuid(&array, "0192f3a4-5b6c-7d8e-9fa0-b1c2d3e4f5a6");
        kh_pgarray_add_uuid(&array, bad[i]);
        int len = 0;
        ck_assert_msg(kh_pgarray_data(&array, &len) == NULL, "accepted %s",
                      bad[i]);
        /* A reset makes it usable again. */
        kh_pgarray_reset(&array, KH_PG_UUID);
        ck_assert_ptr_nonnull(kh_pgarray_data(&array, &len));
        kh_pgarray_free(&array);
    }
    /* An add before the first reset (no element type) fails too. */
    kh_pgarray_t unset = {0};
    kh_pgarray_add_str(&unset, "x");
    int len = 0;
    ck_assert_ptr_null(kh_pgarray_data(&unset, &len));
    kh_pgarray_free(&unset);
}
END_TEST

/* A key a partner made up may hold personal data: paths show it as "?". */
START_TEST(paths_never_carry_made_up_keys)
{
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":\"a\",\"Jan de Vries "
             "1987\":1}",
             KH_E_BAD_ENVELOPE, "?", "a");
    s_expect("{\"v\":1,\"cmd\":\"PING\",\"cid\":\"a\",\"a\\u0001b\":1}",
             KH_E_BAD_ENVELOPE, "?", "a");
    char path[16] = "";
    kh_path_append_key(path, sizeof path, "referral", 8);
    kh_path_append_index(path, sizeof path, 12);
    kh_path_append_key(path, sizeof path, "\xc3\xa9t\xc3\xa9", 6);
    ck_assert_str_eq(path, "referral[12].?");
    kh_path_append_key(path, sizeof path, "truncated", 9);
    ck_assert_str_eq(path, "referral[12].?.");
    ck_assert(kh_path_is_identifier("subject_2", 9));
    ck_assert(!kh_path_is_identifier("2nd", 3));
    ck_assert(!kh_path_is_identifier("", 0));

    /* The decoder's paths too: a duplicate made-up key. */
    json_t *decoded = NULL;
    kh_error_t err;
    const char frame[] = "\x81\xa1r\x82\xa3"
                         "a b\x01\xa3"
                         "a b\x02";
    ck_assert_int_eq(
        kh_msgpack_decode(frame, sizeof frame - 1, NULL, &decoded, &err), -1);
    ck_assert_int_eq(err.code, KH_E_DUPLICATE_KEY);
    ck_assert_str_eq(err.path, "r.?");
}
END_TEST

static void s_trail(const kh_schema_t *schema, kh_errcode_t code,
                    const char *path, const char *expected)
{
    char out[KH_ERROR_PATH_MAX];
    kh_proto_trail_path(code, path, schema, out, sizeof out);
    ck_assert_msg(strcmp(out, expected) == 0, "%s %s: got %s, expected %s",
                  kh_error_name(code), path, out, expected);
}

/* An identifier-shaped key is the partner's choice too, and may be data:
 * the trail's paths keep only the envelope's and the referral's names. */
START_TEST(trail_paths_keep_only_the_contracts_names)
{
    kh_error_t err;
    kh_schema_t *schema =
        kh_schema_load(khtest_src("schemas/referral.v1.json"), &err);
    ck_assert_msg(schema != NULL, "%s", err.message);
    ck_assert(kh_schema_has_name(schema, "birth_date", 10));
    ck_assert(kh_schema_has_name(schema, "summary", 7));
    ck_assert(!kh_schema_has_name(schema, "summar", 6));
    ck_assert(!kh_schema_has_name(schema, "Fatima_Yilmaz", 13));
    ck_assert(!kh_schema_has_name(NULL, "summary", 7));

    /* What a refusal is about is never written, contract name or not. */
    s_trail(schema, KH_E_SCHEMA_UNKNOWN_FIELD,
            "referral.subject.Fatima_Yilmaz_12031985", "referral.subject.?");
    s_trail(schema, KH_E_SCHEMA_UNKNOWN_FIELD, "referral.subject.summary",
            "referral.subject.?");
    s_trail(schema, KH_E_DUPLICATE_KEY, "referral.subject.age",
            "referral.subject.?");
    s_trail(schema, KH_E_DUPLICATE_KEY, "Fatima", "?");
    /* Other refusals keep the contract's names, wherever they stand. */
    s_trail(schema, KH_E_SCHEMA_REQUIRED, "referral.subject.age",
            "referral.subject.age");
    s_trail(schema, KH_E_INVALID_UTF8, "referral.Fatima.age", "referral.?.age");
    s_trail(schema, KH_E_TOO_DEEP, "referral.indicators[2].Jan[0][13]",
            "referral.indicators[2].?[0][13]");
    s_trail(schema, KH_E_BAD_ENVELOPE, "Fatima_Yilmaz_12031985", "?");
    s_trail(schema, KH_E_BAD_ENVELOPE, "idempotency_key", "idempotency_key");
    s_trail(schema, KH_E_BAD_ENVELOPE, "window", "window");
    /* The envelope's names at the root, the referral's below it only. */
    s_trail(schema, KH_E_BAD_ENVELOPE, "summary", "?");
    s_trail(schema, KH_E_STRING_TOO_LONG, "referral.cid", "referral.?");
    s_trail(schema, KH_E_STRING_TOO_LONG, "payload.summary", "payload.?");
    s_trail(schema, KH_E_TOO_DEEP, "[0].referral", "[0].?");
    s_trail(NULL, KH_E_STRING_TOO_LONG, "referral.summary", "referral.?");
    /* Already hidden, empty, cut short. */
    s_trail(schema, KH_E_MALFORMED, "?.?", "?.?");
    s_trail(schema, KH_E_MALFORMED, "", "");
    s_trail(schema, KH_E_TOO_DEEP, "referral.indicators[1",
            "referral.indicators[1");
    s_trail(schema, KH_E_STRING_TOO_LONG, "referral.summ", "referral.?");
    char small[12];
    kh_proto_trail_path(KH_E_SCHEMA_REQUIRED, "referral.summary", schema, small,
                        sizeof small);
    ck_assert_str_eq(small, "referral.su");
    kh_schema_destroy(&schema);
}
END_TEST

START_TEST(rejected_carries_code_and_retry_hint)
{
    kh_error_t err;
    kh_error_set(&err, KH_E_SCHEMA_REQUIRED, "referral.summary", "missing");
    json_t *reply = kh_proto_rejected("c-1", &err, 500);
    ck_assert_str_eq(json_string_value(json_object_get(reply, "code")),
                     "schema.required");
    ck_assert_str_eq(json_string_value(json_object_get(reply, "path")),
                     "referral.summary");
    ck_assert(json_is_false(json_object_get(reply, "retryable")));
    ck_assert_ptr_null(json_object_get(reply, "retry_after_ms"));
    json_decref(reply);

    kh_error_set(&err, KH_E_UNAVAILABLE, "", "down");
    reply = kh_proto_rejected("c-2", &err, 500);
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    ck_assert_int_eq(
        json_integer_value(json_object_get(reply, "retry_after_ms")), 500);
    /* Our own replies pass our own check. */
    kh_cmd_t cmd;
    const char *cid;
    ck_assert_int_eq(kh_proto_check(reply, &cmd, &cid, &err), 0);
    ck_assert_int_eq(cmd, KH_CMD_REJECTED);
    json_decref(reply);
}
END_TEST

START_TEST(an_unreadable_file_becomes_a_bad_setting)
{
    kh_error_t err;
    kh_error_set(&err, KH_E_IO, "", "cannot open: No such file or directory");
    ck_assert_int_eq(
        kh_error_as_setting(&err, "KH_SCHEMA_DIR", "/etc/x/referral.v1.json"),
        -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, "KH_SCHEMA_DIR");
    ck_assert_str_eq(err.message, "/etc/x/referral.v1.json: cannot open: No "
                                  "such file or directory");
    /* A message that no longer fits is cut, never overrun. */
    char file[2 * KH_ERROR_MESSAGE_MAX];
    memset(file, 'f', sizeof file - 1);
    file[sizeof file - 1] = '\0';
    kh_error_as_setting(&err, "KH_RULES_FILE", file);
    ck_assert_uint_eq(strlen(err.message), KH_ERROR_MESSAGE_MAX - 1);
    ck_assert_str_eq(err.path, "KH_RULES_FILE");
    ck_assert_int_eq(kh_error_as_setting(NULL, "KH_RULES_FILE", "x"), -1);
}
END_TEST

START_TEST(uuids_are_v7_time_ordered_and_canonical)
{
    char id[37], prev[37] = "";
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned long long now = (unsigned long long) ts.tv_sec * 1000 +
                             (unsigned long long) ts.tv_nsec / 1000000;
    for (int i = 0; i < 100; i++) {
        kh_uuid_new(id);
        ck_assert(kh_uuid_valid(id));
        ck_assert_int_eq(id[14], '7');
        ck_assert(strchr("89ab", id[19]) != NULL);
        /* The first 48 bits are the time in ms: within a second of now. */
        char hex[13];
        memcpy(hex, id, 8);
        memcpy(hex + 8, id + 9, 4);
        hex[12] = '\0';
        unsigned long long ms = strtoull(hex, NULL, 16);
        ck_assert(ms + 1000 >= now && ms <= now + 1000);
        /* Ids a millisecond apart sort in the order they were made. */
        if (i % 10 == 0) {
            if (prev[0])
                ck_assert_int_lt(strcmp(prev, id), 0);
            memcpy(prev, id, sizeof id);
            struct timespec ms_wait = {0, 1100000};
            nanosleep(&ms_wait, NULL);
        }
    }
    ck_assert(!kh_uuid_valid("6f1c2e1a8a554b539c550a3f3f0f6f2b"));
    ck_assert(!kh_uuid_valid("6f1c2e1a-8a55-4b53-9c55-0a3f3f0f6f2"));
    ck_assert(!kh_uuid_valid("6f1c2e1a-8a55-4b53-9c55-0a3f3f0f6f2g"));
}
END_TEST

START_TEST(payload_hash_ignores_key_order_not_content)
{
    json_t *a = s_envelope("{\"b\":1,\"a\":\"\\u00e9\"}");
    json_t *b = s_envelope("{\"a\":\"\xc3\xa9\",\"b\":1}");
    json_t *c = s_envelope("{\"a\":\"e\",\"b\":1}");
    char ha[65], hb[65], hc[65];
    ck_assert_int_eq(kh_payload_hash(a, ha), 0);
    ck_assert_int_eq(kh_payload_hash(b, hb), 0);
    ck_assert_int_eq(kh_payload_hash(c, hc), 0);
    ck_assert_str_eq(ha, hb);
    ck_assert_str_ne(ha, hc);
    size_t len;
    char *text = kh_payload_canonical(b, &len);
    /* jansson writes \\u escapes with upper-case hex digits. */
    ck_assert_str_eq(text, "{\"a\":\"\\u00E9\",\"b\":1}");
    ck_assert_uint_eq(len, strlen(text));
    free(text);
    /* protocol.md's example of the canonical form (Canonical JSON). */
    json_t *d = s_envelope("{\"b\":1.0,\"a\":\"\\u00e9\\ud83d\\ude00/\"}");
    text = kh_payload_canonical(d, &len);
    ck_assert_str_eq(text, "{\"a\":\"\\u00E9\\uD83D\\uDE00/\",\"b\":1}");
    free(text);
    json_decref(d);
    text = kh_payload_canonical(b, &len);
    /* The hash is the SHA-256 of exactly the canonical bytes. */
    char again[65];
    kh_sha256_hex(text, len, again);
    ck_assert_str_eq(again, ha);
    /* kh_sha256 is SHA-256 (on SHA-NI where there is some) for every
     * length around the block boundaries and for payload sizes. */
    kh_sha256_hex("abc", 3, again);
    ck_assert_str_eq(again, "ba7816bf8f01cfea414140de5dae2223"
                            "b00361a396177a9cb410ff61f20015ad");
    unsigned char in[4096], fast[32], portable[32];
    for (size_t i = 0; i < sizeof in; i++)
        in[i] = (unsigned char) (i * 131 + 7);
    for (size_t n = 0; n <= sizeof in; n += n < 200 ? 1 : 97) {
        kh_sha256(in, n, fast);
        crypto_hash_sha256(portable, in, n);
        ck_assert_mem_eq(fast, portable, 32);
    }
    free(text);
    json_decref(a);
    json_decref(b);
    json_decref(c);
}
END_TEST

static void s_same_as_jansson(const json_t *v, const char *what)
{
    size_t len = 0;
    char *mine = kh_payload_canonical(v, &len);
    char *ref = khcanon_reference(v);
    ck_assert_msg(mine && ref, "%s: encoding failed", what);
    ck_assert_msg(strcmp(mine, ref) == 0, "%s:\n  mine %s\n  ref  %s", what,
                  mine, ref);
    ck_assert_uint_eq(len, strlen(ref));
    free(mine);
    free(ref);
}

/* A random string of code points of every kind: ASCII letters, the
 * characters JSON escapes, control characters, NUL, 2-, 3- and 4-byte
 * UTF-8 (beyond the BMP: surrogate pairs). */
static json_t *s_random_string(unsigned *seed)
{
    char buf[64];
    size_t n = 0;
    int count = rand_r(seed) % 8;
    for (int i = 0; i < count; i++) {
        unsigned kind = (unsigned) rand_r(seed) % 7;
        unsigned cp = kind == 0   ? 'a' + (unsigned) rand_r(seed) % 3
                      : kind == 1 ? (unsigned) "\"\\/ \x7f"[rand_r(seed) % 5]
                      : kind == 2 ? (unsigned) rand_r(seed) % 0x20
                      : kind == 3 ? 0x80 + (unsigned) rand_r(seed) % 0x780
                      : kind == 4 ? 0x800 + (unsigned) rand_r(seed) % 0xD000
                      : kind == 5
                          ? 0xE000 + (unsigned) rand_r(seed) % 0x2000
                          : 0x10000 + (unsigned) rand_r(seed) % 0x100000;
        if (cp < 0x80)
            buf[n++] = (char) cp;
        else if (cp < 0x800) {
            buf[n++] = (char) (0xC0 | (cp >> 6));
            buf[n++] = (char) (0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            buf[n++] = (char) (0xE0 | (cp >> 12));
            buf[n++] = (char) (0x80 | ((cp >> 6) & 0x3F));
            buf[n++] = (char) (0x80 | (cp & 0x3F));
        } else {
            buf[n++] = (char) (0xF0 | (cp >> 18));
            buf[n++] = (char) (0x80 | ((cp >> 12) & 0x3F));
            buf[n++] = (char) (0x80 | ((cp >> 6) & 0x3F));
            buf[n++] = (char) (0x80 | (cp & 0x3F));
        }
    }
    return json_stringn(buf, n);
}

static json_t *s_random_value(unsigned *seed, int depth)
{
    switch (rand_r(seed) % (depth > 3 ? 6 : 8)) {
    case 0:
        return json_null();
    case 1:
        return json_boolean(rand_r(seed) % 2);
    case 2: {
        static const json_int_t edge[] = {0, -1, 1, INT64_MIN, INT64_MAX};
        return json_integer(rand_r(seed) % 2 ? edge[rand_r(seed) % 5]
                                             : rand_r(seed) - RAND_MAX / 2);
    }
    case 3:
        return json_real((rand_r(seed) - RAND_MAX / 2) / 7.0);
    case 4:
    case 5:
        return s_random_string(seed);
    case 6: {
        json_t *a = json_array();
        for (int i = rand_r(seed) % 5; i > 0; i--)
            json_array_append_new(a, s_random_value(seed, depth + 1));
        return a;
    }
    default: {
        /* Keys sharing prefixes, and more keys than fit on the stack. */
        json_t *o = json_object();
        int count = rand_r(seed) % 8 == 0 ? 40 : rand_r(seed) % 6;
        for (int i = 0; i < count; i++) {
            json_t *key = s_random_string(seed);
            json_object_setn_new(o, json_string_value(key),
                                 json_string_length(key),
                                 s_random_value(seed, depth + 1));
            json_decref(key);
        }
        return o;
    }
    }
}

static int s_compare_file(const char *path, void *arg)
{
    (void) arg;
    json_error_t jerr;
    json_t *doc = json_load_file(path, JSON_ALLOW_NUL, &jerr);
    if (doc)
        s_same_as_jansson(doc, path);
    json_decref(doc);
    return doc != NULL;
}

START_TEST(canonical_json_is_jansson_byte_for_byte)
{
    /* Every example and every case of the invalid corpus (they are JSON,
     * only not valid referrals). */
    int files = 0;
    const char *dirs[] = {"schemas/examples", "schemas/invalid"};
    for (size_t d = 0; d < 2; d++) {
        char pattern[4096];
        snprintf(pattern, sizeof pattern, "%s", khtest_src(dirs[d]));
        zdir_t *dir = zdir_new(pattern, NULL);
        ck_assert_ptr_nonnull(dir);
        zlist_t *list = zdir_list(dir);
        for (zfile_t *f = zlist_first(list); f; f = zlist_next(list))
            if (strstr(zfile_filename(f, NULL), ".json"))
                files += s_compare_file(zfile_filename(f, NULL), NULL);
        zlist_destroy(&list);
        zdir_destroy(&dir);
    }
    ck_assert_int_ge(files, 60);
    /* And many random values. */
    unsigned seed = 20261129;
    for (int i = 0; i < 20000; i++) {
        json_t *v = s_random_value(&seed, 0);
        char what[32];
        snprintf(what, sizeof what, "random value %d", i);
        s_same_as_jansson(v, what);
        json_decref(v);
    }
    /* A whole number is written as an integer however it was encoded, so
     * that the hash does not depend on the client's encoder. */
    json_t *as_int = json_pack("{s:I, s:f}", "age", (json_int_t) 120, "x", 0.5);
    json_t *as_real = json_pack("{s:f, s:f}", "age", 120.0, "x", 0.5);
    json_t *neg_zero = json_pack("[f, f, f]", -0.0, 1e300, -2.5);
    char h1[65], h2[65];
    ck_assert_int_eq(kh_payload_hash(as_int, h1), 0);
    ck_assert_int_eq(kh_payload_hash(as_real, h2), 0);
    ck_assert_str_eq(h1, h2);
    size_t len;
    char *text = kh_payload_canonical(as_real, &len);
    ck_assert_str_eq(text, "{\"age\":120,\"x\":0.5}");
    free(text);
    text = kh_payload_canonical(neg_zero, &len);
    ck_assert_str_eq(text, "[0,1.0000000000000001e300,-2.5]"); /* jansson */
    free(text);
    json_decref(as_int);
    json_decref(as_real);
    json_decref(neg_zero);

    /* Not well-formed UTF-8 (a string made without jansson's check) is
     * refused, not written. */
    json_t *bad = json_string_nocheck("a\xc3");
    ck_assert_ptr_null(kh_payload_canonical(bad, NULL));
    json_decref(bad);
}
END_TEST

static kh_cfg_t s_table[] = {
    KH_CFG("KH_T_NAME", KH_CFG_STRING, NULL, 0, 0, false, "a name"),
    KH_CFG("KH_T_COUNT", KH_CFG_INT, "10", 1, 100, false, "a count"),
    KH_CFG("KH_T_FLAG", KH_CFG_BOOL, "false", 0, 0, false, "a flag"),
};
#define S_COUNT (sizeof s_table / sizeof s_table[0])

static void s_config_expect(const char *name, const char *count,
                            const char *flag, const char *bad_variable)
{
    setenv("KH_T_NAME", name, 1);
    setenv("KH_T_COUNT", count, 1);
    setenv("KH_T_FLAG", flag, 1);
    kh_error_t err;
    kh_error_clear(&err);
    int rc = kh_config_load(s_table, S_COUNT, &err);
    if (!bad_variable)
        ck_assert_msg(rc == 0, "%s", err.message);
    else {
        ck_assert_int_eq(rc, -1);
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        ck_assert_str_eq(err.path, bad_variable);
        ck_assert_ptr_nonnull(strstr(err.message, bad_variable));
    }
}

START_TEST(config_is_validated_as_a_whole)
{
    s_config_expect("x", "", "", NULL); /* empty = default */
    ck_assert_int_eq(kh_config_get(s_table, S_COUNT, "KH_T_COUNT")->num, 10);
    ck_assert_int_eq(kh_config_get(s_table, S_COUNT, "KH_T_FLAG")->num, 0);
    s_config_expect("x", "1", "yes", NULL);
    ck_assert_int_eq(kh_config_get(s_table, S_COUNT, "KH_T_COUNT")->num, 1);
    ck_assert_int_eq(kh_config_get(s_table, S_COUNT, "KH_T_FLAG")->num, 1);
    s_config_expect("x", "100", "off", NULL);
    s_config_expect("", "10", "on", "KH_T_NAME"); /* required */
    s_config_expect("x", "0", "on", "KH_T_COUNT");
    s_config_expect("x", "101", "on", "KH_T_COUNT");
    s_config_expect("x", "12abc", "on", "KH_T_COUNT");
    s_config_expect("x", " 12", "on", "KH_T_COUNT");
    s_config_expect("x", "+12", "on", "KH_T_COUNT");
    s_config_expect("x", "12 ", "on", "KH_T_COUNT");
    s_config_expect("x", "99999999999999999999999", "on", "KH_T_COUNT");
    s_config_expect("x", "10", "maybe", "KH_T_FLAG");
    ck_assert_ptr_null(kh_config_get(s_table, S_COUNT, "KH_T_NONE"));
}
END_TEST

/* An endpoint that is bound must be one; one that a wake-up is sent to
 * may be none. Only the second's error offers none. */
START_TEST(only_a_wakeup_endpoint_may_be_none)
{
    kh_cfg_t table[] = {
        KH_CFG("KH_T_BOUND", KH_CFG_ENDPOINT, "tcp://*:1", 0, 0, false, "b"),
        KH_CFG("KH_T_WAKE", KH_CFG_ENDPOINT_OR_NONE, "none", 0, 0, false, "w"),
    };
    kh_error_t err;
    setenv("KH_T_BOUND", "tcp://127.0.0.1:7701", 1);
    setenv("KH_T_WAKE", "none", 1);
    ck_assert_int_eq(kh_config_load(table, 2, &err), 0);
    setenv("KH_T_WAKE", "tcp://127.0.0.1:0", 1);
    ck_assert_int_eq(kh_config_load(table, 2, &err), -1);
    ck_assert_str_eq(err.path, "KH_T_WAKE");
    ck_assert_ptr_nonnull(strstr(err.message, ", or none"));
    setenv("KH_T_WAKE", "none", 1);
    setenv("KH_T_BOUND", "none", 1);
    ck_assert_int_eq(kh_config_load(table, 2, &err), -1);
    ck_assert_str_eq(err.path, "KH_T_BOUND");
    ck_assert_ptr_null(strstr(err.message, "none"));
    unsetenv("KH_T_BOUND");
    unsetenv("KH_T_WAKE");
}
END_TEST

/* The waits while the database is away: 200 ms, doubling, at most 5 s. */
START_TEST(database_retries_wait_ever_longer_up_to_a_bound)
{
    int want[] = {200, 400, 800, 1600, 3200, 5000, 5000};
    int wait = 0;
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        wait = kh_db_retry_next(wait);
        ck_assert_int_eq(wait, want[i]);
    }
    ck_assert_int_eq(kh_db_retry_next(100), 200); /* intake's first */
    ck_assert_int_eq(kh_db_retry_next(4999), 5000);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("proto");
    TCase *tc = tcase_create("proto");
    tcase_add_test(tc, valid_envelopes_pass);
    tcase_add_test(tc, version_and_command_come_first);
    tcase_add_test(tc, cid_is_required_and_bounded);
    tcase_add_test(tc, fields_are_checked_per_command);
    tcase_add_test(tc, delivery_commands_are_checked);
    tcase_add_test(tc, other_version_is_told_by_the_frame_v);
    tcase_add_test(tc, throttle_passes_once_per_interval_per_key);
    tcase_add_test(tc, tally_tells_its_count_once_per_interval);
    tcase_add_test(tc, ratelimit_refills_at_its_rate_up_to_the_burst);
    tcase_add_test(tc, ratelimit_charges_after_the_fact);
    tcase_add_test(tc, log_quote_keeps_a_value_whole);
    tcase_add_test(tc, pgarray_lays_out_array_recv_format);
    tcase_add_test(tc, pgarray_refuses_malformed_uuids);
    tcase_add_test(tc, paths_never_carry_made_up_keys);
    tcase_add_test(tc, trail_paths_keep_only_the_contracts_names);
    tcase_add_test(tc, rejected_carries_code_and_retry_hint);
    tcase_add_test(tc, an_unreadable_file_becomes_a_bad_setting);
    tcase_add_test(tc, uuids_are_v7_time_ordered_and_canonical);
    tcase_add_test(tc, payload_hash_ignores_key_order_not_content);
    tcase_add_test(tc, canonical_json_is_jansson_byte_for_byte);
    tcase_add_test(tc, config_is_validated_as_a_whole);
    tcase_add_test(tc, only_a_wakeup_endpoint_may_be_none);
    tcase_add_test(tc, database_retries_wait_ever_longer_up_to_a_bound);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
