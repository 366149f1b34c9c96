-- 026_registry_notify: a change to the partner registry is told to the
-- services as it commits.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Intake, routing and notification kept the registry (which key admits
-- which partner) in memory and read it again every
-- KH_PARTNER_REFRESH_MS (5 s by default): a partner revoked, or a key
-- ended by a rotation without overlap (a key that leaked), was still
-- served for up to that long. Each of them now LISTENs on the channel
-- ketenhub_registry, and a statement that changes partners or
-- partner_keys NOTIFYs it; PostgreSQL delivers the notification when
-- that transaction commits (never for one rolled back), and a service
-- reads the registry again before the next request, frame or pass it
-- handles. The periodic read stays for what no statement changes (an
-- overlap that ends with the time) and for notifications missed while a
-- service's connection was down (it reads the registry when it connects
-- again besides).
CREATE FUNCTION partner_registry_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_notify('ketenhub_registry', '');
    RETURN NULL;
END
$$;
ALTER FUNCTION partner_registry_changed() OWNER TO ketenhub_owner;
COMMENT ON FUNCTION partner_registry_changed() IS
    'Tells the services (LISTEN ketenhub_registry) that the partner '
    'registry changed, at the commit of the transaction that changed it.';

CREATE TRIGGER partners_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON partners
    FOR EACH STATEMENT EXECUTE FUNCTION partner_registry_changed();
CREATE TRIGGER partner_keys_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON partner_keys
    FOR EACH STATEMENT EXECUTE FUNCTION partner_registry_changed();
