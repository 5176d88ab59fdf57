/* tests/test_cuda_host.c: the CUDA backend's host code, without a GPU. Section 12's ops run as
 * written (the GEMMs' transposes, leading dimensions and offsets, the NF4 tiles of rows and of
 * columns, the fused logprob's chunks of rows x vocabulary, kernel arguments, scratch buffers,
 * the weight uploads and caches), against a fake driver and a fake cuBLASLt on host memory:
 * "device" pointers are host pointers, cublasLtMatmul is a column-major GEMM that reads the
 * layouts and transposes medbot gave it, and the few kernels these ops launch are emulated in C
 * from their signatures in kernels.cu.in. Results are compared with the CPU backend (bf16
 * tolerance). What this cannot check: the CUDA kernels themselves (tests/gpu/check.sh does). */
#include "test.h"

#define TOL 1e-2

#include "cuda_fake.h"

/* kernel arguments: args[i] points at the i-th parameter's value */
#define ARG(T, i) (*(T *)args[i])
#define PTR(T, i) ((T *)(uintptr_t)ARG(MbCuDevPtr, i))

static float emu_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
static float emu_nf4(const CuNf4 *q, uint64_t e) {
    uint64_t b = e / (uint64_t)q->blocksize;
    float a;
    if (q->absmax_q) {
        const uint8_t *codes = (const uint8_t *)(uintptr_t)q->absmax_q;
        const float *map8 = (const float *)(uintptr_t)q->map8, *nested = (const float *)(uintptr_t)q->nested;
        volatile float prod = map8[codes[b]] * nested[b / (uint64_t)q->nested_bs];
        a = prod + q->offset;
    } else {
        a = ((const float *)(uintptr_t)q->absmax)[b];
    }
    uint8_t byte = ((const uint8_t *)(uintptr_t)q->packed)[e >> 1];
    float v = mb_nf4_code[(e & 1) ? (byte & 15) : (byte >> 4)] * a;
    if (q->compute == 1) v = emu_bf16(v);
    else if (q->compute == 2) v = f16_to_f32(f32_to_f16(v));
    return v;
}

/* the kernels these ops launch, in C from their signatures in kernels.cu.in */
static int host_kernel(int lib, int k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void **args) {
    (void)lib, (void)gy, (void)gz, (void)bx, (void)smem;
    switch (k) {
    case K_F32_TO_BF16: {
        uint16_t *o = PTR(uint16_t, 0);
        const float *in = PTR(const float, 1);
        for (uint64_t i = 0; i < ARG(uint64_t, 2); i++) o[i] = f32_to_bf16(in[i]);
        return 0;
    }
    case K_NF4_DEQUANT: {
        uint16_t *o = PTR(uint16_t, 0);
        const CuNf4 *q = &ARG(CuNf4, 1);
        uint64_t cols = ARG(uint64_t, 2), r0 = ARG(uint64_t, 3), c0 = ARG(uint64_t, 4), nr = ARG(uint64_t, 5),
                 nc = ARG(uint64_t, 6);
        for (uint64_t i = 0; i < nr * nc; i++) o[i] = f32_to_bf16(emu_nf4(q, (r0 + i / nc) * cols + c0 + i % nc));
        return 0;
    }
    case K_NF4_GEMV: {
        uint16_t *o = PTR(uint16_t, 0);
        const uint16_t *x = PTR(const uint16_t, 1);
        const CuNf4 *q = &ARG(CuNf4, 2);
        int N = ARG(int, 3), O = ARG(int, 4), I = ARG(int, 5);
        CHECK(gx * 8 >= (unsigned)O, "nf4_gemv grid covers the rows");
        for (int n = 0; n < N; n++)
            for (int r = 0; r < O; r++) {
                float acc = 0;
                for (int i = 0; i < I; i++) acc += emu_nf4(q, (uint64_t)r * I + i) * bf16_to_f32(x[(size_t)n * I + i]);
                o[(size_t)n * O + r] = f32_to_bf16(acc);
            }
        return 0;
    }
    case K_LP_CHUNK: {
        const float *l = PTR(const float, 0);
        int vc = ARG(int, 1), v0 = ARG(int, 2), first = ARG(int, 5);
        const int *tg = PTR(const int, 3);
        float *st = PTR(float, 4);
        for (unsigned r = 0; r < gx; r++) {
            const float *lr = l + (size_t)r * vc;
            float *s4 = st + 4 * r, mx = -INFINITY, sum = 0, se = 0;
            for (int v = 0; v < vc; v++) mx = fmaxf(mx, lr[v]), sum += lr[v];
            float m_old = first ? -INFINITY : s4[0], m_new = fmaxf(m_old, mx);
            for (int v = 0; v < vc; v++) se += expf(lr[v] - m_new);
            s4[1] = (first ? 0 : s4[1] * expf(m_old - m_new)) + se;
            s4[0] = m_new, s4[2] = (first ? 0 : s4[2]) + sum;
            if (first) s4[3] = 0;
            if (tg[r] - v0 >= 0 && tg[r] - v0 < vc) s4[3] = lr[tg[r] - v0];
        }
        return 0;
    }
    case K_LP_FINISH: {
        float *lp = PTR(float, 0), *lse = PTR(float, 1), *ls = PTR(float, 2);
        const float *st = PTR(const float, 3);
        for (int r = 0; r < ARG(int, 4); r++) {
            float z = st[4 * r] + logf(st[4 * r + 1]);
            lse[r] = z, lp[r] = st[4 * r + 3] - z;
            if (ls) ls[r] = st[4 * r + 2];
        }
        return 0;
    }
    case K_LP_GRAD: {
        uint16_t *dl = PTR(uint16_t, 0);
        const float *l = PTR(const float, 1), *gr = PTR(const float, 5), *lse = PTR(const float, 6);
        int vc = ARG(int, 2), v0 = ARG(int, 3);
        const int *tg = PTR(const int, 4);
        for (unsigned r = 0; r < gx; r++)
            for (int v = 0; v < vc; v++) {
                float d = -gr[r] * expf(l[(size_t)r * vc + v] - lse[r]);
                if (v == tg[r] - v0) d += gr[r];
                dl[(size_t)r * vc + v] = f32_to_bf16(d);
            }
        return 0;
    }
    default:
        T_FAIL("kernel %s is not emulated", mb_kernel_names[k]);
        return 1;
    }
}

static MbOps *gpu, *cpu;

static void fake_backend(void) {
    if (gpu) return;
    fake_kernel = host_kernel;
    gpu = fake_cuda_ops(128, 0, NULL);
    cpu = mb_cpu_ops_new(2);
}

/* ---- helpers: bf16-rounded inputs, device copies, comparisons ---- */

static MbRng rng;
static float *rnd(size_t n, float s) {
    float *x = mb_malloc(n * 4 + 4);
    for (size_t i = 0; i < n; i++) x[i] = emu_bf16((float)((2 * mb_rng_uniform(&rng) - 1) * s));
    return x;
}
static void cmp_act(const char *what, const void *d, const float *ref, size_t n) {
    float *h = mb_malloc(n * 4 + 4);
    mb_convert_to_f32(MB_DT_BF16, d, h, n); /* the fake device's memory is the host's */
    t_close_rel(what, h, ref, n, TOL);
    free(h);
}
static MbWeight *weights; /* alive to the end: the backend caches uploads by address */
static MbWeight *weight(size_t rows, size_t cols, MbDtype dt, MbDtype nf4) {
    float *v = rnd(rows * cols, 0.05f);
    MbWeight w = {dt, rows, cols, NULL, mb_aligned_alloc(rows * cols * mb_dtype_size(dt))};
    mb_convert_from_f32(dt, v, w.owned, rows * cols);
    w.data = w.owned;
    free(v);
    if (nf4 != MB_DT_COUNT) CHECK_OK(weight_quantize_nf4(&w, "w", nf4, NULL));
    arrput(weights, w);
    return &weights[arrlen(weights) - 1];
}

/* the same NF4 weight with its absmax in fp32 (a checkpoint saved without double quant) */
static MbWeight *without_double_quant(const MbWeight *dq) {
    const MbNf4 *q = weight_nf4(dq);
    size_t head = (sizeof(MbNf4) + 63) / 64 * 64;
    unsigned char *block = mb_aligned_alloc(head + 4 * q->nblocks);
    MbNf4 *c = (MbNf4 *)(void *)block;
    *c = *q;
    float *am = (float *)(void *)(block + head);
    for (size_t b = 0; b < q->nblocks; b++) am[b] = nf4_absmax(q, b);
    c->absmax_q = NULL, c->nested_absmax = NULL, c->absmax = (const unsigned char *)am;
    MbWeight w = {MB_DT_U8, dq->rows, dq->cols, c, block};
    arrput(weights, w);
    return &weights[arrlen(weights) - 1];
}

static void matmuls_through_cublaslt_and_nf4_tiles(void) {
    fake_backend();
    mb_rng_seed(&rng, 1);
    MbCuda *g = gpu->ctx;
    struct {
        MbDtype dt, nf4;
        size_t N, O, I, tile;
        const char *what;
    } cases[] = {{MB_DT_BF16, MB_DT_COUNT, 13, 40, 72, 0, "bf16"},
                 {MB_DT_F32, MB_DT_COUNT, 13, 40, 72, 0, "f32 (uploaded as bf16)"},
                 {MB_DT_F16, MB_DT_COUNT, 13, 40, 72, 0, "f16 (uploaded as bf16)"},
                 {MB_DT_BF16, MB_DT_BF16, 13, 40, 72, 0, "nf4/bf16, one tile"},
                 {MB_DT_F32, MB_DT_F32, 13, 200, 72, 64 * 72 * 2, "nf4/f32, 4 row tiles"},
                 {MB_DT_F16, MB_DT_F16, 13, 150, 200, 64 * 150 * 2, "nf4/f16, 3 tiles each way"},
                 {MB_DT_BF16, MB_DT_BF16, 3, 40, 72, 0, "nf4/bf16 decode (fused GEMV), fp32 absmax"}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        size_t N = cases[c].N, O = cases[c].O, I = cases[c].I;
        g->tile_bytes = cases[c].tile ? cases[c].tile : MB_CUDA_TILE_BYTES;
        MbWeight *w = weight(O, I, cases[c].dt, cases[c].nf4);
        if (cases[c].N <= MB_GEMV_MAX_N) w = without_double_quant(w); /* the decode case: the fp32-absmax path too */
        float *x = rnd(N * I, 1), *dy = rnd(N * O, 1), *ref = mb_malloc(N * O * 4), *dref = rnd(N * I, 1);
        void *gx = t_up_bf16(gpu, x, N * I), *gy = gpu->alloc(gpu, N * O * 2);
        void *gdy = t_up_bf16(gpu, dy, N * O), *gdx = t_up_bf16(gpu, dref, N * I);
        char what[128];
        cpu->matmul_forward(cpu, ref, x, w, N);
        gpu->matmul_forward(gpu, gy, gx, w, N);
        snprintf(what, sizeof what, "matmul_forward %s", cases[c].what);
        cmp_act(what, gy, ref, N * O);
        cpu->matmul_backward(cpu, dref, dy, w, N, 1);
        gpu->matmul_backward(gpu, gdx, gdy, w, N, 1);
        snprintf(what, sizeof what, "matmul_backward %s, accumulate", cases[c].what);
        cmp_act(what, gdx, dref, N * I);
        if (cases[c].nf4 == MB_DT_COUNT) {
            float *lg = mb_malloc(N * O * 4), *h;
            void *gl = gpu->alloc(gpu, N * O * 4);
            cpu->logits_forward(cpu, lg, x, w, N);
            gpu->logits_forward(gpu, gl, gx, w, N);
            h = gl;
            snprintf(what, sizeof what, "logits_forward %s (fp32)", cases[c].what);
            t_close_rel(what, h, lg, N * O, 1e-5);
            gpu->free(gpu, gl);
            free(lg);
        }
        gpu->free(gpu, gx), gpu->free(gpu, gy), gpu->free(gpu, gdy), gpu->free(gpu, gdx);
        free(x), free(dy), free(ref), free(dref);
    }
    g->tile_bytes = MB_CUDA_TILE_BYTES;
    printf("    %d GEMMs, %d dequant tiles, %d fused GEMVs; weights uploaded once: %td dense, %td NF4\n", gemms,
           launches[K_NF4_DEQUANT], launches[K_NF4_GEMV], hmlen(g->dense), hmlen(g->nf4));
    CHECK(hmlen(g->dense) == 3 && hmlen(g->nf4) == 4, "one upload per host weight");
    CHECK(launches[K_NF4_GEMV] == 1, "decode takes the fused GEMV");
}

static void lora_through_cublaslt(void) {
    fake_backend();
    mb_rng_seed(&rng, 2);
    size_t N = 11, I = 72, O = 40, R = 8;
    float sc = 0.25f;
    float *x = rnd(N * I, 1), *out = rnd(N * O, 1), *u = mb_malloc(N * R * 4), *a = rnd(R * I, 0.2f), *b = rnd(O * R, 0.2f);
    float *dout = rnd(N * O, 1), *dx = rnd(N * I, 1), *dA = rnd(R * I, 0.1f), *dB = rnd(O * R, 0.1f);
    MbWeight A = {MB_DT_F32, R, I, a, NULL}, B = {MB_DT_F32, O, R, b, NULL};
    void *ga = t_up_f32(gpu, a, R * I), *gb = t_up_f32(gpu, b, O * R);
    MbWeight gA = {MB_DT_F32, R, I, ga, NULL}, gB = {MB_DT_F32, O, R, gb, NULL};
    void *gx = t_up_bf16(gpu, x, N * I), *go = t_up_bf16(gpu, out, N * O), *gu = gpu->alloc(gpu, N * R * 2);
    cpu->lora_forward(cpu, out, u, x, &A, &B, N, sc);
    gpu->lora_forward(gpu, go, gu, gx, &gA, &gB, N, sc);
    cmp_act("lora_forward out", go, out, N * O);
    cmp_act("lora_forward u", gu, u, N * R);
    for (size_t i = 0; i < N * R; i++) u[i] = emu_bf16(u[i]);
    void *gdo = t_up_bf16(gpu, dout, N * O), *gdx = t_up_bf16(gpu, dx, N * I), *gu2 = t_up_bf16(gpu, u, N * R);
    void *gdA = t_up_f32(gpu, dA, R * I), *gdB = t_up_f32(gpu, dB, O * R);
    cpu->lora_backward(cpu, dx, dA, dB, dout, x, u, &A, &B, N, sc);
    gpu->lora_backward(gpu, gdx, gdA, gdB, gdo, gx, gu2, &gA, &gB, N, sc);
    cmp_act("lora_backward dx", gdx, dx, N * I);
    t_close_rel("lora_backward dA (fp32)", gdA, dA, R * I, TOL);
    t_close_rel("lora_backward dB (fp32)", gdB, dB, O * R, TOL);
    void *bufs[] = {ga, gb, gx, go, gu, gdo, gdx, gdA, gdB, gu2};
    for (size_t i = 0; i < 10; i++) gpu->free(gpu, bufs[i]);
    free(x), free(out), free(u), free(a), free(b), free(dout), free(dx), free(dA), free(dB);
}

static void fused_logprob_chunks(void) {
    fake_backend();
    mb_rng_seed(&rng, 3);
    MbCuda *g = gpu->ctx;
    size_t M = 37, V = 301, C = 40;
    MbWeight *w = weight(V, C, MB_DT_BF16, MB_DT_COUNT);
    float *x = rnd(M * C, 1), *gr = rnd(M, 1), *lp = mb_malloc(M * 4), *lse = mb_malloc(M * 4), *ls = mb_malloc(M * 4);
    float *dx = mb_malloc(M * C * 4);
    int32_t tg[37];
    for (size_t i = 0; i < M; i++) tg[i] = (int32_t)(mb_rng_u64(&rng) % V);
    tg[0] = 0, tg[1] = (int32_t)V - 1, tg[2] = 64; /* the chunk edges */
    cpu->logprob_forward(cpu, lp, lse, ls, x, w, tg, M);
    cpu->logprob_backward(cpu, dx, gr, x, w, tg, lse, M);
    size_t chunks[][2] = {{512, 32768}, {8, 64}, {37, 100}, {5, 301}};
    void *gx = t_up_bf16(gpu, x, M * C);
    void *glp = gpu->alloc(gpu, M * 4), *glse = gpu->alloc(gpu, M * 4), *gls = gpu->alloc(gpu, M * 4);
    void *ggr = t_up_f32(gpu, gr, M), *gdx = gpu->alloc(gpu, M * C * 2);
    for (size_t k = 0; k < 4; k++) {
        g->lp_rows = chunks[k][0], g->lp_vocab = chunks[k][1];
        char what[96];
        gpu->logprob_forward(gpu, glp, glse, gls, gx, w, tg, M);
        snprintf(what, sizeof what, "logprob_forward logp, chunks %zu x %zu", chunks[k][0], chunks[k][1]);
        t_close_rel(what, glp, lp, M, 1e-5);
        snprintf(what, sizeof what, "logprob_forward lse, chunks %zu x %zu", chunks[k][0], chunks[k][1]);
        t_close_rel(what, glse, lse, M, 1e-5);
        snprintf(what, sizeof what, "logprob_forward sum of logits, chunks %zu x %zu", chunks[k][0], chunks[k][1]);
        t_close_rel(what, gls, ls, M, 1e-5);
        gpu->logprob_backward(gpu, gdx, ggr, gx, w, tg, glse, M);
        snprintf(what, sizeof what, "logprob_backward dx, chunks %zu x %zu", chunks[k][0], chunks[k][1]);
        cmp_act(what, gdx, dx, M * C);
    }
    g->lp_rows = MB_CUDA_LP_ROWS, g->lp_vocab = MB_CUDA_LP_VOCAB;
    void *bufs[] = {gx, glp, glse, gls, ggr, gdx};
    for (size_t i = 0; i < 6; i++) gpu->free(gpu, bufs[i]);
    free(x), free(gr), free(lp), free(lse), free(ls), free(dx);
}

static void memory_is_accounted(void) {
    fake_backend();
    MbCuda *g = gpu->ctx;
    size_t before = g->bytes_now;
    void *p = gpu->alloc(gpu, 1000), *q = gpu->alloc(gpu, 24);
    CHECK(cu_owns(g, (char *)p + 999, 1) && !cu_owns(g, (char *)p + 999, 2) && cu_owns(g, q, 24), "ownership by range");
    CHECK(g->bytes_now == before + 1024 && g->bytes_peak >= g->bytes_now, "bytes counted");
    gpu->free(gpu, p), gpu->free(gpu, q);
    CHECK(g->bytes_now == before, "and uncounted");
    printf("    peak of medbot's buffers in these tests: %zu bytes; %td GEMM plans cached\n", g->bytes_peak, arrlen(g->plans));
}

/* ---- failures: each reaches the caller as a status with its message; the backend is then freed
 * and the process goes on ---- */

static int failing_kernel(int lib, int k, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem, void **args) {
    (void)lib, (void)k, (void)gx, (void)gy, (void)gz, (void)bx, (void)smem, (void)args;
    return 1; /* every launch fails (CUDA_ERROR_INVALID_VALUE) */
}

static int all_launches(void) {
    int n = 0;
    for (int k = 0; k < K_COUNT; k++) n += launches[k];
    return n;
}

/* mb_model_load's CUDA backend: a fresh one on the fake driver */
static MbStatus fake_backend_new(int gpu, int D, MbOps **out) {
    (void)gpu;
    *out = fake_cuda_ops(D, 0, NULL);
    return MB_OK;
}

static void device_out_of_memory_is_a_status(void) {
    MbOps *ops = fake_cuda_ops(128, 0, NULL);
    float one[16];
    for (int i = 0; i < 16; i++) one[i] = 1.0f;
    void *x = t_up_f32(ops, one, 16);
    /* ops->alloc: NULL and MB_ERR_OOM with the message; the backend goes on */
    fake_alloc_fail = 1;
    void *big = ops->alloc(ops, (size_t)1 << 30);
    MbStatus st = big ? MB_OK : mb_ops_oom(ops);
    printf("    cuMemAlloc fails in ops->alloc -> %d: %s\n", (int)st, mb_last_error());
    CHECK(!big && st == MB_ERR_OOM && strstr(mb_last_error(), "out of GPU memory on GPU"), "alloc: %s", mb_last_error());
    CHECK(mb_ops_status(ops) == MB_OK, "a refused alloc leaves the backend usable");
    /* inside an op (sumsq's scratch): the op cannot answer, the backend keeps the failure */
    int before = all_launches();
    double ss = ops->sumsq(ops, x, 16);
    st = mb_ops_status(ops);
    printf("    cuMemAlloc fails inside sumsq -> %g, then the backend's status %d: %s\n", ss, (int)st, mb_last_error());
    CHECK(st == MB_ERR_OOM && strstr(mb_last_error(), "out of GPU memory on GPU"), "sumsq: %s", mb_last_error());
    fake_alloc_fail = 0;
    ops->scale(ops, x, 2.0f, 16);
    CHECK(all_launches() == before, "no kernel runs on a failed backend");
    CHECK(!ops->alloc(ops, 64) && mb_ops_oom(ops) == MB_ERR_OOM, "a failed backend allocates nothing more");
    ops->free(ops, x); /* freeing still works */
    CHECK(((MbCuda *)ops->ctx)->bytes_now == 1024, "everything but the workspace freed");
    ops->destroy(ops);
}

static void kernel_launch_failure_reaches_the_caller(void) {
    MbStatus (*saved)(int, int, MbOps **) = mb_cuda_backend_new;
    mb_cuda_backend_new = fake_backend_new;
    MbLoadOptions opt = {.threads = 1, .device = MB_DEVICE_CUDA};
    MbModel *m = NULL;
    MbKVCache *kv = NULL;
    CHECK_OK(mb_model_load("tests/fixtures/dpo/model", &opt, &m));
    if (!m) {
        mb_cuda_backend_new = saved;
        return;
    }
    /* cuMemAlloc fails for the KV cache: refused with a message, the model goes on */
    fake_alloc_fail = 1;
    MbStatus st = mb_kvcache_new(m, 1, 64, &kv);
    printf("    cuMemAlloc fails for the KV cache -> %d: %s\n", (int)st, mb_last_error());
    CHECK(st == MB_ERR_OOM && !kv && strstr(mb_last_error(), "out of GPU memory on GPU"), "%s", mb_last_error());
    fake_alloc_fail = 0;
    CHECK_OK(mb_kvcache_new(m, 1, 64, &kv));
    /* a kernel launch fails: the forward returns the device's error, naming the kernel */
    fake_kernel = failing_kernel;
    int32_t tokens[4] = {1, 2, 3, 4};
    float logits[440];
    st = mb_model_forward(m, kv, tokens, 1, 4, NULL, logits, 1);
    printf("    cuLaunchKernel fails -> %d: %s\n", (int)st, mb_last_error());
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "launching embedding_forward") &&
          strstr(mb_last_error(), "cuLaunchKernel failed"), "%s", mb_last_error());
    CHECK(kv && mb_kvcache_len(kv) == 0, "the cache holds nothing of a failed forward");
    int before = all_launches();
    st = mb_model_forward(m, kv, tokens, 1, 4, NULL, logits, 1);
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "launching embedding_forward") && all_launches() == before,
          "the next forward returns the same failure at once: %s", mb_last_error());
    fake_kernel = host_kernel;
    mb_kvcache_free(kv); /* a failed backend still frees */
    mb_model_free(m);
    mb_cuda_backend_new = saved;
}

/* two ranks of one process on the fake NCCL (one group), or one rank alone (fail NULL) */
static void fake_nccl_comms(MbComm **c, int world, double timeout, MbCommFail *fail) {
    for (int r = 0; r < world; r++) {
        MbNcclRank *k = NULL;
        c[r] = NULL;
        CHECK_OK(nccl_rank_open(&fake_libs, FAKE_NCCL_COMM, 0, &k));
        if (k) CHECK_OK(nc_comm_new(k, r, world, timeout, fail, &c[r]));
    }
}

static void nccl_failure_reaches_the_caller(void) {
    if (!fake_libs.cu.cuLaunchKernel) fake_libs_init();
    MbComm *c[2];
    double x[3] = {1, 2, 3};
    float *dev = mb_calloc(8, sizeof(float));
    fake_nccl_comms(c, 2, 30, comm_fail_new());
    if (!c[0] || !c[1]) {
        free(dev);
        return;
    }
    CHECK_OK(c[0]->all_reduce_host(c[0], x, 3));
    /* an NCCL call fails: its message, the communicator aborted, the group failed */
    fake_nccl_fail = 2;
    int calls = nccl_calls;
    MbStatus st = c[0]->all_reduce(c[0], dev, 8);
    printf("    ncclAllReduce fails -> %d: %s\n", (int)st, mb_last_error());
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "ncclAllReduce") && strstr(mb_last_error(), "NCCL_DEBUG=INFO"),
          "%s", mb_last_error());
    CHECK(nccl_aborts == 1, "the failed rank's communicator is aborted");
    fake_nccl_fail = 0;
    st = c[1]->barrier(c[1]); /* the other rank of this process: the same failure, no NCCL call */
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "ncclAllReduce") && nccl_calls == calls + 1,
          "the group's other rank leaves at once: %s", mb_last_error());
    c[0]->destroy(c[0]), c[1]->destroy(c[1]);
    CHECK(nccl_destroys == 1, "the aborted communicator is not destroyed again");
    /* a peer that died: NCCL's asynchronous error while the collective waits */
    fake_nccl_comms(c, 1, 30, NULL);
    if (!c[0]) {
        free(dev);
        return;
    }
    fake_stream_busy = 1, fake_nccl_async = 2;
    st = c[0]->all_gather(c[0], dev, dev, 8);
    printf("    an asynchronous NCCL error -> %d: %s\n", (int)st, mb_last_error());
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "rank 0 of 1: NCCL all_gather failed: unhandled system error") &&
          strstr(mb_last_error(), "--> the job stops; resume it from the last checkpoint with --resume_from_checkpoint latest"),
          "%s", mb_last_error());
    CHECK(c[0]->broadcast(c[0], dev, 8, 0) == MB_ERR_DEVICE, "the failure is sticky");
    c[0]->destroy(c[0]);
    /* a peer that hangs: --ddp_timeout */
    fake_nccl_comms(c, 1, 0.05, NULL);
    if (!c[0]) {
        free(dev);
        return;
    }
    fake_nccl_async = 0;
    st = c[0]->barrier(c[0]);
    printf("    a collective that never finishes (timeout 0.05 s) -> %d: %s\n", (int)st, mb_last_error());
    CHECK(st == MB_ERR_DEVICE && strstr(mb_last_error(), "NCCL all_reduce did not finish within 0.05 s (--ddp_timeout)"),
          "%s", mb_last_error());
    c[0]->destroy(c[0]);
    fake_stream_busy = 0;
    free(dev);
}

static void teardown(void) {
    if (gpu) gpu->destroy(gpu), gpu = NULL; /* section 12's own teardown, on the fake driver */
    if (cpu) cpu->destroy(cpu), cpu = NULL;
    for (ptrdiff_t i = 0; i < arrlen(weights); i++) weight_free(&weights[i]);
    arrfree(weights);
}

MB_TEST_MAIN("cuda_host", T(matmuls_through_cublaslt_and_nf4_tiles), T(lora_through_cublaslt), T(fused_logprob_chunks),
             T(memory_is_accounted), T(device_out_of_memory_is_a_status), T(kernel_launch_failure_reaches_the_caller),
             T(nccl_failure_reaches_the_caller), T(teardown))
