/*
 * Latency percentiles for the benchmark programs: sort the samples
 * (microseconds) with bench_cmp_us, then read them with bench_pct_ms.
 */
#ifndef BENCH_PERCENTILES_H_INCLUDED
#define BENCH_PERCENTILES_H_INCLUDED

#include <stddef.h>
#include <stdint.h>

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

#endif
