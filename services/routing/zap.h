/*
 * routing's ZAP handler: the wake-up socket accepts exactly one client key,
 * the hub's own (services authenticate to each other as the hub).
 */
#ifndef ROUTING_ZAP_H_INCLUDED
#define ROUTING_ZAP_H_INCLUDED

#include <czmq.h>

#include "ketenhub/error.h"

typedef struct _routing_zap_t routing_zap_t;

/* Bind the process's ZAP endpoint, accepting only public_key (Z85).
 * Must exist before the CURVE server socket binds. NULL with err. */
routing_zap_t *routing_zap_new(const char *public_key, kh_error_t *err);

/* Destroy; accepts NULL and a pointer to NULL. */
void routing_zap_destroy(routing_zap_t **self_p);

/* The REP socket to read from in the loop. */
zsock_t *routing_zap_socket(routing_zap_t *self);

/* Answer one pending ZAP request. Returns 0 when the key was accepted,
 * 1 when refused, -1 when no request could be read. */
int routing_zap_handle(routing_zap_t *self);

#endif
