/*
 * The reference for the hub's canonical JSON (kh_payload_canonical), shared
 * by test_proto and the fuzz_intake harness: jansson's json_dumps with
 * JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII | JSON_ENCODE_ANY of
 * the value with every whole number held as a real written as the integer
 * it is (schemas/protocol.md). Header only: the fuzz harnesses link no
 * test library.
 */
#ifndef KHCANON_H_INCLUDED
#define KHCANON_H_INCLUDED

#include <jansson.h>

/* A copy of v with every whole number below 2^53 held as a real (120.0,
 * -0.0) held as the integer it is: the value the canonical JSON parses
 * back to. Built by hand: json_deep_copy cuts keys at a NUL. NULL when
 * memory runs out. */
static inline json_t *khcanon_whole_reals_as_integers(const json_t *v)
{
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d > -9007199254740992.0 && d < 9007199254740992.0 &&
            (double) (long long) d == d)
            return json_integer((json_int_t) d);
    } else if (json_is_array(v)) {
        json_t *a = json_array();
        for (size_t i = 0; a && i < json_array_size(v); i++) {
            json_t *item =
                khcanon_whole_reals_as_integers(json_array_get(v, i));
            if (json_array_append_new(a, item)) {
                json_decref(a);
                a = NULL;
            }
        }
        return a;
    } else if (json_is_object(v)) {
        json_t *o = json_object();
        const char *key;
        size_t len;
        json_t *item;
        json_t *object = (json_t *) v; /* the macro takes no const */
        json_object_keylen_foreach(object, key, len, item)
        {
            if (o && json_object_setn_new(
                         o, key, len, khcanon_whole_reals_as_integers(item))) {
                json_decref(o);
                o = NULL;
            }
        }
        return o;
    }
    return json_incref((json_t *) v);
}

/* The canonical JSON of v as the reference writes it; free() it. */
static inline char *khcanon_reference(const json_t *v)
{
    json_t *copy = khcanon_whole_reals_as_integers(v);
    if (!copy)
        return NULL;
    char *text = json_dumps(copy, JSON_COMPACT | JSON_SORT_KEYS |
                                      JSON_ENSURE_ASCII | JSON_ENCODE_ANY);
    json_decref(copy);
    return text;
}

#endif
