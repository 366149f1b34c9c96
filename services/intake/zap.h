/*
 * intake's ZAP handler (ZeroMQ RFC 27): decides, during the CURVE
 * handshake, whether a client key may connect at all. A key may connect
 * when its public certificate is in the partner directory (picked up
 * without a restart). The handler runs in intake's own loop, so that a
 * refused key can be written to the audit trail (auth.refused), which
 * CZMQ's zauth cannot do.
 */
#ifndef INTAKE_ZAP_H_INCLUDED
#define INTAKE_ZAP_H_INCLUDED

#include <czmq.h>

#include "ketenhub/error.h"

typedef struct _zap_t zap_t;

/* Bind the process's ZAP endpoint (before any CURVE server socket binds:
 * without a handler libzmq lets every key in). NULL with err on failure. */
zap_t *zap_new(const char *cert_dir, kh_error_t *err);

/* Destroy; accepts NULL; nulls the pointer. */
void zap_destroy(zap_t **self_p);

/* The socket to read ZAP requests from. */
zsock_t *zap_socket(zap_t *self);

/* Read and answer one ZAP request. Returns 0 when the key was let in, 1
 * when it was refused (key holds its Z85 text, address the peer's), -1
 * when the request was not a CURVE request we understand (refused too). */
int zap_handle(zap_t *self, char key[41], char address[64]);

#endif
