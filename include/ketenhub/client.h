/*
 * The reference partner client: what a partner system links to talk to
 * the hub (schemas/protocol.md). One client is one DEALER connection with
 * the partner's CURVE key; it is not thread-safe (use one per thread).
 * A partner uses one client for intake (SUBMIT, STATUS) and another, on
 * the notification endpoint, to receive its deliveries (HELLO, DELIVER,
 * ACK, NACK).
 *
 * Replies are returned as the decoded envelope (a jansson object, owned by
 * the caller); kh_client_reply_cmd tells the outcome at a glance.
 */
#ifndef KH_CLIENT_H_INCLUDED
#define KH_CLIENT_H_INCLUDED

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

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

/* Close and free; accepts NULL; nulls the pointer. What was sent but has
 * not left yet is dropped (the socket does not linger): an ACK or NACK
 * counts only once its ACKED or NACKED has come through kh_client_recv,
 * so wait for those before destroying a delivery client. */
void kh_client_destroy(kh_client_t **self_p);

/* How often a request is sent again after a timeout or a retryable
 * refusal (default 0: once only). Resending is safe: a SUBMIT keeps its
 * idempotency key, so the hub answers it with the first answer. A
 * refusal is resent only after its retry_after_ms; one that asks for a
 * minute or more is returned instead, to be resent that much later. */
void kh_client_set_retries(kh_client_t *self, int retries);

/* Send one request envelope (the client sets v and cid) and wait up to
 * timeout_ms for its reply. Returns the reply (caller owns it), or NULL
 * with err: KH_E_TIMEOUT (no reply: hub unreachable or busy, or a signal
 * such as SIGINT ended the wait: then it is not resent, and a retryable
 * refusal being waited out is returned at once),
 * KH_E_UNKNOWN_PARTNER (the hub refused this key during the handshake), or
 * KH_E_TOO_LARGE / KH_E_TOO_DEEP (the request was not sent: the hub would
 * drop or refuse it, and a resend cannot help). */
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

/* ---- receiving deliveries (schemas/protocol.md, Deliveries) ----------
 *
 * On a client connected to the notification endpoint (default
 * tcp://HUB:7703) the partner sends HELLO, and repeats it about every
 * second as its heartbeat; the hub answers WELCOME and sends DELIVER
 * messages, which the partner answers with ACK (only once the delivery is
 * stored durably) or NACK. These calls do not wait for a reply: replies
 * and deliveries all come through kh_client_recv. */

/* Send HELLO asking for at most window unacknowledged deliveries on this
 * connection (1..1024), or 0 to let the hub choose. 0, or -1 with err. */
int kh_client_hello(kh_client_t *self, int window, kh_error_t *err);

/* Send ACK / NACK for delivery_id. The cid is "ack:ID" / "nack:ID", so
 * the ACKED, NACKED or REJECTED reply names the delivery even when it
 * carries no delivery_id. permanent: NACK "permanent" (make it a dead
 * letter now) instead of "retry". 0 (queued for sending, not yet
 * committed: that is its ACKED or NACKED reply), or -1 with err. */
int kh_client_ack(kh_client_t *self, const char *delivery_id, kh_error_t *err);
int kh_client_nack(kh_client_t *self, const char *delivery_id, bool permanent,
                   kh_error_t *err);

/* The next message from the hub (caller owns it), waiting up to
 * timeout_ms. NULL with err: KH_E_TIMEOUT when nothing came (also when
 * interrupted by a signal), KH_E_UNKNOWN_PARTNER when the hub refused
 * this key in the handshake. A frame may hold a string of up to 1 MiB
 * (a DELIVER's payload) and that string's envelope. Frames that are not
 * a valid envelope are dropped and waiting goes on (kh_client_dropped
 * counts them). */
json_t *kh_client_recv(kh_client_t *self, int timeout_ms, kh_error_t *err);

/* How many frames kh_client_recv dropped so far, and into why (when not
 * NULL) the last one's reason: code, field path and message. */
uint64_t kh_client_dropped(const kh_client_t *self, kh_error_t *why);

/* Check a DELIVER message: its fields and types (KH_E_BAD_ENVELOPE with
 * the field's path), that payload_sha256 is the SHA-256 of payload, and
 * that payload is a JSON object. Returns 0 and *payload (a new object,
 * caller owns it); -1 when the message is malformed (it will not get
 * better when sent again); -2 when the payload does not match its hash
 * (damaged on the way) or memory ran out reading it: NACK it for a
 * re-send. */
int kh_client_delivery_check(const json_t *deliver, json_t **payload,
                             kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
