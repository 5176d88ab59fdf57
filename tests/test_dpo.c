/* tests/test_dpo.c: LoRA + DPO (and SFT) against TRL 0.27.2 + PEFT 0.18.1 on a tiny fp32 Llama
 * (fixtures from tests/ref/make_dpo_fixtures.py, format in tests/fixtures/dpo/FORMAT.md):
 * tokenization and truncation, one micro-batch (loss, every metric, every LoRA gradient) for
 * each loss type, with and without gradient checkpointing, three optimizer steps with
 * accumulation and clipping, SFT, merge; plus checkpoints, resume and bad data. */
#include "test.h"

#define FIX "tests/fixtures/dpo"
#define METRIC_TOL 1e-5
#define GRAD_TOL 1e-4
#define WEIGHT_TOL 1e-5

/* A tensor of a fixture file as fp32 (or int32 with want_int), malloc'd; NULL if absent. */
static void *fx_tensor(const char *file, const char *name, int want_int, size_t *numel) {
    MbSafetensors *st = NULL;
    if (mb_safetensors_open(file, &st)) {
        T_FAIL("%s", mb_last_error());
        return NULL;
    }
    const MbTensorInfo *t = mb_safetensors_find(st, name);
    void *out = NULL;
    if (!t) T_FAIL("%s: no tensor '%s'", file, name);
    else if (want_int) {
        out = mb_malloc(t->numel * sizeof(int32_t) + 1);
        if (t->dtype == MB_DT_I32) memcpy(out, t->data, t->nbytes);
        else if (t->dtype == MB_DT_I64)
            for (size_t i = 0; i < t->numel; i++) {
                int64_t v;
                memcpy(&v, (const char *)t->data + 8 * i, 8);
                ((int32_t *)out)[i] = (int32_t)v;
            }
        else T_FAIL("%s: '%s' is not an integer tensor", file, name);
    } else {
        out = mb_malloc(t->numel * sizeof(float) + 1);
        mb_convert_to_f32(t->dtype, t->data, out, t->numel);
    }
    if (t && numel) *numel = t->numel;
    mb_safetensors_close(st);
    return out;
}

static float fx_scalar(const char *file, const char *name) {
    float *v = fx_tensor(file, name, 0, NULL), r = v ? v[0] : NAN;
    free(v);
    return r;
}

static int nf4_base; /* the tests below set it: the base loaded with --load_in_4bit, compute fp32 */
static const char *tokenizer_path; /* the tests below set it: NULL, the model folder's tokenizer */

static void job_defaults(MbTrainJob *job, const char *adapter) {
    memset(job, 0, sizeof *job);
    mb_train_config_defaults(&job->cfg);
    job->load_in_4bit = nf4_base;
    job->bnb_4bit_compute_dtype = nf4_base ? "float32" : NULL;
    job->model_dir = FIX "/model";
    job->data_path = FIX "/data.jsonl";
    job->lora_init = adapter;
    job->tokenizer_path = tokenizer_path;
    job->threads = 2;
    MbTrainConfig *c = &job->cfg;
    c->max_prompt_length = 24, c->max_completion_length = 20, c->max_length = 36;
    c->per_device_train_batch_size = 2, c->per_device_eval_batch_size = 2;
    c->beta = 0.1;
    c->seed = 0;
    c->shuffle = 0;
}

/* The scale a metric's error is measured against. The rewards are beta times differences of
 * summed log-probs (about 100 here) that nearly cancel: both TRL and medbot form them in fp32, so
 * their error is relative to beta * |logps|, not to the small difference. logits/chosen and logits/rejected are means of
 * logits of size ~1 that also nearly cancel: measured in logit units. */
static double metric_scale(int k, double ref, double beta, double logps_c, double logps_r) {
    if (k == MET_REWARDS_CHOSEN || k == MET_REWARDS_REJECTED || k == MET_REWARDS_MARGINS)
        return beta * fmax(fabs(logps_c), fabs(logps_r));
    if (k == MET_LOGITS_CHOSEN || k == MET_LOGITS_REJECTED || k == MET_REWARDS_ACCURACIES) return fmax(fabs(ref), 1.0);
    return fmax(fabs(ref), 1e-12);
}

/* |got - ref| / scale <= tol, printed */
static void t_metric(const char *what, double got, double ref, double scale, double tol) {
    double e = fabs(got - ref) / scale;
    printf("    %-28s %14.8g ref %14.8g  |err|/scale %.2e (%5.1f%% of tol %.0e)\n", what, got, ref, e, 100 * e / tol, tol);
    if (!(e <= tol)) T_FAIL("%s: %.3e over tolerance %.1e", what, e, tol);
}

static void data_matches_trl_tokenization_and_truncation(void) {
    MbTrainJob job;
    job_defaults(&job, FIX "/adapter_qk");
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return;
    size_t n = (size_t)arrlen(tr.train.pairs);
    CHECK(n == 12, "12 pairs, got %zu", n);
    int same = 0, truncated_prompt = 0, truncated_completion = 0, keep_end = 0;
    for (size_t i = 0; i < n && i < 12; i++) {
        const MbPair *p = &tr.train.pairs[i];
        char name[64];
        size_t k;
        snprintf(name, sizeof name, "prompt_input_ids.%zu", i);
        int32_t *want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
        int ok = want && k == (size_t)p->np && t_equal_i32(name, p->prompt, want, k);
        free(want);
        snprintf(name, sizeof name, "chosen_input_ids.%zu", i);
        want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
        ok = ok && want && k == (size_t)p->nc && t_equal_i32(name, p->chosen, want, k);
        free(want);
        snprintf(name, sizeof name, "rejected_input_ids.%zu", i);
        want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
        ok = ok && want && k == (size_t)p->nr && t_equal_i32(name, p->rejected, want, k);
        free(want);
        /* the concatenated, keep_end-truncated sequences TRL fed the model */
        const MbPair *one[1] = {p};
        MbBatch bt;
        CHECK_OK(batch_build(&bt, one, 1, 1, 36, 0));
        for (int b = 0; b < 2; b++) {
            snprintf(name, sizeof name, "input_ids.%zu.%s", i, b ? "rejected" : "chosen");
            want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
            ok = ok && want && k == (size_t)bt.lens[b] && t_equal_i32(name, bt.tokens + (size_t)b * bt.T, want, k);
            free(want);
            snprintf(name, sizeof name, "loss_mask.%zu.%s", i, b ? "rejected" : "chosen");
            int32_t *mask = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
            int rows = 0;
            for (size_t t = 1; mask && t < k; t++) rows += mask[t] != 0;
            ok = ok && mask && rows == bt.count[b];
            free(mask);
            keep_end += p->np + (b ? p->nr : p->nc) > 36;
        }
        snprintf(name, sizeof name, "full_prompt_ids.%zu", i);
        want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
        truncated_prompt += want && k > (size_t)p->np;
        free(want);
        snprintf(name, sizeof name, "full_chosen_ids.%zu", i);
        want = fx_tensor(FIX "/tokens.safetensors", name, 1, &k);
        truncated_completion += want && k + 1 > (size_t)p->nc;
        free(want);
        batch_free(&bt);
        same += ok;
    }
    printf("    %d of %zu pairs identical to TRL (prompt, chosen, rejected, concatenated sequences, loss rows); "
           "%d truncated prompts, %d truncated completions, %d keep_end cuts\n", same, n, truncated_prompt,
           truncated_completion, keep_end);
    CHECK(same == 12, "every pair must match TRL");
    CHECK(truncated_prompt && truncated_completion && keep_end, "the fixture covers every truncation");
    trainer_free(&tr);
}

/* Compares the adapter's gradient (or weights) with the fixture tensors "<prefix><PEFT key>". */
static void compare_lora(const MbLora *lo, const float *block, const char *file, const char *prefix, double tol,
                         const char *what) {
    for (int l = 0; l < lo->L; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            const MbLoraPair *p = &lo->pairs[(size_t)l * MB_LAYER_WEIGHTS + i];
            if (!p->A.data) continue;
            for (int ab = 0; ab < 2; ab++) {
                const MbWeight *w = ab ? &p->B : &p->A;
                size_t off = (size_t)((const float *)w->data - lo->params), n;
                char name[256], label[300];
                snprintf(name, sizeof name, "%s" MB_LORA_PREFIX "%d.%s.lora_%c.weight", prefix, l,
                         mb_layer_weights[i].name, ab ? 'B' : 'A');
                float *ref = fx_tensor(file, name, 0, &n);
                if (!ref) continue;
                snprintf(label, sizeof label, "%s L%d %s.%c", what, l, lora_module_name(i), ab ? 'B' : 'A');
                CHECK(n == w->rows * w->cols, "%s size", label);
                if (n == w->rows * w->cols) t_close_rel(label, block + off, ref, n, tol);
                free(ref);
            }
        }
}

/* One micro-batch of pairs (a, a+1) with TRL's settings; compares with a step_*.safetensors. */
static void check_step(const char *adapter, const char *file, int loss_type, double label_smoothing, int first_pair,
                       int ckpt) {
    MbTrainJob job;
    job_defaults(&job, adapter);
    job.cfg.loss_type = loss_type;
    job.cfg.label_smoothing = label_smoothing;
    job.cfg.gradient_checkpointing = ckpt;
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return;
    int idx[2] = {first_pair, first_pair + 1};
    double met[MET_COUNT];
    tr.m->ops->fill(tr.m->ops, tr.lo->grads, 0.0f, tr.lo->n_params);
    CHECK_OK(train_microbatch(&tr, &tr.train, idx, 2, 0, 1, 1.0, met));
    printf("    %s (%s%s, pairs %d-%d):\n", file + strlen(FIX) + 1, mb_loss_names[loss_type], ckpt ? ", checkpointing" : "",
           first_pair, first_pair + 1);
    float lc = fx_scalar(file, "logps/chosen"), lr = fx_scalar(file, "logps/rejected");
    for (int k = 0; k < MET_COUNT; k++) {
        double ref = fx_scalar(file, mb_metric_names[k]);
        t_metric(mb_metric_names[k], met[k], ref, metric_scale(k, ref, job.cfg.beta, lc, lr), METRIC_TOL);
    }
    compare_lora(tr.lo, tr.lo->grads, file, "grad.", GRAD_TOL, "grad");
    trainer_free(&tr);
}

static void dpo_step_sigmoid_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid.safetensors", MB_LOSS_SIGMOID, 0, 0, 0); }
static void dpo_step_sigmoid_second_batch_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_b1.safetensors", MB_LOSS_SIGMOID, 0, 2, 0); }
static void dpo_step_label_smoothing_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_ls.safetensors", MB_LOSS_SIGMOID, 0.1, 0, 0); }
static void dpo_step_hinge_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_hinge.safetensors", MB_LOSS_HINGE, 0, 0, 0); }
static void dpo_step_ipo_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_ipo.safetensors", MB_LOSS_IPO, 0, 0, 0); }
static void dpo_step_robust_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_robust.safetensors", MB_LOSS_ROBUST, 0.1, 0, 0); }
static void dpo_step_all_modules_rslora_matches_trl(void) { check_step(FIX "/adapter_all", FIX "/step_all_sigmoid.safetensors", MB_LOSS_SIGMOID, 0, 0, 0); }
static void dpo_step_gradient_checkpointing_matches_trl(void) { check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_gc.safetensors", MB_LOSS_SIGMOID, 0, 0, 1); }
static void dpo_step_all_modules_checkpointing_matches_trl(void) { check_step(FIX "/adapter_all", FIX "/step_all_sigmoid.safetensors", MB_LOSS_SIGMOID, 0, 0, 1); }

/* QLoRA: the base quantized to NF4 at load (bit-exact with bitsandbytes), compute dtype fp32 */
static void nf4_base_weights_equal_bitsandbytes(void) {
    MbModel *m = NULL;
    MbLoadOptions o = {.threads = 1, .load_in_4bit = 1, .bnb_4bit_compute_dtype = "float32"};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    if (!m) return;
    int checked = 0, bad = 0;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            const MbWeight *w = &m->layers[l].w[i];
            if (mb_layer_weights[i].rows == MB_DIM_1) continue;
            char name[128];
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mb_layer_weights[i].name);
            size_t n;
            float *ref = fx_tensor(FIX "/nf4_weights.safetensors", name, 0, &n), *row = mb_malloc(w->cols * sizeof(float));
            for (size_t r = 0; ref && n == w->rows * w->cols && r < w->rows; r++) {
                weight_row_f32(w, r, 0, w->cols, row);
                bad += memcmp(row, ref + r * w->cols, w->cols * sizeof(float)) != 0;
            }
            checked++;
            free(ref), free(row);
        }
    printf("    %d projections quantized at load: dequantized weights %s bitsandbytes' bit for bit\n", checked,
           bad ? "DIFFER from" : "equal");
    CHECK(checked == 14 && bad == 0, "%d rows differ", bad);
    mb_model_free(m);
}

static void dpo_step_nf4_base_matches_trl_bitsandbytes(void) {
    nf4_base = 1;
    check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_nf4.safetensors", MB_LOSS_SIGMOID, 0, 0, 0);
    nf4_base = 0;
}
static void dpo_step_nf4_base_checkpointing_matches_trl_bitsandbytes(void) {
    nf4_base = 1;
    check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_nf4_gc.safetensors", MB_LOSS_SIGMOID, 0, 0, 1);
    nf4_base = 0;
}

/* A tokenizer whose tokenizer_config.json names <|eot_id|> (436) as eos_token, as Llama-3.1-Instruct's
 * does: TRL appends it to every completion. The ids of all 12 pairs and one micro-batch (pairs 2, 3)
 * equal TRL's with that tokenizer; without the config the EOS falls back to <|end_of_text|> (435). */
static void dpo_eos_from_tokenizer_config_matches_trl(void) {
    MbTrainJob job;
    tokenizer_path = FIX "/tokenizer_eot";
    job_defaults(&job, FIX "/adapter_qk");
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return;
    CHECK(mb_tokenizer_eos_id(tr.tok) == 436, "EOS %d, want <|eot_id|> 436", (int)mb_tokenizer_eos_id(tr.tok));
    int same = 0, eos_seen = 0;
    for (size_t i = 0; i < (size_t)arrlen(tr.train.pairs); i++) {
        const MbPair *p = &tr.train.pairs[i];
        const int32_t *got[3] = {p->prompt, p->chosen, p->rejected};
        int n[3] = {p->np, p->nc, p->nr}, ok = 1;
        const char *keys[3] = {"prompt", "chosen", "rejected"};
        for (int k = 0; k < 3; k++) {
            char name[64];
            size_t len;
            snprintf(name, sizeof name, "%s_input_ids.%zu", keys[k], i);
            int32_t *want = fx_tensor(FIX "/tokens_eot.safetensors", name, 1, &len);
            ok = ok && want && len == (size_t)n[k] && t_equal_i32(name, got[k], want, len);
            eos_seen += k && n[k] && got[k][n[k] - 1] == 436;
            free(want);
        }
        same += ok;
    }
    printf("    %d of 12 pairs tokenized as TRL with eos_token <|eot_id|>; %d completions end in 436\n", same, eos_seen);
    CHECK(same == 12 && eos_seen >= 12, "pairs equal to TRL: %d, EOS 436 on %d completions", same, eos_seen);
    trainer_free(&tr);
    check_step(FIX "/adapter_qk", FIX "/step_qk_sigmoid_eot.safetensors", MB_LOSS_SIGMOID, 0, 2, 0);
    /* the tokenizer alone (no tokenizer_config.json beside it, none in a model folder): Llama 3's default */
    const char *bare = t_tmp("bare_tokenizer.json");
    CHECK_OK(mb_copy_file(FIX "/tokenizer_eot/tokenizer.json", bare));
    MbTokenizer *tok = NULL;
    CHECK_OK(mb_tokenizer_load(bare, &tok));
    CHECK(tok && mb_tokenizer_eos_id(tok) == 435 && !mb_tokenizer_config_path(tok), "fallback EOS 435");
    mb_tokenizer_free(tok);
    /* a config naming a token the vocabulary lacks is refused with the file's name */
    const char *dir = t_tmp("badcfg");
    mkdir(dir, 0755);
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK_OK(mb_copy_file(FIX "/tokenizer_eot/tokenizer.json", path));
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    const char *cfg = "{\"eos_token\": {\"content\": \"<|im_end|>\"}}";
    CHECK_OK(mb_write_file(path, cfg, strlen(cfg)));
    MbStatus st = mb_tokenizer_load(dir, &tok);
    printf("    %s\n", mb_last_error());
    CHECK(st == MB_ERR_FORMAT && strstr(mb_last_error(), "tokenizer_config.json: eos_token \"<|im_end|>\" is not a token"),
          "%s", mb_last_error());
    /* add_bos_token false: honoured by LlamaTokenizerFast only (as transformers 4.57 does) */
    const char *cfgs[2] = {"{\"add_bos_token\": false, \"tokenizer_class\": \"PreTrainedTokenizerFast\"}",
                           "{\"add_bos_token\": false, \"tokenizer_class\": \"LlamaTokenizerFast\"}"};
    for (int k = 0; k < 2; k++) {
        CHECK_OK(mb_write_file(path, cfgs[k], strlen(cfgs[k])));
        tok = NULL;
        CHECK_OK(mb_tokenizer_load(dir, &tok));
        CHECK(tok && mb_tokenizer_add_bos(tok) == !k, "%s: add_bos %d", cfgs[k], tok ? mb_tokenizer_add_bos(tok) : -1);
        mb_tokenizer_free(tok);
    }
    tokenizer_path = NULL;
}

/* Three optimizer steps (2 pairs x 2 accumulation, cosine with warmup, clipping on every step). */
static void check_train(const char *adapter, const char *file, const char *log_file, const char *out, int ckpt) {
    MbTrainJob job;
    job_defaults(&job, adapter);
    MbTrainConfig *c = &job.cfg;
    c->gradient_accumulation_steps = 2, c->max_steps = 3, c->learning_rate = 5e-3;
    c->lr_scheduler_type = MB_SCHED_COSINE, c->warmup_ratio = 0.1, c->max_grad_norm = 0.05;
    c->logging_steps = 1, c->save_steps = 0;
    c->gradient_checkpointing = ckpt;
    job.output_dir = t_tmp(out);
    fflush(stdout);
    CHECK_OK(mb_train(&job));
    char path[300];
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", job.output_dir);
    MbModel *m;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    MbLora *lo = NULL;
    CHECK_OK(mb_lora_load(m, job.output_dir, &lo));
    if (lo) compare_lora(lo, lo->params, file, "", WEIGHT_TOL, "after 3 steps");
    /* the logged grad_norm and learning_rate of each step */
    char *text = NULL, *logp = mb_path_join(job.output_dir, "metrics.jsonl");
    size_t n;
    char *want_text = NULL;
    MbJsonDoc want;
    memset(&want, 0, sizeof want);
    CHECK_OK(mb_read_file(logp, &text, &n));
    CHECK_OK(mb_read_file(log_file, &want_text, &n));
    if (text && want_text && !json_parse(log_file, want_text, n, &want)) {
        const MbJson *hist = json_get(&want, json_root(&want), "log_history");
        const MbJson *h = hist ? json_first(&want, hist) : NULL;
        int steps = 0;
        for (char *line = strtok(text, "\n"); line && h; line = strtok(NULL, "\n")) {
            MbJsonDoc got;
            if (json_parse("metrics.jsonl", line, strlen(line), &got)) continue;
            const MbJson *r = json_root(&got);
            if (json_get(&got, r, "eval_loss")) {
                json_free(&got);
                continue;
            }
            const char *keys[] = {"grad_norm", "learning_rate", "epoch", "loss", "rewards/margins", "logps/chosen", "logits/chosen"};
            int kid[] = {-1, -1, -1, MET_LOSS, MET_REWARDS_MARGINS, MET_LOGPS_CHOSEN, MET_LOGITS_CHOSEN};
            const MbJson *lcj = json_get(&want, h, "logps/chosen"), *lrj = json_get(&want, h, "logps/rejected");
            for (int k = 0; k < 7; k++) {
                const MbJson *a = json_get(&got, r, keys[k]), *b = json_get(&want, h, keys[k]);
                if (!a || !b || !lcj || !lrj) {
                    T_FAIL("step %d: %s missing", steps + 1, keys[k]);
                    continue;
                }
                char label[64];
                snprintf(label, sizeof label, "step %d %s", steps + 1, keys[k]);
                double scale = kid[k] >= 0 ? metric_scale(kid[k], b->num, c->beta, lcj->num, lrj->num) : fmax(fabs(b->num), 1e-12);
                /* transformers rounds the logged loss to 4 decimals */
                t_metric(label, a->num, b->num, scale, kid[k] == MET_LOSS ? 5e-5 / fabs(b->num) + METRIC_TOL : METRIC_TOL);
            }
            const MbJson *gn = json_get(&got, r, "grad_norm");
            CHECK(gn && gn->num > c->max_grad_norm, "clipping was active at step %d", steps + 1);
            h = json_next(&want, h);
            steps++;
            json_free(&got);
        }
        CHECK(steps == 3, "3 logged steps, got %d", steps);
    }
    json_free(&want);
    free(text), free(want_text), free(logp);
    mb_lora_free(lo);
    mb_model_free(m);
}

static void dpo_three_steps_match_trl(void) {
    check_train(FIX "/adapter_qk", FIX "/train_qk.safetensors", FIX "/train_qk_log.json", "train_qk", 0);
}
static void dpo_three_steps_all_modules_match_trl(void) {
    check_train(FIX "/adapter_all", FIX "/train_all.safetensors", FIX "/train_all_log.json", "train_all", 0);
}
static void dpo_three_steps_checkpointing_match_trl(void) {
    check_train(FIX "/adapter_qk", FIX "/train_qk.safetensors", FIX "/train_qk_log.json", "train_qk_gc", 1);
}
static void dpo_three_steps_nf4_base_match_trl_bitsandbytes(void) {
    nf4_base = 1;
    check_train(FIX "/adapter_qk", FIX "/train_qk_nf4.safetensors", FIX "/train_qk_nf4_log.json", "train_qk_nf4", 1);
    nf4_base = 0;
}

static void sft_step_matches_transformers(void) {
    MbTrainJob job;
    job_defaults(&job, FIX "/adapter_qk");
    job.sft = 1;
    MbTrainer tr;
    CHECK_OK(trainer_setup(&tr, &job, 1));
    if (!tr.m) return;
    int idx[2] = {0, 1};
    double met[MET_COUNT];
    tr.m->ops->fill(tr.m->ops, tr.lo->grads, 0.0f, tr.lo->n_params);
    CHECK_OK(train_microbatch(&tr, &tr.train, idx, 2, 0, 1, 1.0, met));
    float got = (float)met[MET_LOSS], ref = fx_scalar(FIX "/sft_qk.safetensors", "loss");
    t_close_rel("sft loss", &got, &ref, 1, METRIC_TOL);
    compare_lora(tr.lo, tr.lo->grads, FIX "/sft_qk.safetensors", "grad.", GRAD_TOL, "sft grad");
    trainer_free(&tr);
}

static void merge_matches_peft_merge_and_unload(void) {
    MbModel *m;
    MbLoadOptions o = {.threads = 1};
    CHECK_OK(mb_model_load(FIX "/model", &o, &m));
    MbLora *lo = NULL;
    CHECK_OK(mb_lora_load(m, FIX "/adapter_all", &lo));
    if (!lo) return;
    for (int l = 0; l < lo->L; l++)
        for (int i = 0; i < MB_LAYER_WEIGHTS; i++) {
            const MbLoraPair *p = &lo->pairs[(size_t)l * MB_LAYER_WEIGHTS + i];
            if (!p->A.data) continue;
            const MbWeight *w = &m->layers[l].w[i];
            float *got = mb_malloc(w->rows * w->cols * sizeof(float));
            for (size_t r = 0; r < w->rows; r++)
                lora_merge_row(w, p->A.data, p->B.data, (size_t)lo->r, lo->scale, r, got + r * w->cols);
            char name[128], label[160];
            snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, mb_layer_weights[i].name);
            size_t n;
            float *ref = fx_tensor(FIX "/merged_all.safetensors", name, 0, &n);
            snprintf(label, sizeof label, "merged L%d %s (fp32)", l, lora_module_name(i));
            if (ref && n == w->rows * w->cols) t_close_rel(label, got, ref, n, 1e-6);
            free(ref);
            free(got);
        }
    /* and the file: bf16 of the same values */
    const char *out = t_tmp("merged");
    CHECK_OK(mb_model_merge_save(m, lo, FIX "/model", out));
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", out);
    size_t n;
    float *q = fx_tensor(path, "model.layers.1.mlp.down_proj.weight", 0, &n);
    float *ref = fx_tensor(FIX "/merged_all.safetensors", "model.layers.1.mlp.down_proj.weight", 0, NULL);
    if (q && ref) {
        int bad = 0;
        for (size_t i = 0; i < n; i++) bad += bf16_to_f32(f32_to_bf16(ref[i])) != q[i];
        CHECK(bad == 0, "%d values of the saved bf16 merge differ from bf16(PEFT's fp32 merge)", bad);
    }
    free(q), free(ref);
    mb_lora_free(lo);
    mb_model_free(m);
}

MB_TEST_MAIN("dpo", T(data_matches_trl_tokenization_and_truncation), T(dpo_step_sigmoid_matches_trl),
             T(dpo_step_sigmoid_second_batch_matches_trl), T(dpo_step_label_smoothing_matches_trl),
             T(dpo_step_hinge_matches_trl), T(dpo_step_ipo_matches_trl), T(dpo_step_robust_matches_trl),
             T(dpo_step_all_modules_rslora_matches_trl), T(dpo_step_gradient_checkpointing_matches_trl),
             T(dpo_step_all_modules_checkpointing_matches_trl), T(nf4_base_weights_equal_bitsandbytes), T(dpo_step_nf4_base_matches_trl_bitsandbytes),
             T(dpo_step_nf4_base_checkpointing_matches_trl_bitsandbytes), T(dpo_three_steps_match_trl),
             T(dpo_three_steps_nf4_base_match_trl_bitsandbytes),
             T(dpo_three_steps_all_modules_match_trl), T(dpo_three_steps_checkpointing_match_trl),
             T(sft_step_matches_transformers), T(merge_matches_peft_merge_and_unload), T(dpo_eos_from_tokenizer_config_matches_trl))
