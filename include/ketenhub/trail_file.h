/*
 * The trail's export file: JSON lines that an outside auditor verifies
 * with nothing but the hub's public audit key (schemas/audit.md, "Export
 * file"). The first line is a header, then the checkpoints, then the
 * events (with their seals) in seq order.
 */
#ifndef KH_TRAIL_FILE_H_INCLUDED
#define KH_TRAIL_FILE_H_INCLUDED

#include <jansson.h>
#include <libpq-fe.h>
#include <stdio.h>

#include "ketenhub/trail.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Write the events with from <= seq <= to (to 0: up to the sealed head)
 * to out, widened to whole checkpoint intervals: from the checkpoint
 * before `from` (its head anchors the chain; none: the genesis) up to
 * the first checkpoint at or after `to` (none: KH_E_NOT_FOUND, nothing
 * written, since events past the last checkpoint are signed by none yet
 * and the header's end must be one). With events false only the
 * checkpoints are written (the file to publish). In the caller's
 * transaction if one is open. *count gets the events written. Returns 0
 * or -1 with err. */
int kh_trail_export(PGconn *conn, FILE *out, int64_t from, int64_t to,
                    bool events, long *count, kh_error_t *err);

/* The checkpoints of an export file (caller frees *out). */
int kh_trail_file_checkpoints(const char *path, kh_trail_checkpoint_t **out,
                              size_t *count, kh_error_t *err);

/* Verify an export file offline against public_key, with the published
 * checkpoints (may be none) as well as the file's own. Returns 0 intact,
 * 1 with a finding in report, -1 with err (unreadable or malformed). */
int kh_trail_file_verify(const char *path, const unsigned char *public_key,
                         const kh_trail_checkpoint_t *published,
                         size_t npublished, kh_trail_report_t *report,
                         kh_error_t *err);
/* The same against a set of keys used in turn (kh_trail_keys_t). */
int kh_trail_file_verify_keys(const char *path, const kh_trail_keys_t *keys,
                              const kh_trail_checkpoint_t *published,
                              size_t npublished, kh_trail_report_t *report,
                              kh_error_t *err);

/* An event as a JSON object (the export's and `audit query --json`'s
 * form): the fields by name, NULLs as null, at in UTC with µs, ids as
 * text, the payload hash in hex. New reference; NULL on out of memory. */
json_t *kh_trail_event_json(const kh_trail_event_t *ev);

#ifdef __cplusplus
}
#endif
#endif
