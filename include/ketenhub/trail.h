/*
 * The sealed audit trail: the canonical encoding of an event, the hash
 * chain over events in seq order, signed checkpoints, the audit key pair,
 * and a streaming verifier that names the first sequence number where the
 * trail was altered, has lost or gained an event, was reordered or
 * truncated, or carries a bad signature. schemas/audit.md is the written
 * contract; this is its implementation.
 *
 * The database side (reading the trail with COPY, sealing, recording an
 * auditor's access) is in trail_db.h; the export file in trail_file.h.
 */
#ifndef KH_TRAIL_H_INCLUDED
#define KH_TRAIL_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KH_TRAIL_HASH_SIZE 32
#define KH_TRAIL_PUBLIC_KEY_SIZE 32
#define KH_TRAIL_SECRET_KEY_SIZE 64
#define KH_TRAIL_SIGNATURE_SIZE 64

/* A field value as it is stored: bytes and a length, len -1 for NULL.
 * Text is UTF-8; referral_id and delivery_id are 16 raw bytes; the
 * payload hash is 32 raw bytes. Not NUL-terminated. */
typedef struct {
    const char *ptr;
    int len;
} kh_trail_bytes_t;

/* The fields of audit_events, in canonical order after seq and at. */
typedef enum {
    KH_TRAIL_ACTOR_KIND,
    KH_TRAIL_ACTOR_ID,
    KH_TRAIL_ACTION,
    KH_TRAIL_REFERRAL_ID,
    KH_TRAIL_DELIVERY_ID,
    KH_TRAIL_PARTNER_ID,
    KH_TRAIL_OUTCOME,
    KH_TRAIL_REASON_CODE,
    KH_TRAIL_REASON_PATH,
    KH_TRAIL_PAYLOAD_HASH,
    KH_TRAIL_RULES_VERSION,
    KH_TRAIL_ORIGIN_SERVICE,
    KH_TRAIL_ORIGIN_PEER,
    KH_TRAIL_RULES_MATCHED,
    KH_TRAIL_QUERY_FILTER,
    KH_TRAIL_FIELD_COUNT
} kh_trail_field_t;

/* One event. Borrowed: the bytes belong to whoever filled it. */
typedef struct {
    int64_t seq;
    int64_t at_us; /* microseconds since 1970-01-01T00:00:00Z */
    kh_trail_bytes_t f[KH_TRAIL_FIELD_COUNT];
} kh_trail_event_t;

/* A checkpoint as stored in audit_checkpoints. */
typedef struct {
    int64_t seq;
    int64_t at_us;
    unsigned char head[KH_TRAIL_HASH_SIZE];
    unsigned char public_key[KH_TRAIL_PUBLIC_KEY_SIZE];
    unsigned char signature[KH_TRAIL_SIGNATURE_SIZE];
} kh_trail_checkpoint_t;

/* Column name of a field ("actor_kind"), and whether it is 16-byte uuid
 * (1), 32-byte hash (2) or text (0). */
const char *kh_trail_field_name(kh_trail_field_t field);
int kh_trail_field_kind(kh_trail_field_t field);

/* Whether action is in the closed list of actions (migration 004). */
bool kh_trail_action_known(const char *action);

/* The closed list, NULL-terminated. */
extern const char *const kh_trail_actions[];

/* Canonical encoding of ev into out (size bytes). Returns its length, or
 * -1 when it does not fit (every field is at most 4096 bytes in the
 * database, so 64 KiB always fits). */
long kh_trail_encode(const kh_trail_event_t *ev, unsigned char *out,
                     size_t size);

/* next = SHA-256(prev || canonical(ev)). prev is 32 zero bytes before the
 * first event. Returns 0, or -1 when ev cannot be encoded. */
int kh_trail_chain(const unsigned char prev[KH_TRAIL_HASH_SIZE],
                   const kh_trail_event_t *ev,
                   unsigned char next[KH_TRAIL_HASH_SIZE]);

/* SHA-256 of in[0..len) into out: with the processor's SHA extensions
 * where there are any, else (and always with portable) libsodium's. */
void kh_trail_sha256(unsigned char out[32], const unsigned char *in, size_t len,
                     bool portable);

/* The signed message of a checkpoint (schemas/audit.md). */
#define KH_TRAIL_CHECKPOINT_MESSAGE_SIZE (22 + 8 + 8 + KH_TRAIL_HASH_SIZE)
void kh_trail_checkpoint_message(
    const kh_trail_checkpoint_t *cp,
    unsigned char out[KH_TRAIL_CHECKPOINT_MESSAGE_SIZE]);

/* Fill cp->public_key and cp->signature from secret_key (libsodium's
 * 64-byte Ed25519 secret key, which holds the public key). */
void kh_trail_checkpoint_sign(kh_trail_checkpoint_t *cp,
                              const unsigned char *secret_key);

/* Whether cp's signature is valid for public_key and was made by it. */
bool kh_trail_checkpoint_valid(const kh_trail_checkpoint_t *cp,
                               const unsigned char *public_key);

int kh_trail_load_secret(const char *path,
                         unsigned char out[KH_TRAIL_SECRET_KEY_SIZE],
                         kh_error_t *err);
int kh_trail_load_public(const char *path,
                         unsigned char out[KH_TRAIL_PUBLIC_KEY_SIZE],
                         kh_error_t *err);

/* The audit public keys an auditor trusts, in the order the audit service
 * used them: oldest first, the current one last. After `audit keygen
 * --force` the trail holds checkpoints signed by each key in turn; a
 * checkpoint signed by a key that an earlier checkpoint's key replaced is
 * refused, so that a replaced (perhaps leaked) key cannot sign the
 * trail's future. */
#define KH_TRAIL_MAX_KEYS 64
typedef struct {
    size_t count;
    unsigned char key[KH_TRAIL_MAX_KEYS][KH_TRAIL_PUBLIC_KEY_SIZE];
} kh_trail_keys_t;

/* Make an audit key pair. The secret file holds 128 hex digits (mode
 * 0600); the public file (0644) the keys of kept (NULL: none), oldest
 * first, then the new one, 64 hex digits a line; each line ends with a
 * newline. Existing files are replaced only when force. Each file is
 * written whole or not at all, the public one first: a failure leaves
 * both as they were, or (the secret file failed) the public one listing
 * the new key after the ones that still sign. 0, or -1 with err. */
int kh_trail_keygen(const char *secret_path, const char *public_path,
                    const kh_trail_keys_t *kept, bool force, kh_error_t *err);

/* Append the keys of a public key file (one key of 64 hex digits a line,
 * oldest first; blank lines are skipped) to keys. Keys already in keys
 * may be given again, in their order there, and new ones after the
 * newest of them (an old key file, then the file of a rotation that
 * holds its key too). A file without a key, a line that is no key, a key
 * twice in the file or out of that order, or more than KH_TRAIL_MAX_KEYS
 * keys in all: -1 with err (KH_E_CONFIG, path the file). */
int kh_trail_load_public_keys(const char *path, kh_trail_keys_t *keys,
                              kh_error_t *err);

/* The index in keys of the key that validly signed cp, or -1 when none
 * did. */
int kh_trail_keys_signer(const kh_trail_keys_t *keys,
                         const kh_trail_checkpoint_t *cp);

/* Lower-case hex of n bytes into out (2n + 1 bytes). */
void kh_trail_hex(const unsigned char *bytes, size_t n, char *out);
/* Parse exactly 2n hex digits; 0 or -1. */
int kh_trail_unhex(const char *hex, unsigned char *out, size_t n);

/* UTC time as "YYYY-MM-DDTHH:MM:SS.ffffffZ" (28 bytes with the NUL), and
 * back (-1 when malformed). */
void kh_trail_format_time(int64_t at_us, char out[28]);
int kh_trail_parse_time(const char *text, int64_t *at_us);

/* ------------------------------------------------------------------ */
/* Verification. Feed the merged stream of events and seals in seq order;
 * the verifier stops judging at the first finding but keeps looking
 * ahead to tell a reordering from an alteration. */

typedef enum {
    KH_TRAIL_OK,
    KH_TRAIL_ALTERED,       /* event changed: it no longer hashes to its seal */
    KH_TRAIL_MISSING,       /* sealed event removed (with its seal: or
                             * the next event altered, across a gap) */
    KH_TRAIL_INSERTED,      /* event without seal below the sealed head */
    KH_TRAIL_REORDERED,     /* sealed event found at another seq */
    KH_TRAIL_TRUNCATED,     /* the tail after a checkpoint is gone */
    KH_TRAIL_BAD_SIGNATURE, /* checkpoint signature invalid or wrong key */
    KH_TRAIL_CHECKPOINT_MISMATCH, /* signed head differs from the chain */
    KH_TRAIL_KIND_COUNT
} kh_trail_finding_t;

/* Stable name ("altered", "truncated", ...) of a finding. */
const char *kh_trail_finding_name(kh_trail_finding_t kind);

typedef struct {
    kh_trail_finding_t kind;
    int64_t seq;       /* first sequence number where it is (or, for
                        * an event gone with its seal, may be) wrong */
    int64_t other_seq; /* reordered: where the event is now; truncated:
                        * the checkpoint it follows (0: none) */
    char detail[384];  /* one line for people */
    /* Counts of what was checked. */
    int64_t events;      /* events read */
    int64_t sealed;      /* events whose seal matched */
    int64_t unsealed;    /* events above the sealed head (not yet sealed) */
    int64_t checkpoints; /* checkpoints whose signature and head held */
    int64_t first_seq, last_seq; /* range of events read */
    int64_t signed_seq;          /* last seq covered by a valid checkpoint */
    int streams; /* kh_trail_db_verify: the streams that read the trail on
                  * the fast path (1 or 2), 0 when the full pass judged */
} kh_trail_report_t;

typedef struct kh_trail_verifier_t kh_trail_verifier_t;

/* A verifier for checkpoints signed by public_key. It starts at the
 * genesis (anchor NULL) or after a trusted checkpoint anchor (its
 * signature is checked like any other). Returns NULL when out of memory. */
kh_trail_verifier_t *kh_trail_verifier_new(const unsigned char *public_key,
                                           const kh_trail_checkpoint_t *anchor);
/* The same for checkpoints signed by any of keys, in their order (see
 * kh_trail_keys_t): in seq order, a checkpoint signed by a key earlier in
 * the list than an earlier checkpoint's is a bad signature. keys is
 * copied. */
kh_trail_verifier_t *
kh_trail_verifier_new_keys(const kh_trail_keys_t *keys,
                           const kh_trail_checkpoint_t *anchor);
void kh_trail_verifier_destroy(kh_trail_verifier_t **self_p);

/* Give every checkpoint before the first event, in any order. Published
 * checkpoints (from a file kept outside the database) are given with
 * published = true: each must also be given without it (the database's
 * or the export's own list), or the chain reaching its seq finds it
 * missing; and events up to its seq must exist. An event at a seq at or
 * below 0, which the sequence never hands out, is found inserted. */
int kh_trail_verifier_checkpoint(kh_trail_verifier_t *self,
                                 const kh_trail_checkpoint_t *cp,
                                 bool published);

/* Feed the next seq in ascending order: the event (NULL if there is no
 * row) and its seal (NULL if none). The event's bytes need only live
 * for the call. */
void kh_trail_verifier_feed(kh_trail_verifier_t *self, int64_t seq,
                            const kh_trail_event_t *ev,
                            const unsigned char *seal);

/* End of the stream: fill report (kind KH_TRAIL_OK when all is well) and
 * return 0 when all is well, 1 on a finding. */
int kh_trail_verifier_finish(kh_trail_verifier_t *self,
                             kh_trail_report_t *report);

#ifdef __cplusplus
}
#endif
#endif
