-- 007_statistics: cheaper ANALYZE of the two queue tables.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Migration 003 has referrals and deliveries analyzed after every 2 % of
-- change, so that the claims are planned on the queue as it is. Under load
-- that is every autovacuum round (5 s), and ANALYZE samples 300 rows per
-- unit of the largest statistics target: 30,000 rows at the default of
-- 100, read from pages all over the table, payloads de-TOASTed. It was the
-- largest part of autovacuum's CPU (scripts/bench-hub.sh with
-- log_autovacuum_min_duration = 0: 0.33 s per ANALYZE of deliveries,
-- every 5 s).
--
-- What the claims and sweeps need to know of a queue (how many rows are in
-- which state, for which partner, the spread of the times) a sample of
-- 3,000 rows tells as well: a target of 10. No query filters, joins or
-- groups on the payloads and hashes (they are read by the row's key): a
-- target of 0 leaves them out of ANALYZE. The audit trail keeps the
-- default: it only grows, is analyzed rarely once large, and the auditors'
-- queries want its full statistics.

ALTER TABLE referrals
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN partner_id SET STATISTICS 10,
    ALTER COLUMN idempotency_key SET STATISTICS 10,
    ALTER COLUMN schema_version SET STATISTICS 10,
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN payload_hash SET STATISTICS 0,
    ALTER COLUMN state SET STATISTICS 10,
    ALTER COLUMN accepted_at SET STATISTICS 10;

ALTER TABLE deliveries
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN referral_id SET STATISTICS 10,
    ALTER COLUMN partner_id SET STATISTICS 10,
    ALTER COLUMN priority SET STATISTICS 10,
    ALTER COLUMN payload SET STATISTICS 0,
    ALTER COLUMN payload_hash SET STATISTICS 0,
    ALTER COLUMN state SET STATISTICS 10,
    ALTER COLUMN rules_version SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10,
    ALTER COLUMN updated_at SET STATISTICS 10,
    ALTER COLUMN attempts SET STATISTICS 10,
    ALTER COLUMN next_attempt_at SET STATISTICS 10,
    ALTER COLUMN age_from SET STATISTICS 10,
    ALTER COLUMN sent_at SET STATISTICS 10,
    ALTER COLUMN acked_at SET STATISTICS 10,
    ALTER COLUMN escalate_to SET STATISTICS 10,
    ALTER COLUMN escalation_payload SET STATISTICS 0,
    ALTER COLUMN escalation_payload_hash SET STATISTICS 0,
    ALTER COLUMN escalated_at SET STATISTICS 10,
    ALTER COLUMN dead_reason SET STATISTICS 10,
    ALTER COLUMN priority_rank SET STATISTICS 10;
