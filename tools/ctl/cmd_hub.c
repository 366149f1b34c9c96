/*
 * ketenhubctl hub keygen: make the hub's CURVE server certificate.
 * hub.cert (public) is what partners get; hub.cert_secret stays with the
 * hub's services.
 */
#include <czmq.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ctl.h"
#include "ketenhub/partner.h"

static void s_usage(FILE *out)
{
    fprintf(out, "usage: ketenhubctl hub keygen --out DIR [--force]\n"
                 "\n"
                 "Make the hub's CURVE key pair: DIR/hub.cert (public, give it "
                 "to partners)\n"
                 "and DIR/hub.cert_secret (mode 0600, for the hub's services "
                 "only).\n"
                 "\n"
                 "  --out DIR   where to write them (created, mode 0700, if "
                 "missing)\n"
                 "  --force     replace an existing key pair\n"
                 "  --help      this text\n");
}

/* Save cert as pub and secret: written into a new private directory in
 * out, synced, then renamed into place. zcert_save opens the names it is
 * given as they are: it wrote the new secret through a symbolic link
 * planted at DIR/hub.cert_secret, and into a file replaced under --force
 * with that file's mode (0644, say) until the chmod after. A rename
 * replaces a link rather than following it, and the new file has the mode
 * it was made with. Should the second rename fail, the secret it replaced
 * is put back: the two files stay a pair. 0, or -1. */
static int s_save(zcert_t *cert, const char *out, const char *pub,
                  const char *secret)
{
    char dir[4096], tpub[4200], tsecret[4200], old[4200];
    snprintf(dir, sizeof dir, "%s/.hub-keygen-XXXXXX", out);
    if (!mkdtemp(dir))
        return -1;
    snprintf(tpub, sizeof tpub, "%s/hub.cert", dir);
    snprintf(tsecret, sizeof tsecret, "%s/hub.cert_secret", dir);
    snprintf(old, sizeof old, "%s/old.cert_secret", dir);
    int rc = zcert_save(cert, tpub);
    if (rc == 0)
        rc = chmod(tsecret, 0600);
    /* Read back: zcert_save reports success whatever its writes did, and
     * on a full disk --force would put an empty secret in the place of a
     * working one. */
    if (rc == 0 && (!kh_partner_cert_holds(tpub, cert, false) ||
                    !kh_partner_cert_holds(tsecret, cert, true)))
        rc = -1;
    if (rc == 0)
        rc = kh_partner_sync_path(tpub) || kh_partner_sync_path(tsecret) ? -1
                                                                         : 0;
    bool kept = rc == 0 && link(secret, old) == 0;
    if (rc == 0)
        rc = rename(tsecret, secret);
    if (rc == 0 && rename(tpub, pub) != 0) {
        rc = -1;
        if (kept)
            rename(old, secret);
        else
            unlink(secret);
    }
    kh_partner_sync_path(out);
    unlink(tpub);
    unlink(tsecret);
    unlink(old);
    rmdir(dir);
    return rc;
}

static int s_keygen(const char *out, bool force)
{
    char pub[4096], secret[4096];
    if ((size_t) snprintf(pub, sizeof pub, "%s/hub.cert", out) >= 240 ||
        (size_t) snprintf(secret, sizeof secret, "%s/hub.cert_secret", out) >=
            240)
        return ctl_usage_error("hub keygen: --out path is too long");
    struct stat st;
    if (stat(out, &st) != 0) {
        if (errno != ENOENT || mkdir(out, 0700) != 0) {
            fprintf(stderr, "ketenhubctl: %s: cannot create directory: %s\n",
                    out, strerror(errno));
            return CTL_FAIL;
        }
    } else if (!S_ISDIR(st.st_mode)) {
        fprintf(stderr, "ketenhubctl: %s: not a directory\n", out);
        return CTL_FAIL;
    }
    /* lstat: a symbolic link there, even one to nothing, is a file
     * there. */
    if (!force && (lstat(secret, &st) == 0 || lstat(pub, &st) == 0)) {
        fprintf(stderr,
                "ketenhubctl: %s: a hub key pair exists already (use --force "
                "to replace it; partners then need the new hub.cert)\n",
                out);
        return CTL_FAIL;
    }
    if (!zsys_has_curve()) {
        fprintf(stderr, "ketenhubctl: libzmq has no CURVE support\n");
        return CTL_FAIL;
    }
    zcert_t *cert = zcert_new();
    if (!cert) {
        fprintf(stderr, "ketenhubctl: cannot make a CURVE key pair\n");
        return CTL_FAIL;
    }
    zcert_set_meta(cert, "name", "ketenhub");
    zcert_set_meta(cert, "role", "hub");
    if (s_save(cert, out, pub, secret) != 0) {
        fprintf(stderr, "ketenhubctl: %s: cannot write the hub key pair\n",
                out);
        zcert_destroy(&cert);
        return CTL_FAIL;
    }
    printf("hub public key: %s\n", zcert_public_txt(cert));
    printf("public certificate (give to partners): %s\n", pub);
    printf("secret certificate (hub services only): %s\n", secret);
    zcert_destroy(&cert);
    return CTL_OK;
}

int ctl_hub(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 ||
        strcmp(argv[1], "-h") == 0) {
        s_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? CTL_USAGE : CTL_OK;
    }
    if (strcmp(argv[1], "keygen") != 0)
        return ctl_usage_error("hub: unknown command '%s'", argv[1]);

    static const struct option options[] = {
        {"out", required_argument, NULL, 'o'},
        {"force", no_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *out = NULL;
    bool force = false;
    int c;
    ctl_name_command(argv);
    ctl_opts_t cli = {.repeatable = ""};
    optind = 1;
    while ((c = ctl_getopt(argc - 1, argv + 1, "o:fh", options, &cli)) != -1) {
        switch (c) {
        case 'o':
            out = optarg;
            break;
        case 'f':
            force = true;
            break;
        case 'h':
            s_usage(stdout);
            return CTL_OK;
        default:
            s_usage(stderr);
            return CTL_USAGE;
        }
    }
    if (optind != argc - 1)
        return ctl_usage_error("hub keygen: unexpected argument '%s'",
                               argv[optind + 1]);
    if (!out || !*out)
        return ctl_usage_error("hub keygen: --out DIR is required");
    if (ctl_out_dir_check("hub keygen", out) != CTL_OK)
        return CTL_USAGE;
    return s_keygen(out, force);
}
