/*
 * Open connections counted per partner (see peers.h).
 */
#include "ketenhub/peers.h"

#include "ketenhub/log.h"
#include "ketenhub/throttle.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct _kh_peers_t {
    zsock_t *router;
    zsock_t *monitor;
    size_t max;
    kh_peers_close_fn on_close; /* told each closed descriptor, or NULL */
    void *close_arg;
    zhashx_t *const *partners; /* the service's key -> partner id */
    kh_throttle_t *told;       /* partner: one refusal logged / 10 s */
    zhashx_t *open;            /* descriptors ("%d") accepted and not closed */
    zhashx_t *counted;         /* descriptor -> s_counted_t */
    zhashx_t *by_rid;          /* routing id (hex) -> its descriptor */
    zhashx_t *counts;          /* partner id -> size_t of its counted ones */
};

/* The connection counted on a descriptor. */
typedef struct {
    char partner[64];
    unsigned char rid[KH_PEERS_RID_MAX]; /* its routing id (the first
                                            KH_PEERS_RID_MAX bytes) */
    size_t rid_len;                      /* and its length */
} s_counted_t;

static void s_free(void **item)
{
    free(*item);
    *item = NULL;
}

kh_peers_t *kh_peers_new(zsock_t *router, size_t max, kh_error_t *err)
{
    kh_peers_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    self->max = max;
    self->open = zhashx_new();
    self->counted = zhashx_new();
    self->by_rid = zhashx_new();
    self->counts = zhashx_new();
    if (!self->open || !self->counted || !self->by_rid || !self->counts) {
        kh_peers_destroy(&self);
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    zhashx_set_destructor(self->counted, s_free);
    zhashx_set_destructor(self->by_rid, s_free);
    zhashx_set_destructor(self->counts, s_free);
    /* Connections accepted and closed, on an inproc PAIR: a frame read
     * after its connection closed (intake had stopped reading, say)
     * names a descriptor that is no longer open, and counting it would
     * count a connection that no disconnect will ever end. */
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "inproc://kh-peers-%p", (void *) self);
    if (zmq_socket_monitor(zsock_resolve(router), endpoint,
                           ZMQ_EVENT_ACCEPTED | ZMQ_EVENT_DISCONNECTED)) {
        kh_peers_destroy(&self);
        kh_error_set(err, KH_E_INTERNAL, "",
                     "cannot watch the partners' socket");
        return NULL;
    }
    self->router = router;
    self->monitor = zsock_new(ZMQ_PAIR);
    /* No bound on the events waiting: one dropped while the loop is busy
     * (a storm of connections that never authenticate, say) would leave
     * its connection counted for good. */
    if (self->monitor)
        zsock_set_rcvhwm(self->monitor, 0);
    if (!self->monitor || zsock_connect(self->monitor, "%s", endpoint)) {
        kh_peers_destroy(&self);
        kh_error_set(err, KH_E_INTERNAL, "",
                     "cannot watch the partners' socket");
        return NULL;
    }
    return self;
}

void kh_peers_destroy(kh_peers_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_peers_t *self = *self_p;
    if (self->router)
        zmq_socket_monitor(zsock_resolve(self->router), NULL, 0);
    zsock_destroy(&self->monitor);
    zhashx_destroy(&self->open);
    zhashx_destroy(&self->counted);
    zhashx_destroy(&self->by_rid);
    zhashx_destroy(&self->counts);
    kh_throttle_destroy(&self->told);
    free(self);
    *self_p = NULL;
}

zsock_t *kh_peers_monitor(kh_peers_t *self)
{
    return self->monitor;
}

size_t kh_peers_max(const kh_peers_t *self)
{
    return self->max;
}

/* Read one event of the socket monitor: 0 with the event and its value
 * (for accepts and closes, the socket's descriptor), -1 when none is
 * waiting or it cannot be read. */
static int s_monitor_event(zsock_t *monitor, uint16_t *event, uint32_t *value)
{
    if (!(zsock_events(monitor) & ZMQ_POLLIN))
        return -1;
    zmsg_t *msg = zmsg_recv(monitor);
    if (!msg)
        return -1;
    /* the event (16 bits) and its value (32), then the endpoint */
    zframe_t *head = zmsg_first(msg);
    *event = 0;
    *value = 0;
    if (head && zframe_size(head) == sizeof *event + sizeof *value) {
        memcpy(event, zframe_data(head), sizeof *event);
        memcpy(value, zframe_data(head) + sizeof *event, sizeof *value);
    }
    zmsg_destroy(&msg);
    return 0;
}

static size_t *s_count(kh_peers_t *self, const char *partner)
{
    return zhashx_lookup(self->counts, partner);
}

/* The key of routing id rid in by_rid: its hex digits (of the first
 * KH_PEERS_RID_MAX bytes) and its length. */
static void s_rid_key(const void *rid, size_t len,
                      char out[2 * KH_PEERS_RID_MAX + 8])
{
    const unsigned char *b = rid;
    size_t n = len < KH_PEERS_RID_MAX ? len : KH_PEERS_RID_MAX;
    for (size_t i = 0; i < n; i++)
        snprintf(out + 2 * i, 3, "%02x", b[i]);
    snprintf(out + 2 * n, 8, "/%zu", len);
}

/* Forget the connection on fd, if one was counted. */
static void s_forget(kh_peers_t *self, const char *fd)
{
    const s_counted_t *counted = zhashx_lookup(self->counted, fd);
    if (!counted)
        return;
    size_t *count = s_count(self, counted->partner);
    if (count && --*count == 0)
        zhashx_delete(self->counts, counted->partner);
    char key[2 * KH_PEERS_RID_MAX + 8];
    s_rid_key(counted->rid, counted->rid_len, key);
    const char *indexed = zhashx_lookup(self->by_rid, key);
    if (indexed && strcmp(indexed, fd) == 0)
        zhashx_delete(self->by_rid, key);
    zhashx_delete(self->counted, fd);
}

void kh_peers_drain(kh_peers_t *self)
{
    uint16_t event;
    uint32_t value;
    while (s_monitor_event(self->monitor, &event, &value) == 0) {
        char fd[16];
        snprintf(fd, sizeof fd, "%u", value);
        if (event == ZMQ_EVENT_ACCEPTED)
            zhashx_update(self->open, fd, self);
        else if (event == ZMQ_EVENT_DISCONNECTED) {
            s_forget(self, fd);
            zhashx_delete(self->open, fd);
            if (self->on_close)
                self->on_close(self->close_arg, (int) value);
        }
    }
}

void kh_peers_on_close(kh_peers_t *self, kh_peers_close_fn fn, void *arg)
{
    self->on_close = fn;
    self->close_arg = arg;
}

bool kh_peers_take(kh_peers_t *self, int fd, const void *rid, size_t rid_len,
                   const char *partner)
{
    /* What happened to the connections up to now: a connection's accept
     * is told before its first frame can be read, and its close before
     * its descriptor can be reused. */
    kh_peers_drain(self);
    return kh_peers_count(self, fd, rid, rid_len, partner);
}

/* The order of two routing ids: < 0 when a came first. The ROUTER's own
 * are a zero byte and a 32-bit number it counts up from a random start,
 * big-endian: compared as serial numbers (RFC 1982), they stay in order
 * when the count wraps. Others (a peer's own, which the services refuse)
 * by their bytes. */
static int s_rid_order(const void *a, size_t alen, const void *b, size_t blen)
{
    const unsigned char *x = a, *y = b;
    if (alen == 5 && blen == 5 && x[0] == 0 && y[0] == 0) {
        uint32_t m = (uint32_t) x[1] << 24 | (uint32_t) x[2] << 16 |
                     (uint32_t) x[3] << 8 | x[4];
        uint32_t n = (uint32_t) y[1] << 24 | (uint32_t) y[2] << 16 |
                     (uint32_t) y[3] << 8 | y[4];
        return m == n ? 0 : (int32_t) (m - n) < 0 ? -1 : 1;
    }
    if (alen != blen)
        return alen < blen ? -1 : 1;
    return memcmp(a, b, alen < KH_PEERS_RID_MAX ? alen : KH_PEERS_RID_MAX);
}

bool kh_peers_count(kh_peers_t *self, int fd, const void *rid, size_t rid_len,
                    const char *partner)
{
    if (fd < 0)
        return true;
    char key[16];
    snprintf(key, sizeof key, "%d", fd);
    const s_counted_t *known = zhashx_lookup(self->counted, key);
    int order =
        known ? s_rid_order(rid, rid_len, known->rid, known->rid_len) : 1;
    if (order == 0 && strcmp(known->partner, partner) == 0)
        return true;
    /* A frame of a connection older than the one counted on its
     * descriptor: that connection closed, and its frame was read late.
     * Served, uncounted. */
    if (order < 0)
        return true;
    /* Counted for another partner (its key was given to this one since),
     * or a connection older than this one, counted for a frame of its
     * that was read after it closed and this one took its descriptor. */
    s_forget(self, key);
    /* A frame of a connection closed since is served, uncounted. */
    if (!zhashx_lookup(self->open, key))
        return true;
    size_t *count = s_count(self, partner);
    if (count && *count >= self->max)
        return false;
    s_counted_t *entry = calloc(1, sizeof *entry);
    char rid_key[2 * KH_PEERS_RID_MAX + 8];
    s_rid_key(rid, rid_len, rid_key);
    char *indexed = strdup(key);
    if (entry) {
        snprintf(entry->partner, sizeof entry->partner, "%s", partner);
        memcpy(entry->rid, rid,
               rid_len < KH_PEERS_RID_MAX ? rid_len : KH_PEERS_RID_MAX);
        entry->rid_len = rid_len;
    }
    if (!count) {
        count = calloc(1, sizeof *count);
        if (count && zhashx_insert(self->counts, partner, count)) {
            free(count);
            count = NULL;
        }
    }
    if (!entry || !count || !indexed ||
        zhashx_insert(self->counted, key, entry)) {
        /* Out of memory: served uncounted rather than refused. */
        free(entry);
        free(indexed);
        if (count && *count == 0)
            zhashx_delete(self->counts, partner);
        return true;
    }
    /* Another descriptor's entry under the same id (a peer's own id,
     * given twice) stays counted; this one is found by its descriptor. */
    if (zhashx_insert(self->by_rid, rid_key, indexed))
        free(indexed);
    ++*count;
    return true;
}

void kh_peers_gone(kh_peers_t *self, const void *rid, size_t rid_len)
{
    char key[2 * KH_PEERS_RID_MAX + 8];
    s_rid_key(rid, rid_len, key);
    const char *fd = zhashx_lookup(self->by_rid, key);
    if (!fd)
        return;
    char copy[16];
    snprintf(copy, sizeof copy, "%s", fd);
    const s_counted_t *known = zhashx_lookup(self->counted, copy);
    if (known && s_rid_order(rid, rid_len, known->rid, known->rid_len) == 0)
        s_forget(self, copy);
}

bool kh_peers_full(kh_peers_t *self, const char *partner)
{
    kh_peers_drain(self);
    const size_t *count = s_count(self, partner);
    return count && *count >= self->max;
}

/* A refusal is no audit event (a client at its limit tries again and
 * again): the log says so, once every 10 s per partner. */
static bool s_gate(void *arg, const char *key, const char *address)
{
    kh_peers_t *self = arg;
    const char *partner =
        *self->partners ? zhashx_lookup(*self->partners, key) : NULL;
    if (!partner || !kh_peers_full(self, partner))
        return true;
    if (kh_throttle_pass(self->told, partner, zclock_mono()))
        kh_log_warn("throttled", "actor=%s peer=%s over=connections max=%zu",
                    partner, address, self->max);
    return false;
}

int kh_peers_guard(kh_peers_t *self, kh_zap_t *zap, zhashx_t *const *partners)
{
    if (!self->told && !(self->told = kh_throttle_new(10000, 10000)))
        return -1;
    self->partners = partners;
    kh_zap_set_gate(zap, s_gate, self);
    return 0;
}
