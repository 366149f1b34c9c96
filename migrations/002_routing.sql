-- 002_routing: deliveries (one per referral and target partner) and the
-- names of the rules that routed a referral in its audit event.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.

CREATE TABLE deliveries (
    id uuid PRIMARY KEY,
    referral_id uuid NOT NULL
        CONSTRAINT deliveries_referral_id_fkey REFERENCES referrals (id),
    partner_id text NOT NULL
        CONSTRAINT deliveries_partner_id_fkey REFERENCES partners (id),
    priority text NOT NULL DEFAULT 'normal'
        CONSTRAINT deliveries_priority_known
        CHECK (priority IN ('normal', 'high', 'urgent')),
    payload bytea NULL,
    payload_hash bytea NOT NULL
        CONSTRAINT deliveries_payload_hash_sha256
        CHECK (octet_length(payload_hash) = 32),
    state text NOT NULL DEFAULT 'pending'
        CONSTRAINT deliveries_state_known
        CHECK (state IN ('pending', 'delivered', 'acknowledged', 'dead')),
    rules_version text NOT NULL
        CONSTRAINT deliveries_rules_version_length
        CHECK (char_length(rules_version) BETWEEN 1 AND 128),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- A referral reaches a partner once, however many routing processes run.
    CONSTRAINT deliveries_referral_partner UNIQUE (referral_id, partner_id)
);

-- The notification service takes a partner's pending deliveries, most
-- urgent and oldest first.
CREATE INDEX deliveries_partner_state_priority_created
    ON deliveries (partner_id, state, priority, created_at);

COMMENT ON TABLE deliveries IS
    'What routing decided: one row per referral and target partner, holding '
    'only the fields that partner''s route projects (personal data in '
    'payload only, until it is purged).';
COMMENT ON COLUMN deliveries.id IS
    'Id of the delivery; re-sends carry the same id so a partner can drop '
    'duplicates.';
COMMENT ON COLUMN deliveries.referral_id IS 'The referral delivered.';
COMMENT ON COLUMN deliveries.partner_id IS 'The partner it is for.';
COMMENT ON COLUMN deliveries.priority IS
    'normal, high or urgent: the highest priority the matched rules gave '
    'this partner.';
COMMENT ON COLUMN deliveries.payload IS
    'The projected referral as canonical JSON in UTF-8 (compact, keys '
    'sorted, non-ASCII escaped), so that sha256(payload) = payload_hash. '
    'Read it with convert_from(payload, ''UTF8'')::jsonb. NULL once purged.';
COMMENT ON COLUMN deliveries.payload_hash IS
    'SHA-256 of payload. Kept after purge so the trail stays verifiable.';
COMMENT ON COLUMN deliveries.state IS
    'pending: not yet sent; delivered: sent, no ACK yet; acknowledged: the '
    'partner ACKed it; dead: given up after retries (dead letter).';
COMMENT ON COLUMN deliveries.rules_version IS
    'Version (SHA-256 of the file) of the rules that created the delivery.';
COMMENT ON COLUMN deliveries.created_at IS 'When routing committed it.';
COMMENT ON COLUMN deliveries.updated_at IS 'When its state last changed.';

ALTER TABLE audit_events ADD COLUMN rules_matched text NULL
    CONSTRAINT audit_events_rules_matched_format
    CHECK (char_length(rules_matched) <= 4096
           AND rules_matched !~ '[[:cntrl:][:space:]]');

COMMENT ON COLUMN audit_events.rules_matched IS
    'For referral.routed: the names of the rules that matched, comma '
    'separated, in file order (rule names are policy, not personal data). '
    'NULL when none matched (reason_code no_rule_matched).';
