/*
 * Unit tests of the arenas for jansson values (common/jarena.c): a request
 * decoded in an arena is the same value as one decoded on the heap; the
 * arena's memory is counted, forgotten at a reset and reused; values made
 * outside an arena (on this thread or another) stay jansson's usual heap
 * values. Under ASan, a value read after its arena's reset is caught (a
 * test of its own), and a leak or a wrong free fails the run.
 */
#include "khtest.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"
#include "ketenhub/jarena.h"

/* A SUBMIT of the example referral, encoded. */
static char *s_frame(size_t *size)
{
    json_t *referral = json_load_file(
        KH_TEST_SOURCE_DIR "/schemas/examples/minor-sexual-acute.json", 0,
        NULL);
    ck_assert_ptr_nonnull(referral);
    json_t *env =
        json_pack("{s:i, s:s, s:s, s:s, s:o}", "v", 1, "cmd", "SUBMIT", "cid",
                  "c-1", "idempotency_key", "k-1", "referral", referral);
    char *data = NULL;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_encode(env, &data, size, &err), 0);
    json_decref(env);
    return data;
}

static json_t *s_decode(kh_jarena_t *arena, const char *data, size_t size)
{
    kh_limits_t limits = kh_limits_default();
    kh_error_t err;
    json_t *value = NULL;
    kh_jarena_t *was = kh_jarena_enter(arena);
    int rc = kh_msgpack_decode(data, size, &limits, &value, &err);
    ck_assert_ptr_eq(kh_jarena_enter(was), arena);
    ck_assert_msg(rc == 0, "decode: %s", err.message);
    return value;
}

START_TEST(test_arena_values_are_the_heap_values)
{
    size_t size = 0;
    char *data = s_frame(&size);
    kh_jarena_t *arena = kh_jarena_new(1 << 20);
    ck_assert_ptr_nonnull(arena);
    ck_assert_uint_eq(kh_jarena_used(arena), 0);

    json_t *heap = s_decode(NULL, data, size);
    ck_assert_uint_eq(kh_jarena_used(arena), 0);
    json_t *mine = s_decode(arena, data, size);
    size_t used = kh_jarena_used(arena);
    ck_assert_uint_gt(used, size);
    ck_assert(json_equal(heap, mine));
    /* Freeing an arena value is allowed and changes nothing. */
    json_decref(json_incref(mine));
    json_object_del(mine, "cid");
    ck_assert_uint_eq(kh_jarena_used(arena), used);
    ck_assert_ptr_null(json_object_get(mine, "cid"));

    /* A reset forgets them all; the next values reuse the memory. */
    kh_jarena_reset(arena);
    ck_assert_uint_eq(kh_jarena_used(arena), 0);
    mine = s_decode(arena, data, size);
    ck_assert_uint_eq(kh_jarena_used(arena), used);
    ck_assert(json_equal(heap, mine));

    json_decref(heap);
    kh_jarena_destroy(&arena);
    ck_assert_ptr_null(arena);
    kh_jarena_destroy(&arena);
    free(data);
}
END_TEST

START_TEST(test_values_outside_an_arena_are_heap_values)
{
    kh_jarena_t *arena = kh_jarena_new(0);
    kh_jarena_t *other = kh_jarena_new(1 << 20);
    kh_jarena_enter(arena);
    json_t *in = json_pack("{s:[i, s]}", "a", 1, "text");
    size_t used = kh_jarena_used(arena);
    ck_assert_uint_gt(used, 0);
    ck_assert_uint_eq(kh_jarena_used(other), 0);

    /* Made outside: freed by jansson, or by free() for its strings. */
    ck_assert_ptr_eq(kh_jarena_enter(NULL), arena);
    json_t *out = json_pack("{s:s}", "b", "heap");
    char *text = json_dumps(out, JSON_COMPACT);
    ck_assert_str_eq(text, "{\"b\":\"heap\"}");
    free(text);
    /* A heap value inside an arena value, and an arena value inside a
     * heap one. */
    json_object_set(in, "out", out);
    json_object_set(out, "in", json_object_get(in, "a"));
    ck_assert_uint_eq(kh_jarena_used(arena), used);
    json_object_del(in, "out");
    json_decref(out);
    kh_jarena_destroy(&arena);
    kh_jarena_destroy(&other);
}
END_TEST

START_TEST(test_large_values_get_chunks_of_their_own)
{
    kh_jarena_t *arena = kh_jarena_new(1 << 20);
    size_t big = 300 * 1024;
    char *text = malloc(big + 1);
    memset(text, 'x', big);
    text[big] = '\0';
    kh_jarena_enter(arena);
    json_t *small1 = json_string("before");
    json_t *large = json_stringn(text, big);
    json_t *small2 = json_string("after");
    kh_jarena_enter(NULL);
    ck_assert_uint_ge(kh_jarena_used(arena), big);
    ck_assert_uint_lt(kh_jarena_used(arena), big + 4096);
    ck_assert_uint_eq(json_string_length(large), big);
    ck_assert_str_eq(json_string_value(small1), "before");
    ck_assert_str_eq(json_string_value(small2), "after");
    kh_jarena_reset(arena);
    ck_assert_uint_eq(kh_jarena_used(arena), 0);
    kh_jarena_destroy(&arena);
    free(text);
}
END_TEST

/* Memory counts whole: the end of a chunk that the next value did not fit
 * in is counted with the values before it. */
START_TEST(test_the_unused_end_of_a_chunk_counts)
{
    kh_jarena_t *arena = kh_jarena_new(0);
    size_t each = 60 * 1024; /* four fit in a chunk of 256 KiB, not five */
    char *text = malloc(each);
    memset(text, 'y', each);
    kh_jarena_enter(arena);
    for (int i = 0; i < 5; i++)
        ck_assert_ptr_nonnull(json_stringn(text, each));
    kh_jarena_enter(NULL);
    ck_assert_uint_ge(kh_jarena_used(arena), 256 * 1024 + each);
    kh_jarena_destroy(&arena);
    free(text);
}
END_TEST

static void *s_thread(void *arg)
{
    (void) arg;
    return json_pack("{s:s}", "thread", "heap");
}

START_TEST(test_other_threads_allocate_on_the_heap)
{
    kh_jarena_t *arena = kh_jarena_new(1 << 20);
    kh_jarena_enter(arena);
    pthread_t thread;
    ck_assert_int_eq(pthread_create(&thread, NULL, s_thread, NULL), 0);
    void *value = NULL;
    ck_assert_int_eq(pthread_join(thread, &value), 0);
    ck_assert_uint_eq(kh_jarena_used(arena), 0);
    /* Still readable after the arena is gone, and freed by jansson. */
    kh_jarena_destroy(&arena);
    ck_assert_str_eq(json_string_value(json_object_get(value, "thread")),
                     "heap");
    kh_jarena_enter(NULL);
    json_decref(value);
}
END_TEST

#if defined(__SANITIZE_ADDRESS__)
/* Under ASan a reset hands the arena's memory back: a value read after
 * it is reported like a use after free, which ends the test's process
 * with ASan's exit code 1. */
START_TEST(test_a_value_read_after_a_reset_is_caught)
{
    kh_jarena_t *arena = kh_jarena_new(1 << 20);
    kh_jarena_enter(arena);
    json_t *value = json_string("gone");
    kh_jarena_enter(NULL);
    kh_jarena_reset(arena);
    volatile json_type type = json_typeof(value); /* read here, in
                                                    instrumented code */
    (void) type;
    kh_jarena_destroy(&arena);
}
END_TEST
#endif

int main(void)
{
    Suite *s = suite_create("jarena");
    TCase *tc = tcase_create("jarena");
    tcase_add_test(tc, test_arena_values_are_the_heap_values);
    tcase_add_test(tc, test_values_outside_an_arena_are_heap_values);
    tcase_add_test(tc, test_large_values_get_chunks_of_their_own);
    tcase_add_test(tc, test_the_unused_end_of_a_chunk_counts);
    tcase_add_test(tc, test_other_threads_allocate_on_the_heap);
#if defined(__SANITIZE_ADDRESS__)
    tcase_add_exit_test(tc, test_a_value_read_after_a_reset_is_caught, 1);
#endif
    suite_add_tcase(s, tc);
    return khtest_run_suite(s);
}
