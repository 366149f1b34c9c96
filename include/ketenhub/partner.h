/*
 * Partner registry: the organisations whose systems may connect to the
 * hub, each identified by its CURVE key (promise 4: identity from keys).
 * The rows live in the partners table and the keys, the current one and
 * those it replaced, in partner_keys; the public certificates live as
 * files <id>.cert (and, while a rotation's overlap lasts,
 * <id>.previous.cert) in the partner certificate directory, which the ZAP
 * handler reads to decide who may connect at all. The secret half of a
 * partner's certificate is written once, for the partner, and never kept
 * by the hub.
 *
 * Registration functions work inside the caller's transaction when there
 * is one, so a tool can register a partner and write its files, and roll
 * back if the files cannot be written.
 */
#ifndef KH_PARTNER_H_INCLUDED
#define KH_PARTNER_H_INCLUDED

#include <czmq.h>
#include <libpq-fe.h>
#include <stdbool.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Closed list of partner kinds (partners.kind). */
typedef enum {
    KH_PARTNER_VEILIG_THUIS,
    KH_PARTNER_ZORGCOORDINATOR,
    KH_PARTNER_POLICE,
    KH_PARTNER_MUNICIPALITY,
    KH_PARTNER_INSPECTORATE,
    KH_PARTNER_NATIONAL_CENTRE,
    KH_PARTNER_CHAIN_DIRECTOR, /* ketenregisseur: never handles cases */
    KH_PARTNER_OTHER,
    KH_PARTNER_KIND_COUNT_
} kh_partner_kind_t;

#define KH_PARTNER_ID_MAX 32    /* bytes, ^[a-z][a-z0-9-]{1,31}$ */
#define KH_PARTNER_NAME_MAX 100 /* characters of display_name */
#define KH_PARTNER_KEY_LEN 40   /* Z85 text of a CURVE public key */

typedef struct {
    char id[KH_PARTNER_ID_MAX + 1];
    char display_name[4 * KH_PARTNER_NAME_MAX + 1]; /* UTF-8 */
    kh_partner_kind_t kind;
    bool handles_cases;
    char public_key[KH_PARTNER_KEY_LEN + 1];
    char created_at[40]; /* UTC, "2026-11-28T21:09:27Z" */
    char revoked_at[40]; /* "" while active */
    bool revoked;
    /* Until when the key before public_key still admits the partner (a
     * rotation's overlap), UTC; "" when no other key does. */
    char previous_key_until[40];
} kh_partner_t;

/* Whether a row k of partner_keys, joined with its partner p, admits the
 * partner now: the current key and, while a rotation's overlap lasts, the
 * previous one, of a partner that is not revoked. */
#define KH_PARTNER_KEY_ADMITS                                                  \
    " p.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())"

/* The keys that admit a partner now, each with its partner's id, and in
 * every row the ms until the first of them ends (a rotation's overlap;
 * NULL: none ends): the services' key maps, read again when that time
 * comes, since no change is committed, and none told, when it does. */
#define KH_PARTNER_KEYS_SQL                                                    \
    "SELECT k.curve_public_key, k.partner_id,"                                 \
    " ceil(extract(epoch FROM min(k.expires_at)"                               \
    " FILTER (WHERE isfinite(k.expires_at)) OVER () - now()) * 1000)::bigint"  \
    " FROM partner_keys k"                                                     \
    " JOIN partners p ON p.id = k.partner_id WHERE" KH_PARTNER_KEY_ADMITS

/* Whether the key (Z85 text, an SQL expression) admits partner (its id,
 * an SQL expression) now: what a statement that acts for a partner's
 * connection checks itself, as a service's key map may not have heard
 * yet of a revocation or a rotation's overlap that ended. */
#define KH_PARTNER_ADMITTED(key, partner)                                      \
    " EXISTS (SELECT 1 FROM partner_keys k JOIN partners p"                    \
    " ON p.id = k.partner_id WHERE k.curve_public_key = " key                  \
    " AND k.partner_id = " partner " AND" KH_PARTNER_KEY_ADMITS ")"

/* The channel that a change to the registry (partners, partner_keys) is
 * NOTIFYed on as it commits (migration 026): a service that keeps the
 * keys above LISTENs on it and reads them again when told. */
#define KH_PARTNER_CHANNEL "ketenhub_registry"

/* Wire/database name of a kind ("chain_director"); "unknown" if out of
 * range. */
const char *kh_partner_kind_name(kh_partner_kind_t kind);

/* Kind for a name, or -1 if the name is not in the closed list. */
int kh_partner_kind_from_name(const char *name);

/* Whether id matches ^[a-z][a-z0-9-]{1,31}$. */
bool kh_partner_id_valid(const char *id);

/* Whether name is a display name: 1..KH_PARTNER_NAME_MAX characters of
 * valid UTF-8, no control characters (kh_text_plain), no leading or
 * trailing space. */
bool kh_partner_display_name_valid(const char *name);

/* Whether key is the Z85 text of a CURVE public key (40 characters of
 * the Z85 alphabet, not the all-zero key). */
bool kh_partner_key_valid(const char *key);

/* Register a partner. Refuses (KH_E_CONFIG, path = the argument's name:
 * "id", "display_name", "kind", "handles_cases", "public_key") a
 * malformed value, a chain director with handles_cases true, and an id
 * or key already registered (also when revoked). KH_E_DB /
 * KH_E_UNAVAILABLE for database failures. Returns 0 or -1. */
int kh_partner_register(PGconn *conn, const char *id, const char *display_name,
                        kh_partner_kind_t kind, bool handles_cases,
                        const char *public_key, kh_error_t *err);

/* Called once per partner, in id order; the record is valid only during
 * the call. */
typedef void(kh_partner_list_fn)(const kh_partner_t *partner, void *arg);

/* List partners (revoked ones too when include_revoked). Returns the
 * number listed, or -1 with err. */
int kh_partner_list(PGconn *conn, bool include_revoked, kh_partner_list_fn *fn,
                    void *arg, kh_error_t *err);

/* Revoke a partner: set revoked_at. Returns 0 when revoked now, 1 when it
 * was already revoked (revoked_at unchanged), -1 with err (KH_E_NOT_FOUND
 * for an unknown id). */
int kh_partner_revoke(PGconn *conn, const char *id, kh_error_t *err);

/* Give partner id a new current key, public_key, inside the caller's
 * transaction. The key it replaces (copied to previous) still admits the
 * partner for overlap_s seconds, until expires_at (RFC 3339 UTC); with 0
 * it admits it no longer. A key that an earlier rotation left admitting
 * the partner stops now: a partner has at most two keys at a time. Refuses
 * an unknown id (KH_E_NOT_FOUND), a revoked partner (KH_E_CONFIG at "id")
 * and a key that was ever registered (KH_E_CONFIG at "public_key").
 * Returns 0 or -1 with err. */
int kh_partner_rotate(PGconn *conn, const char *id, const char *public_key,
                      int overlap_s, char previous[KH_PARTNER_KEY_LEN + 1],
                      char expires_at[40], kh_error_t *err);

/* Find the partner that owns a CURVE public key (Z85), e.g. the ZAP
 * User-Id of a frame, whether the key is its current one or one it had.
 * Returns 0 and fills *out, revoked or not (the caller checks out->revoked
 * and out->handles_cases); -1 with err: KH_E_UNKNOWN_PARTNER when no
 * partner has the key. */
int kh_partner_lookup_key(PGconn *conn, const char *public_key,
                          kh_partner_t *out, kh_error_t *err);

/* As kh_partner_lookup_key, by id; KH_E_NOT_FOUND when unknown. */
int kh_partner_get(PGconn *conn, const char *id, kh_partner_t *out,
                   kh_error_t *err);

/* A new CURVE key pair for partner id, with metadata partner-id = id.
 * Returns a certificate the caller owns (zcert_destroy), or NULL with err
 * (KH_E_CONFIG for a bad id, KH_E_CURVE when no key can be made). */
zcert_t *kh_partner_cert_new(const char *id, kh_error_t *err);

/* The public certificate a partner made itself (ketenhub-partner keygen),
 * from the file at path, for partner id (metadata partner-id = id), so
 * that its secret key never leaves it. Refuses (KH_E_CONFIG at path) a
 * file that cannot be read, is not a CURVE certificate, or holds a secret
 * key too. Returns a certificate the caller owns, or NULL with err. */
zcert_t *kh_partner_cert_load_public(const char *path, const char *id,
                                     kh_error_t *err);

/* Write the public half of cert as <cert_dir>/<id>.cert, atomically (a
 * hidden temporary file, which zauth ignores, linked into place), so the
 * hub accepts the key. Refuses to replace an existing file with another
 * key (KH_E_CONFIG); one with the same key counts as installed, so the
 * export directory may be the certificate directory itself.
 * Returns 0 when it wrote the file, 1 when the same key was there
 * already (a caller that undoes its work leaves that file alone), or -1
 * with err (KH_E_IO, path = the file). */
int kh_partner_cert_install(zcert_t *cert, const char *id, const char *cert_dir,
                            kh_error_t *err);

/* Whether the certificate file at path holds cert's public key, and its
 * secret key too when secret is set. zcert_save and zcert_save_public
 * report success whatever their writes did (CZMQ does not look: a full
 * disk or a quota leaves an empty or cut file behind them): what they
 * wrote is read back with this before it is put in place. */
bool kh_partner_cert_holds(const char *path, zcert_t *cert, bool secret);

/* Sync the certificate file or directory at path (fsync): 0, or -1 with
 * errno set. */
int kh_partner_sync_path(const char *path);

/* Write <out_dir>/<id>.cert and <id>.cert_secret (mode 0600) for the
 * partner to take; creates out_dir (mode 0700) if missing. They are
 * written in a directory of their own, read back, synced, and linked into
 * place: never through a link planted there, never over a file that
 * exists, never cut short. Returns 0 or -1 with err. */
int kh_partner_cert_export(zcert_t *cert, const char *id, const char *out_dir,
                           kh_error_t *err);

/* Lock partner id's files in cert_dir (<cert_dir>/.<id>.lock) against
 * another rotation or revocation of the partner, waiting for it to end.
 * A rotation holds it from before kh_partner_cert_rotate until after
 * kh_partner_cert_rotate_end, a revocation while it removes the files:
 * the partner's row lock alone ends at the commit, before the files of a
 * rotation are done. Returns the lock (a file descriptor) or -1 with err;
 * kh_partner_cert_unlock releases it and sets it to -1. */
int kh_partner_cert_lock(const char *id, const char *cert_dir, kh_error_t *err);
void kh_partner_cert_unlock(int *lock_p);

/* A rotation's files, written before its commit: <cert_dir>/<id>.cert
 * becomes the public half of cert, and <id>.previous.cert the key it
 * replaces, previous_key, still without an end: until the commit that key
 * is the partner's current one, so that a rotation cut short at any point
 * leaves the directory admitting every key the registry does (the
 * services refuse the keys the registry does not). Each file is renamed
 * into place, <id>.previous.cert first, so the directory never lacks the
 * registry's key. The files they replace are kept (hidden copies, see
 * kh_partner_cert_forget_kept, which replace those a rotation cut short
 * left) until kh_partner_cert_rotate_end. Returns 0, or -1 with err and
 * the files as they were. */
int kh_partner_cert_rotate(zcert_t *cert, const char *id,
                           const char *previous_key, const char *cert_dir,
                           kh_error_t *err);

/* End a rotation's files. After its commit (committed): previous_key in
 * <id>.previous.cert gets the metadata expires-at = expires_at (RFC 3339
 * UTC, the registry's end of the overlap), after which the ZAP handler
 * refuses it, or with expires_at NULL (no overlap) that file is removed;
 * the kept files are forgotten; with previous_key NULL (the commit's
 * outcome is unknown) both keys stay as they are, admitted. After a
 * rollback the kept files are put back. Returns 0, or -1 with err when the end
 * of the key before cannot be written (the registry has it; the services apply
 * it). */
int kh_partner_cert_rotate_end(const char *id, const char *cert_dir,
                               bool committed, const char *previous_key,
                               const char *expires_at, kh_error_t *err);

/* Remove the hidden copies <cert_dir>/.<id>.cert.kept and
 * .<id>.previous.cert.kept of the files a rotation replaced, which
 * kh_partner_cert_rotate makes and kh_partner_cert_rotate_end removes or
 * puts back: a rotation cut short between the two (the tool killed, the
 * machine down) leaves them behind. The handshake never reads them (they
 * are hidden), and each key they hold is either in <id>.cert or
 * <id>.previous.cert too, or one that the registry ends at the next
 * rotation or revocation, so removing them changes no key's admission.
 * Call with the partner's lock held (kh_partner_cert_lock), while the
 * files of the partner are made anew from the registry: a rotation,
 * revocation or addition. Returns how many were removed, or -1 with err. */
int kh_partner_cert_forget_kept(const char *id, const char *cert_dir,
                                kh_error_t *err);

/* Remove <cert_dir>/<id>.cert and <id>.previous.cert, so the ZAP handler
 * refuses the partner's keys from now on (a connection already open stays
 * open: services also check revoked_at), keeping hidden copies of them (in
 * place of what a rotation cut short kept) until kh_partner_cert_remove_end.
 * Call with the partner's lock held (kh_partner_cert_lock). Returns 0 when
 * it was removed, 1 when there was no such file, -1 with err and the files
 * as they were when it cannot be removed or cert_dir is not a directory
 * (KH_E_CONFIG: a mistyped directory must not pass for a removal). */
int kh_partner_cert_remove(const char *id, const char *cert_dir,
                           kh_error_t *err);

/* End a removal: the files are put back from their copies (put_back: the
 * revocation was not committed) or the copies go. */
void kh_partner_cert_remove_end(const char *id, const char *cert_dir,
                                bool put_back);

#ifdef __cplusplus
}
#endif
#endif
