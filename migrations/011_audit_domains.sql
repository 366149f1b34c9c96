-- 011_audit_domains: the checks on audit_events as domains, so that
-- PostgreSQL keeps them ready instead of preparing them for every
-- statement.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- A table's CHECK constraints are read from the catalog and planned again
-- for every statement that writes the table (ExecConstraints:
-- stringToNode, expression_planner). Every service writes audit events,
-- mostly a few rows per statement: that was 16 % of the CPU of intake's
-- database session at 1,000 referrals/s (scripts/bench-hub.sh with
-- KH_BENCH_PROFILE=open), and with pgbench a one-row INSERT took 0.25-0.28
-- ms with the 13 checks, 0.17-0.22 ms without and 0.18-0.20 ms with the
-- same checks on domains, whose planned checks stay in each session's
-- type cache.
--
-- The rules do not change: each column's type becomes a domain over its
-- old type with the old check, under the old constraint's name (an error
-- names the same constraint, SQLSTATE 23514 as before). A new action
-- needs a migration that replaces the constraint of the domain
-- audit_action. The domains are created without checks and the columns
-- changed over to them first, which rewrites nothing; each check is then
-- added to its domain, which reads the trail once to validate it. The view
-- audit_trail, which depends on the columns, is made again as it was.

CREATE DOMAIN audit_actor_kind AS text;
CREATE DOMAIN audit_actor_id AS text;
CREATE DOMAIN audit_action AS text;
CREATE DOMAIN audit_partner_id AS text;
CREATE DOMAIN audit_outcome AS text;
CREATE DOMAIN audit_reason_code AS text;
CREATE DOMAIN audit_reason_path AS text;
CREATE DOMAIN audit_hash AS bytea;
CREATE DOMAIN audit_rules_version AS text;
CREATE DOMAIN audit_origin_service AS text;
CREATE DOMAIN audit_origin_peer AS text;
CREATE DOMAIN audit_rules_matched AS text;
CREATE DOMAIN audit_query_filter AS text;

DROP VIEW audit_trail;

ALTER TABLE audit_events
    DROP CONSTRAINT audit_events_actor_kind_known,
    DROP CONSTRAINT audit_events_actor_id_format,
    DROP CONSTRAINT audit_events_action_known,
    DROP CONSTRAINT audit_events_partner_id_format,
    DROP CONSTRAINT audit_events_outcome_known,
    DROP CONSTRAINT audit_events_reason_code_format,
    DROP CONSTRAINT audit_events_reason_path_length,
    DROP CONSTRAINT audit_events_payload_hash_sha256,
    DROP CONSTRAINT audit_events_rules_version_length,
    DROP CONSTRAINT audit_events_origin_service_format,
    DROP CONSTRAINT audit_events_origin_peer_length,
    DROP CONSTRAINT audit_events_rules_matched_format,
    DROP CONSTRAINT audit_events_query_filter_format,
    ALTER COLUMN actor_kind TYPE audit_actor_kind,
    ALTER COLUMN actor_id TYPE audit_actor_id,
    ALTER COLUMN action TYPE audit_action,
    ALTER COLUMN partner_id TYPE audit_partner_id,
    ALTER COLUMN outcome TYPE audit_outcome,
    ALTER COLUMN reason_code TYPE audit_reason_code,
    ALTER COLUMN reason_path TYPE audit_reason_path,
    ALTER COLUMN payload_hash TYPE audit_hash,
    ALTER COLUMN rules_version TYPE audit_rules_version,
    ALTER COLUMN origin_service TYPE audit_origin_service,
    ALTER COLUMN origin_peer TYPE audit_origin_peer,
    ALTER COLUMN rules_matched TYPE audit_rules_matched,
    ALTER COLUMN query_filter TYPE audit_query_filter;

ALTER DOMAIN audit_actor_kind ADD CONSTRAINT audit_events_actor_kind_known
    CHECK (VALUE IN ('partner', 'service', 'admin', 'auditor'));
ALTER DOMAIN audit_actor_id ADD CONSTRAINT audit_events_actor_id_format
    CHECK (char_length(VALUE) BETWEEN 1 AND 64
           AND VALUE !~ '[[:cntrl:][:space:]]');
ALTER DOMAIN audit_action ADD CONSTRAINT audit_events_action_known
    CHECK (VALUE IN ('referral.accepted', 'referral.rejected',
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
ALTER DOMAIN audit_partner_id ADD CONSTRAINT audit_events_partner_id_format
    CHECK (octet_length(VALUE) <= 32 AND VALUE ~ '^[a-z][a-z0-9-]+$');
ALTER DOMAIN audit_outcome ADD CONSTRAINT audit_events_outcome_known
    CHECK (VALUE IN ('ok', 'refused', 'failed'));
ALTER DOMAIN audit_reason_code ADD CONSTRAINT audit_events_reason_code_format
    CHECK (octet_length(VALUE) <= 64 AND VALUE ~ '^[a-z][a-z0-9_.-]*$');
ALTER DOMAIN audit_reason_path ADD CONSTRAINT audit_events_reason_path_length
    CHECK (char_length(VALUE) <= 256 AND VALUE !~ '[[:cntrl:]]');
ALTER DOMAIN audit_hash ADD CONSTRAINT audit_events_payload_hash_sha256
    CHECK (octet_length(VALUE) = 32);
ALTER DOMAIN audit_rules_version
    ADD CONSTRAINT audit_events_rules_version_length
    CHECK (char_length(VALUE) BETWEEN 1 AND 128);
ALTER DOMAIN audit_origin_service
    ADD CONSTRAINT audit_events_origin_service_format
    CHECK (octet_length(VALUE) <= 32 AND VALUE ~ '^[a-z][a-z0-9_.-]*$');
ALTER DOMAIN audit_origin_peer ADD CONSTRAINT audit_events_origin_peer_length
    CHECK (char_length(VALUE) <= 128 AND VALUE !~ '[[:cntrl:]]');
ALTER DOMAIN audit_rules_matched
    ADD CONSTRAINT audit_events_rules_matched_format
    CHECK (char_length(VALUE) <= 4096 AND VALUE !~ '[[:cntrl:][:space:]]');
ALTER DOMAIN audit_query_filter ADD CONSTRAINT audit_events_query_filter_format
    CHECK (char_length(VALUE) <= 1024 AND VALUE !~ '[[:cntrl:]]');

-- Only the trail's owner may change a rule of the trail.
ALTER DOMAIN audit_actor_kind OWNER TO ketenhub_owner;
ALTER DOMAIN audit_actor_id OWNER TO ketenhub_owner;
ALTER DOMAIN audit_action OWNER TO ketenhub_owner;
ALTER DOMAIN audit_partner_id OWNER TO ketenhub_owner;
ALTER DOMAIN audit_outcome OWNER TO ketenhub_owner;
ALTER DOMAIN audit_reason_code OWNER TO ketenhub_owner;
ALTER DOMAIN audit_reason_path OWNER TO ketenhub_owner;
ALTER DOMAIN audit_hash OWNER TO ketenhub_owner;
ALTER DOMAIN audit_rules_version OWNER TO ketenhub_owner;
ALTER DOMAIN audit_origin_service OWNER TO ketenhub_owner;
ALTER DOMAIN audit_origin_peer OWNER TO ketenhub_owner;
ALTER DOMAIN audit_rules_matched OWNER TO ketenhub_owner;
ALTER DOMAIN audit_query_filter OWNER TO ketenhub_owner;

CREATE VIEW audit_trail AS
    SELECT seq, at, actor_kind, actor_id, action, referral_id, delivery_id,
           partner_id, outcome, reason_code, reason_path, payload_hash,
           rules_version, origin_service, origin_peer, rules_matched,
           query_filter
    FROM audit_events;
ALTER VIEW audit_trail OWNER TO ketenhub_owner;
GRANT SELECT ON audit_trail TO ketenhub_auditor, ketenhub_audit,
    ketenhub_admin;
COMMENT ON VIEW audit_trail IS 'The trail as auditors read it.';
