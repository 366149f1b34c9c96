/*
 * The ZAP handler (common/zap.c) on its own: ZAP requests sent to it over
 * inproc as libzmq sends them, answered by kh_zap_handle in this thread.
 * Which keys of the partner directory it admits, when a certificate names
 * its end (expires-at), and when the directory cannot be read.
 */
#include <czmq.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ketenhub/zap.h"
#include "khtest.h"

/* Ask zap whether cert's key may connect: whether it answers "200" (and
 * kh_zap_handle says the same). */
static bool s_admits(kh_zap_t *zap, zsock_t *req, const zcert_t *cert)
{
    zmsg_t *msg = zmsg_new();
    zmsg_addstr(msg, "1.0");
    zmsg_addstr(msg, "1");
    zmsg_addstr(msg, "");
    zmsg_addstr(msg, "127.0.0.1");
    zmsg_addstr(msg, "");
    zmsg_addstr(msg, "CURVE");
    zmsg_addmem(msg, zcert_public_key((zcert_t *) cert), 32);
    ck_assert_int_eq(zmsg_send(&msg, req), 0);
    char key[41], address[64];
    int rc = kh_zap_handle(zap, key, address);
    zmsg_t *reply = zmsg_recv(req);
    ck_assert_ptr_nonnull(reply);
    zframe_t *frame = zmsg_first(reply); /* version */
    frame = zmsg_next(reply);            /* request id */
    frame = zmsg_next(reply);            /* status code */
    bool ok = zframe_streq(frame, "200");
    ck_assert_int_eq(ok, rc == 0);
    ck_assert_str_eq(key, zcert_public_txt((zcert_t *) cert));
    zmsg_destroy(&reply);
    return ok;
}

static zcert_t *s_cert(const char *dir, const char *name, const char *expires)
{
    zcert_t *cert = zcert_new();
    ck_assert_ptr_nonnull(cert);
    if (expires)
        zcert_set_meta(cert, "expires-at", "%s", expires);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    ck_assert_int_eq(zcert_save_public(cert, path), 0);
    return cert;
}

START_TEST(a_certificate_is_admitted_until_the_end_it_names)
{
    char *dir = khtest_tmpdir();
    zcert_t *current = s_cert(dir, "avim.cert", NULL);
    zcert_t *before = s_cert(dir, "avim.previous.cert", "2999-01-01T00:00:00Z");
    zcert_t *ended = s_cert(dir, "vt.previous.cert", "2001-01-01T00:00:00Z");
    zcert_t *garbled = s_cert(dir, "zc.previous.cert", "next tuesday");
    zcert_t *stranger = zcert_new();
    kh_error_t err;
    kh_zap_t *zap = kh_zap_new(dir, NULL, &err);
    ck_assert_ptr_nonnull(zap);
    zsock_t *req = zsock_new_req("inproc://zeromq.zap.01");
    ck_assert_ptr_nonnull(req);
    ck_assert(s_admits(zap, req, current));
    ck_assert(s_admits(zap, req, before));
    ck_assert(!s_admits(zap, req, ended));
    ck_assert(!s_admits(zap, req, garbled)); /* unreadable: passed */
    ck_assert(!s_admits(zap, req, stranger));
    zsock_destroy(&req);
    kh_zap_destroy(&zap);
    zcert_destroy(&current);
    zcert_destroy(&before);
    zcert_destroy(&ended);
    zcert_destroy(&garbled);
    zcert_destroy(&stranger);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* The directory's own files alone: a certificate in a subdirectory (one
 * an administrator moved aside, say) admits nobody. Of two files with one
 * key that both name an end, the later end counts, whatever their names'
 * order. */
START_TEST(subdirectories_are_not_read_and_the_later_end_counts)
{
    char *dir = khtest_tmpdir();
    char sub[1024];
    snprintf(sub, sizeof sub, "%s/aside", dir);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    zcert_t *aside = s_cert(sub, "vt.cert", NULL);
    zcert_t *twice = s_cert(dir, "a.previous.cert", "2001-01-01T00:00:00Z");
    zcert_t *later =
        zcert_new_from(zcert_public_key(twice), zcert_secret_key(twice));
    ck_assert_ptr_nonnull(later);
    zcert_set_meta(later, "expires-at", "2999-01-01T00:00:00Z");
    char path[1024];
    snprintf(path, sizeof path, "%s/b.previous.cert", dir);
    ck_assert_int_eq(zcert_save_public(later, path), 0);
    zcert_destroy(&later);
    kh_error_t err;
    kh_zap_t *zap = kh_zap_new(dir, NULL, &err);
    ck_assert_ptr_nonnull(zap);
    zsock_t *req = zsock_new_req("inproc://zeromq.zap.01");
    ck_assert_ptr_nonnull(req);
    ck_assert(!s_admits(zap, req, aside));
    ck_assert(s_admits(zap, req, twice));
    zsock_destroy(&req);
    kh_zap_destroy(&zap);
    zcert_destroy(&aside);
    zcert_destroy(&twice);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* Out of file descriptors, the directory cannot be read: the keys read
 * before still admit their partners (a refusal would stop their clients
 * for good). A directory that is gone admits nobody. */
START_TEST(a_directory_that_cannot_be_read_now_keeps_its_keys)
{
    char *dir = khtest_tmpdir();
    zcert_t *partner = s_cert(dir, "avim.cert", NULL);
    kh_error_t err;
    kh_zap_t *zap = kh_zap_new(dir, NULL, &err);
    ck_assert_ptr_nonnull(zap);
    zsock_t *req = zsock_new_req("inproc://zeromq.zap.01");
    ck_assert(s_admits(zap, req, partner));

    /* A change, so that the next request reads the directory again. */
    zcert_t *other = s_cert(dir, "vt.cert", NULL);
    sleep(1);
    struct rlimit was;
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &was), 0);
    struct rlimit low = was;
    low.rlim_cur = 256;
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &low), 0);
    int taken[256], n = 0;
    while (n < 256 && (taken[n] = dup(0)) >= 0)
        n++;
    ck_assert_int_eq(errno, EMFILE);
    bool admitted = s_admits(zap, req, partner);
    while (n > 0)
        close(taken[--n]);
    ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &was), 0);
    ck_assert_msg(admitted, "a directory that could not be read refused "
                            "every key");
    ck_assert(s_admits(zap, req, other)); /* read again now */

    khtest_rmtree(dir);
    ck_assert(!s_admits(zap, req, partner));
    zsock_destroy(&req);
    kh_zap_destroy(&zap);
    zcert_destroy(&partner);
    zcert_destroy(&other);
    free(dir);
}
END_TEST

/* Set path's modification time to when (seconds since the epoch). */
static void s_set_mtime(const char *path, time_t when)
{
    struct timespec times[2] = {{when, 0}, {when, 0}};
    ck_assert_int_eq(utimensat(AT_FDCWD, path, times, 0), 0);
}

/* A certificate replaced in place by another of the same size, its old
 * time kept (cp -p, rsync -a): the new key is admitted, the old one no
 * longer, though no file time, count or size of the directory moved. */
START_TEST(a_certificate_replaced_with_its_time_kept_is_read_again)
{
    char *dir = khtest_tmpdir();
    char path[1024], staged[1024];
    snprintf(path, sizeof path, "%s/avim.cert", dir);
    snprintf(staged, sizeof staged, "%s/.staged", dir);
    time_t then = time(NULL) - 100;
    zcert_t *old = s_cert(dir, "avim.cert", NULL);
    s_set_mtime(path, then);
    kh_error_t err;
    kh_zap_t *zap = kh_zap_new(dir, NULL, &err);
    ck_assert_ptr_nonnull(zap);
    zsock_t *req = zsock_new_req("inproc://zeromq.zap.01");
    ck_assert(s_admits(zap, req, old));

    zcert_t *new = s_cert(dir, ".staged", NULL);
    char *text = khtest_read_file(staged);
    ck_assert_ptr_nonnull(text);
    struct stat was, now;
    ck_assert_int_eq(stat(path, &was), 0);
    int fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t) strlen(text));
    close(fd);
    free(text);
    unlink(staged);
    s_set_mtime(path, then);
    ck_assert_int_eq(stat(path, &now), 0);
    ck_assert_int_eq(now.st_size, was.st_size);
    ck_assert(s_admits(zap, req, new));
    ck_assert(!s_admits(zap, req, old));
    zsock_destroy(&req);
    kh_zap_destroy(&zap);
    zcert_destroy(&old);
    zcert_destroy(&new);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *suite = suite_create("zap");
    TCase *tc = tcase_create("zap");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, a_certificate_is_admitted_until_the_end_it_names);
    tcase_add_test(tc, subdirectories_are_not_read_and_the_later_end_counts);
    tcase_add_test(tc, a_directory_that_cannot_be_read_now_keeps_its_keys);
    tcase_add_test(tc, a_certificate_replaced_with_its_time_kept_is_read_again);
    suite_add_tcase(suite, tc);
    return suite;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
