/*
 * Audit events written by administrators' and auditors' commands (the
 * services write their own, in the statement that makes the change). The
 * event goes into the caller's open transaction, so it commits or rolls
 * back with the change it records (promise 2).
 */
#ifndef KH_AUDIT_H_INCLUDED
#define KH_AUDIT_H_INCLUDED

#include <libpq-fe.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What this command says of itself in the events of administrators and
 * auditors (origin_peer): "USER@HOST", its OS user ("uid:N" when it has
 * no name) and this host ("unknown" when it has no name), at most 128
 * characters. The actor of such an event is the database login that
 * wrote it (actor_id, from the server: migration 025), not this. */
typedef struct {
    char peer[129];
} kh_audit_origin_t;

kh_audit_origin_t kh_audit_origin(void);

/* Record that the administrator running this process (its database
 * login; its OS user and host as origin_peer) did action ("partner.added",
 * "partner.revoked") to partner_id (may be NULL), on behalf of origin_service
 * ("ketenhubctl"). 0, or -1 with err as kh_db_error. */
int kh_audit_admin(PGconn *conn, const char *action, const char *partner_id,
                   const char *origin_service, kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
