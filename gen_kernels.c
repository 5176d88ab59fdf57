/* gen_kernels.c: build-time tool for medbot's CUDA kernels.
 *
 *   gen_kernels kernels.cu.in medbot.c
 *       writes the kernel source into the generated appendix at the end of medbot.c (between
 *       "BEGIN kernels" and "END kernels"): the text (one string literal per line), its FNV-1a
 *       64-bit hash (medbot's on-disk kernel cache is keyed by it) and the specialization table
 *       (the "// spec:" rows of the source, and its "// spec-common:" options): the one table
 *       both medbot.c (which row to compile for a device and a model) and --check use. medbot.c
 *       is rewritten (temporary file + rename) only when the block changes.
 *   gen_kernels --stale kernels.cu.in medbot.c
 *       exits 1, saying so, when the appendix does not hold the current kernels.cu.in.
 *   gen_kernels --check [--src kernels.cu.in] [-j N] ARCH...      (e.g. sm_80 sm_90)
 *       lists the table, compiles every row through NVRTC for each architecture (no GPU needed;
 *       N compiles at a time in child processes) and reports registers, shared memory and
 *       spills from ptxas, then the heaviest kernels.
 *       Needs the build with -DMB_HAVE_NVRTC (build.sh does that when the CUDA toolkit is found).
 *
 * C99; nothing here is part of the medbot binary.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifdef MB_HAVE_NVRTC
#include <nvrtc.h>
#endif

#define MAX_SPECS 64
#define MAX_LINE 512

typedef struct {
    char common[MAX_LINE];      /* "-DBLOCK=256 -DSEQ_LEN=512 -DNF4_BLOCK=64" */
    char row[MAX_SPECS][MAX_LINE];
    int n;
} SpecTable;

static char *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "gen_kernels: %s: cannot open\n", path);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while (buf && (got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            char *nb = realloc(buf, 2 * cap + 1);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
    }
    fclose(f);
    if (!buf) {
        fprintf(stderr, "gen_kernels: %s: out of memory\n", path);
        return NULL;
    }
    buf[len] = 0;
    *n = len;
    return buf;
}

static uint64_t fnv1a64(const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    return h;
}

/* "NAME=V NAME=V" after a tag -> "-DNAME=V -DNAME=V" */
static int spec_options(const char *p, char *out, size_t cap) {
    size_t k = 0;
    out[0] = 0;
    while (*p && *p != '\n') {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p || *p == '\n' || *p == '\r') break;
        const char *e = p;
        while (*e && *e != ' ' && *e != '\t' && *e != '\n' && *e != '\r') e++;
        if (!memchr(p, '=', (size_t)(e - p))) return 0;
        int w = snprintf(out + k, cap - k, "%s-D%.*s", k ? " " : "", (int)(e - p), p);
        if (w < 0 || (size_t)w >= cap - k) return 0;
        k += (size_t)w;
        p = e;
    }
    return k > 0;
}

/* The "// spec:" rows and the "// spec-common:" line of the source. */
static int parse_specs(const char *src, const char *path, SpecTable *t) {
    memset(t, 0, sizeof *t);
    int line = 1;
    for (const char *p = src; *p; line++) {
        const char *nl = strchr(p, '\n');
        if (!strncmp(p, "// spec:", 8) || !strncmp(p, "// spec-common:", 15)) {
            int common = p[7] == '-';
            char *dst = common ? t->common : (t->n < MAX_SPECS ? t->row[t->n] : NULL);
            if (!dst || !spec_options(p + (common ? 15 : 8), dst, MAX_LINE)) {
                fprintf(stderr, "gen_kernels: %s:%d: a spec line is NAME=VALUE words (at most %d rows)\n", path, line,
                        MAX_SPECS);
                return 0;
            }
            if (!common) t->n++;
        }
        if (!nl) break;
        p = nl + 1;
    }
    if (!t->n || !t->common[0]) {
        fprintf(stderr, "gen_kernels: %s: no \"// spec:\" rows or no \"// spec-common:\" line\n", path);
        return 0;
    }
    return 1;
}

/* A growing text buffer */
typedef struct {
    char *p;
    size_t n, cap;
    int oom;
} Buf;

static void put(Buf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int w = b->oom ? 0 : vsnprintf(b->p ? b->p + b->n : NULL, b->p ? b->cap - b->n : 0, fmt, ap);
        va_end(ap);
        if (b->oom || w < 0) {
            b->oom = 1;
            return;
        }
        if (b->p && (size_t)w < b->cap - b->n) {
            b->n += (size_t)w;
            return;
        }
        size_t cap = b->cap ? b->cap : 1 << 16;
        while (cap - b->n <= (size_t)w) cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np, b->cap = cap;
    }
}

#define BLOCK_BEGIN "/* BEGIN kernels: generated by gen_kernels from kernels.cu.in"
#define BLOCK_END "/* END kernels */"

/* The appendix block for the source src (n bytes, read from path in): the hash, the
 * specialization table, the text (one string literal per line: C99 compilers need not take
 * literals over 4095 bytes) and mb_kernel_source(), through which medbot.c reads them. */
static int make_block(const char *src, size_t n, const char *in, Buf *b) {
    SpecTable t;
    if (!parse_specs(src, in, &t)) return 0;
    put(b, "%s; refresh: ./build.sh kernels */\n", BLOCK_BEGIN);
    put(b, "#define MB_KERNELS_HASH \"%016llx\"\n", (unsigned long long)fnv1a64(src, n));
    put(b, "/* the specialization table: -D options of each row, and those every row gets */\n");
    put(b, "#define MB_KERNEL_N_SPECS %d\n", t.n);
    put(b, "static const char *const mb_kernel_specs[MB_KERNEL_N_SPECS] = {\n");
    for (int i = 0; i < t.n; i++) put(b, "    \"%s\",\n", t.row[i]);
    put(b, "};\nstatic const char mb_kernel_spec_common[] = \"%s\";\n", t.common);
    size_t lines = 0;
    for (size_t i = 0; i < n; i++) lines += src[i] == '\n';
    if (n && src[n - 1] != '\n') lines++;
    put(b, "#define MB_KERNELS_BYTES %zu\n#define MB_KERNELS_LINES %zu\n", n, lines);
    put(b, "static const char *const mb_kernels_src_lines[MB_KERNELS_LINES] = {\n\"");
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)src[i];
        if (c == '\n') put(b, "\\n\"%s", i + 1 < n ? ",\n\"" : "");
        else if (c == '"' || c == '\\') put(b, "\\%c", c);
        else if (c == '?') put(b, "\\?"); /* no trigraphs */
        else if (c < 0x20 || c >= 0x7F) put(b, "\\%03o", c);
        else put(b, "%c", c);
    }
    put(b, "%s};\n", n && src[n - 1] != '\n' ? "\"" : "");
    put(b, "static const MbKernelSource *mb_kernel_source(void) {\n"
           "    static const MbKernelSource k = {mb_kernels_src_lines, MB_KERNELS_LINES, MB_KERNELS_BYTES, MB_KERNELS_HASH,\n"
           "                                     mb_kernel_specs, MB_KERNEL_N_SPECS, mb_kernel_spec_common};\n"
           "    return &k;\n}\n");
    put(b, "%s", BLOCK_END);
    return !b->oom;
}

/* Writes kernels.cu.in into the appendix of medbot.c (between BLOCK_BEGIN and BLOCK_END), through
 * a temporary file and a rename, and leaves the file untouched when it is already current. With
 * check_only, changes nothing and returns 1 when the block is stale. */
static int embed(const char *in, const char *target, int check_only) {
    size_t n, tn;
    char *src = read_all(in, &n), *dst = src ? read_all(target, &tn) : NULL;
    Buf b = {0};
    int rc = 1;
    if (!src || !dst) goto done;
    char *s = strstr(dst, BLOCK_BEGIN), *e = s ? strstr(s, BLOCK_END) : NULL;
    if (!s || !e) {
        fprintf(stderr, "gen_kernels: %s: no \"%s ... %s\" block\n", target, BLOCK_BEGIN, BLOCK_END);
        goto done;
    }
    e += strlen(BLOCK_END);
    if (!make_block(src, n, in, &b)) {
        if (b.oom) fprintf(stderr, "gen_kernels: out of memory\n");
        goto done;
    }
    if ((size_t)(e - s) == b.n && !memcmp(s, b.p, b.n)) {
        rc = 0;
        goto done;
    }
    if (check_only) {
        fprintf(stderr, "gen_kernels: the appendix of %s is stale (%s changed) --> ./build.sh kernels\n", target, in);
        goto done;
    }
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", target);
    FILE *f = fopen(tmp, "wb");
    if (!f) {
        fprintf(stderr, "gen_kernels: %s: cannot create\n", tmp);
        goto done;
    }
    fwrite(dst, 1, (size_t)(s - dst), f);
    fwrite(b.p, 1, b.n, f);
    fwrite(e, 1, tn - (size_t)(e - dst), f);
    int bad = ferror(f);
    if (fclose(f) != 0 || bad || rename(tmp, target) != 0) {
        fprintf(stderr, "gen_kernels: %s: write failed\n", target);
        remove(tmp);
        goto done;
    }
    printf("gen_kernels: refreshed the appendix of %s from %s\n", target, in);
    rc = 0;
done:
    free(b.p), free(src), free(dst);
    return rc;
}

#ifdef MB_HAVE_NVRTC
typedef struct {
    char kernel[96], arch[16];
    int spec, regs, smem, spill;
} Heavy;

static void heavy_set(Heavy *h, const char *kernel, const char *arch, int spec, int regs, int smem, int spill) {
    snprintf(h->kernel, sizeof h->kernel, "%s", kernel);
    snprintf(h->arch, sizeof h->arch, "%s", arch);
    h->spec = spec, h->regs = regs, h->smem = smem, h->spill = spill;
}

/* Splits "-DA=1 -DB=2" into opts (pointers into buf). */
static int split_opts(char *buf, const char **opts, int max) {
    int n = 0;
    for (char *tok = strtok(buf, " "); tok && n < max; tok = strtok(NULL, " ")) opts[n++] = tok;
    return n;
}

/* Compiles src for arch with one row of the table; prints ptxas' resource lines; remembers the
 * kernel with the most registers and the one with the most shared memory. */
static int check_one(const char *src, const char *arch, const SpecTable *t, int s, Heavy *regs, Heavy *smem) {
    nvrtcProgram prog;
    if (nvrtcCreateProgram(&prog, src, "kernels.cu", 0, NULL, NULL) != NVRTC_SUCCESS) {
        fprintf(stderr, "gen_kernels: nvrtcCreateProgram failed\n");
        return 1;
    }
    char archopt[64], row[MAX_LINE], common[MAX_LINE];
    snprintf(archopt, sizeof archopt, "--gpu-architecture=%s", arch);
    snprintf(row, sizeof row, "%s", t->row[s]);
    snprintf(common, sizeof common, "%s", t->common);
    const char *opts[40] = {archopt, "--std=c++17", "--ptxas-options=-v"};
    int n = 3;
    n += split_opts(common, opts + n, 16);
    n += split_opts(row, opts + n, 16);
    nvrtcResult r = nvrtcCompileProgram(prog, n, opts);
    size_t logn = 0;
    nvrtcGetProgramLogSize(prog, &logn);
    char *log = malloc(logn + 1);
    if (log) {
        nvrtcGetProgramLog(prog, log);
        log[logn] = 0;
    }
    int bad = r != NVRTC_SUCCESS;
    size_t cubin = 0;
    if (!bad && nvrtcGetCUBINSize(prog, &cubin) != NVRTC_SUCCESS) bad = 1;
    printf("%-6s spec %d (%s): %s (%zu-byte cubin)\n", arch, s, t->row[s], bad ? "FAILED" : "ok", cubin);
    if (log) {
        /* ptxas -v: "Compiling entry function 'x' for 'sm_90'", "N bytes stack frame, N bytes spill
         * stores, N bytes spill loads", "Used N registers, ... N bytes smem, ..." */
        char kernel[96] = "?";
        int spill = 0;
        for (char *line = strtok(log, "\n"); line; line = strtok(NULL, "\n")) {
            char *q = strstr(line, "entry function '");
            if (q) {
                snprintf(kernel, sizeof kernel, "%s", q + 16);
                char *end = strchr(kernel, '\'');
                if (end) *end = 0;
                spill = 0;
            } else if ((q = strstr(line, "bytes spill stores"))) {
                char *c = strchr(line, ',');
                spill = c ? atoi(c + 1) : 0;
            } else if ((q = strstr(line, "Used "))) {
                int nr = atoi(q + 5), sm = 0;
                char *sp = strstr(q, "bytes smem");
                if (sp) {
                    char *b = sp;
                    while (b > q && b[-1] == ' ') b--;
                    while (b > q && b[-1] >= '0' && b[-1] <= '9') b--;
                    sm = atoi(b);
                }
                printf("    %-20s %s%s\n", kernel, q, spill ? "  (SPILLS)" : "");
                if (nr > regs->regs) heavy_set(regs, kernel, arch, s, nr, sm, spill);
                if (sm > smem->smem) heavy_set(smem, kernel, arch, s, nr, sm, spill);
            } else if (bad) {
                printf("    %s\n", line);
            }
        }
        free(log);
    }
    nvrtcDestroyProgram(&prog);
    return bad;
}
#endif

#ifdef MB_HAVE_NVRTC
static void task_file(char *buf, size_t cap, int t) {
    const char *tmp = getenv("TMPDIR");
    snprintf(buf, cap, "%s/gen_kernels-%ld-%d.txt", tmp && tmp[0] ? tmp : "/tmp", (long)getpid(), t);
}

/* Child t: compiles one (architecture, row) pair with its report in a file; the heaviest kernels
 * go in "#heavy" lines at its end. */
static int check_task(const char *src, char **archs, const SpecTable *t, int task, const char *file) {
    if (!freopen(file, "w", stdout)) return 1;
    Heavy regs = {"", "", 0, 0, 0, 0}, smem = regs;
    int bad = check_one(src, archs[task / t->n], t, task % t->n, &regs, &smem);
    printf("#heavy %d %d %d %s %s\n#heavy %d %d %d %s %s\n", regs.regs, regs.smem, regs.spec, regs.arch,
           regs.kernel[0] ? regs.kernel : "-", smem.regs, smem.smem, smem.spec, smem.arch,
           smem.kernel[0] ? smem.kernel : "-");
    fflush(stdout);
    return bad;
}
#endif

static int check(const char *src_path, int jobs, int narch, char **archs) {
#ifdef MB_HAVE_NVRTC
    size_t n;
    char *src = read_all(src_path, &n);
    if (!src) return 1;
    SpecTable t;
    if (!parse_specs(src, src_path, &t)) {
        free(src);
        return 1;
    }
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    printf("NVRTC %d.%d, %s (%016llx)\nspecializations (every row also gets %s):\n", major, minor, src_path,
           (unsigned long long)fnv1a64(src, n), t.common);
    for (int s = 0; s < t.n; s++) printf("  spec %d: %s\n", s, t.row[s]);
    fflush(stdout);
    int total = narch * t.n, failed = 0, running = 0, next = 0;
    pid_t *pid = calloc((size_t)total, sizeof *pid);
    int *status = calloc((size_t)total, sizeof *status);
    while (next < total || running > 0) { /* at most `jobs` children at a time */
        if (next < total && running < jobs) {
            char file[512];
            task_file(file, sizeof file, next);
            pid_t p = fork();
            if (p == 0) _exit(check_task(src, archs, &t, next, file));
            if (p < 0) status[next] = 1;
            else pid[next] = p, running++;
            next++;
            continue;
        }
        int st;
        pid_t done = wait(&st);
        if (done < 0) break;
        for (int k = 0; k < total; k++)
            if (pid[k] == done) status[k] = !WIFEXITED(st) || WEXITSTATUS(st) != 0, running--;
    }
    Heavy regs = {"", "", 0, 0, 0, 0}, smem = regs;
    for (int k = 0; k < total; k++) { /* the reports in table order */
        char file[512], line[1024];
        task_file(file, sizeof file, k);
        FILE *f = fopen(file, "r");
        if (!f) {
            printf("%s spec %d: no report (the compile crashed)\n", archs[k / t.n], k % t.n);
            failed++;
            continue;
        }
        while (fgets(line, sizeof line, f)) {
            Heavy h = {"", "", 0, 0, 0, 0};
            if (sscanf(line, "#heavy %d %d %d %15s %95s", &h.regs, &h.smem, &h.spec, h.arch, h.kernel) == 5) {
                if (h.regs > regs.regs) regs = h;
                if (h.smem > smem.smem) smem = h;
            } else {
                fputs(line, stdout);
            }
        }
        fclose(f);
        remove(file);
        failed += status[k] != 0;
    }
    /* dynamic shared memory is not in ptxas' count: the attention kernels' tiles are */
    printf("most registers: %s, %d registers (%s, spec %d)\n", regs.kernel, regs.regs, regs.arch, regs.spec);
    printf("most static shared memory: %s, %d bytes (%s, spec %d); the attention kernels' tiles are dynamic "
           "(ATT_*_SMEM <= SMEM_BUDGET, checked at compile time)\n", smem.kernel, smem.smem, smem.arch, smem.spec);
    printf("%d of %d specializations compiled (%d rows x %d architectures)\n", total - failed, total, t.n, narch);
    free(pid), free(status), free(src);
    return failed ? 1 : 0;
#else
    (void)src_path, (void)jobs, (void)narch, (void)archs;
    fprintf(stderr, "gen_kernels: built without NVRTC --> install the CUDA toolkit and rerun ./build.sh\n");
    return 2;
#endif
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "--check")) {
        const char *src = "kernels.cu.in";
        int i = 2, jobs = 1;
        for (;;) {
            if (i + 1 < argc && !strcmp(argv[i], "--src")) src = argv[i + 1], i += 2;
            else if (i + 1 < argc && !strcmp(argv[i], "-j")) jobs = atoi(argv[i + 1]), i += 2;
            else break;
        }
        if (i >= argc || jobs < 1) {
            fprintf(stderr, "usage: gen_kernels --check [--src kernels.cu.in] [-j N] ARCH... (e.g. sm_80 sm_90)\n");
            return 2;
        }
        return check(src, jobs, argc - i, argv + i);
    }
    int stale = argc == 4 && !strcmp(argv[1], "--stale");
    if (argc != 3 && !stale) {
        fprintf(stderr, "usage: gen_kernels [--stale] kernels.cu.in medbot.c | gen_kernels --check ARCH...\n");
        return 2;
    }
    return embed(argv[1 + stale], argv[2 + stale], stale);
}
