/*
 * Helpers shared by the tests.
 */
#include "khtest.h"

#include <stdio.h>

const char *khtest_src(const char *relative)
{
    static char path[4096];
    snprintf(path, sizeof path, "%s/%s", KH_TEST_SOURCE_DIR, relative);
    return path;
}
