/*
 * What every ketenhub service does the same way at start (signals) and
 * at its end.
 *
 * zloop and zpoller return on any EINTR, so a SIGHUP meant to reload would
 * stop a naive loop. Services therefore block SIGINT, SIGTERM and SIGHUP
 * first thing in main (the mask is inherited by CZMQ's threads), switch off
 * CZMQ's own handler, and read signals from a signalfd in their loop.
 */
#ifndef KH_SERVICE_H_INCLUDED
#define KH_SERVICE_H_INCLUDED

#ifdef __cplusplus
extern "C" {
#endif

#include <stdbool.h>
#include <stddef.h>

#include "ketenhub/config.h"

/* What every service's main does first: answer --version and --help
 * (the settings table), limit malloc to two arenas (unless
 * MALLOC_ARENA_MAX says otherwise), block the signals (the signalfd goes
 * to *signal_fd), read the settings (a bad one is named on stderr), set up
 * logging as `name` with the table's KH_LOG_LEVEL, seed libsodium and log
 * the settings in force.
 * Returns -1 when main should go on; otherwise the exit status main should
 * return at once (0 after --help, 2 for usage or settings, 1 for a
 * failure). */
int kh_service_start(const char *name, int argc, char **argv, kh_cfg_t *config,
                     size_t count, int *signal_fd);

/* Block SIGINT, SIGTERM and SIGHUP in this thread (call before any other
 * thread starts), ignore SIGPIPE, disable CZMQ's signal handler, and return
 * a non-blocking signalfd that reports the blocked signals; -1 on failure
 * (errno set). */
int kh_signals_open(void);

/* Read one pending signal from fd: its number, or 0 if none is pending. */
int kh_signals_read(int fd);

/* Read every pending signal from fd, for a loop's signal handler: SIGTERM
 * and SIGINT are logged (event=stopping) and set *stopping; SIGHUP is
 * logged and sets *hup, or, when hup is NULL, is ignored. Returns -1 when a
 * stop was asked (now or before: the loop ends), else 0. */
int kh_signals_take(int fd, bool *stopping, bool *hup);

/* What a service's main returns: status. While an abandoned attempt to
 * connect is still in libpq on its thread (a stop came while the database
 * did not answer), the process ends here instead: ZeroMQ's context is
 * ended (the last replies go out, within their linger), the streams are
 * flushed, and _exit(status) skips the exit handlers, which would run
 * OpenSSL's cleanup under that thread. */
int kh_service_exit(int status);

#ifdef __cplusplus
}
#endif
#endif
