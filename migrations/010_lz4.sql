-- 010_lz4: payloads compressed with LZ4 instead of pglz.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- A payload over about 2 KB (a full referral; a partner's projection of a
-- long one) is compressed when its row is written. With pglz that was 15 %
-- of the CPU of routing's database session under load (perf with DWARF
-- call graphs, scripts/bench-hub.sh); inserting a delivery with a 2.4 KB
-- payload took 73-76 us with pglz and 50-53 us with LZ4, whose output was
-- also smaller (69 MB against 89 MB for 30,000 deliveries). Only new
-- values are compressed with LZ4; stored ones stay as they are, and
-- PostgreSQL reads both. A server built without LZ4 (PostgreSQL before
-- 14, or built without --with-lz4) keeps pglz: the migration says so and
-- goes on.

DO $$
BEGIN
    ALTER TABLE referrals ALTER COLUMN payload SET COMPRESSION lz4;
    ALTER TABLE deliveries
        ALTER COLUMN payload SET COMPRESSION lz4,
        ALTER COLUMN escalation_payload SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'no LZ4 in this PostgreSQL: payloads stay compressed '
        'with pglz (%)', SQLERRM;
END
$$;
