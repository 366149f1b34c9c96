/*
 * logfmt lines on stderr. Each line is written with one write(2) so lines
 * from several threads or processes sharing stderr do not interleave.
 */
#include "ketenhub/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *s_level_names[] = {"debug", "info", "warn", "error"};
static char s_service[32] = "ketenhub";
static kh_log_level_t s_level = KH_LOG_INFO;

int kh_log_init(const char *service, const char *level)
{
    if (service)
        snprintf(s_service, sizeof s_service, "%s", service);
    s_level = KH_LOG_INFO;
    if (!level || !*level)
        return 0;
    for (int i = KH_LOG_DEBUG; i <= KH_LOG_ERROR; i++)
        if (strcmp(level, s_level_names[i]) == 0) {
            s_level = (kh_log_level_t) i;
            return 0;
        }
    return -1;
}

bool kh_log_enabled(kh_log_level_t level)
{
    return level >= s_level;
}

void kh_log(kh_log_level_t level, const char *event, const char *fmt, ...)
{
    if (!kh_log_enabled(level))
        return;
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);

    char line[2048];
    size_t len = (size_t) snprintf(
        line, sizeof line,
        "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s service=%s "
        "event=%s",
        tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
        tm.tm_sec, now.tv_nsec / 1000000L, s_level_names[level], s_service,
        event);
    if (fmt && len < sizeof line - 2) {
        line[len++] = ' ';
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(line + len, sizeof line - len, fmt, ap);
        va_end(ap);
        if (n > 0)
            len += (size_t) n;
    }
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    ssize_t written = write(STDERR_FILENO, line, len);
    (void) written;
}

const char *kh_log_quote(const char *text, char *buf, size_t size)
{
    size_t o = 0;
    for (const unsigned char *p = (const unsigned char *) (text ? text : "");
         *p && o + 1 < size; p++) {
        if (*p == '"' || *p == '\\') {
            if (o + 2 >= size)
                break;
            buf[o++] = '\\';
            buf[o++] = (char) *p;
        } else
            buf[o++] = *p < 0x20 || *p == 0x7f ? '?' : (char) *p;
    }
    buf[o] = '\0';
    return buf;
}
