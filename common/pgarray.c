/*
 * PostgreSQL array parameters (see pgarray.h).
 */
#include "ketenhub/pgarray.h"

#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The binary header: dimensions, flags (has nulls), element type, then
 * the one dimension's length and lower bound; all int32, network order. */
#define S_BIN_HEADER 20

static void s_put32(char *out, uint32_t v)
{
    out[0] = (char) (v >> 24);
    out[1] = (char) (v >> 16);
    out[2] = (char) (v >> 8);
    out[3] = (char) v;
}

/* Room for need more bytes. */
static bool s_bin_reserve(kh_pgarray_t *self, size_t need)
{
    if (self->failed)
        return false;
    if (self->len + need <= self->cap)
        return true;
    size_t cap = self->cap ? self->cap : 1024;
    while (cap < self->len + need)
        cap *= 2;
    char *data = realloc(self->data, cap);
    if (!data) {
        self->failed = true;
        return false;
    }
    self->data = data;
    self->cap = cap;
    return true;
}

void kh_pgarray_reset(kh_pgarray_t *self, unsigned element_oid)
{
    self->len = 0;
    self->count = 0;
    self->oid = element_oid;
    self->has_null = false;
    self->failed = false;
    if (s_bin_reserve(self, S_BIN_HEADER))
        self->len = S_BIN_HEADER;
}

/* Room for one more element of len bytes, its length written; NULL when
 * the array failed. */
static char *s_bin_element(kh_pgarray_t *self, size_t len)
{
    if (self->len < S_BIN_HEADER || len > INT32_MAX - 4 ||
        !s_bin_reserve(self, 4 + len)) {
        self->failed = true;
        return NULL;
    }
    char *out = self->data + self->len;
    s_put32(out, (uint32_t) len);
    self->len += 4 + len;
    self->count++;
    return out + 4;
}

static void s_bin_null(kh_pgarray_t *self)
{
    if (self->len < S_BIN_HEADER || !s_bin_reserve(self, 4)) {
        self->failed = true;
        return;
    }
    s_put32(self->data + self->len, UINT32_MAX); /* length -1 */
    self->len += 4;
    self->count++;
    self->has_null = true;
}

void kh_pgarray_add(kh_pgarray_t *self, const void *item, size_t len)
{
    if (!item) {
        s_bin_null(self);
        return;
    }
    char *out = s_bin_element(self, len);
    if (out && len)
        memcpy(out, item, len);
}

void kh_pgarray_add_str(kh_pgarray_t *self, const char *item)
{
    kh_pgarray_add(self, item, item ? strlen(item) : 0);
}

void kh_pgarray_add_uuid(kh_pgarray_t *self, const char *uuid)
{
    if (!uuid) {
        s_bin_null(self);
        return;
    }
    /* 32 hex digits, 36 characters with the hyphens where PostgreSQL
     * prints them. */
    unsigned char bytes[16];
    size_t n = 0;
    const char *end = NULL;
    if (strlen(uuid) != 36 || uuid[8] != '-' || uuid[13] != '-' ||
        uuid[18] != '-' || uuid[23] != '-' ||
        sodium_hex2bin(bytes, sizeof bytes, uuid, 36, "-", &n, &end) != 0 ||
        n != sizeof bytes || *end != '\0') {
        self->failed = true;
        return;
    }
    char *out = s_bin_element(self, sizeof bytes);
    if (out)
        memcpy(out, bytes, sizeof bytes);
}

const char *kh_pgarray_data(kh_pgarray_t *self, int *len)
{
    if (self->failed || self->len < S_BIN_HEADER || self->len > INT32_MAX)
        return NULL;
    /* No elements: no dimension (an empty array). */
    s_put32(self->data, self->count ? 1 : 0);
    s_put32(self->data + 4, self->has_null ? 1 : 0);
    s_put32(self->data + 8, self->oid);
    s_put32(self->data + 12, (uint32_t) self->count);
    s_put32(self->data + 16, 1);
    *len = self->count ? (int) self->len : 12;
    return self->data;
}

void kh_pgarray_free(kh_pgarray_t *self)
{
    free(self->data);
    memset(self, 0, sizeof *self);
}
