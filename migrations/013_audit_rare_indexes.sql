-- 013_audit_rare_indexes: the trail's action and actor indexes hold only
-- the rare values auditors look for; a time index finds a period.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
-- It builds four indexes of audit_events, which holds writes to the trail
-- (and so the hub) for as long as that takes on a large trail; the trail
-- stays readable until the old indexes make way for the new ones at the
-- end, in a moment.
--
-- Every referral adds eight events or so to the trail: accepted, routed,
-- and sent and acknowledged for each partner. Each event was an entry in
-- six indexes, and an index entry is a good part of what an event costs:
-- with the statements of notification's claim and ACK on one PostgreSQL
-- session, each of audit_events' five secondary indexes cost 2-4 us of
-- the 40 us of a delivery's claim and ACK.
--
-- An index helps an auditor look for what is rare: a dead letter, an
-- escalation, a refusal, what one administrator did. For the four actions
-- every referral has, and for the events of the hub's own services
-- (actors routing and notification, half of all events), a query reads
-- the trail in seq order (audit query: ORDER BY seq LIMIT n) and finds
-- its page in the first few hundred rows; an index entry for each of
-- those events costs every referral and saves an auditor nothing. A query
-- for one of those values that no index holds still returns every event
-- it matches: a partial index decides how PostgreSQL finds rows, never
-- which rows a query returns.
--
-- With the statements of notification's claim and ACK (1,000 deliveries
-- a statement, one session, 100,000 deliveries) a delivery costs 37.2 and
-- 36.4 us with this migration against 39.7 and 39.3 us without.
--
-- Two kinds of query had no index and read the whole trail: periods
-- (--since, --until) and outcomes (--outcome refused). The BRIN index on
-- at (the trail is written in time order) holds a summary per 128 pages
-- and costs next to nothing to keep; the index of the events that are not
-- ok holds refusals and failures only.

CREATE INDEX audit_events_action_at_rare ON audit_events (action, at)
    WHERE action NOT IN ('referral.accepted', 'referral.routed',
                         'delivery.sent', 'delivery.acked');
CREATE INDEX audit_events_actor_id_rare ON audit_events (actor_id)
    WHERE actor_id NOT IN ('routing', 'notification');
CREATE INDEX audit_events_at ON audit_events USING brin (at);
CREATE INDEX audit_events_not_ok ON audit_events (seq) WHERE outcome <> 'ok';

DROP INDEX audit_events_action_at;
ALTER INDEX audit_events_action_at_rare RENAME TO audit_events_action_at;
DROP INDEX audit_events_actor_id;
ALTER INDEX audit_events_actor_id_rare RENAME TO audit_events_actor_id;

COMMENT ON INDEX audit_events_action_at IS
    'Events by action and time, for the actions that are not in every '
    'referral''s history.';
COMMENT ON INDEX audit_events_actor_id IS
    'Events by actor, but for the hub''s routing and notification services '
    '(half of all events).';
COMMENT ON INDEX audit_events_at IS
    'A summary of the event times per 128 pages, to find a period.';
COMMENT ON INDEX audit_events_not_ok IS
    'The refusals and failures, in trail order.';
