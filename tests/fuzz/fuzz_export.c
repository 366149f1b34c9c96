/*
 * libFuzzer harness for the offline verification of a trail export
 * (kh_trail_file_verify, kh_trail_file_checkpoints): the file an auditor
 * gets from elsewhere and checks with nothing but the hub's public key.
 * The input is an export file; the key is the one that signed the seeds.
 * Beyond the sanitizers it checks that:
 *  - the answer is intact (0), a finding (1) with its kind and a detail,
 *    or a refusal (-1) with a code and a message;
 *  - the report's counts agree with each other;
 *  - verifying the same file twice gives the same answer;
 *  - the file's checkpoints, given back as published ones, are read and
 *    verified without failing.
 * Seeds: corpus/export (exports of a small sealed trail: whole, from a
 * checkpoint, checkpoints only), signed by export.pub.
 */
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz_util.h"
#include "ketenhub/trail_file.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static unsigned char s_key[KH_TRAIL_PUBLIC_KEY_SIZE];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void) argc;
    (void) argv;
    kh_error_t err;
    if (kh_trail_load_public(KH_FUZZ_EXPORT_KEY, s_key, &err) != 0) {
        fprintf(stderr, "fuzz_export: %s: %s\n", KH_FUZZ_EXPORT_KEY,
                err.message);
        exit(2);
    }
    return 0;
}

static int s_verify(const char *path, const kh_trail_checkpoint_t *published,
                    size_t npublished, kh_trail_report_t *report)
{
    kh_error_t err;
    kh_error_clear(&err);
    memset(report, 0, sizeof *report);
    int rc =
        kh_trail_file_verify(path, s_key, published, npublished, report, &err);
    KH_FUZZ_CHECK(rc >= -1 && rc <= 1, "verify returned %d", rc);
    if (rc < 0) {
        KH_FUZZ_CHECK(err.code != KH_E_OK, "refused without a code");
        KH_FUZZ_CHECK(err.message[0], "refused without a message (%s)",
                      kh_error_name(err.code));
        return rc;
    }
    KH_FUZZ_CHECK((rc == 0) == (report->kind == KH_TRAIL_OK),
                  "verify says %d, the report %s", rc,
                  kh_trail_finding_name(report->kind));
    KH_FUZZ_CHECK(rc == 0 || report->detail[0], "a %s without a detail",
                  kh_trail_finding_name(report->kind));
    KH_FUZZ_CHECK(report->sealed + report->unsealed <= report->events,
                  "%lld sealed and %lld unsealed of %lld events",
                  (long long) report->sealed, (long long) report->unsealed,
                  (long long) report->events);
    KH_FUZZ_CHECK(report->events == 0 || report->first_seq <= report->last_seq,
                  "events from seq %lld to %lld", (long long) report->first_seq,
                  (long long) report->last_seq);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = memfd_create("export", 0);
    KH_FUZZ_CHECK(fd >= 0, "memfd_create");
    for (size_t done = 0; done < size;) {
        ssize_t n = write(fd, data + done, size - done);
        KH_FUZZ_CHECK(n > 0, "write");
        done += (size_t) n;
    }
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);

    kh_trail_report_t first, second;
    int rc = s_verify(path, NULL, 0, &first);
    KH_FUZZ_CHECK(s_verify(path, NULL, 0, &second) == rc &&
                      first.kind == second.kind && first.seq == second.seq,
                  "two verifications disagree");

    kh_trail_checkpoint_t *cps = NULL;
    size_t ncps = 0;
    kh_error_t err;
    if (kh_trail_file_checkpoints(path, &cps, &ncps, &err) == 0) {
        kh_trail_report_t with;
        s_verify(path, cps, ncps, &with);
        free(cps);
    } else
        KH_FUZZ_CHECK(err.message[0], "checkpoints refused without a message");
    close(fd);
    return 0;
}
