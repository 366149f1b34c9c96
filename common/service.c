/*
 * Signal handling shared by the services (see service.h for why).
 */
#include "ketenhub/service.h"

#include "ketenhub/db.h"
#include "ketenhub/health.h"
#include "ketenhub/log.h"

#include <czmq.h>
#include <malloc.h>
#include <signal.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

int kh_signals_open(void)
{
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &mask, NULL) != 0)
        return -1;
    signal(SIGPIPE, SIG_IGN);
    zsys_handler_set(NULL);
    return signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
}

int kh_signals_read(int fd)
{
    struct signalfd_siginfo info;
    ssize_t n = read(fd, &info, sizeof info);
    if (n != (ssize_t) sizeof info)
        return 0;
    return (int) info.ssi_signo;
}

int kh_signals_take(int fd, bool *stopping, bool *hup)
{
    int signo;
    while ((signo = kh_signals_read(fd)) > 0) {
        if (signo == SIGHUP && hup) {
            kh_log_info("sighup", "action=later");
            *hup = true;
        } else if (signo == SIGHUP)
            kh_log_info("sighup", "action=none");
        else {
            kh_log_info("stopping", "signal=%d", signo);
            *stopping = true;
        }
    }
    return *stopping ? -1 : 0;
}

int kh_service_start(const char *name, int argc, char **argv, kh_cfg_t *config,
                     size_t count, int *signal_fd)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("ketenhub-%s %s\n", name, kh_version());
        return 0;
    }
    if (argc > 1) {
        bool help = strcmp(argv[1], "--help") == 0 || !strcmp(argv[1], "-h");
        fprintf(help ? stdout : stderr,
                "usage: ketenhub-%s (settings come "
                "from the environment)\n",
                name);
        kh_config_usage(config, count);
        return help ? 0 : 2;
    }
    /* Before any thread starts: glibc gives each thread that allocates
     * (ZeroMQ's I/O threads, the ZAP actor) an arena of its own, whose
     * free pages stay resident. Two arenas kept notification's peak RSS
     * 3 MiB lower under load (scripts/bench-hub.sh: 27.5 MiB against
     * 29.4-30.9). MALLOC_ARENA_MAX in the environment still decides. */
    if (!getenv("MALLOC_ARENA_MAX"))
        mallopt(M_ARENA_MAX, 2);
    /* No fastbins: a request's many small blocks (its JSON tree) went to
     * them when freed, and the next block over 1 KB (a frame, a canonical
     * payload) made glibc sort them all back (malloc_consolidate). Freed
     * blocks now merge at once, past the per-thread cache. Intake alone,
     * 16 clients x 16 in flight, alternating runs: 15,000-17,600
     * accepted/s against 12,900-15,700, the same peak RSS (21-22 MiB).
     * GLIBC_TUNABLES=glibc.malloc.mxfast=... still decides. */
    const char *tunables = getenv("GLIBC_TUNABLES");
    if (!tunables || !strstr(tunables, "glibc.malloc.mxfast"))
        mallopt(M_MXFAST, 0);
    *signal_fd = kh_signals_open();
    if (*signal_fd == -1) {
        fprintf(stderr, "ketenhub-%s: cannot set up signals\n", name);
        return 1;
    }
    kh_error_t err;
    if (kh_config_load(config, count, &err)) {
        fprintf(stderr, "ketenhub-%s: %s\n", name, err.message);
        return 2;
    }
    const kh_cfg_t *level = kh_config_get(config, count, "KH_LOG_LEVEL");
    if (kh_log_init(name, level ? level->str : NULL)) {
        fprintf(stderr,
                "ketenhub-%s: KH_LOG_LEVEL must be debug, info, warn "
                "or error\n",
                name);
        return 2;
    }
    /* The password file is read again at each connection (a rotated
     * secret needs no restart), but one that cannot be read at start is a
     * bad setting, not a database that is away: the service would retry
     * for ever. */
    if (kh_config_get(config, count, "KH_DATABASE_PASSWORD_FILE")) {
        char password[256];
        int rc = kh_db_password(password, sizeof password, &err);
        explicit_bzero(password, sizeof password);
        if (rc < 0) {
            kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                         kh_error_name(err.code), err.path,
                         KH_LOG_Q(err.message));
            return 2;
        }
    }
    /* A connection string that does not parse would be retried for ever
     * as a database that is away. */
    const kh_cfg_t *url = kh_config_get(config, count, "KH_DATABASE_URL");
    if (url && kh_db_conninfo_check(url->str, &err) < 0) {
        kh_log_error("start_failed", "code=%s path=%s msg=\"%s\"",
                     kh_error_name(err.code), err.path, KH_LOG_Q(err.message));
        return 2;
    }
    if (sodium_init() < 0) {
        kh_log_error("start_failed", "reason=\"no random source\"");
        return 1;
    }
    kh_config_log(config, count);
    return -1;
}

int kh_service_exit(int status)
{
    if (kh_db_attempts_running() > 0) {
        zsys_shutdown();
        fflush(NULL);
        _exit(status);
    }
    return status;
}
