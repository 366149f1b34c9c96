/*
 * Token buckets per key (see ratelimit.h).
 */
#include "ketenhub/ratelimit.h"

#include <czmq.h>
#include <stdlib.h>

typedef struct {
    double tokens;
    int64_t at_us; /* when tokens was last brought up to date */
} s_bucket_t;

struct _kh_ratelimit_t {
    zhashx_t *buckets; /* key -> s_bucket_t */
    double rate, burst;
    size_t max_keys;
};

static void s_free_bucket(void **item)
{
    free(*item);
    *item = NULL;
}

kh_ratelimit_t *kh_ratelimit_new(double rate, double burst, size_t max_keys)
{
    if (!(rate > 0) || !(burst >= 1) || max_keys == 0)
        return NULL;
    kh_ratelimit_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->buckets = zhashx_new();
    if (!self->buckets) {
        free(self);
        return NULL;
    }
    zhashx_set_destructor(self->buckets, s_free_bucket);
    self->rate = rate;
    self->burst = burst;
    self->max_keys = max_keys;
    return self;
}

void kh_ratelimit_destroy(kh_ratelimit_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    zhashx_destroy(&(*self_p)->buckets);
    free(*self_p);
    *self_p = NULL;
}

/* key's bucket, brought up to now_us; NULL when out of memory. */
static s_bucket_t *s_bucket(kh_ratelimit_t *self, const char *key,
                            int64_t now_us)
{
    s_bucket_t *b = zhashx_lookup(self->buckets, key);
    if (!b) {
        if (zhashx_size(self->buckets) >= self->max_keys)
            zhashx_purge(self->buckets);
        b = malloc(sizeof *b);
        if (!b)
            return NULL;
        b->tokens = self->burst;
        b->at_us = now_us;
        zhashx_insert(self->buckets, key, b);
    }
    if (now_us > b->at_us) {
        b->tokens += self->rate * (double) (now_us - b->at_us) / 1e6;
        if (b->tokens > self->burst)
            b->tokens = self->burst;
        b->at_us = now_us;
    }
    return b;
}

/* Rounded up: resending after this many ms finds a token. */
static int64_t s_wait_ms(const kh_ratelimit_t *self, const s_bucket_t *b)
{
    return b->tokens >= 1
               ? 0
               : (int64_t) ((1 - b->tokens) / self->rate * 1000.0) + 1;
}

int64_t kh_ratelimit_take(kh_ratelimit_t *self, const char *key, int64_t now_us)
{
    s_bucket_t *b = s_bucket(self, key, now_us);
    if (!b)
        return 0;
    if (b->tokens >= 1) {
        b->tokens -= 1;
        return 0;
    }
    return s_wait_ms(self, b);
}

int64_t kh_ratelimit_wait(kh_ratelimit_t *self, const char *key, int64_t now_us)
{
    const s_bucket_t *b = s_bucket(self, key, now_us);
    return b ? s_wait_ms(self, b) : 0;
}

void kh_ratelimit_charge(kh_ratelimit_t *self, const char *key, int64_t now_us)
{
    s_bucket_t *b = s_bucket(self, key, now_us);
    if (b && b->tokens > -self->burst)
        b->tokens -= 1;
}

void kh_ratelimit_refund(kh_ratelimit_t *self, const char *key, int64_t now_us)
{
    s_bucket_t *b = s_bucket(self, key, now_us);
    if (b && b->tokens < self->burst)
        b->tokens += 1;
}
