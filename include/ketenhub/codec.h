/*
 * MessagePack envelope codec. Bodies on the wire are MessagePack; inside
 * the hub a decoded body is a jansson value (json_t), the same model the
 * JSON side of the partner client uses, so a referral is validated and
 * stored the same way whichever way it came in.
 *
 * The decoder enforces every limit *before* allocating for it: a header
 * that claims more elements or bytes than the frame still holds is refused
 * without allocation, as is nesting past max_depth. It never aborts the
 * process on any input. It tells "interrupted" (the input ends inside a
 * value: KH_E_INTERRUPTED) from "malformed" (bytes that are not valid
 * MessagePack, trailing bytes after the value, or types the hub does not
 * accept: KH_E_MALFORMED / KH_E_UNSUPPORTED_TYPE).
 *
 * Accepted types: nil, bool, integers (int64 range; uint64 above INT64_MAX
 * is refused), float32/64 (finite only), str (valid UTF-8, no NUL), array,
 * map with str keys. bin and ext are refused (KH_E_UNSUPPORTED_TYPE).
 */
#ifndef KH_CODEC_H_INCLUDED
#define KH_CODEC_H_INCLUDED

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    size_t max_frame;    /* bytes in one frame; default 256 KiB */
    size_t max_depth;    /* nesting of arrays/maps; default 16, at most 16 */
    size_t max_elements; /* entries in one array or map; default 1024 */
    size_t max_total;    /* values in the whole frame; default 65536 */
    size_t max_string;   /* bytes in one string or key; default 64 KiB */
} kh_limits_t;

/* How the limits count. A value nested in n arrays/maps is at depth n: a
 * bare scalar is at 0, so max_depth 16 takes 16 nested containers and
 * refuses the 17th; a max_depth above 16 is taken as 16. max_total counts
 * every MessagePack value, containers and map keys included ({"a": [1]} is
 * 4). Limits are taken literally (0 means none allowed). */

/* The default limits above. */
kh_limits_t kh_limits_default(void);

/* Decode exactly one MessagePack value filling the whole of data[0..size).
 * On success returns 0 and stores a new reference in *out (caller owns it:
 * json_decref). On failure returns -1, *out is NULL, and err says why with
 * the path of the offending element ("referral.subject.age",
 * "items[3]", "" for the root); the message names the byte offset and
 * never a value. limits NULL means the defaults.
 *
 * Codes: a frame over max_frame is KH_E_TOO_LARGE (checked first). A
 * container header is checked, before anything is built for it, for depth
 * (KH_E_TOO_DEEP), then its count against max_elements (KH_E_TOO_MANY),
 * then against the bytes left, at least 1 per array element and 2 per map
 * entry (KH_E_INTERRUPTED), then against max_total (KH_E_TOO_MANY); so a
 * 5-byte array32 claiming 2^32-1 elements is too_many_elements under the
 * default limits, interrupted under limits that allow the count. A str
 * header is checked against max_string (KH_E_STRING_TOO_LONG), then the
 * bytes left (KH_E_INTERRUPTED). Strings and keys that are not valid UTF-8
 * or hold a NUL byte are KH_E_INVALID_UTF8. A repeated key is
 * KH_E_DUPLICATE_KEY with the path of the repeat. A non-str key, the
 * unused byte 0xc1 and trailing bytes are KH_E_MALFORMED; for an error in
 * a key itself the path is the map's. */
int kh_msgpack_decode(const void *data, size_t size, const kh_limits_t *limits,
                      json_t **out, kh_error_t *err);

/* Find the str value of key at the top of a map in data[0..size) without
 * decoding it: for answering a frame that kh_msgpack_decode refused with
 * the correlation id it may still hold. The other values are skipped, not
 * checked, so a bad value before or after the key does not hide it. On
 * success returns true and copies the value into out as a C string; the
 * value must be 1 to out_size - 1 bytes of valid UTF-8 without NUL. False
 * when data is no map, the key is not found before the bytes run out, or
 * its value is not such a string. Reads each byte at most once, allocates
 * nothing, and takes any input. */
bool kh_msgpack_peek_str(const void *data, size_t size, const char *key,
                         char *out, size_t out_size);

/* The same for an integer value of key (any MessagePack int that fits an
 * int64_t), stored in *out: for telling a frame of another protocol
 * version, which kh_msgpack_decode may refuse under this version's rules,
 * by its v. False when data is no map, the key is not found, or its value
 * is no such integer. */
bool kh_msgpack_peek_int(const void *data, size_t size, const char *key,
                         int64_t *out);

/* Encode value as MessagePack into a new malloc'd buffer. On success returns
 * 0, *data (caller frees with free) and *size. Integers as the smallest
 * MessagePack int, reals as float64, strings as str. Fails with
 * KH_E_TOO_DEEP past 16 levels, KH_E_NOMEM on allocation failure. */
int kh_msgpack_encode(const json_t *value, char **data, size_t *size,
                      kh_error_t *err);

/* Whether s[0..len) is valid UTF-8 (no overlongs, no surrogates, nothing
 * above U+10FFFF). A NUL byte is valid UTF-8 here; the decoder refuses it
 * on its own. s NULL is valid only with len 0. */
bool kh_utf8_valid(const char *s, size_t len);

/* The number of Unicode code points in s[0..len), valid UTF-8: every byte
 * that is not a continuation byte starts one. (JSON Schema's minLength
 * and maxLength count these.) */
size_t kh_utf8_length(const char *s, size_t len);

/* Whether s (NUL-ended) is valid UTF-8 holding no control character: no
 * C0 (U+0000..U+001F), no DEL, no C1 (U+0080..U+009F), as a one-line name
 * the database admits must be. */
bool kh_text_plain(const char *s);

#ifdef __cplusplus
}
#endif
#endif
