/*
 * SHA-256 for the trail's chain, and for every payload hash (kh_sha256).
 * Verification hashes every event once, intake every referral and routing
 * every projection, so on x86-64 processors with the SHA extensions
 * (SHA-NI) the compression runs on them: about four times libsodium's
 * portable code, which stays the fallback everywhere else. The unit tests
 * compare both on inputs of every length that matters.
 */
#include "ketenhub/trail.h"

#include <sodium.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define S_HAVE_SHANI 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#ifdef S_HAVE_SHANI

static const uint32_t s_k[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1,
    0x923f82a4, 0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3,
    0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147,
    0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208,
    0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

/* Compress n 64-byte blocks into state (a..h as eight words). Four rounds
 * per step: sha256rnds2 does two, sha256msg1/msg2 extend the message
 * schedule four words at a time. */
__attribute__((target("sha,sse4.1,ssse3"))) static void
s_blocks_shani(uint32_t state[8], const unsigned char *in, size_t n)
{
    const __m128i mask =
        _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i abef, cdgh;
    {
        __m128i dcba = _mm_loadu_si128((const __m128i *) &state[0]);
        __m128i hgfe = _mm_loadu_si128((const __m128i *) &state[4]);
        __m128i cdab = _mm_shuffle_epi32(dcba, 0xb1);
        __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1b);
        abef = _mm_alignr_epi8(cdab, efgh, 8);
        cdgh = _mm_blend_epi16(efgh, cdab, 0xf0);
    }
    for (; n > 0; n--, in += 64) {
        const __m128i abef_in = abef, cdgh_in = cdgh;
        __m128i w[4];
        for (int i = 0; i < 4; i++)
            w[i] = _mm_shuffle_epi8(
                _mm_loadu_si128((const __m128i *) (in + 16 * i)), mask);
        for (int i = 0; i < 16; i++) {
            __m128i msg = _mm_add_epi32(
                w[i % 4], _mm_load_si128((const __m128i *) &s_k[4 * i]));
            cdgh = _mm_sha256rnds2_epu32(cdgh, abef, msg);
            abef =
                _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(msg, 0x0e));
            /* The next four schedule words, from the last sixteen. */
            if (i >= 3 && i <= 14) {
                __m128i *next = &w[(i + 1) % 4];
                *next = _mm_add_epi32(
                    *next, _mm_alignr_epi8(w[i % 4], w[(i + 3) % 4], 4));
                *next = _mm_sha256msg2_epu32(*next, w[i % 4]);
            }
            if (i >= 1 && i <= 12)
                w[(i + 3) % 4] = _mm_sha256msg1_epu32(w[(i + 3) % 4], w[i % 4]);
        }
        abef = _mm_add_epi32(abef, abef_in);
        cdgh = _mm_add_epi32(cdgh, cdgh_in);
    }
    __m128i feba = _mm_shuffle_epi32(abef, 0x1b);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xb1);
    _mm_storeu_si128((__m128i *) &state[0], _mm_blend_epi16(feba, dchg, 0xf0));
    _mm_storeu_si128((__m128i *) &state[4], _mm_alignr_epi8(dchg, feba, 8));
}

/* Whether this processor has the SHA extensions (CPUID.7.0:EBX[29]) and
 * SSE4.1 (CPUID.1:ECX[19]). */
static int s_shani_available(void)
{
    static int known = -1;
    if (known < 0) {
        unsigned a, b, c, d;
        int sha = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b >> 29 & 1);
        int sse41 = __get_cpuid(1, &a, &b, &c, &d) && (c >> 19 & 1);
        known = sha && sse41;
    }
    return known;
}

static void s_sha256_shani(unsigned char out[32], const unsigned char *in,
                           size_t len)
{
    uint32_t state[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                         0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    size_t full = len / 64;
    s_blocks_shani(state, in, full);
    /* The tail, the 0x80 byte, zeros and the length in bits (big-endian)
     * fill one or two more blocks. */
    unsigned char last[128] = {0};
    size_t rest = len % 64, blocks = rest + 9 > 64 ? 2 : 1;
    memcpy(last, in + 64 * full, rest);
    last[rest] = 0x80;
    uint64_t bits = (uint64_t) len * 8;
    for (int i = 0; i < 8; i++)
        last[64 * blocks - 1 - i] = (unsigned char) (bits >> (8 * i));
    s_blocks_shani(state, last, blocks);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (unsigned char) (state[i] >> 24);
        out[4 * i + 1] = (unsigned char) (state[i] >> 16);
        out[4 * i + 2] = (unsigned char) (state[i] >> 8);
        out[4 * i + 3] = (unsigned char) state[i];
    }
}
#endif

void kh_trail_sha256(unsigned char out[32], const unsigned char *in, size_t len,
                     bool portable)
{
#ifdef S_HAVE_SHANI
    if (!portable && s_shani_available()) {
        s_sha256_shani(out, in, len);
        return;
    }
#else
    (void) portable;
#endif
    crypto_hash_sha256(out, in, (unsigned long long) len);
}
