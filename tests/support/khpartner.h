/*
 * A partner system's socket in the tests: a CURVE DEALER connected to a
 * hub endpoint, and the MessagePack envelopes sent and received on it.
 * Every helper fails the current test when it cannot do its job.
 */
#ifndef KHPARTNER_H_INCLUDED
#define KHPARTNER_H_INCLUDED

#include <czmq.h>
#include <jansson.h>

/* A DEALER with the key pair of cert (and cert's _secret beside it),
 * trusting the server key in hub_cert, connected to endpoint; linger 0. */
zsock_t *khpartner_connect(const char *cert, const char *hub_cert,
                           const char *endpoint);

/* Send msg (consumed) as one MessagePack frame. */
void khpartner_send(zsock_t *sock, json_t *msg);

/* The next envelope, decoded with the default limits, or NULL after
 * timeout_ms. */
json_t *khpartner_recv(zsock_t *sock, int timeout_ms);

#endif
