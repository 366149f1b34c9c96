/*
 * A ZAP handler (ZeroMQ RFC 27) for a service's own loop: decides, during
 * the CURVE handshake, whether a client key may connect at all. Either the
 * keys of the certificates in a directory are admitted (partners; the
 * directory is re-read when it changes, so keys added or removed take
 * effect without a restart), or exactly one key (the hub's own, between
 * services). Running in the service's loop rather than in CZMQ's zauth
 * lets the service audit a refused key.
 */
#ifndef KH_ZAP_H_INCLUDED
#define KH_ZAP_H_INCLUDED

#include <czmq.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_zap_t kh_zap_t;

/* Bind the process's ZAP endpoint; one of cert_dir (a directory, else
 * KH_E_CONFIG at KH_PARTNER_CERT_DIR) and only_key (Z85) is given. Must exist
 * before any CURVE server socket binds: without a handler libzmq lets every key
 * in. NULL with err on failure. */
kh_zap_t *kh_zap_new(const char *cert_dir, const char *only_key,
                     kh_error_t *err);

/* Destroy; accepts NULL; nulls the pointer. */
void kh_zap_destroy(kh_zap_t **self_p);

/* Admit only key (Z85) on sockets of ZAP domain (zsock_set_zap_domain),
 * whatever the handler admits elsewhere: a service with a partner socket
 * and an internal socket in one process. 0, or -1 with err. */
int kh_zap_domain_key(kh_zap_t *self, const char *domain, const char *key,
                      kh_error_t *err);

/* The hub's certificate from path, with its secret key (a CURVE server
 * needs it). NULL with err (KH_E_CONFIG at KH_HUB_CERT). */
zcert_t *kh_hub_cert_load(const char *path, kh_error_t *err);

/* The ZAP domain of the endpoint that serves the next hub key. */
#define KH_ZAP_DOMAIN_NEXT "ketenhub-next"

/* Serve the next hub key (the certificate at cert_path, with its secret:
 * KH_HUB_CERT_NEXT) beside the current one, on endpoint of its own (the
 * setting that names it goes into err) of sock, a CURVE server socket
 * already bound with the current key; partners move to it, each at its
 * own moment. No certificate ("", "none" or NULL): nothing is bound, 0 (an
 * endpoint alone is where a next key would be served). A certificate
 * without an endpoint, one that cannot be loaded or an endpoint that
 * cannot be bound: -1 with err (KH_E_CONFIG). From then on the handler says in
 * the log, once a key, which hub key each partner key connects with, and
 * /readyz tells the next key's public half (kh_health_note, hub_key_next). */
int kh_zap_bind_next(kh_zap_t *self, zsock_t *sock, const char *cert_path,
                     const char *endpoint, const char *setting,
                     kh_error_t *err);

/* How long a connection may take over its ZMTP greeting and CURVE
 * handshake before the hub drops it (ZMQ_HANDSHAKE_IVL; libzmq's default
 * is 30 s). A silent or half-open connection costs a file descriptor for
 * no longer than this; a real partner needs a few round trips. */
#define KH_HANDSHAKE_MS 10000

/* A socket of type that is a CURVE server with the hub's cert, taking
 * frames of at most max_frame bytes and handshakes of at most
 * KH_HANDSHAKE_MS; the ZAP handler must exist before it binds. NULL with
 * err. */
zsock_t *kh_curve_server_new(int type, zcert_t *cert, int64_t max_frame,
                             kh_error_t *err);

/* A PUSH socket that wakes another service at endpoint (the setting that
 * names it goes into err): authenticated with the hub's key, hints only,
 * so at most 100 queued and never blocking or lingering. NULL with err. */
zsock_t *kh_wake_push_new(zcert_t *hub, const char *endpoint,
                          const char *setting, kh_error_t *err);

/* The socket to read ZAP requests from in the loop. */
zsock_t *kh_zap_socket(kh_zap_t *self);

/* Consulted for each partner key the directory admits: false refuses the
 * handshake (a partner with its most connections, kh_peers_full). */
typedef bool (*kh_zap_gate_fn)(void *arg, const char *key, const char *address);

/* Set the gate (NULL: none). */
void kh_zap_set_gate(kh_zap_t *self, kh_zap_gate_fn gate, void *arg);

/* Read and answer one ZAP request. Returns 0 when the key was let in, 1
 * when it was refused, 2 when the gate refused it, -1 when the request
 * was not a CURVE request we understand (refused too). key gets the
 * client key's Z85 text ("" if none), address the peer's address. */
int kh_zap_handle(kh_zap_t *self, char key[41], char address[64]);

#ifdef __cplusplus
}
#endif
#endif
