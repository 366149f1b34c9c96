/*
 * Unit tests of the schema validator (common/schema.c) and of the referral
 * contract (schemas/referral.v1.json): every example is valid, every case
 * of the invalid corpus (schemas/invalid/) is refused with its expected
 * code and path, each keyword of the subset behaves as the draft says,
 * schemas outside the subset are refused at load, and validation is fast
 * enough for intake. tests/unit/schema_crosscheck.py checks the same files
 * against python3-jsonschema.
 */
#include "khtest.h"

#include "ketenhub/schema.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define REFERRAL_SCHEMA "schemas/referral.v1.json"

/* Write a schema text (single quotes allowed) to a temporary file and
 * load it. */
static kh_schema_t *s_load_text(const char *text, kh_error_t *err)
{
    char path[] = "/tmp/kh-schema-test-XXXXXX";
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    FILE *f = fdopen(fd, "w");
    ck_assert_ptr_nonnull(f);
    for (const char *p = text; *p; p++)
        fputc(*p == '\'' ? '"' : *p, f);
    fclose(f);
    kh_schema_t *schema = kh_schema_load(path, err);
    unlink(path);
    return schema;
}

static kh_schema_t *s_load_ok(const char *text)
{
    kh_error_t err;
    kh_schema_t *schema = s_load_text(text, &err);
    ck_assert_msg(schema != NULL, "schema refused: %s at %s: %s",
                  kh_error_name(err.code), err.path, err.message);
    return schema;
}

static void s_expect_valid(const kh_schema_t *schema, const char *doc_text)
{
    json_t *doc = khtest_json(doc_text);
    kh_error_t err;
    int rc = kh_schema_validate(schema, doc, &err);
    ck_assert_msg(rc == 0, "%s: refused: %s at '%s': %s", doc_text,
                  kh_error_name(err.code), err.path, err.message);
    ck_assert_int_eq(err.code, KH_E_OK);
    json_decref(doc);
}

static void s_expect_error(const kh_schema_t *schema, const char *doc_text,
                           kh_errcode_t code, const char *path)
{
    json_t *doc = khtest_json(doc_text);
    kh_error_t err;
    int rc = kh_schema_validate(schema, doc, &err);
    ck_assert_msg(rc == -1, "%s: accepted", doc_text);
    ck_assert_msg(err.code == code && strcmp(err.path, path) == 0,
                  "%s: expected %s at '%s', got %s at '%s' (%s)", doc_text,
                  kh_error_name(code), path, kh_error_name(err.code), err.path,
                  err.message);
    ck_assert_str_ne(err.message, "");
    json_decref(doc);
}

static void s_expect_refused(const char *schema_text, const char *path,
                             int line)
{
    kh_error_t err;
    kh_schema_t *schema = s_load_text(schema_text, &err);
    ck_assert_msg(schema == NULL, "schema accepted: %s", schema_text);
    ck_assert_msg(err.code == KH_E_SCHEMA_INVALID,
                  "%s: expected schema.invalid, got %s (%s)", schema_text,
                  kh_error_name(err.code), err.message);
    if (path)
        ck_assert_msg(strcmp(err.path, path) == 0,
                      "%s: expected path '%s', got '%s' (%s)", schema_text,
                      path, err.path, err.message);
    if (line)
        ck_assert_int_eq(err.line, line);
}

static kh_schema_t *s_referral_schema(void)
{
    kh_error_t err;
    kh_schema_t *schema = kh_schema_load(khtest_src(REFERRAL_SCHEMA), &err);
    ck_assert_msg(schema != NULL, "referral schema refused: %s at %s: %s",
                  kh_error_name(err.code), err.path, err.message);
    return schema;
}

static json_t *s_load_json_file(const char *path)
{
    json_error_t jerr;
    json_t *doc = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s (line %d)", path, jerr.text, jerr.line);
    return doc;
}

/* Call fn for each *.json file in a source directory, in name order. */
static int s_each_json(const char *dir_rel,
                       void (*fn)(const kh_schema_t *, const char *),
                       const kh_schema_t *schema)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", khtest_src(dir_rel));
    struct dirent **names = NULL;
    int n = scandir(dir, &names, NULL, alphasort);
    ck_assert_int_ge(n, 0);
    int count = 0;
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        size_t len = strlen(name);
        if (len > 5 && strcmp(name + len - 5, ".json") == 0) {
            char path[4096 + 256];
            snprintf(path, sizeof path, "%s/%s", dir, name);
            fn(schema, path);
            count++;
        }
        free(names[i]);
    }
    free(names);
    return count;
}

/* ------------------------------------------------------------------ */
/* The referral contract                                               */
/* ------------------------------------------------------------------ */

static void s_check_example(const kh_schema_t *schema, const char *path)
{
    json_t *doc = s_load_json_file(path);
    kh_error_t err;
    int rc = kh_schema_validate(schema, doc, &err);
    ck_assert_msg(rc == 0, "%s refused: %s at '%s': %s", path,
                  kh_error_name(err.code), err.path, err.message);
    json_decref(doc);
}

START_TEST(test_referral_loads)
{
    kh_schema_t *schema = s_referral_schema();
    ck_assert_str_eq(kh_schema_id(schema),
                     "https://ketenhub.nl/schemas/referral.v1.json");
    kh_schema_destroy(&schema);
    ck_assert_ptr_null(schema);
    kh_schema_destroy(&schema);
    kh_schema_destroy(NULL);
}
END_TEST

START_TEST(test_examples_valid)
{
    kh_schema_t *schema = s_referral_schema();
    int n = s_each_json("schemas/examples", s_check_example, schema);
    ck_assert_int_ge(n, 3);
    kh_schema_destroy(&schema);
}
END_TEST

/* Whether the schema file itself names text as a JSON string (an enum
 * code, a field name): such text is not data of the document. */
static bool s_named_by_schema(const char *text)
{
    static char *schema_text;
    if (!schema_text) {
        FILE *f = fopen(khtest_src(REFERRAL_SCHEMA), "rb");
        ck_assert_ptr_nonnull(f);
        schema_text = calloc(1, 1 << 20);
        ck_assert_ptr_nonnull(schema_text);
        ck_assert(fread(schema_text, 1, (1 << 20) - 1, f) > 0);
        fclose(f);
    }
    char quoted[512];
    snprintf(quoted, sizeof quoted, "\"%s\"", text);
    return strstr(schema_text, quoted) != NULL;
}

/* Assert that no string value of doc (4 bytes or more, not named by the
 * schema) appears in the error's message or path, nor a key in the message
 * (an unknown field's path is its name by design; see s_render_path). */
static void s_assert_no_values(const json_t *doc, const kh_error_t *err)
{
    if (json_is_string(doc)) {
        const char *v = json_string_value(doc);
        if (strlen(v) >= 4 && !s_named_by_schema(v)) {
            ck_assert_msg(!strstr(err->message, v),
                          "message quotes a value: %s", err->message);
            ck_assert_msg(!strstr(err->path, v), "path quotes a value: %s",
                          err->path);
        }
        return;
    }
    for (size_t i = 0; json_is_array(doc) && i < json_array_size(doc); i++)
        s_assert_no_values(json_array_get(doc, i), err);
    if (!json_is_object(doc))
        return;
    json_t *obj = (json_t *) doc; /* jansson's iterators are not const */
    for (void *it = json_object_iter(obj); it;
         it = json_object_iter_next(obj, it)) {
        const char *key = json_object_iter_key(it);
        if (strlen(key) >= 4 && !s_named_by_schema(key))
            ck_assert_msg(!strstr(err->message, key),
                          "message quotes a key: %s", err->message);
        s_assert_no_values(json_object_iter_value(it), err);
    }
}

static void s_check_invalid(const kh_schema_t *schema, const char *path)
{
    json_t *wrapper = s_load_json_file(path);
    const json_t *doc = json_object_get(wrapper, "referral");
    const char *code = json_string_value(
        json_object_get(json_object_get(wrapper, "expect"), "code"));
    const char *want_path = json_string_value(
        json_object_get(json_object_get(wrapper, "expect"), "path"));
    ck_assert_msg(doc && code && want_path, "%s: no referral or expect", path);
    ck_assert_msg(kh_error_from_name(code) >= 0, "%s: unknown code %s", path,
                  code);

    kh_error_t err;
    int rc = kh_schema_validate(schema, doc, &err);
    ck_assert_msg(rc == -1, "%s accepted", path);
    ck_assert_msg(strcmp(kh_error_name(err.code), code) == 0 &&
                      strcmp(err.path, want_path) == 0,
                  "%s: expected %s at '%s', got %s at '%s' (%s)", path, code,
                  want_path, kh_error_name(err.code), err.path, err.message);
    s_assert_no_values(doc, &err);

    /* Deterministic: the same document gives the same error again. */
    kh_error_t again;
    ck_assert_int_eq(kh_schema_validate(schema, doc, &again), -1);
    ck_assert_int_eq(again.code, err.code);
    ck_assert_str_eq(again.path, err.path);
    ck_assert_str_eq(again.message, err.message);
    ck_assert_int_eq(kh_schema_validate(schema, doc, NULL), -1);
    json_decref(wrapper);
}

START_TEST(test_invalid_corpus)
{
    kh_schema_t *schema = s_referral_schema();
    int n = s_each_json("schemas/invalid", s_check_invalid, schema);
    ck_assert_int_ge(n, 40);
    kh_schema_destroy(&schema);
}
END_TEST

/* Whether a property schema allows the JSON type name. */
static bool s_allows_type(const json_t *node, const char *type)
{
    const json_t *t = json_object_get(node, "type");
    if (json_is_string(t))
        return strcmp(json_string_value(t), type) == 0;
    for (size_t i = 0; i < json_array_size(t); i++)
        if (strcmp(json_string_value(json_array_get(t, i)), type) == 0)
            return true;
    return false;
}

/* Every string is bounded (maxLength, or a closed list) and every array
 * has maxItems; every object refuses unknown fields. */
static void s_assert_bounded(const json_t *node, const char *where)
{
    bool closed =
        json_object_get(node, "enum") || json_object_get(node, "const");
    if (s_allows_type(node, "string") && !closed)
        ck_assert_msg(json_is_integer(json_object_get(node, "maxLength")),
                      "%s has no maxLength", where);
    if (s_allows_type(node, "array"))
        ck_assert_msg(json_is_integer(json_object_get(node, "maxItems")),
                      "%s has no maxItems", where);
    if (s_allows_type(node, "object"))
        ck_assert_msg(
            json_is_false(json_object_get(node, "additionalProperties")),
            "%s allows unknown fields", where);
}

/* Every property schema carries a description (the schema is what partner
 * developers read) and is bounded. */
static void s_assert_described(const json_t *node, const char *where)
{
    if (!json_is_object(node))
        return;
    json_t *props = json_object_get(node, "properties");
    char sub[512];
    for (void *it = json_object_iter(props); it;
         it = json_object_iter_next(props, it)) {
        const json_t *value = json_object_iter_value(it);
        snprintf(sub, sizeof sub, "%s.%s", where, json_object_iter_key(it));
        ck_assert_msg(json_is_string(json_object_get(value, "description")),
                      "%s has no description", sub);
        s_assert_bounded(value, sub);
        s_assert_described(value, sub);
    }
    const json_t *items = json_object_get(node, "items");
    if (items) {
        snprintf(sub, sizeof sub, "%s[]", where);
        ck_assert_msg(json_is_string(json_object_get(items, "description")),
                      "%s has no description", sub);
        s_assert_bounded(items, sub);
        s_assert_described(items, sub);
    }
}

START_TEST(test_referral_described)
{
    json_t *schema = s_load_json_file(khtest_src(REFERRAL_SCHEMA));
    ck_assert(json_is_string(json_object_get(schema, "description")));
    s_assert_bounded(schema, "referral");
    s_assert_described(schema, "referral");
    json_decref(schema);
}
END_TEST

/* The limits partner developers will hit first, at their exact bounds. */
START_TEST(test_referral_bounds)
{
    kh_schema_t *schema = s_referral_schema();
    json_t *doc = s_load_json_file(
        khtest_src("schemas/examples/adult-labour-agriculture-shelter.json"));
    kh_error_t err;

    /* 4000 two-byte characters are 4000 characters. */
    char *summary = malloc(8001);
    ck_assert_ptr_nonnull(summary);
    for (int i = 0; i < 4000; i++)
        memcpy(summary + 2 * i, "\xc3\xa9", 2);
    summary[8000] = '\0';
    json_object_set_new(doc, "summary", json_string(summary));
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), 0);
    free(summary);

    /* 18 and a doubted age: minor may be true from 18 on. */
    json_t *subject = json_object_get(doc, "subject");
    json_object_set_new(subject, "age", json_integer(18));
    json_object_set_new(subject, "minor", json_false());
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), 0);
    json_object_set_new(subject, "minor", json_true());
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), 0);
    /* 17.0 is the integer 17 (draft 2020-12), so minor must be true. */
    json_object_set_new(subject, "age", json_real(17.0));
    json_object_set_new(subject, "minor", json_false());
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), -1);
    ck_assert_int_eq(err.code, KH_E_SCHEMA_CONDITION);
    ck_assert_str_eq(err.path, "subject.minor");
    ck_assert_str_eq(err.message, "minor must be true when age is below 18");
    /* Unknown age: null, and then minor is the professional's call. */
    json_object_set_new(subject, "age", json_null());
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), 0);

    /* A trailing newline does not pass an anchored pattern (Python's re
     * would accept it: the cross-check cannot cover this case). */
    json_object_set_new(subject, "municipality", json_string("GM0402\n"));
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), -1);
    ck_assert_int_eq(err.code, KH_E_SCHEMA_PATTERN);
    ck_assert_str_eq(err.path, "subject.municipality");
    /* A NUL byte inside a string never matches a pattern. */
    json_object_set_new(subject, "municipality", json_stringn("GM0402\0x", 8));
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), -1);
    ck_assert_int_eq(err.code, KH_E_SCHEMA_PATTERN);
    json_object_set_new(subject, "municipality", json_string("GM0402"));
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), 0);

    /* A key with a NUL byte is not the property whose name it starts
     * with, and is never shown. */
    json_object_setn_new(doc, "summary\0x", 9, json_string("x"));
    ck_assert_int_eq(kh_schema_validate(schema, doc, &err), -1);
    ck_assert_int_eq(err.code, KH_E_SCHEMA_UNKNOWN_FIELD);
    ck_assert_str_eq(err.path, "?");

    json_decref(doc);
    kh_schema_destroy(&schema);
}
END_TEST

/* ------------------------------------------------------------------ */
/* The keywords of the subset                                          */
/* ------------------------------------------------------------------ */

static const char *s_keyword_schema =
    "{'$schema': 'https://json-schema.org/draft/2020-12/schema',\n"
    " '$id': 'https://example.org/test.json',\n"
    " 'type': 'object', 'additionalProperties': false,\n"
    " '$defs': {'pos': {'type': 'integer', 'minimum': 1}},\n"
    " 'properties': {\n"
    "  's': {'type': 'string', 'minLength': 2, 'maxLength': 3},\n"
    "  'p': {'type': 'string', 'pattern': '^[a-z]+(-[0-9]{2})?$'},\n"
    "  'q': {'type': 'string', 'pattern': '^[^@ ]+@[a-z]+$'},\n"
    "  'n': {'type': 'number', 'minimum': 1, 'maximum': 10},\n"
    "  'x': {'type': 'integer', 'exclusiveMinimum': 0, "
    "        'exclusiveMaximum': 5},\n"
    "  'e': {'enum': ['a', 'b', 1, null]},\n"
    "  'c': {'const': {'k': [1, 2]}},\n"
    "  'd': {'type': 'string', 'format': 'date'},\n"
    "  't': {'type': 'string', 'format': 'date-time'},\n"
    "  'a': {'type': 'array', 'minItems': 1, 'maxItems': 3,\n"
    "        'uniqueItems': true, 'items': {'type': 'integer'}},\n"
    "  'h': {'type': 'array', 'contains': {'const': 'x'}},\n"
    "  'any': {'anyOf': [{'type': 'string'}, {'type': 'integer'}]},\n"
    "  'one': {'title': 'an integer or at least 5, not both',\n"
    "          'oneOf': [{'type': 'integer'}, {'minimum': 5}]},\n"
    "  'no': {'not': {'const': 'forbidden'}},\n"
    "  'r': {'$ref': '#/$defs/pos', 'maximum': 9},\n"
    "  'm': {'type': 'object', 'additionalProperties': {'type': "
    "'boolean'}},\n"
    "  'f': false,\n"
    "  'tr': true,\n"
    "  'nul': {'type': ['null', 'string']},\n"
    "  'all': {'allOf': [{'minimum': 0}, {'maximum': 3}]},\n"
    "  'o': {'type': 'object', 'required': ['k1', 'k2'],\n"
    "        'properties': {'k2': {'type': 'string'}}}\n"
    " },\n"
    " 'required': ['s'],\n"
    " 'allOf': [{'title': 'n is required when s is ab',\n"
    "   'if': {'properties': {'s': {'const': 'ab'}}, 'required': ['s']},\n"
    "   'then': {'required': ['n']},\n"
    "   'else': {'properties': {'n': {'maximum': 5}}}}]}\n";

START_TEST(test_keywords)
{
    kh_schema_t *k = s_load_ok(s_keyword_schema);
    ck_assert_str_eq(kh_schema_id(k), "https://example.org/test.json");

    /* type, required, unknown fields */
    s_expect_valid(k, "{'s': 'abc'}");
    s_expect_error(k, "[]", KH_E_SCHEMA_TYPE, "");
    s_expect_error(k, "{}", KH_E_SCHEMA_REQUIRED, "s");
    s_expect_error(k, "{'s': 'abc', 'zz': 1}", KH_E_SCHEMA_UNKNOWN_FIELD, "zz");
    s_expect_error(k, "{'s': 'abc', 'a b': 1}", KH_E_SCHEMA_UNKNOWN_FIELD, "?");
    s_expect_error(k, "{'s': 1}", KH_E_SCHEMA_TYPE, "s");
    s_expect_valid(k, "{'s': 'abc', 'nul': null}");
    s_expect_valid(k, "{'s': 'abc', 'nul': 'x'}");
    s_expect_error(k, "{'s': 'abc', 'nul': 1}", KH_E_SCHEMA_TYPE, "nul");

    /* minLength / maxLength count code points, not bytes */
    s_expect_valid(k, "{'s': '\xc3\xa9\xc3\xa9\xc3\xa9'}");
    s_expect_valid(k, "{'s': '\xf0\x9f\x98\x80\xf0\x9f\x98\x80'}");
    s_expect_error(k, "{'s': 'a'}", KH_E_SCHEMA_LENGTH, "s");
    s_expect_error(k, "{'s': 'abcd'}", KH_E_SCHEMA_LENGTH, "s");
    s_expect_error(k, "{'s': '\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9'}",
                   KH_E_SCHEMA_LENGTH, "s");

    /* pattern */
    s_expect_valid(k, "{'s': 'ab', 'n': 1, 'p': 'abc-12'}");
    s_expect_valid(k, "{'s': 'abc', 'p': 'abc'}");
    s_expect_error(k, "{'s': 'abc', 'p': 'abc-1'}", KH_E_SCHEMA_PATTERN, "p");
    s_expect_error(k, "{'s': 'abc', 'p': 'ABC'}", KH_E_SCHEMA_PATTERN, "p");
    s_expect_error(k, "{'s': 'abc', 'p': 'abc\\n'}", KH_E_SCHEMA_PATTERN, "p");
    s_expect_error(k, "{'s': 'abc', 'p': ''}", KH_E_SCHEMA_PATTERN, "p");
    s_expect_valid(k, "{'s': 'abc', 'q': '\xc3\xa9\xc3\xa9@abc'}");
    s_expect_error(k, "{'s': 'abc', 'q': 'a b@abc'}", KH_E_SCHEMA_PATTERN, "q");

    /* minimum / maximum / exclusive bounds; 1.0 is an integer */
    s_expect_valid(k, "{'s': 'abc', 'n': 1, 'x': 4}");
    s_expect_valid(k, "{'s': 'abc', 'n': 5.0, 'x': 1.0}");
    s_expect_error(k, "{'s': 'abc', 'n': 0.5}", KH_E_SCHEMA_RANGE, "n");
    s_expect_error(k, "{'s': 'ab', 'n': 10.5}", KH_E_SCHEMA_RANGE, "n");
    s_expect_error(k, "{'s': 'abc', 'n': 'x'}", KH_E_SCHEMA_TYPE, "n");
    s_expect_error(k, "{'s': 'abc', 'x': 0}", KH_E_SCHEMA_RANGE, "x");
    s_expect_error(k, "{'s': 'abc', 'x': 5}", KH_E_SCHEMA_RANGE, "x");
    s_expect_error(k, "{'s': 'abc', 'x': 2.5}", KH_E_SCHEMA_TYPE, "x");
    s_expect_error(k, "{'s': 'abc', 'x': true}", KH_E_SCHEMA_TYPE, "x");

    /* enum, const: numbers by value, deep equality */
    s_expect_valid(k, "{'s': 'abc', 'e': 'b'}");
    s_expect_valid(k, "{'s': 'abc', 'e': 1.0}");
    s_expect_valid(k, "{'s': 'abc', 'e': null}");
    s_expect_error(k, "{'s': 'abc', 'e': 'c'}", KH_E_SCHEMA_ENUM, "e");
    s_expect_error(k, "{'s': 'abc', 'e': true}", KH_E_SCHEMA_ENUM, "e");
    s_expect_valid(k, "{'s': 'abc', 'c': {'k': [1, 2.0]}}");
    s_expect_error(k, "{'s': 'abc', 'c': {'k': [2, 1]}}", KH_E_SCHEMA_CONST,
                   "c");
    s_expect_error(k, "{'s': 'abc', 'c': {'k': [1, 2], 'l': 0}}",
                   KH_E_SCHEMA_CONST, "c");

    /* format date: real calendar days only */
    s_expect_valid(k, "{'s': 'abc', 'd': '2024-02-29'}");
    s_expect_valid(k, "{'s': 'abc', 'd': '2000-02-29'}");
    s_expect_valid(k, "{'s': 'abc', 'd': '1999-12-31'}");
    const char *bad_dates[] = {"2023-02-29", "1900-02-29", "2023-04-31",
                               "2023-13-01", "2023-00-10", "2023-01-00",
                               "2023-1-01",  "20230101",   "2023-01-01T00",
                               "2023/01/01", "",           "２０２３-01-01"};
    for (size_t i = 0; i < sizeof bad_dates / sizeof *bad_dates; i++) {
        char doc[128];
        snprintf(doc, sizeof doc, "{'s': 'abc', 'd': '%s'}", bad_dates[i]);
        s_expect_error(k, doc, KH_E_SCHEMA_FORMAT, "d");
    }

    /* format date-time: RFC 3339 */
    const char *good_times[] = {"2024-02-29T23:59:59Z", "2024-01-01t00:00:00z",
                                "2024-01-01T12:30:00.123+01:00",
                                "2024-01-01T12:30:00-05:30"};
    for (size_t i = 0; i < sizeof good_times / sizeof *good_times; i++) {
        char doc[128];
        snprintf(doc, sizeof doc, "{'s': 'abc', 't': '%s'}", good_times[i]);
        s_expect_valid(k, doc);
    }
    const char *bad_times[] = {"2024-01-01",
                               "2024-01-01T12:30:00",
                               "2024-01-01 12:30:00Z",
                               "2024-01-01T24:00:00Z",
                               "2024-01-01T12:60:00Z",
                               "2024-01-01T12:30:61Z",
                               "2024-01-01T12:30:00.Z",
                               "2024-01-01T12:30:00+0100",
                               "2024-01-01T12:30:00+24:00",
                               "2023-02-29T12:30:00Z",
                               "2024-01-01T1:30:00Z",
                               "2024-01-01T12:30:00ZZ",
                               "2016-12-31T23:59:60Z",
                               "0000-01-01T00:00:00Z"};
    for (size_t i = 0; i < sizeof bad_times / sizeof *bad_times; i++) {
        char doc[128];
        snprintf(doc, sizeof doc, "{'s': 'abc', 't': '%s'}", bad_times[i]);
        s_expect_error(k, doc, KH_E_SCHEMA_FORMAT, "t");
    }

    /* arrays: size, items in order, uniqueness at the repeating item */
    s_expect_valid(k, "{'s': 'abc', 'a': [1, 2, 3]}");
    s_expect_error(k, "{'s': 'abc', 'a': []}", KH_E_SCHEMA_ITEMS, "a");
    s_expect_error(k, "{'s': 'abc', 'a': [1, 2, 3, 4]}", KH_E_SCHEMA_ITEMS,
                   "a");
    s_expect_error(k, "{'s': 'abc', 'a': [1, 'x', 'y']}", KH_E_SCHEMA_TYPE,
                   "a[1]");
    s_expect_error(k, "{'s': 'abc', 'a': [1, 2, 1.0]}", KH_E_SCHEMA_UNIQUE,
                   "a[2]");
    s_expect_error(k, "{'s': 'abc', 'a': [1, 1, 'x']}", KH_E_SCHEMA_UNIQUE,
                   "a[1]");
    s_expect_valid(k, "{'s': 'abc', 'h': [1, 'x']}");
    s_expect_error(k, "{'s': 'abc', 'h': [1, 'y']}", KH_E_SCHEMA_ITEMS, "h");

    /* anyOf, oneOf, not, allOf */
    s_expect_valid(k, "{'s': 'abc', 'any': 'x'}");
    s_expect_valid(k, "{'s': 'abc', 'any': 3}");
    s_expect_error(k, "{'s': 'abc', 'any': 3.5}", KH_E_SCHEMA_CONDITION, "any");
    s_expect_valid(k, "{'s': 'abc', 'one': 3}");
    s_expect_valid(k, "{'s': 'abc', 'one': 5.5}");
    s_expect_error(k, "{'s': 'abc', 'one': 6}", KH_E_SCHEMA_CONDITION, "one");
    s_expect_error(k, "{'s': 'abc', 'one': 2.5}", KH_E_SCHEMA_CONDITION, "one");
    s_expect_valid(k, "{'s': 'abc', 'no': 'allowed'}");
    s_expect_error(k, "{'s': 'abc', 'no': 'forbidden'}", KH_E_SCHEMA_CONDITION,
                   "no");
    s_expect_valid(k, "{'s': 'abc', 'all': 2}");
    s_expect_error(k, "{'s': 'abc', 'all': 4}", KH_E_SCHEMA_RANGE, "all");

    /* $ref with a sibling keyword */
    s_expect_valid(k, "{'s': 'abc', 'r': 5}");
    s_expect_error(k, "{'s': 'abc', 'r': 0}", KH_E_SCHEMA_RANGE, "r");
    s_expect_error(k, "{'s': 'abc', 'r': 10}", KH_E_SCHEMA_RANGE, "r");
    s_expect_error(k, "{'s': 'abc', 'r': 'x'}", KH_E_SCHEMA_TYPE, "r");

    /* additionalProperties as a schema; boolean schemas */
    s_expect_valid(k, "{'s': 'abc', 'm': {'a': true, 'b': false}}");
    s_expect_error(k, "{'s': 'abc', 'm': {'a': true, 'b': 1}}",
                   KH_E_SCHEMA_TYPE, "m.b");
    s_expect_error(k, "{'s': 'abc', 'f': 1}", KH_E_SCHEMA_CONDITION, "f");
    s_expect_valid(k, "{'s': 'abc', 'tr': [1, {}]}");

    /* required names outside properties */
    s_expect_valid(k, "{'s': 'abc', 'o': {'k1': 1, 'k2': 'x'}}");
    s_expect_error(k, "{'s': 'abc', 'o': {'k2': 'x'}}", KH_E_SCHEMA_REQUIRED,
                   "o.k1");
    s_expect_error(k, "{'s': 'abc', 'o': {'k1': 1}}", KH_E_SCHEMA_REQUIRED,
                   "o.k2");

    /* if/then/else: the branch's path, the condition's title */
    s_expect_valid(k, "{'s': 'ab', 'n': 9}");
    s_expect_error(k, "{'s': 'ab'}", KH_E_SCHEMA_CONDITION, "n");
    s_expect_valid(k, "{'s': 'abc', 'n': 4}");
    s_expect_error(k, "{'s': 'abc', 'n': 6}", KH_E_SCHEMA_CONDITION, "n");
    json_t *doc = khtest_json("{'s': 'ab'}");
    kh_error_t err;
    ck_assert_int_eq(kh_schema_validate(k, doc, &err), -1);
    ck_assert_str_eq(err.message, "n is required when s is ab");
    json_decref(doc);

    /* Order: unknown fields first, then properties in schema order. */
    s_expect_error(k, "{'a': [], 's': 1, 'zz': 0}", KH_E_SCHEMA_UNKNOWN_FIELD,
                   "zz");
    s_expect_error(k, "{'a': [], 's': 1}", KH_E_SCHEMA_TYPE, "s");
    s_expect_error(k, "{'a': [], 'n': 0, 's': 'abc'}", KH_E_SCHEMA_RANGE, "n");

    ck_assert_int_eq(kh_schema_validate(NULL, NULL, &err), -1);
    kh_schema_destroy(&k);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Schemas outside the subset are refused at load                      */
/* ------------------------------------------------------------------ */

START_TEST(test_refused_schemas)
{
    /* unknown keywords, with their JSON Pointer and line */
    s_expect_refused("{'type': 'object',\n 'patternProperties': {}}",
                     "/patternProperties", 2);
    s_expect_refused("{'properties': {\n  'a': {\n   'type': 'string',\n"
                     "   'maxLenght': 3}}}",
                     "/properties/a/maxLenght", 4);
    s_expect_refused("{'items': {'minContains': 1}}", "/items/minContains", 1);
    s_expect_refused("{'allOf': [{}, {'dependentRequired': {}}]}",
                     "/allOf/1/dependentRequired", 1);
    s_expect_refused("{'$defs': {'x': {'format': 'email'}}}", "/$defs/x/format",
                     1);
    s_expect_refused("{'properties': {'a': {'$anchor': 'x'}}}",
                     "/properties/a/$anchor", 1);
    s_expect_refused("{'prefixItems': [{}]}", "/prefixItems", 1);
    s_expect_refused("{'unevaluatedProperties': false}",
                     "/unevaluatedProperties", 1);

    /* bad values of known keywords */
    s_expect_refused("{'type': 'text'}", "/type", 1);
    s_expect_refused("{'type': ['string', 'string']}", "/type", 1);
    s_expect_refused("{'minLength': -1}", "/minLength", 1);
    s_expect_refused("{'maxItems': 1.5}", "/maxItems", 1);
    s_expect_refused("{'minimum': '1'}", "/minimum", 1);
    s_expect_refused("{'enum': []}", "/enum", 1);
    s_expect_refused("{'required': ['a', 'a']}", "/required/1", 1);
    s_expect_refused("{'required': ['a.b']}", "/required/0", 1);
    s_expect_refused("{'properties': {'a b': {}}}", "/properties/a b", 1);
    s_expect_refused("{'properties': {'a': 1}}", "/properties/a", 1);
    s_expect_refused("{'items': [{}]}", "/items", 1);
    s_expect_refused("{'allOf': []}", "/allOf", 1);
    s_expect_refused("{'uniqueItems': 1}", "/uniqueItems", 1);
    s_expect_refused("{'title': 3}", "/title", 1);
    s_expect_refused("{'$schema': 'http://json-schema.org/draft-07/schema#'}",
                     "/$schema", 1);
    s_expect_refused("{'properties': {'a': {'$id': 'x'}}}", "/properties/a/$id",
                     1);
    s_expect_refused("{'properties': {'a': {'$defs': {}}}}",
                     "/properties/a/$defs", 1);
    s_expect_refused("{'format': 'uri'}", "/format", 1);

    /* references: local $defs only, existing, not recursive */
    s_expect_refused("{'$ref': 'other.json'}", "/$ref", 1);
    s_expect_refused("{'$ref': '#/$defs/missing'}", "/$ref", 1);
    s_expect_refused("{'$ref': '#/properties/a'}", "/$ref", 1);
    s_expect_refused("{'$defs': {'a': {'$ref': '#/$defs/b'},\n"
                     "           'b': {'items': {'$ref': '#/$defs/a'}}},\n"
                     " '$ref': '#/$defs/a'}",
                     NULL, 0);
    s_expect_refused("{'$defs': {'t': {'properties': {'c': {'$ref': "
                     "'#/$defs/t'}}}}}",
                     "/$defs/t", 1);

    /* patterns outside the portable subset */
    const char *patterns[] = {
        "[a-z]+$",   "^[a-z]+",    "^\\\\d+$",       "^a.b$",   "^(?:ab)$",
        "^a+?$",     "^a|b$",      "^[[:alpha:]]+$", "^[^a]$",  "^[^a]?$",
        "^[^a]{2}$", "^[]a]$",     "^(a||b)$",       "^a{,3}$", "^a**$",
        "^a{3,1}$",  "^(ab$",      "^ab)$",          "^a}$",    "^\xc3\xa9$",
        "^a\\tb$",   "^[a\\\\]]$", "^a$b$"};
    for (size_t i = 0; i < sizeof patterns / sizeof *patterns; i++) {
        char text[256];
        snprintf(text, sizeof text, "{'pattern': '%s'}", patterns[i]);
        s_expect_refused(text, "/pattern", 1);
    }

    /* not JSON, duplicate keys, not a schema */
    kh_error_t err;
    ck_assert_ptr_null(
        s_load_text("{'type': 'object',\n 'type': 'array'}", &err));
    ck_assert_int_eq(err.code, KH_E_SCHEMA_INVALID);
    ck_assert_int_eq(err.line, 2);
    ck_assert_ptr_null(s_load_text("{'type': \n\n 'object'", &err));
    ck_assert_int_eq(err.code, KH_E_SCHEMA_INVALID);
    ck_assert_int_eq(err.line, 3);
    s_expect_refused("[]", "", 1);
    s_expect_refused("{'not': 3}", "/not", 1);

    /* a file that cannot be read */
    ck_assert_ptr_null(kh_schema_load("/nonexistent/schema.json", &err));
    ck_assert_int_eq(err.code, KH_E_IO);
}
END_TEST

START_TEST(test_accepted_schemas)
{
    /* Boolean root schemas and a pattern at the edge of the subset. */
    kh_schema_t *t = s_load_ok("true");
    s_expect_valid(t, "{'anything': [1]}");
    ck_assert_str_eq(kh_schema_id(t), "");
    kh_schema_destroy(&t);
    kh_schema_t *f = s_load_ok("false");
    s_expect_error(f, "{}", KH_E_SCHEMA_CONDITION, "");
    kh_schema_destroy(&f);
    kh_schema_t *p =
        s_load_ok("{'pattern': '^([A-Z]{2}|x-[a-z0-9._/-]+)(,[+()]*)?[^ ]*$',\n"
                  " 'examples': ['NL'], '$comment': 'c', 'description': 'd'}");
    s_expect_valid(p, "'NL'");
    s_expect_valid(p, "'x-a.b,++abc'");
    s_expect_error(p, "'nl'", KH_E_SCHEMA_PATTERN, "");
    kh_schema_destroy(&p);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("schema");
    TCase *tc = tcase_create("referral");
    tcase_add_test(tc, test_referral_loads);
    tcase_add_test(tc, test_examples_valid);
    tcase_add_test(tc, test_invalid_corpus);
    tcase_add_test(tc, test_referral_described);
    tcase_add_test(tc, test_referral_bounds);
    suite_add_tcase(s, tc);
    tc = tcase_create("keywords");
    tcase_add_test(tc, test_keywords);
    tcase_add_test(tc, test_refused_schemas);
    tcase_add_test(tc, test_accepted_schemas);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
