/* tests/test_nf4.c: NF4 with double quantization against bitsandbytes 0.49.1 and transformers
 * 4.57.6 (fixtures from tests/ref/make_nf4_fixtures.py):
 *   - quantization: packed codes, absmax codes, nested scales, offset and both maps equal byte for
 *     byte, on shapes whose blocks straddle rows or end short, on ties and exact codes;
 *   - dequantization (fp32, bf16, f16) equal to the last bit, through rows and matmul tiles;
 *   - the forward pass on 4-bit weights against transformers + bitsandbytes: max |logit - ref| /
 *     max |ref| <= 1e-5 with compute dtype float32, <= 1e-2 with bfloat16 (whose reference also
 *     rounds activations to bf16), <= 1e-5 against bf16-rounded weights with fp32 activations;
 *   - checkpoints saved 4-bit by transformers load and give the same logits; broken ones fail
 *     with one line naming the file;
 *   - medbot info --plan on Llama-3.1-8B's config.json. */
#include "test.h"

#define Q_FIX "tests/fixtures/nf4/quant.safetensors"
#define F_FIX "tests/fixtures/nf4/forward.safetensors"
#define FWD_TOL 1e-5
#define BF16_TOL 1e-2

static const char *models[] = {"gqa2_f32", "gqa4_bf16_sharded", "tied_mqa_bf16"};
#define N_MODELS (sizeof models / sizeof *models)

/* A fixture tensor copied out (aligned), or NULL with a failure. */
static void *fix_tensor(MbSafetensors *st, const char *name, MbDtype dt, size_t *numel) {
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    CHECK(t && t->dtype == dt, "fixture tensor %s (%s)", name, mb_dtype_name(dt));
    if (!t || t->dtype != dt) return NULL;
    void *p = mb_malloc(t->nbytes);
    memcpy(p, t->data, t->nbytes);
    if (numel) *numel = t->numel;
    return p;
}

/* Byte equality with the first difference reported. */
static int t_equal_bytes(const char *what, const void *got, const void *want, size_t n) {
    const unsigned char *g = got, *w = want;
    for (size_t i = 0; i < n; i++)
        if (g[i] != w[i]) {
            T_FAIL("%s: first difference at byte %zu of %zu: got 0x%02x, want 0x%02x", what, i, n, g[i], w[i]);
            return 0;
        }
    return 1;
}

/* The dense weight of fixture case k and its bitsandbytes quantization (NULL: no such case). */
static const MbTensorInfo *quant_case(MbSafetensors *st, int k, MbWeight *w) {
    char name[64];
    snprintf(name, sizeof name, "case%d.input", k);
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    if (!t) return NULL;
    CHECK_OK(weight_from_tensor(t, t->shape[0], t->shape[1], w));
    return t;
}

static MbNf4 *state_of(MbWeight *w) { return (MbNf4 *)w->owned; }

static void nf4_quantize_matches_bitsandbytes(void) {
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(Q_FIX, &st));
    if (!st) return;
    MbPool *pool = mb_pool_new(3); /* odd cases are quantized on 3 threads: the same bytes */
    int cases = 0;
    for (int k = 0;; k++) {
        MbWeight w;
        const MbTensorInfo *t = quant_case(st, k, &w);
        if (!t) break;
        cases++;
        char name[64], what[128];
        size_t n = w.rows * w.cols, nb = (n + 63) / 64, ns = (nb + 255) / 256, got_n;
        MbDtype dt = w.dtype;
        CHECK_OK(weight_quantize_nf4(&w, "case", MB_DT_F32, k % 2 ? pool : NULL));
        const MbNf4 *q = weight_nf4(&w);
        CHECK(q && w.dtype == MB_DT_U8 && q->nblocks == nb && q->absmax_q, "case %d is NF4 with %zu blocks", k, nb);
        if (!q) continue;
        static const char *parts[] = {"packed", "absmax", "nested_absmax", "offset", "quant_map", "nested_quant_map"};
        const void *mine[] = {q->packed, q->absmax_q, q->nested_absmax, &q->offset, mb_nf4_code, q->nested_quant_map};
        MbDtype dts[] = {MB_DT_U8, MB_DT_U8, MB_DT_F32, MB_DT_F32, MB_DT_F32, MB_DT_F32};
        size_t counts[] = {n / 2, nb, ns, 1, 16, 256};
        int ok = 1;
        for (int i = 0; i < 6; i++) {
            snprintf(name, sizeof name, "case%d.%s", k, parts[i]);
            void *ref = fix_tensor(st, name, dts[i], &got_n);
            if (!ref) continue;
            CHECK(got_n == counts[i], "%s: %zu values, want %zu", name, got_n, counts[i]);
            snprintf(what, sizeof what, "case %d %s", k, parts[i]);
            if (got_n == counts[i]) ok &= t_equal_bytes(what, mine[i], ref, counts[i] * mb_dtype_size(dts[i]));
            free(ref);
        }
        printf("    case %2d (%3zu, %3zu) %-4s %5zu blocks: packed codes, %zu absmax codes, %zu nested scales, "
               "offset, maps: %s\n", k, t->shape[0], t->shape[1], mb_dtype_name(dt), nb, nb, ns,
               ok ? "equal byte for byte" : "DIFFERENT");
        weight_free(&w);
    }
    CHECK(cases >= 14, "%d cases in %s", cases, Q_FIX);
    mb_pool_free(pool);
    mb_safetensors_close(st);
}

/* Dequantizes all of w through weight_row_f32 in pieces of `piece` columns (ranges that start
 * and end anywhere in a block) and through weight_tile_t tiles of (tr, tc). */
static void dequant_both_ways(const MbWeight *w, size_t piece, size_t tr, size_t tc, float *rows, float *tiles) {
    for (size_t r = 0; r < w->rows; r++)
        for (size_t c0 = 0; c0 < w->cols; c0 += piece)
            weight_row_f32(w, r, c0, MB_MIN(piece, w->cols - c0), rows + r * w->cols + c0);
    float *buf = mb_malloc(tr * tc * sizeof(float));
    for (size_t r0 = 0; r0 < w->rows; r0 += tr)
        for (size_t c0 = 0; c0 < w->cols; c0 += tc) {
            size_t nr = MB_MIN(tr, w->rows - r0), nc = MB_MIN(tc, w->cols - c0);
            weight_tile_t(w, r0, nr, c0, nc, buf, tr);
            for (size_t c = 0; c < nc; c++)
                for (size_t r = 0; r < nr; r++) tiles[(r0 + r) * w->cols + c0 + c] = buf[c * tr + r];
        }
    free(buf);
}

static void nf4_dequant_matches_bitsandbytes(void) {
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(Q_FIX, &st));
    if (!st) return;
    static const MbDtype computes[] = {MB_DT_F32, MB_DT_BF16, MB_DT_F16};
    static const char *suffix[] = {"f32", "bf16", "f16"};
    for (int k = 0;; k++) {
        MbWeight w;
        if (!quant_case(st, k, &w)) break;
        CHECK_OK(weight_quantize_nf4(&w, "case", MB_DT_F32, NULL));
        size_t n = w.rows * w.cols;
        float *rows = mb_malloc(n * sizeof(float)), *tiles = mb_malloc(n * sizeof(float));
        for (int c = 0; c < 3; c++) {
            state_of(&w)->compute = computes[c];
            char name[64], what[128];
            snprintf(name, sizeof name, "case%d.dequant_%s", k, suffix[c]);
            size_t got_n;
            void *ref = fix_tensor(st, name, computes[c], &got_n);
            if (!ref || got_n != n) {
                CHECK(0, "%s has %zu values, want %zu", name, ref ? got_n : 0, n);
                free(ref);
                continue;
            }
            dequant_both_ways(&w, 37, 5, 29, rows, tiles);
            float *want = mb_malloc(n * sizeof(float));
            mb_convert_to_f32(computes[c], ref, want, n);
            snprintf(what, sizeof what, "case %d dequant %s (rows)", k, suffix[c]);
            int ok = t_equal_bytes(what, rows, want, n * sizeof(float));
            snprintf(what, sizeof what, "case %d dequant %s (tiles)", k, suffix[c]);
            ok &= t_equal_bytes(what, tiles, want, n * sizeof(float));
            if (c == 0) { /* the matmul's own tile shape too */
                dequant_both_ways(&w, 256, 32, 256, rows, tiles);
                ok &= t_equal_bytes("dequant f32 (32 x 256 tiles)", tiles, want, n * sizeof(float));
            }
            printf("    case %2d dequant %-4s: %zu values %s (lookups: %s)\n", k, suffix[c], n,
                   ok ? "equal to the last bit" : "DIFFERENT", MB_NF4_LOOKUP);
            free(want);
            free(ref);
        }
        free(rows);
        free(tiles);
        weight_free(&w);
    }
    mb_safetensors_close(st);
}

/* The double quant's 8-bit kernel on fp32 values placed exactly on ties between map entries. */
static void nf4_blockwise8_ties_go_to_the_lower_entry(void) {
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(Q_FIX, &st));
    if (!st) return;
    size_t n, nb, nm;
    float *a = fix_tensor(st, "blockwise8.input", MB_DT_F32, &n);
    uint8_t *codes = fix_tensor(st, "blockwise8.codes", MB_DT_U8, NULL);
    float *scales = fix_tensor(st, "blockwise8.absmax", MB_DT_F32, &nb);
    float *map = fix_tensor(st, "blockwise8.code", MB_DT_F32, &nm);
    if (a && codes && scales && map && nm == 256) {
        float mine_map[256], *mine_scales = mb_malloc(nb * sizeof(float));
        uint8_t *mine = mb_malloc(n);
        nf4_dynamic_map(mine_map);
        t_equal_bytes("dynamic map (entry 0 = -1)", mine_map, map, sizeof mine_map);
        CHECK(nb == (n + 255) / 256, "%zu scales for %zu values", nb, n);
        blockwise8_quantize(a, n, 256, mine_map, mine, mine_scales);
        int ok = t_equal_bytes("8-bit codes", mine, codes, n) & t_equal_bytes("8-bit scales", mine_scales, scales, 4 * nb);
        printf("    %zu values, %zu blocks: codes and scales %s\n", n, nb, ok ? "equal" : "DIFFERENT");
        free(mine);
        free(mine_scales);
    }
    free(a);
    free(codes);
    free(scales);
    free(map);
    mb_safetensors_close(st);
}

/* torch.mean's fp32 summation order (the double quant's offset), lengths 1 .. 32767. */
static void nf4_offset_sums_in_torch_order(void) {
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(Q_FIX, &st));
    if (!st) return;
    int k = 0, equal = 0, naive_equal = 0;
    for (;; k++) {
        char name[64];
        snprintf(name, sizeof name, "sum%d.input", k);
        if (!mb_safetensors_find(st, name)) break;
        size_t n;
        float *x = fix_tensor(st, name, MB_DT_F32, &n);
        snprintf(name, sizeof name, "sum%d.mean", k);
        float *mean = fix_tensor(st, name, MB_DT_F32, NULL);
        if (x && mean) {
            float got = torch_sum_f32(x, n) / (float)n, naive = 0.0f;
            for (size_t i = 0; i < n; i++) naive += x[i];
            naive /= (float)n;
            CHECK(!memcmp(&got, mean, 4), "mean of %zu values: got %.9g, torch %.9g", n, (double)got, (double)*mean);
            equal += !memcmp(&got, mean, 4), naive_equal += !memcmp(&naive, mean, 4);
        }
        free(x);
        free(mean);
    }
    CHECK(k >= 20, "%d sums", k);
    printf("    %d lengths: torch's order gives torch's mean %d times (a left-to-right sum: %d)\n", k, equal, naive_equal);
    mb_safetensors_close(st);
}

/* The branch-free code lookup agrees with the nearest-code rule it was built from. */
static void nf4_thresholds_agree_with_the_nearest_rule(void) {
    float t[15];
    nf4_thresholds(t);
    MbRng rng;
    mb_rng_seed(&rng, 3);
    size_t bad = 0, n = 0;
    for (int i = 0; i < 15; i++) { /* around every threshold, and its tie */
        float s = t[i];
        for (int k = 0; k < 8; k++) s = nextafterf(s, -INFINITY);
        for (int k = 0; k < 17; k++, s = nextafterf(s, INFINITY)) {
            int c = 0;
            for (int j = 0; j < 15; j++) c += s >= t[j];
            bad += c != code_nearest(mb_nf4_code, 16, s), n++;
        }
    }
    for (int i = 0; i < 200000; i++) {
        float s = (float)(2.0 * mb_rng_uniform(&rng) - 1.0);
        int c = 0;
        for (int j = 0; j < 15; j++) c += s >= t[j];
        bad += c != code_nearest(mb_nf4_code, 16, s), n++;
    }
    CHECK(bad == 0, "%zu of %zu values disagree", bad, n);
    for (int i = 0; i < 16; i++) CHECK(code_nearest(mb_nf4_code, 16, mb_nf4_code[i]) == i, "code %d maps to itself", i);
    CHECK(code_nearest(mb_nf4_code, 16, NAN) == 0, "NaN -> code 0 (torch.argmin)");
    printf("    %zu values: thresholds and nearest-code rule agree\n", n);
}

typedef struct {
    MbModel *m;
    MbSafetensors *ref;
} Fix;

static int open_model(const char *dir, int load_in_4bit, const char *compute, int threads, MbModel **m) {
    MbLoadOptions opt = {.threads = threads, .load_in_4bit = load_in_4bit, .bnb_4bit_compute_dtype = compute};
    *m = NULL;
    CHECK_OK(mb_model_load(dir, &opt, m));
    return *m != NULL;
}

/* logits (B, T, V) of the model on the fixture's tokens of `model` */
static float *run_tokens(MbModel *m, MbSafetensors *ref, const char *tok_name, size_t *B, size_t *T) {
    const MbTensorInfo *t = mb_safetensors_find(ref, tok_name);
    CHECK(t && t->dtype == MB_DT_I32 && t->ndim == 2, "%s", tok_name);
    if (!t) return NULL;
    *B = t->shape[0], *T = t->shape[1];
    int32_t *tok = fix_tensor(ref, tok_name, MB_DT_I32, NULL);
    size_t V = (size_t)m->cfg.vocab_size;
    float *logits = mb_malloc(*B * *T * V * sizeof(float));
    CHECK_OK(mb_model_forward(m, NULL, tok, (int)*B, (int)*T, NULL, logits, 0));
    free(tok);
    return logits;
}

static void nf4_forward_matches_transformers(void) {
    MbSafetensors *ref;
    CHECK_OK(mb_safetensors_open(F_FIX, &ref));
    if (!ref) return;
    for (size_t i = 0; i < N_MODELS; i++) {
        char dir[128], name[128], what[160];
        snprintf(dir, sizeof dir, "tests/fixtures/llama/%s", models[i]);
        static const char *computes[] = {"float32", "bfloat16"};
        for (int c = 0; c < 2; c++) {
            MbModel *m;
            if (!open_model(dir, 1, computes[c], 2, &m)) continue;
            int nf4 = 0;
            for (int l = 0; l < m->cfg.num_hidden_layers; l++)
                for (int k = 0; k < MB_LAYER_WEIGHTS; k++) nf4 += weight_nf4(&m->layers[l].w[k]) != NULL;
            CHECK(nf4 == 7 * m->cfg.num_hidden_layers && !weight_nf4(&m->embed_tokens) && !weight_nf4(&m->lm_head),
                  "the 7 projections of each layer are NF4, the rest is not (%d NF4)", nf4);
            size_t B, T, V = (size_t)m->cfg.vocab_size;
            snprintf(name, sizeof name, "%s.tokens", models[i]);
            float *logits = run_tokens(m, ref, name, &B, &T);
            if (c == 0) {
                snprintf(name, sizeof name, "%s.logits_f32", models[i]);
                float *want = fix_tensor(ref, name, MB_DT_F32, NULL);
                snprintf(what, sizeof what, "%s NF4 compute fp32 (%zu x %zu)", models[i], B, T);
                if (logits && want) t_close_rel(what, logits, want, B * T * V, FWD_TOL);
                /* decode through the KV cache: one row at a time (the matvec path) */
                snprintf(name, sizeof name, "%s.tokens", models[i]);
                int32_t *tok = fix_tensor(ref, name, MB_DT_I32, NULL);
                MbKVCache *kv = NULL;
                CHECK_OK(mb_kvcache_new(m, 1, (int)T, &kv));
                float *dec = mb_malloc(T * V * sizeof(float));
                for (size_t s = 0; kv && tok && s < T; s++) CHECK_OK(mb_model_forward(m, kv, tok + s, 1, 1, NULL, dec + s * V, 0));
                snprintf(what, sizeof what, "%s NF4 compute fp32, decode x%zu", models[i], T);
                if (want && kv && tok) t_close_rel(what, dec, want, T * V, FWD_TOL);
                mb_kvcache_free(kv);
                free(dec);
                free(tok);
                free(want);
            } else {
                snprintf(name, sizeof name, "%s.logits_bf16", models[i]);
                float *want = fix_tensor(ref, name, MB_DT_F32, NULL);
                snprintf(what, sizeof what, "%s NF4 compute bf16 vs bnb bf16", models[i]);
                if (logits && want) t_close_rel(what, logits, want, B * T * V, BF16_TOL);
                free(want);
                snprintf(name, sizeof name, "%s.logits_bf16w", models[i]);
                want = fix_tensor(ref, name, MB_DT_F32, NULL);
                snprintf(what, sizeof what, "%s NF4 compute bf16 vs bf16 weights, fp32 acts", models[i]);
                if (logits && want) t_close_rel(what, logits, want, B * T * V, FWD_TOL);
                free(want);
            }
            free(logits);
            mb_model_free(m);
        }
    }
    mb_safetensors_close(ref);
}

/* 4-bit weights are dequantized a tile at a time, so the thread count cannot change a bit. */
static void nf4_forward_same_result_with_any_thread_count(void) {
    MbModel *m1, *m3;
    if (!open_model("tests/fixtures/llama/gqa2_f32", 1, NULL, 1, &m1) ||
        !open_model("tests/fixtures/llama/gqa2_f32", 1, NULL, 3, &m3))
        return;
    int32_t tok[2 * 12];
    for (int i = 0; i < 24; i++) tok[i] = (i * 37) % 517;
    size_t V = 517;
    float *a = mb_malloc(24 * V * sizeof(float)), *b = mb_malloc(24 * V * sizeof(float));
    CHECK_OK(mb_model_forward(m1, NULL, tok, 2, 12, NULL, a, 0));
    CHECK_OK(mb_model_forward(m3, NULL, tok, 2, 12, NULL, b, 0));
    CHECK(!memcmp(a, b, 24 * V * sizeof(float)), "1 and 3 threads give identical logits");
    free(a);
    free(b);
    mb_model_free(m1);
    mb_model_free(m3);
}

static void nf4_prequantized_checkpoint_loads(void) {
    /* double quant, compute dtype float32 in its config.json */
    MbModel *pre, *own;
    MbSafetensors *ref;
    CHECK_OK(mb_safetensors_open("tests/fixtures/nf4/tied_mqa_bf16_4bit/ref.safetensors", &ref));
    int opened = open_model("tests/fixtures/nf4/tied_mqa_bf16_4bit", 0, NULL, 2, &pre);
    opened &= open_model("tests/fixtures/llama/tied_mqa_bf16", 1, NULL, 2, &own);
    if (ref && opened) {
        const MbNf4 *q = weight_nf4(&pre->layers[1].w[MB_W_DOWN_PROJ]);
        CHECK(q && q->absmax_q && q->compute == MB_DT_F32 && pre->embed_tokens.dtype == MB_DT_BF16,
              "NF4 with double quant, compute float32, embeddings BF16");
        /* transformers' quantization (of the fp32-widened bf16 weights) and medbot's, byte for byte */
        int same = 1;
        for (int l = 0; l < pre->cfg.num_hidden_layers; l++)
            for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
                const MbNf4 *a = weight_nf4(&pre->layers[l].w[i]), *b = weight_nf4(&own->layers[l].w[i]);
                if (!a || !b) continue;
                size_t n = pre->layers[l].w[i].rows * pre->layers[l].w[i].cols,
                       ns = (a->nblocks + a->nested_blocksize - 1) / a->nested_blocksize;
                same &= a->nblocks == b->nblocks && a->nested_blocksize == b->nested_blocksize &&
                        !memcmp(a->packed, b->packed, n / 2) && !memcmp(a->absmax_q, b->absmax_q, a->nblocks) &&
                        !memcmp(a->nested_absmax, b->nested_absmax, 4 * ns) && a->offset == b->offset &&
                        !memcmp(a->nested_quant_map, b->nested_quant_map, sizeof a->nested_quant_map);
            }
        CHECK(same, "the checkpoint's codes equal medbot's own quantization of the bf16 model");
        size_t B, T, V = (size_t)pre->cfg.vocab_size;
        float *got = run_tokens(pre, ref, "tokens", &B, &T), *mine = run_tokens(own, ref, "tokens", &B, &T);
        float *want = fix_tensor(ref, "logits", MB_DT_F32, NULL);
        if (got && want) t_close_rel("tied_mqa_bf16_4bit (saved by transformers)", got, want, B * T * V, FWD_TOL);
        CHECK(got && mine && !memcmp(got, mine, B * T * V * sizeof(float)),
              "same logits as medbot's load_in_4bit of the bf16 model");
        printf("    codes %s medbot's quantization; logits %s\n", same ? "equal" : "differ from",
               got && mine && !memcmp(got, mine, B * T * V * sizeof(float)) ? "bit-identical" : "differ");
        free(got);
        free(mine);
        free(want);
    }
    mb_model_free(pre);
    mb_model_free(own);
    mb_safetensors_close(ref);

    /* no double quant (fp32 absmax), sharded, compute dtype bfloat16 in its config.json */
    CHECK_OK(mb_safetensors_open("tests/fixtures/nf4/gqa4_nodq_4bit/ref.safetensors", &ref));
    if (ref && open_model("tests/fixtures/nf4/gqa4_nodq_4bit", 0, NULL, 2, &pre)) {
        const MbNf4 *q = weight_nf4(&pre->layers[2].w[MB_W_Q_PROJ]);
        CHECK(q && !q->absmax_q && q->absmax && q->compute == MB_DT_BF16, "fp32 absmax, compute bf16 from config.json");
        size_t B, T, V = (size_t)pre->cfg.vocab_size;
        float *got = run_tokens(pre, ref, "tokens", &B, &T), *want = fix_tensor(ref, "logits", MB_DT_F32, NULL);
        if (got && want) t_close_rel("gqa4_nodq_4bit compute bf16 (config)", got, want, B * T * V, BF16_TOL);
        free(got);
        free(want);
        mb_model_free(pre);
        if (open_model("tests/fixtures/nf4/gqa4_nodq_4bit", 0, "float32", 2, &pre)) {
            const MbNf4 *up = weight_nf4(&pre->layers[0].w[MB_W_UP_PROJ]);
            CHECK(up && up->compute == MB_DT_F32, "the option wins over config.json");
            got = run_tokens(pre, ref, "tokens", &B, &T), want = fix_tensor(ref, "logits_f32", MB_DT_F32, NULL);
            if (got && want) t_close_rel("gqa4_nodq_4bit compute fp32 (option)", got, want, B * T * V, FWD_TOL);
            free(got);
            free(want);
            mb_model_free(pre);
        }
    }
    mb_safetensors_close(ref);
}

/* ---- broken 4-bit checkpoints: one line naming the file, no crash ---- */

/* One change to tied_mqa_bf16_4bit/model.safetensors: tensor `name` dropped, renamed to new_name,
 * or given new contents (numel values of dtype at data, 1-D). */
typedef struct {
    const char *name;
    int drop;
    const char *new_name;  /* NULL: keep the name */
    MbDtype dtype;
    size_t numel;          /* 0: keep the contents */
    const void *data;
} Edit;

/* DIR = a copy of tied_mqa_bf16_4bit with edit e (NULL: none) applied to model.safetensors and,
 * when config_from is given, config.json's text config_from replaced by config_to. */
static void write_broken(const char *dir, const Edit *e, const char *config_from, const char *config_to) {
    char cmd[600], path[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp tests/fixtures/nf4/tied_mqa_bf16_4bit/config.json %s/",
             dir, dir, dir);
    if (system(cmd) != 0) T_FAIL("setup failed: %s", cmd);
    if (config_from) {
        char *text;
        snprintf(path, sizeof path, "%s/config.json", dir);
        if (mb_read_file(path, &text, NULL) == MB_OK) {
            char *at = strstr(text, config_from), *out = NULL;
            CHECK(at != NULL, "'%s' in config.json", config_from);
            if (at) {
                sb_printf(&out, "%.*s%s%s", (int)(at - text), text, config_to, at + strlen(config_from));
                CHECK_OK(mb_write_file(path, out, strlen(out)));
            }
            arrfree(out);
            free(text);
        }
    }
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open("tests/fixtures/nf4/tied_mqa_bf16_4bit/model.safetensors", &st));
    if (!st) return;
    MbTensorOut *ts = NULL;
    for (size_t i = 0; i < mb_safetensors_count(st); i++) {
        const MbTensorInfo *t = mb_safetensors_at(st, i);
        MbTensorOut o;
        memset(&o, 0, sizeof o);
        o.name = t->name, o.dtype = t->dtype, o.ndim = t->ndim, o.data = t->data;
        memcpy(o.shape, t->shape, sizeof o.shape);
        if (e && !strcmp(t->name, e->name)) {
            if (e->drop) continue;
            if (e->new_name) o.name = e->new_name;
            if (e->numel) o.dtype = e->dtype, o.ndim = 1, o.shape[0] = e->numel, o.data = e->data;
        }
        arrput(ts, o);
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(mb_safetensors_write(path, ts, (size_t)arrlen(ts), NULL));
    arrfree(ts);
    mb_safetensors_close(st);
}

/* medbot info DIR must fail with one line holding every needle, exit status 1 (and the library
 * call too) */
static void expect_broken(const char *dir, const char *needle1, const char *needle2) {
    char args[300];
    snprintf(args, sizeof args, "info %s", dir);
    int rc = t_expect_failure(args, needle1, needle2);
    CHECK(rc == 1, "exit code %d: want 1 (a clean failure, not a crash)", rc);
    MbModel *m = NULL;
    MbLoadOptions opt = {.threads = 1};
    CHECK(mb_model_load(dir, &opt, &m) != MB_OK && !m, "mb_model_load fails");
    CHECK(strstr(mb_last_error(), needle1), "mb_last_error: %s", mb_last_error());
}

static const uint8_t zero_codes[400];
static const float zero_floats[300];
static const char fp4_state[] = "{\"quant_type\": \"fp4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [64, 64], "
                                "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.1}";
static const char shape_state[] = "{\"quant_type\": \"nf4\", \"blocksize\": 64, \"dtype\": \"bfloat16\", \"shape\": [32, 128], "
                                  "\"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": 0.1}";
static const char cut_state[] = "{\"quant_type\": \"nf4\", \"blocksize\": 6";

static void nf4_bad_prequantized_checkpoints_fail_cleanly(void) {
    static const struct {
        const char *what;
        Edit e;
        const char *needle;
    } cases[] = {
        {"absmax one value short", {"model.layers.0.self_attn.q_proj.weight.absmax", 0, NULL, MB_DT_U8, 63, zero_codes},
         "needs 64"},
        {"quant_state missing", {"model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4", 1, NULL, MB_DT_U8, 0, NULL},
         "quant_state.bitsandbytes__nf4"},
        {"quant type fp4", {"model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4", 0,
                            "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__fp4", MB_DT_U8,
                            sizeof fp4_state - 1, fp4_state}, "fp4 is not supported"},
        {"quant_state shape not the config's", {"model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4", 0,
                                                NULL, MB_DT_U8, sizeof shape_state - 1, shape_state},
         "\"shape\" is not [64, 64]"},
        {"quant_state not JSON", {"model.layers.1.self_attn.o_proj.weight.quant_state.bitsandbytes__nf4", 0, NULL,
                                  MB_DT_U8, sizeof cut_state - 1, cut_state}, "invalid JSON"},
        {"nested_absmax of the wrong length", {"model.layers.1.mlp.down_proj.weight.nested_absmax", 0, NULL, MB_DT_F32,
                                               3, zero_floats}, "nested_absmax"},
        {"quant_map not the NF4 code book", {"model.layers.0.mlp.gate_proj.weight.quant_map", 0, NULL, MB_DT_F32, 16,
                                             zero_floats}, "not the NF4 code book"},
        {"packed weight of the wrong size", {"model.layers.0.self_attn.k_proj.weight", 0, NULL, MB_DT_U8, 300, zero_codes},
         "is U8 with 512"},
    };
    char dir[200], file[240];
    snprintf(dir, sizeof dir, "%s", t_tmp("bad"));
    snprintf(file, sizeof file, "%s/model.safetensors", dir);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        printf("    %s\n", cases[i].what);
        write_broken(dir, &cases[i].e, NULL, NULL);
        expect_broken(dir, file, cases[i].needle);
    }
    printf("    quantization_config asks for 8-bit\n");
    write_broken(dir, NULL, "\"load_in_8bit\": false,\n    \"quant_method\"", "\"load_in_8bit\": true,\n    \"quant_method\"");
    snprintf(file, sizeof file, "%s/config.json", dir);
    expect_broken(dir, file, "load_in_8bit");
}

/* ---- medbot info ---- */

/* the number after `label` on its line of `out` ("  label   123 ...") */
static size_t line_value(const char *out, const char *label) {
    char key[64];
    snprintf(key, sizeof key, "\n  %s ", label);
    const char *p = strstr(out, key);
    CHECK(p != NULL, "a line '%s'", label);
    return p ? (size_t)strtoull(p + strlen(key), NULL, 10) : 0;
}

static int run_info(const char *args, char *out, size_t cap) {
    char cmd[700];
    snprintf(cmd, sizeof cmd, "%s info %s", t_medbot(), args);
    int rc = t_run(cmd, out, cap);
    CHECK(!strstr(out, "Sanitizer"), "sanitizer report");
    return rc;
}

/* the bytes column of a plan row */
static size_t plan_row(const char *out, const char *kind) { return line_value(out, kind); }

static void nf4_plan_8b_card(void) {
    static char out[16384];
    const char *card = "weights/llama-3.1-8b --plan --load_in_4bit --lora_r 64 --lora_alpha 8 --lora_target_modules "
                       "q_proj,k_proj --per_device_train_batch_size 4 --max_length 512 --gradient_checkpointing "
                       "--gpus 8 --zero_stage 1";
    int rc = run_info(card, out, sizeof out);
    printf("%s", out);
    CHECK(rc == 0, "exit %d", rc);
    CHECK(strstr(out, "trainable parameters: 27262976\n"), "the card's 27,262,976 trainable parameters");
    /* 32 x (2 x 4096^2 + 2 x 1024 x 4096 + 3 x 14336 x 4096) values x 0.5 B */
    CHECK(plan_row(out, "quantized weights") == 3489660928u, "NF4 codes");
    /* (2 x 128256 x 4096 + 65 x 4096) x 2 B */
    CHECK(plan_row(out, "bf16 weights") == 2101878784u, "embeddings, lm_head, norms in bf16");
    CHECK(plan_row(out, "LoRA params") == 4u * 27262976u && plan_row(out, "LoRA grads") == 4u * 27262976u, "fp32 LoRA");
    CHECK(plan_row(out, "Adam moments") == 8u * 27262976u / 8u, "ZeRO-1 over 8 GPUs");
    static const char *kinds[] = {"quantized weights", "absmax", "bf16 weights", "LoRA params", "LoRA grads",
                                  "grad sums (fp64)", "Adam moments", "activations", "logits", "workspace"};
    size_t sum = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++) sum += plan_row(out, kinds[i]);
    CHECK(plan_row(out, "total") == sum, "total %zu = the sum of the rows %zu", plan_row(out, "total"), sum);
    CHECK(sum < (size_t)24e9, "the card's run fits a 24 GB A5000");
    size_t gc = plan_row(out, "activations");

    /* without checkpointing every layer keeps its activations; bf16 base; all projections */
    rc = run_info("weights/llama-3.1-8b --plan --lora_target_modules all-linear --gpus 8 --zero_stage 2", out, sizeof out);
    CHECK(rc == 0 && strstr(out, "trainable parameters: 167772160\n"), "all-linear r=64: 32 x 5242880\n%s", out);
    CHECK(plan_row(out, "quantized weights") == 0 && plan_row(out, "bf16 weights") == 2u * 8030261248u,
          "bf16 base: 8,030,261,248 values x 2 B");
    CHECK(plan_row(out, "LoRA grads") == 4u * 167772160u / 8u, "ZeRO-2 shards the gradients");
    /* the model's own layout (acts_ensure): 8.2x for Llama-3.1-8B at 4 x 2 x 512 tokens */
    CHECK(plan_row(out, "activations") > 5 * gc, "no checkpointing: far more activations");

    /* the tiny fixture: trainable = 2 layers x r x (in + out) over the targets */
    rc = run_info("tests/fixtures/llama/gqa2_f32/config.json --plan --lora_r 8 --lora_target_modules v_proj,down_proj",
                  out, sizeof out);
    CHECK(rc == 0 && strstr(out, "trainable parameters: 6400\n"), "2 x 8 x ((48 + 96) + (96 + 160))\n%s", out);

    static const char *bad[] = {"weights/llama-3.1-8b --plan --zero_stage 3", "weights/llama-3.1-8b --plan --lora_r 0",
                                "weights/llama-3.1-8b --plan --lora_target_modules q_proj,lm_head",
                                "weights/llama-3.1-8b --plan --load_in_4bit=maybe", "weights/nonexistent --plan"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        rc = run_info(bad[i], out, sizeof out);
        size_t lines = 0;
        for (char *p = out; *p; p++) lines += *p == '\n';
        printf("    $ medbot info %s\n    -> exit %d: %s", bad[i], rc, out);
        CHECK(rc == 1 && lines == 1, "one line, exit 1");
    }
}

static void nf4_info_reports_4bit_weights(void) {
    static char out[16384];
    int rc = run_info("tests/fixtures/nf4/tied_mqa_bf16_4bit", out, sizeof out);
    CHECK(rc == 0, "exit %d: %s", rc, out);
    /* 2 layers x (64x64 + 16x64 + 16x64 + 64x64 + 3 x 128x64) = 2 x 34816 values */
    CHECK(strstr(out, "4-bit weights: NF4 (bitsandbytes), double quant, compute dtype float32"), "%s", out);
    CHECK(line_value(out, "linear weights") == 14 && line_value(out, "values") == 69632 &&
          line_value(out, "packed codes") == 34816, "%s", out);
    /* absmax: 1 B per block of 64 + 4 B per 256 blocks + the 4-byte offset, per weight */
    CHECK(line_value(out, "absmax") == 69632 / 64 + 14 * 8, "%s", out);
    rc = run_info("tests/fixtures/llama/gqa2_f32 --load_in_4bit --bnb_4bit_compute_dtype bfloat16", out, sizeof out);
    CHECK(rc == 0 && strstr(out, "compute dtype bfloat16"), "%s", out);
    rc = run_info("tests/fixtures/llama/gqa2_f32 --bnb_4bit_compute_dtype float8", out, sizeof out);
    CHECK(rc == 1 && strstr(out, "float8"), "%s", out);
    rc = run_info("tests/fixtures/llama/gqa2_f32", out, sizeof out);
    CHECK(rc == 0 && !strstr(out, "4-bit"), "no 4-bit section without --load_in_4bit");
}

MB_TEST_MAIN("nf4", T(nf4_quantize_matches_bitsandbytes), T(nf4_dequant_matches_bitsandbytes),
             T(nf4_blockwise8_ties_go_to_the_lower_entry), T(nf4_offset_sums_in_torch_order),
             T(nf4_thresholds_agree_with_the_nearest_rule), T(nf4_forward_matches_transformers),
             T(nf4_forward_same_result_with_any_thread_count), T(nf4_prequantized_checkpoint_loads),
             T(nf4_bad_prequantized_checkpoints_fail_cleanly), T(nf4_plan_8b_card), T(nf4_info_reports_4bit_weights))
