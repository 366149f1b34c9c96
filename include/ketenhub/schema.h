/*
 * Validation of documents against the JSON Schemas in schemas/. The schema
 * file is the contract partner developers read; this validator is driven by
 * that same file, so what the schema refuses intake refuses and the other
 * way round. It implements the subset of JSON Schema (draft 2020-12) that
 * our schemas use, and refuses to load a schema that uses any keyword
 * outside that subset, so the two can never silently disagree.
 *
 * Supported keywords: $schema (draft 2020-12 only), $id, $defs (top level
 * only), $ref (local "#/$defs/name", not recursive), title, description,
 * $comment, examples, type (string or array of strings), properties,
 * required, additionalProperties (false or schema), enum, const, minimum,
 * maximum, exclusiveMinimum, exclusiveMaximum, minLength, maxLength (code
 * points), pattern, format ("date", "date-time"), items (a schema),
 * minItems, maxItems, uniqueItems, contains, allOf, anyOf, oneOf, not,
 * if/then/else. Boolean schemas (true, false) are allowed. Property and
 * required names must be identifiers ([A-Za-z_][A-Za-z0-9_]*) so that a
 * field path is unambiguous. An unknown format is refused too.
 *
 * Patterns are compiled once, at load, as POSIX ERE (regcomp with
 * REG_EXTENDED | REG_NOSUB) in the C locale. JSON Schema means ECMA-262,
 * so a pattern is accepted only in the subset where the two agree: it is
 * anchored (^ first, $ last, nowhere else), printable ASCII, without
 * backslashes, ".", "(?", lazy quantifiers or "|" outside parentheses;
 * brackets hold literals and ranges only; a negated bracket appears only
 * under "*" or "+" (so counting bytes and counting code points agree).
 * A string containing a NUL byte never matches a pattern. Python's re
 * (used by python3-jsonschema) differs in one point: its "$" also matches
 * before a final newline, so it accepts "GM0402\n" where ECMA-262 and this
 * validator do not.
 *
 * Numbers: 1 and 1.0 are equal, and a number without a fraction is an
 * "integer", as the draft says. Formats: "date" is an RFC 3339 full-date
 * naming a real calendar day (years 0001-9999); "date-time" is an RFC 3339
 * date-time ("T"/"Z" in either case, offset Z or +hh:mm/-hh:mm, no leap
 * second: seconds up to 59 as in Python's rfc3339-validator).
 *
 * Errors (kh_schema_validate) carry a code, a path and a message:
 *   schema.type          wrong JSON type
 *   schema.required      missing field; path is the missing field's path
 *   schema.unknown_field field the schema does not allow (path: that field;
 *                        a name that is not an identifier is shown as "?")
 *   schema.enum / schema.const   not an allowed value
 *   schema.range         minimum, maximum, exclusive bounds
 *   schema.length        minLength, maxLength
 *   schema.pattern       pattern; schema.format   format
 *   schema.items         minItems, maxItems, contains
 *   schema.unique        uniqueItems (path: the repeating item)
 *   schema.condition     a failed if/then/else, anyOf, oneOf, not or false
 *                        schema; for if/then the path is where the branch
 *                        failed ("subject.minor") and the message is the
 *                        title of the schema holding the condition.
 * The message is fixed text or schema text, never the document's value.
 * Which violation is first: per schema node, $ref, type, const, enum, the
 * string/number/array/object keywords, then allOf, anyOf, oneOf, not,
 * if/then/else; in an object, unknown fields first (document order), then
 * properties in schema order; in an array, size, then items in order.
 *
 * A loaded schema is read-only: one kh_schema_t may validate in several
 * threads at once.
 */
#ifndef KH_SCHEMA_H_INCLUDED
#define KH_SCHEMA_H_INCLUDED

#include <jansson.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_schema_t kh_schema_t;

/* Load and compile a schema file (at most 4 MiB, duplicate keys refused).
 * Returns NULL and fills err when the file cannot be read (KH_E_IO) or is
 * not valid JSON or uses something outside the subset (KH_E_SCHEMA_INVALID,
 * path = the JSON Pointer of the offending keyword, e.g.
 * "/properties/subject/properties/age/maximun", with its line and column). */
kh_schema_t *kh_schema_load(const char *path, kh_error_t *err);

/* Destroy a schema; accepts NULL and a pointer to NULL; sets *self_p NULL. */
void kh_schema_destroy(kh_schema_t **self_p);

/* The schema's $id, e.g. "https://ketenhub.nl/schemas/referral.v1.json";
 * "" when it has none. Valid as long as the schema. */
const char *kh_schema_id(const kh_schema_t *self);

/* Validate doc. Returns 0 when it conforms; otherwise -1 with the first
 * violation (order above): code (KH_E_SCHEMA_*), the path of the field
 * ("subject.age", "indicators[2]"; "" for the root) and a message that
 * never quotes the offending value (it may be personal data). err may be
 * NULL. Allocates nothing; a referral takes a few microseconds. */
int kh_schema_validate(const kh_schema_t *self, const json_t *doc,
                       kh_error_t *err);

/* Whether name[0..len) is a field name of the contract: a name under
 * "properties" or "required" anywhere in the schema. A document's key that
 * is not is the sender's own choice and may be data (a name, a birth
 * date), so paths that go into the audit trail or the logs show it as "?"
 * (see kh_proto_trail_path). self may be NULL: then no name is. */
bool kh_schema_has_name(const kh_schema_t *self, const char *name, size_t len);

#ifdef __cplusplus
}
#endif
#endif
