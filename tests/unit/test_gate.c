/*
 * The refusal gate (throttle.h): which refused handshakes go into the
 * trail, and that every one left out is counted and told, once.
 */
#include <stdint.h>

#include "ketenhub/throttle.h"
#include "khtest.h"

#define S_S INT64_C(1000000) /* microseconds in a second */

/* A gate as the services use it: one audit per identity a minute, 1/s
 * burst 3 over all, the count told every 10 s. */
static kh_refusal_gate_t *s_gate(void)
{
    kh_refusal_gate_t *gate = kh_refusal_gate_new(60000, 1.0, 3.0, 10000);
    ck_assert_ptr_nonnull(gate);
    return gate;
}

START_TEST(gate_refuses_bad_arguments)
{
    ck_assert_ptr_null(kh_refusal_gate_new(0, 1.0, 3.0, 10000));
    ck_assert_ptr_null(kh_refusal_gate_new(60000, 0.0, 3.0, 10000));
    ck_assert_ptr_null(kh_refusal_gate_new(60000, 1.0, 0.5, 10000));
    ck_assert_ptr_null(kh_refusal_gate_new(60000, 1.0, 3.0, 0));
    kh_refusal_gate_t *gate = s_gate();
    kh_refusal_gate_destroy(&gate);
    ck_assert_ptr_null(gate);
    kh_refusal_gate_destroy(&gate);
    kh_refusal_gate_destroy(NULL);
}
END_TEST

START_TEST(gate_audits_the_first_and_throttles_its_repeats)
{
    kh_refusal_gate_t *gate = s_gate();
    int64_t t = 1000 * S_S;
    uint64_t tell = 99;
    ck_assert(kh_refusal_gate_pass(gate, "k1 p1", true, t, &tell));
    ck_assert_uint_eq(tell, 0);
    /* The same key and address retrying: left out, and not counted (its
     * first is in the trail). */
    for (int i = 1; i <= 5; i++) {
        ck_assert(!kh_refusal_gate_pass(gate, "k1 p1", true, t + i, &tell));
        ck_assert_uint_eq(tell, 0);
    }
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 3600 * S_S, true), 0);
    /* Another address is another identity; a minute on, the first again. */
    ck_assert(kh_refusal_gate_pass(gate, "k1 p2", true, t + 10, &tell));
    ck_assert(!kh_refusal_gate_pass(gate, "k1 p1", true, t + 59 * S_S, &tell));
    ck_assert(kh_refusal_gate_pass(gate, "k1 p1", true, t + 60 * S_S, &tell));
    kh_refusal_gate_destroy(&gate);
}
END_TEST

START_TEST(gate_counts_what_it_drops_past_the_burst)
{
    kh_refusal_gate_t *gate = s_gate();
    int64_t t = 1000 * S_S;
    uint64_t tell;
    char id[32];
    for (int i = 0; i < 3; i++) { /* the burst */
        snprintf(id, sizeof id, "made-up %d", i);
        ck_assert(kh_refusal_gate_pass(gate, id, true, t, &tell));
    }
    /* The first left out is told at once, the next ones counted. */
    ck_assert(!kh_refusal_gate_pass(gate, "made-up 3", true, t, &tell));
    ck_assert_uint_eq(tell, 1);
    uint64_t told = 1;
    for (int i = 4; i < 20; i++) {
        snprintf(id, sizeof id, "made-up %d", i);
        ck_assert(!kh_refusal_gate_pass(gate, id, true, t + i * 1000, &tell));
        told += tell;
    }
    ck_assert_uint_eq(told, 1);
    /* 10 s on, the next refusal tells all counted since, itself included
     * (its token: a second has passed, so it could have been audited; a
     * caller with no room left counts it instead). */
    ck_assert(
        !kh_refusal_gate_pass(gate, "made-up 20", false, t + 10 * S_S, &tell));
    ck_assert_uint_eq(tell, 17);
    ck_assert(
        kh_refusal_gate_pass(gate, "made-up 21", true, t + 10 * S_S, &tell));
    kh_refusal_gate_destroy(&gate);
}
END_TEST

START_TEST(gate_flush_tells_the_count_once_a_flood_stops)
{
    kh_refusal_gate_t *gate = s_gate();
    int64_t t = 1000 * S_S;
    uint64_t tell, told = 0, dropped = 0;
    char id[32];
    /* A flood of 500 made-up keys in 5 s. */
    for (int i = 0; i < 500; i++) {
        snprintf(id, sizeof id, "made-up %d", i);
        if (!kh_refusal_gate_pass(gate, id, true, t + i * 10000, &tell))
            dropped++;
        told += tell;
    }
    ck_assert_uint_gt(dropped, 400);
    ck_assert_uint_eq(told, 1); /* only the first was told so far */
    /* No more refusals: before the interval nothing, after it the rest,
     * once. */
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 9 * S_S, false), 0);
    told += kh_refusal_gate_flush(gate, t + 11 * S_S, false);
    ck_assert_uint_eq(told, dropped);
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 30 * S_S, false), 0);
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 30 * S_S, true), 0);
    kh_refusal_gate_destroy(&gate);
}
END_TEST

START_TEST(gate_final_flush_tells_the_count_at_once)
{
    kh_refusal_gate_t *gate = s_gate();
    int64_t t = 1000 * S_S;
    uint64_t tell, told = 0;
    char id[32];
    for (int i = 0; i < 10; i++) {
        snprintf(id, sizeof id, "made-up %d", i);
        kh_refusal_gate_pass(gate, id, true, t, &tell);
        told += tell;
    }
    ck_assert_uint_eq(told, 1);
    /* Shutting down a moment later: the 6 counted since are told now. */
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 1, false), 0);
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 1, true), 6);
    ck_assert_uint_eq(kh_refusal_gate_flush(gate, t + 1, true), 0);
    kh_refusal_gate_destroy(&gate);
}
END_TEST

START_TEST(tally_flush_tells_what_is_left_once)
{
    kh_tally_t tally = {0};
    ck_assert_uint_eq(kh_tally_flush(&tally, 1000, 5), 0); /* nothing */
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 5), 1);
    ck_assert_uint_eq(kh_tally_flush(&tally, 1000, 2000), 0); /* all told */
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 6), 0);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 7), 0);
    ck_assert_uint_eq(kh_tally_flush(&tally, 1000, 1004), 0);
    ck_assert_uint_eq(kh_tally_flush(&tally, 1000, 1005), 2);
    ck_assert_uint_eq(kh_tally_flush(&tally, 1000, 9000), 0);
    /* Adding tells as before; the flush only what adding left. */
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 1500), 0);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 2005), 2);
    ck_assert_uint_eq(kh_tally_add(&tally, 1000, 2006), 0);
    ck_assert_uint_eq(kh_tally_flush(&tally, 0, 2007), 1); /* at shutdown */
    ck_assert_uint_eq(kh_tally_flush(&tally, 0, 2007), 0);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("gate");
    TCase *tc = tcase_create("gate");
    tcase_add_test(tc, gate_refuses_bad_arguments);
    tcase_add_test(tc, gate_audits_the_first_and_throttles_its_repeats);
    tcase_add_test(tc, gate_counts_what_it_drops_past_the_burst);
    tcase_add_test(tc, gate_flush_tells_the_count_once_a_flood_stops);
    tcase_add_test(tc, gate_final_flush_tells_the_count_at_once);
    tcase_add_test(tc, tally_flush_tells_what_is_left_once);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
