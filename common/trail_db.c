/*
 * The trail in PostgreSQL: scan, verify, seal, record access (see
 * trail_db.h and schemas/audit.md).
 */
#include "ketenhub/trail_db.h"

#include <inttypes.h>
#include <pthread.h>
#include <pwd.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ketenhub/db.h"

/* Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01. */
#define S_PG_EPOCH_US INT64_C(946684800000000)
#define S_FETCH 10000
#define S_LOCK_KEY 7513815 /* advisory lock: one sealer at a time */

#define S_EVENT_COLUMNS                                                        \
    "seq, at, actor_kind, actor_id, action, referral_id, delivery_id,"         \
    " partner_id, outcome, reason_code, reason_path, payload_hash,"            \
    " rules_version, origin_service, origin_peer, rules_matched,"              \
    " query_filter"

static int64_t s_get64(const char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | (unsigned char) p[i];
    return (int64_t) v;
}

/* Row r of a binary result with S_EVENT_COLUMNS into ev (borrowed). */
static void s_event_from(const PGresult *res, int r, kh_trail_event_t *ev)
{
    ev->seq = s_get64(PQgetvalue(res, r, 0));
    ev->at_us = s_get64(PQgetvalue(res, r, 1)) + S_PG_EPOCH_US;
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
    char sql[512];
    snprintf(sql, sizeof sql,
             "DECLARE kh_trail_ev NO SCROLL CURSOR FOR SELECT " S_EVENT_COLUMNS
             " FROM audit_trail WHERE seq > %" PRId64 " AND seq <= %" PRId64
             " ORDER BY seq",
             after, upto);
    int rc = kh_db_exec(conn, sql, err);
    if (rc == 0) {
        snprintf(sql, sizeof sql,
                 "DECLARE kh_trail_se NO SCROLL CURSOR FOR SELECT seq, hash"
                 " FROM audit_trail_seals WHERE seq > %" PRId64
                 " AND seq <= %" PRId64 " ORDER BY seq",
                 after, upto);
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
        cp->at_us = s_get64(PQgetvalue(res, r, 1)) + S_PG_EPOCH_US;
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

/* Events of the fast path waiting to be chained: the COPY reads the
 * table in physical order, which is seq order but for rows inserted side
 * by side; a window of S_WINDOW rows puts them back in order. */
#define S_WINDOW 4096

typedef struct {
    int64_t seq;
    char *buf; /* the COPY row (PQfreemem) */
    int len;
} s_row_t;

/* A run of events chained by the worker thread: from a known hash (a
 * signed checkpoint's head, or the genesis) or on from the previous batch,
 * to an expected hash (the next checkpoint's head or the sealed head's
 * seal) or on into the next batch. */
#define S_BATCH_MAX 8192
#define S_QUEUE_MAX 32

typedef struct s_batch_t {
    bool has_start, has_end;
    unsigned char start[KH_TRAIL_HASH_SIZE], end[KH_TRAIL_HASH_SIZE];
    s_row_t *rows;
    size_t count;
    struct s_batch_t *next;
} s_batch_t;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    s_batch_t *first, *last;
    size_t queued;
    bool closing;
    bool doubt; /* a worker's verdict (under lock) */
} s_queue_t;

typedef struct {
    const kh_trail_checkpoint_t *cps; /* sorted, all with a valid signature */
    size_t ncps, next;
    int64_t head; /* the sealed head: events above it are not chained */
    unsigned char head_seal[KH_TRAIL_HASH_SIZE];
    unsigned char seg_start[KH_TRAIL_HASH_SIZE]; /* start of the next batch */
    bool seg_known;   /* seg_start holds (else: on from the last batch) */
    s_batch_t *batch; /* being filled */
    s_queue_t *queue;
    int64_t emitted; /* last seq chained or counted */
    int64_t chained; /* last seq handed to the chain */
    bool doubt;      /* something needs the full pass */
    kh_trail_report_t *report;
} s_fast_t;

/* Parse a binary COPY row of the 17 event columns into ev. -1 if it is
 * not one. */
static int s_parse_row(const char *buf, int n, bool *header,
                       kh_trail_event_t *ev)
{
    const char *p = buf, *e = buf + n;
    if (*header && n >= 19 && memcmp(p, "PGCOPY\n\377\r\n\0", 11) == 0) {
        uint32_t ext = (uint32_t) (unsigned char) p[15] << 24 |
                       (uint32_t) (unsigned char) p[16] << 16 |
                       (uint32_t) (unsigned char) p[17] << 8 |
                       (uint32_t) (unsigned char) p[18];
        p += 19 + ext;
    }
    *header = false;
    if (e - p < 2)
        return -1;
    int16_t nf = (int16_t) ((unsigned char) p[0] << 8 | (unsigned char) p[1]);
    p += 2;
    if (nf == -1)
        return 1; /* trailer */
    if (nf != 17)
        return -1;
    const char *val[17];
    int len[17];
    for (int i = 0; i < 17; i++)
        if (s_copy_field(&p, e, &val[i], &len[i]) != 0)
            return -1;
    if (len[0] != 8 || len[1] != 8)
        return -1;
    ev->seq = s_get64(val[0]);
    ev->at_us = s_get64(val[1]) + S_PG_EPOCH_US;
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        ev->f[i].ptr = val[i + 2];
        ev->f[i].len = len[i + 2];
    }
    return 0;
}

static void s_batch_free(s_batch_t *b)
{
    for (size_t i = 0; i < b->count; i++)
        PQfreemem(b->rows[i].buf);
    free(b->rows);
    free(b);
}

/* The worker: chains the batches in order, compares the ends. */
static void *s_worker(void *arg)
{
    s_queue_t *q = arg;
    unsigned char h[KH_TRAIL_HASH_SIZE] = {0};
    for (;;) {
        pthread_mutex_lock(&q->lock);
        while (!q->first && !q->closing)
            pthread_cond_wait(&q->changed, &q->lock);
        s_batch_t *b = q->first;
        if (b) {
            q->first = b->next;
            if (!q->first)
                q->last = NULL;
            q->queued--;
            pthread_cond_broadcast(&q->changed);
        }
        bool doubt = q->doubt;
        pthread_mutex_unlock(&q->lock);
        if (!b)
            return NULL;
        if (b->has_start)
            memcpy(h, b->start, sizeof h);
        for (size_t i = 0; i < b->count && !doubt; i++) {
            kh_trail_event_t ev;
            bool header = false;
            unsigned char next[KH_TRAIL_HASH_SIZE];
            if (s_parse_row(b->rows[i].buf, b->rows[i].len, &header, &ev) !=
                    0 ||
                kh_trail_chain(h, &ev, next) != 0)
                doubt = true;
            memcpy(h, next, sizeof h);
        }
        if (b->has_end && sodium_memcmp(h, b->end, sizeof h) != 0)
            doubt = true;
        s_batch_free(b);
        if (doubt) {
            pthread_mutex_lock(&q->lock);
            q->doubt = true;
            pthread_mutex_unlock(&q->lock);
        }
    }
}

/* Hand the batch being filled to the worker (end: the hash it must reach,
 * NULL: it goes on in the next batch). */
static void s_submit(s_fast_t *f, const unsigned char *end)
{
    s_batch_t *b = f->batch;
    if (!b)
        return;
    f->batch = NULL;
    if (end) {
        b->has_end = true;
        memcpy(b->end, end, KH_TRAIL_HASH_SIZE);
    }
    s_queue_t *q = f->queue;
    pthread_mutex_lock(&q->lock);
    while (q->queued >= S_QUEUE_MAX)
        pthread_cond_wait(&q->changed, &q->lock);
    if (q->last)
        q->last->next = b;
    else
        q->first = b;
    q->last = b;
    q->queued++;
    pthread_cond_broadcast(&q->changed);
    pthread_mutex_unlock(&q->lock);
}

/* Take one event in seq order (and its buffer). */
static void s_fast_emit(s_fast_t *f, s_row_t *row)
{
    kh_trail_report_t *r = f->report;
    r->events++;
    if (!r->first_seq)
        r->first_seq = row->seq;
    r->last_seq = row->seq;
    f->emitted = row->seq;
    if (row->seq > f->head || f->doubt) {
        if (row->seq > f->head)
            r->unsealed++;
        PQfreemem(row->buf);
        return;
    }
    /* A checkpoint below this seq names an event that is gone. */
    while (f->next < f->ncps && f->cps[f->next].seq < row->seq) {
        f->doubt = true;
        f->next++;
    }
    if (!f->batch) {
        f->batch = calloc(1, sizeof *f->batch);
        if (f->batch)
            f->batch->rows = malloc(S_BATCH_MAX * sizeof *f->batch->rows);
        if (!f->batch || !f->batch->rows) {
            free(f->batch);
            f->batch = NULL;
            f->doubt = true;
            PQfreemem(row->buf);
            return;
        }
        f->batch->has_start = f->seg_known;
        memcpy(f->batch->start, f->seg_start, KH_TRAIL_HASH_SIZE);
        f->seg_known = false;
    }
    f->batch->rows[f->batch->count++] = *row;
    f->chained = row->seq;
    r->sealed++;
    if (f->next < f->ncps && f->cps[f->next].seq == row->seq) {
        const kh_trail_checkpoint_t *cp = &f->cps[f->next++];
        s_submit(f, cp->head);
        memcpy(f->seg_start, cp->head, KH_TRAIL_HASH_SIZE);
        f->seg_known = true;
        r->checkpoints++;
        r->signed_seq = row->seq;
    } else if (row->seq == f->head)
        s_submit(f, f->head_seal);
    else if (f->batch->count == S_BATCH_MAX)
        s_submit(f, NULL);
}

static int s_cp_seq_cmp(const void *a, const void *b)
{
    const kh_trail_checkpoint_t *x = a, *y = b;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* The fast path of verification, for the usual intact trail: one COPY of
 * the events in physical order (no index), the chain recomputed and
 * compared with every checkpoint's signed head and with the seal of the
 * sealed head. It proves the events unchanged but cannot say where a
 * difference lies: on any doubt it returns 1 and the full pass (events
 * and seals merged) names the first problem. 0 intact (report filled),
 * 1 doubt, -1 error. */
static int s_fast_verify(PGconn *conn, const unsigned char *public_key,
                         const kh_trail_checkpoint_t *anchor,
                         const kh_trail_checkpoint_t *cps, size_t ncps,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err)
{
    memset(report, 0, sizeof *report);
    int64_t after = anchor ? anchor->seq : 0;
    /* Every checkpoint valid, the published ones among the database's. */
    for (size_t i = 0; i < npublished; i++) {
        bool found = false;
        for (size_t k = 0; k < ncps && !found; k++)
            found = memcmp(&cps[k], &published[i], sizeof *cps) == 0;
        if (!found)
            return 1;
    }
    kh_trail_checkpoint_t *mine = calloc(ncps + 1, sizeof *mine);
    if (!mine)
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    size_t n = 0;
    for (size_t i = 0; i < ncps; i++) {
        if (!kh_trail_checkpoint_valid(&cps[i], public_key)) {
            free(mine);
            return 1;
        }
        if (cps[i].seq > after)
            mine[n++] = cps[i];
        else
            report->checkpoints++;
    }
    if (anchor && !kh_trail_checkpoint_valid(anchor, public_key)) {
        free(mine);
        return 1;
    }
    qsort(mine, n, sizeof *mine, s_cp_seq_cmp);
    s_fast_t f = {.cps = mine, .ncps = n, .report = report, .seg_known = true};
    report->signed_seq = after;
    if (anchor)
        memcpy(f.seg_start, anchor->head, KH_TRAIL_HASH_SIZE);
    PGresult *res = s_query(conn,
                            "SELECT seq, hash FROM audit_trail_seals ORDER BY"
                            " seq DESC LIMIT 1",
                            1, err);
    if (!res) {
        free(mine);
        return -1;
    }
    if (PQntuples(res) == 1 && PQgetlength(res, 0, 1) == KH_TRAIL_HASH_SIZE) {
        f.head = s_get64(PQgetvalue(res, 0, 0));
        memcpy(f.head_seal, PQgetvalue(res, 0, 1), KH_TRAIL_HASH_SIZE);
    }
    PQclear(res);
    /* A whole-table COPY costs the server less than a query; the table is
     * readable by the audit role and superusers, auditors read the view. */
    res = s_query(conn, "SELECT has_table_privilege('audit_events', 'SELECT')",
                  0, err);
    bool table = res && strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    char sql[640];
    if (table && after == 0)
        snprintf(sql, sizeof sql,
                 "COPY audit_events (" S_EVENT_COLUMNS ") TO STDOUT (FORMAT"
                 " binary)");
    else if (after == 0)
        snprintf(sql, sizeof sql,
                 "COPY (SELECT " S_EVENT_COLUMNS " FROM audit_trail) TO STDOUT"
                 " (FORMAT binary)");
    else
        snprintf(sql, sizeof sql,
                 "COPY (SELECT " S_EVENT_COLUMNS " FROM audit_trail WHERE seq"
                 " > %" PRId64 ") TO STDOUT (FORMAT binary)",
                 after);
    res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_COPY_OUT) {
        kh_db_error(err, conn, res, "cannot read the trail");
        PQclear(res);
        free(mine);
        return -1;
    }
    PQclear(res);
    s_queue_t queue = {.closing = false};
    pthread_t worker;
    pthread_mutex_init(&queue.lock, NULL);
    pthread_cond_init(&queue.changed, NULL);
    f.queue = &queue;
    bool started = pthread_create(&worker, NULL, s_worker, &queue) == 0;
    s_row_t *ring = calloc(S_WINDOW, sizeof *ring);
    size_t start = 0, count = 0;
    bool header = true, bad = ring == NULL || !started;
    char *buf = NULL;
    int len;
    f.emitted = after;
    while ((len = PQgetCopyData(conn, &buf, 0)) > 0) {
        /* The first row carries the COPY header: strip it, so that every
         * row parses alike when it is chained. */
        if (header && len >= 19 && memcmp(buf, "PGCOPY\n\377\r\n\0", 11) == 0) {
            uint32_t ext = (uint32_t) (unsigned char) buf[15] << 24 |
                           (uint32_t) (unsigned char) buf[16] << 16 |
                           (uint32_t) (unsigned char) buf[17] << 8 |
                           (uint32_t) (unsigned char) buf[18];
            if (ext > (uint32_t) len - 19)
                bad = true;
            else {
                memmove(buf, buf + 19 + ext, (size_t) len - 19 - ext);
                len -= 19 + (int) ext;
            }
        }
        header = false;
        /* Only the seq now (field count, length 8, value); the rest is
         * parsed when the row is chained. */
        bool trailer = len >= 2 && buf[0] == '\377' && buf[1] == '\377';
        bool row_ok = len >= 14 && buf[0] == 0 && buf[1] == 17 && buf[2] == 0 &&
                      buf[3] == 0 && buf[4] == 0 && buf[5] == 8;
        int64_t seq = row_ok ? s_get64(buf + 6) : 0;
        if (bad || trailer || !row_ok || seq <= f.emitted) {
            /* trailer, or a row too far out of order: the full pass */
            bad = bad || (!trailer && (!row_ok || seq <= f.emitted));
            PQfreemem(buf);
            continue;
        }
        /* Insert by seq (usually at the end). */
        size_t pos = count;
        while (pos > 0 && ring[(start + pos - 1) % S_WINDOW].seq > seq) {
            ring[(start + pos) % S_WINDOW] = ring[(start + pos - 1) % S_WINDOW];
            pos--;
        }
        s_row_t row = {seq, buf, len};
        ring[(start + pos) % S_WINDOW] = row;
        count++;
        if (count == S_WINDOW) {
            s_fast_emit(&f, &ring[start]);
            start = (start + 1) % S_WINDOW;
            count--;
        }
    }
    while (count > 0) {
        if (!bad)
            s_fast_emit(&f, &ring[start]);
        else
            PQfreemem(ring[start].buf);
        start = (start + 1) % S_WINDOW;
        count--;
    }
    free(ring);
    /* Rows after the last checkpoint that never reached the sealed head
     * still go to the worker, which finds them short of it. */
    s_submit(&f, f.head_seal);
    pthread_mutex_lock(&queue.lock);
    queue.closing = true;
    pthread_cond_broadcast(&queue.changed);
    pthread_mutex_unlock(&queue.lock);
    if (started)
        pthread_join(worker, NULL);
    while (queue.first) { /* only when the worker never started */
        s_batch_t *b = queue.first;
        queue.first = b->next;
        s_batch_free(b);
    }
    pthread_cond_destroy(&queue.changed);
    pthread_mutex_destroy(&queue.lock);
    res = PQgetResult(conn);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        rc = kh_db_error(err, conn, res, "cannot read the trail");
    PQclear(res);
    while ((res = PQgetResult(conn)) != NULL)
        PQclear(res);
    if (rc == 0) {
        /* The chain must end exactly at the sealed head, with its seal,
         * and no checkpoint may lie beyond it. */
        bool ends = f.head <= after || f.chained == f.head;
        if (bad || f.doubt || queue.doubt || !ends || f.next < f.ncps)
            rc = 1;
    }
    free(mine);
    return rc;
}

/* The full verification pass: events and seals merged in seq order and
 * judged one by one (names the first problem). */
static int s_verify_pass(PGconn *conn, const unsigned char *public_key,
                         const kh_trail_checkpoint_t *anchor,
                         const kh_trail_checkpoint_t *cps, size_t ncps,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err)
{
    int rc = 0;
    kh_trail_verifier_t *v = kh_trail_verifier_new(public_key, anchor);
    if (!v)
        rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < ncps; i++)
        if (kh_trail_verifier_checkpoint(v, &cps[i], false) != 0)
            rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < npublished; i++)
        if (kh_trail_verifier_checkpoint(v, &published[i], true) != 0)
            rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    if (rc == 0)
        rc = kh_trail_db_scan(conn, anchor ? anchor->seq : 0, INT64_MAX, s_feed,
                              v, err);
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
    bool own = PQtransactionStatus(conn) == PQTRANS_IDLE;
    if (own &&
        kh_db_exec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                   err) != 0)
        return -1;
    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    int rc = kh_trail_db_checkpoints(conn, &cps, &ncps, err);
    const kh_trail_checkpoint_t *anchor = NULL;
    if (rc == 0 && from_checkpoint > 0) {
        for (size_t i = 0; i < ncps; i++)
            if (cps[i].seq == from_checkpoint)
                anchor = &cps[i];
        for (size_t i = 0; !anchor && i < npublished; i++)
            if (published[i].seq == from_checkpoint)
                anchor = &published[i];
        if (!anchor)
            rc = kh_error_set(err, KH_E_NOT_FOUND, NULL,
                              "no checkpoint at seq %" PRId64, from_checkpoint);
    }
    /* In a transaction of its own the fast pass comes first (the usual
     * intact trail); any doubt, and verification in the caller's
     * transaction, take the full pass, from the same snapshot. */
    if (rc == 0 && own) {
        rc = s_fast_verify(conn, public_key, anchor, cps, ncps, published,
                           npublished, report, err);
        if (rc == 1)
            rc = s_verify_pass(conn, public_key, anchor, cps, ncps, published,
                               npublished, report, err);
    } else if (rc == 0)
        rc = s_verify_pass(conn, public_key, anchor, cps, ncps, published,
                           npublished, report, err);
    free(cps);
    if (own)
        kh_db_rollback_quietly(conn);
    return rc;
}

/* The OS user of this process, or "uid:N". */
static void s_os_user(char *out, size_t size)
{
    struct passwd *pw = getpwuid(geteuid());
    if (pw && pw->pw_name && *pw->pw_name)
        snprintf(out, size, "%s", pw->pw_name);
    else
        snprintf(out, size, "uid:%u", (unsigned) geteuid());
}

int kh_trail_db_record_access(PGconn *conn, const char *action,
                              const char *actor_kind, const char *outcome,
                              const char *reason_code, const char *filter,
                              const char *origin_service, kh_error_t *err)
{
    char actor[64], host[128];
    s_os_user(actor, sizeof actor);
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    const char *params[] = {action,         actor_kind,
                            actor,          outcome,
                            reason_code,    filter && *filter ? filter : NULL,
                            origin_service, host};
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
    bool pending;          /* a bound is waiting for its transactions */
    int64_t bound;         /* the sequence's last value when it was taken */
    char *vxids;           /* array literal of the transactions to wait for */
    int64_t pending_since; /* when the pending bound was taken (µs) */
    int64_t cp_seq;        /* last checkpoint */
    int64_t cp_at_us;      /* when it was made (0: none) */
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

static int64_t s_now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
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

/* The sealed head (seq 0 and zero hash when nothing is sealed) and the
 * last checkpoint, read inside the sealing transaction. */
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
                  "SELECT seq, at FROM audit_checkpoints ORDER BY seq DESC"
                  " LIMIT 1",
                  1, err);
    if (!res)
        return -1;
    self->cp_seq = 0;
    self->cp_at_us = 0;
    if (PQntuples(res) == 1) {
        self->cp_seq = s_get64(PQgetvalue(res, 0, 0));
        self->cp_at_us = s_get64(PQgetvalue(res, 0, 1)) + S_PG_EPOCH_US;
    }
    PQclear(res);
    return 0;
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

/* Seal the events up to bound in one transaction. Returns the count. */
static long s_seal(kh_trail_sealer_t *self, PGconn *conn, int64_t bound,
                   long *checkpoints, kh_error_t *err)
{
    if (kh_db_exec(conn, "BEGIN", err) != 0)
        return -1;
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
    if (!locked) { /* another sealer is at work */
        kh_db_rollback_quietly(conn);
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
    while (rc == 0 && head < bound) {
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
        if (n < self->cfg.batch)
            break;
    }
    /* A checkpoint at least every checkpoint_ms when something new was
     * sealed. */
    if (rc == 0 && head > last_cp && head > 0 &&
        s_now_us() - self->cp_at_us >= self->cfg.checkpoint_ms * 1000) {
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
    return sealed;
}

/* Take a new bound: the sequence's last value, then the transactions of
 * this database that are running now (any of them may hold a value at or
 * below it that is not yet committed). */
static int s_take_bound(kh_trail_sealer_t *self, PGconn *conn, kh_error_t *err)
{
    PGresult *res = s_query(conn,
                            "SELECT CASE WHEN is_called THEN last_value ELSE 0"
                            " END FROM audit_events_seq_seq",
                            0, err);
    if (!res)
        return -1;
    self->bound = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    res = s_query(conn,
                  "SELECT coalesce(array_agg(l.virtualxid), '{}') FROM pg_locks"
                  " l JOIN pg_stat_activity a ON a.pid = l.pid"
                  " WHERE l.locktype = 'virtualxid' AND l.granted"
                  " AND a.datname = current_database()"
                  " AND l.pid <> pg_backend_pid()",
                  0, err);
    if (!res)
        return -1;
    free(self->vxids);
    self->vxids = strdup(PQgetvalue(res, 0, 0));
    PQclear(res);
    if (!self->vxids)
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    self->pending = true;
    self->pending_since = s_now_us();
    return 0;
}

/* Whether every transaction of the pending bound has ended. */
static int s_bound_final(kh_trail_sealer_t *self, PGconn *conn, kh_error_t *err)
{
    if (strcmp(self->vxids, "{}") == 0)
        return 1;
    const char *params[] = {self->vxids};
    PGresult *res = PQexecParams(conn,
                                 "SELECT count(*) FROM pg_locks WHERE locktype"
                                 " = 'virtualxid' AND virtualxid ="
                                 " ANY($1::text[])",
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

long kh_trail_sealer_step(kh_trail_sealer_t *self, PGconn *conn,
                          long *checkpoints, kh_error_t *err)
{
    long sealed = 0;
    if (checkpoints)
        *checkpoints = 0;
    if (self->pending) {
        int final = s_bound_final(self, conn, err);
        if (final < 0)
            return -1;
        if (final) {
            sealed = s_seal(self, conn, self->bound, checkpoints, err);
            if (sealed < 0)
                return -1;
            self->pending = false;
        }
    }
    if (!self->pending) {
        if (s_take_bound(self, conn, err) != 0)
            return -1;
        /* Nothing running: the bound is final at once. */
        if (strcmp(self->vxids, "{}") == 0) {
            long more = s_seal(self, conn, self->bound, checkpoints, err);
            if (more < 0)
                return -1;
            sealed += more;
            self->pending = false;
        }
    }
    return sealed;
}

long kh_trail_sealer_flush(kh_trail_sealer_t *self, PGconn *conn,
                           int timeout_ms, kh_error_t *err)
{
    self->pending = false; /* start from a bound taken now */
    long total = 0;
    int64_t deadline = s_now_us() + (int64_t) timeout_ms * 1000;
    if (s_take_bound(self, conn, err) != 0)
        return -1;
    int64_t target = self->bound;
    for (;;) {
        long n = kh_trail_sealer_step(self, conn, NULL, err);
        if (n < 0)
            return -1;
        total += n;
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
        if (s_now_us() > deadline)
            return kh_error_set(err, KH_E_TIMEOUT, NULL,
                                "transactions still running, not sealed");
        usleep(10000);
    }
}

int64_t kh_trail_sealer_waiting_ms(const kh_trail_sealer_t *self)
{
    if (!self->pending || strcmp(self->vxids, "{}") == 0)
        return 0;
    return (s_now_us() - self->pending_since) / 1000;
}

int kh_trail_sealer_checkpoint(kh_trail_sealer_t *self, PGconn *conn,
                               kh_error_t *err)
{
    if (kh_db_exec(conn, "BEGIN", err) != 0)
        return -1;
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
    return wrote;
}
