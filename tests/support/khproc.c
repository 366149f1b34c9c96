/*
 * Process helpers for tests (see khproc.h).
 */
#include "khproc.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

pid_t khproc_spawn(const char *path, char *const argv[], char *const env[],
                   const char *log_path)
{
    pid_t pid = fork();
    if (pid != 0)
        return pid;
    for (int i = 0; env && env[i]; i++)
        putenv(env[i]);
    if (log_path) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND, 0600);
        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
            close(fd);
        }
    }
    /* Do not pass on the test's blocked signals. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execv(path, argv);
    _exit(127);
}

int khproc_stop(pid_t pid, int sig, int timeout_ms)
{
    if (sig)
        kill(pid, sig);
    int status = 0;
    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid)
            return status;
        struct timespec pause = {0, 10 * 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* Ports are taken from below the kernel's ephemeral range (32768-60999 by
 * default): a port that bind(0) hands out is in that range, and the
 * outgoing connection of some process (a database client) could take it
 * between this call and the bind of the service it is for. A process is
 * never given the same port twice. Each process draws from a seed of its
 * own from the kernel: ctest starts two tests at once, and seeds made of
 * their pids and the second they started in gave both much the same ports
 * in much the same order, one service then finding its port taken by the
 * other test's. */
#define S_PORT_FIRST 20000
#define S_PORT_COUNT 12000
#define S_PORTS_GIVEN_MAX 1024

int khproc_free_port(void)
{
    static int given[S_PORTS_GIVEN_MAX];
    static size_t ngiven;
    static unsigned seed;
    if (!seed && getrandom(&seed, sizeof seed, 0) != (ssize_t) sizeof seed)
        seed = (unsigned) getpid() ^ (unsigned) time(NULL);
    for (int tries = 0; tries < 1000 && ngiven < S_PORTS_GIVEN_MAX; tries++) {
        int port = S_PORT_FIRST + rand_r(&seed) % S_PORT_COUNT;
        bool taken = false;
        for (size_t i = 0; i < ngiven && !taken; i++)
            taken = given[i] == port;
        if (taken)
            continue;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0)
            return -1;
        struct sockaddr_in addr;
        memset(&addr, 0, sizeof addr);
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        addr.sin_port = htons((uint16_t) port);
        bool unused = bind(fd, (struct sockaddr *) &addr, sizeof addr) == 0;
        close(fd);
        if (unused) {
            given[ngiven++] = port;
            return port;
        }
    }
    return -1;
}

int khproc_sh(const char *fmt, ...)
{
    char command[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(command, sizeof command, fmt, ap);
    va_end(ap);
    int status = system(command);
    if (status == -1 || !WIFEXITED(status))
        return -1;
    return WEXITSTATUS(status);
}

long khproc_mem_kib(pid_t pid, const char *field)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int) pid);
    FILE *file = fopen(path, "r");
    if (!file)
        return -1;
    long kib = -1;
    size_t len = strlen(field);
    while (fgets(line, sizeof line, file))
        if (strncmp(line, field, len) == 0 && line[len] == ':')
            kib = atol(line + len + 1);
    fclose(file);
    return kib;
}
