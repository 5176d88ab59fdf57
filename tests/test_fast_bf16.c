/* tests/test_fast_bf16.c: the fast path's bf16 matmul (MbOps.fast, medbot.c "bf16 weights"),
 * out (N, O) = inp (N, I) @ W^T with W bf16:
 *   - every variant this build can run (scalar, AVX2 + FMA, AVX-512) against a double-precision
 *     sum, on shapes that end inside a vector, a bf16 pair, a register tile and a packed panel;
 *   - the op table's matmul_forward and logits_forward with ops->fast 0 (the exact kernels) and
 *     1 (the fast ones), on 1 and 2 threads, against the same sums;
 *   - the fast path gives the same bits on 1, 2, 3 and 5 threads.
 * The fast bf16 path keeps the activations in fp32 (each bf16 weight widened exactly), so the
 * tolerance is fp32 rounding of a dot product in any order: |out - sum| <= gamma_I sum |w x|,
 * gamma_I = I u / (1 - I u), u = 2^-24 (Higham, Accuracy and Stability, 3.1). It holds for every
 * correct summation order and is about sqrt(I) times the typical error, so a dropped or doubled
 * term of average size fails it from I ~ 64 up; each check prints the share of it used. */
#include "test.h"

static const size_t fbt_Ns[] = {1, 2, 3, 7, 9, 130};
static const size_t fbt_Os[] = {1, 3, 17, 33, 100};
static const size_t fbt_Is[] = {1, 2, 3, 63, 64, 130, 2048, 4099}; /* 4099: the GEMM blocks inputs by 2048 */
#define FBT_LEN(a) (sizeof a / sizeof *a)
#define FBT_U 0x1.0p-24

/* A bf16 weight (O, I) of 0.02 normal values and activations (N, I) of normal values, from seed */
typedef struct {
    size_t N, O, I;
    uint16_t *w;
    float *x;
    double *ref, *bound; /* (N, O): the double sum, and gamma_I sum |w x| */
} FbtCase;

static FbtCase fbt_case(size_t N, size_t O, size_t I, uint64_t seed) {
    FbtCase c = {N, O, I, NULL, NULL, NULL, NULL};
    c.w = mb_malloc(O * I * sizeof *c.w); /* no slack: the sanitizers see a read past the end */
    c.x = mb_malloc(N * I * sizeof *c.x);
    c.ref = mb_malloc(N * O * sizeof *c.ref);
    c.bound = mb_malloc(N * O * sizeof *c.bound);
    MbRng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = 0; i < O * I; i++) c.w[i] = f32_to_bf16((float)(0.02 * mb_rng_normal(&rng)));
    for (size_t i = 0; i < N * I; i++) c.x[i] = (float)mb_rng_normal(&rng);
    double gamma = (double)I * FBT_U / (1.0 - (double)I * FBT_U);
    for (size_t n = 0; n < N; n++)
        for (size_t o = 0; o < O; o++) {
            double s = 0, a = 0;
            for (size_t i = 0; i < I; i++) {
                double p = (double)bf16_to_f32(c.w[o * I + i]) * (double)c.x[n * I + i];
                s += p;
                a += fabs(p);
            }
            c.ref[n * O + o] = s;
            c.bound[n * O + o] = gamma * a;
        }
    return c;
}

static void fbt_case_free(FbtCase *c) {
    free(c->w), free(c->x), free(c->ref), free(c->bound);
}

/* The worst share of the bound that out (N, O) uses, or a failure (also for NaN) */
static double fbt_share(const FbtCase *c, const float *out, const char *what) {
    double worst = 0;
    for (size_t e = 0; e < c->N * c->O; e++) {
        double err = fabs((double)out[e] - c->ref[e]);
        double share = err == 0 ? 0 : c->bound[e] > 0 ? err / c->bound[e] : INFINITY;
        if (!(share <= 1.0)) {
            T_FAIL("%s N=%zu O=%zu I=%zu: out[%zu][%zu] = %.9g, sum %.9g, |err| %.3g over the bound %.3g", what,
                   c->N, c->O, c->I, e / c->O, e % c->O, out[e], c->ref[e], err, c->bound[e]);
            return INFINITY;
        }
        worst = fmax(worst, share);
    }
    return worst;
}

/* The variants this build can run */
static const FbVariant *const fbt_variants[] = {
    &fb_scalar,
#if defined(__AVX2__) && defined(__FMA__)
    &fb_avx2,
#endif
#if defined(__AVX512F__)
    &fb_avx512,
#endif
};

/* "I=1 100% I=2 40% ...": the worst share of the bound per input size */
static void fbt_print_shares(const char *what, const double worst[]) {
    printf("    %-14s", what);
    for (size_t d = 0; d < FBT_LEN(fbt_Is); d++) printf(" I=%zu %.1f%%", fbt_Is[d], 100 * worst[d]);
    printf("\n");
}

static void variants_match_fp32_sums(void) {
    printf("    worst |err| per I as a share of gamma_I sum|w x| (N = 1 .. 130, O = 1 .. 100):\n");
    for (size_t v = 0; v < FBT_LEN(fbt_variants); v++) {
        const FbVariant *var = fbt_variants[v];
        float *scratch = mb_aligned_alloc((var->scratch + 1) * sizeof(float));
        double worst[FBT_LEN(fbt_Is)] = {0};
        for (size_t a = 0; a < FBT_LEN(fbt_Ns); a++)
            for (size_t b = 0; b < FBT_LEN(fbt_Os); b++)
                for (size_t d = 0; d < FBT_LEN(fbt_Is); d++) {
                    size_t N = fbt_Ns[a], O = fbt_Os[b], I = fbt_Is[d];
                    FbtCase c = fbt_case(N, O, I, 1000 * a + 100 * b + d);
                    float *out = mb_malloc(N * O * sizeof *out);
                    for (size_t e = 0; e < N * O; e++) out[e] = NAN; /* every output must be written */
                    var->rows(out, c.x, c.w, N, O, I, 0, O, scratch);
                    worst[d] = fmax(worst[d], fbt_share(&c, out, var->name));
                    free(out);
                    fbt_case_free(&c);
                }
        fbt_print_shares(var->name, worst);
        free(scratch);
    }
    printf("    (this build runs %s on the fast path)\n", fb_best() ? fb_best()->name : "the exact kernels");
}

/* matmul_forward and logits_forward through the CPU op table, exact (fast 0) and fast (1), on 1
 * and 2 threads */
static void fast_path_matches_exact_path(void) {
    for (int threads = 1; threads <= 2; threads++) {
        MbOps *ops = mb_cpu_ops_new(threads);
        double worst[2][FBT_LEN(fbt_Is)] = {{0}};
        size_t mismatched_logits = 0;
        for (size_t a = 0; a < FBT_LEN(fbt_Ns); a++)
            for (size_t b = 0; b < FBT_LEN(fbt_Os); b++)
                for (size_t d = 0; d < FBT_LEN(fbt_Is); d++) {
                    size_t N = fbt_Ns[a], O = fbt_Os[b], I = fbt_Is[d];
                    FbtCase c = fbt_case(N, O, I, 7 + 1000 * a + 100 * b + d);
                    MbWeight w = {MB_DT_BF16, O, I, c.w, NULL};
                    float *out = mb_malloc(N * O * sizeof *out), *logits = mb_malloc(N * O * sizeof *logits);
                    for (int fast = 0; fast <= 1; fast++) {
                        ops->fast = fast;
                        ops->matmul_forward(ops, out, c.x, &w, N);
                        worst[fast][d] = fmax(worst[fast][d], fbt_share(&c, out, fast ? "fast" : "exact"));
                        ops->logits_forward(ops, logits, c.x, &w, N);
                        mismatched_logits += memcmp(out, logits, N * O * sizeof *out) != 0;
                    }
                    free(out), free(logits);
                    fbt_case_free(&c);
                }
        CHECK_OK(mb_ops_status(ops));
        CHECK(mismatched_logits == 0, "%zu shapes: logits_forward differs from matmul_forward", mismatched_logits);
        char what[32];
        snprintf(what, sizeof what, "exact, %d thr", threads);
        fbt_print_shares(what, worst[0]);
        snprintf(what, sizeof what, "fast, %d thr", threads);
        fbt_print_shares(what, worst[1]);
        ops->destroy(ops);
    }
}

static void thread_count_does_not_change_the_result(void) {
    static const size_t Ns[] = {1, 3, 7, 130}, Os[] = {1, 17, 100, 1000}, Is[] = {63, 130};
    static const int threads[] = {1, 2, 3, 5};
    MbOps *ops[4];
    for (size_t t = 0; t < 4; t++) {
        ops[t] = mb_cpu_ops_new(threads[t]);
        ops[t]->fast = 1;
    }
    size_t shapes = 0;
    for (size_t a = 0; a < FBT_LEN(Ns); a++)
        for (size_t b = 0; b < FBT_LEN(Os); b++)
            for (size_t d = 0; d < FBT_LEN(Is); d++) {
                size_t N = Ns[a], O = Os[b], I = Is[d];
                FbtCase c = fbt_case(N, O, I, 99 + a + 10 * b + 100 * d);
                MbWeight w = {MB_DT_BF16, O, I, c.w, NULL};
                float *one = mb_malloc(N * O * sizeof *one), *more = mb_malloc(N * O * sizeof *more);
                ops[0]->matmul_forward(ops[0], one, c.x, &w, N);
                fbt_share(&c, one, "1 thread");
                for (size_t t = 1; t < 4; t++) {
                    ops[t]->matmul_forward(ops[t], more, c.x, &w, N);
                    CHECK(!memcmp(one, more, N * O * sizeof *one), "N=%zu O=%zu I=%zu: %d threads differ from 1", N,
                          O, I, threads[t]);
                }
                shapes++;
                free(one), free(more);
                fbt_case_free(&c);
            }
    for (size_t t = 0; t < 4; t++) ops[t]->destroy(ops[t]);
    printf("    %zu shapes: 2, 3 and 5 threads give 1 thread's bits\n", shapes);
}

MB_TEST_MAIN("fast_bf16", T(variants_match_fp32_sums), T(fast_path_matches_exact_path),
             T(thread_count_does_not_change_the_result))
