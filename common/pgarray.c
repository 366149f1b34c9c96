/*
 * PostgreSQL array literals (see pgarray.h).
 */
#include "ketenhub/pgarray.h"

#include <stdlib.h>
#include <string.h>

/* Room for need more bytes and the closing "}\0". */
static bool s_reserve(kh_pgarray_t *self, size_t need)
{
    if (self->oom)
        return false;
    size_t want = self->len + need + 2;
    if (want <= self->cap)
        return true;
    size_t cap = self->cap ? self->cap : 256;
    while (cap < want)
        cap *= 2;
    char *data = realloc(self->data, cap);
    if (!data) {
        self->oom = true;
        return false;
    }
    self->data = data;
    self->cap = cap;
    return true;
}

void kh_pgarray_reset(kh_pgarray_t *self)
{
    self->len = 0;
    self->count = 0;
    self->oom = false;
    if (s_reserve(self, 1)) {
        self->data[self->len++] = '{';
        memcpy(self->data + self->len, "}", 2);
    }
}

void kh_pgarray_add(kh_pgarray_t *self, const char *item)
{
    if (!self->data || self->len == 0)
        kh_pgarray_reset(self);
    size_t size = item ? 2 * strlen(item) + 2 : 4;
    if (!s_reserve(self, size + 1))
        return;
    char *out = self->data + self->len;
    if (self->count++)
        *out++ = ',';
    if (!item) {
        memcpy(out, "NULL", 4);
        out += 4;
    } else {
        *out++ = '"';
        for (const char *c = item; *c; c++) {
            if (*c == '"' || *c == '\\')
                *out++ = '\\';
            *out++ = *c;
        }
        *out++ = '"';
    }
    self->len = (size_t) (out - self->data);
    memcpy(self->data + self->len, "}", 2);
}

const char *kh_pgarray_text(kh_pgarray_t *self)
{
    if (!self->data || self->len == 0)
        kh_pgarray_reset(self);
    return self->oom ? NULL : self->data;
}

void kh_pgarray_free(kh_pgarray_t *self)
{
    free(self->data);
    memset(self, 0, sizeof *self);
}
