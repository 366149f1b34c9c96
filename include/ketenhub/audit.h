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

/* Who runs this command, as the events of administrators and auditors
 * name them: the OS user (actor_id; "uid:N" when it has no name) and this
 * host (origin_peer; "unknown" when it has no name). */
typedef struct {
    char actor[64];
    char host[128];
} kh_audit_origin_t;

void kh_audit_origin(kh_audit_origin_t *origin);

/* Record that the administrator running this process (its OS user, from
 * this host) did action ("partner.added", "partner.revoked") to partner_id
 * (may be NULL), on behalf of origin_service ("ketenhubctl"). 0, or -1
 * with err as kh_db_error. */
int kh_audit_admin(PGconn *conn, const char *action, const char *partner_id,
                   const char *origin_service, kh_error_t *err);

#ifdef __cplusplus
}
#endif
#endif
