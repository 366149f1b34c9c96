/*
 * The open connections of a partner-facing ROUTER, counted per partner: a
 * partner whose client opens connections without end (one per request,
 * never closed) must not take the hub's file descriptors and memory from
 * the others. A connection is counted from its first frame, which names
 * its key (ZAP's User-Id) and its socket (ZMQ_SRCFD), until ZeroMQ's socket
 * monitor reports that socket closed (a frame read after that is served
 * uncounted). Once a partner has its most, its next handshakes are
 * refused (kh_zap_set_gate), and a frame on one more connection that got
 * through before is refused. Connections that never send a frame are not
 * counted: this bounds a client that opens a connection per request, not
 * one that opens many at once and sends nothing.
 */
#ifndef KH_PEERS_H_INCLUDED
#define KH_PEERS_H_INCLUDED

#include <czmq.h>
#include <stdbool.h>
#include <stdint.h>

#include "ketenhub/error.h"
#include "ketenhub/zap.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct _kh_peers_t kh_peers_t;

/* Watch router's disconnects and allow each partner max connections.
 * Call before router binds, so that no disconnect is missed. NULL with
 * err. */
kh_peers_t *kh_peers_new(zsock_t *router, size_t max, kh_error_t *err);

/* Stop watching; accepts NULL; nulls the pointer. The router must still
 * exist. */
void kh_peers_destroy(kh_peers_t **self_p);

/* The socket that disconnect events arrive on, for the loop to read with
 * kh_peers_drain. */
zsock_t *kh_peers_monitor(kh_peers_t *self);

/* Read the events waiting: forget the connections reported closed so
 * far (each told to the on_close function). */
void kh_peers_drain(kh_peers_t *self);

/* Tell fn each descriptor reported closed, as it is read (a service that
 * keeps records of its connections). */
typedef void (*kh_peers_close_fn)(void *arg, int fd);
void kh_peers_on_close(kh_peers_t *self, kh_peers_close_fn fn, void *arg);

/* Bytes of a routing id kept (the ROUTER's own are 5; a longer one is
 * told apart by these and its length). */
#define KH_PEERS_RID_MAX 16

/* A frame came on the connection with socket fd (-1: unknown, never
 * counted) and routing id rid from partner: the events waiting are read,
 * then true when it may be served (the connection is counted now or was,
 * or is closed already), false when partner has its most connections
 * counted. A frame read after its connection closed and another took the
 * descriptor is counted for that one until a frame of the newer
 * connection (a later routing id) comes, it closes, or kh_peers_gone. */
bool kh_peers_take(kh_peers_t *self, int fd, const void *rid, size_t rid_len,
                   const char *partner);

/* kh_peers_take without reading the events first, for a caller that read
 * them since the frame came (and must not have a connection it holds
 * forgotten meanwhile). */
bool kh_peers_count(kh_peers_t *self, int fd, const void *rid, size_t rid_len,
                    const char *partner);

/* A send to routing id rid failed as unroutable (ZMQ_ROUTER_MANDATORY's
 * EHOSTUNREACH): its connection is gone, and is counted no more. */
void kh_peers_gone(kh_peers_t *self, const void *rid, size_t rid_len);

/* True when partner has its most connections (closed ones are read first):
 * a handshake for one more is refused. */
bool kh_peers_full(kh_peers_t *self, const char *partner);

/* Make zap's gate refuse a handshake of a partner with its most
 * connections (kh_peers_full; kh_zap_handle returns 2), logged as
 * event=throttled ... over=connections at most every 10 s per partner.
 * *partners (Z85 key -> partner id, or NULL before the registry is read)
 * is the service's own, looked up at each handshake: a key it does not
 * hold is let through, to be answered as the service answers it. 0, or
 * -1 out of memory. */
int kh_peers_guard(kh_peers_t *self, kh_zap_t *zap, zhashx_t *const *partners);

/* The most connections a partner may have. */
size_t kh_peers_max(const kh_peers_t *self);

#ifdef __cplusplus
}
#endif
#endif
