/*
 * Envelope helpers for the partner protocol (schemas/protocol.md).
 */
#include "ketenhub/proto.h"

#include <sodium.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ketenhub/codec.h"
#include "ketenhub/trail.h"

static const char *s_cmd_names[] = {
    "SUBMIT",       "STATUS", "PING",  "ACCEPTED", "REJECTED",
    "STATUS_REPLY", "PONG",   "HELLO", "WELCOME",  "DELIVER",
    "ACK",          "ACKED",  "NACK",  "NACKED",   "UNKNOWN"};

const char *kh_cmd_name(kh_cmd_t cmd)
{
    if ((int) cmd < 0 || cmd > KH_CMD_UNKNOWN_)
        cmd = KH_CMD_UNKNOWN_;
    return s_cmd_names[cmd];
}

static kh_cmd_t s_cmd_from_name(const char *name)
{
    for (int i = 0; i < KH_CMD_UNKNOWN_; i++)
        if (strcmp(name, s_cmd_names[i]) == 0)
            return (kh_cmd_t) i;
    return KH_CMD_UNKNOWN_;
}

/* The fields each command may carry besides v, cmd and cid; NULL-ended. */
static const char *s_submit_fields[] = {"idempotency_key", "referral", NULL};
static const char *s_status_fields[] = {"referral_id", NULL};
static const char *s_none[] = {NULL};
static const char *s_accepted_fields[] = {"referral_id", "accepted_at",
                                          "duplicate", NULL};
static const char *s_rejected_fields[] = {
    "code", "path", "message", "retryable", "retry_after_ms", NULL};
static const char *s_status_reply_fields[] = {
    "referral_id", "state", "accepted_at", "deliveries", NULL};
static const char *s_hello_fields[] = {"window", NULL};
static const char *s_welcome_fields[] = {"partner", "window", NULL};
static const char *s_deliver_fields[] = {
    "delivery_id", "referral_id",    "priority",      "attempt", "routed_at",
    "payload",     "payload_sha256", "escalation_of", NULL};
static const char *s_ack_fields[] = {"delivery_id", NULL};
static const char *s_acked_fields[] = {"delivery_id", "duplicate", NULL};
static const char *s_nack_fields[] = {"delivery_id", "reason", NULL};
static const char *s_nacked_fields[] = {"delivery_id", "dead", NULL};

static const char **s_fields_of(kh_cmd_t cmd)
{
    switch (cmd) {
    case KH_CMD_SUBMIT:
        return s_submit_fields;
    case KH_CMD_STATUS:
        return s_status_fields;
    case KH_CMD_ACCEPTED:
        return s_accepted_fields;
    case KH_CMD_REJECTED:
        return s_rejected_fields;
    case KH_CMD_STATUS_REPLY:
        return s_status_reply_fields;
    case KH_CMD_HELLO:
        return s_hello_fields;
    case KH_CMD_WELCOME:
        return s_welcome_fields;
    case KH_CMD_DELIVER:
        return s_deliver_fields;
    case KH_CMD_ACK:
        return s_ack_fields;
    case KH_CMD_ACKED:
        return s_acked_fields;
    case KH_CMD_NACK:
        return s_nack_fields;
    case KH_CMD_NACKED:
        return s_nacked_fields;
    default:
        return s_none;
    }
}

bool kh_proto_idem_key_valid(const char *key)
{
    size_t len = strlen(key);
    if (len == 0 || len > KH_IDEM_KEY_MAX)
        return false;
    for (const char *c = key; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
              (*c >= '0' && *c <= '9') || *c == '.' || *c == '_' || *c == ':' ||
              *c == '-'))
            return false;
    return true;
}

/* The field called name must be a lower-case UUID string. */
static int s_check_uuid(const json_t *msg, const char *name, kh_error_t *err)
{
    const json_t *id = json_object_get(msg, name);
    if (!json_is_string(id) || !kh_uuid_valid(json_string_value(id)))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, name,
                            "%s is required and must be a lower-case UUID",
                            name);
    return 0;
}

static int s_check_command_fields(const json_t *msg, kh_cmd_t cmd,
                                  kh_error_t *err)
{
    if (cmd == KH_CMD_SUBMIT) {
        const json_t *key = json_object_get(msg, "idempotency_key");
        if (!json_is_string(key))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, "idempotency_key",
                                "idempotency_key is required and must be a "
                                "string");
        if (!kh_proto_idem_key_valid(json_string_value(key)))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, "idempotency_key",
                                "idempotency_key must be 1 to %d characters "
                                "of A-Z a-z 0-9 . _ : -",
                                KH_IDEM_KEY_MAX);
        if (!json_is_object(json_object_get(msg, "referral")))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, "referral",
                                "referral is required and must be a map");
    } else if (cmd == KH_CMD_STATUS) {
        return s_check_uuid(msg, "referral_id", err);
    } else if (cmd == KH_CMD_ACK || cmd == KH_CMD_NACK) {
        if (s_check_uuid(msg, "delivery_id", err))
            return -1;
        const char *reason = json_string_value(json_object_get(msg, "reason"));
        if (cmd == KH_CMD_NACK && (!reason || (strcmp(reason, "retry") &&
                                               strcmp(reason, "permanent"))))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, "reason",
                                "reason is required: retry or permanent");
    } else if (cmd == KH_CMD_HELLO) {
        const json_t *window = json_object_get(msg, "window");
        if (window &&
            (!json_is_integer(window) || json_integer_value(window) < 1 ||
             json_integer_value(window) > KH_WINDOW_MAX))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, "window",
                                "window must be an integer from 1 to %d",
                                KH_WINDOW_MAX);
    }
    return 0;
}

static int s_unknown_version(kh_error_t *err)
{
    return kh_error_set(err, KH_E_UNKNOWN_VERSION, "v",
                        "this hub speaks protocol version %d",
                        KH_PROTO_VERSION);
}

bool kh_proto_other_version(const void *frame, size_t size, kh_error_t *err)
{
    int64_t version;
    if (!kh_msgpack_peek_int(frame, size, "v", &version) ||
        version == KH_PROTO_VERSION)
        return false;
    s_unknown_version(err);
    return true;
}

int kh_proto_check(const json_t *msg, kh_cmd_t *cmd, const char **cid,
                   kh_error_t *err)
{
    *cid = NULL;
    *cmd = KH_CMD_UNKNOWN_;
    if (!json_is_object(msg))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "",
                            "the envelope must be a map");
    const json_t *cid_value = json_object_get(msg, "cid");
    if (json_is_string(cid_value) && json_string_length(cid_value) >= 1 &&
        json_string_length(cid_value) <= KH_CID_MAX)
        *cid = json_string_value(cid_value);

    const json_t *version = json_object_get(msg, "v");
    if (!json_is_integer(version))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "v",
                            "v is required and must be an integer");
    if (json_integer_value(version) != KH_PROTO_VERSION)
        return s_unknown_version(err);
    const json_t *name = json_object_get(msg, "cmd");
    if (!json_is_string(name))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "cmd",
                            "cmd is required and must be a string");
    *cmd = s_cmd_from_name(json_string_value(name));
    if (*cmd == KH_CMD_UNKNOWN_)
        return kh_error_set(err, KH_E_UNKNOWN_COMMAND, "cmd",
                            "unknown command");
    if (!*cid)
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "cid",
                            "cid is required: a string of 1 to %d bytes",
                            KH_CID_MAX);

    const char **allowed = s_fields_of(*cmd);
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *) msg, key, value)
    {
        if (!strcmp(key, "v") || !strcmp(key, "cmd") || !strcmp(key, "cid"))
            continue;
        bool known = false;
        for (const char **field = allowed; *field && !known; field++)
            known = strcmp(key, *field) == 0;
        if (!known) {
            char path[KH_ERROR_PATH_MAX] = "";
            kh_path_append_key(path, sizeof path, key, strlen(key));
            return kh_error_set(err, KH_E_BAD_ENVELOPE, path,
                                "unknown field for %s", kh_cmd_name(*cmd));
        }
    }
    return s_check_command_fields(msg, *cmd, err);
}

/* Whether name[0..len) is a field of the envelope of some command. */
static bool s_envelope_field(const char *name, size_t len)
{
    static const char *common[] = {"v", "cmd", "cid", NULL};
    for (int cmd = -1; cmd < KH_CMD_UNKNOWN_; cmd++)
        for (const char **f = cmd < 0 ? common : s_fields_of((kh_cmd_t) cmd);
             *f; f++)
            if (strlen(*f) == len && memcmp(*f, name, len) == 0)
                return true;
    return false;
}

/* Append sep and text[0..len) to out (used bytes of size), truncated. */
static void s_append(char *out, size_t size, size_t *used, const char *sep,
                     const char *text, size_t len)
{
    int n = snprintf(out + *used, size - *used, "%s%.*s", sep, (int) len, text);
    if (n > 0)
        *used += (size_t) n < size - *used ? (size_t) n : size - *used - 1;
}

void kh_proto_trail_path(kh_errcode_t code, const char *path,
                         const kh_schema_t *referral_schema, char *out,
                         size_t size)
{
    if (!size)
        return;
    out[0] = '\0';
    /* These refusals are about a name the contract does not have there. */
    bool names_last =
        code == KH_E_SCHEMA_UNKNOWN_FIELD || code == KH_E_DUPLICATE_KEY;
    bool root = true;         /* the next key is one of the envelope's */
    bool in_referral = false; /* below the envelope's referral */
    size_t used = 0;
    const char *p = path ? path : "";
    while (*p) {
        if (*p == '.') {
            p++;
            continue;
        }
        size_t len;
        if (*p == '[') { /* an index, kept as it is */
            len = 1 + strspn(p + 1, "0123456789");
            if (p[len] == ']')
                len++;
            s_append(out, size, &used, "", p, len);
            root = false;
            p += len;
            continue;
        }
        len = strcspn(p, ".[");
        bool keep = !(names_last && p[len] == '\0');
        if (keep && root)
            keep = s_envelope_field(p, len);
        else if (keep)
            keep = in_referral && kh_schema_has_name(referral_schema, p, len);
        if (root)
            in_referral = keep && len == 8 && memcmp(p, "referral", 8) == 0;
        root = false;
        s_append(out, size, &used, used ? "." : "", keep ? p : "?",
                 keep ? len : 1);
        p += len;
    }
}

json_t *kh_proto_new(kh_cmd_t cmd, const char *cid)
{
    return json_pack("{s:i, s:s, s:s}", "v", KH_PROTO_VERSION, "cmd",
                     kh_cmd_name(cmd), "cid", cid ? cid : "");
}

json_t *kh_proto_rejected(const char *cid, const kh_error_t *err,
                          int retry_after_ms)
{
    json_t *msg = kh_proto_new(KH_CMD_REJECTED, cid);
    if (!msg)
        return NULL;
    bool retryable = kh_error_retryable(err->code);
    json_object_set_new(msg, "code", json_string(kh_error_name(err->code)));
    json_object_set_new(msg, "path", json_string(err->path));
    json_object_set_new(msg, "message", json_string(err->message));
    json_object_set_new(msg, "retryable", json_boolean(retryable));
    if (retryable)
        json_object_set_new(msg, "retry_after_ms",
                            json_integer(retry_after_ms));
    return msg;
}

bool kh_uuid_valid(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (int i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-'
                 : !((s[i] >= '0' && s[i] <= '9') ||
                     (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    }
    return true;
}

void kh_uuid_new(char out[37])
{
    unsigned char b[16];
    if (sodium_init() < 0) /* idempotent; -1 only without a random source */
        memset(b, 0, sizeof b);
    randombytes_buf(b, sizeof b);
    /* Version 7 (RFC 9562): the Unix time in milliseconds, big-endian, in
     * the first 48 bits, then 74 random bits. Ids made one after another
     * sort one after another, so the indexes they key take new entries at
     * their right edge instead of on pages all over the tree. */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ms = (uint64_t) ts.tv_sec * 1000 + (uint64_t) ts.tv_nsec / 1000000;
    for (int i = 0; i < 6; i++)
        b[i] = (unsigned char) (ms >> (40 - 8 * i));
    b[6] = (unsigned char) ((b[6] & 0x0f) | 0x70);
    b[8] = (unsigned char) ((b[8] & 0x3f) | 0x80);
    static const char hex[] = "0123456789abcdef";
    char *o = out;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[b[i] >> 4];
        *o++ = hex[b[i] & 15];
    }
    *o = '\0';
}

/* The trail's SHA-256 (trail_sha256.c): on the processor's SHA extensions
 * where it has them, about four times as fast as libsodium's portable code,
 * which it falls back to. With libsodium alone, hashing the projections
 * took a third of routing's own CPU. */
void kh_sha256(const void *data, size_t len, unsigned char out[32])
{
    kh_trail_sha256(out, data, len, false);
}

void kh_sha256_hex(const void *data, size_t len, char out[65])
{
    unsigned char digest[crypto_hash_sha256_BYTES];
    kh_sha256(data, len, digest);
    sodium_bin2hex(out, 65, digest, sizeof digest);
}

int kh_payload_hash(const json_t *value, char out[65])
{
    size_t len = 0;
    char *canonical = kh_payload_canonical(value, &len);
    if (!canonical)
        return -1;
    kh_sha256_hex(canonical, len, out);
    free(canonical);
    return 0;
}
