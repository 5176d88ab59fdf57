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
 * Reading guide: five functions carry the engine; read them first, in this order.
 *   1. model_forward_rows (6. model)   tokens -> embeddings -> L layers -> final norm: the forward
 *                                        pass that training, eval and generation all run
 *   2. layer_forward      (6. model)   one decoder layer: rmsnorm, q/k/v (+ LoRA), rope,
 *                                        attention, o_proj, residual, rmsnorm, SwiGLU MLP, residual
 *   3. layer_backward     (6. model)   the same layer in reverse, op by op (each op's backward sits
 *                                        right after its forward in 5. ops)
 *   4. train_microbatch   (9. dpo)     one DPO micro-batch: policy and reference log-probs of the
 *                                        chosen and rejected completions, the loss, its gradient
 *                                        back through the model into the LoRA weights
 *   5. optimizer_step     (9. dpo)     gradient sum across ranks, clipping, AdamW on the LoRA weights
 * Everything else serves them: 1-4 read files and lay out weights, 5 is the op table they call
 * (MbOps: CPU here, CUDA in 12), 7-8 make adapters and batches, 10-11 sample and distribute,
 * 13 is the command line. The appendix at the end holds generated tables (never edited by hand).
 *
 * Shape legend (every tensor in this file is annotated with these letters)
 *   B  sequences in a batch (a DPO batch holds 2 x pairs: chosen and rejected)
 *   T  tokens per sequence in this call       S  KV cache capacity (tokens)
 *   N  rows = B * T                           C  hidden size (4096 for Llama-3.1-8B)
 *   H  query heads      K  key/value heads    D  head dim (C / H unless config.json says)
 *   F  MLP size         V  vocab size         L  decoder layers      R  LoRA rank
 *
 * Conventions
 *   - Functions that can fail return MbStatus and set a one-line message (mb_fail); the caller
 *     decides what to do with it. Nothing but the CLI's main exits the process: out of memory, a
 *     failed GPU call and a failed collective are statuses too (see medbot.h).
 *   - Counts and byte offsets are size_t. Tensors are row-major, last index fastest.
 *   - Each op names the PyTorch / Hugging Face function it must equal.
 *   - Gradients: parameter gradients +=, activation gradients =.
 *
 * Build: cc -std=c99 -O3 medbot.c -lm -lpthread -ldl (build.sh adds -march=native and the
 * tests). Nothing is generated at build time: the kernel source is in the appendix. To use it
 * as a library, compile it with MEDBOT_NO_MAIN (README: "Vendoring medbot"); the tests include
 * this file so that they can call its static functions.
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

#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* stb_ds (Sean Barrett's dynamic arrays and hash maps, Debian's libstb-dev) is compiled here,
 * unless the host program compiles its implementation itself: a host that vendors medbot next
 * to its own STB_DS_IMPLEMENTATION defines MEDBOT_HOST_STB_DS, and medbot uses the host's. */
#ifndef MEDBOT_HOST_STB_DS
#define STB_DS_IMPLEMENTATION
#endif
#include <stb/stb_ds.h>
/* stb_ds passes hash-map keys by address; its trick for rvalue keys needs `typeof`, which gcc
 * lacks under -std=c99, so keys are always lvalues here and the plain form is used. */
#undef STBDS_ADDRESSOF
#define STBDS_ADDRESSOF(typevar, value) &(value)

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

// ============================================================================================
// ---------- 1. platform ----------
// Error state, checked allocation, files and mmap, a thread pool, timers, JSON, text encodings,
// key: value (YAML) files, RNG, SHA-256 and HMAC.
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

/* The current message, prefixed with where ("FILE:LINE: message"); returns st. */
static MbStatus mb_fail_at(MbStatus st, const char *where) {
    char msg[sizeof mb_errbuf];
    snprintf(msg, sizeof msg, "%s", mb_last_error()); /* mb_fail writes where it would read */
    return mb_fail(st, "%s: %s", where, msg);
}

/* Allocation. Out of memory is an error like any other: the helpers return NULL with the
 * thread's message set ("out of memory allocating N bytes at FILE:LINE"), and every caller
 * frees what it holds and returns MB_ERR_OOM (or its own NULL) up to the command. */
static void *mb_malloc_(size_t n, const char *file, int line) {
    void *p = malloc(n ? n : 1);
    if (!p) mb_fail(MB_ERR_OOM, "out of memory allocating %zu bytes at %s:%d", n, file, line);
    return p;
}
static void *mb_calloc_(size_t count, size_t size, const char *file, int line) {
    if (size && count > SIZE_MAX / size) {
        mb_fail(MB_ERR_OOM, "out of memory: an allocation of %zu x %zu bytes overflows at %s:%d", count, size, file,
                line);
        return NULL;
    }
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) mb_fail(MB_ERR_OOM, "out of memory allocating %zu bytes at %s:%d", count * size, file, line);
    return p;
}
#define mb_malloc(n) mb_malloc_((n), __FILE__, __LINE__)
#define mb_calloc(c, s) mb_calloc_((c), (s), __FILE__, __LINE__)

/* 64-byte aligned allocation for activation and weight buffers (SIMD loads, cache lines); NULL
 * with the message set, as mb_malloc. */
static void *mb_aligned_alloc_(size_t n, const char *file, int line) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 64) != 0) {
        mb_fail(MB_ERR_OOM, "out of memory allocating %zu bytes at %s:%d", n, file, line);
        return NULL;
    }
    return p;
}
#define mb_aligned_alloc(n) mb_aligned_alloc_((n), __FILE__, __LINE__)

/* A copy of s, or NULL (out of memory, message set) */
static char *mb_strdup(const char *s) {
    size_t n = strlen(s);
    char *d = mb_malloc(n + 1);
    if (d) memcpy(d, s, n + 1);
    return d;
}

/* Multiplies counts, failing on overflow (shapes come from files we do not trust). */
static int mb_mul_overflows(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return 1;
    *out = a * b;
    return 0;
}

/* ---- ranges of settings ---- */

enum { MB_LO_OPEN = 1, MB_HI_OPEN = 2 };

/* Writes "must be ..., got X" into why and returns 1 when x is not a finite number in lo..hi
 * (open: MB_LO_OPEN, MB_HI_OPEN exclude that end; hi INFINITY: no upper end); else returns 0. */
static int range_why(double x, int is_int, double lo, double hi, int open, char *why, size_t n) {
    int lo_ok = open & MB_LO_OPEN ? x > lo : x >= lo, hi_ok = open & MB_HI_OPEN ? x < hi : x <= hi;
    if (isfinite(x) && lo_ok && hi_ok) return 0;
    char got[40];
    snprintf(got, sizeof got, is_int ? "%.0f" : "%.15g", x);
    if (!isfinite(x)) snprintf(why, n, "must be a finite number, got %s", got);
    else if (isinf(hi)) snprintf(why, n, "must be %s %.15g, got %s", open & MB_LO_OPEN ? ">" : ">=", lo, got);
    else
        snprintf(why, n, "must be in %c%.15g, %.15g%c, got %s", open & MB_LO_OPEN ? '(' : '[', lo, hi,
                 open & MB_HI_OPEN ? ')' : ']', got);
    return 1;
}

/* ---- paths and whole files ---- */

/* dir/name (malloc'd), or NULL (out of memory, message set), as every string helper here */
static char *mb_path_join(const char *dir, const char *name) {
    size_t a = strlen(dir), b = strlen(name);
    char *p = mb_malloc(a + b + 2);
    if (!p) return NULL;
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
    if (!d) return NULL;
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

static MbStatus mb_rmdir_r(const char *path);

/* Removes path: a file, a symbolic link (never what it points to) or a folder with everything in it. */
static MbStatus mb_remove_path(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) return mb_rmdir_r(path);
    if (remove(path) != 0 && errno != ENOENT) return mb_fail(MB_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
    return MB_OK;
}

/* Removes a folder and everything in it (a folder that is not there is fine); a link inside is
 * removed, never followed. */
static MbStatus mb_rmdir_r(const char *path) {
    DIR *d = opendir(path);
    if (!d) return errno == ENOENT ? MB_OK : mb_fail(MB_ERR_IO, "%s: cannot open the folder: %s", path, strerror(errno));
    struct dirent *e;
    MbStatus rc = MB_OK;
    while (!rc && (e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char *p = mb_path_join(path, e->d_name);
        rc = p ? mb_remove_path(p) : MB_ERR_OOM;
        free(p);
    }
    closedir(d);
    if (!rc && rmdir(path) != 0) rc = mb_fail(MB_ERR_IO, "%s: cannot remove: %s", path, strerror(errno));
    return rc;
}

/* What a file of mode m is when it is not a regular file ("a folder", "a FIFO (named pipe)", ...),
 * NULL for a regular file. */
static const char *mode_kind(mode_t m) {
    return S_ISREG(m) ? NULL : S_ISDIR(m) ? "a folder" : S_ISFIFO(m) ? "a FIFO (named pipe)" : S_ISSOCK(m) ? "a socket"
         : S_ISCHR(m) || S_ISBLK(m) ? "a device" : "not a regular file";
}

/* mode_kind of path; *err gets errno when stat fails (a missing file, a symbolic link loop). */
static const char *mb_path_kind(const char *path, int *err) {
    struct stat sb;
    *err = 0;
    if (stat(path, &sb) != 0) return *err = errno, "missing";
    return mode_kind(sb.st_mode);
}

/* The failure of opening path as a regular file: errno err (a link loop is named), or its kind. */
static MbStatus mb_fail_open(const char *path, int err, const char *kind) {
    if (err == ELOOP) return mb_fail(MB_ERR_IO, "%s: a loop of symbolic links --> point it at a real file", path);
    if (err || !kind) return mb_fail(MB_ERR_IO, "%s: cannot open: %s", path, strerror(err));
    return mb_fail(MB_ERR_IO, "%s: is %s, not a regular file --> give the path of a file%s", path, kind,
                   !strcmp(kind, "a folder") ? " in it" : " (save the data to a file first)");
}

/* Opens a regular file for reading (O_NONBLOCK: a FIFO never blocks the open; the kind is checked
 * on the open descriptor, so nothing changes between the check and the read). */
static MbStatus mb_open_regular(const char *path, int *fd_out) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return mb_fail_open(path, errno, NULL);
    struct stat sb;
    const char *kind = fstat(fd, &sb) != 0 ? "unreadable" : mode_kind(sb.st_mode);
    if (kind) {
        close(fd);
        return mb_fail_open(path, 0, kind);
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    *fd_out = fd;
    return MB_OK;
}

/* Reads all of f into a NUL-terminated buffer; name for messages. */
static MbStatus mb_read_all(FILE *f, const char *name, char **out, size_t *len) {
    *out = NULL;
    if (len) *len = 0;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (cap - n < 65536) {
            cap = cap ? cap * 2 : 65536 * 2;
            char *nb = realloc(buf, cap + 1);
            if (!nb) {
                free(buf);
                return mb_fail(MB_ERR_OOM, "%s: out of memory reading the file", name);
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    if (ferror(f)) {
        int e = errno;
        free(buf);
        return mb_fail(MB_ERR_IO, "%s: read error: %s", name, strerror(e));
    }
    buf[n] = 0;
    *out = buf;
    if (len) *len = n;
    return MB_OK;
}

/* Reads a whole regular file into a NUL-terminated buffer. A folder, a FIFO, a device or a
 * symbolic link loop is named as such (a FIFO would block, a folder reads as an error). */
static MbStatus mb_read_file(const char *path, char **out, size_t *len) {
    *out = NULL;
    if (len) *len = 0;
    int fd;
    MbStatus rc = mb_open_regular(path, &fd);
    if (rc) return rc;
    FILE *f = fdopen(fd, "rb");
    if (!f) {
        close(fd);
        return mb_fail(MB_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    }
    rc = mb_read_all(f, path, out, len);
    fclose(f);
    return rc;
}

/* 1 when a and b name the same existing file or folder (links and other spellings included). */
static int mb_same_file(const char *a, const char *b) {
    struct stat x, y;
    return stat(a, &x) == 0 && stat(b, &y) == 0 && x.st_dev == y.st_dev && x.st_ino == y.st_ino;
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
    if (!(w->tmp = mb_malloc(n))) return MB_ERR_OOM;
    snprintf(w->tmp, n, "%s.tmp.%ld", path, (long)getpid());
    w->f = fopen(w->tmp, "wb");
    if (!w->f) {
        MbStatus st = mb_fail(MB_ERR_IO, "%s: cannot create: %s", w->tmp, strerror(errno));
        free(w->tmp);
        w->tmp = NULL;
        return st;
    }
    if (!(w->path = mb_strdup(path))) {
        fclose(w->f), remove(w->tmp), free(w->tmp);
        memset(w, 0, sizeof *w);
        return MB_ERR_OOM;
    }
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

/* Closes the file and checks that every byte reached it, keeping it as PATH.tmp.PID: a writer of
 * several files finishes each as it completes and renames them all together (mb_wfile_commit). */
static MbStatus mb_wfile_finish(MbWFile *w) {
    int failed = w->failed;
    if (fflush(w->f) != 0 && !failed) failed = errno ? errno : EIO;
    if (fclose(w->f) != 0 && !failed) failed = errno ? errno : EIO;
    w->f = NULL;
    if (failed) {
        MbStatus st = mb_fail(MB_ERR_IO, "%s: write failed: %s", w->path, strerror(failed));
        mb_wfile_abort(w);
        return st;
    }
    return MB_OK;
}

static MbStatus mb_wfile_commit(MbWFile *w) {
    MbStatus st = w->f ? mb_wfile_finish(w) : MB_OK;
    if (st) return st;
    if (rename(w->tmp, w->path) != 0) {
        st = mb_fail(MB_ERR_IO, "%s: write failed: %s", w->path, strerror(errno ? errno : EIO));
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

/* The files medbot writes through a temporary NAME.tmp.PID (mb_wfile). */
static const char *const mb_written_names[] = {
    "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "adapter_model.safetensors", "adapter_config.json",
    "ref_logps.safetensors", "training.svg", "model.safetensors.index.json", NULL};

/* Whether the first len characters of name are a shard's name as save_pretrained gives it:
 * model-00001-of-00004.safetensors */
static int is_shard_name(const char *name, size_t len) {
    static const char form[] = "model-#####-of-#####.safetensors";
    if (len != sizeof form - 1) return 0;
    for (size_t i = 0; i < len; i++)
        if (form[i] == '#' ? name[i] < '0' || name[i] > '9' : name[i] != form[i]) return 0;
    return 1;
}

/* What a killed writer left: NAME.tmp.PID of a file medbot writes, or checkpoint-N.tmp.PID and
 * checkpoint-N.old.PID (a checkpoint being written, one moved aside), whose process is gone
 * (on this machine) or is this one. Anything else is the user's. *len: the length of NAME. */
static int stale_temporary(const char *name, size_t *len) {
    const char *t = strstr(name, ".tmp.");
    int old = !t && (t = strstr(name, ".old.")) != NULL;
    if (!t) return 0;
    char *end;
    long pid = strtol(t + 5, &end, 10);
    if (*end || pid <= 0 || t[5] < '0' || t[5] > '9') return 0;
    *len = (size_t)(t - name);
    int ours = 0;
    if (!strncmp(name, "checkpoint-", 11)) {
        size_t k = 11;
        while (k < *len && name[k] >= '0' && name[k] <= '9') k++;
        ours = k == *len && k > 11;
    }
    for (const char *const *nm = mb_written_names; !ours && !old && *nm; nm++)
        ours = strlen(*nm) == *len && !strncmp(name, *nm, *len);
    if (!old && is_shard_name(name, *len)) ours = 1;
    return ours && (pid == (long)getpid() || (kill((pid_t)pid, 0) != 0 && errno == ESRCH));
}

/* Removes from dir what killed writers left (stale_temporary); a checkpoint moved aside whose
 * replacement never arrived is put back instead. */
static MbStatus mb_remove_stale(const char *dir) {
    DIR *d = opendir(dir);
    struct dirent *e;
    MbStatus rc = MB_OK;
    size_t len;
    while (d && !rc && (e = readdir(d))) {
        if (!stale_temporary(e->d_name, &len)) continue;
        char *p = mb_path_join(dir, e->d_name), *base = p ? mb_strdup(p) : NULL;
        if (!base) {
            free(p);
            rc = MB_ERR_OOM;
            break;
        }
        base[strlen(dir) + (dir[strlen(dir) - 1] != '/') + len] = 0;
        if (strstr(e->d_name, ".old.") && !mb_is_dir(base)) {
            if (rename(p, base) != 0) rc = mb_fail(MB_ERR_IO, "%s: cannot restore as %s: %s", p, base, strerror(errno));
        } else {
            rc = mb_remove_path(p);
        }
        free(p), free(base);
    }
    if (d) closedir(d);
    return rc;
}

static MbStatus mb_copy_file(const char *from, const char *to) {
    char *text;
    size_t n;
    MbStatus rc = mb_read_file(from, &text, &n);
    if (!rc) rc = mb_write_file(to, text, n);
    free(text);
    return rc;
}

/* Creates the folder path and any missing parents (mkdir -p, as save_pretrained does). The
 * folders it made are appended to *made (stb_ds array of malloc'd paths, outermost first), so
 * that a failed command can remove what it created (mb_undo_mkdirs). */
static MbStatus mb_mkdir_p(const char *path, char ***made) {
    if (mb_is_dir(path)) return MB_OK;
    char *parent = mb_path_dirname(path);
    if (!parent) return MB_ERR_OOM;
    MbStatus rc = strcmp(parent, path) && strcmp(parent, ".") ? mb_mkdir_p(parent, made) : MB_OK;
    free(parent);
    if (rc) return rc;
    if (mkdir(path, 0755) == 0) {
        char *copy = made ? mb_strdup(path) : NULL;
        if (made && !copy) return rmdir(path), MB_ERR_OOM;
        if (made) arrput(*made, copy); /* (not one another process made meanwhile) */
        return MB_OK;
    }
    if (errno == EEXIST && mb_is_dir(path)) return MB_OK;
    return mb_fail(MB_ERR_IO, "%s: cannot create the folder: %s", path, strerror(errno));
}

/* present[i]: whether names[i] (NULL-terminated) is a file in dir (out of memory: counted as
 * present, so that it is never removed). */
static void mb_files_present(const char *dir, const char *const *names, int *present) {
    for (size_t i = 0; names[i]; i++) {
        char *p = mb_path_join(dir, names[i]);
        present[i] = !p || mb_is_file(p);
        free(p);
    }
}

/* Removes the files of names from dir that were not there before (present, of mb_files_present):
 * what a command that failed wrote, and nothing else. */
static void mb_remove_new_files(const char *dir, const char *const *names, const int *present) {
    for (size_t i = 0; names[i]; i++) {
        char *p = mb_path_join(dir, names[i]);
        if (p && !present[i]) remove(p);
        free(p);
    }
}

/* Refuses to let a command write over its own inputs: fails when the output folder `out` is
 * one of the inputs (files or folders; NULL entries are skipped) or would receive a file (one of
 * `names`, NULL-terminated) that is an input. */
static MbStatus mb_guard_output(const char *cmd, const char *out, const char *const *inputs, size_t n_inputs,
                                const char *const *names) {
    for (size_t i = 0; i < n_inputs; i++) {
        if (!inputs[i]) continue;
        if (mb_same_file(inputs[i], out))
            return mb_fail(MB_ERR_ARG, "%s: --output %s is the input %s: it would be written over --> choose "
                           "another --output folder", cmd, out, inputs[i]);
        for (const char *const *nm = names; *nm; nm++) {
            char *dst = mb_path_join(out, *nm);
            if (!dst) return MB_ERR_OOM;
            int same = mb_same_file(inputs[i], dst);
            free(dst);
            if (same)
                return mb_fail(MB_ERR_ARG, "%s: --output %s would write %s over the input %s --> choose another "
                               "--output folder", cmd, out, *nm, inputs[i]);
        }
    }
    return MB_OK;
}

/* Removes the folders mb_mkdir_p made, innermost first, when they are empty (the caller removes
 * its own files first; anything else put there meanwhile stays, and so does its folder), and frees
 * the list; with keep, frees it only. */
static void mb_undo_mkdirs(char ***made, int keep) {
    for (ptrdiff_t i = arrlen(*made) - 1; i >= 0; i--) {
        if (!keep) rmdir((*made)[i]);
        free((*made)[i]);
    }
    arrfree(*made);
}

/* ---- memory-mapped files (read-only) ---- */

typedef struct {
    const unsigned char *data;
    size_t size;
    int mapped; /* 1: munmap on close; 0: malloc'd copy (empty files, systems without mmap) */
} MbMap;

static MbStatus mb_map_file(const char *path, MbMap *m) {
    memset(m, 0, sizeof *m);
    int fd;
    MbStatus rc = mb_open_regular(path, &fd);
    if (rc) return rc;
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        close(fd);
        return mb_fail(MB_ERR_IO, "%s: cannot read: %s", path, strerror(errno));
    }
    m->size = (size_t)sb.st_size;
    if (m->size == 0) {
        close(fd);
        m->data = mb_calloc(1, 1);
        return m->data ? MB_OK : MB_ERR_OOM;
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

/* The CLOCK_REALTIME instant secs from now, for pthread_cond_timedwait */
MB_UNUSED static struct timespec mb_deadline_in(double secs) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double t = (double)ts.tv_sec + ts.tv_nsec * 1e-9 + secs;
    ts.tv_sec = (time_t)t, ts.tv_nsec = (long)((t - floor(t)) * 1e9);
    return ts;
}

MB_UNUSED static double mb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- progress and log lines (the terminal is one per process: its state is the one global) ---- */

static struct {
    pthread_mutex_t mu;
    int bar;           /* a bar is on stderr's current line */
    char line[160];    /* the bar's text, drawn again after a log line took it off */
    double drawn;      /* when it was last drawn (mb_now) */
    double logged;     /* the task's seconds at its last "still going" line (no terminal) */
} mb_console = {PTHREAD_MUTEX_INITIALIZER, 0, "", 0, 0};

static void console_clear_locked(void) {
    if (!mb_console.bar) return;
    fputs("\r\033[K", stderr); /* back to the line's start and erase it */
    fflush(stderr);
    mb_console.bar = 0;
}

/* A line on f with a bar taken off the terminal first and drawn again under it. */
static void console_vprint(FILE *f, const char *fmt, va_list ap) {
    pthread_mutex_lock(&mb_console.mu);
    int bar = mb_console.bar;
    console_clear_locked();
    vfprintf(f, fmt, ap);
    fflush(f);
    if (bar) {
        fprintf(stderr, "%s\033[K", mb_console.line);
        fflush(stderr);
        mb_console.bar = 1;
    }
    pthread_mutex_unlock(&mb_console.mu);
}

void mb_say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    console_vprint(stdout, fmt, ap);
    va_end(ap);
}

/* mb_say for stderr: the library's notes ("medbot: note: ...") */
MB_UNUSED static void mb_note(const char *fmt, ...) MB_PRINTF(1, 2);
MB_UNUSED static void mb_note(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    console_vprint(stderr, fmt, ap);
    va_end(ap);
}

/* "12.3 GB", "512 kB", "161 MB" (bytes) or "12 tensors" */
static void progress_amount(char *out, size_t n, double x, const char *unit) {
    if (!unit) unit = "";
    if (strcmp(unit, "bytes")) { /* "1 step", "36 steps" */
        size_t len = strlen(unit);
        snprintf(out, n, "%.0f %.*s", x, (int)(x == 1 && len > 1 && unit[len - 1] == 's' ? len - 1 : len), unit);
        return;
    }
    const char *u[] = {"B", "kB", "MB", "GB", "TB"};
    int k = 0;
    while (x >= 1000 && k < 4) x /= 1000, k++;
    snprintf(out, n, k && x < 100 ? "%.1f %s" : "%.0f %s", x, u[k]);
}

static void progress_hms(char *out, size_t n, double s) {
    long t = (long)(s + 0.5);
    if (t >= 3600) snprintf(out, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
    else snprintf(out, n, "%ld:%02ld", t / 60, t % 60);
}

/* ", 161 MB/s" or ", 2 steps/s": the rate since the task began (counted from its start), or ""
 * while there is none; returns it per second (0: none) */
static double progress_rate(char *out, size_t n, const MbProgressEvent *ev) {
    double per_s = ev->seconds > 0.05 ? (ev->done - ev->start) / ev->seconds : 0;
    char q[32];
    out[0] = 0;
    if (per_s <= 0) return 0;
    if (ev->unit && strcmp(ev->unit, "bytes")) snprintf(q, sizeof q, "%.3g %s", per_s, ev->unit);
    else progress_amount(q, sizeof q, per_s, ev->unit);
    snprintf(out, n, ", %s/s", q);
    return per_s;
}

/* "6.2 GB of 16.1 GB (38%), 1.2 GB/s, 0:08 left" or "12/36 steps (33%), ...": what is known */
static void progress_figures(char *out, size_t n, const MbProgressEvent *ev) {
    char done[32], total[32], rate[48], left[40] = "";
    double per_s = progress_rate(rate, sizeof rate, ev);
    progress_amount(done, sizeof done, ev->done, ev->unit);
    progress_amount(total, sizeof total, ev->total, ev->unit);
    if (per_s > 0 && ev->total > ev->done && ev->state != MB_PROGRESS_END) {
        char t[24];
        progress_hms(t, sizeof t, (ev->total - ev->done) / per_s);
        snprintf(left, sizeof left, ", %s left", t);
    }
    if (ev->total > 0 && ev->unit && strcmp(ev->unit, "bytes"))
        snprintf(out, n, "%.0f/%s (%.0f%%)%s%s", ev->done, total, 100.0 * ev->done / ev->total, rate, left);
    else if (ev->total > 0)
        snprintf(out, n, "%s of %s (%.0f%%)%s%s", done, total, 100.0 * ev->done / ev->total, rate, left);
    else snprintf(out, n, "%s%s", done, rate);
}

/* The terminal's width in columns (80 when it does not say) */
static int progress_columns(void) {
#if defined(TIOCGWINSZ)
    struct winsize ws;
    if (ioctl(fileno(stderr), TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20) return ws.ws_col;
#endif
    return 80;
}

/* The bar: "loading weights/x  [#########...........]  6.2 GB of 16.1 GB (38%), ..." on one terminal
 * line, cut to the terminal's width less one (a line that wrapped could not be taken off again),
 * at a character's start */
static void progress_draw_locked(const MbProgressEvent *ev) {
    char fig[160], line[400], bar[24];
    int fill = ev->total > 0 ? (int)(20.0 * MB_MIN(1.0, ev->done / ev->total)) : 0;
    for (int i = 0; i < 20; i++) bar[i] = i < fill ? '#' : '.';
    bar[20] = 0;
    progress_figures(fig, sizeof fig, ev);
    if (ev->total > 0) snprintf(line, sizeof line, "%s [%s] %s%s%s", ev->task, bar, fig, ev->note ? "  " : "", ev->note ? ev->note : "");
    else snprintf(line, sizeof line, "%s: %s%s%s", ev->task, fig, ev->note ? "  " : "", ev->note ? ev->note : "");
    size_t cut = MB_MIN(strlen(line), MB_MIN(sizeof mb_console.line, (size_t)progress_columns()) - 1);
    while (cut > 0 && ((unsigned char)line[cut] & 0xC0) == 0x80) cut--; /* (a UTF-8 continuation byte) */
    snprintf(mb_console.line, sizeof mb_console.line, "%.*s", (int)cut, line);
    fprintf(stderr, "\r%s\033[K", mb_console.line);
    fflush(stderr);
    mb_console.bar = 1;
}

/* Whether stderr is a terminal a bar can be drawn on (not one that cannot move the cursor) */
static int progress_terminal(void) {
    const char *term = getenv("TERM");
    return isatty(fileno(stderr)) && !(term && !strcmp(term, "dumb"));
}

void mb_progress_print(void *ctx, const MbProgressEvent *ev) {
    const MbProgressLines *where = ctx;
    FILE *out = where && where->out ? where->out : stdout;
    double min_seconds = where ? where->min_seconds : 1.0;
    int tty = !(where && where->lines_only) && progress_terminal();
    double now = mb_now();
    char fig[160], t[24];
    pthread_mutex_lock(&mb_console.mu);
    if (ev->state == MB_PROGRESS_BEGIN) mb_console.logged = 0;
    if (ev->state != MB_PROGRESS_END && tty && (ev->state == MB_PROGRESS_BEGIN || now - mb_console.drawn >= 0.1)) {
        progress_draw_locked(ev);
        mb_console.drawn = now;
    } else if (ev->state == MB_PROGRESS_STEP && !tty && ev->seconds - mb_console.logged >= 30) {
        progress_figures(fig, sizeof fig, ev);
        fprintf(out, "%s: %s%s%s\n", ev->task, fig, ev->note ? ", " : "", ev->note ? ev->note : "");
        fflush(out);
        mb_console.logged = ev->seconds;
    } else if (ev->state == MB_PROGRESS_END && (ev->seconds < min_seconds || !ev->ok)) { /* a failure: the caller's message says it */
        console_clear_locked();
    } else if (ev->state == MB_PROGRESS_END) { /* "loading x: 33.5 MB in 0.4 s, 84 MB/s" */
        char done[32], rate[48];
        console_clear_locked();
        progress_amount(done, sizeof done, ev->done, ev->unit);
        if (ev->seconds < 60) snprintf(t, sizeof t, "%.1f s", ev->seconds);
        else progress_hms(t, sizeof t, ev->seconds);
        progress_rate(rate, sizeof rate, ev);
        fprintf(out, "%s: %s in %s%s%s%s\n", ev->task, done, t, rate, ev->note ? ", " : "", ev->note ? ev->note : "");
        fflush(out);
    }
    pthread_mutex_unlock(&mb_console.mu);
}

/* A task of the library reporting through an MbProgress (none: silent): task_begin, task_add as
 * work gets done (events at most ten a second), task_end. */
typedef struct {
    const MbProgress *p;
    MbProgressEvent ev;
    double t0, sent;
} MbTask;

static void task_send(MbTask *t, MbProgressState state) {
    double now = mb_now();
    if (!t->p || !t->p->fn) return;
    if (state == MB_PROGRESS_STEP && now - t->sent < 0.1) return;
    t->ev.state = state, t->ev.seconds = now - t->t0, t->sent = now;
    t->p->fn(t->p->ctx, &t->ev);
}

MB_UNUSED static void task_begin(MbTask *t, const MbProgress *p, const char *task, const char *unit, double start,
                                 double total) {
    memset(t, 0, sizeof *t);
    t->p = p, t->ev.task = task, t->ev.unit = unit, t->ev.total = total, t->t0 = mb_now();
    t->ev.start = t->ev.done = start;
    task_send(t, MB_PROGRESS_BEGIN);
}

MB_UNUSED static void task_add(MbTask *t, double amount) {
    t->ev.done += amount;
    task_send(t, MB_PROGRESS_STEP);
}

MB_UNUSED static void task_end(MbTask *t, int ok) {
    t->ev.ok = ok;
    task_send(t, MB_PROGRESS_END);
}

/* ---- thread pool ----
 * mb_pool_run(pool, fn, ctx) calls fn(ctx, tid, n) once on each of the n threads (the caller is
 * thread 0) and returns when all are done. Ops split their work by tid.
 * Decode runs ~150 pool runs a token, a few microseconds of work each: a worker woken through a
 * condition variable costs 20-90 us, more than the work. So a worker that has finished waits for
 * the next run spinning for at most MB_POOL_SPIN_US, and only then sleeps on the condition
 * variable (as does the caller waiting for the workers): busy between the runs of one forward,
 * asleep while the machine does anything else (sampling, reading a prompt, an idle chat). */

typedef void (*MbTaskFn)(void *ctx, int tid, int nthreads);

#define MB_POOL_SPIN_US 100.0

typedef struct {
    int n;
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t start, done;
    unsigned long generation; /* atomic: a new run was published (fn, ctx written before it) */
    int pending;              /* atomic: workers still running the current run */
    int sleepers;             /* workers waiting on `start` (under mu) */
    int quit;                 /* atomic */
    MbTaskFn fn;
    void *ctx;
} MbPool;

typedef struct {
    MbPool *pool;
    int tid;
} MbPoolArg;

/* one iteration of a spin-wait: lets the sibling hyper-thread run */
static void mb_spin_pause(void) {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    __builtin_ia32_pause();
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spins until *v != old or MB_POOL_SPIN_US pass; returns the last value read. */
static unsigned long mb_spin_while_ul(const unsigned long *v, unsigned long old) {
    double t0 = 0;
    for (unsigned i = 1;; i++) {
        unsigned long now = __atomic_load_n(v, __ATOMIC_ACQUIRE);
        if (now != old) return now;
        mb_spin_pause();
        if ((i & 255) == 0) { /* the clock every 256 pauses (~10 us) */
            double t = mb_now();
            if (t0 == 0) t0 = t;
            else if (t - t0 > MB_POOL_SPIN_US * 1e-6) return now;
        }
    }
}

static void *mb_pool_worker(void *arg) {
    MbPoolArg *a = arg;
    MbPool *p = a->pool;
    int tid = a->tid;
    free(a);
    unsigned long seen = 0;
    for (;;) {
        unsigned long g = mb_spin_while_ul(&p->generation, seen);
        if (g == seen) { /* nothing came while spinning: sleep */
            pthread_mutex_lock(&p->mu);
            p->sleepers++;
            while (__atomic_load_n(&p->generation, __ATOMIC_ACQUIRE) == seen && !__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE))
                pthread_cond_wait(&p->start, &p->mu);
            p->sleepers--;
            pthread_mutex_unlock(&p->mu);
        }
        if (__atomic_load_n(&p->quit, __ATOMIC_ACQUIRE)) return NULL;
        seen = __atomic_load_n(&p->generation, __ATOMIC_ACQUIRE);
        p->fn(p->ctx, tid, p->n);
        if (__atomic_sub_fetch(&p->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&p->mu); /* the caller may be asleep on `done` */
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static int mb_cpu_count(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)MB_MIN(n, 256) : 1;
}

/* pthread_create for the engine's own threads: they take no asynchronous signal (Ctrl-C and the
 * like reach the host program's threads, which may be waiting in a read that should return). */
static int mb_thread_start(pthread_t *t, void *(*fn)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV), sigdelset(&all, SIGBUS), sigdelset(&all, SIGFPE), sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(t, NULL, fn, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

/* A pool of n threads, or NULL (out of memory, message set); a thread that cannot start leaves
 * the pool smaller. */
static MbPool *mb_pool_new(int n) {
    MbPool *p = mb_calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = n < 1 ? 1 : n;
    p->threads = mb_calloc((size_t)p->n, sizeof *p->threads);
    if (!p->threads) return free(p), NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->start, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 1; i < p->n; i++) {
        MbPoolArg *a = mb_malloc(sizeof *a);
        if (!a) {
            p->n = i; /* run with the threads we got */
            break;
        }
        a->pool = p;
        a->tid = i;
        if (mb_thread_start(&p->threads[i], mb_pool_worker, a) != 0) {
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
    p->fn = fn;
    p->ctx = ctx;
    __atomic_store_n(&p->pending, p->n - 1, __ATOMIC_RELAXED);
    pthread_mutex_lock(&p->mu); /* a worker checks generation under mu before it sleeps */
    __atomic_add_fetch(&p->generation, 1, __ATOMIC_RELEASE);
    if (p->sleepers) pthread_cond_broadcast(&p->start);
    pthread_mutex_unlock(&p->mu);
    fn(ctx, 0, p->n);
    /* the workers: spin a while (they finish within microseconds of each other), then sleep */
    double t0 = 0;
    for (unsigned i = 1; __atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0; i++) {
        mb_spin_pause();
        if ((i & 255) == 0) {
            double t = mb_now();
            if (t0 == 0) t0 = t;
            else if (t - t0 > MB_POOL_SPIN_US * 1e-6) break;
        }
    }
    if (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0) {
        pthread_mutex_lock(&p->mu);
        while (__atomic_load_n(&p->pending, __ATOMIC_ACQUIRE) > 0) pthread_cond_wait(&p->done, &p->mu);
        pthread_mutex_unlock(&p->mu);
    }
}

static void mb_pool_free(MbPool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->quit, 1, __ATOMIC_RELEASE);
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
    if (len >= sizeof small && !(buf = mb_malloc(len + 1))) return MB_ERR_OOM;
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

/* Reads and parses the JSON file at path (messages name it). */
static MbStatus json_read_file(const char *path, MbJsonDoc *doc) {
    char *text;
    size_t n;
    memset(doc, 0, sizeof *doc);
    MbStatus rc = mb_read_file(path, &text, &n);
    if (rc) return rc;
    rc = json_parse(path, text, n, doc);
    free(text);
    return rc;
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

/* Writes v (of doc d, parsed from src) as JSON, objects and arrays indented two spaces per
 * level; numbers keep their text in src. */
static void json_write_value(char **sb, const MbJsonDoc *d, const MbJson *v, const char *src, int depth) {
    if (v->kind == MB_JSON_STRING) sb_json_string(sb, json_str(d, v), v->len);
    else if (v->kind == MB_JSON_BOOL) sb_printf(sb, v->boolean ? "true" : "false");
    else if (v->kind == MB_JSON_NULL) sb_printf(sb, "null");
    else if (v->kind == MB_JSON_NUMBER) {
        size_t k = v->at;
        while (src[k] && strchr("+-.eE0123456789", src[k])) k++;
        sb_printf(sb, "%.*s", (int)(k - v->at), src + v->at);
    } else {
        int obj = v->kind == MB_JSON_OBJECT;
        sb_printf(sb, "%c", obj ? '{' : '[');
        for (const MbJson *c = json_first(d, v); c; c = json_next(d, c)) {
            sb_printf(sb, "%s\n%*s", c == json_first(d, v) ? "" : ",", 2 * (depth + 1), "");
            if (obj) sb_json_string(sb, json_key(d, c), c->keylen), sb_printf(sb, ": ");
            json_write_value(sb, d, c, src, depth + 1);
        }
        if (v->count) sb_printf(sb, "\n%*s", 2 * depth, "");
        sb_printf(sb, "%c", obj ? '}' : ']');
    }
}

/* A JSON number, or null for NaN and infinity (which JSON cannot hold). */
static void sb_json_number(char **sb, double x, int digits) {
    if (isfinite(x)) sb_printf(sb, "%.*g", digits, x);
    else sb_printf(sb, "null");
}

/* ---- text files: encodings ---- */

/* The encoding of a text file that is UTF-16 or UTF-32 (its byte-order mark, or the NUL bytes that
 * ASCII text has there), else NULL; *bom: the length of a UTF-8 byte-order mark to skip (0 or 3). */
static const char *text_wide_encoding(const char *text, size_t n, size_t *bom) {
    const unsigned char *s = (const unsigned char *)text;
    *bom = n >= 3 && s[0] == 0xEF && s[1] == 0xBB && s[2] == 0xBF ? 3 : 0;
    if (n >= 4 && s[0] == 0xFF && s[1] == 0xFE && !s[2] && !s[3]) return "UTF-32 (little-endian)";
    if (n >= 4 && !s[0] && !s[1] && s[2] == 0xFE && s[3] == 0xFF) return "UTF-32 (big-endian)";
    if (n >= 2 && s[0] == 0xFF && s[1] == 0xFE) return "UTF-16 (little-endian)";
    if (n >= 2 && s[0] == 0xFE && s[1] == 0xFF) return "UTF-16 (big-endian)";
    if (n >= 4 && s[0] && !s[1] && !s[2] && !s[3]) return "UTF-32 (little-endian)";
    if (n >= 4 && !s[0] && !s[1] && !s[2] && s[3]) return "UTF-32 (big-endian)";
    if (n >= 2 && s[0] && !s[1]) return "UTF-16 (little-endian)";
    if (n >= 2 && !s[0] && s[1]) return "UTF-16 (big-endian)";
    return NULL;
}

/* ---- key: value files (--config): the flat YAML of training configs ----
 * TRL and PEFT configs, and the card's block of hyperparameters, are flat YAML mappings. This
 * reader takes that subset and refuses the rest with "FILE:LINE: problem":
 *   key: value          a plain, 'single-quoted' or "double-quoted" scalar (\" \\ \/ \t \uXXXX)
 *   key: [a, 'b']       a list on one line          both become the value "a,b"
 *   key:                a list below its key, one item a line
 *     - a
 *   # comments (outside quotes), blank lines, a leading ---, a UTF-8 BOM, the card's ``` fences.
 * Refused: nested mappings, anchors and aliases, tags, block scalars (| >), values over several
 * lines, flow mappings, a second document, tabs as indentation, duplicate keys, control
 * characters, invalid UTF-8, UTF-16/32 files. Keys and values never hold a line break. */

typedef struct {
    const char *name;  /* the file, for messages */
    int line;          /* 1-based */
    MbKv *kv;          /* stb_ds array */
    ptrdiff_t list;    /* the entry whose list the `- item` lines below it fill, or -1 */
    int list_indent;   /* the indentation of those items; -1 before the first */
    int started;       /* an entry was read: a later --- would start a second document */
} MbKvParser;

static MbStatus kv_fail(const MbKvParser *p, const char *fmt, ...) MB_PRINTF(2, 3);
static MbStatus kv_fail(const MbKvParser *p, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return mb_fail(MB_ERR_FORMAT, "%s:%d: %s", p->name, p->line, msg);
}

static int kv_blank(char c) { return c == ' ' || c == '\t'; }

/* How many of the first max bytes of s[0..n) (valid UTF-8) to quote without cutting a character */
static int kv_clip(const char *s, size_t n, size_t max) {
    size_t k = MB_MIN(n, max);
    while (k > 0 && k < n && ((unsigned char)s[k] & 0xC0) == 0x80) k--;
    return (int)k;
}

/* 1 when s[i] ends a token: the end of the line or a blank follows */
static int kv_sep(const char *s, size_t n, size_t i) { return i >= n || kv_blank(s[i]); }

/* Why a scalar cannot start at s[i] (a YAML construct this reader does not implement), or NULL. */
static const char *kv_indicator(const char *s, size_t n, size_t i) {
    switch (s[i]) {
    case '&': return "anchors (&name) are not supported";
    case '*': return "aliases (*name) are not supported";
    case '!': return "tags (!tag) are not supported";
    case '|': case '>': return "multi-line values (| and >) are not supported";
    case '{': case '}': return "flow mappings ({...}) are not supported";
    case '%': return "directives (%) are not supported";
    case '@': case '`': return "'@' and '`' are reserved in YAML: quote the value";
    case ',': case ']': return "a value cannot start with ',' or ']': quote it";
    case '?': return kv_sep(s, n, i + 1) ? "complex keys (? key) are not supported" : NULL;
    case ':': return kv_sep(s, n, i + 1) ? "a key is missing before ':'" : NULL;
    case '-': return kv_sep(s, n, i + 1) ? "a list item here: lists go below their key (- item) or in [a, b]" : NULL;
    }
    return NULL;
}

/* Nothing but blanks and a comment may follow a value at s[i]. */
static MbStatus kv_rest(const MbKvParser *p, const char *s, size_t n, size_t i) {
    size_t j = i;
    while (j < n && kv_blank(s[j])) j++;
    if (j == n || (s[j] == '#' && j > i)) return MB_OK;
    return kv_fail(p, "unexpected '%.*s' after the value", kv_clip(s + j, n - j, 40), s + j);
}

/* One escape of a double-quoted scalar at s[*i] (after the backslash), appended to *v. */
static MbStatus kv_escape(const MbKvParser *p, const char *s, size_t n, size_t *i, char **v) {
    char e = *i < n ? s[(*i)++] : 0;
    if (e == '"' || e == '\\' || e == '/') return arrput(*v, e), MB_OK;
    if (e == 't') return arrput(*v, '\t'), MB_OK;
    if (e != 'u') {
        if (e > ' ' && e < 0x7F) return kv_fail(p, "unsupported escape '\\%c' (values are one line)", e);
        return kv_fail(p, "unsupported escape in a double-quoted value");
    }
    unsigned cp = 0;
    for (int k = 0; k < 4; k++, (*i)++) {
        char c = *i < n ? s[*i] : 0;
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return kv_fail(p, "'\\u' needs 4 hex digits");
        cp = cp * 16 + (unsigned)d;
    }
    if ((cp < 0x20 && cp != '\t') || cp == 0x7F || (cp >= 0xD800 && cp <= 0xDFFF))
        return kv_fail(p, "'\\u%04X' is a control character or a lone surrogate", cp);
    utf8_put(v, cp);
    return MB_OK;
}

/* A quoted scalar at s[*i] (its opening quote) into *out (malloc'd); *i moves past it. */
static MbStatus kv_quoted(const MbKvParser *p, const char *s, size_t n, size_t *i, char **out) {
    char q = s[(*i)++], *v = NULL; /* stb_ds */
    MbStatus rc = MB_OK;
    for (;;) {
        if (*i >= n) {
            rc = kv_fail(p, "unterminated %s-quoted value (quoted values end on their line)", q == '"' ? "double" : "single");
            break;
        }
        char c = s[(*i)++];
        if (c == q && q == '\'' && *i < n && s[*i] == '\'') arrput(v, '\''), (*i)++; /* '' is a quote */
        else if (c == q) break;
        else if (c == '\\' && q == '"') rc = kv_escape(p, s, n, i, &v);
        else arrput(v, c);
        if (rc) break;
    }
    arrput(v, 0);
    *out = rc ? NULL : mb_strdup(v);
    arrfree(v);
    return rc || *out ? rc : MB_ERR_OOM;
}

/* A plain scalar from s[*i] to a comment, the end of the line or (flow: inside [...]) a ',' or
 * ']', without the blanks around it, into *out (malloc'd); *i stops there. */
static MbStatus kv_plain(const MbKvParser *p, const char *s, size_t n, size_t *i, int flow, char **out) {
    const char *why = kv_indicator(s, n, *i);
    if (why) return kv_fail(p, "%s", why);
    size_t start = *i, end = start, j = start;
    for (; j < n; j++) {
        char c = s[j];
        if (c == '#' && j > start && kv_blank(s[j - 1])) break;
        if (flow && (c == ',' || c == ']')) break;
        if (c == ':' && (kv_sep(s, n, j + 1) || (flow && (s[j + 1] == ',' || s[j + 1] == ']'))))
            return kv_fail(p, "':' in a value (nested mappings are not supported; quote the value)");
        if (flow && (c == '[' || c == '{' || c == '}'))
            return kv_fail(p, "'%c' inside [...]: nested lists and mappings are not supported", c);
        if (!kv_blank(c)) end = j + 1;
    }
    *i = end;
    if (!(*out = mb_malloc(end - start + 1))) return MB_ERR_OOM;
    memcpy(*out, s + start, end - start);
    (*out)[end - start] = 0;
    return MB_OK;
}

/* A scalar at s[*i]: quoted or plain (see kv_plain). */
static MbStatus kv_scalar(const MbKvParser *p, const char *s, size_t n, size_t *i, int flow, char **out) {
    if (s[*i] == '"' || s[*i] == '\'') return kv_quoted(p, s, n, i, out);
    return kv_plain(p, s, n, i, flow, out);
}

/* Appends a list item to *value ("a,b"). */
static MbStatus kv_list_add(const MbKvParser *p, char **value, char *item) {
    MbStatus rc = MB_OK;
    if (!item[0]) rc = kv_fail(p, "an empty list item");
    else if (strchr(item, ',')) rc = kv_fail(p, "a list item holds a comma: '%.*s'", kv_clip(item, strlen(item), 60), item);
    if (!rc) {
        size_t a = strlen(*value), b = strlen(item);
        char *v = mb_malloc(a + b + 2);
        if (v) {
            memcpy(v, *value, a);
            if (a) v[a++] = ',';
            memcpy(v + a, item, b + 1);
            free(*value);
            *value = v;
        } else {
            rc = MB_ERR_OOM;
        }
    }
    free(item);
    return rc;
}

/* [a, 'b', "c"] at s[*i] (one line; a trailing comma is allowed) into *value. */
static MbStatus kv_flow_list(const MbKvParser *p, const char *s, size_t n, size_t *i, char **value) {
    (*i)++;
    for (;;) {
        while (*i < n && kv_blank(s[*i])) (*i)++;
        if (*i >= n || s[*i] == '#') return kv_fail(p, "unterminated '[' (a list in [...] ends on its line)");
        if (s[*i] == ']') break;
        if (s[*i] == ',') return kv_fail(p, "an empty item in [...]");
        if (s[*i] == '[' || s[*i] == '{') return kv_fail(p, "nested lists and mappings are not supported");
        char *item;
        MbStatus rc = kv_scalar(p, s, n, i, 1, &item);
        if (!rc) rc = kv_list_add(p, value, item);
        if (rc) return rc;
        while (*i < n && kv_blank(s[*i])) (*i)++;
        if (*i < n && s[*i] == ',') (*i)++;
        else if (*i < n && s[*i] == ']') break;
        else if (*i < n && s[*i] != '#') return kv_fail(p, "expected ',' or ']' in [...]");
    }
    (*i)++;
    return kv_rest(p, s, n, *i);
}

/* The value after "key:" at s[i], into the new entry e: empty (a list may follow on the next lines),
 * [a, b], or a scalar. */
static MbStatus kv_value(MbKvParser *p, const char *s, size_t n, size_t i, MbKv *e) {
    while (i < n && kv_blank(s[i])) i++;
    if ((i == n || s[i] == '#' || s[i] == '[') && !(e->value = mb_strdup(""))) return MB_ERR_OOM;
    if (i == n || s[i] == '#') {
        p->list = arrlen(p->kv), p->list_indent = -1;
        return MB_OK;
    }
    if (s[i] == '[') return kv_flow_list(p, s, n, &i, &e->value);
    MbStatus rc = kv_scalar(p, s, n, &i, 0, &e->value);
    return rc ? rc : kv_rest(p, s, n, i);
}

/* "key: value" at the start of a line. */
static MbStatus kv_entry(MbKvParser *p, const char *s, size_t n) {
    MbKv e = {NULL, NULL, p->line};
    size_t i = 0, colon = n;
    MbStatus rc = MB_OK;
    p->list = -1;
    if (s[0] == '"' || s[0] == '\'') {
        if ((rc = kv_quoted(p, s, n, &i, &e.key))) return rc;
        while (i < n && kv_blank(s[i])) i++;
        colon = i < n && s[i] == ':' && kv_sep(s, n, i + 1) ? i : n;
    } else {
        const char *why = s[0] == '[' ? "a list as a key is not supported" : kv_indicator(s, n, 0);
        if (why) return kv_fail(p, "%s", why);
        for (i = 0; i < n && colon == n && !(s[i] == '#' && i && kv_blank(s[i - 1])); i++)
            if (s[i] == ':' && kv_sep(s, n, i + 1)) colon = i;
        for (i = colon; i > 0 && kv_blank(s[i - 1]);) i--;
        if (!(e.key = mb_malloc(i + 1))) return MB_ERR_OOM;
        memcpy(e.key, s, i);
        e.key[i] = 0;
    }
    if (colon == n) rc = kv_fail(p, "expected 'key: value', got '%.*s'", kv_clip(s, n, 60), s);
    else if (!e.key[0]) rc = kv_fail(p, "an empty key");
    for (ptrdiff_t k = 0; !rc && k < arrlen(p->kv); k++)
        if (!strcmp(p->kv[k].key, e.key))
            rc = kv_fail(p, "duplicate key '%.*s' (first at line %d)", kv_clip(e.key, strlen(e.key), 60), e.key,
                         p->kv[k].line);
    if (!rc) rc = kv_value(p, s, n, colon + 1, &e);
    if (rc) {
        p->list = -1;
        free(e.key), free(e.value);
        return rc;
    }
    arrput(p->kv, e);
    p->started = 1;
    return MB_OK;
}

/* "- item" below a key with an empty value, indented by `indent` spaces. */
static MbStatus kv_item(MbKvParser *p, const char *s, size_t n, int indent) {
    if (p->list < 0) return kv_fail(p, "a list item with no key above it");
    if (p->list_indent >= 0 && indent != p->list_indent)
        return kv_fail(p, "list items at different indentations (%d and %d spaces)", p->list_indent, indent);
    p->list_indent = indent;
    size_t i = (size_t)indent + 1;
    while (i < n && kv_blank(s[i])) i++;
    if (i == n || s[i] == '#') return kv_fail(p, "an empty list item");
    if ((s[i] == '-' && kv_sep(s, n, i + 1)) || s[i] == '[') return kv_fail(p, "nested lists are not supported");
    char *item;
    MbStatus rc = kv_scalar(p, s, n, &i, 0, &item);
    if (!rc && (rc = kv_rest(p, s, n, i))) free(item);
    return rc ? rc : kv_list_add(p, &p->kv[p->list].value, item);
}

/* One line s[0..n) (without its line break). */
static MbStatus kv_line(MbKvParser *p, const char *s, size_t n) {
    for (size_t i = 0; i < n;) { /* YAML text: UTF-8, printable */
        unsigned char c = (unsigned char)s[i];
        size_t k = utf8_valid_len((const unsigned char *)s + i, n - i);
        if ((c < 0x20 && c != '\t') || c == 0x7F) return kv_fail(p, "a control character (byte 0x%02x)", c);
        if (!k) return kv_fail(p, "invalid UTF-8");
        i += k;
    }
    size_t ws = 0, sp = 0;
    while (ws < n && kv_blank(s[ws])) ws++;
    while (sp < n && s[sp] == ' ') sp++;
    if (ws == n || s[ws] == '#' || (n - ws >= 3 && !memcmp(s + ws, "```", 3))) return MB_OK;
    if (sp < ws) return kv_fail(p, "a tab in the indentation (YAML indents with spaces)");
    if (s[sp] == '-' && kv_sep(s, n, sp + 1)) return kv_item(p, s, n, (int)sp);
    if (sp > 0) return kv_fail(p, "an indented line: nested mappings and values over several lines are not supported");
    p->list = -1;
    if (n >= 3 && !memcmp(s, "---", 3) && kv_sep(s, n, 3)) {
        if (p->started) return kv_fail(p, "a second document (---): one document a file");
        return kv_rest(p, s, n, 3);
    }
    if (n >= 3 && !memcmp(s, "...", 3) && kv_sep(s, n, 3)) return kv_fail(p, "the document end marker (...) is not supported");
    return kv_entry(p, s, n);
}

void mb_kv_free(MbKv *kv, size_t count) {
    for (size_t i = 0; i < count; i++) free(kv[i].key), free(kv[i].value);
    arrfree(kv);
}

MbStatus mb_kv_parse(const char *name, const char *text, size_t n, MbKv **out, size_t *count) {
    *out = NULL, *count = 0;
    MbKvParser p = {name, 1, NULL, -1, -1, 0};
    size_t bom;
    const char *wide = text_wide_encoding(text, n, &bom);
    if (wide) return kv_fail(&p, "the file is %s --> save it as UTF-8", wide);
    MbStatus rc = MB_OK;
    p.line = 0;
    for (size_t at = bom; !rc && at < n;) {
        size_t end = at;
        while (end < n && text[end] != '\n' && text[end] != '\r') end++;
        p.line++;
        rc = kv_line(&p, text + at, end - at);
        at = end + (end + 1 < n && text[end] == '\r' && text[end + 1] == '\n' ? 2 : 1);
    }
    if (rc) {
        mb_kv_free(p.kv, (size_t)arrlen(p.kv));
        return rc;
    }
    *out = p.kv, *count = (size_t)arrlen(p.kv);
    return MB_OK;
}

MbStatus mb_kv_read(const char *path, MbKv **out, size_t *count) {
    char *text;
    size_t n;
    *out = NULL, *count = 0;
    MbStatus rc = mb_read_file(path, &text, &n);
    if (rc) return rc;
    rc = mb_kv_parse(path, text, n, out, count);
    free(text);
    return rc;
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

/* ---- SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104) ----
 * For the job fingerprint the ranks compare at the rendezvous, and for the proof that a rank knows
 * MEDBOT_RDV_SECRET without sending it. Checked against NIST's and RFC 4231's vectors. */

typedef struct {
    uint32_t h[8];
    uint64_t bytes;          /* message length so far */
    unsigned char block[64]; /* a partial block */
    size_t fill;
} MbSha256;

static const uint32_t mb_sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
    0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
    0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
    0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
    0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
    0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
    0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

static uint32_t rotr32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

/* one 64-byte block into the state h (FIPS 180-4, 6.2.2) */
static void sha256_block(uint32_t h[8], const unsigned char *p) {
    uint32_t w[64], v[8];
    for (int t = 0; t < 16; t++)
        w[t] = (uint32_t)p[4 * t] << 24 | (uint32_t)p[4 * t + 1] << 16 | (uint32_t)p[4 * t + 2] << 8 | p[4 * t + 3];
    for (int t = 16; t < 64; t++) {
        uint32_t s0 = rotr32(w[t - 15], 7) ^ rotr32(w[t - 15], 18) ^ (w[t - 15] >> 3);
        uint32_t s1 = rotr32(w[t - 2], 17) ^ rotr32(w[t - 2], 19) ^ (w[t - 2] >> 10);
        w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    memcpy(v, h, sizeof v); /* a b c d e f g h */
    for (int t = 0; t < 64; t++) {
        uint32_t S1 = rotr32(v[4], 6) ^ rotr32(v[4], 11) ^ rotr32(v[4], 25), ch = (v[4] & v[5]) ^ (~v[4] & v[6]);
        uint32_t S0 = rotr32(v[0], 2) ^ rotr32(v[0], 13) ^ rotr32(v[0], 22);
        uint32_t maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
        uint32_t t1 = v[7] + S1 + ch + mb_sha256_k[t] + w[t], t2 = S0 + maj;
        memmove(v + 1, v, 7 * sizeof *v); /* h = g, ..., b = a */
        v[4] += t1;                       /* e = d + t1 */
        v[0] = t1 + t2;
    }
    for (int i = 0; i < 8; i++) h[i] += v[i];
}

static void sha256_init(MbSha256 *s) {
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memset(s, 0, sizeof *s);
    memcpy(s->h, h0, sizeof h0);
}

static void sha256_update(MbSha256 *s, const void *data, size_t n) {
    const unsigned char *p = data;
    s->bytes += n;
    while (n) {
        if (s->fill == 0 && n >= 64) {
            sha256_block(s->h, p);
            p += 64, n -= 64;
            continue;
        }
        size_t k = MB_MIN(64 - s->fill, n);
        memcpy(s->block + s->fill, p, k);
        s->fill += k, p += k, n -= k;
        if (s->fill == 64) sha256_block(s->h, s->block), s->fill = 0;
    }
}

static void sha256_final(MbSha256 *s, unsigned char out[32]) {
    uint64_t bits = s->bytes * 8;
    unsigned char pad[72] = {0x80}; /* 0x80, zeros to 56 mod 64, the length in bits (big-endian) */
    size_t npad = (s->fill < 56 ? 56 : 120) - s->fill;
    for (int i = 0; i < 8; i++) pad[npad + (size_t)i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, pad, npad + 8);
    for (int i = 0; i < 32; i++) out[i] = (unsigned char)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}

static void sha256(const void *data, size_t n, unsigned char out[32]) {
    MbSha256 s;
    sha256_init(&s);
    sha256_update(&s, data, n);
    sha256_final(&s, out);
}

typedef struct {
    MbSha256 inner, outer;
} MbHmac;

static void hmac_init(MbHmac *m, const void *key, size_t n) {
    unsigned char k[64] = {0}, pad[64];
    if (n > 64) sha256(key, n, k); /* a key longer than a block is hashed first */
    else if (n) memcpy(k, key, n);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    sha256_init(&m->inner), sha256_update(&m->inner, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    sha256_init(&m->outer), sha256_update(&m->outer, pad, 64);
}

static void hmac_update(MbHmac *m, const void *data, size_t n) { sha256_update(&m->inner, data, n); }

static void hmac_final(MbHmac *m, unsigned char out[32]) {
    unsigned char ih[32];
    sha256_final(&m->inner, ih);
    sha256_update(&m->outer, ih, 32);
    sha256_final(&m->outer, out);
}

/* a == b over n bytes, in a time that does not depend on where they differ */
static int mb_equal_ct(const unsigned char *a, const unsigned char *b, size_t n) {
    unsigned d = 0;
    for (size_t i = 0; i < n; i++) d |= (unsigned)(a[i] ^ b[i]);
    return d == 0;
}

/* n unpredictable bytes from /dev/urandom; where it cannot be read, SHA-256 of the clocks, the
 * process id and a stack address (unique per call, but guessable: a last resort) */
static void mb_random_bytes(void *out, size_t n) {
    size_t got = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    while (fd >= 0 && got < n) {
        ssize_t k = read(fd, (char *)out + got, n - got);
        if (k > 0) got += (size_t)k;
        else if (k == 0 || errno != EINTR) break;
    }
    if (fd >= 0) close(fd);
    for (size_t i = 0; got < n; i++) {
        struct {
            struct timespec real, mono;
            long pid;
            const void *stack;
            size_t i;
        } mix;
        memset(&mix, 0, sizeof mix);
        clock_gettime(CLOCK_REALTIME, &mix.real), clock_gettime(CLOCK_MONOTONIC, &mix.mono);
        mix.pid = (long)getpid(), mix.stack = (const void *)&mix, mix.i = i;
        unsigned char h[32];
        sha256(&mix, sizeof mix, h);
        size_t k = MB_MIN(n - got, sizeof h);
        memcpy((char *)out + got, h, k);
        got += k;
    }
}

// ============================================================================================
// ---------- 2. files ----------
// dtype conversion; safetensors read (mmap, sharded via model.safetensors.index.json) and
// write (one file, or a model's weights streamed and sharded as save_pretrained shards them);
// config.json. Every field of a header is validated before it is used: files are input.
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
        if (!(t.name = mb_strdup(name))) {
            rc = MB_ERR_OOM;
            goto fail;
        }
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
    char *file = mb_strdup(path);
    if (!file) {
        rc = MB_ERR_OOM;
        goto fail;
    }
    arrfree(ranges);
    json_free(&doc);
    arrput(st->maps, m);
    arrput(st->files, file);
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
    MbJsonDoc doc;
    MbStatus rc = json_read_file(index_path, &doc);
    if (rc) return rc;
    char *dir = mb_path_dirname(index_path);
    const MbJson *wm = json_get(&doc, json_root(&doc), "weight_map");
    if (!dir) {
        rc = MB_ERR_OOM;
        goto done;
    }
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
        for (ptrdiff_t i = 0; path && i < arrlen(st->files); i++)
            if (!strcmp(st->files[i], path)) seen = 1;
        if (!path) rc = MB_ERR_OOM;
        else if (!seen) rc = st_add_file(st, path);
        free(path);
        if (rc) goto done;
    }
    /* every tensor the index names must be in the shard it names */
    for (const MbJson *e = json_first(&doc, wm); e; e = json_next(&doc, e)) {
        const MbTensorInfo *t = mb_safetensors_find(st, json_key(&doc, e));
        char *path = mb_path_join(dir, json_str(&doc, e));
        if (!path) {
            rc = MB_ERR_OOM;
            goto done;
        }
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
    if (!st) return MB_ERR_OOM;
    /* keys are the tensors' own names (alive as long as st): no copies, and no arena, whose
     * char storage[8] trick trips clang's bounds sanitizer */
    if (mb_is_dir(path)) {
        char *index = mb_path_join(path, "model.safetensors.index.json");
        char *single = mb_path_join(path, "model.safetensors");
        int err;
        if (!index || !single) rc = MB_ERR_OOM;
        else if (mb_is_file(index)) rc = st_add_index(st, index);
        else if (mb_path_kind(single, &err), !err) rc = st_add_file(st, single); /* (names a FIFO or a folder) */
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

/* the bytes of a tensor's data */
static size_t st_out_bytes(const MbTensorOut *t) {
    size_t numel = 1;
    for (int d = 0; d < t->ndim; d++) numel *= t->shape[d];
    return numel * mb_dtype_size(t->dtype);
}

/* The header of a safetensors file holding tensors[idx[0..n-1]] (idx NULL: all n, in order), data
 * in that order: the 8-byte little-endian length, then the JSON padded with spaces so that the data
 * starts 8-byte aligned. Returns an stb_ds array (arrlen: its bytes). */
static char *st_header(const MbTensorOut *tensors, const size_t *idx, size_t n, const char *const *metadata) {
    char *hdr = NULL;
    size_t offset = 0;
    sb_printf(&hdr, "%8s{", ""); /* room for the length */
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
        const MbTensorOut *t = &tensors[idx ? idx[i] : i];
        size_t bytes = st_out_bytes(t);
        sb_printf(&hdr, "%s", first ? "" : ",");
        first = 0;
        sb_json_string(&hdr, t->name, strlen(t->name));
        sb_printf(&hdr, ":{\"dtype\":\"%s\",\"shape\":[", mb_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) sb_printf(&hdr, "%s%zu", d ? "," : "", t->shape[d]);
        sb_printf(&hdr, "],\"data_offsets\":[%zu,%zu]}", offset, offset + bytes);
        offset += bytes;
    }
    sb_printf(&hdr, "}");
    while ((size_t)(arrlen(hdr) - 1) % 8) sb_printf(&hdr, " "); /* (arrlen counts sb_printf's NUL) */
    size_t hlen = (size_t)arrlen(hdr) - 1 - 8;
    for (int i = 0; i < 8; i++) hdr[i] = (char)(unsigned char)((uint64_t)hlen >> (8 * i));
    arrsetlen(hdr, hlen + 8); /* (the NUL sb_printf keeps past the end is not part of it) */
    return hdr;
}

/* Fills dst with the bytes of tensor i (for tensors too big to hold all at once). */
typedef MbStatus (*MbTensorFill)(void *ctx, size_t i, void *dst);

/* Writes a safetensors file; tensor data comes from tensors[i].data or, when that is NULL,
 * from fill (one tensor in memory at a time). */
static MbStatus st_write(const char *path, const MbTensorOut *tensors, size_t n, const char *const *metadata,
                         MbTensorFill fill, void *ctx) {
    char *hdr = st_header(tensors, NULL, n, metadata);
    MbWFile w;
    MbStatus rc = mb_wfile_open(&w, path);
    if (rc) {
        arrfree(hdr);
        return rc;
    }
    mb_wfile_write(&w, hdr, (size_t)arrlen(hdr));
    arrfree(hdr);
    void *buf = NULL;
    for (size_t i = 0; i < n; i++) {
        const MbTensorOut *t = &tensors[i];
        size_t bytes = st_out_bytes(t);
        if (t->data) {
            mb_wfile_write(&w, t->data, bytes);
            continue;
        }
        free(buf);
        buf = mb_malloc(bytes);
        rc = buf ? fill(ctx, i, buf) : MB_ERR_OOM;
        if (rc) {
            free(buf);
            mb_wfile_abort(&w);
            return rc;
        }
        mb_wfile_write(&w, buf, bytes);
    }
    free(buf);
    return mb_wfile_commit(&w);
}

MbStatus mb_safetensors_write(const char *path, const MbTensorOut *tensors, size_t n,
                              const char *const *metadata) {
    for (size_t i = 0; i < n; i++)
        if (!tensors[i].data) return mb_fail(MB_ERR_ARG, "%s: tensor '%s' has no data", path, tensors[i].name);
    return st_write(path, tensors, n, metadata, NULL, NULL);
}

/* ---- a model's weights as save_pretrained writes them: streamed and sharded ----
 * The layout comes first, from the tensors' names, dtypes and shapes alone: which file each tensor
 * goes to and each file's header. The data then arrives in order, a piece of any size at a time
 * (st_ckpt_put), so that a model of any size is written holding one piece in memory. The files
 * are split as save_pretrained splits a state dict (huggingface_hub's
 * split_torch_state_dict_into_shards): going through the tensors in the state dict's order, a
 * tensor that would take the shard being filled past max_shard_size closes it and starts the next
 * one, and a tensor bigger than the limit gets a shard of its own, listed before the one being
 * filled. One shard is DIR/model.safetensors; several are model-00001-of-0000N.safetensors ... and
 * model.safetensors.index.json (as transformers writes it: {"metadata": {"total_parameters",
 * "total_size"}, "weight_map": {name: file}}, keys sorted, indent 2). Within a file the data is
 * in arrival order. Every file is written as NAME.tmp.PID and renamed only once all of them are
 * complete (st_ckpt_commit): a failure or an interruption leaves the folder as it was. */

#define MB_MAX_SHARD_SIZE ((size_t)5000000000ull) /* save_pretrained's default max_shard_size, "5GB" */

/* A size as save_pretrained reads max_shard_size (huggingface_hub's parse_size_to_int): a decimal
 * number and TB, GB, MB or KB in any case, powers of 1000 ("5GB" is 5 * 10^9 bytes, "200kB"
 * 200000), or a plain number of bytes; at least 1 byte. */
MB_UNUSED static MbStatus parse_size(const char *what, const char *s, size_t *out) {
    static const char *const units[] = {"KB", "MB", "GB", "TB"};
    char num[64];
    while (*s == ' ') s++;
    size_t n = strlen(s);
    while (n && s[n - 1] == ' ') n--;
    double mult = 1;
    for (int u = 0; u < 4 && n >= 2 && mult == 1; u++)
        if ((s[n - 2] & ~0x20) == units[u][0] && (s[n - 1] & ~0x20) == 'B') mult = pow(1000, u + 1), n -= 2;
    while (n && s[n - 1] == ' ') n--;
    if (n >= sizeof num) n = 0;
    memcpy(num, s, n), num[n] = 0;
    char *end = num;
    double v = n && strspn(num, "0123456789.eE+-") == n ? strtod(num, &end) * mult : -1; /* (no hex, inf, nan) */
    if (v >= 0 && end != num + n) v = -1;
    if (!(v >= 1 && v < 1.8e19))
        return mb_fail(MB_ERR_ARG, "%s: '%s' is not a size of at least 1 byte: a number and TB, GB, MB or KB, "
                       "as save_pretrained reads max_shard_size (\"5GB\", \"500MB\")", what, s);
    *out = (size_t)v;
    return MB_OK;
}

typedef struct {
    const MbTensorOut *t;  /* (n) in the order their data arrives; data unused */
    size_t n, n_files;
    size_t *file, *bytes;  /* (n) each tensor's file and data bytes */
    size_t *left;          /* (n_files) tensors of the file not yet complete */
    char **paths, **hdr;   /* (n_files) the file and its header (st_header) */
    MbWFile *w;            /* (n_files) open from the first byte of its data to the last */
    char *dir, *index, *task_name;
    size_t at, at_done;    /* the tensor being written and its bytes so far */
    size_t total_size, total_params;
    MbTask task;
} StCkpt;

/* save_pretrained's split: file[i] for each of the n tensors of `bytes`, taken in the state dict's
 * order `order` (a permutation of 0..n-1); returns the number of files. */
static size_t st_split(const size_t *bytes, const size_t *order, size_t n, size_t max, size_t *file) {
    const size_t FILLING = SIZE_MAX; /* in the shard being filled: numbered when it closes */
    size_t n_files = 0, filling = 0, start = 0;
    for (size_t k = 0; k <= n; k++) {
        size_t i = k < n ? order[k] : 0;
        if (k < n && bytes[i] > max) { /* a shard of its own, listed now */
            file[i] = n_files++;
            continue;
        }
        if (k == n || filling + bytes[i] > max) { /* the shard being filled closes (if it holds any) */
            int any = 0;
            for (size_t j = start; j < k; j++)
                if (file[order[j]] == FILLING) file[order[j]] = n_files, any = 1;
            n_files += (size_t)any;
            start = k, filling = 0;
        }
        if (k < n) file[i] = FILLING, filling += bytes[i];
    }
    return n_files;
}

static void st_ckpt_free(StCkpt *ck) {
    for (size_t f = 0; f < ck->n_files; f++) {
        mb_wfile_abort(&ck->w[f]); /* (nothing left after a commit) */
        free(ck->paths[f]);
        arrfree(ck->hdr[f]);
    }
    free(ck->file), free(ck->bytes), free(ck->left), free(ck->paths), free(ck->hdr), free(ck->w);
    free(ck->dir), free(ck->index), free(ck->task_name);
    memset(ck, 0, sizeof *ck);
}

/* Lays out the checkpoint of the n tensors t (in the order their data will arrive; save_order: the
 * state dict's order that the shards follow, NULL: the same) in dir, and begins the task `what`
 * (in bytes of all files) on progress. max_shard_size 0: save_pretrained's default. */
static MbStatus st_ckpt_begin(StCkpt *ck, const char *dir, const MbTensorOut *t, size_t n, const size_t *save_order,
                              size_t max_shard_size, const char *const *metadata, const MbProgress *progress,
                              const char *what) {
    memset(ck, 0, sizeof *ck);
    ck->t = t, ck->n = n;
    size_t *order = mb_malloc((n ? n : 1) * sizeof *order);
    ck->file = mb_calloc(n, sizeof *ck->file), ck->bytes = mb_calloc(n, sizeof *ck->bytes);
    ck->dir = mb_strdup(dir), ck->index = mb_path_join(dir, "model.safetensors.index.json");
    ck->task_name = mb_strdup(what);
    if (!order || !ck->file || !ck->bytes || !ck->dir || !ck->index || !ck->task_name) goto oom;
    for (size_t i = 0; i < n; i++) {
        order[i] = save_order ? save_order[i] : i;
        ck->bytes[i] = st_out_bytes(&t[i]);
        ck->total_size += ck->bytes[i];
        ck->total_params += ck->bytes[i] / mb_dtype_size(t[i].dtype);
    }
    size_t F = st_split(ck->bytes, order, n, max_shard_size ? max_shard_size : MB_MAX_SHARD_SIZE, ck->file);
    F = F ? F : 1;
    ck->left = mb_calloc(F, sizeof *ck->left), ck->w = mb_calloc(F, sizeof *ck->w);
    ck->paths = mb_calloc(F, sizeof *ck->paths), ck->hdr = mb_calloc(F, sizeof *ck->hdr);
    if (!ck->left || !ck->w || !ck->paths || !ck->hdr) goto oom;
    ck->n_files = F; /* (st_ckpt_free walks the per-file arrays) */
    double total = 0;
    for (size_t f = 0; f < F; f++) {
        char name[64];
        if (F == 1) snprintf(name, sizeof name, "model.safetensors");
        else snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", f + 1, F);
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if (ck->file[i] == f) order[m++] = i, total += (double)ck->bytes[i];
        ck->left[f] = m;
        if (!(ck->paths[f] = mb_path_join(dir, name))) goto oom;
        ck->hdr[f] = st_header(t, order, m, metadata);
        total += (double)arrlen(ck->hdr[f]);
    }
    free(order);
    task_begin(&ck->task, progress, ck->task_name, "bytes", 0, total);
    return MB_OK;
oom:
    free(order);
    st_ckpt_free(ck);
    return MB_ERR_OOM;
}

/* The next n bytes of data: the rest of the tensor being written, then of the ones after it. */
static MbStatus st_ckpt_put(StCkpt *ck, const void *data, size_t n) {
    const unsigned char *p = data;
    while (ck->at < ck->n) {
        size_t f = ck->file[ck->at];
        MbWFile *w = &ck->w[f];
        if (!w->tmp) { /* the file's first byte */
            MbStatus rc = mb_wfile_open(w, ck->paths[f]);
            if (rc) return rc;
            mb_wfile_write(w, ck->hdr[f], (size_t)arrlen(ck->hdr[f]));
            task_add(&ck->task, (double)arrlen(ck->hdr[f]));
        }
        size_t k = MB_MIN(n, ck->bytes[ck->at] - ck->at_done);
        mb_wfile_write(w, p, k);
        if (w->failed) return mb_fail(MB_ERR_IO, "%s: write failed: %s", w->path, strerror(w->failed));
        p += k, n -= k, ck->at_done += k;
        task_add(&ck->task, (double)k);
        if (ck->at_done < ck->bytes[ck->at]) return MB_OK;
        ck->at++, ck->at_done = 0;
        if (--ck->left[f] == 0) { /* the file's last byte */
            MbStatus rc = mb_wfile_finish(w);
            if (rc) return rc;
        }
        if (!n && ck->at < ck->n && ck->bytes[ck->at]) return MB_OK; /* (empty tensors pass on) */
    }
    return n ? mb_fail(MB_ERR_ARG, "%s: %zu bytes more than the tensors hold", ck->dir, n) : MB_OK;
}

static int st_cmp_name(const void *a, const void *b) {
    return strcmp((*(const MbTensorOut *const *)a)->name, (*(const MbTensorOut *const *)b)->name);
}

/* model.safetensors.index.json, byte for byte as transformers' save_pretrained writes it
 * (json.dumps(index, indent=2, sort_keys=True) + "\n") */
static MbStatus st_ckpt_write_index(const StCkpt *ck, MbWFile *w) {
    const MbTensorOut **by_name = mb_malloc((ck->n ? ck->n : 1) * sizeof *by_name);
    if (!by_name) return MB_ERR_OOM;
    for (size_t i = 0; i < ck->n; i++) by_name[i] = &ck->t[i];
    qsort(by_name, ck->n, sizeof *by_name, st_cmp_name);
    char *sb = NULL;
    sb_printf(&sb, "{\n  \"metadata\": {\n    \"total_parameters\": %zu,\n    \"total_size\": %zu\n  },\n"
              "  \"weight_map\": {\n", ck->total_params, ck->total_size);
    for (size_t k = 0; k < ck->n; k++) {
        const char *path = ck->paths[ck->file[by_name[k] - ck->t]], *base = strrchr(path, '/');
        base = base ? base + 1 : path;
        sb_printf(&sb, "    ");
        sb_json_string(&sb, by_name[k]->name, strlen(by_name[k]->name));
        sb_printf(&sb, ": ");
        sb_json_string(&sb, base, strlen(base));
        sb_printf(&sb, "%s\n", k + 1 < ck->n ? "," : "");
    }
    sb_printf(&sb, "  }\n}\n");
    MbStatus rc = mb_wfile_open(w, ck->index);
    if (!rc) mb_wfile_write(w, sb, strlen(sb)), rc = mb_wfile_finish(w);
    arrfree(sb);
    free(by_name);
    return rc;
}

/* After a commit, the weights of an earlier save in the folder that this one replaces: the shards
 * it did not rewrite (save_pretrained removes them too), and model.safetensors beside a new index
 * or an index beside a new model.safetensors (two models in one folder: transformers would read
 * the one, medbot the other). */
static MbStatus st_ckpt_remove_old(const StCkpt *ck) {
    DIR *d = opendir(ck->dir);
    struct dirent *e;
    MbStatus rc = MB_OK;
    while (d && !rc && (e = readdir(d))) {
        const char *nm = e->d_name;
        int old = ck->n_files > 1 ? !strcmp(nm, "model.safetensors") : !strcmp(nm, "model.safetensors.index.json");
        if (!old && is_shard_name(nm, strlen(nm))) {
            old = 1;
            for (size_t f = 0; old && ck->n_files > 1 && f < ck->n_files; f++)
                old = strcmp(strrchr(ck->paths[f], '/') ? strrchr(ck->paths[f], '/') + 1 : ck->paths[f], nm) != 0;
        }
        char *p = old ? mb_path_join(ck->dir, nm) : NULL;
        if (old && !p) rc = MB_ERR_OOM;
        else if (old && remove(p) != 0)
            rc = mb_fail(MB_ERR_IO, "%s: the new weights are written, but the earlier %s cannot be removed: %s "
                         "--> remove it by hand", ck->dir, nm, strerror(errno));
        free(p);
    }
    if (d) closedir(d);
    return rc;
}

/* Puts every file in place once all the data has arrived (a failure removes what it renamed),
 * writes the index of a sharded checkpoint, removes an earlier save's weights, and frees ck. */
static MbStatus st_ckpt_commit(StCkpt *ck) {
    MbStatus rc = st_ckpt_put(ck, NULL, 0); /* (empty tensors at the end) */
    if (!rc && ck->at < ck->n)
        rc = mb_fail(MB_ERR_ARG, "%s: tensor '%s' is incomplete (%zu of %zu bytes)", ck->dir, ck->t[ck->at].name,
                     ck->at_done, ck->bytes[ck->at]);
    size_t renamed = 0;
    MbWFile iw = {0}; /* the index, complete as a temporary before any file is renamed */
    if (!rc && ck->n_files > 1) rc = st_ckpt_write_index(ck, &iw);
    while (!rc && renamed < ck->n_files && !(rc = mb_wfile_commit(&ck->w[renamed]))) renamed++;
    if (!rc && ck->n_files > 1) rc = mb_wfile_commit(&iw);
    mb_wfile_abort(&iw); /* (nothing left after a commit) */
    if (rc)
        for (size_t f = 0; f < renamed; f++) remove(ck->paths[f]);
    if (!rc) rc = st_ckpt_remove_old(ck);
    task_end(&ck->task, rc == MB_OK);
    st_ckpt_free(ck);
    return rc;
}

/* Drops the checkpoint being written: its temporary files go, nothing else changes. */
static void st_ckpt_abort(StCkpt *ck) {
    task_end(&ck->task, 0);
    st_ckpt_free(ck);
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
    MbJsonDoc doc;
    MbStatus rc = json_read_file(path, &doc);
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

typedef struct {
    const uint32_t *starts; /* (first code point << 3) | class, ascending */
    size_t n;
    const uint8_t *ascii;   /* the class of each code point below 128 */
} MbUniTable;
static MbUniTable mb_uni_table(void); /* in the appendix at the end of this file */

static int uni_class(uint32_t cp) {
    MbUniTable t = mb_uni_table();
    if (cp < 128) return t.ascii[cp];
    size_t lo = 0, hi = t.n; /* entry 0 starts at 0 */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if ((t.starts[mid] >> 3) <= cp) lo = mid;
        else hi = mid;
    }
    return (int)(t.starts[lo] & 7);
}

/* The class of the character at s[i] (valid UTF-8) and its length. */
static int uni_at(const unsigned char *s, size_t i, size_t *len) {
    unsigned c = s[i];
    if (c < 0x80) {
        *len = 1;
        return mb_uni_table().ascii[c];
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
    int32_t bos_id, eos_id;    /* tokenizer_config.json's bos_token / eos_token, else Llama 3's */
    int add_bos_token;         /* tokenizer(text) adds the template's tokens: tokenizer_config.json, else 1 */
    char *config;              /* the tokenizer_config.json applied, or NULL */
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
    free(t->config);
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
    return t->off && t->len && t->flags ? MB_OK : MB_ERR_OOM; /* (the tokenizer's free takes what came) */
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
    t->add_bos_token = 1;
    return MB_OK;
}

/* The merges of two single bytes as a table: every piece BPE merges starts with those pairs. */
static MbStatus tok_byte_merges(MbTokenizer *t) {
    if (!(t->byte_merges = mb_malloc(256 * 256 * sizeof *t->byte_merges))) return MB_ERR_OOM;
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++) t->byte_merges[a * 256 + b] = tok_merge(t, t->byte_id[a], t->byte_id[b]);
    return MB_OK;
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
    if (!(st = tokjson_merges(t, d, merges, byte_of_cp))) st = tok_byte_merges(t);
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
    st = tok_byte_merges(t);
done:
    arrfree(lines);
    arrfree(buf);
    return st;
}

/* Loads from the text of a tokenizer.json (starts with '{') or of a tokenizer.model. */
static MbStatus tok_from_text(const char *name, const char *text, size_t n, MbTokenizer **out) {
    *out = NULL;
    MbTokenizer *t = mb_calloc(1, sizeof *t);
    if (!t) return MB_ERR_OOM;
    if (!(t->path = mb_strdup(name))) return free(t), MB_ERR_OOM;
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

/* The tokenizer file of a folder (tokenizer.json, else tokenizer.model; malloc'd) in *file, or
 * NULL when it has none. */
static MbStatus tokenizer_in(const char *dir, char **file) {
    const char *names[2] = {"tokenizer.json", "tokenizer.model"};
    *file = NULL;
    for (int i = 0; i < 2; i++) {
        char *f = mb_path_join(dir, names[i]);
        if (!f) return MB_ERR_OOM;
        if (mb_is_file(f)) return *file = f, MB_OK;
        free(f);
    }
    return MB_OK;
}

/* The tokenizer file PATH names: PATH itself, or the tokenizer file of a folder. *file is malloc'd. */
static MbStatus tok_file(const char *path, char **file) {
    MbStatus rc = MB_OK;
    if (mb_is_dir(path)) rc = tokenizer_in(path, file);
    else if (!(*file = mb_strdup(path))) rc = MB_ERR_OOM;
    if (rc) return rc;
    return *file ? MB_OK
                 : mb_fail(MB_ERR_IO, "%s: no tokenizer.json or tokenizer.model in this folder --> pass --tokenizer PATH "
                           "naming one of them (or a folder that holds one)", path);
}

MbStatus mb_tokenizer_load(const char *path, MbTokenizer **out) {
    char *file = NULL, *text = NULL;
    size_t n;
    *out = NULL;
    MbStatus st = tok_file(path, &file);
    if (st) return st;
    st = mb_read_file(file, &text, &n);
    if (!st) st = tok_from_text(file, text, n, out);
    free(text);
    /* tokenizer_config.json beside the tokenizer names its bos/eos, as AutoTokenizer reads it */
    char *dir = mb_path_dirname(file), *cfg = dir ? mb_path_join(dir, "tokenizer_config.json") : NULL;
    if (!st && !cfg) st = MB_ERR_OOM;
    if (!st && mb_is_file(cfg)) st = mb_tokenizer_load_config(*out, cfg);
    if (st && *out) mb_tokenizer_free(*out), *out = NULL;
    free(cfg), free(dir), free(file);
    return st;
}

/* A special token of tokenizer_config.json: its text (a string, or an AddedToken object's
 * "content"), "" for null, NULL when the key is absent. */
static const char *tokcfg_token(const MbJsonDoc *d, const MbJson *root, const char *key, int *bad) {
    const MbJson *v = json_get(d, root, key);
    if (v && v->kind == MB_JSON_OBJECT) v = json_get(d, v, "content");
    if (!v) return NULL;
    if (v->kind == MB_JSON_NULL) return "";
    if (v->kind != MB_JSON_STRING) *bad = 1;
    return v->kind == MB_JSON_STRING ? json_str(d, v) : NULL;
}

MbStatus mb_tokenizer_load_config(MbTokenizer *t, const char *path) {
    MbJsonDoc d;
    MbStatus rc = json_read_file(path, &d);
    if (rc) return rc;
    /* add_bos_token counts only for the classes that build their template from it (Llama's); the
     * plain PreTrainedTokenizerFast of Llama 3 keeps tokenizer.json's template whatever it says */
    const MbJson *root = json_root(&d), *add = json_get(&d, root, "add_bos_token"), *cls = json_get(&d, root, "tokenizer_class");
    int llama_class = json_is(&d, cls, "LlamaTokenizerFast") || json_is(&d, cls, "LlamaTokenizer");
    const char *keys[2] = {"bos_token", "eos_token"};
    int32_t ids[2] = {t->bos_id, t->eos_id};
    for (int k = 0; k < 2 && !rc; k++) {
        int bad = root->kind != MB_JSON_OBJECT;
        const char *name = tokcfg_token(&d, root, keys[k], &bad);
        if (bad) rc = mb_fail(MB_ERR_FORMAT, "%s: %s must be a string or {\"content\": ...}", path, keys[k]);
        else if (name && !name[0]) ids[k] = -1;
        else if (name && (ids[k] = mb_tokenizer_token_id(t, name)) < 0)
            rc = mb_fail(MB_ERR_FORMAT, "%s: %s \"%.80s\" is not a token of %s --> the config belongs to another "
                         "tokenizer", path, keys[k], name, t->path);
    }
    if (!rc && add && add->kind != MB_JSON_BOOL && add->kind != MB_JSON_NULL)
        rc = mb_fail(MB_ERR_FORMAT, "%s: add_bos_token must be true or false", path);
    char *config = rc ? NULL : mb_strdup(path);
    if (!rc && !config) rc = MB_ERR_OOM;
    if (!rc) {
        t->bos_id = ids[0], t->eos_id = ids[1];
        if (add && add->kind == MB_JSON_BOOL && llama_class) t->add_bos_token = add->boolean;
        free(t->config);
        t->config = config;
    }
    json_free(&d);
    return rc;
}

const char *mb_tokenizer_config_path(const MbTokenizer *t) { return t->config; }

/* The tokenizer a command uses, found as the reference stack finds it: `tokenizer` (a file or a
 * folder) when given, else the model folder's, else the adapter folder's (a trainer saves it
 * there); and the tokenizer_config.json that applies: the one beside that file, else the model
 * folder's. *file and *config are malloc'd (*config NULL when there is none). */
static MbStatus tokenizer_locate(const char *tokenizer, const char *model_dir, const char *lora_dir, char **file,
                                 char **config) {
    *file = *config = NULL;
    MbStatus rc = tokenizer ? tok_file(tokenizer, file) : tokenizer_in(model_dir, file);
    if (!rc && !tokenizer && !*file && lora_dir) rc = tokenizer_in(lora_dir, file);
    if (rc) return rc;
    if (!*file)
        return mb_fail(MB_ERR_IO, "%s%s%s: no tokenizer.json or tokenizer.model --> pass --tokenizer PATH (tokenizer.json, "
                       "tokenizer.model or a folder)", model_dir, lora_dir ? " and " : "", lora_dir ? lora_dir : "");
    char *dir = mb_path_dirname(*file);
    const char *where[2] = {dir, model_dir};
    for (int i = 0; i < 2 && !*config && !rc; i++) {
        *config = where[i] ? mb_path_join(where[i], "tokenizer_config.json") : NULL;
        if (!*config) rc = MB_ERR_OOM;
        else if (!mb_is_file(*config)) free(*config), *config = NULL;
    }
    free(dir);
    if (rc) free(*file), *file = NULL;
    return rc;
}

MbStatus mb_tokenizer_open(const char *tokenizer, const char *model_dir, const char *lora_dir, MbTokenizer **out) {
    char *file, *config;
    *out = NULL;
    MbStatus rc = tokenizer_locate(tokenizer, model_dir, lora_dir, &file, &config);
    if (!rc) rc = mb_tokenizer_load(file, out);
    if (!rc && config && !mb_tokenizer_config_path(*out) && (rc = mb_tokenizer_load_config(*out, config)))
        mb_tokenizer_free(*out), *out = NULL;
    free(file), free(config);
    return rc;
}

/* Copies the files t was loaded from into dir, as save_pretrained leaves a tokenizer: its file
 * as tokenizer.json or tokenizer.model, the tokenizer_config.json it applied and the
 * special_tokens_map.json beside that. A file that already is the destination is left alone. */
static MbStatus tokenizer_copy_files(const MbTokenizer *t, const char *dir) {
    char *text = NULL, *cfg_dir = t->config ? mb_path_dirname(t->config) : NULL;
    char *map = cfg_dir ? mb_path_join(cfg_dir, "special_tokens_map.json") : NULL;
    size_t n, i = 0;
    MbStatus rc = t->config && !map ? MB_ERR_OOM : mb_read_file(t->path, &text, &n); /* (tokenizer.json starts with '{') */
    while (!rc && i < n && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t')) i++;
    char *to = rc ? NULL : mb_path_join(dir, i < n && text[i] == '{' ? "tokenizer.json" : "tokenizer.model");
    if (!rc && !to) rc = MB_ERR_OOM;
    if (!rc && !mb_same_file(t->path, to)) rc = mb_write_file(to, text, n);
    const char *src[2] = {t->config, map && mb_is_file(map) ? map : NULL};
    const char *dst[2] = {"tokenizer_config.json", "special_tokens_map.json"};
    for (int k = 0; k < 2 && !rc; k++) {
        if (!src[k]) continue;
        free(to);
        to = mb_path_join(dir, dst[k]);
        if (!to) rc = MB_ERR_OOM;
        else if (!mb_same_file(src[k], to)) rc = mb_copy_file(src[k], to);
    }
    free(to), free(text), free(map), free(cfg_dir);
    return rc;
}

int mb_tokenizer_add_bos(const MbTokenizer *t) { return t->add_bos_token; }

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
    if (!id || !prev || !next || !heap) { /* 0 tokens: out of memory (a piece gives at least one) */
        free(id), free(prev), free(next), free(heap);
        return 0;
    }
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

/* One pre-tokenized piece -> ids appended at out; returns their count (0: out of memory). */
static size_t encode_piece(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out) {
    if (n == 1) {
        out[0] = t->byte_id[s[0]];
        return 1;
    }
    if (t->ignore_merges && (out[0] = tok_find(t, t->vocab, s, n)) >= 0) return 1;
    return n <= MB_BPE_SMALL ? bpe_small(t, s, n, out) : bpe_long(t, s, n, out);
}

/* Text without added tokens: valid UTF-8 runs through the regex, invalid bytes alone; the ids
 * are appended at out[*m], *m counts them. */
static MbStatus encode_ordinary(const MbTokenizer *t, const unsigned char *s, size_t n, int32_t *out, size_t *m) {
    size_t i = 0;
    while (i < n) {
        size_t j = i, k;
        while (j < n) {
            if (s[j] < 0x80) j++;
            else if ((k = utf8_valid_len(s + j, n - j))) j += k;
            else break;
        }
        for (size_t p = i; p < j;) {
            size_t e = pretok_next(s + i, j - i, p - i) + i, k = encode_piece(t, s + p, e - p, out + *m);
            if (!k) return MB_ERR_OOM;
            *m += k;
            p = e;
        }
        if (j < n) out[(*m)++] = t->byte_id[s[j++]]; /* a byte that is not valid UTF-8 */
        i = j;
    }
    return MB_OK;
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
    if (!out) return MB_ERR_OOM;
    if (flags & MB_ENCODE_ADD_BOS)
        for (ptrdiff_t k = 0; k < arrlen(t->prefix); k++) out[m++] = t->prefix[k];
    MbStatus rc = MB_OK;
    if (!(flags & MB_ENCODE_SPECIALS_AS_TEXT))
        for (size_t i = 0; i < len && !rc; i++) {
            int32_t id;
            if (!t->added_first[s[i]] || (id = added_at(t, s, len, i, &L)) < 0) continue;
            rc = encode_ordinary(t, s + start, i - start, out, &m);
            out[m++] = id;
            i += L - 1;
            start = i + 1;
        }
    if (!rc) rc = encode_ordinary(t, s + start, len - start, out, &m);
    if (rc) return free(out), rc;
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
    char *out = raw ? mb_malloc(3 * total + 1) : NULL;
    if (!out) return free(raw), MB_ERR_OOM;
    size_t r = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_special_tokens && (t->flags[ids[i]] & MB_TOK_SPECIAL)) continue;
        memcpy(raw + r, t->bytes + t->off[ids[i]], t->len[ids[i]]);
        r += t->len[ids[i]];
    }
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

/* Converts held + bytes, keeping an incomplete character at the end unless final. Out of
 * memory: no text (*text ""), the stream unchanged. */
static MbStatus stream_emit(MbTokenStream *s, const unsigned char *bytes, size_t n, int final, const char **text,
                            size_t *len) {
    size_t raw_n = s->n_held + n;
    *text = "", *len = 0;
    if (s->cap < 4 * raw_n + 16) {
        char *buf = mb_malloc(4 * raw_n + 16);
        if (!buf) return MB_ERR_OOM;
        free(s->buf);
        s->buf = buf, s->cap = 4 * raw_n + 16;
    }
    unsigned char *raw = (unsigned char *)s->buf + 3 * raw_n + 4; /* the tail of buf holds the input */
    memcpy(raw, s->held, s->n_held);
    if (n) memcpy(raw + s->n_held, bytes, n);
    size_t used = utf8_lossy(raw, raw_n, final, s->buf, len);
    s->n_held = raw_n - used; /* at most 3: a valid prefix of one character */
    memmove(s->held, raw + used, s->n_held);
    s->buf[*len] = 0;
    *text = s->buf;
    return MB_OK;
}

MbStatus mb_token_stream_put(MbTokenStream *s, int32_t id, const char **text, size_t *len) {
    MbStatus st = tok_check_id(s->tok, id);
    if (st) return st;
    const MbTokenizer *t = s->tok;
    int skip = s->skip_special_tokens && (t->flags[id] & MB_TOK_SPECIAL);
    return stream_emit(s, t->bytes + t->off[id], skip ? 0 : t->len[id], 0, text, len);
}

MbStatus mb_token_stream_finish(MbTokenStream *s, const char **text, size_t *len) {
    return stream_emit(s, NULL, 0, 1, text, len);
}

void mb_token_stream_free(MbTokenStream *s) {
    free(s->buf);
    memset(s, 0, sizeof *s);
}

// ============================================================================================
// ---------- 4. weights ----------
// A weight is an opaque matrix to the model: (rows, cols) values stored in a format this
// section knows how to expand: F32 / F16 / BF16 as in the file, or NF4 (bitsandbytes' 4-bit
// NormalFloat with double quantization, QLoRA). The ops only ask for fp32 tiles (weight_tile_t)
// or rows (weight_row_f32) and never learn which format they read.
// ============================================================================================

/* ---- NF4 ----
 * What bitsandbytes 0.49.1 computes (CPU backend, the reference of tests/ref/make_nf4_fixtures.py)
 * and medbot reproduces bit for bit:
 *   quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True):
 *   - the (O, I) weight flattened row-major, in blocks of 64 values (the last block may be short;
 *     a block straddles two rows when I is not a multiple of 64); absmax = max |x| of the block;
 *   - s = fl32(x * fl32(1 / absmax)) (a product with the reciprocal, not x / absmax), clamped to
 *     [-1, 1]; in a short last block of a BF16/F16 weight s is rounded to that dtype (torch's type
 *     promotion with a 0-dim tensor);
 *   - q = the nearest of the 16 NF4 codes, distances |s - code| compared in fp32, a tie going to
 *     the lower code (torch.argmin); NaN (an all-zero block: 0 * inf) gives code 0;
 *   - two codes per byte, the first in the high nibble.
 *   Double quant: offset = mean(absmax) (fp32, summed in torch's order: torch_sum_f32); the
 *   absmax - offset in blocks of 256 against bitsandbytes' signed dynamic 8-bit map, whose first
 *   entry the CPU kernel sets to -1: scale2 = max |a| of the block, a / scale2 (a division here)
 *   to the nearest map entry, ties to the lower.
 *   Dequant (dequantize_4bit): w = code[q] * absmax with absmax = map8[qa] * scale2 + offset, each
 *   operation rounded to fp32 (no fused multiply-add), then rounded to the compute dtype
 *   (bnb_4bit_compute_dtype) with round-to-nearest-even.
 * Memory per weight: 0.5 B per value (packed codes) + absmax: 1 B per block of 64 and 4 B per
 * 256 blocks (double quant), or 4 B per block without it. */

#define MB_NF4_BLOCKSIZE 64
#define MB_NF4_NESTED_BLOCKSIZE 256

/* bitsandbytes' NF4 code book (functional.get_4bit_type("nf4")) */
static const float mb_nf4_code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

/* The 127 positive entries below 1 of bitsandbytes' signed dynamic 8-bit map
 * (functional.create_dynamic_map(), computed with torch.linspace in fp32, copied bit for bit) */
static const float mb_dynamic_map_pos[127] = {
    0x1.27476ep-21f, 0x1.b43528p-19f, 0x1.040bfep-17f, 0x1.64840cp-16f, 0x1.6f0068p-15f, 0x1.15df66p-14f,
    0x1.743e96p-14f, 0x1.47ae16p-13f, 0x1.19ce0ap-12f, 0x1.8fc506p-12f, 0x1.02de02p-11f, 0x1.3dd982p-11f,
    0x1.78d5p-11f, 0x1.b3d07cp-11f, 0x1.eecbfep-11f, 0x1.4fdf3ap-10f, 0x1.e353f8p-10f, 0x1.3b645ap-9f,
    0x1.851eb8p-9f, 0x1.ced914p-9f, 0x1.0c49bap-8f, 0x1.3126e8p-8f, 0x1.56041ap-8f, 0x1.7ae148p-8f,
    0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f, 0x1.19999ap-7f, 0x1.2c083p-7f,
    0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f, 0x1.451ebap-6f, 0x1.733334p-6f,
    0x1.a147aep-6f, 0x1.cf5c2ap-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f, 0x1.2ccccep-5f, 0x1.43d70ap-5f,
    0x1.5ae146p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f, 0x1.b70a3ep-5f, 0x1.ce147ap-5f,
    0x1.e51ebap-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151ebap-4f, 0x1.20a3d6p-4f, 0x1.2c28f6p-4f,
    0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb854p-4f, 0x1.5a3d7p-4f, 0x1.65c29p-4f, 0x1.7147aep-4f,
    0x1.7ccccep-4f, 0x1.8851eep-4f, 0x1.93d70ap-4f, 0x1.b66668p-4f, 0x1.fp-4f, 0x1.14ccccp-3f,
    0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f, 0x1.a4ccccp-3f, 0x1.c1999ap-3f,
    0x1.de6666p-3f, 0x1.fb3332p-3f, 0x1.0cp-2f, 0x1.1a6668p-2f, 0x1.28ccccp-2f, 0x1.373334p-2f,
    0x1.459998p-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f, 0x1.7f3334p-2f, 0x1.8d9998p-2f,
    0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f, 0x1.d59998p-2f, 0x1.e4p-2f,
    0x1.f26664p-2f, 0x1.006666p-1f, 0x1.079998p-1f, 0x1.0eccccp-1f, 0x1.16p-1f, 0x1.1d3334p-1f,
    0x1.246668p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f, 0x1.413334p-1f, 0x1.486668p-1f,
    0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f, 0x1.6c6668p-1f, 0x1.73999ap-1f,
    0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f, 0x1.97999ap-1f, 0x1.9eccccp-1f,
    0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f, 0x1.c2ccccp-1f, 0x1.cap-1f,
    0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f, 0x1.eep-1f, 0x1.f53334p-1f,
    0x1.fc6666p-1f,
};

/* The full map, sorted: -pos reversed, 0, pos, 1; entry 0 is -1 where create_dynamic_map() has
 * -0.99296874, as bitsandbytes' CPU quantize_blockwise kernel sets it before it quantizes (and
 * the map saved with the weight, nested_quant_map, is that one). */
static void nf4_dynamic_map(float map[256]) {
    for (int i = 0; i < 127; i++) {
        map[126 - i] = -mb_dynamic_map_pos[i];
        map[128 + i] = mb_dynamic_map_pos[i];
    }
    map[127] = 0.0f;
    map[255] = 1.0f;
    map[0] = -1.0f;
}

/* The NF4 state of a 4-bit weight, named as bitsandbytes' QuantState saves it. The (rows, cols)
 * weight is flattened row-major into nblocks blocks of blocksize values. The arrays point into
 * the mapped checkpoint or into the weight's `owned` block; fp32 arrays are read with memcpy
 * because a checkpoint may hold them at any byte offset. */
typedef struct {
    const uint8_t *packed;               /* (rows * cols / 2) two codes per byte, the first high */
    size_t blocksize;                    /* 64 */
    size_t nblocks;                      /* ceil(rows * cols / blocksize) */
    const uint8_t *absmax_q;             /* (nblocks) absmax codes into nested_quant_map, or NULL
                                            when the absmax is kept in fp32 (no double quant) */
    const unsigned char *absmax;         /* (nblocks) fp32 absmax without double quant, else NULL */
    const unsigned char *nested_absmax;  /* (ceil(nblocks / nested_blocksize)) fp32 scales */
    size_t nested_blocksize;             /* 256 */
    float offset;                        /* nested_offset: the mean absmax, added back */
    float nested_quant_map[256];         /* the 8-bit map the absmax codes index */
    MbDtype compute;                     /* F32, BF16 or F16: what dequantized values round to */
} MbNf4;

typedef struct {
    MbDtype dtype;      /* F32 / F16 / BF16; U8: NF4 (bitsandbytes stores the codes as uint8); I8:
                           the fast path's 8-bit copy of an lm_head (MbQ8, section 5) */
    size_t rows, cols;  /* (O, I) for a linear layer, (V, C) for the embedding, (1, C) a norm */
    const void *data;   /* rows * cols values, row-major (mapped file or `owned`); NF4: its MbNf4 */
    void *owned;        /* our copy when the file's bytes are misaligned, or random init; NF4: the
                           MbNf4 (and, quantized at load, its codes and scales in the same block) */
} MbWeight;

/* The NF4 state of w, or NULL when w is dense */
static const MbNf4 *weight_nf4(const MbWeight *w) {
    return w->dtype == MB_DT_U8 ? (const MbNf4 *)w->data : NULL;
}

/* Index of the entry of code (n ascending values, n a power of two) nearest to s: distances
 * |s - code[i]| compared in fp32, a tie going to the lower index, as torch.argmin and
 * bitsandbytes' CPU quantize_block decide it. NaN gives 0, as torch.argmin does. */
static int code_nearest(const float *code, int n, float s) {
    int lo = 0; /* the largest i with code[i] <= s (0 if none): a branch-free binary search */
    for (int step = n / 2; step > 0; step /= 2) lo += code[lo + step] <= s ? step : 0;
    if (lo + 1 < n && fabsf(s - code[lo + 1]) < fabsf(s - code[lo])) lo++;
    return lo;
}

/* Where the nearest NF4 code steps up: t[i] is the smallest fp32 s for which code_nearest gives
 * i + 1. Then the code of s in [-1, 1] is the number of t[i] <= s (0 for NaN): branch-free. */
static void nf4_thresholds(float t[15]) {
    for (int i = 0; i < 15; i++) {
        float s = 0.5f * (mb_nf4_code[i] + mb_nf4_code[i + 1]);
        while (code_nearest(mb_nf4_code, 16, s) > i) s = nextafterf(s, -INFINITY);
        while (code_nearest(mb_nf4_code, 16, s) <= i) s = nextafterf(s, INFINITY);
        t[i] = s;
    }
}

/* torch.sum of n fp32 values on the CPU, one thread, bit for bit: aten/src/ATen/native/cpu/
 * SumKernel.cpp (cascade_sum -> vectorized_inner_sum -> row_sum -> multi_row_sum) with 8-lane
 * vectors, 4 rows summed in parallel and 4 levels of partial sums. torch.mean is this sum / n.
 * (From 32768 values on, torch splits a sum over its threads; the fixtures run it with one.) */
#define TS_LANES 8
#define TS_ILP 4
#define TS_LEVELS 4

/* row_sum over `size` items of w floats each (w = TS_LANES: vectors; w = 1: scalars) -> out[w] */
static void torch_row_sum(const float *x, size_t size, size_t w, float *out) {
    float acc[TS_LEVELS][TS_ILP][TS_LANES];
    memset(acc, 0, sizeof acc);
    size_t rows = size / TS_ILP, bits = 0;
    while (rows > 2 && ((size_t)1 << bits) < rows) bits++; /* utils::CeilLog2 (>= 20 rows matter) */
    size_t power = MB_MAX((size_t)4, bits / TS_LEVELS), step = (size_t)1 << power, i = 0;
    while (i + step <= rows) {
        for (size_t j = 0; j < step; j++, i++)
            for (size_t k = 0; k < TS_ILP; k++)
                for (size_t l = 0; l < w; l++) acc[0][k][l] += x[(i * TS_ILP + k) * w + l];
        for (size_t j = 1; j < TS_LEVELS; j++) {
            for (size_t k = 0; k < TS_ILP; k++)
                for (size_t l = 0; l < w; l++) acc[j][k][l] += acc[j - 1][k][l], acc[j - 1][k][l] = 0.0f;
            if (i & ((step - 1) << (j * power))) break;
        }
    }
    for (; i < rows; i++)
        for (size_t k = 0; k < TS_ILP; k++)
            for (size_t l = 0; l < w; l++) acc[0][k][l] += x[(i * TS_ILP + k) * w + l];
    for (size_t j = 1; j < TS_LEVELS; j++)
        for (size_t k = 0; k < TS_ILP; k++)
            for (size_t l = 0; l < w; l++) acc[0][k][l] += acc[j][k][l];
    for (size_t t = rows * TS_ILP; t < size; t++) /* row_sum: the tail goes to partial 0 */
        for (size_t l = 0; l < w; l++) acc[0][0][l] += x[t * w + l];
    for (size_t k = 1; k < TS_ILP; k++)
        for (size_t l = 0; l < w; l++) acc[0][0][l] += acc[0][k][l];
    for (size_t l = 0; l < w; l++) out[l] = acc[0][0][l];
}

static float torch_sum_f32(const float *x, size_t n) {
    float v[TS_LANES];
    if (n < TS_LANES) { /* scalar_inner_sum */
        torch_row_sum(x, n, 1, v);
        return v[0];
    }
    size_t nv = n / TS_LANES; /* vectorized_inner_sum: vectors, then the scalar tail, then lanes */
    torch_row_sum(x, nv, TS_LANES, v);
    float s = 0.0f;
    for (size_t k = nv * TS_LANES; k < n; k++) s += x[k];
    for (size_t l = 0; l < TS_LANES; l++) s += v[l];
    return s;
}

/* absmax of block b: map8[qa] * scale2 + offset, the product rounded to fp32 before the sum
 * (bitsandbytes dequantizes the absmax tensor, then adds the offset to it) */
static float nf4_absmax(const MbNf4 *q, size_t b) {
    float a;
    if (!q->absmax_q) {
        memcpy(&a, q->absmax + 4 * b, 4);
        return a;
    }
    memcpy(&a, q->nested_absmax + 4 * (b / q->nested_blocksize), 4);
    volatile float prod = q->nested_quant_map[q->absmax_q[b]] * a; /* volatile: never an FMA */
    return prod + q->offset;
}

/* The 16 values block b dequantizes to: lut[k] = code[k] * absmax in the compute dtype */
static void nf4_block_lut(const MbNf4 *q, size_t b, float lut[16]) {
    float a = nf4_absmax(q, b);
    for (int k = 0; k < 16; k++) lut[k] = mb_nf4_code[k] * a;
    if (q->compute == MB_DT_BF16)
        for (int k = 0; k < 16; k++) lut[k] = bf16_to_f32(f32_to_bf16(lut[k]));
    else if (q->compute == MB_DT_F16)
        for (int k = 0; k < 16; k++) lut[k] = f16_to_f32(f32_to_f16(lut[k]));
}

/* The lookups of nf4_dequant for contiguous output, 16 values a step, when the compiler targets
 * AVX-512 or AVX2 (./build.sh builds with -march=native): the 16-entry table sits in registers
 * and one permute looks up 16 (or 8) codes. The same values as the scalar loop, bit for bit.
 * e is even (a whole byte); returns how many of the n values it wrote. */
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#ifdef __AVX512F__
#define MB_NF4_LOOKUP "AVX-512 permutes"
#else
#define MB_NF4_LOOKUP "AVX2 permutes"
#endif
static size_t nf4_lookup_simd(const uint8_t *packed, size_t e, size_t n, const float lut[16], float *dst) {
    const __m128i low4 = _mm_set1_epi8(15);
#ifdef __AVX512F__
    const __m512 t = _mm512_loadu_ps(lut);
#else
    const __m256 t0 = _mm256_loadu_ps(lut), t1 = _mm256_loadu_ps(lut + 8);
    const __m256i seven = _mm256_set1_epi32(7);
#endif
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)(packed + ((e + i) >> 1)));
        /* value 2j is byte j's high nibble, 2j + 1 its low one */
        __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low4), _mm_and_si128(b, low4));
#ifdef __AVX512F__
        _mm512_storeu_ps(dst + i, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), t));
#else
        for (int h = 0; h < 2; h++) {
            __m256i k = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(codes, 8) : codes);
            __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, k), _mm256_permutevar8x32_ps(t1, k),
                                        _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, seven)));
            _mm256_storeu_ps(dst + i + 8 * (size_t)h, v);
        }
#endif
    }
    return i;
}
#else
#define MB_NF4_LOOKUP "scalar"
static size_t nf4_lookup_simd(const uint8_t *packed, size_t e, size_t n, const float lut[16], float *dst) {
    (void)packed, (void)e, (void)n, (void)lut, (void)dst;
    return 0; /* the scalar loop does it all */
}
#endif

/* Values [e, e + n) of the flattened NF4 weight -> dst[0], dst[stride], dst[2 * stride], ...
 * One 16-entry table per block, then one lookup per value. */
static void nf4_dequant(const MbNf4 *q, size_t e, size_t n, float *dst, size_t stride) {
    const uint8_t *packed = q->packed;
    size_t end = e + n;
    while (e < end) {
        size_t b = e / q->blocksize, bend = MB_MIN((b + 1) * q->blocksize, end);
        float lut[16];
        nf4_block_lut(q, b, lut);
        if (e & 1) { /* a range that starts on a low nibble */
            *dst = lut[packed[e >> 1] & 15];
            dst += stride, e++;
        }
        if (stride == 1) {
            size_t done = nf4_lookup_simd(packed, e, bend - e, lut, dst);
            e += done, dst += done;
        }
        for (; e + 2 <= bend; e += 2, dst += 2 * stride) {
            uint8_t byte = packed[e >> 1];
            dst[0] = lut[byte >> 4];
            dst[stride] = lut[byte & 15];
        }
        if (e < bend) {
            *dst = lut[packed[e >> 1] >> 4];
            dst += stride, e++;
        }
    }
}

/* Row r, columns [c0, c0+n) of w -> fp32 dst[0..n). */
static void weight_row_f32(const MbWeight *w, size_t r, size_t c0, size_t n, float *dst) {
    const MbNf4 *q = weight_nf4(w);
    if (q) {
        nf4_dequant(q, r * w->cols + c0, n, dst, 1);
        return;
    }
    const unsigned char *p = (const unsigned char *)w->data + (r * w->cols + c0) * mb_dtype_size(w->dtype);
    mb_convert_to_f32(w->dtype, p, dst, n);
}

/* The tile rows [r0, r0+nr) x cols [c0, c0+nc) of w, transposed into fp32 dst (nc, ld):
 * dst[c * ld + r] = w[r0 + r][c0 + c]. This is what a matmul kernel consumes. */
static void weight_tile_t(const MbWeight *w, size_t r0, size_t nr, size_t c0, size_t nc, float *dst,
                          size_t ld) {
    const MbNf4 *q = weight_nf4(w);
    if (q) { /* a tile at a time, never the whole matrix */
        for (size_t r = 0; r < nr; r++) nf4_dequant(q, (r0 + r) * w->cols + c0, nc, dst + r, ld);
        return;
    }
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

/* The tile rows [r0, r0+nr) x cols [c0, c0+nc) of w in fp32, as stored: dst[r * ld + c]. */
static void weight_tile(const MbWeight *w, size_t r0, size_t nr, size_t c0, size_t nc, float *dst, size_t ld) {
    for (size_t r = 0; r < nr; r++) weight_row_f32(w, r0 + r, c0, nc, dst + r * ld);
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
        if (!(w->owned = mb_aligned_alloc(t->nbytes))) return MB_ERR_OOM;
        memcpy(w->owned, t->data, t->nbytes);
        w->data = w->owned;
    }
    return MB_OK;
}

/* The index of the first NaN or inf among the n values of a F32, F16 or BF16 tensor (its
 * exponent bits all ones), or SIZE_MAX: an integer scan of the bytes, chunk by chunk. */
static size_t tensor_first_nonfinite(MbDtype dt, const void *data, size_t n) {
    size_t es = mb_dtype_size(dt), chunk = 4096;
    uint32_t mask = dt == MB_DT_F32 ? 0x7f800000u : dt == MB_DT_BF16 ? 0x7f80u : 0x7c00u;
    const unsigned char *p = data;
    for (size_t i0 = 0; i0 < n; i0 += chunk) {
        size_t m = MB_MIN(chunk, n - i0);
        int any = 0;
        if (es == 4)
            for (size_t i = 0; i < m; i++) {
                uint32_t v;
                memcpy(&v, p + (i0 + i) * 4, 4);
                any |= (v & mask) == mask;
            }
        else
            for (size_t i = 0; i < m; i++) {
                uint16_t v;
                memcpy(&v, p + (i0 + i) * 2, 2);
                any |= (v & mask) == mask;
            }
        if (!any) continue;
        for (size_t i = 0; i < m; i++) { /* the chunk that has one: where */
            uint32_t v = 0;
            memcpy(&v, p + (i0 + i) * es, es);
            if ((v & mask) == mask) return i0 + i;
        }
    }
    return SIZE_MAX;
}

typedef struct {
    const MbTensorInfo *t;
    size_t first[256];  /* each thread's first non-finite index in its share, or SIZE_MAX */
} FiniteScan;

static void finite_scan_task(void *ctx, int tid, int nt) {
    FiniteScan *a = ctx;
    size_t i0, i1, es = mb_dtype_size(a->t->dtype);
    mb_split(a->t->numel, tid, nt, &i0, &i1);
    size_t k = tensor_first_nonfinite(a->t->dtype, (const unsigned char *)a->t->data + i0 * es, i1 - i0);
    a->first[tid] = k == SIZE_MAX ? SIZE_MAX : i0 + k;
}

/* A frozen weight with NaN or inf would make every loss NaN: named at load, with the file. The
 * scan reads the tensor once at memory speed (about 4 GB/s a thread), on the pool's threads
 * when there is one. */
static MbStatus tensor_check_finite(const MbTensorInfo *t, const char *file, MbPool *pool) {
    if (t->dtype != MB_DT_F32 && t->dtype != MB_DT_F16 && t->dtype != MB_DT_BF16) return MB_OK;
    FiniteScan scan;
    scan.t = t;
    for (int k = 0; k < 256; k++) scan.first[k] = SIZE_MAX;
    if (pool && pool->n <= 256 && t->numel >= ((size_t)1 << 20)) mb_pool_run(pool, finite_scan_task, &scan);
    else finite_scan_task(&scan, 0, 1);
    size_t i = SIZE_MAX;
    for (int k = 0; k < 256; k++) i = MB_MIN(i, scan.first[k]);
    if (i == SIZE_MAX) return MB_OK;
    float x;
    mb_convert_to_f32(t->dtype, (const unsigned char *)t->data + i * mb_dtype_size(t->dtype), &x, 1);
    size_t cols = t->ndim == 2 ? t->shape[1] : t->numel;
    return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' holds %s at [%zu, %zu] --> the file is damaged (a NaN or inf "
                   "weight makes every output NaN): export or download it again", file, t->name,
                   isnan(x) ? "NaN" : "inf", i / cols, i % cols);
}

static void weight_free(MbWeight *w) {
    free(w->owned);
    memset(w, 0, sizeof *w);
}

/* ---- NF4 quantization (load_in_4bit) ---- */

/* Quantizes one block of n <= 64 fp32 values (of a weight in dtype dt; `short_block`: the last
 * block of the weight, shorter than 64) to codes q[0..n) and returns its absmax. The clamp to
 * [-1, 1] is implicit: every threshold lies inside, so a value beyond 1 gets code 15 either way. */
static float nf4_quantize_block(const float *x, size_t n, MbDtype dt, int short_block, const float t[15],
                                uint8_t *q) {
    float absmax = 0.0f, s[MB_NF4_BLOCKSIZE], m[8] = {0};
    size_t i = 0;
    for (; i + 8 <= n; i += 8) /* 8 running maxima: vectorizes, and max does not depend on order */
        for (size_t l = 0; l < 8; l++) m[l] = MB_MAX(m[l], fabsf(x[i + l]));
    for (; i < n; i++) absmax = MB_MAX(absmax, fabsf(x[i]));
    for (size_t l = 0; l < 8; l++) absmax = MB_MAX(absmax, m[l]);
    float r = 1.0f / absmax;
    for (i = 0; i < n; i++) s[i] = x[i] * r;
    if (short_block && dt == MB_DT_BF16)
        for (i = 0; i < n; i++) s[i] = bf16_to_f32(f32_to_bf16(s[i]));
    if (short_block && dt == MB_DT_F16)
        for (i = 0; i < n; i++) s[i] = f16_to_f32(f32_to_f16(s[i]));
    for (i = 0; i < n; i++) q[i] = 0; /* NaN (an all-zero block) compares false: code 0 */
    for (int k = 0; k < 15; k++)
        for (i = 0; i < n; i++) q[i] += s[i] >= t[k]; /* branch-free, vectorizes */
    return absmax;
}

/* bitsandbytes' quantize_blockwise on the CPU (quantize_cpu / quantize_block): n fp32 values in
 * blocks of `blocksize`, each scaled by its max |a| (a true division) to the nearest entry of
 * map (256 ascending values), ties to the lower. */
static void blockwise8_quantize(const float *a, size_t n, size_t blocksize, const float map[256], uint8_t *codes,
                                float *scales) {
    for (size_t b0 = 0; b0 < n; b0 += blocksize) {
        size_t m = MB_MIN(blocksize, n - b0);
        float amax = -FLT_MAX;
        for (size_t i = 0; i < m; i++) amax = fmaxf(amax, fabsf(a[b0 + i]));
        scales[b0 / blocksize] = amax;
        for (size_t i = 0; i < m; i++) codes[b0 + i] = (uint8_t)code_nearest(map, 256, a[b0 + i] / amax);
    }
}

/* Double quantization of the nb block absmax values into q (offset, map), codes and scales: the
 * second half of bitsandbytes' quantize_4bit(compress_statistics=True). */
static MbStatus nf4_double_quant(const float *absmax, size_t nb, MbNf4 *q, uint8_t *codes, float *scales) {
    nf4_dynamic_map(q->nested_quant_map);
    q->nested_blocksize = MB_NF4_NESTED_BLOCKSIZE;
    q->offset = torch_sum_f32(absmax, nb) / (float)nb; /* torch.mean */
    float *a = mb_malloc(nb * sizeof(float));
    if (!a) return MB_ERR_OOM;
    for (size_t i = 0; i < nb; i++) a[i] = absmax[i] - q->offset;
    blockwise8_quantize(a, nb, MB_NF4_NESTED_BLOCKSIZE, q->nested_quant_map, codes, scales);
    free(a);
    return MB_OK;
}

/* The first half of quantize_4bit: blocks [b0, b1) of w -> packed codes and absmax. Threads take
 * disjoint ranges of blocks, so the result does not depend on their number. */
typedef struct {
    const MbWeight *w;
    size_t n, nb;
    float t[15];
    float *absmax;      /* (nb) */
    uint8_t *packed;    /* (n / 2) */
} Nf4QuantTask;

static void nf4_quantize_task(void *ctx, int tid, int nt) {
    Nf4QuantTask *a = ctx;
    size_t b0, b1, es = mb_dtype_size(a->w->dtype);
    mb_split(a->nb, tid, nt, &b0, &b1);
    float x[MB_NF4_BLOCKSIZE];
    uint8_t c[MB_NF4_BLOCKSIZE];
    for (size_t b = b0; b < b1; b++) {
        size_t e0 = b * MB_NF4_BLOCKSIZE, m = MB_MIN((size_t)MB_NF4_BLOCKSIZE, a->n - e0);
        mb_convert_to_f32(a->w->dtype, (const unsigned char *)a->w->data + e0 * es, x, m);
        a->absmax[b] = nf4_quantize_block(x, m, a->w->dtype, m < MB_NF4_BLOCKSIZE, a->t, c);
        for (size_t i = 0; i < m; i += 2) a->packed[(e0 + i) / 2] = (uint8_t)(c[i] << 4 | c[i + 1]);
    }
}

/* Quantizes the dense weight w (F32, F16 or BF16) to NF4 with double quantization, as
 * bitsandbytes' quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True) does;
 * w then owns its 4-bit state. compute: the dtype dequantized values round to; pool: threads for
 * the blocks (NULL: this thread). name: for messages. */
static MbStatus weight_quantize_nf4(MbWeight *w, const char *name, MbDtype compute, MbPool *pool) {
    size_t n = w->rows * w->cols, nb = (n + MB_NF4_BLOCKSIZE - 1) / MB_NF4_BLOCKSIZE,
           ns = (nb + MB_NF4_NESTED_BLOCKSIZE - 1) / MB_NF4_NESTED_BLOCKSIZE;
    if (n % 2)
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: %zu values: an NF4 weight packs two codes per byte "
                       "and needs an even count", name, n);
    /* one block: the MbNf4, the nested scales (fp32), the packed codes, the absmax codes */
    size_t head = (sizeof(MbNf4) + 63) / 64 * 64;
    unsigned char *block = mb_aligned_alloc(head + 4 * ns + n / 2 + nb);
    float *absmax = block ? mb_malloc(nb * sizeof(float)) : NULL;
    if (!absmax) return free(block), MB_ERR_OOM;
    MbNf4 *q = (MbNf4 *)(void *)block;
    memset(q, 0, sizeof *q);
    float *scales = (float *)(void *)(block + head);
    uint8_t *packed = block + head + 4 * ns, *codes = packed + n / 2;
    Nf4QuantTask task = {w, n, nb, {0}, absmax, packed};
    nf4_thresholds(task.t);
    if (pool) mb_pool_run(pool, nf4_quantize_task, &task);
    else nf4_quantize_task(&task, 0, 1);
    q->packed = packed;
    q->blocksize = MB_NF4_BLOCKSIZE;
    q->nblocks = nb;
    q->compute = compute;
    if (nf4_double_quant(task.absmax, nb, q, codes, scales)) return free(absmax), free(block), MB_ERR_OOM;
    q->absmax_q = codes;
    q->nested_absmax = (const unsigned char *)scales;
    free(task.absmax);
    free(w->owned);
    w->owned = block;
    w->data = q;
    w->dtype = MB_DT_U8;
    return MB_OK;
}

/* ---- NF4 checkpoints saved by bitsandbytes through transformers (Linear4bit's state dict) ----
 *   NAME                                  U8 (rows * cols / 2, 1) packed codes
 *   NAME.absmax                           U8 (blocks) codes with double quant, else F32 (blocks)
 *   NAME.quant_map                        F32 (16) the NF4 code book
 *   NAME.nested_absmax                    F32 (ceil(blocks / nested_blocksize)) (double quant)
 *   NAME.nested_quant_map                 F32 (256) (double quant)
 *   NAME.quant_state.bitsandbytes__nf4    U8: JSON {quant_type, blocksize, dtype, shape,
 *                                         nested_blocksize, nested_dtype, nested_offset}
 * The tensors stay in the mapped file. */

/* Whether the checkpoint holds `name` as a bitsandbytes 4-bit weight. */
static int bnb_is_4bit(const MbSafetensors *st, const char *name) {
    static const char *suffix[] = {".absmax", ".quant_state.bitsandbytes__nf4",
                                   ".quant_state.bitsandbytes__fp4", ".quant_map"};
    char key[512];
    for (size_t i = 0; i < sizeof suffix / sizeof *suffix; i++) {
        snprintf(key, sizeof key, "%s%s", name, suffix[i]);
        if (mb_safetensors_find(st, key)) return 1;
    }
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    return t && t->dtype == MB_DT_U8;
}

/* NAME.suffix of dtype dt holding n values (n == 0: any), or an error naming its file */
static MbStatus bnb_tensor(const MbSafetensors *st, const MbTensorInfo *w, const char *suffix, MbDtype dt,
                           size_t n, const char *why, const MbTensorInfo **out) {
    char key[512];
    snprintf(key, sizeof key, "%s%s", w->name, suffix);
    const MbTensorInfo *t = mb_safetensors_find(st, key);
    *out = t;
    if (!t)
        return mb_fail(MB_ERR_FORMAT, "%s: bitsandbytes 4-bit weight '%s' has no '%s' --> the "
                       "checkpoint is incomplete; save it again with save_pretrained", w->file, w->name, key);
    if (t->dtype != dt)
        return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has dtype %s, want %s", t->file, key,
                       mb_dtype_name(t->dtype), mb_dtype_name(dt));
    if (n && t->numel != n)
        return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' holds %zu values; %s needs %zu", t->file, key,
                       t->numel, why, n);
    return MB_OK;
}

static MbStatus bnb_json_size(const char *file, const char *key, const MbJsonDoc *doc, const char *field,
                              size_t *out) {
    const MbJson *v = json_get(doc, json_root(doc), field);
    if (!json_size(v, out) || *out == 0)
        return mb_fail(MB_ERR_FORMAT, "%s: quant state '%s' has no positive integer \"%s\"", file, key, field);
    return MB_OK;
}

/* The NF4 weight `t` (rows, cols) with its bitsandbytes companions, validated, as w. */
static MbStatus weight_from_bnb(const MbSafetensors *st, const MbTensorInfo *t, size_t rows, size_t cols,
                                MbDtype compute, MbWeight *w) {
    memset(w, 0, sizeof *w);
    char key[512], qkey[512], why[128];
    snprintf(qkey, sizeof qkey, "%s.quant_state.bitsandbytes__nf4", t->name);
    const MbTensorInfo *qs = mb_safetensors_find(st, qkey);
    if (!qs) {
        snprintf(key, sizeof key, "%s.quant_state.bitsandbytes__fp4", t->name);
        const MbTensorInfo *fp4 = mb_safetensors_find(st, key);
        if (fp4)
            return mb_fail(MB_ERR_UNSUPPORTED, "%s: '%s': 4-bit quant type fp4 is not supported --> "
                           "medbot reads NF4 (bnb_4bit_quant_type=\"nf4\")", fp4->file, key);
        return mb_fail(MB_ERR_FORMAT, "%s: bitsandbytes 4-bit weight '%s' has no '%s.quant_state."
                       "bitsandbytes__nf4' --> the checkpoint is incomplete; save it again with "
                       "save_pretrained", t->file, t->name, t->name);
    }
    if (qs->dtype != MB_DT_U8)
        return mb_fail(MB_ERR_FORMAT, "%s: quant state '%s' is %s, want U8 (JSON bytes)", qs->file, qkey,
                       mb_dtype_name(qs->dtype));
    char where[600];
    snprintf(where, sizeof where, "%s: quant state '%s'", qs->file, qkey);
    MbJsonDoc doc;
    MbStatus rc = json_parse(where, (const char *)qs->data, qs->nbytes, &doc);
    if (rc) return rc;
    const MbJson *root = json_root(&doc), *v;
    size_t blocksize = 0, nested_bs = 0, n = rows * cols, dims[2] = {0, 0};
    MbNf4 q;
    memset(&q, 0, sizeof q);
    v = json_get(&doc, root, "quant_type");
    if (root->kind != MB_JSON_OBJECT || !v || v->kind != MB_JSON_STRING || strcmp(json_str(&doc, v), "nf4")) {
        rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: quant_type is not \"nf4\" (medbot reads NF4 4-bit weights)", where);
        goto done;
    }
    v = json_get(&doc, root, "shape");
    if (!v || v->kind != MB_JSON_ARRAY || v->count != 2 || !json_size(json_first(&doc, v), &dims[0]) ||
        !json_size(json_next(&doc, json_first(&doc, v)), &dims[1]) || dims[0] != rows || dims[1] != cols) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: \"shape\" is not [%zu, %zu] (config.json's shape of '%s')", where,
                     rows, cols, t->name);
        goto done;
    }
    if ((rc = bnb_json_size(qs->file, qkey, &doc, "blocksize", &blocksize))) goto done;
    if (blocksize % 2 || n % 2) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: blocksize %zu and %zu values must be even", where, blocksize, n);
        goto done;
    }
    if (t->dtype != MB_DT_U8 || t->numel != n / 2) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: 4-bit weight '%s' is %s with %zu values; a (%zu, %zu) NF4 weight "
                     "is U8 with %zu (bnb_4bit_quant_storage other than uint8 is not supported)", t->file,
                     t->name, mb_dtype_name(t->dtype), t->numel, rows, cols, n / 2);
        goto done;
    }
    q.packed = t->data;
    q.blocksize = blocksize;
    q.nblocks = (n + blocksize - 1) / blocksize;
    q.compute = compute;
    const MbTensorInfo *absmax, *qmap, *nested, *nmap;
    snprintf(why, sizeof why, "a (%zu, %zu) weight in blocks of %zu", rows, cols, blocksize);
    if ((rc = bnb_tensor(st, t, ".quant_map", MB_DT_F32, 16, "the NF4 code book", &qmap))) goto done;
    for (int k = 0; k < 16; k++) {
        float c;
        memcpy(&c, (const unsigned char *)qmap->data + 4 * k, 4);
        if (c != mb_nf4_code[k]) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: '%s' is not the NF4 code book (entry %d is %g, want %g)",
                         qmap->file, qmap->name, k, (double)c, (double)mb_nf4_code[k]);
            goto done;
        }
    }
    snprintf(key, sizeof key, "%s.nested_absmax", t->name);
    if (!mb_safetensors_find(st, key) && !json_get(&doc, root, "nested_offset")) { /* no double quant */
        if ((rc = bnb_tensor(st, t, ".absmax", MB_DT_F32, q.nblocks, why, &absmax)) ||
            (rc = tensor_check_finite(absmax, absmax->file, NULL)))
            goto done;
        q.absmax = absmax->data;
    } else {
        double off;
        if ((rc = bnb_json_size(qs->file, qkey, &doc, "nested_blocksize", &nested_bs))) goto done;
        v = json_get(&doc, root, "nested_dtype");
        if (!json_num(json_get(&doc, root, "nested_offset"), &off) || !v || v->kind != MB_JSON_STRING ||
            strcmp(json_str(&doc, v), "float32")) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: double quant needs a numeric \"nested_offset\" and "
                         "\"nested_dtype\": \"float32\"", where);
            goto done;
        }
        size_t ns = (q.nblocks + nested_bs - 1) / nested_bs;
        char why2[160];
        snprintf(why2, sizeof why2, "%zu absmax codes in blocks of %zu", q.nblocks, nested_bs);
        if ((rc = bnb_tensor(st, t, ".absmax", MB_DT_U8, q.nblocks, why, &absmax)) ||
            (rc = bnb_tensor(st, t, ".nested_absmax", MB_DT_F32, ns, why2, &nested)) ||
            (rc = bnb_tensor(st, t, ".nested_quant_map", MB_DT_F32, 256, "the 8-bit map", &nmap)) ||
            (rc = tensor_check_finite(nested, nested->file, NULL)) || (rc = tensor_check_finite(nmap, nmap->file, NULL)))
            goto done;
        if (!isfinite(off)) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: nested_offset is not a finite number", where);
            goto done;
        }
        q.absmax_q = absmax->data;
        q.nested_absmax = nested->data;
        q.nested_blocksize = nested_bs;
        q.offset = (float)off; /* saved as the fp32 value's exact decimal */
        memcpy(q.nested_quant_map, nmap->data, sizeof q.nested_quant_map);
    }
    MbNf4 *state = mb_malloc(sizeof q);
    if (!state) {
        rc = MB_ERR_OOM;
        goto done;
    }
    *state = q;
    w->dtype = MB_DT_U8;
    w->rows = rows;
    w->cols = cols;
    w->data = w->owned = state;
done:
    json_free(&doc);
    return rc;
}

// ============================================================================================
// ---------- 5. ops (CPU) ----------
// The op table MbOps is the only thing the model calls. This section is its CPU implementation:
// fp32 activations, weights expanded tile by tile, work split over a thread pool. The CUDA
// section implements the same table. Activation pointers are backend memory: the model never
// dereferences them and never does pointer arithmetic on them except through mb_act_at.
// ============================================================================================

/* An activation element in backend memory, ops->act_size bytes: fp32 on the CPU, bf16 on the CUDA
 * backend (which computes in fp32 and stores bf16). The type is float only so that the CPU ops can
 * use the pointers as they are; the model never dereferences an MbAct pointer and moves it only
 * through mb_act_at. Everything else the ops take (norm statistics, log-sum-exps, logits,
 * per-row values, LoRA parameters and gradients, optimizer state) is a plain float: fp32 on
 * every backend. */
typedef float MbAct;

typedef struct MbOps MbOps;
struct MbOps {
    const char *name;
    void *ctx;                 /* backend state */
    size_t act_size;           /* bytes per activation element */
    int host_memory;           /* activations live in host memory (the CPU backend) */
    int fast;                  /* the fast path may serve matmul_forward / logits_forward: set by
                                  mb_model_forward for a model loaded with MbLoadOptions.fast, for
                                  that call only (training and eval never see it) */
    /* The first failure of an op that returns nothing (out of memory for its scratch, a device
     * error), kept with its message: a device backend then does nothing more but free, and the
     * model, the trainer and generation return it (mb_ops_status) after a forward, a backward, an
     * optimizer step or a copy to the host. alloc returns NULL without setting it. */
    MbStatus err;
    char err_msg[1024];
    void (*destroy)(MbOps *);
    /* Memory. Activation buffers hold act_size-byte values; every other buffer (norm statistics,
     * per-row log-probs, logits, LoRA parameters and gradients, optimizer state) is fp32 or fp64
     * whatever the backend. Index arrays (tokens, lengths, rows, targets) are passed as host
     * pointers; a device backend copies them itself. */
    void *(*alloc)(MbOps *, size_t bytes);                                  /* zeroed */
    void (*free)(MbOps *, void *p);
    void (*to_host)(MbOps *, void *dst, const void *src, size_t bytes);    /* backend -> host */
    void (*from_host)(MbOps *, void *dst, const void *src, size_t bytes);  /* host -> backend */
    void (*zero)(MbOps *, void *p, size_t bytes);                           /* p[0 .. bytes) = 0, any buffer */

    /* ---- the ops, each backward after its forward: parameter gradients +=, activation gradients =
     * unless `accumulate` ---- */
    /* out (N, C) = wte[tokens] : nn.Embedding */
    void (*embedding_forward)(MbOps *, MbAct *out, const int32_t *tokens, const MbWeight *wte, size_t N);
    /* out (N, O) = inp (N, I) @ w(O, I)^T : nn.Linear without bias */
    void (*matmul_forward)(MbOps *, MbAct *out, const MbAct *inp, const MbWeight *w, size_t N);
    /* dinp (N, I) (+)= dout (N, O) @ w (O, I) */
    void (*matmul_backward)(MbOps *, MbAct *dinp, const MbAct *dout, const MbWeight *w, size_t N, int accumulate);
    /* logits (N, V) fp32 = inp (N, C) @ w(V, C)^T : the lm_head of generation (fp32 output whatever
     * the activations' dtype) */
    void (*logits_forward)(MbOps *, float *logits, const MbAct *inp, const MbWeight *w, size_t N);
    /* out (N, C) = w * inp / sqrt(mean(inp^2) + eps), rstd (N) saved : LlamaRMSNorm */
    void (*rmsnorm_forward)(MbOps *, MbAct *out, float *rstd, const MbAct *inp, const MbWeight *w,
                            size_t N, float eps);
    /* dinp (N, C) (+)= d rmsnorm(inp)/d inp . dout; w frozen (no weight gradient) */
    void (*rmsnorm_backward)(MbOps *, MbAct *dinp, const MbAct *dout, const MbAct *inp, const MbWeight *w,
                             const float *rstd, size_t N, int accumulate);
    /* x (B, T, nh, D) rotated in place at positions pos0 + t : apply_rotary_pos_emb (HF layout) */
    void (*rope_forward)(MbOps *, MbAct *x, const float *inv_freq, int B, int T, int pos0, int nh, int D);
    /* dx (B, T, nh, D) rotated back in place (the transpose of rope_forward) */
    void (*rope_backward)(MbOps *, MbAct *dx, const float *inv_freq, int B, int T, int pos0, int nh, int D);
    /* cache (B, S, K*D) rows pos0 .. pos0+T-1 of each sequence = x (B, T, K*D) */
    void (*kv_store)(MbOps *, MbAct *cache, const MbAct *x, int B, int T, int S, int pos0, int KD);
    /* out (B, T, H, D) = softmax(q k^T / sqrt(D) + mask) v over the cache (B, S, K, D); query t
     * sits at pos0 + t and sees keys j <= pos0 + t with j < lens[b] (lens NULL: no padding);
     * lse (B, H, T) log-sum-exp saved for the backward (may be NULL) : sdpa with GQA */
    void (*attention_forward)(MbOps *, MbAct *out, float *lse, const MbAct *q, const MbAct *kc,
                              const MbAct *vc, const int *lens, int B, int T, int S, int pos0, int H,
                              int K, int D);
    /* dq (B, T, H, D), dk, dv (B, T, K, D) = gradients of attention_forward (pos0 0, S = T) given
     * dout, the inputs and the saved out and lse */
    void (*attention_backward)(MbOps *, MbAct *dq, MbAct *dk, MbAct *dv, const MbAct *dout, const MbAct *q,
                               const MbAct *k, const MbAct *v, const MbAct *out, const float *lse,
                               const int *lens, int B, int T, int H, int K, int D);
    /* out (n) = silu(gate) * up : LlamaMLP's act_fn(gate_proj(x)) * up_proj(x) */
    void (*swiglu_forward)(MbOps *, MbAct *out, const MbAct *gate, const MbAct *up, size_t n);
    /* dgate, dup (n) = gradients of swiglu_forward */
    void (*swiglu_backward)(MbOps *, MbAct *dgate, MbAct *dup, const MbAct *dout, const MbAct *gate,
                            const MbAct *up, size_t n);
    /* out (n, C) = inp[rows[i]] for i < n */
    void (*gather_rows)(MbOps *, MbAct *out, const MbAct *inp, const int *rows, size_t n, size_t C);
    /* out (N, C) = 0 except rows[i] = inp[i] for i < n : the backward of gather_rows */
    void (*scatter_rows)(MbOps *, MbAct *out, const MbAct *inp, const int *rows, size_t n, size_t N, size_t C);
    /* out (n) = a (n) + b (n); out may alias a or b : the residual connection */
    void (*add_forward)(MbOps *, MbAct *out, const MbAct *a, const MbAct *b, size_t n);
    /* u (N, R) = x (N, I) @ A^T; out (N, O) += scale * u @ B^T : PEFT's lora_B(lora_A(x)) * scaling.
     * A (R, I) and B (O, R) are fp32 weights. */
    void (*lora_forward)(MbOps *, MbAct *out, MbAct *u, const MbAct *x, const MbWeight *A, const MbWeight *B,
                         size_t N, float scale);
    /* dA (R, I) += du^T x, dB (O, R) += scale dout^T u, dx (N, I) += du @ A with du = scale dout @ B */
    void (*lora_backward)(MbOps *, MbAct *dx, float *dA, float *dB, const MbAct *dout, const MbAct *x,
                          const MbAct *u, const MbWeight *A, const MbWeight *B, size_t N, float scale);
    /* out (n) = inp * keep / (1 - p) with keep[i] = hash(seed, i) >= p : nn.Dropout with a
     * counter-based mask, so the backward (the same call on the gradient) and a recomputation
     * under gradient checkpointing see the same mask */
    void (*dropout_forward)(MbOps *, MbAct *out, const MbAct *inp, size_t n, float p, uint64_t seed);
    /* log-probabilities of targets under logits = x @ w^T without keeping the logits:
     * logp (M) = logits[m][targets[m]] - lse[m], lse (M) = logsumexp(logits[m]),
     * lsum (M) = sum over the vocabulary of logits[m] (for TRL's logits/chosen and logits/rejected), fp32 :
     * selective_log_softmax(lm_head(x), targets) */
    void (*logprob_forward)(MbOps *, float *logp, float *lse, float *lsum, const MbAct *x, const MbWeight *w,
                            const int32_t *targets, size_t M);
    /* dx (M, C) = d(sum_m g[m] logp[m]) / dx : the backward of logprob_forward */
    void (*logprob_backward)(MbOps *, MbAct *dx, const float *g, const MbAct *x, const MbWeight *w,
                             const int32_t *targets, const float *lse, size_t M);

    /* ---- optimizer state (fp32 vectors of n) ---- */
    double (*sumsq)(MbOps *, const float *x, size_t n);                  /* sum of x^2 */
    void (*scale)(MbOps *, float *x, float s, size_t n);                  /* x *= s */
    void (*fill)(MbOps *, float *x, float v, size_t n);                   /* x = v */
    /* torch.optim.AdamW step `step` (1-based) with decoupled weight decay */
    void (*adamw)(MbOps *, float *p, const float *g, float *m, float *v, size_t n, double lr, double beta1,
                  double beta2, double eps, double wd, long step);
    /* acc (n) += x (n) in fp64: a step's gradients summed over micro-batches and ranks in any
     * order give the same fp32 result */
    void (*accumulate_f64)(MbOps *, double *acc, const float *x, size_t n);
    void (*from_f64)(MbOps *, float *out, const double *in, size_t n);   /* out = (float)in */
    void (*fill_f64)(MbOps *, double *x, size_t n);                      /* x = 0 */

    /* ---- random weights (--random_init), the same values on every backend ---- */
    /* dst (n) bytes = the top byte of hash(seed, i) */
    void (*random_bytes)(MbOps *, void *dst, size_t n, uint64_t seed);
    /* dst (n) bf16 = std * normal(0, 1) by Box-Muller from hash(seed, 2i), hash(seed, 2i + 1) */
    void (*random_normal)(MbOps *, void *dst, size_t n, uint64_t seed, float std);
};

static MbAct *mb_act_at(const MbOps *ops, MbAct *base, size_t elems) {
    return (MbAct *)(void *)((char *)base + elems * ops->act_size);
}

static pthread_mutex_t mb_ops_err_mu = PTHREAD_MUTEX_INITIALIZER; /* guards MbOps.err of every backend */

/* Makes st, with this thread's message, ops' failure unless it already has one (any thread of the
 * backend may call it); returns st. */
static MbStatus mb_ops_fail(MbOps *ops, MbStatus st) {
    pthread_mutex_lock(&mb_ops_err_mu);
    if (!ops->err) {
        ops->err = st;
        snprintf(ops->err_msg, sizeof ops->err_msg, "%s", mb_last_error());
    }
    pthread_mutex_unlock(&mb_ops_err_mu);
    return st;
}

/* MB_OK, or ops' failure with its message on this thread */
static MbStatus mb_ops_status(MbOps *ops) {
    pthread_mutex_lock(&mb_ops_err_mu);
    MbStatus st = ops->err ? mb_fail(ops->err, "%s", ops->err_msg) : MB_OK;
    pthread_mutex_unlock(&mb_ops_err_mu);
    return st;
}

/* The status of a NULL from ops->alloc: the backend's failure when it has one, else out of
 * memory (the message is set) */
static MbStatus mb_ops_oom(MbOps *ops) {
    MbStatus st = mb_ops_status(ops);
    return st ? st : MB_ERR_OOM;
}

typedef struct {
    MbOps *ops;
    MbPool *pool;
    float **scratch;      /* per thread */
    size_t *scratch_n;
} MbCpu;

/* Per-thread scratch of at least n floats (each thread grows only its own slot); NULL when out
 * of memory, which is then the backend's failure (the op skips its work). */
static float *cpu_scratch(MbCpu *cpu, int tid, size_t n) {
    if (cpu->scratch_n[tid] < n) {
        float *p = mb_aligned_alloc(n * sizeof(float));
        if (!p) return mb_ops_fail(cpu->ops, MB_ERR_OOM), NULL;
        free(cpu->scratch[tid]);
        cpu->scratch[tid] = p;
        cpu->scratch_n[tid] = n;
    }
    return cpu->scratch[tid];
}

/* A host buffer of n bytes for an op, or NULL with the failure recorded in ops */
static void *cpu_op_alloc(MbOps *ops, size_t bytes) {
    void *p = mb_aligned_alloc(bytes);
    if (!p) mb_ops_fail(ops, MB_ERR_OOM);
    return p;
}

static void *cpu_alloc(MbOps *ops, size_t bytes) {
    (void)ops;
    void *p = mb_aligned_alloc(bytes);
    if (p) memset(p, 0, bytes);
    return p;
}

static void cpu_free(MbOps *ops, void *p) {
    (void)ops;
    free(p);
}

static void cpu_copy(MbOps *ops, void *dst, const void *src, size_t bytes) {
    (void)ops;
    if (dst != src && bytes) memcpy(dst, src, bytes);
}

static void cpu_zero(MbOps *ops, void *p, size_t bytes) {
    (void)ops;
    memset(p, 0, bytes);
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

/* One matmul over the thread pool. Forward: out (N, rows) = inp (N, cols) @ W^T, tiles of W
 * transposed. Backward: out (N, cols) (+)= inp (N, rows) @ W, tiles of W as stored. Either way
 * the kernel reduces over MM_IB inputs into MM_OB outputs, and threads own disjoint outputs. */
typedef struct {
    MbCpu *cpu;
    float *out;
    const float *inp;
    const MbWeight *w;
    size_t N;
    int backward, accumulate;
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
    const MbWeight *w = t->w;
    size_t O = t->backward ? w->cols : w->rows, I = t->backward ? w->rows : w->cols;
    size_t nblocks = (O + MM_OB - 1) / MM_OB, b0, b1;
    mb_split(nblocks, tid, nt, &b0, &b1);
    float *wt = cpu_scratch(t->cpu, tid, (size_t)MM_IB * MM_OB);
    for (size_t b = b0; wt && b < b1; b++) {
        size_t o0 = b * MM_OB, no = MB_MIN((size_t)MM_OB, O - o0);
        for (size_t i0 = 0; i0 < I; i0 += MM_IB) {
            size_t ni = MB_MIN((size_t)MM_IB, I - i0);
            if (no < MM_OB) memset(wt, 0, (size_t)MM_IB * MM_OB * sizeof(float));
            if (t->backward) weight_tile(w, i0, ni, o0, no, wt, MM_OB);
            else weight_tile_t(w, o0, no, i0, ni, wt, MM_OB);
            for (size_t n0 = 0; n0 < t->N; n0 += MM_MR)
                matmul_kernel(t->out + n0 * O + o0, O, t->inp + n0 * I + i0, I, wt, ni, no,
                              MB_MIN((size_t)MM_MR, t->N - n0), i0 == 0 && !t->accumulate);
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
    for (size_t o = o0; wf && o < o1; o++) {
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

/* ---- the fast path (inference only: MbOps.fast) ----
 * Not the exact numbers: NF4 weights meet activations quantized to 8 bits per block of 64 in
 * integer dot products; bf16 weights meet activations rounded to bf16. Each returns 1 when it
 * computed out, 0 when this weight or shape is not one it serves (the exact kernels then do). */

/* -- fast NF4 -- */
/* out (N, O) = inp (N, I) @ W^T on an NF4 weight in integer arithmetic (llama.cpp's scheme of
 * 8-bit activations against 4-bit weights, on bitsandbytes' layout as it is: no repacking):
 *   - each row of inp is quantized per block of 64 to int8: d = max|x| / 127, q = round(x / d);
 *   - the 16 NF4 levels become int8 L = round(level * 127), looked up per code;
 *   - per block b the int32 dot of L with q is scaled by absmax(b) * d / 127, summed in fp32.
 * Each product is off by at most half a step of either grid, about absmax * max|x| / 127 in all
 * (a block's 64 products: 64 times that; the errors mostly cancel, tests/test_fast_nf4.c bounds
 * them at 6 sigma). The compute dtype's rounding (MbNf4.compute) plays no part. Served:
 * blocksize 64 and I % 64 == 0 (no block straddles two rows); else 0: the exact kernels run.
 * Kernels, one function each (the scalar one is the reference and always compiled):
 *   - scalar: the definition, loop by loop;
 *   - AVX2: llama.cpp's sign trick, maddubs(|L|, sign(q, L)) -> int16 pairs -> int32;
 *   - AVX-512 VNNI: vpdpbusd on L + 128 (unsigned) and q (signed); the excess 128 * sum(q) is
 *     taken off by starting the accumulator at -128 * sum(q) (FnAct.lane, FnAct.sum).
 * Few rows (decode) stream each weight row once through registers. Many rows (prefill, AVX-512)
 * unpack a tile of FN_TO outputs x FN_KB blocks to int8 once, transposed so that one vector holds
 * 16 outputs x 4 inputs, and run a register-blocked int8 GEMM over all N rows against it.
 * Threads own disjoint outputs and every output is summed in the same order whatever the split,
 * so the result does not depend on the thread count. The activations are quantized once per call
 * on the calling thread (AVX-512: 0.3 ns a value), before the one pool run.
 * Measured with tests/bench/bench_nf4.c on a shared 2-core Xeon VM (AVX-512 VNNI, 2 threads):
 * decode at 75-91% of the read bandwidth measured beside it (9-13 GB/s; exact 1.5-2.4), prefill
 * at 210-560 GOP/s (exact 70-155), the spread being what else ran on the machine. */
#define FN_BLOCK 64      /* values per block (bitsandbytes' blocksize) */
#define FN_ROWS_GEMM 4   /* from this many rows on, the tiled GEMM (where the build has one) */
#define FN_TO 64         /* GEMM tile: outputs (4 vectors of 16) ... */
#define FN_KB 8          /* ... x blocks of 64 inputs: 32 KB of int8, in L1 */
#define FN_RN 3          /* GEMM register block: rows ... */
#define FN_RV 4          /* ... x vectors of 16 outputs (12 int32 + 12 fp32 accumulators) */
#define FN_PREFETCH 4096 /* bytes ahead a decode kernel asks for: without, a thread reads at half speed */
#define FN_TILE_BYTES ((size_t)FN_KB * 16 * FN_TO * 4 + (size_t)FN_KB * FN_TO * sizeof(float))

/* inp quantized. Per row, per pair of blocks (2p, 2p+1), 128 bytes: the even-indexed values of
 * 2p, those of 2p+1, the odd-indexed of 2p, those of 2p+1 (32 each), the order in which the two
 * nibbles of bitsandbytes' bytes give the codes (value 2j is byte j's high nibble). A missing
 * block 2p+1 (nb odd) is zeros, with zero sums and scale. */
typedef struct {
    size_t N, nb, pairs; /* rows, blocks per row, (nb + 1) / 2 */
    int8_t *q;           /* (N, pairs, 128) */
    int32_t *lane;       /* (N, pairs, 16): -128 * sum of q over values [8l, 8l + 8) of block 2p
                            (lane l < 8) or of 2p+1 (lane 8 + l): what int32 lane l of a 64-byte
                            load of the pair's even values (and of its odd ones) meets */
    int32_t *sum;        /* (N, 2 * pairs): -128 * sum of the block's q */
    float *d;            /* (N, 2 * pairs): max|x| / 127 / 127, the weight of one q * L product over
                            absmax (NaN when the block holds a NaN or an inf: its outputs are NaN) */
} FnAct;

/* Bytes of FnAct's arrays for (N, I), each 64-byte aligned */
static size_t fn_act_bytes(size_t N, size_t I) {
    size_t pairs = (I / FN_BLOCK + 1) / 2;
    return N * pairs * (128 + 64) + (N * pairs * 8 + 63) / 64 * 64 * 2;
}

/* FnAct for (N, I) over buf (fn_act_bytes, 64-byte aligned) */
static FnAct fn_act_layout(size_t N, size_t I, void *buf) {
    FnAct x;
    x.N = N, x.nb = I / FN_BLOCK, x.pairs = (x.nb + 1) / 2;
    unsigned char *p = buf;
    x.q = (int8_t *)p, p += N * x.pairs * 128;
    x.lane = (int32_t *)(void *)p, p += N * x.pairs * 64;
    x.sum = (int32_t *)(void *)p, p += (N * x.pairs * 8 + 63) / 64 * 64;
    x.d = (float *)(void *)p;
    return x;
}

/* 127 / m for a block's finite max|x| = m; 0 (then q is 0) for a block of zeros or of values so
 * small that 127 / m overflows */
static float fn_inverse(float m) {
    float inv = m > 0.0f ? 127.0f / m : 0.0f;
    return inv <= FLT_MAX ? inv : 0.0f;
}

/* Block b of row n (64 values at xb) into a */
static void fn_quantize_block(FnAct *a, size_t n, size_t b, const float *xb) {
    float m = 0.0f, inf = 0.0f;
    for (int i = 0; i < FN_BLOCK; i++) {
        float v = fabsf(xb[i]);
        m = v > m ? v : m;
        inf += xb[i] * 0.0f; /* NaN once a value is NaN or inf */
    }
    int8_t *qe = a->q + (n * a->pairs + b / 2) * 128 + (b % 2) * 32, *qo = qe + 64;
    int32_t *lane = a->lane + (n * a->pairs + b / 2) * 16 + (b % 2) * 8, sum = 0;
    if (inf != 0.0f) { /* NaN or inf: q = 0 (no rounding of NaN), a NaN scale */
        memset(qe, 0, 32), memset(qo, 0, 32), memset(lane, 0, 8 * sizeof(int32_t));
        a->sum[n * 2 * a->pairs + b] = 0, a->d[n * 2 * a->pairs + b] = NAN;
        return;
    }
    float inv = fn_inverse(m);
    for (int l = 0; l < 8; l++) {
        int32_t s = 0;
        for (int j = 0; j < 4; j++) { /* rintf: to nearest, ties to even (the default rounding) */
            int e = (int)rintf(xb[8 * l + 2 * j] * inv), o = (int)rintf(xb[8 * l + 2 * j + 1] * inv);
            qe[4 * l + j] = (int8_t)e, qo[4 * l + j] = (int8_t)o;
            s += e + o;
        }
        lane[l] = -128 * s;
        sum += s;
    }
    a->sum[n * 2 * a->pairs + b] = -128 * sum;
    a->d[n * 2 * a->pairs + b] = m / 127.0f / 127.0f;
}

/* The missing second block of row n's last pair (nb odd): zeros */
static void fn_quantize_pad(FnAct *a, size_t n) {
    if (a->nb % 2 == 0) return;
    size_t p = n * a->pairs + a->pairs - 1;
    memset(a->q + p * 128 + 32, 0, 32), memset(a->q + p * 128 + 96, 0, 32);
    memset(a->lane + p * 16 + 8, 0, 8 * sizeof(int32_t));
    a->sum[n * 2 * a->pairs + a->nb] = 0, a->d[n * 2 * a->pairs + a->nb] = 0.0f;
}

/* Row n of inp (x: I values) into a */
MB_UNUSED static void fn_quantize_row(FnAct *a, size_t n, const float *x) {
    for (size_t b = 0; b < a->nb; b++) fn_quantize_block(a, n, b, x + b * FN_BLOCK);
    fn_quantize_pad(a, n);
}

/* round(level * 127) of the 16 NF4 levels */
static void fn_levels(int8_t lv[16]) {
    for (int k = 0; k < 16; k++) lv[k] = (int8_t)rintf(mb_nf4_code[k] * 127.0f);
}

/* The absmax of blocks [b, b + n) (flattened), as nf4_absmax gives them: the product rounded
 * to fp32 before the offset is added (the two loops keep the compiler from fusing them). With
 * AVX-512, 16 map lookups a gather: decode reads 90% of the machine's bandwidth, not 80%. */
#define FN_RUN 256 /* blocks whose absmax a kernel takes at once (its stack array) */
static void fn_absmax(const MbNf4 *q, size_t b, size_t n, float *a) {
    if (!q->absmax_q) {
        memcpy(a, q->absmax + 4 * b, 4 * n);
        return;
    }
    for (size_t i = 0; i < n;) {
        size_t k = (b + i) / q->nested_blocksize, end = MB_MIN(n, (k + 1) * q->nested_blocksize - b);
        float s;
        memcpy(&s, q->nested_absmax + 4 * k, 4);
#ifdef __AVX512F__
        for (; i + 16 <= end; i += 16) {
            __m512i k16 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(const void *)(q->absmax_q + b + i)));
            __m512 map = _mm512_i32gather_ps(k16, q->nested_quant_map, 4);
            _mm512_storeu_ps(a + i, _mm512_mul_ps(map, _mm512_set1_ps(s)));
        }
#endif
        for (; i < end; i++) a[i] = q->nested_quant_map[q->absmax_q[b + i]] * s;
    }
    for (size_t i = 0; i < n; i++) a[i] += q->offset;
}

/* The reference: out[n][o] for o in [o0, o1), every n; tile unused */
MB_UNUSED static void fn_matmul_scalar(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o0,
                                       size_t o1, void *tile) {
    (void)tile;
    int8_t lv[16];
    fn_levels(lv);
    size_t nb = x->nb;
    float absmax[FN_RUN];
    for (size_t o = o0; o < o1; o++)
        for (size_t b0 = 0; b0 < nb; b0 += FN_RUN) {
            size_t b1 = MB_MIN(nb, b0 + FN_RUN);
            fn_absmax(w, o * nb + b0, b1 - b0, absmax);
            for (size_t n = 0; n < x->N; n++) {
                float acc = 0.0f;
                for (size_t b = b0; b < b1; b++) {
                    const uint8_t *c = w->packed + (o * nb + b) * 32;
                    const int8_t *qe = x->q + (n * x->pairs + b / 2) * 128 + (b % 2) * 32, *qo = qe + 64;
                    int32_t dot = 0;
                    for (int j = 0; j < 32; j++) dot += lv[c[j] >> 4] * qe[j] + lv[c[j] & 15] * qo[j];
                    acc += (float)dot * (absmax[b - b0] * x->d[n * 2 * x->pairs + b]);
                }
                out[n * O + o] = b0 ? out[n * O + o] + acc : acc;
            }
        }
}

#if defined(__AVX2__)
#include <immintrin.h>
#define FN_HAVE_AVX2 1

static float fn_hsum256(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* Rows [n0, n0 + rn) of out at output o, rn <= 4 (a constant where it is inlined with one), over
 * blocks [b0, b1) of the weight row: one block (32 bytes, 64 codes) at a time, looked up once. */
static inline void fn_gemv_rows_avx2(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o, size_t n0,
                                     size_t rn, const float *absmax, size_t b0, size_t b1, __m256i lut) {
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    size_t nb = x->nb, ld = 2 * x->pairs;
    __m256 acc[2][4]; /* [b % 2][row]: two accumulators hide the FMA latency */
    for (size_t r = 0; r < rn; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    for (size_t b = b0; b < b1; b++) {
        const uint8_t *cp = w->packed + (o * nb + b) * 32;
        _mm_prefetch((const char *)(uintptr_t)((uintptr_t)cp + FN_PREFETCH), _MM_HINT_T0);
        __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)cp);
        __m256i we = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(c, 4), m4));
        __m256i wo = _mm256_shuffle_epi8(lut, _mm256_and_si256(c, m4));
        __m256i ae = _mm256_sign_epi8(we, we), ao = _mm256_sign_epi8(wo, wo);
        for (size_t r = 0; r < rn; r++) {
            const int8_t *qe = x->q + ((n0 + r) * x->pairs + b / 2) * 128 + (b % 2) * 32;
            __m256i xe = _mm256_loadu_si256((const __m256i *)(const void *)qe);
            __m256i xo = _mm256_loadu_si256((const __m256i *)(const void *)(qe + 64));
            /* each maddubs pair is at most 2 * 127 * 127; the two go to int32 apart */
            __m256i pe = _mm256_maddubs_epi16(ae, _mm256_sign_epi8(xe, we));
            __m256i po = _mm256_maddubs_epi16(ao, _mm256_sign_epi8(xo, wo));
            __m256i s = _mm256_add_epi32(_mm256_madd_epi16(pe, ones), _mm256_madd_epi16(po, ones));
            __m256 scale = _mm256_set1_ps(absmax[b - b0] * x->d[(n0 + r) * ld + b]);
            acc[0][r] = _mm256_add_ps(acc[0][r], _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale)); /* an FMA with -mfma */
        }
        for (size_t r = 0; r < rn; r++) {
            __m256 t = acc[0][r];
            acc[0][r] = acc[1][r], acc[1][r] = t;
        }
    }
    for (size_t r = 0; r < rn; r++) {
        float v = fn_hsum256(_mm256_add_ps(acc[0][r], acc[1][r]));
        out[(n0 + r) * O + o] = b0 ? out[(n0 + r) * O + o] + v : v;
    }
}

/* AVX2: each weight row streamed once (its absmax FN_RUN blocks at a time first) and met by up to
 * 4 rows of inp at a time. Every N takes this path (no tiled GEMM in this build). */
MB_UNUSED static void fn_matmul_avx2(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o0, size_t o1,
                                     void *tile) {
    (void)tile;
    int8_t lv[32];
    fn_levels(lv);
    memcpy(lv + 16, lv, 16);
    const __m256i lut = _mm256_loadu_si256((const __m256i *)(const void *)lv);
    size_t nb = x->nb;
    float absmax[FN_RUN];
    for (size_t o = o0; o < o1; o++)
        for (size_t b0 = 0; b0 < nb; b0 += FN_RUN) {
            size_t b1 = MB_MIN(nb, b0 + FN_RUN);
            fn_absmax(w, o * nb + b0, b1 - b0, absmax);
            for (size_t n0 = 0; n0 < x->N; n0 += 4) {
                size_t rn = MB_MIN((size_t)4, x->N - n0);
                if (rn == 4) fn_gemv_rows_avx2(x, w, O, out, o, n0, 4, absmax, b0, b1, lut);
                else if (rn == 1) fn_gemv_rows_avx2(x, w, O, out, o, n0, 1, absmax, b0, b1, lut);
                else fn_gemv_rows_avx2(x, w, O, out, o, n0, rn, absmax, b0, b1, lut);
            }
        }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FN_QUANTIZE_ROW fn_quantize_row_avx512
#define FN_QUANTIZER "AVX-512"

/* fn_quantize_row, 16 values a step: the same bytes (vcvtps2dq rounds as rintf does) */
static void fn_quantize_row_avx512(FnAct *a, size_t n, const float *x) {
    const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m512 big = _mm512_set1_ps(FLT_MAX);
    size_t nb = a->nb, pairs = a->pairs; /* locals: the int8 stores below may alias any field */
    int8_t *q = a->q + n * pairs * 128;
    int32_t *lane = a->lane + n * pairs * 16, *sum = a->sum + n * 2 * pairs;
    float *d = a->d + n * 2 * pairs;
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * FN_BLOCK;
        __m512 v[4], m = _mm512_setzero_ps();
        __mmask16 bad = 0;
        for (int k = 0; k < 4; k++) {
            v[k] = _mm512_loadu_ps(xb + 16 * k);
            __m512 av = _mm512_abs_ps(v[k]);
            bad |= _mm512_cmp_ps_mask(av, big, _CMP_NLE_UQ); /* NaN or inf */
            m = _mm512_max_ps(m, av);
        }
        if (bad) {
            fn_quantize_block(a, n, b, xb);
            continue;
        }
        float mx = _mm512_reduce_max_ps(m);
        __m512 inv = _mm512_set1_ps(fn_inverse(mx));
        __m128i c[4], t[4];
        for (int k = 0; k < 4; k++) {
            c[k] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v[k], inv))); /* values 16k .. 16k+15 */
            t[k] = _mm_shuffle_epi8(c[k], split); /* their 8 even ones, then the 8 odd ones */
        }
        int8_t *qe = q + (b / 2) * 128 + (b % 2) * 32, *qo = qe + 64;
        _mm_storeu_si128((__m128i *)(void *)qe, _mm_unpacklo_epi64(t[0], t[1]));
        _mm_storeu_si128((__m128i *)(void *)(qe + 16), _mm_unpacklo_epi64(t[2], t[3]));
        _mm_storeu_si128((__m128i *)(void *)qo, _mm_unpackhi_epi64(t[0], t[1]));
        _mm_storeu_si128((__m128i *)(void *)(qo + 16), _mm_unpackhi_epi64(t[2], t[3]));
        /* sums of 8 consecutive q: vpsadbw of q + 128 (q ^ 0x80 as unsigned bytes) minus 8 * 128 */
        __m512i all = _mm512_inserti32x4(_mm512_castsi128_si512(c[0]), c[1], 1);
        all = _mm512_inserti32x4(_mm512_inserti32x4(all, c[2], 2), c[3], 3);
        __m512i sad = _mm512_sad_epu8(_mm512_xor_si512(all, _mm512_set1_epi8((char)0x80)), _mm512_setzero_si512());
        __m256i lanes = _mm256_sub_epi32(_mm256_set1_epi32(1024), _mm512_cvtepi64_epi32(sad));
        _mm256_storeu_si256((__m256i *)(void *)(lane + (b / 2) * 16 + (b % 2) * 8),
                            _mm256_slli_epi32(lanes, 7)); /* -128 * (sad - 1024) */
        sum[b] = 128 * (8 * 1024 - (int32_t)_mm512_reduce_add_epi64(sad));
        d[b] = mx / 127.0f / 127.0f;
    }
    fn_quantize_pad(a, n);
}
#else
#define FN_QUANTIZE_ROW fn_quantize_row
#define FN_QUANTIZER "scalar"
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define FN_HAVE_AVX512 1

/* the 16 levels + 128 as unsigned bytes, in each 128-bit lane (vpshufb looks up per lane) */
static __m512i fn_lut_u8_512(void) {
    int8_t lv[16];
    uint8_t u[64];
    fn_levels(lv);
    for (int k = 0; k < 64; k++) u[k] = (uint8_t)(lv[k % 16] + 128);
    return _mm512_loadu_si512(u);
}

/* Rows [n0, n0 + rn) of out at output o, rn <= 4 (a constant where it is inlined with one): a
 * pair of blocks of the weight row (64 bytes) at a time. int32 lane l holds the dot of values
 * [8l, 8l + 8) of block 2p (l < 8) or of 2p+1; two accumulators per row hide the FMA latency. */
static inline void fn_gemv_rows_avx512(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o, size_t n0,
                                       size_t rn, const float *absmax, size_t p0, size_t p1, int first, __m512i lut) {
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    size_t nb = x->nb, ld = 2 * x->pairs;
    __m512 acc[2][4]; /* [p % 2][row] */
    for (size_t r = 0; r < rn; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    for (size_t p = p0; p < p1; p++) {
        const uint8_t *cp = w->packed + (o * nb + 2 * p) * 32;
        _mm_prefetch((const char *)(uintptr_t)((uintptr_t)cp + FN_PREFETCH), _MM_HINT_T0);
        __m512i c = 2 * p + 1 < nb ? _mm512_loadu_si512(cp) : _mm512_maskz_loadu_epi8(0xffffffffu, cp);
        __m512i wh = _mm512_shuffle_epi8(lut, _mm512_and_si512(_mm512_srli_epi16(c, 4), m4));
        __m512i wl = _mm512_shuffle_epi8(lut, _mm512_and_si512(c, m4));
        __m128 a01 = _mm_castpd_ps(_mm_load_sd((const double *)(const void *)(absmax + 2 * (p - p0))));
        for (size_t r = 0; r < rn; r++) {
            size_t np = (n0 + r) * x->pairs + p;
            __m512i s = _mm512_load_si512(x->lane + np * 16);
            s = _mm512_dpbusd_epi32(s, wh, _mm512_load_si512(x->q + np * 128));
            s = _mm512_dpbusd_epi32(s, wl, _mm512_load_si512(x->q + np * 128 + 64));
            __m128 d01 = _mm_castpd_ps(_mm_load_sd((const double *)(const void *)(x->d + (n0 + r) * ld + 2 * p)));
            __m512 scale = _mm512_permutexvar_ps(halves, _mm512_castps128_ps512(_mm_mul_ps(a01, d01)));
            acc[0][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[0][r]);
        }
        for (size_t r = 0; r < rn; r++) { /* the other accumulator for the next pair */
            __m512 t = acc[0][r];
            acc[0][r] = acc[1][r], acc[1][r] = t;
        }
    }
    for (size_t r = 0; r < rn; r++) {
        float v = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
        out[(n0 + r) * O + o] = first ? v : out[(n0 + r) * O + o] + v;
    }
}

/* Few rows: each weight row streamed once, its absmax (FN_RUN blocks at a time) first */
static void fn_gemv_avx512(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o0, size_t o1) {
    float absmax[FN_RUN];
    const __m512i lut = fn_lut_u8_512();
    size_t nb = x->nb;
    for (size_t o = o0; o < o1; o++)
        for (size_t p0 = 0; p0 < x->pairs; p0 += FN_RUN / 2) {
            size_t p1 = MB_MIN(x->pairs, p0 + FN_RUN / 2), n = MB_MIN(nb, 2 * p1) - 2 * p0;
            fn_absmax(w, o * nb + 2 * p0, n, absmax);
            if (n % 2) absmax[n] = 0.0f; /* the missing block of the last pair */
            for (size_t n0 = 0; n0 < x->N; n0 += 4) {
                size_t rn = MB_MIN((size_t)4, x->N - n0);
                if (rn == 1) fn_gemv_rows_avx512(x, w, O, out, o, n0, 1, absmax, p0, p1, p0 == 0, lut);
                else fn_gemv_rows_avx512(x, w, O, out, o, n0, rn, absmax, p0, p1, p0 == 0, lut);
            }
        }
}

/* 16 x 16 int32 transpose in place: r[i] lane g -> r[g] lane i */
static void fn_transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int k = 0; k < 8; k++) {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    for (int m = 0; m < 4; m++) { /* u[4m + j], 128-bit lane L: rows 4m .. 4m+3 at column 4L + j */
        u[4 * m + 0] = _mm512_unpacklo_epi64(t[4 * m], t[4 * m + 2]);
        u[4 * m + 1] = _mm512_unpackhi_epi64(t[4 * m], t[4 * m + 2]);
        u[4 * m + 2] = _mm512_unpacklo_epi64(t[4 * m + 1], t[4 * m + 3]);
        u[4 * m + 3] = _mm512_unpackhi_epi64(t[4 * m + 1], t[4 * m + 3]);
    }
    for (int j = 0; j < 4; j++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
        __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
        r[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
    }
}

/* GEMM tile: outputs [ot, ot + FN_TO) (those from o1 on: zero weights) x blocks [b0, b0 + kb) as
 * L + 128: wt (kb, 16, FN_TO, 4) bytes, group g of block b holding what q's 4 bytes at the same
 * place hold (g < 8: even values 8g .. 8g+6; else odd ones); at (kb, FN_TO): the absmax. */
static void fn_unpack_avx512(const MbNf4 *w, size_t nb, size_t ot, size_t o1, size_t b0, size_t kb,
                             uint8_t *wt, float *at, __m512i lut) {
    const __m512i m4 = _mm512_set1_epi8(15);
    float absmax[FN_KB];
    for (size_t i = 0; i < FN_TO; i++) {
        if (ot + i < o1) fn_absmax(w, (ot + i) * nb + b0, kb, absmax);
        for (size_t b = 0; b < kb; b++) at[b * FN_TO + i] = ot + i < o1 ? absmax[b] : 0.0f;
    }
    for (size_t v = 0; v < FN_TO / 16; v++)
        for (size_t b = 0; b < kb; b++) {
            __m512i r[16];
            for (size_t i = 0; i < 16; i++) {
                size_t o = ot + 16 * v + i;
                if (o >= o1) {
                    r[i] = _mm512_set1_epi8((char)-128); /* L + 128 of level 0 */
                    continue;
                }
                __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)(w->packed + (o * nb + b0 + b) * 32));
                __m512i hl = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(c, 4)), c, 1);
                r[i] = _mm512_shuffle_epi8(lut, _mm512_and_si512(hl, m4)); /* evens, then odds */
            }
            fn_transpose16(r);
            for (size_t g = 0; g < 16; g++) _mm512_store_si512(wt + ((b * 16 + g) * FN_TO + 16 * v) * 4, r[g]);
        }
}

/* out rows [n0, n0 + rn) x vectors [v0, v0 + FN_RV) of the tile at ot, += the tile's kb blocks
 * (first: out starts at 0). rn is a constant where it is inlined with one. */
static inline void fn_micro_avx512(const FnAct *x, size_t n0, size_t rn, size_t b0, size_t kb, const uint8_t *wt,
                                   const float *at, size_t v0, float *out, size_t O, size_t ot, size_t o1, int first) {
    __m512 f[FN_RN][FN_RV];
    __mmask16 mask[FN_RV];
    for (size_t v = 0; v < FN_RV; v++) {
        size_t o = ot + 16 * (v0 + v);
        mask[v] = o >= o1 ? 0 : o1 - o >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (o1 - o)) - 1);
    }
    for (size_t r = 0; r < rn; r++)
        for (size_t v = 0; v < FN_RV; v++)
            f[r][v] = first ? _mm512_setzero_ps()
                            : _mm512_maskz_loadu_ps(mask[v], out + (n0 + r) * O + ot + 16 * (v0 + v));
    for (size_t b = 0; b < kb; b++) {
        size_t bb = b0 + b;
        __m512i s[FN_RN][FN_RV];
        const int8_t *xq[FN_RN];
        for (size_t r = 0; r < rn; r++) {
            xq[r] = x->q + ((n0 + r) * x->pairs + bb / 2) * 128 + (bb % 2) * 32;
            for (size_t v = 0; v < FN_RV; v++) s[r][v] = _mm512_set1_epi32(x->sum[(n0 + r) * 2 * x->pairs + bb]);
        }
        const uint8_t *wb = wt + (b * 16 * FN_TO + 16 * v0) * 4;
        for (size_t g = 0; g < 16; g++) {
            __m512i wv[FN_RV];
            for (size_t v = 0; v < FN_RV; v++) wv[v] = _mm512_load_si512(wb + (g * FN_TO + 16 * v) * 4);
            size_t off = g < 8 ? 4 * g : 64 + 4 * (g - 8);
            for (size_t r = 0; r < rn; r++) {
                int32_t xi;
                memcpy(&xi, xq[r] + off, 4);
                __m512i xb = _mm512_set1_epi32(xi);
                for (size_t v = 0; v < FN_RV; v++) s[r][v] = _mm512_dpbusd_epi32(s[r][v], wv[v], xb);
            }
        }
        for (size_t r = 0; r < rn; r++) {
            __m512 d = _mm512_set1_ps(x->d[(n0 + r) * 2 * x->pairs + bb]);
            for (size_t v = 0; v < FN_RV; v++) {
                __m512 scale = _mm512_mul_ps(_mm512_load_ps(at + b * FN_TO + 16 * (v0 + v)), d);
                f[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][v]), scale, f[r][v]);
            }
        }
    }
    for (size_t r = 0; r < rn; r++)
        for (size_t v = 0; v < FN_RV; v++)
            _mm512_mask_storeu_ps(out + (n0 + r) * O + ot + 16 * (v0 + v), mask[v], f[r][v]);
}

/* AVX-512 VNNI: few rows through fn_gemv_avx512, many through tiles of FN_TO x FN_KB blocks
 * (tile: FN_TILE_BYTES, 64-byte aligned), each unpacked once and met by all N rows. */
MB_UNUSED static void fn_matmul_avx512(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o0, size_t o1,
                                       void *tile) {
    if (x->N < FN_ROWS_GEMM) {
        fn_gemv_avx512(x, w, O, out, o0, o1);
        return;
    }
    const __m512i lut = fn_lut_u8_512();
    uint8_t *wt = tile;
    float *at = (float *)(void *)(wt + (size_t)FN_KB * 16 * FN_TO * 4);
    for (size_t ot = o0; ot < o1; ot += FN_TO)
        for (size_t b0 = 0; b0 < x->nb; b0 += FN_KB) {
            size_t kb = MB_MIN((size_t)FN_KB, x->nb - b0);
            fn_unpack_avx512(w, x->nb, ot, o1, b0, kb, wt, at, lut);
            for (size_t n0 = 0; n0 < x->N; n0 += FN_RN) {
                size_t rn = MB_MIN((size_t)FN_RN, x->N - n0);
                for (size_t v0 = 0; v0 < FN_TO / 16 && ot + 16 * v0 < o1; v0 += FN_RV) {
                    if (rn == FN_RN) fn_micro_avx512(x, n0, FN_RN, b0, kb, wt, at, v0, out, O, ot, o1, b0 == 0);
                    else fn_micro_avx512(x, n0, rn, b0, kb, wt, at, v0, out, O, ot, o1, b0 == 0);
                }
            }
        }
}
#endif

typedef void (*FnMatmul)(const FnAct *x, const MbNf4 *w, size_t O, float *out, size_t o0, size_t o1, void *tile);
#if defined(FN_HAVE_AVX512)
#define FN_MATMUL fn_matmul_avx512
#define FN_KERNEL "AVX-512 VNNI"
#elif defined(FN_HAVE_AVX2)
#define FN_MATMUL fn_matmul_avx2
#define FN_KERNEL "AVX2"
#else
#define FN_MATMUL fn_matmul_scalar
#define FN_KERNEL "scalar"
#endif

/* Threads take chunks of `unit` outputs in turn until none is left: a thread that wakes late (the
 * pool's wake-up, another program on the core) takes fewer. Each output is computed the same
 * way whoever takes it. */
typedef struct {
    MbCpu *cpu;
    const FnAct *x;
    const MbNf4 *w;
    size_t O;
    float *out;
    void *tile0;        /* thread 0's tile, after the activations in its scratch */
    size_t unit, next;  /* outputs per chunk (whole tiles or vectors); the next chunk to take */
    pthread_mutex_t mu; /* guards next */
} FnTask;

static void fn_task(void *ctx, int tid, int nt) {
    FnTask *t = ctx;
    (void)nt;
    void *tile = tid == 0 ? t->tile0 : cpu_scratch(t->cpu, tid, FN_TILE_BYTES / sizeof(float));
    while (tile) {
        pthread_mutex_lock(&t->mu);
        size_t o0 = t->next * t->unit;
        t->next++;
        pthread_mutex_unlock(&t->mu);
        if (o0 >= t->O) break;
        FN_MATMUL(t->x, t->w, t->O, t->out, o0, MB_MIN(o0 + t->unit, t->O), tile);
    }
}

static int fast_nf4_matmul(MbCpu *cpu, float *out, const float *inp, const MbWeight *w, size_t N) {
    const MbNf4 *q = weight_nf4(w);
    size_t O = w->rows, I = w->cols;
    if (!q || q->blocksize != FN_BLOCK || I % FN_BLOCK || !I || !O || !N) return 0;
    size_t act = fn_act_bytes(N, I);
    float *s0 = cpu_scratch(cpu, 0, (act + FN_TILE_BYTES) / sizeof(float));
    if (!s0) return 1; /* out of memory: the backend's failure, the op skips its work */
    FnAct x = fn_act_layout(N, I, s0);
    for (size_t n = 0; n < N; n++) FN_QUANTIZE_ROW(&x, n, inp + n * I);
    /* chunks: GEMM tiles; for decode about 64 KB of codes, whole vectors */
    size_t unit = N >= FN_ROWS_GEMM ? FN_TO : MB_MAX((size_t)16, ((size_t)131072 / I) / 16 * 16);
    FnTask t;
    t.cpu = cpu, t.x = &x, t.w = q, t.O = O, t.out = out, t.tile0 = (unsigned char *)s0 + act;
    t.unit = unit, t.next = 0;
    pthread_mutex_init(&t.mu, NULL);
    mb_pool_run(cpu->pool, fn_task, &t);
    pthread_mutex_destroy(&t.mu);
    return 1;
}
/* -- end fast NF4 -- */

/* -- fast bf16 -- */
/* ---- bf16 weights ----
 * out (N, O) = inp (N, I) @ W^T with W bf16 (O, I) row-major, inp and out fp32. Each weight is
 * widened to fp32 exactly (a bf16 is the top half of an fp32) and meets the fp32 activation in an
 * fp32 multiply-add: the exact path's products, summed in another order, so the error is fp32
 * rounding alone (|err| <= I u sum_i |w_i x_i|, u = 2^-24; about sqrt(I) u sum |w_i x_i| in practice).
 * Not activations rounded to bf16 and vdpbf16ps (llama.cpp's way): on the Xeon this was tuned on
 * (Sapphire Rapids) one vdpbf16ps zmm (32 products) retires every 2 cycles but two vfmadd231ps
 * zmm (16 each) every cycle, so the bf16 dot product would be slower and less exact.
 * Two shapes of work:
 *   - few rows (decode: N < FB_GEMM_N): a matvec that reads each weight once, at memory speed:
 *     8 (AVX-512) or 4 (AVX2) weight rows at a time, each prefetched FB_PF bytes ahead (more
 *     streams in flight: 8 rows read 1.5x faster than 1 here), against 1 or 2 activation rows;
 *   - more rows (prefill): a GEMM. A panel of NC outputs x FB_KC inputs is widened and
 *     transposed once into fp32 scratch, wp (kc, NC) with wp[k][o] = w[o][k], then MR activation
 *     rows at a time meet it in MR x NR vector accumulators: per input k, NR vector loads of wp,
 *     MR broadcasts of activations, MR x NR fused multiply-adds (AVX-512: 6 x 4 zmm, 93% of the
 *     FMA peak on one core here; AVX2: 4 x 3 ymm). FB_NB activation rows x FB_KB inputs stay in
 *     L2 while all the thread's panels pass, and the next panel's weights are prefetched.
 * Threads take disjoint groups of outputs (a matvec's rows, or a panel), so the result does not
 * depend on the thread count. Variants: scalar (the reference, always compiled), AVX2 + FMA and
 * AVX-512, each callable on its own (the tests run every one the build can). */
#define FB_GEMM_N 4 /* rows from which the GEMM serves */
#define FB_PF 512   /* bytes of a weight row the matvec prefetches ahead of its reads */
#define FB_KC 128   /* inputs per packed panel */
#define FB_NB 128   /* activation rows and */
#define FB_KB 2048  /* their inputs that the GEMM keeps in L2 (1 MB) while all its panels pass */

#if defined(__GNUC__) || defined(__clang__)
#define FB_INLINE static inline __attribute__((always_inline))
#else
#define FB_INLINE static inline
#endif

/* A way to compute outputs [o0, o1) of out (N, O), o0 a multiple of group(N); scratch holds
 * `scratch` floats (64-byte aligned) of the calling thread. */
typedef struct {
    const char *name;
    size_t mv_group, gemm_group; /* outputs a thread takes at a time: matvec, GEMM */
    size_t scratch;              /* floats of per-thread scratch */
    void (*rows)(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I, size_t o0,
                 size_t o1, float *scratch);
} FbVariant;

static size_t fb_group(const FbVariant *v, size_t N) { return N < FB_GEMM_N ? v->mv_group : v->gemm_group; }

/* The reference: one sequential fp32 sum per output. */
static void fb_rows_scalar(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                           size_t o0, size_t o1, float *scratch) {
    (void)scratch;
    for (size_t o = o0; o < o1; o++)
        for (size_t n = 0; n < N; n++) {
            const uint16_t *wr = w + o * I;
            const float *x = inp + n * I;
            float s = 0.0f;
            for (size_t i = 0; i < I; i++) s += bf16_to_f32(wr[i]) * x[i];
            out[n * O + o] = s;
        }
}

MB_UNUSED static const FbVariant fb_scalar = {"scalar", 1, 1, 0, fb_rows_scalar};

/* the sum of w[o][k] x[n][k] over k in [k0, I) in a fixed order: the vector loops' tail */
MB_UNUSED static float fb_tail(const uint16_t *wr, const float *x, size_t k0, size_t I) {
    float s = 0.0f;
    for (size_t k = k0; k < I; k++) s += bf16_to_f32(wr[k]) * x[k];
    return s;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* The GEMM's next block after (panel p of nc rows, inputs k0 of [kb, ke)) into L2 while this one
 * is multiplied: the pack reads 4 lines from each of nc rows, too many streams for the hardware
 * prefetcher when the weights come from memory (5-10% of a prefill here). */
static void fb_prefetch_next(const uint16_t *w, size_t O, size_t I, size_t p, size_t k0, size_t kb, size_t ke,
                             size_t o1, size_t nc) {
    size_t np = k0 + FB_KC < ke ? p : p + nc, nk = k0 + FB_KC < ke ? k0 + FB_KC : kb;
    size_t nkc = MB_MIN((size_t)FB_KC, ke - nk);
    for (size_t r = np; r < MB_MIN(MB_MIN(np + nc, O), o1); r++)
        for (size_t k = 0; k < nkc; k += 32) _mm_prefetch((const char *)(w + r * I + nk + k), _MM_HINT_T1);
}
#endif

#if defined(__AVX512F__)
#define FB512_NR 4 /* vectors of 16 outputs in a panel: 64 outputs */
#define FB512_MR 6 /* activation rows per kernel call */
#define FB512_NC (16 * FB512_NR)
#define FB512_MV_R 8 /* weight rows a matvec step reads */
#define FB512_MV_N 2 /* activation rows it meets them with */

FB_INLINE __m512 fb_widen16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(const void *)p)), 16));
}

/* out[n][o .. o+nr) for n < nn; rows[r]: the weight rows (a short group repeats its last) */
FB_INLINE void fb_mv_avx512(size_t nn, float *out, size_t O, const float *inp, const uint16_t *const rows[FB512_MV_R],
                            size_t I, size_t nr) {
    __m512 acc[FB512_MV_N][FB512_MV_R];
    for (size_t n = 0; n < nn; n++)
        for (size_t r = 0; r < FB512_MV_R; r++) acc[n][r] = _mm512_setzero_ps();
    size_t k = 0;
    for (; k + 16 <= I; k += 16) {
        __m512 wv[FB512_MV_R];
        for (size_t r = 0; r < FB512_MV_R; r++) wv[r] = fb_widen16(rows[r] + k);
        if (k % 32 == 0 && k + 32 + FB_PF / 2 <= I) /* a line of 64 bytes every other step, inside the row */
            for (size_t r = 0; r < FB512_MV_R; r++) _mm_prefetch((const char *)(rows[r] + k) + FB_PF, _MM_HINT_T0);
        for (size_t n = 0; n < nn; n++) {
            __m512 xv = _mm512_loadu_ps(inp + n * I + k);
            for (size_t r = 0; r < FB512_MV_R; r++) acc[n][r] = _mm512_fmadd_ps(wv[r], xv, acc[n][r]);
        }
    }
    for (size_t n = 0; n < nn; n++)
        for (size_t r = 0; r < nr; r++)
            out[n * O + r] = _mm512_reduce_add_ps(acc[n][r]) + fb_tail(rows[r], inp + n * I, k, I);
}

static void fb_matvec_avx512(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                             size_t o0, size_t o1) {
    for (size_t o = o0; o < o1; o += FB512_MV_R) {
        size_t nr = MB_MIN((size_t)FB512_MV_R, o1 - o);
        const uint16_t *rows[FB512_MV_R];
        for (size_t r = 0; r < FB512_MV_R; r++) rows[r] = w + (o + MB_MIN(r, nr - 1)) * I;
        for (size_t n0 = 0; n0 < N; n0 += FB512_MV_N) {
            if (N - n0 >= 2) fb_mv_avx512(2, out + n0 * O + o, O, inp + n0 * I, rows, I, nr);
            else fb_mv_avx512(1, out + n0 * O + o, O, inp + n0 * I, rows, I, nr);
        }
    }
}

/* 16 x 16 transpose of 32-bit values: r[i] lane j -> r[j] lane i */
static void fb_transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* b[4g + c] lane L: column 4L + c of rows 4g .. 4g+3 */
    for (int g = 0; g < 16; g += 4) {
        b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
        b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
        b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
        b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
    }
    for (int c = 0; c < 4; c++) {
        __m512i e0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x44), e1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xEE);
        __m512i e2 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x44), e3 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(e0, e2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(e0, e2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(e1, e3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(e1, e3, 0xDD);
    }
}

/* wp (kc, FB512_NC): wp[k][o] = w[o0 + o][k0 + k], 0 for rows o0 + o >= O. 16 rows x 32 inputs at
 * a time: their bf16 pairs transposed as 32-bit values, then each pair split into two fp32. */
static void fb_pack_avx512(float *wp, const uint16_t *w, size_t O, size_t I, size_t o0, size_t k0, size_t kc) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    for (size_t g = 0; g < FB512_NR; g++) {
        size_t og = o0 + 16 * g;
        size_t k = 0;
        for (; k + 32 <= kc; k += 32) {
            __m512i r[16];
            for (size_t i = 0; i < 16; i++)
                r[i] = og + i < O ? _mm512_loadu_si512((const void *)(w + (og + i) * I + k0 + k)) : _mm512_setzero_si512();
            fb_transpose16(r);
            for (size_t j = 0; j < 16; j++) {
                float *d = wp + (k + 2 * j) * FB512_NC + 16 * g;
                _mm512_store_ps(d, _mm512_castsi512_ps(_mm512_slli_epi32(r[j], 16)));
                _mm512_store_ps(d + FB512_NC, _mm512_castsi512_ps(_mm512_and_si512(r[j], hi)));
            }
        }
        for (; k < kc; k++)
            for (size_t i = 0; i < 16; i++)
                wp[k * FB512_NC + 16 * g + i] = og + i < O ? bf16_to_f32(w[(og + i) * I + k0 + k]) : 0.0f;
    }
}

/* out (mr, ld O)[.., 0 .. no) (+)= x (mr, ld I) [.., 0 .. kc) @ wp (kc, FB512_NC) */
FB_INLINE void fb_tile_avx512(size_t mr, float *out, size_t O, const float *x, size_t I, const float *wp, size_t kc,
                              size_t no, int first) {
    __m512 acc[FB512_MR][FB512_NR];
    __mmask16 m[FB512_NR];
    for (size_t j = 0; j < FB512_NR; j++) {
        size_t left = no > 16 * j ? no - 16 * j : 0;
        m[j] = (__mmask16)(left >= 16 ? 0xFFFF : (1u << left) - 1);
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t j = 0; j < FB512_NR; j++)
            acc[r][j] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m[j], out + r * O + 16 * j);
    for (size_t k = 0; k < kc; k++) {
        __m512 wv[FB512_NR];
        for (size_t j = 0; j < FB512_NR; j++) wv[j] = _mm512_load_ps(wp + k * FB512_NC + 16 * j);
        for (size_t r = 0; r < mr; r++) {
            __m512 xv = _mm512_set1_ps(x[r * I + k]);
            for (size_t j = 0; j < FB512_NR; j++) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t j = 0; j < FB512_NR; j++) _mm512_mask_storeu_ps(out + r * O + 16 * j, m[j], acc[r][j]);
}

/* out rows [nb, ne), outputs [p, p + no) (+)= inp's rows, inputs [k0, k0 + kc) @ the packed block wp */
static void fb_block_avx512(float *out, const float *inp, size_t O, size_t I, const float *wp, size_t p,
                            size_t no, size_t k0, size_t kc, size_t nb, size_t ne) {
    for (size_t n0 = nb; n0 < ne; n0 += FB512_MR) {
        float *po = out + n0 * O + p;
        const float *px = inp + n0 * I + k0;
        int first = k0 == 0;
        switch (MB_MIN((size_t)FB512_MR, ne - n0)) {
        case 1: fb_tile_avx512(1, po, O, px, I, wp, kc, no, first); break;
        case 2: fb_tile_avx512(2, po, O, px, I, wp, kc, no, first); break;
        case 3: fb_tile_avx512(3, po, O, px, I, wp, kc, no, first); break;
        case 4: fb_tile_avx512(4, po, O, px, I, wp, kc, no, first); break;
        case 5: fb_tile_avx512(5, po, O, px, I, wp, kc, no, first); break;
        default: fb_tile_avx512(FB512_MR, po, O, px, I, wp, kc, no, first); break;
        }
    }
}

static void fb_gemm_avx512(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                           size_t o0, size_t o1, float *wp) {
    for (size_t nb = 0; nb < N; nb += FB_NB)       /* activation rows kept in L2 */
        for (size_t kb = 0; kb < I; kb += FB_KB) { /* and their inputs */
            size_t ne = MB_MIN(N, nb + FB_NB), ke = MB_MIN(I, kb + FB_KB);
            for (size_t p = o0; p < o1; p += FB512_NC) /* this thread's panels */
                for (size_t k0 = kb; k0 < ke; k0 += FB_KC) {
                    size_t kc = MB_MIN((size_t)FB_KC, ke - k0);
                    fb_pack_avx512(wp, w, O, I, p, k0, kc);
                    fb_prefetch_next(w, O, I, p, k0, kb, ke, o1, FB512_NC);
                    fb_block_avx512(out, inp, O, I, wp, p, MB_MIN((size_t)FB512_NC, O - p), k0, kc, nb, ne);
                }
        }
}

static void fb_rows_avx512(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                           size_t o0, size_t o1, float *scratch) {
    if (N < FB_GEMM_N) fb_matvec_avx512(out, inp, w, N, O, I, o0, o1);
    else fb_gemm_avx512(out, inp, w, N, O, I, o0, o1, scratch);
}

MB_UNUSED static const FbVariant fb_avx512 = {"AVX-512", FB512_MV_R, FB512_NC, (size_t)FB_KC * FB512_NC, fb_rows_avx512};
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define FB256_NR 3 /* vectors of 8 outputs in a panel: 24 outputs */
#define FB256_MR 4
#define FB256_NC (8 * FB256_NR)
#define FB256_MV_R 4
#define FB256_MV_N 2

FB_INLINE __m256 fb_widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)), 16));
}

FB_INLINE float fb_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FB_INLINE void fb_mv_avx2(size_t nn, float *out, size_t O, const float *inp, const uint16_t *const rows[FB256_MV_R],
                          size_t I, size_t nr) {
    __m256 acc[FB256_MV_N][FB256_MV_R];
    for (size_t n = 0; n < nn; n++)
        for (size_t r = 0; r < FB256_MV_R; r++) acc[n][r] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + 8 <= I; k += 8) {
        __m256 wv[FB256_MV_R];
        for (size_t r = 0; r < FB256_MV_R; r++) wv[r] = fb_widen8(rows[r] + k);
        if (k % 32 == 0 && k + 32 + FB_PF / 2 <= I)
            for (size_t r = 0; r < FB256_MV_R; r++) _mm_prefetch((const char *)(rows[r] + k) + FB_PF, _MM_HINT_T0);
        for (size_t n = 0; n < nn; n++) {
            __m256 xv = _mm256_loadu_ps(inp + n * I + k);
            for (size_t r = 0; r < FB256_MV_R; r++) acc[n][r] = _mm256_fmadd_ps(wv[r], xv, acc[n][r]);
        }
    }
    for (size_t n = 0; n < nn; n++)
        for (size_t r = 0; r < nr; r++) out[n * O + r] = fb_hsum256(acc[n][r]) + fb_tail(rows[r], inp + n * I, k, I);
}

static void fb_matvec_avx2(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                           size_t o0, size_t o1) {
    for (size_t o = o0; o < o1; o += FB256_MV_R) {
        size_t nr = MB_MIN((size_t)FB256_MV_R, o1 - o);
        const uint16_t *rows[FB256_MV_R];
        for (size_t r = 0; r < FB256_MV_R; r++) rows[r] = w + (o + MB_MIN(r, nr - 1)) * I;
        for (size_t n0 = 0; n0 < N; n0 += FB256_MV_N) {
            if (N - n0 >= 2) fb_mv_avx2(2, out + n0 * O + o, O, inp + n0 * I, rows, I, nr);
            else fb_mv_avx2(1, out + n0 * O + o, O, inp + n0 * I, rows, I, nr);
        }
    }
}

/* 8 x 8 transpose of 32-bit values: r[i] lane j -> r[j] lane i */
static void fb_transpose8(__m256i r[8]) {
    __m256i a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* b[4g + c] lane L (128 bits): column 4L + c of rows 4g .. 4g+3 */
    for (int g = 0; g < 8; g += 4) {
        b[g] = _mm256_unpacklo_epi64(a[g], a[g + 2]);
        b[g + 1] = _mm256_unpackhi_epi64(a[g], a[g + 2]);
        b[g + 2] = _mm256_unpacklo_epi64(a[g + 1], a[g + 3]);
        b[g + 3] = _mm256_unpackhi_epi64(a[g + 1], a[g + 3]);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2x128_si256(b[c], b[4 + c], 0x20);
        r[4 + c] = _mm256_permute2x128_si256(b[c], b[4 + c], 0x31);
    }
}

/* wp (kc, FB256_NC): wp[k][o] = w[o0 + o][k0 + k], 0 for rows o0 + o >= O; 8 rows x 16 inputs at a time */
static void fb_pack_avx2(float *wp, const uint16_t *w, size_t O, size_t I, size_t o0, size_t k0, size_t kc) {
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    for (size_t g = 0; g < FB256_NR; g++) {
        size_t og = o0 + 8 * g;
        size_t k = 0;
        for (; k + 16 <= kc; k += 16) {
            __m256i r[8];
            for (size_t i = 0; i < 8; i++)
                r[i] = og + i < O ? _mm256_loadu_si256((const __m256i *)(const void *)(w + (og + i) * I + k0 + k))
                                  : _mm256_setzero_si256();
            fb_transpose8(r);
            for (size_t j = 0; j < 8; j++) {
                float *d = wp + (k + 2 * j) * FB256_NC + 8 * g;
                _mm256_store_ps(d, _mm256_castsi256_ps(_mm256_slli_epi32(r[j], 16)));
                _mm256_store_ps(d + FB256_NC, _mm256_castsi256_ps(_mm256_and_si256(r[j], hi)));
            }
        }
        for (; k < kc; k++)
            for (size_t i = 0; i < 8; i++)
                wp[k * FB256_NC + 8 * g + i] = og + i < O ? bf16_to_f32(w[(og + i) * I + k0 + k]) : 0.0f;
    }
}

FB_INLINE void fb_tile_avx2(size_t mr, float *out, size_t O, const float *x, size_t I, const float *wp, size_t kc,
                            size_t no, int first) {
    __m256 acc[FB256_MR][FB256_NR];
    __m256i m[FB256_NR]; /* lanes of outputs < no */
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (size_t j = 0; j < FB256_NR; j++) {
        size_t left = no > 8 * j ? MB_MIN(no - 8 * j, (size_t)8) : 0;
        m[j] = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), lane);
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t j = 0; j < FB256_NR; j++)
            acc[r][j] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(out + r * O + 8 * j, m[j]);
    for (size_t k = 0; k < kc; k++) {
        __m256 wv[FB256_NR];
        for (size_t j = 0; j < FB256_NR; j++) wv[j] = _mm256_load_ps(wp + k * FB256_NC + 8 * j);
        for (size_t r = 0; r < mr; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * I + k);
            for (size_t j = 0; j < FB256_NR; j++) acc[r][j] = _mm256_fmadd_ps(xv, wv[j], acc[r][j]);
        }
    }
    for (size_t r = 0; r < mr; r++)
        for (size_t j = 0; j < FB256_NR; j++) _mm256_maskstore_ps(out + r * O + 8 * j, m[j], acc[r][j]);
}

/* out rows [nb, ne), outputs [p, p + no) (+)= inp's rows, inputs [k0, k0 + kc) @ the packed block wp */
static void fb_block_avx2(float *out, const float *inp, size_t O, size_t I, const float *wp, size_t p, size_t no,
                          size_t k0, size_t kc, size_t nb, size_t ne) {
    for (size_t n0 = nb; n0 < ne; n0 += FB256_MR) {
        float *po = out + n0 * O + p;
        const float *px = inp + n0 * I + k0;
        int first = k0 == 0;
        switch (MB_MIN((size_t)FB256_MR, ne - n0)) {
        case 1: fb_tile_avx2(1, po, O, px, I, wp, kc, no, first); break;
        case 2: fb_tile_avx2(2, po, O, px, I, wp, kc, no, first); break;
        case 3: fb_tile_avx2(3, po, O, px, I, wp, kc, no, first); break;
        default: fb_tile_avx2(FB256_MR, po, O, px, I, wp, kc, no, first); break;
        }
    }
}

static void fb_gemm_avx2(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                         size_t o0, size_t o1, float *wp) {
    for (size_t nb = 0; nb < N; nb += FB_NB)       /* activation rows kept in L2 */
        for (size_t kb = 0; kb < I; kb += FB_KB) { /* and their inputs */
            size_t ne = MB_MIN(N, nb + FB_NB), ke = MB_MIN(I, kb + FB_KB);
            for (size_t p = o0; p < o1; p += FB256_NC) /* this thread's panels */
                for (size_t k0 = kb; k0 < ke; k0 += FB_KC) {
                    size_t kc = MB_MIN((size_t)FB_KC, ke - k0);
                    fb_pack_avx2(wp, w, O, I, p, k0, kc);
                    fb_prefetch_next(w, O, I, p, k0, kb, ke, o1, FB256_NC);
                    fb_block_avx2(out, inp, O, I, wp, p, MB_MIN((size_t)FB256_NC, O - p), k0, kc, nb, ne);
                }
        }
}

static void fb_rows_avx2(float *out, const float *inp, const uint16_t *w, size_t N, size_t O, size_t I,
                         size_t o0, size_t o1, float *scratch) {
    if (N < FB_GEMM_N) fb_matvec_avx2(out, inp, w, N, O, I, o0, o1);
    else fb_gemm_avx2(out, inp, w, N, O, I, o0, o1, scratch);
}

MB_UNUSED static const FbVariant fb_avx2 = {"AVX2", FB256_MV_R, FB256_NC, (size_t)FB_KC * FB256_NC, fb_rows_avx2};
#endif

/* One fast bf16 matmul over the thread pool: thread tid takes a share of the variant's groups
 * of outputs. */
typedef struct {
    const FbVariant *v;
    MbCpu *cpu;
    float *out;
    const float *inp;
    const uint16_t *w;
    size_t N, O, I;
} FbTask;

static void fb_task(void *ctx, int tid, int nt) {
    FbTask *t = ctx;
    size_t g = fb_group(t->v, t->N), g0, g1;
    mb_split((t->O + g - 1) / g, tid, nt, &g0, &g1);
    size_t o0 = g0 * g, o1 = MB_MIN(t->O, g1 * g);
    float *scratch = o0 < o1 && t->v->scratch ? cpu_scratch(t->cpu, tid, t->v->scratch) : NULL;
    if (o0 < o1 && (scratch || !t->v->scratch)) t->v->rows(t->out, t->inp, t->w, t->N, t->O, t->I, o0, o1, scratch);
}

/* The fastest variant this build has, or NULL where it has no vector kernels (there the exact
 * kernels, which the compiler vectorizes, beat the scalar loop) */
static const FbVariant *fb_best(void) {
#if defined(__AVX512F__)
    return &fb_avx512;
#elif defined(__AVX2__) && defined(__FMA__)
    return &fb_avx2;
#else
    return NULL;
#endif
}

static int fast_bf16_matmul(MbCpu *cpu, float *out, const float *inp, const MbWeight *w, size_t N) {
    const FbVariant *v = fb_best();
    if (!v) return 0;
    FbTask t = {v, cpu, out, inp, (const uint16_t *)w->data, N, w->rows, w->cols};
    mb_pool_run(cpu->pool, fb_task, &t);
    return 1;
}
/* -- end fast bf16 -- */

/* -- fast Q8 -- */
/* An 8-bit copy of a weight, made at load for the fast path: the lm_head of a model whose
 * projections are NF4 (bitsandbytes leaves it in bf16, 2 bytes a value, which would be half of
 * what a decoded token reads; llama.cpp keeps it in 6 bits). Per block of MB_Q8_BLOCK values of
 * a row: scale = max |w| / 127, q = round(w / scale). Activations meet it quantized the same way
 * (q8_quantize_rows); each block's integer dot product is scaled by both scales. An MbWeight of
 * dtype MB_DT_I8 whose data is an MbQ8; only fast_q8_matmul reads it. */
#define MB_Q8_BLOCK 64

typedef struct {
    const int8_t *q;     /* (rows, cols) */
    const float *scale;  /* (rows, cols / MB_Q8_BLOCK) */
} MbQ8;

/* n values (a multiple of MB_Q8_BLOCK) -> q[n] and scale[n / MB_Q8_BLOCK] */
static void q8_quantize(const float *x, size_t n, int8_t *q, float *scale) {
    for (size_t b = 0; b < n / MB_Q8_BLOCK; b++) {
        const float *xb = x + b * MB_Q8_BLOCK;
        float amax = 0.0f, nonfinite = 0.0f;
        for (size_t i = 0; i < MB_Q8_BLOCK; i++) { /* vectorizes */
            amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
            nonfinite += xb[i] * 0.0f; /* NaN when a value is NaN or inf */
        }
        if (nonfinite != 0.0f) { /* NaN scale, zero codes: the dot products come out NaN, as exact ones would */
            scale[b] = NAN;
            memset(q + b * MB_Q8_BLOCK, 0, MB_Q8_BLOCK);
            continue;
        }
        float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        scale[b] = s;
        for (size_t i = 0; i < MB_Q8_BLOCK; i++) { /* to nearest, halves away from 0; |v| <= 127 */
            float v = xb[i] * inv;
            q[b * MB_Q8_BLOCK + i] = (int8_t)(int)(v + (v < 0.0f ? -0.5f : 0.5f));
        }
    }
}

/* sum over nb blocks of (int dot of w and x in the block) * ws[b] * xs[b]: the reference */
MB_UNUSED static float q8_dot_scalar(const int8_t *w, const float *ws, const int8_t *x, const float *xs, size_t nb) {
    float acc = 0.0f;
    for (size_t b = 0; b < nb; b++) {
        int32_t s = 0;
        for (size_t i = 0; i < MB_Q8_BLOCK; i++) s += (int32_t)w[b * MB_Q8_BLOCK + i] * x[b * MB_Q8_BLOCK + i];
        acc += (float)s * (ws[b] * xs[b]);
    }
    return acc;
}

#if defined(__AVX2__) && defined(__FMA__)
/* |w| times x with w's sign (maddubs takes unsigned x signed); each 32-byte half to int32 on its
 * own (two maddubs results added in int16 could overflow) */
MB_UNUSED static float q8_dot_avx2(const int8_t *w, const float *ws, const int8_t *x, const float *xs, size_t nb) {
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (size_t b = 0; b < nb; b++) {
        __m256i s = _mm256_setzero_si256();
        _mm_prefetch((const char *)(w + b * MB_Q8_BLOCK) + 4096, _MM_HINT_T0);
        for (size_t h = 0; h < MB_Q8_BLOCK; h += 32) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(const void *)(w + b * MB_Q8_BLOCK + h));
            __m256i xv = _mm256_loadu_si256((const __m256i *)(const void *)(x + b * MB_Q8_BLOCK + h));
            __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(ws[b] * xs[b]), acc);
    }
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* vpdpbusd takes unsigned x signed: x + 128 against w, less 128 * w summed the same way */
static float q8_dot_avx512(const int8_t *w, const float *ws, const int8_t *x, const float *xs, size_t nb) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i bias = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    for (size_t b = 0; b < nb; b++) {
        _mm_prefetch((const char *)(w + b * MB_Q8_BLOCK) + 4096, _MM_HINT_T0); /* a thread streams at half
                                                                                the bandwidth without */
        __m512i wv = _mm512_loadu_si512((const void *)(w + b * MB_Q8_BLOCK));
        __m512i xu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(x + b * MB_Q8_BLOCK)), bias);
        __m512i s = _mm512_sub_epi32(_mm512_dpbusd_epi32(zero, xu, wv), _mm512_dpbusd_epi32(zero, bias, wv));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(ws[b] * xs[b]), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
#define q8_dot q8_dot_avx512
#elif defined(__AVX2__) && defined(__FMA__)
#define q8_dot q8_dot_avx2
#else
#define q8_dot q8_dot_scalar
#endif

typedef struct {
    float *out;
    const MbQ8 *w;
    const int8_t *xq;
    const float *xs;
    size_t N, O, I;
    size_t unit, next; /* rows per chunk; the next chunk (atomic) */
} Q8Task;

/* Threads take chunks of rows in turn (a thread that wakes late or shares its core takes fewer);
 * each output is computed the same way whoever takes it. */
static void q8_matmul_task(void *ctx, int tid, int nt) {
    Q8Task *t = ctx;
    size_t nb = t->I / MB_Q8_BLOCK;
    (void)tid, (void)nt;
    for (;;) {
        size_t o0 = __atomic_fetch_add(&t->next, 1, __ATOMIC_RELAXED) * t->unit;
        if (o0 >= t->O) break;
        for (size_t o = o0; o < MB_MIN(o0 + t->unit, t->O); o++)
            for (size_t n = 0; n < t->N; n++)
                t->out[n * t->O + o] = q8_dot(t->w->q + o * t->I, t->w->scale + o * nb, t->xq + n * t->I, t->xs + n * nb, nb);
    }
}

/* out (N, O) = inp (N, I) @ W^T for an MB_DT_I8 weight (always served: it has no exact path) */
static int fast_q8_matmul(MbCpu *cpu, float *out, const float *inp, const MbWeight *w, size_t N) {
    size_t I = w->cols, nb = I / MB_Q8_BLOCK;
    float *buf = cpu_scratch(cpu, 0, N * I / sizeof(float) + N * nb + 16);
    if (!buf) return 1; /* out of memory: recorded in ops */
    float *xs = buf;
    int8_t *xq = (int8_t *)(void *)(buf + N * nb);
    for (size_t n = 0; n < N; n++) q8_quantize(inp + n * I, I, xq + n * I, xs + n * nb);
    Q8Task t = {out, w->data, xq, xs, N, w->rows, I, MB_MAX((size_t)16, (size_t)65536 / I), 0}; /* ~64 KB a chunk */
    mb_pool_run(cpu->pool, q8_matmul_task, &t);
    return 1;
}

typedef struct {
    const MbWeight *src;
    int8_t *q;
    float *scale;
    int failed;
} Q8MakeTask;

static void q8_make_task(void *ctx, int tid, int nt) {
    Q8MakeTask *t = ctx;
    size_t r0, r1, C = t->src->cols;
    mb_split(t->src->rows, tid, nt, &r0, &r1);
    float *row = malloc(C * sizeof *row);
    if (!row) {
        t->failed = 1; /* a race of equal writes */
        return;
    }
    for (size_t r = r0; r < r1; r++) {
        weight_row_f32(t->src, r, 0, C, row);
        q8_quantize(row, C, t->q + r * C, t->scale + r * (C / MB_Q8_BLOCK));
    }
    free(row);
}

/* The 8-bit copy of src (cols a multiple of MB_Q8_BLOCK) into *dst, made on pool's threads */
static MbStatus weight_to_q8(const MbWeight *src, MbPool *pool, MbWeight *dst) {
    size_t n = src->rows * src->cols, nb = n / MB_Q8_BLOCK;
    unsigned char *block = mb_aligned_alloc(sizeof(MbQ8) + nb * sizeof(float) + n);
    if (!block) return MB_ERR_OOM;
    MbQ8 *q = (MbQ8 *)(void *)block;
    Q8MakeTask t = {src, (int8_t *)(block + sizeof(MbQ8) + nb * sizeof(float)), (float *)(void *)(block + sizeof(MbQ8)), 0};
    q->q = t.q, q->scale = t.scale;
    mb_pool_run(pool, q8_make_task, &t);
    if (t.failed) return free(block), mb_fail(MB_ERR_OOM, "out of memory: the 8-bit lm_head of the fast path");
    *dst = (MbWeight){MB_DT_I8, src->rows, src->cols, q, q};
    return MB_OK;
}
/* -- end fast Q8 -- */

static void cpu_matmul_forward(MbOps *ops, float *out, const float *inp, const MbWeight *w, size_t N) {
    MbCpu *cpu = ops->ctx;
    if (w->dtype == MB_DT_I8 ? fast_q8_matmul(cpu, out, inp, w, N)
                             : ops->fast && (weight_nf4(w) ? fast_nf4_matmul(cpu, out, inp, w, N)
                                                           : w->dtype == MB_DT_BF16 && fast_bf16_matmul(cpu, out, inp, w, N)))
        return;
    MatmulTask t = {cpu, out, inp, w, N, 0, 0};
    mb_pool_run(cpu->pool, N < MM_MR ? matvec_task : matmul_task, &t);
}

/* dinp (N, I) (+)= dout (N, O) @ W: the forward kernel with the roles of W's rows and columns
 * swapped (matmul_task with backward set). */
static void cpu_matmul_backward(MbOps *ops, float *dinp, const float *dout, const MbWeight *w, size_t N,
                                int accumulate) {
    MbCpu *cpu = ops->ctx;
    MatmulTask t = {cpu, dinp, dout, w, N, 1, accumulate};
    mb_pool_run(cpu->pool, matmul_task, &t);
}

static void cpu_rmsnorm_forward(MbOps *ops, float *out, float *rstd, const float *inp, const MbWeight *w,
                                size_t N, float eps) {
    size_t C = w->cols;
    float *wf = cpu_op_alloc(ops, C * sizeof(float));
    if (!wf) return;
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

/* y = w * x * r with r = 1/sqrt(mean(x^2) + eps):
 * dx = r * (w dy) - r^3 / C * x * sum(w dy x) */
static void cpu_rmsnorm_backward(MbOps *ops, float *dinp, const float *dout, const float *inp, const MbWeight *w,
                                 const float *rstd, size_t N, int accumulate) {
    size_t C = w->cols;
    float *wf = cpu_op_alloc(ops, C * sizeof(float));
    if (!wf) return;
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

/* Rotates x (B, T, nh, D) by the rope angles of positions pos0 + t: x1' = x1 c - x2 s,
 * x2' = x2 c + x1 s (HF's rotate_half layout, j paired with j + D/2). sign -1 rotates back, which
 * is the backward (the rotation's transpose). */
static void rope_rotate(MbOps *ops, float *x, const float *inv_freq, int B, int T, int pos0, int nh, int D,
                        float sign) {
    int half = D / 2;
    float *cs = cpu_op_alloc(ops, (size_t)T * (size_t)D * sizeof(float)); /* (T, cos[half], sin[half]) */
    if (!cs) return;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < half; j++) {
            float f = (float)(pos0 + t) * inv_freq[j];
            cs[(size_t)t * D + j] = cosf(f);
            cs[(size_t)t * D + half + j] = sign * sinf(f);
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

static void cpu_rope_forward(MbOps *ops, float *x, const float *inv_freq, int B, int T, int pos0, int nh, int D) {
    rope_rotate(ops, x, inv_freq, B, T, pos0, nh, D, 1.0f);
}

static void cpu_rope_backward(MbOps *ops, float *dx, const float *inv_freq, int B, int T, int pos0, int nh,
                              int D) {
    rope_rotate(ops, dx, inv_freq, B, T, pos0, nh, D, -1.0f);
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
    if (!p) return;
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
    for (size_t bk = lo; p && bk < hi; bk++) {
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

static void cpu_swiglu_forward(MbOps *ops, float *out, const float *gate, const float *up, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
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

static void cpu_gather_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t C) {
    (void)ops;
    for (size_t i = 0; i < n; i++) memcpy(out + i * C, inp + (size_t)rows[i] * C, C * sizeof(float));
}

static void cpu_scatter_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t N, size_t C) {
    (void)ops;
    memset(out, 0, N * C * sizeof(float));
    for (size_t i = 0; i < n; i++) memcpy(out + (size_t)rows[i] * C, inp + i * C, C * sizeof(float));
}

/* 64 random bits from (seed, i): splitmix64 of their mix (same on every backend). */
static uint64_t mb_hash64(uint64_t seed, uint64_t i) {
    uint64_t x = seed ^ (i * 0xD1B54A32D192ED03ull);
    return mb_splitmix64(&x);
}

/* A uniform in [0, 1) from (seed, i) */
static float mb_hash_uniform(uint64_t seed, uint64_t i) { return (float)(mb_hash64(seed, i) >> 40) * 0x1.0p-24f; }

static void cpu_random_bytes(MbOps *ops, void *dst, size_t n, uint64_t seed) {
    (void)ops;
    for (size_t i = 0; i < n; i++) ((uint8_t *)dst)[i] = (uint8_t)(mb_hash64(seed, i) >> 56);
}

static void cpu_random_normal(MbOps *ops, void *dst, size_t n, uint64_t seed, float std) {
    (void)ops;
    for (size_t i = 0; i < n; i++) {
        float u1 = (float)((mb_hash64(seed, 2 * i) >> 40) + 1) * 0x1.0p-24f, u2 = mb_hash_uniform(seed, 2 * i + 1);
        uint16_t h = f32_to_bf16(std * (sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2)));
        memcpy((unsigned char *)dst + 2 * i, &h, 2);
    }
}

static void cpu_dropout_forward(MbOps *ops, float *out, const float *inp, size_t n, float p, uint64_t seed) {
    (void)ops;
    float s = 1.0f / (1.0f - p);
    for (size_t i = 0; i < n; i++) out[i] = mb_hash_uniform(seed, i) >= p ? inp[i] * s : 0.0f;
}

static void cpu_add_forward(MbOps *ops, float *out, const float *a, const float *b, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) out[i] = a[i] + b[i];
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
    float *du = cpu_op_alloc(ops, N * R * sizeof(float));
    if (!du) return;
    cpu_gemm_tn_acc(cpu, dB, dout, u, N, O, R, scale);         /* dB += scale dout^T u */
    cpu_matmul_backward(ops, du, dout, B, N, 0);                /* du = dout @ B */
    for (size_t i = 0; i < N * R; i++) du[i] *= scale;
    cpu_gemm_tn_acc(cpu, dA, du, x, N, R, I, 1.0f);             /* dA += du^T x */
    cpu_matmul_backward(ops, dx, du, A, N, 1);                  /* dx += du @ A */
    free(du);
}

/* rows of logits are made LP_ROWS at a time (never the whole (M, V) block); the softmax work of
 * a chunk is split over the threads by rows */
#define LP_ROWS 32

typedef struct {
    float *logits;          /* (rows, V) */
    size_t rows, V, m0;
    const int32_t *targets;
    float *logp, *lse;      /* forward: written; backward: lse read */
    float *lsum;
    const float *g;         /* backward: d loss / d logp */
} LogprobTask;

/* e^x for the log-softmax rows (libm's expf, a call per value, was half of a small model's DPO
 * step): x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes' expf
 * coefficients, within 2 ulp of expf), 2^n put in the exponent bits. x below -87.33 (about
 * 2^-126) is taken as -87.33: a value below every sum it enters. exp_lane is one value; exp_vf
 * the same steps on a vector when the compiler targets AVX-512 or AVX2 (the lanes give the same
 * values as exp_lane, up to the fused multiply-adds the compiler may form). */
static inline float exp_lane(float x) {
    x = !(x >= -87.33f) ? -87.33f : x > 88.0f ? 88.0f : x; /* (NaN too: the caller looks for it) */
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(__AVX512F__)
#define VF_N 16 /* floats per vector; doubles per vector: VF_N / 2 */
typedef __m512 MbVf;
typedef __m512d MbVd;
#define vf_load _mm512_loadu_ps
#define vf_store _mm512_storeu_ps
#define vf_set1 _mm512_set1_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vf_mul _mm512_mul_ps
#define vf_max _mm512_max_ps
#define vf_min _mm512_min_ps
#define vf_floor(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define vf_pow2i(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define vd_zero _mm512_setzero_pd
#define vd_add _mm512_add_pd
#define vd_store _mm512_storeu_pd
#define vd_lo(x) _mm512_cvtps_pd(_mm512_castps512_ps256(x))
#define vd_hi(x) _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
#elif defined(__AVX2__)
#define VF_N 8
typedef __m256 MbVf;
typedef __m256d MbVd;
#define vf_load _mm256_loadu_ps
#define vf_store _mm256_storeu_ps
#define vf_set1 _mm256_set1_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vf_mul _mm256_mul_ps
#define vf_max _mm256_max_ps
#define vf_min _mm256_min_ps
#define vf_floor _mm256_floor_ps
#define vf_pow2i(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define vd_zero _mm256_setzero_pd
#define vd_add _mm256_add_pd
#define vd_store _mm256_storeu_pd
#define vd_lo(x) _mm256_cvtps_pd(_mm256_castps256_ps128(x))
#define vd_hi(x) _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1))
#endif

#ifdef VF_N
static inline MbVf exp_vf(MbVf x) {
    x = vf_min(vf_max(x, vf_set1(-87.33f)), vf_set1(88.0f));
    MbVf n = vf_floor(vf_add(vf_mul(x, vf_set1(1.44269504f)), vf_set1(0.5f)));
    MbVf r = vf_add(vf_sub(x, vf_mul(n, vf_set1(0.693359375f))), vf_mul(n, vf_set1(2.12194440e-4f)));
    MbVf p = vf_set1(1.9875691500e-4f);
    p = vf_add(vf_mul(p, r), vf_set1(1.3981999507e-3f));
    p = vf_add(vf_mul(p, r), vf_set1(8.3334519073e-3f));
    p = vf_add(vf_mul(p, r), vf_set1(4.1665795894e-2f));
    p = vf_add(vf_mul(p, r), vf_set1(1.6666665459e-1f));
    p = vf_add(vf_mul(p, r), vf_set1(5.0000001201e-1f));
    p = vf_add(vf_add(vf_mul(vf_mul(p, r), r), r), vf_set1(1.0f));
    return vf_mul(p, vf_pow2i(n));
}
#endif

/* One row of logits: its max, the sum of exp(l - max) and the plain sum, over vectors where the
 * build has them, then the scalar loop for the rest. The exps are summed in fp32 over runs of 1024
 * values and the runs in fp64 (a row of 128256 values in fp32 lanes alone was 8e-6 off). */
static void logprob_row_stats(const float *l, size_t V, float *mx_out, double *se_out, double *sum_out) {
    size_t v = 0;
    float mx = -INFINITY;
    double sum = 0.0, se = 0.0;
#ifdef VF_N
    float fl[VF_N];
    double dl[VF_N / 2];
    size_t full = V - V % VF_N;
    MbVf vm = vf_set1(-INFINITY);
    MbVd s0 = vd_zero(), s1 = vd_zero();
    for (; v < full; v += VF_N) {
        MbVf x = vf_load(l + v);
        vm = vf_max(vm, x), s0 = vd_add(s0, vd_lo(x)), s1 = vd_add(s1, vd_hi(x));
    }
    vf_store(fl, vm);
    vd_store(dl, vd_add(s0, s1));
    for (int j = 0; j < VF_N; j++) mx = MB_MAX(mx, fl[j]);
    for (int j = 0; j < VF_N / 2; j++) sum += dl[j];
#endif
    for (size_t k = v; k < V; k++) mx = MB_MAX(mx, l[k]), sum += l[k];
#ifdef VF_N
    MbVf vmx = vf_set1(mx);
    s0 = s1 = vd_zero();
    for (v = 0; v < full;) {
        MbVf ve = vf_set1(0.0f);
        for (size_t end = MB_MIN(full, v + 1024); v < end; v += VF_N) ve = vf_add(ve, exp_vf(vf_sub(vf_load(l + v), vmx)));
        s0 = vd_add(s0, vd_lo(ve)), s1 = vd_add(s1, vd_hi(ve));
    }
    vd_store(dl, vd_add(s0, s1));
    for (int j = 0; j < VF_N / 2; j++) se += dl[j];
#endif
    for (size_t end = v; v < V; end = v) {
        float run = 0.0f;
        for (end = MB_MIN(V, v + 1024); v < end; v++) run += exp_lane(l[v] - mx);
        se += run;
    }
    if (!isfinite(sum)) se = NAN; /* a NaN or inf logit (the vector max and min pass NaN by): a NaN loss */
    *mx_out = mx, *se_out = se, *sum_out = sum;
}

/* l[v] = -g * exp(l[v] - lse) over a row: the log-softmax's gradient, less the target's one */
static void logprob_row_grad(float *l, size_t V, float g, float lse) {
    size_t v = 0;
#ifdef VF_N
    MbVf vg = vf_set1(-g), vl = vf_set1(lse);
    for (; v + VF_N <= V; v += VF_N) vf_store(l + v, vf_mul(vg, exp_vf(vf_sub(vf_load(l + v), vl))));
#endif
    for (; v < V; v++) l[v] = -g * exp_lane(l[v] - lse);
}

static void logprob_rows_forward(void *ctx, int tid, int nt) {
    LogprobTask *t = ctx;
    size_t lo, hi;
    mb_split(t->rows, tid, nt, &lo, &hi);
    for (size_t r = lo; r < hi; r++) {
        const float *l = t->logits + r * t->V;
        float mx;
        double se, sum;
        logprob_row_stats(l, t->V, &mx, &se, &sum);
        size_t m = t->m0 + r;
        t->lse[m] = (float)((double)mx + log(se));
        t->logp[m] = l[t->targets[m]] - t->lse[m];
        t->lsum[m] = (float)sum;
    }
}

static void logprob_rows_backward(void *ctx, int tid, int nt) {
    LogprobTask *t = ctx;
    size_t lo, hi;
    mb_split(t->rows, tid, nt, &lo, &hi);
    for (size_t r = lo; r < hi; r++) { /* d logp / d logits = onehot(target) - softmax */
        size_t m = t->m0 + r;
        float *l = t->logits + r * t->V;
        logprob_row_grad(l, t->V, t->g[m], t->lse[m]);
        l[t->targets[m]] += t->g[m];
    }
}

static void cpu_logprob_forward(MbOps *ops, float *logp, float *lse, float *lsum, const float *x, const MbWeight *w,
                                const int32_t *targets, size_t M) {
    MbCpu *cpu = ops->ctx;
    size_t V = w->rows, C = w->cols;
    float *logits = cpu_op_alloc(ops, LP_ROWS * V * sizeof(float));
    for (size_t m0 = 0; logits && m0 < M; m0 += LP_ROWS) {
        size_t rows = MB_MIN((size_t)LP_ROWS, M - m0);
        cpu_matmul_forward(ops, logits, x + m0 * C, w, rows);
        LogprobTask t = {logits, rows, V, m0, targets, logp, lse, lsum, NULL};
        mb_pool_run(cpu->pool, logprob_rows_forward, &t);
    }
    free(logits);
}

static void cpu_logprob_backward(MbOps *ops, float *dx, const float *g, const float *x, const MbWeight *w,
                                 const int32_t *targets, const float *lse, size_t M) {
    MbCpu *cpu = ops->ctx;
    size_t V = w->rows, C = w->cols;
    float *logits = cpu_op_alloc(ops, LP_ROWS * V * sizeof(float));
    for (size_t m0 = 0; logits && m0 < M; m0 += LP_ROWS) {
        size_t rows = MB_MIN((size_t)LP_ROWS, M - m0);
        cpu_matmul_forward(ops, logits, x + m0 * C, w, rows);
        LogprobTask t = {logits, rows, V, m0, targets, NULL, (float *)lse, NULL, g};
        mb_pool_run(cpu->pool, logprob_rows_backward, &t);
        cpu_matmul_backward(ops, dx + m0 * C, logits, w, rows, 0);
    }
    free(logits);
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

static void cpu_accumulate_f64(MbOps *ops, double *acc, const float *x, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) acc[i] += x[i];
}

static void cpu_from_f64(MbOps *ops, float *out, const double *in, size_t n) {
    (void)ops;
    for (size_t i = 0; i < n; i++) out[i] = (float)in[i];
}

static void cpu_fill_f64(MbOps *ops, double *x, size_t n) {
    (void)ops;
    memset(x, 0, n * sizeof *x);
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
    for (int i = 0; cpu->scratch && i < cpu->pool->n; i++) free(cpu->scratch[i]);
    free(cpu->scratch);
    free(cpu->scratch_n);
    mb_pool_free(cpu->pool);
    free(cpu);
    free(ops);
}

/* The CPU backend on `threads` threads (0: all cores), or NULL (out of memory, message set) */
static MbOps *mb_cpu_ops_new(int threads) {
    MbCpu *cpu = mb_calloc(1, sizeof *cpu);
    MbOps *ops = cpu ? mb_calloc(1, sizeof *ops) : NULL;
    if (!ops) return free(cpu), NULL;
    ops->ctx = cpu;
    ops->destroy = cpu_destroy;
    cpu->ops = ops;
    cpu->pool = mb_pool_new(threads > 0 ? threads : mb_cpu_count());
    if (!cpu->pool) return free(cpu), free(ops), NULL;
    cpu->scratch = mb_calloc((size_t)cpu->pool->n, sizeof *cpu->scratch);
    cpu->scratch_n = mb_calloc((size_t)cpu->pool->n, sizeof *cpu->scratch_n);
    if (!cpu->scratch || !cpu->scratch_n) return cpu_destroy(ops), NULL;
    ops->name = "cpu";
    ops->act_size = sizeof(float);
    ops->host_memory = 1;
    ops->alloc = cpu_alloc;
    ops->free = cpu_free;
    ops->to_host = cpu_copy;
    ops->from_host = cpu_copy;
    ops->zero = cpu_zero;
    ops->embedding_forward = cpu_embedding_forward;
    ops->matmul_forward = cpu_matmul_forward;
    ops->matmul_backward = cpu_matmul_backward;
    ops->logits_forward = cpu_matmul_forward; /* activations are fp32 already */
    ops->rmsnorm_forward = cpu_rmsnorm_forward;
    ops->rmsnorm_backward = cpu_rmsnorm_backward;
    ops->rope_forward = cpu_rope_forward;
    ops->rope_backward = cpu_rope_backward;
    ops->kv_store = cpu_kv_store;
    ops->attention_forward = cpu_attention_forward;
    ops->attention_backward = cpu_attention_backward;
    ops->swiglu_forward = cpu_swiglu_forward;
    ops->swiglu_backward = cpu_swiglu_backward;
    ops->gather_rows = cpu_gather_rows;
    ops->scatter_rows = cpu_scatter_rows;
    ops->add_forward = cpu_add_forward;
    ops->lora_forward = cpu_lora_forward;
    ops->lora_backward = cpu_lora_backward;
    ops->dropout_forward = cpu_dropout_forward;
    ops->logprob_forward = cpu_logprob_forward;
    ops->logprob_backward = cpu_logprob_backward;
    ops->sumsq = cpu_sumsq;
    ops->scale = cpu_scale;
    ops->fill = cpu_fill;
    ops->adamw = cpu_adamw;
    ops->accumulate_f64 = cpu_accumulate_f64;
    ops->from_f64 = cpu_from_f64;
    ops->fill_f64 = cpu_fill_f64;
    ops->random_bytes = cpu_random_bytes;
    ops->random_normal = cpu_random_normal;
    return ops;
}

/* The op table a model runs on: the CPU's, or CUDA's (section 12) */
static MbStatus mb_ops_new(const MbLoadOptions *opt, const MbConfig *c, MbOps **out);

// ============================================================================================
// ---------- 6. model ----------
// Llama-3.1 as transformers' LlamaForCausalLM computes it, written once against MbOps:
//   x = embed(tokens); per layer: x += o_proj(attn(rope(q_proj(n1 x)), rope(k_proj(n1 x)),
//   v_proj(n1 x))); x += down_proj(silu(gate_proj(n2 x)) * up_proj(n2 x)); logits = lm_head(norm x)
// The activations live in one block laid out by acts_layout; the memory plan of `info --plan`
// (mb_plan_compute) counts the same layout.
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
    MbOps *ops;         /* the backend whose memory holds params and grads */
};

/* Activations saved by one decoder layer for its backward. */
typedef struct {
    MbAct *x_in;        /* (N, C) the layer's input: a slot of the residual stream */
    MbAct *xn1;         /* (N, C) input_layernorm */
    float *rstd1;       /* (N) its 1/rms */
    MbAct *q;           /* (N, H*D) after rope */
    MbAct *k, *v;       /* (N, K*D), k after rope (training: the attention's keys and values) */
    MbAct *att;         /* (N, H*D) attention output */
    float *lse;         /* (B, H, T) its log-sum-exp */
    MbAct *x_mid;       /* (N, C) x_in + o_proj(att) */
    MbAct *xn2;         /* (N, C) post_attention_layernorm */
    float *rstd2;       /* (N) its 1/rms */
    MbAct *gate, *up;   /* (N, F) */
    MbAct *hid;         /* (N, F) silu(gate) * up */
    MbAct *u[MB_LAYER_WEIGHTS]; /* (N, R) lora_A(x) of each adapted projection */
} MbLayerActs;

/* Every activation buffer of a forward (and backward) over N rows: one block, a pointer table.
 * Inference keeps one layer's activations and two residual slots. Training keeps the residual
 * stream at every layer boundary (L + 1 slots) and either every layer's activations or, with
 * gradient checkpointing, one layer's, recomputed from its input slot during the backward. */
typedef struct {
    size_t N;            /* rows the buffers hold */
    int train, checkpointing, R, dropout;
    unsigned lora_targets;
    MbAct *block;        /* the activation buffers below */
    MbAct **stream;      /* (L + 1) training, (1) inference: slots of (N, C) */
    MbLayerActs *layer;  /* (L) training without checkpointing, else (1) */
    int n_layer_sets;
    MbAct *tmp;          /* (N, C) a projection's output before its residual add */
    MbAct *xf;           /* (N, C) the final norm */
    float *rstd_f;       /* (N) its 1/rms */
    float *logits;       /* (N, V) inference logits when backend memory is not host memory */
    MbAct *xg;           /* (N, C) rows of xf that predict a loss token */
    float *logp, *lse_rows, *g_rows; /* (N) per loss row */
    MbAct *dx, *dx_mid, *dxn, *datt, *dq, *dk, *dv, *dgate, *dup, *dhid, *dxg; /* gradients */
    MbAct *drop, *ddrop; /* (N, max(C, F)) LoRA dropout's masked input and its gradient */
    float *block32;      /* the fp32 buffers: norm statistics, lse, per-row values, logits */
    float *lsum_rows;    /* (N) sum of each loss row's logits */
} MbActs;

struct MbModel {
    MbConfig cfg;
    MbSafetensors *st;
    MbWeight embed_tokens;  /* (V, C) */
    MbLayer *layers;        /* (L) */
    MbWeight norm;          /* (1, C) */
    MbWeight lm_head;       /* (V, C); a view of embed_tokens when tied */
    MbWeight lm_head_q8;    /* fast path with NF4 projections: lm_head in 8 bits (MbQ8), else empty */
    float *inv_freq;        /* (D/2) rope frequencies, llama3-scaled */
    MbOps *ops;
    void *rand_block;       /* --random_init: every weight's storage, in backend memory */
    MbActs acts;
    MbLora *lora;           /* attached adapters, or NULL (not owned) */
    int gradient_checkpointing;
    int fast;               /* MbLoadOptions.fast: mb_model_forward through the fast path */
    uint64_t dropout_seed;  /* != 0: LoRA dropout is on (a training forward); keys the masks */
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
    MbAct *block;           /* (2, L, B, S, K*D) */
    MbAct **k, **v;         /* (L) pointers into block, each (B, S, K*D) */
};

const MbConfig *mb_model_config(const MbModel *m) { return &m->cfg; }

/* The training switches (the trainer sets them): gradient checkpointing of the layers'
 * activations, and LoRA dropout in the next forward (seed != 0 keys its masks; 0: off). */
static void model_set_checkpointing(MbModel *m, int on) { m->gradient_checkpointing = on; }
static void model_set_dropout(MbModel *m, uint64_t seed) { m->dropout_seed = seed; }

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
    if (m->acts.block32) m->ops->free(m->ops, m->acts.block32);
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

/* The buffers of an activation block for a's settings (N, train, checkpointing, R, lora_targets,
 * dropout): activation-dtype ones into *spec, fp32 ones into *spec32, each pointing at the field
 * of a it fills. Allocates a->stream and a->layer (the caller frees them, also on a failure).
 * host_logits: the backend's memory is the host's (inference logits go straight to the caller). */
static MbStatus acts_layout(MbActs *a, const MbConfig *c, int host_logits, MbBufSpec **spec, MbBufSpec **spec32) {
    size_t N = a->N, C = mb_dim(c, MB_DIM_C), QD = mb_dim(c, MB_DIM_QD), KVD = mb_dim(c, MB_DIM_KVD),
           F = mb_dim(c, MB_DIM_F), V = (size_t)c->vocab_size, L = (size_t)c->num_hidden_layers,
           H = (size_t)c->num_attention_heads;
    int train = a->train, R = a->R;
    unsigned targets = a->lora_targets;
    size_t n_stream = train ? L + 1 : 1;
    a->n_layer_sets = train && !a->checkpointing ? (int)L : 1;
    a->stream = mb_calloc(n_stream, sizeof *a->stream);
    a->layer = mb_calloc((size_t)a->n_layer_sets, sizeof *a->layer);
    if (!a->stream || !a->layer) return MB_ERR_OOM;
#define BUF(p, n) buf_spec(spec, &(p), (n))
#define F32(p, n) buf_spec(spec32, &(p), (n))
    for (size_t i = 0; i < n_stream; i++) BUF(a->stream[i], N * C);
    for (int i = 0; i < a->n_layer_sets; i++) {
        MbLayerActs *la = &a->layer[i];
        BUF(la->xn1, N * C), F32(la->rstd1, N), BUF(la->q, N * QD), BUF(la->k, N * KVD);
        BUF(la->v, N * KVD), BUF(la->att, N * QD), F32(la->lse, N * H), BUF(la->x_mid, N * C);
        BUF(la->xn2, N * C), F32(la->rstd2, N), BUF(la->gate, N * F), BUF(la->up, N * F);
        BUF(la->hid, N * F);
        for (int w = 0; w < MB_LAYER_WEIGHTS; w++)
            if (targets & (1u << w)) BUF(la->u[w], N * (size_t)R);
    }
    BUF(a->tmp, N * C), BUF(a->xf, N * C), F32(a->rstd_f, N);
    if (!host_logits && !train) F32(a->logits, N * V);
    if (train) {
        BUF(a->xg, N * C), BUF(a->dxg, N * C), F32(a->logp, N), F32(a->lse_rows, N), F32(a->g_rows, N);
        F32(a->lsum_rows, N), BUF(a->dx, N * C), BUF(a->dx_mid, N * C), BUF(a->dxn, N * C);
        BUF(a->datt, N * QD), BUF(a->dq, N * QD), BUF(a->dk, N * KVD), BUF(a->dv, N * KVD);
        BUF(a->dgate, N * F), BUF(a->dup, N * F), BUF(a->dhid, N * F);
    }
    if (a->dropout) BUF(a->drop, N * MB_MAX(C, F)), BUF(a->ddrop, N * MB_MAX(C, F));
#undef BUF
#undef F32
    return MB_OK;
}

static size_t buf_spec_total(const MbBufSpec *spec) {
    size_t total = 0;
    for (ptrdiff_t i = 0; i < arrlen(spec); i++) total += spec[i].count;
    return total;
}

/* Values in the activation block and in the fp32 block of a training step over N rows (what
 * acts_ensure allocates; the memory plan counts with it). Out of memory: 0 and 0. */
static MbStatus acts_count(const MbConfig *c, size_t N, int ckpt, int R, unsigned targets, int dropout, size_t *acts,
                           size_t *f32) {
    MbActs a;
    memset(&a, 0, sizeof a);
    a.N = N, a.train = 1, a.checkpointing = ckpt, a.R = R, a.lora_targets = targets, a.dropout = dropout;
    MbBufSpec *spec = NULL, *spec32 = NULL;
    MbStatus rc = acts_layout(&a, c, 0, &spec, &spec32);
    *acts = rc ? 0 : buf_spec_total(spec), *f32 = rc ? 0 : buf_spec_total(spec32);
    arrfree(spec), arrfree(spec32);
    free(a.stream), free(a.layer);
    return rc;
}

/* Makes the activation block hold N rows for inference (train 0) or training (train 1). */
static MbStatus acts_ensure(MbModel *m, size_t N, int train) {
    MbActs *a = &m->acts;
    const MbLora *lo = m->lora;
    int R = lo ? lo->r : 0, ckpt = train && m->gradient_checkpointing;
    unsigned targets = lo ? lo->targets : 0;
    int dropout = train && lo && lo->dropout > 0;
    if (a->block && a->N >= N && a->train == train && a->checkpointing == ckpt && a->R == R &&
        a->lora_targets == targets && a->dropout == dropout)
        return MB_OK;
    acts_free(m);
    a->N = N, a->train = train, a->checkpointing = ckpt, a->R = R, a->lora_targets = targets, a->dropout = dropout;
    MbBufSpec *spec = NULL, *spec32 = NULL; /* stb_ds arrays: activations, fp32 values */
    MbStatus rc = acts_layout(a, &m->cfg, m->ops->host_memory, &spec, &spec32);
    size_t n = buf_spec_total(spec), n32 = buf_spec_total(spec32), bytes = 0, bytes32 = 0;
    if (!rc && (mb_mul_overflows(n, m->ops->act_size, &bytes) || mb_mul_overflows(n32, sizeof(float), &bytes32)))
        rc = mb_fail(MB_ERR_OOM, "out of memory: the activations of %zu tokens do not fit the address space", N);
    if (!rc && !(a->block = m->ops->alloc(m->ops, bytes))) rc = mb_ops_oom(m->ops);
    if (!rc && !(a->block32 = m->ops->alloc(m->ops, bytes32))) rc = mb_ops_oom(m->ops);
    if (rc) {
        arrfree(spec), arrfree(spec32);
        acts_free(m);
        return rc;
    }
    size_t off = 0;
    for (ptrdiff_t i = 0; i < arrlen(spec); i++) {
        *spec[i].ptr = mb_act_at(m->ops, a->block, off);
        off += spec[i].count;
    }
    off = 0;
    for (ptrdiff_t i = 0; i < arrlen(spec32); i++) {
        *spec32[i].ptr = a->block32 + off;
        off += spec32[i].count;
    }
    arrfree(spec);
    arrfree(spec32);
    return MB_OK;
}

/* ---- the memory plan (info --plan): one DPO training step, per device, from config.json alone ----
 * It models the CUDA backend the card's run needs (ARCHITECTURE.md): bf16 activations, fp32
 * LoRA weights, gradients and Adam moments, the frozen base in NF4 or bf16. A batch of B pairs is
 * N = 2 B T tokens (chosen and rejected, T = max_length each). Each row's derivation is in
 * mb_plan_compute; the printed note says what is assumed and what is not counted. */

/* The CUDA backend's scratch of a training step (section 12), which the plan counts. */
static void cuda_step_scratch(const MbConfig *c, size_t N, size_t M, size_t R, unsigned targets, int nf4, size_t *logits,
                              size_t *work, size_t *chunk_rows, size_t *chunk_vocab);

static const char *const plan_kinds[MB_PLAN_ROWS] = {
    "quantized weights", "absmax", "bf16 weights", "LoRA params", "LoRA grads", "grad sums (fp64)", "Adam moments",
    "activations", "logits", "workspace",
};

static size_t plan_ceil(size_t a, size_t b) { return (a + b - 1) / b; }

MbStatus mb_plan_compute(const MbConfig *c, const MbPlanOptions *o, MbPlan *p) {
    memset(p, 0, sizeof *p);
    for (int k = 0; k < MB_PLAN_ROWS; k++) p->kind[k] = plan_kinds[k];
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size, L = (size_t)c->num_hidden_layers,
           R = (size_t)o->lora_r, T = (size_t)o->max_length, N = 2 * (size_t)o->batch * T, G = (size_t)o->gpus;
    unsigned tg = o->targets;
#define TARGETED(id) ((tg >> (id)) & 1u)

    /* Weights. The 7 projections of a layer hold `lin` values; with
     * load_in_4bit each is NF4: n/2 bytes of codes, and absmax per block of 64 as a 1-byte code,
     * plus an fp32 scale per 256 blocks and the fp32 offset (double quant). Embeddings, norms
     * and lm_head (and the projections without load_in_4bit) are bf16: 2 bytes a value. */
    size_t lin = 0, packed = 0, absmax = 0;
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
        if (mb_layer_weights[i].rows == MB_DIM_1) continue;
        size_t rows = mb_dim(c, mb_layer_weights[i].rows), cols = mb_dim(c, mb_layer_weights[i].cols);
        size_t n = rows * cols, nb = plan_ceil(n, MB_NF4_BLOCKSIZE);
        lin += L * n;
        packed += L * (n / 2);
        absmax += L * (nb + 4 * plan_ceil(nb, MB_NF4_NESTED_BLOCKSIZE) + 4);
        /* LoRA on this projection: A (R, cols) + B (rows, R) per layer */
        if (TARGETED(i)) p->trainable += L * R * (rows + cols);
    }
    size_t dense = V * C * (c->tie_word_embeddings ? 1 : 2) + (2 * L + 1) * C + (o->load_in_4bit ? 0 : lin);
    if (o->load_in_4bit) {
        p->bytes[MB_PLAN_QUANT] = packed;
        snprintf(p->how[MB_PLAN_QUANT], sizeof p->how[0], "%zu values x 0.5 B (NF4 codes, 7 projections x %zu layers)",
                 lin, L);
        p->bytes[MB_PLAN_ABSMAX] = absmax;
        snprintf(p->how[MB_PLAN_ABSMAX], sizeof p->how[0], "1 B per 64 values + 4 B per 256 blocks (double quant)");
    } else {
        snprintf(p->how[MB_PLAN_QUANT], sizeof p->how[0], "none (no --load_in_4bit)");
        snprintf(p->how[MB_PLAN_ABSMAX], sizeof p->how[0], "none");
    }
    p->bytes[MB_PLAN_BF16] = 2 * dense;
    snprintf(p->how[MB_PLAN_BF16], sizeof p->how[0], "%zu values x 2 B (embeddings, norms, lm_head%s)", dense,
             o->load_in_4bit ? "" : ", projections");

    /* Trainable state, fp32: params 4 B, grads 4 B, Adam m and v 8 B per trainable value. ZeRO-1
     * splits the Adam moments over the G data-parallel ranks, ZeRO-2 the gradients too. */
    size_t shard = plan_ceil(p->trainable, G);
    p->bytes[MB_PLAN_LORA] = 4 * p->trainable;
    snprintf(p->how[MB_PLAN_LORA], sizeof p->how[0], "%zu x 4 B (fp32)", p->trainable);
    p->bytes[MB_PLAN_GRADS] = 4 * (o->zero_stage >= 2 ? shard : p->trainable);
    snprintf(p->how[MB_PLAN_GRADS], sizeof p->how[0], "%zu x 4 B (fp32%s)", o->zero_stage >= 2 ? shard : p->trainable,
             o->zero_stage >= 2 ? ", ZeRO-2 shard" : "");
    p->bytes[MB_PLAN_ADAM] = 8 * (o->zero_stage >= 1 ? shard : p->trainable);
    snprintf(p->how[MB_PLAN_ADAM], sizeof p->how[0], "%zu x 2 x 4 B (fp32 m, v%s)",
             o->zero_stage >= 1 ? shard : p->trainable, o->zero_stage >= 1 ? ", ZeRO-1: 1/G of them" : "");

    /* The step's gradient sums in fp64 (any world size and accumulation order give the same fp32
     * result): 8 B per trainable value; with ZeRO-1 also this rank's slice, summed (fp64) and as
     * fp32 for its AdamW update. */
    p->bytes[MB_PLAN_GRADSUM] = 8 * G * shard + (o->zero_stage >= 1 && G > 1 ? 12 * shard : 0);
    snprintf(p->how[MB_PLAN_GRADSUM], sizeof p->how[0], "%zu x 8 B%s", G * shard,
             o->zero_stage >= 1 && G > 1 ? " + the rank's slice (8 B + 4 B)" : "");

    /* Activations: the model's activation block as acts_ensure lays it out for N rows (bf16 on
     * the GPU) and its fp32 block (norm statistics, log-sum-exps, per-row values). Gradient
     * checkpointing keeps the residual stream at the L + 1 layer boundaries and one layer's
     * saved set, recomputed during its backward; without it every layer keeps its set. */
    size_t acts = 0, f32 = 0;
    MbStatus rc = acts_count(c, N, o->gradient_checkpointing, o->lora_r, tg, 0, &acts, &f32);
    if (rc) return rc;
    p->bytes[MB_PLAN_ACTS] = 2 * acts + 4 * f32;
    snprintf(p->how[MB_PLAN_ACTS], sizeof p->how[0], "%zu tokens: %zu values x 2 B (bf16) + %zu x 4 B (fp32)%s", N, acts,
             f32, o->gradient_checkpointing ? "; checkpointing: L+1 layer inputs + one layer" : "");

    /* Logits and workspace: the CUDA backend's scratch buffers (section 12), for N rows of which
     * at most N predict a completion token: the fused lm_head + log-softmax takes a chunk of
     * rows x vocabulary at a time, never the batch's (N, V) fp32 logits. */
    size_t chunk_rows, chunk_vocab;
    cuda_step_scratch(c, N, N, R, tg, o->load_in_4bit, &p->bytes[MB_PLAN_LOGITS], &p->bytes[MB_PLAN_WORKSPACE],
                      &chunk_rows, &chunk_vocab);
    p->full_logits = N * V * 4;
    snprintf(p->how[MB_PLAN_LOGITS], sizeof p->how[0], "fused chunks of %zu rows x %zu: fp32 logits, bf16 grad, fp32 dx",
             chunk_rows, chunk_vocab);
    snprintf(p->how[MB_PLAN_WORKSPACE], sizeof p->how[0], "cuBLASLt 32 MiB%s, attention's fp32 dq, LoRA in bf16",
             o->load_in_4bit ? ", NF4 dequant tile <= 64 MiB" : "");
#undef TARGETED
    return MB_OK;
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
    weight_free(&m->lm_head_q8);
    free(m->inv_freq);
    mb_safetensors_close(m->st);
    if (m->rand_block) m->ops->free(m->ops, m->rand_block);
    if (m->ops) m->ops->destroy(m->ops);
    free(m);
}

/* A dense weight of the checkpoint, checked for NaN/inf (on the pool's threads). */
static MbStatus model_weight(MbModel *m, const char *dir, const char *name, size_t rows, size_t cols, MbPool *pool,
                             MbWeight *w) {
    const MbTensorInfo *t = mb_safetensors_find(m->st, name);
    if (!t)
        return mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' is missing from the checkpoint --> does "
                       "config.json match the weights?", dir, name);
    MbStatus rc = weight_from_tensor(t, rows, cols, w);
    return rc ? rc : tensor_check_finite(t, t->file, pool);
}

/* A linear projection: NF4 as bitsandbytes saved it, or dense and, with load_in_4bit, quantized
 * to NF4 now (the 7 projections of each layer only, as transformers' BitsAndBytesConfig does). */
static MbStatus model_linear(MbModel *m, const char *dir, const char *name, size_t rows, size_t cols, MbPool *pool,
                             int quantize, MbDtype compute, MbWeight *w) {
    const MbTensorInfo *t = mb_safetensors_find(m->st, name);
    if (t && bnb_is_4bit(m->st, name)) return weight_from_bnb(m->st, t, rows, cols, compute, w);
    MbStatus rc = model_weight(m, dir, name, rows, cols, pool, w);
    if (!rc && quantize) {
        char what[600];
        snprintf(what, sizeof what, "%s: tensor '%s'", t->file, name);
        rc = weight_quantize_nf4(w, what, compute, pool);
    }
    return rc;
}

/* bnb_4bit_compute_dtype names (torch's, and the short ones) -> F32 / BF16 / F16 */
static int compute_dtype_parse(const char *s, MbDtype *out) {
    if (!strcmp(s, "float32") || !strcmp(s, "fp32")) *out = MB_DT_F32;
    else if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16")) *out = MB_DT_BF16;
    else if (!strcmp(s, "float16") || !strcmp(s, "fp16")) *out = MB_DT_F16;
    else return 0;
    return 1;
}

/* F32 / BF16 / F16 -> torch's name of the compute dtype */
MB_UNUSED static const char *compute_dtype_name(MbDtype d) {
    return d == MB_DT_BF16 ? "bfloat16" : d == MB_DT_F16 ? "float16" : "float32";
}

/* config.json's quantization_config (transformers' BitsAndBytesConfig, saved with a quantized
 * checkpoint): medbot reads bitsandbytes 4-bit NF4; compute gets bnb_4bit_compute_dtype ("" when
 * the config has none). */
static MbStatus bnb_config_load(const char *path, char *compute, size_t n) {
    compute[0] = 0;
    MbJsonDoc doc;
    MbStatus rc = json_read_file(path, &doc);
    if (rc) return rc;
    const MbJson *qc = json_get(&doc, json_root(&doc), "quantization_config"), *v;
    if (qc && qc->kind == MB_JSON_OBJECT) {
        v = json_get(&doc, qc, "quant_method");
        const char *method = v && v->kind == MB_JSON_STRING ? json_str(&doc, v) : "bitsandbytes";
        const MbJson *in8 = json_get(&doc, qc, "load_in_8bit"), *qt = json_get(&doc, qc, "bnb_4bit_quant_type");
        if (strcmp(method, "bitsandbytes"))
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: quantization_config quant_method \"%s\" is not supported "
                         "--> medbot reads bf16/f16/f32 checkpoints and bitsandbytes 4-bit NF4 ones", path, method);
        else if (in8 && in8->kind == MB_JSON_BOOL && in8->boolean)
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: quantization_config: load_in_8bit is not supported "
                         "(medbot reads 4-bit NF4)", path);
        else if (qt && qt->kind == MB_JSON_STRING && strcmp(json_str(&doc, qt), "nf4"))
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: quantization_config: bnb_4bit_quant_type \"%s\" is not "
                         "supported (medbot reads nf4)", path, json_str(&doc, qt));
        v = json_get(&doc, qc, "bnb_4bit_compute_dtype");
        if (!rc && v && v->kind == MB_JSON_STRING) snprintf(compute, n, "%s", json_str(&doc, v));
    }
    json_free(&doc);
    return rc;
}

/* Consecutive 256-byte aligned pieces of one block; with base NULL it only counts. */
typedef struct {
    unsigned char *base;
    size_t off;
} MbCarve;

static void *carve(MbCarve *c, size_t bytes) {
    void *p = c->base ? c->base + c->off : NULL;
    c->off += (bytes + 255) / 256 * 256;
    return p;
}

/* One weight of --random_init, carved from the block (pass 0 only counts its bytes): a norm (one
 * row) fp32 ones; with nf4 random NF4 codes and double-quant state whose absmax is 2.5 x std in
 * every block (about the absmax of 64 draws of normal(0, std)); else bf16 normal(0, std). */
static MbStatus random_weight(MbOps *ops, MbCarve *cv, MbWeight *w, size_t rows, size_t cols, int nf4,
                              MbDtype compute, uint64_t *key) {
    const float std = 0.02f;
    size_t n = rows * cols;
    if (rows == 1) {
        float *p = carve(cv, n * 4);
        if (p) *w = (MbWeight){MB_DT_F32, rows, cols, p, NULL}, ops->fill(ops, p, 1.0f, n);
    } else if (nf4 && n % 2 == 0) {
        size_t nb = (n + MB_NF4_BLOCKSIZE - 1) / MB_NF4_BLOCKSIZE, ns = (nb + MB_NF4_NESTED_BLOCKSIZE - 1) / MB_NF4_NESTED_BLOCKSIZE;
        uint8_t *packed = carve(cv, n / 2), *codes = carve(cv, nb);
        float *scales = carve(cv, ns * 4);
        if (!packed) return MB_OK;
        MbNf4 *q = mb_calloc(1, sizeof *q);
        if (!q) return MB_ERR_OOM;
        q->packed = packed, q->blocksize = MB_NF4_BLOCKSIZE, q->nblocks = nb, q->absmax_q = codes;
        q->nested_absmax = (const unsigned char *)scales, q->nested_blocksize = MB_NF4_NESTED_BLOCKSIZE;
        q->offset = 2.5f * std, q->compute = compute;
        nf4_dynamic_map(q->nested_quant_map);
        *w = (MbWeight){MB_DT_U8, rows, cols, q, q};
        ops->random_bytes(ops, packed, n / 2, (*key)++);
        ops->random_bytes(ops, codes, nb, (*key)++);
        ops->fill(ops, scales, 0.0f, ns); /* absmax = map8[code] * 0 + offset */
    } else {
        void *p = carve(cv, n * 2);
        if (p) *w = (MbWeight){MB_DT_BF16, rows, cols, p, NULL}, ops->random_normal(ops, p, n, (*key)++, std);
    }
    return MB_OK;
}

/* --random_init: every weight drawn on the backend from seed, in one block of backend memory
 * (embeddings, lm_head and projections as transformers initialises a Llama; projections NF4 with
 * load_in_4bit). The same seed gives the same weights on every backend. */
static MbStatus model_random_init(MbModel *m, int nf4, MbDtype compute, uint64_t seed, const MbProgress *progress) {
    const MbConfig *c = &m->cfg;
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size, L = (size_t)c->num_hidden_layers;
    if (!(m->layers = mb_calloc(L, sizeof *m->layers))) return MB_ERR_OOM;
    MbStatus rc = MB_OK;
    MbTask task; /* progress: the second pass's tensors */
    memset(&task, 0, sizeof task);
    for (int pass = 0; pass < 2 && !rc; pass++) {
        MbCarve cv = {pass ? m->rand_block : NULL, 0};
        uint64_t key = seed * 1000003u;
        if (pass)
            task_begin(&task, progress, nf4 ? "random weights (NF4 projections)" : "random weights", "tensors", 0,
                       (double)(L * MB_LAYER_WEIGHTS + 3 - (size_t)!!c->tie_word_embeddings));
        rc = random_weight(m->ops, &cv, &m->embed_tokens, V, C, 0, compute, &key);
        if (!rc && !c->tie_word_embeddings) rc = random_weight(m->ops, &cv, &m->lm_head, V, C, 0, compute, &key);
        if (!rc) rc = random_weight(m->ops, &cv, &m->norm, 1, C, 0, compute, &key);
        if (pass) task_add(&task, c->tie_word_embeddings ? 2 : 3);
        for (size_t l = 0; l < L; l++)
            for (int i = 0; !rc && i < MB_LAYER_WEIGHTS; i++) {
                rc = random_weight(m->ops, &cv, &m->layers[l].w[i], mb_dim(c, mb_layer_weights[i].rows),
                                   mb_dim(c, mb_layer_weights[i].cols), nf4, compute, &key);
                if (pass) task_add(&task, 1);
            }
        if (!rc && !pass && !(m->rand_block = m->ops->alloc(m->ops, cv.off))) rc = mb_ops_oom(m->ops);
    }
    if (c->tie_word_embeddings) m->lm_head = m->embed_tokens;
    if (!rc) rc = mb_ops_status(m->ops);
    if (task.t0 > 0) task_end(&task, !rc);
    return rc;
}

/* The bytes of a checkpoint's tensor NAME with the ones bitsandbytes saves beside a 4-bit weight
 * (NAME.absmax, ...): what loading it read. */
static size_t tensor_bytes_of(const MbSafetensors *st, const char *name) {
    size_t n = 0, len = strlen(name);
    for (size_t i = 0; i < mb_safetensors_count(st); i++) {
        const MbTensorInfo *t = mb_safetensors_at(st, i);
        if (!strncmp(t->name, name, len) && (!t->name[len] || t->name[len] == '.')) n += t->nbytes;
    }
    return n;
}

/* What the fast path makes at load (m->fast, on the CPU): with NF4 projections, the 8-bit lm_head
 * (on pool's threads, or a pool of its own when NULL). */
static MbStatus model_fast_prepare(MbModel *m, MbPool *pool) {
    size_t C = mb_dim(&m->cfg, MB_DIM_C);
    if (!m->fast || !m->ops->host_memory || !weight_nf4(&m->layers[0].w[MB_W_Q_PROJ]) || C % MB_Q8_BLOCK) return MB_OK;
    MbPool *own = pool ? NULL : mb_pool_new(mb_cpu_count());
    if (!pool && !own) return MB_ERR_OOM;
    MbStatus rc = weight_to_q8(&m->lm_head, pool ? pool : own, &m->lm_head_q8);
    mb_pool_free(own);
    return rc;
}

MbStatus mb_model_load(const char *dir, const MbLoadOptions *opt, MbModel **out) {
    *out = NULL;
    int err;
    const char *kind = mb_path_kind(dir, &err);
    if (err == ELOOP) return mb_fail(MB_ERR_IO, "%s: a loop of symbolic links --> pass a model folder", dir);
    if (!mb_is_dir(dir))
        return mb_fail(MB_ERR_IO, "%s: %s --> pass a Hugging Face model folder (config.json + *.safetensors)", dir,
                       err == ENOENT ? "no such folder" : err ? strerror(err) : !kind ? "is a file, not a folder"
                                                                               : "is not a folder");
    MbModel *m = mb_calloc(1, sizeof *m);
    char *cfg_path = m ? mb_path_join(dir, "config.json") : NULL;
    char cfg_compute[32] = "";
    if (!cfg_path) return free(m), MB_ERR_OOM;
    MbStatus rc = mb_config_load(cfg_path, &m->cfg);
    if (!rc) rc = bnb_config_load(cfg_path, cfg_compute, sizeof cfg_compute);
    free(cfg_path);
    MbDtype compute = MB_DT_F32; /* bnb_4bit_compute_dtype: the option, else the checkpoint's, else fp32 */
    const char *cname = opt && opt->bnb_4bit_compute_dtype ? opt->bnb_4bit_compute_dtype : cfg_compute;
    if (!rc && cname[0] && !compute_dtype_parse(cname, &compute))
        rc = mb_fail(opt && opt->bnb_4bit_compute_dtype ? MB_ERR_ARG : MB_ERR_UNSUPPORTED,
                     "%s: bnb_4bit_compute_dtype \"%s\" is not float32, bfloat16 or float16", dir, cname);
    if (!rc) rc = mb_ops_new(opt, &m->cfg, &m->ops);
    m->fast = opt && opt->fast;
    if (!rc && opt && opt->random_init) { /* no checkpoint: random weights on the backend */
        rc = model_random_init(m, opt->load_in_4bit, compute, opt->seed, &opt->progress);
        if (!rc) rc = model_fast_prepare(m, NULL);
        if (!rc && !(m->inv_freq = mb_malloc((size_t)m->cfg.head_dim / 2 * sizeof(float)))) rc = MB_ERR_OOM;
        if (rc) return mb_model_free(m), rc;
        rope_inv_freq(&m->cfg, m->inv_freq);
        *out = m;
        return MB_OK;
    }
    if (!rc) rc = mb_safetensors_open(dir, &m->st);
    if (rc) {
        mb_model_free(m);
        return rc;
    }
    const MbConfig *c = &m->cfg;
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size;
    /* every weight is checked for NaN/inf and, with load_in_4bit, the projections are quantized as
     * they are read, on as many threads as the ops */
    MbPool *pool = mb_pool_new(opt && opt->threads > 0 ? opt->threads : mb_cpu_count());
    int quantize = opt && opt->load_in_4bit;
    char name[256], what[600];
    MbTask task; /* progress: the bytes of the checkpoint's tensors read (and checked, quantized) */
    double total = 0;
    for (size_t i = 0; i < mb_safetensors_count(m->st); i++) total += (double)mb_safetensors_at(m->st, i)->nbytes;
    snprintf(what, sizeof what, "loading %s%s", dir, quantize ? " (quantizing to NF4)" : "");
    task_begin(&task, opt ? &opt->progress : NULL, what, "bytes", 0, total);
    rc = pool ? model_weight(m, dir, "model.embed_tokens.weight", V, C, pool, &m->embed_tokens) : MB_ERR_OOM;
    if (!rc) task_add(&task, (double)tensor_bytes_of(m->st, "model.embed_tokens.weight"));
    if (!rc && !(m->layers = mb_calloc((size_t)c->num_hidden_layers, sizeof *m->layers))) rc = MB_ERR_OOM;
    for (int l = 0; !rc && l < c->num_hidden_layers; l++)
        for (int i = 0; !rc && i < MB_LAYER_WEIGHTS; i++) {
            size_t rows = mb_dim(c, mb_layer_weights[i].rows), cols = mb_dim(c, mb_layer_weights[i].cols);
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mb_layer_weights[i].name);
            if (mb_layer_weights[i].rows == MB_DIM_1) rc = model_weight(m, dir, name, rows, cols, pool, &m->layers[l].w[i]);
            else rc = model_linear(m, dir, name, rows, cols, pool, quantize, compute, &m->layers[l].w[i]);
            if (!rc) task_add(&task, (double)tensor_bytes_of(m->st, name));
        }
    if (!rc) rc = model_weight(m, dir, "model.norm.weight", 1, C, pool, &m->norm);
    if (!rc) {
        if (c->tie_word_embeddings) m->lm_head = m->embed_tokens;
        else rc = model_weight(m, dir, "lm_head.weight", V, C, pool, &m->lm_head);
    }
    if (!rc) rc = model_fast_prepare(m, pool);
    if (!rc) task.ev.done = total; /* the norm, lm_head and any tensor medbot does not use */
    task_end(&task, !rc);
    mb_pool_free(pool);
    if (!rc && !(m->inv_freq = mb_malloc((size_t)c->head_dim / 2 * sizeof(float)))) rc = MB_ERR_OOM;
    if (rc) {
        mb_model_free(m);
        return rc;
    }
    rope_inv_freq(c, m->inv_freq);
    *out = m;
    return MB_OK;
}

MbStatus mb_kvcache_new(MbModel *m, int B, int S, MbKVCache **out) {
    *out = NULL;
    if (B < 1 || S < 1) return mb_fail(MB_ERR_ARG, "kv cache: batch %d and capacity %d must be >= 1", B, S);
    const MbConfig *c = &m->cfg;
    size_t L = (size_t)c->num_hidden_layers, per, bytes;
    if (mb_mul_overflows((size_t)B * (size_t)S, mb_dim(c, MB_DIM_KVD), &per) || mb_mul_overflows(2 * L, per, &bytes) ||
        mb_mul_overflows(bytes, m->ops->act_size, &bytes))
        return mb_fail(MB_ERR_OOM, "out of memory: a kv cache of %d x %d tokens does not fit the address space", B, S);
    MbKVCache *kv = mb_calloc(1, sizeof *kv);
    if (!kv) return MB_ERR_OOM;
    kv->m = m;
    kv->B = B;
    kv->S = S;
    kv->lens = mb_calloc((size_t)B, sizeof *kv->lens);
    kv->k = mb_calloc(L, sizeof *kv->k);
    kv->v = mb_calloc(L, sizeof *kv->v);
    MbStatus rc = kv->lens && kv->k && kv->v ? MB_OK : MB_ERR_OOM;
    if (!rc && !(kv->block = m->ops->alloc(m->ops, bytes))) rc = mb_ops_oom(m->ops);
    if (rc) {
        mb_kvcache_free(kv);
        return rc;
    }
    for (size_t l = 0; l < L; l++) {
        kv->k[l] = mb_act_at(m->ops, kv->block, (2 * l) * per);
        kv->v[l] = mb_act_at(m->ops, kv->block, (2 * l + 1) * per);
    }
    *out = kv;
    return MB_OK;
}

void mb_kvcache_free(MbKVCache *kv) {
    if (!kv) return;
    if (kv->block) kv->m->ops->free(kv->m->ops, kv->block);
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

/* The dropout mask key of projection id of layer l in the current training forward. */
static uint64_t lora_dropout_key(const MbModel *m, int l, MbLayerWeightId id) {
    return m->dropout_seed * 0x9E3779B97F4A7C15ull + (uint64_t)l * MB_LAYER_WEIGHTS + (uint64_t)id + 1;
}

/* out (N, O) = in (N, I) @ W^T (+ scale * B A dropout(in), when adapted) */
static void proj_forward(MbModel *m, int l, MbLayerWeightId id, MbAct *out, const MbAct *in, MbLayerActs *a,
                         size_t N) {
    MbOps *ops = m->ops;
    const MbWeight *w = &m->layers[l].w[id];
    ops->matmul_forward(ops, out, in, w, N);
    const MbLoraPair *lp = lora_pair(m, l, id);
    if (!lp) return;
    if (m->dropout_seed && m->lora->dropout > 0) { /* PEFT: lora_B(lora_A(dropout(x))) */
        MbAct *xd = m->acts.drop;
        ops->dropout_forward(ops, xd, in, N * w->cols, (float)m->lora->dropout, lora_dropout_key(m, l, id));
        in = xd;
    }
    ops->lora_forward(ops, out, a->u[id], in, &lp->A, &lp->B, N, m->lora->scale);
}

/* dinp (N, I) (+)= dout @ W (+ the adapter's path), and the adapter's gradients += */
static void proj_backward(MbModel *m, int l, MbLayerWeightId id, MbAct *dinp, const MbAct *dout, const MbAct *in,
                          const MbLayerActs *a, size_t N, int accumulate) {
    MbOps *ops = m->ops;
    const MbWeight *w = &m->layers[l].w[id];
    ops->matmul_backward(ops, dinp, dout, w, N, accumulate);
    const MbLoraPair *lp = lora_pair(m, l, id);
    if (!lp) return;
    if (m->dropout_seed && m->lora->dropout > 0) { /* the same mask on the input and on its gradient */
        MbAct *xd = m->acts.drop, *dxd = m->acts.ddrop;
        float p = (float)m->lora->dropout;
        uint64_t key = lora_dropout_key(m, l, id);
        ops->dropout_forward(ops, xd, in, N * w->cols, p, key);
        ops->zero(ops, dxd, N * w->cols * ops->act_size);
        ops->lora_backward(ops, dxd, lp->gA, lp->gB, dout, xd, a->u[id], &lp->A, &lp->B, N, m->lora->scale);
        ops->dropout_forward(ops, dxd, dxd, N * w->cols, p, key);
        ops->add_forward(ops, dinp, dinp, dxd, N * w->cols);
        return;
    }
    ops->lora_backward(ops, dinp, lp->gA, lp->gB, dout, in, a->u[id], &lp->A, &lp->B, N, m->lora->scale);
}

/* One decoder layer over N = B*T rows: a->x_in -> x_out (which may alias x_in). Keys and values
 * go to kc/vc (B, S, K*D) at positions pos0.. (inference, a KV cache), or with kc NULL stay in
 * a->k, a->v as the attention's whole key/value set (training: S = T, pos0 = 0). */
static void layer_forward(MbModel *m, int l, MbLayerActs *a, MbAct *x_out, MbAct *kc, MbAct *vc, int S, int pos0,
                          int B, int T, const int *lens) {
    MbOps *ops = m->ops;
    const MbConfig *c = &m->cfg;
    const MbLayer *ly = &m->layers[l];
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), F = mb_dim(c, MB_DIM_F);
    int H = c->num_attention_heads, K = c->num_key_value_heads, D = c->head_dim;
    MbAct *tmp = m->acts.tmp;

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
static void layer_backward(MbModel *m, int l, const MbLayerActs *a, MbAct *dx, int B, int T, const int *lens) {
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
    int *idx = logits && last_only ? mb_malloc((size_t)B * sizeof *idx) : NULL;
    if (logits && last_only && !idx) rc = MB_ERR_OOM;
    if (!rc) rc = acts_ensure(m, N, 0);
    if (!rc) rc = mb_ops_status(ops); /* a device that failed before runs nothing */
    if (rc) {
        free(idx);
        mb_kvcache_free(tmp_kv);
        return rc;
    }
    MbActs *a = &m->acts;
    MbAct *x = a->stream[0];
    ops->fast = m->fast; /* this forward only */
    ops->embedding_forward(ops, x, tokens, &m->embed_tokens, N);
    a->layer[0].x_in = x;
    for (int l = 0; l < c->num_hidden_layers; l++)
        layer_forward(m, l, &a->layer[0], x, kv->k[l], kv->v[l], kv->S, kv->len, B, T, kv->lens);
    if (logits) {
        size_t rows = N;
        if (last_only) { /* the last real position of each sequence */
            for (int b = 0; b < B; b++) idx[b] = b * T + (lens ? lens[b] : T) - 1;
            ops->gather_rows(ops, a->tmp, x, idx, (size_t)B, C);
            rows = (size_t)B;
        }
        ops->rmsnorm_forward(ops, a->xf, a->rstd_f, last_only ? a->tmp : x, &m->norm, rows, c->rms_norm_eps);
        float *dst = a->logits ? a->logits : logits;
        ops->logits_forward(ops, dst, a->xf, m->lm_head_q8.data ? &m->lm_head_q8 : &m->lm_head, rows);
        ops->to_host(ops, logits, dst, rows * V * sizeof(float));
    }
    ops->fast = 0;
    free(idx);
    if (!(rc = mb_ops_status(ops))) { /* (on a failure the cache holds nothing valid past kv->len) */
        kv->len += T;
        for (int b = 0; lens && b < B; b++)
            if (lens[b] < T) kv->padded = 1;
    }
    mb_kvcache_free(tmp_kv);
    return rc;
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
    if ((rc = acts_ensure(m, N, 1)) || (rc = mb_ops_status(ops))) return rc;
    MbActs *a = &m->acts;
    ops->embedding_forward(ops, a->stream[0], tokens, &m->embed_tokens, N);
    for (size_t l = 0; l < L; l++) {
        MbLayerActs *la = &a->layer[a->n_layer_sets > 1 ? l : 0];
        la->x_in = a->stream[l];
        layer_forward(m, (int)l, la, a->stream[l + 1], NULL, NULL, T, 0, B, T, lens);
    }
    ops->rmsnorm_forward(ops, a->xf, a->rstd_f, a->stream[L], &m->norm, N, c->rms_norm_eps);
    ops->gather_rows(ops, a->xg, a->xf, pos, M, C);
    ops->logprob_forward(ops, a->logp, a->lse_rows, a->lsum_rows, a->xg, &m->lm_head, target, M);
    ops->to_host(ops, logp, a->logp, M * sizeof(float));
    ops->to_host(ops, lsum, a->lsum_rows, M * sizeof(float));
    m->train_lens = lens, m->train_B = B, m->train_T = T;
    m->train_pos = pos, m->train_target = target, m->train_M = train ? M : 0;
    return mb_ops_status(ops);
}

/* Backpropagates sum_i g[i] * logp[i] of the last training forward into the LoRA gradients
 * (+=). With gradient checkpointing each layer's activations are recomputed from its input.
 * Returns the backend's failure, if any. */
static MbStatus model_backward_rows(MbModel *m, const float *g) {
    const MbConfig *c = &m->cfg;
    MbOps *ops = m->ops;
    MbActs *a = &m->acts;
    int B = m->train_B, T = m->train_T;
    size_t N = (size_t)B * T, C = mb_dim(c, MB_DIM_C), L = (size_t)c->num_hidden_layers, M = m->train_M;
    ops->from_host(ops, a->g_rows, g, M * sizeof(float));
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
    return mb_ops_status(ops);
}

static MbStatus init_random_weights(const MbConfig *c, const char *outdir, const MbInitOptions *o);

/* Writes a model folder with random weights (transformers' init: normal(0, std) for linear and
 * embedding weights, ones for norms) for the config at cfg_path; the folder is made with its
 * parents, and a failure leaves nothing it made. */
MbStatus mb_model_init_random(const char *cfg_path, const char *outdir, const MbInitOptions *o) {
    char why[160];
    if (range_why(o->std, 0, 0, INFINITY, MB_LO_OPEN, why, sizeof why))
        return mb_fail(MB_ERR_ARG, "mb_model_init_random: std %s", why);
    if (o->dtype != MB_DT_BF16 && o->dtype != MB_DT_F16 && o->dtype != MB_DT_F32)
        return mb_fail(MB_ERR_ARG, "mb_model_init_random: dtype %s: bf16, f16 or f32 only", mb_dtype_name(o->dtype));
    MbConfig c;
    MbStatus rc = mb_config_load(cfg_path, &c);
    if (rc) return rc;
    /* what it writes, and config.json unless it is the input (shards are not listed: an input
     * named like one is not worth the lines) */
    const char *written[] = {"model.safetensors", "model.safetensors.index.json", NULL};
    if ((rc = mb_guard_output("init", outdir, &cfg_path, 1, written))) return rc;
    char **made = NULL, *text = NULL;
    size_t len = 0;
    char *cfg_out = mb_path_join(outdir, "config.json");
    if (!cfg_out) return MB_ERR_OOM;
    int new_cfg = !mb_same_file(cfg_out, cfg_path);
    MbWFile cw = {0}; /* config.json goes in place with the weights, not before them */
    rc = mb_mkdir_p(outdir, &made);
    if (!rc) rc = mb_remove_stale(outdir); /* what a killed init left */
    if (!rc && new_cfg && !(rc = mb_read_file(cfg_path, &text, &len)) && !(rc = mb_wfile_open(&cw, cfg_out))) {
        mb_wfile_write(&cw, text, len);
        rc = mb_wfile_finish(&cw);
    }
    if (!rc) rc = init_random_weights(&c, outdir, o);
    if (!rc && new_cfg) rc = mb_wfile_commit(&cw);
    mb_wfile_abort(&cw); /* (nothing left after a commit) */
    mb_undo_mkdirs(&made, rc == MB_OK);
    free(cfg_out), free(text);
    return rc;
}

/* The order of a decoder layer's weights in transformers' state dict (LlamaDecoderLayer's
 * modules: self_attn, mlp, input_layernorm, post_attention_layernorm), which save_pretrained
 * shards in. */
static const MbLayerWeightId hf_layer_order[MB_LAYER_WEIGHTS] = {
    MB_W_Q_PROJ, MB_W_K_PROJ, MB_W_V_PROJ, MB_W_O_PROJ, MB_W_GATE_PROJ, MB_W_UP_PROJ, MB_W_DOWN_PROJ,
    MB_W_INPUT_LAYERNORM, MB_W_POST_ATTENTION_LAYERNORM};

/* The model's weights (names, dtype dt, shapes; no data) in the order mb_model_init_random draws
 * them: embed_tokens, each layer's in mb_layer_weights order, norm, then lm_head unless tied.
 * save[k]: the index of the k-th tensor of transformers' state dict. Arrays are malloc'd; the
 * names are *names (one block). */
static MbStatus llama_weight_list(const MbConfig *c, MbDtype dt, MbTensorOut **out, size_t **save, size_t *count,
                                  char **names) {
    size_t L = (size_t)c->num_hidden_layers, n = 2 + L * MB_LAYER_WEIGHTS + !c->tie_word_embeddings;
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size, NAME = 96;
    MbTensorOut *t = mb_calloc(n, sizeof *t);
    size_t *s = mb_calloc(n, sizeof *s);
    char *nm = mb_calloc(n, NAME);
    if (!t || !s || !nm) {
        free(t), free(s), free(nm);
        return MB_ERR_OOM;
    }
    for (size_t i = 0; i < n; i++) {
        char *name = nm + i * NAME;
        size_t rows = V, cols = C, l = (i - 1) / MB_LAYER_WEIGHTS, w = (i - 1) % MB_LAYER_WEIGHTS;
        int norm = 0;
        if (i == 0) snprintf(name, NAME, "model.embed_tokens.weight");
        else if (i == 1 + L * MB_LAYER_WEIGHTS) snprintf(name, NAME, "model.norm.weight"), norm = 1;
        else if (i == 2 + L * MB_LAYER_WEIGHTS) snprintf(name, NAME, "lm_head.weight");
        else {
            snprintf(name, NAME, "model.layers.%zu.%s.weight", l, mb_layer_weights[w].name);
            rows = mb_dim(c, mb_layer_weights[w].rows), cols = mb_dim(c, mb_layer_weights[w].cols);
            norm = mb_layer_weights[w].rows == MB_DIM_1;
        }
        /* norms are (C), and the only 1-D weights */
        t[i] = (MbTensorOut){name, dt, norm ? 1 : 2, {norm ? cols : rows, cols}, NULL};
    }
    size_t k = 0;
    s[k++] = 0;
    for (size_t l = 0; l < L; l++)
        for (int w = 0; w < MB_LAYER_WEIGHTS; w++) s[k++] = 1 + l * MB_LAYER_WEIGHTS + (size_t)hf_layer_order[w];
    for (size_t i = 1 + L * MB_LAYER_WEIGHTS; i < n; i++) s[k++] = i;
    *out = t, *save = s, *count = n, *names = nm;
    return MB_OK;
}

/* The weights of mb_model_init_random, drawn and written a piece at a time (at most
 * INIT_PIECE values in memory) as save_pretrained shards them. The draws are the same whatever
 * the pieces and the shards: one stream, tensor after tensor in llama_weight_list's order. */
#define INIT_PIECE ((size_t)1 << 20)
static MbStatus init_random_weights(const MbConfig *c, const char *outdir, const MbInitOptions *o) {
    MbTensorOut *ts;
    size_t *save, n, dsize = mb_dtype_size(o->dtype);
    char *names, what[300];
    MbStatus rc = llama_weight_list(c, o->dtype, &ts, &save, &n, &names);
    if (rc) return rc;
    snprintf(what, sizeof what, "writing random weights to %s", outdir);
    const char *meta[] = {"format", "pt", NULL};
    StCkpt ck;
    float *f = mb_malloc(INIT_PIECE * sizeof *f);
    void *piece = f ? mb_malloc(INIT_PIECE * dsize) : NULL;
    if (!piece) rc = MB_ERR_OOM;
    if (!rc) rc = st_ckpt_begin(&ck, outdir, ts, n, save, o->max_shard_size, meta, &o->progress, what);
    if (rc) {
        free(f), free(piece), free(ts), free(save), free(names);
        return rc;
    }
    MbRng rng;
    mb_rng_seed(&rng, o->seed);
    for (size_t i = 0; !rc && i < n; i++) {
        int is_norm = ts[i].ndim == 1;
        size_t numel = st_out_bytes(&ts[i]) / dsize;
        for (size_t k = 0; !rc && k < numel; k += INIT_PIECE) {
            size_t m = MB_MIN(INIT_PIECE, numel - k);
            for (size_t j = 0; j < m; j++) f[j] = is_norm ? 1.0f : (float)(o->std * mb_rng_normal(&rng));
            mb_convert_from_f32(o->dtype, f, piece, m);
            rc = st_ckpt_put(&ck, piece, m * dsize);
            if (!rc && o->interrupt && *o->interrupt)
                rc = mb_fail(MB_INTERRUPTED, "init: interrupted: %s is left as it was", outdir);
        }
    }
    rc = rc ? (st_ckpt_abort(&ck), rc) : st_ckpt_commit(&ck);
    free(f), free(piece), free(ts), free(save), free(names);
    return rc;
}

// ============================================================================================
// ---------- 7. lora ----------
// PEFT's LoRA: for each targeted projection W of each layer, y = W x + scale * B (A x) with
// A (R, in) ~ kaiming_uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B (out, R) = 0 and
// scale = alpha / R (alpha / sqrt(R) with use_rslora). All A and B live in one fp32 block,
// their gradients in another, in the order layer, projection (q k v o gate up down), A, B.
// Files: PEFT's adapter_config.json + adapter_model.safetensors (keys
// base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...). The math is the ops'
// lora_forward / lora_backward; training and generation share this one implementation.
// ============================================================================================

#define MB_LORA_PREFIX "base_model.model.model.layers."

/* "q_proj" -> MB_W_Q_PROJ (the part of the weight name after the last '.'), -1 if none */
static int lora_target_id(const char *name, size_t n) {
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
        const char *full = mb_layer_weights[i].name, *dot = strrchr(full, '.');
        if (mb_layer_weights[i].rows == MB_DIM_1 || !dot) continue;
        if (strlen(dot + 1) == n && !memcmp(dot + 1, name, n)) return i;
    }
    return -1;
}

/* "q_proj,k_proj" (or "all-linear") -> target bits */
static MbStatus lora_parse_targets(const char *list, unsigned *targets) {
    *targets = 0;
    if (!strcmp(list, "all-linear")) {
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++)
            if (mb_layer_weights[i].rows != MB_DIM_1) *targets |= 1u << i;
        return MB_OK;
    }
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        while (n && *p == ' ') p++, n--;
        while (n && p[n - 1] == ' ') n--;
        int id = lora_target_id(p, n);
        if (id < 0)
            return mb_fail(MB_ERR_ARG, "lora_target_modules: unknown module '%.*s' --> use q_proj, k_proj, "
                           "v_proj, o_proj, gate_proj, up_proj, down_proj or all-linear", (int)n, p);
        *targets |= 1u << id;
        p = e ? e + 1 : p + n;
    }
    if (!*targets) return mb_fail(MB_ERR_ARG, "lora_target_modules: empty list");
    return MB_OK;
}

static const char *lora_module_name(int id) { return strrchr(mb_layer_weights[id].name, '.') + 1; }

/* PEFT's name of lora_A (ab 0) or lora_B (ab 1) of projection id in layer l */
static void lora_tensor_name(char *name, size_t n, int l, int id, int ab) {
    snprintf(name, n, MB_LORA_PREFIX "%d.%s.lora_%c.weight", l, mb_layer_weights[id].name, ab ? 'B' : 'A');
}

void mb_lora_free(MbLora *lo) {
    if (!lo) return;
    free(lo->pairs);
    if (lo->params) lo->ops->free(lo->ops, lo->params);
    if (lo->grads) lo->ops->free(lo->ops, lo->grads);
    free(lo);
}

/* The parameters (or gradients) in host memory, for writing and merging; malloc'd. NULL when
 * out of memory or when the backend failed (mb_ops_oom(lo->ops) is the status). */
static float *lora_download(const MbLora *lo, const float *block) {
    float *h = mb_malloc(lo->n_params * sizeof(float) + 4);
    if (!h) return NULL;
    lo->ops->to_host(lo->ops, h, block, lo->n_params * sizeof(float));
    if (mb_ops_status(lo->ops)) return free(h), NULL;
    return h;
}

/* The host copy's view of backend pointer p (an A or B of the adapter). */
static const float *lora_host_view(const MbLora *lo, const float *host, const void *p) {
    return host + ((const float *)p - lo->params);
}

/* Steps *k through the adapted projections of lo in the order of the parameter block (layer,
 * then q k v o gate up down), giving each one's layer and MbLayerWeightId:
 *     for (size_t k = 0; (p = lora_next(lo, &k, &l, &id));) ... */
static MbLoraPair *lora_next(const MbLora *lo, size_t *k, int *l, int *id) {
    for (size_t n = (size_t)lo->L * MB_LAYER_WEIGHTS; *k < n; ++*k) {
        int i = (int)(*k % MB_LAYER_WEIGHTS);
        if (!(lo->targets & (1u << i))) continue;
        *l = (int)(*k / MB_LAYER_WEIGHTS), *id = i;
        return &lo->pairs[(*k)++];
    }
    return NULL;
}

/* An adapter for model m with zeroed A and B (callers fill them). */
static MbStatus lora_alloc(const MbModel *m, const MbLoraConfig *cfg, MbLora **out) {
    *out = NULL;
    if (cfg->r < 1) return mb_fail(MB_ERR_ARG, "lora: r must be >= 1, got %d", cfg->r);
    if (!(cfg->alpha > 0)) return mb_fail(MB_ERR_ARG, "lora: lora_alpha must be > 0");
    if (!(cfg->dropout >= 0 && cfg->dropout < 1)) return mb_fail(MB_ERR_ARG, "lora: lora_dropout must be in [0, 1)");
    if (!cfg->targets) return mb_fail(MB_ERR_ARG, "lora: no target modules");
    const MbConfig *c = &m->cfg;
    MbLora *lo = mb_calloc(1, sizeof *lo);
    if (!lo) return MB_ERR_OOM;
    lo->ops = m->ops;
    lo->r = cfg->r;
    lo->alpha = cfg->alpha;
    lo->dropout = cfg->dropout;
    lo->use_rslora = cfg->use_rslora;
    lo->targets = cfg->targets;
    lo->scale = (float)(cfg->use_rslora ? cfg->alpha / sqrt((double)cfg->r) : cfg->alpha / cfg->r);
    lo->L = c->num_hidden_layers;
    lo->enabled = 1;
    lo->pairs = mb_calloc((size_t)lo->L * MB_LAYER_WEIGHTS, sizeof *lo->pairs);
    if (!lo->pairs) {
        mb_lora_free(lo);
        return MB_ERR_OOM;
    }
    size_t R = (size_t)cfg->r, n = 0, off = 0, k;
    MbLoraPair *p;
    int l, i;
    for (k = 0; lora_next(lo, &k, &l, &i);)
        n += R * (mb_dim(c, mb_layer_weights[i].cols) + mb_dim(c, mb_layer_weights[i].rows));
    lo->n_params = n;
    MbStatus rc = MB_OK;
    size_t bytes = 0;
    if (mb_mul_overflows(n, sizeof(float), &bytes))
        rc = mb_fail(MB_ERR_OOM, "out of memory: an adapter of %zu parameters does not fit the address space", n);
    if (!rc && !(lo->params = m->ops->alloc(m->ops, bytes))) rc = mb_ops_oom(m->ops);
    if (!rc && !(lo->grads = m->ops->alloc(m->ops, bytes))) rc = mb_ops_oom(m->ops);
    if (rc) {
        mb_lora_free(lo);
        return rc;
    }
    for (k = 0; (p = lora_next(lo, &k, &l, &i));) {
        size_t in = mb_dim(c, mb_layer_weights[i].cols), outd = mb_dim(c, mb_layer_weights[i].rows);
        p->A = (MbWeight){.dtype = MB_DT_F32, .rows = R, .cols = in, .data = lo->params + off};
        p->gA = lo->grads + off;
        off += R * in;
        p->B = (MbWeight){.dtype = MB_DT_F32, .rows = outd, .cols = R, .data = lo->params + off};
        p->gB = lo->grads + off;
        off += outd * R;
    }
    *out = lo;
    return MB_OK;
}

MbStatus mb_lora_new(const MbModel *m, const MbLoraConfig *cfg, uint64_t seed, MbLora **out) {
    MbStatus rc = lora_alloc(m, cfg, out);
    if (rc) return rc;
    MbLora *lo = *out;
    float *host = mb_calloc(lo->n_params + 1, sizeof(float));
    if (!host) {
        mb_lora_free(lo), *out = NULL;
        return MB_ERR_OOM;
    }
    MbRng rng;
    mb_rng_seed(&rng, seed);
    MbLoraPair *p;
    int l, i;
    for (size_t k = 0; (p = lora_next(lo, &k, &l, &i));) {
        float bound = 1.0f / sqrtf((float)p->A.cols), *a = (float *)lora_host_view(lo, host, p->A.data);
        for (size_t j = 0; j < p->A.rows * p->A.cols; j++) a[j] = (float)((2.0 * mb_rng_uniform(&rng) - 1.0) * bound);
    }
    lo->ops->from_host(lo->ops, lo->params, host, lo->n_params * sizeof(float));
    free(host);
    if ((rc = mb_ops_status(lo->ops))) mb_lora_free(lo), *out = NULL;
    return rc;
}

/* Grows the adapter's parameter and gradient blocks to n_pad values (zeros past n_params), so
 * ZeRO's slices are equal; the views into them follow. */
static MbStatus lora_reserve(MbLora *lo, size_t n_pad) {
    MbOps *ops = lo->ops;
    float *p = ops->alloc(ops, n_pad * sizeof(float)), *g = p ? ops->alloc(ops, n_pad * sizeof(float)) : NULL;
    float *host = g ? lora_download(lo, lo->params) : NULL;
    if (!host) {
        MbStatus rc = mb_ops_oom(ops);
        if (p) ops->free(ops, p);
        if (g) ops->free(ops, g);
        return rc;
    }
    ops->from_host(ops, p, host, lo->n_params * sizeof(float));
    free(host);
    MbLoraPair *q;
    int l, id;
    for (size_t k = 0; (q = lora_next(lo, &k, &l, &id));) {
        q->A.data = p + ((const float *)q->A.data - lo->params), q->B.data = p + ((const float *)q->B.data - lo->params);
        q->gA = g + (q->gA - lo->grads), q->gB = g + (q->gB - lo->grads);
    }
    ops->free(ops, lo->params), ops->free(ops, lo->grads);
    lo->params = p, lo->grads = g;
    return mb_ops_status(ops);
}

void mb_model_set_lora(MbModel *m, MbLora *lo) { m->lora = lo; }
void mb_lora_set_enabled(MbLora *lo, int enabled) { lo->enabled = enabled; }
size_t mb_lora_num_params(const MbLora *lo) { return lo->n_params; }

/* ---- PEFT files ---- */

static MbStatus lora_read_config(const char *path, MbLoraConfig *cfg) {
    memset(cfg, 0, sizeof *cfg);
    MbJsonDoc doc;
    MbStatus rc = json_read_file(path, &doc);
    if (rc) return rc;
    const MbJson *r = json_root(&doc), *v;
    v = json_get(&doc, r, "peft_type");
    if (!v || v->kind != MB_JSON_STRING || strcmp(json_str(&doc, v), "LORA")) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: not a LoRA adapter (peft_type must be \"LORA\")", path);
        goto done;
    }
    v = json_get(&doc, r, "r");
    if (!v || v->kind != MB_JSON_NUMBER || !v->is_int || v->i < 1 || v->i > 65536) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: \"r\" must be a positive integer", path);
        goto done;
    }
    cfg->r = (int)v->i;
    cfg->alpha = 8; /* PEFT's default */
    v = json_get(&doc, r, "lora_alpha");
    if (v && v->kind == MB_JSON_NUMBER) cfg->alpha = v->num;
    v = json_get(&doc, r, "lora_dropout");
    if (v && v->kind == MB_JSON_NUMBER) cfg->dropout = v->num;
    v = json_get(&doc, r, "use_rslora");
    cfg->use_rslora = v && v->kind == MB_JSON_BOOL && v->boolean;
    v = json_get(&doc, r, "target_modules");
    if (v && v->kind == MB_JSON_STRING) {
        if ((rc = lora_parse_targets(json_str(&doc, v), &cfg->targets))) {
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: target_modules \"%s\": medbot reads a list of module names or "
                         "\"all-linear\"", path, json_str(&doc, v));
            goto done;
        }
    } else if (v && v->kind == MB_JSON_ARRAY) {
        for (const MbJson *e = json_first(&doc, v); e; e = json_next(&doc, e)) {
            int id = e->kind == MB_JSON_STRING ? lora_target_id(json_str(&doc, e), e->len) : -1;
            if (id < 0) {
                rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: target module '%s' is not a Llama projection", path,
                             e->kind == MB_JSON_STRING ? json_str(&doc, e) : "?");
                goto done;
            }
            cfg->targets |= 1u << id;
        }
    }
    if (!cfg->targets) {
        rc = mb_fail(MB_ERR_FORMAT, "%s: no target_modules", path);
        goto done;
    }
    /* settings that change the math medbot does not implement */
    struct {
        const char *key, *why;
    } refuse[] = {{"use_dora", "DoRA"}, {"fan_in_fan_out", "fan_in_fan_out"}, {"lora_bias", "lora_bias"}};
    for (size_t i = 0; i < sizeof refuse / sizeof *refuse; i++) {
        v = json_get(&doc, r, refuse[i].key);
        if (v && v->kind == MB_JSON_BOOL && v->boolean) {
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: %s adapters are not supported", path, refuse[i].why);
            goto done;
        }
    }
    const char *nonempty[] = {"rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"};
    for (size_t i = 0; i < sizeof nonempty / sizeof *nonempty; i++) {
        v = json_get(&doc, r, nonempty[i]);
        if (v && v->kind != MB_JSON_NULL && !((v->kind == MB_JSON_OBJECT || v->kind == MB_JSON_ARRAY) && !v->count)) {
            rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: \"%s\" is not supported", path, nonempty[i]);
            goto done;
        }
    }
    v = json_get(&doc, r, "bias");
    if (v && v->kind == MB_JSON_STRING && strcmp(json_str(&doc, v), "none")) {
        rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: bias \"%s\" is not supported (only \"none\")", path, json_str(&doc, v));
        goto done;
    }
done:
    json_free(&doc);
    return rc;
}

/* Loads a PEFT adapter folder (fp32, bf16 or f16 weights) for model m. */
MbStatus mb_lora_load(const MbModel *m, const char *dir, MbLora **out) {
    *out = NULL;
    char *cfg_path = mb_path_join(dir, "adapter_config.json");
    char *st_path = mb_path_join(dir, "adapter_model.safetensors");
    MbLoraConfig cfg;
    MbSafetensors *st = NULL;
    MbLora *lo = NULL;
    MbStatus rc = cfg_path && st_path ? lora_read_config(cfg_path, &cfg) : MB_ERR_OOM;
    if (!rc) rc = mb_safetensors_open(st_path, &st);
    if (!rc) rc = lora_alloc(m, &cfg, &lo);
    float *host = lo ? mb_calloc(lo->n_params + 1, sizeof(float)) : NULL;
    if (!rc && !host) rc = MB_ERR_OOM;
    char name[256];
    size_t found = 0;
    MbLoraPair *p;
    int l, i;
    for (size_t k = 0; !rc && (p = lora_next(lo, &k, &l, &i));)
        for (int ab = 0; !rc && ab < 2; ab++) {
            MbWeight *w = ab ? &p->B : &p->A;
            lora_tensor_name(name, sizeof name, l, i, ab);
            const MbTensorInfo *t = mb_safetensors_find(st, name);
            if (!t) {
                rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' is missing --> was the adapter made for this "
                             "model?", st_path, name);
                break;
            }
            if (t->ndim != 2 || t->shape[0] != w->rows || t->shape[1] != w->cols) {
                rc = mb_fail(MB_ERR_FORMAT, "%s: tensor '%s' has shape (%zu, %zu), the model needs (%zu, %zu)",
                             st_path, name, t->shape[0], t->ndim > 1 ? t->shape[1] : 0, w->rows, w->cols);
                break;
            }
            if (t->dtype != MB_DT_F32 && t->dtype != MB_DT_BF16 && t->dtype != MB_DT_F16) {
                rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s", st_path, name,
                             mb_dtype_name(t->dtype));
                break;
            }
            if ((rc = tensor_check_finite(t, st_path, NULL))) break;
            mb_convert_to_f32(t->dtype, t->data, (float *)lora_host_view(lo, host, w->data), t->numel);
            found++;
        }
    if (!rc && found != mb_safetensors_count(st))
        rc = mb_fail(MB_ERR_UNSUPPORTED, "%s: holds %zu tensors, medbot used %zu (adapters on other modules, or "
                     "modules_to_save?)", st_path, mb_safetensors_count(st), found);
    if (!rc) lo->ops->from_host(lo->ops, lo->params, host, lo->n_params * sizeof(float));
    if (!rc) rc = mb_ops_status(lo->ops);
    free(host);
    mb_safetensors_close(st);
    free(cfg_path);
    free(st_path);
    if (rc) {
        mb_lora_free(lo);
        return rc;
    }
    *out = lo;
    return MB_OK;
}

/* adapter_config.json as PEFT writes it (the fields every PEFT version reads) */
static char *lora_config_json(const MbLora *lo, const char *base_model) {
    char *j = NULL;
    sb_printf(&j, "{\n  \"task_type\": \"CAUSAL_LM\",\n  \"peft_type\": \"LORA\",\n  \"base_model_name_or_path\": ");
    if (base_model) sb_json_string(&j, base_model, strlen(base_model));
    else sb_printf(&j, "null");
    sb_printf(&j, ",\n  \"revision\": null,\n  \"inference_mode\": true,\n  \"r\": %d,\n  \"target_modules\": [", lo->r);
    int first = 1;
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++)
        if (lo->targets & (1u << i)) {
            sb_printf(&j, "%s\"%s\"", first ? "" : ", ", lora_module_name(i));
            first = 0;
        }
    sb_printf(&j, "],\n  \"lora_alpha\": %.17g,\n  \"lora_dropout\": %.17g,\n  \"fan_in_fan_out\": false,\n"
              "  \"bias\": \"none\",\n  \"use_rslora\": %s,\n  \"modules_to_save\": null,\n"
              "  \"init_lora_weights\": true,\n  \"layers_to_transform\": null,\n  \"layers_pattern\": null,\n"
              "  \"rank_pattern\": {},\n  \"alpha_pattern\": {},\n  \"use_dora\": false,\n  \"lora_bias\": false\n}\n",
              lo->alpha, lo->dropout, lo->use_rslora ? "true" : "false");
    return j;
}

/* The adapter's tensors under their PEFT names (fp32), in the order of the parameter block, into
 * *ts (stb_ds); the names are malloc'd into *names (freed by the caller, also on a failure). */
static MbStatus lora_tensors(const MbLora *lo, const float *host, MbTensorOut **ts, char ***names) {
    const MbLoraPair *p;
    int l, i;
    for (size_t k = 0; (p = lora_next(lo, &k, &l, &i));)
        for (int ab = 0; ab < 2; ab++) {
            const MbWeight *w = ab ? &p->B : &p->A;
            char name[256];
            lora_tensor_name(name, sizeof name, l, i, ab);
            MbTensorOut t = {mb_strdup(name), MB_DT_F32, 2, {w->rows, w->cols}, lora_host_view(lo, host, w->data)};
            if (!t.name) return MB_ERR_OOM;
            arrput(*names, (char *)t.name);
            arrput(*ts, t);
        }
    return MB_OK;
}

/* Writes DIR/adapter_model.safetensors and DIR/adapter_config.json (each through a temporary
 * file) from the adapter's fp32 parameters. */
MbStatus mb_lora_save(const MbLora *lo, const char *dir, const char *base_model) {
    if (!mb_is_dir(dir) && mkdir(dir, 0755) != 0)
        return mb_fail(MB_ERR_IO, "%s: cannot create the folder: %s", dir, strerror(errno));
    char **names = NULL;
    MbTensorOut *ts = NULL;
    float *host = lora_download(lo, lo->params);
    MbStatus rc = host ? lora_tensors(lo, host, &ts, &names) : mb_ops_oom(lo->ops);
    char *st_path = rc ? NULL : mb_path_join(dir, "adapter_model.safetensors");
    const char *meta[] = {"format", "pt", NULL};
    if (!rc && !st_path) rc = MB_ERR_OOM;
    if (!rc) rc = mb_safetensors_write(st_path, ts, (size_t)arrlen(ts), meta);
    free(st_path);
    free(host);
    for (ptrdiff_t i = 0; i < arrlen(names); i++) free(names[i]);
    arrfree(names);
    arrfree(ts);
    if (rc) return rc;
    char *j = lora_config_json(lo, base_model);
    char *cfg_path = mb_path_join(dir, "adapter_config.json");
    rc = cfg_path ? mb_write_file(cfg_path, j, strlen(j)) : MB_ERR_OOM;
    free(cfg_path);
    arrfree(j);
    return rc;
}

/* ---- merge: W' = W + scale B A in fp32 on the (dequantized) base weight ---- */

typedef struct {
    const MbModel *m;
    const MbLora *lo;
    const MbTensorOut *ts;
    int *layer, *id;   /* per output tensor: its layer and MbLayerWeightId, or -1 */
    const MbWeight **src;
    const float *host;  /* the adapter's parameters in host memory */
} MergeCtx;

/* Row r of W + scale B A in fp32 (PEFT's merge: W += (B @ A) * scaling); A (R, cols) and B
 * (rows, R) in host memory, NULL for an unadapted weight. */
static MbStatus lora_merge_row(const MbWeight *w, const float *A, const float *B, size_t R, float scale, size_t r,
                               float *row) {
    size_t cols = w->cols;
    weight_row_f32(w, r, 0, cols, row);
    if (!A) return MB_OK;
    B += r * R;
    float *ba = mb_calloc(cols, sizeof(float));
    if (!ba) return MB_ERR_OOM;
    for (size_t k = 0; k < R; k++)
        for (size_t c = 0; c < cols; c++) ba[c] += B[k] * A[k * cols + c];
    for (size_t c = 0; c < cols; c++) row[c] += ba[c] * scale;
    free(ba);
    return MB_OK;
}

static MbStatus merge_fill(void *ctx, size_t i, void *dst) {
    MergeCtx *mc = ctx;
    const MbWeight *w = mc->src[i];
    size_t rows = w->rows, cols = w->cols;
    float *row = mb_malloc(cols * sizeof(float));
    if (!row) return MB_ERR_OOM;
    const MbLoraPair *p = mc->id[i] >= 0 && (mc->lo->targets & (1u << mc->id[i]))
                              ? &mc->lo->pairs[(size_t)mc->layer[i] * MB_LAYER_WEIGHTS + mc->id[i]]
                              : NULL;
    const float *A = p ? lora_host_view(mc->lo, mc->host, p->A.data) : NULL;
    const float *B = p ? lora_host_view(mc->lo, mc->host, p->B.data) : NULL;
    MbStatus rc = MB_OK;
    for (size_t r = 0; r < rows && !rc; r++) {
        rc = lora_merge_row(w, A, B, (size_t)mc->lo->r, mc->lo->scale, r, row);
        mb_convert_from_f32(MB_DT_BF16, row, (unsigned char *)dst + r * cols * 2, cols);
    }
    free(row);
    return rc;
}

/* The files merge writes into its output folder. */
static const char *const mb_merge_outputs[] = {"model.safetensors", "config.json", "generation_config.json",
                                               "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                               "special_tokens_map.json", NULL};

/* config.json of a merged model: the base's, with torch_dtype (and dtype, which newer
 * transformers write) "bfloat16" and no quantization_config (the weights are dense bf16 now).
 * Returns a malloc'd text. */
static MbStatus merged_config_json(const char *path, char **out) {
    char *text, *sb = NULL;
    size_t n;
    MbJsonDoc d;
    MbStatus rc = mb_read_file(path, &text, &n);
    if (!rc) rc = json_parse(path, text, n, &d);
    if (rc) {
        free(text);
        return rc;
    }
    const MbJson *root = json_root(&d);
    int has_dtype = json_get(&d, root, "torch_dtype") || json_get(&d, root, "dtype"), first = 1;
    sb_printf(&sb, "{\n");
    for (const MbJson *v = json_first(&d, root); v; v = json_next(&d, v)) {
        const char *k = json_key(&d, v);
        if (!strcmp(k, "quantization_config")) continue;
        sb_printf(&sb, "%s  ", first ? "" : ",\n");
        first = 0;
        sb_json_string(&sb, k, v->keylen);
        sb_printf(&sb, ": ");
        if (!strcmp(k, "torch_dtype") || !strcmp(k, "dtype")) sb_printf(&sb, "\"bfloat16\"");
        else json_write_value(&sb, &d, v, text, 1);
    }
    if (!has_dtype) sb_printf(&sb, "%s  \"torch_dtype\": \"bfloat16\"", first ? "" : ",\n");
    sb_printf(&sb, "\n}\n");
    *out = mb_strdup(sb);
    arrfree(sb);
    json_free(&d);
    free(text);
    return *out ? MB_OK : MB_ERR_OOM;
}

/* Writes OUT/model.safetensors: every weight of m in bf16, with the adapter merged into its
 * projections (fp32 math, never re-quantized), OUT/config.json (dtype bfloat16) and, when the
 * base has one, OUT/generation_config.json (the same stop ids). OUT is made with its parents. */
MbStatus mb_model_merge_save(const MbModel *m, const MbLora *lo, const char *model_dir, const char *out_dir) {
    const MbConfig *c = &m->cfg;
    MbStatus rc = mb_guard_output("merge", out_dir, &model_dir, 1, mb_merge_outputs);
    if (!rc) rc = mb_mkdir_p(out_dir, NULL);
    if (rc) return rc;
    size_t L = (size_t)c->num_hidden_layers, n = 0, cap = L * MB_LAYER_WEIGHTS + 3;
    MbTensorOut *ts = mb_calloc(cap, sizeof *ts);
    int *layer = mb_calloc(cap, sizeof *layer), *id = mb_calloc(cap, sizeof *id);
    const MbWeight **src = mb_calloc(cap, sizeof *src);
    char **names = mb_calloc(cap, sizeof *names);
    char name[256];
    if (!ts || !layer || !id || !src || !names) rc = MB_ERR_OOM;
#define ADD(nm, w, lay, idx, nd)                                                                   \
    do {                                                                                          \
        if (rc || !(names[n] = mb_strdup(nm))) {                                                  \
            rc = MB_ERR_OOM;                                                                      \
            break;                                                                                \
        }                                                                                         \
        ts[n] = (MbTensorOut){names[n], MB_DT_BF16, (nd), {(nd) == 1 ? (w)->cols : (w)->rows, (w)->cols}, NULL}; \
        src[n] = (w), layer[n] = (lay), id[n] = (idx), n++;                                       \
    } while (0)
    ADD("model.embed_tokens.weight", &m->embed_tokens, -1, -1, 2);
    for (size_t l = 0; !rc && l < L; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, mb_layer_weights[i].name);
            int is_norm = mb_layer_weights[i].rows == MB_DIM_1;
            ADD(name, &m->layers[l].w[i], (int)l, is_norm ? -1 : i, is_norm ? 1 : 2);
        }
    ADD("model.norm.weight", &m->norm, -1, -1, 1);
    if (!c->tie_word_embeddings) ADD("lm_head.weight", &m->lm_head, -1, -1, 2);
#undef ADD
    float *host = rc ? NULL : lora_download(lo, lo->params);
    if (!rc && !host) rc = mb_ops_oom(lo->ops);
    MergeCtx mc = {m, lo, ts, layer, id, src, host};
    char *st_path = rc ? NULL : mb_path_join(out_dir, "model.safetensors");
    const char *meta[] = {"format", "pt", NULL};
    if (!rc && !st_path) rc = MB_ERR_OOM;
    if (!rc) rc = st_write(st_path, ts, n, meta, merge_fill, &mc);
    free(st_path);
    free(host);
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names), free(ts), free(layer), free(id), free(src);
    if (rc) return rc;
    char *cfg_in = mb_path_join(model_dir, "config.json"), *cfg_out = mb_path_join(out_dir, "config.json"), *text;
    char *gen_in = mb_path_join(model_dir, "generation_config.json"), *gen_out = mb_path_join(out_dir, "generation_config.json");
    if (!cfg_in || !cfg_out || !gen_in || !gen_out) rc = MB_ERR_OOM;
    else if (!(rc = merged_config_json(cfg_in, &text))) {
        rc = mb_write_file(cfg_out, text, strlen(text));
        free(text);
    }
    if (!rc && mb_is_file(gen_in)) rc = mb_copy_file(gen_in, gen_out);
    free(cfg_in), free(cfg_out), free(gen_in), free(gen_out);
    return rc;
}

MbStatus mb_merge(const char *model_dir, const char *lora_dir, const char *tokenizer, const char *out_dir, int threads,
                  const MbProgress *progress) {
    const char *inputs[3] = {model_dir, lora_dir, tokenizer};
    MbStatus rc = mb_guard_output("merge", out_dir, inputs, 3, mb_merge_outputs);
    if (rc) return rc;
    int existed[sizeof mb_merge_outputs / sizeof *mb_merge_outputs] = {0}, writing = 0;
    mb_files_present(out_dir, mb_merge_outputs, existed);
    MbModel *m = NULL;
    MbLora *lo = NULL;
    MbTokenizer *tok = NULL; /* it travels with the merged model */
    char **made = NULL;
    MbLoadOptions opt = {.threads = threads, .device = MB_DEVICE_CPU}; /* the merge is host work */
    if (progress) opt.progress = *progress;
    if (!(rc = mb_tokenizer_open(tokenizer, model_dir, lora_dir, &tok)))
        if (!(rc = mb_model_load(model_dir, &opt, &m))) rc = mb_lora_load(m, lora_dir, &lo);
    if (!rc) rc = mb_mkdir_p(out_dir, &made);
    if (!rc) rc = mb_remove_stale(out_dir); /* what a killed merge left */
    if (!rc) writing = 1, rc = mb_model_merge_save(m, lo, model_dir, out_dir);
    if (!rc) rc = tokenizer_copy_files(tok, out_dir);
    if (rc && writing) mb_remove_new_files(out_dir, mb_merge_outputs, existed); /* only what this merge wrote */
    mb_undo_mkdirs(&made, rc == MB_OK);
    mb_tokenizer_free(tok);
    mb_lora_free(lo);
    mb_model_free(m);
    return rc;
}

// ============================================================================================
// ---------- 8. data ----------
// Preference pairs from JSONL, tokenized and truncated exactly as TRL 0.27.2's DPOTrainer does
// for plain-text data: prompt, chosen and rejected tokenized separately without special tokens,
// EOS appended to both completions, the prompt keeps its last max_prompt_length tokens, each
// completion its first max_completion_length; then each sequence prompt + completion keeps its
// last max_length tokens (truncation_mode keep_end). Field layouts:
//   {"prompt", "chosen", "rejected"}                      the prompt used as it is
//   {"system"?, "question", "chosen"|"response_chosen", "rejected"|"response_rejected"}
//                                                          the prompt rendered with the card's template
// ============================================================================================

#define MB_DEFAULT_SYSTEM "You are a Medical Chatbot, you should friendly answer the question."

/* The card's prompt template. Returns a malloc'd string, or NULL (out of memory, message set). */
static char *mb_render_prompt(const char *system, const char *question) {
    char *s = NULL;
    sb_printf(&s, "###System: %s\n###Question: %s\n###Answer: ", system ? system : MB_DEFAULT_SYSTEM, question);
    char *out = mb_strdup(s);
    arrfree(s);
    return out;
}

/* The next non-blank line of JSONL text[0..n) from *at: *s and *len (without a trailing \r),
 * *line its 1-based number. Returns 0 at the end. */
static int jsonl_next(const char *text, size_t n, size_t *at, int *line, const char **s, size_t *len) {
    while (*at < n) {
        size_t end = *at;
        while (end < n && text[end] != '\n') end++;
        ++*line;
        *s = text + *at;
        *len = end - *at;
        *at = end + 1;
        if (*len && (*s)[*len - 1] == '\r') --*len;
        size_t k = 0;
        while (k < *len && ((*s)[k] == ' ' || (*s)[k] == '\t')) k++;
        if (k < *len) return 1;
    }
    return 0;
}

typedef struct {
    int32_t *prompt, *chosen, *rejected; /* token ids after TRL's tokenize_row (malloc'd) */
    int np, nc, nr;
    int line;                            /* 1-based line in the file */
} MbPair;

typedef struct {
    char *path;
    MbPair *pairs;       /* stb_ds array */
    int skipped_empty;   /* pairs with an empty prompt or completion */
    int skipped_long;    /* pairs whose prompt leaves no room for a completion within max_length */
    int first_skipped_line;
} MbDataset;

typedef struct {
    int max_length, max_prompt_length, max_completion_length; /* <= 0: no limit */
    int add_bos;
} MbDataOptions;

static void dataset_free(MbDataset *ds) {
    for (ptrdiff_t i = 0; i < arrlen(ds->pairs); i++) {
        free(ds->pairs[i].prompt);
        free(ds->pairs[i].chosen);
        free(ds->pairs[i].rejected);
    }
    arrfree(ds->pairs);
    free(ds->path);
    memset(ds, 0, sizeof *ds);
}

static const MbJson *json_str_field(const MbJsonDoc *doc, const MbJson *obj, const char *a, const char *b) {
    const MbJson *v = json_get(doc, obj, a);
    if (!v && b) v = json_get(doc, obj, b);
    return v;
}

/* Tokenizes one pair as TRL's tokenize_row (add_special_tokens False) and truncates it. */
static MbStatus pair_tokenize(const MbTokenizer *tok, const MbDataOptions *opt, const char *prompt, size_t plen,
                              const char *chosen, size_t clen, const char *rejected, size_t rlen, MbPair *p) {
    int32_t *ids[3] = {NULL, NULL, NULL};
    size_t n[3] = {0, 0, 0};
    const char *text[3] = {prompt, chosen, rejected};
    size_t len[3] = {plen, clen, rlen};
    MbStatus rc = MB_OK;
    for (int i = 0; i < 3 && !rc; i++) rc = mb_tokenizer_encode(tok, text[i], len[i], 0, &ids[i], &n[i]);
    if (rc) goto fail;
    int32_t bos = mb_tokenizer_bos_id(tok), eos = mb_tokenizer_eos_id(tok);
    if (eos < 0) {
        rc = mb_fail(MB_ERR_FORMAT, "tokenizer has no EOS token");
        goto fail;
    }
    if (opt->add_bos && bos >= 0 && !(n[0] > 0 && ids[0][0] == bos)) { /* never a second BOS */
        int32_t *q = mb_malloc((n[0] + 1) * sizeof *q);
        if (!q) {
            rc = MB_ERR_OOM;
            goto fail;
        }
        q[0] = bos;
        memcpy(q + 1, ids[0], n[0] * sizeof *q);
        free(ids[0]);
        ids[0] = q;
        n[0]++;
    }
    for (int i = 1; i < 3; i++) { /* EOS on both completions, before truncation */
        int32_t *q = realloc(ids[i], (n[i] + 1) * sizeof *q);
        if (!q) {
            rc = mb_fail(MB_ERR_OOM, "out of memory");
            goto fail;
        }
        q[n[i]++] = eos;
        ids[i] = q;
    }
    if (opt->max_prompt_length > 0 && n[0] > (size_t)opt->max_prompt_length) { /* keep the last tokens */
        size_t cut = n[0] - (size_t)opt->max_prompt_length;
        memmove(ids[0], ids[0] + cut, (size_t)opt->max_prompt_length * sizeof(int32_t));
        n[0] = (size_t)opt->max_prompt_length;
    }
    for (int i = 1; i < 3; i++)
        if (opt->max_completion_length > 0 && n[i] > (size_t)opt->max_completion_length)
            n[i] = (size_t)opt->max_completion_length; /* keep the first tokens */
    p->prompt = ids[0], p->chosen = ids[1], p->rejected = ids[2];
    p->np = (int)n[0], p->nc = (int)n[1], p->nr = (int)n[2];
    return MB_OK;
fail:
    for (int i = 0; i < 3; i++) free(ids[i]);
    return rc;
}

/* Where the JSONL lines of text[0..n) start: after a UTF-8 BOM; a UTF-16 or UTF-32 file is named. */
static MbStatus jsonl_start(const char *path, const char *text, size_t n, size_t *at) {
    const char *wide = text_wide_encoding(text, n, at);
    if (wide) return mb_fail(MB_ERR_FORMAT, "%s: the file is %s --> save it as UTF-8", path, wide);
    return MB_OK;
}

/* The JSON lines of a file's text, one parsed line at a time. */
typedef struct {
    const char *path, *text;
    size_t n, at;
    int line;               /* 1-based number of the current line */
    char where[600];        /* "PATH:LINE" of the current line, for messages */
} MbJsonl;

static MbStatus jsonl_open(MbJsonl *r, const char *path, const char *text, size_t n) {
    memset(r, 0, sizeof *r);
    r->path = path, r->text = text, r->n = n;
    return jsonl_start(path, text, n, &r->at);
}

/* The next non-blank line parsed into doc (json_free it): 1; 0 at the end of the text, or when the
 * line is not JSON (then *rc is set, its message "PATH:LINE: ..."). */
static int jsonl_read(MbJsonl *r, MbJsonDoc *doc, MbStatus *rc) {
    const char *s;
    size_t len;
    if (!jsonl_next(r->text, r->n, &r->at, &r->line, &s, &len)) return 0;
    snprintf(r->where, sizeof r->where, "%s:%d", r->path, r->line);
    return (*rc = json_parse(r->where, s, len, doc)) == MB_OK;
}

/* Parses the JSONL text[0..n) of preference pairs read from path. Bad lines (not JSON, a field
 * missing or not a string, text that is not UTF-8) stop it with "FILE:LINE: problem"; pairs with
 * an empty prompt or completion, or a prompt that leaves no room for the completion within
 * max_length, are skipped and counted. */
static MbStatus dataset_parse(const char *path, const char *text, size_t n, const MbTokenizer *tok,
                              const MbDataOptions *opt, MbDataset *ds) {
    memset(ds, 0, sizeof *ds);
    MbJsonl jl;
    MbJsonDoc doc;
    MbStatus rc = jsonl_open(&jl, path, text, n);
    if (rc) return rc;
    if (!(ds->path = mb_strdup(path))) return MB_ERR_OOM;
    while (!rc && jsonl_read(&jl, &doc, &rc)) {
        const MbJson *r = json_root(&doc);
        const MbJson *p = json_get(&doc, r, "prompt"), *q = json_get(&doc, r, "question"),
                     *sys = json_get(&doc, r, "system"),
                     *c = json_str_field(&doc, r, "chosen", "response_chosen"),
                     *j = json_str_field(&doc, r, "rejected", "response_rejected");
        const char *missing = r->kind != MB_JSON_OBJECT ? "a JSON object"
                              : !p && !q                ? "\"prompt\" or \"question\""
                              : !c                      ? "\"chosen\" (or \"response_chosen\")"
                              : !j                      ? "\"rejected\" (or \"response_rejected\")"
                                                        : NULL;
        const MbJson *fields[] = {p ? p : q, c, j, sys};
        for (int f = 0; !missing && f < 4; f++)
            if (fields[f] && fields[f]->kind != MB_JSON_STRING) missing = "string values";
        if (missing) {
            rc = mb_fail(MB_ERR_FORMAT, "%s: a preference pair needs %s", jl.where, missing);
            json_free(&doc);
            break;
        }
        char *prompt = p ? mb_strdup(json_str(&doc, p))
                         : mb_render_prompt(sys ? json_str(&doc, sys) : NULL, json_str(&doc, q));
        if (!prompt) {
            rc = MB_ERR_OOM;
            json_free(&doc);
            break;
        }
        int empty = !prompt[0] || !c->len || !j->len;
        MbPair pair;
        memset(&pair, 0, sizeof pair);
        pair.line = jl.line;
        if (!empty)
            rc = pair_tokenize(tok, opt, prompt, strlen(prompt), json_str(&doc, c), c->len, json_str(&doc, j), j->len,
                               &pair);
        free(prompt);
        json_free(&doc);
        if (rc) {
            rc = mb_fail_at(rc, jl.where);
            break;
        }
        int too_long = !empty && opt->max_length > 0 && pair.np >= opt->max_length;
        if (empty || too_long) {
            if (empty) ds->skipped_empty++;
            else ds->skipped_long++;
            if (!ds->first_skipped_line) ds->first_skipped_line = jl.line;
            free(pair.prompt), free(pair.chosen), free(pair.rejected);
            continue;
        }
        arrput(ds->pairs, pair);
    }
    if (!rc && arrlen(ds->pairs) == 0)
        rc = mb_fail(MB_ERR_FORMAT, "%s: no usable preference pairs (%d skipped)", path,
                     ds->skipped_empty + ds->skipped_long);
    if (rc) dataset_free(ds);
    return rc;
}

/* Reads a JSONL file of preference pairs (dataset_parse). */
static MbStatus dataset_load(const char *path, const MbTokenizer *tok, const MbDataOptions *opt, MbDataset *ds) {
    char *text;
    size_t n;
    memset(ds, 0, sizeof *ds);
    MbStatus rc = mb_read_file(path, &text, &n);
    if (rc) return rc;
    rc = dataset_parse(path, text, n, tok, opt, ds);
    free(text);
    return rc;
}

/* A batch of sequences for one forward pass, laid out as TRL's concatenated_forward: for P
 * pairs, sequences 0..P-1 are prompt + chosen and P..2P-1 prompt + rejected (sft: only the P
 * chosen), each keeping its last max_length tokens, right-padded to T. Loss rows: every
 * position t whose next token is a completion token (t + 1 >= the prompt's part, t >= 0). */
typedef struct {
    int B, T;
    int32_t *tokens;   /* (B, T) */
    int *lens;         /* (B) */
    size_t M;          /* loss rows */
    int *pos;          /* (M) b * T + t */
    int32_t *target;   /* (M) token t + 1 */
    int *seq;          /* (M) b */
    int *count;        /* (B) loss rows of each sequence */
} MbBatch;

static void batch_free(MbBatch *b) {
    free(b->tokens), free(b->lens), free(b->pos), free(b->target), free(b->seq), free(b->count);
    memset(b, 0, sizeof *b);
}

/* Builds bt for P pairs (freed with batch_free; out of memory leaves it empty). */
static MbStatus batch_build(MbBatch *bt, const MbPair *const *pairs, int P, int with_rejected, int max_length,
                            int32_t pad) {
    memset(bt, 0, sizeof *bt);
    int B = with_rejected ? 2 * P : P, T = 1;
    int *np = mb_calloc((size_t)B, sizeof *np), *nc = mb_calloc((size_t)B, sizeof *nc);
    if (!np || !nc) return free(np), free(nc), MB_ERR_OOM;
    for (int b = 0; b < B; b++) {
        const MbPair *p = pairs[b % P];
        int n = p->np + (b < P ? p->nc : p->nr), cut = max_length > 0 && n > max_length ? n - max_length : 0;
        np[b] = MB_MAX(p->np - cut, 0);                        /* prompt tokens left after keep_end */
        nc[b] = (b < P ? p->nc : p->nr) - MB_MAX(cut - p->np, 0); /* completion tokens left */
        T = MB_MAX(T, np[b] + nc[b]);
    }
    bt->B = B, bt->T = T;
    bt->tokens = mb_malloc((size_t)B * T * sizeof *bt->tokens);
    bt->lens = mb_calloc((size_t)B, sizeof *bt->lens);
    bt->count = mb_calloc((size_t)B, sizeof *bt->count);
    bt->pos = mb_malloc((size_t)B * T * sizeof *bt->pos);
    bt->target = mb_malloc((size_t)B * T * sizeof *bt->target);
    bt->seq = mb_malloc((size_t)B * T * sizeof *bt->seq);
    if (!bt->tokens || !bt->lens || !bt->count || !bt->pos || !bt->target || !bt->seq) {
        free(np), free(nc);
        batch_free(bt);
        return MB_ERR_OOM;
    }
    for (int b = 0; b < B; b++) {
        const MbPair *p = pairs[b % P];
        const int32_t *comp = b < P ? p->chosen : p->rejected;
        int32_t *row = bt->tokens + (size_t)b * T;
        int ncomp_all = b < P ? p->nc : p->nr;
        memcpy(row, p->prompt + (p->np - np[b]), (size_t)np[b] * sizeof *row);
        memcpy(row + np[b], comp + (ncomp_all - nc[b]), (size_t)nc[b] * sizeof *row);
        bt->lens[b] = np[b] + nc[b];
        for (int t = bt->lens[b]; t < T; t++) row[t] = pad;
        for (int t = MB_MAX(np[b], 1); t < bt->lens[b]; t++) { /* token t is a completion token */
            bt->pos[bt->M] = b * T + t - 1;
            bt->target[bt->M] = row[t];
            bt->seq[bt->M] = b;
            bt->count[b]++;
            bt->M++;
        }
    }
    free(np);
    free(nc);
    return MB_OK;
}

// ============================================================================================
// ---------- 9. dpo ----------
// TRL 0.27.2's DPOTrainer (and a next-token SFT trainer on the same machinery). One micro-batch
// of P pairs: the 2P sequences (chosen, then rejected) run in one forward pass with the adapter
// disabled (the reference policy, no gradient) and once enabled (the policy); completion
// log-probs are summed per sequence in fp32; the loss of each pair is a function of
// d = (pc - rc) - (pr - rr); its mean over the pairs, divided by the micro-batches of the
// optimizer step, is backpropagated. Then: global grad norm, clipping, AdamW, the schedule.
// ============================================================================================

/* The collectives a data-parallel run needs: MbComm, its backends (in-process threads, TCP, NCCL)
 * and these calls are in section 11. A collective returns MB_OK or the failure of its group (a
 * rank that died, hangs or failed), which is sticky: every later collective of the group returns
 * it at once, and the step that met it returns it up to mb_train. */
typedef struct MbComm MbComm;
#define MB_DDP_TIMEOUT 1800.0 /* seconds: TrainingArguments.ddp_timeout */
static int comm_rank(const MbComm *c);
static int comm_world(const MbComm *c);
static MbStatus comm_barrier(MbComm *c);
/* a small array in host memory (metrics, flags, norms): x = sum over ranks, in fp64 */
static MbStatus comm_all_reduce_host(MbComm *c, double *x, size_t n);

/* Whether every rank got through a step that may fail on some: rc when this rank failed, else the
 * collective's failure, else (err, why) when another rank failed, else MB_OK. */
static MbStatus comm_agree(MbComm *c, MbStatus rc, MbStatus err, const char *why) {
    double failed = rc != MB_OK;
    MbStatus crc = comm_all_reduce_host(c, &failed, 1);
    return rc ? rc : crc ? crc : failed > 0 ? mb_fail(err, "%s", why) : MB_OK;
}
/* the gradient sums, in fp64 (see MbOps.accumulate_f64) */
static MbStatus comm_all_reduce_f64(MbComm *c, double *x, size_t n);
static MbStatus comm_reduce_scatter_f64(MbComm *c, double *shard, const double *x, size_t n);
/* x (n) = every rank's shard (n / world), in rank order */
static MbStatus comm_all_gather(MbComm *c, float *x, const float *shard, size_t n);
/* a rank that stops fails its group: the others leave their collectives instead of waiting */
static void comm_leave(MbComm *c);
static double comm_timeout(double timeout); /* --ddp_timeout in seconds (0: the default) */
static void comm_destroy(MbComm *c);
static MbStatus mb_comm_threads_new(int world, double timeout, MbComm **comms);
static MbStatus mb_comm_tcp_new(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp,
                                double timeout, MbComm **out);
/* NCCL between GPUs (one rank per process, or `world` GPUs driven by one process) */
static MbStatus mb_comm_nccl_new(const char *addr, int port, int rank, int world, int gpu, const MbJobFingerprint *fp,
                                 double timeout, MbComm **out);
static MbStatus mb_comm_nccl_new_all(int world, int gpu0, double timeout, MbComm **comms);
static int mb_device_resolve(int device, int *explicit_choice);

enum { MB_LOSS_SIGMOID, MB_LOSS_HINGE, MB_LOSS_IPO, MB_LOSS_ROBUST };
static const char *const mb_loss_names[] = {"sigmoid", "hinge", "ipo", "robust"};
enum { MB_SCHED_LINEAR, MB_SCHED_COSINE, MB_SCHED_CONSTANT, MB_SCHED_CONSTANT_WITH_WARMUP };
static const char *const mb_sched_names[] = {"linear", "cosine", "constant", "constant_with_warmup"};

/* The metrics TRL logs, in its names; an eval pass prefixes them with eval_. */
enum {
    MET_LOSS, MET_REWARDS_CHOSEN, MET_REWARDS_REJECTED, MET_REWARDS_ACCURACIES, MET_REWARDS_MARGINS,
    MET_LOGPS_CHOSEN, MET_LOGPS_REJECTED, MET_LOGITS_CHOSEN, MET_LOGITS_REJECTED, MET_COUNT
};
static const char *const mb_metric_names[MET_COUNT] = {
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"};

void mb_train_config_defaults(MbTrainConfig *c) {
    memset(c, 0, sizeof *c);
    /* TRL's DPOConfig / transformers' TrainingArguments defaults */
    c->beta = 0.1;
    c->loss_type = MB_LOSS_SIGMOID;
    c->learning_rate = 1e-6;
    c->adam_beta1 = 0.9, c->adam_beta2 = 0.999, c->adam_epsilon = 1e-8;
    c->max_grad_norm = 1.0;
    c->lr_scheduler_type = MB_SCHED_LINEAR;
    c->per_device_train_batch_size = 8, c->per_device_eval_batch_size = 8;
    c->gradient_accumulation_steps = 1;
    c->num_train_epochs = 3;
    c->max_steps = -1;
    c->max_length = 1024, c->max_prompt_length = 512, c->max_completion_length = 0;
    c->seed = 42;
    c->logging_steps = 10, c->save_steps = 500, c->eval_steps = 0;
    c->shuffle = 1;
    c->lora.r = 8, c->lora.alpha = 8, c->lora.targets = (1u << MB_W_Q_PROJ) | (1u << MB_W_K_PROJ);
}

/* The range of each number of a job, as the reference refuses values outside it (torch's AdamW:
 * lr, eps, weight_decay >= 0, betas in [0, 1); TrainingArguments: warmup_ratio in [0, 1]; PEFT:
 * r > 0; torch's Dropout and DataLoader; numpy's seed >= 0) or as medbot needs it (a finite
 * ddp_timeout in whole milliseconds of an int, epochs whose steps fit a long). */
typedef struct {
    const char *name;   /* the option's name (TRL / transformers / PEFT) */
    size_t off;         /* in MbTrainJob */
    int is_int;         /* int, else double */
    double lo, hi;
    int open;           /* MB_LO_OPEN, MB_HI_OPEN */
} MbRange;

#define RANGE_C(field, name, is_int, lo, hi, open) {name, offsetof(MbTrainJob, cfg.field), is_int, lo, hi, open}
#define RANGE_J(field, is_int, lo, hi, open) {#field, offsetof(MbTrainJob, field), is_int, lo, hi, open}
static const MbRange mb_train_ranges[] = {
    RANGE_C(beta, "beta", 0, 0, INFINITY, MB_LO_OPEN),
    RANGE_C(label_smoothing, "label_smoothing", 0, 0, 0.5, 0),
    RANGE_C(learning_rate, "learning_rate", 0, 0, INFINITY, 0),
    RANGE_C(weight_decay, "weight_decay", 0, 0, INFINITY, 0),
    RANGE_C(adam_beta1, "adam_beta1", 0, 0, 1, MB_HI_OPEN),
    RANGE_C(adam_beta2, "adam_beta2", 0, 0, 1, MB_HI_OPEN),
    RANGE_C(adam_epsilon, "adam_epsilon", 0, 0, INFINITY, 0),
    RANGE_C(max_grad_norm, "max_grad_norm", 0, 0, INFINITY, 0),
    RANGE_C(warmup_ratio, "warmup_ratio", 0, 0, 1, 0),
    RANGE_C(warmup_steps, "warmup_steps", 1, 0, INFINITY, 0),
    RANGE_C(per_device_train_batch_size, "per_device_train_batch_size", 1, 1, INFINITY, 0),
    RANGE_C(per_device_eval_batch_size, "per_device_eval_batch_size", 1, 1, INFINITY, 0),
    RANGE_C(gradient_accumulation_steps, "gradient_accumulation_steps", 1, 1, INFINITY, 0),
    RANGE_C(num_train_epochs, "num_train_epochs", 0, 0, 1e9, 0),
    RANGE_C(max_length, "max_length", 1, 1, INFINITY, 0),
    RANGE_C(max_prompt_length, "max_prompt_length", 1, 1, INFINITY, 0),
    RANGE_C(max_completion_length, "max_completion_length", 1, 0, INFINITY, 0),
    RANGE_C(lora.r, "lora_r", 1, 1, INFINITY, 0),
    RANGE_C(lora.alpha, "lora_alpha", 0, 0, INFINITY, MB_LO_OPEN),
    RANGE_C(lora.dropout, "lora_dropout", 0, 0, 1, MB_HI_OPEN),
    RANGE_C(seed, "seed", 1, 0, INFINITY, 0),
    RANGE_C(logging_steps, "logging_steps", 1, 0, INFINITY, 0),
    RANGE_C(save_steps, "save_steps", 1, 0, INFINITY, 0),
    RANGE_C(eval_steps, "eval_steps", 1, 0, INFINITY, 0),
    RANGE_C(eval_split, "eval_split", 0, 0, 1, MB_HI_OPEN),
    RANGE_C(loss_type, "loss_type", 1, 0, 3, 0),
    RANGE_C(lr_scheduler_type, "lr_scheduler_type", 1, 0, 3, 0),
    RANGE_J(threads, 1, 0, INFINITY, 0),
    RANGE_J(nproc, 1, 0, INFINITY, 0),
    RANGE_J(zero_stage, 1, -1, 1, 0),
    RANGE_J(gpu, 1, 0, INFINITY, 0),
    RANGE_J(ddp_timeout, 0, 0, 1e6, 0),
};
#undef RANGE_C
#undef RANGE_J

/* The first number of job outside its range, or NULL; why: "must be ..., got X". */
static const char *train_job_invalid(const MbTrainJob *job, char *why, size_t n) {
    const MbTrainConfig *c = &job->cfg;
    for (size_t i = 0; i < sizeof mb_train_ranges / sizeof *mb_train_ranges; i++) {
        const MbRange *r = &mb_train_ranges[i];
        const char *p = (const char *)job + r->off;
        double x = r->is_int ? (double)*(const int *)(const void *)p : *(const double *)(const void *)p;
        if (range_why(x, r->is_int, r->lo, r->hi, r->open, why, n)) return r->name;
    }
    if (c->loss_type == MB_LOSS_ROBUST && !(c->label_smoothing < 0.5))
        return snprintf(why, n, "must be < 0.5 with the robust loss, got %g", c->label_smoothing), "label_smoothing";
    if (c->max_steps != -1 && c->max_steps < 1) return snprintf(why, n, "must be -1 or >= 1, got %d", c->max_steps), "max_steps";
    if (c->max_steps < 1 && !(c->num_train_epochs > 0))
        return snprintf(why, n, "must be > 0 (or max_steps >= 1), got %g", c->num_train_epochs), "num_train_epochs";
    return NULL;
}

/* train_job_invalid as a failure: "who: name must be ..., got X". */
static MbStatus train_job_check(const char *who, const MbTrainJob *job) {
    char why[160];
    const char *bad = train_job_invalid(job, why, sizeof why);
    return bad ? mb_fail(MB_ERR_ARG, "%s: %s %s", who, bad, why) : MB_OK;
}

/* Per pair: the loss and dloss/dd for d = (pc - rc) - (pr - rr) (TRL's dpo_loss). */
static double dpo_pair_loss(const MbTrainConfig *c, double d, double *dloss_dd) {
    double b = c->beta, e = c->label_smoothing, z = b * d;
    /* log sigmoid(x) = -softplus(-x), computed without overflow */
    double ls_pos = z >= 0 ? -log1p(exp(-z)) : z - log1p(exp(z));   /* log s(z) */
    double ls_neg = ls_pos - z;                                      /* log s(-z) */
    double s_pos = exp(ls_pos), s_neg = exp(ls_neg);                 /* s(z), s(-z) */
    switch (c->loss_type) {
    case MB_LOSS_HINGE:
        *dloss_dd = 1.0 - z > 0 ? -b : 0.0;
        return MB_MAX(0.0, 1.0 - z);
    case MB_LOSS_IPO: {
        double t = d - 1.0 / (2.0 * b);
        *dloss_dd = 2.0 * t;
        return t * t;
    }
    case MB_LOSS_ROBUST:
        *dloss_dd = (-(1.0 - e) * b * s_neg - e * b * s_pos) / (1.0 - 2.0 * e);
        return (-(1.0 - e) * ls_pos + e * ls_neg) / (1.0 - 2.0 * e);
    default:
        *dloss_dd = -(1.0 - e) * b * s_neg + e * b * s_pos;
        return -(1.0 - e) * ls_pos - e * ls_neg;
    }
}

typedef struct {
    MbModel *m;
    MbLora *lo;
    const MbTokenizer *tok;
    MbTrainConfig cfg;
    int sft;                 /* next-token loss on the chosen completion instead of DPO */
    MbDataset train, eval;
    float *ref_cache;        /* (n_train + n_eval, 2) precomputed reference log-probs (summed), or NULL */
    float *exp_avg, *exp_avg_sq; /* (n_params) AdamW moments */
    long step, total_steps;  /* optimizer steps done, to do */
    long micro_done;         /* micro-batches consumed since the start of training */
    long micro_key;          /* the global number of the micro-batch being run (LoRA dropout masks) */
    double tokens_seen;
    int32_t pad;             /* fills the padding (masked; any id works) */
    MbComm *comm;            /* the data-parallel group (a group of one without --nproc) */
    int zero;                /* ZeRO stage 1: AdamW moments sharded over the ranks */
    size_t n_pad, shard;     /* parameters padded to a multiple of the world size; per rank */
    float *gshard;           /* (shard) this rank's slice of the summed gradients (ZeRO) */
    double *acc, *acc_shard; /* (n_pad), (shard): the step's gradient sum in fp64 */
    const char *model_dir, *output_dir;
    uint64_t fingerprint;    /* model + data + settings: checkpoints and the reference cache */
    volatile sig_atomic_t *interrupt; /* MbTrainJob.interrupt */
    const MbProgress *progress; /* MbTrainJob.progress on rank 0, else NULL */
    MbTask steps;            /* the optimizer steps as a task of progress */
    char **made;             /* stb_ds: the output folders this run created (rank 0) */
    int existed[16];         /* which of mb_run_outputs were in the output folder before the run */
} MbTrainer;

/* Runs one micro-batch of P pairs (indices into ds). Writes TRL's metrics for it; with
 * backward, adds d(loss * grad_scale)/d(LoRA params) into the gradients. */
static MbStatus train_microbatch(MbTrainer *tr, const MbDataset *ds, const int *idx, int P, size_t ref_base,
                                 int backward, double grad_scale, double *met) {
    MbTrainConfig *c = &tr->cfg;
    const MbPair **pairs = mb_malloc((size_t)P * sizeof *pairs);
    for (int i = 0; pairs && i < P; i++) pairs[i] = &ds->pairs[idx[i]];
    MbBatch bt;
    memset(&bt, 0, sizeof bt);
    MbStatus rc = pairs ? batch_build(&bt, pairs, P, !tr->sft, c->max_length, tr->pad) : MB_ERR_OOM;
    float *logp = mb_malloc(bt.M * sizeof *logp), *lsum = mb_malloc(bt.M * sizeof *lsum), *g = NULL;
    double *pol = mb_calloc((size_t)bt.B, sizeof *pol), *ref = mb_calloc((size_t)bt.B, sizeof *ref);
    if (!rc && (!logp || !lsum || !pol || !ref)) rc = MB_ERR_OOM;
    if (!rc && !tr->sft) { /* the reference: adapter disabled, no gradient */
        if (tr->ref_cache) {
            for (int b = 0; b < bt.B; b++) ref[b] = tr->ref_cache[2 * (ref_base + (size_t)idx[b % P]) + (b >= P)];
        } else {
            mb_lora_set_enabled(tr->lo, 0);
            rc = model_forward_rows(tr->m, bt.tokens, bt.lens, bt.B, bt.T, bt.pos, bt.target, bt.M, logp, lsum, 0);
            mb_lora_set_enabled(tr->lo, 1);
            for (size_t i = 0; !rc && i < bt.M; i++) ref[bt.seq[i]] += logp[i];
        }
    }
    /* LoRA dropout in the policy's training forward only, a fresh mask per micro-batch */
    model_set_dropout(tr->m, backward ? ((uint64_t)c->seed << 32) + (uint64_t)tr->micro_key + 1 : 0);
    if (!rc) rc = model_forward_rows(tr->m, bt.tokens, bt.lens, bt.B, bt.T, bt.pos, bt.target, bt.M, logp, lsum, backward);
    if (rc) goto done;
    double lsum_c = 0, lsum_r = 0;
    size_t rows_c = 0, rows_r = 0;
    for (size_t i = 0; i < bt.M; i++) {
        pol[bt.seq[i]] += logp[i];
        if (bt.seq[i] < P) lsum_c += lsum[i], rows_c++;
        else lsum_r += lsum[i], rows_r++;
    }
    for (int k = 0; k < MET_COUNT; k++) met[k] = 0;
    if (!(g = mb_calloc(bt.M, sizeof *g))) {
        rc = MB_ERR_OOM;
        goto done;
    }
    if (tr->sft) { /* mean next-token loss over the completion tokens of the micro-batch */
        double nll = 0;
        for (size_t i = 0; i < bt.M; i++) nll -= logp[i], g[i] = (float)(-grad_scale / (double)bt.M);
        met[MET_LOSS] = nll / (double)bt.M;
    } else {
        double V = (double)tr->m->cfg.vocab_size;
        for (int p = 0; p < P; p++) {
            double pc = pol[p], pr = pol[P + p], rc_ = ref[p], rr = ref[P + p];
            double nc = bt.count[p], nr = bt.count[P + p];
            if (c->loss_type == MB_LOSS_IPO) pc /= nc, pr /= nr, rc_ /= nc, rr /= nr; /* per-token average */
            double dd, d = (pc - rc_) - (pr - rr), loss = dpo_pair_loss(c, d, &dd);
            double rw_c = c->beta * (pc - rc_), rw_r = c->beta * (pr - rr);
            met[MET_LOSS] += loss / P;
            met[MET_REWARDS_CHOSEN] += rw_c / P;
            met[MET_REWARDS_REJECTED] += rw_r / P;
            met[MET_REWARDS_ACCURACIES] += (rw_c > rw_r) / (double)P;
            met[MET_REWARDS_MARGINS] += (rw_c - rw_r) / P;
            met[MET_LOGPS_CHOSEN] += pc / P;
            met[MET_LOGPS_REJECTED] += pr / P;
            /* d loss_mean / d logp of each token: dd/P, with the IPO average's 1/count */
            double gc = dd / P * grad_scale / (c->loss_type == MB_LOSS_IPO ? nc : 1.0);
            double gr = -dd / P * grad_scale / (c->loss_type == MB_LOSS_IPO ? nr : 1.0);
            for (size_t i = 0; i < bt.M; i++)
                if (bt.seq[i] == p) g[i] = (float)gc;
                else if (bt.seq[i] == P + p) g[i] = (float)gr;
        }
        met[MET_LOGITS_CHOSEN] = rows_c ? lsum_c / ((double)rows_c * V) : 0;
        met[MET_LOGITS_REJECTED] = rows_r ? lsum_r / ((double)rows_r * V) : 0;
    }
    if (backward) rc = model_backward_rows(tr->m, g);
    for (int b = 0; !rc && b < bt.B; b++) tr->tokens_seen += bt.lens[b];
done:
    model_set_dropout(tr->m, 0);
    free(g), free(logp), free(lsum), free(pol), free(ref), free(pairs);
    batch_free(&bt);
    return rc;
}

/* The learning rate of optimizer step `step` (0-based), as transformers' schedules. */
static double sched_lr(const MbTrainConfig *c, long step, long total, long warmup) {
    double lr0 = c->learning_rate;
    if (c->lr_scheduler_type == MB_SCHED_CONSTANT) return lr0;
    if (step < warmup) return lr0 * (double)step / (double)MB_MAX(1, warmup);
    if (c->lr_scheduler_type == MB_SCHED_CONSTANT_WITH_WARMUP) return lr0;
    double progress = (double)(step - warmup) / (double)MB_MAX(1, total - warmup);
    if (c->lr_scheduler_type == MB_SCHED_COSINE) return lr0 * MB_MAX(0.0, 0.5 * (1.0 + cos(M_PI * progress)));
    return lr0 * MB_MAX(0.0, (double)(total - step) / (double)MB_MAX(1, total - warmup));
}

static long warmup_steps(const MbTrainConfig *c, long total) {
    return c->warmup_steps > 0 ? c->warmup_steps : (long)ceil(c->warmup_ratio * (double)total);
}

/* The pair order of epoch e: the file order, or a permutation drawn from (seed, e). */
static void epoch_order(const MbTrainConfig *c, size_t n, long e, int *order) {
    for (size_t i = 0; i < n; i++) order[i] = (int)i;
    if (!c->shuffle) return;
    MbRng rng;
    mb_rng_seed(&rng, (uint64_t)c->seed * 1000003u + (uint64_t)e);
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)(mb_rng_u64(&rng) % i);
        int t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ull;
    return h;
}

/* Identifies the model files, the tokenized data and every setting that changes the numbers. */
static uint64_t trainer_fingerprint(const MbTrainer *tr) {
    uint64_t h = 0xcbf29ce484222325ull;
    const MbSafetensors *st = tr->m->st;
    if (!st) h = fnv1a(h, "random_init", 11); /* the weights are a function of the seed, hashed below */
    for (ptrdiff_t i = 0; st && i < arrlen(st->files); i++) {
        struct stat sb;
        if (stat(st->files[i], &sb) == 0) {
            long long sz = (long long)sb.st_size, mt = (long long)sb.st_mtime;
            h = fnv1a(h, &sz, sizeof sz), h = fnv1a(h, &mt, sizeof mt);
        }
        h = fnv1a(h, st->maps[i].data, MB_MIN(st->maps[i].size, (size_t)4096));
    }
    const MbDataset *sets[2] = {&tr->train, &tr->eval};
    for (int s = 0; s < 2; s++)
        for (ptrdiff_t i = 0; i < arrlen(sets[s]->pairs); i++) {
            const MbPair *p = &sets[s]->pairs[i];
            h = fnv1a(h, p->prompt, (size_t)p->np * 4), h = fnv1a(h, p->chosen, (size_t)p->nc * 4);
            h = fnv1a(h, p->rejected, (size_t)p->nr * 4), h = fnv1a(h, &p->np, sizeof p->np);
        }
    const MbTrainConfig *c = &tr->cfg;
    int ints[] = {c->max_length, tr->sft, c->lora.r, (int)c->lora.targets, st ? 0 : c->seed};
    h = fnv1a(h, ints, sizeof ints);
    return h;
}

/* ---- reference log-probs computed once (--precompute_ref_log_probs), cached on disk ---- */

static MbStatus precompute_ref(MbTrainer *tr) {
    MbComm *comm = tr->comm;
    int lead = comm_rank(comm) == 0, world = comm_world(comm);
    size_t nt = (size_t)arrlen(tr->train.pairs), ne = (size_t)arrlen(tr->eval.pairs);
    char *path = mb_path_join(tr->output_dir, "ref_logps.safetensors");
    char key[32];
    snprintf(key, sizeof key, "%016llx", (unsigned long long)tr->fingerprint);
    tr->ref_cache = mb_calloc((nt + ne) * 2, sizeof(float));
    double *sum = mb_calloc((nt + ne) * 2 + 1, sizeof(double)); /* the last entry: failed */
    if (!path || !tr->ref_cache || !sum) return free(path), free(sum), MB_ERR_OOM; /* (ref_cache: trainer_free) */
    MbSafetensors *st = NULL;
    int cached = 0, stale = 0;
    if (mb_is_file(path) && mb_safetensors_open(path, &st) == MB_OK) {
        const MbTensorInfo *t = mb_safetensors_find(st, "ref_logps"), *k = mb_safetensors_find(st, key);
        if (t && k && t->dtype == MB_DT_F32 && t->numel == (nt + ne) * 2) { /* the key names a tensor */
            memcpy(tr->ref_cache, t->data, t->nbytes);
            cached = 1;
        } else {
            stale = 1;
        }
        mb_safetensors_close(st);
    }
    MbStatus rc = comm_barrier(comm); /* every rank has looked before rank 0 may write */
    if (rc || cached) {
        if (!rc && lead) mb_say("reference log-probs: %s (cached, key %s)\n", path, key);
        free(path), free(sum);
        return rc;
    }
    if (stale && lead) mb_say("reference log-probs: %s is stale (model, data or settings changed); recomputing\n", path);
    mb_lora_set_enabled(tr->lo, 0);
    const MbDataset *sets[2] = {&tr->train, &tr->eval};
    size_t base = 0, batch = 0, bs = (size_t)tr->cfg.per_device_train_batch_size;
    size_t batches = (nt + bs - 1) / bs + (ne + bs - 1) / bs, mine = batches / (size_t)world + (batches % (size_t)world > 0);
    MbTask task;
    task_begin(&task, tr->progress, "reference log-probs", "batches", 0, (double)mine);
    for (int s = 0; s < 2; s++) {
        size_t n = (size_t)arrlen(sets[s]->pairs);
        for (size_t i0 = 0; i0 < n && !rc; i0 += bs, batch++) {
            if ((int)(batch % (size_t)world) != comm_rank(comm)) continue; /* the batches are dealt to the ranks */
            int P = (int)MB_MIN(bs, n - i0);
            const MbPair **pairs = mb_malloc((size_t)P * sizeof *pairs);
            for (int i = 0; pairs && i < P; i++) pairs[i] = &sets[s]->pairs[i0 + (size_t)i];
            MbBatch bt;
            memset(&bt, 0, sizeof bt);
            rc = pairs ? batch_build(&bt, pairs, P, 1, tr->cfg.max_length, tr->pad) : MB_ERR_OOM;
            float *logp = mb_malloc(bt.M * sizeof *logp), *lsum = mb_malloc(bt.M * sizeof *lsum);
            if (!rc && (!logp || !lsum)) rc = MB_ERR_OOM;
            if (!rc)
                rc = model_forward_rows(tr->m, bt.tokens, bt.lens, bt.B, bt.T, bt.pos, bt.target, bt.M, logp, lsum, 0);
            for (size_t i = 0; !rc && i < bt.M; i++) {
                int b = bt.seq[i];
                sum[2 * (base + i0 + (size_t)(b % P)) + (b >= P)] += logp[i];
            }
            free(logp), free(lsum), free(pairs);
            batch_free(&bt);
            task_add(&task, 1);
        }
        base += n;
    }
    task_end(&task, rc == MB_OK);
    mb_lora_set_enabled(tr->lo, 1);
    sum[(nt + ne) * 2] = rc != MB_OK;
    MbStatus crc = comm_all_reduce_host(comm, sum, (nt + ne) * 2 + 1); /* each pair was computed by one rank */
    for (size_t i = 0; i < (nt + ne) * 2; i++) tr->ref_cache[i] = (float)sum[i];
    double failed = sum[(nt + ne) * 2];
    free(sum);
    if (!rc) rc = crc;
    if (!rc && failed > 0) rc = mb_fail(MB_ERR_ARG, "computing the reference log-probs failed on another rank");
    failed = 0;
    if (!rc && lead) {
        float one = 1;
        MbTensorOut ts[2] = {{"ref_logps", MB_DT_F32, 2, {nt + ne, 2}, tr->ref_cache}, {key, MB_DT_F32, 1, {1}, &one}};
        rc = mb_safetensors_write(path, ts, 2, NULL);
        if (!rc) mb_say("reference log-probs: computed for %zu pairs, cached in %s (key %s)\n", nt + ne, path, key);
        failed = rc != MB_OK;
    }
    if (!(crc = comm_all_reduce_host(comm, &failed, 1)) && !rc && failed > 0)
        rc = mb_fail(MB_ERR_ARG, "rank 0 could not write the reference log-probs");
    if (!rc) rc = crc;
    free(path);
    return rc;
}

/* ---- checkpoints: OUTPUT/checkpoint-N/ written as a temporary folder and renamed ---- */

/* Rank 0 writes the checkpoint; with ZeRO the moment slices are gathered first. Every rank
 * learns whether it worked. */
static MbStatus checkpoint_write(MbTrainer *tr, const float *exp_avg, const float *exp_avg_sq) {
    char final[4096], tmp[4200];
    snprintf(final, sizeof final, "%s/checkpoint-%ld", tr->output_dir, tr->step);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", final, (long)getpid());
    mb_rmdir_r(tmp);
    if (mkdir(tmp, 0755) != 0) return mb_fail(MB_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    MbStatus rc = mb_lora_save(tr->lo, tmp, tr->model_dir);
    if (!rc) rc = tokenizer_copy_files(tr->tok, tmp);
    if (!rc) {
        char *p = mb_path_join(tmp, "optimizer.safetensors");
        size_t n = tr->lo->n_params;
        MbTensorOut ts[2] = {{"exp_avg", MB_DT_F32, 1, {n}, exp_avg}, {"exp_avg_sq", MB_DT_F32, 1, {n}, exp_avg_sq}};
        rc = p ? mb_safetensors_write(p, ts, 2, NULL) : MB_ERR_OOM;
        free(p);
    }
    if (!rc) {
        char *j = NULL;
        sb_printf(&j, "{\n  \"global_step\": %ld,\n  \"micro_batches_done\": %ld,\n  \"total_steps\": %ld,\n"
                  "  \"tokens_seen\": %.0f,\n  \"fingerprint\": \"%016llx\",\n  \"seed\": %d,\n  \"world_size\": %d,\n"
                  "  \"zero_stage\": %d\n}\n",
                  tr->step, tr->micro_done, tr->total_steps, tr->tokens_seen, (unsigned long long)tr->fingerprint,
                  tr->cfg.seed, comm_world(tr->comm), tr->zero);
        char *p = mb_path_join(tmp, "trainer_state.json");
        rc = p ? mb_write_file(p, j, strlen(j)) : MB_ERR_OOM;
        free(p);
        arrfree(j);
    }
    /* a checkpoint of the same step already there is moved aside first, so one of them is whole at
     * every moment (a kill leaves at worst FINAL.old.PID, which a resume removes as stale) */
    char old[4300];
    snprintf(old, sizeof old, "%s.old.%ld", final, (long)getpid());
    struct stat sb;
    int aside = !rc && lstat(final, &sb) == 0;
    if (aside && rename(final, old) != 0) rc = mb_fail(MB_ERR_IO, "%s: cannot move aside: %s", final, strerror(errno));
    if (!rc && rename(tmp, final) != 0) {
        rc = mb_fail(MB_ERR_IO, "%s: cannot rename to %s: %s", tmp, final, strerror(errno));
        if (aside) rename(old, final);
    }
    if (rc) mb_rmdir_r(tmp);
    else if (aside) mb_remove_path(old);
    return rc;
}

static MbStatus checkpoint_save(MbTrainer *tr) {
    MbComm *comm = tr->comm;
    MbOps *ops = tr->m->ops;
    float *m1 = tr->exp_avg, *m2 = tr->exp_avg_sq;
    size_t bytes = tr->n_pad * sizeof(float);
    MbStatus rc = MB_OK;
    if (tr->zero && comm_world(comm) > 1) { /* every rank's slice, in one file */
        m1 = ops->alloc(ops, bytes), m2 = ops->alloc(ops, bytes);
        if (!m1 || !m2) rc = mb_ops_oom(ops); /* (this rank leaves; train_rank releases the others) */
        if (!rc) rc = comm_all_gather(comm, m1, tr->exp_avg, tr->n_pad);
        if (!rc) rc = comm_all_gather(comm, m2, tr->exp_avg_sq, tr->n_pad);
        if (rc) {
            if (m1) ops->free(ops, m1);
            if (m2) ops->free(ops, m2);
            return rc;
        }
    }
    if (!rc && comm_rank(comm) == 0) {
        float *h1 = mb_malloc(bytes), *h2 = mb_malloc(bytes);
        if (h1 && h2) ops->to_host(ops, h1, m1, bytes), ops->to_host(ops, h2, m2, bytes);
        rc = !h1 || !h2 ? MB_ERR_OOM : mb_ops_status(ops);
        if (!rc) rc = checkpoint_write(tr, h1, h2);
        free(h1), free(h2);
    }
    if (m1 != tr->exp_avg) ops->free(ops, m1), ops->free(ops, m2);
    char why[64];
    snprintf(why, sizeof why, "rank 0 could not write checkpoint-%ld", tr->step);
    return comm_agree(comm, rc, MB_ERR_IO, why);
}

static MbStatus checkpoint_load(MbTrainer *tr, const char *dir) {
    char *state = mb_path_join(dir, "trainer_state.json"), *opt = mb_path_join(dir, "optimizer.safetensors");
    MbJsonDoc doc;
    memset(&doc, 0, sizeof doc);
    MbLora *lo = NULL;
    MbSafetensors *st = NULL;
    MbStatus rc = !state || !opt ? MB_ERR_OOM : mb_is_dir(dir) ? MB_OK : mb_fail(MB_ERR_IO, "%s: no such checkpoint folder", dir);
    if (!rc) rc = json_read_file(state, &doc);
    if (!rc) {
        const MbJson *r = json_root(&doc), *gs = json_get(&doc, r, "global_step"),
                     *mb = json_get(&doc, r, "micro_batches_done"), *fp = json_get(&doc, r, "fingerprint"),
                     *tk = json_get(&doc, r, "tokens_seen");
        char want[32];
        snprintf(want, sizeof want, "%016llx", (unsigned long long)tr->fingerprint);
        if (!gs || !gs->is_int || gs->i < 0 || !mb || !mb->is_int || mb->i < 0 || !fp || fp->kind != MB_JSON_STRING)
            rc = mb_fail(MB_ERR_FORMAT, "%s: incomplete trainer state --> the checkpoint is corrupt", state);
        else if (strcmp(json_str(&doc, fp), want))
            rc = mb_fail(MB_ERR_ARG, "%s: made with another model, data or settings (fingerprint %s, this run %s)",
                         state, json_str(&doc, fp), want);
        else {
            tr->step = (long)gs->i;
            tr->micro_done = (long)mb->i;
            tr->tokens_seen = tk && tk->kind == MB_JSON_NUMBER ? tk->num : 0;
        }
    }
    if (!rc) rc = mb_lora_load(tr->m, dir, &lo);
    if (!rc && (lo->r != tr->lo->r || lo->targets != tr->lo->targets || lo->n_params != tr->lo->n_params))
        rc = mb_fail(MB_ERR_ARG, "%s: adapter shape differs from this run's settings", dir);
    if (!rc) rc = mb_safetensors_open(opt, &st);
    if (!rc) {
        const MbTensorInfo *a = mb_safetensors_find(st, "exp_avg"), *b = mb_safetensors_find(st, "exp_avg_sq");
        size_t np = tr->lo->n_params;
        if (!a || !b || a->dtype != MB_DT_F32 || b->dtype != MB_DT_F32 || a->numel != np || b->numel != np)
            rc = mb_fail(MB_ERR_FORMAT, "%s: optimizer moments missing or of the wrong size --> the checkpoint is "
                         "corrupt", opt);
        else { /* the file holds every slice: any world size can take its own */
            MbOps *ops = tr->m->ops;
            size_t off = tr->zero ? (size_t)comm_rank(tr->comm) * tr->shard : 0, len = tr->zero ? tr->shard : tr->n_pad;
            float *h1 = mb_calloc(len + 1, sizeof(float)), *h2 = mb_calloc(len + 1, sizeof(float));
            float *hp = h1 && h2 ? lora_download(lo, lo->params) : NULL;
            for (size_t i = 0; hp && i < len && off + i < np; i++) {
                memcpy(&h1[i], (const char *)a->data + 4 * (off + i), 4);
                memcpy(&h2[i], (const char *)b->data + 4 * (off + i), 4);
            }
            if (hp) {
                ops->from_host(ops, tr->exp_avg, h1, len * sizeof(float));
                ops->from_host(ops, tr->exp_avg_sq, h2, len * sizeof(float));
                ops->from_host(ops, tr->lo->params, hp, np * sizeof(float));
            }
            rc = !h1 || !h2 ? MB_ERR_OOM : !hp ? mb_ops_oom(lo->ops) : mb_ops_status(ops);
            free(h1), free(h2), free(hp);
        }
    }
    mb_safetensors_close(st);
    mb_lora_free(lo);
    json_free(&doc);
    free(state), free(opt);
    return rc;
}

/* ---- logging: metrics.jsonl, a line per logging step, a progress bar, an SVG at the end ---- */

typedef struct {
    long step;
    double epoch, lr, grad_norm, met[MET_COUNT];
} MbLogRow;

static MbStatus log_append(const MbTrainer *tr, const MbLogRow *r, const char *prefix, int eval) {
    char *j = NULL;
    sb_printf(&j, "{\"step\": %ld, \"epoch\": ", r->step); /* a NaN or inf value is written null */
    sb_json_number(&j, r->epoch, 6);
    if (!eval) {
        sb_printf(&j, ", \"learning_rate\": ");
        sb_json_number(&j, r->lr, 10);
        sb_printf(&j, ", \"grad_norm\": ");
        sb_json_number(&j, r->grad_norm, 10);
    }
    for (int k = 0; k < (tr->sft ? 1 : MET_COUNT); k++) {
        sb_printf(&j, ", \"%s%s\": ", prefix, mb_metric_names[k]);
        sb_json_number(&j, r->met[k], 10);
    }
    sb_printf(&j, "}\n");
    char *p = mb_path_join(tr->output_dir, "metrics.jsonl");
    FILE *f = p ? fopen(p, "ab") : NULL;
    int ok = f && fputs(j, f) >= 0;
    if (f && fclose(f) != 0) ok = 0;
    MbStatus rc = ok ? MB_OK : !p ? MB_ERR_OOM : mb_fail(MB_ERR_IO, "%s: cannot append the metrics: %s", p, strerror(errno));
    free(p);
    arrfree(j);
    return rc;
}

/* Resuming at step: metrics.jsonl keeps the lines of steps <= step (the ones after it will be
 * logged again) and loses a line a kill cut short. */
static MbStatus metrics_cut(const char *out, long step) {
    char *p = mb_path_join(out, "metrics.jsonl"), *text = NULL, *keep = NULL;
    size_t n, at = 0;
    int line = 0, dropped = 0;
    MbStatus rc = !p ? MB_ERR_OOM : mb_is_file(p) ? mb_read_file(p, &text, &n) : MB_OK;
    const char *l;
    size_t len;
    while (text && !rc && jsonl_next(text, n, &at, &line, &l, &len)) {
        MbJsonDoc d;
        int ok = json_parse(p, l, len, &d) == MB_OK;
        const MbJson *st = ok ? json_get(&d, json_root(&d), "step") : NULL;
        if (st && st->kind == MB_JSON_NUMBER && st->num <= (double)step) sb_printf(&keep, "%.*s\n", (int)len, l);
        else dropped++;
        if (ok) json_free(&d);
    }
    if (text && dropped) rc = mb_write_file(p, keep ? keep : "", keep ? strlen(keep) : 0);
    free(p), free(text);
    arrfree(keep);
    return rc;
}

static void log_print(const MbTrainer *tr, const MbLogRow *r, const char *prefix, int eval) {
    char line[400];
    int n = snprintf(line, sizeof line, "%sstep %ld/%ld epoch %.2f %sloss %.4f", eval ? "eval " : "", r->step,
                     tr->total_steps, r->epoch, prefix, r->met[MET_LOSS]);
    if (!tr->sft && n > 0 && (size_t)n < sizeof line)
        n += snprintf(line + n, sizeof line - (size_t)n, " %srewards/accuracies %.3f %srewards/margins %.4f", prefix,
                      r->met[MET_REWARDS_ACCURACIES], prefix, r->met[MET_REWARDS_MARGINS]);
    if (!eval && n > 0 && (size_t)n < sizeof line)
        snprintf(line + n, sizeof line - (size_t)n, " lr %.3g grad_norm %.4f", r->lr, r->grad_norm);
    mb_say("%s\n", line);
}

/* The optimizer steps as a task of the job's progress: "training [####....] 12/36 steps (33%), ..." */
static void progress_steps(MbTrainer *tr, double loss, double acc, double t0) {
    char note[96], acc_text[24] = "";
    if (!tr->sft) snprintf(acc_text, sizeof acc_text, " acc %.2f", acc);
    snprintf(note, sizeof note, "loss %.4f%s, %.0f tok/s", loss, acc_text, tr->tokens_seen / MB_MAX(mb_now() - t0, 1e-9));
    tr->steps.ev.note = note;
    tr->steps.ev.done = (double)tr->step;
    task_send(&tr->steps, MB_PROGRESS_STEP);
    tr->steps.ev.note = NULL;
}

/* ---- the chart: training.svg, drawn from metrics.jsonl ---- */

/* A tick spacing of 1, 2 or 5 x 10^k that cuts span into about n intervals. */
static double chart_tick(double span, int n) {
    double raw = span / n, p = pow(10, floor(log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

/* A tick value v printed with as many digits as the spacing step needs ("0.25", "1e-05", "120"). */
static void chart_number(char *buf, size_t cap, double v, double step) {
    if (fabs(v) < step * 1e-6) v = 0;
    int digits = v == 0 ? 1 : (int)floor(log10(fabs(v))) - (int)floor(log10(step)) + 1;
    snprintf(buf, cap, "%.*g", MB_MIN(MB_MAX(digits, 1), 15), v);
}

/* One line of a panel: its metrics.jsonl key, its legend label and colour, its points. */
typedef struct {
    const char *key, *label, *color;
    double *step, *value; /* stb_ds arrays, in the file's order */
} MbChartSeries;

/* One panel at (left, top): a title, a legend, gridlines with tick values, the series over steps
 * [0, last]. Data maps into the frame less a margin of 6 px (a point on a tick stays off the
 * frame); that area and its ranges are written as data- attributes, so that a program can map
 * the points back to steps and values. */
static void chart_panel(char **s, const char *title, const MbChartSeries *ser, int ns, double last, int left, int top) {
    int fx = left + 64, fy = top + 36, fw = 400, fh = 200;  /* the frame */
    int x0 = fx + 6, y0 = fy + 6, w = fw - 12, h = fh - 12; /* where the data goes */
    double lo = INFINITY, hi = -INFINITY;
    int shown = 0;
    for (int k = 0; k < ns; k++) {
        shown += arrlen(ser[k].value) > 0;
        for (ptrdiff_t i = 0; i < arrlen(ser[k].value); i++) lo = MB_MIN(lo, ser[k].value[i]), hi = MB_MAX(hi, ser[k].value[i]);
    }
    if (lo > hi) lo = 0, hi = 1; /* nothing logged */
    if (hi - lo <= 1e-9 * MB_MAX(fabs(hi), 1e-300)) lo -= fabs(lo) > 0 ? fabs(lo) / 10 : 1, hi = 2 * hi - lo;
    double ys = chart_tick(hi - lo, 5), xs = MB_MAX(1, chart_tick(last, 6));
    lo = floor(lo / ys) * ys, hi = ceil(hi / ys) * ys;
    double sx = w / last, sy = h / (hi - lo); /* pixels per step, per unit of value */
    sb_printf(s, "<g data-panel=\"%s\" data-plot=\"%d %d %d %d\" data-steps=\"0 %.17g\" data-values=\"%.17g %.17g\">\n",
              title, x0, y0, w, h, last, lo, hi);
    sb_printf(s, "<text x=\"%d\" y=\"%d\" font-weight=\"bold\">%s</text>\n", fx, top + 18, title);
    char num[64];
    for (int i = 0; lo + i * ys <= hi + ys * 1e-6; i++) { /* y gridlines with their values */
        double y = y0 + h - i * ys * sy;
        chart_number(num, sizeof num, lo + i * ys, ys);
        sb_printf(s, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#e5e5e5\"/>", fx, fx + fw, y, y);
        sb_printf(s, "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\" fill=\"#555\">%s</text>\n", fx - 6, y + 4, num);
    }
    for (double t = 0; t <= last + 1e-9; t += xs) { /* x gridlines at steps, with their numbers */
        double x = x0 + t * sx;
        sb_printf(s, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#e5e5e5\"/>", x, x, fy, fy + fh + 4);
        sb_printf(s, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\" fill=\"#555\">%.0f</text>\n", x, fy + fh + 17, t);
    }
    sb_printf(s, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#999\"/>\n", fx, fy, fw, fh);
    sb_printf(s, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\" fill=\"#555\">step</text>\n", fx + fw, fy + fh + 32);
    for (int k = 0, lx = fx + fw - 110 * shown; k < ns; k++) {
        size_t n = (size_t)arrlen(ser[k].step);
        if (!n) continue;
        double v = ser[k].value[n - 1]; /* the legend: the series' colour, name and last value */
        chart_number(num, sizeof num, v, fabs(v) / 1000);
        sb_printf(s, "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>", lx, lx + 16,
                  top + 14, top + 14, ser[k].color);
        sb_printf(s, "<text x=\"%d\" y=\"%d\">%s %s</text>\n", lx + 20, top + 18, ser[k].label, num);
        lx += 110;
        sb_printf(s, "<polyline data-series=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"", ser[k].key,
                  ser[k].color);
        for (size_t i = 0; i < n; i++)
            sb_printf(s, "%s%.2f,%.2f", i ? " " : "", x0 + ser[k].step[i] * sx, y0 + h - (ser[k].value[i] - lo) * sy);
        sb_printf(s, "\"/>\n");
        for (size_t i = 0; n <= 40 && i < n; i++) /* a sparse series (eval, a short run): a dot per point */
            sb_printf(s, "<circle cx=\"%.2f\" cy=\"%.2f\" r=\"2.5\" fill=\"%s\"/>%s", x0 + ser[k].step[i] * sx,
                      y0 + h - (ser[k].value[i] - lo) * sy, ser[k].color, i + 1 == n ? "\n" : "");
    }
    sb_printf(s, "</g>\n");
}

/* training.svg: the whole run's metrics.jsonl (the lines before a resume too) as TensorBoard
 * shows them: one panel per metric (loss, rewards/margins, rewards/accuracies; SFT: loss) with
 * its train and eval series over the optimizer step, and the learning rate. A value that was
 * not finite (null) is left out. */
static MbStatus write_svg(const MbTrainer *tr) {
    static const char *const panels[4][2] = {{"loss", "eval_loss"},
                                             {"rewards/margins", "eval_rewards/margins"},
                                             {"rewards/accuracies", "eval_rewards/accuracies"},
                                             {"learning_rate", NULL}};
    int show[4] = {0, 1, 2, 3}, np = tr->sft ? 2 : 4;
    if (tr->sft) show[1] = 3;
    MbChartSeries ser[4][2];
    memset(ser, 0, sizeof ser);
    for (int p = 0; p < 4; p++)
        for (int k = 0; k < 2; k++) {
            ser[p][k].key = panels[p][k], ser[p][k].label = k ? "eval" : "train";
            ser[p][k].color = k ? "#ff7f0e" : "#1f77b4";
        }
    char *path = mb_path_join(tr->output_dir, "metrics.jsonl"), *text = NULL, *s = NULL;
    size_t n = 0, at = 0, len;
    int line = 0;
    const char *l;
    MbStatus rc = !path ? MB_ERR_OOM : mb_read_file(path, &text, &n);
    double last = 1;
    while (!rc && jsonl_next(text, n, &at, &line, &l, &len)) {
        MbJsonDoc d;
        if (json_parse(path, l, len, &d)) continue; /* (a line a kill cut short) */
        const MbJson *st = json_get(&d, json_root(&d), "step");
        int ok = st && st->kind == MB_JSON_NUMBER && isfinite(st->num) && st->num >= 0;
        for (int p = 0; p < 4 && ok; p++)
            for (int k = 0; k < 2 && panels[p][k]; k++) {
                const MbJson *v = json_get(&d, json_root(&d), panels[p][k]);
                if (!v || v->kind != MB_JSON_NUMBER || !isfinite(v->num)) continue;
                arrput(ser[p][k].step, st->num);
                arrput(ser[p][k].value, v->num);
                last = MB_MAX(last, st->num);
            }
        json_free(&d);
    }
    int W = 960, H = 280 * ((np + 1) / 2);
    sb_printf(&s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
              "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    for (int i = 0; i < np; i++) chart_panel(&s, panels[show[i]][0], ser[show[i]], 2, last, 480 * (i % 2), 280 * (i / 2));
    sb_printf(&s, "</svg>\n");
    free(path);
    path = mb_path_join(tr->output_dir, "training.svg");
    if (!rc) rc = path ? mb_write_file(path, s, strlen(s)) : MB_ERR_OOM;
    for (int p = 0; p < 4; p++)
        for (int k = 0; k < 2; k++) arrfree(ser[p][k].step), arrfree(ser[p][k].value);
    free(path), free(text);
    arrfree(s);
    return rc;
}

/* Evaluation over the eval pairs in order: metrics are means over batches (TRL), the loss is
 * the mean over pairs. The batches are dealt to the ranks in turn. */
static MbStatus train_evaluate(MbTrainer *tr, double *met) {
    size_t n = (size_t)arrlen(tr->eval.pairs), nt = (size_t)arrlen(tr->train.pairs);
    int bs = tr->cfg.per_device_eval_batch_size, *idx = mb_malloc((size_t)bs * sizeof *idx);
    MbComm *comm = tr->comm;
    double bm[MET_COUNT] = {0};
    double sums[MET_COUNT + 3] = {0}; /* metric sums, loss x pairs, batches, failed */
    MbStatus rc = idx ? MB_OK : MB_ERR_OOM;
    size_t b = 0;
    for (size_t i0 = 0; i0 < n; i0 += (size_t)bs, b++) {
        if ((int)(b % (size_t)comm_world(comm)) != comm_rank(comm) || rc) continue;
        int P = (int)MB_MIN((size_t)bs, n - i0);
        for (int i = 0; i < P; i++) idx[i] = (int)(i0 + (size_t)i);
        rc = train_microbatch(tr, &tr->eval, idx, P, nt, 0, 1.0, bm);
        for (int k = 0; k < MET_COUNT; k++) sums[k] += bm[k];
        sums[MET_COUNT] += bm[MET_LOSS] * P;
        sums[MET_COUNT + 1] += 1;
    }
    sums[MET_COUNT + 2] = rc != MB_OK;
    MbStatus crc = comm_all_reduce_host(comm, sums, MET_COUNT + 3);
    for (int k = 0; k < MET_COUNT; k++) met[k] = sums[k] / MB_MAX(sums[MET_COUNT + 1], 1.0);
    met[MET_LOSS] = sums[MET_COUNT] / (double)MB_MAX(n, 1);
    if (!rc) rc = crc;
    if (!rc && sums[MET_COUNT + 2] > 0) rc = mb_fail(MB_ERR_ARG, "evaluation failed on another rank");
    free(idx);
    return rc;
}

/* The summed gradient of this step, clipped, applied with AdamW. Without ZeRO every rank sums
 * the whole gradient and updates every parameter; with ZeRO-1 each rank gets the sum of its
 * slice (reduce-scatter), updates that slice with its slice of the moments, and the slices are
 * all-gathered. *norm: the global gradient norm before clipping (not finite: nothing applied). */
static MbStatus optimizer_step(MbTrainer *tr, double lr, double *norm) {
    MbTrainConfig *c = &tr->cfg;
    MbOps *ops = tr->m->ops;
    MbComm *comm = tr->comm;
    int world = comm_world(comm), rank = comm_rank(comm);
    float *p = tr->lo->params, *g = tr->lo->grads;
    size_t off = (size_t)rank * tr->shard, len = tr->n_pad;
    float *gs = g;
    MbStatus rc = MB_OK;
    *norm = 0;
    if (tr->zero) {
        rc = comm_reduce_scatter_f64(comm, tr->acc_shard, tr->acc, tr->n_pad);
        ops->from_f64(ops, tr->gshard, tr->acc_shard, tr->shard);
        gs = tr->gshard, len = tr->shard;
    } else {
        if (world > 1) rc = comm_all_reduce_f64(comm, tr->acc, tr->n_pad);
        ops->from_f64(ops, g, tr->acc, tr->n_pad);
    }
    double ss = ops->sumsq(ops, gs, len);
    if (!rc) rc = mb_ops_status(ops);
    if (!rc && tr->zero && world > 1) { /* the slices' sums of squares, added in fp64 */
        double *one = mb_calloc((size_t)world, sizeof(double));
        if (!one) return MB_ERR_OOM;
        one[rank] = ss;
        rc = comm_all_reduce_host(comm, one, (size_t)world);
        ss = 0;
        for (int r = 0; r < world; r++) ss += one[r];
        free(one);
    }
    if (rc) return rc;
    *norm = sqrt(ss);
    if (!isfinite(*norm)) return MB_OK;
    if (c->max_grad_norm > 0) { /* torch.nn.utils.clip_grad_norm_ */
        double coef = c->max_grad_norm / (*norm + 1e-6);
        if (coef < 1.0) ops->scale(ops, gs, (float)coef, len);
    }
    ops->adamw(ops, tr->zero ? p + off : p, gs, tr->exp_avg, tr->exp_avg_sq, len, lr, c->adam_beta1, c->adam_beta2,
               c->adam_epsilon, c->weight_decay, tr->step + 1);
    if ((rc = mb_ops_status(ops))) return rc;
    return tr->zero ? comm_all_gather(comm, p, p + off, tr->n_pad) : MB_OK;
}

/* The training loop of transformers' Trainer: epochs of micro-batches, grouped into optimizer
 * steps of gradient_accumulation_steps x world micro-batches (the last of an epoch may be
 * shorter; the loss is divided by the micro-batches the step has). Rank r runs its contiguous
 * share of each step's micro-batches, so any world size sees the batches one rank would see. */
static MbStatus trainer_run(MbTrainer *tr, const char *resume) {
    MbTrainConfig *c = &tr->cfg;
    MbOps *ops = tr->m->ops;
    MbComm *comm = tr->comm;
    int lead = comm_rank(comm) == 0;
    size_t n = (size_t)arrlen(tr->train.pairs);
    int bs = c->per_device_train_batch_size, ga = c->gradient_accumulation_steps * comm_world(comm);
    long mb_per_epoch = (long)((n + (size_t)bs - 1) / (size_t)bs);
    long steps_per_epoch = MB_MAX(1, (mb_per_epoch + ga - 1) / ga);
    tr->total_steps = c->max_steps > 0 ? c->max_steps : (long)ceil(c->num_train_epochs * (double)steps_per_epoch);
    long warmup = warmup_steps(c, tr->total_steps);
    size_t moments = tr->zero ? tr->shard : tr->n_pad;
    tr->exp_avg = ops->alloc(ops, moments * sizeof(float));
    tr->exp_avg_sq = ops->alloc(ops, moments * sizeof(float));
    if (!tr->exp_avg || !tr->exp_avg_sq) return mb_ops_oom(ops); /* (trainer_free frees what came) */
    MbStatus rc = MB_OK;
    if (resume && (rc = checkpoint_load(tr, resume))) return rc;
    long saved = 0; /* the step whose checkpoint is in OUT (0: none) */
    if (resume) { /* rank 0 keeps the files: metrics.jsonl cut to the step; is OUT's checkpoint this one? */
        double flags[2] = {0, 0};
        char *ck = mb_malloc(strlen(tr->output_dir) + 40);
        if (!ck) return MB_ERR_OOM;
        sprintf(ck, "%s/checkpoint-%ld", tr->output_dir, tr->step);
        if (lead && (rc = metrics_cut(tr->output_dir, tr->step))) flags[0] = 1;
        if (lead) flags[1] = mb_is_dir(ck);
        free(ck);
        MbStatus crc = comm_all_reduce_host(comm, flags, 2);
        if (!rc) rc = crc;
        if (!rc && flags[0] > 0) rc = mb_fail(MB_ERR_ARG, "training stopped: rank 0 could not cut metrics.jsonl");
        if (rc) return rc;
        saved = flags[1] > 0 ? tr->step : 0;
        if (lead) mb_say("resumed from %s at step %ld\n", resume, tr->step);
    }
    MbStatus log_rc = MB_OK; /* rank 0 could not write metrics.jsonl: every rank stops at the next step */
    int *order = mb_malloc(n * sizeof *order), *idx = mb_malloc((size_t)bs * sizeof *idx);
    if (!order || !idx) return free(order), free(idx), MB_ERR_OOM;
    MbLogRow win;
    memset(&win, 0, sizeof win);
    int win_micro = 0, win_steps = 0;
    double win_loss = 0;
    double t0 = mb_now(), met[MET_COUNT] = {0};
    if (lead) task_begin(&tr->steps, tr->progress, "training", "steps", (double)tr->step, (double)tr->total_steps);
    long epoch = tr->micro_done / mb_per_epoch;
    epoch_order(c, n, epoch, order);
    while (!rc && tr->step < tr->total_steps) {
        long in_epoch = tr->micro_done % mb_per_epoch;
        if (in_epoch == 0 && tr->micro_done / mb_per_epoch != epoch) epoch_order(c, n, epoch = tr->micro_done / mb_per_epoch, order);
        long count = MB_MIN((long)ga, mb_per_epoch - in_epoch); /* micro-batches of this optimizer step */
        size_t mine0, mine1;
        mb_split((size_t)count, comm_rank(comm), comm_world(comm), &mine0, &mine1);
        ops->fill_f64(ops, tr->acc, tr->n_pad);
        double sums[MET_COUNT + 3] = {0}; /* metric sums over the step's micro-batches, tokens, failed, stopped */
        double tokens0 = tr->tokens_seen;
        for (long k = (long)mine0; k < (long)mine1 && !rc; k++) {
            if (tr->interrupt && *tr->interrupt) break; /* the step is abandoned: its gradient is dropped */
            long mbi = in_epoch + k;
            int P = (int)MB_MIN((size_t)bs, n - (size_t)mbi * (size_t)bs);
            for (int i = 0; i < P; i++) idx[i] = order[(size_t)mbi * (size_t)bs + (size_t)i];
            tr->micro_key = tr->micro_done + k; /* the global micro-batch number keys LoRA dropout */
            ops->fill(ops, tr->lo->grads, 0.0f, tr->n_pad); /* this micro-batch's gradient alone ... */
            rc = train_microbatch(tr, &tr->train, idx, P, 0, 1, 1.0 / (double)count, met);
            ops->accumulate_f64(ops, tr->acc, tr->lo->grads, tr->n_pad); /* ... added to the step's in fp64 */
            for (int q = 0; q < MET_COUNT; q++) sums[q] += met[q];
        }
        sums[MET_COUNT] = tr->tokens_seen - tokens0;
        sums[MET_COUNT + 1] = rc != MB_OK || log_rc != MB_OK;
        if (tr->interrupt && *tr->interrupt) sums[MET_COUNT + 2] = 1;
        MbStatus crc = comm_all_reduce_host(comm, sums, MET_COUNT + 3); /* also tells every rank when one failed or stopped */
        if (crc) { /* the group failed (a rank died, hangs or failed): this step stops here, unsaved */
            if (!rc) rc = crc;
            break;
        }
        tr->tokens_seen = tokens0 + sums[MET_COUNT];
        if (!rc && log_rc) rc = log_rc;
        if (!rc && sums[MET_COUNT + 1] > 0) rc = mb_fail(MB_ERR_ARG, "training stopped: another rank failed");
        if (!rc && sums[MET_COUNT + 2] > 0) {
            tr->tokens_seen = tokens0;
            rc = MB_INTERRUPTED;
            break;
        }
        if (!rc && !isfinite(sums[MET_LOSS]))
            rc = mb_fail(MB_ERR_ARG, "training stopped at step %ld: the loss is %g --> lower --learning_rate; "
                         "the last checkpoint (if any) is intact", tr->step + 1, sums[MET_LOSS]);
        if (rc) break;
        double step_met[MET_COUNT];
        for (int q = 0; q < MET_COUNT; q++) step_met[q] = sums[q] / (double)count, win.met[q] += sums[q];
        win_micro += (int)count;
        double lr = sched_lr(c, tr->step, tr->total_steps, warmup), norm;
        if ((rc = optimizer_step(tr, lr, &norm))) break;
        if (!isfinite(norm)) {
            rc = mb_fail(MB_ERR_ARG, "training stopped at step %ld: the gradient norm is %g; the last checkpoint (if "
                         "any) is intact", tr->step + 1, norm);
            break;
        }
        tr->step++;
        tr->micro_done += count;
        win_steps++;
        win_loss += step_met[MET_LOSS];
        MbLogRow row = {tr->step, (double)tr->micro_done / (double)mb_per_epoch, lr, norm, {0}};
        for (int q = 0; q < MET_COUNT; q++) row.met[q] = step_met[q];
        if (lead) progress_steps(tr, step_met[MET_LOSS], step_met[MET_REWARDS_ACCURACIES], t0);
        if ((c->logging_steps > 0 && tr->step % c->logging_steps == 0) || tr->step == tr->total_steps) {
            /* TRL: stored metrics averaged over the micro-batches since the last log */
            MbLogRow lr_row = row;
            for (int q = 0; q < MET_COUNT; q++) lr_row.met[q] = win.met[q] / MB_MAX(win_micro, 1);
            lr_row.met[MET_LOSS] = win_loss / MB_MAX(win_steps, 1); /* Trainer: mean over the steps */
            if (lead && !log_rc) log_rc = log_append(tr, &lr_row, "", 0);
            if (lead) log_print(tr, &lr_row, "", 0);
            memset(&win, 0, sizeof win);
            win_micro = win_steps = 0;
            win_loss = 0;
        }
        int last = tr->step == tr->total_steps;
        if (arrlen(tr->eval.pairs) && ((c->eval_steps > 0 && tr->step % c->eval_steps == 0) || last)) {
            double em[MET_COUNT];
            if ((rc = train_evaluate(tr, em))) break;
            MbLogRow er = row;
            memcpy(er.met, em, sizeof em);
            if (lead && !log_rc) log_rc = log_append(tr, &er, "eval_", 1);
            if (lead) log_print(tr, &er, "eval_", 1);
            if (lead && last && !tr->sft)
                mb_say("held-out eval_rewards/accuracies %.3f (%zu pairs)\n", em[MET_REWARDS_ACCURACIES],
                       (size_t)arrlen(tr->eval.pairs));
        }
        if ((c->save_steps > 0 && tr->step % c->save_steps == 0) || last) rc = checkpoint_save(tr), saved = tr->step;
    }
    if (lead) task_end(&tr->steps, rc == MB_OK);
    if (rc == MB_INTERRUPTED) { /* the last finished step is saved, unless it already was */
        MbStatus sv = tr->step > saved ? checkpoint_save(tr) : MB_OK;
        if (sv) rc = sv;
        else if (tr->step > 0)
            rc = mb_fail(MB_INTERRUPTED, "interrupted after step %ld of %ld: %s/checkpoint-%ld holds it", tr->step,
                         tr->total_steps, tr->output_dir, tr->step);
        else rc = mb_fail(MB_INTERRUPTED, "interrupted before the first optimizer step: nothing to save");
    }
    if (!rc && log_rc) rc = log_rc;
    if (!rc && lead && tr->step > 0) rc = write_svg(tr);
    free(order), free(idx);
    return rc;
}

static void trainer_free(MbTrainer *tr) {
    mb_undo_mkdirs(&tr->made, 1);
    dataset_free(&tr->train);
    dataset_free(&tr->eval);
    free(tr->ref_cache);
    if (tr->m && tr->exp_avg) tr->m->ops->free(tr->m->ops, tr->exp_avg);
    if (tr->m && tr->exp_avg_sq) tr->m->ops->free(tr->m->ops, tr->exp_avg_sq);
    if (tr->m) mb_model_set_lora(tr->m, NULL);
    mb_lora_free(tr->lo);
    mb_tokenizer_free((MbTokenizer *)tr->tok);
    mb_model_free(tr->m);
    memset(tr, 0, sizeof *tr);
}

/* Moves a seeded random share `frac` of train's pairs into eval, both keeping the file order.
 * As datasets' train_test_split: ceil(frac * n) pairs are held out, and a split that leaves
 * either side empty is an error (never a run without the evaluation it asked for). */
static MbStatus split_eval(MbDataset *train, MbDataset *eval, double frac, int seed) {
    size_t n = (size_t)arrlen(train->pairs), k = (size_t)ceil(frac * (double)n);
    if (k < 1 || k >= n)
        return mb_fail(MB_ERR_ARG, "%s: eval_split %g of %zu usable pair%s holds out %zu and leaves %zu for training "
                       "--> hold out a share that leaves pairs on both sides, or pass --eval_data FILE", train->path, frac,
                       n, n == 1 ? "" : "s", k, n - MB_MIN(k, n));
    char *pick = mb_calloc(n, 1);
    if (!pick || !(eval->path = mb_strdup(train->path))) return free(pick), MB_ERR_OOM;
    MbRng rng;
    mb_rng_seed(&rng, (uint64_t)seed ^ 0xe7a1u);
    for (size_t chosen = 0; chosen < k;) {
        size_t i = (size_t)(mb_rng_u64(&rng) % n);
        if (!pick[i]) pick[i] = 1, chosen++;
    }
    MbPair *keep = NULL;
    for (size_t i = 0; i < n; i++) {
        if (pick[i]) arrput(eval->pairs, train->pairs[i]);
        else arrput(keep, train->pairs[i]);
    }
    arrfree(train->pairs);
    train->pairs = keep;
    free(pick);
    return MB_OK;
}

/* Loads model, tokenizer, data and adapter for a job. */
static MbStatus trainer_setup(MbTrainer *tr, const MbTrainJob *job, int need_train_data) {
    memset(tr, 0, sizeof *tr);
    tr->cfg = job->cfg;
    tr->sft = job->sft;
    tr->model_dir = job->model_dir;
    tr->output_dir = job->output_dir;
    MbTrainConfig *c = &tr->cfg;
    MbStatus rc = train_job_check(need_train_data ? "mb_train" : "mb_evaluate", job);
    if (rc) return rc;
    MbLoadOptions lopt = {.threads = job->threads, .load_in_4bit = job->load_in_4bit,
                          .bnb_4bit_compute_dtype = job->bnb_4bit_compute_dtype, .device = job->device, .gpu = job->gpu,
                          .random_init = job->random_init, .seed = (uint64_t)c->seed, .progress = job->progress};
    rc = mb_model_load(job->model_dir, &lopt, &tr->m);
    MbTokenizer *tok = NULL;
    if (!rc) rc = mb_tokenizer_open(job->tokenizer_path, job->model_dir, job->lora_init, &tok);
    tr->tok = tok;
    if (!rc && mb_tokenizer_vocab_size(tok) > (size_t)tr->m->cfg.vocab_size)
        rc = mb_fail(MB_ERR_ARG, "the tokenizer has %zu tokens but the model's vocab_size is %d --> pass the "
                     "model's own tokenizer", mb_tokenizer_vocab_size(tok), tr->m->cfg.vocab_size);
    if (!rc) tr->pad = MB_MAX(mb_tokenizer_eos_id(tok), 0);
    MbDataOptions dopt = {c->max_length, c->max_prompt_length, c->max_completion_length, c->add_bos};
    if (!rc && need_train_data) rc = dataset_load(job->data_path, tok, &dopt, &tr->train);
    if (!rc && job->eval_data_path) rc = dataset_load(job->eval_data_path, tok, &dopt, &tr->eval);
    else if (!rc && need_train_data && c->eval_split > 0) rc = split_eval(&tr->train, &tr->eval, c->eval_split, c->seed);
    if (!rc) rc = job->lora_init ? mb_lora_load(tr->m, job->lora_init, &tr->lo) : mb_lora_new(tr->m, &c->lora, (uint64_t)c->seed, &tr->lo);
    if (rc) {
        trainer_free(tr);
        return rc;
    }
    c->lora.r = tr->lo->r, c->lora.alpha = tr->lo->alpha, c->lora.targets = tr->lo->targets;
    mb_model_set_lora(tr->m, tr->lo);
    model_set_checkpointing(tr->m, c->gradient_checkpointing);
    return MB_OK;
}

/* The run's EOS, as TRL appends it to each completion, and where it came from. */
static void report_eos(const MbTokenizer *tok) {
    int32_t eos = mb_tokenizer_eos_id(tok);
    size_t len = 0;
    const char *text = eos >= 0 ? mb_tokenizer_token_bytes(tok, eos, &len) : NULL;
    const char *cfg = mb_tokenizer_config_path(tok);
    if (cfg) mb_say("EOS of the completions: %.*s (%d), the eos_token of %s\n", (int)len, text ? text : "", (int)eos, cfg);
    else mb_say("EOS of the completions: %.*s (%d): no tokenizer_config.json beside the tokenizer or in the model folder, "
                "so Llama 3's <|end_of_text|> (an Instruct tokenizer's config would name <|eot_id|>)\n", (int)len,
                text ? text : "", (int)eos);
}

static void report_skips(const MbDataset *ds) {
    if (ds->skipped_empty)
        mb_say("%s: skipped %d pairs with an empty prompt or completion (first at line %d)\n", ds->path,
               ds->skipped_empty, ds->first_skipped_line);
    if (ds->skipped_long)
        mb_say("%s: skipped %d pairs whose prompt fills max_length (first at line %d)\n", ds->path, ds->skipped_long,
               ds->first_skipped_line);
}

/* N of the newest OUTPUT/checkpoint-N, or -1 when there is none. */
static long latest_checkpoint_step(const char *out) {
    DIR *d = opendir(out);
    if (!d) return -1;
    long best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        char *end;
        if (strncmp(e->d_name, "checkpoint-", 11)) continue;
        long k = strtol(e->d_name + 11, &end, 10);
        if (*end == 0 && k > best) best = k;
    }
    closedir(d);
    return best;
}

/* The newest OUTPUT/checkpoint-N (malloc'd), or NULL when there is none or out of memory. */
static char *latest_checkpoint(const char *out) {
    long best = latest_checkpoint_step(out);
    if (best < 0) return NULL;
    char buf[64];
    snprintf(buf, sizeof buf, "checkpoint-%ld", best);
    return mb_path_join(out, buf);
}

/* ---- the output folder: never over an input, never mixing two runs, nothing left by a failure ---- */

/* What a run writes in its output folder, besides checkpoint-N/: its own files (first five), then
 * the tokenizer's, copied unless they are already there (same file). */
static const char *const mb_run_outputs[] = {"adapter_model.safetensors", "adapter_config.json", "metrics.jsonl",
                                             "training.svg", "ref_logps.safetensors", "tokenizer.json",
                                             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                                             NULL};
#define MB_RUN_OWN_FILES 5

/* 1 when the folder out holds a run (metrics, an adapter or checkpoint-N); what: the first seen. */
static int output_holds_run(const char *out, char *what, size_t cap) {
    const char *marks[] = {"metrics.jsonl", "adapter_model.safetensors"};
    for (int i = 0; i < 2; i++) {
        char *p = mb_path_join(out, marks[i]);
        int there = !p || mb_is_file(p); /* (out of memory: a run, so that nothing is written over) */
        free(p);
        if (there) return snprintf(what, cap, "%s", marks[i]), 1;
    }
    long ck = latest_checkpoint_step(out);
    if (ck >= 0) snprintf(what, cap, "checkpoint-%ld", ck);
    return ck >= 0;
}

/* 1 when path lies inside the folder dir: one of path's parents (path/.., path/../.., ... as
 * the system resolves them, links included) is dir; 0 when not, -1 when out of memory. */
static int path_inside(const char *path, const char *dir) {
    char *p = mb_is_dir(path) ? mb_path_join(path, "..") : mb_path_dirname(path);
    int inside = p ? 0 : -1; /* -1: out of memory (the message is set) */
    for (int depth = 0; depth < 256 && !inside; depth++) {
        char *up = mb_path_join(p, "..");
        if (!up) {
            inside = -1;
            break;
        }
        inside = mb_same_file(p, dir);
        int top = mb_same_file(p, up) || !mb_is_dir(p); /* "/" is its own parent */
        free(p);
        p = up;
        if (top) break;
    }
    free(p);
    return inside;
}

/* Before anything loads: the run may not write over an input, nor into another run's folder. */
static MbStatus train_check_output(const MbTrainJob *job) {
    const char *cmd = job->sft ? "sft" : "dpo", *out = job->output_dir;
    const char *inputs[] = {job->model_dir, job->tokenizer_path, job->data_path, job->eval_data_path, job->lora_init};
    size_t n = sizeof inputs / sizeof *inputs;
    const char *own[MB_RUN_OWN_FILES + 1] = {NULL};
    memcpy(own, mb_run_outputs, MB_RUN_OWN_FILES * sizeof *own);
    MbStatus rc = mb_guard_output(cmd, out, inputs, n, own);
    DIR *d = rc ? NULL : opendir(out); /* checkpoint-N/ folders are written (and replaced) by the run */
    struct dirent *e;
    while (d && !rc && (e = readdir(d))) {
        if (strncmp(e->d_name, "checkpoint-", 11)) continue;
        char *ck = mb_path_join(out, e->d_name);
        if (!ck) rc = MB_ERR_OOM;
        for (size_t i = 0; !rc && i < n; i++) {
            int inside = inputs[i] && !mb_same_file(inputs[i], ck) ? path_inside(inputs[i], ck) : inputs[i] != NULL;
            if (inside < 0) rc = MB_ERR_OOM;
            else if (inside)
                rc = mb_fail(MB_ERR_ARG, "%s: the input %s is in a checkpoint folder of %s (%s), which this run "
                             "writes --> copy it elsewhere, or choose another --output", cmd, inputs[i], out, e->d_name);
        }
        free(ck);
    }
    if (d) closedir(d);
    char what[300];
    /* resuming continues the run in OUT when the checkpoint is OUT's ("latest" or a folder in it) */
    int resume = job->resume && job->resume[0];
    if (resume && strcmp(job->resume, "latest") && strcmp(job->resume, "true")) resume = path_inside(job->resume, out);
    if (!rc && resume < 0) rc = MB_ERR_OOM;
    if (!rc && !resume && !job->overwrite_output_dir && mb_is_dir(out) && output_holds_run(out, what, sizeof what))
        rc = mb_fail(MB_ERR_ARG, "%s: %s already holds a run (%s) --> --resume_from_checkpoint latest continues it, "
                     "--overwrite_output_dir replaces it, or choose another --output", cmd, out, what);
    return rc;
}

/* Rank 0, once the run has loaded: makes the output folder (and its parents), removes what
 * killed runs left half-written and, with overwrite_output_dir (not resuming), the old run. */
static MbStatus output_prepare(MbTrainer *tr, const MbTrainJob *job) {
    const char *out = job->output_dir;
    mb_files_present(out, mb_run_outputs, tr->existed); /* first: what is there is never the run's to remove */
    MbStatus rc = mb_mkdir_p(out, &tr->made);
    if (!rc) rc = mb_remove_stale(out);
    if (rc || !job->overwrite_output_dir || (job->resume && job->resume[0])) return rc;
    /* --overwrite_output_dir: the old run's own files and checkpoints go (the keyed reference cache
     * stays); nothing else in the folder is touched */
    DIR *d = opendir(out);
    struct dirent *e;
    while (d && !rc && (e = readdir(d))) {
        char *end;
        int ckpt = !strncmp(e->d_name, "checkpoint-", 11) && e->d_name[11] >= '0' && e->d_name[11] <= '9' &&
                   strtol(e->d_name + 11, &end, 10) >= 0 && !*end;
        int own = 0;
        for (int i = 0; i < MB_RUN_OWN_FILES; i++)
            own |= strcmp(mb_run_outputs[i], "ref_logps.safetensors") && !strcmp(e->d_name, mb_run_outputs[i]);
        if (!ckpt && !own) continue;
        char *p = mb_path_join(out, e->d_name);
        rc = p ? mb_remove_path(p) : MB_ERR_OOM;
        free(p);
    }
    if (d) closedir(d);
    mb_files_present(out, mb_run_outputs, tr->existed); /* what was removed is now the run's own */
    return rc;
}

/* Rank 0, after a run that failed (or stopped) before any checkpoint: removes the files and
 * folders it created. A run with a checkpoint keeps everything: it can be resumed. */
static void output_undo(MbTrainer *tr, const char *out, int failed) {
    int undo = failed && !(mb_is_dir(out) && latest_checkpoint_step(out) >= 0);
    if (undo) mb_remove_new_files(out, mb_run_outputs, tr->existed);
    mb_undo_mkdirs(&tr->made, !undo);
}

/* One rank of a run: its own model, data and adapter copy, joined to the others by comm. Only
 * rank 0 prints and writes files. gpu: its CUDA device. */
static MbStatus train_rank(const MbTrainJob *job, MbComm *comm, int threads, int gpu) {
    MbTrainJob j = *job;
    j.threads = threads;
    j.gpu = gpu;
    MbTrainer tr;
    int lead = comm_rank(comm) == 0, world = comm_world(comm);
    if (!lead) j.progress.fn = NULL; /* rank 0 shows the job's progress */
    MbStatus rc = trainer_setup(&tr, &j, 1);
    MbStatus arc = comm_agree(comm, rc, MB_ERR_ARG, "another rank could not start"); /* then none starts */
    if (arc) {
        if (!rc) trainer_free(&tr);
        return arc;
    }
    tr.comm = comm;
    tr.progress = lead ? &job->progress : NULL;
    tr.zero = job->zero_stage < 0 ? world > 1 : job->zero_stage >= 1;
    tr.shard = (tr.lo->n_params + (size_t)world - 1) / (size_t)world;
    tr.n_pad = tr.shard * (size_t)world;
    MbOps *ops = tr.m->ops;
    rc = lora_reserve(tr.lo, tr.n_pad);
    if (!rc && tr.zero) {
        tr.gshard = ops->alloc(ops, tr.shard * sizeof(float)), tr.acc_shard = ops->alloc(ops, tr.shard * sizeof(double));
        if (!tr.gshard || !tr.acc_shard) rc = mb_ops_oom(ops);
    }
    if (!rc && !(tr.acc = ops->alloc(ops, tr.n_pad * sizeof(double)))) rc = mb_ops_oom(ops);
    if (rc) goto done;
    tr.fingerprint = trainer_fingerprint(&tr);
    const MbTrainConfig *c = &tr.cfg;
    if (lead) {
        report_eos(tr.tok);
        report_skips(&tr.train);
        if (arrlen(tr.eval.pairs) && job->eval_data_path) report_skips(&tr.eval);
        char mods[160] = "";
        size_t at = 0;
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++)
            if (tr.lo->targets & (1u << i) && at < sizeof mods)
                at += (size_t)snprintf(mods + at, sizeof mods - at, " %s", lora_module_name(i));
        mb_say("%s: %zu pairs for training, %zu held out; LoRA r=%d alpha=%g on%s (%zu trainable parameters)\n",
               job->sft ? "sft" : "dpo", (size_t)arrlen(tr.train.pairs), (size_t)arrlen(tr.eval.pairs), tr.lo->r,
               tr.lo->alpha, mods, tr.lo->n_params);
        if (!job->sft)
            mb_say("loss %s, beta %g, lr %g %s, batch %d x %d accumulation%s\n", mb_loss_names[c->loss_type], c->beta,
                   c->learning_rate, mb_sched_names[c->lr_scheduler_type], c->per_device_train_batch_size,
                   c->gradient_accumulation_steps, c->gradient_checkpointing ? ", gradient checkpointing" : "");
        if (world > 1)
            mb_say("data parallel: %d ranks x %s, %d pairs per optimizer step, ZeRO stage %d (%zu moments per rank)\n",
                   world, !ops->host_memory ? "one GPU" : job->world_size > 1 ? "CPU processes" : "CPU threads",
                   c->per_device_train_batch_size * c->gradient_accumulation_steps * world, tr.zero,
                   tr.zero ? tr.shard : tr.lo->n_params);
    }
    tr.interrupt = job->interrupt;
    if (lead) rc = output_prepare(&tr, job);
    rc = comm_agree(comm, rc, MB_ERR_ARG, "another rank could not start");
    if (!rc && !job->sft && c->precompute_ref_log_probs) rc = precompute_ref(&tr);
    char *resume = NULL;
    if (!rc && job->resume && job->resume[0]) {
        if (strcmp(job->resume, "true") && strcmp(job->resume, "latest")) resume = mb_strdup(job->resume);
        else if (!(resume = latest_checkpoint(job->output_dir)) && latest_checkpoint_step(job->output_dir) < 0)
            rc = mb_fail(MB_ERR_ARG, "%s: no checkpoint-N folder to resume from", job->output_dir);
        if (!rc && !resume) rc = MB_ERR_OOM;
    }
    double stop[2] = {rc != MB_OK, job->interrupt && *job->interrupt}; /* failed; Ctrl-C while loading */
    MbStatus crc = comm_all_reduce_host(comm, stop, 2);
    if (crc && !rc) rc = crc;
    if (!rc && stop[0] > 0) rc = mb_fail(MB_ERR_ARG, "another rank could not start");
    if (!rc && stop[1] > 0)
        rc = mb_fail(MB_INTERRUPTED, "interrupted while loading, before this run's first optimizer step: nothing "
                     "new to save");
    double t0 = mb_now();
    if (!rc) rc = trainer_run(&tr, resume);
    free(resume);
    if (!rc && lead) rc = mb_lora_save(tr.lo, job->output_dir, job->model_dir);
    if (!rc && lead) rc = tokenizer_copy_files(tr.tok, job->output_dir); /* as TRL saves its processing_class */
    if (lead) output_undo(&tr, job->output_dir, rc != MB_OK);
    if (!rc && lead)
        mb_say("saved the adapter to %s (%.1fs, %.0f tokens/s); metrics in %s/metrics.jsonl, chart in "
               "%s/training.svg\n", job->output_dir, mb_now() - t0, tr.tokens_seen / MB_MAX(mb_now() - t0, 1e-9),
               job->output_dir, job->output_dir);
done:
    if (rc) comm_leave(comm); /* ranks still in (or yet to reach) a collective must not wait for this one */
    if (tr.gshard) ops->free(ops, tr.gshard);
    if (tr.acc_shard) ops->free(ops, tr.acc_shard);
    if (tr.acc) ops->free(ops, tr.acc);
    trainer_free(&tr);
    return rc;
}

/* The ranks of this process that have returned, and how many of them failed */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int finished, failed;
} MbRankWait;

typedef struct {
    MbTrainJob job;
    MbComm *comm;
    int threads, gpu;
    MbStatus rc;
    char err[1024];
    int done;                /* returned (under wait->mu) */
    MbRankWait *wait;
} MbRankRun;

static void *train_rank_thread(void *arg) {
    MbRankRun *r = arg;
    MbStatus rc = train_rank(&r->job, r->comm, r->threads, r->gpu);
    pthread_mutex_lock(&r->wait->mu);
    r->rc = rc;
    if (rc) snprintf(r->err, sizeof r->err, "%s", mb_last_error());
    r->done = 1, r->wait->finished++, r->wait->failed += rc != MB_OK;
    pthread_cond_broadcast(&r->wait->cv);
    pthread_mutex_unlock(&r->wait->mu);
    return NULL;
}

/* Waits for the `started` ranks. Once one has failed, the others have `grace` seconds to leave
 * (they do at their next collective; one hung outside any collective never does). 1 when a rank
 * is still running. */
static int train_ranks_wait(MbRankWait *w, int started, double grace) {
    struct timespec until;
    int limited = 0, timed_out = 0;
    pthread_mutex_lock(&w->mu);
    while (w->finished < started && !timed_out) {
        if (w->failed && !limited) {
            until = mb_deadline_in(grace), limited = 1;
        }
        if (limited) timed_out = pthread_cond_timedwait(&w->cv, &w->mu, &until) == ETIMEDOUT;
        else pthread_cond_wait(&w->cv, &w->mu);
    }
    int running = w->finished < started;
    pthread_mutex_unlock(&w->mu);
    return running;
}

/* The world ranks of this process (--nproc), a thread each, joined by comms. A rank that cannot
 * start fails the group, so that the ranks already running leave it. *stuck: a rank hung past
 * --ddp_timeout after the job failed is left running (detached), and with it comms and what this
 * allocated: the caller keeps them. */
static MbStatus train_ranks(const MbTrainJob *job, MbComm **comms, int world, int threads, int *stuck) {
    MbRankRun *runs = mb_calloc((size_t)world, sizeof *runs);
    pthread_t *th = mb_calloc((size_t)world, sizeof *th);
    MbRankWait *w = mb_calloc(1, sizeof *w);
    *stuck = 0;
    if (!runs || !th || !w) return free(runs), free(th), free(w), MB_ERR_OOM;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    MbStatus rc = MB_OK;
    int started = 0;
    for (int r = 0; !rc && r < world; r++) {
        runs[r].job = *job, runs[r].comm = comms[r], runs[r].threads = threads, runs[r].gpu = job->gpu + r, runs[r].wait = w;
        int e = mb_thread_start(&th[r], train_rank_thread, &runs[r]);
        if (!e) {
            started++;
            continue;
        }
        rc = mb_fail(MB_ERR_OOM, "cannot start rank %d of %d: %s", r, world, strerror(e));
        comm_leave(comms[r]); /* the ranks already started stop at their next collective */
        pthread_mutex_lock(&w->mu);
        w->failed++;
        pthread_mutex_unlock(&w->mu);
    }
    *stuck = train_ranks_wait(w, started, comm_timeout(job->ddp_timeout));
    for (int r = 0; r < started; r++) {
        pthread_mutex_lock(&w->mu);
        int done = runs[r].done;
        pthread_mutex_unlock(&w->mu);
        if (done) pthread_join(th[r], NULL);
        else pthread_detach(th[r]);
    }
    /* report the rank that failed first, not the ranks that stopped because of it (nor one hung:
     * the others name it) */
    for (int r = 0; r < started && !rc; r++)
        if (runs[r].done && runs[r].rc && !strstr(runs[r].err, "another rank")) rc = mb_fail(runs[r].rc, "%s", runs[r].err);
    for (int r = 0; r < started && !rc; r++)
        if (runs[r].done && runs[r].rc) rc = mb_fail(runs[r].rc, "%s", runs[r].err);
    if (*stuck) return rc; /* (runs and w stay: the hung rank holds them) */
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
    free(runs), free(th), free(w);
    return rc;
}

MbStatus mb_train(const MbTrainJob *job) {
    if (train_job_check("mb_train", job)) return MB_ERR_ARG; /* before anything is written */
    if (!job->output_dir || !job->output_dir[0]) return mb_fail(MB_ERR_ARG, "train: --output DIR is required");
    /* rank 0 writes the files (and makes the folder once the run has loaded): it checks them */
    MbStatus rc = job->world_size > 1 && job->rank > 0 ? MB_OK : train_check_output(job);
    if (rc) return rc;
    int world = job->nproc > 1 ? job->nproc : 1, dist = job->world_size > 1, explicit_choice;
    if (world > 256) return mb_fail(MB_ERR_ARG, "--nproc %d: at most 256 ranks", world);
    if (dist && world > 1)
        return mb_fail(MB_ERR_ARG, "--nproc %d under torchrun (WORLD_SIZE=%d): one rank per process --> drop --nproc",
                       world, job->world_size);
    int device = mb_device_resolve(job->device, &explicit_choice);
    int total = job->threads > 0 ? job->threads : mb_cpu_count(), per = MB_MAX(1, total / world);
    MbComm **comms = mb_calloc((size_t)world, sizeof *comms);
    MbTrainJob j = *job;
    const char *addr = job->master_addr ? job->master_addr : "127.0.0.1";
    /* the ranks of a multi-process job prove at the rendezvous that they run the same job */
    MbJobFingerprint *fp = dist ? mb_malloc(sizeof *fp) : NULL;
    if (!comms || (dist && !fp)) return free(comms), free(fp), MB_ERR_OOM;
    MbStatus fp_rc = fp ? mb_job_fingerprint(job, fp) : MB_OK;
    char *fp_err = fp_rc ? mb_strdup(mb_last_error()) : NULL; /* more precise than the rendezvous' refusal */
    int port = job->master_port, rank = job->rank, size = job->world_size;
    if (dist && device == MB_DEVICE_CUDA)
        rc = mb_comm_nccl_new(addr, port, rank, size, job->gpu, fp, job->ddp_timeout, &comms[0]);
    else if (dist) rc = mb_comm_tcp_new(addr, port, rank, size, fp, job->ddp_timeout, &comms[0]);
    else if (device == MB_DEVICE_CUDA && world > 1) rc = mb_comm_nccl_new_all(world, job->gpu, job->ddp_timeout, comms), j.device = device;
    else rc = mb_comm_threads_new(world, job->ddp_timeout, comms);
    if (rc && fp_err) rc = mb_fail(fp_rc, "%s", fp_err);
    free(fp), free(fp_err);
    if (rc) {
        free(comms);
        return rc;
    }
    job = &j;
    int stuck = 0;
    if (world == 1) rc = train_rank(job, comms[0], per, job->gpu);
    else rc = train_ranks(job, comms, world, per, &stuck);
    if (stuck) return rc; /* a rank hung outside the collectives still holds its communicator */
    for (int r = 0; r < world; r++) comm_destroy(comms[r]);
    free(comms);
    return rc;
}

MbStatus mb_evaluate(const MbTrainJob *job) {
    MbTrainer tr;
    MbTrainJob j = *job;
    j.eval_data_path = job->data_path; /* everything in the file is evaluated */
    MbStatus rc = trainer_setup(&tr, &j, 0);
    if (rc) return rc;
    report_eos(tr.tok);
    report_skips(&tr.eval);
    double met[MET_COUNT];
    rc = mb_comm_threads_new(1, 0, &tr.comm);
    if (!rc) rc = train_evaluate(&tr, met);
    if (tr.comm) comm_destroy(tr.comm);
    if (!rc) {
        mb_say("%zu pairs of %s\n", (size_t)arrlen(tr.eval.pairs), job->data_path);
        for (int k = 0; k < (job->sft ? 1 : MET_COUNT); k++) mb_say("  eval_%-20s %.6f\n", mb_metric_names[k], met[k]);
    }
    trainer_free(&tr);
    return rc;
}

// ============================================================================================
// ---------- 10. sampler ----------
// Text generation as transformers' generate computes it (GenerationMixin._sample, 4.57): the
// last position's logits in fp32 go through the logits processors in the order
// _get_logits_processor builds them, then the next token is the first argmax (greedy) or a
// draw from their softmax (sampling):
//   RepetitionPenaltyLogitsProcessor  each distinct id of the sequence (prompt included), once:
//                                     logit < 0 ? logit * p : logit / p          (p != 1)
//   NoRepeatNGramLogitsProcessor      -inf for each token that would complete an n-gram the
//                                     sequence already holds                      (n > 0)
//   TemperatureLogitsWarper           logits / t                          (sampling, t != 1)
//   TopKLogitsWarper                  -inf below the k-th largest (ties kept)  (sampling, k > 0)
//   TopPLogitsWarper                  sort ascending, -inf where the cumulative probability is
//                                     <= 1 - top_p, never the last min_tokens_to_keep (sampling, p < 1)
// The arithmetic is PyTorch's on fp32 tensors with Python float settings: the setting is
// rounded to fp32 and each step is one fp32 operation, so the processed logits are the same
// bits (top_p's softmax and cumulative sum agree to rounding, which matters only for a
// cumulative probability within an ulp of the threshold). Sampling draws with medbot's RNG
// (xoshiro256**, seeded): the same seed gives the same tokens on every run and for any thread
// count, but not the tokens of torch.multinomial's generator.
// Generation ends after a stop id (which is the last output, as in HF) or max_new_tokens; the
// new tokens' text streams out through MbTokenStream, so a UTF-8 character split across tokens
// is held back until its last byte arrives.
// The chat session (MbChat, the end of the section) holds a model, its adapter, tokenizer and
// sampler, and answers in the card's format, one prompt at a time or as a conversation in a KV
// cache: the library side of `generate` and `chat`.
// ============================================================================================

typedef struct {
    float x, p;             /* a logit and its probability */
    int32_t id;
} MbScored;

struct MbSampler {
    MbGenerationConfig cfg;
    size_t V;
    MbRng rng;
    float *work;            /* (V) top_k's copy of the logits for the selection */
    unsigned char *seen;    /* (V) repetition_penalty's marks, all zero between calls */
    MbScored *sorted;       /* (V) top_p's finite logits in ascending order */
};

void mb_generation_config_defaults(MbGenerationConfig *g) {
    memset(g, 0, sizeof *g);
    g->max_new_tokens = 256;
    g->do_sample = 1;
    g->temperature = 0.7;
    g->top_k = 50; /* transformers' GenerationConfig default: the card's generate call uses it */
    g->top_p = 0.9;
    g->repetition_penalty = 1.1;
    g->min_tokens_to_keep = 1;
}

int mb_generation_is_stop(const MbGenerationConfig *g, int32_t id) {
    for (int i = 0; i < g->n_stop_ids; i++)
        if (g->stop_ids[i] == id) return 1;
    return 0;
}

static void gen_add_stop(MbGenerationConfig *g, int32_t id) {
    if (id >= 0 && !mb_generation_is_stop(g, id) && g->n_stop_ids < MB_MAX_STOP_IDS) g->stop_ids[g->n_stop_ids++] = id;
}

MbStatus mb_generation_set_stop_ids(MbGenerationConfig *g, const char *model_dir, const MbModel *m,
                                    const MbTokenizer *tok) {
    g->n_stop_ids = 0;
    int from_file = 0;
    char *path = model_dir ? mb_path_join(model_dir, "generation_config.json") : NULL;
    if (model_dir && !path) return MB_ERR_OOM;
    if (path && mb_is_file(path)) { /* generate takes eos_token_id from here first */
        MbJsonDoc doc;
        MbStatus rc = json_read_file(path, &doc);
        if (rc) {
            free(path);
            return rc;
        }
        const MbJson *v = json_get(&doc, json_root(&doc), "eos_token_id");
        if (v && v->kind == MB_JSON_NUMBER && v->is_int) gen_add_stop(g, (int32_t)v->i), from_file = 1;
        if (v && v->kind == MB_JSON_ARRAY) {
            from_file = 1;
            for (const MbJson *e = json_first(&doc, v); e; e = json_next(&doc, e))
                if (e->kind == MB_JSON_NUMBER && e->is_int) gen_add_stop(g, (int32_t)e->i);
        }
        json_free(&doc);
    }
    free(path);
    if (!from_file)
        for (int i = 0; i < m->cfg.n_eos_token_ids; i++) gen_add_stop(g, m->cfg.eos_token_ids[i]);
    if (tok) {
        gen_add_stop(g, mb_tokenizer_token_id(tok, "<|eot_id|>"));
        gen_add_stop(g, mb_tokenizer_token_id(tok, "<|eom_id|>"));
        if (g->n_stop_ids == 0) gen_add_stop(g, mb_tokenizer_eos_id(tok));
    }
    return MB_OK;
}

/* The first setting of g outside the range transformers' processors accept (their __init__
 * checks), or NULL; why: "must be ..., got X". Temperature counts only when sampling; every
 * number must be finite. */
static const char *generation_config_invalid(const MbGenerationConfig *g, char *why, size_t n) {
    if (range_why(g->max_new_tokens, 1, 1, INFINITY, 0, why, n)) return "max_new_tokens";
    if (range_why(g->repetition_penalty, 0, 0, INFINITY, MB_LO_OPEN, why, n)) return "repetition_penalty";
    if (range_why(g->no_repeat_ngram_size, 1, 0, INFINITY, 0, why, n)) return "no_repeat_ngram_size";
    if (range_why(g->min_tokens_to_keep, 1, 1, INFINITY, 0, why, n)) return "min_tokens_to_keep";
    if (g->do_sample && range_why(g->temperature, 0, 0, INFINITY, MB_LO_OPEN, why, n)) {
        size_t k = strlen(why);
        snprintf(why + k, n - k, " --> sampling needs it; for greedy decoding turn sampling off (--greedy)");
        return "temperature";
    }
    if (range_why(g->top_k, 1, 0, INFINITY, 0, why, n)) return "top_k";
    if (range_why(g->top_p, 0, 0, 1, 0, why, n)) return "top_p";
    return NULL;
}

MbStatus mb_sampler_new(const MbGenerationConfig *g, size_t V, MbSampler **out) {
    *out = NULL;
    char why[200];
    const char *bad = generation_config_invalid(g, why, sizeof why);
    if (V < 1 || V > INT32_MAX) return mb_fail(MB_ERR_ARG, "sampler: vocabulary of %zu tokens", V);
    if (bad) return mb_fail(MB_ERR_ARG, "%s %s", bad, why);
    MbSampler *s = mb_calloc(1, sizeof *s);
    if (!s) return MB_ERR_OOM;
    s->cfg = *g;
    s->V = V;
    mb_rng_seed(&s->rng, g->seed);
    s->work = mb_malloc(V * sizeof *s->work);
    s->seen = mb_calloc(V, 1);
    s->sorted = mb_malloc(V * sizeof *s->sorted);
    if (!s->work || !s->seen || !s->sorted) return mb_sampler_free(s), MB_ERR_OOM;
    *out = s;
    return MB_OK;
}

void mb_sampler_free(MbSampler *s) {
    if (!s) return;
    free(s->work);
    free(s->seen);
    free(s->sorted);
    free(s);
}

/* ---- the processors: logits x (V), the sequence so far ids (n) ---- */

/* RepetitionPenaltyLogitsProcessor: gather, penalize, scatter; an id seen twice gets the same
 * value twice, so each distinct id is penalized once. seen (V) is zero on entry and on exit. */
static void logits_repetition_penalty(float *x, size_t V, const int32_t *ids, size_t n, float p,
                                      unsigned char *seen) {
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || (size_t)id >= V || seen[id]) continue;
        seen[id] = 1;
        x[id] = x[id] < 0 ? x[id] * p : x[id] / p;
    }
    for (size_t i = 0; i < n; i++)
        if (ids[i] >= 0 && (size_t)ids[i] < V) seen[ids[i]] = 0;
}

/* NoRepeatNGramLogitsProcessor: the n-grams ids[i .. i+N-1] whose first N-1 ids equal the last
 * N-1 ids of the sequence ban their last id (nothing while the sequence is shorter than N-1). */
static void logits_no_repeat_ngram(float *x, size_t V, const int32_t *ids, size_t n, int N) {
    if (N < 1 || n + 1 < (size_t)N) return;
    size_t k = (size_t)N - 1;
    const int32_t *tail = ids + n - k;
    for (size_t i = 0; i + k < n; i++)
        if (!memcmp(ids + i, tail, k * sizeof *ids) && ids[i + k] >= 0 && (size_t)ids[i + k] < V)
            x[ids[i + k]] = -INFINITY;
}

/* TemperatureLogitsWarper */
static void logits_temperature(float *x, size_t V, float t) {
    for (size_t i = 0; i < V; i++) x[i] = x[i] / t;
}

/* The value at position k of a[0..n) sorted in descending order (quickselect; a is reordered). */
static float select_desc(float *a, ptrdiff_t n, ptrdiff_t k) {
    ptrdiff_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        ptrdiff_t i = lo, j = hi;
        while (i <= j) { /* Hoare: [lo, j] >= pivot, [i, hi] <= pivot, between them == pivot */
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* TopKLogitsWarper: k = max(top_k, min_tokens_to_keep); -inf where the logit is below the k-th
 * largest (torch.topk(x, k)[0][-1]), so ties with the k-th value are all kept. */
static void logits_top_k(float *x, size_t V, int top_k, int min_keep, float *work) {
    size_t k = (size_t)MB_MAX(top_k, min_keep);
    if (k >= V) return; /* the k-th largest is the smallest: nothing is below it */
    memcpy(work, x, V * sizeof *x);
    float kth = select_desc(work, (ptrdiff_t)V, (ptrdiff_t)k - 1);
    for (size_t i = 0; i < V; i++)
        if (x[i] < kth) x[i] = -INFINITY;
}

static int cmp_scored_asc(const void *a, const void *b) {
    const MbScored *p = a, *q = b;
    if (p->x != q->x) return p->x < q->x ? -1 : 1;
    return p->id < q->id ? -1 : p->id > q->id; /* exact ties: torch's unstable sort has its own order */
}

/* TopPLogitsWarper: torch.sort ascending, softmax, cumsum; -inf where cumsum <= 1 - top_p
 * (compared in fp32), except the last min_tokens_to_keep. A -inf logit has probability 0 and
 * cumulative 0, so it stays -inf whatever top_p is: only the finite ones are sorted. The
 * softmax is torch's: e = exp(x - max), p = e * (1 / sum e); the cumulative sum accumulates
 * in double (PyTorch's CPU accumulation type for fp32). */
static void logits_top_p(float *x, size_t V, double top_p, int min_keep, MbScored *s) {
    size_t m = 0;
    for (size_t i = 0; i < V; i++)
        if (x[i] > -INFINITY) s[m].x = x[i], s[m].id = (int32_t)i, m++;
    if (m == 0) return;
    qsort(s, m, sizeof *s, cmp_scored_asc);
    float mx = s[m - 1].x, thr = (float)(1.0 - top_p);
    double sum = 0;
    for (size_t i = 0; i < m; i++) sum += s[i].p = expf(s[i].x - mx);
    float inv = 1.0f / (float)sum;
    double cum = 0;
    size_t keep_from = m > (size_t)min_keep ? m - (size_t)min_keep : 0;
    for (size_t i = 0; i < keep_from; i++) {
        cum += s[i].p * inv;
        if ((float)cum <= thr) x[s[i].id] = -INFINITY;
    }
}

void mb_sampler_process(MbSampler *s, float *logits, const int32_t *ids, size_t n) {
    const MbGenerationConfig *g = &s->cfg;
    if (g->repetition_penalty != 1.0)
        logits_repetition_penalty(logits, s->V, ids, n, (float)g->repetition_penalty, s->seen);
    if (g->no_repeat_ngram_size > 0) logits_no_repeat_ngram(logits, s->V, ids, n, g->no_repeat_ngram_size);
    if (!g->do_sample) return;
    if (g->temperature != 1.0) logits_temperature(logits, s->V, (float)g->temperature);
    if (g->top_k != 0) logits_top_k(logits, s->V, g->top_k, g->min_tokens_to_keep, s->work);
    if (g->top_p < 1.0) logits_top_p(logits, s->V, g->top_p, g->min_tokens_to_keep, s->sorted);
}

/* torch.argmax: the first of the largest */
static int32_t sample_argmax(const float *x, size_t V) {
    size_t best = 0;
    for (size_t i = 1; i < V; i++)
        if (x[i] > x[best]) best = i;
    return x[best] > -INFINITY ? (int32_t)best : -1;
}

/* softmax + multinomial: the same distribution as torch.multinomial(softmax(x)), drawn with a
 * uniform from medbot's RNG against the cumulative weights in id order (in double). */
static int32_t sample_draw(const float *x, size_t V, MbRng *rng) {
    float mx = -INFINITY;
    for (size_t i = 0; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    if (!(mx > -INFINITY)) return -1;
    double total = 0;
    for (size_t i = 0; i < V; i++)
        if (x[i] > -INFINITY) total += exp((double)x[i] - mx);
    double u = mb_rng_uniform(rng) * total, acc = 0;
    int32_t last = -1;
    for (size_t i = 0; i < V; i++) {
        if (!(x[i] > -INFINITY)) continue;
        acc += exp((double)x[i] - mx);
        last = (int32_t)i;
        if (u < acc) return last;
    }
    return last; /* u rounded up to the total */
}

MbStatus mb_sampler_next(MbSampler *s, float *logits, const int32_t *ids, size_t n, int32_t *token) {
    for (size_t i = 0; i < s->V; i++)
        if (isnan(logits[i]) || logits[i] == INFINITY)
            return mb_fail(MB_ERR_ARG, "sampler: logit %zu is %g --> the model's weights or activations are "
                           "broken", i, (double)logits[i]);
    mb_sampler_process(s, logits, ids, n);
    *token = s->cfg.do_sample ? sample_draw(logits, s->V, &s->rng) : sample_argmax(logits, s->V);
    if (*token < 0)
        return mb_fail(MB_ERR_ARG, "sampler: every token was filtered out (no_repeat_ngram_size %d banned them "
                       "all?)", s->cfg.no_repeat_ngram_size);
    return MB_OK;
}

/* ---- generation ---- */

/* The text side of generation: each new id's completed text to the callback. */
typedef struct {
    const MbTokenizer *tok; /* NULL: ids only */
    MbTokenStream ts;
    MbTokenCallback cb;
    void *ctx;
    MbStatus rc;            /* out of memory for the text: generation stops with it */
} MbGenStream;

static void gen_stream_init(MbGenStream *g, const MbTokenizer *tok, MbTokenCallback cb, void *ctx) {
    memset(g, 0, sizeof *g);
    g->tok = tok, g->cb = cb, g->ctx = ctx;
    if (tok) mb_token_stream_init(&g->ts, tok, 1);
}

/* Returns the callback's answer (non-zero: stop). An id the tokenizer does not have (a model
 * vocabulary padded past the tokenizer's) has no text, as in HF's decode. */
static int gen_stream_put(MbGenStream *g, int32_t id) {
    const char *text = "";
    size_t len = 0, n;
    if (g->tok && mb_tokenizer_token_bytes(g->tok, id, &n) && (g->rc = mb_token_stream_put(&g->ts, id, &text, &len)))
        return 1;
    return g->cb ? g->cb(g->ctx, id, text, len) : 0;
}

/* The text still held, then the stream's status (out of memory for its text) */
static MbStatus gen_stream_finish(MbGenStream *g) {
    if (!g->tok) return MB_OK;
    const char *text;
    size_t len;
    MbStatus rc = g->rc ? g->rc : mb_token_stream_finish(&g->ts, &text, &len);
    if (!rc && len && g->cb) g->cb(g->ctx, -1, text, len);
    mb_token_stream_free(&g->ts);
    return rc;
}

MbStatus mb_generate(MbModel *m, MbKVCache *kv, MbSampler *s, const MbTokenizer *tok, const int32_t *ids,
                     size_t n, int32_t *out, size_t *n_out, MbTokenCallback cb, void *ctx) {
    *n_out = 0;
    size_t done = (size_t)mb_kvcache_len(kv), S = (size_t)kv->S, V = (size_t)m->cfg.vocab_size;
    if (kv->B != 1) return mb_fail(MB_ERR_ARG, "generate: the kv cache holds %d sequences, generation runs one", kv->B);
    if (s->V != V) return mb_fail(MB_ERR_ARG, "generate: sampler for %zu logits, model with %zu", s->V, V);
    if (done >= n)
        return mb_fail(MB_ERR_ARG, "generate: the kv cache already holds %zu tokens of a %zu-token sequence", done, n);
    if (n > S) return mb_fail(MB_ERR_ARG, "generate: %zu tokens do not fit a kv cache of %zu", n, S);
    size_t max_new = MB_MIN((size_t)s->cfg.max_new_tokens, S - n + 1); /* the last new id is never run */
    int32_t *seq = mb_malloc((n + max_new) * sizeof *seq);
    float *logits = mb_malloc(V * sizeof *logits);
    if (!seq || !logits) return free(seq), free(logits), MB_ERR_OOM;
    memcpy(seq, ids, n * sizeof *seq);
    MbGenStream gs;
    gen_stream_init(&gs, tok, cb, ctx);
    MbStatus rc = mb_model_forward(m, kv, ids + done, 1, (int)(n - done), NULL, logits, 1);
    for (size_t t = 0; !rc && t < max_new; t++) {
        int32_t next;
        if ((rc = mb_sampler_next(s, logits, seq, n + t, &next))) break;
        seq[n + t] = out[t] = next;
        *n_out = t + 1;
        if (gen_stream_put(&gs, next) || mb_generation_is_stop(&s->cfg, next) || t + 1 == max_new) break;
        rc = mb_model_forward(m, kv, &next, 1, 1, NULL, logits, 1);
    }
    MbStatus text_rc = gen_stream_finish(&gs);
    if (!rc) rc = text_rc;
    free(seq);
    free(logits);
    return rc;
}

/* ---- chat: the card's format, one prompt at a time or a conversation ---- */

struct MbChat {
    MbModel *m;
    MbLora *lo;             /* NULL: the base model alone */
    MbTokenizer *tok;
    MbSampler *s;
    MbKVCache *kv;          /* the conversation's cache (ctx tokens), made by its first mb_chat_reset */
    MbKVCache *kv1;         /* mb_chat_generate's cache, grown to fit each prompt */
    char *system;           /* the template's system text; NULL: the card's */
    int add_bos;            /* <|begin_of_text|> in front of a prompt */
    int ctx;                /* the most tokens the model runs at once (max_context) */
    int32_t *hist;          /* stb_ds array: the conversation's ids so far */
    int32_t *out;           /* (min(max_new_tokens, ctx)) the ids of one answer */
};

void mb_chat_close(MbChat *ch) {
    if (!ch) return;
    mb_kvcache_free(ch->kv);
    mb_kvcache_free(ch->kv1);
    mb_sampler_free(ch->s);
    mb_tokenizer_free(ch->tok);
    mb_lora_free(ch->lo);
    mb_model_free(ch->m);
    free(ch->system);
    arrfree(ch->hist);
    free(ch->out);
    free(ch);
}

MbStatus mb_chat_open(const MbChatOptions *o, MbChat **out) {
    *out = NULL;
    const char *name = o->name ? o->name : "chat";
    if (!o->model) return mb_fail(MB_ERR_ARG, "%s: no model folder", name);
    MbChat *ch = mb_calloc(1, sizeof *ch);
    if (!ch) return MB_ERR_OOM;
    MbGenerationConfig g = o->gen;
    MbStatus rc = mb_model_load(o->model, &o->load, &ch->m);
    if (!rc && o->lora && !(rc = mb_lora_load(ch->m, o->lora, &ch->lo))) mb_model_set_lora(ch->m, ch->lo);
    if (!rc) rc = mb_tokenizer_open(o->tokenizer, o->model, o->lora, &ch->tok);
    if (!rc) ch->add_bos = o->add_bos < 0 ? mb_tokenizer_add_bos(ch->tok) : o->add_bos;
    const MbConfig *c = ch->m ? mb_model_config(ch->m) : NULL;
    if (!rc && mb_tokenizer_vocab_size(ch->tok) > (size_t)c->vocab_size)
        rc = mb_fail(MB_ERR_ARG, "%s: the tokenizer has %zu tokens but the model's vocab_size is %d --> pass the "
                     "model's own tokenizer", name, mb_tokenizer_vocab_size(ch->tok), c->vocab_size);
    if (!rc) rc = mb_generation_set_stop_ids(&g, o->model, ch->m, ch->tok);
    if (!rc && (rc = mb_sampler_new(&g, (size_t)c->vocab_size, &ch->s))) rc = mb_fail_at(rc, name);
    if (!rc) {
        ch->ctx = o->max_context ? o->max_context : MB_MIN(c->max_position_embeddings, 4096);
        if (ch->ctx < 1) rc = mb_fail(MB_ERR_ARG, "%s: max_context %d: it must be at least 1", name, ch->ctx);
        else if (ch->ctx > c->max_position_embeddings)
            rc = mb_fail(MB_ERR_ARG, "%s: --max_context %d is more than the model's max_position_embeddings %d", name,
                         ch->ctx, c->max_position_embeddings);
    }
    if (!rc && o->system && !(ch->system = mb_strdup(o->system))) rc = MB_ERR_OOM;
    /* at most ctx new ids: generation stops when the cache is full (max_new_tokens may be huge) */
    if (!rc && !(ch->out = mb_malloc((size_t)MB_MIN(g.max_new_tokens, ch->ctx) * sizeof *ch->out))) rc = MB_ERR_OOM;
    if (rc) {
        mb_chat_close(ch); /* frees only: the message stays */
        return rc;
    }
    *out = ch;
    return MB_OK;
}

int mb_chat_context(const MbChat *ch) { return ch->ctx; }

/* Appends the ids of text (with <|begin_of_text|> in front when bos) to *ids (stb_ds array). */
static MbStatus chat_encode(const MbTokenizer *tok, const char *text, int bos, unsigned flags, int32_t **ids) {
    int32_t *t;
    size_t n;
    MbStatus rc = mb_tokenizer_encode(tok, text, strlen(text), flags, &t, &n);
    if (rc) return rc;
    int32_t b = mb_tokenizer_bos_id(tok);
    if (bos && b >= 0 && !(n && t[0] == b)) arrput(*ids, b); /* never a second one */
    for (size_t i = 0; i < n; i++) arrput(*ids, t[i]);
    free(t);
    return MB_OK;
}

/* Generates the answer to ids (n), the whole sequence so far, in kv (which holds a prefix of it);
 * the new ids land in ch->out. */
static MbStatus chat_answer(MbChat *ch, MbKVCache *kv, const int32_t *ids, size_t n, MbTokenCallback cb, void *ctx,
                            MbChatReply *r) {
    const MbGenerationConfig *g = &ch->s->cfg;
    MbStatus rc = mb_generate(ch->m, kv, ch->s, ch->tok, ids, n, ch->out, &r->n_tokens, cb, ctx);
    if (rc) return rc;
    r->stopped = r->n_tokens && mb_generation_is_stop(g, ch->out[r->n_tokens - 1]);
    r->cut = r->n_tokens && r->n_tokens < (size_t)g->max_new_tokens && !r->stopped &&
             r->n_tokens == (size_t)kv->S - n + 1; /* the cache is full: the last new id is never run */
    return MB_OK;
}

MbStatus mb_chat_generate(MbChat *ch, const char *text, const char *system, int raw, MbTokenCallback cb, void *ctx,
                          MbChatReply *r) {
    memset(r, 0, sizeof *r);
    if (!text[0]) return mb_fail(MB_ERR_ARG, "the prompt is empty");
    char *prompt = raw ? mb_strdup(text) : mb_render_prompt(system ? system : ch->system, text);
    int32_t *ids = NULL; /* stb_ds */
    MbStatus rc = prompt ? chat_encode(ch->tok, prompt, ch->add_bos, 0, &ids) : MB_ERR_OOM;
    free(prompt);
    size_t n = (size_t)arrlen(ids);
    r->prompt_tokens = n;
    if (!rc && n >= (size_t)ch->ctx) r->outcome = MB_CHAT_TOO_LONG;
    if (!rc && r->outcome == MB_CHAT_ANSWERED) {
        /* a fresh cache for this prompt and its answer, grown when it is too small */
        int S = (int)MB_MIN((size_t)ch->ctx, n + (size_t)ch->s->cfg.max_new_tokens - 1);
        S = MB_MAX(S, (int)n);
        if (ch->kv1 && ch->kv1->S < S) {
            mb_kvcache_free(ch->kv1);
            ch->kv1 = NULL;
        }
        if (!ch->kv1) rc = mb_kvcache_new(ch->m, 1, S, &ch->kv1);
        if (!rc) {
            mb_kvcache_reset(ch->kv1);
            rc = chat_answer(ch, ch->kv1, ids, n, cb, ctx, r);
        }
    }
    arrfree(ids);
    return rc;
}

MbStatus mb_chat_reset(MbChat *ch) {
    arrsetlen(ch->hist, 0);
    if (ch->kv) {
        mb_kvcache_reset(ch->kv);
        return MB_OK;
    }
    return mb_kvcache_new(ch->m, 1, ch->ctx, &ch->kv);
}

/* The ids of one question of the conversation: the first is the template (with
 * <|begin_of_text|>), each later one continues it with "\n###Question: ...\n###Answer: ". The
 * user's text is encoded as text (a typed "<|eot_id|>" stays text). */
static MbStatus chat_question(const MbChat *ch, const char *q, int first, int32_t **ids) {
    char *text = NULL;
    if (first) {
        char *p = mb_render_prompt(ch->system, q);
        if (!p) return MB_ERR_OOM;
        sb_printf(&text, "%s", p);
        free(p);
    } else {
        sb_printf(&text, "\n###Question: %s\n###Answer: ", q);
    }
    MbStatus rc = chat_encode(ch->tok, text, first && ch->add_bos, MB_ENCODE_SPECIALS_AS_TEXT, ids);
    arrfree(text);
    return rc;
}

MbStatus mb_chat_turn(MbChat *ch, const char *question, MbTokenCallback cb, void *ctx, MbChatReply *r) {
    memset(r, 0, sizeof *r);
    MbStatus rc = ch->kv ? MB_OK : mb_chat_reset(ch);
    if (rc) return rc;
    int32_t *turn = NULL; /* stb_ds */
    size_t nh = (size_t)arrlen(ch->hist);
    rc = chat_question(ch, question, nh == 0, &turn);
    r->history_tokens = nh, r->prompt_tokens = (size_t)arrlen(turn);
    if (!rc && nh && nh + r->prompt_tokens + (size_t)ch->s->cfg.max_new_tokens - 1 > (size_t)ch->ctx)
        r->outcome = MB_CHAT_FULL;
    else if (!rc && r->prompt_tokens >= (size_t)ch->ctx)
        r->outcome = MB_CHAT_TOO_LONG;
    if (!rc && r->outcome == MB_CHAT_ANSWERED) {
        for (ptrdiff_t i = 0; i < arrlen(turn); i++) arrput(ch->hist, turn[i]);
        rc = chat_answer(ch, ch->kv, ch->hist, (size_t)arrlen(ch->hist), cb, ctx, r);
        /* the answer joins the conversation; the stop id that ended it is never run */
        for (size_t i = 0; !rc && i < r->n_tokens - (size_t)r->stopped; i++) arrput(ch->hist, ch->out[i]);
        if (rc) mb_chat_reset(ch); /* a failed turn ends the conversation */
    }
    arrfree(turn);
    return rc;
}

// ============================================================================================
// ---------- 11. coordinator ----------
// Data parallelism as DeepSpeed runs the card: every rank holds the model and the adapter, runs
// its share of the micro-batches, and the gradients are summed across ranks. MbComm is the
// collective interface, on fp32 buffers, with three backends: in-process threads (CPU ranks with
// --nproc; what most tests use), TCP (CPU ranks in separate processes joined by a rendezvous at
// MASTER_ADDR / MASTER_PORT) and NCCL (one rank per GPU: processes joined by the same rendezvous,
// or one process driving several GPUs with --nproc; its device side is in section 12). The CPU
// backends sum over the ranks in rank order, so every rank gets bit-identical results, and both
// give the same bits. A rank that dies or hangs fails the collectives of every rank with a
// message within --ddp_timeout on every backend, never a hang: the failure is sticky, the
// training step returns it, and the command prints it and exits 1. At the rendezvous every rank
// shows the job's fingerprint (model, tokenizer, data, options) and, with MEDBOT_RDV_SECRET,
// proves it knows the secret; which process is which rank comes from torchrun's, Open MPI's,
// MPICH's or SLURM's variables (the end of this section).
// ============================================================================================

/* ---- MbComm: the collectives, on fp32 and fp64 buffers of the backend's memory ---- */

/* The failure of a group of communicators (the ranks of one process: the threads of --nproc, or
 * the one rank of a launcher's process): the first collective that times out or fails records
 * it, with the message that names what happened, and from then on every collective of the group
 * returns it at once. A failed in-process group wakes the ranks that wait in it. */
typedef struct {
    pthread_mutex_t mu;
    MbStatus err;
    char msg[1024];
    int refs;           /* communicators that share it */
} MbCommFail;

struct MbComm {
    int rank, world;
    void *ctx;
    MbCommFail *fail;
    MbStatus (*all_reduce)(MbComm *, float *x, size_t n);                       /* x = sum over ranks */
    /* shard (n / world) = the sum over ranks of this rank's slice of x (n); n % world == 0 */
    MbStatus (*reduce_scatter)(MbComm *, float *shard, const float *x, size_t n);
    /* x (n) = every rank's shard (n / world), in rank order */
    MbStatus (*all_gather)(MbComm *, float *x, const float *shard, size_t n);
    MbStatus (*broadcast)(MbComm *, float *x, size_t n, int root);
    MbStatus (*barrier)(MbComm *);
    void (*destroy)(MbComm *);
    /* the gradient sums, in fp64 (see MbOps.accumulate_f64) */
    MbStatus (*all_reduce_f64)(MbComm *, double *x, size_t n);
    MbStatus (*reduce_scatter_f64)(MbComm *, double *shard, const double *x, size_t n);
    /* a small array in host memory (metrics, flags, norms): x = sum over ranks, in fp64 */
    MbStatus (*all_reduce_host)(MbComm *, double *x, size_t n);
    /* NULL, or wakes the ranks of this process that wait in a collective of a failed group */
    void (*wake)(MbComm *);
};

/* MB_OK, or the group's failure with its message on this thread */
static MbStatus comm_status(MbComm *c) {
    pthread_mutex_lock(&c->fail->mu);
    MbStatus st = c->fail->err ? mb_fail(c->fail->err, "%s", c->fail->msg) : MB_OK;
    pthread_mutex_unlock(&c->fail->mu);
    return st;
}

/* Fails c's group with st and the message (unless it failed already: the first one stays) and
 * returns the group's failure, its message on this thread. The caller wakes the waiting ranks. */
static MbStatus comm_fail(MbComm *c, MbStatus st, const char *fmt, ...) MB_PRINTF(3, 4);
static MbStatus comm_fail(MbComm *c, MbStatus st, const char *fmt, ...) {
    pthread_mutex_lock(&c->fail->mu);
    if (!c->fail->err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->fail->msg, sizeof c->fail->msg, fmt, ap);
        va_end(ap);
        c->fail->err = st;
    }
    pthread_mutex_unlock(&c->fail->mu);
    return comm_status(c);
}

/* A rank that stops (its run failed or was interrupted) fails its group, so that the ranks still
 * in a collective, or yet to reach one, do not wait for it; a group that failed already stays as
 * it is. The message is this thread's. */
static void comm_leave(MbComm *c) {
    char why[sizeof mb_errbuf];
    snprintf(why, sizeof why, "%s", mb_last_error());
    comm_fail(c, MB_ERR_ARG, "another rank failed (rank %d of %d): %s", c->rank, c->world, why);
    if (c->wake) c->wake(c);
    mb_fail(MB_ERR_ARG, "%s", why); /* this rank keeps its own message */
}

/* A communicator of backend proto (its functions) for rank `rank` of `world`, sharing the group
 * failure fail (one more reference). NULL when out of memory. */
static MbComm *comm_new(const MbComm *proto, int rank, int world, void *ctx, MbCommFail *fail) {
    MbComm *c = mb_malloc(sizeof *c);
    if (!c) return NULL;
    *c = *proto;
    c->rank = rank, c->world = world, c->ctx = ctx, c->fail = fail;
    pthread_mutex_lock(&fail->mu);
    fail->refs++;
    pthread_mutex_unlock(&fail->mu);
    return c;
}

/* A group failure of no communicators yet (comm_new adds them), or NULL when out of memory */
static MbCommFail *comm_fail_new(void) {
    MbCommFail *f = mb_calloc(1, sizeof *f);
    if (f) pthread_mutex_init(&f->mu, NULL);
    return f;
}

/* Frees c (its backend state is the caller's) and, with the last reference, its group failure. */
static void comm_free(MbComm *c) {
    MbCommFail *f = c->fail;
    pthread_mutex_lock(&f->mu);
    int last = --f->refs == 0;
    pthread_mutex_unlock(&f->mu);
    if (last) {
        pthread_mutex_destroy(&f->mu);
        free(f);
    }
    free(c);
}

/* --ddp_timeout in seconds (0: TrainingArguments' default) */
static double comm_timeout(double timeout) { return timeout > 0 ? timeout : MB_DDP_TIMEOUT; }

/* The calls the trainer makes (section 9); every backend returns at once when the group has failed. */
static int comm_rank(const MbComm *c) { return c->rank; }
static int comm_world(const MbComm *c) { return c->world; }
static MbStatus comm_barrier(MbComm *c) { return c->barrier(c); }
static MbStatus comm_all_reduce_host(MbComm *c, double *x, size_t n) { return c->all_reduce_host(c, x, n); }
static MbStatus comm_all_reduce_f64(MbComm *c, double *x, size_t n) { return c->all_reduce_f64(c, x, n); }
static MbStatus comm_reduce_scatter_f64(MbComm *c, double *shard, const double *x, size_t n) {
    return c->reduce_scatter_f64(c, shard, x, n);
}
static MbStatus comm_all_gather(MbComm *c, float *x, const float *shard, size_t n) { return c->all_gather(c, x, shard, n); }
static void comm_destroy(MbComm *c) { c->destroy(c); }

/* "rank 2" or "ranks 1, 3" (the n ranks in ranks), for the messages that name missing ranks */
static const char *rank_list(char *buf, size_t cap, const int *ranks, int n) {
    size_t k = (size_t)snprintf(buf, cap, "rank%s ", n > 1 ? "s" : "");
    for (int i = 0; i < n && k < cap; i++) k += (size_t)snprintf(buf + k, cap - k, "%s%d", i ? ", " : "", ranks[i]);
    return buf;
}

/* ---- in-process threads ---- */

typedef struct {
    int world;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int waiting;
    unsigned long generation;
    const void **slot;    /* (world) each rank's published buffer */
    unsigned long *entered; /* (world) barriers each rank has entered */
    double timeout;       /* seconds a rank waits for the others */
    void **part;          /* (world) each rank's reduced slice (a failed group frees them) */
    int refs;
} MbThreadGroup;

typedef struct {
    MbThreadGroup *g;
} MbThreadComm;

static void tc_wake(MbComm *c) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    pthread_mutex_lock(&g->mu);
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* Waits until every rank of the group has called it as often as this one. A rank that does not
 * come within the group's timeout (--ddp_timeout) fails the group with a message naming it, and
 * every rank waiting in it returns that failure: the ranks are threads of one process, so one
 * that hangs would otherwise hang the job forever. */
static MbStatus tc_barrier(MbComm *c) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    pthread_mutex_lock(&g->mu);
    unsigned long gen = g->generation;
    g->entered[c->rank]++;
    if (++g->waiting == g->world) {
        g->waiting = 0;
        g->generation++;
        pthread_cond_broadcast(&g->cv);
    } else {
        struct timespec until = mb_deadline_in(g->timeout);
        while (gen == g->generation && !(rc = comm_status(c))) {
            int e = pthread_cond_timedwait(&g->cv, &g->mu, &until);
            if (e == ETIMEDOUT && gen == g->generation) {
                int late[256], nl = 0; /* (at most 256 ranks) */
                char names[256];
                for (int r = 0; r < g->world && nl < 256; r++)
                    if (g->entered[r] < g->entered[c->rank]) late[nl++] = r;
                rc = comm_fail(c, MB_ERR_IO, "%s of %d did not reach the collective within %g s (--ddp_timeout): "
                               "stopping --> resume from the last checkpoint with --resume_from_checkpoint latest",
                               rank_list(names, sizeof names, late, nl), g->world, g->timeout);
                pthread_cond_broadcast(&g->cv);
                break;
            }
        }
    }
    pthread_mutex_unlock(&g->mu);
    return rc;
}

/* out[0..len) = the sum over ranks r, in rank order, of element off + i of slot[r] (fp32, or fp64
 * with f64): both CPU backends add in this order, so their results are the same bit for bit */
static void mb_sum_ranks(const void *const *slot, int world, void *out, size_t off, size_t len, int f64) {
    for (size_t i = 0; i < len; i++) {
        if (f64) {
            double s = ((const double *)slot[0])[off + i];
            for (int r = 1; r < world; r++) s += ((const double *)slot[r])[off + i];
            ((double *)out)[i] = s;
        } else {
            float s = ((const float *)slot[0])[off + i];
            for (int r = 1; r < world; r++) s += ((const float *)slot[r])[off + i];
            ((float *)out)[i] = s;
        }
    }
}

/* Each rank reduces its slice of x into its own buffer; then every rank copies every slice. A
 * rank that fails may leave ranks still reading its slice: the group then frees it. */
static MbStatus tc_all_reduce_any(MbComm *c, void *x, size_t n, int f64) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    size_t es = f64 ? sizeof(double) : sizeof(float), lo, hi;
    mb_split(n, c->rank, c->world, &lo, &hi);
    MbStatus rc = comm_status(c);
    void *mine = rc ? NULL : mb_malloc((hi - lo + 1) * es);
    if (!rc && !mine) { /* this rank cannot take part: the group fails */
        rc = comm_fail(c, MB_ERR_OOM, "%s", mb_last_error());
        tc_wake(c);
    }
    if (rc) return rc;
    g->slot[c->rank] = x;
    if ((rc = tc_barrier(c))) return free(mine), rc;
    mb_sum_ranks(g->slot, g->world, mine, lo, hi - lo, f64);
    g->part[c->rank] = mine;
    if (!(rc = tc_barrier(c))) { /* every slice reduced: now x may be overwritten */
        for (int r = 0; r < c->world; r++) {
            size_t a, b;
            mb_split(n, r, c->world, &a, &b);
            memcpy((char *)x + a * es, g->part[r], (b - a) * es);
        }
        rc = tc_barrier(c);
    }
    if (!rc) g->part[c->rank] = NULL, free(mine);
    return rc;
}

static MbStatus tc_reduce_scatter_any(MbComm *c, void *shard, const void *x, size_t n, int f64) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    size_t per = n / (size_t)c->world;
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    g->slot[c->rank] = x;
    if ((rc = tc_barrier(c))) return rc;
    mb_sum_ranks(g->slot, g->world, shard, (size_t)c->rank * per, per, f64);
    return tc_barrier(c);
}

static MbStatus tc_all_reduce(MbComm *c, float *x, size_t n) { return tc_all_reduce_any(c, x, n, 0); }
static MbStatus tc_all_reduce_f64(MbComm *c, double *x, size_t n) { return tc_all_reduce_any(c, x, n, 1); }
static MbStatus tc_reduce_scatter(MbComm *c, float *shard, const float *x, size_t n) {
    return tc_reduce_scatter_any(c, shard, x, n, 0);
}
static MbStatus tc_reduce_scatter_f64(MbComm *c, double *shard, const double *x, size_t n) {
    return tc_reduce_scatter_any(c, shard, x, n, 1);
}

static MbStatus tc_all_gather(MbComm *c, float *x, const float *shard, size_t n) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    size_t per = n / (size_t)c->world;
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    g->slot[c->rank] = shard;
    if ((rc = tc_barrier(c))) return rc;
    for (int r = 0; r < c->world; r++)
        if ((const void *)(x + (size_t)r * per) != g->slot[r]) memcpy(x + (size_t)r * per, g->slot[r], per * sizeof(float));
    return tc_barrier(c);
}

static MbStatus tc_broadcast(MbComm *c, float *x, size_t n, int root) {
    MbThreadGroup *g = ((MbThreadComm *)c->ctx)->g;
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    g->slot[c->rank] = x;
    if ((rc = tc_barrier(c))) return rc;
    if (c->rank != root) memcpy(x, g->slot[root], n * sizeof(float));
    return tc_barrier(c);
}

/* The group's last rank frees it */
static void tc_group_release(MbThreadGroup *g) {
    pthread_mutex_lock(&g->mu);
    int last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (!last) return;
    for (int r = 0; g->part && r < g->world; r++) free(g->part[r]);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g->slot), free(g->part), free(g->entered), free(g);
}

static void tc_destroy(MbComm *c) {
    MbThreadComm *tc = c->ctx;
    tc_group_release(tc->g);
    free(tc);
    comm_free(c);
}

static const MbComm mb_comm_threads_proto = {
    .all_reduce = tc_all_reduce, .reduce_scatter = tc_reduce_scatter, .all_gather = tc_all_gather,
    .broadcast = tc_broadcast, .barrier = tc_barrier, .destroy = tc_destroy, .all_reduce_f64 = tc_all_reduce_f64,
    .reduce_scatter_f64 = tc_reduce_scatter_f64,
    .all_reduce_host = tc_all_reduce_f64, /* the CPU ranks' memory is the host's */
    .wake = tc_wake};

/* world communicators of one in-process group (rank r is comms[r]); each destroys its own. */
static MbStatus mb_comm_threads_new(int world, double timeout, MbComm **comms) {
    MbThreadGroup *g = mb_calloc(1, sizeof *g);
    MbCommFail *fail = comm_fail_new();
    if (!g || !fail) return free(g), free(fail), MB_ERR_OOM;
    g->world = world;
    g->timeout = comm_timeout(timeout);
    g->entered = mb_calloc((size_t)world, sizeof *g->entered);
    g->slot = mb_calloc((size_t)world, sizeof *g->slot);
    g->part = mb_calloc((size_t)world, sizeof *g->part);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->refs = 1; /* this function's, until every rank has its own */
    MbStatus rc = g->entered && g->slot && g->part ? MB_OK : MB_ERR_OOM;
    int made = 0;
    for (int r = 0; !rc && r < world; r++, made++) {
        MbThreadComm *tc = mb_calloc(1, sizeof *tc);
        MbComm *c = tc ? comm_new(&mb_comm_threads_proto, r, world, tc, fail) : NULL;
        if (!c) {
            free(tc);
            rc = MB_ERR_OOM;
            break;
        }
        tc->g = g;
        g->refs++;
        comms[r] = c;
    }
    if (rc) {
        for (int r = 0; r < made; r++) tc_destroy(comms[r]), comms[r] = NULL;
        if (!made) free(fail);
    }
    tc_group_release(g);
    return rc;
}

/* ---- the job fingerprint: what every rank of a job must share ----
 * Compared at the rendezvous, before any rank loads anything: a rank started with other data,
 * another model or other options would otherwise add gradients of another job into this one. */

#define MB_FP_BLOCKS 64   /* blocks sampled from a safetensors file's data */
#define MB_FP_BLOCK 4096  /* bytes per block */

/* v into s as 8 bytes, little-endian */
static void fp_u64(MbSha256 *s, uint64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
    sha256_update(s, b, 8);
}

/* n bytes into s after their length, so that consecutive parts cannot run into each other */
static void fp_part(MbSha256 *s, const void *p, size_t n) {
    fp_u64(s, n);
    sha256_update(s, p, n);
}

static MbStatus fp_file(MbSha256 *s, const char *path) {
    MbMap m;
    MbStatus rc = mb_map_file(path, &m);
    if (rc) return rc;
    fp_part(s, m.data, m.size);
    mb_unmap(&m);
    return MB_OK;
}

/* A safetensors file, sampled: its size, its header, and MB_FP_BLOCKS blocks of its data spread
 * evenly from the first byte to the last (all of it when that is smaller). */
static MbStatus fp_safetensors(MbSha256 *s, const char *path) {
    MbMap m;
    MbStatus rc = mb_map_file(path, &m);
    if (rc) return rc;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0 && m.size >= 8; i--) hlen = (hlen << 8) | m.data[i];
    size_t head = m.size >= 8 && hlen <= m.size - 8 ? 8 + (size_t)hlen : m.size; /* not safetensors: all header */
    const unsigned char *data = m.data + head;
    size_t len = m.size - head;
    fp_u64(s, m.size), fp_part(s, m.data, head);
    if (len <= (size_t)MB_FP_BLOCKS * MB_FP_BLOCK) fp_part(s, data, len);
    for (int k = 0; len > (size_t)MB_FP_BLOCKS * MB_FP_BLOCK && k < MB_FP_BLOCKS; k++)
        fp_part(s, data + (size_t)((uint64_t)(len - MB_FP_BLOCK) * (uint64_t)k / (MB_FP_BLOCKS - 1)), MB_FP_BLOCK);
    mb_unmap(&m);
    return MB_OK;
}

/* config.json whole, then every safetensors file of the folder sampled (in the index's order) */
static MbStatus fp_model(const MbTrainJob *job, unsigned char out[32]) {
    MbSha256 s;
    sha256_init(&s);
    char *cfg = mb_path_join(job->model_dir, "config.json");
    MbStatus rc = cfg ? fp_file(&s, cfg) : MB_ERR_OOM;
    free(cfg);
    if (!rc && job->random_init) { /* the weights are drawn from the seed */
        fp_part(&s, "random_init", 11), fp_u64(&s, (uint64_t)(int64_t)job->cfg.seed);
    } else if (!rc) {
        MbSafetensors *st;
        rc = mb_safetensors_open(job->model_dir, &st);
        for (ptrdiff_t i = 0; !rc && i < arrlen(st->files); i++) rc = fp_safetensors(&s, st->files[i]);
        if (st) mb_safetensors_close(st);
    }
    if (!rc) sha256_final(&s, out);
    return rc;
}

/* the tokenizer file, and the tokenizer_config.json beside it when there is one */
static MbStatus fp_tokenizer(const MbTrainJob *job, unsigned char out[32]) {
    MbSha256 s;
    sha256_init(&s);
    char *file, *cfg; /* the files the run reads: its EOS comes from the config */
    MbStatus rc = tokenizer_locate(job->tokenizer_path, job->model_dir, job->lora_init, &file, &cfg);
    if (rc) return rc;
    rc = fp_file(&s, file);
    if (!rc && cfg) rc = fp_file(&s, cfg);
    free(file), free(cfg);
    if (!rc) sha256_final(&s, out);
    return rc;
}

static MbStatus fp_data(const MbTrainJob *job, unsigned char out[32]) {
    MbSha256 s;
    sha256_init(&s);
    MbStatus rc = MB_OK;
    const char *files[2] = {job->data_path, job->eval_data_path};
    for (int i = 0; i < 2 && !rc; i++) {
        fp_part(&s, files[i] ? "file" : "none", 4);
        if (files[i]) rc = fp_file(&s, files[i]);
    }
    if (!rc) sha256_final(&s, out);
    return rc;
}

/* a lora_init adapter: adapter_config.json whole, adapter_model.safetensors sampled */
static MbStatus fp_adapter(const char *dir, unsigned char out[32]) {
    MbSha256 s;
    sha256_init(&s);
    char *cfg = mb_path_join(dir, "adapter_config.json"), *st = mb_path_join(dir, "adapter_model.safetensors");
    MbStatus rc = cfg && st ? fp_file(&s, cfg) : MB_ERR_OOM;
    if (!rc) rc = fp_safetensors(&s, st);
    free(cfg), free(st);
    if (!rc) sha256_final(&s, out);
    return rc;
}

/* "key=value\n" with the shortest decimal that reads back as v */
static void opt_num(char **sb, const char *key, double v) {
    char b[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(b, sizeof b, "%.*g", prec, v);
        if (strtod(b, NULL) == v) break;
    }
    sb_printf(sb, "%s=%s\n", key, b);
}

/* The options that change the math (or the ranks' sequence of collectives), one "name=value"
 * line each in a fixed order, named as on the command line. adapter: the lora_init digest. */
static void fp_options(const MbTrainJob *job, const unsigned char *adapter, char *out, size_t cap) {
    const MbTrainConfig *c = &job->cfg;
    char *sb = NULL, targets[128] = "";
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++)
        if (c->lora.targets & (1u << i))
            snprintf(targets + strlen(targets), sizeof targets - strlen(targets), "%s%s", targets[0] ? "," : "",
                     lora_module_name(i));
    sb_printf(&sb, "command=%s\nloss_type=%s\n", job->sft ? "sft" : "dpo",
              c->loss_type >= 0 && c->loss_type < 4 ? mb_loss_names[c->loss_type] : "?");
    opt_num(&sb, "beta", c->beta), opt_num(&sb, "label_smoothing", c->label_smoothing);
    opt_num(&sb, "learning_rate", c->learning_rate);
    sb_printf(&sb, "lr_scheduler_type=%s\n",
              c->lr_scheduler_type >= 0 && c->lr_scheduler_type < 4 ? mb_sched_names[c->lr_scheduler_type] : "?");
    opt_num(&sb, "warmup_ratio", c->warmup_ratio);
    sb_printf(&sb, "warmup_steps=%d\nper_device_train_batch_size=%d\nper_device_eval_batch_size=%d\n"
              "gradient_accumulation_steps=%d\n", c->warmup_steps, c->per_device_train_batch_size,
              c->per_device_eval_batch_size, c->gradient_accumulation_steps);
    opt_num(&sb, "num_train_epochs", c->num_train_epochs);
    sb_printf(&sb, "max_steps=%d\nmax_length=%d\nmax_prompt_length=%d\nmax_completion_length=%d\nadd_bos=%d\n"
              "lora_r=%d\n", c->max_steps, c->max_length, c->max_prompt_length, c->max_completion_length, c->add_bos,
              c->lora.r);
    opt_num(&sb, "lora_alpha", c->lora.alpha), opt_num(&sb, "lora_dropout", c->lora.dropout);
    sb_printf(&sb, "use_rslora=%d\nlora_target_modules=%s\ngradient_checkpointing=%d\nprecompute_ref_log_probs=%d\n"
              "shuffle=%d\nseed=%d\n", c->lora.use_rslora, targets, c->gradient_checkpointing,
              c->precompute_ref_log_probs, c->shuffle, c->seed);
    opt_num(&sb, "eval_split", c->eval_split), opt_num(&sb, "weight_decay", c->weight_decay);
    opt_num(&sb, "adam_beta1", c->adam_beta1), opt_num(&sb, "adam_beta2", c->adam_beta2);
    opt_num(&sb, "adam_epsilon", c->adam_epsilon), opt_num(&sb, "max_grad_norm", c->max_grad_norm);
    sb_printf(&sb, "logging_steps=%d\nsave_steps=%d\neval_steps=%d\nload_in_4bit=%d\nbnb_4bit_compute_dtype=%s\n"
              "zero_stage=%d\nrandom_init=%d\nlora=", c->logging_steps, c->save_steps, c->eval_steps,
              job->load_in_4bit, job->bnb_4bit_compute_dtype ? job->bnb_4bit_compute_dtype : "default",
              job->zero_stage, job->random_init);
    for (int i = 0; adapter && i < 8; i++) sb_printf(&sb, "%02x", adapter[i]); /* 64 bits name it in a message */
    sb_printf(&sb, "%s\n", adapter ? "" : job->lora_init ? "unread" : "none");
    snprintf(out, cap, "%s", sb);
    arrfree(sb);
}

MbStatus mb_job_fingerprint(const MbTrainJob *job, MbJobFingerprint *fp) {
    memset(fp, 0, sizeof *fp);
    unsigned char adapter[32];
    int have_adapter = 0;
    MbStatus rc = fp_model(job, fp->model);
    if (!rc) rc = fp_tokenizer(job, fp->tokenizer);
    if (!rc) rc = fp_data(job, fp->data);
    if (!rc && job->lora_init) rc = fp_adapter(job->lora_init, adapter), have_adapter = !rc;
    fp_options(job, have_adapter ? adapter : NULL, fp->options_text, sizeof fp->options_text);
    sha256(fp->options_text, strlen(fp->options_text), fp->options);
    return rc;
}

/* ---- TCP rendezvous: rank 0 hands a blob (NCCL's unique id) to every other rank ----
 * Rank 0 listens on MASTER_ADDR:MASTER_PORT only and serves the joins concurrently (one poll over
 * the listening socket and every connection that has not joined yet), so a connection that sends
 * nothing or garbage costs no one but itself: it is dropped at its first wrong byte or
 * MB_RDV_CONN_S seconds after it was accepted. The exchange (integers are little-endian u64):
 *   rank 0 -> joiner  challenge, at once: magic, flags (1: rank 0 has the secret), nonce0 (32)
 *   joiner -> rank 0  hello: magic, rank, world, flags (1: it has the secret), nonce1 (32), the
 *                     fingerprint's digests (model, tokenizer, data, options: 4 x 32), the length
 *                     of the options text, the text, then HMAC(secret, "hello" nonce0 hello)
 *   rank 0 -> joiner  answer, once every rank has joined or the job stops: status (0 joined, 1
 *                     refused), length, the blob or the reason, HMAC(secret, "answer" nonce1
 *                     nonce0 answer)
 * The secret is MEDBOT_RDV_SECRET (MACs are zeros without one). A hello that cannot prove it is
 * turned away and rank 0 keeps waiting for the real rank, so that with a secret only those who
 * know it can stop a job; any other mismatch (a secret on the joiner only, WORLD_SIZE, a rank out
 * of range or taken, the fingerprint) stops the job, and rank 0 tells every rank that joined why.
 * The secret authenticates joining; the traffic is not encrypted. */

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#define MB_RDV_MAGIC 0x6d6564626f745232ull /* "medbotR2" */
#define MB_RDV_MAX_BLOB 4096
#define MB_RDV_CHALLENGE 48   /* magic, flags, nonce0 */
#define MB_RDV_HELLO 200      /* a hello up to its options text */
#define MB_RDV_MAX_TEXT 4095  /* options text bytes (MbJobFingerprint.options_text holds them) */
#define MB_RDV_CONN_S 10.0    /* seconds a connection has, from accept, to send its hello */
#define MB_RDV_MAX_PENDING 64 /* connections waiting for their hello at once; more are closed */
#define MB_RDV_SECRET "MEDBOT_RDV_SECRET"

#ifndef MSG_NOSIGNAL /* macOS: SO_NOSIGPIPE on the socket instead */
#define MSG_NOSIGNAL 0
#endif

/* a peer that hung up must not kill us with SIGPIPE */
static void rdv_nosigpipe(int fd) {
#ifdef SO_NOSIGPIPE
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof one);
#else
    (void)fd;
#endif
}

/* Sends (sending) or receives n bytes before the deadline (mb_now seconds; INFINITY: none), on a
 * blocking or a non-blocking socket: 1 done, 0 the peer hung up (or the connection failed), -1
 * the deadline passed. */
static int sock_io(int fd, void *p, size_t n, double deadline, int sending) {
    char *s = p;
    while (n) {
        double left = deadline - mb_now();
        if (left <= 0) return -1;
        struct pollfd pf = {fd, sending ? POLLOUT : POLLIN, 0};
        int r = poll(&pf, 1, left > 1e6 ? -1 : (int)(left * 1000));
        if (r < 0 && errno != EINTR) return 0;
        if (r <= 0) continue;
        ssize_t k = sending ? send(fd, s, n, MSG_NOSIGNAL) : recv(fd, s, n, 0);
        if (k > 0) s += k, n -= (size_t)k;
        else if (k == 0 || (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)) return 0;
    }
    return 1;
}

static int rdv_write_all(int fd, const void *p, size_t n) {
    rdv_nosigpipe(fd);
    return sock_io(fd, (void *)p, n, INFINITY, 1) == 1;
}

static void rdv_put_u64(unsigned char *b, uint64_t v) {
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(v >> (8 * i));
}
static uint64_t rdv_get_u64(const unsigned char *b) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

static MbStatus rdv_resolve(const char *addr, int port, struct addrinfo **out) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char ps[16];
    snprintf(ps, sizeof ps, "%d", port);
    int e = getaddrinfo(addr, ps, &hints, out);
    if (e) return mb_fail(MB_ERR_ARG, "rendezvous: MASTER_ADDR %s: %s", addr, gai_strerror(e));
    return MB_OK;
}

/* a u64 field as an int (large values stay large: never a valid rank or size) */
static int rdv_get_int(const unsigned char *b) { return (int)MB_MIN(rdv_get_u64(b), (uint64_t)INT_MAX); }

/* HMAC(secret, label a b msg) into out (b may be NULL); zeros without a secret */
static void rdv_mac(const char *secret, const char *label, const unsigned char *a, const unsigned char *b,
                    const unsigned char *msg, size_t n, unsigned char out[32]) {
    memset(out, 0, 32);
    if (!secret) return;
    MbHmac h;
    hmac_init(&h, secret, strlen(secret));
    hmac_update(&h, label, strlen(label) + 1);
    hmac_update(&h, a, 32);
    if (b) hmac_update(&h, b, 32);
    hmac_update(&h, msg, n);
    hmac_final(&h, out);
}

static int rdv_is_loopback(const struct sockaddr *sa) {
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        return (ntohl(in.sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        const struct in6_addr *a = &in6.sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
    }
    return 0;
}

/* the numeric address of fd's peer, for messages */
static void rdv_peer_name(int fd, char *buf, size_t cap) {
    struct sockaddr_storage ss;
    socklen_t n = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &n) != 0 ||
        getnameinfo((struct sockaddr *)&ss, n, buf, (socklen_t)cap, NULL, 0, NI_NUMERICHOST) != 0)
        snprintf(buf, cap, "an unknown address");
}

/* The first option that differs between rank 0's text a and rank r's text b, as
 * "beta=0.2 on rank 1, beta=0.1 on rank 0". */
static void rdv_options_diff(const char *a, const char *b, int r, char *out, size_t cap) {
    while (*a || *b) {
        size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
        if (la != lb || memcmp(a, b, la)) {
            snprintf(out, cap, "%.*s on rank %d, %.*s on rank 0", (int)lb, b, r, (int)la, a);
            return;
        }
        a += la + (a[la] == '\n'), b += lb + (b[lb] == '\n');
    }
    snprintf(out, cap, "the same text, another digest");
}

/* What differs between rank 0's fingerprint a and rank r's b, into why ("" when nothing does). */
static void rdv_compare(const MbJobFingerprint *a, const MbJobFingerprint *b, int r, char *why, size_t cap) {
    static const unsigned char unread[32];
    const struct {
        const uint8_t *x, *y;
        const char *what, *verb, *hint;
    } part[] = {
        {a->model, b->model, "model files", "differ", "give every rank the same --model folder (or a copy of it)"},
        {a->tokenizer, b->tokenizer, "tokenizer", "differs", "give every rank the same --tokenizer"},
        {a->data, b->data, "training data", "differs", "give every rank the same --data and --eval_data"},
        {a->options, b->options, "options", "differ", "give every rank the same options"},
    };
    why[0] = 0;
    for (int i = 0; i < 4 && !why[0]; i++) {
        if (!memcmp(part[i].x, part[i].y, 32)) continue;
        int gone0 = !memcmp(part[i].x, unread, 32), gone = !memcmp(part[i].y, unread, 32);
        char detail[300] = "";
        if (i == 3 && !gone0 && !gone) {
            strcpy(detail, ": ");
            rdv_options_diff(a->options_text, b->options_text, r, detail + 2, sizeof detail - 2);
        }
        if (gone0 || gone)
            snprintf(why, cap, "rank %d could not read its %s --> %s", gone0 ? 0 : r, part[i].what, part[i].hint);
        else
            snprintf(why, cap, "rank %d's %s %s from rank 0's%s --> %s", r, part[i].what, part[i].verb, detail,
                     part[i].hint);
    }
}

/* Rank 0's side of one rendezvous. */
typedef struct {
    int fd;                  /* -1: a free slot */
    double deadline;         /* MB_RDV_CONN_S after accept, never past the rendezvous' own */
    unsigned char nonce[32]; /* the challenge it was sent */
    unsigned char *buf;      /* (MB_RDV_HELLO + MB_RDV_MAX_TEXT + 32) its hello so far */
    size_t got;
} MbRdvConn;

typedef struct {
    const char *addr, *secret;  /* secret: MEDBOT_RDV_SECRET, NULL when unset */
    int port, world, joined;
    const MbJobFingerprint *fp; /* rank 0's */
    int *peer;                  /* (world) the socket of each rank that joined, or -1 */
    unsigned char (*nonces)[64]; /* (world) each joined rank's nonce1 and nonce0, for its answer's MAC */
    MbRdvConn conn[MB_RDV_MAX_PENDING];
    char why[512];              /* why the job stops: "" while nothing stops it */
    char turned[160];           /* the first connection turned away for the secret, for the timeout message */
    int n_turned;
} MbRdvServer;

/* Sends an answer (status, length, payload, MAC) within MB_RDV_CONN_S: 1 when it went out. */
static int rdv_answer(int fd, const char *secret, int status, const void *payload, size_t n, const unsigned char *nonce1,
                      const unsigned char *nonce0) {
    unsigned char *a = mb_malloc(16 + n + 32);
    if (!a) return 0; /* (out of memory: as a connection that took nothing) */
    rdv_put_u64(a, (uint64_t)status), rdv_put_u64(a + 8, n);
    if (n) memcpy(a + 16, payload, n);
    rdv_mac(secret, "answer", nonce1, nonce0, a, 16 + n, a + 16 + n);
    int ok = sock_io(fd, a, 16 + n + 32, mb_now() + MB_RDV_CONN_S, 1) == 1;
    free(a);
    return ok;
}

static void rdv_drop(MbRdvServer *S, int i, int close_it) {
    if (close_it) close(S->conn[i].fd);
    free(S->conn[i].buf);
    S->conn[i].fd = -1, S->conn[i].buf = NULL;
}

/* Accepts a connection and challenges it at once (into a free slot; none free: closed). */
static void rdv_accept(MbRdvServer *S, int lfd, double deadline) {
    int c = accept(lfd, NULL, NULL), i = 0;
    if (c < 0) return;
    while (i < MB_RDV_MAX_PENDING && S->conn[i].fd >= 0) i++;
    if (i == MB_RDV_MAX_PENDING) { /* a flood: a real rank that is closed on tries again */
        close(c);
        return;
    }
    MbRdvConn *k = &S->conn[i];
    fcntl(c, F_SETFL, fcntl(c, F_GETFL) | O_NONBLOCK);
    rdv_nosigpipe(c);
    k->deadline = MB_MIN(mb_now() + MB_RDV_CONN_S, deadline);
    mb_random_bytes(k->nonce, sizeof k->nonce);
    unsigned char ch[MB_RDV_CHALLENGE];
    rdv_put_u64(ch, MB_RDV_MAGIC), rdv_put_u64(ch + 8, S->secret != NULL);
    memcpy(ch + 16, k->nonce, 32);
    if (sock_io(c, ch, sizeof ch, k->deadline, 1) != 1) { /* 48 bytes into an empty send buffer: at once */
        close(c);
        return;
    }
    if (!(k->buf = mb_malloc(MB_RDV_HELLO + MB_RDV_MAX_TEXT + 32))) { /* out of memory: closed, as in a flood */
        close(c);
        return;
    }
    k->fd = c, k->got = 0;
}

/* A hello that could not prove MEDBOT_RDV_SECRET: told why and closed; rank 0 waits on. */
static void rdv_turn_away(MbRdvServer *S, int i, int r) {
    MbRdvConn *k = &S->conn[i];
    char from[64], why[256];
    rdv_peer_name(k->fd, from, sizeof from);
    snprintf(why, sizeof why, "rank %d did not prove " MB_RDV_SECRET ": the secret differs or is unset on one side --> "
             "set the same " MB_RDV_SECRET " on every rank", r);
    rdv_answer(k->fd, S->secret, 1, why, strlen(why), k->buf + 32, k->nonce);
    mb_note("medbot: rendezvous on %s:%d: turned away a connection from %s that claims rank %d: it did not "
            "prove " MB_RDV_SECRET "; waiting on for the job's ranks\n", S->addr, S->port, from, r);
    if (!S->n_turned++) snprintf(S->turned, sizeof S->turned, "rank %d from %s", r, from);
    rdv_drop(S, i, 1);
}

/* A whole hello on connection i: the rank joins, is turned away, or stops the job (S->why). */
static void rdv_admit(MbRdvServer *S, int i) {
    MbRdvConn *k = &S->conn[i];
    const unsigned char *h = k->buf;
    size_t len = (size_t)rdv_get_u64(h + 192);
    int r = rdv_get_int(h + 8), w = rdv_get_int(h + 16), has_secret = (int)(rdv_get_u64(h + 24) & 1);
    unsigned char mac[32];
    rdv_mac(S->secret, "hello", k->nonce, NULL, h, MB_RDV_HELLO + len, mac);
    if (S->secret && (!has_secret || !mb_equal_ct(mac, h + MB_RDV_HELLO + len, 32))) {
        rdv_turn_away(S, i, r);
        return;
    }
    char why[512] = "";
    if (!S->secret && has_secret)
        snprintf(why, sizeof why, "rank %d has " MB_RDV_SECRET " set and rank 0 has not: the secret differs or is unset on "
                 "one side --> set the same " MB_RDV_SECRET " on every rank", r);
    else if (w != S->world)
        snprintf(why, sizeof why, "rank %d says WORLD_SIZE=%d, rank 0 has WORLD_SIZE=%d", r, w, S->world);
    else if (r <= 0 || r >= S->world || S->peer[r] >= 0)
        snprintf(why, sizeof why, "a rank joined as RANK=%d, which is %s", r,
                 r <= 0 || r >= S->world ? "outside 1..WORLD_SIZE-1" : "taken twice");
    else {
        MbJobFingerprint *theirs = mb_calloc(1, sizeof *theirs);
        if (theirs) {
            memcpy(theirs->model, h + 64, 32), memcpy(theirs->tokenizer, h + 96, 32);
            memcpy(theirs->data, h + 128, 32), memcpy(theirs->options, h + 160, 32);
            memcpy(theirs->options_text, h + MB_RDV_HELLO, len);
            rdv_compare(S->fp, theirs, r, why, sizeof why);
        } else {
            snprintf(why, sizeof why, "%.500s", mb_last_error());
        }
        free(theirs);
    }
    if (why[0]) { /* tell the offender too */
        rdv_answer(k->fd, S->secret, 1, why, strlen(why), h + 32, k->nonce);
        snprintf(S->why, sizeof S->why, "%s", why);
        rdv_drop(S, i, 1);
        return;
    }
    S->peer[r] = k->fd;
    memcpy(S->nonces[r], h + 32, 32), memcpy(S->nonces[r] + 32, k->nonce, 32);
    S->joined++;
    rdv_drop(S, i, 0);
}

/* Reads what connection i has sent: a wrong magic, a text too long or a hang-up drops it; a
 * whole hello goes to rdv_admit. */
static void rdv_read(MbRdvServer *S, int i) {
    MbRdvConn *k = &S->conn[i];
    size_t need = k->got < MB_RDV_HELLO ? MB_RDV_HELLO : MB_RDV_HELLO + (size_t)rdv_get_u64(k->buf + 192) + 32;
    ssize_t n = recv(k->fd, k->buf + k->got, need - k->got, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) return;
    k->got += n > 0 ? (size_t)n : 0;
    int bad = n <= 0 || (k->got >= 8 && rdv_get_u64(k->buf) != MB_RDV_MAGIC) || /* gone, or not one of ours */
              (k->got >= MB_RDV_HELLO && rdv_get_u64(k->buf + 192) > MB_RDV_MAX_TEXT);
    if (bad) rdv_drop(S, i, 1);
    else if (k->got >= MB_RDV_HELLO && k->got == MB_RDV_HELLO + (size_t)rdv_get_u64(k->buf + 192) + 32) rdv_admit(S, i);
}

/* Serves connections until every rank has joined, the job stops, or the deadline passes. */
static void rdv_wait(MbRdvServer *S, int lfd, double deadline) {
    struct pollfd pf[1 + MB_RDV_MAX_PENDING];
    int who[1 + MB_RDV_MAX_PENDING];
    while (S->joined < S->world - 1 && !S->why[0]) {
        double now = mb_now(), next = deadline;
        if (now >= deadline) break;
        int np = 1;
        pf[0].fd = lfd, pf[0].events = POLLIN, pf[0].revents = 0;
        for (int i = 0; i < MB_RDV_MAX_PENDING; i++) {
            MbRdvConn *k = &S->conn[i];
            if (k->fd < 0) continue;
            if (now >= k->deadline) { /* silent, or too slow, for too long */
                rdv_drop(S, i, 1);
                continue;
            }
            next = MB_MIN(next, k->deadline);
            pf[np].fd = k->fd, pf[np].events = POLLIN, pf[np].revents = 0, who[np++] = i;
        }
        if (poll(pf, (nfds_t)np, (int)ceil(MB_MIN(next - now, 3600.0) * 1000)) <= 0) continue;
        for (int j = 1; j < np && !S->why[0]; j++)
            if (pf[j].revents) rdv_read(S, who[j]);
        if (pf[0].revents && !S->why[0]) rdv_accept(S, lfd, deadline);
    }
}

static MbStatus rdv_listen(const char *addr, int port, int *out, int *loopback) {
    struct addrinfo *ai;
    MbStatus rc = rdv_resolve(addr, port, &ai);
    if (rc) return rc;
    int fd = socket(ai->ai_family, SOCK_STREAM, 0), one = 1;
    if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 128) != 0) {
        int e = errno;
        freeaddrinfo(ai);
        if (fd >= 0) close(fd);
        return mb_fail(MB_ERR_ARG, "rendezvous: cannot listen on %s:%d: %s%s", addr, port, strerror(e),
                       e == EADDRINUSE ? " --> another job uses MASTER_PORT; pick a free one" : "");
    }
    *loopback = rdv_is_loopback(ai->ai_addr);
    freeaddrinfo(ai);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); /* a client gone between poll and accept */
    *out = fd;
    return MB_OK;
}

/* Rank 0: serves the joins, then answers each rank with the blob (or why the job stops). */
static MbStatus rdv_serve(const char *addr, int port, int world, const MbJobFingerprint *fp, const char *secret,
                          const void *blob, size_t n, double timeout, int *keep) {
    int lfd = -1, loopback = 0;
    MbStatus rc = rdv_listen(addr, port, &lfd, &loopback);
    if (rc) return rc;
    if (!loopback && !secret)
        mb_note("medbot: note: the rendezvous on %s:%d is open to the network and " MB_RDV_SECRET " is not "
                "set: any process that reaches it can join the job --> give every rank the same " MB_RDV_SECRET "\n",
                addr, port);
    MbRdvServer *S = mb_calloc(1, sizeof *S);
    if (S) S->peer = mb_malloc((size_t)world * sizeof *S->peer), S->nonces = mb_malloc((size_t)world * sizeof *S->nonces);
    if (!S || !S->peer || !S->nonces) {
        if (S) free(S->peer), free(S->nonces), free(S);
        close(lfd);
        return MB_ERR_OOM;
    }
    S->addr = addr, S->port = port, S->world = world, S->fp = fp, S->secret = secret;
    for (int r = 0; r < world; r++) S->peer[r] = -1;
    for (int i = 0; i < MB_RDV_MAX_PENDING; i++) S->conn[i].fd = -1;
    rdv_wait(S, lfd, mb_now() + timeout);
    close(lfd);
    for (int i = 0; i < MB_RDV_MAX_PENDING; i++)
        if (S->conn[i].fd >= 0) rdv_drop(S, i, 1);
    char *why = S->why;
    if (!why[0] && S->joined < world - 1) {
        int *missing = mb_malloc((size_t)world * sizeof *missing), nm = 0;
        char names[200];
        for (int r = 1; missing && r < world; r++)
            if (S->peer[r] < 0) missing[nm++] = r;
        if (missing) rank_list(names, sizeof names, missing, nm);
        else snprintf(names, sizeof names, "%d rank%s", world - 1 - S->joined, world - 1 - S->joined > 1 ? "s" : "");
        snprintf(why, sizeof S->why, "%s of %d never arrived within %g s", names, world, timeout);
        if (S->n_turned)
            snprintf(why + strlen(why), sizeof S->why - strlen(why), "; %d connection%s that did not prove " MB_RDV_SECRET
                     " turned away (the first: %s) --> set the same " MB_RDV_SECRET " on every rank", S->n_turned,
                     S->n_turned > 1 ? "s" : "", S->turned);
        free(missing);
    }
    for (int r = 1; r < world; r++) {
        if (S->peer[r] < 0) continue;
        int sent = why[0] ? rdv_answer(S->peer[r], secret, 1, why, strlen(why), S->nonces[r], S->nonces[r] + 32)
                          : rdv_answer(S->peer[r], secret, 0, blob, n, S->nonces[r], S->nonces[r] + 32);
        if (keep && !why[0] && sent) keep[r] = S->peer[r];
        else close(S->peer[r]);
        if (!sent && !why[0]) snprintf(why, sizeof S->why, "rank %d hung up during the rendezvous", r);
    }
    if (why[0] && keep)
        for (int r = 1; r < world; r++)
            if (keep[r] >= 0) close(keep[r]), keep[r] = -1;
    if (why[0]) rc = mb_fail(MB_ERR_ARG, "rendezvous on %s:%d: %s", addr, port, why);
    free(S->peer), free(S->nonces), free(S);
    return rc;
}

/* Rank > 0, on a connection rank 0 has challenged (ch): the hello, then rank 0's answer. */
static MbStatus rdv_exchange(int fd, const char *addr, int port, int rank, int world, const MbJobFingerprint *fp,
                             const char *secret, const unsigned char *ch, void *blob, size_t n, double timeout) {
    if (rdv_get_u64(ch) != MB_RDV_MAGIC)
        return mb_fail(MB_ERR_ARG, "rendezvous: %s:%d answered rank %d with something that is not this medbot's rank 0 "
                       "--> does another program (or an older medbot) use MASTER_PORT?", addr, port, rank);
    unsigned char nonce1[32], hello[MB_RDV_HELLO + MB_RDV_MAX_TEXT + 32], ans[16 + MB_RDV_MAX_BLOB + 32], mac[32];
    const unsigned char *nonce0 = ch + 16;
    size_t text = MB_MIN(strlen(fp->options_text), (size_t)MB_RDV_MAX_TEXT);
    mb_random_bytes(nonce1, sizeof nonce1);
    rdv_put_u64(hello, MB_RDV_MAGIC), rdv_put_u64(hello + 8, (uint64_t)rank), rdv_put_u64(hello + 16, (uint64_t)world);
    rdv_put_u64(hello + 24, secret != NULL);
    memcpy(hello + 32, nonce1, 32), memcpy(hello + 64, fp->model, 32), memcpy(hello + 96, fp->tokenizer, 32);
    memcpy(hello + 128, fp->data, 32), memcpy(hello + 160, fp->options, 32);
    rdv_put_u64(hello + 192, text);
    memcpy(hello + MB_RDV_HELLO, fp->options_text, text);
    rdv_mac(secret, "hello", nonce0, NULL, hello, MB_RDV_HELLO + text, hello + MB_RDV_HELLO + text);
    /* rank 0 answers by its own deadline at the latest: wait a timeout longer */
    double answer_by = mb_now() + timeout + 5.0;
    if (!rdv_write_all(fd, hello, MB_RDV_HELLO + text + 32) || sock_io(fd, ans, 16, answer_by, 0) != 1)
        return mb_fail(MB_ERR_ARG, "rendezvous: rank 0 at %s:%d did not answer rank %d within %g s", addr, port, rank,
                       timeout);
    uint64_t status = rdv_get_u64(ans), len = rdv_get_u64(ans + 8);
    if (len > MB_RDV_MAX_BLOB || (status == 0 && len != n))
        return mb_fail(MB_ERR_ARG, "rendezvous: a malformed answer from %s:%d", addr, port);
    if (sock_io(fd, ans + 16, (size_t)len + 32, answer_by, 0) != 1)
        return mb_fail(MB_ERR_ARG, "rendezvous: the answer from %s:%d broke off", addr, port);
    if (status) /* shown even when unproven: a refusal stops this rank either way */
        return mb_fail(MB_ERR_ARG, "rendezvous on %s:%d refused rank %d: %.*s", addr, port, rank, (int)len,
                       (const char *)ans + 16);
    rdv_mac(secret, "answer", nonce1, nonce0, ans, 16 + (size_t)len, mac);
    if (secret && !mb_equal_ct(mac, ans + 16 + len, 32))
        return mb_fail(MB_ERR_ARG, "rendezvous: rank 0 at %s:%d did not prove " MB_RDV_SECRET ": the secret differs or is "
                       "unset on one side --> set the same " MB_RDV_SECRET " on every rank", addr, port);
    memcpy(blob, ans + 16, n);
    return MB_OK;
}

/* Rank > 0: connects to rank 0 (retrying until the timeout, also when rank 0 closes a connection
 * before challenging it) and joins. */
static MbStatus rdv_join(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp, const char *secret,
                         void *blob, size_t n, double timeout, int *keep) {
    double deadline = mb_now() + timeout;
    unsigned char ch[MB_RDV_CHALLENGE];
    for (;;) {
        struct addrinfo *ai;
        MbStatus rc = rdv_resolve(addr, port, &ai);
        if (rc) return rc;
        int fd = socket(ai->ai_family, SOCK_STREAM, 0);
        int ok = fd >= 0 && connect(fd, ai->ai_addr, ai->ai_addrlen) == 0;
        freeaddrinfo(ai);
        int got = ok ? sock_io(fd, ch, sizeof ch, deadline + 5.0, 0) : 0;
        if (got == 1) {
            rc = rdv_exchange(fd, addr, port, rank, world, fp, secret, ch, blob, n, timeout);
            if (keep && !rc) *keep = fd;
            else close(fd);
            return rc;
        }
        if (fd >= 0) close(fd);
        if (got == -1)
            return mb_fail(MB_ERR_ARG, "rendezvous: %s:%d took rank %d's connection but never answered within %g s --> "
                           "is rank 0 this version of medbot?", addr, port, rank, timeout);
        if (mb_now() > deadline)
            return mb_fail(MB_ERR_ARG, "rendezvous: rank %d could not reach rank 0 at %s:%d within %g s --> is rank 0 "
                           "running, and MASTER_ADDR/MASTER_PORT the same on every rank?", rank, addr, port, timeout);
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
}

/* Every rank calls this: rank 0's blob ends up in every rank's blob. fp: this rank's job
 * fingerprint (NULL: none). With keep, the connections stay open: rank 0's keep (world) gets
 * each rank's socket (keep[0] = -1), another rank's keep[0] its socket to rank 0. */
static MbStatus rdv_open(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp, void *blob,
                         size_t n, double timeout, int *keep) {
    if (world < 1 || rank < 0 || rank >= world)
        return mb_fail(MB_ERR_ARG, "rendezvous: RANK=%d is outside 0..WORLD_SIZE-1 (WORLD_SIZE=%d)", rank, world);
    if (port <= 0 || port > 65535) return mb_fail(MB_ERR_ARG, "rendezvous: MASTER_PORT %d is not a port", port);
    if (n > MB_RDV_MAX_BLOB) return mb_fail(MB_ERR_ARG, "rendezvous: blob of %zu bytes is too large", n);
    if (keep)
        for (int r = 0; r < (rank == 0 ? world : 1); r++) keep[r] = -1;
    if (world == 1) return MB_OK;
    MbJobFingerprint *none = fp ? NULL : mb_calloc(1, sizeof *none);
    if (!fp && !none) return MB_ERR_OOM;
    const char *secret = getenv(MB_RDV_SECRET);
    if (secret && !secret[0]) secret = NULL; /* set but empty: unset */
    MbStatus rc = rank == 0 ? rdv_serve(addr, port, world, fp ? fp : none, secret, blob, n, timeout, keep)
                            : rdv_join(addr, port, rank, world, fp ? fp : none, secret, blob, n, timeout, keep);
    free(none);
    return rc;
}

MbStatus mb_rendezvous(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp, void *blob,
                       size_t n, double timeout) {
    return rdv_open(addr, port, rank, world, fp, blob, n, timeout, NULL);
}

/* ---- TCP: CPU ranks in separate processes ----
 * torchrun on machines without a GPU. The rendezvous connections stay open and carry the
 * collectives through rank 0: every rank sends its contribution, rank 0 adds them in rank order
 * (mb_sum_ranks: the thread backend's sums, bit for bit) and answers each rank with its part. A
 * rank that dies closes its socket: rank 0 sees it at once, tells the others why, and every
 * rank's collective fails (the group's failure, with a one-line message that the command prints
 * before it exits with status 1). A rank that hangs is named when --ddp_timeout runs out.
 * Checkpoints are written to a temporary folder and renamed, so the last one is whole and the
 * job resumes from it (--resume_from_checkpoint latest). */

enum { MB_TCP_ALL_REDUCE, MB_TCP_REDUCE_SCATTER, MB_TCP_ALL_GATHER, MB_TCP_BROADCAST, MB_TCP_BARRIER };
static const char *const mb_tcp_op_names[] = {"all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"};
#define MB_TCP_HDR 32 /* a contribution's header: seq, op | element size << 8 | root << 16, n, bytes */

typedef struct {
    int *fd;              /* rank 0: fd[r] is rank r's socket (fd[0] = -1); another rank: fd[0], to rank 0 */
    double timeout;       /* seconds a rank waits for the others (--ddp_timeout) */
    uint64_t seq;         /* collectives so far: every rank must be at the same one */
    unsigned char **in;   /* rank 0: (world) each rank's contribution; in[0] the reduced result */
    size_t *cap;          /* (world) bytes allocated in in[r] */
} MbTcpComm;

/* Fails the group with the message (rank 0 first tells every other rank, which fails with it too)
 * and returns that failure. */
static MbStatus tcp_stop(MbComm *c, const char *fmt, ...) MB_PRINTF(2, 3);
static MbStatus tcp_stop(MbComm *c, const char *fmt, ...) {
    MbTcpComm *t = c->ctx;
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (c->rank == 0) { /* best effort, a few seconds at most: the ranks still alive learn why */
        double until = mb_now() + 2.0;
        for (int r = 1; r < c->world; r++) {
            if (t->fd[r] < 0) continue;
            unsigned char st[16];
            rdv_put_u64(st, 1), rdv_put_u64(st + 8, strlen(why));
            if (sock_io(t->fd[r], st, 16, until, 1) == 1) sock_io(t->fd[r], why, strlen(why), until, 1);
            shutdown(t->fd[r], SHUT_WR);
        }
        /* read what they still send, so that closing does not reset the connections before the
         * message is read */
        for (int r = 1; r < c->world; r++) {
            char sink[4096];
            while (t->fd[r] >= 0 && sock_io(t->fd[r], sink, sizeof sink, until, 0) == 1) {}
        }
    }
    return comm_fail(c, MB_ERR_IO, "rank %d: %s --> the job stops; resume it from the last checkpoint with "
                     "--resume_from_checkpoint latest", c->rank, why);
}

/* in[r] of at least `bytes`; 0 when out of memory */
static int tcp_reserve(MbTcpComm *t, int r, size_t bytes) {
    if (t->cap[r] < bytes) {
        free(t->in[r]);
        t->cap[r] = 0;
        if (!(t->in[r] = mb_malloc(bytes))) return 0;
        t->cap[r] = bytes;
    }
    return 1;
}

/* bytes rank r contributes to a collective, and bytes it gets back */
static size_t tcp_contrib(int op, int r, int root, size_t n, size_t per, size_t es) {
    return (op == MB_TCP_ALL_REDUCE || op == MB_TCP_REDUCE_SCATTER ? n
            : op == MB_TCP_ALL_GATHER                             ? per
            : op == MB_TCP_BROADCAST && r == root                 ? n
                                                                  : 0) * es;
}
static size_t tcp_answer(int op, int r, int root, size_t n, size_t per, size_t es) {
    return (op == MB_TCP_REDUCE_SCATTER ? per : op == MB_TCP_BARRIER || (op == MB_TCP_BROADCAST && r == root) ? 0 : n) * es;
}

/* Rank 0: every other rank's header and contribution, read as they come. A header must agree
 * with rank 0's (want) on the collective's number, kind and size. */
static MbStatus tcp_gather(MbComm *c, const unsigned char *want, int op, int root, size_t n, size_t per, size_t es) {
    MbTcpComm *t = c->ctx;
    int world = c->world, pending = world - 1;
    size_t *got = mb_calloc((size_t)world, sizeof *got);
    unsigned char *hdr = mb_malloc((size_t)world * MB_TCP_HDR);
    struct pollfd *pf = mb_malloc((size_t)world * sizeof *pf);
    int *who = mb_malloc((size_t)world * sizeof *who);
    MbStatus rc = got && hdr && pf && who ? MB_OK : MB_ERR_OOM;
    for (int r = 1; !rc && r < world; r++)
        if (!tcp_reserve(t, r, tcp_contrib(op, r, root, n, per, es))) rc = MB_ERR_OOM;
    if (rc) rc = tcp_stop(c, "%s", mb_last_error());
    double deadline = mb_now() + t->timeout;
    while (!rc && pending) {
        int np = 0;
        for (int r = 1; r < world; r++)
            if (got[r] < MB_TCP_HDR + tcp_contrib(op, r, root, n, per, es))
                pf[np].fd = t->fd[r], pf[np].events = POLLIN, pf[np].revents = 0, who[np++] = r;
        int ms = (int)((deadline - mb_now()) * 1000);
        if (ms <= 0) {
            char names[256];
            rc = tcp_stop(c, "%s of %d did not reach %s within %g s (--ddp_timeout)", rank_list(names, sizeof names, who, np),
                          world, mb_tcp_op_names[op], t->timeout);
            break;
        }
        if (poll(pf, (nfds_t)np, ms) <= 0) continue;
        for (int i = 0; !rc && i < np; i++) {
            if (!pf[i].revents) continue;
            int r = who[i];
            size_t total = MB_TCP_HDR + tcp_contrib(op, r, root, n, per, es);
            unsigned char *dst = got[r] < MB_TCP_HDR ? hdr + (size_t)r * MB_TCP_HDR + got[r] : t->in[r] + (got[r] - MB_TCP_HDR);
            size_t room = got[r] < MB_TCP_HDR ? MB_TCP_HDR - got[r] : total - got[r];
            ssize_t k = recv(t->fd[r], dst, room, 0);
            if (k < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
            if (k <= 0) {
                int e = errno;
                close(t->fd[r]), t->fd[r] = -1;
                rc = tcp_stop(c, "rank %d of %d stopped (its connection closed%s%s) during %s", r, world, k < 0 ? ": " : "",
                              k < 0 ? strerror(e) : "", mb_tcp_op_names[op]);
                break;
            }
            got[r] += (size_t)k;
            if (got[r] == MB_TCP_HDR && (memcmp(hdr + (size_t)r * MB_TCP_HDR, want, 24) != 0 ||
                                         rdv_get_u64(hdr + (size_t)r * MB_TCP_HDR + 24) != total - MB_TCP_HDR)) {
                const unsigned char *h = hdr + (size_t)r * MB_TCP_HDR;
                uint64_t o = rdv_get_u64(h + 8) & 0xff;
                rc = tcp_stop(c, "rank %d is at collective #%llu (%s of %llu values), rank 0 at #%llu (%s of %zu values): "
                              "the ranks disagree --> give every rank the same data and options", r,
                              (unsigned long long)rdv_get_u64(h), o < 5 ? mb_tcp_op_names[o] : "?",
                              (unsigned long long)rdv_get_u64(h + 16), (unsigned long long)t->seq, mb_tcp_op_names[op], n);
                break;
            }
            if (got[r] == total) pending--;
        }
    }
    free(got), free(hdr), free(pf), free(who);
    return rc;
}

/* One collective. x: this rank's contribution (NULL when it has none); out: where its answer
 * goes (n, or per values of es bytes; NULL when none). */
static MbStatus tcp_collective(MbComm *c, int op, int root, size_t es, size_t n, const void *x, void *out) {
    MbTcpComm *t = c->ctx;
    int world = c->world;
    size_t per = n / (size_t)world;
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    unsigned char hdr[MB_TCP_HDR];
    rdv_put_u64(hdr, t->seq++);
    rdv_put_u64(hdr + 8, (uint64_t)op | (uint64_t)es << 8 | (uint64_t)root << 16);
    rdv_put_u64(hdr + 16, n);
    if (c->rank > 0) { /* send, then wait for rank 0's answer */
        size_t mine = tcp_contrib(op, c->rank, root, n, per, es), back = tcp_answer(op, c->rank, root, n, per, es);
        rdv_put_u64(hdr + 24, mine);
        int fd = t->fd[0];
        /* rank 0 names a late rank when its own timeout runs out: wait longer than that */
        double deadline = mb_now() + t->timeout + 30.0;
        int ok = sock_io(fd, hdr, MB_TCP_HDR, deadline, 1);
        if (ok == 1 && mine) ok = sock_io(fd, (void *)x, mine, deadline, 1);
        unsigned char st[16];
        /* even when sending failed, rank 0 may have said why before it hung up */
        int got = sock_io(fd, st, 16, ok == 1 ? deadline : mb_now() + 1.0, 0);
        if (got == 1 && rdv_get_u64(st) == 1) {
            char why[513];
            size_t len = (size_t)MB_MIN(rdv_get_u64(st + 8), 512);
            why[sock_io(fd, why, len, mb_now() + 2.0, 0) == 1 ? len : 0] = 0;
            return tcp_stop(c, "stopping: %s", why[0] ? why : "rank 0 stopped");
        }
        if (got == -1 && ok != 0)
            return tcp_stop(c, "rank 0 did not answer %s within %g s (--ddp_timeout)", mb_tcp_op_names[op], t->timeout);
        if (got != 1 || ok != 1) return tcp_stop(c, "rank 0 stopped (its connection closed) during %s", mb_tcp_op_names[op]);
        if (rdv_get_u64(st + 8) != back) return tcp_stop(c, "rank 0 answered %s with a wrong size", mb_tcp_op_names[op]);
        if (back && sock_io(fd, out, back, deadline, 0) != 1)
            return tcp_stop(c, "rank 0 stopped (its connection closed) during %s", mb_tcp_op_names[op]);
        return MB_OK;
    }
    rdv_put_u64(hdr + 24, 0);
    if ((rc = tcp_gather(c, hdr, op, root, n, per, es))) return rc; /* every rank's header must agree with rank 0's */
    const void **slot = mb_malloc((size_t)world * sizeof *slot);
    if (!slot || ((op == MB_TCP_ALL_REDUCE || op == MB_TCP_REDUCE_SCATTER) && !tcp_reserve(t, 0, n * es)))
        return free(slot), tcp_stop(c, "%s", mb_last_error());
    slot[0] = x;
    for (int r = 1; r < world; r++) slot[r] = t->in[r];
    const void *answer = NULL; /* what every rank gets (or, for reduce_scatter, the whole sum) */
    if (op == MB_TCP_ALL_REDUCE || op == MB_TCP_REDUCE_SCATTER) {
        mb_sum_ranks(slot, world, t->in[0], 0, n, es == sizeof(double));
        answer = t->in[0];
        memcpy(out, t->in[0], (op == MB_TCP_ALL_REDUCE ? n : per) * es);
    } else if (op == MB_TCP_ALL_GATHER) {
        for (int r = 0; r < world; r++)
            if ((const char *)out + (size_t)r * per * es != slot[r]) memmove((char *)out + (size_t)r * per * es, slot[r], per * es);
        answer = out;
    } else if (op == MB_TCP_BROADCAST) {
        if (root != 0) memcpy(out, slot[root], n * es);
        answer = out;
    }
    free(slot);
    double deadline = mb_now() + t->timeout;
    for (int r = 1; r < world; r++) {
        size_t back = tcp_answer(op, r, root, n, per, es);
        const char *part = op == MB_TCP_REDUCE_SCATTER ? (const char *)answer + (size_t)r * per * es : answer;
        unsigned char st[16];
        rdv_put_u64(st, 0), rdv_put_u64(st + 8, back);
        int ok = sock_io(t->fd[r], st, 16, deadline, 1);
        if (ok == 1 && back) ok = sock_io(t->fd[r], (void *)part, back, deadline, 1);
        if (ok == 0) close(t->fd[r]), t->fd[r] = -1;
        if (ok != 1)
            return tcp_stop(c, "rank %d of %d %s during %s", r, world, ok ? "did not take its answer within the timeout"
                            : "stopped (its connection closed)", mb_tcp_op_names[op]);
    }
    return MB_OK;
}

static MbStatus tcp_all_reduce(MbComm *c, float *x, size_t n) {
    return tcp_collective(c, MB_TCP_ALL_REDUCE, 0, sizeof *x, n, x, x);
}
static MbStatus tcp_all_reduce_f64(MbComm *c, double *x, size_t n) {
    return tcp_collective(c, MB_TCP_ALL_REDUCE, 0, sizeof *x, n, x, x);
}
static MbStatus tcp_reduce_scatter(MbComm *c, float *shard, const float *x, size_t n) {
    return tcp_collective(c, MB_TCP_REDUCE_SCATTER, 0, sizeof *x, n, x, shard);
}
static MbStatus tcp_reduce_scatter_f64(MbComm *c, double *shard, const double *x, size_t n) {
    return tcp_collective(c, MB_TCP_REDUCE_SCATTER, 0, sizeof *x, n, x, shard);
}
static MbStatus tcp_all_gather(MbComm *c, float *x, const float *shard, size_t n) {
    return tcp_collective(c, MB_TCP_ALL_GATHER, 0, sizeof *x, n, shard, x);
}
static MbStatus tcp_broadcast(MbComm *c, float *x, size_t n, int root) {
    return tcp_collective(c, MB_TCP_BROADCAST, root, sizeof *x, n, x, x);
}
static MbStatus tcp_barrier(MbComm *c) { return tcp_collective(c, MB_TCP_BARRIER, 0, 1, 0, NULL, NULL); }

static void tcp_state_free(MbTcpComm *t, int rank, int world) {
    for (int r = 0; t->fd && r < (rank == 0 ? world : 1); r++)
        if (t->fd[r] >= 0) close(t->fd[r]);
    for (int r = 0; t->in && r < world; r++) free(t->in[r]);
    free(t->in), free(t->cap), free(t->fd), free(t);
}

static void tcp_destroy(MbComm *c) {
    tcp_state_free(c->ctx, c->rank, c->world);
    comm_free(c);
}

static const MbComm mb_comm_tcp_proto = {
    .all_reduce = tcp_all_reduce, .reduce_scatter = tcp_reduce_scatter, .all_gather = tcp_all_gather,
    .broadcast = tcp_broadcast, .barrier = tcp_barrier, .destroy = tcp_destroy, .all_reduce_f64 = tcp_all_reduce_f64,
    .reduce_scatter_f64 = tcp_reduce_scatter_f64, .all_reduce_host = tcp_all_reduce_f64};

/* The communicator of a process that is one rank of a job (TCP, NCCL): backend proto around
 * ctx, in a group of its own. NULL when out of memory (then ctx is still the caller's). */
static MbComm *comm_new_process(const MbComm *proto, int rank, int world, void *ctx) {
    MbCommFail *fail = comm_fail_new();
    MbComm *c = fail ? comm_new(proto, rank, world, ctx, fail) : NULL;
    if (!c) free(fail);
    return c;
}

/* This process's rank of a CPU job of `world` processes, joined at addr:port (fp: the job's
 * fingerprint, which every rank must share). */
static MbStatus mb_comm_tcp_new(const char *addr, int port, int rank, int world, const MbJobFingerprint *fp,
                                double timeout, MbComm **out) {
    *out = NULL;
    MbTcpComm *t = mb_calloc(1, sizeof *t);
    if (!t || !(t->fd = mb_malloc((size_t)world * sizeof *t->fd))) return free(t), MB_ERR_OOM;
    t->timeout = comm_timeout(timeout);
    char blob[8] = "medbot";
    MbStatus rc = rdv_open(addr, port, rank, world, fp, blob, sizeof blob, t->timeout, t->fd);
    if (rc) {
        free(t->fd), free(t);
        return rc;
    }
    for (int r = 0; r < (rank == 0 ? world : 1); r++)
        if (t->fd[r] >= 0) {
            int one = 1; /* small messages go out at once (no Nagle delay) */
            setsockopt(t->fd[r], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            rdv_nosigpipe(t->fd[r]);
            fcntl(t->fd[r], F_SETFL, fcntl(t->fd[r], F_GETFL) | O_NONBLOCK);
        }
    t->in = mb_calloc((size_t)world, sizeof *t->in);
    t->cap = mb_calloc((size_t)world, sizeof *t->cap);
    MbComm *c = t->in && t->cap ? comm_new_process(&mb_comm_tcp_proto, rank, world, t) : NULL;
    if (!c) {
        tcp_state_free(t, rank, world);
        return MB_ERR_OOM;
    }
    *out = c;
    return MB_OK;
}

/* ---- the launchers' variables: which process is which rank ----
 * torchrun's RANK / WORLD_SIZE / LOCAL_RANK; else Open MPI's OMPI_COMM_WORLD_RANK / _SIZE /
 * _LOCAL_RANK; else MPICH's and Intel MPI's PMI_RANK / PMI_SIZE with MPI_LOCALRANKID; else
 * SLURM's SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID, which srun sets for each task of a
 * step (an sbatch script carries its allocation's SLURM_PROCID=0 and SLURM_NTASKS without being
 * a step of that many tasks: it is one process, and srun starts the ranks). MASTER_ADDR /
 * MASTER_PORT (default 127.0.0.1:29500) place the rendezvous for all. The launcher nearest the process
 * comes first: mpirun inside an sbatch allocation leaves the allocation's SLURM_* variables in
 * every rank, torchrun inside srun too. A launcher that gives no local rank gets the rank: right
 * on one machine; on several, a rank beyond the machine's GPUs fails naming it, where a guess of
 * 0 would have put every rank on one GPU. */

typedef struct {
    int rank, world, local_rank, port; /* world 0: no launcher (one process) */
    char addr[256];
    char source[160];                  /* where rank and world came from, for the run's first lines */
} MbLaunchEnv;

static const struct {
    const char *on;    /* the variable that says this launcher started the process */
    const char *rank, *size, *step_size, *local;
} mb_launchers[] = {
    {"WORLD_SIZE", "RANK", "WORLD_SIZE", NULL, "LOCAL_RANK"},
    {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", NULL, "OMPI_COMM_WORLD_LOCAL_RANK"},
    {"PMI_RANK", "PMI_RANK", "PMI_SIZE", NULL, "MPI_LOCALRANKID"},
    {"SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", NULL, "SLURM_LOCALID"},
};

/* *set: whether environment variable `name` is set (an empty value is unset); then *out is its
 * value, which must be a non-negative integer. */
static MbStatus env_int(const char *name, int *out, int *set) {
    const char *v = getenv(name);
    *set = v && v[0];
    if (!*set) return MB_OK;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (*v < '0' || *v > '9' || *end || errno || x > INT_MAX)
        return mb_fail(MB_ERR_ARG, "%s='%s' is not a non-negative integer --> check what the launcher sets", name, v);
    *out = (int)x;
    return MB_OK;
}

/* rank, world and local rank from launcher f */
static MbStatus launch_from(int f, MbLaunchEnv *e) {
    const char *size = mb_launchers[f].size, *rank = mb_launchers[f].rank, *local = mb_launchers[f].local;
    int set = 0, rank_set = 0, local_set = 0;
    MbStatus rc = mb_launchers[f].step_size ? env_int(mb_launchers[f].step_size, &e->world, &set) : MB_OK;
    if (set) size = mb_launchers[f].step_size;
    if (!rc && !set) rc = env_int(size, &e->world, &set);
    if (!rc) rc = env_int(rank, &e->rank, &rank_set);
    e->local_rank = e->rank;
    if (!rc) rc = env_int(local, &e->local_rank, &local_set);
    if (rc) return rc;
    if (!set) return mb_fail(MB_ERR_ARG, "%s is set but %s is not --> the launcher sets both", rank, size);
    if (!rank_set && e->world > 1)
        return mb_fail(MB_ERR_ARG, "%s=%d is set but %s is not --> the launcher sets both", size, e->world, rank);
    if (e->world < 1) return mb_fail(MB_ERR_ARG, "%s=0: a job has at least one rank", size);
    if (e->rank >= e->world)
        return mb_fail(MB_ERR_ARG, "%s=%d is outside 0..%s-1 (%s=%d)", rank, e->rank, size, size, e->world);
    snprintf(e->source, sizeof e->source, "%s/%s%s%s%s", rank, size, local_set ? "" : " (no ",
             local_set ? "" : local, local_set ? "" : ": local rank = rank)");
    return MB_OK;
}

/* The rank of this process from its launcher's environment; world 0 when no launcher started it
 * (then a single process). A malformed or half-set variable is an error naming it. */
MB_UNUSED static MbStatus mb_launch_env(MbLaunchEnv *e) {
    memset(e, 0, sizeof *e);
    MbStatus rc = MB_OK;
    for (int f = 0; f < (int)(sizeof mb_launchers / sizeof *mb_launchers); f++) {
        const char *on = getenv(mb_launchers[f].on);
        if (on && on[0]) {
            rc = launch_from(f, e);
            break;
        }
    }
    int set;
    e->port = 29500;
    if (!rc) rc = env_int("MASTER_PORT", &e->port, &set);
    if (!rc && (e->port < 1 || e->port > 65535))
        rc = mb_fail(MB_ERR_ARG, "MASTER_PORT=%d is not a port (1..65535)", e->port);
    const char *a = getenv("MASTER_ADDR");
    snprintf(e->addr, sizeof e->addr, "%s", a && a[0] ? a : "127.0.0.1");
    return rc;
}

/* ---- NCCL: one rank per GPU ----
 * Buffers are device memory of the rank's GPU. A collective first waits for the work already
 * queued on the device, runs on the communicator's stream and is waited for here, so the callers
 * see the plain synchronous semantics of MbComm. A rank that died or hangs never joins it: NCCL
 * reports the broken connection as an asynchronous error, or --ddp_timeout runs out; either way
 * the communicator is aborted and the group fails with a message, as the TCP backend does (the
 * last checkpoint on disk is whole). The device side (the driver, NCCL's calls, the
 * communicator's context and stream) is section 12's, declared here. */

typedef struct MbNcclRank MbNcclRank; /* section 12: one rank's NCCL communicator on its GPU */
enum { MB_NCCL_ALL_REDUCE, MB_NCCL_REDUCE_SCATTER, MB_NCCL_ALL_GATHER, MB_NCCL_BROADCAST };
/* This process's rank of a job of `world` processes on GPU gpu; rank 0 makes the NCCL unique id
 * and exchange(arg, id, n) (the rendezvous) hands it to every rank. */
static MbStatus nccl_rank_new(int rank, int world, int gpu, MbStatus (*exchange)(void *arg, void *id, size_t n),
                              void *arg, MbNcclRank **out);
/* world ranks of one process on GPUs gpu0 .. gpu0 + world - 1 (out: world of them) */
static MbStatus nccl_ranks_new_all(int world, int gpu0, MbNcclRank **out);
/* Queues collective op (fp32, or fp64 with f64) of count values per rank's part (root: a
 * broadcast's) after the work queued on the device. */
static MbStatus nccl_rank_start(MbNcclRank *k, int op, int f64, const void *send, void *recv, size_t count, int root);
/* Queues the sum over ranks of n host doubles, in place (through device scratch). */
static MbStatus nccl_rank_start_host(MbNcclRank *k, double *x, size_t n);
/* 1: the queued collective finished; 0: not yet; -1: it failed: *nccl_error is NCCL's asynchronous
 * error, or NULL for a failed driver call (its message is set) */
static int nccl_rank_poll(MbNcclRank *k, const char **nccl_error);
static void nccl_rank_abort(MbNcclRank *k);
static void nccl_rank_free(MbNcclRank *k);

typedef struct {
    MbNcclRank *k;
    double timeout; /* seconds a collective may take (--ddp_timeout) */
} MbNcclComm;

/* Fails the group with an NCCL collective's failure: the communicator is aborted (the others'
 * collectives then fail too, or time out) and the ranks of this process leave theirs. */
static MbStatus nc_fail(MbComm *c, const char *fmt, ...) MB_PRINTF(2, 3);
static MbStatus nc_fail(MbComm *c, const char *fmt, ...) {
    char why[600];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    nccl_rank_abort(((MbNcclComm *)c->ctx)->k);
    return comm_fail(c, MB_ERR_DEVICE, "rank %d of %d: %s --> the job stops; resume it from the last checkpoint with "
                     "--resume_from_checkpoint latest", c->rank, c->world, why);
}

/* Waits for the collective `what` that start queued (start: its status, message set). */
static MbStatus nc_done(MbComm *c, MbStatus start, const char *what) {
    MbNcclComm *n = c->ctx;
    if (start) return nccl_rank_abort(n->k), comm_fail(c, start, "%s", mb_last_error());
    double deadline = mb_now() + n->timeout;
    for (;;) {
        const char *nccl_error = NULL;
        int done = nccl_rank_poll(n->k, &nccl_error);
        if (done > 0) return MB_OK;
        if (done < 0 && !nccl_error) return nccl_rank_abort(n->k), comm_fail(c, MB_ERR_DEVICE, "%s", mb_last_error());
        if (done < 0) return nc_fail(c, "NCCL %s failed: %s", what, nccl_error);
        MbStatus rc = comm_status(c); /* another rank of this process failed the group */
        if (rc) return nccl_rank_abort(n->k), rc;
        if (mb_now() > deadline)
            return nc_fail(c, "NCCL %s did not finish within %g s (--ddp_timeout): another rank died or hangs", what,
                           n->timeout);
        struct timespec ts = {0, 20 * 1000};
        nanosleep(&ts, NULL);
    }
}

static MbStatus nc_collective(MbComm *c, int op, int f64, const void *send, void *recv, size_t count, int root,
                              const char *what) {
    MbStatus rc = comm_status(c);
    if (rc) return rc;
    return nc_done(c, nccl_rank_start(((MbNcclComm *)c->ctx)->k, op, f64, send, recv, count, root), what);
}

static MbStatus nc_all_reduce(MbComm *c, float *x, size_t n) {
    return nc_collective(c, MB_NCCL_ALL_REDUCE, 0, x, x, n, 0, "all_reduce");
}
static MbStatus nc_reduce_scatter(MbComm *c, float *shard, const float *x, size_t n) {
    return nc_collective(c, MB_NCCL_REDUCE_SCATTER, 0, x, shard, n / (size_t)c->world, 0, "reduce_scatter");
}
static MbStatus nc_all_gather(MbComm *c, float *x, const float *shard, size_t n) {
    return nc_collective(c, MB_NCCL_ALL_GATHER, 0, shard, x, n / (size_t)c->world, 0, "all_gather");
}
static MbStatus nc_broadcast(MbComm *c, float *x, size_t n, int root) {
    return nc_collective(c, MB_NCCL_BROADCAST, 0, x, x, n, root, "broadcast");
}
static MbStatus nc_all_reduce_f64(MbComm *c, double *x, size_t n) {
    return nc_collective(c, MB_NCCL_ALL_REDUCE, 1, x, x, n, 0, "all_reduce");
}
static MbStatus nc_reduce_scatter_f64(MbComm *c, double *shard, const double *x, size_t n) {
    return nc_collective(c, MB_NCCL_REDUCE_SCATTER, 1, x, shard, n / (size_t)c->world, 0, "reduce_scatter");
}
/* metrics and flags: host doubles through the device */
static MbStatus nc_all_reduce_host(MbComm *c, double *x, size_t n) {
    MbStatus rc = comm_status(c);
    return rc ? rc : nc_done(c, nccl_rank_start_host(((MbNcclComm *)c->ctx)->k, x, n), "all_reduce");
}
static MbStatus nc_barrier(MbComm *c) {
    double one = 1;
    return nc_all_reduce_host(c, &one, 1);
}
static void nc_destroy(MbComm *c) {
    MbNcclComm *n = c->ctx;
    nccl_rank_free(n->k);
    free(n);
    comm_free(c);
}

static const MbComm mb_comm_nccl_proto = {
    .all_reduce = nc_all_reduce, .reduce_scatter = nc_reduce_scatter, .all_gather = nc_all_gather,
    .broadcast = nc_broadcast, .barrier = nc_barrier, .destroy = nc_destroy, .all_reduce_f64 = nc_all_reduce_f64,
    .reduce_scatter_f64 = nc_reduce_scatter_f64, .all_reduce_host = nc_all_reduce_host};

/* The MbComm of rank `rank` of `world` around k (which it then owns), in group fail (NULL: a
 * group of its own). On a failure k is freed. */
static MbStatus nc_comm_new(MbNcclRank *k, int rank, int world, double timeout, MbCommFail *fail, MbComm **out) {
    MbNcclComm *n = mb_calloc(1, sizeof *n);
    MbComm *c = NULL;
    if (n) {
        n->k = k, n->timeout = comm_timeout(timeout);
        c = fail ? comm_new(&mb_comm_nccl_proto, rank, world, n, fail) : comm_new_process(&mb_comm_nccl_proto, rank, world, n);
    }
    if (!c) {
        free(n);
        nccl_rank_free(k);
        return MB_ERR_OOM;
    }
    *out = c;
    return MB_OK;
}

typedef struct {
    const char *addr;
    int port, rank, world;
    const MbJobFingerprint *fp;
    double timeout;
} MbRdvArgs;

/* the rendezvous as nccl_rank_new's exchange: rank 0's unique id to every rank */
static MbStatus nc_rendezvous(void *arg, void *id, size_t n) {
    const MbRdvArgs *a = arg;
    return rdv_open(a->addr, a->port, a->rank, a->world, a->fp, id, n, a->timeout, NULL);
}

/* A communicator of a multi-process job (torchrun, SLURM, MPI): rank 0 makes the NCCL unique id
 * and the TCP rendezvous hands it to the ranks whose fingerprint fp matches. This process's rank
 * runs on GPU `gpu` (its local rank). */
static MbStatus mb_comm_nccl_new(const char *addr, int port, int rank, int world, int gpu, const MbJobFingerprint *fp,
                                 double timeout, MbComm **out) {
    *out = NULL;
    MbRdvArgs a = {addr, port, rank, world, fp, comm_timeout(timeout)};
    MbNcclRank *k;
    MbStatus rc = nccl_rank_new(rank, world, gpu, nc_rendezvous, &a, &k);
    return rc ? rc : nc_comm_new(k, rank, world, timeout, NULL, out);
}

/* world communicators of one process driving GPUs gpu0 .. gpu0 + world - 1 (--nproc with CUDA),
 * one group: a rank whose collective fails makes the others leave theirs. */
static MbStatus mb_comm_nccl_new_all(int world, int gpu0, double timeout, MbComm **comms) {
    MbNcclRank **ks = mb_calloc((size_t)world, sizeof *ks);
    MbCommFail *fail = comm_fail_new();
    MbStatus rc = ks && fail ? nccl_ranks_new_all(world, gpu0, ks) : MB_ERR_OOM;
    int made = 0;
    for (int r = 0; !rc && r < world; r++) {
        rc = nc_comm_new(ks[r], r, world, timeout, fail, &comms[r]); /* owns ks[r], also when it fails */
        ks[r] = NULL;
        made += rc == MB_OK;
    }
    if (rc) {
        for (int r = 0; ks && r < world; r++) nccl_rank_free(ks[r]);
        for (int r = 0; r < made; r++) nc_destroy(comms[r]), comms[r] = NULL;
        if (!made) free(fail);
    }
    free(ks);
    return rc;
}

// ============================================================================================
// ---------- 12. cuda ----------
// The op table on an NVIDIA GPU. Nothing here needs the CUDA toolkit to compile: the driver API
// (libcuda.so.1), NVRTC, cuBLASLt and NCCL are opened with dlopen at run time through small
// tables of function pointers declared below (a machine without a driver runs the CPU backend;
// tests/test_kernels.c checks every declaration against the toolkit's headers). Kernels come
// from kernels.cu.in, specialized by NVRTC for the device (HEAD_DIM, shared-memory tiles), as a
// cubin for its exact architecture, cached on disk.
//
// Memory: activations bf16 (act_size 2), statistics/log-probs/logits fp32 (the model's block32),
// LoRA parameters, gradients and AdamW moments fp32, step gradient sums fp64, all in device
// memory allocated by ops->alloc. Frozen weights are uploaded once, on first use, and kept in
// hash maps keyed by the weight's host data pointer: dense weights as bf16, norm weights as fp32,
// NF4 weights as their packed codes + absmax codes + scales (0.5 B a value plus ~1/64 B). A weight
// whose data already lies in device memory this backend allocated (LoRA A/B, --random_init) is
// used in place. GEMMs: cuBLASLt, bf16 operands, fp32 accumulation; NF4 weights are dequantized a
// tile of rows (forward) or columns (backward) at a time into a workspace feeding cuBLASLt, or,
// for decode (N <= 8), inside a fused matrix-vector kernel. Ops run on one stream per backend;
// to_host, sumsq and free synchronize. Every failure is an MbStatus with the call, file, line and
// a hint: setup returns it; inside an op (a void function) it becomes the backend's sticky
// failure (MbOps.err), after which the ops only free, and the model returns it.
// ============================================================================================

#include <dlfcn.h>

#ifdef MB_CUDA_HEADER_CHECK /* tests/test_kernels.c: the declarations below must match the toolkit */
#include <cuda.h>
#include <cublasLt.h>
#include <nccl.h>
#include <nvrtc.h>
typedef CUresult MbCuResult;
typedef CUdevice MbCuDevice;
typedef CUdeviceptr MbCuDevPtr;
typedef CUcontext MbCuContext;
typedef CUmodule MbCuModule;
typedef CUfunction MbCuFunction;
typedef CUstream MbCuStream;
typedef CUevent MbCuEvent;
typedef CUdevice_attribute MbCuDevAttr;
typedef CUfunction_attribute MbCuFuncAttr;
typedef nvrtcResult MbNvrtcResult;
typedef nvrtcProgram MbNvrtcProgram;
typedef cublasStatus_t MbLtStatus;
typedef cublasLtHandle_t MbLtHandle;
typedef cublasLtMatmulDesc_t MbLtDesc;
typedef cublasLtMatrixLayout_t MbLtLayout;
typedef cublasLtMatmulPreference_t MbLtPref;
typedef cublasComputeType_t MbLtCompute;
typedef cudaDataType_t MbLtDataType;
typedef cublasLtMatmulDescAttributes_t MbLtDescAttr;
typedef cublasLtMatmulPreferenceAttributes_t MbLtPrefAttr;
typedef ncclResult_t MbNcclResult;
typedef ncclComm_t MbNcclComm_t;
typedef ncclDataType_t MbNcclDataType;
typedef ncclRedOp_t MbNcclRedOp;
#else
typedef int MbCuResult;
typedef int MbCuDevice;
typedef unsigned long long MbCuDevPtr;
typedef struct MbCuContext_ *MbCuContext;
typedef struct MbCuModule_ *MbCuModule;
typedef struct MbCuFunction_ *MbCuFunction;
typedef struct MbCuStream_ *MbCuStream;
typedef struct MbCuEvent_ *MbCuEvent;
typedef int MbCuDevAttr;
typedef int MbCuFuncAttr;
typedef int MbNvrtcResult;
typedef struct MbNvrtcProgram_ *MbNvrtcProgram;
typedef int MbLtStatus;
typedef struct MbLtHandle_ *MbLtHandle;
typedef struct MbLtDesc_ *MbLtDesc;
typedef struct MbLtLayout_ *MbLtLayout;
typedef struct MbLtPref_ *MbLtPref;
typedef int MbLtCompute;
typedef int MbLtDataType;
typedef int MbLtDescAttr;
typedef int MbLtPrefAttr;
typedef int MbNcclResult;
typedef struct MbNcclComm_ *MbNcclComm_t;
typedef int MbNcclDataType;
typedef int MbNcclRedOp;
#endif

/* The few enum values and structs medbot uses, as the headers define them (typed, so that the
 * header check compiles them against the real enums) */
#define MB_CU_ERROR_STUB_LIBRARY 34
#define MB_CU_ERROR_NO_DEVICE 100
#define MB_CU_ERROR_NOT_READY 600
#define MB_CU_ATTR_SM_COUNT ((MbCuDevAttr)16)
#define MB_CU_ATTR_CC_MAJOR ((MbCuDevAttr)75)
#define MB_CU_ATTR_CC_MINOR ((MbCuDevAttr)76)
#define MB_CU_ATTR_SMEM_OPTIN ((MbCuDevAttr)97)
#define MB_CU_FUNC_MAX_DYNAMIC_SMEM ((MbCuFuncAttr)8)
#define MB_CUDA_R_32F ((MbLtDataType)0)
#define MB_CUDA_R_16BF ((MbLtDataType)14)
#define MB_CUBLAS_COMPUTE_32F ((MbLtCompute)68)
#define MB_CUBLAS_OP_N 0
#define MB_CUBLAS_OP_T 1
#define MB_LT_DESC_TRANSA ((MbLtDescAttr)3)
#define MB_LT_DESC_TRANSB ((MbLtDescAttr)4)
#define MB_LT_PREF_MAX_WORKSPACE ((MbLtPrefAttr)1)
#define MB_LT_PREF_ALIGN_A ((MbLtPrefAttr)5)
#define MB_LT_PREF_ALIGN_B ((MbLtPrefAttr)6)
#define MB_LT_PREF_ALIGN_C ((MbLtPrefAttr)7)
#define MB_LT_PREF_ALIGN_D ((MbLtPrefAttr)8)
#define MB_NCCL_FLOAT32 ((MbNcclDataType)7)
#define MB_NCCL_FLOAT64 ((MbNcclDataType)8)
#define MB_NCCL_SUM ((MbNcclRedOp)0)

struct MbLtAlgo_ { uint64_t data[8]; };                           /* cublasLtMatmulAlgo_t */
struct MbLtHeuristic_ {                                           /* cublasLtMatmulHeuristicResult_t */
    struct MbLtAlgo_ algo;
    size_t workspaceSize;
    int state;
    float wavesCount;
    int reserved[4];
};
struct MbNcclUniqueId_ { char internal[128]; };                   /* ncclUniqueId */
#ifdef MB_CUDA_HEADER_CHECK
typedef cublasLtMatmulAlgo_t MbLtAlgo;
typedef cublasLtMatmulHeuristicResult_t MbLtHeuristic;
typedef ncclUniqueId MbNcclUniqueId;
#else
typedef struct MbLtAlgo_ MbLtAlgo;
typedef struct MbLtHeuristic_ MbLtHeuristic;
typedef struct MbNcclUniqueId_ MbNcclUniqueId;
#endif

/* X(return type, member = the header's name, symbol in the library, parameters) */
#define MB_CU_FUNCS(X)                                                                                  \
    X(MbCuResult, cuInit, "cuInit", (unsigned int))                                                     \
    X(MbCuResult, cuDriverGetVersion, "cuDriverGetVersion", (int *))                                    \
    X(MbCuResult, cuDeviceGetCount, "cuDeviceGetCount", (int *))                                        \
    X(MbCuResult, cuDeviceGet, "cuDeviceGet", (MbCuDevice *, int))                                      \
    X(MbCuResult, cuDeviceGetAttribute, "cuDeviceGetAttribute", (int *, MbCuDevAttr, MbCuDevice))       \
    X(MbCuResult, cuDeviceGetName, "cuDeviceGetName", (char *, int, MbCuDevice))                        \
    X(MbCuResult, cuDeviceTotalMem, "cuDeviceTotalMem_v2", (size_t *, MbCuDevice))                      \
    X(MbCuResult, cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", (MbCuContext *, MbCuDevice))    \
    X(MbCuResult, cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2", (MbCuDevice))              \
    X(MbCuResult, cuCtxSetCurrent, "cuCtxSetCurrent", (MbCuContext))                                    \
    X(MbCuResult, cuCtxSynchronize, "cuCtxSynchronize", (void))                                         \
    X(MbCuResult, cuMemGetInfo, "cuMemGetInfo_v2", (size_t *, size_t *))                                \
    X(MbCuResult, cuMemAlloc, "cuMemAlloc_v2", (MbCuDevPtr *, size_t))                                  \
    X(MbCuResult, cuMemFree, "cuMemFree_v2", (MbCuDevPtr))                                              \
    X(MbCuResult, cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2", (MbCuDevPtr, const void *, size_t, MbCuStream)) \
    X(MbCuResult, cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2", (void *, MbCuDevPtr, size_t, MbCuStream))       \
    X(MbCuResult, cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2", (MbCuDevPtr, MbCuDevPtr, size_t, MbCuStream))   \
    X(MbCuResult, cuMemsetD8Async, "cuMemsetD8Async", (MbCuDevPtr, unsigned char, size_t, MbCuStream))       \
    X(MbCuResult, cuModuleLoadData, "cuModuleLoadData", (MbCuModule *, const void *))                   \
    X(MbCuResult, cuModuleUnload, "cuModuleUnload", (MbCuModule))                                       \
    X(MbCuResult, cuModuleGetFunction, "cuModuleGetFunction", (MbCuFunction *, MbCuModule, const char *)) \
    X(MbCuResult, cuModuleGetGlobal, "cuModuleGetGlobal_v2", (MbCuDevPtr *, size_t *, MbCuModule, const char *)) \
    X(MbCuResult, cuFuncSetAttribute, "cuFuncSetAttribute", (MbCuFunction, MbCuFuncAttr, int))          \
    X(MbCuResult, cuLaunchKernel, "cuLaunchKernel", (MbCuFunction, unsigned int, unsigned int, unsigned int, \
                                                     unsigned int, unsigned int, unsigned int, unsigned int, \
                                                     MbCuStream, void **, void **))                     \
    X(MbCuResult, cuStreamCreate, "cuStreamCreate", (MbCuStream *, unsigned int))                       \
    X(MbCuResult, cuStreamDestroy, "cuStreamDestroy_v2", (MbCuStream))                                  \
    X(MbCuResult, cuStreamSynchronize, "cuStreamSynchronize", (MbCuStream))                             \
    X(MbCuResult, cuStreamQuery, "cuStreamQuery", (MbCuStream))                                         \
    X(MbCuResult, cuEventCreate, "cuEventCreate", (MbCuEvent *, unsigned int))                          \
    X(MbCuResult, cuEventRecord, "cuEventRecord", (MbCuEvent, MbCuStream))                              \
    X(MbCuResult, cuEventSynchronize, "cuEventSynchronize", (MbCuEvent))                                \
    X(MbCuResult, cuEventElapsedTime, "cuEventElapsedTime", (float *, MbCuEvent, MbCuEvent))            \
    X(MbCuResult, cuEventDestroy, "cuEventDestroy_v2", (MbCuEvent))                                     \
    X(MbCuResult, cuGetErrorName, "cuGetErrorName", (MbCuResult, const char **))                        \
    X(MbCuResult, cuGetErrorString, "cuGetErrorString", (MbCuResult, const char **))

#define MB_NVRTC_FUNCS(X)                                                                               \
    X(MbNvrtcResult, nvrtcVersion, "nvrtcVersion", (int *, int *))                                      \
    X(MbNvrtcResult, nvrtcGetNumSupportedArchs, "nvrtcGetNumSupportedArchs", (int *))                   \
    X(MbNvrtcResult, nvrtcGetSupportedArchs, "nvrtcGetSupportedArchs", (int *))                         \
    X(MbNvrtcResult, nvrtcCreateProgram, "nvrtcCreateProgram", (MbNvrtcProgram *, const char *, const char *, \
                                                                int, const char *const *, const char *const *)) \
    X(MbNvrtcResult, nvrtcDestroyProgram, "nvrtcDestroyProgram", (MbNvrtcProgram *))                    \
    X(MbNvrtcResult, nvrtcCompileProgram, "nvrtcCompileProgram", (MbNvrtcProgram, int, const char *const *)) \
    X(MbNvrtcResult, nvrtcGetProgramLogSize, "nvrtcGetProgramLogSize", (MbNvrtcProgram, size_t *))      \
    X(MbNvrtcResult, nvrtcGetProgramLog, "nvrtcGetProgramLog", (MbNvrtcProgram, char *))                \
    X(MbNvrtcResult, nvrtcGetCUBINSize, "nvrtcGetCUBINSize", (MbNvrtcProgram, size_t *))                \
    X(MbNvrtcResult, nvrtcGetCUBIN, "nvrtcGetCUBIN", (MbNvrtcProgram, char *))                          \
    X(MbNvrtcResult, nvrtcGetPTXSize, "nvrtcGetPTXSize", (MbNvrtcProgram, size_t *))                    \
    X(MbNvrtcResult, nvrtcGetPTX, "nvrtcGetPTX", (MbNvrtcProgram, char *))                              \
    X(const char *, nvrtcGetErrorString, "nvrtcGetErrorString", (MbNvrtcResult))

#define MB_LT_FUNCS(X)                                                                                  \
    X(MbLtStatus, cublasLtCreate, "cublasLtCreate", (MbLtHandle *))                                     \
    X(MbLtStatus, cublasLtDestroy, "cublasLtDestroy", (MbLtHandle))                                     \
    X(size_t, cublasLtGetVersion, "cublasLtGetVersion", (void))                                         \
    X(const char *, cublasLtGetStatusString, "cublasLtGetStatusString", (MbLtStatus))                   \
    X(MbLtStatus, cublasLtMatmulDescCreate, "cublasLtMatmulDescCreate", (MbLtDesc *, MbLtCompute, MbLtDataType)) \
    X(MbLtStatus, cublasLtMatmulDescDestroy, "cublasLtMatmulDescDestroy", (MbLtDesc))                   \
    X(MbLtStatus, cublasLtMatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute",                     \
      (MbLtDesc, MbLtDescAttr, const void *, size_t))                                                   \
    X(MbLtStatus, cublasLtMatrixLayoutCreate, "cublasLtMatrixLayoutCreate",                             \
      (MbLtLayout *, MbLtDataType, uint64_t, uint64_t, int64_t))                                        \
    X(MbLtStatus, cublasLtMatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy", (MbLtLayout))             \
    X(MbLtStatus, cublasLtMatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate", (MbLtPref *))       \
    X(MbLtStatus, cublasLtMatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy", (MbLtPref))       \
    X(MbLtStatus, cublasLtMatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute",         \
      (MbLtPref, MbLtPrefAttr, const void *, size_t))                                                   \
    X(MbLtStatus, cublasLtMatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic",                     \
      (MbLtHandle, MbLtDesc, MbLtLayout, MbLtLayout, MbLtLayout, MbLtLayout, MbLtPref, int, MbLtHeuristic *, int *)) \
    X(MbLtStatus, cublasLtMatmul, "cublasLtMatmul",                                                     \
      (MbLtHandle, MbLtDesc, const void *, const void *, MbLtLayout, const void *, MbLtLayout, const void *, \
       const void *, MbLtLayout, void *, MbLtLayout, const MbLtAlgo *, void *, size_t, MbCuStream))

#define MB_NCCL_FUNCS(X)                                                                                \
    X(MbNcclResult, ncclGetVersion, "ncclGetVersion", (int *))                                          \
    X(MbNcclResult, ncclGetUniqueId, "ncclGetUniqueId", (MbNcclUniqueId *))                             \
    X(MbNcclResult, ncclCommInitRank, "ncclCommInitRank", (MbNcclComm_t *, int, MbNcclUniqueId, int))   \
    X(MbNcclResult, ncclCommInitAll, "ncclCommInitAll", (MbNcclComm_t *, int, const int *))             \
    X(MbNcclResult, ncclCommDestroy, "ncclCommDestroy", (MbNcclComm_t))                                 \
    X(MbNcclResult, ncclCommAbort, "ncclCommAbort", (MbNcclComm_t))                                     \
    X(MbNcclResult, ncclCommGetAsyncError, "ncclCommGetAsyncError", (MbNcclComm_t, MbNcclResult *))     \
    X(MbNcclResult, ncclAllReduce, "ncclAllReduce",                                                     \
      (const void *, void *, size_t, MbNcclDataType, MbNcclRedOp, MbNcclComm_t, MbCuStream))            \
    X(MbNcclResult, ncclReduceScatter, "ncclReduceScatter",                                             \
      (const void *, void *, size_t, MbNcclDataType, MbNcclRedOp, MbNcclComm_t, MbCuStream))            \
    X(MbNcclResult, ncclAllGather, "ncclAllGather", (const void *, void *, size_t, MbNcclDataType, MbNcclComm_t, MbCuStream)) \
    X(MbNcclResult, ncclBroadcast, "ncclBroadcast",                                                     \
      (const void *, void *, size_t, MbNcclDataType, int, MbNcclComm_t, MbCuStream))                    \
    X(const char *, ncclGetErrorString, "ncclGetErrorString", (MbNcclResult))

#define MB_FN_MEMBER(ret, name, sym, params) ret(*name) params;
typedef struct { MB_CU_FUNCS(MB_FN_MEMBER) } MbCuApi;
typedef struct { MB_NVRTC_FUNCS(MB_FN_MEMBER) } MbNvrtcApi;
typedef struct { MB_LT_FUNCS(MB_FN_MEMBER) } MbLtApi;
typedef struct { MB_NCCL_FUNCS(MB_FN_MEMBER) } MbNcclApi;
#undef MB_FN_MEMBER

typedef struct {
    const char *sym;
    size_t offset;
} MbSym;
#define MB_FN_SYM_CU(ret, name, sym, params) {sym, offsetof(MbCuApi, name)},
#define MB_FN_SYM_NVRTC(ret, name, sym, params) {sym, offsetof(MbNvrtcApi, name)},
#define MB_FN_SYM_LT(ret, name, sym, params) {sym, offsetof(MbLtApi, name)},
#define MB_FN_SYM_NCCL(ret, name, sym, params) {sym, offsetof(MbNcclApi, name)},
static const MbSym mb_cu_syms[] = {MB_CU_FUNCS(MB_FN_SYM_CU)};
static const MbSym mb_nvrtc_syms[] = {MB_NVRTC_FUNCS(MB_FN_SYM_NVRTC)};
static const MbSym mb_lt_syms[] = {MB_LT_FUNCS(MB_FN_SYM_LT)};
static const MbSym mb_nccl_syms[] = {MB_NCCL_FUNCS(MB_FN_SYM_NCCL)};

#ifdef MB_CUDA_HEADER_CHECK
/* Each pointer type above takes the real function (a mismatch is a compile error under
 * -Werror), and the numbers and struct layouts above are the headers'. */
#define MB_FN_CHECK(ret, name, sym, params) static ret(*const mb_check_##name) params MB_UNUSED = name;
MB_CU_FUNCS(MB_FN_CHECK)
MB_NVRTC_FUNCS(MB_FN_CHECK)
MB_LT_FUNCS(MB_FN_CHECK)
MB_NCCL_FUNCS(MB_FN_CHECK)
#undef MB_FN_CHECK
#define MB_SAME(a, b) typedef char mb_same_##a[((long long)(a) == (long long)(b)) ? 1 : -1] MB_UNUSED
MB_SAME(MB_CU_ERROR_STUB_LIBRARY, CUDA_ERROR_STUB_LIBRARY);
MB_SAME(MB_CU_ERROR_NO_DEVICE, CUDA_ERROR_NO_DEVICE);
MB_SAME(MB_CU_ERROR_NOT_READY, CUDA_ERROR_NOT_READY);
MB_SAME(MB_CU_ATTR_SM_COUNT, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT);
MB_SAME(MB_CU_ATTR_CC_MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
MB_SAME(MB_CU_ATTR_CC_MINOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
MB_SAME(MB_CU_ATTR_SMEM_OPTIN, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN);
MB_SAME(MB_CU_FUNC_MAX_DYNAMIC_SMEM, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES);
MB_SAME(MB_CUDA_R_32F, CUDA_R_32F);
MB_SAME(MB_CUDA_R_16BF, CUDA_R_16BF);
MB_SAME(MB_CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_32F);
MB_SAME(MB_CUBLAS_OP_N, CUBLAS_OP_N);
MB_SAME(MB_CUBLAS_OP_T, CUBLAS_OP_T);
MB_SAME(MB_LT_DESC_TRANSA, CUBLASLT_MATMUL_DESC_TRANSA);
MB_SAME(MB_LT_DESC_TRANSB, CUBLASLT_MATMUL_DESC_TRANSB);
MB_SAME(MB_LT_PREF_MAX_WORKSPACE, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES);
MB_SAME(MB_LT_PREF_ALIGN_A, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES);
MB_SAME(MB_LT_PREF_ALIGN_B, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES);
MB_SAME(MB_LT_PREF_ALIGN_C, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES);
MB_SAME(MB_LT_PREF_ALIGN_D, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES);
MB_SAME(MB_NCCL_FLOAT32, ncclFloat32);
MB_SAME(MB_NCCL_FLOAT64, ncclFloat64);
MB_SAME(MB_NCCL_SUM, ncclSum);
typedef char mb_same_heuristic[sizeof(struct MbLtHeuristic_) == sizeof(cublasLtMatmulHeuristicResult_t) &&
                               offsetof(struct MbLtHeuristic_, workspaceSize) == offsetof(cublasLtMatmulHeuristicResult_t, workspaceSize) &&
                               offsetof(struct MbLtHeuristic_, state) == offsetof(cublasLtMatmulHeuristicResult_t, state) ? 1 : -1] MB_UNUSED;
typedef char mb_same_algo[sizeof(struct MbLtAlgo_) == sizeof(cublasLtMatmulAlgo_t) ? 1 : -1] MB_UNUSED;
typedef char mb_same_unique_id[sizeof(struct MbNcclUniqueId_) == sizeof(ncclUniqueId) ? 1 : -1] MB_UNUSED;
typedef char mb_same_devptr[sizeof(MbCuDevPtr) == 8 ? 1 : -1] MB_UNUSED;
#undef MB_SAME
#endif

/* ---- loading the libraries ----
 * Each library is looked for in $MEDBOT_CUDA_LIB, the toolkit folder build.sh found
 * (MB_CUDA_LIBDIR), $CUDA_HOME/lib64, /usr/local/cuda/lib64 and then the system's search path,
 * newest soname first; a library whose CUDA major version is newer than the driver's is skipped
 * (its cubins and calls would not run on that driver). */

#ifndef MB_CUDA_LIBDIR
#define MB_CUDA_LIBDIR ""
#endif

typedef struct {
    void *handle;
    char path[512];
} MbDl;

static int dl_resolve(void *h, const MbSym *syms, size_t n, void *table, char *missing, size_t cap) {
    for (size_t i = 0; i < n; i++) {
        void *p = dlsym(h, syms[i].sym);
        if (!p) {
            snprintf(missing, cap, "%s", syms[i].sym);
            return 0;
        }
        memcpy((char *)table + syms[i].offset, &p, sizeof p); /* POSIX: object and function pointers agree */
    }
    return 1;
}

/* Opens the first of names[] (in the folders above) that loads, has every symbol and passes
 * `fits` (NULL: any). why: what went wrong with the last candidate. */
static int dl_open_any(const char *const *names, const MbSym *syms, size_t nsyms, void *table,
                       int (*fits)(void *table, void *arg, char *why, size_t cap), void *arg, MbDl *out, char *why,
                       size_t cap) {
    const char *env = getenv("MEDBOT_CUDA_LIB"), *home = getenv("CUDA_HOME");
    char home_lib[512] = "";
    if (home && home[0]) snprintf(home_lib, sizeof home_lib, "%s/lib64", home);
    const char *dirs[] = {env, MB_CUDA_LIBDIR, home_lib, "/usr/local/cuda/lib64", ""};
    snprintf(why, cap, "not found");
    for (size_t n = 0; names[n]; n++)
        for (size_t d = 0; d < sizeof dirs / sizeof *dirs; d++) {
            if (!dirs[d] || (d + 1 < sizeof dirs / sizeof *dirs && !dirs[d][0])) continue;
            char path[512];
            if (dirs[d][0]) snprintf(path, sizeof path, "%s/%s", dirs[d], names[n]);
            else snprintf(path, sizeof path, "%s", names[n]);
            void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
            if (!h) {
                if (!dirs[d][0]) snprintf(why, cap, "%s", dlerror());
                continue;
            }
            char missing[128];
            if (!dl_resolve(h, syms, nsyms, table, missing, sizeof missing)) {
                snprintf(why, cap, "%.300s lacks %.100s", path, missing);
                dlclose(h);
                continue;
            }
            if (fits && !fits(table, arg, why, cap)) {
                dlclose(h);
                continue;
            }
            out->handle = h;
            snprintf(out->path, sizeof out->path, "%s", path);
            return 1;
        }
    return 0;
}

typedef struct {
    MbCuApi cu;
    MbNvrtcApi nvrtc;
    MbLtApi lt;
    MbNcclApi nccl;
    MbDl cu_dl, nvrtc_dl, lt_dl, nccl_dl;
    int driver_version;          /* e.g. 13000 for CUDA 13.0 */
    int devices;
    int nvrtc_major, nvrtc_minor;
    MbStatus cu_status, nvrtc_status, lt_status, nccl_status;
    char cu_err[1024], nvrtc_err[1024], lt_err[1024], nccl_err[1024];
} MbCudaLibs;

static MbCudaLibs mb_cuda_libs; /* written once under pthread_once, read-only after */
static pthread_once_t mb_cuda_once = PTHREAD_ONCE_INIT, mb_nvrtc_once = PTHREAD_ONCE_INIT,
                      mb_lt_once = PTHREAD_ONCE_INIT, mb_nccl_once = PTHREAD_ONCE_INIT;

static void cuda_driver_load(void) {
    MbCudaLibs *L = &mb_cuda_libs;
    const char *names[] = {"libcuda.so.1", NULL};
    char why[512];
    L->cu_status = MB_ERR_DEVICE;
    if (!dl_open_any(names, mb_cu_syms, sizeof mb_cu_syms / sizeof *mb_cu_syms, &L->cu, NULL, NULL, &L->cu_dl, why,
                     sizeof why)) {
        snprintf(L->cu_err, sizeof L->cu_err, "no NVIDIA driver found (%.400s) --> use --device cpu", why);
        return;
    }
    MbCuResult r = L->cu.cuInit(0);
    if ((int)r == MB_CU_ERROR_STUB_LIBRARY) {
        snprintf(L->cu_err, sizeof L->cu_err, "%.400s is the CUDA toolkit's stub, not a driver --> remove the stubs "
                 "folder from LD_LIBRARY_PATH, or use --device cpu", L->cu_dl.path);
        return;
    }
    if ((int)r == MB_CU_ERROR_NO_DEVICE) {
        snprintf(L->cu_err, sizeof L->cu_err, "the NVIDIA driver sees no GPU --> use --device cpu");
        return;
    }
    if (r != 0) {
        const char *s = NULL;
        L->cu.cuGetErrorString(r, &s);
        snprintf(L->cu_err, sizeof L->cu_err, "cuInit failed: %s (%d) --> check nvidia-smi, or use --device cpu",
                 s ? s : "?", (int)r);
        return;
    }
    L->cu.cuDriverGetVersion(&L->driver_version);
    L->cu.cuDeviceGetCount(&L->devices);
    if (L->devices < 1) {
        snprintf(L->cu_err, sizeof L->cu_err, "the NVIDIA driver sees no GPU --> use --device cpu");
        return;
    }
    L->cu_status = MB_OK;
}

/* The driver's CUDA major version must be at least the library's. */
static int nvrtc_fits(void *table, void *arg, char *why, size_t cap) {
    MbNvrtcApi *api = table;
    int major = 0, minor = 0, drv = *(int *)arg;
    if (api->nvrtcVersion(&major, &minor) != 0) return snprintf(why, cap, "nvrtcVersion failed"), 0;
    if (drv && major > drv / 1000) {
        snprintf(why, cap, "NVRTC %d.%d is newer than the driver's CUDA %d.%d --> update the NVIDIA driver, or install "
                 "NVRTC %d (e.g. pip install nvidia-cuda-nvrtc-cu%d) and point MEDBOT_CUDA_LIB at it", major, minor,
                 drv / 1000, drv % 1000 / 10, drv / 1000, drv / 1000);
        return 0;
    }
    return 1;
}

static int lt_fits(void *table, void *arg, char *why, size_t cap) {
    MbLtApi *api = table;
    int major = (int)(api->cublasLtGetVersion() / 10000), drv = *(int *)arg;
    if (drv && major > drv / 1000) {
        snprintf(why, cap, "cuBLASLt %d is newer than the driver's CUDA %d.%d --> update the NVIDIA driver, or install "
                 "cuBLAS %d and point MEDBOT_CUDA_LIB at it", major, drv / 1000, drv % 1000 / 10, drv / 1000);
        return 0;
    }
    return 1;
}

static void cuda_nvrtc_load(void) {
    MbCudaLibs *L = &mb_cuda_libs;
    const char *names[] = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so.11.2", "libnvrtc.so", NULL};
    char why[512];
    L->nvrtc_status = MB_ERR_DEVICE;
    if (!dl_open_any(names, mb_nvrtc_syms, sizeof mb_nvrtc_syms / sizeof *mb_nvrtc_syms, &L->nvrtc, nvrtc_fits,
                     &L->driver_version, &L->nvrtc_dl, why, sizeof why)) {
        snprintf(L->nvrtc_err, sizeof L->nvrtc_err, "NVRTC (libnvrtc.so) not usable: %.400s --> install the CUDA toolkit "
                 "or its NVRTC library and set MEDBOT_CUDA_LIB to its folder, or use --device cpu", why);
        return;
    }
    L->nvrtc.nvrtcVersion(&L->nvrtc_major, &L->nvrtc_minor);
    L->nvrtc_status = MB_OK;
}

static void cuda_lt_load(void) {
    MbCudaLibs *L = &mb_cuda_libs;
    const char *names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so.11", "libcublasLt.so", NULL};
    char why[512];
    L->lt_status = MB_ERR_DEVICE;
    if (!dl_open_any(names, mb_lt_syms, sizeof mb_lt_syms / sizeof *mb_lt_syms, &L->lt, lt_fits, &L->driver_version,
                     &L->lt_dl, why, sizeof why)) {
        snprintf(L->lt_err, sizeof L->lt_err, "cuBLASLt (libcublasLt.so) not usable: %.400s --> install the CUDA toolkit "
                 "or its cuBLAS library and set MEDBOT_CUDA_LIB to its folder, or use --device cpu", why);
        return;
    }
    L->lt_status = MB_OK;
}

static void cuda_nccl_load(void) {
    MbCudaLibs *L = &mb_cuda_libs;
    const char *names[] = {"libnccl.so.2", "libnccl.so", NULL};
    char why[512];
    L->nccl_status = MB_ERR_DEVICE;
    if (!dl_open_any(names, mb_nccl_syms, sizeof mb_nccl_syms / sizeof *mb_nccl_syms, &L->nccl, NULL, NULL,
                     &L->nccl_dl, why, sizeof why)) {
        snprintf(L->nccl_err, sizeof L->nccl_err, "NCCL (libnccl.so.2) not usable: %.400s --> install NCCL (e.g. pip "
                 "install nvidia-nccl-cu12) and set MEDBOT_CUDA_LIB to its folder", why);
        return;
    }
    L->nccl_status = MB_OK;
}

/* The libraries a job needs, loaded once per process: WHAT is a mask of these bits. */
enum { MB_LIB_DRIVER = 1, MB_LIB_NVRTC = 2, MB_LIB_CUBLASLT = 4, MB_LIB_NCCL = 8 };

static MbStatus cuda_libs(unsigned what, const MbCudaLibs **out) {
    MbCudaLibs *L = &mb_cuda_libs;
    *out = L;
    pthread_once(&mb_cuda_once, cuda_driver_load);
    if (L->cu_status) return mb_fail(L->cu_status, "cuda: %s", L->cu_err);
    if (what & MB_LIB_NVRTC) {
        pthread_once(&mb_nvrtc_once, cuda_nvrtc_load);
        if (L->nvrtc_status) return mb_fail(L->nvrtc_status, "cuda: %s", L->nvrtc_err);
    }
    if (what & MB_LIB_CUBLASLT) {
        pthread_once(&mb_lt_once, cuda_lt_load);
        if (L->lt_status) return mb_fail(L->lt_status, "cuda: %s", L->lt_err);
    }
    if (what & MB_LIB_NCCL) {
        pthread_once(&mb_nccl_once, cuda_nccl_load);
        if (L->nccl_status) return mb_fail(L->nccl_status, "cuda: %s", L->nccl_err);
    }
    return MB_OK;
}

/* GPUs this process can use (0: no driver or no device). */
static int mb_cuda_device_count(void) {
    const MbCudaLibs *L;
    return cuda_libs(MB_LIB_DRIVER, &L) == MB_OK ? L->devices : 0;
}

/* ---- checked calls ----
 * A failed call is a status with the message "FILE:LINE: CALL failed: NAME (code): text --> hint"
 * (the hint names the likely cause of the common codes). Inside an op, which returns nothing, it
 * becomes the backend's failure (MbOps.err): the ops that follow do nothing but free, and the
 * model returns it after the forward, the backward or the optimizer step. */

static const char *cu_hint(int code) {
    switch (code) {
    case 2: return " --> out of GPU memory: lower --per_device_train_batch_size or --max_length, use "
                   "--gradient_checkpointing and --load_in_4bit";
    case 3: case 100: return " --> no usable GPU: check nvidia-smi, or use --device cpu";
    case 35: return " --> the NVIDIA driver is older than this CUDA runtime: update the driver, or use --device cpu";
    case 218: case 222: case 209: return " --> the driver cannot load this kernel binary (driver too old?): update "
                                         "the driver or remove the kernel cache (MEDBOT_CACHE_DIR, ~/.cache/medbot)";
    case 700: case 719: return " --> a kernel faulted: rerun with MEDBOT_CUDA_SYNC=1 to find the op, and report it";
    default: return "";
    }
}

/* NVRTC errors return a status (they happen while the backend starts). */
static MbStatus nvrtc_check_(MbNvrtcResult r, const char *what, const char *file, int line) {
    if (r == 0) return MB_OK;
    return mb_fail(MB_ERR_DEVICE, "%s:%d: %s failed: %s --> reinstall NVRTC, or use --device cpu", file, line, what,
                   mb_cuda_libs.nvrtc.nvrtcGetErrorString(r));
}
#define nvrtc_check(call) nvrtc_check_((call), #call, __FILE__, __LINE__)

/* A driver call as a status (while the backend starts, and in the NCCL rank's calls) */
static MbStatus cu_status_(const MbCudaLibs *L, MbCuResult r, const char *what, const char *file, int line) {
    if (r == 0) return MB_OK;
    const char *name = NULL, *text = NULL;
    L->cu.cuGetErrorName(r, &name);
    L->cu.cuGetErrorString(r, &text);
    return mb_fail(r == 2 ? MB_ERR_OOM : MB_ERR_DEVICE, "%s:%d: %s failed: %s (%d): %s%s", file, line, what,
                   name ? name : "?", (int)r, text ? text : "?", cu_hint((int)r));
}
#define cu_status(L, call) cu_status_((L), (call), #call, __FILE__, __LINE__)

/* ---- kernels: the specialization table, NVRTC, the on-disk cache ---- */

/* kernels.cu.in, as gen_kernels writes it into the appendix at the end of this file */
typedef struct {
    const char *const *lines; /* the source, one string per line (C99 limits a literal's length) */
    size_t n_lines, bytes;
    const char *hash;         /* FNV-1a 64 of the source: the on-disk cache's key */
    const char *const *specs; /* the specialization table: -D options of each row */
    int n_specs;
    const char *spec_common;  /* the -D options every row gets */
} MbKernelSource;
static const MbKernelSource *mb_kernel_source(void);

/* kernels.cu.in as one string (malloc'd), or NULL (out of memory) */
static char *kernels_source(void) {
    const MbKernelSource *k = mb_kernel_source();
    char *s = mb_malloc(k->bytes + 1), *p = s;
    for (size_t i = 0; s && i < k->n_lines; i++) {
        size_t n = strlen(k->lines[i]);
        memcpy(p, k->lines[i], n);
        p += n;
    }
    if (s) *p = 0;
    return s;
}

/* kernels.cu.in's kernels, as this section calls them */
#define MB_KERNELS(X)                                                                                   \
    X(K_EMBEDDING, "embedding_forward") X(K_RMSNORM_FWD, "rmsnorm_forward") X(K_RMSNORM_BWD, "rmsnorm_backward") \
    X(K_ROPE, "rope_forward") X(K_KV_STORE, "kv_store") X(K_SWIGLU_FWD, "swiglu_forward")               \
    X(K_SWIGLU_BWD, "swiglu_backward") X(K_ADD, "add_forward") X(K_GATHER, "gather_rows")               \
    X(K_SCATTER, "scatter_rows") X(K_DROPOUT, "dropout_forward") X(K_RANDOM_BYTES, "random_bytes")      \
    X(K_RANDOM_NORMAL, "random_normal_bf16") X(K_F32_TO_BF16, "f32_to_bf16_vec") X(K_BF16_TO_F32, "bf16_to_f32_vec") \
    X(K_SCALE, "scale_f32") X(K_FILL, "fill_f32") X(K_ACC_F64, "accumulate_f64") X(K_FROM_F64, "from_f64") \
    X(K_SUMSQ, "sumsq_partial") X(K_ADAMW, "adamw") X(K_NF4_DEQUANT, "nf4_dequant") X(K_NF4_GEMV, "nf4_gemv") \
    X(K_LP_CHUNK, "logprob_chunk") X(K_LP_FINISH, "logprob_finish") X(K_LP_GRAD, "logprob_grad_chunk")  \
    X(K_ATT_FWD, "attention_forward") X(K_ATT_DELTA, "attention_delta") X(K_ATT_BWD, "attention_backward")
#define MB_K_ENUM(id, name) id,
#define MB_K_NAME(id, name) name,
enum { MB_KERNELS(MB_K_ENUM) K_COUNT };
static const char *const mb_kernel_names[K_COUNT] = {MB_KERNELS(MB_K_NAME)};
#undef MB_K_ENUM
#undef MB_K_NAME

#define MB_CUDA_BLOCK 256         /* BLOCK of the row and elementwise kernels (spec-common) */
#define MB_GEMV_MAX_N 8           /* nf4_gemv handles up to this many rows (GEMV_MAX_N) */
#define MB_ROPE_MAX_HALF 128      /* RopeFreq: D/2 frequencies at most */

/* The value of -DNAME=V in a row of the table, or -1 */
static long spec_value(const char *row, const char *name) {
    char key[64];
    snprintf(key, sizeof key, "-D%s=", name);
    const char *p = strstr(row, key);
    return p ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* The row for head dim D on a device whose blocks may use smem_optin bytes of shared memory:
 * the one with the largest SMEM_BUDGET that fits. -1 if none. */
static int spec_choose(int D, size_t smem_optin) {
    int best = -1;
    long best_budget = -1;
    const MbKernelSource *k = mb_kernel_source();
    for (int i = 0; i < k->n_specs; i++) {
        long hd = spec_value(k->specs[i], "HEAD_DIM"), budget = spec_value(k->specs[i], "SMEM_BUDGET");
        if (hd == D && budget >= 0 && (size_t)budget <= smem_optin && budget > best_budget) best = i, best_budget = budget;
    }
    return best;
}

/* "12, 16, 24, 64, 128": the head dims the table covers (for messages) */
static void spec_head_dims(char *buf, size_t cap) {
    buf[0] = 0;
    const MbKernelSource *k = mb_kernel_source();
    for (int i = 0; i < k->n_specs; i++) {
        long hd = spec_value(k->specs[i], "HEAD_DIM");
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= spec_value(k->specs[j], "HEAD_DIM") == hd;
        if (!seen) snprintf(buf + strlen(buf), cap - strlen(buf), "%s%ld", buf[0] ? ", " : "", hd);
    }
}

/* The folder of the kernel cache: $MEDBOT_CACHE_DIR, else $XDG_CACHE_HOME/medbot, else
 * ~/.cache/medbot (created). Empty when there is none. */
static void kernel_cache_dir(char *dir, size_t cap) {
    const char *e = getenv("MEDBOT_CACHE_DIR"), *x = getenv("XDG_CACHE_HOME"), *h = getenv("HOME");
    dir[0] = 0;
    if (e && e[0]) snprintf(dir, cap, "%.400s", e);
    else if (x && x[0]) mkdir(x, 0755), snprintf(dir, cap, "%.400s/medbot", x);
    else if (h && h[0]) {
        char c[512];
        snprintf(c, sizeof c, "%.400s/.cache", h);
        mkdir(c, 0755);
        snprintf(dir, cap, "%.400s/medbot", c);
    }
    if (dir[0] && !mb_is_dir(dir) && mkdir(dir, 0755) != 0) dir[0] = 0;
}

/* Splits a space-separated option string (modified in place) into opts. */
static int split_words(char *s, const char **opts, int max) {
    int n = 0;
    for (char *p = s; *p && n < max;) {
        while (*p == ' ') *p++ = 0;
        if (!*p) break;
        opts[n++] = p;
        while (*p && *p != ' ') p++;
    }
    return n;
}

/* Compiles the kernels with `options` (space-separated) into *image (malloc'd, a cubin or PTX).
 * The compile log goes into the error message when it fails. */
static MbStatus kernels_compile(const char *options, char **image, size_t *n, int ptx) {
    const MbNvrtcApi *nv = &mb_cuda_libs.nvrtc;
    MbNvrtcProgram prog = NULL;
    char *src = kernels_source();
    if (!src) return MB_ERR_OOM;
    MbStatus rc = nvrtc_check(nv->nvrtcCreateProgram(&prog, src, "kernels.cu", 0, NULL, NULL));
    free(src);
    if (rc) return rc;
    char *buf = mb_strdup(options);
    if (!buf) return nv->nvrtcDestroyProgram(&prog), MB_ERR_OOM;
    const char *opts[64];
    int nopt = split_words(buf, opts, 64);
    MbNvrtcResult r = nv->nvrtcCompileProgram(prog, nopt, opts);
    if (r != 0) {
        size_t logn = 0;
        nv->nvrtcGetProgramLogSize(prog, &logn);
        char *log = mb_calloc(logn + 1, 1);
        if (log) nv->nvrtcGetProgramLog(prog, log);
        rc = mb_fail(MB_ERR_DEVICE, "cuda: NVRTC could not compile kernels.cu.in (%s): %.600s --> this is a bug in "
                     "medbot's kernels for this NVRTC; use --device cpu", options, log ? log : "(out of memory for its log)");
        free(log);
    } else {
        rc = nvrtc_check(ptx ? nv->nvrtcGetPTXSize(prog, n) : nv->nvrtcGetCUBINSize(prog, n));
        if (!rc && !(*image = mb_malloc(*n + 1))) rc = MB_ERR_OOM;
        if (!rc) {
            rc = nvrtc_check(ptx ? nv->nvrtcGetPTX(prog, *image) : nv->nvrtcGetCUBIN(prog, *image));
            if (rc) free(*image), *image = NULL;
        }
    }
    free(buf);
    nv->nvrtcDestroyProgram(&prog);
    return rc;
}

/* The target NVRTC compiles for: the device's exact architecture when NVRTC knows it (a cubin),
 * else the newest virtual architecture it knows that the device can run (PTX, compiled by the
 * driver at load). */
static MbStatus kernels_target(int cc, char *arch, size_t cap, int *ptx) {
    const MbNvrtcApi *nv = &mb_cuda_libs.nvrtc;
    int n = 0, best = 0, exact = 0;
    MbStatus rc = nvrtc_check(nv->nvrtcGetNumSupportedArchs(&n));
    if (rc) return rc;
    int *archs = mb_calloc((size_t)n + 1, sizeof *archs);
    if (!archs) return MB_ERR_OOM;
    if (!(rc = nvrtc_check(nv->nvrtcGetSupportedArchs(archs))))
        for (int i = 0; i < n; i++) {
            if (archs[i] == cc) exact = 1;
            if (archs[i] <= cc && archs[i] > best) best = archs[i];
        }
    free(archs);
    if (rc) return rc;
    if (!best)
        return mb_fail(MB_ERR_DEVICE, "cuda: NVRTC %d.%d cannot compile for compute capability %d.%d --> use --device "
                       "cpu", mb_cuda_libs.nvrtc_major, mb_cuda_libs.nvrtc_minor, cc / 10, cc % 10);
    *ptx = !exact;
    snprintf(arch, cap, "%s_%d", exact ? "sm" : "compute", exact ? cc : best);
    return MB_OK;
}

/* ---- the backend's state ---- */

typedef struct {
    MbCuDevPtr p;
    size_t bytes;
} CuBuf; /* a scratch buffer that grows */

typedef struct {
    CuBuf buf;
    int *shadow;               /* what buf holds (host copy), n values */
    size_t n;
} CuInts; /* host index arrays (tokens, lengths, rows, targets) on the device, copied when they change */

typedef struct {               /* the kernel's struct Nf4, field for field */
    MbCuDevPtr packed, absmax_q, absmax, nested, map8;
    float offset;
    int blocksize, nested_bs, compute;
} CuNf4;

typedef struct {
    MbCuDevPtr p;              /* bf16 (matrices) or fp32 (norm vectors) in device memory */
    size_t rows, cols;         /* what was uploaded: a lookup of another shape is a stale key */
} CuDense;

typedef struct {
    uint64_t key;              /* cu_key of the weight's host data pointer */
    CuDense value;
} CuDenseEntry;

typedef struct {
    uint64_t key;              /* cu_key of the MbNf4 */
    CuNf4 value;
} CuNf4Entry;

typedef struct {               /* what a GEMM's descriptors and algorithm depend on */
    int ta, tb, m, n, k, ctype, beta_nz;
    long long lda, ldb, ldc;
    int align[4];
} GemmKey;

typedef struct {
    GemmKey key;
    MbLtDesc desc;
    MbLtLayout la, lb, lc;
    MbLtAlgo algo;
} GemmPlan;

typedef struct {
    GemmKey key;
    int value;                 /* index into plans */
} GemmIndex;

typedef struct {
    const MbCudaLibs *lib;
    MbOps *ops;                /* the op table (its err is this backend's failure) */
    int gpu;
    MbCuDevice dev;
    MbCuContext ctx;
    MbCuStream stream;
    char name[256], arch[32];
    int cc, sms, spec, head_dim;
    size_t smem_optin, total_mem;
    MbCuModule mod;
    MbCuFunction fn[K_COUNT];
    int att_fwd_smem, att_bwd_smem, att_bq, att_bk, att_bwd_bq, att_bwd_bk;
    MbLtHandle lt;
    CuBuf lt_ws;
    GemmPlan *plans;           /* stb_ds array */
    GemmIndex *plan_index;     /* stb_ds hash map */
    CuBuf *allocs;             /* stb_ds array: ops->alloc's live allocations */
    size_t bytes_now, bytes_peak, device_used_peak, device_used_start;
    CuDenseEntry *dense, *vec; /* stb_ds hash maps: uploaded weights */
    CuNf4Entry *nf4;
    CuBuf *uploads;            /* stb_ds array: what the weight maps own */
    /* index arrays by role: a layer loop passes the same lengths, rows and targets every call */
    CuInts tokens, lens, rows, targets;
    /* scratch, grown on demand: the NF4 tile, LoRA A and B in bf16, the fused logprob chunk,
     * attention's dq and row terms, sumsq partial sums */
    CuBuf tile, lora_a, lora_b, lora_du, lp_logits, lp_dlogits, lp_dx, lp_state, att_dq, att_delta, partial;
    size_t tile_bytes;         /* the NF4 dequant tile (bytes of bf16) */
    size_t lp_rows, lp_vocab;  /* the fused logprob's chunk: rows x vocabulary */
    int sync_each;             /* MEDBOT_CUDA_SYNC=1: check every op's kernels as they finish */
} MbCuda;

#define MB_CUDA_TILE_BYTES ((size_t)64 << 20)     /* NF4 dequant tile: 32 M bf16 values */
#define MB_CUDA_LT_WORKSPACE ((size_t)32 << 20)   /* cuBLASLt's workspace */
#define MB_CUDA_LP_ROWS 512                       /* fused logprob: rows per chunk */
#define MB_CUDA_LP_VOCAB 32768                    /* ... and vocabulary entries per chunk */

/* The scratch buffers this backend grows to in a training step over N rows with M loss rows (R,
 * targets: the adapters; nf4: 4-bit projections): *logits the fused lm_head chunk (fp32 logits,
 * bf16 gradient, fp32 dx, running statistics), *work the rest (NF4 dequant tile, LoRA matrices
 * in bf16, attention's fp32 dq and row terms, cuBLASLt's workspace); *chunk_rows x *chunk_vocab
 * the fused lm_head's chunk. For the memory plan (section 6). */
static void cuda_step_scratch(const MbConfig *c, size_t N, size_t M, size_t R, unsigned targets, int nf4, size_t *logits,
                              size_t *work, size_t *chunk_rows, size_t *chunk_vocab) {
    size_t C = mb_dim(c, MB_DIM_C), V = (size_t)c->vocab_size, H = (size_t)c->num_attention_heads;
    size_t D = (size_t)c->head_dim, MR = MB_MIN(M, (size_t)MB_CUDA_LP_ROWS), VC = MB_MIN(V, (size_t)MB_CUDA_LP_VOCAB);
    *chunk_rows = MR, *chunk_vocab = VC;
    *logits = MR * VC * 4 + MR * VC * 2 + MR * C * 4 + MR * 16;
    size_t tile = 0, la = 0, lb = 0;
    for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
        if (mb_layer_weights[i].rows == MB_DIM_1) continue;
        size_t O = mb_dim(c, mb_layer_weights[i].rows), I = mb_dim(c, mb_layer_weights[i].cols);
        if (nf4) { /* forward: tiles of rows, backward: tiles of columns, each <= MB_CUDA_TILE_BYTES */
            size_t per_r = MB_MAX((size_t)1, MB_CUDA_TILE_BYTES / (2 * I)), per_c = MB_MAX((size_t)1, MB_CUDA_TILE_BYTES / (2 * O));
            tile = MB_MAX(tile, MB_MAX(MB_MIN(per_r, O) * I, O * MB_MIN(per_c, I)) * 2);
        }
        if (targets & (1u << i)) la = MB_MAX(la, R * I * 2), lb = MB_MAX(lb, O * R * 2);
    }
    *work = MB_CUDA_LT_WORKSPACE + tile + la + lb + (targets ? N * R * 2 : 0) + N * H * D * 4 + N * H * 4 + N * 4;
}

static MbCuDevPtr dptr(const void *p) { return (MbCuDevPtr)(uintptr_t)p; }
static void *hptr(MbCuDevPtr p) { return (void *)(uintptr_t)p; }

/* A host pointer as a key of the weight maps: its bits moved up past bit 31, so that bits 31 and
 * 63 are clear (stb_ds hashes 8-byte keys with `d[3] << 24` on an int: see tok_hash) */
static uint64_t cu_key(const void *p) {
    uint64_t a = (uint64_t)(uintptr_t)p;
    return (a & 0x7FFFFFFFull) | (a >> 31 << 32);
}

/* Whether the backend has failed (MbOps.err): then its ops make no call but to free. */
static int cu_failed(const MbCuda *g) { return g->ops && g->ops->err; }

/* Makes st, with the message, the backend's failure unless it has one; the message is also this
 * thread's. */
static void cu_fail(MbCuda *g, MbStatus st, const char *fmt, ...) MB_PRINTF(3, 4);
static void cu_fail(MbCuda *g, MbStatus st, const char *fmt, ...) {
    char msg[sizeof mb_errbuf];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    mb_fail(st, "%s", msg);
    if (g->ops) mb_ops_fail(g->ops, st);
}

static int cu_check_(MbCuda *g, int skipped, MbCuResult r, const char *what, const char *file, int line) {
    if (skipped) return 1;
    if (r == 0) return 0;
    MbStatus st = cu_status_(g->lib, r, what, file, line);
    if (g->ops) mb_ops_fail(g->ops, st);
    return 1;
}
/* A driver call inside an op: 1 when it failed (now the backend's failure) or when the backend
 * had failed already (then the call is not made); 0 when it worked. */
#define cu_check(g, call) cu_check_((g), cu_failed(g), cu_failed(g) ? 0 : (call), #call, __FILE__, __LINE__)

static int cublas_check_(MbCuda *g, int skipped, MbLtStatus s, const char *what, const char *file, int line) {
    if (skipped) return 1;
    if (s == 0) return 0;
    const char *text = g->lib->lt.cublasLtGetStatusString(s);
    cu_fail(g, s == 3 ? MB_ERR_OOM : MB_ERR_DEVICE, "%s:%d: %s failed: %s (%d)%s", file, line, what, text ? text : "?",
            (int)s, s == 3 ? " --> out of GPU memory" : s == 13 ? " --> a GEMM failed to launch: rerun with MEDBOT_CUDA_SYNC=1" : "");
    return 1;
}
#define cublas_check(g, call) cublas_check_((g), cu_failed(g), cu_failed(g) ? 0 : (call), #call, __FILE__, __LINE__)

/* Makes the backend's context current on this thread (ranks and tests switch threads); 1 when
 * the backend has failed (now or before). */
static int cu_enter(MbCuda *g) { return cu_check(g, g->lib->cu.cuCtxSetCurrent(g->ctx)); }

static int cu_sync(MbCuda *g) { return cu_check(g, g->lib->cu.cuStreamSynchronize(g->stream)); }

static void cu_note_usage(MbCuda *g) {
    size_t free_b = 0, total = 0;
    if (g->lib->cu.cuMemGetInfo(&free_b, &total) == 0 && total - free_b > g->device_used_peak)
        g->device_used_peak = total - free_b;
}

/* Device memory, zeroed, or 0 with the message naming what was asked and what is left (out of
 * memory: MB_ERR_OOM, not the backend's failure; a later failed call is). */
static MbCuDevPtr cu_malloc(MbCuda *g, size_t bytes) {
    MbCuDevPtr p = 0;
    if (cu_failed(g)) return mb_ops_status(g->ops), 0;
    MbCuResult r = g->lib->cu.cuMemAlloc(&p, bytes ? bytes : 1);
    if (r) {
        size_t free_b = 0, total = 0;
        g->lib->cu.cuMemGetInfo(&free_b, &total);
        mb_fail(MB_ERR_OOM, "out of GPU memory on GPU %d (%s): %.2f GiB wanted, %.2f of %.2f GiB free, medbot holds "
                "%.2f GiB --> lower --per_device_train_batch_size or --max_length, use --gradient_checkpointing and "
                "--load_in_4bit", g->gpu, g->name, (double)bytes / 1073741824.0, (double)free_b / 1073741824.0,
                (double)total / 1073741824.0, (double)g->bytes_now / 1073741824.0);
        return 0;
    }
    if (cu_check(g, g->lib->cu.cuMemsetD8Async(p, 0, bytes, g->stream))) {
        g->lib->cu.cuMemFree(p);
        return 0;
    }
    g->bytes_now += bytes;
    if (g->bytes_now > g->bytes_peak) g->bytes_peak = g->bytes_now;
    cu_note_usage(g);
    return p;
}

/* After cu_malloc returned 0 inside an op: its out of memory becomes the backend's failure */
static void cu_oom(MbCuda *g) {
    if (g->ops && !cu_failed(g)) mb_ops_fail(g->ops, MB_ERR_OOM);
}

/* Frees device memory, also after a failure (the calls' errors are then ignored). */
static void cu_mfree(MbCuda *g, MbCuDevPtr p, size_t bytes) {
    if (!p) return;
    if (cu_failed(g)) g->lib->cu.cuMemFree(p);
    else if (!cu_sync(g)) cu_check(g, g->lib->cu.cuMemFree(p)); /* kernels already queued may still read it */
    g->bytes_now -= bytes;
}

/* A scratch buffer of at least `bytes` (its old contents are not kept); 0 when the backend failed
 * (out of memory here is its failure: the op cannot go on). */
static MbCuDevPtr cu_scratch(MbCuda *g, CuBuf *b, size_t bytes) {
    if (b->bytes < bytes) {
        cu_mfree(g, b->p, b->bytes);
        b->bytes = 0;
        if (!(b->p = cu_malloc(g, bytes))) return cu_oom(g), 0;
        b->bytes = bytes;
    }
    return cu_failed(g) ? 0 : b->p;
}

/* n host ints on the device in c: copied only when they differ from what c holds (a copy from
 * pageable memory may wait for the stream; the same lengths and rows come with every layer).
 * Stream-ordered: a new copy comes after the kernels that read the old values. */
static MbCuDevPtr cu_ints(MbCuda *g, CuInts *c, const int *h, size_t n) {
    if (!h || !n) return 0;
    if (c->n == n && c->buf.p && !memcmp(c->shadow, h, n * sizeof(int))) return c->buf.p;
    MbCuDevPtr d = cu_scratch(g, &c->buf, n * sizeof(int));
    c->n = 0; /* (what buf holds is known again below) */
    if (!d || cu_check(g, g->lib->cu.cuMemcpyHtoDAsync(d, h, n * sizeof(int), g->stream))) return 0;
    int *shadow = mb_malloc(n * sizeof(int));
    if (!shadow) return cu_oom(g), 0;
    free(c->shadow);
    c->shadow = shadow;
    memcpy(c->shadow, h, n * sizeof(int));
    c->n = n;
    return d;
}

/* Whether [p, p + bytes) lies in memory this backend's alloc returned */
static int cu_owns(const MbCuda *g, const void *p, size_t bytes) {
    MbCuDevPtr a = dptr(p);
    for (ptrdiff_t i = 0; i < arrlen(g->allocs); i++)
        if (a >= g->allocs[i].p && a + bytes <= g->allocs[i].p + g->allocs[i].bytes) return 1;
    return 0;
}

static unsigned cu_grid(const MbCuda *g, size_t n) {
    size_t blocks = (n + MB_CUDA_BLOCK - 1) / MB_CUDA_BLOCK, cap = (size_t)g->sms * 16;
    return (unsigned)MB_MAX((size_t)1, MB_MIN(blocks, cap));
}

/* Launches kernel k (nothing once the backend has failed; a failure to launch, or with
 * MEDBOT_CUDA_SYNC=1 in the kernel, becomes the backend's failure, naming the kernel). */
static void cu_launch(MbCuda *g, int k, unsigned gx, unsigned gy, unsigned gz, unsigned threads, unsigned smem,
                      void **args) {
    if (!gx || !gy || !gz || cu_failed(g)) return;
    char why[sizeof mb_errbuf];
    MbCuResult r = g->lib->cu.cuLaunchKernel(g->fn[k], gx, gy, gz, threads, 1, 1, smem, g->stream, args, NULL);
    if (r) {
        MbStatus st = cu_status_(g->lib, r, "cuLaunchKernel", __FILE__, __LINE__);
        snprintf(why, sizeof why, "%s", mb_last_error());
        cu_fail(g, st, "launching %s (grid %u x %u x %u, %u threads, %u bytes shared): %s", mb_kernel_names[k], gx, gy, gz,
                threads, smem, why);
        return;
    }
    if (g->sync_each && (r = g->lib->cu.cuStreamSynchronize(g->stream))) {
        MbStatus st = cu_status_(g->lib, r, "cuStreamSynchronize", __FILE__, __LINE__);
        snprintf(why, sizeof why, "%s", mb_last_error());
        cu_fail(g, st, "kernel %s failed: %s", mb_kernel_names[k], why);
    }
}

/* A grid-stride elementwise kernel over n values */
static void cu_launch_n(MbCuda *g, int k, size_t n, void **args) {
    if (n) cu_launch(g, k, cu_grid(g, n), 1, 1, MB_CUDA_BLOCK, 0, args);
}

/* ---- weights on the device ---- */

enum { CUW_BF16, CUW_NF4, CUW_F32 };
typedef struct {
    int kind;
    MbCuDevPtr p;  /* CUW_BF16: bf16 values; CUW_F32: fp32 values in this backend's memory (LoRA) */
    CuNf4 q;       /* CUW_NF4 */
} CuW;

/* bytes host -> new device memory owned by the weight maps; 0 when the backend failed */
static MbCuDevPtr cu_upload(MbCuda *g, const void *h, size_t bytes) {
    MbCuDevPtr p = cu_malloc(g, bytes);
    if (!p) return cu_oom(g), 0;
    CuBuf b = {p, bytes};
    arrput(g->uploads, b);
    return cu_check(g, g->lib->cu.cuMemcpyHtoDAsync(p, h, bytes, g->stream)) ? 0 : p;
}

/* A dense F32 / F16 / BF16 host weight as bf16 in device memory (converted a chunk at a time);
 * 0 when the backend failed. */
static MbCuDevPtr cu_upload_bf16(MbCuda *g, const MbWeight *w) {
    size_t n = w->rows * w->cols, es = mb_dtype_size(w->dtype);
    if (w->dtype == MB_DT_BF16) return cu_upload(g, w->data, n * 2);
    MbCuDevPtr p = cu_malloc(g, n * 2);
    if (!p) return cu_oom(g), 0;
    CuBuf b = {p, n * 2};
    arrput(g->uploads, b);
    size_t chunk = (size_t)1 << 20;
    float *f = mb_malloc(chunk * sizeof(float));
    uint16_t *h = f ? mb_malloc(chunk * sizeof(uint16_t)) : NULL;
    if (!h) cu_oom(g);
    for (size_t i = 0; h && i < n; i += chunk) {
        size_t m = MB_MIN(chunk, n - i);
        mb_convert_to_f32(w->dtype, (const unsigned char *)w->data + i * es, f, m);
        mb_convert_from_f32(MB_DT_BF16, f, h, m);
        if (cu_check(g, g->lib->cu.cuMemcpyHtoDAsync(p + i * 2, h, m * 2, g->stream)) || cu_sync(g)) break; /* h is reused */
    }
    free(f), free(h);
    return cu_failed(g) ? 0 : p;
}

/* The device copy of an NF4 state: arrays already in this backend's memory (random init) are
 * used in place, the others uploaded once. */
static CuNf4 cu_nf4_state(MbCuda *g, const MbWeight *w, const MbNf4 *q) {
    uint64_t key = cu_key(q); /* stb_ds keys are lvalues here (see the tokenizer section) */
    ptrdiff_t i = hmgeti(g->nf4, key);
    if (i >= 0) return g->nf4[i].value;
    size_t n = w->rows * w->cols, ns = q->absmax_q ? (q->nblocks + q->nested_blocksize - 1) / q->nested_blocksize : 0;
    CuNf4 c;
    memset(&c, 0, sizeof c);
#define ON_DEVICE(ptr, bytes) (cu_owns(g, (ptr), (bytes)) ? dptr(ptr) : cu_upload(g, (ptr), (bytes)))
    c.packed = ON_DEVICE(q->packed, n / 2);
    if (q->absmax_q) {
        c.absmax_q = ON_DEVICE(q->absmax_q, q->nblocks);
        c.nested = ON_DEVICE(q->nested_absmax, ns * 4);
        c.map8 = cu_upload(g, q->nested_quant_map, sizeof q->nested_quant_map);
    } else {
        c.absmax = ON_DEVICE(q->absmax, q->nblocks * 4);
    }
#undef ON_DEVICE
    c.offset = q->offset;
    c.blocksize = (int)q->blocksize;
    c.nested_bs = (int)(q->nested_blocksize ? q->nested_blocksize : 1);
    c.compute = q->compute == MB_DT_BF16 ? 1 : q->compute == MB_DT_F16 ? 2 : 0;
    if (!cu_failed(g)) hmput(g->nf4, key, c); /* (a failed upload is not kept) */
    return c;
}

/* Host weights must stay unchanged and alive while the backend keeps their copies (a model's
 * weights live as long as its backend); a key found with another shape means that was broken:
 * the backend's failure, and 1. */
static int cu_cache_check(MbCuda *g, const CuDense *e, const MbWeight *w) {
    if (e->rows == w->rows && e->cols == w->cols) return 0;
    cu_fail(g, MB_ERR_DEVICE, "cuda: the weight at %p changed shape (%zu x %zu, uploaded %zu x %zu): host weights "
            "must outlive the backend that uploaded them", w->data, w->rows, w->cols, e->rows, e->cols);
    return 1;
}

/* A weight as the ops read it on the device (uploaded on first use); p 0 when the backend failed */
static CuW cu_weight(MbCuda *g, const MbWeight *w) {
    CuW cw;
    memset(&cw, 0, sizeof cw);
    const MbNf4 *q = weight_nf4(w);
    if (q) {
        cw.kind = CUW_NF4;
        cw.q = cu_nf4_state(g, w, q);
        return cw;
    }
    size_t bytes = w->rows * w->cols * mb_dtype_size(w->dtype);
    if (cu_owns(g, w->data, bytes)) { /* LoRA A/B (fp32), random init (bf16): used in place */
        if (w->dtype != MB_DT_BF16 && w->dtype != MB_DT_F32) {
            cu_fail(g, MB_ERR_DEVICE, "cuda: a %s weight in device memory is not supported", mb_dtype_name(w->dtype));
            return cw;
        }
        cw.kind = w->dtype == MB_DT_BF16 ? CUW_BF16 : CUW_F32;
        cw.p = dptr(w->data);
        return cw;
    }
    cw.kind = CUW_BF16;
    uint64_t key = cu_key(w->data);
    ptrdiff_t i = hmgeti(g->dense, key);
    if (i >= 0) {
        if (!cu_cache_check(g, &g->dense[i].value, w)) cw.p = g->dense[i].value.p;
    } else {
        CuDense e = {cu_upload_bf16(g, w), w->rows, w->cols};
        if (e.p) hmput(g->dense, key, e);
        cw.p = e.p;
    }
    return cw;
}

/* A norm weight (1, C) as fp32 in device memory; 0 when the backend failed */
static MbCuDevPtr cu_vector(MbCuda *g, const MbWeight *w) {
    size_t n = w->rows * w->cols;
    if (w->dtype == MB_DT_F32 && cu_owns(g, w->data, n * 4)) return dptr(w->data);
    uint64_t key = cu_key(w->data);
    ptrdiff_t i = hmgeti(g->vec, key);
    if (i >= 0) return cu_cache_check(g, &g->vec[i].value, w) ? 0 : g->vec[i].value.p;
    if (cu_owns(g, w->data, 1)) return cu_fail(g, MB_ERR_DEVICE, "cuda: a norm weight in device memory must be fp32"), 0;
    float *f = mb_malloc(n * sizeof(float));
    if (!f) return cu_oom(g), 0;
    weight_row_f32(w, 0, 0, n, f);
    MbCuDevPtr p = cu_upload(g, f, n * sizeof(float));
    if (p && cu_sync(g)) p = 0;
    free(f);
    CuDense e = {p, w->rows, w->cols};
    if (p) hmput(g->vec, key, e);
    return p;
}

/* ---- GEMMs through cuBLASLt: column-major, as BLAS; bf16 A and B, fp32 accumulation, C/D bf16
 * or fp32. D = alpha op(A) op(B) + beta C, written over C. Descriptors, layouts and the chosen
 * algorithm are cached per shape. ---- */

static int cu_align(MbCuDevPtr p) {
    int a = 1;
    while (a < 256 && !(p & (MbCuDevPtr)a)) a *= 2;
    return a;
}

static void cu_gemm_plan_free(MbCuda *g, GemmPlan *p) {
    const MbLtApi *lt = &g->lib->lt;
    if (p->la) lt->cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb) lt->cublasLtMatrixLayoutDestroy(p->lb);
    if (p->lc) lt->cublasLtMatrixLayoutDestroy(p->lc);
    if (p->desc) lt->cublasLtMatmulDescDestroy(p->desc);
}

/* The plan of a GEMM of this shape (made on first use), or NULL when the backend failed */
static const GemmPlan *cu_gemm_plan(MbCuda *g, const GemmKey *key) {
    GemmKey k = *key;
    ptrdiff_t i = hmgeti(g->plan_index, k);
    if (i >= 0) return &g->plans[g->plan_index[i].value];
    const MbLtApi *lt = &g->lib->lt;
    GemmPlan p;
    memset(&p, 0, sizeof p);
    p.key = *key;
    int32_t ta = key->ta, tb = key->tb;
    uint64_t ar = ta == MB_CUBLAS_OP_N ? (uint64_t)key->m : (uint64_t)key->k, ac = ta == MB_CUBLAS_OP_N ? (uint64_t)key->k : (uint64_t)key->m;
    uint64_t br = tb == MB_CUBLAS_OP_N ? (uint64_t)key->k : (uint64_t)key->n, bc = tb == MB_CUBLAS_OP_N ? (uint64_t)key->n : (uint64_t)key->k;
    MbLtPref pref = NULL;
    uint64_t ws = g->lt_ws.bytes;
    int bad = cublas_check(g, lt->cublasLtMatmulDescCreate(&p.desc, MB_CUBLAS_COMPUTE_32F, MB_CUDA_R_32F)) ||
              cublas_check(g, lt->cublasLtMatmulDescSetAttribute(p.desc, MB_LT_DESC_TRANSA, &ta, sizeof ta)) ||
              cublas_check(g, lt->cublasLtMatmulDescSetAttribute(p.desc, MB_LT_DESC_TRANSB, &tb, sizeof tb)) ||
              cublas_check(g, lt->cublasLtMatrixLayoutCreate(&p.la, MB_CUDA_R_16BF, ar, ac, key->lda)) ||
              cublas_check(g, lt->cublasLtMatrixLayoutCreate(&p.lb, MB_CUDA_R_16BF, br, bc, key->ldb)) ||
              cublas_check(g, lt->cublasLtMatrixLayoutCreate(&p.lc, key->ctype, (uint64_t)key->m, (uint64_t)key->n, key->ldc)) ||
              cublas_check(g, lt->cublasLtMatmulPreferenceCreate(&pref)) ||
              cublas_check(g, lt->cublasLtMatmulPreferenceSetAttribute(pref, MB_LT_PREF_MAX_WORKSPACE, &ws, sizeof ws));
    const MbLtPrefAttr attrs[4] = {MB_LT_PREF_ALIGN_A, MB_LT_PREF_ALIGN_B, MB_LT_PREF_ALIGN_C, MB_LT_PREF_ALIGN_D};
    for (int k = 0; k < 4 && !bad; k++) {
        uint32_t al = (uint32_t)key->align[k];
        bad = cublas_check(g, lt->cublasLtMatmulPreferenceSetAttribute(pref, attrs[k], &al, sizeof al));
    }
    MbLtHeuristic h;
    int found = 0;
    memset(&h, 0, sizeof h);
    if (!bad) bad = cublas_check(g, lt->cublasLtMatmulAlgoGetHeuristic(g->lt, p.desc, p.la, p.lb, p.lc, p.lc, pref, 1, &h, &found));
    if (pref) lt->cublasLtMatmulPreferenceDestroy(pref);
    if (!bad && found < 1) {
        cu_fail(g, MB_ERR_DEVICE, "cuda: cuBLASLt has no algorithm for a %s%s GEMM m=%d n=%d k=%d (lda %lld ldb %lld "
                "ldc %lld, %s output) --> report it with your GPU (%s)", ta ? "T" : "N", tb ? "T" : "N", key->m,
                key->n, key->k, key->lda, key->ldb, key->ldc, key->ctype == MB_CUDA_R_32F ? "fp32" : "bf16", g->name);
        bad = 1;
    }
    if (bad) return cu_gemm_plan_free(g, &p), NULL;
    p.algo = h.algo;
    arrput(g->plans, p);
    hmput(g->plan_index, k, (int)arrlen(g->plans) - 1);
    return &g->plans[arrlen(g->plans) - 1];
}

/* Nothing once the backend has failed (then A, B or C may be 0) */
static void cu_gemm(MbCuda *g, int ta, int tb, size_t m, size_t n, size_t k, float alpha, MbCuDevPtr A, size_t lda,
                    MbCuDevPtr B, size_t ldb, float beta, MbCuDevPtr C, int ctype, size_t ldc) {
    if (!m || !n || !k || cu_failed(g)) return;
    GemmKey key;
    memset(&key, 0, sizeof key); /* hashed as bytes */
    key.ta = ta, key.tb = tb, key.m = (int)m, key.n = (int)n, key.k = (int)k, key.ctype = ctype, key.beta_nz = beta != 0.0f;
    key.lda = (long long)lda, key.ldb = (long long)ldb, key.ldc = (long long)ldc;
    key.align[0] = cu_align(A), key.align[1] = cu_align(B), key.align[2] = key.align[3] = cu_align(C);
    const GemmPlan *p = cu_gemm_plan(g, &key);
    if (!p || cublas_check(g, g->lib->lt.cublasLtMatmul(g->lt, p->desc, &alpha, hptr(A), p->la, hptr(B), p->lb, &beta,
                                                        hptr(C), p->lc, hptr(C), p->lc, &p->algo, hptr(g->lt_ws.p),
                                                        g->lt_ws.bytes, g->stream)))
        return;
    if (g->sync_each) cu_sync(g);
}

static size_t cu_esize(int ctype) { return ctype == MB_CUDA_R_32F ? 4 : 2; }

/* bf16 copy of rows [r0, r0 + nr) x cols [c0, c0 + nc) of an NF4 weight into the tile (nr, nc) */
static MbCuDevPtr cu_nf4_tile(MbCuda *g, const CuW *cw, size_t cols, size_t r0, size_t nr, size_t c0, size_t nc) {
    MbCuDevPtr t = cu_scratch(g, &g->tile, nr * nc * 2);
    CuNf4 q = cw->q;
    uint64_t ucols = cols, ur0 = r0, uc0 = c0, unr = nr, unc = nc;
    void *args[] = {&t, &q, &ucols, &ur0, &uc0, &unr, &unc};
    cu_launch_n(g, K_NF4_DEQUANT, nr * nc, args);
    return t;
}

/* An fp32 device weight (rows * cols) as bf16 in scratch buffer b */
static MbCuDevPtr cu_to_bf16(MbCuda *g, CuBuf *b, MbCuDevPtr f32, size_t n) {
    MbCuDevPtr t = cu_scratch(g, b, n * 2);
    uint64_t un = n;
    void *args[] = {&t, &f32, &un};
    cu_launch_n(g, K_F32_TO_BF16, n, args);
    return t;
}

/* out (N, O) = inp (N, I) @ W^T, out bf16 or fp32 (ctype) */
static void cu_matmul(MbCuda *g, MbCuDevPtr out, int ctype, MbCuDevPtr inp, const MbWeight *w, size_t N) {
    size_t O = w->rows, I = w->cols;
    CuW cw = cu_weight(g, w);
    if (cw.kind == CUW_F32) cw.p = cu_to_bf16(g, &g->tile, cw.p, O * I), cw.kind = CUW_BF16;
    if (cw.kind == CUW_BF16) {
        cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, O, N, I, 1.0f, cw.p, I, inp, I, 0.0f, out, ctype, O);
        return;
    }
    if (N <= MB_GEMV_MAX_N && ctype == MB_CUDA_R_16BF) { /* decode: the fused dequant + matrix-vector kernel */
        int n = (int)N, o = (int)O, in = (int)I;
        void *args[] = {&out, &inp, &cw.q, &n, &o, &in};
        cu_launch(g, K_NF4_GEMV, (unsigned)((O + MB_CUDA_BLOCK / 32 - 1) / (MB_CUDA_BLOCK / 32)), 1, 1, MB_CUDA_BLOCK, 0, args);
        return;
    }
    size_t per = MB_MAX((size_t)1, g->tile_bytes / (2 * I));
    if (per >= 64) per = per / 64 * 64;
    for (size_t r0 = 0; r0 < O; r0 += per) { /* a tile of output rows at a time */
        size_t nr = MB_MIN(per, O - r0);
        MbCuDevPtr t = cu_nf4_tile(g, &cw, I, r0, nr, 0, I);
        cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, nr, N, I, 1.0f, t, I, inp, I, 0.0f, out + r0 * cu_esize(ctype), ctype, O);
    }
}

/* dinp (N, I) (+)= dout (N, O) @ W */
static void cu_matmul_backward(MbCuda *g, MbCuDevPtr dinp, MbCuDevPtr dout, const MbWeight *w, size_t N, int accumulate) {
    size_t O = w->rows, I = w->cols;
    float beta = accumulate ? 1.0f : 0.0f;
    CuW cw = cu_weight(g, w);
    if (cw.kind == CUW_F32) cw.p = cu_to_bf16(g, &g->tile, cw.p, O * I), cw.kind = CUW_BF16;
    if (cw.kind == CUW_BF16) {
        cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_N, I, N, O, 1.0f, cw.p, I, dout, O, beta, dinp, MB_CUDA_R_16BF, I);
        return;
    }
    size_t per = MB_MAX((size_t)1, g->tile_bytes / (2 * O));
    if (per >= 64) per = per / 64 * 64;
    for (size_t c0 = 0; c0 < I; c0 += per) { /* a tile of input columns at a time: each output once */
        size_t nc = MB_MIN(per, I - c0);
        MbCuDevPtr t = cu_nf4_tile(g, &cw, I, 0, O, c0, nc);
        cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_N, nc, N, O, 1.0f, t, nc, dout, O, beta, dinp + c0 * 2, MB_CUDA_R_16BF, I);
    }
}

/* ---- the ops ---- */

/* An op's start: g, with its context current; a backend that has failed does nothing more
 * (CU_CTX_OR returns the value given). */
#define CU_CTX(ops) \
    MbCuda *g = (ops)->ctx; \
    if (cu_enter(g)) return
#define CU_CTX_OR(ops, value) \
    MbCuda *g = (ops)->ctx; \
    if (cu_enter(g)) return (value)

/* Device memory, zeroed, or NULL (out of GPU memory, or the backend failed: mb_ops_oom) */
static void *cuda_alloc(MbOps *ops, size_t bytes) {
    CU_CTX_OR(ops, NULL);
    CuBuf b = {cu_malloc(g, bytes), bytes};
    if (!b.p) return NULL;
    arrput(g->allocs, b);
    return hptr(b.p);
}

/* Frees what cuda_alloc returned, also after the backend failed */
static void cuda_free(MbOps *ops, void *p) {
    MbCuda *g = ops->ctx;
    if (!p) return;
    if (!cu_failed(g)) cu_enter(g);
    for (ptrdiff_t i = 0; i < arrlen(g->allocs); i++)
        if (g->allocs[i].p == dptr(p)) {
            cu_mfree(g, g->allocs[i].p, g->allocs[i].bytes);
            arrdelswap(g->allocs, i);
            return;
        }
    cu_fail(g, MB_ERR_DEVICE, "cuda: free of %p, which this backend did not allocate", p);
}

static void cuda_to_host(MbOps *ops, void *dst, const void *src, size_t bytes) {
    CU_CTX(ops);
    if (!bytes) return;
    if (!cu_check(g, g->lib->cu.cuMemcpyDtoHAsync(dst, dptr(src), bytes, g->stream))) cu_sync(g);
}

static void cuda_from_host(MbOps *ops, void *dst, const void *src, size_t bytes) {
    CU_CTX(ops);
    if (!bytes) return;
    /* src may be pinned by the caller's allocator some day: never leave it in flight */
    if (!cu_check(g, g->lib->cu.cuMemcpyHtoDAsync(dptr(dst), src, bytes, g->stream))) cu_sync(g);
}

static void cuda_zero(MbOps *ops, void *p, size_t bytes) {
    CU_CTX(ops);
    cu_check(g, g->lib->cu.cuMemsetD8Async(dptr(p), 0, bytes, g->stream));
}

static void cuda_embedding_forward(MbOps *ops, float *out, const int32_t *tokens, const MbWeight *wte, size_t N) {
    CU_CTX(ops);
    CuW cw = cu_weight(g, wte);
    if (cw.kind != CUW_BF16) {
        cu_fail(g, MB_ERR_DEVICE, "cuda: the embedding must be a dense weight");
        return;
    }
    MbCuDevPtr o = dptr(out), t = cu_ints(g, &g->tokens, (const int *)tokens, N);
    int C = (int)wte->cols;
    void *args[] = {&o, &t, &cw.p, &C};
    cu_launch(g, K_EMBEDDING, (unsigned)N, 1, 1, MB_CUDA_BLOCK, 0, args);
}

static void cuda_matmul_forward(MbOps *ops, float *out, const float *inp, const MbWeight *w, size_t N) {
    CU_CTX(ops);
    cu_matmul(g, dptr(out), MB_CUDA_R_16BF, dptr(inp), w, N);
}

/* out (N, V) fp32 logits for generation */
static void cuda_logits_forward(MbOps *ops, float *out, const float *inp, const MbWeight *w, size_t N) {
    CU_CTX(ops);
    cu_matmul(g, dptr(out), MB_CUDA_R_32F, dptr(inp), w, N);
}

static void cuda_matmul_backward(MbOps *ops, float *dinp, const float *dout, const MbWeight *w, size_t N, int accumulate) {
    CU_CTX(ops);
    cu_matmul_backward(g, dptr(dinp), dptr(dout), w, N, accumulate);
}

static void cuda_rmsnorm_forward(MbOps *ops, float *out, float *rstd, const float *inp, const MbWeight *w, size_t N,
                                 float eps) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), r = dptr(rstd), x = dptr(inp), wf = cu_vector(g, w);
    int C = (int)w->cols;
    void *args[] = {&o, &r, &x, &wf, &C, &eps};
    cu_launch(g, K_RMSNORM_FWD, (unsigned)N, 1, 1, MB_CUDA_BLOCK, 0, args);
}

static void cuda_rmsnorm_backward(MbOps *ops, float *dinp, const float *dout, const float *inp, const MbWeight *w,
                                  const float *rstd, size_t N, int accumulate) {
    CU_CTX(ops);
    MbCuDevPtr dx = dptr(dinp), dy = dptr(dout), x = dptr(inp), wf = cu_vector(g, w), r = dptr(rstd);
    int C = (int)w->cols;
    void *args[] = {&dx, &dy, &x, &wf, &r, &C, &accumulate};
    cu_launch(g, K_RMSNORM_BWD, (unsigned)N, 1, 1, MB_CUDA_BLOCK, 0, args);
}

typedef struct {
    float f[MB_ROPE_MAX_HALF];
} CuRopeFreq; /* the kernel's struct RopeFreq */

static void cu_rope(MbCuda *g, float *x, const float *inv_freq, int B, int T, int pos0, int nh, int D, float sign) {
    if (D != g->head_dim) {
        cu_fail(g, MB_ERR_DEVICE, "cuda: rope on head dim %d, kernels built for %d", D, g->head_dim);
        return;
    }
    CuRopeFreq rf;
    memset(&rf, 0, sizeof rf);
    memcpy(rf.f, inv_freq, (size_t)(D / 2) * sizeof(float));
    MbCuDevPtr p = dptr(x);
    void *args[] = {&p, &rf, &T, &pos0, &nh, &sign};
    cu_launch(g, K_ROPE, (unsigned)(B * T), 1, 1, MB_CUDA_BLOCK, 0, args);
}

static void cuda_rope_forward(MbOps *ops, float *x, const float *inv_freq, int B, int T, int pos0, int nh, int D) {
    CU_CTX(ops);
    cu_rope(g, x, inv_freq, B, T, pos0, nh, D, 1.0f);
}

static void cuda_rope_backward(MbOps *ops, float *dx, const float *inv_freq, int B, int T, int pos0, int nh, int D) {
    CU_CTX(ops);
    cu_rope(g, dx, inv_freq, B, T, pos0, nh, D, -1.0f);
}

static void cuda_kv_store(MbOps *ops, float *cache, const float *x, int B, int T, int S, int pos0, int KD) {
    CU_CTX(ops);
    MbCuDevPtr c = dptr(cache), s = dptr(x);
    void *args[] = {&c, &s, &T, &S, &pos0, &KD};
    cu_launch(g, K_KV_STORE, (unsigned)T, (unsigned)B, 1, MB_CUDA_BLOCK, 0, args);
}

/* 1 (and the backend's failure) when the kernels were not built for these heads */
static int cu_check_heads(MbCuda *g, int H, int K, int D) {
    if (D == g->head_dim && K >= 1 && H % K == 0) return 0;
    cu_fail(g, MB_ERR_DEVICE, "cuda: attention with H=%d K=%d D=%d, kernels built for D=%d", H, K, D, g->head_dim);
    return 1;
}

static void cuda_attention_forward(MbOps *ops, float *out, float *lse, const float *q, const float *kc, const float *vc,
                                   const int *lens, int B, int T, int S, int pos0, int H, int K, int D) {
    CU_CTX(ops);
    if (cu_check_heads(g, H, K, D)) return;
    MbCuDevPtr o = dptr(out), l = dptr(lse), qq = dptr(q), k = dptr(kc), v = dptr(vc), ln = cu_ints(g, &g->lens, lens, (size_t)B);
    void *args[] = {&o, &l, &qq, &k, &v, &ln, &T, &S, &pos0, &H, &K};
    cu_launch(g, K_ATT_FWD, (unsigned)((T + g->att_bq - 1) / g->att_bq), (unsigned)H, (unsigned)B, 256,
              (unsigned)g->att_fwd_smem, args);
}

static void cuda_attention_backward(MbOps *ops, float *dq, float *dk, float *dv, const float *dout, const float *q,
                                    const float *k, const float *v, const float *out, const float *lse, const int *lens,
                                    int B, int T, int H, int K, int D) {
    CU_CTX(ops);
    if (cu_check_heads(g, H, K, D)) return;
    size_t rows = (size_t)B * T * H, n = rows * (size_t)D;
    MbCuDevPtr dq32 = cu_scratch(g, &g->att_dq, n * 4), delta = cu_scratch(g, &g->att_delta, rows * 4);
    if (!dq32 || !delta || cu_check(g, g->lib->cu.cuMemsetD8Async(dq32, 0, n * 4, g->stream))) return;
    MbCuDevPtr g_out = dptr(dout), o = dptr(out), qq = dptr(q), kk = dptr(k), vv = dptr(v), l = dptr(lse);
    MbCuDevPtr dkk = dptr(dk), dvv = dptr(dv), dqq = dptr(dq), ln = cu_ints(g, &g->lens, lens, (size_t)B);
    uint64_t urows = rows, un = n;
    void *a1[] = {&delta, &g_out, &o, &T, &H, &urows};
    cu_launch(g, K_ATT_DELTA, (unsigned)((rows + MB_CUDA_BLOCK / 32 - 1) / (MB_CUDA_BLOCK / 32)), 1, 1, MB_CUDA_BLOCK, 0, a1);
    void *a2[] = {&dq32, &dkk, &dvv, &g_out, &qq, &kk, &vv, &l, &delta, &ln, &T, &H, &K};
    cu_launch(g, K_ATT_BWD, (unsigned)((T + g->att_bwd_bk - 1) / g->att_bwd_bk), (unsigned)K, (unsigned)B, 256,
              (unsigned)g->att_bwd_smem, a2);
    void *a3[] = {&dqq, &dq32, &un};
    cu_launch_n(g, K_F32_TO_BF16, n, a3);
}

static void cuda_swiglu_forward(MbOps *ops, float *out, const float *gate, const float *up, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), a = dptr(gate), b = dptr(up);
    uint64_t un = n;
    void *args[] = {&o, &a, &b, &un};
    cu_launch_n(g, K_SWIGLU_FWD, n, args);
}

static void cuda_swiglu_backward(MbOps *ops, float *dgate, float *dup, const float *dout, const float *gate,
                                 const float *up, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr dg = dptr(dgate), du = dptr(dup), dy = dptr(dout), a = dptr(gate), b = dptr(up);
    uint64_t un = n;
    void *args[] = {&dg, &du, &dy, &a, &b, &un};
    cu_launch_n(g, K_SWIGLU_BWD, n, args);
}

static void cuda_gather_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t C) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), x = dptr(inp), r = cu_ints(g, &g->rows, rows, n);
    int c = (int)C;
    void *args[] = {&o, &x, &r, &c};
    cu_launch(g, K_GATHER, (unsigned)n, 1, 1, MB_CUDA_BLOCK, 0, args);
}

static void cuda_scatter_rows(MbOps *ops, float *out, const float *inp, const int *rows, size_t n, size_t N, size_t C) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), x = dptr(inp);
    cu_check(g, g->lib->cu.cuMemsetD8Async(o, 0, N * C * 2, g->stream));
    MbCuDevPtr r = cu_ints(g, &g->rows, rows, n);
    int c = (int)C;
    void *args[] = {&o, &x, &r, &c};
    cu_launch(g, K_SCATTER, (unsigned)n, 1, 1, MB_CUDA_BLOCK, 0, args);
}

static void cuda_add_forward(MbOps *ops, float *out, const float *a, const float *b, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), x = dptr(a), y = dptr(b);
    uint64_t un = n;
    void *args[] = {&o, &x, &y, &un};
    cu_launch_n(g, K_ADD, n, args);
}

static void cuda_dropout_forward(MbOps *ops, float *out, const float *inp, size_t n, float p, uint64_t seed) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), x = dptr(inp);
    uint64_t un = n, s = seed;
    void *args[] = {&o, &x, &un, &p, &s};
    cu_launch_n(g, K_DROPOUT, n, args);
}

/* A LoRA matrix (fp32 in this backend's memory) as bf16 in b, for the tensor cores */
static MbCuDevPtr cu_lora_bf16(MbCuda *g, CuBuf *b, const MbWeight *w) {
    size_t n = w->rows * w->cols;
    if (w->dtype != MB_DT_F32 || !cu_owns(g, w->data, n * 4))
        return cu_fail(g, MB_ERR_DEVICE, "cuda: LoRA weights must be fp32 in this backend's memory"), 0;
    return cu_to_bf16(g, b, dptr(w->data), n);
}

static void cuda_lora_forward(MbOps *ops, float *out, float *u, const float *x, const MbWeight *A, const MbWeight *B,
                              size_t N, float scale) {
    CU_CTX(ops);
    size_t R = A->rows, I = A->cols, O = B->rows;
    MbCuDevPtr a = cu_lora_bf16(g, &g->lora_a, A), b = cu_lora_bf16(g, &g->lora_b, B);
    cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, R, N, I, 1.0f, a, I, dptr(x), I, 0.0f, dptr(u), MB_CUDA_R_16BF, R);
    cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, O, N, R, scale, b, R, dptr(u), R, 1.0f, dptr(out), MB_CUDA_R_16BF, O);
}

static void cuda_lora_backward(MbOps *ops, float *dx, float *dA, float *dB, const float *dout, const float *x,
                               const float *u, const MbWeight *A, const MbWeight *B, size_t N, float scale) {
    CU_CTX(ops);
    size_t R = A->rows, I = A->cols, O = B->rows;
    MbCuDevPtr a = cu_lora_bf16(g, &g->lora_a, A), b = cu_lora_bf16(g, &g->lora_b, B);
    MbCuDevPtr du = cu_scratch(g, &g->lora_du, N * R * 2);
    /* dB (O, R) += scale dout^T u */
    cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_T, R, O, N, scale, dptr(u), R, dptr(dout), O, 1.0f, dptr(dB), MB_CUDA_R_32F, R);
    /* du (N, R) = scale dout @ B */
    cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_N, R, N, O, scale, b, R, dptr(dout), O, 0.0f, du, MB_CUDA_R_16BF, R);
    /* dA (R, I) += du^T x */
    cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_T, I, R, N, 1.0f, dptr(x), I, du, R, 1.0f, dptr(dA), MB_CUDA_R_32F, I);
    /* dx (N, I) += du @ A */
    cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_N, I, N, R, 1.0f, a, I, du, R, 1.0f, dptr(dx), MB_CUDA_R_16BF, I);
}

/* The fused lm_head + log-softmax + gather: chunks of rows x vocabulary; the logits of one chunk
 * (fp32) exist at a time, folded into per-row running statistics. */
static MbCuDevPtr cu_lm_head(MbCuda *g, const MbWeight *w) {
    CuW cw = cu_weight(g, w);
    if (cw.kind != CUW_BF16) return cu_fail(g, MB_ERR_DEVICE, "cuda: lm_head must be a dense weight"), 0;
    return cw.p;
}

static void cuda_logprob_forward(MbOps *ops, float *logp, float *lse, float *lsum, const float *x, const MbWeight *w,
                                 const int32_t *targets, size_t M) {
    CU_CTX(ops);
    size_t V = w->rows, C = w->cols, MR = MB_MIN(M, g->lp_rows), VC = MB_MIN(V, g->lp_vocab);
    MbCuDevPtr W = cu_lm_head(g, w), tg = cu_ints(g, &g->targets, (const int *)targets, M);
    MbCuDevPtr logits = cu_scratch(g, &g->lp_logits, MR * VC * 4), st = cu_scratch(g, &g->lp_state, MR * 16);
    for (size_t m0 = 0; m0 < M; m0 += MR) {
        size_t mr = MB_MIN(MR, M - m0);
        MbCuDevPtr xr = dptr(x) + m0 * C * 2, t = tg + m0 * 4;
        for (size_t v0 = 0; v0 < V; v0 += VC) {
            size_t vc = MB_MIN(VC, V - v0);
            cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, vc, mr, C, 1.0f, W + v0 * C * 2, C, xr, C, 0.0f, logits,
                    MB_CUDA_R_32F, vc);
            int ivc = (int)vc, iv0 = (int)v0, first = v0 == 0;
            void *args[] = {&logits, &ivc, &iv0, &t, &st, &first};
            cu_launch(g, K_LP_CHUNK, (unsigned)mr, 1, 1, MB_CUDA_BLOCK, 0, args);
        }
        MbCuDevPtr lp = dptr(logp) + m0 * 4, ls = dptr(lse) + m0 * 4, su = lsum ? dptr(lsum) + m0 * 4 : 0;
        int rows = (int)mr;
        void *args[] = {&lp, &ls, &su, &st, &rows};
        cu_launch(g, K_LP_FINISH, (unsigned)((mr + MB_CUDA_BLOCK - 1) / MB_CUDA_BLOCK), 1, 1, MB_CUDA_BLOCK, 0, args);
    }
}

static void cuda_logprob_backward(MbOps *ops, float *dx, const float *gr, const float *x, const MbWeight *w,
                                  const int32_t *targets, const float *lse, size_t M) {
    CU_CTX(ops);
    size_t V = w->rows, C = w->cols, MR = MB_MIN(M, g->lp_rows), VC = MB_MIN(V, g->lp_vocab);
    MbCuDevPtr W = cu_lm_head(g, w), tg = cu_ints(g, &g->targets, (const int *)targets, M);
    MbCuDevPtr logits = cu_scratch(g, &g->lp_logits, MR * VC * 4), dl = cu_scratch(g, &g->lp_dlogits, MR * VC * 2);
    MbCuDevPtr dx32 = cu_scratch(g, &g->lp_dx, MR * C * 4);
    for (size_t m0 = 0; m0 < M; m0 += MR) {
        size_t mr = MB_MIN(MR, M - m0);
        MbCuDevPtr xr = dptr(x) + m0 * C * 2, t = tg + m0 * 4, gg = dptr(gr) + m0 * 4, ls = dptr(lse) + m0 * 4;
        for (size_t v0 = 0; v0 < V; v0 += VC) {
            size_t vc = MB_MIN(VC, V - v0);
            cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, vc, mr, C, 1.0f, W + v0 * C * 2, C, xr, C, 0.0f, logits,
                    MB_CUDA_R_32F, vc);
            int ivc = (int)vc, iv0 = (int)v0;
            void *args[] = {&dl, &logits, &ivc, &iv0, &t, &gg, &ls};
            cu_launch(g, K_LP_GRAD, (unsigned)mr, 1, 1, MB_CUDA_BLOCK, 0, args);
            /* dx (mr, C) += dlogits (mr, vc) @ W[v0 : v0 + vc], summed in fp32 */
            cu_gemm(g, MB_CUBLAS_OP_N, MB_CUBLAS_OP_N, C, mr, vc, 1.0f, W + v0 * C * 2, C, dl, vc, v0 ? 1.0f : 0.0f, dx32,
                    MB_CUDA_R_32F, C);
        }
        MbCuDevPtr o = dptr(dx) + m0 * C * 2;
        uint64_t n = mr * C;
        void *args[] = {&o, &dx32, &n};
        cu_launch_n(g, K_F32_TO_BF16, mr * C, args);
    }
}

/* The sum of squares (0 when the backend failed: the caller reads its status) */
static double cuda_sumsq(MbOps *ops, const float *x, size_t n) {
    CU_CTX_OR(ops, 0.0);
    if (!n) return 0.0;
    unsigned grid = cu_grid(g, n);
    MbCuDevPtr part = cu_scratch(g, &g->partial, grid * sizeof(double)), xx = dptr(x);
    uint64_t un = n;
    void *args[] = {&part, &xx, &un};
    cu_launch(g, K_SUMSQ, grid, 1, 1, MB_CUDA_BLOCK, 0, args);
    double *h = mb_malloc(grid * sizeof(double)), s = 0.0;
    if (!h) return cu_oom(g), 0.0;
    if (!cu_check(g, g->lib->cu.cuMemcpyDtoHAsync(h, part, grid * sizeof(double), g->stream)) && !cu_sync(g))
        for (unsigned i = 0; i < grid; i++) s += h[i];
    free(h);
    return s;
}

static void cuda_scale(MbOps *ops, float *x, float s, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr p = dptr(x);
    uint64_t un = n;
    void *args[] = {&p, &s, &un};
    cu_launch_n(g, K_SCALE, n, args);
}

static void cuda_fill(MbOps *ops, float *x, float v, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr p = dptr(x);
    uint64_t un = n;
    void *args[] = {&p, &v, &un};
    cu_launch_n(g, K_FILL, n, args);
}

static void cuda_adamw(MbOps *ops, float *p, const float *gr, float *m, float *v, size_t n, double lr, double beta1,
                       double beta2, double eps, double wd, long step) {
    CU_CTX(ops);
    double bc1 = 1.0 - pow(beta1, (double)step), bc2 = 1.0 - pow(beta2, (double)step);
    float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2), decay = (float)(1.0 - lr * wd);
    float b1 = (float)beta1, b2 = (float)beta2, e = (float)eps;
    MbCuDevPtr pp = dptr(p), gg = dptr(gr), mm = dptr(m), vv = dptr(v);
    uint64_t un = n;
    void *args[] = {&pp, &gg, &mm, &vv, &un, &step_size, &bc2_sqrt, &decay, &b1, &b2, &e};
    cu_launch_n(g, K_ADAMW, n, args);
}

static void cuda_accumulate_f64(MbOps *ops, double *acc, const float *x, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr a = dptr(acc), xx = dptr(x);
    uint64_t un = n;
    void *args[] = {&a, &xx, &un};
    cu_launch_n(g, K_ACC_F64, n, args);
}

static void cuda_from_f64(MbOps *ops, float *out, const double *in, size_t n) {
    CU_CTX(ops);
    MbCuDevPtr o = dptr(out), i = dptr(in);
    uint64_t un = n;
    void *args[] = {&o, &i, &un};
    cu_launch_n(g, K_FROM_F64, n, args);
}

static void cuda_fill_f64(MbOps *ops, double *x, size_t n) {
    CU_CTX(ops);
    cu_check(g, g->lib->cu.cuMemsetD8Async(dptr(x), 0, n * sizeof(double), g->stream));
}

static void cuda_random_bytes(MbOps *ops, void *dst, size_t n, uint64_t seed) {
    CU_CTX(ops);
    MbCuDevPtr d = dptr(dst);
    uint64_t un = n, s = seed;
    void *args[] = {&d, &un, &s};
    cu_launch_n(g, K_RANDOM_BYTES, n, args);
}

static void cuda_random_normal(MbOps *ops, void *dst, size_t n, uint64_t seed, float std) {
    CU_CTX(ops);
    MbCuDevPtr d = dptr(dst);
    uint64_t un = n, s = seed;
    void *args[] = {&d, &un, &s, &std};
    cu_launch_n(g, K_RANDOM_NORMAL, n, args);
}

/* ---- starting and stopping the backend ---- */

/* Loads the kernels for g's device: from the cache when a cubin for this source, these options,
 * this architecture, driver and NVRTC is there; else compiled through NVRTC and cached. The ranks
 * of one process (--nproc) take turns, so one compiles and the others read its cubin. */
static MbStatus cuda_kernels_image(MbCuda *g) {
    const MbCudaLibs *L = g->lib;
    int ptx = 0;
    MbStatus rc = kernels_target(g->cc, g->arch, sizeof g->arch, &ptx);
    if (rc) return rc;
    char options[1024], key[1200], dir[512], path[700];
    const MbKernelSource *k = mb_kernel_source();
    snprintf(options, sizeof options, "--gpu-architecture=%s --std=c++17 %s %s", g->arch, k->spec_common,
             k->specs[g->spec]);
    snprintf(key, sizeof key, "%s|%s|driver %d|nvrtc %d.%d", k->hash, options, L->driver_version, L->nvrtc_major,
             L->nvrtc_minor);
    kernel_cache_dir(dir, sizeof dir);
    snprintf(path, sizeof path, "%s/kernels-%016llx.%s", dir, (unsigned long long)fnv1a(0xcbf29ce484222325ull, key,
             strlen(key)), ptx ? "ptx" : "cubin");
    char *image = NULL;
    size_t n = 0;
    int cached = dir[0] && mb_is_file(path) && mb_read_file(path, &image, &n) == MB_OK;
    if (cached && L->cu.cuModuleLoadData(&g->mod, image) != 0) { /* stale or corrupt: compile again */
        cached = 0;
        g->mod = NULL;
    }
    free(image);
    image = NULL;
    if (!cached) {
        double t0 = mb_now();
        mb_note("medbot: compiling the CUDA kernels for %s (head_dim %d) with NVRTC %d.%d (cached afterwards)\n",
                g->arch, g->head_dim, L->nvrtc_major, L->nvrtc_minor);
        if ((rc = kernels_compile(options, &image, &n, ptx))) return rc;
        mb_note("medbot: compiled the CUDA kernels in %.1f s\n", mb_now() - t0);
        rc = cu_status(L, L->cu.cuModuleLoadData(&g->mod, image));
        if (!rc && dir[0] && mb_write_file(path, image, n) != MB_OK)
            mb_note("medbot: note: cannot write the kernel cache %s (%s)\n", path, mb_last_error());
        free(image);
        if (rc) return rc;
    }
    for (int k = 0; k < K_COUNT && !rc; k++) rc = cu_status(L, L->cu.cuModuleGetFunction(&g->fn[k], g->mod, mb_kernel_names[k]));
    MbCuDevPtr params = 0;
    size_t psize = 0;
    int p[6];
    if (!rc) rc = cu_status(L, L->cu.cuModuleGetGlobal(&params, &psize, g->mod, "mb_kernel_params"));
    if (!rc && psize != sizeof p) rc = mb_fail(MB_ERR_DEVICE, "cuda: kernels.cu.in's mb_kernel_params has %zu bytes", psize);
    if (!rc) rc = cu_status(L, L->cu.cuMemcpyDtoHAsync(p, params, sizeof p, g->stream));
    if (!rc) rc = cu_status(L, L->cu.cuStreamSynchronize(g->stream));
    if (rc) return rc;
    g->att_fwd_smem = p[0], g->att_bwd_smem = p[1], g->att_bq = p[2], g->att_bk = p[3], g->att_bwd_bq = p[4], g->att_bwd_bk = p[5];
    if (!rc) rc = cu_status(L, L->cu.cuFuncSetAttribute(g->fn[K_ATT_FWD], MB_CU_FUNC_MAX_DYNAMIC_SMEM, g->att_fwd_smem));
    if (!rc) rc = cu_status(L, L->cu.cuFuncSetAttribute(g->fn[K_ATT_BWD], MB_CU_FUNC_MAX_DYNAMIC_SMEM, g->att_bwd_smem));
    return rc;
}

static pthread_mutex_t mb_kernel_cache_mu = PTHREAD_MUTEX_INITIALIZER;

static MbStatus cuda_kernels_load(MbCuda *g) {
    pthread_mutex_lock(&mb_kernel_cache_mu);
    MbStatus rc = cuda_kernels_image(g);
    pthread_mutex_unlock(&mb_kernel_cache_mu);
    return rc;
}

static MbStatus cuda_start(MbCuda *g) {
    const MbCuApi *cu = &g->lib->cu;
    int major = 0, minor = 0, sms = 0, optin = 0;
    MbStatus rc = cu_status(g->lib, cu->cuDeviceGet(&g->dev, g->gpu));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceGetAttribute(&major, MB_CU_ATTR_CC_MAJOR, g->dev));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceGetAttribute(&minor, MB_CU_ATTR_CC_MINOR, g->dev));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceGetAttribute(&sms, MB_CU_ATTR_SM_COUNT, g->dev));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceGetAttribute(&optin, MB_CU_ATTR_SMEM_OPTIN, g->dev));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceGetName(g->name, (int)sizeof g->name, g->dev));
    if (!rc) rc = cu_status(g->lib, cu->cuDeviceTotalMem(&g->total_mem, g->dev));
    if (rc) return rc;
    g->cc = major * 10 + minor, g->sms = sms, g->smem_optin = (size_t)optin;
    if (g->cc < 80)
        return mb_fail(MB_ERR_UNSUPPORTED, "cuda: GPU %d (%s) has compute capability %d.%d; medbot's CUDA backend needs "
                       "8.0 or newer (bf16 tensor cores) --> use --device cpu", g->gpu, g->name, major, minor);
    g->spec = spec_choose(g->head_dim, g->smem_optin);
    if (g->spec < 0) {
        char dims[128];
        spec_head_dims(dims, sizeof dims);
        return mb_fail(MB_ERR_UNSUPPORTED, "cuda: no kernel specialization for head_dim %d (kernels.cu.in has %s) --> "
                       "add a row to its table, or use --device cpu", g->head_dim, dims);
    }
    if ((rc = cu_status(g->lib, cu->cuDevicePrimaryCtxRetain(&g->ctx, g->dev)))) return g->ctx = NULL, rc;
    if ((rc = cu_status(g->lib, cu->cuCtxSetCurrent(g->ctx)))) return rc;
    size_t free_b = 0, total = 0;
    if ((rc = cu_status(g->lib, cu->cuMemGetInfo(&free_b, &total)))) return rc;
    g->device_used_start = g->device_used_peak = total - free_b;
    if ((rc = cu_status(g->lib, cu->cuStreamCreate(&g->stream, 0)))) return rc;
    if ((rc = cuda_kernels_load(g))) return rc;
    MbLtStatus s = g->lib->lt.cublasLtCreate(&g->lt);
    if (s) {
        g->lt = NULL;
        return mb_fail(MB_ERR_DEVICE, "cuda: cublasLtCreate failed: %s (%d) --> check the cuBLAS installation, or use "
                       "--device cpu", g->lib->lt.cublasLtGetStatusString(s), (int)s);
    }
    if (!(g->lt_ws.p = cu_malloc(g, MB_CUDA_LT_WORKSPACE))) return mb_ops_oom(g->ops);
    g->lt_ws.bytes = MB_CUDA_LT_WORKSPACE;
    mb_note("medbot: CUDA on GPU %d: %s (%s, %d SMs, %.1f GiB), kernels for head_dim %d, driver %d.%d\n", g->gpu,
            g->name, g->arch, g->sms, (double)g->total_mem / 1073741824.0, g->head_dim, g->lib->driver_version / 1000,
            g->lib->driver_version % 1000 / 10);
    return MB_OK;
}

static void cuda_destroy(MbOps *ops) {
    MbCuda *g = ops->ctx;
    const MbCuApi *cu = &g->lib->cu;
    if (g->ctx) {
        cu->cuCtxSetCurrent(g->ctx);
        if (g->stream) cu_sync(g);
        if (g->lt) {
            size_t weights = 0;
            for (ptrdiff_t i = 0; i < arrlen(g->uploads); i++) weights += g->uploads[i].bytes;
            mb_say("peak GPU memory: %.2f GiB on GPU %d (%s): medbot's buffers peaked at %.2f GiB (%.2f GiB of "
                   "uploaded weights), the rest is the CUDA context, cuBLAS, kernels and other processes\n",
                   (double)g->device_used_peak / 1073741824.0, g->gpu, g->name, (double)g->bytes_peak / 1073741824.0,
                   (double)weights / 1073741824.0);
            fflush(stdout);
        }
        for (ptrdiff_t i = 0; i < arrlen(g->uploads); i++) cu->cuMemFree(g->uploads[i].p);
        for (ptrdiff_t i = 0; i < arrlen(g->allocs); i++) cu->cuMemFree(g->allocs[i].p);
        CuBuf *bufs[] = {&g->lt_ws, &g->tokens.buf, &g->lens.buf, &g->rows.buf, &g->targets.buf, &g->tile, &g->lora_a,
                         &g->lora_b, &g->lora_du, &g->lp_logits, &g->lp_dlogits, &g->lp_dx, &g->lp_state, &g->att_dq,
                         &g->att_delta, &g->partial};
        for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
            if (bufs[i]->p) cu->cuMemFree(bufs[i]->p);
        for (ptrdiff_t i = 0; i < arrlen(g->plans); i++) {
            g->lib->lt.cublasLtMatrixLayoutDestroy(g->plans[i].la);
            g->lib->lt.cublasLtMatrixLayoutDestroy(g->plans[i].lb);
            g->lib->lt.cublasLtMatrixLayoutDestroy(g->plans[i].lc);
            g->lib->lt.cublasLtMatmulDescDestroy(g->plans[i].desc);
        }
        if (g->lt) g->lib->lt.cublasLtDestroy(g->lt);
        if (g->mod) cu->cuModuleUnload(g->mod);
        if (g->stream) cu->cuStreamDestroy(g->stream);
        cu->cuDevicePrimaryCtxRelease(g->dev);
    }
    free(g->tokens.shadow), free(g->lens.shadow), free(g->rows.shadow), free(g->targets.shadow);
    arrfree(g->uploads), arrfree(g->allocs), arrfree(g->plans);
    hmfree(g->plan_index), hmfree(g->dense), hmfree(g->vec), hmfree(g->nf4);
    free(g);
    free(ops);
}

/* The functions of the CUDA op table (a test checks that none is missing) */
static void cuda_ops_table(MbOps *ops) {
    if (ops->ctx) ((MbCuda *)ops->ctx)->ops = ops;
    ops->alloc = cuda_alloc;
    ops->free = cuda_free;
    ops->to_host = cuda_to_host;
    ops->from_host = cuda_from_host;
    ops->zero = cuda_zero;
    ops->embedding_forward = cuda_embedding_forward;
    ops->matmul_forward = cuda_matmul_forward;
    ops->logits_forward = cuda_logits_forward;
    ops->rmsnorm_forward = cuda_rmsnorm_forward;
    ops->rope_forward = cuda_rope_forward;
    ops->kv_store = cuda_kv_store;
    ops->attention_forward = cuda_attention_forward;
    ops->swiglu_forward = cuda_swiglu_forward;
    ops->gather_rows = cuda_gather_rows;
    ops->add_forward = cuda_add_forward;
    ops->dropout_forward = cuda_dropout_forward;
    ops->lora_forward = cuda_lora_forward;
    ops->logprob_forward = cuda_logprob_forward;
    ops->matmul_backward = cuda_matmul_backward;
    ops->rmsnorm_backward = cuda_rmsnorm_backward;
    ops->rope_backward = cuda_rope_backward;
    ops->attention_backward = cuda_attention_backward;
    ops->swiglu_backward = cuda_swiglu_backward;
    ops->lora_backward = cuda_lora_backward;
    ops->logprob_backward = cuda_logprob_backward;
    ops->scatter_rows = cuda_scatter_rows;
    ops->sumsq = cuda_sumsq;
    ops->scale = cuda_scale;
    ops->fill = cuda_fill;
    ops->adamw = cuda_adamw;
    ops->accumulate_f64 = cuda_accumulate_f64;
    ops->from_f64 = cuda_from_f64;
    ops->fill_f64 = cuda_fill_f64;
    ops->random_bytes = cuda_random_bytes;
    ops->random_normal = cuda_random_normal;
}

/* The CUDA backend on GPU `gpu` for a model of head dim head_dim. */
static MbStatus mb_cuda_ops_new(int gpu, int head_dim, MbOps **out) {
    *out = NULL;
    const MbCudaLibs *L;
    MbStatus rc = cuda_libs(MB_LIB_DRIVER | MB_LIB_NVRTC | MB_LIB_CUBLASLT, &L);
    if (rc) return rc;
    if (gpu < 0 || gpu >= L->devices)
        return mb_fail(MB_ERR_ARG, "cuda: there is no GPU %d (this machine has %d) --> check CUDA_VISIBLE_DEVICES", gpu,
                       L->devices);
    MbCuda *g = mb_calloc(1, sizeof *g);
    MbOps *ops = g ? mb_calloc(1, sizeof *ops) : NULL;
    if (!ops) return free(g), MB_ERR_OOM;
    g->lib = L, g->gpu = gpu, g->head_dim = head_dim, g->ops = ops;
    g->tile_bytes = MB_CUDA_TILE_BYTES, g->lp_rows = MB_CUDA_LP_ROWS, g->lp_vocab = MB_CUDA_LP_VOCAB;
    const char *sync = getenv("MEDBOT_CUDA_SYNC");
    g->sync_each = sync && sync[0] == '1';
    ops->name = "cuda";
    ops->ctx = g;
    ops->act_size = 2; /* bf16 */
    ops->host_memory = 0;
    ops->destroy = cuda_destroy;
    if ((rc = cuda_start(g))) {
        cuda_destroy(ops);
        return rc;
    }
    cuda_ops_table(ops);
    *out = ops;
    return MB_OK;
}

/* What mb_ops_new calls for CUDA. A test (tests/test_cuda_emu.c) may put a constructor here that
 * builds this backend on an emulated driver; nothing else writes it. */
static MbStatus (*mb_cuda_backend_new)(int gpu, int head_dim, MbOps **out) = mb_cuda_ops_new;

/* MB_DEVICE_AUTO: MEDBOT_DEVICE=cpu|cuda when set, else CUDA when the driver sees a GPU. */
static int mb_device_resolve(int device, int *explicit_choice) {
    *explicit_choice = device != MB_DEVICE_AUTO;
    if (device != MB_DEVICE_AUTO) return device;
    const char *e = getenv("MEDBOT_DEVICE");
    if (e && !strcmp(e, "cpu")) return *explicit_choice = 1, MB_DEVICE_CPU;
    if (e && !strcmp(e, "cuda")) return *explicit_choice = 1, MB_DEVICE_CUDA;
    return mb_cuda_device_count() > 0 ? MB_DEVICE_CUDA : MB_DEVICE_CPU;
}

/* The op table a model runs on. An automatic choice of CUDA that cannot start falls back to the
 * CPU with a note; an explicit one is an error. */
static MbStatus mb_ops_new(const MbLoadOptions *opt, const MbConfig *c, MbOps **out) {
    int explicit_choice, dev = mb_device_resolve(opt ? opt->device : MB_DEVICE_AUTO, &explicit_choice);
    if (dev == MB_DEVICE_CUDA) {
        MbStatus rc = mb_cuda_backend_new(opt ? opt->gpu : 0, c->head_dim, out);
        if (!rc || explicit_choice) return rc;
        mb_note("medbot: note: %s; running on the CPU (--device cpu chooses it, --device cuda makes this an "
                "error)\n", mb_last_error());
    } else if (dev != MB_DEVICE_CPU) {
        return mb_fail(MB_ERR_ARG, "device %d is not cpu or cuda", dev);
    }
    *out = mb_cpu_ops_new(opt ? opt->threads : 0);
    return *out ? MB_OK : MB_ERR_OOM;
}

/* ---- NCCL: the device side of a rank of the coordinator's NCCL backend (section 11) ---- */

struct MbNcclRank {
    const MbCudaLibs *lib;
    MbNcclComm_t comm;  /* NULL once aborted */
    MbCuDevice dev;
    MbCuContext ctx;
    MbCuStream stream;
    MbCuDevPtr scratch;
    size_t scratch_bytes;
};

/* An NCCL call's failure as a status: "FILE:LINE: CALL failed: text --> hint" */
static MbStatus nccl_check_(const MbCudaLibs *L, MbNcclResult r, const char *what, const char *file, int line) {
    if (r == 0) return MB_OK;
    return mb_fail(MB_ERR_DEVICE, "%s:%d: %s failed: %s --> rerun with NCCL_DEBUG=INFO", file, line, what,
                   L->nccl.ncclGetErrorString(r));
}
#define nccl_check(L, call) nccl_check_((L), (call), #call, __FILE__, __LINE__)

static void nccl_rank_free(MbNcclRank *k) {
    if (!k) return;
    const MbCudaLibs *L = k->lib;
    if (k->ctx) L->cu.cuCtxSetCurrent(k->ctx);
    if (k->comm) L->nccl.ncclCommDestroy(k->comm);
    if (k->scratch) L->cu.cuMemFree(k->scratch);
    if (k->stream) L->cu.cuStreamDestroy(k->stream);
    if (k->ctx) L->cu.cuDevicePrimaryCtxRelease(k->dev);
    free(k);
}

/* The device side of an initialized NCCL communicator on GPU gpu (freed with k on a failure) */
static MbStatus nccl_rank_open(const MbCudaLibs *L, MbNcclComm_t comm, int gpu, MbNcclRank **out) {
    MbNcclRank *k = mb_calloc(1, sizeof *k);
    if (!k) return L->nccl.ncclCommDestroy(comm), MB_ERR_OOM;
    k->lib = L, k->comm = comm;
    MbStatus rc = cu_status(L, L->cu.cuDeviceGet(&k->dev, gpu));
    if (!rc && (rc = cu_status(L, L->cu.cuDevicePrimaryCtxRetain(&k->ctx, k->dev)))) k->ctx = NULL;
    if (!rc) rc = cu_status(L, L->cu.cuCtxSetCurrent(k->ctx));
    if (!rc && (rc = cu_status(L, L->cu.cuStreamCreate(&k->stream, 0)))) k->stream = NULL;
    if (rc) {
        nccl_rank_free(k);
        return rc;
    }
    *out = k;
    return MB_OK;
}

static MbStatus nccl_rank_new(int rank, int world, int gpu, MbStatus (*exchange)(void *arg, void *id, size_t n),
                              void *arg, MbNcclRank **out) {
    *out = NULL;
    const MbCudaLibs *L;
    MbStatus rc = cuda_libs(MB_LIB_DRIVER | MB_LIB_NCCL, &L);
    if (rc) return rc;
    if (gpu < 0 || gpu >= L->devices)
        return mb_fail(MB_ERR_ARG, "rank %d: local rank %d has no GPU (this machine has %d) --> one rank per GPU: the "
                       "launcher's local rank (LOCAL_RANK, SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK or MPI_LOCALRANKID) "
                       "picks it", rank, gpu, L->devices);
    MbNcclUniqueId id;
    memset(&id, 0, sizeof id);
    MbCuDevice dev;
    MbCuContext ctx;
    if ((rc = cu_status(L, L->cu.cuDeviceGet(&dev, gpu))) || (rc = cu_status(L, L->cu.cuDevicePrimaryCtxRetain(&ctx, dev))))
        return rc;
    L->cu.cuCtxSetCurrent(ctx);
    if (rank == 0) rc = nccl_check(L, L->nccl.ncclGetUniqueId(&id));
    if (!rc) rc = exchange(arg, &id, sizeof id);
    MbNcclComm_t comm = NULL;
    if (!rc) rc = nccl_check(L, L->nccl.ncclCommInitRank(&comm, world, id, rank));
    if (!rc) rc = nccl_rank_open(L, comm, gpu, out);
    L->cu.cuDevicePrimaryCtxRelease(dev);
    return rc;
}

static MbStatus nccl_ranks_new_all(int world, int gpu0, MbNcclRank **out) {
    const MbCudaLibs *L;
    MbStatus rc = cuda_libs(MB_LIB_DRIVER | MB_LIB_NCCL, &L);
    if (rc) return rc;
    if (gpu0 < 0 || gpu0 + world > L->devices)
        return mb_fail(MB_ERR_ARG, "--nproc %d on the CUDA backend needs GPUs %d..%d; this machine has %d", world, gpu0,
                       gpu0 + world - 1, L->devices);
    int *devs = mb_malloc((size_t)world * sizeof *devs);
    MbNcclComm_t *raw = mb_calloc((size_t)world, sizeof *raw);
    if (!devs || !raw) rc = MB_ERR_OOM;
    for (int r = 0; !rc && r < world; r++) devs[r] = gpu0 + r;
    if (!rc) rc = nccl_check(L, L->nccl.ncclCommInitAll(raw, world, devs));
    for (int r = 0; !rc && r < world; r++) {
        rc = nccl_rank_open(L, raw[r], gpu0 + r, &out[r]); /* (destroys raw[r] when it fails) */
        raw[r] = NULL;
        if (rc) {
            for (int q = r + 1; q < world; q++) L->nccl.ncclCommDestroy(raw[q]);
            for (int q = 0; q < r; q++) nccl_rank_free(out[q]), out[q] = NULL;
        }
    }
    free(devs), free(raw);
    return rc;
}

/* Makes k's context current and waits for the work queued on the device (the op table's stream). */
static MbStatus nccl_rank_enter(MbNcclRank *k) {
    if (!k->comm) return mb_fail(MB_ERR_DEVICE, "NCCL: the communicator was aborted");
    MbStatus rc = cu_status(k->lib, k->lib->cu.cuCtxSetCurrent(k->ctx));
    return rc ? rc : cu_status(k->lib, k->lib->cu.cuCtxSynchronize());
}

static MbStatus nccl_rank_start(MbNcclRank *k, int op, int f64, const void *send, void *recv, size_t count, int root) {
    const MbCudaLibs *L = k->lib;
    MbNcclDataType dt = f64 ? MB_NCCL_FLOAT64 : MB_NCCL_FLOAT32;
    MbStatus rc = nccl_rank_enter(k);
    if (rc) return rc;
    switch (op) {
    case MB_NCCL_ALL_REDUCE: return nccl_check(L, L->nccl.ncclAllReduce(send, recv, count, dt, MB_NCCL_SUM, k->comm, k->stream));
    case MB_NCCL_REDUCE_SCATTER:
        return nccl_check(L, L->nccl.ncclReduceScatter(send, recv, count, dt, MB_NCCL_SUM, k->comm, k->stream));
    case MB_NCCL_ALL_GATHER: return nccl_check(L, L->nccl.ncclAllGather(send, recv, count, dt, k->comm, k->stream));
    default: return nccl_check(L, L->nccl.ncclBroadcast(send, recv, count, dt, root, k->comm, k->stream));
    }
}

static MbStatus nccl_rank_start_host(MbNcclRank *k, double *x, size_t n) {
    const MbCudaLibs *L = k->lib;
    size_t bytes = n * sizeof(double);
    MbStatus rc = nccl_rank_enter(k);
    if (!rc && k->scratch_bytes < bytes) {
        if (k->scratch) rc = cu_status(L, L->cu.cuMemFree(k->scratch));
        k->scratch = 0, k->scratch_bytes = 0;
        if (!rc) rc = cu_status(L, L->cu.cuMemAlloc(&k->scratch, bytes));
        if (!rc) k->scratch_bytes = bytes;
        else k->scratch = 0;
    }
    if (!rc) rc = cu_status(L, L->cu.cuMemcpyHtoDAsync(k->scratch, x, bytes, k->stream));
    if (!rc) rc = nccl_check(L, L->nccl.ncclAllReduce(hptr(k->scratch), hptr(k->scratch), n, MB_NCCL_FLOAT64, MB_NCCL_SUM,
                                                     k->comm, k->stream));
    if (!rc) rc = cu_status(L, L->cu.cuMemcpyDtoHAsync(x, k->scratch, bytes, k->stream));
    return rc;
}

static int nccl_rank_poll(MbNcclRank *k, const char **nccl_error) {
    const MbCudaLibs *L = k->lib;
    *nccl_error = NULL;
    MbCuResult r = L->cu.cuStreamQuery(k->stream);
    if (r == 0) return 1;
    if (r != MB_CU_ERROR_NOT_READY) return cu_status_(L, r, "cuStreamQuery", __FILE__, __LINE__), -1;
    MbNcclResult e = 0;
    L->nccl.ncclCommGetAsyncError(k->comm, &e);
    if (e) return *nccl_error = L->nccl.ncclGetErrorString(e), -1;
    return 0;
}

/* Aborts the communicator (its queued work stops); k then only frees. */
static void nccl_rank_abort(MbNcclRank *k) {
    if (!k->comm) return;
    k->lib->cu.cuCtxSetCurrent(k->ctx);
    k->lib->nccl.ncclCommAbort(k->comm);
    k->comm = NULL;
}

// ============================================================================================
// ---------- 13. cli ----------
// medbot COMMAND [options]. Options are --name value (or --name=value), named as in TRL / HF.
// Each command's options are declared once, in groups that several commands share (the tables
// below): `medbot CMD --help` is printed from them, and reading an option that is not in the
// command's table is refused, so the help cannot omit one. The tables are compiled always (the
// tests read them); the rest is compiled out with MEDBOT_NO_MAIN (vendoring users and the tests
// call the library instead).
// ============================================================================================

/* One option: --name VALUE, and one line of help that gives its default. */
typedef struct {
    const char *name;
    const char *value;  /* the value's placeholder ("N", "DIR", "sigmoid|hinge"); NULL: a boolean, true
                           when given alone (--name false turns it off) */
    const char *help;
} MbOpt;

/* A heading of a command's --help over a group of options (title NULL: the group goes on under
 * the heading above). */
typedef struct {
    const char *title;
    const MbOpt *opts;  /* up to the {NULL} entry */
} MbOptSection;

#define MB_CLI_SECTIONS 16
typedef struct {
    const char *name;
    const char *usage;  /* its command lines, one a line, each after "medbot " */
    const char *about;  /* what it does: one paragraph (wrapped when printed) */
    MbOptSection sections[MB_CLI_SECTIONS]; /* up to the first without opts */
    const char *config_of; /* its --config file may hold this command's settings too: those it does
                              not take are ignored (one card serves dpo, sft and eval) */
} MbCliCommand;

/* ---- groups of options, each declared once ---- */

static const MbOpt mb_opts_train_model[] = {
    {"model", "DIR", "the base model: a Hugging Face folder, config.json and *.safetensors (required)"},
    {"tokenizer", "PATH", "tokenizer.json, tokenizer.model or a folder holding one (default: the model's, else the "
                          "adapter's)"},
    {"lora", "ADAPTER_DIR", "start from this PEFT adapter (its r, lora_alpha and target_modules) instead of a new one"},
    {"random_init", NULL, "read no weights: random ones drawn from --seed, for speed and memory at real shapes"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_eval_model[] = {
    {"model", "DIR", "the base model: a Hugging Face folder, config.json and *.safetensors (required)"},
    {"lora", "ADAPTER_DIR", "the PEFT adapter to evaluate (default: none, the base model itself)"},
    {"tokenizer", "PATH", "tokenizer.json, tokenizer.model or a folder holding one (default: the model's, else the "
                          "adapter's)"},
    {"sft", NULL, "the next-token loss of the chosen completions (what medbot sft trains) instead of DPO's metrics"},
    {"random_init", NULL, "read no weights: random ones drawn from --seed"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_4bit[] = {
    {"load_in_4bit", NULL, "quantize the 7 projections of each layer to NF4 while loading, as bitsandbytes does "
                           "(QLoRA: blocksize 64, double quant; default false)"},
    {"bnb_4bit_compute_dtype", "float32|bfloat16|float16", "what 4-bit weights are dequantized to (default: the "
                                                          "checkpoint's quantization_config, else float32)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_device[] = {
    {"device", "cpu|cuda", "where the model runs (default: cuda when a GPU is present; MEDBOT_DEVICE=cpu|cuda "
                           "overrides the default)"},
    {"gpu", "N", "the first CUDA device used (default 0)"},
    {"threads", "N", "CPU threads (default 0: all cores)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_train_data[] = {
    {"data", "FILE.jsonl", "preference pairs, a JSON object a line: {prompt, chosen, rejected} or {system?, question, "
                           "chosen, rejected} (required)"},
    {"eval_data", "FILE.jsonl", "pairs to evaluate on (default: --eval_split of --data)"},
    {"eval_split", "X", "without --eval_data: hold out this share of --data for evaluation (default 0)"},
    {"shuffle", "true|false", "shuffle the pairs each epoch, seeded by --seed (default true)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_eval_data[] = {
    {"data", "FILE.jsonl", "the preference pairs to evaluate (as dpo reads them; required)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_lora[] = {
    {"lora_r", "N", "the adapter's rank r (default 8)"},
    {"lora_alpha", "X", "scale = lora_alpha / r (default 8)"},
    {"lora_dropout", "X", "dropout on the adapter's input while training (default 0)"},
    {"lora_target_modules", "LIST", "the projections adapted: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj "
                                    "or all-linear (default q_proj,k_proj)"},
    {"use_rslora", NULL, "rank-stabilized LoRA: scale = lora_alpha / sqrt(r) (default false)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_dpo_loss[] = {
    {"loss_type", "sigmoid|hinge|ipo|robust", "the DPO loss (default sigmoid)"},
    {"beta", "X", "the DPO temperature: how far the policy may move from the reference (default 0.1)"},
    {"label_smoothing", "X", "the share of preference labels assumed wrong, for sigmoid and robust (default 0)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_dpo_ref[] = {
    {"precompute_ref_log_probs", NULL, "compute the reference model's log-probs once before training (kept in the "
                                       "output folder) instead of at each step (default false)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_optim[] = {
    {"learning_rate", "X", "AdamW's peak learning rate (default 1e-6)"},
    {"lr_scheduler_type", "linear|cosine|constant|constant_with_warmup", "the schedule after warmup (default linear)"},
    {"warmup_ratio", "X", "warm up over this share of the steps (default 0)"},
    {"warmup_steps", "N", "warm up over N steps; > 0 overrides --warmup_ratio (default 0)"},
    {"weight_decay", "X", "AdamW's decoupled weight decay (default 0)"},
    {"adam_beta1", "X", "(default 0.9)"},
    {"adam_beta2", "X", "(default 0.999)"},
    {"adam_epsilon", "X", "(default 1e-8)"},
    {"max_grad_norm", "X", "clip the gradient's global norm to this; 0: no clipping (default 1)"},
    {"num_train_epochs", "X", "passes over the training pairs (default 3)"},
    {"max_steps", "N", "optimizer steps; > 0 overrides --num_train_epochs (default -1)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_lengths[] = {
    {"max_length", "N", "a sequence, prompt + completion, keeps its last N tokens (default 1024)"},
    {"max_prompt_length", "N", "a prompt keeps its last N tokens (default 512)"},
    {"max_completion_length", "N", "a completion keeps its first N tokens; 0: no limit (default 0)"},
    {"add_bos", NULL, "<|begin_of_text|> in front of each prompt (default false, as TRL does)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_eval_batch[] = {
    {"per_device_eval_batch_size", "N", "pairs per evaluation batch (default 8)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_train_batch[] = {
    {"per_device_train_batch_size", "N", "pairs per micro-batch on each rank (default 8)"},
    {"gradient_accumulation_steps", "N", "micro-batches per optimizer step (default 1)"},
    {"gradient_checkpointing", NULL, "recompute each layer's activations in the backward pass: less memory, more "
                                     "time (default false)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_train_run[] = {
    {"output", "DIR", "the adapter, checkpoint-N/, metrics.jsonl and training.svg go here (required)"},
    {"overwrite_output_dir", NULL, "replace the run an output folder holds (default false: refused)"},
    {"resume_from_checkpoint", "DIR|latest", "go on from a checkpoint folder, or OUTPUT's newest"},
    {"logging_steps", "N", "print and record the metrics every N steps (default 10)"},
    {"eval_steps", "N", "evaluate every N steps; 0: at the end only (default 0)"},
    {"save_steps", "N", "write checkpoint-N/ every N steps (default 500)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_seed[] = {
    {"seed", "S", "seeds the adapter's initialization, dropout, shuffling, the eval split and --random_init's "
                  "weights (default 42)"},
    {"config", "FILE.yaml", "read settings from a key: value file (the card's block, weights/dpo_card.yaml, or a "
                            "TRL / PEFT YAML); the command line wins"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_dist[] = {
    {"nproc", "N", "data-parallel ranks in this process: CPU threads, or N GPUs with CUDA (default 1). Under "
                   "torchrun (WORLD_SIZE > 1) each process is one rank: one GPU each (NCCL), or CPU processes joined "
                   "over TCP"},
    {"zero_stage", "0|1", "ZeRO-1 shards AdamW's moments across ranks (default: 1 with several ranks, else 0)"},
    {"ddp_timeout", "S", "a rank that dies or hangs stops the job within S seconds (default 1800)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_gen_model[] = {
    {"model", "DIR", "a Hugging Face model folder, config.json and *.safetensors (required)"},
    {"lora", "ADAPTER_DIR", "answer with this PEFT adapter on the model"},
    {"tokenizer", "PATH", "tokenizer.json, tokenizer.model or a folder holding one (default: the model's, else the "
                          "adapter's)"},
    {"random_init", NULL, "read no weights: random ones drawn from --seed (default 42, the weights of dpo "
                          "--random_init)"},
    {"system", "TEXT", "the template's system text (default: the card's \"" MB_DEFAULT_SYSTEM "\")"},
    {"add_bos", "true|false", "<|begin_of_text|> in front of the prompt (default true, as tokenizer(prompt): a Llama "
                              "tokenizer_config.json may say add_bos_token false)"},
    {"max_context", "N", "the most tokens the model runs at once (default: max_position_embeddings, at most 4096)"},
    {"exact", NULL, "compute as transformers does, bit for bit as the parity tests check (default: the CPU's fast "
                    "path, 8-bit activations against NF4 and bf16 products; README: \"The fast path\")"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_sampling[] = {
    {"max_new_tokens", "N", "the longest answer (default 256); an answer also stops at eos_token_id, <|eot_id|> or "
                            "<|eom_id|>"},
    {"do_sample", NULL, "draw each token from the processed softmax (the default)"},
    {"greedy", NULL, "take the most likely token each time (do_sample false)"},
    {"temperature", "X", "(default 0.7)"},
    {"top_p", "X", "(default 0.9; 1 = off)"},
    {"top_k", "N", "(default 50, transformers' default; 0 = off)"},
    {"repetition_penalty", "X", "(default 1.1; 1 = off)"},
    {"no_repeat_ngram_size", "N", "never repeat an n-gram of this size (default 0: off)"},
    {"seed", "S", "the sampling's seed (default: a new one each run)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_generate[] = {
    {"prompt", "TEXT", "the question to answer, in the card's template (or as it is with --raw)"},
    {"input", "FILE.jsonl", "one prompt a line, {\"question\"[, \"system\"]} or {\"prompt\"} (as it is): one JSON line "
                            "{\"question\"|\"prompt\", \"answer\", \"tokens\"} each"},
    {"raw", NULL, "the prompt as it is, without the template (special tokens in it are parsed)"},
    {NULL, NULL, NULL}};

static const MbOpt mb_opts_info[] = {
    {"plan", NULL, "print the memory per device of a DPO training step instead, from config.json alone (MODEL_DIR "
                   "may be the file)"},
    {"threads", "N", "CPU threads that read and check the weights (default 1; 0: all cores)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_plan[] = {
    {"lora_r", "N", "(default 64, the card's)"},
    {"lora_alpha", "X", "(default 8)"},
    {"lora_target_modules", "LIST", "(default q_proj,k_proj)"},
    {"per_device_train_batch_size", "N", "pairs in a micro-batch (default 4)"},
    {"max_length", "N", "tokens per sequence (default 512)"},
    {"gradient_checkpointing", NULL, "(default false)"},
    {"gpus", "N", "data-parallel GPUs (default 1)"},
    {"zero_stage", "0|1|2", "how the training state is sharded across them (default 0)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_init[] = {
    {"config", "CONFIG_JSON", "the model's config.json (required)"},
    {"output", "DIR", "the folder to write (required)"},
    {"seed", "S", "(default 0)"},
    {"dtype", "bf16|f16|f32", "the weights' dtype (default bf16)"},
    {"std", "X", "the standard deviation of the normal weights, initializer_range (default 0.02)"},
    {"max_shard_size", "SIZE", "shards of at most SIZE bytes, as save_pretrained writes them (\"5GB\", \"500MB\": "
                               "powers of 1000; default 5GB): model-0000K-of-0000N.safetensors and "
                               "model.safetensors.index.json; a model under SIZE is one model.safetensors"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_merge[] = {
    {"model", "DIR", "the base model folder (required)"},
    {"lora", "ADAPTER_DIR", "the PEFT adapter to merge (required)"},
    {"output", "DIR", "the folder to write; never over an input (required)"},
    {"tokenizer", "PATH", "the tokenizer to copy (default: the model's, else the adapter's)"},
    {"threads", "N", "CPU threads (default 0: all cores)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_encode[] = {
    {"tokenizer", "PATH", "tokenizer.json, tokenizer.model or a model folder (required)"},
    {"add_bos", NULL, "<|begin_of_text|> in front (default false)"},
    {NULL, NULL, NULL}};
static const MbOpt mb_opts_decode[] = {
    {"tokenizer", "PATH", "tokenizer.json, tokenizer.model or a model folder (required)"},
    {"skip_special_tokens", NULL, "leave out special tokens such as <|eot_id|> (default false)"},
    {NULL, NULL, NULL}};

static const MbOpt mb_opts_card[] = { /* settings of the card's block that medbot has fixed or only notes */
    {"bnb_4bit_quant_type", "nf4", "checked: nf4 is the 4-bit type medbot implements"},
    {"bnb_4bit_use_double_quant", "true|false", "accepted: medbot's NF4 is always double-quantized"},
    {"bias", "none", "checked: medbot trains LoRA with bias none"},
    {"bf16", "true|false", "accepted: the CPU computes in fp32, CUDA keeps bf16 activations either way"},
    {"effective_batch_size", "N", "pairs per optimizer step on all GPUs (batch x accumulation x GPUs): a note when "
                                  "this run's differs"},
    {"trainable_params", "TEXT", "the card's note (~54MB): accepted, not used"},
    {NULL, NULL, NULL}};

/* The --config keys (the card's names) of options named otherwise. */
static const char *const mb_cli_config_renames[][2] = {
    {"seq_length", "max_length"}, {"batch_size", "per_device_train_batch_size"}, {"r", "lora_r"},
    {"target_modules", "lora_target_modules"}, {"output_dir", "output"}};


/* Every command: its --help is printed from this table (main holds the functions). */
static const MbCliCommand mb_cli_commands[] = {
    {"info", "info MODEL_DIR [options]\ninfo MODEL_DIR --plan [options]",
     "Prints the model's config, its parameter count by kind and bytes per dtype (and those of the 4-bit weights); "
     "with --plan, the memory per device of a DPO training step, from config.json alone.",
     {{"options", mb_opts_info}, {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit},
      {"--plan: the training step planned (the card's settings, flags off)", mb_opts_plan}},
     NULL},
    {"dpo", "dpo --model DIR --data FILE.jsonl --output DIR [options]\n"
            "dpo [--resume_from_checkpoint latest] [--threads N] [--device cpu|cuda] [--gpu N]",
     "Trains a LoRA adapter with DPO as TRL's DPOTrainer does. With no option but those of the second line it runs "
     "the bundled demo: the tiny Llama in weights/tiny learns the preference pairs of weights/demo/pairs.jsonl, "
     "into demo-output/. Options have TRL's names; --config reads them from a file.",
     {{"model", mb_opts_train_model}, {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit},
      {"device", mb_opts_device}, {"data", mb_opts_train_data}, {NULL, mb_opts_lengths},
      {"LoRA (PEFT's LoraConfig)", mb_opts_lora}, {"DPO loss", mb_opts_dpo_loss}, {NULL, mb_opts_dpo_ref},
      {"optimizer and schedule", mb_opts_optim}, {"batch", mb_opts_train_batch}, {NULL, mb_opts_eval_batch},
      {"run and output", mb_opts_train_run}, {NULL, mb_opts_seed}, {"ranks (data parallel)", mb_opts_dist},
      {"the model card's other settings (for --config)", mb_opts_card}},
     NULL},
    {"sft", "sft --model DIR --data FILE.jsonl --output DIR [options]",
     "Trains a LoRA adapter with the next-token loss of the chosen completions (the options of dpo but its loss; "
     "a --config file's DPO settings are ignored).",
     {{"model", mb_opts_train_model}, {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit},
      {"device", mb_opts_device}, {"data", mb_opts_train_data}, {NULL, mb_opts_lengths},
      {"LoRA (PEFT's LoraConfig)", mb_opts_lora}, {"optimizer and schedule", mb_opts_optim},
      {"batch", mb_opts_train_batch}, {NULL, mb_opts_eval_batch}, {"run and output", mb_opts_train_run},
      {NULL, mb_opts_seed}, {"ranks (data parallel)", mb_opts_dist},
      {"the model card's other settings (for --config)", mb_opts_card}},
     "dpo"},
    {"eval", "eval --model DIR --lora ADAPTER_DIR --data FILE.jsonl [options]",
     "Prints TRL's DPO metrics (eval_loss, eval_rewards/..., eval_logps/..., eval_logits/...) of the model with the "
     "adapter on a file. A --config file may hold training settings too: those of dpo that eval does not take are "
     "ignored.",
     {{"model", mb_opts_eval_model}, {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit},
      {"device", mb_opts_device}, {"data", mb_opts_eval_data}, {NULL, mb_opts_lengths},
      {"DPO loss", mb_opts_dpo_loss}, {"batch", mb_opts_eval_batch}, {"run", mb_opts_seed}},
     "dpo"},
    {"merge", "merge --model DIR --lora ADAPTER_DIR --output DIR [options]",
     "Writes the model with the adapter merged (fp32 math): bf16 safetensors, config.json (dtype bfloat16), "
     "generation_config.json and the tokenizer.",
     {{"options", mb_opts_merge}},
     NULL},
    {"init", "init --config CONFIG_JSON --output DIR [options]",
     "Writes a model folder with random weights (transformers' init) for a config, tensor by tensor (memory: "
     "a few MB at any size), sharded as save_pretrained does.",
     {{"options", mb_opts_init}},
     NULL},
    {"encode", "encode --tokenizer PATH [--add_bos]",
     "Reads standard input as one text and prints its token ids on one line (special tokens in the text are split "
     "out).",
     {{"options", mb_opts_encode}},
     NULL},
    {"decode", "decode --tokenizer PATH [--skip_special_tokens]",
     "Reads token ids (whitespace separated) from standard input and prints their text.",
     {{"options", mb_opts_decode}},
     NULL},
    {"generate", "generate --model DIR (--prompt TEXT | --input FILE.jsonl) [options]",
     "Answers with the card's prompt \"###System: {system}\\n###Question: {question}\\n###Answer: \", "
     "<|begin_of_text|> in front, streamed to stdout; --input answers a file of prompts with one JSON line each.",
     {{"model", mb_opts_gen_model}, {"prompts", mb_opts_generate},
      {"sampling (HF generate's names, the card's defaults)", mb_opts_sampling},
      {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit}, {"device", mb_opts_device}},
     NULL},
    {"chat", "chat --model DIR [--lora ADAPTER_DIR] [options]",
     "A conversation in the card's format, kept in the KV cache: type a question, the answer streams; /reset starts "
     "over, /quit or Ctrl-D leaves, Ctrl-C stops an answer (the conversation goes on). From a pipe: one output line "
     "per input line, no prompt: the answer with \\\\, \\n, \\r for a backslash, newline and carriage return; an empty "
     "line or /reset gets an empty line. A conversation that would outgrow --max_context starts over (with a "
     "message).",
     {{"model", mb_opts_gen_model}, {"sampling (HF generate's names, the card's defaults)", mb_opts_sampling},
      {"4-bit loading (QLoRA, as bitsandbytes)", mb_opts_4bit}, {"device", mb_opts_device}},
     NULL},
};

/* The command called name, or NULL. */
MB_UNUSED static const MbCliCommand *cli_command(const char *name) {
    for (size_t i = 0; i < sizeof mb_cli_commands / sizeof *mb_cli_commands; i++)
        if (!strcmp(mb_cli_commands[i].name, name)) return &mb_cli_commands[i];
    return NULL;
}

/* Option name of command c, or NULL when c does not take it. */
MB_UNUSED static const MbOpt *cli_option(const MbCliCommand *c, const char *name) {
    for (int s = 0; c && s < MB_CLI_SECTIONS && c->sections[s].opts; s++)
        for (const MbOpt *o = c->sections[s].opts; o->name; o++)
            if (!strcmp(o->name, name)) return o;
    return NULL;
}

/* 1 when command c reads a --config FILE.yaml of settings (dpo, sft, eval; init's --config is a config.json). */
MB_UNUSED static int cli_reads_yaml(const MbCliCommand *c) {
    const MbOpt *o = cli_option(c, "config");
    return o && o->value && !strcmp(o->value, "FILE.yaml");
}

/* The option a --config key sets (the card's names renamed). */
MB_UNUSED static const char *cli_config_option(const char *key) {
    for (size_t k = 0; k < sizeof mb_cli_config_renames / sizeof *mb_cli_config_renames; k++)
        if (!strcmp(key, mb_cli_config_renames[k][0])) return mb_cli_config_renames[k][1];
    return key;
}

#ifndef MEDBOT_NO_MAIN

typedef struct {
    int argc;
    char **argv;
    char *used;        /* (argc) which argv entries a command consumed */
    const char *cmd;
    const MbCliCommand *def; /* cmd's table: the options it may read */
    const char *undeclared;  /* the first option read that is not in it (args_done fails) */
    /* settings from a --config file: consulted after the command line */
    MbKv *cfg;         /* (n_cfg) as the file has them */
    size_t n_cfg;
    const char **cfg_opt; /* (n_cfg) the option each sets (the card's names renamed) */
    char *cfg_used;    /* (n_cfg) 1: read; 2: a setting of def->config_of that this command ignores */
    const char *cfg_path;
} MbArgs;

/* Options are read by name from the command's table only: any other name is a bug of medbot's (its
 * help would not show the option), refused here rather than passed over. */
static MbStatus arg_check(MbArgs *a, const char *name) {
    if (cli_option(a->def, name)) return MB_OK;
    if (!a->undeclared) a->undeclared = name;
    return mb_fail(MB_ERR_ARG, "internal: option --%s is not in medbot %s's table", name, a->cmd);
}

/* What a reader returns when the option is absent: MB_OK, or the failure of an undeclared read. */
static MbStatus arg_absent(MbArgs *a) { return a->undeclared ? arg_check(a, a->undeclared) : MB_OK; }

/* s as option name: "=VALUE" for --name=VALUE, "" for --name alone, NULL for anything else. */
static const char *arg_match(const char *s, const char *name) {
    size_t n = strlen(name);
    if (s[0] != '-' || s[1] != '-' || strncmp(s + 2, name, n) || (s[2 + n] && s[2 + n] != '=')) return NULL;
    return s + 2 + n;
}

/* The value of --name (the last one when given twice, as argparse), else of the config file's
 * setting for it, or NULL. *from: the config entry it came from, or -1 (the command line). */
static const char *arg_find(MbArgs *a, const char *name, ptrdiff_t *from) {
    const char *found = NULL;
    if (from) *from = -1;
    if (arg_check(a, name)) return NULL;
    for (int i = 2; i < a->argc; i++) {
        const char *v = arg_match(a->argv[i], name);
        if (v && v[0]) {
            a->used[i] = 1;
            found = v + 1;
        } else if (v) {
            a->used[i] = 1;
            found = "";
            if (i + 1 < a->argc && strncmp(a->argv[i + 1], "--", 2)) {
                a->used[i + 1] = 1;
                found = a->argv[i + 1];
            }
        }
    }
    for (size_t i = 0; i < a->n_cfg; i++)
        if (!strcmp(a->cfg_opt[i], name)) {
            a->cfg_used[i] = 1; /* known, even when the command line wins */
            if (!found && from) *from = (ptrdiff_t)i;
            if (!found) found = a->cfg[i].value;
        }
    return found;
}

static const char *arg_get(MbArgs *a, const char *name) { return arg_find(a, name, NULL); }

/* Fails with a message about option name that starts where its value came from:
 * "dpo: --name ..." or "FILE:LINE: key ..." (the config file's line). */
static MbStatus arg_fail(MbArgs *a, const char *name, const char *fmt, ...) MB_PRINTF(3, 4);
static MbStatus arg_fail(MbArgs *a, const char *name, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    ptrdiff_t from;
    arg_find(a, name, &from);
    if (from >= 0) return mb_fail(MB_ERR_ARG, "%s:%d: %s %s", a->cfg_path, a->cfg[from].line, a->cfg[from].key, msg);
    return mb_fail(MB_ERR_ARG, "%s: --%s %s", a->cmd, name, msg);
}

static int is_bool_word(const char *v, int *out) {
    const char *t[] = {"true", "True", "TRUE", "1", "yes"}, *f[] = {"false", "False", "FALSE", "0", "no"};
    for (int i = 0; i < 5; i++) {
        if (!strcmp(v, t[i])) return *out = 1, 1;
        if (!strcmp(v, f[i])) return *out = 0, 1;
    }
    return 0;
}

/* --name alone means true; --name true|false (or =value) sets it; a following word that is not
 * a boolean is left for the positional arguments. */
static MbStatus arg_bool(MbArgs *a, const char *name, int *out) {
    int found = 0;
    MbStatus rc = arg_check(a, name);
    if (rc) return rc;
    for (int i = 2; i < a->argc; i++) { /* the last one wins */
        const char *v = arg_match(a->argv[i], name);
        if (!v) continue;
        a->used[i] = 1;
        found = 1;
        if (v[0]) {
            if (!is_bool_word(v + 1, out))
                return mb_fail(MB_ERR_ARG, "%s: --%s needs true or false, got '%s'", a->cmd, name, v + 1);
        } else if (i + 1 < a->argc && is_bool_word(a->argv[i + 1], out)) {
            a->used[i + 1] = 1;
        } else {
            *out = 1;
        }
    }
    for (size_t i = 0; i < a->n_cfg; i++)
        if (!strcmp(a->cfg_opt[i], name)) {
            a->cfg_used[i] = 1;
            if (found) continue;
            if (!is_bool_word(a->cfg[i].value, out))
                return mb_fail(MB_ERR_ARG, "%s:%d: %s needs true or false, got '%s'", a->cfg_path, a->cfg[i].line,
                               a->cfg[i].key, a->cfg[i].value);
            return MB_OK;
        }
    return MB_OK;
}

static MbStatus arg_int(MbArgs *a, const char *name, int *out) {
    const char *v = arg_get(a, name);
    if (!v) return arg_absent(a);
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (!v[0] || *end) return arg_fail(a, name, "needs an integer, got '%s'", v);
    if (errno || x < INT_MIN || x > INT_MAX) return arg_fail(a, name, "is out of range, got %s", v);
    *out = (int)x;
    return MB_OK;
}

/* 1 when s is a decimal number as Python's float() reads one, without nan and inf (and without
 * the hex floats that strtod also takes): [+-] digits [. digits] [e [+-] digits]. */
static int is_decimal(const char *s) {
    int digits = 0;
    if (*s == '+' || *s == '-') s++;
    for (; *s >= '0' && *s <= '9'; s++) digits++;
    if (*s == '.')
        for (s++; *s >= '0' && *s <= '9'; s++) digits++;
    if (!digits) return 0;
    if (*s == 'e' || *s == 'E') {
        if (*++s == '+' || *s == '-') s++;
        if (*s < '0' || *s > '9') return 0;
        while (*s >= '0' && *s <= '9') s++;
    }
    return *s == 0;
}

static MbStatus arg_double(MbArgs *a, const char *name, double *out) {
    const char *v = arg_get(a, name);
    if (!v) return arg_absent(a);
    if (!is_decimal(v)) return arg_fail(a, name, "needs a finite decimal number, got '%s'", v);
    double x = strtod(v, NULL);
    if (!isfinite(x)) return arg_fail(a, name, "is out of range, got %s", v);
    *out = x;
    return MB_OK;
}

/* arg_int / arg_double, then the value must lie in [lo, hi] (see range_why; hi INFINITY: none). */
static MbStatus arg_int_in(MbArgs *a, const char *name, int *out, double lo, double hi) {
    char why[160];
    MbStatus rc = arg_int(a, name, out);
    if (!rc && arg_get(a, name) && range_why(*out, 1, lo, hi, 0, why, sizeof why)) rc = arg_fail(a, name, "%s", why);
    return rc;
}

static MbStatus arg_double_in(MbArgs *a, const char *name, double *out, double lo, double hi, int open) {
    char why[160];
    MbStatus rc = arg_double(a, name, out);
    if (!rc && arg_get(a, name) && range_why(*out, 0, lo, hi, open, why, sizeof why)) rc = arg_fail(a, name, "%s", why);
    return rc;
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
    if (a->undeclared) return arg_check(a, a->undeclared);
    for (int i = 2; i < a->argc; i++)
        if (!a->used[i])
            return mb_fail(MB_ERR_ARG, "%s: unknown option or extra argument '%s' --> see medbot %s --help",
                           a->cmd, a->argv[i], a->cmd);
    for (size_t i = 0; i < a->n_cfg; i++)
        if (!a->cfg_used[i])
            return mb_fail(MB_ERR_ARG, "%s:%d: unknown setting '%s' for medbot %s", a->cfg_path, a->cfg[i].line,
                           a->cfg[i].key, a->cmd);
    return MB_OK;
}

static void args_free(MbArgs *a) {
    mb_kv_free(a->cfg, a->n_cfg);
    free(a->cfg_opt);
    free(a->cfg_used);
    free(a->used);
}

/* A --config file (mb_kv_read: the card's `key: value  # comment` block as written, or a TRL /
 * PEFT YAML) as options. Keys the card uses for an option with another name are renamed; two
 * keys for one option are refused, and so is a key that names no option of the command (nor, for
 * sft and eval, of dpo: those are ignored). */
static MbStatus args_read_config(MbArgs *a, const char *path) {
    MbStatus rc = mb_kv_read(path, &a->cfg, &a->n_cfg);
    if (rc) return rc;
    a->cfg_path = path;
    a->cfg_opt = mb_calloc(a->n_cfg + 1, sizeof *a->cfg_opt);
    a->cfg_used = mb_calloc(a->n_cfg + 1, 1);
    if (!a->cfg_opt || !a->cfg_used) return MB_ERR_OOM; /* (args_free frees them) */
    for (size_t i = 0; i < a->n_cfg; i++) {
        a->cfg_opt[i] = cli_config_option(a->cfg[i].key);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(a->cfg_opt[i], a->cfg_opt[j]))
                return mb_fail(MB_ERR_ARG, "%s:%d: '%s' sets %s, as '%s' of line %d does", path, a->cfg[i].line,
                               a->cfg[i].key, a->cfg_opt[i], a->cfg[j].key, a->cfg[j].line);
        if (cli_option(a->def, a->cfg_opt[i])) continue;
        if (a->def->config_of && cli_option(cli_command(a->def->config_of), a->cfg_opt[i])) a->cfg_used[i] = 2;
        else
            return mb_fail(MB_ERR_ARG, "%s:%d: unknown setting '%s' for medbot %s", path, a->cfg[i].line, a->cfg[i].key,
                           a->cmd);
    }
    return MB_OK;
}

static void print_count(const char *what, size_t n, size_t total) {
    printf("  %-22s %14zu  %5.1f%%\n", what, n, total ? 100.0 * (double)n / (double)total : 0.0);
}

static int cmd_info_plan(MbArgs *a, const char *dir) {
    MbStatus rc;
    MbPlanOptions o = {.lora_r = 64, .lora_alpha = 8.0, .batch = 4, .max_length = 512, .gpus = 1,
                       .targets = (1u << MB_W_Q_PROJ) | (1u << MB_W_K_PROJ)}; /* the card's, but flags off */
    const char *targets = arg_get(a, "lora_target_modules");
    if ((rc = arg_bool(a, "load_in_4bit", &o.load_in_4bit)) ||
        (rc = arg_bool(a, "gradient_checkpointing", &o.gradient_checkpointing)) ||
        (rc = arg_int_in(a, "lora_r", &o.lora_r, 1, INFINITY)) ||
        (rc = arg_double_in(a, "lora_alpha", &o.lora_alpha, 0, INFINITY, MB_LO_OPEN)) ||
        (rc = arg_int_in(a, "per_device_train_batch_size", &o.batch, 1, INFINITY)) ||
        (rc = arg_int_in(a, "max_length", &o.max_length, 1, INFINITY)) || (rc = arg_int_in(a, "gpus", &o.gpus, 1, INFINITY)) ||
        (rc = arg_int(a, "zero_stage", &o.zero_stage)) || (rc = args_done(a)))
        return rc;
    if (o.zero_stage < 0 || o.zero_stage > 2)
        return mb_fail(MB_ERR_ARG, "info: --zero_stage must be 0, 1 or 2 (stage 3 is not planned: medbot "
                       "shards optimizer state, ZeRO-1), got %d", o.zero_stage);
    if (targets && (rc = lora_parse_targets(targets, &o.targets))) /* the list dpo reads */
        return mb_fail_at(rc, "info");
    /* config.json alone is enough: a folder without weights, or the file itself */
    char *cfg_path = mb_is_dir(dir) ? mb_path_join(dir, "config.json") : mb_strdup(dir);
    MbConfig c;
    rc = cfg_path ? mb_config_load(cfg_path, &c) : MB_ERR_OOM;
    if (rc) {
        free(cfg_path);
        return rc;
    }
    MbPlan p;
    if ((rc = mb_plan_compute(&c, &o, &p))) {
        free(cfg_path);
        return rc;
    }
    printf("memory plan per device: %s (L=%d C=%d H=%d K=%d D=%d F=%d V=%d)\n", cfg_path, c.num_hidden_layers,
           c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
           c.vocab_size);
    free(cfg_path);
    printf("  base %s; LoRA r=%d alpha=%g (scale %g) on", o.load_in_4bit ? "NF4 (blocksize 64, double quant)" : "bf16",
           o.lora_r, o.lora_alpha, o.lora_alpha / o.lora_r);
    for (int i = 0, first = 1; i < MB_LAYER_WEIGHTS; i++)
        if ((o.targets >> i) & 1u)
            printf("%s%s", first ? " " : ",", lora_module_name(i)), first = 0;
    printf("\n  DPO step: %d pairs = %d sequences x %d tokens, gradient checkpointing %s; %d GPU%s, ZeRO stage %d\n",
           o.batch, 2 * o.batch, o.max_length, o.gradient_checkpointing ? "on" : "off", o.gpus, o.gpus > 1 ? "s" : "",
           o.zero_stage);
    printf("  %-18s %14s %10s  %s\n", "kind", "bytes", "MiB", "how");
    size_t total = 0;
    for (int k = 0; k < MB_PLAN_ROWS; k++) {
        total += p.bytes[k];
        printf("  %-18s %14zu %10.1f  %s\n", p.kind[k], p.bytes[k], (double)p.bytes[k] / 1048576.0, p.how[k]);
    }
    printf("  %-18s %14zu %10.1f  (%.2f GiB)\n", "total", total, (double)total / 1048576.0,
           (double)total / 1073741824.0);
    printf("trainable parameters: %zu\n", p.trainable);
    printf("planned peak per GPU: %.2f GiB (medbot's buffers on the CUDA backend)\n", (double)total / 1073741824.0);
    printf("assumptions: bf16 activations, fp32 trainable state, fp64 step gradient sums; logits through a fused lm_head + "
           "log-softmax in chunks (the batch's full fp32 logits would be %.1f MiB); not counted: the CUDA context, "
           "kernels and cuBLASLt's handle (about 0.5 GiB, measured as the difference to `peak GPU memory`)\n",
           (double)p.full_logits / 1048576.0);
    return 0;
}

/* Bytes of the 4-bit weights of m: packed codes, absmax (codes and scales, or fp32). */
static void info_nf4(const MbModel *m) {
    size_t count = 0, values = 0, packed = 0, absmax = 0;
    int nested = 0;
    MbDtype compute = MB_DT_F32;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            const MbWeight *w = &m->layers[l].w[i];
            const MbNf4 *q = weight_nf4(w);
            if (!q) continue;
            count++, values += w->rows * w->cols, packed += w->rows * w->cols / 2;
            if (q->absmax_q) absmax += q->nblocks + 4 * plan_ceil(q->nblocks, q->nested_blocksize) + 4, nested = 1;
            else absmax += 4 * q->nblocks;
            compute = q->compute;
        }
    if (!count) return;
    printf("4-bit weights: NF4 (bitsandbytes)%s, compute dtype %s\n", nested ? ", double quant" : "",
           compute_dtype_name(compute));
    printf("  %-22s %14zu\n", "linear weights", count);
    printf("  %-22s %14zu\n", "values", values);
    printf("  %-22s %14zu bytes (%.3f B/value)\n", "packed codes", packed, (double)packed / (double)values);
    printf("  %-22s %14zu bytes (%.4f B/value)\n", "absmax", absmax, (double)absmax / (double)values);
}

static int cmd_info(MbArgs *a) {
    MbStatus rc;
    int plan = 0;
    static MbProgressLines loading = {NULL, 1.0, 0}; /* stderr: stdout holds the report */
    loading.out = stderr;
    MbLoadOptions opt = {.threads = 1, .device = MB_DEVICE_CPU, .progress = {mb_progress_print, &loading}}; /* reads the files only */
    if ((rc = arg_int_in(a, "threads", &opt.threads, 0, INFINITY)) || (rc = arg_bool(a, "plan", &plan))) goto fail;
    const char *dir = arg_positional(a);
    if (!dir) {
        rc = mb_fail(MB_ERR_ARG, "info: which model? --> medbot info MODEL_DIR");
        goto fail;
    }
    if (plan) {
        if ((rc = cmd_info_plan(a, dir))) goto fail;
        return 0;
    }
    opt.bnb_4bit_compute_dtype = arg_get(a, "bnb_4bit_compute_dtype");
    if ((rc = arg_bool(a, "load_in_4bit", &opt.load_in_4bit)) || (rc = args_done(a))) goto fail;
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
    info_nf4(m);
    mb_model_free(m);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    return 1;
}

static volatile sig_atomic_t mb_cli_stop;
static void on_chat_interrupt(int sig);
static void catch_signals(void (*fn)(int), int sigterm, int restart);

static int cmd_init(MbArgs *a) {
    MbStatus rc;
    int seed = 0;
    double std = 0.02;
    size_t shard = 0;
    const char *cfg = arg_get(a, "config"), *out = arg_get(a, "output"), *dts = arg_get(a, "dtype");
    const char *shard_s = arg_get(a, "max_shard_size");
    if ((shard_s && (rc = parse_size("init: --max_shard_size", shard_s, &shard))) ||
        (rc = arg_int_in(a, "seed", &seed, 0, INFINITY)) ||
        (rc = arg_double_in(a, "std", &std, 0, INFINITY, MB_LO_OPEN)) || (rc = args_done(a)))
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
    MbInitOptions o = {.seed = (uint64_t)seed, .dtype = dt, .std = std, .max_shard_size = shard,
                       .interrupt = &mb_cli_stop, .progress = {mb_progress_print, NULL}};
    catch_signals(on_chat_interrupt, 1, 1); /* Ctrl-C: stop, leaving nothing */
    rc = mb_model_init_random(cfg, out, &o);
    signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL);
    if (rc == MB_INTERRUPTED) {
        fprintf(stderr, "medbot: %s\n", mb_last_error());
        return 128 + (int)mb_cli_stop;
    }
    if (rc) goto fail;
    char *index = mb_path_join(out, "model.safetensors.index.json");
    printf("wrote %s/%s (random init, seed %d, %s)\n", out, index && mb_is_file(index) ?
           "model.safetensors.index.json and its shards" : "model.safetensors", seed, mb_dtype_name(dt));
    free(index);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    return 1;
}

static MbStatus arg_choice(MbArgs *a, const char *name, const char *const *choices, int n, int *out) {
    const char *v = arg_get(a, name);
    if (!v) return arg_absent(a);
    for (int i = 0; i < n; i++)
        if (!strcmp(v, choices[i])) return *out = i, MB_OK;
    char list[256] = "";
    for (int i = 0; i < n; i++) snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "", choices[i]);
    return mb_fail(MB_ERR_ARG, "%s: --%s must be one of %s, got '%s'", a->cmd, name, list, v);
}

/* --device cpu|cuda -> MbDevice (absent: MB_DEVICE_AUTO) */
static MbStatus arg_device(MbArgs *a, int *out) {
    static const char *const names[] = {"cpu", "cuda"};
    int d = -1;
    MbStatus rc = arg_choice(a, "device", names, 2, &d);
    if (!rc && d >= 0) *out = d == 0 ? MB_DEVICE_CPU : MB_DEVICE_CUDA;
    return rc;
}

/* --bnb_4bit_compute_dtype: one of torch's names, as the library reads them (NULL when absent) */
static MbStatus arg_compute_dtype(MbArgs *a, const char **out) {
    const char *v = *out = arg_get(a, "bnb_4bit_compute_dtype");
    MbDtype d;
    if (!v) return arg_absent(a);
    if (v && (!compute_dtype_parse(v, &d) || strcmp(v, compute_dtype_name(d))))
        return mb_fail(MB_ERR_ARG, "%s: --bnb_4bit_compute_dtype must be float32, bfloat16 or float16, got '%s'", a->cmd,
                       v);
    return MB_OK;
}

static MbStatus arg_path(MbArgs *a, const char *name, const char **out) {
    const char *v = arg_get(a, name);
    if (!v) return arg_absent(a);
    if (!v[0]) return mb_fail(MB_ERR_ARG, "%s: --%s needs a path", a->cmd, name);
    *out = v;
    return MB_OK;
}

/* Ctrl-C: the first SIGINT (or SIGTERM) of a training run asks it to stop after a checkpoint,
 * and the next one ends the process at once; in chat each Ctrl-C stops the answer being written. */
static volatile sig_atomic_t mb_cli_stop;

static void on_stop_signal(int sig) {
    static const char msg[] = "\nmedbot: stopping: the step in progress is dropped, a checkpoint of the last finished "
                              "one is written (Ctrl-C again, a second later, stops at once)\n";
    static struct timespec first; /* (the handler's own: SIGINT and SIGTERM are masked while it runs) */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (!mb_cli_stop) {
        mb_cli_stop = sig;
        first = now;
        ssize_t k = write(STDERR_FILENO, msg, sizeof msg - 1);
        (void)k;
    } else if ((double)(now.tv_sec - first.tv_sec) + 1e-9 * (double)(now.tv_nsec - first.tv_nsec) >= 1.0) {
        /* a second signal stops at once; one within a second is the same request (torchrun's agent
         * passes the terminal's Ctrl-C on as SIGTERM to workers that got the SIGINT too) */
        signal(sig, SIG_DFL);
        raise(sig);
    }
}

static void on_chat_interrupt(int sig) { mb_cli_stop = sig; }

/* Installs fn for SIGINT (and SIGTERM with sigterm). restart: the calls a signal interrupts go
 * on (training, and chat while it answers: the loops read the flag); without, a read returns
 * (chat at its prompt). */
static void catch_signals(void (*fn)(int), int sigterm, int restart) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fn;
    sa.sa_flags = restart ? SA_RESTART : 0;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT), sigaddset(&sa.sa_mask, SIGTERM);
    sigaction(SIGINT, &sa, NULL);
    if (sigterm) sigaction(SIGTERM, &sa, NULL);
}

/* The demo that `medbot dpo` runs with no arguments: the tiny model in weights/ learns the
 * preferences of the bilingual sample pairs in weights/demo/. */
static const char *const mb_demo_args[] = {
    "--model", "weights/tiny", "--data",
    "weights/demo/pairs.jsonl", "--eval_split", "0.15", "--output", "demo-output", "--lora_r", "16", "--lora_alpha",
    "32", "--lora_target_modules", "all-linear", "--learning_rate", "2e-3", "--lr_scheduler_type", "cosine",
    "--warmup_ratio", "0.05", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
    "--gradient_accumulation_steps", "2", "--max_length", "256", "--max_prompt_length", "128",
    "--max_completion_length", "128", "--logging_steps", "5", "--eval_steps", "10", "--save_steps", "1000",
    "--gradient_checkpointing", "true", "--seed", "42", NULL};

/* The options of dpo and sft that eval does not take: data and evaluation, output, LoRA,
 * optimizer, batch, ranks and the card's other settings. */
static MbStatus train_args_training(MbArgs *a, MbTrainJob *job) {
    MbTrainConfig *c = &job->cfg;
    const char *targets = NULL, *bnb;
    int ignored_bool = 0, effective = 0;
    MbStatus rc;
    if ((rc = arg_path(a, "eval_data", &job->eval_data_path)) || (rc = arg_double(a, "eval_split", &c->eval_split)) ||
        (rc = arg_bool(a, "shuffle", &c->shuffle)) || (rc = arg_path(a, "output", &job->output_dir)) ||
        (rc = arg_path(a, "resume_from_checkpoint", &job->resume)) || (rc = arg_int(a, "nproc", &job->nproc)) ||
        (rc = arg_int(a, "zero_stage", &job->zero_stage)) || (rc = arg_double(a, "ddp_timeout", &job->ddp_timeout)) ||
        (rc = arg_choice(a, "lr_scheduler_type", mb_sched_names, 4, &c->lr_scheduler_type)) ||
        (rc = arg_double(a, "learning_rate", &c->learning_rate)) ||
        (rc = arg_double(a, "weight_decay", &c->weight_decay)) || (rc = arg_double(a, "adam_beta1", &c->adam_beta1)) ||
        (rc = arg_double(a, "adam_beta2", &c->adam_beta2)) || (rc = arg_double(a, "adam_epsilon", &c->adam_epsilon)) ||
        (rc = arg_double(a, "max_grad_norm", &c->max_grad_norm)) ||
        (rc = arg_double(a, "warmup_ratio", &c->warmup_ratio)) || (rc = arg_int(a, "warmup_steps", &c->warmup_steps)) ||
        (rc = arg_int(a, "per_device_train_batch_size", &c->per_device_train_batch_size)) ||
        (rc = arg_int(a, "gradient_accumulation_steps", &c->gradient_accumulation_steps)) ||
        (rc = arg_double(a, "num_train_epochs", &c->num_train_epochs)) || (rc = arg_int(a, "max_steps", &c->max_steps)) ||
        (rc = arg_int(a, "lora_r", &c->lora.r)) || (rc = arg_double(a, "lora_alpha", &c->lora.alpha)) ||
        (rc = arg_double(a, "lora_dropout", &c->lora.dropout)) || (rc = arg_bool(a, "use_rslora", &c->lora.use_rslora)) ||
        (rc = arg_path(a, "lora_target_modules", &targets)) ||
        (rc = arg_bool(a, "gradient_checkpointing", &c->gradient_checkpointing)) ||
        (rc = arg_int(a, "logging_steps", &c->logging_steps)) || (rc = arg_int(a, "save_steps", &c->save_steps)) ||
        (rc = arg_int(a, "eval_steps", &c->eval_steps)) ||
        /* the card's other settings: accepted, checked or noted (print_settings notes them) */
        (rc = arg_bool(a, "bf16", &ignored_bool)) || (rc = arg_int_in(a, "effective_batch_size", &effective, 1, INFINITY)) ||
        (rc = arg_bool(a, "bnb_4bit_use_double_quant", &ignored_bool)))
        return rc;
    (void)arg_get(a, "trainable_params");
    if ((bnb = arg_get(a, "bnb_4bit_quant_type")) && strcmp(bnb, "nf4"))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: bnb_4bit_quant_type '%s': medbot implements nf4", a->cmd, bnb);
    if ((bnb = arg_get(a, "bias")) && strcmp(bnb, "none"))
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: bias '%s': medbot trains LoRA with bias none", a->cmd, bnb);
    if ((rc = arg_absent(a)) || (targets && (rc = lora_parse_targets(targets, &c->lora.targets)))) return rc;
    if (job->nproc < 1) return arg_fail(a, "nproc", "must be >= 1, got %d", job->nproc);
    if (job->zero_stage > 1)
        return mb_fail(MB_ERR_UNSUPPORTED, "%s: --zero_stage %d: medbot implements ZeRO stages 0 and 1", a->cmd, job->zero_stage);
    return MB_OK;
}

/* Options of dpo, sft and eval, with TRL's names: each reads those of its table (eval: what
 * evaluating uses; sft: all but DPO's loss). */
static MbStatus train_args(MbArgs *a, MbTrainJob *job, int sft) {
    memset(job, 0, sizeof *job);
    int train = strcmp(a->cmd, "eval") != 0;
    job->sft = sft;
    job->nproc = 1, job->zero_stage = -1;
    MbTrainConfig *c = &job->cfg;
    mb_train_config_defaults(c);
    const char *cfg_file = arg_get(a, "config");
    MbStatus rc = arg_absent(a);
    if (rc || (cfg_file && (rc = args_read_config(a, cfg_file)))) return rc;
    if ((rc = arg_path(a, "model", &job->model_dir)) || (rc = arg_path(a, "tokenizer", &job->tokenizer_path)) ||
        (rc = arg_path(a, "lora", &job->lora_init)) || (rc = arg_bool(a, "random_init", &job->random_init)) ||
        (rc = arg_bool(a, "load_in_4bit", &job->load_in_4bit)) ||
        (rc = arg_compute_dtype(a, &job->bnb_4bit_compute_dtype)) || (rc = arg_device(a, &job->device)) ||
        (rc = arg_int(a, "gpu", &job->gpu)) || (rc = arg_int(a, "threads", &job->threads)) ||
        (rc = arg_path(a, "data", &job->data_path)) || (rc = arg_int(a, "max_length", &c->max_length)) ||
        (rc = arg_int(a, "max_prompt_length", &c->max_prompt_length)) ||
        (rc = arg_int(a, "max_completion_length", &c->max_completion_length)) ||
        (rc = arg_bool(a, "add_bos", &c->add_bos)) ||
        (rc = arg_int(a, "per_device_eval_batch_size", &c->per_device_eval_batch_size)) ||
        (rc = arg_int(a, "seed", &c->seed)))
        return rc;
    if ((!train || !sft) && ((rc = arg_choice(a, "loss_type", mb_loss_names, 4, &c->loss_type)) ||
                             (rc = arg_double(a, "beta", &c->beta)) ||
                             (rc = arg_double(a, "label_smoothing", &c->label_smoothing))))
        return rc;
    if (train && !sft && (rc = arg_bool(a, "precompute_ref_log_probs", &c->precompute_ref_log_probs))) return rc;
    if (train && (rc = train_args_training(a, job))) return rc;
    char why[160]; /* every number in its range, before anything is loaded or written */
    const char *bad = train_job_invalid(job, why, sizeof why);
    if (bad) return arg_fail(a, bad, "%s", why);
    if (!job->model_dir || !job->data_path)
        return mb_fail(MB_ERR_ARG, "%s: --model DIR and --data FILE are required (medbot %s --help)", a->cmd, a->cmd);
    return MB_OK;
}

/* ---- the settings a run starts with, one line a group, as TRL prints its config ---- */

/* The --config entry that gave option name its value, or -1 (the command line, or the default). */
static ptrdiff_t arg_config_entry(const MbArgs *a, const char *name) {
    for (int i = 2; i < a->argc; i++)
        if (arg_match(a->argv[i], name)) return -1;
    for (size_t i = 0; i < a->n_cfg; i++)
        if (a->cfg_used[i] == 1 && !strcmp(a->cfg_opt[i], name)) return (ptrdiff_t)i;
    return -1;
}

/* One line: "name=value, ..." and the --config keys that set them (stb_ds strings). */
typedef struct {
    const MbArgs *a;
    char *text, *keys;
} MbSettingsLine;

static void set_add(MbSettingsLine *l, const char *name, const char *fmt, ...) MB_PRINTF(3, 4);
static void set_add(MbSettingsLine *l, const char *name, const char *fmt, ...) {
    char v[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(v, sizeof v, fmt, ap);
    va_end(ap);
    sb_printf(&l->text, "%s%s=%s", arrlen(l->text) > 1 ? ", " : "", name, v);
    ptrdiff_t k = arg_config_entry(l->a, name);
    if (k >= 0) sb_printf(&l->keys, "%s%s", arrlen(l->keys) > 1 ? ", " : "", l->a->cfg[k].key);
}

static void set_bool(MbSettingsLine *l, const char *name, int v) { set_add(l, name, "%s", v ? "true" : "false"); }

/* Prints the line (to stdout) and empties it. */
static void set_print(MbSettingsLine *l, const char *group) {
    printf("  %-10s %s", group, l->text ? l->text : "");
    if (l->keys) printf("   (from %s: %s)", l->a->cfg_path, l->keys);
    printf("\n");
    arrfree(l->text), arrfree(l->keys);
    l->text = l->keys = NULL;
}

/* The model line: folder, tokenizer, weights, 4-bit loading, device. */
static void settings_model(MbSettingsLine *l, const MbTrainJob *job, int train) {
    set_add(l, "model", "%s", job->model_dir);
    if (!train) set_add(l, "lora", "%s", job->lora_init ? job->lora_init : "(none: the base model)");
    set_add(l, "tokenizer", "%s", job->tokenizer_path ? job->tokenizer_path : "(the model's)");
    if (job->random_init) set_add(l, "random_init", "true (no weights read: drawn from seed %d)", job->cfg.seed);
    set_bool(l, "load_in_4bit", job->load_in_4bit);
    if (job->load_in_4bit && cli_option(l->a->def, "bnb_4bit_quant_type"))
        set_add(l, "bnb_4bit_quant_type", "nf4"), set_bool(l, "bnb_4bit_use_double_quant", 1);
    if (job->load_in_4bit || job->bnb_4bit_compute_dtype) /* (or a checkpoint saved 4-bit) */
        set_add(l, "bnb_4bit_compute_dtype", "%s", job->bnb_4bit_compute_dtype ? job->bnb_4bit_compute_dtype
                                                                               : "(the checkpoint's, else float32)");
    set_add(l, "device", "%s", job->device == MB_DEVICE_CPU ? "cpu" : job->device == MB_DEVICE_CUDA ? "cuda" : "auto");
    if (job->device == MB_DEVICE_CUDA || job->gpu) set_add(l, "gpu", "%d", job->gpu);
    set_add(l, "threads", job->threads ? "%d" : "%d (all cores)", job->threads);
    set_print(l, "model");
}

/* Prints the settings of a dpo, sft or eval run (from train_args) before anything loads, and
 * flushes them: each line ends with the keys of the --config file that set its values. */
static void print_settings(MbArgs *a, const MbTrainJob *job) {
    const MbTrainConfig *c = &job->cfg;
    int train = strcmp(a->cmd, "eval") != 0;
    MbSettingsLine l = {a, NULL, NULL};
    printf("%s settings (TRL's names%s%s):\n", a->cmd, a->cfg_path ? "; the command line wins over " : "",
           a->cfg_path ? a->cfg_path : "");
    settings_model(&l, job, train);
    if (train) {
        if (job->lora_init) set_add(&l, "lora", "%s (r, lora_alpha, target_modules and use_rslora from it)", job->lora_init);
        else {
            set_add(&l, "lora_r", "%d", c->lora.r);
            set_add(&l, "lora_alpha", "%g (scale %g)", c->lora.alpha,
                    c->lora.use_rslora ? c->lora.alpha / sqrt((double)c->lora.r) : c->lora.alpha / c->lora.r);
            char targets[128] = "";
            for (int i = 0; i < MB_LAYER_WEIGHTS; i++)
                if ((c->lora.targets >> i) & 1u)
                    snprintf(targets + strlen(targets), sizeof targets - strlen(targets), "%s%s", targets[0] ? "," : "",
                             lora_module_name(i));
            set_add(&l, "lora_target_modules", "%s", targets);
            set_bool(&l, "use_rslora", c->lora.use_rslora);
        }
        set_add(&l, "lora_dropout", "%g", c->lora.dropout);
        set_add(&l, "bias", "none");
        set_print(&l, "lora");
    }
    if (job->sft) set_add(&l, "loss", "next-token cross-entropy of the chosen completions (sft)");
    else {
        set_add(&l, "loss_type", "%s", mb_loss_names[c->loss_type]);
        set_add(&l, "beta", "%g", c->beta);
        set_add(&l, "label_smoothing", "%g", c->label_smoothing);
        if (train) set_bool(&l, "precompute_ref_log_probs", c->precompute_ref_log_probs);
    }
    set_print(&l, job->sft ? "loss" : "dpo");
    if (train) {
        set_add(&l, "learning_rate", "%g", c->learning_rate);
        set_add(&l, "lr_scheduler_type", "%s", mb_sched_names[c->lr_scheduler_type]);
        if (c->warmup_steps > 0) set_add(&l, "warmup_steps", "%d", c->warmup_steps);
        else set_add(&l, "warmup_ratio", "%g", c->warmup_ratio);
        set_add(&l, "weight_decay", "%g", c->weight_decay);
        set_add(&l, "adam_beta1", "%g", c->adam_beta1), set_add(&l, "adam_beta2", "%g", c->adam_beta2);
        set_add(&l, "adam_epsilon", "%g", c->adam_epsilon), set_add(&l, "max_grad_norm", "%g", c->max_grad_norm);
        set_add(&l, "num_train_epochs", "%g", c->num_train_epochs);
        if (c->max_steps > 0) set_add(&l, "max_steps", "%d (overrides num_train_epochs)", c->max_steps);
        set_print(&l, "optimizer");
        set_add(&l, "per_device_train_batch_size", "%d", c->per_device_train_batch_size);
        set_add(&l, "gradient_accumulation_steps", "%d", c->gradient_accumulation_steps);
    }
    set_add(&l, "per_device_eval_batch_size", "%d", c->per_device_eval_batch_size);
    set_add(&l, "max_length", "%d", c->max_length), set_add(&l, "max_prompt_length", "%d", c->max_prompt_length);
    set_add(&l, "max_completion_length", "%d", c->max_completion_length);
    set_bool(&l, "add_bos", c->add_bos);
    if (train) set_bool(&l, "gradient_checkpointing", c->gradient_checkpointing);
    const char *bf16 = train ? arg_get(a, "bf16") : NULL, *effective = train ? arg_get(a, "effective_batch_size") : NULL;
    if (bf16) set_add(&l, "bf16", "%s (noted)", bf16);
    if (effective) set_add(&l, "effective_batch_size", "%s (noted)", effective);
    set_print(&l, "batch");
    set_add(&l, "data", "%s", job->data_path);
    if (job->eval_data_path) set_add(&l, "eval_data", "%s", job->eval_data_path);
    else if (train) set_add(&l, "eval_split", "%g", c->eval_split);
    if (train) {
        set_bool(&l, "shuffle", c->shuffle);
        set_add(&l, "output", "%s", job->output_dir ? job->output_dir : "(none)");
        if (job->resume) set_add(&l, "resume_from_checkpoint", "%s", job->resume);
        set_add(&l, "logging_steps", "%d", c->logging_steps), set_add(&l, "eval_steps", "%d", c->eval_steps);
        set_add(&l, "save_steps", "%d", c->save_steps);
    }
    set_add(&l, "seed", "%d", c->seed);
    if (train) set_add(&l, "nproc", "%d", job->nproc);
    if (train && job->nproc > 1) set_add(&l, "zero_stage", "%d", job->zero_stage < 0 ? 1 : job->zero_stage);
    set_print(&l, "run");
    char *ignored = NULL;
    for (size_t i = 0; i < a->n_cfg; i++)
        if (a->cfg_used[i] == 2) sb_printf(&ignored, "%s%s", ignored ? ", " : "", a->cfg[i].key);
    if (ignored) printf("  %-10s %s (settings of dpo that %s does not take)\n", "ignored", ignored, a->cmd);
    arrfree(ignored);
    int eff = effective ? atoi(effective) : 0;
    if (eff && eff != c->per_device_train_batch_size * c->gradient_accumulation_steps)
        printf("note: effective_batch_size %d is per_device_train_batch_size x gradient_accumulation_steps x GPUs; "
               "this run uses one process: %d pairs per step\n", eff,
               c->per_device_train_batch_size * c->gradient_accumulation_steps);
    fflush(stdout);
}

/* s as one shell word: as it is when plain, else in single quotes ('\'' for a quote), cut to
 * fit n (>= 8) bytes */
static void shell_word(char *out, size_t n, const char *s) {
    int plain = s[0] != 0;
    for (const char *c = s; *c; c++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./=:,@%+-", *c)) plain = 0;
    if (plain) {
        snprintf(out, n, "%s", s);
        return;
    }
    size_t at = 0;
    out[at++] = '\'';
    for (const char *c = s; *c && at + 6 < n; c++) {
        if (*c == '\'') memcpy(out + at, "'\\''", 4), at += 4;
        else out[at++] = *c;
    }
    out[at++] = '\'';
    out[at] = 0;
}

/* Prints the command line that resumes this run: the same arguments with
 * --resume_from_checkpoint latest (and without --overwrite_output_dir), quoted for a shell. */
static void print_resume_command(const MbArgs *a) {
    fprintf(stderr, "medbot: to resume:");
    for (int i = 0; i < a->argc; i++) {
        const char *s = a->argv[i], *resume = i >= 2 ? arg_match(s, "resume_from_checkpoint") : NULL;
        const char *overwrite = i >= 2 ? arg_match(s, "overwrite_output_dir") : NULL;
        int skip_value = 0;
        if (resume || overwrite) { /* and the value after a bare one, as arg_get and arg_bool read it */
            const char *next = i + 1 < a->argc ? a->argv[i + 1] : NULL;
            if (next && resume && !resume[0] && strncmp(next, "--", 2)) i++;
            if (next && overwrite && !overwrite[0] && is_bool_word(next, &skip_value)) i++;
            continue;
        }
        size_t cap = 4 * strlen(s) + 8; /* every character a quote: 4 bytes each, and the quotes */
        char *word = mb_malloc(cap);
        if (word) shell_word(word, cap, s);
        fprintf(stderr, " %s", word ? word : s);
        free(word);
    }
    fprintf(stderr, " --resume_from_checkpoint latest\n");
}

/* The folder the demo's files are read from: "" when ./weights/tiny is here, else the folder of
 * the executable (argv0 with a slash in it, or /proc/self/exe), which must hold them. */
static MbStatus demo_root(const char *argv0, char **out) {
    *out = NULL;
    if (mb_is_file("weights/tiny/config.json") && mb_is_file("weights/demo/pairs.jsonl")) return (*out = mb_strdup("")) ? MB_OK : MB_ERR_OOM;
    char exe[4096] = "";
    ssize_t n = -1;
#if defined(__linux__)
    n = readlink("/proc/self/exe", exe, sizeof exe - 1);
#endif
    if (n > 0) exe[n] = 0;
    else if (strchr(argv0, '/')) snprintf(exe, sizeof exe, "%s", argv0);
    char *dir = exe[0] ? mb_path_dirname(exe) : NULL, *cfg = dir ? mb_path_join(dir, "weights/tiny/config.json") : NULL;
    char *pairs = dir ? mb_path_join(dir, "weights/demo/pairs.jsonl") : NULL;
    int found = cfg && pairs && mb_is_file(cfg) && mb_is_file(pairs);
    free(cfg), free(pairs);
    if (found) return *out = dir, MB_OK;
    MbStatus rc = mb_fail(MB_ERR_IO, "dpo (the demo): weights/tiny and weights/demo are not in this folder%s%s --> "
                          "run it from medbot's folder: cd %s && ./medbot dpo", dir ? " nor in " : "", dir ? dir : "",
                          dir ? dir : "/path/to/medbot");
    free(dir);
    return rc;
}

/* The demo's last lines: what to do with the adapter it trained, as commands to paste. */
static void demo_next_steps(const char *argv0, const char *root, double t0) {
    char exe[1024], tiny[1024], pairs[1024], path[1024];
    shell_word(exe, sizeof exe, argv0);
    snprintf(path, sizeof path, "%s%sweights/tiny", root, root[0] ? "/" : "");
    shell_word(tiny, sizeof tiny, path);
    snprintf(path, sizeof path, "%s%sweights/demo/pairs.jsonl", root, root[0] ? "/" : "");
    shell_word(pairs, sizeof pairs, path);
    mb_say("demo done in %.1f s. Next, with the adapter in demo-output:\n", mb_now() - t0);
    mb_say("  talk to it:   %s chat --model %s --lora demo-output\n", exe, tiny);
    mb_say("  measure it:   %s eval --model %s --lora demo-output --data %s\n", exe, tiny, pairs);
    mb_say("  merge it:     %s merge --model %s --lora demo-output --output demo-merged\n", exe, tiny);
    mb_say("  the chart:    demo-output/training.svg (open it in a browser)\n");
}

static int cmd_train(MbArgs *a, int sft) {
    double t0 = mb_now();
    MbArgs demo;
    /* `medbot dpo` alone: the bundled demo, which replaces demo-output each time; it takes the
     * options that do not change what it writes where (--resume_from_checkpoint latest resumes it) */
    static const char *const demo_extras[] = {"resume_from_checkpoint", "threads", "device", "gpu"};
    int is_demo = !sft;
    for (int i = 2; i < a->argc && is_demo; i++) {
        int known = 0;
        for (size_t k = 0; k < sizeof demo_extras / sizeof *demo_extras; k++) {
            const char *v = arg_match(a->argv[i], demo_extras[k]);
            if (v) known = 1, i += !v[0] && i + 1 < a->argc; /* (and its value) */
        }
        is_demo = known;
    }
    char *root = NULL, **owned = NULL; /* the demo: the folder that holds weights/, the paths made from it */
    if (is_demo) {
        memset(&demo, 0, sizeof demo);
        MbStatus drc = demo_root(a->argv[0], &root);
        int n = 0;
        while (mb_demo_args[n]) n++;
        int total = n + a->argc + 1;
        char **argv = drc ? NULL : mb_calloc((size_t)total + 1, sizeof *argv);
        char *used = argv ? mb_calloc((size_t)total, 1) : NULL;
        owned = used ? mb_calloc((size_t)n, sizeof *owned) : NULL;
        if (!owned) {
            free(argv), free(used), free(root);
            fprintf(stderr, "medbot: %s\n", mb_last_error());
            return 1;
        }
        argv[0] = a->argv[0], argv[1] = a->argv[1];
        for (int i = 0; i < n; i++) {
            argv[i + 2] = (char *)mb_demo_args[i];
            if (root[0] && !strncmp(mb_demo_args[i], "weights/", 8) && (owned[i] = mb_path_join(root, mb_demo_args[i])))
                argv[i + 2] = owned[i];
        }
        argv[n + 2] = "--overwrite_output_dir";
        for (int i = 2; i < a->argc; i++) argv[n + 1 + i] = a->argv[i];
        demo.argc = total, demo.argv = argv, demo.used = used, demo.cmd = a->cmd, demo.def = a->def;
        demo.used[n + 2] = 1;
        const char *sep = root[0] ? "/" : "";
        mb_say("medbot dpo demo: the tiny Llama in %s%sweights/tiny learns the bilingual preference pairs of "
               "%s%sweights/demo/pairs.jsonl (%s)\n", root, sep, root, sep, "a held-out 15% measures it");
    }
    MbArgs *args = is_demo ? &demo : a;
    MbTrainJob job;
    MbLaunchEnv env;
    int overwrite = is_demo;
    MbStatus rc = train_args(args, &job, sft);
    job.progress.fn = mb_progress_print; /* a bar on a terminal, a line per phase in a file */
    if (!rc) rc = arg_bool(args, "overwrite_output_dir", &overwrite);
    if (!rc) rc = args_done(args);
    if (!rc && !job.output_dir) rc = mb_fail(MB_ERR_ARG, "%s: --output DIR is required", a->cmd);
    if (!rc) rc = mb_launch_env(&env);
    if (!rc && env.world > 1) { /* a launcher started this process as one rank of several: one GPU each */
        job.world_size = env.world, job.rank = env.rank, job.master_port = env.port, job.master_addr = env.addr;
        job.gpu = env.local_rank;
        if (env.rank == 0)
            printf("data parallel: %d ranks from %s, rendezvous on %s:%d\n", env.world, env.source, env.addr, env.port);
        fflush(stdout);
    }
    if (!rc && (env.world <= 1 || env.rank == 0)) print_settings(args, &job);
    job.overwrite_output_dir = overwrite;
    job.interrupt = &mb_cli_stop;
    catch_signals(on_stop_signal, 1, 1);
    if (!rc) rc = mb_train(&job);
    signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL);
    fflush(stdout);
    if (rc) fprintf(stderr, "medbot: %s\n", mb_last_error());
    if (rc == MB_INTERRUPTED && strstr(mb_last_error(), "checkpoint-")) print_resume_command(a);
    if (is_demo && !rc) demo_next_steps(a->argv[0], root, t0);
    if (is_demo) {
        for (int i = 0; mb_demo_args[i]; i++) free(owned[i]);
        free(owned), free(root);
        free(demo.argv);
        free(demo.used);
    }
    if (rc == MB_INTERRUPTED) return 128 + (mb_cli_stop ? (int)mb_cli_stop : SIGINT);
    return rc ? 1 : 0;
}

static int cmd_dpo(MbArgs *a) { return cmd_train(a, 0); }
static int cmd_sft(MbArgs *a) { return cmd_train(a, 1); }

static int cmd_eval(MbArgs *a) {
    MbTrainJob job;
    int sft = 0;
    MbStatus rc = arg_bool(a, "sft", &sft);
    if (!rc) rc = train_args(a, &job, sft);
    job.progress.fn = mb_progress_print;
    if (!rc) rc = args_done(a);
    if (!rc) print_settings(a, &job);
    if (!rc) rc = mb_evaluate(&job);
    if (rc) {
        fprintf(stderr, "medbot: %s\n", mb_last_error());
        return 1;
    }
    return 0;
}

static int cmd_merge(MbArgs *a) {
    const char *model = NULL, *lora = NULL, *out = NULL, *tok = NULL;
    int threads = 0;
    MbStatus rc;
    if ((rc = arg_path(a, "model", &model)) || (rc = arg_path(a, "lora", &lora)) || (rc = arg_path(a, "output", &out)) ||
        (rc = arg_path(a, "tokenizer", &tok)) || (rc = arg_int_in(a, "threads", &threads, 0, INFINITY)) ||
        (rc = args_done(a)))
        goto fail;
    if (!model || !lora || !out) {
        rc = mb_fail(MB_ERR_ARG, "merge: --model DIR --lora ADAPTER_DIR --output DIR are required");
        goto fail;
    }
    MbProgress progress = {mb_progress_print, NULL};
    if ((rc = mb_merge(model, lora, tok, out, threads, &progress))) goto fail;
    printf("merged %s into %s: %s/model.safetensors (bf16), config.json, tokenizer\n", lora, model, out);
    return 0;
fail:
    fprintf(stderr, "medbot: %s\n", mb_last_error());
    return 1;
}

static int cmd_encode(MbArgs *a) {
    MbStatus rc;
    int add_bos = 0;
    const char *path = arg_get(a, "tokenizer");
    char *text = NULL;
    int32_t *ids = NULL;
    size_t n = 0, len = 0;
    MbTokenizer *tok = NULL;
    if ((rc = arg_bool(a, "add_bos", &add_bos)) || (rc = args_done(a))) goto fail;
    if (!path || !path[0]) {
        rc = mb_fail(MB_ERR_ARG, "encode: --tokenizer PATH is required (tokenizer.json, tokenizer.model or a model folder)");
        goto fail;
    }
    if ((rc = mb_tokenizer_load(path, &tok)) || (rc = mb_read_all(stdin, "standard input", &text, &len)) ||
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
    if ((rc = arg_bool(a, "skip_special_tokens", &skip)) || (rc = args_done(a))) goto fail;
    if (!path || !path[0]) {
        rc = mb_fail(MB_ERR_ARG, "decode: --tokenizer PATH is required (tokenizer.json, tokenizer.model or a model folder)");
        goto fail;
    }
    if ((rc = mb_tokenizer_load(path, &tok)) || (rc = mb_read_all(stdin, "standard input", &in, &n_in))) goto fail;
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

/* ---- generate and chat ---- */

/* Options shared by generate and chat (HF GenerationConfig names) into the session's options. */
static MbStatus gen_args(MbArgs *a, MbChatOptions *o) {
    static MbProgressLines loading = {NULL, 1.0, 0}; /* stderr (set below): stdout holds the answers */
    memset(o, 0, sizeof *o);
    mb_generation_config_defaults(&o->gen);
    loading.out = stderr;
    o->load.progress.fn = mb_progress_print, o->load.progress.ctx = &loading;
    o->add_bos = -1; /* not given: tokenizer(prompt) as in the card's usage (tokenizer_config.json's add_bos_token) */
    o->name = a->cmd;
    int greedy = 0, do_sample = -1 /* not given */, seed = 0, seed_given = arg_get(a, "seed") != NULL, exact = 0;
    MbStatus rc;
    if ((rc = arg_path(a, "model", &o->model)) || (rc = arg_path(a, "tokenizer", &o->tokenizer)) ||
        (rc = arg_path(a, "lora", &o->lora)) || (rc = arg_int_in(a, "threads", &o->load.threads, 0, INFINITY)) ||
        (rc = arg_bool(a, "load_in_4bit", &o->load.load_in_4bit)) || (rc = arg_bool(a, "add_bos", &o->add_bos)) ||
        (rc = arg_int_in(a, "max_context", &o->max_context, 1, INFINITY)) || (rc = arg_device(a, &o->load.device)) ||
        (rc = arg_int_in(a, "gpu", &o->load.gpu, 0, INFINITY)) ||
        (rc = arg_int(a, "max_new_tokens", &o->gen.max_new_tokens)) || (rc = arg_bool(a, "do_sample", &do_sample)) ||
        (rc = arg_bool(a, "greedy", &greedy)) || (rc = arg_double(a, "temperature", &o->gen.temperature)) ||
        (rc = arg_double(a, "top_p", &o->gen.top_p)) || (rc = arg_int(a, "top_k", &o->gen.top_k)) ||
        (rc = arg_double(a, "repetition_penalty", &o->gen.repetition_penalty)) ||
        (rc = arg_int(a, "no_repeat_ngram_size", &o->gen.no_repeat_ngram_size)) ||
        (rc = arg_int_in(a, "seed", &seed, 0, INFINITY)) || (rc = arg_bool(a, "random_init", &o->load.random_init)) ||
        (rc = arg_bool(a, "exact", &exact)))
        return rc;
    o->load.fast = !exact;
    o->system = arg_get(a, "system");
    if ((rc = arg_compute_dtype(a, &o->load.bnb_4bit_compute_dtype))) return rc;
    if (greedy && do_sample == 1)
        return mb_fail(MB_ERR_ARG, "%s: --greedy and --do_sample contradict each other", a->cmd);
    o->gen.do_sample = greedy ? 0 : do_sample != 0;
    char why[200];
    const char *bad = generation_config_invalid(&o->gen, why, sizeof why);
    if (bad) return arg_fail(a, bad, "%s", why);
    o->gen.seed = seed_given ? (uint64_t)seed : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    o->load.seed = seed_given ? (uint64_t)seed : 42; /* --random_init's weights: dpo's default seed draws the same */
    if (!o->model) return mb_fail(MB_ERR_ARG, "%s: --model DIR is required (medbot %s --help)", a->cmd, a->cmd);
    return MB_OK;
}

/* Streams each piece of text to f as it comes and keeps the whole answer. */
typedef struct {
    FILE *f;
    char *text;             /* stb_ds array, NUL-terminated */
    int escape;             /* one line per answer: \\ for a backslash, \n and \r for line breaks */
    volatile sig_atomic_t *stop; /* set (by Ctrl-C): generation stops after this piece */
} MbAnswer;

static int answer_piece(void *ctx, int32_t id, const char *text, size_t len) {
    MbAnswer *a = ctx;
    (void)id;
    for (size_t i = 0; a->f && i < len; i++) {
        const char *esc = !a->escape ? NULL : text[i] == '\\' ? "\\\\" : text[i] == '\n' ? "\\n" : text[i] == '\r' ? "\\r" : NULL;
        if (esc) fputs(esc, a->f);
        else fputc(text[i], a->f);
    }
    if (a->f && len) fflush(a->f);
    if (len && arrlen(a->text)) arrsetlen(a->text, arrlen(a->text) - 1);
    for (size_t i = 0; i < len; i++) arrput(a->text, text[i]);
    if (len) arrput(a->text, 0);
    return a->stop && *a->stop;
}

static void json_line_out(const char *key, const char *prompt, const MbAnswer *ans, size_t ntok) {
    char *j = NULL;
    sb_printf(&j, "{");
    sb_json_string(&j, key, strlen(key));
    sb_printf(&j, ": ");
    sb_json_string(&j, prompt, strlen(prompt));
    sb_printf(&j, ", \"answer\": ");
    const char *a = ans->text ? ans->text : "";
    sb_json_string(&j, a, strlen(a));
    sb_printf(&j, ", \"tokens\": %zu}\n", ntok);
    fputs(j, stdout);
    fflush(stdout);
    arrfree(j);
}

/* One prompt of generate: the card's template around question (raw: the text as it is);
 * the answer streams to stdout, or (json) comes as one JSON line. Messages start with where. */
static MbStatus gen_one(MbChat *ch, const char *where, const char *text, const char *system, int raw, int json,
                        const char *key) {
    MbAnswer ans = {json ? NULL : stdout, NULL, 0, NULL};
    MbChatReply r;
    MbStatus rc = mb_chat_generate(ch, text, system, raw, answer_piece, &ans, &r);
    if (!rc && r.outcome == MB_CHAT_TOO_LONG)
        rc = mb_fail(MB_ERR_ARG, "the prompt is %zu tokens, the context holds %d (--max_context) --> shorten the "
                     "prompt", r.prompt_tokens, mb_chat_context(ch));
    if (!rc && json) json_line_out(key, text, &ans, r.n_tokens);
    if (!rc && !json) printf("\n");
    if (!rc && r.cut)
        fprintf(stderr, "medbot: %s: the answer was cut at the context limit (%d tokens, --max_context)\n", where,
                mb_chat_context(ch));
    if (rc) rc = mb_fail_at(rc, where);
    arrfree(ans.text);
    return rc;
}

/* --input FILE.jsonl: {"question", "system"?} rendered with the template, or {"prompt"} as it is.
 * Every line is checked before the first answer. */
static MbStatus gen_file(MbChat *ch, const char *path, int raw) {
    char *text;
    size_t n;
    MbStatus rc = mb_read_file(path, &text, &n);
    if (rc) return rc;
    typedef struct {
        char *where, *prompt, *system;
        int is_question;
    } Item;
    Item *items = NULL; /* stb_ds array */
    MbJsonl jl;
    MbJsonDoc doc;
    for (rc = jsonl_open(&jl, path, text, n); !rc && jsonl_read(&jl, &doc, &rc);) {
        const MbJson *r = json_root(&doc), *q = json_get(&doc, r, "question"), *p = json_get(&doc, r, "prompt"),
                     *sys = json_get(&doc, r, "system");
        const MbJson *v = q ? q : p;
        if (r->kind != MB_JSON_OBJECT || !v || v->kind != MB_JSON_STRING || (sys && sys->kind != MB_JSON_STRING))
            rc = mb_fail(MB_ERR_FORMAT, "%s: each line needs a string \"question\" (or \"prompt\")", jl.where);
        else if (!v->len)
            rc = mb_fail(MB_ERR_FORMAT, "%s: the %s is empty", jl.where, q ? "question" : "prompt");
        else {
            Item it = {mb_strdup(jl.where), mb_strdup(json_str(&doc, v)), sys ? mb_strdup(json_str(&doc, sys)) : NULL,
                       q != NULL};
            if (!it.where || !it.prompt || (sys && !it.system)) rc = MB_ERR_OOM;
            arrput(items, it); /* (freed with the others, also when one is missing) */
        }
        json_free(&doc);
    }
    free(text);
    if (!rc && !arrlen(items)) rc = mb_fail(MB_ERR_FORMAT, "%s: no prompts in the file", path);
    for (ptrdiff_t i = 0; !rc && i < arrlen(items); i++)
        rc = gen_one(ch, items[i].where, items[i].prompt, items[i].system, raw || !items[i].is_question, 1,
                     items[i].is_question ? "question" : "prompt");
    for (ptrdiff_t i = 0; i < arrlen(items); i++) free(items[i].where), free(items[i].prompt), free(items[i].system);
    arrfree(items);
    return rc;
}

static int cmd_generate(MbArgs *a) {
    MbChatOptions o;
    MbChat *ch = NULL;
    int raw = 0;
    const char *prompt = NULL, *input = NULL;
    MbStatus rc = gen_args(a, &o);
    if (!rc) prompt = arg_get(a, "prompt");
    if (!rc && !(rc = arg_bool(a, "raw", &raw)) && !(rc = arg_path(a, "input", &input)) && !(rc = args_done(a))) {
        if (prompt && input) rc = mb_fail(MB_ERR_ARG, "generate: --prompt and --input exclude each other");
        else if (!prompt && !input) rc = mb_fail(MB_ERR_ARG, "generate: --prompt TEXT or --input FILE.jsonl is needed");
        else if (prompt && !prompt[0]) rc = mb_fail(MB_ERR_ARG, "generate: the prompt is empty");
    }
    if (!rc) rc = mb_chat_open(&o, &ch);
    if (!rc) rc = input ? gen_file(ch, input, raw) : gen_one(ch, "generate", prompt, NULL, raw, 0, NULL);
    mb_chat_close(ch);
    if (rc) {
        fflush(stdout);
        fprintf(stderr, "medbot: %s\n", mb_last_error());
        return 1;
    }
    return 0;
}

/* One question of chat, answered to stdout (escaped on a pipe). A conversation that would
 * outgrow the context starts over, with a message. */
static MbStatus chat_ask(MbChat *ch, const char *q, int tty, int max_new, MbChatReply *r) {
    MbAnswer ans = {stdout, NULL, !tty, &mb_cli_stop};
    int ctx = mb_chat_context(ch);
    MbStatus rc = mb_chat_turn(ch, q, answer_piece, &ans, r);
    if (!rc && r->outcome == MB_CHAT_FULL) {
        fprintf(stderr, "medbot: the conversation (%d tokens) and this question with room for max_new_tokens %d "
                "exceed the context of %d tokens (--max_context): starting a new conversation\n",
                (int)r->history_tokens, max_new, ctx);
        if (!(rc = mb_chat_reset(ch))) rc = mb_chat_turn(ch, q, answer_piece, &ans, r);
    }
    if (!rc && r->outcome == MB_CHAT_TOO_LONG)
        fprintf(stderr, "medbot: this question is %d tokens, the context holds %d (--max_context): not answered\n",
                (int)r->prompt_tokens, ctx);
    arrfree(ans.text);
    return rc;
}

static int cmd_chat(MbArgs *a) {
    MbChatOptions o;
    MbChat *ch = NULL;
    MbStatus rc = gen_args(a, &o);
    if (!rc) rc = args_done(a);
    if (!rc) rc = mb_chat_open(&o, &ch);
    if (!rc) rc = mb_chat_reset(ch); /* makes the conversation's cache: a failure shows before the first prompt */
    if (rc) {
        mb_chat_close(ch);
        fprintf(stderr, "medbot: %s\n", mb_last_error());
        return 1;
    }
    /* a terminal gets a prompt and answers as they are; a pipe gets one line per input line */
    int tty = isatty(STDIN_FILENO), max_new = o.gen.max_new_tokens;
    if (tty)
        printf("medbot chat with %s%s%s: type a question; /reset starts over, /quit (or Ctrl-D) leaves; Ctrl-C stops "
               "an answer.\n", o.model, o.lora ? " + " : "", o.lora ? o.lora : "");
    char *line = NULL;
    size_t cap = 0;
    for (;;) {
        if (tty) printf("> ");
        fflush(stdout);
        catch_signals(on_chat_interrupt, 0, 0); /* Ctrl-C at the prompt: the read returns, chat leaves */
        mb_cli_stop = 0;
        ssize_t got = getline(&line, &cap, stdin);
        catch_signals(on_chat_interrupt, 0, 1); /* Ctrl-C while answering: the answer stops */
        mb_cli_stop = 0;
        if (got < 0) { /* end of input, or Ctrl-C at the prompt: leave */
            if (tty) printf("\n");
            break;
        }
        while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        const char *q = line;
        while (*q == ' ' || *q == '\t') q++;
        if (!strcmp(q, "/quit") || !strcmp(q, "/exit")) break;
        int reset = !strcmp(q, "/reset");
        if (!*q || reset) {
            if (reset && (rc = mb_chat_reset(ch))) break;
            if (reset && tty) printf("(a new conversation)\n");
            if (!tty) printf("\n"); /* every line of a pipe gets its line */
            continue;
        }
        MbChatReply r;
        if ((rc = chat_ask(ch, q, tty, max_new, &r))) break;
        if (r.outcome == MB_CHAT_TOO_LONG) {
            if (!tty) printf("\n");
            continue;
        }
        printf("\n");
        if (mb_cli_stop)
            fprintf(stderr, "medbot: answer stopped (Ctrl-C) after %zu tokens; the conversation goes on with them\n",
                    r.n_tokens);
        else if (r.cut)
            fprintf(stderr, "medbot: the answer reached the context limit (%d tokens); /reset to start over\n",
                    mb_chat_context(ch));
    }
    signal(SIGINT, SIG_DFL);
    free(line);
    mb_chat_close(ch);
    if (rc) {
        fprintf(stderr, "medbot: %s\n", mb_last_error());
        return 1;
    }
    return 0;
}

/* The function of each command of mb_cli_commands. */
static const struct {
    const char *name;
    int (*fn)(MbArgs *);
} mb_command_fns[] = {{"info", cmd_info},     {"dpo", cmd_dpo},       {"sft", cmd_sft},       {"eval", cmd_eval},
                      {"merge", cmd_merge},   {"init", cmd_init},     {"encode", cmd_encode}, {"decode", cmd_decode},
                      {"generate", cmd_generate}, {"chat", cmd_chat}};

#define MB_HELP_WIDTH 100 /* columns of --help */
#define MB_HELP_COLUMN 36 /* where an option's help starts */

/* Writes text from column `at` (where the cursor is), wrapped at MB_HELP_WIDTH, each further line
 * indented to column indent; ends the line. */
static void help_wrap(FILE *f, const char *text, int at, int indent) {
    for (const char *p = text; *p;) {
        while (*p == ' ') p++;
        size_t n = strcspn(p, " ");
        if (!n) break;
        if (at > indent && at + 1 + (int)n > MB_HELP_WIDTH) {
            fprintf(f, "\n%*s", indent, "");
            at = indent;
        } else if (at > indent) {
            fputc(' ', f);
            at++;
        }
        fprintf(f, "%.*s", (int)n, p);
        at += (int)n;
        p += n;
    }
    fputc('\n', f);
}

/* The command's usage lines: the first after `first` ("...medbot "), the others aligned under it. */
static void help_usage(FILE *f, const MbCliCommand *c, const char *first) {
    const char *u = c->usage;
    for (int i = 0; *u; i++) {
        size_t n = strcspn(u, "\n");
        if (i) fprintf(f, "%*smedbot %.*s\n", (int)strlen(first) - 7, "", (int)n, u);
        else fprintf(f, "%s%.*s\n", first, (int)n, u);
        u += n + (u[n] == '\n');
    }
}

/* medbot CMD --help: usage, what it does, then every option of its table, under its headings. */
static void help_command(FILE *f, const MbCliCommand *c) {
    help_usage(f, c, "usage: medbot ");
    fputc('\n', f);
    help_wrap(f, c->about, 0, 0);
    for (int s = 0; s < MB_CLI_SECTIONS && c->sections[s].opts; s++) {
        if (c->sections[s].title) fprintf(f, "\n%s:\n", c->sections[s].title);
        for (const MbOpt *o = c->sections[s].opts; o->name; o++) {
            char head[128], keys[64] = "";
            int n = snprintf(head, sizeof head, "  --%s%s%s", o->name, o->value ? " " : "", o->value ? o->value : "");
            for (size_t k = 0; k < sizeof mb_cli_config_renames / sizeof *mb_cli_config_renames; k++)
                if (!strcmp(mb_cli_config_renames[k][1], o->name))
                    snprintf(keys, sizeof keys, " (--config key: %s)", mb_cli_config_renames[k][0]);
            fputs(head, f);
            if (n + 2 > MB_HELP_COLUMN) fprintf(f, "\n%*s", MB_HELP_COLUMN, "");
            else fprintf(f, "%*s", MB_HELP_COLUMN - n, "");
            char text[512];
            snprintf(text, sizeof text, "%s%s", o->help, cli_reads_yaml(c) ? keys : "");
            help_wrap(f, text, MB_HELP_COLUMN, MB_HELP_COLUMN);
        }
    }
}

static void usage(FILE *f) {
    fprintf(f, "medbot %s: train (LoRA + DPO) and serve a Llama-3.1 medical chatbot\n\nusage: medbot COMMAND [options]\n\n",
            MEDBOT_VERSION);
    for (size_t i = 0; i < sizeof mb_cli_commands / sizeof *mb_cli_commands; i++) {
        const char *about = mb_cli_commands[i].about, *end = strstr(about, ". ");
        char first[512]; /* its first sentence */
        snprintf(first, sizeof first, "%.*s", end ? (int)(end - about + 1) : (int)strlen(about), about);
        help_usage(f, &mb_cli_commands[i], "  medbot ");
        fprintf(f, "    ");
        help_wrap(f, first, 4, 4);
    }
    fprintf(f, "\nmedbot COMMAND --help lists a command's options.\n");
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, BUFSIZ); /* every line out as it is written, also into a file or pipe */
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("medbot %s\n", MEDBOT_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof mb_command_fns / sizeof *mb_command_fns; i++) {
        if (strcmp(argv[1], mb_command_fns[i].name)) continue;
        const MbCliCommand *def = cli_command(argv[1]);
        for (int k = 2; k < argc; k++)
            if (!strcmp(argv[k], "--help") || !strcmp(argv[k], "-h")) {
                help_command(stdout, def);
                return 0;
            }
        MbArgs a;
        memset(&a, 0, sizeof a);
        a.argc = argc, a.argv = argv, a.used = mb_calloc((size_t)argc, 1), a.cmd = def->name, a.def = def;
        if (!a.used) {
            fprintf(stderr, "medbot: %s\n", mb_last_error());
            return 1;
        }
        int rc = mb_command_fns[i].fn(&a);
        args_free(&a);
        return rc;
    }
    fprintf(stderr, "medbot: unknown command '%s' --> medbot --help lists them\n", argv[1]);
    return 2;
}
#endif

// ============================================================================================
// ---------- appendix: generated tables (never edit by hand) ----------
// Data that tools write, kept in this file so that medbot.c + medbot.h + stb_ds.h build with one
// cc line: the CUDA kernel source and its specialization table (gen_kernels from kernels.cu.in,
// `./build.sh kernels`; tests/test_kernels.c fails when it is stale) and the Unicode classes of
// the tokenizer's pre-tokenizer (tests/ref/make_unicode_tables.py from Unicode 16.0).
// ============================================================================================

/* BEGIN kernels: generated by gen_kernels from kernels.cu.in; refresh: ./build.sh kernels */
#define MB_KERNELS_HASH "d0117f1a4cae7a91"
/* the specialization table: -D options of each row, and those every row gets */
#define MB_KERNEL_N_SPECS 6
static const char *const mb_kernel_specs[MB_KERNEL_N_SPECS] = {
    "-DHEAD_DIM=128 -DSMEM_BUDGET=166912 -DATT_BQ=64 -DATT_BK=64 -DATT_BWD_BQ=32 -DATT_BWD_BK=64",
    "-DHEAD_DIM=128 -DSMEM_BUDGET=101376 -DATT_BQ=64 -DATT_BK=32 -DATT_BWD_BQ=32 -DATT_BWD_BK=32",
    "-DHEAD_DIM=64 -DSMEM_BUDGET=101376 -DATT_BQ=64 -DATT_BK=64 -DATT_BWD_BQ=32 -DATT_BWD_BK=64",
    "-DHEAD_DIM=24 -DSMEM_BUDGET=101376 -DATT_BQ=64 -DATT_BK=64 -DATT_BWD_BQ=32 -DATT_BWD_BK=64",
    "-DHEAD_DIM=16 -DSMEM_BUDGET=101376 -DATT_BQ=64 -DATT_BK=64 -DATT_BWD_BQ=32 -DATT_BWD_BK=64",
    "-DHEAD_DIM=12 -DSMEM_BUDGET=101376 -DATT_BQ=64 -DATT_BK=64 -DATT_BWD_BQ=32 -DATT_BWD_BK=64",
};
static const char mb_kernel_spec_common[] = "-DBLOCK=256 -DSEQ_LEN=512 -DNF4_BLOCK=64";
#define MB_KERNELS_BYTES 33917
#define MB_KERNELS_LINES 700
static const char *const mb_kernels_src_lines[MB_KERNELS_LINES] = {
"// kernels.cu.in: medbot's CUDA kernels, compiled at run time by NVRTC for the GPU in the box.\n",
"// gen_kernels embeds this file into kernels.gen.h (source + hash + the specialization table\n",
"// below); medbot.c compiles it with the -D options of one table row plus BLOCK, SEQ_LEN and\n",
"// NF4_BLOCK, into a cubin for the device's exact architecture, and caches it on disk.\n",
"//\n",
"// Specialization constants (-D):\n",
"//   BLOCK        threads per block of the row and elementwise kernels (a multiple of 32)\n",
"//   SEQ_LEN      the sequence length the training tiles are sized for (512); any length runs\n",
"//   NF4_BLOCK    values per NF4 absmax block that gets the fast path (64, bitsandbytes' default)\n",
"//   HEAD_DIM     D, the attention head size\n",
"//   SMEM_BUDGET  bytes of shared memory a block may use (the device's opt-in limit chooses the row)\n",
"//   ATT_BQ, ATT_BK          query rows and keys per tile of attention_forward\n",
"//   ATT_BWD_BQ, ATT_BWD_BK  query rows and keys per tile of attention_backward\n",
"//\n",
"// The specialization table: every row the runtime can choose (medbot.c picks the row with the\n",
"// model's HEAD_DIM and the largest SMEM_BUDGET the device allows); `gen_kernels --check` compiles\n",
"// each of them for sm_80, sm_86, sm_89 and sm_90. One row per line, \"// spec:\" then -D options.\n",
"// spec: HEAD_DIM=128 SMEM_BUDGET=166912 ATT_BQ=64 ATT_BK=64 ATT_BWD_BQ=32 ATT_BWD_BK=64\n",
"// spec: HEAD_DIM=128 SMEM_BUDGET=101376 ATT_BQ=64 ATT_BK=32 ATT_BWD_BQ=32 ATT_BWD_BK=32\n",
"// spec: HEAD_DIM=64 SMEM_BUDGET=101376 ATT_BQ=64 ATT_BK=64 ATT_BWD_BQ=32 ATT_BWD_BK=64\n",
"// spec: HEAD_DIM=24 SMEM_BUDGET=101376 ATT_BQ=64 ATT_BK=64 ATT_BWD_BQ=32 ATT_BWD_BK=64\n",
"// spec: HEAD_DIM=16 SMEM_BUDGET=101376 ATT_BQ=64 ATT_BK=64 ATT_BWD_BQ=32 ATT_BWD_BK=64\n",
"// spec: HEAD_DIM=12 SMEM_BUDGET=101376 ATT_BQ=64 ATT_BK=64 ATT_BWD_BQ=32 ATT_BWD_BK=64\n",
"// spec-common: BLOCK=256 SEQ_LEN=512 NF4_BLOCK=64\n",
"//\n",
"// No headers: bf16 is handled as raw bits (uint16) so NVRTC needs no include path, and the\n",
"// conversions are the same as medbot.c's CPU ones (round to nearest even, NaN stays NaN).\n",
"// Precision: activations bf16 in memory, every sum and every norm, softmax and loss in fp32;\n",
"// optimizer state fp32, gradient sums fp64. Shapes use the legend of medbot.c.\n",
"\n",
"#ifndef BLOCK\n",
"#error \"BLOCK must be given (-DBLOCK=256)\"\n",
"#endif\n",
"#ifndef HEAD_DIM\n",
"#error \"HEAD_DIM must be given (-DHEAD_DIM=128)\"\n",
"#endif\n",
"#ifndef SEQ_LEN\n",
"#define SEQ_LEN 512\n",
"#endif\n",
"#ifndef NF4_BLOCK\n",
"#define NF4_BLOCK 64\n",
"#endif\n",
"#ifndef SMEM_BUDGET\n",
"#define SMEM_BUDGET 101376\n",
"#endif\n",
"#ifndef ATT_BQ\n",
"#define ATT_BQ 64\n",
"#endif\n",
"#ifndef ATT_BK\n",
"#define ATT_BK 32\n",
"#endif\n",
"#ifndef ATT_BWD_BQ\n",
"#define ATT_BWD_BQ 32\n",
"#endif\n",
"#ifndef ATT_BWD_BK\n",
"#define ATT_BWD_BK 32\n",
"#endif\n",
"\n",
"typedef unsigned short bf16_t;\n",
"typedef unsigned char u8;\n",
"typedef unsigned long long u64;\n",
"\n",
"#define NEG_INF __int_as_float(0xff800000)\n",
"\n",
"__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((unsigned)h) << 16); }\n",
"\n",
"__device__ __forceinline__ bf16_t f32_to_bf16(float f) {\n",
"    unsigned u = __float_as_uint(f);\n",
"    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (bf16_t)((u >> 16) | 0x40); // NaN stays NaN\n",
"    u += 0x7FFFu + ((u >> 16) & 1u);\n",
"    return (bf16_t)(u >> 16);\n",
"}\n",
"\n",
"// f -> f16 (round to nearest even) -> f32: what an NF4 weight with compute dtype float16 holds\n",
"#ifdef MB_KERNEL_EMULATION /* tests/gpu/kernel_emu.cpp runs these kernels on the CPU */\n",
"__device__ __forceinline__ float f16_round(float f) { return emu_f16_round(f); }\n",
"#else\n",
"__device__ __forceinline__ float f16_round(float f) {\n",
"    unsigned short h;\n",
"    float r;\n",
"    asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(f));\n",
"    asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(r) : \"h\"(h));\n",
"    return r;\n",
"}\n",
"#endif\n",
"\n",
"// the block's dynamic shared memory (the emulator defines it otherwise)\n",
"#ifndef DYNAMIC_SMEM\n",
"#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]\n",
"#endif\n",
"\n",
"__device__ __forceinline__ int imin(int a, int b) { return a < b \? a : b; }\n",
"\n",
"// Every thread of the block gets the sum (max) of v. shared: 32 floats. blockDim.x == BLOCK.\n",
"__device__ __forceinline__ float block_sum(float v, float *shared) {\n",
"    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);\n",
"    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n",
"    if (lane == 0) shared[warp] = v;\n",
"    __syncthreads();\n",
"    v = lane < BLOCK / 32 \? shared[lane] : 0.0f;\n",
"    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);\n",
"    __syncthreads();\n",
"    return v;\n",
"}\n",
"\n",
"__device__ __forceinline__ float block_max(float v, float *shared) {\n",
"    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));\n",
"    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n",
"    if (lane == 0) shared[warp] = v;\n",
"    __syncthreads();\n",
"    v = lane < BLOCK / 32 \? shared[lane] : NEG_INF;\n",
"    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));\n",
"    __syncthreads();\n",
"    return v;\n",
"}\n",
"\n",
"// Grid-stride loop over n elements\n",
"#define FOR_N(i, n) for (u64 i = (u64)blockIdx.x * BLOCK + threadIdx.x; i < (n); i += (u64)gridDim.x * BLOCK)\n",
"\n",
"// ---------------------------------------------------------------------------------------------\n",
"// Embedding, norms, rope, elementwise\n",
"// ---------------------------------------------------------------------------------------------\n",
"\n",
"// out (N, C) = wte[tokens] : nn.Embedding. One block per row.\n",
"extern \"C\" __global__ void embedding_forward(bf16_t *out, const int *tokens, const bf16_t *wte, int C) {\n",
"    const bf16_t *row = wte + (u64)tokens[blockIdx.x] * C;\n",
"    bf16_t *o = out + (u64)blockIdx.x * C;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) o[c] = row[c];\n",
"}\n",
"\n",
"// out (N, C) = w * x / sqrt(mean(x^2) + eps), rstd (N) : LlamaRMSNorm, statistics in fp32.\n",
"// One block per row; w is the norm weight in fp32.\n",
"extern \"C\" __global__ void rmsnorm_forward(bf16_t *out, float *rstd, const bf16_t *x, const float *w, int C,\n",
"                                           float eps) {\n",
"    __shared__ float shared[32];\n",
"    const bf16_t *xr = x + (u64)blockIdx.x * C;\n",
"    float ss = 0.0f;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) {\n",
"        float v = bf16_to_f32(xr[c]);\n",
"        ss += v * v;\n",
"    }\n",
"    ss = block_sum(ss, shared);\n",
"    float r = 1.0f / sqrtf(ss / (float)C + eps);\n",
"    if (threadIdx.x == 0 && rstd) rstd[blockIdx.x] = r;\n",
"    bf16_t *o = out + (u64)blockIdx.x * C;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) o[c] = f32_to_bf16(w[c] * (bf16_to_f32(xr[c]) * r));\n",
"}\n",
"\n",
"// dinp (N, C) (+)= r w dy - r^3 / C x sum(w dy x), the backward of rmsnorm_forward (w frozen)\n",
"extern \"C\" __global__ void rmsnorm_backward(bf16_t *dinp, const bf16_t *dout, const bf16_t *inp, const float *w,\n",
"                                            const float *rstd, int C, int accumulate) {\n",
"    __shared__ float shared[32];\n",
"    u64 row = (u64)blockIdx.x * C;\n",
"    const bf16_t *x = inp + row, *dy = dout + row;\n",
"    float r = rstd[blockIdx.x], dot = 0.0f;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) dot += w[c] * bf16_to_f32(dy[c]) * bf16_to_f32(x[c]);\n",
"    dot = block_sum(dot, shared);\n",
"    float k = r * r * r * dot / (float)C;\n",
"    bf16_t *dx = dinp + row;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) {\n",
"        float g = r * w[c] * bf16_to_f32(dy[c]) - k * bf16_to_f32(x[c]);\n",
"        dx[c] = f32_to_bf16(accumulate \? bf16_to_f32(dx[c]) + g : g);\n",
"    }\n",
"}\n",
"\n",
"// The llama3-scaled inverse frequencies (D/2 of them), passed by value.\n",
"struct RopeFreq {\n",
"    float f[128];\n",
"};\n",
"\n",
"// x (B, T, nh, D) rotated in place at positions pos0 + t (HF rotate_half layout); sign -1: the\n",
"// backward (the transpose). One block per (b, t).\n",
"extern \"C\" __global__ void rope_forward(bf16_t *x, RopeFreq rf, int T, int pos0, int nh, float sign) {\n",
"    const int half = HEAD_DIM / 2, t = blockIdx.x % T;\n",
"    for (int i = threadIdx.x; i < nh * half; i += BLOCK) {\n",
"        int h = i / half, j = i % half;\n",
"        float ang = (float)(pos0 + t) * rf.f[j], c = cosf(ang), s = sign * sinf(ang);\n",
"        bf16_t *v = x + ((u64)blockIdx.x * nh + h) * HEAD_DIM;\n",
"        float x1 = bf16_to_f32(v[j]), x2 = bf16_to_f32(v[j + half]);\n",
"        v[j] = f32_to_bf16(x1 * c - x2 * s);\n",
"        v[j + half] = f32_to_bf16(x2 * c + x1 * s);\n",
"    }\n",
"}\n",
"\n",
"// cache (B, S, KD) rows pos0 .. pos0 + T - 1 = x (B, T, KD). Grid (T, B).\n",
"extern \"C\" __global__ void kv_store(bf16_t *cache, const bf16_t *x, int T, int S, int pos0, int KD) {\n",
"    const bf16_t *src = x + ((u64)blockIdx.y * T + blockIdx.x) * KD;\n",
"    bf16_t *dst = cache + ((u64)blockIdx.y * S + pos0 + blockIdx.x) * KD;\n",
"    for (int i = threadIdx.x; i < KD; i += BLOCK) dst[i] = src[i];\n",
"}\n",
"\n",
"// out (n) = silu(gate) * up : LlamaMLP's act_fn(gate_proj(x)) * up_proj(x)\n",
"extern \"C\" __global__ void swiglu_forward(bf16_t *out, const bf16_t *gate, const bf16_t *up, u64 n) {\n",
"    FOR_N(i, n) {\n",
"        float g = bf16_to_f32(gate[i]);\n",
"        out[i] = f32_to_bf16(g / (1.0f + expf(-g)) * bf16_to_f32(up[i]));\n",
"    }\n",
"}\n",
"\n",
"extern \"C\" __global__ void swiglu_backward(bf16_t *dgate, bf16_t *dup, const bf16_t *dout, const bf16_t *gate,\n",
"                                           const bf16_t *up, u64 n) {\n",
"    FOR_N(i, n) {\n",
"        float g = bf16_to_f32(gate[i]), s = 1.0f / (1.0f + expf(-g)), dy = bf16_to_f32(dout[i]);\n",
"        dup[i] = f32_to_bf16(dy * (g * s));\n",
"        dgate[i] = f32_to_bf16(dy * bf16_to_f32(up[i]) * (s * (1.0f + g * (1.0f - s))));\n",
"    }\n",
"}\n",
"\n",
"// out (n) = a + b (out may alias a or b)\n",
"extern \"C\" __global__ void add_forward(bf16_t *out, const bf16_t *a, const bf16_t *b, u64 n) {\n",
"    FOR_N(i, n) out[i] = f32_to_bf16(bf16_to_f32(a[i]) + bf16_to_f32(b[i]));\n",
"}\n",
"\n",
"// out (n, C) = inp[rows[i]]; one block per row\n",
"extern \"C\" __global__ void gather_rows(bf16_t *out, const bf16_t *inp, const int *rows, int C) {\n",
"    const bf16_t *src = inp + (u64)rows[blockIdx.x] * C;\n",
"    bf16_t *dst = out + (u64)blockIdx.x * C;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) dst[c] = src[c];\n",
"}\n",
"\n",
"// out[rows[i]] = inp[i] (out zeroed before); one block per row\n",
"extern \"C\" __global__ void scatter_rows(bf16_t *out, const bf16_t *inp, const int *rows, int C) {\n",
"    const bf16_t *src = inp + (u64)blockIdx.x * C;\n",
"    bf16_t *dst = out + (u64)rows[blockIdx.x] * C;\n",
"    for (int c = threadIdx.x; c < C; c += BLOCK) dst[c] = src[c];\n",
"}\n",
"\n",
"// medbot.c's mb_hash_uniform: splitmix64 of seed ^ i * 0xD1B54A32D192ED03, top 24 bits\n",
"__device__ __forceinline__ u64 hash64(u64 seed, u64 i) {\n",
"    u64 z = (seed ^ (i * 0xD1B54A32D192ED03ull)) + 0x9E3779B97F4A7C15ull;\n",
"    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;\n",
"    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;\n",
"    return z ^ (z >> 31);\n",
"}\n",
"__device__ __forceinline__ float hash_uniform(u64 seed, u64 i) { return (float)(hash64(seed, i) >> 40) * 0x1.0p-24f; }\n",
"\n",
"// out (n) = inp * keep / (1 - p), keep[i] = hash(seed, i) >= p : nn.Dropout with a counter-based mask\n",
"extern \"C\" __global__ void dropout_forward(bf16_t *out, const bf16_t *inp, u64 n, float p, u64 seed) {\n",
"    float s = 1.0f / (1.0f - p);\n",
"    FOR_N(i, n) out[i] = hash_uniform(seed, i) >= p \? f32_to_bf16(bf16_to_f32(inp[i]) * s) : (bf16_t)0;\n",
"}\n",
"\n",
"// Random weights for benchmarks at real shapes (medbot.c's cpu_random_* draw the same values)\n",
"extern \"C\" __global__ void random_bytes(u8 *dst, u64 n, u64 seed) {\n",
"    FOR_N(i, n) dst[i] = (u8)(hash64(seed, i) >> 56);\n",
"}\n",
"\n",
"extern \"C\" __global__ void random_normal_bf16(bf16_t *dst, u64 n, u64 seed, float std) {\n",
"    FOR_N(i, n) {\n",
"        float u1 = (float)((hash64(seed, 2 * i) >> 40) + 1) * 0x1.0p-24f, u2 = hash_uniform(seed, 2 * i + 1);\n",
"        dst[i] = f32_to_bf16(std * (sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2)));\n",
"    }\n",
"}\n",
"\n",
"// ---------------------------------------------------------------------------------------------\n",
"// Conversions and optimizer state (fp32 vectors, fp64 sums)\n",
"// ---------------------------------------------------------------------------------------------\n",
"\n",
"extern \"C\" __global__ void f32_to_bf16_vec(bf16_t *out, const float *in, u64 n) { FOR_N(i, n) out[i] = f32_to_bf16(in[i]); }\n",
"extern \"C\" __global__ void bf16_to_f32_vec(float *out, const bf16_t *in, u64 n) { FOR_N(i, n) out[i] = bf16_to_f32(in[i]); }\n",
"extern \"C\" __global__ void scale_f32(float *x, float s, u64 n) { FOR_N(i, n) x[i] *= s; }\n",
"extern \"C\" __global__ void fill_f32(float *x, float v, u64 n) { FOR_N(i, n) x[i] = v; }\n",
"extern \"C\" __global__ void accumulate_f64(double *acc, const float *x, u64 n) { FOR_N(i, n) acc[i] += (double)x[i]; }\n",
"extern \"C\" __global__ void from_f64(float *out, const double *in, u64 n) { FOR_N(i, n) out[i] = (float)in[i]; }\n",
"\n",
"// part[block] = sum of x^2 over the block's grid-stride share, in fp64\n",
"extern \"C\" __global__ void sumsq_partial(double *part, const float *x, u64 n) {\n",
"    __shared__ double shared[BLOCK / 32];\n",
"    double s = 0.0;\n",
"    FOR_N(i, n) s += (double)x[i] * (double)x[i];\n",
"    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, o);\n",
"    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = s;\n",
"    __syncthreads();\n",
"    if (threadIdx.x == 0) {\n",
"        double t = 0.0;\n",
"        for (int w = 0; w < BLOCK / 32; w++) t += shared[w];\n",
"        part[blockIdx.x] = t;\n",
"    }\n",
"}\n",
"\n",
"// torch.optim.AdamW (foreach=False) in fp32; step_size = lr / bc1, bc2_sqrt = sqrt(1 - beta2^t) and\n",
"// decay = 1 - lr wd are computed on the host exactly as the CPU backend does\n",
"extern \"C\" __global__ void adamw(float *p, const float *g, float *m, float *v, u64 n, float step_size, float bc2_sqrt,\n",
"                                 float decay, float b1, float b2, float eps) {\n",
"    FOR_N(i, n) {\n",
"        float gi = g[i], mi = m[i], vi = v[i];\n",
"        float pi = p[i] * decay;\n",
"        mi += (gi - mi) * (1.0f - b1);\n",
"        vi = vi * b2 + (1.0f - b2) * gi * gi;\n",
"        float denom = sqrtf(vi) / bc2_sqrt + eps;\n",
"        p[i] = pi - step_size * (mi / denom);\n",
"        m[i] = mi, v[i] = vi;\n",
"    }\n",
"}\n",
"\n",
"// ---------------------------------------------------------------------------------------------\n",
"// NF4 (bitsandbytes 4-bit NormalFloat with double quantization): dequantized tile by tile for\n",
"// cuBLASLt, or fused into a matrix-vector product for decode. Values as medbot.c's CPU path:\n",
"// absmax = map8[qa] * scale2 + offset (two fp32 roundings, never an FMA), w = code * absmax,\n",
"// rounded to the compute dtype, then to bf16 for the tensor cores.\n",
"// ---------------------------------------------------------------------------------------------\n",
"\n",
"__constant__ float nf4_code[16] = {\n",
"    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,\n",
"    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,\n",
"    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,\n",
"    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};\n",
"\n",
"struct Nf4 {\n",
"    const u8 *packed;        // (rows * cols / 2) two codes per byte, the first in the high nibble\n",
"    const u8 *absmax_q;      // (nblocks) codes into map8, or null: absmax holds fp32 values\n",
"    const float *absmax;     // (nblocks) without double quant\n",
"    const float *nested;     // (ceil(nblocks / nested_bs)) fp32 scales\n",
"    const float *map8;       // (256) the 8-bit map\n",
"    float offset;            // the mean absmax, added back\n",
"    int blocksize, nested_bs;\n",
"    int compute;             // 0 float32, 1 bfloat16, 2 float16\n",
"};\n",
"\n",
"__device__ __forceinline__ u64 nf4_block_of(const Nf4 &q, u64 e) {\n",
"    return q.blocksize == NF4_BLOCK \? e / NF4_BLOCK : e / (u64)q.blocksize;\n",
"}\n",
"\n",
"__device__ __forceinline__ float nf4_absmax(const Nf4 &q, u64 b) {\n",
"    if (!q.absmax_q) return q.absmax[b];\n",
"    return __fadd_rn(__fmul_rn(q.map8[q.absmax_q[b]], q.nested[b / (u64)q.nested_bs]), q.offset);\n",
"}\n",
"\n",
"__device__ __forceinline__ float nf4_value(const Nf4 &q, float absmax, int code) {\n",
"    float v = __fmul_rn(nf4_code[code], absmax);\n",
"    if (q.compute == 1) v = bf16_to_f32(f32_to_bf16(v));\n",
"    else if (q.compute == 2) v = f16_round(v);\n",
"    return v;\n",
"}\n",
"\n",
"__device__ __forceinline__ int nf4_code_at(const Nf4 &q, u64 e) {\n",
"    u8 byte = q.packed[e >> 1];\n",
"    return (e & 1) \? (byte & 15) : (byte >> 4);\n",
"}\n",
"\n",
"// out (nr, nc) bf16 = rows [r0, r0 + nr) x cols [c0, c0 + nc) of the (rows, cols) NF4 weight\n",
"extern \"C\" __global__ void nf4_dequant(bf16_t *out, Nf4 q, u64 cols, u64 r0, u64 c0, u64 nr, u64 nc) {\n",
"    FOR_N(i, nr * nc) {\n",
"        u64 r = i / nc, c = i - r * nc, e = (r0 + r) * cols + c0 + c;\n",
"        out[i] = f32_to_bf16(nf4_value(q, nf4_absmax(q, nf4_block_of(q, e)), nf4_code_at(q, e)));\n",
"    }\n",
"}\n",
"\n",
"// out (N, O) = x (N, I) @ W^T for N <= 8 (decode): one warp per output row, the NF4 codes read\n",
"// once, dequantized in registers. Each lane takes 8 consecutive inputs at a time.\n",
"#define GEMV_MAX_N 8\n",
"extern \"C\" __global__ void nf4_gemv(bf16_t *out, const bf16_t *x, Nf4 q, int N, int O, int I) {\n",
"    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;\n",
"    int o = blockIdx.x * (BLOCK / 32) + warp;\n",
"    if (o >= O) return;\n",
"    float acc[GEMV_MAX_N];\n",
"#pragma unroll\n",
"    for (int n = 0; n < GEMV_MAX_N; n++) acc[n] = 0.0f;\n",
"    u64 row = (u64)o * I, last_b = ~0ull;\n",
"    float a = 0.0f;\n",
"    for (int i0 = lane * 8; i0 < I; i0 += 32 * 8) {\n",
"#pragma unroll\n",
"        for (int k = 0; k < 8; k++) {\n",
"            int i = i0 + k;\n",
"            if (i >= I) break;\n",
"            u64 e = row + i, b = nf4_block_of(q, e);\n",
"            if (b != last_b) a = nf4_absmax(q, b), last_b = b;\n",
"            float w = nf4_value(q, a, nf4_code_at(q, e));\n",
"#pragma unroll\n",
"            for (int n = 0; n < GEMV_MAX_N; n++)\n",
"                if (n < N) acc[n] += w * bf16_to_f32(x[(u64)n * I + i]);\n",
"        }\n",
"    }\n",
"#pragma unroll\n",
"    for (int n = 0; n < GEMV_MAX_N; n++) {\n",
"        float v = acc[n];\n",
"        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);\n",
"        if (lane == 0 && n < N) out[(u64)n * O + o] = f32_to_bf16(v);\n",
"    }\n",
"}\n",
"\n",
"// ---------------------------------------------------------------------------------------------\n",
"// Fused lm_head + log-softmax + gather: the logits of a chunk of rows x vocabulary come from\n",
"// cuBLASLt in fp32; these kernels fold each chunk into per-row running statistics, so only a\n",
"// chunk of logits exists at a time. st (rows, 4): running max, sum of exp(l - max), sum of l,\n",
"// the target's logit.\n",
"// ---------------------------------------------------------------------------------------------\n",
"\n",
"extern \"C\" __global__ void logprob_chunk(const float *logits, int vc, int v0, const int *targets, float *st, int first) {\n",
"    __shared__ float shared[32];\n",
"    const float *l = logits + (u64)blockIdx.x * vc;\n",
"    float *s = st + (u64)blockIdx.x * 4;\n",
"    float mx = NEG_INF, sum = 0.0f;\n",
"    for (int v = threadIdx.x; v < vc; v += BLOCK) mx = fmaxf(mx, l[v]), sum += l[v];\n",
"    mx = block_max(mx, shared);\n",
"    sum = block_sum(sum, shared);\n",
"    float m_old = first \? NEG_INF : s[0], m_new = fmaxf(m_old, mx), se = 0.0f;\n",
"    for (int v = threadIdx.x; v < vc; v += BLOCK) se += expf(l[v] - m_new);\n",
"    se = block_sum(se, shared);\n",
"    if (threadIdx.x == 0) {\n",
"        int tg = targets[blockIdx.x] - v0;\n",
"        s[1] = (first \? 0.0f : s[1] * expf(m_old - m_new)) + se;\n",
"        s[0] = m_new;\n",
"        s[2] = (first \? 0.0f : s[2]) + sum;\n",
"        if (first) s[3] = 0.0f;\n",
"        if (tg >= 0 && tg < vc) s[3] = l[tg];\n",
"    }\n",
"}\n",
"\n",
"// logp = target logit - lse, lse = max + log(sum), lsum = the sum of the logits (rows)\n",
"extern \"C\" __global__ void logprob_finish(float *logp, float *lse, float *lsum, const float *st, int rows) {\n",
"    int r = blockIdx.x * BLOCK + threadIdx.x;\n",
"    if (r >= rows) return;\n",
"    const float *s = st + (u64)r * 4;\n",
"    float z = s[0] + logf(s[1]);\n",
"    lse[r] = z;\n",
"    logp[r] = s[3] - z;\n",
"    if (lsum) lsum[r] = s[2];\n",
"}\n",
"\n",
"// dlogits (rows, vc) bf16 = g (onehot(target) - softmax): the backward of a chunk. Grid (rows).\n",
"extern \"C\" __global__ void logprob_grad_chunk(bf16_t *dl, const float *logits, int vc, int v0, const int *targets,\n",
"                                              const float *g, const float *lse) {\n",
"    u64 row = blockIdx.x;\n",
"    const float *l = logits + row * vc;\n",
"    float gr = g[row], z = lse[row];\n",
"    int tg = targets[row] - v0;\n",
"    for (int v = threadIdx.x; v < vc; v += BLOCK) {\n",
"        float d = -gr * expf(l[v] - z);\n",
"        if (v == tg) d += gr;\n",
"        dl[row * vc + v] = f32_to_bf16(d);\n",
"    }\n",
"}\n",
"\n",
"// ---------------------------------------------------------------------------------------------\n",
"// Attention, flash style: causal GQA with padding, softmax in fp32, no T x T matrix in global\n",
"// memory. q (B, T, H, D), keys and values (B, S, K, D) (a KV cache, or the training k, v with\n",
"// S = T), query t at position pos0 + t sees keys j <= pos0 + t with j < lens[b].\n",
"// Tiles live in shared memory as fp32 rows padded to D + 1 floats (no bank conflicts when the\n",
"// threads of a warp read one column of 32 rows); the threads own fixed (row, key) pairs of the\n",
"// score tile and fixed (row, d) pairs of the output tile.\n",
"// ---------------------------------------------------------------------------------------------\n",
"\n",
"#define ATT_NT 256\n",
"#define ATT_DP (HEAD_DIM + 1)\n",
"#define ATT_FWD_SMEM (4 * (ATT_BQ * ATT_DP + ATT_BK * ATT_DP + ATT_BK * HEAD_DIM + ATT_BQ * (ATT_BK + 1) + 3 * ATT_BQ))\n",
"#define ATT_BWD_SMEM \\\n",
"    (4 * (2 * ATT_BWD_BK * ATT_DP + 2 * ATT_BWD_BQ * ATT_DP + 2 * ATT_BWD_BQ * (ATT_BWD_BK + 1) + 2 * ATT_BWD_BQ))\n",
"\n",
"static_assert(ATT_FWD_SMEM <= SMEM_BUDGET, \"attention_forward tiles exceed the shared memory budget\");\n",
"static_assert(ATT_BWD_SMEM <= SMEM_BUDGET, \"attention_backward tiles exceed the shared memory budget\");\n",
"static_assert(ATT_NT % ATT_BK == 0 && (ATT_BQ * ATT_BK) % ATT_NT == 0, \"forward score tile vs threads\");\n",
"static_assert(ATT_NT % ATT_BWD_BK == 0 && (ATT_BWD_BQ * ATT_BWD_BK) % ATT_NT == 0, \"backward score tile vs threads\");\n",
"static_assert(ATT_NT % ATT_BQ == 0 && ATT_NT / ATT_BQ <= 32, \"forward row statistics: threads per row\");\n",
"static_assert(HEAD_DIM % 2 == 0 && HEAD_DIM <= 256, \"HEAD_DIM\");\n",
"\n",
"// What the host reads with cuModuleGetGlobal: dynamic shared memory of the two attention kernels\n",
"// and their tiles (one formula, here).\n",
"extern \"C\" {\n",
"__constant__ int mb_kernel_params[6] = {ATT_FWD_SMEM, ATT_BWD_SMEM, ATT_BQ, ATT_BK, ATT_BWD_BQ, ATT_BWD_BK};\n",
"}\n",
"\n",
"// acc[i] += sum over j < nj of P[r_i][j] * X[j][d_i] for the (row, d) pairs p = tid + i * ATT_NT of\n",
"// a (nrows, HEAD_DIM) tile; P has row stride ldp, X row stride ldx.\n",
"template <int NROWS>\n",
"__device__ __forceinline__ void tile_pv(float *acc, const float *P, int ldp, const float *X, int ldx, int nj) {\n",
"    constexpr int PER = (NROWS * HEAD_DIM + ATT_NT - 1) / ATT_NT;\n",
"    const int tid = threadIdx.x;\n",
"    if constexpr (ATT_NT % HEAD_DIM == 0 && (NROWS * HEAD_DIM) % ATT_NT == 0) { // fixed d: X read once per j\n",
"        const int d = tid % HEAD_DIM, r0 = tid / HEAD_DIM;\n",
"        constexpr int RS = ATT_NT / HEAD_DIM;\n",
"        for (int j = 0; j < nj; j++) {\n",
"            float xv = X[j * ldx + d];\n",
"#pragma unroll\n",
"            for (int i = 0; i < PER; i++) acc[i] += P[(r0 + i * RS) * ldp + j] * xv;\n",
"        }\n",
"    } else {\n",
"#pragma unroll\n",
"        for (int i = 0; i < PER; i++) {\n",
"            int p = tid + i * ATT_NT;\n",
"            if (p >= NROWS * HEAD_DIM) break;\n",
"            int r = p / HEAD_DIM, d = p % HEAD_DIM;\n",
"            float s = 0.0f;\n",
"            for (int j = 0; j < nj; j++) s += P[r * ldp + j] * X[j * ldx + d];\n",
"            acc[i] += s;\n",
"        }\n",
"    }\n",
"}\n",
"\n",
"// The (row, key) pair of score i of this thread in a (NROWS, NKEYS) tile: key tid % NKEYS,\n",
"// row tid / NKEYS + i * (ATT_NT / NKEYS).\n",
"template <int NROWS, int NKEYS>\n",
"__device__ __forceinline__ void tile_dots(float *s, const float *A, const float *Bm) {\n",
"    constexpr int PER = NROWS * NKEYS / ATT_NT, RS = ATT_NT / NKEYS;\n",
"    const int j = threadIdx.x % NKEYS, r0 = threadIdx.x / NKEYS;\n",
"#pragma unroll\n",
"    for (int i = 0; i < PER; i++) s[i] = 0.0f;\n",
"    for (int d = 0; d < HEAD_DIM; d++) {\n",
"        float b = Bm[j * ATT_DP + d];\n",
"#pragma unroll\n",
"        for (int i = 0; i < PER; i++) s[i] += A[(r0 + i * RS) * ATT_DP + d] * b;\n",
"    }\n",
"}\n",
"\n",
"// out (B, T, H, D), lse (B, H, T) (may be null) = softmax(q k^T / sqrt(D) + mask) v.\n",
"// Grid (ceil(T / ATT_BQ), H, B), ATT_NT threads, ATT_FWD_SMEM bytes of dynamic shared memory.\n",
"extern \"C\" __global__ void __launch_bounds__(ATT_NT) attention_forward(bf16_t *out, float *lse, const bf16_t *q,\n",
"                                                                       const bf16_t *kc, const bf16_t *vc,\n",
"                                                                       const int *lens, int T, int S, int pos0,\n",
"                                                                       int H, int K) {\n",
"    DYNAMIC_SMEM(float, smem);\n",
"    float *Qs = smem, *Ks = Qs + ATT_BQ * ATT_DP, *Vs = Ks + ATT_BK * ATT_DP, *Ps = Vs + ATT_BK * HEAD_DIM;\n",
"    float *mrow = Ps + ATT_BQ * (ATT_BK + 1), *lrow = mrow + ATT_BQ, *arow = lrow + ATT_BQ;\n",
"    constexpr int SPER = ATT_BQ * ATT_BK / ATT_NT, SRS = ATT_NT / ATT_BK;\n",
"    constexpr int OPER = (ATT_BQ * HEAD_DIM + ATT_NT - 1) / ATT_NT;\n",
"    const int tid = threadIdx.x, b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * ATT_BQ, kh = h / (H / K);\n",
"    const int len = lens \? lens[b] : S, nq = imin(ATT_BQ, T - t0);\n",
"    const float scale = 1.0f / sqrtf((float)HEAD_DIM);\n",
"    for (int i = tid; i < ATT_BQ * HEAD_DIM; i += ATT_NT) {\n",
"        int r = i / HEAD_DIM, d = i % HEAD_DIM;\n",
"        Qs[r * ATT_DP + d] = r < nq \? bf16_to_f32(q[(((u64)b * T + t0 + r) * H + h) * HEAD_DIM + d]) : 0.0f;\n",
"    }\n",
"    for (int r = tid; r < ATT_BQ; r += ATT_NT) mrow[r] = NEG_INF, lrow[r] = 0.0f;\n",
"    float acc[OPER];\n",
"#pragma unroll\n",
"    for (int i = 0; i < OPER; i++) acc[i] = 0.0f;\n",
"    const int kend = imin(len, pos0 + t0 + nq); // keys [0, kend) are visible to some row of the tile\n",
"    __syncthreads();\n",
"    for (int j0 = 0; j0 < kend; j0 += ATT_BK) {\n",
"        const int nk = imin(ATT_BK, kend - j0);\n",
"        for (int i = tid; i < ATT_BK * HEAD_DIM; i += ATT_NT) {\n",
"            int j = i / HEAD_DIM, d = i % HEAD_DIM;\n",
"            u64 off = (((u64)b * S + j0 + j) * K + kh) * HEAD_DIM + d;\n",
"            Ks[j * ATT_DP + d] = j < nk \? bf16_to_f32(kc[off]) : 0.0f;\n",
"            Vs[j * HEAD_DIM + d] = j < nk \? bf16_to_f32(vc[off]) : 0.0f;\n",
"        }\n",
"        __syncthreads();\n",
"        float s[SPER];\n",
"        tile_dots<ATT_BQ, ATT_BK>(s, Qs, Ks);\n",
"        {\n",
"            const int j = tid % ATT_BK, r0 = tid / ATT_BK;\n",
"#pragma unroll\n",
"            for (int i = 0; i < SPER; i++) {\n",
"                int r = r0 + i * SRS;\n",
"                bool ok = r < nq && j < nk && j0 + j <= pos0 + t0 + r;\n",
"                Ps[r * (ATT_BK + 1) + j] = ok \? s[i] * scale : NEG_INF;\n",
"            }\n",
"        }\n",
"        __syncthreads();\n",
"        { // online softmax: ATT_NT / ATT_BQ adjacent lanes per row\n",
"            constexpr int RT = ATT_NT / ATT_BQ;\n",
"            const int r = tid / RT, sub = tid % RT;\n",
"            float *pr = Ps + r * (ATT_BK + 1);\n",
"            float mx = NEG_INF;\n",
"            for (int j = sub; j < ATT_BK; j += RT) mx = fmaxf(mx, pr[j]);\n",
"            for (int o = RT / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, o));\n",
"            float m_old = mrow[r], m_new = fmaxf(m_old, mx), sum = 0.0f;\n",
"            for (int j = sub; j < ATT_BK; j += RT) {\n",
"                float p = pr[j] == NEG_INF \? 0.0f : expf(pr[j] - m_new);\n",
"                pr[j] = p;\n",
"                sum += p;\n",
"            }\n",
"            for (int o = RT / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, o);\n",
"            __syncwarp();\n",
"            if (sub == 0) {\n",
"                float alpha = m_old == NEG_INF \? 0.0f : expf(m_old - m_new);\n",
"                arow[r] = alpha;\n",
"                lrow[r] = lrow[r] * alpha + sum;\n",
"                mrow[r] = m_new;\n",
"            }\n",
"        }\n",
"        __syncthreads();\n",
"#pragma unroll\n",
"        for (int i = 0; i < OPER; i++) {\n",
"            int p = tid + i * ATT_NT;\n",
"            if (p < ATT_BQ * HEAD_DIM) acc[i] *= arow[p / HEAD_DIM];\n",
"        }\n",
"        tile_pv<ATT_BQ>(acc, Ps, ATT_BK + 1, Vs, HEAD_DIM, nk);\n",
"        __syncthreads();\n",
"    }\n",
"#pragma unroll\n",
"    for (int i = 0; i < OPER; i++) {\n",
"        int p = tid + i * ATT_NT, r = p / HEAD_DIM, d = p % HEAD_DIM;\n",
"        if (p < ATT_BQ * HEAD_DIM && r < nq) {\n",
"            float l = lrow[r];\n",
"            out[(((u64)b * T + t0 + r) * H + h) * HEAD_DIM + d] = f32_to_bf16(l > 0.0f \? acc[i] / l : 0.0f);\n",
"        }\n",
"    }\n",
"    if (lse)\n",
"        for (int r = tid; r < nq; r += ATT_NT)\n",
"            lse[((u64)b * H + h) * T + t0 + r] = lrow[r] > 0.0f \? mrow[r] + logf(lrow[r]) : NEG_INF;\n",
"}\n",
"\n",
"// delta (B, H, T) = sum over d of dout * out (the softmax backward's row term). One warp per row.\n",
"extern \"C\" __global__ void attention_delta(float *delta, const bf16_t *dout, const bf16_t *out, int T, int H, u64 rows) {\n",
"    u64 row = (u64)blockIdx.x * (BLOCK / 32) + (threadIdx.x >> 5);\n",
"    if (row >= rows) return;\n",
"    int lane = threadIdx.x & 31;\n",
"    const bf16_t *o = out + row * HEAD_DIM, *g = dout + row * HEAD_DIM;\n",
"    float s = 0.0f;\n",
"    for (int d = lane; d < HEAD_DIM; d += 32) s += bf16_to_f32(g[d]) * bf16_to_f32(o[d]);\n",
"    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);\n",
"    u64 bt = row / H;\n",
"    int h = (int)(row % H), t = (int)(bt % T), b = (int)(bt / T);\n",
"    if (lane == 0) delta[((u64)b * H + h) * T + t] = s;\n",
"}\n",
"\n",
"// The backward of attention_forward (training: pos0 0, S = T). One block per (key tile, kv\n",
"// head, sequence): it owns dk and dv of its keys (GQA needs no atomics for them) and loops over\n",
"// the query heads of its group and the query tiles at or after its first key; dq (fp32, zeroed\n",
"// before) receives each tile's share with atomicAdd. Grid (ceil(T / ATT_BWD_BK), K, B).\n",
"extern \"C\" __global__ void __launch_bounds__(ATT_NT) attention_backward(float *dq, bf16_t *dk, bf16_t *dv,\n",
"                                                                        const bf16_t *dout, const bf16_t *q,\n",
"                                                                        const bf16_t *k, const bf16_t *v,\n",
"                                                                        const float *lse, const float *delta,\n",
"                                                                        const int *lens, int T, int H, int K) {\n",
"    DYNAMIC_SMEM(float, smem);\n",
"    constexpr int BQ = ATT_BWD_BQ, BK = ATT_BWD_BK, LDP = BK + 1;\n",
"    float *Ks = smem, *Vs = Ks + BK * ATT_DP, *Qs = Vs + BK * ATT_DP, *Ds = Qs + BQ * ATT_DP;\n",
"    float *Ps = Ds + BQ * ATT_DP, *Ss = Ps + BQ * LDP, *lse_s = Ss + BQ * LDP, *dl_s = lse_s + BQ;\n",
"    constexpr int SPER = BQ * BK / ATT_NT, SRS = ATT_NT / BK;\n",
"    constexpr int KPER = (BK * HEAD_DIM + ATT_NT - 1) / ATT_NT, QPER = (BQ * HEAD_DIM + ATT_NT - 1) / ATT_NT;\n",
"    const int tid = threadIdx.x, b = blockIdx.z, kh = blockIdx.y, j0 = blockIdx.x * BK, group = H / K;\n",
"    const int len = lens \? lens[b] : T, nk = imin(BK, T - j0);\n",
"    const float scale = 1.0f / sqrtf((float)HEAD_DIM);\n",
"    for (int i = tid; i < BK * HEAD_DIM; i += ATT_NT) {\n",
"        int j = i / HEAD_DIM, d = i % HEAD_DIM;\n",
"        u64 off = (((u64)b * T + j0 + j) * K + kh) * HEAD_DIM + d;\n",
"        Ks[j * ATT_DP + d] = j < nk \? bf16_to_f32(k[off]) : 0.0f;\n",
"        Vs[j * ATT_DP + d] = j < nk \? bf16_to_f32(v[off]) : 0.0f;\n",
"    }\n",
"    float dka[KPER], dva[KPER];\n",
"#pragma unroll\n",
"    for (int i = 0; i < KPER; i++) dka[i] = 0.0f, dva[i] = 0.0f;\n",
"    for (int h = kh * group; j0 < len && h < (kh + 1) * group; h++) {\n",
"        for (int t0 = j0 / BQ * BQ; t0 < T; t0 += BQ) {\n",
"            const int nq = imin(BQ, T - t0);\n",
"            __syncthreads(); // the previous tile's readers are done\n",
"            for (int i = tid; i < BQ * HEAD_DIM; i += ATT_NT) {\n",
"                int r = i / HEAD_DIM, d = i % HEAD_DIM;\n",
"                u64 off = (((u64)b * T + t0 + r) * H + h) * HEAD_DIM + d;\n",
"                Qs[r * ATT_DP + d] = r < nq \? bf16_to_f32(q[off]) : 0.0f;\n",
"                Ds[r * ATT_DP + d] = r < nq \? bf16_to_f32(dout[off]) : 0.0f;\n",
"            }\n",
"            for (int r = tid; r < BQ; r += ATT_NT) {\n",
"                lse_s[r] = r < nq \? lse[((u64)b * H + h) * T + t0 + r] : 0.0f;\n",
"                dl_s[r] = r < nq \? delta[((u64)b * H + h) * T + t0 + r] : 0.0f;\n",
"            }\n",
"            __syncthreads();\n",
"            float s[SPER], dp[SPER];\n",
"            tile_dots<BQ, BK>(s, Qs, Ks);\n",
"            tile_dots<BQ, BK>(dp, Ds, Vs);\n",
"            {\n",
"                const int j = tid % BK, r0 = tid / BK;\n",
"#pragma unroll\n",
"                for (int i = 0; i < SPER; i++) {\n",
"                    int r = r0 + i * SRS, ta = t0 + r, ja = j0 + j;\n",
"                    bool ok = r < nq && j < nk && ja <= ta && ja < len;\n",
"                    float p = ok \? expf(s[i] * scale - lse_s[r]) : 0.0f;\n",
"                    Ps[r * LDP + j] = p;\n",
"                    Ss[r * LDP + j] = p * (dp[i] - dl_s[r]) * scale;\n",
"                }\n",
"            }\n",
"            __syncthreads();\n",
"            // dv (j, d) += sum_r P[r][j] dout[r][d]; dk (j, d) += sum_r dS[r][j] q[r][d]\n",
"#pragma unroll\n",
"            for (int i = 0; i < KPER; i++) {\n",
"                int p = tid + i * ATT_NT;\n",
"                if (p >= BK * HEAD_DIM) break;\n",
"                int j = p / HEAD_DIM, d = p % HEAD_DIM;\n",
"                float sv = 0.0f, sk = 0.0f;\n",
"                for (int r = 0; r < nq; r++) {\n",
"                    sv += Ps[r * LDP + j] * Ds[r * ATT_DP + d];\n",
"                    sk += Ss[r * LDP + j] * Qs[r * ATT_DP + d];\n",
"                }\n",
"                dva[i] += sv, dka[i] += sk;\n",
"            }\n",
"            // dq (r, d) += sum_j dS[r][j] k[j][d]\n",
"            float dqa[QPER];\n",
"#pragma unroll\n",
"            for (int i = 0; i < QPER; i++) dqa[i] = 0.0f;\n",
"            tile_pv<BQ>(dqa, Ss, LDP, Ks, ATT_DP, nk);\n",
"#pragma unroll\n",
"            for (int i = 0; i < QPER; i++) {\n",
"                int p = tid + i * ATT_NT, r = p / HEAD_DIM, d = p % HEAD_DIM;\n",
"                if (p < BQ * HEAD_DIM && r < nq && dqa[i] != 0.0f)\n",
"                    atomicAdd(&dq[(((u64)b * T + t0 + r) * H + h) * HEAD_DIM + d], dqa[i]);\n",
"            }\n",
"        }\n",
"    }\n",
"#pragma unroll\n",
"    for (int i = 0; i < KPER; i++) {\n",
"        int p = tid + i * ATT_NT, j = p / HEAD_DIM, d = p % HEAD_DIM;\n",
"        if (p < BK * HEAD_DIM && j < nk) {\n",
"            u64 off = (((u64)b * T + j0 + j) * K + kh) * HEAD_DIM + d;\n",
"            dk[off] = f32_to_bf16(dka[i]);\n",
"            dv[off] = f32_to_bf16(dva[i]);\n",
"        }\n",
"    }\n",
"}\n"};
static const MbKernelSource *mb_kernel_source(void) {
    static const MbKernelSource k = {mb_kernels_src_lines, MB_KERNELS_LINES, MB_KERNELS_BYTES, MB_KERNELS_HASH,
                                     mb_kernel_specs, MB_KERNEL_N_SPECS, mb_kernel_spec_common};
    return &k;
}
/* END kernels */

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
static MbUniTable mb_uni_table(void) {
    MbUniTable t = {mb_uni_starts, sizeof mb_uni_starts / sizeof *mb_uni_starts, mb_uni_ascii};
    return t;
}
/* END unicode table */
