/*
 * What every ketenhub service does the same way at start: signals.
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

/* Block SIGINT, SIGTERM and SIGHUP in this thread (call before any other
 * thread starts), ignore SIGPIPE, disable CZMQ's signal handler, and return
 * a non-blocking signalfd that reports the blocked signals; -1 on failure
 * (errno set). */
int kh_signals_open(void);

/* Read one pending signal from fd: its number, or 0 if none is pending. */
int kh_signals_read(int fd);

#ifdef __cplusplus
}
#endif
#endif
