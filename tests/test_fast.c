/* tests/test_fast.c: the fast path's switch and its 8-bit lm_head (the NF4 and bf16 kernels have
 * test_fast_nf4.c and test_fast_bf16.c):
 *   - every q8 dot the build can run equals the scalar one (integer sums: only the fp32 order of the
 *     block sums differs), on one block, odd block counts and a long row;
 *   - fast_q8_matmul against the fp32 product of the original weight, within the bound the two
 *     roundings to 8 bits allow, on 1 and 2 threads (the same bits);
 *   - a model loaded with fast and load_in_4bit holds the 8-bit lm_head and its logits stay near
 *     the exact path's; without fast, or with bf16 projections, it holds none and mb_model_forward
 *     gives the exact path's bits; the training forward never takes the fast path. */
#include "test.h"

static float t_uniform(MbRng *r) { return (float)(mb_rng_u64(r) >> 11) * (1.0f / 9007199254740992.0f) * 2.0f - 1.0f; }

static void q8_dot_variants_equal_scalar(void) {
    MbRng rng;
    mb_rng_seed(&rng, 7);
    static const size_t nbs[] = {1, 2, 3, 7, 32, 129};
    for (size_t k = 0; k < sizeof nbs / sizeof *nbs; k++) {
        size_t nb = nbs[k], n = nb * MB_Q8_BLOCK;
        int8_t *w = mb_malloc(n), *x = mb_malloc(n);
        float *ws = mb_malloc(nb * sizeof *ws), *xs = mb_malloc(nb * sizeof *xs);
        for (size_t i = 0; i < n; i++) {
            w[i] = (int8_t)((int)(mb_rng_u64(&rng) % 255) - 127); /* the full range, -127 and 127 included */
            x[i] = (int8_t)((int)(mb_rng_u64(&rng) % 255) - 127);
        }
        for (size_t b = 0; b < nb; b++) ws[b] = 0.01f + 0.001f * (float)b, xs[b] = 0.02f - 1e-5f * (float)b;
        float ref = q8_dot_scalar(w, ws, x, xs, nb), got[2] = {ref, ref};
        const char *names[2] = {"avx2", "avx512 vnni"};
        int have[2] = {0, 0};
#if defined(__AVX2__) && defined(__FMA__)
        got[0] = q8_dot_avx2(w, ws, x, xs, nb), have[0] = 1;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
        got[1] = q8_dot_avx512(w, ws, x, xs, nb), have[1] = 1;
#endif
        double mag = 0;
        for (size_t b = 0; b < nb; b++) mag += 64.0 * 127 * 127 * ws[b] * xs[b];
        for (int v = 0; v < 2; v++) {
            if (!have[v]) continue;
            char what[64];
            snprintf(what, sizeof what, "q8 dot %s, %zu blocks", names[v], nb);
            double rel = fabs((double)got[v] - (double)ref) / mag;
            printf("    %-48s |got - scalar| / max sum %.3e (tol 1e-6)\n", what, rel);
            CHECK(rel <= 1e-6, "%s: %g vs %g", what, got[v], ref);
        }
        if (k == 0) printf("    (variants in this build:%s%s scalar)\n", have[0] ? " avx2" : "", have[1] ? " avx512-vnni" : "");
        free(w), free(x), free(ws), free(xs);
    }
}

/* out against the fp32 product, per output within the bound of the two 8-bit roundings:
 * each value moves by at most half its block's step (scale / 2) */
static void q8_matmul_within_the_rounding_bound(void) {
    static const size_t shapes[][3] = {{1, 1, 64}, {1, 37, 128}, {3, 100, 192}, {9, 33, 2048}};
    MbRng rng;
    mb_rng_seed(&rng, 11);
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        size_t N = shapes[k][0], O = shapes[k][1], I = shapes[k][2], nb = I / MB_Q8_BLOCK;
        uint16_t *wb = mb_malloc(O * I * sizeof *wb);
        float *wf = mb_malloc(O * I * sizeof *wf), *x = mb_malloc(N * I * sizeof *x);
        for (size_t i = 0; i < O * I; i++) wb[i] = f32_to_bf16(0.05f * t_uniform(&rng)), wf[i] = bf16_to_f32(wb[i]);
        for (size_t i = 0; i < N * I; i++) x[i] = 3.0f * t_uniform(&rng) * (i % 97 == 0 ? 20.0f : 1.0f); /* outliers */
        MbWeight w = {MB_DT_BF16, O, I, wb, NULL}, q;
        float *out[2];
        for (int th = 1; th <= 2; th++) {
            MbPool *pool = mb_pool_new(th);
            CHECK_OK(weight_to_q8(&w, pool, &q));
            mb_pool_free(pool);
            MbOps *ops = mb_cpu_ops_new(th);
            out[th - 1] = mb_malloc(N * O * sizeof(float));
            ops->fast = 1;
            ops->matmul_forward(ops, out[th - 1], x, &q, N);
            CHECK_OK(mb_ops_status(ops));
            ops->destroy(ops);
            if (th == 1) weight_free(&q);
        }
        double worst = 0;
        for (size_t n = 0; n < N; n++)
            for (size_t o = 0; o < O; o++) {
                double ref = 0, bound = 1e-6;
                for (size_t b = 0; b < nb; b++) {
                    double aw = 0, ax = 0, sw = 0, sx = 0;
                    for (size_t i = b * 64; i < b * 64 + 64; i++) {
                        ref += (double)wf[o * I + i] * x[n * I + i];
                        aw = fmax(aw, fabs(wf[o * I + i])), ax = fmax(ax, fabs(x[n * I + i]));
                        sw += fabs(wf[o * I + i]), sx += fabs(x[n * I + i]);
                    }
                    bound += (aw / 254 * sx + ax / 254 * sw + 64 * aw / 254 * ax / 254) * 1.001 + 1e-6 * aw * sx;
                }
                worst = fmax(worst, fabs(out[0][n * O + o] - ref) / bound);
            }
        printf("    q8 matmul %zu x %zu x %zu: worst |err| / rounding bound %.3f\n", N, O, I, worst);
        CHECK(worst <= 1.0, "q8 matmul %zu x %zu x %zu over the rounding bound (%.3f)", N, O, I, worst);
        CHECK(!memcmp(out[0], out[1], N * O * sizeof(float)), "q8 matmul: 2 threads give other bits than 1");
        weight_free(&q);
        free(out[0]), free(out[1]), free(wb), free(wf), free(x);
    }
}

/* an activation block holding NaN or inf gives NaN outputs (no undefined cast), the others stay */
static void q8_nonfinite_activations_give_nan(void) {
    size_t O = 3, I = 128;
    uint16_t wb[3 * 128];
    for (size_t i = 0; i < O * I; i++) wb[i] = f32_to_bf16(0.01f * (float)(i % 13) - 0.05f);
    MbWeight w = {MB_DT_BF16, O, I, wb, NULL}, q;
    MbPool *pool = mb_pool_new(1);
    CHECK_OK(weight_to_q8(&w, pool, &q));
    mb_pool_free(pool);
    MbOps *ops = mb_cpu_ops_new(1);
    float x[3 * 128], out[3 * 3];
    for (size_t i = 0; i < 3 * I; i++) x[i] = 0.5f;
    x[5] = NAN, x[I + 70] = INFINITY;
    ops->fast = 1;
    ops->matmul_forward(ops, out, x, &q, 3);
    for (size_t o = 0; o < O; o++) {
        CHECK(isnan(out[o]) && isnan(out[O + o]), "row with NaN / inf: output %zu is %g / %g", o, out[o], out[O + o]);
        CHECK(isfinite(out[2 * O + o]), "a finite row stays finite: %g", out[2 * O + o]);
    }
    printf("    NaN and inf activations -> NaN outputs; the finite row finite\n");
    ops->destroy(ops);
    weight_free(&q);
}

/* logits of a few positions through mb_model_forward */
static float *t_logits(const char *dir, int load_in_4bit, int fast, int32_t *ids, int T, MbModel **keep) {
    MbLoadOptions o;
    memset(&o, 0, sizeof o);
    o.threads = 2, o.load_in_4bit = load_in_4bit, o.fast = fast;
    MbModel *m = NULL;
    CHECK_OK(mb_model_load(dir, &o, &m));
    if (!m) return NULL;
    size_t V = (size_t)m->cfg.vocab_size;
    for (int i = 0; i < T; i++) ids[i] = (int32_t)((i * 7919 + 13) % (int)V);
    float *lg = mb_malloc((size_t)T * V * sizeof *lg);
    CHECK_OK(mb_model_forward(m, NULL, ids, 1, T, NULL, lg, 0));
    if (keep) *keep = m;
    else mb_model_free(m);
    return lg;
}

static void fast_model_holds_an_8bit_lm_head_only_with_nf4(void) {
    const char *dir = "tests/fixtures/llama/tied_mqa_bf16"; /* C = 64 */
    int32_t ids[24];
    MbModel *m;
    float *ex = t_logits(dir, 1, 0, ids, 24, &m);
    if (!ex) return;
    size_t V = (size_t)m->cfg.vocab_size;
    CHECK(!m->lm_head_q8.data, "exact NF4 model: no 8-bit lm_head");
    mb_model_free(m);
    float *fa = t_logits(dir, 1, 1, ids, 24, &m);
    if (!fa) return;
    CHECK(m->lm_head_q8.data && m->lm_head_q8.dtype == MB_DT_I8, "fast NF4 model: the 8-bit lm_head");
    /* the training forward of the same model is exact: the fast switch is mb_model_forward's only */
    int pos[23];
    int32_t tgt[23];
    for (int i = 0; i < 23; i++) pos[i] = i, tgt[i] = ids[i + 1];
    float lp[23], ls[23], lp_ex[23], ls_ex[23];
    CHECK_OK(model_forward_rows(m, ids, NULL, 1, 24, pos, tgt, 23, lp, ls, 0));
    mb_model_free(m);
    MbModel *me;
    float *unused = t_logits(dir, 1, 0, ids, 24, &me);
    if (me) {
        CHECK_OK(model_forward_rows(me, ids, NULL, 1, 24, pos, tgt, 23, lp_ex, ls_ex, 0));
        mb_model_free(me);
        CHECK(!memcmp(lp, lp_ex, sizeof lp) && !memcmp(ls, ls_ex, sizeof ls),
              "the training forward of a fast model gives the exact path's bits");
    }
    free(unused);
    t_close_rel("fast NF4 (8-bit lm_head) logits vs exact", fa, ex, 24 * V, 0.05);
    free(fa), free(ex);
    /* bf16 projections: no 8-bit lm_head */
    float *fb = t_logits(dir, 0, 1, ids, 24, &m);
    if (fb) {
        CHECK(!m->lm_head_q8.data, "fast bf16 model: lm_head stays bf16");
        mb_model_free(m);
    }
    free(fb);
}

/* f32 weights are not the fast path's: fast and exact give the same bits */
static void f32_weights_take_the_exact_path(void) {
    int32_t ids[16];
    float *ex = t_logits("tests/fixtures/llama/gqa2_f32", 0, 0, ids, 16, NULL);
    float *fa = t_logits("tests/fixtures/llama/gqa2_f32", 0, 1, ids, 16, NULL);
    if (ex && fa) CHECK(!memcmp(ex, fa, 16 * 517 * sizeof(float)), "f32 model: fast and exact logits differ");
    free(ex), free(fa);
}

MB_TEST_MAIN("fast", T(q8_dot_variants_equal_scalar), T(q8_matmul_within_the_rounding_bound), T(q8_nonfinite_activations_give_nan),
             T(fast_model_holds_an_8bit_lm_head_only_with_nf4), T(f32_weights_take_the_exact_path))
