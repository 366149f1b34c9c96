/*
 * routing's ZAP handler (see zap.h). A handshake is accepted only when
 * the client's key is the hub's public key; every other key is refused.
 */
#include "zap.h"

#include <string.h>

#define S_ZAP_ENDPOINT "inproc://zeromq.zap.01"

struct _routing_zap_t {
    zsock_t *rep;
    char key[41]; /* the one accepted key, Z85 */
};

routing_zap_t *routing_zap_new(const char *public_key, kh_error_t *err)
{
    routing_zap_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    snprintf(self->key, sizeof self->key, "%s", public_key);
    self->rep = zsock_new(ZMQ_REP);
    if (!self->rep || zsock_bind(self->rep, S_ZAP_ENDPOINT) != 0) {
        kh_error_set(err, KH_E_CURVE, "", "cannot start the authenticator");
        routing_zap_destroy(&self);
        return NULL;
    }
    return self;
}

void routing_zap_destroy(routing_zap_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    routing_zap_t *self = *self_p;
    zsock_destroy(&self->rep);
    free(self);
    *self_p = NULL;
}

zsock_t *routing_zap_socket(routing_zap_t *self)
{
    return self->rep;
}

int routing_zap_handle(routing_zap_t *self)
{
    zmsg_t *request = zmsg_recv(self->rep);
    if (!request)
        return -1;
    /* version, request id, domain, address, identity, mechanism, key */
    zframe_t *version = zmsg_first(request);
    zframe_t *request_id = zmsg_next(request);
    zmsg_next(request); /* domain */
    zmsg_next(request); /* address */
    zmsg_next(request); /* identity */
    zframe_t *mechanism = zmsg_next(request);
    zframe_t *credentials = zmsg_next(request);

    char key[41] = "";
    if (version && zframe_streq(version, "1.0") && mechanism &&
        zframe_streq(mechanism, "CURVE") && credentials &&
        zframe_size(credentials) == 32)
        zmq_z85_encode(key, zframe_data(credentials), 32);
    int rc = key[0] && strcmp(key, self->key) == 0 ? 0 : 1;

    zmsg_t *reply = zmsg_new();
    zmsg_addstr(reply, "1.0");
    if (request_id)
        zmsg_addmem(reply, zframe_data(request_id), zframe_size(request_id));
    else
        zmsg_addstr(reply, "");
    zmsg_addstr(reply, rc == 0 ? "200" : "400");
    zmsg_addstr(reply, rc == 0 ? "OK" : "no access");
    zmsg_addstr(reply, rc == 0 ? key : "");
    zmsg_addmem(reply, NULL, 0); /* no metadata */
    zmsg_send(&reply, self->rep);
    zmsg_destroy(&request);
    return rc;
}
