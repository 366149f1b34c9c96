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
-- superuser stays for migrate and the administrator's ketenhubctl.
\set ON_ERROR_STOP on
\set pw `head -n 1 "$POSTGRES_PASSWORD_FILE"`
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['ketenhub_intake', 'ketenhub_routing',
                             'ketenhub_notification', 'ketenhub_audit'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
        END IF;
    END LOOP;
END
$$;
CREATE ROLE ketenhub_intake_login LOGIN PASSWORD :'pw' IN ROLE ketenhub_intake;
CREATE ROLE ketenhub_routing_login LOGIN PASSWORD :'pw' IN ROLE ketenhub_routing;
CREATE ROLE ketenhub_notification_login LOGIN PASSWORD :'pw'
    IN ROLE ketenhub_notification;
CREATE ROLE ketenhub_audit_login LOGIN PASSWORD :'pw' IN ROLE ketenhub_audit;
\unset pw
