/* tests/gpu/bench_gpu.c: the card's DPO step and decoding at Llama-3.1-8B shape on one GPU, with
 * random weights (--random_init: nothing is read but config.json). tests/gpu/check.sh runs it;
 * CI only builds it.
 *
 *   build/bench_gpu [MODEL_DIR] [--cpu] [--prompt 128] [--completion 128] [--decode 128]
 *       MODEL_DIR defaults to weights/llama-3.1-8b; --cpu runs the same code on the CPU backend
 *       (CI: a smoke test on the tiny fixture model).
 *
 * 1. the device's bf16 GEMM rate through cuBLASLt (8192^3, median of 10): the MFU denominator;
 * 2. a DPO step as the card runs it: NF4 base (compute bf16), LoRA r 64 alpha 8 on q_proj/k_proj,
 *    4 pairs of prompt 128 + completion 128 tokens, gradient checkpointing, the reference pass
 *    with the adapter disabled, policy forward and backward, and the optimizer step (fp64 sums,
 *    grad norm, clipping, AdamW); 2 warm-up steps, the median of 5;
 * 3. decoding: a prompt of 128 tokens, then 128 greedy steps through the KV cache (adapter on).
 * Model FLOPs of a step count what the card's step must do, without the recomputation of
 * gradient checkpointing: 3 passes (reference forward, policy forward, policy backward to the
 * activations; the frozen base needs no weight gradient) of 2 x tokens x the layers' linear
 * parameters, the lm_head on the completion rows and causal attention. Last: "RESULT" lines. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

/* a host clock after the device's queued work (the CPU backend is synchronous) */
static double now(MbOps *ops) {
    if (!ops->host_memory) cu_sync(ops->ctx);
    return mb_now();
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* bf16 GEMM rate of the device: C (n, n) = A B, median of 10 after 3 warm-ups */
static double gemm_tflops(MbOps *ops, size_t n) {
    MbCuda *g = ops->ctx;
    void *a = ops->alloc(ops, n * n * 2), *b = ops->alloc(ops, n * n * 2), *c = ops->alloc(ops, n * n * 2);
    double t[10];
    ops->random_normal(ops, a, n * n, 1, 1.0f), ops->random_normal(ops, b, n * n, 2, 1.0f); /* never zeros */
    for (int i = -3; i < 10; i++) {
        double t0 = now(ops);
        cu_gemm(g, MB_CUBLAS_OP_T, MB_CUBLAS_OP_N, n, n, n, 1.0f, dptr(a), n, dptr(b), n, 0.0f, dptr(c), MB_CUDA_R_16BF, n);
        double dt = now(ops) - t0;
        if (i >= 0) t[i] = dt;
    }
    ops->free(ops, a), ops->free(ops, b), ops->free(ops, c);
    return 2.0 * (double)n * n * n / median(t, 10) / 1e12;
}

int main(int argc, char **argv) {
    const char *dir = "weights/llama-3.1-8b";
    int P = 4, TP = 128, TC = 128, warm = 2, steps = 5, decode = 128, on_cpu = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cpu")) on_cpu = 1;
        else if (i + 1 < argc && !strcmp(argv[i], "--prompt")) TP = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--completion")) TC = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--decode")) decode = atoi(argv[++i]);
        else if (argv[i][0] != '-') dir = argv[i];
        else return fprintf(stderr, "bench_gpu: unknown option %s\n", argv[i]), 2;
    }
    if (TP < 1 || TC < 1 || decode < 1) return fprintf(stderr, "bench_gpu: lengths must be >= 1\n"), 2;
    MbLoadOptions opt = {.device = on_cpu ? MB_DEVICE_CPU : MB_DEVICE_CUDA, .random_init = 1, .seed = 1,
                         .load_in_4bit = 1, .bnb_4bit_compute_dtype = "bfloat16"};
    MbModel *m = NULL;
    if (mb_model_load(dir, &opt, &m)) {
        fprintf(stderr, "bench_gpu: %s\n", mb_last_error());
        return 1;
    }
    MbOps *ops = m->ops;
    MbCuda *g = on_cpu ? NULL : ops->ctx;
    const MbConfig *c = &m->cfg;
    printf("bench_gpu: %s on %s%s%s, %d layers, C=%d, F=%d, V=%d, NF4 base (random), LoRA r64 q/k\n", dir,
           g ? g->name : "the CPU", g ? " " : "", g ? g->arch : "", c->num_hidden_layers, c->hidden_size,
           c->intermediate_size, c->vocab_size);
    double peak = g ? gemm_tflops(ops, 8192) : 0;
    if (g) printf("  cuBLASLt bf16 GEMM 8192^3: %.1f TFLOP/s (the MFU denominator)\n", peak);

    /* the trainer as train_rank sets it up, one rank */
    MbTrainer tr;
    memset(&tr, 0, sizeof tr);
    mb_train_config_defaults(&tr.cfg);
    tr.cfg.gradient_checkpointing = 1, tr.cfg.learning_rate = 5e-6, tr.cfg.max_length = 512;
    tr.cfg.lora.r = 64, tr.cfg.lora.alpha = 8, tr.cfg.lora.targets = (1u << MB_W_Q_PROJ) | (1u << MB_W_K_PROJ);
    tr.m = m;
    m->gradient_checkpointing = 1;
    if (mb_lora_new(m, &tr.cfg.lora, 7, &tr.lo)) {
        fprintf(stderr, "bench_gpu: %s\n", mb_last_error());
        return 1;
    }
    mb_model_set_lora(m, tr.lo);
    if (mb_comm_threads_new(1, 0, &tr.comm)) {
        fprintf(stderr, "bench_gpu: %s\n", mb_last_error());
        return 1;
    }
    tr.n_pad = tr.shard = tr.lo->n_params;
    tr.acc = ops->alloc(ops, tr.n_pad * sizeof(double));
    tr.exp_avg = ops->alloc(ops, tr.n_pad * 4), tr.exp_avg_sq = ops->alloc(ops, tr.n_pad * 4);
    MbRng rng;
    mb_rng_seed(&rng, 3);
    for (int p = 0; p < P; p++) { /* random token ids: the speed does not depend on them */
        MbPair pair;
        memset(&pair, 0, sizeof pair);
        pair.np = TP, pair.nc = TC, pair.nr = TC;
        pair.prompt = mb_malloc(TP * 4), pair.chosen = mb_malloc(TC * 4), pair.rejected = mb_malloc(TC * 4);
        for (int t = 0; t < TP; t++) pair.prompt[t] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)c->vocab_size);
        for (int t = 0; t < TC; t++) pair.chosen[t] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)c->vocab_size);
        for (int t = 0; t < TC; t++) pair.rejected[t] = (int32_t)(mb_rng_u64(&rng) % (uint64_t)c->vocab_size);
        arrput(tr.train.pairs, pair);
    }
    int idx[64];
    for (int p = 0; p < P && p < 64; p++) idx[p] = p;
    double met[MET_COUNT], t[16];
    for (int s = -warm; s < steps; s++) {
        double t0 = now(ops);
        ops->fill_f64(ops, tr.acc, tr.n_pad);
        ops->fill(ops, tr.lo->grads, 0.0f, tr.n_pad);
        if (train_microbatch(&tr, &tr.train, idx, P, 0, 1, 1.0, met)) {
            fprintf(stderr, "bench_gpu: %s\n", mb_last_error());
            return 1;
        }
        ops->accumulate_f64(ops, tr.acc, tr.lo->grads, tr.n_pad);
        double norm;
        if (optimizer_step(&tr, tr.cfg.learning_rate, &norm)) {
            fprintf(stderr, "bench_gpu: %s\n", mb_last_error());
            return 1;
        }
        tr.step++;
        double dt = now(ops) - t0;
        if (s >= 0) t[s] = dt;
        printf("  step %d: %.3f s, loss %.5f, grad_norm %.4g\n", s + warm + 1, dt, met[MET_LOSS], norm);
    }
    double step_s = median(t, steps);
    /* model FLOPs of the step */
    double N = 2.0 * P * (TP + TC), M = 2.0 * P * TC, L = c->num_hidden_layers, C = c->hidden_size,
           F = c->intermediate_size, V = c->vocab_size, D = c->head_dim, H = c->num_attention_heads,
           KD = (double)c->num_key_value_heads * D, T = TP + TC;
    double lin = L * (C * H * D * 2 + C * KD * 2 + 3 * C * F);   /* q, o, k, v, gate, up, down */
    double attn = L * 2.0 * P * 2.0 * (T * T / 2) * H * D;        /* causal q k^T and p v per sequence */
    double flops = 3 * (2 * N * lin + 2 * attn) + 3 * 2 * M * V * C;
    double tok_s = N / step_s, achieved = flops / step_s / 1e12;
    double mfu = peak > 0 ? 100 * achieved / peak : 0;
    printf("  DPO step: %.3f s (median of %d), %.0f tokens/s, %.1f model TFLOP/s = %.1f%% MFU of the measured GEMM rate\n",
           step_s, steps, tok_s, achieved, mfu);

    /* decoding: prompt 128, then 128 greedy tokens through the KV cache, the adapter on */
    MbKVCache *kv = NULL;
    if (mb_kvcache_new(m, 1, TP + decode + 1, &kv)) return 1;
    size_t Vs = (size_t)c->vocab_size;
    float *logits = mb_malloc(Vs * 4);
    double t0 = now(ops);
    if (mb_model_forward(m, kv, tr.train.pairs[0].prompt, 1, TP, NULL, logits, 1)) return 1;
    double prefill = now(ops) - t0;
    t0 = now(ops);
    for (int s = 0; s < decode; s++) {
        int32_t best = 0;
        for (size_t v = 1; v < Vs; v++)
            if (logits[v] > logits[best]) best = (int32_t)v;
        if (mb_model_forward(m, kv, &best, 1, 1, NULL, logits, 1)) return 1;
    }
    double dec_s = now(ops) - t0;
    printf("  decode: prefill %d tokens %.3f s, %d tokens in %.3f s = %.1f tokens/s (batch 1, LoRA on)\n", TP, prefill,
           decode, dec_s, decode / dec_s);
    double peak_gib = g ? (double)g->device_used_peak / 1073741824.0 : 0, ours = g ? (double)g->bytes_peak / 1073741824.0 : 0;
    printf("RESULT gpu=%s\nRESULT gemm_tflops=%.1f\nRESULT step_s=%.4f\nRESULT tokens_s=%.1f\nRESULT mfu=%.2f\n"
           "RESULT decode_tokens_s=%.2f\nRESULT peak_gib=%.2f\nRESULT buffers_gib=%.2f\nRESULT loss=%.5f\n",
           g ? g->name : "cpu", peak, step_s, tok_s, mfu, decode / dec_s, peak_gib, ours, met[MET_LOSS]);
    free(logits);
    mb_kvcache_free(kv);
    ops->free(ops, tr.acc), ops->free(ops, tr.exp_avg), ops->free(ops, tr.exp_avg_sq);
    tr.exp_avg = NULL;
    tr.comm->destroy(tr.comm);
    mb_model_set_lora(m, NULL);
    mb_lora_free(tr.lo);
    dataset_free(&tr.train);
    mb_model_free(m); /* prints "peak GPU memory: ..." */
    return 0;
}
