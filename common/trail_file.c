/*
 * The trail's export file: writing it from the database and verifying it
 * offline (see trail_file.h).
 */
#include "ketenhub/trail_file.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "ketenhub/db.h"
#include "ketenhub/trail_db.h"

#define S_FORMAT "ketenhub.trail.export.v1"
#define S_LINE_MAX (1024 * 1024)

/* 16 raw bytes as 8-4-4-4-12 lower-case hex. */
static void s_uuid_text(const char *raw, char out[37])
{
    char hex[33];
    kh_trail_hex((const unsigned char *) raw, 16, hex);
    snprintf(out, 37, "%.8s-%.4s-%.4s-%.4s-%.12s", hex, hex + 8, hex + 12,
             hex + 16, hex + 20);
}

static int s_uuid_raw(const char *text, char out[16])
{
    char hex[33];
    size_t k = 0;
    if (strlen(text) != 36)
        return -1;
    for (size_t i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return -1;
            continue;
        }
        hex[k++] = text[i];
    }
    hex[32] = '\0';
    return kh_trail_unhex(hex, (unsigned char *) out, 16);
}

json_t *kh_trail_event_json(const kh_trail_event_t *ev)
{
    json_t *o = json_object();
    if (!o)
        return NULL;
    char at[28];
    kh_trail_format_time(ev->at_us, at);
    json_object_set_new(o, "seq", json_integer(ev->seq));
    json_object_set_new(o, "at", json_string(at));
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        const kh_trail_bytes_t *b = &ev->f[i];
        json_t *v;
        int kind = kh_trail_field_kind((kh_trail_field_t) i);
        if (b->len < 0)
            v = json_null();
        else if (kind == 1 && b->len == 16) {
            char text[37];
            s_uuid_text(b->ptr, text);
            v = json_string(text);
        } else if (kind == 2 && b->len == 32) {
            char hex[65];
            kh_trail_hex((const unsigned char *) b->ptr, 32, hex);
            v = json_string(hex);
        } else
            v = json_stringn(b->ptr, (size_t) b->len);
        json_object_set_new(o, kh_trail_field_name((kh_trail_field_t) i), v);
    }
    return o;
}

static json_t *s_checkpoint_json(const kh_trail_checkpoint_t *cp)
{
    char at[28], head[65], pk[65], sig[129];
    kh_trail_format_time(cp->at_us, at);
    kh_trail_hex(cp->head, 32, head);
    kh_trail_hex(cp->public_key, 32, pk);
    kh_trail_hex(cp->signature, 64, sig);
    return json_pack("{s:s, s:I, s:s, s:s, s:s, s:s}", "type", "checkpoint",
                     "seq", (json_int_t) cp->seq, "at", at, "head", head,
                     "public_key", pk, "signature", sig);
}

static int s_checkpoint_from(json_t *o, kh_trail_checkpoint_t *cp)
{
    json_int_t seq = 0;
    const char *at = NULL, *head = NULL, *pk = NULL, *sig = NULL;
    if (json_unpack(o, "{s:I, s:s, s:s, s:s, s:s}", "seq", &seq, "at", &at,
                    "head", &head, "public_key", &pk, "signature", &sig) != 0)
        return -1;
    cp->seq = seq;
    if (kh_trail_parse_time(at, &cp->at_us) != 0 ||
        kh_trail_unhex(head, cp->head, 32) != 0 ||
        kh_trail_unhex(pk, cp->public_key, 32) != 0 ||
        kh_trail_unhex(sig, cp->signature, 64) != 0)
        return -1;
    return 0;
}

/* Write one JSON line; -1 on a write error. */
static int s_line(FILE *out, json_t *o)
{
    if (!o)
        return -1;
    int rc = json_dumpf(o, out, JSON_COMPACT | JSON_ENSURE_ASCII) == 0 &&
                     fputc('\n', out) != EOF
                 ? 0
                 : -1;
    json_decref(o);
    return rc;
}

typedef struct {
    FILE *out;
    long count;
    int failed;
} s_export_t;

static int s_export_row(void *arg, int64_t seq, const kh_trail_event_t *ev,
                        const unsigned char *seal)
{
    s_export_t *x = arg;
    json_t *o;
    char hex[65];
    if (seal)
        kh_trail_hex(seal, 32, hex);
    if (ev) {
        o = kh_trail_event_json(ev);
        if (o) {
            json_object_set_new(o, "type", json_string("event"));
            json_object_set_new(o, "seal",
                                seal ? json_string(hex) : json_null());
        }
        x->count++;
    } else
        o = json_pack("{s:s, s:I, s:s}", "type", "seal", "seq",
                      (json_int_t) seq, "seal", hex);
    if (s_line(x->out, o) != 0) {
        x->failed = 1;
        return 1;
    }
    return 0;
}

int kh_trail_export(PGconn *conn, FILE *out, int64_t from, int64_t to,
                    bool events, long *count, kh_error_t *err)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t n = 0;
    *count = 0;
    bool own = PQtransactionStatus(conn) == PQTRANS_IDLE;
    if (own &&
        kh_db_exec(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                   err) != 0)
        return -1;
    int rc = kh_trail_db_checkpoints(conn, &cps, &n, err);
    if (rc != 0) {
        if (own)
            kh_db_rollback_quietly(conn);
        return -1;
    }
    /* Widen to whole checkpoint intervals. */
    const kh_trail_checkpoint_t *anchor = NULL;
    int64_t end = INT64_MAX;
    for (size_t i = 0; i < n; i++) {
        if (cps[i].seq < from)
            anchor = &cps[i];
        if (to > 0 && cps[i].seq >= to) {
            end = cps[i].seq;
            break;
        }
    }
    /* The end is a checkpoint, which verify holds the events to: events
     * past the last one are signed by none yet, and an export that said
     * it ended there would read as cut short. */
    if (to > 0 && end == INT64_MAX) {
        kh_error_set(err, KH_E_NOT_FOUND, "to",
                     "no checkpoint at or after seq %" PRId64
                     " to end the export at (the last is at seq %" PRId64 ")",
                     to, n ? cps[n - 1].seq : 0);
        free(cps);
        if (own)
            kh_db_rollback_quietly(conn);
        return -1;
    }
    /* Without an anchor, from the very first row: also one at or below seq
     * 0, put there by hand, which verify then finds. */
    int64_t start = anchor ? anchor->seq : INT64_MIN;
    json_t *header =
        json_pack("{s:s, s:I, s:I, s:o}", "format", S_FORMAT, "from",
                  (json_int_t) (anchor ? anchor->seq + 1 : 1), "to",
                  (json_int_t) (end == INT64_MAX ? 0 : end), "anchor",
                  anchor ? s_checkpoint_json(anchor) : json_null());
    rc = s_line(out, header);
    for (size_t i = 0; rc == 0 && i < n; i++)
        if (!events || (cps[i].seq >= start && cps[i].seq <= end))
            rc = s_line(out, s_checkpoint_json(&cps[i]));
    if (rc == 0 && events) {
        s_export_t x = {out, 0, 0};
        rc = kh_trail_db_scan(conn, start, end, s_export_row, &x, err);
        if (x.failed)
            rc = -1;
        *count = x.count;
        if (rc > 0)
            rc = -1;
    }
    if (rc == 0 && fflush(out) != 0)
        rc = -1;
    if (rc != 0 && err && err->code == KH_E_OK)
        kh_error_set(err, KH_E_IO, NULL, "cannot write the export: %s",
                     strerror(errno));
    free(cps);
    if (own)
        kh_db_rollback_quietly(conn);
    return rc == 0 ? 0 : -1;
}

/* Whether o holds exactly the keys in names (n of them, plus "type" when
 * typed): a key the format does not define, which no seal or signature
 * covers, would stand in a verified export unnoticed (a comment beside an
 * event, or a name); a key left out is read as no key at all. */
static bool s_exactly(json_t *o, const char *const *names, size_t n, bool typed)
{
    if (json_object_size(o) != n + (typed ? 1 : 0))
        return false;
    if (typed && !json_object_get(o, "type"))
        return false;
    for (size_t i = 0; i < n; i++)
        if (!json_object_get(o, names[i]))
            return false;
    return true;
}

static const char *const s_header_keys[] = {"format", "from", "to", "anchor"};
static const char *const s_checkpoint_keys[] = {"seq", "at", "head",
                                                "public_key", "signature"};
static const char *const s_seal_keys[] = {"seq", "seal"};

/* An event line: seq, at, the 15 fields and the seal. */
static bool s_event_keys(json_t *o)
{
    const char *names[KH_TRAIL_FIELD_COUNT + 3] = {"seq", "at", "seal"};
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++)
        names[3 + i] = kh_trail_field_name((kh_trail_field_t) i);
    return s_exactly(o, names, KH_TRAIL_FIELD_COUNT + 3, true);
}

/* Reading: one line at a time, each a JSON object. */
typedef struct {
    FILE *f;
    const char *path;
    int line;
    char *buf;
    int64_t from; /* the header's from */
} s_reader_t;

static json_t *s_next(s_reader_t *r, bool *eof, kh_error_t *err)
{
    *eof = false;
    errno = 0;
    /* Byte by byte, not fgets: a NUL byte would end fgets' string where
     * the line goes on, and one in place of a newline would drop the next
     * line (a checkpoint) unseen. */
    size_t len = 0;
    int c = 0;
    while (len < S_LINE_MAX - 1 && (c = getc_unlocked(r->f)) != EOF) {
        r->buf[len++] = (char) c;
        if (c == '\n')
            break;
    }
    /* A read error (a directory, an I/O error) is no end of file: taken
     * for one, it would cut the file short unnoticed. */
    if (ferror(r->f)) {
        kh_error_set_at(err, KH_E_IO, r->path, r->line + 1, 0,
                        "cannot read: %s", strerror(errno));
        return NULL;
    }
    if (len == 0) {
        *eof = true;
        return NULL;
    }
    r->buf[len] = '\0';
    r->line++;
    if (c != '\n' && len == S_LINE_MAX - 1 && getc_unlocked(r->f) != EOF) {
        kh_error_set_at(err, KH_E_MALFORMED, r->path, r->line, 0,
                        "line longer than %d bytes", S_LINE_MAX - 1);
        return NULL;
    }
    if (memchr(r->buf, '\0', len)) {
        kh_error_set_at(err, KH_E_MALFORMED, r->path, r->line, 0,
                        "a NUL byte in the line");
        return NULL;
    }
    json_error_t jerr;
    json_t *o = json_loads(r->buf, JSON_REJECT_DUPLICATES, &jerr);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        kh_error_set_at(err, KH_E_MALFORMED, r->path, r->line, 0,
                        "not a JSON object");
        return NULL;
    }
    return o;
}

/* Open path and check its header; *anchor (if the header has one) and
 * *to, the checkpoint the export ends at (0: it goes on to the end). */
static int s_open(s_reader_t *r, const char *path,
                  kh_trail_checkpoint_t *anchor, bool *has_anchor, int64_t *to,
                  kh_error_t *err)
{
    memset(r, 0, sizeof *r);
    r->path = path;
    r->f = fopen(path, "re");
    if (!r->f)
        return kh_error_set(err, KH_E_IO, path, "cannot open: %s",
                            strerror(errno));
    r->buf = malloc(S_LINE_MAX);
    if (!r->buf) {
        fclose(r->f);
        return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    }
    bool eof;
    json_t *h = s_next(r, &eof, err);
    const char *format =
        h ? json_string_value(json_object_get(h, "format")) : NULL;
    int rc = 0;
    if (!h && !eof && err && err->code == KH_E_IO)
        rc = -1; /* err says why: the file cannot be read */
    else if (!format || strcmp(format, S_FORMAT) != 0)
        rc = kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                             "not a ketenhub trail export");
    else if (!s_exactly(h, s_header_keys, 4, false))
        rc = kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                             "the header holds other keys than format, from,"
                             " to and anchor");
    json_t *to_o = h ? json_object_get(h, "to") : NULL;
    if (rc == 0 && (!json_is_integer(to_o) || json_integer_value(to_o) < 0))
        rc = kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                             "the header's to is no seq");
    *to = rc == 0 ? json_integer_value(to_o) : 0;
    json_t *a = h ? json_object_get(h, "anchor") : NULL;
    *has_anchor = rc == 0 && a && json_is_object(a);
    if (rc == 0 && !*has_anchor && !json_is_null(a))
        rc = kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                             "the header's anchor is neither a checkpoint "
                             "nor null");
    if (*has_anchor && (!s_exactly(a, s_checkpoint_keys, 5, true) ||
                        s_checkpoint_from(a, anchor) != 0))
        rc = kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                             "malformed anchor");
    /* from is the seq after the anchor, or 1, as export writes it; the
     * releases before wrote the first seq asked for (0 or more), whose
     * anchor was the last checkpoint below it, and their exports still
     * verify. So from is above the anchor (0 or more without one), and no
     * checkpoint of the file lies between the two (kh_trail_file_verify):
     * a file that said it starts after a checkpoint it holds the events
     * before of verified intact. */
    json_t *from_o = h ? json_object_get(h, "from") : NULL;
    /* Above the anchor, compared as it is: the seq after an anchor at
     * the largest seq a file can hold would not fit in an int64_t. */
    int64_t below = rc == 0 && *has_anchor ? anchor->seq : -1;
    if (rc == 0 &&
        (!json_is_integer(from_o) || json_integer_value(from_o) <= below))
        rc = *has_anchor ? kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                                           "the header's from is not above its "
                                           "anchor (seq %lld)",
                                           (long long) below)
                         : kh_error_set_at(err, KH_E_MALFORMED, path, 1, 0,
                                           "the header's from is no seq");
    r->from = rc == 0 ? json_integer_value(from_o) : 0;
    json_decref(h);
    if (rc != 0) {
        free(r->buf);
        fclose(r->f);
    }
    return rc;
}

static void s_close(s_reader_t *r)
{
    free(r->buf);
    fclose(r->f);
}

int kh_trail_file_checkpoints(const char *path, kh_trail_checkpoint_t **out,
                              size_t *count, kh_error_t *err)
{
    s_reader_t r;
    kh_trail_checkpoint_t anchor;
    bool has_anchor;
    int64_t to;
    *out = NULL;
    *count = 0;
    if (s_open(&r, path, &anchor, &has_anchor, &to, err) != 0)
        return -1;
    size_t cap = 0;
    int rc = 0;
    bool eof = false;
    while (rc == 0) {
        json_t *o = s_next(&r, &eof, err);
        if (!o) {
            rc = eof ? 0 : -1;
            break;
        }
        const char *type = json_string_value(json_object_get(o, "type"));
        if (type && strcmp(type, "checkpoint") == 0) {
            if (*count == cap) {
                cap = cap ? cap * 2 : 64;
                kh_trail_checkpoint_t *p = realloc(*out, cap * sizeof *p);
                if (!p)
                    rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
                else
                    *out = p;
            }
            if (rc == 0 && s_checkpoint_from(o, &(*out)[*count]) != 0)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "malformed checkpoint");
            if (rc == 0)
                (*count)++;
        }
        json_decref(o);
    }
    s_close(&r);
    if (rc != 0) {
        free(*out);
        *out = NULL;
        *count = 0;
    }
    return rc;
}

/* Fill ev from an event line; the bytes point into o and raw. */
static int s_event_from(json_t *o, kh_trail_event_t *ev, char raw[3][32])
{
    json_int_t seq;
    const char *at;
    if (json_unpack(o, "{s:I, s:s}", "seq", &seq, "at", &at) != 0)
        return -1;
    ev->seq = seq;
    if (kh_trail_parse_time(at, &ev->at_us) != 0)
        return -1;
    int slot = 0;
    for (int i = 0; i < KH_TRAIL_FIELD_COUNT; i++) {
        json_t *v =
            json_object_get(o, kh_trail_field_name((kh_trail_field_t) i));
        ev->f[i].ptr = NULL;
        ev->f[i].len = -1;
        if (!v || json_is_null(v))
            continue;
        if (!json_is_string(v))
            return -1;
        const char *text = json_string_value(v);
        int kind = kh_trail_field_kind((kh_trail_field_t) i);
        if (kind == 1) {
            if (s_uuid_raw(text, raw[slot]) != 0)
                return -1;
            ev->f[i].ptr = raw[slot++];
            ev->f[i].len = 16;
        } else if (kind == 2) {
            if (kh_trail_unhex(text, (unsigned char *) raw[slot], 32) != 0)
                return -1;
            ev->f[i].ptr = raw[slot++];
            ev->f[i].len = 32;
        } else {
            ev->f[i].ptr = text;
            ev->f[i].len = (int) json_string_length(v);
        }
    }
    return 0;
}

/* An export with to > 0 ends at the checkpoint at seq to, and it is gone
 * from the file: cut there (with its events, when the last row read, at
 * seq last, lies below it), or the events after the checkpoint before it
 * are signed by none. The export's events after its last checkpoint are
 * what anyone can rewrite; its header names that checkpoint. Found unless
 * the report names an earlier problem; returns 1. */
static int s_end_gone(kh_trail_report_t *report, int64_t to, int64_t last)
{
    kh_trail_finding_t kind = last < to ? KH_TRAIL_TRUNCATED : KH_TRAIL_MISSING;
    int64_t seq = last < to ? last + 1 : to;
    if (report->kind != KH_TRAIL_OK && report->seq <= seq)
        return 1;
    report->kind = kind;
    report->seq = seq;
    report->other_seq = kind == KH_TRAIL_TRUNCATED ? report->signed_seq : 0;
    if (kind == KH_TRAIL_TRUNCATED && report->signed_seq > 0)
        snprintf(report->detail, sizeof report->detail,
                 "seq %lld: the export ends early (after checkpoint at seq "
                 "%lld; its header names the checkpoint at seq %lld)",
                 (long long) seq, (long long) report->signed_seq,
                 (long long) to);
    else if (kind == KH_TRAIL_TRUNCATED)
        snprintf(report->detail, sizeof report->detail,
                 "seq %lld: the export ends early (before its first "
                 "checkpoint; its header names the checkpoint at seq %lld)",
                 (long long) seq, (long long) to);
    else
        snprintf(report->detail, sizeof report->detail,
                 "seq %lld: the checkpoint the export's header ends at is "
                 "gone",
                 (long long) to);
    return 1;
}

int kh_trail_file_verify(const char *path, const unsigned char *public_key,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err)
{
    kh_trail_keys_t keys = {.count = 1};
    memcpy(keys.key[0], public_key, KH_TRAIL_PUBLIC_KEY_SIZE);
    return kh_trail_file_verify_keys(path, &keys, published, npublished, report,
                                     err);
}

int kh_trail_file_verify_keys(const char *path, const kh_trail_keys_t *keys,
                              const kh_trail_checkpoint_t *published,
                              size_t npublished, kh_trail_report_t *report,
                              kh_error_t *err)
{
    /* One pass: the checkpoints come before the events (the format), so
     * the file is read once, as it streams in, and can be a pipe or a
     * FIFO, which a second pass would find empty or wait on forever. */
    s_reader_t r;
    kh_trail_checkpoint_t anchor;
    bool has_anchor, has_end = false;
    int64_t to;
    if (s_open(&r, path, &anchor, &has_anchor, &to, err) != 0)
        return -1;
    int rc = 0;
    kh_trail_verifier_t *v =
        kh_trail_verifier_new_keys(keys, has_anchor ? &anchor : NULL);
    if (!v)
        rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    /* The checkpoints published after the end of a range (to > 0) are no
     * part of it: the export of a month is verified with the checkpoints
     * published since. */
    for (size_t i = 0; rc == 0 && i < npublished; i++)
        if ((to == 0 || published[i].seq <= to) &&
            kh_trail_verifier_checkpoint(v, &published[i], true) != 0)
            rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
    /* Without an anchor an event may stand at or below seq 0: the
     * verifier finds it inserted. */
    int64_t last = has_anchor ? anchor.seq : INT64_MIN;
    bool in_events = false, eof = false, rows = false;
    size_t checkpoints = 0;
    while (rc == 0) {
        json_t *o = s_next(&r, &eof, err);
        if (!o) {
            rc = eof ? 0 : -1;
            break;
        }
        const char *type = json_string_value(json_object_get(o, "type"));
        unsigned char seal[32];
        const char *seal_hex = json_string_value(json_object_get(o, "seal"));
        bool has_seal = seal_hex && kh_trail_unhex(seal_hex, seal, 32) == 0;
        if (seal_hex && !has_seal)
            rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                 "malformed seal");
        if (rc == 0 && type && strcmp(type, "checkpoint") == 0) {
            kh_trail_checkpoint_t cp;
            if (in_events)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "a checkpoint after the events");
            else if (!s_exactly(o, s_checkpoint_keys, 5, true) ||
                     s_checkpoint_from(o, &cp) != 0)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "malformed checkpoint");
            else if (cp.seq < r.from && (!has_anchor || cp.seq > anchor.seq))
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "a checkpoint at seq %lld below the "
                                     "header's from (%lld) that is not its "
                                     "anchor",
                                     (long long) cp.seq, (long long) r.from);
            else if (kh_trail_verifier_checkpoint(v, &cp, false) != 0)
                rc = kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
            else {
                checkpoints++;
                if (cp.seq == to)
                    has_end = true;
            }
        } else if (rc == 0 && type && strcmp(type, "event") == 0) {
            kh_trail_event_t ev;
            char raw[3][32];
            in_events = true;
            if (!s_event_keys(o) || s_event_from(o, &ev, raw) != 0)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "malformed event");
            else if (to > 0 && ev.seq > to)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "the event at seq %lld lies after the "
                                     "export's end (to %lld)",
                                     (long long) ev.seq, (long long) to);
            else if (ev.seq <= last)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "the event at seq %lld follows seq %lld"
                                     " (events out of seq order)",
                                     (long long) ev.seq, (long long) last);
            else {
                last = ev.seq;
                rows = true;
                kh_trail_verifier_feed(v, ev.seq, &ev, has_seal ? seal : NULL);
            }
        } else if (rc == 0 && type && strcmp(type, "seal") == 0) {
            json_t *seq_o = json_object_get(o, "seq");
            json_int_t seq = json_integer_value(seq_o);
            in_events = true;
            if (!has_seal || !json_is_integer(seq_o) ||
                !s_exactly(o, s_seal_keys, 2, true))
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "malformed seal line");
            else if (to > 0 && seq > to)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "the seal at seq %lld lies after the "
                                     "export's end (to %lld)",
                                     (long long) seq, (long long) to);
            else if (seq <= last)
                rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                     "the seal at seq %lld follows seq %lld"
                                     " (events out of seq order)",
                                     (long long) seq, (long long) last);
            else {
                last = seq;
                rows = true;
                kh_trail_verifier_feed(v, seq, NULL, seal);
            }
        } else if (rc == 0)
            rc = kh_error_set_at(err, KH_E_MALFORMED, path, r.line, 0,
                                 "unknown line type");
        json_decref(o);
    }
    if (rc == 0)
        rc = kh_trail_verifier_finish(v, report);
    if (rc >= 0 && to > 0 && !has_end)
        rc = s_end_gone(report, to, last == INT64_MIN ? 0 : last);
    /* Checkpoints and not one event or seal: most likely the checkpoints
     * an auditor publishes (export --checkpoints-only), which are not a
     * trail and verify nothing on their own. The finding stands (a trail
     * cut to its checkpoints reads the same); the detail says what to do. */
    if (rc == 1 && !rows && checkpoints > 0 &&
        report->kind == KH_TRAIL_TRUNCATED) {
        size_t used = strlen(report->detail);
        snprintf(report->detail + used, sizeof report->detail - used,
                 "; the file holds checkpoints only: give it to --published "
                 "when verifying the database or an export");
    }
    kh_trail_verifier_destroy(&v);
    s_close(&r);
    return rc;
}
