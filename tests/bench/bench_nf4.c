/* tests/bench/bench_nf4.c: NF4 on the CPU, measured in one run next to bf16:
 *   - quantization (load_in_4bit): GB of bf16 weights quantized per second, on one thread and on
 *     MEDBOT_THREADS (the load's pool);
 *   - matmul out (N, O) = x (N, I) @ W^T with W in NF4 (double quant, dequantized a tile at a
 *     time) and in bf16, decode-shaped (N = 1) and prefill-shaped (N = 256), at Llama-3.1-8B's
 *     4096 x 4096 (q_proj, o_proj) and 14336 x 4096 (gate_proj, up_proj): GFLOP/s = 2 N O I / s.
 * Random weights (normal, std 0.02), best of 3. It asserts nothing about speed.
 * First, the fast path (MbOps.fast: int8 activations against NF4 levels) against the exact one at
 * Llama-3.2-1B's shapes, next to this machine's read bandwidth measured in the same run:
 *   - decode (N = 1): GB/s of NF4 bytes (codes, absmax codes, nested scales) read from memory:
 *     copies of the weight that together exceed the caches (a token's matmuls, one call each);
 *   - prefill (N = 128): GOP/s = 2 N O I / s.
 *   ./build.sh bench nf4          (MEDBOT_THREADS: matmul threads, default all cores)
 *   ./build.sh bench fast         the fast path's table only */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

#define REPS 3

/* a dense BF16 weight of random values (owned) */
static MbWeight random_bf16(size_t rows, size_t cols, uint64_t seed) {
    MbWeight w = {MB_DT_BF16, rows, cols, NULL, NULL};
    uint16_t *h = mb_aligned_alloc(rows * cols * sizeof(uint16_t));
    MbRng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = 0; i < rows * cols; i++) h[i] = f32_to_bf16((float)(0.02 * mb_rng_normal(&rng)));
    w.data = w.owned = h;
    return w;
}

/* an NF4 copy of w (quantized as load_in_4bit does, on pool's threads or this one); seconds it
 * took in *secs */
static MbWeight to_nf4(const MbWeight *w, MbPool *pool, double *secs) {
    MbWeight q = *w;
    q.owned = mb_aligned_alloc(w->rows * w->cols * sizeof(uint16_t));
    memcpy(q.owned, w->data, w->rows * w->cols * sizeof(uint16_t));
    q.data = q.owned;
    double t0 = mb_now();
    if (weight_quantize_nf4(&q, "bench", MB_DT_F32, pool)) {
        fprintf(stderr, "bench: %s\n", mb_last_error());
        exit(1);
    }
    *secs = mb_now() - t0;
    return q;
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

/* ---- the fast path ---- */

#define ARENA_BYTES ((size_t)768 << 20) /* NF4 bytes cycled through per decode pass: > the L3 */

typedef struct {
    const uint64_t *a;
    size_t n;
    uint64_t sum[256];
} ReadTask;

static void read_task(void *ctx, int tid, int nt) {
    ReadTask *t = ctx;
    size_t lo, hi;
    mb_split(t->n, tid, nt, &lo, &hi);
    uint64_t s[8] = {0};
    for (size_t i = lo; i + 8 <= hi; i += 8)
        for (int l = 0; l < 8; l++) s[l] += t->a[i + l];
    t->sum[tid] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}

/* GB/s of summing a (1 GB, written once) on the pool's threads, best of 3 */
static double read_bandwidth(MbPool *pool, const uint64_t *a) {
    ReadTask t = {a, ((size_t)1 << 30) / 8, {0}};
    double best = 1e30;
    for (int r = 0; r < REPS; r++) {
        double t0 = mb_now();
        mb_pool_run(pool, read_task, &t);
        best = MB_MIN(best, mb_now() - t0);
    }
    return (double)(t.n * 8) / best / 1e9;
}

/* `copies` NF4 weights of (O, I), random codes and absmax codes, in one arena (double quant: the
 * layout of a checkpoint saved 4-bit); views[k] points at copy k. */
typedef struct {
    uint8_t *packed, *absmax_q;
    float *nested;
    MbNf4 *state;
    MbWeight *views;
    size_t copies, bytes; /* bytes: NF4 bytes of one copy */
} Arena;

static Arena arena_new(size_t O, size_t I, size_t copies) {
    Arena a;
    size_t n = O * I, nb = n / 64, ns = (nb + 255) / 256;
    a.copies = copies;
    a.bytes = n / 2 + nb + 4 * ns;
    a.packed = mb_aligned_alloc(copies * n / 2);
    a.absmax_q = mb_aligned_alloc(copies * nb);
    a.nested = mb_aligned_alloc(copies * ns * sizeof(float));
    a.state = mb_calloc(copies, sizeof(MbNf4));
    a.views = mb_calloc(copies, sizeof(MbWeight));
    MbRng rng;
    mb_rng_seed(&rng, 5);
    for (size_t i = 0; i < copies * n / 2; i += 8) {
        uint64_t r = mb_rng_u64(&rng);
        memcpy(a.packed + i, &r, 8);
    }
    for (size_t i = 0; i < copies * nb; i++) a.absmax_q[i] = (uint8_t)mb_rng_u64(&rng);
    for (size_t i = 0; i < copies * ns; i++) a.nested[i] = 0.01f;
    for (size_t k = 0; k < copies; k++) {
        MbNf4 *q = &a.state[k];
        q->packed = a.packed + k * n / 2;
        q->blocksize = 64, q->nblocks = nb, q->nested_blocksize = 256;
        q->absmax_q = a.absmax_q + k * nb;
        q->nested_absmax = (const unsigned char *)(a.nested + k * ns);
        q->offset = 0.02f, q->compute = MB_DT_F32;
        nf4_dynamic_map(q->nested_quant_map);
        a.views[k] = (MbWeight){MB_DT_U8, O, I, q, NULL};
    }
    return a;
}

static void arena_free(Arena *a) {
    free(a->packed), free(a->absmax_q), free(a->nested), free(a->state), free(a->views);
}

/* seconds of one matmul per copy, best of REPS passes (after one to warm up) */
static double time_pass(MbOps *ops, const Arena *a, size_t N, const float *x, float *out) {
    double best = 1e30;
    for (int r = 0; r < 1 + REPS; r++) {
        double t0 = mb_now();
        for (size_t k = 0; k < a->copies; k++) ops->matmul_forward(ops, out, x, &a->views[k], N);
        if (r) best = MB_MIN(best, mb_now() - t0);
    }
    return best;
}

static void bench_fast(int threads) {
    printf("fast path (%s kernels) against exact, NF4 at Llama-3.2-1B's shapes, %d threads, random codes; read: "
           "summing 1 GB on the same threads just before (a shared machine's bandwidth varies)\n", FN_KERNEL, threads);
    printf("  %-13s %5s %8s %12s %12s %8s %10s %12s\n", "weight (O, I)", "N", "copies", "exact", "fast", "fast/ex",
           "read", "fast / read");
    static const size_t shapes[][2] = {{2048, 2048}, {512, 2048}, {8192, 2048}, {2048, 8192}};
    MbOps *ops = mb_cpu_ops_new(threads);
    MbPool *pool = ((MbCpu *)ops->ctx)->pool;
    uint64_t *big = mb_aligned_alloc((size_t)1 << 30);
    for (size_t i = 0; i < ((size_t)1 << 30) / 8; i++) big[i] = i;
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        size_t O = shapes[s][0], I = shapes[s][1], N;
        Arena dec = arena_new(O, I, 1), one = dec;
        size_t copies = ARENA_BYTES / dec.bytes + 1;
        arena_free(&dec);
        dec = arena_new(O, I, copies);
        float *x = mb_aligned_alloc(128 * I * sizeof(float)), *out = mb_aligned_alloc(128 * O * sizeof(float));
        MbRng rng;
        mb_rng_seed(&rng, 99);
        for (size_t i = 0; i < 128 * I; i++) x[i] = (float)mb_rng_normal(&rng);
        N = 1; /* decode: GB/s of NF4 bytes from memory */
        ops->fast = 0;
        double te = time_pass(ops, &dec, N, x, out);
        double bw = read_bandwidth(pool, big);
        ops->fast = 1;
        double tf = time_pass(ops, &dec, N, x, out);
        double gb = (double)(dec.bytes * copies) / 1e9;
        printf("  %5zu x %-5zu %5zu %8zu %7.2f GB/s %7.2f GB/s %7.2fx %5.1f GB/s %11.0f%%\n", O, I, N, copies, gb / te,
               gb / tf, te / tf, bw, 100 * gb / tf / bw);
        arena_free(&dec);
        one = arena_new(O, I, 1);
        N = 128; /* prefill: GOP/s */
        ops->fast = 0;
        te = time_pass(ops, &one, N, x, out);
        ops->fast = 1;
        tf = time_pass(ops, &one, N, x, out);
        double gop = 2.0 * (double)N * (double)O * (double)I / 1e9;
        printf("  %5zu x %-5zu %5zu %8d %7.1f GOP/s %6.1f GOP/s %6.2fx\n", O, I, N, 1, gop / te, gop / tf, te / tf);
        arena_free(&one);
        free(x), free(out);
    }
    free(big);
    ops->destroy(ops);
    printf("\n");
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    int fast_only = filter[0] && strstr("nf4-fast", filter) && strstr(filter, "fast");
    if (filter[0] && !strstr("nf4", filter) && !fast_only) return 0;
    const char *th = getenv("MEDBOT_THREADS");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    bench_fast(threads);
    if (fast_only) return 0;
    static const size_t shapes[][2] = {{4096, 4096}, {14336, 4096}};
    static const size_t Ns[] = {1, 256};
    printf("NF4 (bitsandbytes nf4, blocksize 64, double quant) vs bf16 weights; random weights, best of %d\n\n", REPS);

    printf("quantization (load_in_4bit): bitsandbytes-exact codes, absmax and double quant\n");
    printf("  %-14s %10s %8s %12s %16s\n", "weight (O, I)", "bf16 MB", "threads", "seconds", "GB bf16 / s");
    MbPool *pool = mb_pool_new(threads);
    for (size_t s = 0; s < 2; s++) {
        MbWeight w = random_bf16(shapes[s][0], shapes[s][1], 1 + s);
        for (int p = 0; p < 2; p++) {
            double best = 1e30, secs;
            for (int r = 0; r < REPS; r++) {
                MbWeight q = to_nf4(&w, p ? pool : NULL, &secs);
                best = MB_MIN(best, secs);
                weight_free(&q);
            }
            double gb = (double)(w.rows * w.cols * 2) / 1e9;
            printf("  %5zu x %-6zu %10.1f %8d %12.4f %16.3f\n", w.rows, w.cols, gb * 1e3, p ? pool->n : 1, best,
                   gb / best);
        }
        weight_free(&w);
    }
    mb_pool_free(pool);

    printf("\nmatmul out (N, O) = x (N, I) @ W^T, %d threads (fp32 math; weights expanded tile by tile)\n", threads);
    printf("  %-14s %5s %14s %14s %8s %14s\n", "weight (O, I)", "N", "bf16 GFLOP/s", "NF4 GFLOP/s", "NF4/bf16",
           "NF4 MB (bf16)");
    MbOps *ops = mb_cpu_ops_new(threads);
    for (size_t s = 0; s < 2; s++) {
        size_t O = shapes[s][0], I = shapes[s][1];
        MbWeight w = random_bf16(O, I, 10 + s);
        double secs;
        MbWeight q = to_nf4(&w, NULL, &secs);
        const MbNf4 *st = weight_nf4(&q);
        double nf4_mb = (double)(O * I / 2 + st->nblocks + 4 * ((st->nblocks + 255) / 256)) / 1e6;
        for (size_t k = 0; k < 2; k++) {
            size_t N = Ns[k];
            float *x = mb_aligned_alloc(N * I * sizeof(float)), *out = mb_aligned_alloc(N * O * sizeof(float));
            MbRng rng;
            mb_rng_seed(&rng, 99);
            for (size_t i = 0; i < N * I; i++) x[i] = (float)mb_rng_normal(&rng);
            double flop = 2.0 * (double)N * (double)O * (double)I;
            double tb = time_matmul(ops, &w, N, x, out), tq = time_matmul(ops, &q, N, x, out);
            printf("  %5zu x %-6zu %5zu %14.2f %14.2f %7.2fx %7.1f (%.1f)\n", O, I, N, flop / tb / 1e9, flop / tq / 1e9,
                   tb / tq, nf4_mb, (double)(O * I * 2) / 1e6);
            free(x);
            free(out);
        }
        weight_free(&q);
        weight_free(&w);
    }
    ops->destroy(ops);
    return 0;
}
