/*
 * PostgreSQL array literals in text form ({"a","b",NULL}), built one
 * element at a time, for statements that take a whole batch as array
 * parameters (unnest) instead of one statement per row.
 */
#ifndef KH_PGARRAY_H_INCLUDED
#define KH_PGARRAY_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char *data;   /* the literal so far, always closed: "{...}" */
    size_t len;   /* bytes before the closing brace */
    size_t cap;   /* allocated bytes of data */
    size_t count; /* elements */
    bool oom;     /* an allocation failed: the literal is incomplete */
} kh_pgarray_t;

/* Empty the array (keeps its memory); a zeroed kh_pgarray_t is empty too. */
void kh_pgarray_reset(kh_pgarray_t *self);

/* Append item (any text: quoted, " and \ escaped), or NULL for a NULL
 * element. */
void kh_pgarray_add(kh_pgarray_t *self, const char *item);

/* The literal, valid until the next add or reset; NULL when an allocation
 * failed on the way. */
const char *kh_pgarray_text(kh_pgarray_t *self);

/* Free the memory; the array is empty afterwards. */
void kh_pgarray_free(kh_pgarray_t *self);

#ifdef __cplusplus
}
#endif
#endif
