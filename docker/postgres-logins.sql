-- The hub's services log in as roles of their own, each holding only its
-- service's group role, so that the grants and triggers that keep the
-- audit trail append-only (migrations/004) bind them, as they would not
-- bind the superuser. Run once, when the cluster is made, from
-- /docker-entrypoint-initdb.d (the official postgres image's, and
-- docker/postgres-entrypoint.sh's), by psql as POSTGRES_USER in
-- POSTGRES_DB; the logins get the database password of
-- POSTGRES_PASSWORD_FILE. The group roles are made NOLOGIN here where
-- missing, as 004 makes them (it leaves existing ones be), so that this
-- also runs on a cluster made before the logins existed (README); the
-- superuser stays for migrate (and for what only the owner may do).
\set ON_ERROR_STOP on
\set pw `head -n 1 "$POSTGRES_PASSWORD_FILE"`
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['ketenhub_intake', 'ketenhub_routing',
                             'ketenhub_notification', 'ketenhub_audit',
                             'ketenhub_admin', 'ketenhub_auditor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
-- Each login once: run again on a cluster that has some of them (made by
-- an earlier release of this file), it makes only those still missing.
-- The services' logins, and people's: an administrator's day-to-day
-- ketenhubctl (partners, dead letters, purge, status: no payload
-- readable, migration 022) and an auditor's (query, export, verify,
-- report through the trail's views).
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L IN ROLE %I', login, :'pw',
              grp)
FROM (VALUES ('ketenhub_intake_login', 'ketenhub_intake'),
             ('ketenhub_routing_login', 'ketenhub_routing'),
             ('ketenhub_notification_login', 'ketenhub_notification'),
             ('ketenhub_audit_login', 'ketenhub_audit'),
             ('ketenhub_admin_login', 'ketenhub_admin'),
             ('ketenhub_auditor_login', 'ketenhub_auditor')) AS l(login, grp)
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = login) \gexec
\unset pw
