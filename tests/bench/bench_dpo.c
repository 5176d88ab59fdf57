/* tests/bench/bench_dpo.c: DPO training throughput of medbot's CPU backend on a ~100M-parameter
 * Llama shape (random fp32 weights), with and without gradient checkpointing, next to TRL 0.27.2
 * DPOTrainer + PEFT on PyTorch CPU on the same folder, token ids, batch and thread count, in the
 * same run. One optimizer step = policy + reference forward, backward, clip, AdamW, one
 * micro-batch of PAIRS pairs of PROMPT_T + COMPLETION_T tokens; LoRA r=64 alpha=8 on q_proj,
 * k_proj (the card's). Median of STEPS steps after one warm-up. Asserts nothing about speed.
 *   ./build.sh bench dpo      (MEDBOT_REF_PYTHON: a python with tests/ref/requirements.txt) */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static const char *config_100m =
    "{\"model_type\":\"llama\",\"hidden_size\":768,\"intermediate_size\":2048,\"num_hidden_layers\":12,"
    "\"num_attention_heads\":12,\"num_key_value_heads\":4,\"head_dim\":64,\"vocab_size\":32000,"
    "\"max_position_embeddings\":4096,\"rms_norm_eps\":1e-5,\"rope_theta\":500000.0,"
    "\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,"
    "\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8192},\"tie_word_embeddings\":true,"
    "\"bos_token_id\":1,\"eos_token_id\":1,\"architectures\":[\"LlamaForCausalLM\"]}";

#define PAIRS 2
#define PROMPT_T 64
#define COMPLETION_T 64
#define STEPS 3

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Seconds per optimizer step (median) for medbot. */
static double bench_medbot(const char *dir, int threads, int gc) {
    MbTrainer tr;
    memset(&tr, 0, sizeof tr);
    mb_train_config_defaults(&tr.cfg);
    tr.cfg.per_device_train_batch_size = PAIRS, tr.cfg.max_length = 0;
    tr.cfg.lora.r = 64, tr.cfg.lora.alpha = 8;
    MbLoadOptions o = {.threads = threads};
    if (mb_model_load(dir, &o, &tr.m) || mb_lora_new(tr.m, &tr.cfg.lora, 1, &tr.lo)) {
        fprintf(stderr, "bench: %s\n", mb_last_error());
        exit(1);
    }
    mb_model_set_lora(tr.m, tr.lo);
    tr.m->gradient_checkpointing = gc;
    /* a stand-in tokenizer is not needed: pairs are token ids; the pad id only fills padding */
    MbRng rng;
    mb_rng_seed(&rng, 0);
    for (int p = 0; p < PAIRS; p++) {
        MbPair pr;
        memset(&pr, 0, sizeof pr);
        pr.np = PROMPT_T, pr.nc = pr.nr = COMPLETION_T;
        pr.prompt = mb_malloc(PROMPT_T * 4), pr.chosen = mb_malloc(COMPLETION_T * 4), pr.rejected = mb_malloc(COMPLETION_T * 4);
        for (int i = 0; i < PROMPT_T; i++) pr.prompt[i] = 2 + (int32_t)(mb_rng_u64(&rng) % 31998);
        for (int i = 0; i < COMPLETION_T; i++) pr.chosen[i] = 2 + (int32_t)(mb_rng_u64(&rng) % 31998);
        for (int i = 0; i < COMPLETION_T; i++) pr.rejected[i] = 2 + (int32_t)(mb_rng_u64(&rng) % 31998);
        arrput(tr.train.pairs, pr);
    }
    size_t np = tr.lo->n_params;
    tr.exp_avg = mb_calloc(np, sizeof(float)), tr.exp_avg_sq = mb_calloc(np, sizeof(float));
    int idx[PAIRS];
    for (int i = 0; i < PAIRS; i++) idx[i] = i;
    double t[STEPS], met[MET_COUNT];
    MbOps *ops = tr.m->ops;
    for (int s = 0; s <= STEPS; s++) {
        double t0 = mb_now();
        ops->fill(ops, tr.lo->grads, 0.0f, np);
        if (train_microbatch(&tr, &tr.train, idx, PAIRS, 0, 1, 1.0, met)) {
            fprintf(stderr, "bench: %s\n", mb_last_error());
            exit(1);
        }
        double norm = sqrt(ops->sumsq(ops, tr.lo->grads, np));
        if (norm > 1.0) ops->scale(ops, tr.lo->grads, (float)(1.0 / (norm + 1e-6)), np);
        ops->adamw(ops, tr.lo->params, tr.lo->grads, tr.exp_avg, tr.exp_avg_sq, np, 5e-6, 0.9, 0.999, 1e-8, 0, s + 1);
        if (s) t[s - 1] = mb_now() - t0;
    }
    qsort(t, STEPS, sizeof *t, cmp_double);
    for (ptrdiff_t i = 0; i < arrlen(tr.train.pairs); i++)
        free(tr.train.pairs[i].prompt), free(tr.train.pairs[i].chosen), free(tr.train.pairs[i].rejected);
    arrfree(tr.train.pairs);
    free(tr.exp_avg), free(tr.exp_avg_sq);
    mb_model_set_lora(tr.m, NULL);
    mb_lora_free(tr.lo);
    mb_model_free(tr.m);
    return t[STEPS / 2];
}

static double bench_torch(const char *dir, int threads, int gc) {
    const char *py = getenv("MEDBOT_REF_PYTHON");
    if (!py || !py[0]) py = "python3";
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s tests/bench/bench_dpo_torch.py %s %d %d %d %d %d %d 2>/dev/null", py, dir, threads,
             PAIRS, PROMPT_T, COMPLETION_T, STEPS, gc);
    FILE *p = popen(cmd, "r");
    if (!p) return 0;
    char line[1024] = "", *got = fgets(line, sizeof line, p);
    int rc = pclose(p);
    if (!got || rc) return 0;
    MbJsonDoc doc;
    if (json_parse("torch bench", line, strlen(line), &doc)) return 0;
    const MbJson *s = json_get(&doc, json_root(&doc), "step_s");
    double v = s && s->kind == MB_JSON_NUMBER ? s->num : 0;
    json_free(&doc);
    return v;
}

int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : "";
    if (filter[0] && !strstr("dpo", filter)) return 0;
    const char *th = getenv("MEDBOT_THREADS");
    int threads = th && atoi(th) > 0 ? atoi(th) : mb_cpu_count();
    mkdir("build", 0755), mkdir("build/bench", 0755);
    const char *dir = "build/bench/llama100m_f32";
    mkdir(dir, 0755);
    char cfg[160], st[160];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    if (!mb_is_file(cfg) && mb_write_file(cfg, config_100m, strlen(config_100m))) return 1;
    if (!mb_is_file(st) && mb_model_init_random(cfg, dir, &(MbInitOptions){.seed = 42, .dtype = MB_DT_F32, .std = 0.02})) {
        fprintf(stderr, "bench: %s\n", mb_last_error());
        return 1;
    }
    double tokens = 2.0 * PAIRS * (PROMPT_T + COMPLETION_T);
    printf("DPO step, ~100M-parameter Llama (L=12 C=768 H=12 K=4 D=64 F=2048 V=32000, fp32), LoRA r=64 on q,k;\n"
           "%d pairs x (%d prompt + %d completion) tokens = %.0f tokens per step, %d threads, median of %d steps\n\n",
           PAIRS, PROMPT_T, COMPLETION_T, tokens, threads, STEPS);
    printf("%-26s %12s %12s %12s\n", "", "medbot s", "trl s", "medbot/trl");
    for (int gc = 0; gc < 2; gc++) {
        double me = bench_medbot(dir, threads, gc), pt = bench_torch(dir, threads, gc);
        char label[64];
        snprintf(label, sizeof label, "%s", gc ? "gradient checkpointing" : "no checkpointing");
        if (pt > 0)
            printf("%-26s %8.2f (%5.0f tok/s) %8.2f (%5.0f tok/s) %8.2fx\n", label, me, tokens / me, pt, tokens / pt, pt / me);
        else
            printf("%-26s %8.2f (%5.0f tok/s)  trl: not measured (set MEDBOT_REF_PYTHON)\n", label, me, tokens / me);
    }
    return 0;
}
