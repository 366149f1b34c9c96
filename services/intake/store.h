/*
 * intake's PostgreSQL side: one batch of accepted referrals and refusal
 * audit events committed in a single statement (so each referral commits
 * with its audit event, promise 2), idempotency answers, STATUS queries
 * and the partner registry. Tracks whether the database is reachable and
 * reconnects on request.
 */
#ifndef INTAKE_STORE_H_INCLUDED
#define INTAKE_STORE_H_INCLUDED

#include <czmq.h>
#include <jansson.h>
#include <stdbool.h>

#include "ketenhub/error.h"

typedef struct _store_t store_t;

/* One SUBMIT of the batch. The caller fills the inputs; store_commit fills
 * the outputs. */
typedef struct {
    const char *partner_id; /* from the authenticated key */
    const char *idem_key;
    const json_t *referral;
    const char *peer; /* peer address, may be NULL */
    char hash[65];    /* payload hash (hex) */
    char referral_id[37];
    /* outputs */
    char accepted_at[40];
    bool duplicate; /* the key was used before with the same payload */
    bool conflict;  /* the key was used before with another payload */
} store_submit_t;

/* One refusal to audit. */
typedef struct {
    const char *action;   /* referral.rejected, auth.refused, ... */
    const char *actor_id; /* partner id or "key:<Z85>" */
    const char *code;     /* wire error code */
    const char *path;     /* field path or "" */
    const char *peer;     /* peer address, may be NULL */
} store_refusal_t;

/* A store for conninfo (libpq syntax; "" means libpq's environment). It
 * does not connect yet. NULL on allocation failure. */
store_t *store_new(const char *conninfo);

/* Destroy; accepts NULL; nulls the pointer. */
void store_destroy(store_t **self_p);

/* (Re)connect and prepare statements. 0, or -1 with err (unavailable). */
int store_connect(store_t *self, kh_error_t *err);

/* Whether the last operation left the connection usable. */
bool store_up(store_t *self);

/* Commit subs[0..nsubs) and refusals[0..nrefs) in one statement. Returns 0
 * and fills each submit's outputs, or -1 with err: KH_E_UNAVAILABLE when
 * the database cannot be reached (nothing was committed, or the outcome is
 * unknown and a resubmission with the same key will tell), KH_E_INTERNAL
 * for any other failure. Within a batch every (partner, key) must appear
 * at most once. */
int store_commit(store_t *self, store_submit_t *subs, size_t nsubs,
                 const store_refusal_t *refs, size_t nrefs, kh_error_t *err);

/* The STATUS of a referral submitted by partner_id: sets state and
 * accepted_at fields on reply. -1 with KH_E_NOT_FOUND when there is no
 * such referral of this partner, or KH_E_UNAVAILABLE / KH_E_INTERNAL. */
int store_status(store_t *self, const char *partner_id, const char *referral_id,
                 json_t *reply, kh_error_t *err);

/* Load active partners into a new hash: Z85 key -> partner id (strings,
 * owned by the hash). NULL with err on failure. */
zhashx_t *store_partners(store_t *self, kh_error_t *err);

#endif
