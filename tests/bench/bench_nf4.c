/* tests/bench/bench_nf4.c: NF4 on the CPU, measured in one run next to bf16:
 *   - quantization (load_in_4bit): GB of bf16 weights quantized per second, on one thread and on
 *     MEDBOT_THREADS (the load's pool);
 *   - matmul out (N, O) = x (N, I) @ W^T with W in NF4 (double quant, dequantized a tile at a
 *     time) and in bf16, decode-shaped (N = 1) and prefill-shaped (N = 256), at Llama-3.1-8B's
 *     4096 x 4096 (q_proj, o_proj) and 14336 x 4096 (gate_proj, up_proj): GFLOP/s = 2 N O I / s.
 * Random weights (normal, std 0.02), best of 3. It asserts nothing about speed.
 *   ./build.sh bench nf4          (MEDBOT_THREADS: matmul threads, default all cores) */
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

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    if (filter[0] && !strstr("nf4", filter)) return 0;
    const char *th = getenv("MEDBOT_THREADS");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
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
