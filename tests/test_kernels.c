/* tests/test_kernels.c: the CUDA backend as far as a machine without a GPU can check it.
 *  - medbot.c's appendix holds the current kernels.cu.in and its specialization table;
 *  - every specialization compiles through NVRTC for sm_80, sm_86, sm_89 and sm_90 (gen_kernels);
 *  - the runtime's own compile path (the dlopen'd NVRTC, the options medbot builds, a cubin for an
 *    exact architecture, PTX for one NVRTC does not know) yields every kernel and parameter block;
 *  - the function-pointer tables medbot dlopens match the toolkit's headers (a compile with
 *    -DMB_CUDA_HEADER_CHECK -Werror) and resolve in the toolkit's libraries (NVRTC, cuBLASLt,
 *    NCCL, and the driver API's stub);
 *  - the GPU programs (tests/gpu/check_ops.c, bench_gpu.c) build warning-free, and the benchmark's
 *    code runs on the CPU backend.
 * Runs where build.sh found the CUDA toolkit (MB_HAVE_NVRTC=1); CI sets MB_EXPECT_CUDA=1 so a
 * missing toolkit there is a failure, not a skip. */
#include "test.h"

/* memmem is not C99 or POSIX */
static int has_bytes(const char *hay, size_t n, const char *needle, size_t k) {
    for (size_t i = 0; i + k <= n; i++)
        if (!memcmp(hay + i, needle, k)) return 1;
    return 0;
}

static int toolkit(void) {
    const char *have = getenv("MB_HAVE_NVRTC"), *expect = getenv("MB_EXPECT_CUDA"), *dir = getenv("MB_CUDA_DIR");
    if (have && !strcmp(have, "1") && dir && dir[0]) return 1;
    if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_CUDA=1 but build.sh found no CUDA toolkit");
    else printf("    no CUDA toolkit found by build.sh: not run on this machine\n");
    return 0;
}

/* medbot.c's appendix holds the current kernels.cu.in: the hash, the text and the table rows */
static void appendix_embeds_current_source(void) {
    char *src;
    size_t n;
    CHECK_OK(mb_read_file("kernels.cu.in", &src, &n));
    if (!src) return;
    const MbKernelSource *k = mb_kernel_source();
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)src[i]) * 0x100000001b3ull;
    char want[32];
    snprintf(want, sizeof want, "%016llx", (unsigned long long)h);
    const char *fix = "kernels.cu.in changed: medbot.c's appendix is stale --> ./build.sh kernels";
    CHECK(!strcmp(k->hash, want), "hash %s, want %s: %s", k->hash, want, fix);
    char *joined = kernels_source();
    CHECK(n == k->bytes && !strcmp(joined, src), "the embedded source differs from kernels.cu.in: %s", fix);
    int rows = 0;
    for (const char *p = src; (p = strstr(p, "\n// spec:")); p++) rows++;
    CHECK(rows == k->n_specs, "kernels.cu.in has %d spec rows, the appendix %d: %s", rows, k->n_specs, fix);
    printf("    %zu bytes, hash %s, %d specializations (+ %s)\n", n, k->hash, k->n_specs, k->spec_common);
    /* gen_kernels' own check, the one build.sh runs */
    int rc = system("build/gen_kernels --stale kernels.cu.in medbot.c");
    CHECK(rc == 0, "build/gen_kernels --stale kernels.cu.in medbot.c: exit %d", rc);
    /* and it notices a changed source */
    const char *tmp = "build/kernels_changed.cu.in";
    FILE *f = fopen(tmp, "wb");
    if (f) {
        fwrite(src, 1, n, f);
        fputs("// one more line\n", f);
        fclose(f);
        rc = system("build/gen_kernels --stale build/kernels_changed.cu.in medbot.c 2>build/kernels_changed.log");
        char *log = NULL;
        size_t ln = 0;
        mb_read_file("build/kernels_changed.log", &log, &ln);
        CHECK(rc != 0 && log && strstr(log, "stale") && strstr(log, "./build.sh kernels"),
              "a changed kernels.cu.in is not reported stale (exit %d): %s", rc, log ? log : "");
        free(log);
        remove(tmp);
    }
    free(joined);
    free(src);
}

/* The row the runtime picks for a head dim and a device's shared-memory limit */
static void specialization_choice(void) {
    struct {
        int D;
        size_t optin;
        long budget; /* of the chosen row; -1: none */
        const char *device;
    } cases[] = {{128, 232448, 166912, "H100 (sm_90, 227 KiB)"}, {128, 166912, 166912, "A100 (sm_80, 163 KiB)"},
                 {128, 101376, 101376, "RTX 4090 (sm_89, 99 KiB)"}, {64, 232448, 101376, "H100, Llama-3.2-1B"},
                 {16, 101376, 101376, "the test models"}, {96, 232448, -1, "head_dim 96"},
                 {128, 49152, -1, "48 KiB of shared memory"}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        int s = spec_choose(cases[i].D, cases[i].optin);
        long budget = s < 0 ? -1 : spec_value(mb_kernel_specs[s], "SMEM_BUDGET");
        printf("    D=%-3d %-28s -> %s\n", cases[i].D, cases[i].device, s < 0 ? "none (CPU)" : mb_kernel_specs[s]);
        CHECK(budget == cases[i].budget, "D=%d optin %zu: budget %ld, want %ld", cases[i].D, cases[i].optin, budget,
              cases[i].budget);
        if (s >= 0) CHECK(spec_value(mb_kernel_specs[s], "HEAD_DIM") == cases[i].D, "row for the wrong head dim");
    }
    char dims[128];
    spec_head_dims(dims, sizeof dims);
    CHECK(!strcmp(dims, "128, 64, 24, 16, 12"), "head dims %s", dims);
}

static void nvrtc_compiles_every_specialization(void) {
    if (!toolkit()) return;
    static char out[1 << 20];
    int rc = t_run("build/gen_kernels --check -j 2 sm_80 sm_86 sm_89 sm_90", out, sizeof out);
    const char *p, *last = out, *regs = strstr(out, "most registers:");
    for (p = out; *p; p++)
        if (*p == '\n' && p[1]) last = p + 1;
    if (regs) printf("    %.*s", (int)(strchr(regs, '\n') ? strchr(regs, '\n') - regs + 1 : 0), regs);
    printf("    %s", last);
    CHECK(rc == 0, "gen_kernels --check failed (exit %d):\n%s", rc, out);
    CHECK(strstr(out, "specializations compiled") && !strstr(out, "FAILED") && !strstr(out, "SPILLS"), "%s", out);
}

/* medbot's own path: NVRTC loaded with dlopen, the options cuda_kernels_load builds */
static void runtime_compile_yields_every_kernel(void) {
    if (!toolkit()) return;
    if (t_sanitized()) { /* NVRTC's own allocations are not ours to account for */
        printf("    not run under the sanitizers\n");
        return;
    }
    pthread_once(&mb_nvrtc_once, cuda_nvrtc_load); /* no driver here: the version filter is off */
    CHECK(mb_cuda_libs.nvrtc_status == MB_OK, "%s", mb_cuda_libs.nvrtc_err);
    if (mb_cuda_libs.nvrtc_status) return;
    printf("    %s: NVRTC %d.%d\n", mb_cuda_libs.nvrtc_dl.path, mb_cuda_libs.nvrtc_major, mb_cuda_libs.nvrtc_minor);
    int ccs[2] = {90, 999}; /* an exact architecture; one newer than NVRTC knows (PTX for the driver) */
    for (int k = 0; k < 2; k++) {
        char arch[32], options[1024];
        int ptx = -1;
        CHECK_OK(kernels_target(ccs[k], arch, sizeof arch, &ptx));
        CHECK(ptx == (k == 1), "cc %d: ptx %d", ccs[k], ptx);
        int spec = spec_choose(128, 232448);
        snprintf(options, sizeof options, "--gpu-architecture=%s --std=c++17 %s %s", arch, mb_kernel_spec_common,
                 mb_kernel_specs[spec]);
        char *image = NULL;
        size_t n = 0;
        double t0 = mb_now();
        CHECK_OK(kernels_compile(options, &image, &n, ptx));
        if (!image) continue;
        int missing = 0;
        for (int f = 0; f < K_COUNT; f++) /* names are in the cubin's symbol table and the PTX text */
            if (!has_bytes(image, n, mb_kernel_names[f], strlen(mb_kernel_names[f]))) {
                missing++;
                T_FAIL("%s lacks %s", arch, mb_kernel_names[f]);
            }
        CHECK(has_bytes(image, n, "mb_kernel_params", 16), "%s lacks mb_kernel_params", arch);
        if (ptx) CHECK(has_bytes(image, n, ".entry attention_forward", 24), "not PTX");
        else CHECK(n > 4 && !memcmp(image, "\177ELF", 4), "not an ELF cubin");
        printf("    %-12s %s: %zu bytes, %d kernels, %.1f s\n", arch, ptx ? "PTX (the driver compiles it)" : "cubin", n,
               K_COUNT - missing, mb_now() - t0);
        free(image);
    }
    /* the cache folder: MEDBOT_CACHE_DIR wins */
    char dir[512];
    setenv("MEDBOT_CACHE_DIR", "build", 1);
    kernel_cache_dir(dir, sizeof dir);
    CHECK(!strcmp(dir, "build"), "cache dir %s", dir);
    unsetenv("MEDBOT_CACHE_DIR");
}

/* -DMB_CUDA_HEADER_CHECK: every function pointer type takes the real function and every number
 * and struct layout is the headers' (compile errors under -Werror otherwise) */
static void declarations_match_the_toolkit_headers(void) {
    if (!toolkit()) return;
    const char *cuda = getenv("MB_CUDA_DIR");
    char cmd[2048];
    static char out[1 << 16];
    snprintf(cmd, sizeof cmd, "%s -std=c99 -Wall -Wextra -Wpedantic -Werror -O1 -DMEDBOT_NO_MAIN -DMB_CUDA_HEADER_CHECK %s "
             "-isystem %s/include -c -o build/cuda_header_check.o medbot.c", t_cc(), t_stb_include(), cuda);
    int rc = t_run(cmd, out, sizeof out);
    printf("    %s\n    -> exit %d%s%.2000s\n", cmd, rc, out[0] ? ": " : "", out);
    CHECK(rc == 0, "medbot's CUDA declarations differ from the toolkit's headers");
}

/* every symbol of each table is in the library medbot would load */
static void tables_resolve_in_the_toolkit_libraries(void) {
    if (!toolkit()) return;
    if (t_sanitized()) {
        printf("    not run under the sanitizers\n");
        return;
    }
    const char *lib = getenv("MB_CUDA_LIB"), *cuda = getenv("MB_CUDA_DIR");
    struct {
        const char *file;
        const MbSym *syms;
        size_t n, size;
    } libs[] = {{"libnvrtc.so", mb_nvrtc_syms, sizeof mb_nvrtc_syms / sizeof *mb_nvrtc_syms, sizeof(MbNvrtcApi)},
                {"libcublasLt.so", mb_lt_syms, sizeof mb_lt_syms / sizeof *mb_lt_syms, sizeof(MbLtApi)},
                {"libnccl.so", mb_nccl_syms, sizeof mb_nccl_syms / sizeof *mb_nccl_syms, sizeof(MbNcclApi)},
                {"stubs/libcuda.so", mb_cu_syms, sizeof mb_cu_syms / sizeof *mb_cu_syms, sizeof(MbCuApi)}};
    for (size_t i = 0; i < sizeof libs / sizeof *libs; i++) {
        char path[600], missing[128] = "";
        snprintf(path, sizeof path, "%s/%s", lib, libs[i].file);
        if (!mb_is_file(path)) snprintf(path, sizeof path, "%s/lib64/%s", cuda, libs[i].file);
        void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            if (strstr(libs[i].file, "nccl")) printf("    %-16s not in the toolkit (NCCL is optional): %s\n", libs[i].file, dlerror());
            else T_FAIL("%s: %s", path, dlerror());
            continue;
        }
        void *table = mb_calloc(1, libs[i].size);
        int ok = dl_resolve(h, libs[i].syms, libs[i].n, table, missing, sizeof missing);
        printf("    %-16s %zu symbols %s\n", libs[i].file, libs[i].n, ok ? "resolved" : missing);
        CHECK(ok, "%s lacks %s", path, missing);
        free(table);
        /* keep h open: unloading the CUDA libraries at test time gains nothing */
    }
    /* the table the CUDA backend installs has every op */
    MbOps ops;
    memset(&ops, 0, sizeof ops);
    cuda_ops_table(&ops);
    ops.destroy = cuda_destroy;
    const char *first = (const char *)&ops.destroy, *end = (const char *)(&ops + 1);
    int null = 0;
    for (const char *p = first; p + sizeof(void (*)(void)) <= end; p += sizeof(void (*)(void))) {
        void (*fn)(void);
        memcpy(&fn, p, sizeof fn);
        null += !fn;
    }
    CHECK(null == 0, "%d ops missing from the CUDA op table", null);
    printf("    CUDA op table: %zu functions, %d missing\n", (size_t)(end - first) / sizeof(void (*)(void)), null);
}

/* The driver's stub (what a machine with the toolkit but no driver could load by mistake) is
 * found, loaded, resolved and refused with a hint. */
static void the_driver_stub_is_refused(void) {
    if (!toolkit()) return;
    const char *cuda = getenv("MB_CUDA_DIR");
    char dir[300], link[400], stub[400], cmd[1500];
    static char out[1 << 14];
    snprintf(dir, sizeof dir, "/tmp/medbot-test-stub-%ld", (long)getpid());
    mkdir(dir, 0700);
    snprintf(link, sizeof link, "%s/libcuda.so.1", dir);
    snprintf(stub, sizeof stub, "%s/lib64/stubs/libcuda.so", cuda);
    remove(link);
    CHECK(symlink(stub, link) == 0, "symlink %s", link);
    snprintf(cmd, sizeof cmd, "MEDBOT_CUDA_LIB=%s %s dpo --model tests/fixtures/dpo/model --data tests/fixtures/dpo/data.jsonl "
             "--output %s/out --device cuda --max_steps 1", dir, t_medbot(), dir);
    int rc = t_run(cmd, out, sizeof out);
    printf("    --device cuda with the stub as libcuda.so.1 -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "stub") && strstr(out, "--device cpu"), "want a one-line refusal naming the stub");
    remove(link);
    mb_rmdir_r(dir);
}

static void gpu_programs_build(void) {
    const char *progs[] = {"check_ops", "bench_gpu"};
    for (size_t i = 0; i < 2; i++) {
        char cmd[1024];
        static char out[1 << 16];
        snprintf(cmd, sizeof cmd, "%s -std=c99 -Wall -Wextra -Wpedantic -Werror -O1 %s -o build/%s_ci tests/gpu/%s.c -lm "
                 "-lpthread -ldl", t_cc(), t_stb_include(), progs[i], progs[i]);
        int rc = t_run(cmd, out, sizeof out);
        printf("    tests/gpu/%s.c -> exit %d%s%.1500s\n", progs[i], rc, out[0] ? ": " : "", out);
        CHECK(rc == 0, "tests/gpu/%s.c does not build warning-free", progs[i]);
    }
    /* the benchmark's code path, on the CPU backend and the tiny fixture model */
    static char out[1 << 14];
    int rc = t_run("build/bench_gpu_ci tests/fixtures/dpo/model --cpu --prompt 12 --completion 10 --decode 4", out, sizeof out);
    const char *loss = strstr(out, "RESULT loss=");
    printf("    bench_gpu --cpu on the fixture model -> exit %d, %.*s\n", rc, loss ? (int)strcspn(loss, "\n") : 0, loss ? loss : "");
    CHECK(rc == 0 && loss && fabs(atof(loss + 12) - log(2.0)) < 1e-3, "bench_gpu --cpu: %s", out);
}

MB_TEST_MAIN("kernels", T(appendix_embeds_current_source), T(specialization_choice),
             T(nvrtc_compiles_every_specialization), T(runtime_compile_yields_every_kernel),
             T(declarations_match_the_toolkit_headers), T(tables_resolve_in_the_toolkit_libraries),
             T(the_driver_stub_is_refused), T(gpu_programs_build))
