-- 024_audit_insert_columns: the roles that write audit events choose
-- what an event says, never its place in the trail or its time.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- 004 granted INSERT on every column of audit_events to the three
-- services and the administrators. A login of one of them could so write
-- an event dated in the past (at), or take a seq ahead of the sequence,
-- on which every later insert of every service then failed on the
-- primary key until the sequence passed it. No service, and no command
-- of ketenhubctl, sets either: seq comes from its sequence and at from
-- clock_timestamp(), the defaults. INSERT is now granted column by
-- column, without those two (the benchmark of the trail, which sets at,
-- connects as a superuser).
REVOKE INSERT ON audit_events FROM ketenhub_intake, ketenhub_routing,
    ketenhub_notification, ketenhub_admin;
GRANT INSERT (actor_kind, actor_id, action, referral_id, delivery_id,
              partner_id, outcome, reason_code, reason_path, payload_hash,
              rules_version, origin_service, origin_peer, rules_matched,
              query_filter)
    ON audit_events TO ketenhub_intake, ketenhub_routing,
       ketenhub_notification, ketenhub_admin;
