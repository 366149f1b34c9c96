-- 017_urgent_since: a delivery raised to urgent by an escalation has its
-- own escalation time, counted from the raise.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- When an urgent delivery escalates and its escalation partner already has
-- the referral waiting at a lower priority, that delivery is raised to
-- urgent instead of a copy being made. The escalation's candidates were
-- the urgent deliveries routed (created_at) longer than
-- KH_NOTIFY_ESCALATE_MS ago: a raised delivery, routed before the one
-- that escalated, was one at once, and escalated at the next sweep, an
-- alert that its partner had not answered in time before it could even be
-- sent. urgent_since is when it became urgent; it escalates that long
-- after the raise, like a copy made then. The column is added without a
-- default, which rewrites nothing; the index of the candidates is built
-- again on the time they count from.
ALTER TABLE deliveries ADD COLUMN urgent_since timestamptz NULL;
COMMENT ON COLUMN deliveries.urgent_since IS
    'When an escalation raised this delivery to urgent (NULL: it was routed '
    'urgent, or is not urgent). Its escalation time counts from here, else '
    'from created_at.';

DROP INDEX deliveries_unescalated_urgent;
CREATE INDEX deliveries_unescalated_urgent
    ON deliveries ((coalesce(urgent_since, created_at)))
    WHERE priority = 'urgent' AND escalated_at IS NULL
      AND state IN ('pending', 'delivered', 'dead');
COMMENT ON INDEX deliveries_unescalated_urgent IS
    'Urgent deliveries not acknowledged (pending, sent or dead) and not yet '
    'escalated, by the time their escalation counts from: the '
    'escalation''s candidates.';
