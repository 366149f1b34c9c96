/*
 * The trail in PostgreSQL: scan, verify, seal, record access (see
 * trail_db.h and schemas/audit.md).
 */
#include "ketenhub/trail_db.h"

#include <inttypes.h>
#include <pthread.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ketenhub/audit.h"
#include "ketenhub/db.h"
#include "ketenhub/health.h"

/* Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01. */
#define S_PG_EPOCH_US INT64_C(946684800000000)
#define S_FETCH 10000
#define S_LOCK_KEY 7513815 /* advisory lock: one sealer at a time */

#define S_EVENT_COLUMNS                                                        \
    "seq, at, actor_kind, actor_id, action, referral_id, delivery_id,"         \
    " partner_id, outcome, reason_code, reason_path, payload_hash,"            \
    " rules_version, origin_service, origin_peer, rules_matched,"              \
    " query_filter"
#define S_EVENT_COLUMNS_E                                                      \
    "e.seq, e.at, e.actor_kind, e.actor_id, e.action, e.referral_id,"          \
    " e.delivery_id, e.partner_id, e.outcome, e.reason_code, e.reason_path,"   \
    " e.payload_hash, e.rules_version, e.origin_service, e.origin_peer,"       \
    " e.rules_matched, e.query_filter"

static int64_t s_get64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | (unsigned char) p[i];
    return (int64_t) v;
}

/* A binary timestamptz (µs since 2000-01-01) as µs since 1970-01-01.
 * Added modulo 2^64, as the canonical encoding writes it: PostgreSQL's
 * infinities (INT64_MAX, INT64_MIN), and finite times near its largest,
 * do not fit once moved to 1970, and a signed addition would overflow.
 * The addition of a constant modulo 2^64 is one to one, so two times
 * that differ still encode differently: an event whose time was set to
 * infinity is found altered. */
static int64_t s_get_time(const char *p)
{
    return (int64_t) ((uint64_t) s_get64(p) + (uint64_t) S_PG_EPOCH_US);
}

/* Row r of a binary result with S_EVENT_COLUMNS into ev (borrowed). */
static void s_event_from(const PGresult *res, int r, kh_trail_event_t *ev)
{
    ev->seq = s_get64(PQgetvalue(res, r, 0));
    ev->at_us = s_get_time(PQgetvalue(res, r, 1));
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        if (PQgetisnull(res, r, i + 2)) {
            ev->f[i].ptr = NULL;
            ev->f[i].len = -1;
        } else {
            ev->f[i].ptr = PQgetvalue(res, r, i + 2);
            ev->f[i].len = PQgetlength(res, r, i + 2);
        }
    }
}

/* The lower bound of a range of seq (after, ...] as SQL: none for
 * INT64_MIN, so that rows at or below 0 are read too (the literal of
 * INT64_MIN would be numeric and keep PostgreSQL from the index). */
static void s_lower(char *out, size_t size, const char *column, int64_t after)
{
    if (after == INT64_MIN)
        snprintf(out, size, "true");
    else
        snprintf(out, size, "%s > %" PRId64, column, after);
}

static PGresult *s_query(PGconn *conn, const char *sql, int format,
                         kh_error_t *err)
{
    PGresult *res = PQexecParams(conn, sql, 0, NULL, NULL, NULL, NULL, format);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
        kh_db_error(err, conn, res, NULL);
        PQclear(res);
        return NULL;
    }
    return res;
}

/* Merge the two cursors. */
static int s_merge(PGconn *conn, kh_trail_scan_fn *fn, void *arg,
                   kh_error_t *err)
{
    PGresult *ev = NULL, *se = NULL;
    int ei = 0, si = 0, en = 0, sn = 0, rc = 0;
    bool ev_done = false, se_done = false;
    for (;;) {
        if (!ev_done && ei == en) {
            PQclear(ev);
            ev = s_query(conn, "FETCH 10000 FROM kh_trail_ev", 1, err);
            if (!ev) {
                rc = -1;
                break;
            }
            ei = 0;
            en = PQntuples(ev);
            ev_done = en == 0;
        }
        if (!se_done && si == sn) {
            PQclear(se);
            se = s_query(conn, "FETCH 10000 FROM kh_trail_se", 1, err);
            if (!se) {
                rc = -1;
                break;
            }
            si = 0;
            sn = PQntuples(se);
            se_done = sn == 0;
        }
        if (ev_done && se_done)
            break;
        int64_t eseq = ev_done ? INT64_MAX : s_get64(PQgetvalue(ev, ei, 0));
        int64_t sseq = se_done ? INT64_MAX : s_get64(PQgetvalue(se, si, 0));
        int64_t seq = eseq < sseq ? eseq : sseq;
        kh_trail_event_t event;
        const unsigned char *seal = NULL;
        if (eseq == seq)
            s_event_from(ev, ei, &event);
        /* A seal of another length (the table forbids it) matches
         * nothing: it stands as 32 zero bytes. */
        static const unsigned char zero[KH_TRAIL_HASH_SIZE];
        if (sseq == seq)
            seal = PQgetlength(se, si, 1) == KH_TRAIL_HASH_SIZE
                       ? (const unsigned char *) PQgetvalue(se, si, 1)
                       : zero;
        rc = fn(arg, seq, eseq == seq ? &event : NULL, seal);
        if (eseq == seq)
            ei++;
        if (sseq == seq)
            si++;
        if (rc != 0)
            break;
    }
    PQclear(ev);
    PQclear(se);
    return rc;
}

int kh_trail_db_scan(PGconn *conn, int64_t after, int64_t upto,
                     kh_trail_scan_fn *fn, void *arg, kh_error_t *err)
{
    bool own = PQtransactionStatus(conn) == PQTRANS_IDLE;
    if (own &&
        kh_db_exec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                   err) != 0)
        return -1;
    char sql[512], lower[64];
    s_lower(lower, sizeof lower, "seq", after);
    /* The canonical encoding is of UTF-8 text: a session in another
     * client_encoding would get other bytes, and every event with a
     * character outside ASCII would look altered. */
    int rc = kh_db_exec(conn, "SET LOCAL client_encoding = 'UTF8'", err);
    if (rc == 0) {
        snprintf(
            sql, sizeof sql,
            "DECLARE kh_trail_ev NO SCROLL CURSOR FOR SELECT " S_EVENT_COLUMNS
            " FROM audit_trail WHERE %s AND seq <= %" PRId64 " ORDER BY seq",
            lower, upto);
        rc = kh_db_exec(conn, sql, err);
    }
    if (rc == 0) {
        snprintf(sql, sizeof sql,
                 "DECLARE kh_trail_se NO SCROLL CURSOR FOR SELECT seq, hash"
                 " FROM audit_trail_seals WHERE %s AND seq <= %" PRId64
                 " ORDER BY seq",
                 lower, upto);
        rc = kh_db_exec(conn, sql, err);
    }
    if (rc == 0)
        rc = s_merge(conn, fn, arg, err);
    if (own)
        kh_db_rollback_quietly(conn);
    else if (PQtransactionStatus(conn) == PQTRANS_INTRANS) {
        PQclear(PQexec(conn, "CLOSE kh_trail_ev"));
        PQclear(PQexec(conn, "CLOSE kh_trail_se"));
    }
    return rc;
}

int kh_trail_db_checkpoints(PGconn *conn, kh_trail_checkpoint_t **out,
                            size_t *count, kh_error_t *err)
{
    *out = NULL;
    *count = 0;
    PGresult *res = s_query(conn,
                            "SELECT seq, at, head, public_key, signature FROM"
                            " audit_trail_checkpoints ORDER BY seq",
                            1, err);
    if (!res)
        return -1;
    int n = PQntuples(res);
    kh_trail_checkpoint_t *cps = calloc((size_t) n + 1, sizeof *cps);
    if (!cps) {
        PQclear(res);
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    }
    size_t k = 0;
    for (int r = 0; r < n; r++) {
        if (PQgetlength(res, r, 2) != KH_TRAIL_HASH_SIZE ||
            PQgetlength(res, r, 3) != KH_TRAIL_PUBLIC_KEY_SIZE ||
            PQgetlength(res, r, 4) != KH_TRAIL_SIGNATURE_SIZE)
            continue; /* the table's constraints make this impossible */
        kh_trail_checkpoint_t *cp = &cps[k++];
        cp->seq = s_get64(PQgetvalue(res, r, 0));
        cp->at_us = s_get_time(PQgetvalue(res, r, 1));
        memcpy(cp->head, PQgetvalue(res, r, 2), KH_TRAIL_HASH_SIZE);
        memcpy(cp->public_key, PQgetvalue(res, r, 3), KH_TRAIL_PUBLIC_KEY_SIZE);
        memcpy(cp->signature, PQgetvalue(res, r, 4), KH_TRAIL_SIGNATURE_SIZE);
    }
    PQclear(res);
    *out = cps;
    *count = k;
    return 0;
}

static int s_feed(void *arg, int64_t seq, const kh_trail_event_t *ev,
                  const unsigned char *seal)
{
    kh_trail_verifier_feed(arg, seq, ev, seal);
    return 0;
}

/* Read one field of a binary COPY tuple at *p (end e): its bytes and
 * length (-1 NULL). Returns -1 when the tuple is cut short. */
static int s_copy_field(const char **p, const char *e, const char **val,
                        int *len)
{
    if (e - *p < 4)
        return -1;
    int32_t n = (int32_t) ((uint32_t) (unsigned char) (*p)[0] << 24 |
                           (uint32_t) (unsigned char) (*p)[1] << 16 |
                           (uint32_t) (unsigned char) (*p)[2] << 8 |
                           (uint32_t) (unsigned char) (*p)[3]);
    *p += 4;
    if (n < 0) {
        *val = NULL;
        *len = -1;
        return 0;
    }
    if (e - *p < n)
        return -1;
    *val = *p;
    *len = n;
    *p += n;
    return 0;
}

/* Parse a binary COPY row of the 17 event columns and the event's seal
 * into ev and *seal (NULL when there is none, or it is not 32 bytes). -1
 * if it is not one. */
static int s_parse_row(const char *buf, int n, bool *header,
                       kh_trail_event_t *ev, const unsigned char **seal)
{
    const char *p = buf, *e = buf + n;
    if (*header && n >= 19 && memcmp(p, "PGCOPY\n\377\r\n\0", 11) == 0) {
        uint32_t ext = (uint32_t) (unsigned char) p[15] << 24 |
                       (uint32_t) (unsigned char) p[16] << 16 |
                       (uint32_t) (unsigned char) p[17] << 8 |
                       (uint32_t) (unsigned char) p[18];
        if (ext > (uint32_t) (n - 19))
            return -1;
        p += 19 + ext;
    }
    *header = false;
    if (e - p < 2)
        return -1;
    int16_t nf = (int16_t) ((unsigned char) p[0] << 8 | (unsigned char) p[1]);
    p += 2;
    if (nf == -1)
        return 1; /* trailer */
    if (nf != 18)
        return -1;
    const char *val[18];
    int len[18];
    for (int i = 0; i < 18; i++)
        if (s_copy_field(&p, e, &val[i], &len[i]) != 0)
            return -1;
    if (len[0] != 8 || len[1] != 8)
        return -1;
    ev->seq = s_get64(val[0]);
    ev->at_us = s_get_time(val[1]);
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        ev->f[i].ptr = val[i + 2];
        ev->f[i].len = len[i + 2];
    }
    *seal =
        len[17] == KH_TRAIL_HASH_SIZE ? (const unsigned char *) val[17] : NULL;
    return 0;
}

/* The fast path of verification reads the events in one or two streams,
 * each a COPY of a range of seq in seq order on a connection of its own
 * (the second one on the first one's snapshot), so that the server's
 * reading and the hashing of two halves run side by side. A stream chains
 * its range from a known hash (the genesis, the anchor, or the signed
 * checkpoint where the previous stream ends) and compares the chain with
 * every checkpoint in it and with its expected end. */
typedef struct {
    PGconn *conn;
    const char *relation; /* audit_events, or the auditors' audit_trail */
    const char *seals;    /* audit_seals, or the auditors' audit_trail_seals */
    int64_t after, upto;  /* the range (after, upto]; after INT64_MIN: from
                           * the first row; upto 0: no bound */
    unsigned char start[KH_TRAIL_HASH_SIZE];
    const kh_trail_checkpoint_t *cps; /* the checkpoints in the range */
    size_t ncps;
    int64_t head; /* the chain must end here, with the hash end */
    unsigned char end[KH_TRAIL_HASH_SIZE];
    /* What it found. */
    kh_trail_report_t report;
    int64_t chained; /* last seq chained */
    bool doubt;
    int rc; /* 0, or -1 with err (the database failed) */
    kh_error_t err;
} s_stream_t;

/* Read and chain one stream (see s_stream_t). Each event comes with its
 * own seal, which must be the chain's hash there: a seal removed or
 * rewritten below the head leaves the events as they were, but the full
 * pass, an export and the sealer all find it, and so must this one. */
static void s_stream_run(s_stream_t *st)
{
    kh_trail_report_t *r = &st->report;
    /* The range bounds both sides of the join: the seals' index scan
     * would otherwise start at the first seal, and the stream of the
     * second half would walk the first half's seals before its own. */
    char sql[1024], events[96], seals[96];
    s_lower(events, sizeof events, "e.seq", st->after);
    s_lower(seals, sizeof seals, "s.seq", st->after);
    if (st->upto > 0) {
        size_t n = strlen(events), m = strlen(seals);
        snprintf(events + n, sizeof events - n, " AND e.seq <= %" PRId64,
                 st->upto);
        snprintf(seals + m, sizeof seals - m, " AND s.seq <= %" PRId64,
                 st->upto);
    }
    snprintf(sql, sizeof sql,
             "COPY (SELECT " S_EVENT_COLUMNS_E ", s.hash FROM %s e"
             " LEFT JOIN %s s ON s.seq = e.seq AND %s WHERE %s"
             " ORDER BY e.seq) TO STDOUT (FORMAT binary)",
             st->relation, st->seals, seals, events);
    PGresult *res = PQexec(st->conn, sql);
    if (PQresultStatus(res) != PGRES_COPY_OUT) {
        st->rc = kh_db_error(&st->err, st->conn, res, "cannot read the trail");
        PQclear(res);
        return;
    }
    PQclear(res);
    unsigned char h[KH_TRAIL_HASH_SIZE];
    memcpy(h, st->start, sizeof h);
    st->chained = st->after;
    int64_t last = st->after;
    size_t next = 0; /* the next checkpoint to reach */
    bool header = true;
    char *buf = NULL;
    int len;
    while ((len = PQgetCopyData(st->conn, &buf, 0)) > 0) {
        kh_trail_event_t ev;
        const unsigned char *seal = NULL;
        int parsed = s_parse_row(buf, len, &header, &ev, &seal);
        if (parsed == 1 || st->doubt) { /* the trailer; or only draining */
            PQfreemem(buf);
            continue;
        }
        /* The sequence hands out 1 and up: a row at or below 0 was put
         * there by hand. */
        if (parsed != 0 || ev.seq <= last || ev.seq <= 0) {
            st->doubt = true;
            PQfreemem(buf);
            continue;
        }
        last = ev.seq;
        r->events++;
        if (!r->first_seq)
            r->first_seq = ev.seq;
        r->last_seq = ev.seq;
        if (ev.seq > st->head) {
            r->unsealed++;
            if (seal) /* a seal above the sealed head: impossible */
                st->doubt = true;
            PQfreemem(buf);
            continue;
        }
        /* A checkpoint below this seq names an event that is gone. */
        if (next < st->ncps && st->cps[next].seq < ev.seq)
            st->doubt = true;
        unsigned char chained[KH_TRAIL_HASH_SIZE];
        if (kh_trail_chain(h, &ev, chained) != 0 || !seal ||
            sodium_memcmp(chained, seal, sizeof chained) != 0)
            st->doubt = true;
        PQfreemem(buf);
        memcpy(h, chained, sizeof h);
        st->chained = ev.seq;
        r->sealed++;
        if (next < st->ncps && st->cps[next].seq == ev.seq) {
            if (sodium_memcmp(h, st->cps[next].head, sizeof h) != 0)
                st->doubt = true;
            next++;
            r->checkpoints++;
            r->signed_seq = ev.seq;
        }
        if (ev.seq == st->head && sodium_memcmp(h, st->end, sizeof h) != 0)
            st->doubt = true;
    }
    res = PQgetResult(st->conn);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        st->rc = kh_db_error(&st->err, st->conn, res, "cannot read the trail");
    PQclear(res);
    while ((res = PQgetResult(st->conn)) != NULL)
        PQclear(res);
    /* The chain must end exactly at the head, past every checkpoint. */
    if (next < st->ncps ||
        (st->head > (st->after > 0 ? st->after : 0) && st->chained != st->head))
        st->doubt = true;
}

static void *s_stream_thread(void *arg)
{
    s_stream_run(arg);
    return NULL;
}

/* A second connection like conn (same server, user, database, password
 * and settings) in conn's snapshot, ready for a stream; NULL when it
 * cannot be had (the caller reads with one stream). */
static PGconn *s_stream_conn(PGconn *conn)
{
    PGresult *res = PQexec(conn, "SELECT pg_export_snapshot()");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        PQclear(res);
        return NULL;
    }
    char *snapshot = PQescapeLiteral(conn, PQgetvalue(res, 0, 0),
                                     (size_t) PQgetlength(res, 0, 0));
    PQclear(res);
    PQconninfoOption *opts = PQconninfo(conn);
    size_t n = 0;
    for (PQconninfoOption *o = opts; o && o->keyword; o++)
        n++;
    const char **keys = calloc(n + 1, sizeof *keys);
    const char **vals = calloc(n + 1, sizeof *vals);
    PGconn *second = NULL;
    if (snapshot && keys && vals) {
        size_t k = 0;
        for (PQconninfoOption *o = opts; o && o->keyword; o++)
            if (o->val && *o->val) {
                keys[k] = o->keyword;
                vals[k++] = o->val;
            }
        second = PQconnectdbParams(keys, vals, 0);
    }
    free(keys);
    free(vals);
    PQconninfoFree(opts);
    char sql[256];
    snprintf(sql, sizeof sql,
             "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
             " SET TRANSACTION SNAPSHOT %s; SET LOCAL enable_seqscan = off;"
             " SET LOCAL enable_bitmapscan = off;"
             " SET LOCAL client_encoding = 'UTF8'",
             snapshot ? snapshot : "''");
    PQfreemem(snapshot);
    if (!second || PQstatus(second) != CONNECTION_OK) {
        PQfinish(second);
        return NULL;
    }
    res = PQexec(second, sql);
    bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    if (!ok) {
        PQfinish(second);
        return NULL;
    }
    return second;
}

static int s_cp_seq_cmp(const void *a, const void *b)
{
    const kh_trail_checkpoint_t *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* The fast path of verification, for the usual intact trail: the events
 * in seq order (one or two streams, see s_stream_t), the chain recomputed
 * and compared with every checkpoint's signed head and with the seal of
 * the sealed head. It proves the events unchanged but cannot say where a
 * difference lies: on any doubt it returns 1 and the full pass (events
 * and seals merged) names the first problem. 0 intact (report filled),
 * 1 doubt, -1 error. */
static int s_fast_verify(PGconn *conn, const kh_trail_keys_t *keys,
                         const kh_trail_checkpoint_t *anchor,
                         const kh_trail_checkpoint_t *cps, size_t ncps,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err)
{
    memset(report, 0, sizeof *report);
    int64_t after = anchor ? anchor->seq : INT64_MIN;
    /* The database's in seq order, one a seq; the published ones among
     * them (found by seq: a trail of years holds hundreds of thousands). */
    for (size_t i = 1; i < ncps; i++)
        if (cps[i].seq <= cps[i - 1].seq)
            return 1;
    for (size_t i = 0; i < npublished; i++) {
        const kh_trail_checkpoint_t *found =
            ncps ? bsearch(&published[i], cps, ncps, sizeof *cps, s_cp_seq_cmp)
                 : NULL;
        if (!found || memcmp(found, &published[i], sizeof *found) != 0)
            return 1;
    }
    if (anchor && kh_trail_keys_signer(keys, anchor) < 0)
        return 1;
    kh_trail_checkpoint_t *mine = calloc(ncps + 1, sizeof *mine);
    if (!mine)
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    size_t n = 0;
    int64_t below = 0; /* checkpoints at or before the anchor */
    int newest = -1;   /* the keys in turn, as the full pass checks them */
    for (size_t i = 0; i < ncps; i++) {
        int signer = kh_trail_keys_signer(keys, &cps[i]);
        if (signer < 0 || signer < newest) {
            free(mine);
            return 1;
        }
        newest = signer;
        if (cps[i].seq > after)
            mine[n++] = cps[i];
        else
            below++;
    }
    qsort(mine, n, sizeof *mine, s_cp_seq_cmp);
    s_stream_t st[2] = {{.conn = conn, .after = after, .cps = mine, .ncps = n}};
    if (anchor)
        memcpy(st[0].start, anchor->head, KH_TRAIL_HASH_SIZE);
    PGresult *res = s_query(conn,
                            "SELECT seq, hash FROM audit_trail_seals ORDER BY"
                            " seq DESC LIMIT 1",
                            1, err);
    if (!res) {
        free(mine);
        return -1;
    }
    if (PQntuples(res) == 1 && PQgetlength(res, 0, 1) == KH_TRAIL_HASH_SIZE) {
        st[0].head = s_get64(PQgetvalue(res, 0, 0));
        memcpy(st[0].end, PQgetvalue(res, 0, 1), KH_TRAIL_HASH_SIZE);
    }
    PQclear(res);
    int64_t head = st[0].head;
    /* The table when this role may read it (the audit role, superusers),
     * else the auditors' view; in seq order from the primary key. */
    res = kh_db_exec(conn,
                     "SET LOCAL enable_seqscan = off;"
                     " SET LOCAL enable_bitmapscan = off;"
                     " SET LOCAL client_encoding = 'UTF8'",
                     err) == 0
              ? s_query(conn,
                        "SELECT has_table_privilege('audit_events', 'SELECT')",
                        0, err)
              : NULL;
    if (!res) {
        free(mine);
        return -1;
    }
    bool table = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    st[0].relation = table ? "audit_events" : "audit_trail";
    st[0].seals = table ? "audit_seals" : "audit_trail_seals";
    /* Two streams when there is a checkpoint to split at: the first ends
     * at the middle checkpoint, the second starts from its signed head. */
    PGconn *second = n >= 2 ? s_stream_conn(conn) : NULL;
    int streams = second ? 2 : 1;
    pthread_t thread;
    bool threaded = false;
    if (second) {
        size_t m = (n - 1) / 2;
        st[1] = st[0];
        st[1].conn = second;
        st[1].after = mine[m].seq;
        memcpy(st[1].start, mine[m].head, KH_TRAIL_HASH_SIZE);
        st[1].cps = mine + m + 1;
        st[1].ncps = n - m - 1;
        st[0].upto = st[0].head = mine[m].seq;
        memcpy(st[0].end, mine[m].head, KH_TRAIL_HASH_SIZE);
        st[0].ncps = m + 1;
        threaded = pthread_create(&thread, NULL, s_stream_thread, &st[1]) == 0;
    }
    s_stream_run(&st[0]);
    if (threaded)
        pthread_join(thread, NULL);
    else if (second) /* no thread: the second half after the first */
        s_stream_run(&st[1]);
    PQfinish(second);
    free(mine);
    int rc = 0;
    for (int i = 0; i < streams; i++) {
        const kh_trail_report_t *part = &st[i].report;
        if (st[i].rc && rc == 0) {
            *err = st[i].err;
            rc = -1;
        }
        if (st[i].doubt && rc == 0)
            rc = 1;
        report->events += part->events;
        report->sealed += part->sealed;
        report->unsealed += part->unsealed;
        report->checkpoints += part->checkpoints;
        if (!report->first_seq)
            report->first_seq = part->first_seq;
        if (part->last_seq)
            report->last_seq = part->last_seq;
        if (part->signed_seq)
            report->signed_seq = part->signed_seq;
    }
    report->checkpoints += below;
    if (!report->signed_seq)
        report->signed_seq = anchor ? anchor->seq : 0;
    report->streams = streams;
    /* Every seal up to the head belongs to an event that was read: one
     * left behind by its event (or added where none was) is a finding. */
    if (rc == 0) {
        char sql[256], lower[64];
        s_lower(lower, sizeof lower, "seq", after);
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM %s WHERE %s AND seq <= %" PRId64,
                 st[0].seals, lower, head);
        res = s_query(conn, sql, 0, err);
        if (!res)
            return -1;
        if (strtoll(PQgetvalue(res, 0, 0), NULL, 10) != report->sealed)
            rc = 1;
        PQclear(res);
    }
    return rc;
}

/* The full verification pass: events and seals merged in seq order and
 * judged one by one (names the first problem). */
static int s_verify_pass(PGconn *conn, const kh_trail_keys_t *keys,
                         const kh_trail_checkpoint_t *anchor,
                         const kh_trail_checkpoint_t *cps, size_t ncps,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err)
{
    int rc = 0;
    kh_trail_verifier_t *v = kh_trail_verifier_new_keys(keys, anchor);
    if (!v)
        rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < ncps; i++)
        if (kh_trail_verifier_checkpoint(v, &cps[i], false) != 0)
            rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < npublished; i++)
        if (kh_trail_verifier_checkpoint(v, &published[i], true) != 0)
            rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    if (rc == 0)
        rc = kh_trail_db_scan(conn, anchor ? anchor->seq : INT64_MIN, INT64_MAX,
                              s_feed, v, err);
    if (rc == 0)
        rc = kh_trail_verifier_finish(v, report);
    kh_trail_verifier_destroy(&v);
    return rc;
}

int kh_trail_db_verify(PGconn *conn, const unsigned char *public_key,
                       int64_t from_checkpoint,
                       const kh_trail_checkpoint_t *published,
                       size_t npublished, kh_trail_report_t *report,
                       kh_error_t *err)
{
    kh_trail_keys_t keys = {.count = 1};
    memcpy(keys.key[0], public_key, KH_TRAIL_PUBLIC_KEY_SIZE);
    return kh_trail_db_verify_keys(conn, &keys, from_checkpoint, published,
                                   npublished, report, err);
}

int kh_trail_db_verify_keys(PGconn *conn, const kh_trail_keys_t *keys,
                            int64_t from_checkpoint,
                            const kh_trail_checkpoint_t *published,
                            size_t npublished, kh_trail_report_t *report,
                            kh_error_t *err)
{
    bool own = PQtransactionStatus(conn) == PQTRANS_IDLE;
    if (own &&
        kh_db_exec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                   err) != 0)
        return -1;
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    int rc = kh_trail_db_checkpoints(conn, &cps, &ncps, err);
    const kh_trail_checkpoint_t *anchor = NULL;
    bool anchor_published = false; /* and gone from the database */
    if (rc == 0 && from_checkpoint > 0) {
        for (size_t i = 0; i < ncps; i++)
            if (cps[i].seq == from_checkpoint)
                anchor = &cps[i];
        for (size_t i = 0; !anchor && i < npublished; i++)
            if (published[i].seq == from_checkpoint) {
                anchor = &published[i];
                anchor_published = true;
            }
        if (!anchor)
            rc = kh_error_set(err, KH_E_NOT_FOUND, "from_checkpoint",
                              "no checkpoint at seq %" PRId64, from_checkpoint);
    }
    /* In a transaction of its own the fast pass comes first (the usual
     * intact trail); any doubt, and verification in the caller's
     * transaction, take the full pass, from the same snapshot. */
    if (rc == 0 && anchor_published) {
        /* The chain from a published checkpoint that the database no
         * longer holds: what follows it is judged all the same, but the
         * first finding is the checkpoint itself, missing at its seq (the
         * events read all come after it). */
        rc = s_verify_pass(conn, keys, anchor, cps, ncps, published, npublished,
                           report, err);
        /* ... unless the published one is no checkpoint of these keys (a
         * forged copy, another hub's): then that copy is at fault, and
         * nothing it anchors is to be trusted. */
        bool forged = kh_trail_keys_signer(keys, anchor) < 0;
        if (rc >= 0) {
            report->kind = forged ? KH_TRAIL_BAD_SIGNATURE : KH_TRAIL_MISSING;
            report->seq = anchor->seq;
            report->other_seq = 0;
            snprintf(report->detail, sizeof report->detail,
                     "seq %" PRId64 ": the published checkpoint at seq %" PRId64
                     ", where verification starts, %s",
                     anchor->seq, anchor->seq,
                     forged ? "is signed by none of the keys given: the "
                              "published copy is not the hub's"
                            : "is gone from the trail's checkpoints");
            rc = 1;
        }
    } else if (rc == 0 && own) {
        rc = s_fast_verify(conn, keys, anchor, cps, ncps, published, npublished,
                           report, err);
        if (rc == 1)
            rc = s_verify_pass(conn, keys, anchor, cps, ncps, published,
                               npublished, report, err);
    } else if (rc == 0)
        rc = s_verify_pass(conn, keys, anchor, cps, ncps, published, npublished,
                           report, err);
    free(cps);
    if (own)
        kh_db_rollback_quietly(conn);
    return rc;
}

int kh_trail_db_record_access(PGconn *conn, const char *action,
                              const char *actor_kind, const char *outcome,
                              const char *reason_code, const char *filter,
                              const char *origin_service, kh_error_t *err)
{
    kh_audit_origin_t origin = kh_audit_origin();
    /* The actor is the login (025); NULL: origin.peer says USER@HOST. */
    const char *params[] = {action,         actor_kind,
                            NULL,           outcome,
                            reason_code,    filter && *filter ? filter : NULL,
                            origin_service, origin.peer};
    PGresult *res = PQexecParams(
        conn, "SELECT audit_record_access($1, $2, $3, $4, $5, $6, $7, $8)", 8,
        NULL, params, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_TUPLES_OK
                 ? 0
                 : kh_db_error(err, conn, res, "cannot record the access");
    PQclear(res);
    return rc;
}

/* ------------------------------------------------------------------ */
/* Sealer */

struct kh_trail_sealer_t {
    unsigned char secret_key[KH_TRAIL_SECRET_KEY_SIZE];
    kh_trail_sealer_config_t cfg;
    bool pending;  /* a bound is waiting for its transactions */
    bool partial;  /* the final bound is sealed in part: more at once */
    int64_t bound; /* the sequence's last value when it was taken */
    char *vxids;   /* array literal of the transactions to wait for */
    bool prepared; /* and prepared ones were there (pg_prepared_xacts) */
    /* when the pending bound was taken (µs, s_mono_us) */
    int64_t pending_since;
    int64_t cp_seq;   /* last checkpoint */
    int64_t cp_at_us; /* when it was made (0: none) */
    /* The highest sealed head and checkpoint this sealer has seen or
     * written: neither ever goes down while it runs. */
    int64_t seen_head, seen_cp;
    /* The last seal this sealer wrote, or checked against its event (0:
     * none yet), and its hash: it chains on and signs only from there. */
    int64_t own_seq;
    unsigned char own_hash[KH_TRAIL_HASH_SIZE];
    long written; /* checkpoints this sealer wrote and committed */
};

kh_trail_sealer_t *kh_trail_sealer_new(const unsigned char *secret_key,
                                       const kh_trail_sealer_config_t *cfg)
{
    kh_trail_sealer_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    memcpy(self->secret_key, secret_key, KH_TRAIL_SECRET_KEY_SIZE);
    self->cfg = *cfg;
    if (self->cfg.checkpoint_every < 1)
        self->cfg.checkpoint_every = 1000;
    if (self->cfg.batch < 1)
        self->cfg.batch = S_FETCH;
    self->cp_seq = -1;
    return self;
}

void kh_trail_sealer_destroy(kh_trail_sealer_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    sodium_memzero((*self_p)->secret_key, KH_TRAIL_SECRET_KEY_SIZE);
    free((*self_p)->vxids);
    free(*self_p);
    *self_p = NULL;
}

/* µs on clock: CLOCK_REALTIME for the times a checkpoint is signed with,
 * CLOCK_MONOTONIC for waits (which a step of the wall clock must neither
 * end nor stretch). */
static int64_t s_clock_us(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t s_now_us(void)
{
    return s_clock_us(CLOCK_REALTIME);
}

static int64_t s_mono_us(void)
{
    return s_clock_us(CLOCK_MONOTONIC);
}

/* Insert a checkpoint at (seq, head), signed now. */
static int s_write_checkpoint(kh_trail_sealer_t *self, PGconn *conn,
                              int64_t seq, const unsigned char *head,
                              kh_error_t *err)
{
    kh_trail_checkpoint_t cp = {.seq = seq, .at_us = s_now_us()};
    memcpy(cp.head, head, KH_TRAIL_HASH_SIZE);
    kh_trail_checkpoint_sign(&cp, self->secret_key);
    char seq_s[24], at[28], h[2 * 32 + 3], pk[2 * 32 + 3], sig[2 * 64 + 3];
    snprintf(seq_s, sizeof seq_s, "%" PRId64, seq);
    kh_trail_format_time(cp.at_us, at);
    memcpy(h, "\\x", 2);
    kh_trail_hex(cp.head, 32, h + 2);
    memcpy(pk, "\\x", 2);
    kh_trail_hex(cp.public_key, 32, pk + 2);
    memcpy(sig, "\\x", 2);
    kh_trail_hex(cp.signature, 64, sig + 2);
    const char *params[] = {seq_s, at, h, pk, sig};
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO audit_checkpoints (seq, at, head, public_key, signature)"
        " VALUES ($1, $2, $3, $4, $5)",
        5, NULL, params, NULL, NULL, 0);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK
                 ? 0
                 : kh_db_error(err, conn, res, "cannot write a checkpoint");
    PQclear(res);
    if (rc == 0) {
        self->cp_seq = seq;
        self->cp_at_us = cp.at_us;
    }
    return rc;
}

/* The recheck of seals this sealer did not write (s_check_foreign). */
typedef struct {
    int64_t from; /* its seal must be prev (0: the trail's start) */
    unsigned char prev[KH_TRAIL_HASH_SIZE];
    int64_t last; /* the last seq checked (0: none yet) */
    kh_error_t *err;
} s_recheck_t;

static int s_recheck_one(void *arg, int64_t seq, const kh_trail_event_t *ev,
                         const unsigned char *seal)
{
    s_recheck_t *rc = arg;
    unsigned char h[KH_TRAIL_HASH_SIZE];
    const char *why = NULL;
    /* The seal it chains on from: there, and as known. */
    if (rc->from > 0 && rc->last == 0 && (seq != rc->from || !seal))
        why = "the seal it chains on from is gone";
    else if (seq == rc->from)
        memcpy(h, rc->prev, sizeof h);
    else if (!ev)
        why = "a seal without its event";
    else if (!seal)
        why = "an event without its seal";
    else if (kh_trail_chain(rc->prev, ev, h) != 0)
        why = "the event cannot be encoded";
    if (!why && (!seal || memcmp(seal, h, sizeof h) != 0))
        why = "the event does not match its seal";
    if (why) {
        kh_error_set(rc->err, KH_E_TRAIL_BROKEN, NULL,
                     "seq %" PRId64 ": %s, below the sealed head and after "
                     "what this sealer last wrote or checked (seq %" PRId64
                     "): the trail was altered; sealing stops",
                     seq, why, rc->from);
        return 1;
    }
    memcpy(rc->prev, h, sizeof h);
    rc->last = seq;
    if (seq % 10000 == 0)
        kh_health_beat(); /* a long stretch is progress, not a hang */
    return 0;
}

/* The public half of the sealer's key. */
static const unsigned char *s_own_key(const kh_trail_sealer_t *self)
{
    return self->secret_key + KH_TRAIL_SECRET_KEY_SIZE -
           KH_TRAIL_PUBLIC_KEY_SIZE;
}

/* Before it chains on from the sealed head (seq, hash) and signs, the
 * sealer checks what it did not compute itself: the seals after the last
 * one it wrote or checked (or after the last checkpoint, when that is
 * later and signed with this sealer's key: another replica's), written by
 * another replica or before it started, against their events. A seal it
 * wrote must still be as it wrote it: a head rewritten since, with the
 * events it covers, agrees with itself, and only this sealer can tell; a
 * checkpoint row added above it, whose signature nobody checks here
 * otherwise, does not hide that. cp is the last checkpoint (self->cp_seq),
 * whose head s_read_head found equal to its seal. */
static int s_check_foreign(kh_trail_sealer_t *self, PGconn *conn, int64_t seq,
                           const unsigned char *hash,
                           const kh_trail_checkpoint_t *cp, kh_error_t *err)
{
    s_recheck_t rc = {.from = 0, .last = 0, .err = err};
    const unsigned char *own_key = s_own_key(self);
    if (self->own_seq > 0 && (self->own_seq >= self->cp_seq ||
                              !kh_trail_checkpoint_valid(cp, own_key))) {
        rc.from = self->own_seq;
        memcpy(rc.prev, self->own_hash, sizeof rc.prev);
        if (seq == self->own_seq && memcmp(hash, rc.prev, sizeof rc.prev) != 0)
            return kh_error_set(err, KH_E_TRAIL_BROKEN, NULL,
                                "the seal at seq %" PRId64
                                ", which this sealer wrote, was rewritten:"
                                " sealing stops",
                                seq);
    } else if (self->cp_seq > 0) {
        rc.from = self->cp_seq;
        memcpy(rc.prev, cp->head, sizeof rc.prev);
    } else
        memset(rc.prev, 0, sizeof rc.prev);
    if (seq > rc.from) {
        /* From the seal at rc.from itself (it must be as known), unless
         * that is the start of the trail. */
        int64_t after = rc.from > 0 ? rc.from - 1 : INT64_MIN;
        int r = kh_trail_db_scan(conn, after, seq, s_recheck_one, &rc, err);
        if (r != 0)
            return -1;
        if (rc.last != seq)
            return kh_error_set(err, KH_E_TRAIL_BROKEN, NULL,
                                "the seal at seq %" PRId64
                                " was not found again: sealing stops",
                                seq);
    }
    self->own_seq = seq;
    memcpy(self->own_hash, hash, sizeof self->own_hash);
    return 0;
}

/* Whether this sealer's key may sign after the last checkpoint, cp. Keys
 * sign in turn: once another key has signed after this one, this one was
 * replaced (audit keygen --force), and verify refuses whatever it signs
 * from then on (bad_signature, "signed by key 1 after key 2 signed"), as
 * it would a replaced key that leaked. A replica that still runs with the
 * replaced key, or one started again with it, therefore seals and signs
 * nothing (KH_E_TRAIL_KEY_REPLACED) and leaves the trail to the sealers
 * with the new key. A key that never signed is a new one: it signs on
 * from the checkpoints of the keys before it. */
static int s_check_key(kh_trail_sealer_t *self, PGconn *conn,
                       const kh_trail_checkpoint_t *cp, kh_error_t *err)
{
    const unsigned char *own = s_own_key(self);
    if (memcmp(cp->public_key, own, KH_TRAIL_PUBLIC_KEY_SIZE) == 0)
        return 0;
    bool signed_before = self->written > 0;
    if (!signed_before) {
        const char *params[] = {(const char *) own};
        const int lengths[] = {KH_TRAIL_PUBLIC_KEY_SIZE}, formats[] = {1};
        PGresult *res =
            PQexecParams(conn,
                         "SELECT 1 FROM audit_checkpoints WHERE public_key = $1"
                         " LIMIT 1",
                         1, NULL, params, lengths, formats, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            kh_db_error(err, conn, res, "cannot read the checkpoints");
            PQclear(res);
            return -1;
        }
        signed_before = PQntuples(res) > 0;
        PQclear(res);
    }
    if (!signed_before)
        return 0;
    char hex[2 * KH_TRAIL_PUBLIC_KEY_SIZE + 1];
    kh_trail_hex(cp->public_key, KH_TRAIL_PUBLIC_KEY_SIZE, hex);
    return kh_error_set(err, KH_E_TRAIL_KEY_REPLACED, NULL,
                        "the checkpoint at seq %" PRId64
                        " is signed by key %.16s..., after this sealer's"
                        " key signed: its key was replaced; it seals"
                        " nothing (start it with the current key)",
                        cp->seq, hex);
}

/* The sealed head (seq 0 and zero hash when nothing is sealed) and the
 * last checkpoint, read inside the sealing transaction. The head must
 * still be where the last checkpoint signed it, or above: the sealer only
 * ever adds seals, so a head below it, or another seal at its seq, means
 * seals were removed or rewritten. Going on from there would chain the
 * later events over the gap and sign the result, so it refuses
 * (KH_E_TRAIL_BROKEN) and leaves the trail as it finds it, for verify to
 * name the problem. */
static int s_read_head(kh_trail_sealer_t *self, PGconn *conn, int64_t *seq,
                       unsigned char *hash, kh_error_t *err)
{
    PGresult *res = s_query(
        conn, "SELECT seq, hash FROM audit_seals ORDER BY seq DESC LIMIT 1", 1,
        err);
    if (!res)
        return -1;
    *seq = 0;
    memset(hash, 0, KH_TRAIL_HASH_SIZE);
    if (PQntuples(res) == 1 && PQgetlength(res, 0, 1) == KH_TRAIL_HASH_SIZE) {
        *seq = s_get64(PQgetvalue(res, 0, 0));
        memcpy(hash, PQgetvalue(res, 0, 1), KH_TRAIL_HASH_SIZE);
    }
    PQclear(res);
    res = s_query(conn,
                  "SELECT c.seq, c.at, c.head, s.hash, c.public_key,"
                  " c.signature FROM audit_checkpoints c"
                  " LEFT JOIN audit_seals s ON s.seq = c.seq"
                  " ORDER BY c.seq DESC LIMIT 1",
                  1, err);
    if (!res)
        return -1;
    self->cp_seq = 0;
    self->cp_at_us = 0;
    int rc = 0;
    kh_trail_checkpoint_t cp = {0};
    if (PQntuples(res) == 1) {
        self->cp_seq = cp.seq = s_get64(PQgetvalue(res, 0, 0));
        if (PQgetlength(res, 0, 2) == KH_TRAIL_HASH_SIZE)
            memcpy(cp.head, PQgetvalue(res, 0, 2), sizeof cp.head);
        if (PQgetlength(res, 0, 4) == KH_TRAIL_PUBLIC_KEY_SIZE)
            memcpy(cp.public_key, PQgetvalue(res, 0, 4), sizeof cp.public_key);
        if (PQgetlength(res, 0, 5) == KH_TRAIL_SIGNATURE_SIZE)
            memcpy(cp.signature, PQgetvalue(res, 0, 5), sizeof cp.signature);
        self->cp_at_us = cp.at_us = s_get_time(PQgetvalue(res, 0, 1));
        if (*seq < self->cp_seq)
            rc = kh_error_set(err, KH_E_TRAIL_BROKEN, NULL,
                              "the sealed head is at seq %" PRId64
                              ", below the last checkpoint at seq %" PRId64
                              ": seals were removed; sealing stops",
                              *seq, self->cp_seq);
        else if (PQgetisnull(res, 0, 3) ||
                 PQgetlength(res, 0, 3) != KH_TRAIL_HASH_SIZE ||
                 memcmp(PQgetvalue(res, 0, 2), PQgetvalue(res, 0, 3),
                        KH_TRAIL_HASH_SIZE) != 0)
            rc = kh_error_set(err, KH_E_TRAIL_BROKEN, NULL,
                              "the seal at seq %" PRId64
                              " is gone or differs from the head its"
                              " checkpoint signed: seals were removed or"
                              " rewritten; sealing stops",
                              self->cp_seq);
    }
    PQclear(res);
    /* The end of the trail removed whole (events, their seals and their
     * checkpoints) leaves a head that agrees with its last checkpoint:
     * only what this sealer saw before tells. Sealing on would chain the
     * next events over the gap and sign them (verify then finds it only
     * against published checkpoints). */
    if (rc == 0 && (*seq < self->seen_head || self->cp_seq < self->seen_cp))
        rc = kh_error_set(err, KH_E_TRAIL_BROKEN, NULL,
                          "the sealed head is at seq %" PRId64
                          " and the last checkpoint at seq %" PRId64
                          ", below seq %" PRId64 " and %" PRId64
                          " that this sealer saw: the end of the trail was"
                          " removed; sealing stops",
                          *seq, self->cp_seq, self->seen_head, self->seen_cp);
    /* A trail found broken is named before a replaced key. */
    if (rc == 0)
        rc = s_check_foreign(self, conn, *seq, hash, &cp, err);
    if (rc == 0 && self->cp_seq > 0)
        rc = s_check_key(self, conn, &cp, err);
    if (rc == 0) {
        self->seen_head = *seq > self->seen_head ? *seq : self->seen_head;
        self->seen_cp =
            self->cp_seq > self->seen_cp ? self->cp_seq : self->seen_cp;
    }
    return rc;
}

/* Append seals text (COPY text format) to audit_seals. */
static int s_copy_seals(PGconn *conn, const char *data, size_t len,
                        kh_error_t *err)
{
    PGresult *res = PQexec(conn, "COPY audit_seals (seq, hash) FROM STDIN");
    if (PQresultStatus(res) != PGRES_COPY_IN) {
        kh_db_error(err, conn, res, "cannot write seals");
        PQclear(res);
        return -1;
    }
    PQclear(res);
    if (PQputCopyData(conn, data, (int) len) != 1 ||
        PQputCopyEnd(conn, NULL) != 1)
        return kh_db_error(err, conn, NULL, "cannot write seals");
    res = PQgetResult(conn);
    int rc = PQresultStatus(res) == PGRES_COMMAND_OK
                 ? 0
                 : kh_db_error(err, conn, res, "cannot write seals");
    PQclear(res);
    while ((res = PQgetResult(conn)) != NULL)
        PQclear(res);
    return rc;
}

/* The most events one transaction seals (S_CHUNK_BATCHES batches): a
 * backlog of millions (the first start on a long trail, the service back
 * after days) goes in transactions of a second or so, between which the
 * service sees a stop, instead of one of minutes that a stop's SIGKILL
 * would roll back, and the next start begin again. */
#define S_CHUNK_BATCHES 5

/* Whether the sealed head (at head) is due to be signed by time: a
 * checkpoint at least every checkpoint_ms when something new was sealed
 * (compared so that no time read from the table, which may be far off,
 * takes part in a subtraction). */
static bool s_checkpoint_due(const kh_trail_sealer_t *self, int64_t head)
{
    return head > self->cp_seq && head > 0 &&
           self->cp_at_us <= s_now_us() - self->cfg.checkpoint_ms * 1000;
}

/* Seal the events up to bound in one transaction, at most
 * S_CHUNK_BATCHES batches of them; *complete says whether it reached
 * bound. Returns the count. */
static long s_seal(kh_trail_sealer_t *self, PGconn *conn, int64_t bound,
                   long *checkpoints, bool *complete, kh_error_t *err)
{
    *complete = false;
    /* The chain is over UTF-8 text, whatever the session's encoding. */
    if (kh_db_exec(conn, "BEGIN; SET LOCAL client_encoding = 'UTF8'", err) !=
        0) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    char sql[512];
    snprintf(sql, sizeof sql, "SELECT pg_try_advisory_xact_lock(%d)",
             S_LOCK_KEY);
    PGresult *res = s_query(conn, sql, 0, err);
    if (!res) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    bool locked = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (!locked) { /* another sealer is at work: its turn, not ours */
        kh_db_rollback_quietly(conn);
        *complete = true;
        return 0;
    }
    int64_t head;
    unsigned char prev[KH_TRAIL_HASH_SIZE];
    if (s_read_head(self, conn, &head, prev, err) != 0) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    long sealed = 0;
    size_t cap = (size_t) self->cfg.batch * 90 + 64;
    char *buf = malloc(cap);
    if (!buf) {
        kh_db_rollback_quietly(conn);
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    }
    int rc = 0;
    int64_t last_cp = self->cp_seq;
    int batches = 0;
    bool exhausted = false;
    while (rc == 0 && head < bound) {
        if (batches++ == S_CHUNK_BATCHES)
            break; /* the rest in the next transaction */
        /* A long trail's first seal is progress, not a hang (/livez and
         * the watchdog of the audit service). */
        kh_health_beat();
        snprintf(sql, sizeof sql,
                 "SELECT " S_EVENT_COLUMNS
                 " FROM audit_events WHERE seq > %" PRId64
                 " AND seq <= %" PRId64 " ORDER BY seq LIMIT %ld",
                 head, bound, self->cfg.batch);
        res = s_query(conn, sql, 1, err);
        if (!res) {
            rc = -1;
            break;
        }
        int n = PQntuples(res);
        size_t len = 0;
        for (int r = 0; r < n; r++) {
            kh_trail_event_t ev;
            s_event_from(res, r, &ev);
            unsigned char h[KH_TRAIL_HASH_SIZE];
            if (kh_trail_chain(prev, &ev, h) != 0) {
                rc =
                    kh_error_set(err, KH_E_INTERNAL, NULL,
                                 "event %" PRId64 " cannot be encoded", ev.seq);
                break;
            }
            memcpy(prev, h, sizeof h);
            head = ev.seq;
            len += (size_t) snprintf(buf + len, cap - len, "%" PRId64 "\t\\\\x",
                                     ev.seq);
            kh_trail_hex(h, sizeof h, buf + len);
            len += 2 * sizeof h;
            buf[len++] = '\n';
            sealed++;
            /* A checkpoint every checkpoint_every events: flush the seals
             * written so far first, so that it covers sealed events. */
            if (head - last_cp >= self->cfg.checkpoint_every) {
                if (len && (rc = s_copy_seals(conn, buf, len, err)) != 0)
                    break;
                len = 0;
                if ((rc = s_write_checkpoint(self, conn, head, h, err)) != 0)
                    break;
                last_cp = head;
                if (checkpoints)
                    (*checkpoints)++;
            }
        }
        if (rc == 0 && len)
            rc = s_copy_seals(conn, buf, len, err);
        PQclear(res);
        if (n < self->cfg.batch) {
            exhausted = true; /* nothing more up to bound */
            break;
        }
    }
    bool reached = exhausted || head >= bound;
    if (rc == 0 && s_checkpoint_due(self, head)) {
        rc = s_write_checkpoint(self, conn, head, prev, err);
        if (rc == 0 && checkpoints)
            (*checkpoints)++;
    }
    free(buf);
    if (rc == 0)
        rc = kh_db_exec(conn, "COMMIT", err);
    if (rc != 0) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    self->seen_head = head > self->seen_head ? head : self->seen_head;
    self->seen_cp = self->cp_seq > self->seen_cp ? self->cp_seq : self->seen_cp;
    self->own_seq = head;
    memcpy(self->own_hash, prev, sizeof self->own_hash);
    *complete = reached;
    return sealed;
}

/* The prepared transactions of this database (PREPARE TRANSACTION): each
 * may hold a seq not yet committed, and holds no virtualxid lock. A
 * transaction that was running when the bound was taken and prepares
 * later is one of them, and tells nothing that links it to its virtualxid:
 * while any is there, no bound is final. The hub prepares none (and
 * max_prepared_transactions is 0 by default); one an administrator leaves
 * open holds sealing back, as a long transaction does, until it is
 * committed or rolled back (COMMIT PREPARED, ROLLBACK PREPARED). */
#define S_PREPARED                                                             \
    "(SELECT count(*) FROM pg_prepared_xacts"                                  \
    " WHERE database = current_database())"

/* Whether the pending bound waits for transactions. */
static bool s_waits(const kh_trail_sealer_t *self)
{
    return self->prepared || strcmp(self->vxids, "{}") != 0;
}

/* Take a new bound: the sequence's last value, then the transactions of
 * this database that are running now (any of them may hold a value at or
 * below it that is not yet committed), and whether any is prepared. */
static int s_take_bound(kh_trail_sealer_t *self, PGconn *conn, kh_error_t *err)
{
    /* A sequence that hands each session a cache of values lets a session
     * use one below last_value long after the bound was taken: an event
     * would land below the sealed head, unsealed for good, and verify
     * would call it inserted. Sealing needs CACHE 1 (bigserial's). */
    PGresult *res = s_query(conn,
                            "SELECT CASE WHEN is_called THEN last_value ELSE 0"
                            " END, (SELECT seqcache FROM pg_sequence WHERE"
                            " seqrelid = 'audit_events_seq_seq'::regclass)"
                            " FROM audit_events_seq_seq",
                            0, err);
    if (!res)
        return -1;
    if (strcmp(PQgetvalue(res, 0, 1), "1") != 0) {
        kh_error_set(err, KH_E_CONFIG, NULL,
                     "audit_events_seq_seq caches %s values a session, so a "
                     "session may write an event below what is sealed: run "
                     "ALTER SEQUENCE audit_events_seq_seq CACHE 1",
                     PQgetvalue(res, 0, 1));
        PQclear(res);
        return -1;
    }
    self->bound = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    res = s_query(conn,
                  "SELECT (SELECT coalesce(array_agg(l.virtualxid), '{}')"
                  " FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                  " WHERE l.locktype = 'virtualxid' AND l.granted"
                  " AND a.datname = current_database()"
                  " AND l.pid <> pg_backend_pid()), " S_PREPARED,
                  0, err);
    if (!res)
        return -1;
    free(self->vxids);
    self->vxids = strdup(PQgetvalue(res, 0, 0));
    self->prepared = strcmp(PQgetvalue(res, 0, 1), "0") != 0;
    PQclear(res);
    if (!self->vxids)
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    self->pending = true;
    self->pending_since = s_mono_us();
    return 0;
}

/* Whether every transaction of the pending bound has ended, and no
 * transaction is prepared. */
static int s_bound_final(kh_trail_sealer_t *self, PGconn *conn, kh_error_t *err)
{
    if (!s_waits(self))
        return 1;
    const char *params[] = {self->vxids};
    PGresult *res = PQexecParams(conn,
                                 "SELECT (SELECT count(*) FROM pg_locks WHERE"
                                 " locktype = 'virtualxid' AND virtualxid ="
                                 " ANY($1::text[])) + " S_PREPARED,
                                 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot read running transactions");
        PQclear(res);
        return -1;
    }
    int final = strcmp(PQgetvalue(res, 0, 0), "0") == 0;
    PQclear(res);
    return final;
}

/* Sign the sealed head when it is past the last checkpoint: 1 written,
 * 0 not, -1 with err. wait: for a sealing round in progress (else one
 * that is at work, another sealer's, leaves it to that round: 0). */
static int s_checkpoint_head(kh_trail_sealer_t *self, PGconn *conn, bool wait,
                             kh_error_t *err)
{
    if (kh_db_exec(conn, "BEGIN", err) != 0)
        return -1;
    /* After a sealing round in progress (the audit service's, while an
     * administrator asks for a checkpoint): the head and the last
     * checkpoint are then read as one state. Read while a round commits,
     * the head from before it and its checkpoint from after it said that
     * seals were removed; and both could sign the same seq. */
    char sql[64];
    snprintf(sql, sizeof sql, "SELECT pg_%sadvisory_xact_lock(%d)",
             wait ? "" : "try_", S_LOCK_KEY);
    PGresult *res = s_query(conn, sql, 0, err);
    if (!res) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    bool locked = wait || strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (!locked) {
        kh_db_rollback_quietly(conn);
        return 0;
    }
    int64_t head;
    unsigned char prev[KH_TRAIL_HASH_SIZE];
    int rc = s_read_head(self, conn, &head, prev, err);
    int wrote = 0;
    if (rc == 0 && head > self->cp_seq) {
        rc = s_write_checkpoint(self, conn, head, prev, err);
        wrote = rc == 0;
    }
    if (rc == 0)
        rc = kh_db_exec(conn, "COMMIT", err);
    if (rc != 0) {
        kh_db_rollback_quietly(conn);
        return -1;
    }
    self->written += wrote;
    return wrote;
}

/* Seal up to the pending bound, which is final, and let it go. Returns
 * the events sealed, or -1 with err; *cps gets the checkpoints written,
 * counted once committed (a round that fails rolls them back). */
static long s_seal_bound(kh_trail_sealer_t *self, PGconn *conn, long *cps,
                         kh_error_t *err)
{
    long round = 0;
    bool complete = false;
    long sealed = s_seal(self, conn, self->bound, &round, &complete, err);
    if (sealed < 0) {
        self->partial = false; /* a failure waits its turn, not at once */
        return -1;
    }
    *cps += round;
    self->written += round;
    /* Sealed in part: the bound stays, final, for the next round. */
    self->pending = self->partial = !complete;
    return sealed;
}

long kh_trail_sealer_step(kh_trail_sealer_t *self, PGconn *conn,
                          long *checkpoints, kh_error_t *err)
{
    long sealed = 0, cps = 0;
    int rc = 0;
    if (self->pending) {
        /* sealed in part: final already */
        int final = self->partial ? 1 : s_bound_final(self, conn, err);
        if (final < 0 ||
            (final && (sealed = s_seal_bound(self, conn, &cps, err)) < 0))
            rc = -1;
        /* A transaction that stays open (a backup, a long export, a
         * session idle in one) holds up sealing past the bound, never the
         * signing of what is sealed: a checkpoint every checkpoint_ms all
         * the same, else what a superuser could rewrite unseen grows with
         * that transaction. */
        else if (!final && s_checkpoint_due(self, self->seen_head)) {
            int wrote = s_checkpoint_head(self, conn, false, err);
            if (wrote < 0)
                rc = -1;
            else
                cps += wrote;
        }
    }
    /* A new bound once the last one is sealed; with nothing running, it
     * is final at once. */
    if (rc == 0 && !self->pending) {
        if (s_take_bound(self, conn, err) != 0)
            rc = -1;
        else if (!s_waits(self)) {
            long more = s_seal_bound(self, conn, &cps, err);
            if (more < 0)
                rc = -1;
            else
                sealed += more;
        }
    }
    if (checkpoints)
        *checkpoints = cps;
    /* What a first round committed before a later part failed is told:
     * the failure comes again at the next step. */
    return rc && sealed == 0 && cps == 0 ? -1 : sealed;
}

long kh_trail_sealer_flush(kh_trail_sealer_t *self, PGconn *conn,
                           int timeout_ms, kh_error_t *err)
{
    self->pending = self->partial = false; /* from a bound taken now */
    long total = 0;
    int64_t deadline = s_mono_us() + (int64_t) timeout_ms * 1000;
    if (s_take_bound(self, conn, err) != 0)
        return -1;
    int64_t target = self->bound;
    for (;;) {
        long n = kh_trail_sealer_step(self, conn, NULL, err);
        if (n < 0)
            return -1;
        total += n;
        if (n > 0) /* the time is for waiting, not for sealing */
            deadline = s_mono_us() + (int64_t) timeout_ms * 1000;
        /* Done when the seals reach every event at or below target. */
        char sql[256];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM audit_events WHERE seq <= %" PRId64
                 " AND seq > (SELECT coalesce(max(seq), 0) FROM audit_seals)",
                 target);
        PGresult *res = s_query(conn, sql, 0, err);
        if (!res)
            return -1;
        bool done = strcmp(PQgetvalue(res, 0, 0), "0") == 0;
        PQclear(res);
        if (done)
            return total;
        if (s_mono_us() > deadline)
            return kh_error_set(err, KH_E_TIMEOUT, NULL,
                                "transactions still running, not sealed");
        usleep(10000);
    }
}

bool kh_trail_sealer_behind(const kh_trail_sealer_t *self)
{
    return self->pending && self->partial;
}

int64_t kh_trail_sealer_waiting_ms(const kh_trail_sealer_t *self)
{
    if (!self->pending || self->partial || !s_waits(self))
        return 0;
    return (s_mono_us() - self->pending_since) / 1000;
}

int kh_trail_sealer_checkpoint(kh_trail_sealer_t *self, PGconn *conn,
                               kh_error_t *err)
{
    return s_checkpoint_head(self, conn, true, err);
}

long kh_trail_sealer_checkpoints_written(const kh_trail_sealer_t *self)
{
    return self->written;
}
