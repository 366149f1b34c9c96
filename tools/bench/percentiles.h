/*
 * Figures that the benchmark programs share: latency percentiles (sort
 * the samples, microseconds, with bench_cmp_us, then read them with
 * bench_pct_ms), and the CPU a program used itself (bench_cpu_s).
 */
#ifndef BENCH_PERCENTILES_H_INCLUDED
#define BENCH_PERCENTILES_H_INCLUDED

#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>

/* qsort comparison of two int64_t. */
static inline int bench_cmp_us(const void *a, const void *b)
{
    int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
    return (x > y) - (x < y);
}

/* The p-th percentile (0-100, nearest rank) of n sorted microsecond
 * samples, in milliseconds; 0 when there are none. */
static inline double bench_pct_ms(const int64_t *sorted, size_t n, double p)
{
    if (n == 0)
        return 0;
    size_t i = (size_t) (p / 100.0 * (double) (n - 1) + 0.5);
    return (double) sorted[i] / 1000.0;
}

/* CPU seconds (user and system) of this process so far, all threads: a
 * load generator on the hub's machine takes its share of the cores, and
 * the benchmark reports it. */
static inline double bench_cpu_s(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double) (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

#endif
