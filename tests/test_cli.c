/* tests/test_cli.c: the medbot binary ($MEDBOT_BIN, ./medbot by default) on good and bad input.
 * Bad input must give exactly one line on stderr that names the file and the problem, a
 * non-zero exit code, and no crash. */
#include "test.h"

static void sh(const char *fmt, const char *a, const char *b) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, fmt, a, b);
    if (system(cmd) != 0) T_FAIL("setup command failed: %s", cmd);
}

static void info_prints_the_model(void) {
    char cmd[512], out[8192];
    snprintf(cmd, sizeof cmd, "%s info tests/fixtures/llama/gqa4_bf16_sharded", t_medbot());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "exit %d: %s", rc, out);
    CHECK(strstr(out, "L=3 C=80 H=8 K=2 D=12 F=144 V=300"), "architecture line");
    CHECK(strstr(out, "llama3 scaling"), "rope");
    /* 300*80*2 (embed + lm_head) + 3 layers * (96*80 + 2*24*80 + 80*96 + 3*144*80 + 2*80) + 80 */
    size_t want = 300 * 80 * 2 + 3 * (96 * 80 + 2 * 24 * 80 + 80 * 96 + 3 * 144 * 80 + 2 * 80) + 80;
    char line[64];
    snprintf(line, sizeof line, "total %14zu", want);
    CHECK(strstr(out, "total") && strstr(out, line + 6), "total parameters %zu:\n%s", want, out);
    CHECK(strstr(out, "BF16"), "dtype table");
}

static void bad_input_missing_folder(void) {
    t_expect_failure("info /nonexistent/model", "/nonexistent/model", "no such folder");
}

static void bad_input_truncated_safetensors(void) {
    const char *w = t_tmp_root();
    sh("rm -rf %s/trunc && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/trunc", w, w);
    sh("truncate -s 100000 %s/trunc/model.safetensors%s", w, "");
    char args[300];
    snprintf(args, sizeof args, "info %s/trunc", w);
    t_expect_failure(args, "trunc/model.safetensors", "point past the end");
    sh("truncate -s 5 %s/trunc/model.safetensors%s", w, "");
    t_expect_failure(args, "trunc/model.safetensors", "too short");
}

/* Rewrites DIR/model.safetensors keeping the data, with one header field replaced. */
static void rewrite_header(const char *path, const char *from, const char *to) {
    MbMap m;
    if (mb_map_file(path, &m)) {
        T_FAIL("%s", mb_last_error());
        return;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | m.data[i];
    char *hdr = NULL;
    sb_printf(&hdr, "%.*s", (int)hlen, (const char *)m.data + 8);
    char *at = strstr(hdr, from);
    if (!at) {
        T_FAIL("'%s' not in the header", from);
        arrfree(hdr);
        mb_unmap(&m);
        return;
    }
    char *nh = NULL;
    sb_printf(&nh, "%.*s%s%s", (int)(at - hdr), hdr, to, at + strlen(from));
    size_t nlen = strlen(nh);
    while (nlen % 8) sb_printf(&nh, " "), nlen++;
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)nlen >> (8 * i));
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.new", path);
    FILE *f = fopen(tmp, "wb");
    fwrite(len, 1, 8, f);
    fwrite(nh, 1, nlen, f);
    fwrite(m.data + 8 + hlen, 1, m.size - 8 - hlen, f);
    fclose(f);
    mb_unmap(&m);
    rename(tmp, path);
    arrfree(hdr);
    arrfree(nh);
}

static void bad_input_offsets_past_the_end(void) {
    const char *w = t_tmp_root();
    sh("rm -rf %s/offs && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/offs", w, w);
    char path[300], args[300];
    snprintf(path, sizeof path, "%s/offs/model.safetensors", w);
    /* model.norm.weight (64 bf16, 128 bytes) moved far beyond the data */
    rewrite_header(path, "\"model.norm.weight\":{\"dtype\":\"BF16\",\"shape\":[64],\"data_offsets\":[",
                   "\"model.norm.weight\":{\"dtype\":\"BF16\",\"shape\":[64],\"data_offsets\":[99999872,99999999],\"x\":[");
    snprintf(args, sizeof args, "info %s/offs", w);
    t_expect_failure(args, "offs/model.safetensors", "model.norm.weight");
}

static void bad_input_shape_size_mismatch(void) {
    const char *w = t_tmp_root();
    char path[300], args[300];
    /* the header's shape disagrees with the byte range */
    sh("rm -rf %s/shape && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/shape", w, w);
    snprintf(path, sizeof path, "%s/shape/model.safetensors", w);
    rewrite_header(path, "\"model.norm.weight\":{\"dtype\":\"BF16\",\"shape\":[64]",
                   "\"model.norm.weight\":{\"dtype\":\"BF16\",\"shape\":[65]");
    snprintf(args, sizeof args, "info %s/shape", w);
    t_expect_failure(args, "shape/model.safetensors", "need 130");
    /* the tensor's shape disagrees with config.json */
    sh("rm -rf %s/cfgshape && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/cfgshape", w, w);
    sh("sed -i.bak 's/\"intermediate_size\": 128/\"intermediate_size\": 96/' %s/cfgshape/config.json%s", w, "");
    snprintf(args, sizeof args, "info %s/cfgshape", w);
    t_expect_failure(args, "cfgshape/model.safetensors", "config.json implies (96, 64)");
}

static void bad_input_config_without_required_field(void) {
    const char *w = t_tmp_root();
    sh("rm -rf %s/cfg && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/cfg", w, w);
    sh("sed -i.bak '/\"num_hidden_layers\"/d' %s/cfg/config.json%s", w, "");
    char args[300];
    snprintf(args, sizeof args, "info %s/cfg", w);
    t_expect_failure(args, "cfg/config.json", "\"num_hidden_layers\" is missing");
    sh("rm %s/cfg/config.json%s", w, "");
    t_expect_failure(args, "cfg/config.json", "cannot open");
}

static void bad_input_tensor_missing_from_a_shard(void) {
    const char *w = t_tmp_root();
    sh("rm -rf %s/shard && cp -r tests/fixtures/llama/gqa4_bf16_sharded %s/shard", w, w);
    /* the index sends lm_head.weight to a shard that does not hold it */
    sh("sed -i.bak 's/\"lm_head.weight\": \"model-0000[0-9]-of-00004.safetensors\"/\"lm_head.weight\": \"model-00002-of-00004.safetensors\"/' %s/shard/model.safetensors.index.json%s", w, "");
    char args[300];
    snprintf(args, sizeof args, "info %s/shard", w);
    t_expect_failure(args, "model.safetensors.index.json", "'lm_head.weight' is missing from shard");
    /* a shard file is gone */
    sh("rm -rf %s/shard2 && cp -r tests/fixtures/llama/gqa4_bf16_sharded %s/shard2", w, w);
    sh("rm %s/shard2/model-00003-of-00004.safetensors%s", w, "");
    snprintf(args, sizeof args, "info %s/shard2", w);
    t_expect_failure(args, "model-00003-of-00004.safetensors", "cannot open");
    /* config.json asks for more layers than the checkpoint has */
    sh("rm -rf %s/layers && cp -r tests/fixtures/llama/tied_mqa_bf16 %s/layers", w, w);
    sh("sed -i.bak 's/\"num_hidden_layers\": 2/\"num_hidden_layers\": 3/' %s/layers/config.json%s", w, "");
    snprintf(args, sizeof args, "info %s/layers", w);
    t_expect_failure(args, "layers", "'model.layers.2.input_layernorm.weight' is missing");
}

static void bad_input_unknown_command_and_option(void) {
    char cmd[300], out[4096];
    snprintf(cmd, sizeof cmd, "%s frobnicate", t_medbot());
    CHECK(t_run(cmd, out, sizeof out) == 2 && strstr(out, "unknown command"), "%s", out);
    t_expect_failure("info tests/fixtures/llama/gqa2_f32 --frob 1", "--frob", "unknown option");
}

MB_TEST_MAIN("cli", T(info_prints_the_model), T(bad_input_missing_folder), T(bad_input_truncated_safetensors),
             T(bad_input_offsets_past_the_end), T(bad_input_shape_size_mismatch),
             T(bad_input_config_without_required_field), T(bad_input_tensor_missing_from_a_shard),
             T(bad_input_unknown_command_and_option))
