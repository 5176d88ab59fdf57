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

MB_TEST_MAIN("kernels", T(gen_header_embeds_current_source), T(nvrtc_compiles_every_specialization))
