/* tests/test_fast_nf4.c: the fast NF4 path (MbOps.fast: int8 activations against int8 levels):
 *   - every kernel this build can run (AVX2, AVX-512 VNNI) against the scalar one, on the same
 *     quantized activations: only the fp32 summation order differs (max |err| / max |ref| <= 1e-5),
 *     on rows of 1 .. 130, outputs that fill no tile, blocks per row odd and even, with and
 *     without double quant, and on any split of the outputs (bit for bit);
 *   - the activation quantization itself: q, its sums, the scales, NaN and inf;
 *   - fast against exact through cpu_matmul_forward (ops->fast 1 and 0) on 1 and 2 threads, each
 *     output within 6 sigma of the error the two int8 roundings make (derived per output from
 *     its own values), and the same bits on 1, 2 and 3 threads;
 *   - weights it does not serve (blocks that straddle rows, another blocksize) go to the exact
 *     kernels. */
#include "test.h"

#define FNT_TOL 1e-5

typedef struct {
    const char *name;
    FnMatmul fn;
} FntVariant;

static const FntVariant fnt_variants[] = {
#ifdef FN_HAVE_AVX2
    {"avx2", fn_matmul_avx2},
#endif
#ifdef FN_HAVE_AVX512
    {"avx512-vnni", fn_matmul_avx512},
#endif
    {"scalar", fn_matmul_scalar}, /* last: the reference the others are compared with */
};
#define FNT_VARIANTS (sizeof fnt_variants / sizeof *fnt_variants)

/* (O, I) random fp32 weights (normal, std 0.02, a few rows and blocks larger) quantized to NF4
 * with double quant */
static MbWeight fnt_weight(size_t O, size_t I, uint64_t seed) {
    MbWeight w = {MB_DT_F32, O, I, NULL, NULL};
    float *f = mb_aligned_alloc(O * I * sizeof(float));
    MbRng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = 0; i < O * I; i++) f[i] = (float)(0.02 * mb_rng_normal(&rng));
    for (size_t i = 0; i < O * I; i += 97) f[i] *= 8.0f; /* outliers: blocks of other scales */
    w.data = w.owned = f;
    CHECK_OK(weight_quantize_nf4(&w, "test", MB_DT_F32, NULL));
    return w;
}

/* A copy of the NF4 weight w whose absmax is fp32 (no double quant), the same values */
static MbWeight fnt_plain(const MbWeight *w, float **absmax) {
    const MbNf4 *q = weight_nf4(w);
    MbNf4 *c = mb_aligned_alloc(sizeof *c);
    *c = *q;
    *absmax = mb_malloc(q->nblocks * sizeof(float));
    for (size_t b = 0; b < q->nblocks; b++) (*absmax)[b] = nf4_absmax(q, b);
    c->absmax_q = NULL;
    c->absmax = (const unsigned char *)*absmax;
    MbWeight r = {MB_DT_U8, w->rows, w->cols, c, c};
    return r;
}

/* (N, I) activations: normal, one row 1000x larger, one block of zeros */
static float *fnt_inp(size_t N, size_t I, uint64_t seed) {
    float *x = mb_aligned_alloc(N * I * sizeof(float));
    MbRng rng;
    mb_rng_seed(&rng, seed);
    for (size_t i = 0; i < N * I; i++) x[i] = (float)mb_rng_normal(&rng);
    if (N > 1)
        for (size_t i = 0; i < I; i++) x[I + i] *= 1000.0f;
    memset(x + (N - 1) * I, 0, MB_MIN(I, (size_t)FN_BLOCK) * sizeof(float));
    return x;
}

/* inp quantized as fast_nf4_matmul does (buffer in *buf, to free) */
static FnAct fnt_quantized(const float *inp, size_t N, size_t I, void **buf) {
    *buf = mb_aligned_alloc(fn_act_bytes(N, I));
    FnAct x = fn_act_layout(N, I, *buf);
    for (size_t n = 0; n < N; n++) fn_quantize_row(&x, n, inp + n * I);
    return x;
}

/* max |got - ref| / max |ref| */
static double fnt_rel(const float *got, const float *ref, size_t n) {
    double e = 0, m = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(ref[i])) return INFINITY;
        e = fmax(e, fabs((double)got[i] - ref[i]));
        m = fmax(m, fabs((double)ref[i]));
    }
    return m > 0 ? e / m : e;
}

/* Every variant on every shape against the scalar one; each also computed as two calls over
 * [0, k) and [k, O), which must give the same bits. */
static void fnt_compare(int double_quant) {
    static const size_t Ns[] = {1, 2, 3, 5, 7, 9, 130}, Os[] = {1, 3, 17, 33, 100},
                        Is[] = {64, 128, 192, 640, 2048, 64 * (FN_RUN + 1)}; /* the last: two absmax runs */
    void *tile = mb_aligned_alloc(FN_TILE_BYTES);
    for (size_t ii = 0; ii < sizeof Is / sizeof *Is; ii++) {
        size_t I = Is[ii];
        double worst[FNT_VARIANTS] = {0};
        size_t worst_n[FNT_VARIANTS] = {0}, worst_o[FNT_VARIANTS] = {0}, shapes = 0;
        int split_ok[FNT_VARIANTS];
        for (size_t v = 0; v < FNT_VARIANTS; v++) split_ok[v] = 1;
        for (size_t oi = 0; oi < sizeof Os / sizeof *Os; oi++) {
            size_t O = Os[oi];
            if (I > 2048 && O > 17) continue;
            MbWeight dq = fnt_weight(O, I, 100 + O * 7 + I), plain = {MB_DT_U8, 0, 0, NULL, NULL};
            float *absmax = NULL;
            if (!double_quant) plain = fnt_plain(&dq, &absmax); /* its codes are dq's */
            const MbNf4 *q = weight_nf4(double_quant ? &dq : &plain);
            for (size_t ni = 0; ni < sizeof Ns / sizeof *Ns; ni++) {
                size_t N = Ns[ni];
                if (I > 2048 && N > 9) continue;
                void *buf;
                float *inp = fnt_inp(N, I, 7 * N + O);
                FnAct x = fnt_quantized(inp, N, I, &buf);
                float *ref = mb_malloc(N * O * sizeof(float)), *got = mb_malloc(N * O * sizeof(float)),
                      *two = mb_malloc(N * O * sizeof(float));
                fn_matmul_scalar(&x, q, O, ref, 0, O, tile);
                for (size_t v = 0; v < FNT_VARIANTS; v++) {
                    memset(got, 0xff, N * O * sizeof(float)); /* NaN: every output must be written */
                    fnt_variants[v].fn(&x, q, O, got, 0, O, tile);
                    double e = fnt_rel(got, ref, N * O);
                    if (!(e <= worst[v])) worst[v] = e, worst_n[v] = N, worst_o[v] = O;
                    size_t k = O / 3;
                    memset(two, 0xff, N * O * sizeof(float));
                    fnt_variants[v].fn(&x, q, O, two, 0, k, tile);
                    fnt_variants[v].fn(&x, q, O, two, k, O, tile);
                    if (memcmp(two, got, N * O * sizeof(float))) {
                        if (split_ok[v]) T_FAIL("%s N=%zu O=%zu I=%zu: outputs [0, %zu) and [%zu, %zu) apart differ "
                                                "from [0, %zu) at once", fnt_variants[v].name, N, O, I, k, k, O, O);
                        split_ok[v] = 0;
                    }
                }
                shapes++;
                free(ref), free(got), free(two), free(inp), free(buf);
            }
            weight_free(&plain);
            weight_free(&dq);
            free(absmax);
        }
        for (size_t v = 0; v + 1 < FNT_VARIANTS; v++) {
            printf("    %-11s I=%-4zu %2zu shapes: max|err|/max|ref| %.3e (%5.1f%% of tol %.0e, worst at N=%zu O=%zu)%s\n",
                   fnt_variants[v].name, I, shapes, worst[v], 100 * worst[v] / FNT_TOL, FNT_TOL, worst_n[v],
                   worst_o[v], split_ok[v] ? "; split outputs equal" : "");
            CHECK(worst[v] <= FNT_TOL, "%s I=%zu: %.3e over %.0e", fnt_variants[v].name, I, worst[v], FNT_TOL);
        }
        if (FNT_VARIANTS == 1) printf("    I=%zu: only the scalar kernel in this build (split outputs %s)\n", I,
                                    split_ok[0] ? "equal" : "DIFFER");
    }
    free(tile);
}

static void fast_nf4_kernels_match_scalar(void) {
    printf("    kernel of this build: %s\n", FN_KERNEL);
    fnt_compare(1);
}

static void fast_nf4_kernels_match_scalar_without_double_quant(void) { fnt_compare(0); }

/* fn_quantize_row on values with known answers: q, the sums, the scales, the even/odd order,
 * zeros, NaN and inf */
static void fast_nf4_activation_quantization(void) {
    size_t I = 192, nb = 3; /* odd: the last pair is half empty */
    float x[192];
    for (size_t i = 0; i < I; i++) x[i] = (float)((int)(i % 64) - 32) * 0.125f; /* q = 2 * (i % 64 - 32) */
    x[0] = x[128] = -7.9375f;   /* max|x| = 127 / 16: 1 / d = 16 exactly, q = -127 */
    x[5] = 0.15625f, x[7] = 0.21875f; /* q = 2.5 and 3.5: ties, to even */
    for (size_t i = 64; i < 128; i++) x[i] = 0.0f;
    void *buf;
    FnAct a = fnt_quantized(x, 1, I, &buf);
    CHECK(a.nb == nb && a.pairs == 2, "%zu blocks, %zu pairs", a.nb, a.pairs);
    int bad = 0;
    for (size_t b = 0; b < nb; b++) {
        float m = b == 1 ? 0.0f : 7.9375f, inv = m > 0 ? 127.0f / m : 0.0f;
        CHECK(a.d[b] == m / 127.0f / 127.0f, "block %zu: d %g, want %g", b, a.d[b], m / 127.0f / 127.0f);
        int32_t sum = 0;
        for (size_t i = 0; i < 64; i++) {
            float want = nearbyintf(x[b * 64 + i] * inv);
            const int8_t *qb = a.q + (b / 2) * 128 + (b % 2) * 32 + (i % 2 ? 64 : 0);
            if (qb[i / 2] != (int8_t)want && !bad++)
                T_FAIL("block %zu value %zu: q %d, want %g", b, i, qb[i / 2], (double)want);
            sum += (int32_t)want;
            if (i % 8 == 7) {
                int32_t lane = a.lane[(b / 2) * 16 + (b % 2) * 8 + i / 8], want_lane = 0;
                for (size_t k = i - 7; k <= i; k++) want_lane += (int32_t)nearbyintf(x[b * 64 + k] * inv);
                CHECK(lane == -128 * want_lane, "block %zu lane %zu: %d, want %d", b, i / 8, lane, -128 * want_lane);
            }
        }
        CHECK(a.sum[b] == -128 * sum, "block %zu: sum %d, want %d", b, a.sum[b], -128 * sum);
    }
    CHECK(a.q[64 + 5 / 2] == 2 && a.q[64 + 7 / 2] == 4, "ties round to even: 2.5 -> %d, 3.5 -> %d", a.q[64 + 5 / 2],
          a.q[64 + 7 / 2]);
    CHECK(a.q[0] == -127 && a.q[31] == 60, "the ends of block 0's even values: %d %d", a.q[0], a.q[31]);
    int pad = 0;
    for (size_t i = 0; i < 32; i++) pad |= a.q[128 + 32 + i] | a.q[128 + 96 + i];
    for (size_t l = 8; l < 16; l++) pad |= a.lane[16 + l];
    CHECK(!pad, "the missing block 3 is zeros");
    free(buf);
    x[70] = NAN, x[140] = INFINITY;
    a = fnt_quantized(x, 1, I, &buf);
    CHECK(isnan(a.d[1]) && isnan(a.d[2]) && !isnan(a.d[0]), "NaN and inf make their block's scale NaN");
    printf("    3 blocks: q (round half to even), lane and block sums, scales, padding; NaN/inf -> NaN scale\n");
    free(buf);
}

/* The quantization this build runs (FN_QUANTIZE_ROW) gives fn_quantize_row's bytes: random rows
 * with ties, zeros, -0, subnormal and huge blocks, NaN and inf */
static void fast_nf4_quantization_of_this_build_is_the_scalar_one(void) {
    size_t N = 40, I = 64 * 9;
    float *x = fnt_inp(N, I, 21);
    MbRng rng;
    mb_rng_seed(&rng, 22);
    for (size_t n = 0; n < N; n++) {
        float *r = x + n * I;
        for (size_t i = 0; i < I; i++) /* ties: q = k + 0.5 where 1 / d is a power of two */
            if (n % 4 == 1) r[i] = (float)((int)(mb_rng_u64(&rng) % 254) - 127) * 0.5f / 16.0f;
        r[0] = n % 4 == 1 ? 127.0f / 16.0f : r[0];
        if (n == 2) r[70] = NAN;
        if (n == 3) r[200] = -INFINITY;
        if (n == 5) for (size_t i = 0; i < 64; i++) r[i] = 1e-40f * (float)i;  /* subnormal */
        if (n == 6) for (size_t i = 64; i < 128; i++) r[i] = 3e38f * (i % 2 ? 1 : -1); /* huge */
        if (n == 7) for (size_t i = 128; i < 192; i++) r[i] = -0.0f;
    }
    void *b1 = mb_aligned_alloc(fn_act_bytes(N, I)), *b2 = mb_aligned_alloc(fn_act_bytes(N, I));
    memset(b1, 0x55, fn_act_bytes(N, I)), memset(b2, 0x55, fn_act_bytes(N, I));
    FnAct a = fn_act_layout(N, I, b1), c = fn_act_layout(N, I, b2);
    for (size_t n = 0; n < N; n++) {
        fn_quantize_row(&a, n, x + n * I);
        FN_QUANTIZE_ROW(&c, n, x + n * I);
    }
    int same = !memcmp(b1, b2, fn_act_bytes(N, I));
    CHECK(same, "the build's quantization (%s) differs from fn_quantize_row", FN_QUANTIZER);
    printf("    %zu rows x %zu: the %s quantization %s the scalar one's bytes\n", N, I, FN_QUANTIZER,
           same ? "gives" : "DOES NOT give");
    free(x), free(b1), free(b2);
}

/* Per output of inp @ W^T: the standard deviation of the error the two roundings make, taking
 * each as independent: the level's own rounding error (L/127 - level, known) times x, and q's
 * (uniform over a step of d) times the weight. Then 6 sigma plus fp32 rounding bounds it. */
static void fnt_tolerance(const MbWeight *w, const float *inp, size_t N, float *tol) {
    const MbNf4 *q = weight_nf4(w);
    size_t O = w->rows, I = w->cols;
    int8_t lv[16];
    fn_levels(lv);
    for (size_t n = 0; n < N; n++)
        for (size_t o = 0; o < O; o++) {
            double var = 0, mag = 0;
            for (size_t b = 0; b < I / 64; b++) {
                const float *x = inp + n * I + b * 64;
                double m = 0, a = nf4_absmax(q, o * (I / 64) + b);
                for (int i = 0; i < 64; i++) m = fmax(m, fabs(x[i]));
                double step = m / 127;
                for (int i = 0; i < 64; i++) {
                    size_t e = o * I + b * 64 + (size_t)i;
                    int c = i % 2 ? q->packed[e / 2] & 15 : q->packed[e / 2] >> 4;
                    double level = mb_nf4_code[c], ew = lv[c] / 127.0 - level;
                    var += a * a * (ew * ew * x[i] * x[i] + level * level * step * step / 12);
                    mag += fabs(a * level * x[i]);
                }
            }
            tol[n * O + o] = (float)(6 * sqrt(var) + 1e-5 * mag);
        }
}

/* fast (ops->fast = 1) against exact through the CPU backend on `threads` threads */
static void fnt_against_exact(size_t N, size_t O, size_t I, int threads) {
    MbOps *ops = mb_cpu_ops_new(threads);
    MbWeight w = fnt_weight(O, I, 5 + N + O + I);
    float *inp = fnt_inp(N, I, 11 + N), *tol = mb_malloc(N * O * sizeof(float));
    float *fast = mb_malloc(N * O * sizeof(float)), *exact = mb_malloc(N * O * sizeof(float));
    ops->fast = 0;
    ops->matmul_forward(ops, exact, inp, &w, N);
    ops->fast = 1;
    ops->matmul_forward(ops, fast, inp, &w, N);
    CHECK_OK(mb_ops_status(ops));
    fnt_tolerance(&w, inp, N, tol);
    double share = 0, rel = fnt_rel(fast, exact, N * O);
    size_t worst = 0;
    for (size_t i = 0; i < N * O; i++) {
        double s = fabs((double)fast[i] - exact[i]) / tol[i];
        if (!(s <= share)) share = s, worst = i;
    }
    printf("    N=%-3zu O=%-4zu I=%-4zu %d thr: max|err|/max|ref| %.2e; worst output at %5.1f%% of its 6-sigma "
           "tolerance (n=%zu o=%zu)\n", N, O, I, threads, rel, 100 * share, worst / O, worst % O);
    CHECK(share <= 1.0, "N=%zu O=%zu I=%zu: fast %g, exact %g, tolerance %g", N, O, I, fast[worst], exact[worst],
          tol[worst]);
    free(inp), free(tol), free(fast), free(exact);
    weight_free(&w);
    ops->destroy(ops);
}

static void fast_nf4_against_exact(void) {
    static const size_t shapes[][3] = {{1, 512, 2048}, {1, 100, 192}, {3, 33, 640}, {9, 100, 192},
                                       {130, 33, 2048}, {32, 256, 1024}};
    int sanitized = t_sanitized();
    for (int threads = 1; threads <= 2; threads++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++)
            if (!sanitized || shapes[s][0] * shapes[s][1] * shapes[s][2] <= 2000000)
                fnt_against_exact(shapes[s][0], shapes[s][1], shapes[s][2], threads);
}

static void fast_nf4_same_bits_on_any_thread_count(void) {
    static const size_t shapes[][3] = {{1, 1000, 640}, {2, 33, 128}, {130, 200, 192}, {17, 260, 1024}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        size_t N = shapes[s][0], O = shapes[s][1], I = shapes[s][2];
        MbWeight w = fnt_weight(O, I, 3 + s);
        float *inp = fnt_inp(N, I, 4 + s), *ref = mb_malloc(N * O * sizeof(float));
        float *got = mb_malloc(N * O * sizeof(float));
        int same = 1;
        for (int threads = 1; threads <= 3; threads++) {
            MbOps *ops = mb_cpu_ops_new(threads);
            ops->fast = 1;
            ops->matmul_forward(ops, threads == 1 ? ref : got, inp, &w, N);
            if (threads > 1 && memcmp(ref, got, N * O * sizeof(float))) {
                T_FAIL("N=%zu O=%zu I=%zu: %d threads give other bits than 1", N, O, I, threads);
                same = 0;
            }
            ops->destroy(ops);
        }
        printf("    N=%-3zu O=%-4zu I=%-4zu: 1, 2 and 3 threads %s\n", N, O, I, same ? "give the same bits" : "DIFFER");
        free(inp), free(ref), free(got);
        weight_free(&w);
    }
}

/* Blocks that straddle rows (I % 64 != 0) or another blocksize: fast_nf4_matmul declines and
 * the exact kernels run, with ops->fast set or not. */
static void fast_nf4_declines_what_it_does_not_serve(void) {
    MbOps *ops = mb_cpu_ops_new(2);
    MbCpu *cpu = ops->ctx;
    size_t N = 3, O = 10, I = 96;
    MbWeight w = fnt_weight(O, I, 9);
    float *inp = fnt_inp(N, I, 9), *a = mb_malloc(N * O * sizeof(float)), *b = mb_malloc(N * O * sizeof(float));
    CHECK(fast_nf4_matmul(cpu, a, inp, &w, N) == 0, "I=96 (blocks straddle rows) must go to the exact kernels");
    ops->fast = 0;
    ops->matmul_forward(ops, a, inp, &w, N);
    ops->fast = 1;
    ops->matmul_forward(ops, b, inp, &w, N);
    CHECK(!memcmp(a, b, N * O * sizeof(float)), "I=96 with ops->fast: not the exact kernels' bits");
    weight_free(&w);
    w = fnt_weight(4, 128, 9);
    MbNf4 *q = (MbNf4 *)w.owned;
    q->blocksize = 128, q->nblocks = 4;
    CHECK(fast_nf4_matmul(cpu, a, inp, &w, 1) == 0, "blocksize 128 must go to the exact kernels");
    printf("    I=96 and blocksize 128: declined (0), the exact kernels' bits with ops->fast\n");
    free(inp), free(a), free(b);
    weight_free(&w);
    ops->destroy(ops);
}

MB_TEST_MAIN("fast_nf4", T(fast_nf4_activation_quantization),
             T(fast_nf4_quantization_of_this_build_is_the_scalar_one), T(fast_nf4_kernels_match_scalar),
             T(fast_nf4_kernels_match_scalar_without_double_quant), T(fast_nf4_against_exact),
             T(fast_nf4_same_bits_on_any_thread_count), T(fast_nf4_declines_what_it_does_not_serve))
