/* tests/test_dist.c: the coordinator. Collectives of the in-process backend; data-parallel DPO
 * on CPU ranks equal to one rank with the same global batch (ZeRO-1 on and off, a parameter
 * count the world size does not divide, LoRA dropout); checkpoints of one world size resumed
 * on another; SHA-256 and HMAC; the job fingerprint; the launchers' variables; the TCP rendezvous
 * with real processes on loopback (strangers on its port, the shared secret, ranks of another
 * job); jobs launched by torchrun's, SLURM's and MPI's variables. */
#include "test.h"

#include <sys/wait.h>

#define FIX "tests/fixtures/dpo"

typedef struct {
    MbComm *c;
    size_t n;
    int ok;
} CollArg;

static void *coll_thread(void *p) {
    CollArg *a = p;
    MbComm *c = a->c;
    size_t n = a->n, per = n / (size_t)c->world;
    float *x = mb_malloc(n * sizeof(float) + 4), *sh = mb_malloc(per * sizeof(float) + 4);
    a->ok = 1;
    /* all_reduce: x[i] = rank + i/8 -> sum */
    for (size_t i = 0; i < n; i++) x[i] = (float)c->rank + (float)i / 8;
    c->all_reduce(c, x, n);
    for (size_t i = 0; i < n; i++) {
        float want = 0;
        for (int r = 0; r < c->world; r++) want += (float)r + (float)i / 8;
        if (x[i] != want) a->ok = 0;
    }
    /* reduce_scatter + all_gather on the largest multiple of world */
    size_t m = per * (size_t)c->world;
    for (size_t i = 0; i < m; i++) x[i] = (float)(c->rank + 1) * (float)i;
    c->reduce_scatter(c, sh, x, m);
    float tot = (float)c->world * (float)(c->world + 1) / 2;
    for (size_t i = 0; i < per; i++)
        if (sh[i] != tot * (float)((size_t)c->rank * per + i)) a->ok = 0;
    for (size_t i = 0; i < per; i++) sh[i] = (float)(c->rank * 1000) + (float)i;
    c->all_gather(c, x, sh, m);
    for (size_t i = 0; i < m; i++)
        if (x[i] != (float)((i / per) * 1000) + (float)(i % per)) a->ok = 0;
    for (size_t i = 0; i < n; i++) x[i] = c->rank == 1 % c->world ? (float)i : -1;
    c->broadcast(c, x, n, 1 % c->world);
    for (size_t i = 0; i < n; i++)
        if (x[i] != (float)i) a->ok = 0;
    c->barrier(c);
    free(x), free(sh);
    return NULL;
}

static void collectives_of_thread_ranks(void) {
    size_t sizes[] = {1, 7, 64, 1001};
    for (int world = 1; world <= 4; world++)
        for (size_t s = 0; s < 4; s++) {
            MbComm *comms[4];
            CHECK_OK(mb_comm_threads_new(world, 0, comms));
            CollArg args[4];
            pthread_t th[4];
            for (int r = 0; r < world; r++) {
                args[r] = (CollArg){comms[r], sizes[s] < (size_t)world ? (size_t)world : sizes[s], 0};
                pthread_create(&th[r], NULL, coll_thread, &args[r]);
            }
            int ok = 1;
            for (int r = 0; r < world; r++) pthread_join(th[r], NULL), ok &= args[r].ok;
            for (int r = 0; r < world; r++) comms[r]->destroy(comms[r]);
            CHECK(ok, "world %d, n %zu: a collective gave a wrong result", world, sizes[s]);
        }
    printf("    all_reduce, reduce_scatter, all_gather, broadcast exact for worlds 1-4 and n 1, 7, 64, 1001\n");
}

static void dp_job(MbTrainJob *job, const char *out, int nproc, int ga, int zero, int r) {
    memset(job, 0, sizeof *job);
    mb_train_config_defaults(&job->cfg);
    job->model_dir = FIX "/model", job->data_path = FIX "/data.jsonl", job->output_dir = out;
    job->threads = nproc, job->nproc = nproc, job->zero_stage = zero;
    MbTrainConfig *c = &job->cfg;
    c->max_prompt_length = 24, c->max_completion_length = 20, c->max_length = 36;
    c->per_device_train_batch_size = 1, c->gradient_accumulation_steps = ga;
    c->learning_rate = 3e-3, c->lr_scheduler_type = MB_SCHED_COSINE, c->warmup_ratio = 0.1, c->max_grad_norm = 0.5;
    c->num_train_epochs = 1, c->seed = 11, c->logging_steps = 1, c->save_steps = 0, c->shuffle = 1;
    c->lora.r = r, c->lora.alpha = 16, c->lora.dropout = 0.1;
    c->lora.targets = (1u << MB_W_Q_PROJ) | (1u << MB_W_K_PROJ);
}

static float *adapter_params(const char *dir, size_t *n) {
    MbModel *m;
    MbLoadOptions o = {.threads = 1};
    MbLora *lo = NULL;
    if (mb_model_load(FIX "/model", &o, &m)) return NULL;
    float *p = NULL;
    if (!mb_lora_load(m, dir, &lo)) {
        p = mb_malloc(lo->n_params * sizeof(float));
        memcpy(p, lo->params, lo->n_params * sizeof(float));
        *n = lo->n_params;
    }
    mb_lora_free(lo);
    mb_model_free(m);
    return p;
}

/* max over the metrics.jsonl numbers of |a - b| / max(|b|, scale floor) */
static double metrics_diff(const char *dir_a, const char *dir_b, int *lines) {
    char pa[300], pb[300], *ta = NULL, *tb = NULL;
    size_t na, nb;
    snprintf(pa, sizeof pa, "%s/metrics.jsonl", dir_a);
    snprintf(pb, sizeof pb, "%s/metrics.jsonl", dir_b);
    if (mb_read_file(pa, &ta, &na) || mb_read_file(pb, &tb, &nb)) {
        free(ta);
        return INFINITY;
    }
    double worst = 0;
    *lines = 0;
    char *sa, *sb, *la = strtok_r(ta, "\n", &sa), *lb = strtok_r(tb, "\n", &sb);
    for (; la && lb; la = strtok_r(NULL, "\n", &sa), lb = strtok_r(NULL, "\n", &sb), (*lines)++) {
        MbJsonDoc da, db;
        if (json_parse("a", la, strlen(la), &da)) return INFINITY;
        if (json_parse("b", lb, strlen(lb), &db)) return json_free(&da), INFINITY;
        const MbJson *lc = json_get(&db, json_root(&db), "logps/chosen");
        double beta_logps = lc ? 0.1 * fabs(lc->num) : 1; /* rewards: differences of summed log-probs */
        for (const MbJson *x = json_first(&db, json_root(&db)); x; x = json_next(&db, x)) {
            const MbJson *y = json_get(&da, json_root(&da), json_key(&db, x));
            if (!y) {
                worst = INFINITY;
                continue;
            }
            const char *k = json_key(&db, x);
            double scale = strstr(k, "rewards/") && !strstr(k, "accuracies") ? beta_logps : fmax(fabs(x->num), 1e-3);
            worst = fmax(worst, fabs(y->num - x->num) / scale);
        }
        json_free(&da), json_free(&db);
    }
    if (la || lb) worst = INFINITY;
    free(ta), free(tb);
    return worst;
}

static double params_diff(const float *a, const float *b, size_t n) {
    double e = 0, mx = 0;
    for (size_t i = 0; i < n; i++) e = fmax(e, fabs((double)a[i] - b[i])), mx = fmax(mx, fabs((double)b[i]));
    return e / fmax(mx, 1e-30);
}

/* runs (nproc x ga) for each config and compares with the first */
static void check_worlds(const int (*cfgs)[2], int ncfg, int r, const char *what) {
    char ref[256] = "";
    float *p0 = NULL;
    size_t n0 = 0;
    for (int zero = 0; zero <= 1; zero++)
        for (int i = 0; i < ncfg; i++) {
            char name[64];
            snprintf(name, sizeof name, "%s_%dx%d_z%d", what, cfgs[i][0], cfgs[i][1], zero);
            const char *out = t_tmp(name);
            MbTrainJob job;
            dp_job(&job, out, cfgs[i][0], cfgs[i][1], zero, r);
            fflush(stdout);
            int saved = dup(1), devnull = open("/dev/null", O_WRONLY); /* the runs' own progress output */
            dup2(devnull, 1);
            MbStatus rc = mb_train(&job);
            fflush(stdout);
            dup2(saved, 1), close(saved), close(devnull);
            CHECK(rc == MB_OK, "%s: %s", name, mb_last_error());
            size_t n;
            float *p = adapter_params(out, &n);
            if (!p0) {
                p0 = p, n0 = n;
                snprintf(ref, sizeof ref, "%s", out);
                printf("    %-26s %zu LoRA parameters (world sizes %s divide it: %s)\n", name, n,
                       cfgs[ncfg - 1][0] == 3 ? "3" : "2 and 4", n % (size_t)cfgs[ncfg - 1][0] ? "no" : "yes");
                continue;
            }
            int lines = 0;
            double dm = metrics_diff(out, ref, &lines), dp = p && n == n0 ? params_diff(p, p0, n) : INFINITY;
            printf("    %-26s vs %dx%d_z0: %d logged rows, max metric diff %.2e, adapter max rel diff %.2e\n", name,
                   cfgs[0][0], cfgs[0][1], lines, dm, dp);
            CHECK(dm <= 1e-6 && dp <= 1e-6, "%s differs from one rank (metrics %.2e, adapter %.2e)", name, dm, dp);
            free(p);
        }
    free(p0);
}

static void data_parallel_equals_one_rank(void) {
    /* 12 pairs, 1 per micro-batch: 3 optimizer steps of 4 micro-batches each */
    static const int cfgs[][2] = {{1, 4}, {2, 2}, {4, 1}};
    check_worlds(cfgs, 3, 8, "w4");
}

static void data_parallel_world_size_not_dividing_parameters(void) {
    /* 3 micro-batches a step: 4 steps; r = 8 gives 3584 parameters, 3584 % 3 = 2 (ZeRO pads) */
    static const int cfgs[][2] = {{1, 3}, {3, 1}};
    check_worlds(cfgs, 2, 8, "w3");
}

static void checkpoint_resumes_on_another_world_size(void) {
    /* 2 ranks with ZeRO save at step 1; 1 rank resumes; and the other way round */
    int pairs[][2] = {{2, 1}, {1, 2}};
    for (int k = 0; k < 2; k++) {
        int first = pairs[k][0], second = pairs[k][1];
        const char *full = t_tmp("resume_full"), *part = t_tmp("resume_part");
        MbTrainJob job;
        dp_job(&job, full, 1, 4, 0, 8);
        int saved = dup(1), devnull = open("/dev/null", O_WRONLY);
        fflush(stdout), dup2(devnull, 1);
        CHECK_OK(mb_train(&job));
        dp_job(&job, part, first, 4 / first, 1, 8);
        job.cfg.max_steps = 3, job.cfg.save_steps = 1;
        CHECK_OK(mb_train(&job));
        char ck[300];
        snprintf(ck, sizeof ck, "%s/checkpoint-1", part);
        dp_job(&job, part, second, 4 / second, 1, 8);
        job.resume = ck;
        MbStatus rc = mb_train(&job);
        fflush(stdout), dup2(saved, 1), close(saved), close(devnull);
        CHECK(rc == MB_OK, "resume: %s", mb_last_error());
        size_t n1, n2;
        float *a = adapter_params(full, &n1), *b = adapter_params(part, &n2);
        double d = a && b && n1 == n2 ? params_diff(b, a, n1) : INFINITY;
        printf("    saved by %d rank(s) (ZeRO-1) at step 1, resumed by %d: adapter max rel diff to one uninterrupted rank "
               "%.2e\n", first, second, d);
        CHECK(d <= 1e-6, "cross-world resume differs by %.2e", d);
        free(a), free(b);
    }
}

/* ---- SHA-256, HMAC, the job fingerprint, the launchers' variables ---- */

static int hex_is(const unsigned char *d, const char *hex) {
    char s[65];
    for (int i = 0; i < 32; i++) snprintf(s + 2 * i, 3, "%02x", d[i]);
    return !strcmp(s, hex);
}

static void sha256_and_hmac_match_published_vectors(void) {
    static const struct {
        const char *msg, *hex;
    } sha[] = { /* FIPS 180-4 examples (NIST CSRC) */
        {"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"},
        {"", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
        {"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
         "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"},
    };
    unsigned char d[32];
    for (int i = 0; i < 3; i++) {
        sha256(sha[i].msg, strlen(sha[i].msg), d);
        CHECK(hex_is(d, sha[i].hex), "SHA-256(\"%s\")", sha[i].msg);
    }
    /* a million 'a', fed in pieces of 1..63 bytes that straddle the blocks */
    char *a = mb_malloc(1000000);
    memset(a, 'a', 1000000);
    MbSha256 s;
    sha256_init(&s);
    for (size_t off = 0, k = 1; off < 1000000; off += k, k = k % 63 + 1)
        sha256_update(&s, a + off, MB_MIN(k, 1000000 - off));
    sha256_final(&s, d);
    free(a);
    CHECK(hex_is(d, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"), "SHA-256 of a million 'a'");
    /* RFC 4231 test cases 1, 2 and 6 (a key longer than a block) */
    unsigned char k1[20], k6[131];
    memset(k1, 0x0b, sizeof k1), memset(k6, 0xaa, sizeof k6);
    static const char *const m6 = "Test Using Larger Than Block-Size Key - Hash Key First";
    const struct {
        const void *key;
        size_t nk;
        const char *msg, *hex;
    } hm[] = {
        {k1, 20, "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
        {"Jefe", 4, "what do ya want for nothing?", "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
        {k6, 131, m6, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
    };
    for (int i = 0; i < 3; i++) {
        MbHmac h;
        hmac_init(&h, hm[i].key, hm[i].nk);
        hmac_update(&h, hm[i].msg, strlen(hm[i].msg));
        hmac_final(&h, d);
        CHECK(hex_is(d, hm[i].hex), "HMAC-SHA256 RFC 4231 case %d", i == 2 ? 6 : i + 1);
    }
    unsigned char n1[32], n2[32];
    mb_random_bytes(n1, 32), mb_random_bytes(n2, 32);
    CHECK(memcmp(n1, n2, 32) != 0, "two nonces are equal");
    printf("    SHA-256: 4 NIST vectors (one fed in odd pieces); HMAC-SHA256: RFC 4231 cases 1, 2, 6; nonces differ\n");
}

static void copy_file(const char *from, const char *to) {
    char *text = NULL;
    size_t n = 0;
    CHECK_OK(mb_read_file(from, &text, &n));
    CHECK_OK(mb_write_file(to, text, n));
    free(text);
}

/* which parts of two fingerprints differ, as "model tokenizer data options" */
static const char *fp_diff(const MbJobFingerprint *a, const MbJobFingerprint *b) {
    static char s[64];
    s[0] = 0;
    if (memcmp(a->model, b->model, 32)) strcat(s, "model ");
    if (memcmp(a->tokenizer, b->tokenizer, 32)) strcat(s, "tokenizer ");
    if (memcmp(a->data, b->data, 32)) strcat(s, "data ");
    if (memcmp(a->options, b->options, 32)) strcat(s, "options ");
    return s[0] ? s : "nothing ";
}

static void job_fingerprint_reads_bytes_not_paths(void) {
    MbTrainJob job, copy;
    MbJobFingerprint a, b;
    dp_job(&job, "unused", 1, 1, 0, 8);
    CHECK_OK(mb_job_fingerprint(&job, &a));
    /* a copy of the model folder and the data elsewhere, written now: the same fingerprint */
    const char *dir = t_tmp("fp_model");
    mkdir(dir, 0755);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
    char from[300], to[300], data[300];
    for (int i = 0; i < 4; i++) {
        snprintf(from, sizeof from, FIX "/model/%s", files[i]), snprintf(to, sizeof to, "%s/%s", dir, files[i]);
        copy_file(from, to);
    }
    snprintf(data, sizeof data, "%s/pairs.jsonl", dir);
    copy_file(FIX "/data.jsonl", data);
    copy = job, copy.model_dir = dir, copy.data_path = data;
    CHECK_OK(mb_job_fingerprint(&copy, &b));
    printf("    copies in %s: %sdiffers\n", dir, fp_diff(&a, &b));
    CHECK(!strcmp(fp_diff(&a, &b), "nothing "), "a copy must have the same fingerprint");
    /* one option, the tokenizer's config, the last byte of the weights: one part each */
    copy.cfg.beta = 0.2;
    CHECK_OK(mb_job_fingerprint(&copy, &b));
    char why[512];
    rdv_compare(&a, &b, 1, why, sizeof why);
    printf("    --beta 0.2: %sdiffers: %s\n", fp_diff(&a, &b), why);
    CHECK(!strcmp(fp_diff(&a, &b), "options ") &&
          strstr(why, "options differ from rank 0's: beta=0.2 on rank 1, beta=0.1 on rank 0"), "%s", why);
    copy.cfg.beta = job.cfg.beta;
    snprintf(to, sizeof to, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(to, "a");
    if (f) fputs(" ", f), fclose(f);
    CHECK_OK(mb_job_fingerprint(&copy, &b));
    printf("    tokenizer_config.json + 1 byte: %sdiffers\n", fp_diff(&a, &b));
    CHECK(!strcmp(fp_diff(&a, &b), "tokenizer "), "tokenizer_config.json is part of the tokenizer");
    copy_file(FIX "/model/tokenizer_config.json", to);
    snprintf(to, sizeof to, "%s/model.safetensors", dir);
    f = fopen(to, "r+b");
    if (f) {
        fseek(f, -1, SEEK_END);
        int last = fgetc(f);
        fseek(f, -1, SEEK_END), fputc(last ^ 0xff, f), fclose(f);
    }
    CHECK_OK(mb_job_fingerprint(&copy, &b));
    printf("    last byte of model.safetensors changed: %sdiffers\n", fp_diff(&a, &b));
    CHECK(!strcmp(fp_diff(&a, &b), "model "), "the weights' last block is sampled");
    /* random_init: config and seed; a data file that is missing: its part stays zero, and the error */
    MbJobFingerprint r;
    copy = job, copy.random_init = 1;
    CHECK_OK(mb_job_fingerprint(&copy, &r));
    copy.cfg.seed++;
    CHECK_OK(mb_job_fingerprint(&copy, &b));
    CHECK(!strcmp(fp_diff(&r, &b), "model options "), "random_init: the seed makes the weights (%s)", fp_diff(&r, &b));
    copy = job, copy.data_path = "/nonexistent/pairs.jsonl";
    MbStatus rc = mb_job_fingerprint(&copy, &b);
    static const unsigned char zero[32];
    rdv_compare(&a, &b, 1, why, sizeof why);
    printf("    missing data -> %s\n        rank 0 sees: %s\n", mb_last_error(), why);
    CHECK(rc != MB_OK && strstr(mb_last_error(), "/nonexistent/pairs.jsonl") && !memcmp(b.data, zero, 32), "missing data");
}

/* sets exactly the launcher variables of `env` ("NAME=value ..."), then reads them */
static MbStatus launch_with(const char *env, MbLaunchEnv *e) {
    static const char *const vars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                       "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID",
                                       "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID",
                                       "MASTER_ADDR", "MASTER_PORT"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) unsetenv(vars[i]);
    char buf[512], *save = NULL;
    snprintf(buf, sizeof buf, "%s", env);
    for (char *kv = strtok_r(buf, " ", &save); kv; kv = strtok_r(NULL, " ", &save)) {
        char *eq = strchr(kv, '=');
        if (eq) *eq = 0, setenv(kv, eq + 1, 1);
    }
    return mb_launch_env(e);
}

static void launcher_variables_of_torchrun_slurm_openmpi_and_pmi(void) {
    static const struct {
        const char *env;
        int rank, world, local;
        const char *source;
    } ok[] = {
        {"", 0, 0, 0, ""},
        {"WORLD_SIZE=4 RANK=3 LOCAL_RANK=1", 3, 4, 1, "RANK/WORLD_SIZE"},
        {"SLURM_PROCID=2 SLURM_STEP_NUM_TASKS=3 SLURM_LOCALID=0", 2, 3, 0, "SLURM_PROCID/SLURM_STEP_NUM_TASKS"},
        /* an sbatch script run without srun: the allocation's variables, one process */
        {"SLURM_PROCID=0 SLURM_NTASKS=4 SLURM_LOCALID=0", 0, 0, 0, ""},
        /* an srun step inside an sbatch allocation of 8 tasks */
        {"SLURM_PROCID=1 SLURM_NTASKS=8 SLURM_STEP_NUM_TASKS=2 SLURM_LOCALID=1", 1, 2, 1, "SLURM_PROCID/SLURM_STEP_NUM_TASKS"},
        /* salloc's shell: SLURM_NTASKS without a task of its own */
        {"SLURM_NTASKS=4", 0, 0, 0, ""},
        /* mpirun inside an sbatch allocation: Open MPI's variables win over the allocation's */
        {"SLURM_PROCID=0 SLURM_NTASKS=8 OMPI_COMM_WORLD_RANK=5 OMPI_COMM_WORLD_SIZE=6 OMPI_COMM_WORLD_LOCAL_RANK=1", 5, 6, 1,
         "OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE"},
        {"PMI_RANK=3 PMI_SIZE=4 MPI_LOCALRANKID=0", 3, 4, 0, "PMI_RANK/PMI_SIZE"},
        {"PMI_RANK=3 PMI_SIZE=4", 3, 4, 3, "PMI_RANK/PMI_SIZE (no MPI_LOCALRANKID: local rank = rank)"},
        /* torchrun inside srun */
        {"WORLD_SIZE=2 RANK=1 SLURM_PROCID=0 SLURM_NTASKS=1", 1, 2, 1, "RANK/WORLD_SIZE (no LOCAL_RANK: local rank = rank)"},
    };
    MbLaunchEnv e;
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        MbStatus rc = launch_with(ok[i].env, &e);
        printf("    %-70s -> rank %d of %d, local %d, from %s\n", ok[i].env[0] ? ok[i].env : "(none)", e.rank, e.world,
               e.local_rank, e.source[0] ? e.source : "(no launcher)");
        CHECK(rc == MB_OK && e.rank == ok[i].rank && e.world == ok[i].world && e.local_rank == ok[i].local &&
              !strcmp(e.source, ok[i].source) && e.port == 29500 && !strcmp(e.addr, "127.0.0.1"), "%s", mb_last_error());
    }
    static const struct {
        const char *env, *needle;
    } bad[] = {
        {"SLURM_STEP_NUM_TASKS=2", "SLURM_STEP_NUM_TASKS=2 is set but SLURM_PROCID is not"},
        {"SLURM_PROCID=x1 SLURM_STEP_NUM_TASKS=2", "SLURM_PROCID='x1' is not a non-negative integer"},
        {"SLURM_PROCID=3 SLURM_STEP_NUM_TASKS=3", "SLURM_PROCID=3 is outside 0..SLURM_STEP_NUM_TASKS-1 (SLURM_STEP_NUM_TASKS=3)"},
        {"OMPI_COMM_WORLD_RANK=0", "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"},
        {"OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=-2", "OMPI_COMM_WORLD_SIZE='-2' is not a non-negative integer"},
        {"PMI_RANK=0 PMI_SIZE=0", "PMI_SIZE=0: a job has at least one rank"},
        {"PMI_RANK=1 PMI_SIZE=2 MPI_LOCALRANKID=one", "MPI_LOCALRANKID='one' is not a non-negative integer"},
        {"WORLD_SIZE=2", "WORLD_SIZE=2 is set but RANK is not"},
        {"WORLD_SIZE=2 RANK=0 MASTER_PORT=70000", "MASTER_PORT=70000 is not a port"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        MbStatus rc = launch_with(bad[i].env, &e);
        printf("    %-48s -> %s\n", bad[i].env, rc ? mb_last_error() : "accepted");
        CHECK(rc != MB_OK && strstr(mb_last_error(), bad[i].needle), "want '%s'", bad[i].needle);
    }
    launch_with("", &e);
}

/* ---- the TCP rendezvous, with real processes ---- */

static int rdv_port(int k) { return 20000 + (int)(getpid() % 20000) + k; }

/* One process of a rendezvous test: its rank, the WORLD_SIZE it claims, its MEDBOT_RDV_SECRET
 * (NULL: unset) and its job fingerprint (NULL: none). */
typedef struct {
    int rank, world;
    const char *secret;
    const MbJobFingerprint *fp;
} RdvRank;

typedef struct {
    pid_t pid;
    int pipe; /* its message */
} RdvProc;

/* forks one rank; it runs mb_rendezvous and exits 0 (blob right), 1 (error: message on the pipe)
 * or 2 (wrong blob) */
static RdvProc rdv_start(const RdvRank *who, int port, double timeout) {
    int fds[2];
    RdvProc p = {-1, -1};
    if (pipe(fds) != 0) {
        T_FAIL("pipe");
        return p;
    }
    fflush(stdout);
    p.pid = fork();
    if (p.pid == 0) {
        if (who->secret) setenv("MEDBOT_RDV_SECRET", who->secret, 1);
        else unsetenv("MEDBOT_RDV_SECRET");
        char blob[64], want[64];
        memset(blob, 0, sizeof blob), memset(want, 0, sizeof want);
        snprintf(want, sizeof want, "nccl-unique-id-%d", port);
        if (who->rank == 0) memcpy(blob, want, sizeof blob);
        MbStatus rc = mb_rendezvous("127.0.0.1", port, who->rank, who->world, who->fp, blob, sizeof blob, timeout);
        const char *m = rc ? mb_last_error() : "";
        if (write(fds[1], m, strlen(m)) < 0) _exit(3);
        _exit(rc ? 1 : memcmp(blob, want, sizeof want) ? 2 : 0);
    }
    close(fds[1]);
    p.pipe = fds[0];
    return p;
}

/* waits for a rank: its exit code (-1: killed), its message into msg (1024 bytes) */
static int rdv_finish(RdvProc p, char *msg) {
    int st = 0;
    msg[0] = 0;
    if (p.pid < 0) return -1;
    waitpid(p.pid, &st, 0);
    ssize_t k = read(p.pipe, msg, 1023);
    msg[k > 0 ? k : 0] = 0;
    close(p.pipe);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* every rank at once; codes[i] and msgs[i] of ranks[i] */
static void rdv_run(const RdvRank *ranks, int n, int port, double timeout, int *codes, char msgs[][1024]) {
    RdvProc p[8];
    for (int i = 0; i < n; i++) p[i] = rdv_start(&ranks[i], port, timeout);
    for (int i = 0; i < n; i++) codes[i] = rdv_finish(p[i], msgs[i]);
}

static void rendezvous_success_missing_rank_and_wrong_world(void) {
    int codes[8];
    char msgs[8][1024];
    /* success: rank 0 and two others receive rank 0's blob */
    RdvRank r3[] = {{0, 3, NULL, NULL}, {1, 3, NULL, NULL}, {2, 3, NULL, NULL}};
    rdv_run(r3, 3, rdv_port(0), 10, codes, msgs);
    CHECK(codes[0] == 0 && codes[1] == 0 && codes[2] == 0, "3 ranks: exit %d %d %d (%s | %s | %s)", codes[0], codes[1],
          codes[2], msgs[0], msgs[1], msgs[2]);
    printf("    3 ranks on 127.0.0.1:%d: every rank got rank 0's blob\n", rdv_port(0));
    /* a missing rank: rank 0 times out naming it, the others are told */
    RdvRank r3b[] = {{0, 3, NULL, NULL}, {2, 3, NULL, NULL}};
    rdv_run(r3b, 2, rdv_port(1), 1.5, codes, msgs);
    printf("    rank 1 missing -> rank 0: %s\n                      rank 2: %s\n", msgs[0], msgs[1]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 of 3 never arrived within"), "missing rank named: %s", msgs[0]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "refused rank 2") && strstr(msgs[1], "rank 1 of 3 never arrived"),
          "the waiting rank is told: %s", msgs[1]);
    /* a world size that does not match */
    RdvRank rm[] = {{0, 2, NULL, NULL}, {1, 3, NULL, NULL}};
    rdv_run(rm, 2, rdv_port(2), 5, codes, msgs);
    printf("    WORLD_SIZE 2 vs 3 -> rank 0: %s\n                         rank 1: %s\n", msgs[0], msgs[1]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 says WORLD_SIZE=3, rank 0 has WORLD_SIZE=2"), "%s", msgs[0]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "WORLD_SIZE=3"), "%s", msgs[1]);
    /* nobody at MASTER_ADDR:MASTER_PORT */
    RdvRank rn[] = {{1, 2, NULL, NULL}};
    rdv_run(rn, 1, rdv_port(3), 0.5, codes, msgs);
    printf("    no rank 0 -> %s\n", msgs[0]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "could not reach rank 0 at 127.0.0.1"), "%s", msgs[0]);
}

static void rendezvous_port_in_use_and_listens_only_on_master_addr(void) {
    int port = rdv_port(4);
    pid_t pid = fork();
    if (pid == 0) { /* rank 0 waiting for a rank that never comes */
        char blob[8] = "x";
        mb_rendezvous("127.0.0.1", port, 0, 2, NULL, blob, sizeof blob, 3);
        _exit(0);
    }
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    /* /proc/net/tcp: the listening socket's local address must be 127.0.0.1, not 0.0.0.0 */
    FILE *f = fopen("/proc/net/tcp", "r");
    char line[512], want[32], any[32];
    snprintf(want, sizeof want, "0100007F:%04X", port);
    snprintf(any, sizeof any, "00000000:%04X", port);
    int loop = 0, wild = 0;
    while (f && fgets(line, sizeof line, f)) loop |= strstr(line, want) != NULL, wild |= strstr(line, any) != NULL;
    if (f) fclose(f);
    printf("    rank 0 listens on 127.0.0.1:%d: %s; on 0.0.0.0: %s\n", port, loop ? "yes" : "no", wild ? "yes" : "no");
    CHECK(f && loop && !wild, "listens only on MASTER_ADDR");
    /* a second job on the same port */
    char blob[8] = "y";
    MbStatus rc = mb_rendezvous("127.0.0.1", port, 0, 2, NULL, blob, sizeof blob, 1);
    printf("    port in use -> %s\n", mb_last_error());
    CHECK(rc != MB_OK && strstr(mb_last_error(), "cannot listen on 127.0.0.1") && strstr(mb_last_error(), "pick a free one"),
          "%s", mb_last_error());
    int st;
    waitpid(pid, &st, 0);
}

/* ---- the rendezvous under strangers: idle and garbage connections, the shared secret ---- */

static int send_all(int fd, const void *p, size_t n) { return sock_io(fd, (void *)p, n, mb_now() + 5, 1) == 1; }

/* a connection to 127.0.0.1:port once something listens there (-1 if nothing does within 10 s) */
static int connect_loopback(int port) {
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET, a.sin_port = htons((uint16_t)port), a.sin_addr.s_addr = htonl(0x7f000001);
    for (int tries = 0; tries < 200; tries++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
        if (fd >= 0) close(fd);
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    return -1;
}

static void rendezvous_completes_while_idle_and_garbage_connections_are_open(void) {
    int port = rdv_port(9), codes[3];
    char msgs[3][1024];
    /* rank 0's deadline (8 s) is shorter than a connection's own (10 s): rank 0 never drops the
     * idle connection before it gives up, so the ranks can only join if it serves them beside it */
    RdvRank ranks[] = {{0, 3, NULL, NULL}, {1, 3, NULL, NULL}, {2, 3, NULL, NULL}};
    RdvProc p[3];
    p[0] = rdv_start(&ranks[0], port, 8);
    int idle = connect_loopback(port), junk = connect_loopback(port), old = connect_loopback(port);
    CHECK(idle >= 0 && junk >= 0 && old >= 0, "cannot connect to rank 0");
    const char http[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    unsigned char hello_r1[24]; /* the first protocol's hello, claiming rank 1 */
    rdv_put_u64(hello_r1, 0x6d6564626f745231ull), rdv_put_u64(hello_r1 + 8, 1), rdv_put_u64(hello_r1 + 16, 3);
    CHECK(send_all(junk, http, sizeof http - 1) && send_all(old, hello_r1, sizeof hello_r1), "send");
    p[1] = rdv_start(&ranks[1], port, 8), p[2] = rdv_start(&ranks[2], port, 8);
    for (int r = 0; r < 3; r++) codes[r] = rdv_finish(p[r], msgs[r]);
    printf("    an idle connection, an HTTP request and an old-protocol hello claiming rank 1 open at rank 0: "
           "exit %d %d %d %s%s%s\n", codes[0], codes[1], codes[2], msgs[0], msgs[1], msgs[2]);
    CHECK(codes[0] == 0 && codes[1] == 0 && codes[2] == 0, "the real ranks join while the idle connection is open");
    /* what the strangers got: the challenge, then the connection closed (the idle one at the end) */
    unsigned char buf[256];
    ssize_t got = recv(junk, buf, sizeof buf, 0), more = got > 0 ? recv(junk, buf, sizeof buf, 0) : -1;
    printf("    the HTTP client read %zd bytes (the challenge), then %zd (closed)\n", got, more);
    CHECK(got == MB_RDV_CHALLENGE && more == 0, "garbage gets the challenge and a closed connection");
    close(idle), close(junk), close(old);
}

static void rendezvous_secret_is_proven_by_both_sides(void) {
    int codes[4];
    char msgs[4][1024];
    const char *s = "correct horse battery staple", *wrong = "correct horse battery stable";
    /* every rank with the secret */
    RdvRank ok[] = {{0, 3, s, NULL}, {1, 3, s, NULL}, {2, 3, s, NULL}};
    rdv_run(ok, 3, rdv_port(10), 10, codes, msgs);
    printf("    MEDBOT_RDV_SECRET on all 3 ranks: exit %d %d %d\n", codes[0], codes[1], codes[2]);
    CHECK(codes[0] == 0 && codes[1] == 0 && codes[2] == 0, "%s | %s | %s", msgs[0], msgs[1], msgs[2]);
    /* an impostor without the secret claims rank 1 first: turned away, then the job runs */
    RdvRank imp[] = {{0, 3, s, NULL}, {1, 3, NULL, NULL}, {1, 3, s, NULL}, {2, 3, s, NULL}};
    RdvProc p[4];
    p[0] = rdv_start(&imp[0], rdv_port(11), 10), p[1] = rdv_start(&imp[1], rdv_port(11), 10);
    codes[1] = rdv_finish(p[1], msgs[1]);
    p[2] = rdv_start(&imp[2], rdv_port(11), 10), p[3] = rdv_start(&imp[3], rdv_port(11), 10);
    for (int i = 0; i < 4; i++)
        if (i != 1) codes[i] = rdv_finish(p[i], msgs[i]);
    printf("    + an impostor claiming rank 1 without the secret: ranks exit %d %d %d, impostor %d: %s\n", codes[0], codes[2],
           codes[3], codes[1], msgs[1]);
    CHECK(codes[0] == 0 && codes[2] == 0 && codes[3] == 0, "the job runs: %s | %s | %s", msgs[0], msgs[2], msgs[3]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "refused rank 1: rank 1 did not prove MEDBOT_RDV_SECRET"), "%s", msgs[1]);
    /* a wrong secret, and none, on rank 1: it is told at once; rank 0 waits on for the real rank 1 */
    const char *theirs[] = {wrong, NULL};
    for (int k = 0; k < 2; k++) {
        RdvRank bad[] = {{0, 2, s, NULL}, {1, 2, theirs[k], NULL}};
        rdv_run(bad, 2, rdv_port(12 + k), 1.5, codes, msgs);
        printf("    rank 1 %s -> rank 1: %s\n        rank 0: %s\n", k ? "without a secret" : "with another secret", msgs[1],
               msgs[0]);
        CHECK(codes[1] == 1 && strstr(msgs[1], "rank 1 did not prove MEDBOT_RDV_SECRET") &&
              strstr(msgs[1], "differs or is unset on one side"), "%s", msgs[1]);
        CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 of 2 never arrived") &&
              strstr(msgs[0], "did not prove MEDBOT_RDV_SECRET"), "%s", msgs[0]);
    }
    /* the secret on rank 1 only: both stop at once, naming the variable */
    RdvRank one[] = {{0, 2, NULL, NULL}, {1, 2, s, NULL}};
    rdv_run(one, 2, rdv_port(14), 10, codes, msgs);
    printf("    secret on rank 1 only -> rank 0: %s\n        rank 1: %s\n", msgs[0], msgs[1]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 has MEDBOT_RDV_SECRET set and rank 0 has not"), "%s", msgs[0]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "refused rank 1") && strstr(msgs[1], "MEDBOT_RDV_SECRET"), "%s", msgs[1]);
}

/* A fake rank 0 that speaks the protocol without the secret and says "joined": a rank with the
 * secret must not believe it. */
static void rendezvous_joiner_checks_rank_0s_proof(void) {
    int port = rdv_port(15), lfd = -1, loopback;
    CHECK_OK(rdv_listen("127.0.0.1", port, &lfd, &loopback));
    RdvRank joiner = {1, 2, "s3cret", NULL};
    RdvProc p = rdv_start(&joiner, port, 5);
    struct pollfd pf = {lfd, POLLIN, 0};
    int c = poll(&pf, 1, 10000) == 1 ? accept(lfd, NULL, NULL) : -1;
    unsigned char ch[MB_RDV_CHALLENGE] = {0}, hello[MB_RDV_HELLO + MB_RDV_MAX_TEXT + 32], ans[16 + 64 + 32] = {0};
    rdv_put_u64(ch, MB_RDV_MAGIC), rdv_put_u64(ch + 8, 1); /* "I have the secret" */
    int ok = c >= 0 && send_all(c, ch, sizeof ch) && sock_io(c, hello, MB_RDV_HELLO, mb_now() + 5, 0) == 1;
    size_t rest = ok ? (size_t)rdv_get_u64(hello + 192) + 32 : 0;
    ok = ok && sock_io(c, hello + MB_RDV_HELLO, rest, mb_now() + 5, 0) == 1;
    rdv_put_u64(ans, 0), rdv_put_u64(ans + 8, 64); /* status 0, a blob, a MAC of zeros */
    ok = ok && send_all(c, ans, sizeof ans);
    char msg[1024];
    int code = rdv_finish(p, msg);
    printf("    a rank 0 that cannot prove the secret says \"joined\" -> exit %d: %s\n", code, msg);
    CHECK(ok, "the fake rank 0's exchange");
    CHECK(code == 1 && strstr(msg, "rank 0 at 127.0.0.1") && strstr(msg, "did not prove MEDBOT_RDV_SECRET"), "%s", msg);
    if (c >= 0) close(c);
    close(lfd);
}

/* ---- CPU ranks in separate processes (TCP), and ranks that die or hang ---- */

/* the medbot command line of one rank, started with the launcher's environment env (NULL: the
 * job's 3 ranks as --nproc 3 threads of this process) */
static void rank_cmd_env(char *cmd, size_t cap, const char *env, const char *out, const char *extra) {
    int n = snprintf(cmd, cap,
                     "%s %s dpo --model " FIX "/model --data " FIX "/data.jsonl --output %s --lora " FIX "/adapter_qk "
                     "--max_length 36 --max_prompt_length 24 --max_completion_length 20 --per_device_train_batch_size 1 "
                     "--learning_rate 1e-3 --lr_scheduler_type cosine --warmup_ratio 0.1 --lora_dropout 0.1 --seed 3 "
                     "--threads 1 --logging_steps 10 %s %s",
                     env ? env : "", t_medbot(), out, extra, env ? "" : "--nproc 3");
    if (n < 0 || (size_t)n >= cap) T_FAIL("a command line longer than %zu bytes", cap);
}

/* the same for RANK=rank of WORLD_SIZE=3 (rank < 0: --nproc 3 threads) */
static void rank_cmd(char *cmd, size_t cap, int rank, int port, const char *out, const char *extra) {
    char env[128];
    snprintf(env, sizeof env, "WORLD_SIZE=3 RANK=%d MASTER_PORT=%d", rank, port);
    rank_cmd_env(cmd, cap, rank >= 0 ? env : NULL, out, extra);
}

/* A shell script that starts the n commands (ranks 0 .. n-1) in the background as p0, p1, ...
 * (their output in OUT.rankR.log); `then` runs after that (and may wait for rank R itself, leaving
 * its status in sR); every rank's exit status is printed as "rankR=S".
 * A watchdog kills the lot after 120 s, so that a hang fails the test instead of the run. */
static void ranks_script(char *sh, size_t cap, char (*cmd)[1200], int n, const char *out, const char *then) {
    size_t k = 0;
    char all[32] = "", list[32] = "";
    for (int r = 0; r < n; r++) {
        k += (size_t)snprintf(sh + k, cap - k, "%s > %s.rank%d.log 2>&1 & p%d=$!; ", cmd[r], out, r, r);
        snprintf(all + strlen(all), sizeof all - strlen(all), " $p%d", r);
        snprintf(list + strlen(list), sizeof list - strlen(list), " %d", r);
    }
    snprintf(sh + k, cap - k,
             "( sleep 120 & s=$!; trap 'kill $s; exit 0' TERM; wait $s; kill -9%s ) >/dev/null 2>&1 & dog=$!; t0=$(date +%%s.%%N); %s "
             "for r in%s; do eval \"s=\\${s$r:-}\"; if [ -z \"$s\" ]; then eval \"wait \\$p$r\"; s=$?; fi; echo rank$r=$s; done; "
             "echo seconds=$(echo \"$(date +%%s.%%N) - $t0\" | bc); kill $dog 2>/dev/null; wait $dog 2>/dev/null; true",
             all, then, list);
}

/* ranks 0, 1, 2 of WORLD_SIZE=3 (see ranks_script) */
static void three_ranks(char *sh, size_t cap, int port, const char *out, const char *extra, const char *then) {
    char cmd[3][1200];
    for (int r = 0; r < 3; r++) rank_cmd(cmd[r], sizeof cmd[r], r, port, out, extra);
    ranks_script(sh, cap, cmd, 3, out, then);
}

static void read_log(const char *out, int rank, char *buf, size_t cap) {
    char path[300], *text = NULL;
    size_t n = 0;
    snprintf(path, sizeof path, "%s.rank%d.log", out, rank);
    buf[0] = 0;
    if (mb_read_file(path, &text, &n)) return;
    /* the last line */
    while (n && text[n - 1] == '\n') text[--n] = 0;
    char *last = strrchr(text, '\n');
    snprintf(buf, cap, "%s", last ? last + 1 : text);
    free(text);
}

static int same_file(const char *dir_a, const char *dir_b, const char *name) {
    char a[300], b[300];
    snprintf(a, sizeof a, "%s/%s", dir_a, name);
    snprintf(b, sizeof b, "%s/%s", dir_b, name);
    return t_files_equal(a, b);
}

static double field(const char *text, const char *key) {
    const char *p = strstr(text, key);
    return p ? atof(p + strlen(key)) : -1;
}

static void processes_over_tcp_equal_thread_ranks(void) {
    static char out[1 << 16];
    char sh[6000], cmd[1200];
    const char *threads = t_tmp("threads3"), *procs = t_tmp("procs3");
    const char *extra = "--max_steps 12 --save_steps 6";
    rank_cmd(cmd, sizeof cmd, -1, 0, threads, extra);
    CHECK(t_run(cmd, out, sizeof out) == 0, "--nproc 3: %s", out);
    char cmds[3][1200], env[200]; /* the three with a shared secret: they prove it at the rendezvous */
    for (int r = 0; r < 3; r++) {
        snprintf(env, sizeof env, "MEDBOT_RDV_SECRET=medbot-test-%d WORLD_SIZE=3 RANK=%d MASTER_PORT=%d", rdv_port(5), r,
                 rdv_port(5));
        rank_cmd_env(cmds[r], sizeof cmds[r], env, procs, extra);
    }
    ranks_script(sh, sizeof sh, cmds, 3, procs, "");
    t_run(sh, out, sizeof out);
    char log0[512];
    read_log(procs, 0, log0, sizeof log0);
    printf("    3 processes (WORLD_SIZE=3, TCP, MEDBOT_RDV_SECRET set): %s", out);
    CHECK(strstr(out, "rank0=0") && strstr(out, "rank1=0") && strstr(out, "rank2=0"), "%s / %s", out, log0);
    int adapter = same_file(procs, threads, "adapter_model.safetensors"), metrics = same_file(procs, threads, "metrics.jsonl");
    int moments = same_file(procs, threads, "checkpoint-12/optimizer.safetensors");
    printf("    vs --nproc 3 (threads): adapter %s, optimizer moments %s, metrics.jsonl %s\n", adapter ? "identical" : "DIFFERS",
           moments ? "identical" : "DIFFER", metrics ? "identical" : "DIFFERS");
    CHECK(adapter && metrics && moments, "the TCP backend must give the thread backend's result bit for bit");
}

/* 1 when rank r's log (OUT.rankR.log) holds needle */
static int log_has(const char *out, int r, const char *needle) {
    char path[300], *text = NULL;
    size_t n = 0;
    snprintf(path, sizeof path, "%s.rank%d.log", out, r);
    int has = !mb_read_file(path, &text, &n) && strstr(text, needle);
    free(text);
    return has;
}

static void slurm_openmpi_and_pmi_launch_the_same_job(void) {
    static char out[1 << 16];
    char sh[6000], cmd[3][1200], env[256];
    const char *extra = "--max_steps 6 --save_steps 6", *threads = t_tmp("launch_threads");
    rank_cmd(cmd[0], sizeof cmd[0], -1, 0, threads, extra);
    CHECK(t_run(cmd[0], out, sizeof out) == 0, "--nproc 3: %s", out);
    static const struct {
        const char *name, *env, *said;
    } launchers[] = {
        /* srun inside an sbatch allocation of 8 tasks: the step's 3 count */
        {"SLURM", "SLURM_PROCID=%d SLURM_LOCALID=%d SLURM_NTASKS=8 SLURM_STEP_NUM_TASKS=3",
         "data parallel: 3 ranks from SLURM_PROCID/SLURM_STEP_NUM_TASKS"},
        /* mpirun inside the same allocation: Open MPI's variables, not the allocation's */
        {"Open MPI", "OMPI_COMM_WORLD_RANK=%d OMPI_COMM_WORLD_LOCAL_RANK=%d OMPI_COMM_WORLD_SIZE=3 SLURM_PROCID=0 SLURM_NTASKS=8",
         "data parallel: 3 ranks from OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE"},
        {"MPICH", "PMI_RANK=%d MPI_LOCALRANKID=%d PMI_SIZE=3", "data parallel: 3 ranks from PMI_RANK/PMI_SIZE"},
    };
    for (int k = 0; k < 3; k++) {
        char name[32];
        snprintf(name, sizeof name, "launch_%d", k);
        const char *procs = t_tmp(name);
        for (int r = 0; r < 3; r++) {
            int n = snprintf(env, sizeof env, launchers[k].env, r, r);
            snprintf(env + n, sizeof env - (size_t)n, " MASTER_PORT=%d", rdv_port(16 + k));
            rank_cmd_env(cmd[r], sizeof cmd[r], env, procs, extra);
        }
        ranks_script(sh, sizeof sh, cmd, 3, procs, "");
        t_run(sh, out, sizeof out);
        int said = log_has(procs, 0, launchers[k].said), same = same_file(procs, threads, "adapter_model.safetensors");
        printf("    3 processes launched by %s's variables: %s    rank 0 says \"%s\": %s; adapter vs --nproc 3: %s\n",
               launchers[k].name, out, launchers[k].said, said ? "yes" : "NO", same ? "identical" : "DIFFERS");
        CHECK(strstr(out, "rank0=0") && strstr(out, "rank1=0") && strstr(out, "rank2=0"), "%s", out);
        CHECK(said && same, "%s launch", launchers[k].name);
    }
}

/* a job of 2 ranks whose rank 1 has `theirs` appended to its command line (and env1 before it);
 * returns its output folder (logs beside it) */
static const char *two_ranks_one_different(const char *name, int port, const char *env1, const char *theirs, char *out,
                                           size_t cap) {
    char sh[4000], cmd[2][1200], env[2][256], extra[600];
    const char *run = t_tmp(name);
    snprintf(env[0], sizeof env[0], "WORLD_SIZE=2 RANK=0 MASTER_PORT=%d", port);
    snprintf(env[1], sizeof env[1], "%s WORLD_SIZE=2 RANK=1 MASTER_PORT=%d", env1, port);
    snprintf(extra, sizeof extra, "--max_steps 2 --ddp_timeout 30 %s", theirs);
    rank_cmd_env(cmd[0], sizeof cmd[0], env[0], run, "--max_steps 2 --ddp_timeout 30");
    rank_cmd_env(cmd[1], sizeof cmd[1], env[1], run, extra);
    ranks_script(sh, sizeof sh, cmd, 2, run, "");
    t_run(sh, out, cap);
    return run;
}

static void ranks_of_another_job_are_refused(void) {
    static char out[1 << 14];
    char log0[1024], log1[1024], arg[400];
    /* the data with chosen and rejected swapped; the model with its last byte changed */
    char *text = NULL, *swapped = NULL;
    size_t n = 0;
    CHECK_OK(mb_read_file(FIX "/data.jsonl", &text, &n));
    for (char *p = text; *p; p++) {
        if (!strncmp(p, "chosen\":", 8)) sb_printf(&swapped, "rejected\":"), p += 7;
        else if (!strncmp(p, "rejected\":", 10)) sb_printf(&swapped, "chosen\":"), p += 9;
        else sb_printf(&swapped, "%c", *p);
    }
    const char *data = t_tmp("swapped.jsonl"), *model = t_tmp("model_copy");
    CHECK_OK(mb_write_file(data, swapped, strlen(swapped)));
    free(text), arrfree(swapped);
    mkdir(model, 0755);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
    for (int i = 0; i < 4; i++) {
        char from[300], to[300];
        snprintf(from, sizeof from, FIX "/model/%s", files[i]), snprintf(to, sizeof to, "%s/%s", model, files[i]);
        copy_file(from, to);
        FILE *f = i == 1 ? fopen(to, "r+b") : NULL;
        if (f) {
            fseek(f, -1, SEEK_END);
            int last = fgetc(f);
            fseek(f, -1, SEEK_END), fputc(last ^ 1, f), fclose(f);
        }
    }
    const struct {
        const char *what, *env1, *arg, *needle0, *needle1;
    } cases[] = {
        {"data with chosen and rejected swapped", "", "--data %s", "rank 1's training data differs from rank 0's",
         "give every rank the same --data"},
        {"--beta 0.2", "", "--beta 0.2", "rank 1's options differ from rank 0's: beta=0.2 on rank 1, beta=0.1 on rank 0",
         "give every rank the same options"},
        {"a model copy with one byte changed", "", "--model %s", "rank 1's model files differ from rank 0's",
         "give every rank the same --model"},
    };
    for (int k = 0; k < 3; k++) {
        char name[32];
        snprintf(name, sizeof name, "refused_%d", k);
        snprintf(arg, sizeof arg, cases[k].arg, k == 0 ? data : model);
        const char *run = two_ranks_one_different(name, rdv_port(19 + k), cases[k].env1, arg, out, sizeof out);
        read_log(run, 0, log0, sizeof log0), read_log(run, 1, log1, sizeof log1);
        printf("    rank 1 with %s: %s    rank 0: %s\n    rank 1: %s\n", cases[k].what, out, log0, log1);
        CHECK(strstr(out, "rank0=1") && strstr(out, "rank1=1"), "both ranks exit 1: %s", out);
        CHECK(strstr(log0, "rendezvous on 127.0.0.1:") && strstr(log0, cases[k].needle0) && strstr(log0, cases[k].needle1),
              "rank 0 names it: %s", log0);
        CHECK(strstr(log1, "refused rank 1: ") && strstr(log1, cases[k].needle0), "rank 1 is told: %s", log1);
        char adapter[300];
        snprintf(adapter, sizeof adapter, "%s/adapter_model.safetensors", run);
        CHECK(!mb_is_file(adapter) && !log_has(run, 0, "saved the adapter"), "the job must not train");
    }
}

static void killed_rank_stops_the_others_and_resume_matches(void) {
    static char out[1 << 16];
    char sh[6000], cmd[1200], extra[160], then[400], log[3][512];
    int steps = t_sanitized() ? 60 : 240;
    snprintf(extra, sizeof extra, "--max_steps %d --save_steps 4 --ddp_timeout 60", steps);
    const char *ref = t_tmp("uninterrupted3"), *run = t_tmp("killed3");
    rank_cmd(cmd, sizeof cmd, -1, 0, ref, extra);
    CHECK(t_run(cmd, out, sizeof out) == 0, "uninterrupted: %s", out);
    /* SIGKILL rank 1 as soon as checkpoint-8 exists */
    snprintf(then, sizeof then,
             "while [ ! -d %s/checkpoint-8 ] && kill -0 $p0 2>/dev/null; do sleep 0.002; done; kill -9 $p1; t0=$(date +%%s.%%N);",
             run);
    three_ranks(sh, sizeof sh, rdv_port(6), run, extra, then);
    t_run(sh, out, sizeof out);
    for (int r = 0; r < 3; r++) read_log(run, r, log[r], sizeof log[r]);
    printf("    rank 1 killed after checkpoint-8: %s    rank 0: %s\n    rank 2: %s\n", out, log[0], log[2]);
    CHECK(strstr(out, "rank1=137"), "rank 1 must die of SIGKILL: %s", out);
    CHECK(strstr(out, "rank0=1") && strstr(log[0], "rank 1 of 3 stopped") && strstr(log[0], "--resume_from_checkpoint"),
          "rank 0 stops naming rank 1: %s / %s", out, log[0]);
    CHECK(strstr(out, "rank2=1") && strstr(log[2], "rank 1 of 3 stopped"), "rank 2 stops naming rank 1: %s / %s", out,
          log[2]);
    char final[300];
    snprintf(final, sizeof final, "%s/adapter_model.safetensors", run);
    CHECK(!mb_is_file(final), "the run must stop mid-way");
    char *latest = latest_checkpoint(run);
    printf("    newest checkpoint left: %s\n", latest ? latest : "(none)");
    CHECK(latest != NULL, "a checkpoint survives");
    free(latest);
    /* all three again, from the newest checkpoint */
    char extra2[220];
    snprintf(extra2, sizeof extra2, "%s --resume_from_checkpoint latest", extra);
    three_ranks(sh, sizeof sh, rdv_port(7), run, extra2, "");
    t_run(sh, out, sizeof out);
    read_log(run, 0, log[0], sizeof log[0]);
    CHECK(strstr(out, "rank0=0") && strstr(out, "rank1=0") && strstr(out, "rank2=0"), "resume: %s / %s", out, log[0]);
    char moments[64];
    snprintf(moments, sizeof moments, "checkpoint-%d/optimizer.safetensors", steps);
    int adapter = same_file(run, ref, "adapter_model.safetensors"), opt = same_file(run, ref, moments);
    printf("    resumed by 3 processes: final adapter %s, optimizer moments %s to the uninterrupted run\n",
           adapter ? "byte-identical" : "DIFFERENT", opt ? "byte-identical" : "DIFFERENT");
    CHECK(adapter && opt, "resume must give the uninterrupted result");
}

static void hung_rank_is_named_when_ddp_timeout_runs_out(void) {
    static char out[1 << 16];
    char sh[6000], then[400], log[3][512];
    const char *run = t_tmp("hung3");
    /* SIGSTOP rank 1 after checkpoint-4: it holds its connection open but never answers */
    snprintf(then, sizeof then,
             "while [ ! -d %s/checkpoint-4 ] && kill -0 $p0 2>/dev/null; do sleep 0.002; done; kill -STOP $p1; "
             "t0=$(date +%%s.%%N); wait $p0; s0=$?; wait $p2; s2=$?; kill -CONT $p1;", run);
    three_ranks(sh, sizeof sh, rdv_port(8), run, "--max_steps 100000 --save_steps 4 --ddp_timeout 2", then);
    t_run(sh, out, sizeof out);
    for (int r = 0; r < 3; r++) read_log(run, r, log[r], sizeof log[r]);
    printf("    rank 1 stopped (SIGSTOP), --ddp_timeout 2: %s    rank 0: %s\n    rank 1 (continued): %s\n    rank 2: %s\n",
           out, log[0], log[1], log[2]);
    CHECK(strstr(log[0], "rank 1 of 3 did not reach") && strstr(log[0], "within 2 s"), "rank 0 names rank 1: %s", log[0]);
    CHECK(strstr(log[2], "rank 1 of 3 did not reach"), "rank 2 is told: %s", log[2]);
    CHECK(strstr(log[1], "rank 1 of 3 did not reach"), "rank 1, continued, is told and stops: %s", log[1]);
    CHECK(field(out, "seconds=") >= 2, "the others waited for the timeout: %s", out);
}

/* the thread backend: a rank thread that never reaches the barrier; the others' barrier fails and
 * they report it as the CLI does (the library returns, it never exits) */
static void *barrier_once(void *p) {
    MbComm *c = p;
    if (c->barrier(c)) fprintf(stderr, "medbot: %s\n", mb_last_error());
    return NULL;
}

static void thread_rank_that_hangs_is_named(void) {
    int fds[2];
    if (pipe(fds) != 0) T_FAIL("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        MbComm *comms[3];
        mb_comm_threads_new(3, 0.5, comms);
        pthread_t th[2];
        for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, barrier_once, comms[r]); /* rank 2 never comes */
        for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
        int failed = comms[2]->barrier(comms[2]) != MB_OK; /* the late rank: the group failed, it returns at once */
        for (int r = 0; r < 3; r++) comms[r]->destroy(comms[r]);
        _exit(failed ? 1 : 0);
    }
    close(fds[1]);
    char msg[1024];
    int st = t_child_wait(pid, fds[0], msg, sizeof msg);
    printf("    ranks 0 and 1 of 3 threads in a barrier, rank 2 never comes (timeout 0.5 s) -> exit %d: %s", st, msg);
    CHECK(st == 1 && strstr(msg, "rank 2 of 3 did not reach the collective within 0.5 s"), "%s", msg);
}

/* a rank that stops (its run failed) releases the ranks waiting for it at once, with its reason */
typedef struct {
    MbComm *c;
    MbStatus st;
    char msg[1024];
} BarrierArg;

static void *barrier_status(void *p) {
    BarrierArg *a = p;
    a->st = a->c->barrier(a->c);
    snprintf(a->msg, sizeof a->msg, "%s", mb_last_error());
    return NULL;
}

static void a_rank_that_leaves_releases_the_others(void) {
    MbComm *comms[3];
    CHECK_OK(mb_comm_threads_new(3, 60, comms)); /* a long timeout: only the leave can release them */
    BarrierArg args[2];
    pthread_t th[2];
    for (int r = 0; r < 2; r++) args[r] = (BarrierArg){comms[r], MB_OK, ""}, pthread_create(&th[r], NULL, barrier_status, &args[r]);
    struct timespec wait = {0, 50 * 1000 * 1000};
    nanosleep(&wait, NULL); /* (they wait in the barrier, or come to it already failed: either way) */
    double t0 = mb_now();
    mb_fail(MB_ERR_OOM, "out of memory allocating 123 bytes at here:1");
    comm_leave(comms[2]);
    CHECK(strstr(mb_last_error(), "out of memory allocating 123 bytes"), "the leaving rank keeps its own message: %s",
          mb_last_error());
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    double dt = mb_now() - t0;
    printf("    rank 2 of 3 leaves while ranks 0 and 1 wait (timeout 60 s): released after %.3f s: %s\n", dt, args[0].msg);
    for (int r = 0; r < 2; r++)
        CHECK(args[r].st != MB_OK && strstr(args[r].msg, "another rank failed (rank 2 of 3): out of memory allocating 123"),
              "rank %d: %s", r, args[r].msg);
    CHECK(dt < 10, "released at once, not after --ddp_timeout");
    CHECK(comms[2]->all_reduce_host(comms[2], (double[1]){1}, 1) != MB_OK, "the group stays failed");
    for (int r = 0; r < 3; r++) comms[r]->destroy(comms[r]);
}

MB_TEST_MAIN("dist", T(collectives_of_thread_ranks), T(data_parallel_equals_one_rank),
             T(data_parallel_world_size_not_dividing_parameters), T(checkpoint_resumes_on_another_world_size),
             T(sha256_and_hmac_match_published_vectors), T(job_fingerprint_reads_bytes_not_paths),
             T(launcher_variables_of_torchrun_slurm_openmpi_and_pmi),
             T(rendezvous_success_missing_rank_and_wrong_world), T(rendezvous_port_in_use_and_listens_only_on_master_addr),
             T(rendezvous_completes_while_idle_and_garbage_connections_are_open),
             T(rendezvous_secret_is_proven_by_both_sides), T(rendezvous_joiner_checks_rank_0s_proof),
             T(processes_over_tcp_equal_thread_ranks), T(slurm_openmpi_and_pmi_launch_the_same_job),
             T(ranks_of_another_job_are_refused), T(killed_rank_stops_the_others_and_resume_matches),
             T(hung_rank_is_named_when_ddp_timeout_runs_out), T(thread_rank_that_hangs_is_named),
             T(a_rank_that_leaves_releases_the_others))
