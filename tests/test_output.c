/* tests/test_output.c: nothing a user gives or gets is lost. No command writes over its own
 * inputs; an output folder that holds a run is not mixed with another; resuming after a kill
 * removes the half-written temporaries and cuts metrics.jsonl back to the checkpoint; a failed
 * run leaves nothing it created; missing parent folders are made; Ctrl-C (SIGINT) during
 * training writes a checkpoint and prints the command that resumes, a second one stops at once;
 * input files that are folders, FIFOs or link loops are named; NaN/inf weights are named at load;
 * training.svg shows the whole run after a resume, each point at its step. */
#include "test.h"

#include <signal.h>

#define FIX "tests/fixtures/dpo"

/* t_dpo_cmd, logging every step */
static void dpo_cmd(char *cmd, size_t n, const char *out, const char *extra) {
    char more[1024];
    snprintf(more, sizeof more, "--logging_steps 1 %s", extra);
    t_dpo_cmd(cmd, n, out, more);
}

static int lines_of(const char *path) {
    char *text = NULL;
    size_t n = 0;
    int k = 0;
    if (mb_read_file(path, &text, &n)) return -1;
    for (size_t i = 0; i < n; i++) k += text[i] == '\n';
    free(text);
    return k;
}

/* The "step" of every line of a metrics.jsonl (train lines only: no eval_ keys), as a string "1 2 3". */
static void metric_steps(const char *path, char *out, size_t cap) {
    char *text = NULL;
    size_t n = 0, at = 0;
    int line = 0;
    const char *s;
    size_t len;
    out[0] = 0;
    if (mb_read_file(path, &text, &n)) return;
    while (jsonl_next(text, n, &at, &line, &s, &len)) {
        MbJsonDoc d;
        if (json_parse(path, s, len, &d)) {
            snprintf(out + strlen(out), cap - strlen(out), "%sBAD", out[0] ? " " : "");
            continue;
        }
        const MbJson *st = json_get(&d, json_root(&d), "step");
        if (!json_get(&d, json_root(&d), "eval_loss"))
            snprintf(out + strlen(out), cap - strlen(out), "%s%lld", out[0] ? " " : "", st ? (long long)st->i : -1LL);
        json_free(&d);
    }
    free(text);
}

/* The (step, value) points of key in a metrics.jsonl, in the file's order; returns the count. */
static int metric_points(const char *path, const char *key, double *steps, double *values, int cap) {
    char *text = NULL;
    size_t n = 0, at = 0, len;
    int line = 0, k = 0;
    const char *s;
    if (mb_read_file(path, &text, &n)) return 0;
    while (k < cap && jsonl_next(text, n, &at, &line, &s, &len)) {
        MbJsonDoc d;
        if (json_parse(path, s, len, &d)) continue;
        const MbJson *st = json_get(&d, json_root(&d), "step"), *v = json_get(&d, json_root(&d), key);
        if (st && v && v->kind == MB_JSON_NUMBER) steps[k] = st->num, values[k++] = v->num;
        json_free(&d);
    }
    free(text);
    return k;
}

/* The points of the series key in training.svg text, mapped back to steps and values through
 * their panel's data-plot, data-steps and data-values (*range: the panel's value range, when
 * not NULL); returns the count (-1: no such series). */
static int svg_points(const char *svg, const char *key, double *steps, double *values, int cap, double *range) {
    char want[128];
    snprintf(want, sizeof want, "data-series=\"%s\"", key);
    const char *at = strstr(svg, want), *g = NULL;
    for (const char *q = svg; at && (q = strstr(q, "data-plot=\"")) && q < at; q++) g = q; /* the panel it is in */
    double x0, y0, w, h, s0, s1, v0, v1;
    if (!at || !g || sscanf(g, "data-plot=\"%lf %lf %lf %lf\" data-steps=\"%lf %lf\" data-values=\"%lf %lf\"", &x0, &y0,
                            &w, &h, &s0, &s1, &v0, &v1) != 8)
        return -1;
    const char *p = strstr(at, "points=\"");
    int k = 0;
    if (range) *range = v1 - v0;
    for (p = p ? p + 8 : ""; k < cap && *p && *p != '"';) {
        char *end;
        double x = strtod(p, &end);
        if (*end != ',') break;
        double y = strtod(end + 1, &end);
        steps[k] = s0 + (x - x0) / w * (s1 - s0), values[k++] = v0 + (y0 + h - y) / h * (v1 - v0);
        p = end + (*end == ' ');
    }
    return k;
}

static void merge_and_dpo_never_write_over_their_inputs(void) {
    /* merge into the model's own folder: refused, the weights untouched */
    const char *model = t_tmp("model");
    mkdir(model, 0755);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"};
    char a[1024], b[512], args[2048];
    for (int i = 0; i < 4; i++) {
        snprintf(a, sizeof a, FIX "/model/%s", files[i]);
        snprintf(b, sizeof b, "%s/%s", model, files[i]);
        CHECK_OK(mb_copy_file(a, b));
    }
    snprintf(args, sizeof args, "merge --model %s --lora " FIX "/adapter_qk --output %s", model, model);
    t_expect_failure(args, "is the input", "choose another --output");
    snprintf(b, sizeof b, "%s/model.safetensors", model);
    CHECK(t_files_equal(b, FIX "/model/model.safetensors"), "the base's weights are untouched");
    /* the same folder by another spelling, and the adapter's folder */
    snprintf(args, sizeof args, "merge --model %s --lora " FIX "/adapter_qk --output %s/../model/.", model, model);
    t_expect_failure(args, "is the input", NULL);
    snprintf(args, sizeof args, "merge --model %s --lora " FIX "/adapter_qk --output " FIX "/adapter_qk", model);
    t_expect_failure(args, "is the input", NULL);
    /* dpo into the model folder, a data file where the run writes metrics.jsonl, an adapter in a checkpoint */
    const char *out = t_tmp("out");
    snprintf(args, sizeof args, "dpo --model %s --data " FIX "/data.jsonl --output %s", model, model);
    t_expect_failure(args, "is the input", NULL);
    mkdir(out, 0755);
    snprintf(b, sizeof b, "%s/metrics.jsonl", out);
    CHECK_OK(mb_copy_file(FIX "/data.jsonl", b));
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s --overwrite_output_dir", b, out);
    t_expect_failure(args, "would write metrics.jsonl over the input", NULL);
    CHECK(t_files_equal(b, FIX "/data.jsonl"), "the data is untouched");
    remove(b);
    snprintf(b, sizeof b, "%s/checkpoint-1", out);
    mkdir(b, 0755);
    snprintf(a, sizeof a, "%s/adapter_config.json", b);
    CHECK_OK(mb_copy_file(FIX "/adapter_qk/adapter_config.json", a));
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", b);
    CHECK_OK(mb_copy_file(FIX "/adapter_qk/adapter_model.safetensors", a));
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data " FIX "/data.jsonl --lora %s --output %s "
             "--overwrite_output_dir", b, out);
    t_expect_failure(args, "is in a checkpoint folder of", "which this run writes");
    CHECK(t_files_equal(a, FIX "/adapter_qk/adapter_model.safetensors"), "the adapter is untouched");
    /* init may write into the folder of its config (build.sh does): the config is not rewritten */
    const char *cfgdir = t_tmp("initself");
    mkdir(cfgdir, 0755);
    snprintf(a, sizeof a, "%s/config.json", cfgdir);
    CHECK_OK(mb_copy_file(FIX "/model/config.json", a));
    snprintf(args, sizeof args, "%s init --config %s --output %s", t_medbot(), a, cfgdir);
    CHECK(t_run(args, b, sizeof b) == 0, "init into its config's folder: %s", b);
    CHECK(t_files_equal(a, FIX "/model/config.json"), "the config is untouched");
}

static void an_output_that_holds_a_run_needs_overwrite_or_resume(void) {
    static char out[1 << 16];
    char cmd[2048], steps[256], path[512];
    const char *run = t_tmp("run");
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 3");
    CHECK(t_run(cmd, out, sizeof out) == 0, "first run: %s", out);
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    metric_steps(path, steps, sizeof steps);
    CHECK(!strcmp(steps, "1 2 3"), "metrics: %s", steps);
    /* again into the same folder: refused, nothing changed */
    int rc = t_run(cmd, out, sizeof out);
    printf("    again -> exit %d: %s", rc, out);
    CHECK(rc == 1 && strstr(out, "already holds a run (metrics.jsonl)") && strstr(out, "--overwrite_output_dir"),
          "refused: %s", out);
    metric_steps(path, steps, sizeof steps);
    CHECK(!strcmp(steps, "1 2 3"), "metrics unchanged: %s", steps);
    /* --overwrite_output_dir: the old run is replaced (metrics not appended, old checkpoints gone) */
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 2 --save_steps 1 --overwrite_output_dir");
    CHECK(t_run(cmd, out, sizeof out) == 0, "overwrite: %s", out);
    metric_steps(path, steps, sizeof steps);
    char *latest = latest_checkpoint(run);
    printf("    --overwrite_output_dir: metrics steps '%s', newest checkpoint %s\n", steps, latest ? latest : "none");
    CHECK(!strcmp(steps, "1 2"), "only the new run's metrics: %s", steps);
    CHECK(latest && strstr(latest, "checkpoint-2"), "the old run's checkpoint-3 is gone: %s", latest ? latest : "none");
    free(latest);
    snprintf(path, sizeof path, "%s/checkpoint-3", run);
    CHECK(!mb_is_dir(path), "checkpoint-3 removed");
    /* the tokenizer travels with the adapter, as TRL saves its processing_class */
    snprintf(path, sizeof path, "%s/tokenizer.json", run);
    CHECK(t_files_equal(path, FIX "/model/tokenizer.json"), "tokenizer.json saved with the adapter");
}

/* a process id that no process has now */
static long dead_pid(void) {
    pid_t p = fork();
    if (p == 0) _exit(0);
    waitpid(p, NULL, 0);
    return (long)p;
}

static void resume_removes_stale_temporaries_and_cuts_the_metrics(void) {
    static char out[1 << 16];
    char cmd[2048], steps[256], path[512], ref_steps[256];
    const char *run = t_tmp("resume"), *ref = t_tmp("resume_ref");
    dpo_cmd(cmd, sizeof cmd, ref, "--max_steps 4 --save_steps 2");
    CHECK(t_run(cmd, out, sizeof out) == 0, "uninterrupted: %s", out);
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 4 --save_steps 2");
    CHECK(t_run(cmd, out, sizeof out) == 0, "run: %s", out);
    /* the state a kill during checkpoint-4's write leaves: a temporary folder and file of a dead
     * process, checkpoint-4 never renamed, metrics of steps 3 and 4 logged, the last line cut short */
    long pid = dead_pid();
    snprintf(path, sizeof path, "%s/checkpoint-4", run);
    CHECK_OK(mb_rmdir_r(path));
    snprintf(path, sizeof path, "%s/checkpoint-4.tmp.%ld", run, pid);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/checkpoint-4.tmp.%ld/adapter_model.safetensors", run, pid);
    CHECK_OK(mb_write_file(path, "x", 1));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors.tmp.%ld", run, pid);
    CHECK_OK(mb_write_file(path, "partial", 7));
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    FILE *f = fopen(path, "ab");
    if (f) fputs("{\"step\": 5, \"epoch\": 1.6, \"lo", f), fclose(f);
    metric_steps(path, steps, sizeof steps);
    printf("    before resuming: metrics steps '%s'\n", steps);
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 4 --save_steps 2 --resume_from_checkpoint latest");
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "resumed from") && strstr(out, "at step 2"), "resumed: %s", out);
    metric_steps(path, steps, sizeof steps);
    snprintf(path, sizeof path, "%s/metrics.jsonl", ref);
    metric_steps(path, ref_steps, sizeof ref_steps);
    printf("    after: '%s' (uninterrupted: '%s')\n", steps, ref_steps);
    CHECK(!strcmp(steps, "1 2 3 4") && !strcmp(ref_steps, steps), "each step logged once, as uninterrupted");
    snprintf(path, sizeof path, "%s/checkpoint-4.tmp.%ld", run, pid);
    CHECK(!mb_is_dir(path), "the stale temporary folder is removed");
    snprintf(path, sizeof path, "%s/adapter_model.safetensors.tmp.%ld", run, pid);
    CHECK(!mb_is_file(path), "the stale temporary file is removed");
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", run);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", ref);
    CHECK(t_files_equal(a, b), "the resumed adapter is byte-identical to the uninterrupted one");
}

static void a_failed_run_leaves_nothing_and_parents_are_made(void) {
    static char out[1 << 16];
    char cmd[2048], path[512];
    const char *top = t_tmp("parents");
    /* bad data: stops while loading, before any folder exists */
    snprintf(path, sizeof path, "%s/a/b/c", top);
    const char *bad = t_tmp("bad.jsonl");
    const char *bad_text = "{\"prompt\": \"p\", \"chosen\": \"c\", \"rejected\": \"r\"}\nnot json\n";
    CHECK_OK(mb_write_file(bad, bad_text, strlen(bad_text)));
    snprintf(cmd, sizeof cmd, "dpo --model " FIX "/model --data %s --output %s", bad, path);
    t_expect_failure(cmd, "bad.jsonl:2", NULL);
    CHECK(!mb_is_dir(top), "no folder made for a run that could not start");
    /* a NaN loss at step 1, before any checkpoint: the folders it made are removed */
    dpo_cmd(cmd, sizeof cmd, path, "--max_steps 5 --learning_rate 1e30 --max_grad_norm 0 --save_steps 0");
    int rc = t_run(cmd, out, sizeof out);
    printf("    NaN before the first checkpoint -> exit %d, %s exists: %s\n", rc, top, mb_is_dir(top) ? "yes" : "no");
    CHECK(rc == 1 && strstr(out, "training stopped"), "%s", out);
    CHECK(!mb_is_dir(top), "nothing left behind");
    /* parents made for dpo, merge and init alike */
    dpo_cmd(cmd, sizeof cmd, path, "--max_steps 1");
    CHECK(t_run(cmd, out, sizeof out) == 0 && mb_is_dir(path), "dpo made %s: %s", path, out);
    char adapter[512], merged[512], init[512];
    snprintf(adapter, sizeof adapter, "%s", path);
    snprintf(merged, sizeof merged, "%s/m/n/merged", top);
    snprintf(cmd, sizeof cmd, "%s merge --model " FIX "/model --lora %s --output %s", t_medbot(), adapter, merged);
    CHECK(t_run(cmd, out, sizeof out) == 0 && mb_is_dir(merged), "merge made %s: %s", merged, out);
    snprintf(init, sizeof init, "%s/i/j/init", top);
    snprintf(cmd, sizeof cmd, "%s init --config " FIX "/model/config.json --output %s --dtype f32", t_medbot(), init);
    CHECK(t_run(cmd, out, sizeof out) == 0 && mb_is_dir(init), "init made %s: %s", init, out);
    /* a merge that fails (no adapter there) leaves no folder */
    snprintf(merged, sizeof merged, "%s/x/y", top);
    snprintf(cmd, sizeof cmd, "merge --model %s --lora %s/none --output %s --tokenizer " FIX "/model", init, top, merged);
    t_expect_failure(cmd, "none", NULL);
    snprintf(path, sizeof path, "%s/x", top);
    CHECK(!mb_is_dir(path), "no folder left by a failed merge");
}

/* Starts `sh -c "exec CMD"` with stdout and stderr in files; returns the pid (medbot itself). */
static pid_t spawn(const char *cmd, const char *out, const char *err) {
    char *full = NULL;
    sb_printf(&full, "exec %s > %s 2> %s", cmd, out, err);
    pid_t p = fork();
    if (p == 0) {
        execl("/bin/sh", "sh", "-c", full, (char *)NULL);
        _exit(127);
    }
    arrfree(full);
    return p;
}

/* Waits up to `seconds` for path to hold at least `lines` lines. */
static int wait_lines(const char *path, int lines, double seconds) {
    double t0 = mb_now();
    while (mb_now() - t0 < seconds) {
        if (lines_of(path) >= lines) return 1;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

static void sigint_saves_a_checkpoint_and_prints_the_resume_command(void) {
    static char out[1 << 16];
    char cmd[2048], path[512], o[512], e[512];
    const char *run = t_tmp("sigint"), *ref = t_tmp("sigint_ref");
    /* 300 steps take 3 s; under the sanitizers, 25 (about 10 s): long enough to be stopped mid-run */
    const char *extra = t_sanitized() ? "--max_steps 25 --save_steps 0"
                                      : "--max_steps 300 --save_steps 0";
    snprintf(o, sizeof o, "%s", t_tmp("sigint.out"));
    snprintf(e, sizeof e, "%s", t_tmp("sigint.err"));
    dpo_cmd(cmd, sizeof cmd, run, extra);
    pid_t pid = spawn(cmd, o, e);
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    CHECK(wait_lines(path, 1, t_sanitized() ? 120 : 30), "the run logs its first step");
    kill(pid, SIGINT);
    int status = 0;
    waitpid(pid, &status, 0);
    char *stdout_text = NULL, *stderr_text = NULL;
    size_t n;
    mb_read_file(o, &stdout_text, &n);
    mb_read_file(e, &stderr_text, &n);
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    printf("    SIGINT -> exit %d; stderr:\n%s", code, stderr_text ? stderr_text : "");
    CHECK(code == 130, "exit 130 after a clean stop, got %d", code);
    CHECK(stderr_text && strstr(stderr_text, "interrupted after step") && strstr(stderr_text, "--resume_from_checkpoint latest"),
          "the message and the resume command");
    CHECK(stdout_text && strstr(stdout_text, "step 1/"), "stdout flushed: %s", stdout_text ? stdout_text : "");
    char *latest = latest_checkpoint(run);
    CHECK(latest != NULL, "a checkpoint of the last finished step");
    /* the printed command resumes; the result equals an uninterrupted run */
    const char *resume = stderr_text ? strstr(stderr_text, "to resume: ") : NULL;
    if (resume && latest) {
        char line[2048];
        snprintf(line, sizeof line, "%.*s", (int)strcspn(resume + 11, "\n"), resume + 11);
        int rc = t_run(line, out, sizeof out);
        CHECK(rc == 0 && strstr(out, "resumed from"), "the printed command resumes (exit %d): %s", rc, out);
        dpo_cmd(cmd, sizeof cmd, ref, extra);
        CHECK(t_run(cmd, out, sizeof out) == 0, "uninterrupted: %s", out);
        char a[512], b[512], sa[512], sb[512];
        snprintf(a, sizeof a, "%s/adapter_model.safetensors", run);
        snprintf(b, sizeof b, "%s/adapter_model.safetensors", ref);
        CHECK(t_files_equal(a, b), "interrupted + resumed == uninterrupted, byte for byte");
        snprintf(a, sizeof a, "%s/metrics.jsonl", run);
        snprintf(b, sizeof b, "%s/metrics.jsonl", ref);
        metric_steps(a, sa, sizeof sa);
        metric_steps(b, sb, sizeof sb);
        CHECK(!strcmp(sa, sb), "metrics.jsonl logs each step once");
        printf("    resumed from %s: adapter byte-identical to an uninterrupted run\n", latest);
    }
    free(latest), free(stdout_text), free(stderr_text);
    /* SIGINT and at once SIGTERM (torchrun's agent passes a Ctrl-C on to workers that got it too):
     * one request, the same clean stop */
    const char *run2 = t_tmp("sigint2");
    dpo_cmd(cmd, sizeof cmd, run2, "--max_steps 100000 --save_steps 0");
    pid = spawn(cmd, o, e);
    snprintf(path, sizeof path, "%s/metrics.jsonl", run2);
    CHECK(wait_lines(path, 1, t_sanitized() ? 120 : 30), "the run logs its first step");
    kill(pid, SIGINT);
    kill(pid, SIGTERM);
    waitpid(pid, &status, 0);
    latest = latest_checkpoint(run2);
    printf("    SIGINT + SIGTERM at once -> exit %d, %s\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1,
           latest ? latest : "no checkpoint");
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 130 && latest, "one clean stop");
    free(latest);
    /* a second Ctrl-C, a second later, stops at once: here while the reference log-probs of 2,000
     * pairs are computed (about 4 s), which the run does not break off */
    char *big = NULL;
    for (int i = 0; i < 2000; i++)
        sb_printf(&big, "{\"prompt\": \"Q%d: what helps a fever that lasts three days in a child who also has a "
                  "cough and a sore throat?\", \"chosen\": \"Rest, drink water, and see a doctor if the fever stays "
                  "high or the child seems very ill.\", \"rejected\": \"Nothing, ignore it.\"}\n", i);
    const char *data = t_tmp("big.jsonl");
    CHECK_OK(mb_write_file(data, big, strlen(big)));
    arrfree(big);
    const char *run3 = t_tmp("sigint3");
    snprintf(cmd, sizeof cmd, "%s dpo --model " FIX "/model --data %s --output %s --precompute_ref_log_probs "
             "--max_steps 1 --threads 1", t_medbot(), data, run3);
    pid = spawn(cmd, o, e);
    struct timespec start = {0, 500000000}; /* its handler is in place within milliseconds */
    nanosleep(&start, NULL);
    kill(pid, SIGINT);
    struct timespec ts = {1, 200000000};
    nanosleep(&ts, NULL);
    int early = waitpid(pid, &status, WNOHANG) == pid;
    if (!early) kill(pid, SIGINT), waitpid(pid, &status, 0);
    printf("    SIGINT, 1.2 s, SIGINT -> %s %d\n", WIFSIGNALED(status) ? "killed by signal" : "exit",
           WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    CHECK(!early, "still computing the reference after 1.2 s (else this checks nothing)");
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGINT, "stopped by the second SIGINT");
}

static void input_files_that_are_not_files_are_named(void) {
    char args[1024], path[512];
    const char *dir = t_tmp("kinds");
    mkdir(dir, 0755);
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s/o", dir, dir);
    t_expect_failure(args, "is a folder, not a regular file", NULL);
    snprintf(path, sizeof path, "%s/fifo.jsonl", dir);
    CHECK(mkfifo(path, 0600) == 0, "mkfifo");
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s/o", path, dir);
    t_expect_failure(args, "is a FIFO (named pipe), not a regular file", NULL);
    snprintf(path, sizeof path, "%s/loop.jsonl", dir);
    CHECK(symlink("loop.jsonl", path) == 0, "symlink");
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s/o", path, dir);
    t_expect_failure(args, "a loop of symbolic links", NULL);
    snprintf(args, sizeof args, "generate --model " FIX "/model --input %s --greedy", path);
    t_expect_failure(args, "a loop of symbolic links", NULL);
    snprintf(path, sizeof path, "%s/o", dir);
    CHECK(!mb_is_dir(path), "no output folder made");
    /* the model: a loop, a file, and a FIFO where its weights should be */
    snprintf(args, sizeof args, "generate --model %s/loop.jsonl --prompt hi", dir);
    t_expect_failure(args, "a loop of symbolic links", "model folder");
    t_expect_failure("generate --model " FIX "/data.jsonl --prompt hi", "is a file, not a folder", NULL);
    snprintf(path, sizeof path, "%s/m", dir);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/m/config.json", dir);
    CHECK_OK(mb_copy_file(FIX "/model/config.json", path));
    snprintf(path, sizeof path, "%s/m/model.safetensors", dir);
    CHECK(mkfifo(path, 0600) == 0, "mkfifo");
    snprintf(args, sizeof args, "generate --model %s/m --prompt hi", dir);
    t_expect_failure(args, "model.safetensors: is a FIFO (named pipe), not a regular file", NULL);
}

/* Writes a copy of the fixture model whose tensor `name` holds `bits` at element `at`. */
static void poisoned_model(const char *dir, const char *name, size_t at, uint32_t bits) {
    mkdir(dir, 0755);
    char p[512];
    snprintf(p, sizeof p, "%s/config.json", dir);
    CHECK_OK(mb_copy_file(FIX "/model/config.json", p));
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    CHECK_OK(mb_copy_file(FIX "/model/tokenizer.json", p));
    MbSafetensors *st = NULL;
    CHECK_OK(mb_safetensors_open(FIX "/model/model.safetensors", &st));
    if (!st) return;
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    size_t off = t ? (size_t)((const unsigned char *)t->data - st->maps[0].data) + at * 4 : 0;
    mb_safetensors_close(st);
    char *bytes = NULL;
    size_t n = 0;
    CHECK_OK(mb_read_file(FIX "/model/model.safetensors", &bytes, &n));
    CHECK(t && off + 4 <= n, "tensor %s", name);
    if (t && off + 4 <= n) memcpy(bytes + off, &bits, 4);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    CHECK_OK(mb_write_file(p, bytes, n));
    free(bytes);
}

static void nonfinite_weights_are_named_at_load(void) {
    /* the scan on a pool's threads finds the first bad value of a large tensor, whichever share it is in */
    size_t n = (size_t)3 << 20;
    uint16_t *b = mb_calloc(n, 2);
    for (size_t i = 0; i < n; i++) b[i] = 0x3f80; /* 1.0 in bf16 */
    MbTensorInfo t = {"big", MB_DT_BF16, 2, {n / 1024, 1024}, n, b, 2 * n, "big.safetensors"};
    MbPool *pool = mb_pool_new(3);
    CHECK_OK(tensor_check_finite(&t, "big.safetensors", pool));
    size_t at[3] = {n - 1, n / 2 + 7, 5};
    for (int k = 0; k < 3; k++) {
        b[at[k]] = k == 1 ? 0xff80 : 0x7fc1; /* -inf, NaN */
        MbStatus st = tensor_check_finite(&t, "big.safetensors", pool);
        char want[64];
        snprintf(want, sizeof want, "at [%zu, %zu]", at[k] / 1024, at[k] % 1024);
        CHECK(st == MB_ERR_FORMAT && strstr(mb_last_error(), want), "%s: %s", want, mb_last_error());
    }
    printf("    3M bf16 values on 3 threads: the first NaN/inf found in each share (%s)\n", mb_last_error());
    mb_pool_free(pool);
    free(b);

    const char *dir = t_tmp("nanmodel");
    poisoned_model(dir, "model.layers.1.self_attn.k_proj.weight", 64 * 3 + 5, 0x7fc00000u); /* NaN at [3, 5] */
    char args[1024];
    snprintf(args, sizeof args, "generate --model %s --prompt hi --greedy", dir);
    t_expect_failure(args, "tensor 'model.layers.1.self_attn.k_proj.weight' holds NaN at [3, 5]", "model.safetensors");
    snprintf(args, sizeof args, "dpo --model %s --data " FIX "/data.jsonl --output %s/o --load_in_4bit", dir, dir);
    t_expect_failure(args, "holds NaN at [3, 5]", "--> the file is damaged");
    const char *dir2 = t_tmp("infmodel");
    poisoned_model(dir2, "lm_head.weight", 0, 0xff800000u); /* -inf */
    snprintf(args, sizeof args, "eval --model %s --lora " FIX "/adapter_qk --data " FIX "/data.jsonl", dir2);
    t_expect_failure(args, "tensor 'lm_head.weight' holds inf at [0, 0]", NULL);
}

/* A bf16 copy of the fixture model whose every weight is a multiple of 1/64 (exact in bf16), with a
 * generation_config.json and no tokenizer; and an adapter on all seven projections (r 8, alpha 8:
 * scale 1) whose A and B hold -1/8, 0 and 1/8, so that B A is a multiple of 1/64 as well: the merged
 * bf16 weights are exactly W + B A, and the merged model computes what the base with the adapter
 * computes, to fp32 rounding. */
static void exact_merge_inputs(const char *base, const char *adapter) {
    mkdir(base, 0755);
    char p[512];
    snprintf(p, sizeof p, "%s/config.json", base);
    CHECK_OK(mb_copy_file(FIX "/model/config.json", p));
    snprintf(p, sizeof p, "%s/generation_config.json", base);
    const char *gen = "{\"bos_token_id\": 434, \"eos_token_id\": [435, 436]}\n";
    CHECK_OK(mb_write_file(p, gen, strlen(gen)));
    MbSafetensors *st = NULL;
    CHECK_OK(mb_safetensors_open(FIX "/model/model.safetensors", &st));
    if (!st) return;
    size_t n = mb_safetensors_count(st);
    MbTensorOut *ts = mb_calloc(n, sizeof *ts);
    for (size_t i = 0; i < n; i++) {
        const MbTensorInfo *t = mb_safetensors_at(st, i);
        float *f = mb_malloc(t->numel * sizeof(float));
        mb_convert_to_f32(t->dtype, t->data, f, t->numel);
        for (size_t k = 0; k < t->numel; k++) f[k] = fminf(fmaxf(roundf(f[k] * 64) / 64, -3.5f), 3.5f);
        void *b = mb_malloc(t->numel * 2);
        mb_convert_from_f32(MB_DT_BF16, f, b, t->numel);
        free(f);
        ts[i] = (MbTensorOut){t->name, MB_DT_BF16, t->ndim, {t->shape[0], t->shape[1]}, b};
    }
    snprintf(p, sizeof p, "%s/model.safetensors", base);
    CHECK_OK(mb_safetensors_write(p, ts, n, NULL));
    for (size_t i = 0; i < n; i++) free((void *)ts[i].data);
    free(ts);
    mb_safetensors_close(st);
    MbModel *m = NULL;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(base, &o, &m));
    if (!m) return;
    MbLoraConfig lc = {8, 8, 0, 0, 0};
    CHECK_OK(lora_parse_targets("all-linear", &lc.targets));
    MbLora *lo = NULL;
    CHECK_OK(mb_lora_new(m, &lc, 1, &lo));
    MbRng rng;
    mb_rng_seed(&rng, 9);
    float *h = mb_malloc(lo->n_params * sizeof(float));
    for (size_t i = 0; i < lo->n_params; i++) h[i] = 0.125f * (float)((int)(mb_rng_u64(&rng) % 3) - 1);
    lo->ops->from_host(lo->ops, lo->params, h, lo->n_params * sizeof(float));
    free(h);
    CHECK_OK(mb_lora_save(lo, adapter, base));
    mb_lora_free(lo);
    mb_model_free(m);
}

static void merged_folder_is_complete_and_generates_as_base_plus_adapter(void) {
    static char out[1 << 16], want[1 << 16], err[1024];
    char cmd[2048], p[512], q[512];
    const char *base = t_tmp("xbase"), *adapter = t_tmp("xadapter"), *merged = t_tmp("xmerged");
    exact_merge_inputs(base, adapter);
    /* no tokenizer in the base or the adapter: merge says how to make the folder complete */
    snprintf(cmd, sizeof cmd, "merge --model %s --lora %s --output %s", base, adapter, merged);
    t_expect_failure(cmd, "no tokenizer.json or tokenizer.model", "--tokenizer PATH");
    CHECK(!mb_is_dir(merged), "nothing written");
    snprintf(cmd, sizeof cmd, "%s merge --model %s --lora %s --output %s --tokenizer " FIX "/tokenizer_eot", t_medbot(),
             base, adapter, merged);
    CHECK(t_run(cmd, out, sizeof out) == 0, "merge: %s", out);
    /* config.json: the base's with dtype bfloat16; generation_config.json and the tokenizer copied */
    MbConfig cb, cm;
    snprintf(p, sizeof p, "%s/config.json", base);
    snprintf(q, sizeof q, "%s/config.json", merged);
    CHECK_OK(mb_config_load(p, &cb));
    CHECK_OK(mb_config_load(q, &cm));
    printf("    merged config.json: dtype %s (base: %s)\n", cm.torch_dtype, cb.torch_dtype);
    CHECK(!strcmp(cm.torch_dtype, "bfloat16"), "dtype bfloat16, got '%s'", cm.torch_dtype);
    memcpy(cm.torch_dtype, cb.torch_dtype, sizeof cm.torch_dtype);
    CHECK(!memcmp(&cb, &cm, sizeof cb), "every other setting kept");
    const char *copied[] = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"};
    for (int i = 0; i < 4; i++) {
        if (i) snprintf(p, sizeof p, FIX "/tokenizer_eot/%s", copied[i]);
        else snprintf(p, sizeof p, "%s/%s", base, copied[i]);
        snprintf(q, sizeof q, "%s/%s", merged, copied[i]);
        CHECK(t_files_equal(p, q), "%s copied", copied[i]);
    }
    /* the same stop ids */
    MbModel *mb = NULL, *mm = NULL;
    MbTokenizer *tok = NULL;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(base, &o, &mb));
    CHECK_OK(mb_model_load(merged, &o, &mm));
    CHECK_OK(mb_tokenizer_load(merged, &tok));
    if (mb && mm && tok) {
        MbGenerationConfig gb, gm;
        mb_generation_config_defaults(&gb), mb_generation_config_defaults(&gm);
        CHECK_OK(mb_generation_set_stop_ids(&gb, base, mb, tok));
        CHECK_OK(mb_generation_set_stop_ids(&gm, merged, mm, tok));
        CHECK(gb.n_stop_ids == gm.n_stop_ids && !memcmp(gb.stop_ids, gm.stop_ids, sizeof gb.stop_ids),
              "the same stop ids");
        printf("    stop ids: %d of them, equal to the base's\n", gm.n_stop_ids);
    }
    mb_tokenizer_free(tok), mb_model_free(mb), mb_model_free(mm);
    /* greedy answers: the merged folder with no extra flag == the base + the adapter */
    const char *prompts = t_tmp("prompts.jsonl");
    const char *text = "{\"question\": \"What helps a fever?\"}\n{\"question\": \"感冒了应该怎么办?\"}\n"
                       "{\"prompt\": \"Is aspirin safe for children?\"}\n{\"question\": \"hello\"}\n";
    CHECK_OK(mb_write_file(prompts, text, strlen(text)));
    snprintf(cmd, sizeof cmd, "%s generate --model %s --input %s --greedy --max_new_tokens 64", t_medbot(), merged, prompts);
    int rc = t_run(cmd, out, sizeof out);
    snprintf(cmd, sizeof cmd, "%s generate --model %s --lora %s --tokenizer " FIX "/tokenizer_eot --input %s --greedy "
             "--max_new_tokens 64", t_medbot(), base, adapter, prompts);
    int rc2 = t_run(cmd, want, sizeof want);
    CHECK(rc == 0 && rc2 == 0, "generate: %s %s", out, want);
    CHECK(!strcmp(out, want), "merged vs base + adapter:\n%s\n%s", out, want);
    int tokens = 0;
    for (const char *t = strstr(out, "\"tokens\": "); t; t = strstr(t + 1, "\"tokens\": ")) tokens += atoi(t + 10);
    printf("    4 prompts, %d greedy tokens: the merged folder (no flags) == base + adapter\n", tokens);
    /* a base saved 4-bit by bitsandbytes: the merged folder is dense bf16, without quantization_config */
    const char *m4 = t_tmp("m4");
    MbModel *q4 = NULL;
    CHECK_OK(mb_model_load("tests/fixtures/nf4/gqa4_nodq_4bit", &o, &q4));
    const char *a4 = t_tmp("a4");
    if (q4) {
        MbLoraConfig lc = {4, 8, 0, 0, (1u << MB_W_Q_PROJ) | (1u << MB_W_K_PROJ)};
        MbLora *lo = NULL;
        CHECK_OK(mb_lora_new(q4, &lc, 2, &lo));
        CHECK_OK(mb_lora_save(lo, a4, "tests/fixtures/nf4/gqa4_nodq_4bit"));
        mb_lora_free(lo);
        mb_model_free(q4);
    }
    snprintf(cmd, sizeof cmd, "%s merge --model tests/fixtures/nf4/gqa4_nodq_4bit --lora %s --output %s --tokenizer "
             "weights/llama3/tokenizer.model", t_medbot(), a4, m4);
    CHECK(t_run(cmd, out, sizeof out) == 0, "merge of a 4-bit base: %s", out);
    char *cfg = NULL;
    size_t n = 0;
    snprintf(p, sizeof p, "%s/config.json", m4);
    CHECK_OK(mb_read_file(p, &cfg, &n));
    CHECK(cfg && !strstr(cfg, "quantization_config") && strstr(cfg, "\"bfloat16\""), "dense bf16 config:\n%s", cfg);
    free(cfg);
    snprintf(cmd, sizeof cmd, "%s info %s", t_medbot(), m4);
    CHECK(t_run(cmd, out, sizeof out) == 0 && strstr(out, "BF16") && !strstr(out, "4-bit"), "info: %s", out);
    (void)err;
}

/* training.svg is drawn from the whole metrics.jsonl: after a resume (here with more steps) its
 * train, eval and learning-rate series cover every step logged, the ones before the resume too,
 * each point at its step and value. */
static void training_svg_after_a_resume_covers_every_step(void) {
    static char out[1 << 16];
    static double ms[64], mv[64], ss[64], sv[64];
    char cmd[2048], path[512];
    const char *run = t_tmp("chart");
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 3 --save_steps 3 --eval_split 0.25 --eval_steps 2");
    CHECK(t_run(cmd, out, sizeof out) == 0, "first run: %s", out);
    snprintf(path, sizeof path, "%s/training.svg", run);
    remove(path); /* the chart must come from the resumed run */
    dpo_cmd(cmd, sizeof cmd, run, "--max_steps 7 --save_steps 3 --eval_split 0.25 --eval_steps 2 --resume_from_checkpoint latest");
    CHECK(t_run(cmd, out, sizeof out) == 0 && strstr(out, "at step 3"), "resumed: %s", out);
    char *svg = NULL, metrics[512];
    size_t n = 0;
    CHECK_OK(mb_read_file(path, &svg, &n));
    snprintf(metrics, sizeof metrics, "%s/metrics.jsonl", run);
    const char *keys[] = {"loss", "eval_loss", "rewards/margins", "eval_rewards/margins", "rewards/accuracies",
                          "eval_rewards/accuracies", "learning_rate"};
    const char *want[] = {"1 2 3 4 5 6 7", "2 3 4 6 7"}; /* eval: every 2 steps and the last of each run */
    for (int k = 0; svg && k < 7; k++) {
        double range = 1, serr = 0, verr = 0;
        int nm = metric_points(metrics, keys[k], ms, mv, 64), ns = svg_points(svg, keys[k], ss, sv, 64, &range);
        char got[256] = "";
        for (int i = 0; i < ns && i < nm; i++) {
            snprintf(got + strlen(got), sizeof got - strlen(got), "%s%.0f", i ? " " : "", ss[i]);
            serr = fmax(serr, fabs(ss[i] - ms[i]));
            verr = fmax(verr, fabs(sv[i] - mv[i]) / range);
        }
        printf("    %-24s svg steps '%s' (|step err| %.3f, |value err| %.1e of the axis)\n", keys[k], got, serr, verr);
        CHECK(ns == nm && nm > 0, "%s: %d points in the chart, %d in metrics.jsonl", keys[k], ns, nm);
        CHECK(serr < 0.01 && verr < 1e-3, "%s: a point off its step or value", keys[k]);
        CHECK(!strcmp(got, want[strncmp(keys[k], "eval_", 5) == 0]), "%s: steps '%s', want '%s'", keys[k], got,
              want[strncmp(keys[k], "eval_", 5) == 0]);
    }
    CHECK(svg && strstr(svg, ">step</text>") && strstr(svg, "eval ") && strstr(svg, "train "), "axis title and legend");
    free(svg);
}

/* A value that was not finite (null in metrics.jsonl) is left out of its series, a series of one
 * point is drawn as a dot, SFT has loss and learning_rate panels only. */
static void training_svg_skips_null_values_and_draws_a_lone_point(void) {
    static double s[16], v[16], es[16];
    const char *run = t_tmp("chart_null");
    mkdir(run, 0755);
    char path[512];
    snprintf(path, sizeof path, "%s/metrics.jsonl", run);
    const char *text = "{\"step\": 1, \"learning_rate\": 0.001, \"loss\": 0.7, \"rewards/margins\": null}\n"
                       "{\"step\": 2, \"learning_rate\": 0.002, \"loss\": null, \"rewards/margins\": 0.5}\n"
                       "{\"step\": 2, \"eval_loss\": 0.6}\n"
                       "{\"step\": 3, \"learning_rate\": 0.001, \"loss\": 0.5, \"rewards/margins\": 0.25}\n"
                       "{\"step\": 4, \"lea";
    CHECK_OK(mb_write_file(path, text, strlen(text)));
    MbTrainer tr;
    memset(&tr, 0, sizeof tr);
    tr.output_dir = run;
    for (int sft = 0; sft < 2; sft++) {
        tr.sft = sft;
        CHECK_OK(write_svg(&tr));
        char *svg = NULL;
        size_t n = 0;
        snprintf(path, sizeof path, "%s/training.svg", run);
        CHECK_OK(mb_read_file(path, &svg, &n));
        if (!svg) continue;
        int nl = svg_points(svg, "loss", s, v, 16, NULL), ne = svg_points(svg, "eval_loss", es, v, 16, NULL);
        int nm = svg_points(svg, "rewards/margins", s, v, 16, NULL), nr = svg_points(svg, "learning_rate", s, v, 16, NULL);
        printf("    %s: points loss %d, eval_loss %d (at step %.2f), rewards/margins %d, learning_rate %d\n",
               sft ? "sft" : "dpo", nl, ne, ne == 1 ? es[0] : -1.0, nm, nr);
        CHECK(nl == 2 && ne == 1 && nr == 3, "loss skips its null, eval has its one point, the cut line is left out");
        CHECK(nm == (sft ? -1 : 2), "rewards/margins: %s", sft ? "no panel for sft" : "skips its null");
        CHECK(strstr(svg, "r=\"2.5\" fill=\"#ff7f0e\""), "the lone eval point is a dot");
        free(svg);
    }
}

/* mb_progress_print without a terminal (the test's stderr is a file): no bar, one line when a task
 * of a second or more ends, a line each 30 s of a long one, nothing for a short or failed task. */
static void progress_lines_when_output_is_a_file(void) {
    FILE *f = tmpfile();
    if (!f) {
        T_FAIL("tmpfile: %s", strerror(errno));
        return;
    }
    MbProgressLines where = {f, 1.0, 1}; /* lines only, also when the test runs on a terminal */
    MbProgressEvent ev = {.state = MB_PROGRESS_BEGIN, .task = "loading big", .unit = "bytes", .total = 16.1e9};
    mb_progress_print(&where, &ev);
    ev.state = MB_PROGRESS_STEP;
    for (int s = 1; s <= 95; s++) ev.seconds = s, ev.done = 16.1e9 * s / 100.0, mb_progress_print(&where, &ev);
    ev.state = MB_PROGRESS_END, ev.ok = 1, ev.done = 16.1e9, ev.seconds = 100;
    mb_progress_print(&where, &ev);
    MbProgressEvent quick = {.state = MB_PROGRESS_BEGIN, .task = "loading small", .unit = "bytes", .total = 1e6};
    mb_progress_print(&where, &quick);
    quick.state = MB_PROGRESS_END, quick.ok = 1, quick.done = 1e6, quick.seconds = 0.2;
    mb_progress_print(&where, &quick);
    MbProgressEvent bad = {.state = MB_PROGRESS_BEGIN, .task = "writing", .unit = "tensors", .total = 10};
    mb_progress_print(&where, &bad);
    bad.state = MB_PROGRESS_END, bad.ok = 0, bad.done = 3, bad.seconds = 5;
    mb_progress_print(&where, &bad);
    MbProgressEvent steps = {.state = MB_PROGRESS_BEGIN, .task = "training", .unit = "steps", .done = 12, .total = 36,
                             .start = 12}; /* resumed at step 12 */
    mb_progress_print(&where, &steps);
    steps.state = MB_PROGRESS_END, steps.ok = 1, steps.done = 36, steps.seconds = 12;
    mb_progress_print(&where, &steps);
    char text[2048] = "";
    rewind(f);
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = 0;
    fclose(f);
    printf("    lines written:\n%s", text);
    const char *want[] = {"loading big: 4.8 GB of 16.1 GB (30%), 161 MB/s, 1:10 left\n",
                          "loading big: 9.7 GB of 16.1 GB (60%), 161 MB/s, 0:40 left\n",
                          "loading big: 14.5 GB of 16.1 GB (90%), 161 MB/s, 0:10 left\n",
                          "loading big: 16.1 GB in 1:40, 161 MB/s\n", "training: 36 steps in 12.0 s, 2 steps/s\n"};
    const char *at = text;
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        const char *hit = strstr(at, want[i]);
        CHECK(hit == at, "line %zu: want '%.*s' next", i + 1, (int)strlen(want[i]) - 1, want[i]);
        if (hit) at = hit + strlen(want[i]);
    }
    CHECK(*at == 0 && !strchr(text, '\r') && !strchr(text, '\033'), "nothing else: no bar, no short or failed task");
}

MB_TEST_MAIN("output", T(merge_and_dpo_never_write_over_their_inputs), T(an_output_that_holds_a_run_needs_overwrite_or_resume),
             T(resume_removes_stale_temporaries_and_cuts_the_metrics), T(a_failed_run_leaves_nothing_and_parents_are_made),
             T(sigint_saves_a_checkpoint_and_prints_the_resume_command), T(input_files_that_are_not_files_are_named),
             T(nonfinite_weights_are_named_at_load), T(merged_folder_is_complete_and_generates_as_base_plus_adapter),
             T(training_svg_after_a_resume_covers_every_step), T(training_svg_skips_null_values_and_draws_a_lone_point),
             T(progress_lines_when_output_is_a_file))
