/* tests/test_model.c: the Llama-3.1 forward pass against transformers (fixtures from
 * tests/ref/make_llama_fixtures.py): full prefill, a right-padded batch, token-by-token decode
 * with the KV cache. Tolerance: max |logit - ref| / max |ref| <= 1e-5, F32 and BF16 weights. */
#include "test.h"

#include <sys/resource.h>

#define FORWARD_TOL 1e-5

static const char *fixture_models[] = {"gqa2_f32", "gqa4_bf16_sharded", "tied_mqa_bf16"};
#define N_MODELS (sizeof fixture_models / sizeof *fixture_models)

typedef struct {
    MbModel *m;
    MbSafetensors *ref;
} Fixture;

static int fixture_open(const char *name, Fixture *f, int threads) {
    char dir[256], ref[300];
    snprintf(dir, sizeof dir, "tests/fixtures/llama/%s", name);
    snprintf(ref, sizeof ref, "%s/ref.safetensors", dir);
    memset(f, 0, sizeof *f);
    MbLoadOptions opt = {.threads = threads};
    CHECK_OK(mb_model_load(dir, &opt, &f->m));
    CHECK_OK(mb_safetensors_open(ref, &f->ref));
    return f->m && f->ref;
}

static void fixture_close(Fixture *f) {
    mb_model_free(f->m);
    mb_safetensors_close(f->ref);
}

/* A reference tensor of the expected dtype; data copied out (aligned) for the comparisons. */
static void *ref_tensor(Fixture *f, const char *name, MbDtype dt, size_t *numel, size_t *shape0, size_t *shape1) {
    const MbTensorInfo *t = mb_safetensors_find(f->ref, name);
    CHECK(t && t->dtype == dt, "reference tensor %s", name);
    if (!t || t->dtype != dt) return NULL;
    void *p = mb_malloc(t->nbytes);
    memcpy(p, t->data, t->nbytes);
    if (numel) *numel = t->numel;
    if (shape0) *shape0 = t->shape[0];
    if (shape1) *shape1 = t->ndim > 1 ? t->shape[1] : 1;
    return p;
}

static void forward_prefill_matches_transformers(void) {
    for (size_t i = 0; i < N_MODELS; i++) {
        Fixture f;
        if (!fixture_open(fixture_models[i], &f, 2)) continue;
        size_t n, B, T, V = (size_t)f.m->cfg.vocab_size;
        int32_t *tok = ref_tensor(&f, "tokens_full", MB_DT_I32, &n, &B, &T);
        float *ref = ref_tensor(&f, "logits_full", MB_DT_F32, NULL, NULL, NULL);
        if (tok && ref) {
            float *logits = mb_malloc(B * T * V * sizeof(float));
            CHECK_OK(mb_model_forward(f.m, NULL, tok, (int)B, (int)T, NULL, logits, 0));
            char what[128];
            snprintf(what, sizeof what, "%s prefill (%zu x %zu)", fixture_models[i], B, T);
            t_close_rel(what, logits, ref, B * T * V, FORWARD_TOL);
            /* last_only gives the last row of each sequence */
            float *last = mb_malloc(B * V * sizeof(float));
            CHECK_OK(mb_model_forward(f.m, NULL, tok, (int)B, (int)T, NULL, last, 1));
            for (size_t b = 0; b < B; b++) {
                snprintf(what, sizeof what, "%s last_only row %zu", fixture_models[i], b);
                t_close_rel(what, last + b * V, ref + (b * T + T - 1) * V, V, FORWARD_TOL);
            }
            free(last);
            free(logits);
        }
        free(tok);
        free(ref);
        fixture_close(&f);
    }
}

static void forward_padded_batch_matches_transformers(void) {
    for (size_t i = 0; i < N_MODELS; i++) {
        Fixture f;
        if (!fixture_open(fixture_models[i], &f, 2)) continue;
        size_t n, B, T, V = (size_t)f.m->cfg.vocab_size;
        int32_t *tok = ref_tensor(&f, "tokens_pad", MB_DT_I32, &n, &B, &T);
        int32_t *lens32 = ref_tensor(&f, "lens_pad", MB_DT_I32, NULL, NULL, NULL);
        float *ref = ref_tensor(&f, "logits_pad", MB_DT_F32, NULL, NULL, NULL);
        if (tok && ref && lens32) {
            int lens[16];
            for (size_t b = 0; b < B; b++) lens[b] = lens32[b];
            float *logits = mb_malloc(B * T * V * sizeof(float));
            CHECK_OK(mb_model_forward(f.m, NULL, tok, (int)B, (int)T, lens, logits, 0));
            char what[128];
            for (size_t b = 0; b < B; b++) {
                snprintf(what, sizeof what, "%s padded seq %zu (len %d of %zu)", fixture_models[i], b, lens[b], T);
                t_close_rel(what, logits + b * T * V, ref + b * T * V, (size_t)lens[b] * V, FORWARD_TOL);
            }
            /* the padded positions too: they attend to the real keys only, as in transformers */
            snprintf(what, sizeof what, "%s padded batch, all positions", fixture_models[i]);
            t_close_rel(what, logits, ref, B * T * V, FORWARD_TOL);
            /* last_only picks each sequence's last real token */
            float *last = mb_malloc(B * V * sizeof(float));
            CHECK_OK(mb_model_forward(f.m, NULL, tok, (int)B, (int)T, lens, last, 1));
            for (size_t b = 0; b < B; b++) {
                snprintf(what, sizeof what, "%s padded last_only seq %zu", fixture_models[i], b);
                t_close_rel(what, last + b * V, ref + (b * T + (size_t)lens[b] - 1) * V, V, FORWARD_TOL);
            }
            free(last);
            free(logits);
        }
        free(tok);
        free(lens32);
        free(ref);
        fixture_close(&f);
    }
}

static void decode_with_kv_cache_matches_transformers(void) {
    for (size_t i = 0; i < N_MODELS; i++) {
        Fixture f;
        if (!fixture_open(fixture_models[i], &f, 1)) continue;
        size_t n, B, T, V = (size_t)f.m->cfg.vocab_size;
        int32_t *tok = ref_tensor(&f, "tokens_full", MB_DT_I32, &n, &B, &T);
        float *ref = ref_tensor(&f, "logits_decode", MB_DT_F32, NULL, NULL, NULL);
        float *full = ref_tensor(&f, "logits_full", MB_DT_F32, NULL, NULL, NULL);
        MbKVCache *kv = NULL;
        CHECK_OK(mb_kvcache_new(f.m, 1, (int)T, &kv));
        if (tok && ref && full && kv) {
            float *logits = mb_malloc(T * V * sizeof(float));
            for (size_t t = 0; t < T; t++)
                CHECK_OK(mb_model_forward(f.m, kv, tok + t, 1, 1, NULL, logits + t * V, 0));
            CHECK(mb_kvcache_len(kv) == (int)T, "cache holds %zu tokens", T);
            char what[128];
            snprintf(what, sizeof what, "%s decode x%zu vs HF past_key_values", fixture_models[i], T);
            t_close_rel(what, logits, ref, T * V, FORWARD_TOL);
            snprintf(what, sizeof what, "%s decode x%zu vs HF prefill", fixture_models[i], T);
            t_close_rel(what, logits, full, T * V, FORWARD_TOL);
            /* a prefill of 10 then single steps: the same numbers */
            mb_kvcache_reset(kv);
            CHECK_OK(mb_model_forward(f.m, kv, tok, 1, 10, NULL, logits, 0));
            for (size_t t = 10; t < T; t++)
                CHECK_OK(mb_model_forward(f.m, kv, tok + t, 1, 1, NULL, logits + t * V, 0));
            snprintf(what, sizeof what, "%s prefill 10 + decode", fixture_models[i]);
            t_close_rel(what, logits, ref, T * V, FORWARD_TOL);
            /* the cache is full now */
            CHECK(mb_model_forward(f.m, kv, tok, 1, 1, NULL, logits, 0) == MB_ERR_ARG, "overflowing the cache fails");
            free(logits);
        }
        mb_kvcache_free(kv);
        free(tok);
        free(ref);
        free(full);
        fixture_close(&f);
    }
}

static void forward_rejects_bad_tokens(void) {
    Fixture f;
    if (!fixture_open("tied_mqa_bf16", &f, 1)) return;
    int32_t tok[3] = {1, 1000, 2};
    float logits[3000];
    CHECK(mb_model_forward(f.m, NULL, tok, 1, 3, NULL, logits, 0) == MB_ERR_ARG, "token 1000 of 1000");
    CHECK(strstr(mb_last_error(), "outside the vocabulary"), "%s", mb_last_error());
    int lens[1] = {4};
    tok[1] = 5;
    CHECK(mb_model_forward(f.m, NULL, tok, 1, 3, lens, logits, 0) == MB_ERR_ARG, "len 4 of 3");
    fixture_close(&f);
}

/* The thread count changes how work is split, never the result. */
static void forward_same_result_with_any_thread_count(void) {
    Fixture f1, f3;
    if (!fixture_open("gqa2_f32", &f1, 1) || !fixture_open("gqa2_f32", &f3, 3)) return;
    size_t n, B, T, V = (size_t)f1.m->cfg.vocab_size;
    int32_t *tok = ref_tensor(&f1, "tokens_full", MB_DT_I32, &n, &B, &T);
    float *a = mb_malloc(B * T * V * sizeof(float)), *b = mb_malloc(B * T * V * sizeof(float));
    CHECK_OK(mb_model_forward(f1.m, NULL, tok, (int)B, (int)T, NULL, a, 0));
    CHECK_OK(mb_model_forward(f3.m, NULL, tok, (int)B, (int)T, NULL, b, 0));
    CHECK(!memcmp(a, b, B * T * V * sizeof(float)), "1 and 3 threads give identical logits");
    free(a);
    free(b);
    free(tok);
    fixture_close(&f1);
    fixture_close(&f3);
}

/* Sizes from input that no memory holds are MB_ERR_OOM with a message, and the model goes on: a KV
 * cache whose size overflows, and (the plain run: a forked child under RLIMIT_AS, which the
 * sanitizers' shadow memory cannot run under) one the system refuses. */
static void absurd_sizes_are_out_of_memory_not_an_exit(void) {
    Fixture f;
    if (!fixture_open("gqa2_f32", &f, 1)) return;
    MbKVCache *kv = NULL;
    MbStatus st = mb_kvcache_new(f.m, INT_MAX, INT_MAX, &kv);
    printf("    a KV cache of %d x %d tokens -> %d: %s\n", INT_MAX, INT_MAX, (int)st, mb_last_error());
    CHECK(st == MB_ERR_OOM && !kv && strstr(mb_last_error(), "out of memory"), "%s", mb_last_error());
    if (t_sanitized()) {
        printf("    (the RLIMIT_AS child runs in the plain build only)\n");
        fixture_close(&f);
        return;
    }
    const MbConfig *c = mb_model_config(f.m);
    size_t want = 2 * (size_t)c->num_hidden_layers * ((size_t)1 << 24) * (size_t)c->num_key_value_heads * (size_t)c->head_dim * 4;
    char needle[100];
    snprintf(needle, sizeof needle, "out of memory allocating %zu bytes at", want);
    float *logits = mb_malloc(2 * (size_t)c->vocab_size * sizeof(float));
    int fds[2];
    if (pipe(fds) != 0) T_FAIL("pipe");
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) { /* 1 GiB of address space: a cache of 2^24 tokens (12 GiB here) cannot be had */
        struct rlimit lim = {(rlim_t)1 << 30, (rlim_t)1 << 30};
        char msg[1200];
        MbKVCache *big = NULL, *small = NULL;
        int32_t tok[2] = {1, 2};
        MbStatus a = setrlimit(RLIMIT_AS, &lim) == 0 ? mb_kvcache_new(f.m, 1, 1 << 24, &big) : MB_ERR_ARG;
        snprintf(msg, sizeof msg, "%d %s\n", (int)a, mb_last_error());
        MbStatus b = mb_kvcache_new(f.m, 1, 8, &small); /* the model goes on */
        if (!b) b = mb_model_forward(f.m, small, tok, 1, 2, NULL, logits, 0);
        snprintf(msg + strlen(msg), sizeof msg - strlen(msg), "%d", (int)b);
        if (write(fds[1], msg, strlen(msg)) < 0) _exit(3);
        _exit(big ? 2 : 0);
    }
    close(fds[1]);
    char msg[1200];
    int child = t_child_wait(pid, fds[0], msg, sizeof msg);
    printf("    a KV cache of 2^24 tokens under a 1 GiB RLIMIT_AS (child exit %d) -> %s\n", child, msg);
    CHECK(child == 0, "the child ends normally");
    CHECK(atoi(msg) == MB_ERR_OOM && strstr(msg, needle), "want '%s': %s", needle, msg);
    CHECK(strchr(msg, '\n') && atoi(strchr(msg, '\n') + 1) == MB_OK, "then a small cache and a forward work: %s", msg);
    free(logits);
    fixture_close(&f);
}

MB_TEST_MAIN("model", T(forward_prefill_matches_transformers), T(forward_padded_batch_matches_transformers),
             T(decode_with_kv_cache_matches_transformers), T(forward_rejects_bad_tokens),
             T(forward_same_result_with_any_thread_count), T(absurd_sizes_are_out_of_memory_not_an_exit))
