/*
 * Audit events of administrators' commands (see audit.h).
 */
#include "ketenhub/audit.h"

#include <pwd.h>
#include <stdio.h>
#include <unistd.h>

#include "ketenhub/db.h"

/* The OS user name of this process, or "uid:N" when it has none. */
static void s_os_user(char *out, size_t size)
{
    struct passwd *pw = getpwuid(geteuid());
    if (pw && pw->pw_name && *pw->pw_name)
        snprintf(out, size, "%s", pw->pw_name);
    else
        snprintf(out, size, "uid:%u", (unsigned) geteuid());
}

int kh_audit_admin(PGconn *conn, const char *action, const char *partner_id,
                   const char *origin_service, kh_error_t *err)
{
    char actor[64], host[128];
    s_os_user(actor, sizeof actor);
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    const char *params[] = {actor, action, partner_id, origin_service, host};
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
