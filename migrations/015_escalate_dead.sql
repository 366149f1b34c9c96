-- 015_escalate_dead: an urgent delivery that became a dead letter before
-- it was acknowledged escalates too.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- An urgent delivery not acknowledged within KH_NOTIFY_ESCALATE_MS of
-- routing is escalated (an alert, and a copy to the escalation partner
-- the rules name). 003's index of the candidates held the pending and
-- sent ones only, and the escalation looked at no others: an urgent
-- delivery that died first (its partner revoked, a NACK permanent, its
-- last attempt) was never escalated, and the escalation partner never
-- heard of a referral that its target will not act on. A dead letter is
-- not acknowledged: it escalates like one still waiting (once: a retry
-- keeps escalated_at). The index holds every urgent delivery that is not
-- acknowledged and not escalated yet. Urgent dead letters made before
-- this migration that were never escalated escalate at the notification
-- service's next sweep (an alert each, and a copy where the payload for
-- it is still there): their escalation partners were never told.
DROP INDEX deliveries_unescalated_urgent;
CREATE INDEX deliveries_unescalated_urgent
    ON deliveries (created_at)
    WHERE priority = 'urgent' AND escalated_at IS NULL
      AND state IN ('pending', 'delivered', 'dead');
COMMENT ON INDEX deliveries_unescalated_urgent IS
    'Urgent deliveries not acknowledged (pending, sent or dead) and not yet '
    'escalated, by age: the escalation''s candidates.';
COMMENT ON COLUMN deliveries.escalated_at IS
    'When the missing ACK of this urgent delivery was escalated (also when '
    'it had become a dead letter first; a retry keeps it).';
