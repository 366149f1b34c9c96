/*
 * An arena for jansson values that die together: the decoded requests of
 * one batch. While an arena is entered, the values jansson makes on this
 * thread are carved out of the arena's chunks instead of malloc'd one by
 * one, and freeing such a value (json_decref, or jansson replacing it) is
 * a no-op; kh_jarena_reset forgets them all at once. A request's tree of
 * a hundred small values then costs no malloc or free of its own, and the
 * tree lies together in memory.
 *
 * Rules: a value made in an arena is used only on the thread that made
 * it, and nothing refers to it, reads it or frees it after the arena's
 * reset or destruction (the arena's memory may hold other values by
 * then).
 * Values made outside an arena are jansson's as usual (malloc and free),
 * on every thread.
 */
#ifndef KH_JARENA_H_INCLUDED
#define KH_JARENA_H_INCLUDED

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_jarena_t kh_jarena_t;

/* A new arena for the calling thread, which keeps up to `keep` bytes of
 * chunks across resets (the rest goes back to malloc). NULL on OOM. */
kh_jarena_t *kh_jarena_new(size_t keep);

/* Destroy (on the thread that made it); accepts NULL and a pointer to
 * NULL. Its values must be gone. */
void kh_jarena_destroy(kh_jarena_t **self_p);

/* Make jansson allocate from arena (NULL: from the heap) on this thread
 * from now on. Returns the arena that was entered before. */
kh_jarena_t *kh_jarena_enter(kh_jarena_t *arena);

/* Forget every value made in the arena. */
void kh_jarena_reset(kh_jarena_t *self);

/* The memory the values made since the last reset take up: the bytes
 * handed out, and the ends of the chunks they filled that were left
 * unused (what a bound on memory counts). */
size_t kh_jarena_used(const kh_jarena_t *self);

#ifdef __cplusplus
}
#endif
#endif
