/*
 * ketenhub-partner listen: receive this partner's deliveries from the
 * hub's notification service (schemas/protocol.md, Deliveries) and hand
 * each one over durably before acknowledging it (promise 1):
 *
 *   --dir DIR   writes DIR/<delivery_id>.json (temp file, fsync, rename,
 *               fsync of DIR) and ACKs once that succeeded. A delivery
 *               whose file is already there (a re-send) is ACKed again
 *               without rewriting it, once that file and DIR are synced;
 *               a name taken by something that is not a file is NACKed.
 *   --exec CMD  pipes the same JSON to `sh -c CMD` and ACKs when it exits
 *               0; exit 3 NACKs it as permanent (a dead letter for the
 *               hub's administrator); any other status NACKs it for a
 *               later re-send. CMD sees re-sends too: it must drop
 *               duplicates by delivery_id.
 *
 * The JSON is {"delivery_id", "referral_id", "priority", "attempt",
 * "routed_at", "payload_sha256", "payload": {...}}, and for an escalation
 * copy "escalation_of": {"partner", "waiting_since"}. The payload's SHA-256
 * is checked first: a mismatch is NACKed for a re-send. HELLO goes out at
 * start and every second (the heartbeat; ZeroMQ reconnects by itself and
 * the next HELLO registers the new connection). One log line per delivery
 * with ids only, never a payload value.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <czmq.h>
#include <dirent.h>

#include "ketenhub/client.h"
#include "ketenhub/log.h"
#include "ketenhub/proto.h"
#include "partner.h"

#define S_HELLO_MS 1000    /* heartbeat */
#define S_SILENT_MS 3500   /* no WELCOME for this long: say so in the log */
#define S_DRAIN_MS 3000    /* at exit, wait this long for ACKED replies */
#define S_EXIT_PERMANENT 3 /* --exec status that means NACK permanent */
#define S_KILL_MS 2000     /* at a stop, CMD's time to end after SIGTERM */

typedef struct {
    kh_client_t *client;
    const char *dir;
    int dirfd;
    const char *exec;
    int exec_timeout_ms; /* --exec-timeout; 0: none */
    int window;
    long count;       /* 0: no limit */
    long done;        /* deliveries stored (or accepted by CMD) */
    uint64_t dropped; /* frames the client dropped, as last logged */
    int unconfirmed;  /* ACKs and NACKs sent without a reply yet */
    int64_t next_hello, last_welcome; /* last_welcome: or the start */
    bool connected; /* a WELCOME came since the start or the last silence */
    bool silent;    /* hub_silent logged, and no WELCOME since */
    sigset_t stop_signals;
    bool stopping;
    bool revoked;     /* REJECTED unknown_partner: this key is revoked */
    zlistx_t *reacks; /* s_reack_t: ACKs the hub could not commit yet */
} s_listener_t;

/* An ACK to send again once the hub can commit it. */
typedef struct {
    char id[37];
    int64_t due; /* zclock_mono */
} s_reack_t;

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: ketenhub-partner [options] listen (--dir DIR | --exec "
            "CMD)\n"
            "                        [--window N] [--count N] [--exec-timeout "
            "S]\n"
            "\n"
            "Receive this partner's deliveries and acknowledge each once it "
            "is stored.\n"
            "  --dir DIR    write DIR/<delivery_id>.json (mode 0600; it holds "
            "personal\n"
            "               data), then ACK; a delivery already there is "
            "ACKed again\n"
            "  --exec CMD   pipe the JSON to `sh -c CMD` (env KH_DELIVERY_ID, "
            "KH_REFERRAL_ID,\n"
            "               KH_PRIORITY); exit 0: ACK, 3: NACK permanent, "
            "other: NACK retry.\n"
            "               CMD also sees re-sends: drop duplicates by "
            "delivery_id\n"
            "  --window N   at most N unacknowledged deliveries at once "
            "(1-1024; the hub's\n"
            "               default with --dir, 1 with --exec, which runs one "
            "at a time)\n"
            "  --count N    exit after N deliveries stored\n"
            "  --exec-timeout S  end CMD (its process group) that runs longer "
            "than S\n"
            "               seconds (1-86400) and NACK its delivery for a "
            "re-send; keep it\n"
            "               below the hub's ACK timeout (default: no limit)\n"
            "endpoint: --endpoint, else KH_DELIVERY_ENDPOINT, else "
            "tcp://127.0.0.1:7703.\n"
            "log: logfmt lines on stderr; KH_LOG_LEVEL debug, info (default), "
            "warn or error.\n"
            "exit: 0 stopped (SIGINT, SIGTERM or --count), 2 usage, 3 key "
            "refused or revoked\n");
}

/* Whether a stop signal is pending (they are blocked in every thread and
 * read here, so no poll is cut short and no handler runs). */
static bool s_should_stop(s_listener_t *self)
{
    struct timespec zero = {0, 0};
    if (!self->stopping && sigtimedwait(&self->stop_signals, NULL, &zero) > 0) {
        kh_log_info("stopping", NULL);
        self->stopping = true;
    }
    return self->stopping;
}

/* Send HELLO when due. */
static void s_heartbeat(s_listener_t *self)
{
    int64_t now = zclock_mono();
    if (now < self->next_hello)
        return;
    kh_error_t err;
    if (kh_client_hello(self->client, self->window, &err))
        kh_log_debug("hello_not_sent", "code=%s", kh_error_name(err.code));
    self->next_hello = now + S_HELLO_MS;
}

/* Say in the log when the hub stopped answering, or never answered since
 * the start (nothing at the endpoint, a firewall, a hub certificate that
 * is not the hub's: ZeroMQ retries those quietly for ever). Once per
 * silence. Called only when a wait for the hub's messages came back
 * empty: while a delivery is handed over (a slow --exec command) the
 * WELCOMEs wait unread, and the hub is not silent for that. */
static void s_check_silence(s_listener_t *self)
{
    int64_t now = zclock_mono();
    if (self->silent || now - self->last_welcome <= S_SILENT_MS)
        return;
    if (self->connected)
        kh_log_warn("hub_silent", "ms=%" PRId64, now - self->last_welcome);
    else
        kh_log_warn("hub_silent",
                    "ms=%" PRId64 " reason=\"no WELCOME since the start: "
                    "check the endpoint, that the hub runs there and the "
                    "hub certificate\"",
                    now - self->last_welcome);
    self->connected = false;
    self->silent = true;
}

/* Write len bytes of text to fd; 0 or -1 (errno set). */
static int s_write_all(int fd, const char *text, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        text += n;
        len -= (size_t) n;
    }
    return 0;
}

/* The temp file of a delivery being stored: ".<id>.<16 hex>.tmp", the
 * suffix random, so that listeners on one DIR (two containers' listeners
 * may have the same pid) never write one file. Its writer holds an flock
 * on it from its creation until it is renamed into place: one that can be
 * locked is a dead writer's (s_remove_stale). */
#define S_TMP_FORMAT ".%s.%016" PRIx64 ".tmp"
#define S_TMP_SCAN ".%36[0-9a-f-].%16[0-9a-f].tmp%n"
#define S_TMP_MAX 64

/* Store text as DIR/<id>.json durably: a temp file created afresh (never
 * through a link), locked, written and synced, renamed into place, and
 * the directory synced, so the file is either whole or absent after a
 * crash. 0, or -1 with nothing left behind but possibly the temp file of
 * a crash. */
/* Create the temp file of delivery id, its name in tmp, and lock it: its
 * descriptor, or -1 (errno set). A listener that starts on DIR meanwhile
 * removes the temp files that nobody holds a lock on (s_remove_stale),
 * and may come between the creation and the lock: a file it removed has
 * no link left once locked, and is made again under a new name (else the
 * rename into place would fail, and the delivery be refused). */
static int s_create_locked(s_listener_t *self, const char *id,
                           char tmp[S_TMP_MAX])
{
    for (int tries = 0; tries < 8; tries++) {
        uint64_t suffix;
        if (getrandom(&suffix, sizeof suffix, 0) != (ssize_t) sizeof suffix)
            return -1;
        snprintf(tmp, S_TMP_MAX, S_TMP_FORMAT, id, suffix);
        int fd =
            openat(self->dirfd, tmp,
                   O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd < 0)
            return -1;
        int rc;
        while ((rc = flock(fd, LOCK_EX)) != 0 && errno == EINTR)
            ; /* the remover holds it only to unlink it */
        struct stat st;
        if (rc == 0 && (rc = fstat(fd, &st)) == 0 && st.st_nlink > 0)
            return fd;
        int saved = errno;
        close(fd);
        if (rc != 0) {
            unlinkat(self->dirfd, tmp, 0);
            errno = saved;
            return -1;
        }
    }
    errno = EAGAIN;
    return -1;
}

static int s_store(s_listener_t *self, const char *id, const char *text,
                   size_t len)
{
    char tmp[S_TMP_MAX], final[48];
    snprintf(final, sizeof final, "%s.json", id);
    int fd = s_create_locked(self, id, tmp);
    if (fd < 0)
        return -1;
    int rc = s_write_all(fd, text, len);
    if (rc == 0)
        rc = fsync(fd);
    /* Renamed while still locked: a listener starting meanwhile must not
     * take it for a dead writer's. */
    if (rc == 0)
        rc = renameat(self->dirfd, tmp, self->dirfd, final);
    int saved = errno;
    if (rc != 0)
        unlinkat(self->dirfd, tmp, 0);
    if (close(fd) != 0 && rc == 0) {
        rc = -1;
        saved = errno;
    }
    errno = saved;
    return rc == 0 ? fsync(self->dirfd) : -1;
}

/* Remove the temp files (see S_TMP_FORMAT; and ".<id>.<pid>.tmp", as
 * earlier versions named them) that a listener on DIR left when it died
 * while writing: each holds a delivery's personal data, which nothing
 * else will ever remove, and the hub sends that delivery again. Those
 * still locked by their writer (a second listener on DIR) are left to
 * it. Returns how many were removed. */
static int s_remove_stale(s_listener_t *self)
{
    int fd = dup(self->dirfd);
    DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
    if (!dir) {
        if (fd >= 0)
            close(fd);
        return 0;
    }
    int removed = 0;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        char id[40], suffix[20];
        int end = 0;
        if (sscanf(e->d_name, S_TMP_SCAN, id, suffix, &end) != 2 ||
            e->d_name[end] != '\0' || strlen(id) != 36)
            continue;
        int tmp = openat(self->dirfd, e->d_name,
                         O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (tmp < 0)
            continue;
        /* Locked: its writer is alive. */
        if (flock(tmp, LOCK_EX | LOCK_NB) == 0 &&
            unlinkat(self->dirfd, e->d_name, 0) == 0)
            removed++;
        close(tmp);
    }
    closedir(dir);
    if (removed)
        fsync(self->dirfd);
    return removed;
}

/* Whether DIR/<id>.json is already there (a re-send of a delivery stored
 * before), made durable now: 1 when it is a regular file and it and DIR
 * were synced, 0 when there is no such name, -1 (errno set) when the name
 * is taken by something else or a sync failed. The sync matters: a run
 * that was killed, or whose sync of DIR failed, after the rename left a
 * file whose name a crash of the machine can still take away, and the
 * ACK that follows must not come before it is durable. */
static int s_existing(s_listener_t *self, const char *id)
{
    char final[48];
    snprintf(final, sizeof final, "%s.json", id);
    int fd = openat(self->dirfd, final,
                    O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    struct stat st;
    int rc = fstat(fd, &st);
    if (rc == 0 && !S_ISREG(st.st_mode)) {
        errno = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
        rc = -1;
    }
    if (rc == 0)
        rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    if (rc == 0)
        rc = fsync(self->dirfd);
    return rc == 0 ? 1 : -1;
}

extern char **environ;

/* The environment of CMD: ours plus KH_DELIVERY_ID, KH_REFERRAL_ID and
 * KH_PRIORITY (made before fork: the child of a threaded process may only
 * call async-signal-safe functions). The strings are in vars[3]; NULL
 * when out of memory. */
static char **s_child_env(const json_t *deliver, char vars[3][96])
{
    static const char *const names[] = {"delivery_id", "referral_id",
                                        "priority"};
    static const char *const envs[] = {"KH_DELIVERY_ID", "KH_REFERRAL_ID",
                                       "KH_PRIORITY"};
    size_t n = 0;
    while (environ && environ[n])
        n++;
    char **env = calloc(n + 4, sizeof *env);
    if (!env)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        if (strncmp(environ[i], "KH_DELIVERY_ID=", 15) &&
            strncmp(environ[i], "KH_REFERRAL_ID=", 15) &&
            strncmp(environ[i], "KH_PRIORITY=", 12))
            env[k++] = environ[i];
    for (int i = 0; i < 3; i++) {
        snprintf(vars[i], 96, "%s=%s", envs[i],
                 json_string_value(json_object_get(deliver, names[i])));
        env[k++] = vars[i];
    }
    env[k] = NULL;
    return env;
}

/* Run `sh -c CMD` with text on its stdin; heartbeats go on while it runs.
 * CMD runs in a process group of its own: when a stop signal comes while
 * it runs, or it runs past --exec-timeout, the whole group (the shell and
 * what it started) gets SIGTERM, and SIGKILL S_KILL_MS later, so that a
 * slow or hung command cannot hold the listener (the delivery is NACKed
 * and comes again). Its stdin is written as it reads, never blocking: a
 * command that does not read a large delivery cannot hold the listener
 * either. Returns its exit status (128 + signal when killed), -1 when it
 * could not be started, or -2 when it was ended here: then it did not
 * finish, whatever its status says (one that catches SIGTERM may well exit
 * 0), and its delivery must not be ACKed. */
static int s_run(s_listener_t *self, const char *text, size_t len,
                 const json_t *deliver)
{
    char vars[3][96];
    char **env = s_child_env(deliver, vars);
    int pipefd[2];
    if (!env || pipe2(pipefd, O_CLOEXEC) != 0) {
        free(env);
        return -1;
    }
    char *argv[] = {"sh", "-c", (char *) self->exec, NULL};
    pid_t pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        free(env);
        return -1;
    }
    if (pid == 0) {
        /* Only async-signal-safe calls from here to exec. */
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(SIGPIPE, &dfl, NULL);
        setpgid(0, 0);
        if (dup2(pipefd[0], STDIN_FILENO) < 0)
            _exit(127);
        execve("/bin/sh", argv, env);
        _exit(127);
    }
    free(env);
    close(pipefd[0]);
    setpgid(pid, pid); /* either side may be first; the other fails */
    int in = pipefd[1];
    fcntl(in, F_SETFL, O_NONBLOCK);
    size_t sent = 0;
    int status;
    int64_t started = zclock_mono();
    int64_t kill_at = 0; /* when SIGKILL is due; 0: no stop yet */
    for (;;) {
        /* SIGPIPE is ignored: a command that does not read all of its
         * input only ends the writing; its exit status decides. */
        while (in >= 0 && sent < len) {
            ssize_t n = write(in, text + sent, len - sent);
            if (n > 0)
                sent += (size_t) n;
            else if (n < 0 && errno == EINTR)
                continue;
            else
                break;
        }
        if (in >= 0 && (sent == len || (errno != EAGAIN && errno != EINTR))) {
            close(in);
            in = -1;
        }
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            break;
        if (r < 0 && errno != EINTR) {
            if (in >= 0)
                close(in);
            return -1;
        }
        bool late = self->exec_timeout_ms > 0 &&
                    zclock_mono() - started >= self->exec_timeout_ms;
        if (!kill_at && (s_should_stop(self) || late)) {
            kh_log_warn(late ? "command_timeout" : "command_stopped", "pid=%d",
                        (int) pid);
            kill(-pid, SIGTERM);
            kill_at = zclock_mono() + S_KILL_MS;
        } else if (kill_at > 0 && zclock_mono() >= kill_at) {
            kill(-pid, SIGKILL);
            kill_at = -1;
        }
        s_heartbeat(self);
        zclock_sleep(20);
    }
    if (in >= 0)
        close(in);
    if (kill_at) {
        kill(-pid, SIGKILL); /* what CMD started and left behind */
        return -2;
    }
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

/* As PID 1 (a container's entrypoint with no init) the listener is the
 * parent of whatever a command left running when it ended: reap those
 * that have ended since, so that they do not fill the process table. Not
 * while a command runs (s_run waits for it by its pid). */
static void s_reap_orphans(void)
{
    if (getpid() != 1)
        return;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

static void s_log_delivery(const json_t *deliver, const char *outcome,
                           const char *detail)
{
    kh_log(strncmp(outcome, "nack", 4) == 0 ? KH_LOG_WARN : KH_LOG_INFO,
           "delivery",
           "delivery_id=%s referral_id=%s priority=%s "
           "attempt=%" JSON_INTEGER_FORMAT " outcome=%s%s%s",
           json_string_value(json_object_get(deliver, "delivery_id")),
           json_string_value(json_object_get(deliver, "referral_id")),
           json_string_value(json_object_get(deliver, "priority")),
           json_integer_value(json_object_get(deliver, "attempt")), outcome,
           detail ? " reason=" : "", detail ? detail : "");
}

static void s_answer(s_listener_t *self, const char *id, int nack,
                     bool permanent)
{
    kh_error_t err;
    int rc = nack ? kh_client_nack(self->client, id, permanent, &err)
                  : kh_client_ack(self->client, id, &err);
    if (rc == 0)
        self->unconfirmed++;
    else
        kh_log_warn("answer_not_sent", "delivery_id=%s code=%s", id,
                    kh_error_name(err.code));
}

/* One DELIVER: check, hand over, then ACK or NACK. */
static void s_deliver(s_listener_t *self, const json_t *msg)
{
    const char *id = json_string_value(json_object_get(msg, "delivery_id"));
    json_t *payload = NULL;
    kh_error_t err;
    int rc = kh_client_delivery_check(msg, &payload, &err);
    if (!id || !kh_uuid_valid(id)) {
        kh_log_error("delivery_malformed", "path=%s code=%s", err.path,
                     kh_error_name(err.code));
        json_decref(payload);
        return;
    }
    if (rc == -2) {
        s_log_delivery(msg, "nack_retry",
                       err.code == KH_E_NOMEM ? "out_of_memory"
                                              : "payload_sha256_mismatch");
        s_answer(self, id, true, false);
        return;
    }
    if (rc != 0) {
        kh_log_error("delivery_malformed", "delivery_id=%s path=%s code=%s", id,
                     err.path, kh_error_name(err.code));
        s_answer(self, id, true, true);
        return;
    }
    int there = self->dir ? s_existing(self, id) : 0;
    if (there != 0) {
        char reason[64];
        snprintf(reason, sizeof reason, "existing_file errno=%d", errno);
        s_log_delivery(msg, there > 0 ? "duplicate" : "nack_retry",
                       there > 0 ? NULL : reason);
        s_answer(self, id, there < 0, false);
        json_decref(payload);
        return;
    }
    json_t *doc =
        json_pack("{s:O, s:O, s:O, s:O, s:O, s:O, s:o}", "delivery_id",
                  json_object_get(msg, "delivery_id"), "referral_id",
                  json_object_get(msg, "referral_id"), "priority",
                  json_object_get(msg, "priority"), "attempt",
                  json_object_get(msg, "attempt"), "routed_at",
                  json_object_get(msg, "routed_at"), "payload_sha256",
                  json_object_get(msg, "payload_sha256"), "payload", payload);
    json_t *of = json_object_get(msg, "escalation_of");
    if (doc && of)
        json_object_set(doc, "escalation_of", of);
    char *text =
        doc ? json_dumps(doc, JSON_PRESERVE_ORDER | JSON_COMPACT) : NULL;
    json_decref(doc);
    if (!text) {
        s_log_delivery(msg, "nack_retry", "out_of_memory");
        s_answer(self, id, true, false);
        return;
    }
    size_t len = strlen(text);
    text[len] = '\n'; /* one line, ending in a newline */
    if (self->dir) {
        if (s_store(self, id, text, len + 1) == 0) {
            s_log_delivery(msg, "stored", NULL);
            s_answer(self, id, false, false);
            self->done++;
        } else {
            char reason[64];
            snprintf(reason, sizeof reason, "write_failed errno=%d", errno);
            s_log_delivery(msg, "nack_retry", reason);
            s_answer(self, id, true, false);
        }
    } else {
        int status = s_run(self, text, len + 1, msg);
        char reason[32];
        snprintf(reason, sizeof reason, "exit_%d", status);
        if (status == 0) {
            s_log_delivery(msg, "accepted", NULL);
            s_answer(self, id, false, false);
            self->done++;
        } else if (status == S_EXIT_PERMANENT) {
            s_log_delivery(msg, "nack_permanent", reason);
            s_answer(self, id, true, true);
        } else {
            s_log_delivery(msg, "nack_retry",
                           status == -2 ? "command_ended"
                           : status < 0 ? "cannot_start_command"
                                        : reason);
            s_answer(self, id, true, false);
        }
    }
    explicit_bzero(text, len); /* personal data: do not leave it in memory */
    free(text);
}

/* The wait an answer asks for (retry_after_ms), ms: at most 10 minutes,
 * the listener's own bound, so that a wrong value can neither overflow the
 * time it is added to nor leave the listener waiting for ever. */
static json_int_t s_retry_after(const json_t *msg)
{
    json_int_t after =
        json_integer_value(json_object_get(msg, "retry_after_ms"));
    return after < 0 ? 0 : after > 600000 ? 600000 : after;
}

/* A reply to an ACK or NACK (cid "ack:ID" / "nack:ID"). */
static void s_reply(s_listener_t *self, const json_t *msg, const char *cmd)
{
    const char *cid = json_string_value(json_object_get(msg, "cid"));
    bool ours =
        cid && (strncmp(cid, "ack:", 4) == 0 || strncmp(cid, "nack:", 5) == 0);
    if (!ours) {
        const char *code = json_string_value(json_object_get(msg, "code"));
        if (strcmp(cmd, "REJECTED") != 0)
            return;
        /* The key is known to the handshake but revoked in the registry:
         * that will not pass by itself. */
        if (code && strcmp(code, "unknown_partner") == 0)
            self->revoked = true;
        /* A HELLO over the hub's connections per partner: this connection
         * gets nothing, and a HELLO before retry_after_ms would be refused
         * again. The hub answered, so it is not silent meanwhile. */
        if (code && strcmp(code, "throttled") == 0 && cid &&
            strncmp(cid, "hello:", 6) == 0) {
            json_int_t after = s_retry_after(msg);
            self->next_hello =
                zclock_mono() + (after > S_HELLO_MS ? after : S_HELLO_MS);
            self->last_welcome = self->next_hello;
        }
        kh_log(self->revoked ? KH_LOG_ERROR : KH_LOG_WARN, "rejected",
               "cid=%s code=%s", cid ? cid : "", code ? code : "");
        return;
    }
    const char *id = strchr(cid, ':') + 1;
    if (strcmp(cmd, "REJECTED") == 0) {
        const char *code = json_string_value(json_object_get(msg, "code"));
        kh_log_warn("answer_rejected", "delivery_id=%s code=%s", id,
                    code ? code : "");
        /* The hub could not commit the ACK now: send it again after the
         * wait it asks for, without holding up the other deliveries. A
         * NACK is not repeated: the delivery comes again and is decided
         * again. */
        if (json_is_true(json_object_get(msg, "retryable")) &&
            strncmp(cid, "ack:", 4) == 0 && !self->stopping) {
            s_reack_t *again = calloc(1, sizeof *again);
            json_int_t after = s_retry_after(msg);
            if (again && strlen(id) < sizeof again->id) {
                snprintf(again->id, sizeof again->id, "%s", id);
                /* Never sooner than the hub asks: retry_after_ms is the
                 * least wait. */
                again->due = zclock_mono() + (after < 100 ? 100 : after);
                if (zlistx_add_end(self->reacks, again))
                    return; /* still unconfirmed */
            }
            free(again);
        }
    } else if (strcmp(cmd, "NACKED") == 0 &&
               json_is_true(json_object_get(msg, "dead")))
        kh_log_warn("delivery_dead", "delivery_id=%s", id);
    if (self->unconfirmed > 0)
        self->unconfirmed--;
}

static void s_handle(s_listener_t *self, const json_t *msg)
{
    const char *cmd = json_string_value(json_object_get(msg, "cmd"));
    if (strcmp(cmd, "DELIVER") == 0) {
        if (!self->stopping)
            s_deliver(self, msg);
    } else if (strcmp(cmd, "WELCOME") == 0) {
        self->last_welcome = zclock_mono();
        if (!self->connected)
            kh_log_info("welcome", "partner=%s window=%" JSON_INTEGER_FORMAT,
                        json_string_value(json_object_get(msg, "partner"))
                            ? json_string_value(json_object_get(msg, "partner"))
                            : "",
                        json_integer_value(json_object_get(msg, "window")));
        self->connected = true;
        self->silent = false;
    } else if (strcmp(cmd, "ACKED") == 0 || strcmp(cmd, "NACKED") == 0 ||
               strcmp(cmd, "REJECTED") == 0)
        s_reply(self, msg, cmd);
}

static void s_reack_free(void **item)
{
    free(*item);
    *item = NULL;
}

/* Send again the ACKs whose wait is over. */
static void s_reack_due(s_listener_t *self)
{
    int64_t now = zclock_mono();
    void *handle =
        zlistx_first(self->reacks) ? zlistx_cursor(self->reacks) : NULL;
    while (handle) {
        s_reack_t *item = zlistx_handle_item(handle);
        void *next =
            zlistx_next(self->reacks) ? zlistx_cursor(self->reacks) : NULL;
        if (item->due <= now) {
            kh_error_t err;
            if (kh_client_ack(self->client, item->id, &err) &&
                self->unconfirmed > 0)
                self->unconfirmed--; /* the delivery comes again instead */
            zlistx_delete(self->reacks, handle);
        }
        handle = next;
    }
}

static int s_loop(s_listener_t *self)
{
    int64_t drain_until = 0;
    self->last_welcome = zclock_mono();
    for (;;) {
        bool limit = self->count > 0 && self->done >= self->count;
        if ((s_should_stop(self) || limit) && !drain_until) {
            self->stopping = true;
            drain_until = zclock_mono() + S_DRAIN_MS;
        }
        if (drain_until &&
            (self->unconfirmed == 0 || zclock_mono() >= drain_until))
            break;
        s_heartbeat(self);
        s_reack_due(self);
        s_reap_orphans();
        int64_t wait = self->next_hello - zclock_mono();
        if (zlistx_size(self->reacks) > 0 && wait > 50)
            wait = 50;
        kh_error_t err;
        json_t *msg = kh_client_recv(self->client,
                                     (int) (wait < 1     ? 1
                                            : wait > 200 ? 200
                                                         : wait),
                                     &err);
        if (!msg && err.code == KH_E_UNKNOWN_PARTNER) {
            kh_log_error("key_refused", "code=%s", kh_error_name(err.code));
            return S_EXIT_UNREACHABLE;
        }
        kh_error_t why;
        uint64_t dropped = kh_client_dropped(self->client, &why);
        if (dropped > self->dropped) {
            /* Unanswered, it comes again until it is a dead letter: the
             * log says why, for the hub's administrators. */
            kh_log_error(
                "frame_dropped", "count=%llu code=%s path=%s msg=\"%s\"",
                (unsigned long long) (dropped - self->dropped),
                kh_error_name(why.code), why.path, KH_LOG_Q(why.message));
            self->dropped = dropped;
        }
        if (!msg)
            s_check_silence(self);
        if (msg)
            s_handle(self, msg);
        json_decref(msg);
        if (self->revoked)
            return S_EXIT_UNREACHABLE;
    }
    if (self->unconfirmed > 0)
        kh_log_warn("unconfirmed_at_exit", "count=%d", self->unconfirmed);
    kh_log_info("stopped", "deliveries=%ld", self->done);
    return S_EXIT_OK;
}

int partner_listen(int argc, char **argv, const char *endpoint,
                   const char *hub_cert, const char *cert)
{
    static const struct option options[] = {
        {"dir", required_argument, NULL, 'd'},
        {"exec", required_argument, NULL, 'x'},
        {"window", required_argument, NULL, 'w'},
        {"count", required_argument, NULL, 'n'},
        {"exec-timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    s_listener_t self = {.dirfd = -1};
    int opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "+h", options, NULL)) != -1) {
        switch (opt) {
        case 'd':
            self.dir = optarg;
            break;
        case 'x':
            self.exec = optarg;
            break;
        case 'w':
            self.window = (int) partner_number(optarg, 1, KH_WINDOW_MAX);
            if (self.window < 0) {
                fprintf(stderr, "ketenhub-partner: --window is 1 to %d\n",
                        KH_WINDOW_MAX);
                return S_EXIT_USAGE;
            }
            break;
        case 'n':
            self.count = partner_number(optarg, 1, 1000000000L);
            if (self.count < 0) {
                fprintf(stderr, "ketenhub-partner: --count is a number from "
                                "1\n");
                return S_EXIT_USAGE;
            }
            break;
        case 't': {
            long seconds = partner_number(optarg, 1, 86400);
            if (seconds < 0) {
                fprintf(stderr, "ketenhub-partner: --exec-timeout is 1 to "
                                "86400 seconds\n");
                return S_EXIT_USAGE;
            }
            self.exec_timeout_ms = (int) seconds * 1000;
            break;
        }
        case 'h':
            s_usage(stdout);
            return S_EXIT_OK;
        default:
            s_usage(stderr);
            return S_EXIT_USAGE;
        }
    }
    if (optind != argc || !self.dir == !self.exec) {
        fprintf(stderr, "ketenhub-partner: listen takes one of --dir DIR or "
                        "--exec CMD\n");
        s_usage(stderr);
        return S_EXIT_USAGE;
    }
    /* An empty command (an unset variable, say) would run sh -c '',
     * which exits 0: every delivery ACKed and stored nowhere. */
    if (self.exec && !self.exec[strspn(self.exec, " \t\n")]) {
        fprintf(stderr, "ketenhub-partner: --exec needs a command\n");
        return S_EXIT_USAGE;
    }
    if (self.exec_timeout_ms && !self.exec) {
        fprintf(stderr, "ketenhub-partner: --exec-timeout goes with --exec\n");
        return S_EXIT_USAGE;
    }
    if (!hub_cert || !cert) {
        fprintf(stderr, "ketenhub-partner: --hub-cert and --cert (or "
                        "KH_HUB_PUBLIC_CERT and KH_PARTNER_CERT) are "
                        "required\n");
        return S_EXIT_USAGE;
    }
    if (!endpoint) {
        const char *env = getenv("KH_DELIVERY_ENDPOINT");
        endpoint = env && *env ? env : "tcp://127.0.0.1:7703";
    }
    const char *level = getenv("KH_LOG_LEVEL");
    if (kh_log_init("ketenhub-partner", level && *level ? level : "info")) {
        fprintf(stderr, "ketenhub-partner: KH_LOG_LEVEL is debug, info, "
                        "warn or error\n");
        return S_EXIT_USAGE;
    }
    if (self.dir) {
        self.dirfd = open(self.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (self.dirfd < 0 || faccessat(self.dirfd, ".", W_OK, 0) != 0) {
            fprintf(stderr,
                    "ketenhub-partner: --dir %s: not a writable "
                    "directory\n",
                    self.dir);
            if (self.dirfd >= 0)
                close(self.dirfd);
            return S_EXIT_USAGE;
        }
    }
    /* Stop signals are blocked in this thread and in the threads CZMQ
     * starts from here on; s_should_stop reads them. */
    sigemptyset(&self.stop_signals);
    sigaddset(&self.stop_signals, SIGINT);
    sigaddset(&self.stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &self.stop_signals, NULL);
    signal(SIGPIPE, SIG_IGN);
    /* A SIGCHLD ignored by whatever started us stays ignored across exec:
     * the kernel would then reap --exec's commands itself, and their exit
     * status (ACK, NACK retry or permanent) would be lost. */
    signal(SIGCHLD, SIG_DFL);
    zsys_handler_set(NULL);

    kh_error_t err;
    self.client = kh_client_new(endpoint, hub_cert, cert, &err);
    if (!self.client) {
        fprintf(stderr, "ketenhub-partner: %s\n", err.message);
        if (self.dirfd >= 0)
            close(self.dirfd);
        return S_EXIT_USAGE;
    }
    self.reacks = zlistx_new();
    if (!self.reacks) {
        fprintf(stderr, "ketenhub-partner: out of memory\n");
        kh_client_destroy(&self.client);
        if (self.dirfd >= 0)
            close(self.dirfd);
        return S_EXIT_USAGE;
    }
    zlistx_set_destructor(self.reacks, s_reack_free);
    /* A command runs one delivery at a time: those sent beside it would
     * wait their turn here while the hub's ACK timeout runs, and come
     * again (and run the command again) when it is slow. */
    if (!self.dir && self.window == 0)
        self.window = 1;
    if (self.dir) {
        int stale = s_remove_stale(&self);
        if (stale)
            kh_log_warn("stale_removed",
                        "files=%d reason=\"temp files of a listener that "
                        "died while writing; the hub sends those deliveries "
                        "again\"",
                        stale);
    }
    kh_log_info("listening", "endpoint=%s mode=%s window=%d count=%ld",
                endpoint, self.dir ? "dir" : "exec", self.window, self.count);
    int rc = s_loop(&self);
    zlistx_destroy(&self.reacks);
    kh_client_destroy(&self.client);
    if (self.dirfd >= 0)
        close(self.dirfd);
    return rc;
}
