/*
 * The notification service's core: partners connect to its CURVE ROUTER
 * socket and say HELLO; it claims each connected partner's due deliveries
 * from PostgreSQL (at most the connection's window outstanding), sends
 * them, and commits the partners' ACKs and NACKs with their audit events.
 * A timer re-sends what was not acknowledged in time, makes dead letters
 * and escalates overdue urgent deliveries; routing's wake-ups on a second
 * (internal) socket make it look at once. PostgreSQL is the truth: the
 * service holds nothing a restart would lose (schemas/protocol.md,
 * section Deliveries).
 */
#ifndef NOTIFY_H_INCLUDED
#define NOTIFY_H_INCLUDED

#include <stddef.h>

#include "dstore.h"
#include "ketenhub/error.h"

typedef struct {
    const char *conninfo;      /* libpq connection string ("" = PG* env) */
    const char *endpoint;      /* partners' ROUTER endpoint, bound */
    const char *wake_endpoint; /* routing's wake-ups (PULL), bound; "" none */
    const char *hub_cert;      /* hub certificate (its _secret beside it) */
    const char *hub_cert_next; /* the next one, "" for none */
    const char *endpoint_next; /* where it is served, "" for none */
    const char *partner_certs; /* directory of partners' certificates */
    dstore_policy_t policy;    /* re-sends, dead letters, escalation */
    size_t window;             /* most unacknowledged per connection */
    size_t max_connections;    /* registered connections per partner */
    int peer_timeout_ms;       /* a silent connection is forgotten */
    int sweep_ms;              /* re-sends and sweeps at least this often */
    int partner_refresh_ms;    /* the registry is re-read this often */
    size_t max_frame;          /* largest frame a partner may send */
    /* ACKs and NACKs a second per partner refused as not_found, each an
     * audit event; 0: no limit. Over it (by more than 10 s worth, or a window),
     * those of its answers that none of its connections has out are refused
     * throttled before any database work. */
    int partner_refusals;
} notify_config_t;

typedef struct _notify_t notify_t;

/* Bind the sockets and prepare; connects to PostgreSQL when it runs. NULL
 * with err (KH_E_CONFIG names the setting at fault). */
notify_t *notify_new(const notify_config_t *config, kh_error_t *err);

/* Destroy; accepts NULL and a pointer to NULL. */
void notify_destroy(notify_t **self_p);

/* The port the partners' socket is bound to (for a port 0 endpoint). */
int notify_port(const notify_t *self);

/* Serve until SIGTERM or SIGINT arrives on signal_fd. 0 on a clean stop,
 * -1 when the loop could not be set up. */
int notify_run(notify_t *self, int signal_fd);

#endif
