/* tests/test_vendor.c: medbot vendored into another program, as README's "Vendoring medbot" says.
 *  - medbot.c alone (a copy in an empty folder, nothing generated next to it) compiles with
 *    `cc -std=c99 -Wall -Wextra -Wpedantic -c medbot.c` and prints nothing;
 *  - tests/vendor/host.c, which compiles stb_ds's implementation itself, links with medbot.c built
 *    with -DMEDBOT_NO_MAIN -DMEDBOT_HOST_STB_DS under -Wall -Wextra -Werror, trains a DPO step,
 *    generates with the adapter, survives an error, and exits 0;
 *  - medbot.o defines no global symbol outside mb_ / Mb / MB_ (and none of stb_ds's: the host's). */
#include "test.h"

/* extra flags: the sanitizers when the suite runs under them */
static const char *san(void) {
    return t_sanitized() ? "-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
                         : "-O2";
}

static int vsh(const char *what, const char *cmd, char *out, size_t cap) {
    double t0 = mb_now();
    int rc = t_run(cmd, out, cap);
    printf("    %s: exit %d (%.1f s)%s%.2000s", what, rc, mb_now() - t0, out[0] ? "\n" : "", out);
    CHECK(rc == 0, "%s failed: %s", what, cmd);
    return rc == 0;
}

/* The folder a vendoring user has: the two files and nothing else */
static int vendor_folder(const char *dir) {
    char cmd[512], out[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s && mkdir -p %s && cp medbot.c medbot.h %s/", dir, dir, dir);
    return vsh("copy medbot.c medbot.h", cmd, out, sizeof out);
}

static void compiles_alone_without_warnings(void) {
    const char *dir = "build/vendor_alone";
    if (!vendor_folder(dir)) return;
    char cmd[1024];
    static char out[1 << 16];
    snprintf(cmd, sizeof cmd, "cd %s && %s -std=c99 -Wall -Wextra -Wpedantic -c medbot.c -o medbot.o", dir, t_cc());
    if (!vsh("cc -std=c99 -Wall -Wextra -Wpedantic -c medbot.c", cmd, out, sizeof out)) return;
    CHECK(out[0] == 0, "the compiler printed something (warnings): %.500s", out);
}

static void host_program_links_trains_and_generates(void) {
    const char *dir = "build/vendor";
    if (!vendor_folder(dir)) return;
    char cmd[2048];
    static char out[1 << 16];
    const char *warn = "-std=c99 -Wall -Wextra -Wpedantic -Werror";
    snprintf(cmd, sizeof cmd, "%s %s %s %s -DMEDBOT_NO_MAIN -DMEDBOT_HOST_STB_DS -c %s/medbot.c -o %s/medbot.o", t_cc(),
             warn, san(), t_stb_include(), dir, dir);
    if (!vsh("compile medbot.c (MEDBOT_NO_MAIN, MEDBOT_HOST_STB_DS)", cmd, out, sizeof out)) return;
    snprintf(cmd, sizeof cmd, "%s %s %s %s -I%s -c tests/vendor/host.c -o %s/host.o && %s %s -o %s/host %s/host.o %s/medbot.o "
             "-lm -lpthread -ldl", t_cc(), warn, san(), t_stb_include(), dir, dir, t_cc(), san(), dir, dir, dir);
    if (!vsh("compile and link the host", cmd, out, sizeof out)) return;

    /* symbols: medbot's globals are prefixed; stb_ds's implementation is the host's */
    snprintf(cmd, sizeof cmd, "nm -g --defined-only %s/medbot.o | awk '{print $3}'", dir);
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "%s: exit %d", cmd, rc);
    int n = 0, bad = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        const char *s = line[0] == '_' && !strncmp(line + 1, "mb", 2) ? line + 1 : line; /* macOS' leading _ */
        n++;
        if (strncmp(s, "mb_", 3) && strncmp(s, "Mb", 2) && strncmp(s, "MB_", 3)) {
            T_FAIL("medbot.o defines the unprefixed global '%s'", line);
            bad++;
        }
    }
    printf("    medbot.o: %d global symbols, %d unprefixed\n", n, bad);
    CHECK(n > 50, "nm listed only %d symbols", n);
    snprintf(cmd, sizeof cmd, "nm -g --defined-only %s/host.o | grep -c stbds_arrgrowf", dir);
    vsh("the host defines stbds_arrgrowf", cmd, out, sizeof out);

    snprintf(cmd, sizeof cmd, "%s/host weights/tiny weights/llama3/tokenizer.json weights/demo/pairs.jsonl %s/out", dir, dir);
    if (!vsh("run the host", cmd, out, sizeof out)) return;
    CHECK(strstr(out, "host: my stb_ds array holds 100 values"), "the host's stb_ds did not run");
    CHECK(strstr(out, "no-such-model-folder") && strstr(out, "host: trained one DPO step"),
          "the failed load was not reported and survived");
    CHECK(strstr(out, "host: done"), "the host did not finish");
    CHECK(!strstr(out, "Sanitizer"), "sanitizer report");
    FILE *f = fopen("build/vendor/out/adapter_model.safetensors", "rb");
    CHECK(f, "no adapter_model.safetensors in build/vendor/out");
    if (f) fclose(f);
}

MB_TEST_MAIN("vendor", T(compiles_alone_without_warnings), T(host_program_links_trains_and_generates))
