/*
 * Routing rules: the file administrators edit (schemas/rules.md) that says
 * which partners receive a referral and which of its fields each of them
 * sees. A rules file is loaded and checked once (every error with its line,
 * column and a stable rules.* code), compiled into condition trees whose
 * field paths are resolved against the referral schema, and then evaluated
 * many times: an evaluation allocates nothing and reads the referral only.
 *
 * A loaded kh_rules_t is read-only: several threads may evaluate with it at
 * once, each with its own kh_rules_result_t.
 */
#ifndef KH_RULES_H_INCLUDED
#define KH_RULES_H_INCLUDED

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "ketenhub/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KH_RULES_FILE_MAX (1024 * 1024) /* bytes of a rules file */
#define KH_RULES_DEPTH_MAX 32           /* nesting of YAML collections */

typedef enum {
    KH_PRIORITY_NORMAL,
    KH_PRIORITY_HIGH,
    KH_PRIORITY_URGENT
} kh_priority_t;

/* "normal", "high", "urgent"; "unknown" out of range. */
const char *kh_priority_name(kh_priority_t priority);

/* A partner the rules may name, as the registry knows it. A revoked one
 * counts as not registered, but for a fallback none of whose partners is
 * left (kh_rules_set_partners). */
typedef struct {
    const char *id;
    bool handles_cases;
    bool revoked;
} kh_rules_partner_t;

/* Called for every problem found while loading: is_error false for a
 * note (e.g. an optional target whose partner is not registered). err
 * holds the code, the path inside the rules document ("rules[2].when.lt",
 * built with kh_path_append_*), the line, column and message. */
typedef void(kh_rules_report_fn)(const kh_error_t *err, bool is_error,
                                 void *arg);

typedef struct {
    /* The referral schema (schemas/referral.v1.json): field names, types,
     * enums and bounds are read from it. Required. */
    const char *schema_path;
    /* The registered partners. NULL: partner checks are skipped and every
     * target, optional or not, is kept. An empty registry is not NULL:
     * give a pointer to any entry with partner_count 0. */
    const kh_rules_partner_t *partners;
    size_t partner_count;
    /* Receives every error and note; may be NULL. */
    kh_rules_report_fn *report;
    void *report_arg;
    /* When not NULL, receives (65 bytes) the lower-case hex SHA-256 of the
     * file's bytes, whether the file loads or not, so that a refused file
     * can be named; "" when its bytes could not all be read (unreadable,
     * not a regular file, larger than KH_RULES_FILE_MAX). */
    char *sha256_out;
} kh_rules_options_t;

typedef struct _kh_rules_t kh_rules_t;

/* Load, check and compile the rules file at path. Returns NULL when the
 * file cannot be read or is not a regular file (KH_E_IO: a FIFO, a
 * directory or a device is refused without waiting or reading) or holds
 * any error; err then holds the first error and opts->report has seen all
 * of them. Loading refuses files over KH_RULES_FILE_MAX, non-UTF-8 or
 * binary input, anchors and aliases, tags, nesting deeper than
 * KH_RULES_DEPTH_MAX. */
kh_rules_t *kh_rules_load(const char *path, const kh_rules_options_t *opts,
                          kh_error_t *err);

/* As kh_rules_load, from len bytes at data (need not be NUL-terminated). */
kh_rules_t *kh_rules_load_buffer(const void *data, size_t len,
                                 const kh_rules_options_t *opts,
                                 kh_error_t *err);

/* Destroy; accepts NULL and a pointer to NULL; sets *self_p NULL. */
void kh_rules_destroy(kh_rules_t **self_p);

/* The rules version: lower-case hex SHA-256 of the file's bytes. Valid as
 * long as self. */
const char *kh_rules_version(const kh_rules_t *self);

/* The lower-case hex SHA-256 of the referral schema's bytes that the rules
 * were checked and compiled against. Valid as long as self. */
const char *kh_rules_schema_version(const kh_rules_t *self);

/* The decision version: what a routing decision depends on besides the
 * referral, which the trail records with it (schemas/rules.md): the rules
 * version, a dot, and the first 32 hex digits of the SHA-256 of the text
 *
 *     ketenhub rules context 1\n
 *     schema <kh_rules_schema_version>\n
 *     partner <id>\n          (one line per partner)
 *     revoked <id>\n          (one line per partner)
 *
 * where the partners are those the file names as targets (of its rules
 * and its fallback) or in escalate_to that partners (the registry, count
 * entries; NULL when none) holds, not revoked, as handling cases, sorted
 * bytewise; the revoked lines, when none of the fallback's partners is
 * left, name its targets that take part revoked (kh_rules_set_partners),
 * sorted likewise. At most KH_RULES_DECISION_VERSION_MAX characters. 0,
 * or -1 when out of memory. */
#define KH_RULES_DECISION_VERSION_MAX (64 + 1 + 32)
int kh_rules_decision_version(const kh_rules_t *self,
                              const kh_rules_partner_t *partners, size_t count,
                              char out[KH_RULES_DECISION_VERSION_MAX + 1]);

/* Number of rules and the name of rule i (valid as long as self). */
size_t kh_rules_count(const kh_rules_t *self);
const char *kh_rules_name(const kh_rules_t *self, size_t index);

/* The registry has changed since the rules were loaded (with partners):
 * take the count partners registered now. An optional target (and an
 * optional target's escalation partner) takes part when its partner is
 * registered and handles cases, and is skipped when it is not; the other
 * targets were checked at load and stay as they are (a delivery to a
 * partner revoked since becomes a dead letter, with its alert). When none
 * of the fallback's partners is left, its targets whose partners partners
 * holds revoked, as handling cases, take part (their deliveries die
 * likewise), whatever was left before; one never registered, or not
 * handling cases, never does (at load the fallback had a partner
 * handling cases: it is still there, revoked). Give the revoked partners
 * too. Returns the number of targets that changed. */
size_t kh_rules_set_partners(kh_rules_t *self,
                             const kh_rules_partner_t *partners, size_t count);

/* The partners that the rules name as targets that are not optional (or
 * as such a target's escalation partner) and that partners (the registry
 * now) does not hold as handling cases: revoked, or never registered,
 * since the rules were loaded; and the revoked partners that a fallback
 * none of whose partners is left sends to (kh_rules_set_partners). Each
 * is named once, in the order of the first mention in the file,
 * into out[0..max) (valid as long as self). Returns how many there are
 * (0 also when out of memory). Routing warns of them: their deliveries
 * become dead letters, and these rules would be refused at a reload. */
size_t kh_rules_missing_partners(const kh_rules_t *self,
                                 const kh_rules_partner_t *partners,
                                 size_t count, const char **out, size_t max);

/* The outcome of one evaluation. Made once per thread for a given
 * kh_rules_t and reused: evaluation overwrites it. */
typedef struct _kh_rules_result_t kh_rules_result_t;

/* A result sized for rules; NULL on allocation failure. It must not
 * outlive rules. */
kh_rules_result_t *kh_rules_result_new(const kh_rules_t *rules);
void kh_rules_result_destroy(kh_rules_result_t **self_p);

/* Evaluate the rules on referral (a jansson object, normally one that the
 * schema accepted; anything else is safe too: a field that is missing or of
 * another type makes its condition not hold). Rules run in file order; a
 * matched rule with `continue: false` ends the evaluation. A partner named
 * by several matched rules gets the union of their fields and the highest
 * priority. When the matched rules name no partner (no rule matched, or
 * only optional targets whose partner is absent), the fallback targets are
 * used and kh_rules_result_fallback is true. Allocates nothing. */
void kh_rules_eval(const kh_rules_t *self, const json_t *referral,
                   kh_rules_result_t *result);

/* Whether the targets come from the fallback. */
bool kh_rules_result_fallback(const kh_rules_result_t *self);

/* Why, as the trail's reason code: "no_rule_matched", or
 * "no_registered_target" when rules matched but named only optional
 * partners that are not registered; NULL when not the fallback. */
const char *kh_rules_result_fallback_reason(const kh_rules_result_t *self);

/* The matched rules, in file order (names valid as long as the rules). */
size_t kh_rules_result_matched_count(const kh_rules_result_t *self);
const char *kh_rules_result_matched(const kh_rules_result_t *self,
                                    size_t index);

/* The target partners, in the order they were first named. */
size_t kh_rules_result_target_count(const kh_rules_result_t *self);
const char *kh_rules_result_partner(const kh_rules_result_t *self,
                                    size_t index);
kh_priority_t kh_rules_result_priority(const kh_rules_result_t *self,
                                       size_t index);

/* The partner that gets a copy when target index's urgent delivery is not
 * acknowledged in time (the rules' escalate_to), or NULL when none (always
 * NULL for a delivery that is not urgent: only urgent ones escalate). A
 * partner named by several matched rules takes it from its highest-
 * priority targets, the first in file order that names one. Valid as long
 * as the rules. */
const char *kh_rules_result_escalate_to(const kh_rules_result_t *self,
                                        size_t index);

/* A new object holding only the fields that the escalation copy of target
 * index carries (its own projection in the rules' escalate_to), or NULL
 * when the target has no escalation (or on allocation failure). */
json_t *kh_rules_result_project_escalation(const kh_rules_result_t *self,
                                           size_t index,
                                           const json_t *referral);

/* Target index of partner id, or -1 when it is not a target. */
int kh_rules_result_find(const kh_rules_result_t *self, const char *partner);

/* A new object holding only the fields target index may see (in schema
 * order, parents created as needed; a projected field the referral lacks
 * is left out). The selected values are shared with referral, not copied
 * (the result holds its own references, so it outlives the referral):
 * neither may be changed while the other is in use. NULL on allocation
 * failure or a bad index. */
json_t *kh_rules_result_project(const kh_rules_result_t *self, size_t index,
                                const json_t *referral);

/* The projected field paths of target index, one per line, into out
 * ("subject\nrisk.urgency\n"); for explaining. */
void kh_rules_result_fields(const kh_rules_result_t *self, size_t index,
                            FILE *out);

/* Write to out, for an administrator: per rule whether it fired and, per
 * condition part, whether it held, with the value it compared; then the
 * targets with priority and projected payload, each with its escalation
 * copy's fields and payload, and the fallback's reason. Shows referral
 * values: a local tool only, never for logs. */
void kh_rules_explain(const kh_rules_t *self, const json_t *referral,
                      FILE *out);

#ifdef __cplusplus
}
#endif
#endif
