/*
 * ketenhub error record: what every fallible function in libketenhub fills
 * in for its caller. An error is a stable code (its name goes on the wire
 * and into the audit trail, so a released name never changes), the path of
 * the offending field (`subject.age`, empty when none applies), the line and
 * column in a text input where there is one (0 when not), and a short
 * lower-case message that says why, never which C function failed.
 */
#ifndef KH_ERROR_H_INCLUDED
#define KH_ERROR_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* X(enum suffix, wire name, retryable by the sender?) */
#define KH_ERROR_MAP(X)                                                        \
    X(OK, "ok", false)                                                         \
    /* envelope codec */                                                       \
    X(MALFORMED, "malformed", false)                                           \
    X(INTERRUPTED, "interrupted", false)                                       \
    X(TOO_LARGE, "too_large", false)                                           \
    X(TOO_DEEP, "too_deep", false)                                             \
    X(TOO_MANY, "too_many_elements", false)                                    \
    X(STRING_TOO_LONG, "string_too_long", false)                               \
    X(INVALID_UTF8, "invalid_utf8", false)                                     \
    X(DUPLICATE_KEY, "duplicate_key", false)                                   \
    X(UNSUPPORTED_TYPE, "unsupported_type", false)                             \
    /* protocol */                                                             \
    X(UNKNOWN_VERSION, "unknown_version", false)                               \
    X(UNKNOWN_COMMAND, "unknown_command", false)                               \
    X(BAD_ENVELOPE, "bad_envelope", false)                                     \
    X(UNKNOWN_PARTNER, "unknown_partner", false)                               \
    X(IDEMPOTENCY_CONFLICT, "idempotency_conflict", false)                     \
    X(NOT_FOUND, "not_found", false)                                           \
    X(UNAVAILABLE, "unavailable", true)                                        \
    X(THROTTLED, "throttled", true)                                            \
    X(TIMEOUT, "timeout", true)                                                \
    /* schema validation */                                                    \
    X(SCHEMA_TYPE, "schema.type", false)                                       \
    X(SCHEMA_REQUIRED, "schema.required", false)                               \
    X(SCHEMA_UNKNOWN_FIELD, "schema.unknown_field", false)                     \
    X(SCHEMA_ENUM, "schema.enum", false)                                       \
    X(SCHEMA_CONST, "schema.const", false)                                     \
    X(SCHEMA_RANGE, "schema.range", false)                                     \
    X(SCHEMA_LENGTH, "schema.length", false)                                   \
    X(SCHEMA_PATTERN, "schema.pattern", false)                                 \
    X(SCHEMA_FORMAT, "schema.format", false)                                   \
    X(SCHEMA_ITEMS, "schema.items", false)                                     \
    X(SCHEMA_UNIQUE, "schema.unique", false)                                   \
    X(SCHEMA_CONDITION, "schema.condition", false)                             \
    X(SCHEMA_INVALID, "schema.invalid", false)                                 \
    /* routing rules files (schemas/rules.md) */                               \
    X(RULES_SYNTAX, "rules.syntax", false)                                     \
    X(RULES_ENCODING, "rules.encoding", false)                                 \
    X(RULES_TOO_LARGE, "rules.too_large", false)                               \
    X(RULES_TOO_DEEP, "rules.too_deep", false)                                 \
    X(RULES_ALIAS, "rules.alias", false)                                       \
    X(RULES_VERSION, "rules.version", false)                                   \
    X(RULES_UNKNOWN_KEY, "rules.unknown_key", false)                           \
    X(RULES_DUPLICATE_KEY, "rules.duplicate_key", false)                       \
    X(RULES_DUPLICATE_NAME, "rules.duplicate_name", false)                     \
    X(RULES_UNKNOWN_FIELD, "rules.unknown_field", false)                       \
    X(RULES_TYPE, "rules.type", false)                                         \
    X(RULES_PROJECTION, "rules.projection", false)                             \
    X(RULES_NEVER_MATCHES, "rules.never_matches", false)                       \
    X(RULES_UNKNOWN_PARTNER, "rules.unknown_partner", false)                   \
    X(RULES_NO_CASES_PARTNER, "rules.no_cases_partner", false)                 \
    X(RULES_PARTNER_ABSENT, "rules.partner_absent", false)                     \
    X(RULES_ESCALATION, "rules.escalation", false)                             \
    /* local failures */                                                       \
    X(CONFIG, "config", false)                                                 \
    X(IO, "io", false)                                                         \
    X(DB, "db", false)                                                         \
    X(MIGRATION_CHANGED, "migration_changed", false)                           \
    X(CURVE, "curve", false)                                                   \
    X(TRAIL_BROKEN, "trail_broken", false)                                     \
    X(TRAIL_KEY_REPLACED, "trail_key_replaced", false)                         \
    X(NOMEM, "out_of_memory", true)                                            \
    X(INTERNAL, "internal", true)

typedef enum {
#define KH_X_(name, wire, retry) KH_E_##name,
    KH_ERROR_MAP(KH_X_)
#undef KH_X_
        KH_E_COUNT_
} kh_errcode_t;

#define KH_ERROR_PATH_MAX 256
#define KH_ERROR_MESSAGE_MAX 256

typedef struct {
    kh_errcode_t code;
    char path[KH_ERROR_PATH_MAX];       /* e.g. "subject.age", "" if none */
    int line;                           /* 1-based line in a text input, 0 */
    int column;                         /* 1-based column, 0 if unknown */
    char message[KH_ERROR_MESSAGE_MAX]; /* short, lower case, no data */
    char sqlstate[6]; /* a database error's SQLSTATE (kh_db_error), or "" */
} kh_error_t;

/* Reset an error record to KH_E_OK with empty path and message. */
void kh_error_clear(kh_error_t *err);

/* Fill err (if not NULL) and return -1, so callers can write
 * `return kh_error_set (err, KH_E_IO, "", "cannot open %s", path);`.
 * path may be NULL. The message is truncated to fit. */
int kh_error_set(kh_error_t *err, kh_errcode_t code, const char *path,
                 const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* As kh_error_set, with a line and column in a text input. */
int kh_error_set_at(kh_error_t *err, kh_errcode_t code, const char *path,
                    int line, int column, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* Make err a bad setting: a file named by setting (KH_SCHEMA_DIR, say)
 * that could not be read. The code becomes KH_E_CONFIG, the path the
 * setting, and the message is prefixed with file. err may be NULL, as
 * for kh_error_set. Returns -1. */
int kh_error_as_setting(kh_error_t *err, const char *setting, const char *file);

/* Field paths ("subject.age", "indicators[2]") are built only from these
 * helpers. A map key that is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*,
 * at most KH_PATH_KEY_MAX bytes) may carry data a partner put there, so it
 * is written as "?": a path never holds anything but ASCII names, indices
 * and dots, and is safe to send back to the partner. An identifier can be
 * data too ("Fatima_Yilmaz_12031985"): what goes into the audit trail or a
 * log keeps only the contract's names (kh_proto_trail_path). Appending
 * truncates at the buffer's end. */
#define KH_PATH_KEY_MAX 64
bool kh_path_is_identifier(const char *key, size_t len);
void kh_path_append_key(char *path, size_t size, const char *key, size_t len);
void kh_path_append_index(char *path, size_t size, size_t index);

/* Stable wire name of a code ("schema.required"); "unknown" if out of
 * range. */
const char *kh_error_name(kh_errcode_t code);

/* Code for a wire name, or -1 if the name is unknown. */
int kh_error_from_name(const char *name);

/* Whether a sender may retry the same request later and expect success. */
bool kh_error_retryable(kh_errcode_t code);

#ifdef __cplusplus
}
#endif
#endif
