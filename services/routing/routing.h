/*
 * The routing service's core: claims accepted referrals from PostgreSQL
 * in batches, evaluates the rules, and commits each referral's deliveries
 * (one per target partner, with that partner's projection), its audit
 * event and its new state in the one transaction of its batch. Runs on a
 * timer and whenever a wake-up arrives on its CURVE PULL socket;
 * PostgreSQL is the truth, the wake-up only hastens the next pass.
 */
#ifndef ROUTING_H_INCLUDED
#define ROUTING_H_INCLUDED

#include <stdbool.h>
#include <stddef.h>

#include "ketenhub/error.h"

typedef struct {
    const char *conninfo;        /* libpq connection string ("" = PG* env) */
    const char *rules_file;      /* the rules administrators edit */
    const char *schema_path;     /* schemas/referral.v1.json */
    const char *endpoint;        /* wake-up PULL endpoint, bound */
    const char *hub_cert;        /* hub certificate (its _secret beside it) */
    const char *notify_endpoint; /* notification's wake-ups; "none": none */
    size_t batch;                /* most referrals claimed per transaction */
    size_t batch_bytes;          /* and most bytes of their stored payloads */
    int poll_ms;                 /* a pass at least this often */
    int partner_refresh_ms;      /* the registry is re-read this often */
    int hold_ms; /* a referral whose writes fail alone waits this long */
} routing_config_t;

typedef struct _routing_t routing_t;

/* Check the rules file (without the partners), load the hub certificate,
 * bind the wake-up socket: everything that needs no database. NULL with
 * err on failure: a rules.* code for a rules file that does not load
 * (every problem is logged with its line and column), KH_E_CONFIG for a
 * bad setting. */
routing_t *routing_new(const routing_config_t *config, kh_error_t *err);

/* Then connect to PostgreSQL and load the rules against the registered
 * partners, without blocking: the connection is made on a thread of its
 * own. 0 when done (and on every later call); -1 with err otherwise:
 * KH_E_UNAVAILABLE while connecting (routing_connecting is then true: call
 * again soon) or when PostgreSQL cannot be reached (call again later), a
 * rules.* code or KH_E_CONFIG when the rules do not load against the
 * partners. */
int routing_start(routing_t *self, kh_error_t *err);

/* Whether an attempt to connect is under way. */
bool routing_connecting(const routing_t *self);

/* Destroy; accepts NULL and a pointer to NULL. */
void routing_destroy(routing_t **self_p);

/* Run passes until SIGTERM or SIGINT arrives on signal_fd (a transaction
 * in flight is finished first); SIGHUP reloads the rules. Returns 0 on a
 * clean stop, -1 when the loop failed. */
int routing_run(routing_t *self, int signal_fd);

#endif
