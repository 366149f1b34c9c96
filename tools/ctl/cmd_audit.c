/*
 * ketenhubctl audit: what auditors do with the trail (schemas/audit.md).
 *   keygen   make the hub's Ed25519 audit key pair
 *   seal     seal what is final now and write a checkpoint (what the
 *            audit service does continuously)
 *   query    filtered, paged events as a table, JSON lines or CSV
 *   export   a range with its checkpoints to a file kept elsewhere
 *   verify   the chain and the signatures, in the database or a file
 * query, export and verify in the database are themselves recorded in the
 * trail (trail.queried / trail.exported / trail.verified) with the
 * auditor's database login and the filter, never the results.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <regex.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/codec.h"
#include "ketenhub/db.h"
#include "ketenhub/trail_db.h"
#include "ketenhub/trail_file.h"

static void s_usage(FILE *out)
{
    fprintf(
        out,
        "usage: ketenhubctl audit keygen --out DIR [--force]\n"
        "       ketenhubctl audit seal [--key FILE] [--checkpoint]\n"
        "       ketenhubctl audit query [--referral ID] [--delivery ID]\n"
        "                 [--partner ID] [--actor NAME] [--action ACTION]\n"
        "                 [--outcome ok|refused|failed] [--since TIME]\n"
        "                 [--until TIME] [--after SEQ] [--limit N]\n"
        "                 [--format table|json|csv]\n"
        "       ketenhubctl audit export --out FILE [--from SEQ] [--to SEQ]\n"
        "                 [--checkpoints-only]\n"
        "       ketenhubctl audit verify [--public-key FILE] [--file EXPORT]\n"
        "                 [--published FILE] [--from-checkpoint SEQ]\n"
        "       ketenhubctl audit report [--since TIME] [--until TIME]\n"
        "                 [--format table|json]\n"
        "\n"
        "keygen   writes DIR/hub-audit.key (secret, 0600, for the audit "
        "service)\n"
        "         and DIR/hub-audit.pub (for auditors); --force makes a new "
        "pair and\n"
        "         keeps the public keys it replaces in hub-audit.pub, oldest "
        "first\n"
        "seal     --key defaults to $KH_AUDIT_KEY\n"
        "query    --referral gives the referral's whole history, its "
        "deliveries'\n"
        "         events included; --after SEQ pages on (the next page's "
        "SEQ is\n"
        "         printed on stderr); --limit defaults to 100 (at most "
        "100000);\n"
        "         TIME is ISO 8601, e.g. 2026-11-28T21:00:00Z, or "
        "2026-11-28 (a time\n"
        "         without a zone is UTC, as the trail prints it); --actor "
        "takes an\n"
        "         id (jdevries: any kind) or KIND:ID as the table prints it\n"
        "         (admin:jdevries, partner:avim)\n"
        "export   widens the range to whole checkpoint intervals; "
        "--checkpoints-only\n"
        "         writes just the checkpoints, to publish elsewhere\n"
        "verify   --public-key defaults to $KH_AUDIT_PUBLIC_KEY; a file "
        "may hold\n"
        "         several keys, one a line, and --public-key may be given "
        "again:\n"
        "         the audit keys in the order they were used, oldest "
        "first\n"
        "         --file verifies an export offline (no database), also "
        "from a pipe;\n"
        "         --published adds\n"
        "         checkpoints kept outside the database; exit 0 intact, "
        "1 on a finding\n"
        "report   figures of the trail for the period: referrals, "
        "deliveries per\n"
        "         partner and their time to ACK, refusals, administration\n"
        "\n"
        "A bad option exits 2 naming it, before anything is read or "
        "recorded.\n");
}

/* Whether text matches the extended regular expression re. */
static bool s_matches(const char *text, const char *re)
{
    regex_t rx;
    if (regcomp(&rx, re, REG_EXTENDED | REG_NOSUB) != 0)
        return false;
    bool ok = regexec(&rx, text, 0, NULL, 0) == 0;
    regfree(&rx);
    return ok;
}

/* Whether id (valid UTF-8) has the 1 to 64 characters of an actor id in
 * the trail (migration 011). */
static bool s_actor_length(const char *id)
{
    size_t chars = kh_utf8_length(id, strlen(id));
    return chars >= 1 && chars <= 64;
}

static bool s_seq_arg(const char *text, int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < 0)
        return false;
    *out = v;
    return true;
}

static const char *s_env(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

/* ---- keygen ---- */

static int s_keygen(int argc, char **argv)
{
    static const struct option options[] = {
        {"out", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *out = NULL;
    bool force = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "o:fh", options, &cli)) != -1) {
        if (c == 'o')
            out = optarg;
        else if (c == 'f')
            force = true;
        else {
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (!out || optind != argc)
        return ctl_usage_error("audit keygen: --out DIR is required");
    if (ctl_out_dir_check("audit keygen", out) != CTL_OK)
        return CTL_USAGE;
    if (mkdir(out, 0700) != 0 && errno != EEXIST) {
        fprintf(stderr, "ketenhubctl: %s: cannot create directory: %s\n", out,
                strerror(errno));
        return CTL_FAIL;
    }
    char sk[4096], pk[4096];
    snprintf(sk, sizeof sk, "%s/hub-audit.key", out);
    snprintf(pk, sizeof pk, "%s/hub-audit.pub", out);
    kh_error_t err;
    kh_error_clear(&err);
    /* The keys a new pair replaces still verify every checkpoint signed
     * before it: they stay in hub-audit.pub, oldest first, so that the
     * file verifies the whole trail across the rotation. */
    kh_trail_keys_t *keys = calloc(1, sizeof *keys);
    if (!keys) {
        fprintf(stderr, "ketenhubctl: out of memory\n");
        return CTL_FAIL;
    }
    bool kept = force && access(pk, F_OK) == 0 &&
                kh_trail_load_public_keys(pk, keys, &err) == 0;
    if (force && !kept && access(pk, F_OK) == 0) {
        ctl_print_error(&err);
        fprintf(stderr,
                "ketenhubctl: %s: the public key(s) it held cannot "
                "be kept; nothing changed\n",
                pk);
        free(keys);
        return CTL_FAIL;
    }
    kh_error_clear(&err);
    if (kh_trail_keygen(sk, pk, kept ? keys : NULL, force, &err) != 0) {
        ctl_print_error(&err);
        fprintf(stderr, "ketenhubctl: %s\n",
                force ? "the key files are as they were, or hub-audit.pub "
                        "lists the new key after the ones before while the "
                        "secret key is the one before: run it again"
                      : "nothing made");
        free(keys);
        return CTL_FAIL;
    }
    size_t replaced = kept ? keys->count : 0;
    keys->count = 0;
    if (kh_trail_load_public_keys(pk, keys, &err) == 0) {
        char hex[2 * KH_TRAIL_PUBLIC_KEY_SIZE + 1];
        kh_trail_hex(keys->key[keys->count - 1], KH_TRAIL_PUBLIC_KEY_SIZE, hex);
        printf("audit public key: %s\n", hex);
    }
    if (replaced)
        printf("replaced public key(s) kept before it in %s: %zu\n", pk,
               replaced);
    free(keys);
    printf("secret key (audit service only, KH_AUDIT_KEY): %s\n", sk);
    printf("public key (for auditors, KH_AUDIT_PUBLIC_KEY): %s\n", pk);
    return CTL_OK;
}

/* ---- seal ---- */

static int s_seal(int argc, char **argv)
{
    static const struct option options[] = {
        {"key", required_argument, NULL, 'k'},
        {"checkpoint", no_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *key = s_env("KH_AUDIT_KEY");
    bool checkpoint = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "k:ch", options, &cli)) != -1) {
        if (c == 'k')
            key = optarg;
        else if (c == 'c')
            checkpoint = true;
        else {
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (!key || optind != argc)
        return ctl_usage_error("audit seal: --key FILE (or KH_AUDIT_KEY) is "
                               "required");
    kh_error_t err;
    kh_error_clear(&err);
    unsigned char sk[KH_TRAIL_SECRET_KEY_SIZE];
    if (sodium_init() < 0 || kh_trail_load_secret(key, sk, &err) != 0) {
        ctl_print_error(&err);
        return CTL_USAGE;
    }
    kh_trail_sealer_config_t cfg = {
        .checkpoint_every = 1000, .checkpoint_ms = 60000, .batch = 10000};
    kh_trail_sealer_t *sealer = kh_trail_sealer_new(sk, &cfg);
    sodium_memzero(sk, sizeof sk);
    PGconn *conn = sealer ? ctl_connect() : NULL;
    if (!conn) {
        kh_trail_sealer_destroy(&sealer);
        return CTL_FAIL;
    }
    long n = kh_trail_sealer_flush(sealer, conn, 30000, &err);
    int wrote = 0;
    /* What is sealed is signed also when the rest waits on a transaction
     * that stays open (the flush timed out): that is what the checkpoint
     * is for. */
    kh_error_t cp_err;
    kh_error_clear(&cp_err);
    if ((n >= 0 || err.code == KH_E_TIMEOUT) && checkpoint &&
        (wrote = kh_trail_sealer_checkpoint(sealer, conn, &cp_err)) < 0 &&
        n >= 0)
        err = cp_err;
    /* The round writes a checkpoint by itself too (every 1000 events, and
     * on its first seal since none was made in the last minute): say so
     * whether or not --checkpoint asked for one. */
    long cps = kh_trail_sealer_checkpoints_written(sealer);
    if (n < 0 || wrote < 0) {
        ctl_print_error(&err);
        if (wrote > 0)
            printf("what is sealed is signed: 1 checkpoint written\n");
    } else if (cps == 0)
        printf("sealed %ld events\n", n);
    else
        printf("sealed %ld events, %ld checkpoint%s written\n", n, cps,
               cps == 1 ? "" : "s");
    kh_trail_sealer_destroy(&sealer);
    PQfinish(conn);
    return n < 0 || wrote < 0 ? CTL_FAIL : CTL_OK;
}

/* ---- query ---- */

typedef enum { S_TABLE, S_JSON, S_CSV } s_format_t;

#define S_MAX_PARAMS 10

typedef struct {
    char where[2048];
    char filter[1024];
    const char *params[S_MAX_PARAMS];
    int nparams;
} s_query_t;

/* Add "column-condition with $n" and "name=value" to the filter. */
static void s_cond(s_query_t *q, const char *name, const char *value,
                   const char *cond_fmt)
{
    q->params[q->nparams++] = value;
    /* cond_fmt holds "$?" where the parameter's number goes. */
    char cond[512];
    size_t o = 0;
    for (const char *p = cond_fmt; *p && o + 8 < sizeof cond; p++) {
        if (p[0] == '$' && p[1] == '?') {
            o +=
                (size_t) snprintf(cond + o, sizeof cond - o, "$%d", q->nparams);
            p++;
        } else
            cond[o++] = *p;
    }
    cond[o] = '\0';
    size_t len = strlen(q->where);
    snprintf(q->where + len, sizeof q->where - len, "%s%s",
             len ? " AND " : " WHERE ", cond);
    len = strlen(q->filter);
    snprintf(q->filter + len, sizeof q->filter - len, "%s%s=%s", len ? " " : "",
             name, value);
}

static const char *s_columns =
    "seq, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),"
    " actor_kind, actor_id, action, referral_id, delivery_id, partner_id,"
    " outcome, reason_code, reason_path, encode(payload_hash, 'hex'),"
    " rules_version, origin_service, origin_peer, rules_matched,"
    " query_filter";

static const char *const s_names[] = {"seq",           "at",
                                      "actor_kind",    "actor_id",
                                      "action",        "referral_id",
                                      "delivery_id",   "partner_id",
                                      "outcome",       "reason_code",
                                      "reason_path",   "payload_hash",
                                      "rules_version", "origin_service",
                                      "origin_peer",   "rules_matched",
                                      "query_filter"};
#define S_NCOLS 17

static void s_csv_field(const char *v, bool null)
{
    if (null)
        return;
    if (strpbrk(v, ",\"\r\n") == NULL) {
        fputs(v, stdout);
        return;
    }
    putchar('"');
    for (; *v; v++) {
        if (*v == '"')
            putchar('"');
        putchar(*v);
    }
    putchar('"');
}

static void s_print(const PGresult *res, int rows, s_format_t format)
{
    if (format == S_CSV) {
        for (int c = 0; c < S_NCOLS; c++)
            printf("%s%s", c ? "," : "", s_names[c]);
        putchar('\n');
    } else if (format == S_TABLE)
        printf("%-8s %-27s %-30s %-19s %-36s %-20s %-8s %s\n", "SEQ", "AT",
               "ACTOR", "ACTION", "REFERRAL", "PARTNER", "OUTCOME",
               "REASON/DELIVERY/RULES");
    for (int r = 0; r < rows; r++) {
        if (format == S_JSON) {
            json_t *o = json_object();
            for (int c = 0; c < S_NCOLS; c++) {
                json_t *v;
                if (PQgetisnull(res, r, c))
                    v = json_null();
                else if (c == 0)
                    v = json_integer(strtoll(PQgetvalue(res, r, c), NULL, 10));
                else
                    v = json_string(PQgetvalue(res, r, c));
                json_object_set_new(o, s_names[c], v);
            }
            char *line = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
            if (line)
                puts(line);
            free(line);
            json_decref(o);
        } else if (format == S_CSV) {
            for (int c = 0; c < S_NCOLS; c++) {
                if (c)
                    putchar(',');
                s_csv_field(PQgetvalue(res, r, c), PQgetisnull(res, r, c));
            }
            putchar('\n');
        } else {
            char actor[80], extra[512];
            snprintf(actor, sizeof actor, "%s:%s", PQgetvalue(res, r, 2),
                     PQgetvalue(res, r, 3));
            extra[0] = '\0';
            static const int more[] = {9, 10, 6, 12, 15, 16};
            static const char *label[] = {"reason=", "path=",    "delivery=",
                                          "rules=",  "matched=", "filter="};
            for (int k = 0; k < 6; k++)
                if (!PQgetisnull(res, r, more[k])) {
                    size_t len = strlen(extra);
                    snprintf(extra + len, sizeof extra - len, "%s%s%.*s",
                             len ? " " : "", label[k], more[k] == 12 ? 12 : 200,
                             PQgetvalue(res, r, more[k]));
                }
            printf("%-8s %-27s %-30s %-19s %-36s %-20s %-8s %s\n",
                   PQgetvalue(res, r, 0), PQgetvalue(res, r, 1), actor,
                   PQgetvalue(res, r, 4),
                   PQgetisnull(res, r, 5) ? "-" : PQgetvalue(res, r, 5),
                   PQgetisnull(res, r, 7) ? "-" : PQgetvalue(res, r, 7),
                   PQgetvalue(res, r, 8), extra);
        }
    }
}

static int s_query(int argc, char **argv)
{
    static const struct option options[] = {
        {"referral", required_argument, NULL, 'r'},
        {"delivery", required_argument, NULL, 'd'},
        {"partner", required_argument, NULL, 'p'},
        {"actor", required_argument, NULL, 'a'},
        {"action", required_argument, NULL, 'A'},
        {"outcome", required_argument, NULL, 'o'},
        {"since", required_argument, NULL, 's'},
        {"until", required_argument, NULL, 'u'},
        {"after", required_argument, NULL, 'S'},
        {"limit", required_argument, NULL, 'l'},
        {"format", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    static const char *uuid_re = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{"
                                 "4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
    s_query_t q = {0};
    s_format_t format = S_TABLE;
    int64_t after = 0, limit = 100;
    char after_s[24] = "", limit_s[24], since_s[CTL_TIME_SIZE],
         until_s[CTL_TIME_SIZE];
    int64_t since = 0, until = 0;
    bool has_since = false, has_until = false;
    int c;
    /* Each option once: the filters must all hold, so a second value of
     * one (--action a --action b) could only ever select nothing. With
     * --after, that is at most S_MAX_PARAMS parameters. */
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "r:d:p:a:A:o:s:u:S:l:f:h", options,
                           &cli)) != -1) {
        switch (c) {
        case 'r':
            if (!s_matches(optarg, uuid_re))
                return ctl_usage_error("audit query: --referral takes a uuid");
            s_cond(&q, "referral", optarg,
                   "(referral_id = $?::uuid OR delivery_id = ANY (ARRAY(SELECT"
                   " id FROM audit_delivery_ids WHERE referral_id ="
                   " $?::uuid)))");
            break;
        case 'd':
            if (!s_matches(optarg, uuid_re))
                return ctl_usage_error("audit query: --delivery takes a uuid");
            s_cond(&q, "delivery", optarg, "delivery_id = $?::uuid");
            break;
        case 'p':
            if (!s_matches(optarg, "^[a-z][a-z0-9-]{1,31}$"))
                return ctl_usage_error("audit query: --partner takes a "
                                       "partner id");
            s_cond(&q, "partner", optarg,
                   "(partner_id = $? OR (actor_kind = 'partner' AND actor_id "
                   "= $?))");
            break;
        case 'a':
            /* As the trail admits actors (migration 011): 1..64
             * characters without a space or a control character, such as
             * "key:" and an unknown key's Z85 text, which holds signs like
             * + = / ? & < > { } [ ] % $ #, or a login's name outside
             * ASCII (migration 025): up to 4 bytes a character. */
            if (!kh_text_plain(optarg) ||
                !s_matches(optarg, "^[^[:space:][:cntrl:]]+$") ||
                (!s_actor_length(optarg) &&
                 !(s_matches(optarg, "^(partner|service|admin|auditor):") &&
                   s_actor_length(strchr(optarg, ':') + 1))))
                return ctl_usage_error(
                    "audit query: --actor takes an actor "
                    "id (1 to 64 characters of UTF-8, no space or "
                    "control character), "
                    "or KIND:ID as the table prints it");
            /* The table prints an actor as KIND:ID (admin:jdevries,
             * partner:avim, partner:key:...); an auditor who copies that
             * must find the actor's events, not an empty page. KIND:ID
             * selects that kind's id, and an id that is itself written
             * so (the trail admits a colon in an id) still matches. */
            if (s_matches(optarg, "^(partner|service|admin|auditor):"))
                s_cond(&q, "actor", optarg,
                       "((actor_kind = split_part($?::text, ':', 1) AND "
                       "actor_id = substr($?::text, strpos($?::text, ':') + "
                       "1)) OR actor_id = $?)");
            else
                s_cond(&q, "actor", optarg, "actor_id = $?");
            break;
        case 'A':
            if (!kh_trail_action_known(optarg))
                return ctl_usage_error("audit query: unknown action '%s'",
                                       optarg);
            s_cond(&q, "action", optarg, "action = $?");
            break;
        case 'o':
            if (strcmp(optarg, "ok") && strcmp(optarg, "refused") &&
                strcmp(optarg, "failed"))
                return ctl_usage_error("audit query: --outcome is ok, "
                                       "refused or failed");
            s_cond(&q, "outcome", optarg, "outcome = $?");
            break;
        case 's':
        case 'u': {
            /* Passed on as UTC in the trail's own form (and recorded so,
             * the period the auditor asked for without doubt). */
            const char *option =
                c == 's' ? "audit query: --since" : "audit query: --until";
            char *text = c == 's' ? since_s : until_s;
            if (ctl_time_arg(option, optarg, c == 's' ? &since : &until,
                             text) != CTL_OK)
                return CTL_USAGE;
            *(c == 's' ? &has_since : &has_until) = true;
            s_cond(&q, c == 's' ? "since" : "until", text,
                   c == 's' ? "at >= $?::timestamptz" : "at < $?::timestamptz");
            break;
        }
        case 'S':
            if (!s_seq_arg(optarg, &after))
                return ctl_usage_error("audit query: --after takes a seq");
            break;
        case 'l':
            if (!s_seq_arg(optarg, &limit) || limit < 1 || limit > 100000)
                return ctl_usage_error("audit query: --limit is 1..100000");
            break;
        case 'f':
            if (strcmp(optarg, "table") == 0)
                format = S_TABLE;
            else if (strcmp(optarg, "json") == 0)
                format = S_JSON;
            else if (strcmp(optarg, "csv") == 0)
                format = S_CSV;
            else
                return ctl_usage_error("audit query: --format is table, json "
                                       "or csv");
            break;
        default:
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("audit query: unexpected argument '%s'",
                               argv[optind]);
    if (has_since && has_until && until <= since)
        return ctl_usage_error("audit query: --until %s is not later than "
                               "--since %s",
                               until_s, since_s);
    if (after > 0) {
        snprintf(after_s, sizeof after_s, "%" PRId64, after);
        s_cond(&q, "after", after_s, "seq > $?::bigint");
    }
    snprintf(limit_s, sizeof limit_s, "%" PRId64, limit);
    size_t flen = strlen(q.filter);
    snprintf(q.filter + flen, sizeof q.filter - flen, "%slimit=%s",
             flen ? " " : "", limit_s);

    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    char sql[4096];
    snprintf(sql, sizeof sql,
             "SELECT %s FROM audit_trail%s ORDER BY seq LIMIT %" PRId64,
             s_columns, q.where, limit + 1);
    int rc = kh_db_exec(conn, "BEGIN", &err);
    if (rc == 0)
        rc = kh_trail_db_record_access(conn, "trail.queried", "auditor", "ok",
                                       NULL, q.filter, "ketenhubctl", &err);
    PGresult *res = NULL;
    if (rc == 0) {
        res = PQexecParams(conn, sql, q.nparams, NULL, q.params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            rc = kh_db_error(&err, conn, res, "cannot read the trail");
    }
    if (rc == 0)
        rc = kh_db_exec(conn, "COMMIT", &err);
    if (rc != 0) {
        kh_db_rollback_quietly(conn);
        ctl_print_error(&err);
    } else {
        int rows = PQntuples(res);
        bool more = rows > limit;
        if (more)
            rows = (int) limit;
        s_print(res, rows, format);
        if (more)
            fprintf(stderr, "more: --after %s\n", PQgetvalue(res, rows - 1, 0));
    }
    PQclear(res);
    PQfinish(conn);
    return rc == 0 ? CTL_OK : CTL_FAIL;
}

/* ---- export ---- */

/* The file an export is written to before it has its name: a file
 * without a name (O_TMPFILE) in out's directory, which nothing leaves
 * behind when the export is cut short (killed, a full disk, a crash), or
 * on a file system without those, out.partial-XXXXXX beside it (tmp,
 * else ""). Its mode is that of a new file. The descriptor, or -1 with
 * errno. */
static int s_unnamed(const char *out, char tmp[PATH_MAX])
{
    tmp[0] = '\0';
    char dir[PATH_MAX];
    if ((size_t) snprintf(dir, sizeof dir, "%s", out) >= sizeof dir) {
        errno = ENAMETOOLONG;
        return -1;
    }
    /* linked by its /proc name, which needs no privilege */
    int fd = access("/proc/self/fd", X_OK) == 0
                 ? open(dirname(dir), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666)
                 : -1;
    if (fd >= 0 || (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL &&
                    errno != ENOENT))
        return fd;
    if ((size_t) snprintf(tmp, PATH_MAX, "%s.partial-XXXXXX", out) >=
        PATH_MAX) {
        errno = ENAMETOOLONG;
        return -1;
    }
    fd = mkstemp(tmp);
    if (fd < 0)
        return -1;
    /* The mode a new file gets (mkstemp makes it 0600). */
    mode_t mask = umask(0);
    umask(mask);
    fchmod(fd, 0666 & ~mask);
    return fd;
}

/* Give the finished export (fd, and tmp unless it has no name) its name
 * out, never over a file that took that name meanwhile. 0, or -1 with
 * errno. */
static int s_publish(int fd, const char *tmp, const char *out)
{
    if (!*tmp) {
        char self[64];
        snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
        return linkat(AT_FDCWD, self, AT_FDCWD, out, AT_SYMLINK_FOLLOW);
    }
    if (link(tmp, out) == 0) {
        unlink(tmp); /* left behind at worst: out is whole */
        return 0;
    }
    if (errno == EEXIST)
        return -1;
    /* A file system without hard links: renamed, the name having been
     * free when the export began. */
    return rename(tmp, out);
}

/* The seq of the last checkpoint (0: none) into *last: 0, or -1 said. */
static int s_last_checkpoint(PGconn *conn, int64_t *last)
{
    kh_trail_checkpoint_t *cps = NULL;
    size_t n = 0;
    kh_error_t err;
    kh_error_clear(&err);
    if (kh_trail_db_checkpoints(conn, &cps, &n, &err) != 0) {
        ctl_print_error(&err);
        return -1;
    }
    *last = n ? cps[n - 1].seq : 0;
    free(cps);
    return 0;
}

static int s_export(int argc, char **argv)
{
    static const struct option options[] = {
        {"out", required_argument, NULL, 'o'},
        {"from", required_argument, NULL, 'f'},
        {"to", required_argument, NULL, 't'},
        {"checkpoints-only", no_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *out = NULL;
    int64_t from = 1, to = 0;
    bool events = true;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "o:f:t:ch", options, &cli)) != -1) {
        if (c == 'o')
            out = optarg;
        else if (c == 'f' && s_seq_arg(optarg, &from))
            continue;
        else if (c == 't' && s_seq_arg(optarg, &to))
            continue;
        else if (c == 'c')
            events = false;
        else if (c == 'f' || c == 't')
            return ctl_usage_error("audit export: --from/--to take a seq");
        else {
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("audit export: unexpected argument '%s'",
                               argv[optind]);
    if (!out || !*out)
        return ctl_usage_error("audit export: --out FILE is required");
    if (!events && (cli.seen['f'] || cli.seen['t']))
        return ctl_usage_error("audit export: --checkpoints-only exports "
                               "every checkpoint: --from/--to are for "
                               "events");
    if (to > 0 && to < from)
        return ctl_usage_error("audit export: --to %" PRId64
                               " is below --from %" PRId64,
                               to, from);
    if (ctl_out_parent_check("audit export", out) != CTL_OK)
        return CTL_USAGE;
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    /* An export ends at a checkpoint (verify holds its events to it):
     * --to past the last one has none to end at, and is refused before
     * the access is recorded. */
    int64_t last = 0;
    bool ends = events && to > 0;
    int checked = ends ? s_last_checkpoint(conn, &last) : 0;
    if (checked == 0 && ends && to > last) {
        PQfinish(conn);
        return last ? ctl_usage_error("audit export: --to %" PRId64
                                      " is past the last checkpoint (seq "
                                      "%" PRId64 "): give --to %" PRId64
                                      " or less, or leave --to out to export "
                                      "up to the end",
                                      to, last, last)
                    : ctl_usage_error("audit export: there is no checkpoint "
                                      "yet for --to to end at: leave --to out "
                                      "to export up to the end");
    }
    if (checked != 0) {
        PQfinish(conn);
        return CTL_FAIL;
    }
    /* Written with no name, or one of its own, and given the one asked
     * for only when whole: an export cut short must not stand under that
     * name looking complete, since its events after its last checkpoint
     * would verify intact. */
    char tmp[PATH_MAX] = "";
    struct stat st;
    int fd = -1;
    if (stat(out, &st) == 0)
        errno = EEXIST;
    else
        fd = s_unnamed(out, tmp);
    FILE *f = fd >= 0 ? fdopen(fd, "w") : NULL;
    if (!f && errno == EEXIST)
        fprintf(stderr,
                "ketenhubctl: %s: exists: an export never replaces a "
                "file; name a new one\n",
                out);
    else if (!f)
        fprintf(stderr, "ketenhubctl: %s: cannot create: %s\n", out,
                strerror(errno));
    if (!f) {
        if (fd >= 0)
            close(fd);
        if (*tmp)
            unlink(tmp);
        PQfinish(conn);
        return CTL_FAIL;
    }
    char filter[128];
    snprintf(filter, sizeof filter, "from=%" PRId64 " to=%" PRId64 "%s", from,
             to, events ? "" : " checkpoints-only");
    kh_error_t err;
    kh_error_clear(&err);
    long count = 0;
    /* The access is recorded (and committed) first: an export that
     * fails half-way was still an access. */
    int rc = kh_trail_db_record_access(conn, "trail.exported", "auditor", "ok",
                                       NULL, filter, "ketenhubctl", &err);
    if (rc == 0)
        rc = kh_trail_export(conn, f, from, to, events, &count, &err);
    /* On the disk before it has its name: after a power cut the name
     * holds the whole export or is not there. */
    if (rc == 0 && (fflush(f) != 0 || fsync(fd) != 0))
        rc = kh_error_set(&err, KH_E_IO, out, "cannot write: %s",
                          strerror(errno));
    if (rc == 0 && s_publish(fd, tmp, out) != 0)
        rc = kh_error_set(&err, KH_E_IO, out, "cannot create: %s",
                          strerror(errno));
    fclose(f); /* when rc is 0, flushed and synced above */
    if (rc != 0) {
        ctl_print_error(&err);
        if (*tmp)
            unlink(tmp);
    } else if (!events)
        printf("exported the checkpoints (no events) to %s\n", out);
    else
        printf("exported %ld events with their checkpoints to %s\n", count,
               out);
    PQfinish(conn);
    return rc == 0 ? CTL_OK : CTL_FAIL;
}

/* ---- verify ---- */

static void s_report(const kh_trail_report_t *r, const char *where)
{
    /* No events, no range: "(seq 0..0)" read as an event at seq 0. */
    char range[64] = "";
    if (r->events > 0)
        snprintf(range, sizeof range, " (seq %" PRId64 "..%" PRId64 ")",
                 r->first_seq, r->last_seq);
    if (r->kind == KH_TRAIL_OK) {
        printf("verified %s: %" PRId64 " events%s, %" PRId64 " sealed, %" PRId64
               " not yet sealed, %" PRId64
               " checkpoints valid, signed up to seq %" PRId64 "\n",
               where, r->events, range, r->sealed, r->unsealed, r->checkpoints,
               r->signed_seq);
        printf("intact\n");
        return;
    }
    /* A break in the chain stops the judging of seals and checkpoints
     * (a bad signature does not): said as counts of the whole trail ("24
     * sealed, 0 not yet sealed" of 58 events all sealed), they would
     * misstate it. */
    printf("checked %s: %" PRId64 " events%s; of those judged %" PRId64
           " matched their seals, %" PRId64 " checkpoints held, signed up to "
           "seq %" PRId64 "\n",
           where, r->events, range, r->sealed, r->checkpoints, r->signed_seq);
    printf("FIRST PROBLEM at seq %" PRId64 ": %s (%s)\n", r->seq,
           kh_trail_finding_name(r->kind), r->detail);
}

static int s_verify(int argc, char **argv)
{
    static const struct option options[] = {
        {"public-key", required_argument, NULL, 'k'},
        {"file", required_argument, NULL, 'f'},
        {"published", required_argument, NULL, 'p'},
        {"from-checkpoint", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *key = s_env("KH_AUDIT_PUBLIC_KEY"), *file = NULL,
               *published = NULL;
    /* --public-key may be given again: the keys in the order used. */
    const char *key_files[KH_TRAIL_MAX_KEYS];
    size_t nkey_files = 0;
    int64_t from_cp = 0;
    int c;
    ctl_opts_t cli = {.repeatable = "k"};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "k:f:p:c:h", options, &cli)) != -1) {
        if (c == 'k' && nkey_files == KH_TRAIL_MAX_KEYS)
            return ctl_usage_error("audit verify: more than %d --public-key "
                                   "options",
                                   KH_TRAIL_MAX_KEYS);
        else if (c == 'k')
            key_files[nkey_files++] = optarg;
        else if (c == 'f')
            file = optarg;
        else if (c == 'p')
            published = optarg;
        else if (c == 'c' && s_seq_arg(optarg, &from_cp) && from_cp > 0)
            continue;
        else if (c == 'c') /* 0 would mean "from the start" unasked */
            return ctl_usage_error("audit verify: --from-checkpoint takes the "
                                   "seq of a checkpoint (1 or more)");
        else {
            s_usage(c == 'h' ? stdout : stderr);
            return c == 'h' ? CTL_OK : CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("audit verify: unexpected argument '%s'",
                               argv[optind]);
    if (nkey_files == 0 && key)
        key_files[nkey_files++] = key;
    if (nkey_files == 0)
        return ctl_usage_error("audit verify: --public-key FILE (or "
                               "KH_AUDIT_PUBLIC_KEY) is required");
    if (file && from_cp)
        return ctl_usage_error("audit verify: --from-checkpoint is for the "
                               "database; --file verifies the whole export");
    kh_error_t err;
    kh_error_clear(&err);
    static kh_trail_keys_t keys; /* 2 KiB: not on the stack */
    keys.count = 0;
    if (sodium_init() < 0)
        return ctl_usage_error("audit verify: no random source");
    for (size_t i = 0; i < nkey_files; i++)
        if (kh_trail_load_public_keys(key_files[i], &keys, &err) != 0) {
            ctl_print_error(&err);
            return CTL_USAGE;
        }
    kh_trail_checkpoint_t *pub = NULL;
    size_t npub = 0;
    if (published &&
        kh_trail_file_checkpoints(published, &pub, &npub, &err) != 0) {
        ctl_print_error(&err);
        return CTL_FAIL;
    }
    kh_trail_report_t report;
    int rc;
    if (file) {
        rc = kh_trail_file_verify_keys(file, &keys, pub, npub, &report, &err);
        if (rc >= 0)
            s_report(&report, file);
    } else {
        PGconn *conn = ctl_connect();
        if (!conn) {
            free(pub);
            return CTL_FAIL;
        }
        rc = kh_trail_db_verify_keys(conn, &keys, from_cp, pub, npub, &report,
                                     &err);
        /* The verdict is given only once the access is recorded, as a
         * query's page is: a read of the trail that leaves no event in
         * it gives nothing. */
        if (rc >= 0) {
            char filter[160];
            snprintf(filter, sizeof filter,
                     "from_checkpoint=%" PRId64 " published=%zu", from_cp,
                     npub);
            if (kh_trail_db_record_access(
                    conn, "trail.verified", "auditor",
                    rc == 0 ? "ok" : "failed",
                    rc == 0 ? NULL : kh_trail_finding_name(report.kind), filter,
                    "ketenhubctl", &err) != 0)
                rc = -1;
            else
                s_report(&report, "the database");
        }
        PQfinish(conn);
    }
    free(pub);
    if (rc < 0) {
        /* A seq that is no checkpoint is a bad option, not a finding: named
         * as the option the auditor typed, like every other bad option. */
        if (err.code == KH_E_NOT_FOUND &&
            strcmp(err.path, "from_checkpoint") == 0)
            return ctl_usage_error("audit verify: --from-checkpoint %" PRId64
                                   " is no checkpoint of the trail",
                                   from_cp);
        ctl_print_error(&err);
        return CTL_FAIL;
    }
    return rc == 0 ? CTL_OK : CTL_FAIL;
}

int ctl_audit(int argc, char **argv)
{
    static const ctl_sub_t subs[] = {
        {"keygen", s_keygen}, {"seal", s_seal},
        {"query", s_query},   {"export", s_export},
        {"verify", s_verify}, {"report", ctl_audit_report},
        {NULL, NULL}};
    return ctl_dispatch("audit", argc, argv, subs, s_usage);
}
