/*
 * Environment-variable settings, validated against their table.
 */
#include "ketenhub/config.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/log.h"

/* Whether text is an endpoint whose tcp port, if any, is "*" or a number
 * in 1..65535 (see kh_cfg_type_t). */
static bool s_endpoint_valid(const char *text)
{
    const char *sep = strstr(text, "://");
    if (!sep || sep == text || !sep[3])
        return false;
    if (strncmp(text, "tcp://", 6) != 0)
        return true;
    const char *port = strrchr(text, ':');
    if (port < sep + 3)
        return false; /* no port at all */
    port++;
    if (strcmp(port, "*") == 0)
        return true;
    size_t digits = strspn(port, "0123456789");
    long value = digits > 0 && digits <= 5 ? atol(port) : 0;
    return port[digits] == '\0' && value >= 1 && value <= 65535;
}

static int s_parse(kh_cfg_t *entry, const char *text, kh_error_t *err)
{
    entry->str = text;
    entry->num = 0;
    if (entry->type == KH_CFG_STRING)
        return 0;
    if (entry->type == KH_CFG_ENDPOINT ||
        entry->type == KH_CFG_ENDPOINT_OR_NONE) {
        bool none = entry->type == KH_CFG_ENDPOINT_OR_NONE;
        if (s_endpoint_valid(text) || (none && strcmp(text, "none") == 0))
            return 0;
        return kh_error_set(err, KH_E_CONFIG, entry->name,
                            "%s must be a ZeroMQ endpoint such as "
                            "tcp://HOST:PORT (port 1-65535 or *)%s",
                            entry->name, none ? ", or none" : "");
    }
    if (entry->type == KH_CFG_BOOL) {
        if (strcmp(text, "1") == 0 || strcmp(text, "true") == 0 ||
            strcmp(text, "yes") == 0 || strcmp(text, "on") == 0)
            entry->num = 1;
        else if (strcmp(text, "0") == 0 || strcmp(text, "false") == 0 ||
                 strcmp(text, "no") == 0 || strcmp(text, "off") == 0)
            entry->num = 0;
        else
            return kh_error_set(err, KH_E_CONFIG, entry->name,
                                "%s must be true or false", entry->name);
        return 0;
    }
    /* strtol would skip leading blanks and take a '+': a value is digits,
     * a '-' before them at most, as a trailing blank is refused too. */
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end != '\0' ||
        !(isdigit((unsigned char) text[0]) ||
          (text[0] == '-' && isdigit((unsigned char) text[1]))))
        return kh_error_set(err, KH_E_CONFIG, entry->name,
                            "%s must be an integer", entry->name);
    if (value < entry->min || value > entry->max)
        return kh_error_set(err, KH_E_CONFIG, entry->name,
                            "%s must be between %ld and %ld", entry->name,
                            entry->min, entry->max);
    entry->num = value;
    return 0;
}

int kh_config_load(kh_cfg_t *table, size_t count, kh_error_t *err)
{
    for (size_t i = 0; i < count; i++) {
        const char *text = getenv(table[i].name);
        if (!text || !*text)
            text = table[i].defval;
        if (!text)
            return kh_error_set(err, KH_E_CONFIG, table[i].name,
                                "%s is required: %s", table[i].name,
                                table[i].help);
        if (s_parse(&table[i], text, err))
            return -1;
    }
    return 0;
}

bool kh_config_is_set(const char *name)
{
    const char *text = getenv(name);
    return text && *text;
}

const kh_cfg_t *kh_config_get(const kh_cfg_t *table, size_t count,
                              const char *name)
{
    for (size_t i = 0; i < count; i++)
        if (strcmp(table[i].name, name) == 0)
            return &table[i];
    return NULL;
}

void kh_config_log(const kh_cfg_t *table, size_t count)
{
    for (size_t i = 0; i < count; i++)
        kh_log_info("config", "name=%s value=\"%s\"", table[i].name,
                    table[i].secret ? "***" : KH_LOG_Q(table[i].str));
}

void kh_config_usage(const kh_cfg_t *table, size_t count)
{
    fprintf(stderr, "environment:\n");
    for (size_t i = 0; i < count; i++)
        fprintf(stderr, "  %-24s %s (default: %s)\n", table[i].name,
                table[i].help,
                table[i].defval ? (*table[i].defval ? table[i].defval : "\"\"")
                                : "required");
}
