/* tests/test.h: the test harness. Each tests/test_*.c includes medbot.c (so static functions
 * are reachable), defines its tests and ends with MB_TEST_MAIN(...). A test binary takes one
 * optional FILTER argument, runs the tests whose full name ("file/test") contains it, prints
 * one line per test and ends with "N passed, M failed"; the exit code is non-zero on failure.
 * Comparisons print their max error and the share of the tolerance it used. */
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

/* Runs a shell command; returns its exit status (-1 if it died from a signal) and captures
 * stdout+stderr (at most cap bytes) into out. */
MB_UNUSED static int t_run(const char *cmd, char *out, size_t cap) {
    char *full = NULL;
    sb_printf(&full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    arrfree(full);
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

MB_UNUSED static const char *t_medbot(void) {
    const char *b = getenv("MEDBOT_BIN");
    return b && b[0] ? b : "./medbot";
}

static int mb_test_main(int argc, char **argv, const char *file, const MbTest *tests, size_t n) {
    const char *filter = argc > 1 ? argv[1] : "";
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

#define MB_TEST_MAIN(file, ...)                                                              \
    int main(int argc, char **argv) {                                                        \
        static const MbTest tests_[] = {__VA_ARGS__};                                        \
        return mb_test_main(argc, argv, file, tests_, sizeof tests_ / sizeof *tests_);       \
    }
#define T(fn) {#fn, fn}
