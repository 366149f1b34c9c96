-- 025_audit_actor_login: an administrator's or an auditor's event names
-- the database login that wrote it, never a name the client gives.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Until now ketenhubctl named the OS user it ran as (actor_id) and its
-- host (origin_peer), both told by the client: any login in
-- ketenhub_admin could write an event in another administrator's name,
-- or a partner's, and audit_record_access wrote whatever name and kind
-- an auditor passed it. In a container every command runs as the same
-- OS user besides. PostgreSQL authenticated the login (session_user,
-- which SET ROLE and SECURITY DEFINER leave as it is): that is the actor
-- now, of the kind its group role makes it. What the client says of
-- itself (OS user and host) stays in origin_peer, as a claim.

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

-- An administrator's statements leave the actor out: the defaults name
-- the kind (admin) and the login, and the administrators may write
-- neither column (nor pass for a partner, a service or an auditor). The
-- services write both (a partner's id, their own name): for them the
-- defaults are never evaluated.
ALTER TABLE audit_events ALTER COLUMN actor_kind SET DEFAULT 'admin';
ALTER TABLE audit_events ALTER COLUMN actor_id SET DEFAULT audit_login();
REVOKE INSERT (actor_kind, actor_id) ON audit_events FROM ketenhub_admin;

-- Same signature (a ketenhubctl of the release before calls it as it
-- did): p_actor_id, the client's OS user, goes before the host in
-- origin_peer as USER@HOST; the new ketenhubctl passes NULL there and
-- USER@HOST as p_origin_peer. p_actor_kind is taken only when the login
-- has that group role.
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
    kind text;
BEGIN
    IF p_action NOT IN ('trail.queried', 'trail.exported', 'trail.verified')
    THEN
        RAISE EXCEPTION 'not an access action'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- The kind asked for when the login has that role, else the role it
    -- has: an auditor does not read as an administrator, nor the other
    -- way round (a superuser has every role).
    kind := CASE
        WHEN p_actor_kind IN ('auditor', 'admin')
             AND pg_has_role(session_user, 'ketenhub_' || p_actor_kind,
                             'MEMBER') THEN p_actor_kind
        WHEN pg_has_role(session_user, 'ketenhub_auditor', 'MEMBER')
            THEN 'auditor'
        WHEN pg_has_role(session_user, 'ketenhub_admin', 'MEMBER')
            THEN 'admin'
    END;
    IF kind IS NULL THEN
        RAISE EXCEPTION 'not an auditor or administrator'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO audit_events (actor_kind, actor_id, action, outcome,
                              reason_code, query_filter, origin_service,
                              origin_peer)
    VALUES (kind, audit_login(), p_action, p_outcome, p_reason_code,
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
