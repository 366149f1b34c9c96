-- 009_referral_checks: the checks on referrals at a fraction of the cost
-- per row, as 005 did for audit_events.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- The two format checks of 001 use bounded repetitions, which make
-- PostgreSQL's regex engine build a large automaton again for every row it
-- tests: about 7 us for '^[A-Za-z0-9._:-]{1,128}$' and 3.5 us for
-- '^[a-z][a-z0-9_.-]{0,63}$' per row (0.4 and 0.25 us in the form below).
-- They run on every INSERT of a referral (intake) and again on every
-- UPDATE of one (routing, purge): under load a quarter of the CPU of
-- intake's database session went to them (perf with DWARF call graphs,
-- scripts/bench-hub.sh).
--
-- The rules do not change: each pattern admits ASCII only, so a length in
-- octets is the length in characters, and "a length bound plus an
-- unbounded repetition" admits exactly what the bounded repetition did
-- (tests/integration/test_audit.c, referral_checks_decide_as_before).
-- Both are replaced in one ALTER TABLE: existing rows are scanned once.

ALTER TABLE referrals
    DROP CONSTRAINT referrals_idempotency_key_format,
    ADD CONSTRAINT referrals_idempotency_key_format
        CHECK (octet_length(idempotency_key) BETWEEN 1 AND 128
               AND idempotency_key ~ '^[A-Za-z0-9._:-]+$'),
    DROP CONSTRAINT referrals_schema_version_format,
    ADD CONSTRAINT referrals_schema_version_format
        CHECK (octet_length(schema_version) <= 64
               AND schema_version ~ '^[a-z][a-z0-9_.-]*$');
