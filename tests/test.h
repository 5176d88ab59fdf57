/* tests/test.h: the test harness. Each tests/test_*.c includes medbot.c (so static functions
 * are reachable), defines its tests and ends with MB_TEST_MAIN(...). A test binary takes one
 * optional FILTER argument, runs the tests whose full name ("file/test") contains it, prints
 * one line per test and ends with "N passed, M failed"; the exit code is non-zero on failure.
 * Comparisons print their max error and the share of the tolerance it used. */
#ifndef MB_TEST_H
#define MB_TEST_H
#define MEDBOT_NO_MAIN
#include "../medbot.c"

#include <sys/wait.h>

typedef struct {
    const char *name;
    void (*fn)(void);
} MbTest;

static int t_failures;          /* failed checks in the running test */
static const char *t_current;

#define T_FAIL(...)                                                                           \
    do {                                                                                      \
        printf("    FAIL %s:%d: ", __FILE__, __LINE__);                                       \
        printf(__VA_ARGS__);                                                                  \
        printf("\n");                                                                         \
        t_failures++;                                                                         \
    } while (0)

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) T_FAIL(__VA_ARGS__);                                                     \
    } while (0)

/* A call that must succeed: prints medbot's message if it does not. */
#define CHECK_OK(call)                                                                        \
    do {                                                                                      \
        MbStatus st_ = (call);                                                                \
        if (st_ != MB_OK) T_FAIL("%s returned %d: %s", #call, (int)st_, mb_last_error());    \
    } while (0)

/* max |got - ref| / max |ref| <= tol, over n values; NaN or inf never passes. */
MB_UNUSED static int t_close_rel(const char *what, const float *got, const float *ref, size_t n, double tol) {
    double maxerr = 0, maxref = 0;
    size_t worst = 0;
    int bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]) || !isfinite(ref[i])) {
            if (!bad) printf("    %s: non-finite value at %zu (got %g, ref %g)\n", what, i, got[i], ref[i]);
            bad = 1;
            continue;
        }
        double e = fabs((double)got[i] - (double)ref[i]);
        if (e > maxerr) maxerr = e, worst = i;
        maxref = fmax(maxref, fabs((double)ref[i]));
    }
    double rel = maxref > 0 ? maxerr / maxref : maxerr;
    printf("    %-48s max|err|/max|ref| %.3e (%5.1f%% of tol %.0e) at %zu\n", what, rel,
           100.0 * rel / tol, tol, worst);
    if (bad || !(rel <= tol)) {
        T_FAIL("%s: relative error %.3e over tolerance %.1e", what, rel, tol);
        return 0;
    }
    return 1;
}

/* Exact equality of n int32 values. */
MB_UNUSED static int t_equal_i32(const char *what, const int32_t *got, const int32_t *ref, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (got[i] != ref[i]) {
            T_FAIL("%s: first difference at %zu: got %d, want %d", what, i, (int)got[i], (int)ref[i]);
            return 0;
        }
    return 1;
}

/* Under the sanitizers the heaviest tests run a smaller subset. */
MB_UNUSED static int t_sanitized(void) {
    const char *s = getenv("MB_TEST_SANITIZE");
    return s && s[0] == '1';
}

/* Runs a shell command line as it is; returns its exit status (-1 if it died from a signal) and
 * captures its stdout (at most cap bytes) into out. */
MB_UNUSED static int t_run_sh(const char *full, char *out, size_t cap) {
    FILE *p = popen(full, "r");
    if (!p) return -2;
    size_t n = 0;
    int c;
    while ((c = fgetc(p)) != EOF)
        if (n + 1 < cap) out[n++] = (char)c;
    out[n] = 0;
    int status = pclose(p);
    if (status == -1) return -2;
    if (WIFSIGNALED(status)) return -1;
    return WEXITSTATUS(status);
}

/* Runs a shell command; returns its exit status (-1 if it died from a signal) and captures
 * stdout+stderr (at most cap bytes) into out. */
MB_UNUSED static int t_run(const char *cmd, char *out, size_t cap) {
    char *full = NULL;
    sb_printf(&full, "%s 2>&1", cmd);
    int rc = t_run_sh(full, out, cap);
    arrfree(full);
    return rc;
}

/* What a forked child wrote to fd (at most cap - 1 bytes, NUL-terminated; fd is closed), once it
 * ended: its exit status, or -1 when it did not exit normally. */
MB_UNUSED static int t_child_wait(pid_t pid, int fd, char *msg, size_t cap) {
    ssize_t k = read(fd, msg, cap - 1);
    msg[k > 0 ? k : 0] = 0;
    close(fd);
    int st;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The compiler and the stb include flag build.sh used ($MB_CC, $MB_STB_INCLUDE), for tests that
 * compile C themselves */
MB_UNUSED static const char *t_cc(void) {
    const char *c = getenv("MB_CC");
    return c && c[0] ? c : "cc";
}
MB_UNUSED static const char *t_stb_include(void) {
    const char *s = getenv("MB_STB_INCLUDE");
    return s ? s : "";
}

MB_UNUSED static const char *t_medbot(void) {
    const char *b = getenv("MEDBOT_BIN");
    return b && b[0] ? b : "./medbot";
}

/* Runs `medbot ARGS`, which must fail cleanly: a non-zero exit status (not a crash), one line on
 * stderr holding needle1 and needle2 (NULL: none), no sanitizer report. Its stdout is not looked
 * at: a run may have printed its settings (dpo, sft, eval) before it failed. Returns the status. */
MB_UNUSED static int t_expect_failure(const char *args, const char *needle1, const char *needle2) {
    char cmd[4096];
    static char out[8192];
    snprintf(cmd, sizeof cmd, "exec %s %s 2>&1 >/dev/null", t_medbot(), args); /* (exec: a crash shows) */
    int rc = t_run_sh(cmd, out, sizeof out);
    size_t lines = 0;
    for (char *p = out; *p; p++) lines += *p == '\n';
    printf("    $ medbot %.100s%s\n    -> exit %d: %s", args, strlen(args) > 100 ? "..." : "", rc, out);
    CHECK(rc > 0, "exit code %d: want a clean non-zero exit (not a crash)", rc);
    CHECK(lines == 1, "want one line on stderr, got %zu", lines);
    CHECK(strstr(out, needle1), "message should contain '%s'", needle1);
    CHECK(!needle2 || strstr(out, needle2), "message should contain '%s'", needle2);
    CHECK(!strstr(out, "Sanitizer"), "sanitizer report");
    return rc;
}

/* The medbot command line of a small DPO run on the DPO fixture model (a few ms a step) into out;
 * extra: more options (the last one given wins). */
MB_UNUSED static void t_dpo_cmd(char *cmd, size_t n, const char *out, const char *extra) {
    snprintf(cmd, n,
             "%s dpo --model tests/fixtures/dpo/model --data tests/fixtures/dpo/data.jsonl --output %s --lora "
             "tests/fixtures/dpo/adapter_qk --max_length 36 --max_prompt_length 24 --max_completion_length 20 "
             "--per_device_train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 1e-3 --lr_scheduler_type "
             "cosine --warmup_ratio 0.1 --lora_dropout 0.1 --seed 3 --threads 1 %s",
             t_medbot(), out, extra);
}

/* Backend buffers filled from host fp32 values: as bf16 activations (t_up_bf16) or as fp32
 * (t_up_f32); the caller frees them with ops->free. */
MB_UNUSED static void *t_up_bf16(MbOps *ops, const float *h, size_t n) {
    void *d = ops->alloc(ops, n * 2);
    uint16_t *b = mb_malloc(n * 2 + 2);
    mb_convert_from_f32(MB_DT_BF16, h, b, n);
    ops->from_host(ops, d, b, n * 2);
    free(b);
    return d;
}

MB_UNUSED static void *t_up_f32(MbOps *ops, const float *h, size_t n) {
    void *d = ops->alloc(ops, n * 4);
    ops->from_host(ops, d, h, n * 4);
    return d;
}

/* 1 when both files exist and hold the same bytes */
MB_UNUSED static int t_files_equal(const char *a, const char *b) {
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    int eq = !mb_read_file(a, &x, &nx) && !mb_read_file(b, &y, &ny) && nx == ny && !memcmp(x, y, nx);
    free(x), free(y);
    return eq;
}

/* ---- scratch files: /tmp/medbot-test-<suite>-<pid>, made on first use, removed at exit ---- */

static const char *t_suite = "test";
static char t_root[64];

static void t_remove_root(void) { mb_rmdir_r(t_root); }

/* the scratch folder itself */
MB_UNUSED static const char *t_tmp_root(void) {
    if (!t_root[0]) {
        snprintf(t_root, sizeof t_root, "/tmp/medbot-test-%s-%ld", t_suite, (long)getpid());
        mkdir(t_root, 0700);
        atexit(t_remove_root);
    }
    return t_root;
}

/* A path named `name` in the scratch folder, with nothing there yet (an earlier file or folder of
 * that name is removed); the last 8 paths returned stay valid. */
MB_UNUSED static const char *t_tmp(const char *name) {
    static char path[8][256];
    static int k;
    k = (k + 1) % 8;
    snprintf(path[k], sizeof path[k], "%s/%s", t_tmp_root(), name);
    if (mb_is_dir(path[k])) mb_rmdir_r(path[k]);
    else remove(path[k]);
    return path[k];
}

static int mb_test_main(int argc, char **argv, const char *file, const MbTest *tests, size_t n) {
    const char *filter = argc > 1 ? argv[1] : "";
    t_suite = file;
    /* the tests check the CPU backend against fp32 references: on a GPU machine too (a test that
     * wants another device says so explicitly) */
    setenv("MEDBOT_DEVICE", "cpu", 0);
    int passed = 0, failed = 0;
    for (size_t i = 0; i < n; i++) {
        char full[256];
        snprintf(full, sizeof full, "%s/%s", file, tests[i].name);
        if (filter[0] && !strstr(full, filter)) continue;
        t_failures = 0;
        t_current = full;
        printf("%s\n", full);
        fflush(stdout);
        double t0 = mb_now();
        tests[i].fn();
        double dt = mb_now() - t0;
        if (t_failures) {
            printf("FAIL %s (%.2fs)\n", full, dt);
            failed++;
        } else {
            printf("ok   %s (%.2fs)\n", full, dt);
            passed++;
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

/* Each test file's entry: its own main, or, in the one binary build.sh compiles from all the test
 * files together (build/tests.c: medbot.c compiled once per configuration), the function that
 * binary calls when it runs as build/test_FILE (a link to it). */
#ifndef MB_TEST_UNITY
#define MB_TEST_ENTRY main
#endif
#define MB_TEST_MAIN(file, ...)                                                              \
    int MB_TEST_ENTRY(int argc, char **argv) {                                               \
        static const MbTest tests_[] = {__VA_ARGS__};                                        \
        return mb_test_main(argc, argv, file, tests_, sizeof tests_ / sizeof *tests_);       \
    }
#define T(fn) {#fn, fn}
#endif /* MB_TEST_H */
