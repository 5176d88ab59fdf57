/* medbot.c: the whole engine in one C99 file.
 *
 * What it is: the Python stack of a QLoRA + DPO Llama-3.1 medical chatbot (transformers + PEFT +
 * bitsandbytes + TRL + DeepSpeed), as one translation unit you can read top to bottom. It loads
 * a Hugging Face Llama-3.1 checkpoint, runs it on the CPU (fp32 math, weights kept in their file
 * dtype and converted on the fly) or on an NVIDIA GPU (kernels generated through NVRTC), trains
 * LoRA adapters with DPO, and chats with the result.
 *
 * What it is deliberately not: a general deep-learning framework. There is no autograd, no
 * tensor library and no model zoo: one architecture (Llama), one op table, paired forward and
 * backward functions written by hand.
 *
 * Shape legend (every tensor in this file is annotated with these letters)
 *   B  sequences in a batch (a DPO batch holds 2 x pairs: chosen and rejected)
 *   T  tokens per sequence in this call       S  KV cache capacity (tokens)
 *   N  rows = B * T                           C  hidden size (4096 for Llama-3.1-8B)
 *   H  query heads      K  key/value heads    D  head dim (C / H unless config.json says)
 *   F  MLP size         V  vocab size         L  decoder layers      R  LoRA rank
 *
 * Conventions
 *   - Functions that can fail return MbStatus and set a one-line message (mb_fail); only the
 *     CLI prints it and exits.
 *   - Counts and byte offsets are size_t. Tensors are row-major, last index fastest.
 *   - Each op names the PyTorch / Hugging Face function it must equal.
 *   - Gradients (from the DPO issue on): parameter gradients +=, activation gradients =.
 *
 * Build: see build.sh (cc -std=c99 -O3 medbot.c -lm -lpthread). Include this file with
 * MEDBOT_NO_MAIN defined to use it as a library (the tests do).
 */
#if !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif
#if defined(__APPLE__)
#define _DARWIN_C_SOURCE
#endif

#include "medbot.h"

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define STB_DS_IMPLEMENTATION
#include <stb/stb_ds.h>

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

// ============================================================================================
// ---------- 1. platform ----------
// Error state, checked allocation, files and mmap, a thread pool, timers, JSON, RNG.
// ============================================================================================

#if defined(__GNUC__) || defined(__clang__)
#define MB_THREAD_LOCAL __thread
#define MB_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define MB_UNUSED __attribute__((unused))
#else
#define MB_UNUSED
#define MB_THREAD_LOCAL
#define MB_PRINTF(f, a)
#endif

#define MB_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MB_MAX(a, b) ((a) > (b) ? (a) : (b))

static MB_THREAD_LOCAL char mb_errbuf[1024];

const char *mb_last_error(void) { return mb_errbuf[0] ? mb_errbuf : "no error"; }

/* Sets the thread's error message and returns the status, so that `return mb_fail(...)` reads
 * as one statement. Messages are one line: "what: problem --> hint". */
static MbStatus mb_fail(MbStatus st, const char *fmt, ...) MB_PRINTF(2, 3);
static MbStatus mb_fail(MbStatus st, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(mb_errbuf, sizeof mb_errbuf, fmt, ap);
    va_end(ap);
    for (char *p = mb_errbuf; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
    return st;
}

/* Allocation that never returns NULL: out of memory is not recoverable for an engine that
 * sized its buffers up front, so it stops with the size it wanted. */
static void *mb_malloc_(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "medbot: out of memory allocating %zu bytes at %s:%d\n", n, file, line);
        exit(1);
    }
    return p;
}
static void *mb_calloc_(size_t count, size_t size, const char *file, int line) {
    if (size && count > SIZE_MAX / size) {
        fprintf(stderr, "medbot: allocation of %zu x %zu bytes overflows at %s:%d\n", count, size,
                file, line);
        exit(1);
    }
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "medbot: out of memory allocating %zu bytes at %s:%d\n", count * size,
                file, line);
        exit(1);
    }
    return p;
}
#define mb_malloc(n) mb_malloc_((n), __FILE__, __LINE__)
#define mb_calloc(c, s) mb_calloc_((c), (s), __FILE__, __LINE__)

/* 64-byte aligned allocation for activation and weight buffers (SIMD loads, cache lines). */
static void *mb_aligned_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        fprintf(stderr, "medbot: out of memory allocating %zu bytes\n", n);
        exit(1);
    }
    return p;
}

static char *mb_strdup(const char *s) {
    size_t n = strlen(s);
    char *d = mb_malloc(n + 1);
    memcpy(d, s, n + 1);
    return d;
}

/* Multiplies counts, failing on overflow (shapes come from files we do not trust). */
static int mb_mul_overflows(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

/* ---- paths and whole files ---- */

static char *mb_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = mb_malloc(a + b + 2);
    memcpy(p, dir, a);
    size_t k = a;
    if (a && dir[a - 1] != '/') p[k++] = '/';
    memcpy(p + k, name, b + 1);
    return p;
}

static char *mb_path_dirname(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return mb_strdup(".");
    size_t n = (size_t)(slash - path);
    if (n == 0) n = 1;
    char *d = mb_malloc(n + 1);
    memcpy(d, path, n);
    d[n] = 0;
    return d;
}

static int mb_is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int mb_is_file(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Reads a whole file into a NUL-terminated buffer. */
static MbStatus mb_read_file(const char *path, char **out, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return mb_fail(MB_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (cap - n < 65536) {
            cap = cap ? cap * 2 : 65536 * 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                fclose(f);
                return mb_fail(MB_ERR_OOM, "%s: out of memory reading the file", path);
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(buf);
        return mb_fail(MB_ERR_IO, "%s: read error", path);
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return MB_OK;
}

/* A file being written: data goes to "PATH.tmp.PID" and becomes PATH only on mb_wfile_commit,
 * so a failure never leaves a partial PATH behind (and never destroys the old one). */
typedef struct {
    FILE *f;
    char *path, *tmp;
    int failed;
} MbWFile;

static MbStatus mb_wfile_open(MbWFile *w, const char *path) {
    memset(w, 0, sizeof *w);
    size_t n = strlen(path) + 32;
    w->tmp = mb_malloc(n);
    snprintf(w->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    w->f = fopen(w->tmp, "wb");
    if (!w->f) {
        MbStatus st = mb_fail(MB_ERR_IO, "%s: cannot create: %s", w->tmp, strerror(errno));
        free(w->tmp);
        w->tmp = NULL;
        return st;
    }
    w->path = mb_strdup(path);
    return MB_OK;
}

static void mb_wfile_write(MbWFile *w, const void *data, size_t n) {
    if (!w->failed && n && fwrite(data, 1, n, w->f) != n) w->failed = errno ? errno : EIO;
}

static void mb_wfile_abort(MbWFile *w) {
    if (w->f) fclose(w->f);
    if (w->tmp) remove(w->tmp);
    free(w->tmp);
    free(w->path);
    memset(w, 0, sizeof *w);
}

static MbStatus mb_wfile_commit(MbWFile *w) {
    int failed = w->failed;
    if (fflush(w->f) != 0 && !failed) failed = errno ? errno : EIO;
    if (fclose(w->f) != 0 && !failed) failed = errno ? errno : EIO;
    w->f = NULL;
    if (!failed && rename(w->tmp, w->path) != 0) failed = errno ? errno : EIO;
    if (failed) {
        MbStatus st = mb_fail(MB_ERR_IO, "%s: write failed: %s", w->path, strerror(failed));
        mb_wfile_abort(w);
        return st;
    }
    free(w->tmp);
    free(w->path);
    memset(w, 0, sizeof *w);
    return MB_OK;
}

static MbStatus mb_write_file(const char *path, const void *data, size_t n) {
    MbWFile w;
    MbStatus st = mb_wfile_open(&w, path);
    if (st) return st;
    mb_wfile_write(&w, data, n);
    return mb_wfile_commit(&w);
}

/* ---- memory-mapped files (read-only) ---- */

typedef struct {
    const unsigned char *data;
    size_t size;
    int mapped; /* 1: munmap on close; 0: malloc'd copy (empty files, systems without mmap) */
} MbMap;

static MbStatus mb_map_file(const char *path, MbMap *m) {
    memset(m, 0, sizeof *m);
    int fd = open(path, O_RDONLY);
    if (fd < 0) return mb_fail(MB_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return mb_fail(MB_ERR_IO, "%s: not a regular file", path);
    }
    m->size = (size_t)sb.st_size;
    if (m->size == 0) {
        close(fd);
        m->data = mb_calloc(1, 1);
        return MB_OK;
    }
    void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return mb_fail(MB_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    m->data = p;
    m->mapped = 1;
    return MB_OK;
}

static void mb_unmap(MbMap *m) {
    if (m->mapped) munmap((void *)m->data, m->size);
    else free((void *)m->data);
    memset(m, 0, sizeof *m);
}

/* ---- time ---- */

MB_UNUSED static double mb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- thread pool ----
 * mb_pool_run(pool, fn, ctx) calls fn(ctx, tid, n) once on each of the n threads (the caller is
 * thread 0) and returns when all are done. Ops split their work by tid. */

typedef void (*MbTaskFn)(void *ctx, int tid, int nthreads);

typedef struct {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long generation;
    int pending, quit;
    MbTaskFn fn;
    void *ctx;
} MbPool;

typedef struct {
    MbPool *pool;
    int tid;
} MbPoolArg;

static void *mb_pool_worker(void *arg) {
    MbPoolArg *a = arg;
    MbPool *p = a->pool;
    int tid = a->tid;
    free(a);
    unsigned long seen = 0;
    for (;;) {
        pthread_mutex_lock(&p->mu);
        while (p->generation == seen && !p->quit) pthread_cond_wait(&p->start, &p->mu);
        if (p->quit) {
            pthread_mutex_unlock(&p->mu);
            return NULL;
        }
        seen = p->generation;
        MbTaskFn fn = p->fn;
        void *ctx = p->ctx;
        pthread_mutex_unlock(&p->mu);
        fn(ctx, tid, p->n);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

static int mb_cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)MB_MIN(n, 256) : 1;
}

static MbPool *mb_pool_new(int n) {
    MbPool *p = mb_calloc(1, sizeof *p);
    p->n = n < 1 ? 1 : n;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    p->threads = mb_calloc((size_t)p->n, sizeof *p->threads);
    for (int i = 1; i < p->n; i++) {
        MbPoolArg *a = mb_malloc(sizeof *a);
        a->pool = p;
        a->tid = i;
        if (pthread_create(&p->threads[i], NULL, mb_pool_worker, a) != 0) {
            free(a);
            p->n = i; /* run with the threads we got */
            break;
        }
    }
    return p;
}

static void mb_pool_run(MbPool *p, MbTaskFn fn, void *ctx) {
    if (p->n == 1) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->pending = p->n - 1;
    p->generation++;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

static void mb_pool_free(MbPool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->start);
    pthread_cond_destroy(&p->done);
    free(p->threads);
    free(p);
}

/* The share [lo, hi) of n items that thread tid of nt takes. */
static void mb_split(size_t n, int tid, int nt, size_t *lo, size_t *hi) {
    size_t per = n / (size_t)nt, rem = n % (size_t)nt, t = (size_t)tid;
    *lo = t * per + MB_MIN(t, rem);
    *hi = *lo + per + (t < rem ? 1 : 0);
}

/* ---- JSON ----
 * A small reader: the whole document becomes a flat array of nodes (index 0 is the root);
 * children are linked by index. Strings are decoded (escapes, surrogate pairs) into one pool,
 * each NUL-terminated. Input must be UTF-8 (checked). Depth is limited so hostile input cannot
 * overflow the stack. Used for config.json, safetensors headers, tokenizer.json and JSONL. */

typedef enum { MB_JSON_NULL, MB_JSON_BOOL, MB_JSON_NUMBER, MB_JSON_STRING, MB_JSON_ARRAY, MB_JSON_OBJECT } MbJsonKind;

typedef struct {
    MbJsonKind kind;
    int boolean;
    int is_int;        /* NUMBER written as an integer that fits int64 */
    int64_t i;         /* NUMBER: exact value when is_int */
    double num;        /* NUMBER */
    size_t str, len;   /* STRING: offset into the pool, byte length */
    size_t key, keylen;/* member of an OBJECT: key offset into the pool, byte length */
    size_t count;      /* ARRAY / OBJECT: number of children */
    size_t child;      /* first child (0: none) */
    size_t next;       /* next sibling (0: none) */
    size_t at;         /* byte offset in the source (for messages) */
} MbJson;

typedef struct {
    MbJson *nodes;     /* stb_ds array */
    char *pool;        /* stb_ds array of string bytes */
} MbJsonDoc;

#define MB_JSON_MAX_DEPTH 256

typedef struct {
    const char *name; /* file name, for messages */
    const unsigned char *s;
    size_t n, i;
    MbJsonDoc *doc;
} MbJsonParser;

static MbStatus json_error(MbJsonParser *p, const char *what) {
    /* line and column of the failure make a truncated or hand-edited file easy to fix */
    size_t line = 1, col = 1;
    for (size_t k = 0; k < p->i && k < p->n; k++) {
        if (p->s[k] == '\n') line++, col = 1;
        else col++;
    }
    return mb_fail(MB_ERR_FORMAT, "%s: invalid JSON at line %zu column %zu: %s", p->name, line, col,
                   what);
}

static void json_skip_ws(MbJsonParser *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' ||
                           p->s[p->i] == '\r'))
        p->i++;
}

/* Length of the valid UTF-8 character at s[0..n), or 0 if it is not one (overlongs and
 * surrogates are invalid). */
static size_t utf8_valid_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned cp;
    if (c >= 0xC2 && c <= 0xDF) len = 2, cp = c & 0x1F;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, cp = c & 0x0F;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, cp = c & 0x07;
    else return 0;
    if (n < len) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
    if (cp >= 0xD800 && cp <= 0xDFFF) return 0;
    return len;
}

static void utf8_put(char **pool, unsigned cp) {
    if (cp < 0x80) arrput(*pool, (char)cp);
    else if (cp < 0x800) {
        arrput(*pool, (char)(0xC0 | (cp >> 6)));
        arrput(*pool, (char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        arrput(*pool, (char)(0xE0 | (cp >> 12)));
        arrput(*pool, (char)(0x80 | ((cp >> 6) & 0x3F)));
        arrput(*pool, (char)(0x80 | (cp & 0x3F)));
    } else {
        arrput(*pool, (char)(0xF0 | (cp >> 18)));
        arrput(*pool, (char)(0x80 | ((cp >> 12) & 0x3F)));
        arrput(*pool, (char)(0x80 | ((cp >> 6) & 0x3F)));
        arrput(*pool, (char)(0x80 | (cp & 0x3F)));
    }
}

static int json_hex4(MbJsonParser *p, unsigned *out) {
    if (p->n - p->i < 4) return 0;
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned c = p->s[p->i + (size_t)k], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return 0;
        v = v * 16 + d;
    }
    p->i += 4;
    *out = v;
    return 1;
}

/* Parses a string at p->i (which holds '"') into the pool; returns its offset and length. */
static MbStatus json_string(MbJsonParser *p, size_t *off, size_t *len) {
    p->i++;
    *off = (size_t)arrlen(p->doc->pool);
    for (;;) {
        if (p->i >= p->n) return json_error(p, "unterminated string");
        unsigned char c = p->s[p->i];
        if (c == '"') {
            p->i++;
            break;
        }
        if (c < 0x20) return json_error(p, "control character in string");
        if (c == '\\') {
            if (++p->i >= p->n) return json_error(p, "unterminated escape");
            unsigned char e = p->s[p->i++];
            unsigned cp;
            switch (e) {
            case '"': arrput(p->doc->pool, '"'); break;
            case '\\': arrput(p->doc->pool, '\\'); break;
            case '/': arrput(p->doc->pool, '/'); break;
            case 'b': arrput(p->doc->pool, '\b'); break;
            case 'f': arrput(p->doc->pool, '\f'); break;
            case 'n': arrput(p->doc->pool, '\n'); break;
            case 'r': arrput(p->doc->pool, '\r'); break;
            case 't': arrput(p->doc->pool, '\t'); break;
            case 'u':
                if (!json_hex4(p, &cp)) return json_error(p, "bad \\u escape");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    unsigned lo;
                    if (p->n - p->i < 6 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u')
                        return json_error(p, "lone UTF-16 surrogate in \\u escape");
                    p->i += 2;
                    if (!json_hex4(p, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                        return json_error(p, "lone UTF-16 surrogate in \\u escape");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                    return json_error(p, "lone UTF-16 surrogate in \\u escape");
                }
                utf8_put(&p->doc->pool, cp);
                break;
            default: p->i--; return json_error(p, "unknown escape");
            }
            continue;
        }
        size_t k = utf8_valid_len(p->s + p->i, p->n - p->i);
        if (!k) return json_error(p, "invalid UTF-8 in string");
        for (size_t j = 0; j < k; j++) arrput(p->doc->pool, (char)p->s[p->i + j]);
        p->i += k;
    }
    *len = (size_t)arrlen(p->doc->pool) - *off;
    arrput(p->doc->pool, 0);
    return MB_OK;
}

static MbStatus json_number(MbJsonParser *p, MbJson *node) {
    size_t start = p->i;
    if (p->i < p->n && p->s[p->i] == '-') p->i++;
    if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return json_error(p, "bad number");
    if (p->s[p->i] == '0') p->i++;
    else
        while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
    int integral = 1;
    if (p->i < p->n && p->s[p->i] == '.') {
        integral = 0;
        p->i++;
        if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return json_error(p, "bad number");
        while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
    }
    if (p->i < p->n && (p->s[p->i] == 'e' || p->s[p->i] == 'E')) {
        integral = 0;
        p->i++;
        if (p->i < p->n && (p->s[p->i] == '+' || p->s[p->i] == '-')) p->i++;
        if (p->i >= p->n || p->s[p->i] < '0' || p->s[p->i] > '9') return json_error(p, "bad number");
        while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') p->i++;
    }
    char small[64], *buf = small;
    size_t len = p->i - start;
    if (len >= sizeof small) buf = mb_malloc(len + 1);
    memcpy(buf, p->s + start, len);
    buf[len] = 0;
    node->num = strtod(buf, NULL);
    node->is_int = 0;
    if (integral) {
        errno = 0;
        long long v = strtoll(buf, NULL, 10);
        if (errno == 0) {
            node->is_int = 1;
            node->i = (int64_t)v;
        }
    }
    if (buf != small) free(buf);
    return MB_OK;
}

static MbStatus json_value(MbJsonParser *p, size_t *out, int depth) {
    json_skip_ws(p);
    if (p->i >= p->n) return json_error(p, "unexpected end of input");
    if (depth > MB_JSON_MAX_DEPTH) return json_error(p, "nested too deeply");
    MbJson node;
    memset(&node, 0, sizeof node);
    node.at = p->i;
    size_t idx = (size_t)arrlen(p->doc->nodes);
    unsigned char c = p->s[p->i];
    MbStatus st = MB_OK;
    if (c == '{' || c == '[') {
        node.kind = c == '{' ? MB_JSON_OBJECT : MB_JSON_ARRAY;
        arrput(p->doc->nodes, node);
        p->i++;
        size_t last = 0, count = 0;
        json_skip_ws(p);
        char close = c == '{' ? '}' : ']';
        if (p->i < p->n && p->s[p->i] == (unsigned char)close) {
            p->i++;
        } else {
            for (;;) {
                size_t key = 0, keylen = 0, child;
                if (c == '{') {
                    json_skip_ws(p);
                    if (p->i >= p->n || p->s[p->i] != '"') return json_error(p, "expected a key");
                    if ((st = json_string(p, &key, &keylen))) return st;
                    json_skip_ws(p);
                    if (p->i >= p->n || p->s[p->i] != ':') return json_error(p, "expected ':'");
                    p->i++;
                }
                if ((st = json_value(p, &child, depth + 1))) return st;
                p->doc->nodes[child].key = key;
                p->doc->nodes[child].keylen = keylen;
                if (last) p->doc->nodes[last].next = child;
                else p->doc->nodes[idx].child = child;
                last = child;
                count++;
                json_skip_ws(p);
                if (p->i >= p->n) return json_error(p, "unexpected end of input");
                if (p->s[p->i] == ',') {
                    p->i++;
                    continue;
                }
                if (p->s[p->i] == (unsigned char)close) {
                    p->i++;
                    break;
                }
                return json_error(p, c == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
            }
        }
        p->doc->nodes[idx].count = count;
        *out = idx;
        return MB_OK;
    }
    if (c == '"') {
        node.kind = MB_JSON_STRING;
        if ((st = json_string(p, &node.str, &node.len))) return st;
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        node.kind = MB_JSON_NUMBER;
        if ((st = json_number(p, &node))) return st;
    } else if (p->n - p->i >= 4 && !memcmp(p->s + p->i, "true", 4)) {
        node.kind = MB_JSON_BOOL, node.boolean = 1, p->i += 4;
    } else if (p->n - p->i >= 5 && !memcmp(p->s + p->i, "false", 5)) {
        node.kind = MB_JSON_BOOL, node.boolean = 0, p->i += 5;
    } else if (p->n - p->i >= 4 && !memcmp(p->s + p->i, "null", 4)) {
        node.kind = MB_JSON_NULL, p->i += 4;
    } else {
        return json_error(p, "unexpected character");
    }
    arrput(p->doc->nodes, node);
    *out = idx;
    return MB_OK;
}

static void json_free(MbJsonDoc *doc) {
    arrfree(doc->nodes);
    arrfree(doc->pool);
    memset(doc, 0, sizeof *doc);
}

/* Parses text[0..n) as one JSON value (name is used in messages). */
static MbStatus json_parse(const char *name, const char *text, size_t n, MbJsonDoc *doc) {
    memset(doc, 0, sizeof *doc);
    MbJsonParser p = {name, (const unsigned char *)text, n, 0, doc};
    arrput(doc->pool, 0); /* offset 0: the empty string */
    size_t root;
    MbStatus st = json_value(&p, &root, 0);
    if (!st) {
        json_skip_ws(&p);
        if (p.i != p.n) st = json_error(&p, "trailing characters after the value");
    }
    if (st) json_free(doc);
    return st;
}

static const MbJson *json_root(const MbJsonDoc *doc) { return &doc->nodes[0]; }

static const MbJson *json_first(const MbJsonDoc *doc, const MbJson *v) {
    return v->child ? &doc->nodes[v->child] : NULL;
}

static const MbJson *json_next(const MbJsonDoc *doc, const MbJson *v) {
    return v->next ? &doc->nodes[v->next] : NULL;
}

static const char *json_str(const MbJsonDoc *doc, const MbJson *v) { return doc->pool + v->str; }
static const char *json_key(const MbJsonDoc *doc, const MbJson *v) { return doc->pool + v->key; }

/* Member `key` of an object, or NULL. */
static const MbJson *json_get(const MbJsonDoc *doc, const MbJson *obj, const char *key) {
    if (!obj || obj->kind != MB_JSON_OBJECT) return NULL;
    size_t kl = strlen(key);
    for (const MbJson *c = json_first(doc, obj); c; c = json_next(doc, c))
        if (c->keylen == kl && !memcmp(doc->pool + c->key, key, kl)) return c;
    return NULL;
}

/* ---- JSON writing: a growing string (stb_ds char array, always NUL-terminated) ---- */

static void sb_printf(char **sb, const char *fmt, ...) MB_PRINTF(2, 3);
static void sb_printf(char **sb, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    size_t len = arrlen(*sb) ? (size_t)arrlen(*sb) - 1 : 0; /* drop the old NUL */
    arrsetlen(*sb, len + (size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(*sb + len, (size_t)n + 1, fmt, ap);
    va_end(ap);
}

static void sb_json_string(char **sb, const char *s, size_t n) {
    sb_printf(sb, "\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"') sb_printf(sb, "\\\"");
        else if (c == '\\') sb_printf(sb, "\\\\");
        else if (c == '\n') sb_printf(sb, "\\n");
        else if (c == '\r') sb_printf(sb, "\\r");
        else if (c == '\t') sb_printf(sb, "\\t");
        else if (c < 0x20) sb_printf(sb, "\\u%04x", c);
        else sb_printf(sb, "%c", c);
    }
    sb_printf(sb, "\"");
}

/* ---- RNG: splitmix64 to seed, xoshiro256** to draw ---- */

typedef struct {
    uint64_t s[4];
    int has_spare;
    double spare;
} MbRng;

static uint64_t mb_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void mb_rng_seed(MbRng *r, uint64_t seed) {
    memset(r, 0, sizeof *r);
    for (int i = 0; i < 4; i++) r->s[i] = mb_splitmix64(&seed);
}

static uint64_t mb_rng_u64(MbRng *r) {
    uint64_t *s = r->s;
    uint64_t x = s[1] * 5, result = ((x << 7) | (x >> 57)) * 9, t = s[1] << 17;
    s[2] ^= s[0], s[3] ^= s[1], s[1] ^= s[2], s[0] ^= s[3], s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return result;
}

/* uniform in [0, 1) with 53 random bits */
static double mb_rng_uniform(MbRng *r) { return (double)(mb_rng_u64(r) >> 11) * 0x1.0p-53; }

/* standard normal (Box-Muller) */
static double mb_rng_normal(MbRng *r) {
    if (r->has_spare) {
        r->has_spare = 0;
        return r->spare;
    }
    double u, v;
    do u = mb_rng_uniform(r);
    while (u <= 0.0);
    v = mb_rng_uniform(r);
    double rad = sqrt(-2.0 * log(u));
    r->spare = rad * sin(2.0 * M_PI * v);
    r->has_spare = 1;
    return rad * cos(2.0 * M_PI * v);
}

// ============================================================================================
// ---------- 2. files ----------
// dtype conversion; safetensors read (mmap, sharded via model.safetensors.index.json) and
// write; config.json. Every field of a header is validated before it is used: files are input.
// ============================================================================================

static const struct {
    const char *name;
    size_t size;
} mb_dtypes[MB_DT_COUNT] = {
    [MB_DT_F32] = {"F32", 4},   [MB_DT_F16] = {"F16", 2},   [MB_DT_BF16] = {"BF16", 2},
    [MB_DT_F64] = {"F64", 8},   [MB_DT_I64] = {"I64", 8},   [MB_DT_I32] = {"I32", 4},
    [MB_DT_I16] = {"I16", 2},   [MB_DT_I8] = {"I8", 1},     [MB_DT_U64] = {"U64", 8},
    [MB_DT_U32] = {"U32", 4},   [MB_DT_U16] = {"U16", 2},   [MB_DT_U8] = {"U8", 1},
    [MB_DT_BOOL] = {"BOOL", 1}, [MB_DT_F8_E4M3] = {"F8_E4M3", 1}, [MB_DT_F8_E5M2] = {"F8_E5M2", 1},
};

static size_t mb_dtype_size(MbDtype t) { return mb_dtypes[t].size; }
static const char *mb_dtype_name(MbDtype t) { return mb_dtypes[t].name; }

static int mb_dtype_parse(const char *s, MbDtype *out) {
    for (int t = 0; t < MB_DT_COUNT; t++)
        if (!strcmp(s, mb_dtypes[t].name)) {
            *out = (MbDtype)t;
            return 1;
        }
    return 0;
}

/* bf16 / f16 <-> f32. The files are little-endian and so are the hosts medbot runs on (checked
 * once in mb_check_host); bytes are read with memcpy so unaligned data is fine. */
static float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, like torch's .to(torch.bfloat16); NaN stays NaN */
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: normalise */
            int e = -1;
            do man <<= 1, e++;
            while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7F800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even, overflow to inf, like torch's .to(torch.float16) */
static uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000, au = u & 0x7FFFFFFFu;
    if (au > 0x7F800000u) return (uint16_t)(sign | 0x7E00);          /* NaN */
    if (au >= 0x477FF000u) return (uint16_t)(sign | 0x7C00);          /* rounds to inf */
    if (au < 0x38800000u) {                                           /* subnormal or zero */
        float a;
        memcpy(&a, &au, 4);
        /* a * 2^24 rounded to nearest even in integer units of the smallest subnormal */
        float scaled = a * 16777216.0f;
        uint32_t m = (uint32_t)scaled;
        float frac = scaled - (float)m;
        if (frac > 0.5f || (frac == 0.5f && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t r = au + 0xFFFu + ((au >> 13) & 1u);
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* n values of a float dtype (F32, F16, BF16, F64) at src -> fp32 dst */
static void mb_convert_to_f32(MbDtype t, const void *src, float *dst, size_t n) {
    const unsigned char *s = src;
    switch (t) {
    case MB_DT_F32: memcpy(dst, s, n * 4); break;
    case MB_DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        break;
    case MB_DT_F16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = f16_to_f32(h);
        }
        break;
    case MB_DT_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, s + 8 * i, 8);
            dst[i] = (float)d;
        }
        break;
    default: memset(dst, 0, n * 4); break; /* callers pass float dtypes only */
    }
}

/* fp32 src -> n values of F32 / F16 / BF16 at dst */
static void mb_convert_from_f32(MbDtype t, const float *src, void *dst, size_t n) {
    unsigned char *d = dst;
    for (size_t i = 0; i < n; i++) {
        if (t == MB_DT_F32) memcpy(d + 4 * i, &src[i], 4);
        else {
            uint16_t h = t == MB_DT_BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
    }
}

static MbStatus mb_check_host(void) {
    uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    if (b != 1) return mb_fail(MB_ERR_UNSUPPORTED, "medbot needs a little-endian host");
    return MB_OK;
}

/* ---- safetensors ---- */

#define MB_ST_MAX_HEADER (100u * 1024u * 1024u) /* the format's own limit */

typedef struct {
    char *key;    /* tensor name (owned by the MbTensorInfo) */
    size_t value; /* index into tensors */
} MbNameIndex;

struct MbSafetensors {
    MbMap *maps;             /* stb_ds array: one per file */
    char **files;            /* stb_ds array: their paths */
    MbTensorInfo *tensors;   /* stb_ds array */
    MbNameIndex *by_name;    /* stb_ds string hash map */
};

size_t mb_safetensors_count(const MbSafetensors *st) { return (size_t)arrlen(st->tensors); }
const MbTensorInfo *mb_safetensors_at(const MbSafetensors *st, size_t i) { return &st->tensors[i]; }

const MbTensorInfo *mb_safetensors_find(const MbSafetensors *st, const char *name) {
    ptrdiff_t i = shgeti(((MbSafetensors *)st)->by_name, name);
    return i < 0 ? NULL : &st->tensors[st->by_name[i].value];
}

void mb_safetensors_close(MbSafetensors *st) {
    if (!st) return;
    for (ptrdiff_t i = 0; i < arrlen(st->maps); i++) mb_unmap(&st->maps[i]);
    for (ptrdiff_t i = 0; i < arrlen(st->files); i++) free(st->files[i]);
    for (ptrdiff_t i = 0; i < arrlen(st->tensors); i++) free((char *)st->tensors[i].name);
    arrfree(st->maps);
    arrfree(st->files);
    arrfree(st->tensors);
    shfree(st->by_name);
    free(st);
}

static int mb_cmp_offsets(const void *a, const void *b) {
    const size_t *x = a, *y = b; /* pairs (begin, end) */
    return x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : (x[1] < y[1] ? -1 : x[1] > y[1]);
}

/* Reads one non-negative integer that fits size_t from a JSON node. */
static int json_size(const MbJson *v, size_t *out) {
    if (!v || v->kind != MB_JSON_NUMBER || !v->is_int || v->i < 0) return 0;
    if ((uint64_t)v->i > (uint64_t)SIZE_MAX) return 0;
    *out = (size_t)v->i;
    return 1;
}

/* Maps one .safetensors file and appends its tensors to st, validating the header fully. */
static MbStatus st_add_file(MbSafetensors *st, const char *path) {
    MbMap m;
    MbStatus rc = mb_map_file(path, &m);
    if (rc) return rc;
    const char *hint = "--> the file is truncated or not a safetensors file; re-download it";
    size_t fsize = m.size;
    if (fsize < 8) {
        mb_unmap(&m);
        return mb_fail(MB_ERR_FORMAT, "%s: %zu bytes, too short for a safetensors header %s", path,
                       fsize, hint);
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | m.data[i];
    if (hlen > MB_ST_MAX_HEADER || hlen > fsize - 8) {
        mb_unmap(&m);
        return mb_fail(MB_ERR_FORMAT, "%s: header length %llu does not fit in a %zu-byte file %s",
                       path, (unsigned long long)hlen, fsize, hint);
    }
    const unsigned char *data = m.data + 8 + hlen;
    size_t data_len = m.size - 8 - (size_t)hlen;
    MbJsonDoc doc;
    if ((rc = json_parse(path, (const char *)m.data + 8, (size_t)hlen, &doc))) {
        mb_unmap(&m);
        return rc;
    }
    size_t first = (size_t)arrlen(st->tensors);
    size_t *ranges = NULL; /* stb_ds array of (begin, end) pairs */
    const MbJson *root = json_root(&doc);
    if (root->kind != MB_JSON_OBJECT) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: header is not a JSON object %s", path, hint);
        goto fail;
    }
    for (const MbJson *e = json_first(&doc, root); e; e = json_next(&doc, e)) {
        const char *name = json_key(&doc, e);
        if (!strcmp(name, "__metadata__")) {
            if (e->kind != MB_JSON_OBJECT) {
                rc = mb_fail(MB_ERR_FORMAT, "%s: __metadata__ is not an object", path);
                goto fail;
            }
            continue;
        }
        if (e->kind != MB_JSON_OBJECT) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' is not an object", path, name);
            goto fail;
        }
        if (e->keylen != strlen(name) || e->keylen == 0) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: a tensor has an empty name or a NUL in its name", path);
            goto fail;
        }
        MbTensorInfo t;
        memset(&t, 0, sizeof t);
        const MbJson *dt = json_get(&doc, e, "dtype"), *shape = json_get(&doc, e, "shape"),
                     *off = json_get(&doc, e, "data_offsets");
        if (!dt || dt->kind != MB_JSON_STRING || !mb_dtype_parse(json_str(&doc, dt), &t.dtype)) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has a missing or unknown dtype%s%s", path,
                         name, dt && dt->kind == MB_JSON_STRING ? " " : "",
                         dt && dt->kind == MB_JSON_STRING ? json_str(&doc, dt) : "");
            goto fail;
        }
        if (!shape || shape->kind != MB_JSON_ARRAY || shape->count > MB_MAX_DIMS) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has a missing or bad shape", path, name);
            goto fail;
        }
        t.ndim = (int)shape->count;
        t.numel = 1;
        int k = 0, bad = 0;
        for (const MbJson *d = json_first(&doc, shape); d; d = json_next(&doc, d), k++)
            if (!json_size(d, &t.shape[k]) || mb_mul_overflows(t.numel, t.shape[k], &t.numel)) bad = 1;
        if (bad) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has a bad dimension in its shape", path, name);
            goto fail;
        }
        size_t begin, end;
        if (!off || off->kind != MB_JSON_ARRAY || off->count != 2 ||
            !json_size(json_first(&doc, off), &begin) ||
            !json_size(json_next(&doc, json_first(&doc, off)), &end) || begin > end) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has missing or bad data_offsets", path, name);
            goto fail;
        }
        if (end > data_len) {
            rc = mb_fail(MB_ERR_FORMAT,
                         "%s: tensor '%s' data_offsets [%zu, %zu] point past the end of the data "
                         "(%zu bytes) %s", path, name, begin, end, data_len, hint);
            goto fail;
        }
        size_t want = 0;
        if (mb_mul_overflows(t.numel, mb_dtype_size(t.dtype), &want) || want != end - begin) {
            rc = mb_fail(MB_ERR_FORMAT,
                         "%s: tensor '%s' holds %zu bytes but its shape and dtype %s need %zu",
                         path, name, end - begin, mb_dtype_name(t.dtype), want);
            goto fail;
        }
        if (shgeti(st->by_name, name) >= 0) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' appears twice in the checkpoint", path, name);
            goto fail;
        }
        t.name = mb_strdup(name);
        t.data = data + begin;
        t.nbytes = end - begin;
        arrput(st->tensors, t);
        shput(st->by_name, (char *)t.name, (size_t)arrlen(st->tensors) - 1);
        arrput(ranges, begin);
        arrput(ranges, end);
    }
    /* no two tensors may share bytes */
    size_t nr = (size_t)arrlen(ranges) / 2;
    qsort(ranges, nr, 2 * sizeof(size_t), mb_cmp_offsets);
    for (size_t i = 1; i < nr; i++)
        if (ranges[2 * i] < ranges[2 * i - 1]) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: two tensors overlap at data offset %zu %s", path,
                         ranges[2 * i], hint);
            goto fail;
        }
    arrfree(ranges);
    json_free(&doc);
    arrput(st->maps, m);
    arrput(st->files, mb_strdup(path));
    for (size_t i = first; i < (size_t)arrlen(st->tensors); i++)
        st->tensors[i].file = st->files[arrlen(st->files) - 1];
    return MB_OK;
fail:
    for (size_t i = first; i < (size_t)arrlen(st->tensors); i++) {
        (void)shdel(st->by_name, st->tensors[i].name);
        free((char *)st->tensors[i].name);
    }
    arrsetlen(st->tensors, first);
    arrfree(ranges);
    json_free(&doc);
    mb_unmap(&m);
    return rc;
}

/* A sharded checkpoint: the index's weight_map names, for every tensor, the shard holding it. */
static MbStatus st_add_index(MbSafetensors *st, const char *index_path) {
    char *text;
    size_t n;
    MbStatus rc = mb_read_file(index_path, &text, &n);
    if (rc) return rc;
    MbJsonDoc doc;
    rc = json_parse(index_path, text, n, &doc);
    free(text);
    if (rc) return rc;
    char *dir = mb_path_dirname(index_path);
    const MbJson *wm = json_get(&doc, json_root(&doc), "weight_map");
    if (!wm || wm->kind != MB_JSON_OBJECT) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: no \"weight_map\" object", index_path);
        goto done;
    }
    /* open each shard once, in order of first mention */
    for (const MbJson *e = json_first(&doc, wm); e; e = json_next(&doc, e)) {
        if (e->kind != MB_JSON_STRING) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: weight_map entry '%s' is not a file name", index_path,
                         json_key(&doc, e));
            goto done;
        }
        const char *shard = json_str(&doc, e);
        if (!shard[0] || shard[0] == '/' || strstr(shard, "..")) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: shard name '%s' must be a file in the same folder",
                         index_path, shard);
            goto done;
        }
        char *path = mb_path_join(dir, shard);
        int seen = 0;
        for (ptrdiff_t i = 0; i < arrlen(st->files); i++)
            if (!strcmp(st->files[i], path)) seen = 1;
        if (!seen) rc = st_add_file(st, path);
        free(path);
        if (rc) goto done;
    }
    /* every tensor the index names must be in the shard it names */
    for (const MbJson *e = json_first(&doc, wm); e; e = json_next(&doc, e)) {
        const MbTensorInfo *t = mb_safetensors_find(st, json_key(&doc, e));
        char *path = mb_path_join(dir, json_str(&doc, e));
        if (!t || strcmp(t->file, path)) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' is missing from shard %s (the index says "
                         "it is there) --> the download is incomplete", index_path,
                         json_key(&doc, e), path);
            free(path);
            goto done;
        }
        free(path);
    }
done:
    free(dir);
    json_free(&doc);
    return rc;
}

MbStatus mb_safetensors_open(const char *path, MbSafetensors **out) {
    *out = NULL;
    MbStatus rc = mb_check_host();
    if (rc) return rc;
    MbSafetensors *st = mb_calloc(1, sizeof *st);
    sh_new_arena(st->by_name);
    if (mb_is_dir(path)) {
        char *index = mb_path_join(path, "model.safetensors.index.json");
        char *single = mb_path_join(path, "model.safetensors");
        if (mb_is_file(index)) rc = st_add_index(st, index);
        else if (mb_is_file(single)) rc = st_add_file(st, single);
        else rc = mb_fail(MB_ERR_IO, "%s: no model.safetensors or model.safetensors.index.json "
                          "--> is this a Hugging Face model folder with safetensors weights?", path);
        free(index);
        free(single);
    } else if (!mb_is_file(path)) {
        rc = mb_fail(MB_ERR_IO, "%s: no such file or folder", path);
    } else {
        size_t n = strlen(path);
        if (n >= 5 && !strcmp(path + n - 5, ".json")) rc = st_add_index(st, path);
        else rc = st_add_file(st, path);
    }
    if (rc) {
        mb_safetensors_close(st);
        return rc;
    }
    *out = st;
    return MB_OK;
}

MbStatus mb_safetensors_write(const char *path, const MbTensorOut *tensors, size_t n,
                              const char *const *metadata) {
    char *hdr = NULL;
    size_t offset = 0;
    sb_printf(&hdr, "{");
    int first = 1;
    if (metadata && metadata[0]) {
        sb_printf(&hdr, "\"__metadata__\":{");
        for (size_t i = 0; metadata[i] && metadata[i + 1]; i += 2) {
            if (i) sb_printf(&hdr, ",");
            sb_json_string(&hdr, metadata[i], strlen(metadata[i]));
            sb_printf(&hdr, ":");
            sb_json_string(&hdr, metadata[i + 1], strlen(metadata[i + 1]));
        }
        sb_printf(&hdr, "}");
        first = 0;
    }
    for (size_t i = 0; i < n; i++) {
        const MbTensorOut *t = &tensors[i];
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
        size_t bytes = numel * mb_dtype_size(t->dtype);
        sb_printf(&hdr, "%s", first ? "" : ",");
        first = 0;
        sb_json_string(&hdr, t->name, strlen(t->name));
        sb_printf(&hdr, ":{\"dtype\":\"%s\",\"shape\":[", mb_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) sb_printf(&hdr, "%s%zu", d ? "," : "", t->shape[d]);
        sb_printf(&hdr, "],\"data_offsets\":[%zu,%zu]}", offset, offset + bytes);
        offset += bytes;
    }
    sb_printf(&hdr, "}");
    size_t hlen = strlen(hdr);
    while (hlen % 8) { /* pad with spaces so the data section is 8-byte aligned */
        sb_printf(&hdr, " ");
        hlen++;
    }
    unsigned char lenbuf[8];
    for (int i = 0; i < 8; i++) lenbuf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    MbWFile w;
    MbStatus rc = mb_wfile_open(&w, path);
    if (rc) {
        arrfree(hdr);
        return rc;
    }
    mb_wfile_write(&w, lenbuf, 8);
    mb_wfile_write(&w, hdr, hlen);
    arrfree(hdr);
    for (size_t i = 0; i < n; i++) {
        const MbTensorOut *t = &tensors[i];
        size_t numel = 1;
        for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
        mb_wfile_write(&w, t->data, numel * mb_dtype_size(t->dtype));
    }
    return mb_wfile_commit(&w);
}

/* ---- config.json (transformers' LlamaConfig) ---- */

static int json_num(const MbJson *v, double *out) {
    if (!v || v->kind != MB_JSON_NUMBER) return 0;
    *out = v->num;
    return 1;
}

/* a positive int field; required fields fail when absent, optional ones keep *out */
static MbStatus cfg_int(const char *path, const MbJsonDoc *doc, const MbJson *obj, const char *key,
                        int required, int *out) {
    const MbJson *v = json_get(doc, obj, key);
    if (!v || v->kind == MB_JSON_NULL) {
        if (required)
            return mb_fail(MB_ERR_FORMAT, "%s: required field \"%s\" is missing", path, key);
        return MB_OK;
    }
    if (v->kind != MB_JSON_NUMBER || !v->is_int || v->i <= 0 || v->i > INT_MAX)
        return mb_fail(MB_ERR_FORMAT, "%s: \"%s\" must be a positive integer", path, key);
    *out = (int)v->i;
    return MB_OK;
}

static MbStatus cfg_rope(const char *path, const MbJsonDoc *doc, const MbJson *rs, MbConfig *c) {
    if (!rs || rs->kind == MB_JSON_NULL) return MB_OK;
    if (rs->kind != MB_JSON_OBJECT)
        return mb_fail(MB_ERR_FORMAT, "%s: \"rope_scaling\" must be an object or null", path);
    const MbJson *type = json_get(doc, rs, "rope_type");
    if (!type) type = json_get(doc, rs, "type");
    const char *t = type && type->kind == MB_JSON_STRING ? json_str(doc, type) : "default";
    double theta;
    if (json_num(json_get(doc, rs, "rope_theta"), &theta)) c->rope_theta = theta; /* v5 layout */
    if (!strcmp(t, "default")) return MB_OK;
    if (strcmp(t, "llama3"))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: rope type \"%s\" is not supported (medbot "
                       "implements default and llama3)", path, t);
    double f, lo, hi, orig;
    if (!json_num(json_get(doc, rs, "factor"), &f) ||
        !json_num(json_get(doc, rs, "low_freq_factor"), &lo) ||
        !json_num(json_get(doc, rs, "high_freq_factor"), &hi) ||
        !json_num(json_get(doc, rs, "original_max_position_embeddings"), &orig))
        return mb_fail(MB_ERR_FORMAT, "%s: llama3 rope scaling needs factor, low_freq_factor, "
                       "high_freq_factor and original_max_position_embeddings", path);
    if (!(f > 0) || !(lo > 0) || !(hi > lo) || !(orig >= 1))
        return mb_fail(MB_ERR_FORMAT, "%s: llama3 rope scaling values out of range", path);
    c->rope_llama3 = 1;
    c->rope_factor = f;
    c->rope_low_freq_factor = lo;
    c->rope_high_freq_factor = hi;
    c->rope_original_max_position_embeddings = (int)orig;
    return MB_OK;
}

MbStatus mb_config_load(const char *path, MbConfig *c) {
    memset(c, 0, sizeof *c);
    char *text;
    size_t n;
    MbStatus rc = mb_read_file(path, &text, &n);
    if (rc) return rc;
    MbJsonDoc doc;
    rc = json_parse(path, text, n, &doc);
    free(text);
    if (rc) return rc;
    const MbJson *r = json_root(&doc), *v;
    if (r->kind != MB_JSON_OBJECT) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: not a JSON object", path);
        goto done;
    }
    v = json_get(&doc, r, "model_type");
    if (v && v->kind == MB_JSON_STRING && strcmp(json_str(&doc, v), "llama")) {
        rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: model_type \"%s\" is not supported (medbot runs "
                     "Llama models)", path, json_str(&doc, v));
        goto done;
    }
    /* defaults of transformers' LlamaConfig */
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000.0;
    c->max_position_embeddings = 2048;
    c->bos_token_id = -1;
    if ((rc = cfg_int(path, &doc, r, "hidden_size", 1, &c->hidden_size)) ||
        (rc = cfg_int(path, &doc, r, "intermediate_size", 1, &c->intermediate_size)) ||
        (rc = cfg_int(path, &doc, r, "num_hidden_layers", 1, &c->num_hidden_layers)) ||
        (rc = cfg_int(path, &doc, r, "num_attention_heads", 1, &c->num_attention_heads)) ||
        (rc = cfg_int(path, &doc, r, "vocab_size", 1, &c->vocab_size)))
        goto done;
    c->num_key_value_heads = c->num_attention_heads;
    if ((rc = cfg_int(path, &doc, r, "num_key_value_heads", 0, &c->num_key_value_heads)) ||
        (rc = cfg_int(path, &doc, r, "max_position_embeddings", 0, &c->max_position_embeddings)))
        goto done;
    if (c->hidden_size % c->num_attention_heads == 0)
        c->head_dim = c->hidden_size / c->num_attention_heads;
    if ((rc = cfg_int(path, &doc, r, "head_dim", 0, &c->head_dim))) goto done;
    if (c->head_dim == 0 || c->head_dim % 2) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: head_dim must be given and even (hidden_size %d is not a "
                     "multiple of num_attention_heads %d)", path, c->hidden_size,
                     c->num_attention_heads);
        goto done;
    }
    if (c->num_attention_heads % c->num_key_value_heads) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: num_attention_heads %d is not a multiple of "
                     "num_key_value_heads %d", path, c->num_attention_heads, c->num_key_value_heads);
        goto done;
    }
    double d;
    if (json_num(json_get(&doc, r, "rms_norm_eps"), &d)) c->rms_norm_eps = (float)d;
    if (json_num(json_get(&doc, r, "rope_theta"), &d)) c->rope_theta = d;
    if (!(c->rms_norm_eps > 0) || !(c->rope_theta > 0)) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: rms_norm_eps and rope_theta must be positive", path);
        goto done;
    }
    v = json_get(&doc, r, "rope_scaling");
    if (!v || v->kind == MB_JSON_NULL) v = json_get(&doc, r, "rope_parameters");
    if ((rc = cfg_rope(path, &doc, v, c))) goto done;
    v = json_get(&doc, r, "tie_word_embeddings");
    c->tie_word_embeddings = v && v->kind == MB_JSON_BOOL && v->boolean;
    static const char *unsupported_true[] = {"attention_bias", "mlp_bias"};
    for (size_t i = 0; i < sizeof unsupported_true / sizeof *unsupported_true; i++) {
        v = json_get(&doc, r, unsupported_true[i]);
        if (v && v->kind == MB_JSON_BOOL && v->boolean) {
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: \"%s\": true is not supported", path,
                         unsupported_true[i]);
            goto done;
        }
    }
    v = json_get(&doc, r, "hidden_act");
    if (v && v->kind == MB_JSON_STRING && strcmp(json_str(&doc, v), "silu")) {
        rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: hidden_act \"%s\" is not supported (Llama uses silu)",
                     path, json_str(&doc, v));
        goto done;
    }
    v = json_get(&doc, r, "bos_token_id");
    if (v && v->kind == MB_JSON_NUMBER && v->is_int) c->bos_token_id = (int)v->i;
    v = json_get(&doc, r, "eos_token_id");
    if (v && v->kind == MB_JSON_NUMBER && v->is_int) c->eos_token_ids[c->n_eos_token_ids++] = (int)v->i;
    if (v && v->kind == MB_JSON_ARRAY)
        for (const MbJson *e = json_first(&doc, v); e && c->n_eos_token_ids < 8; e = json_next(&doc, e))
            if (e->kind == MB_JSON_NUMBER && e->is_int) c->eos_token_ids[c->n_eos_token_ids++] = (int)e->i;
    v = json_get(&doc, r, "torch_dtype");
    if (!v) v = json_get(&doc, r, "dtype");
    if (v && v->kind == MB_JSON_STRING)
        snprintf(c->torch_dtype, sizeof c->torch_dtype, "%s", json_str(&doc, v));
done:
    json_free(&doc);
    return rc;
}

// ============================================================================================
// ---------- 3. tokenizer ----------
// (Llama 3 byte-level BPE: the tokenizer issue.)
// ============================================================================================

// ============================================================================================
// ---------- 4. weights ----------
// A weight is an opaque matrix to the model: (rows, cols) values stored in a dtype the weights
// section knows how to expand. The ops only ask for fp32 tiles (weight_tile_t) or rows.
// ============================================================================================

typedef struct {
    MbDtype dtype;      /* F32 / F16 / BF16 */
    size_t rows, cols;  /* (O, I) for a linear layer, (V, C) for the embedding, (1, C) a norm */
    const void *data;   /* rows * cols values, row-major (mapped file or `owned`) */
    void *owned;        /* our copy when the file's bytes are misaligned, or random init */
} MbWeight;

/* Row r, columns [c0, c0+n) of w -> fp32 dst[0..n). */
static void weight_row_f32(const MbWeight *w, size_t r, size_t c0, size_t n, float *dst) {
    const unsigned char *p = (const unsigned char *)w->data + (r * w->cols + c0) * mb_dtype_size(w->dtype);
    mb_convert_to_f32(w->dtype, p, dst, n);
}

/* The tile rows [r0, r0+nr) x cols [c0, c0+nc) of w, transposed into fp32 dst (nc, ld):
 * dst[c * ld + r] = w[r0 + r][c0 + c]. This is what a matmul kernel consumes. */
static void weight_tile_t(const MbWeight *w, size_t r0, size_t nr, size_t c0, size_t nc, float *dst,
                          size_t ld) {
    size_t es = mb_dtype_size(w->dtype);
    for (size_t r = 0; r < nr; r++) {
        const unsigned char *p = (const unsigned char *)w->data + ((r0 + r) * w->cols + c0) * es;
        if (w->dtype == MB_DT_F32) {
            const float *f = (const float *)(const void *)p; /* aligned: see weight_from_tensor */
            for (size_t c = 0; c < nc; c++) dst[c * ld + r] = f[c];
        } else if (w->dtype == MB_DT_BF16) {
            const uint16_t *h = (const uint16_t *)(const void *)p;
            for (size_t c = 0; c < nc; c++) dst[c * ld + r] = bf16_to_f32(h[c]);
        } else {
            const uint16_t *h = (const uint16_t *)(const void *)p;
            for (size_t c = 0; c < nc; c++) dst[c * ld + r] = f16_to_f32(h[c]);
        }
    }
}

/* Wraps a checkpoint tensor as a weight of the expected shape (rows, cols); a 1-D tensor of
 * length cols is a (1, cols) weight. */
static MbStatus weight_from_tensor(const MbTensorInfo *t, size_t rows, size_t cols, MbWeight *w) {
    memset(w, 0, sizeof *w);
    int ok = (t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols) ||
             (t->ndim == 1 && rows == 1 && t->shape[0] == cols);
    if (!ok) {
        char got[128] = "", *g = got;
        for (int d = 0; d < t->ndim; d++)
            g += snprintf(g, sizeof got - (size_t)(g - got), "%s%zu", d ? ", " : "", t->shape[d]);
        if (rows == 1)
            return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has shape (%s), config.json implies (%zu)",
                           t->file, t->name, got, cols);
        return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has shape (%s), config.json implies (%zu, %zu)",
                       t->file, t->name, got, rows, cols);
    }
    if (t->dtype != MB_DT_F32 && t->dtype != MB_DT_BF16 && t->dtype != MB_DT_F16)
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; medbot reads F32, F16 and "
                       "BF16 weights", t->file, t->name, mb_dtype_name(t->dtype));
    w->dtype = t->dtype;
    w->rows = rows;
    w->cols = cols;
    w->data = t->data;
    if ((uintptr_t)t->data % mb_dtype_size(t->dtype)) { /* misaligned in the file: copy once */
        w->owned = mb_aligned_alloc(t->nbytes);
        memcpy(w->owned, t->data, t->nbytes);
        w->data = w->owned;
    }
    return MB_OK;
}

static void weight_free(MbWeight *w) {
    free(w->owned);
    memset(w, 0, sizeof *w);
}

// ============================================================================================
// ---------- 5. ops (CPU) ----------
// The op table MbOps is the only thing the model calls. This section is its CPU implementation:
// fp32 activations, weights expanded tile by tile, work split over a thread pool. The CUDA
// section implements the same table. Activation pointers are backend memory: the model never
// dereferences them and never does pointer arithmetic on them except through mb_act_at.
// ============================================================================================

typedef struct MbOps MbOps;
struct MbOps {
    const char *name;
    void *ctx;                 /* backend state */
    size_t act_size;           /* bytes per activation element */
    int host_memory;           /* activations live in host memory (the CPU backend) */
    void (*destroy)(MbOps *);
    float *(*alloc)(MbOps *, size_t n);                       /* n zeroed activations */
    void (*free)(MbOps *, float *p);
    void (*to_host)(MbOps *, float *dst, const float *src, size_t n);
    /* out (N, C) = wte[tokens] : nn.Embedding */
    void (*embedding_forward)(MbOps *, float *out, const int32_t *tokens, const MbWeight *wte, size_t N);
    /* out (N, O) = inp (N, I) @ w(O, I)^T : nn.Linear without bias */
    void (*matmul_forward)(MbOps *, float *out, const float *inp, const MbWeight *w, size_t N);
    /* out (N, C) = w * inp / sqrt(mean(inp^2) + eps), rstd (N) saved : LlamaRMSNorm */
    void (*rmsnorm_forward)(MbOps *, float *out, float *rstd, const float *inp, const MbWeight *w,
                            size_t N, float eps);
    /* x (B, T, nh, D) rotated in place at positions pos0 + t : apply_rotary_pos_emb (HF layout) */
    void (*rope_forward)(MbOps *, float *x, const float *inv_freq, int B, int T, int pos0, int nh, int D);
    /* cache (B, S, K*D) rows pos0 .. pos0+T-1 of each sequence = x (B, T, K*D) */
    void (*kv_store)(MbOps *, float *cache, const float *x, int B, int T, int S, int pos0, int KD);
    /* out (B, T, H, D) = softmax(q k^T / sqrt(D) + mask) v over the cache (B, S, K, D); query t
     * sits at pos0 + t and sees keys j <= pos0 + t with j < lens[b] (lens NULL: no padding);
     * lse (B, H, T) log-sum-exp saved for the backward (may be NULL) : sdpa with GQA */
    void (*attention_forward)(MbOps *, float *out, float *lse, const float *q, const float *kc,
                              const float *vc, const int *lens, int B, int T, int S, int pos0, int H,
                              int K, int D);
    /* out (n) = silu(gate) * up : LlamaMLP's act_fn(gate_proj(x)) * up_proj(x) */
    void (*swiglu_forward)(MbOps *, float *out, const float *gate, const float *up, size_t n);
    /* out (n, C) = inp[rows[i]] for i < n */
    void (*gather_rows)(MbOps *, float *out, const float *inp, const int *rows, size_t n, size_t C);
    /* out (n) = a (n) + b (n); out may alias a or b : the residual connection */
    void (*add_forward)(MbOps *, float *out, const float *a, const float *b, size_t n);
    /* u (N, R) = x (N, I) @ A^T; out (N, O) += scale * u @ B^T : PEFT's lora_B(lora_A(x)) * scaling.
     * A (R, I) and B (O, R) are fp32 weights. */
    void (*lora_forward)(MbOps *, float *out, float *u, const float *x, const MbWeight *A, const MbWeight *B,
                         size_t N, float scale);
    /* log-probabilities of targets under logits = x @ w^T without keeping the logits:
     * logp (M) = logits[m][targets[m]] - lse[m], lse (M) = logsumexp(logits[m]),
     * lsum (M) = sum over the vocabulary of logits[m] (for TRL's logits/chosen and logits/rejected), fp32 :
     * selective_log_softmax(lm_head(x), targets) */
    void (*logprob_forward)(MbOps *, float *logp, float *lse, double *lsum, const float *x, const MbWeight *w,
                            const int32_t *targets, size_t M);

    /* ---- backward (parameter gradients +=, activation gradients = unless `accumulate`) ---- */
    /* dinp (N, I) (+)= dout (N, O) @ w (O, I) */
    void (*matmul_backward)(MbOps *, float *dinp, const float *dout, const MbWeight *w, size_t N, int accumulate);
    /* dinp (N, C) (+)= d rmsnorm(inp)/d inp . dout; w frozen (no weight gradient) */
    void (*rmsnorm_backward)(MbOps *, float *dinp, const float *dout, const float *inp, const MbWeight *w,
                             const float *rstd, size_t N, int accumulate);
    /* dx (B, T, nh, D) rotated back in place (the transpose of rope_forward) */
    void (*rope_backward)(MbOps *, float *dx, const float *inv_freq, int B, int T, int pos0, int nh, int D);
    /* dq (B, T, H, D), dk, dv (B, T, K, D) = gradients of attention_forward (pos0 0, S = T) given
     * dout, the inputs and the saved out and lse */
    void (*attention_backward)(MbOps *, float *dq, float *dk, float *dv, const float *dout, const float *q,
                               const float *k, const float *v, const float *out, const float *lse,
                               const int *lens, int B, int T, int H, int K, int D);
    /* dgate, dup (n) = gradients of swiglu_forward */
    void (*swiglu_backward)(MbOps *, float *dgate, float *dup, const float *dout, const float *gate,
                            const float *up, size_t n);
    /* dA (R, I) += du^T x, dB (O, R) += scale dout^T u, dx (N, I) += du @ A with du = scale dout @ B */
    void (*lora_backward)(MbOps *, float *dx, float *dA, float *dB, const float *dout, const float *x,
                          const float *u, const MbWeight *A, const MbWeight *B, size_t N, float scale);
    /* dx (M, C) = d(sum_m g[m] logp[m]) / dx : the backward of logprob_forward */
    void (*logprob_backward)(MbOps *, float *dx, const float *g, const float *x, const MbWeight *w,
                             const int32_t *targets, const float *lse, size_t M);
    /* out (N, C) = 0 except rows[i] = inp[i] for i < n : the backward of gather_rows */
    void (*scatter_rows)(MbOps *, float *out, const float *inp, const int *rows, size_t n, size_t N, size_t C);

    /* ---- optimizer state (fp32 vectors of n) ---- */
    double (*sumsq)(MbOps *, const float *x, size_t n);                  /* sum of x^2 */
    void (*scale)(MbOps *, float *x, float s, size_t n);                  /* x *= s */
    void (*fill)(MbOps *, float *x, float v, size_t n);                   /* x = v */
    /* torch.optim.AdamW step `step` (1-based) with decoupled weight decay */
    void (*adamw)(MbOps *, float *p, const float *g, float *m, float *v, size_t n, double lr, double beta1,
                  double beta2, double eps, double wd, long step);
};

static float *mb_act_at(const MbOps *ops, float *base, size_t elems) {
    return (float *)(void *)((char *)base + elems * ops->act_size);
}

typedef struct {
    MbPool *pool;
    float **scratch;      /* per thread */
    size_t *scratch_n;
} MbCpu;

/* Per-thread scratch of at least n floats (each thread grows only its own slot). */
static float *cpu_scratch(MbCpu *cpu, int tid, size_t n) {
    if (cpu->scratch_n[tid] < n) {
        free(cpu->scratch[tid]);
        cpu->scratch[tid] = mb_aligned_alloc(n * sizeof(float));
        cpu->scratch_n[tid] = n;
    }
    return cpu->scratch[tid];
}

static float *cpu_alloc(MbOps *ops, size_t n) {
    (void)ops;
    float *p = mb_aligned_alloc(n * sizeof(float));
    memset(p, 0, n * sizeof(float));
    return p;
}

static void cpu_free(MbOps *ops, float *p) {
    (void)ops;
    free(p);
}

static void cpu_to_host(MbOps *ops, float *dst, const float *src, size_t n) {
    (void)ops;
    if (dst != src) memcpy(dst, src, n * sizeof(float));
}

static void cpu_embedding_forward(MbOps *ops, float *out, const int32_t *tokens, const MbWeight *wte,
                                  size_t N) {
    (void)ops;
    for (size_t n = 0; n < N; n++) weight_row_f32(wte, (size_t)tokens[n], 0, wte->cols, out + n * wte->cols);
}

/* ---- matmul ----
 * out (N, O) = inp (N, I) @ W^T. W is expanded to fp32 one tile of MM_OB output rows x MM_IB
 * inputs at a time, transposed so the inner loop is a contiguous multiply-add over MM_OB outputs
 * (vectorizes without -ffast-math); MM_MR input rows share each loaded tile row. Threads take
 * disjoint output columns, so no two write the same memory and the result does not depend on
 * the thread count. Sizes tuned with tests/bench/bench_forward.c on an AVX-512 EPYC
 * (32 x 8 x 256: 1.6x the 32 x 4 x 256 start). */
#define MM_OB 32
#define MM_IB 256
#define MM_MR 8

typedef struct {
    MbCpu *cpu;
    float *out;
    const float *inp;
    const MbWeight *w;
    size_t N;
} MatmulTask;

/* acc rows r < mr of out (ld O) over one tile: wt (ni, MM_OB) */
static void matmul_kernel(float *out, size_t O, const float *inp, size_t I, const float *wt, size_t ni,
                          size_t no, size_t mr, int first) {
    float acc[MM_MR][MM_OB];
    for (size_t r = 0; r < MM_MR; r++)
        for (size_t o = 0; o < MM_OB; o++) acc[r][o] = (!first && r < mr && o < no) ? out[r * O + o] : 0.0f;
    if (mr == MM_MR) { /* constant trip counts: the compiler keeps acc in vector registers */
        for (size_t i = 0; i < ni; i++) {
            const float *wr = wt + i * MM_OB;
            float xs[MM_MR];
            for (size_t r = 0; r < MM_MR; r++) xs[r] = inp[r * I + i];
            for (size_t r = 0; r < MM_MR; r++)
                for (size_t o = 0; o < MM_OB; o++) acc[r][o] += xs[r] * wr[o];
        }
    } else {
        for (size_t i = 0; i < ni; i++) {
            const float *wr = wt + i * MM_OB;
            for (size_t r = 0; r < mr; r++) {
                float x = inp[r * I + i];
                for (size_t o = 0; o < MM_OB; o++) acc[r][o] += x * wr[o];
            }
        }
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t o = 0; o < no; o++) out[r * O + o] = acc[r][o];
}

static void matmul_task(void *ctx, int tid, int nt) {
    MatmulTask *t = ctx;
    size_t O = t->w->rows, I = t->w->cols, nblocks = (O + MM_OB - 1) / MM_OB, b0, b1;
    mb_split(nblocks, tid, nt, &b0, &b1);
    float *wt = cpu_scratch(t->cpu, tid, (size_t)MM_IB * MM_OB);
    for (size_t b = b0; b < b1; b++) {
        size_t o0 = b * MM_OB, no = MB_MIN((size_t)MM_OB, O - o0);
        for (size_t i0 = 0; i0 < I; i0 += MM_IB) {
            size_t ni = MB_MIN((size_t)MM_IB, I - i0);
            if (no < MM_OB) memset(wt, 0, (size_t)MM_IB * MM_OB * sizeof(float));
            weight_tile_t(t->w, o0, no, i0, ni, wt, MM_OB);
            for (size_t n0 = 0; n0 < t->N; n0 += MM_MR)
                matmul_kernel(t->out + n0 * O + o0, O, t->inp + n0 * I + i0, I, wt, ni, no,
                              MB_MIN((size_t)MM_MR, t->N - n0), i0 == 0);
        }
    }
}

/* sum of a[i] * b[i] over n, in MM_LANES independent partial sums (vectorizes without
 * reassociating), added up in a fixed order */
#define MM_LANES 16
static float dot_f32(const float *a, const float *b, size_t n) {
    float s[MM_LANES] = {0};
    size_t i = 0;
    for (; i + MM_LANES <= n; i += MM_LANES)
        for (size_t l = 0; l < MM_LANES; l++) s[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s[i % MM_LANES] += a[i] * b[i];
    float t = 0.0f;
    for (size_t l = 0; l < MM_LANES; l++) t += s[l];
    return t;
}

/* Few rows (decode): each output is a dot product of a weight row with the input row, the
 * weight read once, row by row, expanded MM_IB values at a time. */
static void matvec_task(void *ctx, int tid, int nt) {
    MatmulTask *t = ctx;
    size_t O = t->w->rows, I = t->w->cols, o0, o1;
    mb_split(O, tid, nt, &o0, &o1);
    float *wf = cpu_scratch(t->cpu, tid, MM_IB);
    for (size_t o = o0; o < o1; o++) {
        for (size_t n = 0; n < t->N; n++) t->out[n * O + o] = 0.0f;
        for (size_t i0 = 0; i0 < I; i0 += MM_IB) {
            size_t ni = MB_MIN((size_t)MM_IB, I - i0);
            const float *wr = wf;
            if (t->w->dtype == MB_DT_F32) wr = (const float *)t->w->data + o * I + i0;
            else weight_row_f32(t->w, o, i0, ni, wf);
            for (size_t n = 0; n < t->N; n++) t->out[n * O + o] += dot_f32(wr, t->inp + n * I + i0, ni);
        }
    }
}

static void cpu_matmul_forward(MbOps *ops, float *out, const float *inp, const MbWeight *w, size_t N) {
    MbCpu *cpu = ops->ctx;
    MatmulTask t = {cpu, out, inp, w, N};
    mb_pool_run(cpu->pool, N < MM_MR ? matvec_task : matmul_task, &t);
}

static void cpu_rmsnorm_forward(MbOps *ops, float *out, float *rstd, const float *inp, const MbWeight *w,
                                size_t N, float eps) {
    (void)ops;
    size_t C = w->cols;
    float *wf = mb_malloc(C * sizeof(float));
    weight_row_f32(w, 0, 0, C, wf);
    for (size_t n = 0; n < N; n++) {
        const float *x = inp + n * C;
        float ss = 0.0f;
        for (size_t c = 0; c < C; c++) ss += x[c] * x[c];
        float r = 1.0f / sqrtf(ss / (float)C + eps);
        if (rstd) rstd[n] = r;
        for (size_t c = 0; c < C; c++) out[n * C + c] = wf[c] * (x[c] * r);
    }
    free(wf);
}

static void cpu_rope_forward(MbOps *ops, float *x, const float *inv_freq, int B, int T, int pos0, int nh,
                             int D) {
    (void)ops;
    int half = D / 2;
    float *cs = mb_malloc((size_t)T * (size_t)D * sizeof(float)); /* (T, cos[half], sin[half]) */
    for (int t = 0; t < T; t++)
        for (int j = 0; j < half; j++) {
            float f = (float)(pos0 + t) * inv_freq[j];
            cs[(size_t)t * D + j] = cosf(f);
            cs[(size_t)t * D + half + j] = sinf(f);
        }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cs + (size_t)t * D, *s = c + half;
            for (int h = 0; h < nh; h++) {
                float *v = x + (((size_t)b * T + t) * nh + h) * D;
                for (int j = 0; j < half; j++) {
                    float x1 = v[j], x2 = v[j + half];
                    v[j] = x1 * c[j] - x2 * s[j];
                    v[j + half] = x2 * c[j] + x1 * s[j];
                }
            }
        }
    free(cs);
}

static void cpu_kv_store(MbOps *ops, float *cache, const float *x, int B, int T, int S, int pos0, int KD) {
    (void)ops;
    for (int b = 0; b < B; b++)
        memcpy(cache + ((size_t)b * S + pos0) * KD, x + (size_t)b * T * KD, (size_t)T * KD * sizeof(float));
}

typedef struct {
    MbCpu *cpu;
    float *out, *lse;
    const float *q, *kc, *vc;
    const int *lens;
    int B, T, S, pos0, H, K, D;
} AttnTask;

static void attention_task(void *ctx, int tid, int nt) {
    AttnTask *a = ctx;
    size_t lo, hi;
    mb_split((size_t)a->B * a->H, tid, nt, &lo, &hi);
    int D = a->D, KD = a->K * a->D, group = a->H / a->K;
    float scale = 1.0f / sqrtf((float)D);
    float *p = cpu_scratch(a->cpu, tid, (size_t)a->S + (size_t)D);
    float *acc = p + a->S;
    for (size_t bh = lo; bh < hi; bh++) {
        int b = (int)(bh / (size_t)a->H), h = (int)(bh % (size_t)a->H), kh = h / group;
        int len = a->lens ? a->lens[b] : a->S;
        const float *kb = a->kc + (size_t)b * a->S * KD + (size_t)kh * D;
        const float *vb = a->vc + (size_t)b * a->S * KD + (size_t)kh * D;
        for (int t = 0; t < a->T; t++) {
            const float *q = a->q + (((size_t)b * a->T + t) * a->H + h) * D;
            int nk = MB_MIN(a->pos0 + t + 1, len);
            float m = -INFINITY;
            for (int j = 0; j < nk; j++) {
                const float *k = kb + (size_t)j * KD;
                float s = 0.0f;
                for (int d = 0; d < D; d++) s += q[d] * k[d];
                p[j] = s * scale;
                m = MB_MAX(m, p[j]);
            }
            float sum = 0.0f;
            for (int j = 0; j < nk; j++) {
                p[j] = expf(p[j] - m);
                sum += p[j];
            }
            for (int d = 0; d < D; d++) acc[d] = 0.0f;
            for (int j = 0; j < nk; j++) {
                const float *v = vb + (size_t)j * KD;
                for (int d = 0; d < D; d++) acc[d] += p[j] * v[d];
            }
            float *o = a->out + (((size_t)b * a->T + t) * a->H + h) * D;
            float inv = nk > 0 ? 1.0f / sum : 0.0f;
            for (int d = 0; d < D; d++) o[d] = acc[d] * inv;
            if (a->lse) a->lse[((size_t)b * a->H + h) * a->T + t] = nk > 0 ? m + logf(sum) : -INFINITY;
        }
    }
}

static void cpu_attention_forward(MbOps *ops, float *out, float *lse, const float *q, const float *kc,
                                  const float *vc, const int *lens, int B, int T, int S, int pos0, int H,
                                  int K, int D) {
    MbCpu *cpu = ops->ctx;
    AttnTask a = {cpu, out, lse, q, kc, vc, lens, B, T, S, pos0, H, K, D};
    mb_pool_run(cpu->pool, attention_task, &a);
}

static void cpu_swiglu_forward(MbOps *ops, float *out, const float *gate, const float *up, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

static void cpu_gather_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t C) {
    (void)ops;
    for (size_t i = 0; i < n; i++) memcpy(out + i * C, inp + (size_t)rows[i] * C, C * sizeof(float));
}

static void cpu_add_forward(MbOps *ops, float *out, const float *a, const float *b, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

/* The tile rows [r0, r0+nr) x cols [c0, c0+nc) of w in fp32, as stored: dst[r * ld + c]. */
static void weight_tile(const MbWeight *w, size_t r0, size_t nr, size_t c0, size_t nc, float *dst, size_t ld) {
    for (size_t r = 0; r < nr; r++) weight_row_f32(w, r0 + r, c0, nc, dst + r * ld);
}

/* dinp (N, I) = dout (N, O) @ W: the forward kernel with the roles of rows and columns of W
 * swapped (tiles of MM_IB weight rows x MM_OB weight columns, as stored). Threads take disjoint
 * blocks of I. */
typedef struct {
    MbCpu *cpu;
    float *dinp;
    const float *dout;
    const MbWeight *w;
    size_t N;
    int accumulate;
} MatmulBwdTask;

static void matmul_backward_task(void *ctx, int tid, int nt) {
    MatmulBwdTask *t = ctx;
    size_t O = t->w->rows, I = t->w->cols, nblocks = (I + MM_OB - 1) / MM_OB, b0, b1;
    mb_split(nblocks, tid, nt, &b0, &b1);
    float *wt = cpu_scratch(t->cpu, tid, (size_t)MM_IB * MM_OB);
    for (size_t b = b0; b < b1; b++) {
        size_t c0 = b * MM_OB, nc = MB_MIN((size_t)MM_OB, I - c0);
        for (size_t o0 = 0; o0 < O; o0 += MM_IB) {
            size_t no = MB_MIN((size_t)MM_IB, O - o0);
            if (nc < MM_OB) memset(wt, 0, (size_t)MM_IB * MM_OB * sizeof(float));
            weight_tile(t->w, o0, no, c0, nc, wt, MM_OB);
            for (size_t n0 = 0; n0 < t->N; n0 += MM_MR)
                matmul_kernel(t->dinp + n0 * I + c0, I, t->dout + n0 * O + o0, O, wt, no, nc,
                              MB_MIN((size_t)MM_MR, t->N - n0), o0 == 0 && !t->accumulate);
        }
    }
}

static void cpu_matmul_backward(MbOps *ops, float *dinp, const float *dout, const MbWeight *w, size_t N,
                                int accumulate) {
    MbCpu *cpu = ops->ctx;
    MatmulBwdTask t = {cpu, dinp, dout, w, N, accumulate};
    mb_pool_run(cpu->pool, matmul_backward_task, &t);
}

/* y = w * x * r with r = 1/sqrt(mean(x^2) + eps):
 * dx = r * (w dy) - r^3 / C * x * sum(w dy x) */
static void cpu_rmsnorm_backward(MbOps *ops, float *dinp, const float *dout, const float *inp, const MbWeight *w,
                                 const float *rstd, size_t N, int accumulate) {
    (void)ops;
    size_t C = w->cols;
    float *wf = mb_malloc(C * sizeof(float));
    weight_row_f32(w, 0, 0, C, wf);
    for (size_t n = 0; n < N; n++) {
        const float *x = inp + n * C, *dy = dout + n * C;
        float r = rstd[n], dot = 0.0f;
        for (size_t c = 0; c < C; c++) dot += wf[c] * dy[c] * x[c];
        float k = r * r * r * dot / (float)C;
        float *dx = dinp + n * C;
        for (size_t c = 0; c < C; c++) {
            float g = r * wf[c] * dy[c] - k * x[c];
            dx[c] = accumulate ? dx[c] + g : g;
        }
    }
    free(wf);
}

static void cpu_rope_backward(MbOps *ops, float *dx, const float *inv_freq, int B, int T, int pos0, int nh,
                              int D) {
    (void)ops;
    int half = D / 2;
    float *cs = mb_malloc((size_t)T * (size_t)D * sizeof(float));
    for (int t = 0; t < T; t++)
        for (int j = 0; j < half; j++) {
            float f = (float)(pos0 + t) * inv_freq[j];
            cs[(size_t)t * D + j] = cosf(f);
            cs[(size_t)t * D + half + j] = sinf(f);
        }
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const float *c = cs + (size_t)t * D, *s = c + half;
            for (int h = 0; h < nh; h++) {
                float *v = dx + (((size_t)b * T + t) * nh + h) * D;
                for (int j = 0; j < half; j++) {
                    float g1 = v[j], g2 = v[j + half];
                    v[j] = g1 * c[j] + g2 * s[j];
                    v[j + half] = g2 * c[j] - g1 * s[j];
                }
            }
        }
    free(cs);
}

typedef struct {
    MbCpu *cpu;
    float *dq, *dk, *dv;
    const float *dout, *q, *k, *v, *out, *lse;
    const int *lens;
    int B, T, H, K, D;
} AttnBwdTask;

/* One thread per (b, kv head): it owns dk and dv of that head, so GQA needs no atomics. */
static void attention_backward_task(void *ctx, int tid, int nt) {
    AttnBwdTask *a = ctx;
    size_t lo, hi;
    mb_split((size_t)a->B * a->K, tid, nt, &lo, &hi);
    int D = a->D, T = a->T, H = a->H, K = a->K, group = H / K, QD = H * D, KD = K * D;
    float scale = 1.0f / sqrtf((float)D);
    float *p = cpu_scratch(a->cpu, tid, (size_t)T);
    for (size_t bk = lo; bk < hi; bk++) {
        int b = (int)(bk / (size_t)K), kh = (int)(bk % (size_t)K), len = a->lens ? a->lens[b] : T;
        size_t seq = (size_t)b * T;
        for (int t = 0; t < T; t++)
            for (int d = 0; d < D; d++) {
                a->dk[(seq + t) * KD + (size_t)kh * D + d] = 0.0f;
                a->dv[(seq + t) * KD + (size_t)kh * D + d] = 0.0f;
            }
        for (int h = kh * group; h < (kh + 1) * group; h++)
            for (int t = 0; t < T; t++) {
                const float *q = a->q + (seq + t) * QD + (size_t)h * D;
                const float *o = a->out + (seq + t) * QD + (size_t)h * D;
                const float *dO = a->dout + (seq + t) * QD + (size_t)h * D;
                float *dq = a->dq + (seq + t) * QD + (size_t)h * D;
                float lse = a->lse[((size_t)b * H + h) * T + t];
                int nk = MB_MIN(t + 1, len);
                float Dt = 0.0f;
                for (int d = 0; d < D; d++) Dt += dO[d] * o[d];
                for (int d = 0; d < D; d++) dq[d] = 0.0f;
                for (int j = 0; j < nk; j++) {
                    const float *kj = a->k + (seq + j) * KD + (size_t)kh * D;
                    const float *vj = a->v + (seq + j) * KD + (size_t)kh * D;
                    float s = 0.0f, dp = 0.0f;
                    for (int d = 0; d < D; d++) s += q[d] * kj[d], dp += dO[d] * vj[d];
                    p[j] = expf(s * scale - lse);
                    float ds = p[j] * (dp - Dt) * scale;
                    float *dkj = a->dk + (seq + j) * KD + (size_t)kh * D;
                    float *dvj = a->dv + (seq + j) * KD + (size_t)kh * D;
                    for (int d = 0; d < D; d++) {
                        dq[d] += ds * kj[d];
                        dkj[d] += ds * q[d];
                        dvj[d] += p[j] * dO[d];
                    }
                }
            }
    }
}

static void cpu_attention_backward(MbOps *ops, float *dq, float *dk, float *dv, const float *dout, const float *q,
                                   const float *k, const float *v, const float *out, const float *lse,
                                   const int *lens, int B, int T, int H, int K, int D) {
    MbCpu *cpu = ops->ctx;
    AttnBwdTask a = {cpu, dq, dk, dv, dout, q, k, v, out, lse, lens, B, T, H, K, D};
    mb_pool_run(cpu->pool, attention_backward_task, &a);
}

static void cpu_swiglu_backward(MbOps *ops, float *dgate, float *dup, const float *dout, const float *gate,
                                const float *up, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) {
        float g = gate[i], s = 1.0f / (1.0f + expf(-g)), silu = g * s;
        dup[i] = dout[i] * silu;
        dgate[i] = dout[i] * up[i] * (s * (1.0f + g * (1.0f - s)));
    }
}

/* C (Mr, Kc) += alpha * A^T B with A (N, Mr) and B (N, Kc), both row-major; threads take rows of C.
 * The sum over n runs in order, so the result does not depend on the thread count. */
typedef struct {
    float *c;
    const float *a, *b;
    size_t N, Mr, Kc;
    float alpha;
} GemmTnTask;

static void gemm_tn_task(void *ctx, int tid, int nt) {
    GemmTnTask *t = ctx;
    size_t lo, hi;
    mb_split(t->Mr, tid, nt, &lo, &hi);
    for (size_t m = lo; m < hi; m++) {
        float *c = t->c + m * t->Kc;
        for (size_t n = 0; n < t->N; n++) {
            float s = t->alpha * t->a[n * t->Mr + m];
            const float *b = t->b + n * t->Kc;
            for (size_t k = 0; k < t->Kc; k++) c[k] += s * b[k];
        }
    }
}

static void cpu_gemm_tn_acc(MbCpu *cpu, float *c, const float *a, const float *b, size_t N, size_t Mr, size_t Kc,
                            float alpha) {
    GemmTnTask t = {c, a, b, N, Mr, Kc, alpha};
    mb_pool_run(cpu->pool, gemm_tn_task, &t);
}

/* out (N, O) += scale * u (N, R) @ B^T, threads over O */
typedef struct {
    float *out;
    const float *u;
    const MbWeight *B;
    size_t N;
    float scale;
} LoraUpTask;

static void lora_up_task(void *ctx, int tid, int nt) {
    LoraUpTask *t = ctx;
    size_t O = t->B->rows, R = t->B->cols, lo, hi;
    mb_split(O, tid, nt, &lo, &hi);
    const float *Bw = t->B->data;
    for (size_t o = lo; o < hi; o++)
        for (size_t n = 0; n < t->N; n++) t->out[n * O + o] += t->scale * dot_f32(t->u + n * R, Bw + o * R, R);
}

static void cpu_lora_forward(MbOps *ops, float *out, float *u, const float *x, const MbWeight *A, const MbWeight *B,
                             size_t N, float scale) {
    MbCpu *cpu = ops->ctx;
    cpu_matmul_forward(ops, u, x, A, N);
    LoraUpTask t = {out, u, B, N, scale};
    mb_pool_run(cpu->pool, lora_up_task, &t);
}

static void cpu_lora_backward(MbOps *ops, float *dx, float *dA, float *dB, const float *dout, const float *x,
                              const float *u, const MbWeight *A, const MbWeight *B, size_t N, float scale) {
    MbCpu *cpu = ops->ctx;
    size_t R = A->rows, I = A->cols, O = B->rows;
    float *du = mb_aligned_alloc(N * R * sizeof(float));
    cpu_gemm_tn_acc(cpu, dB, dout, u, N, O, R, scale);         /* dB += scale dout^T u */
    cpu_matmul_backward(ops, du, dout, B, N, 0);                /* du = dout @ B */
    for (size_t i = 0; i < N * R; i++) du[i] *= scale;
    cpu_gemm_tn_acc(cpu, dA, du, x, N, R, I, 1.0f);             /* dA += du^T x */
    cpu_matmul_backward(ops, dx, du, A, N, 1);                  /* dx += du @ A */
    free(du);
}

/* rows of logits are made LP_ROWS at a time (never the whole (M, V) block) */
#define LP_ROWS 16

static void cpu_logprob_forward(MbOps *ops, float *logp, float *lse, double *lsum, const float *x, const MbWeight *w,
                                const int32_t *targets, size_t M) {
    size_t V = w->rows, C = w->cols;
    float *logits = mb_aligned_alloc(LP_ROWS * V * sizeof(float));
    for (size_t m0 = 0; m0 < M; m0 += LP_ROWS) {
        size_t rows = MB_MIN((size_t)LP_ROWS, M - m0);
        cpu_matmul_forward(ops, logits, x + m0 * C, w, rows);
        for (size_t r = 0; r < rows; r++) {
            const float *l = logits + r * V;
            float mx = -INFINITY;
            double sum = 0.0;
            for (size_t v = 0; v < V; v++) mx = MB_MAX(mx, l[v]), sum += l[v];
            float se = 0.0f;
            for (size_t v = 0; v < V; v++) se += expf(l[v] - mx);
            lse[m0 + r] = mx + logf(se);
            logp[m0 + r] = l[targets[m0 + r]] - lse[m0 + r];
            lsum[m0 + r] = sum;
        }
    }
    free(logits);
}

static void cpu_logprob_backward(MbOps *ops, float *dx, const float *g, const float *x, const MbWeight *w,
                                 const int32_t *targets, const float *lse, size_t M) {
    size_t V = w->rows, C = w->cols;
    float *logits = mb_aligned_alloc(LP_ROWS * V * sizeof(float));
    for (size_t m0 = 0; m0 < M; m0 += LP_ROWS) {
        size_t rows = MB_MIN((size_t)LP_ROWS, M - m0);
        cpu_matmul_forward(ops, logits, x + m0 * C, w, rows);
        for (size_t r = 0; r < rows; r++) { /* d logp / d logits = onehot(target) - softmax */
            float *l = logits + r * V, gr = g[m0 + r], ls = lse[m0 + r];
            for (size_t v = 0; v < V; v++) l[v] = -gr * expf(l[v] - ls);
            l[targets[m0 + r]] += gr;
        }
        cpu_matmul_backward(ops, dx + m0 * C, logits, w, rows, 0);
    }
    free(logits);
}

static void cpu_scatter_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t N, size_t C) {
    (void)ops;
    memset(out, 0, N * C * sizeof(float));
    for (size_t i = 0; i < n; i++) memcpy(out + (size_t)rows[i] * C, inp + i * C, C * sizeof(float));
}

static double cpu_sumsq(MbOps *ops, const float *x, size_t n) {
    (void)ops;
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

static void cpu_scale(MbOps *ops, float *x, float s, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

static void cpu_fill(MbOps *ops, float *x, float v, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) x[i] = v;
}

/* torch.optim.AdamW (foreach=False) in fp32 with the bias corrections in double, as torch does */
static void cpu_adamw(MbOps *ops, float *p, const float *g, float *m, float *v, size_t n, double lr, double beta1,
                      double beta2, double eps, double wd, long step) {
    (void)ops;
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2), decay = (float)(1.0 - lr * wd);
    float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    for (size_t i = 0; i < n; i++) {
        p[i] *= decay;
        m[i] += (g[i] - m[i]) * (1.0f - b1);
        v[i] = v[i] * b2 + (1.0f - b2) * g[i] * g[i];
        float denom = sqrtf(v[i]) / bc2_sqrt + e;
        p[i] -= step_size * (m[i] / denom);
    }
}

static void cpu_destroy(MbOps *ops) {
    MbCpu *cpu = ops->ctx;
    for (int i = 0; i < cpu->pool->n; i++) free(cpu->scratch[i]);
    free(cpu->scratch);
    free(cpu->scratch_n);
    mb_pool_free(cpu->pool);
    free(cpu);
    free(ops);
}

static MbOps *mb_cpu_ops_new(int threads) {
    MbCpu *cpu = mb_calloc(1, sizeof *cpu);
    cpu->pool = mb_pool_new(threads > 0 ? threads : mb_cpu_count());
    cpu->scratch = mb_calloc((size_t)cpu->pool->n, sizeof *cpu->scratch);
    cpu->scratch_n = mb_calloc((size_t)cpu->pool->n, sizeof *cpu->scratch_n);
    MbOps *ops = mb_calloc(1, sizeof *ops);
    ops->name = "cpu";
    ops->ctx = cpu;
    ops->act_size = sizeof(float);
    ops->host_memory = 1;
    ops->destroy = cpu_destroy;
    ops->alloc = cpu_alloc;
    ops->free = cpu_free;
    ops->to_host = cpu_to_host;
    ops->embedding_forward = cpu_embedding_forward;
    ops->matmul_forward = cpu_matmul_forward;
    ops->rmsnorm_forward = cpu_rmsnorm_forward;
    ops->rope_forward = cpu_rope_forward;
    ops->kv_store = cpu_kv_store;
    ops->attention_forward = cpu_attention_forward;
    ops->swiglu_forward = cpu_swiglu_forward;
    ops->gather_rows = cpu_gather_rows;
    ops->add_forward = cpu_add_forward;
    ops->lora_forward = cpu_lora_forward;
    ops->logprob_forward = cpu_logprob_forward;
    ops->matmul_backward = cpu_matmul_backward;
    ops->rmsnorm_backward = cpu_rmsnorm_backward;
    ops->rope_backward = cpu_rope_backward;
    ops->attention_backward = cpu_attention_backward;
    ops->swiglu_backward = cpu_swiglu_backward;
    ops->lora_backward = cpu_lora_backward;
    ops->logprob_backward = cpu_logprob_backward;
    ops->scatter_rows = cpu_scatter_rows;
    ops->sumsq = cpu_sumsq;
    ops->scale = cpu_scale;
    ops->fill = cpu_fill;
    ops->adamw = cpu_adamw;
    return ops;
}

// ============================================================================================
// ---------- 6. model ----------
// Llama-3.1 as transformers' LlamaForCausalLM computes it, written once against MbOps:
//   x = embed(tokens); per layer: x += o_proj(attn(rope(q_proj(n1 x)), rope(k_proj(n1 x)),
//   v_proj(n1 x))); x += down_proj(silu(gate_proj(n2 x)) * up_proj(n2 x)); logits = lm_head(norm x)
// ============================================================================================

typedef enum {
    MB_W_INPUT_LAYERNORM, MB_W_Q_PROJ, MB_W_K_PROJ, MB_W_V_PROJ, MB_W_O_PROJ,
    MB_W_POST_ATTENTION_LAYERNORM, MB_W_GATE_PROJ, MB_W_UP_PROJ, MB_W_DOWN_PROJ,
    MB_LAYER_WEIGHTS
} MbLayerWeightId;

typedef enum { MB_DIM_1, MB_DIM_C, MB_DIM_QD, MB_DIM_KVD, MB_DIM_F } MbDim; /* 1, C, H*D, K*D, F */

/* Each decoder layer weight: its name under model.layers.{i}. and its (rows, cols). */
static const struct {
    const char *name;
    MbDim rows, cols;
} mb_layer_weights[MB_LAYER_WEIGHTS] = {
    [MB_W_INPUT_LAYERNORM] = {"input_layernorm", MB_DIM_1, MB_DIM_C},
    [MB_W_Q_PROJ] = {"self_attn.q_proj", MB_DIM_QD, MB_DIM_C},
    [MB_W_K_PROJ] = {"self_attn.k_proj", MB_DIM_KVD, MB_DIM_C},
    [MB_W_V_PROJ] = {"self_attn.v_proj", MB_DIM_KVD, MB_DIM_C},
    [MB_W_O_PROJ] = {"self_attn.o_proj", MB_DIM_C, MB_DIM_QD},
    [MB_W_POST_ATTENTION_LAYERNORM] = {"post_attention_layernorm", MB_DIM_1, MB_DIM_C},
    [MB_W_GATE_PROJ] = {"mlp.gate_proj", MB_DIM_F, MB_DIM_C},
    [MB_W_UP_PROJ] = {"mlp.up_proj", MB_DIM_F, MB_DIM_C},
    [MB_W_DOWN_PROJ] = {"mlp.down_proj", MB_DIM_C, MB_DIM_F},
};

static size_t mb_dim(const MbConfig *c, MbDim d) {
    switch (d) {
    case MB_DIM_1: return 1;
    case MB_DIM_C: return (size_t)c->hidden_size;
    case MB_DIM_QD: return (size_t)c->num_attention_heads * (size_t)c->head_dim;
    case MB_DIM_KVD: return (size_t)c->num_key_value_heads * (size_t)c->head_dim;
    case MB_DIM_F: return (size_t)c->intermediate_size;
    }
    return 0;
}

typedef struct {
    MbWeight w[MB_LAYER_WEIGHTS];
} MbLayer;

/* LoRA adapters as the model sees them (the functions that make, load and save them are in
 * section 7). For each decoder layer and each targeted projection: y += scale * B (A x). */
typedef struct {
    MbWeight A, B;      /* (R, in), (out, R): fp32 views into the adapter's parameter block */
    float *gA, *gB;     /* their gradients, same layout, in the gradient block */
} MbLoraPair;

struct MbLora {
    int r;
    double alpha, dropout;
    int use_rslora;
    unsigned targets;   /* bit i: MbLayerWeightId i is adapted */
    float scale;        /* alpha / r, or alpha / sqrt(r) with use_rslora */
    int L;
    MbLoraPair *pairs;  /* (L, MB_LAYER_WEIGHTS); A.data == NULL where not targeted */
    float *params;      /* (n_params) every A and B, fp32 master weights (backend memory) */
    float *grads;       /* (n_params) */
    size_t n_params;
    int enabled;        /* 0: the model is the reference policy (adapters disabled) */
};

/* Activations saved by one decoder layer for its backward. */
typedef struct {
    float *x_in;        /* (N, C) the layer's input: a slot of the residual stream */
    float *xn1, *rstd1; /* (N, C), (N) input_layernorm */
    float *q;           /* (N, H*D) after rope */
    float *k, *v;       /* (N, K*D), k after rope (training: the attention's keys and values) */
    float *att, *lse;   /* (N, H*D) attention output, (B, H, T) its log-sum-exp */
    float *x_mid;       /* (N, C) x_in + o_proj(att) */
    float *xn2, *rstd2; /* (N, C), (N) post_attention_layernorm */
    float *gate, *up;   /* (N, F) */
    float *hid;         /* (N, F) silu(gate) * up */
    float *u[MB_LAYER_WEIGHTS]; /* (N, R) lora_A(x) of each adapted projection */
} MbLayerActs;

/* Every activation buffer of a forward (and backward) over N rows: one block, a pointer table.
 * Inference keeps one layer's activations and two residual slots. Training keeps the residual
 * stream at every layer boundary (L + 1 slots) and either every layer's activations or, with
 * gradient checkpointing, one layer's, recomputed from its input slot during the backward. */
typedef struct {
    size_t N;            /* rows the buffers hold */
    int train, checkpointing, R;
    unsigned lora_targets;
    float *block;
    float **stream;      /* (L + 1) training, (1) inference: slots of (N, C) */
    MbLayerActs *layer;  /* (L) training without checkpointing, else (1) */
    int n_layer_sets;
    float *tmp;          /* (N, C) a projection's output before its residual add */
    float *xf, *rstd_f;  /* (N, C), (N) the final norm */
    float *logits;       /* (N, V) inference logits when backend memory is not host memory */
    float *xg;           /* (N, C) rows of xf that predict a loss token */
    float *logp, *lse_rows, *g_rows; /* (N) per loss row */
    float *dx, *dx_mid, *dxn, *datt, *dq, *dk, *dv, *dgate, *dup, *dhid, *dxg; /* gradients */
} MbActs;

struct MbModel {
    MbConfig cfg;
    MbSafetensors *st;
    MbWeight embed_tokens;  /* (V, C) */
    MbLayer *layers;        /* (L) */
    MbWeight norm;          /* (1, C) */
    MbWeight lm_head;       /* (V, C); a view of embed_tokens when tied */
    float *inv_freq;        /* (D/2) rope frequencies, llama3-scaled */
    MbOps *ops;
    MbActs acts;
    MbLora *lora;           /* attached adapters, or NULL (not owned) */
    int gradient_checkpointing;
    /* the training batch the saved activations belong to (for the backward) */
    const int *train_lens;
    int train_B, train_T;
    const int *train_pos;
    const int32_t *train_target;
    size_t train_M;
};

struct MbKVCache {
    MbModel *m;
    int B, S, len;
    int padded;             /* filled by a right-padded prefill: cannot be continued */
    int *lens;              /* (B) valid keys per sequence */
    float *block;           /* (2, L, B, S, K*D) */
    float **k, **v;         /* (L) pointers into block, each (B, S, K*D) */
};

const MbConfig *mb_model_config(const MbModel *m) { return &m->cfg; }

/* inv_freq as transformers computes it in fp32 (_compute_default_rope_parameters, then
 * _compute_llama3_parameters when rope_type is llama3). */
static void rope_inv_freq(const MbConfig *c, float *inv_freq) {
    int half = c->head_dim / 2;
    for (int j = 0; j < half; j++) {
        float e = (float)(2 * j) / (float)c->head_dim;
        float f = 1.0f / powf((float)c->rope_theta, e);
        if (c->rope_llama3) {
            float factor = (float)c->rope_factor, lo = (float)c->rope_low_freq_factor,
                  hi = (float)c->rope_high_freq_factor, old = (float)c->rope_original_max_position_embeddings;
            float low_wavelen = old / lo, high_wavelen = old / hi;
            float wavelen = (float)(2.0 * M_PI) / f;
            float g = wavelen > low_wavelen ? f / factor : f;
            if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
                float smooth = (old / wavelen - lo) / (hi - lo);
                g = (1.0f - smooth) * g / factor + smooth * g;
            }
            f = g;
        }
        inv_freq[j] = f;
    }
}

static void acts_free(MbModel *m) {
    if (m->acts.block) m->ops->free(m->ops, m->acts.block);
    free(m->acts.stream);
    free(m->acts.layer);
    memset(&m->acts, 0, sizeof m->acts);
}

typedef struct {
    float **ptr;
    size_t count;
} MbBufSpec;

static void buf_spec(MbBufSpec **spec, float **p, size_t n) {
    MbBufSpec s = {p, n};
    arrput(*spec, s);
}

/* Makes the activation block hold N rows for inference (train 0) or training (train 1). */
static void acts_ensure(MbModel *m, size_t N, int train) {
    MbActs *a = &m->acts;
    const MbLora *lo = m->lora;
    int R = lo ? lo->r : 0, ckpt = train && m->gradient_checkpointing;
    unsigned targets = lo ? lo->targets : 0;
    if (a->block && a->N >= N && a->train == train && a->checkpointing == ckpt && a->R == R &&
        a->lora_targets == targets)
        return;
    acts_free(m);
    const MbConfig *c = &m->cfg;
    size_t C = mb_dim(c, MB_DIM_C), QD = mb_dim(c, MB_DIM_QD), KVD = mb_dim(c, MB_DIM_KVD),
           F = mb_dim(c, MB_DIM_F), V = (size_t)c->vocab_size, L = (size_t)c->num_hidden_layers,
           H = (size_t)c->num_attention_heads;
    a->N = N, a->train = train, a->checkpointing = ckpt, a->R = R, a->lora_targets = targets;
    size_t n_stream = train ? L + 1 : 1;
    a->n_layer_sets = train && !ckpt ? (int)L : 1;
    a->stream = mb_calloc(n_stream, sizeof *a->stream);
    a->layer = mb_calloc((size_t)a->n_layer_sets, sizeof *a->layer);
    MbBufSpec *spec = NULL; /* stb_ds array */
#define BUF(p, n) buf_spec(&spec, &(p), (n))
    for (size_t i = 0; i < n_stream; i++) BUF(a->stream[i], N * C);
    for (int i = 0; i < a->n_layer_sets; i++) {
        MbLayerActs *la = &a->layer[i];
        BUF(la->xn1, N * C), BUF(la->rstd1, N), BUF(la->q, N * QD), BUF(la->k, N * KVD);
        BUF(la->v, N * KVD), BUF(la->att, N * QD), BUF(la->lse, N * H), BUF(la->x_mid, N * C);
        BUF(la->xn2, N * C), BUF(la->rstd2, N), BUF(la->gate, N * F), BUF(la->up, N * F);
        BUF(la->hid, N * F);
        for (int w = 0; w < MB_LAYER_WEIGHTS; w++)
            if (targets & (1u << w)) BUF(la->u[w], N * (size_t)R);
    }
    BUF(a->tmp, N * C), BUF(a->xf, N * C), BUF(a->rstd_f, N);
    if (!m->ops->host_memory && !train) BUF(a->logits, N * V);
    if (train) {
        BUF(a->xg, N * C), BUF(a->dxg, N * C), BUF(a->logp, N), BUF(a->lse_rows, N), BUF(a->g_rows, N);
        BUF(a->dx, N * C), BUF(a->dx_mid, N * C), BUF(a->dxn, N * C);
        BUF(a->datt, N * QD), BUF(a->dq, N * QD), BUF(a->dk, N * KVD), BUF(a->dv, N * KVD);
        BUF(a->dgate, N * F), BUF(a->dup, N * F), BUF(a->dhid, N * F);
    }
#undef BUF
    size_t total = 0;
    for (ptrdiff_t i = 0; i < arrlen(spec); i++) total += spec[i].count;
    a->block = m->ops->alloc(m->ops, total);
    size_t off = 0;
    for (ptrdiff_t i = 0; i < arrlen(spec); i++) {
        *spec[i].ptr = mb_act_at(m->ops, a->block, off);
        off += spec[i].count;
    }
    arrfree(spec);
}

void mb_model_free(MbModel *m) {
    if (!m) return;
    if (m->ops) acts_free(m);
    weight_free(&m->embed_tokens);
    if (m->layers)
        for (int l = 0; l < m->cfg.num_hidden_layers; l++)
            for (int i = 0; i < MB_LAYER_WEIGHTS; i++) weight_free(&m->layers[l].w[i]);
    free(m->layers);
    weight_free(&m->norm);
    if (!m->cfg.tie_word_embeddings) weight_free(&m->lm_head);
    free(m->inv_freq);
    mb_safetensors_close(m->st);
    if (m->ops) m->ops->destroy(m->ops);
    free(m);
}

static MbStatus model_weight(MbModel *m, const char *dir, const char *name, size_t rows, size_t cols,
                             MbWeight *w) {
    const MbTensorInfo *t = mb_safetensors_find(m->st, name);
    if (!t)
        return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' is missing from the checkpoint --> does "
                       "config.json match the weights?", dir, name);
    return weight_from_tensor(t, rows, cols, w);
}

MbStatus mb_model_load(const char *dir, const MbLoadOptions *opt, MbModel **out) {
    *out = NULL;
    if (!mb_is_dir(dir))
        return mb_fail(MB_ERR_IO, "%s: no such folder --> pass a Hugging Face model folder "
                       "(config.json + *.safetensors)", dir);
    MbModel *m = mb_calloc(1, sizeof *m);
    char *cfg_path = mb_path_join(dir, "config.json");
    MbStatus rc = mb_config_load(cfg_path, &m->cfg);
    free(cfg_path);
    if (!rc) rc = mb_safetensors_open(dir, &m->st);
    if (rc) {
        mb_model_free(m);
        return rc;
    }
    const MbConfig *c = &m->cfg;
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size;
    char name[256];
    rc = model_weight(m, dir, "model.embed_tokens.weight", V, C, &m->embed_tokens);
    m->layers = mb_calloc((size_t)c->num_hidden_layers, sizeof *m->layers);
    for (int l = 0; !rc && l < c->num_hidden_layers; l++)
        for (int i = 0; !rc && i < MB_LAYER_WEIGHTS; i++) {
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mb_layer_weights[i].name);
            rc = model_weight(m, dir, name, mb_dim(c, mb_layer_weights[i].rows),
                              mb_dim(c, mb_layer_weights[i].cols), &m->layers[l].w[i]);
        }
    if (!rc) rc = model_weight(m, dir, "model.norm.weight", 1, C, &m->norm);
    if (!rc) {
        if (c->tie_word_embeddings) m->lm_head = m->embed_tokens;
        else rc = model_weight(m, dir, "lm_head.weight", V, C, &m->lm_head);
    }
    if (rc) {
        mb_model_free(m);
        return rc;
    }
    m->inv_freq = mb_malloc((size_t)c->head_dim / 2 * sizeof(float));
    rope_inv_freq(c, m->inv_freq);
    m->ops = mb_cpu_ops_new(opt ? opt->threads : 0);
    *out = m;
    return MB_OK;
}

MbStatus mb_kvcache_new(MbModel *m, int B, int S, MbKVCache **out) {
    *out = NULL;
    if (B < 1 || S < 1) return mb_fail(MB_ERR_ARG, "kv cache: batch %d and capacity %d must be >= 1", B, S);
    const MbConfig *c = &m->cfg;
    size_t L = (size_t)c->num_hidden_layers, per = (size_t)B * (size_t)S * mb_dim(c, MB_DIM_KVD);
    MbKVCache *kv = mb_calloc(1, sizeof *kv);
    kv->m = m;
    kv->B = B;
    kv->S = S;
    kv->lens = mb_calloc((size_t)B, sizeof *kv->lens);
    kv->block = m->ops->alloc(m->ops, 2 * L * per);
    kv->k = mb_calloc(L, sizeof *kv->k);
    kv->v = mb_calloc(L, sizeof *kv->v);
    for (size_t l = 0; l < L; l++) {
        kv->k[l] = mb_act_at(m->ops, kv->block, (2 * l) * per);
        kv->v[l] = mb_act_at(m->ops, kv->block, (2 * l + 1) * per);
    }
    *out = kv;
    return MB_OK;
}

void mb_kvcache_free(MbKVCache *kv) {
    if (!kv) return;
    kv->m->ops->free(kv->m->ops, kv->block);
    free(kv->k);
    free(kv->v);
    free(kv->lens);
    free(kv);
}

int mb_kvcache_len(const MbKVCache *kv) { return kv->len; }

void mb_kvcache_reset(MbKVCache *kv) {
    kv->len = 0;
    kv->padded = 0;
}

/* The adapter on projection id of layer l, or NULL (none attached, disabled, not targeted). */
static const MbLoraPair *lora_pair(const MbModel *m, int l, MbLayerWeightId id) {
    const MbLora *lo = m->lora;
    if (!lo || !lo->enabled || !(lo->targets & (1u << id))) return NULL;
    return &lo->pairs[(size_t)l * MB_LAYER_WEIGHTS + id];
}

/* out (N, O) = in (N, I) @ W^T (+ scale * B A in, when adapted) */
static void proj_forward(MbModel *m, int l, MbLayerWeightId id, float *out, const float *in, MbLayerActs *a,
                         size_t N) {
    MbOps *ops = m->ops;
    ops->matmul_forward(ops, out, in, &m->layers[l].w[id], N);
    const MbLoraPair *lp = lora_pair(m, l, id);
    if (lp) ops->lora_forward(ops, out, a->u[id], in, &lp->A, &lp->B, N, m->lora->scale);
}

/* dinp (N, I) (+)= dout @ W (+ the adapter's path), and the adapter's gradients += */
static void proj_backward(MbModel *m, int l, MbLayerWeightId id, float *dinp, const float *dout, const float *in,
                          const MbLayerActs *a, size_t N, int accumulate) {
    MbOps *ops = m->ops;
    ops->matmul_backward(ops, dinp, dout, &m->layers[l].w[id], N, accumulate);
    const MbLoraPair *lp = lora_pair(m, l, id);
    if (lp) ops->lora_backward(ops, dinp, lp->gA, lp->gB, dout, in, a->u[id], &lp->A, &lp->B, N, m->lora->scale);
}

/* One decoder layer over N = B*T rows: a->x_in -> x_out (which may alias x_in). Keys and values
 * go to kc/vc (B, S, K*D) at positions pos0.. (inference, a KV cache), or with kc NULL stay in
 * a->k, a->v as the attention's whole key/value set (training: S = T, pos0 = 0). */
static void layer_forward(MbModel *m, int l, MbLayerActs *a, float *x_out, float *kc, float *vc, int S, int pos0,
                          int B, int T, const int *lens) {
    MbOps *ops = m->ops;
    const MbConfig *c = &m->cfg;
    const MbLayer *ly = &m->layers[l];
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), F = mb_dim(c, MB_DIM_F);
    int H = c->num_attention_heads, K = c->num_key_value_heads, D = c->head_dim;
    float *tmp = m->acts.tmp;

    ops->rmsnorm_forward(ops, a->xn1, a->rstd1, a->x_in, &ly->w[MB_W_INPUT_LAYERNORM], N, c->rms_norm_eps);
    proj_forward(m, l, MB_W_Q_PROJ, a->q, a->xn1, a, N);
    proj_forward(m, l, MB_W_K_PROJ, a->k, a->xn1, a, N);
    proj_forward(m, l, MB_W_V_PROJ, a->v, a->xn1, a, N);
    ops->rope_forward(ops, a->q, m->inv_freq, B, T, pos0, H, D);
    ops->rope_forward(ops, a->k, m->inv_freq, B, T, pos0, K, D);
    if (kc) {
        ops->kv_store(ops, kc, a->k, B, T, S, pos0, K * D);
        ops->kv_store(ops, vc, a->v, B, T, S, pos0, K * D);
    } else {
        kc = a->k, vc = a->v, S = T;
    }
    ops->attention_forward(ops, a->att, a->lse, a->q, kc, vc, lens, B, T, S, pos0, H, K, D);
    proj_forward(m, l, MB_W_O_PROJ, tmp, a->att, a, N);
    ops->add_forward(ops, a->x_mid, a->x_in, tmp, N * C);

    ops->rmsnorm_forward(ops, a->xn2, a->rstd2, a->x_mid, &ly->w[MB_W_POST_ATTENTION_LAYERNORM], N, c->rms_norm_eps);
    proj_forward(m, l, MB_W_GATE_PROJ, a->gate, a->xn2, a, N);
    proj_forward(m, l, MB_W_UP_PROJ, a->up, a->xn2, a, N);
    ops->swiglu_forward(ops, a->hid, a->gate, a->up, N * F);
    proj_forward(m, l, MB_W_DOWN_PROJ, tmp, a->hid, a, N);
    ops->add_forward(ops, x_out, a->x_mid, tmp, N * C);
}

/* The backward of layer_forward (training layout). dx: on entry the gradient of the layer's
 * output, on return the gradient of its input. LoRA gradients +=. */
static void layer_backward(MbModel *m, int l, const MbLayerActs *a, float *dx, int B, int T, const int *lens) {
    MbOps *ops = m->ops;
    MbActs *g = &m->acts;
    const MbConfig *c = &m->cfg;
    const MbLayer *ly = &m->layers[l];
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), F = mb_dim(c, MB_DIM_F);
    int H = c->num_attention_heads, K = c->num_key_value_heads, D = c->head_dim;

    /* x_out = x_mid + down(silu(gate(xn2)) * up(xn2)), xn2 = norm2(x_mid) */
    proj_backward(m, l, MB_W_DOWN_PROJ, g->dhid, dx, a->hid, a, N, 0);
    ops->swiglu_backward(ops, g->dgate, g->dup, g->dhid, a->gate, a->up, N * F);
    proj_backward(m, l, MB_W_GATE_PROJ, g->dxn, g->dgate, a->xn2, a, N, 0);
    proj_backward(m, l, MB_W_UP_PROJ, g->dxn, g->dup, a->xn2, a, N, 1);
    ops->rmsnorm_backward(ops, g->dx_mid, g->dxn, a->x_mid, &ly->w[MB_W_POST_ATTENTION_LAYERNORM], a->rstd2, N, 0);
    ops->add_forward(ops, g->dx_mid, g->dx_mid, dx, N * C);

    /* x_mid = x_in + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = norm1(x_in) */
    proj_backward(m, l, MB_W_O_PROJ, g->datt, g->dx_mid, a->att, a, N, 0);
    ops->attention_backward(ops, g->dq, g->dk, g->dv, g->datt, a->q, a->k, a->v, a->att, a->lse, lens, B, T, H, K, D);
    ops->rope_backward(ops, g->dq, m->inv_freq, B, T, 0, H, D);
    ops->rope_backward(ops, g->dk, m->inv_freq, B, T, 0, K, D);
    proj_backward(m, l, MB_W_Q_PROJ, g->dxn, g->dq, a->xn1, a, N, 0);
    proj_backward(m, l, MB_W_K_PROJ, g->dxn, g->dk, a->xn1, a, N, 1);
    proj_backward(m, l, MB_W_V_PROJ, g->dxn, g->dv, a->xn1, a, N, 1);
    ops->rmsnorm_backward(ops, dx, g->dxn, a->x_in, &ly->w[MB_W_INPUT_LAYERNORM], a->rstd1, N, 0);
    ops->add_forward(ops, dx, dx, g->dx_mid, N * C);
}

static MbStatus check_tokens(const MbConfig *c, const int32_t *tokens, int B, int T, const int *lens) {
    if (B < 1 || T < 1) return mb_fail(MB_ERR_ARG, "forward: batch %d x %d tokens is empty", B, T);
    for (size_t i = 0; i < (size_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return mb_fail(MB_ERR_ARG, "forward: token id %d at position %zu is outside the vocabulary "
                           "[0, %d)", (int)tokens[i], i, c->vocab_size);
    if (lens)
        for (int b = 0; b < B; b++)
            if (lens[b] < 1 || lens[b] > T)
                return mb_fail(MB_ERR_ARG, "forward: sequence %d has length %d, outside [1, %d]", b,
                               lens[b], T);
    return MB_OK;
}

MbStatus mb_model_forward(MbModel *m, MbKVCache *cache, const int32_t *tokens, int B, int T,
                          const int *lens, float *logits, int last_only) {
    const MbConfig *c = &m->cfg;
    MbStatus rc = check_tokens(c, tokens, B, T, lens);
    if (rc) return rc;
    MbKVCache *kv = cache, *tmp_kv = NULL;
    if (!kv) {
        if ((rc = mb_kvcache_new(m, B, T, &tmp_kv))) return rc;
        kv = tmp_kv;
    }
    if (kv->B != B || kv->len + T > kv->S)
        return mb_fail(MB_ERR_ARG, "forward: %d x %d tokens do not fit a kv cache of %d x %d holding %d",
                       B, T, kv->B, kv->S, kv->len); /* cannot happen with tmp_kv */
    if (kv->padded || (lens && kv->len > 0))
        return mb_fail(MB_ERR_ARG, "forward: a right-padded batch can only be a first prefill; "
                       "decode sequences of equal length or one at a time");
    for (int b = 0; b < B; b++) kv->lens[b] = lens ? lens[b] : kv->len + T;

    MbOps *ops = m->ops;
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size;
    acts_ensure(m, N, 0);
    MbActs *a = &m->acts;
    float *x = a->stream[0];
    ops->embedding_forward(ops, x, tokens, &m->embed_tokens, N);
    a->layer[0].x_in = x;
    for (int l = 0; l < c->num_hidden_layers; l++)
        layer_forward(m, l, &a->layer[0], x, kv->k[l], kv->v[l], kv->S, kv->len, B, T, kv->lens);
    if (logits) {
        size_t rows = N;
        if (last_only) { /* the last real position of each sequence */
            int *idx = mb_malloc((size_t)B * sizeof *idx);
            for (int b = 0; b < B; b++) idx[b] = b * T + (lens ? lens[b] : T) - 1;
            ops->gather_rows(ops, a->tmp, x, idx, (size_t)B, C);
            free(idx);
            rows = (size_t)B;
        }
        ops->rmsnorm_forward(ops, a->xf, a->rstd_f, last_only ? a->tmp : x, &m->norm, rows, c->rms_norm_eps);
        float *dst = a->logits ? a->logits : logits;
        ops->matmul_forward(ops, dst, a->xf, &m->lm_head, rows);
        ops->to_host(ops, logits, dst, rows * V);
    }
    kv->len += T;
    for (int b = 0; lens && b < B; b++)
        if (lens[b] < T) kv->padded = 1;
    mb_kvcache_free(tmp_kv);
    return MB_OK;
}

/* The training forward: tokens (B, T) right-padded to lens, positions 0..T-1. For each of the
 * M loss rows, pos[i] = b * T + t is a position whose logits predict target[i] (the token at
 * t + 1); logp[i] = log softmax(logits[pos[i]])[target[i]] and lsum[i] = sum of those logits
 * over the vocabulary go to host memory. With `train` the activations stay for
 * model_backward (the arrays must outlive it); otherwise nothing is kept. */
static MbStatus model_forward_rows(MbModel *m, const int32_t *tokens, const int *lens, int B, int T, const int *pos,
                                   const int32_t *target, size_t M, float *logp, float *lsum, int train) {
    const MbConfig *c = &m->cfg;
    MbStatus rc = check_tokens(c, tokens, B, T, lens);
    if (rc) return rc;
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), L = (size_t)c->num_hidden_layers;
    if (M == 0 || M > N) return mb_fail(MB_ERR_ARG, "forward: %zu loss rows for %zu positions", M, N);
    for (size_t i = 0; i < M; i++)
        if (pos[i] < 0 || (size_t)pos[i] >= N || target[i] < 0 || target[i] >= c->vocab_size)
            return mb_fail(MB_ERR_ARG, "forward: loss row %zu (position %d, target %d) out of range", i, pos[i],
                           (int)target[i]);
    MbOps *ops = m->ops;
    acts_ensure(m, N, 1);
    MbActs *a = &m->acts;
    ops->embedding_forward(ops, a->stream[0], tokens, &m->embed_tokens, N);
    for (size_t l = 0; l < L; l++) {
        MbLayerActs *la = &a->layer[a->n_layer_sets > 1 ? l : 0];
        la->x_in = a->stream[l];
        layer_forward(m, (int)l, la, a->stream[l + 1], NULL, NULL, T, 0, B, T, lens);
    }
    ops->rmsnorm_forward(ops, a->xf, a->rstd_f, a->stream[L], &m->norm, N, c->rms_norm_eps);
    ops->gather_rows(ops, a->xg, a->xf, pos, M, C);
    double *ls = mb_malloc(M * sizeof *ls);
    ops->logprob_forward(ops, a->logp, a->lse_rows, ls, a->xg, &m->lm_head, target, M);
    ops->to_host(ops, logp, a->logp, M);
    for (size_t i = 0; i < M; i++) lsum[i] = (float)ls[i];
    free(ls);
    m->train_lens = lens, m->train_B = B, m->train_T = T;
    m->train_pos = pos, m->train_target = target, m->train_M = train ? M : 0;
    return MB_OK;
}

/* Backpropagates sum_i g[i] * logp[i] of the last training forward into the LoRA gradients
 * (+=). With gradient checkpointing each layer's activations are recomputed from its input. */
static void model_backward_rows(MbModel *m, const float *g) {
    const MbConfig *c = &m->cfg;
    MbOps *ops = m->ops;
    MbActs *a = &m->acts;
    int B = m->train_B, T = m->train_T;
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), L = (size_t)c->num_hidden_layers, M = m->train_M;
    memcpy(a->g_rows, g, M * sizeof(float)); /* host -> backend: the CPU's memory is the host's */
    ops->logprob_backward(ops, a->dxg, a->g_rows, a->xg, &m->lm_head, m->train_target, a->lse_rows, M);
    ops->scatter_rows(ops, a->dxn, a->dxg, m->train_pos, M, N, C);
    ops->rmsnorm_backward(ops, a->dx, a->dxn, a->stream[L], &m->norm, a->rstd_f, N, 0);
    for (size_t l = L; l-- > 0;) {
        MbLayerActs *la = &a->layer[a->n_layer_sets > 1 ? l : 0];
        if (a->n_layer_sets == 1) { /* checkpointing: recompute this layer from its input */
            la->x_in = a->stream[l];
            layer_forward(m, (int)l, la, a->tmp, NULL, NULL, T, 0, B, T, m->train_lens);
        }
        layer_backward(m, (int)l, la, a->dx, B, T, m->train_lens);
    }
}

/* Writes a model folder with random weights (transformers' init: normal(0, std) for linear and
 * embedding weights, ones for norms) for the config at cfg_path. */
MbStatus mb_model_init_random(const char *cfg_path, const char *outdir, uint64_t seed, MbDtype dt,
                                  double std) {
    MbConfig c;
    MbStatus rc = mb_config_load(cfg_path, &c);
    if (rc) return rc;
    if (!mb_is_dir(outdir))
        return mb_fail(MB_ERR_IO, "%s: output folder does not exist", outdir);
    char *text;
    size_t tn;
    if ((rc = mb_read_file(cfg_path, &text, &tn))) return rc;
    char *cfg_out = mb_path_join(outdir, "config.json");
    if (strcmp(cfg_out, cfg_path)) rc = mb_write_file(cfg_out, text, tn);
    free(cfg_out);
    free(text);
    if (rc) return rc;
    MbTensorOut *ts = NULL; /* stb_ds array */
    char **names = NULL;
    MbRng rng;
    mb_rng_seed(&rng, seed);
    size_t C = mb_dim(&c, MB_DIM_C), V = (size_t)c.vocab_size;
    for (int l = -1; l <= c.num_hidden_layers; l++) {
        int nw = (l < 0 || l == c.num_hidden_layers) ? 1 : MB_LAYER_WEIGHTS;
        for (int i = 0; i < nw; i++) {
            char name[256];
            size_t rows, cols;
            if (l < 0) snprintf(name, sizeof name, "model.embed_tokens.weight"), rows = V, cols = C;
            else if (l == c.num_hidden_layers) snprintf(name, sizeof name, "model.norm.weight"), rows = 1, cols = C;
            else {
                snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mb_layer_weights[i].name);
                rows = mb_dim(&c, mb_layer_weights[i].rows), cols = mb_dim(&c, mb_layer_weights[i].cols);
            }
            int is_norm = rows == 1;
            float *f = mb_malloc(rows * cols * sizeof(float));
            for (size_t k = 0; k < rows * cols; k++) f[k] = is_norm ? 1.0f : (float)(std * mb_rng_normal(&rng));
            void *data = mb_malloc(rows * cols * mb_dtype_size(dt));
            mb_convert_from_f32(dt, f, data, rows * cols);
            free(f);
            MbTensorOut t;
            memset(&t, 0, sizeof t);
            t.name = mb_strdup(name);
            t.dtype = dt;
            t.ndim = is_norm ? 1 : 2;
            t.shape[0] = is_norm ? cols : rows;
            t.shape[1] = cols;
            t.data = data;
            arrput(ts, t);
            arrput(names, (char *)t.name);
        }
    }
    if (!c.tie_word_embeddings) {
        MbTensorOut t = ts[0]; /* a separate lm_head drawn from the same distribution */
        float *f = mb_malloc(V * C * sizeof(float));
        for (size_t k = 0; k < V * C; k++) f[k] = (float)(std * mb_rng_normal(&rng));
        void *data = mb_malloc(V * C * mb_dtype_size(dt));
        mb_convert_from_f32(dt, f, data, V * C);
        free(f);
        t.name = mb_strdup("lm_head.weight");
        t.data = data;
        arrput(ts, t);
        arrput(names, (char *)t.name);
    }
    char *st_path = mb_path_join(outdir, "model.safetensors");
    const char *meta[] = {"format", "pt", NULL};
    rc = mb_safetensors_write(st_path, ts, (size_t)arrlen(ts), meta);
    free(st_path);
    for (ptrdiff_t i = 0; i < arrlen(ts); i++) {
        free((void *)ts[i].data);
        free(names[i]);
    }
    arrfree(ts);
    arrfree(names);
    return rc;
}

// ============================================================================================
// ---------- 7. lora ----------  (the DPO issue)
// ---------- 8. data ----------  (the DPO issue)
// ---------- 9. dpo ----------   (the DPO issue)
// ---------- 10. sampler ----------  (the generation issue)
// ---------- 11. coordinator ----------  (the distributed issue)
// ---------- 12. cuda ----------  (the CUDA issue)
// ============================================================================================

// ============================================================================================
// ---------- 13. cli ----------
// medbot COMMAND [options]. Options are --name value (or --name=value), named as in TRL / HF.
// Compiled out with MEDBOT_NO_MAIN (vendoring users and the tests call the library instead).
// ============================================================================================
#ifndef MEDBOT_NO_MAIN

typedef struct {
    int argc;
    char **argv;
    char *used;        /* (argc) which argv entries a command consumed */
    const char *cmd;
} MbArgs;

/* The value of --name, or NULL. A flag given as the last argument or before another option
 * has value "" (see arg_flag). */
static const char *arg_get(MbArgs *a, const char *name) {
    size_t n = strlen(name);
    for (int i = 2; i < a->argc; i++) {
        const char *s = a->argv[i];
        if (s[0] != '-' || s[1] != '-' || strncmp(s + 2, name, n)) continue;
        if (s[2 + n] == '=') {
            a->used[i] = 1;
            return s + 3 + n;
        }
        if (s[2 + n] == 0) {
            a->used[i] = 1;
            if (i + 1 < a->argc && strncmp(a->argv[i + 1], "--", 2)) {
                a->used[i + 1] = 1;
                return a->argv[i + 1];
            }
            return "";
        }
    }
    return NULL;
}

static MbStatus arg_int(MbArgs *a, const char *name, int *out) {
    const char *v = arg_get(a, name);
    if (!v) return MB_OK;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!v[0] || *end || errno || x < INT_MIN || x > INT_MAX)
        return mb_fail(MB_ERR_ARG, "%s: --%s needs an integer, got '%s'", a->cmd, name, v);
    *out = (int)x;
    return MB_OK;
}

static MbStatus arg_double(MbArgs *a, const char *name, double *out) {
    const char *v = arg_get(a, name);
    if (!v) return MB_OK;
    char *end;
    double x = strtod(v, &end);
    if (!v[0] || *end) return mb_fail(MB_ERR_ARG, "%s: --%s needs a number, got '%s'", a->cmd, name, v);
    *out = x;
    return MB_OK;
}

/* The first positional argument (not an option or an option's value), or NULL. Call after
 * every option has been read. */
static const char *arg_positional(MbArgs *a) {
    for (int i = 2; i < a->argc; i++)
        if (!a->used[i] && strncmp(a->argv[i], "--", 2)) {
            a->used[i] = 1;
            return a->argv[i];
        }
    return NULL;
}

static MbStatus args_done(MbArgs *a) {
    for (int i = 2; i < a->argc; i++)
        if (!a->used[i])
            return mb_fail(MB_ERR_ARG, "%s: unknown option or extra argument '%s' --> see medbot %s --help",
                           a->cmd, a->argv[i], a->cmd);
    return MB_OK;
}

static void print_count(const char *what, size_t n, size_t total) {
    printf("  %-22s %14zu  %5.1f%%\n", what, n, total ? 100.0 * (double)n / (double)total : 0.0);
}

static int cmd_info(MbArgs *a) {
    MbStatus rc;
    int threads = 0;
    if ((rc = arg_int(a, "threads", &threads))) goto fail;
    const char *dir = arg_positional(a);
    if (!dir) {
        rc = mb_fail(MB_ERR_ARG, "info: which model? --> medbot info MODEL_DIR");
        goto fail;
    }
    if ((rc = args_done(a))) goto fail;
    MbLoadOptions opt = {1};
    MbModel *m;
    if ((rc = mb_model_load(dir, &opt, &m))) goto fail;
    const MbConfig *c = &m->cfg;
    printf("model %s\n", dir);
    printf("  architecture           Llama: L=%d C=%d H=%d K=%d D=%d F=%d V=%d\n", c->num_hidden_layers,
           c->hidden_size, c->num_attention_heads, c->num_key_value_heads, c->head_dim,
           c->intermediate_size, c->vocab_size);
    printf("  rope                   theta %g", c->rope_theta);
    if (c->rope_llama3)
        printf(", llama3 scaling (factor %g, low_freq_factor %g, high_freq_factor %g, original %d)",
               c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor,
               c->rope_original_max_position_embeddings);
    printf("\n  rms_norm_eps           %g\n", (double)c->rms_norm_eps);
    printf("  max_position_embeddings %d\n", c->max_position_embeddings);
    printf("  tie_word_embeddings    %s\n", c->tie_word_embeddings ? "true" : "false");
    printf("  torch_dtype            %s\n", c->torch_dtype[0] ? c->torch_dtype : "(not given)");
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size, L = (size_t)c->num_hidden_layers;
    size_t attn = 0, mlp = 0, norms = C;
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
        size_t n = mb_dim(c, mb_layer_weights[i].rows) * mb_dim(c, mb_layer_weights[i].cols) * L;
        if (mb_layer_weights[i].rows == MB_DIM_1) norms += n;
        else if (i <= MB_W_O_PROJ) attn += n;
        else mlp += n;
    }
    size_t emb = V * C, head = c->tie_word_embeddings ? 0 : V * C, total = emb + attn + mlp + norms + head;
    printf("parameters\n");
    print_count("embed_tokens", emb, total);
    print_count("attention (q,k,v,o)", attn, total);
    print_count("mlp (gate,up,down)", mlp, total);
    print_count("norms", norms, total);
    print_count(c->tie_word_embeddings ? "lm_head (tied)" : "lm_head", head, total);
    print_count("total", total, total);
    printf("tensors by dtype\n");
    size_t count[MB_DT_COUNT] = {0}, numel[MB_DT_COUNT] = {0}, bytes[MB_DT_COUNT] = {0};
    for (size_t i = 0; i < mb_safetensors_count(m->st); i++) {
        const MbTensorInfo *t = mb_safetensors_at(m->st, i);
        count[t->dtype]++, numel[t->dtype] += t->numel, bytes[t->dtype] += t->nbytes;
    }
    for (int t = 0; t < MB_DT_COUNT; t++)
        if (count[t])
            printf("  %-6s %5zu tensors %14zu values %14zu bytes (%.1f MiB)\n", mb_dtype_name((MbDtype)t),
                   count[t], numel[t], bytes[t], (double)bytes[t] / (1024.0 * 1024.0));
    mb_model_free(m);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    return 1;
}

static int cmd_init(MbArgs *a) {
    MbStatus rc;
    int seed = 0;
    double std = 0.02;
    const char *cfg = arg_get(a, "config"), *out = arg_get(a, "output"), *dts = arg_get(a, "dtype");
    if ((rc = arg_int(a, "seed", &seed)) || (rc = arg_double(a, "std", &std)) || (rc = args_done(a)))
        goto fail;
    if (!cfg || !out || !cfg[0] || !out[0]) {
        rc = mb_fail(MB_ERR_ARG, "init: --config CONFIG_JSON and --output DIR are required");
        goto fail;
    }
    MbDtype dt = MB_DT_BF16;
    if (dts && !strcmp(dts, "f32")) dt = MB_DT_F32;
    else if (dts && !strcmp(dts, "f16")) dt = MB_DT_F16;
    else if (dts && strcmp(dts, "bf16")) {
        rc = mb_fail(MB_ERR_ARG, "init: --dtype must be bf16, f16 or f32, got '%s'", dts);
        goto fail;
    }
    if ((rc = mb_model_init_random(cfg, out, (uint64_t)seed, dt, std))) goto fail;
    printf("wrote %s/model.safetensors (random init, seed %d, %s)\n", out, seed, mb_dtype_name(dt));
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    return 1;
}

static const struct {
    const char *name;
    int (*fn)(MbArgs *);
    const char *usage;
} mb_commands[] = {
    {"info", cmd_info, "info MODEL_DIR\n    config, parameter count by kind, bytes per dtype"},
    {"init", cmd_init, "init --config CONFIG_JSON --output DIR [--seed S] [--dtype bf16|f16|f32] [--std 0.02]\n"
                       "    writes a model folder with random weights (transformers' init) for a config"},
};

static void usage(FILE *f) {
    fprintf(f, "medbot %s: train (LoRA + DPO) and serve a Llama-3.1 medical chatbot\n\nusage: medbot COMMAND [options]\n\n",
            MEDBOT_VERSION);
    for (size_t i = 0; i < sizeof mb_commands / sizeof *mb_commands; i++)
        fprintf(f, "  medbot %s\n", mb_commands[i].usage);
    fprintf(f, "\nmedbot COMMAND --help shows one command.\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("medbot %s\n", MEDBOT_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof mb_commands / sizeof *mb_commands; i++) {
        if (strcmp(argv[1], mb_commands[i].name)) continue;
        for (int k = 2; k < argc; k++)
            if (!strcmp(argv[k], "--help") || !strcmp(argv[k], "-h")) {
                printf("usage: medbot %s\n", mb_commands[i].usage);
                return 0;
            }
        MbArgs a = {argc, argv, mb_calloc((size_t)argc, 1), mb_commands[i].name};
        int rc = mb_commands[i].fn(&a);
        free(a.used);
        return rc;
    }
    fprintf(stderr, "medbot: unknown command '%s' --> medbot --help lists them\n", argv[1]);
    return 2;
}
#endif
