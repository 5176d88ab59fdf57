/* tests/fuzz/fuzz_encode.c: libFuzzer target for the tokenizer's encoder and decoders (see README.md).
 * Input: one flag byte (add BOS, specials as text), then any bytes as the text. Checked on every
 * input, aborting on a violation:
 *   - tokenizer.json (with the flags) and tokenizer.model (without BOS) give the same ids, after
 *     <|begin_of_text|> when BOS is asked for;
 *   - every id is a token; the tokens' bytes joined are the text, byte for byte (invalid UTF-8
 *     included);
 *   - decode equals the text with invalid UTF-8 replaced by U+FFFD; the streaming decoder's pieces
 *     are valid UTF-8 and join to the same text;
 *   - the two merge loops (bpe_small, bpe_long) agree on the first 64 bytes. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static MbTokenizer *tok_json, *tok_model;

static void die(const char *what) {
    fprintf(stderr, "fuzz_encode: %s\n", what);
    abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    const char *root = getenv("MEDBOT_ROOT") ? getenv("MEDBOT_ROOT") : ".";
    char *j = mb_path_join(root, "weights/llama3/tokenizer.json"), *m = mb_path_join(root, "weights/llama3/tokenizer.model");
    if (mb_tokenizer_load(j, &tok_json) || mb_tokenizer_load(m, &tok_model)) die(mb_last_error());
    free(j), free(m);
    return 0;
}

static int valid_utf8(const char *s, size_t n) {
    for (size_t i = 0, k; i < n; i += k)
        if (!(k = utf8_valid_len((const unsigned char *)s + i, n - i))) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    unsigned flags = data[0] & (MB_ENCODE_ADD_BOS | MB_ENCODE_SPECIALS_AS_TEXT);
    const char *text = (const char *)data + 1;
    size_t len = size - 1, n = 0, n2 = 0;
    int32_t *ids, *ids2;
    const MbTokenizer *t = tok_json;
    /* tokenizer.model without BOS: the same ids as tokenizer.json after its BOS */
    size_t skip = flags & MB_ENCODE_ADD_BOS ? 1 : 0;
    if (mb_tokenizer_encode(t, text, len, flags, &ids, &n) ||
        mb_tokenizer_encode(tok_model, text, len, flags & ~(unsigned)MB_ENCODE_ADD_BOS, &ids2, &n2))
        die(mb_last_error());
    if (skip && (n == 0 || ids[0] != 128000)) die("BOS");
    if (n - skip != n2 || memcmp(ids + skip, ids2, n2 * sizeof *ids)) die("tokenizer.json and tokenizer.model disagree");
    /* bytes round-trip */
    size_t at = 0;
    for (size_t i = skip; i < n; i++) {
        size_t bl;
        const char *b = mb_tokenizer_token_bytes(t, ids[i], &bl);
        if (!b || at + bl > len || memcmp(text + at, b, bl)) die("token bytes do not spell the text");
        if ((flags & MB_ENCODE_SPECIALS_AS_TEXT) && mb_tokenizer_is_special(t, ids[i])) die("special in ordinary text");
        at += bl;
    }
    if (at != len) die("token bytes are shorter than the text");
    /* decode == lossy text; the stream joins to it, never breaking a character */
    char *dec, *lossy = mb_malloc(3 * len + 1);
    size_t dl, ll;
    utf8_lossy((const unsigned char *)text, len, 1, lossy, &ll);
    if (mb_tokenizer_decode(t, ids + skip, n - skip, 0, &dec, &dl)) die(mb_last_error());
    if (dl != ll || memcmp(dec, lossy, dl)) die("decode is not the text with U+FFFD");
    MbTokenStream s;
    mb_token_stream_init(&s, t, 0);
    size_t joined = 0;
    for (size_t i = skip; i <= n; i++) {
        const char *piece;
        size_t pl;
        if (i < n) {
            if (mb_token_stream_put(&s, ids[i], &piece, &pl)) die(mb_last_error());
        } else {
            if (mb_token_stream_finish(&s, &piece, &pl)) die(mb_last_error());
        }
        if (!valid_utf8(piece, pl) || joined + pl > dl || memcmp(dec + joined, piece, pl)) die("stream");
        joined += pl;
    }
    if (joined != dl) die("stream is short");
    mb_token_stream_free(&s);
    /* the two merge loops */
    if (len >= 2) {
        int32_t x[MB_BPE_SMALL], y[MB_BPE_SMALL];
        size_t m = MB_MIN(len, (size_t)MB_BPE_SMALL);
        size_t nx = bpe_small(t, (const unsigned char *)text, m, x), ny = bpe_long(t, (const unsigned char *)text, m, y);
        if (nx != ny || memcmp(x, y, nx * sizeof *x)) die("bpe_small and bpe_long disagree");
    }
    free(dec), free(lossy), free(ids), free(ids2);
    return 0;
}
