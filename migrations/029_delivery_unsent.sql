-- 029_delivery_unsent: the trail records a send that never left.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Notification commits a delivery's send (attempts + 1, delivery.sent)
-- before the DELIVER goes on the partner's connection, so that nothing
-- goes out that the trail does not show. A connection that went in
-- between leaves it held for another connection of the partner; one that
-- none takes in time never left the hub. Notification then gives the
-- attempt back (attempts - 1, due again at once) with a delivery.unsent
-- event: a delivery becomes a dead letter after attempts that were made,
-- and the trail does not claim a send that did not happen.
ALTER DOMAIN audit_action DROP CONSTRAINT audit_events_action_known;
ALTER DOMAIN audit_action ADD CONSTRAINT audit_events_action_known
    CHECK (VALUE IN ('referral.accepted', 'referral.rejected',
                     'referral.routed', 'referral.purged',
                     'request.rejected',
                     'delivery.created', 'delivery.sent',
                     'delivery.unsent',
                     'delivery.acked', 'delivery.nacked',
                     'delivery.dead', 'delivery.escalated',
                     'delivery.retried', 'rules.reloaded',
                     'rules.reload_failed', 'auth.refused',
                     'partner.added', 'partner.revoked',
                     'partner.key_rotated',
                     'trail.queried', 'trail.exported',
                     'trail.verified'));
