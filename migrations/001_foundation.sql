-- 001_foundation: partners, referrals and the audit trail.
--
-- Applied by kh_migrate_apply (ketenhubctl migrate) in one transaction
-- together with its row in kh_schema_migrations. Never edit this file once
-- it has been applied anywhere: add a new numbered file instead (the runner
-- refuses to run when an applied file's checksum changed).
--
-- Constraints are named so that later migrations can drop or widen them.

CREATE TABLE partners (
    id text PRIMARY KEY
        CONSTRAINT partners_id_format
        CHECK (id ~ '^[a-z][a-z0-9-]{1,31}$'),
    display_name text NOT NULL
        CONSTRAINT partners_display_name_format
        CHECK (char_length(display_name) BETWEEN 1 AND 100
               AND display_name = btrim(display_name)
               AND display_name !~ '[[:cntrl:]]'),
    kind text NOT NULL
        CONSTRAINT partners_kind_known
        CHECK (kind IN ('veilig_thuis', 'zorgcoordinator', 'police',
                        'municipality', 'inspectorate', 'national_centre',
                        'chain_director', 'other')),
    handles_cases boolean NOT NULL DEFAULT true,
    curve_public_key text NOT NULL
        CONSTRAINT partners_curve_public_key_key UNIQUE
        CONSTRAINT partners_curve_public_key_z85
        CHECK (curve_public_key ~ '^[]0-9a-zA-Z.:+=^!/*?&<>()[{}@%$#-]{40}$'
               AND curve_public_key <> repeat('0', 40)),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz NULL,
    -- Promise 5: the chain director works on cooperation, never on cases.
    CONSTRAINT partners_chain_director_no_cases
        CHECK (kind <> 'chain_director' OR NOT handles_cases),
    CONSTRAINT partners_revoked_after_created
        CHECK (revoked_at IS NULL OR revoked_at >= created_at)
);

COMMENT ON TABLE partners IS
    'Partner systems that may connect to the hub, one row per CURVE key. '
    'Rows are never deleted: a revoked partner keeps its row so the trail '
    'can still name it.';
COMMENT ON COLUMN partners.id IS
    'Stable short name of the partner (e.g. veilig-thuis-gv); the actor id '
    'in the trail and the name of its certificate file <id>.cert.';
COMMENT ON COLUMN partners.display_name IS
    'Name of the organisation for people (administrators, reports).';
COMMENT ON COLUMN partners.kind IS
    'What sort of organisation it is: veilig_thuis, zorgcoordinator, police, '
    'municipality, inspectorate, national_centre, chain_director or other.';
COMMENT ON COLUMN partners.handles_cases IS
    'Whether the partner may receive referrals. Always false for the chain '
    'director (ketenregisseur); routing refuses a target where it is false.';
COMMENT ON COLUMN partners.curve_public_key IS
    'The partner''s CURVE public key in Z85 (40 characters). The key that '
    'ZAP authenticated is the only proof of who sent a message.';
COMMENT ON COLUMN partners.created_at IS 'When the partner was registered.';
COMMENT ON COLUMN partners.revoked_at IS
    'When the partner''s key was revoked; NULL while it is active. A revoked '
    'partner can neither submit nor receive.';

CREATE TABLE referrals (
    id uuid PRIMARY KEY,
    partner_id text NOT NULL
        CONSTRAINT referrals_partner_id_fkey REFERENCES partners (id),
    idempotency_key text NOT NULL
        CONSTRAINT referrals_idempotency_key_format
        CHECK (idempotency_key ~ '^[A-Za-z0-9._:-]{1,128}$'),
    schema_version text NOT NULL
        CONSTRAINT referrals_schema_version_format
        CHECK (schema_version ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    payload bytea NULL,
    payload_hash bytea NOT NULL
        CONSTRAINT referrals_payload_hash_sha256
        CHECK (octet_length(payload_hash) = 32),
    state text NOT NULL DEFAULT 'accepted'
        CONSTRAINT referrals_state_known
        CHECK (state IN ('accepted', 'routed')),
    accepted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT referrals_partner_idempotency_key
        UNIQUE (partner_id, idempotency_key)
);

-- Routing claims the oldest accepted referrals first.
CREATE INDEX referrals_state_accepted_at ON referrals (state, accepted_at);

COMMENT ON TABLE referrals IS
    'Referrals (meldingen) accepted from partners. Holds personal data in '
    'payload only, until it is purged at the end of its retention period.';
COMMENT ON COLUMN referrals.id IS
    'Id the hub gave the referral when it accepted it.';
COMMENT ON COLUMN referrals.partner_id IS
    'The partner that submitted it (from its authenticated key).';
COMMENT ON COLUMN referrals.idempotency_key IS
    'The sender''s key for this referral; a resubmission with the same key '
    'by the same partner returns the first answer.';
COMMENT ON COLUMN referrals.schema_version IS
    'Version of the referral schema it was validated against, e.g. '
    'referral.v1.';
COMMENT ON COLUMN referrals.payload IS
    'The referral itself (personal data) as canonical JSON in UTF-8: compact, '
    'keys sorted, non-ASCII escaped (jansson JSON_COMPACT | JSON_SORT_KEYS | '
    'JSON_ENSURE_ASCII), so that sha256(payload) = payload_hash. Read it with '
    'convert_from(payload, ''UTF8'')::jsonb. NULL once purged.';
COMMENT ON COLUMN referrals.payload_hash IS
    'SHA-256 of payload (the canonical JSON). Kept after purge so the trail '
    'stays verifiable.';
COMMENT ON COLUMN referrals.state IS
    'accepted: stored, not yet routed; routed: deliveries created.';
COMMENT ON COLUMN referrals.accepted_at IS
    'When the hub committed the referral (and answered ACCEPTED).';

CREATE TABLE audit_events (
    seq bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor_kind text NOT NULL
        CONSTRAINT audit_events_actor_kind_known
        CHECK (actor_kind IN ('partner', 'service', 'admin', 'auditor')),
    actor_id text NOT NULL
        CONSTRAINT audit_events_actor_id_format
        CHECK (char_length(actor_id) BETWEEN 1 AND 64
               AND actor_id !~ '[[:cntrl:][:space:]]'),
    action text NOT NULL
        CONSTRAINT audit_events_action_format
        CHECK (action ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    referral_id uuid NULL,
    delivery_id uuid NULL,
    partner_id text NULL
        CONSTRAINT audit_events_partner_id_format
        CHECK (partner_id ~ '^[a-z][a-z0-9-]{1,31}$'),
    outcome text NOT NULL
        CONSTRAINT audit_events_outcome_known
        CHECK (outcome IN ('ok', 'refused', 'failed')),
    reason_code text NULL
        CONSTRAINT audit_events_reason_code_format
        CHECK (reason_code ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    reason_path text NULL
        CONSTRAINT audit_events_reason_path_length
        CHECK (char_length(reason_path) <= 256
               AND reason_path !~ '[[:cntrl:]]'),
    payload_hash bytea NULL
        CONSTRAINT audit_events_payload_hash_sha256
        CHECK (octet_length(payload_hash) = 32),
    rules_version text NULL
        CONSTRAINT audit_events_rules_version_length
        CHECK (char_length(rules_version) BETWEEN 1 AND 128),
    origin_service text NOT NULL
        CONSTRAINT audit_events_origin_service_format
        CHECK (origin_service ~ '^[a-z][a-z0-9_.-]{0,31}$'),
    origin_peer text NULL
        CONSTRAINT audit_events_origin_peer_length
        CHECK (char_length(origin_peer) <= 128
               AND origin_peer !~ '[[:cntrl:]]')
);

CREATE INDEX audit_events_referral_id ON audit_events (referral_id)
    WHERE referral_id IS NOT NULL;
CREATE INDEX audit_events_delivery_id ON audit_events (delivery_id)
    WHERE delivery_id IS NOT NULL;
CREATE INDEX audit_events_action_at ON audit_events (action, at);
CREATE INDEX audit_events_partner_id ON audit_events (partner_id)
    WHERE partner_id IS NOT NULL;

COMMENT ON TABLE audit_events IS
    'The audit trail: one row per state change or refusal, committed in the '
    'same transaction as the change it records. NEVER PERSONAL DATA: only '
    'ids, actors, actions, times, outcomes, codes, field paths and payload '
    'hashes, so the trail outlives the purge of every payload. Append-only: '
    'a trigger refuses UPDATE, DELETE and TRUNCATE.';
COMMENT ON COLUMN audit_events.seq IS
    'Insertion order. Values are taken at INSERT, not at COMMIT: a gap may '
    'still be filled by a transaction that commits later.';
COMMENT ON COLUMN audit_events.at IS
    'When the event happened (clock time of the statement, not of the '
    'transaction start).';
COMMENT ON COLUMN audit_events.actor_kind IS
    'Who acted: partner, service, admin or auditor.';
COMMENT ON COLUMN audit_events.actor_id IS
    'Partner id, service name or administrator/auditor name: never a '
    'person named in a referral.';
COMMENT ON COLUMN audit_events.action IS
    'What happened, e.g. referral.accepted, delivery.acked (lower case).';
COMMENT ON COLUMN audit_events.referral_id IS
    'The referral concerned, if any (not a foreign key: the trail stands on '
    'its own).';
COMMENT ON COLUMN audit_events.delivery_id IS
    'The delivery concerned, if any.';
COMMENT ON COLUMN audit_events.partner_id IS
    'The partner the event concerns besides the actor, if any: the partner '
    'an administrator added or revoked, the target of a delivery.';
COMMENT ON COLUMN audit_events.outcome IS 'ok, refused or failed.';
COMMENT ON COLUMN audit_events.reason_code IS
    'Error code (wire name) when the outcome is not ok.';
COMMENT ON COLUMN audit_events.reason_path IS
    'Path of the offending field (e.g. subject.age): a field name, never '
    'its value.';
COMMENT ON COLUMN audit_events.payload_hash IS
    'SHA-256 of the canonical payload the event concerns; lets an auditor '
    'tie the event to a payload without storing it.';
COMMENT ON COLUMN audit_events.rules_version IS
    'Version (hash) of the rules that routed the referral, for routing '
    'events.';
COMMENT ON COLUMN audit_events.origin_service IS
    'The service that wrote the event (intake, routing, ...).';
COMMENT ON COLUMN audit_events.origin_peer IS
    'Network peer of the request where there is one (a partner system''s '
    'address, never a person''s).';

-- The trail is append-only. This is defence in depth: tamper evidence
-- itself comes from the hash chain, which also catches a superuser who
-- disables this trigger.
CREATE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only'
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

COMMENT ON FUNCTION audit_events_append_only() IS
    'Refuses UPDATE, DELETE and TRUNCATE on audit_events.';

CREATE TRIGGER audit_events_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
