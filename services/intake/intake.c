/*
 * The intake service core (see intake.h and schemas/protocol.md).
 *
 * Group commit with two batches: one is being committed by PostgreSQL
 * while intake receives and checks the requests of the other. When the
 * commit ends, its requests are answered (ACCEPTED never precedes the
 * commit: promise 1) and the other batch, with whatever arrived meanwhile,
 * is sent at once. Batches grow with load by themselves, and intake's work
 * overlaps PostgreSQL's. A full waiting batch stops intake from reading
 * the socket, so ZeroMQ's queue, not memory, holds the excess.
 */
#include "intake.h"

#include <czmq.h>
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/jarena.h"
#include "ketenhub/log.h"
#include "ketenhub/partner.h"
#include "ketenhub/peers.h"
#include "ketenhub/proto.h"
#include "ketenhub/ratelimit.h"
#include "ketenhub/schema.h"
#include "ketenhub/service.h"
#include "ketenhub/throttle.h"
#include "ketenhub/zap.h"
#include "store.h"

/* The first reconnect after the database went away comes sooner than
 * kh_db_retry_next's first wait: partners are waiting for answers. */
#define S_BACKOFF_MIN_MS 100
#define S_UNKNOWN_KEY_RELOAD_MS 1000
#define S_LINGER_MS 2000
#define S_RCVHWM 64
#define S_BATCH_BYTES (8 * 1024 * 1024)
#define S_ARENA_KEEP (2 * 1024 * 1024) /* of a batch's arena across batches */
#define S_DRAIN_MS 3000
#define S_STATS_MS 10000
#define S_AUTH_PENDING 64           /* refused handshakes waiting for audit */
#define S_CONNECTIONS_RETRY_MS 1000 /* throttled for too many connections */

/* One request of the batch being handled. */
typedef struct {
    zframe_t *identity; /* the ROUTER's routing id of the connection */
    int fd;             /* its socket's descriptor, -1: unknown (peers.h) */
    json_t *msg;        /* decoded envelope (in the batch's arena), or NULL */
    kh_cmd_t cmd;       /* KH_CMD_UNKNOWN_ when not understood */
    char cid[KH_CID_MAX + 1];
    char partner[64];   /* partner id, "" when the key is unknown */
    char actor[64];     /* partner id, or "key:<Z85>" */
    char peer[64];      /* peer address */
    bool refused;       /* err holds why */
    int retry_after_ms; /* throttled: the least wait before resending */
    size_t size;        /* bytes of the frame */
    kh_error_t err;
    char trail_path[KH_ERROR_PATH_MAX]; /* err.path as the trail holds it */
    char *canonical; /* SUBMIT: the referral's canonical JSON (owned) */
    int sub;         /* index in the batch's submissions, or -1 */
    int leader;    /* earlier request of this batch with the same key, or -1 */
    char hash[65]; /* a repeat of a key (leader set): its referral's hash */
    /* A repeat whose referral differs from its leader's: a refusal token
     * taken ahead, kept when it is a conflict, given back when not. */
    bool charged;
    bool unaudited;   /* a conflict whose audit event failed: err says why */
    bool in_trail;    /* a refusal whose event goes in with its batch */
    bool audit_first; /* ... answered only once that event commits */
    json_t *status;   /* STATUS: its reply, read at receipt (in the arena) */
    /* The key it came with (Z85), "" if none. */
    char key[KH_PARTNER_KEY_LEN + 1];
} s_request_t;

/* A refused handshake, to audit as auth.refused. */
typedef struct {
    char actor[48]; /* "key:<Z85>" */
    char peer[64];
} s_auth_refusal_t;

/* Requests committed together, and their rows for the store. */
typedef struct {
    s_auth_refusal_t auth[S_AUTH_PENDING]; /* refused handshakes */
    s_request_t *requests;
    store_submit_t *subs;
    store_refusal_t *refs;
    store_repeat_t *reps;        /* later requests with a submission's key */
    store_conflict_t *conflicts; /* found after the commit, to audit */
    size_t count, nsubs, nreps, nrefs;
    size_t bytes;        /* frames of the requests kept, for the memory bound */
    kh_jarena_t *arena;  /* the requests' decoded envelopes */
    zhashx_t *keys;      /* "partner\nkey" -> index + 1, to find repeats */
    int64_t sent_at;     /* when the commit started, 0 if not sent */
    bool refs_dropped;   /* committed without its refusals' events */
    bool committed;      /* its statement committed, though its answers
                          * may not all have been read */
    kh_error_t refs_err; /* why, when refs_dropped */
} s_batch_t;

/* Counts since the last stats line. */
typedef struct {
    uint64_t accepted, duplicates, refused, failed, throttled, batches;
    double commit_ms_total, commit_ms_max;
} s_stats_t;

struct _intake_t {
    intake_config_t cfg;
    kh_schema_t *schema;
    zcert_t *cert;
    kh_zap_t *zap;
    zsock_t *router;
    kh_peers_t *peers; /* the router's connections per partner */
    zsock_t *routing;  /* wake-ups for routing, or NULL */
    int port;
    store_t *store;
    zhashx_t *partners; /* Z85 key -> partner id */
    bool partners_read; /* the last attempt to re-read them succeeded */
    /* The registry changed (its notice came, or may have gone by while
     * the reader was away) and has not been read since: partners may
     * admit a key that is revoked now, so it admits none until then. */
    bool partners_stale;
    /* zclock_mono when the first key of partners ends (0: none does) */
    int64_t partners_end;
    int64_t unread_told; /* zclock_mono of the last partners_unread line */
    zloop_t *loop;
    int reconnect_timer; /* zloop timer id, 0 if none */
    int backoff_ms;
    bool ready_logged;
    bool stopping;
    int signal_fd; /* SIGTERM, SIGINT, SIGHUP */
    s_batch_t batches[2];
    s_batch_t *filling;    /* receives new requests */
    s_batch_t *committing; /* being committed, or NULL */
    bool reading;          /* the ROUTER reader is registered */
    int db_fd;             /* the writer socket polled by the loop, or -1 */
    bool db_sending;       /* it is polled for writing too */
    s_stats_t stats;
    s_auth_refusal_t auth_pending[S_AUTH_PENDING];
    size_t nauth_pending;
    kh_refusal_gate_t *auth_gate;   /* which refused handshakes are audited */
    kh_ratelimit_t *ratelimit;      /* per partner SUBMITs, or NULL: no limit */
    kh_ratelimit_t *refusals;       /* per partner refusals, or NULL */
    kh_throttle_t *throttle_logged; /* partner: one "throttled" line / 10 s */
    kh_throttle_t *unknown_keys;    /* key: one registry reload a second */
};

intake_t *intake_new(const intake_config_t *config, kh_error_t *err)
{
    intake_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    self->cfg = *config;
    self->backoff_ms = S_BACKOFF_MIN_MS;

    char path[4096];
    snprintf(path, sizeof path, "%s/referral.v1.json", config->schema_dir);
    self->schema = kh_schema_load(path, err);
    if (!self->schema && err->code == KH_E_IO)
        /* A schema that cannot be read is a bad setting: name it. */
        kh_error_as_setting(err, "KH_SCHEMA_DIR", path);
    if (!self->schema)
        goto fail;
    if (!zsys_has_curve()) {
        kh_error_set(err, KH_E_CURVE, "", "libzmq was built without CURVE");
        goto fail;
    }
    self->cert = kh_hub_cert_load(config->hub_cert, err);
    if (!self->cert)
        goto fail;
    /* Without a ZAP handler a CURVE server accepts any client key: it
     * must be bound before the ROUTER. */
    self->zap = kh_zap_new(config->partner_certs, NULL, err);
    if (!self->zap)
        goto fail;
    self->router = kh_curve_server_new(ZMQ_ROUTER, self->cert,
                                       (int64_t) config->limits.max_frame, err);
    if (!self->router)
        goto fail;
    zsock_set_linger(self->router, S_LINGER_MS);
    /* Unread requests wait in ZeroMQ, per connection: bound them, so one
     * connection cannot make intake hold more than S_RCVHWM frames. */
    zsock_set_rcvhwm(self->router, S_RCVHWM);
    zsock_set_router_mandatory(self->router, 1); /* s_send */
    /* A connection whose peer vanished without a word (power lost, a
     * firewall's state dropped) would be counted against its partner
     * until the kernel gave up on it; the heartbeat closes it within
     * 30 s. */
    zsock_set_heartbeat_ivl(self->router, 1000);
    zsock_set_heartbeat_timeout(self->router, 30000);
    self->peers = kh_peers_new(self->router, config->max_connections, err);
    if (!self->peers)
        goto fail;
    self->port = zsock_bind(self->router, "%s", config->endpoint);
    if (self->port == -1) {
        kh_error_set(err, KH_E_CONFIG, "KH_INTAKE_ENDPOINT",
                     "cannot bind %s: %s", config->endpoint,
                     zmq_strerror(zmq_errno()));
        goto fail;
    }
    kh_health_note("hub_key", zcert_public_txt(self->cert));
    if (kh_zap_bind_next(self->zap, self->router, config->hub_cert_next,
                         config->endpoint_next, "KH_INTAKE_ENDPOINT_NEXT", err))
        goto fail;
    if (config->routing_endpoint && *config->routing_endpoint &&
        !(self->routing = kh_wake_push_new(self->cert, config->routing_endpoint,
                                           "KH_ROUTING_ENDPOINT", err)))
        goto fail;
    self->store = store_new(config->conninfo);
    kh_health_connected(false); /* ready once the store is */
    self->auth_gate = kh_refusal_gate_new(KH_REFUSAL_REPEAT_MS, KH_REFUSAL_RATE,
                                          KH_REFUSAL_BURST, KH_REFUSAL_LOG_MS);
    self->throttle_logged = kh_throttle_new(10000, 10000);
    if (config->partner_rate > 0)
        self->ratelimit =
            kh_ratelimit_new(config->partner_rate,
                             config->partner_burst > 0 ? config->partner_burst
                                                       : config->partner_rate,
                             10000);
    if (config->partner_refusals > 0)
        self->refusals = kh_ratelimit_new(
            config->partner_refusals, 10.0 * config->partner_refusals, 10000);
    self->unknown_keys = kh_throttle_new(S_UNKNOWN_KEY_RELOAD_MS, 1000);
    bool allocated = self->store && self->auth_gate && self->unknown_keys &&
                     self->throttle_logged &&
                     (config->partner_rate <= 0 || self->ratelimit) &&
                     (config->partner_refusals <= 0 || self->refusals);
    for (int i = 0; i < 2; i++) {
        s_batch_t *batch = &self->batches[i];
        batch->requests = calloc(config->batch_max, sizeof *batch->requests);
        batch->subs = calloc(config->batch_max, sizeof *batch->subs);
        batch->refs =
            calloc(config->batch_max + S_AUTH_PENDING, sizeof *batch->refs);
        batch->reps = calloc(config->batch_max, sizeof *batch->reps);
        batch->conflicts = calloc(config->batch_max, sizeof *batch->conflicts);
        batch->keys = zhashx_new();
        batch->arena = kh_jarena_new(S_ARENA_KEEP);
        allocated = allocated && batch->requests && batch->subs &&
                    batch->refs && batch->reps && batch->conflicts &&
                    batch->keys && batch->arena;
    }
    if (!allocated) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        goto fail;
    }
    self->filling = &self->batches[0];
    self->db_fd = -1;
    return self;
fail:
    intake_destroy(&self);
    return NULL;
}

void intake_destroy(intake_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    intake_t *self = *self_p;
    zloop_destroy(&self->loop);
    kh_peers_destroy(&self->peers);
    zsock_destroy(&self->router);
    zsock_destroy(&self->routing);
    kh_zap_destroy(&self->zap);
    kh_refusal_gate_destroy(&self->auth_gate);
    kh_throttle_destroy(&self->throttle_logged);
    kh_ratelimit_destroy(&self->ratelimit);
    kh_ratelimit_destroy(&self->refusals);
    kh_throttle_destroy(&self->unknown_keys);
    zcert_destroy(&self->cert);
    kh_schema_destroy(&self->schema);
    store_destroy(&self->store);
    zhashx_destroy(&self->partners);
    for (int i = 0; i < 2; i++) {
        s_batch_t *batch = &self->batches[i];
        for (size_t r = 0; batch->requests && r < batch->count; r++) {
            zframe_destroy(&batch->requests[r].identity);
            free(batch->requests[r].canonical);
        }
        kh_jarena_destroy(&batch->arena);
        zhashx_destroy(&self->batches[i].keys);
        free(self->batches[i].requests);
        free(self->batches[i].subs);
        free(self->batches[i].refs);
        free(self->batches[i].reps);
        free(self->batches[i].conflicts);
    }
    free(self);
    *self_p = NULL;
}

int intake_port(const intake_t *self)
{
    return self->port;
}

/* What a handler of the loop returns: -1 ends the loop. A stop asked
 * while the handler waited for a read (s_stop_asked) took the signal
 * that would have ended it. */
static int s_go_on(const intake_t *self)
{
    return self->stopping ? -1 : 0;
}

/* Whether a stop is asked, for the store while it waits for a read (see
 * store_watch_stop): takes the signals as s_on_signal does. */
static bool s_stop_asked(void *arg)
{
    intake_t *self = arg;
    kh_signals_take(self->signal_fd, &self->stopping, NULL);
    return self->stopping;
}

static int s_reconnect(zloop_t *loop, int timer_id, void *arg);

/* Look again after ms at an attempt to (re)connect, or make the next. */
static void s_reconnect_in(intake_t *self, int ms)
{
    if (self->reconnect_timer)
        return;
    self->reconnect_timer =
        zloop_timer(self->loop, (size_t) ms, 1, s_reconnect, self);
    if (self->reconnect_timer == -1)
        self->reconnect_timer = 0;
}

/* Note that the database went away and arrange to reconnect. */
static void s_schedule_reconnect(intake_t *self)
{
    kh_health_connected(false);
    s_reconnect_in(self, self->backoff_ms);
}

/* After a failure of the store: reconnect when a connection was lost or
 * closed on the way (a read that timed out). A statement that failed with
 * "try again" (a deadlock, a serialization failure, a lock timeout) is
 * answered unavailable, and the connections, which are fine, stay: the
 * store closes only a connection that is lost. */
static void s_db_failed(intake_t *self)
{
    if (!store_up(self->store))
        s_schedule_reconnect(self);
}

/* Re-read the partner registry; keeps the old one on failure. A read that
 * timed out closed the reader: reconnect now, not when the next SUBMIT
 * finds the store down and is refused for it. */
static void s_load_partners(intake_t *self)
{
    kh_error_t err;
    int64_t ends_in = -1;
    int64_t asked = zclock_mono(); /* the end counts from before the read */
    zhashx_t *partners = store_partners(self->store, &ends_in, &err);
    self->partners_read = partners != NULL;
    if (!partners) {
        /* Each key may try a read a second: one line every 10 s. */
        if (zclock_mono() - self->unread_told >= 10000) {
            kh_log_warn("partners_unread", "code=%s stale=%s",
                        kh_error_name(err.code),
                        self->partners_stale ? "true" : "false");
            self->unread_told = zclock_mono();
        }
        s_db_failed(self);
        return;
    }
    zhashx_destroy(&self->partners);
    self->partners = partners;
    self->partners_stale = false;
    self->partners_end = ends_in < 0 ? 0 : asked + ends_in;
    kh_health_connected(store_up(self->store));
}

/* Re-read the registry now if it changed since it was read: before a
 * request is taken, so that a partner revoked, or a key ended, is refused
 * from the first request read after the change's notice came, or after
 * a rotation's overlap ended (which no change tells). */
static void s_follow_registry(intake_t *self)
{
    if (store_registry_changed(self->store) ||
        (!self->partners_stale && self->partners_end &&
         zclock_mono() >= self->partners_end)) {
        self->partners_stale = true;
        s_load_partners(self);
        if (!self->partners_stale)
            kh_log_info("partners_changed", "partners=%zu",
                        zhashx_size(self->partners));
    }
}

static int s_reconnect(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    self->reconnect_timer = 0;
    if (self->committing) { /* reconnecting would drop it: later */
        s_schedule_reconnect(self);
        return s_go_on(self);
    }
    kh_error_t err;
    if (store_connect(self->store, &err) == 0) {
        /* What the registry told while the reader was away is lost. */
        self->partners_stale = self->partners != NULL;
        s_load_partners(self);
        /* Ready with a registry to admit partners by (s_load_partners
         * tells it once one is read). */
        kh_health_connected(store_up(self->store) && self->partners);
        kh_log_info("db_connected", "partners=%zu",
                    self->partners ? zhashx_size(self->partners) : 0);
        if (!self->ready_logged) {
            kh_log_info("ready", "endpoint=%s port=%d", self->cfg.endpoint,
                        self->port);
            self->ready_logged = true;
        }
        self->backoff_ms = S_BACKOFF_MIN_MS;
        return s_go_on(self);
    }
    if (store_connecting(self->store)) { /* answering meanwhile */
        s_reconnect_in(self, KH_DB_CONNECT_POLL_MS);
        return s_go_on(self);
    }
    self->backoff_ms = kh_db_retry_next(self->backoff_ms);
    kh_log_warn("db_connect_failed", "code=%s path=%s retry_ms=%d msg=\"%s\"",
                kh_error_name(err.code), err.path[0] ? err.path : "none",
                self->backoff_ms, KH_LOG_Q(err.message));
    s_schedule_reconnect(self);
    return s_go_on(self);
}

static int s_refresh_partners(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    if (store_up(self->store))
        s_load_partners(self);
    return s_go_on(self);
}

/* The id of the partner that key admits in the registry as last read
 * (none while it is stale), or NULL. */
static const char *s_admitted(const intake_t *self, const char *key)
{
    return self->partners && !self->partners_stale
               ? zhashx_lookup(self->partners, key)
               : NULL;
}

/* The partner id for an authenticated key, or NULL. An unknown key
 * reloads the registry (at most once a second per key), so a partner added
 * while intake runs is recognised at its first request; so does every key
 * while a change to the registry could not be read yet. Only keys that
 * passed the handshake, i.e. are in the partner directory, get this far.
 * *unsure is set when NULL may be wrong: the registry could not be read
 * (never yet, not now, or not since it changed), and the key may be a
 * partner's added since, or one that is still admitted. */
static const char *s_partner_of(intake_t *self, const char *key, bool *unsure)
{
    const char *id = s_admitted(self, key);
    if (!id && store_up(self->store) &&
        kh_throttle_pass(self->unknown_keys, key, zclock_mono())) {
        s_load_partners(self);
        id = s_admitted(self, key);
    }
    *unsure = !id && (!self->partners || !self->partners_read ||
                      self->partners_stale || !store_up(self->store));
    return id;
}

/* The refusal of a request while the registry is not read (yet, or
 * again since it changed): retryable. */
static void s_registry_unread(kh_error_t *err)
{
    kh_error_set(err, KH_E_UNAVAILABLE, "",
                 "the partner registry cannot be read now; send the same "
                 "request again (a SUBMIT with the same idempotency key)");
}

/* A request from peer whose key, the database found, no longer admits
 * partner (revoked, or past its rotation's overlap, by a change whose
 * notice has not come yet): it is refused as while the registry is
 * stale (s_registry_unread), which it is: read again at the next request
 * (s_partner_of), the registry refuses the key for good (unknown_partner,
 * audited) or admits it again. */
static void s_unadmitted(intake_t *self, const char *partner, const char *peer)
{
    kh_log_warn("request_refused", "partner=%s peer=%s reason=key_not_admitted",
                partner, peer);
    self->partners_stale = true;
}

static void s_refuse(s_request_t *req, const kh_error_t *err)
{
    req->refused = true;
    req->err = *err;
}

/* Refuse req as throttled when its actor is over a rate. Over its rate, a
 * partner's SUBMIT costs nothing more: no schema check, no database work,
 * no audit event (a flood must not flood the trail); the log says so now
 * and then. So does any request but a PING of a partner (or a key the
 * registry does not admit) whose refusals (each an audit event: malformed
 * requests, rejected referrals, STATUS of referrals not its own) went over
 * their rate, whatever it would have been refused for. A PING is answered
 * all the same (a health probe), unless it is refused itself: that is one
 * more refusal for the trail. */
static void s_check_rates(intake_t *self, s_request_t *req)
{
    kh_error_t err;
    int64_t wait = 0;
    const char *over = NULL;
    if (self->refusals && (req->cmd != KH_CMD_PING || req->refused) &&
        (wait = kh_ratelimit_wait(self->refusals, req->actor, zclock_usecs())) >
            0) {
        over = "refusals";
        kh_error_set(&err, KH_E_THROTTLED, "",
                     "this partner's requests were refused too often; resend "
                     "after retry_after_ms");
    } else if (!req->refused && req->cmd == KH_CMD_SUBMIT && self->ratelimit &&
               (wait = kh_ratelimit_take(self->ratelimit, req->partner,
                                         zclock_usecs())) > 0) {
        over = "rate";
        kh_error_set(&err, KH_E_THROTTLED, "",
                     "this partner sends faster than its rate; resend "
                     "after retry_after_ms with the same idempotency key");
    }
    if (over) {
        s_refuse(req, &err);
        req->retry_after_ms = wait > INT32_MAX ? INT32_MAX : (int) wait;
        self->stats.throttled++;
        if (kh_throttle_pass(self->throttle_logged, req->actor, zclock_mono()))
            kh_log_warn("throttled", "actor=%s peer=%s over=%s rate=%d/s",
                        req->actor, req->peer, over,
                        strcmp(over, "rate") == 0 ? self->cfg.partner_rate
                                                  : self->cfg.partner_refusals);
    }
}

/* Refuse req as throttled: its partner has its most connections counted
 * and req came on one more (its handshake got through before they were).
 * Not audited, as no throttled request is. Returns -1 with err set. */
static int s_over_connections(intake_t *self, s_request_t *req, kh_error_t *err)
{
    req->retry_after_ms = S_CONNECTIONS_RETRY_MS;
    self->stats.throttled++;
    if (kh_throttle_pass(self->throttle_logged, req->actor, zclock_mono()))
        kh_log_warn("throttled", "actor=%s peer=%s over=connections max=%zu",
                    req->actor, req->peer, kh_peers_max(self->peers));
    return kh_error_set(err, KH_E_THROTTLED, "",
                        "this partner has %zu connections to intake open "
                        "already; send on one of them, or close one",
                        kh_peers_max(self->peers));
}

/* Refuse a SUBMIT whose referral breaks the schema. */
static void s_check_referral(const intake_t *self, s_request_t *req)
{
    kh_error_t err;
    const json_t *referral = json_object_get(req->msg, "referral");
    if (kh_schema_validate(self->schema, referral, &err)) {
        /* Paths in replies start at the envelope's root. */
        char path[KH_ERROR_PATH_MAX + 16];
        int len = snprintf(path, sizeof path, "referral%s%s",
                           *err.path ? "." : "", err.path);
        if (len >= KH_ERROR_PATH_MAX)
            len = KH_ERROR_PATH_MAX - 1;
        memcpy(err.path, path, (size_t) len);
        err.path[len] = '\0';
        s_refuse(req, &err);
    }
}

/* Read a STATUS's reply into arena, or refuse it. A STATUS is read at
 * receipt, so that a refusal (not_found: another partner's referral, or
 * none) goes into the trail with this batch, before it is answered, as
 * every refusal does. */
static void s_read_status(intake_t *self, kh_jarena_t *arena, s_request_t *req)
{
    kh_error_t err;
    kh_jarena_t *was = kh_jarena_enter(arena);
    json_t *reply = kh_proto_new(KH_CMD_STATUS_REPLY, req->cid);
    const char *id =
        json_string_value(json_object_get(req->msg, "referral_id"));
    if (!reply)
        kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
    bool admitted = true;
    if (!reply || store_status(self->store, req->partner, req->key, id,
                               &admitted, reply, &err)) {
        json_decref(reply);
        if (!admitted) {
            s_unadmitted(self, req->partner, req->peer);
            s_registry_unread(&err);
        }
        s_refuse(req, &err);
        s_db_failed(self);
    } else
        req->status = reply;
    kh_jarena_enter(was);
}

/* Receive one request and check everything that needs no database; its
 * envelope is decoded into arena. body is its first frame, extra tells
 * that more followed; identity goes to req. */
static void s_take(intake_t *self, kh_jarena_t *arena, s_request_t *req,
                   zframe_t *identity, zmq_msg_t *body, bool extra)
{
    memset(req, 0, sizeof *req);
    req->sub = -1;
    req->leader = -1;
    req->cmd = KH_CMD_UNKNOWN_;
    req->identity = identity;
    req->fd = zmq_msg_get(body, ZMQ_SRCFD);
    kh_error_t err;
    kh_error_clear(&err);

    req->size = zmq_msg_size(body);
    const char *key = zmq_msg_gets(body, "User-Id");
    const char *peer = zmq_msg_gets(body, "Peer-Address");
    snprintf(req->peer, sizeof req->peer, "%s", peer ? peer : "");
    snprintf(req->key, sizeof req->key, "%s", key ? key : "");
    bool unsure = false;
    const char *partner = key ? s_partner_of(self, key, &unsure) : NULL;
    if (partner) {
        snprintf(req->partner, sizeof req->partner, "%s", partner);
        snprintf(req->actor, sizeof req->actor, "%s", partner);
    } else
        snprintf(req->actor, sizeof req->actor, "key:%s", key ? key : "none");

    /* A DEALER's own routing id comes in its handshake as the Identity
     * property, "" when it set none. The hub names each connection
     * itself, so that an answer committed after its connection went can
     * never reach another one that took the id (as on the delivery
     * socket, notify.c). */
    const char *chosen = zmq_msg_gets(body, "Identity");
    int rc = 0;
    bool decoded = false; /* the body went to the decoder */
    if (!partner) {
        /* Who sends comes first: a key no active partner holds is told
         * so whatever its frame holds, and the trail records the refused
         * key as such, not as a malformed request. While the registry
         * cannot be read (the database is not up yet, or away) no key
         * can be told it is unknown: that answer is final for a partner,
         * and the key may be that of a partner added since the registry
         * was read last. */
        if (unsure)
            s_registry_unread(&err);
        else
            kh_error_set(&err, KH_E_UNKNOWN_PARTNER, "",
                         "this key belongs to no active partner");
        rc = -1;
    } else if (extra)
        rc = kh_error_set(&err, KH_E_BAD_ENVELOPE, "",
                          "a request is exactly one frame");
    else if (chosen && *chosen)
        rc = kh_error_set(&err, KH_E_BAD_ENVELOPE, "",
                          "the connection set its own routing id; a "
                          "partner's connection must leave it to the hub");
    else if (!kh_peers_take(self->peers, req->fd, zframe_data(identity),
                            zframe_size(identity), partner))
        rc = s_over_connections(self, req, &err);
    else {
        decoded = true;
        kh_jarena_t *was = kh_jarena_enter(arena);
        rc = kh_msgpack_decode(zmq_msg_data(body), zmq_msg_size(body),
                               &self->cfg.limits, &req->msg, &err);
        kh_jarena_enter(was);
    }
    if (rc) {
        /* The refusal still answers the request's cid where the frame
         * holds one: a partner matches replies by it (protocol.md). */
        kh_msgpack_peek_str(zmq_msg_data(body), zmq_msg_size(body), "cid",
                            req->cid, sizeof req->cid);
        /* v is checked before anything else. */
        if (decoded)
            kh_proto_other_version(zmq_msg_data(body), zmq_msg_size(body),
                                   &err);
        s_refuse(req, &err);
    } else {
        const char *cid = NULL;
        rc = kh_proto_check(req->msg, &req->cmd, &cid, &err);
        snprintf(req->cid, sizeof req->cid, "%s", cid ? cid : "");
        /* A command of another socket is refused as such even when its
         * fields are wrong too: naming a field of it would send the
         * partner to fix a request that intake never takes. */
        if (req->cmd != KH_CMD_UNKNOWN_ && req->cmd != KH_CMD_SUBMIT &&
            req->cmd != KH_CMD_STATUS && req->cmd != KH_CMD_PING)
            rc = kh_error_set(&err, KH_E_UNKNOWN_COMMAND, "cmd",
                              "%s is not a request for intake, which "
                              "takes SUBMIT, STATUS and PING",
                              kh_cmd_name(req->cmd));
        if (rc)
            s_refuse(req, &err);
    }
    s_check_rates(self, req);
    if (!req->refused && req->cmd == KH_CMD_SUBMIT)
        s_check_referral(self, req);
    if (!req->refused && req->cmd == KH_CMD_STATUS)
        s_read_status(self, arena, req);
}

/* Place a valid SUBMIT in the batch, or make it follow an earlier request
 * of this batch with the same partner, idempotency key and CURVE key. A
 * follower whose referral differs from its leader's is most likely an
 * idempotency conflict, an audit event, which only the commit can tell:
 * it takes a refusal token now (s_audit_conflicts keeps it or gives it
 * back), so that a partner pipelining one key with other referrals is
 * throttled at receipt like any partner refused too often, rather than
 * writing a conflict event for each of a batch. */
static void s_batch_submit(intake_t *self, s_batch_t *batch, s_request_t *req)
{
    const char *idem =
        json_string_value(json_object_get(req->msg, "idempotency_key"));
    char batch_key[KH_IDEM_KEY_MAX + 80];
    snprintf(batch_key, sizeof batch_key, "%s\n%s", req->partner, idem);
    intptr_t leader = (intptr_t) zhashx_lookup(batch->keys, batch_key);
    if (leader && strcmp(batch->requests[leader - 1].key, req->key) != 0) {
        /* The same idempotency key on another CURVE key of the partner
         * (a rotation's overlap): the first's answer may not hold for
         * this key, which the batch's statement checks on its own. Sent
         * again, it goes in a batch of its own. */
        kh_error_t err;
        kh_error_set(&err, KH_E_UNAVAILABLE, "",
                     "a request with this idempotency key is being "
                     "committed on another key of yours; send the same "
                     "request again");
        s_refuse(req, &err);
        return;
    }
    if (leader) {
        req->leader = (int) leader - 1;
        if (kh_payload_hash(json_object_get(req->msg, "referral"), req->hash)) {
            kh_error_t err;
            kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
            s_refuse(req, &err);
            return;
        }
        const store_submit_t *first =
            &batch->subs[batch->requests[req->leader].sub];
        batch->reps[batch->nreps++] =
            (store_repeat_t){.sub = (size_t) batch->requests[req->leader].sub,
                             .hash = req->hash,
                             .peer = req->peer};
        if (self->refusals && strcmp(req->hash, first->hash) != 0) {
            kh_ratelimit_charge(self->refusals, req->actor, zclock_usecs());
            req->charged = true;
        }
        return;
    }
    store_submit_t *sub = &batch->subs[batch->nsubs];
    memset(sub, 0, sizeof *sub);
    sub->partner_id = req->partner;
    sub->key = req->key;
    sub->idem_key = idem;
    sub->referral = json_object_get(req->msg, "referral");
    sub->peer = req->peer;
    req->canonical = kh_payload_canonical(sub->referral, &sub->payload_len);
    if (!req->canonical) {
        kh_error_t err;
        kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
        s_refuse(req, &err);
        return;
    }
    sub->payload = req->canonical;
    kh_sha256_hex(sub->payload, sub->payload_len, sub->hash);
    kh_uuid_new(sub->referral_id);
    zhashx_insert(batch->keys, batch_key,
                  (void *) (intptr_t) (req - batch->requests + 1));
    req->sub = (int) batch->nsubs++;
}

/* Queue req's refusal for the trail, with only the contract's names in
 * its path (the reply has the partner's own). */
static void s_batch_refusal(intake_t *self, s_batch_t *batch, s_request_t *req)
{
    kh_proto_trail_path(req->err.code, req->err.path, self->schema,
                        req->trail_path, sizeof req->trail_path);
    store_refusal_t *ref = &batch->refs[batch->nrefs++];
    req->in_trail = true;
    ref->action = !*req->partner ? "auth.refused"
                  : (req->cmd == KH_CMD_SUBMIT || req->cmd == KH_CMD_UNKNOWN_)
                      ? "referral.rejected"
                      : "request.rejected";
    /* A STATUS refused as not_found is answered only once the trail holds
     * it (protocol.md): someone asking for others' referrals is seen. */
    req->audit_first =
        req->cmd == KH_CMD_STATUS && req->err.code == KH_E_NOT_FOUND;
    /* Counted against the actor's refusals (its partner, or its key
     * when the registry does not admit it) as it is queued: the rate
     * bounds what one key can write into the trail. */
    if (self->refusals)
        kh_ratelimit_charge(self->refusals, req->actor, zclock_usecs());
    ref->actor_id = req->actor;
    ref->code = kh_error_name(req->err.code);
    /* A key refused has no field at fault: no path, as notification
     * records it. */
    ref->path = *req->partner ? req->trail_path : NULL;
    ref->peer = req->peer;
}

/* The reply to a SUBMIT whose batch committed. */
static json_t *s_accepted(const s_request_t *req, const store_submit_t *sub,
                          bool duplicate)
{
    json_t *reply = kh_proto_new(KH_CMD_ACCEPTED, req->cid);
    json_object_set_new(reply, "referral_id", json_string(sub->stored_id));
    json_object_set_new(reply, "accepted_at", json_string(sub->accepted_at));
    json_object_set_new(reply, "duplicate", json_boolean(duplicate));
    return reply;
}

static json_t *s_conflict(const s_request_t *req)
{
    kh_error_t err;
    kh_error_set(&err, KH_E_IDEMPOTENCY_CONFLICT, "idempotency_key",
                 "this idempotency key was already used for another "
                 "referral");
    return kh_proto_rejected(req->cid, &err, 0);
}

static void s_send(intake_t *self, s_request_t *req, json_t *reply)
{
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    if (!reply || kh_msgpack_encode(reply, &data, &size, &err)) {
        kh_log_error("reply_failed", "cid_len=%zu", strlen(req->cid));
        json_decref(reply);
        return;
    }
    json_decref(reply);
    /* A reply waits for no one: one that finds its partner's queue full
     * is dropped (EAGAIN), as one that finds its connection gone
     * (EHOSTUNREACH, ZMQ_ROUTER_MANDATORY), which is then not counted
     * among its partner's (a request read after its connection closed
     * may have been counted for the one that took its descriptor). */
    zframe_t *body = zframe_new(data, size);
    free(data);
    if (zframe_send(&req->identity, self->router,
                    ZFRAME_MORE | ZFRAME_DONTWAIT) == 0)
        zframe_send(&body, self->router, ZFRAME_DONTWAIT);
    else if (zmq_errno() == EHOSTUNREACH)
        kh_peers_gone(self->peers, zframe_data(req->identity),
                      zframe_size(req->identity));
    zframe_destroy(&body);
    zframe_destroy(&req->identity);
}

/* Count an answer for the stats line; log a refusal (its code and its
 * path as the trail has it: never a referral's values, nor a name the
 * partner chose). */
static void s_count_reply(intake_t *self, const s_request_t *req,
                          const json_t *reply)
{
    const char *cmd = json_string_value(json_object_get(reply, "cmd"));
    if (req->cmd == KH_CMD_SUBMIT)
        kh_metric_add("referrals_received_total", NULL, 1);
    if (!cmd || strcmp(cmd, "REJECTED") != 0) {
        if (cmd && strcmp(cmd, "ACCEPTED") == 0) {
            bool dup = json_is_true(json_object_get(reply, "duplicate"));
            self->stats.accepted += dup ? 0 : 1;
            self->stats.duplicates += dup ? 1 : 0;
            kh_metric_add(dup ? "referrals_duplicate_total"
                              : "referrals_accepted_total",
                          NULL, 1);
        }
        return;
    }
    kh_metric_add("requests_refused_total",
                  json_string_value(json_object_get(reply, "code")), 1);
    bool retryable = json_is_true(json_object_get(reply, "retryable"));
    if (req->err.code == KH_E_THROTTLED)
        ; /* counted apart when it was refused */
    else if (retryable)
        self->stats.failed++;
    else
        self->stats.refused++;
    if (!kh_log_enabled(KH_LOG_DEBUG))
        return;
    const char *code = json_string_value(json_object_get(reply, "code"));
    int known = code ? kh_error_from_name(code) : -1;
    char path[KH_ERROR_PATH_MAX];
    kh_proto_trail_path(known < 0 ? KH_E_INTERNAL : (kh_errcode_t) known,
                        json_string_value(json_object_get(reply, "path")),
                        self->schema, path, sizeof path);
    kh_log_debug("refused", "actor=%s code=%s path=%s retryable=%d", req->actor,
                 code ? code : "none", path, retryable);
}

/* The reply to one SUBMIT of a batch that was committed (commit_err NULL)
 * or failed. */
static json_t *s_submit_reply(intake_t *self, const s_batch_t *batch,
                              const s_request_t *req,
                              const kh_error_t *commit_err)
{
    const s_request_t *owner =
        req->leader >= 0 ? &batch->requests[req->leader] : req;
    if (commit_err)
        return kh_proto_rejected(req->cid, commit_err, self->backoff_ms);
    if (owner->refused)
        return kh_proto_rejected(req->cid, &owner->err, 0);
    if (req->unaudited)
        return kh_proto_rejected(req->cid, &req->err, self->backoff_ms);
    const store_submit_t *sub = &batch->subs[owner->sub];
    if (!sub->admitted) {
        kh_error_t unread;
        s_registry_unread(&unread);
        return kh_proto_rejected(req->cid, &unread, self->backoff_ms);
    }
    /* The first answer for the key, whichever submission gave it; new
     * only for the submission whose row it is. */
    if (strcmp(req->leader >= 0 ? req->hash : sub->hash, sub->stored_hash))
        return s_conflict(req);
    return s_accepted(req, sub, !(sub->inserted && req->leader < 0));
}

/* The submissions of a committed batch whose key no longer admitted
 * their partner: the batch's statement took nothing of them (s_unadmitted
 * tells the rest). */
static void s_follow_unadmitted(intake_t *self, const s_batch_t *batch)
{
    for (size_t i = 0; i < batch->nsubs; i++)
        if (!batch->subs[i].admitted)
            s_unadmitted(self, batch->subs[i].partner_id, batch->subs[i].peer);
}

/* Give back the refusal token req took ahead (s_batch_submit), if it
 * did: it wrote no refusal. */
static void s_uncharge(intake_t *self, s_request_t *req)
{
    if (!req->charged)
        return;
    kh_ratelimit_refund(self->refusals, req->actor, zclock_usecs());
    req->charged = false;
}

/*
 * Write the idempotency conflicts of a committed batch that its statement
 * could not see, before they are answered: those with a key another
 * intake process committed while the statement ran (its snapshot did not
 * hold that row; the look-up after it did), of the submission and of its
 * repeats within the batch. The batch's statement writes the others (its
 * repeats are passed to it with the submissions, so that the common case
 * costs no read that blocks intake), so every idempotency_conflict answer has
 * exactly one event, and is given only once that event is committed (as
 * ACCEPTED is only once its referral is: promise 1). If it cannot be
 * written, those submissions get a retryable refusal instead: the same
 * key again finds the conflict in a later batch's statement, which writes
 * it. (A write that timed out may still have committed, as a batch whose
 * commit stalled may have: then the conflict is in the trail twice, once
 * for the answer that said unavailable. So it is when a batch committed
 * but a look-up after it failed: every submission of the batch is told to
 * send again, those whose conflict its statement wrote too.) Which
 * conflicts the statement writes is its conflicts CTE's condition
 * (store_sql.h): this one's complement, for rows it could see.
 */
static void s_audit_conflicts(intake_t *self, s_batch_t *batch)
{
    size_t n = 0;
    for (size_t i = 0; i < batch->count; i++) {
        s_request_t *req = &batch->requests[i];
        if (req->cmd != KH_CMD_SUBMIT)
            continue;
        const s_request_t *owner =
            req->leader >= 0 ? &batch->requests[req->leader] : req;
        if (req->refused || owner->refused) {
            s_uncharge(self, req); /* refused since, unaudited */
            continue;
        }
        const store_submit_t *sub = &batch->subs[owner->sub];
        const char *hash = req->leader >= 0 ? req->hash : sub->hash;
        if (!sub->admitted || strcmp(hash, sub->stored_hash) == 0) {
            s_uncharge(self, req); /* nothing stored for it, or no conflict */
            continue;
        }
        /* Each conflict is a refusal in the trail, whoever writes it. */
        if (self->refusals && !req->charged)
            kh_ratelimit_charge(self->refusals, req->partner, zclock_usecs());
        if (!sub->late)
            continue; /* the statement wrote it */
        store_conflict_t *conflict = &batch->conflicts[n++];
        conflict->partner_id = req->partner;
        conflict->hash = hash;
        conflict->peer = req->peer;
        req->unaudited = true; /* until it is written */
    }
    if (n == 0)
        return;
    kh_error_t err;
    if (store_audit_conflicts(self->store, batch->conflicts, n, &err) == 0) {
        for (size_t i = 0; i < batch->count; i++)
            batch->requests[i].unaudited = false;
        return;
    }
    kh_log_warn("conflicts_unaudited", "count=%zu code=%s", n,
                kh_error_name(err.code));
    /* The store's errors are all retryable: resend with the same key. */
    for (size_t i = 0; i < batch->count; i++)
        if (batch->requests[i].unaudited)
            batch->requests[i].err = err;
    s_db_failed(self);
}

/* Answer every request of the batch and empty it. */
static void s_batch_reply(intake_t *self, s_batch_t *batch,
                          const kh_error_t *commit_err)
{
    /* How long its commit took, before the replies add their time. */
    double commit_ms = batch->sent_at
                           ? (double) (zclock_usecs() - batch->sent_at) / 1000.0
                           : 0.0;
    /* The replies are made in the batch's arena too, and forgotten with
     * the requests. */
    kh_jarena_t *was = kh_jarena_enter(batch->arena);
    for (size_t i = 0; i < batch->count; i++) {
        s_request_t *req = &batch->requests[i];
        json_t *reply = NULL;
        /* A refusal is final only with its event in the trail: when its
         * batch did not commit, the partner is told to send again (the
         * batch's retryable error), and the refusal comes again with its
         * event. A batch that committed but whose answers could not all
         * be read holds the events: its refusals are answered as they are
         * (sent again, each would be a second event). An event refused
         * itself (refs_dropped) would be refused again: the refusal is
         * answered as it is, unless it promises its event first. */
        const kh_error_t *unaudited =
            !req->in_trail                            ? NULL
            : commit_err && !batch->committed         ? commit_err
            : req->audit_first && batch->refs_dropped ? &batch->refs_err
                                                      : NULL;
        if (unaudited) /* its event did not commit: resend */
            reply = kh_proto_rejected(req->cid, unaudited, self->backoff_ms);
        else if (req->refused)
            reply = kh_proto_rejected(req->cid, &req->err,
                                      req->retry_after_ms ? req->retry_after_ms
                                                          : self->backoff_ms);
        else if (req->cmd == KH_CMD_SUBMIT)
            reply = s_submit_reply(self, batch, req, commit_err);
        else if (req->cmd == KH_CMD_STATUS) {
            reply = req->status;
            req->status = NULL;
        } else
            reply = kh_proto_new(KH_CMD_PONG, req->cid);
        s_count_reply(self, req, reply);
        s_send(self, req, reply);
        zframe_destroy(&req->identity);
        req->msg = NULL;
        free(req->canonical);
        req->canonical = NULL;
    }
    kh_jarena_enter(was);
    kh_jarena_reset(batch->arena);
    if (batch->sent_at) {
        self->stats.batches++;
        kh_metric_observe("intake_commit_seconds", NULL, commit_ms / 1000.0);
        self->stats.commit_ms_total += commit_ms;
        if (commit_ms > self->stats.commit_ms_max)
            self->stats.commit_ms_max = commit_ms;
    }
    /* submissions: the distinct keys committed (new, repeated or in
     * conflict); refusals: the refusal events among them. */
    if (batch->count)
        kh_log_debug("batch",
                     "requests=%zu submissions=%zu refusals=%zu "
                     "commit_ms=%.3f outcome=%s",
                     batch->count, batch->nsubs, batch->nrefs, commit_ms,
                     commit_err ? kh_error_name(commit_err->code) : "ok");
    batch->count = batch->nsubs = batch->nreps = batch->nrefs = 0;
    batch->bytes = 0;
    batch->sent_at = 0;
    batch->refs_dropped = batch->committed = false;
    zhashx_purge(batch->keys);
}

static int s_on_router(zloop_t *loop, zsock_t *router, void *arg);
static int s_on_db(zloop_t *loop, zmq_pollitem_t *item, void *arg);

/* Read the ROUTER only while the filling batch has room. */
static void s_set_reading(intake_t *self, bool reading)
{
    if (reading == self->reading)
        return;
    if (reading)
        zloop_reader(self->loop, self->router, s_on_router, self);
    else
        zloop_reader_end(self->loop, self->router);
    self->reading = reading;
}

/* Poll the writer's socket while a commit is in flight (the socket
 * changes with every reconnection, and may be closed between): for
 * writing too while the batch is still being sent. */
static void s_watch_db(intake_t *self, bool watch)
{
    if (self->db_fd >= 0) {
        zmq_pollitem_t old = {NULL, self->db_fd, ZMQ_POLLIN, 0};
        zloop_poller_end(self->loop, &old);
        self->db_fd = -1;
    }
    int fd = watch ? store_socket(self->store) : -1;
    if (fd >= 0) {
        self->db_sending = store_sending(self->store);
        zmq_pollitem_t item = {
            NULL, fd, ZMQ_POLLIN | (self->db_sending ? ZMQ_POLLOUT : 0), 0};
        if (zloop_poller(self->loop, &item, s_on_db, self) == 0) {
            /* An error on the socket must reach s_on_db, not unlist it. */
            zloop_poller_set_tolerant(self->loop, &item);
            self->db_fd = fd;
        }
    }
}

/* Start committing batch. 0, or -1 with err (nothing was sent). */
static int s_commit_start(intake_t *self, s_batch_t *batch, kh_error_t *err)
{
    if (store_commit_send(self->store, batch->subs, batch->nsubs, batch->reps,
                          batch->nreps, batch->refs, batch->nrefs, err))
        return -1;
    batch->sent_at = zclock_usecs();
    self->committing = batch;
    s_watch_db(self, true);
    return 0;
}

/* Send the filling batch to PostgreSQL if nothing is being committed; a
 * batch that needs no commit is answered at once. */
static void s_dispatch(intake_t *self)
{
    s_batch_t *batch = self->filling;
    if (self->committing || (batch->count == 0 && self->nauth_pending == 0))
        return;
    /* Refused handshakes go into the trail with this batch. */
    for (size_t i = 0; i < self->nauth_pending; i++) {
        batch->auth[i] = self->auth_pending[i];
        store_refusal_t *ref = &batch->refs[batch->nrefs++];
        ref->action = "auth.refused";
        ref->actor_id = batch->auth[i].actor;
        ref->code = kh_error_name(KH_E_UNKNOWN_PARTNER);
        ref->path = NULL;
        ref->peer = batch->auth[i].peer;
    }
    self->nauth_pending = 0;
    kh_error_t err;
    if (batch->nsubs + batch->nrefs == 0)
        s_batch_reply(self, batch, NULL);
    else if (s_commit_start(self, batch, &err)) {
        if (batch->nrefs)
            kh_log_warn("refusals_unaudited", "count=%zu code=%s", batch->nrefs,
                        kh_error_name(err.code));
        s_batch_reply(self, batch, &err);
        s_db_failed(self);
    } else
        self->filling =
            batch == &self->batches[0] ? &self->batches[1] : &self->batches[0];
    s_set_reading(self, true);
}

/* Send routing a wake-up naming ids (a JSON array, taken); dropped when
 * it cannot be sent at once. */
static void s_send_wakeup(intake_t *self, json_t *ids)
{
    size_t count = json_array_size(ids);
    json_t *msg = json_pack("{s:i, s:s, s:o}", "v", KH_PROTO_VERSION, "cmd",
                            "ROUTE", "referral_ids", ids);
    char *data = NULL;
    size_t size = 0;
    kh_error_t err;
    if (msg && kh_msgpack_encode(msg, &data, &size, &err) == 0) {
        zframe_t *frame = zframe_new(data, size);
        if (zframe_send(&frame, self->routing, ZFRAME_DONTWAIT))
            kh_log_debug("routing_wakeup_dropped", "referrals=%zu", count);
        zframe_destroy(&frame);
    }
    free(data);
    json_decref(msg);
}

/* Tell routing which referrals a batch committed. Only a hint that saves
 * routing a wait: routing finds every accepted referral in PostgreSQL in
 * any case, so a wake-up that cannot be sent at once is dropped. A batch
 * (KH_INTAKE_BATCH up to 4096) may insert more referrals than a message
 * may name (the decoder's limit on an array), so they go in wake-ups of at
 * most that many. */
static void s_wake_routing(intake_t *self, const s_batch_t *batch)
{
    if (!self->routing)
        return;
    size_t limit = kh_limits_default().max_elements;
    json_t *ids = NULL;
    for (size_t i = 0; i < batch->nsubs; i++) {
        if (!batch->subs[i].inserted)
            continue;
        if (!ids && !(ids = json_array()))
            return;
        json_array_append_new(ids, json_string(batch->subs[i].stored_id));
        if (json_array_size(ids) == limit) {
            s_send_wakeup(self, ids);
            ids = NULL;
        }
    }
    if (ids)
        s_send_wakeup(self, ids);
}

/* Whether the database refused a batch's statement for its data (SQLSTATE
 * classes 22 data exception and 23 integrity constraint violation), which
 * rows of its own may have caused. */
static bool s_rows_refused(const kh_error_t *err)
{
    return err->code == KH_E_INTERNAL &&
           (strncmp(err->sqlstate, "22", 2) == 0 ||
            strncmp(err->sqlstate, "23", 2) == 0);
}

/* The commit in flight ended (rc 0) or failed (rc -1, err): answer it,
 * send the next. */
static void s_commit_done(intake_t *self, int rc, const kh_error_t *err)
{
    s_batch_t *batch = self->committing;
    self->committing = NULL;
    s_watch_db(self, false);
    kh_error_t again;
    if (rc == -1 && batch->nrefs)
        kh_log_warn("refusals_unaudited", "count=%zu code=%s", batch->nrefs,
                    kh_error_name(err->code));
    if (rc == -1 && s_rows_refused(err) && batch->nrefs > 0) {
        /* An audit row of a refusal that the database refuses must never
         * cost the others their commit (the refusals are answered anyway,
         * but for those that promise their event first): once more
         * without. Not a batch that committed (STORE_COMMITTED_UNREAD):
         * its rows are in. Any other failure (a statement cancelled, a
         * privilege gone) is no fault of the rows: the refusals are
         * answered retryable with the rest, to come again with their
         * events. */
        batch->nrefs = 0;
        batch->refs_dropped = true;
        batch->refs_err = *err;
        if (batch->nsubs == 0)
            rc = 0;
        else if (s_commit_start(self, batch, &again) == 0)
            return;
        else
            err = &again;
    }
    batch->committed = rc == 0 || rc == STORE_COMMITTED_UNREAD;
    if (batch->committed)
        s_wake_routing(self, batch);
    else /* nothing written: the tokens taken ahead go back */
        for (size_t i = 0; i < batch->count; i++)
            s_uncharge(self, &batch->requests[i]);
    /* Keep PostgreSQL busy with the next batch while this one is
     * answered (the batches swap roles only after this one is empty). */
    s_dispatch(self);
    if (rc == 0) {
        s_follow_unadmitted(self, batch);
        s_audit_conflicts(self, batch);
    }
    s_batch_reply(self, batch, rc ? err : NULL);
    if (rc)
        s_db_failed(self);
}

static int s_on_db(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void) loop;
    (void) item;
    intake_t *self = arg;
    if (!self->committing)
        return s_go_on(self);
    kh_error_t err;
    int rc = store_commit_poll(self->store, self->committing->subs,
                               self->committing->nsubs, &err);
    if (rc != 1)
        s_commit_done(self, rc, &err);
    else if (self->db_sending && !store_sending(self->store))
        s_watch_db(self, true); /* sent: a writable socket means nothing */
    return s_go_on(self);
}

/* Whether batch holds all the requests, or all the memory, it may: its
 * envelopes, and the canonical referrals (about as large as their frames)
 * of the ones it keeps. */
static bool s_batch_full(const intake_t *self, const s_batch_t *batch)
{
    return batch->count >= self->cfg.batch_max ||
           batch->bytes + kh_jarena_used(batch->arena) >= S_BATCH_BYTES;
}

/* Read one request off router: the connection's routing id, the first
 * frame of its body (with the metadata that names its key and socket)
 * and whether more frames followed, which are read and dropped. 0, or -1
 * when none could be read. */
static int s_recv(zsock_t *router, zframe_t **identity, zmq_msg_t *body,
                  bool *extra)
{
    *identity = zframe_recv(router);
    if (!*identity)
        return -1;
    void *handle = zsock_resolve(router);
    zmq_msg_init(body);
    /* A ROUTER puts a body frame behind every routing id, if empty. */
    if (zmq_msg_recv(body, handle, 0) < 0) {
        zmq_msg_close(body);
        zframe_destroy(identity);
        return -1;
    }
    *extra = false;
    for (bool more = zmq_msg_more(body); more;) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        more = zmq_msg_recv(&frame, handle, 0) >= 0 && zmq_msg_more(&frame);
        zmq_msg_close(&frame);
        *extra = true;
    }
    return 0;
}

/* Take the waiting requests into the filling batch; commit it if nothing
 * else is being committed. */
static int s_on_router(zloop_t *loop, zsock_t *router, void *arg)
{
    (void) loop;
    intake_t *self = arg;
    s_batch_t *batch = self->filling;
    while (!s_batch_full(self, batch) && (zsock_events(router) & ZMQ_POLLIN)) {
        zframe_t *identity;
        zmq_msg_t body;
        bool extra;
        if (s_recv(router, &identity, &body, &extra))
            break;
        s_follow_registry(self);
        s_request_t *req = &batch->requests[batch->count++];
        s_take(self, batch->arena, req, identity, &body, extra);
        zmq_msg_close(&body);
        if (!req->refused && req->cmd == KH_CMD_SUBMIT)
            s_batch_submit(self, batch, req);
        if (!req->refused)
            batch->bytes += req->size;
        /* Neither a throttled request nor one refused because the
         * database is away is audited (that could not commit). */
        else if (req->err.code != KH_E_THROTTLED &&
                 req->err.code != KH_E_UNAVAILABLE)
            s_batch_refusal(self, batch, req);
    }
    if (self->committing && s_batch_full(self, batch))
        s_set_reading(self, false);
    s_dispatch(self);
    return s_go_on(self);
}

/* A commit that hangs (PostgreSQL stopped, network gone) is given up: its
 * outcome is unknown, so its partners get a retryable refusal, and a
 * resubmission with the same key will get the true answer. */
static int s_check_stall(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    if (self->committing && zclock_usecs() - self->committing->sent_at >
                                (int64_t) self->cfg.commit_timeout_ms * 1000) {
        kh_error_t err;
        /* The loop may have been busy rather than the database slow. */
        int rc = store_commit_poll(self->store, self->committing->subs,
                                   self->committing->nsubs, &err);
        if (rc != 1) {
            s_commit_done(self, rc, &err);
            return s_go_on(self);
        }
        kh_log_warn("commit_stalled", "ms=%d", self->cfg.commit_timeout_ms);
        store_abandon(self->store);
        kh_error_set(&err, KH_E_UNAVAILABLE, "",
                     "the hub's database did not answer in time; retry with "
                     "the same idempotency key");
        s_commit_done(self, -1, &err);
    }
    return s_go_on(self);
}

/* Closed connections, read as they come so that none is counted on. */
static int s_on_peers(zloop_t *loop, zsock_t *socket, void *arg)
{
    (void) loop;
    (void) socket;
    intake_t *self = arg;
    kh_peers_drain(self->peers);
    return 0;
}

/* Answer a ZAP request; a refused key is logged and, once a minute per key
 * and peer, audited (a client retrying its handshake must not flood the
 * trail). */
static int s_on_zap(zloop_t *loop, zsock_t *socket, void *arg)
{
    (void) loop;
    (void) socket;
    intake_t *self = arg;
    char key[41], peer[64];
    int rc = kh_zap_handle(self->zap, key, peer);
    if (rc == 0)
        return 0;
    if (rc == 2) { /* a partner with its most connections (peers.h) */
        self->stats.throttled++;
        return 0;
    }
    char seen[128];
    snprintf(seen, sizeof seen, "%s %s", key, peer);
    /* Anyone who can reach the port can make up keys without end, each
     * refused once: past a burst (or with no room left for one more
     * audit), their refusals are only counted, in a line every
     * KH_REFUSAL_LOG_MS, so that no stranger fills the trail, the
     * log or the commits. */
    uint64_t count;
    if (!kh_refusal_gate_pass(self->auth_gate, seen,
                              self->nauth_pending < S_AUTH_PENDING,
                              zclock_usecs(), &count)) {
        if (count)
            kh_log_warn("auth_refusals_unaudited", "count=%" PRIu64, count);
        return 0;
    }
    kh_log_warn("auth_refused", "key=%s peer=%s", *key ? key : "none", peer);
    s_auth_refusal_t *refusal = &self->auth_pending[self->nauth_pending++];
    snprintf(refusal->actor, sizeof refusal->actor, "key:%s",
             *key ? key : "none");
    snprintf(refusal->peer, sizeof refusal->peer, "%s", peer);
    s_dispatch(self);
    return 0;
}

/* The refused handshakes counted but not told yet, once the flood that
 * caused them has stopped (or at once when final, on the way out). */
static void s_tell_unaudited(intake_t *self, bool final)
{
    uint64_t count =
        kh_refusal_gate_flush(self->auth_gate, zclock_usecs(), final);
    if (count)
        kh_log_warn("auth_refusals_unaudited", "count=%" PRIu64, count);
}

/* One line of counts every S_STATS_MS when there was traffic. */
static int s_log_stats(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    s_tell_unaudited(self, false);
    s_stats_t *st = &self->stats;
    if (st->accepted + st->duplicates + st->refused + st->failed +
            st->throttled ==
        0)
        return 0;
    kh_log_info("stats",
                "accepted=%" PRIu64 " duplicates=%" PRIu64 " refused=%" PRIu64
                " unavailable=%" PRIu64 " throttled=%" PRIu64
                " batches=%" PRIu64
                " commit_ms_avg=%.2f commit_ms_max=%.2f db=%s",
                st->accepted, st->duplicates, st->refused, st->failed,
                st->throttled, st->batches,
                st->batches ? st->commit_ms_total / (double) st->batches : 0.0,
                st->commit_ms_max, store_up(self->store) ? "up" : "down");
    memset(st, 0, sizeof *st);
    return 0;
}

static int s_on_signal(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void) loop;
    intake_t *self = arg;
    return kh_signals_take(item->fd, &self->stopping, NULL);
}

/* On the way out: finish the commit in flight, take and commit what has
 * already arrived, answer it all; after S_DRAIN_MS, refuse (retryably)
 * what is still open, so that intake always exits in time. */
static void s_drain(intake_t *self)
{
    int64_t deadline = zclock_mono() + S_DRAIN_MS;
    while (zclock_mono() < deadline) {
        if (self->committing) {
            struct pollfd pfd = {
                store_socket(self->store),
                (short) (POLLIN | (store_sending(self->store) ? POLLOUT : 0)),
                0};
            if (pfd.fd >= 0)
                poll(&pfd, 1, 100);
            s_on_db(self->loop, NULL, self);
        } else if ((zsock_events(self->router) & ZMQ_POLLIN) ||
                   self->filling->count > 0)
            s_on_router(self->loop, self->router, self);
        else
            return;
    }
    kh_error_t err;
    kh_error_set(&err, KH_E_UNAVAILABLE, "",
                 "the hub is stopping; send the same request again (a "
                 "SUBMIT with the same idempotency key)");
    if (self->committing) {
        kh_log_warn("commit_abandoned", "reason=stopping");
        store_abandon(self->store);
        s_commit_done(self, -1, &err); /* fails the next batch too */
    }
    if (self->filling->count)
        s_batch_reply(self, self->filling, &err);
}

int intake_run(intake_t *self, int signal_fd)
{
    self->loop = zloop_new();
    if (!self->loop)
        return -1;
    self->signal_fd = signal_fd;
    store_watch_stop(self->store, signal_fd, s_stop_asked, self);
    s_set_reading(self, true);
    if (kh_peers_guard(self->peers, self->zap, &self->partners) ||
        zloop_reader(self->loop, kh_zap_socket(self->zap), s_on_zap, self) ||
        zloop_reader(self->loop, kh_peers_monitor(self->peers), s_on_peers,
                     self) ||
        kh_health_attach(self->loop))
        return -1;
    zmq_pollitem_t signals = {NULL, signal_fd, ZMQ_POLLIN, 0};
    if (zloop_poller(self->loop, &signals, s_on_signal, self))
        return -1;
    zloop_timer(self->loop, (size_t) self->cfg.partner_refresh_ms, 0,
                s_refresh_partners, self);
    zloop_timer(self->loop, 100, 0, s_check_stall, self);
    zloop_timer(self->loop, S_STATS_MS, 0, s_log_stats, self);
    s_reconnect(self->loop, 0, self);
    if (!self->stopping) /* not asked while the first registry was read */
        zloop_start(self->loop);
    s_drain(self);
    s_log_stats(self->loop, 0, self);
    s_tell_unaudited(self, true);
    kh_log_info("stopped", NULL);
    return 0;
}
