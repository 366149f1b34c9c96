-- 022_admin_no_payloads: administrators read no payload, and no role
-- reads one that its work does not need.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- Migrations 004 and 008 gave ketenhub_admin SELECT on all of referrals
-- and deliveries, and UPDATE on all of deliveries. An administrator's
-- commands read ids, states, counters, times and hashes, and of a payload
-- only whether it is still there and how large it is (deadletters show,
-- retry, purge); but with those grants an administrator's login could
-- read every referral and every partner's projection of it: personal
-- data of possible victims, often minors. It could also rewrite which
-- partner a delivery goes to, or its payload hash.
--
-- The facts the commands need become columns of their own, computed by
-- PostgreSQL from the payload on every write: payload_bytes (NULL once
-- purged) and, of a delivery, escalation_payload_bytes. As columns of the
-- row they are read under the row's lock and rechecked with it: a retry
-- that waited for a purge's lock sees the delivery purged, as it did when
-- it read payload IS NULL itself. (A view owned by another role, joined
-- to the locked row, would read the payload on the statement's snapshot,
-- from before the purge committed, and retry a purged delivery: see
-- test_retry_waits_for_purge.) Adding them
-- rewrites both tables once, under their ACCESS EXCLUSIVE lock: the
-- services wait for this migration to commit.
--
-- ketenhub_admin then holds SELECT on every column but the payloads, and
-- UPDATE on what retry sets (state, attempts, times, dead reason) and on
-- the payloads, which purge sets to NULL: PostgreSQL lets a role write a
-- column it may not read, and SET payload = NULL reads nothing.
-- (SELECT ... FOR UPDATE needs UPDATE on one column.)
--
-- Of the others: ketenhub_owner, which owns the auditors' views, held
-- SELECT on all of deliveries for audit_delivery_ids, which reads three
-- ids of it. ketenhub_intake held SELECT on all of referrals, and reads of
-- a stored referral only its id, hash and time (a resubmitted key's first
-- answer) and its state (STATUS): an intake process taken over could read
-- every referral ever accepted, not only those it is handed. And
-- ketenhub_notification held SELECT on referrals, which it never reads:
-- it sends deliveries' payloads, and makes escalation copies from them.
-- Routing reads referrals' payloads to route them, notification reads
-- deliveries': they keep those grants. Routing held SELECT on all of
-- deliveries too, and reads of them only the columns its insert's
-- ON CONFLICT names (PostgreSQL asks SELECT on those): it keeps those.
-- The audit service's and the auditors' roles hold nothing on either
-- table.
ALTER TABLE referrals
    ADD COLUMN payload_bytes integer
        GENERATED ALWAYS AS (octet_length(payload)) STORED;
ALTER TABLE deliveries
    ADD COLUMN payload_bytes integer
        GENERATED ALWAYS AS (octet_length(payload)) STORED,
    ADD COLUMN escalation_payload_bytes integer
        GENERATED ALWAYS AS (octet_length(escalation_payload)) STORED;

-- A small statistics target, as every column of the two queues has
-- (007): the purge selects by whether a size is NULL.
ALTER TABLE referrals ALTER COLUMN payload_bytes SET STATISTICS 10;
ALTER TABLE deliveries
    ALTER COLUMN payload_bytes SET STATISTICS 10,
    ALTER COLUMN escalation_payload_bytes SET STATISTICS 10;

COMMENT ON COLUMN referrals.payload_bytes IS
    'Size of payload in bytes, NULL once purged: what administrators may '
    'know of the payload (they may not read it).';
COMMENT ON COLUMN deliveries.payload_bytes IS
    'Size of payload in bytes, NULL once purged: what administrators may '
    'know of the payload (they may not read it).';
COMMENT ON COLUMN deliveries.escalation_payload_bytes IS
    'Size of escalation_payload in bytes, NULL when there is none or once '
    'purged.';

-- A REVOKE of a table's privilege revokes it on each column too, so the
-- column grants come after. (REVOKE SELECT leaves 008's UPDATE (payload)
-- on referrals, a privilege of another type: it is granted again only so
-- that this file says all that ketenhub_admin holds.)
REVOKE SELECT ON referrals FROM ketenhub_admin;
GRANT SELECT (id, partner_id, idempotency_key, schema_version, payload_hash,
              state, accepted_at, payload_bytes)
    ON referrals TO ketenhub_admin;
GRANT UPDATE (payload) ON referrals TO ketenhub_admin;

REVOKE SELECT, UPDATE ON deliveries FROM ketenhub_admin;
GRANT SELECT (id, referral_id, partner_id, priority, payload_hash, state,
              rules_version, created_at, updated_at, attempts,
              next_attempt_at, age_from, sent_at, acked_at, escalate_to,
              escalation_payload_hash, escalated_at, dead_reason,
              priority_rank, urgent_since, escalation_of, payload_bytes,
              escalation_payload_bytes)
    ON deliveries TO ketenhub_admin;
GRANT UPDATE (state, attempts, next_attempt_at, age_from, dead_reason,
              updated_at, payload, escalation_payload)
    ON deliveries TO ketenhub_admin;

REVOKE SELECT ON deliveries FROM ketenhub_owner;
GRANT SELECT (id, referral_id, partner_id) ON deliveries TO ketenhub_owner;

REVOKE SELECT ON referrals FROM ketenhub_intake;
GRANT SELECT (id, partner_id, idempotency_key, schema_version, payload_hash,
              state, accepted_at, payload_bytes)
    ON referrals TO ketenhub_intake;

REVOKE SELECT ON referrals FROM ketenhub_notification;

REVOKE SELECT ON deliveries FROM ketenhub_routing;
GRANT SELECT (referral_id, partner_id, escalation_of)
    ON deliveries TO ketenhub_routing;

-- A stored payload is never changed, only purged. ketenhub_admin may write
-- the payload columns for purge (above), and nothing but NULL may be
-- written there: no role rewrites what a partner was sent or will be
-- sent (its hash, which partners check, no role but the owner may change
-- either). The triggers fire only for a statement that sets a payload.
CREATE FUNCTION payload_purge_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'a stored payload is never changed, only purged'
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'set it to NULL (ketenhubctl purge)';
END;
$$;

COMMENT ON FUNCTION payload_purge_only() IS
    'Refuses an UPDATE that writes a payload other than NULL.';

CREATE TRIGGER referrals_payload_purge_only
    BEFORE UPDATE OF payload ON referrals
    FOR EACH ROW
    WHEN (NEW.payload IS NOT NULL
          AND NEW.payload IS DISTINCT FROM OLD.payload)
    EXECUTE FUNCTION payload_purge_only();
CREATE TRIGGER deliveries_payload_purge_only
    BEFORE UPDATE OF payload, escalation_payload ON deliveries
    FOR EACH ROW
    WHEN ((NEW.payload IS NOT NULL
           AND NEW.payload IS DISTINCT FROM OLD.payload)
          OR (NEW.escalation_payload IS NOT NULL
              AND NEW.escalation_payload IS DISTINCT FROM
                  OLD.escalation_payload))
    EXECUTE FUNCTION payload_purge_only();
