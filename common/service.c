/*
 * Signal handling shared by the services (see service.h for why).
 */
#include "ketenhub/service.h"

#include <czmq.h>
#include <signal.h>
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
