-- 019_urgent_since_statistics: ANALYZE of deliveries samples as few rows
-- as migration 007 meant it to.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- ANALYZE samples 300 rows per unit of the largest statistics target of
-- the table's columns and of its indexes' expressions. Migration 007 gave
-- every column of the two queue tables a target of 10 (3,000 rows; 0 for
-- the payloads and hashes), but 017 added urgent_since and the expression
-- coalesce(urgent_since, created_at) of deliveries_unescalated_urgent,
-- both with the default of 100: every ANALYZE of deliveries (each 2 % of
-- change, every autovacuum round under load) sampled 30,000 rows again.
-- In scripts/bench-hub.sh with log_autovacuum_min_duration = 0 that was
-- 0.36 s of CPU per ANALYZE, the largest part of autovacuum's work; on a
-- table of 250,000 deliveries ANALYZE takes 360-400 ms with either at
-- 100 and 33-37 ms with both at 10.
ALTER TABLE deliveries ALTER COLUMN urgent_since SET STATISTICS 10;
ALTER INDEX deliveries_unescalated_urgent ALTER COLUMN 1 SET STATISTICS 10;
