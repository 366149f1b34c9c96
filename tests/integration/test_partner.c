/*
 * Integration tests of the partner registry (common/partner.c) and of
 * `ketenhubctl partner` / `hub keygen` / `migrate`, run as the built binary
 * against the throwaway test cluster. One test also proves the certificate
 * files work as they are meant to: zauth admits a partner whose public
 * certificate is in the directory and refuses it once revoked.
 */
#include <czmq.h>
#include <dirent.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ketenhub/db.h"
#include "ketenhub/partner.h"
#include "khproc.h"
#include "khtest.h"

#define DB "kh_test_partner"

/* A fresh random CURVE public key (Z85). */
static void s_new_key(char key[KH_PARTNER_KEY_LEN + 1])
{
    zcert_t *cert = zcert_new();
    ck_assert_ptr_nonnull(cert);
    snprintf(key, KH_PARTNER_KEY_LEN + 1, "%s", zcert_public_txt(cert));
    zcert_destroy(&cert);
}

static int s_count_listed(PGconn *conn, bool include_revoked)
{
    kh_error_t err;
    int n = kh_partner_list(conn, include_revoked, NULL, NULL, &err);
    ck_assert_int_ge(n, 0);
    return n;
}

static void s_collect(const kh_partner_t *p, void *arg)
{
    char *ids = arg;
    strcat(ids, p->id);
    strcat(ids, ",");
}

START_TEST(test_register_lookup_revoke)
{
    PGconn *conn = khtest_db_fresh(DB);
    kh_error_t err;
    kh_error_clear(&err);
    char key[41], key2[41];
    s_new_key(key);
    s_new_key(key2);
    ck_assert_int_eq(
        kh_partner_register(conn, "vt-gv", "Veilig Thuis Gooi en Vechtstreek",
                            KH_PARTNER_VEILIG_THUIS, true, key, &err),
        0);
    ck_assert_int_eq(kh_partner_register(conn, "avim", "Politie AVIM",
                                         KH_PARTNER_POLICE, true, key2, &err),
                     0);

    kh_partner_t p;
    ck_assert_int_eq(kh_partner_lookup_key(conn, key, &p, &err), 0);
    ck_assert_str_eq(p.id, "vt-gv");
    ck_assert_str_eq(p.display_name, "Veilig Thuis Gooi en Vechtstreek");
    ck_assert_int_eq(p.kind, KH_PARTNER_VEILIG_THUIS);
    ck_assert(p.handles_cases);
    ck_assert(!p.revoked);
    ck_assert_str_eq(p.public_key, key);
    ck_assert_int_eq((int) strlen(p.created_at), 20);

    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, key2);
    ck_assert_int_eq(p.kind, KH_PARTNER_POLICE);

    char ids[256] = "";
    ck_assert_int_eq(kh_partner_list(conn, true, s_collect, ids, &err), 2);
    ck_assert_str_eq(ids, "avim,vt-gv,");

    /* Revoke: now, then again (already), unknown. */
    ck_assert_int_eq(kh_partner_revoke(conn, "vt-gv", &err), 0);
    ck_assert_int_eq(kh_partner_revoke(conn, "vt-gv", &err), 1);
    ck_assert_int_eq(kh_partner_revoke(conn, "nobody", &err), -1);
    ck_assert_int_eq(err.code, KH_E_NOT_FOUND);

    ck_assert_int_eq(kh_partner_lookup_key(conn, key, &p, &err), 0);
    ck_assert(p.revoked);
    ck_assert_int_eq((int) strlen(p.revoked_at), 20);
    ck_assert_int_eq(s_count_listed(conn, true), 2);
    ck_assert_int_eq(s_count_listed(conn, false), 1);

    /* A key nobody has, and a string that is no key at all. */
    char other[41];
    s_new_key(other);
    ck_assert_int_eq(kh_partner_lookup_key(conn, other, &p, &err), -1);
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
    ck_assert_int_eq(kh_partner_lookup_key(conn, "short", &p, &err), -1);
    ck_assert_int_eq(err.code, KH_E_UNKNOWN_PARTNER);
    ck_assert_int_eq(kh_partner_get(conn, "nobody", &p, &err), -1);
    ck_assert_int_eq(err.code, KH_E_NOT_FOUND);
    PQfinish(conn);
}
END_TEST

START_TEST(test_duplicates_refused)
{
    PGconn *conn = khtest_db_fresh(DB);
    kh_error_t err;
    kh_error_clear(&err);
    char key[41], key2[41];
    s_new_key(key);
    s_new_key(key2);
    ck_assert_int_eq(kh_partner_register(conn, "zc-gv", "Zorgcoordinator",
                                         KH_PARTNER_ZORGCOORDINATOR, true, key,
                                         &err),
                     0);
    /* Same id, another key. */
    ck_assert_int_eq(kh_partner_register(conn, "zc-gv", "Another",
                                         KH_PARTNER_OTHER, true, key2, &err),
                     -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, "id");
    /* Same key, another id. */
    ck_assert_int_eq(kh_partner_register(conn, "zc-other", "Another",
                                         KH_PARTNER_OTHER, true, key, &err),
                     -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, "public_key");
    ck_assert_ptr_null(strstr(err.message, key));
    /* A revoked partner's id and key stay taken. */
    ck_assert_int_eq(kh_partner_revoke(conn, "zc-gv", &err), 0);
    ck_assert_int_eq(kh_partner_register(conn, "zc-new", "New",
                                         KH_PARTNER_OTHER, true, key, &err),
                     -1);
    ck_assert_str_eq(err.path, "public_key");
    ck_assert_int_eq(s_count_listed(conn, true), 1);
    PQfinish(conn);
}
END_TEST

START_TEST(test_chain_director_never_handles_cases)
{
    PGconn *conn = khtest_db_fresh(DB);
    kh_error_t err;
    kh_error_clear(&err);
    char key[41];
    s_new_key(key);
    ck_assert_int_eq(kh_partner_register(conn, "ketenregie", "Ketenregisseur",
                                         KH_PARTNER_CHAIN_DIRECTOR, true, key,
                                         &err),
                     -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, "handles_cases");
    ck_assert_int_eq(kh_partner_register(conn, "ketenregie", "Ketenregisseur",
                                         KH_PARTNER_CHAIN_DIRECTOR, false, key,
                                         &err),
                     0);
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "ketenregie", &p, &err), 0);
    ck_assert(!p.handles_cases);
    ck_assert_int_eq(p.kind, KH_PARTNER_CHAIN_DIRECTOR);

    /* The database refuses it too, whoever writes. */
    ck_assert_int_eq(kh_db_exec(conn,
                                "UPDATE partners SET handles_cases = true "
                                "WHERE id = 'ketenregie'",
                                &err),
                     -1);
    ck_assert_ptr_nonnull(
        strstr(err.message, "partners_chain_director_no_cases"));
    char key2[41];
    s_new_key(key2);
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO partners (id, display_name, kind, handles_cases, "
             "curve_public_key) VALUES ('kr-two', 'K', 'chain_director', "
             "true, '%s')",
             key2);
    ck_assert_int_eq(kh_db_exec(conn, sql, &err), -1);
    ck_assert_int_eq(err.code, KH_E_DB);
    /* Its default (true) does not slip through either. */
    snprintf(sql, sizeof sql,
             "INSERT INTO partners (id, display_name, kind, curve_public_key) "
             "VALUES ('kr-two', 'K', 'chain_director', '%s')",
             key2);
    ck_assert_int_eq(kh_db_exec(conn, sql, &err), -1);
    PQfinish(conn);
}
END_TEST

START_TEST(test_bad_input_refused)
{
    PGconn *conn = khtest_db_fresh(DB);
    kh_error_t err;
    kh_error_clear(&err);
    char key[41];
    s_new_key(key);
    static const char *const bad_ids[] = {"",
                                          "a",
                                          "Upper",
                                          "9lives",
                                          "has_underscore",
                                          "has space",
                                          "x123456789012345678901234567890123",
                                          "-dash"};
    for (size_t i = 0; i < sizeof bad_ids / sizeof bad_ids[0]; i++) {
        ck_assert_msg(kh_partner_register(conn, bad_ids[i], "Name",
                                          KH_PARTNER_OTHER, true, key,
                                          &err) == -1,
                      "id '%s' accepted", bad_ids[i]);
        ck_assert_str_eq(err.path, "id");
    }
    static const char *const bad_names[] = {
        "",          " leading", "trailing ",        "tab\there",
        "new\nline", "del \x7f", "c1 \xc2\x85 next", "bad \xff byte"};
    for (size_t i = 0; i < sizeof bad_names / sizeof bad_names[0]; i++) {
        ck_assert_int_eq(kh_partner_register(conn, "ok-id", bad_names[i],
                                             KH_PARTNER_OTHER, true, key, &err),
                         -1);
        ck_assert_str_eq(err.path, "display_name");
    }
    char long_name[200];
    memset(long_name, 'n', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    ck_assert_int_eq(kh_partner_register(conn, "ok-id", long_name,
                                         KH_PARTNER_OTHER, true, key, &err),
                     -1);
    /* Non-ASCII names are fine. */
    ck_assert_int_eq(kh_partner_register(conn, "ggd",
                                         "GGD Gooi & Vechtstreek "
                                         "co\xc3\xb6rdinatie",
                                         KH_PARTNER_MUNICIPALITY, true, key,
                                         &err),
                     0);

    char other[41];
    s_new_key(other);
    ck_assert_int_eq(kh_partner_register(conn, "ok-id", "Name",
                                         (kh_partner_kind_t) 99, true, other,
                                         &err),
                     -1);
    ck_assert_str_eq(err.path, "kind");
    static const char *const bad_keys[] = {
        "", "short", "0000000000000000000000000000000000000000",
        "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf~",
        "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7x"};
    for (size_t i = 0; i < sizeof bad_keys / sizeof bad_keys[0]; i++) {
        ck_assert_int_eq(kh_partner_register(conn, "ok-id", "Name",
                                             KH_PARTNER_OTHER, true,
                                             bad_keys[i], &err),
                         -1);
        ck_assert_str_eq(err.path, "public_key");
    }
    ck_assert_int_eq(s_count_listed(conn, true), 1);

    ck_assert_int_eq(kh_partner_kind_from_name("chain_director"),
                     KH_PARTNER_CHAIN_DIRECTOR);
    ck_assert_int_eq(kh_partner_kind_from_name("ketenregisseur"), -1);
    for (int k = 0; k < KH_PARTNER_KIND_COUNT_; k++)
        ck_assert_int_eq(kh_partner_kind_from_name(
                             kh_partner_kind_name((kh_partner_kind_t) k)),
                         k);
    PQfinish(conn);
}
END_TEST

/* Whether a client with cert can deliver a message to a CURVE server that
 * zauth guards with the given certificate directory. */
static bool s_zauth_admits(const char *cert_dir, zcert_t *client_cert)
{
    zactor_t *auth = zactor_new(zauth, NULL);
    ck_assert_ptr_nonnull(auth);
    zstr_sendx(auth, "CURVE", cert_dir, NULL);
    zsock_wait(auth);

    zcert_t *hub = zcert_new();
    zsock_t *server = zsock_new(ZMQ_PULL);
    zcert_apply(hub, server);
    zsock_set_curve_server(server, 1);
    zsock_set_rcvtimeo(server, 1500);
    int port = zsock_bind(server, "tcp://127.0.0.1:*");
    ck_assert_int_gt(port, 0);

    zsock_t *client = zsock_new(ZMQ_PUSH);
    zcert_apply(client_cert, client);
    zsock_set_curve_serverkey(client, zcert_public_txt(hub));
    zsock_set_linger(client, 0);
    ck_assert_int_eq(zsock_connect(client, "tcp://127.0.0.1:%d", port), 0);
    zstr_send(client, "hello");
    char *got = zstr_recv(server);
    bool admitted = got && strcmp(got, "hello") == 0;
    zstr_free(&got);

    zsock_destroy(&client);
    zsock_destroy(&server);
    zcert_destroy(&hub);
    zactor_destroy(&auth);
    return admitted;
}

START_TEST(test_cert_files)
{
    char *cert_dir = khtest_tmpdir();
    char *out = khtest_tmpdir();
    char out_sub[1024];
    snprintf(out_sub, sizeof out_sub, "%s/for-partner", out);
    kh_error_t err;
    kh_error_clear(&err);

    zcert_t *cert = kh_partner_cert_new("vt-gv", &err);
    ck_assert_ptr_nonnull(cert);
    ck_assert_str_eq(zcert_meta(cert, "partner-id"), "vt-gv");
    ck_assert(kh_partner_key_valid(zcert_public_txt(cert)));
    ck_assert_int_eq(kh_partner_cert_install(cert, "vt-gv", cert_dir, &err), 0);
    ck_assert_int_eq(kh_partner_cert_export(cert, "vt-gv", out_sub, &err), 0);

    /* The hub's copy holds the public key only, with the partner id. */
    char path[4096];
    snprintf(path, sizeof path, "%s/vt-gv.cert", cert_dir);
    zcert_t *pub = zcert_load(path);
    ck_assert_ptr_nonnull(pub);
    ck_assert_str_eq(zcert_public_txt(pub), zcert_public_txt(cert));
    ck_assert_str_eq(zcert_secret_txt(pub),
                     "0000000000000000000000000000000000000000");
    ck_assert_str_eq(zcert_meta(pub, "partner-id"), "vt-gv");
    zcert_destroy(&pub);
    snprintf(path, sizeof path, "%s/vt-gv.cert_secret", cert_dir);
    ck_assert_int_ne(access(path, F_OK), 0);

    /* The partner's copy has both halves; the secret is private. */
    snprintf(path, sizeof path, "%s/vt-gv.cert_secret", out_sub);
    struct stat st;
    ck_assert_int_eq(stat(path, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    ck_assert_int_eq(stat(out_sub, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0700);
    snprintf(path, sizeof path, "%s/vt-gv.cert", out_sub);
    zcert_t *full = zcert_load(path);
    ck_assert_ptr_nonnull(full);
    ck_assert(zcert_eq(full, cert));

    /* Neither copy is overwritten by another key; installing the same
     * key again changes nothing. */
    zcert_t *imposter = kh_partner_cert_new("vt-gv", &err);
    ck_assert_ptr_nonnull(imposter);
    ck_assert_int_eq(kh_partner_cert_install(imposter, "vt-gv", cert_dir, &err),
                     -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    zcert_destroy(&imposter);
    ck_assert_int_eq(kh_partner_cert_install(cert, "vt-gv", cert_dir, &err), 1);
    ck_assert_int_eq(kh_partner_cert_export(cert, "vt-gv", out_sub, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    /* The refusal names the file that is there, not one that is not. */
    snprintf(path, sizeof path, "%s/vt-gv.cert_secret", out_sub);
    ck_assert_int_eq(unlink(path), 0);
    ck_assert_int_eq(kh_partner_cert_export(cert, "vt-gv", out_sub, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    snprintf(path, sizeof path, "%s/vt-gv.cert", out_sub);
    ck_assert_str_eq(err.path, path);
    /* A symbolic link is a file there too, even one to nothing: the
     * secret is never written through it to where it points. */
    ck_assert_int_eq(unlink(path), 0);
    char target[4096], secret_path[4096];
    snprintf(target, sizeof target, "%s/elsewhere", out);
    snprintf(secret_path, sizeof secret_path, "%s/vt-gv.cert_secret", out_sub);
    ck_assert_int_eq(symlink(target, secret_path), 0);
    ck_assert_int_eq(kh_partner_cert_export(cert, "vt-gv", out_sub, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    ck_assert_str_eq(err.path, secret_path);
    ck_assert_msg(access(target, F_OK) != 0, "the secret went through a link");
    ck_assert_int_eq(unlink(secret_path), 0);

    /* zauth admits the partner's key, and refuses it once removed. */
    ck_assert(s_zauth_admits(cert_dir, full));
    ck_assert_int_eq(kh_partner_cert_remove("vt-gv", cert_dir, &err), 0);
    ck_assert_int_eq(kh_partner_cert_remove("vt-gv", cert_dir, &err), 1);
    ck_assert(!s_zauth_admits(cert_dir, full));
    ck_assert_int_eq(kh_partner_cert_remove("vt-gv", "/nonexistent", &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);

    /* No temporary files are left in the hub's directory. */
    char cmd[4096 + 32];
    snprintf(cmd, sizeof cmd, "%s/.vt-gv.cert.%ld.tmp", cert_dir,
             (long) getpid());
    ck_assert_int_ne(access(cmd, F_OK), 0);

    /* Exporting into the certificate directory itself works: the public
     * file there already holds the key. Another key there is refused. */
    char *same = khtest_tmpdir();
    zcert_t *other = kh_partner_cert_new("same-dir", &err);
    ck_assert_ptr_nonnull(other);
    ck_assert_int_eq(kh_partner_cert_export(other, "same-dir", same, &err), 0);
    ck_assert_int_eq(kh_partner_cert_install(other, "same-dir", same, &err), 1);
    ck_assert_int_eq(kh_partner_cert_install(cert, "same-dir", same, &err), -1);
    ck_assert_int_eq(err.code, KH_E_CONFIG);
    zcert_destroy(&other);
    khtest_rmtree(same);
    free(same);

    zcert_destroy(&full);
    zcert_destroy(&cert);
    ck_assert_ptr_null(kh_partner_cert_new("Bad Id", &err));
    khtest_rmtree(cert_dir);
    khtest_rmtree(out);
    free(cert_dir);
    free(out);
}
END_TEST

static bool s_file_exists(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* An empty database that ketenhubctl, run by the test, works on. */
static PGconn *s_ctl_db(void)
{
    PGconn *conn = khtest_db_empty(DB);
    char *conninfo = khtest_db_conninfo(DB);
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    unsetenv("KH_PARTNER_CERT_DIR");
    setenv("KH_MIGRATIONS_DIR", khtest_src("migrations"), 1);
    return conn;
}

/* The schema, and partner avim added with its pair in out. */
static void s_migrated_with_avim(const char *cert_dir, const char *out)
{
    char *text = NULL;
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    free(text);
    int rc =
        KHTEST_CTL(&text, "partner", "add", "avim", "--name", "AVIM", "--kind",
                   "police", "--cert-dir", cert_dir, "--out", out);
    ck_assert_msg(rc == 0, "partner add: %s", text);
    free(text);
}

/* Run the built ketenhubctl with args (NULL-ended, at most 10); *output
 * gets its stdout alone, what a script that reads it would see. */
static int s_ctl_stdout(char **output, const char *const *args)
{
    char ctl[512];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    char *argv[16] = {"/bin/sh", "-c", "exec \"$0\" \"$@\" 2>/dev/null", ctl};
    int i = 4;
    for (; args[i - 4] && i < 15; i++)
        argv[i] = (char *) args[i - 4];
    argv[i] = NULL;
    return khtest_run(argv, output);
}

/* Whether directory dir holds no entry at all. */
static bool s_dir_empty(const char *dir)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    bool empty = true;
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            empty = false;
    closedir(d);
    return empty;
}

/* ketenhubctl with args (NULL-ended, at most 10) where no file can grow
 * (ulimit -f 0: a full disk, to the files it writes): its exit status. */
static int s_ctl_disk_full(const char *const *args)
{
    char ctl[512];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    char *argv[16] = {"/bin/sh", "-c",
                      "trap '' XFSZ; ulimit -f 0; exec \"$0\" \"$@\"", ctl};
    int i = 4;
    for (; args[i - 4] && i < 15; i++)
        argv[i] = (char *) args[i - 4];
    argv[i] = NULL;
    char *output = NULL;
    int rc = khtest_run(argv, &output);
    free(output);
    return rc;
}

/* A certificate that cannot be written whole (CZMQ's zcert_save says it
 * was, whatever its writes did) is not put in place, and the change it
 * belongs to does not commit: partner add, with and without --out, and
 * partner rotate, on a disk that takes no more bytes, exit 1 and leave
 * the registry and the certificate directory as they were. */
START_TEST(test_ctl_certificate_not_written_whole_changes_nothing)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out = khtest_tmpdir();
    char *text = NULL;
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    free(text);
    const char *add[] = {"partner", "add",    "avim",   "--name",
                         "AVIM",    "--kind", "police", "--cert-dir",
                         cert_dir,  "--out",  out,      NULL};
    ck_assert_int_eq(s_ctl_disk_full(add), 1);
    ck_assert(!s_file_exists(out, "avim.cert"));
    ck_assert(!s_file_exists(out, "avim.cert_secret"));
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(s_dir_empty(out)); /* nothing half-made left there */
    /* The partner's own key: only the copy in --cert-dir is written. */
    char own[4096];
    snprintf(own, sizeof own, "%s/own.cert", out);
    zcert_t *theirs = zcert_new();
    ck_assert_int_eq(zcert_save_public(theirs, own), 0);
    zcert_destroy(&theirs);
    add[9] = "--public-cert";
    add[10] = own;
    ck_assert_int_eq(s_ctl_disk_full(add), 1);
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partners"), 0);

    char *out2 = khtest_tmpdir();
    s_migrated_with_avim(cert_dir, out2);
    char path[4096];
    snprintf(path, sizeof path, "%s/avim.cert", cert_dir);
    zcert_t *before = zcert_load(path);
    ck_assert_ptr_nonnull(before);
    snprintf(own, sizeof own, "%s/own2.cert", out);
    theirs = zcert_new();
    ck_assert_int_eq(zcert_save_public(theirs, own), 0);
    zcert_destroy(&theirs);
    const char *rotate[] = {"partner", "rotate",        "avim", "--cert-dir",
                            cert_dir,  "--public-cert", own,    NULL};
    ck_assert_int_eq(s_ctl_disk_full(rotate), 1);
    zcert_t *after = zcert_load(path);
    ck_assert_ptr_nonnull(after);
    ck_assert_str_eq(zcert_public_txt(after), zcert_public_txt(before));
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM partner_keys WHERE partner_id = 'avim'"
             " AND curve_public_key = '%s'",
             zcert_public_txt(before));
    ck_assert_int_eq(khtest_db_count(conn, sql), 1);
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partner_keys"),
                     1);
    zcert_destroy(&before);
    zcert_destroy(&after);

    /* hub keygen --force: the working pair stays. */
    char *hub = khtest_tmpdir();
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub), 0);
    free(text);
    snprintf(path, sizeof path, "%s/hub.cert", hub);
    before = zcert_load(path);
    ck_assert_ptr_nonnull(before);
    const char *keygen[] = {"hub", "keygen", "--out", hub, "--force", NULL};
    ck_assert_int_eq(s_ctl_disk_full(keygen), 1);
    after = zcert_load(path); /* with its secret, hub.cert_secret */
    ck_assert_ptr_nonnull(after);
    ck_assert_str_eq(zcert_public_txt(after), zcert_public_txt(before));
    ck_assert_str_eq(zcert_secret_txt(after), zcert_secret_txt(before));
    zcert_destroy(&before);
    zcert_destroy(&after);
    free(hub);
    free(out2);
    free(out);
    free(cert_dir);
    PQfinish(conn);
}
END_TEST

/* partner list on a database that is not migrated, or as a login without
 * the rights to read the partners: exit 1, why on stderr, and nothing on
 * stdout (a header there reads as an empty list). */
START_TEST(test_ctl_list_fails_with_nothing_on_stdout)
{
    PGconn *conn = s_ctl_db();
    const char *const table[] = {"partner", "list", NULL};
    const char *const json[] = {"partner", "list", "--json", NULL};
    char *text = NULL;
    ck_assert_int_eq(s_ctl_stdout(&text, table), 1);
    ck_assert_str_eq(text, "");
    free(text);
    ck_assert_int_eq(s_ctl_stdout(&text, json), 1);
    ck_assert_str_eq(text, "");
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list"), 1);
    ck_assert_msg(strstr(text, "ketenhubctl: cannot list partners") &&
                      !strstr(text, "public_key"),
                  "%s", text);
    ck_assert_msg(strstr(text, "run ketenhubctl migrate"), "%s", text);
    free(text);

    /* Nor can rules check read the partners there: not checked, exit 1
     * as any runtime failure (not 2: it was not called wrongly). */
    ck_assert_int_eq(KHTEST_CTL(&text, "rules", "check",
                                khtest_src("schemas/rules/default.yaml")),
                     1);
    ck_assert_msg(strstr(text, "not checked"), "%s", text);
    free(text);

    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    free(text);
    khtest_db_exec(conn,
                   "DO $$ BEGIN CREATE ROLE kh_test_partner_nobody LOGIN;"
                   " EXCEPTION WHEN duplicate_object OR unique_violation"
                   " THEN NULL; END $$",
                   0, NULL);
    char *conninfo = khtest_db_conninfo(DB);
    char nobody[1400];
    snprintf(nobody, sizeof nobody, "%s user=kh_test_partner_nobody", conninfo);
    setenv("KH_DATABASE_URL", nobody, 1);
    ck_assert_int_eq(s_ctl_stdout(&text, table), 1);
    ck_assert_str_eq(text, "");
    free(text);
    ck_assert_int_eq(s_ctl_stdout(&text, json), 1);
    ck_assert_str_eq(text, "");
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list"), 1);
    ck_assert_msg(strstr(text, "permission denied"), "%s", text);
    free(text);

    /* Migrated and allowed, an empty list still has its header. */
    setenv("KH_DATABASE_URL", conninfo, 1);
    free(conninfo);
    ck_assert_int_eq(s_ctl_stdout(&text, table), 0);
    ck_assert_msg(strncmp(text, "id ", 3) == 0 && !strchr(text, '\n')[1], "%s",
                  text);
    free(text);
    PQfinish(conn);
}
END_TEST

/* An option that takes one value, given twice, is refused (exit 2,
 * named) before anything is read, in every command: the second never
 * silently replaces the first (verify --file a --file b checked b
 * alone). verify's --public-key alone may be given again. */
START_TEST(test_ctl_options_given_twice_are_refused)
{
    PGconn *conn = s_ctl_db();
    static const char *const cases[][12] = {
        {"--file", "audit", "verify", "--public-key", "k", "--file", "a",
         "--file", "b", NULL},
        {"--published", "audit", "verify", "--public-key", "k", "--published",
         "a", "--published", "b", NULL},
        {"--out", "audit", "export", "--out", "/tmp/a", "--out", "/tmp/b",
         NULL},
        {"--since", "audit", "report", "--since", "2026-01-01", "--since",
         "2026-02-01", NULL},
        {"--before", "purge", "--before", "2026-01-01", "--before",
         "2025-01-01", NULL},
        {"--older-than", "purge", "--older-than", "30", "--older-than", "40",
         NULL},
        {"--partner", "deadletters", "list", "--partner", "avim", "--partner",
         "veilig-thuis", NULL},
        {"--since", "deadletters", "list", "--since", "2026-01-01", "--since",
         "2026-02-01", NULL},
        {"--partner", "deadletters", "retry", "--partner", "avim", "--partner",
         "veilig-thuis", "--all", NULL},
        {"--intake", "status", "--intake", "127.0.0.1:1", "--intake",
         "127.0.0.1:2", NULL},
        {"--name", "partner", "add", "avim", "--name", "A", "--name", "B",
         "--kind", "police", NULL},
        {"--schema", "rules", "check", "--schema", "a", "--schema", "b", "f",
         NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *text = NULL;
        int rc = khtest_ctl(&text, cases[i] + 1);
        char named[64];
        snprintf(named, sizeof named, "option '%s' given twice", cases[i][0]);
        ck_assert_msg(rc == 2 && strstr(text, named), "%s %s: exit %d: %s",
                      cases[i][1], cases[i][2], rc, text);
        free(text);
    }
    /* Nothing ran: no table was made. */
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM"
                                           " pg_tables WHERE schemaname ="
                                           " 'public'"),
                     0);
    /* --public-key again: the keys in the order used, read as such. */
    char *text = NULL;
    ck_assert_int_eq(KHTEST_CTL(&text, "audit", "verify", "--public-key",
                                "/dev/null", "--public-key", "/dev/null",
                                "--file", "/dev/null"),
                     2);
    ck_assert_msg(!strstr(text, "given twice") &&
                      strstr(text, "not an audit key file"),
                  "%s", text);
    free(text);
    /* A value forgotten: the option after it is no value (--name
     * --no-cases registered a partner of that name that handles cases),
     * unless attached with = (then it is meant). */
    static const char *const swallowed[][12] = {
        {"--name", "partner", "add", "cdx", "--kind", "other", "--name",
         "--no-cases", "--out", "/tmp/x", NULL},
        {"--partner", "deadletters", "list", "--partner", "--json", NULL},
        {"--out", "audit", "export", "--out", "--checkpoints-only", NULL},
    };
    for (size_t i = 0; i < sizeof swallowed / sizeof swallowed[0]; i++) {
        int rc = khtest_ctl(&text, swallowed[i] + 1);
        char named[64];
        snprintf(named, sizeof named, "option '%s' takes a value, and",
                 swallowed[i][0]);
        ck_assert_msg(rc == 2 && strstr(text, named), "%s %s: exit %d: %s",
                      swallowed[i][1], swallowed[i][2], rc, text);
        free(text);
    }
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "cdx", "--kind",
                                "other", "--name=--no-cases"),
                     2);
    ck_assert_msg(!strstr(text, "takes a value") && strstr(text, "--cert-dir"),
                  "%s", text);
    free(text);
    /* --checkpoints-only exports them all: a range with it is refused,
     * not ignored. */
    ck_assert_int_eq(KHTEST_CTL(&text, "audit", "export", "--out", "/tmp/x",
                                "--checkpoints-only", "--from", "5"),
                     2);
    ck_assert_msg(strstr(text, "--from/--to are for events"), "%s", text);
    free(text);
    PQfinish(conn);
}
END_TEST

/* partner add and rotate never put the partner's secret key among the
 * certificates the hub admits (--out equal to --cert-dir, or in it, by
 * any path): exit 2, nothing written. An --out DIR that a failed add made
 * is gone with the files in it. */
START_TEST(test_ctl_out_apart_from_cert_dir)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out = khtest_tmpdir();
    char *text = NULL;
    char inside[600], dotted[600], made[600];
    snprintf(inside, sizeof inside, "%s/keys", cert_dir);
    /* Both in the same directory: the other way to the same one. */
    snprintf(dotted, sizeof dotted, "%s/../%s", out,
             strrchr(cert_dir, '/') + 1);
    snprintf(made, sizeof made, "%s/new", out);
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    free(text);
    /* And through a link to it. */
    char link[600], linked[640];
    snprintf(link, sizeof link, "%s/link", out);
    ck_assert_int_eq(symlink(cert_dir, link), 0);
    snprintf(linked, sizeof linked, "%s/keys", link);
    const char *const outs[] = {cert_dir, inside, dotted, linked};
    for (size_t i = 0; i < 4; i++) {
        int rc = KHTEST_CTL(&text, "partner", "add", "avim", "--name", "AVIM",
                            "--kind", "police", "--cert-dir", cert_dir, "--out",
                            outs[i]);
        ck_assert_msg(rc == 2 && strstr(text, "is in --cert-dir"),
                      "%s: exit %d: %s", outs[i], rc, text);
        free(text);
    }
    ck_assert(!s_file_exists(cert_dir, "avim.cert_secret"));
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(!s_file_exists(cert_dir, "keys"));
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partners"), 0);

    s_migrated_with_avim(cert_dir, out);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "rotate", "avim",
                                "--cert-dir", cert_dir, "--out", cert_dir),
                     2);
    free(text);
    /* A second avim fails at its commit's insert: the --out DIR made for
     * it goes with its files. */
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "avim", "--name",
                                "AVIM", "--kind", "police", "--cert-dir",
                                cert_dir, "--out", made),
                     1);
    free(text);
    ck_assert(access(made, F_OK) != 0);
    /* One that was there stays. */
    ck_assert_int_eq(mkdir(made, 0700), 0);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "avim", "--name",
                                "AVIM", "--kind", "police", "--cert-dir",
                                cert_dir, "--out", made),
                     1);
    free(text);
    ck_assert(access(made, F_OK) == 0);
    ck_assert(!s_file_exists(made, "avim.cert_secret"));
    khtest_rmtree(cert_dir);
    khtest_rmtree(out);
    free(cert_dir);
    free(out);
    PQfinish(conn);
}
END_TEST

START_TEST(test_ctl_end_to_end)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out = khtest_tmpdir();
    char *hub = khtest_tmpdir();
    char *text = NULL;

    /* Help for every command. */
    ck_assert_int_eq(KHTEST_CTL(NULL, "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "migrate", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "hub", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "hub", "keygen", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "partner", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "partner", "add", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "partner", "list", "--help"), 0);
    ck_assert_int_eq(KHTEST_CTL(NULL, "partner", "revoke", "--help"), 0);
    ck_assert_int_eq(khtest_ctl(NULL, (const char *const[]){NULL}), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "frobnicate"), 2);
    ck_assert_int_eq(KHTEST_CTL(NULL, "migrate", "--bogus"), 2);
    /* getopt's complaint names the whole command, not its last word. */
    static const char *const bogus[][4] = {{"migrate", "--bogus", NULL},
                                           {"hub", "keygen", "--bogus", NULL},
                                           {"partner", "list", "--bogus", NULL},
                                           {"deadletters", "retry", "-q", NULL},
                                           {"audit", "report", "--bogus", NULL},
                                           {"status", "--bogus", NULL}};
    static const char *const named[] = {
        "ketenhubctl migrate: unrecognized option '--bogus'",
        "ketenhubctl hub keygen: unrecognized option '--bogus'",
        "ketenhubctl partner list: unrecognized option '--bogus'",
        "ketenhubctl deadletters retry: invalid option -- 'q'",
        "ketenhubctl audit report: unrecognized option '--bogus'",
        "ketenhubctl status: unrecognized option '--bogus'"};
    for (size_t i = 0; i < sizeof named / sizeof named[0]; i++) {
        ck_assert_int_eq(khtest_ctl(&text, bogus[i]), 2);
        ck_assert_msg(strncmp(text, named[i], strlen(named[i])) == 0, "%s",
                      text);
        free(text);
    }

    /* migrate, then status, then nothing left to do. */
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    ck_assert_ptr_nonnull(strstr(text, "applied 001_foundation.sql"));
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate", "--status"), 0);
    ck_assert_ptr_nonnull(strstr(text, "applied"));
    ck_assert_ptr_nonnull(strstr(text, "0 pending"));
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    ck_assert_ptr_nonnull(strstr(text, "(0 applied now)"));
    free(text);
    /* A directory that is not there is a usage error, as --cert-dir's. */
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate", "--dir", "/nonexistent"), 2);
    free(text);

    /* hub keygen, and no silent replacement. */
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub), 0);
    free(text);
    ck_assert(s_file_exists(hub, "hub.cert"));
    ck_assert(s_file_exists(hub, "hub.cert_secret"));
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub), 1);
    free(text);
    ck_assert_int_eq(
        KHTEST_CTL(&text, "hub", "keygen", "--out", hub, "--force"), 0);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen"), 2);
    free(text);
    /* A mistyped --out (its parent is not there, or it is a file) is a
     * usage error, as a mistyped --cert-dir, for every command that makes
     * the last directory of one. */
    ck_assert_int_eq(
        KHTEST_CTL(&text, "hub", "keygen", "--out", "/nonexistent/a/b"), 2);
    ck_assert_msg(strstr(text, "/nonexistent/a is not a directory"), "%s",
                  text);
    free(text);
    ck_assert_int_eq(
        KHTEST_CTL(&text, "audit", "keygen", "--out", "/nonexistent/a/b"), 2);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "nobody-here",
                                "--name", "N", "--kind", "other", "--cert-dir",
                                cert_dir, "--out", "/nonexistent/a/b"),
                     2);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "rotate", "nobody-here",
                                "--cert-dir", cert_dir, "--out",
                                "/nonexistent/a/b"),
                     2);
    free(text);
    char hub_cert[4096];
    snprintf(hub_cert, sizeof hub_cert, "%s/hub.cert", hub);
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub_cert), 2);
    free(text);

    /* partner add. */
    int rc = KHTEST_CTL(&text, "partner", "add", "vt-gv", "--name",
                        "Veilig Thuis Gooi en Vechtstreek", "--kind",
                        "veilig_thuis", "--cert-dir", cert_dir, "--out", out);
    ck_assert_msg(rc == 0, "partner add: %s", text);
    free(text);
    ck_assert(s_file_exists(cert_dir, "vt-gv.cert"));
    ck_assert(!s_file_exists(cert_dir, "vt-gv.cert_secret"));
    ck_assert(s_file_exists(out, "vt-gv.cert"));
    ck_assert(s_file_exists(out, "vt-gv.cert_secret"));

    /* The registered key is the one in the certificate. */
    char path[4096];
    snprintf(path, sizeof path, "%s/vt-gv.cert", cert_dir);
    zcert_t *cert = zcert_load(path);
    ck_assert_ptr_nonnull(cert);
    kh_error_t err;
    kh_partner_t p;
    ck_assert_int_eq(
        kh_partner_lookup_key(conn, zcert_public_txt(cert), &p, &err), 0);
    ck_assert_str_eq(p.id, "vt-gv");
    ck_assert(p.handles_cases);
    zcert_destroy(&cert);

    /* A chain director is registered without cases, --no-cases or not. */
    char *out2 = khtest_tmpdir();
    rc = KHTEST_CTL(&text, "partner", "add", "ketenregie", "--name",
                    "Ketenregisseur", "--kind", "chain_director", "--cert-dir",
                    cert_dir, "--out", out2);
    ck_assert_msg(rc == 0, "partner add: %s", text);
    ck_assert_ptr_nonnull(strstr(text, "handles cases: no"));
    free(text);
    ck_assert_int_eq(kh_partner_get(conn, "ketenregie", &p, &err), 0);
    ck_assert(!p.handles_cases);

    /* A duplicate id fails at run time and leaves no files behind. */
    char *out3 = khtest_tmpdir();
    rc = KHTEST_CTL(&text, "partner", "add", "vt-gv", "--name", "Again",
                    "--kind", "other", "--cert-dir", cert_dir, "--out", out3);
    ck_assert_int_eq(rc, 1);
    ck_assert_ptr_nonnull(strstr(text, "already registered"));
    free(text);
    ck_assert(!s_file_exists(out3, "vt-gv.cert_secret"));
    /* A certificate already in the directory rolls the row back. */
    snprintf(path, sizeof path, "%s/avim.cert", cert_dir);
    khtest_write_file(path, "stale\n");
    rc = KHTEST_CTL(&text, "partner", "add", "avim", "--name", "Politie AVIM",
                    "--kind", "police", "--cert-dir", cert_dir, "--out", out3);
    ck_assert_int_eq(rc, 1);
    free(text);
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), -1);
    ck_assert(!s_file_exists(out3, "avim.cert_secret"));
    ck_assert(s_file_exists(cert_dir, "avim.cert"));

    /* Usage errors exit 2. */
    /* A name that is no UTF-8, or holds a C1 control, is one too, not a
     * database failure. */
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name",
                                "bad \xff", "--kind", "other", "--cert-dir",
                                cert_dir, "--out", out3),
                     2);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name",
                                "c1 \xc2\x9b", "--kind", "other", "--cert-dir",
                                cert_dir, "--out", out3),
                     2);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "Bad", "--name", "x",
                                "--kind", "other", "--cert-dir", cert_dir,
                                "--out", out3),
                     2);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name", "x",
                                "--kind", "ketenregisseur", "--cert-dir",
                                cert_dir, "--out", out3),
                     2);
    /* The refusal gives the kinds to choose from. */
    ck_assert_msg(strstr(text, "the kinds are: veilig_thuis, zorgcoordinator, "
                               "police, municipality, inspectorate, "
                               "national_centre, chain_director, other (the "
                               "ketenregisseur is chain_director)"),
                  "%s", text);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name", "x",
                                "--kind", "other", "--out", out3),
                     2);
    free(text);
    /* So is a display name that is none (a line break, outer spaces),
     * before anything is registered or written. */
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name",
                                "a\nb", "--kind", "other", "--cert-dir",
                                cert_dir, "--out", out3),
                     2);
    ck_assert_msg(strstr(text, "--name"), "%s", text);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name", " x",
                                "--kind", "other", "--cert-dir", cert_dir,
                                "--out", out3),
                     2);
    free(text);
    ck_assert(!s_file_exists(out3, "okid.cert_secret"));
    ck_assert(!s_file_exists(cert_dir, "okid.cert"));
    /* A --cert-dir that is not there (mistyped) is refused before
     * anything is registered or written, as for rotate and revoke: made
     * here, it would hold the certificate where zauth never looks. */
    char typo[4096];
    snprintf(typo, sizeof typo, "%s/partners-typo", cert_dir);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "okid", "--name", "x",
                                "--kind", "other", "--cert-dir", typo, "--out",
                                out3),
                     2);
    ck_assert_msg(strstr(text, "is not a directory"), "%s", text);
    free(text);
    ck_assert_int_eq(access(typo, F_OK), -1);
    ck_assert_int_eq(kh_partner_get(conn, "okid", &p, &err), -1);
    ck_assert(!s_file_exists(out3, "okid.cert_secret"));

    /* list, for humans and as JSON. */
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list"), 0);
    ck_assert_ptr_nonnull(strstr(text, "vt-gv"));
    ck_assert_ptr_nonnull(strstr(text, "ketenregie"));
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list", "--json"), 0);
    json_error_t jerr;
    json_t *list = json_loads(text, 0, &jerr);
    ck_assert_msg(list != NULL, "bad JSON: %s", jerr.text);
    free(text);
    ck_assert(json_is_array(list));
    ck_assert_int_eq((int) json_array_size(list), 2);
    json_t *first = json_array_get(list, 0);
    ck_assert_str_eq(json_string_value(json_object_get(first, "id")),
                     "ketenregie");
    ck_assert(json_is_false(json_object_get(first, "handles_cases")));
    ck_assert(json_is_null(json_object_get(first, "revoked_at")));
    json_decref(list);

    /* A --cert-dir that is not a directory revokes nothing: the key would
     * stay in the real directory while the tool said it was removed. */
    const char *nowhere = khtest_path(cert_dir, "typo");
    rc = KHTEST_CTL(&text, "partner", "revoke", "vt-gv", "--cert-dir", nowhere);
    ck_assert_msg(rc == 2, "revoke with a missing --cert-dir: %d: %s", rc,
                  text);
    ck_assert_ptr_null(strstr(text, "removed"));
    free(text);
    ck_assert_int_eq(kh_partner_get(conn, "vt-gv", &p, &err), 0);
    ck_assert(!p.revoked);
    ck_assert(s_file_exists(cert_dir, "vt-gv.cert"));
    /* A directory without the partner's certificate: the key is revoked,
     * and the tool says that it found no file to remove. */
    char *elsewhere = khtest_tmpdir();
    rc = KHTEST_CTL(&text, "partner", "revoke", "ketenregie", "--cert-dir",
                    elsewhere);
    ck_assert_msg(rc == 0, "revoke: %s", text);
    ck_assert_msg(strstr(text, "removed") == NULL &&
                      strstr(text, "no certificate") != NULL,
                  "revoke said: %s", text);
    free(text);
    khtest_rmtree(elsewhere);
    free(elsewhere);
    ck_assert_int_eq(kh_partner_get(conn, "ketenregie", &p, &err), 0);
    ck_assert(p.revoked);

    /* revoke removes the certificate and marks the row. */
    ck_assert_int_eq(
        KHTEST_CTL(&text, "partner", "revoke", "vt-gv", "--cert-dir", cert_dir),
        0);
    free(text);
    ck_assert(!s_file_exists(cert_dir, "vt-gv.cert"));
    ck_assert_int_eq(kh_partner_get(conn, "vt-gv", &p, &err), 0);
    ck_assert(p.revoked);
    ck_assert_int_eq(
        KHTEST_CTL(&text, "partner", "revoke", "vt-gv", "--cert-dir", cert_dir),
        0);
    ck_assert_ptr_nonnull(strstr(text, "already revoked"));
    free(text);
    /* Each change of the registry is in the trail, once, by an admin; the
     * failed additions above left nothing there. */
    char *events = khtest_db_value(
        conn, "SELECT string_agg(action || ':' || partner_id, ',' ORDER BY "
              "seq) FROM audit_events WHERE actor_kind = 'admin' AND "
              "origin_service = 'ketenhubctl' AND outcome = 'ok'");
    ck_assert_str_eq(events, "partner.added:vt-gv,partner.added:ketenregie,"
                             "partner.revoked:ketenregie,"
                             "partner.revoked:vt-gv");
    free(events);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "revoke", "nobody",
                                "--cert-dir", cert_dir),
                     1);
    /* The error names the partner it did not find. */
    ck_assert_msg(strstr(text, "no partner nobody is registered"), "%s", text);
    free(text);
    /* A revoked partner keeps its id: adding it again is refused, and
     * says why. */
    rc = KHTEST_CTL(&text, "partner", "add", "vt-gv", "--name", "Again",
                    "--kind", "other", "--cert-dir", cert_dir, "--out", out3);
    ck_assert_int_eq(rc, 1);
    ck_assert_msg(strstr(text, "partner vt-gv is already registered (a revoked"
                               " partner keeps its id"),
                  "%s", text);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list", "--active", "--json"),
                     0);
    list = json_loads(text, 0, &jerr);
    free(text);
    ck_assert_ptr_nonnull(list);
    ck_assert_int_eq((int) json_array_size(list), 0);
    json_decref(list);
    /* A revoked partner's key admits no one: its end is the revocation,
     * not null (which reads as a current key, valid for ever). */
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list", "--json"), 0);
    list = json_loads(text, 0, &jerr);
    ck_assert_msg(list, "%s", text);
    free(text);
    size_t k;
    json_t *item;
    int seen = 0;
    json_array_foreach(list, k, item)
    {
        const char *revoked =
            json_string_value(json_object_get(item, "revoked_at"));
        json_t *keys = json_object_get(item, "keys");
        ck_assert_ptr_nonnull(revoked);
        ck_assert_int_eq((int) json_array_size(keys), 1);
        const char *end = json_string_value(
            json_object_get(json_array_get(keys, 0), "expires_at"));
        ck_assert_ptr_nonnull(end);
        ck_assert_str_eq(end, revoked);
        seen++;
    }
    ck_assert_int_eq(seen, 2);
    json_decref(list);

    /* Without a reachable database: runtime failure. */
    setenv("KH_DATABASE_URL", "host=/nonexistent port=1", 1);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list"), 1);
    free(text);

    khtest_rmtree(cert_dir);
    khtest_rmtree(out);
    khtest_rmtree(out2);
    khtest_rmtree(out3);
    khtest_rmtree(hub);
    free(cert_dir);
    free(out);
    free(out2);
    free(out3);
    free(hub);
    PQfinish(conn);
}
END_TEST

/* The public key in cert_dir/name, and its expires-at ("" if none). */
static void s_cert_key(const char *cert_dir, const char *name,
                       char key[KH_PARTNER_KEY_LEN + 1], char expires[40])
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", cert_dir, name);
    zcert_t *cert = zcert_load(path);
    ck_assert_msg(cert != NULL, "cannot load %s", path);
    snprintf(key, KH_PARTNER_KEY_LEN + 1, "%s", zcert_public_txt(cert));
    const char *meta = zcert_meta(cert, "expires-at");
    snprintf(expires, 40, "%s", meta ? meta : "");
    zcert_destroy(&cert);
}

/* The keys that admit partner id now (KH_PARTNER_KEYS_SQL, which the
 * services read), sorted, comma-separated. */
static char *s_admitted(PGconn *conn, const char *id)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT coalesce(string_agg(curve_public_key, ',' ORDER BY "
             "curve_public_key), '') FROM (" KH_PARTNER_KEYS_SQL
             ") k WHERE partner_id = '%s'",
             id);
    return khtest_db_value(conn, sql);
}

/* A key rotation gives the partner a new key under the same id; the key
 * it replaces admits the partner during the overlap, and the files agree
 * with the registry at every step, also when the rotation fails. */
START_TEST(test_rotate)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out[4];
    for (int i = 0; i < 4; i++)
        out[i] = khtest_tmpdir();
    s_migrated_with_avim(cert_dir, out[0]);
    char *text = NULL;
    int rc;
    char first[KH_PARTNER_KEY_LEN + 1], second[KH_PARTNER_KEY_LEN + 1];
    char key[KH_PARTNER_KEY_LEN + 1], expires[40];
    s_cert_key(cert_dir, "avim.cert", first, expires);
    ck_assert_str_eq(expires, "");
    char *admitted = s_admitted(conn, "avim");
    ck_assert_str_eq(admitted, first);
    free(admitted);

    /* Rotation with an overlap of 2 hours. */
    ck_assert_int_eq(KHTEST_CTL(NULL, "partner", "rotate", "--help"), 0);
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[1], "--overlap", "2");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    s_cert_key(out[1], "avim.cert", second, expires);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, second);
    ck_assert_str_eq(expires, "");
    ck_assert(s_file_exists(out[1], "avim.cert_secret"));
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, first);
    char *until = khtest_db_value(
        conn, "SELECT to_char(expires_at AT TIME ZONE 'UTC', "
              "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM partner_keys WHERE "
              "partner_id = 'avim' AND expires_at IS NOT NULL");
    ck_assert_str_eq(expires, until);
    ck_assert_int_eq(
        khtest_db_count(conn, "SELECT count(*) FROM partner_keys WHERE "
                              "partner_id = 'avim' AND expires_at BETWEEN "
                              "now() + interval '119 minutes' AND now() + "
                              "interval '2 hours' AND expires_at = "
                              "date_trunc('second', expires_at)"),
        1); /* on the second the certificate names */
    admitted = s_admitted(conn, "avim");
    char both[2 * KH_PARTNER_KEY_LEN + 2];
    snprintf(both, sizeof both, "%s,%s",
             strcmp(first, second) < 0 ? first : second,
             strcmp(first, second) < 0 ? second : first);
    ck_assert_str_eq(admitted, both);
    free(admitted);
    kh_error_t err;
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, second);
    ck_assert_str_eq(p.previous_key_until, until);
    free(until);
    ck_assert_int_eq(kh_partner_lookup_key(conn, first, &p, &err), 0);
    ck_assert_str_eq(p.id, "avim");
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "list", "--json"), 0);
    ck_assert_ptr_nonnull(strstr(text, "\"previous_key_until\": \"20"));
    /* Every key it had, oldest first; whose a "key:..." actor was. */
    json_error_t jerr;
    json_t *listed = json_loads(text, 0, &jerr);
    free(text);
    ck_assert_ptr_nonnull(listed);
    json_t *keys = json_object_get(json_array_get(listed, 0), "keys");
    ck_assert_int_eq((int) json_array_size(keys), 2);
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(keys, 0),
                                                       "public_key")),
                     first);
    ck_assert(
        json_is_string(json_object_get(json_array_get(keys, 0), "expires_at")));
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(keys, 1),
                                                       "public_key")),
                     second);
    ck_assert(
        json_is_null(json_object_get(json_array_get(keys, 1), "expires_at")));
    json_decref(listed);

    /* Failures change nothing: secrets already in --out, an unknown or
     * revoked partner, bad arguments. */
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[1]);
    ck_assert_msg(rc == 1, "rotate into a used --out: %d: %s", rc, text);
    free(text);
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "rotate", "nobody",
                                "--cert-dir", cert_dir, "--out", out[2]),
                     1);
    ck_assert_msg(strstr(text, "no partner nobody is registered"), "%s", text);
    free(text);
    const char *usage[][8] = {
        {"partner", "rotate", "avim", "--cert-dir", cert_dir, "--out", out[2],
         "--overlap"},
        {"partner", "rotate", "avim", "--cert-dir", cert_dir, "--overlap", "1"},
        {"partner", "rotate", "avim", "--out", out[2]},
        {"partner", "rotate", "avim", "--cert-dir", "/nonexistent", "--out",
         out[2]},
        {"partner", "rotate", "--cert-dir", cert_dir, "--out", out[2]},
        {"partner", "rotate", "Bad", "--cert-dir", cert_dir, "--out", out[2]},
    };
    const char *overlaps[] = {"-1", "x", "2161", "1h", " 1"};
    for (size_t i = 0; i < sizeof overlaps / sizeof *overlaps; i++) {
        rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir",
                        cert_dir, "--out", out[2], "--overlap", overlaps[i]);
        ck_assert_msg(rc == 2, "--overlap '%s': %d", overlaps[i], rc);
        free(text);
    }
    for (size_t i = 0; i < sizeof usage / sizeof *usage; i++) {
        const char *args[9] = {0};
        for (int j = 0; j < 8 && usage[i][j]; j++)
            args[j] = usage[i][j];
        rc = khtest_ctl(&text, args);
        ck_assert_msg(rc == 2, "usage case %zu: %d: %s", i, rc, text);
        free(text);
    }
    ck_assert(!s_file_exists(out[2], "avim.cert"));
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, second);
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, first);
    admitted = s_admitted(conn, "avim");
    ck_assert_str_eq(admitted, both);
    free(admitted);
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partner_keys"),
                     2);

    /* A key the registry ever had is never registered again, for any
     * partner. */
    ck_assert_int_eq(kh_partner_register(conn, "other-one", "Other",
                                         KH_PARTNER_OTHER, true, first, &err),
                     -1);
    ck_assert_str_eq(err.path, "public_key");

    /* A rotation without overlap: the key before admits nobody at once,
     * and neither does the one before it, whose overlap it ends. */
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[2], "--overlap", "0");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    ck_assert_ptr_nonnull(strstr(text, "no longer admits"));
    free(text);
    ck_assert(!s_file_exists(cert_dir, "avim.previous.cert"));
    char third[KH_PARTNER_KEY_LEN + 1];
    s_cert_key(out[2], "avim.cert", third, expires);
    admitted = s_admitted(conn, "avim");
    ck_assert_str_eq(admitted, third);
    free(admitted);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, third);
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.previous_key_until, "");

    /* Each rotation is in the trail; the failed ones left nothing. */
    ck_assert_int_eq(
        khtest_db_count(conn, "SELECT count(*) FROM audit_events WHERE "
                              "action = 'partner.key_rotated' AND "
                              "partner_id = 'avim' AND actor_kind = 'admin'"),
        2);

    /* revoke removes both files; a revoked partner gets no new key. */
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[3]);
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    ck_assert(s_file_exists(cert_dir, "avim.previous.cert"));
    ck_assert_int_eq(
        KHTEST_CTL(&text, "partner", "revoke", "avim", "--cert-dir", cert_dir),
        0);
    free(text);
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(!s_file_exists(cert_dir, "avim.previous.cert"));
    admitted = s_admitted(conn, "avim");
    ck_assert_str_eq(admitted, "");
    free(admitted);
    khtest_rmtree(out[3]);
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[3]);
    ck_assert_msg(rc == 1 && strstr(text, "revoked"), "rotate revoked: %d: %s",
                  rc, text);
    free(text);
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(!s_file_exists(out[3], "avim.cert"));
    ck_assert_int_eq(khtest_db_count(conn,
                                     "SELECT count(*) FROM audit_events WHERE "
                                     "action = 'partner.key_rotated'"),
                     3);

    /* A pair the partner made itself: only its public half comes to the
     * hub, for add and for rotate; a file with a secret key in it, or one
     * that is no certificate, is refused and changes nothing. */
    char *own = khtest_tmpdir();
    char keygen[4096];
    snprintf(keygen, sizeof keygen,
             "%s/tools/partner/ketenhub-partner keygen zelf --out %s/one "
             ">/dev/null && %s/tools/partner/ketenhub-partner keygen zelf "
             "--out %s/two >/dev/null",
             KH_TEST_BINARY_DIR, own, KH_TEST_BINARY_DIR, own);
    ck_assert_int_eq(system(keygen), 0);
    char mine[4096], secret[4096], second_pub[4096];
    snprintf(mine, sizeof mine, "%s/one/zelf.cert", own);
    snprintf(secret, sizeof secret, "%s/one/zelf.cert_secret", own);
    snprintf(second_pub, sizeof second_pub, "%s/two/zelf.cert", own);
    /* The hub's own certificate is no partner's either. */
    char hub_dir[4096], hub_cert[4200];
    snprintf(hub_dir, sizeof hub_dir, "%s/hub", own);
    snprintf(hub_cert, sizeof hub_cert, "%s/hub.cert", hub_dir);
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub_dir), 0);
    free(text);
    const char *bad[] = {secret, "/etc/hostname", own, "/nonexistent",
                         hub_cert};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        rc = KHTEST_CTL(&text, "partner", "add", "zelf", "--name", "Zelf",
                        "--kind", "other", "--cert-dir", cert_dir,
                        "--public-cert", bad[i]);
        ck_assert_msg(rc == 2, "--public-cert %s: %d: %s", bad[i], rc, text);
        free(text);
    }
    ck_assert_int_eq(KHTEST_CTL(&text, "partner", "add", "zelf", "--name",
                                "Zelf", "--kind", "other", "--cert-dir",
                                cert_dir, "--public-cert", mine, "--out",
                                out[3]),
                     2);
    free(text);
    ck_assert_int_eq(kh_partner_get(conn, "zelf", &p, &err), -1);
    ck_assert(!s_file_exists(cert_dir, "zelf.cert"));
    rc = KHTEST_CTL(&text, "partner", "add", "zelf", "--name", "Zelf", "--kind",
                    "other", "--cert-dir", cert_dir, "--public-cert", mine);
    ck_assert_msg(rc == 0, "add --public-cert: %s", text);
    free(text);
    s_cert_key(own, "one/zelf.cert", first, expires);
    s_cert_key(cert_dir, "zelf.cert", key, expires);
    ck_assert_str_eq(key, first);
    ck_assert_int_eq(kh_partner_get(conn, "zelf", &p, &err), 0);
    ck_assert_str_eq(p.public_key, first);
    /* The hub's copy holds no secret. */
    char installed[4096];
    snprintf(installed, sizeof installed, "%s/zelf.cert", cert_dir);
    char *content = khtest_read_file(installed);
    ck_assert_ptr_nonnull(content);
    ck_assert_ptr_null(strstr(content, "secret-key"));
    free(content);
    ck_assert(!s_file_exists(cert_dir, "zelf.cert_secret"));
    rc = KHTEST_CTL(&text, "partner", "rotate", "zelf", "--cert-dir", cert_dir,
                    "--public-cert", second_pub);
    ck_assert_msg(rc == 0, "rotate --public-cert: %s", text);
    free(text);
    s_cert_key(own, "two/zelf.cert", second, expires);
    s_cert_key(cert_dir, "zelf.cert", key, expires);
    ck_assert_str_eq(key, second);
    s_cert_key(cert_dir, "zelf.previous.cert", key, expires);
    ck_assert_str_eq(key, first);
    /* The same public certificate again: a key is registered once. */
    rc = KHTEST_CTL(&text, "partner", "rotate", "zelf", "--cert-dir", cert_dir,
                    "--public-cert", mine);
    ck_assert_msg(rc == 1, "rotate back to an old key: %d: %s", rc, text);
    free(text);
    s_cert_key(cert_dir, "zelf.cert", key, expires);
    ck_assert_str_eq(key, second);
    khtest_rmtree(own);
    free(own);

    khtest_rmtree(cert_dir);
    free(cert_dir);
    for (int i = 0; i < 4; i++) {
        khtest_rmtree(out[i]);
        free(out[i]);
    }
    PQfinish(conn);
}
END_TEST

/* Rotate partner id of conn's database to cert inside a transaction and
 * stage its files, as ketenhubctl partner rotate does up to its COMMIT;
 * previous gets the key it replaces. */
static void s_rotate_staged(PGconn *conn, const char *id, zcert_t *cert,
                            const char *cert_dir,
                            char previous[KH_PARTNER_KEY_LEN + 1],
                            char until[40])
{
    kh_error_t err;
    ck_assert_int_eq(kh_db_exec(conn, "BEGIN", &err), 0);
    ck_assert_int_eq(kh_partner_rotate(conn, id, zcert_public_txt(cert), 3600,
                                       previous, until, &err),
                     0);
    ck_assert_int_eq(kh_partner_cert_rotate(cert, id, previous, cert_dir, &err),
                     0);
}

/* An add whose commit is refused undoes the files it wrote, but not the
 * partner's certificate that an administrator put in --cert-dir before
 * and named with --public-cert: that one it did not write. */
START_TEST(test_add_refused_keeps_the_certificate_it_found)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *text = NULL;
    ck_assert_int_eq(KHTEST_CTL(&text, "migrate"), 0);
    free(text);
    char own[4096];
    snprintf(own, sizeof own, "%s/avim.cert", cert_dir);
    zcert_t *theirs = zcert_new();
    ck_assert_int_eq(zcert_save_public(theirs, own), 0);
    zcert_destroy(&theirs);
    khtest_db_exec(conn,
                   "CREATE FUNCTION kh_test_cut() RETURNS trigger"
                   " LANGUAGE plpgsql AS $$ BEGIN"
                   " RAISE EXCEPTION 'refused at commit'; END $$",
                   0, NULL);
    khtest_db_exec(conn,
                   "CREATE CONSTRAINT TRIGGER kh_test_cut AFTER INSERT ON"
                   " partners DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                   " EXECUTE FUNCTION kh_test_cut()",
                   0, NULL);
    int rc =
        KHTEST_CTL(&text, "partner", "add", "avim", "--name", "AVIM", "--kind",
                   "police", "--cert-dir", cert_dir, "--public-cert", own);
    ck_assert_msg(rc == 1, "add with its commit refused: %d: %s", rc, text);
    free(text);
    ck_assert(s_file_exists(cert_dir, "avim.cert"));
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partners"), 0);
    khtest_db_exec(conn, "DROP TRIGGER kh_test_cut ON partners", 0, NULL);
    khtest_db_exec(conn, "DROP FUNCTION kh_test_cut()", 0, NULL);
    /* A new pair where that file holds another key (an add killed after
     * it installed its certificate, before its commit): refused, the file
     * kept, and the refusal says it admits no partner, to be removed. */
    char *out = khtest_tmpdir();
    rc = KHTEST_CTL(&text, "partner", "add", "avim", "--name", "AVIM", "--kind",
                    "police", "--cert-dir", cert_dir, "--out", out);
    ck_assert_msg(rc == 1 && strstr(text, "already exists") &&
                      strstr(text, "no partner avim is registered"),
                  "add over another key's file: %d: %s", rc, text);
    free(text);
    ck_assert_int_eq(khtest_db_count(conn, "SELECT count(*) FROM partners"), 0);
    khtest_rmtree(out);
    free(out);
    /* Without the trigger it goes in, with that certificate. */
    rc = KHTEST_CTL(&text, "partner", "add", "avim", "--name", "AVIM", "--kind",
                    "police", "--cert-dir", cert_dir, "--public-cert", own);
    ck_assert_msg(rc == 0, "add: %d: %s", rc, text);
    free(text);
    ck_assert(s_file_exists(cert_dir, "avim.cert"));
    khtest_rmtree(cert_dir);
    free(cert_dir);
    PQfinish(conn);
}
END_TEST

/* A connection lost during the COMMIT of a rotation: the tool reads on a
 * new connection whether it went through, and here it did not, so the
 * files are put back as they were and the new pair is removed. */
START_TEST(test_rotate_commit_lost)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out[2] = {khtest_tmpdir(), khtest_tmpdir()};
    s_migrated_with_avim(cert_dir, out[0]);
    char *text = NULL;
    int rc;
    char before[KH_PARTNER_KEY_LEN + 1], key[KH_PARTNER_KEY_LEN + 1];
    char expires[40];
    s_cert_key(cert_dir, "avim.cert", before, expires);
    /* The server process ends itself at the commit of a new key. */
    khtest_db_exec(conn,
                   "CREATE FUNCTION kh_test_cut() RETURNS trigger"
                   " LANGUAGE plpgsql AS $$ BEGIN"
                   " PERFORM pg_terminate_backend(pg_backend_pid());"
                   " RETURN NULL; END $$",
                   0, NULL);
    khtest_db_exec(conn,
                   "CREATE CONSTRAINT TRIGGER kh_test_cut AFTER UPDATE ON"
                   " partners DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                   " EXECUTE FUNCTION kh_test_cut()",
                   0, NULL);
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[1], "--overlap", "0");
    ck_assert_msg(rc == 1, "rotate with its commit cut: %d: %s", rc, text);
    free(text);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, before);
    ck_assert(!s_file_exists(cert_dir, "avim.previous.cert"));
    ck_assert(!s_file_exists(out[1], "avim.cert_secret"));
    kh_error_t err;
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, before);
    khtest_db_exec(conn, "DROP TRIGGER kh_test_cut ON partners", 0, NULL);
    khtest_db_exec(conn, "DROP FUNCTION kh_test_cut()", 0, NULL);
    khtest_rmtree(cert_dir);
    free(cert_dir);
    for (int i = 0; i < 2; i++) {
        khtest_rmtree(out[i]);
        free(out[i]);
    }
    PQfinish(conn);
}
END_TEST

/* A rotation whose commit went through, its answer lost: the tool reads
 * the transaction's status on a new connection (not the row, which a
 * commit that is durable but not yet visible does not show), says that
 * it went through, keeps the new files and exits 0. The answer is lost
 * by holding the commit in a wait for a synchronous standby that never
 * comes, and ending the server process while it waits. */
START_TEST(test_rotate_commit_answer_lost)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out[2] = {khtest_tmpdir(), khtest_tmpdir()};
    s_migrated_with_avim(cert_dir, out[0]);
    char before[KH_PARTNER_KEY_LEN + 1], key[KH_PARTNER_KEY_LEN + 1];
    char expires[40];
    s_cert_key(cert_dir, "avim.cert", before, expires);
    char log[] = "/tmp/kh-partner-rotate-XXXXXX";
    int fd = mkstemp(log);
    ck_assert_int_ge(fd, 0);
    close(fd);
    khtest_sync_standby(conn, "kh_test_nobody");
    char *argv[] = {KH_TEST_BINARY_DIR "/tools/ctl/ketenhubctl",
                    "partner",
                    "rotate",
                    "avim",
                    "--cert-dir",
                    cert_dir,
                    "--out",
                    out[1],
                    "--overlap",
                    "0",
                    NULL};
    char *env[] = {"PGOPTIONS=-c synchronous_commit=on", NULL};
    pid_t pid = khproc_spawn(argv[0], argv, env, log);
    ck_assert_int_gt(pid, 0);
    bool ended = khtest_end_commit_waiter(conn, DB);
    khtest_sync_standby(conn, NULL);
    int status = khproc_stop(pid, 0, 30000);
    char *text = khtest_read_file(log);
    unlink(log);
    ck_assert_msg(ended, "no commit waited: %s", text);
    ck_assert_msg(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "rotate: status %d: %s", status, text);
    ck_assert_msg(strstr(text, "went through after all"), "%s", text);
    free(text);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_ne(key, before);
    kh_error_t err;
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, key);
    ck_assert(s_file_exists(out[1], "avim.cert_secret"));
    khtest_rmtree(cert_dir);
    free(cert_dir);
    for (int i = 0; i < 2; i++) {
        khtest_rmtree(out[i]);
        free(out[i]);
    }
    PQfinish(conn);
}
END_TEST

/* A revocation whose commit the server refuses, or whose connection is
 * lost at the commit (and which did not go through): the certificate is
 * put back, so that the files and the registry agree (the partner still
 * active), and no hidden copy is left; without those triggers it goes. */
START_TEST(test_revoke_commit_refused)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out = khtest_tmpdir();
    s_migrated_with_avim(cert_dir, out);
    char before[KH_PARTNER_KEY_LEN + 1], key[KH_PARTNER_KEY_LEN + 1];
    char expires[40];
    s_cert_key(cert_dir, "avim.cert", before, expires);
    static const char *const bodies[] = {
        "RAISE EXCEPTION 'refused at commit'",
        "PERFORM pg_terminate_backend(pg_backend_pid())"};
    for (size_t i = 0; i < 2; i++) {
        char sql[512];
        snprintf(sql, sizeof sql,
                 "CREATE FUNCTION kh_test_cut() RETURNS trigger"
                 " LANGUAGE plpgsql AS $$ BEGIN %s; RETURN NULL; END $$",
                 bodies[i]);
        khtest_db_exec(conn, sql, 0, NULL);
        khtest_db_exec(conn,
                       "CREATE CONSTRAINT TRIGGER kh_test_cut AFTER UPDATE ON"
                       " partners DEFERRABLE INITIALLY DEFERRED FOR EACH ROW"
                       " EXECUTE FUNCTION kh_test_cut()",
                       0, NULL);
        char *text = NULL;
        int rc = KHTEST_CTL(&text, "partner", "revoke", "avim", "--cert-dir",
                            cert_dir);
        ck_assert_msg(rc == 1, "revoke with its commit cut: %d: %s", rc, text);
        free(text);
        ck_assert_msg(s_file_exists(cert_dir, "avim.cert"),
                      "the certificate was not put back (%s)", bodies[i]);
        s_cert_key(cert_dir, "avim.cert", key, expires);
        ck_assert_str_eq(key, before);
        ck_assert(!s_file_exists(cert_dir, ".avim.cert.kept"));
        kh_error_t err;
        kh_partner_t p;
        ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
        ck_assert(!p.revoked);
        khtest_db_exec(conn, "DROP TRIGGER kh_test_cut ON partners", 0, NULL);
        khtest_db_exec(conn, "DROP FUNCTION kh_test_cut()", 0, NULL);
    }
    char *text = NULL;
    ck_assert_int_eq(
        KHTEST_CTL(&text, "partner", "revoke", "avim", "--cert-dir", cert_dir),
        0);
    free(text);
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(!s_file_exists(cert_dir, ".avim.cert.kept"));
    khtest_rmtree(cert_dir);
    free(cert_dir);
    khtest_rmtree(out);
    free(out);
    PQfinish(conn);
}
END_TEST

/* A rotation cut short between its files and its commit (the tool killed,
 * the machine down) leaves the directory admitting the key the registry
 * still has, without an end; two rotations of one partner from two shells
 * leave the files of the one committed last, also when the second fails
 * after the first committed. */
START_TEST(test_rotate_cut_short)
{
    PGconn *conn = khtest_db_fresh(DB);
    char *conninfo = khtest_db_conninfo(DB);
    char *cert_dir = khtest_tmpdir();
    kh_error_t err;
    zcert_t *first = kh_partner_cert_new("avim", &err);
    ck_assert_int_eq(kh_partner_register(conn, "avim", "AVIM",
                                         KH_PARTNER_POLICE, true,
                                         zcert_public_txt(first), &err),
                     0);
    ck_assert_int_eq(kh_partner_cert_install(first, "avim", cert_dir, &err), 0);

    /* Cut short: the connection ends without COMMIT and the files are
     * left as staged. */
    zcert_t *second = kh_partner_cert_new("avim", &err);
    char previous[KH_PARTNER_KEY_LEN + 1], until[40];
    char key[KH_PARTNER_KEY_LEN + 1], expires[40];
    PGconn *cut = PQconnectdb(conninfo);
    ck_assert_int_eq(PQstatus(cut), CONNECTION_OK);
    s_rotate_staged(cut, "avim", second, cert_dir, previous, until);
    PQfinish(cut);
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, zcert_public_txt(first));
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, zcert_public_txt(first));
    ck_assert_str_eq(expires, "");
    zcert_destroy(&second);

    /* Two shells: A commits and is slow to end its files; B, which waited
     * for A's commit on the partner's row, fails after it. */
    zcert_t *a = kh_partner_cert_new("avim", &err);
    zcert_t *b = kh_partner_cert_new("avim", &err);
    int lock = kh_partner_cert_lock("avim", cert_dir, &err);
    ck_assert_int_ge(lock, 0);
    s_rotate_staged(conn, "avim", a, cert_dir, previous, until);
    ck_assert_int_eq(kh_db_exec(conn, "COMMIT", &err), 0);
    pid_t child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        close(lock); /* the parent's lock, not this process's */
        PGconn *other = PQconnectdb(conninfo);
        char prev_b[KH_PARTNER_KEY_LEN + 1], until_b[40];
        int fd = kh_partner_cert_lock("avim", cert_dir, &err);
        int ok = PQstatus(other) == CONNECTION_OK && fd >= 0 &&
                 kh_db_exec(other, "BEGIN", &err) == 0 &&
                 kh_partner_rotate(other, "avim", zcert_public_txt(b), 3600,
                                   prev_b, until_b, &err) == 0 &&
                 kh_partner_cert_rotate(b, "avim", prev_b, cert_dir, &err) == 0;
        kh_db_rollback_quietly(other);
        ok = ok && kh_partner_cert_rotate_end("avim", cert_dir, false, prev_b,
                                              until_b, &err) == 0;
        kh_partner_cert_unlock(&fd);
        PQfinish(other);
        _exit(ok ? 0 : 1);
    }
    usleep(300 * 1000);
    ck_assert_int_eq(kh_partner_cert_rotate_end("avim", cert_dir, true,
                                                previous, until, &err),
                     0);
    kh_partner_cert_unlock(&lock);
    int status = 0;
    ck_assert_int_eq(waitpid(child, &status, 0), child);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, zcert_public_txt(a));
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, zcert_public_txt(first));
    ck_assert_str_eq(expires, until);
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    ck_assert_str_eq(p.public_key, zcert_public_txt(a));

    zcert_destroy(&a);
    zcert_destroy(&b);
    zcert_destroy(&first);
    khtest_rmtree(cert_dir);
    free(cert_dir);
    free(conninfo);
    PQfinish(conn);
}
END_TEST

/* Whether a hidden copy that a rotation keeps of partner id's files is in
 * cert_dir. */
static bool s_kept_any(const char *cert_dir, const char *id)
{
    char cert[128], previous[128];
    snprintf(cert, sizeof cert, ".%s.cert.kept", id);
    snprintf(previous, sizeof previous, ".%s.previous.cert.kept", id);
    return s_file_exists(cert_dir, cert) || s_file_exists(cert_dir, previous);
}

/* Cut short a rotation of avim (files staged, no COMMIT, no end) on a
 * connection of its own: it leaves the hidden copies of the files it
 * replaced, and the directory admitting the registry's key. */
static void s_rotate_killed(PGconn *conn, const char *cert_dir)
{
    kh_error_t err;
    zcert_t *cert = kh_partner_cert_new("avim", &err);
    ck_assert_ptr_nonnull(cert);
    PGconn *cut = PQconnectdb(getenv("KH_DATABASE_URL"));
    ck_assert_int_eq(PQstatus(cut), CONNECTION_OK);
    char previous[KH_PARTNER_KEY_LEN + 1], until[40];
    s_rotate_staged(cut, "avim", cert, cert_dir, previous, until);
    PQfinish(cut);
    zcert_destroy(&cert);
    ck_assert(s_file_exists(cert_dir, ".avim.cert.kept"));
    kh_partner_t p;
    ck_assert_int_eq(kh_partner_get(conn, "avim", &p, &err), 0);
    char key[KH_PARTNER_KEY_LEN + 1], expires[40];
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, p.public_key);
}

/* The hidden copies that a rotation cut short leaves in the partner
 * directory go with the next rotation, revocation or addition of that
 * partner, which make its files anew under its lock; what admits the
 * partner is what the registry says. */
START_TEST(test_kept_copies_of_a_rotation_cut_short_go)
{
    PGconn *conn = s_ctl_db();
    char *cert_dir = khtest_tmpdir();
    char *out[4];
    for (int i = 0; i < 4; i++)
        out[i] = khtest_tmpdir();
    s_migrated_with_avim(cert_dir, out[0]);
    char *text = NULL;
    int rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir",
                        cert_dir, "--out", out[1], "--overlap", "2");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    ck_assert(!s_kept_any(cert_dir, "avim"));

    /* Cut short during an overlap: both files were kept. */
    s_rotate_killed(conn, cert_dir);
    ck_assert(s_file_exists(cert_dir, ".avim.previous.cert.kept"));
    rc = KHTEST_CTL(&text, "partner", "rotate", "avim", "--cert-dir", cert_dir,
                    "--out", out[2], "--overlap", "2");
    ck_assert_msg(rc == 0, "partner rotate: %s", text);
    free(text);
    ck_assert(!s_kept_any(cert_dir, "avim"));
    char key[KH_PARTNER_KEY_LEN + 1], want[KH_PARTNER_KEY_LEN + 1];
    char expires[40];
    s_cert_key(out[2], "avim.cert", want, expires);
    s_cert_key(cert_dir, "avim.cert", key, expires);
    ck_assert_str_eq(key, want);
    s_cert_key(out[1], "avim.cert", want, expires);
    s_cert_key(cert_dir, "avim.previous.cert", key, expires);
    ck_assert_str_eq(key, want); /* the registry's key before */
    ck_assert_str_ne(expires, "");

    /* Cut short, then revoked: nothing of the partner is left. */
    s_rotate_killed(conn, cert_dir);
    rc = KHTEST_CTL(&text, "partner", "revoke", "avim", "--cert-dir", cert_dir);
    ck_assert_msg(rc == 0, "partner revoke: %s", text);
    free(text);
    ck_assert(!s_kept_any(cert_dir, "avim"));
    ck_assert(!s_file_exists(cert_dir, "avim.cert"));
    ck_assert(!s_file_exists(cert_dir, "avim.previous.cert"));

    /* Copies of a partner the registry does not have (a database restored
     * without it) go when a partner of that id is added. */
    char from[4096], to[4096];
    snprintf(from, sizeof from, "%s/avim.cert", out[1]);
    snprintf(to, sizeof to, "%s/.gemeente.cert.kept", cert_dir);
    ck_assert_int_eq(link(from, to), 0);
    snprintf(to, sizeof to, "%s/.gemeente.previous.cert.kept", cert_dir);
    ck_assert_int_eq(link(from, to), 0);
    rc = KHTEST_CTL(&text, "partner", "add", "gemeente", "--name", "Gemeente",
                    "--kind", "municipality", "--cert-dir", cert_dir, "--out",
                    out[3]);
    ck_assert_msg(rc == 0, "partner add: %s", text);
    free(text);
    ck_assert(!s_kept_any(cert_dir, "gemeente"));
    s_cert_key(out[3], "gemeente.cert", want, expires);
    s_cert_key(cert_dir, "gemeente.cert", key, expires);
    ck_assert_str_eq(key, want);

    khtest_rmtree(cert_dir);
    free(cert_dir);
    for (int i = 0; i < 4; i++) {
        khtest_rmtree(out[i]);
        free(out[i]);
    }
    PQfinish(conn);
}
END_TEST

/* hub keygen writes its secret into a file of its own: not through a
 * symbolic link at DIR/hub.cert_secret (to a file of someone else's
 * choosing), with or without --force. */
START_TEST(test_hub_keygen_never_writes_through_a_link)
{
    char *hub = khtest_tmpdir();
    char *elsewhere = khtest_tmpdir();
    char secret[4096], target[4096], text_path[4096];
    snprintf(secret, sizeof secret, "%s/hub.cert_secret", hub);
    snprintf(target, sizeof target, "%s/taken", elsewhere);
    snprintf(text_path, sizeof text_path, "%s/kept", elsewhere);
    char *text = NULL;

    /* A link to nothing is a file there: refused without --force. */
    ck_assert_int_eq(symlink(target, secret), 0);
    ck_assert_int_eq(KHTEST_CTL(&text, "hub", "keygen", "--out", hub), 1);
    free(text);
    ck_assert_msg(access(target, F_OK) != 0, "the secret went through a link");

    /* --force replaces the link, and the file it named stays as it was. */
    ck_assert_int_eq(
        KHTEST_CTL(&text, "hub", "keygen", "--out", hub, "--force"), 0);
    free(text);
    ck_assert_msg(access(target, F_OK) != 0, "the secret went through a link");
    unlink(secret);
    FILE *f = fopen(text_path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("not a key\n", f);
    fclose(f);
    ck_assert_int_eq(chmod(text_path, 0644), 0);
    ck_assert_int_eq(symlink(text_path, secret), 0);
    ck_assert_int_eq(
        KHTEST_CTL(&text, "hub", "keygen", "--out", hub, "--force"), 0);
    free(text);
    char line[64] = "";
    f = fopen(text_path, "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_nonnull(fgets(line, sizeof line, f));
    fclose(f);
    ck_assert_str_eq(line, "not a key\n");

    /* What is there now is the secret, a file of mode 0600, and the
     * directory holds nothing else. */
    struct stat st;
    ck_assert_int_eq(lstat(secret, &st), 0);
    ck_assert(S_ISREG(st.st_mode));
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    zcert_t *cert = zcert_load(secret);
    ck_assert_ptr_nonnull(cert);
    zcert_destroy(&cert);
    DIR *dir = opendir(hub);
    ck_assert_ptr_nonnull(dir);
    size_t entries = 0;
    for (struct dirent *e; (e = readdir(dir));)
        entries += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(dir);
    ck_assert_uint_eq(entries, 2);
    khtest_rmtree(hub);
    khtest_rmtree(elsewhere);
    free(hub);
    free(elsewhere);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("partner");
    TCase *tc = tcase_create("partner");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_register_lookup_revoke);
    tcase_add_test(tc, test_duplicates_refused);
    tcase_add_test(tc, test_chain_director_never_handles_cases);
    tcase_add_test(tc, test_bad_input_refused);
    tcase_add_test(tc, test_cert_files);
    tcase_add_test(tc, test_ctl_list_fails_with_nothing_on_stdout);
    tcase_add_test(tc, test_ctl_certificate_not_written_whole_changes_nothing);
    tcase_add_test(tc, test_ctl_end_to_end);
    tcase_add_test(tc, test_ctl_options_given_twice_are_refused);
    tcase_add_test(tc, test_ctl_out_apart_from_cert_dir);
    tcase_add_test(tc, test_rotate);
    tcase_add_test(tc, test_rotate_commit_lost);
    tcase_add_test(tc, test_rotate_commit_answer_lost);
    tcase_add_test(tc, test_add_refused_keeps_the_certificate_it_found);
    tcase_add_test(tc, test_revoke_commit_refused);
    tcase_add_test(tc, test_rotate_cut_short);
    tcase_add_test(tc, test_kept_copies_of_a_rotation_cut_short_go);
    tcase_add_test(tc, test_hub_keygen_never_writes_through_a_link);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
