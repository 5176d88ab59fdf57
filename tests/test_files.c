/* tests/test_files.c: JSON reader, safetensors read/write and validation, config.json, the model
 * folders init writes (streamed, sharded as save_pretrained shards). */
#include "test.h"

#include <sys/resource.h>

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

/* ---- init: random weights streamed and sharded as save_pretrained shards them ---- */

/* the SHA-256 of a file, in hex */
static void file_sha256(const char *path, char hex[65]) {
    MbMap m;
    unsigned char d[32];
    hex[0] = 0;
    if (mb_map_file(path, &m)) return;
    MbSha256 s;
    sha256_init(&s);
    sha256_update(&s, m.data, m.size);
    sha256_final(&s, d);
    mb_unmap(&m);
    for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", d[i]);
}

static MbStatus init_into(const char *cfg, const char *dir, MbDtype dt, uint64_t seed, double std, size_t shard) {
    MbInitOptions o = {.seed = seed, .dtype = dt, .std = std, .max_shard_size = shard};
    return mb_model_init_random(cfg, dir, &o);
}

/* The values init draws stay what they were before it streamed and sharded its output: the
 * hashes of model.safetensors as the whole-model writer (commit 72ef6be) wrote it. */
static void init_keeps_its_bytes(void) {
    static const struct {
        const char *config;
        MbDtype dtype;
        uint64_t seed;
        double std;
        const char *sha256;
    } cases[] = {
        {"weights/tiny/config.json", MB_DT_BF16, 0, 0.02, /* the bundled model, as build.sh makes it */
         "42e8412cdc098eac60541a4bbe21c3b0c95cd649a5d49ea997be70c15f1667e9"},
        {"tests/fixtures/llama/gqa2_f32/config.json", MB_DT_F32, 7, 0.02,
         "364d4cf0d3e10f30df38c7a8e70dfcc91148172e516153404c23fd46f9281a58"},
        {"tests/fixtures/llama/tied_mqa_bf16/config.json", MB_DT_F16, 0, 0.02,
         "dbeaf326451edd7e5d0ec27b3f110972c3488db2845a7163eca179a89beb9b8a"},
        {"tests/fixtures/llama/gqa2_f32/config.json", MB_DT_BF16, 3, 0.5,
         "b581bc325b0783c245d0a8b31355de01dce84e2d25e30f9c64d1867bd7920352"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *dir = t_tmp("init-bytes");
        char st[300], hex[65];
        CHECK_OK(init_into(cases[i].config, dir, cases[i].dtype, cases[i].seed, cases[i].std, 0));
        snprintf(st, sizeof st, "%s/model.safetensors", dir);
        file_sha256(st, hex);
        printf("    %-48s %s seed %d std %g: %.16s...\n", cases[i].config, mb_dtype_name(cases[i].dtype),
               (int)cases[i].seed, cases[i].std, hex);
        CHECK(!strcmp(hex, cases[i].sha256), "%s %s: sha256 %s, want %s", cases[i].config,
              mb_dtype_name(cases[i].dtype), hex, cases[i].sha256);
    }
}

static void init_parses_shard_sizes(void) {
    static const struct {
        const char *text;
        size_t bytes; /* 0: refused */
    } cases[] = {{"5GB", 5000000000ull}, {"500MB", 500000000}, {"200kB", 200000}, {"200KB", 200000},
                 {"1.5gb", 1500000000}, {" 5 GB ", 5000000000ull}, {"2TB", 2000000000000ull}, {"1000", 1000},
                 {"0.5KB", 500}, {"5GiB", 0}, {"GB", 0}, {"0", 0}, {"0GB", 0}, {"-1GB", 0}, {"nanGB", 0},
                 {"infGB", 0}, {"0x10", 0}, {"", 0}, {"5 G B", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t got = 0;
        MbStatus rc = parse_size("max_shard_size", cases[i].text, &got);
        if (cases[i].bytes) CHECK(rc == MB_OK && got == cases[i].bytes, "'%s': %zu, want %zu", cases[i].text, got, cases[i].bytes);
        else CHECK(rc == MB_ERR_ARG && strstr(mb_last_error(), "is not a size"), "'%s' should be refused", cases[i].text);
    }
    printf("    refused: %s\n", mb_last_error());
}

typedef struct {
    int begin, end, ok;
    double done, total;
    char task[300], unit[16];
} InitEvents;

static void record_init_event(void *ctx, const MbProgressEvent *ev) {
    InitEvents *e = ctx;
    if (ev->state == MB_PROGRESS_BEGIN) e->begin++, snprintf(e->task, sizeof e->task, "%s", ev->task);
    if (ev->state == MB_PROGRESS_BEGIN) snprintf(e->unit, sizeof e->unit, "%s", ev->unit), e->total = ev->total;
    if (ev->state == MB_PROGRESS_END) e->end++, e->ok = ev->ok, e->done = ev->done;
}

/* the bytes of the model's files in dir (model*.safetensors) */
static size_t weight_bytes(const char *dir, int *files) {
    DIR *d = opendir(dir);
    struct dirent *e;
    size_t n = 0;
    *files = 0;
    while (d && (e = readdir(d))) {
        if (strncmp(e->d_name, "model", 5) || !strstr(e->d_name, ".safetensors") || strstr(e->d_name, ".json")) continue;
        char p[400];
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (stat(p, &sb) == 0) n += (size_t)sb.st_size, ++*files;
    }
    if (d) closedir(d);
    return n;
}

/* Every tensor of a and b: the same names, shapes and bytes. */
static void same_tensors(const char *a, const char *b) {
    MbSafetensors *x = NULL, *y = NULL;
    CHECK_OK(mb_safetensors_open(a, &x));
    CHECK_OK(mb_safetensors_open(b, &y));
    if (!x || !y) goto done;
    CHECK(mb_safetensors_count(x) == mb_safetensors_count(y), "%zu tensors, want %zu", mb_safetensors_count(x),
          mb_safetensors_count(y));
    for (size_t i = 0; i < mb_safetensors_count(y); i++) {
        const MbTensorInfo *t = mb_safetensors_at(y, i), *u = mb_safetensors_find(x, t->name);
        CHECK(u && u->dtype == t->dtype && u->ndim == t->ndim && u->nbytes == t->nbytes &&
                  !memcmp(u->shape, t->shape, sizeof t->shape) && !memcmp(u->data, t->data, t->nbytes),
              "%s differs", t->name);
    }
done:
    mb_safetensors_close(x);
    mb_safetensors_close(y);
}

/* The sharded folder gives the same logits as the single file. */
static void same_logits(const char *a, const char *b) {
    MbLoadOptions opt = {.threads = 1, .device = MB_DEVICE_CPU};
    MbModel *x = NULL, *y = NULL;
    CHECK_OK(mb_model_load(a, &opt, &x));
    CHECK_OK(mb_model_load(b, &opt, &y));
    if (x && y) {
        const int32_t tok[6] = {1, 5, 9, 77, 3, 250};
        size_t V = (size_t)x->cfg.vocab_size;
        float *lx = mb_malloc(6 * V * sizeof *lx), *ly = mb_malloc(6 * V * sizeof *ly);
        CHECK_OK(mb_model_forward(x, NULL, tok, 1, 6, NULL, lx, 0));
        CHECK_OK(mb_model_forward(y, NULL, tok, 1, 6, NULL, ly, 0));
        CHECK(!memcmp(lx, ly, 6 * V * sizeof *lx), "the logits differ");
        printf("    logits of %s: the same as the single file's (%zu values)\n", a, 6 * V);
        free(lx), free(ly);
    }
    mb_model_free(x);
    mb_model_free(y);
}

/* init --max_shard_size writes the shards save_pretrained writes: the index, byte for byte, is
 * the one transformers writes for the same model (tests/ref/make_shard_fixtures.py; the first
 * case's was written by save_pretrained itself), every shard holds at most the limit unless it
 * is one tensor, and the shards hold the very tensors of the single file, so the logits agree. */
static void init_shards_as_save_pretrained(void) {
    static const struct {
        const char *index, *config;
        MbDtype dtype;
        const char *size;
    } cases[] = {
        {"tests/fixtures/llama/gqa4_bf16_sharded/model.safetensors.index.json",
         "tests/fixtures/llama/gqa4_bf16_sharded/config.json", MB_DT_BF16, "120KB"},
        {"tests/fixtures/llama/shards/gqa4_f32_40KB.index.json", "tests/fixtures/llama/gqa4_bf16_sharded/config.json",
         MB_DT_F32, "40KB"},
        {"tests/fixtures/llama/shards/tied_mqa_f16_30kB.index.json", "tests/fixtures/llama/tied_mqa_bf16/config.json",
         MB_DT_F16, "30kB"},
        {"tests/fixtures/llama/shards/tiny_bf16_200KB.index.json", "weights/tiny/config.json", MB_DT_BF16, "200KB"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *one = t_tmp("init-one"), *dir = t_tmp("init-sharded");
        char index[400];
        size_t limit = 0;
        CHECK_OK(parse_size("test", cases[i].size, &limit));
        InitEvents ev = {0};
        MbInitOptions o = {.seed = 5, .dtype = cases[i].dtype, .std = 0.02, .max_shard_size = limit,
                           .progress = {record_init_event, &ev}};
        CHECK_OK(mb_model_init_random(cases[i].config, dir, &o));
        CHECK_OK(init_into(cases[i].config, one, cases[i].dtype, 5, 0.02, 0));
        snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
        CHECK(t_files_equal(index, cases[i].index), "%s differs from %s", index, cases[i].index);
        int files = 0;
        size_t bytes = weight_bytes(dir, &files);
        printf("    %-44s %s %-5s: %d shards, the index as transformers writes it\n", cases[i].config,
               mb_dtype_name(cases[i].dtype), cases[i].size, files);
        CHECK(ev.begin == 1 && ev.end == 1 && ev.ok && !strcmp(ev.unit, "bytes") && strstr(ev.task, "writing random weights to ") &&
                  strstr(ev.task, dir) && ev.total == (double)bytes && ev.done == ev.total,
              "progress: '%s' %s, %.0f of %.0f, want the %zu bytes of the shards", ev.task, ev.unit, ev.done, ev.total, bytes);
        /* each shard: at most the limit, or a single tensor; the index's weight_map covers every tensor */
        MbSafetensors *st = NULL;
        CHECK_OK(mb_safetensors_open(dir, &st));
        size_t total = 0;
        for (size_t k = 0; st && k < mb_safetensors_count(st); k++) {
            const MbTensorInfo *t = mb_safetensors_at(st, k);
            size_t in_file = 0, n_in_file = 0;
            for (size_t j = 0; j < mb_safetensors_count(st); j++)
                if (!strcmp(mb_safetensors_at(st, j)->file, t->file)) in_file += mb_safetensors_at(st, j)->nbytes, n_in_file++;
            CHECK(in_file <= limit || n_in_file == 1, "%s: %zu bytes of data in %zu tensors", t->file, in_file, n_in_file);
            total += t->nbytes;
        }
        mb_safetensors_close(st);
        char text[64];
        snprintf(text, sizeof text, "\"total_size\": %zu", total);
        char *idx = NULL;
        CHECK(!mb_read_file(index, &idx, NULL) && strstr(idx, text), "the index should say %s", text);
        free(idx);
        same_tensors(dir, one);
        if (i == 1) same_logits(dir, one);
    }
}

/* A new save replaces the weights of an earlier one in the folder, as save_pretrained does: shards
 * of another count go, and a single file and an index never stay side by side. */
static void init_replaces_an_earlier_save(void) {
    const char *dir = t_tmp("init-replace"), *cfg = "tests/fixtures/llama/gqa4_bf16_sharded/config.json";
    char p[400];
    int files = 0;
    CHECK_OK(init_into(cfg, dir, MB_DT_F32, 1, 0.02, 40000)); /* 17 shards */
    weight_bytes(dir, &files);
    CHECK(files == 17, "%d files", files);
    CHECK_OK(init_into(cfg, dir, MB_DT_BF16, 1, 0.02, 120000)); /* 4 shards */
    weight_bytes(dir, &files);
    snprintf(p, sizeof p, "%s/model-00005-of-00017.safetensors", dir);
    CHECK(files == 4 && !mb_is_file(p), "%d files: the 17 shards of the earlier save should be gone", files);
    CHECK_OK(init_into(cfg, dir, MB_DT_BF16, 1, 0.02, 0)); /* one file */
    weight_bytes(dir, &files);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    CHECK(files == 1 && !mb_is_file(p), "%d files: model.safetensors alone", files);
    CHECK_OK(init_into(cfg, dir, MB_DT_BF16, 1, 0.02, 120000));
    weight_bytes(dir, &files);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    CHECK(files == 4 && !mb_is_file(p), "%d files: the shards alone", files);
}

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* the names in dir, sorted, space-separated ("" when it does not exist) */
static void dir_listing(const char *dir, char *out, size_t cap) {
    char **names = NULL;
    DIR *d = opendir(dir);
    struct dirent *e;
    while (d && (e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) arrput(names, mb_strdup(e->d_name));
    if (d) closedir(d);
    if (names) qsort(names, (size_t)arrlen(names), sizeof *names, cmp_cstr); /* (qsort's pointer may not be NULL) */
    out[0] = 0;
    for (ptrdiff_t i = 0; i < arrlen(names); i++) {
        snprintf(out + strlen(out), cap - strlen(out), "%s%s", i ? " " : "", names[i]);
        free(names[i]);
    }
    arrfree(names);
}

/* A failure half-way leaves nothing: not a shard, not a temporary, not the folder it made, and
 * an earlier model in the folder as it was. Failures: a full disk (a forked child under
 * RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails them with ENOSPC) while
 * shards are open, a rename that fails once every shard is complete (the renamed ones are taken
 * back), an interrupt, and Ctrl-C on the command line. Temporaries a killed init left go. */
static void init_failure_leaves_nothing(void) {
    const char *cfg = "tests/fixtures/llama/gqa4_bf16_sharded/config.json";
    char listing[2048], before[2048], p[400], msg[512];
    /* a full disk: shard 1 (110 kB) cannot be completed while shard 2 is open */
    const char *parent = t_tmp("init-full"), *dir;
    char sub[300];
    snprintf(sub, sizeof sub, "%s/a/b", parent);
    dir = sub;
    int fd[2];
    if (pipe(fd) == 0) {
        pid_t pid = fork();
        if (pid == 0) {
            close(fd[0]);
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit lim = {100000, 100000};
            MbStatus rc = setrlimit(RLIMIT_FSIZE, &lim) == 0 ? init_into(cfg, dir, MB_DT_BF16, 0, 0.02, 120000) : MB_ERR_ARG;
            ssize_t k = write(fd[1], mb_last_error(), strlen(mb_last_error()));
            (void)k;
            _exit(rc == MB_ERR_IO ? 0 : 1);
        }
        close(fd[1]);
        int child = t_child_wait(pid, fd[0], msg, sizeof msg);
        dir_listing(parent, listing, sizeof listing);
        printf("    a full disk (child exit %d): %s; left in the parent: '%s'\n", child, msg, listing);
        CHECK(child == 0 && strstr(msg, "write failed") && strstr(msg, "model-0000"), "%s", msg);
        CHECK(!listing[0], "the folders init made should be gone: '%s'", listing);
    }
    /* a rename that fails when all is written: a folder (not empty) where shard 3 goes; an earlier
     * model in the folder stays as it was */
    dir = t_tmp("init-rename");
    CHECK_OK(init_into(cfg, dir, MB_DT_F32, 9, 0.02, 0));
    snprintf(p, sizeof p, "%s/model-00003-of-00004.safetensors/x", dir);
    mb_mkdir_p(p, NULL);
    char sha_before[65], sha_after[65];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    file_sha256(p, sha_before);
    dir_listing(dir, before, sizeof before);
    MbStatus rc = init_into(cfg, dir, MB_DT_BF16, 0, 0.02, 120000);
    dir_listing(dir, listing, sizeof listing);
    file_sha256(p, sha_after);
    printf("    a failed rename: %s; left: '%s'\n", mb_last_error(), listing);
    CHECK(rc == MB_ERR_IO && strstr(mb_last_error(), "model-00003-of-00004.safetensors"), "%s", mb_last_error());
    CHECK(!strcmp(listing, before) && !strcmp(sha_before, sha_after), "the folder changed: '%s', was '%s'", listing, before);
    /* an interrupt: the folder is left as it was */
    volatile sig_atomic_t stop = 1;
    MbInitOptions o = {.seed = 0, .dtype = MB_DT_BF16, .std = 0.02, .max_shard_size = 120000, .interrupt = &stop};
    snprintf(p, sizeof p, "%s/model-00003-of-00004.safetensors", dir);
    mb_rmdir_r(p);
    dir_listing(dir, before, sizeof before);
    CHECK(mb_model_init_random(cfg, dir, &o) == MB_INTERRUPTED && strstr(mb_last_error(), "interrupted"), "%s",
          mb_last_error());
    dir_listing(dir, listing, sizeof listing);
    CHECK(!strcmp(listing, before), "the folder changed: '%s', was '%s'", listing, before);
    dir = t_tmp("init-interrupted");
    CHECK(mb_model_init_random(cfg, dir, &o) == MB_INTERRUPTED && !mb_is_dir(dir), "a new folder should be gone");
    /* what a killed init left (a shard's temporary, a dead process's) goes with the next init */
    dir = t_tmp("init-stale");
    CHECK_OK(init_into(cfg, dir, MB_DT_BF16, 0, 0.02, 120000));
    snprintf(p, sizeof p, "%s/model-00002-of-00004.safetensors.tmp.99999999", dir);
    CHECK_OK(mb_write_file(p, "x", 1));
    snprintf(p, sizeof p, "%s/model.safetensors.index.json.tmp.99999999", dir);
    CHECK_OK(mb_write_file(p, "x", 1));
    CHECK_OK(init_into(cfg, dir, MB_DT_BF16, 0, 0.02, 120000));
    dir_listing(dir, listing, sizeof listing);
    CHECK(!strstr(listing, ".tmp."), "stale temporaries stay: '%s'", listing);
}

/* Ctrl-C during `medbot init` (the 8B shape: minutes of work) stops it at once (exit 130) and
 * leaves no folder. */
static void init_ctrl_c_leaves_nothing(void) {
    const char *parent = t_tmp("init-ctrl-c");
    char dir[300], listing[2048];
    snprintf(dir, sizeof dir, "%s/llama8b", parent);
    mb_mkdir_p(parent, NULL);
    pid_t pid = fork();
    if (pid == 0) {
        int null = open("/dev/null", O_WRONLY);
        dup2(null, 1), dup2(null, 2);
        execl(t_medbot(), t_medbot(), "init", "--config", "weights/llama-3.1-8b/config.json", "--output", dir,
              (char *)NULL);
        _exit(127);
    }
    /* once it writes the first shard, Ctrl-C */
    for (int i = 0; i < 200; i++) {
        dir_listing(dir, listing, sizeof listing);
        if (strstr(listing, "model-00001-of-00004.safetensors.tmp.")) break;
        nanosleep(&(struct timespec){0, 50000000}, NULL);
    }
    printf("    writing: '%s'\n", listing);
    CHECK(strstr(listing, "model-00001-of-00004.safetensors.tmp."), "no shard after 10 s: '%s'", listing);
    kill(pid, SIGINT);
    int st = 0;
    waitpid(pid, &st, 0);
    dir_listing(parent, listing, sizeof listing);
    printf("    after Ctrl-C: exit %d, left: '%s'\n", WIFEXITED(st) ? WEXITSTATUS(st) : -1, listing);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 128 + SIGINT, "exit status %d", st);
    CHECK(!listing[0], "left: '%s'", listing);
}

MB_TEST_MAIN("files", T(json_parses_nested_values), T(json_rejects_bad_input),
             T(dtype_conversions_round_to_nearest_even), T(safetensors_round_trip),
             T(safetensors_rejects_bad_headers), T(safetensors_sharded_index), T(config_reads_llama31),
             T(config_rejects_missing_fields), T(init_keeps_its_bytes), T(init_parses_shard_sizes),
             T(init_shards_as_save_pretrained), T(init_replaces_an_earlier_save), T(init_failure_leaves_nothing),
             T(init_ctrl_c_leaves_nothing))
