/*
 * Real processes for integration and end-to-end tests: start a built
 * binary with extra environment, stop it with a signal, find a free port.
 */
#ifndef KHPROC_H_INCLUDED
#define KHPROC_H_INCLUDED

#include <sys/types.h>

/* Start path with argv (NULL-ended, argv[0] included) and the current
 * environment plus env (NULL-ended "NAME=value" strings, may be NULL).
 * stdout and stderr go to log_path (appended) when it is not NULL.
 * Returns the pid, or -1. */
pid_t khproc_spawn(const char *path, char *const argv[], char *const env[],
                   const char *log_path);

/* Send sig to pid (0: send nothing) and wait up to timeout_ms for it to
 * exit. Returns its wait status, or -1 if it did not exit in time (it is
 * then killed with SIGKILL and reaped). */
int khproc_stop(pid_t pid, int sig, int timeout_ms);

/* A TCP port on 127.0.0.1 that was free a moment ago. */
int khproc_free_port(void);

/* A memory figure of pid from /proc/PID/status in KiB ("VmRSS",
 * "VmHWM"), or -1. */
long khproc_mem_kib(pid_t pid, const char *field);

/* Run a shell command; returns its exit status (0..255) or -1. */
int khproc_sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
