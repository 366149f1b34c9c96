/*
 * The partner protocol's envelopes (schemas/protocol.md): building replies
 * and checking requests. An envelope is a jansson object once decoded by
 * the codec; these helpers check its common fields and each command's own.
 */
#ifndef KH_PROTO_H_INCLUDED
#define KH_PROTO_H_INCLUDED

#include <jansson.h>

#include "ketenhub/error.h"
#include "ketenhub/schema.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KH_PROTO_VERSION 1
#define KH_CID_MAX 64
#define KH_WINDOW_MAX 1024 /* HELLO window */
#define KH_IDEM_KEY_MAX 128
/* The largest payload of a DELIVER in bytes (protocol.md): a projection
 * of a referral's canonical JSON, which the referral schema bounds well
 * below it (every string has a maxLength, every array a maxItems, and no
 * object takes keys of its own: about 10,400 characters with the keys,
 * 12 bytes each at most once escaped, some 125 KB). */
#define KH_PAYLOAD_MAX (1024 * 1024)

typedef enum {
    KH_CMD_SUBMIT,
    KH_CMD_STATUS,
    KH_CMD_PING,
    KH_CMD_ACCEPTED,
    KH_CMD_REJECTED,
    KH_CMD_STATUS_REPLY,
    KH_CMD_PONG,
    /* Deliveries (the notification service): */
    KH_CMD_HELLO,
    KH_CMD_WELCOME,
    KH_CMD_DELIVER,
    KH_CMD_ACK,
    KH_CMD_ACKED,
    KH_CMD_NACK,
    KH_CMD_NACKED,
    KH_CMD_UNKNOWN_
} kh_cmd_t;

/* The wire name of a command ("SUBMIT"). */
const char *kh_cmd_name(kh_cmd_t cmd);

/* Whether key is a valid idempotency key: 1 to KH_IDEM_KEY_MAX bytes of
 * A-Z a-z 0-9 . _ : - (a client checks it before sending). */
bool kh_proto_idem_key_valid(const char *key);

/* Check the common fields of an envelope and the fields of its command.
 * On success returns 0, *cmd and *cid (borrowed from msg). On failure
 * returns -1 with err (unknown_version, unknown_command, bad_envelope and
 * the path); *cid is still set when the envelope had a usable cid, so the
 * refusal can be correlated, else it is NULL. */
int kh_proto_check(const json_t *msg, kh_cmd_t *cmd, const char **cid,
                   kh_error_t *err);

/* For a frame that kh_msgpack_decode refused: v is checked before
 * anything else, so a map whose v is an integer other than this version's
 * (a frame of another version, which version 1's rules may not decode) is
 * refused for its version, not its content. Returns whether it is such a
 * frame, and then sets err (unknown_version, path v) as kh_proto_check
 * would. */
bool kh_proto_other_version(const void *frame, size_t size, kh_error_t *err);

/* The path of a refusal (code, path from the envelope's root, as in the
 * REJECTED reply) as the audit trail and the logs may hold it: the reply
 * names the partner's own keys, which are the partner's data to choose
 * (an identifier-shaped "Fatima_Yilmaz_12031985" is a name and a birth
 * date), while the trail can never be purged (promise 6). So only names of
 * the contract are kept: at the root, the envelope's fields (of any
 * command); below "referral", the names of referral_schema (NULL: none).
 * Every other key becomes "?", and so does the last key of a
 * schema.unknown_field or duplicate_key refusal, the name the refusal is
 * about, whatever it is: "referral.subject.Fatima_Yilmaz_12031985" is
 * written "referral.subject.?". Indices are kept. The result is never
 * longer than path, so KH_ERROR_PATH_MAX bytes of out always suffice. */
void kh_proto_trail_path(kh_errcode_t code, const char *path,
                         const kh_schema_t *referral_schema, char *out,
                         size_t size);

/* A new envelope {"v":1,"cmd":...,"cid":...}; NULL on allocation failure.
 * cid NULL is sent as "". */
json_t *kh_proto_new(kh_cmd_t cmd, const char *cid);

/* A REJECTED envelope from an error; retry_after_ms is used when the code
 * is retryable. */
json_t *kh_proto_rejected(const char *cid, const kh_error_t *err,
                          int retry_after_ms);

/* Whether s is a canonical lower-case UUID (8-4-4-4-12 hex). */
bool kh_uuid_valid(const char *s);

/* A new time-ordered (version 7) UUID as 36 characters plus NUL: the
 * creation time in milliseconds, then 74 random bits. */
void kh_uuid_new(char out[37]);

/* The canonical JSON of value: compact, keys sorted, non-ASCII escaped,
 * so equal referrals have equal bytes however they were encoded on the
 * wire. This is what the hub stores and hashes. A new string (free it) and
 * its length in *len (may be NULL); NULL on allocation failure. */
char *kh_payload_canonical(const json_t *value, size_t *len);

/* The SHA-256 of data[0..len) into out (32 bytes). */
void kh_sha256(const void *data, size_t len, unsigned char out[32]);

/* Lower-case hex of the SHA-256 of data[0..len) into out (65 bytes). */
void kh_sha256_hex(const void *data, size_t len, char out[65]);

/* kh_sha256_hex of value's canonical JSON. Returns -1 on allocation
 * failure. */
int kh_payload_hash(const json_t *value, char out[65]);

#ifdef __cplusplus
}
#endif
#endif
