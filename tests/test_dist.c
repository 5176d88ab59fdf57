/* tests/test_dist.c: the coordinator. Collectives of the in-process backend; data-parallel DPO
 * on CPU ranks equal to one rank with the same global batch (ZeRO-1 on and off, a parameter
 * count the world size does not divide, LoRA dropout); checkpoints of one world size resumed
 * on another; the TCP rendezvous with real processes on loopback. */
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
            mb_comm_threads_new(world, 0, comms);
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

/* ---- the TCP rendezvous, with real processes ---- */

static int rdv_port(int k) { return 20000 + (int)(getpid() % 20000) + k; }

/* forks one process per rank; each runs mb_rendezvous and exits 0 (blob right), 1 (error:
 * message in msgs[r]) or 2 (wrong blob) */
static void rdv_run(int world_rank0, const int *worlds, const int *ranks, int n, int port, double timeout, int *codes,
                    char msgs[][512]) {
    int pipes[8][2];
    pid_t pids[8];
    for (int i = 0; i < n; i++) {
        if (pipe(pipes[i]) != 0) T_FAIL("pipe");
        pids[i] = fork();
        if (pids[i] == 0) {
            char blob[64];
            memset(blob, 0, sizeof blob);
            if (ranks[i] == 0) snprintf(blob, sizeof blob, "nccl-unique-id-%d", port);
            MbStatus rc = mb_rendezvous("127.0.0.1", port, ranks[i], worlds[i], blob, sizeof blob, timeout);
            char want[64];
            memset(want, 0, sizeof want);
            snprintf(want, sizeof want, "nccl-unique-id-%d", port);
            const char *m = rc ? mb_last_error() : "";
            if (write(pipes[i][1], m, strlen(m)) < 0) _exit(3);
            _exit(rc ? 1 : memcmp(blob, want, sizeof want) ? 2 : 0);
        }
        close(pipes[i][1]);
        (void)world_rank0;
    }
    for (int i = 0; i < n; i++) {
        int st;
        waitpid(pids[i], &st, 0);
        codes[i] = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
        ssize_t k = read(pipes[i][0], msgs[i], 511);
        msgs[i][k > 0 ? k : 0] = 0;
        close(pipes[i][0]);
    }
}

static void rendezvous_success_missing_rank_and_wrong_world(void) {
    int codes[8];
    char msgs[8][512];
    /* success: rank 0 and two others receive rank 0's blob */
    int w3[] = {3, 3, 3}, r3[] = {0, 1, 2};
    rdv_run(3, w3, r3, 3, rdv_port(0), 10, codes, msgs);
    CHECK(codes[0] == 0 && codes[1] == 0 && codes[2] == 0, "3 ranks: exit %d %d %d (%s | %s | %s)", codes[0], codes[1],
          codes[2], msgs[0], msgs[1], msgs[2]);
    printf("    3 ranks on 127.0.0.1:%d: every rank got rank 0's blob\n", rdv_port(0));
    /* a missing rank: rank 0 times out naming it, the others are told */
    int w3b[] = {3, 3}, r3b[] = {0, 2};
    rdv_run(3, w3b, r3b, 2, rdv_port(1), 1.5, codes, msgs);
    printf("    rank 1 missing -> rank 0: %s\n                      rank 2: %s\n", msgs[0], msgs[1]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 of 3 never arrived within"), "missing rank named: %s", msgs[0]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "refused rank 2") && strstr(msgs[1], "rank 1 of 3 never arrived"),
          "the waiting rank is told: %s", msgs[1]);
    /* a world size that does not match */
    int wm[] = {2, 3}, rm[] = {0, 1};
    rdv_run(2, wm, rm, 2, rdv_port(2), 5, codes, msgs);
    printf("    WORLD_SIZE 2 vs 3 -> rank 0: %s\n                         rank 1: %s\n", msgs[0], msgs[1]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "rank 1 says WORLD_SIZE=3, rank 0 has WORLD_SIZE=2"), "%s", msgs[0]);
    CHECK(codes[1] == 1 && strstr(msgs[1], "WORLD_SIZE=3"), "%s", msgs[1]);
    /* nobody at MASTER_ADDR:MASTER_PORT */
    int wn[] = {2}, rn[] = {1};
    rdv_run(2, wn, rn, 1, rdv_port(3), 0.5, codes, msgs);
    printf("    no rank 0 -> %s\n", msgs[0]);
    CHECK(codes[0] == 1 && strstr(msgs[0], "could not reach rank 0 at 127.0.0.1"), "%s", msgs[0]);
}

static void rendezvous_port_in_use_and_listens_only_on_master_addr(void) {
    int port = rdv_port(4);
    pid_t pid = fork();
    if (pid == 0) { /* rank 0 waiting for a rank that never comes */
        char blob[8] = "x";
        mb_rendezvous("127.0.0.1", port, 0, 2, blob, sizeof blob, 3);
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
    MbStatus rc = mb_rendezvous("127.0.0.1", port, 0, 2, blob, sizeof blob, 1);
    printf("    port in use -> %s\n", mb_last_error());
    CHECK(rc != MB_OK && strstr(mb_last_error(), "cannot listen on 127.0.0.1") && strstr(mb_last_error(), "pick a free one"),
          "%s", mb_last_error());
    int st;
    waitpid(pid, &st, 0);
}

/* ---- CPU ranks in separate processes (TCP), and ranks that die or hang ---- */

/* the medbot command line of one rank (RANK=rank of WORLD_SIZE=3; rank < 0: --nproc 3 threads) */
static void rank_cmd(char *cmd, size_t cap, int rank, int port, const char *out, const char *extra) {
    char env[128] = "";
    if (rank >= 0) snprintf(env, sizeof env, "WORLD_SIZE=3 RANK=%d MASTER_PORT=%d ", rank, port);
    snprintf(cmd, cap,
             "%s%s dpo --model " FIX "/model --data " FIX "/data.jsonl --output %s --lora " FIX "/adapter_qk "
             "--max_length 36 --max_prompt_length 24 --max_completion_length 20 --per_device_train_batch_size 1 "
             "--learning_rate 1e-3 --lr_scheduler_type cosine --warmup_ratio 0.1 --lora_dropout 0.1 --seed 3 "
             "--threads 1 --logging_steps 10 %s %s",
             env, t_medbot(), out, extra, rank >= 0 ? "" : "--nproc 3");
}

/* A shell script that starts ranks 0, 1, 2 in the background as p0, p1, p2 (their output in
 * OUT.rankR.log); `then` runs after that (and may wait for rank R itself, leaving its status in
 * sR); every rank's exit status is printed as "rankR=S".
 * A watchdog kills the lot after 120 s, so that a hang fails the test instead of the run. */
static void three_ranks(char *sh, size_t cap, int port, const char *out, const char *extra, const char *then) {
    char cmd[3][1200];
    for (int r = 0; r < 3; r++) rank_cmd(cmd[r], sizeof cmd[r], r, port, out, extra);
    snprintf(sh, cap,
             "%s > %s.rank0.log 2>&1 & p0=$!; %s > %s.rank1.log 2>&1 & p1=$!; %s > %s.rank2.log 2>&1 & p2=$!; "
             "( sleep 120 & s=$!; trap 'kill $s; exit 0' TERM; wait $s; kill -9 $p0 $p1 $p2 ) >/dev/null 2>&1 & dog=$!; t0=$(date +%%s.%%N); %s "
             "for r in 0 1 2; do eval \"s=\\${s$r:-}\"; if [ -z \"$s\" ]; then eval \"wait \\$p$r\"; s=$?; fi; echo rank$r=$s; done; "
             "echo seconds=$(echo \"$(date +%%s.%%N) - $t0\" | bc); kill $dog 2>/dev/null; wait $dog 2>/dev/null; true",
             cmd[0], out, cmd[1], out, cmd[2], out, then);
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
    three_ranks(sh, sizeof sh, rdv_port(5), procs, extra, "");
    t_run(sh, out, sizeof out);
    char log0[512];
    read_log(procs, 0, log0, sizeof log0);
    printf("    3 processes (WORLD_SIZE=3, TCP): %s", out);
    CHECK(strstr(out, "rank0=0") && strstr(out, "rank1=0") && strstr(out, "rank2=0"), "%s / %s", out, log0);
    int adapter = same_file(procs, threads, "adapter_model.safetensors"), metrics = same_file(procs, threads, "metrics.jsonl");
    int moments = same_file(procs, threads, "checkpoint-12/optimizer.safetensors");
    printf("    vs --nproc 3 (threads): adapter %s, optimizer moments %s, metrics.jsonl %s\n", adapter ? "identical" : "DIFFERS",
           moments ? "identical" : "DIFFER", metrics ? "identical" : "DIFFERS");
    CHECK(adapter && metrics && moments, "the TCP backend must give the thread backend's result bit for bit");
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

/* the thread backend: a rank thread that never reaches the barrier */
static void *barrier_once(void *p) {
    MbComm *c = p;
    c->barrier(c);
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
        _exit(0);
    }
    close(fds[1]);
    char msg[1024];
    ssize_t k = read(fds[0], msg, sizeof msg - 1);
    msg[k > 0 ? k : 0] = 0;
    close(fds[0]);
    int st;
    waitpid(pid, &st, 0);
    printf("    ranks 0 and 1 of 3 threads in a barrier, rank 2 never comes (timeout 0.5 s) -> exit %d: %s",
           WIFEXITED(st) ? WEXITSTATUS(st) : -1, msg);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 1 && strstr(msg, "rank 2 of 3 did not reach the collective within 0.5 s"),
          "%s", msg);
}

MB_TEST_MAIN("dist", T(collectives_of_thread_ranks), T(data_parallel_equals_one_rank),
             T(data_parallel_world_size_not_dividing_parameters), T(checkpoint_resumes_on_another_world_size),
             T(rendezvous_success_missing_rank_and_wrong_world), T(rendezvous_port_in_use_and_listens_only_on_master_addr),
             T(processes_over_tcp_equal_thread_ranks), T(killed_rank_stops_the_others_and_resume_matches),
             T(hung_rank_is_named_when_ddp_timeout_runs_out), T(thread_rank_that_hangs_is_named))
