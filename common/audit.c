/*
 * Audit events of administrators' commands (see audit.h).
 */
#include "ketenhub/audit.h"

#include <pwd.h>
#include <stdio.h>
#include <unistd.h>

#include "ketenhub/db.h"

void kh_audit_origin(kh_audit_origin_t *origin)
{
    struct passwd *pw = getpwuid(geteuid());
    if (pw && pw->pw_name && *pw->pw_name)
        snprintf(origin->actor, sizeof origin->actor, "%s", pw->pw_name);
    else
        snprintf(origin->actor, sizeof origin->actor, "uid:%u",
                 (unsigned) geteuid());
    if (gethostname(origin->host, sizeof origin->host) != 0)
        snprintf(origin->host, sizeof origin->host, "unknown");
    origin->host[sizeof origin->host - 1] = '\0';
}

int kh_audit_admin(PGconn *conn, const char *action, const char *partner_id,
                   const char *origin_service, kh_error_t *err)
{
    kh_audit_origin_t origin;
    kh_audit_origin(&origin);
    const char *params[] = {origin.actor, action, partner_id, origin_service,
                            origin.host};
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO audit_events (actor_kind, actor_id, action, partner_id,"
        " outcome, origin_service, origin_peer)"
        " VALUES ('admin', $1, $2, $3, 'ok', $4, $5)",
        5, NULL, params, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK
                 ? 0
                 : kh_db_error(err, conn, res, "cannot write the audit event");
    PQclear(res);
    return rc;
}
