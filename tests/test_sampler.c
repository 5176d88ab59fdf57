/* tests/test_sampler.c: the sampler section and the generate / chat commands against
 * transformers (fixtures from tests/ref/make_sampler_fixtures.py):
 *   - each logits processor alone and the chains generate builds, on random logits and
 *     histories: the processed logits must be identical (every value, -inf included);
 *   - greedy generate(repetition_penalty=1.1, no_repeat_ngram_size=3, 64 new tokens) on every
 *     fixture model and prompt: the same ids; with a PEFT adapter and the card's template: the
 *     same ids and text, from the library, `medbot generate` and a two-turn `medbot chat`;
 *   - seeded sampling reproducible, draws that follow the distribution, stop ids, streaming that
 *     never emits a broken UTF-8 character, bad input, and chat in a real terminal (tmux; CI sets
 *     MB_EXPECT_TMUX=1 so a missing tmux is a failure there, not a skip). */
#include "test.h"

#define FIX "tests/fixtures/sampler"
#define DPO "tests/fixtures/dpo"
/* --exact: the answers equal transformers' on the exact path (the fast path, generate's default, rounds) */
#define GREEDY_ARGS "--exact --greedy --repetition_penalty 1.1 --no_repeat_ngram_size 3 --max_new_tokens 64"

/* The models of the greedy fixtures (GREEDY_MODELS in make_sampler_fixtures.py) and how medbot
 * loads them: F32 and BF16 weights, NF4 quantized at load time (load_in_4bit, compute dtype
 * float32, as bitsandbytes there), and a checkpoint saved 4-bit by transformers. */
static const struct {
    const char *name, *folder; /* under tests/fixtures */
    int load_in_4bit;
} greedy_models[] = {{"gqa2_f32", "llama/gqa2_f32", 0},
                     {"gqa4_bf16_sharded", "llama/gqa4_bf16_sharded", 0},
                     {"tied_mqa_bf16", "llama/tied_mqa_bf16", 0},
                     {"gqa2_f32_nf4", "llama/gqa2_f32", 1},
                     {"gqa4_bf16_sharded_nf4", "llama/gqa4_bf16_sharded", 1},
                     {"tied_mqa_bf16_4bit", "nf4/tied_mqa_bf16_4bit", 0}};
#define N_GREEDY_MODELS (sizeof greedy_models / sizeof *greedy_models)

/* ---- fixture files ---- */

static int load_json(const char *path, MbJsonDoc *doc) {
    char *text;
    size_t n;
    MbStatus rc = mb_read_file(path, &text, &n);
    if (!rc) {
        rc = json_parse(path, text, n, doc);
        free(text);
    }
    CHECK_OK(rc);
    return rc == MB_OK;
}

static double jnum(const MbJsonDoc *d, const MbJson *o, const char *key, double dflt) {
    const MbJson *v = json_get(d, o, key);
    return v && v->kind == MB_JSON_NUMBER ? v->num : dflt;
}

/* A JSON array of ints -> malloc'd int32 (count in *n). */
static int32_t *jids(const MbJsonDoc *d, const MbJson *arr, size_t *n) {
    *n = arr ? arr->count : 0;
    int32_t *ids = mb_malloc((*n + 1) * sizeof *ids);
    size_t i = 0;
    for (const MbJson *e = arr ? json_first(d, arr) : NULL; e; e = json_next(d, e)) ids[i++] = (int32_t)e->i;
    return ids;
}

/* A copy of a fixture tensor (aligned), checked for dtype and size. */
static void *tensor_copy(MbSafetensors *st, const char *name, MbDtype dt, size_t *numel) {
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    CHECK(t && t->dtype == dt, "fixture tensor %s", name);
    if (!t || t->dtype != dt) return NULL;
    void *p = mb_malloc(t->nbytes + 1);
    memcpy(p, t->data, t->nbytes);
    *numel = t->numel;
    return p;
}

/* Every value equal (-inf == -inf; a NaN never is); prints the count of differences. */
static int same_values(const char *what, const float *got, const float *ref, size_t n) {
    size_t diff = 0, first = 0, ninf = 0;
    double maxerr = 0;
    for (size_t i = 0; i < n; i++) {
        ninf += isinf(ref[i]) != 0;
        if (got[i] == ref[i]) continue;
        if (!diff) first = i;
        diff++;
        if (isfinite(got[i]) && isfinite(ref[i])) maxerr = fmax(maxerr, fabs((double)got[i] - ref[i]));
        else maxerr = INFINITY;
    }
    printf("    %-34s %6zu values, %5zu -inf: %s", what, n, ninf, diff ? "" : "identical\n");
    if (diff) {
        printf("%zu differ, max |err| %g\n", diff, maxerr);
        T_FAIL("%s: %zu of %zu values differ, first at %zu: got %.9g, want %.9g", what, diff, n, first,
               (double)got[first], (double)ref[first]);
    }
    return !diff;
}

/* ---- processors ---- */

static void apply_processor(const MbJsonDoc *d, const MbJson *p, float *x, size_t V, const int32_t *ids, size_t n,
                            MbSampler *scratch) {
    const char *cls = json_str(d, json_get(d, p, "class"));
    if (!strcmp(cls, "RepetitionPenaltyLogitsProcessor"))
        logits_repetition_penalty(x, V, ids, n, (float)jnum(d, p, "penalty", 0), scratch->seen);
    else if (!strcmp(cls, "NoRepeatNGramLogitsProcessor"))
        logits_no_repeat_ngram(x, V, ids, n, (int)jnum(d, p, "ngram_size", 0));
    else if (!strcmp(cls, "TemperatureLogitsWarper"))
        logits_temperature(x, V, (float)jnum(d, p, "temperature", 0));
    else if (!strcmp(cls, "TopKLogitsWarper"))
        logits_top_k(x, V, (int)jnum(d, p, "top_k", 0), 1, scratch->work);
    else if (!strcmp(cls, "TopPLogitsWarper"))
        logits_top_p(x, V, jnum(d, p, "top_p", 0), (int)jnum(d, p, "min_tokens_to_keep", 1), scratch->sorted);
    else
        T_FAIL("unknown processor %s", cls);
}

static void sampler_processors_match_transformers(void) {
    MbJsonDoc doc;
    MbSafetensors *st = NULL;
    if (!load_json(FIX "/processors.json", &doc)) return;
    CHECK_OK(mb_safetensors_open(FIX "/processors.safetensors", &st));
    int cases = 0, chains = 0;
    for (const MbJson *c = st ? json_first(&doc, json_root(&doc)) : NULL; c; c = json_next(&doc, c)) {
        const char *name = json_str(&doc, json_get(&doc, c, "name"));
        char key[3][128];
        snprintf(key[0], sizeof key[0], "%s.logits", name);
        snprintf(key[1], sizeof key[1], "%s.ids", name);
        snprintf(key[2], sizeof key[2], "%s.out", name);
        size_t V, n, Vo;
        float *x = tensor_copy(st, key[0], MB_DT_F32, &V), *want = tensor_copy(st, key[2], MB_DT_F32, &Vo);
        int32_t *ids = tensor_copy(st, key[1], MB_DT_I32, &n);
        MbGenerationConfig g;
        mb_generation_config_defaults(&g);
        MbSampler *s = NULL;
        CHECK_OK(mb_sampler_new(&g, V, &s));
        if (x && want && ids && s && V == Vo) {
            /* each listed processor in the listed order */
            float *got = mb_malloc(V * sizeof *got);
            memcpy(got, x, V * sizeof *got);
            const MbJson *procs = json_get(&doc, c, "processors");
            for (const MbJson *p = json_first(&doc, procs); p; p = json_next(&doc, p))
                apply_processor(&doc, p, got, V, ids, n, s);
            same_values(name, got, want, V);
            for (size_t i = 0; i < V; i++) CHECK(!s->seen[i], "repetition_penalty leaves its marks clean");
            /* a chain: medbot's own order and conditions from the generation config */
            const MbJson *gc = json_get(&doc, c, "generation_config");
            if (gc) {
                const MbJson *ds = json_get(&doc, gc, "do_sample");
                g.do_sample = ds && ds->boolean;
                g.temperature = jnum(&doc, gc, "temperature", 1);
                g.top_k = (int)jnum(&doc, gc, "top_k", 0);
                g.top_p = jnum(&doc, gc, "top_p", 1);
                g.repetition_penalty = jnum(&doc, gc, "repetition_penalty", 1);
                g.no_repeat_ngram_size = (int)jnum(&doc, gc, "no_repeat_ngram_size", 0);
                MbSampler *s2 = NULL;
                CHECK_OK(mb_sampler_new(&g, V, &s2));
                memcpy(got, x, V * sizeof *got);
                if (s2) mb_sampler_process(s2, got, ids, n);
                char what[160];
                snprintf(what, sizeof what, "%s (mb_sampler_process)", name);
                same_values(what, got, want, V);
                mb_sampler_free(s2);
                chains++;
            }
            free(got);
            cases++;
        }
        mb_sampler_free(s);
        free(x), free(want), free(ids);
    }
    printf("    %d cases, %d of them whole chains\n", cases, chains);
    CHECK(cases >= 30 && chains >= 5, "the fixture has every case (%d, %d chains)", cases, chains);
    mb_safetensors_close(st);
    json_free(&doc);
}

/* top_k keeps every tie of the k-th value; top_p always keeps the most likely token. */
static void sampler_top_k_and_top_p_edge_cases(void) {
    float x[8] = {1, 3, 3, 2, 3, -1, 0, 3}, work[8];
    logits_top_k(x, 8, 2, 1, work); /* the 2nd largest is 3: all four 3s stay */
    int kept = 0;
    for (int i = 0; i < 8; i++) {
        kept += x[i] == 3;
        CHECK(x[i] == 3 || x[i] == -INFINITY, "top_k at %d", i);
    }
    CHECK(kept == 4, "4 ties kept, got %d", kept);
    MbScored sc[8];
    float y[8] = {0.5f, 4, -2, 1, -INFINITY, 3.999f, 0, 2};
    logits_top_p(y, 8, 0.0, 1, sc);
    for (int i = 0; i < 8; i++) CHECK((i == 1) == (y[i] == 4), "top_p 0 keeps the argmax only (%d: %g)", i, y[i]);
    float z[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    logits_top_p(z, 4, 0.5, 1, sc); /* nothing finite: nothing to do, no crash */
    for (int i = 0; i < 4; i++) CHECK(z[i] == -INFINITY, "all -inf");
    /* quickselect against a sort on random data with many ties */
    MbRng rng;
    mb_rng_seed(&rng, 3);
    for (int rep = 0; rep < 200; rep++) {
        int n = 1 + (int)(mb_rng_u64(&rng) % 300), k = (int)(mb_rng_u64(&rng) % (uint64_t)n);
        float a[300], b[300];
        for (int i = 0; i < n; i++) a[i] = b[i] = (float)(mb_rng_u64(&rng) % 7);
        float got = select_desc(a, n, k);
        for (int i = 1; i < n; i++) /* insertion sort, descending */
            for (int j = i; j > 0 && b[j] > b[j - 1]; j--) {
                float t = b[j];
                b[j] = b[j - 1], b[j - 1] = t;
            }
        if (got != b[k]) {
            T_FAIL("select_desc(n %d, k %d) = %g, want %g", n, k, got, b[k]);
            break;
        }
    }
}

/* ---- greedy generation on the fixture models ---- */

static MbStatus greedy_sampler(MbSampler **s, size_t V, int max_new, int32_t eos) {
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.do_sample = 0;
    g.repetition_penalty = 1.1;
    g.no_repeat_ngram_size = 3;
    g.max_new_tokens = max_new;
    if (eos >= 0) g.stop_ids[g.n_stop_ids++] = eos;
    return mb_sampler_new(&g, V, s);
}

static void sampler_greedy_generate_matches_transformers(void) {
    MbJsonDoc doc;
    if (!load_json(FIX "/generate.json", &doc)) return;
    const MbJson *cases = json_get(&doc, json_root(&doc), "greedy");
    int per_model[N_GREEDY_MODELS] = {0}, total = 0;
    for (size_t mi = 0; mi < N_GREEDY_MODELS; mi++) {
        char dir[256];
        snprintf(dir, sizeof dir, "tests/fixtures/%s", greedy_models[mi].folder);
        MbLoadOptions opt = {.threads = 2, .load_in_4bit = greedy_models[mi].load_in_4bit,
                             .bnb_4bit_compute_dtype = "float32"};
        MbModel *m = NULL;
        CHECK_OK(mb_model_load(dir, &opt, &m));
        if (!m) continue;
        size_t V = (size_t)m->cfg.vocab_size;
        for (const MbJson *c = json_first(&doc, cases); c; c = json_next(&doc, c)) {
            if (strcmp(json_str(&doc, json_get(&doc, c, "model")), greedy_models[mi].name)) continue;
            CHECK(!strcmp(json_str(&doc, json_get(&doc, c, "folder")), greedy_models[mi].folder), "folder of %s",
                  greedy_models[mi].name);
            size_t n, nw, n_out = 0;
            int32_t *prompt = jids(&doc, json_get(&doc, c, "prompt"), &n);
            int32_t *want = jids(&doc, json_get(&doc, c, "output"), &nw);
            int32_t eos = (int32_t)jnum(&doc, c, "eos_token_id", -1), out[64];
            MbSampler *s = NULL;
            MbKVCache *kv = NULL;
            CHECK_OK(greedy_sampler(&s, V, 64, eos));
            CHECK_OK(mb_kvcache_new(m, 1, (int)n + 63, &kv));
            if (s && kv) {
                CHECK_OK(mb_generate(m, kv, s, NULL, prompt, n, out, &n_out, NULL, NULL));
                size_t same = 0;
                while (same < n_out && same < nw && out[same] == want[same]) same++;
                printf("    %-22s prompt %2zu ids, eos %5d: %2zu of %2zu ids equal (HF min margin %.1e)\n",
                       greedy_models[mi].name, n, (int)eos, same, nw, jnum(&doc, c, "min_margin", 0));
                CHECK(n_out == nw && same == nw, "%s: medbot gave %zu ids, first difference at %zu", greedy_models[mi].name,
                      n_out, same);
                CHECK(eos < 0 || (n_out && out[n_out - 1] == eos), "stops on the eos and keeps it");
                per_model[mi]++, total++;
            }
            mb_kvcache_free(kv);
            mb_sampler_free(s);
            free(prompt), free(want);
        }
        mb_model_free(m);
    }
    for (size_t mi = 0; mi < N_GREEDY_MODELS; mi++)
        CHECK(per_model[mi] >= 5, "%s: %d greedy cases in the fixture, want 4 prompts + 1 eos", greedy_models[mi].name,
              per_model[mi]);
    CHECK(total == (int)json_get(&doc, json_root(&doc), "greedy")->count, "every fixture case has its model in "
          "greedy_models[] (%d of %zu ran)", total, json_get(&doc, json_root(&doc), "greedy")->count);
    json_free(&doc);
}

/* Collects streamed text; checks that each piece is whole UTF-8. */
typedef struct {
    char *text; /* stb_ds, NUL-terminated */
    int pieces, calls, broken;
} Collect;

static int collect_piece(void *ctx, int32_t id, const char *text, size_t len) {
    Collect *c = ctx;
    (void)id;
    c->calls++;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_valid_len((const unsigned char *)text + i, len - i);
        if (!k) {
            c->broken++;
            break;
        }
        i += k;
    }
    if (!len) return 0;
    c->pieces++;
    if (arrlen(c->text)) arrsetlen(c->text, arrlen(c->text) - 1);
    for (size_t i = 0; i < len; i++) arrput(c->text, text[i]);
    arrput(c->text, 0);
    return 0;
}

/* The card's template, a PEFT adapter (unmerged), the model's stop ids: ids and text as HF, with
 * the base in fp32 (every "text" case) and loaded 4-bit (QLoRA, "text_nf4"). */
static void lora_template_cases(const MbJsonDoc *doc, const MbJson *cases, int load_in_4bit) {
    MbModel *m = NULL;
    MbLora *lo = NULL;
    MbTokenizer *tok = NULL;
    MbLoadOptions opt = {.threads = 2, .load_in_4bit = load_in_4bit, .bnb_4bit_compute_dtype = "float32"};
    CHECK_OK(mb_model_load(DPO "/model", &opt, &m));
    if (m) CHECK_OK(mb_lora_load(m, DPO "/adapter_qk", &lo));
    CHECK_OK(mb_tokenizer_load(DPO "/model", &tok));
    if (!m || !lo || !tok) goto done;
    mb_model_set_lora(m, lo);
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.do_sample = 0, g.repetition_penalty = 1.1, g.no_repeat_ngram_size = 3, g.max_new_tokens = 64;
    CHECK_OK(mb_generation_set_stop_ids(&g, DPO "/model", m, tok));
    CHECK(g.n_stop_ids == 2 && g.stop_ids[0] == 435 && g.stop_ids[1] == 436, "stop ids: eos 435 and <|eot_id|> 436");
    const char *sys = json_str(doc, json_get(doc, json_root(doc), "system"));
    const MbJson *c = cases->kind == MB_JSON_ARRAY ? json_first(doc, cases) : cases;
    for (; c; c = cases->kind == MB_JSON_ARRAY ? json_next(doc, c) : NULL) {
        char *prompt = mb_render_prompt(sys, json_str(doc, json_get(doc, c, "question")));
        int32_t *ids = NULL, out[64];
        size_t n, np, nw, n_out = 0;
        CHECK_OK(mb_tokenizer_encode(tok, prompt, strlen(prompt), MB_ENCODE_ADD_BOS, &ids, &n));
        int32_t *want_prompt = jids(doc, json_get(doc, c, "prompt_ids"), &np);
        int32_t *want = jids(doc, json_get(doc, c, "output"), &nw);
        CHECK(ids && n == np && t_equal_i32("prompt ids (BOS + template)", ids, want_prompt, n), "prompt ids");
        MbSampler *s = NULL;
        MbKVCache *kv = NULL;
        Collect col = {NULL, 0, 0, 0};
        CHECK_OK(mb_sampler_new(&g, (size_t)m->cfg.vocab_size, &s));
        CHECK_OK(mb_kvcache_new(m, 1, (int)n + 63, &kv));
        if (ids && s && kv) {
            CHECK_OK(mb_generate(m, kv, s, tok, ids, n, out, &n_out, collect_piece, &col));
            CHECK(n_out == nw && t_equal_i32("answer ids", out, want, nw), "%zu ids, want %zu", n_out, nw);
            const char *answer = json_str(doc, json_get(doc, c, "answer"));
            CHECK(col.text && !strcmp(col.text, answer), "streamed text equals HF's decode");
            CHECK(!col.broken, "%d pieces with a broken character", col.broken);
            printf("    %s%-36.36s %2zu prompt ids -> %2zu ids%s, %d text pieces: ids and text equal HF\n",
                   load_in_4bit ? "NF4 " : "", json_str(doc, json_get(doc, c, "question")), n, n_out,
                   n_out && mb_generation_is_stop(&g, out[n_out - 1]) ? " (stopped on a stop id)" : "", col.pieces);
        }
        arrfree(col.text);
        mb_kvcache_free(kv);
        mb_sampler_free(s);
        free(ids), free(want_prompt), free(want), free(prompt);
    }
done:
    mb_tokenizer_free(tok);
    mb_lora_free(lo);
    mb_model_free(m);
}

static void sampler_generate_with_lora_and_template_matches_transformers(void) {
    MbJsonDoc doc;
    if (!load_json(FIX "/generate.json", &doc)) return;
    const MbJson *text = json_get(&doc, json_root(&doc), "text"), *qlora = json_get(&doc, json_root(&doc), "text_nf4");
    CHECK(text && text->count == 3 && qlora, "fixture cases");
    if (text) lora_template_cases(&doc, text, 0);
    if (qlora) lora_template_cases(&doc, qlora, 1);
    json_free(&doc);
}

/* ---- sampling ---- */

static MbStatus sample_run(MbModel *m, uint64_t seed, int32_t *out, size_t *n_out) {
    MbGenerationConfig g;
    mb_generation_config_defaults(&g); /* the card's: temperature 0.7, top_k 50, top_p 0.9, penalty 1.1 */
    g.max_new_tokens = 40;
    g.temperature = 1.5; /* a flat distribution: different seeds must part quickly */
    g.seed = seed;
    int32_t prompt[5] = {5, 17, 300, 42, 9};
    MbSampler *s = NULL;
    MbKVCache *kv = NULL;
    MbStatus rc = mb_sampler_new(&g, (size_t)m->cfg.vocab_size, &s);
    if (!rc) rc = mb_kvcache_new(m, 1, 64, &kv);
    if (!rc) rc = mb_generate(m, kv, s, NULL, prompt, 5, out, n_out, NULL, NULL);
    mb_kvcache_free(kv);
    mb_sampler_free(s);
    return rc;
}

static void sampler_seeded_sampling_is_reproducible(void) {
    MbModel *m1 = NULL, *m2 = NULL;
    MbLoadOptions o1 = {.threads = 1}, o2 = {.threads = 2};
    CHECK_OK(mb_model_load("tests/fixtures/llama/tied_mqa_bf16", &o1, &m1));
    CHECK_OK(mb_model_load("tests/fixtures/llama/tied_mqa_bf16", &o2, &m2));
    if (!m1 || !m2) goto done;
    int32_t a[40], b[40], c[40], d[40];
    size_t na, nb, nc, nd;
    CHECK_OK(sample_run(m1, 7, a, &na));
    CHECK_OK(sample_run(m1, 7, b, &nb));
    CHECK_OK(sample_run(m2, 7, c, &nc));
    CHECK_OK(sample_run(m1, 8, d, &nd));
    CHECK(na == 40 && nb == 40 && nc == 40 && nd == 40, "40 tokens each");
    CHECK(t_equal_i32("seed 7 twice", a, b, 40), "same seed, same tokens");
    CHECK(t_equal_i32("seed 7, 1 vs 2 threads", a, c, 40), "thread count does not matter");
    int differ = 0;
    for (int i = 0; i < 40; i++) differ += a[i] != d[i];
    printf("    seed 7 twice: identical; 1 and 2 threads: identical; seed 8: %d of 40 tokens differ\n", differ);
    CHECK(differ > 0, "another seed, other tokens");
done:
    mb_model_free(m1);
    mb_model_free(m2);
}

/* The draws follow softmax(processed logits): chi-square over 200k draws, filtered ids never. */
static void sampler_draws_follow_the_distribution(void) {
    float base[8] = {1.0f, 0.5f, 2.0f, -1.0f, 0.0f, 1.5f, -3.0f, 0.25f};
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.repetition_penalty = 1.0, g.temperature = 0.8, g.top_k = 6, g.top_p = 0.95, g.seed = 11;
    MbSampler *s = NULL;
    CHECK_OK(mb_sampler_new(&g, 8, &s));
    if (!s) return;
    float x[8];
    memcpy(x, base, sizeof x);
    mb_sampler_process(s, x, NULL, 0);
    double p[8], z = 0, mx = -INFINITY;
    for (int i = 0; i < 8; i++) mx = fmax(mx, x[i]);
    for (int i = 0; i < 8; i++) z += p[i] = x[i] > -INFINITY ? exp(x[i] - mx) : 0;
    int N = 200000, count[8] = {0};
    for (int k = 0; k < N; k++) {
        memcpy(x, base, sizeof x);
        int32_t t = -1;
        CHECK_OK(mb_sampler_next(s, x, NULL, 0, &t));
        if (t < 0 || t >= 8) {
            T_FAIL("token %d", (int)t);
            break;
        }
        count[t]++;
    }
    double chi2 = 0;
    int dof = -1;
    for (int i = 0; i < 8; i++) {
        double e = N * p[i] / z;
        if (p[i] == 0) {
            CHECK(count[i] == 0, "filtered token %d drawn %d times", i, count[i]);
            continue;
        }
        chi2 += (count[i] - e) * (count[i] - e) / e;
        dof++;
    }
    printf("    200000 draws over %d kept tokens: chi-square %.2f with %d degrees of freedom (limit 25)\n", dof + 1, chi2,
           dof);
    CHECK(chi2 < 25, "chi-square %.2f: the draws do not follow the distribution", chi2);
    mb_sampler_free(s);
}

/* ---- stops ---- */

static void sampler_generate_stops_on_stop_ids_and_a_full_cache(void) {
    MbModel *m = NULL;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load("tests/fixtures/llama/gqa2_f32", &o, &m));
    if (!m) return;
    size_t V = (size_t)m->cfg.vocab_size, n_out;
    int32_t prompt[4] = {3, 1, 4, 1}, ref[64], out[64];
    MbSampler *s = NULL;
    MbKVCache *kv = NULL;
    CHECK_OK(greedy_sampler(&s, V, 20, -1));
    CHECK_OK(mb_kvcache_new(m, 1, 64, &kv));
    if (!s || !kv) goto done;
    CHECK_OK(mb_generate(m, kv, s, NULL, prompt, 4, ref, &n_out, NULL, NULL));
    CHECK(n_out == 20 && mb_kvcache_len(kv) == 4 + 19, "20 ids, the last never run (cache %d)", mb_kvcache_len(kv));
    /* a stop id: the first new id from the 6th on that did not come before, and the very first */
    int at = -1;
    for (int t = 5; t < 20 && at < 0; t++) {
        int seen = 0;
        for (int i = 0; i < t; i++) seen |= ref[i] == ref[t];
        if (!seen) at = t;
    }
    CHECK(at > 0, "an id from the 6th on that is new");
    if (at < 0) goto done;
    int32_t stops[2] = {ref[at], ref[0]};
    size_t want_n[2] = {(size_t)at + 1, 1};
    for (int k = 0; k < 2; k++) {
        MbSampler *s2 = NULL;
        CHECK_OK(greedy_sampler(&s2, V, 20, stops[k]));
        mb_kvcache_reset(kv);
        if (s2) CHECK_OK(mb_generate(m, kv, s2, NULL, prompt, 4, out, &n_out, NULL, NULL));
        CHECK(n_out == want_n[k] && t_equal_i32("ids up to the stop", out, ref, n_out), "stop %d: %zu ids, want %zu",
              (int)stops[k], n_out, want_n[k]);
        CHECK(mb_kvcache_len(kv) == 4 + (int)n_out - 1, "the stop id is not run");
        mb_sampler_free(s2);
    }
    /* a cache of 10 holds the prompt and 6 new ids: the 7th comes out, never runs */
    MbKVCache *small = NULL;
    CHECK_OK(mb_kvcache_new(m, 1, 10, &small));
    if (small) {
        CHECK_OK(mb_generate(m, small, s, NULL, prompt, 4, out, &n_out, NULL, NULL));
        CHECK(n_out == 7 && mb_kvcache_len(small) == 10 && t_equal_i32("ids in a small cache", out, ref, 7),
              "%zu ids, cache %d", n_out, mb_kvcache_len(small));
        /* a sequence longer than the cache is refused */
        int32_t seq[11];
        memcpy(seq, prompt, sizeof prompt);
        memcpy(seq + 4, ref, 7 * sizeof *ref);
        CHECK(mb_generate(m, small, s, NULL, seq, 11, out, &n_out, NULL, NULL) == MB_ERR_ARG, "11 tokens in 10");
        mb_kvcache_free(small);
    }
    /* max_new_tokens 1 */
    MbSampler *one = NULL;
    CHECK_OK(greedy_sampler(&one, V, 1, -1));
    mb_kvcache_reset(kv);
    if (one) CHECK_OK(mb_generate(m, kv, one, NULL, prompt, 4, out, &n_out, NULL, NULL));
    CHECK(n_out == 1 && out[0] == ref[0] && mb_kvcache_len(kv) == 4, "one id, nothing run after the prompt");
    /* the cache must hold a strict prefix of the sequence */
    CHECK(mb_generate(m, kv, s, NULL, prompt, 4, out, &n_out, NULL, NULL) == MB_ERR_ARG, "nothing new to run");
    mb_sampler_free(one);
done:
    mb_kvcache_free(kv);
    mb_sampler_free(s);
    mb_model_free(m);
}

static void sampler_stop_ids_follow_generation_config(void) {
    MbModel *m = NULL;
    MbTokenizer *tok = NULL;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load("weights/tiny", &o, &m));
    CHECK_OK(mb_tokenizer_load("weights/llama3/tokenizer.model", &tok));
    if (!m || !tok) goto done;
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    /* config.json: [128001, 128008, 128009]; <|eom_id|> 128008 and <|eot_id|> 128009 already there */
    CHECK_OK(mb_generation_set_stop_ids(&g, "weights/tiny", m, tok));
    CHECK(g.n_stop_ids == 3 && g.stop_ids[0] == 128001 && g.stop_ids[1] == 128008 && g.stop_ids[2] == 128009,
          "stop ids of the tiny model (%d)", g.n_stop_ids);
    /* generation_config.json wins over config.json, the turn ends join */
    const char *dir = t_tmp("genconfig");
    mkdir(dir, 0700);
    char path[300];
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    const char *gc = "{\"eos_token_id\": 128001, \"do_sample\": true}";
    CHECK_OK(mb_write_file(path, gc, strlen(gc)));
    CHECK_OK(mb_generation_set_stop_ids(&g, dir, m, tok));
    CHECK(g.n_stop_ids == 3 && g.stop_ids[0] == 128001 && g.stop_ids[1] == 128009 && g.stop_ids[2] == 128008,
          "generation_config.json's eos, then <|eot_id|>, <|eom_id|>");
    CHECK(mb_generation_is_stop(&g, 128009) && !mb_generation_is_stop(&g, 128000), "is_stop");
    gc = "{\"eos_token_id\": [1, 2";
    CHECK_OK(mb_write_file(path, gc, strlen(gc)));
    CHECK(mb_generation_set_stop_ids(&g, dir, m, tok) == MB_ERR_FORMAT && strstr(mb_last_error(), "generation_config"),
          "a broken generation_config.json is reported: %s", mb_last_error());
done:
    mb_tokenizer_free(tok);
    mb_model_free(m);
}

/* ---- streaming ---- */

static void sampler_streaming_never_breaks_a_character(void) {
    MbTokenizer *tok = NULL;
    CHECK_OK(mb_tokenizer_load("weights/llama3/tokenizer.model", &tok));
    if (!tok) return;
    const char *text = "感冒了应该怎么办？多喝水，注意休息。🤒 If it lasts, see a doctor.";
    int32_t eot = mb_tokenizer_token_id(tok, "<|eot_id|>");
    /* every byte as its own token: each multi-byte character is split, a <|eot_id|> inside one */
    int32_t *ids = NULL;
    size_t len = strlen(text);
    for (size_t i = 0; i < len; i++) {
        arrput(ids, tok->byte_id[(unsigned char)text[i]]);
        if (i == 1) arrput(ids, eot); /* between the 2nd and 3rd byte of 感 */
    }
    /* then the same text as the tokenizer encodes it (tokens that end mid-character), an id
     * the tokenizer lacks (a model vocabulary padded past it), and a character never finished */
    int32_t *enc;
    size_t ne;
    CHECK_OK(mb_tokenizer_encode(tok, text, len, 0, &enc, &ne));
    for (size_t i = 0; i < ne; i++) arrput(ids, enc[i]);
    free(enc);
    size_t nv = mb_tokenizer_vocab_size(tok);
    arrput(ids, (int32_t)nv + 3);
    arrput(ids, tok->byte_id[0xE6]); /* the first byte of 感, alone at the end */
    size_t n = (size_t)arrlen(ids);
    int split = 0;
    for (size_t i = 0; i < n; i++) {
        size_t bl;
        const char *b = mb_tokenizer_token_bytes(tok, ids[i], &bl);
        split += b && bl && !mb_tokenizer_is_special(tok, ids[i]) && utf8_valid_len((const unsigned char *)b, bl) != bl;
    }
    Collect col = {NULL, 0, 0, 0};
    MbGenStream gs;
    gen_stream_init(&gs, tok, collect_piece, &col);
    for (size_t i = 0; i < n; i++) gen_stream_put(&gs, ids[i]);
    gen_stream_finish(&gs);
    /* the reference: decode of the known ids, skipping special tokens */
    int32_t *known = NULL;
    for (size_t i = 0; i < n; i++)
        if ((size_t)ids[i] < nv) arrput(known, ids[i]);
    char *want;
    size_t wl;
    CHECK_OK(mb_tokenizer_decode(tok, known, (size_t)arrlen(known), 1, &want, &wl));
    printf("    %zu ids (%d of them end inside a character): %d calls, %d pieces, %d broken\n", n, split, col.calls,
           col.pieces, col.broken);
    CHECK(split >= 20, "the ids split characters (%d)", split);
    CHECK(col.calls == (int)n + 1, "one call per id and one for the held end (%d)", col.calls);
    CHECK(!col.broken, "a piece ended inside a character");
    CHECK(col.text && want && !strcmp(col.text, want), "joined pieces equal decode(skip_special_tokens)");
    CHECK(col.text && strlen(col.text) >= 3 && !strcmp(col.text + strlen(col.text) - 3, "\xEF\xBF\xBD"),
          "the unfinished character ends as U+FFFD");
    free(want);
    arrfree(known);
    arrfree(col.text);
    arrfree(ids);
    mb_tokenizer_free(tok);
}

/* ---- the generate command ---- */

/* stdout only (stderr to a file) */
static int run_medbot_stdout(const char *args, const char *stdin_file, char *out, size_t cap, char *err, size_t ecap) {
    char cmd[4096], errf[300];
    snprintf(errf, sizeof errf, "%s", t_tmp("stderr.txt"));
    snprintf(cmd, sizeof cmd, "%s %s < %s 2>%s", t_medbot(), args, stdin_file ? stdin_file : "/dev/null", errf);
    FILE *p = popen(cmd, "r");
    if (!p) return -2;
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int status = pclose(p);
    char *e;
    size_t el;
    if (err) {
        err[0] = 0;
        if (!mb_read_file(errf, &e, &el)) {
            snprintf(err, ecap, "%s", e);
            free(e);
        }
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void generate_cli_matches_transformers(void) {
    MbJsonDoc doc;
    if (!load_json(FIX "/generate.json", &doc)) return;
    const MbJson *text = json_get(&doc, json_root(&doc), "text");
    /* --input: one JSON line per question */
    char *jl = NULL;
    for (const MbJson *c = json_first(&doc, text); c; c = json_next(&doc, c)) {
        const char *q = json_str(&doc, json_get(&doc, c, "question"));
        sb_printf(&jl, "{\"question\": ");
        sb_json_string(&jl, q, strlen(q));
        sb_printf(&jl, "}\n\n"); /* blank lines are skipped */
    }
    const char *in = t_tmp("questions.jsonl");
    CHECK_OK(mb_write_file(in, jl, strlen(jl)));
    arrfree(jl);
    static char out[1 << 16], err[4096];
    char args[1024];
    snprintf(args, sizeof args, "generate --model " DPO "/model --lora " DPO "/adapter_qk " GREEDY_ARGS
             " --input %s --threads 2", in);
    int rc = run_medbot_stdout(args, NULL, out, sizeof out, err, sizeof err);
    CHECK(rc == 0, "exit %d: %s", rc, err);
    const char *line = out;
    int k = 0;
    for (const MbJson *c = json_first(&doc, text); c; c = json_next(&doc, c), k++) {
        const char *nl = strchr(line, '\n');
        if (!nl) {
            T_FAIL("answer %d missing from:\n%s", k, out);
            break;
        }
        MbJsonDoc got;
        if (json_parse("generate --input output", line, (size_t)(nl - line), &got)) {
            T_FAIL("line %d is not JSON: %s", k, mb_last_error());
            break;
        }
        const MbJson *a = json_get(&got, json_root(&got), "answer"), *q = json_get(&got, json_root(&got), "question"),
                     *t = json_get(&got, json_root(&got), "tokens");
        CHECK(q && !strcmp(json_str(&got, q), json_str(&doc, json_get(&doc, c, "question"))), "question %d echoed", k);
        CHECK(a && !strcmp(json_str(&got, a), json_str(&doc, json_get(&doc, c, "answer"))), "answer %d equals HF's", k);
        CHECK(t && t->i == (int64_t)json_get(&doc, c, "output")->count, "tokens %d", k);
        json_free(&got);
        line = nl + 1;
    }
    CHECK(*line == 0, "one line per question");
    printf("    generate --input (%d questions): answers and token counts equal HF + PEFT\n", k);
    /* --prompt: the answer streams to stdout, then a newline */
    const MbJson *c = json_first(&doc, text);
    char *args2 = NULL;
    sb_printf(&args2, "generate --model " DPO "/model --lora " DPO "/adapter_qk " GREEDY_ARGS " --prompt '%s'",
              json_str(&doc, json_get(&doc, c, "question")));
    rc = run_medbot_stdout(args2, NULL, out, sizeof out, err, sizeof err);
    char *want = NULL;
    sb_printf(&want, "%s\n", json_str(&doc, json_get(&doc, c, "answer")));
    CHECK(rc == 0 && !strcmp(out, want), "generate --prompt (exit %d) prints HF's answer", rc);
    CHECK(!err[0], "nothing on stderr: %s", err);
    printf("    generate --prompt: stdout is HF's answer\n");
    /* QLoRA: the base loaded 4-bit, the adapter on top */
    const MbJson *q = json_get(&doc, json_root(&doc), "text_nf4");
    arrsetlen(args2, 0), arrsetlen(want, 0);
    sb_printf(&args2, "generate --model " DPO "/model --lora " DPO "/adapter_qk --load_in_4bit --bnb_4bit_compute_dtype "
              "float32 " GREEDY_ARGS " --prompt '%s'", json_str(&doc, json_get(&doc, q, "question")));
    rc = run_medbot_stdout(args2, NULL, out, sizeof out, err, sizeof err);
    sb_printf(&want, "%s\n", json_str(&doc, json_get(&doc, q, "answer")));
    CHECK(rc == 0 && !strcmp(out, want), "generate --load_in_4bit (exit %d) prints HF's answer: %s", rc, err);
    printf("    generate --load_in_4bit --lora: stdout is HF + bitsandbytes + PEFT's answer\n");
    arrfree(args2);
    arrfree(want);
    json_free(&doc);
}

static int valid_utf8(const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t k = utf8_valid_len((const unsigned char *)s + i, n - i);
        if (!k) return 0;
        i += k;
    }
    return 1;
}

static void generate_cli_samples_reproducibly_on_the_tiny_model(void) {
    static char a[1 << 15], b[1 << 15], c[1 << 15], err[4096];
    const char *base = "generate --model weights/tiny --tokenizer weights/llama3/tokenizer.model --prompt '感冒了应该怎么办?' "
                       "--max_new_tokens 24";
    char args[1024];
    snprintf(args, sizeof args, "%s --seed 3", base);
    int r1 = run_medbot_stdout(args, NULL, a, sizeof a, err, sizeof err);
    CHECK(r1 == 0, "exit %d: %s", r1, err);
    snprintf(args, sizeof args, "%s --seed 3 --threads 1", base);
    int r2 = run_medbot_stdout(args, NULL, b, sizeof b, err, sizeof err);
    snprintf(args, sizeof args, "%s --seed 4", base);
    int r3 = run_medbot_stdout(args, NULL, c, sizeof c, err, sizeof err);
    CHECK(r1 == 0 && r2 == 0 && r3 == 0, "exits %d %d %d", r1, r2, r3);
    CHECK(!strcmp(a, b), "seed 3 twice (2 threads, 1 thread): the same answer");
    CHECK(strcmp(a, c), "seed 4: another answer");
    CHECK(valid_utf8(a) && valid_utf8(c), "stdout is valid UTF-8");
    CHECK(strlen(a) > 1 && a[strlen(a) - 1] == '\n', "answer then a newline");
    printf("    seed 3: %zu bytes of valid UTF-8, identical on rerun with 1 thread; seed 4 differs\n", strlen(a));
    /* --raw, --system, --greedy and the other options are accepted */
    snprintf(args, sizeof args, "%s --raw --greedy --top_k 0 --top_p 1 --temperature 1 --no_repeat_ngram_size 2 "
             "--system 'Be brief.' --add_bos false", base);
    int r4 = run_medbot_stdout(args, NULL, a, sizeof a, err, sizeof err);
    CHECK(r4 == 0 && valid_utf8(a), "exit %d: %s", r4, err);
}

static void generate_cli_bad_input(void) {
    const char *bad = t_tmp("bad.jsonl");
    CHECK_OK(mb_write_file(bad, "{\"question\": \"ok\"}\n{\"question\": 5}\n", 35));
    const char *notjson = t_tmp("notjson.jsonl");
    CHECK_OK(mb_write_file(notjson, "{\"question\": \"ok\"}\nhello\n", 25));
    char args[600];
#define M "generate --model " DPO "/model --max_new_tokens 4 "
    t_expect_failure(M "--prompt hi --frobnicate 1", "unknown option", NULL);
    t_expect_failure(M "--prompt hi --input x.jsonl", "exclude each other", NULL);
    t_expect_failure(M, "--prompt TEXT or --input", NULL);
    t_expect_failure(M "--prompt ''", "the prompt is empty", NULL);
    t_expect_failure(M "--prompt", "the prompt is empty", NULL);
    t_expect_failure(M "--prompt 'a long question that needs more than eight tokens' --max_context 8",
                 "--max_context", NULL);
    t_expect_failure(M "--prompt hi --greedy --do_sample", "contradict", NULL);
    t_expect_failure(M "--prompt hi --temperature 0", "temperature must be > 0", NULL);
    t_expect_failure(M "--prompt hi --top_p 1.5", "top_p", NULL);
    t_expect_failure(M "--prompt hi --max_new_tokens 0", "max_new_tokens", NULL);
    t_expect_failure(M "--prompt hi --max_context 999999", "max_position_embeddings", NULL);
    t_expect_failure(M "--prompt hi --lora /nonexistent", "/nonexistent", NULL);
    t_expect_failure(M "--prompt hi --load_in_4bit --bnb_4bit_compute_dtype int8", "--bnb_4bit_compute_dtype must be", NULL);
    snprintf(args, sizeof args, M "--input %s", bad);
    t_expect_failure(args, "bad.jsonl:2: each line needs a string \"question\"", NULL);
    snprintf(args, sizeof args, M "--input %s", notjson);
    t_expect_failure(args, "notjson.jsonl:2: invalid JSON", NULL);
    t_expect_failure("generate --prompt hi", "--model DIR is required", NULL);
    t_expect_failure("generate --model tests/fixtures/llama/gqa2_f32 --prompt hi", "--tokenizer PATH", NULL);
    t_expect_failure("generate --model tests/fixtures/llama/gqa2_f32 --tokenizer weights/llama3/tokenizer.model --prompt hi",
                 "vocab_size is 517", NULL);
    t_expect_failure("chat --model " DPO "/model --seed x", "--seed needs an integer", NULL);
#undef M
}

/* ---- chat ---- */

/* An answer as `medbot chat` writes it to a pipe: one line, \\ \n \r escaped. */
static void chat_line(char **sb, const char *answer) {
    for (const char *c = answer; *c; c++)
        if (*c == '\\') sb_printf(sb, "\\\\");
        else if (*c == '\n') sb_printf(sb, "\\n");
        else if (*c == '\r') sb_printf(sb, "\\r");
        else sb_printf(sb, "%c", *c);
    sb_printf(sb, "\n");
}

static void chat_through_a_pipe_matches_transformers(void) {
    MbJsonDoc doc;
    if (!load_json(FIX "/generate.json", &doc)) return;
    const MbJson *text = json_get(&doc, json_root(&doc), "text"), *chat = json_get(&doc, json_root(&doc), "chat");
    const MbJson *t0 = json_first(&doc, text), *t1 = json_next(&doc, t0), *t2 = json_next(&doc, t1);
    const char *q0 = json_str(&doc, json_get(&doc, t0, "question")), *q1 = json_str(&doc, json_get(&doc, t1, "question")),
               *q2 = json_str(&doc, json_get(&doc, t2, "question"));
    /* two turns, /reset, a third question, /quit, a line never read: one output line per input line
     * (an empty line and /reset get an empty one), answers escaped */
    char *in = NULL, *want = NULL;
    sb_printf(&in, "%s\n\n%s\n/reset\n   %s\n/quit\nnot read\n", q0, q1, q2);
    const char *inf = t_tmp("chat_in.txt");
    CHECK_OK(mb_write_file(inf, in, strlen(in)));
    chat_line(&want, json_str(&doc, json_get(&doc, t0, "answer")));
    sb_printf(&want, "\n");
    chat_line(&want, json_str(&doc, json_get(&doc, chat, "answer")));
    sb_printf(&want, "\n");
    chat_line(&want, json_str(&doc, json_get(&doc, t2, "answer")));
    int newlines = 0;
    for (const MbJson *t = json_first(&doc, text); t; t = json_next(&doc, t))
        newlines += strchr(json_str(&doc, json_get(&doc, t, "answer")), '\n') != NULL;
    newlines += strchr(json_str(&doc, json_get(&doc, chat, "answer")), '\n') != NULL;
    printf("    %d of the reference answers hold a newline (escaped as \\n on the pipe)\n", newlines);
    static char out[1 << 16], err[4096];
    const char *args = "chat --model " DPO "/model --lora " DPO "/adapter_qk " GREEDY_ARGS;
    int rc = run_medbot_stdout(args, inf, out, sizeof out, err, sizeof err);
    CHECK(rc == 0, "exit %d: %s", rc, err);
    CHECK(!strcmp(out, want), "chat answers (turn 1, turn 2 in the conversation, after /reset) equal HF's:\n%s", out);
    CHECK(!err[0], "nothing on stderr: %s", err);
    int lines = 0;
    for (const char *c = out; *c; c++) lines += *c == '\n';
    CHECK(lines == 5, "5 input lines before /quit, %d output lines", lines);
    printf("    chat | 2 turns + /reset + 1: %zu bytes, equal to HF + PEFT (turn 2 continues the conversation)\n",
           strlen(out));
    /* a context of 120 tokens: turn 1 (44 + 64) fits, turn 2 does not: a new conversation */
    arrsetlen(in, 0), arrsetlen(want, 0);
    sb_printf(&in, "%s\n%s\n", q0, q1);
    CHECK_OK(mb_write_file(inf, in, strlen(in)));
    chat_line(&want, json_str(&doc, json_get(&doc, t0, "answer")));
    chat_line(&want, json_str(&doc, json_get(&doc, t1, "answer")));
    char args2[600];
    snprintf(args2, sizeof args2, "%s --max_context 120", args);
    rc = run_medbot_stdout(args2, inf, out, sizeof out, err, sizeof err);
    CHECK(rc == 0 && !strcmp(out, want), "exit %d; after the reset, turn 2 is answered as a first question:\n%s", rc, out);
    CHECK(strstr(err, "starting a new conversation") && strstr(err, "--max_context"), "a clear message: %s", err);
    printf("    chat --max_context 120: %s", err);
    /* a context smaller than the question: a message, an empty answer line, the chat goes on */
    snprintf(args2, sizeof args2, "%s --max_context 30", args);
    rc = run_medbot_stdout(args2, inf, out, sizeof out, err, sizeof err);
    CHECK(rc == 0 && !strcmp(out, "\n\n"), "exit %d, out '%s'", rc, out);
    CHECK(strstr(err, "not answered"), "%s", err);
    arrfree(in);
    arrfree(want);
    json_free(&doc);
}

/* Answers with line breaks stay one line on a pipe: the tiny random model's sampled answer (from
 * 128,256 tokens) holds newlines; unescaped, the chat's first answer is generate's for the same
 * question and seed. */
static void chat_pipe_escapes_line_breaks(void) {
    static char out[1 << 16], gen[1 << 16], err[4096];
    const char *opts = "--model weights/tiny --tokenizer weights/llama3/tokenizer.model --max_new_tokens 120 --seed 7 "
                       "--temperature 1 --top_k 0 --top_p 1 --repetition_penalty 1";
    const char *inf = t_tmp("chat_escape.txt");
    CHECK_OK(mb_write_file(inf, "hello\nmore\n", 11));
    char args[1024];
    snprintf(args, sizeof args, "chat %s", opts);
    int rc = run_medbot_stdout(args, inf, out, sizeof out, err, sizeof err);
    snprintf(args, sizeof args, "generate %s --prompt hello", opts);
    int rc2 = run_medbot_stdout(args, NULL, gen, sizeof gen, NULL, 0);
    CHECK(rc == 0 && rc2 == 0, "exit %d, %d: %s", rc, rc2, err);
    int lines = 0;
    for (const char *c = out; *c; c++) lines += *c == '\n';
    CHECK(lines == 2, "2 input lines, %d output lines", lines);
    char *raw = NULL; /* the first line, unescaped */
    for (const char *c = out; *c && *c != '\n'; c++) {
        if (*c == '\\' && c[1]) {
            c++;
            sb_printf(&raw, "%c", *c == 'n' ? '\n' : *c == 'r' ? '\r' : *c);
        } else sb_printf(&raw, "%c", *c);
    }
    size_t gl = strlen(gen);
    if (gl && gen[gl - 1] == '\n') gen[--gl] = 0; /* generate ends the answer with a newline */
    int breaks = 0;
    for (const char *c = gen; *c; c++) breaks += *c == '\n' || *c == '\r';
    printf("    sampled answer: %zu bytes with %d line breaks -> one escaped line of %zu bytes\n", gl, breaks,
           strcspn(out, "\n"));
    CHECK(breaks > 0, "the answer should hold line breaks (else nothing is tested)");
    CHECK(raw && !strcmp(raw, gen), "unescaped chat answer == generate's answer");
    arrfree(raw);
}

/* tmux on a private socket: send keys, read the screen. */
static int tmux(const char *sock, const char *cmd, char *out, size_t cap) {
    char *full = NULL;
    sb_printf(&full, "TERM=xterm tmux -L %s %s", sock, cmd);
    int rc = t_run(full, out, cap);
    arrfree(full);
    return rc;
}

/* Polls the pane until it contains needle (after skip chars of it); returns its offset or -1. */
static long pane_wait(const char *sock, const char *needle, long skip, double seconds, char *screen, size_t cap) {
    double t0 = mb_now();
    do {
        tmux(sock, "capture-pane -p -J -S -200 -t chat", screen, cap);
        if ((long)strlen(screen) > skip) {
            const char *at = strstr(screen + skip, needle);
            if (at) return (long)(at - screen);
        }
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    } while (mb_now() - t0 < seconds);
    return -1;
}

/* The longest run of printable ASCII in s (to find an answer on a screen). */
static void printable_run(const char *s, char *run, size_t cap) {
    size_t best = 0, bi = 0, i = 0, n = strlen(s);
    while (i < n) {
        size_t j = i;
        while (j < n && s[j] >= 0x21 && s[j] < 0x7f) j++;
        if (j - i > best) best = j - i, bi = i;
        i = j + 1;
    }
    best = MB_MIN(best, cap - 1);
    memcpy(run, s + bi, best);
    run[best] = 0;
}

static void chat_in_a_terminal_with_tmux(void) {
    static char out[1 << 16];
    const char *expect = getenv("MB_EXPECT_TMUX");
    if (t_run("tmux -V", out, sizeof out) != 0) {
        if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_TMUX=1 but tmux does not run: %s", out);
        else printf("    tmux not found: the terminal chat test did not run on this machine (apt-get install tmux)\n");
        return;
    }
    printf("    %s", out);
    MbJsonDoc doc;
    if (!load_json(FIX "/generate.json", &doc)) return;
    const MbJson *t2 = json_next(&doc, json_next(&doc, json_first(&doc, json_get(&doc, json_root(&doc), "text"))));
    const char *q = json_str(&doc, json_get(&doc, t2, "question"));
    char run[64];
    printable_run(json_str(&doc, json_get(&doc, t2, "answer")), run, sizeof run);
    CHECK(strlen(run) >= 4, "the answer has printable text to look for");
    char sock[64], cmd[2048];
    snprintf(sock, sizeof sock, "medbot-test-%ld", (long)getpid());
    char cwd[1024];
    if (!getcwd(cwd, sizeof cwd)) snprintf(cwd, sizeof cwd, ".");
    snprintf(cmd, sizeof cmd, "new-session -d -s chat -x 200 -y 50 -c '%s' \"%s chat --model " DPO "/model --lora " DPO
             "/adapter_qk " GREEDY_ARGS "; echo CHAT-EXIT-\\$?; sleep 30\"", cwd, t_medbot());
    int rc = tmux(sock, cmd, out, sizeof out);
    CHECK(rc == 0, "tmux new-session: %s", out);
    static char screen[1 << 16];
    double wait = t_sanitized() ? 60 : 20;
    long at = pane_wait(sock, "/reset starts over", 0, wait, screen, sizeof screen);
    CHECK(at >= 0, "the banner:\n%s", screen);
    at = pane_wait(sock, "> ", at, wait, screen, sizeof screen);
    CHECK(at >= 0, "the prompt '> ':\n%s", screen);
    snprintf(cmd, sizeof cmd, "send-keys -t chat -l '%s'", q);
    tmux(sock, cmd, out, sizeof out);
    tmux(sock, "send-keys -t chat Enter", out, sizeof out);
    long ans = at >= 0 ? pane_wait(sock, run, at, wait, screen, sizeof screen) : -1;
    CHECK(ans >= 0, "the answer ('%s') on the screen:\n%s", run, screen);
    long again = ans >= 0 ? pane_wait(sock, "\n> ", ans, wait, screen, sizeof screen) : -1;
    CHECK(again >= 0, "a new prompt after the answer:\n%s", screen);
    tmux(sock, "send-keys -t chat -l /reset", out, sizeof out);
    tmux(sock, "send-keys -t chat Enter", out, sizeof out);
    long reset = again >= 0 ? pane_wait(sock, "(a new conversation)", again, wait, screen, sizeof screen) : -1;
    CHECK(reset >= 0, "/reset answers:\n%s", screen);
    tmux(sock, "send-keys -t chat -l /quit", out, sizeof out);
    tmux(sock, "send-keys -t chat Enter", out, sizeof out);
    long quit = pane_wait(sock, "CHAT-EXIT-0", reset > 0 ? reset : 0, wait, screen, sizeof screen);
    CHECK(quit >= 0, "/quit leaves with exit 0:\n%s", screen);
    CHECK(!strstr(screen, "Sanitizer"), "sanitizer report:\n%s", screen);
    if (quit >= 0) printf("    tmux: banner, '> ', question typed, answer streamed ('%s'), '> ' again, /reset, /quit -> exit 0\n", run);
    /* Ctrl-D on an empty line leaves too */
    tmux(sock, "kill-session -t chat", out, sizeof out);
    snprintf(cmd, sizeof cmd, "new-session -d -s chat -x 200 -y 50 -c '%s' \"%s chat --model " DPO
             "/model --max_new_tokens 4; echo CHAT-EXIT-\\$?; sleep 30\"", cwd, t_medbot());
    tmux(sock, cmd, out, sizeof out);
    at = pane_wait(sock, "> ", 0, wait, screen, sizeof screen);
    tmux(sock, "send-keys -t chat C-d", out, sizeof out);
    CHECK(at >= 0 && pane_wait(sock, "CHAT-EXIT-0", 0, wait, screen, sizeof screen) >= 0, "Ctrl-D leaves:\n%s", screen);
    tmux(sock, "kill-server", out, sizeof out);
    json_free(&doc);
}

/* Ctrl-C in a terminal chat stops the answer being written and returns to the prompt with the
 * conversation kept; at the prompt it leaves. The tiny random model writes until max_new_tokens
 * (its EOS ids are 3 of 128,256 tokens), so the answers are long enough to stop. */
static void chat_ctrl_c_stops_an_answer(void) {
    static char out[1 << 16], screen[1 << 16];
    if (t_run("tmux -V", out, sizeof out) != 0) {
        const char *expect = getenv("MB_EXPECT_TMUX");
        if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_TMUX=1 but tmux does not run: %s", out);
        else printf("    tmux not found: the Ctrl-C chat test did not run\n");
        return;
    }
    char sock[64], cmd[2048], cwd[1024];
    snprintf(sock, sizeof sock, "medbot-test-c-%ld", (long)getpid());
    if (!getcwd(cwd, sizeof cwd)) snprintf(cwd, sizeof cwd, ".");
    snprintf(cmd, sizeof cmd, "new-session -d -s chat -x 200 -y 50 -c '%s' \"%s chat --model weights/tiny --tokenizer "
             "weights/llama3/tokenizer.model --max_new_tokens 30000 --max_context 32768 --seed 1 --temperature 1 "
             "--top_k 0 --top_p 1 --repetition_penalty 1; echo CHAT-EXIT-\\$?; sleep 30\"", cwd, t_medbot());
    CHECK(tmux(sock, cmd, out, sizeof out) == 0, "tmux new-session: %s", out);
    double wait = t_sanitized() ? 60 : 20;
    long at = pane_wait(sock, "> ", 0, wait, screen, sizeof screen);
    CHECK(at >= 0, "the prompt:\n%s", screen);
    const char *turns[2] = {"hello", "and then?"};
    for (int k = 0; k < 2 && at >= 0; k++) {
        snprintf(cmd, sizeof cmd, "send-keys -t chat -l '%s'", turns[k]);
        tmux(sock, cmd, out, sizeof out);
        tmux(sock, "send-keys -t chat Enter", out, sizeof out);
        struct timespec ts = {1, 0}; /* the answer is being written */
        nanosleep(&ts, NULL);
        tmux(sock, "send-keys -t chat C-c", out, sizeof out);
        long stopped = pane_wait(sock, "answer stopped (Ctrl-C)", at, wait, screen, sizeof screen);
        CHECK(stopped >= 0, "turn %d: the answer stops on Ctrl-C:\n%s", k + 1, screen);
        at = stopped >= 0 ? pane_wait(sock, "> ", stopped, wait, screen, sizeof screen) : -1;
        CHECK(at >= 0, "turn %d: back at the prompt:\n%s", k + 1, screen);
        CHECK(!strstr(screen, "CHAT-EXIT"), "still running after Ctrl-C:\n%s", screen);
    }
    const char *msg = strstr(screen, "answer stopped");
    if (msg) printf("    Ctrl-C twice in a 2-turn chat: '%.*s'\n", (int)strcspn(msg, "\n"), msg);
    tmux(sock, "send-keys -t chat C-c", out, sizeof out); /* at the prompt: leave */
    CHECK(pane_wait(sock, "CHAT-EXIT-0", 0, wait, screen, sizeof screen) >= 0, "Ctrl-C at the prompt leaves:\n%s", screen);
    CHECK(!strstr(screen, "Sanitizer"), "sanitizer report:\n%s", screen);
    tmux(sock, "kill-server", out, sizeof out);
}

/* dpo in a terminal: the progress bar (stderr) is taken off before each log line (stdout) and drawn
 * again under it, so that no log line starts after a bar's text (tmux records the raw bytes). */
static void training_in_a_terminal_keeps_the_bar_off_log_lines(void) {
    static char out[1 << 16], screen[1 << 16];
    const char *expect = getenv("MB_EXPECT_TMUX");
    if (t_run("tmux -V", out, sizeof out) != 0) {
        if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_TMUX=1 but tmux does not run: %s", out);
        else printf("    tmux not found: the terminal progress test did not run on this machine\n");
        return;
    }
    char sock[64], cmd[4096], dpo[2048], cwd[1024];
    const char *raw_path = t_tmp("dpo-terminal.raw"), *outdir = t_tmp("dpo-terminal");
    snprintf(sock, sizeof sock, "medbot-bar-%ld", (long)getpid());
    if (!getcwd(cwd, sizeof cwd)) snprintf(cwd, sizeof cwd, ".");
    t_dpo_cmd(dpo, sizeof dpo, outdir, "--max_steps 8 --logging_steps 1 --eval_split 0.25 --eval_steps 4");
    /* the command waits for pipe-pane to be in place */
    snprintf(cmd, sizeof cmd, "new-session -d -s chat -x 200 -y 50 -c '%s' \"sleep 1; %s; echo DPO-EXIT-\\$?; sleep 30\"",
             cwd, dpo);
    CHECK(tmux(sock, cmd, out, sizeof out) == 0, "tmux new-session: %s", out);
    snprintf(cmd, sizeof cmd, "pipe-pane -o -t chat 'cat > %s'", raw_path);
    CHECK(tmux(sock, cmd, out, sizeof out) == 0, "tmux pipe-pane: %s", out);
    long at = pane_wait(sock, "DPO-EXIT-", 0, t_sanitized() ? 120 : 40, screen, sizeof screen);
    CHECK(at >= 0 && strstr(screen, "DPO-EXIT-0"), "dpo ran in the terminal:\n%s", screen);
    tmux(sock, "kill-session -t chat", out, sizeof out);
    char *raw = NULL;
    size_t n = 0;
    CHECK_OK(mb_read_file(raw_path, &raw, &n));
    int bars = 0, logs = 0, glued = 0;
    for (const char *p = raw; p && (p = strstr(p, "training [")); p++) bars++;
    /* on the screen (wrapped lines joined), each log line is a line of its own */
    for (char *line = strtok(screen, "\n"); line; line = strtok(NULL, "\n")) {
        if (!strstr(line, "loss ") || !strstr(line, "step ")) continue;
        if (strstr(line, "training [")) continue; /* the bar's own text (it shows a loss too) */
        logs++;
        if (strncmp(line, "step ", 5) && strncmp(line, "eval step ", 10)) glued++, printf("    glued: '%s'\n", line);
    }
    printf("    raw output %zu bytes: the bar drawn %d times; %d log lines on the screen, %d glued\n", n, bars, logs, glued);
    CHECK(bars >= 1, "the bar was drawn on the terminal");
    CHECK(logs >= 8 + 2, "8 step lines and the eval lines are on the screen");
    CHECK(glued == 0, "no log line shares a line with the bar");
    CHECK(raw && strstr(raw, "\r\033[Kstep 1/8"), "the bar is erased before the first log line");
    free(raw);
}

MB_TEST_MAIN("sampler", T(sampler_processors_match_transformers), T(sampler_top_k_and_top_p_edge_cases),
             T(sampler_greedy_generate_matches_transformers), T(sampler_generate_with_lora_and_template_matches_transformers),
             T(sampler_seeded_sampling_is_reproducible), T(sampler_draws_follow_the_distribution),
             T(sampler_generate_stops_on_stop_ids_and_a_full_cache), T(sampler_stop_ids_follow_generation_config),
             T(sampler_streaming_never_breaks_a_character), T(generate_cli_matches_transformers),
             T(generate_cli_samples_reproducibly_on_the_tiny_model), T(generate_cli_bad_input),
             T(chat_through_a_pipe_matches_transformers), T(chat_pipe_escapes_line_breaks), T(chat_in_a_terminal_with_tmux),
             T(chat_ctrl_c_stops_an_answer),
             T(training_in_a_terminal_keeps_the_bar_off_log_lines))
