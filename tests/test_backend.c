/* tests/test_backend.c: choosing the backend, and what the CUDA work added that runs on the CPU.
 *  - without a driver, --device auto (the default) is the CPU, --device cuda fails with one line
 *    and a hint, MEDBOT_DEVICE overrides auto; torchrun's WORLD_SIZE > 1 runs CPU processes
 *    (a missing rank 0 is named) or, with --device cuda, needs the driver;
 *  - the CPU op table has every op;
 *  - --random_init: weights drawn from a seed (the same on every backend: counter-based), bf16
 *    normal(0, 0.02), NF4 with double-quant state; deterministic, and a DPO step runs on them.
 * On a machine with a GPU the driver tests print that they do not apply. */
#include "test.h"

#define FIX "tests/fixtures/dpo"

static int no_driver(void) {
    if (mb_cuda_device_count() == 0) return 1;
    printf("    this machine has a GPU: not applicable\n");
    return 0;
}

static void auto_is_the_cpu_without_a_driver(void) {
    if (!no_driver()) return;
    unsetenv("MEDBOT_DEVICE"); /* test.h pins the CPU; here auto decides */
    MbModel *m = NULL;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    CHECK(m && !strcmp(m->ops->name, "cpu"), "auto chose %s", m ? m->ops->name : "nothing");
    mb_model_free(m);
    m = NULL;
    o.device = MB_DEVICE_CUDA;
    MbStatus rc = mb_model_load(FIX "/model", &o, &m);
    printf("    --device cuda: %s\n", mb_last_error());
    CHECK(rc == MB_ERR_DEVICE && !m && strstr(mb_last_error(), "--> use --device cpu"), "want MB_ERR_DEVICE and a hint");
    setenv("MEDBOT_DEVICE", "cuda", 1); /* an explicit choice through the environment */
    o.device = MB_DEVICE_AUTO;
    rc = mb_model_load(FIX "/model", &o, &m);
    CHECK(rc == MB_ERR_DEVICE, "MEDBOT_DEVICE=cuda must not fall back");
    setenv("MEDBOT_DEVICE", "cpu", 1);
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    mb_model_free(m); /* MEDBOT_DEVICE=cpu again, as test.h set it */
}

static void cli_device_option(void) {
    static char out[1 << 14];
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s dpo --model %s/model --data %s/data.jsonl --output /tmp/medbot-backend-%ld --device tpu",
             t_medbot(), FIX, FIX, (long)getpid());
    int rc = t_run(cmd, out, sizeof out);
    printf("    --device tpu -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "--device must be one of cpu, cuda"), "want the choices listed");
    if (!no_driver()) return;
    snprintf(cmd, sizeof cmd, "%s dpo --model %s/model --data %s/data.jsonl --output /tmp/medbot-backend-%ld --device cuda",
             t_medbot(), FIX, FIX, (long)getpid());
    rc = t_run(cmd, out, sizeof out);
    printf("    --device cuda -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "no NVIDIA driver found") && strstr(out, "--device cpu"), "want a one-line refusal");
    /* torchrun's environment without a GPU: the ranks are CPU processes joined over TCP (tested
     * in test_dist.c); here rank 1 of 2 finds no rank 0 within --ddp_timeout and says so */
    snprintf(cmd, sizeof cmd, "WORLD_SIZE=2 RANK=1 LOCAL_RANK=1 MASTER_PORT=1 %s dpo --model %s/model --data %s/data.jsonl "
             "--output /tmp/medbot-backend-%ld --ddp_timeout 0.5", t_medbot(), FIX, FIX, (long)getpid());
    rc = t_run(cmd, out, sizeof out);
    printf("    WORLD_SIZE=2 without a GPU, no rank 0 -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "rank 1 could not reach rank 0 at 127.0.0.1:1 within 0.5 s"), "want the rank named");
    snprintf(cmd, sizeof cmd, "WORLD_SIZE=2 RANK=1 LOCAL_RANK=1 MASTER_PORT=1 %s dpo --model %s/model --data %s/data.jsonl "
             "--output /tmp/medbot-backend-%ld --device cuda", t_medbot(), FIX, FIX, (long)getpid());
    rc = t_run(cmd, out, sizeof out);
    printf("    WORLD_SIZE=2 --device cuda without a GPU -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "no NVIDIA driver found"), "want the refusal");
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/medbot-backend-%ld", (long)getpid());
    mb_rmdir_r(dir);
}

static void cpu_op_table_is_complete(void) {
    MbOps *ops = mb_cpu_ops_new(1);
    const char *first = (const char *)&ops->destroy, *end = (const char *)(ops + 1);
    int null = 0;
    for (const char *p = first; p + sizeof(void (*)(void)) <= end; p += sizeof(void (*)(void))) {
        void (*fn)(void);
        memcpy(&fn, p, sizeof fn);
        null += !fn;
    }
    CHECK(null == 0, "%d ops missing from the CPU op table", null);
    printf("    CPU op table: %zu functions, %d missing\n", (size_t)(end - first) / sizeof(void (*)(void)), null);
    /* the random draws: bytes spread over 0..255, normals with mean 0 and the asked std */
    size_t n = 1 << 18, hist[4] = {0};
    uint8_t *b = mb_malloc(n);
    uint16_t *h = mb_malloc(2 * n);
    ops->random_bytes(ops, b, n, 5);
    ops->random_normal(ops, h, n, 5, 0.02f);
    double s = 0, ss = 0;
    for (size_t i = 0; i < n; i++) {
        hist[b[i] >> 6]++;
        double v = bf16_to_f32(h[i]);
        s += v, ss += v * v;
    }
    double mean = s / (double)n, sd = sqrt(ss / (double)n - mean * mean);
    printf("    random_bytes quarters %zu %zu %zu %zu; random_normal mean %.2e std %.5f\n", hist[0], hist[1], hist[2], hist[3],
           mean, sd);
    for (int k = 0; k < 4; k++) CHECK(fabs((double)hist[k] / (double)n - 0.25) < 0.01, "bytes are not uniform");
    CHECK(fabs(mean) < 2e-4 && fabs(sd - 0.02) < 4e-4, "normal(0, 0.02) draws have mean %g std %g", mean, sd);
    free(b), free(h);
    ops->destroy(ops);
}

/* logits of a prefill on a model loaded with random_init */
static float *random_logits(uint64_t seed, int nf4, size_t *n) {
    MbModel *m = NULL;
    MbLoadOptions o = {.threads = 2, .device = MB_DEVICE_CPU, .random_init = 1, .seed = seed, .load_in_4bit = nf4,
                       .bnb_4bit_compute_dtype = "bfloat16"};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    if (!m) return NULL;
    CHECK(!m->st && m->rand_block, "random_init reads no checkpoint");
    CHECK(weight_nf4(&m->layers[1].w[MB_W_DOWN_PROJ]) ? nf4 : !nf4, "projections NF4 exactly with load_in_4bit");
    CHECK(!weight_nf4(&m->lm_head) && m->norm.dtype == MB_DT_F32, "lm_head dense, norms fp32");
    int32_t tok[12];
    for (int i = 0; i < 12; i++) tok[i] = (int32_t)(i * 31 % m->cfg.vocab_size);
    *n = 12 * (size_t)m->cfg.vocab_size;
    float *lg = mb_malloc(*n * 4);
    CHECK_OK(mb_model_forward(m, NULL, tok, 2, 6, NULL, lg, 0));
    mb_model_free(m);
    return lg;
}

static void random_init_is_seeded(void) {
    for (int nf4 = 0; nf4 <= 1; nf4++) {
        size_t n = 0;
        float *a = random_logits(7, nf4, &n), *b = random_logits(7, nf4, &n), *c = random_logits(8, nf4, &n);
        if (!a || !b || !c) return;
        int finite = 1;
        double sd = 0;
        for (size_t i = 0; i < n; i++) finite &= isfinite(a[i]) != 0, sd += (double)a[i] * a[i];
        sd = sqrt(sd / (double)n);
        printf("    %s: seed 7 twice %s, seed 8 %s, logits rms %.4f\n", nf4 ? "NF4 projections" : "bf16 weights",
               memcmp(a, b, n * 4) ? "differ" : "identical", memcmp(a, c, n * 4) ? "differs" : "the same", sd);
        CHECK(finite && !memcmp(a, b, n * 4) && memcmp(a, c, n * 4), "random_init must be a function of the seed");
        CHECK(sd > 1e-3 && sd < 10, "logits rms %g is not what normal(0, 0.02) weights give", sd);
        free(a), free(b), free(c);
    }
}

/* a DPO micro-batch with backward on random NF4 weights: the benchmark's path */
static void dpo_step_on_random_weights(void) {
    MbTrainJob job;
    memset(&job, 0, sizeof job);
    mb_train_config_defaults(&job.cfg);
    job.model_dir = FIX "/model", job.data_path = FIX "/data.jsonl", job.threads = 2;
    job.device = MB_DEVICE_CPU, job.random_init = 1, job.load_in_4bit = 1, job.bnb_4bit_compute_dtype = "bfloat16";
    job.cfg.max_length = 36, job.cfg.max_prompt_length = 24, job.cfg.max_completion_length = 20;
    job.cfg.gradient_checkpointing = 1, job.cfg.lora.r = 8;
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return;
    int idx[2] = {0, 1};
    double met[MET_COUNT];
    CHECK_OK(train_microbatch(&tr, &tr.train, idx, 2, 0, 1, 1.0, met));
    double ss = tr.m->ops->sumsq(tr.m->ops, tr.lo->grads, tr.lo->n_params);
    printf("    loss %.6f (log 2 = %.6f: B = 0 makes the policy the reference), |grad| %.3g\n", met[MET_LOSS], log(2.0),
           sqrt(ss));
    CHECK(fabs(met[MET_LOSS] - log(2.0)) < 1e-6 && ss > 0 && isfinite(ss), "loss %g |grad|^2 %g", met[MET_LOSS], ss);
    CHECK(trainer_fingerprint(&tr) != 0, "a fingerprint without checkpoint files");
    trainer_free(&tr);
}

MB_TEST_MAIN("backend", T(auto_is_the_cpu_without_a_driver), T(cli_device_option), T(cpu_op_table_is_complete),
             T(random_init_is_seeded), T(dpo_step_on_random_weights))
