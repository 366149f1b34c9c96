/*
 * Evaluating compiled rules on a referral: the condition trees, the merge
 * of targets (union of fields, highest priority), the fallback, applying a
 * projection, and the administrator's explanation of an evaluation. An
 * evaluation reads the referral and writes only the caller's result.
 */
#include <stdlib.h>
#include <string.h>

#include "rules_internal.h"

const json_t *kh_rules_lookup(const kh_rules_t *rules, int field,
                              const json_t *doc)
{
    const kh_rfield_t *f = &rules->fields[field];
    const json_t *parent =
        f->parent < 0 ? doc : kh_rules_lookup(rules, f->parent, doc);
    if (!json_is_object(parent))
        return NULL;
    return json_object_getn(parent, f->key, f->key_len);
}

/* The value of field in the result's referral, looked up once per
 * evaluation. */
static const json_t *s_resolve(kh_rules_result_t *r, int field)
{
    uint64_t bit = UINT64_C(1) << (field % 64);
    if (r->resolved[field / 64] & bit)
        return r->cache[field];
    const kh_rfield_t *f = &r->rules->fields[field];
    const json_t *parent = f->parent < 0 ? r->doc : s_resolve(r, f->parent);
    const json_t *v = json_is_object(parent)
                          ? json_object_getn(parent, f->key, f->key_len)
                          : NULL;
    r->cache[field] = v;
    r->resolved[field / 64] |= bit;
    return v;
}

static bool s_equal(const json_t *v, const kh_rval_t *c)
{
    switch (c->kind) {
    case KH_RV_NULL:
        return json_is_null(v);
    case KH_RV_BOOL:
        return json_is_boolean(v) && json_is_true(v) == c->b;
    case KH_RV_NUM:
        return json_is_number(v) && json_number_value(v) == c->d;
    case KH_RV_STR:
        return json_is_string(v) && json_string_length(v) == c->len &&
               memcmp(json_string_value(v), c->s, c->len) == 0;
    }
    return false;
}

static bool s_leaf_holds(const kh_rcond_t *c, const json_t *v)
{
    switch (c->op) {
    case KH_RC_PRESENT:
        return (v && !json_is_null(v)) == c->vals[0].b;
    case KH_RC_EQ:
        return v && s_equal(v, &c->vals[0]);
    case KH_RC_IN:
        for (size_t i = 0; v && i < c->nvals; i++)
            if (s_equal(v, &c->vals[i]))
                return true;
        return false;
    case KH_RC_CONTAINS: {
        size_t i;
        const json_t *item;
        if (!json_is_array(v))
            return false;
        json_array_foreach(v, i, item)
        {
            if (s_equal(item, &c->vals[0]))
                return true;
        }
        return false;
    }
    default:
        break;
    }
    if (!json_is_number(v))
        return false;
    double x = json_number_value(v), k = c->vals[0].d;
    switch (c->op) {
    case KH_RC_LT:
        return x < k;
    case KH_RC_LE:
        return x <= k;
    case KH_RC_GT:
        return x > k;
    case KH_RC_GE:
        return x >= k;
    default:
        return false;
    }
}

static bool s_holds(kh_rules_result_t *r, const kh_rcond_t *c)
{
    switch (c->op) {
    case KH_RC_ALL:
        for (size_t i = 0; i < c->nkids; i++)
            if (!s_holds(r, c->kids[i]))
                return false;
        return true;
    case KH_RC_ANY:
        for (size_t i = 0; i < c->nkids; i++)
            if (s_holds(r, c->kids[i]))
                return true;
        return false;
    case KH_RC_NOT:
        return !s_holds(r, c->kids[0]);
    default:
        return s_leaf_holds(c, s_resolve(r, c->field));
    }
}

kh_rules_result_t *kh_rules_result_new(const kh_rules_t *rules)
{
    kh_rules_result_t *self = calloc(1, sizeof *self);
    if (!self)
        return NULL;
    self->rules = rules;
    self->cache =
        calloc(rules->nfields ? rules->nfields : 1, sizeof *self->cache);
    self->matched =
        calloc(rules->nrules ? rules->nrules : 1, sizeof *self->matched);
    self->targets =
        calloc(rules->npartners ? rules->npartners : 1, sizeof *self->targets);
    self->slot =
        calloc(rules->npartners ? rules->npartners : 1, sizeof *self->slot);
    if (!self->cache || !self->matched || !self->targets || !self->slot)
        kh_rules_result_destroy(&self);
    return self;
}

void kh_rules_result_destroy(kh_rules_result_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    kh_rules_result_t *self = *self_p;
    free(self->cache);
    free(self->matched);
    free(self->targets);
    free(self->slot);
    free(self);
    *self_p = NULL;
}

/* Merge count targets into r. A partner named again gets the union of the
 * fields and the highest priority; its escalation partner is the one of
 * its highest-priority targets, the first in file order that names one. */
static void s_merge(kh_rules_result_t *r, const kh_rtarget_t *targets,
                    size_t count)
{
    for (size_t i = 0; i < count; i++) {
        const kh_rtarget_t *t = &targets[i];
        if (!t->active)
            continue;
        int slot = r->slot[t->partner];
        if (slot < 0) {
            slot = (int) r->ntargets++;
            r->slot[t->partner] = slot;
            r->targets[slot] = *t;
            continue;
        }
        kh_rtarget_t *m = &r->targets[slot];
        for (int w = 0; w < KH_RWORDS; w++)
            m->fields[w] |= t->fields[w];
        if (t->priority > m->priority ||
            (t->priority == m->priority && m->escalate < 0)) {
            m->escalate = t->escalate;
            memcpy(m->escalate_fields, t->escalate_fields,
                   sizeof m->escalate_fields);
        }
        if (t->priority > m->priority)
            m->priority = t->priority;
    }
}

void kh_rules_eval(const kh_rules_t *self, const json_t *referral,
                   kh_rules_result_t *r)
{
    r->doc = referral;
    memset(r->resolved, 0, sizeof r->resolved);
    for (size_t i = 0; i < self->npartners; i++)
        r->slot[i] = -1;
    r->nmatched = 0;
    r->ntargets = 0;
    r->fallback = false;
    for (size_t i = 0; i < self->nrules; i++) {
        const kh_rrule_t *rule = &self->rules[i];
        if (!s_holds(r, rule->when))
            continue;
        r->matched[r->nmatched++] = i;
        s_merge(r, rule->targets, rule->ntargets);
        if (!rule->cont)
            break;
    }
    if (r->ntargets == 0) {
        r->fallback = true;
        s_merge(r, self->fallback, self->nfallback);
    }
}

bool kh_rules_result_fallback(const kh_rules_result_t *self)
{
    return self->fallback;
}

const char *kh_rules_result_fallback_reason(const kh_rules_result_t *self)
{
    if (!self->fallback)
        return NULL;
    return self->nmatched ? "no_registered_target" : "no_rule_matched";
}

size_t kh_rules_result_matched_count(const kh_rules_result_t *self)
{
    return self->nmatched;
}

const char *kh_rules_result_matched(const kh_rules_result_t *self, size_t index)
{
    if (index >= self->nmatched)
        return NULL;
    return self->rules->rules[self->matched[index]].name;
}

size_t kh_rules_result_target_count(const kh_rules_result_t *self)
{
    return self->ntargets;
}

const char *kh_rules_result_partner(const kh_rules_result_t *self, size_t index)
{
    if (index >= self->ntargets)
        return NULL;
    return self->rules->partner_ids[self->targets[index].partner];
}

kh_priority_t kh_rules_result_priority(const kh_rules_result_t *self,
                                       size_t index)
{
    return index < self->ntargets ? self->targets[index].priority
                                  : KH_PRIORITY_NORMAL;
}

const char *kh_rules_result_escalate_to(const kh_rules_result_t *self,
                                        size_t index)
{
    if (index >= self->ntargets || self->targets[index].escalate < 0 ||
        self->targets[index].priority != KH_PRIORITY_URGENT)
        return NULL;
    return self->rules->partner_ids[self->targets[index].escalate];
}

int kh_rules_result_find(const kh_rules_result_t *self, const char *partner)
{
    for (size_t i = 0; i < self->ntargets; i++)
        if (strcmp(self->rules->partner_ids[self->targets[i].partner],
                   partner) == 0)
            return (int) i;
    return -1;
}

static bool s_bit(const uint64_t *bits, int field)
{
    return (bits[field / 64] >> (field % 64)) & 1;
}

/* Whether field or one of its parents is in bits. */
static bool s_covered(const kh_rules_t *rules, const uint64_t *bits, int field)
{
    for (int f = field; f >= 0; f = rules->fields[f].parent)
        if (s_bit(bits, f))
            return true;
    return false;
}

/* A new object holding the fields of referral that bits select. */
static json_t *s_project(const kh_rules_t *rules, const uint64_t *bits,
                         const json_t *referral)
{
    json_t *out = json_object();
    if (!out)
        return NULL;
    for (size_t i = 0; i < rules->nfields; i++) {
        const kh_rfield_t *f = &rules->fields[i];
        if (!s_bit(bits, (int) i) ||
            (f->parent >= 0 && s_covered(rules, bits, f->parent)))
            continue;
        const json_t *v = kh_rules_lookup(rules, (int) i, referral);
        if (!v)
            continue;
        /* Create the enclosing objects, outermost first. */
        int chain[KH_RULES_DEPTH_MAX];
        int depth = 0;
        for (int p = f->parent; p >= 0 && depth < KH_RULES_DEPTH_MAX;
             p = rules->fields[p].parent)
            chain[depth++] = p;
        json_t *cur = out;
        for (int d = depth - 1; d >= 0; d--) {
            const kh_rfield_t *pf = &rules->fields[chain[d]];
            json_t *next = json_object_getn(cur, pf->key, pf->key_len);
            if (!next) {
                next = json_object();
                if (!next ||
                    json_object_setn_new(cur, pf->key, pf->key_len, next)) {
                    json_decref(out);
                    return NULL;
                }
            }
            cur = next;
        }
        /* Shared, not copied: a selected field's parents are never
         * selected too (s_covered), so nothing is ever added inside a
         * shared value. */
        if (json_object_setn(cur, f->key, f->key_len, (json_t *) v)) {
            json_decref(out);
            return NULL;
        }
    }
    return out;
}

json_t *kh_rules_result_project(const kh_rules_result_t *self, size_t index,
                                const json_t *referral)
{
    if (index >= self->ntargets)
        return NULL;
    return s_project(self->rules, self->targets[index].fields, referral);
}

json_t *kh_rules_result_project_escalation(const kh_rules_result_t *self,
                                           size_t index, const json_t *referral)
{
    if (!kh_rules_result_escalate_to(self, index))
        return NULL;
    return s_project(self->rules, self->targets[index].escalate_fields,
                     referral);
}

/* Print the paths that bits select, one a line, a field whose parent is
 * selected left out (its parent carries it). */
static void s_print_fields(const kh_rules_t *rules, const uint64_t *bits,
                           FILE *out)
{
    for (size_t i = 0; i < rules->nfields; i++) {
        const kh_rfield_t *f = &rules->fields[i];
        if (s_bit(bits, (int) i) &&
            !(f->parent >= 0 && s_covered(rules, bits, f->parent)))
            fprintf(out, "%s\n", f->path);
    }
}

void kh_rules_result_fields(const kh_rules_result_t *self, size_t index,
                            FILE *out)
{
    if (index >= self->ntargets)
        return;
    s_print_fields(self->rules, self->targets[index].fields, out);
}

/* ---- explain --------------------------------------------------------------
 */

static const char *const s_opnames[] = {"equals", "in",  "contains", "lt",
                                        "le",     "gt",  "ge",       "present",
                                        "all",    "any", "not"};

static void s_print_val(FILE *out, const kh_rval_t *v)
{
    switch (v->kind) {
    case KH_RV_NULL:
        fprintf(out, "null");
        break;
    case KH_RV_BOOL:
        fprintf(out, "%s", v->b ? "true" : "false");
        break;
    case KH_RV_NUM:
        /* Every digit the rules file can hold ("%g" wrote 1e+06). */
        fprintf(out, "%.15g", v->d);
        break;
    case KH_RV_STR: {
        /* As JSON, like the referral's value beside it: a quote or a
         * backslash in the text does not end it. */
        json_t *str = json_stringn(v->s, v->len);
        char *text = str ? json_dumps(str, JSON_ENCODE_ANY) : NULL;
        fprintf(out, "%s", text ? text : "?");
        free(text);
        json_decref(str);
        break;
    }
    }
}

static void s_explain_cond(kh_rules_result_t *r, const kh_rcond_t *c,
                           int indent, FILE *out)
{
    bool held = s_holds(r, c);
    fprintf(out, "%*s%s ", indent, "", held ? "[held]  " : "[failed]");
    if (c->op >= KH_RC_ALL) {
        fprintf(out, "%s\n", s_opnames[c->op]);
        for (size_t i = 0; i < c->nkids; i++)
            s_explain_cond(r, c->kids[i], indent + 4, out);
        return;
    }
    fprintf(out, "%s %s ", r->rules->fields[c->field].path, s_opnames[c->op]);
    if (c->op == KH_RC_IN) {
        fprintf(out, "[");
        for (size_t i = 0; i < c->nvals; i++) {
            fprintf(out, "%s", i ? ", " : "");
            s_print_val(out, &c->vals[i]);
        }
        fprintf(out, "]");
    } else
        s_print_val(out, &c->vals[0]);
    const json_t *v = s_resolve(r, c->field);
    char *text = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    fprintf(out, "   (referral: %s)\n", v ? (text ? text : "?") : "missing");
    free(text);
}

void kh_rules_explain(const kh_rules_t *self, const json_t *referral, FILE *out)
{
    kh_rules_result_t *r = kh_rules_result_new(self);
    if (!r) {
        fprintf(out, "out of memory\n");
        return;
    }
    kh_rules_eval(self, referral, r);
    fprintf(out, "rules version %s\n\n", self->version);
    bool stopped = false;
    size_t m = 0;
    for (size_t i = 0; i < self->nrules; i++) {
        const kh_rrule_t *rule = &self->rules[i];
        bool fired = m < r->nmatched && r->matched[m] == i;
        if (fired)
            m++;
        fprintf(out, "rule %s: %s\n", rule->name,
                stopped ? "not evaluated (an earlier rule stopped)"
                : fired ? (rule->cont ? "FIRED" : "FIRED, stops evaluation")
                        : "did not fire");
        if (!stopped)
            s_explain_cond(r, rule->when, 4, out);
        if (fired)
            for (size_t t = 0; t < rule->ntargets; t++) {
                const kh_rtarget_t *rt = &rule->targets[t];
                fprintf(out, "    -> %s (%s)", self->partner_ids[rt->partner],
                        kh_priority_name(rt->priority));
                /* Only urgent deliveries escalate (as in
                 * kh_rules_result_escalate_to): say so rather than promise
                 * a copy that routing never makes. */
                if (rt->escalate >= 0 && rt->priority == KH_PRIORITY_URGENT)
                    fprintf(out, ", escalates to %s",
                            self->partner_ids[rt->escalate]);
                else if (rt->escalate >= 0)
                    fprintf(out, ", escalate_to %s has no effect (not urgent)",
                            self->partner_ids[rt->escalate]);
                fprintf(out, "%s\n",
                        rt->active
                            ? ""
                            : ", optional partner not registered: skipped");
            }
        if (fired && !rule->cont)
            stopped = true;
    }
    /* The reason is the one that the referral.routed event records. */
    if (r->fallback)
        fprintf(out, "\nno rule named a %spartner: fallback (%s)\n",
                r->nmatched ? "registered " : "",
                kh_rules_result_fallback_reason(r));
    else
        fprintf(out, "\ntargets:\n");
    for (size_t t = 0; t < r->ntargets; t++) {
        const char *esc = kh_rules_result_escalate_to(r, t);
        fprintf(out, "\npartner %s, priority %s", kh_rules_result_partner(r, t),
                kh_priority_name(r->targets[t].priority));
        if (esc)
            fprintf(out, ", escalates to %s when not acknowledged in time",
                    esc);
        fprintf(out, ", fields:\n");
        kh_rules_result_fields(r, t, out);
        json_t *p = kh_rules_result_project(r, t, referral);
        char *text =
            p ? json_dumps(p, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        fprintf(out, "payload:\n%s\n", text ? text : "(out of memory)");
        free(text);
        json_decref(p);
        if (!esc)
            continue;
        /* The copy's own projection, as routing stores it beside the
         * delivery; a partner that has a delivery of the referral of its
         * own gets the copy beside it. */
        fprintf(out, "escalation copy for %s", esc);
        if (kh_rules_result_find(r, esc) >= 0)
            fprintf(out, " (beside its own delivery)");
        fprintf(out, ", fields:\n");
        s_print_fields(self, r->targets[t].escalate_fields, out);
        p = kh_rules_result_project_escalation(r, t, referral);
        text = p ? json_dumps(p, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        fprintf(out, "payload:\n%s\n", text ? text : "(out of memory)");
        free(text);
        json_decref(p);
    }
    kh_rules_result_destroy(&r);
}
