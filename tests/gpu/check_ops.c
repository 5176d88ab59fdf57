/* tests/gpu/check_ops.c: the CUDA backend against the CPU backend, on a machine with a GPU
 * (tests/gpu/check.sh builds and runs it; CI only builds it).
 *
 *   build/check_ops [FILTER]        MB_CHECK_SEED=N to repeat a run's inputs
 *
 * Every op of MbOps runs on both backends on fresh random inputs: drawn in fp32 and rounded to
 * bf16, so that both see the same values (the CPU then computes in fp32). The error of an output
 * is max|gpu - cpu| / max|cpu|: bf16 outputs (activations, and what bf16 GEMMs produce) within
 * 1e-2, fp32 outputs of fp32 ops (norm statistics, log-sum-exps, optimizer state) within 1e-4;
 * NaN or inf never passes. Then the model level: a DPO micro-batch on tests/fixtures/dpo (fp32
 * and NF4 bases, gradient checkpointing, LoRA dropout): loss and metrics within 1e-2; the LoRA
 * gradient in every tensor pointing the fp32 way (cosine >= 0.99) and within 5e-2, or within twice
 * the error that bf16 activations cost on this batch when that is larger (measured by the CPU
 * backend storing its activations in bf16: on this tiny model with near-uniform attention the q/k
 * adapters' gradients lose 5-7% to bf16 storage alone); two optimizer steps of `medbot dpo`;
 * prefill + decode logits with a KV cache within 5e-2. Ends with "N passed, M failed". */
#include "../test.h"

#define BF16_TOL 1e-2
#define F32_TOL 1e-4
#define GRAD_TOL 5e-2
#define LOSS_TOL 1e-2
#define LOGITS_TOL 5e-2
#define FIX "tests/fixtures/dpo"

static MbRng rng;
static MbOps *cpu, *gpu;   /* the GPU backend is built for head_dim 128 (others per test) */

/* The backend keeps an uploaded copy of a host weight keyed by its address for its lifetime
 * (weights are immutable while their model lives): freed weights wait here until the end, so no
 * later weight reuses an address the cache knows. */
static MbWeight *graveyard;
static void weight_retire(MbWeight *w) { arrput(graveyard, *w); }

/* ---- data on both sides ---- */

/* n values uniform in [-scale, scale], rounded to bf16 */
static float *ck_rnd(size_t n, float scale) {
    float *x = mb_malloc(n * sizeof(float) + 4);
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16((float)((2 * mb_rng_uniform(&rng) - 1) * scale)));
    return x;
}

static float *down_act(MbOps *g, const void *d, size_t n) {
    uint16_t *b = mb_malloc(n * 2 + 2);
    float *h = mb_malloc(n * 4 + 4);
    g->to_host(g, b, d, n * 2);
    mb_convert_to_f32(MB_DT_BF16, b, h, n);
    free(b);
    return h;
}

static float *down_f32(MbOps *g, const void *d, size_t n) {
    float *h = mb_malloc(n * 4 + 4);
    g->to_host(g, h, d, n * 4);
    return h;
}

/* compares a device bf16 buffer with the CPU result */
static void ck_cmp_act(const char *what, MbOps *g, const void *d, const float *ref, size_t n) {
    float *h = down_act(g, d, n);
    t_close_rel(what, h, ref, n, BF16_TOL);
    free(h);
}

static void cmp_f32(const char *what, MbOps *g, const void *d, const float *ref, size_t n, double tol) {
    float *h = down_f32(g, d, n);
    t_close_rel(what, h, ref, n, tol);
    free(h);
}

/* A host weight (rows, cols) in dtype dt (F32, F16, BF16), or NF4 with compute dtype `nf4`
 * (MB_DT_COUNT: dense); the values are in *vals, as the CPU reads them. */
static void make_weight(MbWeight *w, size_t rows, size_t cols, MbDtype dt, MbDtype nf4, float scale) {
    size_t n = rows * cols;
    float *v = ck_rnd(n, scale);
    memset(w, 0, sizeof *w);
    w->dtype = dt, w->rows = rows, w->cols = cols;
    w->owned = mb_aligned_alloc(n * mb_dtype_size(dt));
    mb_convert_from_f32(dt, v, w->owned, n);
    w->data = w->owned;
    free(v);
    if (nf4 != MB_DT_COUNT) CHECK_OK(weight_quantize_nf4(w, "check", nf4, NULL));
}

static void backends(void) {
    if (gpu) return;
    uint64_t seed = (uint64_t)time(NULL);
    const char *s = getenv("MB_CHECK_SEED");
    if (s && s[0]) seed = strtoull(s, NULL, 10);
    printf("    inputs from seed %llu (MB_CHECK_SEED=%llu repeats them)\n", (unsigned long long)seed,
           (unsigned long long)seed);
    mb_rng_seed(&rng, seed);
    cpu = mb_cpu_ops_new(0);
    if (mb_cuda_backend_new(0, 128, &gpu)) {
        printf("    FAIL no CUDA backend: %s\n0 passed, 1 failed\n", mb_last_error());
        exit(1);
    }
}

/* ---- the ops ---- */

static void embedding_and_rows(void) {
    backends();
    size_t V = 1000, C = 256, N = 37;
    MbWeight wte;
    make_weight(&wte, V, C, MB_DT_BF16, MB_DT_COUNT, 1.0f);
    int32_t tok[37];
    int rows[37];
    for (size_t i = 0; i < N; i++) tok[i] = (int32_t)(mb_rng_u64(&rng) % V), rows[i] = (int)(mb_rng_u64(&rng) % N);
    float *ref = mb_malloc(N * C * 4), *ref2 = mb_malloc(N * C * 4);
    void *d = gpu->alloc(gpu, N * C * 2), *d2 = gpu->alloc(gpu, N * C * 2);
    cpu->embedding_forward(cpu, ref, tok, &wte, N);
    gpu->embedding_forward(gpu, d, tok, &wte, N);
    ck_cmp_act("embedding_forward (37 x 256)", gpu, d, ref, N * C);
    cpu->gather_rows(cpu, ref2, ref, rows, 20, C);
    gpu->gather_rows(gpu, d2, d, rows, 20, C);
    ck_cmp_act("gather_rows (20 of 37)", gpu, d2, ref2, 20 * C);
    int srows[20];
    for (int i = 0; i < 20; i++) srows[i] = i * 37 / 20; /* distinct */
    cpu->scatter_rows(cpu, ref, ref2, srows, 20, N, C);
    gpu->scatter_rows(gpu, d, d2, srows, 20, N, C);
    ck_cmp_act("scatter_rows (20 into 37)", gpu, d, ref, N * C);
    gpu->free(gpu, d), gpu->free(gpu, d2);
    free(ref), free(ref2);
    weight_retire(&wte);
}

/* matmul forward and backward of one weight kind at N rows */
static void check_matmul(const char *kind, MbDtype dt, MbDtype nf4, size_t N, size_t O, size_t I) {
    MbWeight w;
    make_weight(&w, O, I, dt, nf4, 0.05f);
    float *x = ck_rnd(N * I, 1.0f), *dy = ck_rnd(N * O, 1.0f), *ref = mb_malloc(N * O * 4), *dref = ck_rnd(N * I, 1.0f);
    void *dx = t_up_bf16(gpu, x, N * I), *dout = gpu->alloc(gpu, N * O * 2), *ddy = t_up_bf16(gpu, dy, N * O);
    void *ddin = t_up_bf16(gpu, dref, N * I); /* accumulate onto these values */
    char what[160];
    cpu->matmul_forward(cpu, ref, x, &w, N);
    gpu->matmul_forward(gpu, dout, dx, &w, N);
    snprintf(what, sizeof what, "matmul_forward %s N=%zu (%zu x %zu)", kind, N, O, I);
    ck_cmp_act(what, gpu, dout, ref, N * O);
    cpu->matmul_backward(cpu, dref, dy, &w, N, 1);
    gpu->matmul_backward(gpu, ddin, ddy, &w, N, 1);
    snprintf(what, sizeof what, "matmul_backward %s N=%zu accumulate", kind, N);
    ck_cmp_act(what, gpu, ddin, dref, N * I);
    cpu->matmul_backward(cpu, dref, dy, &w, N, 0);
    gpu->matmul_backward(gpu, ddin, ddy, &w, N, 0);
    snprintf(what, sizeof what, "matmul_backward %s N=%zu", kind, N);
    ck_cmp_act(what, gpu, ddin, dref, N * I);
    if (dt != MB_DT_U8 && nf4 == MB_DT_COUNT && N > 1) { /* the fp32 logits of generation */
        float *lg = mb_malloc(N * O * 4);
        void *dl = gpu->alloc(gpu, N * O * 4);
        cpu->logits_forward(cpu, lg, x, &w, N);
        gpu->logits_forward(gpu, dl, dx, &w, N);
        snprintf(what, sizeof what, "logits_forward %s N=%zu (fp32 out)", kind, N);
        cmp_f32(what, gpu, dl, lg, N * O, F32_TOL);
        gpu->free(gpu, dl);
        free(lg);
    }
    gpu->free(gpu, dx), gpu->free(gpu, dout), gpu->free(gpu, ddy), gpu->free(gpu, ddin);
    free(x), free(dy), free(ref), free(dref);
    weight_retire(&w);
}

static void matmul_every_weight_kind(void) {
    backends();
    MbCuda *g = gpu->ctx;
    size_t sizes[][3] = {{77, 320, 256}, {3, 320, 256}, {1, 200, 448}};
    for (int s = 0; s < 3; s++) {
        size_t N = sizes[s][0], O = sizes[s][1], I = sizes[s][2];
        check_matmul("bf16", MB_DT_BF16, MB_DT_COUNT, N, O, I);
        check_matmul("f32", MB_DT_F32, MB_DT_COUNT, N, O, I);
        check_matmul("f16", MB_DT_F16, MB_DT_COUNT, N, O, I);
        check_matmul("nf4/bf16", MB_DT_BF16, MB_DT_BF16, N, O, I);
        check_matmul("nf4/f32", MB_DT_F32, MB_DT_F32, N, O, I);
        check_matmul("nf4/f16", MB_DT_F16, MB_DT_F16, N, O, I);
    }
    size_t saved = g->tile_bytes;
    g->tile_bytes = 64 * 448 * 2; /* several dequant tiles per weight */
    check_matmul("nf4/bf16 small tiles", MB_DT_BF16, MB_DT_BF16, 40, 300, 448);
    g->tile_bytes = saved;
}

static void norms_rope_elementwise(void) {
    backends();
    size_t N = 50, C = 320;
    MbWeight w;
    make_weight(&w, 1, C, MB_DT_BF16, MB_DT_COUNT, 1.0f);
    float *x = ck_rnd(N * C, 2.0f), *dy = ck_rnd(N * C, 1.0f), *out = mb_malloc(N * C * 4), *rstd = mb_malloc(N * 4);
    float *dx = ck_rnd(N * C, 1.0f);
    void *gx = t_up_bf16(gpu, x, N * C), *gout = gpu->alloc(gpu, N * C * 2), *grstd = gpu->alloc(gpu, N * 4);
    void *gdy = t_up_bf16(gpu, dy, N * C), *gdx = t_up_bf16(gpu, dx, N * C);
    cpu->rmsnorm_forward(cpu, out, rstd, x, &w, N, 1e-5f);
    gpu->rmsnorm_forward(gpu, gout, grstd, gx, &w, N, 1e-5f);
    ck_cmp_act("rmsnorm_forward out", gpu, gout, out, N * C);
    cmp_f32("rmsnorm_forward rstd (fp32)", gpu, grstd, rstd, N, F32_TOL);
    cpu->rmsnorm_backward(cpu, dx, dy, x, &w, rstd, N, 1);
    gpu->rmsnorm_backward(gpu, gdx, gdy, gx, &w, grstd, N, 1);
    ck_cmp_act("rmsnorm_backward accumulate", gpu, gdx, dx, N * C);
    cpu->rmsnorm_backward(cpu, dx, dy, x, &w, rstd, N, 0);
    gpu->rmsnorm_backward(gpu, gdx, gdy, gx, &w, grstd, N, 0);
    ck_cmp_act("rmsnorm_backward", gpu, gdx, dx, N * C);
    /* swiglu, add, dropout on the same buffers */
    size_t n = N * C;
    float *b = ck_rnd(n, 3.0f);
    void *gb = t_up_bf16(gpu, b, n);
    cpu->swiglu_forward(cpu, out, x, b, n);
    gpu->swiglu_forward(gpu, gout, gx, gb, n);
    ck_cmp_act("swiglu_forward", gpu, gout, out, n);
    float *dg = mb_malloc(n * 4), *du = mb_malloc(n * 4);
    void *gdg = gpu->alloc(gpu, n * 2), *gdu = gpu->alloc(gpu, n * 2);
    cpu->swiglu_backward(cpu, dg, du, dy, x, b, n);
    gpu->swiglu_backward(gpu, gdg, gdu, gdy, gx, gb, n);
    ck_cmp_act("swiglu_backward dgate", gpu, gdg, dg, n);
    ck_cmp_act("swiglu_backward dup", gpu, gdu, du, n);
    cpu->add_forward(cpu, out, x, b, n);
    gpu->add_forward(gpu, gout, gx, gb, n);
    ck_cmp_act("add_forward", gpu, gout, out, n);
    cpu->add_forward(cpu, out, out, b, n); /* out aliases a */
    gpu->add_forward(gpu, gout, gout, gb, n);
    ck_cmp_act("add_forward in place", gpu, gout, out, n);
    cpu->dropout_forward(cpu, out, x, n, 0.1f, 1234567);
    gpu->dropout_forward(gpu, gout, gx, n, 0.1f, 1234567);
    float *h = down_act(gpu, gout, n);
    size_t mism = 0, dropped = 0;
    for (size_t i = 0; i < n; i++) mism += (h[i] == 0.0f) != (out[i] == 0.0f) && x[i] != 0.0f, dropped += out[i] == 0.0f;
    printf("    dropout_forward p=0.1: %zu of %zu dropped, %zu masks differ\n", dropped, n, mism);
    CHECK(mism == 0, "dropout masks differ between backends");
    t_close_rel("dropout_forward values", h, out, n, BF16_TOL);
    free(h);
    gpu->zero(gpu, gout, n * 2);
    h = down_act(gpu, gout, n);
    size_t nz = 0;
    for (size_t i = 0; i < n; i++) nz += h[i] != 0.0f;
    CHECK(nz == 0, "zero left %zu non-zero values", nz);
    free(h);
    void *bufs[] = {gx, gout, grstd, gdy, gdx, gb, gdg, gdu};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) gpu->free(gpu, bufs[i]);
    free(x), free(dy), free(out), free(rstd), free(dx), free(b), free(dg), free(du);
    weight_retire(&w);
}

static void rope_and_kv_store(void) {
    backends();
    int B = 2, T = 19, D = 128, nh = 8, S = 64;
    size_t n = (size_t)B * T * nh * D;
    float inv[64];
    MbConfig c;
    memset(&c, 0, sizeof c);
    c.head_dim = D, c.rope_theta = 500000, c.rope_llama3 = 1, c.rope_factor = 8, c.rope_low_freq_factor = 1;
    c.rope_high_freq_factor = 4, c.rope_original_max_position_embeddings = 8192;
    rope_inv_freq(&c, inv);
    for (int pos0 = 0; pos0 <= 37; pos0 += 37) {
        float *x = ck_rnd(n, 1.0f);
        void *gx = t_up_bf16(gpu, x, n);
        char what[96];
        cpu->rope_forward(cpu, x, inv, B, T, pos0, nh, D);
        gpu->rope_forward(gpu, gx, inv, B, T, pos0, nh, D);
        snprintf(what, sizeof what, "rope_forward pos0 %d", pos0);
        ck_cmp_act(what, gpu, gx, x, n);
        cpu->rope_backward(cpu, x, inv, B, T, pos0, nh, D);
        gpu->rope_backward(gpu, gx, inv, B, T, pos0, nh, D);
        snprintf(what, sizeof what, "rope_backward pos0 %d", pos0);
        ck_cmp_act(what, gpu, gx, x, n);
        /* kv_store of the (B, T, nh*D) rows into a (B, S, nh*D) cache at pos0 */
        size_t nc = (size_t)B * S * nh * D;
        float *cache = ck_rnd(nc, 1.0f);
        void *gc = t_up_bf16(gpu, cache, nc);
        cpu->kv_store(cpu, cache, x, B, T, S, pos0, nh * D);
        gpu->kv_store(gpu, gc, gx, B, T, S, pos0, nh * D);
        snprintf(what, sizeof what, "kv_store pos0 %d", pos0);
        ck_cmp_act(what, gpu, gc, cache, nc);
        gpu->free(gpu, gx), gpu->free(gpu, gc);
        free(x), free(cache);
    }
}

/* attention_forward on both backends for one shape; returns nothing, compares out and lse */
static void check_attention(MbOps *g, const char *what, int B, int T, int S, int pos0, int H, int K, int D, const int *lens) {
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * S * K * D;
    float *q = ck_rnd(nq, 1.0f), *k = ck_rnd(nk, 1.0f), *v = ck_rnd(nk, 1.0f), *out = mb_malloc(nq * 4);
    float *lse = mb_malloc((size_t)B * H * T * 4);
    void *gq = t_up_bf16(g, q, nq), *gk = t_up_bf16(g, k, nk), *gv = t_up_bf16(g, v, nk), *go = g->alloc(g, nq * 2);
    void *gl = g->alloc(g, (size_t)B * H * T * 4);
    cpu->attention_forward(cpu, out, lse, q, k, v, lens, B, T, S, pos0, H, K, D);
    g->attention_forward(g, go, gl, gq, gk, gv, lens, B, T, S, pos0, H, K, D);
    char w[160];
    snprintf(w, sizeof w, "attention_forward %s out", what);
    ck_cmp_act(w, g, go, out, nq);
    snprintf(w, sizeof w, "attention_forward %s lse (fp32)", what);
    cmp_f32(w, g, gl, lse, (size_t)B * H * T, F32_TOL);
    void *bufs[] = {gq, gk, gv, go, gl};
    for (size_t i = 0; i < 5; i++) g->free(g, bufs[i]);
    free(q), free(k), free(v), free(out), free(lse);
}

static void check_attention_backward(MbOps *g, const char *what, int B, int T, int H, int K, int D, const int *lens) {
    size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * K * D;
    float *q = ck_rnd(nq, 1.0f), *k = ck_rnd(nk, 1.0f), *v = ck_rnd(nk, 1.0f), *out = mb_malloc(nq * 4), *dout = ck_rnd(nq, 1.0f);
    float *lse = mb_malloc((size_t)B * H * T * 4), *dq = mb_malloc(nq * 4), *dk = mb_malloc(nk * 4), *dv = mb_malloc(nk * 4);
    cpu->attention_forward(cpu, out, lse, q, k, v, lens, B, T, T, 0, H, K, D);
    for (size_t i = 0; i < nq; i++) out[i] = bf16_to_f32(f32_to_bf16(out[i])); /* what both see */
    cpu->attention_backward(cpu, dq, dk, dv, dout, q, k, v, out, lse, lens, B, T, H, K, D);
    void *gq = t_up_bf16(g, q, nq), *gk = t_up_bf16(g, k, nk), *gv = t_up_bf16(g, v, nk), *go = t_up_bf16(g, out, nq);
    void *gdo = t_up_bf16(g, dout, nq), *gl = t_up_f32(g, lse, (size_t)B * H * T);
    void *gdq = g->alloc(g, nq * 2), *gdk = g->alloc(g, nk * 2), *gdv = g->alloc(g, nk * 2);
    g->attention_backward(g, gdq, gdk, gdv, gdo, gq, gk, gv, go, gl, lens, B, T, H, K, D);
    char w[160];
    snprintf(w, sizeof w, "attention_backward %s dq", what);
    ck_cmp_act(w, g, gdq, dq, nq);
    snprintf(w, sizeof w, "attention_backward %s dk", what);
    ck_cmp_act(w, g, gdk, dk, nk);
    snprintf(w, sizeof w, "attention_backward %s dv", what);
    ck_cmp_act(w, g, gdv, dv, nk);
    void *bufs[] = {gq, gk, gv, go, gdo, gl, gdq, gdk, gdv};
    for (size_t i = 0; i < 9; i++) g->free(g, bufs[i]);
    free(q), free(k), free(v), free(out), free(dout), free(lse), free(dq), free(dk), free(dv);
}

static void attention_d128(void) {
    backends();
    int lens[2] = {80, 53}, plens[2] = {30, 12};
    check_attention(gpu, "train B2 T80 H8 K2 padded", 2, 80, 80, 0, 8, 2, 128, lens);
    check_attention(gpu, "train B2 T200 H4 K4 no padding", 2, 200, 200, 0, 4, 4, 128, NULL);
    check_attention(gpu, "prefill at pos0 40 (S 200, T 17)", 2, 17, 200, 40, 8, 2, 128, NULL);
    check_attention(gpu, "decode at pos0 150 (S 200)", 2, 1, 200, 150, 8, 2, 128, NULL);
    check_attention(gpu, "padded prefill (S 64, T 30)", 2, 30, 64, 0, 8, 2, 128, plens);
    check_attention_backward(gpu, "B2 T80 H8 K2 padded", 2, 80, 8, 2, 128, lens);
    check_attention_backward(gpu, "B1 T512 H4 K1 (SEQ_LEN)", 1, 512, 4, 1, 128, NULL);
}

static void attention_small_head_dims(void) {
    backends();
    int dims[] = {16, 64, 24, 12};
    for (size_t i = 0; i < sizeof dims / sizeof *dims; i++) {
        MbOps *g = NULL;
        CHECK_OK(mb_cuda_backend_new(0, dims[i], &g));
        if (!g) continue;
        int lens[3] = {45, 7, 33};
        char w[64];
        snprintf(w, sizeof w, "D%d B3 T45 H4 K2 padded", dims[i]);
        check_attention(g, w, 3, 45, 45, 0, 4, 2, dims[i], lens);
        check_attention_backward(g, w, 3, 45, 4, 2, dims[i], lens);
        snprintf(w, sizeof w, "D%d decode at pos0 20 (S 40)", dims[i]);
        check_attention(g, w, 3, 1, 40, 20, 4, 2, dims[i], NULL);
        g->destroy(g);
    }
}

static void lora_ops(void) {
    backends();
    size_t N = 50, I = 256, O = 320, R = 16;
    float scale = 0.5f;
    float *x = ck_rnd(N * I, 1.0f), *out = ck_rnd(N * O, 1.0f), *u = mb_malloc(N * R * 4), *a = ck_rnd(R * I, 0.1f);
    float *bm = ck_rnd(O * R, 0.1f), *dout = ck_rnd(N * O, 1.0f), *dx = ck_rnd(N * I, 1.0f), *dA = ck_rnd(R * I, 0.1f), *dB = ck_rnd(O * R, 0.1f);
    MbWeight A = {MB_DT_F32, R, I, a, NULL}, Bw = {MB_DT_F32, O, R, bm, NULL};
    void *ga = t_up_f32(gpu, a, R * I), *gb = t_up_f32(gpu, bm, O * R);
    MbWeight gA = {MB_DT_F32, R, I, ga, NULL}, gB = {MB_DT_F32, O, R, gb, NULL};
    void *gx = t_up_bf16(gpu, x, N * I), *gout = t_up_bf16(gpu, out, N * O), *gu = gpu->alloc(gpu, N * R * 2);
    cpu->lora_forward(cpu, out, u, x, &A, &Bw, N, scale);
    gpu->lora_forward(gpu, gout, gu, gx, &gA, &gB, N, scale);
    ck_cmp_act("lora_forward out += scale B A x", gpu, gout, out, N * O);
    ck_cmp_act("lora_forward u = A x", gpu, gu, u, N * R);
    for (size_t i = 0; i < N * R; i++) u[i] = bf16_to_f32(f32_to_bf16(u[i])); /* the saved u, as both hold it */
    void *gdo = t_up_bf16(gpu, dout, N * O), *gdx = t_up_bf16(gpu, dx, N * I), *gdA = t_up_f32(gpu, dA, R * I);
    void *gdB = t_up_f32(gpu, dB, O * R);
    gpu->free(gpu, gu);
    gu = t_up_bf16(gpu, u, N * R);
    cpu->lora_backward(cpu, dx, dA, dB, dout, x, u, &A, &Bw, N, scale);
    gpu->lora_backward(gpu, gdx, gdA, gdB, gdo, gx, gu, &gA, &gB, N, scale);
    ck_cmp_act("lora_backward dx +=", gpu, gdx, dx, N * I);
    float *h = down_f32(gpu, gdA, R * I);
    t_close_rel("lora_backward dA += (bf16 GEMM, fp32 out)", h, dA, R * I, BF16_TOL);
    free(h);
    h = down_f32(gpu, gdB, O * R);
    t_close_rel("lora_backward dB += (bf16 GEMM, fp32 out)", h, dB, O * R, BF16_TOL);
    free(h);
    void *bufs[] = {ga, gb, gx, gout, gu, gdo, gdx, gdA, gdB};
    for (size_t i = 0; i < 9; i++) gpu->free(gpu, bufs[i]);
    free(x), free(out), free(u), free(a), free(bm), free(dout), free(dx), free(dA), free(dB);
}

static void fused_logprob(void) {
    backends();
    MbCuda *g = gpu->ctx;
    size_t M = 300, V = 5003, C = 256;
    MbWeight w;
    make_weight(&w, V, C, MB_DT_BF16, MB_DT_COUNT, 0.2f);
    float *x = ck_rnd(M * C, 1.0f), *gr = ck_rnd(M, 1.0f), *lp = mb_malloc(M * 4), *lse = mb_malloc(M * 4), *ls = mb_malloc(M * 4);
    float *dx = mb_malloc(M * C * 4);
    int32_t *tg = mb_malloc(M * 4);
    for (size_t i = 0; i < M; i++) tg[i] = (int32_t)(mb_rng_u64(&rng) % V);
    cpu->logprob_forward(cpu, lp, lse, ls, x, &w, tg, M);
    cpu->logprob_backward(cpu, dx, gr, x, &w, tg, lse, M);
    void *gx = t_up_bf16(gpu, x, M * C), *glp = gpu->alloc(gpu, M * 4), *glse = gpu->alloc(gpu, M * 4);
    void *gls = gpu->alloc(gpu, M * 4), *ggr = t_up_f32(gpu, gr, M), *gdx = gpu->alloc(gpu, M * C * 2);
    size_t chunks[][2] = {{512, 32768}, {64, 1024}}; /* one chunk; several rows x vocabulary chunks */
    for (int c = 0; c < 2; c++) {
        g->lp_rows = chunks[c][0], g->lp_vocab = chunks[c][1];
        char w1[128];
        gpu->logprob_forward(gpu, glp, glse, gls, gx, &w, tg, M);
        snprintf(w1, sizeof w1, "logprob_forward logp, chunks %zu x %zu", chunks[c][0], chunks[c][1]);
        cmp_f32(w1, gpu, glp, lp, M, F32_TOL);
        snprintf(w1, sizeof w1, "logprob_forward lse, chunks %zu x %zu", chunks[c][0], chunks[c][1]);
        cmp_f32(w1, gpu, glse, lse, M, F32_TOL);
        snprintf(w1, sizeof w1, "logprob_forward sum of logits, chunks %zu x %zu", chunks[c][0], chunks[c][1]);
        cmp_f32(w1, gpu, gls, ls, M, F32_TOL);
        gpu->logprob_backward(gpu, gdx, ggr, gx, &w, tg, glse, M);
        snprintf(w1, sizeof w1, "logprob_backward dx, chunks %zu x %zu", chunks[c][0], chunks[c][1]);
        ck_cmp_act(w1, gpu, gdx, dx, M * C);
    }
    g->lp_rows = MB_CUDA_LP_ROWS, g->lp_vocab = MB_CUDA_LP_VOCAB;
    void *bufs[] = {gx, glp, glse, gls, ggr, gdx};
    for (size_t i = 0; i < 6; i++) gpu->free(gpu, bufs[i]);
    free(x), free(gr), free(lp), free(lse), free(ls), free(dx), free(tg);
    weight_retire(&w);
}

static void optimizer_state(void) {
    backends();
    size_t n = 1000003;
    float *p = ck_rnd(n, 1.0f), *gr = ck_rnd(n, 1.0f), *m = ck_rnd(n, 0.1f), *v = ck_rnd(n, 0.1f);
    for (size_t i = 0; i < n; i++) v[i] = fabsf(v[i]);
    void *gp = t_up_f32(gpu, p, n), *gg = t_up_f32(gpu, gr, n), *gm = t_up_f32(gpu, m, n), *gv = t_up_f32(gpu, v, n);
    double sc = cpu->sumsq(cpu, gr, n), sg = gpu->sumsq(gpu, gg, n);
    printf("    sumsq: gpu %.10g cpu %.10g\n", sg, sc);
    CHECK(fabs(sg - sc) <= F32_TOL * sc, "sumsq differs: %.10g vs %.10g", sg, sc);
    cpu->scale(cpu, gr, 0.37f, n);
    gpu->scale(gpu, gg, 0.37f, n);
    cmp_f32("scale", gpu, gg, gr, n, F32_TOL);
    for (long step = 1; step <= 3; step++) {
        cpu->adamw(cpu, p, gr, m, v, n, 1e-3, 0.9, 0.999, 1e-8, 0.01, step);
        gpu->adamw(gpu, gp, gg, gm, gv, n, 1e-3, 0.9, 0.999, 1e-8, 0.01, step);
    }
    cmp_f32("adamw x3 params", gpu, gp, p, n, F32_TOL);
    cmp_f32("adamw x3 exp_avg", gpu, gm, m, n, F32_TOL);
    cmp_f32("adamw x3 exp_avg_sq", gpu, gv, v, n, F32_TOL);
    double *acc = mb_calloc(n, sizeof(double));
    void *gacc = gpu->alloc(gpu, n * 8);
    gpu->fill_f64(gpu, gacc, n);
    for (int k = 0; k < 3; k++) {
        cpu->accumulate_f64(cpu, acc, p, n);
        gpu->accumulate_f64(gpu, gacc, gp, n);
    }
    cpu->from_f64(cpu, m, acc, n);
    gpu->from_f64(gpu, gm, gacc, n);
    cmp_f32("accumulate_f64 x3 then from_f64", gpu, gm, m, n, F32_TOL);
    cpu->fill(cpu, m, 0.25f, n);
    gpu->fill(gpu, gm, 0.25f, n);
    cmp_f32("fill", gpu, gm, m, n, F32_TOL);
    /* random weights: the same values as the CPU */
    uint8_t *rb = mb_malloc(n), *hb = mb_malloc(n);
    void *grb = gpu->alloc(gpu, n);
    cpu->random_bytes(cpu, rb, n, 99);
    gpu->random_bytes(gpu, grb, n, 99);
    gpu->to_host(gpu, hb, grb, n);
    CHECK(!memcmp(rb, hb, n), "random_bytes differ");
    uint16_t *rn = mb_malloc(n * 2);
    float *rf = mb_malloc(n * 4);
    void *grn = gpu->alloc(gpu, n * 2);
    cpu->random_normal(cpu, rn, n, 77, 0.02f);
    gpu->random_normal(gpu, grn, n, 77, 0.02f);
    mb_convert_to_f32(MB_DT_BF16, rn, rf, n);
    ck_cmp_act("random_normal (bf16)", gpu, grn, rf, n);
    void *bufs[] = {gp, gg, gm, gv, gacc, grb, grn};
    for (size_t i = 0; i < 7; i++) gpu->free(gpu, bufs[i]);
    free(p), free(gr), free(m), free(v), free(acc), free(rb), free(hb), free(rn), free(rf);
}

/* ---- the model level ---- */

/* The CPU op table with every activation output rounded to bf16, as the CUDA backend stores them:
 * the yardstick of what bf16 activations cost on a batch. */
static MbOps cpu32;
static void rb(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = bf16_to_f32(f32_to_bf16(x[i]));
}
static void b_emb(MbOps *o, float *y, const int32_t *t, const MbWeight *w, size_t N) { cpu32.embedding_forward(o, y, t, w, N), rb(y, N * w->cols); }
static void b_mm(MbOps *o, float *y, const float *x, const MbWeight *w, size_t N) { cpu32.matmul_forward(o, y, x, w, N), rb(y, N * w->rows); }
static void b_rms(MbOps *o, float *y, float *r, const float *x, const MbWeight *w, size_t N, float e) {
    cpu32.rmsnorm_forward(o, y, r, x, w, N, e), rb(y, N * w->cols);
}
static void b_rope(MbOps *o, float *x, const float *f, int B, int T, int p, int nh, int D) {
    cpu32.rope_forward(o, x, f, B, T, p, nh, D), rb(x, (size_t)B * T * nh * D);
}
static void b_att(MbOps *o, float *y, float *lse, const float *q, const float *k, const float *v, const int *l, int B, int T, int S,
                  int p, int H, int K, int D) {
    cpu32.attention_forward(o, y, lse, q, k, v, l, B, T, S, p, H, K, D), rb(y, (size_t)B * T * H * D);
}
static void b_swi(MbOps *o, float *y, const float *g, const float *u, size_t n) { cpu32.swiglu_forward(o, y, g, u, n), rb(y, n); }
static void b_add(MbOps *o, float *y, const float *a, const float *b, size_t n) { cpu32.add_forward(o, y, a, b, n), rb(y, n); }
static void b_lora(MbOps *o, float *y, float *u, const float *x, const MbWeight *A, const MbWeight *B, size_t N, float s) {
    cpu32.lora_forward(o, y, u, x, A, B, N, s), rb(y, N * B->rows), rb(u, N * A->rows);
}
static void b_drop(MbOps *o, float *y, const float *x, size_t n, float p, uint64_t s) { cpu32.dropout_forward(o, y, x, n, p, s), rb(y, n); }
static void b_mmb(MbOps *o, float *d, const float *dy, const MbWeight *w, size_t N, int a) {
    cpu32.matmul_backward(o, d, dy, w, N, a), rb(d, N * w->cols);
}
static void b_rmsb(MbOps *o, float *d, const float *dy, const float *x, const MbWeight *w, const float *r, size_t N, int a) {
    cpu32.rmsnorm_backward(o, d, dy, x, w, r, N, a), rb(d, N * w->cols);
}
static void b_ropeb(MbOps *o, float *x, const float *f, int B, int T, int p, int nh, int D) {
    cpu32.rope_backward(o, x, f, B, T, p, nh, D), rb(x, (size_t)B * T * nh * D);
}
static void b_attb(MbOps *o, float *dq, float *dk, float *dv, const float *dy, const float *q, const float *k, const float *v,
                   const float *y, const float *lse, const int *l, int B, int T, int H, int K, int D) {
    cpu32.attention_backward(o, dq, dk, dv, dy, q, k, v, y, lse, l, B, T, H, K, D);
    rb(dq, (size_t)B * T * H * D), rb(dk, (size_t)B * T * K * D), rb(dv, (size_t)B * T * K * D);
}
static void b_swib(MbOps *o, float *dg, float *du, const float *dy, const float *g, const float *u, size_t n) {
    cpu32.swiglu_backward(o, dg, du, dy, g, u, n), rb(dg, n), rb(du, n);
}
static void b_lorab(MbOps *o, float *dx, float *dA, float *dB, const float *dy, const float *x, const float *u, const MbWeight *A,
                    const MbWeight *B, size_t N, float s) {
    cpu32.lora_backward(o, dx, dA, dB, dy, x, u, A, B, N, s), rb(dx, N * A->cols);
}
static void b_lpb(MbOps *o, float *dx, const float *g, const float *x, const MbWeight *w, const int32_t *t, const float *lse,
                  size_t M) {
    cpu32.logprob_backward(o, dx, g, x, w, t, lse, M), rb(dx, M * w->cols);
}
static void bf16_storage(MbOps *ops) {
    cpu32 = *ops;
    ops->embedding_forward = b_emb, ops->matmul_forward = b_mm, ops->rmsnorm_forward = b_rms, ops->rope_forward = b_rope;
    ops->attention_forward = b_att, ops->swiglu_forward = b_swi, ops->add_forward = b_add, ops->lora_forward = b_lora;
    ops->dropout_forward = b_drop, ops->matmul_backward = b_mmb, ops->rmsnorm_backward = b_rmsb;
    ops->rope_backward = b_ropeb, ops->attention_backward = b_attb, ops->swiglu_backward = b_swib;
    ops->lora_backward = b_lorab, ops->logprob_backward = b_lpb;
}

/* the adapter's tensors: offset, size and name of each A and B in the parameter block */
typedef struct {
    size_t off, n;
    char name[48];
} LoraTensor;
static LoraTensor lora_layout[64];
static int n_lora_layout;

static double cosine(const float *a, const float *b, size_t n) {
    double d = 0, x = 0, y = 0;
    for (size_t i = 0; i < n; i++) d += (double)a[i] * b[i], x += (double)a[i] * a[i], y += (double)b[i] * b[i];
    return x > 0 && y > 0 ? d / sqrt(x * y) : (x == y ? 1 : 0);
}

static double max_rel(const float *got, const float *ref, size_t n) {
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) return INFINITY;
        e = fmax(e, fabs((double)got[i] - ref[i])), m = fmax(m, fabs((double)ref[i]));
    }
    return m > 0 ? e / m : e;
}

static double ck_metric_scale(int k, double ref, double logps) {
    if (k == MET_REWARDS_CHOSEN || k == MET_REWARDS_REJECTED || k == MET_REWARDS_MARGINS) return 0.1 * logps;
    if (k == MET_LOGITS_CHOSEN || k == MET_LOGITS_REJECTED || k == MET_REWARDS_ACCURACIES) return fmax(fabs(ref), 1.0);
    return fmax(fabs(ref), 1e-12);
}

static void ck_job_defaults(MbTrainJob *job, int device, int nf4, int ckpt, double dropout) {
    memset(job, 0, sizeof *job);
    mb_train_config_defaults(&job->cfg);
    job->device = device, job->load_in_4bit = nf4, job->bnb_4bit_compute_dtype = nf4 ? "bfloat16" : NULL;
    job->model_dir = FIX "/model", job->data_path = FIX "/data.jsonl", job->lora_init = FIX "/adapter_qk";
    job->threads = 2;
    MbTrainConfig *c = &job->cfg;
    c->max_prompt_length = 24, c->max_completion_length = 20, c->max_length = 36;
    c->per_device_train_batch_size = 4, c->beta = 0.1, c->seed = 0, c->shuffle = 0, c->gradient_checkpointing = ckpt;
    c->lora.dropout = dropout;
}

/* one micro-batch of 4 pairs with backward on a backend (bf16: the CPU storing activations in
 * bf16): metrics and the LoRA gradient (host) */
static float *step_on(int device, int bf16, int nf4, int ckpt, double dropout, double *met, size_t *n) {
    MbTrainJob job;
    ck_job_defaults(&job, device, nf4, ckpt, dropout);
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return NULL;
    if (bf16) bf16_storage(tr.m->ops);
    if (dropout > 0) tr.lo->dropout = dropout;
    n_lora_layout = 0;
    for (int l = 0; l < tr.lo->L; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            const MbLoraPair *p = &tr.lo->pairs[(size_t)l * MB_LAYER_WEIGHTS + i];
            for (int ab = 0; p->A.data && ab < 2 && n_lora_layout < 64; ab++, n_lora_layout++) {
                const MbWeight *w = ab ? &p->B : &p->A;
                LoraTensor *t = &lora_layout[n_lora_layout];
                t->off = (size_t)((const float *)w->data - tr.lo->params), t->n = w->rows * w->cols;
                snprintf(t->name, sizeof t->name, "L%d %s %c", l, lora_module_name(i), ab ? 'B' : 'A');
            }
        }
    int idx[4] = {0, 1, 2, 3};
    tr.micro_key = 5;
    tr.m->ops->fill(tr.m->ops, tr.lo->grads, 0.0f, tr.lo->n_params);
    CHECK_OK(train_microbatch(&tr, &tr.train, idx, 4, 0, 1, 1.0, met));
    *n = tr.lo->n_params;
    float *g = lora_download(tr.lo, tr.lo->grads);
    trainer_free(&tr);
    return g;
}

static void dpo_step_matches_cpu(void) {
    backends();
    struct {
        int nf4, ckpt;
        double dropout;
        const char *name;
    } cases[] = {{0, 0, 0, "fp32 base"}, {0, 1, 0, "fp32 base, gradient checkpointing"},
                 {1, 1, 0, "NF4 base (compute bf16), checkpointing"}, {0, 0, 0.1, "fp32 base, LoRA dropout 0.1"}};
    for (size_t k = 0; k < sizeof cases / sizeof *cases; k++) {
        double mc[MET_COUNT], mg[MET_COUNT], mb[MET_COUNT];
        size_t nc = 0, ng = 0, nb = 0;
        float *gb = step_on(MB_DEVICE_CPU, 1, cases[k].nf4, cases[k].ckpt, cases[k].dropout, mb, &nb);
        float *gc = step_on(MB_DEVICE_CPU, 0, cases[k].nf4, cases[k].ckpt, cases[k].dropout, mc, &nc);
        float *gg = step_on(MB_DEVICE_CUDA, 0, cases[k].nf4, cases[k].ckpt, cases[k].dropout, mg, &ng);
        printf("    DPO micro-batch of 4 pairs, %s:\n", cases[k].name);
        double logps = fmax(fabs(mc[MET_LOGPS_CHOSEN]), fabs(mc[MET_LOGPS_REJECTED]));
        for (int q = 0; gc && gg && q < MET_COUNT; q++) {
            double e = fabs(mg[q] - mc[q]) / ck_metric_scale(q, mc[q], logps);
            printf("      %-22s gpu %14.8g cpu %14.8g  err %.2e (%5.1f%% of tol %.0e)\n", mb_metric_names[q], mg[q], mc[q],
                   e, 100 * e / LOSS_TOL, LOSS_TOL);
            CHECK(e <= LOSS_TOL, "%s: %s off by %.2e", cases[k].name, mb_metric_names[q], e);
        }
        if (!gc || !gg || !gb || nc != ng || nc != nb) {
            T_FAIL("%s: a step did not run", cases[k].name);
            free(gc), free(gg), free(gb);
            continue;
        }
        /* the gradient: every tensor's direction, and its error against the bf16 floor of this batch */
        double worst = 1, floor_cos = 1;
        const char *worst_name = "";
        for (int t = 0; t < n_lora_layout; t++) {
            double c = cosine(gg + lora_layout[t].off, gc + lora_layout[t].off, lora_layout[t].n);
            floor_cos = fmin(floor_cos, cosine(gb + lora_layout[t].off, gc + lora_layout[t].off, lora_layout[t].n));
            if (c < worst) worst = c, worst_name = lora_layout[t].name;
        }
        double e = max_rel(gg, gc, nc), floor_e = max_rel(gb, gc, nc), tol = fmax(GRAD_TOL, 2 * floor_e);
        printf("      LoRA gradient, %d tensors: worst cosine %.5f (%s; bf16-storage CPU %.5f, need >= 0.99)\n",
               n_lora_layout, worst, worst_name, floor_cos);
        printf("      LoRA gradient max|err|/max|ref| %.3e (%5.1f%% of tol %.1e = max(%.0e, 2 x the bf16-storage CPU's "
               "%.3e))\n", e, 100 * e / tol, tol, GRAD_TOL, floor_e);
        CHECK(worst >= 0.99, "%s: the gradient of %s points elsewhere (cosine %.4f)", cases[k].name, worst_name, worst);
        CHECK(e <= tol, "%s: LoRA gradient error %.3e over %.3e", cases[k].name, e, tol);
        free(gc), free(gg), free(gb);
    }
}

static void two_optimizer_steps_match_cpu(void) {
    backends();
    const char *dirs[2] = {"build/check_train_cpu", "build/check_train_gpu"};
    float *p[2] = {NULL, NULL};
    size_t n[2] = {0, 0};
    for (int d = 0; d < 2; d++) {
        mb_rmdir_r(dirs[d]);
        MbTrainJob job;
        ck_job_defaults(&job, d ? MB_DEVICE_CUDA : MB_DEVICE_CPU, 0, 1, 0);
        job.output_dir = dirs[d], job.lora_init = NULL;
        job.cfg.per_device_train_batch_size = 2, job.cfg.gradient_accumulation_steps = 2, job.cfg.max_steps = 2;
        /* AdamW's first steps move each parameter by about lr x sign(g): a small lr keeps the sign flips
         * of near-zero gradients (bf16 vs fp32) far below the tolerance */
        job.cfg.learning_rate = 1e-4, job.cfg.lora.r = 8, job.cfg.lora.alpha = 16, job.cfg.save_steps = 1;
        CHECK_OK(mb_train(&job));
        MbModel *m = NULL;
        MbLoadOptions o = {.threads = 2, .device = MB_DEVICE_CPU};
        MbLora *lo = NULL;
        if (mb_model_load(FIX "/model", &o, &m) == MB_OK && mb_lora_load(m, dirs[d], &lo) == MB_OK) {
            n[d] = lo->n_params;
            p[d] = mb_malloc(n[d] * 4);
            memcpy(p[d], lo->params, n[d] * 4);
        }
        mb_lora_free(lo);
        mb_model_free(m);
    }
    CHECK(p[0] && p[1] && n[0] == n[1], "both runs saved an adapter");
    if (p[0] && p[1] && n[0] == n[1]) t_close_rel("adapter after 2 AdamW steps (lr 1e-4)", p[1], p[0], n[0], GRAD_TOL);
    free(p[0]), free(p[1]);
}

static void generation_logits_match_cpu(void) {
    backends();
    for (int nf4 = 0; nf4 <= 1; nf4++) {
        MbModel *m[2] = {NULL, NULL};
        float *lg[2] = {NULL, NULL};
        int32_t tok[2][16], pre[2 * 10];
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 16; t++) tok[b][t] = (int32_t)((b * 16 + t) * 37 % 400), pre[b * 10 + t % 10] = tok[b][t % 10];
        for (int d = 0; d < 2; d++) {
            MbLoadOptions o = {.threads = 2, .device = d ? MB_DEVICE_CUDA : MB_DEVICE_CPU, .load_in_4bit = nf4,
                               .bnb_4bit_compute_dtype = nf4 ? "bfloat16" : NULL};
            CHECK_OK(mb_model_load(FIX "/model", &o, &m[d]));
            if (!m[d]) return;
            size_t V = (size_t)m[d]->cfg.vocab_size;
            lg[d] = mb_malloc(2 * 7 * V * 4);
            MbKVCache *kv = NULL;
            CHECK_OK(mb_kvcache_new(m[d], 2, 32, &kv));
            CHECK_OK(mb_model_forward(m[d], kv, pre, 2, 10, NULL, lg[d], 1)); /* prefill of 10 */
            for (int s = 0; s < 6; s++) {                                   /* then 6 decode steps */
                int32_t next[2] = {tok[0][10 + s], tok[1][10 + s]};
                CHECK_OK(mb_model_forward(m[d], kv, next, 2, 1, NULL, lg[d] + (size_t)(s + 1) * 2 * V, 1));
            }
            mb_kvcache_free(kv);
        }
        t_close_rel(nf4 ? "prefill + 6 decode steps, NF4 base: logits" : "prefill + 6 decode steps: logits", lg[1], lg[0],
                    2 * 7 * (size_t)m[0]->cfg.vocab_size, LOGITS_TOL);
        for (int d = 0; d < 2; d++) mb_model_free(m[d]), free(lg[d]);
    }
}

static void ck_teardown(void) {
    if (gpu) gpu->destroy(gpu), gpu = NULL;
    if (cpu) cpu->destroy(cpu), cpu = NULL;
    for (ptrdiff_t i = 0; i < arrlen(graveyard); i++) weight_free(&graveyard[i]);
    arrfree(graveyard);
}

#ifndef CHECK_OPS_NO_MAIN /* tests/test_cuda_emu.c runs these checks on the kernel emulator */
MB_TEST_MAIN("gpu", T(embedding_and_rows), T(matmul_every_weight_kind), T(norms_rope_elementwise), T(rope_and_kv_store),
             T(attention_d128), T(attention_small_head_dims), T(lora_ops), T(fused_logprob), T(optimizer_state),
             T(dpo_step_matches_cpu), T(two_optimizer_steps_match_cpu), T(generation_logits_match_cpu), {"teardown", ck_teardown})
#endif
