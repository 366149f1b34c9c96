/*
 * The notification service's core (see notify.h).
 *
 * One loop, two database connections. A round reads what the partners
 * sent (up to S_READ_MAX frames); its ACKs commit as one statement on one
 * connection while, on the other, one transaction commits its NACKs and
 * the claims for the connections that may have deliveries due and have
 * credit; only then are the answers and the DELIVERs sent. Database calls
 * are synchronous and bounded by statement_timeout; while the database is
 * away ACKs are refused retryably and nothing is sent.
 */
#include "notify.h"

#include <inttypes.h>
#include <msgpack.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "ketenhub/codec.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"
#include "ketenhub/peers.h"
#include "ketenhub/proto.h"
#include "ketenhub/ratelimit.h"
#include "ketenhub/service.h"
#include "ketenhub/throttle.h"
#include "ketenhub/zap.h"

#define S_READ_MAX 4096 /* frames read in one round */
/* How far the router's reading may lag when silence is judged: longer
 * than the loop is ever held up by the database (a statement's 10 s, with
 * its commit), and bounded, so that frames coming faster than they are
 * read (a partner flooding) do not keep every silent connection. */
#define S_READ_LAG_MAX_MS 30000
#define S_STATS_MS 10000     /* stats line */
#define S_WAKE_MAX 65536     /* bytes of a wake-up */
#define S_RELOAD_MIN_MS 1000 /* registry re-read per unknown key */
#define S_LINGER_MS 100
#define S_INTERNAL_DOMAIN "ketenhub-internal" /* ZAP domain of wake-ups */
#define S_HELD_MAX (KH_WINDOW_MAX * 4) /* DELIVERs that lost their peer */
/* Sends that never left, waiting to be given back (s_give_back). */
#define S_UNSENT_MAX S_HELD_MAX
#define S_CLAIM_ROWS 1024 /* deliveries one claim statement asks for */
#define S_ACKED_MAX (KH_WINDOW_MAX * 4) /* acknowledged ids remembered */
#define S_ACKED_KEY 80                  /* "partner id" */
#define S_CONNECTIONS_RETRY_MS 1000     /* over the partner's connections */

/* One partner connection (a ROUTER peer that said something). Its routing
 * id names it to the ROUTER only while the connection lasts: once it is
 * gone, ZeroMQ gives the id to the next peer that asks for it. So the
 * record also holds what only that connection has, its key and its TCP
 * socket, and goes as soon as either does not match or the socket is
 * reported closed (s_take, s_monitor_drain). */
typedef struct {
    zframe_t *identity;
    char key[41]; /* its ZAP-authenticated key (Z85) */
    int fd;       /* its socket in ZeroMQ's I/O thread, or -1: unknown */
    char partner[33];
    char peer[64];
    size_t window;
    zhashx_t *out;     /* delivery id -> S_OUT_AT: sent, not answered */
    size_t acking;     /* of those, ACKed in the round's ACK batch */
    int64_t last_seen; /* zclock_mono of its last frame */
    bool reclaim;      /* next claim also takes earlier unacknowledged */
    bool reclaiming;   /* the round made its reclaim: undone by a rollback */
    bool more;         /* there may be due deliveries for it */
    bool untold;       /* partner_connected not logged yet (its HELLO's) */
    int64_t looked;    /* zclock_mono of its last claim */
    bool overdue;      /* re-sends became due (another connection went) */
    bool starved;      /* a re-send found no credit left: once some is
                          freed, the next claim re-sends first */
} s_conn_t;

/* An ACK or NACK waiting for its commit. */
typedef struct {
    dstore_answer_t answer;
    zframe_t *identity;
    char cid[KH_CID_MAX + 1];
    bool nack, permanent;
    int leader;   /* index of an earlier ACK of the same id, or -1 */
    bool charged; /* counted as a refusal until it turns out not to be */
} s_pending_t;

typedef struct {
    uint64_t sent, resent, moved, acked, duplicates, refused, throttled, nacked,
        dead, escalated, rounds, failures;
} s_stats_t;

/* An entry of a connection's out: the zclock_mono time of its last send
 * there, as the round that claimed it began (never 0). */
#define S_OUT_AT(t) ((void *) (intptr_t) (t))

struct _notify_t {
    notify_config_t cfg;
    zcert_t *cert;
    kh_zap_t *zap; /* handshakes: partners, and the hub's key for wake-ups */
    zsock_t *router;
    /* zclock_mono when the router last had no frame left to read: a
     * connection is silent when nothing of it was read in the time before
     * (frames waiting unread, while the loop was held up by the database,
     * say nothing of their peers), up to S_READ_LAG_MAX_MS ago. */
    int64_t read_all_at;
    kh_peers_t *peers; /* the router's connections (ZeroMQ's socket monitor) */
    bool dropped;      /* a connection was dropped as closed since the last
                          s_monitor_drain */
    zsock_t *wake;
    int port;
    dstore_t *store;
    bool connect_poll;     /* a timer looks at the attempt to connect soon */
    bool ready_logged;     /* event=ready said: bound and database answers */
    int retry_ms;          /* the wait after the last failed attempt, or 0 */
    int64_t connect_after; /* zclock_mono before which no tick tries */
    zhashx_t *partners;    /* Z85 key -> partner id */
    bool partners_read;    /* re-read since s_drop_unadmitted last ran */
    bool partners_stale;   /* changed since it was read: admits no key */
    int64_t partners_end;  /* zclock_mono when a key of it ends; 0: none */
    bool outdated; /* a statement of the round found a key not admitted */
    /* zclock_mono as the round's transaction began: before the database's
     * now(), which times its sends */
    int64_t round_began;
    int64_t reread_at; /* zclock_mono before which a stale one waits */
    kh_throttle_t *unknown_keys; /* key: one registry re-read a second */
    zhashx_t *conns;             /* identity (hex) -> s_conn_t */
    s_pending_t *pending;
    size_t npending;
    dstore_answer_t *acks; /* the round's distinct ACKs, for the store */
    s_pending_t **nacks;   /* the round's NACKs, in the order they run */
    zlistx_t *outbox;      /* s_outgoing_t: sent when the round commits */
    zlistx_t *held;        /* s_outgoing_t whose connection was gone */
    /* Committed sends that never left (s_give_back): delivery id and the
     * send's time, given back in the next round's transaction. */
    char unsent_id[S_UNSENT_MAX][37];
    char unsent_at[S_UNSENT_MAX][40];
    size_t nunsent;
    zhashx_t *batch_ids; /* delivery id -> index + 1 in pending (ACKs) */
    kh_refusal_gate_t *auth_gate;   /* which refusals are audited */
    kh_ratelimit_t *refusals;       /* per partner refused answers, or NULL */
    kh_throttle_t *throttle_logged; /* partner: one "throttled" line / 10 s */
    /* The last S_ACKED_MAX deliveries whose ACK committed, "partner id"
     * (s_acked_add): an answer for one of them again is no refusal, since
     * an acknowledged delivery stays so and its row stays. */
    zhashx_t *acked;
    char (*acked_ring)[S_ACKED_KEY]; /* the same keys, oldest at acked_next */
    size_t acked_next;
    zloop_t *loop;
    bool stopping;
    s_stats_t stats;
};

static void s_db_failed(notify_t *self, const char *what,
                        const kh_error_t *err);

/* --- connections ------------------------------------------------------ */

static void s_conn_destroy(s_conn_t **conn_p)
{
    if (!conn_p || !*conn_p)
        return;
    s_conn_t *conn = *conn_p;
    zframe_destroy(&conn->identity);
    zhashx_destroy(&conn->out);
    free(conn);
    *conn_p = NULL;
}

static void s_conn_free(void **item)
{
    s_conn_destroy((s_conn_t **) item);
}

static void s_identity_key(zframe_t *identity, char *out, size_t size)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *data = zframe_data(identity);
    size_t len = zframe_size(identity);
    size_t i = 0;
    for (; i < len && 2 * i + 2 < size; i++) {
        out[2 * i] = hex[data[i] >> 4];
        out[2 * i + 1] = hex[data[i] & 15];
    }
    out[2 * i] = '\0';
}

/* The registered connection of identity, or NULL. */
static s_conn_t *s_conn_of(notify_t *self, zframe_t *identity)
{
    char key[600];
    s_identity_key(identity, key, sizeof key);
    return zhashx_lookup(self->conns, key);
}

/* How many connections of partner, but skip, are registered. */
static size_t s_partner_connections(notify_t *self, const char *partner,
                                    const s_conn_t *skip)
{
    size_t n = 0;
    for (s_conn_t *c = zhashx_first(self->conns); c;
         c = zhashx_next(self->conns))
        if (c != skip && strcmp(c->partner, partner) == 0)
            n++;
    return n;
}

/* Whether another connection of partner than skip is registered. */
static bool s_partner_connected(notify_t *self, const char *partner,
                                const s_conn_t *skip)
{
    return s_partner_connections(self, partner, skip) > 0;
}

static void s_conn_drop(notify_t *self, s_conn_t *conn, const char *why);

/* The connection of identity: conn, its record as s_conn_of found it
 * (NULL: none), or, on_hello (its frame is a HELLO), a new one registered for
 * partner (with its key and socket fd). NULL on OOM, or when there is
 * none and on_hello is false. A key that now belongs to another partner
 * (re-registered) starts over: the connection is dropped as one its key
 * no longer admits (s_drop_unadmitted), so that what it had out of its
 * old partner's goes again at once on another connection of that
 * partner, as for any connection that goes. */
static s_conn_t *s_conn_get(notify_t *self, s_conn_t *conn, zframe_t *identity,
                            const char *key, int fd, const char *partner,
                            const char *peer, bool on_hello)
{
    char hex[600];
    if (conn && strcmp(conn->partner, partner) != 0) {
        s_conn_drop(self, conn, "key_not_admitted");
        conn = NULL;
    }
    if (!conn && !on_hello)
        return NULL;
    if (!conn) {
        s_identity_key(identity, hex, sizeof hex);
        conn = calloc(1, sizeof *conn);
        if (!conn)
            return NULL;
        conn->identity = zframe_dup(identity);
        conn->out = zhashx_new();
        if (!conn->identity || !conn->out) {
            s_conn_destroy(&conn);
            return NULL;
        }
        snprintf(conn->key, sizeof conn->key, "%s", key);
        conn->fd = fd;
        snprintf(conn->partner, sizeof conn->partner, "%s", partner);
        conn->window = self->cfg.window;
        conn->reclaim = !s_partner_connected(self, partner, NULL);
        conn->more = true;
        conn->untold = true; /* with the window its HELLO asks for */
        zhashx_insert(self->conns, hex, conn);
    }
    snprintf(conn->peer, sizeof conn->peer, "%s", peer);
    conn->last_seen = zclock_mono();
    return conn;
}

/* Forget conn. What it had out (sent there, not answered) is due for a
 * re-send at once when the partner has another connection here, which
 * takes it in its next round; without one it waits for the partner's
 * next connection (a reclaim) or its ACK timeout. Runs outside the
 * round's transaction. */
static void s_conn_drop(notify_t *self, s_conn_t *conn, const char *why)
{
    kh_log_info("partner_disconnected",
                "partner=%s peer=%s reason=%s unacknowledged=%zu",
                conn->partner, conn->peer, why, zhashx_size(conn->out));
    char partner[sizeof conn->partner];
    snprintf(partner, sizeof partner, "%s", conn->partner);
    zlistx_t *ids = zhashx_size(conn->out) && dstore_up(self->store) &&
                            s_partner_connected(self, partner, conn)
                        ? zhashx_keys(conn->out)
                        : NULL;
    char key[600];
    s_identity_key(conn->identity, key, sizeof key);
    zhashx_delete(self->conns, key); /* conn is gone from here on */
    size_t count = ids ? zlistx_size(ids) : 0;
    const char **list = count ? calloc(count, sizeof *list) : NULL;
    size_t n = 0;
    for (const char *id = list ? zlistx_first(ids) : NULL; id;
         id = zlistx_next(ids))
        list[n++] = id;
    kh_error_t err;
    int due = list ? dstore_due_now(self->store, partner, list, n, &err) : 0;
    if (due < 0)
        s_db_failed(self, "due", &err);
    else if (due > 0) {
        kh_log_info("resend_now", "partner=%s deliveries=%d", partner, due);
        for (s_conn_t *c = zhashx_first(self->conns); c;
             c = zhashx_next(self->conns))
            if (strcmp(c->partner, partner) == 0)
                c->overdue = true;
    }
    free(list);
    zlistx_destroy(&ids);
}

/* --- frames ----------------------------------------------------------- */

static void s_pack_str(msgpack_packer *pk, const char *s)
{
    size_t len = strlen(s);
    msgpack_pack_str(pk, len);
    msgpack_pack_str_body(pk, s, len);
}

/* What became of a send to one connection. */
typedef enum {
    S_SENT,
    S_FULL, /* its queue is at the high-water mark: it reads too slowly */
    S_GONE  /* no such peer any more (or out of memory) */
} s_send_t;

/* Send data (size bytes) to identity as one frame, without waiting. */
static s_send_t s_send_to(notify_t *self, zframe_t *identity, const void *data,
                          size_t size)
{
    zframe_t *to = zframe_dup(identity);
    zframe_t *body = zframe_new(data, size);
    if (!to || !body || zframe_send(&to, self->router, ZFRAME_MORE) ||
        zframe_send(&body, self->router, 0)) {
        bool full = to && body && zmq_errno() == EAGAIN;
        /* Gone: a frame of it read late may have been counted for the
         * connection that took its descriptor (peers.h). */
        if (to && body && zmq_errno() == EHOSTUNREACH)
            kh_peers_gone(self->peers, zframe_data(identity),
                          zframe_size(identity));
        zframe_destroy(&to);
        zframe_destroy(&body);
        return full ? S_FULL : S_GONE;
    }
    return S_SENT;
}

static bool s_send_raw(notify_t *self, zframe_t *identity, const void *data,
                       size_t size)
{
    return s_send_to(self, identity, data, size) == S_SENT;
}

/* Send a jansson envelope (consumed). */
static bool s_send_json(notify_t *self, zframe_t *identity, json_t *msg)
{
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    bool ok = msg && kh_msgpack_encode(msg, &data, &size, &err) == 0 &&
              s_send_raw(self, identity, data, size);
    free(data);
    json_decref(msg);
    return ok;
}

/* REJECTED with err, to resend after retry_ms (0: not to). */
static void s_reject_after(notify_t *self, zframe_t *identity, const char *cid,
                           const kh_error_t *err, int64_t retry_ms)
{
    s_send_json(
        self, identity,
        kh_proto_rejected(cid, err,
                          retry_ms > INT32_MAX ? INT32_MAX : (int) retry_ms));
    kh_metric_add("delivery_requests_refused_total", kh_error_name(err->code),
                  1);
}

static void s_reject(notify_t *self, zframe_t *identity, const char *cid,
                     const kh_error_t *err)
{
    /* A partner over its connections waits for one of them to be
     * forgotten. */
    s_reject_after(self, identity, cid, err,
                   err->code == KH_E_UNAVAILABLE ? 1000
                   : err->code == KH_E_THROTTLED ? self->cfg.peer_timeout_ms
                                                 : 0);
}

/* ACKED or NACKED: hot enough to pack by hand. */
static bool s_send_answer(notify_t *self, const s_pending_t *p, bool flag)
{
    msgpack_sbuffer buf;
    msgpack_sbuffer_init(&buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    msgpack_pack_map(&pk, 5);
    s_pack_str(&pk, "v");
    msgpack_pack_int(&pk, KH_PROTO_VERSION);
    s_pack_str(&pk, "cmd");
    s_pack_str(&pk, p->nack ? "NACKED" : "ACKED");
    s_pack_str(&pk, "cid");
    s_pack_str(&pk, p->cid);
    s_pack_str(&pk, "delivery_id");
    s_pack_str(&pk, p->answer.id);
    s_pack_str(&pk, p->nack ? "dead" : "duplicate");
    flag ? msgpack_pack_true(&pk) : msgpack_pack_false(&pk);
    bool ok = buf.data && s_send_raw(self, p->identity, buf.data, buf.size);
    msgpack_sbuffer_destroy(&buf);
    return ok;
}

/* A DELIVER packed while its claim is not yet committed. */
typedef struct {
    zframe_t *identity; /* the connection's */
    zframe_t *body;
    char id[37];
    char partner[33];
    char referral[37];
    char priority[16];
    int attempt;
    char sent_at[40]; /* the send's time in the database: names it */
    int64_t claimed;  /* zclock_mono as its claim's round began */
    /* The connection's S_OUT_AT for it before the claim (a re-send of
     * what it has out), 0 when it had none: after a rollback it is out
     * there as before, since the partner still holds the earlier send. */
    int64_t was_out;
    /* The other connection of the partner it was out on, taken from it
     * (NULL: none), and its S_OUT_AT there: after a rollback it is out
     * there again. */
    zframe_t *from;
    int64_t from_out;
    bool left; /* sent on its connection (s_outbox_flush) */
} s_outgoing_t;

static void s_outgoing_free(void **item)
{
    s_outgoing_t *out = *item;
    if (out) {
        zframe_destroy(&out->identity);
        zframe_destroy(&out->body);
        zframe_destroy(&out->from);
        free(out);
    }
    *item = NULL;
}

/* Drop conn (s_conn_drop), also while a round's sends are under way:
 * what the round queued for conn and did not send never left, so it is
 * not conn's to re-send; s_outbox_flush sends it on another connection of
 * the partner or holds it, as the same attempt. What did leave is conn's,
 * to go again. The outbox's cursor stays where it was: the sends that
 * find a connection gone (s_place, from s_outbox_flush and
 * s_outbox_trim) walk the outbox with it. */
static void s_conn_gone(notify_t *self, s_conn_t *conn, const char *why)
{
    s_outgoing_t *at = zlistx_item(self->outbox);
    for (s_outgoing_t *o = zlistx_first(self->outbox); o;
         o = zlistx_next(self->outbox))
        if (!o->left && zframe_eq(o->identity, conn->identity))
            zhashx_delete(conn->out, o->id);
    if (at)
        zlistx_find(self->outbox, at);
    s_conn_drop(self, conn, why);
}

/* A connection whose socket is fd, or whose socket is unknown; NULL. */
static s_conn_t *s_conn_on(notify_t *self, int fd)
{
    for (s_conn_t *c = zhashx_first(self->conns); c;
         c = zhashx_next(self->conns))
        if (c->fd == fd || c->fd < 0)
            return c;
    return NULL;
}

/* Drop the connections whose sockets ZeroMQ reports closed (s_on_close);
 * whether any went, here or since the last call (the ZAP gate reads the
 * events too). Until then their routing ids still lead to them, and once the
 * ROUTER has let go of a gone connection the next peer may take its id:
 * whatever went to the id would go to that peer. A disconnect event is
 * queued before its socket is closed, and so before another connection
 * can have its descriptor or the routing id. A round reads the events
 * before it claims and again before it sends, so it claims and sends for
 * live connections only; with none queued that costs one look at the
 * monitor socket. */
static bool s_monitor_drain(notify_t *self)
{
    kh_peers_drain(self->peers);
    bool dropped = self->dropped;
    self->dropped = false;
    return dropped;
}

/* A connection's socket closed (kh_peers_drain, wherever it is called):
 * every connection on the descriptor goes. */
static void s_on_close(void *arg, int fd)
{
    notify_t *self = arg;
    for (s_conn_t *c = s_conn_on(self, fd); c; c = s_conn_on(self, fd)) {
        s_conn_gone(self, c, "disconnected");
        self->dropped = true;
    }
}

/* How many more deliveries conn may be claimed: its window less what it
 * has out, where the round's ACK batch already counts as answered, and
 * less its partner's held DELIVERs, which go first. The round claims with
 * that credit while the batch commits beside it; should the batch fail,
 * what would exceed the window waits (s_outbox_trim). */
static size_t s_credit(notify_t *self, const s_conn_t *conn)
{
    size_t busy = zhashx_size(conn->out);
    busy = busy > conn->acking ? busy - conn->acking : 0;
    for (s_outgoing_t *h = zlistx_first(self->held); h;
         h = zlistx_next(self->held))
        busy += strcmp(h->partner, conn->partner) == 0;
    return busy < conn->window ? conn->window - busy : 0;
}

typedef struct {
    notify_t *self;
    s_conn_t *conn;
    s_conn_t **others; /* a re-send: this process's connections, or NULL */
    size_t nothers;
} s_claim_ctx_t;

/* Pack one claimed delivery for the connection that claimed it; it is
 * sent when the round commits and takes credit from now on. */
static void s_queue_delivery(const dstore_delivery_t *d, void *arg)
{
    s_claim_ctx_t *ctx = arg;
    notify_t *self = ctx->self;
    msgpack_sbuffer buf;
    msgpack_sbuffer_init(&buf);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &buf, msgpack_sbuffer_write);
    bool copy = d->overdue_partner && d->overdue_since;
    msgpack_pack_map(&pk, copy ? 11 : 10);
    s_pack_str(&pk, "v");
    msgpack_pack_int(&pk, KH_PROTO_VERSION);
    s_pack_str(&pk, "cmd");
    s_pack_str(&pk, "DELIVER");
    s_pack_str(&pk, "cid");
    s_pack_str(&pk, d->id);
    s_pack_str(&pk, "delivery_id");
    s_pack_str(&pk, d->id);
    s_pack_str(&pk, "referral_id");
    s_pack_str(&pk, d->referral_id);
    s_pack_str(&pk, "priority");
    s_pack_str(&pk, d->priority);
    s_pack_str(&pk, "attempt");
    msgpack_pack_int(&pk, d->attempt);
    s_pack_str(&pk, "routed_at");
    s_pack_str(&pk, d->routed_at);
    s_pack_str(&pk, "payload");
    msgpack_pack_str(&pk, d->payload_len);
    msgpack_pack_str_body(&pk, d->payload, d->payload_len);
    s_pack_str(&pk, "payload_sha256");
    s_pack_str(&pk, d->payload_sha256);
    if (copy) {
        s_pack_str(&pk, "escalation_of");
        msgpack_pack_map(&pk, 2);
        s_pack_str(&pk, "partner");
        s_pack_str(&pk, d->overdue_partner);
        s_pack_str(&pk, "waiting_since");
        s_pack_str(&pk, d->overdue_since);
    }
    s_outgoing_t *out = calloc(1, sizeof *out);
    if (out) {
        out->identity = zframe_dup(ctx->conn->identity);
        out->body = buf.data ? zframe_new(buf.data, buf.size) : NULL;
        snprintf(out->id, sizeof out->id, "%s", d->id);
        snprintf(out->partner, sizeof out->partner, "%s", ctx->conn->partner);
        snprintf(out->referral, sizeof out->referral, "%s", d->referral_id);
        snprintf(out->priority, sizeof out->priority, "%s", d->priority);
        out->attempt = d->attempt;
        snprintf(out->sent_at, sizeof out->sent_at, "%s", d->sent_at);
        out->claimed = self->round_began;
        out->was_out = (intptr_t) zhashx_lookup(ctx->conn->out, d->id);
    }
    /* What cannot be queued is re-sent after its ACK timeout. */
    if (out && out->identity && out->body &&
        zlistx_add_end(self->outbox, out)) {
        zhashx_update(ctx->conn->out, d->id, S_OUT_AT(out->claimed));
        /* A re-send (an overdue one) may be taken from another
         * connection of the partner in this process: out there no more,
         * it holds no place in that connection's window (its ACK frees
         * this one's). */
        for (size_t k = 0; k < ctx->nothers; k++) {
            s_conn_t *other = ctx->others[k];
            intptr_t at = other != ctx->conn && strcmp(other->partner,
                                                       ctx->conn->partner) == 0
                              ? (intptr_t) zhashx_lookup(other->out, d->id)
                              : 0;
            if (!at)
                continue;
            zhashx_delete(other->out, d->id);
            if (!out->from) {
                out->from = zframe_dup(other->identity);
                out->from_out = at;
            }
        }
    } else
        s_outgoing_free((void **) &out);
    msgpack_sbuffer_destroy(&buf);
}

/* --- partners and the database ----------------------------------------- */

static void s_load_partners(notify_t *self)
{
    kh_error_t err;
    int64_t ends_in = -1;
    int64_t asked = zclock_mono(); /* the end counts from before the read */
    zhashx_t *partners = dstore_partners(self->store, &ends_in, &err);
    if (!partners) {
        kh_log_warn("partners_unread", "code=%s stale=%s",
                    kh_error_name(err.code),
                    self->partners_stale ? "true" : "false");
        self->reread_at = zclock_mono() + S_RELOAD_MIN_MS;
        return;
    }
    zhashx_destroy(&self->partners);
    self->partners = partners;
    self->partners_read = true;
    self->partners_stale = false;
    self->partners_end = ends_in < 0 ? 0 : asked + ends_in;
}

/* Read the registry again when it changed (a partner revoked, a key
 * ended or moved, a partner added): PostgreSQL told as the change
 * committed. Before the frames and the round that would use it. Until a
 * change is read (the read failed: a lock, a timeout), the registry as
 * read before is stale: it admits no key and nothing is sent, as a key
 * it admits may be revoked by now. The read is tried again here a second
 * after it failed (not for each key, as an unknown one is: a read that
 * waits out the lock_timeout holds up the loop). A rotation's overlap
 * that ended, which no change tells, is read as a change. */
static void s_registry_check(notify_t *self)
{
    if (dstore_registry_changed(self->store) ||
        (!self->partners_stale && self->partners_end &&
         zclock_mono() >= self->partners_end)) {
        self->partners_stale = self->partners != NULL;
        s_load_partners(self);
        if (!self->partners_stale && self->partners)
            kh_log_info("partners_changed", "partners=%zu",
                        zhashx_size(self->partners));
    } else if (self->partners_stale && dstore_up(self->store) &&
               zclock_mono() >= self->reread_at)
        s_load_partners(self);
}

/* A statement of the round found a key the registry as read admits no
 * longer admitting its partner (revoked, or past a rotation's overlap, by
 * a change not heard of yet): the registry is stale from the end of the
 * round (s_round), and read again before the next frame or round
 * (s_registry_check), which drops the connections of such keys. Not
 * before: a stale registry would hold what the round places on other
 * connections. */
static void s_registry_outdated(notify_t *self)
{
    self->outdated = true;
}

/* The id of the partner that key admits in the registry as last read
 * (none while it is stale), or NULL. */
static const char *s_admitted(const notify_t *self, const char *key)
{
    return self->partners && !self->partners_stale
               ? zhashx_lookup(self->partners, key)
               : NULL;
}

/* Forget the connections whose key no longer admits their partner
 * (revoked, or the key before a rotation whose overlap ended): they are
 * sent nothing more, and their frames are refused from now on. Not while
 * a frame is being handled, which may hold a connection. */
static void s_drop_unadmitted(notify_t *self)
{
    self->partners_read = false;
    if (!self->partners)
        return;
    zlistx_t *keys = zhashx_keys(self->conns);
    for (const char *key = keys ? zlistx_first(keys) : NULL; key;
         key = zlistx_next(keys)) {
        s_conn_t *conn = zhashx_lookup(self->conns, key);
        const char *id = zhashx_lookup(self->partners, conn->key);
        if (!id || strcmp(id, conn->partner) != 0)
            s_conn_drop(self, conn, "key_not_admitted");
    }
    zlistx_destroy(&keys);
}

/* The partner of an authenticated key; an unknown key re-reads the
 * registry (at most once a second per key, as intake does), so a partner
 * added at run time is known at its first frame, however recently the
 * registry was read for the refresh or for another key: a partner's
 * client stops for good at an unknown_partner. Only keys that passed the
 * handshake, i.e. are in the partner directory, get this far. */
static const char *s_partner_of(notify_t *self, const char *key)
{
    const char *id = s_admitted(self, key);
    if (id || self->partners_stale || !dstore_up(self->store) ||
        !kh_throttle_pass(self->unknown_keys, key, zclock_mono()))
        return id;
    s_load_partners(self);
    return s_admitted(self, key);
}

static void s_db_failed(notify_t *self, const char *what, const kh_error_t *err)
{
    self->stats.failures++;
    kh_log_warn("db_failed", "during=%s code=%s msg=\"%s\"", what,
                kh_error_name(err->code), KH_LOG_Q(err->message));
}

/* Audit a refused key, once a minute per reason, key and address (a
 * client that retries must not flood the trail), and log it as event
 * (NULL: not at all), also while the database is away and nothing can be
 * audited. Anyone who can reach the port can make up keys without end,
 * each refused once: past a burst, their refusals are only counted, in a
 * line every KH_REFUSAL_LOG_MS, so that no stranger fills the trail
 * or the log, nor holds up the loop with a write each. */
static void s_audit_refused(notify_t *self, const char *key, const char *peer,
                            const char *reason, const char *event)
{
    char seen[160];
    snprintf(seen, sizeof seen, "%s %s %s", reason, key, peer);
    uint64_t count;
    if (!kh_refusal_gate_pass(self->auth_gate, seen, true, zclock_usecs(),
                              &count)) {
        if (count)
            kh_log_warn("auth_refusals_unaudited", "count=%" PRIu64, count);
        return;
    }
    if (event)
        kh_log_warn(event, "key=%s peer=%s reason=%s", *key ? key : "none",
                    peer, reason);
    kh_error_t err;
    if (dstore_up(self->store) && /* its being down is logged */
        dstore_audit_refused(self->store, key, peer, reason, &err))
        s_db_failed(self, "audit", &err);
}

/* Whether conn has a reclaim to make now: one waits for credit (a
 * window full of the partner's held DELIVERs, say). */
static bool s_reclaims(notify_t *self, const s_conn_t *conn)
{
    return conn->reclaim && s_credit(self, conn) > 0;
}

/* Re-send to one connection the sent deliveries whose ACK is overdue:
 * those it has out, in their place in its window, and others up to its
 * credit, less what pending deliveries that outrank them take (they are
 * claimed next, with the credit that is left). A reclaim
 * leaves alone the held DELIVERs of the partner and what is out on any of
 * its count connections in conns (this round's re-sends included): they
 * were claimed and go out as they are, each on one connection. */
static int s_resend(notify_t *self, s_conn_t *conn, s_conn_t **conns,
                    size_t count, kh_error_t *err)
{
    s_claim_ctx_t ctx = {self, conn, conns, count};
    size_t nkeep = 0;
    const char **keep = NULL;
    bool reclaim = s_reclaims(self, conn);
    if (reclaim) {
        size_t size = zlistx_size(self->held);
        for (size_t i = 0; i < count; i++)
            if (strcmp(conns[i]->partner, conn->partner) == 0)
                size += zhashx_size(conns[i]->out);
        keep = calloc(size + 1, sizeof *keep);
        if (!keep)
            return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        for (s_outgoing_t *h = zlistx_first(self->held); h;
             h = zlistx_next(self->held))
            if (strcmp(h->partner, conn->partner) == 0)
                keep[nkeep++] = h->id;
        for (size_t i = 0; i < count; i++) {
            zhashx_t *out = conns[i]->out;
            if (strcmp(conns[i]->partner, conn->partner) == 0)
                for (void *v = zhashx_first(out); v; v = zhashx_next(out))
                    keep[nkeep++] = zhashx_cursor(out);
        }
    }
    size_t nout = 0;
    const char **out = calloc(zhashx_size(conn->out) + 1, sizeof *out);
    if (!out) {
        free(keep);
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    }
    /* Those whose re-send may be due by now: none is due sooner than 80 %
     * of the ACK timeout (the back-off maximum is never less: main.c)
     * after the send, which the database timed at the start of its round,
     * after this process did (S_OUT_AT); half of it leaves a margin. The
     * others, which cannot be overdue, cost the statement work for every
     * connection at every sweep, a window of them at a time. (Should one
     * be made due at once all the same, dstore_due_now for a connection
     * gone that had it too, it goes as a re-send that takes credit.) */
    int64_t sent_before = zclock_mono() - self->cfg.policy.ack_timeout_ms / 2;
    for (void *v = zhashx_first(conn->out); v; v = zhashx_next(conn->out))
        if ((intptr_t) v <= sent_before)
            out[nout++] = zhashx_cursor(conn->out);
    bool admitted;
    int claimed =
        dstore_resend(self->store, conn->partner, conn->key, conn->peer,
                      s_credit(self, conn), reclaim, keep, nkeep, out, nout,
                      s_queue_delivery, &ctx, &admitted, err);
    free(keep);
    free(out);
    if (claimed < 0)
        return -1;
    if (!admitted)
        s_registry_outdated(self);
    if (reclaim) {
        conn->reclaim = false;
        conn->reclaiming = true;
    }
    conn->overdue = false;
    /* A full window (the claims after each ACK refill it with pending
     * deliveries while a backlog lasts) may have left overdue ones out, a
     * NACKed urgent one among them: they take the next credit freed, by
     * the statement's rank, rather than wait for the backlog to drain. */
    conn->starved = s_credit(self, conn) == 0;
    return 0;
}

/* Whether conn is to re-send before it claims: it reclaims, re-sends
 * became due, or they waited for credit that it has now. */
static bool s_resends_now(notify_t *self, const s_conn_t *conn)
{
    return s_reclaims(self, conn) || conn->overdue ||
           (conn->starved && s_credit(self, conn) > 0);
}

/* The connections of one pending claim, and what each got. */
typedef struct {
    notify_t *self;
    s_conn_t **conns;
    size_t *got;
} s_pending_ctx_t;

static void s_queue_pending(size_t which, const dstore_delivery_t *d, void *arg)
{
    s_pending_ctx_t *ctx = arg;
    s_claim_ctx_t one = {ctx->self, ctx->conns[which], NULL, 0};
    s_queue_delivery(d, &one);
    ctx->got[which]++;
}

/* Claim pending deliveries up to the free credit of each of the count (at
 * least 1) connections in conns (reordered): one statement for as many as
 * have distinct partners, asking together for at most S_CLAIM_ROWS, the
 * next for the second connections of a partner and for those that got all
 * the statement asked of them and have credit left. The bound keeps the
 * rows of one result, payloads and all, to what one full window holds;
 * each connection asks for its credit up to an equal share of it, so that
 * partners with large windows share one statement when little is due (a
 * statement per partner costs nearly as much as one for all). */
static int s_claim_pending(notify_t *self, s_conn_t **conns, size_t count,
                           kh_error_t *err)
{
    dstore_claim_t *claims = calloc(count, sizeof *claims);
    size_t *got = calloc(count, sizeof *got);
    size_t *had = calloc(count, sizeof *had); /* credit before */
    int rc = claims && got && had
                 ? 0
                 : kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    while (rc == 0 && count > 0) {
        /* This statement's connections to the front, one per partner. */
        size_t n = 0;
        for (size_t i = 0; i < count && n < S_CLAIM_ROWS; i++) {
            bool skip = false;
            for (size_t j = 0; j < n && !skip; j++)
                skip = strcmp(conns[j]->partner, conns[i]->partner) == 0;
            if (skip)
                continue;
            s_conn_t *conn = conns[i];
            conns[i] = conns[n];
            conns[n++] = conn;
        }
        for (size_t i = 0; i < n; i++) {
            had[i] = s_credit(self, conns[i]);
            size_t limit =
                had[i] < S_CLAIM_ROWS / n ? had[i] : S_CLAIM_ROWS / n;
            claims[i] = (dstore_claim_t){conns[i]->partner, conns[i]->key,
                                         conns[i]->peer, limit, true};
            got[i] = 0;
        }
        s_pending_ctx_t ctx = {self, conns, got};
        if (dstore_claim_pending(self->store, claims, n, s_queue_pending, &ctx,
                                 err) < 0)
            rc = -1;
        else
            kh_metric_add("delivery_claims_total", NULL, 1);
        /* Fewer than asked: nothing more is pending for it now. All it
         * asked, less than its credit, and all of it queued (its credit
         * went down by as much): it asks again in the next statement,
         * before the connections not served yet. */
        size_t again = 0;
        int64_t now = zclock_mono();
        for (size_t i = 0; rc == 0 && i < n; i++) {
            conns[i]->looked = now;
            /* A connection that only receives is dropped as soon as
             * the registry is read again, not at its next refresh. */
            if (!claims[i].admitted)
                s_registry_outdated(self);
            if (got[i] < claims[i].limit)
                conns[i]->more = false;
            else if (got[i] < had[i] &&
                     s_credit(self, conns[i]) == had[i] - got[i])
                conns[again++] = conns[i];
        }
        memmove(conns + again, conns + n, (count - n) * sizeof *conns);
        count -= n - again;
    }
    free(claims);
    free(got);
    free(had);
    return rc;
}

/* Claim for every connection that may have work (resend: and re-send
 * what is overdue): re-sends connection by connection, then the pending
 * deliveries for all that have credit left. */
static int s_pump(notify_t *self, bool resend, kh_error_t *err)
{
    /* The connections first (a re-send walks them again), then the ones
     * left with credit in the second half. */
    size_t n = 0, count = 0;
    s_conn_t **all = calloc(2 * zhashx_size(self->conns) + 1, sizeof *all);
    if (!all)
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    for (s_conn_t *conn = zhashx_first(self->conns); conn;
         conn = zhashx_next(self->conns))
        all[n++] = conn;
    s_conn_t **conns = all + n;
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        s_conn_t *conn = all[i];
        bool again = resend || s_resends_now(self, conn);
        if (!again && !conn->more)
            continue;
        if (again && s_resend(self, conn, all, n, err))
            rc = -1;
        else if (s_credit(self, conn) > 0)
            conns[count++] = conn;
    }
    if (rc == 0 && count > 0)
        rc = s_claim_pending(self, conns, count, err);
    free(all);
    return rc;
}

/* The connection of partner that has delivery id out: mine when it
 * does, else another of the partner's; NULL when none has. */
static s_conn_t *s_holder(notify_t *self, const char *partner, const char *id,
                          s_conn_t *mine)
{
    if (mine && zhashx_lookup(mine->out, id))
        return mine;
    for (s_conn_t *conn = zhashx_first(self->conns); conn;
         conn = zhashx_next(self->conns))
        if (strcmp(conn->partner, partner) == 0 && zhashx_lookup(conn->out, id))
            return conn;
    return NULL;
}

/* Remember that partner's delivery id is acknowledged (its ACK
 * committed, now or before), forgetting the oldest past S_ACKED_MAX. */
static void s_acked_add(notify_t *self, const char *partner, const char *id)
{
    char key[S_ACKED_KEY];
    snprintf(key, sizeof key, "%s %s", partner, id);
    if (zhashx_lookup(self->acked, key))
        return;
    char *slot = self->acked_ring[self->acked_next];
    if (*slot)
        zhashx_delete(self->acked, slot);
    snprintf(slot, S_ACKED_KEY, "%s", key);
    zhashx_insert(self->acked, slot, (void *) 1);
    self->acked_next = (self->acked_next + 1) % S_ACKED_MAX;
}

/* Whether partner's delivery id is one s_acked_add remembers. */
static bool s_acked_has(notify_t *self, const char *partner, const char *id)
{
    char key[S_ACKED_KEY];
    snprintf(key, sizeof key, "%s %s", partner, id);
    return zhashx_lookup(self->acked, key) != NULL;
}

/* The connection of p's partner that has p's delivery out: the one p
 * came on, as a rule, but a partner may answer on any of its
 * connections what came on another. NULL: none has it out. */
static s_conn_t *s_conn_holding(notify_t *self, const s_pending_t *p)
{
    return s_holder(self, p->answer.partner, p->answer.id,
                    s_conn_of(self, p->identity));
}

/* Send the round's distinct ACKs to the store as one batch, to commit on
 * its own connection while the round claims; each connection counts the
 * ACKs of what it has out as answered (s_credit), whichever of the
 * partner's connections they came on. Returns the batch size (0: none
 * sent), or -1 with err. */
static int s_acks_send(notify_t *self, kh_error_t *err)
{
    size_t nacks = 0;
    for (size_t i = 0; i < self->npending; i++)
        if (!self->pending[i].nack && self->pending[i].leader < 0)
            self->acks[nacks++] = self->pending[i].answer;
    if (nacks && dstore_ack_send(self->store, self->acks, nacks, err))
        return -1;
    for (size_t i = 0; i < self->npending; i++) {
        const s_pending_t *p = &self->pending[i];
        if (p->nack || p->leader >= 0)
            continue;
        s_conn_t *conn = s_conn_holding(self, p);
        if (conn)
            conn->acking++;
    }
    return (int) nacks;
}

/* Two NACKs in the order of their deliveries' ids (uuids in text, whose
 * hex digits sort as their bytes whatever their case). */
static int s_nack_cmp(const void *a, const void *b)
{
    return strcasecmp((*(s_pending_t *const *) a)->answer.id,
                      (*(s_pending_t *const *) b)->answer.id);
}

/* The round's NACKs, inside its transaction; each gets its outcome. They
 * run in the order of their deliveries' ids, the order in which an ACK
 * batch (here or in another process) and another round's NACKs lock
 * theirs: the round waits for locks only here (its claims skip what is
 * locked), so none of them can deadlock with it. */
static int s_nacks_commit(notify_t *self, kh_error_t *err)
{
    size_t n = 0;
    for (size_t i = 0; i < self->npending; i++)
        if (self->pending[i].nack)
            self->nacks[n++] = &self->pending[i];
    qsort(self->nacks, n, sizeof *self->nacks, s_nack_cmp);
    for (size_t i = 0; i < n; i++) {
        s_pending_t *p = self->nacks[i];
        if (dstore_nack(self->store, &p->answer, p->permanent, err))
            return -1;
    }
    return 0;
}

/* The refusal of a frame while the registry is not read (yet, or again
 * since it changed): retryable. */
static void s_registry_unread(kh_error_t *err)
{
    kh_error_set(err, KH_E_UNAVAILABLE, "",
                 "the partner registry cannot be read now; send the same "
                 "request again");
}

/* Whether an answer's outcome is a refusal: nothing changed for it. */
static bool s_refused(dstore_outcome_t outcome)
{
    return outcome == DSTORE_NOT_FOUND || outcome == DSTORE_NOT_ADMITTED;
}

/* After the commits: the ACKs get their batch's outcomes, and every
 * committed answer (acked: the ACK batch, nacked: the round's
 * transaction) leaves its connection's credit. */
static void s_answers_settle(notify_t *self, bool acked, bool nacked)
{
    int64_t now = zclock_mono();
    for (s_conn_t *conn = zhashx_first(self->conns); conn;
         conn = zhashx_next(self->conns))
        conn->acking = 0;
    for (size_t i = 0, a = 0; i < self->npending; i++) {
        s_pending_t *p = &self->pending[i];
        if (p->nack ? !nacked : !acked)
            continue;
        if (!p->nack && p->leader < 0) {
            p->answer.outcome = self->acks[a].outcome;
            p->answer.wait_s = self->acks[a++].wait_s;
        } else if (!p->nack) {
            dstore_outcome_t leader = self->pending[p->leader].answer.outcome;
            p->answer.outcome = s_refused(leader) ? leader : DSTORE_DUPLICATE;
        }
        if (s_refused(p->answer.outcome))
            continue;
        if (!p->nack)
            s_acked_add(self, p->answer.partner, p->answer.id);
        /* The answer frees the window the delivery came in, which may
         * be another connection's than the one it came on. */
        s_conn_t *conn = s_conn_holding(self, p);
        if (!conn)
            conn = s_conn_of(self, p->identity);
        if (conn) {
            zhashx_delete(conn->out, p->answer.id);
            /* An ACK is the cue to look again: always without wake-ups
             * from routing; with them, once the connection's last claim
             * is a quarter of a sweep old, so that what no wake-up
             * announces to this process (deliveries another process
             * routed, a dead letter retried, a wake-up dropped) comes
             * that soon to a partner that is answering, without a claim
             * after every ACK. */
            if (p->answer.outcome == DSTORE_DONE &&
                (!self->wake || now - conn->looked >= self->cfg.sweep_ms / 4))
                conn->more = true;
        }
    }
}

/* Refuse an ACK or NACK that changed nothing (s_refused). */
static void s_answer_refused(notify_t *self, const s_pending_t *p)
{
    bool admitted = p->answer.outcome != DSTORE_NOT_ADMITTED;
    if (admitted)
        self->stats.refused++;
    kh_log_warn(
        "answer_refused", "partner=%s peer=%s delivery=%s cmd=%s reason=%s",
        p->answer.partner, p->answer.peer, p->answer.id,
        p->nack ? "NACK" : "ACK", admitted ? "not_found" : "key_not_admitted");
    kh_error_t err;
    if (admitted)
        kh_error_set(&err, KH_E_NOT_FOUND, "delivery_id",
                     "no delivery with this id was sent to you");
    else {
        /* Refused as any frame is while the registry is stale (not
         * counted as refused: it is to be sent again). Sent again, it is
         * refused for good (unknown_partner, audited) or, on a key that
         * still admits its partner (the same id ACKed in the round on
         * another key), taken. */
        s_registry_outdated(self);
        s_registry_unread(&err);
    }
    s_reject(self, p->identity, p->cid, &err);
}

/* Answer the round's ACKs and NACKs: with their outcomes, or with
 * ack_fail (nack_fail) when the ACK batch (the round's transaction) did
 * not commit. */
static void s_answers_reply(notify_t *self, const kh_error_t *ack_fail,
                            const kh_error_t *nack_fail)
{
    for (size_t i = 0; i < self->npending; i++) {
        s_pending_t *p = &self->pending[i];
        const kh_error_t *fail = p->nack ? nack_fail : ack_fail;
        /* Not a refusal in the trail after all (a key not admitted
         * writes none: its refusal is the frame's when it comes again). */
        if (p->charged && (fail || p->answer.outcome != DSTORE_NOT_FOUND))
            kh_ratelimit_refund(self->refusals, p->answer.partner,
                                zclock_usecs());
        if (fail) {
            s_reject(self, p->identity, p->cid, fail);
            continue;
        }
        switch (p->answer.outcome) {
        case DSTORE_NOT_FOUND:
        case DSTORE_NOT_ADMITTED:
            s_answer_refused(self, p);
            continue;
        case DSTORE_DUPLICATE:
            self->stats.duplicates++;
            break;
        case DSTORE_UNCHANGED:
            /* A NACK of what is no longer out: nothing changed, nothing
             * was written, so nothing is counted as NACKed. */
            break;
        case DSTORE_DEAD:
            self->stats.nacked++;
            self->stats.dead++;
            kh_metric_add("deliveries_nacked_total", NULL, 1);
            kh_metric_add("deliveries_dead_total", NULL, 1);
            kh_log_error("alert",
                         "kind=dead_letter delivery=%s referral=%s "
                         "partner=%s reason=%s",
                         p->answer.id, p->answer.referral, p->answer.partner,
                         p->permanent ? "nack_permanent" : "max_attempts");
            break;
        default:
            if (p->nack)
                self->stats.nacked++;
            else
                self->stats.acked++;
            kh_metric_add(p->nack ? "deliveries_nacked_total"
                                  : "deliveries_acked_total",
                          NULL, 1);
            if (!p->nack && p->answer.outcome == DSTORE_DONE &&
                p->answer.wait_s >= 0)
                kh_metric_observe("delivery_ack_seconds", NULL,
                                  p->answer.wait_s);
        }
        s_send_answer(self, p,
                      p->nack ? p->answer.outcome == DSTORE_DEAD
                              : p->answer.outcome == DSTORE_DUPLICATE);
    }
    for (size_t i = 0; i < self->npending; i++)
        zframe_destroy(&self->pending[i].identity);
    self->npending = 0;
    zhashx_purge(self->batch_ids);
}

/* Count and log a committed DELIVER that left on its connection: only
 * then, since a claim that did not commit sent nothing. */
static void s_sent(notify_t *self, const s_outgoing_t *out)
{
    if (out->attempt > 1)
        self->stats.resent++;
    else
        self->stats.sent++;
    kh_metric_add(out->attempt > 1 ? "deliveries_retried_total"
                                   : "deliveries_sent_total",
                  NULL, 1);
    kh_log_debug("delivery_sent",
                 "delivery=%s referral=%s partner=%s priority=%s attempt=%d",
                 out->id, out->referral, out->partner, out->priority,
                 out->attempt);
}

/* Send a committed DELIVER whose connection is gone on another
 * connection of its partner with free credit: the same attempt, which
 * now leaves. Connections found gone on the way are dropped. Not while
 * the registry is stale (s_registry_check). Whether it was sent (it is
 * still the caller's). */
static bool s_place(notify_t *self, s_outgoing_t *out)
{
    bool retry = !self->partners_stale;
    while (retry) {
        retry = false;
        for (s_conn_t *c = zhashx_first(self->conns); c;
             c = zhashx_next(self->conns)) {
            if (strcmp(c->partner, out->partner) != 0 ||
                zhashx_size(c->out) >= c->window)
                continue;
            s_send_t rc = s_send_to(self, c->identity, zframe_data(out->body),
                                    zframe_size(out->body));
            if (rc == S_SENT) {
                zhashx_update(c->out, out->id, S_OUT_AT(out->claimed));
                s_sent(self, out);
                self->stats.moved++;
                kh_log_debug("delivery_moved", "delivery=%s partner=%s peer=%s",
                             out->id, c->partner, c->peer);
                return true;
            }
            if (rc == S_FULL)
                continue; /* alive, only slow: another, or held */
            s_conn_gone(self, c, "unreachable");
            retry = true; /* the table changed under the iteration */
            break;
        }
    }
    return false;
}

/* Let go of a committed DELIVER that never left (out, which the caller
 * frees): the next round's transaction gives its attempt back, with a
 * delivery.unsent event (dstore_unsent), and the database sends it again,
 * as the same attempt. Only a hub with more of them waiting than it keeps
 * leaves the attempt counted (re-sent after its ACK timeout). */
static void s_give_back(notify_t *self, const s_outgoing_t *out)
{
    bool kept = self->nunsent < S_UNSENT_MAX;
    kh_log_warn("delivery_unsent", "delivery=%s partner=%s attempt=%s", out->id,
                out->partner, kept ? "given_back" : "counted");
    if (!kept)
        return;
    snprintf(self->unsent_id[self->nunsent], sizeof self->unsent_id[0], "%s",
             out->id);
    snprintf(self->unsent_at[self->nunsent], sizeof self->unsent_at[0], "%s",
             out->sent_at);
    self->nunsent++;
}

/* Give back in the round's transaction the attempts of the first n sends
 * that never left (s_give_back). 0, or -1 with err. */
static int s_unsent_commit(notify_t *self, size_t n, kh_error_t *err)
{
    const char *ids[S_UNSENT_MAX], *at[S_UNSENT_MAX];
    for (size_t i = 0; i < n; i++) {
        ids[i] = self->unsent_id[i];
        at[i] = self->unsent_at[i];
    }
    int rows = dstore_unsent(self->store, ids, at, n, err);
    if (rows > 0)
        kh_log_info("attempts_given_back", "deliveries=%d", rows);
    return rows < 0 ? -1 : 0;
}

/* Forget the first n sends given back, which their round committed. */
static void s_unsent_committed(notify_t *self, size_t n)
{
    self->nunsent -= n;
    memmove(self->unsent_id, self->unsent_id + n,
            self->nunsent * sizeof self->unsent_id[0]);
    memmove(self->unsent_at, self->unsent_at + n,
            self->nunsent * sizeof self->unsent_at[0]);
}

/* A committed DELIVER that never left (its connection is gone): on
 * another connection of the partner now, or held until one has credit.
 * Takes out. */
static void s_orphan(notify_t *self, s_outgoing_t *out)
{
    if (s_place(self, out))
        s_outgoing_free((void **) &out);
    else if (zlistx_size(self->held) < S_HELD_MAX &&
             zlistx_add_end(self->held, out))
        return;
    else {
        s_give_back(self, out);
        s_outgoing_free((void **) &out);
    }
}

/* Send the held DELIVERs that a connection of their partner has credit
 * for. One whose re-send may be due by now is let go (s_give_back): the
 * database re-sends it (the earliest re-send is at 80 % of the ACK
 * timeout). */
static void s_held_flush(notify_t *self)
{
    int64_t now = zclock_mono();
    int64_t ttl = (int64_t) self->cfg.policy.ack_timeout_ms * 7 / 10;
    for (s_outgoing_t *out = zlistx_first(self->held); out;
         out = zlistx_next(self->held)) {
        bool expired = now - out->claimed >= ttl;
        if (!expired && !s_place(self, out))
            continue;
        if (expired)
            s_give_back(self, out);
        zlistx_detach_cur(self->held);
        s_outgoing_free((void **) &out);
    }
}

/* Hold the window: the DELIVERs that would take a connection past it, its
 * last ones (the least urgent, the newest), go on another connection of
 * the partner or wait (s_orphan). That happens when the round's ACK batch
 * did not commit, so that the credit its claims counted on (s_credit) is
 * not there, or when another connection of the partner went and its
 * DELIVERs were re-sent on this one. */
static void s_outbox_trim(notify_t *self)
{
    bool over = false;
    for (s_conn_t *conn = zhashx_first(self->conns); conn && !over;
         conn = zhashx_next(self->conns))
        over = zhashx_size(conn->out) > conn->window;
    s_outgoing_t *out = over ? zlistx_last(self->outbox) : NULL;
    while (out) {
        s_conn_t *conn = s_conn_of(self, out->identity);
        if (!conn || zhashx_size(conn->out) <= conn->window) {
            out = zlistx_prev(self->outbox);
            continue;
        }
        zhashx_delete(conn->out, out->id);
        zlistx_detach_cur(self->outbox); /* the cursor goes to the one before */
        s_orphan(self, out);
        out = zlistx_item(self->outbox);
    }
}

/* Send the committed DELIVERs (sent: true) or forget them after a
 * rollback (they are still pending or overdue in the database): a new
 * one's credit is returned, and a re-send of what the connection had out
 * stays out there, as it was (the partner holds the earlier send until it
 * answers, so its place in the window is still taken). A DELIVER whose
 * connection turns out to be gone never left: it goes on another connection of
 * the partner as the same attempt (s_orphan), and so do the connection's
 * DELIVERs after it. */
static void s_outbox_flush(notify_t *self, bool sent)
{
    for (s_outgoing_t *out = zlistx_first(self->outbox); out;
         out = zlistx_next(self->outbox)) {
        s_conn_t *conn = s_conn_of(self, out->identity);
        if (!sent) {
            /* unless the partner's ACK of it committed meanwhile (the
             * round's re-send had it locked, and the ACK batch waited) */
            bool acked = s_acked_has(self, out->partner, out->id);
            if (conn && out->was_out && !acked)
                zhashx_update(conn->out, out->id, S_OUT_AT(out->was_out));
            else if (conn)
                zhashx_delete(conn->out, out->id);
            s_conn_t *from = out->from ? s_conn_of(self, out->from) : NULL;
            if (from && !acked)
                zhashx_update(from->out, out->id, S_OUT_AT(out->from_out));
            continue;
        }
        s_send_t rc =
            conn ? s_send_to(self, out->identity, zframe_data(out->body),
                             zframe_size(out->body))
                 : S_GONE;
        if (rc == S_SENT) {
            out->left = true;
            s_sent(self, out);
            continue;
        }
        if (rc == S_FULL) {
            /* The connection is alive but does not read: this one did not
             * leave and is held (or goes on another connection). */
            zhashx_delete(conn->out, out->id);
            kh_log_debug("send_queue_full", "delivery=%s partner=%s peer=%s",
                         out->id, conn->partner, conn->peer);
        } else if (conn)
            s_conn_gone(self, conn, "unreachable");
        zlistx_detach_cur(self->outbox);
        s_orphan(self, out);
    }
    zlistx_purge(self->outbox);
}

/* Whether some connection may be given deliveries now. */
static bool s_has_work(notify_t *self)
{
    for (s_conn_t *conn = zhashx_first(self->conns); conn;
         conn = zhashx_next(self->conns))
        if (s_resends_now(self, conn) ||
            (conn->more && s_credit(self, conn) > 0))
            return true;
    return false;
}

/* One round: the ACKs that came go to the store as one batch, which
 * commits on its own connection while the NACKs and the claims that use
 * the connections' credit commit in one transaction on the other (two
 * PostgreSQL backends at work at once). Then the answers and the
 * DELIVERs, each only once what it reports is committed (promises 1 and
 * 2). The claims count the credit the ACK batch frees (s_credit), so that
 * a partner with a full window gets more in the round that commits its
 * ACKs rather than in the one after. */
static void s_round(notify_t *self, bool resend)
{
    s_monitor_drain(self);
    s_registry_check(self);
    /* The registry was read for a key it did not know, or on a reconnect,
     * or because it changed: a key moved to another partner, or revoked,
     * is noticed now rather than at the next refresh. */
    if (self->partners_read)
        s_drop_unadmitted(self);
    if (zlistx_size(self->held))
        s_held_flush(self);
    /* Nothing is claimed or re-sent while the registry is stale. */
    bool send = !self->partners_stale;
    if (self->npending == 0 &&
        (!dstore_up(self->store) ||
         (self->nunsent == 0 && (!send || (!resend && !s_has_work(self))))))
        return;
    kh_error_t err, ack_err;
    int acks = s_acks_send(self, &ack_err);
    self->round_began = zclock_mono();
    int rc = dstore_begin(self->store, &err);
    const char *during = "begin";
    if (rc == 0 && (rc = s_nacks_commit(self, &err)) != 0)
        during = "answers";
    size_t unsent = self->nunsent; /* more may come once it commits */
    if (rc == 0 && (rc = s_unsent_commit(self, unsent, &err)) != 0)
        during = "unsent";
    if (rc == 0 && send && (rc = s_pump(self, resend, &err)) != 0)
        during = "claim";
    if (rc == 0 && (rc = dstore_commit(self->store, &err)) != 0)
        during = "commit";
    if (rc == 0)
        s_unsent_committed(self, unsent);
    if (rc) {
        dstore_rollback(self->store, &err);
        s_db_failed(self, during, &err);
        kh_error_set(&err, KH_E_UNAVAILABLE, "",
                     "the hub could not commit this now; send it again");
    }
    /* What the claims found, and the reclaims they made, are undone with
     * them: a reclaim rolled back is made again at the next round, not left
     * to the ACK timeout of what it would have re-sent. */
    for (s_conn_t *conn = zhashx_first(self->conns); conn;
         conn = zhashx_next(self->conns)) {
        if (rc) {
            conn->more = true;
            conn->reclaim = conn->reclaim || conn->reclaiming;
        }
        conn->reclaiming = false;
    }
    if (acks > 0 && dstore_ack_wait(self->store, &ack_err))
        acks = -1;
    if (acks < 0) {
        s_db_failed(self, "ack", &ack_err);
        kh_error_set(&ack_err, KH_E_UNAVAILABLE, "",
                     "the hub could not commit this now; send it again");
    }
    s_answers_settle(self, acks >= 0, rc == 0);
    s_answers_reply(self, acks < 0 ? &ack_err : NULL, rc ? &err : NULL);
    /* A connection that went while the round committed gets none of it. */
    s_monitor_drain(self);
    if (rc == 0)
        s_outbox_trim(self);
    /* Rolled back, the windows are first put back as they were (a re-send
     * taken from a connection is out there again): a held DELIVER must not
     * take that place. */
    if (rc)
        s_outbox_flush(self, false);
    /* What was held goes first, with the credit the ACKs just freed. */
    if (zlistx_size(self->held))
        s_held_flush(self);
    if (rc == 0)
        s_outbox_flush(self, true);
    if (self->outdated) {
        self->outdated = false;
        self->partners_stale = self->partners != NULL;
        self->reread_at = 0;
    }
    /* A connection that may have more due (its window was full, or an
     * ACK was its cue) and whose ACKs freed credit claims again at once
     * when no partner frame is waiting (one would start the next round
     * anyway), since a partner that has answered everything sends nothing
     * more until it gets more. */
    if (acks > 0 && !(zsock_events(self->router) & ZMQ_POLLIN) &&
        s_has_work(self))
        s_round(self, false);
}

/* --- the partners' socket ---------------------------------------------- */

/* An ACK or NACK of partner for delivery id that none of its connections
 * has out may well be refused (not_found: an audit event): while the
 * partner's refusals are over KH_PARTNER_REFUSALS it is refused throttled
 * at once, with no database work (returns true); else it counts as a
 * refusal until its outcome says otherwise (*charged). One for a delivery
 * lately acknowledged is neither: it is a partner's retry of its ACK (or
 * a NACK too late), which the database answers as a duplicate (or
 * unchanged) without an audit event, so it is never refused for refusals
 * it did not cause, nor takes a refusal's place while its round runs. */
static bool s_over_refusals(notify_t *self, zframe_t *identity, const char *cid,
                            const char *partner, const char *id, s_conn_t *mine,
                            bool *charged)
{
    *charged = false;
    if (!self->refusals || s_holder(self, partner, id, mine) ||
        s_acked_has(self, partner, id))
        return false;
    int64_t now = zclock_usecs();
    int64_t wait = kh_ratelimit_wait(self->refusals, partner, now);
    if (wait <= 0) {
        kh_ratelimit_charge(self->refusals, partner, now);
        *charged = true;
        return false;
    }
    kh_error_t err;
    kh_error_set(&err, KH_E_THROTTLED, "",
                 "this partner's answers were refused too often; answer "
                 "again after retry_after_ms");
    s_reject_after(self, identity, cid, &err, wait);
    self->stats.throttled++;
    if (kh_throttle_pass(self->throttle_logged, partner, zclock_mono()))
        kh_log_warn("throttled", "partner=%s over=refusals rate=%d/s", partner,
                    self->cfg.partner_refusals);
    return true;
}

/* Queue an ACK or NACK of partner, from peer on key, for the round's
 * commit. */
static void s_queue_answer(notify_t *self, const char *partner, const char *key,
                           const char *peer, zframe_t *identity,
                           const json_t *msg, const char *cid, kh_cmd_t cmd,
                           bool charged)
{
    const char *id = json_string_value(json_object_get(msg, "delivery_id"));
    bool nack = cmd == KH_CMD_NACK;
    /* The same id twice in one round: one commit, the rest are duplicates
     * of it, which take its outcome. Keys are "partner id". */
    char same[80];
    snprintf(same, sizeof same, "%s %s", partner, id);
    size_t leader =
        nack ? 0 : (size_t) (uintptr_t) zhashx_lookup(self->batch_ids, same);
    if (leader && strcmp(self->pending[leader - 1].answer.key, key) != 0) {
        /* ... but only on the same key: on another one (a rotation's
         * overlap) the outcome may not hold for this key, which the
         * statement checks on its own. Sent again, it goes in a round of
         * its own. */
        if (charged)
            kh_ratelimit_refund(self->refusals, partner, zclock_usecs());
        kh_error_t busy;
        kh_error_set(&busy, KH_E_UNAVAILABLE, "",
                     "this delivery is being acknowledged on another key of "
                     "yours; send the same request again");
        s_reject(self, identity, cid, &busy);
        return;
    }
    s_pending_t *p = &self->pending[self->npending];
    memset(p, 0, sizeof *p);
    p->identity = zframe_dup(identity);
    if (!p->identity)
        return;
    self->npending++;
    p->charged = charged;
    snprintf(p->cid, sizeof p->cid, "%s", cid);
    snprintf(p->answer.id, sizeof p->answer.id, "%s", id);
    snprintf(p->answer.partner, sizeof p->answer.partner, "%s", partner);
    snprintf(p->answer.key, sizeof p->answer.key, "%s", key);
    snprintf(p->answer.peer, sizeof p->answer.peer, "%s", peer);
    p->nack = nack;
    p->permanent =
        nack && strcmp(json_string_value(json_object_get(msg, "reason")),
                       "permanent") == 0;
    p->leader = (int) leader - 1;
    if (!nack && !leader)
        zhashx_insert(self->batch_ids, same,
                      (void *) (uintptr_t) self->npending);
}

/* Drop conn, registered under a routing id that a frame of another
 * connection now comes with: another key, another socket, or an id the
 * peer chose (s_take). Only a peer that sets its own routing id can take
 * over one, and only once the connection that had it is gone; another
 * key doing so is refused in the trail. */
static void s_conn_taken(notify_t *self, s_conn_t *conn, const char *key,
                         const char *peer)
{
    bool foreign = !key || strcmp(key, conn->key) != 0;
    if (foreign) {
        kh_log_warn("routing_id_taken", "partner=%s key=%s peer=%s",
                    conn->partner, key ? key : "none", peer ? peer : "");
        s_audit_refused(self, key ? key : "", peer ? peer : "",
                        "routing_id_taken", NULL);
    }
    s_conn_gone(self, conn, foreign ? "taken" : "replaced");
}

/* Handle one frame (body) from a partner's connection. */
static void s_take(notify_t *self, zframe_t *identity, zmq_msg_t *body,
                   bool extra_frames)
{
    kh_error_t err;
    kh_error_clear(&err);
    const char *key = zmq_msg_gets(body, "User-Id");
    const char *peer = zmq_msg_gets(body, "Peer-Address");
    /* The descriptor of the frame's socket (-1: unknown), which the
     * disconnect events name (s_monitor_drain). ZeroMQ deprecates
     * ZMQ_SRCFD for Peer-Address, but an address does not tell two
     * connections apart. */
    int fd = zmq_msg_get(body, ZMQ_SRCFD);
    /* A DEALER's own routing id comes in its handshake as the Identity
     * property, "" when it set none (libzmq 4.3 answers nothing to
     * "Routing-Id" here). The property is read as a C string, so an id
     * that begins with a zero byte, like ZeroMQ's own, looks like none:
     * the key and socket checks below cover that one. */
    const char *chosen = zmq_msg_gets(body, "Identity");
    s_conn_t *known = s_conn_of(self, identity);
    /* A connection not registered yet may have the descriptor of one that
     * went: that one's disconnect event, queued before its socket closed,
     * is read first, or the next drain would take it for this one's
     * (s_monitor_drain drops every connection on the descriptor). */
    if (!known && fd >= 0)
        s_monitor_drain(self);
    if (known && ((chosen && *chosen) || !key || strcmp(key, known->key) != 0 ||
                  fd != known->fd)) {
        s_conn_taken(self, known, key, peer);
        known = NULL; /* gone */
    }
    /* A registered connection is alive while it sends, whatever the hub
     * makes of its frames (refused while the registry is unread, say). */
    if (known)
        known->last_seen = zclock_mono();
    if (chosen && *chosen) {
        /* The hub tells its peers apart by routing ids it gives; a peer
         * that chooses one could take a gone connection's. */
        s_audit_refused(self, key ? key : "", peer ? peer : "",
                        "routing_id_chosen", "routing_id_refused");
        kh_error_set(&err, KH_E_BAD_ENVELOPE, "",
                     "the connection set its own routing id; a partner's "
                     "connection must leave it to the hub");
        /* Under the frame's cid, as every refusal (protocol.md). */
        char rid_cid[KH_CID_MAX + 1] = "";
        kh_msgpack_peek_str(zmq_msg_data(body), zmq_msg_size(body), "cid",
                            rid_cid, sizeof rid_cid);
        s_reject(self, identity, rid_cid, &err);
        return;
    }
    json_t *msg = NULL;
    const char *cid = NULL;
    kh_cmd_t cmd = KH_CMD_UNKNOWN_;
    kh_limits_t limits = kh_limits_default();
    limits.max_frame = self->cfg.max_frame;
    const char *partner = key ? s_partner_of(self, key) : NULL;
    /* Each of its partner's connections counts, whatever it sends (probes,
     * answers, frames refused): one that opens them without end cannot
     * take the hub's descriptors (peers.h). The events were read above
     * for a connection not known yet. */
    bool over =
        partner && !kh_peers_count(self->peers, fd, zframe_data(identity),
                                   zframe_size(identity), partner);

    /* Who sends comes first, as on intake: a key no active partner holds
     * is told so whatever its frame holds. Until the registry has been
     * read (the database is not up yet), or read again since it changed,
     * no key can be told it is revoked: that answer makes a partner
     * stop. */
    if (!partner && (!self->partners || self->partners_stale))
        s_registry_unread(&err);
    else if (!partner) {
        /* A key the directory still admits that the registry no longer
         * does (revoked, or past its rotation's overlap): refused and
         * audited, as intake does. */
        kh_error_set(&err, KH_E_UNKNOWN_PARTNER, "",
                     "this key belongs to no active partner");
        s_audit_refused(self, key ? key : "", peer ? peer : "",
                        "unknown_partner", NULL);
    } else if (extra_frames)
        kh_error_set(&err, KH_E_BAD_ENVELOPE, "",
                     "a message is exactly one frame");
    else if (over)
        kh_error_set(&err, KH_E_THROTTLED, "",
                     "this partner has %zu connections to the delivery "
                     "socket open already; send on one of them, or close "
                     "one",
                     kh_peers_max(self->peers));
    else if (kh_msgpack_decode(zmq_msg_data(body), zmq_msg_size(body), &limits,
                               &msg, &err) == 0) {
        kh_proto_check(msg, &cmd, &cid, &err);
        /* A command of another socket is refused as such even when its
         * fields are wrong too (a SUBMIT without its idempotency key):
         * naming a field would send the partner to fix a request that
         * this socket never takes. */
        if (cmd != KH_CMD_UNKNOWN_ && cmd != KH_CMD_HELLO &&
            cmd != KH_CMD_ACK && cmd != KH_CMD_NACK && cmd != KH_CMD_PING)
            kh_error_set(&err, KH_E_UNKNOWN_COMMAND, "cmd",
                         "%s is not a command for the delivery socket",
                         kh_cmd_name(cmd));
    }
    /* v is checked before anything else in the frame, as intake does. */
    if (!msg && partner && !extra_frames && !over)
        kh_proto_other_version(zmq_msg_data(body), zmq_msg_size(body), &err);
    /* Only a HELLO registers a connection for deliveries: a connection
     * that only PINGs (a probe) or answers is served without being sent
     * any, since nothing says it reads them. A registered one is kept
     * alive by any of its frames. */
    /* Each connection may hold a window of deliveries and, in its queue,
     * up to the high-water mark of frames: a partner's connections are
     * counted so that one that opens them without end cannot take the
     * hub's memory. A connection whose key was moved to this partner
     * since is a new one of it (s_conn_get starts it over). */
    if (err.code == KH_E_OK && cmd == KH_CMD_HELLO &&
        (!known || strcmp(known->partner, partner) != 0) &&
        s_partner_connections(self, partner, known) >=
            self->cfg.max_connections)
        kh_error_set(&err, KH_E_THROTTLED, "",
                     "this partner has %zu connections to the delivery "
                     "socket already; close one",
                     self->cfg.max_connections);
    s_conn_t *conn = NULL;
    if (err.code == KH_E_OK) {
        conn = s_conn_get(self, known, identity, key, fd, partner,
                          peer ? peer : "", cmd == KH_CMD_HELLO);
        if (!conn && cmd == KH_CMD_HELLO)
            kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
    }
    char peeked[KH_CID_MAX + 1] = "";
    if (err.code != KH_E_OK && !cid) {
        /* The refusal still answers the request's cid where the frame
         * holds one: a partner matches replies by it (protocol.md). */
        kh_msgpack_peek_str(zmq_msg_data(body), zmq_msg_size(body), "cid",
                            peeked, sizeof peeked);
        cid = peeked;
    }
    if (err.code != KH_E_OK) {
        /* The reply names the partner's keys; the log only the contract's
         * (no referral travels on this socket: no schema's names), and
         * once every 10 s per partner or key: a peer that sends bad frames
         * without end must not fill the log. */
        char path[KH_ERROR_PATH_MAX], logged[64];
        kh_proto_trail_path(err.code, err.path, NULL, path, sizeof path);
        snprintf(logged, sizeof logged, "refused %s",
                 partner ? partner
                 : key   ? key
                         : "");
        if (kh_throttle_pass(self->throttle_logged, logged, zclock_mono()))
            kh_log_warn("request_refused", "partner=%s peer=%s code=%s path=%s",
                        partner ? partner : "none", peer ? peer : "",
                        kh_error_name(err.code), *path ? path : "none");
        if (over) /* a connection of it may close any moment */
            s_reject_after(self, identity, cid, &err, S_CONNECTIONS_RETRY_MS);
        else
            s_reject(self, identity, cid, &err);
        json_decref(msg);
        return;
    }
    if (cmd == KH_CMD_HELLO) {
        const json_t *window = json_object_get(msg, "window");
        size_t want =
            window ? (size_t) json_integer_value(window) : self->cfg.window;
        conn->window = want < self->cfg.window ? want : self->cfg.window;
        conn->more = true;
        if (conn->untold) /* the window it is sent within */
            kh_log_info("partner_connected", "partner=%s peer=%s window=%zu",
                        conn->partner, conn->peer, conn->window);
        conn->untold = false;
        json_t *reply = kh_proto_new(KH_CMD_WELCOME, cid);
        json_object_set_new(reply, "partner", json_string(conn->partner));
        json_object_set_new(reply, "window",
                            json_integer((json_int_t) conn->window));
        s_send_json(self, identity, reply);
    } else if (cmd == KH_CMD_PING)
        s_send_json(self, identity, kh_proto_new(KH_CMD_PONG, cid));
    else {
        bool charged;
        if (!s_over_refusals(
                self, identity, cid, partner,
                json_string_value(json_object_get(msg, "delivery_id")), conn,
                &charged))
            s_queue_answer(self, partner, key, peer ? peer : "", identity, msg,
                           cid, cmd, charged);
    }
    json_decref(msg);
}

static int s_on_router(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    notify_t *self = arg;
    s_registry_check(self); /* no frame of a key revoked is taken */
    void *handle = zsock_resolve(sock);
    for (int i = 0; i < S_READ_MAX && (zsock_events(sock) & ZMQ_POLLIN); i++) {
        /* libzmq's own messages: a CZMQ frame does not give its socket's
         * descriptor (s_take). Routing id, body, and any more frames,
         * which are read and refused. */
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        zmq_msg_init(&body);
        int rc = zmq_msg_recv(&id, handle, ZMQ_DONTWAIT);
        bool whole = rc >= 0 && zmq_msg_more(&id) &&
                     zmq_msg_recv(&body, handle, ZMQ_DONTWAIT) >= 0;
        bool extra = whole && zmq_msg_more(&body);
        for (bool more = extra; more;) {
            zmq_msg_t rest;
            zmq_msg_init(&rest);
            more = zmq_msg_recv(&rest, handle, ZMQ_DONTWAIT) >= 0 &&
                   zmq_msg_more(&rest);
            zmq_msg_close(&rest);
        }
        zframe_t *identity =
            whole ? zframe_new(zmq_msg_data(&id), zmq_msg_size(&id)) : NULL;
        if (identity)
            s_take(self, identity, &body, extra);
        zframe_destroy(&identity);
        zmq_msg_close(&id);
        zmq_msg_close(&body);
        if (rc < 0)
            break;
    }
    if (!(zsock_events(sock) & ZMQ_POLLIN))
        self->read_all_at = zclock_mono();
    self->stats.rounds++;
    s_round(self, false);
    return 0;
}

/* --- timers, wake-ups, signals ------------------------------------------ */

static void s_on_sweep_event(const dstore_event_t *event, void *arg)
{
    notify_t *self = arg;
    if (strcmp(event->kind, "dead") == 0) {
        self->stats.dead++;
        kh_metric_add("deliveries_dead_total", NULL, 1);
        kh_log_error("alert",
                     "kind=dead_letter delivery=%s referral=%s "
                     "partner=%s reason=%s",
                     event->delivery_id, event->referral_id, event->partner,
                     event->reason);
        for (s_conn_t *c = zhashx_first(self->conns); c;
             c = zhashx_next(self->conns))
            zhashx_delete(c->out, event->delivery_id);
        for (s_outgoing_t *h = zlistx_first(self->held); h;
             h = zlistx_next(self->held))
            if (strcmp(h->id, event->delivery_id) == 0) {
                zlistx_detach_cur(self->held);
                s_outgoing_free((void **) &h);
            }
    } else {
        self->stats.escalated++;
        kh_metric_add("deliveries_escalated_total", NULL, 1);
        /* escalated_to names the partner that got a copy; with
         * copy=none, reason says why, and escalation_partner names the
         * rules' partner when there is one. */
        bool got = strcmp(event->copy, "none") != 0;
        if (got)
            kh_log_error("alert",
                         "kind=escalation delivery=%s referral=%s "
                         "partner=%s escalated_to=%s copy=%s",
                         event->delivery_id, event->referral_id, event->partner,
                         event->escalate_to, event->copy);
        else if (event->escalate_to)
            kh_log_error("alert",
                         "kind=escalation delivery=%s referral=%s "
                         "partner=%s escalated_to=none copy=none reason=%s "
                         "escalation_partner=%s",
                         event->delivery_id, event->referral_id, event->partner,
                         event->reason, event->escalate_to);
        else
            kh_log_error("alert",
                         "kind=escalation delivery=%s referral=%s "
                         "partner=%s escalated_to=none copy=none reason=%s",
                         event->delivery_id, event->referral_id, event->partner,
                         event->reason);
        if (got)
            for (s_conn_t *c = zhashx_first(self->conns); c;
                 c = zhashx_next(self->conns))
                if (strcmp(c->partner, event->escalate_to) == 0)
                    c->more = true;
    }
}

static int s_on_tick(zloop_t *loop, int timer_id, void *arg);

/* A look at the attempt to connect, between two ticks. */
static int s_on_connect_poll(zloop_t *loop, int timer_id, void *arg)
{
    notify_t *self = arg;
    self->connect_poll = false;
    return s_on_tick(loop, timer_id, arg);
}

/* Forget what conn has had out, unanswered and not re-sent, for longer
 * than any re-send waits (S_OUT_AT): it is no longer out in the database.
 * Another process made it a dead letter (each sweep takes what no other
 * holds, and only the one that made it tells its connections), or sent it
 * again on a connection of its own, or took its ACK: this connection will
 * get no answer for it, and it took a place in the window for good. One
 * still out (the database was away, say) is re-sent as an overdue one and
 * counted again then. */
static void s_out_expire(notify_t *self, s_conn_t *conn, int64_t now)
{
    const dstore_policy_t *p = &self->cfg.policy;
    /* The longest wait is the back-off maximum plus its jitter (20 %);
     * then a sweep and a round to re-send it. */
    int64_t limit =
        (int64_t) p->backoff_max_ms * 3 / 2 + 2 * (int64_t) self->cfg.sweep_ms;
    size_t gone = 0;
    zlistx_t *ids = zhashx_keys(conn->out);
    for (const char *id = ids ? zlistx_first(ids) : NULL; id;
         id = zlistx_next(ids))
        if (now - (intptr_t) zhashx_lookup(conn->out, id) > limit) {
            zhashx_delete(conn->out, id);
            gone++;
        }
    zlistx_destroy(&ids);
    if (gone) {
        conn->more = true;
        kh_log_info("out_forgotten", "partner=%s peer=%s deliveries=%zu",
                    conn->partner, conn->peer, gone);
    }
}

/* event=ready, once: the sockets are bound and PostgreSQL answers, as the
 * other services and the README say (it used to come before the first
 * attempt to connect, so a start script took a hub whose database was
 * away for ready). */
static void s_log_ready(notify_t *self)
{
    kh_log_info("ready",
                "endpoint=%s port=%d wake=%s window=%zu ack_timeout_ms=%d "
                "max_attempts=%d escalate_ms=%d",
                self->cfg.endpoint, self->port,
                self->wake ? self->cfg.wake_endpoint : "none", self->cfg.window,
                self->cfg.policy.ack_timeout_ms, self->cfg.policy.max_attempts,
                self->cfg.policy.escalate_ms);
    self->ready_logged = true;
}

/* The periodic round: reconnect, sweep, forget silent connections, and
 * look for due re-sends on every connection. */
static int s_on_tick(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    notify_t *self = arg;
    if (!(zsock_events(self->router) & ZMQ_POLLIN))
        self->read_all_at = zclock_mono();
    kh_error_t err;
    if (!dstore_up(self->store)) {
        kh_health_connected(false);
        if (!dstore_connecting(self->store) &&
            zclock_mono() < self->connect_after)
            return 0; /* the database is away: not yet again */
        if (dstore_connect(self->store, &err)) {
            if (!dstore_connecting(self->store)) {
                self->retry_ms = kh_db_retry_next(self->retry_ms);
                self->connect_after = zclock_mono() + self->retry_ms;
                kh_log_warn("db_connect_failed",
                            "code=%s path=%s retry_ms=%d msg=\"%s\"",
                            kh_error_name(err.code),
                            err.path[0] ? err.path : "none", self->retry_ms,
                            KH_LOG_Q(err.message));
            } else if (!self->connect_poll) /* look again soon */
                self->connect_poll =
                    zloop_timer(self->loop, KH_DB_CONNECT_POLL_MS, 1,
                                s_on_connect_poll, self) != -1;
            return 0;
        }
        kh_log_info("db_connected", NULL);
        kh_health_connected(true);
        if (!self->ready_logged)
            s_log_ready(self);
        self->retry_ms = 0;
        /* What the registry told while the database was away is lost. */
        self->partners_stale = self->partners != NULL;
        s_load_partners(self);
    }
    if (dstore_sweep(self->store, s_on_sweep_event, self, &err) < 0)
        s_db_failed(self, "sweep", &err);
    int64_t now = zclock_mono();
    int64_t read_up_to = self->read_all_at > now - S_READ_LAG_MAX_MS
                             ? self->read_all_at
                             : now - S_READ_LAG_MAX_MS;
    zlistx_t *keys = zhashx_keys(self->conns);
    for (const char *key = keys ? zlistx_first(keys) : NULL; key;
         key = zlistx_next(keys)) {
        s_conn_t *conn = zhashx_lookup(self->conns, key);
        if (read_up_to - conn->last_seen > self->cfg.peer_timeout_ms)
            s_conn_drop(self, conn, "silent");
        else {
            conn->more = true;
            s_out_expire(self, conn, now);
        }
    }
    zlistx_destroy(&keys);
    s_round(self, true);
    return 0;
}

static int s_on_refresh(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    notify_t *self = arg;
    if (dstore_up(self->store)) {
        s_load_partners(self);
        s_drop_unadmitted(self);
    }
    return 0;
}

/* The refusals counted but not told yet, once the flood that caused them
 * has stopped (or at once when final, on the way out). */
static void s_tell_unaudited(notify_t *self, bool final)
{
    uint64_t count =
        kh_refusal_gate_flush(self->auth_gate, zclock_usecs(), final);
    if (count)
        kh_log_warn("auth_refusals_unaudited", "count=%" PRIu64, count);
}

static int s_on_stats(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    notify_t *self = arg;
    s_tell_unaudited(self, false);
    s_stats_t *st = &self->stats;
    if (st->sent + st->resent + st->moved + st->acked + st->nacked +
            st->refused + st->throttled + st->dead + st->escalated +
            st->failures >
        0)
        kh_log_info("stats",
                    "sent=%" PRIu64 " resent=%" PRIu64 " moved=%" PRIu64
                    " acked=%" PRIu64 " duplicates=%" PRIu64 " refused=%" PRIu64
                    " throttled=%" PRIu64 " nacked=%" PRIu64 " dead=%" PRIu64
                    " escalated=%" PRIu64 " db_failures=%" PRIu64
                    " connections=%zu db=%s",
                    st->sent, st->resent, st->moved, st->acked, st->duplicates,
                    st->refused, st->throttled, st->nacked, st->dead,
                    st->escalated, st->failures, zhashx_size(self->conns),
                    dstore_up(self->store) ? "up" : "down");
    memset(st, 0, sizeof *st);
    return 0;
}

/* A wake-up from routing: {"v":1,"cmd":"NOTIFY","partners":[id, ...]}.
 * Only its partners' connections look again; a bad one is logged and
 * ignored (the tick finds the work anyway). */
static int s_on_wake(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    notify_t *self = arg;
    for (int i = 0; i < 1000 && (zsock_events(sock) & ZMQ_POLLIN); i++) {
        zmsg_t *msg = zmsg_recv(sock);
        if (!msg)
            break;
        zframe_t *frame = zmsg_first(msg);
        kh_limits_t limits = kh_limits_default();
        json_t *body = NULL;
        kh_error_t err;
        const char *cmd = NULL;
        json_t *partners = NULL;
        if (zmsg_size(msg) == 1 &&
            kh_msgpack_decode(zframe_data(frame), zframe_size(frame), &limits,
                              &body, &err) == 0) {
            cmd = json_string_value(json_object_get(body, "cmd"));
            partners = json_object_get(body, "partners");
        }
        if (!cmd || strcmp(cmd, "NOTIFY") != 0 || !json_is_array(partners))
            kh_log_warn("wakeup_malformed", "frames=%zu", zmsg_size(msg));
        else {
            size_t j;
            const json_t *id;
            json_array_foreach(partners, j, id)
            {
                const char *partner = json_string_value(id);
                for (s_conn_t *c = zhashx_first(self->conns); c && partner;
                     c = zhashx_next(self->conns))
                    if (strcmp(c->partner, partner) == 0)
                        c->more = true;
            }
        }
        json_decref(body);
        zmsg_destroy(&msg);
    }
    s_round(self, false);
    return 0;
}

static int s_on_zap(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    (void) sock;
    notify_t *self = arg;
    char key[41], peer[64];
    int rc = kh_zap_handle(self->zap, key, peer);
    if (rc == 2) /* a partner with its most connections (peers.h) */
        self->stats.throttled++;
    else if (rc != 0)
        s_audit_refused(self, key, peer, "unknown_partner", "auth_refused");
    /* The gate read the closed connections: what they had out may be due
     * on others now. */
    if (s_monitor_drain(self))
        s_round(self, false);
    return 0;
}

static int s_on_monitor(zloop_t *loop, zsock_t *sock, void *arg)
{
    (void) loop;
    (void) sock;
    notify_t *self = arg;
    /* What the connections that went had out may be due on others now. */
    if (s_monitor_drain(self))
        s_round(self, false);
    return 0;
}

static int s_on_signal(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void) loop;
    notify_t *self = arg;
    return kh_signals_take(item->fd, &self->stopping, NULL);
}

/* --- life --------------------------------------------------------------- */

notify_t *notify_new(const notify_config_t *config, kh_error_t *err)
{
    notify_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    self->cfg = *config;
    if (!zsys_has_curve()) {
        kh_error_set(err, KH_E_CURVE, "", "libzmq was built without CURVE");
        goto fail;
    }
    self->cert = kh_hub_cert_load(config->hub_cert, err);
    if (!self->cert)
        goto fail;
    /* Without a ZAP handler a CURVE server accepts any client key: each
     * handler is bound before its socket. */
    self->zap = kh_zap_new(config->partner_certs, NULL, err);
    if (!self->zap)
        goto fail;
    self->router = kh_curve_server_new(ZMQ_ROUTER, self->cert,
                                       (int64_t) config->max_frame, err);
    if (!self->router)
        goto fail;
    zsock_set_linger(self->router, S_LINGER_MS);
    /* A send to a peer that is gone fails (EHOSTUNREACH) instead of
     * vanishing, and the connection is forgotten at once. The window
     * bounds what is queued per peer (its DELIVERs, and the answers to
     * its ACKs); the high-water mark is twice above that, because a
     * sender learns what its pipe has passed on only every half mark. It
     * follows the configured window: a partner that does not read holds
     * at most that many frames of the hub's memory per connection (its
     * re-sends among them), so a smaller KH_NOTIFY_WINDOW bounds it. */
    zsock_set_router_mandatory(self->router, 1);
    zsock_set_sndhwm(self->router, (int) config->window * 4 + 64);
    zsock_set_sndtimeo(self->router, 0);
    zsock_set_rcvhwm(self->router, KH_WINDOW_MAX * 2 + 64);
    /* ZeroMQ's heartbeat closes a connection that sent nothing for the
     * timeout. Under load its I/O thread can run the timer before it reads
     * what arrived (a burst of DELIVERs to encrypt for several partners),
     * so a short timeout closed live connections now and then: 3 s did in
     * three of five runs of scripts/bench-deliveries.sh, and their DELIVERs
     * then waited for the ACK timeout. Partners that go quiet are dropped
     * by the silence timeout (KH_NOTIFY_PEER_TIMEOUT_MS) and gone ones on
     * the first failed send; the heartbeat is only there for peers whose
     * TCP connection died without a word. */
    zsock_set_heartbeat_ivl(self->router, 1000);
    zsock_set_heartbeat_timeout(self->router, 30000);
    /* ZeroMQ reports each connection accepted and closed with its
     * socket's descriptor (s_monitor_drain); set before the bind: none is
     * missed. A partner may have twice KH_NOTIFY_MAX_CONNECTIONS open:
     * the ones it is sent deliveries on, and as many for probes and
     * answers. */
    self->peers = kh_peers_new(self->router, 2 * config->max_connections, err);
    if (!self->peers)
        goto fail;
    kh_peers_on_close(self->peers, s_on_close, self);
    self->port = zsock_bind(self->router, "%s", config->endpoint);
    if (self->port == -1) {
        kh_error_set(err, KH_E_CONFIG, "KH_NOTIFY_ENDPOINT",
                     "cannot bind %s: %s", config->endpoint,
                     zmq_strerror(zmq_errno()));
        goto fail;
    }
    kh_health_note("hub_key", zcert_public_txt(self->cert));
    if (kh_zap_bind_next(self->zap, self->router, config->hub_cert_next,
                         config->endpoint_next, "KH_NOTIFY_ENDPOINT_NEXT", err))
        goto fail;
    if (config->wake_endpoint && *config->wake_endpoint &&
        strcmp(config->wake_endpoint, "none") != 0) {
        /* Services speak to each other with the hub's key only. */
        if (kh_zap_domain_key(self->zap, S_INTERNAL_DOMAIN,
                              zcert_public_txt(self->cert), err))
            goto fail;
        self->wake = kh_curve_server_new(ZMQ_PULL, self->cert, S_WAKE_MAX, err);
        if (!self->wake)
            goto fail;
        zsock_set_zap_domain(self->wake, S_INTERNAL_DOMAIN);
        zsock_set_linger(self->wake, 0);
        if (zsock_bind(self->wake, "%s", config->wake_endpoint) == -1) {
            kh_error_set(err, KH_E_CONFIG, "KH_NOTIFY_WAKE_ENDPOINT",
                         "cannot bind %s: %s", config->wake_endpoint,
                         zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    self->store = dstore_new(config->conninfo, &config->policy);
    kh_health_connected(false); /* ready once the store is */
    self->conns = zhashx_new();
    self->batch_ids = zhashx_new();
    self->acked = zhashx_new();
    self->acked_ring = calloc(S_ACKED_MAX, sizeof *self->acked_ring);
    self->pending = calloc(S_READ_MAX, sizeof *self->pending);
    self->acks = calloc(S_READ_MAX, sizeof *self->acks);
    self->nacks = calloc(S_READ_MAX, sizeof *self->nacks);
    self->outbox = zlistx_new();
    self->held = zlistx_new();
    self->auth_gate = kh_refusal_gate_new(KH_REFUSAL_REPEAT_MS, KH_REFUSAL_RATE,
                                          KH_REFUSAL_BURST, KH_REFUSAL_LOG_MS);
    self->throttle_logged = kh_throttle_new(10000, 10000);
    self->unknown_keys = kh_throttle_new(S_RELOAD_MIN_MS, 1000);
    /* 10 s worth at once, and at least a window: after a restart a
     * partner ACKs what the process before sent, which no connection of
     * this one has out, and none of that is a refusal. */
    double burst = 10.0 * config->partner_refusals;
    if (burst < (double) config->window)
        burst = (double) config->window;
    if (config->partner_refusals > 0)
        self->refusals =
            kh_ratelimit_new(config->partner_refusals, burst, 10000);
    self->loop = zloop_new();
    if (!self->store || !self->conns || !self->batch_ids || !self->acked ||
        !self->acked_ring || !self->pending || !self->acks || !self->nacks ||
        !self->outbox || !self->held || !self->auth_gate ||
        !self->throttle_logged || !self->unknown_keys ||
        (config->partner_refusals > 0 && !self->refusals) || !self->loop) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        goto fail;
    }
    zhashx_set_destructor(self->conns, s_conn_free);
    zlistx_set_destructor(self->outbox, s_outgoing_free);
    zlistx_set_destructor(self->held, s_outgoing_free);
    return self;
fail:
    notify_destroy(&self);
    return NULL;
}

void notify_destroy(notify_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    notify_t *self = *self_p;
    zloop_destroy(&self->loop);
    kh_peers_destroy(&self->peers);
    zsock_destroy(&self->router);
    zsock_destroy(&self->wake);
    kh_zap_destroy(&self->zap);
    zcert_destroy(&self->cert);
    zhashx_destroy(&self->conns);
    zhashx_destroy(&self->batch_ids);
    zhashx_destroy(&self->acked);
    free(self->acked_ring);
    zhashx_destroy(&self->partners);
    for (size_t i = 0; self->pending && i < self->npending; i++)
        zframe_destroy(&self->pending[i].identity);
    free(self->pending);
    free(self->acks);
    free(self->nacks);
    zlistx_destroy(&self->outbox);
    zlistx_destroy(&self->held);
    kh_refusal_gate_destroy(&self->auth_gate);
    kh_throttle_destroy(&self->throttle_logged);
    kh_throttle_destroy(&self->unknown_keys);
    kh_ratelimit_destroy(&self->refusals);
    dstore_destroy(&self->store);
    free(self);
    *self_p = NULL;
}

int notify_port(const notify_t *self)
{
    return self->port;
}

int notify_run(notify_t *self, int signal_fd)
{
    zmq_pollitem_t signals = {NULL, signal_fd, ZMQ_POLLIN, 0};
    if (kh_peers_guard(self->peers, self->zap, &self->partners) ||
        zloop_reader(self->loop, kh_zap_socket(self->zap), s_on_zap, self) ||
        zloop_reader(self->loop, self->router, s_on_router, self) ||
        zloop_reader(self->loop, kh_peers_monitor(self->peers), s_on_monitor,
                     self) ||
        (self->wake && zloop_reader(self->loop, self->wake, s_on_wake, self)) ||
        zloop_poller(self->loop, &signals, s_on_signal, self) ||
        zloop_timer(self->loop, (size_t) self->cfg.sweep_ms, 0, s_on_tick,
                    self) == -1 ||
        zloop_timer(self->loop, (size_t) self->cfg.partner_refresh_ms, 0,
                    s_on_refresh, self) == -1 ||
        zloop_timer(self->loop, S_STATS_MS, 0, s_on_stats, self) == -1 ||
        kh_health_attach(self->loop)) {
        kh_log_error("start_failed", "reason=\"cannot set up the loop\"");
        return -1;
    }
    /* The first connection (and with it the registry) before the first
     * partner is read, as long as it takes or until it fails; a stop
     * signal meanwhile goes to the loop at once. */
    s_on_tick(self->loop, 0, self);
    while (dstore_connecting(self->store)) {
        kh_health_beat();
        struct pollfd pfd = {signal_fd, POLLIN, 0};
        if (poll(&pfd, 1, KH_DB_CONNECT_POLL_MS) > 0)
            break;
        s_on_tick(self->loop, 0, self);
    }
    zloop_start(self->loop);
    s_on_stats(self->loop, 0, self);
    s_tell_unaudited(self, true);
    kh_log_info("stopped", NULL);
    return 0;
}
