/* tests/fuzz/fuzz_data.c: libFuzzer target for the JSONL pair parser, dataset_parse (see README.md),
 * with the committed Llama 3 tokenizer (weights/llama3/tokenizer.model under $MEDBOT_ROOT, default .).
 * Input: two bytes of settings (max_prompt_length 1..16, max_completion_length 0..7 (0: none),
 * add_bos; max_length 1..32), then the text of a pairs file. The parser must fail with one line
 * naming the file ("fuzz/pairs.jsonl:LINE: ..." or "fuzz/pairs.jsonl: ..." for the whole file), or
 * return pairs whose token counts respect the truncation limits (a prompt shorter than max_length,
 * completions of at least one token, the EOS) and whose ids are in the vocabulary. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static void die(const char *what) {
    fprintf(stderr, "fuzz_data: %s\n", what);
    abort();
}

static int ids_ok(const int32_t *ids, int n, size_t vocab) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= vocab) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char name[] = "fuzz/pairs.jsonl";
    static MbTokenizer *tok;
    if (!tok) {
        const char *root = getenv("MEDBOT_ROOT");
        char path[4096];
        snprintf(path, sizeof path, "%s/weights/llama3/tokenizer.model", root && root[0] ? root : ".");
        if (mb_tokenizer_load(path, &tok)) die(mb_last_error());
    }
    if (size < 2) return 0;
    MbDataOptions opt = {1 + (data[1] & 31), 1 + (data[0] & 15), (data[0] >> 4) & 7, data[0] >> 7};
    MbDataset ds;
    mb_errbuf[0] = 0;
    MbStatus st = dataset_parse(name, (const char *)data + 2, size - 2, tok, &opt, &ds);
    if (st) {
        const char *e = mb_last_error(), *p = e + sizeof name - 1;
        if (ds.pairs || strncmp(e, name, sizeof name - 1) || *p != ':' || strchr(e, '\n')) die(e);
        if (p[1] != ' ') {
            for (p++; *p >= '0' && *p <= '9'; p++) {}
            if (strncmp(p, ": ", 2)) die(e);
        }
        return 0;
    }
    size_t vocab = mb_tokenizer_vocab_size(tok);
    int last = 0;
    if (!arrlen(ds.pairs)) die("no pairs and no failure");
    for (ptrdiff_t i = 0; i < arrlen(ds.pairs); i++) {
        const MbPair *q = &ds.pairs[i];
        if (q->np < 1 || q->np > opt.max_prompt_length || q->np >= opt.max_length) die("prompt length");
        if (q->nc < 1 || q->nr < 1) die("empty completion");
        if (opt.max_completion_length && (q->nc > opt.max_completion_length || q->nr > opt.max_completion_length))
            die("completion length");
        if (!ids_ok(q->prompt, q->np, vocab) || !ids_ok(q->chosen, q->nc, vocab) || !ids_ok(q->rejected, q->nr, vocab))
            die("an id outside the vocabulary");
        if (q->line <= last) die("line numbers out of order");
        last = q->line;
    }
    dataset_free(&ds);
    return 0;
}
