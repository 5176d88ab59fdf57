/* tests/test_cli.c: the medbot binary ($MEDBOT_BIN, ./medbot by default) on good and bad input.
 * Bad input must give exactly one line on stderr that names the file and the problem, a
 * non-zero exit code, and no crash. */
#include "test.h"

#define FIX "tests/fixtures/dpo"

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

/* ---- --config: the YAML subset (mb_kv_parse) ---- */

/* Parses text as "t.yaml" and compares with the entries "key=value;key=value;" (NULL: it must fail
 * with "t.yaml:LINE: " and the needle). */
static void kv_case(const char *text, size_t n, const char *want, int line, const char *needle) {
    MbKv *kv = NULL;
    size_t count = 0;
    MbStatus rc = mb_kv_parse("t.yaml", text, n, &kv, &count);
    char got[512] = "", prefix[32];
    for (size_t i = 0; i < count; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s=%s;", kv[i].key, kv[i].value);
    mb_kv_free(kv, count);
    if (want) {
        CHECK(!rc && !strcmp(got, want), "%s: want '%s', got '%s' (%s)", text, want, got, rc ? mb_last_error() : "ok");
        return;
    }
    snprintf(prefix, sizeof prefix, "t.yaml:%d: ", line);
    printf("    %-34.*s -> %s\n", (int)strcspn(text, "\n"), text, rc ? mb_last_error() : "accepted");
    CHECK(rc == MB_ERR_FORMAT && !kv && !count && !strncmp(mb_last_error(), prefix, strlen(prefix)) &&
              strstr(mb_last_error(), needle) && !strchr(mb_last_error(), '\n'),
          "want '%s...%s'", prefix, needle);
}
#define KV_OK(text, want) kv_case(text, sizeof text - 1, want, 0, NULL)
#define KV_BAD(text, line, needle) kv_case(text, sizeof text - 1, NULL, line, needle)

static void config_reader_takes_the_yaml_subset(void) {
    /* lists below their key (any indentation, compact too) and on one line give the same value */
    KV_OK("target_modules:\n  - q_proj\n  - k_proj\n", "target_modules=q_proj,k_proj;");
    KV_OK("target_modules:\n- q_proj\n- \"k_proj\" # c\nr: 8\n", "target_modules=q_proj,k_proj;r=8;");
    KV_OK("target_modules: [q_proj, 'k_proj', \"v_proj\",]\n", "target_modules=q_proj,k_proj,v_proj;");
    KV_OK("a: []\nb:\nc: # nothing\n", "a=;b=;c=;");
    /* comments only outside quotes, and only after a blank */
    KV_OK("output_dir: \"out # not a comment\" # a comment\nx: a#b # c\n# whole line\n", "output_dir=out # not a comment;x=a#b;");
    KV_OK("s: 'it''s'\nd: \"tab\\there \\u00e9 \\\"q\\\" \\\\\"\n", "s=it's;d=tab\there \xc3\xa9 \"q\" \\;");
    /* a UTF-8 BOM, a leading ---, CRLF and CR line ends, the card's fences, blank lines, tabs after ':' */
    KV_OK("\xef\xbb\xbf--- # doc\r\n```yaml\r\nbeta:\t0.1\r\n\r\n```\rlr: 5e-6\r", "beta=0.1;lr=5e-6;");
    KV_OK("\"quoted key\": v\nurl: http://x/y\ntrainable_params: ~54MB # the card\n-1: minus\n",
          "quoted key=v;url=http://x/y;trainable_params=~54MB;-1=minus;");
    KV_OK("", "");
    /* the card's file as committed */
    char *text = NULL;
    size_t n = 0;
    MbKv *kv = NULL;
    size_t count = 0;
    CHECK_OK(mb_read_file("weights/dpo_card.yaml", &text, &n));
    CHECK_OK(mb_kv_parse("weights/dpo_card.yaml", text, n, &kv, &count));
    CHECK(count == 23 && !strcmp(kv[count - 3].key, "target_modules") && !strcmp(kv[count - 3].value, "q_proj,k_proj") &&
              kv[0].line == 5,
          "the card: %zu settings", count);
    mb_kv_free(kv, count);
    free(text);
}

static void config_reader_refuses_other_yaml(void) {
    KV_BAD("a: 1\nlora:\n  r: 8\n", 3, "nested mappings");
    KV_BAD("x: &anchor 1\n", 1, "anchors");
    KV_BAD("x: 1\ny: *anchor\n", 2, "aliases");
    KV_BAD("x: !!float 1\n", 1, "tags");
    KV_BAD("x: |\n  text\n", 1, "multi-line values");
    KV_BAD("x: >\n  text\n", 1, "multi-line values");
    KV_BAD("x: plain\n  continued\n", 2, "values over several lines");
    KV_BAD("x: 1\n---\ny: 2\n", 2, "a second document");
    KV_BAD("x: {a: 1}\n", 1, "flow mappings");
    KV_BAD("x: [a, {b: 1}]\n", 1, "nested lists and mappings");
    KV_BAD("x: [a, [b]]\n", 1, "nested lists and mappings");
    KV_BAD("x:\n\t- a\n", 2, "a tab in the indentation");
    KV_BAD("beta: 0.1\nr: 4\nbeta: 0.2\n", 3, "duplicate key 'beta' (first at line 1)");
    KV_BAD("- q_proj\n", 1, "a list item with no key above it");
    KV_BAD("r: 8\n  - q_proj\n", 2, "a list item with no key above it");
    KV_BAD("x:\n  - a\n    - b\n", 3, "list items at different indentations");
    KV_BAD("x:\n  - a: 1\n", 2, "nested mappings");
    KV_BAD("x:\n  - - a\n", 2, "nested lists");
    KV_BAD("x:\n  -\n", 2, "an empty list item");
    KV_BAD("x: \"abc\n", 1, "unterminated double-quoted value");
    KV_BAD("x: 'abc\n", 1, "unterminated single-quoted value");
    KV_BAD("x: [a, b\n", 1, "unterminated '['");
    KV_BAD("x: [a,, b]\n", 1, "an empty item");
    KV_BAD("x: \"a\\nb\"\n", 1, "unsupported escape");
    KV_BAD("x: \"a\" b\n", 1, "after the value");
    KV_BAD("x: a: b\n", 1, "nested mappings");
    KV_BAD("x:\n  - \"a,b\"\n", 2, "a list item holds a comma");
    KV_BAD("? x\n: y\n", 1, "complex keys");
    KV_BAD("%YAML 1.2\n---\n", 1, "directives");
    KV_BAD("x: 1\n...\n", 2, "document end marker");
    KV_BAD("x: @a\n", 1, "reserved");
    KV_BAD("just text\n", 1, "expected 'key: value'");
    KV_BAD("x: a\x01\n", 1, "a control character");
    KV_BAD("x: \xff\n", 1, "invalid UTF-8");
    KV_BAD("\xff\xfex\0:\0 \0""1\0", 1, "the file is UTF-16 (little-endian) --> save it as UTF-8");
    KV_BAD("\0x\0:\0 \0""1", 1, "the file is UTF-16 (big-endian)");
    /* through the command line: one line naming FILE:LINE, nothing written */
    const char *y = t_tmp("anchor.yaml"), *out = t_tmp("cfgout");
    CHECK_OK(mb_write_file(y, "beta: 0.1\nlearning_rate: &lr 1e-5\n", 34));
    char args[600];
    snprintf(args, sizeof args, "dpo --config %s --model M --data D --output %s", y, out);
    t_expect_failure(args, "anchor.yaml:2: anchors (&name) are not supported", NULL);
    CHECK(!mb_is_dir(out), "no output folder");
    CHECK_OK(mb_write_file(y, "r: 8\nlora_r: 16\n", 16));
    t_expect_failure(args, "anchor.yaml:2: 'lora_r' sets lora_r, as 'r' of line 1 does", NULL);
}

/* ---- option values ---- */

static void option_values_are_range_checked(void) {
    const char *out = t_tmp("rangeout");
    char args[800];
    /* dpo and sft: each refused before anything is loaded or written */
    const char *train[][2] = {
        {"--learning_rate nan", "dpo: --learning_rate needs a finite decimal number, got 'nan'"},
        {"--learning_rate inf", "--learning_rate needs a finite decimal number, got 'inf'"},
        {"--learning_rate 0x1p-3", "--learning_rate needs a finite decimal number, got '0x1p-3'"},
        {"--learning_rate 1e400", "--learning_rate is out of range, got 1e400"},
        {"--learning_rate -1e-5", "--learning_rate must be >= 0, got -1e-05"},
        {"--adam_beta1 1.5", "dpo: --adam_beta1 must be in [0, 1), got 1.5"},
        {"--adam_beta2 1", "--adam_beta2 must be in [0, 1), got 1"},
        {"--adam_epsilon -1", "--adam_epsilon must be >= 0"},
        {"--weight_decay -0.1", "--weight_decay must be >= 0"},
        {"--max_grad_norm -1", "--max_grad_norm must be >= 0"},
        {"--beta 0", "--beta must be > 0, got 0"},
        {"--label_smoothing 0.6", "--label_smoothing must be in [0, 0.5], got 0.6"},
        {"--loss_type robust --label_smoothing 0.5", "--label_smoothing must be < 0.5 with the robust loss"},
        {"--warmup_ratio 1.5", "--warmup_ratio must be in [0, 1], got 1.5"},
        {"--warmup_steps -1", "--warmup_steps must be >= 0"},
        {"--num_train_epochs 0", "--num_train_epochs must be > 0 (or max_steps >= 1), got 0"},
        {"--max_steps 0", "--max_steps must be -1 or >= 1, got 0"},
        {"--max_steps 3000000000", "--max_steps is out of range, got 3000000000"},
        {"--max_steps 2.5", "--max_steps needs an integer, got '2.5'"},
        {"--max_length 0", "--max_length must be >= 1, got 0"},
        {"--max_prompt_length 0", "--max_prompt_length must be >= 1"},
        {"--max_completion_length -1", "--max_completion_length must be >= 0"},
        {"--per_device_train_batch_size 0", "--per_device_train_batch_size must be >= 1"},
        {"--per_device_eval_batch_size 0", "--per_device_eval_batch_size must be >= 1"},
        {"--gradient_accumulation_steps 0", "--gradient_accumulation_steps must be >= 1"},
        {"--lora_r 0", "--lora_r must be >= 1, got 0"},
        {"--lora_alpha 0", "--lora_alpha must be > 0, got 0"},
        {"--lora_dropout 1", "--lora_dropout must be in [0, 1), got 1"},
        {"--eval_split 1", "--eval_split must be in [0, 1), got 1"},
        {"--eval_split -0.1", "--eval_split must be in [0, 1)"},
        {"--logging_steps -1", "--logging_steps must be >= 0"},
        {"--save_steps -1", "--save_steps must be >= 0"},
        {"--eval_steps -1", "--eval_steps must be >= 0"},
        {"--seed -1", "--seed must be >= 0, got -1"},
        {"--threads -1", "--threads must be >= 0"},
        {"--nproc 0", "--nproc must be >= 1, got 0"},
        {"--gpu -1", "--gpu must be >= 0"},
        {"--ddp_timeout -1", "--ddp_timeout must be in [0, 1000000]"},
        {"--ddp_timeout nan", "--ddp_timeout needs a finite decimal number"},
    };
    for (size_t i = 0; i < sizeof train / sizeof *train; i++) {
        snprintf(args, sizeof args, "dpo --model M --data D --output %s %s", out, train[i][0]);
        t_expect_failure(args, train[i][1], NULL);
        CHECK(!mb_is_dir(out), "%s: no output folder", train[i][0]);
    }
    snprintf(args, sizeof args, "sft --model M --data D --output %s --lora_dropout nan", out);
    t_expect_failure(args, "sft: --lora_dropout needs a finite decimal number", NULL);
    t_expect_failure("eval --model M --lora L --data D --beta -1", "eval: --beta must be > 0", NULL);
    /* a value from the config file is named by its file, line and key */
    const char *y = t_tmp("range.yaml");
    CHECK_OK(mb_write_file(y, "beta: 0.1\nadam_beta1: 1.5\nr: 0\n", 31));
    snprintf(args, sizeof args, "dpo --config %s --model M --data D --output %s", y, out);
    t_expect_failure(args, "range.yaml:2: adam_beta1 must be in [0, 1), got 1.5", NULL);
    snprintf(args, sizeof args, "dpo --config %s --model M --data D --output %s --adam_beta1 0.9", y, out);
    t_expect_failure(args, "range.yaml:3: r must be >= 1, got 0", NULL);
    CHECK_OK(mb_write_file(y, "learning_rate: .nan\n", 20));
    snprintf(args, sizeof args, "dpo --config %s --model M --data D --output %s", y, out);
    t_expect_failure(args, "range.yaml:1: learning_rate needs a finite decimal number, got '.nan'", NULL);
    CHECK(!mb_is_dir(out), "no output folder");
    /* generate and chat (refused before the model loads), info --plan, init, merge */
    const char *other[][2] = {
        {"generate --model M --prompt hi --max_new_tokens 0", "generate: --max_new_tokens must be >= 1, got 0"},
        {"generate --model M --prompt hi --temperature 0", "generate: --temperature must be > 0, got 0"},
        {"generate --model M --prompt hi --temperature inf", "--temperature needs a finite decimal number"},
        {"generate --model M --prompt hi --top_p 1.01", "--top_p must be in [0, 1], got 1.01"},
        {"generate --model M --prompt hi --top_k -1", "--top_k must be >= 0"},
        {"generate --model M --prompt hi --repetition_penalty 0", "--repetition_penalty must be > 0"},
        {"generate --model M --prompt hi --no_repeat_ngram_size -1", "--no_repeat_ngram_size must be >= 0"},
        {"generate --model M --prompt hi --max_context 0", "--max_context must be >= 1, got 0"},
        {"generate --model M --prompt hi --threads -2", "--threads must be >= 0"},
        {"chat --model M --seed -1", "chat: --seed must be >= 0, got -1"},
        {"chat --model M --top_p nan", "chat: --top_p needs a finite decimal number"},
        {"info weights/llama-3.1-8b --plan --lora_r 0", "info: --lora_r must be >= 1, got 0"},
        {"info weights/llama-3.1-8b --plan --lora_alpha -8", "info: --lora_alpha must be > 0"},
        {"info weights/llama-3.1-8b --plan --gpus 0", "info: --gpus must be >= 1"},
        {"info weights/llama-3.1-8b --plan --max_length 0", "info: --max_length must be >= 1"},
        {"info weights/llama-3.1-8b --plan --zero_stage 3", "info: --zero_stage must be 0, 1 or 2"},
        {"info weights/llama-3.1-8b --threads -1", "info: --threads must be >= 0"},
        {"init --config weights/tiny/config.json --output O --std 0", "init: --std must be > 0, got 0"},
        {"init --config weights/tiny/config.json --output O --std nan", "init: --std needs a finite decimal number"},
        {"init --config weights/tiny/config.json --output O --seed -1", "init: --seed must be >= 0"},
        {"init --config weights/tiny/config.json --output O --max_shard_size 5GiB",
         "init: --max_shard_size: '5GiB' is not a size"},
        {"merge --model M --lora L --output O --threads -1", "merge: --threads must be >= 0"},
    };
    for (size_t i = 0; i < sizeof other / sizeof *other; i++) t_expect_failure(other[i][0], other[i][1], NULL);
}

/* The library's own checks: every number of the training table, out of its range, is named by
 * train_job_invalid and refused by mb_train before it writes anything; the sampler's and
 * mb_model_init_random's too. */
static void library_entry_points_check_ranges(void) {
    size_t named = 0, nr = sizeof mb_train_ranges / sizeof *mb_train_ranges;
    char why[160];
    for (size_t i = 0; i < nr; i++) {
        const MbRange *r = &mb_train_ranges[i];
        double bad[3] = {r->lo - 1, isinf(r->hi) ? NAN : r->hi + 1, r->open & MB_LO_OPEN ? r->lo : NAN};
        for (int k = 0; k < 3; k++) {
            if (r->is_int && isnan(bad[k])) continue;
            MbTrainJob job;
            memset(&job, 0, sizeof job);
            mb_train_config_defaults(&job.cfg);
            char *p = (char *)&job + r->off;
            if (r->is_int) *(int *)(void *)p = (int)bad[k];
            else *(double *)(void *)p = bad[k];
            const char *name = train_job_invalid(&job, why, sizeof why);
            CHECK(name && !strcmp(name, r->name) && strstr(why, "must be"), "%s = %g: got %s %s", r->name, bad[k],
                  name ? name : "(accepted)", name ? why : "");
            named += name && !strcmp(name, r->name);
        }
    }
    printf("    %zu settings: %zu values outside their ranges named\n", nr, named);
    MbTrainJob job;
    memset(&job, 0, sizeof job);
    mb_train_config_defaults(&job.cfg);
    CHECK(!train_job_invalid(&job, why, sizeof why), "the defaults are valid: %s", why);
    job.model_dir = "tests/fixtures/dpo/model", job.data_path = "tests/fixtures/dpo/data.jsonl";
    job.output_dir = t_tmp("libout");
    job.cfg.learning_rate = NAN;
    CHECK(mb_train(&job) == MB_ERR_ARG && !strcmp(mb_last_error(), "mb_train: learning_rate must be a finite number, got nan"),
          "%s", mb_last_error());
    CHECK(!mb_is_dir(job.output_dir), "mb_train wrote nothing");
    job.cfg.learning_rate = 1e-5, job.cfg.lora.dropout = 1.0;
    CHECK(mb_evaluate(&job) == MB_ERR_ARG && strstr(mb_last_error(), "mb_evaluate: lora_dropout must be in [0, 1), got 1"),
          "%s", mb_last_error());
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.temperature = INFINITY;
    MbSampler *s = NULL;
    CHECK(mb_sampler_new(&g, 10, &s) == MB_ERR_ARG && !s && strstr(mb_last_error(), "temperature must be a finite number"),
          "%s", mb_last_error());
    g.temperature = 0.7, g.top_p = NAN;
    CHECK(mb_sampler_new(&g, 10, &s) == MB_ERR_ARG && strstr(mb_last_error(), "top_p must be a finite number"), "%s",
          mb_last_error());
    CHECK(mb_model_init_random("weights/tiny/config.json", t_tmp_root(), &(MbInitOptions){.dtype = MB_DT_BF16, .std = NAN}) == MB_ERR_ARG &&
              strstr(mb_last_error(), "std must be a finite number"),
          "%s", mb_last_error());
}

/* ---- every option a command reads is in its table, and its --help shows the whole table ---- */

/* 1 when text holds "--name" as a whole option (followed by a blank, '=', or the line's end). */
static int has_option(const char *text, const char *name) {
    size_t n = strlen(name);
    for (const char *p = strstr(text, "--"); p; p = strstr(p + 2, "--"))
        if (!strncmp(p + 2, name, n) && (p[2 + n] == ' ' || p[2 + n] == '\n' || p[2 + n] == '=' || !p[2 + n]) &&
            (p == text || p[-1] == ' ' || p[-1] == '\n' || p[-1] == '['))
            return 1;
    return 0;
}

static void help_shows_every_option_of_the_table(void) {
    static char out[1 << 16];
    char cmd[256];
    size_t ncmd = sizeof mb_cli_commands / sizeof *mb_cli_commands, total = 0;
    for (size_t i = 0; i < ncmd; i++) {
        const MbCliCommand *c = &mb_cli_commands[i];
        snprintf(cmd, sizeof cmd, "%s %s --help", t_medbot(), c->name);
        int rc = t_run(cmd, out, sizeof out);
        CHECK(rc == 0 && !strncmp(out, "usage: medbot ", 14), "%s --help: exit %d: %.200s", c->name, rc, out);
        size_t n = 0;
        for (int s = 0; s < MB_CLI_SECTIONS && c->sections[s].opts; s++)
            for (const MbOpt *o = c->sections[s].opts; o->name; o++, n++) {
                CHECK(has_option(out, o->name), "medbot %s --help does not show --%s", c->name, o->name);
                CHECK(cli_option(c, o->name) == o, "%s: --%s is in its table twice", c->name, o->name);
                CHECK(o->help && o->help[0], "%s: --%s has no help", c->name, o->name);
            }
        for (const char *line = out; *line;) { /* readable in a 100-column terminal */
            size_t len = strcspn(line, "\n");
            CHECK(len <= 100, "%s --help: a line of %zu columns: %.*s", c->name, len, (int)len, line);
            line += len + (line[len] == '\n');
        }
        CHECK(n > 0 && strlen(out) + 1 < sizeof out, "%s: %zu options, %zu bytes of help", c->name, n, strlen(out));
        total += n;
    }
    /* the overview names every command; an unknown one has no table */
    int rc = t_run("./medbot --help", out, sizeof out);
    for (size_t i = 0; i < ncmd; i++) {
        snprintf(cmd, sizeof cmd, "medbot %s ", mb_cli_commands[i].name);
        CHECK(rc == 0 && strstr(out, cmd), "medbot --help: no '%s'", cmd);
    }
    CHECK(!cli_command("frobnicate") && !cli_option(cli_command("dpo"), "frobnicate"), "no table for unknown names");
    /* the cases */
    CHECK(cli_option(cli_command("dpo"), "load_in_4bit") && cli_option(cli_command("dpo"), "bnb_4bit_compute_dtype") &&
              cli_option(cli_command("eval"), "tokenizer") && cli_option(cli_command("generate"), "random_init") &&
              cli_option(cli_command("chat"), "random_init"),
          "dpo's 4-bit options, eval's --tokenizer, generate's and chat's --random_init");
    printf("    %zu commands, %zu options: each in its command's --help\n", ncmd, total);
}

static int ident_char(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* The names medbot.c reads options by: the string after arg_xxx(args, in the CLI's source. Each must
 * be an option of some command's table (at run time a command may read only its own: see below). */
static void every_option_the_source_reads_is_declared(void) {
    char *src = NULL;
    size_t n = 0, found = 0;
    CHECK_OK(mb_read_file("medbot.c", &src, &n));
    if (!src) return;
    const char *cli = strstr(src, "// ---------- 13. cli ----------");
    CHECK(cli != NULL, "medbot.c has no CLI section");
    for (const char *p = cli ? cli : src; (p = strstr(p, "arg_")); p += 4) {
        if (p > src && ident_char(p[-1])) continue; /* (not xarg_) */
        const char *q = p + 4;
        while (ident_char(*q)) q++;
        if (*q != '(') continue;
        q += strcspn(q, ",;)\n");
        if (*q != ',') continue; /* the call's first argument, then the name */
        while (*++q == ' ') {}
        if (*q != '"') continue;
        size_t len = strcspn(q + 1, "\"");
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)len, q + 1);
        int declared = 0;
        for (size_t i = 0; i < sizeof mb_cli_commands / sizeof *mb_cli_commands; i++)
            declared |= cli_option(&mb_cli_commands[i], name) != NULL;
        CHECK(declared, "medbot.c reads --%s (%.*s), which no command's table declares", name, (int)(q - p + len + 2), p);
        found++;
    }
    free(src);
    CHECK(found > 100, "only %zu option reads found in medbot.c: has the CLI's style changed?", found);
    printf("    %zu option reads in medbot.c's CLI, each of a declared option\n", found);
}

/* A value for an option from its placeholder: the first of a|b|c, a path for a file or folder, a
 * number, or the word itself (nf4, none). */
static const char *sample_value(const MbOpt *o, char *buf, size_t cap) {
    const char *v = o->value;
    if (strchr(v, '|')) snprintf(buf, cap, "%.*s", (int)strcspn(v, "|"), v);
    else snprintf(buf, cap, "%s", v);
    if (!strcmp(buf, "N") || !strcmp(buf, "S")) return "1";
    if (!strcmp(buf, "X")) return "0.25";
    if (!strcmp(buf, "TEXT")) return "x";
    if (!strcmp(buf, "LIST")) return "q_proj";
    if (strstr(buf, "DIR") || strstr(buf, "PATH") || strstr(buf, "FILE") || strstr(buf, "JSON")) {
        snprintf(buf, cap, "%s/none", t_tmp_root()); /* (nothing there: the run stops once it looks) */
        return buf;
    }
    return buf;
}

/* Each command with each option of its table, after the options it needs: every one is read
 * (never "unknown option"), and no read of an option outside the table ("internal: ...") happens
 * on the way. Each run stops at its missing model, tokenizer or config. */
static void every_option_of_a_table_is_read(void) {
    static char out[1 << 16];
    char cmd[2048], buf[300];
    const char *T = t_tmp_root();
    struct {
        const char *name, *base, *alt; /* alt: the base for the options base does not read */
    } runs[] = {
        {"info", "/nonexistent/model", "/nonexistent/model --plan"},
        {"dpo", "--model /nonexistent/m --data /nonexistent/d.jsonl --output %s/o", NULL},
        {"sft", "--model /nonexistent/m --data /nonexistent/d.jsonl --output %s/o", NULL},
        {"eval", "--model /nonexistent/m --lora /nonexistent/a --data /nonexistent/d.jsonl", NULL},
        {"merge", "--model /nonexistent/m --lora /nonexistent/a --output %s/o", NULL},
        {"init", "--config /nonexistent/config.json --output %s/o", NULL},
        {"encode", "--tokenizer /nonexistent/t.json", NULL},
        {"decode", "--tokenizer /nonexistent/t.json", NULL},
        {"generate", "--model /nonexistent/m --prompt hi", NULL},
        {"chat", "--model /nonexistent/m", NULL},
    };
    size_t nruns = sizeof runs / sizeof *runs, tried = 0;
    CHECK(nruns == sizeof mb_cli_commands / sizeof *mb_cli_commands, "a run for each command");
    for (size_t i = 0; i < nruns; i++) {
        const MbCliCommand *c = cli_command(runs[i].name);
        CHECK(c != NULL, "no table for %s", runs[i].name);
        if (!c) continue;
        char base[512], alt[512];
        snprintf(base, sizeof base, runs[i].base, T);
        snprintf(alt, sizeof alt, "%s", runs[i].alt ? runs[i].alt : "");
        for (int s = -1; s < MB_CLI_SECTIONS && (s < 0 || c->sections[s].opts); s++)
            for (const MbOpt *o = s < 0 ? NULL : c->sections[s].opts; s < 0 || o->name; o = o ? o + 1 : NULL) {
                char opt[400] = "";
                if (o) snprintf(opt, sizeof opt, "--%s %s", o->name, o->value ? sample_value(o, buf, sizeof buf) : "");
                int rc = -2;
                for (int k = 0; k < (alt[0] ? 2 : 1); k++) {
                    snprintf(cmd, sizeof cmd, "%s %s %s %s </dev/null", t_medbot(), c->name, k ? alt : base, opt);
                    rc = t_run(cmd, out, sizeof out);
                    if (!strstr(out, "unknown option")) break;
                }
                CHECK(rc > 0 && rc < 128 && !strstr(out, "unknown option") && !strstr(out, "internal:") &&
                          !strstr(out, "Sanitizer"),
                      "medbot %s %s: exit %d: %s", c->name, opt[0] ? opt : "(no option)", rc, out);
                tried++;
                if (!o) break;
            }
    }
    printf("    %zu runs: every option of every table read, none outside it\n", tried);
}

/* --config keys: the card's names renamed onto options of dpo; sft and eval take the same file,
 * ignoring dpo's settings they do not use, and an unknown key is refused by every command. */
static void config_keys_map_onto_options(void) {
    const MbCliCommand *dpo = cli_command("dpo");
    for (size_t k = 0; k < sizeof mb_cli_config_renames / sizeof *mb_cli_config_renames; k++)
        CHECK(cli_option(dpo, mb_cli_config_renames[k][1]), "the config key %s sets --%s, not an option of dpo",
              mb_cli_config_renames[k][0], mb_cli_config_renames[k][1]);
    MbKv *kv = NULL;
    size_t n = 0;
    CHECK_OK(mb_kv_read("weights/dpo_card.yaml", &kv, &n));
    for (size_t i = 0; i < n; i++)
        CHECK(cli_option(dpo, cli_config_option(kv[i].key)), "weights/dpo_card.yaml:%d: %s is no option of dpo",
              kv[i].line, kv[i].key);
    mb_kv_free(kv, n);
    const char *y = t_tmp("k.yaml");
    char args[600];
    const char *cmds[] = {"dpo", "sft", "eval"};
    for (int i = 0; i < 3; i++) {
        CHECK_OK(mb_write_file(y, "beta: 0.1\nfrobnicate: 3\n", 24));
        snprintf(args, sizeof args, "%s --config %s --model /nonexistent/m --data /nonexistent/d --output %s", cmds[i],
                 y, t_tmp("kout"));
        if (i == 2) snprintf(args, sizeof args, "eval --config %s --model /nonexistent/m --data /nonexistent/d", y);
        t_expect_failure(args, "k.yaml:2: unknown setting 'frobnicate' for medbot", cmds[i]);
    }
}

/* dpo, sft and eval print their settings first, one line a group, flushed before anything loads,
 * each line naming the --config keys that set its values. */
static void training_prints_its_settings_first(void) {
    static char out[1 << 16];
    char cmd[2048];
    /* the card switches 4-bit on: the model line says so, and names the file's key */
    snprintf(cmd, sizeof cmd, "%s dpo --config weights/dpo_card.yaml --model /nonexistent/m --data " FIX
             "/data.jsonl --output %s --max_steps 1 --learning_rate 1e-4", t_medbot(), t_tmp("set"));
    int rc = t_run(cmd, out, sizeof out);
    printf("%s", out);
    const char *model = strstr(out, "\n  model ");
    const char *err = strstr(out, "medbot: /nonexistent/m");
    CHECK(rc == 1 && !strncmp(out, "dpo settings (TRL's names; the command line wins over weights/dpo_card.yaml)", 76),
          "the first line: %.100s", out);
    CHECK(model && err && model < err, "the settings come before the failure to load (flushed)");
    size_t mlen = model ? strcspn(model + 1, "\n") : 0;
    char line[2048];
    snprintf(line, sizeof line, "%.*s", (int)mlen, model ? model + 1 : "");
    CHECK(strstr(line, "load_in_4bit=true") && strstr(line, "bnb_4bit_compute_dtype=bfloat16") &&
              strstr(line, "(from weights/dpo_card.yaml: load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant, "
                           "bnb_4bit_compute_dtype)"),
          "the model line: %s", line);
    const char *groups[] = {"\n  lora       lora_r=64, lora_alpha=8 (scale 0.125)", "\n  dpo        loss_type=sigmoid",
                            "\n  optimizer  learning_rate=0.0001, lr_scheduler_type=cosine", "\n  batch      ",
                            "\n  run        data=" FIX "/data.jsonl", "\nnote: effective_batch_size 256"};
    for (size_t i = 0; i < sizeof groups / sizeof *groups; i++) CHECK(strstr(out, groups[i]), "%s", groups[i] + 1);
    const char *opt = strstr(out, "\n  optimizer");
    CHECK(opt && strstr(opt, "(from weights/dpo_card.yaml: lr_scheduler_type, warmup_ratio, num_train_epochs)\n"),
          "the command line's learning_rate is not the file's");
    /* the command line switches it off again: no mark */
    snprintf(cmd, sizeof cmd, "%s dpo --config weights/dpo_card.yaml --load_in_4bit false --model /nonexistent/m "
             "--data /nonexistent/d --output %s", t_medbot(), t_tmp("set"));
    t_run(cmd, out, sizeof out);
    model = strstr(out, "\n  model ");
    CHECK(model && strstr(model, "load_in_4bit=false") && !strstr(model, "(from weights/dpo_card.yaml: load_in_4bit"),
          "--load_in_4bit false wins: %s", out);
    /* sft and eval: their own lines, and the card's settings they ignore */
    snprintf(cmd, sizeof cmd, "%s eval --config weights/dpo_card.yaml --model /nonexistent/m --data /nonexistent/d",
             t_medbot());
    t_run(cmd, out, sizeof out);
    CHECK(!strncmp(out, "eval settings", 13) && strstr(out, "\n  model      model=/nonexistent/m, lora=(none") &&
              strstr(out, "\n  ignored    batch_size, gradient_accumulation_steps, effective_batch_size") &&
              !strstr(out, "\n  optimizer"),
          "eval: %s", out);
    snprintf(cmd, sizeof cmd, "%s sft --config weights/dpo_card.yaml --model /nonexistent/m --data /nonexistent/d "
             "--output %s", t_medbot(), t_tmp("set"));
    t_run(cmd, out, sizeof out);
    CHECK(!strncmp(out, "sft settings", 12) && strstr(out, "\n  loss       loss=next-token") &&
              strstr(out, "\n  ignored    beta, loss_type (settings of dpo that sft does not take)"),
          "sft: %s", out);
}

/* generate --random_init draws the weights from --seed: no weight file is read (a folder whose
 * model.safetensors is garbage answers), the answer is that of the same seed on any folder of
 * that config, and not the real weights' answer. */
static void generate_random_init_reads_no_weights(void) {
    static char out[4][4096];
    char cmd[2048], path[512];
    const char *dir = t_tmp("randmodel");
    mkdir(dir, 0755);
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK_OK(mb_copy_file("weights/tiny/config.json", path));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK_OK(mb_write_file(path, "not a safetensors file", 22));
    const char *models[] = {"weights/tiny", dir, "weights/tiny", dir};
    const char *flags[] = {"--random_init", "--random_init", "", ""};
    int rc[4];
    for (int i = 0; i < 4; i++) {
        snprintf(cmd, sizeof cmd, "%s generate --model %s %s --seed 1 --prompt hi --raw --greedy --max_new_tokens 4 "
                 "--tokenizer weights/llama3/tokenizer.model 2>/dev/null", t_medbot(), models[i], flags[i]);
        rc[i] = t_run(cmd, out[i], sizeof out[i]);
        printf("    %-40s %-14s exit %d: %s", models[i], flags[i], rc[i], out[i]);
    }
    CHECK(rc[0] == 0 && rc[1] == 0 && out[0][0] && !strcmp(out[0], out[1]), "random weights from the seed alone");
    CHECK(rc[2] == 0 && strcmp(out[0], out[2]), "not the real weights' answer");
    CHECK(rc[3] == 1, "without --random_init the garbage file is read, and refused");
    /* chat takes it too */
    snprintf(cmd, sizeof cmd, "echo hi | %s chat --model %s --random_init --seed 1 --greedy --max_new_tokens 4 "
             "--tokenizer weights/llama3/tokenizer.model", t_medbot(), dir);
    CHECK(t_run(cmd, out[0], sizeof out[0]) == 0, "chat --random_init: %s", out[0]);
}

/* `medbot dpo` (the demo) from another folder: a copy of the binary with no weights/ beside it, run
 * from an empty folder, says where to run it from (the folder of the executable it looked in). */
static void demo_elsewhere_says_where_to_run_it(void) {
    static char out[1 << 14];
    char cmd[4096], root[1024];
    const char *exe_dir = t_tmp("demo-exe"), *here = t_tmp("demo-here");
    snprintf(cmd, sizeof cmd, "mkdir -p %s %s && cp %s %s/medbot", exe_dir, here, t_medbot(), exe_dir);
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s: %s", cmd, out);
    if (!realpath(exe_dir, root)) snprintf(root, sizeof root, "%s", exe_dir);
    snprintf(cmd, sizeof cmd, "cd %s && %s/medbot dpo", here, root);
    int rc = t_run(cmd, out, sizeof out);
    printf("    $ %s\n    -> exit %d: %s", cmd, rc, out);
    char want[1200];
    snprintf(want, sizeof want, "cd %s && ./medbot dpo", root);
    CHECK(rc == 1, "exit 1");
    CHECK(strstr(out, "weights/tiny and weights/demo are not in this folder"), "names what is missing");
    CHECK(strstr(out, want), "says where to run it from: '%s'", want);
    CHECK(!mb_is_dir(t_tmp("demo-here/demo-output")), "nothing written");
}

MB_TEST_MAIN("cli", T(info_prints_the_model), T(bad_input_missing_folder), T(bad_input_truncated_safetensors),
             T(bad_input_offsets_past_the_end), T(bad_input_shape_size_mismatch),
             T(bad_input_config_without_required_field), T(bad_input_tensor_missing_from_a_shard),
             T(bad_input_unknown_command_and_option), T(config_reader_takes_the_yaml_subset),
             T(config_reader_refuses_other_yaml), T(option_values_are_range_checked),
             T(library_entry_points_check_ranges), T(help_shows_every_option_of_the_table),
             T(every_option_the_source_reads_is_declared), T(every_option_of_a_table_is_read),
             T(config_keys_map_onto_options), T(training_prints_its_settings_first),
             T(generate_random_init_reads_no_weights), T(demo_elsewhere_says_where_to_run_it))
