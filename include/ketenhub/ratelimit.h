/*
 * A token bucket per key (a partner): rate tokens a second, at most burst
 * saved up. For refusing a partner that sends faster than it may, before
 * its requests cost the hub any work.
 */
#ifndef KH_RATELIMIT_H_INCLUDED
#define KH_RATELIMIT_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_ratelimit_t kh_ratelimit_t;

/* rate > 0 tokens a second, burst >= 1 at most; a new key starts full.
 * At most max_keys keys are kept (then they all start over). NULL on OOM
 * or bad arguments. */
kh_ratelimit_t *kh_ratelimit_new(double rate, double burst, size_t max_keys);

/* Destroy; accepts NULL and a pointer to NULL. */
void kh_ratelimit_destroy(kh_ratelimit_t **self_p);

/* Take a token for key at now_us (a monotonic clock in microseconds): 0
 * when there was one, else the milliseconds (>= 1) until there will be.
 * Out of memory lets the request pass. */
int64_t kh_ratelimit_take(kh_ratelimit_t *self, const char *key,
                          int64_t now_us);

/* For work counted once it is done (a refusal that went into the trail):
 * wait gives the milliseconds until key has a token again (0: it has one;
 * none is taken), charge takes one whatever is left, down to one burst
 * below empty, so that a key that overspent waits that much longer. */
int64_t kh_ratelimit_wait(kh_ratelimit_t *self, const char *key,
                          int64_t now_us);
void kh_ratelimit_charge(kh_ratelimit_t *self, const char *key, int64_t now_us);

/* Give back a token charged for work that turned out not to count. */
void kh_ratelimit_refund(kh_ratelimit_t *self, const char *key, int64_t now_us);

#ifdef __cplusplus
}
#endif
#endif
