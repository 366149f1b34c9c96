/*
 * The notification service's database side: claiming a partner's due
 * deliveries (marking them sent), ACKs, NACKs and the sweeps that make
 * dead letters and escalations. Every state change commits in one
 * statement with its audit events (promise 2); every call is bounded by
 * the connection's statement_timeout.
 */
#ifndef DSTORE_H_INCLUDED
#define DSTORE_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>
#include <stddef.h>

#include "ketenhub/error.h"

/* When deliveries are re-sent, given up and escalated. */
typedef struct {
    int ack_timeout_ms; /* first wait for an ACK; doubles per attempt */
    int backoff_max_ms; /* the longest wait */
    int max_attempts;   /* sends before a dead letter */
    int max_age_s;      /* age (since routing) of a dead letter */
    int escalate_ms;    /* an unacknowledged urgent delivery escalates */
} dstore_policy_t;

typedef struct _dstore_t dstore_t;

/* A store for conninfo; connects lazily (dstore_connect). NULL on OOM. */
dstore_t *dstore_new(const char *conninfo, const dstore_policy_t *policy);
void dstore_destroy(dstore_t **self_p);

/* Connect when there is no working connection, without blocking: the
 * connections are made on threads of their own, and a call while they are
 * being made returns -1 (dstore_connecting is then true): call again
 * later. 0 or -1 with err. */
int dstore_connect(dstore_t *self, kh_error_t *err);

/* Whether an attempt to connect is under way. */
bool dstore_connecting(const dstore_t *self);

/* A transaction around several calls (one commit for a round's NACKs and
 * claims); without one each call commits on its own. ACK batches are not
 * part of it (they have a connection of their own). The BEGIN goes to
 * PostgreSQL with the first call, so a transaction without calls costs
 * nothing. dstore_commit rolls back when the commit fails. 0, or -1 with
 * err. */
int dstore_begin(dstore_t *self, kh_error_t *err);
int dstore_commit(dstore_t *self, kh_error_t *err);
/* Roll back after a failure, why: a connection it left of no use is
 * closed (dstore_up turns false; the next dstore_connect makes another). */
void dstore_rollback(dstore_t *self, const kh_error_t *why);

/* Whether the last call found the connection working. */
bool dstore_up(const dstore_t *self);

/* Whether the registry changed since this was last asked (the connection
 * LISTENs on KH_PARTNER_CHANNEL): read it again then. A connection that
 * broke counts as changed, so that the read fails and says so. */
bool dstore_registry_changed(dstore_t *self);

/* The active partners: Z85 public key -> partner id (hash owns both),
 * and into *ends_in_ms the ms until the first of those keys ends (-1:
 * none ends); NULL with err. */
zhashx_t *dstore_partners(dstore_t *self, int64_t *ends_in_ms, kh_error_t *err);

/* One delivery as claimed; strings valid during the callback only. */
typedef struct {
    const char *id, *referral_id, *priority, *routed_at;
    const char *payload, *payload_sha256;
    size_t payload_len;
    int attempt; /* 1 for the first send */
    /* An escalation copy: the partner whose delivery of the referral was
     * not acknowledged in time, and when that delivery's wait began (RFC
     * 3339); NULL for any other delivery. */
    const char *overdue_partner, *overdue_since;
    /* When this send was committed (RFC 3339, to the microsecond): it
     * names the send (dstore_unsent). */
    const char *sent_at;
} dstore_delivery_t;

typedef void(dstore_delivery_fn)(const dstore_delivery_t *delivery, void *arg);

/* Claim, mark as sent again and audit (delivery.sent) the sent deliveries
 * of partner whose ACK is overdue: those among the nout ids in out (out on
 * the connection, those of them whose re-send may be due: they take no
 * more of its window), and up to credit
 * others (reclaim: also sent, unacknowledged ones not yet overdue, but
 * the nkeep ids in keep, for a partner that reconnected), most urgent then
 * oldest first; those others share credit with partner's pending
 * deliveries in that order, leaving what a pending one outranks to
 * dstore_claim_pending. None when key (the connection's, Z85) no longer
 * admits partner, and *admitted is set false (else true). fn is called for
 * each, in that order (inside the caller's transaction, if any: send
 * nothing before it commits). Returns the number claimed, -1 with err. */
int dstore_resend(dstore_t *self, const char *partner, const char *key,
                  const char *peer, size_t credit, bool reclaim,
                  const char *const *keep, size_t nkeep, const char *const *out,
                  size_t nout, dstore_delivery_fn *fn, void *arg,
                  bool *admitted, kh_error_t *err);

/* One connection's part of a claim of pending deliveries. */
typedef struct {
    const char *partner, *key, *peer; /* key: the connection's (Z85) */
    size_t limit;                     /* at least 1 */
    bool admitted; /* set by the claim: false when key no longer admits
                    * partner (none was claimed for it) */
} dstore_claim_t;

typedef void(dstore_claimed_fn)(size_t which, const dstore_delivery_t *delivery,
                                void *arg);

/* Claim, mark as sent and audit (delivery.sent) up to claims[i].limit
 * pending deliveries of claims[i].partner for each of the count claims
 * (a partner's first claim whose key admits it: none for a revoked
 * partner, nor on a key past its rotation's overlap, for which
 * claims[i].admitted is set false), most urgent then oldest first, in one
 * statement; fn is called with i for each, in that order (inside the
 * caller's transaction, if any: send nothing before it commits). Returns
 * the number claimed, -1 with err. */
int dstore_claim_pending(dstore_t *self, dstore_claim_t *claims, size_t count,
                         dstore_claimed_fn *fn, void *arg, kh_error_t *err);

/* Make the count ids (partner's) that are sent, unacknowledged and not at
 * their last attempt due for a re-send now: they were out on a connection
 * that is gone. Returns how many changed, or -1 with err. */
int dstore_due_now(dstore_t *self, const char *partner, const char *const *ids,
                   size_t count, kh_error_t *err);

/* Give back the attempt of each of the count ids whose send (sent_at[i],
 * as its claim gave it) committed but never left the hub: due again now,
 * with a delivery.unsent event each (in the caller's transaction). One
 * sent again since, answered or dead is left alone. Returns how many
 * changed, or -1 with err. */
int dstore_unsent(dstore_t *self, const char *const *ids,
                  const char *const *sent_at, size_t count, kh_error_t *err);

typedef enum {
    DSTORE_DONE,      /* committed with its audit event */
    DSTORE_DUPLICATE, /* ACK of an acknowledged delivery: nothing changed */
    DSTORE_NOT_FOUND, /* unknown id, or another partner's: refusal audited */
    DSTORE_DEAD,      /* NACK: it is a dead letter now */
    DSTORE_UNCHANGED, /* NACK of a delivery that is not out: nothing done */
    /* The key it came with no longer admits its partner (the key map
     * has not heard of it yet): nothing changed, nothing written. */
    DSTORE_NOT_ADMITTED
} dstore_outcome_t;

/* One ACK or NACK of a batch. */
typedef struct {
    char id[37];
    char partner[33];
    char key[41]; /* the connection's (Z85) */
    char peer[64];
    dstore_outcome_t outcome; /* filled by dstore_ack_wait, dstore_nack */
    char referral[37];        /* dstore_nack, DSTORE_DEAD: its referral's id */
    double wait_s; /* ACKs, DSTORE_DONE: seconds since the last send */
} dstore_answer_t;

/* Commit a batch of ACKs (distinct ids) with their audit events in one
 * statement, in two halves, so that the batch commits (in a transaction
 * of its own, on a connection of its own) while the caller claims:
 * dstore_ack_send starts it (acks must stay valid until dstore_ack_wait
 * returns), dstore_ack_wait waits for it and fills each outcome. One
 * batch at a time. Each returns 0, or -1 with err (nothing changed). */
int dstore_ack_send(dstore_t *self, dstore_answer_t *acks, size_t count,
                    kh_error_t *err);
int dstore_ack_wait(dstore_t *self, kh_error_t *err);

/* Commit a NACK (permanent: a dead letter at once; else re-sent after the
 * backoff, or dead after the last attempt) with its audit events. */
int dstore_nack(dstore_t *self, dstore_answer_t *nack, bool permanent,
                kh_error_t *err);

/* Record a refused handshake or connection (auth.refused) of key (Z85, ""
 * if none) from peer, with its reason code (unknown_partner, or
 * routing_id_chosen, routing_id_taken: see notify.c). 0, or -1 with err. */
int dstore_audit_refused(dstore_t *self, const char *key, const char *peer,
                         const char *reason, kh_error_t *err);

/* Something a sweep did; strings valid during the callback only. */
typedef struct {
    const char *kind; /* "dead" or "escalated" */
    const char *delivery_id, *referral_id, *partner;
    /* dead: why it died (dead_reason). escalated: why no copy went out
     * (copy "none"), else NULL: no_escalation_partner, partner_revoked,
     * partner_not_handling_cases, payload_purged, or copy_exists (a copy
     * of this delivery was made before; a delivery escalates once, so
     * only a database changed by hand gives it). These names go into the
     * log: once released they stay (partner_has_delivery, and the copy
     * "raised", were those of the releases before migration 020). */
    const char *reason;
    /* escalated: "made" (an urgent copy, delivery.created) or "none" (no
     * event beyond the escalation's) */
    const char *copy;
    const char *escalate_to; /* escalated: the rules' partner, or NULL */
} dstore_event_t;

typedef void(dstore_event_fn)(const dstore_event_t *event, void *arg);

/* Make dead letters of deliveries past their last attempt, too old, or
 * for a revoked partner, and escalate overdue urgent ones (with a copy to
 * the escalation partner where the rules named one); each with its audit
 * event. fn is called per change after the commit. Returns the number of
 * changes, -1 with err. */
int dstore_sweep(dstore_t *self, dstore_event_fn *fn, void *arg,
                 kh_error_t *err);

#endif
