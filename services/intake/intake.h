/*
 * The intake service core: a CURVE ROUTER socket where partners SUBMIT
 * referrals and ask STATUS, in one zloop with the signalfd and the timers
 * for database reconnection and partner-registry refresh.
 */
#ifndef INTAKE_H_INCLUDED
#define INTAKE_H_INCLUDED

#include "ketenhub/codec.h"
#include "ketenhub/error.h"

typedef struct {
    const char *endpoint;         /* ZeroMQ endpoint to bind */
    const char *hub_cert;         /* hub's certificate (with _secret file) */
    const char *hub_cert_next;    /* the next one, "" for none */
    const char *endpoint_next;    /* where it is served, "" for none */
    const char *partner_certs;    /* directory of partners' public certs */
    const char *conninfo;         /* libpq connection string */
    const char *schema_dir;       /* directory with referral.v1.json */
    kh_limits_t limits;           /* decoder limits; max_frame also on socket */
    size_t batch_max;             /* most requests committed together */
    int partner_refresh_ms;       /* how often the registry is re-read */
    int commit_timeout_ms;        /* a commit taking longer is given up */
    const char *routing_endpoint; /* where to send wake-ups; "" for none */
    int partner_rate;  /* SUBMITs a second per partner; 0: no limit */
    int partner_burst; /* saved up at most (0: one second's worth) */
    /* Refusals a second per partner, each an audit event; 0: no limit.
     * Over it (by more than 10 s worth), the partner's requests are
     * refused throttled before any work. */
    int partner_refusals;
    /* Most open connections of one partner that send requests; a
     * handshake for one more is refused (peers.h). */
    size_t max_connections;
} intake_config_t;

typedef struct _intake_t intake_t;

/* Start: load the schema and the hub certificate, start the ZAP handler on the
 * partner directory, bind. The database is connected by intake_run (it may
 * be down at start). NULL with err on failure (config or io). */
intake_t *intake_new(const intake_config_t *config, kh_error_t *err);

/* Destroy; accepts NULL; nulls the pointer. */
void intake_destroy(intake_t **self_p);

/* The port the ROUTER is bound to (useful with tcp://127.0.0.1:*). */
int intake_port(const intake_t *self);

/* Serve until SIGTERM or SIGINT arrives on signal_fd. SIGHUP is logged and
 * otherwise ignored. Returns 0 after a clean stop, -1 on a fatal error. */
int intake_run(intake_t *self, int signal_fd);

#endif
