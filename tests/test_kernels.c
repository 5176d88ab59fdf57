/* tests/test_kernels.c: the CUDA kernel source compiles through NVRTC for every specialization
 * and architecture medbot targets (no GPU needed), and kernels.gen.h embeds the current source.
 * Runs where build.sh found the CUDA toolkit (MB_HAVE_NVRTC=1); CI sets MB_EXPECT_CUDA=1 so a
 * missing toolkit there is a failure, not a skip. */
#include "test.h"

static void gen_header_embeds_current_source(void) {
    char *src, *hdr;
    size_t n, hn;
    CHECK_OK(mb_read_file("kernels.cu.in", &src, &n));
    CHECK_OK(mb_read_file("kernels.gen.h", &hdr, &hn));
    if (!src || !hdr) return;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)src[i]) * 0x100000001b3ull;
    char want[64];
    snprintf(want, sizeof want, "#define MB_KERNELS_HASH \"%016llx\"", (unsigned long long)h);
    CHECK(strstr(hdr, want), "kernels.gen.h is stale: want %s", want);
    free(src);
    free(hdr);
}

static void nvrtc_compiles_every_specialization(void) {
    const char *have = getenv("MB_HAVE_NVRTC"), *expect = getenv("MB_EXPECT_CUDA");
    if (!have || strcmp(have, "1")) {
        if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_CUDA=1 but build.sh found no CUDA toolkit");
        else printf("    no CUDA toolkit found by build.sh: NVRTC compile check not run on this machine\n");
        return;
    }
    static char out[1 << 20];
    int rc = t_run("build/gen_kernels --check sm_80 sm_86 sm_89 sm_90", out, sizeof out);
    const char *last = out, *p;
    for (p = out; *p; p++)
        if (*p == '\n' && p[1]) last = p + 1;
    printf("    %s", last);
    CHECK(rc == 0, "gen_kernels --check failed (exit %d):\n%s", rc, out);
    CHECK(strstr(out, "specializations compiled") && !strstr(out, "FAILED"), "%s", out);
}

/* The NCCL backend of the coordinator (section 11) compiles and links against the toolkit's NCCL
 * and CUDA runtime, warning-free (-DMEDBOT_NCCL). */
static void nccl_backend_compiles_and_links(void) {
    const char *have = getenv("MB_HAVE_NVRTC"), *expect = getenv("MB_EXPECT_CUDA"), *cuda = getenv("MB_CUDA_DIR"),
               *lib = getenv("MB_CUDA_LIB"), *cc = getenv("MB_CC"), *inc = getenv("MB_STB_INCLUDE");
    if (!have || strcmp(have, "1") || !cuda || !cuda[0]) {
        if (expect && !strcmp(expect, "1")) T_FAIL("MB_EXPECT_CUDA=1 but build.sh found no CUDA toolkit");
        else printf("    no CUDA toolkit found by build.sh: NCCL compile check not run on this machine\n");
        return;
    }
    char cmd[2048];
    static char out[1 << 16];
    snprintf(cmd, sizeof cmd,
             "%s -std=c99 -Wall -Wextra -Wpedantic -Werror -O1 -DMEDBOT_NCCL %s -isystem %s/include -o build/medbot_nccl "
             "medbot.c -L%s -Wl,-rpath,%s -lnccl -lcudart -lm -lpthread",
             cc && cc[0] ? cc : "cc", inc ? inc : "", cuda, lib, lib);
    int rc = t_run(cmd, out, sizeof out);
    printf("    %s\n    -> exit %d%s%s\n", cmd, rc, out[0] ? ": " : "", out);
    CHECK(rc == 0, "the NCCL build failed");
    CHECK(mb_is_file("build/medbot_nccl"), "binary written");
}

MB_TEST_MAIN("kernels", T(gen_header_embeds_current_source), T(nvrtc_compiles_every_specialization),
             T(nccl_backend_compiles_and_links))
