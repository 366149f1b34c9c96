/*
 * The intake service core (see intake.h and schemas/protocol.md).
 *
 * Group commit: when the ROUTER is readable, intake takes every request
 * already waiting (up to batch_max), checks each, and commits all accepted
 * referrals and all refusal audit events of the batch in one statement.
 * Only then are the replies sent: ACCEPTED never precedes the commit
 * (promise 1). While a batch commits, new requests wait in ZeroMQ's queue
 * and form the next batch, so batches grow with load by themselves.
 */
#include "intake.h"

#include <czmq.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ketenhub/log.h"
#include "ketenhub/proto.h"
#include "ketenhub/schema.h"
#include "ketenhub/service.h"
#include "store.h"

#define S_BACKOFF_MIN_MS 100
#define S_BACKOFF_MAX_MS 5000
#define S_UNKNOWN_KEY_RELOAD_MS 1000
#define S_LINGER_MS 2000

/* One request of the batch being handled. */
typedef struct {
    zframe_t *identity; /* the ROUTER's routing id of the connection */
    json_t *msg;        /* decoded envelope, NULL if undecodable */
    kh_cmd_t cmd;       /* KH_CMD_UNKNOWN_ when not understood */
    char cid[KH_CID_MAX + 1];
    char partner[64]; /* partner id, "" when the key is unknown */
    char actor[64];   /* partner id, or "key:<Z85>" */
    char peer[64];    /* peer address */
    bool refused;     /* err holds why */
    kh_error_t err;
    int sub;    /* index in the batch's submissions, or -1 */
    int leader; /* earlier request of this batch with the same key, or -1 */
} s_request_t;

struct _intake_t {
    intake_config_t cfg;
    kh_schema_t *schema;
    zcert_t *cert;
    zactor_t *auth;
    zsock_t *router;
    int port;
    store_t *store;
    zhashx_t *partners; /* Z85 key -> partner id */
    int64_t partners_loaded_at;
    zloop_t *loop;
    int reconnect_timer; /* zloop timer id, 0 if none */
    int backoff_ms;
    bool ready_logged;
    bool stopping;
    /* batch scratch, batch_max entries each */
    s_request_t *requests;
    store_submit_t *subs;
    store_refusal_t *refs;
    zhashx_t *batch_keys; /* "partner\nkey" -> index + 1 */
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
    if (!self->schema)
        goto fail;
    if (!zsys_has_curve()) {
        kh_error_set(err, KH_E_CURVE, "", "libzmq was built without CURVE");
        goto fail;
    }
    self->cert = zcert_load(config->hub_cert);
    if (!self->cert || !zcert_secret_txt(self->cert) ||
        strcmp(zcert_secret_txt(self->cert),
               "0000000000000000000000000000000000000000") == 0) {
        kh_error_set(err, KH_E_CONFIG, "KH_HUB_CERT",
                     "cannot load the hub certificate and its secret key "
                     "from %s",
                     config->hub_cert);
        goto fail;
    }
    struct stat info;
    if (stat(config->partner_certs, &info) || !S_ISDIR(info.st_mode)) {
        kh_error_set(err, KH_E_CONFIG, "KH_PARTNER_CERT_DIR",
                     "%s is not a directory", config->partner_certs);
        goto fail;
    }
    /* Without a running zauth a CURVE server accepts any client key. */
    self->auth = zactor_new(zauth, NULL);
    if (!self->auth ||
        zstr_sendx(self->auth, "CURVE", config->partner_certs, NULL) ||
        zsock_wait(self->auth)) {
        kh_error_set(err, KH_E_CURVE, "", "cannot start the authenticator");
        goto fail;
    }
    self->router = zsock_new(ZMQ_ROUTER);
    if (!self->router) {
        kh_error_set(err, KH_E_INTERNAL, "", "cannot create a socket");
        goto fail;
    }
    zcert_apply(self->cert, self->router);
    zsock_set_curve_server(self->router, 1);
    zsock_set_maxmsgsize(self->router, (int64_t) config->limits.max_frame);
    zsock_set_linger(self->router, S_LINGER_MS);
    zsock_set_router_mandatory(self->router, 0);
    self->port = zsock_bind(self->router, "%s", config->endpoint);
    if (self->port == -1) {
        kh_error_set(err, KH_E_CONFIG, "KH_INTAKE_ENDPOINT", "cannot bind %s",
                     config->endpoint);
        goto fail;
    }
    self->store = store_new(config->conninfo);
    self->requests = calloc(config->batch_max, sizeof *self->requests);
    self->subs = calloc(config->batch_max, sizeof *self->subs);
    self->refs = calloc(config->batch_max, sizeof *self->refs);
    self->batch_keys = zhashx_new();
    if (!self->store || !self->requests || !self->subs || !self->refs ||
        !self->batch_keys) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        goto fail;
    }
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
    zsock_destroy(&self->router);
    zactor_destroy(&self->auth);
    zcert_destroy(&self->cert);
    kh_schema_destroy(&self->schema);
    store_destroy(&self->store);
    zhashx_destroy(&self->partners);
    zhashx_destroy(&self->batch_keys);
    free(self->requests);
    free(self->subs);
    free(self->refs);
    free(self);
    *self_p = NULL;
}

int intake_port(const intake_t *self)
{
    return self->port;
}

static int s_reconnect(zloop_t *loop, int timer_id, void *arg);

/* Re-read the partner registry; keeps the old one on failure. */
static void s_load_partners(intake_t *self)
{
    kh_error_t err;
    zhashx_t *partners = store_partners(self->store, &err);
    if (!partners)
        return;
    zhashx_destroy(&self->partners);
    self->partners = partners;
    self->partners_loaded_at = zclock_mono();
}

/* Note that the database went away and arrange to reconnect. */
static void s_schedule_reconnect(intake_t *self)
{
    if (self->reconnect_timer)
        return;
    self->reconnect_timer = zloop_timer(self->loop, (size_t) self->backoff_ms,
                                        1, s_reconnect, self);
    if (self->reconnect_timer == -1)
        self->reconnect_timer = 0;
}

static int s_reconnect(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    self->reconnect_timer = 0;
    kh_error_t err;
    if (store_connect(self->store, &err) == 0) {
        s_load_partners(self);
        kh_log_info("db_connected", "partners=%zu",
                    self->partners ? zhashx_size(self->partners) : 0);
        if (!self->ready_logged) {
            kh_log_info("ready", "endpoint=%s port=%d", self->cfg.endpoint,
                        self->port);
            self->ready_logged = true;
        }
        self->backoff_ms = S_BACKOFF_MIN_MS;
        return 0;
    }
    self->backoff_ms = self->backoff_ms * 2 > S_BACKOFF_MAX_MS
                           ? S_BACKOFF_MAX_MS
                           : self->backoff_ms * 2;
    s_schedule_reconnect(self);
    return 0;
}

static int s_refresh_partners(zloop_t *loop, int timer_id, void *arg)
{
    (void) loop;
    (void) timer_id;
    intake_t *self = arg;
    if (store_up(self->store))
        s_load_partners(self);
    return 0;
}

/* The partner id for an authenticated key; reloads the registry (at most
 * once a second) when the key is unknown, so a partner added while intake
 * runs is recognised. */
static const char *s_partner_of(intake_t *self, const char *key)
{
    const char *id = self->partners ? zhashx_lookup(self->partners, key) : NULL;
    if (!id && store_up(self->store) &&
        zclock_mono() - self->partners_loaded_at > S_UNKNOWN_KEY_RELOAD_MS) {
        s_load_partners(self);
        id = self->partners ? zhashx_lookup(self->partners, key) : NULL;
    }
    return id;
}

static void s_refuse(s_request_t *req, const kh_error_t *err)
{
    req->refused = true;
    req->err = *err;
}

/* Receive one request and check everything that needs no database. */
static void s_take(intake_t *self, s_request_t *req, zmsg_t *msg)
{
    memset(req, 0, sizeof *req);
    req->sub = -1;
    req->leader = -1;
    req->cmd = KH_CMD_UNKNOWN_;
    req->identity = zmsg_pop(msg);
    zframe_t *body = zmsg_pop(msg);
    kh_error_t err;
    kh_error_clear(&err);

    const char *key = body ? zframe_meta(body, "User-Id") : NULL;
    const char *peer = body ? zframe_meta(body, "Peer-Address") : NULL;
    snprintf(req->peer, sizeof req->peer, "%s", peer ? peer : "");
    const char *partner = key ? s_partner_of(self, key) : NULL;
    if (partner) {
        snprintf(req->partner, sizeof req->partner, "%s", partner);
        snprintf(req->actor, sizeof req->actor, "%s", partner);
    } else
        snprintf(req->actor, sizeof req->actor, "key:%s", key ? key : "none");

    if (!body || zmsg_size(msg) != 0) {
        kh_error_set(&err, KH_E_BAD_ENVELOPE, "",
                     "a request is exactly one frame");
        s_refuse(req, &err);
    } else if (kh_msgpack_decode(zframe_data(body), zframe_size(body),
                                 &self->cfg.limits, &req->msg, &err))
        s_refuse(req, &err);
    else {
        const char *cid = NULL;
        int rc = kh_proto_check(req->msg, &req->cmd, &cid, &err);
        snprintf(req->cid, sizeof req->cid, "%s", cid ? cid : "");
        if (rc)
            s_refuse(req, &err);
    }
    if (!req->refused && !partner) {
        kh_error_set(&err, KH_E_UNKNOWN_PARTNER, "",
                     "this key belongs to no active partner");
        s_refuse(req, &err);
    }
    if (!req->refused && req->cmd == KH_CMD_SUBMIT) {
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
    zframe_destroy(&body);
}

/* Place a valid SUBMIT in the batch, or make it follow an earlier request
 * of this batch with the same partner and key. */
static void s_batch_submit(intake_t *self, s_request_t *req, int index,
                           size_t *nsubs)
{
    const char *idem =
        json_string_value(json_object_get(req->msg, "idempotency_key"));
    char batch_key[KH_IDEM_KEY_MAX + 80];
    snprintf(batch_key, sizeof batch_key, "%s\n%s", req->partner, idem);
    intptr_t leader = (intptr_t) zhashx_lookup(self->batch_keys, batch_key);
    if (leader) {
        req->leader = (int) leader - 1;
        return;
    }
    zhashx_insert(self->batch_keys, batch_key, (void *) (intptr_t) (index + 1));
    store_submit_t *sub = &self->subs[*nsubs];
    memset(sub, 0, sizeof *sub);
    sub->partner_id = req->partner;
    sub->idem_key = idem;
    sub->referral = json_object_get(req->msg, "referral");
    sub->peer = req->peer;
    if (kh_payload_hash(sub->referral, sub->hash)) {
        kh_error_t err;
        kh_error_set(&err, KH_E_NOMEM, "", "out of memory");
        s_refuse(req, &err);
        return;
    }
    kh_uuid_new(sub->referral_id);
    req->sub = (int) (*nsubs)++;
}

static void s_add_refusal(intake_t *self, s_request_t *req, size_t *nrefs)
{
    store_refusal_t *ref = &self->refs[(*nrefs)++];
    ref->action = !*req->partner ? "auth.refused"
                  : (req->cmd == KH_CMD_SUBMIT || req->cmd == KH_CMD_UNKNOWN_)
                      ? "referral.rejected"
                      : "request.rejected";
    ref->actor_id = req->actor;
    ref->code = kh_error_name(req->err.code);
    ref->path = req->err.path;
    ref->peer = req->peer;
}

/* The reply to a SUBMIT whose batch committed. */
static json_t *s_submit_reply(const s_request_t *req, const store_submit_t *sub,
                              bool follower)
{
    if (sub->conflict) {
        kh_error_t err;
        kh_error_set(&err, KH_E_IDEMPOTENCY_CONFLICT, "idempotency_key",
                     "this idempotency key was already used for another "
                     "referral");
        return kh_proto_rejected(req->cid, &err, 0);
    }
    json_t *reply = kh_proto_new(KH_CMD_ACCEPTED, req->cid);
    json_object_set_new(reply, "referral_id", json_string(sub->referral_id));
    json_object_set_new(reply, "accepted_at", json_string(sub->accepted_at));
    json_object_set_new(reply, "duplicate",
                        json_boolean(sub->duplicate || follower));
    return reply;
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
    zmsg_t *msg = zmsg_new();
    zmsg_append(msg, &req->identity);
    zmsg_addmem(msg, data, size);
    free(data);
    zmsg_send(&msg, self->router);
}

/* Answer every request of the batch; commit_err is set when the batch's
 * commit failed. */
static void s_reply_all(intake_t *self, size_t count,
                        const kh_error_t *commit_err)
{
    for (size_t i = 0; i < count; i++) {
        s_request_t *req = &self->requests[i];
        json_t *reply = NULL;
        if (req->refused)
            reply = kh_proto_rejected(req->cid, &req->err, self->backoff_ms);
        else if (req->cmd == KH_CMD_SUBMIT) {
            const s_request_t *owner =
                req->leader >= 0 ? &self->requests[req->leader] : req;
            if (commit_err)
                reply =
                    kh_proto_rejected(req->cid, commit_err, self->backoff_ms);
            else if (owner->refused)
                reply = kh_proto_rejected(req->cid, &owner->err, 0);
            else {
                store_submit_t *sub = &self->subs[owner->sub];
                char hash[65];
                bool follower = req->leader >= 0;
                if (follower &&
                    (kh_payload_hash(json_object_get(req->msg, "referral"),
                                     hash) ||
                     strcmp(hash, sub->hash) != 0)) {
                    store_submit_t other = *sub;
                    other.conflict = true;
                    reply = s_submit_reply(req, &other, true);
                } else
                    reply = s_submit_reply(req, sub, follower);
            }
        } else if (req->cmd == KH_CMD_STATUS) {
            kh_error_t err;
            reply = kh_proto_new(KH_CMD_STATUS_REPLY, req->cid);
            const char *id =
                json_string_value(json_object_get(req->msg, "referral_id"));
            if (store_status(self->store, req->partner, id, reply, &err)) {
                json_decref(reply);
                reply = kh_proto_rejected(req->cid, &err, self->backoff_ms);
                if (err.code == KH_E_UNAVAILABLE)
                    s_schedule_reconnect(self);
            }
        } else
            reply = kh_proto_new(KH_CMD_PONG, req->cid);
        s_send(self, req, reply);
        zframe_destroy(&req->identity);
        json_decref(req->msg);
        req->msg = NULL;
    }
}

/* Take the waiting requests, commit them together, answer them. */
static int s_on_router(zloop_t *loop, zsock_t *router, void *arg)
{
    (void) loop;
    intake_t *self = arg;
    int64_t started = zclock_usecs();
    size_t count = 0, nsubs = 0, nrefs = 0;
    while (count < self->cfg.batch_max && (zsock_events(router) & ZMQ_POLLIN)) {
        zmsg_t *msg = zmsg_recv(router);
        if (!msg)
            break;
        s_request_t *req = &self->requests[count];
        s_take(self, req, msg);
        zmsg_destroy(&msg);
        if (!req->refused && req->cmd == KH_CMD_SUBMIT)
            s_batch_submit(self, req, (int) count, &nsubs);
        if (req->refused)
            s_add_refusal(self, req, &nrefs);
        count++;
    }
    zhashx_purge(self->batch_keys);

    int64_t taken = zclock_usecs();
    kh_error_t commit_err;
    bool failed = false;
    if (nsubs + nrefs > 0 && store_commit(self->store, self->subs, nsubs,
                                          self->refs, nrefs, &commit_err)) {
        failed = true;
        if (nrefs)
            kh_log_warn("refusals_unaudited", "count=%zu code=%s", nrefs,
                        kh_error_name(commit_err.code));
        if (!store_up(self->store))
            s_schedule_reconnect(self);
    }
    int64_t committed = zclock_usecs();
    s_reply_all(self, count, failed ? &commit_err : NULL);
    if (count)
        kh_log_debug("batch",
                     "requests=%zu accepted=%zu refused=%zu take_ms=%.3f "
                     "commit_ms=%.3f reply_ms=%.3f",
                     count, nsubs, nrefs, (double) (taken - started) / 1000.0,
                     (double) (committed - taken) / 1000.0,
                     (double) (zclock_usecs() - committed) / 1000.0);
    return 0;
}

static int s_on_signal(zloop_t *loop, zmq_pollitem_t *item, void *arg)
{
    (void) loop;
    intake_t *self = arg;
    int signo;
    while ((signo = kh_signals_read(item->fd)) > 0) {
        if (signo == SIGHUP)
            kh_log_info("sighup", "action=none");
        else {
            kh_log_info("stopping", "signal=%d", signo);
            self->stopping = true;
        }
    }
    return self->stopping ? -1 : 0;
}

int intake_run(intake_t *self, int signal_fd)
{
    self->loop = zloop_new();
    if (!self->loop)
        return -1;
    zloop_reader(self->loop, self->router, s_on_router, self);
    zmq_pollitem_t signals = {NULL, signal_fd, ZMQ_POLLIN, 0};
    zloop_poller(self->loop, &signals, s_on_signal, self);
    zloop_timer(self->loop, (size_t) self->cfg.partner_refresh_ms, 0,
                s_refresh_partners, self);
    s_reconnect(self->loop, 0, self);
    zloop_start(self->loop);

    /* Drain: answer what has already arrived, then let linger flush it. */
    while (zsock_events(self->router) & ZMQ_POLLIN)
        s_on_router(self->loop, self->router, self);
    kh_log_info("stopped", NULL);
    return 0;
}
