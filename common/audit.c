/*
 * Audit events of administrators' commands (see audit.h).
 */
#include "ketenhub/audit.h"

#include <pwd.h>
#include <stdio.h>
#include <unistd.h>

#include "ketenhub/db.h"

kh_audit_origin_t kh_audit_origin(void)
{
    kh_audit_origin_t origin;
    char user[64], host[128];
    struct passwd *pw = getpwuid(geteuid());
    if (pw && pw->pw_name && *pw->pw_name)
        snprintf(user, sizeof user, "%s", pw->pw_name);
    else
        snprintf(user, sizeof user, "uid:%u", (unsigned) geteuid());
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    /* At most the column's 128 characters (names are ASCII here; a host
     * name has at most 64). */
    snprintf(origin.peer, sizeof origin.peer, "%.63s@%.64s", user, host);
    return origin;
}

int kh_audit_admin(PGconn *conn, const char *action, const char *partner_id,
                   const char *origin_service, kh_error_t *err)
{
    kh_audit_origin_t origin = kh_audit_origin();
    const char *params[] = {action, partner_id, origin_service, origin.peer};
    /* The actor, admin and the login, by their defaults (025). */
    PGresult *res =
        PQexecParams(conn,
                     "INSERT INTO audit_events (action, partner_id, outcome,"
                     " origin_service, origin_peer)"
                     " VALUES ($1, $2, 'ok', $3, $4)",
                     4, NULL, params, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK
                 ? 0
                 : kh_db_error(err, conn, res, "cannot write the audit event");
    PQclear(res);
    return rc;
}
