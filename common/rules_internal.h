/*
 * The compiled form of a rules file, shared by rules_parse.c (which builds
 * it from YAML and checks it) and rules_eval.c (which evaluates it). Not a
 * public header: callers use include/ketenhub/rules.h.
 */
#ifndef KH_RULES_INTERNAL_H_INCLUDED
#define KH_RULES_INTERNAL_H_INCLUDED

#include <regex.h>
#include <stdint.h>

#include "ketenhub/rules.h"

/* Fields of the referral schema that rules can name: at most this many,
 * so a projection is a fixed bit set. */
#define KH_RFIELDS_MAX 256
#define KH_RWORDS (KH_RFIELDS_MAX / 64)

typedef enum {
    KH_RK_OBJECT,
    KH_RK_ARRAY,
    KH_RK_STRING,
    KH_RK_BOOLEAN,
    KH_RK_INTEGER,
    KH_RK_NUMBER
} kh_rkind_t;

/* One field of the referral schema ("subject.age"). */
typedef struct {
    char *path;      /* dotted path */
    const char *key; /* last segment, inside path */
    size_t key_len;
    int parent; /* index of the enclosing object's field, -1 at the top */
    int depth;  /* 0 at the top */
    kh_rkind_t kind;
    bool nullable;
    bool always;             /* present and not null in any valid referral */
    const json_t *enums;     /* allowed values (borrowed from the schema) */
    kh_rkind_t item_kind;    /* arrays: the items' kind */
    const json_t *item_enum; /* arrays: the items' allowed values */
    bool has_min, has_max;
    double min, max; /* inclusive bounds (integers: exclusive made inclusive) */
    /* text: the schema's pattern, compiled (NULL: none), and the length
     * in code points its values have */
    regex_t *pattern;
    const char *pattern_text; /* borrowed from the schema */
    size_t min_len, max_len;  /* max_len 0: no bound */
} kh_rfield_t;

typedef enum { KH_RV_NULL, KH_RV_BOOL, KH_RV_NUM, KH_RV_STR } kh_rvkind_t;

/* A constant in a condition, already of the field's type. */
typedef struct {
    kh_rvkind_t kind;
    bool b;
    double d;
    char *s;
    size_t len;
} kh_rval_t;

typedef enum {
    KH_RC_EQ,
    KH_RC_IN,
    KH_RC_CONTAINS,
    KH_RC_LT,
    KH_RC_LE,
    KH_RC_GT,
    KH_RC_GE,
    KH_RC_PRESENT,
    KH_RC_ALL,
    KH_RC_ANY,
    KH_RC_NOT
} kh_rcop_t;

typedef enum { KH_RS_MAYBE, KH_RS_ALWAYS, KH_RS_NEVER } kh_rstate_t;

typedef struct kh_rcond_s kh_rcond_t;
struct kh_rcond_s {
    kh_rcop_t op;
    int field; /* leaves */
    kh_rval_t *vals;
    size_t nvals;
    kh_rcond_t **kids; /* all, any, not */
    size_t nkids;
    kh_rstate_t state; /* what the check found out at load */
    char *path;        /* where in the rules document */
    int line, column;
};

typedef struct {
    int partner; /* index into kh_rules_t.partner_ids */
    kh_priority_t priority;
    bool optional;
    bool active; /* false: optional and its partner is not registered */
    /* escalate_to: index into kh_rules_t.partner_ids, -1 when none (or
     * when it names an optional partner that is not registered). */
    int escalate;
    int escalate_named; /* escalate_to as the file names it, -1 when none */
    uint64_t fields[KH_RWORDS];
    uint64_t escalate_fields[KH_RWORDS]; /* what the escalation copy holds */
} kh_rtarget_t;

typedef struct {
    char *name;
    kh_rcond_t *when;
    kh_rtarget_t *targets;
    size_t ntargets;
    bool cont;
} kh_rrule_t;

struct _kh_rules_t {
    char version[65];
    char schema_version[65]; /* SHA-256 of the referral schema's bytes */
    json_t *schema;          /* kept: fields borrow its enums */
    kh_rfield_t *fields;
    size_t nfields;
    kh_rrule_t *rules;
    size_t nrules;
    kh_rtarget_t *fallback;
    size_t nfallback;
    char **partner_ids; /* every partner the file names, once */
    size_t npartners;
};

struct _kh_rules_result_t {
    const kh_rules_t *rules;
    const json_t *doc;
    uint64_t resolved[KH_RWORDS];
    const json_t **cache; /* per field, valid when its resolved bit is set */
    size_t nmatched;
    size_t *matched;
    size_t ntargets;
    kh_rtarget_t *targets; /* merged; .partner, .priority, .escalate,
                              .fields */
    int *slot;             /* per partner: index into targets or -1 */
    bool fallback;
};

/* The value of field in doc (NULL when missing or a parent is not an
 * object), without any cache. */
const json_t *kh_rules_lookup(const kh_rules_t *rules, int field,
                              const json_t *doc);

/* Release a compiled condition tree. */
void kh_rcond_free(kh_rcond_t *cond);

#endif
