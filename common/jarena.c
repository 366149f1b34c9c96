/*
 * Arenas for jansson values (jarena.h). jansson has one pair of
 * allocation functions for the whole process; these serve the heap as
 * before (malloc and free, so that a string jansson returns can still be
 * given to free) unless the calling thread has entered an arena.
 */
#include "ketenhub/jarena.h"

#include <jansson.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>

/* Under AddressSanitizer the bytes of an arena that are not handed out
 * are poisoned, and a reset keeps no chunk (ASan's quarantine then holds
 * them back from reuse), so that a value used after its arena's reset is
 * caught like a use after free. */
#if defined(__SANITIZE_ADDRESS__)
#define S_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define S_ASAN 1
#endif
#endif
#ifdef S_ASAN
#include <sanitizer/asan_interface.h>
#define S_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define S_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#define S_KEEPS 0
#else
#define S_KEEPS 1
#define S_POISON(p, n) ((void) (p), (void) (n))
#define S_UNPOISON(p, n) ((void) (p), (void) (n))
#endif

#define S_ALIGN 16
#define S_CHUNK (256 * 1024)  /* bytes of a chunk's data */
#define S_LARGE (S_CHUNK / 4) /* larger values get a chunk of their own */

typedef struct s_chunk {
    struct s_chunk *next;
    size_t size; /* bytes of data */
    size_t used;
} s_chunk_t;

/* The data of a chunk follows its header, aligned. */
#define S_HEADER ((sizeof(s_chunk_t) + S_ALIGN - 1) & ~(size_t) (S_ALIGN - 1))
#define S_DATA(c) ((unsigned char *) (c) + S_HEADER)

struct _kh_jarena_t {
    s_chunk_t *chunks; /* in use, the one allocated from first */
    s_chunk_t *spare;  /* emptied by a reset, kept for reuse */
    size_t keep;       /* bytes of chunks a reset keeps */
    size_t used;       /* kh_jarena_used */
    kh_jarena_t *next; /* the thread's other arenas */
};

static _Thread_local kh_jarena_t *s_current; /* where jansson allocates */
static _Thread_local kh_jarena_t *s_arenas;  /* the thread's arenas */
static pthread_once_t s_once = PTHREAD_ONCE_INIT;

/* Whether p is in one of the chunks that hold the arena's values (a
 * value freed after its arena's reset is not: libc's free() then fails
 * loudly rather than a reused chunk being corrupted quietly). */
static bool s_owns(const kh_jarena_t *self, const void *p)
{
    const unsigned char *b = p;
    for (const s_chunk_t *c = self->chunks; c; c = c->next)
        if (b >= S_DATA(c) && b < S_DATA(c) + c->size)
            return true;
    return false;
}

static void *s_alloc(kh_jarena_t *self, size_t size)
{
    if (size > SIZE_MAX / 2)
        return NULL;
    size_t n = (size + S_ALIGN - 1) & ~(size_t) (S_ALIGN - 1);
    s_chunk_t *c = self->chunks;
    if (!c || c->size - c->used < n) {
        if (n <= S_LARGE && self->spare) {
            c = self->spare;
            self->spare = c->next;
        } else {
            size_t data = n > S_LARGE ? n : S_CHUNK;
            c = malloc(S_HEADER + data);
            if (!c)
                return NULL;
            c->size = data;
            S_POISON(S_DATA(c), data);
        }
        c->used = 0;
        /* A chunk of its own goes behind the current one, which keeps
         * serving the small values. */
        if (n > S_LARGE && self->chunks) {
            c->next = self->chunks->next;
            self->chunks->next = c;
        } else {
            /* The rest of the chunk it replaces stays unused: count it. */
            if (self->chunks)
                self->used += self->chunks->size - self->chunks->used;
            c->next = self->chunks;
            self->chunks = c;
        }
    }
    void *p = S_DATA(c) + c->used;
    c->used += n;
    self->used += n;
    S_UNPOISON(p, size);
    return p;
}

static void *s_json_malloc(size_t size)
{
    return s_current ? s_alloc(s_current, size) : malloc(size);
}

static void s_json_free(void *p)
{
    for (const kh_jarena_t *a = s_arenas; a; a = a->next)
        if (s_owns(a, p))
            return;
    free(p);
}

static void s_install(void)
{
    json_set_alloc_funcs(s_json_malloc, s_json_free);
}

kh_jarena_t *kh_jarena_new(size_t keep)
{
    pthread_once(&s_once, s_install);
    kh_jarena_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->keep = keep;
    self->next = s_arenas;
    s_arenas = self;
    return self;
}

static void s_free_chunks(s_chunk_t *c)
{
    while (c) {
        s_chunk_t *next = c->next;
        S_UNPOISON(S_DATA(c), c->size);
        free(c);
        c = next;
    }
}

void kh_jarena_destroy(kh_jarena_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_jarena_t *self = *self_p;
    if (s_current == self)
        s_current = NULL;
    for (kh_jarena_t **a = &s_arenas; *a; a = &(*a)->next)
        if (*a == self) {
            *a = self->next;
            break;
        }
    s_free_chunks(self->chunks);
    s_free_chunks(self->spare);
    free(self);
    *self_p = NULL;
}

kh_jarena_t *kh_jarena_enter(kh_jarena_t *arena)
{
    kh_jarena_t *was = s_current;
    s_current = arena;
    return was;
}

void kh_jarena_reset(kh_jarena_t *self)
{
    size_t kept = 0;
    for (s_chunk_t *c = self->spare; c; c = c->next)
        kept += c->size;
    s_chunk_t *c = self->chunks;
    while (c) {
        s_chunk_t *next = c->next;
        if (S_KEEPS && c->size == S_CHUNK && kept + c->size <= self->keep) {
            S_POISON(S_DATA(c), c->size);
            c->next = self->spare;
            self->spare = c;
            kept += c->size;
        } else {
            S_UNPOISON(S_DATA(c), c->size);
            free(c);
        }
        c = next;
    }
    self->chunks = NULL;
    self->used = 0;
}

size_t kh_jarena_used(const kh_jarena_t *self)
{
    return self->used;
}
