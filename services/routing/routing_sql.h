/*
 * The routing service's prepared statements, by index: routing.c prepares
 * and runs them, and the tests EXPLAIN them as PostgreSQL plans them for
 * the service (generic plans, no seq scans).
 */
#ifndef KH_ROUTING_SQL_H_INCLUDED
#define KH_ROUTING_SQL_H_INCLUDED

/* The columns of the pass's arrays (routing.c gives their types). */
#define S_DELIVERY_COLUMNS 9
#define S_ROUTED_COLUMNS 4
#define S_UNROUTABLE_COLUMNS 3

/* Claim the oldest accepted referrals but those held back (their writes
 * failed: held_until, s_hold_sql), up to $1 of them and up to $2 bytes of
 * stored payload, the first whatever its size: the rows of those past $2
 * are locked till the pass ends, and not read, and the next pass claims
 * them. Rows another process holds are skipped, so side-by-side processes
 * never take the same referral. The result is binary (the other columns
 * text, whose binary form is their bytes): the payload comes as the
 * stored bytes, not as converted text, since bytes that are not UTF-8
 * would make the claim fail in every pass, where routing must set the
 * referral aside as unreadable; and not in bytea's hex text, twice its
 * size, decoded again in routing. The fourth column is the number
 * locked, the fifth the transaction's id (for txid_status, should the
 * answer to its COMMIT be lost with the connection). */
static const char s_claim_sql[] =
    "WITH c AS (SELECT id, accepted_at, coalesce(octet_length(payload), 0)"
    "  AS len FROM referrals WHERE state = 'accepted'"
    "  AND (held_until IS NULL OR held_until <= now())"
    "  ORDER BY accepted_at LIMIT $1 FOR UPDATE SKIP LOCKED),"
    " w AS (SELECT id, accepted_at, len, count(*) OVER () AS locked,"
    "  sum(len) OVER (ORDER BY accepted_at, id ROWS UNBOUNDED PRECEDING)"
    "  - len AS before FROM c)"
    " SELECT r.id::text, r.payload, encode(r.payload_hash, 'hex'),"
    " w.locked::text, txid_current()::text FROM w JOIN referrals r"
    " ON r.id = w.id"
    " WHERE w.before = 0 OR w.before + w.len <= $2::bigint"
    " ORDER BY w.accepted_at, w.id";

/* Hold the accepted referrals $1 back from the claims for $2 ms from now;
 * per referral, whether it was held before. */
static const char s_hold_sql[] =
    "UPDATE referrals r SET held_until = now() + $2::bigint"
    " * interval '1 millisecond'"
    " FROM (SELECT id, held_until IS NOT NULL AS again FROM referrals"
    "  WHERE id = ANY ($1::uuid[]) AND state = 'accepted' FOR UPDATE) o"
    " WHERE r.id = o.id RETURNING o.again";

/* Let the referrals $1 be claimed again at once. */
static const char s_release_sql[] =
    "UPDATE referrals SET held_until = NULL"
    " WHERE id = ANY ($1::uuid[]) AND state = 'accepted'";

/* The pass's deliveries, one row per element of the arrays (binary, of
 * the element types in s_delivery_types); $10 is the rules version. */
static const char s_deliveries_sql[] =
    "INSERT INTO deliveries (id, referral_id, partner_id, priority, payload,"
    " payload_hash, rules_version, escalate_to, escalation_payload,"
    " escalation_payload_hash)"
    " SELECT d.id, d.referral_id, d.partner_id, d.priority, d.payload, d.hash,"
    " $10, d.escalate_to, d.esc_payload, d.esc_hash"
    " FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[],"
    " $5::bytea[], $6::bytea[], $7::text[], $8::bytea[], $9::bytea[])"
    " AS d(id, referral_id, partner_id, priority, payload, hash, escalate_to,"
    " esc_payload, esc_hash)"
    " ON CONFLICT (referral_id, partner_id, escalation_of) DO NOTHING";

/* The pass's referrals are locked, in state accepted, since its claim
 * (s_claim_sql), so the two statements below reach them by key alone and
 * test no state: testing it let the planner, on statistics that knew few
 * accepted referrals, read the whole index of accepted ones (an entry of
 * every referral routed since the last vacuum) in each pass. Each UPDATE
 * returns its input rows, so that the audit events need no join of two
 * CTEs, which the planner cannot index and would loop over row by row when
 * it expects few rows (quadratic in the pass). */

/* The pass's routed referrals: new state and audit event each; $5 is the
 * rules version. */
/* clang-format off */
static const char s_routed_sql[] =
    "WITH r AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[],"
    " $4::text[]) AS r(id, reason, hash, matched)),"
    " s AS (UPDATE referrals SET state = 'routed' FROM r"
    " WHERE referrals.id = r.id RETURNING r.*)"
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    " outcome, reason_code, payload_hash, rules_version, rules_matched,"
    " origin_service)"
    " SELECT 'service', 'routing', 'referral.routed', id, 'ok', reason,"
    " decode(hash, 'hex'), $5, matched, 'routing' FROM s";

/* The pass's unreadable referrals, set aside with their audit events. */
static const char s_unroutable_sql[] =
    "WITH u AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])"
    " AS u(id, reason, hash)),"
    " s AS (UPDATE referrals SET state = 'unroutable' FROM u"
    " WHERE referrals.id = u.id RETURNING u.*)"
    " INSERT INTO audit_events (actor_kind, actor_id, action, referral_id,"
    " outcome, reason_code, payload_hash, origin_service)"
    " SELECT 'service', 'routing', 'referral.routed', id, 'failed', reason,"
    " decode(hash, 'hex'), 'routing' FROM s";
/* clang-format on */

/* A reload, loaded or refused: $5 is the rules version in force after it
 * (the new one, or the one kept), $6 the hex SHA-256 of the file it read
 * (NULL when its bytes could not be read). Returns its transaction's id,
 * for txid_status should the COMMIT's answer be lost. */
static const char s_reload_sql[] =
    "INSERT INTO audit_events (actor_kind, actor_id, action, outcome,"
    " reason_code, reason_path, rules_version, payload_hash, origin_service)"
    " VALUES ('service', 'routing', $1, $2, $3, $4, $5, decode($6, 'hex'),"
    " 'routing') RETURNING txid_current()";

/* The statements, prepared on each new connection (by their index as
 * name): a pass no longer parses and plans its statements. */
enum {
    S_CLAIM,
    S_DELIVERIES,
    S_ROUTED,
    S_UNROUTABLE,
    S_RELOAD,
    S_HOLD,
    S_RELEASE,
    S_STATEMENTS
};

static const struct {
    const char *name, *sql;
    int nparams;
} s_statements[S_STATEMENTS] = {
    [S_CLAIM] = {"claim", s_claim_sql, 2},
    [S_DELIVERIES] = {"deliveries", s_deliveries_sql, S_DELIVERY_COLUMNS + 1},
    [S_ROUTED] = {"routed", s_routed_sql, S_ROUTED_COLUMNS + 1},
    [S_UNROUTABLE] = {"unroutable", s_unroutable_sql, S_UNROUTABLE_COLUMNS},
    [S_RELOAD] = {"reload", s_reload_sql, 6},
    [S_HOLD] = {"hold", s_hold_sql, 2},
    [S_RELEASE] = {"release", s_release_sql, 1},
};

#endif
