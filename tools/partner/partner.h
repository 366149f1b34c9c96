/*
 * ketenhub-partner internals: the modes that need more than one request
 * and its reply live in their own files (listen.c), main.c dispatches.
 */
#ifndef KH_PARTNER_TOOL_H_INCLUDED
#define KH_PARTNER_TOOL_H_INCLUDED

enum {
    S_EXIT_OK = 0,
    S_EXIT_REFUSED = 1,
    S_EXIT_USAGE = 2,
    S_EXIT_UNREACHABLE = 3,
    S_EXIT_RETRY_LATER = 4
};

/* A whole number from min (at least 0) to max written as text, or -1
 * (not a number, something after it, or out of range). */
long partner_number(const char *text, long min, long max);

/* `ketenhub-partner listen`: argv[0] is "listen", its options follow.
 * endpoint is the --endpoint given before the command, or NULL (then
 * KH_DELIVERY_ENDPOINT, else tcp://127.0.0.1:7703); hub_cert and cert as
 * for the other modes (may be NULL: a usage error). Returns the exit
 * code: 0 stopped (signal or --count reached), 2 usage, 3 this key was
 * refused by the hub. */
int partner_listen(int argc, char **argv, const char *endpoint,
                   const char *hub_cert, const char *cert);

#endif
