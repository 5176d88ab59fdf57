/* tests/bench/bench_generate.c: generation on the CPU, next to llama.cpp in the same run.
 *   1. speed: prefill and decode tokens/s (mb_generate: forward + the card's sampling) on a
 *      ~1B-parameter Llama (Llama-3.2-1B's shape, random weights), medbot's fast path (the
 *      default of generate/chat) and its exact path (--exact), and llama.cpp on the same weights
 *      (converted to GGUF) with the same thread count; the engines take turns. Prints ratios.
 *   2. roofline: the machine's memory bandwidth (STREAM-style copy, and a read-only sum) measured
 *      here, and the weight bytes medbot's decode reads per second against it.
 *   3. accuracy: the fast path's next-token distributions against the exact path's (KL
 *      divergence mean and 99th percentile, max relative logit error) over a text of 1024 tokens
 *      in 2 chunks of 512, the second half of each chunk scored (512 positions, as llama.cpp's
 *      perplexity tool scores them), on the fixture models and the 1B model; next to
 *      llama.cpp's Q4_0 and IQ4_NL against its bf16 (llama-perplexity --kl-divergence).
 * It asserts nothing about speed.
 *   ./build.sh bench generate          (speed, roofline, accuracy)
 *   ./build.sh bench generate_speed    (or generate_accuracy: one part)
 *   ./build.sh bench generate_8b       (not in the above: an 8B-shaped checkpoint, see bench_8b)
 * Environment:
 *   MEDBOT_THREADS             threads for both engines (default: all cores)
 *   MEDBOT_LLAMA_CPP           a folder holding llama.cpp's llama-bench, llama-quantize and
 *                              llama-perplexity, built from llama.cpp's source outside this
 *                              repository; unset: the llama.cpp rows say "not measured"
 *   MEDBOT_LLAMA_CPP_CONVERT   llama.cpp's convert_hf_to_gguf.py (to make the bf16 GGUF once),
 *   MEDBOT_REF_PYTHON          and the python that runs it (needs torch, transformers,
 *                              safetensors, sentencepiece; default python3)
 * The model folder, its GGUF files and the text are kept in build/bench/llama1b/ between runs. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

#include <sys/resource.h>
#include <sys/wait.h>

/* Llama-3.2-1B: L=16 C=2048 H=32 K=8 D=64 F=8192 V=128256, tied embeddings, llama3 rope */
static const char *config_1b =
    "{\"model_type\":\"llama\",\"architectures\":[\"LlamaForCausalLM\"],\"hidden_size\":2048,"
    "\"intermediate_size\":8192,\"num_hidden_layers\":16,\"num_attention_heads\":32,\"num_key_value_heads\":8,"
    "\"head_dim\":64,\"vocab_size\":128256,\"max_position_embeddings\":131072,\"rms_norm_eps\":1e-5,"
    "\"rope_theta\":500000.0,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":32.0,\"low_freq_factor\":1.0,"
    "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},\"tie_word_embeddings\":true,"
    "\"bos_token_id\":128000,\"eos_token_id\":[128001,128008,128009],\"hidden_act\":\"silu\","
    "\"torch_dtype\":\"bfloat16\"}";
/* what llama.cpp's converter needs beside weights/llama3/tokenizer.json */
static const char *tokenizer_config =
    "{\"tokenizer_class\":\"PreTrainedTokenizerFast\",\"bos_token\":\"<|begin_of_text|>\","
    "\"eos_token\":\"<|end_of_text|>\",\"model_max_length\":131072}";

#define DIR "build/bench/llama1b"
#define PREFILL_T 128
#define DECODE_N 32
#define REPS 3
#define ROUNDS 2 /* the engines take turns this many times; each row keeps its best (a shared machine) */

typedef struct {
    double prefill, decode; /* tokens/s; 0: not measured */
    char note[1200];
} Speed;

/* medbot's rows: one per weight format and path (NF4: the bf16 file quantized at load, as
 * bitsandbytes' load_in_4bit; the quantization is not timed) */
static const struct {
    const char *label;
    int load_in_4bit, fast;
} medbot_rows[] = {{"bf16", 0, 1}, {"nf4", 1, 1}, {"bf16", 0, 0}, {"nf4", 1, 0}};
#define N_MEDBOT 4

/* llama.cpp's rows: the bf16 GGUF and 4-bit quantizations of it */
static const struct {
    const char *label, *file, *qtype; /* qtype NULL: the converted bf16 file itself */
} llama_rows[] = {{"bf16", DIR "/model-bf16.gguf", NULL}, {"q4_0", DIR "/model-q4_0.gguf", "Q4_0"},
                  {"iq4_nl", DIR "/model-iq4_nl.gguf", "IQ4_NL"}};

/* The bytes of a weight as it is held (NF4: codes, absmax codes and the nested scales) */
static double weight_bytes(const MbWeight *w) {
    const MbNf4 *q = weight_nf4(w);
    if (w->dtype == MB_DT_I8) return (double)w->rows * (double)w->cols * (1.0 + 4.0 / MB_Q8_BLOCK); /* codes + scales */
    if (!q) return (double)w->rows * (double)w->cols * (double)mb_dtype_size(w->dtype);
    double b = (double)w->rows * (double)w->cols / 2;
    if (q->absmax_q) b += (double)q->nblocks + 4.0 * (double)((q->nblocks + q->nested_blocksize - 1) / q->nested_blocksize);
    else b += 4.0 * (double)q->nblocks;
    return b;
}

/* The weight bytes one decoded token reads: every layer's weights, the final norm and lm_head
 * (the embedding: one row, left out) */
static double decode_bytes(const MbModel *m) {
    double b = weight_bytes(&m->norm) + weight_bytes(m->lm_head_q8.data ? &m->lm_head_q8 : &m->lm_head);
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) b += weight_bytes(&m->layers[l].w[i]);
    return b;
}

typedef struct {
    double t_first, t_last;
    int n;
} Clock;

static int on_token(void *ctx, int32_t id, const char *text, size_t len) {
    Clock *c = ctx;
    (void)text, (void)len;
    if (id < 0) return 0;
    c->t_last = mb_now();
    if (c->n++ == 0) c->t_first = c->t_last;
    return 0;
}

static void bench_medbot(int load_in_4bit, int fast, int threads, Speed *s, double *bytes) {
    MbLoadOptions opt;
    memset(&opt, 0, sizeof opt);
    opt.threads = threads;
    opt.load_in_4bit = load_in_4bit;
    opt.fast = fast;
    MbModel *m;
    if (mb_model_load(DIR, &opt, &m)) {
        snprintf(s->note, sizeof s->note, "%s", mb_last_error());
        return;
    }
    *bytes = decode_bytes(m);
    int V = m->cfg.vocab_size;
    int32_t tokens[PREFILL_T], out[DECODE_N];
    MbRng rng;
    mb_rng_seed(&rng, 0);
    for (int i = 0; i < PREFILL_T; i++) tokens[i] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)V);
    MbGenerationConfig g;
    mb_generation_config_defaults(&g); /* the card's sampling */
    g.max_new_tokens = DECODE_N;
    g.seed = 1;
    MbKVCache *kv = NULL;
    MbSampler *smp = NULL;
    float *logits = mb_malloc((size_t)V * sizeof *logits);
    if (mb_kvcache_new(m, 1, PREFILL_T + DECODE_N, &kv) || mb_sampler_new(&g, (size_t)V, &smp)) {
        snprintf(s->note, sizeof s->note, "%s", mb_last_error());
        goto done;
    }
    mb_model_forward(m, kv, tokens, 1, 8, NULL, logits, 1); /* warm-up */
    double best_p = 1e30, best_d = 1e30;
    for (int r = 0; r < REPS; r++) {
        mb_kvcache_reset(kv);
        double t0 = mb_now();
        mb_model_forward(m, kv, tokens, 1, PREFILL_T, NULL, logits, 1);
        best_p = MB_MIN(best_p, mb_now() - t0);
        /* decode: the generation after the same prompt (its prefill is already in the cache but
         * the last token, which mb_generate runs again), timed from the first new token */
        mb_kvcache_reset(kv);
        mb_model_forward(m, kv, tokens, 1, PREFILL_T - 1, NULL, NULL, 0);
        Clock c = {0, 0, 0};
        size_t n_out;
        if (mb_generate(m, kv, smp, NULL, tokens, PREFILL_T, out, &n_out, on_token, &c) || c.n < 2) {
            snprintf(s->note, sizeof s->note, "%s", mb_last_error());
            goto done;
        }
        best_d = MB_MIN(best_d, (c.t_last - c.t_first) / (c.n - 1));
    }
    s->prefill = MB_MAX(s->prefill, PREFILL_T / best_p);
    s->decode = MB_MAX(s->decode, 1 / best_d);
done:
    free(logits);
    mb_sampler_free(smp);
    mb_kvcache_free(kv);
    mb_model_free(m);
}

/* Runs a command; 0 on success. */
static int sh(const char *cmd) {
    int st = system(cmd);
    return st == -1 || !WIFEXITED(st) || WEXITSTATUS(st) != 0;
}

/* Makes the GGUF file of a llama.cpp row when it is not there yet; "" or why not. */
static const char *make_gguf(const char *bin, int row, int threads) {
    static char why[1100];
    char cmd[2048];
    if (mb_is_file(llama_rows[row].file)) return "";
    if (!llama_rows[row].qtype) {
        const char *conv = getenv("MEDBOT_LLAMA_CPP_CONVERT"), *py = getenv("MEDBOT_REF_PYTHON");
        if (!conv || !conv[0]) return "not measured: no GGUF yet (set MEDBOT_LLAMA_CPP_CONVERT to convert_hf_to_gguf.py)";
        snprintf(cmd, sizeof cmd, "%s %s %s --outtype bf16 --outfile %s > %s/convert.log 2>&1", py && py[0] ? py : "python3",
                 conv, DIR, llama_rows[row].file, DIR);
        if (sh(cmd)) return "not measured: convert_hf_to_gguf.py failed (see " DIR "/convert.log)";
        return "";
    }
    if (!mb_is_file(llama_rows[0].file)) return "not measured: no bf16 GGUF to quantize";
    snprintf(cmd, sizeof cmd, "%s/llama-quantize %s %s %s %d > %s/quantize.log 2>&1", bin, llama_rows[0].file,
             llama_rows[row].file, llama_rows[row].qtype, threads, DIR);
    if (sh(cmd)) {
        snprintf(why, sizeof why, "not measured: llama-quantize %s failed (see %s/quantize.log)", llama_rows[row].qtype, DIR);
        return why;
    }
    return "";
}

/* The best of the samples_ts of the one test in llama-bench's JSON output (its REPS repetitions:
 * best of REPS, as medbot's rows). */
static int bench_json_ts(const char *cmd, double *ts, char *commit, size_t cn) {
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    char *text = NULL;
    int c;
    while ((c = fgetc(p)) != EOF) arrput(text, (char)c);
    int rc = pclose(p);
    int ok = 0;
    MbJsonDoc doc;
    if (rc == 0 && arrlen(text) && !json_parse("llama-bench", text, (size_t)arrlen(text), &doc)) {
        const MbJson *t = json_first(&doc, json_root(&doc));
        const MbJson *v = t ? json_get(&doc, t, "samples_ts") : NULL, *b = t ? json_get(&doc, t, "build_commit") : NULL;
        for (const MbJson *e = v ? json_first(&doc, v) : NULL; e; e = json_next(&doc, e))
            if (e->kind == MB_JSON_NUMBER) *ts = MB_MAX(*ts, e->num), ok = 1;
        if (b && b->kind == MB_JSON_STRING) snprintf(commit, cn, "%s", json_str(&doc, b));
        json_free(&doc);
    }
    arrfree(text);
    return ok;
}

static void bench_llama_cpp(const char *bin, int row, int threads, Speed *s, char *commit, size_t cn) {
    const char *why = make_gguf(bin, row, threads);
    if (why[0]) {
        snprintf(s->note, sizeof s->note, "%s", why);
        return;
    }
    /* prefill: -p 128; decode: 32 tokens after 128 in the cache (-d 128), as medbot's */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/llama-bench -m %s -t %d -r %d -p %d -n 0 -o json 2>/dev/null", bin,
             llama_rows[row].file, threads, REPS, PREFILL_T);
    int ok = bench_json_ts(cmd, &s->prefill, commit, cn);
    snprintf(cmd, sizeof cmd, "%s/llama-bench -m %s -t %d -r %d -p 0 -n %d -d %d -o json 2>/dev/null", bin,
             llama_rows[row].file, threads, REPS, DECODE_N, PREFILL_T);
    ok = ok && bench_json_ts(cmd, &s->decode, commit, cn);
    if (!ok) snprintf(s->note, sizeof s->note, "not measured: llama-bench failed on %s", llama_rows[row].file);
}

static void row(const char *w, const char *engine, const Speed *s) {
    if (s->note[0]) printf("%-8s %-24s %s\n", w, engine, s->note);
    else printf("%-8s %-24s %14.1f %14.2f\n", w, engine, s->prefill, s->decode);
}

static void ratio(const char *w, const char *what, const Speed *a, const Speed *b) {
    if (a->note[0] || b->note[0]) return;
    printf("%-8s %-24s %13.2fx %13.2fx\n", w, what, a->prefill / b->prefill, a->decode / b->decode);
}

/* ---- memory bandwidth: STREAM's copy (c[j] = a[j], bytes read + written) and a read-only sum,
 * 256 MiB arrays, on the bench's threads, best of 5 ---- */

typedef struct {
    uint64_t *a, *b;
    size_t n;
    uint64_t sum[256];
} Stream;

static void stream_copy(void *ctx, int tid, int nt) {
    Stream *s = ctx;
    size_t lo, hi;
    mb_split(s->n, tid, nt, &lo, &hi);
    for (size_t j = lo; j < hi; j++) {
        if (j % 8 == 0) __builtin_prefetch(&s->a[j + 512]); /* 4 KB ahead: see memory_bandwidth */
        s->b[j] = s->a[j];
    }
}

static void stream_read(void *ctx, int tid, int nt) {
    Stream *s = ctx;
    size_t lo, hi;
    mb_split(s->n, tid, nt, &lo, &hi);
    uint64_t acc = 0;
    for (size_t j = lo; j < hi; j++) {
        if (j % 8 == 0) __builtin_prefetch(&s->a[j + 512]);
        acc += s->a[j]; /* integer adds */
    }
    s->sum[tid] = acc;
}

/* GB/s of the copy and of the read; 0 when the arrays do not fit. The loops prefetch 4 KB ahead,
 * as the decode kernels do: on the 2-core VM of the README one core read at about half the
 * bandwidth without (its hardware prefetcher alone keeps too few lines in flight), which would
 * make the roofline look passed when it is not. */
static void memory_bandwidth(int threads, double *copy, double *read) {
    Stream s;
    memset(&s, 0, sizeof s);
    s.n = ((size_t)256 << 20) / sizeof(uint64_t);
    s.a = mb_aligned_alloc(s.n * sizeof(uint64_t)), s.b = mb_aligned_alloc(s.n * sizeof(uint64_t));
    MbPool *pool = mb_pool_new(threads);
    *copy = *read = 0;
    if (s.a && s.b && pool) {
        for (size_t j = 0; j < s.n; j++) s.a[j] = j, s.b[j] = 0;
        for (int r = 0; r < 5; r++) {
            double t0 = mb_now();
            mb_pool_run(pool, stream_copy, &s);
            double t1 = mb_now();
            mb_pool_run(pool, stream_read, &s);
            double t2 = mb_now();
            *copy = MB_MAX(*copy, 2.0 * (double)s.n * sizeof(uint64_t) / (t1 - t0) / 1e9);
            *read = MB_MAX(*read, (double)s.n * sizeof(uint64_t) / (t2 - t1) / 1e9);
        }
    }
    mb_pool_free(pool);
    free(s.a), free(s.b);
}

/* ---- accuracy: fast against exact ---- */

#define KL_CTX 512
#define KL_CHUNKS 2
#define KL_TEXT DIR "/kl_text.txt"

/* The text's tokens as llama-perplexity takes them: the Llama 3 tokens of weights/demo/pairs.jsonl
 * with <|begin_of_text|> in front, KL_CHUNKS chunks of KL_CTX, each chunk's first token replaced
 * by <|begin_of_text|>. Writes the text to KL_TEXT for llama.cpp. */
static int32_t *kl_tokens(void) {
    char *text;
    size_t n, count;
    MbTokenizer *tok;
    int32_t *ids = NULL, *out = NULL;
    if (mb_read_file("weights/demo/pairs.jsonl", &text, &n)) return NULL;
    if (!mb_tokenizer_load("weights/llama3/tokenizer.json", &tok)) {
        if (!mb_tokenizer_encode(tok, text, n, MB_ENCODE_ADD_BOS, &ids, &count) && count >= KL_CTX * KL_CHUNKS &&
            !mb_write_file(KL_TEXT, text, n) && (out = mb_malloc(KL_CTX * KL_CHUNKS * sizeof *out))) {
            memcpy(out, ids, KL_CTX * KL_CHUNKS * sizeof *out);
            for (int k = 0; k < KL_CHUNKS; k++) out[k * KL_CTX] = ids[0];
        }
        free(ids);
        mb_tokenizer_free(tok);
    }
    free(text);
    return out;
}

/* log softmax of a row of V logits into lp (fp64) */
static void log_softmax(const float *x, size_t V, double *lp) {
    double mx = -INFINITY, s = 0;
    for (size_t v = 0; v < V; v++) mx = fmax(mx, (double)x[v]);
    for (size_t v = 0; v < V; v++) s += exp((double)x[v] - mx);
    double lse = mx + log(s);
    for (size_t v = 0; v < V; v++) lp[v] = (double)x[v] - lse;
}

typedef struct {
    double *kl; /* stb_ds array: KL(exact || fast) per scored position */
    double max_rel;
} Kl;

/* one scored position: exact and fast logits of V */
static void kl_add(Kl *k, const float *ex, const float *fa, size_t V, double *lp, double *lq) {
    log_softmax(ex, V, lp), log_softmax(fa, V, lq);
    double kl = 0, mx = 0, err = 0;
    for (size_t v = 0; v < V; v++) {
        kl += exp(lp[v]) * (lp[v] - lq[v]);
        mx = fmax(mx, fabs((double)ex[v])), err = fmax(err, fabs((double)fa[v] - (double)ex[v]));
    }
    arrput(k->kl, kl);
    k->max_rel = fmax(k->max_rel, mx > 0 ? err / mx : err);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void kl_print(const char *model, const char *weights, const char *mode, Kl *k, int served) {
    size_t n = (size_t)arrlen(k->kl);
    if (!n) return;
    qsort(k->kl, n, sizeof *k->kl, cmp_double);
    double mean = 0;
    for (size_t i = 0; i < n; i++) mean += k->kl[i];
    mean /= (double)n;
    printf("%-26s %-7s %-22s %10.6f %10.6f %12.3e %6zu%s\n", model, weights, mode, mean,
           k->kl[(size_t)floor(0.99 * (double)(n - 1))], k->max_rel, n, served ? "" : "  (bit for bit the exact path's)");
    arrfree(k->kl);
    k->kl = NULL, k->max_rel = 0;
}

/* The logits of every position of each chunk (KL_CHUNKS x KL_CTX x V) through one prefill per
 * chunk; decode: the first half of each chunk in one prefill, then one token at a time (the
 * decode kernels), logits of the scored positions only. NULL: a failure (printed). */
static float *chunk_logits(const char *dir, int load_in_4bit, int fast, int decode, int threads, const int32_t *text,
                           size_t *V_out) {
    MbLoadOptions opt;
    memset(&opt, 0, sizeof opt);
    opt.threads = threads, opt.load_in_4bit = load_in_4bit, opt.fast = fast;
    MbModel *m;
    if (mb_model_load(dir, &opt, &m)) {
        printf("%s: %s\n", dir, mb_last_error());
        return NULL;
    }
    size_t V = (size_t)m->cfg.vocab_size;
    float *logits = mb_malloc((size_t)KL_CHUNKS * KL_CTX * V * sizeof(float));
    int32_t *ids = mb_malloc(KL_CTX * sizeof *ids);
    MbKVCache *kv = NULL;
    MbStatus rc = logits && ids ? mb_kvcache_new(m, 1, KL_CTX, &kv) : MB_ERR_OOM;
    for (int k = 0; !rc && k < KL_CHUNKS; k++) {
        for (int i = 0; i < KL_CTX; i++) ids[i] = (int32_t)((uint32_t)text[k * KL_CTX + i] % (uint32_t)V); /* small vocabularies: modulo */
        float *dst = logits + (size_t)k * KL_CTX * V;
        mb_kvcache_reset(kv);
        if (!decode) {
            rc = mb_model_forward(m, kv, ids, 1, KL_CTX, NULL, dst, 0);
            continue;
        }
        rc = mb_model_forward(m, kv, ids, 1, KL_CTX / 2, NULL, NULL, 0);
        for (int i = KL_CTX / 2; !rc && i < KL_CTX - 1; i++) rc = mb_model_forward(m, kv, ids + i, 1, 1, NULL, dst + (size_t)i * V, 1);
    }
    if (rc) printf("%s: %s\n", dir, mb_last_error()), free(logits), logits = NULL;
    free(ids);
    mb_kvcache_free(kv);
    mb_model_free(m);
    *V_out = V;
    return logits;
}

/* The fast path against the exact one on model dir, weights as stored or NF4 */
static void accuracy_model(const char *label, const char *dir, int load_in_4bit, int decode_too, int threads,
                           const int32_t *text) {
    size_t V;
    float *ex = chunk_logits(dir, load_in_4bit, 0, 0, threads, text, &V);
    if (!ex) return;
    double *lp = mb_malloc(V * sizeof *lp), *lq = mb_malloc(V * sizeof *lq);
    int served = 0; /* the prefill's logits differ from the exact ones (decode's differ anyway: a matvec sums
                       in another order than the matmul) */
    for (int decode = 0; decode <= decode_too; decode++) {
        float *fa = chunk_logits(dir, load_in_4bit, 1, decode, threads, text, &V);
        if (!fa) continue;
        Kl k = {NULL, 0};
        for (int c = 0; c < KL_CHUNKS; c++)
            for (int i = KL_CTX / 2; i < KL_CTX - 1; i++) {
                const float *e = ex + ((size_t)c * KL_CTX + (size_t)i) * V, *f = fa + ((size_t)c * KL_CTX + (size_t)i) * V;
                if (!decode) served |= memcmp(e, f, V * sizeof(float)) != 0;
                kl_add(&k, e, f, V, lp, lq);
            }
        kl_print(label, load_in_4bit ? "nf4" : "as-is", decode ? "decode (1 token/call)" : "prefill (512/call)", &k, served);
        free(fa);
    }
    free(lp), free(lq), free(ex);
}

/* llama-perplexity --kl-divergence of a quantized GGUF against the bf16 one's saved logits */
static void accuracy_llama_cpp(const char *bin, int threads) {
    char cmd[2048], line[512];
    snprintf(cmd, sizeof cmd, "%s/llama-perplexity -m %s -f %s -c %d -b 2048 --chunks %d -t %d --kl-divergence-base "
             "%s/base-bf16.kld > %s/kld-base.log 2>&1", bin, llama_rows[0].file, KL_TEXT, KL_CTX, KL_CHUNKS, threads, DIR, DIR);
    if (sh(cmd)) {
        printf("llama.cpp: llama-perplexity on the bf16 GGUF failed (see %s/kld-base.log)\n", DIR);
        return;
    }
    for (int r = 1; r < 3; r++) {
        snprintf(cmd, sizeof cmd, "%s/llama-perplexity -m %s -c %d -b 2048 --chunks %d -t %d --kl-divergence-base "
                 "%s/base-bf16.kld --kl-divergence 2>&1 | grep -E '^(Mean    KLD|99.0%%   KLD|Maximum KLD)'", bin, llama_rows[r].file, KL_CTX,
                 KL_CHUNKS, threads, DIR);
        FILE *f = popen(cmd, "r");
        double mean = NAN, p99 = NAN;
        while (f && fgets(line, sizeof line, f)) {
            if (!strncmp(line, "Mean    KLD:", 12)) mean = atof(line + 12);
            if (!strncmp(line, "99.0%   KLD:", 12)) p99 = atof(line + 12);
        }
        if (f) pclose(f);
        char label[64];
        snprintf(label, sizeof label, "llama.cpp 1.2B %s", llama_rows[r].label);
        printf("%-26s %-7s %-22s %10.6f %10.6f %12s %6d\n", label, "vs bf16", "prefill (512/call)", mean, p99, "-",
               KL_CTX * KL_CHUNKS / 2 - KL_CHUNKS);
    }
}

static void accuracy(const char *bin, int threads) {
    int32_t *text = kl_tokens();
    if (!text) {
        printf("accuracy: no text (%s)\n", mb_last_error());
        return;
    }
    printf("\nthe fast path against the exact path: next-token distributions at %d positions (the second half of %d "
           "chunks of %d tokens of weights/demo/pairs.jsonl; ids modulo a fixture's vocabulary)\n",
           KL_CTX * KL_CHUNKS / 2 - KL_CHUNKS, KL_CHUNKS, KL_CTX);
    printf("%-26s %-7s %-22s %10s %10s %12s %6s\n", "model", "weights", "path", "mean KL", "p99 KL", "max rel err", "n");
    static const struct {
        const char *label, *dir;
    } fixtures[] = {{"fixture tied_mqa_bf16", "tests/fixtures/llama/tied_mqa_bf16"},
                    {"fixture gqa4_bf16_sharded", "tests/fixtures/llama/gqa4_bf16_sharded"},
                    {"fixture dpo/model (f32)", "tests/fixtures/dpo/model"},
                    {"weights/tiny", "weights/tiny"}};
    for (size_t i = 0; i < sizeof fixtures / sizeof *fixtures; i++)
        for (int q = 0; q < 2; q++) accuracy_model(fixtures[i].label, fixtures[i].dir, q, 1, threads, text);
    for (int q = 0; q < 2; q++) accuracy_model("1.2B (bench model)", DIR, q, 1, threads, text);
    if (bin) accuracy_llama_cpp(bin, threads);
    printf("(max rel err: the largest |fast - exact| logit over the largest |exact| logit of its row; "
           "llama.cpp's tool prints no logit error)\n");
    free(text);
}

static int prepare_model(void) {
    mkdir("build", 0755), mkdir("build/bench", 0755), mkdir(DIR, 0755);
    MbStatus rc = MB_OK;
    if (!mb_is_file(DIR "/config.json")) rc = mb_write_file(DIR "/config.json", config_1b, strlen(config_1b));
    if (!rc && !mb_is_file(DIR "/tokenizer_config.json"))
        rc = mb_write_file(DIR "/tokenizer_config.json", tokenizer_config, strlen(tokenizer_config));
    if (!rc && !mb_is_file(DIR "/tokenizer.json")) {
        char *t;
        size_t n;
        if (!(rc = mb_read_file("weights/llama3/tokenizer.json", &t, &n))) {
            rc = mb_write_file(DIR "/tokenizer.json", t, n);
            free(t);
        }
    }
    if (!rc && !mb_is_file(DIR "/model.safetensors")) {
        printf("(writing random bf16 weights to %s, once)\n", DIR);
        fflush(stdout);
        rc = mb_model_init_random(DIR "/config.json", DIR, &(MbInitOptions){.seed = 42, .dtype = MB_DT_BF16, .std = 0.02});
    }
    if (rc) fprintf(stderr, "bench: %s\n", mb_last_error());
    return rc == MB_OK;
}

/* ---- the 8B shape (./build.sh bench generate_8b, MEDBOT_BENCH_8B=DIR: a bf16 Llama-3.1-8B-shaped
 * folder, e.g. from medbot init --config weights/llama-3.1-8b/config.json; MEDBOT_BENCH_8B_GGUF: its
 * llama.cpp Q4_0 file, optional): load with load_in_4bit (quantizing), time to first token after a
 * 128-token prompt, decode tokens/s, peak RSS; llama-bench on the GGUF with the same threads ---- */

static long peak_rss_kb(void) {
    struct rusage u;
    return getrusage(RUSAGE_SELF, &u) == 0 ? u.ru_maxrss : -1;
}

static void bench_8b(const char *dir, const char *gguf, const char *bin, int threads) {
    printf("the 8B shape: %s, --load_in_4bit (fast path), %d threads; prompt %d random tokens, then %d decoded\n", dir,
           threads, PREFILL_T, DECODE_N);
    MbLoadOptions opt;
    memset(&opt, 0, sizeof opt);
    opt.threads = threads, opt.load_in_4bit = 1, opt.fast = 1;
    static MbProgressLines lines = {NULL, 1.0, 1};
    lines.out = stdout;
    opt.progress.fn = mb_progress_print, opt.progress.ctx = &lines;
    MbModel *m;
    double t0 = mb_now();
    if (mb_model_load(dir, &opt, &m)) {
        printf("medbot: %s\n", mb_last_error());
        return;
    }
    double t_load = mb_now() - t0;
    long rss_load = peak_rss_kb();
    int V = m->cfg.vocab_size;
    int32_t tokens[PREFILL_T], out[DECODE_N];
    MbRng rng;
    mb_rng_seed(&rng, 0);
    for (int i = 0; i < PREFILL_T; i++) tokens[i] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)V);
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.max_new_tokens = DECODE_N;
    g.seed = 1;
    MbKVCache *kv = NULL;
    MbSampler *smp = NULL;
    Clock c = {0, 0, 0};
    size_t n_out;
    if (mb_kvcache_new(m, 1, PREFILL_T + DECODE_N, &kv) || mb_sampler_new(&g, (size_t)V, &smp)) {
        printf("medbot: %s\n", mb_last_error());
    } else {
        t0 = mb_now();
        if (mb_generate(m, kv, smp, NULL, tokens, PREFILL_T, out, &n_out, on_token, &c) || c.n < 2)
            printf("medbot: %s\n", mb_last_error());
        else
            printf("medbot    load + quantize %.1f s (peak RSS then %.2f GB); time to first token %.2f s; decode %.2f tok/s; "
                   "NF4 weights %.2f GB a token; peak RSS %.2f GB\n", t_load, rss_load / 1048576.0, c.t_first - t0,
                   (c.n - 1) / (c.t_last - c.t_first), decode_bytes(m) / 1e9, peak_rss_kb() / 1048576.0);
    }
    mb_sampler_free(smp);
    mb_kvcache_free(kv);
    mb_model_free(m);
    if (!gguf || !bin) {
        printf("llama.cpp not measured: set MEDBOT_LLAMA_CPP and MEDBOT_BENCH_8B_GGUF (a Q4_0 GGUF of the same weights)\n");
        return;
    }
    char cmd[2048];
    for (int part = 0; part < 2; part++) {
        snprintf(cmd, sizeof cmd, "/usr/bin/time -f 'llama.cpp %s: wall %%e s, peak RSS %%M kB' %s/llama-bench -m %s -t %d -r 1 %s "
                 "-o md 2>&1 | grep -iE 'q4_0|llama.cpp'", part ? "decode" : "prefill", bin, gguf, threads,
                 part ? "-p 0 -n 32 -d 128" : "-p 128 -n 0");
        fflush(stdout);
        if (sh(cmd)) printf("llama.cpp: llama-bench failed on %s\n", gguf);
    }
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0); /* each line as it comes, also into a file */
    if (filter[0] && !strcmp(filter, "generate_8b")) {
        const char *dir = getenv("MEDBOT_BENCH_8B"), *th = getenv("MEDBOT_THREADS"), *bin = getenv("MEDBOT_LLAMA_CPP");
        if (!dir || !dir[0]) {
            printf("generate_8b: set MEDBOT_BENCH_8B to a bf16 Llama-3.1-8B-shaped folder\n");
            return 1;
        }
        bench_8b(dir, getenv("MEDBOT_BENCH_8B_GGUF"), bin && bin[0] ? bin : NULL, th && atoi(th) > 0 ? atoi(th) : mb_cpu_count());
        return 0;
    }
    int speed = !filter[0] || strstr("generate_speed", filter), acc = !filter[0] || strstr("generate_accuracy", filter);
    if (!speed && !acc) return 0;
    const char *th = getenv("MEDBOT_THREADS"), *bin = getenv("MEDBOT_LLAMA_CPP");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    if (!prepare_model()) return 1;
    int have_llama = bin && bin[0];
    char path[1024], commit[64] = "?";
    if (have_llama) {
        snprintf(path, sizeof path, "%s/llama-bench", bin);
        have_llama = mb_is_file(path);
    }
    if (speed) {
        printf("generation, ~1.2B-parameter Llama (Llama-3.2-1B shape: L=16 C=2048 H=32 K=8 D=64 F=8192 V=128256, tied; "
               "random weights), %d threads\nprefill: %d tokens; decode: %d tokens after them (medbot: mb_generate with "
               "the card's sampling; llama.cpp: llama-bench -p %d, then -n %d -d %d); best of %d x %d rounds (--exact: 1 round), "
               "the engines taking turns\n\n", threads, PREFILL_T, DECODE_N, PREFILL_T, DECODE_N, PREFILL_T, REPS, ROUNDS);
        Speed me[N_MEDBOT], lc[3];
        double bytes[N_MEDBOT] = {0}, copy, read;
        memset(me, 0, sizeof me), memset(lc, 0, sizeof lc);
        for (int i = 0; i < 3 && !have_llama; i++)
            snprintf(lc[i].note, sizeof lc[i].note, "not measured: set MEDBOT_LLAMA_CPP to the folder of llama.cpp's llama-bench");
        for (int round = 0; round < ROUNDS; round++) {
            for (int i = 0; i < 3 && have_llama; i++)
                if (!lc[i].note[0]) bench_llama_cpp(bin, i, threads, &lc[i], commit, sizeof commit);
            for (int i = 0; i < N_MEDBOT; i++) /* the --exact rows once: they are the reference, not the race */
                if (!me[i].note[0] && (medbot_rows[i].fast || round == 0)) bench_medbot(medbot_rows[i].load_in_4bit, medbot_rows[i].fast, threads, &me[i], &bytes[i]);
        }
        memory_bandwidth(threads, &copy, &read);
        char name[64];
        snprintf(name, sizeof name, "llama.cpp %s", commit);
        printf("%-8s %-24s %14s %14s\n", "weights", "engine", "prefill tok/s", "decode tok/s");
        row("bf16", "medbot", &me[0]);
        row("bf16", name, &lc[0]);
        ratio("bf16", "medbot / llama.cpp", &me[0], &lc[0]);
        row("nf4", "medbot", &me[1]);
        row("q4_0", name, &lc[1]);
        ratio("4-bit", "medbot nf4 / q4_0", &me[1], &lc[1]);
        row("iq4_nl", name, &lc[2]);
        ratio("4-bit", "medbot nf4 / iq4_nl", &me[1], &lc[2]);
        row("bf16", "medbot --exact", &me[2]);
        row("nf4", "medbot --exact", &me[3]);
        ratio("bf16", "fast / exact", &me[0], &me[2]);
        ratio("nf4", "fast / exact", &me[1], &me[3]);
        printf("\nmemory bandwidth, %d threads, 256 MiB arrays: STREAM copy %.1f GB/s (read + write), read-only sum %.1f GB/s\n",
               threads, copy, read);
        printf("decode roofline: weight bytes read per token x decode tok/s, against the copy's GB/s (and the read's)\n");
        for (int i = 0; i < N_MEDBOT; i++)
            if (!me[i].note[0] && copy > 0)
                printf("  medbot %-4s %-8s %6.3f GB/token x %6.2f tok/s = %5.1f GB/s: %3.0f%% of copy, %3.0f%% of read\n",
                       medbot_rows[i].label, medbot_rows[i].fast ? "fast" : "--exact", bytes[i] / 1e9, me[i].decode,
                       bytes[i] * me[i].decode / 1e9, 100 * bytes[i] * me[i].decode / 1e9 / copy,
                       100 * bytes[i] * me[i].decode / 1e9 / read);
    }
    if (acc) accuracy(have_llama ? bin : NULL, threads);
    return 0;
}
