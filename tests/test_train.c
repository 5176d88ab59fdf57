/* tests/test_train.c: the training machinery beyond the TRL parity of test_dpo.c: gradients
 * against finite differences (with LoRA dropout, with and without checkpointing), checkpoints
 * and resume after SIGKILL (bit-identical), refusal of corrupt checkpoints, bad data, a loss
 * that turns NaN, the reference log-prob cache, eval, the PEFT file round trip, --config (the card's
 * block, lists in both YAML forms), data files with a BOM or in UTF-16/32, an eval split that leaves
 * a side empty, metrics.jsonl as JSON. */
#include "test.h"

#define FIX "tests/fixtures/dpo"

static void gradients_match_finite_differences(void) {
    MbModel *m;
    MbLoadOptions o = {.threads = 2};
    CHECK_OK(mb_model_load("tests/fixtures/llama/gqa2_f32", &o, &m));
    if (!m) return;
    MbLoraConfig lc = {4, 8, 0.3, 0, 0};
    CHECK_OK(lora_parse_targets("all-linear", &lc.targets));
    MbLora *lo;
    CHECK_OK(mb_lora_new(m, &lc, 1, &lo));
    MbRng rng;
    mb_rng_seed(&rng, 5);
    for (size_t i = 0; i < lo->n_params; i++) lo->params[i] += 0.05f * (float)mb_rng_normal(&rng);
    mb_model_set_lora(m, lo);
    m->dropout_seed = 77; /* LoRA dropout 0.3 with a fixed mask */
    int B = 2, T = 10, lens[2] = {10, 7};
    int32_t tok[20];
    for (int i = 0; i < 20; i++) tok[i] = (int32_t)(mb_rng_u64(&rng) % 517);
    int pos[32];
    int32_t tgt[32];
    float w[32], logp[32], lsum[32];
    size_t M = 0;
    for (int b = 0; b < B; b++)
        for (int t = 3; t < lens[b]; t++) {
            pos[M] = b * T + t - 1, tgt[M] = tok[b * T + t], w[M] = (float)mb_rng_normal(&rng);
            M++;
        }
    int checks = t_sanitized() ? 8 : 40;
    for (int ck = 0; ck < 2; ck++) {
        m->gradient_checkpointing = ck;
        memset(lo->grads, 0, lo->n_params * sizeof(float));
        CHECK_OK(model_forward_rows(m, tok, lens, B, T, pos, tgt, M, logp, lsum, 1));
        CHECK_OK(model_backward_rows(m, w));
        double maxerr = 0, maxg = 0;
        for (int k = 0; k < checks; k++) {
            size_t i = (size_t)(mb_rng_u64(&rng) % lo->n_params);
            float save = lo->params[i], h = 1e-2f;
            double f[2];
            for (int s = 0; s < 2; s++) {
                lo->params[i] = save + (s ? h : -h);
                CHECK_OK(model_forward_rows(m, tok, lens, B, T, pos, tgt, M, logp, lsum, 0));
                double L = 0;
                for (size_t r = 0; r < M; r++) L += (double)w[r] * logp[r];
                f[s] = L;
            }
            lo->params[i] = save;
            double num = (f[1] - f[0]) / (2 * h);
            maxerr = fmax(maxerr, fabs(num - lo->grads[i]));
            maxg = fmax(maxg, fabs(lo->grads[i]));
        }
        /* central differences in fp32 with h = 1e-2: O(h^2) + rounding ~ 1e-3 of the gradient scale */
        printf("    checkpointing %d: %d LoRA parameters, max |analytic - numeric| %.2e, max |grad| %.2e\n", ck,
               checks, maxerr, maxg);
        CHECK(maxerr <= 2e-3 * fmax(maxg, 1.0), "finite differences disagree: %.3e", maxerr);
    }
    mb_model_set_lora(m, NULL);
    mb_lora_free(lo);
    mb_model_free(m);
}

static void resume_after_sigkill_is_bit_identical(void) {
    static char out[1 << 16];
    char cmd[2048], a[300], b[300];
    int steps = t_sanitized() ? 60 : 200;
    char extra[128];
    snprintf(extra, sizeof extra, "--max_steps %d --save_steps 2 --logging_steps 50", steps);
    const char *ref = t_tmp("uninterrupted"), *run = t_tmp("killed");
    t_dpo_cmd(cmd, sizeof cmd, ref, extra);
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "uninterrupted run failed: %s", out);
    /* the same run, killed with SIGKILL as soon as its first checkpoint exists */
    char bg[2600];
    t_dpo_cmd(cmd, sizeof cmd, run, extra);
    snprintf(bg, sizeof bg,
             "%s > %s.log 2>&1 & pid=$!; while [ ! -d %s/checkpoint-2 ] && kill -0 $pid 2>/dev/null; do sleep 0.002; done; "
             "kill -9 $pid; wait $pid; echo killed=$?", cmd, run, run);
    rc = t_run(bg, out, sizeof out);
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", run);
    int finished = mb_is_file(a);
    printf("    killed run: %s    final adapter written before the kill: %s\n", out, finished ? "yes" : "no");
    CHECK(strstr(out, "killed=137") && !finished, "the run must be killed mid-way (%s)", out);
    char *latest = latest_checkpoint(run);
    printf("    newest checkpoint left: %s\n", latest ? latest : "(none)");
    CHECK(latest != NULL, "a checkpoint survives");
    free(latest);
    t_dpo_cmd(cmd, sizeof cmd, run, extra);
    char resume[2300];
    snprintf(resume, sizeof resume, "%s --resume_from_checkpoint latest", cmd);
    rc = t_run(resume, out, sizeof out);
    CHECK(rc == 0 && strstr(out, "resumed from"), "resume failed: %s", out);
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", ref);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", run);
    CHECK(t_files_equal(a, b), "the resumed adapter differs from the uninterrupted one");
    snprintf(a, sizeof a, "%s/checkpoint-%d/optimizer.safetensors", ref, steps);
    snprintf(b, sizeof b, "%s/checkpoint-%d/optimizer.safetensors", run, steps);
    CHECK(t_files_equal(a, b), "the final optimizer moments differ");
    printf("    resumed run: final adapter and optimizer moments are byte-identical to the uninterrupted run\n");
}

static void corrupt_checkpoints_are_refused(void) {
    static char out[1 << 16];
    char cmd[2048], path[400], resume[2600];
    const char *run = t_tmp("corrupt");
    t_dpo_cmd(cmd, sizeof cmd, run, "--max_steps 2 --save_steps 1 --overwrite_output_dir"); /* each run replaces the last */
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out);
    struct {
        const char *what, *shell, *needle;
    } cases[] = {
        {"truncated optimizer state", "truncate -s 100 %s/checkpoint-1/optimizer.safetensors", "optimizer.safetensors"},
        {"missing trainer state", "rm %s/checkpoint-1/trainer_state.json", "trainer_state.json"},
        {"truncated adapter", "truncate -s 50 %s/checkpoint-1/adapter_model.safetensors", "adapter_model.safetensors"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char sh[600];
        snprintf(path, sizeof path, "%s/checkpoint-1", run);
        CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out); /* a fresh checkpoint-1 */
        snprintf(sh, sizeof sh, cases[i].shell, run);
        CHECK(system(sh) == 0, "%s", sh);
        snprintf(resume, sizeof resume, "%s --resume_from_checkpoint %s", cmd, path);
        int rc = t_run(resume, out, sizeof out);
        printf("    %s -> exit %d: %s", cases[i].what, rc, out + (strstr(out, "medbot: ") ? strstr(out, "medbot: ") - out : 0));
        CHECK(rc > 0 && strstr(out, cases[i].needle), "%s should be refused naming %s", cases[i].what, cases[i].needle);
    }
    /* another data file: the fingerprint differs */
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out);
    char other[2600];
    snprintf(other, sizeof other, "%s --max_length 30 --resume_from_checkpoint %s", cmd, path);
    int rc = t_run(other, out, sizeof out);
    printf("    other settings -> exit %d: %s", rc, strstr(out, "medbot: ") ? strstr(out, "medbot: ") : out);
    CHECK(rc > 0 && strstr(out, "made with another model, data or settings"), "fingerprint mismatch refused");
}

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void bad_data_gives_file_and_line(void) {
    static char out[1 << 16];
    const char *good = "{\"prompt\": \"Q: fever?\\nA: \", \"chosen\": \"Rest and drink water.\", \"rejected\": \"Ignore it.\"}\n";
    struct {
        const char *what, *line, *needle;
    } cases[] = {
        {"invalid JSON", "{\"prompt\": \"x\", \"chosen\": \n", ":2: invalid JSON"},
        {"missing field", "{\"prompt\": \"Q\", \"chosen\": \"A\"}\n", ":2: a preference pair needs \"rejected\""},
        {"a number for a string", "{\"question\": 5, \"chosen\": \"A\", \"rejected\": \"B\"}\n", ":2: a preference pair needs string values"},
        {"not UTF-8", "{\"prompt\": \"Q\xff\", \"chosen\": \"A\", \"rejected\": \"B\"}\n", ":2: invalid JSON at line 1 column 14: invalid UTF-8"},
    };
    char path[300], cmd[1200], text[1024];
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        snprintf(path, sizeof path, "%s", t_tmp("bad.jsonl"));
        snprintf(text, sizeof text, "%s%s%s", good, cases[i].line, good);
        write_text(path, text);
        snprintf(cmd, sizeof cmd, "%s dpo --model " FIX "/model --data %s --output %s --max_steps 1", t_medbot(), path,
                 t_tmp("badout"));
        int rc = t_run(cmd, out, sizeof out);
        const char *msg = strstr(out, "medbot: ");
        printf("    %-22s -> exit %d: %s", cases[i].what, rc, msg ? msg : out);
        CHECK(rc > 0 && msg && strstr(msg, path) && strstr(msg, cases[i].needle), "want '%s'", cases[i].needle);
        const char *nl = msg ? strchr(msg, '\n') : NULL;
        CHECK(nl && !nl[1], "one line");
    }
    /* empty completions and prompts that fill max_length are skipped, counted and reported */
    snprintf(text, sizeof text,
             "%s{\"prompt\": \"Q\", \"chosen\": \"\", \"rejected\": \"B\"}\n%s"
             "{\"prompt\": \"a very long prompt that certainly fills ten tokens of the tiny tokenizer and more\", "
             "\"chosen\": \"A\", \"rejected\": \"B\"}\n",
             good, good);
    write_text(path, text);
    snprintf(cmd, sizeof cmd, "%s dpo --model " FIX "/model --data %s --output %s --max_steps 1 --max_length 10",
             t_medbot(), path, t_tmp("badout"));
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "skips are not errors: %s", out);
    CHECK(strstr(out, "skipped 1 pairs with an empty prompt or completion (first at line 2)"), "empty completion reported:\n%s", out);
    CHECK(strstr(out, "skipped 1 pairs whose prompt fills max_length"), "long prompt reported:\n%s", out);
    /* nothing usable at all */
    write_text(path, "{\"prompt\": \"Q\", \"chosen\": \"\", \"rejected\": \"B\"}\n");
    snprintf(cmd, sizeof cmd, "%s dpo --model " FIX "/model --data %s --output %s --max_steps 1 --max_length 10",
             t_medbot(), path, t_tmp("badout"));
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc > 0 && strstr(out, "no usable preference pairs"), "%s", out);
}

static void nan_loss_stops_and_keeps_the_last_checkpoint(void) {
    static char out[1 << 16];
    char cmd[2048];
    const char *run = t_tmp("nan");
    t_dpo_cmd(cmd, sizeof cmd, run, "--max_steps 30 --save_steps 1 --learning_rate 1e30 --max_grad_norm 0");
    int rc = t_run(cmd, out, sizeof out);
    const char *msg = strstr(out, "medbot: ");
    printf("    lr 1e30 -> exit %d: %s", rc, msg ? msg : "(no message)\n");
    CHECK(rc > 0 && msg && strstr(msg, "training stopped at step"), "a NaN/inf loss stops the run:\n%s", out);
    char *latest = latest_checkpoint(run);
    CHECK(latest != NULL, "the checkpoints before the failure remain");
    if (latest) {
        MbModel *m;
        MbLoadOptions o = {.threads = 1};
        MbLora *lo = NULL;
        CHECK_OK(mb_model_load(FIX "/model", &o, &m));
        CHECK_OK(mb_lora_load(m, latest, &lo));
        int finite = 1;
        for (size_t i = 0; lo && i < lo->n_params; i++) finite &= isfinite(lo->params[i]) != 0;
        printf("    %s loads, parameters finite: %s\n", latest, finite ? "yes" : "no");
        CHECK(finite, "the last checkpoint holds finite weights");
        mb_lora_free(lo);
        mb_model_free(m);
    }
    free(latest);
}

static void reference_cache_is_keyed_and_never_stale(void) {
    static char out[1 << 16];
    char cmd[2048], cmd2[2200];
    const char *run = t_tmp("refcache");
    /* each run replaces the last one's files but the keyed cache, which it reuses when it fits */
    t_dpo_cmd(cmd, sizeof cmd, run, "--max_steps 3 --precompute_ref_log_probs --lora_dropout 0 --overwrite_output_dir");
    CHECK(t_run(cmd, out, sizeof out) == 0 && strstr(out, "computed for 12 pairs"), "first run computes:\n%s", out);
    CHECK(t_run(cmd, out, sizeof out) == 0 && strstr(out, "(cached, key"), "second run reuses:\n%s", out);
    snprintf(cmd2, sizeof cmd2, "%s --max_completion_length 12", cmd);
    /* the cached reference gives the metrics of the on-the-fly reference */
    const char *plain = t_tmp("refplain");
    t_dpo_cmd(cmd, sizeof cmd, plain, "--max_steps 3 --lora_dropout 0");
    CHECK(t_run(cmd, out, sizeof out) == 0, "%s", out);
    char a[300], b[300];
    snprintf(a, sizeof a, "%s/metrics.jsonl", run);
    snprintf(b, sizeof b, "%s/metrics.jsonl", plain);
    char *ta = NULL, *tb = NULL;
    size_t na, nb;
    CHECK_OK(mb_read_file(b, &tb, &nb));
    CHECK_OK(mb_read_file(a, &ta, &na)); /* the newest run's first line */
    if (ta && tb) {
        MbJsonDoc da, db;
        char *la = ta, *lb = tb;
        for (char *p = ta; *p; p++)
            if (*p == '\n' && p[1] && strstr(p + 1, "\"step\": 1,") == p + 2) la = p + 1; /* the newest step-1 line */
        la[strcspn(la, "\n")] = 0, lb[strcspn(lb, "\n")] = 0;
        if (!json_parse("a", la, strlen(la), &da) && !json_parse("b", lb, strlen(lb), &db)) {
            const MbJson *x = json_get(&da, json_root(&da), "rewards/margins"), *y = json_get(&db, json_root(&db), "rewards/margins");
            CHECK(x && y && fabs(x->num - y->num) <= 1e-6, "cached vs on-the-fly reference: margins %g vs %g",
                  x ? x->num : NAN, y ? y->num : NAN);
            if (x && y) printf("    step 1 rewards/margins: cached reference %.9g, on the fly %.9g\n", x->num, y->num);
            json_free(&da), json_free(&db);
        }
    }
    free(ta), free(tb);
    CHECK(t_run(cmd2, out, sizeof out) == 0 && strstr(out, "is stale"), "other settings recompute:\n%s", out);
}

static void eval_command_prints_trl_metrics(void) {
    static char out[1 << 16];
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "%s eval --model " FIX "/model --lora " FIX "/adapter_qk --data " FIX "/data.jsonl --max_length 36 "
             "--max_prompt_length 24 --max_completion_length 20 --per_device_eval_batch_size 2",
             t_medbot());
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "%s", out);
    const char *names[] = {"eval_loss", "eval_rewards/chosen", "eval_rewards/accuracies", "eval_logps/rejected",
                           "eval_logits/chosen"};
    for (size_t i = 0; i < 5; i++) CHECK(strstr(out, names[i]), "prints %s", names[i]);
    printf("%s", out);
}

static void peft_files_round_trip(void) {
    MbModel *m;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    MbLora *a = NULL, *b = NULL;
    CHECK_OK(mb_lora_load(m, FIX "/adapter_all", &a));
    const char *dir = t_tmp("peft");
    CHECK_OK(mb_lora_save(a, dir, "tests/fixtures/dpo/model"));
    CHECK_OK(mb_lora_load(m, dir, &b));
    if (a && b) {
        CHECK(a->r == b->r && a->alpha == b->alpha && a->use_rslora == b->use_rslora && a->targets == b->targets &&
                  a->scale == b->scale,
              "config survives");
        CHECK(!memcmp(a->params, b->params, a->n_params * sizeof(float)), "weights survive bit for bit");
    }
    char *cfg = mb_path_join(dir, "adapter_config.json"), *text;
    size_t n;
    CHECK_OK(mb_read_file(cfg, &text, &n));
    const char *keys[] = {"\"peft_type\": \"LORA\"", "\"task_type\": \"CAUSAL_LM\"", "\"r\": 4", "\"use_rslora\": true",
                          "\"target_modules\": [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]"};
    for (size_t i = 0; text && i < 5; i++) CHECK(strstr(text, keys[i]), "adapter_config.json has %s", keys[i]);
    free(text), free(cfg);
    /* refused: DoRA, an unknown module, modules_to_save */
    const char *bad[][2] = {{"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"use_dora\":true}", "DoRA"},
                            {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"lm_head\"]}", "not a Llama projection"},
                            {"{\"peft_type\":\"LORA\",\"r\":4,\"target_modules\":[\"q_proj\"],\"modules_to_save\":[\"lm_head\"]}", "modules_to_save"},
                            {"{\"peft_type\":\"PREFIX_TUNING\"}", "not a LoRA adapter"}};
    for (size_t i = 0; i < 4; i++) {
        char *p = mb_path_join(dir, "adapter_config.json");
        CHECK_OK(mb_write_file(p, bad[i][0], strlen(bad[i][0])));
        MbLora *c = NULL;
        CHECK(mb_lora_load(m, dir, &c) != MB_OK && strstr(mb_last_error(), bad[i][1]) && strstr(mb_last_error(), p),
              "refused with '%s': %s", bad[i][1], mb_last_error());
        printf("    refused: %s\n", mb_last_error());
        mb_lora_free(c);
        free(p);
    }
    mb_lora_free(a), mb_lora_free(b);
    mb_model_free(m);
}

static void card_config_yaml_is_read(void) {
    static char out[1 << 16];
    char cmd[2048];
    /* the card's block, with the settings this fixture model cannot take overridden on the command line */
    snprintf(cmd, sizeof cmd,
             "%s dpo --config weights/dpo_card.yaml --load_in_4bit false --model " FIX "/model --data " FIX "/data.jsonl "
             "--output %s --max_steps 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 --threads 1",
             t_medbot(), t_tmp("yaml"));
    int rc = t_run(cmd, out, sizeof out);
    CHECK(rc == 0, "%s", out);
    CHECK(strstr(out, "LoRA r=64 alpha=8 on q_proj k_proj"), "r, lora_alpha, target_modules from the card:\n%s", out);
    CHECK(strstr(out, "loss sigmoid, beta 0.1, lr 5e-06 cosine, batch 2 x 1 accumulation, gradient checkpointing"),
          "the card's optimisation settings, command line winning:\n%s", out);
    CHECK(strstr(out, "note: effective_batch_size 256"), "effective_batch_size noted");
    /* an unknown key is an error with file and line */
    const char *y = t_tmp("bad.yaml");
    write_text(y, "beta: 0.1\nfrobnicate: 3 # what\n");
    snprintf(cmd, sizeof cmd, "%s dpo --config %s --model " FIX "/model --data " FIX "/data.jsonl --output %s",
             t_medbot(), y, t_tmp("yaml2"));
    rc = t_run(cmd, out, sizeof out);
    CHECK(rc > 0 && strstr(out, "bad.yaml:2: unknown setting 'frobnicate'"), "%s", out);
}

/* A one-step DPO run on the fixture with the given extra arguments; its output in out. */
static int small_run(const char *out_dir, const char *extra, char *out, size_t cap) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s dpo --model " FIX "/model --data " FIX "/data.jsonl --output %s --max_length 36 --max_prompt_length 24 "
             "--max_completion_length 20 --per_device_train_batch_size 2 --learning_rate 1e-3 --seed 3 --threads 1 %s",
             t_medbot(), out_dir, extra);
    return t_run(cmd, out, cap);
}

/* A list below its key (with a comment and a quoted item) trains the adapter the list on one line
 * trains (in a file with a UTF-8 BOM and CRLF line ends); with the old reader this config was a
 * heap use-after-free. */
static void config_block_list_trains_like_the_flow_list(void) {
    static char out[1 << 16];
    const char *flow = t_tmp("flow.yaml"), *block = t_tmp("block.yaml");
    write_text(flow, "\xef\xbb\xbf---\r\ntarget_modules: [q_proj, 'v_proj']  # flow\r\nr: 4\r\nlora_alpha: \"8\"\r\n");
    write_text(block, "# block\ntarget_modules:\n  - q_proj\n  # a comment between the items\n  - \"v_proj\" # quoted\n"
                      "r: 4\nlora_alpha: 8\nmax_steps: 1\n");
    const char *dirs[2] = {t_tmp("flowout"), t_tmp("blockout")}, *cfgs[2] = {flow, block};
    for (int i = 0; i < 2; i++) {
        char extra[600];
        snprintf(extra, sizeof extra, "--config %s --max_steps 1", cfgs[i]);
        int rc = small_run(dirs[i], extra, out, sizeof out);
        CHECK(rc == 0 && strstr(out, "LoRA r=4 alpha=8 on q_proj v_proj"), "%s:\n%s", cfgs[i], out);
    }
    char a[400], b[400];
    snprintf(a, sizeof a, "%s/adapter_model.safetensors", dirs[0]);
    snprintf(b, sizeof b, "%s/adapter_model.safetensors", dirs[1]);
    CHECK(t_files_equal(a, b), "the block list and the flow list train the same adapter");
    snprintf(a, sizeof a, "%s/adapter_config.json", dirs[0]);
    snprintf(b, sizeof b, "%s/adapter_config.json", dirs[1]);
    CHECK(t_files_equal(a, b), "the same adapter_config.json");
    printf("    block list and flow list: the same targets, byte-identical adapters\n");
}

/* UTF-8 text -> UTF-16 or UTF-32 (bytes 2 or 4, big-endian or not, with a byte-order mark or not) */
static char *t_widen(const char *s, size_t n, int bytes, int big, int bom, size_t *len) {
    char *w = NULL; /* stb_ds */
    for (size_t i = 0; i < n + (size_t)bom;) {
        unsigned cp = 0xFEFF, units[2], nu = 1;
        if (i >= (size_t)bom || !bom) {
            const unsigned char *u = (const unsigned char *)s + i - (size_t)bom;
            size_t k = utf8_valid_len(u, n - (i - (size_t)bom));
            cp = k == 1 ? u[0] : k == 2 ? (u[0] & 0x1Fu) : k == 3 ? (u[0] & 0x0Fu) : (u[0] & 0x07u);
            for (size_t j = 1; j < k; j++) cp = (cp << 6) | (u[j] & 0x3Fu);
            i += k;
        } else {
            i = (size_t)bom;
        }
        units[0] = cp;
        if (bytes == 2 && cp > 0xFFFF) units[0] = 0xD800 + ((cp - 0x10000) >> 10), units[1] = 0xDC00 + (cp & 0x3FF), nu = 2;
        for (unsigned q = 0; q < nu; q++)
            for (int b = 0; b < bytes; b++) arrput(w, (char)(units[q] >> (8 * (big ? bytes - 1 - b : b))));
    }
    *len = (size_t)arrlen(w);
    return w;
}

/* --data, --eval_data and generate --input: a UTF-8 BOM is read, a UTF-16 or UTF-32 file is named
 * (with or without its BOM) and nothing is trained. */
static void data_files_bom_read_utf16_named(void) {
    static char out[1 << 16];
    char *text = NULL, args[1200], path[400];
    size_t n = 0;
    CHECK_OK(mb_read_file(FIX "/data.jsonl", &text, &n));
    if (!text) return;
    /* the parser: the same pairs with and without the BOM */
    MbTokenizer *tok = NULL;
    CHECK_OK(mb_tokenizer_load(FIX "/model", &tok));
    char *bom = mb_malloc(n + 3);
    memcpy(bom, "\xef\xbb\xbf", 3), memcpy(bom + 3, text, n);
    MbDataOptions opt = {36, 24, 20, 0};
    MbDataset d1, d2;
    CHECK_OK(dataset_parse("a.jsonl", text, n, tok, &opt, &d1));
    CHECK_OK(dataset_parse("b.jsonl", bom, n + 3, tok, &opt, &d2));
    CHECK(arrlen(d1.pairs) == 12 && arrlen(d2.pairs) == 12 && d1.pairs[0].np == d2.pairs[0].np &&
              !memcmp(d1.pairs[0].prompt, d2.pairs[0].prompt, (size_t)d1.pairs[0].np * 4),
          "a BOM changes nothing");
    dataset_free(&d1), dataset_free(&d2);
    /* the command line: a BOM file trains */
    const char *bomfile = t_tmp("bom.jsonl"), *run = t_tmp("bomout");
    CHECK_OK(mb_write_file(bomfile, bom, n + 3));
    char cmd[1400];
    snprintf(cmd, sizeof cmd, "%s dpo --model " FIX "/model --data %s --output %s --max_steps 1 --max_length 36 "
             "--max_prompt_length 24 --threads 1",
             t_medbot(), bomfile, run);
    int rc = t_run(cmd, out, sizeof out);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", run);
    CHECK(rc == 0 && strstr(out, "12 pairs for training") && mb_is_file(path), "a UTF-8 BOM is read:\n%s", out);
    free(bom);
    /* UTF-16 and UTF-32: named, nothing trained */
    struct {
        int bytes, big, bom;
        const char *name;
    } enc[] = {{2, 0, 1, "UTF-16 (little-endian)"}, {2, 0, 0, "UTF-16 (little-endian)"}, {2, 1, 1, "UTF-16 (big-endian)"},
               {2, 1, 0, "UTF-16 (big-endian)"},    {4, 0, 1, "UTF-32 (little-endian)"}, {4, 1, 0, "UTF-32 (big-endian)"}};
    const char *wide = t_tmp("wide.jsonl"), *wout = t_tmp("wideout");
    for (size_t i = 0; i < sizeof enc / sizeof *enc; i++) {
        size_t wl;
        char *w = t_widen(text, n, enc[i].bytes, enc[i].big, enc[i].bom, &wl);
        CHECK_OK(mb_write_file(wide, w, wl));
        arrfree(w);
        char want[600];
        snprintf(want, sizeof want, "%s: the file is %s --> save it as UTF-8", wide, enc[i].name);
        snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s --max_steps 1", wide, wout);
        t_expect_failure(args, want, NULL);
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", wout);
        CHECK(!mb_is_file(path), "no adapter");
        if (i == 0) {
            snprintf(args, sizeof args, "dpo --model " FIX "/model --data " FIX "/data.jsonl --eval_data %s --output %s "
                     "--max_steps 1", wide, wout);
            t_expect_failure(args, want, NULL);
            snprintf(args, sizeof args, "generate --model " FIX "/model --input %s --max_new_tokens 2", wide);
            t_expect_failure(args, want, NULL);
        }
    }
    mb_tokenizer_free(tok);
    free(text);
}

/* --eval_split that would leave the held-out set or the training set empty stops with a message
 * instead of training without the evaluation it asked for. */
static void eval_split_leaving_a_side_empty_stops(void) {
    const char *one = t_tmp("one.jsonl"), *run = t_tmp("splitout");
    write_text(one, "{\"prompt\": \"Q: fever?\\nA: \", \"chosen\": \"Rest and drink water.\", \"rejected\": \"Ignore it.\"}\n");
    char args[1200], path[400];
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data %s --output %s --eval_split 0.05 --max_steps 1", one, run);
    t_expect_failure(args, "one.jsonl: eval_split 0.05 of 1 usable pair holds out 1 and leaves 0 for training", "--eval_data");
    snprintf(args, sizeof args, "dpo --model " FIX "/model --data " FIX "/data.jsonl --output %s --eval_split 0.99 "
             "--max_steps 1", run);
    t_expect_failure(args, "data.jsonl: eval_split 0.99 of 12 usable pairs holds out 12 and leaves 0 for training", NULL);
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", run);
    CHECK(!mb_is_file(path), "no adapter");
}

/* Every line of metrics.jsonl is JSON (medbot's reader), a NaN or inf value included (null). */
static void metrics_jsonl_lines_are_json(void) {
    static char out[1 << 16];
    const char *run = t_tmp("metrics");
    int rc = small_run(run, "--max_steps 2 --eval_split 0.25 --logging_steps 1 --eval_steps 1", out, sizeof out);
    CHECK(rc == 0, "%s", out);
    /* and two rows with values JSON cannot hold, written as a failing run would */
    MbTrainer tr;
    memset(&tr, 0, sizeof tr);
    tr.output_dir = run;
    MbLogRow bad = {3, NAN, INFINITY, -INFINITY, {NAN, INFINITY, -INFINITY, 0.5, NAN, 1, 2, 3, NAN}};
    log_append(&tr, &bad, "", 0);
    log_append(&tr, &bad, "eval_", 1);
    char *p = mb_path_join(run, "metrics.jsonl"), *text = NULL;
    size_t n = 0, lines = 0, nulls = 0;
    CHECK_OK(mb_read_file(p, &text, &n));
    for (char *s = text, *e; s && *s; s = e + 1) {
        e = strchr(s, '\n');
        CHECK(e != NULL, "line %zu ends with a newline", lines + 1);
        if (!e) break;
        MbJsonDoc doc;
        MbStatus st = json_parse("metrics.jsonl", s, (size_t)(e - s), &doc);
        CHECK(st == MB_OK, "line %zu: %s", lines + 1, mb_last_error());
        if (!st) {
            const MbJson *r = json_root(&doc), *step = json_get(&doc, r, "step");
            CHECK(r->kind == MB_JSON_OBJECT && step && step->is_int, "line %zu: an object with a step", lines + 1);
            for (const MbJson *v = json_first(&doc, r); v; v = json_next(&doc, v)) nulls += v->kind == MB_JSON_NULL;
            json_free(&doc);
        }
        lines++;
    }
    printf("    %zu lines of metrics.jsonl parse (2 train, 2 eval, 2 with NaN/inf values: %zu nulls)\n", lines, nulls);
    CHECK(lines == 6 && nulls == 14, "want 6 lines and 14 nulls, got %zu and %zu", lines, nulls);
    CHECK(text && !strstr(text, "nan") && !strstr(text, "inf"), "no nan or inf token");
    free(text), free(p);
}

/* An adapter no memory holds (--lora_r 2^31-1 on every projection: terabytes) stops the run with
 * one line, "out of memory allocating N bytes at FILE:LINE", and exit 1 (never a crash), having
 * written nothing. The plain build runs under a 4 GiB `ulimit -v` (a system that overcommits would
 * otherwise hand the memory out); the sanitizers' allocator, which reserves more than that for its
 * shadow, is told to return NULL as malloc does (its log, in a file, may then hold only its
 * warning that it did). */
static void absurd_lora_rank_is_out_of_memory(void) {
    const char *run = t_tmp("absurd_rank"), *logs = t_tmp("absurd_asan"), *asan = getenv("ASAN_OPTIONS");
    char pre[900], cmd[2000];
    static char out[8192];
    mkdir(logs, 0755);
    if (t_sanitized())
        snprintf(pre, sizeof pre, "ASAN_OPTIONS='%s:allocator_may_return_null=1:log_path=%s/asan'", asan ? asan : "", logs);
    else snprintf(pre, sizeof pre, "ulimit -v 4194304;");
    snprintf(cmd, sizeof cmd, "%s %s dpo --model " FIX "/model --data " FIX "/data.jsonl --output %s --lora_r 2147483647 "
             "--lora_target_modules all-linear --max_steps 1 --threads 1 2>&1 >/dev/null", pre, t_medbot(), run);
    int rc = t_run_sh(cmd, out, sizeof out); /* its stderr (stdout holds the run's settings) */
    size_t lines = 0;
    for (char *p = out; *p; p++) lines += *p == '\n';
    printf("    dpo --lora_r 2147483647 --lora_target_modules all-linear -> exit %d: %s", rc, out);
    CHECK(rc == 1 && lines == 1 && strstr(out, "medbot: out of memory allocating ") && strstr(out, " bytes at "),
          "want one line naming the allocation: %s", out);
    CHECK(!strstr(out, "Sanitizer"), "sanitizer report");
    CHECK(!mb_is_dir(run), "nothing written");
    DIR *d = opendir(logs);
    struct dirent *e;
    while (d && (e = readdir(d))) { /* every line of the sanitizers' log: "==PID==WARNING: ... failed to allocate" */
        char *p = e->d_name[0] == '.' ? NULL : mb_path_join(logs, e->d_name), *text = NULL;
        size_t n = 0;
        if (p && !mb_read_file(p, &text, &n))
            for (char *l = strtok(text, "\n"); l; l = strtok(NULL, "\n")) {
                const char *w = strstr(l, "==WARNING: AddressSanitizer failed to allocate ");
                CHECK(w && l[0] == '=' && strspn(l + 2, "0123456789") == (size_t)(w - l - 2), "sanitizer report: %.300s", l);
            }
        free(p), free(text);
    }
    if (d) closedir(d);
}

MB_TEST_MAIN("train", T(gradients_match_finite_differences), T(resume_after_sigkill_is_bit_identical),
             T(corrupt_checkpoints_are_refused), T(bad_data_gives_file_and_line),
             T(nan_loss_stops_and_keeps_the_last_checkpoint), T(reference_cache_is_keyed_and_never_stale),
             T(eval_command_prints_trl_metrics), T(peft_files_round_trip), T(card_config_yaml_is_read),
             T(config_block_list_trains_like_the_flow_list), T(data_files_bom_read_utf16_named),
             T(eval_split_leaving_a_side_empty_stops), T(metrics_jsonl_lines_are_json),
             T(absurd_lora_rank_is_out_of_memory))
