/*
 * At most once per interval per key, the tally of what was left out, and
 * the refusal gate (see throttle.h).
 */
#include "ketenhub/throttle.h"

#include "ketenhub/ratelimit.h"

#include <czmq.h>
#include <stdlib.h>

struct _kh_throttle_t {
    zhashx_t *last; /* key -> int64_t of its last pass */
    int64_t interval_ms;
    size_t max_keys;
};

static void s_free_time(void **item)
{
    free(*item);
    *item = NULL;
}

kh_throttle_t *kh_throttle_new(int64_t interval_ms, size_t max_keys)
{
    kh_throttle_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->last = zhashx_new();
    if (!self->last) {
        free(self);
        return NULL;
    }
    zhashx_set_destructor(self->last, s_free_time);
    self->interval_ms = interval_ms;
    self->max_keys = max_keys;
    return self;
}

void kh_throttle_destroy(kh_throttle_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    zhashx_destroy(&(*self_p)->last);
    free(*self_p);
    *self_p = NULL;
}

bool kh_throttle_pass(kh_throttle_t *self, const char *key, int64_t now_ms)
{
    int64_t *last = zhashx_lookup(self->last, key);
    if (last && now_ms - *last < self->interval_ms)
        return false;
    if (!last) {
        if (zhashx_size(self->last) >= self->max_keys)
            zhashx_purge(self->last);
        last = malloc(sizeof *last);
        if (!last)
            return true;
        zhashx_insert(self->last, key, last);
    }
    *last = now_ms;
    return true;
}

uint64_t kh_tally_add(kh_tally_t *self, int64_t interval_ms, int64_t now_ms)
{
    self->count++;
    if (self->told_ms && now_ms - self->told_ms < interval_ms)
        return 0;
    uint64_t count = self->count;
    self->count = 0;
    self->told_ms = now_ms;
    return count;
}

uint64_t kh_tally_flush(kh_tally_t *self, int64_t interval_ms, int64_t now_ms)
{
    if (self->count == 0 ||
        (interval_ms && self->told_ms && now_ms - self->told_ms < interval_ms))
        return 0;
    uint64_t count = self->count;
    self->count = 0;
    self->told_ms = now_ms;
    return count;
}

struct _kh_refusal_gate_t {
    kh_throttle_t *seen;    /* identity: one audit per repeat_ms */
    kh_ratelimit_t *audits; /* audited refusals, over all identities */
    kh_tally_t unaudited;   /* left out past the rate, to be told */
    int64_t log_ms;
};

kh_refusal_gate_t *kh_refusal_gate_new(int64_t repeat_ms, double rate,
                                       double burst, int64_t log_ms)
{
    if (repeat_ms <= 0 || log_ms <= 0)
        return NULL;
    kh_refusal_gate_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    /* Past 10000 identities it forgets them all: memory stays bounded. */
    self->seen = kh_throttle_new(repeat_ms, 10000);
    self->audits = kh_ratelimit_new(rate, burst, 1);
    self->log_ms = log_ms;
    if (!self->seen || !self->audits)
        kh_refusal_gate_destroy(&self);
    return self;
}

void kh_refusal_gate_destroy(kh_refusal_gate_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_throttle_destroy(&(*self_p)->seen);
    kh_ratelimit_destroy(&(*self_p)->audits);
    free(*self_p);
    *self_p = NULL;
}

bool kh_refusal_gate_pass(kh_refusal_gate_t *self, const char *identity,
                          bool room, int64_t now_us, uint64_t *tell)
{
    *tell = 0;
    int64_t now_ms = now_us / 1000;
    if (!kh_throttle_pass(self->seen, identity, now_ms))
        return false;
    if (room && kh_ratelimit_take(self->audits, "", now_us) == 0)
        return true;
    *tell = kh_tally_add(&self->unaudited, self->log_ms, now_ms);
    return false;
}

uint64_t kh_refusal_gate_flush(kh_refusal_gate_t *self, int64_t now_us,
                               bool final)
{
    return kh_tally_flush(&self->unaudited, final ? 0 : self->log_ms,
                          now_us / 1000);
}
