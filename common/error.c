/*
 * The error table: wire names and retryability of every kh_errcode_t.
 */
#include "ketenhub/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *name;
    bool retryable;
} s_errors[] = {
#define KH_X_(name, wire, retry) {wire, retry},
    KH_ERROR_MAP(KH_X_)
#undef KH_X_
};

void kh_error_clear(kh_error_t *err)
{
    if (!err)
        return;
    err->code = KH_E_OK;
    err->path[0] = '\0';
    err->line = 0;
    err->column = 0;
    err->message[0] = '\0';
    err->sqlstate[0] = '\0';
}

static void s_fill(kh_error_t *err, kh_errcode_t code, const char *path,
                   int line, int column, const char *fmt, va_list ap)
    __attribute__((format(printf, 6, 0)));

static void s_fill(kh_error_t *err, kh_errcode_t code, const char *path,
                   int line, int column, const char *fmt, va_list ap)
{
    err->code = code;
    snprintf(err->path, sizeof err->path, "%s", path ? path : "");
    err->line = line;
    err->column = column;
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    err->sqlstate[0] = '\0';
}

int kh_error_set(kh_error_t *err, kh_errcode_t code, const char *path,
                 const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        s_fill(err, code, path, 0, 0, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int kh_error_set_at(kh_error_t *err, kh_errcode_t code, const char *path,
                    int line, int column, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        s_fill(err, code, path, line, column, fmt, ap);
        va_end(ap);
    }
    return -1;
}

int kh_error_as_setting(kh_error_t *err, const char *setting, const char *file)
{
    if (!err) /* as kh_error_set: nothing to fill */
        return -1;
    char why[sizeof err->message];
    snprintf(why, sizeof why, "%s", err->message);
    return kh_error_set(err, KH_E_CONFIG, setting, "%s: %s", file, why);
}

const char *kh_error_name(kh_errcode_t code)
{
    if ((int) code < 0 || code >= KH_E_COUNT_)
        return "unknown";
    return s_errors[code].name;
}

int kh_error_from_name(const char *name)
{
    for (int i = 0; i < KH_E_COUNT_; i++)
        if (strcmp(s_errors[i].name, name) == 0)
            return i;
    return -1;
}

bool kh_error_retryable(kh_errcode_t code)
{
    if ((int) code < 0 || code >= KH_E_COUNT_)
        return false;
    return s_errors[code].retryable;
}

bool kh_path_is_identifier(const char *key, size_t len)
{
    if (len == 0 || len > KH_PATH_KEY_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char) key[i];
        bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        bool digit = c >= '0' && c <= '9';
        if (!(alpha || c == '_' || (digit && i > 0)))
            return false;
    }
    return true;
}

void kh_path_append_key(char *path, size_t size, const char *key, size_t len)
{
    size_t used = strlen(path);
    if (used + 1 >= size)
        return;
    if (kh_path_is_identifier(key, len))
        snprintf(path + used, size - used, "%s%.*s", used ? "." : "", (int) len,
                 key);
    else
        snprintf(path + used, size - used, "%s?", used ? "." : "");
}

void kh_path_append_index(char *path, size_t size, size_t index)
{
    size_t used = strlen(path);
    if (used + 1 < size)
        snprintf(path + used, size - used, "[%zu]", index);
}
