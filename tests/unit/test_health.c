/*
 * The metrics registry and its Prometheus text format (common/health.c),
 * without network or database: families in declaration order, counters
 * and gauges with and without a label, cumulative histogram buckets,
 * escaped label values, undeclared names ignored, the service tables;
 * and the watchdog that ends a process whose loop fell silent.
 */
#include <check.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/health.h"
#include "khtest.h"

static void s_teardown(void)
{
    kh_metrics_reset();
}

static char *s_render(void)
{
    char *text = kh_metrics_render();
    ck_assert_ptr_nonnull(text);
    return text;
}

START_TEST(counters_and_gauges_in_the_text_format)
{
    ck_assert_int_eq(kh_metric_declare("things_total", KH_METRIC_COUNTER, NULL,
                                       "Things counted."),
                     0);
    ck_assert_int_eq(kh_metric_declare("refused_total", KH_METRIC_COUNTER,
                                       "code", "Refusals by code."),
                     0);
    ck_assert_int_eq(
        kh_metric_declare("depth", KH_METRIC_GAUGE, "partner", "A depth."), 0);
    /* Declaring again changes nothing. */
    ck_assert_int_eq(
        kh_metric_declare("things_total", KH_METRIC_GAUGE, NULL, "Other help."),
        0);
    kh_metric_add("things_total", NULL, 2);
    kh_metric_add("things_total", NULL, 3);
    kh_metric_add("refused_total", "schema_invalid", 1);
    kh_metric_add("refused_total", "bad_msgpack", 4);
    kh_metric_add("refused_total", "schema_invalid", 1);
    kh_metric_set("depth", "avim", 7);
    kh_metric_set("depth", "avim", 2.5);
    /* Undeclared or of another type: ignored. */
    kh_metric_add("nothing_total", NULL, 1);
    kh_metric_set("things_total", NULL, 99);

    char *text = s_render();
    ck_assert_str_eq(text, "# HELP ketenhub_things_total Things counted.\n"
                           "# TYPE ketenhub_things_total counter\n"
                           "ketenhub_things_total 5\n"
                           "# HELP ketenhub_refused_total Refusals by code.\n"
                           "# TYPE ketenhub_refused_total counter\n"
                           "ketenhub_refused_total{code=\"schema_invalid\"} 2\n"
                           "ketenhub_refused_total{code=\"bad_msgpack\"} 4\n"
                           "# HELP ketenhub_depth A depth.\n"
                           "# TYPE ketenhub_depth gauge\n"
                           "ketenhub_depth{partner=\"avim\"} 2.5\n");
    free(text);
    ck_assert_double_eq(kh_metric_value("things_total", NULL), 5);
    ck_assert_double_eq(kh_metric_value("refused_total", "bad_msgpack"), 4);
    ck_assert_double_eq(kh_metric_value("depth", "avim"), 2.5);
    ck_assert_double_eq(kh_metric_value("depth", "nobody"), 0);
}
END_TEST

/* Unlabelled counters and histograms are 0 from their declaration (so
 * that increase() sees their first step after a restart); a gauge that
 * was never set, or a labelled family without a value, shows nothing. */
START_TEST(unlabelled_counters_start_at_0)
{
    kh_metric_declare("dead_total", KH_METRIC_COUNTER, NULL, "Dead.");
    kh_metric_declare("wait_seconds", KH_METRIC_HISTOGRAM, NULL, "Waits.");
    kh_metric_declare("refused_total", KH_METRIC_COUNTER, "code", "Refused.");
    kh_metric_declare("dead_letters", KH_METRIC_GAUGE, NULL, "Dead now.");
    char *text = s_render();
    ck_assert_ptr_nonnull(strstr(text, "\nketenhub_dead_total 0\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"+Inf\"} 0\n"));
    ck_assert_ptr_nonnull(strstr(text, "ketenhub_wait_seconds_count 0\n"));
    ck_assert_ptr_null(strstr(text, "ketenhub_refused_total{"));
    ck_assert_ptr_null(strstr(text, "\nketenhub_dead_letters "));
    free(text);
    kh_metric_add("dead_total", NULL, 1);
    ck_assert_double_eq(kh_metric_value("dead_total", NULL), 1);
}
END_TEST

START_TEST(histogram_buckets_are_cumulative)
{
    kh_metric_declare("wait_seconds", KH_METRIC_HISTOGRAM, NULL, "Waits.");
    kh_metric_observe("wait_seconds", NULL, 0.0005); /* le 0.001 */
    kh_metric_observe("wait_seconds", NULL, 0.001);  /* le 0.001 (inclusive) */
    kh_metric_observe("wait_seconds", NULL, 0.2);    /* le 0.25 */
    kh_metric_observe("wait_seconds", NULL, 4000);   /* +Inf only */
    char *text = s_render();
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"0.001\"} 2\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"0.1\"} 2\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"0.25\"} 3\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"1800\"} 3\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_bucket{le=\"+Inf\"} 4\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_wait_seconds_sum 4000.2015\n"));
    ck_assert_ptr_nonnull(strstr(text, "ketenhub_wait_seconds_count 4\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "# TYPE ketenhub_wait_seconds histogram\n"));
    free(text);
    ck_assert_double_eq(kh_metric_value("wait_seconds", NULL), 4);
}
END_TEST

START_TEST(label_values_are_escaped)
{
    kh_metric_declare("odd_total", KH_METRIC_COUNTER, "partner", "Odd.");
    kh_metric_add("odd_total", "a\"b\\c\nd", 1);
    kh_metric_add("odd_total", NULL, 1); /* a missing value is "" */
    char *text = s_render();
    ck_assert_ptr_nonnull(
        strstr(text, "ketenhub_odd_total{partner=\"a\\\"b\\\\c\\nd\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(text, "ketenhub_odd_total{partner=\"\"} 1\n"));
    free(text);
}
END_TEST

START_TEST(each_service_declares_its_families)
{
    static const char *services[] = {"intake", "routing", "notification",
                                     "audit"};
    static const char *families[] = {
        "referrals_accepted_total", "referrals_routed_total",
        "deliveries_backlog", "trail_head_sequence"};
    for (size_t i = 0; i < 4; i++) {
        kh_metrics_reset();
        ck_assert_int_eq(kh_metrics_declare_service(services[i]), 0);
        char *text = s_render();
        for (size_t j = 0; j < 4; j++) {
            char want[128];
            snprintf(want, sizeof want, "# TYPE ketenhub_%s ", families[j]);
            ck_assert_msg((strstr(text, want) != NULL) == (i == j), "%s and %s",
                          services[i], families[j]);
        }
        free(text);
    }
    /* The README's table names every family of every service. */
    char *table = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&table, &size);
    ck_assert_ptr_nonnull(out);
    kh_metrics_table(out);
    fclose(out);
    for (size_t j = 0; j < 4; j++)
        ck_assert_ptr_nonnull(strstr(table, families[j]));
    free(table);
    ck_assert_str_eq(kh_version(), KH_VERSION);
}
END_TEST

START_TEST(no_endpoint_and_bad_endpoints)
{
    kh_error_t err;
    kh_health_config_t off = {.service = "intake", .endpoint = "none"};
    kh_health_t *health = kh_health_new(&off, &err);
    ck_assert_ptr_nonnull(health);
    ck_assert_int_eq(kh_health_port(health), 0);
    ck_assert(!kh_health_db_up(health));
    kh_health_destroy(&health);
    ck_assert_ptr_null(health);
    kh_health_destroy(&health); /* accepts NULL */

    static const char *bad[] = {"nowhere", "127.0.0.1:", ":9700",
                                "127.0.0.1:70000", "127.0.0.1:x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kh_health_config_t cfg = {.service = "intake", .endpoint = bad[i]};
        ck_assert_ptr_null(kh_health_new(&cfg, &err));
        ck_assert_int_eq(err.code, KH_E_CONFIG);
        ck_assert_str_eq(err.path, "KH_HEALTH_ENDPOINT");
    }
}
END_TEST

/* A loop that beats keeps its process; one that falls silent for the
 * watchdog's time ends it with status 1 (an exit test). */
START_TEST(a_beating_loop_is_left_alone)
{
    kh_error_t err;
    kh_health_config_t cfg = {
        .service = "routing", .endpoint = "none", .watchdog_ms = 300};
    kh_health_t *health = kh_health_new(&cfg, &err);
    ck_assert_ptr_nonnull(health);
    for (int i = 0; i < 15; i++) {
        kh_health_beat();
        usleep(100 * 1000);
    }
    kh_health_destroy(&health);
    usleep(500 * 1000); /* a watchdog left running would end us here */
}
END_TEST

/* A process stopped as a whole (SIGSTOP, a paused container) for longer
 * than the watchdog's time is not hung: once it runs again its loop gets
 * the time to beat before the watchdog judges it. */
START_TEST(a_process_stopped_and_continued_is_left_alone)
{
    kh_error_t err;
    kh_health_config_t cfg = {
        .service = "routing", .endpoint = "none", .watchdog_ms = 300};
    kh_health_t *health = kh_health_new(&cfg, &err);
    ck_assert_ptr_nonnull(health);
    pid_t self = getpid();
    pid_t waker = fork();
    ck_assert_int_ge(waker, 0);
    if (waker == 0) {
        usleep(1500 * 1000);
        kill(self, SIGCONT);
        _exit(0);
    }
    raise(SIGSTOP);
    for (int i = 0; i < 20; i++) {
        kh_health_beat();
        usleep(50 * 1000);
    }
    kh_health_destroy(&health);
    waitpid(waker, NULL, 0);
}
END_TEST

START_TEST(a_silent_loop_ends_the_process)
{
    kh_error_t err;
    kh_health_config_t cfg = {
        .service = "routing", .endpoint = "none", .watchdog_ms = 300};
    kh_health_t *health = kh_health_new(&cfg, &err);
    ck_assert_ptr_nonnull(health);
    usleep(2500 * 1000);
    kh_health_destroy(&health);
    ck_abort_msg("the watchdog let a loop silent for 2.5 s live on");
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("health");
    TCase *tc = tcase_create("registry");
    tcase_add_checked_fixture(tc, NULL, s_teardown);
    tcase_add_test(tc, counters_and_gauges_in_the_text_format);
    tcase_add_test(tc, unlabelled_counters_start_at_0);
    tcase_add_test(tc, histogram_buckets_are_cumulative);
    tcase_add_test(tc, label_values_are_escaped);
    tcase_add_test(tc, each_service_declares_its_families);
    tcase_add_test(tc, no_endpoint_and_bad_endpoints);
    suite_add_tcase(suite, tc);
    tc = tcase_create("watchdog");
    tcase_add_test(tc, a_beating_loop_is_left_alone);
    tcase_add_test(tc, a_process_stopped_and_continued_is_left_alone);
    tcase_add_exit_test(tc, a_silent_loop_ends_the_process, 1);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
