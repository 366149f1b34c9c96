/*
 * intake against a real PostgreSQL and real CURVE sockets on
 * tcp://127.0.0.1: the real ketenhub-intake binary, real partner keys.
 */
#include <czmq.h>
#include <dirent.h>
#include <libpq-fe.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "ketenhub/codec.h"
#include "ketenhub/proto.h"
#include "ketenhub/rules.h"
#include "ketenhub/throttle.h"
#include "ketenhub/zap.h"
#include "khpartner.h"
#include "khproc.h"
#include "khtest.h"
#include "store_sql.h"

#define S_DB "kh_test_intake"
#define S_TIMEOUT 3000
/* An answer "at once": well within S_TIMEOUT, so that a wait for the
 * timeout fails the test, with room for a slow (sanitized, loaded) run. */
#define S_AT_ONCE_MS 2000

static char s_dir[256];     /* temp dir: certs, logs */
static char s_endpoint[64]; /* where intake listens */
static char s_routing[64];  /* where intake sends wake-ups */
static char *s_conninfo;    /* the test database */
static pid_t s_intake = -1; /* the intake process */
static PGconn *s_db;        /* for checks */

static char *s_path(const char *name)
{
    return khtest_path(s_dir, name);
}

/* A new partner key pair: secret in DIR/NAME.cert(_secret); the public
 * half in the partner directory when registered_in_dir. */
static zcert_t *s_make_cert(const char *name, bool in_dir)
{
    zcert_t *cert = zcert_new();
    char file[512];
    snprintf(file, sizeof file, "%s/%s.cert", s_dir, name);
    zcert_save(cert, file);
    if (in_dir) {
        snprintf(file, sizeof file, "%s/partners/%s.cert", s_dir, name);
        zcert_save_public(cert, file);
    }
    return cert;
}

static void s_register(const char *id, zcert_t *cert)
{
    khtest_register_partner(s_db, id, "other", true, zcert_public_txt(cert));
}

static long s_count(const char *sql)
{
    return khtest_db_count(s_db, sql);
}

/* How many times text occurs in intake's log. */
static int s_log_count(const char *text)
{
    return khtest_log_count(s_path("intake.log"), text);
}

/* Start intake, reading the registry every refresh_ms besides. */
static void s_start_intake_refreshing(const char *refresh_ms)
{
    char routing[128], refresh[64];
    snprintf(routing, sizeof routing, "KH_ROUTING_ENDPOINT=%s", s_routing);
    snprintf(refresh, sizeof refresh, "KH_PARTNER_REFRESH_MS=%s", refresh_ms);
    char *extra[] = {refresh, routing, NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, s_conninfo, extra);
}

static void s_start_intake(void)
{
    s_start_intake_refreshing("200");
}

static kh_client_t *s_client(const char *name)
{
    char cert[512];
    snprintf(cert, sizeof cert, "%s/%s.cert", s_dir, name);
    kh_error_t err;
    kh_client_t *client =
        kh_client_new(s_endpoint, s_path("hub.cert"), cert, &err);
    ck_assert_msg(client != NULL, "%s", err.message);
    return client;
}

/* Wait until intake answers PING (it is bound and PostgreSQL answers).
 * Until its first connection is made, intake answers at once, with a
 * retryable refusal: the attempts are spaced, or they would all be spent
 * before the connection is. As partner probe, a partner of its own, so
 * that the connections it opens, which intake may not yet have seen
 * close, never count among those of the partners the tests use
 * (KH_INTAKE_MAX_CONNECTIONS). */
static void s_wait_ready(void)
{
    kh_client_t *client = s_client("probe");
    kh_error_t err;
    int rc = -1;
    for (int i = 0; i < 50 && rc; i++)
        if ((rc = kh_client_ping(client, 200, &err)) != 0)
            zclock_sleep(100);
    kh_client_destroy(&client);
    ck_assert_msg(rc == 0, "intake did not come up: see %s",
                  s_path("intake.log"));
}

/* Stop the fixture's intake (it must exit cleanly) and start it again
 * with settings, NAME and value after each other up to a NULL (not the
 * ones s_start_intake sets itself, which win); wait until it answers. */
static void s_restart_intake_with(const char *const settings[])
{
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    ck_assert(status != -1 && WIFEXITED(status));
    for (size_t i = 0; settings[i]; i += 2)
        setenv(settings[i], settings[i + 1], 1);
    s_start_intake();
    for (size_t i = 0; settings[i]; i += 2)
        unsetenv(settings[i]);
    s_wait_ready();
}

static void s_setup(void)
{
    snprintf(s_dir, sizeof s_dir, "/tmp/kh-intake-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(s_dir));
    char partners[512];
    snprintf(partners, sizeof partners, "%s/partners", s_dir);
    ck_assert_int_eq(zsys_dir_create("%s", partners), 0);
    snprintf(s_endpoint, sizeof s_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    snprintf(s_routing, sizeof s_routing, "tcp://127.0.0.1:%d",
             khproc_free_port());

    s_db = khtest_db_fresh(S_DB);
    s_conninfo = khtest_db_conninfo(S_DB);
    zcert_t *hub = zcert_new();
    zcert_save(hub, s_path("hub.cert"));
    zcert_destroy(&hub);
    zcert_t *vt = s_make_cert("vt", true);
    s_register("veilig-thuis", vt);
    zcert_destroy(&vt);
    zcert_t *zc = s_make_cert("zc", true);
    s_register("zorgcoordinator", zc);
    zcert_destroy(&zc);
    zcert_t *probe = s_make_cert("probe", true);
    s_register("probe", probe);
    zcert_destroy(&probe);
    zcert_t *stranger = s_make_cert("stranger", false); /* not in the dir */
    zcert_destroy(&stranger);
    zcert_t *unregistered = s_make_cert("unregistered", true); /* no row */
    zcert_destroy(&unregistered);
    s_start_intake();
    s_wait_ready();
}

static void s_teardown(void)
{
    if (s_intake > 0)
        khproc_stop(s_intake, SIGTERM, 5000);
    s_intake = -1;
    PQfinish(s_db);
    s_db = NULL;
    free(s_conninfo);
    s_conninfo = NULL;
    khproc_sh("rm -rf '%s'", s_dir);
}

/* The first example referral (sorted by file name). */
static json_t *s_example(void)
{
    json_t *doc;
    khtest_examples(&doc, 1);
    return doc;
}

/* A copy of referral that is another referral (its summary differs): the
 * same key with it is a conflict. */
static json_t *s_another(const json_t *referral)
{
    json_t *other = json_deep_copy(referral);
    json_object_set_new(other, "summary", json_string("another referral"));
    return other;
}

static const char *s_str(const json_t *reply, const char *field)
{
    const char *value = json_string_value(json_object_get(reply, field));
    return value ? value : "";
}

START_TEST(accepted_referral_is_committed_with_its_audit_event)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "accept-1", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    ck_assert(json_is_false(json_object_get(reply, "duplicate")));
    char sql[1024];
    /* Same transaction: the referral row and its audit event share xmin. */
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM referrals r JOIN audit_events a"
             " ON a.referral_id = r.id AND a.xmin = r.xmin"
             " WHERE r.id = '%s' AND r.partner_id = 'veilig-thuis'"
             " AND a.action = 'referral.accepted' AND a.actor_id = "
             "'veilig-thuis' AND a.outcome = 'ok'"
             " AND a.payload_hash = r.payload_hash AND r.payload IS NOT NULL",
             s_str(reply, "referral_id"));
    ck_assert_int_eq(s_count(sql), 1);

    /* STATUS by the submitter, and not by another partner. */
    json_t *status =
        kh_client_status(client, s_str(reply, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(status);
    ck_assert_str_eq(kh_client_reply_cmd(status), "STATUS_REPLY");
    ck_assert_str_eq(s_str(status, "state"), "accepted");
    ck_assert_int_eq(
        (int) json_array_size(json_object_get(status, "deliveries")), 0);
    json_decref(status);

    /* Once routed, STATUS lists the deliveries, never their payloads. */
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, rules_version) VALUES"
             " (gen_random_uuid(), '%s', 'zorgcoordinator', 'high',"
             " 'x', decode(repeat('ab', 32), 'hex'), 'v1')",
             s_str(reply, "referral_id"));
    PQclear(PQexec(s_db, sql));
    status =
        kh_client_status(client, s_str(reply, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(status);
    json_t *deliveries = json_object_get(status, "deliveries");
    ck_assert_int_eq((int) json_array_size(deliveries), 1);
    json_t *delivery = json_array_get(deliveries, 0);
    ck_assert_str_eq(s_str(delivery, "partner"), "zorgcoordinator");
    ck_assert_str_eq(s_str(delivery, "state"), "pending");
    ck_assert_str_eq(s_str(delivery, "priority"), "high");
    ck_assert_ptr_null(json_object_get(delivery, "payload"));
    ck_assert_ptr_null(json_object_get(delivery, "escalation_of"));
    json_decref(status);
    /* An escalation copy comes after the partner's own delivery and says
     * whose delivery was overdue. */
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, rules_version, escalation_of)"
             " SELECT gen_random_uuid(), referral_id, partner_id, 'urgent',"
             " 'y', payload_hash, 'v1', (SELECT id FROM deliveries"
             " WHERE referral_id = '%s') FROM deliveries"
             " WHERE referral_id = '%s'",
             s_str(reply, "referral_id"), s_str(reply, "referral_id"));
    PGresult *res = PQexec(s_db, sql);
    ck_assert_int_eq(PQresultStatus(res), PGRES_COMMAND_OK);
    PQclear(res);
    status =
        kh_client_status(client, s_str(reply, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(status);
    deliveries = json_object_get(status, "deliveries");
    ck_assert_int_eq((int) json_array_size(deliveries), 2);
    ck_assert_ptr_null(
        json_object_get(json_array_get(deliveries, 0), "escalation_of"));
    delivery = json_array_get(deliveries, 1);
    ck_assert_str_eq(s_str(delivery, "priority"), "urgent");
    ck_assert_str_eq(s_str(delivery, "escalation_of"), "zorgcoordinator");
    json_decref(status);
    kh_client_t *other = s_client("zc");
    status =
        kh_client_status(other, s_str(reply, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(status);
    ck_assert_str_eq(s_str(status, "code"), "not_found");
    json_decref(status);
    kh_client_destroy(&other);
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* Intake logged in with its service role alone (as the containers run
 * it, migration 021's column grants binding it): it reads the registry,
 * accepts and audits a referral, and answers STATUS with the state of its
 * deliveries, which it may read without their payloads. */
START_TEST(intake_does_its_work_with_its_role_alone)
{
    khtest_db_exec(s_db,
                   "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE"
                   " rolname = 'kh_test_intake_login') THEN CREATE ROLE"
                   " kh_test_intake_login LOGIN IN ROLE ketenhub_intake;"
                   " END IF; END $$",
                   0, NULL);
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    ck_assert(status != -1 && WIFEXITED(status));
    char conninfo[1400], routing[128];
    snprintf(conninfo, sizeof conninfo, "%s user=kh_test_intake_login",
             s_conninfo);
    snprintf(routing, sizeof routing, "KH_ROUTING_ENDPOINT=%s", s_routing);
    char *extra[] = {"KH_PARTNER_REFRESH_MS=200", routing, NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, conninfo, extra);
    s_wait_ready();
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "role-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO deliveries (id, referral_id, partner_id, priority,"
             " payload, payload_hash, rules_version) VALUES"
             " (gen_random_uuid(), '%s', 'zorgcoordinator', 'high',"
             " 'x', decode(repeat('ab', 32), 'hex'), 'v1')",
             s_str(reply, "referral_id"));
    PQclear(PQexec(s_db, sql));
    json_t *answer =
        kh_client_status(client, s_str(reply, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(answer);
    ck_assert_str_eq(kh_client_reply_cmd(answer), "STATUS_REPLY");
    json_t *deliveries = json_object_get(answer, "deliveries");
    ck_assert_int_eq((int) json_array_size(deliveries), 1);
    ck_assert_str_eq(s_str(json_array_get(deliveries, 0), "state"), "pending");
    json_decref(answer);
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

START_TEST(same_idempotency_key_returns_the_first_answer)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *first =
        kh_client_submit(client, referral, "idem-1", S_TIMEOUT, &err);
    json_t *second =
        kh_client_submit(client, referral, "idem-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(first);
    ck_assert_ptr_nonnull(second);
    ck_assert_str_eq(kh_client_reply_cmd(second), "ACCEPTED");
    ck_assert_str_eq(s_str(first, "referral_id"), s_str(second, "referral_id"));
    ck_assert_str_eq(s_str(first, "accepted_at"), s_str(second, "accepted_at"));
    ck_assert(json_is_true(json_object_get(second, "duplicate")));
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'idem-1'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events a JOIN "
                             "referrals r ON r.id = a.referral_id WHERE "
                             "r.idempotency_key = 'idem-1'"),
                     1);

    /* Another partner may use the same key for its own referral. */
    kh_client_t *other = s_client("zc");
    json_t *third =
        kh_client_submit(other, referral, "idem-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(third);
    ck_assert_str_eq(kh_client_reply_cmd(third), "ACCEPTED");
    ck_assert_str_ne(s_str(first, "referral_id"), s_str(third, "referral_id"));

    /* The same key for a different referral is a conflict. */
    json_object_set_new(referral, "summary", json_string("changed text"));
    json_t *fourth =
        kh_client_submit(client, referral, "idem-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(fourth);
    ck_assert_str_eq(s_str(fourth, "code"), "idempotency_conflict");
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'idem-1'"),
                     2);
    json_decref(first);
    json_decref(second);
    json_decref(third);
    json_decref(fourth);
    json_decref(referral);
    kh_client_destroy(&other);
    kh_client_destroy(&client);
}
END_TEST

/* A referral whose payload was purged at the end of its retention
 * (purge writes NULL over it): its submitter's STATUS answers as before,
 * a resubmission of its idempotency key gets the first answer, and the
 * same key for another referral is still a conflict (the hash stays). */
START_TEST(a_purged_referral_answers_status_and_resubmission)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *first =
        kh_client_submit(client, referral, "purged-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(first);
    ck_assert_str_eq(kh_client_reply_cmd(first), "ACCEPTED");
    char sql[512];
    snprintf(sql, sizeof sql,
             "UPDATE referrals SET payload = NULL WHERE id = '%s'",
             s_str(first, "referral_id"));
    PQclear(PQexec(s_db, sql));
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM referrals WHERE id = '%s' AND payload IS"
             " NULL",
             s_str(first, "referral_id"));
    ck_assert_int_eq(s_count(sql), 1);

    json_t *status =
        kh_client_status(client, s_str(first, "referral_id"), S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(status);
    ck_assert_str_eq(kh_client_reply_cmd(status), "STATUS_REPLY");
    ck_assert_str_eq(s_str(status, "state"), "accepted");
    ck_assert_str_eq(s_str(status, "accepted_at"), s_str(first, "accepted_at"));
    json_t *again =
        kh_client_submit(client, referral, "purged-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(again);
    ck_assert_str_eq(kh_client_reply_cmd(again), "ACCEPTED");
    ck_assert_str_eq(s_str(again, "referral_id"), s_str(first, "referral_id"));
    ck_assert(json_is_true(json_object_get(again, "duplicate")));
    json_object_set_new(referral, "summary", json_string("changed text"));
    json_t *conflict =
        kh_client_submit(client, referral, "purged-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(conflict);
    ck_assert_str_eq(s_str(conflict, "code"), "idempotency_conflict");
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'purged-1'"),
                     1);
    json_decref(first);
    json_decref(status);
    json_decref(again);
    json_decref(conflict);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A STATUS refused as not_found (another partner's referral, or none) is
 * a refusal like any other: in the trail as request.rejected, committed
 * before the answer, without the id asked for. */
START_TEST(a_status_refused_as_not_found_is_audited)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *accepted =
        kh_client_submit(client, referral, "status-1", S_TIMEOUT, &err);
    ck_assert_msg(accepted != NULL, "%s", err.message);
    const char *id = s_str(accepted, "referral_id");
    kh_client_t *other = s_client("zc");
    json_t *reply = kh_client_status(other, id, S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "code"), "not_found");
    ck_assert_str_eq(s_str(reply, "path"), "referral_id");
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'request.rejected' AND actor_id ="
                             " 'zorgcoordinator' AND outcome = 'refused' AND"
                             " reason_code = 'not_found' AND reason_path ="
                             " 'referral_id' AND referral_id IS NULL"),
                     1);
    reply = kh_client_status(client, "01900000-0000-7000-8000-000000000000",
                             S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "code"), "not_found");
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'request.rejected' AND actor_id ="
                             " 'veilig-thuis' AND reason_code = 'not_found'"),
                     1);
    /* The submitter's own STATUS is answered, and not audited. */
    reply = kh_client_status(client, id, S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "STATUS_REPLY");
    ck_assert_str_eq(s_str(reply, "referral_id"), id);
    ck_assert_str_eq(s_str(reply, "state"), "accepted");
    ck_assert_str_eq(s_str(reply, "accepted_at"),
                     s_str(accepted, "accepted_at"));
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'request.rejected'"),
                     2);
    kh_client_destroy(&other);
    kh_client_destroy(&client);
    json_decref(accepted);
    json_decref(referral);
}
END_TEST

/* The message in frame (destroyed), which must decode. */
static json_t *s_decoded(zframe_t **frame)
{
    json_t *msg = NULL;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_decode(zframe_data(*frame), zframe_size(*frame),
                                       NULL, &msg, &err),
                     0);
    zframe_destroy(frame);
    return msg;
}

/* A CURVE DEALER of partner vt, connected to intake. */
static zsock_t *s_dealer(int timeout_ms)
{
    zsock_t *dealer =
        khpartner_connect(s_path("vt.cert"), s_path("hub.cert"), s_endpoint);
    zsock_set_rcvtimeo(dealer, timeout_ms);
    return dealer;
}

/* A DEALER of partner name whose CURVE handshake with intake is over. */
static zsock_t *s_dealer_shaken_as(const char *name)
{
    zsock_t *dealer = zsock_new(ZMQ_DEALER);
    ck_assert_ptr_nonnull(dealer);
    char file[64];
    snprintf(file, sizeof file, "%s.cert", name);
    zcert_t *mine = zcert_load(s_path(file));
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    ck_assert(mine && hub);
    zcert_apply(mine, dealer);
    zsock_set_curve_serverkey(dealer, zcert_public_txt(hub));
    zsock_set_linger(dealer, 0);
    zcert_destroy(&mine);
    zcert_destroy(&hub);
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "inproc://shaken-%p", (void *) dealer);
    ck_assert_int_eq(zmq_socket_monitor(zsock_resolve(dealer), endpoint,
                                        ZMQ_EVENT_HANDSHAKE_SUCCEEDED),
                     0);
    zsock_t *monitor = zsock_new(ZMQ_PAIR);
    ck_assert_int_eq(zsock_connect(monitor, "%s", endpoint), 0);
    ck_assert_int_eq(zsock_connect(dealer, "%s", s_endpoint), 0);
    zsock_set_rcvtimeo(monitor, S_TIMEOUT);
    zmsg_t *event = zmsg_recv(monitor);
    ck_assert_msg(event != NULL, "no handshake within %d ms", S_TIMEOUT);
    zmsg_destroy(&event);
    zmq_socket_monitor(zsock_resolve(dealer), NULL, 0);
    zsock_destroy(&monitor);
    return dealer;
}

/* Send raw bytes on a CURVE DEALER as partner vt and return the decoded
 * reply, or NULL when none came within timeout_ms. */
static json_t *s_raw(const void *data, size_t size, int frames, int timeout_ms)
{
    zsock_t *dealer = s_dealer(timeout_ms);
    zmsg_t *msg = zmsg_new();
    for (int i = 0; i < frames; i++)
        zmsg_addmem(msg, data, size);
    zmsg_send(&msg, dealer);
    zframe_t *frame = zframe_recv(dealer);
    json_t *reply = frame ? s_decoded(&frame) : NULL;
    zsock_destroy(&dealer);
    return reply;
}

static json_t *s_raw_json(json_t *envelope)
{
    char *data;
    size_t size;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_encode(envelope, &data, &size, &err), 0);
    json_t *reply = s_raw(data, size, 1, S_TIMEOUT);
    free(data);
    json_decref(envelope);
    return reply;
}

/* Send envelopes[0..n) on one connection without waiting, then collect
 * the replies by cid (envelope i carries cid "p<i>"). Takes the
 * envelopes; replies[i] is NULL when none came within timeout_ms. */
static void s_pipeline(json_t **envelopes, size_t n, json_t **replies,
                       int timeout_ms)
{
    zsock_t *dealer = s_dealer(timeout_ms);
    for (size_t i = 0; i < n; i++) {
        char cid[32], *data;
        size_t size;
        kh_error_t err;
        snprintf(cid, sizeof cid, "p%zu", i);
        json_object_set_new(envelopes[i], "v", json_integer(1));
        json_object_set_new(envelopes[i], "cid", json_string(cid));
        ck_assert_int_eq(kh_msgpack_encode(envelopes[i], &data, &size, &err),
                         0);
        zframe_t *frame = zframe_new(data, size);
        free(data);
        zframe_send(&frame, dealer, 0);
        json_decref(envelopes[i]);
        replies[i] = NULL;
    }
    for (size_t got = 0; got < n; got++) {
        zframe_t *frame = zframe_recv(dealer);
        if (!frame)
            break;
        json_t *reply = s_decoded(&frame);
        size_t i = strtoul(s_str(reply, "cid") + 1, NULL, 10);
        ck_assert_uint_lt(i, n);
        replies[i] = reply;
    }
    zsock_destroy(&dealer);
}

static json_t *s_submit_envelope(const char *key, json_t *referral)
{
    return json_pack("{s:s, s:s, s:O}", "cmd", "SUBMIT", "idempotency_key", key,
                     "referral", referral);
}

/* envelope (consumed) as version 1 with cid, encoded in a frame. */
static zframe_t *s_frame(json_t *envelope, const char *cid)
{
    json_object_set_new(envelope, "v", json_integer(1));
    json_object_set_new(envelope, "cid", json_string(cid));
    char *data;
    size_t size;
    kh_error_t err;
    ck_assert_int_eq(kh_msgpack_encode(envelope, &data, &size, &err), 0);
    json_decref(envelope);
    zframe_t *frame = zframe_new(data, size);
    free(data);
    return frame;
}

static void s_expect_rejected(json_t *reply, const char *code, const char *path)
{
    ck_assert_msg(reply != NULL, "no reply, expected %s", code);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), code);
    if (path)
        ck_assert_str_eq(s_str(reply, "path"), path);
    ck_assert(json_is_false(json_object_get(reply, "retryable")));
    json_decref(reply);
}

/* What the README promises partners of the refused examples: the hub
 * answers each schemas/invalid/ file's referral with the file's expected
 * code and path, the path counted from the envelope (referral.<path>).
 * The one exception is a referral that is not a map at all: the envelope
 * refuses it before the schema is asked (bad_envelope, path referral). */
START_TEST(the_refused_examples_are_refused_as_their_files_say)
{
    char dir_path[600];
    snprintf(dir_path, sizeof dir_path, "%s", khtest_src("schemas/invalid"));
    DIR *dir = opendir(dir_path);
    ck_assert_ptr_nonnull(dir);
    kh_client_t *client = s_client("vt");
    int checked = 0;
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        size_t len = strlen(entry->d_name);
        if (len < 6 || strcmp(entry->d_name + len - 5, ".json"))
            continue;
        char file[900];
        snprintf(file, sizeof file, "%s/%s", dir_path, entry->d_name);
        json_error_t jerr;
        json_t *doc = json_load_file(file, 0, &jerr);
        ck_assert_msg(doc != NULL, "%s: %s", file, jerr.text);
        const char *code = json_string_value(
            json_object_get(json_object_get(doc, "expect"), "code"));
        const char *path = json_string_value(
            json_object_get(json_object_get(doc, "expect"), "path"));
        ck_assert_msg(code && path, "%s: no expect", entry->d_name);
        json_t *referral = json_object_get(doc, "referral");
        char want[KH_ERROR_PATH_MAX + 16];
        snprintf(want, sizeof want, "referral%s%s", *path ? "." : "", path);
        if (!json_is_object(referral))
            code = "bad_envelope";
        char key[64];
        snprintf(key, sizeof key, "invalid-%d", checked);
        kh_error_t err;
        json_t *reply =
            kh_client_submit(client, referral, key, S_TIMEOUT, &err);
        ck_assert_msg(reply != NULL, "%s: %s", entry->d_name, err.message);
        ck_assert_msg(strcmp(kh_client_reply_cmd(reply), "REJECTED") == 0 &&
                          strcmp(s_str(reply, "code"), code) == 0 &&
                          strcmp(s_str(reply, "path"), want) == 0,
                      "%s: expected %s at %s, got %s %s at %s", entry->d_name,
                      code, want, kh_client_reply_cmd(reply),
                      s_str(reply, "code"), s_str(reply, "path"));
        json_decref(reply);
        json_decref(doc);
        checked++;
    }
    closedir(dir);
    kh_client_destroy(&client);
    ck_assert_int_gt(checked, 60);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);
}
END_TEST

START_TEST(bad_input_is_rejected_and_changes_nothing)
{
    long referrals = s_count("SELECT count(*) FROM referrals");
    long refusals = s_count("SELECT count(*) FROM audit_events WHERE "
                            "outcome = 'refused'");
    s_expect_rejected(s_raw("\xc1", 1, 1, S_TIMEOUT), "malformed", "");
    s_expect_rejected(s_raw("\x82\xa1v\x01", 4, 1, S_TIMEOUT), "interrupted",
                      NULL);
    s_expect_rejected(s_raw("\xdf\xff\xff\xff\xff", 5, 1, S_TIMEOUT),
                      "too_many_elements", NULL);
    char deep[10000];
    memset(deep, 0x91, sizeof deep);
    s_expect_rejected(s_raw(deep, sizeof deep, 1, S_TIMEOUT), "too_deep", NULL);
    s_expect_rejected(s_raw("\x81\xa1v\x01", 4, 2, S_TIMEOUT), "bad_envelope",
                      NULL);
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s}", "v", 2, "cmd",
                                           "PING", "cid", "x")),
                      "unknown_version", "v");
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s}", "v", 1, "cmd",
                                           "FOO", "cid", "x")),
                      "unknown_command", "cmd");
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s,s:s}", "v", 1, "cmd",
                                           "PING", "cid", "x", "from", "avim")),
                      "bad_envelope", "from");
    /* The hub's own commands are not requests. */
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s}", "v", 1, "cmd",
                                           "ACCEPTED", "cid", "x")),
                      "unknown_command", "cmd");
    /* A partner does send HELLO, but to the delivery socket: the refusal
     * says what intake takes. */
    json_t *hello = s_raw_json(
        json_pack("{s:i,s:s,s:s}", "v", 1, "cmd", "HELLO", "cid", "x"));
    ck_assert_ptr_nonnull(hello);
    ck_assert_msg(strstr(s_str(hello, "message"), "SUBMIT, STATUS and PING"),
                  "%s", s_str(hello, "message"));
    s_expect_rejected(hello, "unknown_command", "cmd");
    /* So is one of the delivery socket's that lacks its fields: naming
     * the missing field would have the partner fix what intake never
     * takes. */
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s}", "v", 1, "cmd",
                                           "ACK", "cid", "x")),
                      "unknown_command", "cmd");
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s,s:i}", "v", 1, "cmd",
                                           "HELLO", "cid", "x", "window", 0)),
                      "unknown_command", "cmd");
    json_t *referral = s_example();
    s_expect_rejected(
        s_raw_json(json_pack("{s:i,s:s,s:s,s:s,s:O}", "v", 1, "cmd", "SUBMIT",
                             "cid", "x", "idempotency_key", "bad key!",
                             "referral", referral)),
        "bad_envelope", "idempotency_key");
    json_object_del(referral, "summary");
    s_expect_rejected(
        s_raw_json(json_pack("{s:i,s:s,s:s,s:s,s:O}", "v", 1, "cmd", "SUBMIT",
                             "cid", "x", "idempotency_key", "k", "referral",
                             referral)),
        "schema.required", "referral.summary");
    json_object_set_new(referral, "summary", json_string("x"));
    json_object_set_new(referral, "partner", json_string("avim"));
    s_expect_rejected(
        s_raw_json(json_pack("{s:i,s:s,s:s,s:s,s:O}", "v", 1, "cmd", "SUBMIT",
                             "cid", "x", "idempotency_key", "k", "referral",
                             referral)),
        "schema.unknown_field", "referral.partner");
    json_decref(referral);

    /* A frame over the limit is dropped with the connection: no reply. */
    size_t big = 300 * 1024;
    char *huge = calloc(1, big);
    ck_assert_ptr_null(s_raw(huge, big, 1, 1000));
    /* One of exactly the limit (KH_MAX_FRAME, 256 KiB) is read and
     * answered, although CURVE adds its own bytes to it on the wire. */
    memset(huge, 0xc1, big);
    s_expect_rejected(s_raw(huge, 256 * 1024, 1, S_TIMEOUT), "malformed", "");
    free(huge);

    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "outcome = 'refused'"),
                     refusals + 16);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "action = 'referral.rejected' AND reason_code = "
                             "'schema.required' AND reason_path = "
                             "'referral.summary'"),
                     1);
    /* Still serving. */
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);
}
END_TEST

/* The hub names each connection itself: one that chose its routing id
 * is refused (with the frame's cid), stores nothing and is audited. */
START_TEST(a_connection_that_sets_its_own_routing_id_is_refused)
{
    long referrals = s_count("SELECT count(*) FROM referrals");
    zsock_t *dealer = khpartner_connect_rid(
        s_path("vt.cert"), s_path("hub.cert"), s_endpoint, "mine", 4);
    zsock_set_rcvtimeo(dealer, S_TIMEOUT);
    json_t *referral = s_example();
    zframe_t *frame = s_frame(s_submit_envelope("rid-1", referral), "c1");
    ck_assert_int_eq(zframe_send(&frame, dealer, 0), 0);
    zframe_t *got = zframe_recv(dealer);
    ck_assert_msg(got != NULL, "no reply");
    json_t *reply = s_decoded(&got);
    ck_assert_str_eq(s_str(reply, "cid"), "c1");
    s_expect_rejected(reply, "bad_envelope", "");
    zsock_destroy(&dealer);
    json_decref(referral);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "action = 'referral.rejected' AND actor_id = "
                             "'veilig-thuis' AND reason_code = "
                             "'bad_envelope' AND reason_path = ''"),
                     1);
}
END_TEST

/* A made-up key in one request changes nothing for the others in its
 * batch, and never reaches the trail. */
START_TEST(made_up_keys_spoil_nothing_and_stay_out_of_the_trail)
{
    json_t *referral = s_example();
    json_t *envelopes[3] = {
        json_pack("{s:s, s:i}", "cmd", "PING", "Jan de Vries\x01", 1),
        s_submit_envelope("mix-1", referral),
        s_submit_envelope("mix-2", referral)};
    json_t *replies[3];
    s_pipeline(envelopes, 3, replies, S_TIMEOUT);
    ck_assert_ptr_nonnull(replies[0]);
    ck_assert_str_eq(s_str(replies[0], "code"), "bad_envelope");
    ck_assert_str_eq(s_str(replies[0], "path"), "?");
    for (int i = 1; i < 3; i++) {
        ck_assert_ptr_nonnull(replies[i]);
        ck_assert_str_eq(kh_client_reply_cmd(replies[i]), "ACCEPTED");
    }
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "reason_code = 'bad_envelope' AND reason_path = "
                             "'?'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "reason_path LIKE '%Vries%'"),
                     0);
    json_decref(referral);
}
END_TEST

/* However the submissions of one key are batched, each gets the first
 * answer for its payload, and a conflict is in the trail. */
START_TEST(repeats_get_the_first_answer_and_conflicts_are_audited)
{
    json_t *first = s_example();
    json_t *other = s_another(first);
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    json_t *accepted =
        kh_client_submit(client, first, "rep-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(accepted);
    ck_assert_str_eq(kh_client_reply_cmd(accepted), "ACCEPTED");
    kh_client_destroy(&client);

    json_t *envelopes[2] = {s_submit_envelope("rep-1", other),
                            s_submit_envelope("rep-1", first)};
    json_t *replies[2];
    s_pipeline(envelopes, 2, replies, S_TIMEOUT);
    ck_assert_ptr_nonnull(replies[0]);
    ck_assert_ptr_nonnull(replies[1]);
    ck_assert_str_eq(s_str(replies[0], "code"), "idempotency_conflict");
    ck_assert_str_eq(kh_client_reply_cmd(replies[1]), "ACCEPTED");
    ck_assert(json_is_true(json_object_get(replies[1], "duplicate")));
    ck_assert_str_eq(s_str(replies[1], "referral_id"),
                     s_str(accepted, "referral_id"));
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'rep-1'"),
                     1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "reason_code = 'idempotency_conflict' AND "
                             "actor_id = 'veilig-thuis'"),
                     1);
    json_decref(replies[0]);
    json_decref(replies[1]);
    json_decref(accepted);
    json_decref(first);
    json_decref(other);
}
END_TEST

/* A field name of the partner's choosing. */
#define S_NAME "Fatima_Yilmaz_12031985"

/* frame's copy of marker (which must occur once) overwritten with with,
 * of the same length: shapes the encoder will not make. */
static void s_patch(zframe_t *frame, const char *marker, const char *with)
{
    size_t len = strlen(marker);
    ck_assert_uint_eq(strlen(with), len);
    unsigned char *data = zframe_data(frame);
    unsigned char *at = memmem(data, zframe_size(frame), marker, len);
    ck_assert_ptr_nonnull(at);
    memcpy(at, with, len);
    ck_assert_ptr_null(memmem(at + len,
                              zframe_size(frame) - (size_t) (at - data) - len,
                              marker, len));
}

/* Send frame (destroyed) as partner vt and return the reply. */
static json_t *s_send_frame(zframe_t *frame)
{
    zsock_t *dealer = s_dealer(S_TIMEOUT);
    zframe_send(&frame, dealer, 0);
    frame = zframe_recv(dealer);
    json_t *reply = frame ? s_decoded(&frame) : NULL;
    zsock_destroy(&dealer);
    return reply;
}

/* frame (destroyed) with its copy of marker (which must occur once)
 * replaced by the len bytes at with: shapes the encoder will not make. */
static zframe_t *s_splice(zframe_t *frame, const char *marker, const void *with,
                          size_t len)
{
    size_t mlen = strlen(marker), size = zframe_size(frame);
    const unsigned char *data = zframe_data(frame);
    const unsigned char *at = memmem(data, size, marker, mlen);
    ck_assert_ptr_nonnull(at);
    size_t pre = (size_t) (at - data);
    zframe_t *out = zframe_new(NULL, size - mlen + len);
    memcpy(zframe_data(out), data, pre);
    memcpy(zframe_data(out) + pre, with, len);
    memcpy(zframe_data(out) + pre + len, at + mlen, size - pre - mlen);
    zframe_destroy(&frame);
    return out;
}

/* A refusal for a body that cannot be decoded still answers the request's
 * cid when the envelope holds one, wherever it stands: a client that
 * matches replies by cid (as the reference client does) would otherwise
 * wait for an answer that came, and take the hub for unreachable. */
START_TEST(a_body_that_does_not_decode_is_refused_with_its_cid)
{
    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 0);
    kh_error_t err;
    json_t *referral = s_example();
    char *big = malloc(70001);
    memset(big, 'a', 70000);
    big[70000] = '\0';
    json_object_set_new(referral, "summary", json_string(big));
    free(big);
    json_t *reply =
        kh_client_submit(client, referral, "cid-big", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    s_expect_rejected(reply, "string_too_long", "referral.summary");

    json_object_set_new(referral, "summary", json_string("x"));
    json_t *many = json_array();
    for (int i = 0; i < 1100; i++)
        json_array_append_new(many, json_integer(i));
    json_object_set_new(referral, "extra", many);
    reply = kh_client_submit(client, referral, "cid-many", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    s_expect_rejected(reply, "too_many_elements", "referral.extra");
    json_object_del(referral, "extra");
    kh_client_destroy(&client);

    /* bin where a string belongs, before and after the cid. */
    json_object_set_new(referral, "summary", json_string("@@MARKER@@"));
    zframe_t *frame =
        s_frame(s_submit_envelope("cid-bin", referral), "c-after");
    frame = s_splice(frame, "\xaa@@MARKER@@", "\xc4\x03xyz", 5);
    reply = s_send_frame(frame);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "cid"), "c-after");
    s_expect_rejected(reply, "unsupported_type", "referral.summary");
    json_t *envelope =
        json_pack("{s:s, s:i, s:s, s:s, s:O}", "cid", "c-before", "v", 1, "cmd",
                  "SUBMIT", "idempotency_key", "cid-nul", "referral", referral);
    char *data;
    size_t size;
    ck_assert_int_eq(kh_msgpack_encode(envelope, &data, &size, &err), 0);
    json_decref(envelope);
    frame = zframe_new(data, size);
    free(data);
    frame = s_splice(frame, "\xaa@@MARKER@@", "\xa3x\0y", 4);
    reply = s_send_frame(frame);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "cid"), "c-before");
    s_expect_rejected(reply, "invalid_utf8", "referral.summary");

    /* v is checked before anything else: a frame of another version that
     * this version's rules cannot decode is refused for its version. */
    envelope =
        json_pack("{s:s, s:i, s:s, s:s, s:O}", "cid", "c-v2", "v", 2, "cmd",
                  "SUBMIT", "idempotency_key", "cid-v2", "referral", referral);
    ck_assert_int_eq(kh_msgpack_encode(envelope, &data, &size, &err), 0);
    json_decref(envelope);
    frame = zframe_new(data, size);
    free(data);
    frame = s_splice(frame, "\xaa@@MARKER@@", "\xc4\x03xyz", 5);
    reply = s_send_frame(frame);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "cid"), "c-v2");
    s_expect_rejected(reply, "unknown_version", "v");
    json_decref(referral);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);
}
END_TEST

/* Exit status of ketenhub-partner submit FILE ARGS as partner vt (a retry
 * and 1 s per attempt: the hub answers at once or is taken for gone). */
static int s_partner_submit_with(const char *file, const char *args)
{
    int rc =
        khproc_sh("%s/tools/partner/ketenhub-partner --endpoint %s "
                  "--hub-cert %s --cert %s --timeout 1000 --retries 1 "
                  "submit %s %s >>%s 2>&1",
                  KH_TEST_BINARY_DIR, s_endpoint, s_path("hub.cert"),
                  s_path("vt.cert"), s_path(file), args, s_path("partner.log"));
    return rc;
}

static int s_partner_submit(const char *file)
{
    return s_partner_submit_with(file, "");
}

/* The key given after the file, as the usage writes it (submit FILE --key
 * KEY), is the one sent: another referral under it is a conflict, not a
 * second referral. What the tool cannot place is a usage error. */
START_TEST(the_partner_tool_sends_the_key_given_after_the_file)
{
    json_t *referral = s_example();
    ck_assert_int_eq(json_dump_file(referral, s_path("one.json"), 0), 0);
    json_t *other = s_another(referral);
    ck_assert_int_eq(json_dump_file(other, s_path("other.json"), 0), 0);
    json_decref(other);
    json_decref(referral);

    ck_assert_int_eq(s_partner_submit_with("one.json", "--key my-key-1"), 0);
    ck_assert_int_eq(s_partner_submit_with("other.json", "--key my-key-1"), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"
                             " WHERE idempotency_key = 'my-key-1'"),
                     1);
    /* Options before the command still work, and a second file is not
     * silently ignored. */
    ck_assert_int_eq(khproc_sh("%s/tools/partner/ketenhub-partner --endpoint "
                               "%s --hub-cert %s --cert %s --key my-key-1 "
                               "--timeout 1000 submit %s >>%s 2>&1",
                               KH_TEST_BINARY_DIR, s_endpoint,
                               s_path("hub.cert"), s_path("vt.cert"),
                               s_path("other.json"), s_path("partner.log")),
                     1);
    ck_assert_int_eq(s_partner_submit_with("one.json", s_path("other.json")),
                     2);
    /* A key the hub would refuse is a usage error, found before sending
     * (it was sent and refused, exit 1, or timed out, exit 3, with the
     * hub away). */
    ck_assert_int_eq(s_partner_submit_with("one.json", "--key 'my key'"), 2);
    ck_assert_int_eq(s_partner_submit_with("one.json", "--key ''"), 2);
    char long_key[KH_IDEM_KEY_MAX + 16] = "--key ";
    memset(long_key + 6, 'k', KH_IDEM_KEY_MAX + 1); /* one too many */
    ck_assert_int_eq(s_partner_submit_with("one.json", long_key), 2);
    ck_assert_int_eq(khproc_sh("grep -q -- '--key must be 1 to 128' %s",
                               s_path("partner.log")),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 1);
    /* A file that cannot be opened has no line and column to name. */
    ck_assert_int_eq(s_partner_submit("missing.json"), 2);
    ck_assert_int_eq(khproc_sh("grep -q 'missing.json: unable to open' %s",
                               s_path("partner.log")),
                     0);
    ck_assert_int_ne(khproc_sh("grep -q -- ':-1:-1' %s", s_path("partner.log")),
                     0);
    /* Nor has a directory, which is no referral, and a FIFO that nobody
     * writes is refused at once rather than waited for (standard input is
     * "-"). */
    ck_assert_int_eq(khproc_sh("mkdir %s && mkfifo %s", s_path("dir.json"),
                               s_path("fifo.json")),
                     0);
    ck_assert_int_eq(s_partner_submit("dir.json"), 2);
    ck_assert_int_eq(khproc_sh("timeout 10 %s/tools/partner/ketenhub-partner "
                               "--endpoint %s --hub-cert %s --cert %s "
                               "--timeout 1000 submit %s >>%s 2>&1",
                               KH_TEST_BINARY_DIR, s_endpoint,
                               s_path("hub.cert"), s_path("vt.cert"),
                               s_path("fifo.json"), s_path("partner.log")),
                     2);
    ck_assert_int_eq(khproc_sh("test $(grep -c 'json: not a regular file' "
                               "%s) -eq 2",
                               s_path("partner.log")),
                     0);
    /* A number that is not one is a usage error, never 0 or a prefix. */
    ck_assert_int_eq(s_partner_submit_with("other.json", "--retries abc"), 2);
    ck_assert_int_eq(s_partner_submit_with("other.json", "--timeout 5s"), 2);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 1);
}
END_TEST

/* The reference tool tells a referral that must be fixed (exit 1) from a
 * hub it cannot reach (exit 3), whether the hub or the tool refused it. */
START_TEST(the_partner_tool_reports_a_referral_it_cannot_send_as_refused)
{
    json_t *referral = s_example();
    char *big = malloc(70001);
    memset(big, 'a', 70000);
    big[70000] = '\0';
    json_object_set_new(referral, "summary", json_string(big));
    free(big);
    ck_assert_int_eq(json_dump_file(referral, s_path("big.json"), 0), 0);
    ck_assert_int_eq(s_partner_submit("big.json"), 1);

    /* Over the frame limit the hub would drop the connection unanswered,
     * which looks like a hub that is gone: the tool refuses it itself. */
    char *huge = malloc(300001);
    memset(huge, 'a', 300000);
    huge[300000] = '\0';
    json_object_set_new(referral, "summary", json_string(huge));
    free(huge);
    ck_assert_int_eq(json_dump_file(referral, s_path("huge.json"), 0), 0);
    ck_assert_int_eq(s_partner_submit("huge.json"), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);

    json_t *deep = json_string("x");
    for (int i = 0; i < 16; i++) {
        json_t *level = json_object();
        json_object_set_new(level, "a", deep);
        deep = level;
    }
    json_object_set_new(referral, "summary", json_string("x"));
    json_object_set_new(referral, "extra", deep);
    ck_assert_int_eq(json_dump_file(referral, s_path("deep.json"), 0), 0);
    ck_assert_int_eq(s_partner_submit("deep.json"), 1);
    json_decref(referral);
}
END_TEST

/* An identifier-shaped field name is the partner's data (here a name and
 * a birth date): the reply names it, so the partner can fix its message,
 * but the trail and the logs hold only the contract's names. */
START_TEST(names_of_the_partner_stay_out_of_the_trail_and_logs)
{
    json_t *referral = s_example();
    json_t *subject = json_object_get(referral, "subject");

    /* An unknown field. */
    json_object_set_new(subject, S_NAME, json_integer(1));
    json_t *reply =
        s_send_frame(s_frame(s_submit_envelope("name-1", referral), "unknown"));
    s_expect_rejected(reply, "schema.unknown_field",
                      "referral.subject." S_NAME);

    /* The same name twice in one map (only raw bytes can say that). */
    json_object_set_new(subject, "QQQQQQQQQQQQQQQQQQQQQQ", json_integer(2));
    zframe_t *frame = s_frame(s_submit_envelope("name-2", referral), "dup");
    s_patch(frame, "QQQQQQQQQQQQQQQQQQQQQQ", S_NAME);
    s_expect_rejected(s_send_frame(frame), "duplicate_key",
                      "referral.subject." S_NAME);
    json_object_del(subject, "QQQQQQQQQQQQQQQQQQQQQQ");

    /* A value the codec refuses, under the name. */
    json_object_set_new(subject, S_NAME, json_string("XQXQ"));
    frame = s_frame(s_submit_envelope("name-3", referral), "utf8");
    s_patch(frame, "XQXQ", "\xff\xfe\xfd\xfc");
    s_expect_rejected(s_send_frame(frame), "invalid_utf8",
                      "referral.subject." S_NAME);

    /* An unknown field of the envelope. */
    s_expect_rejected(s_raw_json(json_pack("{s:i,s:s,s:s,s:i}", "v", 1, "cmd",
                                           "PING", "cid", "x", S_NAME, 1)),
                      "bad_envelope", S_NAME);
    json_decref(referral);

    ck_assert_int_eq(
        s_count("SELECT count(*) FROM audit_events WHERE actor_id = "
                "'veilig-thuis' AND reason_path = 'referral.subject.?' AND "
                "reason_code IN ('schema.unknown_field', 'duplicate_key', "
                "'invalid_utf8')"),
        3);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "reason_code = 'bad_envelope' AND reason_path = "
                             "'?'"),
                     1);
    /* In no column of any event, nor in the log. */
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events a WHERE "
                             "strpos(a::text, 'Yilmaz') > 0 OR "
                             "strpos(a::text, '12031985') > 0"),
                     0);
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);
    ck_assert(!khtest_log_has(s_path("intake.log"), "Yilmaz", 0));
}
END_TEST

/* A connection of its own that inserts, in a transaction it leaves
 * open, a referral of veilig-thuis under key with payload's hash, as
 * another intake process committing the same key would: a statement of
 * intake that meets the row waits for the transaction to end. */
static PGconn *s_hold_key(const char *key, const json_t *payload)
{
    PGconn *conn = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(conn), CONNECTION_OK);
    char hash[65];
    ck_assert_int_eq(kh_payload_hash(payload, hash), 0);
    char *text = kh_payload_canonical(payload, NULL);
    ck_assert_ptr_nonnull(text);
    const char *params[] = {key, text, hash};
    khtest_db_exec(conn, "BEGIN", 0, NULL);
    khtest_db_exec(conn,
                   "INSERT INTO referrals (id, partner_id, idempotency_key,"
                   " schema_version, payload, payload_hash) VALUES"
                   " (gen_random_uuid(), 'veilig-thuis', $1, 'referral.v1',"
                   " convert_to($2, 'UTF8'), decode($3, 'hex'))",
                   3, params);
    free(text);
    return conn;
}

/* Wait until an intake statement waits for holder's lock. */
static void s_waits_for(PGconn *holder)
{
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity WHERE application_name ="
             " 'ketenhub-intake' AND %d = ANY (pg_blocking_pids(pid))",
             PQbackendPID(holder));
    ck_assert_msg(khtest_wait_count(s_db, sql, 1, 10000),
                  "no intake statement waits for backend %d",
                  PQbackendPID(holder));
}

/* Send on dealer a SUBMIT of payload under key (cid "hold") while another
 * process holds that key, and wait until its batch waits at its commit,
 * so that what is sent next waits for the next batch. The holder
 * (s_hold_key), for the caller to end. */
static PGconn *s_send_held(zsock_t *dealer, const char *key, json_t *payload)
{
    PGconn *holder = s_hold_key(key, payload);
    zframe_t *frame = s_frame(s_submit_envelope(key, payload), "hold");
    zframe_send(&frame, dealer, 0);
    s_waits_for(holder);
    return holder;
}

static long s_conflict_events(const json_t *payload)
{
    char hash[65], sql[512];
    ck_assert_int_eq(kh_payload_hash(payload, hash), 0);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action = "
             "'referral.rejected' AND outcome = 'refused' AND reason_code = "
             "'idempotency_conflict' AND reason_path = 'idempotency_key' AND "
             "actor_id = 'veilig-thuis' AND payload_hash = decode('%s', "
             "'hex')",
             hash);
    return s_count(sql);
}

/* Send, on a new DEALER, a SUBMIT of first under KEY-hold (cid "hold")
 * while *holder (s_hold_key) holds that key, so that its batch waits at
 * its commit; then first and other under key (cids "first" and "other"),
 * which wait together for the same next batch. */
static zsock_t *s_send_pair_in_one_batch(const char *key, json_t *first,
                                         json_t *other, PGconn **holder)
{
    char hold[64];
    snprintf(hold, sizeof hold, "%s-hold", key);
    zsock_t *dealer = s_dealer(S_TIMEOUT);
    *holder = s_send_held(dealer, hold, first);
    zframe_t *frame = s_frame(s_submit_envelope(key, first), "first");
    zframe_send(&frame, dealer, 0);
    frame = s_frame(s_submit_envelope(key, other), "other");
    zframe_send(&frame, dealer, 0);
    return dealer;
}

/* The three replies to s_send_pair_in_one_batch, by cid: hold, first,
 * other; then the DEALER is closed. */
static void s_pair_replies(zsock_t **dealer, json_t *replies[3])
{
    for (int i = 0; i < 3; i++)
        replies[i] = NULL;
    for (int i = 0; i < 3; i++) {
        zframe_t *frame = zframe_recv(*dealer);
        if (!frame)
            break;
        json_t *reply = s_decoded(&frame);
        const char *cid = s_str(reply, "cid");
        replies[!strcmp(cid, "hold")    ? 0
                : !strcmp(cid, "first") ? 1
                                        : 2] = reply;
    }
    zsock_destroy(dealer);
    for (int i = 0; i < 3; i++)
        ck_assert_msg(replies[i] != NULL, "request %d not answered", i);
}

/* Let the batch that holder holds up commit, once intake has read the
 * pair s_send_pair_in_one_batch sent after it (its loop is idle while the
 * commit waits: 300 ms is ample), and collect the three replies. */
static void s_pair_release(PGconn *holder, zsock_t **dealer, json_t *replies[3])
{
    zclock_sleep(300);
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    s_pair_replies(dealer, replies);
}

/* Two referrals under one key in the same batch: the first is accepted,
 * the second refused, and both answers are in the trail, as they are when
 * the two come in different batches. */
START_TEST(a_conflict_within_a_batch_is_audited)
{
    json_t *first = s_example();
    json_t *other = s_another(first);

    PGconn *holder;
    zsock_t *dealer = s_send_pair_in_one_batch("pair-1", first, other, &holder);
    json_t *replies[3];
    s_pair_release(holder, &dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    ck_assert_str_eq(kh_client_reply_cmd(replies[1]), "ACCEPTED");
    ck_assert_str_eq(s_str(replies[2], "code"), "idempotency_conflict");

    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action = "
             "'referral.accepted' AND referral_id = '%s'",
             s_str(replies[1], "referral_id"));
    ck_assert_int_eq(s_count(sql), 1);
    ck_assert_int_eq(s_conflict_events(other), 1);
    ck_assert_int_eq(s_conflict_events(first), 0);
    /* The conflict committed with the batch, by its statement: no read
     * of its own held intake up. */
    char hash[65];
    ck_assert_int_eq(kh_payload_hash(other, hash), 0);
    snprintf(sql, sizeof sql,
             "SELECT count(DISTINCT xmin::text) FROM audit_events WHERE"
             " (action = 'referral.accepted' AND referral_id = '%s') OR"
             " (reason_code = 'idempotency_conflict' AND"
             " payload_hash = decode('%s', 'hex'))",
             s_str(replies[1], "referral_id"), hash);
    ck_assert_int_eq(s_count(sql), 1);
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    json_decref(first);
    json_decref(other);
}
END_TEST

/* Two more referrals in one batch under a key stored before: each is
 * held to the stored referral, refused, and in the trail once, written
 * with the batch. */
START_TEST(repeats_within_a_batch_are_held_to_the_stored_referral)
{
    json_t *first = s_example();
    json_t *other = s_another(first);
    json_t *third = json_deep_copy(first);
    json_object_set_new(third, "summary", json_string("a third referral"));
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    json_t *accepted =
        kh_client_submit(client, first, "pair-stored", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(accepted);
    ck_assert_str_eq(kh_client_reply_cmd(accepted), "ACCEPTED");
    kh_client_destroy(&client);

    PGconn *holder;
    zsock_t *dealer =
        s_send_pair_in_one_batch("pair-stored", other, third, &holder);
    json_t *replies[3];
    s_pair_release(holder, &dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    ck_assert_str_eq(s_str(replies[1], "code"), "idempotency_conflict");
    ck_assert_str_eq(s_str(replies[2], "code"), "idempotency_conflict");
    ck_assert_int_eq(s_conflict_events(other), 1);
    ck_assert_int_eq(s_conflict_events(third), 1);
    char hashes[2][65], sql[512];
    ck_assert_int_eq(kh_payload_hash(other, hashes[0]), 0);
    ck_assert_int_eq(kh_payload_hash(third, hashes[1]), 0);
    snprintf(sql, sizeof sql,
             "SELECT count(DISTINCT xmin::text) FROM audit_events WHERE"
             " reason_code = 'idempotency_conflict' AND payload_hash IN"
             " (decode('%s', 'hex'), decode('%s', 'hex'))",
             hashes[0], hashes[1]);
    ck_assert_int_eq(s_count(sql), 1);
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    json_decref(accepted);
    json_decref(first);
    json_decref(other);
    json_decref(third);
}
END_TEST

/* A refusal is final only with its event in the trail (protocol.md): a
 * batch statement that fails for no fault of its rows (here an
 * administrator cancels it while it waits) answers its refusals retryable
 * with the rest, rather than committing the batch again without their
 * events. */
START_TEST(a_cancelled_batch_answers_its_refusals_retryable)
{
    json_t *referral = s_example();
    json_t *bad = khtest_json("{'not_a_referral': true}");
    PGconn *holder;
    zsock_t *dealer =
        s_send_pair_in_one_batch("cancel", referral, bad, &holder);
    /* The holder has the next batch's key too: it waits as well. */
    char *text = kh_payload_canonical(referral, NULL);
    ck_assert_ptr_nonnull(text);
    const char *params[] = {text};
    khtest_db_exec(holder,
                   "INSERT INTO referrals (id, partner_id, idempotency_key,"
                   " schema_version, payload, payload_hash) VALUES"
                   " (gen_random_uuid(), 'veilig-thuis', 'cancel',"
                   " 'referral.v1', convert_to($1, 'UTF8'),"
                   " sha256(convert_to($1, 'UTF8')))",
                   1, params);
    free(text);
    /* A batch waiting for the lock that started after since; cancel it.
     * Both batches run on intake's one writer session: the second is told
     * from the first by its start, not by the first being gone (a
     * cancelled statement still shows as waiting for a moment). */
#define S_WAITING                                                              \
    "FROM pg_stat_activity WHERE application_name = 'ketenhub-intake'"         \
    " AND query LIKE 'WITH input%%' AND state = 'active' AND"                  \
    " wait_event_type = 'Lock' AND query_start > '%s'"
    char sql[512];
    char *since = khtest_db_value(s_db, "SELECT '-infinity'::timestamptz");
    for (int batch = 0; batch < 2; batch++) {
        char where[384];
        snprintf(where, sizeof where, S_WAITING, since);
        snprintf(sql, sizeof sql, "SELECT count(*) %s", where);
        ck_assert_msg(khtest_wait_count(s_db, sql, 1, 5000),
                      "batch %d does not wait", batch);
        if (batch == 0)
            zclock_sleep(300); /* first and other read, in the next batch */
        snprintf(sql, sizeof sql, "SELECT max(query_start) %s", where);
        free(since);
        since = khtest_db_value(s_db, sql);
        snprintf(sql, sizeof sql,
                 "SELECT count(pg_cancel_backend(pid)) %s AND query_start ="
                 " '%s'",
                 where, since);
        ck_assert_int_eq(s_count(sql), 1);
    }
    free(since);
#undef S_WAITING
    json_t *replies[3];
    s_pair_release(holder, &dealer, replies);
    for (int i = 1; i < 3; i++)
        ck_assert_msg(json_is_true(json_object_get(replies[i], "retryable")),
                      "%s answered %s %s, final", i == 1 ? "first" : "other",
                      kh_client_reply_cmd(replies[i]),
                      s_str(replies[i], "code"));
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    json_decref(referral);
    json_decref(bad);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE"
                             " idempotency_key LIKE 'cancel%'"),
                     0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE action"
                             " = 'referral.rejected'"),
                     0);
}
END_TEST

/* A refusal's event that the database refuses itself (a data error in
 * its row: here a trigger) would be refused at every resend: the batch
 * commits without it, its submissions accepted, and the refusal is
 * answered as it is, logged as unaudited (protocol.md). */
START_TEST(a_refusal_event_refused_itself_costs_the_batch_nothing)
{
    khtest_db_exec(s_db,
                   "CREATE FUNCTION s_poison() RETURNS trigger LANGUAGE"
                   " plpgsql AS $$BEGIN RAISE EXCEPTION 'poison' USING"
                   " ERRCODE = 'check_violation'; END$$;"
                   " CREATE TRIGGER s_poison BEFORE INSERT ON audit_events"
                   " FOR EACH ROW WHEN (NEW.action = 'referral.rejected')"
                   " EXECUTE FUNCTION s_poison()",
                   0, NULL);
    json_t *referral = s_example();
    json_t *bad = khtest_json("{'not_a_referral': true}");
    PGconn *holder;
    zsock_t *dealer =
        s_send_pair_in_one_batch("poison", referral, bad, &holder);
    json_t *replies[3];
    s_pair_release(holder, &dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[1]), "ACCEPTED");
    ck_assert_str_eq(kh_client_reply_cmd(replies[2]), "REJECTED");
    ck_assert(!json_is_true(json_object_get(replies[2], "retryable")));
    for (int k = 0; k < 3; k++)
        json_decref(replies[k]);
    json_decref(referral);
    json_decref(bad);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE"
                             " idempotency_key LIKE 'poison%'"),
                     2);
    ck_assert_int_gt(s_log_count("event=refusals_unaudited"), 0);
}
END_TEST

/* A conflict whose event cannot be written is not answered as a
 * conflict but with a retryable refusal; the same request again is
 * refused and audited once. */
/* A STATUS refused as not_found is answered only once its refusal is in
 * the trail (protocol.md): when the batch that holds that event cannot
 * commit, the partner gets a retryable refusal instead, and its resend is
 * audited and answered. */
START_TEST(a_status_not_found_is_not_answered_before_its_audit_event)
{
    json_t *referral = s_example();
    zsock_t *dealer = s_dealer(S_TIMEOUT);
    PGconn *holder = s_send_held(dealer, "status-hold", referral);
    zframe_t *frame =
        s_frame(json_pack("{s:s, s:s}", "cmd", "STATUS", "referral_id",
                          "01900000-0000-7000-8000-000000000000"),
                "status");
    zframe_send(&frame, dealer, 0);
    zclock_sleep(300); /* read, refused, waiting for the next commit */
    /* The writer goes: the waiting commit fails, and so does the next. */
    ck_assert_int_eq(s_count("SELECT count(pg_terminate_backend(pid)) FROM "
                             "pg_stat_activity WHERE application_name = "
                             "'ketenhub-intake' AND query LIKE "
                             "'WITH input%'"),
                     1);
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    json_t *status = NULL;
    for (int i = 0; i < 2; i++) {
        frame = zframe_recv(dealer);
        ck_assert_ptr_nonnull(frame);
        json_t *reply = s_decoded(&frame);
        if (strcmp(s_str(reply, "cid"), "status") == 0)
            status = reply;
        else
            json_decref(reply);
    }
    zsock_destroy(&dealer);
    ck_assert_ptr_nonnull(status);
    long events = s_count("SELECT count(*) FROM audit_events WHERE"
                          " action = 'request.rejected' AND"
                          " reason_code = 'not_found'");
    if (strcmp(s_str(status, "code"), "not_found") == 0)
        ck_assert_int_eq(events, 1);
    else {
        ck_assert_int_eq(events, 0);
        ck_assert(json_is_true(json_object_get(status, "retryable")));
    }
    json_decref(status);

    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 20);
    kh_error_t err;
    status = kh_client_status(client, "01900000-0000-7000-8000-000000000000",
                              1000, &err);
    ck_assert_msg(status != NULL, "%s", err.message);
    ck_assert_str_eq(s_str(status, "code"), "not_found");
    json_decref(status);
    ck_assert_int_ge(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'request.rejected' AND"
                             " reason_code = 'not_found'"),
                     1);
    kh_client_destroy(&client);
    json_decref(referral);
}
END_TEST

/* Intake again, with no registry refresh: its reader is used only for
 * what the tests below make it do. */
static void s_restart_intake_unrefreshed(void)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("600000");
    s_wait_ready();
}

/* End intake's reader, the connection of its reads (not the writer,
 * whose statement may be waiting): intake finds out when it next uses
 * it. */
static void s_end_reader(void)
{
    ck_assert_int_eq(s_count("SELECT count(pg_terminate_backend(pid)) FROM "
                             "pg_stat_activity WHERE application_name = "
                             "'ketenhub-intake' AND query NOT LIKE "
                             "'WITH input%'"),
                     1);
}

/* A repeat's conflict within a batch is written by the batch's own
 * statement: with intake's reader gone, it is answered all the same. */
START_TEST(a_conflict_within_a_batch_needs_no_read)
{
    s_restart_intake_unrefreshed();
    json_t *first = s_example();
    json_t *other = s_another(first);
    PGconn *holder;
    zsock_t *dealer = s_send_pair_in_one_batch("late-0", first, other, &holder);
    /* Both read (and their partner admitted) first: a reader gone makes
     * the registry stale, and a request read after that is refused
     * unavailable whatever its key. */
    zclock_sleep(300);
    s_end_reader();
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    json_t *replies[3];
    s_pair_replies(&dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    ck_assert_str_eq(kh_client_reply_cmd(replies[1]), "ACCEPTED");
    ck_assert_str_eq(s_str(replies[2], "code"), "idempotency_conflict");
    ck_assert_int_eq(s_conflict_events(other), 1);
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    json_decref(first);
    json_decref(other);
}
END_TEST

/* The conflicts with a key another process committed while the batch's
 * statement ran (of the submission, and of its repeat in the batch) are
 * written after the statement, and answered only once they are: when they
 * cannot be written (here a trigger refuses them), both submissions are
 * told to send again, and nothing is in the trail; sent again, each gets
 * its conflict, in the trail once. */
START_TEST(a_conflict_not_yet_audited_is_not_answered)
{
    json_t *theirs = s_example();
    json_t *ours = s_another(theirs);
    json_t *again = json_deep_copy(theirs);
    json_object_set_new(again, "summary", json_string("a third referral"));
    /* Before any batch waits: the trigger waits for their statements. */
    khtest_db_exec(s_db,
                   "CREATE FUNCTION s_unaudited() RETURNS trigger LANGUAGE"
                   " plpgsql AS $$BEGIN RAISE EXCEPTION 'no space left' USING"
                   " ERRCODE = 'disk_full'; END$$;"
                   " CREATE TRIGGER s_unaudited BEFORE INSERT ON audit_events"
                   " FOR EACH ROW WHEN (NEW.reason_code ="
                   " 'idempotency_conflict') EXECUTE FUNCTION s_unaudited()",
                   0, NULL);
    PGconn *other_intake = s_hold_key("late-1", theirs);
    PGconn *holder;
    zsock_t *dealer = s_send_pair_in_one_batch("late-1", ours, again, &holder);
    zclock_sleep(300); /* the pair is read: intake reads while it commits */
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    s_waits_for(other_intake);
    khtest_db_exec(other_intake, "COMMIT", 0, NULL);
    PQfinish(other_intake);
    json_t *replies[3];
    s_pair_replies(&dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    for (int i = 1; i < 3; i++) {
        ck_assert_str_eq(kh_client_reply_cmd(replies[i]), "REJECTED");
        ck_assert_str_eq(s_str(replies[i], "code"), "unavailable");
        ck_assert(json_is_true(json_object_get(replies[i], "retryable")));
    }
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    ck_assert_int_eq(s_conflict_events(ours), 0);
    ck_assert_int_eq(s_conflict_events(again), 0);

    khtest_db_exec(s_db, "DROP TRIGGER s_unaudited ON audit_events", 0, NULL);
    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 20);
    kh_error_t err;
    json_t *referrals[] = {ours, again};
    for (int i = 0; i < 2; i++) {
        json_t *reply =
            kh_client_submit(client, referrals[i], "late-1", 1000, &err);
        ck_assert_ptr_nonnull(reply);
        ck_assert_str_eq(s_str(reply, "code"), "idempotency_conflict");
        ck_assert_int_eq(s_conflict_events(referrals[i]), 1);
        json_decref(reply);
    }
    kh_client_destroy(&client);
    json_decref(theirs);
    json_decref(ours);
    json_decref(again);
}
END_TEST

/* Another intake process commits the same key while this one's statement
 * waits on it: the statement cannot see that row, the look-up after it
 * finds another referral, and that conflict is in the trail too. */
START_TEST(a_conflict_with_a_concurrent_commit_is_audited)
{
    json_t *theirs = s_example();
    json_t *ours = s_another(theirs);
    PGconn *holder = s_hold_key("race-1", theirs);
    zsock_t *dealer = s_dealer(S_TIMEOUT);
    zframe_t *frame = s_frame(s_submit_envelope("race-1", ours), "race");
    zframe_send(&frame, dealer, 0);
    s_waits_for(holder);
    khtest_db_exec(holder, "COMMIT", 0, NULL);
    PQfinish(holder);
    frame = zframe_recv(dealer);
    ck_assert_ptr_nonnull(frame);
    json_t *reply = s_decoded(&frame);
    zsock_destroy(&dealer);
    ck_assert_str_eq(s_str(reply, "code"), "idempotency_conflict");
    ck_assert_int_eq(s_conflict_events(ours), 1);
    json_decref(reply);
    json_decref(theirs);
    json_decref(ours);
}
END_TEST

/* A batch that committed but whose answers could not all be read (a key
 * another process committed meanwhile, whose look-up needs the reader,
 * which is gone) answers its submissions retryably, but its refusals as
 * they are: their events are in the trail, and each resend would add
 * another. */
START_TEST(a_refusal_in_a_batch_committed_unread_is_final)
{
    json_t *first = s_example();
    json_t *ours = s_another(first);
    json_t *bad = json_deep_copy(first);
    json_object_set_new(bad, "summary", json_integer(7));
    /* A batch held at its commit, so that the next two wait together;
     * and the key of one of those, held by "another process". */
    PGconn *theirs = s_hold_key("unread-1", first);
    zsock_t *dealer = s_dealer(S_TIMEOUT);
    PGconn *held = s_send_held(dealer, "unread-hold", first);
    zframe_t *frame = s_frame(s_submit_envelope("unread-1", ours), "first");
    zframe_send(&frame, dealer, 0);
    frame = s_frame(s_submit_envelope("unread-bad", bad), "other");
    zframe_send(&frame, dealer, 0);
    zclock_sleep(300); /* both read */
    khtest_db_exec(held, "ROLLBACK", 0, NULL);
    PQfinish(held);
    /* The pair's statement waits for the other process's key (not the
     * held batch's, which may still show as waiting for a moment). */
    s_waits_for(theirs);
    /* The reader, which the look-up after the statement needs, is gone
     * (intake finds out when it uses it). */
    ck_assert_int_eq(s_count("SELECT count(pg_terminate_backend(pid)) FROM "
                             "pg_stat_activity WHERE application_name = "
                             "'ketenhub-intake' AND query NOT LIKE "
                             "'WITH input%'"),
                     1);
    khtest_db_exec(theirs, "COMMIT", 0, NULL);
    PQfinish(theirs);
    json_t *replies[3];
    s_pair_replies(&dealer, replies);
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    ck_assert_str_eq(s_str(replies[1], "code"), "unavailable");
    ck_assert_str_eq(kh_client_reply_cmd(replies[2]), "REJECTED");
    ck_assert_msg(!json_is_true(json_object_get(replies[2], "retryable")),
                  "the refusal was answered %s", s_str(replies[2], "code"));
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action ="
             " 'referral.rejected' AND reason_code = '%s'",
             s_str(replies[2], "code"));
    ck_assert_int_eq(s_count(sql), 1);
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    json_decref(first);
    json_decref(ours);
    json_decref(bad);
}
END_TEST

/* A PING on the key a rotation left, answered while its overlap lasts, is
 * refused once the overlap ends: no change is committed, and none told,
 * when it does, so intake reads the registry again at that time itself
 * (here with no periodic refresh). */
START_TEST(a_key_whose_overlap_ended_is_refused_without_a_notice)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("3600000");
    s_wait_ready();
    zcert_t *current = s_make_cert("ov-new", true);
    zcert_t *previous = s_make_cert("ov-old", true);
    s_register("overlap", current);
    const char *params[] = {zcert_public_txt(previous)};
    khtest_db_exec(s_db,
                   "INSERT INTO partner_keys (curve_public_key, partner_id,"
                   " expires_at) VALUES ($1, 'overlap', now() + '2 s')",
                   1, params);
    zsock_t *stale = khpartner_connect(s_path("ov-old.cert"),
                                       s_path("hub.cert"), s_endpoint);
    zsock_set_rcvtimeo(stale, S_TIMEOUT);
    const char *want[] = {"PONG", "REJECTED"};
    for (int i = 0; i < 2; i++) {
        if (i) /* until the overlap's end has passed */
            ck_assert(khtest_wait_count(s_db,
                                        "SELECT count(*) FROM partner_keys"
                                        " WHERE partner_id = 'overlap'"
                                        " AND expires_at <= now()",
                                        1, 5000));
        zframe_t *ping = s_frame(json_pack("{s:s}", "cmd", "PING"), "ping");
        zframe_send(&ping, stale, 0);
        zframe_t *frame = zframe_recv(stale);
        ck_assert_msg(frame != NULL, "PING %d not answered", i);
        json_t *reply = s_decoded(&frame);
        ck_assert_str_eq(kh_client_reply_cmd(reply), want[i]);
        if (i)
            ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
        json_decref(reply);
    }
    zsock_destroy(&stale);
    zcert_destroy(&current);
    zcert_destroy(&previous);
}
END_TEST

/* Two SUBMITs of one idempotency key in one batch, on two keys of one
 * partner (a rotation's overlap): the second does not take the first's
 * answer, which may not hold for its key (here one whose overlap ended by
 * a change intake has not heard of yet): refused retryably, it goes in a
 * batch of its own when sent again, and is refused for good there. */
START_TEST(a_repeat_on_another_key_does_not_take_the_first_answer)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("3600000");
    s_wait_ready();
    zcert_t *current = s_make_cert("tk-new", true);
    zcert_t *previous = s_make_cert("tk-old", true);
    s_register("two-keys", current);
    const char *params[] = {zcert_public_txt(previous)};
    khtest_db_exec(s_db,
                   "INSERT INTO partner_keys (curve_public_key, partner_id,"
                   " expires_at) VALUES ($1, 'two-keys', now() + '1 hour')",
                   1, params);
    zsock_t *fresh = khpartner_connect(s_path("tk-new.cert"),
                                       s_path("hub.cert"), s_endpoint);
    zsock_t *stale = khpartner_connect(s_path("tk-old.cert"),
                                       s_path("hub.cert"), s_endpoint);
    zsock_set_rcvtimeo(fresh, S_TIMEOUT);
    zsock_set_rcvtimeo(stale, S_TIMEOUT);
    /* Both keys admitted: a PING on each is answered. */
    zsock_t *both[] = {fresh, stale};
    for (int i = 0; i < 2; i++) {
        zframe_t *ping = s_frame(json_pack("{s:s}", "cmd", "PING"), "ping");
        zframe_send(&ping, both[i], 0);
        zframe_t *pong = zframe_recv(both[i]);
        ck_assert_ptr_nonnull(pong);
        json_t *reply = s_decoded(&pong);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "PONG");
        json_decref(reply);
    }
    khtest_change_untold(s_db, "UPDATE partner_keys SET expires_at = now()"
                               " WHERE partner_id = 'two-keys'"
                               " AND expires_at IS NOT NULL");

    json_t *first = s_example();
    zsock_t *vt = s_dealer(S_TIMEOUT);
    PGconn *held = s_send_held(vt, "tk-hold", first);
    zframe_t *frame = s_frame(s_submit_envelope("tk-1", first), "fresh");
    zframe_send(&frame, fresh, 0);
    zclock_sleep(300); /* read before the other */
    frame = s_frame(s_submit_envelope("tk-1", first), "stale");
    zframe_send(&frame, stale, 0);
    zclock_sleep(300);
    khtest_db_exec(held, "ROLLBACK", 0, NULL);
    PQfinish(held);
    json_t *replies[3];
    zsock_t *from[] = {vt, fresh, stale};
    for (int i = 0; i < 3; i++) {
        frame = zframe_recv(from[i]);
        ck_assert_msg(frame != NULL, "request %d not answered", i);
        replies[i] = s_decoded(&frame);
    }
    ck_assert_str_eq(kh_client_reply_cmd(replies[0]), "ACCEPTED");
    ck_assert_str_eq(kh_client_reply_cmd(replies[1]), "ACCEPTED");
    ck_assert_str_eq(kh_client_reply_cmd(replies[2]), "REJECTED");
    ck_assert_str_eq(s_str(replies[2], "code"), "unavailable");
    for (int i = 0; i < 3; i++)
        json_decref(replies[i]);
    /* Sent again alone, the statement refuses it; the registry read
     * again then refuses it for good. */
    int64_t until_ms = zclock_mono() + 5000;
    const char *code = "";
    json_t *reply = NULL;
    do {
        json_decref(reply);
        frame = s_frame(s_submit_envelope("tk-1", first), "again");
        zframe_send(&frame, stale, 0);
        frame = zframe_recv(stale);
        ck_assert_ptr_nonnull(frame);
        reply = s_decoded(&frame);
        code = s_str(reply, "code");
    } while (strcmp(code, "unavailable") == 0 && zclock_mono() < until_ms);
    ck_assert_str_eq(code, "unknown_partner");
    json_decref(reply);
    zsock_destroy(&vt);
    zsock_destroy(&fresh);
    zsock_destroy(&stale);
    zcert_destroy(&current);
    zcert_destroy(&previous);
    json_decref(first);
}
END_TEST

START_TEST(unknown_keys_and_plain_clients_are_refused)
{
    long referrals = s_count("SELECT count(*) FROM referrals");
    json_t *referral = s_example();
    kh_error_t err;

    /* A key the partner directory does not hold: handshake refused. */
    kh_client_t *stranger = s_client("stranger");
    json_t *reply = kh_client_submit(stranger, referral, "s-1", 2000, &err);
    ck_assert_ptr_null(reply);
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
    kh_client_destroy(&stranger);

    /* A key in the directory but not in the registry: refused, audited. */
    kh_client_t *unregistered = s_client("unregistered");
    reply = kh_client_submit(unregistered, referral, "u-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
    json_decref(reply);
    kh_client_destroy(&unregistered);
    /* Both refusals are in the trail: the handshake refused for the
     * stranger's key (once, however often its client retried), and the
     * request refused for the unregistered one. */
    zcert_t *stranger_cert = zcert_load(s_path("stranger.cert"));
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE action = "
             "'auth.refused' AND actor_id = 'key:%s' AND origin_peer = "
             "'127.0.0.1' AND reason_path IS NULL",
             zcert_public_txt(stranger_cert));
    zcert_destroy(&stranger_cert);
    ck_assert_int_eq(s_count(sql), 1);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE "
                             "action = 'auth.refused' AND actor_id LIKE "
                             "'key:%'"),
                     2);

    /* A plain (non-CURVE) client never gets an answer. */
    zsock_t *plain = zsock_new(ZMQ_DEALER);
    zsock_set_rcvtimeo(plain, 1000);
    zsock_connect(plain, "%s", s_endpoint);
    zstr_send(plain, "hello");
    char *answer = zstr_recv(plain);
    ck_assert_ptr_null(answer);
    zsock_destroy(&plain);

    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), referrals);
    json_decref(referral);
}
END_TEST

/* A key no active partner holds is refused as such whatever its frame
 * holds: a body that does not decode, an envelope with a key the protocol
 * lacks, a command of another socket. Each answer carries the frame's cid
 * where it has one, and each refusal is in the trail as the key's, for
 * unknown_partner: not as a malformed request of some partner. */
START_TEST(an_unknown_key_is_refused_as_unknown_before_its_frame)
{
    zcert_t *cert = zcert_load(s_path("unregistered.cert"));
    ck_assert_ptr_nonnull(cert);
    char actor[64];
    snprintf(actor, sizeof actor, "key:%s", zcert_public_txt(cert));
    zcert_destroy(&cert);
    json_t *referral = s_example();
    json_t *bogus = s_submit_envelope("u-bogus", referral);
    json_object_set_new(bogus, "bogus", json_true());
    zframe_t *frames[] = {
        zframe_new("\xc1", 1),
        s_frame(bogus, "c-bogus"),
        s_frame(json_pack("{s:s}", "cmd", "HELLO"), "c-hello"),
    };
    const char *cids[] = {"", "c-bogus", "c-hello"};
    json_decref(referral);

    zsock_t *dealer = s_dealer_shaken_as("unregistered");
    for (size_t i = 0; i < sizeof frames / sizeof *frames; i++) {
        zframe_send(&frames[i], dealer, 0);
        zsock_set_rcvtimeo(dealer, S_TIMEOUT);
        zframe_t *frame = zframe_recv(dealer);
        ck_assert_msg(frame != NULL, "frame %zu: no answer", i);
        json_t *reply = s_decoded(&frame);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
        ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
        ck_assert_str_eq(s_str(reply, "cid"), cids[i]);
        json_decref(reply);
    }
    zsock_destroy(&dealer);

    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE actor_id = '%s'", actor);
    ck_assert_int_eq(s_count(sql), 3);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit_events WHERE actor_id = '%s' AND "
             "action = 'auth.refused' AND reason_code = 'unknown_partner' "
             "AND reason_path IS NULL",
             actor);
    ck_assert_int_eq(s_count(sql), 3);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);
}
END_TEST

/* Made-up keys, each refused at its handshake, cannot fill the trail: past
 * a burst, their refusals are counted in the log, not audited one by
 * one; yet each is told, once, also when the flood stops before the next
 * count is due. */
#define S_MADE_UP_KEYS 150
START_TEST(made_up_keys_at_the_handshake_are_audited_within_a_bound)
{
    int64_t elapsed;
    ck_assert_int_eq(khtest_strangers_refused(s_path("hub.cert"), s_endpoint,
                                              S_MADE_UP_KEYS, 60000, &elapsed),
                     S_MADE_UP_KEYS);
    ck_assert(khtest_log_has(s_path("intake.log"),
                             "event=auth_refusals_unaudited", 5000));
    /* Past the burst, the bucket refills at KH_REFUSAL_RATE while the
     * flood lasts. */
    ck_assert_int_le(
        s_count("SELECT count(*) FROM audit_events WHERE"
                " action = 'auth.refused'"),
        khtest_bucket_max(KH_REFUSAL_BURST, KH_REFUSAL_RATE, elapsed));
    /* Partners are served all the same. */
    kh_client_t *vt = s_client("vt");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(vt, S_TIMEOUT, &err), 0);
    kh_client_destroy(&vt);
    /* Each key's refusal is told once (its retries from the same address
     * within a minute not at all), audited or counted: the count left
     * when the flood stopped, well within 10 s of the last, at the stop. */
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    s_intake = -1;
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    ck_assert_int_eq(khtest_refusals_told(s_path("intake.log")),
                     S_MADE_UP_KEYS);
}
END_TEST

/* Keys added and removed while intake runs take effect without a restart:
 * the handshake reads the directory, the request reads the registry. */
START_TEST(partners_added_and_removed_while_running)
{
    zcert_t *late = s_make_cert("late", true);
    s_register("late-partner", late);
    zcert_destroy(&late);
    kh_client_t *client = s_client("late");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);

    char path[512];
    snprintf(path, sizeof path, "%s/partners/late.cert", s_dir);
    ck_assert_int_eq(unlink(path), 0);
    client = s_client("late");
    ck_assert_int_eq(kh_client_ping(client, 2000, &err), -1);
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
    kh_client_destroy(&client);
}
END_TEST

/* A partner added while the database is away is not told it is unknown
 * (a final answer): intake cannot read the registry to know. */
START_TEST(a_partner_added_while_the_database_is_away_is_not_refused_for_good)
{
    /* No refresh of the registry finds the partner before the database
     * goes away. */
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("3600000");
    s_wait_ready();
    zcert_t *late = s_make_cert("late", true);
    s_register("late-partner", late);
    zcert_destroy(&late);
    ck_assert_int_eq(khtest_pgtmp("down", "fast"), 0);
    kh_client_t *client = s_client("late");
    kh_error_t err;
    json_t *referral = s_example();
    json_t *reply =
        kh_client_submit(client, referral, "late-1", S_TIMEOUT, &err);
    ck_assert_int_eq(khtest_pgtmp("up", NULL), 0);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    json_decref(reply);
    kh_client_set_retries(client, 20);
    reply = kh_client_submit(client, referral, "late-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
    PQreset(s_db);
}
END_TEST

/* Ping with client until intake's log has text more often than before
 * (PostgreSQL's notices reach intake in milliseconds, but a loaded
 * machine may take a second). */
static void s_ping_until_logged(kh_client_t *client, const char *text,
                                int before)
{
    kh_error_t err;
    int64_t until = zclock_mono() + 10000;
    while (s_log_count(text) == before && zclock_mono() < until) {
        kh_client_ping(client, S_TIMEOUT, &err);
        zclock_sleep(20);
    }
    ck_assert_msg(s_log_count(text) > before, "intake never logged %s", text);
}

/* Make the change sql to the registry, and ping with client until intake
 * has taken its notice (as it reads a request): its log says it read the
 * registry as it is now. */
static void s_registry_change_taken(kh_client_t *client, const char *sql)
{
    khtest_db_exec(s_db, sql, 0, NULL);
    char text[64];
    snprintf(text, sizeof text, "event=partners_changed partners=%ld\n",
             s_count("SELECT count(*) FROM (" KH_PARTNER_KEYS_SQL ") k"));
    s_ping_until_logged(client, text, s_log_count(text));
}

/* A partner revoked while intake runs is refused at its next request, on
 * the connection it already had, and so is a key that a rotation without
 * overlap ended: PostgreSQL tells intake of the change as it commits, long
 * before the refresh of the registry (an hour here) would find it. */
START_TEST(a_revocation_applies_from_the_next_request)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("3600000");
    s_wait_ready();
    const char *ids[] = {"revoked-partner", "ended-key"};
    const char *sql[] = {
        "UPDATE partners SET revoked_at = now() WHERE id = 'revoked-partner'",
        "UPDATE partner_keys SET expires_at = now() WHERE partner_id ="
        " 'ended-key'"};
    json_t *referral = s_example();
    for (size_t i = 0; i < 2; i++) {
        zcert_t *cert = s_make_cert(ids[i], true);
        s_register(ids[i], cert);
        zcert_destroy(&cert);
        kh_client_t *client = s_client(ids[i]);
        kh_error_t err;
        char key[32];
        snprintf(key, sizeof key, "%s-1", ids[i]);
        json_t *reply =
            kh_client_submit(client, referral, key, S_TIMEOUT, &err);
        ck_assert_ptr_nonnull(reply);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
        json_decref(reply);

        s_registry_change_taken(client, sql[i]); /* not in an hour */
        snprintf(key, sizeof key, "%s-2", ids[i]);
        reply = kh_client_submit(client, referral, key, S_TIMEOUT, &err);
        ck_assert_msg(reply != NULL, "%s: no answer", ids[i]);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
        ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
        json_decref(reply);
        kh_client_destroy(&client);
        char count[160];
        snprintf(count, sizeof count,
                 "SELECT count(*) FROM referrals WHERE partner_id = '%s'",
                 ids[i]);
        ck_assert_int_eq(s_count(count), 1);
    }
    json_decref(referral);
}
END_TEST

/* Restart intake reading the registry by its notices only (and each
 * hour); register partner with the certificate of name, whose client
 * (without retries, returned) then submits referral under "name-1",
 * ACCEPTED. */
static kh_client_t *s_registry_refreshed_hourly(const char *name,
                                                const char *partner,
                                                const json_t *referral)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("3600000");
    s_wait_ready();
    zcert_t *cert = s_make_cert(name, true);
    s_register(partner, cert);
    zcert_destroy(&cert);
    kh_client_t *client = s_client(name);
    kh_client_set_retries(client, 0);
    char idem[64];
    snprintf(idem, sizeof idem, "%s-1", name);
    kh_error_t err;
    json_t *reply = kh_client_submit(client, referral, idem, S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    /* The registration's notice may have come with the read its unknown
     * key made, and be taken at the next request: that is this one, not
     * the caller's next, which must find the registry as it is now. */
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    return client;
}

/* client, retrying while it is told to, submits referral under idem and
 * is refused as unknown_partner at last; partner has one referral, the
 * first s_registry_refreshed_hourly gave it. */
static void s_refused_for_good(kh_client_t *client, const json_t *referral,
                               const char *idem, const char *partner)
{
    kh_client_set_retries(client, 20);
    kh_error_t err;
    json_t *reply = kh_client_submit(client, referral, idem, S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "no answer: %s", err.message);
    ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
    json_decref(reply);
    char sql[128];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM referrals WHERE partner_id = '%s'", partner);
    ck_assert_int_eq(s_count(sql), 1);
}

/* A change to the registry that intake cannot read (its keys locked here
 * past intake's read timeout) leaves it admitting no key until it has read
 * them: a partner revoked meanwhile is not served from the registry as it
 * was before, but told to come again, and refused once it is read. */
START_TEST(a_registry_change_not_yet_read_admits_no_key)
{
    json_t *referral = s_example();
    kh_client_t *client =
        s_registry_refreshed_hourly("stale", "stale-partner", referral);
    kh_error_t err;
    json_t *reply;

    int unread = s_log_count("event=partners_unread");
    PGconn *locker =
        khtest_revoke_unreadably(s_db, s_conninfo, "stale-partner");
    /* Told, intake tries to read the registry at the next request. */
    s_ping_until_logged(client, "event=partners_unread", unread);
    reply = kh_client_submit(client, referral, "stale-2", S_TIMEOUT, &err);
    khtest_db_exec(locker, "COMMIT", 0, NULL);
    PQfinish(locker);
    ck_assert_msg(reply != NULL, "no answer: %s", err.message);
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    json_decref(reply);

    s_refused_for_good(client, referral, "stale-3", "stale-partner");
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A key revoked by a change intake has not heard of yet submits nothing:
 * the batch's statement checks the key itself, and the submission is
 * refused as while the registry is stale, which makes intake read it;
 * the next request is refused for good. */
START_TEST(a_submission_on_a_key_revoked_untold_is_not_taken)
{
    json_t *referral = s_example();
    kh_client_t *client =
        s_registry_refreshed_hourly("untold", "untold-partner", referral);
    kh_error_t err;
    json_t *reply;

    khtest_change_untold(s_db, "UPDATE partners SET revoked_at = now()"
                               " WHERE id = 'untold-partner'");
    reply = kh_client_submit(client, referral, "untold-2", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "no answer: %s", err.message);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE"
                             " partner_id = 'untold-partner'"),
                     1);

    s_refused_for_good(client, referral, "untold-3", "untold-partner");
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'referral.accepted'"
                             " AND actor_id = 'untold-partner'"),
                     1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A STATUS on a key revoked by a change intake has not heard of yet
 * tells nothing of the partner's referral: refused as while the registry
 * is stale, then for good. */
START_TEST(a_status_on_a_key_revoked_untold_tells_nothing)
{
    json_t *referral = s_example();
    kh_client_t *client =
        s_registry_refreshed_hourly("asker", "asker-partner", referral);
    char *id = khtest_db_value(
        s_db, "SELECT id FROM referrals WHERE partner_id = 'asker-partner'");
    khtest_change_untold(s_db, "UPDATE partners SET revoked_at = now()"
                               " WHERE id = 'asker-partner'");
    kh_error_t err;
    json_t *reply = kh_client_status(client, id, S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "no answer: %s", err.message);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    ck_assert_ptr_null(json_object_get(reply, "deliveries"));
    json_decref(reply);
    kh_client_set_retries(client, 20);
    reply = kh_client_status(client, id, S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "no answer: %s", err.message);
    ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
    json_decref(reply);
    free(id);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* Submit referral under key with the client of name; the referral's id,
 * or NULL when the request got no ACCEPTED answer. */
static char *s_accepted_by(const char *name, const json_t *referral,
                           const char *key)
{
    kh_client_t *client = s_client(name);
    kh_error_t err;
    json_t *reply = kh_client_submit(client, referral, key, 2000, &err);
    kh_client_destroy(&client);
    char *id = reply && strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0
                   ? strdup(s_str(reply, "referral_id"))
                   : NULL;
    json_decref(reply);
    return id;
}

/* A partner whose key an administrator rotates keeps its id: during the
 * overlap the old and the new key both submit as that partner; once the
 * overlap ends, the old key is refused at the handshake. The handshake
 * also honours the end a certificate names while its file is there. */
START_TEST(a_rotated_key_admits_its_partner_for_the_overlap_only)
{
    setenv("KH_DATABASE_URL", s_conninfo, 1);
    unsetenv("KH_PARTNER_CERT_DIR");
    char *text = NULL;
    int rc = KHTEST_CTL(&text, "partner", "add", "rotating", "--name", "R",
                        "--kind", "other", "--cert-dir", s_path("partners"),
                        "--out", s_path("rot1"));
    ck_assert_msg(rc == 0, "partner add: %s", text);
    free(text);
    json_t *referral = s_example();
    char *id = s_accepted_by("rot1/rotating", referral, "rot-1");
    ck_assert_ptr_nonnull(id);
    free(id);

    rc = KHTEST_CTL(&text, "partner", "rotate", "rotating", "--cert-dir",
                    s_path("partners"), "--out", s_path("rot2"), "--overlap",
                    "1");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    const char *keys[] = {"rot-2", "rot-3"};
    const char *names[] = {"rot1/rotating", "rot2/rotating"};
    for (int i = 0; i < 2; i++) {
        json_t *another = s_another(referral);
        id = s_accepted_by(names[i], another, keys[i]);
        ck_assert_msg(id != NULL, "%s was not accepted", names[i]);
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM referrals WHERE id = '%s' AND "
                 "partner_id = 'rotating'",
                 id);
        ck_assert_int_eq(s_count(sql), 1);
        free(id);
        json_decref(another);
    }

    /* The previous certificate names its end: past it, the handshake
     * refuses the key although the registry still admits it. */
    char *previous =
        khtest_read_file(s_path("partners/rotating.previous.cert"));
    ck_assert_ptr_nonnull(previous);
    char *at = strstr(previous, "expires-at = \"");
    ck_assert_ptr_nonnull(at);
    memcpy(at + strlen("expires-at = \""), "2001", 4);
    khtest_write_file(s_path("partners/rotating.previous.cert"), previous);
    kh_client_t *client = s_client("rot1/rotating");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, 2000, &err), -1);
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
    kh_client_destroy(&client);
    memcpy(at + strlen("expires-at = \""), "2999", 4);
    khtest_write_file(s_path("partners/rotating.previous.cert"), previous);
    free(previous);
    client = s_client("rot1/rotating");
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);
    /* And past the registry's end, the request is refused although the
     * handshake lets the key in. */
    ck_assert_int_eq(s_count("WITH e AS (UPDATE partner_keys SET expires_at ="
                             " now() WHERE partner_id = 'rotating' AND"
                             " expires_at IS NOT NULL RETURNING 1)"
                             " SELECT count(*) FROM e"),
                     1);
    zclock_sleep(400); /* KH_PARTNER_REFRESH_MS=200 */
    json_t *another = s_another(referral);
    client = s_client("rot1/rotating");
    json_t *reply = kh_client_submit(client, another, "rot-4", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(s_str(reply, "code"), "unknown_partner");
    json_decref(reply);
    kh_client_destroy(&client);

    /* A rotation without overlap, to a pair the partner made itself: the
     * new key only, at once. */
    ck_assert_int_eq(khproc_sh("%s/tools/partner/ketenhub-partner keygen "
                               "rotating --out %s >/dev/null",
                               KH_TEST_BINARY_DIR, s_path("rot3")),
                     0);
    rc = KHTEST_CTL(&text, "partner", "rotate", "rotating", "--cert-dir",
                    s_path("partners"), "--public-cert",
                    s_path("rot3/rotating.cert"), "--overlap", "0");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    for (int i = 0; i < 2; i++) {
        client = s_client(names[i]);
        ck_assert_int_eq(kh_client_ping(client, 2000, &err), -1);
        ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
        kh_client_destroy(&client);
    }
    id = s_accepted_by("rot3/rotating", another, "rot-5");
    ck_assert_ptr_nonnull(id);
    free(id);
    json_decref(another);
    json_decref(referral);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "partner_id = 'rotating'"),
                     4);
}
END_TEST

/* The next hub key served beside the current one (KH_HUB_CERT_NEXT on
 * KH_INTAKE_ENDPOINT_NEXT): a partner that has the current hub
 * certificate submits where it always did, one that has the next one on
 * the next endpoint, where the current certificate gets no answer, nor
 * the next one on the current endpoint. The log says once per partner key
 * which hub key it used. One setting without the other stops intake at
 * its start, naming the one missing. */
START_TEST(the_next_hub_key_is_served_beside_the_current_one)
{
    zcert_t *next = zcert_new();
    zcert_save(next, s_path("hub-next.cert"));
    zcert_destroy(&next);
    char next_cert[512], next_endpoint[64];
    snprintf(next_cert, sizeof next_cert, "%s", s_path("hub-next.cert"));
    snprintf(next_endpoint, sizeof next_endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    const char *settings[] = {"KH_HUB_CERT_NEXT", next_cert,
                              "KH_INTAKE_ENDPOINT_NEXT", next_endpoint, NULL};
    s_restart_intake_with(settings);

    json_t *referral = s_example();
    char *id = s_accepted_by("vt", referral, "hub-key-current");
    ck_assert_ptr_nonnull(id);
    free(id);
    /* endpoint, hub certificate: answered? */
    const struct {
        const char *endpoint, *hub;
        bool answered;
    } tries[] = {{next_endpoint, next_cert, true},
                 {next_endpoint, s_path("hub.cert"), false},
                 {s_endpoint, next_cert, false}};
    for (size_t i = 0; i < sizeof tries / sizeof tries[0]; i++) {
        char hub[512], key[64];
        snprintf(hub, sizeof hub, "%s", tries[i].hub);
        snprintf(key, sizeof key, "hub-key-%zu", i);
        kh_error_t err;
        kh_client_t *client =
            kh_client_new(tries[i].endpoint, hub, s_path("vt.cert"), &err);
        ck_assert_msg(client != NULL, "%s", err.message);
        kh_client_set_retries(client, 0);
        json_t *reply = kh_client_submit(
            client, referral, key, tries[i].answered ? S_TIMEOUT : 1500, &err);
        ck_assert_msg((reply && strcmp(kh_client_reply_cmd(reply),
                                       "ACCEPTED") == 0) == tries[i].answered,
                      "try %zu: %s", i, reply ? "answered" : err.message);
        json_decref(reply);
        kh_client_destroy(&client);
    }
    json_decref(referral);
    zcert_t *vt = zcert_load(s_path("vt.cert"));
    char told[160];
    for (int n = 0; n < 2; n++) {
        snprintf(told, sizeof told,
                 "event=hub_key key=%s peer=127.0.0.1 "
                 "hub_key=%s",
                 zcert_public_txt(vt), n ? "next" : "current");
        khproc_sh("grep -E 'batch|warn' %s | tail -20 >&2",
                  s_path("intake.log"));
        ck_assert_msg(khtest_log_has(s_path("intake.log"), told, 2000),
                      "no '%s' in %s", told, s_path("intake.log"));
    }
    zcert_destroy(&vt);

    /* A next key without its endpoint. */
    ck_assert(WIFEXITED(khproc_stop(s_intake, SIGTERM, 5000)));
    setenv("KH_HUB_CERT_NEXT", next_cert, 1);
    s_start_intake();
    unsetenv("KH_HUB_CERT_NEXT");
    int status = khproc_stop(s_intake, 0, 10000);
    s_intake = -1;
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 2, "status %d",
                  status);
    ck_assert(khtest_log_has(s_path("intake.log"),
                             "path=KH_INTAKE_ENDPOINT_NEXT", 0));
}
END_TEST

/* Exit status of ketenhub-partner ARGS as partner vt, without retries. */
static int s_partner_command(const char *args)
{
    return khproc_sh("%s/tools/partner/ketenhub-partner --endpoint %s "
                     "--hub-cert %s --cert %s --timeout 1000 --retries 0 "
                     "%s >>%s 2>&1",
                     KH_TEST_BINARY_DIR, s_endpoint, s_path("hub.cert"),
                     s_path("vt.cert"), args, s_path("partner.log"));
}

/* A key the hub refuses is exit 3 for every command of the partner tool
 * (README), whether the handshake fails or the registry has revoked it:
 * no referral the partner could fix would pass. */
START_TEST(the_partner_tool_exits_3_for_a_revoked_key)
{
    json_t *referral = s_example();
    ck_assert_int_eq(json_dump_file(referral, s_path("one.json"), 0), 0);
    json_decref(referral);
    khtest_db_exec(s_db,
                   "UPDATE partners SET revoked_at = now()"
                   " WHERE id = 'veilig-thuis'",
                   0, NULL);
    zclock_sleep(600); /* KH_PARTNER_REFRESH_MS is 200 */
    ck_assert_int_eq(s_partner_submit("one.json"), 3);
    ck_assert_int_eq(s_partner_command("ping"), 3);
    ck_assert_int_eq(
        s_partner_command("status 01900000-0000-7000-8000-000000000000"), 3);
    ck_assert_int_eq(
        khproc_sh("grep -q unknown_partner %s", s_path("partner.log")), 0);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), 0);
}
END_TEST

/* After the commit, intake tells routing (CURVE, the hub's own key) which
 * referrals are new; a resubmission is not news. */
/* Ctrl-C stops the partner tool at once, whatever it waits for, and it
 * says so: it neither sends the request again nor reports the hub silent
 * for the whole timeout. */
START_TEST(the_partner_tool_stops_at_once_when_interrupted)
{
    /* A hub that takes the connection and never says a word: a STREAM
     * socket, which tells when the tool has connected (and so is past
     * its start-up, its Ctrl-C handler in place). */
    zsock_t *hub = zsock_new(ZMQ_STREAM);
    ck_assert_ptr_nonnull(hub);
    int port = zsock_bind(hub, "tcp://127.0.0.1:*");
    ck_assert_int_gt(port, 0);
    zsock_set_rcvtimeo(hub, 10000);
    char silent[64], log[512];
    snprintf(silent, sizeof silent, "tcp://127.0.0.1:%d", port);
    snprintf(log, sizeof log, "%s", s_path("interrupted.log"));
    char *argv[] = {"ketenhub-partner",
                    "--endpoint",
                    silent,
                    "--hub-cert",
                    s_path("hub.cert"),
                    "--cert",
                    s_path("vt.cert"),
                    "--timeout",
                    "20000",
                    "--retries",
                    "3",
                    "ping",
                    NULL};
    pid_t pid = khproc_spawn(
        KH_TEST_BINARY_DIR "/tools/partner/ketenhub-partner", argv, NULL, log);
    ck_assert_int_gt(pid, 0);
    zmsg_t *connected = zmsg_recv(hub);
    ck_assert_msg(connected != NULL, "the tool did not connect in 10 s");
    zmsg_destroy(&connected);
    int status = khproc_stop(pid, SIGINT, 3000);
    zsock_destroy(&hub);
    ck_assert_msg(status != -1, "still running 3 s after SIGINT");
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 3);
    ck_assert_int_eq(khproc_sh("grep -q 'interrupted before the hub replied' "
                               "%s",
                               log),
                     0);
    ck_assert_int_ne(khproc_sh("grep -q 'within' %s", log), 0);
}
END_TEST

/* A batch that inserts more referrals than one message may name (the
 * decoder's limit on an array, 1024) wakes routing with several messages,
 * each within that limit, naming all of them. */
START_TEST(a_large_batch_wakes_routing_in_messages_routing_accepts)
{
    /* More than a wake-up may name, fewer than fill a batch's 8 MiB. */
    enum { S_MANY = 1050 };
    const char *settings[] = {"KH_INTAKE_BATCH", "2048", "KH_LOG_LEVEL",
                              "debug", NULL};
    s_restart_intake_with(settings);
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    zsock_t *pull = zsock_new(ZMQ_PULL);
    zcert_apply(hub, pull);
    zsock_set_curve_server(pull, 1);
    zsock_set_rcvtimeo(pull, 10000);
    ck_assert_int_ge(zsock_bind(pull, "%s", s_routing), 0);
    zclock_sleep(500); /* intake's PUSH reconnects */

    /* All of them wait together for the batch after the held one, sent on
     * a few connections (each gets its replies all at once, and a
     * connection holds at most 1,000 of them). */
    enum { S_DEALERS = 4 };
    json_t *referral = s_example();
    zsock_t *dealers[S_DEALERS];
    for (int d = 0; d < S_DEALERS; d++)
        dealers[d] = s_dealer(30000);
    PGconn *holder = s_send_held(dealers[0], "many-hold", referral);
    for (int i = 0; i < S_MANY; i++) {
        char key[32];
        snprintf(key, sizeof key, "many-%d", i);
        zframe_t *frame = s_frame(s_submit_envelope(key, referral), key);
        zframe_send(&frame, dealers[i % S_DEALERS], 0);
    }
    zclock_sleep(2000); /* intake reads them all while the held one waits */
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    for (int i = 0; i < S_MANY + 1; i++) {
        /* The held one first, then in turn. */
        int d = i == 0 ? 0 : (i - 1) % S_DEALERS;
        zframe_t *frame = zframe_recv(dealers[d]);
        ck_assert_msg(frame != NULL, "reply %d of %d", i, S_MANY + 1);
        json_t *reply = s_decoded(&frame);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
        json_decref(reply);
    }
    for (int d = 0; d < S_DEALERS; d++)
        zsock_destroy(&dealers[d]);

    ck_assert_msg(khtest_log_has(s_path("intake.log"),
                                 "requests=1050 submissions=1050", 5000),
                  "the 1,050 were not committed together: see %s",
                  s_path("intake.log"));
    size_t named = 0, messages = 0, most = 0;
    while (named < S_MANY + 1) {
        zframe_t *frame = zframe_recv(pull);
        ck_assert_msg(frame != NULL, "%zu of %d named", named, S_MANY + 1);
        json_t *wakeup = NULL;
        kh_error_t err;
        kh_limits_t limits = kh_limits_default();
        ck_assert_msg(kh_msgpack_decode(zframe_data(frame), zframe_size(frame),
                                        &limits, &wakeup, &err) == 0,
                      "a wake-up routing refuses: %s", err.message);
        zframe_destroy(&frame);
        size_t ids = json_array_size(json_object_get(wakeup, "referral_ids"));
        named += ids;
        most = ids > most ? ids : most;
        messages++;
        json_decref(wakeup);
    }
    ck_assert_uint_eq(named, S_MANY + 1);
    ck_assert_uint_eq(messages, 3); /* the held one, then 1,050 in two */
    ck_assert_uint_eq(most, 1024);
    json_decref(referral);
    zsock_destroy(&pull);
    zcert_destroy(&hub);
}
END_TEST

START_TEST(accepted_referrals_wake_routing)
{
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    zsock_t *pull = zsock_new(ZMQ_PULL);
    zcert_apply(hub, pull);
    zsock_set_curve_server(pull, 1);
    zsock_set_rcvtimeo(pull, 3000);
    ck_assert_int_ge(zsock_bind(pull, "%s", s_routing), 0);
    zclock_sleep(500); /* intake's PUSH reconnects */

    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "wake-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    zframe_t *frame = zframe_recv(pull);
    ck_assert_ptr_nonnull(frame);
    json_t *wakeup = s_decoded(&frame);
    ck_assert_str_eq(s_str(wakeup, "cmd"), "ROUTE");
    json_t *ids = json_object_get(wakeup, "referral_ids");
    ck_assert_int_eq((int) json_array_size(ids), 1);
    ck_assert_str_eq(json_string_value(json_array_get(ids, 0)),
                     s_str(reply, "referral_id"));
    json_decref(wakeup);
    json_decref(reply);

    reply = kh_client_submit(client, referral, "wake-1", S_TIMEOUT, &err);
    ck_assert(json_is_true(json_object_get(reply, "duplicate")));
    json_decref(reply);
    zsock_set_rcvtimeo(pull, 500);
    frame = zframe_recv(pull);
    ck_assert_ptr_null(frame);

    json_decref(referral);
    kh_client_destroy(&client);
    zsock_destroy(&pull);
    zcert_destroy(&hub);
}
END_TEST

/* The whole path: referrals submitted to intake are routed by the real
 * routing service, and each partner's delivery holds exactly the fields
 * the default rules project for it, nothing else. */
START_TEST(submitted_referrals_are_routed_with_their_projections)
{
    zcert_t *avim = s_make_cert("avim", true);
    s_register("avim", avim);
    zcert_destroy(&avim);
    char env_db[1024], env_hub[600], env_routing[128];
    snprintf(env_db, sizeof env_db, "KH_DATABASE_URL=%s", s_conninfo);
    snprintf(env_hub, sizeof env_hub, "KH_HUB_CERT=%s", s_path("hub.cert"));
    snprintf(env_routing, sizeof env_routing, "KH_ROUTING_ENDPOINT=%s",
             s_routing);
    char env_rules[600], env_schema[600];
    snprintf(env_rules, sizeof env_rules, "KH_RULES_FILE=%s",
             khtest_src("schemas/rules/default.yaml"));
    snprintf(env_schema, sizeof env_schema, "KH_SCHEMA_DIR=%s",
             khtest_src("schemas"));
    char *env[] = {env_db,    env_hub,    env_routing,
                   env_rules, env_schema, "KH_ROUTING_POLL_MS=60000",
                   NULL};
    char *argv[] = {"ketenhub-routing", NULL};
    pid_t routing =
        khproc_spawn(KH_TEST_BINARY_DIR "/services/routing/ketenhub-routing",
                     argv, env, s_path("routing.log"));
    ck_assert_int_gt(routing, 0);
    /* bound (intake's wake-up socket connects to it on its own time) */
    ck_assert(khtest_log_has(s_path("routing.log"), "event=ready", 15000));

    kh_rules_partner_t partners[] = {{"veilig-thuis", true, false},
                                     {"zorgcoordinator", true, false},
                                     {"avim", true, false}};
    /* khtest_src reuses one buffer: keep each path apart. */
    char schema_path[600], rules_path[600];
    snprintf(schema_path, sizeof schema_path, "%s",
             khtest_src("schemas/referral.v1.json"));
    snprintf(rules_path, sizeof rules_path, "%s",
             khtest_src("schemas/rules/default.yaml"));
    kh_rules_options_t options = {
        .schema_path = schema_path, .partners = partners, .partner_count = 3};
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load(rules_path, &options, &err);
    ck_assert_msg(rules != NULL, "%s", err.message);
    kh_rules_result_t *result = kh_rules_result_new(rules);

    kh_client_t *client = s_client("vt");
    json_t *examples[16];
    size_t count = khtest_examples(examples, 16);
    for (size_t e = 0; e < count; e++) {
        json_t *referral = examples[e];
        char key[32];
        snprintf(key, sizeof key, "e2e-%zu", e);
        json_t *reply =
            kh_client_submit(client, referral, key, S_TIMEOUT, &err);
        ck_assert_ptr_nonnull(reply);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");

        /* Routed at once on intake's wake-up (routing polls only once a
         * minute here). */
        char sql[512];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM referrals WHERE id = '%s' AND state = "
                 "'routed'",
                 s_str(reply, "referral_id"));
        ck_assert_msg(khtest_wait_count(s_db, sql, 1, 10000),
                      "example %zu was not routed", e);

        kh_rules_eval(rules, referral, result);
        size_t targets = kh_rules_result_target_count(result);
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM deliveries WHERE referral_id = '%s'",
                 s_str(reply, "referral_id"));
        ck_assert_int_eq(s_count(sql), (long) targets);
        for (size_t t = 0; t < targets; t++) {
            json_t *projected = kh_rules_result_project(result, t, referral);
            char *expected = kh_payload_canonical(projected, NULL);
            const char *params[] = {s_str(reply, "referral_id"),
                                    kh_rules_result_partner(result, t)};
            PGresult *res = PQexecParams(
                s_db,
                "SELECT convert_from(payload, 'UTF8') FROM deliveries"
                " WHERE referral_id = $1 AND partner_id = $2",
                2, NULL, params, NULL, NULL, 0);
            ck_assert_int_eq(PQntuples(res), 1);
            ck_assert_str_eq(PQgetvalue(res, 0, 0), expected);
            PQclear(res);
            free(expected);
            json_decref(projected);
        }
        json_decref(reply);
        json_decref(referral);
    }
    kh_client_destroy(&client);
    kh_rules_result_destroy(&result);
    kh_rules_destroy(&rules);
    int status = khproc_stop(routing, SIGTERM, 5000);
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

START_TEST(killed_before_commit_then_retry_succeeds_once)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    /* Stopped intake takes the request into its queue but cannot commit. */
    kill(s_intake, SIGSTOP);
    json_t *reply = kh_client_submit(client, referral, "kill-1", 500, &err);
    ck_assert_ptr_null(reply);
    khproc_stop(s_intake, SIGKILL, 5000);
    s_intake = -1;
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'kill-1'"),
                     0);
    kh_client_destroy(&client);

    s_start_intake();
    s_wait_ready();
    client = s_client("vt");
    reply = kh_client_submit(client, referral, "kill-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    ck_assert(json_is_false(json_object_get(reply, "duplicate")));
    json_decref(reply);
    reply = kh_client_submit(client, referral, "kill-1", S_TIMEOUT, &err);
    ck_assert(json_is_true(json_object_get(reply, "duplicate")));
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'kill-1'"),
                     1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

START_TEST(database_down_gives_retryable_refusal_then_recovers)
{
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    ck_assert_int_eq(khtest_pgtmp("down", "fast"), 0);
    int64_t started = zclock_mono();
    json_t *reply =
        kh_client_submit(client, referral, "down-1", S_TIMEOUT, &err);
    int64_t elapsed = zclock_mono() - started;
    /* A STATUS has no idempotency key: its refusal asks only for the same
     * request again. */
    json_t *status = kh_client_status(
        client, "01a223fd-d3d3-7c41-9c55-0a3f3f0f6f2b", S_TIMEOUT, &err);
    /* Nor is a referral refused for good while its refusal cannot go in
     * the trail. */
    json_t *bad = json_deep_copy(referral);
    json_object_del(bad, "subject");
    json_t *refused = kh_client_submit(client, bad, "down-2", S_TIMEOUT, &err);
    ck_assert_int_eq(khtest_pgtmp("up", NULL), 0);
    ck_assert_msg(refused != NULL, "no answer to the bad referral");
    ck_assert_str_eq(s_str(refused, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(refused, "retryable")));
    json_decref(refused);
    ck_assert_msg(status != NULL, "no answer to STATUS while it was down");
    ck_assert_str_eq(s_str(status, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(status, "retryable")));
    ck_assert_msg(strstr(s_str(status, "message"), "same request again"), "%s",
                  s_str(status, "message"));
    json_decref(status);
    ck_assert_msg(reply != NULL, "no answer while the database was down");
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    ck_assert_int_lt(elapsed, S_AT_ONCE_MS);
    json_decref(reply);

    /* The client's retries carry it through the reconnection. */
    kh_client_set_retries(client, 20);
    reply = kh_client_submit(client, referral, "down-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    PQreset(s_db);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'down-1'"),
                     1);
    /* Sent again, the bad referral is refused, and the trail says so. */
    refused = kh_client_submit(client, bad, "down-2", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(refused);
    ck_assert_str_eq(s_str(refused, "code"), "schema.required");
    json_decref(refused);
    json_decref(bad);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'referral.rejected' AND reason_code"
                             " = 'schema.required'"),
                     1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* When the database goes, intake's registry connection tells it so, and
 * a change to the registry may go by unseen: partners are refused until
 * it is read again, and the refusal asks for the same request again. No
 * refresh runs in between here, so that this is what answers. */
START_TEST(a_lost_registry_connection_refuses_retryably)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    s_start_intake_refreshing("600000");
    s_wait_ready();
    kh_client_t *client = s_client("vt");
    json_t *referral = s_example();
    kh_error_t err;
    ck_assert_int_eq(khtest_pgtmp("down", "fast"), 0);
    json_t *replies[3] = {
        kh_client_submit(client, referral, "lost-1", S_TIMEOUT, &err),
        kh_client_status(client, "01a223fd-d3d3-7c41-9c55-0a3f3f0f6f2b",
                         S_TIMEOUT, &err),
        kh_client_submit(client, referral, "lost-1", S_TIMEOUT, &err)};
    ck_assert_int_eq(khtest_pgtmp("up", NULL), 0);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_msg(replies[i] != NULL, "no answer to request %zu", i);
        ck_assert_str_eq(s_str(replies[i], "code"), "unavailable");
        ck_assert(json_is_true(json_object_get(replies[i], "retryable")));
        ck_assert_msg(
            strstr(s_str(replies[i], "message"), "same request again"),
            "%zu: %s", i, s_str(replies[i], "message"));
    }
    /* The STATUS came after the loss was seen: the registry's refusal. */
    ck_assert_msg(strstr(s_str(replies[1], "message"), "partner registry"),
                  "%s", s_str(replies[1], "message"));
    for (size_t i = 0; i < 3; i++)
        json_decref(replies[i]);
    /* Connected again, intake reads the registry and admits the partner. */
    kh_client_set_retries(client, 20);
    json_t *reply =
        kh_client_submit(client, referral, "lost-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    PQreset(s_db);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'lost-1'"),
                     1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* Wait until intake's terminated sessions are gone (a backend ends after
 * pg_terminate_backend returns, and may commit one more request). */
static void s_wait_sessions_gone(void)
{
    ck_assert(khtest_wait_count(s_db,
                                "SELECT count(*) FROM pg_stat_activity WHERE "
                                "application_name = 'ketenhub-intake'",
                                0, 10000));
}

/* The backend of intake's reader connection: not the writer's, whose
 * last statement is a batch or, before the first, the end of its set-up
 * (store_connect). */
static long s_reader_pid(void)
{
    long pid = s_count("SELECT pid FROM pg_stat_activity WHERE"
                       " application_name = 'ketenhub-intake' AND query"
                       " NOT LIKE 'WITH input%' AND query <> 'RESET"
                       " lock_timeout'");
    ck_assert_int_gt(pid, 0);
    return pid;
}

/* A lock held on intake's tables (a migration, a LOCK TABLE) while intake
 * connects again does not stop its loop: PINGs are answered all along,
 * and once the lock goes intake connects and accepts again. */
START_TEST(a_locked_table_does_not_hold_up_a_reconnection)
{
    PGconn *holder = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(holder), CONNECTION_OK);
    khtest_db_exec(holder, "BEGIN", 0, NULL);
    khtest_db_exec(holder, "LOCK TABLE referrals IN ACCESS EXCLUSIVE MODE", 0,
                   NULL);
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'ketenhub-intake'",
                   0, NULL);
    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 0);
    kh_error_t err;
    /* Its attempts to connect meet the lock meanwhile. */
    for (int64_t until = zclock_mono() + 4000; zclock_mono() < until;) {
        ck_assert_msg(kh_client_ping(client, 1500, &err) == 0,
                      "no PONG while a table was locked: %s", err.message);
        zclock_sleep(200);
    }
    ck_assert_int_gt(s_log_count("lock timeout"), 0);
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    json_t *referral = s_example();
    bool accepted = false;
    for (int i = 0; i < 50 && !accepted; i++) {
        json_t *reply =
            kh_client_submit(client, referral, "after-lock", S_TIMEOUT, &err);
        accepted = reply && strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0;
        json_decref(reply);
        if (!accepted)
            zclock_sleep(200);
    }
    json_decref(referral);
    kh_client_destroy(&client);
    ck_assert_msg(accepted, "not accepted once the lock was gone");
}
END_TEST

/* The database away while partners keep submitting: each SUBMIT is
 * refused as unavailable at once, but the log tells the loss once and
 * each attempt to connect again, not a warning per request (a line per
 * SUBMIT flooded the log for as long as the outage lasted). */
START_TEST(a_database_away_is_not_logged_once_per_request)
{
    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 0);
    json_t *referral = s_example();
    kh_error_t err;
    khtest_db_allow_connections(S_DB, false);
    khtest_db_exec(s_db,
                   "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE application_name = 'ketenhub-intake'",
                   0, NULL);
    s_wait_sessions_gone();
    int before = s_log_count("event=db_error");
    int refused = 0;
    for (int i = 0; i < 40; i++) {
        char key[32];
        snprintf(key, sizeof key, "away-%d", i);
        json_t *reply =
            kh_client_submit(client, referral, key, S_TIMEOUT, &err);
        if (reply && strcmp(kh_client_reply_cmd(reply), "REJECTED") == 0 &&
            strcmp(s_str(reply, "code"), "unavailable") == 0)
            refused++;
        json_decref(reply);
        zclock_sleep(10);
    }
    int told = s_log_count("event=db_error") - before;
    bool retrying =
        khtest_log_has(s_path("intake.log"), "event=db_connect_failed", 5000);
    khtest_db_allow_connections(S_DB, true);
    ck_assert_int_eq(refused, 40);
    ck_assert_msg(told <= 3, "%d db_error lines for 40 requests: see %s", told,
                  s_path("intake.log"));
    ck_assert_msg(retrying, "no db_connect_failed: see %s",
                  s_path("intake.log"));
    /* The loss is told with libpq's words, not only "sqlstate=none". */
    ck_assert(!khtest_log_has(s_path("intake.log"), "msg=\"none\"", 0));

    kh_client_set_retries(client, 20);
    json_t *reply =
        kh_client_submit(client, referral, "away-0", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key LIKE 'away-%'"),
                     1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A database that stops answering mid-commit: SIGTERM still ends intake
 * in time, the waiting partner gets a retryable refusal (never a false
 * ACCEPTED), and the same key afterwards gets exactly one referral. */
/* The pid of intake's writer backend, after a first SUBMIT of referral
 * (its backend is then the one whose last statement was a batch). */
static pid_t s_writer(json_t *referral)
{
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "warm-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    json_decref(reply);
    kh_client_destroy(&client);
    long writer = s_count("SELECT pid FROM pg_stat_activity WHERE "
                          "application_name = 'ketenhub-intake' AND query "
                          "LIKE 'WITH input%'");
    ck_assert_int_gt(writer, 0);
    return (pid_t) writer;
}

START_TEST(sigterm_with_a_stalled_commit_exits_in_time)
{
    json_t *referral = s_example();
    pid_t writer = s_writer(referral);
    kill(writer, SIGSTOP);
    kh_error_t err;
    kh_client_t *client;
    json_t *reply;

    zsock_t *dealer = s_dealer(8000);
    /* connected (the handshake done) before the SUBMIT */
    zframe_t *frame = s_frame(json_pack("{s:s}", "cmd", "PING"), "ping");
    zframe_send(&frame, dealer, 0);
    frame = zframe_recv(dealer);
    ck_assert_ptr_nonnull(frame);
    zframe_destroy(&frame);
    frame = s_frame(s_submit_envelope("stall-1", referral), "s");
    zframe_send(&frame, dealer, 0);
    zclock_sleep(300); /* the commit is in flight and stuck */

    int64_t started = zclock_mono();
    kill(s_intake, SIGTERM);
    frame = zframe_recv(dealer);
    int status = khproc_stop(s_intake, 0, 8000);
    int64_t elapsed = zclock_mono() - started;
    s_intake = -1;
    kill(writer, SIGCONT);
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    ck_assert_int_lt(elapsed, 5000);
    ck_assert_ptr_nonnull(frame);
    reply = s_decoded(&frame);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    json_decref(reply);
    zsock_destroy(&dealer);

    s_start_intake();
    s_wait_ready();
    client = s_client("vt");
    reply = kh_client_submit(client, referral, "stall-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&client);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'stall-1'"),
                     1);
    json_decref(referral);
}
END_TEST

/* A database that takes connections and never answers them (its
 * postmaster stopped; a host whose packets are dropped looks the same):
 * while intake's reconnection waits for it, partners still get their
 * retryable refusal at once, and SIGTERM still ends intake at once. */
START_TEST(a_silent_database_stalls_neither_answers_nor_stop)
{
    json_t *referral = s_example();
    PGresult *res = PQexec(s_db, "SHOW data_directory");
    ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
    char pidfile[1024];
    snprintf(pidfile, sizeof pidfile, "%s/postmaster.pid",
             PQgetvalue(res, 0, 0));
    PQclear(res);
    char *text = khtest_read_file(pidfile);
    ck_assert_ptr_nonnull(text);
    pid_t postmaster = (pid_t) atol(text);
    free(text);
    ck_assert_int_gt(postmaster, 1);

    ck_assert_int_eq(kill(postmaster, SIGSTOP), 0);
    /* The sessions that exist go on; intake's are ended, so that it must
     * connect again. */
    ck_assert_int_eq(
        s_count("SELECT count(pg_terminate_backend(pid)) FROM "
                "pg_stat_activity WHERE application_name = 'ketenhub-intake'"),
        2);
    s_wait_sessions_gone();
    kh_error_t err;
    kh_client_t *client = s_client("vt");
    json_t *reply = NULL;
    int64_t slowest = 0;
    for (int i = 0; i < 4; i++) { /* the loss found, then reconnecting */
        json_decref(reply);
        int64_t started = zclock_mono();
        reply = kh_client_submit(client, referral, "silent-1", 3000, &err);
        int64_t elapsed = zclock_mono() - started;
        slowest = elapsed > slowest ? elapsed : slowest;
        if (!reply)
            break;
        zclock_sleep(300);
    }
    int64_t started = zclock_mono();
    int status = khproc_stop(s_intake, SIGTERM, 8000);
    int64_t stopping = zclock_mono() - started;
    s_intake = -1;
    kill(postmaster, SIGCONT);
    ck_assert_msg(reply != NULL, "no answer while the database was silent");
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    ck_assert_int_lt(slowest, S_AT_ONCE_MS);
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    ck_assert_int_lt(stopping, S_AT_ONCE_MS);
    json_decref(reply);
    kh_client_destroy(&client);
    json_decref(referral);
}
END_TEST

#define S_BOMBS 40

/* An encoded SUBMIT (cid cid) whose referral has, beside the example's
 * fields, one the schema refuses: 60 arrays of 1,000 one-letter strings,
 * a frame of some 120 KB that decodes into megabytes of JSON values. */
static zframe_t *s_bomb(json_t *referral, const char *cid)
{
    json_t *copy = json_deep_copy(referral);
    json_t *x = json_array();
    for (int a = 0; a < 60; a++) {
        json_t *strings = json_array();
        for (int i = 0; i < 1000; i++)
            json_array_append_new(strings, json_string("x"));
        json_array_append_new(x, strings);
    }
    json_object_set_new(copy, "x", x);
    json_t *envelope = s_submit_envelope(cid, copy);
    json_decref(copy);
    return s_frame(envelope, cid);
}

/* While a commit hangs, requests wait in the batch being filled: however
 * many come and however large they decode, that batch stops taking them
 * at its memory bound (the rest wait in ZeroMQ's queue), and every one is
 * answered once the commit goes through (promise 9). */
START_TEST(a_stalled_commit_keeps_waiting_requests_in_bounded_memory)
{
    khproc_stop(s_intake, SIGTERM, 5000);
    char routing[128], asan[512];
    snprintf(routing, sizeof routing, "KH_ROUTING_ENDPOINT=%s", s_routing);
    /* Memory is what is measured: ASan must not hold freed blocks back. */
    const char *was = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "ASAN_OPTIONS=%s%squarantine_size_mb=1",
             was ? was : "", was && *was ? ":" : "");
    char *extra[] = {routing, "KH_DB_COMMIT_TIMEOUT_MS=60000", asan, NULL};
    s_intake = khtest_start_intake(s_dir, s_endpoint, s_conninfo, extra);
    s_wait_ready();
    json_t *referral = s_example();
    pid_t writer = s_writer(referral);
    long before = khproc_mem_kib(s_intake, "VmRSS");

    kill(writer, SIGSTOP);
    zsock_t *dealer = s_dealer(30000);
    zframe_t *frame = s_frame(s_submit_envelope("held-1", referral), "held");
    zframe_send(&frame, dealer, 0);
    zclock_sleep(300); /* its commit is in flight and stuck */
    for (int i = 0; i < S_BOMBS; i++) {
        char cid[16];
        snprintf(cid, sizeof cid, "b%d", i);
        frame = s_bomb(referral, cid);
        zframe_send(&frame, dealer, 0);
    }
    zclock_sleep(2000);
    long during = khproc_mem_kib(s_intake, "VmRSS");
    kill(writer, SIGCONT);

    int accepted = 0, refused = 0;
    for (int i = 0; i < S_BOMBS + 1; i++) {
        frame = zframe_recv(dealer);
        ck_assert_msg(frame != NULL, "%d of %d answered", i, S_BOMBS + 1);
        json_t *reply = s_decoded(&frame);
        if (strcmp(s_str(reply, "cid"), "held") == 0) {
            ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
            accepted++;
            json_decref(reply);
        } else {
            s_expect_rejected(reply, "schema.unknown_field", "referral.x");
            refused++;
        }
    }
    ck_assert_int_eq(accepted, 1);
    ck_assert_int_eq(refused, S_BOMBS);
    /* Two batches of 8 MiB at most, one request past each bound, and what
     * ZeroMQ holds; all of them at once would be some 160 MiB. */
    fprintf(stderr,
            "intake rss before %ld KiB, with %d requests waiting %ld KiB\n",
            before, S_BOMBS, during);
    ck_assert_int_gt(before, 0);
    ck_assert_msg(during - before <= 48 * 1024,
                  "RSS grew by %ld KiB while requests waited", during - before);
    zsock_destroy(&dealer);
    json_decref(referral);
}
END_TEST

#define S_BIG 40

/* A batch larger than the socket to PostgreSQL holds, sent to a backend
 * that has stopped reading: intake's loop goes on (libpq sends the batch
 * as the socket takes it), the commit is given up in time, every request
 * is answered, and SIGTERM ends intake at once. */
START_TEST(a_large_batch_to_a_stalled_database_blocks_nothing)
{
    const char *settings[] = {"KH_DB_COMMIT_TIMEOUT_MS", "1000", NULL};
    s_restart_intake_with(settings);
    json_t *referral = s_example();
    pid_t writer = s_writer(referral);
    /* 4000 characters beyond the BMP, each 12 bytes in the canonical
     * JSON: some 48 KB a referral, megabytes a batch. */
    char *summary = malloc(4000 * 4 + 1);
    ck_assert_ptr_nonnull(summary);
    for (int i = 0; i < 4000; i++)
        memcpy(summary + 4 * i, "\xF0\x9F\x98\x80", 4);
    summary[4000 * 4] = '\0';
    json_object_set_new(referral, "summary", json_string(summary));
    free(summary);

    zsock_t *dealer = s_dealer(S_TIMEOUT);
    zframe_t *frame = s_frame(json_pack("{s:s}", "cmd", "PING"), "ping");
    zframe_send(&frame, dealer, 0);
    frame = zframe_recv(dealer); /* connected */
    ck_assert_ptr_nonnull(frame);
    zframe_destroy(&frame);
    /* They all wait for intake together, so that one batch takes them. */
    kill(s_intake, SIGSTOP);
    kill(writer, SIGSTOP);
    for (int i = 0; i < S_BIG; i++) {
        char key[32];
        snprintf(key, sizeof key, "big-%d", i);
        frame = s_frame(s_submit_envelope(key, referral), key);
        zframe_send(&frame, dealer, 0);
    }
    zclock_sleep(300);
    kill(s_intake, SIGCONT);

    int answered = 0;
    while (answered < S_BIG && (frame = zframe_recv(dealer))) {
        json_t *reply = s_decoded(&frame);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
        ck_assert_str_eq(s_str(reply, "code"), "unavailable");
        json_decref(reply);
        answered++;
    }
    int64_t started = zclock_mono();
    int status = khproc_stop(s_intake, SIGTERM, 8000);
    int64_t stopping = zclock_mono() - started;
    s_intake = -1;
    kill(writer, SIGCONT);
    ck_assert_int_eq(answered, S_BIG);
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    ck_assert_int_lt(stopping, 4000);
    zsock_destroy(&dealer);
    json_decref(referral);
}
END_TEST

/* The reader connection's backend stops answering: intake keeps
 * serving, gives up on that connection after a moment, reconnects, and
 * accepts again. */
START_TEST(a_stalled_reader_does_not_stop_intake)
{
    ck_assert_int_eq(s_count("SELECT count(*) FROM pg_stat_activity WHERE "
                             "application_name = 'ketenhub-intake'"),
                     2);
    long reader = s_reader_pid();
    kill((pid_t) reader, SIGSTOP);
    zclock_sleep(300); /* a registry refresh is now stuck */

    kh_client_t *client = s_client("vt");
    kh_error_t err;
    int rc = kh_client_ping(client, 3000, &err);
    kh_client_set_retries(client, 20);
    json_t *referral = s_example();
    json_t *reply = kh_client_submit(client, referral, "reader-1", 2000, &err);
    kill((pid_t) reader, SIGCONT);
    ck_assert_msg(rc == 0, "intake stopped answering");
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A registry refresh that times out closes the reader: intake reconnects
 * by itself, rather than at the next SUBMIT, which that would refuse. */
START_TEST(a_timed_out_registry_refresh_reconnects_at_once)
{
    long reader = s_reader_pid();
    int connected = s_log_count("event=db_connected");
    kill((pid_t) reader, SIGSTOP);
    /* A refresh (every 200 ms) times out after 1 s, and intake connects
     * again at once, before any request asks it to. */
    for (int64_t until = zclock_mono() + 10000;
         s_log_count("event=db_connected") == connected &&
         zclock_mono() < until;)
        zclock_sleep(50);
    kill((pid_t) reader, SIGCONT);
    ck_assert_msg(s_log_count("event=db_connected") > connected,
                  "not connected again within 10 s");

    kh_client_t *client = s_client("vt");
    kh_error_t err;
    json_t *referral = s_example();
    json_t *reply =
        kh_client_submit(client, referral, "refresh-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_msg(strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0, "%s %s",
                  kh_client_reply_cmd(reply), s_str(reply, "code"));
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

#define S_FLOOD 60

/* A partner over its rate gets retryable throttled refusals at once, with
 * nothing written for them; another partner is not held up. */
START_TEST(a_partner_over_its_rate_is_throttled)
{
    s_restart_intake_with((const char *const[]){
        "KH_PARTNER_RATE", "20", "KH_PARTNER_BURST", "20", NULL});

    json_t *referral = s_example();
    json_t *envelopes[S_FLOOD], *replies[S_FLOOD];
    for (int i = 0; i < S_FLOOD; i++) {
        char key[32];
        snprintf(key, sizeof key, "flood-%d", i);
        envelopes[i] = s_submit_envelope(key, referral);
    }
    int64_t start = zclock_mono();
    s_pipeline(envelopes, S_FLOOD, replies, S_TIMEOUT);
    int64_t elapsed = zclock_mono() - start;
    int accepted = 0, throttled = 0, first_throttled = -1;
    for (int i = 0; i < S_FLOOD; i++) {
        ck_assert_msg(replies[i] != NULL, "no reply to %d", i);
        const char *cmd = kh_client_reply_cmd(replies[i]);
        if (strcmp(cmd, "ACCEPTED") == 0)
            accepted++;
        else {
            ck_assert_str_eq(s_str(replies[i], "code"), "throttled");
            ck_assert(json_is_true(json_object_get(replies[i], "retryable")));
            ck_assert_int_ge(json_integer_value(
                                 json_object_get(replies[i], "retry_after_ms")),
                             1);
            throttled++;
            if (first_throttled < 0)
                first_throttled = i;
        }
        json_decref(replies[i]);
    }
    /* The burst, and what 20/s adds while the flood lasts. */
    ck_assert_int_ge(accepted, 20);
    ck_assert_int_le(accepted, khtest_bucket_max(20, 20, elapsed));
    ck_assert_int_eq(accepted + throttled, S_FLOOD);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"), accepted);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'throttled'"),
                     0);
    ck_assert(khtest_log_has(s_path("intake.log"), "event=throttled", 1000));

    /* Another partner has its own rate. */
    kh_client_t *zc = s_client("zc");
    kh_error_t err;
    json_t *reply = kh_client_submit(zc, referral, "zc-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&zc);

    /* Resent after the wait, with the same key: accepted. */
    zclock_sleep(1100);
    kh_client_t *vt = s_client("vt");
    char key[32];
    snprintf(key, sizeof key, "flood-%d", first_throttled);
    reply = kh_client_submit(vt, referral, key, S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    ck_assert(json_is_false(json_object_get(reply, "duplicate")));
    json_decref(reply);
    kh_client_destroy(&vt);
    json_decref(referral);
}
END_TEST

/* Each refusal is an audit event: a partner refused more often than
 * KH_PARTNER_REFUSALS a second (past 10 s worth) is throttled, at once,
 * for every request but PING, and the trail holds no more than that;
 * another partner is not held up. */
START_TEST(a_partner_refused_too_often_is_throttled_before_the_trail)
{
    /* 20 at once */
    s_restart_intake_with(
        (const char *const[]){"KH_PARTNER_REFUSALS", "2", NULL});

    /* While it is over, even a valid referral of that partner waits: the
     * last of the flood, read within moments of the refusals before it
     * (the bucket gains a refusal every 0.5 s). */
    json_t *envelopes[S_FLOOD + 1], *replies[S_FLOOD + 1];
    for (int i = 0; i < S_FLOOD; i++) {
        char id[37];
        kh_uuid_new(id);
        envelopes[i] =
            json_pack("{s:s, s:s}", "cmd", "STATUS", "referral_id", id);
    }
    json_t *referral = s_example();
    envelopes[S_FLOOD] = s_submit_envelope("over-1", referral);
    int64_t start = zclock_mono();
    s_pipeline(envelopes, S_FLOOD + 1, replies, S_TIMEOUT);
    int64_t elapsed = zclock_mono() - start;
    ck_assert_ptr_nonnull(replies[S_FLOOD]);
    ck_assert_str_eq(s_str(replies[S_FLOOD], "code"), "throttled");
    json_decref(replies[S_FLOOD]);
    int not_found = 0, throttled = 0;
    for (int i = 0; i < S_FLOOD; i++) {
        ck_assert_msg(replies[i] != NULL, "no reply to %d", i);
        const char *code = s_str(replies[i], "code");
        if (strcmp(code, "not_found") == 0)
            not_found++;
        else {
            ck_assert_str_eq(code, "throttled");
            ck_assert(json_is_true(json_object_get(replies[i], "retryable")));
            ck_assert_int_ge(json_integer_value(
                                 json_object_get(replies[i], "retry_after_ms")),
                             1);
            throttled++;
        }
        json_decref(replies[i]);
    }
    ck_assert_int_ge(not_found, 20);
    ck_assert_int_le(not_found, khtest_bucket_max(20, 2, elapsed));
    ck_assert_int_eq(not_found + throttled, S_FLOOD);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'not_found'"),
                     not_found);
    ck_assert(khtest_log_has(s_path("intake.log"), "over=refusals", 1000));

    /* A PING is answered, and another partner is served as always. */
    kh_client_t *vt = s_client("vt");
    kh_error_t err;
    kh_client_set_retries(vt, 0);
    ck_assert_int_eq(kh_client_ping(vt, S_TIMEOUT, &err), 0);
    kh_client_t *zc = s_client("zc");
    json_t *reply =
        kh_client_submit(zc, referral, "zc-over-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&zc);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE"
                             " partner_id = 'veilig-thuis'"),
                     0);
    /* Once under its rate again, the partner is served. */
    kh_client_set_retries(vt, 30);
    reply = kh_client_submit(vt, referral, "over-1", 20000, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&vt);
    json_decref(referral);
}
END_TEST

/* An idempotency conflict is a refusal in the trail like any other: a
 * partner that sends one key with other referrals again and again is
 * throttled past KH_PARTNER_REFUSALS, whichever statement would write the
 * conflict's event. */
START_TEST(idempotency_conflicts_count_among_the_refusals)
{
    s_restart_intake_with(
        (const char *const[]){"KH_PARTNER_REFUSALS", "2", NULL});
    json_t *referral = s_example();
    kh_client_t *vt = s_client("vt");
    kh_client_set_retries(vt, 0);
    kh_error_t err;
    json_t *reply = kh_client_submit(vt, referral, "same", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);

    json_t *other = s_another(referral);
    int conflicts = 0, throttled = 0;
    int64_t start = zclock_mono();
    for (int i = 0; i < S_FLOOD; i++) { /* one at a time: each its batch */
        reply = kh_client_submit(vt, other, "same", S_TIMEOUT, &err);
        ck_assert_msg(reply != NULL, "no reply to %d: %s", i, err.message);
        const char *code = s_str(reply, "code");
        if (strcmp(code, "idempotency_conflict") == 0)
            conflicts++;
        else {
            ck_assert_str_eq(code, "throttled");
            throttled++;
        }
        json_decref(reply);
    }
    int64_t elapsed = zclock_mono() - start;
    ck_assert_int_gt(throttled, 0);
    ck_assert_int_le(conflicts, khtest_bucket_max(20, 2, elapsed));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'idempotency_conflict'"),
                     conflicts);
    json_decref(other);
    json_decref(referral);
    kh_client_destroy(&vt);
}
END_TEST

/* The same, pipelined on one connection: a key sent again with other
 * referrals, faster than batches commit. The repeats of a key in a batch
 * take their refusal ahead (the commit tells which were conflicts), so
 * they are throttled once the partner's refusals are used up, as one at
 * a time; before, a batch's every conflict passed the check while the
 * batch before committed (277 conflict events of 300, the bound 21). */
#define S_PIPELINED 300
START_TEST(pipelined_conflicts_count_among_the_refusals)
{
    s_restart_intake_with(
        (const char *const[]){"KH_PARTNER_REFUSALS", "2", NULL});
    json_t *referral = s_example();
    kh_client_t *vt = s_client("vt");
    kh_error_t err;
    json_t *reply = kh_client_submit(vt, referral, "same", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    kh_client_destroy(&vt);

    json_t **envelopes = calloc(S_PIPELINED, sizeof *envelopes);
    json_t **replies = calloc(S_PIPELINED, sizeof *replies);
    for (int i = 0; i < S_PIPELINED; i++) {
        json_t *other = json_deep_copy(referral);
        char summary[32];
        snprintf(summary, sizeof summary, "another referral %d", i);
        json_object_set_new(other, "summary", json_string(summary));
        envelopes[i] = s_submit_envelope("same", other);
        json_decref(other);
    }
    int64_t start = zclock_mono();
    s_pipeline(envelopes, S_PIPELINED, replies, S_TIMEOUT);
    int64_t elapsed = zclock_mono() - start;
    int conflicts = 0, throttled = 0;
    for (int i = 0; i < S_PIPELINED; i++) {
        ck_assert_msg(replies[i] != NULL, "no reply to %d", i);
        const char *code = s_str(replies[i], "code");
        if (strcmp(code, "idempotency_conflict") == 0)
            conflicts++;
        else {
            ck_assert_str_eq(code, "throttled");
            throttled++;
        }
        json_decref(replies[i]);
    }
    /* The first of the key in a batch is no repeat there: its conflict
     * with the stored referral is known, and counted, at its commit
     * only (a few batches at most in this time). */
    ck_assert_int_gt(throttled, 0);
    ck_assert_msg(conflicts <= khtest_bucket_max(20, 2, elapsed) + 3,
                  "%d conflicts in %" PRId64 " ms", conflicts, elapsed);
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'idempotency_conflict'"),
                     conflicts);
    free(envelopes);
    free(replies);
    json_decref(referral);
}
END_TEST

START_TEST(sighup_does_not_stop_and_sigterm_exits_zero)
{
    kill(s_intake, SIGHUP);
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    s_intake = -1;
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
}
END_TEST

/* A stand-in hub (a zactor): a CURVE ROUTER on args->endpoint that
 * answers every request REJECTED throttled, retry_after_ms args->wait,
 * and counts them. */
typedef struct {
    const char *endpoint;
    int wait;
    int requests;
} s_throttler_t;

static void s_throttler(zsock_t *pipe, void *arg)
{
    s_throttler_t *args = arg;
    zcert_t *hub = zcert_load(s_path("hub.cert"));
    kh_error_t err;
    zsock_t *router = kh_curve_server_new(ZMQ_ROUTER, hub, 1 << 20, &err);
    zcert_destroy(&hub);
    int port = router ? zsock_bind(router, "%s", args->endpoint) : -1;
    zsock_signal(pipe, port == -1 ? 1 : 0);
    zpoller_t *poller = zpoller_new(pipe, router, NULL);
    for (bool stop = port == -1; !stop;) {
        void *which = zpoller_wait(poller, -1);
        if (which == router) {
            zmsg_t *msg = zmsg_recv(router);
            zframe_t *identity = zmsg_pop(msg);
            zframe_t *body = zmsg_pop(msg);
            json_t *request = s_decoded(&body);
            kh_error_set(&err, KH_E_THROTTLED, "", "slow down");
            json_t *reply =
                kh_proto_rejected(s_str(request, "cid"), &err, args->wait);
            json_decref(request);
            char *data;
            size_t size;
            ck_assert_int_eq(kh_msgpack_encode(reply, &data, &size, &err), 0);
            json_decref(reply);
            zmsg_t *out = zmsg_new();
            zmsg_append(out, &identity);
            zmsg_addmem(out, data, size);
            free(data);
            zmsg_send(&out, router);
            zmsg_destroy(&msg);
            args->requests++;
        } else
            stop = true; /* $TERM, or interrupted */
    }
    zpoller_destroy(&poller);
    zsock_destroy(&router);
}

/* The reference client never resends before retry_after_ms: a wait it
 * will not make within a request (a minute or more) ends the request with
 * the refusal, for the caller to resend later with the same key. */
START_TEST(the_client_never_resends_before_retry_after_ms)
{
    char endpoint[64];
    snprintf(endpoint, sizeof endpoint, "tcp://127.0.0.1:%d",
             khproc_free_port());
    s_throttler_t args = {endpoint, 90000, 0};
    zactor_t *hub = zactor_new(s_throttler, &args);
    ck_assert_ptr_nonnull(hub);
    char cert[512];
    snprintf(cert, sizeof cert, "%s/vt.cert", s_dir);
    kh_error_t err;
    kh_client_t *client =
        kh_client_new(endpoint, s_path("hub.cert"), cert, &err);
    ck_assert_ptr_nonnull(client);
    kh_client_set_retries(client, 3);
    json_t *referral = s_example();
    int64_t start = zclock_mono();
    json_t *reply =
        kh_client_submit(client, referral, "throttled-1", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    ck_assert_str_eq(s_str(reply, "code"), "throttled");
    ck_assert_int_eq(
        json_integer_value(json_object_get(reply, "retry_after_ms")), 90000);
    ck_assert_int_lt(zclock_mono() - start, S_AT_ONCE_MS);
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
    zactor_destroy(&hub);
    ck_assert_int_eq(args.requests, 1);
}
END_TEST

/* A PING is answered however often its partner was refused, but a PING
 * that is refused itself (a field it cannot have, a key the registry does
 * not admit) is a refusal like any other: past KH_PARTNER_REFUSALS it is
 * throttled too, so that it cannot fill the trail. */
START_TEST(refused_pings_are_throttled_before_the_trail)
{
    /* 20 at once */
    s_restart_intake_with(
        (const char *const[]){"KH_PARTNER_REFUSALS", "2", NULL});

    json_t *envelopes[S_FLOOD], *replies[S_FLOOD];
    for (int i = 0; i < S_FLOOD; i++)
        envelopes[i] = json_pack("{s:s, s:i}", "cmd", "PING", "junk", i);
    int64_t start = zclock_mono();
    s_pipeline(envelopes, S_FLOOD, replies, S_TIMEOUT);
    int64_t elapsed = zclock_mono() - start;
    int refused = 0, throttled = 0;
    for (int i = 0; i < S_FLOOD; i++) {
        ck_assert_msg(replies[i] != NULL, "no reply to %d", i);
        const char *code = s_str(replies[i], "code");
        if (strcmp(code, "bad_envelope") == 0)
            refused++;
        else {
            ck_assert_str_eq(code, "throttled");
            throttled++;
        }
        json_decref(replies[i]);
    }
    ck_assert_int_ge(refused, 20);
    ck_assert_int_le(refused, khtest_bucket_max(20, 2, elapsed));
    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events WHERE"
                             " reason_code = 'bad_envelope'"),
                     refused);
    /* A valid PING is still answered. */
    kh_client_t *vt = s_client("vt");
    kh_error_t err;
    kh_client_set_retries(vt, 0);
    ck_assert_int_eq(kh_client_ping(vt, S_TIMEOUT, &err), 0);
    kh_client_destroy(&vt);

    /* The same for the PINGs of a key in the directory that no partner
     * has: each is an auth.refused event until the key is over. */
    kh_client_t *nobody = s_client("unregistered");
    kh_client_set_retries(nobody, 0);
    start = zclock_mono();
    for (int i = 0; i < S_FLOOD; i++) {
        json_t *reply = NULL;
        json_t *ping = json_pack("{s:s}", "cmd", "PING");
        reply = kh_client_request(nobody, ping, S_TIMEOUT, &err);
        json_decref(ping);
        ck_assert_msg(reply != NULL, "%s", err.message);
        json_decref(reply);
    }
    elapsed = zclock_mono() - start;
    kh_client_destroy(&nobody);
    ck_assert_int_le(s_count("SELECT count(*) FROM audit_events WHERE"
                             " action = 'auth.refused'"),
                     khtest_bucket_max(20, 2, elapsed));
}
END_TEST

/* A PING on dealer as version 1 with cid; its reply, or NULL when none
 * came within timeout_ms. */
static json_t *s_ping_on(zsock_t *dealer, const char *cid, int timeout_ms)
{
    zframe_t *frame = s_frame(json_pack("{s:s}", "cmd", "PING"), cid);
    zframe_send(&frame, dealer, 0);
    zsock_set_rcvtimeo(dealer, timeout_ms);
    frame = zframe_recv(dealer);
    return frame ? s_decoded(&frame) : NULL;
}

static zsock_t *s_dealer_shaken(void)
{
    return s_dealer_shaken_as("vt");
}

static void s_expect_pong(json_t *reply)
{
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "PONG");
    json_decref(reply);
}

/* A partner whose client opens connections without end cannot take
 * intake's descriptors: past KH_INTAKE_MAX_CONNECTIONS open ones, its
 * handshakes are refused, and a connection that got through before the
 * others were counted is answered throttled; a closed one makes room.
 * None of it goes into the trail. */
START_TEST(a_partner_has_at_most_its_connections)
{
    s_restart_intake_with(
        (const char *const[]){"KH_INTAKE_MAX_CONNECTIONS", "2", NULL});
    zsock_t *early = s_dealer_shaken();
    zsock_t *first = s_dealer(S_TIMEOUT);
    s_expect_pong(s_ping_on(first, "first", S_TIMEOUT));
    zsock_t *second = s_dealer(S_TIMEOUT);
    s_expect_pong(s_ping_on(second, "second", S_TIMEOUT));

    json_t *reply = s_ping_on(early, "early", S_TIMEOUT);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "throttled");
    ck_assert_str_eq(s_str(reply, "cid"), "early");
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    ck_assert_int_gt(
        json_integer_value(json_object_get(reply, "retry_after_ms")), 0);
    json_decref(reply);

    /* One more is refused at its handshake, for now: the client is told
     * so (ZAP status 500), not that its key is refused. */
    kh_client_t *more = s_client("vt");
    kh_client_set_retries(more, 0);
    kh_error_t err;
    ck_assert_int_ne(kh_client_ping(more, S_TIMEOUT, &err), 0);
    ck_assert_msg(err.code == KH_E_THROTTLED, "%s (%s)", err.message,
                  kh_error_name(err.code));
    ck_assert(khtest_log_has(s_path("intake.log"), "over=connections", 3000));
    /* The counted ones are served all the same. */
    s_expect_pong(s_ping_on(first, "again", S_TIMEOUT));

    /* A closed one makes room: the client's next attempt, on a new
     * connection, gets through (or the one a second later, should its
     * handshake come before the hub has seen the close). */
    zsock_destroy(&second);
    kh_client_set_retries(more, 2);
    ck_assert_msg(kh_client_ping(more, S_TIMEOUT, &err) == 0, "%s (%s)",
                  err.message, kh_error_name(err.code));
    kh_client_destroy(&more);

    ck_assert_int_eq(s_count("SELECT count(*) FROM audit_events"), 0);
    zsock_destroy(&early);
    zsock_destroy(&first);
}
END_TEST

/* A connection that sent a request and closed before intake read it
 * (intake stops reading while a full batch waits for its commit) is not
 * counted: no disconnect would ever end its count, and a partner with
 * its most such counts was refused for good. Nor is it counted for long
 * when another partner's connection took its descriptor meanwhile and
 * sends nothing: the reply that cannot reach it ends that. */
START_TEST(a_connection_closed_before_its_frame_is_read_is_not_counted)
{
    s_restart_intake_with((const char *const[]){
        "KH_INTAKE_MAX_CONNECTIONS", "2", "KH_INTAKE_BATCH", "1", NULL});
    PGconn *lock = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(lock), CONNECTION_OK);
    khtest_db_exec(lock, "BEGIN", 0, NULL);
    khtest_db_exec(lock, "LOCK TABLE referrals IN ACCESS EXCLUSIVE MODE", 0,
                   NULL);
    /* Two SUBMITs of another partner: one commits (and waits for the
     * lock), one fills the next batch, and intake reads no more. */
    zsock_t *zc =
        khpartner_connect(s_path("zc.cert"), s_path("hub.cert"), s_endpoint);
    zsock_set_rcvtimeo(zc, S_TIMEOUT);
    json_t *referral = s_example();
    zframe_t *frame = s_frame(s_submit_envelope("held-1", referral), "s1");
    zframe_send(&frame, zc, 0);
    frame = s_frame(s_submit_envelope("held-2", referral), "s2");
    zframe_send(&frame, zc, 0);
    json_decref(referral);
    zclock_sleep(800);
    for (int i = 0; i < 2; i++) {
        zsock_t *gone = s_dealer(S_TIMEOUT);
        frame = s_frame(json_pack("{s:s}", "cmd", "PING"), "gone");
        zsock_set_linger(gone, 2000);
        zframe_send(&frame, gone, 0);
        zsock_destroy(&gone);
    }
    zclock_sleep(1500);
    zsock_t *silent[2];
    for (int i = 0; i < 2; i++)
        silent[i] = s_dealer_shaken_as("zc");
    khtest_db_exec(lock, "ROLLBACK", 0, NULL);
    PQfinish(lock);
    for (int i = 0; i < 2; i++) {
        frame = zframe_recv(zc);
        ck_assert_ptr_nonnull(frame);
        json_t *reply = s_decoded(&frame);
        ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
        json_decref(reply);
    }
    zsock_destroy(&zc);
    zclock_sleep(500);
    /* No connection of vt is open: it is served. */
    kh_client_t *vt = s_client("vt");
    kh_client_set_retries(vt, 0);
    kh_error_t err;
    ck_assert_msg(kh_client_ping(vt, S_TIMEOUT, &err) == 0, "%s (%s)",
                  err.message, kh_error_name(err.code));
    kh_client_destroy(&vt);
    for (int i = 0; i < 2; i++)
        zsock_destroy(&silent[i]);
}
END_TEST

/* A client whose handshake was refused for now while it sent nothing
 * has no connection left (ZeroMQ does not try again): its next request
 * goes on a new one rather than wait for that one without end. */
START_TEST(a_client_refused_while_idle_sends_on_a_new_connection)
{
    s_restart_intake_with(
        (const char *const[]){"KH_INTAKE_MAX_CONNECTIONS", "2", NULL});
    zsock_t *first = s_dealer(S_TIMEOUT);
    s_expect_pong(s_ping_on(first, "first", S_TIMEOUT));
    zsock_t *second = s_dealer(S_TIMEOUT);
    s_expect_pong(s_ping_on(second, "second", S_TIMEOUT));
    kh_client_t *idle = s_client("vt");
    kh_client_set_retries(idle, 2);
    zclock_sleep(1500); /* its handshake is refused meanwhile */
    zsock_destroy(&second);
    zclock_sleep(500);
    kh_error_t err;
    ck_assert_msg(kh_client_ping(idle, S_TIMEOUT, &err) == 0, "%s (%s)",
                  err.message, kh_error_name(err.code));
    kh_client_destroy(&idle);
    zsock_destroy(&first);
}
END_TEST

/* A routing id the client chose, long and beginning with a zero byte (as
 * the hub's own do, so that it is not seen as chosen), counts like any
 * other: it escaped the count. */
START_TEST(a_long_routing_id_of_its_own_counts_too)
{
    s_restart_intake_with(
        (const char *const[]){"KH_INTAKE_MAX_CONNECTIONS", "2", NULL});
    zsock_t *dealers[3];
    for (int i = 0; i < 3; i++) {
        char rid[17] = {0};
        memset(rid + 1, 'a' + i, sizeof rid - 1);
        dealers[i] = khpartner_connect_rid(
            s_path("vt.cert"), s_path("hub.cert"), s_endpoint, rid, sizeof rid);
        json_t *reply = s_ping_on(dealers[i], "long", i < 2 ? S_TIMEOUT : 1500);
        if (i < 2)
            s_expect_pong(reply);
        else
            ck_assert_msg(reply == NULL, "a third connection was served");
    }
    for (int i = 0; i < 3; i++)
        zsock_destroy(&dealers[i]);
}
END_TEST

/* A key the hub refuses at the handshake is told as such at each request
 * of a client that lives on, never as a hub that cannot be reached: each
 * request tries a new connection (ZeroMQ does not try a refused one
 * again), so a key admitted since is served. */
START_TEST(a_refused_key_is_told_so_at_each_request)
{
    zcert_t *outsider = s_make_cert("outsider", false);
    kh_client_t *client = s_client("outsider");
    kh_client_set_retries(client, 2);
    kh_error_t err;
    for (int i = 0; i < 2; i++) {
        int64_t start = zclock_mono();
        ck_assert_int_ne(kh_client_ping(client, S_TIMEOUT, &err), 0);
        ck_assert_msg(err.code == KH_E_UNKNOWN_PARTNER, "%d: %s (%s)", i,
                      err.message, kh_error_name(err.code));
        ck_assert_int_lt(zclock_mono() - start, S_TIMEOUT);
    }
    /* Admitted now: the next request is served. */
    char file[600];
    snprintf(file, sizeof file, "%s/partners/outsider.cert", s_dir);
    zcert_save_public(outsider, file);
    s_register("outsider", outsider);
    int rc = -1;
    for (int i = 0; i < 20 && rc; i++)
        if ((rc = kh_client_ping(client, S_TIMEOUT, &err)) != 0)
            zclock_sleep(300);
    ck_assert_msg(rc == 0, "%s (%s)", err.message, kh_error_name(err.code));
    kh_client_destroy(&client);
    zcert_destroy(&outsider);
}
END_TEST

/* Run intake's batch statement on conn (async when wait is false) for
 * veilig-thuis's keys (comma-separated, in that order), each with its own
 * payload. */
static void s_batch_on(PGconn *conn, const char *keys, bool wait)
{
    char ids[512] = "{", partners[512] = "{", idems[512] = "{",
         versions[512] = "{", payloads[1024] = "{", hashes[2048] = "{",
         peers[512] = "{", curve_keys[1024] = "{";
    char *key = khtest_db_value(
        s_db,
        "SELECT curve_public_key FROM partners WHERE id = 'veilig-thuis'");
    char copy[256];
    snprintf(copy, sizeof copy, "%s", keys);
    int n = 0;
    for (char *save = NULL, *k = strtok_r(copy, ",", &save); k;
         k = strtok_r(NULL, ",", &save), n++) {
        const char *sep = n ? "," : "";
        char id[37];
        kh_uuid_new(id);
        char hash[65];
        kh_sha256_hex(k, strlen(k), hash);
        snprintf(ids + strlen(ids), sizeof ids - strlen(ids), "%s%s", sep, id);
        snprintf(partners + strlen(partners),
                 sizeof partners - strlen(partners), "%sveilig-thuis", sep);
        snprintf(idems + strlen(idems), sizeof idems - strlen(idems), "%s%s",
                 sep, k);
        snprintf(versions + strlen(versions),
                 sizeof versions - strlen(versions), "%sreferral.v1", sep);
        snprintf(payloads + strlen(payloads),
                 sizeof payloads - strlen(payloads), "%s\"\\\\x7b7d\"", sep);
        snprintf(hashes + strlen(hashes), sizeof hashes - strlen(hashes),
                 "%s\"\\\\x%s\"", sep, hash);
        snprintf(peers + strlen(peers), sizeof peers - strlen(peers),
                 "%s127.0.0.1", sep);
        snprintf(curve_keys + strlen(curve_keys),
                 sizeof curve_keys - strlen(curve_keys), "%s\"%s\"", sep, key);
    }
    free(key);
    strcat(ids, "}");
    strcat(partners, "}");
    strcat(idems, "}");
    strcat(versions, "}");
    strcat(payloads, "}");
    strcat(hashes, "}");
    strcat(peers, "}");
    strcat(curve_keys, "}");
    const char *params[S_COMMIT_PARAMS] = {
        ids,  partners, idems, versions, payloads,   hashes, peers, "{}",
        "{}", "{}",     "{}",  "{}",     curve_keys, "{}",   "{}",  "{}"};
    if (wait) {
        PGresult *res = PQexecParams(conn, s_commit_sql, S_COMMIT_PARAMS, NULL,
                                     params, NULL, NULL, 0);
        ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK, "%s",
                      PQresultErrorMessage(res));
        PQclear(res);
    } else
        ck_assert_int_eq(PQsendQueryParams(conn, s_commit_sql, S_COMMIT_PARAMS,
                                           NULL, params, NULL, NULL, 0),
                         1);
}

/* Two intake processes committing batches that share keys take the keys
 * in one order, the keys' own, whatever order their requests came in:
 * taken in arrival order, each could hold a key the other waits for (a
 * deadlock: one batch refused as unavailable). Deterministic: a batch
 * holds k1; a second batch of k2 then k1 waits for it, and must not hold
 * k2 meanwhile, which the first batch then takes. */
START_TEST(batches_take_their_keys_in_one_order)
{
    PGconn *first = PQconnectdb(s_conninfo), *second = PQconnectdb(s_conninfo);
    ck_assert_int_eq(PQstatus(first), CONNECTION_OK);
    ck_assert_int_eq(PQstatus(second), CONNECTION_OK);
    khtest_db_exec(first, "SET deadlock_timeout = '100ms'", 0, NULL);
    khtest_db_exec(second, "SET deadlock_timeout = '100ms'", 0, NULL);
    khtest_db_exec(first, "BEGIN", 0, NULL);
    s_batch_on(first, "lock-k1", true);
    s_batch_on(second, "lock-k2,lock-k1", false);
    char sql[200];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity"
             " WHERE %d = ANY (pg_blocking_pids(pid))",
             PQbackendPID(first));
    ck_assert(khtest_wait_count(s_db, sql, 1, 10000));
    /* With lock-k2 held by the second batch, this waits for it, and the
     * second waits for lock-k1: a deadlock. */
    s_batch_on(first, "lock-k2", true);
    khtest_db_exec(first, "COMMIT", 0, NULL);
    PGresult *res;
    bool ok = true;
    while ((res = PQgetResult(second))) {
        ok = ok && PQresultStatus(res) == PGRES_TUPLES_OK;
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            fprintf(stderr, "second batch: %s", PQresultErrorMessage(res));
        PQclear(res);
    }
    ck_assert(ok);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals"
                             " WHERE idempotency_key LIKE 'lock-%'"),
                     2);
    PQfinish(first);
    PQfinish(second);
}
END_TEST

/* An idle intake stops at once on SIGTERM: nothing it waits for (a
 * read, a drain, a linger) holds it for seconds. */
START_TEST(an_idle_intake_stops_at_once)
{
    zclock_sleep(500); /* a registry refresh or two have run */
    int64_t started = zclock_mono();
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    int64_t elapsed = zclock_mono() - started;
    s_intake = -1;
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    /* Well below the router's linger (2 s), which would hold it. */
    ck_assert_msg(elapsed < 1000, "intake took %d ms to stop", (int) elapsed);
}
END_TEST

/* The sum of the pids of intake's backends, and that there are two. */
static long s_intake_backends(void)
{
    ck_assert_int_eq(s_count("SELECT count(*) FROM pg_stat_activity WHERE "
                             "application_name = 'ketenhub-intake'"),
                     2);
    return s_count("SELECT sum(pid) FROM pg_stat_activity WHERE "
                   "application_name = 'ketenhub-intake'");
}

/* SUBMIT referral under key on client, once (its retries set to none):
 * the answer is a retryable refusal, unavailable. */
static void s_refused_unavailable(kh_client_t *client, json_t *referral,
                                  const char *key)
{
    kh_client_set_retries(client, 0);
    kh_error_t err;
    json_t *reply = kh_client_submit(client, referral, key, S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "REJECTED");
    ck_assert_str_eq(s_str(reply, "code"), "unavailable");
    ck_assert(json_is_true(json_object_get(reply, "retryable")));
    json_decref(reply);
}

/* A statement that fails with "try again" on a connection that is fine
 * (here a lock timeout, 55P03; a deadlock or a serialization failure
 * goes the same way) is answered unavailable, and intake keeps both its
 * connections: it neither drops nor remakes them. */
START_TEST(a_lock_timeout_keeps_both_connections)
{
    const char *const settings[] = {"PGOPTIONS", "-c lock_timeout=300", NULL};
    s_restart_intake_with(settings);
    json_t *referral = s_example();
    long backends = s_intake_backends();
    int connected = s_log_count("event=db_connected");
    PGconn *holder = s_hold_key("timeout-1", referral);

    kh_client_t *client = s_client("vt");
    s_refused_unavailable(client, referral, "timeout-1");
    ck_assert(khtest_log_has(s_path("intake.log"), "sqlstate=55P03", 0));
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);

    zclock_sleep(300); /* a reconnection, were there one, is under way */
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "timeout-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    ck_assert_int_eq(s_intake_backends(), backends);
    ck_assert_int_eq(s_log_count("event=db_connected"), connected);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A read that timed out closes the reader, which intake makes again; the
 * writer, which is fine, stays. */
START_TEST(a_lost_reader_keeps_the_writer)
{
    json_t *referral = s_example();
    pid_t writer = s_writer(referral);
    long reader = s_reader_pid();
    int connected = s_log_count("event=db_connected");
    kill((pid_t) reader, SIGSTOP);
    /* a refresh (every 200 ms) times out after 1 s */
    bool timed_out =
        khtest_log_has(s_path("intake.log"), "event=db_read_timeout", 10000);
    kill((pid_t) reader, SIGCONT);
    ck_assert(timed_out);

    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 20);
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "keep-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    json_decref(reply);
    ck_assert_int_gt(s_log_count("event=db_connected"), connected);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
             "'ketenhub-intake' AND pid = %d",
             (int) writer);
    ck_assert_int_eq(s_count(sql), 1);
    /* The old reader's backend, stopped when it was closed, goes soon. */
    long backends = 0;
    for (int i = 0; i < 50 && backends != 2; i++) {
        backends = s_count("SELECT count(*) FROM pg_stat_activity WHERE "
                           "application_name = 'ketenhub-intake'");
        if (backends != 2)
            zclock_sleep(20);
    }
    ck_assert_int_eq(backends, 2);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A restart of PostgreSQL ends both of intake's sessions, but intake
 * finds out about one only when it uses it: here the registry refresh
 * finds the reader gone. The writer, idle, looks connected to libpq
 * until its next statement fails; it is not kept as "fine" when the
 * reader is made anew, so that the first SUBMIT after the restart is
 * accepted rather than refused unavailable. */
START_TEST(a_database_restart_renews_the_idle_writer_too)
{
    int connected = s_log_count("event=db_connected");
    ck_assert_int_eq(khtest_pgtmp("down", "fast"), 0);
    zclock_sleep(600); /* a refresh (every 200 ms) finds the reader gone */
    ck_assert_int_eq(khtest_pgtmp("up", NULL), 0);
    PQreset(s_db);
    for (int i = 0; i < 100 && s_log_count("event=db_connected") == connected;
         i++)
        zclock_sleep(100);
    ck_assert_int_gt(s_log_count("event=db_connected"), connected);

    json_t *referral = s_example();
    kh_client_t *client = s_client("vt");
    kh_client_set_retries(client, 0);
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "restart-1", S_TIMEOUT, &err);
    ck_assert_msg(reply != NULL, "%s", err.message);
    ck_assert_msg(strcmp(kh_client_reply_cmd(reply), "ACCEPTED") == 0, "%s %s",
                  kh_client_reply_cmd(reply), s_str(reply, "code"));
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* A commit that intake gives up on (it waited longer than
 * KH_DB_COMMIT_TIMEOUT_MS) is cancelled on the server, not only left:
 * nothing of intake's still waits there, holding the key, once the
 * partner is told unavailable. The same key sent again is then accepted
 * once, with the id of the one row that holds it. */
START_TEST(an_abandoned_commit_is_cancelled_on_the_server)
{
    const char *const settings[] = {"KH_DB_COMMIT_TIMEOUT_MS", "500", NULL};
    s_restart_intake_with(settings);
    json_t *referral = s_example();
    PGconn *holder = s_hold_key("abandon-1", referral);

    kh_client_t *client = s_client("vt");
    s_refused_unavailable(client, referral, "abandon-1");
    ck_assert(khtest_log_has(s_path("intake.log"), "event=commit_stalled", 0));

    long waiting = -1;
    for (int i = 0; i < 100 && waiting != 0; i++) {
        waiting = s_count("SELECT count(*) FROM pg_stat_activity WHERE "
                          "wait_event_type = 'Lock' AND query LIKE "
                          "'WITH input%'");
        if (waiting)
            zclock_sleep(20);
    }
    khtest_db_exec(holder, "ROLLBACK", 0, NULL);
    PQfinish(holder);
    ck_assert_msg(waiting == 0,
                  "the abandoned commit still waits on the server");

    kh_client_set_retries(client, 20);
    kh_error_t err;
    json_t *reply =
        kh_client_submit(client, referral, "abandon-1", S_TIMEOUT, &err);
    ck_assert_ptr_nonnull(reply);
    ck_assert_str_eq(kh_client_reply_cmd(reply), "ACCEPTED");
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM referrals r JOIN audit_events a ON "
             "a.referral_id = r.id AND a.action = 'referral.accepted' WHERE "
             "r.idempotency_key = 'abandon-1' AND r.id = '%s'",
             s_str(reply, "referral_id"));
    json_decref(reply);
    ck_assert_int_eq(s_count("SELECT count(*) FROM referrals WHERE "
                             "idempotency_key = 'abandon-1'"),
                     1);
    ck_assert_int_eq(s_count(sql), 1);
    json_decref(referral);
    kh_client_destroy(&client);
}
END_TEST

/* SIGTERM while a read of intake's waits on a database that stopped
 * answering: intake stops at once, not when the read times out. */
START_TEST(a_stalled_read_does_not_delay_stopping)
{
    long reader = s_reader_pid();
    kill((pid_t) reader, SIGSTOP);
    zclock_sleep(400); /* a registry refresh (every 200 ms) is stuck */
    int status = khproc_stop(s_intake, SIGTERM, 5000);
    s_intake = -1;
    kill((pid_t) reader, SIGCONT);
    ck_assert(status != -1 && WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    /* Given up at once, not when it would time out (1 s here): what the
     * log says, not how long the stop took (which counts the exit's own
     * work, slower under a sanitizer). */
    ck_assert(
        khtest_log_has(s_path("intake.log"), "event=db_read_abandoned", 0));
    ck_assert(
        !khtest_log_has(s_path("intake.log"), "event=db_read_timeout", 0));
}
END_TEST

/* SIGHUP while a read waits does not give the read up: it ends when the
 * database answers, and intake neither stops nor connects again. */
START_TEST(sighup_during_a_read_gives_it_not_up)
{
    long reader = s_reader_pid();
    int connected = s_log_count("event=db_connected");
    kill((pid_t) reader, SIGSTOP);
    zclock_sleep(250); /* a registry refresh (every 200 ms) is stuck */
    kill(s_intake, SIGHUP);
    zclock_sleep(200);
    kill((pid_t) reader, SIGCONT);
    zclock_sleep(300);
    kh_client_t *client = s_client("vt");
    kh_error_t err;
    ck_assert_int_eq(kh_client_ping(client, S_TIMEOUT, &err), 0);
    kh_client_destroy(&client);
    ck_assert(!khtest_log_has(s_path("intake.log"), "db_read_abandoned", 0));
    ck_assert_int_eq(s_log_count("event=db_connected"), connected);
}
END_TEST

int main(void)
{
    Suite *suite = suite_create("intake");
    TCase *tc = tcase_create("intake");
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, accepted_referral_is_committed_with_its_audit_event);
    tcase_add_test(tc, batches_take_their_keys_in_one_order);
    tcase_add_test(tc, same_idempotency_key_returns_the_first_answer);
    tcase_add_test(tc, a_purged_referral_answers_status_and_resubmission);
    tcase_add_test(tc, intake_does_its_work_with_its_role_alone);
    tcase_add_test(tc, a_status_refused_as_not_found_is_audited);
    tcase_add_test(tc, bad_input_is_rejected_and_changes_nothing);
    tcase_add_test(tc, the_refused_examples_are_refused_as_their_files_say);
    tcase_add_test(tc, made_up_keys_spoil_nothing_and_stay_out_of_the_trail);
    tcase_add_test(tc, a_connection_that_sets_its_own_routing_id_is_refused);
    tcase_add_test(tc, a_body_that_does_not_decode_is_refused_with_its_cid);
    tcase_add_test(
        tc, the_partner_tool_reports_a_referral_it_cannot_send_as_refused);
    tcase_add_test(tc, repeats_get_the_first_answer_and_conflicts_are_audited);
    tcase_add_test(tc, the_partner_tool_sends_the_key_given_after_the_file);
    tcase_add_test(tc, names_of_the_partner_stay_out_of_the_trail_and_logs);
    tcase_add_test(tc, a_conflict_within_a_batch_is_audited);
    tcase_add_test(tc, repeats_within_a_batch_are_held_to_the_stored_referral);
    tcase_add_test(tc, a_conflict_within_a_batch_needs_no_read);
    tcase_add_test(tc, a_conflict_not_yet_audited_is_not_answered);
    tcase_add_test(tc,
                   a_status_not_found_is_not_answered_before_its_audit_event);
    tcase_add_test(tc, a_conflict_with_a_concurrent_commit_is_audited);
    tcase_add_test(tc, a_refusal_in_a_batch_committed_unread_is_final);
    tcase_add_test(tc, a_repeat_on_another_key_does_not_take_the_first_answer);
    tcase_add_test(tc, a_key_whose_overlap_ended_is_refused_without_a_notice);
    tcase_add_test(tc, unknown_keys_and_plain_clients_are_refused);
    tcase_add_test(tc, an_unknown_key_is_refused_as_unknown_before_its_frame);
    tcase_add_test(tc,
                   made_up_keys_at_the_handshake_are_audited_within_a_bound);
    tcase_add_test(tc, partners_added_and_removed_while_running);
    tcase_add_test(
        tc, a_partner_added_while_the_database_is_away_is_not_refused_for_good);
    tcase_add_test(tc, a_rotated_key_admits_its_partner_for_the_overlap_only);
    tcase_add_test(tc, a_revocation_applies_from_the_next_request);
    tcase_add_test(tc, a_registry_change_not_yet_read_admits_no_key);
    tcase_add_test(tc, a_submission_on_a_key_revoked_untold_is_not_taken);
    tcase_add_test(tc, a_status_on_a_key_revoked_untold_tells_nothing);
    tcase_add_test(tc, the_next_hub_key_is_served_beside_the_current_one);
    tcase_add_test(tc, the_partner_tool_exits_3_for_a_revoked_key);
    tcase_add_test(tc, the_partner_tool_stops_at_once_when_interrupted);
    tcase_add_test(tc, accepted_referrals_wake_routing);
    tcase_add_test(tc, a_large_batch_wakes_routing_in_messages_routing_accepts);
    tcase_add_test(tc, submitted_referrals_are_routed_with_their_projections);
    tcase_add_test(tc, killed_before_commit_then_retry_succeeds_once);
    tcase_add_test(tc, database_down_gives_retryable_refusal_then_recovers);
    tcase_add_test(tc, a_lost_registry_connection_refuses_retryably);
    tcase_add_test(tc, a_database_away_is_not_logged_once_per_request);
    tcase_add_test(tc, a_locked_table_does_not_hold_up_a_reconnection);
    tcase_add_test(tc, a_cancelled_batch_answers_its_refusals_retryable);
    tcase_add_test(tc, a_refusal_event_refused_itself_costs_the_batch_nothing);
    tcase_add_test(tc, sigterm_with_a_stalled_commit_exits_in_time);
    tcase_add_test(tc, a_silent_database_stalls_neither_answers_nor_stop);
    tcase_add_test(tc,
                   a_stalled_commit_keeps_waiting_requests_in_bounded_memory);
    tcase_add_test(tc, a_large_batch_to_a_stalled_database_blocks_nothing);
    tcase_add_test(tc, a_stalled_reader_does_not_stop_intake);
    tcase_add_test(tc, a_timed_out_registry_refresh_reconnects_at_once);
    tcase_add_test(tc, a_partner_over_its_rate_is_throttled);
    tcase_add_test(tc,
                   a_partner_refused_too_often_is_throttled_before_the_trail);
    tcase_add_test(tc, idempotency_conflicts_count_among_the_refusals);
    tcase_add_test(tc, pipelined_conflicts_count_among_the_refusals);
    tcase_add_test(tc, sighup_does_not_stop_and_sigterm_exits_zero);
    tcase_add_test(tc, the_client_never_resends_before_retry_after_ms);
    tcase_add_test(tc, refused_pings_are_throttled_before_the_trail);
    suite_add_tcase(suite, tc);
    /* The database's failures and intake's stop. */
    tc = tcase_create("connections");
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, a_partner_has_at_most_its_connections);
    tcase_add_test(tc,
                   a_connection_closed_before_its_frame_is_read_is_not_counted);
    tcase_add_test(tc, a_client_refused_while_idle_sends_on_a_new_connection);
    tcase_add_test(tc, a_refused_key_is_told_so_at_each_request);
    tcase_add_test(tc, a_long_routing_id_of_its_own_counts_too);
    suite_add_tcase(suite, tc);

    tc = tcase_create("intake_db");
    tcase_set_timeout(tc, 60);
    tcase_add_checked_fixture(tc, s_setup, s_teardown);
    tcase_add_test(tc, a_lock_timeout_keeps_both_connections);
    tcase_add_test(tc, an_abandoned_commit_is_cancelled_on_the_server);
    tcase_add_test(tc, a_lost_reader_keeps_the_writer);
    tcase_add_test(tc, a_database_restart_renews_the_idle_writer_too);
    tcase_add_test(tc, an_idle_intake_stops_at_once);
    tcase_add_test(tc, a_stalled_read_does_not_delay_stopping);
    tcase_add_test(tc, sighup_during_a_read_gives_it_not_up);
    suite_add_tcase(suite, tc);
    return khtest_run_suite(suite);
}
