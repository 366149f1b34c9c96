/*
 * intake's batch statement (store.c prepares and runs it; the tests run it
 * on connections of their own, to pin its locking).
 */
#ifndef KH_INTAKE_STORE_SQL_H_INCLUDED
#define KH_INTAKE_STORE_SQL_H_INCLUDED

#include "ketenhub/partner.h"

#define S_TS_FORMAT "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'"

/* $1..$7 and $13: the submissions, column by column; $8..$12: the
 * refusals; $14..$16: the repeats, later requests of the batch with the
 * key of a submission (its 1-based index, the repeat's payload hash and
 * peer). All are binary arrays (no text to parse). Rows out: input
 * index (1-based), inserted?, id, stored payload hash (only when not
 * inserted), accepted_at, admitted?. A submission whose key ($13) no
 * longer admits its partner (revoked, or past a rotation's overlap, by a
 * change intake's key map has not heard of yet) is not taken: neither
 * inserted nor looked up, nothing written for it (admitted false). The
 * final SELECT runs on the statement's snapshot, so it
 * finds an earlier row for the same key but not the rows this statement
 * inserts. The rows go in in the order of their keys, not of their
 * arrival: two intake processes committing batches that share keys (a
 * partner resending to another replica) take them in one order and never
 * each hold a key the other waits for. */
/* clang-format off */
static const char *s_commit_sql =
    "WITH input AS ("
    "  SELECT t.*," KH_PARTNER_ADMITTED("t.key", "t.partner_id") " AS admitted"
    "  FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[],"
    "    $5::bytea[], $6::bytea[], $7::text[], $13::text[]) WITH ORDINALITY"
    "    AS t(id, partner_id, idem, version, payload, hash, peer, key, i)"
    "), ins AS ("
    "  INSERT INTO referrals (id, partner_id, idempotency_key,"
    "    schema_version, payload, payload_hash)"
    "  SELECT id, partner_id, idem, version, payload, hash"
    "  FROM input WHERE admitted ORDER BY partner_id, idem"
    "  ON CONFLICT (partner_id, idempotency_key) DO NOTHING"
    "  RETURNING id, accepted_at"
    "), accepted AS ("
    "  INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "    outcome, payload_hash, origin_service, origin_peer)"
    "  SELECT 'partner', input.partner_id, 'referral.accepted', ins.id, 'ok',"
    "    input.hash, 'intake', input.peer"
    "  FROM ins JOIN input USING (id) ORDER BY input.i"
    "), refused AS ("
    "  INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    "    reason_code, reason_path, origin_service, origin_peer)"
    "  SELECT 'partner', actor_id, action, 'refused', code, path, 'intake',"
    "    peer"
    "  FROM unnest($8::text[], $9::text[], $10::text[], $11::text[],"
    "    $12::text[]) WITH ORDINALITY"
    "    AS t(action, actor_id, code, path, peer, i) ORDER BY i"
    "), stored AS ("
    /* One index probe per key that was not inserted, never a table scan:
     * LIMIT keeps the planner from turning this into a hash join. */
    "  SELECT input.i, ins.id AS new_id, ins.accepted_at AS new_at,"
    "    r.id, r.payload_hash, r.accepted_at, input.hash, input.partner_id,"
    "    input.peer, input.admitted"
    "  FROM input LEFT JOIN ins USING (id)"
    "  LEFT JOIN LATERAL (SELECT id, payload_hash, accepted_at"
    "    FROM referrals WHERE ins.id IS NULL AND input.admitted"
    "    AND partner_id = input.partner_id"
    "    AND idempotency_key = input.idem LIMIT 1) r ON true"
    "), conflicts AS ("
    /* The same key for another referral: refused, and in the trail; a
     * repeat is held to the row its key has after the statement (the
     * submission's own when it was inserted). A row another process
     * committed meanwhile is not seen (neither inserted nor found):
     * intake writes the conflicts with it after the statement
     * (s_audit_conflicts, whose condition is this one's complement). */
    "  INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    "    reason_code, reason_path, payload_hash, origin_service, origin_peer)"
    "  SELECT 'partner', partner_id, 'referral.rejected', 'refused',"
    "    'idempotency_conflict', 'idempotency_key', hash, 'intake', peer"
    "  FROM (SELECT i, 0 AS j, partner_id, hash, peer FROM stored"
    "    WHERE payload_hash <> hash"
    "   UNION ALL"
    "   SELECT s.i, rep.j, s.partner_id, rep.hash, rep.peer"
    "   FROM unnest($14::text[], $15::bytea[], $16::text[]) WITH ORDINALITY"
    "    AS rep(sub, hash, peer, j)"
    "   JOIN stored s ON s.i = rep.sub::bigint"
    "   WHERE rep.hash <> CASE WHEN s.new_id IS NOT NULL THEN s.hash"
    "    ELSE s.payload_hash END) c"
    "  ORDER BY i, j"
    ")"
    " SELECT i, new_id IS NOT NULL, coalesce(new_id, id),"
    "   encode(payload_hash, 'hex'),"
    "   to_char(coalesce(new_at, accepted_at) AT TIME ZONE 'UTC',"
    "   " S_TS_FORMAT "), admitted"
    " FROM stored";
/* clang-format on */

#define S_COMMIT_PARAMS 16

#endif
