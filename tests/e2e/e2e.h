/*
 * The fault-injection harness (ketenhub-e2e): what its parts share. The
 * driver (harness.c) starts the hub and loads it while faults happen; the
 * checker (check.c) looks at what is left once everything drained.
 */
#ifndef KH_E2E_H_INCLUDED
#define KH_E2E_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

/* The partners that receive deliveries, each with a listener whose inbox
 * is <run>/inbox/<id>. */
#define E2E_LISTENERS 3
extern const char *const e2e_listener_ids[E2E_LISTENERS];

/* The submitting partner. */
#define E2E_SUBMITTER "meldpunt"

/* What the load generator learned about one idempotency key. */
typedef struct {
    char key[64];
    char referral_id[37]; /* "" when the key never got ACCEPTED */
    bool answered;        /* some final answer came (ACCEPTED or refusal) */
    bool mismatch;        /* a resubmission answered with another id */
} e2e_key_t;

/* What the checker needs from the run. */
typedef struct {
    const char *run_dir;    /* holds inbox/, audit/ */
    const char *source_dir; /* the source tree (schemas, rules) */
    const char *ctl;        /* the ketenhubctl binary */
    const e2e_key_t *keys;
    size_t key_count;
} e2e_run_t;

/* Print one check's line and count it. */
void e2e_check(const char *name, bool passed, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Print "e2e: N passed, M failed"; returns M. */
int e2e_report(void);

/* Run every after-drain check against the database named by the PG*
 * environment and the listeners' inboxes. */
void e2e_check_all(const e2e_run_t *run);

#endif
