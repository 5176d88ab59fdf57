/* tests/fuzz/fuzz_load.c: libFuzzer target for the tokenizer loaders (see README.md). The input is
 * the text of a tokenizer.json (it starts with '{') or of a tiktoken tokenizer.model (any other
 * input). A load must succeed or fail with a one-line message naming the file; a tokenizer that
 * loads must encode and decode its own vocabulary bytes without losing a byte. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static void die(const char *what) {
    fprintf(stderr, "fuzz_load: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    MbTokenizer *t;
    mb_errbuf[0] = 0;
    MbStatus st = tok_from_text("fuzz/tokenizer", (const char *)data, size, &t);
    if (st) {
        if (t || strncmp(mb_last_error(), "fuzz/tokenizer: ", 16) || strchr(mb_last_error(), '\n')) die("bad failure");
        return 0;
    }
    /* encode a text made of the first tokens' bytes and some specials; the bytes must come back */
    char *text = NULL;
    for (size_t id = 0; id < t->n_vocab && arrlen(text) < 4096; id += 1 + id / 7) {
        size_t bl;
        const char *b = mb_tokenizer_token_bytes(t, (int32_t)id, &bl);
        if (b && bl) memcpy(arraddnptr(text, bl), b, bl);
    }
    if (size) memcpy(arraddnptr(text, MB_MIN(size, 512)), data, MB_MIN(size, 512));
    int32_t *ids;
    size_t n, at = 0, len = (size_t)arrlen(text);
    if (mb_tokenizer_encode(t, text, len, MB_ENCODE_ADD_BOS, &ids, &n)) die(mb_last_error());
    for (size_t i = (size_t)arrlen(t->prefix); i + (size_t)arrlen(t->suffix) < n; i++) {
        size_t bl;
        const char *b = mb_tokenizer_token_bytes(t, ids[i], &bl);
        if (!b || at + bl > len || memcmp(text + at, b, bl)) die("token bytes do not spell the text");
        at += bl;
    }
    if (at != len) die("token bytes are shorter than the text");
    char *dec;
    size_t dl;
    if (mb_tokenizer_decode(t, ids, n, 1, &dec, &dl)) die(mb_last_error());
    free(dec), free(ids), arrfree(text);
    mb_tokenizer_free(t);
    return 0;
}
