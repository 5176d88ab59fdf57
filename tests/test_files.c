/* tests/test_files.c: JSON reader, safetensors read/write and validation, config.json. */
#include "test.h"

static void json_parses_nested_values(void) {
    const char *text = "{\"a\": [1, -2.5e3, true, null, \"x\\u00e9\\ud83d\\ude00\\n\"], \"b\": {\"c\": 9007199254740993}}";
    MbJsonDoc doc;
    CHECK_OK(json_parse("t", text, strlen(text), &doc));
    const MbJson *a = json_get(&doc, json_root(&doc), "a");
    CHECK(a && a->kind == MB_JSON_ARRAY && a->count == 5, "array a");
    const MbJson *e = json_first(&doc, a);
    CHECK(e->is_int && e->i == 1, "1");
    e = json_next(&doc, e);
    CHECK(!e->is_int && e->num == -2500.0, "-2.5e3");
    e = json_next(&doc, e);
    CHECK(e->kind == MB_JSON_BOOL && e->boolean, "true");
    e = json_next(&doc, e);
    CHECK(e->kind == MB_JSON_NULL, "null");
    e = json_next(&doc, e);
    CHECK(e->kind == MB_JSON_STRING && !strcmp(json_str(&doc, e), "x\xc3\xa9\xf0\x9f\x98\x80\n"), "escapes");
    const MbJson *c = json_get(&doc, json_get(&doc, json_root(&doc), "b"), "c");
    CHECK(c && c->is_int && c->i == 9007199254740993LL, "big int kept exact");
    json_free(&doc);
}

static void json_rejects_bad_input(void) {
    const char *bad[] = {"", "{", "[1,]", "{\"a\" 1}", "\"abc", "tru", "01", "[1] x", "\"\\ud800\"",
                         "\"\xff\"", "{\"a\":\"\x01\"}", "[-]", "1.", "1e"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        MbJsonDoc doc;
        MbStatus st = json_parse("bad.json", bad[i], strlen(bad[i]), &doc);
        CHECK(st == MB_ERR_FORMAT, "'%s' should not parse", bad[i]);
        CHECK(strstr(mb_last_error(), "bad.json: invalid JSON at line"), "message names the file: %s",
              mb_last_error());
    }
    /* deep nesting is refused, not a stack overflow */
    size_t n = 100000;
    char *deep = mb_malloc(n + 1);
    memset(deep, '[', n);
    deep[n] = 0;
    MbJsonDoc doc;
    CHECK(json_parse("deep.json", deep, n, &doc) == MB_ERR_FORMAT, "deep nesting");
    free(deep);
}

static void dtype_conversions_round_to_nearest_even(void) {
    /* values chosen on rounding boundaries; expected bits from torch */
    CHECK(f32_to_bf16(1.0f) == 0x3F80, "1.0");
    CHECK(f32_to_bf16(1.00390625f) == 0x3F80, "tie to even (down)");
    CHECK(f32_to_bf16(1.01171875f) == 0x3F82, "tie to even (up)");
    CHECK(f32_to_bf16(-0.0f) == 0x8000, "-0");
    CHECK(f32_to_f16(65504.0f) == 0x7BFF, "f16 max");
    CHECK(f32_to_f16(65520.0f) == 0x7C00, "f16 overflow to inf");
    CHECK(f32_to_f16(5.960464477539063e-08f) == 0x0001, "f16 smallest subnormal");
    CHECK(f32_to_f16(2.98023223876953125e-08f) == 0x0000, "half of it rounds to even (0)");
    CHECK(f32_to_f16(8.940696716308594e-08f) == 0x0002, "1.5 x smallest rounds to even (2)");
    /* every f16 value survives f16 -> f32 -> f16 */
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint16_t x = (uint16_t)h;
        if (((x >> 10) & 0x1F) == 31 && (x & 0x3FF)) continue; /* NaNs */
        if (f32_to_f16(f16_to_f32(x)) != x) bad++;
    }
    CHECK(bad == 0, "%d f16 values do not round-trip", bad);
    for (uint32_t h = 0; h < 65536; h += 7) {
        uint16_t x = (uint16_t)h;
        if (((x >> 7) & 0xFF) == 0xFF && (x & 0x7F)) continue;
        if (f32_to_bf16(bf16_to_f32(x)) != x) bad++;
    }
    CHECK(bad == 0, "%d bf16 values do not round-trip", bad);
}

static void safetensors_round_trip(void) {
    float a[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
    uint16_t b[4] = {0x3F80, 0x4000, 0xC040, 0x0000};
    int64_t c[3] = {-1, 0, 1LL << 40};
    MbTensorOut ts[3] = {
        {"layer.a", MB_DT_F32, 2, {2, 3}, a},
        {"layer.b", MB_DT_BF16, 1, {4}, b},
        {"ids", MB_DT_I64, 1, {3}, c},
    };
    char path[128];
    snprintf(path, sizeof path, "%s/rt.safetensors", t_tmp_root());
    const char *meta[] = {"format", "pt", NULL};
    CHECK_OK(mb_safetensors_write(path, ts, 3, meta));
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(path, &st));
    if (!st) return;
    CHECK(mb_safetensors_count(st) == 3, "3 tensors");
    const MbTensorInfo *t = mb_safetensors_find(st, "layer.a");
    CHECK(t && t->dtype == MB_DT_F32 && t->ndim == 2 && t->shape[0] == 2 && t->shape[1] == 3, "a meta");
    CHECK(t && !memcmp(t->data, a, sizeof a), "a data");
    t = mb_safetensors_find(st, "layer.b");
    CHECK(t && t->dtype == MB_DT_BF16 && !memcmp(t->data, b, sizeof b), "b");
    t = mb_safetensors_find(st, "ids");
    CHECK(t && t->dtype == MB_DT_I64 && !memcmp(t->data, c, sizeof c), "c");
    CHECK(mb_safetensors_find(st, "nope") == NULL, "absent name");
    mb_safetensors_close(st);
    /* no temporary file is left behind */
    char tmp[160];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    CHECK(!mb_is_file(tmp), "temporary file removed");
}

/* Writes a safetensors file with the given raw header (and n zero data bytes). */
static void write_raw(const char *path, const char *header, size_t data_bytes) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(header);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, n, f);
    for (size_t i = 0; i < data_bytes; i++) fputc(0, f);
    fclose(f);
}

static void expect_open_fails(const char *path, const char *needle) {
    MbSafetensors *st = NULL;
    MbStatus rc = mb_safetensors_open(path, &st);
    CHECK(rc != MB_OK && st == NULL, "%s should fail to open", path);
    CHECK(strstr(mb_last_error(), path) != NULL, "message names the file: %s", mb_last_error());
    CHECK(strstr(mb_last_error(), needle) != NULL, "message says '%s': %s", needle, mb_last_error());
    CHECK(!strchr(mb_last_error(), '\n'), "one line");
    printf("    rejected: %s\n", mb_last_error());
}

static void safetensors_rejects_bad_headers(void) {
    char p[160];
    struct {
        const char *header;
        size_t data;
        const char *needle;
    } cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "point past the end"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8, "need 12"},
        {"{\"a\":{\"dtype\":\"F33\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8, "unknown dtype"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", 8, "bad dimension"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8, "data_offsets"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12, "overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,8]}}", 8, "bad dimension"},
        {"[1,2]", 0, "not a JSON object"},
        {"{\"a\":{\"dtype\":\"F32\"", 0, "invalid JSON"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(p, sizeof p, "%s/bad%zu.safetensors", t_tmp_root(), i);
        write_raw(p, cases[i].header, cases[i].data);
        expect_open_fails(p, cases[i].needle);
    }
    /* header length past the end of the file; a file shorter than 8 bytes */
    snprintf(p, sizeof p, "%s/badlen.safetensors", t_tmp_root());
    FILE *f = fopen(p, "wb");
    unsigned char len[8] = {0xff, 0xff, 0, 0, 0, 0, 0, 0};
    fwrite(len, 1, 8, f);
    fputs("{}", f);
    fclose(f);
    expect_open_fails(p, "header length");
    snprintf(p, sizeof p, "%s/short.safetensors", t_tmp_root());
    f = fopen(p, "wb");
    fputs("abc", f);
    fclose(f);
    expect_open_fails(p, "too short");
    snprintf(p, sizeof p, "%s/does-not-exist.safetensors", t_tmp_root());
    expect_open_fails(p, "no such file");
}

static void safetensors_sharded_index(void) {
    char dir[160], p[200];
    snprintf(dir, sizeof dir, "%s/sharded", t_tmp_root());
    mkdir(dir, 0700);
    float x[2] = {1, 2}, y[3] = {3, 4, 5};
    MbTensorOut a = {"x", MB_DT_F32, 1, {2}, x}, b = {"y", MB_DT_F32, 1, {3}, y};
    snprintf(p, sizeof p, "%s/model-00001-of-00002.safetensors", dir);
    CHECK_OK(mb_safetensors_write(p, &a, 1, NULL));
    snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", dir);
    CHECK_OK(mb_safetensors_write(p, &b, 1, NULL));
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    const char *index = "{\"metadata\":{\"total_size\":20},\"weight_map\":{\"x\":\"model-00001-of-00002.safetensors\","
                        "\"y\":\"model-00002-of-00002.safetensors\"}}";
    CHECK_OK(mb_write_file(p, index, strlen(index)));
    MbSafetensors *st;
    CHECK_OK(mb_safetensors_open(dir, &st));
    if (st) {
        CHECK(mb_safetensors_count(st) == 2, "2 tensors");
        const MbTensorInfo *t = mb_safetensors_find(st, "y");
        CHECK(t && t->numel == 3 && strstr(t->file, "00002"), "y in shard 2");
        mb_safetensors_close(st);
    }
    /* the index names a tensor that its shard lacks */
    const char *wrong = "{\"weight_map\":{\"x\":\"model-00001-of-00002.safetensors\","
                        "\"y\":\"model-00001-of-00002.safetensors\"}}";
    CHECK_OK(mb_write_file(p, wrong, strlen(wrong)));
    MbSafetensors *st2 = NULL;
    CHECK(mb_safetensors_open(dir, &st2) == MB_ERR_FORMAT, "missing from shard");
    CHECK(strstr(mb_last_error(), "'y' is missing from shard"), "%s", mb_last_error());
    printf("    rejected: %s\n", mb_last_error());
}

static void config_reads_llama31(void) {
    MbConfig c;
    CHECK_OK(mb_config_load("weights/tiny/config.json", &c));
    CHECK(c.hidden_size == 64 && c.num_hidden_layers == 2 && c.num_attention_heads == 4 &&
          c.num_key_value_heads == 2 && c.head_dim == 16 && c.vocab_size == 128256, "shapes");
    CHECK(c.rope_llama3 && c.rope_factor == 8 && c.rope_low_freq_factor == 1 && c.rope_high_freq_factor == 4 &&
          c.rope_original_max_position_embeddings == 8192 && c.rope_theta == 500000, "rope");
    CHECK(c.tie_word_embeddings && c.rms_norm_eps == 1e-5f, "tie, eps");
    CHECK(c.bos_token_id == 128000 && c.n_eos_token_ids == 3 && c.eos_token_ids[2] == 128009, "bos/eos");
}

static void config_rejects_missing_fields(void) {
    char p[160];
    snprintf(p, sizeof p, "%s/config.json", t_tmp_root());
    const char *cases[][2] = {
        {"{\"hidden_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":10}", "\"intermediate_size\" is missing"},
        {"{\"hidden_size\":8,\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":10,\"num_key_value_heads\":3}", "not a multiple"},
        {"{\"hidden_size\":8,\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":10,\"rope_scaling\":{\"rope_type\":\"yarn\",\"factor\":2}}", "not supported"},
        {"{\"hidden_size\":8,\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":10,\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8}}", "needs factor"},
        {"{\"hidden_size\":\"8\",\"intermediate_size\":8,\"num_hidden_layers\":1,\"num_attention_heads\":2,\"vocab_size\":10}", "positive integer"},
        {"{\"model_type\":\"gpt2\"}", "not supported"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        CHECK_OK(mb_write_file(p, cases[i][0], strlen(cases[i][0])));
        MbConfig c;
        CHECK(mb_config_load(p, &c) != MB_OK, "case %zu should fail", i);
        CHECK(strstr(mb_last_error(), p) && strstr(mb_last_error(), cases[i][1]), "case %zu: %s", i, mb_last_error());
        printf("    rejected: %s\n", mb_last_error());
    }
}

MB_TEST_MAIN("files", T(json_parses_nested_values), T(json_rejects_bad_input),
             T(dtype_conversions_round_to_nearest_even), T(safetensors_round_trip),
             T(safetensors_rejects_bad_headers), T(safetensors_sharded_index), T(config_reads_llama31),
             T(config_rejects_missing_fields))
