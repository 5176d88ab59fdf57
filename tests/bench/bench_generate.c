/* tests/bench/bench_generate.c: prefill and decode tokens/s of generation (mb_generate: forward
 * + the card's sampling) on a ~1B-parameter Llama (Llama-3.2-1B's shape, random weights), next
 * to llama.cpp on the same weights (converted to GGUF) and the same thread count, measured in
 * the same run. Prints the ratios; asserts nothing about speed.
 *   ./build.sh bench generate
 * Environment:
 *   MEDBOT_THREADS             threads for both engines (default: all cores)
 *   MEDBOT_LLAMA_CPP           a folder holding llama.cpp's llama-bench and llama-quantize, built
 *                              from llama.cpp's source outside this repository; unset: the
 *                              llama.cpp rows say "not measured"
 *   MEDBOT_LLAMA_CPP_CONVERT   llama.cpp's convert_hf_to_gguf.py (to make the bf16 GGUF once),
 *   MEDBOT_REF_PYTHON          and the python that runs it (needs torch, transformers,
 *                              safetensors, sentencepiece; default python3)
 * The model folder and its GGUF files are kept in build/bench/llama1b/ between runs. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

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

/* medbot's rows: one per weight format (NF4: the bf16 file quantized at load, as bitsandbytes'
 * load_in_4bit; the quantization is not timed). */
static const struct {
    const char *label;
    int load_in_4bit;
} medbot_rows[] = {{"bf16", 0}, {"nf4", 1}};

/* llama.cpp's rows: the bf16 GGUF and 4-bit quantizations of it */
static const struct {
    const char *label, *file, *qtype; /* qtype NULL: the converted bf16 file itself */
} llama_rows[] = {{"bf16", DIR "/model-bf16.gguf", NULL}, {"q4_0", DIR "/model-q4_0.gguf", "Q4_0"},
                  {"iq4_nl", DIR "/model-iq4_nl.gguf", "IQ4_NL"}};

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

static void bench_medbot(int load_in_4bit, int threads, Speed *s) {
    MbLoadOptions opt;
    memset(&opt, 0, sizeof opt);
    opt.threads = threads;
    opt.load_in_4bit = load_in_4bit;
    MbModel *m;
    if (mb_model_load(DIR, &opt, &m)) {
        snprintf(s->note, sizeof s->note, "%s", mb_last_error());
        return;
    }
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

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    if (filter[0] && !strstr("generate", filter)) return 0;
    const char *th = getenv("MEDBOT_THREADS"), *bin = getenv("MEDBOT_LLAMA_CPP");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    if (!prepare_model()) return 1;
    printf("generation, ~1.2B-parameter Llama (Llama-3.2-1B shape: L=16 C=2048 H=32 K=8 D=64 F=8192 V=128256, tied; "
           "random weights), %d threads\nprefill: %d tokens; decode: %d tokens after them (medbot: mb_generate with "
           "the card's sampling; llama.cpp: llama-bench -p %d, then -n %d -d %d); best of %d x %d rounds, the engines taking turns\n\n",
           threads, PREFILL_T, DECODE_N, PREFILL_T, DECODE_N, PREFILL_T, REPS, ROUNDS);
    printf("%-8s %-24s %14s %14s\n", "weights", "engine", "prefill tok/s", "decode tok/s");
    int have_llama = bin && bin[0];
    char path[1024], commit[64] = "?";
    if (have_llama) {
        snprintf(path, sizeof path, "%s/llama-bench", bin);
        have_llama = mb_is_file(path);
    }
    Speed me[2], lc[3];
    memset(me, 0, sizeof me), memset(lc, 0, sizeof lc);
    for (int i = 0; i < 3 && !have_llama; i++)
        snprintf(lc[i].note, sizeof lc[i].note, "not measured: set MEDBOT_LLAMA_CPP to the folder of llama.cpp's llama-bench");
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < 3 && have_llama; i++)
            if (!lc[i].note[0]) bench_llama_cpp(bin, i, threads, &lc[i], commit, sizeof commit);
        for (int i = 0; i < 2; i++)
            if (!me[i].note[0]) bench_medbot(medbot_rows[i].load_in_4bit, threads, &me[i]);
    }
    char name[64];
    snprintf(name, sizeof name, "llama.cpp %s", commit);
    row("bf16", "medbot", &me[0]);
    row("bf16", name, &lc[0]);
    ratio("bf16", "medbot / llama.cpp", &me[0], &lc[0]);
    row("nf4", "medbot", &me[1]);
    row("q4_0", name, &lc[1]);
    ratio("4-bit", "medbot nf4 / q4_0", &me[1], &lc[1]);
    row("iq4_nl", name, &lc[2]);
    ratio("4-bit", "medbot nf4 / iq4_nl", &me[1], &lc[2]);
    ratio("bf16", "medbot bf16 / q4_0", &me[0], &lc[1]);
    return 0;
}
