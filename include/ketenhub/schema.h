/*
 * Validation of documents against the JSON Schemas in schemas/. The schema
 * file is the contract partner developers read; this validator is driven by
 * that same file, so what the schema refuses intake refuses and the other
 * way round. It implements the subset of JSON Schema (draft 2020-12) that
 * our schemas use, and refuses to load a schema that uses any keyword
 * outside that subset, so the two can never silently disagree.
 *
 * Supported keywords: $schema, $id, $defs, $ref (local "#/$defs/name"),
 * title, description, $comment, examples, type (string or array of
 * strings), properties, required, additionalProperties (false or schema),
 * enum, const, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
 * minLength, maxLength (code points), pattern (anchored POSIX ERE subset),
 * format ("date", "date-time"), items, minItems, maxItems, uniqueItems,
 * allOf, anyOf, oneOf, not, if/then/else.
 */
#ifndef KH_SCHEMA_H_INCLUDED
#define KH_SCHEMA_H_INCLUDED

#include <jansson.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_schema_t kh_schema_t;

/* Load and compile a schema file. Returns NULL and fills err (KH_E_IO,
 * or KH_E_SCHEMA_INVALID with the line and the keyword's path) when the
 * file cannot be read or uses something outside the subset. */
kh_schema_t *kh_schema_load(const char *path, kh_error_t *err);

/* Destroy a schema; accepts NULL and a pointer to NULL; sets *self_p NULL. */
void kh_schema_destroy(kh_schema_t **self_p);

/* The schema's $id, e.g. "https://ketenhub.nl/schemas/referral.v1.json". */
const char *kh_schema_id(const kh_schema_t *self);

/* Validate doc. Returns 0 when it conforms; otherwise -1 with the first
 * violation in document order: code (KH_E_SCHEMA_*), the path of the field
 * ("subject.age", "indicators[2]"; "" for the root) and a message that
 * never quotes the offending value (it may be personal data). */
int kh_schema_validate(const kh_schema_t *self, const json_t *doc,
                       kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
