/*
 * ketenhubctl partner add / list / rotate / revoke: the partner registry
 * for administrators. add, rotate and revoke change the database and the
 * certificate directory together: the rows are committed only when the
 * files are in place, and the files are put back as they were when the
 * commit fails.
 */
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/audit.h"
#include "ketenhub/db.h"
#include "ketenhub/partner.h"

static void s_usage(FILE *out)
{
    fprintf(out, "usage: ketenhubctl partner add ID --name NAME --kind KIND "
                 "[--no-cases]\n"
                 "                               --cert-dir DIR\n"
                 "                               (--out DIR | --public-cert "
                 "FILE)\n"
                 "       ketenhubctl partner list [--active] [--json]\n"
                 "       ketenhubctl partner rotate ID --cert-dir DIR\n"
                 "                                  (--out DIR | --public-cert "
                 "FILE)\n"
                 "                                  [--overlap HOURS]\n"
                 "       ketenhubctl partner revoke ID --cert-dir DIR\n"
                 "\n"
                 "Run `ketenhubctl partner add|list|rotate|revoke --help` for "
                 "details.\n");
}

static void s_usage_add(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl partner add ID --name NAME --kind KIND "
            "[--no-cases]\n"
            "                               --cert-dir DIR\n"
            "                               (--out DIR | --public-cert "
            "FILE)\n"
            "\n"
            "Register a partner and its CURVE key. The public certificate "
            "goes to the\n"
            "hub's partner certificate directory (DIR/ID.cert). With --out "
            "a new key\n"
            "pair is made here, and ID.cert and ID.cert_secret go to the "
            "--out\n"
            "directory, for the partner; with --public-cert the partner "
            "made its pair\n"
            "itself (ketenhub-partner keygen) and its secret never leaves "
            "it.\n"
            "\n"
            "  ID                  ^[a-z][a-z0-9-]{1,31}$, e.g. "
            "veilig-thuis-gv\n"
            "  --name NAME         display name of the organisation\n"
            "  --kind KIND         veilig_thuis, zorgcoordinator, police, "
            "municipality,\n"
            "                      inspectorate, national_centre, "
            "chain_director, other\n"
            "  --no-cases          the partner never receives referrals "
            "(always so for\n"
            "                      chain_director)\n"
            "  --cert-dir DIR      the hub's partner certificate directory "
            "(default:\n"
            "                      $KH_PARTNER_CERT_DIR)\n"
            "  --out DIR           where to write the partner's key pair "
            "(created, 0700)\n"
            "  --public-cert FILE  the partner's public certificate (no "
            "secret key in it)\n"
            "  --help              this text\n");
}

static void s_usage_list(FILE *out)
{
    fprintf(out, "usage: ketenhubctl partner list [--active] [--json]\n"
                 "\n"
                 "  --active  leave out revoked partners\n"
                 "  --json    one JSON array, for scripts; with each partner's "
                 "keys\n"
                 "            (added_at, expires_at: null for the current "
                 "one; a revoked\n"
                 "            partner's keys end at its revocation at the "
                 "latest) and\n"
                 "            previous_key_until (the end of a rotation's "
                 "overlap)\n"
                 "  --help    this text\n");
}

#define S_OVERLAP_DEFAULT_H 24
#define S_OVERLAP_MAX_H (24 * 90)

static void s_usage_rotate(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl partner rotate ID --cert-dir DIR\n"
            "                                  (--out DIR | --public-cert "
            "FILE)\n"
            "                                  [--overlap HOURS]\n"
            "\n"
            "Give a partner a new CURVE key under the same id: its "
            "deliveries,\n"
            "referrals and the rules that name it stay as they are. The new "
            "public\n"
            "certificate replaces DIR/ID.cert; with --out a new pair is made "
            "here and\n"
            "goes to the --out directory, for the partner; with "
            "--public-cert the\n"
            "partner made it (ketenhub-partner keygen). The key it replaces "
            "still\n"
            "admits the partner for the overlap (DIR/ID.previous.cert, which "
            "says until\n"
            "when), so that the partner can switch without a gap; a rotation "
            "during an\n"
            "overlap ends the one before.\n"
            "\n"
            "  --cert-dir DIR      the hub's partner certificate directory "
            "(default:\n"
            "                      $KH_PARTNER_CERT_DIR)\n"
            "  --out DIR           where to write the partner's new key pair "
            "(created,\n"
            "                      0700; files of the same name must not "
            "exist)\n"
            "  --public-cert FILE  the partner's new public certificate (no "
            "secret key in it)\n"
            "  --overlap HOURS     how long the key it replaces still admits "
            "the partner,\n"
            "                      0 to %d (default %d); 0 when the key "
            "leaked\n"
            "  --help              this text\n",
            S_OVERLAP_MAX_H, S_OVERLAP_DEFAULT_H);
}

static void s_usage_revoke(FILE *out)
{
    fprintf(out,
            "usage: ketenhubctl partner revoke ID --cert-dir DIR\n"
            "\n"
            "Revoke a partner: sets revoked_at and removes DIR/ID.cert (and "
            "DIR/ID.previous.cert)\n"
            "so the hub refuses new connections with its keys. The row stays "
            "for the trail.\n"
            "\n"
            "  --cert-dir DIR  the hub's partner certificate directory "
            "(default:\n"
            "                  $KH_PARTNER_CERT_DIR)\n"
            "  --help          this text\n");
}

static const char *s_env_cert_dir(void)
{
    const char *dir = getenv("KH_PARTNER_CERT_DIR");
    return dir && *dir ? dir : NULL;
}

/* Undo the files s_add wrote: the installed public certificate when
 * cert_dir is not NULL, the partner's pair when out is not NULL, and
 * made_dir (the --out DIR it made) when not NULL. */
static void s_unlink_files(const char *cert_dir, const char *out,
                           const char *made_dir, const char *id)
{
    char path[4096];
    if (cert_dir) {
        snprintf(path, sizeof path, "%s/%s.cert", cert_dir, id);
        unlink(path);
    }
    if (out) {
        snprintf(path, sizeof path, "%s/%s.cert", out, id);
        unlink(path);
        snprintf(path, sizeof path, "%s/%s.cert_secret", out, id);
        unlink(path);
    }
    if (made_dir)
        rmdir(made_dir);
}

/* The partner's new key: the public certificate it made itself
 * (public_cert: its secret never leaves it), or a pair made here, for
 * --out. NULL after printing why. */
static zcert_t *s_partner_cert(const char *id, const char *public_cert)
{
    kh_error_t err;
    kh_error_clear(&err);
    zcert_t *cert = public_cert
                        ? kh_partner_cert_load_public(public_cert, id, &err)
                        : kh_partner_cert_new(id, &err);
    if (!cert)
        ctl_print_error(&err);
    return cert;
}

/* The one partner ID left in argv after the options, valid; NULL after
 * saying what is wrong (a usage error). */
static const char *s_one_id(const char *command, int argc, char **argv)
{
    if (optind + 1 != argc) {
        ctl_usage_error("%s: give exactly one partner ID", command);
        return NULL;
    }
    if (!kh_partner_id_valid(argv[optind])) {
        ctl_usage_error("%s: ID must match ^[a-z][a-z0-9-]{1,31}$", command);
        return NULL;
    }
    return argv[optind];
}

/* Whether a --cert-dir (or KH_PARTNER_CERT_DIR) was given; false after
 * saying so. */
static bool s_cert_dir_given(const char *command, const char *cert_dir)
{
    if (cert_dir && *cert_dir)
        return true;
    ctl_usage_error("%s: --cert-dir DIR is required (or set "
                    "KH_PARTNER_CERT_DIR)",
                    command);
    return false;
}

/* path made absolute, its links resolved, also when its last part is not
 * there yet; false when its directory is not there. */
static bool s_resolved(const char *path, char resolved[PATH_MAX])
{
    if (realpath(path, resolved))
        return true;
    char dir[PATH_MAX], base[PATH_MAX], parent[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", path);
    snprintf(base, sizeof base, "%s", path);
    if (!realpath(dirname(dir), parent))
        return false;
    return snprintf(resolved, PATH_MAX, "%s/%s",
                    strcmp(parent, "/") == 0 ? "" : parent,
                    basename(base)) < PATH_MAX;
}

/* Whether path (which need not be there yet) is dir or lies in it: one
 * of its directories is dir itself, by device and inode, so that another
 * way to the same directory (a second mount of it) is found too. */
static bool s_within(const char *path, const char *dir)
{
    struct stat d, st;
    char p[PATH_MAX];
    if (stat(dir, &d) != 0 || !s_resolved(path, p))
        return false;
    for (;;) {
        if (stat(p, &st) == 0 && st.st_dev == d.st_dev && st.st_ino == d.st_ino)
            return true;
        char *slash = strrchr(p, '/');
        if (!slash || slash == p) /* "/" itself: looked at below */
            break;
        *slash = '\0';
    }
    return stat("/", &st) == 0 && st.st_dev == d.st_dev &&
           st.st_ino == d.st_ino;
}

/* Exactly one of --out DIR and --public-cert FILE, an --out that can be
 * made and is outside cert_dir (the partner's secret key has no place
 * among the certificates the hub admits, which the services read); false
 * after saying so (a usage error). */
static bool s_one_key_source(const char *command, const char *out,
                             const char *public_cert, const char *cert_dir)
{
    if ((out && *out) == (public_cert && *public_cert)) {
        ctl_usage_error("%s: give one of --out DIR (a key pair made here) "
                        "and --public-cert FILE (the partner's own)",
                        command);
        return false;
    }
    if (!out)
        return true;
    if (ctl_out_dir_check(command, out) != CTL_OK)
        return false;
    if (s_within(out, cert_dir)) {
        ctl_usage_error("%s: --out %s is in --cert-dir %s: the partner's "
                        "secret key must not be among the certificates the "
                        "hub admits; give a directory outside it",
                        command, out, cert_dir);
        return false;
    }
    return true;
}

/* Where the partner's pair went (out), when it was made here. */
static void s_print_handover(const char *id, const char *out)
{
    if (out)
        printf("for the partner (send the secret securely): %s/%s.cert, "
               "%s/%s.cert_secret\n",
               out, id, out, id);
    else
        printf("the partner keeps its secret key; it needs hub.cert only\n");
}

/* COMMIT a partner's change: 0 when it went through (also when only a
 * new connection could tell: *outcome 1), else -1 with err, and *outcome
 * -1 when whether it went through cannot be found out (the files are then
 * left admitting both keys), 0 when not. Told by the transaction's status
 * (ctl_commit_xact), not by reading the row: a commit that is durable but
 * not yet visible (waiting for a synchronous standby) read as not made,
 * and the files were put back under a change that then showed. */
static int s_commit(PGconn *conn, int *outcome, kh_error_t *err)
{
    bool lost;
    int committed = ctl_commit_xact(conn, &lost, err);
    *outcome = committed == 1 ? lost : committed;
    if (committed == 1 && !lost)
        return 0;
    if (committed == 0)
        return -1;
    ctl_print_error(err);
    if (*outcome < 0) {
        fputs("ketenhubctl: the connection was lost with the answer to the "
              "commit, and whether it went through cannot be read now: the "
              "files were left in place, so that the partner is admitted "
              "either way; see `partner list --json` once the database "
              "answers\n",
              stderr);
        return -1;
    }
    fputs("ketenhubctl: the commit went through after all (its answer was "
          "lost with the connection)\n",
          stderr);
    return 0;
}

static int s_add(const char *id, const char *name, kh_partner_kind_t kind,
                 bool cases, const char *cert_dir, const char *out,
                 zcert_t *cert)
{
    kh_error_t err;
    kh_error_clear(&err);
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    bool exported = false, installed = false;
    const char *made_dir = out && access(out, F_OK) != 0 ? out : NULL;
    int rc = kh_db_exec(conn, "BEGIN", &err);
    if (rc == 0)
        rc = kh_partner_register(conn, id, name, kind, cases,
                                 zcert_public_txt(cert), &err);
    if (rc == 0)
        rc = kh_audit_admin(conn, "partner.added", id, "ketenhubctl", &err);
    if (rc == 0 && out) {
        rc = kh_partner_cert_export(cert, id, out, &err);
        exported = rc == 0;
    }
    bool stray = false; /* another key's DIR/ID.cert, no partner ID */
    if (rc == 0) {
        rc = kh_partner_cert_install(cert, id, cert_dir, &err);
        installed = rc == 0; /* not when the same key was there (1) */
        stray = rc < 0 && err.code == KH_E_CONFIG;
        rc = rc < 0 ? -1 : 0;
    }
    /* The copies a rotation cut short kept of a partner of this id (the
     * registry has none now: a database restored without it) admit
     * nothing and go, under the partner's lock like a rotation's (taken
     * once the install has made the directory). */
    int lock = -1;
    if (rc == 0) {
        lock = kh_partner_cert_lock(id, cert_dir, &err);
        rc = lock < 0 ? -1 : 0;
    }
    if (rc == 0)
        rc = kh_partner_cert_forget_kept(id, cert_dir, &err) < 0 ? -1 : 0;
    int outcome = 0;
    if (rc == 0)
        rc = s_commit(conn, &outcome, &err);
    kh_partner_cert_unlock(&lock);
    if (rc != 0 && outcome == 0) {
        kh_db_rollback_quietly(conn);
        s_unlink_files(installed ? cert_dir : NULL, exported ? out : NULL,
                       made_dir, id);
        ctl_print_error(&err);
        if (stray)
            fprintf(stderr,
                    "ketenhubctl: no partner %s is registered, so that "
                    "file admits no partner (an add cut short left it, or "
                    "it was put there by hand): remove it and add again\n",
                    id);
    } else if (rc == 0) {
        printf("partner %s registered (kind %s, handles cases: %s)\n", id,
               kh_partner_kind_name(kind), cases ? "yes" : "no");
        printf("public key: %s\n", zcert_public_txt(cert));
        printf("installed: %s/%s.cert\n", cert_dir, id);
        s_print_handover(id, out);
    }
    PQfinish(conn);
    return rc == 0 ? CTL_OK : CTL_FAIL;
}

static int s_cmd_add(int argc, char **argv)
{
    static const struct option options[] = {
        {"name", required_argument, NULL, 'n'},
        {"kind", required_argument, NULL, 'k'},
        {"no-cases", no_argument, NULL, 'c'},
        {"cert-dir", required_argument, NULL, 'd'},
        {"out", required_argument, NULL, 'o'},
        {"public-cert", required_argument, NULL, 'p'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *name = NULL, *kind_name = NULL, *out = NULL;
    const char *public_cert = NULL;
    const char *cert_dir = s_env_cert_dir();
    bool no_cases = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "n:k:cd:o:p:h", options, &cli)) != -1) {
        switch (c) {
        case 'n':
            name = optarg;
            break;
        case 'k':
            kind_name = optarg;
            break;
        case 'c':
            no_cases = true;
            break;
        case 'd':
            cert_dir = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'p':
            public_cert = optarg;
            break;
        case 'h':
            s_usage_add(stdout);
            return CTL_OK;
        default:
            s_usage_add(stderr);
            return CTL_USAGE;
        }
    }
    const char *id = s_one_id("partner add", argc, argv);
    if (!id)
        return CTL_USAGE;
    if (!name || !*name)
        return ctl_usage_error("partner add: --name NAME is required");
    if (!kh_partner_display_name_valid(name))
        return ctl_usage_error("partner add: --name must be 1 to %d "
                               "characters, without control characters or "
                               "outer spaces",
                               KH_PARTNER_NAME_MAX);
    if (!kind_name)
        return ctl_usage_error("partner add: --kind KIND is required");
    int kind = kh_partner_kind_from_name(kind_name);
    if (kind < 0) {
        char kinds[256] = "";
        for (int k = 0; k < KH_PARTNER_KIND_COUNT_; k++)
            snprintf(kinds + strlen(kinds), sizeof kinds - strlen(kinds),
                     "%s%s", k ? ", " : "",
                     kh_partner_kind_name((kh_partner_kind_t) k));
        return ctl_usage_error("partner add: unknown kind '%s'; the kinds "
                               "are: %s (the ketenregisseur is "
                               "chain_director)",
                               kind_name, kinds);
    }
    if (!s_cert_dir_given("partner add", cert_dir))
        return CTL_USAGE;
    /* As for rotate and revoke: a mistyped directory, made here, would
     * hold the certificate where zauth never looks, and the partner
     * registered but refused at every handshake. */
    struct stat st;
    if (stat(cert_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ctl_usage_error("partner add: --cert-dir %s is not a "
                               "directory",
                               cert_dir);
    if (!s_one_key_source("partner add", out, public_cert, cert_dir))
        return CTL_USAGE;
    /* A chain director never handles cases, so it needs no --no-cases. */
    bool cases = !no_cases && kind != KH_PARTNER_CHAIN_DIRECTOR;
    zcert_t *cert = s_partner_cert(id, public_cert);
    if (!cert)
        return public_cert ? CTL_USAGE : CTL_FAIL;
    int rc =
        s_add(id, name, (kh_partner_kind_t) kind, cases, cert_dir, out, cert);
    zcert_destroy(&cert);
    return rc;
}

/* The table's header, once: with the first row, or after a list that
 * found none. Never before the list is read, so that a list that fails
 * (a database not migrated, a login without the rights) prints nothing
 * on stdout, where a script would take a header for an empty list. */
static void s_print_header(bool *printed)
{
    if (*printed)
        return;
    printf("%-24s %-16s %-5s %-8s %-40s %s\n", "id", "kind", "cases", "status",
           "public_key", "name");
    *printed = true;
}

/* arg: the bool s_print_header keeps. */
static void s_print_partner(const kh_partner_t *p, void *arg)
{
    s_print_header(arg);
    printf("%-24s %-16s %-5s %-8s %-40s %s\n", p->id,
           kh_partner_kind_name(p->kind), p->handles_cases ? "yes" : "no",
           p->revoked ? "revoked" : "active", p->public_key, p->display_name);
}

static void s_json_partner(const kh_partner_t *p, void *arg)
{
    json_t *array = arg;
    json_t *o = json_pack(
        "{s:s, s:s, s:s, s:b, s:s, s:o, s:s, s:o}", "id", p->id, "display_name",
        p->display_name, "kind", kh_partner_kind_name(p->kind), "handles_cases",
        p->handles_cases, "public_key", p->public_key, "previous_key_until",
        p->previous_key_until[0] ? json_string(p->previous_key_until)
                                 : json_null(),
        "created_at", p->created_at, "revoked_at",
        p->revoked ? json_string(p->revoked_at) : json_null());
    if (o)
        json_array_append_new(array, o);
}

/* Add to each partner object of array its "keys": every key it has had,
 * oldest first, with when it was added and when it stopped (or stops)
 * admitting it (null: its current key, while the partner is not revoked;
 * a revoked partner's keys stopped at its revocation at the latest). So an
 * auditor can tell whose key a trail's "key:..." actor was. 0, or -1 with
 * err. */
static int s_json_keys(PGconn *conn, json_t *array, kh_error_t *err)
{
    PGresult *res = PQexec(conn, "SELECT k.partner_id, k.curve_public_key,"
                                 " to_char(k.added_at AT TIME ZONE 'UTC',"
                                 " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),"
                                 " to_char(least(k.expires_at, p.revoked_at)"
                                 " AT TIME ZONE 'UTC',"
                                 " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')"
                                 " FROM partner_keys k JOIN partners p"
                                 " ON p.id = k.partner_id"
                                 " ORDER BY k.added_at,"
                                 " k.expires_at NULLS LAST");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot list the partners' keys");
        PQclear(res);
        return -1;
    }
    int rows = PQntuples(res);
    size_t i;
    json_t *partner;
    json_array_foreach(array, i, partner)
    {
        const char *id = json_string_value(json_object_get(partner, "id"));
        json_t *keys = json_array();
        for (int row = 0; keys && row < rows; row++)
            if (strcmp(PQgetvalue(res, row, 0), id) == 0)
                json_array_append_new(
                    keys,
                    json_pack("{s:s, s:s, s:o}", "public_key",
                              PQgetvalue(res, row, 1), "added_at",
                              PQgetvalue(res, row, 2), "expires_at",
                              PQgetisnull(res, row, 3)
                                  ? json_null()
                                  : json_string(PQgetvalue(res, row, 3))));
        if (!keys || json_object_set_new(partner, "keys", keys) != 0) {
            PQclear(res);
            return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
        }
    }
    PQclear(res);
    return 0;
}

static int s_cmd_list(int argc, char **argv)
{
    static const struct option options[] = {{"active", no_argument, NULL, 'a'},
                                            {"json", no_argument, NULL, 'j'},
                                            {"help", no_argument, NULL, 'h'},
                                            {NULL, 0, NULL, 0}};
    bool active = false, as_json = false;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "ajh", options, &cli)) != -1) {
        switch (c) {
        case 'a':
            active = true;
            break;
        case 'j':
            as_json = true;
            break;
        case 'h':
            s_usage_list(stdout);
            return CTL_OK;
        default:
            s_usage_list(stderr);
            return CTL_USAGE;
        }
    }
    if (optind != argc)
        return ctl_usage_error("partner list: unexpected argument '%s'",
                               argv[optind]);
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    int n;
    if (as_json) {
        /* The partners and their keys from one snapshot: a rotation
         * committed between two reads would show the old key as the
         * partner's with an end under keys. */
        json_t *array = json_array();
        n = array
                ? kh_db_exec(conn,
                             "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                             &err)
                : kh_error_set(&err, KH_E_NOMEM, NULL, "out of memory");
        if (n == 0)
            n = kh_partner_list(conn, !active, s_json_partner, array, &err);
        if (n >= 0 && (size_t) n != json_array_size(array))
            n = kh_error_set(&err, KH_E_NOMEM, NULL, "out of memory");
        if (n >= 0 && s_json_keys(conn, array, &err) != 0)
            n = -1;
        if (n >= 0) {
            char *text = json_dumps(array, JSON_INDENT(2));
            if (text)
                puts(text);
            else
                n = kh_error_set(&err, KH_E_NOMEM, NULL, "out of memory");
            free(text);
        }
        json_decref(array);
    } else {
        bool header = false;
        n = kh_partner_list(conn, !active, s_print_partner, &header, &err);
        if (n >= 0)
            s_print_header(&header);
    }
    PQfinish(conn);
    if (n < 0) {
        ctl_print_error(&err);
        return CTL_FAIL;
    }
    return CTL_OK;
}

static int s_rotate(const char *id, const char *cert_dir, const char *out,
                    int overlap_h, zcert_t *cert)
{
    kh_error_t err;
    kh_error_clear(&err);
    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    char previous[KH_PARTNER_KEY_LEN + 1] = "", until[40] = "";
    bool exported = false, staged = false;
    const char *made_dir = out && access(out, F_OK) != 0 ? out : NULL;
    int lock = -1;
    int rc = kh_db_exec(conn, "BEGIN", &err);
    if (rc == 0)
        rc = kh_partner_rotate(conn, id, zcert_public_txt(cert),
                               overlap_h * 3600, previous, until, &err);
    if (rc == 0)
        rc = kh_audit_admin(conn, "partner.key_rotated", id, "ketenhubctl",
                            &err);
    if (rc == 0 && out) {
        rc = kh_partner_cert_export(cert, id, out, &err);
        exported = rc == 0;
    }
    if (rc == 0) {
        lock = kh_partner_cert_lock(id, cert_dir, &err);
        rc = lock < 0 ? -1 : 0;
    }
    if (rc == 0) {
        rc = kh_partner_cert_rotate(cert, id, previous, cert_dir, &err);
        staged = rc == 0;
    }
    int outcome = 0;
    if (rc == 0)
        rc = s_commit(conn, &outcome, &err);
    if (staged) {
        kh_error_t end_err;
        kh_error_clear(&end_err);
        if (kh_partner_cert_rotate_end(id, cert_dir, rc == 0 || outcome < 0,
                                       outcome < 0 ? NULL : previous,
                                       overlap_h > 0 ? until : NULL,
                                       &end_err) != 0) {
            /* The rotation is committed (or may be): the services apply the end
             * of the key before from the registry. */
            fprintf(stderr,
                    "ketenhubctl: warning: %s: %s (%s); the registry ends "
                    "the key before, the handshake does not\n",
                    end_err.path, end_err.message, kh_error_name(end_err.code));
        }
    }
    kh_partner_cert_unlock(&lock);
    if (rc != 0 && outcome == 0) {
        kh_db_rollback_quietly(conn);
        s_unlink_files(NULL, exported ? out : NULL, made_dir, id);
        ctl_print_error(&err);
    } else if (rc == 0) {
        printf("partner %s has a new key: %s\n", id, zcert_public_txt(cert));
        printf("installed: %s/%s.cert\n", cert_dir, id);
        if (overlap_h > 0)
            printf("the key before (%s) admits %s until %s "
                   "(%s/%s.previous.cert)\n",
                   previous, id, until, cert_dir, id);
        else
            printf("the key before (%s) no longer admits %s\n", previous, id);
        s_print_handover(id, out);
    }
    PQfinish(conn);
    return rc == 0 ? CTL_OK : CTL_FAIL;
}

static int s_cmd_rotate(int argc, char **argv)
{
    static const struct option options[] = {
        {"cert-dir", required_argument, NULL, 'd'},
        {"out", required_argument, NULL, 'o'},
        {"public-cert", required_argument, NULL, 'p'},
        {"overlap", required_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *cert_dir = s_env_cert_dir(), *out = NULL;
    const char *public_cert = NULL;
    int overlap_h = S_OVERLAP_DEFAULT_H;
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "d:o:p:v:h", options, &cli)) != -1) {
        switch (c) {
        case 'd':
            cert_dir = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'p':
            public_cert = optarg;
            break;
        case 'v': {
            char *end;
            long v = strtol(optarg, &end, 10);
            if (!(*optarg >= '0' && *optarg <= '9') || *end || v < 0 ||
                v > S_OVERLAP_MAX_H)
                return ctl_usage_error("partner rotate: --overlap wants "
                                       "whole hours, 0 to %d",
                                       S_OVERLAP_MAX_H);
            overlap_h = (int) v;
            break;
        }
        case 'h':
            s_usage_rotate(stdout);
            return CTL_OK;
        default:
            s_usage_rotate(stderr);
            return CTL_USAGE;
        }
    }
    const char *id = s_one_id("partner rotate", argc, argv);
    if (!id)
        return CTL_USAGE;
    if (!s_cert_dir_given("partner rotate", cert_dir))
        return CTL_USAGE;
    struct stat st;
    if (stat(cert_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return ctl_usage_error("partner rotate: --cert-dir %s is not a "
                               "directory",
                               cert_dir);
    if (!s_one_key_source("partner rotate", out, public_cert, cert_dir))
        return CTL_USAGE;
    zcert_t *cert = s_partner_cert(id, public_cert);
    if (!cert)
        return public_cert ? CTL_USAGE : CTL_FAIL;
    int rc = s_rotate(id, cert_dir, out, overlap_h, cert);
    zcert_destroy(&cert);
    return rc;
}

static int s_cmd_revoke(int argc, char **argv)
{
    static const struct option options[] = {
        {"cert-dir", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *cert_dir = s_env_cert_dir();
    int c;
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc, argv, "d:h", options, &cli)) != -1) {
        switch (c) {
        case 'd':
            cert_dir = optarg;
            break;
        case 'h':
            s_usage_revoke(stdout);
            return CTL_OK;
        default:
            s_usage_revoke(stderr);
            return CTL_USAGE;
        }
    }
    const char *id = s_one_id("partner revoke", argc, argv);
    if (!id)
        return CTL_USAGE;
    if (!s_cert_dir_given("partner revoke", cert_dir))
        return CTL_USAGE;

    PGconn *conn = ctl_connect();
    if (!conn)
        return CTL_FAIL;
    kh_error_t err;
    kh_error_clear(&err);
    int revoked = -1, removed = -1;
    int rc = kh_db_exec(conn, "BEGIN", &err);
    if (rc == 0) {
        revoked = kh_partner_revoke(conn, id, &err);
        rc = revoked < 0 ? -1 : 0;
    }
    if (rc == 0 && revoked == 0)
        rc = kh_audit_admin(conn, "partner.revoked", id, "ketenhubctl", &err);
    /* Remove the certificate inside the transaction: if it cannot be
     * removed, the partner stays active, and the two agree; if the
     * revocation does not commit, the certificate is put back. */
    int lock = -1;
    if (rc == 0) {
        /* Not while a rotation of the partner writes its files. */
        lock = kh_partner_cert_lock(id, cert_dir, &err);
        rc = lock < 0 ? -1 : 0;
    }
    if (rc == 0) {
        removed = kh_partner_cert_remove(id, cert_dir, &err);
        rc = removed < 0 ? -1 : 0;
    }
    int committed = 0;
    if (rc == 0) {
        bool lost; /* it went through; only the answer was lost */
        committed = ctl_commit_xact(conn, &lost, &err);
        rc = committed == 1 ? 0 : -1;
    }
    if (removed >= 0) {
        /* Whether it committed unknown: the files stay removed (revoke
         * again to be sure), never admitting a revoked key. */
        kh_partner_cert_remove_end(id, cert_dir, committed == 0);
        if (committed < 0)
            fprintf(stderr,
                    "ketenhubctl: partner revoke: whether the revocation was "
                    "committed is unknown; the certificate stays removed: run "
                    "partner revoke %s again\n",
                    id);
    }
    kh_partner_cert_unlock(&lock);
    if (rc != 0) {
        kh_db_rollback_quietly(conn);
        ctl_print_error(&err);
    } else {
        printf(revoked == 1 ? "partner %s was already revoked; "
                            : "partner %s revoked; ",
               id);
        if (removed == 0)
            printf("removed %s/%s.cert\n", cert_dir, id);
        else
            printf("no certificate %s/%s.cert was there to remove\n", cert_dir,
                   id);
    }
    PQfinish(conn);
    /* A --cert-dir that is not a directory (a mistyped one, which would
     * leave the certificate where zauth still finds it) is a usage error:
     * the revocation was rolled back. */
    return rc == 0 ? CTL_OK : err.code == KH_E_CONFIG ? CTL_USAGE : CTL_FAIL;
}

int ctl_partner(int argc, char **argv)
{
    static const ctl_sub_t subs[] = {{"add", s_cmd_add},
                                     {"list", s_cmd_list},
                                     {"rotate", s_cmd_rotate},
                                     {"revoke", s_cmd_revoke},
                                     {NULL, NULL}};
    return ctl_dispatch("partner", argc, argv, subs, s_usage);
}
