-- 005_audit_checks: the same rules on audit_events at a fraction of the
-- cost per row.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- The checks of 001 cost 8 to 13 us of server CPU per inserted event
-- (scripts/bench-audit-rows.sh; 3 to 4 us after this), nearly all of it
-- in the bounded repetitions of their regular expressions:
-- '^[a-z][a-z0-9_.-]{0,63}$' makes PostgreSQL's regex engine build a
-- 64-state automaton again for every row it tests (about 3 to 6 us each).
-- The rules themselves do not change, except that the action is now
-- checked against the closed list:
--   action          one of the closed list (kh_trail_actions, schemas/
--                   audit.md) instead of the format: stricter. A new
--                   action needs a migration before code writes it.
--   partner_id,     the same pattern with an unbounded repetition plus a
--   reason_code,    length bound in octets. The pattern admits ASCII
--   origin_service  only, so the octets are the characters: equivalent.
-- actor_id, reason_path, origin_peer, rules_matched and query_filter keep
-- their checks: a character class without repetition costs well under a
-- microsecond.
--
-- All constraints are replaced in one ALTER TABLE, so existing rows are
-- scanned once (under the migration's ACCESS EXCLUSIVE lock) to validate
-- the new ones. The names stay those of 001 except for the action's, whose
-- meaning changed (audit_events_action_known, like actor_kind and outcome).

ALTER TABLE audit_events
    DROP CONSTRAINT audit_events_action_format,
    ADD CONSTRAINT audit_events_action_known
        CHECK (action IN ('referral.accepted', 'referral.rejected',
                          'referral.routed', 'request.rejected',
                          'delivery.created', 'delivery.sent',
                          'delivery.acked', 'delivery.nacked',
                          'delivery.dead', 'delivery.escalated',
                          'delivery.retried', 'rules.reloaded',
                          'rules.reload_failed', 'auth.refused',
                          'partner.added', 'partner.revoked',
                          'trail.queried', 'trail.exported',
                          'trail.verified')),
    DROP CONSTRAINT audit_events_partner_id_format,
    ADD CONSTRAINT audit_events_partner_id_format
        CHECK (octet_length(partner_id) <= 32
               AND partner_id ~ '^[a-z][a-z0-9-]+$'),
    DROP CONSTRAINT audit_events_reason_code_format,
    ADD CONSTRAINT audit_events_reason_code_format
        CHECK (octet_length(reason_code) <= 64
               AND reason_code ~ '^[a-z][a-z0-9_.-]*$'),
    DROP CONSTRAINT audit_events_origin_service_format,
    ADD CONSTRAINT audit_events_origin_service_format
        CHECK (octet_length(origin_service) <= 32
               AND origin_service ~ '^[a-z][a-z0-9_.-]*$');

COMMENT ON COLUMN audit_events.action IS
    'What happened: one of the closed list of schemas/audit.md (e.g. '
    'referral.accepted, delivery.acked). A new action needs a migration.';

-- The indexes stay as they are; each serves a query (schemas/audit.md,
-- "Indexes"): seq (the primary key) sealing, verification and paging;
-- referral_id and delivery_id a referral's or delivery's history;
-- partner_id and actor_id a partner's events (partner_id = p OR actor_id =
-- p, a BitmapOr of both) and an actor's; (action, at) the action filter
-- and ketenhubctl status (latest rules.reloaded and referral.routed).
