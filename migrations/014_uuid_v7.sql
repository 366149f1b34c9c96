-- 014_uuid_v7: kh_uuid_v7(), a new time-ordered id made by the database.
--
-- Applied by kh_migrate_apply in one transaction with its row in
-- kh_schema_migrations. Never edit once applied: add a new numbered file.
--
-- The services make their ids as kh_uuid_new does (common/proto.c): UUID
-- version 7 (RFC 9562), the Unix time in milliseconds in the first 48
-- bits, the version nibble 7, then random bits (here those of
-- gen_random_uuid(), its version nibble replaced as kh_uuid_new does).
-- Ids made one after another sort one after another, so the indexes they
-- key (deliveries by id and by referral, the trail by referral and by
-- delivery) take new entries at their right edge, on pages already in
-- memory and already in the WAL since the last checkpoint. This function makes the same ids in SQL: for
-- notification's escalation copies, and for the benchmarks' backlogs,
-- which with random ids (gen_random_uuid) touched a page all over each of
-- those indexes for every row: a backlog of 1,000,000 deliveries drained
-- at 15,900/s, with 75 us of PostgreSQL CPU per delivery, against 22,300/s
-- and 48 us with ids as the hub makes them.

CREATE FUNCTION kh_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE AS $$
    SELECT encode(set_byte(b, 6, (get_byte(b, 6) & 15) | 112), 'hex')::uuid
    FROM (SELECT overlay(uuid_send(gen_random_uuid())
        PLACING substring(int8send(floor(extract(epoch FROM
            clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6) AS b) r
$$;
ALTER FUNCTION kh_uuid_v7() OWNER TO ketenhub_owner;
COMMENT ON FUNCTION kh_uuid_v7() IS
    'A new UUID version 7: time in milliseconds, then random bits.';
