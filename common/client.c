/*
 * The reference partner client (see client.h): request and reply for
 * intake, and the receiving side of deliveries.
 */
#include "ketenhub/client.h"

#include <czmq.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/codec.h"
#include "ketenhub/proto.h"

#define S_DELIVER_ENVELOPE 4096    /* the rest of a DELIVER's frame */
#define S_RETRY_WAIT_MAX_MS 60000  /* longest wait within one request */
#define S_CONNECTIONS_WAIT_MS 1000 /* after a handshake refused for now */
#define S_SEND_WAIT_MS 1000        /* for a connection to take a request */

struct _kh_client_t {
    char *endpoint;
    zsock_t *dealer;
    zactor_t *monitor; /* reports refused handshakes */
    zpoller_t *poller;
    uint64_t next_cid;
    int retries;
    bool interrupted; /* a signal ended the last wait for a reply */
    bool unconnected; /* refused at the handshake: connect before a send */
    uint64_t dropped; /* frames received that were no message */
    kh_error_t dropped_why; /* the last one's */
};

static zcert_t *s_load_cert(const char *path, bool need_secret, kh_error_t *err)
{
    zcert_t *cert = path ? zcert_load(path) : NULL;
    if (!cert) {
        kh_error_set(err, KH_E_CONFIG, "", "cannot read certificate %s",
                     path ? path : "(none)");
        return NULL;
    }
    if (need_secret &&
        strcmp(zcert_secret_txt(cert),
               "0000000000000000000000000000000000000000") == 0) {
        kh_error_set(err, KH_E_CONFIG, "",
                     "certificate %s has no secret key beside it (%s_secret)",
                     path, path);
        zcert_destroy(&cert);
    }
    return cert;
}

kh_client_t *kh_client_new(const char *endpoint, const char *hub_cert,
                           const char *partner_cert, kh_error_t *err)
{
    kh_client_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    zcert_t *hub = s_load_cert(hub_cert, false, err);
    zcert_t *mine = hub ? s_load_cert(partner_cert, true, err) : NULL;
    if (!mine)
        goto fail;
    self->dealer = zsock_new(ZMQ_DEALER);
    if (!self->dealer) {
        kh_error_set(err, KH_E_INTERNAL, "", "cannot create a socket");
        goto fail;
    }
    zcert_apply(mine, self->dealer);
    zsock_set_curve_serverkey(self->dealer, zcert_public_txt(hub));
    zsock_set_linger(self->dealer, 0);
    zsock_set_sndtimeo(self->dealer, S_SEND_WAIT_MS);
    self->monitor = zactor_new(zmonitor, self->dealer);
    if (self->monitor) {
        zstr_sendx(self->monitor, "LISTEN", "HANDSHAKE_FAILED_AUTH", NULL);
        zstr_sendx(self->monitor, "START", NULL);
        zsock_wait(self->monitor);
    }
    self->endpoint = strdup(endpoint);
    if (!self->endpoint || zsock_connect(self->dealer, "%s", endpoint)) {
        kh_error_set(err, KH_E_CONFIG, "", "cannot connect to %s", endpoint);
        goto fail;
    }
    self->poller = zpoller_new(self->dealer, NULL);
    if (self->monitor)
        zpoller_add(self->poller, self->monitor);
    self->next_cid = 1;
    zcert_destroy(&hub);
    zcert_destroy(&mine);
    return self;
fail:
    zcert_destroy(&hub);
    zcert_destroy(&mine);
    kh_client_destroy(&self);
    return NULL;
}

void kh_client_destroy(kh_client_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_client_t *self = *self_p;
    zpoller_destroy(&self->poller);
    zactor_destroy(&self->monitor);
    zsock_destroy(&self->dealer);
    free(self->endpoint);
    free(self);
    *self_p = NULL;
}

void kh_client_set_retries(kh_client_t *self, int retries)
{
    self->retries = retries < 0 ? 0 : retries;
}

const char *kh_client_reply_cmd(const json_t *reply)
{
    const char *cmd = json_string_value(json_object_get(reply, "cmd"));
    return cmd ? cmd : "";
}

/* The monitor reported a refused handshake: err says why. Status 500
 * (kh_peers_guard: the hub takes no more connections of this partner for
 * now) is a refusal for now; any other means the key is refused. Either
 * way ZeroMQ does not connect again after a refused handshake, so the
 * next send begins a new connection (not this function: were it refused
 * again, that refusal would be taken for the next request's), and a key
 * the hub admits since is served. */
static void s_handshake_refused(kh_client_t *self, kh_error_t *err)
{
    zmsg_t *event = zmsg_recv(self->monitor);
    char *name = event ? zmsg_popstr(event) : NULL;
    char *value = event ? zmsg_popstr(event) : NULL;
    bool for_now = value && strcmp(value, "500") == 0;
    free(name);
    free(value);
    zmsg_destroy(&event);
    zsock_disconnect(self->dealer, "%s", self->endpoint);
    self->unconnected = true;
    if (for_now)
        kh_error_set(err, KH_E_THROTTLED, "",
                     "the hub takes no more connections of this partner "
                     "now; close one, or try again later");
    else
        kh_error_set(err, KH_E_UNKNOWN_PARTNER, "",
                     "the hub refused this partner key");
}

/* Send frame (destroyed). A handshake refused since the last look (its
 * event waits on the monitor) ended its connection for good, and a send
 * would wait for it without end: refused for now, a new connection is
 * begun; the key refused, err says so and nothing is sent. A send waits
 * at most S_SEND_WAIT_MS for a connection to take it. 0, or -1 with err
 * (KH_E_UNAVAILABLE: not sent, try again). */
static int s_send_frame(kh_client_t *self, zframe_t **frame, int flags,
                        kh_error_t *err)
{
    while (self->monitor && (zsock_events(self->monitor) & ZMQ_POLLIN)) {
        s_handshake_refused(self, err);
        if (err->code == KH_E_UNKNOWN_PARTNER) {
            zframe_destroy(frame);
            return -1;
        }
    }
    if (self->unconnected &&
        zsock_connect(self->dealer, "%s", self->endpoint) == 0)
        self->unconnected = false;
    int rc = *frame ? zframe_send(frame, self->dealer, flags) : -1;
    zframe_destroy(frame);
    if (rc)
        kh_error_set(err, KH_E_UNAVAILABLE, "",
                     "cannot send now (no connection to the hub, or the "
                     "send queue is full)");
    return rc;
}

/* Send request once and wait for the reply with its cid. */
static json_t *s_exchange(kh_client_t *self, json_t *request, int timeout_ms,
                          kh_error_t *err)
{
    char cid[32];
    snprintf(cid, sizeof cid, "c-%" PRIu64, self->next_cid++);
    json_object_set_new(request, "v", json_integer(KH_PROTO_VERSION));
    json_object_set_new(request, "cid", json_string(cid));
    char *data = NULL;
    size_t size = 0;
    if (kh_msgpack_encode(request, &data, &size, err))
        return NULL;
    /* The hub drops a frame over its limit with the connection and
     * answers nothing, which would look like a hub that is gone (and be
     * sent again). No valid request comes near the protocol's limit, so
     * one over it is refused here, before it leaves. */
    size_t max_frame = kh_limits_default().max_frame;
    if (size > max_frame) {
        free(data);
        kh_error_set(err, KH_E_TOO_LARGE, "",
                     "the request is %zu bytes, over the hub's frame limit "
                     "of %zu: it was not sent",
                     size, max_frame);
        return NULL;
    }
    zframe_t *frame = zframe_new(data, size);
    free(data);
    if (s_send_frame(self, &frame, 0, err))
        return NULL;
    int64_t deadline = zclock_mono() + timeout_ms;
    int64_t left;
    while ((left = deadline - zclock_mono()) > 0) {
        void *which = zpoller_wait(self->poller, (int) left);
        if (which == self->monitor) {
            s_handshake_refused(self, err);
            return NULL;
        }
        if (which != self->dealer && zpoller_terminated(self->poller)) {
            /* A signal (Ctrl-C) ended the wait: the caller decides, and
             * the wait is not reported as the hub's silence. */
            kh_error_set(err, KH_E_TIMEOUT, "",
                         "interrupted before the hub replied (the request "
                         "may have reached it: resend it unchanged)");
            self->interrupted = true;
            return NULL;
        }
        if (which != self->dealer)
            break;
        zframe_t *reply_frame = zframe_recv(self->dealer);
        if (!reply_frame)
            break;
        json_t *reply = NULL;
        kh_error_t decode_err;
        int rc = kh_msgpack_decode(zframe_data(reply_frame),
                                   zframe_size(reply_frame), NULL, &reply,
                                   &decode_err);
        zframe_destroy(&reply_frame);
        const char *reply_cid =
            rc ? NULL : json_string_value(json_object_get(reply, "cid"));
        if (reply_cid && strcmp(reply_cid, cid) == 0)
            return reply;
        json_decref(reply); /* a late answer to an earlier attempt */
    }
    kh_error_set(err, KH_E_TIMEOUT, "", "no reply from the hub within %d ms",
                 timeout_ms);
    return NULL;
}

/* Wait ms in steps, so that a signal (Ctrl-C) ends the wait at once (the
 * request then ends with what it has): false when one did. */
static bool s_nap(int64_t ms)
{
    int64_t until = zclock_mono() + ms;
    while (!zsys_interrupted && zclock_mono() < until)
        zclock_sleep(
            (int) (until - zclock_mono() < 100 ? until - zclock_mono() : 100));
    return !zsys_interrupted;
}

json_t *kh_client_request(kh_client_t *self, json_t *request, int timeout_ms,
                          kh_error_t *err)
{
    kh_error_t local;
    if (!err)
        err = &local;
    for (int attempt = 0;; attempt++) {
        self->interrupted = false;
        json_t *reply = s_exchange(self, request, timeout_ms, err);
        bool last = attempt >= self->retries;
        if (!reply) {
            /* Unsent (no connection took it within S_SEND_WAIT_MS) is
             * tried again at once, as a request that got no reply. */
            bool again =
                err->code == KH_E_TIMEOUT || err->code == KH_E_UNAVAILABLE ||
                (err->code == KH_E_THROTTLED && s_nap(S_CONNECTIONS_WAIT_MS));
            if (last || !again || self->interrupted)
                return NULL;
            continue;
        }
        if (last || strcmp(kh_client_reply_cmd(reply), "REJECTED") != 0 ||
            !json_is_true(json_object_get(reply, "retryable")))
            return reply;
        /* retry_after_ms is the least wait before resending: a wait too
         * long to make inside one request ends it with the refusal, for
         * the caller to resend later, never sooner than asked. */
        json_int_t wait =
            json_integer_value(json_object_get(reply, "retry_after_ms"));
        if (wait >= S_RETRY_WAIT_MAX_MS)
            return reply;
        if (!s_nap(wait > 0 ? wait : 1000))
            return reply;
        json_decref(reply);
    }
}

json_t *kh_client_submit(kh_client_t *self, const json_t *referral,
                         const char *idem_key, int timeout_ms, kh_error_t *err)
{
    json_t *request =
        json_pack("{s:s, s:s, s:O}", "cmd", "SUBMIT", "idempotency_key",
                  idem_key, "referral", (json_t *) referral);
    if (!request) {
        kh_error_set(err, KH_E_BAD_ENVELOPE, "", "cannot build the request");
        return NULL;
    }
    json_t *reply = kh_client_request(self, request, timeout_ms, err);
    json_decref(request);
    return reply;
}

json_t *kh_client_status(kh_client_t *self, const char *referral_id,
                         int timeout_ms, kh_error_t *err)
{
    json_t *request =
        json_pack("{s:s, s:s}", "cmd", "STATUS", "referral_id", referral_id);
    if (!request) {
        kh_error_set(err, KH_E_BAD_ENVELOPE, "", "cannot build the request");
        return NULL;
    }
    json_t *reply = kh_client_request(self, request, timeout_ms, err);
    json_decref(request);
    return reply;
}

int kh_client_ping(kh_client_t *self, int timeout_ms, kh_error_t *err)
{
    json_t *request = json_pack("{s:s}", "cmd", "PING");
    json_t *reply =
        request ? kh_client_request(self, request, timeout_ms, err) : NULL;
    json_decref(request);
    int rc = reply && strcmp(kh_client_reply_cmd(reply), "PONG") == 0 ? 0 : -1;
    if (reply && rc)
        kh_error_set(err, KH_E_INTERNAL, "", "unexpected reply to PING");
    json_decref(reply);
    return rc;
}

/* ---- deliveries ------------------------------------------------------- */

/* Encode msg (v is set) and send it as one frame without waiting. */
static int s_send(kh_client_t *self, json_t *msg, kh_error_t *err)
{
    char *data = NULL;
    size_t size = 0;
    if (!msg || json_object_set_new(msg, "v", json_integer(KH_PROTO_VERSION)))
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    if (kh_msgpack_encode(msg, &data, &size, err))
        return -1;
    zframe_t *frame = zframe_new(data, size);
    free(data);
    return s_send_frame(self, &frame, ZFRAME_DONTWAIT, err);
}

int kh_client_hello(kh_client_t *self, int window, kh_error_t *err)
{
    char cid[32];
    snprintf(cid, sizeof cid, "hello:%" PRIu64, self->next_cid++);
    json_t *msg = json_pack("{s:s, s:s}", "cmd", "HELLO", "cid", cid);
    if (msg && window > 0)
        json_object_set_new(msg, "window", json_integer(window));
    int rc = s_send(self, msg, err);
    json_decref(msg);
    return rc;
}

/* ACK or NACK (reason not NULL) of delivery_id. */
static int s_answer(kh_client_t *self, const char *delivery_id,
                    const char *reason, kh_error_t *err)
{
    if (!delivery_id || !kh_uuid_valid(delivery_id))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "delivery_id",
                            "not a delivery id");
    char cid[48];
    snprintf(cid, sizeof cid, "%s:%s", reason ? "nack" : "ack", delivery_id);
    json_t *msg = json_pack("{s:s, s:s, s:s}", "cmd", reason ? "NACK" : "ACK",
                            "cid", cid, "delivery_id", delivery_id);
    if (msg && reason)
        json_object_set_new(msg, "reason", json_string(reason));
    int rc = s_send(self, msg, err);
    json_decref(msg);
    return rc;
}

int kh_client_ack(kh_client_t *self, const char *delivery_id, kh_error_t *err)
{
    return s_answer(self, delivery_id, NULL, err);
}

int kh_client_nack(kh_client_t *self, const char *delivery_id, bool permanent,
                   kh_error_t *err)
{
    return s_answer(self, delivery_id, permanent ? "permanent" : "retry", err);
}

json_t *kh_client_recv(kh_client_t *self, int timeout_ms, kh_error_t *err)
{
    int64_t deadline = zclock_mono() + (timeout_ms > 0 ? timeout_ms : 0);
    int64_t left = timeout_ms > 0 ? timeout_ms : 0;
    do {
        void *which = zpoller_wait(self->poller, (int) left);
        if (which && which == self->monitor) {
            s_handshake_refused(self, err);
            return NULL;
        }
        if (which != self->dealer)
            break; /* timeout or interrupted */
        zframe_t *frame = zframe_recv(self->dealer);
        if (!frame)
            break;
        /* A DELIVER's payload may be far longer than anything a partner
         * sends (schemas/protocol.md: up to 1 MiB), and the frame holds
         * the rest of the DELIVER beside it. A frame refused here would
         * be dropped unanswered, and come again until it is a dead
         * letter. */
        kh_limits_t limits = kh_limits_default();
        limits.max_string = KH_PAYLOAD_MAX;
        limits.max_frame = KH_PAYLOAD_MAX + S_DELIVER_ENVELOPE;
        json_t *msg = NULL;
        kh_error_t decode_err;
        int rc = kh_msgpack_decode(zframe_data(frame), zframe_size(frame),
                                   &limits, &msg, &decode_err);
        zframe_destroy(&frame);
        if (rc == 0 && json_is_object(msg) &&
            json_is_string(json_object_get(msg, "cmd")))
            return msg;
        if (rc == 0)
            kh_error_set(&decode_err, KH_E_BAD_ENVELOPE, "cmd",
                         "not a map with a cmd");
        self->dropped++;
        self->dropped_why = decode_err;
        json_decref(msg);
    } while ((left = deadline - zclock_mono()) > 0);
    kh_error_set(err, KH_E_TIMEOUT, "", "nothing from the hub within %d ms",
                 timeout_ms);
    return NULL;
}

uint64_t kh_client_dropped(const kh_client_t *self, kh_error_t *why)
{
    if (why)
        *why = self->dropped_why;
    return self->dropped;
}

static bool s_hex64(const char *s)
{
    if (!s || strlen(s) != 64)
        return false;
    for (const char *c = s; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f')))
            return false;
    return true;
}

int kh_client_delivery_check(const json_t *deliver, json_t **payload,
                             kh_error_t *err)
{
    *payload = NULL;
    kh_cmd_t cmd;
    const char *cid;
    if (kh_proto_check(deliver, &cmd, &cid, err))
        return -1;
    if (cmd != KH_CMD_DELIVER)
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "cmd", "not a DELIVER");
    static const char *const ids[] = {"delivery_id", "referral_id"};
    for (int i = 0; i < 2; i++) {
        const char *id = json_string_value(json_object_get(deliver, ids[i]));
        if (!id || !kh_uuid_valid(id))
            return kh_error_set(err, KH_E_BAD_ENVELOPE, ids[i],
                                "%s must be a lower-case UUID", ids[i]);
    }
    const char *priority =
        json_string_value(json_object_get(deliver, "priority"));
    if (!priority || (strcmp(priority, "normal") && strcmp(priority, "high") &&
                      strcmp(priority, "urgent")))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "priority",
                            "priority must be normal, high or urgent");
    const json_t *attempt = json_object_get(deliver, "attempt");
    if (!json_is_integer(attempt) || json_integer_value(attempt) < 1)
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "attempt",
                            "attempt must be an integer from 1");
    if (!json_is_string(json_object_get(deliver, "routed_at")))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "routed_at",
                            "routed_at must be a string");
    const json_t *of = json_object_get(deliver, "escalation_of");
    if (of && !(json_is_object(of) &&
                json_is_string(json_object_get(of, "partner")) &&
                json_is_string(json_object_get(of, "waiting_since"))))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "escalation_of",
                            "escalation_of must be a map of partner and "
                            "waiting_since (strings)");
    const json_t *text = json_object_get(deliver, "payload");
    const char *hash =
        json_string_value(json_object_get(deliver, "payload_sha256"));
    if (!json_is_string(text))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "payload",
                            "payload must be a string");
    if (!s_hex64(hash))
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "payload_sha256",
                            "payload_sha256 must be 64 lower-case hex digits");
    char actual[65];
    kh_sha256_hex(json_string_value(text), json_string_length(text), actual);
    if (strcmp(actual, hash) != 0) {
        kh_error_set(err, KH_E_BAD_ENVELOPE, "payload_sha256",
                     "the payload does not match payload_sha256");
        return -2;
    }
    json_error_t jerr;
    json_t *doc = json_loadb(json_string_value(text), json_string_length(text),
                             JSON_REJECT_DUPLICATES, &jerr);
    if (!doc && json_error_code(&jerr) == json_error_out_of_memory) {
        kh_error_set(err, KH_E_NOMEM, "payload", "out of memory");
        return -2; /* a re-send may find the memory */
    }
    if (!json_is_object(doc)) {
        json_decref(doc);
        return kh_error_set(err, KH_E_BAD_ENVELOPE, "payload",
                            "payload is not a JSON object");
    }
    *payload = doc;
    return 0;
}
