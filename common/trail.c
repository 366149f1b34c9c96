/*
 * The sealed audit trail without the database: canonical encoding, chain,
 * checkpoints, keys and the streaming verifier (see trail.h and
 * schemas/audit.md).
 */
#include "ketenhub/trail.h"

#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

const char *const kh_trail_actions[] = {"referral.accepted",
                                        "referral.rejected",
                                        "referral.routed",
                                        "referral.purged",
                                        "request.rejected",
                                        "delivery.created",
                                        "delivery.sent",
                                        "delivery.unsent",
                                        "delivery.acked",
                                        "delivery.nacked",
                                        "delivery.dead",
                                        "delivery.escalated",
                                        "delivery.retried",
                                        "rules.reloaded",
                                        "rules.reload_failed",
                                        "auth.refused",
                                        "partner.added",
                                        "partner.revoked",
                                        "partner.key_rotated",
                                        "trail.queried",
                                        "trail.exported",
                                        "trail.verified",
                                        NULL};

static const char *const s_field_names[KH_TRAIL_FIELD_COUNT] = {
    "actor_kind",  "actor_id",      "action",        "referral_id",
    "delivery_id", "partner_id",    "outcome",       "reason_code",
    "reason_path", "payload_hash",  "rules_version", "origin_service",
    "origin_peer", "rules_matched", "query_filter"};

const char *kh_trail_field_name(kh_trail_field_t field)
{
    return field < KH_TRAIL_FIELD_COUNT ? s_field_names[field] : "unknown";
}

int kh_trail_field_kind(kh_trail_field_t field)
{
    if (field == KH_TRAIL_REFERRAL_ID || field == KH_TRAIL_DELIVERY_ID)
        return 1;
    if (field == KH_TRAIL_PAYLOAD_HASH)
        return 2;
    return 0;
}

bool kh_trail_action_known(const char *action)
{
    for (size_t i = 0; action && kh_trail_actions[i]; i++)
        if (strcmp(action, kh_trail_actions[i]) == 0)
            return true;
    return false;
}

static void s_put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char) (v & 0xff);
        v >>= 8;
    }
}

long kh_trail_encode(const kh_trail_event_t *ev, unsigned char *out,
                     size_t size)
{
    size_t o = 0;
    if (size < 17)
        return -1;
    out[o++] = 0x01; /* encoding version */
    s_put64(out + o, (uint64_t) ev->seq);
    o += 8;
    s_put64(out + o, (uint64_t) ev->at_us);
    o += 8;
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        const kh_trail_bytes_t *b = &ev->f[i];
        if (size - o < 4)
            return -1;
        if (b->len < 0) {
            memset(out + o, 0xff, 4);
            o += 4;
            continue;
        }
        uint32_t len = (uint32_t) b->len;
        out[o] = (unsigned char) (len >> 24);
        out[o + 1] = (unsigned char) (len >> 16);
        out[o + 2] = (unsigned char) (len >> 8);
        out[o + 3] = (unsigned char) len;
        o += 4;
        if (size - o < len)
            return -1;
        if (len)
            memcpy(out + o, b->ptr, len);
        o += len;
    }
    return (long) o;
}

int kh_trail_chain(const unsigned char prev[KH_TRAIL_HASH_SIZE],
                   const kh_trail_event_t *ev,
                   unsigned char next[KH_TRAIL_HASH_SIZE])
{
    unsigned char buf[65536 + KH_TRAIL_HASH_SIZE];
    memcpy(buf, prev, KH_TRAIL_HASH_SIZE);
    long n = kh_trail_encode(ev, buf + KH_TRAIL_HASH_SIZE,
                             sizeof buf - KH_TRAIL_HASH_SIZE);
    if (n < 0)
        return -1;
    kh_trail_sha256(next, buf, (size_t) n + KH_TRAIL_HASH_SIZE, false);
    return 0;
}

void kh_trail_checkpoint_message(
    const kh_trail_checkpoint_t *cp,
    unsigned char out[KH_TRAIL_CHECKPOINT_MESSAGE_SIZE])
{
    memcpy(out, "ketenhub-checkpoint-v1", 22);
    s_put64(out + 22, (uint64_t) cp->seq);
    s_put64(out + 30, (uint64_t) cp->at_us);
    memcpy(out + 38, cp->head, KH_TRAIL_HASH_SIZE);
}

void kh_trail_checkpoint_sign(kh_trail_checkpoint_t *cp,
                              const unsigned char *secret_key)
{
    unsigned char msg[KH_TRAIL_CHECKPOINT_MESSAGE_SIZE];
    kh_trail_checkpoint_message(cp, msg);
    crypto_sign_ed25519_sk_to_pk(cp->public_key, secret_key);
    crypto_sign_detached(cp->signature, NULL, msg, sizeof msg, secret_key);
}

bool kh_trail_checkpoint_valid(const kh_trail_checkpoint_t *cp,
                               const unsigned char *public_key)
{
    if (sodium_memcmp(cp->public_key, public_key, KH_TRAIL_PUBLIC_KEY_SIZE))
        return false;
    unsigned char msg[KH_TRAIL_CHECKPOINT_MESSAGE_SIZE];
    kh_trail_checkpoint_message(cp, msg);
    return crypto_sign_verify_detached(cp->signature, msg, sizeof msg,
                                       public_key) == 0;
}

void kh_trail_hex(const unsigned char *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 0xf];
    }
    out[2 * n] = '\0';
}

static int s_nibble(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int kh_trail_unhex(const char *hex, unsigned char *out, size_t n)
{
    if (!hex || strlen(hex) != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int hi = s_nibble(hex[2 * i]), lo = s_nibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char) (hi << 4 | lo);
    }
    return 0;
}

void kh_trail_format_time(int64_t at_us, char out[28])
{
    int64_t secs = at_us / 1000000, us = at_us % 1000000;
    if (us < 0) {
        us += 1000000;
        secs--;
    }
    time_t t = (time_t) secs;
    struct tm tm;
    gmtime_r(&t, &tm);
    char text[96];
    snprintf(text, sizeof text, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
             (tm.tm_year + 1900) % 10000, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
             tm.tm_min, tm.tm_sec, (int) us);
    snprintf(out, 28, "%.27s", text);
}

int kh_trail_parse_time(const char *text, int64_t *at_us)
{
    int y, mo, d, h, mi, s, us, n = 0;
    if (!text || strlen(text) != 27 ||
        sscanf(text, "%4d-%2d-%2dT%2d:%2d:%2d.%6dZ%n", &y, &mo, &d, &h, &mi, &s,
               &us, &n) != 7 ||
        n != 27)
        return -1;
    if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || s > 60 ||
        us < 0)
        return -1;
    struct tm tm = {0};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = s;
    time_t t = timegm(&tm);
    *at_us = (int64_t) t * 1000000 + us;
    char back[28];
    kh_trail_format_time(*at_us, back);
    return strcmp(back, text) == 0 ? 0 : -1;
}

/* Sync the directory that holds path, so that a rename or link in it
 * lasts. */
static void s_sync_dir_of(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        dir[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* Write text to path whole or not at all: into a new file beside it with
 * mode, synced, then renamed over path (replace) or linked to it, which
 * leaves a path that exists as it is (EEXIST). A symbolic link at path is
 * refused, never followed (a link planted where the key goes would send
 * the secret elsewhere), and a file replaced never holds the new key with
 * its old mode (it may have been readable by others). */
static int s_write_key(const char *path, const char *text, mode_t mode,
                       bool replace, kh_error_t *err)
{
    char tmp[4200];
    if ((size_t) snprintf(tmp, sizeof tmp, "%s.new-XXXXXX", path) >= sizeof tmp)
        return kh_error_set(err, KH_E_IO, path, "path too long");
    struct stat st;
    if (replace && lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
        return kh_error_set(err, KH_E_IO, path,
                            "cannot write key file: it is a symbolic link");
    int fd = mkstemp(tmp);
    if (fd < 0)
        return kh_error_set(err, KH_E_IO, path, "cannot create key file: %s",
                            strerror(errno));
    size_t len = strlen(text);
    bool ok = fchmod(fd, mode) == 0 && write(fd, text, len) == (ssize_t) len &&
              fsync(fd) == 0;
    ok = close(fd) == 0 && ok;
    int saved = errno;
    if (ok)
        ok = replace ? rename(tmp, path) == 0 : link(tmp, path) == 0;
    saved = ok ? 0 : errno ? errno : saved;
    unlink(tmp);
    if (!ok)
        return kh_error_set(err, KH_E_IO, path, "cannot write key file: %s",
                            saved == EEXIST ? "it exists already"
                                            : strerror(saved));
    s_sync_dir_of(path);
    return 0;
}

int kh_trail_keygen(const char *secret_path, const char *public_path,
                    const kh_trail_keys_t *kept, bool force, kh_error_t *err)
{
    unsigned char pk[KH_TRAIL_PUBLIC_KEY_SIZE], sk[KH_TRAIL_SECRET_KEY_SIZE];
    char sk_hex[2 * KH_TRAIL_SECRET_KEY_SIZE + 2];
    char pk_hex[2 * KH_TRAIL_PUBLIC_KEY_SIZE + 2];
    size_t nkept = kept ? kept->count : 0;
    if (nkept >= KH_TRAIL_MAX_KEYS)
        return kh_error_set(err, KH_E_CONFIG, public_path,
                            "holds %d keys already, the most a file may hold",
                            KH_TRAIL_MAX_KEYS);
    if (sodium_init() < 0)
        return kh_error_set(err, KH_E_INTERNAL, NULL, "no random source");
    if (!force &&
        (access(secret_path, F_OK) == 0 || access(public_path, F_OK) == 0))
        return kh_error_set(err, KH_E_IO, secret_path,
                            "an audit key exists already");
    crypto_sign_keypair(pk, sk);
    kh_trail_hex(sk, sizeof sk, sk_hex);
    strcat(sk_hex, "\n");
    /* The keys replaced, oldest first, then the new one. */
    char *pub = malloc((nkept + 1) * sizeof pk_hex + 1);
    if (!pub) {
        sodium_memzero(sk, sizeof sk);
        sodium_memzero(sk_hex, sizeof sk_hex);
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    }
    pub[0] = '\0';
    for (size_t i = 0; i <= nkept; i++) {
        kh_trail_hex(i < nkept ? kept->key[i] : pk, sizeof pk, pk_hex);
        strcat(pk_hex, "\n");
        strcat(pub, pk_hex);
    }
    /* The public file first: should the secret one fail, the public file
     * lists a key nothing signs with yet, beside the one that still
     * signs, and every checkpoint verifies with it. */
    int rc = s_write_key(public_path, pub, 0644, force, err);
    if (rc == 0 && s_write_key(secret_path, sk_hex, 0600, force, err) != 0) {
        rc = -1;
        if (!force) /* made here, with no secret beside it */
            unlink(public_path);
    }
    free(pub);
    sodium_memzero(sk, sizeof sk);
    sodium_memzero(sk_hex, sizeof sk_hex);
    return rc;
}

/* Read the first line of a key file: exactly n bytes of hex. */
static int s_load_key(const char *path, unsigned char *out, size_t n,
                      kh_error_t *err)
{
    char line[2 * KH_TRAIL_SECRET_KEY_SIZE + 8];
    FILE *f = fopen(path, "re");
    if (!f)
        return kh_error_set(err, KH_E_IO, path, "cannot open key file: %s",
                            strerror(errno));
    bool got = fgets(line, sizeof line, f) != NULL;
    fclose(f);
    if (got)
        line[strcspn(line, "\r\n")] = '\0';
    int rc = got ? kh_trail_unhex(line, out, n) : -1;
    sodium_memzero(line, sizeof line);
    if (rc != 0)
        return kh_error_set(err, KH_E_CONFIG, path,
                            "not an audit key file (%zu hex digits)", 2 * n);
    return 0;
}

int kh_trail_load_secret(const char *path,
                         unsigned char out[KH_TRAIL_SECRET_KEY_SIZE],
                         kh_error_t *err)
{
    if (s_load_key(path, out, KH_TRAIL_SECRET_KEY_SIZE, err))
        return -1;
    /* The secret key holds its public half: check they belong together. */
    unsigned char seed[32], pk[32], sk[64];
    crypto_sign_ed25519_sk_to_seed(seed, out);
    crypto_sign_seed_keypair(pk, sk, seed);
    bool ok = sodium_memcmp(sk, out, sizeof sk) == 0;
    sodium_memzero(seed, sizeof seed);
    sodium_memzero(sk, sizeof sk);
    if (!ok) {
        sodium_memzero(out, KH_TRAIL_SECRET_KEY_SIZE);
        return kh_error_set(err, KH_E_CONFIG, path,
                            "audit secret key is inconsistent");
    }
    return 0;
}

int kh_trail_load_public(const char *path,
                         unsigned char out[KH_TRAIL_PUBLIC_KEY_SIZE],
                         kh_error_t *err)
{
    return s_load_key(path, out, KH_TRAIL_PUBLIC_KEY_SIZE, err);
}

int kh_trail_load_public_keys(const char *path, kh_trail_keys_t *keys,
                              kh_error_t *err)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return kh_error_set(err, KH_E_IO, path, "cannot open key file: %s",
                            strerror(errno));
    char line[256];
    int rc = 0, lineno = 0, found = 0;
    /* Where in keys the file's last key stands: a file may repeat keys
     * of the files before it (an auditor's old.pub, then the hub-audit.pub
     * that a rotation left, which holds that key too), in the same order,
     * and add new keys after the newest only (a file that starts with a
     * new key puts it after them all); any other order leaves the
     * order of the keys in doubt, and with it which key signs after
     * which. */
    ptrdiff_t at = -1;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        lineno++;
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0')
            continue;
        unsigned char key[KH_TRAIL_PUBLIC_KEY_SIZE];
        if (kh_trail_unhex(line, key, sizeof key) != 0) {
            rc = kh_error_set(err, KH_E_CONFIG, path,
                              "line %d: not an audit public key (64 hex "
                              "digits)",
                              lineno);
            break;
        }
        ptrdiff_t known = -1;
        for (size_t i = 0; i < keys->count && known < 0; i++)
            if (memcmp(keys->key[i], key, sizeof key) == 0)
                known = (ptrdiff_t) i;
        if (known >= 0 && known <= at)
            rc = kh_error_set(err, KH_E_CONFIG, path,
                              "line %d: the key %s is given twice, or out of "
                              "the order of the keys before it: give each "
                              "key once, oldest first",
                              lineno, line);
        else if (known < 0 && at >= 0 && at + 1 < (ptrdiff_t) keys->count)
            rc = kh_error_set(err, KH_E_CONFIG, path,
                              "line %d: the key %s follows a key that is not "
                              "the newest given before it: give each key "
                              "once, oldest first",
                              lineno, line);
        else if (known < 0 && keys->count == KH_TRAIL_MAX_KEYS)
            rc = kh_error_set(err, KH_E_CONFIG, path,
                              "line %d: more than %d audit keys", lineno,
                              KH_TRAIL_MAX_KEYS);
        else if (known < 0) {
            memcpy(keys->key[keys->count], key, sizeof key);
            known = (ptrdiff_t) keys->count++;
        }
        if (rc == 0) {
            at = known;
            found++;
        }
    }
    if (rc == 0 && ferror(f))
        rc = kh_error_set(err, KH_E_IO, path, "cannot read key file");
    fclose(f);
    if (rc == 0 && found == 0)
        rc = kh_error_set(err, KH_E_CONFIG, path,
                          "not an audit key file (no key of 64 hex digits)");
    return rc == 0 ? 0 : -1;
}

int kh_trail_keys_signer(const kh_trail_keys_t *keys,
                         const kh_trail_checkpoint_t *cp)
{
    for (size_t i = 0; i < keys->count; i++)
        if (kh_trail_checkpoint_valid(cp, keys->key[i]))
            return (int) i;
    return -1;
}

/* ------------------------------------------------------------------ */
/* Verifier */

static const char *const s_finding_names[KH_TRAIL_KIND_COUNT] = {
    "ok",        "altered",   "missing",       "inserted",
    "reordered", "truncated", "bad_signature", "checkpoint_mismatch"};

const char *kh_trail_finding_name(kh_trail_finding_t kind)
{
    return kind < KH_TRAIL_KIND_COUNT ? s_finding_names[kind] : "unknown";
}

typedef struct {
    kh_trail_checkpoint_t cp;
    bool valid;  /* signature checked and good */
    int signer;  /* index of its key among the verifier's (-1: none) */
    bool absent; /* published, but not among the checkpoints given before */
} s_cp_t;

/* A finding: its kind (KH_TRAIL_OK: none), seq and words. */
typedef struct {
    kh_trail_finding_t kind;
    int64_t seq, other;
    char detail[160];
} s_finding_t;

struct kh_trail_verifier_t {
    kh_trail_keys_t keys;
    unsigned char prev[KH_TRAIL_HASH_SIZE];
    int64_t start_seq; /* events at or below it are not judged */
    unsigned char start_head[KH_TRAIL_HASH_SIZE]; /* the anchor's */
    s_cp_t *cps;
    size_t ncps, cap;
    bool sorted;
    /* The checkpoints by seq (s_index_find), so that one given twice is
     * found at once however many there are: open addressing, a slot holds
     * an index into cps + 1 (0: empty). Built anew when it fills up or
     * once cps was sorted (indexed false). */
    size_t *slots, nslots;
    bool indexed;
    size_t next_cp; /* first checkpoint not yet passed */
    /* The first finding of the stream (kind OK: none yet). */
    s_finding_t found;
    /* Pending judgements. */
    int64_t unsealed_at; /* first event without a seal (0: none) */
    /* A copy of that event (its bytes in unsealed_bytes; NULL: none, out
     * of memory), to tell a sealed event moved down into a seq a rollback
     * left free from one inserted there. */
    kh_trail_event_t unsealed;
    char *unsealed_bytes;
    int64_t missing_at; /* first seal without an event (0: none) */
    bool looking;       /* looking ahead for a moved event */
    int64_t look_seq;
    unsigned char look_prev[KH_TRAIL_HASH_SIZE];
    unsigned char look_seal[KH_TRAIL_HASH_SIZE];
    s_finding_t before_look; /* the finding before the break at look_seq */
    int64_t last_event;      /* seq of the last event read */
    int64_t last_row;        /* seq of the last event or seal read */
    /* The last event the chain went through (0: none since the start) and
     * the chain's value before it. */
    int64_t chained;
    unsigned char prev_before[KH_TRAIL_HASH_SIZE];
    kh_trail_report_t report;
};

kh_trail_verifier_t *kh_trail_verifier_new(const unsigned char *public_key,
                                           const kh_trail_checkpoint_t *anchor)
{
    kh_trail_keys_t keys = {.count = 1};
    memcpy(keys.key[0], public_key, KH_TRAIL_PUBLIC_KEY_SIZE);
    return kh_trail_verifier_new_keys(&keys, anchor);
}

kh_trail_verifier_t *
kh_trail_verifier_new_keys(const kh_trail_keys_t *keys,
                           const kh_trail_checkpoint_t *anchor)
{
    kh_trail_verifier_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->keys = *keys;
    self->found.kind = KH_TRAIL_OK;
    if (anchor) {
        memcpy(self->prev, anchor->head, KH_TRAIL_HASH_SIZE);
        memcpy(self->start_head, anchor->head, KH_TRAIL_HASH_SIZE);
        self->start_seq = anchor->seq;
        self->last_event = anchor->seq;
        self->last_row = anchor->seq;
        self->report.signed_seq = anchor->seq;
        if (kh_trail_verifier_checkpoint(self, anchor, false) != 0) {
            kh_trail_verifier_destroy(&self);
            return NULL;
        }
    }
    return self;
}

void kh_trail_verifier_destroy(kh_trail_verifier_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    free((*self_p)->cps);
    free((*self_p)->slots);
    free((*self_p)->unsealed_bytes);
    free(*self_p);
    *self_p = NULL;
}

/* Record a finding unless an earlier one (lower seq) is known. */
static void s_find(kh_trail_verifier_t *self, kh_trail_finding_t kind,
                   int64_t seq, int64_t other, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void s_find(kh_trail_verifier_t *self, kh_trail_finding_t kind,
                   int64_t seq, int64_t other, const char *fmt, ...)
{
    s_finding_t *f = &self->found;
    if (f->kind != KH_TRAIL_OK && f->seq <= seq)
        return;
    f->kind = kind;
    f->seq = seq;
    f->other = other;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->detail, sizeof f->detail, fmt, ap);
    va_end(ap);
}

/* Whether the stream is still judged: no finding yet, or only a bad
 * signature (which says nothing about the events). */
static bool s_judging(const kh_trail_verifier_t *self)
{
    return self->found.kind == KH_TRAIL_OK ||
           self->found.kind == KH_TRAIL_BAD_SIGNATURE;
}

/* The detail of a bad signature on cp: a published checkpoint only (an
 * auditor's copy altered or forged, the trail's own may be sound) is
 * named so. */
static void s_bad_signature_detail(kh_trail_verifier_t *self,
                                   const kh_trail_checkpoint_t *cp,
                                   bool published)
{
    bool known = false;
    for (size_t i = 0; i < self->keys.count && !known; i++)
        known = memcmp(cp->public_key, self->keys.key[i],
                       KH_TRAIL_PUBLIC_KEY_SIZE) == 0;
    snprintf(self->found.detail, sizeof self->found.detail,
             "%scheckpoint at seq %lld: %s", published ? "published " : "",
             (long long) cp->seq,
             known ? "signature does not verify" : "signed by another key");
}

static size_t s_seq_slot(int64_t seq, size_t mask)
{
    uint64_t x = (uint64_t) seq + 0x9E3779B97F4A7C15u; /* splitmix64 */
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9u;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBu;
    return (size_t) (x ^ (x >> 31)) & mask;
}

static void s_index_put(kh_trail_verifier_t *self, size_t i)
{
    size_t mask = self->nslots - 1;
    size_t h = s_seq_slot(self->cps[i].cp.seq, mask);
    while (self->slots[h])
        h = (h + 1) & mask;
    self->slots[h] = i + 1;
}

/* The index of cps with room for one more (at most half full). */
static int s_index_ready(kh_trail_verifier_t *self)
{
    if (self->indexed && self->nslots >= 2 * (self->ncps + 1))
        return 0;
    size_t nslots = 64;
    while (nslots < 4 * (self->ncps + 1))
        nslots *= 2;
    size_t *slots = calloc(nslots, sizeof *slots);
    if (!slots)
        return -1;
    free(self->slots);
    self->slots = slots;
    self->nslots = nslots;
    for (size_t i = 0; i < self->ncps; i++)
        s_index_put(self, i);
    self->indexed = true;
    return 0;
}

/* The checkpoint given before that is cp, byte for byte; NULL. */
static s_cp_t *s_index_find(kh_trail_verifier_t *self,
                            const kh_trail_checkpoint_t *cp)
{
    size_t mask = self->nslots - 1;
    for (size_t h = s_seq_slot(cp->seq, mask); self->slots[h];
         h = (h + 1) & mask) {
        s_cp_t *c = &self->cps[self->slots[h] - 1];
        if (c->cp.seq == cp->seq && memcmp(&c->cp, cp, sizeof *cp) == 0)
            return c;
    }
    return NULL;
}

int kh_trail_verifier_checkpoint(kh_trail_verifier_t *self,
                                 const kh_trail_checkpoint_t *cp,
                                 bool published)
{
    if (s_index_ready(self) != 0)
        return -1;
    s_cp_t *same = s_index_find(self, cp);
    if (same) {
        /* The same checkpoint from both sources. A bad signature found on
         * the published copy is the trail's too. */
        if (!published && same->absent && !same->valid &&
            self->found.kind == KH_TRAIL_BAD_SIGNATURE &&
            self->found.seq == cp->seq)
            s_bad_signature_detail(self, cp, false);
        same->absent = same->absent && published;
        return 0;
    }
    if (self->ncps == self->cap) {
        size_t cap = self->cap ? self->cap * 2 : 64;
        s_cp_t *cps = realloc(self->cps, cap * sizeof *cps);
        if (!cps)
            return -1;
        self->cps = cps;
        self->cap = cap;
    }
    s_cp_t *slot = &self->cps[self->ncps++];
    slot->cp = *cp;
    slot->signer = kh_trail_keys_signer(&self->keys, cp);
    slot->valid = slot->signer >= 0;
    /* Judged when the chain reaches its seq (s_checkpoint_at), so that a
     * problem with an event below it is named first. */
    slot->absent = published;
    if (!slot->valid) {
        /* s_find keeps an earlier finding; an empty detail says it took
         * this one (every finding has words). */
        s_find(self, KH_TRAIL_BAD_SIGNATURE, cp->seq, 0, "%s", "");
        if (self->found.detail[0] == '\0')
            s_bad_signature_detail(self, cp, published);
    }
    s_index_put(self, self->ncps - 1);
    self->sorted = false;
    return 0;
}

static int s_cp_cmp(const void *a, const void *b)
{
    const s_cp_t *x = a, *y = b;
    return x->cp.seq < y->cp.seq ? -1 : x->cp.seq > y->cp.seq;
}

static void s_sort(kh_trail_verifier_t *self)
{
    if (self->sorted)
        return;
    if (self->ncps) /* none: no array at all, which qsort may not take */
        qsort(self->cps, self->ncps, sizeof *self->cps, s_cp_cmp);
    self->sorted = true;
    self->indexed = false; /* the indexes moved */
    /* The keys signed in turn: once a key has signed, the keys it
     * replaced sign nothing after it (a replaced key may have leaked). */
    int newest = -1;
    for (size_t i = 0; i < self->ncps; i++) {
        s_cp_t *c = &self->cps[i];
        if (!c->valid)
            continue;
        if (c->signer < newest) {
            c->valid = false;
            s_find(self, KH_TRAIL_BAD_SIGNATURE, c->cp.seq, 0, "%s", "");
            if (self->found.detail[0] == '\0')
                snprintf(self->found.detail, sizeof self->found.detail,
                         "%scheckpoint at seq %lld: signed by key %d after "
                         "key %d signed (keys oldest first: a replaced key "
                         "signs nothing later)",
                         c->absent ? "published " : "", (long long) c->cp.seq,
                         c->signer + 1, newest + 1);
        } else
            newest = c->signer;
    }
    self->next_cp = 0;
    /* The checkpoints up to the anchor are not judged against events (none
     * are read there), but one at the anchor's own seq must sign its head:
     * a published checkpoint that differs says the chain was rewritten up
     * to the anchor, and re-signed. */
    while (self->next_cp < self->ncps &&
           self->cps[self->next_cp].cp.seq <= self->start_seq) {
        const s_cp_t *c = &self->cps[self->next_cp++];
        if (!c->valid)
            continue;
        if (c->cp.seq == self->start_seq &&
            sodium_memcmp(c->cp.head, self->start_head, KH_TRAIL_HASH_SIZE) !=
                0)
            s_find(self, KH_TRAIL_CHECKPOINT_MISMATCH, c->cp.seq, 0,
                   "seq %lld: two signed heads for the starting checkpoint "
                   "differ (the chain was rewritten up to here)",
                   (long long) c->cp.seq);
        else
            self->report.checkpoints++;
    }
}

/* The highest valid checkpoint at or below seq (0 if none). */
static int64_t s_cp_at_or_below(const kh_trail_verifier_t *self, int64_t seq)
{
    int64_t best = 0;
    for (size_t i = 0; i < self->ncps; i++)
        if (self->cps[i].valid && self->cps[i].cp.seq <= seq &&
            self->cps[i].cp.seq > best)
            best = self->cps[i].cp.seq;
    return best;
}

/* Judge the checkpoints below seq, the seq of the row (event or seal)
 * read now; before is the seq of the row read before it. Every row passes
 * the checkpoints below it, sealed or not: one that is still waiting
 * names a seq where no row stands, or an event without a seal. A
 * checkpoint is signed only over sealed events, so an unsealed event at
 * or below it was inserted; with no row at all, its event went with its
 * seal. The rows between before and it went too, or were never
 * committed (a rollback leaves a gap): the first seq that may be wrong
 * is before + 1. A checkpoint with a bad signature is a finding already
 * and vouches for nothing. */
static void s_pass_checkpoints_below(kh_trail_verifier_t *self, int64_t seq,
                                     int64_t before)
{
    while (self->next_cp < self->ncps &&
           self->cps[self->next_cp].cp.seq < seq) {
        const s_cp_t *c = &self->cps[self->next_cp++];
        int64_t at = c->cp.seq;
        if (!c->valid)
            continue;
        if (self->unsealed_at && self->unsealed_at <= at)
            s_find(self, KH_TRAIL_INSERTED, self->unsealed_at, 0,
                   "seq %lld: an event without a seal below a checkpoint",
                   (long long) self->unsealed_at);
        else if (before + 1 == at)
            s_find(self, KH_TRAIL_MISSING, at, 0,
                   "seq %lld: the event a checkpoint covers was removed with "
                   "its seal",
                   (long long) at);
        else
            s_find(self, KH_TRAIL_MISSING, before + 1, 0,
                   "seq %lld: the event at seq %lld, which a checkpoint "
                   "covers, was removed with its seal, as were any events "
                   "after seq %lld",
                   (long long) (before + 1), (long long) at,
                   (long long) before);
    }
}

/* The event at seq hashed to h and matched its seal: check a checkpoint
 * at seq against it. */
static void s_checkpoint_at(kh_trail_verifier_t *self, int64_t seq,
                            const unsigned char *h)
{
    while (self->next_cp < self->ncps &&
           self->cps[self->next_cp].cp.seq == seq) {
        const s_cp_t *c = &self->cps[self->next_cp++];
        if (!c->valid)
            continue; /* already a finding */
        if (sodium_memcmp(c->cp.head, h, KH_TRAIL_HASH_SIZE) != 0) {
            s_find(self, KH_TRAIL_CHECKPOINT_MISMATCH, seq, 0,
                   "seq %lld: the signed head differs from the chain (the "
                   "chain was rewritten up to here)",
                   (long long) seq);
            continue;
        }
        if (c->absent) {
            s_find(self, KH_TRAIL_MISSING, seq, 0,
                   "seq %lld: the published checkpoint at seq %lld is gone "
                   "from the trail's checkpoints",
                   (long long) seq, (long long) seq);
            continue;
        }
        self->report.checkpoints++;
        self->report.signed_seq = seq;
    }
}

/* Keep a copy of ev, the first event without a seal. */
static void s_keep_unsealed(kh_trail_verifier_t *self,
                            const kh_trail_event_t *ev)
{
    size_t len = 0;
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++)
        len += ev->f[i].ptr ? (size_t) ev->f[i].len : 0;
    free(self->unsealed_bytes);
    self->unsealed_bytes = malloc(len + 1);
    if (!self->unsealed_bytes)
        return;
    self->unsealed = *ev;
    char *at = self->unsealed_bytes;
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++)
        if (ev->f[i].ptr) {
            memcpy(at, ev->f[i].ptr, (size_t) ev->f[i].len);
            self->unsealed.f[i].ptr = at;
            at += ev->f[i].len;
        }
}

/* A seal at seq without its event: is it the seal of the first event
 * without one, moved down from seq (into a seq a rollback left free)? */
static bool s_moved_down(const kh_trail_verifier_t *self, int64_t seq,
                         const unsigned char *seal)
{
    if (!self->unsealed_bytes)
        return false;
    kh_trail_event_t moved = self->unsealed;
    moved.seq = seq;
    unsigned char h[KH_TRAIL_HASH_SIZE];
    return kh_trail_chain(self->prev, &moved, h) == 0 &&
           sodium_memcmp(h, seal, KH_TRAIL_HASH_SIZE) == 0;
}

/* While looking ahead: is ev the event that belonged at look_seq? */
static void s_look(kh_trail_verifier_t *self, const kh_trail_event_t *ev)
{
    kh_trail_event_t moved = *ev;
    moved.seq = self->look_seq;
    unsigned char h[KH_TRAIL_HASH_SIZE];
    if (kh_trail_chain(self->look_prev, &moved, h) == 0 &&
        sodium_memcmp(h, self->look_seal, KH_TRAIL_HASH_SIZE) == 0) {
        /* The event sealed at look_seq followed the event before it: the
         * break there was no alteration and no removal but a move. */
        self->found = self->before_look;
        s_find(self, KH_TRAIL_REORDERED, self->look_seq, ev->seq,
               "seq %lld: the event sealed here now stands at seq %lld",
               (long long) self->look_seq, (long long) ev->seq);
        self->looking = false;
    }
}

void kh_trail_verifier_feed(kh_trail_verifier_t *self, int64_t seq,
                            const kh_trail_event_t *ev,
                            const unsigned char *seal)
{
    s_sort(self);
    if (seq <= 0) {
        /* The sequence hands out 1 and up: an event at or below 0 was put
         * there by hand (a reader that starts after seq 0 would never see
         * it). It is judged before any other, whatever its seal, and
         * counted in the summary's range as in its count. */
        if (ev && self->report.events++ == 0)
            self->report.first_seq = seq;
        s_find(self, KH_TRAIL_INSERTED, seq, 0,
               "seq %lld: %s at a seq the sequence never hands out",
               (long long) seq, ev ? "an event" : "a seal");
        return;
    }
    int64_t before = self->last_row;
    self->last_row = seq;
    if (ev) {
        /* Count, not the seq, tells the first: an event inserted at seq 0
         * may have come before. */
        if (self->report.events++ == 0)
            self->report.first_seq = seq;
        self->report.last_seq = seq;
        self->last_event = seq;
    }
    if (self->looking) {
        if (ev)
            s_look(self, ev);
        return;
    }
    if (!s_judging(self))
        return;
    s_pass_checkpoints_below(self, seq, before);
    if (!ev && seal) {
        /* A seal without its event: reported below as missing, so a
         * checkpoint at this seq needs no other word. */
        while (self->next_cp < self->ncps &&
               self->cps[self->next_cp].cp.seq == seq)
            self->next_cp++;
    }
    if (!ev && seal && self->unsealed_at && s_moved_down(self, seq, seal)) {
        s_find(self, KH_TRAIL_REORDERED, seq, self->unsealed_at,
               "seq %lld: the event sealed here now stands at seq %lld",
               (long long) seq, (long long) self->unsealed_at);
        return;
    }
    if (seal && self->unsealed_at) {
        s_find(self, KH_TRAIL_INSERTED, self->unsealed_at, 0,
               "seq %lld: an event without a seal below sealed ones: an "
               "event inserted, or its seal removed",
               (long long) self->unsealed_at);
        return;
    }
    if (ev && self->missing_at) {
        s_find(self, KH_TRAIL_MISSING, self->missing_at, 0,
               "seq %lld: a sealed event is gone",
               (long long) self->missing_at);
        return;
    }
    if (!ev) {
        if (seal && !self->missing_at)
            self->missing_at = seq;
        return;
    }
    if (!seal) {
        self->report.unsealed++;
        if (!self->unsealed_at) {
            self->unsealed_at = seq;
            s_keep_unsealed(self, ev);
        }
        return;
    }
    unsigned char h[KH_TRAIL_HASH_SIZE];
    if (kh_trail_chain(self->prev, ev, h) != 0 ||
        sodium_memcmp(h, seal, KH_TRAIL_HASH_SIZE) != 0) {
        /* It follows the event before the one read before it: that one
         * was put in between (where a rollback left a gap), with a seal
         * computed for it. */
        if (self->chained > 0 && self->chained == before &&
            kh_trail_chain(self->prev_before, ev, h) == 0 &&
            sodium_memcmp(h, seal, KH_TRAIL_HASH_SIZE) == 0) {
            s_find(self, KH_TRAIL_INSERTED, before, 0,
                   "seq %lld: an event inserted with a seal of its own "
                   "(event %lld follows the event before it)",
                   (long long) before, (long long) seq);
            return;
        }
        /* Altered, unless the sealed event moved elsewhere. When seq does
         * not follow the event before it at once, an event between them
         * removed with its seal breaks the chain here just the same, and
         * the seals cannot tell which (a rollback leaves gaps too): the
         * first seq that may be wrong is the one after that event. */
        self->before_look = self->found;
        if (before == seq - 1)
            s_find(self, KH_TRAIL_ALTERED, seq, 0,
                   "seq %lld: the event does not match its seal",
                   (long long) seq);
        else if (before == 0)
            s_find(self, KH_TRAIL_MISSING, 1, 0,
                   "seq 1: event %lld is not the first: an event before it "
                   "was removed with its seal, or event %lld was altered",
                   (long long) seq, (long long) seq);
        else
            s_find(self, KH_TRAIL_MISSING, before + 1, 0,
                   "seq %lld: event %lld does not follow event %lld: an event "
                   "between them was removed with its seal, or event %lld was "
                   "altered",
                   (long long) (before + 1), (long long) seq,
                   (long long) before, (long long) seq);
        self->looking = true;
        self->look_seq = seq;
        memcpy(self->look_prev, self->prev, KH_TRAIL_HASH_SIZE);
        memcpy(self->look_seal, seal, KH_TRAIL_HASH_SIZE);
        return;
    }
    memcpy(self->prev_before, self->prev, KH_TRAIL_HASH_SIZE);
    memcpy(self->prev, h, KH_TRAIL_HASH_SIZE);
    self->chained = seq;
    self->report.sealed++;
    s_checkpoint_at(self, seq, h);
}

int kh_trail_verifier_finish(kh_trail_verifier_t *self,
                             kh_trail_report_t *report)
{
    s_sort(self);
    self->looking = false;
    /* Every row passed the checkpoints below it (s_pass_checkpoints_below):
     * those still waiting stand at or above the last row. */
    bool judging = s_judging(self);
    /* The highest of them that vouches for anything: one with a bad
     * signature is a finding of its own, and says nothing of the events
     * (0: none). */
    int64_t top = 0;
    for (size_t i = self->next_cp; i < self->ncps; i++)
        if (self->cps[i].valid)
            top = self->cps[i].cp.seq;
    if (judging && self->unsealed_at && top >= self->unsealed_at)
        s_find(self, KH_TRAIL_INSERTED, self->unsealed_at, 0,
               "seq %lld: an event without a seal below a checkpoint",
               (long long) self->unsealed_at);
    else if (judging && (self->missing_at || top > self->last_event)) {
        int64_t after = s_cp_at_or_below(self, self->last_event);
        /* No checkpoint at or below the last event: there is none to
         * name (seq 0 is no checkpoint). */
        if (after > 0)
            s_find(self, KH_TRAIL_TRUNCATED, self->last_event + 1, after,
                   "seq %lld: the trail ends early (after checkpoint at seq "
                   "%lld, sealed or signed events follow)",
                   (long long) self->last_event + 1, (long long) after);
        else
            s_find(self, KH_TRAIL_TRUNCATED, self->last_event + 1, after,
                   "seq %lld: the trail ends early (before its first "
                   "checkpoint, sealed or signed events follow)",
                   (long long) self->last_event + 1);
    }
    const s_finding_t *f = &self->found;
    *report = self->report;
    report->kind = f->kind;
    report->seq = f->kind == KH_TRAIL_OK ? 0 : f->seq;
    report->other_seq = f->kind == KH_TRAIL_OK ? 0 : f->other;
    snprintf(report->detail, sizeof report->detail, "%s",
             f->kind == KH_TRAIL_OK ? "intact" : f->detail);
    return f->kind == KH_TRAIL_OK ? 0 : 1;
}
