/*
 * At most once per interval per key (see throttle.h).
 */
#include "ketenhub/throttle.h"

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
