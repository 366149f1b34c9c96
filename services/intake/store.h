/*
 * intake's PostgreSQL side. Two connections: the writer commits batches
 * asynchronously, so intake can check the next batch while PostgreSQL
 * commits this one; the reader answers STATUS, idempotency look-ups and
 * registry reloads, and writes the idempotency conflicts found after a
 * batch's statement, so they never wait behind a commit.
 *
 * A batch of accepted referrals and refusal audit events is committed by a
 * single statement, so each referral commits with its audit event
 * (promise 2) and the batch costs one round trip and one commit.
 */
#ifndef INTAKE_STORE_H_INCLUDED
#define INTAKE_STORE_H_INCLUDED

#include <czmq.h>
#include <jansson.h>
#include <stdbool.h>

#include "ketenhub/error.h"

typedef struct _store_t store_t;

/* One SUBMIT of a batch. The caller fills the inputs; the store fills the
 * outputs when the batch has committed. */
typedef struct {
    const char *partner_id; /* from the authenticated key */
    const char *key;        /* that key (Z85) */
    const char *idem_key;
    const json_t *referral;
    const char *payload; /* its canonical JSON, payload_len bytes */
    size_t payload_len;
    const char *peer;     /* peer address, may be NULL */
    char hash[65];        /* SHA-256 of payload (hex) */
    char referral_id[37]; /* the id to give it if it is new */
    /* outputs: whether key still admitted partner_id (the key map may
     * not have heard yet of a revocation or an overlap that ended): if
     * not, nothing was done for it and nothing else is filled */
    bool admitted;
    /* outputs: the row that holds (partner, key) after the commit */
    bool inserted;        /* it is this submission's row */
    bool late;            /* found by a look-up after the statement (another
                           * process committed it meanwhile): a conflict with
                           * it is not in the trail yet */
    char stored_id[37];   /* its id */
    char stored_hash[65]; /* its payload hash: differs on a conflict */
    char accepted_at[40]; /* when it was accepted */
} store_submit_t;

/* One refusal to audit. */
typedef struct {
    const char *action;   /* referral.rejected, auth.refused, ... */
    const char *actor_id; /* partner id or "key:<Z85>" */
    const char *code;     /* wire error code */
    const char *path;     /* field path or "" */
    const char *peer;     /* peer address, may be NULL */
} store_refusal_t;

/* A later request of a batch with the key of submission subs[sub]: the
 * batch's statement writes its idempotency conflict, if it has one with
 * the row that key holds after the statement (unless another process
 * committed that row meanwhile: late). */
typedef struct {
    size_t sub;
    const char *hash; /* SHA-256 of its referral (hex) */
    const char *peer; /* peer address, may be NULL */
} store_repeat_t;

/* An idempotency conflict the batch's statement could not write: with a
 * key committed by another intake process while the statement ran. */
typedef struct {
    const char *partner_id;
    const char *hash; /* SHA-256 of the refused referral (hex) */
    const char *peer; /* peer address, may be NULL */
} store_conflict_t;

/* A store for conninfo (libpq syntax; "" means libpq's environment). It
 * does not connect yet. NULL on allocation failure. */
store_t *store_new(const char *conninfo);

/* Destroy; accepts NULL; nulls the pointer. */
void store_destroy(store_t **self_p);

/* (Re)connect the connections that are not up (a connection that is
 * fine is kept) and prepare their statements, without blocking:
 * the connections are made on threads of their own (kh_db_connect_async),
 * and a call while they are being made returns -1 with KH_E_UNAVAILABLE
 * (store_connecting is then true): call again later. 0 once connected and
 * prepared, or -1 with err: KH_E_UNAVAILABLE when PostgreSQL cannot be
 * reached, KH_E_DB when it answers but the statements cannot be prepared
 * (schema not migrated). */
int store_connect(store_t *self, kh_error_t *err);

/* While a read waits for PostgreSQL, also watch fd: when it is readable,
 * stop(arg) is called, and a read is given up (the reader is closed, as
 * on a timeout) when it returns true. Intake passes its signal fd, so
 * that SIGTERM does not wait for a read. stop NULL: watch nothing. */
void store_watch_stop(store_t *self, int fd, bool (*stop)(void *arg),
                      void *arg);

/* Whether an attempt to connect is under way. */
bool store_connecting(const store_t *self);

/* Whether both connections are usable. */
bool store_up(store_t *self);

/* The writer's socket, to poll for the end of a commit; -1 when down. */
int store_socket(store_t *self);

/* Whether the batch being committed is still being sent: poll the writer's
 * socket for writing too, and call store_commit_poll when it is. */
bool store_sending(const store_t *self);

/* Start committing subs[0..nsubs), the conflicts of reps[0..nreps) and
 * refs[0..nrefs) (they must stay put until the batch ends). Within subs
 * every (partner, idempotency key) appears at most once. Never blocks: what the
 * socket does not take at once is sent by store_commit_poll (see
 * store_sending). 0, or -1 with err (nothing was committed). */
int store_commit_send(store_t *self, store_submit_t *subs, size_t nsubs,
                      const store_repeat_t *reps, size_t nreps,
                      const store_refusal_t *refs, size_t nrefs,
                      kh_error_t *err);

/* Send what is left of the batch and read what the writer has received,
 * without blocking. Returns 1 while the commit is still running, 0 when it
 * committed (each submit's outputs filled), -1 with err when it did not:
 * KH_E_UNAVAILABLE when the database went away (the outcome may be
 * unknown: a resubmission with the same key tells), KH_E_INTERNAL for
 * anything else; or STORE_COMMITTED_UNREAD with err when the batch
 * committed but its answers could not all be read (a resubmission with
 * the same key gets them): it must not be committed again. */
#define STORE_COMMITTED_UNREAD (-2)
int store_commit_poll(store_t *self, store_submit_t *subs, size_t nsubs,
                      kh_error_t *err);

/* Write the referral.rejected events of conflicts[0..n) (the same rows
 * as the batch statement writes for a conflict it sees) in one statement
 * on the reader, and wait at most a second for it. 0 once they are
 * committed, or -1 with a retryable err: KH_E_UNAVAILABLE (after a
 * timeout the outcome is unknown), KH_E_INTERNAL or KH_E_NOMEM. */
int store_audit_conflicts(store_t *self, const store_conflict_t *conflicts,
                          size_t n, kh_error_t *err);

/* Give up on a commit that takes too long: PostgreSQL is asked to cancel
 * it (from a thread: the request may block on a network that is gone),
 * so that it holds no locks a resubmission would wait for; the writer is
 * closed and store_up becomes false. The outcome is unknown (the commit
 * may have ended before the cancel came): a resubmission with the same
 * idempotency key tells. A read that times out is given up the same
 * way. */
void store_abandon(store_t *self);

/* The STATUS of a referral submitted by partner_id, asked with key (Z85):
 * sets the state and accepted_at fields on reply. -1 with KH_E_NOT_FOUND
 * when there is no such referral of this partner, or KH_E_UNAVAILABLE /
 * KH_E_INTERNAL; *admitted false (KH_E_UNAVAILABLE) when key no longer
 * admits partner_id (the key map has not heard of that yet). */
int store_status(store_t *self, const char *partner_id, const char *key,
                 const char *referral_id, bool *admitted, json_t *reply,
                 kh_error_t *err);

/* Whether the registry changed since this was last asked (the reader
 * LISTENs on KH_PARTNER_CHANNEL): read it again then. A reader that
 * broke counts as changed, so that the read fails and says so. */
bool store_registry_changed(store_t *self);

/* Load active partners into a new hash: Z85 key -> partner id (strings,
 * owned by the hash), and into *ends_in_ms the ms until the first of those
 * keys ends (-1: none ends). NULL with err on failure. */
zhashx_t *store_partners(store_t *self, int64_t *ends_in_ms, kh_error_t *err);

#endif
