/*
 * Unit tests of the routing rules (common/rules_parse.c, rules_eval.c):
 * evaluation cases of every operator, nesting, projections, priority merge,
 * continue/stop, fallback and referrals with missing or mistyped fields;
 * the corpus of wrong rules files (schemas/rules/invalid/, each with its
 * expected code, line and column in a .expect file); the default rules on
 * the example referrals; refusal of hostile files; ketenhubctl rules exit
 * codes. No database: partners are an in-memory list.
 */
#include "khtest.h"

#include "ketenhub/proto.h"
#include "ketenhub/rules.h"

#include <dirent.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REFERRAL_SCHEMA "schemas/referral.v1.json"

/* The partners of the demo (scripts/demo.sh) plus the test's own. */
static const kh_rules_partner_t s_demo[] = {{"meldpunt-hilversum", true, false},
                                            {"veilig-thuis", true, false},
                                            {"zorgcoordinator", true, false},
                                            {"avim", true, false},
                                            {"ketenregisseur", false, false},
                                            {"px", true, false},
                                            {"py", true, false},
                                            {"pz", true, false}};
#define S_DEMO_COUNT (sizeof s_demo / sizeof s_demo[0])

static char s_schema[4096];

static kh_rules_options_t s_opts(const kh_rules_partner_t *partners,
                                 size_t count)
{
    snprintf(s_schema, sizeof s_schema, "%s", khtest_src(REFERRAL_SCHEMA));
    kh_rules_options_t o = {
        .schema_path = s_schema, .partners = partners, .partner_count = count};
    return o;
}

static kh_rules_t *s_load_text(const char *yaml,
                               const kh_rules_partner_t *partners, size_t count)
{
    kh_rules_options_t o = s_opts(partners, count);
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
    ck_assert_msg(rules != NULL, "%d:%d %s: %s", err.line, err.column,
                  kh_error_name(err.code), err.message);
    return rules;
}

/* ---- evaluation table ------------------------------------------------ */

/* One rule per operator; each targets the partner named like the rule. */
static const char *s_ops_rules =
    "version: 1\n"
    "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
    "rules:\n"
    "- {name: eq-bool, when: {field: subject.minor, equals: true},\n"
    "   then: {targets: [{partner: eq-bool, fields: [subject]}]}}\n"
    "- {name: eq-str, when: {field: risk.urgency, equals: immediate},\n"
    "   then: {targets: [{partner: eq-str, fields: [risk]}]}}\n"
    "- {name: eq-null, when: {field: subject.age, equals: null},\n"
    "   then: {targets: [{partner: eq-null, fields: [subject.age]}]}}\n"
    "- {name: in-str, when: {field: subject.nationality, in: [RO, BG, PL]},\n"
    "   then: {targets: [{partner: in-str, fields: [subject]}]}}\n"
    "- {name: contains, when: {field: exploitation.forms, contains: labour},\n"
    "   then: {targets: [{partner: contains, fields: [exploitation]}]}}\n"
    "- {name: lt, when: {field: subject.age, lt: 18},\n"
    "   then: {targets: [{partner: lt, fields: [subject.age]}]}}\n"
    "- {name: le, when: {field: subject.age, le: 18},\n"
    "   then: {targets: [{partner: le, fields: [subject.age]}]}}\n"
    "- {name: gt, when: {field: subject.age, gt: 65},\n"
    "   then: {targets: [{partner: gt, fields: [subject.age]}]}}\n"
    "- {name: ge, when: {field: subject.age, ge: 65},\n"
    "   then: {targets: [{partner: ge, fields: [subject.age]}]}}\n"
    "- {name: present, when: {field: suspects, present: true},\n"
    "   then: {targets: [{partner: present, fields: [suspects]}]}}\n"
    "- {name: absent, when: {field: subject.residence_status, present: "
    "false},\n"
    "   then: {targets: [{partner: absent, fields: [subject]}]}}\n"
    "- name: all\n"
    "  when: {all: [{field: scope, equals: cross_border},\n"
    "               {field: subject.language, equals: ro}]}\n"
    "  then: {targets: [{partner: all, fields: [scope]}]}\n"
    "- name: any\n"
    "  when: {any: [{field: needs, contains: shelter},\n"
    "               {field: needs, contains: medical}]}\n"
    "  then: {targets: [{partner: any, fields: [needs]}]}\n"
    "- {name: not, when: {not: {field: client.consent, equals: true}},\n"
    "   then: {targets: [{partner: not, fields: [client]}]}}\n"
    "- name: nested\n"
    "  when:\n"
    "    all:\n"
    "      - any: [{field: exploitation.forms, contains: sexual},\n"
    "              {field: exploitation.forms, contains: criminal}]\n"
    "      - not: {field: subject.minor, equals: true}\n"
    "      - {field: subject.age, ge: 30}\n"
    "  then: {targets: [{partner: nested, fields: [summary]}]}\n";

/* Priority merge, projection union, continue/stop, optional targets. */
static const char *s_merge_rules =
    "version: 1\n"
    "fallback:\n"
    "  targets: [{partner: zorgcoordinator, fields: [needs, "
    "subject.minor]}]\n"
    "rules:\n"
    "- name: a\n"
    "  when: {field: subject.minor, equals: true}\n"
    "  then:\n"
    "    targets:\n"
    "    - {partner: px, priority: high, fields: [subject.age]}\n"
    "    - {partner: py, fields: [scope]}\n"
    "- name: b\n"
    "  when: {field: risk.acute_danger, equals: true}\n"
    "  then: {targets: [{partner: px, priority: urgent, fields: [risk]}]}\n"
    "- name: stop\n"
    "  when: {field: scope, equals: cross_border}\n"
    "  then: {targets: [{partner: py, fields: [needs]}], continue: false}\n"
    "- name: after\n"
    "  when: {field: subject.gender, equals: female}\n"
    "  then: {targets: [{partner: pz, fields: [subject.gender]}]}\n"
    "- name: opt\n"
    "  when: {field: exploitation.forms, contains: labour}\n"
    "  then: {targets: [{partner: absent-one, optional: true, fields: "
    "[scope]}]}\n";

/* An adult, no needs, no suspects, consent, sexual exploitation. */
static const char *s_base =
    "{'schema_version':'referral.v1',"
    "'subject':{'reference':'T-1','age':30,'minor':false,'gender':'male',"
    "'nationality':'NL','municipality':'GM0402','language':'nl'},"
    "'exploitation':{'forms':['sexual']},'scope':'domestic',"
    "'indicators':['fear'],'risk':{'acute_danger':false,'urgency':'normal'},"
    "'needs':[],'client':{'spoken_to':true,'consent':true},'summary':'x'}";

typedef struct {
    int set;             /* 0: s_ops_rules, 1: s_merge_rules */
    const char *overlay; /* merged into s_base (NULL: none) */
    const char *drop;    /* "subject.age" removed after the overlay */
    const char *matched; /* space-separated rule names */
    const char *targets; /* "px:high py:normal" in target order */
    bool fallback;
    const char *project; /* "partner={json}" expected projection */
} s_case_t;

static const s_case_t s_cases[] = {
    /* 0-: each operator on the base and one change. */
    {0, NULL, NULL, "absent nested", "absent:normal nested:normal", false,
     "nested={'summary':'x'}"},
    {0, "{'subject':{'minor':true,'age':16}}", NULL, "eq-bool lt le absent",
     "eq-bool:normal lt:normal le:normal absent:normal", false,
     "lt={'subject':{'age':16}}"},
    {0, "{'risk':{'acute_danger':true,'urgency':'immediate'}}", NULL,
     "eq-str absent nested", "eq-str:normal absent:normal nested:normal", false,
     "eq-str={'risk':{'acute_danger':true,'urgency':'immediate'}}"},
    {0, "{'subject':{'age':null}}", NULL, "eq-null absent",
     "eq-null:normal absent:normal", false, "eq-null={'subject':{'age':null}}"},
    {0, "{'subject':{'nationality':'RO'}}", NULL, "in-str absent nested",
     "in-str:normal absent:normal nested:normal", false, NULL},
    {0, "{'subject':{'nationality':'DE'}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'exploitation':{'forms':['labour']}}", NULL, "contains absent",
     "contains:normal absent:normal", false,
     "contains={'exploitation':{'forms':['labour']}}"},
    {0, "{'subject':{'age':18}}", NULL, "le absent", "le:normal absent:normal",
     false, NULL},
    {0, "{'subject':{'age':17}}", NULL, "lt le absent",
     "lt:normal le:normal absent:normal", false, NULL},
    {0, "{'subject':{'age':65}}", NULL, "ge absent nested",
     "ge:normal absent:normal nested:normal", false, NULL},
    {0, "{'subject':{'age':66}}", NULL, "gt ge absent nested",
     "gt:normal ge:normal absent:normal nested:normal", false, NULL},
    {0, "{'suspects':'iemand'}", NULL, "present absent nested",
     "present:normal absent:normal nested:normal", false,
     "present={'suspects':'iemand'}"},
    {0, "{'subject':{'residence_status':'eu_citizen'}}", NULL, "nested",
     "nested:normal", false, NULL},
    {0, "{'scope':'cross_border','subject':{'language':'ro'}}", NULL,
     "absent all nested", "absent:normal all:normal nested:normal", false,
     "all={'scope':'cross_border'}"},
    {0, "{'scope':'cross_border'}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'needs':['medical']}", NULL, "absent any nested",
     "absent:normal any:normal nested:normal", false,
     "any={'needs':['medical']}"},
    {0, "{'needs':['legal']}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'client':{'consent':false}}", NULL, "absent not nested",
     "absent:normal not:normal nested:normal", false,
     "not={'client':{'spoken_to':true,'consent':false}}"},
    /* nesting: each part of `nested` failing in turn */
    {0, "{'exploitation':{'forms':['criminal']}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'exploitation':{'forms':['other']}}", NULL, "absent", "absent:normal",
     false, NULL},
    {0, "{'subject':{'age':29}}", NULL, "absent", "absent:normal", false, NULL},
    {0, "{'subject':{'minor':true,'age':40}}", NULL, "eq-bool absent",
     "eq-bool:normal absent:normal", false, NULL},
    /* missing or mistyped fields: the condition does not hold */
    {0, NULL, "subject.age", "absent", "absent:normal", false, NULL},
    {0, "{'subject':{'age':'30'}}", NULL, "absent", "absent:normal", false,
     NULL},
    {0, "{'subject':{'minor':'true'}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'needs':{'shelter':true}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'exploitation':{'forms':'labour'}}", NULL, "absent", "absent:normal",
     false, NULL},
    {0, "{'subject':[1,2]}", NULL, "absent", "absent:normal", false, NULL},
    {0, "{'risk':{'urgency':7}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, "{'subject':{'age':30.0}}", NULL, "absent nested",
     "absent:normal nested:normal", false, NULL},
    {0, NULL, "client", "absent not nested",
     "absent:normal not:normal nested:normal", false, "not={}"},
    {0, NULL, "subject", "absent", "absent:normal", false, NULL},
    {0, NULL, "exploitation", "absent", "absent:normal", false, NULL},
    /* merge: union of fields, highest priority, first-named order */
    {1, "{'subject':{'minor':true,'age':16}}", NULL, "a", "px:high py:normal",
     false, "px={'subject':{'age':16}}"},
    {1,
     "{'subject':{'minor':true,'age':16},"
     "'risk':{'acute_danger':true,'urgency':'immediate'}}",
     NULL, "a b", "px:urgent py:normal", false,
     "px={'subject':{'age':16},"
     "'risk':{'acute_danger':true,'urgency':'immediate'}}"},
    {1, "{'risk':{'acute_danger':true,'urgency':'immediate'}}", NULL, "b",
     "px:urgent", false, NULL},
    /* continue: false stops before `after` */
    {1, "{'scope':'cross_border','subject':{'gender':'female'}}", NULL, "stop",
     "py:normal", false, "py={'needs':[]}"},
    {1,
     "{'scope':'cross_border','subject':{'minor':true,'age':16,"
     "'gender':'female'}}",
     NULL, "a stop", "px:high py:normal", false,
     "py={'scope':'cross_border','needs':[]}"},
    {1, "{'subject':{'gender':'female'}}", NULL, "after", "pz:normal", false,
     "pz={'subject':{'gender':'female'}}"},
    /* no match: fallback */
    {1, NULL, NULL, "", "zorgcoordinator:normal", true,
     "zorgcoordinator={'needs':[],'subject':{'minor':false}}"},
    /* only an optional target whose partner is absent: fallback */
    {1, "{'exploitation':{'forms':['labour']}}", NULL, "opt",
     "zorgcoordinator:normal", true, NULL},
    {1, NULL, "subject", "", "zorgcoordinator:normal", true,
     "zorgcoordinator={'needs':[]}"},
};

static void s_apply(json_t *doc, const char *overlay, const char *drop)
{
    if (overlay) {
        json_t *o = khtest_json(overlay);
        ck_assert_int_eq(json_object_update_recursive(doc, o), 0);
        json_decref(o);
    }
    if (drop) {
        const char *dot = strchr(drop, '.');
        if (dot) {
            char head[64];
            snprintf(head, sizeof head, "%.*s", (int) (dot - drop), drop);
            json_object_del(json_object_get(doc, head), dot + 1);
        } else
            json_object_del(doc, drop);
    }
}

/* Space-separated list of what the result holds. */
static void s_describe(const kh_rules_result_t *r, char *matched, char *targets,
                       size_t size)
{
    matched[0] = targets[0] = '\0';
    for (size_t i = 0; i < kh_rules_result_matched_count(r); i++) {
        size_t used = strlen(matched);
        snprintf(matched + used, size - used, "%s%s", i ? " " : "",
                 kh_rules_result_matched(r, i));
    }
    for (size_t i = 0; i < kh_rules_result_target_count(r); i++) {
        size_t used = strlen(targets);
        snprintf(targets + used, size - used, "%s%s:%s", i ? " " : "",
                 kh_rules_result_partner(r, i),
                 kh_priority_name(kh_rules_result_priority(r, i)));
    }
}

START_TEST(test_eval_cases)
{
    ck_assert_int_ge(sizeof s_cases / sizeof s_cases[0], 40);
    static const kh_rules_partner_t merge_partners[] = {
        {"px", true, false},
        {"py", true, false},
        {"pz", true, false},
        {"zorgcoordinator", true, false}};
    kh_rules_t *sets[2] = {s_load_text(s_ops_rules, NULL, 0),
                           s_load_text(s_merge_rules, merge_partners, 4)};
    kh_rules_result_t *results[2] = {kh_rules_result_new(sets[0]),
                                     kh_rules_result_new(sets[1])};
    ck_assert_ptr_nonnull(results[0]);
    ck_assert_ptr_nonnull(results[1]);
    for (size_t i = 0; i < sizeof s_cases / sizeof s_cases[0]; i++) {
        const s_case_t *c = &s_cases[i];
        json_t *doc = khtest_json(s_base);
        s_apply(doc, c->overlay, c->drop);
        kh_rules_result_t *r = results[c->set];
        kh_rules_eval(sets[c->set], doc, r);
        char matched[1024], targets[1024];
        s_describe(r, matched, targets, sizeof matched);
        ck_assert_msg(strcmp(matched, c->matched) == 0,
                      "case %zu: matched '%s', expected '%s'", i, matched,
                      c->matched);
        ck_assert_msg(strcmp(targets, c->targets) == 0,
                      "case %zu: targets '%s', expected '%s'", i, targets,
                      c->targets);
        ck_assert_msg(kh_rules_result_fallback(r) == c->fallback,
                      "case %zu: fallback", i);
        /* The trail's reason: no rule matched at all, or rules matched
         * that named only partners that are not registered. */
        const char *reason = kh_rules_result_fallback_reason(r);
        ck_assert_msg(
            c->fallback
                ? reason && strcmp(reason, *c->matched ? "no_registered_target"
                                                       : "no_rule_matched") == 0
                : reason == NULL,
            "case %zu: fallback reason %s", i, reason ? reason : "none");
        if (c->project) {
            const char *eq = strchr(c->project, '=');
            char partner[64];
            snprintf(partner, sizeof partner, "%.*s", (int) (eq - c->project),
                     c->project);
            int t = kh_rules_result_find(r, partner);
            ck_assert_msg(t >= 0, "case %zu: %s not a target", i, partner);
            json_t *got = kh_rules_result_project(r, (size_t) t, doc);
            json_t *want = khtest_json(eq + 1);
            char *text = json_dumps(got, JSON_COMPACT);
            ck_assert_msg(json_equal(got, want), "case %zu: projected %s", i,
                          text);
            free(text);
            json_decref(got);
            json_decref(want);
        }
        json_decref(doc);
    }
    /* Anything, not only objects, evaluates without harm. */
    const char *odd[] = {"null", "[]", "7", "'x'", "{}"};
    for (size_t i = 0; i < 5; i++) {
        json_t *doc = khtest_json(odd[i]);
        kh_rules_eval(sets[0], doc, results[0]);
        ck_assert(kh_rules_result_fallback(results[0]) ||
                  kh_rules_result_target_count(results[0]) > 0);
        kh_rules_eval(sets[1], doc, results[1]);
        ck_assert(kh_rules_result_fallback(results[1]));
        json_decref(doc);
    }
    for (int i = 0; i < 2; i++) {
        kh_rules_result_destroy(&results[i]);
        kh_rules_destroy(&sets[i]);
    }
    ck_assert_ptr_null(sets[0]);
}
END_TEST

/* ---- escalation ------------------------------------------------------ */

/* px is named by four rules: the escalation partner comes from its
 * highest-priority targets, the first in file order that names one. */
static const char *s_escalation_rules =
    "version: 1\n"
    "fallback:\n"
    "  targets: [{partner: zorgcoordinator, priority: urgent,\n"
    "             escalate_to: {partner: py, fields: [needs]},\n"
    "             fields: [needs]}]\n"
    "rules:\n"
    "- name: high\n"
    "  when: {field: subject.minor, equals: true}\n"
    "  then: {targets: [{partner: px, priority: high,\n"
    "                    escalate_to: {partner: py, fields: [scope]},\n"
    "                    fields: [subject.age]}]}\n"
    "- name: urgent-plain\n"
    "  when: {field: scope, equals: cross_border}\n"
    "  then: {targets: [{partner: px, priority: urgent, fields: [scope]}]}\n"
    "- name: urgent-pz\n"
    "  when: {field: risk.acute_danger, equals: true}\n"
    "  then: {targets: [{partner: px, priority: urgent,\n"
    "                    escalate_to: {partner: pz, fields: [risk.urgency]},\n"
    "                    fields: [risk]}]}\n"
    "- name: urgent-py\n"
    "  when: {field: risk.urgency, equals: immediate}\n"
    "  then:\n"
    "    targets:\n"
    "    - {partner: px, priority: urgent, fields: [risk],\n"
    "       escalate_to: {partner: py, fields: [summary]}}\n"
    "    - {partner: pz, priority: urgent, fields: [summary]}\n"
    "    - {partner: gone, optional: true, priority: urgent,\n"
    "       escalate_to: {partner: py, fields: [summary]}, fields: [summary]}\n"
    "- name: optional-escalation\n"
    "  when: {field: suspects, present: true}\n"
    "  then: {targets: [{partner: py, optional: true, priority: urgent,\n"
    "                    escalate_to: {partner: absent-one, fields: [risk]},\n"
    "                    fields: [suspects]}]}\n";

typedef struct {
    const char *overlay;
    const char *targets; /* sorted "px:urgent>pz ..." */
} s_esc_case_t;

/* Messages of the notes, joined. */
static void s_collect(const kh_error_t *err, bool is_error, void *arg)
{
    char *buf = arg;
    size_t used = strlen(buf);
    snprintf(buf + used, 2048 - used, "%s %s %d:%d %s;",
             is_error ? "error" : "note", kh_error_name(err->code), err->line,
             err->column, err->path);
}

/* Load yaml with the demo registry, its notes and warnings into reports
 * (2048 bytes, "" when none); it must load. */
static kh_rules_t *s_load_noting(const char *yaml, char *reports)
{
    reports[0] = '\0';
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    o.report = s_collect;
    o.report_arg = reports;
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
    ck_assert_msg(rules != NULL, "%d:%d %s", err.line, err.column, err.message);
    return rules;
}

/* A file with one rule, r1, whose condition is cond: it loads, and its
 * notes (s_collect) are note ("" for none). */
static void s_one_rule_notes(const char *cond, const char *note)
{
    char yaml[1024], reports[2048];
    snprintf(yaml, sizeof yaml,
             "version: 1\n"
             "fallback: {targets: [{partner: zorgcoordinator, fields: "
             "[needs]}]}\n"
             "rules:\n"
             "- name: r1\n"
             "  when: %s\n"
             "  then: {targets: [{partner: avim, fields: [risk]}]}\n",
             cond);
    kh_rules_t *rules = s_load_noting(yaml, reports);
    ck_assert_msg(strcmp(reports, note) == 0, "%s: %s", cond, reports);
    kh_rules_destroy(&rules);
}

static void s_sorted_targets(const kh_rules_result_t *r, char *out,
                             size_t size);

START_TEST(test_escalation)
{
    static const kh_rules_partner_t partners[] = {
        {"px", true, false},
        {"py", true, false},
        {"pz", true, false},
        {"zorgcoordinator", true, false}};
    kh_rules_options_t o = s_opts(partners, 4);
    char reports[2048] = "";
    o.report = s_collect;
    o.report_arg = reports;
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(
        s_escalation_rules, strlen(s_escalation_rules), &o, &err);
    ck_assert_msg(rules != NULL, "%d:%d %s", err.line, err.column, err.message);
    /* A note for the high target's escalation (never takes effect), one
     * for the optional partner that is absent, one for the absent
     * escalation partner of an optional target; no errors. */
    ck_assert_str_eq(reports,
                     "note rules.escalation 10:44 rules[0].then.targets[0]."
                     "escalate_to.partner;"
                     "note rules.partner_absent 27:17 rules[3].then.targets[2]."
                     "partner;"
                     "note rules.partner_absent 32:44 rules[4].then.targets[0]."
                     "escalate_to.partner;");
    static const s_esc_case_t cases[] = {
        /* high only: not urgent, so no escalation */
        {"{'subject':{'minor':true,'age':16}}", "px:high"},
        /* urgent without escalate_to, plus high with one: none */
        {"{'subject':{'minor':true,'age':16},'scope':'cross_border'}",
         "px:urgent"},
        /* the first urgent target naming one wins, in file order */
        {"{'scope':'cross_border','risk':{'acute_danger':true,"
         "'urgency':'immediate'}}",
         "px:urgent>pz pz:urgent"},
        {"{'risk':{'acute_danger':false,'urgency':'immediate'}}",
         "px:urgent>py pz:urgent"},
        /* the optional escalation partner is absent: no copy */
        {"{'suspects':'iemand'}", "py:urgent"},
        /* no rule: the fallback's escalation */
        {NULL, "zorgcoordinator:urgent>py"},
    };
    kh_rules_result_t *r = kh_rules_result_new(rules);
    ck_assert_ptr_nonnull(r);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        json_t *doc = khtest_json(s_base);
        s_apply(doc, cases[i].overlay, NULL);
        kh_rules_eval(rules, doc, r);
        char got[1024];
        s_sorted_targets(r, got, sizeof got);
        ck_assert_msg(strcmp(got, cases[i].targets) == 0,
                      "case %zu: got '%s', expected '%s'", i, got,
                      cases[i].targets);
        json_decref(doc);
    }
    ck_assert_ptr_null(kh_rules_result_escalate_to(r, 99));
    /* The copy carries its own projection: only the escalation's fields. */
    json_t *urgent = khtest_json(s_base);
    s_apply(urgent, "{'risk':{'acute_danger':true,'urgency':'immediate'}}",
            NULL);
    kh_rules_eval(rules, urgent, r);
    int px = kh_rules_result_find(r, "px");
    ck_assert_int_ge(px, 0);
    json_t *copy = kh_rules_result_project_escalation(r, (size_t) px, urgent);
    json_t *want = khtest_json("{'risk':{'urgency':'immediate'}}");
    ck_assert_msg(json_equal(copy, want), "escalation copy: wrong fields");
    json_decref(want);
    json_decref(copy);
    int pz = kh_rules_result_find(r, "pz");
    ck_assert_ptr_null(
        kh_rules_result_project_escalation(r, (size_t) pz, urgent));
    json_decref(urgent);
    /* explain shows the escalation per rule and per partner. */
    json_t *doc = khtest_json(s_base);
    s_apply(doc, "{'risk':{'acute_danger':true,'urgency':'immediate'}}", NULL);
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(out);
    kh_rules_explain(rules, doc, out);
    fclose(out);
    ck_assert_ptr_nonnull(strstr(text, "-> px (urgent), escalates to pz\n"));
    ck_assert_ptr_nonnull(
        strstr(text, "partner px, priority urgent, escalates to pz when not "
                     "acknowledged in time, fields:"));
    ck_assert_ptr_nonnull(strstr(text, "partner pz, priority urgent, fields:"));
    /* ... and the copy's own fields and payload, as routing stores them
     * beside the delivery; pz has a delivery of its own, and would get the
     * copy beside it, which explain says. */
    ck_assert_ptr_nonnull(
        strstr(text, "escalation copy for pz (beside its own delivery), "
                     "fields:\nrisk.urgency\npayload:\n{\n"
                     "  \"risk\": {\n    \"urgency\": \"immediate\"\n"
                     "  }\n}\n"));
    free(text);
    json_decref(doc);
    /* The fallback: the reason the trail records, and a copy that is
     * sent, since py has no delivery. */
    doc = khtest_json(s_base);
    out = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(out);
    kh_rules_explain(rules, doc, out);
    fclose(out);
    ck_assert_ptr_nonnull(
        strstr(text, "no rule named a partner: fallback (no_rule_matched)\n"));
    ck_assert_ptr_nonnull(strstr(text, "escalation copy for py, fields:\n"
                                       "needs\npayload:\n"));
    free(text);
    json_decref(doc);
    /* A target that is not urgent never escalates: its rule's line must
     * not promise a copy. */
    doc = khtest_json(s_base);
    s_apply(doc, "{'subject':{'minor':true,'age':16}}", NULL);
    out = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(out);
    kh_rules_explain(rules, doc, out);
    fclose(out);
    ck_assert_ptr_nonnull(
        strstr(text, "-> px (high), escalate_to py has no effect (not "
                     "urgent)\n"));
    ck_assert_ptr_null(strstr(text, "escalates to"));
    free(text);
    json_decref(doc);
    kh_rules_result_destroy(&r);
    kh_rules_destroy(&rules);

    /* Without a partner list, nothing is checked against the registry and
     * the escalation partner is kept. */
    o = s_opts(NULL, 0);
    rules = kh_rules_load_buffer(s_escalation_rules, strlen(s_escalation_rules),
                                 &o, &err);
    ck_assert_ptr_nonnull(rules);
    r = kh_rules_result_new(rules);
    doc = khtest_json(s_base);
    s_apply(doc, "{'suspects':'iemand'}", NULL);
    kh_rules_eval(rules, doc, r);
    ck_assert_str_eq(kh_rules_result_escalate_to(r, 0), "absent-one");
    json_decref(doc);
    kh_rules_result_destroy(&r);
    kh_rules_destroy(&rules);
}
END_TEST

/* explain writes a condition's values as the file means them: every digit
 * of a number, a text as JSON (a quote in it does not end it). */
START_TEST(test_explain_values)
{
    const char *yaml =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {any: [{field: subject.age, lt: 1000000},\n"
        "               {field: suspects, equals: 'zegt \"baas\" \\ x'}]}\n"
        "  then: {targets: [{partner: avim, fields: [risk]}]}\n";
    kh_rules_t *rules = s_load_text(yaml, s_demo, S_DEMO_COUNT);
    json_t *doc = khtest_json(s_base);
    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(out);
    kh_rules_explain(rules, doc, out);
    fclose(out);
    ck_assert_msg(strstr(text, "subject.age lt 1000000   (referral: 30)\n"),
                  "%s", text);
    ck_assert_msg(strstr(text, "suspects equals \"zegt \\\"baas\\\" \\\\ "
                               "x\"   (referral: missing)\n"),
                  "%s", text);
    free(text);
    kh_rules_destroy(&rules);
    /* A rule fired, but named only a partner that is not registered: the
     * fallback is not for want of a matching rule. */
    const char *absent =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {field: subject.age, ge: 18}\n"
        "  then: {targets: [{partner: absent-one, optional: true, fields: "
        "[risk]}]}\n";
    rules = s_load_text(absent, s_demo, S_DEMO_COUNT);
    out = open_memstream(&text, &len);
    ck_assert_ptr_nonnull(out);
    kh_rules_explain(rules, doc, out);
    fclose(out);
    ck_assert_msg(strstr(text, "rule r1: FIRED\n") &&
                      strstr(text, "\nno rule named a registered partner: "
                                   "fallback (no_registered_target)\n"),
                  "%s", text);
    free(text);
    json_decref(doc);
    kh_rules_destroy(&rules);
}
END_TEST

/* ---- the invalid corpus ---------------------------------------------- */

typedef struct {
    int errors, notes;
} s_count_t;

static void s_count(const kh_error_t *err, bool is_error, void *arg)
{
    s_count_t *c = arg;
    (void) err;
    if (is_error)
        c->errors++;
    else
        c->notes++;
}

START_TEST(test_invalid_corpus)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", khtest_src("schemas/rules/invalid"));
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    struct dirent *e;
    int files = 0;
    while ((e = readdir(d))) {
        size_t len = strlen(e->d_name);
        if (len < 6 || strcmp(e->d_name + len - 5, ".yaml") != 0)
            continue;
        char path[8192], expect_path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(expect_path, sizeof expect_path, "%s/%.*s.expect", dir,
                 (int) (len - 5), e->d_name);
        char *expect = khtest_read_file(expect_path);
        ck_assert_msg(expect != NULL, "%s has no .expect", e->d_name);
        char code[64];
        int line, column;
        ck_assert_int_eq(sscanf(expect, "%63s %d %d", code, &line, &column), 3);
        free(expect);
        kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
        s_count_t count = {0, 0};
        o.report = s_count;
        o.report_arg = &count;
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load(path, &o, &err);
        ck_assert_msg(rules == NULL, "%s loaded", e->d_name);
        ck_assert_msg(strcmp(kh_error_name(err.code), code) == 0,
                      "%s: got %s (%s), expected %s", e->d_name,
                      kh_error_name(err.code), err.message, code);
        ck_assert_msg(err.line == line && err.column == column,
                      "%s: at %d:%d, expected %d:%d", e->d_name, err.line,
                      err.column, line, column);
        ck_assert_int_ge(count.errors, 1);
        files++;
    }
    closedir(d);
    ck_assert_int_ge(files, 15);
}
END_TEST

START_TEST(test_all_errors_reported)
{
    const char *yaml =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- {name: r1, when: {field: nope, equals: 1},\n"
        "   then: {targets: [{partner: politie, fields: [risk]}]}}\n"
        "- {name: r1, when: {field: subject.age, lt: -1},\n"
        "   then: {targets: [{partner: ketenregisseur, fields: [x]}]}}\n";
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    s_count_t count = {0, 0};
    o.report = s_count;
    o.report_arg = &count;
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
    ck_assert_ptr_null(rules);
    /* unknown field, unknown partner, duplicate name, never matches,
     * projection, partner without cases */
    ck_assert_int_eq(count.errors, 6);
    ck_assert_int_eq(err.code, KH_E_RULES_UNKNOWN_FIELD);
    ck_assert_int_eq(err.line, 4);
    ck_assert_str_eq(err.path, "rules[0].when.field");
}
END_TEST

/* A message says what to write instead: the fields that exist where an
 * unknown one was named, the codes a field takes, the range of a number,
 * the keys that a mapping may have, why a value is of the wrong type.
 * Table-driven: one condition or projection per case, its message. */
typedef struct {
    const char *when;   /* the rule's condition */
    const char *fields; /* the target's projection */
    const char *message;
} s_msg_case_t;

static void s_first_message(const kh_error_t *err, bool is_error, void *arg)
{
    char *buf = arg;
    if (is_error && !buf[0])
        snprintf(buf, KH_ERROR_MESSAGE_MAX, "%s", err->message);
}

START_TEST(test_messages_say_what_fits)
{
    static const s_msg_case_t cases[] = {
        {"{field: subject.gendr, equals: male}", "[risk]",
         "no field subject.gendr in the referral schema; subject has: "
         "reference, birth_date, age, minor, gender, nationality, "
         "municipality, language, residence_status"},
        {"{field: scope, equals: domestic}", "[subject.age.years]",
         "no field subject.age.years in the referral schema: subject.age is "
         "a whole number and has no fields inside it"},
        {"{field: scope, equals: domestic}", "[suspect]",
         "no field suspect in the referral schema; the top level has: "
         "schema_version, submitted_by, subject, exploitation, scope, "
         "indicators, indicators_other, risk, needs, needs_other, suspects, "
         "client, summary"},
        {"{field: scope, in: [domestic, abroad]}", "[risk]",
         "abroad is not one of the codes of scope: domestic, cross_border, "
         "unknown"},
        {"{field: needs, contains: housing}", "[risk]",
         "housing is not one of the codes of needs items: shelter, medical, "
         "psychological, legal, other"},
        {"{field: subject.age, equals: 200}", "[risk]",
         "200 is outside the range of subject.age (0 to 120)"},
        {"{field: subject.age, lt: '18'}", "[risk]",
         "lt needs a number: write the value without quotes"},
        {"{field: subject.age, equals: \"18\"}", "[risk]",
         "subject.age is a whole number: write the value without quotes"},
        {"{field: subject.age, equals: 17.5}", "[risk]",
         "subject.age is a whole number, not a fraction"},
        {"{field: subject.age, equals: 1e1}", "[risk]",
         "subject.age is a whole number: write it in decimal digits only"},
        {"{field: subject.age, lt: 1e999}", "[risk]",
         "lt needs a number: the value is too large to be a number"},
        {"{field: subject.minor, equals: yes}", "[risk]",
         "subject.minor is true/false: write true or false (yes, no, on and "
         "off are text)"},
        {"{field: scope, equals: null}", "[risk]",
         "scope is text and may not be null"},
        {"{field: needs, contains: null}", "[risk]",
         "needs holds items that are text and may not be null"},
        {"{field: needs, contains: 3}", "[risk]",
         "needs holds items that are text"},
        {"{field: needs, equals: shelter}", "[risk]",
         "needs is a list and cannot be compared with a value: contains "
         "tests for a value in it"},
        {"{field: risk, equals: true}", "[risk]",
         "risk is an object and cannot be compared with a value; name one of "
         "its fields, or test it with present"},
        {"{field: scope, \"a\\nb\": domestic}", "[risk]",
         "a?b is not a key of the rules format here; the keys are: field, "
         "equals, in, contains, lt, le, gt, ge, present"},
        {"{field: scope, '': domestic}", "[risk]",
         "an empty key is not a key of the rules format here; the keys are: "
         "field, equals, in, contains, lt, le, gt, ge, present"},
        {"{field: scope, equls: domestic}", "[risk]",
         "equls is not a key of the rules format here; the keys are: field, "
         "equals, in, contains, lt, le, gt, ge, present"},
    };
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char yaml[1024], got[KH_ERROR_MESSAGE_MAX] = "";
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- {name: r1, when: %s,\n"
                 "   then: {targets: [{partner: avim, fields: %s}]}}\n",
                 cases[i].when, cases[i].fields);
        o.report = s_first_message;
        o.report_arg = got;
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
        ck_assert_msg(rules == NULL, "case %zu: loaded", i);
        ck_assert_msg(strcmp(got, cases[i].message) == 0, "case %zu: got '%s'",
                      i, got);
    }
    /* A key of the file that must hold a list names itself. */
    const char *yaml =
        "version: 1\n"
        "partners_required: avim\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules: [{name: r1, when: {all: []},\n"
        "         then: {targets: [{partner: avim, fields: [risk]}]}}]\n";
    char got[KH_ERROR_MESSAGE_MAX] = "";
    o.report_arg = got;
    kh_error_t err;
    ck_assert_ptr_null(kh_rules_load_buffer(yaml, strlen(yaml), &o, &err));
    ck_assert_str_eq(got, "partners_required must be a list, not a single "
                          "value");
}
END_TEST

/* A message about a partner or the file's layout says what to do about
 * it, not only what the parser or the registry found: an administrator
 * who reads "not registered" for a typo, a partner not yet added or one
 * revoked, or libyaml's "did not find expected '-' indicator" for a line
 * indented one space too far, is told where to look. One whole file per
 * case (the partners are the demo's), the first error's message and
 * place. */
/* A field listed twice in one projection is a note (the second mention
 * may have been meant as another field), never an error. */
START_TEST(test_a_field_listed_twice_is_a_note)
{
    static const char *yaml = "version: 1\n"
                              "fallback: {targets: [{partner: zorgcoordinator,"
                              " fields: [needs, subject.age, needs]}]}\n"
                              "rules: []\n";
    char reports[2048];
    kh_rules_t *rules = s_load_noting(yaml, reports);
    ck_assert_str_eq(reports, "note rules.projection 2:78 "
                              "fallback.targets[0].fields[2];");
    kh_rules_destroy(&rules);
}
END_TEST

START_TEST(test_messages_say_what_to_do)
{
    static const struct {
        const char *yaml;
        int line, column;
        const char *message;
    } cases[] = {
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
         "rules:\n"
         "- {name: r1, when: {field: scope, equals: domestic},\n"
         "   then: {targets: [{partner: meldpunt-hilversem, fields: "
         "[risk]}]}}\n",
         5, 31,
         "partner meldpunt-hilversem is not registered (or was revoked): "
         "correct the id, register the partner first (ketenhubctl partner "
         "add), or mark this target optional: true"},
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
         "rules:\n"
         "- {name: r1, when: {field: scope, equals: domestic},\n"
         "   then: {targets: [{partner: avim, priority: urgent, fields: "
         "[risk],\n"
         "                     escalate_to: {partner: zorg, fields: "
         "[risk]}}]}}\n",
         6, 45,
         "escalation partner zorg is not registered (or was revoked): "
         "correct the id, or register the partner first (ketenhubctl partner "
         "add)"},
        {"version: 1\n"
         "partners_required: [avim, arbeidsinspectie]\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
         "rules: []\n",
         2, 27,
         "required partner arbeidsinspectie is not registered (or was "
         "revoked): register it first (ketenhubctl partner add), or take it "
         "out of partners_required"},
        {"version: 1\n"
         "fallback: {targets: [{partner: ketenregisseur, fields: [needs]}]}\n"
         "rules: []\n",
         2, 32,
         "partner ketenregisseur does not handle cases and may not receive "
         "case data: remove this target"},
        {"version: 1\n"
         "fallback: {targets: [{partner: Zorgcoordinator, fields: [needs]}]}\n"
         "rules: []\n",
         2, 32,
         "Zorgcoordinator is not a partner id: 2 to 32 of a-z, 0-9 and -, "
         "starting with a letter, as ketenhubctl partner list shows them"},
        {"version: 1\n"
         "fallback:\n"
         "  targets:\n"
         "    - partner: zorgcoordinator\n"
         "\t  fields: [needs]\n"
         "rules: []\n",
         5, 1,
         "while scanning a plain scalar: found a tab character that violates "
         "indentation; indent with spaces, not tabs"},
        {"version: 1\n"
         "fallback:\n"
         "  targets:\n"
         "    - partner: zorgcoordinator\n"
         "     fields: [needs]\n"
         "rules: []\n",
         5, 6,
         "while parsing a block collection: did not find expected '-' "
         "indicator; check the indentation of this line against the lines "
         "above it (the same depth lines up exactly, with spaces)"},
        {"version: 1\n"
         "fallback:\n"
         "  targets:\n"
         "    - partner: zorgcoordinator\n"
         "      fields: [needs]\n"
         " rules: []\n",
         6, 2,
         "while parsing a block mapping: did not find expected key; check the "
         "indentation of this line against the lines above it (the same "
         "depth lines up exactly, with spaces)"},
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
         "rules:\n"
         "- {name: r1, when: {field: subject.age, gt: 11, lt: 18},\n"
         "   then: {targets: [{partner: avim, fields: [risk]}]}}\n",
         4, 20,
         "the condition has 2 operators (lt and gt) and takes one: give each "
         "its own condition under all: [...]"},
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
         "rules:\n"
         "- {name: r1, when: {field: suspects},\n"
         "   then: {targets: [{partner: avim, fields: [risk]}]}}\n",
         4, 20,
         "the condition has no operator: add one of equals, in, contains, lt, "
         "le, gt, ge or present"},
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, priority: 1,\n"
         "                      fields: [needs]}]}\n"
         "rules: []\n",
         2, 59, "priority is normal, high or urgent"},
        {"version: 1\n"
         "fallback: {targets: [{partner: zorgcoordinator, fields: &f "
         "[needs]}]}\n"
         "rules: []\n",
         2, 57,
         "anchors and aliases are not allowed: write the value out in full "
         "at each place it is used"},
    };
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load_buffer(
            cases[i].yaml, strlen(cases[i].yaml), &o, &err);
        ck_assert_msg(rules == NULL, "case %zu: loaded", i);
        ck_assert_msg(strcmp(err.message, cases[i].message) == 0,
                      "case %zu: got '%s'", i, err.message);
        ck_assert_msg(err.line == cases[i].line &&
                          err.column == cases[i].column,
                      "case %zu: at %d:%d", i, err.line, err.column);
    }
}
END_TEST

/* A part of an any that can never hold does not stop the rule from
 * firing, so it is no error; but it is a slip to point out: a note. */
START_TEST(test_dead_part_of_any_noted)
{
    const char *yaml =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- {name: r1, when: {any: [{field: subject.age, lt: 0},\n"
        "                          {field: scope, equals: domestic}]},\n"
        "   then: {targets: [{partner: avim, fields: [risk]}]}}\n";
    char reports[2048];
    kh_rules_t *rules = s_load_noting(yaml, reports);
    ck_assert_str_eq(reports,
                     "note rules.never_matches 4:27 rules[0].when.any[0];");
    kh_rules_destroy(&rules);
}
END_TEST

/* Conditions that leave no value of a field, which the checks that refuse
 * a never-matching rule do not find (files using them loaded before), are
 * a note with the condition's path and place; the rule still loads. */
START_TEST(test_no_value_left_is_a_note)
{
    static const struct {
        const char *cond, *note;
    } cases[] = {
        /* not over all three scopes, as three parts of an all */
        {"{all: [{not: {field: scope, equals: domestic}}, {not: {field: "
         "scope, equals: cross_border}}, {not: {field: scope, equals: "
         "unknown}}]}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* ... and as the not of an any */
        {"{not: {any: [{field: scope, equals: domestic}, {field: scope, "
         "equals: cross_border}, {field: scope, equals: unknown}]}}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* a value that another part excludes */
        {"{all: [{field: scope, equals: domestic}, {not: {field: scope, in: "
         "[domestic, unknown]}}]}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* two ins that share no value */
        {"{all: [{field: scope, in: [domestic, unknown]}, {field: scope, in: "
         "[cross_border]}]}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* booleans, on a nested all */
        {"{all: [{not: {field: subject.minor, equals: true}}, {all: [{not: "
         "{field: subject.minor, equals: false}}]}]}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* a field not in every referral, with a value required */
        {"{all: [{field: subject.age, in: [9, 10]}, {not: {field: "
         "subject.age, in: [10, 9]}}]}",
         "note rules.never_matches 5:9 rules[0].when;"},
        /* one part of an any: the rule still fires through the other */
        {"{any: [{field: risk.acute_danger, equals: true}, {all: [{field: "
         "scope, in: [domestic]}, {field: scope, in: [unknown]}]}]}",
         "note rules.never_matches 5:58 rules[0].when.any[1];"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        s_one_rule_notes(cases[i].cond, cases[i].note);
}
END_TEST

/* A text value that no valid referral holds (outside the field's pattern
 * or length) is a note with its place: a test for it never holds. The
 * rule loads, and fires through the values that can be there. */
START_TEST(test_a_value_no_referral_holds_is_a_note)
{
    static const struct {
        const char *cond, *note;
    } cases[] = {
        {"{field: subject.municipality, equals: GM363}",
         "note rules.never_matches 5:47 rules[0].when.equals;"},
        {"{field: subject.language, in: [pl, RO]}",
         "note rules.never_matches 5:44 rules[0].when.in[1];"},
        {"{field: subject.reference, equals: ab}",
         "note rules.never_matches 5:44 rules[0].when.equals;"},
        {"{field: subject.municipality, in: [GM0363, abroad]}", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        s_one_rule_notes(cases[i].cond, cases[i].note);
}
END_TEST

/* Two long `in`s on one field: the check that some value is left would
 * compare every value of one with every value of the other (10^10
 * comparisons here, minutes at each load of the file, during which
 * routing routes nothing). Past a bound it is left out: the file loads
 * without the note, within the test's timeout. */
START_TEST(test_long_ins_load_without_the_note)
{
    enum { N = 100000 };
    size_t size = 512 + 4 * (size_t) N;
    char *yaml = malloc(size);
    ck_assert_ptr_nonnull(yaml);
    size_t used = (size_t) snprintf(
        yaml, size,
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {all: [{field: subject.age, in: [");
    for (int list = 0; list < 2; list++) {
        for (int i = 0; i < N; i++)
            used += (size_t) snprintf(yaml + used, size - used, "%s%d",
                                      i ? "," : "", list + 1);
        used += (size_t) snprintf(yaml + used, size - used, "%s",
                                  list ? "]}]}\n"
                                       : "]}, {field: subject.age, in: [");
    }
    snprintf(yaml + used, size - used,
             "  then: {targets: [{partner: avim, fields: [risk]}]}\n");
    char reports[2048];
    kh_rules_t *rules = s_load_noting(yaml, reports);
    ck_assert_str_eq(reports, "");
    kh_rules_destroy(&rules);
    free(yaml);
}
END_TEST

/* The decision version is the rules version and the context, computed as
 * schemas/rules.md says: the schema's bytes and the named partners that
 * take part, whatever the registry's order; partners the file does not
 * name, or that handle no cases, make no difference. */
START_TEST(test_decision_version_follows_the_recipe)
{
    static const char *yaml =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- {name: r1, when: {field: subject.minor, equals: true},\n"
        "   then: {targets: [{partner: veilig-thuis, fields: [subject]},\n"
        "                    {partner: px, optional: true, fields: "
        "[risk]}]}}\n";
    kh_rules_t *rules = s_load_text(yaml, s_demo, S_DEMO_COUNT);
    /* The schema's own bytes. */
    char *schema = khtest_read_file(s_schema);
    ck_assert_ptr_nonnull(schema);
    char schema_hash[65];
    kh_sha256_hex(schema, strlen(schema), schema_hash);
    free(schema);
    ck_assert_str_eq(kh_rules_schema_version(rules), schema_hash);

    static const struct {
        kh_rules_partner_t partners[4];
        size_t count;
        const char *named; /* the partner lines of the recipe */
    } cases[] = {
        {{{"zorgcoordinator", true, false},
          {"veilig-thuis", true, false},
          {"px", true, false}},
         3,
         "partner px\npartner veilig-thuis\npartner zorgcoordinator\n"},
        {{{"px", true, false},
          {"avim", true, false},
          {"zorgcoordinator", true, false},
          {"veilig-thuis", true, false}},
         4,
         "partner px\npartner veilig-thuis\npartner zorgcoordinator\n"},
        {{{"zorgcoordinator", true, false},
          {"veilig-thuis", true, false},
          {"px", false, false}},
         3,
         "partner veilig-thuis\npartner zorgcoordinator\n"},
        {{{"zorgcoordinator", true, false}, {"veilig-thuis", true, false}},
         2,
         "partner veilig-thuis\npartner zorgcoordinator\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char text[512], context[65], want[KH_RULES_DECISION_VERSION_MAX + 1];
        int len = snprintf(text, sizeof text,
                           "ketenhub rules context 1\nschema %s\n%s",
                           schema_hash, cases[i].named);
        kh_sha256_hex(text, (size_t) len, context);
        snprintf(want, sizeof want, "%s.%.32s", kh_rules_version(rules),
                 context);
        char got[KH_RULES_DECISION_VERSION_MAX + 1];
        ck_assert_int_eq(kh_rules_decision_version(rules, cases[i].partners,
                                                   cases[i].count, got),
                         0);
        ck_assert_str_eq(got, want);
    }
    kh_rules_destroy(&rules);
}
END_TEST

/* A key the format does not have (a typo) is one error among the others:
 * what is around it is still checked, so that one check shows them all. */
START_TEST(test_unknown_key_hides_nothing)
{
    const char *yaml =
        "version: 1\n"
        "extra: 1\n"
        "fallback:\n"
        "  targets: [{partner: ketenregisseur, fields: [needs]}]\n"
        "  extra: 2\n"
        "rules:\n"
        "- name: r1\n"
        "  descripton: typo\n"
        "  when: {field: nope, equals: 1, note: x}\n"
        "  then:\n"
        "    targets: [{partner: politie, fields: [risk], priorty: high}]\n"
        "    continu: false\n";
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    s_count_t count = {0, 0};
    o.report = s_count;
    o.report_arg = &count;
    kh_error_t err;
    ck_assert_ptr_null(kh_rules_load_buffer(yaml, strlen(yaml), &o, &err));
    /* extra, fallback.extra, the fallback's partner without cases,
     * descripton, note, the unknown field nope, priorty, the unknown
     * partner politie, continu */
    ck_assert_int_eq(count.errors, 9);
    ck_assert_int_eq(err.code, KH_E_RULES_UNKNOWN_KEY);
    ck_assert_int_eq(err.line, 2);
}
END_TEST

/* Conditions that look alike the never-matching ones of the corpus but can
 * hold are not refused, and do fire. */
START_TEST(test_never_matches_only_when_impossible)
{
    static const char *conds[] = {
        "{all: [{field: subject.age, equals: 10}, {field: subject.age, lt: "
        "18}]}",
        "{all: [{field: subject.age, in: [12, 40]}, {field: subject.age, ge: "
        "18}]}",
        "{all: [{field: subject.age, ge: 17.5}, {field: subject.age, le: "
        "18.5}]}",
        "{all: [{field: subject.age, present: false}, {field: subject.age, "
        "in: [null, 3]}]}",
        "{all: [{field: subject.age, equals: null}, {field: subject.age, "
        "present: false}]}",
        "{all: [{field: subject.minor, equals: true}, {all: [{field: "
        "subject.age, lt: 18}, {field: subject.minor, equals: true}]}]}",
        "{all: [{field: subject.minor, equals: true}, {any: [{field: "
        "subject.minor, equals: false}, {field: subject.age, lt: 18}]}]}",
        "{all: [{field: subject.age, lt: 18}, {not: {field: subject.age, "
        "lt: 12}}]}",
        "{all: [{field: subject.age, in: [9, 10]}, {not: {field: "
        "subject.age, in: [10]}}]}",
        "{not: {field: scope, in: [domestic, cross_border]}}",
        "{not: {field: subject.age, in: [null, 9]}}",
    };
    static const char *referrals[] = {
        "{'subject': {'age': 10, 'minor': true}}",
        "{'subject': {'age': 40, 'minor': false}}",
        "{'subject': {'age': 18, 'minor': false}}",
        "{'subject': {'age': null, 'minor': false}}",
        "{'subject': {'age': null, 'minor': false}}",
        "{'subject': {'age': 9, 'minor': true}}",
        "{'subject': {'age': 9, 'minor': true}}",
        "{'subject': {'age': 15, 'minor': true}}",
        "{'subject': {'age': 9, 'minor': true}}",
        "{'scope': 'unknown'}",
        "{'subject': {'age': 10, 'minor': true}}",
    };
    for (size_t i = 0; i < sizeof conds / sizeof conds[0]; i++) {
        char yaml[1024];
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- name: r1\n"
                 "  when: %s\n"
                 "  then: {targets: [{partner: avim, fields: [risk]}],\n"
                 "         continue: false}\n"
                 "- name: r2\n"
                 "  when: {field: risk.acute_danger, equals: true}\n"
                 "  then: {targets: [{partner: px, fields: [risk]}]}\n",
                 conds[i]);
        char reports[2048] = "";
        kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
        o.report = s_collect;
        o.report_arg = reports;
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
        ck_assert_msg(rules != NULL, "%s: %s", conds[i], err.message);
        ck_assert_msg(reports[0] == '\0', "%s: %s", conds[i], reports);
        kh_rules_result_t *r = kh_rules_result_new(rules);
        json_t *doc = khtest_json(referrals[i]);
        kh_rules_eval(rules, doc, r);
        ck_assert_msg(kh_rules_result_matched_count(r) == 1, "%s", conds[i]);
        json_decref(doc);
        kh_rules_result_destroy(&r);
        kh_rules_destroy(&rules);
    }
}
END_TEST

/* Numbers are those of the YAML 1.2 core schema: 0o17, 0x10, .5e1 and 17.
 * are numbers; a hexadecimal fraction (0x1p4), a signed hexadecimal or an
 * underscore is text, which lt refuses. */
START_TEST(test_core_schema_numbers)
{
    static const struct {
        const char *value;
        int below; /* the smallest age that lt does not hold for; 0: text */
    } cases[] = {{"0o17", 15},   {"0x10", 16}, {"0X10", 0}, {".5e1", 5},
                 {"17.", 17},    {"+18", 18},  {"1e1", 10}, {"0x1p4", 0},
                 {"0x1.8p4", 0}, {"-0x10", 0}, {"1_0", 0},  {"0o18", 0},
                 {"1e", 0},      {".", 0},     {"0x", 0}};
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char yaml[1024];
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- name: r1\n"
                 "  when: {field: subject.age, lt: %s}\n"
                 "  then: {targets: [{partner: avim, fields: [risk]}]}\n",
                 cases[i].value);
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
        if (!cases[i].below) {
            ck_assert_msg(rules == NULL && err.code == KH_E_RULES_TYPE,
                          "%s taken for a number", cases[i].value);
            continue;
        }
        ck_assert_msg(rules != NULL, "%s: %s", cases[i].value, err.message);
        kh_rules_result_t *r = kh_rules_result_new(rules);
        for (int age = cases[i].below - 1; age <= cases[i].below; age++) {
            char text[128];
            snprintf(text, sizeof text, "{'subject': {'age': %d}}", age);
            json_t *doc = khtest_json(text);
            kh_rules_eval(rules, doc, r);
            ck_assert_msg(kh_rules_result_matched_count(r) ==
                              (age < cases[i].below ? 1u : 0u),
                          "%s at age %d", cases[i].value, age);
            json_decref(doc);
        }
        kh_rules_result_destroy(&r);
        kh_rules_destroy(&rules);
    }
    /* Leading zeros are no significant digits: a whole number still. */
    static const char *zeros =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {field: subject.age, equals: 0000000000000018}\n"
        "  then: {targets: [{partner: avim, fields: [risk]}]}\n";
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(zeros, strlen(zeros), &o, &err);
    ck_assert_msg(rules != NULL, "%s", err.message);
    kh_rules_destroy(&rules);
}
END_TEST

/* ---- hostile input --------------------------------------------------- */

START_TEST(test_alias_bomb_refused_fast)
{
    /* Ten levels of ten aliases each: 10^10 nodes if expanded. */
    char yaml[8192] = "version: 1\nl0: &l0 [lol, lol, lol, lol, lol, lol, "
                      "lol, lol, lol, lol]\n";
    for (int i = 1; i < 10; i++) {
        size_t used = strlen(yaml);
        snprintf(yaml + used, sizeof yaml - used, "l%d: &l%d [", i, i);
        for (int k = 0; k < 10; k++) {
            used = strlen(yaml);
            snprintf(yaml + used, sizeof yaml - used, "%s*l%d", k ? "," : "",
                     i - 1);
        }
        used = strlen(yaml);
        snprintf(yaml + used, sizeof yaml - used, "]\n");
    }
    kh_rules_options_t o = s_opts(NULL, 0);
    kh_error_t err;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    ck_assert_ptr_null(rules);
    ck_assert_int_eq(err.code, KH_E_RULES_ALIAS);
    ck_assert_int_eq(err.line, 2);
    double ms = (double) (t1.tv_sec - t0.tv_sec) * 1e3 +
                (double) (t1.tv_nsec - t0.tv_nsec) / 1e6;
    ck_assert_msg(ms < 100, "took %.1f ms", ms);
}
END_TEST

START_TEST(test_size_depth_encoding)
{
    kh_rules_options_t o = s_opts(NULL, 0);
    kh_error_t err;
    size_t big = KH_RULES_FILE_MAX + 1;
    char *buf = malloc(big);
    ck_assert_ptr_nonnull(buf);
    memset(buf, '#', big);
    ck_assert_ptr_null(kh_rules_load_buffer(buf, big, &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_TOO_LARGE);
    /* Deep flow nesting is cut at the limit, not on the stack. */
    size_t depth = 100000;
    for (size_t i = 0; i < depth; i++)
        buf[i] = '[';
    ck_assert_ptr_null(kh_rules_load_buffer(buf, depth, &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_TOO_DEEP);
    ck_assert_int_eq(err.column, KH_RULES_DEPTH_MAX + 1);
    free(buf);
    const char nul[] = "version: 1\nrules: []\0";
    ck_assert_ptr_null(kh_rules_load_buffer(nul, sizeof nul, &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_ENCODING);
    ck_assert_int_eq(err.line, 2);
    const char utf16[] = "\xff\xfev\0e\0r\0";
    ck_assert_ptr_null(kh_rules_load_buffer(utf16, sizeof utf16 - 1, &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_ENCODING);
    ck_assert_ptr_null(kh_rules_load_buffer("", 0, &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_SYNTAX);
    const char *two = "version: 1\n---\nversion: 1\n";
    ck_assert_ptr_null(kh_rules_load_buffer(two, strlen(two), &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_SYNTAX);
    ck_assert_ptr_null(kh_rules_load("/nonexistent/rules.yaml", &o, &err));
    ck_assert_int_eq(err.code, KH_E_IO);
}
END_TEST

/* A schema whose objects nest deeper than a projection builds them
 * (KH_RULES_DEPTH_MAX) is refused as a bad schema, rather than its
 * deepest fields cut from every delivery unseen; one as deep as that is
 * read (the rules then fail on their own fields, unknown to it). */
static int s_load_nested(int depth, kh_error_t *err)
{
    char *dir = khtest_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/schema.json", dir);
    char *text = calloc(1, (size_t) depth * 64 + 256);
    ck_assert_ptr_nonnull(text);
    strcat(text, "{\"type\":\"object\",\"properties\":{");
    for (int i = 0; i < depth; i++)
        strcat(text, "\"a\":{\"type\":\"object\",\"properties\":{");
    strcat(text, "\"leaf\":{\"type\":\"string\"}");
    for (int i = 0; i <= depth; i++)
        strcat(text, "}}");
    khtest_write_file(path, text);
    free(text);
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    o.schema_path = path;
    kh_rules_t *rules =
        kh_rules_load(khtest_src("schemas/rules/default.yaml"), &o, err);
    ck_assert_ptr_null(rules);
    khtest_rmtree(dir);
    free(dir);
    return err->code;
}

START_TEST(test_schema_deeper_than_a_projection_is_refused)
{
    kh_error_t err;
    ck_assert_int_eq(s_load_nested(KH_RULES_DEPTH_MAX + 1, &err), KH_E_CONFIG);
    ck_assert_msg(strstr(err.message, "schema"), "%s", err.message);
    ck_assert_int_ne(s_load_nested(KH_RULES_DEPTH_MAX, &err), KH_E_CONFIG);
}
END_TEST

/* A NUL or another control character written as an escape in a quoted
 * scalar ("\0", "\x01") is binary input as much as the raw byte: it is
 * refused where it stands. Cut at the NUL, the text would mean something
 * else than it says: a value that never equals a referral's, a partner id
 * that is not the one written. */
START_TEST(test_escaped_control_characters)
{
    static const struct {
        const char *scalar;
        int column;
    } cases[] = {
        {"when: {field: risk.urgency, equals: \"immediate\\0\"}", 39},
        {"when: {\"field\\0x\": risk.urgency, equals: immediate}", 10},
        {"when: {field: risk.urgency, equals: \"immediate\\x1b\"}", 39},
        {"when: {field: risk.urgency, equals: \"\\u0000\"}", 39},
        /* The C1 controls and the Unicode line and paragraph separators,
         * refused as raw bytes, are refused as escapes too. */
        {"description: \"one\\x85two\"", 16},
        {"description: \"one\\Ntwo\"", 16},
        {"description: \"one\\u009ftwo\"", 16},
        {"description: \"one\\u2028two\"", 16},
        {"description: \"one\\Ltwo\"", 16},
        {"description: \"one\\Ptwo\"", 16},
        /* and so are the noncharacters U+FFFE and U+FFFF */
        {"description: \"one\\ufffetwo\"", 16},
        {"description: \"one\\uFFFFtwo\"", 16},
    };
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char yaml[1024];
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- name: r1\n"
                 "  %s\n"
                 "  then: {targets: [{partner: avim, fields: [risk]}]}\n",
                 cases[i].scalar);
        kh_error_t err;
        kh_rules_t *rules = kh_rules_load_buffer(yaml, strlen(yaml), &o, &err);
        ck_assert_msg(rules == NULL, "%s loaded", cases[i].scalar);
        ck_assert_msg(err.code == KH_E_RULES_ENCODING, "%s: %s",
                      cases[i].scalar, kh_error_name(err.code));
        ck_assert_int_eq(err.line, 5);
        ck_assert_int_eq(err.column, cases[i].column);
    }
    const char *partner =
        "version: 1\n"
        "fallback: {targets: [{partner: \"zorgcoordinator\\0x\", fields: "
        "[needs]}]}\n"
        "rules: []\n";
    kh_error_t err;
    ck_assert_ptr_null(
        kh_rules_load_buffer(partner, strlen(partner), &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_ENCODING);
    /* Tab and line breaks stay allowed, escaped or not. */
    const char *ok =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  description: \"one\\ttwo\\nthree\\r\"\n"
        "  when: {field: risk.urgency, equals: immediate}\n"
        "  then: {targets: [{partner: avim, fields: [risk]}]}\n";
    kh_rules_t *rules = kh_rules_load_buffer(ok, strlen(ok), &o, &err);
    ck_assert_msg(rules != NULL, "%s", err.message);
    kh_rules_destroy(&rules);
}
END_TEST

/* A UTF-8 byte order mark, as some editors write it, is allowed (YAML
 * allows it at the start of the stream): the rules load, problems keep
 * their line and column, and the version is still the hash of the bytes. */
START_TEST(test_byte_order_mark)
{
    const char *body =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- {name: r1, when: {field: subject.minor, equals: true},\n"
        "   then: {targets: [{partner: avim, fields: [risk]}]}}\n";
    char text[1024];
    snprintf(text, sizeof text, "\xEF\xBB\xBF%s", body);
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    kh_error_t err;
    kh_rules_t *rules = kh_rules_load_buffer(text, strlen(text), &o, &err);
    ck_assert_msg(rules != NULL, "%d:%d %s: %s", err.line, err.column,
                  kh_error_name(err.code), err.message);
    char hex[65];
    kh_sha256_hex(text, strlen(text), hex);
    ck_assert_str_eq(kh_rules_version(rules), hex);
    ck_assert_uint_eq(kh_rules_count(rules), 1);
    kh_rules_destroy(&rules);

    snprintf(text, sizeof text, "\xEF\xBB\xBFversion: 1\nrules: [\n");
    ck_assert_ptr_null(kh_rules_load_buffer(text, strlen(text), &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_SYNTAX);
    ck_assert_int_eq(err.line, 3);
    /* Only at the start: anywhere else it is not allowed. */
    snprintf(text, sizeof text, "version: 1\n\xEF\xBB\xBF");
    ck_assert_ptr_null(kh_rules_load_buffer(text, strlen(text), &o, &err));
}
END_TEST

/* A rules file is a regular file: a FIFO (which would block the reader
 * until some writer came, a routing reload included), a directory or a
 * device is refused at once, saying why. */
START_TEST(test_not_a_regular_file)
{
    kh_rules_options_t o = s_opts(NULL, 0);
    kh_error_t err;
    char *dir = khtest_tmpdir();
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/rules.yaml", dir);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    alarm(5); /* a blocked open ends the test instead of hanging it */
    ck_assert_ptr_null(kh_rules_load(fifo, &o, &err));
    alarm(0);
    ck_assert_int_eq(err.code, KH_E_IO);
    ck_assert_msg(strstr(err.message, "not a regular file"), "%s", err.message);
    ck_assert_ptr_null(kh_rules_load(dir, &o, &err));
    ck_assert_int_eq(err.code, KH_E_IO);
    ck_assert_msg(strstr(err.message, "not a regular file"), "%s", err.message);
    ck_assert_ptr_null(kh_rules_load("/dev/zero", &o, &err));
    ck_assert_int_eq(err.code, KH_E_IO);
    ck_assert_msg(strstr(err.message, "not a regular file"), "%s", err.message);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* ---- the default rules ----------------------------------------------- */

typedef struct {
    const char *example;
    const char *targets; /* sorted "partner:priority" */
} s_route_t;

/* What chapters 5 and 6 of the policy ask for each example. */
static const s_route_t s_routes[] = {
    {"adult-labour-agriculture-shelter",
     "arbeidsinspectie:normal zorgcoordinator:normal"},
    {"criminal-with-suspects", "avim:high zorgcoordinator:normal"},
    {"minor-criminal-cross-border",
     "arbeidsinspectie:normal avim:high veilig-thuis:high "
     "zorgcoordinator:high"},
    {"minor-sexual-acute", "avim:urgent>zorgcoordinator "
                           "veilig-thuis:urgent>zorgcoordinator "
                           "zorgcoordinator:high"},
    {"unknown-age-domestic-work",
     "arbeidsinspectie:normal zorgcoordinator:normal"},
};

static int s_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}

static void s_sorted_targets(const kh_rules_result_t *r, char *out, size_t size)
{
    char items[16][96];
    char *ptrs[16] = {NULL};
    size_t n = kh_rules_result_target_count(r);
    ck_assert_uint_le(n, 16);
    for (size_t i = 0; i < n; i++) {
        const char *esc = kh_rules_result_escalate_to(r, i);
        snprintf(items[i], sizeof items[i], "%s:%s%s%s",
                 kh_rules_result_partner(r, i),
                 kh_priority_name(kh_rules_result_priority(r, i)),
                 esc ? ">" : "", esc ? esc : "");
        ptrs[i] = items[i];
    }
    qsort(ptrs, n, sizeof ptrs[0], s_cmp);
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        size_t used = strlen(out);
        snprintf(out + used, size - used, "%s%s", i ? " " : "", ptrs[i]);
    }
}

/* The sorted targets of the rules for the referral s_base with overlay. */
static void s_targets_of(const kh_rules_t *rules, const char *overlay,
                         char *out, size_t size)
{
    kh_rules_result_t *r = kh_rules_result_new(rules);
    ck_assert_ptr_nonnull(r);
    json_t *doc = khtest_json(s_base);
    s_apply(doc, overlay, NULL);
    kh_rules_eval(rules, doc, r);
    s_sorted_targets(r, out, size);
    json_decref(doc);
    kh_rules_result_destroy(&r);
}

/* The registry changes after the rules were loaded: optional targets and
 * an optional target's escalation partner follow it, a partner that does
 * not handle cases never takes part, the required targets stay, and the
 * fallback keeps a partner. */
START_TEST(test_set_partners)
{
    static const kh_rules_partner_t at_load[] = {
        {"px", true, false},
        {"py", true, false},
        {"pz", true, false},
        {"zorgcoordinator", true, false}};
    kh_rules_t *rules = s_load_text(s_escalation_rules, at_load, 4);
    static const char *suspects = "{'suspects':'iemand'}";
    static const char *immediate =
        "{'risk':{'acute_danger':false,'urgency':'immediate'}}";
    char got[1024];
    s_targets_of(rules, suspects, got, sizeof got);
    ck_assert_str_eq(got, "py:urgent");
    s_targets_of(rules, immediate, got, sizeof got);
    ck_assert_str_eq(got, "px:urgent>py pz:urgent");
    /* Nothing changed: nothing to do. */
    ck_assert_int_eq(kh_rules_set_partners(rules, at_load, 4), 0);

    static const kh_rules_partner_t more[] = {
        {"px", true, false},         {"py", true, false},
        {"pz", true, false},         {"zorgcoordinator", true, false},
        {"absent-one", true, false}, {"gone", true, false}};
    ck_assert_int_eq(kh_rules_set_partners(rules, more, 6), 2);
    s_targets_of(rules, suspects, got, sizeof got);
    ck_assert_str_eq(got, "py:urgent>absent-one");
    s_targets_of(rules, immediate, got, sizeof got);
    ck_assert_str_eq(got, "gone:urgent>py px:urgent>py pz:urgent");

    /* Registered without handling cases: skipped as if absent. px, a
     * required target revoked since, stays (its deliveries die, with
     * their alerts). */
    static const kh_rules_partner_t fewer[] = {{"py", true, false},
                                               {"pz", true, false},
                                               {"zorgcoordinator", true, false},
                                               {"absent-one", false, false},
                                               {"gone", false, false}};
    ck_assert_int_eq(kh_rules_set_partners(rules, fewer, 5), 2);
    s_targets_of(rules, suspects, got, sizeof got);
    ck_assert_str_eq(got, "py:urgent");
    s_targets_of(rules, immediate, got, sizeof got);
    ck_assert_str_eq(got, "px:urgent>py pz:urgent");

    /* What the rules need and the registry lacks: px, a required target
     * revoked since; not absent-one, an optional target's escalation
     * partner, nor gone, an optional target. With no registry: every
     * required target and the escalation partner of one (py), each once. */
    const char *missing[4];
    ck_assert_int_eq(kh_rules_missing_partners(rules, fewer, 5, missing, 4), 1);
    ck_assert_str_eq(missing[0], "px");
    ck_assert_int_eq(kh_rules_missing_partners(rules, at_load, 4, missing, 4),
                     0);
    ck_assert_int_eq(kh_rules_missing_partners(rules, NULL, 0, missing, 4), 4);
    kh_rules_destroy(&rules);

    /* A fallback of optional partners: with none of them left, those the
     * registry holds revoked, as handling cases, take part (their
     * deliveries die, with their alerts), whichever was left before: the
     * registry alone decides. Never one that was not registered, nor one
     * that does not handle cases (the ketenregisseur, registered since):
     * no delivery to a partner that does not exist, and no case data to
     * one that may not receive it. */
    static const char *optional_fallback =
        "version: 1\n"
        "fallback: {targets: [{partner: px, optional: true, fields: [needs]},"
        " {partner: py, optional: true, fields: [needs]},"
        " {partner: regie, optional: true, fields: [needs]},"
        " {partner: never, optional: true, fields: [needs]}]}\n"
        "rules: []\n";
    rules = s_load_text(optional_fallback, at_load, 4);
    static const kh_rules_partner_t only_py[] = {{"px", true, true},
                                                 {"py", true, false}};
    ck_assert_int_eq(kh_rules_set_partners(rules, only_py, 2), 1);
    s_targets_of(rules, NULL, got, sizeof got);
    ck_assert_str_eq(got, "py:normal");
    const char *missing_now[4];
    ck_assert_int_eq(
        kh_rules_missing_partners(rules, only_py, 2, missing_now, 4), 0);
    static const kh_rules_partner_t nobody[] = {{"px", true, true},
                                                {"py", true, true},
                                                {"pz", true, false},
                                                {"regie", false, false}};
    ck_assert_int_eq(kh_rules_set_partners(rules, nobody, 4), 1);
    s_targets_of(rules, NULL, got, sizeof got);
    ck_assert_str_eq(got, "px:normal py:normal");
    /* ... which routing warns of as of required partners revoked. */
    ck_assert_int_eq(
        kh_rules_missing_partners(rules, nobody, 4, missing_now, 4), 2);
    ck_assert_str_eq(missing_now[0], "px");
    ck_assert_str_eq(missing_now[1], "py");
    /* The decision version names them, apart from the partners that take
     * part registered. */
    char version[KH_RULES_DECISION_VERSION_MAX + 1];
    ck_assert_int_eq(kh_rules_decision_version(rules, nobody, 4, version), 0);
    char text[512], context[65];
    int len = snprintf(text, sizeof text,
                       "ketenhub rules context 1\nschema %s\n"
                       "revoked px\nrevoked py\n",
                       kh_rules_schema_version(rules));
    kh_sha256_hex(text, (size_t) len, context);
    char want[KH_RULES_DECISION_VERSION_MAX + 1];
    snprintf(want, sizeof want, "%s.%.32s", kh_rules_version(rules), context);
    ck_assert_str_eq(version, want);
    kh_rules_destroy(&rules);
    /* Loaded with px alone registered: px alone, revoked, is left. */
    static const kh_rules_partner_t only_px[] = {{"px", true, false}};
    rules = s_load_text(optional_fallback, only_px, 1);
    s_targets_of(rules, NULL, got, sizeof got);
    ck_assert_str_eq(got, "px:normal");
    static const kh_rules_partner_t px_revoked[] = {{"px", true, true},
                                                    {"regie", false, false}};
    ck_assert_int_eq(kh_rules_set_partners(rules, px_revoked, 2), 0);
    s_targets_of(rules, NULL, got, sizeof got);
    ck_assert_str_eq(got, "px:normal");
    kh_rules_destroy(&rules);
}
END_TEST

static json_t *s_example(const char *name)
{
    char rel[256];
    snprintf(rel, sizeof rel, "schemas/examples/%s.json", name);
    json_error_t jerr;
    json_t *doc = json_load_file(khtest_src(rel), 0, &jerr);
    ck_assert_msg(doc != NULL, "%s: %s", rel, jerr.text);
    return doc;
}

START_TEST(test_default_rules_route_examples)
{
    kh_rules_partner_t with[S_DEMO_COUNT + 1];
    memcpy(with, s_demo, sizeof s_demo);
    with[S_DEMO_COUNT] = (kh_rules_partner_t){"arbeidsinspectie", true, false};
    kh_rules_options_t o = s_opts(with, S_DEMO_COUNT + 1);
    kh_error_t err;
    kh_rules_t *rules =
        kh_rules_load(khtest_src("schemas/rules/default.yaml"), &o, &err);
    ck_assert_msg(rules != NULL, "%d:%d %s", err.line, err.column, err.message);
    /* The version is the SHA-256 of the file's bytes. */
    char *text = khtest_read_file(khtest_src("schemas/rules/default.yaml"));
    char hex[65];
    kh_sha256_hex(text, strlen(text), hex);
    ck_assert_str_eq(kh_rules_version(rules), hex);
    free(text);

    kh_rules_result_t *r = kh_rules_result_new(rules);
    for (size_t i = 0; i < sizeof s_routes / sizeof s_routes[0]; i++) {
        json_t *doc = s_example(s_routes[i].example);
        kh_rules_eval(rules, doc, r);
        char got[1024];
        s_sorted_targets(r, got, sizeof got);
        ck_assert_msg(strcmp(got, s_routes[i].targets) == 0,
                      "%s: got '%s', expected '%s'", s_routes[i].example, got,
                      s_routes[i].targets);
        ck_assert(!kh_rules_result_fallback(r));
        /* Need to know: AVIM never sees consent or care needs; the
         * inspectorate sees only the reference and language of the
         * person; the care view holds no suspects. */
        int avim = kh_rules_result_find(r, "avim");
        if (avim >= 0) {
            json_t *p = kh_rules_result_project(r, (size_t) avim, doc);
            ck_assert_ptr_null(json_object_get(p, "client"));
            ck_assert_ptr_null(json_object_get(p, "needs"));
            ck_assert_ptr_nonnull(json_object_get(p, "risk"));
            ck_assert(json_equal(json_object_get(p, "suspects"),
                                 json_object_get(doc, "suspects")) ||
                      !json_object_get(doc, "suspects"));
            json_decref(p);
        }
        int ai = kh_rules_result_find(r, "arbeidsinspectie");
        if (ai >= 0) {
            json_t *p = kh_rules_result_project(r, (size_t) ai, doc);
            ck_assert_uint_eq(json_object_size(json_object_get(p, "subject")),
                              2);
            ck_assert_ptr_null(json_object_get(p, "client"));
            json_decref(p);
        }
        int zc = kh_rules_result_find(r, "zorgcoordinator");
        ck_assert_int_ge(zc, 0);
        json_t *p = kh_rules_result_project(r, (size_t) zc, doc);
        ck_assert_ptr_null(json_object_get(p, "suspects"));
        ck_assert(json_equal(json_object_get(p, "subject"),
                             json_object_get(doc, "subject")));
        json_decref(p);
        json_decref(doc);
    }
    /* A referral no rule names: the zorgcoordinator, flagged. */
    json_t *doc = khtest_json(s_base);
    kh_rules_eval(rules, doc, r);
    ck_assert(kh_rules_result_fallback(r));
    ck_assert_uint_eq(kh_rules_result_matched_count(r), 0);
    ck_assert_uint_eq(kh_rules_result_target_count(r), 1);
    ck_assert_str_eq(kh_rules_result_partner(r, 0), "zorgcoordinator");
    json_decref(doc);
    kh_rules_result_destroy(&r);
    kh_rules_destroy(&rules);

    /* Without the inspectorate: a note, and labour is not routed there. */
    o = s_opts(s_demo, S_DEMO_COUNT);
    s_count_t count = {0, 0};
    o.report = s_count;
    o.report_arg = &count;
    rules = kh_rules_load(khtest_src("schemas/rules/default.yaml"), &o, &err);
    ck_assert_ptr_nonnull(rules);
    ck_assert_int_eq(count.errors, 0);
    ck_assert_int_eq(count.notes, 1);
    r = kh_rules_result_new(rules);
    doc = s_example("unknown-age-domestic-work");
    kh_rules_eval(rules, doc, r);
    char got[1024];
    s_sorted_targets(r, got, sizeof got);
    ck_assert_str_eq(got, "zorgcoordinator:normal");
    json_decref(doc);
    kh_rules_result_destroy(&r);
    kh_rules_destroy(&rules);

    /* Without AVIM registered, the default rules are refused. */
    static const kh_rules_partner_t few[] = {{"veilig-thuis", true, false},
                                             {"zorgcoordinator", true, false}};
    o = s_opts(few, 2);
    ck_assert_ptr_null(
        kh_rules_load(khtest_src("schemas/rules/default.yaml"), &o, &err));
    ck_assert_int_eq(err.code, KH_E_RULES_UNKNOWN_PARTNER);
}
END_TEST

/* ---- limits and repeats ---------------------------------------------- */

/* The errors a load reports, and how many of them have one code. */
typedef struct {
    kh_errcode_t code;
    int errors, of_code, notes;
} s_tally_t;

static void s_tally(const kh_error_t *err, bool is_error, void *arg)
{
    s_tally_t *t = arg;
    if (!is_error) {
        t->notes++;
        return;
    }
    t->errors++;
    t->of_code += err->code == t->code;
}

/* Load yaml with the demo partners, tallying what it reports into t (its
 * code set by the caller); the rules, or NULL with *err. */
static kh_rules_t *s_load_tally(const char *yaml, s_tally_t *t, kh_error_t *err)
{
    kh_rules_options_t o = s_opts(s_demo, S_DEMO_COUNT);
    o.report = s_tally;
    o.report_arg = t;
    return kh_rules_load_buffer(yaml, strlen(yaml), &o, err);
}

/* A partner named again in one target list is one error per repeat, at
 * the repeat: not one per earlier mention (a list naming avim 2,000 times
 * made some two million). Every error is reported: the loader has no cap. */
START_TEST(test_partner_repeated_in_targets)
{
    enum { TIMES = 2000 };
    static const char head[] =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {field: subject.minor, equals: true}\n"
        "  then:\n"
        "    targets:\n";
    static const char target[] = "    - {partner: avim, fields: [risk]}\n";
    size_t size = sizeof head + TIMES * (sizeof target - 1);
    char *yaml = malloc(size);
    ck_assert_ptr_nonnull(yaml);
    size_t used = (size_t) snprintf(yaml, size, "%s", head);
    for (int i = 0; i < TIMES; i++)
        used += (size_t) snprintf(yaml + used, size - used, "%s", target);
    s_tally_t t = {.code = KH_E_RULES_DUPLICATE_NAME};
    kh_error_t err;
    ck_assert_ptr_null(s_load_tally(yaml, &t, &err));
    ck_assert_int_eq(t.errors, TIMES - 1);
    ck_assert_int_eq(t.of_code, TIMES - 1);
    /* The first repeat is the second target, on line 9. */
    ck_assert_int_eq(err.code, KH_E_RULES_DUPLICATE_NAME);
    ck_assert_int_eq(err.line, 9);
    ck_assert_int_eq(err.column, 17);
    ck_assert_str_eq(err.path, "rules[0].then.targets[1].partner");
    free(yaml);
}
END_TEST

/* A mapping may have 64 keys (each then checked: here 63 unknown ones
 * besides targets); one of 65 is too large, said once, at the mapping,
 * with the code of the other limits. */
START_TEST(test_keys_limit)
{
    for (int keys = 64; keys <= 65; keys++) {
        char yaml[4096];
        size_t used = (size_t) snprintf(
            yaml, sizeof yaml,
            "version: 1\n"
            "fallback:\n"
            "  targets: [{partner: zorgcoordinator, fields: [needs]}]\n");
        for (int k = 1; k < keys; k++)
            used += (size_t) snprintf(yaml + used, sizeof yaml - used,
                                      "  k%d: 1\n", k);
        snprintf(yaml + used, sizeof yaml - used,
                 "rules:\n"
                 "- name: r1\n"
                 "  when: {field: subject.minor, equals: true}\n"
                 "  then: {targets: [{partner: avim, fields: [risk]}]}\n");
        s_tally_t t = {.code = KH_E_RULES_UNKNOWN_KEY};
        kh_error_t err;
        ck_assert_ptr_null(s_load_tally(yaml, &t, &err));
        if (keys == 64) {
            ck_assert_int_eq(t.errors, 63);
            ck_assert_int_eq(t.of_code, 63);
            ck_assert_int_eq(err.code, KH_E_RULES_UNKNOWN_KEY);
            continue;
        }
        ck_assert_int_eq(t.errors, 1);
        ck_assert_int_eq(err.code, KH_E_RULES_TOO_LARGE);
        ck_assert_int_eq(err.line, 3);
        ck_assert_int_eq(err.column, 3);
        ck_assert_str_eq(err.path, "fallback");
        ck_assert_msg(strstr(err.message, "65 keys") &&
                          strstr(err.message, "more than 64"),
                      "%s", err.message);
    }
}
END_TEST

/* .inf, -.inf and .nan are numbers to YAML's core schema, though none a
 * referral can hold: a type error where a number is wanted, saying so,
 * and where text is wanted the same error as for any other number (a
 * quoted one is text). Spellings the core schema does not have are
 * text. */
START_TEST(test_infinity_and_nan)
{
    static const char *const special[] = {".inf",  "-.inf", "+.inf", ".Inf",
                                          "-.Inf", ".INF",  "+.INF", ".nan",
                                          ".NaN",  ".NAN"};
    /* Where the value goes: into a condition (between before and after)
     * or, without one, for the description. */
    static const struct {
        const char *before, *after;
        bool numeric;
        int line, column;
    } places[] = {
        {"{field: subject.age, lt: ", "}", true, 6, 34},
        {"{field: subject.age, equals: ", "}", true, 6, 38},
        {"{field: suspects, equals: ", "}", false, 6, 35},
        {NULL, NULL, false, 5, 16},
    };
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++)
        for (size_t k = 0; k < sizeof places / sizeof places[0]; k++) {
            const char *v = special[i], *before = places[k].before;
            char yaml[1024];
            snprintf(yaml, sizeof yaml,
                     "version: 1\n"
                     "fallback: {targets: [{partner: zorgcoordinator, "
                     "fields: [needs]}]}\n"
                     "rules:\n"
                     "- name: r1\n"
                     "  description: %s\n"
                     "  when: %s%s%s\n"
                     "  then: {targets: [{partner: avim, fields: [risk]}]}\n",
                     before ? "d" : v,
                     before ? before : "{field: subject.minor, equals: true",
                     before ? v : "", before ? places[k].after : "}");
            s_tally_t t = {.code = KH_E_RULES_TYPE};
            kh_error_t err;
            kh_rules_t *rules = s_load_tally(yaml, &t, &err);
            ck_assert_msg(rules == NULL, "%s (place %zu) loaded", v, k);
            ck_assert_msg(t.errors == 1 && err.code == KH_E_RULES_TYPE,
                          "%s (place %zu): %d errors, %s: %s", v, k, t.errors,
                          kh_error_name(err.code), err.message);
            ck_assert_int_eq(err.line, places[k].line);
            ck_assert_int_eq(err.column, places[k].column);
            ck_assert_msg(
                !places[k].numeric ||
                    strstr(err.message, ": infinity and NaN are no values"),
                "%s (place %zu): %s", v, k, err.message);
            if (k == 2)
                ck_assert_str_eq(err.message, "suspects is text");
            if (k == 3)
                ck_assert_str_eq(err.message, "description must be text");
        }
    /* As any other number is text only in quotes. */
    s_tally_t t = {.code = KH_E_RULES_TYPE};
    kh_error_t err;
    ck_assert_ptr_null(s_load_tally(
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- {name: r1, when: {field: suspects, equals: 12},\n"
        "   then: {targets: [{partner: avim, fields: [risk]}]}}\n",
        &t, &err));
    ck_assert_str_eq(err.message, "suspects is text");
    static const char *const text[] = {"'.inf'", "\".nan\"", ".InF", "+.nan",
                                       "-.nan",  "inf",      "-inf", "nan"};
    for (size_t i = 0; i < sizeof text / sizeof text[0]; i++) {
        char yaml[1024];
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- {name: r1, description: %s,\n"
                 "   when: {field: suspects, equals: %s},\n"
                 "   then: {targets: [{partner: avim, fields: [risk]}]}}\n",
                 text[i], text[i]);
        kh_rules_t *rules = s_load_text(yaml, s_demo, S_DEMO_COUNT);
        kh_rules_destroy(&rules);
        /* Nor is such text said to be a number too large. */
        snprintf(yaml, sizeof yaml,
                 "version: 1\n"
                 "fallback: {targets: [{partner: zorgcoordinator, fields: "
                 "[needs]}]}\n"
                 "rules:\n"
                 "- {name: r1, when: {field: subject.age, lt: %s},\n"
                 "   then: {targets: [{partner: avim, fields: [risk]}]}}\n",
                 text[i]);
        ck_assert_ptr_null(s_load_tally(yaml, &t, &err));
        ck_assert_int_eq(err.code, KH_E_RULES_TYPE);
        ck_assert_msg(strcmp(err.message, "lt needs a number") == 0, "%s: %s",
                      text[i], err.message);
    }
}
END_TEST

/* An optional target whose escalation partner is absent gets the note of
 * a target that is not urgent all the same (escalate_to never takes
 * effect there, registered or not), besides the note that the partner is
 * absent; and no copy. */
START_TEST(test_optional_escalation_absent_not_urgent)
{
    static const char yaml[] =
        "version: 1\n"
        "fallback: {targets: [{partner: zorgcoordinator, fields: [needs]}]}\n"
        "rules:\n"
        "- name: r1\n"
        "  when: {field: subject.minor, equals: true}\n"
        "  then:\n"
        "    targets:\n"
        "    - {partner: py, optional: true, priority: high,\n"
        "       escalate_to: {partner: absent-one, fields: [risk]},\n"
        "       fields: [scope]}\n"
        "    - {partner: pz, optional: true,\n"
        "       escalate_to: {partner: px, fields: [risk]},\n"
        "       fields: [scope]}\n";
    char reports[2048];
    kh_rules_t *rules = s_load_noting(yaml, reports);
    ck_assert_str_eq(reports,
                     "note rules.partner_absent 9:31 rules[0].then.targets[0]."
                     "escalate_to.partner;"
                     "note rules.escalation 9:31 rules[0].then.targets[0]."
                     "escalate_to.partner;"
                     "note rules.escalation 12:31 rules[0].then.targets[1]."
                     "escalate_to.partner;");
    kh_rules_result_t *r = kh_rules_result_new(rules);
    ck_assert_ptr_nonnull(r);
    json_t *doc = khtest_json(s_base);
    s_apply(doc, "{'subject':{'minor':true,'age':16}}", NULL);
    kh_rules_eval(rules, doc, r);
    int py = kh_rules_result_find(r, "py");
    ck_assert_int_ge(py, 0);
    ck_assert_ptr_null(kh_rules_result_escalate_to(r, (size_t) py));
    json_decref(doc);
    kh_rules_result_destroy(&r);
    kh_rules_destroy(&rules);
}
END_TEST

/* ---- ketenhubctl rules -------------------------------------------------- */

START_TEST(test_ctl_exit_codes)
{
    char ctl[4096], partners[4096];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    char *dir = khtest_tmpdir();
    snprintf(partners, sizeof partners, "%s/partners.json", dir);
    khtest_write_file(partners,
                      "[{\"id\":\"veilig-thuis\",\"handles_cases\":true},"
                      "{\"id\":\"zorgcoordinator\",\"handles_cases\":true},"
                      "{\"id\":\"avim\",\"handles_cases\":true},"
                      "{\"id\":\"ketenregisseur\",\"handles_cases\":false}]");
    char def[4096], bad[4096], ex[4096];
    snprintf(def, sizeof def, "%s", khtest_src("schemas/rules/default.yaml"));
    snprintf(bad, sizeof bad, "%s",
             khtest_src("schemas/rules/invalid/unknown-partner.yaml"));
    snprintf(ex, sizeof ex, "%s",
             khtest_src("schemas/examples/minor-sexual-acute.json"));
    char *out = NULL;
    char *ok[] = {ctl, "rules", "check", def, "--partners", partners, NULL};
    ck_assert_int_eq(khtest_run(ok, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "rules.partner_absent"));
    ck_assert_ptr_null(strstr(out, "rules.escalation"));
    free(out);
    char *invalid[] = {ctl,          "rules",  "check", bad,
                       "--partners", partners, NULL};
    ck_assert_int_eq(khtest_run(invalid, &out), 1);
    ck_assert_ptr_nonnull(strstr(out, ":9:27: rules.unknown_partner:"));
    free(out);
    /* A file too large has no line: said of the file, not of a line 0. */
    char big[4096];
    snprintf(big, sizeof big, "%s/big.yaml", dir);
    FILE *f = fopen(big, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < 70000; i++)
        fputs("# a long comment line\n", f);
    fclose(f);
    char *too_large[] = {ctl,          "rules",  "check", big,
                         "--partners", partners, NULL};
    ck_assert_int_eq(khtest_run(too_large, &out), 1);
    ck_assert_msg(strstr(out, "big.yaml: rules.too_large: ") &&
                      !strstr(out, ":0:0:"),
                  "%s", out);
    free(out);
    /* A file given for the schema that is JSON but no referral schema is
     * a wrong call (2), not a rules file whose every field is unknown. */
    char *not_schema[] = {ctl,      "rules",    "check",  def, "--partners",
                          partners, "--schema", partners, NULL};
    ck_assert_int_eq(khtest_run(not_schema, &out), 2);
    ck_assert_msg(strstr(out, "not a referral schema") &&
                      !strstr(out, "rules.unknown_field") &&
                      !strstr(out, "rules.projection"),
                  "%s", out);
    free(out);
    char *missing[] = {ctl,          "rules",  "check", "/nonexistent.yaml",
                       "--partners", partners, NULL};
    ck_assert_int_eq(khtest_run(missing, &out), 2);
    free(out);
    char *usage[] = {ctl, "rules", "check", NULL};
    ck_assert_int_eq(khtest_run(usage, &out), 2);
    free(out);
    /* The partners from a database that cannot be reached: a runtime
     * failure (1), as in every other command, not a usage error, and
     * said to be no finding in the file. */
    setenv("KH_DATABASE_URL", "host=/nonexistent port=1", 1);
    char *no_db[] = {ctl, "rules", "check", def, NULL};
    ck_assert_int_eq(khtest_run(no_db, &out), 1);
    ck_assert_msg(strstr(out, "not checked") && !strstr(out, ":9:"), "%s", out);
    free(out);
    /* A rules file or schema that is not there is a wrong call (2), named
     * before the database is asked: not "not checked". */
    char *no_file_no_db[] = {ctl, "rules", "check", "/nonexistent.yaml", NULL};
    ck_assert_int_eq(khtest_run(no_file_no_db, &out), 2);
    ck_assert_msg(strstr(out, "/nonexistent.yaml: cannot read the rules "
                              "file: No such") &&
                      !strstr(out, "not checked"),
                  "%s", out);
    free(out);
    char *no_schema_no_db[] = {
        ctl, "rules", "check", def, "--schema", "/nonexistent.json", NULL};
    ck_assert_int_eq(khtest_run(no_schema_no_db, &out), 2);
    ck_assert_msg(strstr(out, "/nonexistent.json: cannot read the referral "
                              "schema") &&
                      !strstr(out, "not checked"),
                  "%s", out);
    free(out);
    unsetenv("KH_DATABASE_URL");
    /* A partners file or a referral that is not there is said to be not
     * there: not "not a JSON array" and no line -1 of it. */
    char *no_partners[] = {
        ctl, "rules", "check", def, "--partners", "/nonexistent.json", NULL};
    ck_assert_int_eq(khtest_run(no_partners, &out), 2);
    ck_assert_msg(strstr(out, "/nonexistent.json: cannot open it: No such") &&
                      !strstr(out, "-1") && !strstr(out, "JSON array"),
                  "%s", out);
    free(out);
    char *no_referral[] = {ctl, "rules", "explain", def, "/nonexistent.json",
                           NULL};
    ck_assert_int_eq(khtest_run(no_referral, &out), 2);
    ck_assert_msg(strstr(out, "/nonexistent.json: cannot open it: No such") &&
                      !strstr(out, "-1"),
                  "%s", out);
    free(out);
    /* A directory is no referral, and a FIFO (that nobody writes) neither:
     * said at once, never read, never waited for. */
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/referral.fifo", dir);
    ck_assert_int_eq(mkfifo(fifo, 0600), 0);
    const char *odd[] = {dir, fifo};
    for (int i = 0; i < 2; i++) {
        char *odd_referral[] = {ctl, "rules",         "explain",
                                def, (char *) odd[i], NULL};
        ck_assert_int_eq(khtest_run(odd_referral, &out), 2);
        ck_assert_msg(strstr(out, "not a regular file"), "%s", out);
        free(out);
        char *odd_partners[] = {ctl,          "rules",         "check", def,
                                "--partners", (char *) odd[i], NULL};
        ck_assert_int_eq(khtest_run(odd_partners, &out), 2);
        ck_assert_msg(strstr(out, "not a regular file"), "%s", out);
        free(out);
    }
    unlink(fifo);
    char not_array[4096];
    snprintf(not_array, sizeof not_array, "%s/object.json", dir);
    khtest_write_file(not_array, "{\"id\": \"avim\"}");
    char *object[] = {ctl,          "rules",   "check", def,
                      "--partners", not_array, NULL};
    ck_assert_int_eq(khtest_run(object, &out), 2);
    ck_assert_msg(strstr(out, "object.json: not a JSON array of partners") &&
                      !strstr(out, ":0:"),
                  "%s", out);
    free(out);
    char *explain[] = {ctl, "rules", "explain", def, ex, NULL};
    ck_assert_int_eq(khtest_run(explain, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "rule minor: FIRED"));
    ck_assert_ptr_nonnull(strstr(out, "partner avim, priority urgent, "
                                      "escalates to zorgcoordinator"));
    /* Without the registry explain says that it assumed every optional
     * partner registered: an adult's labour exploitation goes to the
     * Arbeidsinspectie only if it is, else to the fallback. */
    ck_assert_ptr_nonnull(strstr(out, "partners not checked"));
    free(out);
    char *explain_checked[] = {ctl, "rules",      "explain", def,
                               ex,  "--partners", partners,  NULL};
    ck_assert_int_eq(khtest_run(explain_checked, &out), 0);
    ck_assert_ptr_null(strstr(out, "partners not checked"));
    free(out);
    /* A document intake refuses is no referral routing could see: no
     * explanation of it (where an age in quotes would not be a minor's),
     * but the error intake would give, code and field path, exit 2. */
    json_t *c =
        json_load_file(khtest_src("schemas/invalid/age-string.json"), 0, NULL);
    ck_assert_ptr_nonnull(c);
    char wrong[4096];
    snprintf(wrong, sizeof wrong, "%s/referral.json", dir);
    ck_assert_int_eq(json_dump_file(json_object_get(c, "referral"), wrong, 0),
                     0);
    json_decref(c);
    char *explain_wrong[] = {ctl, "rules", "explain", def, wrong, NULL};
    ck_assert_int_eq(khtest_run(explain_wrong, &out), 2);
    ck_assert_msg(strstr(out, "schema.") && strstr(out, "subject.age"), "%s",
                  out);
    ck_assert_ptr_null(strstr(out, "fallback"));
    free(out);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* rules test: the shipped cases hold for the shipped rules; an expectation
 * that does not hold is named by its path with what came instead (never a
 * referral value), exit 1; a file that is no case is named with the path
 * inside it, exit 2, and the other cases are run all the same. */
START_TEST(test_ctl_rules_test)
{
    char ctl[4096], def[4096];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    snprintf(def, sizeof def, "%s", khtest_src("schemas/rules/default.yaml"));
    char *dir = khtest_tmpdir();
    char all[4096], without[4096];
    snprintf(all, sizeof all, "%s/all.json", dir);
    khtest_write_file(all,
                      "[{\"id\":\"veilig-thuis\",\"handles_cases\":true},"
                      "{\"id\":\"zorgcoordinator\",\"handles_cases\":true},"
                      "{\"id\":\"avim\",\"handles_cases\":true},"
                      "{\"id\":\"arbeidsinspectie\",\"handles_cases\":"
                      "true}]");
    snprintf(without, sizeof without, "%s/without.json", dir);
    khtest_write_file(without,
                      "[{\"id\":\"veilig-thuis\",\"handles_cases\":true},"
                      "{\"id\":\"zorgcoordinator\",\"handles_cases\":true},"
                      "{\"id\":\"avim\",\"handles_cases\":true}]");
    glob_t cases;
    char pattern[4096];
    snprintf(pattern, sizeof pattern, "%s",
             khtest_src("schemas/rules/tests/*.json"));
    ck_assert_int_eq(glob(pattern, 0, NULL, &cases), 0);
    ck_assert_uint_ge(cases.gl_pathc, 7);
    char *argv[64] = {ctl, "rules", "test", def};
    size_t argc = 4;
    ck_assert_uint_le(cases.gl_pathc, 58);
    for (size_t i = 0; i < cases.gl_pathc; i++)
        argv[argc++] = cases.gl_pathv[i];
    char want[64];
    snprintf(want, sizeof want, "%zu cases: %zu as expected, 0 not\n",
             cases.gl_pathc, cases.gl_pathc);
    char *out = NULL;
    ck_assert_int_eq(khtest_run(argv, &out), 0);
    ck_assert_msg(strstr(out, want) && strstr(out, "partners not checked"),
                  "%s", out);
    free(out);
    argv[argc] = "--partners";
    argv[argc + 1] = all;
    ck_assert_int_eq(khtest_run(argv, &out), 0);
    ck_assert_msg(strstr(out, want) && !strstr(out, "partners not checked"),
                  "%s", out);
    free(out);
    /* Without the Arbeidsinspectie registered, labour exploitation does
     * not reach it: the cases that say it does fail. */
    argv[argc + 1] = without;
    ck_assert_int_eq(khtest_run(argv, &out), 1);
    ck_assert_msg(strstr(out, "adult-labour-agriculture-shelter.json: FAIL\n"
                              "  expect.targets.arbeidsinspectie: gets "
                              "nothing\n") &&
                      strstr(out, "minor-sexual-acute.json: ok\n"),
                  "%s", out);
    free(out);
    globfree(&cases);

    /* An adult in labour exploitation with no other need goes to the
     * fallback when the Arbeidsinspectie is not registered. */
    json_t *referral = json_load_file(
        khtest_src("schemas/examples/adult-labour-agriculture-shelter.json"), 0,
        NULL);
    ck_assert_ptr_nonnull(referral);
    json_object_set_new(referral, "needs", json_array());
    json_t *doc = json_pack("{s:O, s:{s:[s], s:s, s:{s:{s:s}}}}", "referral",
                            referral, "expect", "rules", "labour-exploitation",
                            "fallback", "no_registered_target", "targets",
                            "zorgcoordinator", "priority", "normal");
    ck_assert_ptr_nonnull(doc);
    char labour[4096];
    snprintf(labour, sizeof labour, "%s/labour.json", dir);
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    char *registry[] = {ctl,    "rules",      "test",  def,
                        labour, "--partners", without, NULL};
    ck_assert_int_eq(khtest_run(registry, &out), 0);
    ck_assert_msg(strstr(out, "labour.json: ok\n"), "%s", out);
    free(out);

    /* A case that names its own registry is routed with it, whatever
     * --partners says: the same case with the Arbeidsinspectie in it
     * reaches the Arbeidsinspectie and not the fallback. */
    json_object_set_new(doc, "partners",
                        json_pack("[s, s]", "zorgcoordinator", "avim"));
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    char *no_registry[] = {ctl, "rules", "test", def, labour, NULL};
    ck_assert_int_eq(khtest_run(no_registry, &out), 0);
    ck_assert_msg(strstr(out, "labour.json: ok\n"), "%s", out);
    free(out);
    json_array_append_new(json_object_get(doc, "partners"),
                          json_string("arbeidsinspectie"));
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    ck_assert_int_eq(khtest_run(registry, &out), 1);
    ck_assert_msg(strstr(out, "  expect.fallback: want no_registered_target, "
                              "got none\n") &&
                      strstr(out, "  expect.targets: arbeidsinspectie gets it "
                                  "too (priority normal)\n"),
                  "%s", out);
    free(out);
    json_object_del(doc, "partners");

    /* Every expectation wrong at once: each said, none of the values. */
    json_object_set_new(json_object_get(doc, "expect"), "fallback",
                        json_false());
    json_object_set_new(json_object_get(doc, "expect"), "targets",
                        json_pack("{s:{s:s, s:[s], s:s}, s:{}}",
                                  "zorgcoordinator", "priority", "urgent",
                                  "fields", "suspects", "escalate_to", "avim",
                                  "avim"));
    json_object_set_new(json_object_get(doc, "expect"), "rules",
                        json_pack("[s]", "minor"));
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    ck_assert_int_eq(khtest_run(registry, &out), 1);
    static const char *const said[] = {
        "labour.json: FAIL\n",
        "  expect.rules: want minor, got labour-exploitation\n",
        "  expect.fallback: want none, got no_registered_target\n",
        "  expect.targets.zorgcoordinator.priority: want urgent, got normal\n",
        "  expect.targets.zorgcoordinator.fields: not sent: suspects; sent "
        "besides: submitted_by, subject,",
        "  expect.targets.zorgcoordinator.escalate_to: want avim, got none\n",
        "  expect.targets.avim: gets nothing\n",
        "1 case: 0 as expected, 1 not\n"};
    for (size_t i = 0; i < sizeof said / sizeof *said; i++)
        ck_assert_msg(strstr(out, said[i]), "no '%s' in: %s", said[i], out);
    ck_assert_msg(!strstr(out, "SWT-7781-B") && !strstr(out, "Fictief"), "%s",
                  out);
    free(out);
    /* The right rules in another order: said to be the order. */
    json_t *two = json_load_file(labour, 0, NULL);
    ck_assert_ptr_nonnull(two);
    json_object_set_new(json_object_get(two, "referral"), "needs",
                        json_pack("[s]", "shelter"));
    json_object_set_new(
        json_object_get(two, "expect"), "rules",
        json_pack("[s, s]", "labour-exploitation", "care-or-shelter-needs"));
    ck_assert_int_eq(json_dump_file(two, labour, 0), 0);
    json_decref(two);
    ck_assert_int_eq(khtest_run(registry, &out), 1);
    ck_assert_msg(strstr(out, "  expect.rules: want labour-exploitation, "
                              "care-or-shelter-needs, got "
                              "care-or-shelter-needs, labour-exploitation "
                              "(the rules fire in file order)\n"),
                  "%s", out);
    free(out);
    /* A partner that gets it and is not expected to is said too. */
    json_object_set_new(json_object_get(doc, "expect"), "targets",
                        json_object());
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    ck_assert_int_eq(khtest_run(registry, &out), 1);
    ck_assert_msg(strstr(out, "  expect.targets: zorgcoordinator gets it too "
                              "(priority normal)\n"),
                  "%s", out);
    free(out);

    /* Files that are no case: each named with the place in it, exit 2,
     * and the good case beside them still run. */
    static const struct {
        const char *text;
        const char *said;
    } bad[] = {
        {"[]", ": $: a case is a JSON object (rules.test)"},
        {"{\"referral\": {}, \"expect\": {\"targets\": {}}, \"expected\": 1}",
         ": expected: unknown key"},
        {"{\"referral\": 1, \"expect\": {\"targets\": {}}}",
         ": referral: must"},
        {"{\"referral\": {}, \"expect\": {}}", ": expect.targets: must"},
        {"{\"referral\": {}, \"expect\": {\"targets\": {\"avim\": "
         "{\"priorty\": \"urgent\"}}}}",
         ": expect.targets.avim.priorty: unknown key"},
        {"{\"referral\": {}, \"expect\": {\"targets\": {\"avim\": "
         "{\"priority\": \"asap\"}}}}",
         ": expect.targets.avim.priority: must be"},
        {"{\"referral\": {}, \"expect\": {\"rules\": [\"a\", \"a\"], "
         "\"targets\": {}}}",
         ": expect.rules: must be"},
        {"{\"referral\": {}, \"expect\": {\"fallback\": true, \"targets\": "
         "{}}}",
         ": expect.fallback: must be"},
        {"{\"referral\": \"missing.json\", \"expect\": {\"targets\": {}}}",
         "missing.json: cannot open it"},
        /* What intake refuses is no referral routing could see. */
        {"{\"referral\": {\"schema_version\": \"referral.v1\"}, \"expect\": "
         "{\"targets\": {}}}",
         "intake refuses it"},
        {"{\"referral\": {}, \"expect\": {\"targets\": {\"avim\": "
         "{\"fields\": [\"\"]}}}}",
         ": expect.targets.avim.fields: must be"},
        {"{\"referral\": {}, \"expect\": {\"targets\": {\"\": {}}}}",
         ": expect.targets: a partner id is never empty"},
        {"{\"referral\": {}, \"partners\": \"avim\", \"expect\": "
         "{\"targets\": {}}}",
         ": partners: must be an array of distinct partner ids"},
        {"{\"referral\": {}, \"partners\": [\"avim\", \"avim\"], "
         "\"expect\": {\"targets\": {}}}",
         ": partners: must be"},
        {"{\"referral\": {}, \"partners\": [\"\"], \"expect\": "
         "{\"targets\": {}}}",
         ": partners: must be"},
        {"{\"referral\": \n  \"x.json\",,}", "case.json:2:12: "},
    };
    char bad_case[4096];
    snprintf(bad_case, sizeof bad_case, "%s/case.json", dir);
    char *mixed[] = {ctl,      "rules",      "test",  def, labour,
                     bad_case, "--partners", without, NULL};
    json_object_set_new(json_object_get(doc, "expect"), "targets",
                        json_pack("{s:{}}", "zorgcoordinator"));
    json_object_del(json_object_get(doc, "expect"), "rules");
    json_object_del(json_object_get(doc, "expect"), "fallback");
    ck_assert_int_eq(json_dump_file(doc, labour, 0), 0);
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        khtest_write_file(bad_case, bad[i].text);
        ck_assert_int_eq(khtest_run(mixed, &out), 2);
        ck_assert_msg(strstr(out, bad[i].said) &&
                          strstr(out, "labour.json: ok\n") &&
                          strstr(out, "2 cases: 1 as expected, 0 not, 1 no "
                                      "case"),
                      "%zu: no '%s' in: %s", i, bad[i].said, out);
        free(out);
    }
    char *no_case[] = {ctl, "rules", "test", def, NULL};
    ck_assert_int_eq(khtest_run(no_case, &out), 2);
    free(out);
    json_decref(doc);
    json_decref(referral);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

/* One partner as ketenhubctl partner list --json prints it (revoked_at
 * NULL: not revoked). */
static void s_listed_partner(FILE *f, const char *id, const char *kind,
                             bool cases, const char *revoked_at)
{
    static const char key[] = "rq:rM>}U?@Lns47E1%kR.o@n7FcmvQ&gY79b(Ix";
    char revoked[64] = "null";
    if (revoked_at)
        snprintf(revoked, sizeof revoked, "\"%s\"", revoked_at);
    fprintf(f,
            "{\"id\": \"%s\", \"display_name\": \"%s\", \"kind\": \"%s\", "
            "\"handles_cases\": %s, \"public_key\": \"%s\", "
            "\"previous_key_until\": null, "
            "\"created_at\": \"2026-01-05T09:00:00Z\", \"revoked_at\": %s, "
            "\"keys\": [{\"public_key\": \"%s\", "
            "\"added_at\": \"2026-01-05T09:00:00Z\", \"expires_at\": %s}]}",
            id, id, kind, cases ? "true" : "false", key, revoked, key, revoked);
}

/* The registry of the demo as partner list --json prints it, with
 * arbeidsinspectie revoked, and avim too when avim_revoked, into path. */
static void s_write_listed(const char *path, bool avim_revoked)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputc('[', f);
    s_listed_partner(f, "arbeidsinspectie", "inspectorate", true,
                     "2026-02-01T10:00:00Z");
    fputs(",\n ", f);
    s_listed_partner(f, "avim", "police", true,
                     avim_revoked ? "2026-02-02T10:00:00Z" : NULL);
    fputs(",\n ", f);
    s_listed_partner(f, "ketenregisseur", "chain_director", false, NULL);
    fputs(",\n ", f);
    s_listed_partner(f, "veilig-thuis", "veilig_thuis", true, NULL);
    fputs(",\n ", f);
    s_listed_partner(f, "zorgcoordinator", "zorgcoordinator", true, NULL);
    fputs("]\n", f);
    ck_assert_int_eq(fclose(f), 0);
}

/* rules explain --partners takes the registry as partner list --json
 * prints it, revoked partners and all. A revoked partner cannot receive:
 * it counts as not registered, as in rules check with the database (which
 * reads only the partners not revoked) and in routing. An optional
 * target's revoked partner is skipped; a required target's refuses the
 * file, with the errors rules check gives, as routing would refuse it at
 * a reload. */
START_TEST(test_ctl_revoked_partners)
{
    char ctl[4096], partners[4096], def[4096], ex[4096];
    snprintf(ctl, sizeof ctl, "%s/tools/ctl/ketenhubctl", KH_TEST_BINARY_DIR);
    snprintf(def, sizeof def, "%s", khtest_src("schemas/rules/default.yaml"));
    snprintf(ex, sizeof ex, "%s",
             khtest_src("schemas/examples/adult-labour-agriculture-shelter."
                        "json"));
    char *dir = khtest_tmpdir();
    snprintf(partners, sizeof partners, "%s/partners.json", dir);
    s_write_listed(partners, false);
    char *out = NULL;
    char *explain[] = {ctl, "rules",      "explain", def,
                       ex,  "--partners", partners,  NULL};
    ck_assert_int_eq(khtest_run(explain, &out), 0);
    ck_assert_msg(strstr(out, "-> arbeidsinspectie (normal), optional partner "
                              "not registered: skipped\n") &&
                      strstr(out, "rules.partner_absent: optional partner "
                                  "arbeidsinspectie is not registered") &&
                      !strstr(out, "partner arbeidsinspectie, priority") &&
                      strstr(out, "\npartner zorgcoordinator, priority") &&
                      !strstr(out, "partners not checked"),
                  "%s", out);
    free(out);
    char *check[] = {ctl, "rules", "check", def, "--partners", partners, NULL};
    ck_assert_int_eq(khtest_run(check, &out), 0);
    free(out);

    /* avim revoked: named by rules that are not optional. */
    s_write_listed(partners, true);
    char *explain_out = NULL, *check_out = NULL;
    ck_assert_int_eq(khtest_run(explain, &explain_out), 1);
    ck_assert_int_eq(khtest_run(check, &check_out), 1);
    ck_assert_msg(strstr(explain_out, "rules.unknown_partner: partner avim is "
                                      "not registered (or was revoked)") &&
                      !strstr(explain_out, "\npartner "),
                  "%s", explain_out);
    ck_assert_str_eq(explain_out, check_out);
    free(explain_out);
    free(check_out);
    khtest_rmtree(dir);
    free(dir);
}
END_TEST

static Suite *s_suite(void)
{
    Suite *s = suite_create("rules");
    TCase *tc = tcase_create("rules");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_eval_cases);
    tcase_add_test(tc, test_escalation);
    tcase_add_test(tc, test_set_partners);
    tcase_add_test(tc, test_explain_values);
    tcase_add_test(tc, test_invalid_corpus);
    tcase_add_test(tc, test_all_errors_reported);
    tcase_add_test(tc, test_dead_part_of_any_noted);
    tcase_add_test(tc, test_messages_say_what_fits);
    tcase_add_test(tc, test_messages_say_what_to_do);
    tcase_add_test(tc, test_a_field_listed_twice_is_a_note);
    tcase_add_test(tc, test_unknown_key_hides_nothing);
    tcase_add_test(tc, test_never_matches_only_when_impossible);
    tcase_add_test(tc, test_no_value_left_is_a_note);
    tcase_add_test(tc, test_a_value_no_referral_holds_is_a_note);
    tcase_add_test(tc, test_long_ins_load_without_the_note);
    tcase_add_test(tc, test_decision_version_follows_the_recipe);
    tcase_add_test(tc, test_core_schema_numbers);
    tcase_add_test(tc, test_alias_bomb_refused_fast);
    tcase_add_test(tc, test_size_depth_encoding);
    tcase_add_test(tc, test_not_a_regular_file);
    tcase_add_test(tc, test_byte_order_mark);
    tcase_add_test(tc, test_escaped_control_characters);
    tcase_add_test(tc, test_default_rules_route_examples);
    tcase_add_test(tc, test_ctl_exit_codes);
    tcase_add_test(tc, test_ctl_rules_test);
    tcase_add_test(tc, test_schema_deeper_than_a_projection_is_refused);
    tcase_add_test(tc, test_partner_repeated_in_targets);
    tcase_add_test(tc, test_keys_limit);
    tcase_add_test(tc, test_infinity_and_nan);
    tcase_add_test(tc, test_optional_escalation_absent_not_urgent);
    tcase_add_test(tc, test_ctl_revoked_partners);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return khtest_run_suite(s_suite());
}
