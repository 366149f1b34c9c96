/*
 * ketenhub-partner: the reference partner tool. Submits referrals (JSON
 * files) to the hub, asks their status, pings. Prints the hub's answer as
 * one JSON line on stdout. `listen` receives the partner's deliveries
 * (listen.c); `keygen` makes the partner's own key pair, so that only its
 * public half goes to the hub's administrator.
 *
 * Exit codes: 0 accepted (or answered), 1 refused, 2 usage or unreadable
 * input, 3 hub unreachable or this key refused (at the handshake, or
 * REJECTED unknown_partner), 4 refused for now (the hub asked to retry
 * later, or took no more connections of this partner, and retries ran
 * out).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ketenhub/client.h"
#include "ketenhub/health.h"
#include "ketenhub/partner.h"
#include "ketenhub/proto.h"
#include "partner.h"

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhub-partner [options] submit FILE|- [--key KEY]\n"
            "       ketenhub-partner [options] status REFERRAL_ID\n"
            "       ketenhub-partner [options] ping\n"
            "       ketenhub-partner [options] listen (--dir DIR | --exec "
            "CMD) ...\n"
            "       ketenhub-partner keygen NAME --out DIR\n"
            "options (environment variable in brackets):\n"
            "  --endpoint E   hub intake endpoint [KH_ENDPOINT]\n"
            "                 (default tcp://127.0.0.1:7701); for listen the\n"
            "                 delivery endpoint [KH_DELIVERY_ENDPOINT]\n"
            "                 (default tcp://127.0.0.1:7703)\n"
            "  --hub-cert F   hub's public certificate [KH_HUB_PUBLIC_CERT]\n"
            "  --cert F       this partner's certificate, with F_secret\n"
            "                 beside it [KH_PARTNER_CERT]\n"
            "  --timeout MS   wait per attempt (default 5000)\n"
            "  --retries N    resend after a timeout or a retryable\n"
            "                 refusal (default 3)\n"
            "  --key KEY      idempotency key (default: derived from the\n"
            "                 referral's content, so a resend is safe)\n"
            "exit: 0 accepted, 1 refused, 2 usage, 3 unreachable or key\n"
            "      refused, 4 refused for now (retry later)\n"
            "Run `ketenhub-partner listen --help` for the delivery side.\n");
}

static const char *s_env(const char *name, const char *fallback)
{
    const char *value = getenv(name);
    return value && *value ? value : fallback;
}

/* Exit code for a reply (or its absence). */
static int s_outcome(const json_t *reply, const kh_error_t *err)
{
    if (!reply) {
        fprintf(stderr, "ketenhub-partner: %s%s%s (%s)\n", err->path,
                *err->path ? ": " : "", err->message, kh_error_name(err->code));
        /* A referral too deep to encode, or too large for a frame, never
         * left: the hub would refuse or drop it just the same, and no
         * resend can help. */
        if (err->code == KH_E_TOO_DEEP || err->code == KH_E_TOO_LARGE)
            return S_EXIT_REFUSED;
        /* The hub took no more connections of this partner for now. */
        return err->code == KH_E_THROTTLED ? S_EXIT_RETRY_LATER
                                           : S_EXIT_UNREACHABLE;
    }
    char *text = json_dumps(reply, JSON_COMPACT | JSON_SORT_KEYS);
    if (text)
        printf("%s\n", text);
    free(text);
    const char *cmd = kh_client_reply_cmd(reply);
    if (strcmp(cmd, "REJECTED") != 0)
        return S_EXIT_OK;
    /* A key in the hub's directory but revoked in its registry: refused
     * as surely as at the handshake, and nothing in the request can fix
     * it (listen exits 3 for it too). */
    const char *code = json_string_value(json_object_get(reply, "code"));
    if (code && strcmp(code, "unknown_partner") == 0)
        return S_EXIT_UNREACHABLE;
    return json_is_true(json_object_get(reply, "retryable"))
               ? S_EXIT_RETRY_LATER
               : S_EXIT_REFUSED;
}

/* The referral in file ("-": standard input), or NULL after saying why
 * on stderr. A file is opened without blocking and checked before it is
 * read: a directory is no referral (jansson would call it an empty
 * document), and a FIFO would hold the tool until some writer came; pipe
 * a referral to standard input instead. */
static json_t *s_read_referral(const char *file)
{
    json_error_t jerr;
    json_t *doc = NULL;
    if (strcmp(file, "-") == 0)
        doc = json_loadf(stdin, JSON_REJECT_DUPLICATES, &jerr);
    else {
        int fd = open(file, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
        struct stat st;
        if (fd < 0) {
            fprintf(stderr, "ketenhub-partner: %s: unable to open %s: %s\n",
                    file, file, strerror(errno));
            return NULL;
        }
        if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
            fprintf(stderr,
                    "ketenhub-partner: %s: not a regular file (give - to "
                    "read the referral from standard input)\n",
                    file);
            close(fd);
            return NULL;
        }
        doc = json_loadfd(fd, JSON_REJECT_DUPLICATES, &jerr);
        close(fd);
    }
    if (!doc && jerr.line < 1) /* not read at all: no line to name */
        fprintf(stderr, "ketenhub-partner: %s: %s\n", file, jerr.text);
    else if (!doc)
        fprintf(stderr, "ketenhub-partner: %s:%d:%d: %s\n", file, jerr.line,
                jerr.column, jerr.text);
    return doc;
}

static void s_usage_keygen(FILE *out)
{
    fprintf(out,
            "usage: ketenhub-partner keygen NAME --out DIR\n"
            "\n"
            "Make this partner's CURVE key pair: DIR/NAME.cert (public) and\n"
            "DIR/NAME.cert_secret (0600; DIR is created 0700). Send only\n"
            "NAME.cert to the hub's administrator, who registers it with\n"
            "`ketenhubctl partner add|rotate ... --public-cert`; the secret\n"
            "never leaves you. NAME is your partner id at the hub\n"
            "(^[a-z][a-z0-9-]{1,31}$). Existing files are never replaced.\n"
            "exit: 0 made, 1 could not write, 2 usage\n");
}

static int s_keygen(int argc, char **argv)
{
    static const struct option options[] = {
        {"out", required_argument, NULL, 'o'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *out = NULL;
    int opt;
    optind = 0; /* a new scan, in GNU order: NAME may come first */
    while ((opt = getopt_long(argc, argv, "o:h", options, NULL)) != -1) {
        if (opt == 'o')
            out = optarg;
        else {
            s_usage_keygen(opt == 'h' ? stdout : stderr);
            return opt == 'h' ? S_EXIT_OK : S_EXIT_USAGE;
        }
    }
    if (optind + 1 != argc || !out || !*out) {
        s_usage_keygen(stderr);
        return S_EXIT_USAGE;
    }
    const char *name = argv[optind];
    if (!kh_partner_id_valid(name)) {
        fprintf(stderr, "ketenhub-partner: keygen: NAME must match "
                        "^[a-z][a-z0-9-]{1,31}$\n");
        return S_EXIT_USAGE;
    }
    kh_error_t err;
    zcert_t *cert = kh_partner_cert_new(name, &err);
    int rc = cert ? kh_partner_cert_export(cert, name, out, &err) : -1;
    if (rc == 0)
        printf("public key: %s\n"
               "send %s/%s.cert to the hub's administrator; keep "
               "%s/%s.cert_secret here\n",
               zcert_public_txt(cert), out, name, out, name);
    else
        fprintf(stderr, "ketenhub-partner: %s%s%s (%s)\n", err.path,
                *err.path ? ": " : "", err.message, kh_error_name(err.code));
    zcert_destroy(&cert);
    return rc == 0 ? S_EXIT_OK : S_EXIT_REFUSED;
}

long partner_number(const char *text, long min, long max)
{
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno || end == text || *end || v < min || v > max)
        return -1;
    return v;
}

int main(int argc, char **argv)
{
    const char *endpoint = s_env("KH_ENDPOINT", "tcp://127.0.0.1:7701");
    const char *endpoint_opt = NULL; /* --endpoint as given */
    const char *hub_cert = s_env("KH_HUB_PUBLIC_CERT", NULL);
    const char *cert = s_env("KH_PARTNER_CERT", NULL);
    const char *key = NULL;
    int timeout = 5000, retries = 3;
    static const struct option options[] = {
        {"endpoint", required_argument, NULL, 'e'},
        {"hub-cert", required_argument, NULL, 'H'},
        {"cert", required_argument, NULL, 'c'},
        {"timeout", required_argument, NULL, 't'},
        {"retries", required_argument, NULL, 'r'},
        {"key", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "+h", options, NULL)) != -1) {
        switch (opt) {
        case 'e':
            endpoint = endpoint_opt = optarg;
            break;
        case 'H':
            hub_cert = optarg;
            break;
        case 'c':
            cert = optarg;
            break;
        case 't':
            timeout = (int) partner_number(optarg, 1, INT_MAX);
            break;
        case 'r':
            retries = (int) partner_number(optarg, 0, 1000);
            break;
        case 'k':
            key = optarg;
            break;
        case 'h':
            s_usage(stdout);
            return S_EXIT_OK;
        case 'V':
            printf("ketenhub-partner %s\n", kh_version());
            return S_EXIT_OK;
        default:
            s_usage(stderr);
            return S_EXIT_USAGE;
        }
    }
    int first = optind;
    if (first < argc && strcmp(argv[first], "keygen") == 0)
        return s_keygen(argc - first, argv + first);
    if (first < argc && strcmp(argv[first], "listen") == 0)
        return partner_listen(argc - first, argv + first, endpoint_opt,
                              hub_cert, cert);
    /* Options may also follow the command and its argument (submit FILE
     * --key K, as the usage writes it). getopt stops at the first word
     * that is not an option (the "+"): that word is the command's one
     * argument, and the scan goes on after it. A second such word is a
     * usage error, not something to ignore. */
    const char *arg = NULL;
    optind = first + 1;
    while (first < argc) {
        opt = getopt_long(argc, argv, "+h", options, NULL);
        if (opt == -1) {
            if (optind >= argc)
                break;
            if (arg) {
                s_usage(stderr);
                return S_EXIT_USAGE;
            }
            arg = argv[optind++];
        } else if (opt == 'k')
            key = optarg;
        else if (opt == 't')
            timeout = (int) partner_number(optarg, 1, INT_MAX);
        else if (opt == 'r')
            retries = (int) partner_number(optarg, 0, 1000);
        else {
            s_usage(stderr);
            return S_EXIT_USAGE;
        }
    }
    if (first >= argc || timeout <= 0 || retries < 0) {
        s_usage(stderr);
        return S_EXIT_USAGE;
    }
    const char *command = argv[first];
    bool needs_arg = strcmp(command, "ping") != 0;
    if ((needs_arg && !arg) || (!needs_arg && arg) ||
        (strcmp(command, "submit") && strcmp(command, "status") &&
         strcmp(command, "ping"))) {
        s_usage(stderr);
        return S_EXIT_USAGE;
    }
    /* A key the hub would refuse is the command line's mistake: said
     * now, as a usage error, rather than sent to come back as a refused
     * referral (exit 1) or, with the hub away, as a timeout (exit 3). */
    if (key && !kh_proto_idem_key_valid(key)) {
        fprintf(stderr,
                "ketenhub-partner: --key must be 1 to %d characters "
                "of A-Z a-z 0-9 . _ : -\n",
                KH_IDEM_KEY_MAX);
        return S_EXIT_USAGE;
    }
    if (!hub_cert || !cert) {
        fprintf(stderr, "ketenhub-partner: --hub-cert and --cert (or "
                        "KH_HUB_PUBLIC_CERT and KH_PARTNER_CERT) are "
                        "required\n");
        return S_EXIT_USAGE;
    }

    json_t *referral = NULL;
    char derived_key[72];
    if (strcmp(command, "submit") == 0) {
        referral = s_read_referral(arg);
        if (!referral)
            return S_EXIT_USAGE;
        if (!key) {
            char hash[65];
            if (kh_payload_hash(referral, hash)) {
                json_decref(referral);
                return S_EXIT_USAGE;
            }
            snprintf(derived_key, sizeof derived_key, "sha256:%s", hash);
            key = derived_key;
        }
    } else if (strcmp(command, "status") == 0 && !kh_uuid_valid(arg)) {
        fprintf(stderr, "ketenhub-partner: %s is not a referral id\n", arg);
        return S_EXIT_USAGE;
    }

    kh_error_t err;
    kh_client_t *client = kh_client_new(endpoint, hub_cert, cert, &err);
    if (!client) {
        fprintf(stderr, "ketenhub-partner: %s\n", err.message);
        json_decref(referral);
        return S_EXIT_USAGE;
    }
    kh_client_set_retries(client, retries);
    json_t *reply = NULL;
    if (referral)
        reply = kh_client_submit(client, referral, key, timeout, &err);
    else if (strcmp(command, "status") == 0)
        reply = kh_client_status(client, arg, timeout, &err);
    else {
        json_t *ping = json_pack("{s:s}", "cmd", "PING");
        reply = kh_client_request(client, ping, timeout, &err);
        json_decref(ping);
    }
    int rc = s_outcome(reply, &err);
    json_decref(reply);
    json_decref(referral);
    kh_client_destroy(&client);
    return rc;
}
