/*
 * At most once per interval per key: for work that a peer could otherwise
 * make the hub repeat without limit (an audit event for every refused
 * handshake, a registry reload for every unknown key). Also the tally of
 * events left out of the log, and the refusal gate that puts both and a
 * rate limit together for refused handshakes.
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

/* What is left of the count, for a timer to tell once the events stop
 * (kh_tally_add tells only when one more comes): returns the count,
 * counting again from 0, when it is not 0 and interval_ms has passed
 * since it was last told, or interval_ms is 0 (at shutdown); 0 otherwise.
 * So every counted event is told once, at most one interval late. */
uint64_t kh_tally_flush(kh_tally_t *self, int64_t interval_ms, int64_t now_ms);

/* The refusal gate: what refused handshakes may cost. Anyone who can reach
 * a port can present made-up keys without end, each refused once; the
 * gate lets a refusal into the trail once per repeat_ms per identity (a
 * client retrying its handshake), and at most burst at once and rate a
 * second on average over all identities together; past that a refusal is
 * only counted, and the count told at most once per log_ms. It owns its
 * throttle, rate limit and tally; the caller logs and audits. */
typedef struct _kh_refusal_gate_t kh_refusal_gate_t;

/* The bounds the hub's partner-facing services (intake, notification)
 * give their gates: one audit per identity a minute; 1 a second and 60 at
 * once over all identities; the count of the rest told every 10 s. */
#define KH_REFUSAL_REPEAT_MS 60000
#define KH_REFUSAL_RATE 1.0
#define KH_REFUSAL_BURST 60.0
#define KH_REFUSAL_LOG_MS 10000

/* repeat_ms > 0, rate > 0, burst >= 1, log_ms > 0. NULL on OOM or bad
 * arguments. */
kh_refusal_gate_t *kh_refusal_gate_new(int64_t repeat_ms, double rate,
                                       double burst, int64_t log_ms);

/* Destroy; accepts NULL and a pointer to NULL. The caller flushes first
 * (kh_refusal_gate_flush with final) so that no count goes untold. */
void kh_refusal_gate_destroy(kh_refusal_gate_t **self_p);

/* Decide about one refusal of identity (the caller's choice of what tells
 * refusals apart: "key peer", say) at now_us, a monotonic clock in
 * microseconds (zclock_usecs). Returns true: audit it. False: leave it
 * out; *tell is then the count of left-out refusals to log now (this one
 * included; 0: not yet, a later call or kh_refusal_gate_flush tells it).
 * A repeat of identity within repeat_ms is left out uncounted (its first
 * was audited or counted). room false (the caller has nowhere to keep one
 * more audit) counts a refusal that would have passed, without taking
 * from the rate. */
bool kh_refusal_gate_pass(kh_refusal_gate_t *self, const char *identity,
                          bool room, int64_t now_us, uint64_t *tell);

/* The count of left-out refusals not told yet, to log now: once log_ms
 * has passed since the last was told (call it from a timer), or at once
 * when final (at shutdown). 0: nothing to tell. Each counted refusal is
 * told once, by this or by kh_refusal_gate_pass. */
uint64_t kh_refusal_gate_flush(kh_refusal_gate_t *self, int64_t now_us,
                               bool final);

#ifdef __cplusplus
}
#endif
#endif
