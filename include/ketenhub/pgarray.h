/*
 * PostgreSQL array parameters, built one element at a time, for statements
 * that take a whole batch as arrays (unnest) instead of one statement per
 * row.
 */
#ifndef KH_PGARRAY_H_INCLUDED
#define KH_PGARRAY_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An array in PostgreSQL's binary format (array_recv), for a parameter
 * sent with format 1 (see kh_pgarray_data): the server copies each
 * element instead of unquoting and parsing a text literal, which for large
 * elements (payloads) is most of the cost of a text array. An element is
 * its type's binary form: bytes as they are for bytea and text (UTF-8),
 * 16 bytes for a uuid (kh_pgarray_add_uuid). */
typedef struct {
    char *data;    /* header, then (length, bytes) per element */
    size_t len;    /* bytes used */
    size_t cap;    /* allocated bytes of data */
    size_t count;  /* elements */
    unsigned oid;  /* the element type (KH_PG_BYTEA, ...) */
    bool has_null; /* a NULL element was added */
    bool failed;   /* an allocation or a uuid failed: do not send */
} kh_pgarray_t;

/* PostgreSQL's type oids of the elements the hub sends (pg_type.dat). */
#define KH_PG_BYTEA 17u
#define KH_PG_TEXT 25u
#define KH_PG_UUID 2950u

/* Empty the array and set its element type (keeps its memory); before
 * the first add too. */
void kh_pgarray_reset(kh_pgarray_t *self, unsigned element_oid);

/* Append len bytes of item, or a NULL element when item is NULL. */
void kh_pgarray_add(kh_pgarray_t *self, const void *item, size_t len);

/* Append the string item (without its NUL), or a NULL element. */
void kh_pgarray_add_str(kh_pgarray_t *self, const char *item);

/* Append a uuid given as text (36 characters, hex digits and hyphens as
 * PostgreSQL prints them), or a NULL element. A malformed uuid fails the
 * array. */
void kh_pgarray_add_uuid(kh_pgarray_t *self, const char *uuid);

/* The array's bytes and their count in *len, valid until the next add or
 * reset; NULL when an add failed (out of memory, malformed uuid). */
const char *kh_pgarray_data(kh_pgarray_t *self, int *len);

/* Free the memory; the array is empty afterwards. */
void kh_pgarray_free(kh_pgarray_t *self);

#ifdef __cplusplus
}
#endif
#endif
