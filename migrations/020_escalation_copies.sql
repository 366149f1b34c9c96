-- 020_escalation_copies: an escalation copy is a delivery of its own,
-- one per overdue delivery, beside the escalation partner's own delivery
-- of the referral.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- A referral reached a partner once (deliveries_referral_partner), so the
-- copy to an escalation partner that had a delivery of the referral
-- already could not be made: when that delivery was still waiting it was
-- raised to urgent, and when it had been sent or acknowledged the
-- escalation partner was told nothing at all. With the default rules
-- that is the usual case: the zorgcoordinator, the escalation partner of
-- an urgent delivery to Veilig Thuis or AVIM, is a target of the same
-- referral, and acknowledges its own delivery long before the other's
-- escalation time. And when two deliveries of a referral escalated to the
-- same partner, it got one copy, of one of them.
--
-- escalation_of names the overdue delivery a copy was made for. A
-- partner still gets a referral's own delivery once (escalation_of NULL,
-- equal to itself under NULLS NOT DISTINCT), and at most one copy per
-- overdue delivery. The index leads with referral_id, as the constraint
-- it replaces did, for the statements that find a referral's deliveries.
--
-- Upgrading: routing's insert and notification's escalation name this
-- index's columns, and those of the release before name the
-- constraint's: stop routing and notification (every replica) before
-- migrating, and start the new release's after.
ALTER TABLE deliveries ADD COLUMN escalation_of uuid NULL
    CONSTRAINT deliveries_escalation_of_fkey REFERENCES deliveries (id);
ALTER TABLE deliveries ALTER COLUMN escalation_of SET STATISTICS 10;
COMMENT ON COLUMN deliveries.escalation_of IS
    'For an escalation copy: the delivery whose acknowledgement was overdue '
    '(another partner''s, of the same referral). NULL for the deliveries '
    'routing made.';

-- The copies made before: each was made in the statement that escalated
-- a delivery of the same referral naming its partner (escalate_to), so
-- its created_at is that delivery's escalated_at (one now()). Before this
-- migration a partner had one delivery of a referral, so a partner's own
-- delivery (routed before any escalation of the referral) is taken
-- for a copy only if its routing transaction began in the very
-- microsecond of that statement. When two deliveries escalated to the partner
-- at once, one copy stood for both: it names the first of them.
UPDATE deliveries c SET escalation_of = (
    SELECT min(o.id::text)::uuid FROM deliveries o
    WHERE o.referral_id = c.referral_id AND o.escalate_to = c.partner_id
      AND o.escalated_at = c.created_at)
WHERE c.priority = 'urgent' AND EXISTS (
    SELECT 1 FROM deliveries o
    WHERE o.referral_id = c.referral_id AND o.escalate_to = c.partner_id
      AND o.escalated_at = c.created_at);

CREATE UNIQUE INDEX deliveries_referral_partner_escalation
    ON deliveries (referral_id, partner_id, escalation_of) NULLS NOT DISTINCT;
COMMENT ON INDEX deliveries_referral_partner_escalation IS
    'A referral reaches a partner once, however many routing processes run '
    '(escalation_of NULL), and an overdue delivery gives one escalation '
    'copy.';
ALTER TABLE deliveries DROP CONSTRAINT deliveries_referral_partner;
