/*
 * The sealed trail without a database: the canonical encoding against
 * vectors computed independently from schemas/audit.md (Python's
 * hashlib), checkpoint signatures, the key files, times, and the
 * verifier's verdict for each kind of tampering on an in-memory trail.
 */
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ketenhub/trail.h"
#include "khtest.h"

static const char s_ref[16] = {0, 1, 2,  3,  4,  5,  6,  7,
                               8, 9, 10, 11, 12, 13, 14, 15};
static char s_hash[32];

static kh_trail_bytes_t s_text(const char *t)
{
    kh_trail_bytes_t b = {t, t ? (int) strlen(t) : -1};
    return b;
}

static void s_event(kh_trail_event_t *ev, int64_t seq, int64_t at,
                    const char *kind, const char *actor, const char *action)
{
    memset(ev, 0, sizeof *ev);
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++)
        ev->f[i].len = -1;
    ev->seq = seq;
    ev->at_us = at;
    ev->f[KH_TRAIL_ACTOR_KIND] = s_text(kind);
    ev->f[KH_TRAIL_ACTOR_ID] = s_text(actor);
    ev->f[KH_TRAIL_ACTION] = s_text(action);
    ev->f[KH_TRAIL_REFERRAL_ID].ptr = s_ref;
    ev->f[KH_TRAIL_REFERRAL_ID].len = 16;
    ev->f[KH_TRAIL_OUTCOME] = s_text("ok");
    ev->f[KH_TRAIL_PAYLOAD_HASH].ptr = s_hash;
    ev->f[KH_TRAIL_PAYLOAD_HASH].len = 32;
}

START_TEST(encoding_and_chain_match_the_written_contract)
{
    memset(s_hash, 0xab, sizeof s_hash);
    kh_trail_event_t a, b;
    s_event(&a, 42, 1764364800123456, "partner", "veilig-thuis",
            "referral.accepted");
    a.f[KH_TRAIL_ORIGIN_SERVICE] = s_text("intake");
    a.f[KH_TRAIL_ORIGIN_PEER] = s_text("10.0.0.7");
    s_event(&b, 43, 1764364800200000, "service", "routing", "referral.routed");
    b.f[KH_TRAIL_RULES_VERSION] = s_text("v1");
    b.f[KH_TRAIL_ORIGIN_SERVICE] = s_text("routing");
    b.f[KH_TRAIL_RULES_MATCHED] = s_text("minor,acute-danger");

    unsigned char buf[1024];
    ck_assert_int_eq(kh_trail_encode(&a, buf, sizeof buf), 177);
    ck_assert_int_eq(buf[0], 1);
    ck_assert_int_eq(buf[8], 42);
    ck_assert_int_eq(kh_trail_encode(&a, buf, 100), -1);

    unsigned char zero[32] = {0}, h1[32], h2[32];
    char hex[65];
    ck_assert_int_eq(kh_trail_chain(zero, &a, h1), 0);
    kh_trail_hex(h1, 32, hex);
    ck_assert_str_eq(
        hex,
        "ddb749ae5a4926520a289bef800adb6ae4263581c0cd9aeb494cb2f5ca976f7b");
    ck_assert_int_eq(kh_trail_chain(h1, &b, h2), 0);
    kh_trail_hex(h2, 32, hex);
    ck_assert_str_eq(
        hex,
        "2a679cc662f6982d290302b5f4b7ac587426f9431704af949c48ca1b5009ed52");

    /* NULL and "" differ. */
    a.f[KH_TRAIL_REASON_CODE] = s_text("");
    unsigned char h3[32];
    kh_trail_chain(zero, &a, h3);
    ck_assert(memcmp(h1, h3, 32) != 0);
}
END_TEST

START_TEST(fast_sha256_equals_libsodium)
{
    unsigned char in[1100], a[32], b[32];
    randombytes_buf(in, sizeof in);
    for (size_t len = 0; len < sizeof in; len++) {
        kh_trail_sha256(a, in, len, false);
        kh_trail_sha256(b, in, len, true);
        ck_assert_msg(memcmp(a, b, 32) == 0, "length %zu", len);
    }
    /* FIPS 180-2 example "abc". */
    kh_trail_sha256(a, (const unsigned char *) "abc", 3, false);
    char hex[65];
    kh_trail_hex(a, 32, hex);
    ck_assert_str_eq(
        hex,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}
END_TEST

START_TEST(checkpoints_are_signed_and_checked)
{
    unsigned char pk[32], sk[64], pk2[32], sk2[64];
    crypto_sign_keypair(pk, sk);
    crypto_sign_keypair(pk2, sk2);
    kh_trail_checkpoint_t cp = {.seq = 1000, .at_us = 1764364800000000};
    memset(cp.head, 7, 32);
    kh_trail_checkpoint_sign(&cp, sk);
    ck_assert(kh_trail_checkpoint_valid(&cp, pk));
    ck_assert(!kh_trail_checkpoint_valid(&cp, pk2));
    kh_trail_checkpoint_t other = cp;
    other.seq = 1001;
    ck_assert(!kh_trail_checkpoint_valid(&other, pk));
    other = cp;
    other.head[31] ^= 1;
    ck_assert(!kh_trail_checkpoint_valid(&other, pk));
    other = cp;
    other.signature[0] ^= 0x80;
    ck_assert(!kh_trail_checkpoint_valid(&other, pk));
}
END_TEST

START_TEST(key_files_and_times)
{
    char *dir = khtest_tmpdir();
    char sk_path[512], pk_path[512];
    snprintf(sk_path, sizeof sk_path, "%s/a.key", dir);
    snprintf(pk_path, sizeof pk_path, "%s/a.pub", dir);
    kh_error_t err;
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), 0);
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, false, &err), -1);
    struct stat st;
    ck_assert_int_eq(stat(sk_path, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    unsigned char sk[64], pk[32];
    ck_assert_int_eq(kh_trail_load_secret(sk_path, sk, &err), 0);
    ck_assert_int_eq(kh_trail_load_public(pk_path, pk, &err), 0);
    ck_assert_int_eq(memcmp(sk + 32, pk, 32), 0);
    ck_assert_int_eq(kh_trail_load_secret(pk_path, sk, &err), -1);
    khtest_write_file(sk_path, "zz\n");
    ck_assert_int_eq(kh_trail_load_secret(sk_path, sk, &err), -1);
    /* --force over a file that others could read: the key is 0600. */
    ck_assert_int_eq(chmod(sk_path, 0644), 0);
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, true, &err), 0);
    ck_assert_int_eq(stat(sk_path, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    ck_assert_int_eq(kh_trail_load_secret(sk_path, sk, &err), 0);
    /* A symbolic link where the key goes is not followed, even with
     * --force: the file it names keeps what it held. */
    char elsewhere[512];
    snprintf(elsewhere, sizeof elsewhere, "%s/elsewhere", dir);
    khtest_write_file(elsewhere, "kept\n");
    ck_assert_int_eq(unlink(sk_path), 0);
    ck_assert_int_eq(symlink(elsewhere, sk_path), 0);
    ck_assert_int_eq(kh_trail_keygen(sk_path, pk_path, NULL, true, &err), -1);
    ck_assert_ptr_nonnull(strstr(err.message, "symbolic link"));
    char *kept = khtest_read_file(elsewhere);
    ck_assert_str_eq(kept, "kept\n");
    free(kept);
    khtest_rmtree(dir);
    free(dir);

    char t[28];
    int64_t us;
    kh_trail_format_time(1764364800123456, t);
    ck_assert_str_eq(t, "2025-11-28T21:20:00.123456Z");
    ck_assert_int_eq(kh_trail_parse_time(t, &us), 0);
    ck_assert(us == 1764364800123456);
    ck_assert_int_eq(kh_trail_parse_time("2025-11-28T21:20:00Z", &us), -1);
    ck_assert_int_eq(kh_trail_parse_time("2025-13-28T21:20:00.000000Z", &us),
                     -1);
    ck_assert(kh_trail_action_known("delivery.acked"));
    ck_assert(!kh_trail_action_known("delivery.eaten"));
}
END_TEST

/* ---- the verifier on an in-memory trail ---- */

#define S_N 60
static kh_trail_event_t s_ev[S_N];
static unsigned char s_seal[S_N][32];
static kh_trail_checkpoint_t s_cp[6];
static unsigned char s_pk[32], s_sk[64];
static char s_actors[S_N][16];

/* Events with seq 1..S_N except every seventh (rolled back), sealed, a
 * checkpoint every ten seq values. */
static void s_build(void)
{
    crypto_sign_keypair(s_pk, s_sk);
    memset(s_hash, 0x11, sizeof s_hash);
    unsigned char prev[32] = {0};
    int ncp = 0;
    for (int i = 0; i < S_N; i++) {
        snprintf(s_actors[i], sizeof s_actors[i], "actor-%d", i);
        s_event(&s_ev[i], i + 1, 1764364800000000 + i, "partner", s_actors[i],
                "referral.accepted");
        if ((i + 1) % 7 == 0)
            continue;
        kh_trail_chain(prev, &s_ev[i], s_seal[i]);
        memcpy(prev, s_seal[i], 32);
        if ((i + 1) % 10 == 0 && ncp < 6) {
            s_cp[ncp].seq = i + 1;
            s_cp[ncp].at_us = 1764364900000000;
            memcpy(s_cp[ncp].head, prev, 32);
            kh_trail_checkpoint_sign(&s_cp[ncp], s_sk);
            ncp++;
        }
    }
}

/* S_DROP removes an event and leaves its seal; S_REMOVE removes both;
 * S_UNSEAL removes the seal and leaves the event. */
typedef enum {
    S_INTACT,
    S_ALTER,
    S_DROP,
    S_REMOVE,
    S_UNSEAL,
    S_ADD,
    S_SWAP,
    S_CUT,
    S_SIG,
    S_INSERT,
    S_DOWN
} s_op_t;

/* Feed the trail with one tampering, the events up to seq head sealed
 * with their checkpoints, those after it committed but not sealed yet
 * (the sealer has not come round, or the audit service is down); return
 * the report. */
/* A checkpoint s_run gives besides the trail's own (NULL: none). */
static const kh_trail_checkpoint_t *s_extra;

static kh_trail_report_t s_run(s_op_t op, int at, int other, int head)
{
    kh_trail_verifier_t *v = kh_trail_verifier_new(s_pk, NULL);
    for (int c = 0; c < 6 && s_cp[c].seq <= head; c++) {
        kh_trail_checkpoint_t cp = s_cp[c];
        if (op == S_SIG && c == at)
            cp.signature[5] ^= 1;
        kh_trail_verifier_checkpoint(v, &cp, false);
    }
    if (s_extra)
        kh_trail_verifier_checkpoint(v, s_extra, false);
    for (int i = 0; i < S_N; i++) {
        bool exists = (i + 1) % 7 != 0;
        kh_trail_event_t ev = s_ev[i];
        const unsigned char *seal = exists && i < head ? s_seal[i] : NULL;
        if (op == S_ADD && i == at)
            exists = true; /* an event where a rollback left a gap */
        unsigned char inserted[32];
        if (op == S_INSERT && i == at) {
            /* the same, with a seal chained from the event before it */
            exists = true;
            kh_trail_chain(s_seal[at - 1], &ev, inserted);
            seal = inserted;
        }
        if (op == S_CUT && i >= at)
            exists = false;
        if ((op == S_DROP || op == S_REMOVE) && i == at)
            exists = false;
        if ((op == S_REMOVE || op == S_UNSEAL) && i == at)
            seal = NULL;
        if (op == S_ALTER && i == at)
            ev.at_us++;
        if (op == S_DOWN && i == at) {
            /* event other moved down to at, where a rollback left a gap,
             * its seal left where it was */
            exists = true;
            ev = s_ev[other];
            ev.seq = i + 1;
        }
        if (op == S_DOWN && i == other)
            exists = false;
        if (op == S_SWAP && (i == at || i == other)) {
            ev = s_ev[i == at ? other : at];
            ev.seq = i + 1;
        }
        if (exists || seal)
            kh_trail_verifier_feed(v, i + 1, exists ? &ev : NULL, seal);
    }
    kh_trail_report_t r;
    kh_trail_verifier_finish(v, &r);
    kh_trail_verifier_destroy(&v);
    return r;
}

static kh_trail_report_t s_run_op(s_op_t op, int at, int other)
{
    return s_run(op, at, other, S_N);
}

START_TEST(verifier_names_each_kind_of_tampering)
{
    s_build();
    kh_trail_report_t r = s_run_op(S_INTACT, 0, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_OK);
    ck_assert_int_eq(r.checkpoints, 6);
    ck_assert_int_eq(r.signed_seq, 60);
    r = s_run_op(S_ALTER, 22, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_ALTERED);
    ck_assert_int_eq(r.seq, 23);
    r = s_run_op(S_DROP, 22, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_MISSING);
    ck_assert_int_eq(r.seq, 23);
    r = s_run_op(S_ADD, 13, 0); /* seq 14 never existed */
    ck_assert_int_eq(r.kind, KH_TRAIL_INSERTED);
    ck_assert_int_eq(r.seq, 14);
    r = s_run_op(S_INSERT, 13, 0); /* with a seal: 15 is intact */
    ck_assert_msg(r.kind == KH_TRAIL_INSERTED && r.seq == 14, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
    r = s_run_op(S_SWAP, 10, 40);
    ck_assert_int_eq(r.kind, KH_TRAIL_REORDERED);
    ck_assert_int_eq(r.seq, 11);
    ck_assert_int_eq(r.other_seq, 41);
    r = s_run_op(S_CUT, 30, 0); /* everything after seq 30 */
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 31);
    ck_assert_int_eq(r.other_seq, 30);
    r = s_run_op(S_SIG, 2, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, 30);
    ck_assert_str_eq(kh_trail_finding_name(r.kind), "bad_signature");
}
END_TEST

/* A checkpointed event removed with its seal while later events wait for
 * their seals: the checkpoint still names it. */
START_TEST(verifier_finds_a_removal_below_unsealed_events)
{
    s_build();
    /* Sealed up to the checkpoint at 40, 41..60 not yet: intact. */
    kh_trail_report_t r = s_run(S_INTACT, 0, 0, 40);
    ck_assert_int_eq(r.kind, KH_TRAIL_OK);
    ck_assert_int_eq(r.signed_seq, 40);
    ck_assert_int_eq(r.unsealed, 17);
    /* Event 40 and its seal removed. */
    r = s_run(S_REMOVE, 39, 0, 40);
    ck_assert_msg(r.kind == KH_TRAIL_MISSING && r.seq == 40, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
    ck_assert_ptr_nonnull(strstr(r.detail, "checkpoint"));
    /* Event 50 and its seal removed; 49 was rolled back: either may have
     * been the first event removed. */
    r = s_run(S_REMOVE, 49, 0, 50);
    ck_assert_msg(r.kind == KH_TRAIL_MISSING && r.seq == 49, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
    ck_assert_ptr_nonnull(strstr(r.detail, "seq 50"));
    /* Only the seal of event 40 removed: an unsealed event below a
     * checkpoint. */
    r = s_run(S_UNSEAL, 39, 0, 40);
    ck_assert_int_eq(r.kind, KH_TRAIL_INSERTED);
    ck_assert_int_eq(r.seq, 40);
    /* Without the unsealed events it is a truncation, as before. */
    r = s_run(S_CUT, 39, 0, 40);
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 40);
    ck_assert_int_eq(r.other_seq, 30);
}
END_TEST

/* A checkpoint row above the trail's end: with a bad signature it is the
 * finding (it vouches for nothing), whether events wait for their seals
 * or not; a valid one says the end was cut. */
START_TEST(verifier_names_a_bad_checkpoint_above_the_end)
{
    s_build();
    kh_trail_checkpoint_t forged = s_cp[5];
    forged.seq = 1000;
    kh_trail_checkpoint_sign(&forged, s_sk);
    forged.signature[7] ^= 1;
    s_extra = &forged;
    kh_trail_report_t r = s_run(S_INTACT, 0, 0, 40); /* 41..60 unsealed */
    ck_assert_msg(r.kind == KH_TRAIL_BAD_SIGNATURE && r.seq == 1000,
                  "%s at %lld: %s", kh_trail_finding_name(r.kind),
                  (long long) r.seq, r.detail);
    r = s_run_op(S_INTACT, 0, 0);
    ck_assert_msg(r.kind == KH_TRAIL_BAD_SIGNATURE && r.seq == 1000,
                  "%s at %lld: %s", kh_trail_finding_name(r.kind),
                  (long long) r.seq, r.detail);
    forged.signature[7] ^= 1; /* signed as it is: events after 60 went */
    r = s_run_op(S_INTACT, 0, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_TRUNCATED);
    ck_assert_int_eq(r.seq, 61);
    s_extra = NULL;
}
END_TEST

/* The checkpoints of a long trail, given twice (published, then from the
 * database) in opposite orders: each is known once, none left absent,
 * whatever the order (the index by seq grows and is built anew). */
START_TEST(verifier_takes_many_checkpoints_given_twice)
{
    enum { N = 3000 };
    unsigned char pk[32], sk[64];
    crypto_sign_keypair(pk, sk);
    kh_trail_checkpoint_t *cps = calloc(N, sizeof *cps);
    ck_assert_ptr_nonnull(cps);
    unsigned char prev[32] = {0};
    kh_trail_event_t *evs = calloc(N, sizeof *evs);
    ck_assert_ptr_nonnull(evs);
    static unsigned char seals[N][32];
    for (int i = 0; i < N; i++) {
        s_event(&evs[i], i + 1, 1764364800000000 + i, "partner", "avim",
                "referral.accepted");
        kh_trail_chain(prev, &evs[i], seals[i]);
        memcpy(prev, seals[i], 32);
        cps[i].seq = i + 1;
        cps[i].at_us = 1764364900000000;
        memcpy(cps[i].head, prev, 32);
        kh_trail_checkpoint_sign(&cps[i], sk);
    }
    kh_trail_verifier_t *v = kh_trail_verifier_new(pk, NULL);
    for (int i = N - 1; i >= 0; i--)
        ck_assert_int_eq(kh_trail_verifier_checkpoint(v, &cps[i], true), 0);
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(kh_trail_verifier_checkpoint(v, &cps[i], false), 0);
    for (int i = 0; i < N; i++)
        kh_trail_verifier_feed(v, i + 1, &evs[i], seals[i]);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_verifier_finish(v, &r), 0);
    ck_assert_int_eq(r.checkpoints, N);
    ck_assert_int_eq(r.signed_seq, N);
    kh_trail_verifier_destroy(&v);
    free(evs);
    free(cps);
}
END_TEST

/* An event removed with its seal leaves no trace but a break in the
 * chain at the next event, which looks like that event altered; so does
 * an event altered after a rolled-back seq. The report names the first
 * seq that may be wrong and both readings. */
START_TEST(verifier_names_a_gap_where_the_chain_breaks)
{
    s_build();
    /* 23 removed with its seal: the first problem is 23, not 24. */
    kh_trail_report_t r = s_run_op(S_REMOVE, 22, 0);
    ck_assert_msg(r.kind == KH_TRAIL_MISSING && r.seq == 23, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
    ck_assert_ptr_nonnull(
        strstr(r.detail, "event 24 does not follow event 22"));
    /* 1 removed with its seal. */
    r = s_run_op(S_REMOVE, 0, 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_MISSING);
    ck_assert_int_eq(r.seq, 1);
    /* 15 altered; 14 was rolled back, so a removed 14 reads the same. */
    r = s_run_op(S_ALTER, 14, 0);
    ck_assert_msg(r.kind == KH_TRAIL_MISSING && r.seq == 14, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
    ck_assert_ptr_nonnull(strstr(r.detail, "event 15 was altered"));
    /* An event moved across such a gap is still a reordering. */
    r = s_run_op(S_SWAP, 14, 40);
    ck_assert_int_eq(r.kind, KH_TRAIL_REORDERED);
    ck_assert_int_eq(r.seq, 15);
    ck_assert_int_eq(r.other_seq, 41);
    /* So is one moved down into the gap (15 to 14), its seal left at 15;
     * another event put there is inserted. */
    r = s_run_op(S_DOWN, 13, 14);
    ck_assert_msg(r.kind == KH_TRAIL_REORDERED && r.seq == 15 &&
                      r.other_seq == 14,
                  "%s at %lld (%lld): %s", kh_trail_finding_name(r.kind),
                  (long long) r.seq, (long long) r.other_seq, r.detail);
    r = s_run_op(S_DOWN, 13, 30);
    ck_assert_msg(r.kind == KH_TRAIL_INSERTED && r.seq == 14, "%s at %lld: %s",
                  kh_trail_finding_name(r.kind), (long long) r.seq, r.detail);
}
END_TEST

START_TEST(verifier_starts_at_a_checkpoint)
{
    s_build();
    kh_trail_verifier_t *v = kh_trail_verifier_new(s_pk, &s_cp[2]);
    for (int c = 0; c < 6; c++)
        kh_trail_verifier_checkpoint(v, &s_cp[c], false);
    for (int i = 30; i < S_N; i++)
        if ((i + 1) % 7 != 0)
            kh_trail_verifier_feed(v, i + 1, &s_ev[i], s_seal[i]);
    kh_trail_report_t r;
    ck_assert_int_eq(kh_trail_verifier_finish(v, &r), 0);
    ck_assert_int_eq(r.first_seq, 31);
    ck_assert_int_eq(r.checkpoints, 6);
    kh_trail_verifier_destroy(&v);

    /* The anchor is a checkpoint of a chain rewritten up to it and
     * re-signed (with the real key): the published checkpoint at the same
     * seq signs another head, and the chain after the anchor, which
     * continues from the false head, is no evidence against it. */
    kh_trail_checkpoint_t forged = s_cp[2];
    forged.head[0] ^= 1;
    kh_trail_checkpoint_sign(&forged, s_sk);
    v = kh_trail_verifier_new(s_pk, &forged);
    kh_trail_verifier_checkpoint(v, &s_cp[2], true);
    for (int i = 30; i < S_N; i++)
        if ((i + 1) % 7 != 0)
            kh_trail_verifier_feed(v, i + 1, &s_ev[i], s_seal[i]);
    ck_assert_int_ne(kh_trail_verifier_finish(v, &r), 0);
    ck_assert_int_eq(r.kind, KH_TRAIL_CHECKPOINT_MISMATCH);
    ck_assert_int_eq(r.seq, 30);
    kh_trail_verifier_destroy(&v);
}
END_TEST

/* Feed the in-memory trail with checkpoints c and on re-signed by sk2
 * (a rotation of the audit key before checkpoint c; with back, the
 * checkpoint after them signed by the first key again), against keys. */
static kh_trail_report_t s_run_rotated(const kh_trail_keys_t *keys, int c,
                                       const unsigned char *sk2, int back)
{
    kh_trail_verifier_t *v = kh_trail_verifier_new_keys(keys, NULL);
    ck_assert_ptr_nonnull(v);
    for (int k = 0; k < 6; k++) {
        kh_trail_checkpoint_t cp = s_cp[k];
        if (k >= c && k != back)
            kh_trail_checkpoint_sign(&cp, sk2);
        kh_trail_verifier_checkpoint(v, &cp, false);
    }
    for (int i = 0; i < S_N; i++)
        if ((i + 1) % 7 != 0)
            kh_trail_verifier_feed(v, i + 1, &s_ev[i], s_seal[i]);
    kh_trail_report_t r;
    kh_trail_verifier_finish(v, &r);
    kh_trail_verifier_destroy(&v);
    return r;
}

/* The audit key replaced (audit keygen --force) after the third
 * checkpoint: the trail verifies with both public keys, oldest first,
 * and with neither alone; the old key signs nothing after the new one
 * has signed. */
START_TEST(verifier_accepts_the_keys_of_a_rotation_in_turn)
{
    s_build();
    unsigned char pk2[32], sk2[64];
    crypto_sign_keypair(pk2, sk2);
    kh_trail_keys_t both = {.count = 2}, reversed = {.count = 2},
                    old = {.count = 1}, new = {.count = 1};
    memcpy(both.key[0], s_pk, 32);
    memcpy(both.key[1], pk2, 32);
    memcpy(reversed.key[0], pk2, 32);
    memcpy(reversed.key[1], s_pk, 32);
    memcpy(old.key[0], s_pk, 32);
    memcpy(new.key[0], pk2, 32);

    kh_trail_report_t r = s_run_rotated(&both, 3, sk2, -1);
    ck_assert_msg(r.kind == KH_TRAIL_OK, "%s", r.detail);
    ck_assert_int_eq(r.checkpoints, 6);
    ck_assert_int_eq(r.signed_seq, s_cp[5].seq);

    r = s_run_rotated(&old, 3, sk2, -1);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, s_cp[3].seq);
    r = s_run_rotated(&new, 3, sk2, -1);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, s_cp[0].seq);

    /* Given newest first, the first checkpoint of the new key comes after
     * the old key's: refused there, and the detail says why. */
    r = s_run_rotated(&reversed, 3, sk2, -1);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, s_cp[3].seq);
    ck_assert_msg(strstr(r.detail, "after key 2 signed"), "%s", r.detail);

    /* The replaced key (perhaps leaked) signs a checkpoint after the new
     * one did: a bad signature at that checkpoint. */
    r = s_run_rotated(&both, 3, sk2, 4);
    ck_assert_int_eq(r.kind, KH_TRAIL_BAD_SIGNATURE);
    ck_assert_int_eq(r.seq, s_cp[4].seq);

    /* Key files: several keys a file, oldest first; twice the same key,
     * a line that is no key or a file without a key are refused. */
    char dir[] = "/tmp/kh-trail-keys-XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    char path[128], hex1[65], hex2[65];
    snprintf(path, sizeof path, "%s/keys.pub", dir);
    kh_trail_hex(s_pk, 32, hex1);
    kh_trail_hex(pk2, 32, hex2);
    for (int b = 0; b < 5; b++) {
        FILE *f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        if (b == 0)
            fprintf(f, "%s\n%s\n", hex1, hex2);
        else if (b == 1)
            fprintf(f, "%s\n\n%s", hex1, hex2); /* no last newline */
        else if (b == 2)
            fprintf(f, "%s\n%s\n%s\n", hex1, hex2, hex1);
        else if (b == 3)
            fprintf(f, "%s\nnot a key %s\n", hex1, hex2);
        else
            fprintf(f, "\n\n");
        fclose(f);
        kh_trail_keys_t keys = {.count = 0};
        kh_error_t err;
        kh_error_clear(&err);
        int rc = kh_trail_load_public_keys(path, &keys, &err);
        if (b < 2) {
            ck_assert_int_eq(rc, 0);
            ck_assert_uint_eq(keys.count, 2);
            ck_assert_mem_eq(keys.key[0], s_pk, 32);
            ck_assert_mem_eq(keys.key[1], pk2, 32);
        } else {
            ck_assert_int_eq(rc, -1);
            ck_assert_int_eq(err.code, KH_E_CONFIG);
        }
    }

    /* Key files given one after the other: a later one may repeat keys of
     * those before in their order (old.pub, then the hub-audit.pub that
     * the rotation left, which holds its key too) and add new keys after
     * the newest; any other order is refused. */
    unsigned char pk3[32], sk3[64];
    crypto_sign_keypair(pk3, sk3);
    char hex3[65];
    kh_trail_hex(pk3, 32, hex3);
    const struct {
        const char *files[2];
        int rc;
        size_t count;
    } merges[] = {
        {{hex1, "12"}, 0, 2},  {{"12", "12"}, 0, 2},  {{hex1, hex2}, 0, 2},
        {{"12", "2"}, 0, 2},   {{"12", "23"}, 0, 3},  {{hex2, "12"}, -1, 0},
        {{"12", "13"}, -1, 0}, {{"12", "21"}, -1, 0}, {{"12", "122"}, -1, 0},
    };
    const char *by_digit[] = {NULL, hex1, hex2, hex3};
    const unsigned char *pk_by_digit[] = {NULL, s_pk, pk2, pk3};
    for (size_t m = 0; m < sizeof merges / sizeof *merges; m++) {
        kh_trail_keys_t keys = {.count = 0};
        kh_error_t err;
        kh_error_clear(&err);
        int rc = 0;
        for (int i = 0; i < 2 && rc == 0; i++) {
            FILE *f = fopen(path, "w");
            ck_assert_ptr_nonnull(f);
            const char *spec = merges[m].files[i];
            if (strlen(spec) == 64)
                fprintf(f, "%s\n", spec);
            else
                for (const char *d = spec; *d; d++)
                    fprintf(f, "%s\n", by_digit[*d - '0']);
            fclose(f);
            rc = kh_trail_load_public_keys(path, &keys, &err);
        }
        ck_assert_msg(rc == merges[m].rc, "merge %zu: %d (%s)", m, rc,
                      err.message);
        if (rc == 0) {
            ck_assert_uint_eq(keys.count, merges[m].count);
            for (size_t k = 0; k < keys.count; k++)
                ck_assert_mem_eq(keys.key[k], pk_by_digit[k + 1], 32);
        } else
            ck_assert_int_eq(err.code, KH_E_CONFIG);
    }
    unlink(path);
    rmdir(dir);
}
END_TEST

int main(void)
{
    if (sodium_init() < 0)
        return 1;
    Suite *suite = suite_create("trail");
    TCase *tc = tcase_create("trail");
    tcase_add_test(tc, encoding_and_chain_match_the_written_contract);
    tcase_add_test(tc, fast_sha256_equals_libsodium);
    tcase_add_test(tc, checkpoints_are_signed_and_checked);
    tcase_add_test(tc, key_files_and_times);
    tcase_add_test(tc, verifier_names_each_kind_of_tampering);
    tcase_add_test(tc, verifier_finds_a_removal_below_unsealed_events);
    tcase_add_test(tc, verifier_names_a_bad_checkpoint_above_the_end);
    tcase_add_test(tc, verifier_takes_many_checkpoints_given_twice);
    tcase_add_test(tc, verifier_names_a_gap_where_the_chain_breaks);
    tcase_add_test(tc, verifier_starts_at_a_checkpoint);
    tcase_add_test(tc, verifier_accepts_the_keys_of_a_rotation_in_turn);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
