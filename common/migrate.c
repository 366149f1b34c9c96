/*
 * Schema migration runner: reads the numbered SQL files of a directory,
 * checks them against kh_schema_migrations and applies the pending ones,
 * each in its own transaction with its record. See migrate.h for the
 * rules it enforces.
 */
#include "ketenhub/migrate.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "ketenhub/db.h"

/* A migration file larger than this is surely a mistake. */
#define S_FILE_MAX (16 * 1024 * 1024)

typedef struct {
    int version;
    char name[KH_MIGRATION_NAME_MAX];
    char file[KH_MIGRATION_NAME_MAX + 16];
    char path[PATH_MAX];
    char sha256[65];
    char *sql; /* the bytes that were hashed, NUL-terminated */
} s_file_t;

typedef struct {
    s_file_t *items;
    size_t count;
} s_files_t;

/* A row of kh_schema_migrations. */
typedef struct {
    int version;
    char name[KH_MIGRATION_NAME_MAX];
    char sha256[65];
    char applied_at[40];
} s_applied_t;

typedef struct {
    s_applied_t *items;
    size_t count;
} s_applied_list_t;

static const char *s_create_table_sql =
    "CREATE TABLE kh_schema_migrations ("
    " version integer PRIMARY KEY CHECK (version > 0),"
    " name text NOT NULL CHECK (name ~ '^[a-z0-9_]+$'),"
    " sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),"
    " applied_at timestamptz NOT NULL DEFAULT now());"
    "COMMENT ON TABLE kh_schema_migrations IS "
    "'Schema migrations applied to this database (migrations/NNN_name.sql), "
    "with the SHA-256 of each file as applied; written by the migration "
    "runner in the same transaction as the migration itself.'";

static const char *s_applied_at_sql = "to_char(applied_at AT TIME ZONE 'UTC', "
                                      "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')";

const char *kh_migration_state_name(kh_migration_state_t state)
{
    switch (state) {
    case KH_MIGRATION_APPLIED:
        return "applied";
    case KH_MIGRATION_PENDING:
        return "pending";
    case KH_MIGRATION_CHANGED:
        return "changed";
    case KH_MIGRATION_MISSING:
        return "missing";
    }
    return "unknown";
}

static void s_files_free(s_files_t *files)
{
    for (size_t i = 0; i < files->count; i++)
        free(files->items[i].sql);
    free(files->items);
    files->items = NULL;
    files->count = 0;
}

/* Parse "NNN_name.sql": at least three digits (at most nine), a version
 * of at least 1, and a name of [a-z0-9_]. Returns 0 or -1. */
static int s_parse_name(const char *file, int *version, char *name,
                        size_t name_size)
{
    size_t len = strlen(file);
    const char *p = file;
    long v = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        digits++;
        p++;
        if (digits > 9)
            return -1;
    }
    if (digits < 3 || v < 1 || *p != '_')
        return -1;
    p++;
    const char *name_start = p;
    const char *name_end = file + len - 4; /* before ".sql" */
    if (name_end <= name_start || (size_t) (name_end - name_start) >= name_size)
        return -1;
    for (const char *q = name_start; q < name_end; q++)
        if (!((*q >= 'a' && *q <= 'z') || (*q >= '0' && *q <= '9') ||
              *q == '_'))
            return -1;
    memcpy(name, name_start, (size_t) (name_end - name_start));
    name[name_end - name_start] = '\0';
    *version = (int) v;
    return 0;
}

static void s_hex(const unsigned char *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}

/* Read a whole migration file into f->sql and hash it. */
static int s_read_file(s_file_t *f, kh_error_t *err)
{
    FILE *fp = fopen(f->path, "rb");
    if (!fp)
        return kh_error_set(err, KH_E_IO, f->path, "cannot open migration: %s",
                            strerror(errno));
    struct stat st;
    if (fstat(fileno(fp), &st) != 0 || !S_ISREG(st.st_mode)) {
        fclose(fp);
        return kh_error_set(err, KH_E_CONFIG, f->path,
                            "migration is not a regular file");
    }
    if (st.st_size > S_FILE_MAX) {
        fclose(fp);
        return kh_error_set(err, KH_E_CONFIG, f->path,
                            "migration is larger than %d bytes", S_FILE_MAX);
    }
    size_t size = (size_t) st.st_size;
    f->sql = malloc(size + 1);
    if (!f->sql) {
        fclose(fp);
        return kh_error_set(err, KH_E_NOMEM, f->path, "out of memory");
    }
    size_t got = fread(f->sql, 1, size, fp);
    bool failed = ferror(fp) || got != size;
    fclose(fp);
    if (failed)
        return kh_error_set(err, KH_E_IO, f->path, "cannot read migration");
    f->sql[size] = '\0';
    if (memchr(f->sql, '\0', size))
        return kh_error_set(err, KH_E_CONFIG, f->path,
                            "migration contains a NUL byte");
    unsigned char digest[crypto_hash_sha256_BYTES];
    crypto_hash_sha256(digest, (const unsigned char *) f->sql, size);
    s_hex(digest, sizeof digest, f->sha256);
    return 0;
}

static int s_compare_files(const void *a, const void *b)
{
    const s_file_t *fa = a;
    const s_file_t *fb = b;
    return (fa->version > fb->version) - (fa->version < fb->version);
}

/* Read every migration of dir, sorted by version. On failure files is
 * left empty. */
static int s_scan(const char *dir, s_files_t *files, kh_error_t *err)
{
    files->items = NULL;
    files->count = 0;
    if (sodium_init() < 0)
        return kh_error_set(err, KH_E_INTERNAL, NULL,
                            "cannot initialise libsodium");
    DIR *handle = opendir(dir);
    if (!handle)
        return kh_error_set(err, KH_E_IO, dir,
                            "cannot open migrations directory: %s",
                            strerror(errno));
    size_t capacity = 0;
    int rc = 0;
    struct dirent *entry;
    while ((entry = readdir(handle)) != NULL) {
        const char *file = entry->d_name;
        size_t len = strlen(file);
        if (file[0] == '.' || len < 4 || strcmp(file + len - 4, ".sql") != 0)
            continue;
        if (files->count == capacity) {
            size_t grown = capacity ? capacity * 2 : 16;
            s_file_t *items = realloc(files->items, grown * sizeof *items);
            if (!items) {
                rc = kh_error_set(err, KH_E_NOMEM, dir, "out of memory");
                break;
            }
            files->items = items;
            capacity = grown;
        }
        s_file_t *f = &files->items[files->count++];
        memset(f, 0, sizeof *f);
        if ((size_t) snprintf(f->path, sizeof f->path, "%s/%s", dir, file) >=
            sizeof f->path) {
            rc = kh_error_set(err, KH_E_CONFIG, dir,
                              "migration path is too long");
            break;
        }
        if (s_parse_name(file, &f->version, f->name, sizeof f->name) != 0) {
            rc = kh_error_set(err, KH_E_CONFIG, f->path,
                              "migration file name must be NNN_name.sql "
                              "(digits, then [a-z0-9_])");
            break;
        }
        if (len >= sizeof f->file) {
            rc = kh_error_set(err, KH_E_CONFIG, f->path,
                              "migration file name is too long");
            break;
        }
        memcpy(f->file, file, len + 1);
        if (s_read_file(f, err) != 0) {
            rc = -1;
            break;
        }
    }
    closedir(handle);
    /* A directory without migrations is a mistyped --dir or
     * KH_MIGRATIONS_DIR, not a database that is up to date. */
    if (rc == 0 && files->count == 0)
        rc = kh_error_set(err, KH_E_CONFIG, dir,
                          "no migrations (NNN_name.sql) in this directory");
    if (rc == 0 && files->count > 1) {
        qsort(files->items, files->count, sizeof files->items[0],
              s_compare_files);
        for (size_t i = 1; i < files->count; i++)
            if (files->items[i].version == files->items[i - 1].version) {
                rc = kh_error_set(err, KH_E_CONFIG, files->items[i].path,
                                  "migration version %d is used twice",
                                  files->items[i].version);
                break;
            }
    }
    if (rc != 0)
        s_files_free(files);
    return rc;
}

/* Whether kh_schema_migrations exists: 1 yes, 0 no, -1 error. */
static int s_table_exists(PGconn *conn, kh_error_t *err)
{
    PGresult *res =
        PQexec(conn, "SELECT to_regclass('kh_schema_migrations') IS NOT NULL");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot read the migration table");
        PQclear(res);
        return -1;
    }
    int exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return exists;
}

static int s_load_applied(PGconn *conn, s_applied_list_t *list, kh_error_t *err)
{
    list->items = NULL;
    list->count = 0;
    int exists = s_table_exists(conn, err);
    if (exists <= 0)
        return exists;
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT version, name, sha256, %s FROM kh_schema_migrations "
             "ORDER BY version",
             s_applied_at_sql);
    PGresult *res = PQexec(conn, sql);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot read the migration table");
        PQclear(res);
        return -1;
    }
    int n = PQntuples(res);
    if (n > 0) {
        list->items = calloc((size_t) n, sizeof *list->items);
        if (!list->items) {
            PQclear(res);
            return kh_error_set(err, KH_E_NOMEM, NULL, "out of memory");
        }
    }
    for (int i = 0; i < n; i++) {
        s_applied_t *a = &list->items[i];
        a->version = atoi(PQgetvalue(res, i, 0));
        snprintf(a->name, sizeof a->name, "%s", PQgetvalue(res, i, 1));
        snprintf(a->sha256, sizeof a->sha256, "%s", PQgetvalue(res, i, 2));
        snprintf(a->applied_at, sizeof a->applied_at, "%s",
                 PQgetvalue(res, i, 3));
    }
    list->count = (size_t) n;
    PQclear(res);
    return 0;
}

static const s_file_t *s_find_file(const s_files_t *files, int version)
{
    for (size_t i = 0; i < files->count; i++)
        if (files->items[i].version == version)
            return &files->items[i];
    return NULL;
}

static const s_applied_t *s_find_applied(const s_applied_list_t *list,
                                         int version)
{
    for (size_t i = 0; i < list->count; i++)
        if (list->items[i].version == version)
            return &list->items[i];
    return NULL;
}

/* State of one applied row against the directory; fills path with the
 * file it concerns. */
static kh_migration_state_t s_check_applied(const char *dir,
                                            const s_files_t *files,
                                            const s_applied_t *a, char *path,
                                            size_t path_size)
{
    const s_file_t *f = s_find_file(files, a->version);
    if (!f) {
        snprintf(path, path_size, "%s/%03d_%s.sql", dir, a->version, a->name);
        return KH_MIGRATION_MISSING;
    }
    snprintf(path, path_size, "%s", f->path);
    if (strcmp(f->name, a->name) != 0 || strcmp(f->sha256, a->sha256) != 0)
        return KH_MIGRATION_CHANGED;
    return KH_MIGRATION_APPLIED;
}

/* Refuse when the applied migrations do not match the directory, or when
 * a pending file sorts before an applied one. */
static int s_verify(const char *dir, const s_files_t *files,
                    const s_applied_list_t *applied, kh_error_t *err)
{
    char path[PATH_MAX];
    int newest = 0;
    for (size_t i = 0; i < applied->count; i++) {
        const s_applied_t *a = &applied->items[i];
        kh_migration_state_t state =
            s_check_applied(dir, files, a, path, sizeof path);
        if (state == KH_MIGRATION_MISSING)
            return kh_error_set(err, KH_E_MIGRATION_CHANGED, path,
                                "applied migration %d is missing from the "
                                "directory",
                                a->version);
        if (state == KH_MIGRATION_CHANGED) {
            const s_file_t *f = s_find_file(files, a->version);
            if (f && strcmp(f->name, a->name) != 0)
                return kh_error_set(err, KH_E_MIGRATION_CHANGED, path,
                                    "applied migration %d was renamed "
                                    "(applied as %s)",
                                    a->version, a->name);
            return kh_error_set(err, KH_E_MIGRATION_CHANGED, path,
                                "applied migration %d has changed since it "
                                "was applied (sha256 differs)",
                                a->version);
        }
        if (a->version > newest)
            newest = a->version;
    }
    for (size_t i = 0; i < files->count; i++) {
        const s_file_t *f = &files->items[i];
        if (f->version < newest && !s_find_applied(applied, f->version))
            return kh_error_set(err, KH_E_CONFIG, f->path,
                                "pending migration %d is older than applied "
                                "migration %d: renumber it",
                                f->version, newest);
    }
    return 0;
}

/* Put path into err->path, truncated to fit. */
static void s_set_path(kh_error_t *err, const char *path)
{
    if (!err)
        return;
    size_t n = strlen(path);
    if (n >= sizeof err->path)
        n = sizeof err->path - 1;
    memcpy(err->path, path, n);
    err->path[n] = '\0';
}

/* Line and column (1-based) of the character at 1-based position pos of
 * sql; the server counts characters, not bytes. */
static void s_position(const char *sql, long pos, int *line, int *column)
{
    int l = 1, c = 0;
    long chars = 0;
    for (const unsigned char *p = (const unsigned char *) sql; *p; p++) {
        if ((*p & 0xC0) == 0x80) /* UTF-8 continuation byte */
            continue;
        chars++;
        if (*p == '\n' && chars < pos) {
            l++;
            c = 0;
            continue;
        }
        c++;
        if (chars >= pos)
            break;
    }
    *line = l;
    *column = c;
}

/* ---- transaction control, found before anything runs ------------------ */

static bool s_ident_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c >= '0' && c <= '9') || c == '_' || c == '$' ||
           (unsigned char) c >= 0x80;
}

/* The end of the token that starts at p and is skipped whole (a comment, a
 * string, a quoted name, a dollar-quoted body), with the lines it spans
 * added to *line; p itself when none starts there. An unterminated one
 * ends with the text (the server then says what is wrong). */
static const char *s_skip_quoted(const char *p, const char *start, int *line)
{
    const char *q = p;
    if (p[0] == '-' && p[1] == '-') {
        while (*q && *q != '\n')
            q++;
        return q;
    }
    if (p[0] == '/' && p[1] == '*') {
        int depth = 0; /* comments nest */
        while (*q) {
            if (q[0] == '/' && q[1] == '*') {
                depth++;
                q += 2;
            } else if (q[0] == '*' && q[1] == '/') {
                q += 2;
                if (--depth == 0)
                    break;
            } else
                *line += *q++ == '\n';
        }
        return q;
    }
    if (*p == '\'' || *p == '"') {
        /* E'...' takes backslash escapes */
        bool escapes = *p == '\'' && p > start &&
                       (p[-1] == 'E' || p[-1] == 'e') &&
                       (p - 1 == start || !s_ident_char(p[-2]));
        char quote = *q++;
        while (*q) {
            if (escapes && *q == '\\' && q[1]) {
                *line += q[1] == '\n';
                q += 2;
            } else if (*q == quote && q[1] == quote)
                q += 2;
            else if (*q == quote)
                return q + 1;
            else
                *line += *q++ == '\n';
        }
        return q;
    }
    if (*p == '$' && (p == start || !s_ident_char(p[-1]))) {
        /* $tag$ ... $tag$, the tag empty or a name (not $1) */
        const char *t = p + 1;
        if (*t >= '0' && *t <= '9')
            return p;
        while (s_ident_char(*t) && *t != '$')
            t++;
        if (*t != '$')
            return p;
        size_t taglen = (size_t) (t - p) + 1;
        for (q = t + 1; *q; q++) {
            if (*q == '$' && strncmp(q, p, taglen) == 0)
                return q + taglen;
            *line += *q == '\n';
        }
        return q;
    }
    return p;
}

/* Whether the word at w (len characters) is kw, in any case. */
static bool s_word_is(const char *w, size_t len, const char *kw)
{
    return len == strlen(kw) && strncasecmp(w, kw, len) == 0;
}

/* The first statement of sql that starts or ends a transaction at the top
 * level (BEGIN, START TRANSACTION, COMMIT, END, ROLLBACK but ROLLBACK TO,
 * ABORT, PREPARE TRANSACTION): its line, and its first word into word;
 * 0 when there is none. A migration runs in a transaction of its own with
 * its record, and one of these would commit a part of it, or run the rest
 * outside it: found before anything runs, not after. Comments, strings,
 * quoted names and dollar-quoted bodies (a DO block's, a function's) are
 * skipped, and a function body of BEGIN ATOMIC ... END is one statement. */
static int s_transaction_control(const char *sql, char *word, size_t size)
{
    int line = 1, stmt_line = 1;
    int atomic = 0;                         /* BEGIN ATOMIC bodies open */
    size_t nwords = 0;                      /* words of the statement so far */
    const char *first = NULL, *prev = NULL; /* its first and last word */
    size_t first_len = 0, prev_len = 0;
    for (const char *p = sql; *p;) {
        const char *q = s_skip_quoted(p, sql, &line);
        if (q != p) {
            p = q;
            continue;
        }
        if (*p == '\n') {
            line++;
            p++;
        } else if (*p == ';') {
            if (atomic == 0 && nwords == 1 &&
                s_word_is(first, first_len, "ROLLBACK"))
                break; /* ROLLBACK alone */
            nwords = 0;
            p++;
        } else if (s_ident_char(*p) && *p != '$') {
            const char *w = p;
            while (s_ident_char(*p) && *p != '$')
                p++;
            size_t len = (size_t) (p - w);
            if (nwords == 0) {
                first = w;
                first_len = len;
                stmt_line = line;
                if (atomic > 0 && s_word_is(w, len, "END"))
                    atomic--; /* the body's end, not a transaction's */
                else if (atomic == 0 && (s_word_is(w, len, "BEGIN") ||
                                         s_word_is(w, len, "START") ||
                                         s_word_is(w, len, "COMMIT") ||
                                         s_word_is(w, len, "END") ||
                                         s_word_is(w, len, "ABORT"))) {
                    snprintf(word, size, "%.*s", (int) len, w);
                    return stmt_line;
                }
            } else if (atomic == 0 && nwords == 1 &&
                       ((s_word_is(first, first_len, "ROLLBACK") &&
                         !s_word_is(w, len, "TO")) ||
                        (s_word_is(first, first_len, "PREPARE") &&
                         s_word_is(w, len, "TRANSACTION")))) {
                snprintf(word, size, "%.*s", (int) first_len, first);
                return stmt_line;
            } else if (s_word_is(prev, prev_len, "BEGIN") &&
                       s_word_is(w, len, "ATOMIC"))
                atomic++;
            else if (atomic > 0 && s_word_is(prev, prev_len, "ATOMIC") &&
                     s_word_is(w, len, "END"))
                atomic--; /* an empty body: BEGIN ATOMIC END */
            prev = w;
            prev_len = len;
            nwords++;
        } else
            p++;
    }
    /* ROLLBACK alone, ended by ";" or the text */
    if (atomic == 0 && nwords == 1 && s_word_is(first, first_len, "ROLLBACK")) {
        snprintf(word, size, "%.*s", (int) first_len, first);
        return stmt_line;
    }
    return 0;
}

static int s_lock(PGconn *conn, bool lock, kh_error_t *err)
{
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT pg_advisory_%s(%lld)",
             lock ? "lock" : "unlock", (long long) KH_MIGRATE_LOCK_KEY);
    return kh_db_exec(conn, sql, err);
}

/* Apply one file in its own transaction together with its record. */
static int s_apply_one(PGconn *conn, const s_file_t *f,
                       kh_migrate_report_fn *fn, void *arg, kh_error_t *err)
{
    if (kh_db_exec(conn, "BEGIN", err) != 0)
        return -1;
    PGresult *res = PQexec(conn, f->sql);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK &&
        st != PGRES_EMPTY_QUERY) {
        char context[KH_MIGRATION_NAME_MAX + 48];
        snprintf(context, sizeof context, "migration %s failed", f->file);
        kh_db_error(err, conn, res, context);
        const char *pos =
            res ? PQresultErrorField(res, PG_DIAG_STATEMENT_POSITION) : NULL;
        s_set_path(err, f->path);
        if (err && pos)
            s_position(f->sql, atol(pos), &err->line, &err->column);
        PQclear(res);
        kh_db_rollback_quietly(conn);
        return -1;
    }
    PQclear(res);
    if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
        kh_db_rollback_quietly(conn);
        return kh_error_set(err, KH_E_CONFIG, f->path,
                            "migration must not contain transaction control "
                            "(BEGIN, COMMIT, ROLLBACK)");
    }

    char version[16];
    snprintf(version, sizeof version, "%d", f->version);
    const char *params[] = {version, f->name, f->sha256};
    char sql[256];
    snprintf(sql, sizeof sql,
             "INSERT INTO kh_schema_migrations (version, name, sha256) "
             "VALUES ($1, $2, $3) RETURNING %s",
             s_applied_at_sql);
    res = PQexecParams(conn, sql, 3, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        kh_db_error(err, conn, res, "cannot record migration");
        s_set_path(err, f->path);
        PQclear(res);
        kh_db_rollback_quietly(conn);
        return -1;
    }
    kh_migration_t m = {.version = f->version, .state = KH_MIGRATION_APPLIED};
    snprintf(m.name, sizeof m.name, "%s", f->name);
    snprintf(m.file, sizeof m.file, "%s", f->file);
    snprintf(m.sha256, sizeof m.sha256, "%s", f->sha256);
    snprintf(m.applied_at, sizeof m.applied_at, "%s", PQgetvalue(res, 0, 0));
    PQclear(res);

    if (kh_db_exec(conn, "COMMIT", err) != 0) {
        s_set_path(err, f->path);
        kh_db_rollback_quietly(conn);
        return -1;
    }
    if (fn)
        fn(&m, arg);
    return 0;
}

/* The part of kh_migrate_apply that runs under the advisory lock. */
static int s_apply_locked(PGconn *conn, const char *dir, const s_files_t *files,
                          kh_migrate_report_fn *fn, void *arg, kh_error_t *err)
{
    int exists = s_table_exists(conn, err);
    if (exists < 0)
        return -1;
    if (!exists && kh_db_exec(conn, s_create_table_sql, err) != 0)
        return -1;

    s_applied_list_t applied;
    if (s_load_applied(conn, &applied, err) != 0)
        return -1;
    int rc = s_verify(dir, files, &applied, err);
    /* Every pending file is checked before the first one runs. */
    for (size_t i = 0; rc == 0 && i < files->count; i++) {
        const s_file_t *f = &files->items[i];
        char word[16];
        int line = s_find_applied(&applied, f->version)
                       ? 0
                       : s_transaction_control(f->sql, word, sizeof word);
        if (line > 0)
            rc = kh_error_set_at(err, KH_E_CONFIG, f->path, line, 1,
                                 "%s: a migration must not contain "
                                 "transaction control (BEGIN, COMMIT, "
                                 "ROLLBACK, ...): each runs in a "
                                 "transaction of its own with its record",
                                 word);
    }
    int count = 0;
    for (size_t i = 0; rc == 0 && i < files->count; i++) {
        const s_file_t *f = &files->items[i];
        if (s_find_applied(&applied, f->version))
            continue;
        rc = s_apply_one(conn, f, fn, arg, err);
        if (rc == 0)
            count++;
    }
    free(applied.items);
    return rc == 0 ? count : -1;
}

int kh_migrate_apply(PGconn *conn, const char *dir, kh_migrate_report_fn *fn,
                     void *arg, kh_error_t *err)
{
    if (!conn || !dir)
        return kh_error_set(err, KH_E_INTERNAL, NULL,
                            "no connection or directory");
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        return kh_error_set(err, KH_E_INTERNAL, NULL,
                            "migrations need a connection outside any "
                            "transaction");
    s_files_t files;
    if (s_scan(dir, &files, err) != 0)
        return -1;
    if (s_lock(conn, true, err) != 0) {
        s_files_free(&files);
        return -1;
    }
    int rc = s_apply_locked(conn, dir, &files, fn, arg, err);
    /* A lost connection releases the lock by itself; otherwise release it
     * now, keeping the first error. */
    if (PQstatus(conn) == CONNECTION_OK) {
        kh_error_t unlock_err;
        if (s_lock(conn, false, &unlock_err) != 0 && rc >= 0) {
            if (err)
                *err = unlock_err;
            rc = -1;
        }
    }
    s_files_free(&files);
    return rc;
}

int kh_migrate_status(PGconn *conn, const char *dir, kh_migrate_report_fn *fn,
                      void *arg, kh_error_t *err)
{
    if (!conn || !dir)
        return kh_error_set(err, KH_E_INTERNAL, NULL,
                            "no connection or directory");
    s_files_t files;
    if (s_scan(dir, &files, err) != 0)
        return -1;
    s_applied_list_t applied;
    if (s_load_applied(conn, &applied, err) != 0) {
        s_files_free(&files);
        return -1;
    }

    /* Merge the two version-sorted lists. */
    int pending = 0;
    bool bad = false;
    char path[PATH_MAX];
    size_t i = 0, j = 0;
    while (i < files.count || j < applied.count) {
        const s_file_t *f = i < files.count ? &files.items[i] : NULL;
        const s_applied_t *a = j < applied.count ? &applied.items[j] : NULL;
        kh_migration_t m;
        memset(&m, 0, sizeof m);
        if (a && (!f || a->version <= f->version)) {
            m.version = a->version;
            m.state = s_check_applied(dir, &files, a, path, sizeof path);
            snprintf(m.name, sizeof m.name, "%s", a->name);
            snprintf(m.applied_at, sizeof m.applied_at, "%s", a->applied_at);
            if (f && f->version == a->version) {
                snprintf(m.file, sizeof m.file, "%s", f->file);
                snprintf(m.sha256, sizeof m.sha256, "%s", f->sha256);
                i++;
            } else
                snprintf(m.file, sizeof m.file, "%03d_%s.sql", a->version,
                         a->name);
            j++;
            if (m.state != KH_MIGRATION_APPLIED && !bad) {
                bad = true;
                kh_error_set(err, KH_E_MIGRATION_CHANGED, path,
                             "applied migration %d is %s", m.version,
                             kh_migration_state_name(m.state));
            }
        } else {
            m.version = f->version;
            m.state = KH_MIGRATION_PENDING;
            snprintf(m.name, sizeof m.name, "%s", f->name);
            snprintf(m.file, sizeof m.file, "%s", f->file);
            snprintf(m.sha256, sizeof m.sha256, "%s", f->sha256);
            pending++;
            i++;
        }
        if (fn)
            fn(&m, arg);
    }
    free(applied.items);
    s_files_free(&files);
    return bad ? -1 : pending;
}
