/*
 * A partner system's socket in the tests: a CURVE DEALER connected to a
 * hub endpoint, and the MessagePack envelopes sent and received on it.
 * Every helper fails the current test when it cannot do its job.
 */
#ifndef KHPARTNER_H_INCLUDED
#define KHPARTNER_H_INCLUDED

#include <czmq.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>

/* A new key pair for partner id: dir/ID.cert (and ID.cert_secret) for
 * the partner system, dir/partners/ID.cert for the hub's partner
 * directory; registered in db as kind (cases: it may receive referrals). */
void khpartner_make(PGconn *db, const char *dir, const char *id,
                    const char *kind, bool cases);

/* A DEALER with the key pair of cert (and cert's _secret beside it),
 * trusting the server key in hub_cert, connected to endpoint; linger 0. */
zsock_t *khpartner_connect(const char *cert, const char *hub_cert,
                           const char *endpoint);

/* As khpartner_connect, with a routing id of its own (rid, len bytes;
 * NULL: none), which the reference client never sets: a test's way to
 * take another connection's id, or to be refused for choosing one. */
zsock_t *khpartner_connect_rid(const char *cert, const char *hub_cert,
                               const char *endpoint, const void *rid,
                               size_t len);

/* Send msg (consumed) as one MessagePack frame. */
void khpartner_send(zsock_t *sock, json_t *msg);

/* The next envelope, decoded with the default limits, or NULL after
 * timeout_ms. */
json_t *khpartner_recv(zsock_t *sock, int timeout_ms);

#endif
