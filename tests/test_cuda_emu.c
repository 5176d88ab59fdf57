/* tests/test_cuda_emu.c: the CUDA backend end to end without a GPU. Section 12 runs on the fake
 * driver of tests/cuda_fake.h, and kernels.cu.in's own kernels run on the CPU through the emulator
 * tests/gpu/kernel_emu.cpp (built here into a shared library per row of the specialization
 * table), through the checks tests/gpu/check.sh runs on a GPU (tests/gpu/check_ops.c): every op
 * against the CPU backend, the DPO micro-batch (fp32 and NF4 bases, checkpointing, dropout), two
 * optimizer steps of mb_train, prefill + decode. The D=128 attention runs with both tile rows (a
 * 227 KiB and a 99 KiB device). What it cannot check: real concurrency, speed, and the parts a
 * real driver and cuBLASLt do (kernel compilation and loading, GEMM algorithms). Needs a C++17
 * compiler (MB_CXX, default c++); not run under the sanitizers (the kernels are not ours to
 * instrument and they switch stacks). */
#define CHECK_OPS_NO_MAIN
#include "gpu/check_ops.c"
#include "cuda_fake.h"

typedef int (*EmuLaunch)(const char *, unsigned, unsigned, unsigned, unsigned, unsigned, void **, char *, size_t);
typedef const int *(*EmuParams)(void);

static struct {
    int spec;
    EmuLaunch launch;
    const int *params;
} emus[16];
static int n_emus;
static size_t emu_optin = 232448; /* the shared memory of the device the table's row is chosen for */
static int emu_ready = -1;        /* -1: not tried; 0: no compiler (skip); 1: ready */

static int emu_kernel(int lib, int k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void **args) {
    char err[512];
    int rc = emus[lib].launch(mb_kernel_names[k], gx, gy, gz, bx, smem, args, err, sizeof err);
    if (rc) fprintf(stderr, "kernel emulator: %s\n", err);
    return rc;
}

/* The emulated backend for head dim D: the row of the table a device with emu_optin bytes of
 * shared memory gets, compiled once into build/kernel_emu_ROW.so */
static MbStatus emu_backend_new(int gpu, int D, MbOps **out) {
    (void)gpu;
    int s = spec_choose(D, emu_optin);
    if (s < 0) return mb_fail(MB_ERR_UNSUPPORTED, "emulator: no specialization for head_dim %d", D);
    for (int i = 0; i < n_emus; i++)
        if (emus[i].spec == s) return *out = fake_cuda_ops(D, i, emus[i].params), MB_OK;
    char so[128], cmd[2048];
    static char out_txt[1 << 16];
    snprintf(so, sizeof so, "build/kernel_emu_%d.so", s);
    struct stat a, b, c;
    int fresh = stat(so, &a) == 0 && stat("kernels.cu.in", &b) == 0 && stat("tests/gpu/kernel_emu.cpp", &c) == 0 &&
                a.st_mtime > b.st_mtime && a.st_mtime > c.st_mtime;
    if (!fresh) {
        const char *cxx = getenv("MB_CXX");
        snprintf(cmd, sizeof cmd, "%s -std=c++17 -O2 -shared -fPIC -Wall -Wextra -Werror -Wno-unknown-pragmas %s %s -o %s "
                 "tests/gpu/kernel_emu.cpp", cxx && cxx[0] ? cxx : "c++", mb_kernel_spec_common, mb_kernel_specs[s], so);
        double t0 = mb_now();
        int rc = t_run(cmd, out_txt, sizeof out_txt);
        printf("    built %s (row %d: %s) in %.1f s%s%s\n", so, s, mb_kernel_specs[s], mb_now() - t0, rc ? ": " : "",
               rc ? out_txt : "");
        if (rc) return mb_fail(MB_ERR_DEVICE, "emulator: %s failed", cmd);
    }
    void *h = dlopen(so, RTLD_NOW | RTLD_LOCAL);
    if (!h) return mb_fail(MB_ERR_DEVICE, "emulator: %s", dlerror());
    void *l = dlsym(h, "mb_emu_launch"), *p = dlsym(h, "mb_emu_params");
    if (!l || !p || n_emus == 16) return mb_fail(MB_ERR_DEVICE, "emulator: %s lacks its entry points", so);
    EmuParams params;
    memcpy(&emus[n_emus].launch, &l, sizeof l);
    memcpy(&params, &p, sizeof p);
    emus[n_emus].spec = s, emus[n_emus].params = params();
    n_emus++;
    *out = fake_cuda_ops(D, n_emus - 1, emus[n_emus - 1].params);
    return MB_OK;
}

/* the emulator replaces the CUDA backend's constructor; 0 when there is no C++ compiler */
static int emulator(void) {
    if (emu_ready >= 0) return emu_ready;
    if (t_sanitized()) {
        printf("    not run under the sanitizers\n");
        return emu_ready = 0;
    }
    static char out[4096];
    const char *cxx = getenv("MB_CXX");
    char cmd[256];
    snprintf(cmd, sizeof cmd, "%s --version", cxx && cxx[0] ? cxx : "c++");
    if (t_run(cmd, out, sizeof out) != 0) {
        printf("    no C++ compiler (%s): the kernel emulator is not run on this machine\n", cmd);
        return emu_ready = 0;
    }
    fake_kernel = emu_kernel;
    mb_cuda_backend_new = emu_backend_new;
    return emu_ready = 1;
}

#define EMU(fn)                                                                                                        \
    static void emu_##fn(void) {                                                                                      \
        if (emulator()) fn();                                                                                          \
    }
EMU(embedding_and_rows)
EMU(matmul_every_weight_kind)
EMU(norms_rope_elementwise)
EMU(rope_and_kv_store)
EMU(attention_d128)
EMU(attention_small_head_dims)
EMU(lora_ops)
EMU(fused_logprob)
EMU(optimizer_state)
EMU(dpo_step_matches_cpu)
EMU(two_optimizer_steps_match_cpu)
EMU(generation_logits_match_cpu)

/* the D=128 attention with the row a 99 KiB device (sm_86/89) gets: other tiles */
static void emu_attention_d128_small_tiles(void) {
    if (!emulator()) return;
    ck_teardown();
    emu_optin = 101376;
    attention_d128();
    ck_teardown();
    emu_optin = 232448;
}

static void emu_teardown(void) {
    if (emulator()) ck_teardown();
}

MB_TEST_MAIN("cuda_emu", T(emu_embedding_and_rows), T(emu_matmul_every_weight_kind), T(emu_norms_rope_elementwise),
             T(emu_rope_and_kv_store), T(emu_attention_d128), T(emu_attention_d128_small_tiles),
             T(emu_attention_small_head_dims), T(emu_lora_ops), T(emu_fused_logprob), T(emu_optimizer_state),
             T(emu_dpo_step_matches_cpu), T(emu_two_optimizer_steps_match_cpu), T(emu_generation_logits_match_cpu),
             T(emu_teardown))
