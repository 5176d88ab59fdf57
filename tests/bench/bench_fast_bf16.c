/* tests/bench/bench_fast_bf16.c: the fast path's bf16 matmul (MbOps.fast) against the exact
 * kernels, measured in one run next to what the machine can do:
 *   - peak: fp32 fused multiply-adds (vfmadd231ps) and, where the build has AVX512_BF16, bf16 dot
 *     products (vdpbf16ps) on one thread: why the kernels widen bf16 to fp32;
 *   - memory: the read bandwidth of MEDBOT_THREADS threads summing a 1 GB array;
 *   - decode (N = 1): one token's matmuls of Llama-3.2-1B (L=16 C=2048 F=8192 K*D=512, 16 x 7
 *     weights and the 128256 x 2048 lm_head, 2.47 GB of distinct bf16 weights, so that nothing
 *     stays in the cache), as GB of weights read per second, next to the bandwidth;
 *   - prefill (N = 128) on the 1B's shapes: GFLOP/s = 2 N O I / s;
 *   - end to end, when build/bench/llama1b (bench_generate's model) is there: mb_model_forward's
 *     prefill of 128 tokens and decode of 32 more, tokens/s, exact and fast.
 * Random weights, best of REPS (the memory and decode rows take turns, ROUNDS times). Asserts nothing.
 *   ./build.sh bench fast_bf16          (MEDBOT_THREADS: threads, default all cores) */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

#define REPS 3
#define ROUNDS 3
#define MODEL_DIR "build/bench/llama1b"

/* A (rows, cols) bf16 weight whose values repeat a block of random ones (speed does not depend
 * on them; drawing 1.2 billion normals would) */
static MbWeight bench_weight(size_t rows, size_t cols, const uint16_t *block, size_t block_n) {
    MbWeight w = {MB_DT_BF16, rows, cols, NULL, NULL};
    size_t n = rows * cols;
    uint16_t *h = mb_aligned_alloc(n * sizeof *h);
    for (size_t i = 0; i < n; i += block_n) memcpy(h + i, block, MB_MIN(block_n, n - i) * sizeof *h);
    w.data = w.owned = h;
    return w;
}

/* ---- peak: independent chains of multiply-adds on one thread ---- */
static void bench_peak(void) {
#if defined(__AVX512F__)
    enum { CHAINS = 16 };
    long iters = 20000000;
    __m512 acc[CHAINS];
    for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_set1_ps(1e-3f * (float)c);
    __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
    double t0 = mb_now();
    for (long i = 0; i < iters; i++) {
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_fmadd_ps(a, b, acc[c]);
        __asm__ volatile("" : "+v"(a));
    }
    double t = mb_now() - t0;
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_ps(s, acc[c]);
    printf("  vfmadd231ps zmm (16 fp32 products):      %7.1f GFLOP/s one thread (%g)\n",
           (double)iters * CHAINS * 32 / t / 1e9, (double)_mm512_reduce_add_ps(s));
#if defined(__AVX512BF16__)
    __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = x;
    t0 = mb_now();
    for (long i = 0; i < iters; i++) {
        for (int c = 0; c < CHAINS; c++) acc[c] = _mm512_dpbf16_ps(acc[c], x, y);
        __asm__ volatile("" : "+v"(x));
    }
    t = mb_now() - t0;
    s = _mm512_setzero_ps();
    for (int c = 0; c < CHAINS; c++) s = _mm512_add_ps(s, acc[c]);
    printf("  vdpbf16ps zmm (32 bf16 products):        %7.1f GFLOP/s one thread (%g)\n",
           (double)iters * CHAINS * 64 / t / 1e9, (double)_mm512_reduce_add_ps(s));
#else
    printf("  vdpbf16ps: not in this build (no __AVX512BF16__)\n");
#endif
#else
    printf("  (the peak rows need an AVX-512 build)\n");
#endif
}

/* ---- memory: each thread sums its share of a big array ---- */
typedef struct {
    const float *a;
    size_t n;
    double sums[256];
} SumTask;

static void sum_task(void *ctx, int tid, int nt) {
    SumTask *t = ctx;
    size_t lo, hi;
    mb_split(t->n / 64, tid, nt, &lo, &hi);
    float s[64] = {0};
    for (size_t i = lo * 64; i < hi * 64; i += 64)
        for (int l = 0; l < 64; l++) s[l] += t->a[i + l];
    double d = 0;
    for (int l = 0; l < 64; l++) d += s[l];
    t->sums[tid] = d;
}

/* ---- the 1B model's matmuls ---- */
enum { L = 16, C = 2048, F = 8192, KD = 512, V = 128256 };
static const size_t layer_shapes[7][2] = {{C, C}, {KD, C}, {KD, C}, {C, C}, {F, C}, {F, C}, {C, F}}; /* q k v o gate up down */

/* seconds for one token's matmuls (N = 1) over the layers' weights and the lm_head */
static double decode_token(MbOps *ops, MbWeight *layers, MbWeight *lm_head, const float *x, float *out) {
    double t0 = mb_now();
    for (size_t i = 0; i < L * 7; i++) ops->matmul_forward(ops, out, x, &layers[i], 1);
    ops->logits_forward(ops, out, x, lm_head, 1);
    return mb_now() - t0;
}

static double time_matmul(MbOps *ops, const MbWeight *w, size_t N, const float *x, float *out) {
    ops->matmul_forward(ops, out, x, w, N); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < REPS; r++) {
        double t0 = mb_now();
        ops->matmul_forward(ops, out, x, w, N);
        best = MB_MIN(best, mb_now() - t0);
    }
    return best;
}

/* ---- end to end: tokens/s of prefill (128) and decode (32 after it), exact and fast ---- */
static void bench_model(int threads) {
    enum { PREFILL = 128, DECODE = 32 };
    if (!mb_is_dir(MODEL_DIR)) {
        printf("  not measured: no %s (./build.sh bench generate makes it)\n", MODEL_DIR);
        return;
    }
    for (int fast = 0; fast <= 1; fast++) {
        MbLoadOptions opt;
        memset(&opt, 0, sizeof opt);
        opt.threads = threads;
        opt.fast = fast;
        MbModel *m;
        if (mb_model_load(MODEL_DIR, &opt, &m)) {
            printf("  %s\n", mb_last_error());
            return;
        }
        int Vm = m->cfg.vocab_size;
        int32_t tokens[PREFILL + DECODE];
        MbRng rng;
        mb_rng_seed(&rng, 0);
        for (int i = 0; i < PREFILL + DECODE; i++) tokens[i] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)Vm);
        float *logits = mb_malloc((size_t)Vm * sizeof *logits);
        MbKVCache *kv = NULL;
        double best_p = 1e30, best_d = 1e30;
        if (!mb_kvcache_new(m, 1, PREFILL + DECODE, &kv)) {
            mb_model_forward(m, kv, tokens, 1, 8, NULL, logits, 1); /* warm-up */
            for (int r = 0; r < REPS; r++) {
                mb_kvcache_reset(kv);
                double t0 = mb_now();
                mb_model_forward(m, kv, tokens, 1, PREFILL, NULL, logits, 1);
                double t1 = mb_now();
                for (int i = 0; i < DECODE; i++) mb_model_forward(m, kv, tokens + PREFILL + i, 1, 1, NULL, logits, 1);
                double t2 = mb_now();
                best_p = MB_MIN(best_p, t1 - t0);
                best_d = MB_MIN(best_d, (t2 - t1) / DECODE);
            }
        }
        printf("  %-6s prefill %3d tokens: %7.1f tokens/s   decode %d after it: %6.2f tokens/s\n", fast ? "fast" : "exact",
               PREFILL, PREFILL / best_p, DECODE, 1 / best_d);
        free(logits);
        mb_kvcache_free(kv);
        mb_model_free(m);
    }
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    if (filter[0] && !strstr("fast_bf16", filter)) return 0;
    const char *th = getenv("MEDBOT_THREADS");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    MbOps *ops = mb_cpu_ops_new(threads);
    const FbVariant *v = fb_best();
    printf("fast bf16 matmul (%s kernels), %d threads; exact: the fp32 tile kernels; best of %d\n\n",
           v ? v->name : "none: the exact", threads, REPS);

    printf("peak\n");
    bench_peak();

    /* random bf16 values, repeated through every weight */
    size_t block_n = (size_t)1 << 22;
    uint16_t *block = mb_aligned_alloc(block_n * sizeof *block);
    MbRng rng;
    mb_rng_seed(&rng, 1);
    for (size_t i = 0; i < block_n; i++) block[i] = f32_to_bf16((float)(0.02 * mb_rng_normal(&rng)));
    float *x = mb_aligned_alloc((size_t)128 * F * sizeof *x), *out = mb_aligned_alloc((size_t)128 * V * sizeof *out);
    for (size_t i = 0; i < (size_t)128 * F; i++) x[i] = (float)mb_rng_normal(&rng);

    printf("\ndecode (N = 1): a 1B token's matmuls, %d x 7 weights + the lm_head, GB of bf16 weights per second\n", L);
    MbWeight layers[L * 7], lm_head = bench_weight(V, C, block, block_n);
    double bytes = (double)V * C * 2;
    for (size_t i = 0; i < L * 7; i++) {
        layers[i] = bench_weight(layer_shapes[i % 7][0], layer_shapes[i % 7][1], block, block_n);
        bytes += (double)layers[i].rows * layers[i].cols * 2;
    }
    SumTask sum = {NULL, (size_t)1 << 28, {0}};
    float *big = mb_aligned_alloc(sum.n * sizeof *big);
    for (size_t i = 0; i < sum.n; i++) big[i] = (float)(i & 7);
    sum.a = big;
    double best_bw = 0, best_tok[2] = {1e30, 1e30}, best_lm[2] = {1e30, 1e30};
    for (int r = 0; r < ROUNDS; r++) {
        double t0 = mb_now();
        mb_pool_run(((MbCpu *)ops->ctx)->pool, sum_task, &sum);
        best_bw = MB_MAX(best_bw, (double)sum.n * 4 / (mb_now() - t0));
        for (int fast = 0; fast <= 1; fast++) {
            ops->fast = fast;
            best_tok[fast] = MB_MIN(best_tok[fast], decode_token(ops, layers, &lm_head, x, out));
            double t1 = mb_now();
            ops->logits_forward(ops, out, x, &lm_head, 1);
            best_lm[fast] = MB_MIN(best_lm[fast], mb_now() - t1);
        }
    }
    printf("  memory read (sum of 1 GB fp32):  %6.1f GB/s\n", best_bw / 1e9);
    for (int fast = 0; fast <= 1; fast++)
        printf("  %-6s all matmuls (%.2f GB): %6.1f GB/s = %5.1f%% of the bandwidth, %6.2f tokens/s of matmuls;"
               " lm_head alone %6.1f GB/s\n", fast ? "fast" : "exact", bytes / 1e9, bytes / best_tok[fast] / 1e9,
               100 * bytes / best_tok[fast] / best_bw, 1 / best_tok[fast], (double)V * C * 2 / best_lm[fast] / 1e9);
    free(big);
    for (size_t i = 0; i < L * 7; i++) weight_free(&layers[i]);
    weight_free(&lm_head);

    printf("\nprefill (N = 128), GFLOP/s = 2 N O I / s\n");
    printf("  %-16s %14s %14s %8s\n", "weight (O, I)", "exact", "fast", "speedup");
    static const size_t shapes[][2] = {{C, C}, {KD, C}, {F, C}, {C, F}};
    for (size_t s = 0; s < 4; s++) {
        MbWeight w = bench_weight(shapes[s][0], shapes[s][1], block, block_n);
        double flop = 2.0 * 128 * (double)w.rows * (double)w.cols, t[2];
        for (int fast = 0; fast <= 1; fast++) {
            ops->fast = fast;
            t[fast] = time_matmul(ops, &w, 128, x, out);
        }
        printf("  %5zu x %-8zu %14.1f %14.1f %7.2fx\n", w.rows, w.cols, flop / t[0] / 1e9, flop / t[1] / 1e9, t[0] / t[1]);
        weight_free(&w);
    }
    ops->destroy(ops);
    free(block), free(x), free(out);

    printf("\nend to end (%s, mb_model_forward, %d threads)\n", MODEL_DIR, threads);
    bench_model(threads);
    return 0;
}
