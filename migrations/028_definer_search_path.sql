-- 028_definer_search_path: the function that runs as the owner looks up
-- no name in a schema its caller can write.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- audit_record_access runs as ketenhub_owner (SECURITY DEFINER) with
-- search_path pg_catalog, public. A search path that does not name
-- pg_temp searches it first for tables: an auditor (any login may make
-- temporary tables) could make a temporary audit_events with a trigger
-- of its own, and the function would write the access event there and
-- run that trigger as the owner. Now pg_temp is named last, where it is
-- searched for nothing the function reads (functions and operators are
-- never looked up there), and the function names its table and its
-- helper with their schema.
CREATE OR REPLACE FUNCTION audit_record_access(p_action text,
                                               p_actor_kind text,
                                               p_actor_id text,
                                               p_outcome text,
                                               p_reason_code text,
                                               p_filter text,
                                               p_origin_service text,
                                               p_origin_peer text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    INSERT INTO public.audit_events (actor_kind, actor_id, action, outcome,
                                     reason_code, query_filter,
                                     origin_service, origin_peer)
    VALUES (kind, public.audit_login(), p_action, p_outcome, p_reason_code,
            p_filter, p_origin_service,
            CASE WHEN p_actor_id IS NULL THEN p_origin_peer
                 ELSE left(p_actor_id || '@' || coalesce(p_origin_peer, ''),
                           128) END)
    RETURNING seq INTO new_seq;
    RETURN new_seq;
END;
$$;
