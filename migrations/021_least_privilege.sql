-- 021_least_privilege: intake reads no delivery's payload, routing
-- changes nothing of a referral but its state, and notification nothing
-- of a delivery but its progress.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Migration 004 gave ketenhub_intake SELECT on all of deliveries, for
-- STATUS, which reads the state of a referral's deliveries and never
-- their payloads: an intake process taken over could read every
-- partner's projected referrals. It gave ketenhub_routing UPDATE on all
-- of referrals, which sets the state alone (routed, unroutable), and
-- could rewrite a referral's payload or who submitted it. It gave
-- ketenhub_notification UPDATE on all of deliveries, which sets a
-- delivery's state, attempts, times and dead reason, and could rewrite
-- its payload or the partner it goes to. Column grants now hold each to
-- what it does. (SELECT ... FOR UPDATE needs UPDATE on one column.)
REVOKE SELECT ON deliveries FROM ketenhub_intake;
GRANT SELECT (id, referral_id, partner_id, priority, state, updated_at,
              escalation_of)
    ON deliveries TO ketenhub_intake;

REVOKE UPDATE ON referrals FROM ketenhub_routing;
GRANT UPDATE (state) ON referrals TO ketenhub_routing;

REVOKE UPDATE ON deliveries FROM ketenhub_notification;
GRANT UPDATE (state, attempts, sent_at, next_attempt_at, acked_at,
              dead_reason, escalated_at, updated_at)
    ON deliveries TO ketenhub_notification;
