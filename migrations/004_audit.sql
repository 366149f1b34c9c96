-- 004_audit: the sealed trail. Roles and grants that make the trail
-- append-only for everyone but its NOLOGIN owner, the
-- seals (one chain hash per event) and the signed checkpoints
-- written by the audit service, and the views auditors read.
-- schemas/audit.md describes the canonical encoding, the chain and how
-- sealing copes with sequence values that commit out of order.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Roles are cluster-wide while this migration runs once per database, so
-- they are created only when missing. A deployment grants these NOLOGIN
-- group roles to its login users; the migrating user needs CREATEROLE.

DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['ketenhub_owner', 'ketenhub_intake',
                             'ketenhub_routing', 'ketenhub_notification',
                             'ketenhub_audit', 'ketenhub_admin',
                             'ketenhub_auditor'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL; -- created by a migration of another database
            END;
        END IF;
    END LOOP;
END
$$;

-- What an auditor's query or export asked for: the filter, never the
-- results. Built only from ids, action names, outcomes and times.
ALTER TABLE audit_events ADD COLUMN query_filter text NULL
    CONSTRAINT audit_events_query_filter_format
    CHECK (char_length(query_filter) <= 1024
           AND query_filter !~ '[[:cntrl:]]');

COMMENT ON COLUMN audit_events.query_filter IS
    'For trail.queried, trail.exported and trail.verified: the filter or '
    'range the auditor asked for (ids, action names, outcomes, times), '
    'never what it returned.';

-- The closed list of actions is kept in code (kh_trail_actions, listed in
-- schemas/audit.md) rather than as a constraint here: the migration tests
-- write events of their own.

CREATE INDEX audit_events_actor_id ON audit_events (actor_id);

-- One chain hash per sealed event: hash(n) = SHA-256(hash(previous sealed
-- event) || canonical(event n)). Written by the audit service only.
CREATE TABLE audit_seals (
    seq bigint PRIMARY KEY,
    hash bytea NOT NULL
        CONSTRAINT audit_seals_hash_sha256 CHECK (octet_length(hash) = 32)
);

COMMENT ON TABLE audit_seals IS
    'The hash chain over audit_events in seq order (schemas/audit.md). '
    'Append-only. A sealed event that is altered, removed or moved no '
    'longer matches its seal; a row of audit_events below the sealed head '
    'without a seal was inserted afterwards.';
COMMENT ON COLUMN audit_seals.seq IS 'The sealed event''s seq.';
COMMENT ON COLUMN audit_seals.hash IS
    'SHA-256 of the previous seal''s hash (32 zero bytes for the first '
    'event) followed by the event''s canonical encoding.';

-- Signed heads of the chain. Exported outside the database (ketenhubctl
-- audit export --checkpoints), they reveal truncation and rewrites.
CREATE TABLE audit_checkpoints (
    seq bigint PRIMARY KEY,
    head bytea NOT NULL
        CONSTRAINT audit_checkpoints_head_sha256
        CHECK (octet_length(head) = 32),
    at timestamptz NOT NULL,
    public_key bytea NOT NULL
        CONSTRAINT audit_checkpoints_public_key_ed25519
        CHECK (octet_length(public_key) = 32),
    signature bytea NOT NULL
        CONSTRAINT audit_checkpoints_signature_ed25519
        CHECK (octet_length(signature) = 64)
);

COMMENT ON TABLE audit_checkpoints IS
    'Checkpoints of the chain: the head hash after the event seq, signed '
    'with the hub''s Ed25519 audit key. Append-only.';
COMMENT ON COLUMN audit_checkpoints.seq IS 'Last event the head covers.';
COMMENT ON COLUMN audit_checkpoints.head IS 'The seal of event seq.';
COMMENT ON COLUMN audit_checkpoints.at IS 'When it was signed (signed).';
COMMENT ON COLUMN audit_checkpoints.public_key IS
    'The Ed25519 public key that signed it.';
COMMENT ON COLUMN audit_checkpoints.signature IS
    'Ed25519 signature of "ketenhub-checkpoint-v1" || seq || at || head '
    '(schemas/audit.md).';

CREATE TRIGGER audit_seals_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_seals
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_seals_no_truncate
    BEFORE TRUNCATE ON audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_checkpoints_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- ALWAYS: the triggers fire under session_replication_role = replica too.
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_update_delete;
ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_no_truncate;
ALTER TABLE audit_seals ENABLE ALWAYS TRIGGER audit_seals_no_update_delete;
ALTER TABLE audit_seals ENABLE ALWAYS TRIGGER audit_seals_no_truncate;
ALTER TABLE audit_checkpoints
    ENABLE ALWAYS TRIGGER audit_checkpoints_no_update_delete;
ALTER TABLE audit_checkpoints
    ENABLE ALWAYS TRIGGER audit_checkpoints_no_truncate;

-- The trail belongs to a role nobody logs in as: only the owner (or a
-- superuser) may ALTER, DROP or disable its triggers.
ALTER TABLE audit_events OWNER TO ketenhub_owner;
ALTER TABLE audit_seals OWNER TO ketenhub_owner;
ALTER TABLE audit_checkpoints OWNER TO ketenhub_owner;
ALTER FUNCTION audit_events_append_only() OWNER TO ketenhub_owner;

REVOKE ALL ON audit_events, audit_seals, audit_checkpoints FROM PUBLIC;
REVOKE ALL ON SEQUENCE audit_events_seq_seq FROM PUBLIC;

-- Services and administrators write events and nothing else.
GRANT INSERT ON audit_events TO ketenhub_intake, ketenhub_routing,
    ketenhub_notification, ketenhub_admin;
GRANT USAGE ON SEQUENCE audit_events_seq_seq TO ketenhub_intake,
    ketenhub_routing, ketenhub_notification, ketenhub_admin;
-- The audit service reads events and appends seals and checkpoints.
GRANT SELECT ON audit_events TO ketenhub_audit;
GRANT SELECT, INSERT ON audit_seals, audit_checkpoints TO ketenhub_audit;
GRANT SELECT ON SEQUENCE audit_events_seq_seq TO ketenhub_audit;

-- What the services need of the other tables (least privilege; today's
-- deployments may still connect as one user for all).
GRANT SELECT ON partners TO ketenhub_intake, ketenhub_routing,
    ketenhub_notification, ketenhub_admin;
GRANT SELECT, INSERT, UPDATE ON partners TO ketenhub_admin;
GRANT SELECT, INSERT ON referrals TO ketenhub_intake;
GRANT SELECT ON deliveries TO ketenhub_intake;
GRANT SELECT, UPDATE ON referrals TO ketenhub_routing;
GRANT SELECT, INSERT ON deliveries TO ketenhub_routing;
GRANT SELECT ON referrals TO ketenhub_notification;
GRANT SELECT, INSERT, UPDATE ON deliveries TO ketenhub_notification;
GRANT SELECT, UPDATE ON deliveries TO ketenhub_admin;

-- Auditors read views, never the tables, and write only the record of
-- their own access, through audit_record_access.
CREATE VIEW audit_trail AS
    SELECT seq, at, actor_kind, actor_id, action, referral_id, delivery_id,
           partner_id, outcome, reason_code, reason_path, payload_hash,
           rules_version, origin_service, origin_peer, rules_matched,
           query_filter
    FROM audit_events;
CREATE VIEW audit_trail_seals AS SELECT seq, hash FROM audit_seals;
CREATE VIEW audit_trail_checkpoints AS
    SELECT seq, head, at, public_key, signature FROM audit_checkpoints;
-- Which deliveries belong to which referral (ids only), so that one query
-- finds a referral's whole history.
CREATE VIEW audit_delivery_ids AS
    SELECT id, referral_id, partner_id FROM deliveries;

ALTER VIEW audit_trail OWNER TO ketenhub_owner;
ALTER VIEW audit_trail_seals OWNER TO ketenhub_owner;
ALTER VIEW audit_trail_checkpoints OWNER TO ketenhub_owner;
ALTER VIEW audit_delivery_ids OWNER TO ketenhub_owner;
GRANT SELECT ON deliveries TO ketenhub_owner;
GRANT SELECT ON audit_trail, audit_trail_seals, audit_trail_checkpoints,
    audit_delivery_ids TO ketenhub_auditor, ketenhub_audit, ketenhub_admin;

COMMENT ON VIEW audit_trail IS 'The trail as auditors read it.';
COMMENT ON VIEW audit_trail_seals IS 'The chain hashes, for verification.';
COMMENT ON VIEW audit_trail_checkpoints IS 'The signed checkpoints.';
COMMENT ON VIEW audit_delivery_ids IS
    'Delivery ids with their referral and partner (no payloads).';

-- Records an auditor's (or administrator's) access to the trail as
-- trail.queried, trail.exported or trail.verified; runs as the owner so
-- that auditors need no INSERT on the trail.
CREATE FUNCTION audit_record_access(p_action text, p_actor_kind text,
                                    p_actor_id text, p_outcome text,
                                    p_reason_code text, p_filter text,
                                    p_origin_service text,
                                    p_origin_peer text)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    new_seq bigint;
BEGIN
    IF p_action NOT IN ('trail.queried', 'trail.exported', 'trail.verified')
    THEN
        RAISE EXCEPTION 'not an access action'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF p_actor_kind NOT IN ('auditor', 'admin') THEN
        RAISE EXCEPTION 'not an auditor or administrator'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO audit_events (actor_kind, actor_id, action, outcome,
                              reason_code, query_filter, origin_service,
                              origin_peer)
    VALUES (p_actor_kind, p_actor_id, p_action, p_outcome, p_reason_code,
            p_filter, p_origin_service, p_origin_peer)
    RETURNING seq INTO new_seq;
    RETURN new_seq;
END;
$$;

ALTER FUNCTION audit_record_access(text, text, text, text, text, text, text,
                                   text) OWNER TO ketenhub_owner;
REVOKE ALL ON FUNCTION audit_record_access(text, text, text, text, text,
                                           text, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_record_access(text, text, text, text, text,
                                              text, text, text)
    TO ketenhub_auditor, ketenhub_admin;

COMMENT ON FUNCTION audit_record_access(text, text, text, text, text, text,
                                        text, text) IS
    'Writes the trail.queried / trail.exported / trail.verified event of an '
    'auditor''s access (the filter, not the results); returns its seq.';
