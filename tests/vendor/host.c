/* tests/vendor/host.c: a program that vendors medbot the way the README's "Vendoring medbot" says:
 * medbot.c and medbot.h copied next to its own code, compiled with
 *   cc -std=c99 -DMEDBOT_NO_MAIN -DMEDBOT_HOST_STB_DS -c medbot.c
 * while this file compiles stb_ds's implementation itself (as a program that uses stb_ds does).
 * It trains one DPO step on the tiny model, generates greedily with the adapter it saved, asks for
 * a model that is not there (an error it reports and survives), and prints what it got.
 *   host MODEL_DIR TOKENIZER DATA OUT_DIR */
#define STB_DS_IMPLEMENTATION
#include <stb/stb_ds.h>

#include "medbot.h"

#include <stdio.h>
#include <string.h>

static int print_token(void *ctx, int32_t id, const char *text, size_t len) {
    (void)ctx, (void)id;
    fwrite(text, 1, len, stdout);
    return 0;
}

static int train_one_step(const char *model, const char *tokenizer, const char *data, const char *out) {
    MbTrainJob job;
    memset(&job, 0, sizeof job);
    mb_train_config_defaults(&job.cfg);
    job.model_dir = model, job.tokenizer_path = tokenizer, job.data_path = data, job.output_dir = out;
    job.threads = 1, job.nproc = 1, job.zero_stage = -1, job.device = MB_DEVICE_CPU, job.overwrite_output_dir = 1;
    job.cfg.max_steps = 1, job.cfg.per_device_train_batch_size = 2, job.cfg.gradient_accumulation_steps = 1;
    job.cfg.logging_steps = 1, job.cfg.save_steps = 0, job.cfg.eval_steps = 0, job.cfg.eval_split = 0;
    job.cfg.max_length = 64, job.cfg.max_prompt_length = 32, job.cfg.max_completion_length = 32;
    MbStatus st = mb_train(&job);
    if (st != MB_OK) {
        fprintf(stderr, "host: mb_train: %s\n", mb_last_error());
        return 0;
    }
    return 1;
}

static int generate(const char *model, const char *tokenizer, const char *adapter) {
    MbLoadOptions lo;
    memset(&lo, 0, sizeof lo);
    lo.threads = 1, lo.device = MB_DEVICE_CPU;
    MbModel *m = NULL;
    MbLora *lora = NULL;
    MbTokenizer *tok = NULL;
    MbKVCache *kv = NULL;
    MbSampler *s = NULL;
    int32_t *ids = NULL, out[16];
    size_t n = 0, n_out = 0;
    const char *q = "###Question: What lowers a fever?\n###Answer:";
    MbGenerationConfig g;
    mb_generation_config_defaults(&g);
    g.do_sample = 0, g.max_new_tokens = 16, g.repetition_penalty = 1.0;
    int ok = mb_model_load(model, &lo, &m) == MB_OK && mb_lora_load(m, adapter, &lora) == MB_OK &&
             mb_tokenizer_open(tokenizer, model, adapter, &tok) == MB_OK &&
             mb_tokenizer_encode(tok, q, strlen(q), MB_ENCODE_ADD_BOS, &ids, &n) == MB_OK &&
             mb_kvcache_new(m, 1, (int)n + 16, &kv) == MB_OK && mb_sampler_new(&g, mb_tokenizer_vocab_size(tok), &s) == MB_OK;
    if (ok) {
        mb_model_set_lora(m, lora);
        printf("host: generated: ");
        ok = mb_generate(m, kv, s, tok, ids, n, out, &n_out, print_token, NULL) == MB_OK;
        printf("\nhost: %zu prompt ids, %zu new ids, first %d\n", n, n_out, n_out ? (int)out[0] : -1);
    }
    if (!ok) fprintf(stderr, "host: generate: %s\n", mb_last_error());
    mb_sampler_free(s);
    mb_kvcache_free(kv);
    free(ids);
    mb_tokenizer_free(tok);
    if (m) mb_model_set_lora(m, NULL);
    mb_lora_free(lora);
    mb_model_free(m);
    return ok && n_out > 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: host MODEL_DIR TOKENIZER DATA OUT_DIR\n");
        return 2;
    }
    /* the host's own use of stb_ds, from its own implementation */
    int *mine = NULL;
    for (int i = 0; i < 100; i++) arrput(mine, i);
    printf("host: my stb_ds array holds %d values\n", (int)arrlen(mine));
    arrfree(mine);

    /* an error is a status and a message; the process goes on */
    MbLoadOptions lo;
    memset(&lo, 0, sizeof lo);
    MbModel *none = NULL;
    MbStatus st = mb_model_load("no-such-model-folder", &lo, &none);
    printf("host: mb_model_load(no-such-model-folder) = %d: %s\n", (int)st, mb_last_error());
    if (st == MB_OK) return 1;

    if (!train_one_step(argv[1], argv[2], argv[3], argv[4])) return 1;
    printf("host: trained one DPO step into %s\n", argv[4]);
    if (!generate(argv[1], argv[2], argv[4])) return 1;
    printf("host: done\n");
    return 0;
}
