/*
 * Partner registry: partners rows and the certificate files that the
 * CURVE handshake checks (intake reads the directory as zauth does).
 */
#include "ketenhub/partner.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ketenhub/codec.h"
#include "ketenhub/db.h"

static const char *const s_kinds[KH_PARTNER_KIND_COUNT_] = {
    "veilig_thuis", "zorgcoordinator", "police",         "municipality",
    "inspectorate", "national_centre", "chain_director", "other"};

/* Columns read into a kh_partner_t by s_fill. */
#define S_PARTNER_COLUMNS                                                      \
    "id, display_name, kind, handles_cases, curve_public_key, "                \
    "to_char(created_at AT TIME ZONE 'UTC', "                                  \
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), "                                      \
    "coalesce(to_char(revoked_at AT TIME ZONE 'UTC', "                         \
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), ''), "                                 \
    "coalesce((SELECT to_char(max(k.expires_at) AT TIME ZONE 'UTC', "          \
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM partner_keys k "                   \
    "WHERE k.partner_id = partners.id AND k.expires_at > now() "               \
    "AND partners.revoked_at IS NULL), '')"

const char *kh_partner_kind_name(kh_partner_kind_t kind)
{
    if ((int) kind < 0 || kind >= KH_PARTNER_KIND_COUNT_)
        return "unknown";
    return s_kinds[kind];
}

int kh_partner_kind_from_name(const char *name)
{
    if (!name)
        return -1;
    for (int i = 0; i < KH_PARTNER_KIND_COUNT_; i++)
        if (strcmp(s_kinds[i], name) == 0)
            return i;
    return -1;
}

bool kh_partner_id_valid(const char *id)
{
    if (!id || !(id[0] >= 'a' && id[0] <= 'z'))
        return false;
    size_t len = strlen(id);
    if (len < 2 || len > KH_PARTNER_ID_MAX)
        return false;
    for (size_t i = 1; i < len; i++)
        if (!((id[i] >= 'a' && id[i] <= 'z') ||
              (id[i] >= '0' && id[i] <= '9') || id[i] == '-'))
            return false;
    return true;
}

bool kh_partner_key_valid(const char *key)
{
    static const char z85[] = "0123456789abcdefghijklmnopqrstuvwxyz"
                              "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                              ".-:+=^!/*?&<>()[]{}@%$#";
    if (!key || strlen(key) != KH_PARTNER_KEY_LEN)
        return false;
    bool all_zero = true;
    for (const char *p = key; *p; p++) {
        if (!strchr(z85, *p))
            return false;
        if (*p != '0')
            all_zero = false;
    }
    return !all_zero;
}

bool kh_partner_display_name_valid(const char *name)
{
    if (!name || !*name || !kh_text_plain(name))
        return false;
    size_t len = strlen(name);
    if (len > 4 * KH_PARTNER_NAME_MAX || name[0] == ' ' || name[len - 1] == ' ')
        return false;
    size_t chars = 0;
    for (const unsigned char *p = (const unsigned char *) name; *p; p++)
        if ((*p & 0xC0) != 0x80)
            chars++;
    return chars <= KH_PARTNER_NAME_MAX;
}

static void s_fill(const PGresult *res, int row, kh_partner_t *out)
{
    memset(out, 0, sizeof *out);
    snprintf(out->id, sizeof out->id, "%s", PQgetvalue(res, row, 0));
    snprintf(out->display_name, sizeof out->display_name, "%s",
             PQgetvalue(res, row, 1));
    int kind = kh_partner_kind_from_name(PQgetvalue(res, row, 2));
    out->kind = kind < 0 ? KH_PARTNER_OTHER : (kh_partner_kind_t) kind;
    out->handles_cases = strcmp(PQgetvalue(res, row, 3), "t") == 0;
    snprintf(out->public_key, sizeof out->public_key, "%s",
             PQgetvalue(res, row, 4));
    snprintf(out->created_at, sizeof out->created_at, "%s",
             PQgetvalue(res, row, 5));
    snprintf(out->revoked_at, sizeof out->revoked_at, "%s",
             PQgetvalue(res, row, 6));
    out->revoked = out->revoked_at[0] != '\0';
    snprintf(out->previous_key_until, sizeof out->previous_key_until, "%s",
             PQgetvalue(res, row, 7));
}

int kh_partner_register(PGconn *conn, const char *id, const char *display_name,
                        kh_partner_kind_t kind, bool handles_cases,
                        const char *public_key, kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_CONFIG, "id",
                            "partner id must match ^[a-z][a-z0-9-]{1,31}$");
    if (!kh_partner_display_name_valid(display_name))
        return kh_error_set(err, KH_E_CONFIG, "display_name",
                            "display name must be 1 to %d characters, "
                            "without control characters or outer spaces",
                            KH_PARTNER_NAME_MAX);
    if ((int) kind < 0 || kind >= KH_PARTNER_KIND_COUNT_)
        return kh_error_set(err, KH_E_CONFIG, "kind", "unknown partner kind");
    if (kind == KH_PARTNER_CHAIN_DIRECTOR && handles_cases)
        return kh_error_set(err, KH_E_CONFIG, "handles_cases",
                            "a chain director never handles cases");
    if (!kh_partner_key_valid(public_key))
        return kh_error_set(err, KH_E_CONFIG, "public_key",
                            "public key must be 40 characters of Z85");

    const char *params[] = {id, display_name, s_kinds[kind],
                            handles_cases ? "true" : "false", public_key};
    PGresult *res = PQexecParams(
        conn,
        "INSERT INTO partners (id, display_name, kind, handles_cases, "
        "curve_public_key) VALUES ($1, $2, $3, $4, $5)",
        5, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_COMMAND_OK) {
        PQclear(res);
        return 0;
    }
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *constraint = PQresultErrorField(res, PG_DIAG_CONSTRAINT_NAME);
    int rc;
    if (state && strcmp(state, "23505") == 0 && constraint &&
        strcmp(constraint, "partners_pkey") == 0)
        rc = kh_error_set(err, KH_E_CONFIG, "id",
                          "partner %s is already registered (a revoked"
                          " partner keeps its id: choose another)",
                          id);
    else if (state && strcmp(state, "23505") == 0)
        rc = kh_error_set(err, KH_E_CONFIG, "public_key",
                          "public key is already registered");
    else if (state && strcmp(state, "23514") == 0)
        rc = kh_error_set(err, KH_E_CONFIG, "",
                          "partner refused by constraint %s",
                          constraint ? constraint : "?");
    else if (state && strcmp(state, "22021") == 0)
        rc = kh_error_set(err, KH_E_CONFIG, "display_name",
                          "display name is not valid UTF-8");
    else
        rc = kh_db_error(err, conn, res, "cannot register partner");
    PQclear(res);
    return rc;
}

int kh_partner_list(PGconn *conn, bool include_revoked, kh_partner_list_fn *fn,
                    void *arg, kh_error_t *err)
{
    PGresult *res = PQexec(
        conn, include_revoked ? "SELECT " S_PARTNER_COLUMNS
                                " FROM partners ORDER BY id"
                              : "SELECT " S_PARTNER_COLUMNS " FROM partners "
                                "WHERE revoked_at IS NULL ORDER BY id");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot list partners");
        PQclear(res);
        return -1;
    }
    int n = PQntuples(res);
    for (int i = 0; i < n && fn; i++) {
        kh_partner_t p;
        s_fill(res, i, &p);
        fn(&p, arg);
    }
    PQclear(res);
    return n;
}

int kh_partner_revoke(PGconn *conn, const char *id, kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_NOT_FOUND, "id",
                            "no such partner (not a partner id)");
    const char *params[] = {id};
    PGresult *res =
        PQexecParams(conn,
                     "WITH target AS (SELECT id, revoked_at FROM partners "
                     "WHERE id = $1 FOR UPDATE), "
                     "revoked AS (UPDATE partners p SET revoked_at = now() "
                     "FROM target t WHERE p.id = t.id "
                     "AND t.revoked_at IS NULL RETURNING p.id) "
                     "SELECT (SELECT count(*) FROM target), "
                     "(SELECT count(*) FROM revoked)",
                     1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot revoke partner");
        PQclear(res);
        return -1;
    }
    bool found = strcmp(PQgetvalue(res, 0, 0), "0") != 0;
    bool revoked_now = strcmp(PQgetvalue(res, 0, 1), "0") != 0;
    PQclear(res);
    if (!found)
        return kh_error_set(err, KH_E_NOT_FOUND, "id",
                            "no partner %s is registered", id);
    return revoked_now ? 0 : 1;
}

/* Run one statement of a rotation, with its parameters; the result, or
 * NULL with err. */
static PGresult *s_rotate_step(PGconn *conn, const char *sql, int n,
                               const char *const *params, kh_error_t *err)
{
    PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
    ExecStatusType status = PQresultStatus(res);
    if (status == PGRES_TUPLES_OK || status == PGRES_COMMAND_OK)
        return res;
    const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (state && strcmp(state, "23505") == 0)
        kh_error_set(err, KH_E_CONFIG, "public_key",
                     "public key is already registered");
    else
        kh_db_error(err, conn, res, "cannot rotate the partner's key");
    PQclear(res);
    return NULL;
}

int kh_partner_rotate(PGconn *conn, const char *id, const char *public_key,
                      int overlap_s, char previous[KH_PARTNER_KEY_LEN + 1],
                      char expires_at[40], kh_error_t *err)
{
    previous[0] = expires_at[0] = '\0';
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_NOT_FOUND, "id",
                            "no such partner (not a partner id)");
    if (!kh_partner_key_valid(public_key))
        return kh_error_set(err, KH_E_CONFIG, "public_key",
                            "public key must be 40 characters of Z85");
    if (overlap_s < 0)
        return kh_error_set(err, KH_E_CONFIG, "overlap",
                            "the overlap cannot be negative");
    char overlap[16];
    snprintf(overlap, sizeof overlap, "%d", overlap_s);
    const char *params[] = {id, public_key, overlap};
    PGresult *res = s_rotate_step(
        conn,
        "SELECT curve_public_key, revoked_at IS NOT NULL FROM partners"
        " WHERE id = $1 FOR UPDATE",
        1, params, err);
    if (!res)
        return -1;
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, KH_E_NOT_FOUND, "id",
                            "no partner %s is registered", id);
    }
    bool revoked = strcmp(PQgetvalue(res, 0, 1), "t") == 0;
    snprintf(previous, KH_PARTNER_KEY_LEN + 1, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);
    if (revoked)
        return kh_error_set(err, KH_E_CONFIG, "id",
                            "the partner is revoked; a revoked partner gets "
                            "no new key");
    if (strcmp(previous, public_key) == 0)
        return kh_error_set(err, KH_E_CONFIG, "public_key",
                            "this is the partner's current key");
    /* One earlier key at a time: the overlap of an earlier rotation ends
     * now, as its certificate file is replaced. Then the current key gets
     * its end, and the new key becomes current (the trigger records it in
     * partner_keys). */
    res = s_rotate_step(conn,
                        "UPDATE partner_keys SET expires_at = now()"
                        " WHERE partner_id = $1 AND expires_at > now()",
                        1, params, err);
    bool ok = res != NULL;
    PQclear(res);
    if (ok) {
        const char *ends[] = {id, overlap};
        res = s_rotate_step(conn,
                            /* An overlap ends on a whole second, as the
                             * certificate's expires-at says it. */
                            "UPDATE partner_keys SET expires_at ="
                            " CASE WHEN $2::integer > 0"
                            " THEN date_trunc('second', now())"
                            " + make_interval(secs => $2::integer)"
                            " ELSE now() END"
                            " WHERE partner_id = $1 AND expires_at IS NULL"
                            " RETURNING to_char(expires_at AT TIME ZONE 'UTC',"
                            " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
                            2, ends, err);
        ok = res != NULL;
        if (ok && PQntuples(res) == 1)
            snprintf(expires_at, 40, "%s", PQgetvalue(res, 0, 0));
        PQclear(res);
    }
    if (ok) {
        res = s_rotate_step(
            conn, "UPDATE partners SET curve_public_key = $2 WHERE id = $1", 2,
            params, err);
        ok = res != NULL;
        PQclear(res);
    }
    return ok ? 0 : -1;
}

static int s_lookup(PGconn *conn, const char *sql, const char *value,
                    kh_partner_t *out, kh_errcode_t missing, const char *path,
                    kh_error_t *err)
{
    const char *params[] = {value};
    PGresult *res = PQexecParams(conn, sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot look up partner");
        PQclear(res);
        return -1;
    }
    if (PQntuples(res) != 1) {
        PQclear(res);
        return kh_error_set(err, missing, path, "no partner has this %s", path);
    }
    s_fill(res, 0, out);
    PQclear(res);
    return 0;
}

int kh_partner_lookup_key(PGconn *conn, const char *public_key,
                          kh_partner_t *out, kh_error_t *err)
{
    if (!kh_partner_key_valid(public_key))
        return kh_error_set(err, KH_E_UNKNOWN_PARTNER, "public_key",
                            "not a CURVE public key");
    return s_lookup(conn,
                    "SELECT " S_PARTNER_COLUMNS
                    " FROM partners WHERE id = (SELECT partner_id"
                    " FROM partner_keys WHERE curve_public_key = $1)",
                    public_key, out, KH_E_UNKNOWN_PARTNER, "public_key", err);
}

int kh_partner_get(PGconn *conn, const char *id, kh_partner_t *out,
                   kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_NOT_FOUND, "id",
                            "no such partner (not a partner id)");
    return s_lookup(conn,
                    "SELECT " S_PARTNER_COLUMNS " FROM partners WHERE id = $1",
                    id, out, KH_E_NOT_FOUND, "id", err);
}

zcert_t *kh_partner_cert_new(const char *id, kh_error_t *err)
{
    if (!kh_partner_id_valid(id)) {
        kh_error_set(err, KH_E_CONFIG, "id",
                     "partner id must match ^[a-z][a-z0-9-]{1,31}$");
        return NULL;
    }
    if (!zsys_has_curve()) {
        kh_error_set(err, KH_E_CURVE, NULL, "libzmq has no CURVE support");
        return NULL;
    }
    zcert_t *cert = zcert_new();
    if (!cert || !kh_partner_key_valid(zcert_public_txt(cert))) {
        zcert_destroy(&cert);
        kh_error_set(err, KH_E_CURVE, NULL, "cannot make a CURVE key pair");
        return NULL;
    }
    zcert_set_meta(cert, "partner-id", "%s", id);
    return cert;
}

/* A certificate of public key alone (Z85; no secret), with metadata
 * partner-id = id; NULL when key is not a CURVE public key. */
static zcert_t *s_public_cert(const char *key, const char *id)
{
    uint8_t bytes[32];
    zcert_t *cert = kh_partner_key_valid(key) && zmq_z85_decode(bytes, key)
                        ? zcert_new_from(bytes, (const uint8_t[32]){0})
                        : NULL;
    if (cert)
        zcert_set_meta(cert, "partner-id", "%s", id);
    return cert;
}

zcert_t *kh_partner_cert_load_public(const char *path, const char *id,
                                     kh_error_t *err)
{
    if (!kh_partner_id_valid(id)) {
        kh_error_set(err, KH_E_CONFIG, "id",
                     "partner id must match ^[a-z][a-z0-9-]{1,31}$");
        return NULL;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        kh_error_set(err, KH_E_CONFIG, path, "cannot read the certificate: %s",
                     strerror(errno));
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        kh_error_set(err, KH_E_CONFIG, path, "not a file");
        return NULL;
    }
    if (st.st_size > 64 * 1024) {
        kh_error_set(err, KH_E_CONFIG, path,
                     "too large for a certificate (over 64 KiB)");
        return NULL;
    }
    /* Read as a ZPL file, not with zcert_load, which takes the secret key
     * from a file beside it: only what this file holds counts. */
    zconfig_t *given = zconfig_load(path);
    const char *key =
        given ? zconfig_get(given, "curve/public-key", NULL) : NULL;
    const char *secret =
        given ? zconfig_get(given, "curve/secret-key", NULL) : NULL;
    const char *role = given ? zconfig_get(given, "metadata/role", NULL) : NULL;
    zcert_t *cert = NULL;
    if (!kh_partner_key_valid(key))
        kh_error_set(err, KH_E_CONFIG, path,
                     "not a CURVE public certificate (a ZPL file with "
                     "curve/public-key)");
    else if (secret)
        /* The secret half stays with the partner: a file that holds it
         * went through hands it should not have. */
        kh_error_set(err, KH_E_CONFIG, path,
                     "the file holds a secret key; take only the public "
                     "certificate, and have the partner make a new pair");
    else if (role && strcmp(role, "hub") == 0)
        /* hub keygen marks hub.cert so: a partner registered with the
         * hub's own key could never connect, and whoever holds the hub's
         * secret would be that partner. */
        kh_error_set(err, KH_E_CONFIG, path,
                     "the file is the hub's certificate (hub.cert), not a "
                     "partner's");
    else if (!(cert = s_public_cert(key, id)))
        kh_error_set(err, KH_E_CURVE, path, "cannot use the key");
    zconfig_destroy(&given);
    return cert;
}

/* Create dir (one level) with mode if it does not exist; it must then be
 * a directory. */
static int s_ensure_dir(const char *dir, mode_t mode, kh_error_t *err)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (errno != ENOENT || mkdir(dir, mode) != 0)
            return kh_error_set(err, KH_E_IO, dir,
                                "cannot create directory: %s", strerror(errno));
        return 0;
    }
    if (!S_ISDIR(st.st_mode))
        return kh_error_set(err, KH_E_IO, dir, "not a directory");
    return 0;
}

/* cert_dir must be a directory that is there (KH_E_CONFIG otherwise): a
 * mistyped one would put files where the ZAP handler never looks, or
 * remove none from where it does. */
static int s_cert_dir_check(const char *cert_dir, kh_error_t *err)
{
    struct stat st;
    if (stat(cert_dir, &st) != 0)
        return kh_error_set(err, KH_E_CONFIG, cert_dir,
                            "cannot use the certificate directory: %s",
                            strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return kh_error_set(err, KH_E_CONFIG, cert_dir, "not a directory");
    return 0;
}

/* path = dir/id suffix; zcert truncates names at 255 bytes, so refuse
 * anything that long. */
static int s_cert_path(char *path, size_t size, const char *dir, const char *id,
                       const char *suffix, kh_error_t *err)
{
    int n = snprintf(path, size, "%s/%s%s", dir, id, suffix);
    if (n < 0 || (size_t) n >= size || n > 240)
        return kh_error_set(err, KH_E_CONFIG, dir,
                            "certificate directory path is too long");
    return 0;
}

/* Remove path if it is the file other is (a link made to it), not one
 * that someone else put there. */
static void s_unlink_same(const char *path, const char *other)
{
    struct stat a, b;
    if (lstat(path, &a) == 0 && lstat(other, &b) == 0 && a.st_dev == b.st_dev &&
        a.st_ino == b.st_ino)
        unlink(path);
}

int kh_partner_sync_path(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    int rc = fsync(fd);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

bool kh_partner_cert_holds(const char *path, zcert_t *cert, bool secret)
{
    zconfig_t *root = zconfig_load(path);
    const char *pub = root ? zconfig_get(root, "curve/public-key", NULL) : NULL;
    const char *sec = root ? zconfig_get(root, "curve/secret-key", NULL) : NULL;
    bool holds = pub && strcmp(pub, zcert_public_txt(cert)) == 0 &&
                 (!secret || (sec && strcmp(sec, zcert_secret_txt(cert)) == 0));
    zconfig_destroy(&root);
    return holds;
}

/* The public certificate just written at path checked (s_cert_holds) and
 * synced, before it is put in place: 0, or -1 with err. */
static int s_cert_written(const char *path, zcert_t *cert, kh_error_t *err)
{
    if (!kh_partner_cert_holds(path, cert, false))
        return kh_error_set(err, KH_E_IO, path,
                            "the certificate written does not read back "
                            "(is the disk full?)");
    if (kh_partner_sync_path(path) != 0)
        return kh_error_set(err, KH_E_IO, path,
                            "cannot write public certificate: %s",
                            strerror(errno));
    return 0;
}

/* Write the public half of cert at temp (a name of its own, replaced if
 * there), read back and synced: 0, or -1 with err (naming the file named)
 * and nothing left at temp. */
static int s_save_public(zcert_t *cert, const char *temp, const char *named,
                         kh_error_t *err)
{
    unlink(temp);
    if (zcert_save_public(cert, temp) != 0) {
        unlink(temp);
        return kh_error_set(err, KH_E_IO, named,
                            "cannot write public certificate");
    }
    if (s_cert_written(temp, cert, err) != 0) {
        unlink(temp);
        return -1;
    }
    return 0;
}

int kh_partner_cert_install(zcert_t *cert, const char *id, const char *cert_dir,
                            kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_CONFIG, "id", "bad partner id");
    char final[PATH_MAX], temp[PATH_MAX], name[64];
    if (s_cert_path(final, sizeof final, cert_dir, id, ".cert", err) != 0)
        return -1;
    /* A hidden name: zauth's directory scan skips dot files. */
    snprintf(name, sizeof name, ".%s.cert.%ld.tmp", id, (long) getpid());
    if (s_cert_path(temp, sizeof temp, cert_dir, name, "", err) != 0)
        return -1;
    if (s_ensure_dir(cert_dir, 0755, err) != 0)
        return -1;
    if (access(final, F_OK) == 0) {
        /* The same key already in place (out dir = cert dir) is fine. */
        zcert_t *present = zcert_load(final);
        bool same = present && strcmp(zcert_public_txt(present),
                                      zcert_public_txt(cert)) == 0;
        zcert_destroy(&present);
        if (same)
            return 1;
        return kh_error_set(err, KH_E_CONFIG, final,
                            "a certificate for this partner already exists");
    }
    if (s_save_public(cert, temp, temp, err) != 0)
        return -1;
    chmod(temp, 0644);
    /* link() refuses to replace a file that appeared meanwhile. */
    if (link(temp, final) != 0) {
        int e = errno;
        unlink(temp);
        return kh_error_set(err, e == EEXIST ? KH_E_CONFIG : KH_E_IO, final,
                            "cannot install public certificate: %s",
                            strerror(e));
    }
    unlink(temp);
    if (kh_partner_sync_path(cert_dir) != 0) {
        int e = errno;
        unlink(final);
        return kh_error_set(err, KH_E_IO, cert_dir,
                            "cannot install public certificate: %s",
                            strerror(e));
    }
    return 0;
}

int kh_partner_cert_export(zcert_t *cert, const char *id, const char *out_dir,
                           kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_CONFIG, "id", "bad partner id");
    char pub[PATH_MAX], secret[PATH_MAX], dir[PATH_MAX], tpub[PATH_MAX + 32],
        tsecret[PATH_MAX + 32];
    if (s_cert_path(pub, sizeof pub, out_dir, id, ".cert", err) != 0 ||
        s_cert_path(secret, sizeof secret, out_dir, id, ".cert_secret", err) !=
            0 ||
        s_cert_path(dir, sizeof dir, out_dir, ".export-XXXXXX", "", err) != 0)
        return -1;
    if (s_ensure_dir(out_dir, 0700, err) != 0)
        return -1;
    /* Named as it is there: a partner who finds only NAME.cert named
     * must not go looking for a secret file. */
    struct stat st;
    const char *existing = lstat(secret, &st) == 0 ? secret
                           : lstat(pub, &st) == 0  ? pub
                                                   : NULL;
    if (existing)
        return kh_error_set(err, KH_E_CONFIG, existing,
                            "refusing to overwrite an existing certificate");
    /* Written in a directory of its own (mode 0700), then linked into
     * place: zcert_save opens the names it is given as they are, and in an
     * --out others may write to, a symbolic link planted at the secret's
     * name after the look above would have it written where the link
     * points. link() makes no file through a link, and refuses a name
     * that exists. A process killed meanwhile leaves that directory
     * (.export-XXXXXX, the secret in it) behind, for whoever runs it to
     * remove. */
    if (!mkdtemp(dir))
        return kh_error_set(err, KH_E_IO, out_dir,
                            "cannot write partner certificate: %s",
                            strerror(errno));
    snprintf(tpub, sizeof tpub, "%s/key.cert", dir);
    snprintf(tsecret, sizeof tsecret, "%s/key.cert_secret", dir);
    int rc = 0;
    /* zcert_save writes pub, then secret with a private umask. */
    if (zcert_save(cert, tpub) != 0 || chmod(tsecret, 0600) != 0)
        rc = kh_error_set(err, KH_E_IO, out_dir,
                          "cannot write partner certificate: %s",
                          strerror(errno));
    if (rc == 0)
        rc = s_cert_written(tpub, cert, err);
    if (rc == 0 && (!kh_partner_cert_holds(tsecret, cert, true) ||
                    kh_partner_sync_path(tsecret) != 0))
        rc = kh_error_set(err, KH_E_IO, secret,
                          "the secret certificate written does not read "
                          "back (is the disk full?)");
    if (rc == 0 && link(tsecret, secret) != 0)
        rc = kh_error_set(err, errno == EEXIST ? KH_E_CONFIG : KH_E_IO, secret,
                          "cannot write secret certificate: %s",
                          strerror(errno));
    else if (rc == 0 && link(tpub, pub) != 0)
        rc = kh_error_set(err, errno == EEXIST ? KH_E_CONFIG : KH_E_IO, pub,
                          "cannot write public certificate: %s",
                          strerror(errno));
    else if (rc == 0 && kh_partner_sync_path(out_dir) != 0)
        rc = kh_error_set(err, KH_E_IO, out_dir,
                          "cannot write partner certificate: %s",
                          strerror(errno));
    if (rc != 0) { /* the names linked to this pair go, and only those */
        s_unlink_same(secret, tsecret);
        s_unlink_same(pub, tpub);
    }
    unlink(tpub);
    unlink(tsecret);
    rmdir(dir);
    return rc;
}

/* The file of a rotation in cert_dir: its name (id + suffix) and the
 * hidden one that keeps what it replaced until the rotation ends. */
typedef struct {
    char path[PATH_MAX];
    char kept[PATH_MAX];
} s_rotated_t;

/* The two files of partner id's rotation in cert_dir into files; a bad
 * id is refused (KH_E_CONFIG) before any path is made of it. */
static int s_rotated_paths(s_rotated_t *files, const char *id,
                           const char *cert_dir, kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_CONFIG, "id", "bad partner id");
    static const char *const suffixes[2] = {".cert", ".previous.cert"};
    for (int i = 0; i < 2; i++) {
        char hidden[64];
        snprintf(hidden, sizeof hidden, ".%s%s.kept", id, suffixes[i]);
        if (s_cert_path(files[i].path, sizeof files[i].path, cert_dir, id,
                        suffixes[i], err) != 0 ||
            s_cert_path(files[i].kept, sizeof files[i].kept, cert_dir, hidden,
                        "", err) != 0)
            return -1;
    }
    return 0;
}

/* Write cert's public half to path through a hidden temporary file
 * renamed over it, so that the directory never lacks the file. */
static int s_cert_replace(zcert_t *cert, const char *path, kh_error_t *err)
{
    char temp[PATH_MAX];
    const char *slash = strrchr(path, '/');
    int n = snprintf(temp, sizeof temp, "%.*s/.%s.%ld.tmp",
                     (int) (slash - path), path, slash + 1, (long) getpid());
    if (n < 0 || (size_t) n >= sizeof temp)
        return kh_error_set(err, KH_E_CONFIG, path,
                            "certificate directory path is too long");
    if (s_save_public(cert, temp, path, err) != 0)
        return -1;
    if (chmod(temp, 0644) != 0 || rename(temp, path) != 0) {
        int e = errno;
        unlink(temp);
        return kh_error_set(err, KH_E_IO, path,
                            "cannot write public certificate: %s", strerror(e));
    }
    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%.*s", (int) (slash - path), path);
    if (kh_partner_sync_path(dir) != 0)
        return kh_error_set(err, KH_E_IO, dir,
                            "cannot write public certificate: %s",
                            strerror(errno));
    return 0;
}

/* Write previous_key as <id>.previous.cert, with expires-at when
 * expires_at is not NULL. */
static int s_previous_write(const char *path, const char *id,
                            const char *previous_key, const char *expires_at,
                            kh_error_t *err)
{
    zcert_t *old = s_public_cert(previous_key, id);
    if (!old)
        return kh_error_set(err, KH_E_CONFIG, "previous_key",
                            "not a CURVE public key");
    if (expires_at)
        zcert_set_meta(old, "expires-at", "%s", expires_at);
    int rc = s_cert_replace(old, path, err);
    zcert_destroy(&old);
    return rc;
}

int kh_partner_cert_lock(const char *id, const char *cert_dir, kh_error_t *err)
{
    if (!kh_partner_id_valid(id))
        return kh_error_set(err, KH_E_CONFIG, "id", "bad partner id");
    char path[PATH_MAX], name[64];
    snprintf(name, sizeof name, ".%s.lock", id);
    if (s_cert_path(path, sizeof path, cert_dir, name, "", err) != 0)
        return -1;
    if (s_cert_dir_check(cert_dir, err) != 0)
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0)
        return kh_error_set(err, KH_E_IO, path,
                            "cannot open the partner's lock file: %s",
                            strerror(errno));
    while (flock(fd, LOCK_EX) != 0)
        if (errno != EINTR) {
            int e = errno;
            close(fd);
            return kh_error_set(err, KH_E_IO, path,
                                "cannot lock the partner's files: %s",
                                strerror(e));
        }
    return fd;
}

void kh_partner_cert_unlock(int *lock_p)
{
    if (lock_p && *lock_p >= 0) {
        close(*lock_p); /* and the lock with it */
        *lock_p = -1;
    }
}

/* Put back what a rotation's files replaced (its kept copies), and
 * remove those that were not there before. */
static void s_rotate_restore(const s_rotated_t files[2])
{
    for (int i = 0; i < 2; i++)
        if (rename(files[i].kept, files[i].path) != 0 && errno == ENOENT)
            unlink(files[i].path); /* it was not there before */
}

/* The paths of partner id's files in cert_dir (a directory) into files,
 * and a hidden copy of each that is there (in place of an older copy),
 * which s_rotate_restore puts back. */
static int s_keep_copies(s_rotated_t files[2], const char *id,
                         const char *cert_dir, kh_error_t *err)
{
    if (s_rotated_paths(files, id, cert_dir, err) != 0 ||
        s_cert_dir_check(cert_dir, err) != 0)
        return -1;
    for (int i = 0; i < 2; i++) {
        unlink(files[i].kept);
        if (link(files[i].path, files[i].kept) != 0 && errno != ENOENT)
            return kh_error_set(err, KH_E_IO, files[i].kept,
                                "cannot keep a copy of the certificate: %s",
                                strerror(errno));
    }
    return 0;
}

int kh_partner_cert_remove(const char *id, const char *cert_dir,
                           kh_error_t *err)
{
    /* Hidden copies first, as a rotation keeps them (what a rotation cut
     * short kept goes: no key admits the partner after this), then the key
     * before the current one: while a rotation's overlap lasts, it admits
     * the partner too. */
    s_rotated_t files[2];
    if (s_keep_copies(files, id, cert_dir, err) != 0)
        return -1;
    if (unlink(files[1].path) != 0 && errno != ENOENT) {
        int e = errno;
        s_rotate_restore(files);
        return kh_error_set(err, KH_E_IO, files[1].path,
                            "cannot remove public certificate: %s",
                            strerror(e));
    }
    int rc = unlink(files[0].path) == 0 ? 0 : errno == ENOENT ? 1 : -1;
    if (rc < 0) {
        int e = errno;
        s_rotate_restore(files);
        return kh_error_set(err, KH_E_IO, files[0].path,
                            "cannot remove public certificate: %s",
                            strerror(e));
    }
    return rc;
}

void kh_partner_cert_remove_end(const char *id, const char *cert_dir,
                                bool put_back)
{
    s_rotated_t files[2];
    kh_error_t err;
    if (s_rotated_paths(files, id, cert_dir, &err) != 0)
        return;
    if (put_back)
        s_rotate_restore(files);
    else
        for (int i = 0; i < 2; i++)
            unlink(files[i].kept);
}

int kh_partner_cert_forget_kept(const char *id, const char *cert_dir,
                                kh_error_t *err)
{
    s_rotated_t files[2];
    if (s_rotated_paths(files, id, cert_dir, err) != 0)
        return -1;
    int removed = 0;
    for (int i = 0; i < 2; i++) {
        if (unlink(files[i].kept) == 0)
            removed++;
        else if (errno != ENOENT)
            return kh_error_set(err, KH_E_IO, files[i].kept,
                                "cannot remove the copy a rotation kept: %s",
                                strerror(errno));
    }
    return removed;
}

int kh_partner_cert_rotate(zcert_t *cert, const char *id,
                           const char *previous_key, const char *cert_dir,
                           kh_error_t *err)
{
    s_rotated_t files[2];
    if (s_keep_copies(files, id, cert_dir, err) != 0)
        return -1;
    /* Until the commit the registry's current key is previous_key: it
     * admits the partner without an end, whatever happens to this
     * process before the rotation ends. It goes into <id>.previous.cert
     * before the new key replaces it in <id>.cert, so that a rotation cut
     * short between the two leaves it in a file the handshake reads, not
     * only in a kept copy, which it does not. */
    int rc = s_previous_write(files[1].path, id, previous_key, NULL, err);
    if (rc == 0)
        rc = s_cert_replace(cert, files[0].path, err);
    if (rc != 0)
        s_rotate_restore(files);
    return rc;
}

int kh_partner_cert_rotate_end(const char *id, const char *cert_dir,
                               bool committed, const char *previous_key,
                               const char *expires_at, kh_error_t *err)
{
    s_rotated_t files[2];
    if (s_rotated_paths(files, id, cert_dir, err) != 0)
        return -1;
    if (!committed) {
        s_rotate_restore(files);
        return 0;
    }
    int rc = 0;
    if (!previous_key)
        ; /* the outcome is unknown: both keys stay admitted */
    else if (expires_at)
        rc = s_previous_write(files[1].path, id, previous_key, expires_at, err);
    else if (unlink(files[1].path) != 0 && errno != ENOENT)
        rc = kh_error_set(err, KH_E_IO, files[1].path,
                          "cannot remove the certificate of the key before: "
                          "%s",
                          strerror(errno));
    for (int i = 0; i < 2; i++)
        unlink(files[i].kept);
    return rc;
}
