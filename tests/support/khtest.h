/*
 * Helpers shared by the tests (placeholder; the PostgreSQL helpers follow).
 */
#ifndef KHTEST_H_INCLUDED
#define KHTEST_H_INCLUDED

#include <check.h>

/* Path of a file in the source tree, e.g. khtest_src ("schemas/x.json"). */
const char *khtest_src(const char *relative);

#endif
