-- 027_routing_hold: a referral whose writes fail on their own is held
-- back in the database, not in one routing process's memory.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Routing held such a referral (a constraint or a limit refused what it
-- would write) back from its claims for a while, in a list of its own of
-- at most 64: with more of them at the head of the backlog than that list
-- held, every pass claimed one of them and failed, and the referrals
-- behind them waited for good; another routing process, or the same one
-- restarted, claimed them again at once. held_until is when the referral
-- may be claimed again (NULL: never held); every routing process skips it
-- until then. Routing may write that column and the state alone;
-- administrators may read it.
ALTER TABLE referrals ADD COLUMN held_until timestamptz;
-- As every column of the queues (007): a small statistics target, so that
-- an ANALYZE of the queue under load reads few rows.
ALTER TABLE referrals ALTER COLUMN held_until SET STATISTICS 10;

COMMENT ON COLUMN referrals.held_until IS
    'Routing claims the referral no sooner than this: its writes failed on '
    'their own (NULL: never held back).';

GRANT UPDATE (held_until) ON referrals TO ketenhub_routing;
-- ketenhubctl status counts them.
GRANT SELECT (held_until) ON referrals TO ketenhub_admin;
