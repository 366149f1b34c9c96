/*
 * The reference partner client: what a partner system links to talk to
 * the hub (schemas/protocol.md). One client is one DEALER connection with
 * the partner's CURVE key; it is not thread-safe (use one per thread).
 *
 * Replies are returned as the decoded envelope (a jansson object, owned by
 * the caller); kh_client_reply_code tells the outcome at a glance.
 */
#ifndef KH_CLIENT_H_INCLUDED
#define KH_CLIENT_H_INCLUDED

#include <jansson.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_client_t kh_client_t;

/* Connect to the hub at endpoint ("tcp://hub.example.nl:7701") with the
 * hub's public certificate file and the partner's certificate file (its
 * "_secret" file beside it). The connection is made in the background.
 * NULL with err (KH_E_CONFIG: a certificate cannot be read) on failure. */
kh_client_t *kh_client_new(const char *endpoint, const char *hub_cert,
                           const char *partner_cert, kh_error_t *err);

/* Close and free; accepts NULL; nulls the pointer. */
void kh_client_destroy(kh_client_t **self_p);

/* How often a request is sent again after a timeout or a retryable
 * refusal (default 0: once only). Resending is safe: a SUBMIT keeps its
 * idempotency key, so the hub answers it with the first answer. */
void kh_client_set_retries(kh_client_t *self, int retries);

/* Send one request envelope (the client sets v and cid) and wait up to
 * timeout_ms for its reply. Returns the reply (caller owns it), or NULL
 * with err: KH_E_TIMEOUT (no reply: hub unreachable or busy) or
 * KH_E_UNKNOWN_PARTNER (the hub refused this key during the handshake). */
json_t *kh_client_request(kh_client_t *self, json_t *request, int timeout_ms,
                          kh_error_t *err);

/* SUBMIT referral under idem_key; returns ACCEPTED or REJECTED as above. */
json_t *kh_client_submit(kh_client_t *self, const json_t *referral,
                         const char *idem_key, int timeout_ms, kh_error_t *err);

/* STATUS of a referral this partner submitted. */
json_t *kh_client_status(kh_client_t *self, const char *referral_id,
                         int timeout_ms, kh_error_t *err);

/* PING the hub: 0 when PONG came back within timeout_ms, else -1. */
int kh_client_ping(kh_client_t *self, int timeout_ms, kh_error_t *err);

/* The reply's command name ("ACCEPTED", "REJECTED", ...), "" if none. */
const char *kh_client_reply_cmd(const json_t *reply);

#ifdef __cplusplus
}
#endif
#endif
