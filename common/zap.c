/*
 * A ZAP handler for a service's loop (see zap.h).
 *
 * The partner directory is read here rather than through zcertstore: that
 * class aborts the process on two files with the same key, and a copied
 * certificate must not be able to stop the hub.
 */
#include "ketenhub/zap.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ketenhub/health.h"
#include "ketenhub/log.h"

#define S_ZAP_ENDPOINT "inproc://zeromq.zap.01"
/* Bytes CURVE adds to a frame on the wire (libzmq 4.x): the command name
 * "\x07MESSAGE" (8), the short nonce (8), the box's MAC (16) and the
 * flags byte inside the box (1). */
#define S_CURVE_MESSAGE_OVERHEAD 33

struct _kh_zap_t {
    zsock_t *rep;
    char *only_key;   /* the one admitted key, or NULL */
    char *cert_dir;   /* or the directory of admitted certificates */
    char *domain;     /* a ZAP domain with its own single key, or NULL */
    char *domain_key; /* the one key admitted in that domain */
    zhashx_t *keys;   /* Z85 public key -> its expiry (time_t, 0: none) */
    bool next_bound;  /* a socket serves the next hub key too */
    zhashx_t *told;   /* "current KEY" / "next KEY": said in the log */
    time_t modified;  /* the directory as last read */
    int64_t changed;  /* its newest status change then (s_last_change) */
    time_t read_at;   /* when it was read */
    size_t count, size;
    /* May refuse a partner key the directory admits, or NULL. */
    kh_zap_gate_fn gate;
    void *gate_arg;
};

/* When a certificate's key stops admitting its partner: its metadata
 * expires-at (RFC 3339 UTC, written by a key rotation for the key it
 * replaced), or 0 for never. An expiry that cannot be read counts as
 * passed. */
static time_t s_expiry(zcert_t *cert)
{
    const char *text = zcert_meta(cert, "expires-at");
    if (!text)
        return 0;
    struct tm tm = {0};
    const char *end = strptime(text, "%Y-%m-%dT%H:%M:%SZ", &tm);
    time_t at = end && *end == '\0' ? timegm(&tm) : (time_t) -1;
    return at > 0 ? at : 1;
}

/* The newest status change (ctime, in ns) of the directory at path and
 * of its files, which no one can set: a certificate replaced in place by
 * one of the same size with its old time kept (cp -p, rsync -a) changes
 * neither the newest modification time, nor the count, nor the size. */
static int64_t s_last_change(zdir_t *dir, const char *path)
{
    struct stat st;
    int64_t newest = 0;
    if (stat(path, &st) == 0)
        newest = (int64_t) st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
    zfile_t **files = zdir_flatten(dir);
    for (size_t i = 0; files && files[i]; i++)
        if (stat(zfile_filename(files[i], NULL), &st) == 0) {
            int64_t at =
                (int64_t) st.st_ctim.tv_sec * 1000000000 + st.st_ctim.tv_nsec;
            newest = at > newest ? at : newest;
        }
    zdir_flatten_free(&files);
    return newest;
}

/* Re-read the partner directory if it changed since the last look. */
static void s_refresh(kh_zap_t *self)
{
    if (!self->cert_dir)
        return;
    /* Its files alone ("-"): a subdirectory is no partner's, and one that
     * cannot be read would end the process (CZMQ asserts on it). */
    zdir_t *dir = zdir_new(self->cert_dir, "-");
    if (!dir) {
        /* A directory that is gone admits nobody; one that cannot be read
         * now (no file descriptor left) keeps the keys last read, rather
         * than refusing every partner, whose clients would stop for good
         * at the refusal. */
        struct stat st;
        if (stat(self->cert_dir, &st) != 0 ? errno == ENOENT || errno == ENOTDIR
                                           : !S_ISDIR(st.st_mode)) {
            zhashx_purge(self->keys);
            self->count = 0;
        }
        return;
    }
    /* A change in the second the directory was last read in may not have
     * moved its time (timestamps come from a clock that may tick coarsely):
     * such a reading is done again. A time in the future (a file's, set
     * by anyone, or the clock set back) is no such second: it would have
     * every handshake read every file until that time. */
    int64_t changed = s_last_change(dir, self->cert_dir);
    time_t now = time(NULL);
    time_t changed_s = (time_t) (changed / 1000000000);
    if (zdir_modified(dir) != self->modified ||
        zdir_count(dir) != self->count ||
        (size_t) zdir_cursize(dir) != self->size || changed != self->changed ||
        (self->modified >= self->read_at && self->modified <= now) ||
        (changed_s >= self->read_at && changed_s <= now)) {
        zhashx_purge(self->keys);
        zfile_t **files = zdir_flatten(dir);
        for (size_t i = 0; files && files[i]; i++) {
            const char *name = zfile_filename(files[i], NULL);
            size_t len = strlen(name);
            if (!zfile_is_regular(files[i]) ||
                (len > 7 && strcmp(name + len - 7, "_secret") == 0))
                continue;
            zcert_t *cert = zcert_load(name);
            time_t *expiry = cert ? malloc(sizeof *expiry) : NULL;
            if (expiry) {
                *expiry = s_expiry(cert);
                /* Of two files with one key, the one without an end (the
                 * current key) decides, else the later end. */
                time_t *other =
                    zhashx_lookup(self->keys, zcert_public_txt(cert));
                if (other && (*other == 0 || *expiry == 0))
                    *other = 0;
                else if (other && *expiry > *other)
                    *other = *expiry;
                if (other || zhashx_insert(self->keys, zcert_public_txt(cert),
                                           expiry) != 0)
                    free(expiry);
            }
            zcert_destroy(&cert);
        }
        zdir_flatten_free(&files);
        self->modified = zdir_modified(dir);
        self->read_at = time(NULL);
        self->count = zdir_count(dir);
        self->size = (size_t) zdir_cursize(dir);
        self->changed = changed;
    }
    zdir_destroy(&dir);
}

static void s_free_expiry(void **item)
{
    free(*item);
    *item = NULL;
}

kh_zap_t *kh_zap_new(const char *cert_dir, const char *only_key,
                     kh_error_t *err)
{
    struct stat info;
    if (!only_key &&
        (!cert_dir || stat(cert_dir, &info) || !S_ISDIR(info.st_mode))) {
        kh_error_set(err, KH_E_CONFIG, "KH_PARTNER_CERT_DIR",
                     "%s is not a directory", cert_dir ? cert_dir : "");
        return NULL;
    }
    /* A directory the service may not read (a mount owned by another
     * user, say) would admit no partner at all, with every handshake
     * refused and the service ready: a bad setting, said at start. */
    DIR *readable = only_key ? NULL : opendir(cert_dir);
    if (!only_key && !readable) {
        kh_error_set(err, KH_E_CONFIG, "KH_PARTNER_CERT_DIR",
                     "cannot read the directory %s: %s", cert_dir,
                     strerror(errno));
        return NULL;
    }
    if (readable)
        closedir(readable);
    kh_zap_t *self = calloc(1, sizeof *self);
    if (!self) {
        kh_error_set(err, KH_E_NOMEM, "", "out of memory");
        return NULL;
    }
    if (only_key)
        self->only_key = strdup(only_key);
    else
        self->cert_dir = strdup(cert_dir);
    self->keys = zhashx_new();
    if (self->keys)
        zhashx_set_destructor(self->keys, s_free_expiry);
    self->rep = zsock_new(ZMQ_REP);
    if (!(self->only_key || self->cert_dir) || !self->keys || !self->rep ||
        zsock_bind(self->rep, S_ZAP_ENDPOINT) != 0) {
        kh_error_set(err, KH_E_CURVE, "", "cannot start the authenticator");
        kh_zap_destroy(&self);
        return NULL;
    }
    s_refresh(self);
    return self;
}

void kh_zap_destroy(kh_zap_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_zap_t *self = *self_p;
    zsock_destroy(&self->rep);
    zhashx_destroy(&self->keys);
    zhashx_destroy(&self->told);
    free(self->cert_dir);
    free(self->only_key);
    free(self->domain);
    free(self->domain_key);
    free(self);
    *self_p = NULL;
}

int kh_zap_domain_key(kh_zap_t *self, const char *domain, const char *key,
                      kh_error_t *err)
{
    free(self->domain);
    free(self->domain_key);
    self->domain = strdup(domain);
    self->domain_key = strdup(key);
    if (!self->domain || !self->domain_key)
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    return 0;
}

zcert_t *kh_hub_cert_load(const char *path, kh_error_t *err)
{
    zcert_t *cert = zcert_load(path);
    if (!cert || !zcert_secret_txt(cert) ||
        strcmp(zcert_secret_txt(cert),
               "0000000000000000000000000000000000000000") == 0) {
        zcert_destroy(&cert);
        /* Why, when it is a file that cannot be read (its permissions, a
         * mount owned by another user): the administrator's next step. */
        char secret[4096];
        snprintf(secret, sizeof secret, "%s_secret", path);
        const char *unreadable = access(path, R_OK)     ? path
                                 : access(secret, R_OK) ? secret
                                                        : NULL;
        if (unreadable)
            kh_error_set(err, KH_E_CONFIG, "KH_HUB_CERT",
                         "cannot load the hub certificate and its secret key "
                         "from %s: cannot read %s: %s",
                         path, unreadable, strerror(errno));
        else
            kh_error_set(err, KH_E_CONFIG, "KH_HUB_CERT",
                         "cannot load the hub certificate and its secret key "
                         "from %s",
                         path);
        return NULL;
    }
    return cert;
}

int kh_zap_bind_next(kh_zap_t *self, zsock_t *sock, const char *cert_path,
                     const char *endpoint, const char *setting, kh_error_t *err)
{
    cert_path = cert_path ? cert_path : "";
    endpoint = endpoint ? endpoint : "";
    if (!*cert_path || strcmp(cert_path, "none") == 0)
        return 0; /* the endpoint alone: where a next key would be */
    if (!*endpoint)
        return kh_error_set(err, KH_E_CONFIG, setting,
                            "KH_HUB_CERT_NEXT needs %s: the next key is "
                            "served on an endpoint of its own",
                            setting);
    zcert_t *next = kh_hub_cert_load(cert_path, err);
    if (!next) {
        snprintf(err->path, sizeof err->path, "KH_HUB_CERT_NEXT");
        return -1;
    }
    if (!self->told && !(self->told = zhashx_new())) {
        zcert_destroy(&next);
        return kh_error_set(err, KH_E_NOMEM, "", "out of memory");
    }
    /* Security options apply to the binds after them: the endpoints bound
     * before keep the key they were bound with. */
    zcert_apply(next, sock);
    zsock_set_zap_domain(sock, KH_ZAP_DOMAIN_NEXT);
    if (zsock_bind(sock, "%s", endpoint) == -1) {
        zcert_destroy(&next);
        return kh_error_set(err, KH_E_CONFIG, setting, "cannot bind %s: %s",
                            endpoint, zmq_strerror(zmq_errno()));
    }
    kh_health_note("hub_key_next", zcert_public_txt(next));
    zcert_destroy(&next);
    self->next_bound = true;
    return 0;
}

zsock_t *kh_curve_server_new(int type, zcert_t *cert, int64_t max_frame,
                             kh_error_t *err)
{
    zsock_t *sock = zsock_new(type);
    if (!sock) {
        kh_error_set(err, KH_E_INTERNAL, "", "cannot create a socket");
        return NULL;
    }
    zcert_apply(cert, sock);
    zsock_set_curve_server(sock, 1);
    /* ZMQ_MAXMSGSIZE bounds a message as it comes off the wire, and CURVE
     * wraps each frame in a MESSAGE command (its name, a nonce, a MAC and
     * a flags byte): set to max_frame alone, it dropped frames a few bytes
     * under the limit the protocol promises to read. The decoder checks
     * max_frame itself. */
    zsock_set_maxmsgsize(sock, max_frame + S_CURVE_MESSAGE_OVERHEAD);
    zsock_set_handshake_ivl(sock, KH_HANDSHAKE_MS);
    return sock;
}

zsock_t *kh_wake_push_new(zcert_t *hub, const char *endpoint,
                          const char *setting, kh_error_t *err)
{
    zsock_t *push = zsock_new(ZMQ_PUSH);
    if (!push) {
        kh_error_set(err, KH_E_INTERNAL, "", "cannot create a socket");
        return NULL;
    }
    zcert_apply(hub, push);
    zsock_set_curve_serverkey(push, zcert_public_txt(hub));
    zsock_set_sndhwm(push, 100);
    zsock_set_sndtimeo(push, 0);
    zsock_set_linger(push, 0);
    if (zsock_connect(push, "%s", endpoint)) {
        zsock_destroy(&push);
        kh_error_set(err, KH_E_CONFIG, setting, "cannot connect to %s",
                     endpoint);
        return NULL;
    }
    return push;
}

void kh_zap_set_gate(kh_zap_t *self, kh_zap_gate_fn gate, void *arg)
{
    self->gate = gate;
    self->gate_arg = arg;
}

zsock_t *kh_zap_socket(kh_zap_t *self)
{
    return self->rep;
}

/* Copy frame into out (size bytes) as a string; "" if it does not fit. */
static void s_frame_text(zframe_t *frame, char *out, size_t size)
{
    size_t len = frame ? zframe_size(frame) : 0;
    if (len >= size)
        len = 0;
    if (len)
        memcpy(out, zframe_data(frame), len);
    out[len] = '\0';
}

int kh_zap_handle(kh_zap_t *self, char key[41], char address[64])
{
    key[0] = '\0';
    address[0] = '\0';
    zmsg_t *request = zmsg_recv(self->rep);
    if (!request)
        return -1;
    /* version, request id, domain, address, identity, mechanism, key */
    zframe_t *version = zmsg_pop(request);
    zframe_t *request_id = zmsg_pop(request);
    zframe_t *domain = zmsg_pop(request);
    zframe_t *peer = zmsg_pop(request);
    zframe_t *identity = zmsg_pop(request);
    zframe_t *mechanism = zmsg_pop(request);
    zframe_t *credentials = zmsg_pop(request);
    s_frame_text(peer, address, 64);

    int rc = -1;
    if (version && zframe_streq(version, "1.0") && mechanism &&
        zframe_streq(mechanism, "CURVE") && credentials &&
        zframe_size(credentials) == 32) {
        zmq_z85_encode(key, zframe_data(credentials), 32);
        if (self->domain && domain && zframe_streq(domain, self->domain))
            rc = strcmp(key, self->domain_key) == 0 ? 0 : 1;
        else if (self->only_key)
            rc = strcmp(key, self->only_key) == 0 ? 0 : 1;
        else {
            s_refresh(self);
            const time_t *expiry = zhashx_lookup(self->keys, key);
            rc = expiry && (*expiry == 0 || time(NULL) < *expiry) ? 0 : 1;
            if (rc == 0 && self->gate &&
                !self->gate(self->gate_arg, key, address))
                rc = 2;
        }
    }
    /* While the next hub key is served beside the current one, which of
     * them each partner key uses, said once (the administrator's view of
     * who has moved). */
    if (rc == 0 && self->next_bound) {
        bool next = domain && zframe_streq(domain, KH_ZAP_DOMAIN_NEXT);
        char told[64];
        snprintf(told, sizeof told, "%s %s", next ? "next" : "current", key);
        if (!zhashx_lookup(self->told, told) &&
            zhashx_insert(self->told, told, self) == 0)
            kh_log_info("hub_key", "key=%s peer=%s hub_key=%s", key, address,
                        next ? "next" : "current");
    }
    zmsg_t *reply = zmsg_new();
    zmsg_addstr(reply, "1.0");
    if (request_id)
        zmsg_addmem(reply, zframe_data(request_id), zframe_size(request_id));
    else
        zmsg_addstr(reply, "");
    /* A gate's refusal is told as status 500, which CURVE sends the
     * client in its ERROR command before closing (a client sees it in its
     * handshake-failed event, kh_client as KH_E_THROTTLED), where 400 says
     * the key is refused. 300, the status meant for temporary failures,
     * is sent no ERROR: the connection would wait out the handshake's
     * timeout, and then come again. */
    zmsg_addstr(reply, rc == 0 ? "200" : rc == 2 ? "500" : "400");
    zmsg_addstr(reply, rc == 0   ? "OK"
                       : rc == 2 ? "too many connections"
                                 : "no access");
    zmsg_addstr(reply, rc == 0 ? key : ""); /* the User-Id of its frames */
    zmsg_addmem(reply, NULL, 0);            /* no metadata */
    zmsg_send(&reply, self->rep);

    zframe_destroy(&version);
    zframe_destroy(&request_id);
    zframe_destroy(&domain);
    zframe_destroy(&peer);
    zframe_destroy(&identity);
    zframe_destroy(&mechanism);
    zframe_destroy(&credentials);
    zmsg_destroy(&request);
    return rc;
}
