/* tests/bench/bench_forward.c: prefill and decode tokens/s of medbot's CPU forward pass on a
 * ~100M-parameter Llama-shaped model (random weights), next to PyTorch + transformers on the
 * same folder, same tokens, same thread count, measured in the same run. Prints a ratio; it
 * asserts nothing about speed.
 *   ./build.sh bench forward      (MEDBOT_REF_PYTHON: a python with tests/ref/requirements.txt;
 *                                  MEDBOT_THREADS: thread count, default all cores) */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static const char *config_100m =
    "{\"model_type\":\"llama\",\"hidden_size\":768,\"intermediate_size\":2048,\"num_hidden_layers\":12,"
    "\"num_attention_heads\":12,\"num_key_value_heads\":4,\"head_dim\":64,\"vocab_size\":32000,"
    "\"max_position_embeddings\":4096,\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,"
    "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,"
    "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},\"tie_word_embeddings\":true,"
    "\"bos_token_id\":1,\"eos_token_id\":2,\"architectures\":[\"LlamaForCausalLM\"]}";

#define PREFILL_T 256
#define PROMPT_T 16
#define DECODE_STEPS 32
#define REPS 3

typedef struct {
    double prefill, decode;
} Speed;

static int bench_medbot(const char *dir, int threads, Speed *s) {
    MbLoadOptions opt = {.threads = threads};
    MbModel *m;
    if (mb_model_load(dir, &opt, &m)) {
        fprintf(stderr, "bench: %s\n", mb_last_error());
        return 0;
    }
    int V = m->cfg.vocab_size;
    int32_t tokens[PREFILL_T];
    MbRng rng;
    mb_rng_seed(&rng, 0);
    for (int i = 0; i < PREFILL_T; i++) tokens[i] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)V);
    float *logits = mb_malloc((size_t)PREFILL_T * V * sizeof(float));
    mb_model_forward(m, NULL, tokens, 1, PROMPT_T, NULL, logits, 0); /* warm-up */
    double best = 1e30;
    for (int r = 0; r < REPS; r++) {
        double t0 = mb_now();
        mb_model_forward(m, NULL, tokens, 1, PREFILL_T, NULL, logits, 0);
        best = MB_MIN(best, mb_now() - t0);
    }
    s->prefill = PREFILL_T / best;
    MbKVCache *kv;
    mb_kvcache_new(m, 1, PROMPT_T + DECODE_STEPS + 1, &kv);
    best = 1e30;
    for (int r = 0; r < REPS; r++) {
        mb_kvcache_reset(kv);
        mb_model_forward(m, kv, tokens, 1, PROMPT_T, NULL, logits, 1);
        int32_t tok = tokens[PROMPT_T];
        double t0 = mb_now();
        for (int i = 0; i < DECODE_STEPS; i++) {
            mb_model_forward(m, kv, &tok, 1, 1, NULL, logits, 1);
            int arg = 0;
            for (int v = 1; v < V; v++)
                if (logits[v] > logits[arg]) arg = v;
            tok = arg;
        }
        best = MB_MIN(best, mb_now() - t0);
    }
    s->decode = DECODE_STEPS / best;
    mb_kvcache_free(kv);
    free(logits);
    mb_model_free(m);
    return 1;
}

static int bench_torch(const char *dir, const char *dtype, int threads, Speed *s, char *version, size_t vn) {
    const char *py = getenv("MEDBOT_REF_PYTHON");
    if (!py || !py[0]) py = "python3";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s tests/bench/bench_forward_torch.py %s %s %d %d %d %d 2>/dev/null", py, dir,
             dtype, threads, PREFILL_T, DECODE_STEPS, REPS);
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    char line[1024] = "";
    char *got = fgets(line, sizeof line, p);
    int rc = pclose(p);
    if (!got || rc != 0) return 0;
    MbJsonDoc doc;
    if (json_parse("torch bench", line, strlen(line), &doc)) return 0;
    const MbJson *r = json_root(&doc);
    const MbJson *a = json_get(&doc, r, "prefill_tok_s"), *b = json_get(&doc, r, "decode_tok_s"),
                 *v = json_get(&doc, r, "torch");
    int ok = a && b && a->kind == MB_JSON_NUMBER && b->kind == MB_JSON_NUMBER;
    if (ok) s->prefill = a->num, s->decode = b->num;
    snprintf(version, vn, "%s", v && v->kind == MB_JSON_STRING ? json_str(&doc, v) : "?");
    json_free(&doc);
    return ok;
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    if (filter[0] && !strstr("forward", filter)) return 0;
    const char *th = getenv("MEDBOT_THREADS");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    const char *dtypes[] = {"f32", "bf16"};
    MbDtype mdt[] = {MB_DT_F32, MB_DT_BF16};
    printf("forward pass, ~100M-parameter Llama (L=12 C=768 H=12 K=4 D=64 F=2048 V=32000, tied), "
           "%d threads\nprefill: 1 x %d tokens; decode: %d steps after a %d-token prompt; best of %d\n\n",
           threads, PREFILL_T, DECODE_STEPS, PROMPT_T, REPS);
    printf("%-6s %-22s %14s %14s\n", "dtype", "engine", "prefill tok/s", "decode tok/s");
    mkdir("build", 0755);
    mkdir("build/bench", 0755);
    for (int i = 0; i < 2; i++) {
        char dir[128], cfg[160];
        snprintf(dir, sizeof dir, "build/bench/llama100m_%s", dtypes[i]);
        snprintf(cfg, sizeof cfg, "%s/config.json", dir);
        mkdir(dir, 0755);
        if (!mb_is_file(cfg) && mb_write_file(cfg, config_100m, strlen(config_100m))) {
            fprintf(stderr, "bench: %s\n", mb_last_error());
            return 1;
        }
        char st[160];
        snprintf(st, sizeof st, "%s/model.safetensors", dir);
        if (!mb_is_file(st) && mb_model_init_random(cfg, dir, &(MbInitOptions){.seed = 42, .dtype = mdt[i], .std = 0.02})) {
            fprintf(stderr, "bench: %s\n", mb_last_error());
            return 1;
        }
        Speed me = {0, 0}, pt = {0, 0};
        char version[64] = "";
        if (!bench_medbot(dir, threads, &me)) return 1;
        printf("%-6s %-22s %14.1f %14.1f\n", dtypes[i], "medbot", me.prefill, me.decode);
        if (bench_torch(dir, dtypes[i], threads, &pt, version, sizeof version)) {
            char name[64];
            snprintf(name, sizeof name, "pytorch %s", version);
            printf("%-6s %-22s %14.1f %14.1f\n", dtypes[i], name, pt.prefill, pt.decode);
            printf("%-6s %-22s %13.2fx %13.2fx\n", dtypes[i], "medbot / pytorch", me.prefill / pt.prefill,
                   me.decode / pt.decode);
        } else {
            printf("%-6s %-22s   (not measured: set MEDBOT_REF_PYTHON to a python with tests/ref/requirements.txt)\n",
                   dtypes[i], "pytorch");
        }
    }
    return 0;
}
