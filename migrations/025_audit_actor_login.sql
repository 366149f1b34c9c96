-- 025_audit_actor_login: an administrator's or an auditor's event names
-- the database login that wrote it, never a name the client gives.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Until now ketenhubctl named the OS user it ran as (actor_id) and its
-- host (origin_peer), both told by the client: any login in
-- ketenhub_admin could write an event in another administrator's name,
-- and audit_record_access wrote whatever name an auditor passed it. In a
-- container every command runs as the same OS user besides. PostgreSQL
-- authenticated the login (session_user, which SET ROLE and SECURITY
-- DEFINER leave as it is): that is the actor now. What the client says
-- of itself (OS user and host) stays in origin_peer, as a claim.

-- The login as an actor_id: white space and control characters (a quoted
-- role name may hold them; the domain refuses them) become '_', and at
-- most 64 characters are kept (a role name has at most 63 bytes).
CREATE FUNCTION audit_login() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $$
    SELECT left(regexp_replace(session_user::text,
                               '[[:cntrl:][:space:]]', '_', 'g'), 64)
$$;
ALTER FUNCTION audit_login() OWNER TO ketenhub_owner;
COMMENT ON FUNCTION audit_login() IS
    'The session''s login as the trail names an administrator or auditor.';

-- An administrator's statements leave actor_id out; the default names
-- the login, and the administrators may not write the column at all.
-- The services write it (a partner's id, their own name): for them the
-- default is never evaluated.
ALTER TABLE audit_events ALTER COLUMN actor_id SET DEFAULT audit_login();
REVOKE INSERT (actor_id) ON audit_events FROM ketenhub_admin;

-- Same signature (a ketenhubctl of the release before calls it as it
-- did): p_actor_id, the client's OS user, goes before the host in
-- origin_peer as USER@HOST; the new ketenhubctl passes NULL there and
-- USER@HOST as p_origin_peer.
CREATE OR REPLACE FUNCTION audit_record_access(p_action text,
                                               p_actor_kind text,
                                               p_actor_id text,
                                               p_outcome text,
                                               p_reason_code text,
                                               p_filter text,
                                               p_origin_service text,
                                               p_origin_peer text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    new_seq bigint;
BEGIN
    IF p_action NOT IN ('trail.queried', 'trail.exported', 'trail.verified')
    THEN
        RAISE EXCEPTION 'not an access action'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_actor_kind NOT IN ('auditor', 'admin') THEN
        RAISE EXCEPTION 'not an auditor or administrator'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO audit_events (actor_kind, actor_id, action, outcome,
                              reason_code, query_filter, origin_service,
                              origin_peer)
    VALUES (p_actor_kind, audit_login(), p_action, p_outcome, p_reason_code,
            p_filter, p_origin_service,
            CASE WHEN p_actor_id IS NULL THEN p_origin_peer
                 ELSE left(p_actor_id || '@' || coalesce(p_origin_peer, ''),
                           128) END)
    RETURNING seq INTO new_seq;
    RETURN new_seq;
END;
$$;

COMMENT ON FUNCTION audit_record_access(text, text, text, text, text, text,
                                        text, text) IS
    'Writes the trail.queried / trail.exported / trail.verified event of an '
    'auditor''s access (the filter, not the results), naming the login '
    '(audit_login()); returns its seq.';
