/*
 * A partner system's socket in the tests (khpartner.h).
 */
#include "khpartner.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>

#include "ketenhub/codec.h"
#include "khtest.h"

void khpartner_make(PGconn *db, const char *dir, const char *id,
                    const char *kind, bool cases)
{
    zcert_t *cert = zcert_new();
    ck_assert_ptr_nonnull(cert);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.cert", dir, id);
    ck_assert_int_eq(zcert_save(cert, path), 0);
    snprintf(path, sizeof path, "%s/partners/%s.cert", dir, id);
    ck_assert_int_eq(zcert_save_public(cert, path), 0);
    khtest_register_partner(db, id, kind, cases, zcert_public_txt(cert));
    zcert_destroy(&cert);
}

zsock_t *khpartner_connect(const char *cert, const char *hub_cert,
                           const char *endpoint)
{
    return khpartner_connect_rid(cert, hub_cert, endpoint, NULL, 0);
}

zsock_t *khpartner_connect_rid(const char *cert, const char *hub_cert,
                               const char *endpoint, const void *rid,
                               size_t len)
{
    zcert_t *mine = zcert_load(cert);
    zcert_t *hub = zcert_load(hub_cert);
    ck_assert_msg(mine && hub, "cannot load %s or %s", cert, hub_cert);
    zsock_t *dealer = zsock_new(ZMQ_DEALER);
    ck_assert_ptr_nonnull(dealer);
    zcert_apply(mine, dealer);
    zsock_set_curve_serverkey(dealer, zcert_public_txt(hub));
    zsock_set_linger(dealer, 0);
    if (rid)
        ck_assert_int_eq(
            zmq_setsockopt(zsock_resolve(dealer), ZMQ_ROUTING_ID, rid, len), 0);
    ck_assert_int_eq(zsock_connect(dealer, "%s", endpoint), 0);
    zcert_destroy(&mine);
    zcert_destroy(&hub);
    return dealer;
}

void khpartner_send(zsock_t *sock, json_t *msg)
{
    char *data;
    size_t size;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_encode(msg, &data, &size, &err), 0);
    zframe_t *frame = zframe_new(data, size);
    ck_assert_int_eq(zframe_send(&frame, sock, 0), 0);
    free(data);
    json_decref(msg);
}

json_t *khpartner_recv(zsock_t *sock, int timeout_ms)
{
    zsock_set_rcvtimeo(sock, timeout_ms);
    zframe_t *frame = zframe_recv(sock);
    if (!frame)
        return NULL;
    json_t *msg = NULL;
    kh_error_t err;
    ck_assert_msg(kh_msgpack_decode(zframe_data(frame), zframe_size(frame),
                                    NULL, &msg, &err) == 0,
                  "undecodable frame: %s", err.message);
    zframe_destroy(&frame);
    return msg;
}
