/*
 * At most once per interval per key: for work that a peer could otherwise
 * make the hub repeat without limit (an audit event for every refused
 * handshake, a registry reload for every unknown key).
 */
#ifndef KH_THROTTLE_H_INCLUDED
#define KH_THROTTLE_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_throttle_t kh_throttle_t;

/* Remembers up to max_keys keys (then forgets them all: memory stays
 * bounded whatever the peers send). NULL on OOM. */
kh_throttle_t *kh_throttle_new(int64_t interval_ms, size_t max_keys);

/* Destroy; accepts NULL and a pointer to NULL. */
void kh_throttle_destroy(kh_throttle_t **self_p);

/* True, and remembers now_ms for key, when key did not pass in the last
 * interval; false otherwise. Out of memory counts as passing, unrecorded. */
bool kh_throttle_pass(kh_throttle_t *self, const char *key, int64_t now_ms);

/* The events left out of the log (refused handshakes past a bound, say),
 * counted and told in one line at most once per interval. Zeroed: none
 * counted, never told. */
typedef struct {
    uint64_t count;  /* events since the count was last told */
    int64_t told_ms; /* when it was, 0: never */
} kh_tally_t;

/* Count one event at now_ms. Returns the count to tell (this event
 * included), counting again from 0, when the count was never told or
 * interval_ms has passed since it was; 0 otherwise. */
uint64_t kh_tally_add(kh_tally_t *self, int64_t interval_ms, int64_t now_ms);

#ifdef __cplusplus
}
#endif
#endif
