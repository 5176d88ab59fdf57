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
// Llama 3's byte-level BPE, exactly as Hugging Face `tokenizers` (tokenizer.json) and tiktoken
// (Meta's tokenizer.model) compute it. Encoding a text:
//   1. added/special tokens are split out first ("<|eot_id|>" -> 128009), leftmost-longest;
//   2. each stretch between them is cut into valid UTF-8 runs; a byte that is not valid UTF-8
//      is its own piece (its single-byte token). No reference defines this case (both take
//      Unicode strings), so medbot's rule is simply the byte-level one;
//   3. a run is split into pieces by the Llama 3 regex, matched here by hand (pretok_next):
//        (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//        | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//   4. a piece that is itself a vocabulary entry is one token (ignore_merges); otherwise its
//      bytes are merged pairwise, lowest merge rank first, leftmost among equals (bpe_small, bpe_long).
// tiktoken's file has ranks, not merges: the merges are derived from the ranks the way
// transformers' TikTokenConverter wrote tokenizer.json (every split of a token into two
// tokens, ordered by (rank of the result, rank of the left part, rank of the right)), so both
// files give one and the same in-memory tokenizer.
// ============================================================================================

/* ---- Unicode classes of the pre-tokenizer regex ----
 * \p{L}, \p{N} and \s (White_Space) from Unicode 16.0, the version both reference libraries
 * use. A code point has the class of the last entry whose start (entry >> 3) is <= it. */
enum { UNI_OTHER, UNI_L, UNI_N, UNI_S, UNI_NL /* \r or \n: whitespace the regex names */ };

/* BEGIN unicode table: generated by tests/ref/make_unicode_tables.py from Unicode 16.0.0 */
static const uint32_t mb_uni_starts[1613] = {
    0x000000, 0x00004b, 0x000054, 0x00005b, 0x00006c, 0x000070, 0x000103, 0x000108, 0x000182, 0x0001d0,
    0x000209, 0x0002d8, 0x000309, 0x0003d8, 0x00042b, 0x000430, 0x000503, 0x000508, 0x000551, 0x000558,
    0x000592, 0x0005a0, 0x0005a9, 0x0005b0, 0x0005ca, 0x0005d1, 0x0005d8, 0x0005e2, 0x0005f8, 0x000601,
    0x0006b8, 0x0006c1, 0x0007b8, 0x0007c1, 0x001610, 0x001631, 0x001690, 0x001701, 0x001728, 0x001761,
    0x001768, 0x001771, 0x001778, 0x001b81, 0x001ba8, 0x001bb1, 0x001bc0, 0x001bd1, 0x001bf0, 0x001bf9,
    0x001c00, 0x001c31, 0x001c38, 0x001c41, 0x001c58, 0x001c61, 0x001c68, 0x001c71, 0x001d10, 0x001d19,
    0x001fb0, 0x001fb9, 0x002410, 0x002451, 0x002980, 0x002989, 0x002ab8, 0x002ac9, 0x002ad0, 0x002b01,
    0x002c48, 0x002e81, 0x002f58, 0x002f79, 0x002f98, 0x003101, 0x003258, 0x003302, 0x003350, 0x003371,
    0x003380, 0x003389, 0x0036a0, 0x0036a9, 0x0036b0, 0x003729, 0x003738, 0x003771, 0x003782, 0x0037d1,
    0x0037e8, 0x0037f9, 0x003800, 0x003881, 0x003888, 0x003891, 0x003980, 0x003a69, 0x003d30, 0x003d89,
    0x003d90, 0x003e02, 0x003e51, 0x003f58, 0x003fa1, 0x003fb0, 0x003fd1, 0x003fd8, 0x004001, 0x0040b0,
    0x0040d1, 0x0040d8, 0x004121, 0x004128, 0x004141, 0x004148, 0x004201, 0x0042c8, 0x004301, 0x004358,
    0x004381, 0x004440, 0x004449, 0x004478, 0x004501, 0x004650, 0x004821, 0x0049d0, 0x0049e9, 0x0049f0,
    0x004a81, 0x004a88, 0x004ac1, 0x004b10, 0x004b32, 0x004b80, 0x004b89, 0x004c08, 0x004c29, 0x004c68,
    0x004c79, 0x004c88, 0x004c99, 0x004d48, 0x004d51, 0x004d88, 0x004d91, 0x004d98, 0x004db1, 0x004dd0,
    0x004de9, 0x004df0, 0x004e71, 0x004e78, 0x004ee1, 0x004ef0, 0x004ef9, 0x004f10, 0x004f32, 0x004f81,
    0x004f90, 0x004fa2, 0x004fd0, 0x004fe1, 0x004fe8, 0x005029, 0x005058, 0x005079, 0x005088, 0x005099,
    0x005148, 0x005151, 0x005188, 0x005191, 0x0051a0, 0x0051a9, 0x0051b8, 0x0051c1, 0x0051d0, 0x0052c9,
    0x0052e8, 0x0052f1, 0x0052f8, 0x005332, 0x005380, 0x005391, 0x0053a8, 0x005429, 0x005470, 0x005479,
    0x005490, 0x005499, 0x005548, 0x005551, 0x005588, 0x005591, 0x0055a0, 0x0055a9, 0x0055d0, 0x0055e9,
    0x0055f0, 0x005681, 0x005688, 0x005701, 0x005710, 0x005732, 0x005780, 0x0057c9, 0x0057d0, 0x005829,
    0x005868, 0x005879, 0x005888, 0x005899, 0x005948, 0x005951, 0x005988, 0x005991, 0x0059a0, 0x0059a9,
    0x0059d0, 0x0059e9, 0x0059f0, 0x005ae1, 0x005af0, 0x005af9, 0x005b10, 0x005b32, 0x005b80, 0x005b89,
    0x005b92, 0x005bc0, 0x005c19, 0x005c20, 0x005c29, 0x005c58, 0x005c71, 0x005c88, 0x005c91, 0x005cb0,
    0x005cc9, 0x005cd8, 0x005ce1, 0x005ce8, 0x005cf1, 0x005d00, 0x005d19, 0x005d28, 0x005d41, 0x005d58,
    0x005d71, 0x005dd0, 0x005e81, 0x005e88, 0x005f32, 0x005f98, 0x006029, 0x006068, 0x006071, 0x006088,
    0x006091, 0x006148, 0x006151, 0x0061d0, 0x0061e9, 0x0061f0, 0x0062c1, 0x0062d8, 0x0062e9, 0x0062f0,
    0x006301, 0x006310, 0x006332, 0x006380, 0x0063c2, 0x0063f8, 0x006401, 0x006408, 0x006429, 0x006468,
    0x006471, 0x006488, 0x006491, 0x006548, 0x006551, 0x0065a0, 0x0065a9, 0x0065d0, 0x0065e9, 0x0065f0,
    0x0066e9, 0x0066f8, 0x006701, 0x006710, 0x006732, 0x006780, 0x006789, 0x006798, 0x006821, 0x006868,
    0x006871, 0x006888, 0x006891, 0x0069d8, 0x0069e9, 0x0069f0, 0x006a71, 0x006a78, 0x006aa1, 0x006ab8,
    0x006ac2, 0x006af9, 0x006b10, 0x006b32, 0x006bc8, 0x006bd1, 0x006c00, 0x006c29, 0x006cb8, 0x006cd1,
    0x006d90, 0x006d99, 0x006de0, 0x006de9, 0x006df0, 0x006e01, 0x006e38, 0x006f32, 0x006f80, 0x007009,
    0x007188, 0x007191, 0x0071a0, 0x007201, 0x007238, 0x007282, 0x0072d0, 0x007409, 0x007418, 0x007421,
    0x007428, 0x007431, 0x007458, 0x007461, 0x007520, 0x007529, 0x007530, 0x007539, 0x007588, 0x007591,
    0x0075a0, 0x0075e9, 0x0075f0, 0x007601, 0x007628, 0x007631, 0x007638, 0x007682, 0x0076d0, 0x0076e1,
    0x007700, 0x007801, 0x007808, 0x007902, 0x0079a0, 0x007a01, 0x007a40, 0x007a49, 0x007b68, 0x007c41,
    0x007c68, 0x008001, 0x008158, 0x0081f9, 0x008202, 0x008250, 0x008281, 0x0082b0, 0x0082d1, 0x0082f0,
    0x008309, 0x008310, 0x008329, 0x008338, 0x008371, 0x008388, 0x0083a9, 0x008410, 0x008471, 0x008478,
    0x008482, 0x0084d0, 0x008501, 0x008630, 0x008639, 0x008640, 0x008669, 0x008670, 0x008681, 0x0087d8,
    0x0087e1, 0x009248, 0x009251, 0x009270, 0x009281, 0x0092b8, 0x0092c1, 0x0092c8, 0x0092d1, 0x0092f0,
    0x009301, 0x009448, 0x009451, 0x009470, 0x009481, 0x009588, 0x009591, 0x0095b0, 0x0095c1, 0x0095f8,
    0x009601, 0x009608, 0x009611, 0x009630, 0x009641, 0x0096b8, 0x0096c1, 0x009888, 0x009891, 0x0098b0,
    0x0098c1, 0x009ad8, 0x009b4a, 0x009be8, 0x009c01, 0x009c80, 0x009d01, 0x009fb0, 0x009fc1, 0x009ff0,
    0x00a009, 0x00b368, 0x00b379, 0x00b403, 0x00b409, 0x00b4d8, 0x00b501, 0x00b758, 0x00b772, 0x00b789,
    0x00b7c8, 0x00b801, 0x00b890, 0x00b8f9, 0x00b990, 0x00ba01, 0x00ba90, 0x00bb01, 0x00bb68, 0x00bb71,
    0x00bb88, 0x00bc01, 0x00bda0, 0x00beb9, 0x00bec0, 0x00bee1, 0x00bee8, 0x00bf02, 0x00bf50, 0x00bf82,
    0x00bfd0, 0x00c082, 0x00c0d0, 0x00c101, 0x00c3c8, 0x00c401, 0x00c428, 0x00c439, 0x00c548, 0x00c551,
    0x00c558, 0x00c581, 0x00c7b0, 0x00c801, 0x00c8f8, 0x00ca32, 0x00ca81, 0x00cb70, 0x00cb81, 0x00cba8,
    0x00cc01, 0x00cd60, 0x00cd81, 0x00ce50, 0x00ce82, 0x00ced8, 0x00d001, 0x00d0b8, 0x00d101, 0x00d2a8,
    0x00d402, 0x00d450, 0x00d482, 0x00d4d0, 0x00d539, 0x00d540, 0x00d829, 0x00d9a0, 0x00da29, 0x00da68,
    0x00da82, 0x00dad0, 0x00dc19, 0x00dd08, 0x00dd71, 0x00dd82, 0x00ddd1, 0x00df30, 0x00e001, 0x00e120,
    0x00e202, 0x00e250, 0x00e269, 0x00e282, 0x00e2d1, 0x00e3f0, 0x00e401, 0x00e458, 0x00e481, 0x00e5d8,
    0x00e5e9, 0x00e600, 0x00e749, 0x00e768, 0x00e771, 0x00e7a0, 0x00e7a9, 0x00e7b8, 0x00e7d1, 0x00e7d8,
    0x00e801, 0x00ee00, 0x00f001, 0x00f8b0, 0x00f8c1, 0x00f8f0, 0x00f901, 0x00fa30, 0x00fa41, 0x00fa70,
    0x00fa81, 0x00fac0, 0x00fac9, 0x00fad0, 0x00fad9, 0x00fae0, 0x00fae9, 0x00faf0, 0x00faf9, 0x00fbf0,
    0x00fc01, 0x00fda8, 0x00fdb1, 0x00fde8, 0x00fdf1, 0x00fdf8, 0x00fe11, 0x00fe28, 0x00fe31, 0x00fe68,
    0x00fe81, 0x00fea0, 0x00feb1, 0x00fee0, 0x00ff01, 0x00ff68, 0x00ff91, 0x00ffa8, 0x00ffb1, 0x00ffe8,
    0x010003, 0x010058, 0x010143, 0x010150, 0x01017b, 0x010180, 0x0102fb, 0x010300, 0x010382, 0x010389,
    0x010390, 0x0103a2, 0x0103d0, 0x0103f9, 0x010402, 0x010450, 0x010481, 0x0104e8, 0x010811, 0x010818,
    0x010839, 0x010840, 0x010851, 0x0108a0, 0x0108a9, 0x0108b0, 0x0108c9, 0x0108f0, 0x010921, 0x010928,
    0x010931, 0x010938, 0x010941, 0x010948, 0x010951, 0x010970, 0x010979, 0x0109d0, 0x0109e1, 0x010a00,
    0x010a29, 0x010a50, 0x010a71, 0x010a78, 0x010a82, 0x010c19, 0x010c2a, 0x010c50, 0x012302, 0x0124e0,
    0x012752, 0x012800, 0x013bb2, 0x013ca0, 0x016001, 0x016728, 0x016759, 0x016778, 0x016791, 0x0167a0,
    0x0167ea, 0x0167f0, 0x016801, 0x016930, 0x016939, 0x016940, 0x016969, 0x016970, 0x016981, 0x016b40,
    0x016b79, 0x016b80, 0x016c01, 0x016cb8, 0x016d01, 0x016d38, 0x016d41, 0x016d78, 0x016d81, 0x016db8,
    0x016dc1, 0x016df8, 0x016e01, 0x016e38, 0x016e41, 0x016e78, 0x016e81, 0x016eb8, 0x016ec1, 0x016ef8,
    0x017179, 0x017180, 0x018003, 0x018008, 0x018029, 0x01803a, 0x018040, 0x01810a, 0x018150, 0x018189,
    0x0181b0, 0x0181c2, 0x0181d9, 0x0181e8, 0x018209, 0x0184b8, 0x0184e9, 0x018500, 0x018509, 0x0187d8,
    0x0187e1, 0x018800, 0x018829, 0x018980, 0x018989, 0x018c78, 0x018c92, 0x018cb0, 0x018d01, 0x018e00,
    0x018f81, 0x019000, 0x019102, 0x019150, 0x019242, 0x019280, 0x01928a, 0x019300, 0x019402, 0x019450,
    0x01958a, 0x019600, 0x01a001, 0x026e00, 0x027001, 0x052468, 0x052681, 0x0527f0, 0x052801, 0x053068,
    0x053081, 0x053102, 0x053151, 0x053160, 0x053201, 0x053378, 0x0533f9, 0x0534f0, 0x053501, 0x053732,
    0x053780, 0x0538b9, 0x053900, 0x053911, 0x053c48, 0x053c59, 0x053e70, 0x053e81, 0x053e90, 0x053e99,
    0x053ea0, 0x053ea9, 0x053ee8, 0x053f91, 0x054010, 0x054019, 0x054030, 0x054039, 0x054058, 0x054061,
    0x054118, 0x054182, 0x0541b0, 0x054201, 0x0543a0, 0x054411, 0x0545a0, 0x054682, 0x0546d0, 0x054791,
    0x0547c0, 0x0547d9, 0x0547e0, 0x0547e9, 0x0547f8, 0x054802, 0x054851, 0x054930, 0x054981, 0x054a38,
    0x054b01, 0x054be8, 0x054c21, 0x054d98, 0x054e79, 0x054e82, 0x054ed0, 0x054f01, 0x054f28, 0x054f31,
    0x054f82, 0x054fd1, 0x054ff8, 0x055001, 0x055148, 0x055201, 0x055218, 0x055221, 0x055260, 0x055282,
    0x0552d0, 0x055301, 0x0553b8, 0x0553d1, 0x0553d8, 0x0553f1, 0x055580, 0x055589, 0x055590, 0x0555a9,
    0x0555b8, 0x0555c9, 0x0555f0, 0x055601, 0x055608, 0x055611, 0x055618, 0x0556d9, 0x0556f0, 0x055701,
    0x055758, 0x055791, 0x0557a8, 0x055809, 0x055838, 0x055849, 0x055878, 0x055889, 0x0558b8, 0x055901,
    0x055938, 0x055941, 0x055978, 0x055981, 0x055ad8, 0x055ae1, 0x055b50, 0x055b81, 0x055f18, 0x055f82,
    0x055fd0, 0x056001, 0x06bd20, 0x06bd81, 0x06be38, 0x06be59, 0x06bfe0, 0x07c801, 0x07d370, 0x07d381,
    0x07d6d0, 0x07d801, 0x07d838, 0x07d899, 0x07d8c0, 0x07d8e9, 0x07d8f0, 0x07d8f9, 0x07d948, 0x07d951,
    0x07d9b8, 0x07d9c1, 0x07d9e8, 0x07d9f1, 0x07d9f8, 0x07da01, 0x07da10, 0x07da19, 0x07da28, 0x07da31,
    0x07dd90, 0x07de99, 0x07e9f0, 0x07ea81, 0x07ec80, 0x07ec91, 0x07ee40, 0x07ef81, 0x07efe0, 0x07f381,
    0x07f3a8, 0x07f3b1, 0x07f7e8, 0x07f882, 0x07f8d0, 0x07f909, 0x07f9d8, 0x07fa09, 0x07fad8, 0x07fb31,
    0x07fdf8, 0x07fe11, 0x07fe40, 0x07fe51, 0x07fe80, 0x07fe91, 0x07fec0, 0x07fed1, 0x07fee8, 0x080001,
    0x080060, 0x080069, 0x080138, 0x080141, 0x0801d8, 0x0801e1, 0x0801f0, 0x0801f9, 0x080270, 0x080281,
    0x0802f0, 0x080401, 0x0807d8, 0x08083a, 0x0809a0, 0x080a02, 0x080bc8, 0x080c52, 0x080c60, 0x081401,
    0x0814e8, 0x081501, 0x081688, 0x08170a, 0x0817e0, 0x081801, 0x081902, 0x081920, 0x081969, 0x081a0a,
    0x081a11, 0x081a52, 0x081a58, 0x081a81, 0x081bb0, 0x081c01, 0x081cf0, 0x081d01, 0x081e20, 0x081e41,
    0x081e80, 0x081e8a, 0x081eb0, 0x082001, 0x0824f0, 0x082502, 0x082550, 0x082581, 0x0826a0, 0x0826c1,
    0x0827e0, 0x082801, 0x082940, 0x082981, 0x082b20, 0x082b81, 0x082bd8, 0x082be1, 0x082c58, 0x082c61,
    0x082c98, 0x082ca1, 0x082cb0, 0x082cb9, 0x082d10, 0x082d19, 0x082d90, 0x082d99, 0x082dd0, 0x082dd9,
    0x082de8, 0x082e01, 0x082fa0, 0x083001, 0x0839b8, 0x083a01, 0x083ab0, 0x083b01, 0x083b40, 0x083c01,
    0x083c30, 0x083c39, 0x083d88, 0x083d91, 0x083dd8, 0x084001, 0x084030, 0x084041, 0x084048, 0x084051,
    0x0841b0, 0x0841b9, 0x0841c8, 0x0841e1, 0x0841e8, 0x0841f9, 0x0842b0, 0x0842c2, 0x084301, 0x0843b8,
    0x0843ca, 0x084401, 0x0844f8, 0x08453a, 0x084580, 0x084701, 0x084798, 0x0847a1, 0x0847b0, 0x0847da,
    0x084801, 0x0848b2, 0x0848e0, 0x084901, 0x0849d0, 0x084c01, 0x084dc0, 0x084de2, 0x084df1, 0x084e02,
    0x084e80, 0x084e92, 0x085001, 0x085008, 0x085081, 0x0850a0, 0x0850a9, 0x0850c0, 0x0850c9, 0x0851b0,
    0x085202, 0x085248, 0x085301, 0x0853ea, 0x0853f8, 0x085401, 0x0854ea, 0x085500, 0x085601, 0x085640,
    0x085649, 0x085728, 0x08575a, 0x085780, 0x085801, 0x0859b0, 0x085a01, 0x085ab0, 0x085ac2, 0x085b01,
    0x085b98, 0x085bc2, 0x085c01, 0x085c90, 0x085d4a, 0x085d80, 0x086001, 0x086248, 0x086401, 0x086598,
    0x086601, 0x086798, 0x0867d2, 0x086801, 0x086920, 0x086982, 0x0869d0, 0x086a02, 0x086a51, 0x086b30,
    0x086b79, 0x086c30, 0x087302, 0x0873f8, 0x087401, 0x087550, 0x087581, 0x087590, 0x087611, 0x087628,
    0x087801, 0x0878ea, 0x087939, 0x087940, 0x087981, 0x087a30, 0x087a8a, 0x087aa8, 0x087b81, 0x087c10,
    0x087d81, 0x087e2a, 0x087e60, 0x087f01, 0x087fb8, 0x088019, 0x0881c0, 0x088292, 0x088380, 0x088389,
    0x088398, 0x0883a9, 0x0883b0, 0x088419, 0x088580, 0x088681, 0x088748, 0x088782, 0x0887d0, 0x088819,
    0x088938, 0x0889b2, 0x088a00, 0x088a21, 0x088a28, 0x088a39, 0x088a40, 0x088a81, 0x088b98, 0x088bb1,
    0x088bb8, 0x088c19, 0x088d98, 0x088e09, 0x088e28, 0x088e82, 0x088ed1, 0x088ed8, 0x088ee1, 0x088ee8,
    0x088f0a, 0x088fa8, 0x089001, 0x089090, 0x089099, 0x089160, 0x0891f9, 0x089208, 0x089401, 0x089438,
    0x089441, 0x089448, 0x089451, 0x089470, 0x089479, 0x0894f0, 0x0894f9, 0x089548, 0x089581, 0x0896f8,
    0x089782, 0x0897d0, 0x089829, 0x089868, 0x089879, 0x089888, 0x089899, 0x089948, 0x089951, 0x089988,
    0x089991, 0x0899a0, 0x0899a9, 0x0899d0, 0x0899e9, 0x0899f0, 0x089a81, 0x089a88, 0x089ae9, 0x089b10,
    0x089c01, 0x089c50, 0x089c59, 0x089c60, 0x089c71, 0x089c78, 0x089c81, 0x089db0, 0x089db9, 0x089dc0,
    0x089e89, 0x089e90, 0x089e99, 0x089ea0, 0x08a001, 0x08a1a8, 0x08a239, 0x08a258, 0x08a282, 0x08a2d0,
    0x08a2f9, 0x08a310, 0x08a401, 0x08a580, 0x08a621, 0x08a630, 0x08a639, 0x08a640, 0x08a682, 0x08a6d0,
    0x08ac01, 0x08ad78, 0x08aec1, 0x08aee0, 0x08b001, 0x08b180, 0x08b221, 0x08b228, 0x08b282, 0x08b2d0,
    0x08b401, 0x08b558, 0x08b5c1, 0x08b5c8, 0x08b602, 0x08b650, 0x08b682, 0x08b720, 0x08b801, 0x08b8d8,
    0x08b982, 0x08b9e0, 0x08ba01, 0x08ba38, 0x08c001, 0x08c160, 0x08c501, 0x08c702, 0x08c798, 0x08c7f9,
    0x08c838, 0x08c849, 0x08c850, 0x08c861, 0x08c8a0, 0x08c8a9, 0x08c8b8, 0x08c8c1, 0x08c980, 0x08c9f9,
    0x08ca00, 0x08ca09, 0x08ca10, 0x08ca82, 0x08cad0, 0x08cd01, 0x08cd40, 0x08cd51, 0x08ce88, 0x08cf09,
    0x08cf10, 0x08cf19, 0x08cf20, 0x08d001, 0x08d008, 0x08d059, 0x08d198, 0x08d1d1, 0x08d1d8, 0x08d281,
    0x08d288, 0x08d2e1, 0x08d450, 0x08d4e9, 0x08d4f0, 0x08d581, 0x08d7c8, 0x08de01, 0x08df08, 0x08df82,
    0x08dfd0, 0x08e001, 0x08e048, 0x08e051, 0x08e178, 0x08e201, 0x08e208, 0x08e282, 0x08e368, 0x08e391,
    0x08e480, 0x08e801, 0x08e838, 0x08e841, 0x08e850, 0x08e859, 0x08e988, 0x08ea31, 0x08ea38, 0x08ea82,
    0x08ead0, 0x08eb01, 0x08eb30, 0x08eb39, 0x08eb48, 0x08eb51, 0x08ec50, 0x08ecc1, 0x08ecc8, 0x08ed02,
    0x08ed50, 0x08f701, 0x08f798, 0x08f811, 0x08f818, 0x08f821, 0x08f888, 0x08f891, 0x08f9a0, 0x08fa82,
    0x08fad0, 0x08fd81, 0x08fd88, 0x08fe02, 0x08fea8, 0x090001, 0x091cd0, 0x092002, 0x092378, 0x092401,
    0x092a20, 0x097c81, 0x097f88, 0x098001, 0x09a180, 0x09a209, 0x09a238, 0x09a301, 0x0a1fd8, 0x0a2001,
    0x0a3238, 0x0b0801, 0x0b08f0, 0x0b0982, 0x0b09d0, 0x0b4001, 0x0b51c8, 0x0b5201, 0x0b52f8, 0x0b5302,
    0x0b5350, 0x0b5381, 0x0b55f8, 0x0b5602, 0x0b5650, 0x0b5681, 0x0b5770, 0x0b5801, 0x0b5980, 0x0b5a01,
    0x0b5a20, 0x0b5a82, 0x0b5ad0, 0x0b5ada, 0x0b5b10, 0x0b5b19, 0x0b5bc0, 0x0b5be9, 0x0b5c80, 0x0b6a01,
    0x0b6b68, 0x0b6b82, 0x0b6bd0, 0x0b7201, 0x0b7402, 0x0b74b8, 0x0b7801, 0x0b7a58, 0x0b7a81, 0x0b7a88,
    0x0b7c99, 0x0b7d00, 0x0b7f01, 0x0b7f10, 0x0b7f19, 0x0b7f20, 0x0b8001, 0x0c3fc0, 0x0c4001, 0x0c66b0,
    0x0c67f9, 0x0c6848, 0x0d7f81, 0x0d7fa0, 0x0d7fa9, 0x0d7fe0, 0x0d7fe9, 0x0d7ff8, 0x0d8001, 0x0d8918,
    0x0d8991, 0x0d8998, 0x0d8a81, 0x0d8a98, 0x0d8aa9, 0x0d8ab0, 0x0d8b21, 0x0d8b40, 0x0d8b81, 0x0d97e0,
    0x0de001, 0x0de358, 0x0de381, 0x0de3e8, 0x0de401, 0x0de448, 0x0de481, 0x0de4d0, 0x0e6782, 0x0e67d0,
    0x0e9602, 0x0e96a0, 0x0e9702, 0x0e97a0, 0x0e9b02, 0x0e9bc8, 0x0ea001, 0x0ea2a8, 0x0ea2b1, 0x0ea4e8,
    0x0ea4f1, 0x0ea500, 0x0ea511, 0x0ea518, 0x0ea529, 0x0ea538, 0x0ea549, 0x0ea568, 0x0ea571, 0x0ea5d0,
    0x0ea5d9, 0x0ea5e0, 0x0ea5e9, 0x0ea620, 0x0ea629, 0x0ea830, 0x0ea839, 0x0ea858, 0x0ea869, 0x0ea8a8,
    0x0ea8b1, 0x0ea8e8, 0x0ea8f1, 0x0ea9d0, 0x0ea9d9, 0x0ea9f8, 0x0eaa01, 0x0eaa28, 0x0eaa31, 0x0eaa38,
    0x0eaa51, 0x0eaa88, 0x0eaa91, 0x0eb530, 0x0eb541, 0x0eb608, 0x0eb611, 0x0eb6d8, 0x0eb6e1, 0x0eb7d8,
    0x0eb7e1, 0x0eb8a8, 0x0eb8b1, 0x0eb9a8, 0x0eb9b1, 0x0eba78, 0x0eba81, 0x0ebb78, 0x0ebb81, 0x0ebc48,
    0x0ebc51, 0x0ebd48, 0x0ebd51, 0x0ebe18, 0x0ebe21, 0x0ebe60, 0x0ebe72, 0x0ec000, 0x0ef801, 0x0ef8f8,
    0x0ef929, 0x0ef958, 0x0f0181, 0x0f0370, 0x0f0801, 0x0f0968, 0x0f09b9, 0x0f09f0, 0x0f0a02, 0x0f0a50,
    0x0f0a71, 0x0f0a78, 0x0f1481, 0x0f1570, 0x0f1601, 0x0f1760, 0x0f1782, 0x0f17d0, 0x0f2681, 0x0f2760,
    0x0f2782, 0x0f27d0, 0x0f2e81, 0x0f2f70, 0x0f2f81, 0x0f2f8a, 0x0f2fd8, 0x0f3f01, 0x0f3f38, 0x0f3f41,
    0x0f3f60, 0x0f3f69, 0x0f3f78, 0x0f3f81, 0x0f3ff8, 0x0f4001, 0x0f4628, 0x0f463a, 0x0f4680, 0x0f4801,
    0x0f4a20, 0x0f4a59, 0x0f4a60, 0x0f4a82, 0x0f4ad0, 0x0f638a, 0x0f6560, 0x0f656a, 0x0f6580, 0x0f658a,
    0x0f65a8, 0x0f680a, 0x0f6970, 0x0f697a, 0x0f69f0, 0x0f7001, 0x0f7020, 0x0f7029, 0x0f7100, 0x0f7109,
    0x0f7118, 0x0f7121, 0x0f7128, 0x0f7139, 0x0f7140, 0x0f7149, 0x0f7198, 0x0f71a1, 0x0f71c0, 0x0f71c9,
    0x0f71d0, 0x0f71d9, 0x0f71e0, 0x0f7211, 0x0f7218, 0x0f7239, 0x0f7240, 0x0f7249, 0x0f7250, 0x0f7259,
    0x0f7260, 0x0f7269, 0x0f7280, 0x0f7289, 0x0f7298, 0x0f72a1, 0x0f72a8, 0x0f72b9, 0x0f72c0, 0x0f72c9,
    0x0f72d0, 0x0f72d9, 0x0f72e0, 0x0f72e9, 0x0f72f0, 0x0f72f9, 0x0f7300, 0x0f7309, 0x0f7318, 0x0f7321,
    0x0f7328, 0x0f7339, 0x0f7358, 0x0f7361, 0x0f7398, 0x0f73a1, 0x0f73c0, 0x0f73c9, 0x0f73e8, 0x0f73f1,
    0x0f73f8, 0x0f7401, 0x0f7450, 0x0f7459, 0x0f74e0, 0x0f7509, 0x0f7520, 0x0f7529, 0x0f7550, 0x0f7559,
    0x0f75e0, 0x0f8802, 0x0f8868, 0x0fdf82, 0x0fdfd0, 0x100001, 0x153700, 0x153801, 0x15b9d0, 0x15ba01,
    0x15c0f0, 0x15c101, 0x167510, 0x167581, 0x175f08, 0x175f81, 0x1772f0, 0x17c001, 0x17d0f0, 0x180001,
    0x189a58, 0x189a81, 0x191d80,
};
static const uint8_t mb_uni_ascii[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 4, 3, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
    0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0,
};
/* END unicode table */

static int uni_class(uint32_t cp) {
    if (cp < 128) return mb_uni_ascii[cp];
    size_t lo = 0, hi = sizeof mb_uni_starts / sizeof *mb_uni_starts; /* entry 0 starts at 0 */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((mb_uni_starts[mid] >> 3) <= cp) lo = mid;
        else hi = mid;
    }
    return (int)(mb_uni_starts[lo] & 7);
}

/* The class of the character at s[i] (valid UTF-8) and its length. */
static int uni_at(const unsigned char *s, size_t i, size_t *len) {
    unsigned c = s[i];
    if (c < 0x80) {
        *len = 1;
        return mb_uni_ascii[c];
    }
    uint32_t cp;
    if (c < 0xE0) *len = 2, cp = ((c & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
    else if (c < 0xF0) *len = 3, cp = ((c & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
    else
        *len = 4, cp = ((c & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) |
                       (s[i + 3] & 0x3Fu);
    return uni_class(cp);
}

/* End of the run of characters of class k that starts at i. */
static size_t uni_skip(const unsigned char *s, size_t n, size_t i, int k) {
    size_t len;
    while (i < n && uni_at(s, i, &len) == k) i += len;
    return i;
}

static int ascii_lower(int c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* Length of a contraction (?i:'s|'t|'re|'ve|'m|'ll|'d) at s[i], or 0. Case folding as both
 * regex engines do it: 's' also matches U+017F LATIN SMALL LETTER LONG S. */
static size_t pretok_contraction(const unsigned char *s, size_t n, size_t i) {
    if (s[i] != '\'' || i + 1 >= n) return 0;
    int a = ascii_lower(s[i + 1]), b = i + 2 < n ? ascii_lower(s[i + 2]) : 0;
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    if (s[i + 1] == 0xC5 && i + 2 < n && s[i + 2] == 0xBF) return 3; /* 'ſ */
    return 0;
}

/* The end of the regex piece that starts at s[i], in the valid UTF-8 text s[0..n). The
 * alternatives are tried in the regex's order; each comment is the alternative it decides. */
static size_t pretok_next(const unsigned char *s, size_t n, size_t i) {
    size_t len0, len1 = 0, k;
    int c0 = uni_at(s, i, &len0), c1 = i + len0 < n ? uni_at(s, i + len0, &len1) : -1;
    if ((k = pretok_contraction(s, n, i))) return i + k;                 /* (?i:'s|...) */
    if (c0 == UNI_L) return uni_skip(s, n, i, UNI_L);                /* \p{L}+ */
    if ((c0 == UNI_OTHER || c0 == UNI_S) && c1 == UNI_L)                 /* [^\r\n\p{L}\p{N}]\p{L}+ */
        return uni_skip(s, n, i + len0, UNI_L);
    if (c0 == UNI_N) {                                                   /* \p{N}{1,3} */
        size_t j = i + len0, len;
        for (int m = 1; m < 3 && j < n && uni_at(s, j, &len) == UNI_N; m++) j += len;
        return j;
    }
    if (c0 == UNI_OTHER || (s[i] == ' ' && c1 == UNI_OTHER)) {          /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
        size_t j = uni_skip(s, n, c0 == UNI_OTHER ? i : i + 1, UNI_OTHER);
        return uni_skip(s, n, j, UNI_NL);
    }
    /* whitespace: find the run [i, j), its last \r or \n, and its last character */
    size_t j = i, last_nl = 0, last = i, len;
    int has_nl = 0;
    while (j < n) {
        int c = uni_at(s, j, &len);
        if (c != UNI_S && c != UNI_NL) break;
        if (c == UNI_NL) has_nl = 1, last_nl = j;
        last = j;
        j += len;
    }
    if (has_nl) return last_nl + 1;                                      /* \s*[\r\n]+ */
    if (j < n && last > i) return last;                                  /* \s+(?!\S) */
    return j;                                                            /* \s+(?!\S) at the end, \s+ */
}

/* ---- the tokenizer ---- */

/* stb_ds passes hash-map keys by address; its trick for rvalue keys needs `typeof`, which gcc
 * lacks under -std=c99, so keys here are always lvalues and the plain form is used.
 * (This belongs with the stb_ds include in the platform section.) */
#undef STBDS_ADDRESSOF
#define STBDS_ADDRESSOF(typevar, value) &(value)

#define MB_TOK_MAX_VOCAB (1 << 24) /* ids beyond this are refused (files are not trusted) */
#define MB_TOK_BPE 1               /* flags per id: a vocabulary entry BPE can produce */
#define MB_TOK_ADDED 2             /* split out of the text before pre-tokenization */
#define MB_TOK_SPECIAL 4           /* dropped by skip_special_tokens */
#define MB_NO_MERGE UINT32_MAX

typedef struct {
    uint64_t key;   /* tok_hash of the token's bytes */
    int32_t value;  /* its id */
} MbTokByHash;

typedef struct {
    uint32_t rank;  /* priority: lower merges first */
    int32_t id;     /* the merged token */
} MbMerge;

typedef struct {
    uint64_t key;   /* left id << 32 | right id */
    MbMerge value;
} MbMergeMap;

struct MbTokenizer {
    char *path;
    size_t n_vocab;            /* V */
    unsigned char *bytes;      /* stb_ds: every token's bytes, back to back */
    uint32_t *off, *len;       /* (V) where token id's bytes are in `bytes` */
    uint8_t *flags;            /* (V) MB_TOK_*; 0: no token has this id */
    MbTokByHash *vocab;        /* stb_ds hash map: the BPE vocabulary by bytes */
    MbTokByHash *added;        /* stb_ds hash map: added tokens by bytes */
    MbMergeMap *merges;        /* stb_ds hash map */
    MbMerge *byte_merges;      /* (256 * 256) the merge of two single-byte tokens: BPE's first lookups */
    uint64_t seed;             /* of tok_hash, chosen so that no two tokens share a hash */
    int32_t byte_id[256];      /* the token of each single byte */
    uint8_t added_first[256];  /* bytes that begin an added token */
    size_t *added_lens;        /* stb_ds: the distinct lengths of added tokens, longest first */
    int ignore_merges;         /* a piece that is a vocabulary entry is not merged */
    int32_t *prefix, *suffix;  /* stb_ds: the template around a text (Llama 3: prefix <|begin_of_text|>) */
    int32_t bos_id, eos_id;
};

/* A 64-bit hash of a token's bytes, bits 31 and 63 clear: stb_ds hashes 8-byte keys with
 * `d[3] << 24` on an int, undefined for a byte >= 0x80 there (UBSan stops on it). Merge keys
 * (two ids < 2^24) have those bits clear too. */
static uint64_t tok_hash(const unsigned char *s, size_t n, uint64_t seed) {
    uint64_t h = seed ^ ((uint64_t)n * 0x9E3779B97F4A7C15ull), w;
    for (; n >= 8; s += 8, n -= 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xBF58476D1CE4E5B9ull;
        h ^= h >> 31;
    }
    w = 0;
    memcpy(&w, s, n);
    h = (h ^ w) * 0x94D049BB133111EBull;
    return (h ^ (h >> 29)) & 0x7FFFFFFF7FFFFFFFull;
}

/* The id whose bytes are s[0..n) in a map built by tok_index, or -1. */
static int32_t tok_find(const MbTokenizer *t, const MbTokByHash *map, const unsigned char *s, size_t n) {
    MbTokByHash *m = (MbTokByHash *)map; /* the _ts lookup reads only: safe from many threads */
    if (!m) return -1;                   /* (on an empty map it would allocate) */
    uint64_t key = tok_hash(s, n, t->seed);
    ptrdiff_t tmp, i = hmgeti_ts(m, key, tmp);
    if (i < 0) return -1;
    int32_t id = m[i].value;
    return t->len[id] == n && !memcmp(t->bytes + t->off[id], s, n) ? id : -1;
}

static MbMerge tok_merge(const MbTokenizer *t, int32_t a, int32_t b) {
    MbMergeMap *m = t->merges;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    MbMerge none = {MB_NO_MERGE, -1};
    ptrdiff_t tmp, i = m ? hmgeti_ts(m, key, tmp) : -1;
    return i < 0 ? none : m[i].value;
}

void mb_tokenizer_free(MbTokenizer *t) {
    if (!t) return;
    free(t->path);
    arrfree(t->bytes);
    free(t->off);
    free(t->len);
    free(t->flags);
    hmfree(t->vocab);
    hmfree(t->added);
    hmfree(t->merges);
    free(t->byte_merges);
    arrfree(t->added_lens);
    arrfree(t->prefix);
    arrfree(t->suffix);
    free(t);
}

/* ---- building: shared by both file formats ---- */

/* GPT-2's byte <-> printable character mapping used by tokenizer.json: bytes '!'..'~',
 * 0xA1..0xAC and 0xAE..0xFF stand for themselves, the other 68 bytes for U+0100.. in order. */
static void bytelevel_table(uint32_t cp_of_byte[256]) {
    uint32_t next = 256;
    for (int b = 0; b < 256; b++)
        cp_of_byte[b] = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE ? (uint32_t)b : next++;
}

/* Decodes a byte-level string (UTF-8 of mapped characters) to bytes appended to *out; 0 if a
 * character is not one of the 256. */
static int bytelevel_decode(const int16_t byte_of_cp[324], const char *s, size_t n, unsigned char **out) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (u[i] < 0x80) cp = u[i++];
        else if ((u[i] & 0xE0) == 0xC0 && i + 1 < n) cp = ((u[i] & 0x1Fu) << 6) | (u[i + 1] & 0x3Fu), i += 2;
        else return 0;
        if (cp >= 324 || byte_of_cp[cp] < 0) return 0;
        arrput(*out, (unsigned char)byte_of_cp[cp]);
    }
    return 1;
}

/* Sets token id's bytes (a copy of s[0..n)) and flags; fails on an id given twice. */
static MbStatus tok_set(MbTokenizer *t, int32_t id, const unsigned char *s, size_t n, uint8_t flags, const char *what) {
    if (t->flags[id])
        return mb_fail(MB_ERR_FORMAT, "%s: %s %d is given twice", t->path, what, (int)id);
    if (n == 0) return mb_fail(MB_ERR_FORMAT, "%s: %s %d is an empty token", t->path, what, (int)id);
    if ((size_t)arrlen(t->bytes) + n > UINT32_MAX)
        return mb_fail(MB_ERR_FORMAT, "%s: the tokens hold over 4 GiB of bytes", t->path);
    t->off[id] = (uint32_t)arrlen(t->bytes);
    t->len[id] = (uint32_t)n;
    t->flags[id] = flags;
    memcpy(arraddnptr(t->bytes, n), s, n);
    return MB_OK;
}

static MbStatus tok_alloc(MbTokenizer *t, size_t n_vocab) {
    if (n_vocab == 0 || n_vocab > MB_TOK_MAX_VOCAB)
        return mb_fail(MB_ERR_FORMAT, "%s: vocabulary of %zu ids (medbot accepts 1..%d)", t->path, n_vocab,
                       MB_TOK_MAX_VOCAB);
    t->n_vocab = n_vocab;
    t->off = mb_calloc(n_vocab, sizeof *t->off);
    t->len = mb_calloc(n_vocab, sizeof *t->len);
    t->flags = mb_calloc(n_vocab, 1);
    return MB_OK;
}

/* Hash maps of the vocabulary and of the added tokens by bytes. The hash seed is changed until
 * no two tokens share a hash, so a lookup needs one probe and one memcmp. A token whose bytes
 * another token already has is an error. */
static MbStatus tok_index(MbTokenizer *t) {
    for (t->seed = 0x6d6564626f74ull;; t->seed++) {
        hmfree(t->vocab);
        hmfree(t->added);
        int collided = 0;
        for (size_t id = 0; id < t->n_vocab && !collided; id++) {
            for (int which = 0; which < 2; which++) {
                if (!(t->flags[id] & (which ? MB_TOK_ADDED : MB_TOK_BPE))) continue;
                MbTokByHash **map = which ? &t->added : &t->vocab;
                const unsigned char *s = t->bytes + t->off[id];
                uint64_t h = tok_hash(s, t->len[id], t->seed);
                ptrdiff_t i = hmgeti(*map, h);
                if (i >= 0) {
                    int32_t other = (*map)[i].value;
                    if (t->len[other] == t->len[id] && !memcmp(t->bytes + t->off[other], s, t->len[id]))
                        return mb_fail(MB_ERR_FORMAT, "%s: ids %d and %zu are the same token", t->path,
                                       (int)other, id);
                    collided = 1;
                    break;
                }
                int32_t v = (int32_t)id;
                hmput(*map, h, v);
            }
        }
        if (!collided) return MB_OK;
    }
}

/* Everything that follows from the token table: the byte tokens, the added-token scanner's
 * tables, BOS and EOS. */
static MbStatus tok_finish(MbTokenizer *t) {
    MbStatus st = tok_index(t);
    if (st) return st;
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        if ((t->byte_id[b] = tok_find(t, t->vocab, &c, 1)) < 0)
            return mb_fail(MB_ERR_FORMAT, "%s: no token for the byte 0x%02x --> not a byte-level BPE vocabulary",
                           t->path, b);
    }
    for (size_t id = 0; id < t->n_vocab; id++) {
        if (!(t->flags[id] & MB_TOK_ADDED)) continue;
        size_t n = t->len[id], k = 0;
        t->added_first[t->bytes[t->off[id]]] = 1;
        while (k < (size_t)arrlen(t->added_lens) && t->added_lens[k] > n) k++;
        if (k == (size_t)arrlen(t->added_lens) || t->added_lens[k] != n) arrins(t->added_lens, k, n);
    }
    t->bos_id = arrlen(t->prefix) ? t->prefix[0] : mb_tokenizer_token_id(t, "<|begin_of_text|>");
    t->eos_id = mb_tokenizer_token_id(t, "<|end_of_text|>");
    return MB_OK;
}

/* The merges of two single bytes as a table: every piece BPE merges starts with those pairs. */
static void tok_byte_merges(MbTokenizer *t) {
    t->byte_merges = mb_malloc(256 * 256 * sizeof *t->byte_merges);
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++) t->byte_merges[a * 256 + b] = tok_merge(t, t->byte_id[a], t->byte_id[b]);
}

/* ---- tokenizer.json (Hugging Face) ---- */

static const char mb_llama3_pattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

static int json_is(const MbJsonDoc *d, const MbJson *v, const char *s) {
    return v && v->kind == MB_JSON_STRING && !strcmp(json_str(d, v), s);
}

/* absent, null, false, "" or 0: a feature that is off */
static int json_off(const MbJson *v) {
    return !v || v->kind == MB_JSON_NULL || (v->kind == MB_JSON_BOOL && !v->boolean) ||
           (v->kind == MB_JSON_STRING && v->len == 0);
}

static int json_id(const MbJson *v, int32_t *id) {
    if (!v || v->kind != MB_JSON_NUMBER || !v->is_int || v->i < 0 || v->i >= MB_TOK_MAX_VOCAB) return 0;
    *id = (int32_t)v->i;
    return 1;
}

/* What medbot implements of a tokenizer.json: no normalizer, the Llama 3 Split regex then
 * ByteLevel without a prefix space, a ByteLevel decoder, a BPE model without dropout or affixes. */
static MbStatus tokjson_check_pipeline(MbTokenizer *t, const MbJsonDoc *d, const MbJson *root) {
    const MbJson *norm = json_get(d, root, "normalizer"), *pre = json_get(d, root, "pre_tokenizer");
    const MbJson *dec = json_get(d, root, "decoder"), *model = json_get(d, root, "model");
    if (!model || model->kind != MB_JSON_OBJECT)
        return mb_fail(MB_ERR_FORMAT, "%s: no \"model\" object --> not a Hugging Face tokenizer.json", t->path);
    if (norm && norm->kind != MB_JSON_NULL)
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: a normalizer is set; medbot implements Llama 3's pipeline, which has none",
                       t->path);
    const MbJson *split = NULL, *bl = NULL;
    if (pre && json_is(d, json_get(d, pre, "type"), "Sequence")) {
        const MbJson *list = json_get(d, pre, "pretokenizers");
        if (list && list->kind == MB_JSON_ARRAY && list->count == 2) {
            split = json_first(d, list);
            bl = json_next(d, split);
        }
    }
    const MbJson *pattern = json_get(d, json_get(d, split, "pattern"), "Regex");
    if (!json_is(d, json_get(d, split, "type"), "Split") || !json_is(d, pattern, mb_llama3_pattern) ||
        !json_is(d, json_get(d, split, "behavior"), "Isolated") || !json_off(json_get(d, split, "invert")) ||
        !json_is(d, json_get(d, bl, "type"), "ByteLevel") || !json_off(json_get(d, bl, "add_prefix_space")) ||
        !json_off(json_get(d, bl, "use_regex")))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: pre_tokenizer is not Llama 3's (Split on the Llama 3 regex, then "
                       "ByteLevel without prefix space)", t->path);
    if (!json_is(d, json_get(d, dec, "type"), "ByteLevel"))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: decoder is not ByteLevel", t->path);
    const MbJson *type = json_get(d, model, "type");
    if ((type && !json_is(d, type, "BPE")) || !json_off(json_get(d, model, "dropout")) ||
        !json_off(json_get(d, model, "continuing_subword_prefix")) ||
        !json_off(json_get(d, model, "end_of_word_suffix")))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: model is not a plain BPE (type BPE, no dropout, no subword affixes)",
                       t->path);
    const MbJson *im = json_get(d, model, "ignore_merges");
    if (im && im->kind != MB_JSON_BOOL) return mb_fail(MB_ERR_FORMAT, "%s: model.ignore_merges is not a boolean", t->path);
    t->ignore_merges = im && im->boolean;
    return MB_OK;
}

/* The post-processor's template for one sequence: special tokens before and after "A".
 * Only TemplateProcessing changes ids (a ByteLevel processor only adjusts offsets). */
static MbStatus tokjson_template(MbTokenizer *t, const MbJsonDoc *d, const MbJson *pp) {
    if (!pp || pp->kind == MB_JSON_NULL) return MB_OK;
    const MbJson *list = json_is(d, json_get(d, pp, "type"), "Sequence") ? json_get(d, pp, "processors") : NULL;
    const MbJson *tp = NULL;
    for (const MbJson *p = list ? json_first(d, list) : pp; p; p = list ? json_next(d, p) : NULL) {
        if (json_is(d, json_get(d, p, "type"), "TemplateProcessing")) tp = p;
        else if (!json_is(d, json_get(d, p, "type"), "ByteLevel"))
            return mb_fail(MB_ERR_UNSUPPORTED, "%s: post_processor: medbot reads only TemplateProcessing and ByteLevel",
                           t->path);
    }
    if (!tp) return MB_OK;
    const MbJson *single = json_get(d, tp, "single"), *specials = json_get(d, tp, "special_tokens");
    if (!single || single->kind != MB_JSON_ARRAY)
        return mb_fail(MB_ERR_FORMAT, "%s: post_processor: TemplateProcessing has no \"single\" list", t->path);
    int seen_a = 0;
    for (const MbJson *e = json_first(d, single); e; e = json_next(d, e)) {
        if (json_get(d, e, "Sequence") && !seen_a) {
            seen_a = 1;
            continue;
        }
        const MbJson *name = json_get(d, json_get(d, e, "SpecialToken"), "id"), *ids = NULL;
        if (name && name->kind == MB_JSON_STRING) ids = json_get(d, json_get(d, specials, json_str(d, name)), "ids");
        if (!ids || ids->kind != MB_JSON_ARRAY)
            return mb_fail(MB_ERR_FORMAT, "%s: post_processor.single: an entry is not a known SpecialToken", t->path);
        for (const MbJson *v = json_first(d, ids); v; v = json_next(d, v)) {
            int32_t id;
            if (!json_id(v, &id) || (size_t)id >= t->n_vocab || !t->flags[id])
                return mb_fail(MB_ERR_FORMAT, "%s: post_processor: a template token id is not in the vocabulary", t->path);
            if (seen_a) arrput(t->suffix, id);
            else arrput(t->prefix, id);
        }
    }
    if (!seen_a) return mb_fail(MB_ERR_FORMAT, "%s: post_processor.single has no Sequence", t->path);
    return MB_OK;
}

/* Merges "a b" (or ["a", "b"]) in rank order; each part and their concatenation must be in
 * the vocabulary (as in tokenizers). A pair listed twice keeps its later rank, as in tokenizers. */
static MbStatus tokjson_merges(MbTokenizer *t, const MbJsonDoc *d, const MbJson *merges, const int16_t *byte_of_cp) {
    unsigned char *buf = NULL;
    MbStatus st = MB_OK;
    uint32_t rank = 0;
    for (const MbJson *m = json_first(d, merges); m; m = json_next(d, m), rank++) {
        const char *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        if (m->kind == MB_JSON_STRING) {
            a = json_str(d, m);
            const char *sp = memchr(a, ' ', m->len);
            if (sp && !memchr(sp + 1, ' ', m->len - (size_t)(sp + 1 - a)))
                na = (size_t)(sp - a), b = sp + 1, nb = m->len - na - 1;
        } else if (m->kind == MB_JSON_ARRAY && m->count == 2) {
            const MbJson *x = json_first(d, m), *y = json_next(d, x);
            if (x->kind == MB_JSON_STRING && y->kind == MB_JSON_STRING)
                a = json_str(d, x), na = x->len, b = json_str(d, y), nb = y->len;
        }
        if (!b || !na || !nb) {
            st = mb_fail(MB_ERR_FORMAT, "%s: model.merges[%u] is not \"a b\" or [\"a\", \"b\"]", t->path, rank);
            break;
        }
        int32_t ida, idb, idab;
        arrsetlen(buf, 0);
        int ok = bytelevel_decode(byte_of_cp, a, na, &buf);
        size_t la = (size_t)arrlen(buf);
        ok = ok && bytelevel_decode(byte_of_cp, b, nb, &buf);
        if (!ok || (ida = tok_find(t, t->vocab, buf, la)) < 0 ||
            (idb = tok_find(t, t->vocab, buf + la, (size_t)arrlen(buf) - la)) < 0) {
            st = mb_fail(MB_ERR_FORMAT, "%s: model.merges[%u] (\"%.*s %.*s\") names a token that is not in model.vocab",
                         t->path, rank, (int)MB_MIN(na, 64), a, (int)MB_MIN(nb, 64), b);
            break;
        }
        if ((idab = tok_find(t, t->vocab, buf, (size_t)arrlen(buf))) < 0) {
            st = mb_fail(MB_ERR_FORMAT, "%s: model.merges[%u] (\"%.*s %.*s\") makes a token that is not in model.vocab",
                         t->path, rank, (int)MB_MIN(na, 64), a, (int)MB_MIN(nb, 64), b);
            break;
        }
        MbMerge mg = {rank, idab};
        uint64_t key = (uint64_t)(uint32_t)ida << 32 | (uint32_t)idb;
        hmput(t->merges, key, mg);
    }
    arrfree(buf);
    return st;
}

static MbStatus tok_from_json(MbTokenizer *t, const char *text, size_t n) {
    MbJsonDoc doc;
    MbStatus st = json_parse(t->path, text, n, &doc);
    if (st) return st;
    const MbJsonDoc *d = &doc;
    const MbJson *root = json_root(d), *model, *vocab, *merges, *added = json_get(d, root, "added_tokens");
    unsigned char *buf = NULL;
    uint32_t cp_of_byte[256];
    int16_t byte_of_cp[324];
    bytelevel_table(cp_of_byte);
    for (int i = 0; i < 324; i++) byte_of_cp[i] = -1;
    for (int b = 0; b < 256; b++) byte_of_cp[cp_of_byte[b]] = (int16_t)b;

    if ((st = tokjson_check_pipeline(t, d, root))) goto done;
    model = json_get(d, root, "model");
    vocab = json_get(d, model, "vocab");
    merges = json_get(d, model, "merges");
    if (!vocab || vocab->kind != MB_JSON_OBJECT || !merges || merges->kind != MB_JSON_ARRAY ||
        (added && added->kind != MB_JSON_ARRAY && added->kind != MB_JSON_NULL)) {
        st = mb_fail(MB_ERR_FORMAT, "%s: needs model.vocab (object), model.merges (array) and added_tokens (array)",
                     t->path);
        goto done;
    }
    /* V: the largest id + 1 */
    int32_t id = 0, max_id = -1;
    for (const MbJson *v = json_first(d, vocab); v; v = json_next(d, v)) {
        if (!json_id(v, &id)) {
            st = mb_fail(MB_ERR_FORMAT, "%s: model.vocab[\"%.64s\"] is not an id (an integer 0..%d)", t->path,
                         json_key(d, v), MB_TOK_MAX_VOCAB - 1);
            goto done;
        }
        max_id = MB_MAX(max_id, id);
    }
    for (const MbJson *a = added ? json_first(d, added) : NULL; a; a = json_next(d, a)) {
        const MbJson *content = json_get(d, a, "content");
        if (!json_id(json_get(d, a, "id"), &id) || !content || content->kind != MB_JSON_STRING) {
            st = mb_fail(MB_ERR_FORMAT, "%s: added_tokens: an entry lacks an integer id or a string content", t->path);
            goto done;
        }
        if (!json_off(json_get(d, a, "lstrip")) || !json_off(json_get(d, a, "rstrip")) ||
            !json_off(json_get(d, a, "single_word"))) {
            st = mb_fail(MB_ERR_UNSUPPORTED, "%s: added token \"%.64s\": lstrip, rstrip and single_word are not supported",
                         t->path, json_str(d, content));
            goto done;
        }
        max_id = MB_MAX(max_id, id);
    }
    if ((st = tok_alloc(t, (size_t)max_id + 1))) goto done;
    for (const MbJson *v = json_first(d, vocab); v; v = json_next(d, v)) {
        json_id(v, &id);
        arrsetlen(buf, 0);
        if (!bytelevel_decode(byte_of_cp, json_key(d, v), v->keylen, &buf)) {
            st = mb_fail(MB_ERR_FORMAT, "%s: model.vocab[\"%.64s\"] is not a byte-level token", t->path, json_key(d, v));
            goto done;
        }
        if ((st = tok_set(t, id, buf, (size_t)arrlen(buf), MB_TOK_BPE, "model.vocab: id"))) goto done;
    }
    for (const MbJson *a = added ? json_first(d, added) : NULL; a; a = json_next(d, a)) {
        const MbJson *content = json_get(d, a, "content"), *special = json_get(d, a, "special");
        const unsigned char *s = (const unsigned char *)json_str(d, content);
        uint8_t fl = MB_TOK_ADDED | (special && special->kind == MB_JSON_BOOL && special->boolean ? MB_TOK_SPECIAL : 0);
        json_id(json_get(d, a, "id"), &id);
        if (t->flags[id] == MB_TOK_BPE) { /* an added token may repeat its vocabulary entry */
            if (t->len[id] != content->len || memcmp(t->bytes + t->off[id], s, content->len)) {
                st = mb_fail(MB_ERR_FORMAT, "%s: added token \"%.64s\" has id %d, which model.vocab gives to another token",
                             t->path, (const char *)s, (int)id);
                goto done;
            }
            t->flags[id] |= fl;
        } else if ((st = tok_set(t, id, s, content->len, fl, "added_tokens: id"))) {
            goto done;
        }
    }
    if ((st = tokjson_template(t, d, json_get(d, root, "post_processor"))) || (st = tok_finish(t)))
        goto done;
    if (!(st = tokjson_merges(t, d, merges, byte_of_cp))) tok_byte_merges(t);
done:
    arrfree(buf);
    json_free(&doc);
    return st;
}

/* ---- tokenizer.model (tiktoken: "base64 rank" per line) ---- */

/* The Llama 3.1 special tokens, ids from the last rank + 1 (Meta's tokenizer.py for 3.1):
 * these 11, then <|reserved_special_token_3|> .. <|reserved_special_token_247|>. */
static const char *const mb_llama31_specials[] = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"};
#define MB_LLAMA31_N_SPECIAL 256

static int base64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    return c == '+' ? 62 : c == '/' ? 63 : -1;
}

/* Standard base64 with padding, appended to *out; 0 if s[0..n) is not that. */
static int base64_decode(const unsigned char *s, size_t n, unsigned char **out) {
    if (n == 0 || n % 4) return 0;
    for (size_t i = 0; i < n; i += 4) {
        int v[4], pad = 0;
        for (int k = 0; k < 4; k++) {
            v[k] = base64_value(s[i + (size_t)k]);
            if (s[i + (size_t)k] == '=' && i + 4 == n && k >= 2) v[k] = 0, pad++;
            else if (v[k] < 0 || pad) return 0;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        if ((pad == 2 && (w & 0xFFFF)) || (pad == 1 && (w & 0xFF))) return 0; /* non-canonical */
        arrput(*out, (unsigned char)(w >> 16));
        if (pad < 2) arrput(*out, (unsigned char)(w >> 8));
        if (pad < 1) arrput(*out, (unsigned char)w);
    }
    return 1;
}

typedef struct {
    uint64_t key;          /* rank_left << 32 | rank_right, for the converter's order */
    int32_t left, right;
} MbSplit;

static int mb_cmp_split(const void *a, const void *b) {
    uint64_t x = ((const MbSplit *)a)->key, y = ((const MbSplit *)b)->key;
    return x < y ? -1 : x > y;
}

/* Merges from ranks, as transformers' TikTokenConverter writes them into tokenizer.json: for
 * each token in rank order, every split into two tokens, ordered by (rank left, rank right). */
static void tok_merges_from_ranks(MbTokenizer *t) {
    MbSplit *splits = NULL;
    uint32_t rank = 0;
    for (size_t id = 0; id < t->n_vocab; id++) {
        if (!(t->flags[id] & MB_TOK_BPE) || t->len[id] < 2) continue;
        const unsigned char *s = t->bytes + t->off[id];
        arrsetlen(splits, 0);
        for (size_t k = 1; k < t->len[id]; k++) {
            int32_t l = tok_find(t, t->vocab, s, k), r = l < 0 ? -1 : tok_find(t, t->vocab, s + k, t->len[id] - k);
            if (r < 0) continue;
            MbSplit sp = {(uint64_t)(uint32_t)l << 32 | (uint32_t)r, l, r};
            arrput(splits, sp);
        }
        if (arrlen(splits) > 1) qsort(splits, (size_t)arrlen(splits), sizeof *splits, mb_cmp_split);
        for (ptrdiff_t k = 0; k < arrlen(splits); k++) {
            MbMerge mg = {rank++, (int32_t)id};
            hmput(t->merges, splits[k].key, mg);
        }
    }
    arrfree(splits);
}

static MbStatus tok_from_tiktoken(MbTokenizer *t, const unsigned char *s, size_t n) {
    typedef struct {
        size_t off, len;
        int32_t rank;
    } Line;
    Line *lines = NULL;
    unsigned char *buf = NULL;
    MbStatus st = MB_OK;
    int32_t max_rank = -1;
    size_t lineno = 0;
    for (size_t i = 0; i < n;) {
        size_t e = i;
        while (e < n && s[e] != '\n') e++;
        size_t end = e > i && s[e - 1] == '\r' ? e - 1 : e;
        lineno++;
        if (end > i) {
            const unsigned char *sp = memchr(s + i, ' ', end - i);
            size_t before = (size_t)arrlen(buf), k = sp ? (size_t)(sp - s) + 1 : end;
            long long rank = 0;
            int digits = 0;
            for (; k < end && s[k] >= '0' && s[k] <= '9' && rank < MB_TOK_MAX_VOCAB; k++, digits++)
                rank = rank * 10 + (s[k] - '0');
            if (!sp || !base64_decode(s + i, (size_t)(sp - (s + i)), &buf) || !digits || k != end ||
                rank + MB_LLAMA31_N_SPECIAL >= MB_TOK_MAX_VOCAB) {
                st = mb_fail(MB_ERR_FORMAT, "%s: line %zu is not \"BASE64 RANK\" --> medbot reads Meta's Llama 3 "
                             "tokenizer.model (tiktoken format), not a SentencePiece model", t->path, lineno);
                goto done;
            }
            Line ln = {before, (size_t)arrlen(buf) - before, (int32_t)rank};
            arrput(lines, ln);
            max_rank = MB_MAX(max_rank, ln.rank);
        }
        i = e + 1;
    }
    if (max_rank < 0) {
        st = mb_fail(MB_ERR_FORMAT, "%s: no ranks in the file", t->path);
        goto done;
    }
    if ((st = tok_alloc(t, (size_t)max_rank + 1 + MB_LLAMA31_N_SPECIAL))) goto done;
    for (ptrdiff_t k = 0; k < arrlen(lines); k++)
        if ((st = tok_set(t, lines[k].rank, buf + lines[k].off, lines[k].len, MB_TOK_BPE, "rank"))) goto done;
    for (int k = 0; k < MB_LLAMA31_N_SPECIAL; k++) {
        char name[64];
        if (k < (int)(sizeof mb_llama31_specials / sizeof *mb_llama31_specials))
            snprintf(name, sizeof name, "%s", mb_llama31_specials[k]);
        else
            snprintf(name, sizeof name, "<|reserved_special_token_%d|>", k - 8);
        if ((st = tok_set(t, max_rank + 1 + k, (const unsigned char *)name, strlen(name),
                          MB_TOK_ADDED | MB_TOK_SPECIAL, "special token id")))
            goto done;
    }
    arrput(t->prefix, max_rank + 1); /* <|begin_of_text|>, as the Llama 3 template adds it */
    t->ignore_merges = 1;            /* tiktoken looks a whole piece up before merging */
    if ((st = tok_finish(t))) goto done;
    tok_merges_from_ranks(t);
    tok_byte_merges(t);
done:
    arrfree(lines);
    arrfree(buf);
    return st;
}

/* Loads from the text of a tokenizer.json (starts with '{') or of a tokenizer.model. */
static MbStatus tok_from_text(const char *name, const char *text, size_t n, MbTokenizer **out) {
    *out = NULL;
    MbTokenizer *t = mb_calloc(1, sizeof *t);
    t->path = mb_strdup(name);
    size_t i = 0;
    while (i < n && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t')) i++;
    MbStatus st = i < n && text[i] == '{' ? tok_from_json(t, text, n)
                                          : tok_from_tiktoken(t, (const unsigned char *)text, n);
    if (st) {
        mb_tokenizer_free(t);
        return st;
    }
    *out = t;
    return MB_OK;
}

MbStatus mb_tokenizer_load(const char *path, MbTokenizer **out) {
    char *file = NULL, *text = NULL;
    size_t n;
    *out = NULL;
    if (mb_is_dir(path)) {
        file = mb_path_join(path, "tokenizer.json");
        if (!mb_is_file(file)) {
            free(file);
            file = mb_path_join(path, "tokenizer.model");
        }
        if (!mb_is_file(file)) {
            free(file);
            return mb_fail(MB_ERR_IO, "%s: no tokenizer.json or tokenizer.model in this folder", path);
        }
    } else {
        file = mb_strdup(path);
    }
    MbStatus st = mb_read_file(file, &text, &n);
    if (!st) st = tok_from_text(file, text, n, out);
    free(text);
    free(file);
    return st;
}

size_t mb_tokenizer_vocab_size(const MbTokenizer *t) { return t->n_vocab; }
int32_t mb_tokenizer_bos_id(const MbTokenizer *t) { return t->bos_id; }
int32_t mb_tokenizer_eos_id(const MbTokenizer *t) { return t->eos_id; }

int32_t mb_tokenizer_token_id(const MbTokenizer *t, const char *text) {
    size_t n = strlen(text);
    int32_t id = tok_find(t, t->added, (const unsigned char *)text, n);
    return id >= 0 ? id : tok_find(t, t->vocab, (const unsigned char *)text, n);
}

const char *mb_tokenizer_token_bytes(const MbTokenizer *t, int32_t id, size_t *len) {
    if (id < 0 || (size_t)id >= t->n_vocab || !t->flags[id]) return NULL;
    *len = t->len[id];
    return (const char *)t->bytes + t->off[id];
}

int mb_tokenizer_is_special(const MbTokenizer *t, int32_t id) {
    return id >= 0 && (size_t)id < t->n_vocab && (t->flags[id] & MB_TOK_SPECIAL);
}

/* ---- encoding ---- */

#define MB_BPE_SMALL 64 /* pieces up to this many bytes merge in place; longer ones use a heap */

/* BPE on a piece of n <= MB_BPE_SMALL bytes: tiktoken's loop, with Hugging Face's merge ranks.
 * Writes the ids to out; returns their count. */
static size_t bpe_small(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out) {
    int32_t id[MB_BPE_SMALL];
    MbMerge mg[MB_BPE_SMALL]; /* mg[k]: the merge of id[k] and id[k+1] */
    size_t m = n;
    for (size_t k = 0; k < n; k++) id[k] = t->byte_id[s[k]];
    for (size_t k = 0; k + 1 < n; k++) mg[k] = t->byte_merges[s[k] * 256 + s[k + 1]];
    while (m > 1) {
        size_t best = 0;
        for (size_t k = 1; k + 1 < m; k++)
            if (mg[k].rank < mg[best].rank) best = k;
        if (mg[best].rank == MB_NO_MERGE) break;
        size_t tail = m - best - 2; /* symbols after the pair */
        id[best] = mg[best].id;
        memmove(id + best + 1, id + best + 2, tail * sizeof *id);
        if (tail) memmove(mg + best + 1, mg + best + 2, (tail - 1) * sizeof *mg);
        m--;
        if (best > 0) mg[best - 1] = tok_merge(t, id[best - 1], id[best]);
        if (best + 1 < m) mg[best] = tok_merge(t, id[best], id[best + 1]);
    }
    memcpy(out, id, m * sizeof *id);
    return m;
}

typedef struct {
    uint32_t rank, pos; /* the pair that starts at symbol pos (a byte offset in the piece) */
} MbBpeEntry;

static int bpe_less(MbBpeEntry a, MbBpeEntry b) { return a.rank < b.rank || (a.rank == b.rank && a.pos < b.pos); }

static void bpe_push(MbBpeEntry *h, size_t *n, MbBpeEntry e) {
    size_t i = (*n)++;
    while (i > 0 && bpe_less(e, h[(i - 1) / 2])) h[i] = h[(i - 1) / 2], i = (i - 1) / 2;
    h[i] = e;
}

static MbBpeEntry bpe_pop(MbBpeEntry *h, size_t *n) {
    MbBpeEntry top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && bpe_less(h[c + 1], h[c])) c++;
        if (!bpe_less(h[c], last)) break;
        h[i] = h[c], i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* The same merges for a long piece in O(n log n): symbols in a linked list, candidate pairs in a
 * min-heap on (rank, position); an entry whose pair has changed since is skipped. */
static size_t bpe_long(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out) {
    int32_t *id = mb_malloc(n * sizeof *id);
    uint32_t *prev = mb_malloc(n * sizeof *prev), *next = mb_malloc(n * sizeof *next);
    MbBpeEntry *heap = mb_malloc(3 * n * sizeof *heap);
    size_t nh = 0, m = 0;
    for (size_t k = 0; k < n; k++) id[k] = t->byte_id[s[k]], prev[k] = (uint32_t)k - 1, next[k] = (uint32_t)k + 1;
    for (size_t k = 0; k + 1 < n; k++) {
        MbMerge mg = t->byte_merges[s[k] * 256 + s[k + 1]];
        if (mg.rank != MB_NO_MERGE) bpe_push(heap, &nh, (MbBpeEntry){mg.rank, (uint32_t)k});
    }
    while (nh) {
        MbBpeEntry e = bpe_pop(heap, &nh);
        uint32_t p = e.pos, q = next[p];
        if (id[p] < 0 || q >= n) continue;
        MbMerge mg = tok_merge(t, id[p], id[q]);
        if (mg.rank != e.rank) continue; /* stale: ranks name pairs uniquely */
        id[p] = mg.id;
        id[q] = -1;
        next[p] = next[q];
        if (next[p] < n) prev[next[p]] = p;
        if (p > 0) {
            MbMerge l = tok_merge(t, id[prev[p]], id[p]);
            if (l.rank != MB_NO_MERGE) bpe_push(heap, &nh, (MbBpeEntry){l.rank, prev[p]});
        }
        if (next[p] < n) {
            MbMerge r = tok_merge(t, id[p], id[next[p]]);
            if (r.rank != MB_NO_MERGE) bpe_push(heap, &nh, (MbBpeEntry){r.rank, p});
        }
    }
    for (size_t k = 0; k < n; k = next[k]) out[m++] = id[k];
    free(id), free(prev), free(next), free(heap);
    return m;
}

/* One pre-tokenized piece -> ids appended at out; returns their count. */
static size_t encode_piece(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out) {
    if (n == 1) {
        out[0] = t->byte_id[s[0]];
        return 1;
    }
    if (t->ignore_merges && (out[0] = tok_find(t, t->vocab, s, n)) >= 0) return 1;
    return n <= MB_BPE_SMALL ? bpe_small(t, s, n, out) : bpe_long(t, s, n, out);
}

/* Text without added tokens: valid UTF-8 runs through the regex, invalid bytes alone. */
static size_t encode_ordinary(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out) {
    size_t m = 0, i = 0;
    while (i < n) {
        size_t j = i, k;
        while (j < n) {
            if (s[j] < 0x80) j++;
            else if ((k = utf8_valid_len(s + j, n - j))) j += k;
            else break;
        }
        for (size_t p = i; p < j;) {
            size_t e = pretok_next(s + i, j - i, p - i) + i;
            m += encode_piece(t, s + p, e - p, out + m);
            p = e;
        }
        if (j < n) out[m++] = t->byte_id[s[j++]]; /* a byte that is not valid UTF-8 */
        i = j;
    }
    return m;
}

/* The added token that starts at s[i] (the longest), or -1; its length in *len. */
static int32_t added_at(const MbTokenizer *t, const unsigned char *s, size_t n, size_t i, size_t *len) {
    for (ptrdiff_t k = 0; k < arrlen(t->added_lens); k++) {
        size_t L = t->added_lens[k];
        int32_t id;
        if (L <= n - i && (id = tok_find(t, t->added, s + i, L)) >= 0) {
            *len = L;
            return id;
        }
    }
    return -1;
}

MbStatus mb_tokenizer_encode(const MbTokenizer *t, const char *text, size_t len, unsigned flags, int32_t **ids,
                             size_t *n) {
    const unsigned char *s = (const unsigned char *)text;
    size_t np = flags & MB_ENCODE_ADD_BOS ? (size_t)arrlen(t->prefix) + (size_t)arrlen(t->suffix) : 0;
    if (len >= UINT32_MAX - np) /* bpe_long indexes a piece with 32 bits */
        return mb_fail(MB_ERR_ARG, "%s: a text of %zu bytes is too long to encode (the limit is 4 GiB)", t->path, len);
    int32_t *out = mb_malloc((len + np) * sizeof *out); /* a token covers at least one byte */
    size_t m = 0, start = 0, L;
    if (flags & MB_ENCODE_ADD_BOS)
        for (ptrdiff_t k = 0; k < arrlen(t->prefix); k++) out[m++] = t->prefix[k];
    if (!(flags & MB_ENCODE_SPECIALS_AS_TEXT))
        for (size_t i = 0; i < len; i++) {
            int32_t id;
            if (!t->added_first[s[i]] || (id = added_at(t, s, len, i, &L)) < 0) continue;
            m += encode_ordinary(t, s + start, i - start, out + m);
            out[m++] = id;
            i += L - 1;
            start = i + 1;
        }
    m += encode_ordinary(t, s + start, len - start, out + m);
    if (flags & MB_ENCODE_ADD_BOS)
        for (ptrdiff_t k = 0; k < arrlen(t->suffix); k++) out[m++] = t->suffix[k];
    *ids = out;
    *n = m;
    return MB_OK;
}

/* ---- decoding ---- */

/* Copies valid UTF-8 from s[0..n) to out, writing U+FFFD for each maximal subpart of an invalid
 * sequence (Unicode's recommended practice, as Python and Rust do). If !final, an incomplete
 * sequence at the end is not written: returns how many bytes were consumed, *w bytes written.
 * out must hold 3 * n bytes. */
static size_t utf8_lossy(const unsigned char *s, size_t n, int final, char *out, size_t *w) {
    size_t i = 0, o = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t need = c < 0x80 ? 1 : c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        size_t k = 1;
        if (need > 1)
            for (; k < need && i + k < n; k++) {
                unsigned lo = 0x80, hi = 0xBF, b = s[i + k];
                if (k == 1 && c == 0xE0) lo = 0xA0;
                if (k == 1 && c == 0xED) hi = 0x9F;
                if (k == 1 && c == 0xF0) lo = 0x90;
                if (k == 1 && c == 0xF4) hi = 0x8F;
                if (b < lo || b > hi) break;
            }
        if (need && k == need) {
            memcpy(out + o, s + i, need);
            o += need, i += need;
            continue;
        }
        if (need > 1 && i + k == n && !final) break; /* may still complete */
        memcpy(out + o, "\xEF\xBF\xBD", 3);
        o += 3, i += k;
    }
    *w = o;
    return i;
}

static MbStatus tok_check_id(const MbTokenizer *t, int32_t id) {
    if (id < 0 || (size_t)id >= t->n_vocab || !t->flags[id])
        return mb_fail(MB_ERR_ARG, "%s: no token has id %ld (vocabulary size %zu)", t->path, (long)id, t->n_vocab);
    return MB_OK;
}

MbStatus mb_tokenizer_decode(const MbTokenizer *t, const int32_t *ids, size_t n, int skip_special_tokens, char **text,
                             size_t *len) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        MbStatus st = tok_check_id(t, ids[i]);
        if (st) return st;
        total += t->len[ids[i]];
    }
    unsigned char *raw = mb_malloc(total);
    size_t r = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_special_tokens && (t->flags[ids[i]] & MB_TOK_SPECIAL)) continue;
        memcpy(raw + r, t->bytes + t->off[ids[i]], t->len[ids[i]]);
        r += t->len[ids[i]];
    }
    char *out = mb_malloc(3 * r + 1);
    utf8_lossy(raw, r, 1, out, len);
    out[*len] = 0;
    free(raw);
    *text = out;
    return MB_OK;
}

void mb_token_stream_init(MbTokenStream *s, const MbTokenizer *tok, int skip_special_tokens) {
    memset(s, 0, sizeof *s);
    s->tok = tok;
    s->skip_special_tokens = skip_special_tokens;
}

/* Converts held + bytes, keeping an incomplete character at the end unless final. */
static void stream_emit(MbTokenStream *s, const unsigned char *bytes, size_t n, int final, const char **text,
                        size_t *len) {
    size_t raw_n = s->n_held + n;
    if (s->cap < 4 * raw_n + 16) {
        s->cap = 4 * raw_n + 16;
        free(s->buf);
        s->buf = mb_malloc(s->cap);
    }
    unsigned char *raw = (unsigned char *)s->buf + 3 * raw_n + 4; /* the tail of buf holds the input */
    memcpy(raw, s->held, s->n_held);
    if (n) memcpy(raw + s->n_held, bytes, n);
    size_t used = utf8_lossy(raw, raw_n, final, s->buf, len);
    s->n_held = raw_n - used; /* at most 3: a valid prefix of one character */
    memmove(s->held, raw + used, s->n_held);
    s->buf[*len] = 0;
    *text = s->buf;
}

MbStatus mb_token_stream_put(MbTokenStream *s, int32_t id, const char **text, size_t *len) {
    MbStatus st = tok_check_id(s->tok, id);
    if (st) return st;
    const MbTokenizer *t = s->tok;
    int skip = s->skip_special_tokens && (t->flags[id] & MB_TOK_SPECIAL);
    stream_emit(s, t->bytes + t->off[id], skip ? 0 : t->len[id], 0, text, len);
    return MB_OK;
}

void mb_token_stream_finish(MbTokenStream *s, const char **text, size_t *len) {
    stream_emit(s, NULL, 0, 1, text, len);
}

void mb_token_stream_free(MbTokenStream *s) {
    free(s->buf);
    memset(s, 0, sizeof *s);
}

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
    /* x (n) += y (n) : the residual connection */
    void (*residual_forward)(MbOps *, float *x, const float *y, size_t n);
    /* out (n, C) = inp[rows[i]] for i < n */
    void (*gather_rows)(MbOps *, float *out, const float *inp, const int *rows, size_t n, size_t C);
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
 * disjoint output columns, so no two write the same memory. */
#define MM_OB 32
#define MM_IB 256
#define MM_MR 4

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
    if (mr == MM_MR) {
        for (size_t i = 0; i < ni; i++) {
            const float *wr = wt + i * MM_OB;
            float x0 = inp[i], x1 = inp[I + i], x2 = inp[2 * I + i], x3 = inp[3 * I + i];
            for (size_t o = 0; o < MM_OB; o++) {
                acc[0][o] += x0 * wr[o];
                acc[1][o] += x1 * wr[o];
                acc[2][o] += x2 * wr[o];
                acc[3][o] += x3 * wr[o];
            }
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

static void cpu_matmul_forward(MbOps *ops, float *out, const float *inp, const MbWeight *w, size_t N) {
    MbCpu *cpu = ops->ctx;
    MatmulTask t = {cpu, out, inp, w, N};
    mb_pool_run(cpu->pool, matmul_task, &t);
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

static void cpu_residual_forward(MbOps *ops, float *x, const float *y, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

static void cpu_gather_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t C) {
    (void)ops;
    for (size_t i = 0; i < n; i++) memcpy(out + i * C, inp + (size_t)rows[i] * C, C * sizeof(float));
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
    ops->residual_forward = cpu_residual_forward;
    ops->gather_rows = cpu_gather_rows;
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

/* Activations of one forward pass over N = B*T rows: one block, pointed into by a table. */
typedef struct {
    size_t N;        /* rows the buffers hold */
    float *block;
    float *x;        /* (N, C) residual stream */
    float *xn;       /* (N, C) normed */
    float *q;        /* (N, H*D) */
    float *k, *v;    /* (N, K*D) */
    float *att;      /* (N, H*D) attention output */
    float *tmp;      /* (N, C) projection back to the residual */
    float *gate, *up;/* (N, F) */
    float *hid;      /* (N, F) silu(gate) * up */
    float *rstd;     /* (N) */
    float *logits;   /* (N, V) when the backend's memory is not the host's */
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
    memset(&m->acts, 0, sizeof m->acts);
}

/* Makes the activation block hold N rows (with logits when the backend needs its own copy). */
static void acts_ensure(MbModel *m, size_t N) {
    if (m->acts.block && m->acts.N >= N) return;
    acts_free(m);
    const MbConfig *c = &m->cfg;
    size_t C = mb_dim(c, MB_DIM_C), QD = mb_dim(c, MB_DIM_QD), KVD = mb_dim(c, MB_DIM_KVD),
           F = mb_dim(c, MB_DIM_F), V = (size_t)c->vocab_size;
    MbActs *a = &m->acts;
    struct {
        float **ptr;
        size_t count;
    } spec[] = {
        {&a->x, N * C},    {&a->xn, N * C},  {&a->q, N * QD},  {&a->k, N * KVD},
        {&a->v, N * KVD},  {&a->att, N * QD}, {&a->tmp, N * C}, {&a->gate, N * F},
        {&a->up, N * F},   {&a->hid, N * F},  {&a->rstd, N},
        {&a->logits, m->ops->host_memory ? 0 : N * V},
    };
    size_t n = sizeof spec / sizeof *spec, total = 0;
    for (size_t i = 0; i < n; i++) total += spec[i].count;
    a->block = m->ops->alloc(m->ops, total);
    a->N = N;
    size_t off = 0;
    for (size_t i = 0; i < n; i++) {
        *spec[i].ptr = spec[i].count ? mb_act_at(m->ops, a->block, off) : NULL;
        off += spec[i].count;
    }
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

/* One decoder layer on the activations (N = B*T rows), keys/values appended to the cache. */
static void layer_forward(MbModel *m, int l, MbKVCache *kv, int B, int T, const int *lens) {
    MbOps *ops = m->ops;
    const MbConfig *c = &m->cfg;
    const MbLayer *ly = &m->layers[l];
    MbActs *a = &m->acts;
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), F = mb_dim(c, MB_DIM_F);
    int H = c->num_attention_heads, K = c->num_key_value_heads, D = c->head_dim, pos0 = kv->len;

    ops->rmsnorm_forward(ops, a->xn, a->rstd, a->x, &ly->w[MB_W_INPUT_LAYERNORM], N, c->rms_norm_eps);
    ops->matmul_forward(ops, a->q, a->xn, &ly->w[MB_W_Q_PROJ], N);
    ops->matmul_forward(ops, a->k, a->xn, &ly->w[MB_W_K_PROJ], N);
    ops->matmul_forward(ops, a->v, a->xn, &ly->w[MB_W_V_PROJ], N);
    ops->rope_forward(ops, a->q, m->inv_freq, B, T, pos0, H, D);
    ops->rope_forward(ops, a->k, m->inv_freq, B, T, pos0, K, D);
    ops->kv_store(ops, kv->k[l], a->k, B, T, kv->S, pos0, K * D);
    ops->kv_store(ops, kv->v[l], a->v, B, T, kv->S, pos0, K * D);
    ops->attention_forward(ops, a->att, NULL, a->q, kv->k[l], kv->v[l], lens, B, T, kv->S, pos0, H, K, D);
    ops->matmul_forward(ops, a->tmp, a->att, &ly->w[MB_W_O_PROJ], N);
    ops->residual_forward(ops, a->x, a->tmp, N * C);

    ops->rmsnorm_forward(ops, a->xn, a->rstd, a->x, &ly->w[MB_W_POST_ATTENTION_LAYERNORM], N, c->rms_norm_eps);
    ops->matmul_forward(ops, a->gate, a->xn, &ly->w[MB_W_GATE_PROJ], N);
    ops->matmul_forward(ops, a->up, a->xn, &ly->w[MB_W_UP_PROJ], N);
    ops->swiglu_forward(ops, a->hid, a->gate, a->up, N * F);
    ops->matmul_forward(ops, a->tmp, a->hid, &ly->w[MB_W_DOWN_PROJ], N);
    ops->residual_forward(ops, a->x, a->tmp, N * C);
}

MbStatus mb_model_forward(MbModel *m, MbKVCache *cache, const int32_t *tokens, int B, int T,
                          const int *lens, float *logits, int last_only) {
    const MbConfig *c = &m->cfg;
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
    MbKVCache *kv = cache, *tmp_kv = NULL;
    if (!kv) {
        MbStatus rc = mb_kvcache_new(m, B, T, &tmp_kv);
        if (rc) return rc;
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
    acts_ensure(m, N);
    MbActs *a = &m->acts;
    ops->embedding_forward(ops, a->x, tokens, &m->embed_tokens, N);
    for (int l = 0; l < c->num_hidden_layers; l++) layer_forward(m, l, kv, B, T, kv->lens);
    if (logits) {
        size_t rows = N;
        if (last_only) { /* the last real position of each sequence */
            int *idx = mb_malloc((size_t)B * sizeof *idx);
            for (int b = 0; b < B; b++) idx[b] = b * T + (lens ? lens[b] : T) - 1;
            ops->gather_rows(ops, a->tmp, a->x, idx, (size_t)B, C);
            free(idx);
            rows = (size_t)B;
        }
        const float *src = last_only ? a->tmp : a->x;
        ops->rmsnorm_forward(ops, a->xn, a->rstd, src, &m->norm, rows, c->rms_norm_eps);
        float *dst = a->logits ? a->logits : logits;
        ops->matmul_forward(ops, dst, a->xn, &m->lm_head, rows);
        ops->to_host(ops, logits, dst, rows * V);
    }
    kv->len += T;
    for (int b = 0; lens && b < B; b++)
        if (lens[b] < T) kv->padded = 1;
    mb_kvcache_free(tmp_kv);
    return MB_OK;
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

/* --name as a flag: absent 0, present 1; a value after it is an error. */
static MbStatus tok_arg_flag(MbArgs *a, const char *name, int *out) {
    const char *v = arg_get(a, name);
    *out = v != NULL;
    if (v && v[0]) return mb_fail(MB_ERR_ARG, "%s: --%s takes no value, got '%s'", a->cmd, name, v);
    return MB_OK;
}

static int cmd_encode(MbArgs *a) {
    MbStatus rc;
    int add_bos = 0;
    const char *path = arg_get(a, "tokenizer");
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0, len = 0;
    MbTokenizer *tok = NULL;
    if ((rc = tok_arg_flag(a, "add_bos", &add_bos)) || (rc = args_done(a))) goto fail;
    if (!path || !path[0]) {
        rc = mb_fail(MB_ERR_ARG, "encode: --tokenizer PATH is required (tokenizer.json, tokenizer.model or a model folder)");
        goto fail;
    }
    if ((rc = mb_tokenizer_load(path, &tok)) || (rc = mb_read_file("/dev/stdin", &text, &len)) ||
        (rc = mb_tokenizer_encode(tok, text, len, add_bos ? MB_ENCODE_ADD_BOS : 0, &ids, &n)))
        goto fail;
    for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
    printf("\n");
    free(ids), free(text), mb_tokenizer_free(tok);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    free(ids), free(text), mb_tokenizer_free(tok);
    return 1;
}

static int cmd_decode(MbArgs *a) {
    MbStatus rc;
    int skip = 0;
    const char *path = arg_get(a, "tokenizer");
    char *in = NULL, *text = NULL;
    int32_t *ids = NULL; /* stb_ds */
    size_t len = 0, n_in = 0;
    MbTokenizer *tok = NULL;
    if ((rc = tok_arg_flag(a, "skip_special_tokens", &skip)) || (rc = args_done(a))) goto fail;
    if (!path || !path[0]) {
        rc = mb_fail(MB_ERR_ARG, "decode: --tokenizer PATH is required (tokenizer.json, tokenizer.model or a model folder)");
        goto fail;
    }
    if ((rc = mb_tokenizer_load(path, &tok)) || (rc = mb_read_file("/dev/stdin", &in, &n_in))) goto fail;
    for (char *p = in, *end; *p;) {
        if (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') {
            p++;
            continue;
        }
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || (*end && *end != ' ' && *end != '\n' && *end != '\t' && *end != '\r') || v < 0 ||
            (size_t)v >= mb_tokenizer_vocab_size(tok) || !mb_tokenizer_token_bytes(tok, (int32_t)v, &len)) {
            size_t k = strcspn(p, " \n\t\r");
            rc = mb_fail(MB_ERR_ARG, "decode: '%.*s' is not a token id of %s (0..%zu)", (int)MB_MIN(k, 40), p, path,
                         mb_tokenizer_vocab_size(tok) - 1);
            goto fail;
        }
        arrput(ids, (int32_t)v);
        p = end;
    }
    if ((rc = mb_tokenizer_decode(tok, ids, (size_t)arrlen(ids), skip, &text, &len))) goto fail;
    fwrite(text, 1, len, stdout);
    free(text), free(in), arrfree(ids), mb_tokenizer_free(tok);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    free(text), free(in), arrfree(ids), mb_tokenizer_free(tok);
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
    {"encode", cmd_encode, "encode --tokenizer PATH [--add_bos]\n"
                           "    reads standard input as one text, prints its token ids on one line (PATH: tokenizer.json,\n"
                           "    tokenizer.model or a model folder; special tokens in the text are split out)"},
    {"decode", cmd_decode, "decode --tokenizer PATH [--skip_special_tokens]\n"
                           "    reads token ids (whitespace separated) from standard input, prints their text"},
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
