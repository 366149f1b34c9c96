/*
 * One line per event on stderr, in logfmt:
 *   ts=2026-11-28T21:09:27.123Z level=info service=intake event=ready ...
 * Ids, codes, counts and durations only: never a value from a referral.
 * The level comes from KH_LOG_LEVEL (debug, info, warn, error).
 */
#ifndef KH_LOG_H_INCLUDED
#define KH_LOG_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    KH_LOG_DEBUG,
    KH_LOG_INFO,
    KH_LOG_WARN,
    KH_LOG_ERROR
} kh_log_level_t;

/* Set the service name written on every line and the level (from a name
 * such as "info"). Returns -1 for an unknown level name and keeps info. */
int kh_log_init(const char *service, const char *level);

/* Whether a line at this level would be written. */
bool kh_log_enabled(kh_log_level_t level);

/* Write one line: the fixed fields, event=EVENT, then the fields given by
 * fmt (already in logfmt, e.g. "referral=%s ms=%.2f"); fmt may be NULL. */
void kh_log(kh_log_level_t level, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* text as the inside of a quoted logfmt value (msg="%s"): '"' and '\\'
 * escaped with '\\', control characters as '?', cut to fit size (at least
 * 1). Returns buf. KH_LOG_Q(text) gives it a buffer of its own that lasts
 * for the statement, for use as an argument of kh_log. */
const char *kh_log_quote(const char *text, char *buf, size_t size);
#define KH_LOG_QUOTE_MAX 600
#define KH_LOG_Q(text)                                                         \
    kh_log_quote((text), (char[KH_LOG_QUOTE_MAX]){0}, KH_LOG_QUOTE_MAX)

#define kh_log_debug(...) kh_log(KH_LOG_DEBUG, __VA_ARGS__)
#define kh_log_info(...) kh_log(KH_LOG_INFO, __VA_ARGS__)
#define kh_log_warn(...) kh_log(KH_LOG_WARN, __VA_ARGS__)
#define kh_log_error(...) kh_log(KH_LOG_ERROR, __VA_ARGS__)

#ifdef __cplusplus
}
#endif
#endif
