/*
 * The notification service's prepared statements, by index: its store
 * (dstore.c) prepares and runs them, and the tests EXPLAIN them as
 * PostgreSQL plans them for the service (generic plans, no seq scans).
 * Each is a single statement whose data-modifying CTEs change the
 * deliveries and write their audit events, so they commit together or not
 * at all.
 */
#ifndef KH_DSTORE_SQL_H_INCLUDED
#define KH_DSTORE_SQL_H_INCLUDED

#include "ketenhub/partner.h"

/* The wait before attempt `attempts + 1` of a delivery sent `attempts`
 * times: the ACK timeout doubled per attempt, capped, with ±20 % jitter
 * so that partners coming back together do not get their re-sends in
 * lockstep. Parameters: $ack_timeout_ms, $backoff_max_ms. */
#define S_BACKOFF(attempts, timeout, max)                                      \
    "now() + make_interval(secs => least(" timeout "::float8 * power(2, "      \
    "least(" attempts ", 30)), " max "::float8) / 1000.0 * (0.8 + 0.4 * "      \
    "random()))"

/* Whether a delivery (columns prefixed with p) is out: sent and not
 * acknowledged, state = 'delivered', in a form that no partial index's
 * predicate follows from. The statements that name their deliveries by id
 * then find them by key: written as the plain equality, it let the
 * planner read all of deliveries_delivered_next_attempt for one id when
 * the statistics knew few sent deliveries. */
#define S_OUT(p) " (" p "state = 'delivered') IS TRUE"

#define S_UTC(column)                                                          \
    "to_char(" column " AT TIME ZONE 'UTC', "                                  \
    "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"

/* What the two claims below (with $4 the ACK timeout ms and $5 the backoff
 * max ms) set on a delivery they send, return of it, audit (with peer as
 * the origin), and give the caller (the columns dstore.c reads, in that
 * order: id, referral id, priority, attempts, routed at, payload, hash,
 * and for an escalation copy the overdue delivery's partner and the time
 * its wait counted from, else NULLs; that delivery is looked up only for
 * a copy; and the time of this send, which names it).
 * The claims' results are binary: the payload comes as the stored bytes,
 * neither converted (bytes that are not UTF-8 would fail every claim of
 * every partner) nor in bytea's hex text, twice its size; the other
 * columns are text, whose binary form is their bytes. */
/* clang-format off */
#define S_SEND_SET                                                             \
    " attempts = d.attempts + 1, sent_at = now(), updated_at = now(),"         \
    " next_attempt_at = " S_BACKOFF("d.attempts", "$4", "$5")
#define S_SENT_RETURNING                                                       \
    " RETURNING d.id, d.referral_id, d.partner_id, d.priority,"                \
    " d.priority_rank, d.attempts, d.created_at, d.payload, d.payload_hash,"   \
    " d.escalation_of, d.sent_at"
#define S_SENT_AUDIT(peer)                                                     \
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"    \
    " delivery_id, partner_id, outcome, payload_hash, origin_service,"         \
    " origin_peer)"                                                            \
    " SELECT 'service', 'notification', 'delivery.sent', referral_id, id,"     \
    " partner_id, 'ok', payload_hash, 'notification', " peer
#define S_OVERDUE(rel, column)                                                 \
    " CASE WHEN " rel ".escalation_of IS NOT NULL THEN (SELECT " column       \
    " FROM deliveries o WHERE o.id = " rel ".escalation_of) END"
#define S_SENT_COLUMNS(rel)                                                    \
    " id::text, referral_id::text, priority, attempts::text,"                 \
    " " S_UTC("created_at") ", payload, encode(payload_hash, 'hex'),"         \
    S_OVERDUE(rel, "o.partner_id") ","                                         \
    S_OVERDUE(rel, S_UTC("coalesce(o.urgent_since, o.created_at)")) ","     \
    " " S_UTC("sent_at")
/* clang-format on */

/* The CTE name: the sent deliveries of partner $1 (handling cases, and
 * admitted by the connection's key $10: see s_claim_pending_sql) with
 * attempts left (fewer than $6) for which where holds, from the index of
 * sent ones by due time; up to limit of them, most urgent then oldest
 * first (the order they are sent in: taken in the order they fell due,
 * an urgent one waited behind normal ones due sooner when more were due
 * than the window took), locked; with their rank and age. */
#define S_SENT(name, where, limit)                                             \
    " " name " AS (SELECT id, priority_rank, created_at FROM deliveries"       \
    " WHERE state = 'delivered' AND " where " AND partner_id = $1"             \
    "  AND attempts < $6 AND EXISTS (SELECT 1 FROM partners p"                 \
    "   JOIN partner_keys k ON k.partner_id = p.id WHERE p.id = $1"            \
    "   AND p.handles_cases AND k.curve_public_key = $10"                      \
    "   AND" KH_PARTNER_KEY_ADMITS ")"                                         \
    " ORDER BY priority_rank DESC, created_at LIMIT " limit                    \
    " FOR UPDATE SKIP LOCKED),"

/* $1 partner, $2 credit, $3 reclaim, $4 ACK timeout ms, $5 backoff max
 * ms, $6 max attempts, $7 peer, $8 ids a reclaim leaves alone, $9 ids out
 * on the connection, $10 the connection's key. Sent deliveries whose
 * ACK is overdue (or all sent ones but $8, on reclaim), from the index of
 * sent ones; they go out most urgent, then oldest first. Those out on the
 * connection go again in their own place in its window; the others take
 * credit, up to $2 of them: claimed beyond the window, they would wait in
 * memory, sent in the trail but not yet on the wire, and be given up when they
 * waited too long. They share the credit with the partner's pending deliveries
 * by the claims' own order (most urgent, then oldest; a re-send before a new
 * one of the same rank and age): a re-send that a pending one outranks leaves
 * its credit to the claim of pending deliveries that follows in the same
 * transaction, so an urgent delivery never waits behind the re-sends of normal
 * ones (what is left out stays locked until the commit and goes at a later
 * round). Nothing goes to a revoked partner (the sweep makes its deliveries
 * dead letters) or on a key that no longer admits it, and a delivery past its
 * last attempt is left to the sweep too. The overdue ones are a range of that
 * index, which a re-send reads alone unless it reclaims (every connection
 * re-sends at every sweep: when a re-send read all that was in flight for every
 * partner, the sweeps cost the square of the partners). On a key that no
 * longer admits its partner, the one row is NULLs. */
/* clang-format off */
static const char *s_resend_sql =
    "WITH"
    S_SENT("again", "next_attempt_at <= now() AND id = ANY ($9::uuid[])",
           "cardinality($9::uuid[])")
    S_SENT("due", "next_attempt_at <= now() AND id <> ALL ($9::uuid[])", "$2")
    /* what a reclaim adds after them, up to $2 in all (so that it locks
     * no more than it sends) */
    S_SENT("reclaimed", "$3 AND next_attempt_at > now()"
           " AND id <> ALL ($8::uuid[])",
           "greatest($2 - (SELECT count(*) FROM due), 0)")
    /* the pending ones that would take the credit first (read from
     * the claims' index, not locked: the claim locks what it takes);
     * none read when nothing is to be re-sent, as at most sweeps */
    " pend AS (SELECT priority_rank, created_at FROM deliveries"
    "  WHERE partner_id = $1 AND state = 'pending' AND payload IS NOT NULL"
    "  AND next_attempt_at <= now()"
    "  AND EXISTS (SELECT FROM due UNION ALL SELECT FROM reclaimed)"
    "  ORDER BY priority_rank DESC, created_at LIMIT $2),"
    " credit AS (SELECT id FROM"
    "  (SELECT * FROM due UNION ALL SELECT * FROM reclaimed"
    "   UNION ALL SELECT NULL::uuid, priority_rank, created_at FROM pend) c"
    "  ORDER BY priority_rank DESC, created_at, id NULLS LAST LIMIT $2),"
    " resend AS (SELECT id FROM again"
    "  UNION ALL SELECT id FROM credit WHERE id IS NOT NULL),"
    " claimed AS ("
    " UPDATE deliveries d SET" S_SEND_SET
    " WHERE d.id IN (SELECT id FROM resend)" S_SENT_RETURNING "),"
    " audit AS (" S_SENT_AUDIT("$7") " FROM claimed),"
    " asked AS (SELECT" KH_PARTNER_ADMITTED("$10", "$1") " AS admitted)"
    " SELECT" S_SENT_COLUMNS("claimed")
    " FROM asked LEFT JOIN claimed ON true"
    " WHERE claimed.id IS NOT NULL OR NOT asked.admitted"
    " ORDER BY claimed.priority_rank DESC, claimed.created_at";
/* clang-format on */

/* $1 partners, $2 limits, $3 peers, $6 the connections' keys (text
 * arrays of the same length), $4 ACK timeout ms, $5 backoff max ms. The
 * pending deliveries of each partner, up to its limit, from the claims' index
 * by rank and age; one statement for all the connections that have credit, so
 * that a round costs one execution however many partners it serves. A partner
 * is served once per statement (its first request whose key admits it: SKIP
 * LOCKED does not skip the rows the statement itself locked). Nothing goes
 * on a key that no longer admits its partner (revoked, or past a
 * rotation's overlap), which the statement checks itself: the service's
 * key map hears of a change only after it committed. Nor to a partner
 * that does not handle cases (the ketenregisseur: routing never
 * addresses one, and should a delivery to one be there, it stays unsent,
 * waiting in the status of that partner).
 * Rows come by request number, then as the partner is to get them (the
 * last three columns order them); a request whose key does not admit its
 * partner has one row, of its number and NULLs (the service's key map is
 * stale: it reads it again).
 * The claimed rows find their request by partner, among the few requests:
 * matched by id against the pending rows, a CTE the planner cannot index
 * and may expect a row or two of, every claimed row was compared with
 * every pending one (1,024 rows: a million comparisons, twice, 0.3-0.8 s
 * a claim). The UPDATE takes its rows as a semi-join: as a join, with a
 * backlog the statistics knew of, it hashed every delivery. */
/* clang-format off */
static const char *s_claim_pending_sql =
    "WITH req AS ("
    " SELECT DISTINCT ON (r.partner) r.* FROM unnest($1::text[], $2::text[],"
    "  $3::text[], $6::text[]) WITH ORDINALITY AS r(partner, lim, peer, key, n)"
    "  JOIN partners p ON p.id = r.partner AND p.handles_cases"
    "  JOIN partner_keys k ON k.curve_public_key = r.key"
    "  AND k.partner_id = r.partner AND" KH_PARTNER_KEY_ADMITS
    " ORDER BY r.partner, r.n),"
    " pending AS ("
    " SELECT p.id FROM req CROSS JOIN LATERAL"
    "  (SELECT id FROM deliveries"
    "   WHERE partner_id = req.partner AND state = 'pending'"
    "    AND payload IS NOT NULL AND next_attempt_at <= now()"
    "   ORDER BY priority_rank DESC, created_at"
    "   LIMIT req.lim::integer FOR UPDATE SKIP LOCKED) p),"
    " claimed AS ("
    " UPDATE deliveries d SET state = 'delivered'," S_SEND_SET
    " WHERE d.id IN (SELECT id FROM pending)" S_SENT_RETURNING "),"
    " sent AS (SELECT req.n, req.peer, claimed.* FROM claimed"
    "  JOIN req ON req.partner = claimed.partner_id),"
    " audit AS (" S_SENT_AUDIT("peer") " FROM sent)"
    " SELECT n::text," S_SENT_COLUMNS("sent") ","
    "  n AS by_n, priority_rank AS by_rank, created_at AS by_age FROM sent"
    /* a row for each request whose key does not admit its partner (not
     * joined to the sent ones: a CTE the planner cannot index) */
    " UNION ALL SELECT r.n::text, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    "  NULL, NULL, NULL, r.n, NULL, NULL"
    "  FROM unnest($1::text[], $6::text[]) WITH ORDINALITY AS r(partner, key, n)"
    "  WHERE NOT" KH_PARTNER_ADMITTED("r.key", "r.partner")
    " ORDER BY by_n, by_rank DESC, by_age";
/* clang-format on */

/* $1 ids, $2 partners, $3 peers, $4 the keys they came with (arrays of
 * the same length). An ACK on a key that no longer admits its partner
 * (revoked, or past a rotation's overlap: the service's key map hears of
 * that only after it committed) changes nothing and writes nothing:
 * not_admitted (the service reads the registry again, whose refusal of
 * the key is audited as the frame comes again). Else it counts for a
 * delivery of that partner that was sent at least once (ever:
 * sent_at, since an administrator's retry of a dead letter starts its
 * attempts again) and is not acknowledged yet (a dead letter that the
 * partner did take, retried or not, is acknowledged after all). Returns per
 * request, in order, done, duplicate, not_found or not_admitted. Every step
 * joins on the request's number: a batch costs the same per ACK whatever its
 * size (no request scans another's rows), and the deliveries are looked up
 * again only for the ACKs that changed nothing (duplicate or not_found). The
 * deliveries are locked first, in the order of their ids, and only then
 * changed: updated straight from the requests, they were locked in the join's
 * order, the requests' own, and two batches of the same deliveries in other
 * orders (two replicas, a partner answering on a connection to each) could each
 * hold one the other waited for: a deadlock, and one batch failed. Every
 * statement that waits for several deliveries takes them by id (the claims and
 * sweeps skip what is locked and wait for none). */
/* clang-format off */
static const char *s_ack_sql =
    "WITH req AS ("
    " SELECT r.*," KH_PARTNER_ADMITTED("r.key", "r.partner") " AS admitted"
    " FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])"
    "  WITH ORDINALITY AS r(id, partner, peer, key, n)),"
    " locked AS MATERIALIZED ("
    " SELECT req.n, req.peer, d.id FROM req JOIN deliveries d"
    "  ON d.id = req.id AND d.partner_id = req.partner AND req.admitted"
    "  AND d.sent_at IS NOT NULL AND d.state <> 'acknowledged'"
    " ORDER BY d.id FOR UPDATE OF d),"
    " acked AS ("
    " UPDATE deliveries d SET state = 'acknowledged', acked_at = now(),"
    "  updated_at = now(), dead_reason = NULL"
    " FROM locked WHERE d.id = locked.id"
    "  AND d.sent_at IS NOT NULL AND d.state <> 'acknowledged'"
    " RETURNING locked.n, d.id, d.referral_id, d.partner_id, d.payload_hash,"
    "  locked.peer, extract(epoch FROM now() - d.sent_at) AS wait),"
    " rest AS ("
    " SELECT * FROM req WHERE req.admitted AND NOT EXISTS"
    "  (SELECT 1 FROM acked WHERE acked.n = req.n)),"
    " known AS ("
    " SELECT rest.n FROM rest JOIN deliveries d"
    "  ON d.id = rest.id AND d.partner_id = rest.partner"
    "  AND d.sent_at IS NOT NULL),"
    " audit AS ("
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "  delivery_id, partner_id, outcome, reason_code, payload_hash,"
    "  origin_service, origin_peer)"
    " SELECT 'partner', partner_id, 'delivery.acked', referral_id, id,"
    "  partner_id, 'ok', NULL, payload_hash, 'notification', peer FROM acked"
    " UNION ALL"
    " SELECT 'partner', partner, 'delivery.acked', NULL, id, NULL,"
    "  'refused', 'not_found', NULL, 'notification', peer FROM rest"
    "  WHERE NOT EXISTS (SELECT 1 FROM known WHERE known.n = rest.n))"
    " SELECT CASE WHEN NOT req.admitted THEN 'not_admitted'"
    "  WHEN acked.n IS NOT NULL THEN 'done'"
    "  WHEN known.n IS NOT NULL THEN 'duplicate' ELSE 'not_found' END,"
    " acked.wait"
    " FROM req LEFT JOIN acked ON acked.n = req.n"
    "  LEFT JOIN known ON known.n = req.n ORDER BY req.n";
/* clang-format on */

/* $1 id, $2 partner, $3 peer, $4 permanent, $5 max attempts, $6 ACK
 * timeout ms, $7 backoff max ms, $8 the key it came with. Only a delivery
 * that is out (sent, not acknowledged) changes, and only on a key that
 * admits its partner (as for an ACK). Returns one row: delivered (re-sent
 * later), dead, unchanged, not_found or not_admitted, and the referral id
 * of one that changed (for the alert of a dead letter). */
/* clang-format off */
static const char *s_nack_sql =
    "WITH req AS (SELECT" KH_PARTNER_ADMITTED("$8", "$2") " AS admitted),"
    " upd AS ("
    " UPDATE deliveries d SET"
    "  state = CASE WHEN $4 OR d.attempts >= $5 THEN 'dead'"
    "   ELSE 'delivered' END,"
    "  dead_reason = CASE WHEN $4 THEN 'nack_permanent'"
    "   WHEN d.attempts >= $5 THEN 'max_attempts' END,"
    "  next_attempt_at = " S_BACKOFF("d.attempts - 1", "$6", "$7") ","
    "  updated_at = now()"
    " WHERE d.id = $1 AND d.partner_id = $2"
    "  AND" S_OUT("d.") " AND (SELECT admitted FROM req)"
    " RETURNING d.id, d.referral_id, d.partner_id, d.payload_hash, d.state,"
    "  d.dead_reason),"
    " audit AS ("
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "  delivery_id, partner_id, outcome, reason_code, payload_hash,"
    "  origin_service, origin_peer)"
    " SELECT 'partner', partner_id, 'delivery.nacked', referral_id, id,"
    "  partner_id, 'ok', CASE WHEN $4 THEN 'nack_permanent'"
    "  ELSE 'nack_retry' END, payload_hash, 'notification', $3 FROM upd"
    " UNION ALL"
    " SELECT 'service', 'notification', 'delivery.dead', referral_id, id,"
    "  partner_id, 'ok', dead_reason, payload_hash, 'notification', NULL"
    "  FROM upd WHERE state = 'dead'"
    " UNION ALL"
    " SELECT 'partner', $2, 'delivery.nacked', NULL, $1, NULL, 'refused',"
    "  'not_found', NULL, 'notification', $3"
    "  WHERE (SELECT admitted FROM req) AND NOT EXISTS (SELECT 1"
    "   FROM deliveries WHERE id = $1 AND partner_id = $2"
    "   AND sent_at IS NOT NULL))"
    " SELECT CASE WHEN NOT (SELECT admitted FROM req) THEN 'not_admitted'"
    "  ELSE coalesce((SELECT state FROM upd),"
    "  (SELECT 'unchanged' FROM deliveries"
    "   WHERE id = $1 AND partner_id = $2 AND sent_at IS NOT NULL), 'not_found')"
    "  END, (SELECT referral_id FROM upd)";
/* clang-format on */

/* $1 max attempts, $2 max age s. At most 1000 of each kind per sweep.
 * Each kind is found from an index that holds just its candidates, so a
 * sweep that finds nothing reads next to nothing: sent deliveries whose
 * last attempt is overdue, or whose partner was revoked, from the index of
 * sent ones by due time (a revoked partner's delivery in flight dies when
 * its ACK is overdue); the oldest open deliveries from the index of open
 * ones (named as it names them: acked_at and dead_reason NULL,
 * migrations/006); a revoked partner's pending deliveries from the
 * claims' index, partner by partner. Walking every open delivery to look
 * for revoked partners cost 20-35 ms a sweep under load. */
static const char *s_dead_sql =
    "WITH due AS ("
    "  (SELECT id FROM deliveries WHERE state = 'delivered'"
    "    AND next_attempt_at <= now()"
    "    AND (attempts >= $1 OR partner_id IN"
    "     (SELECT id FROM partners WHERE revoked_at IS NOT NULL))"
    "    LIMIT 1000)"
    "  UNION (SELECT id FROM deliveries WHERE acked_at IS NULL"
    "    AND dead_reason IS NULL"
    "    AND age_from < now() - make_interval(secs => $2) LIMIT 1000)"
    "  UNION (SELECT pending.id FROM partners r CROSS JOIN LATERAL"
    "    (SELECT id FROM deliveries WHERE partner_id = r.id"
    "     AND state = 'pending' LIMIT 1000) pending"
    "    WHERE r.revoked_at IS NOT NULL LIMIT 1000)),"
    " cand AS ("
    " SELECT c.id FROM due CROSS JOIN LATERAL ("
    "  SELECT d.id FROM deliveries d"
    "  WHERE d.id = due.id AND d.state IN ('pending', 'delivered')"
    "  FOR UPDATE SKIP LOCKED) c),"
    " dead AS ("
    " UPDATE deliveries d SET state = 'dead', updated_at = now(),"
    "  dead_reason = CASE WHEN EXISTS (SELECT 1 FROM partners p"
    "   WHERE p.id = d.partner_id AND p.revoked_at IS NOT NULL)"
    "   THEN 'partner_revoked'"
    "   WHEN d.age_from < now() - make_interval(secs => $2) THEN 'max_age'"
    "   ELSE 'max_attempts' END"
    " WHERE d.id IN (SELECT id FROM cand)"
    " RETURNING d.id, d.referral_id, d.partner_id, d.payload_hash,"
    "  d.dead_reason),"
    " audit AS ("
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "  delivery_id, partner_id, outcome, reason_code, payload_hash,"
    "  origin_service)"
    " SELECT 'service', 'notification', 'delivery.dead', referral_id, id,"
    "  partner_id, 'ok', dead_reason, payload_hash, 'notification' FROM dead)"
    " SELECT id, referral_id, partner_id, dead_reason FROM dead";

/* $1 escalation time ms. An urgent delivery not acknowledged in that
 * time since routing (or since an escalation of a release before 020
 * raised it to urgent) escalates, once: waiting, sent, or dead (a dead
 * letter will not be acknowledged either; one that died first still
 * escalates when its time comes, and its escalated_at stays through a
 * retry). Its escalation copy is a new urgent delivery to the escalation
 * partner of the payload routing projected for it (its own fields, not
 * the target's), naming the overdue delivery (escalation_of), unless that
 * partner is revoked or does not handle cases, or the payload was purged.
 * It is made whatever that partner has of the referral already: its own
 * delivery, acknowledged long ago, or the copy of another overdue
 * delivery (each copy says whose acknowledgement is overdue). Returns per
 * escalated delivery its id, referral, partner, escalation partner, what
 * came of the copy (made or none) and, for none, why (see
 * dstore_event_t). */
static const char *s_escalate_sql =
    "WITH cand AS ("
    " SELECT id FROM deliveries"
    " WHERE priority = 'urgent' AND escalated_at IS NULL"
    "  AND state IN ('pending', 'delivered', 'dead')"
    "  AND coalesce(urgent_since, created_at)"
    "   <= now() - make_interval(secs => $1 / 1000.0)"
    " ORDER BY coalesce(urgent_since, created_at)"
    " LIMIT 1000 FOR UPDATE SKIP LOCKED),"
    " esc AS ("
    " UPDATE deliveries d SET escalated_at = now()"
    " WHERE d.id IN (SELECT id FROM cand)"
    " RETURNING d.id, d.referral_id, d.partner_id, d.payload_hash,"
    "  d.escalate_to, d.escalation_payload, d.escalation_payload_hash,"
    "  d.rules_version),"
    " copies AS ("
    " INSERT INTO deliveries (id, referral_id, partner_id, priority, payload,"
    "  payload_hash, rules_version, escalation_of)"
    " SELECT kh_uuid_v7(), esc.referral_id, esc.escalate_to, 'urgent',"
    "  esc.escalation_payload, esc.escalation_payload_hash,"
    "  esc.rules_version, esc.id FROM esc"
    "  JOIN partners p ON p.id = esc.escalate_to AND p.revoked_at IS NULL"
    "  AND p.handles_cases WHERE esc.escalation_payload IS NOT NULL"
    " ON CONFLICT (referral_id, partner_id, escalation_of) DO NOTHING"
    " RETURNING id, referral_id, partner_id, payload_hash, escalation_of),"
    " audit AS ("
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "  delivery_id, partner_id, outcome, reason_code, payload_hash,"
    "  origin_service)"
    " SELECT 'service', 'notification', 'delivery.escalated', referral_id,"
    "  id, partner_id, 'ok', 'ack_overdue', payload_hash, 'notification'"
    "  FROM esc"
    " UNION ALL"
    " SELECT 'service', 'notification', 'delivery.created', referral_id, id,"
    "  partner_id, 'ok', 'escalation', payload_hash, 'notification'"
    "  FROM copies)"
    /* per escalated delivery what came of its copy: made, or none and
     * why, read in the statement's snapshot, as copies read it */
    " SELECT esc.id, esc.referral_id, esc.partner_id, esc.escalate_to,"
    "  CASE WHEN copies.id IS NOT NULL THEN 'made' ELSE 'none' END,"
    "  CASE WHEN copies.id IS NOT NULL THEN NULL"
    "   WHEN esc.escalate_to IS NULL THEN 'no_escalation_partner'"
    "   WHEN p.revoked_at IS NOT NULL THEN 'partner_revoked'"
    "   WHEN NOT p.handles_cases THEN 'partner_not_handling_cases'"
    "   WHEN esc.escalation_payload IS NULL THEN 'payload_purged'"
    "   ELSE 'copy_exists' END"
    " FROM esc LEFT JOIN copies ON copies.escalation_of = esc.id"
    " LEFT JOIN partners p ON p.id = esc.escalate_to";

/* $1 ids, $2 partner, $3 max attempts. Sent, unacknowledged deliveries
 * that are not at their last attempt become due now; nothing else changes
 * (no state, no attempt: no audit event is due). They are locked first,
 * in the order of their ids, as an ACK batch locks its deliveries (read
 * from a bitmap of them, the UPDATE alone took them in the table's order,
 * and could deadlock with an ACK batch of the same deliveries). */
/* clang-format off */
#define S_DUE_WHERE(p)                                                         \
    S_OUT(p) " AND " p "attempts < $3 AND " p "next_attempt_at > now()"
static const char *s_due_sql =
    "WITH due AS MATERIALIZED ("
    " SELECT id FROM deliveries"
    " WHERE id = ANY ($1::uuid[]) AND partner_id = $2 AND" S_DUE_WHERE("")
    " ORDER BY id FOR UPDATE)"
    " UPDATE deliveries d SET next_attempt_at = now() FROM due"
    " WHERE d.id = due.id AND" S_DUE_WHERE("d.");
/* clang-format on */

/* $1 ids, $2 the times their sends were committed (sent_at, as the claim
 * gave it). Deliveries whose send committed at that time but never left
 * the hub (its connection went, and no other connection of the partner
 * took it in time) get its attempt back and are due now (pending again
 * when no attempt is left counted), with a delivery.unsent event each.
 * One sent again since (its sent_at is that send's), answered or dead is
 * left alone. sent_at stays: a send before an administrator's retry did
 * leave, and its late ACK still counts (S_ACK). Locked first, in the
 * order of their ids, as an ACK batch locks its deliveries (S_DUE). */
/* clang-format off */
#define S_UNSENT_WHERE(p) S_OUT(p) " AND " p "sent_at = u.sent_at"
static const char *s_unsent_sql =
    "WITH u AS (SELECT id, sent_at::timestamptz FROM"
    "  unnest($1::uuid[], $2::text[]) AS u(id, sent_at)),"
    " locked AS MATERIALIZED ("
    " SELECT d.id, u.sent_at FROM deliveries d JOIN u ON d.id = u.id"
    " WHERE" S_UNSENT_WHERE("d.") " ORDER BY d.id FOR UPDATE OF d),"
    " given AS ("
    " UPDATE deliveries d SET attempts = d.attempts - 1,"
    "  state = CASE WHEN d.attempts = 1 THEN 'pending' ELSE d.state END,"
    "  next_attempt_at = now(), updated_at = now() FROM locked u"
    " WHERE d.id = u.id AND" S_UNSENT_WHERE("d.")
    " RETURNING d.id, d.referral_id, d.partner_id, d.payload_hash)"
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    "  delivery_id, partner_id, outcome, reason_code, payload_hash,"
    "  origin_service)"
    " SELECT 'service', 'notification', 'delivery.unsent', referral_id, id,"
    "  partner_id, 'ok', 'not_sent', payload_hash, 'notification' FROM given";
/* clang-format on */

/* The prepared statements, by index. */
typedef enum {
    S_RESEND,
    S_CLAIM_PENDING,
    S_ACK,
    S_NACK,
    S_DEAD,
    S_ESCALATE,
    S_DUE,
    S_UNSENT,
    S_STATEMENTS
} s_stmt_t;

/* result_format: 1 for the claims' binary results (S_SENT_COLUMNS). */
static const struct {
    const char *name;
    const char **sql;
    int result_format;
} s_statements[S_STATEMENTS] = {
    {"resend", &s_resend_sql, 1}, {"claim_pending", &s_claim_pending_sql, 1},
    {"ack", &s_ack_sql, 0},       {"nack", &s_nack_sql, 0},
    {"dead", &s_dead_sql, 0},     {"escalate", &s_escalate_sql, 0},
    {"due", &s_due_sql, 0},       {"unsent", &s_unsent_sql, 0},
};

#endif
