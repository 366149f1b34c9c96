-- 008_purge: payloads can be purged at the end of their retention period
-- (ketenhubctl purge), and the trail records it.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- A purge erases the personal data of a referral whose work is done (routed
-- or unroutable, every delivery acknowledged or dead): the payload of the
-- referral and the payloads and escalation payloads of its deliveries
-- become NULL. The ids, states, times and payload hashes stay, so the
-- trail stays whole and verifiable (promise 6). Each purged referral gets
-- one referral.purged event in the same transaction (promise 2).

ALTER TABLE audit_events
    DROP CONSTRAINT audit_events_action_known,
    ADD CONSTRAINT audit_events_action_known
        CHECK (action IN ('referral.accepted', 'referral.rejected',
                          'referral.routed', 'referral.purged',
                          'request.rejected',
                          'delivery.created', 'delivery.sent',
                          'delivery.acked', 'delivery.nacked',
                          'delivery.dead', 'delivery.escalated',
                          'delivery.retried', 'rules.reloaded',
                          'rules.reload_failed', 'auth.refused',
                          'partner.added', 'partner.revoked',
                          'trail.queried', 'trail.exported',
                          'trail.verified'));

-- The administrator's command finds the finished referrals and erases
-- their payloads; it may change no other column of a referral.
GRANT SELECT, UPDATE (payload) ON referrals TO ketenhub_admin;

COMMENT ON COLUMN referrals.payload IS
    'The referral itself (personal data) as canonical JSON in UTF-8: compact, '
    'keys sorted, non-ASCII escaped (jansson JSON_COMPACT | JSON_SORT_KEYS | '
    'JSON_ENSURE_ASCII), so that sha256(payload) = payload_hash. Read it with '
    'convert_from(payload, ''UTF8'')::jsonb. NULL once purged (ketenhubctl '
    'purge; its referral.purged audit event says when and by whom).';
