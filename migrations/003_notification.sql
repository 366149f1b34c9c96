-- 003_notification: what the notification service needs to deliver,
-- re-send, dead-letter and escalate deliveries; referrals that cannot be
-- routed.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.

ALTER TABLE deliveries
    ADD COLUMN attempts integer NOT NULL DEFAULT 0
        CONSTRAINT deliveries_attempts_nonnegative CHECK (attempts >= 0),
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN age_from timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN sent_at timestamptz NULL,
    ADD COLUMN acked_at timestamptz NULL,
    ADD COLUMN escalate_to text NULL
        CONSTRAINT deliveries_escalate_to_fkey REFERENCES partners (id),
    ADD COLUMN escalation_payload bytea NULL,
    ADD COLUMN escalation_payload_hash bytea NULL
        CONSTRAINT deliveries_escalation_payload_hash_sha256
        CHECK (octet_length(escalation_payload_hash) = 32),
    ADD COLUMN escalated_at timestamptz NULL,
    ADD COLUMN dead_reason text NULL
        CONSTRAINT deliveries_dead_reason_known
        CHECK (dead_reason IN ('max_attempts', 'max_age', 'nack_permanent',
                               'partner_revoked')),
    ADD COLUMN priority_rank smallint GENERATED ALWAYS AS (
        CASE priority WHEN 'urgent' THEN 2 WHEN 'high' THEN 1 ELSE 0 END)
        STORED,
    ADD CONSTRAINT deliveries_escalation_has_payload
        CHECK ((escalate_to IS NULL) = (escalation_payload_hash IS NULL)),
    ADD CONSTRAINT deliveries_dead_has_reason
        CHECK ((state = 'dead') = (dead_reason IS NOT NULL)),
    ADD CONSTRAINT deliveries_acked_has_time
        CHECK ((state = 'acknowledged') = (acked_at IS NOT NULL));

-- A referral whose stored payload cannot be read (or was purged before
-- routing) cannot be routed: it is set aside as unroutable, with an audit
-- event, instead of being claimed again at every pass.
ALTER TABLE referrals DROP CONSTRAINT referrals_state_known,
    ADD CONSTRAINT referrals_state_known
        CHECK (state IN ('accepted', 'routed', 'unroutable'));
COMMENT ON COLUMN referrals.state IS
    'accepted: stored, not yet routed; routed: deliveries created; '
    'unroutable: its payload could not be read (its referral.routed audit '
    'event has outcome failed and says why), nothing was delivered.';

-- The old index ordered priorities alphabetically. The notification
-- service takes a partner's pending deliveries by rank, then age; the
-- index holds pending rows only, so that the deliveries waiting for their
-- ACK are not walked over at every claim.
DROP INDEX deliveries_partner_state_priority_created;
CREATE INDEX deliveries_pending_partner_rank_created
    ON deliveries (partner_id, priority_rank DESC, created_at)
    WHERE state = 'pending';
-- Sent deliveries whose ACK is overdue (re-sends, and dead letters after
-- the last attempt), urgent ones that may need escalating, the oldest
-- open ones (age limit), and the dead letters administrators list.
CREATE INDEX deliveries_delivered_next_attempt
    ON deliveries (next_attempt_at) WHERE state = 'delivered';
CREATE INDEX deliveries_unescalated_urgent
    ON deliveries (created_at)
    WHERE priority = 'urgent' AND escalated_at IS NULL
      AND state IN ('pending', 'delivered');
CREATE INDEX deliveries_open_age_from
    ON deliveries (age_from) WHERE state IN ('pending', 'delivered');
CREATE INDEX deliveries_dead_updated
    ON deliveries (updated_at) WHERE state = 'dead';

-- Deliveries and referrals are work queues: each claim walks its index
-- from the oldest entry, and every state change leaves a dead entry there
-- until VACUUM removes it. With the default thresholds (20 % of the table)
-- a large backlog makes every claim walk over hundreds of thousands of
-- dead entries; vacuum them after a few thousand changes instead, and at
-- full speed.
ALTER TABLE deliveries SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0);
ALTER TABLE referrals SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0);

COMMENT ON COLUMN deliveries.attempts IS
    'How often the delivery was sent to the partner (0: never).';
COMMENT ON COLUMN deliveries.next_attempt_at IS
    'Pending: when it may be sent; delivered: when it is re-sent if no ACK '
    'came (the ACK timeout with exponential backoff and jitter).';
COMMENT ON COLUMN deliveries.age_from IS
    'The age limit (KH_NOTIFY_MAX_AGE_S) counts from here: when routing '
    'made the delivery, or when an administrator last retried it as a dead '
    'letter.';
COMMENT ON COLUMN deliveries.sent_at IS 'When it was last sent.';
COMMENT ON COLUMN deliveries.acked_at IS 'When the partner ACKed it.';
COMMENT ON COLUMN deliveries.escalate_to IS
    'The partner that gets a copy (escalation_payload) when this urgent '
    'delivery is not ACKed in time (from the rules; NULL: escalation raises '
    'an alert only).';
COMMENT ON COLUMN deliveries.escalation_payload IS
    'What the escalation copy carries: the referral projected on the '
    'fields that the rules give the escalation partner (need to know holds '
    'for a copy too), canonical JSON like payload. NULL once purged.';
COMMENT ON COLUMN deliveries.escalation_payload_hash IS
    'SHA-256 of escalation_payload; NULL exactly when escalate_to is.';
COMMENT ON COLUMN deliveries.escalated_at IS
    'When the missing ACK of this urgent delivery was escalated.';
COMMENT ON COLUMN deliveries.dead_reason IS
    'Why it is a dead letter: max_attempts, max_age, nack_permanent or '
    'partner_revoked. NULL unless state is dead.';
COMMENT ON COLUMN deliveries.priority_rank IS
    'priority as a number (urgent 2, high 1, normal 0) for ordering.';
