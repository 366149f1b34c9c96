-- 006_open_index: the index of open deliveries (for the age limit, the
-- revoked partners' sweep and the backlog figures) no longer competes with
-- the claims' own indexes.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- 003's deliveries_open_age_from held the rows WHERE state IN ('pending',
-- 'delivered'), which a claim's state = 'pending' (or 'delivered' for the
-- re-sends) implies. When the statistics were taken while a partner had
-- nothing pending (a queue's statistics describe one moment), the planner
-- estimated one row and chose that index and a sort over the partial
-- index made for the claim: every claim then walked all open deliveries
-- of every partner, some 20 ms each instead of 0.1 ms
-- (scripts/bench-deliveries.sh, EXPLAIN of the claim in the 1,000/s
-- phase), and in two runs out of twelve the deliveries to three partners
-- fell from about 10,000 to 2,000 a second.
--
-- The same rows are described without naming the state: a delivery is
-- open when it is neither acknowledged nor dead, which by the constraints
-- of 003 (deliveries_acked_has_time, deliveries_dead_has_reason) is
-- acked_at IS NULL AND dead_reason IS NULL. No claim says that, so no
-- claim can use this index; the statements about open deliveries say it
-- (services/notification/dstore.c, common/health.c, ketenhubctl status).
DROP INDEX deliveries_open_age_from;
CREATE INDEX deliveries_open_age_from ON deliveries (age_from)
    WHERE acked_at IS NULL AND dead_reason IS NULL;
COMMENT ON INDEX deliveries_open_age_from IS
    'Open deliveries (neither acknowledged nor dead) by the start of their '
    'age limit. Its predicate names no state, so that the claims, which '
    'select by state, never use it instead of their own indexes.';
