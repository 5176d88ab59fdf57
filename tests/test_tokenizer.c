/* tests/test_tokenizer.c: the Llama 3 tokenizer against tiktoken and Hugging Face tokenizers.
 * The corpus and its expected ids come from tests/ref/make_tokenizer_fixtures.py (both reference
 * libraries agree on every record); the tokenizer files are the committed weights/llama3/. */
#include "test.h"

#define TOK_JSON "weights/llama3/tokenizer.json"
#define TOK_MODEL "weights/llama3/tokenizer.model"
#define CORPUS "tests/fixtures/tokenizer/corpus.safetensors"

/* ---- shared fixtures: loaded once, kept for the whole run ---- */

static MbTokenizer *load_once(const char *path, MbTokenizer **slot) {
    if (!*slot) {
        double t0 = mb_now();
        if (mb_tokenizer_load(path, slot)) T_FAIL("%s", mb_last_error());
        else printf("    loaded %s in %.3f s\n", path, mb_now() - t0);
    }
    return *slot;
}

static MbTokenizer *tok_json(void) {
    static MbTokenizer *t;
    return load_once(TOK_JSON, &t);
}

static MbTokenizer *tok_model(void) {
    static MbTokenizer *t;
    return load_once(TOK_MODEL, &t);
}

typedef struct {
    const unsigned char *data;
    const int64_t *off;
    size_t n;       /* rows */
    size_t elem;    /* bytes per element */
} Rows;

static struct {
    MbSafetensors *st;
    Rows text, ids, plain_ids, pieces, dec_ids, dec_text, dec_skip;
    const int32_t *plain_records;
    size_t n_plain;
} C;

static int rows_get(const char *data, const char *off, size_t elem, Rows *r) {
    const MbTensorInfo *d = mb_safetensors_find(C.st, data), *o = mb_safetensors_find(C.st, off);
    if (!d || !o || o->dtype != MB_DT_I64 || o->numel < 1 || mb_dtype_size(d->dtype) != elem ||
        (uintptr_t)d->data % elem || (uintptr_t)o->data % 8) /* read in place: must be aligned */
        return 0;
    r->data = d->data;
    r->off = o->data;
    r->n = o->numel - 1;
    r->elem = elem;
    return (size_t)r->off[r->n] * elem == d->nbytes;
}

static const void *row(const Rows *r, size_t i, size_t *n) {
    *n = (size_t)(r->off[i + 1] - r->off[i]);
    return r->data + (size_t)r->off[i] * r->elem;
}

static int corpus(void) {
    if (C.st) return 1;
    if (mb_safetensors_open(CORPUS, &C.st)) {
        T_FAIL("%s", mb_last_error());
        return 0;
    }
    const MbTensorInfo *pr = mb_safetensors_find(C.st, "plain_records");
    if (!rows_get("text", "text_offsets", 1, &C.text) || !rows_get("ids", "ids_offsets", 4, &C.ids) ||
        !rows_get("plain_ids", "plain_offsets", 4, &C.plain_ids) || !rows_get("piece_lens", "piece_offsets", 2, &C.pieces) ||
        !rows_get("dec_ids", "dec_offsets", 4, &C.dec_ids) || !rows_get("dec_text", "dec_text_offsets", 1, &C.dec_text) ||
        !rows_get("dec_skip_text", "dec_skip_offsets", 1, &C.dec_skip) || !pr || pr->dtype != MB_DT_I32 ||
        C.ids.n != C.text.n || C.pieces.n != C.text.n || pr->numel != C.plain_ids.n || C.dec_text.n != C.dec_ids.n) {
        T_FAIL("%s: missing or inconsistent tensors --> regenerate with tests/ref/make_tokenizer_fixtures.py", CORPUS);
        mb_safetensors_close(C.st);
        C.st = NULL;
        return 0;
    }
    C.plain_records = pr->data;
    C.n_plain = pr->numel;
    return 1;
}


/* ---- exact ids on the corpus, from both files ---- */

static void check_corpus_ids(MbTokenizer *t, const char *what) {
    if (!t || !corpus()) return;
    size_t checked = 0, equal = 0, bytes = 0, bos_checked = 0, bos_equal = 0;
    double secs = 0;
    for (size_t r = 0; r < C.text.n; r++) {
        size_t len, n_ref, n = 0;
        const char *text = row(&C.text, r, &len);
        const int32_t *ref = row(&C.ids, r, &n_ref);
        int32_t *ids = NULL;
        double t0 = mb_now();
        CHECK_OK(mb_tokenizer_encode(t, text, len, 0, &ids, &n));
        secs += mb_now() - t0;
        checked++, bytes += len;
        if (n == n_ref && !memcmp(ids, ref, n * sizeof *ids)) equal++;
        else if (checked - equal <= 3) {
            char label[64];
            snprintf(label, sizeof label, "%s record %zu (%zu vs %zu ids)", what, r, n, n_ref);
            t_equal_i32(label, ids, ref, MB_MIN(n, n_ref));
            if (n != n_ref) T_FAIL("%s: %zu ids, want %zu", label, n, n_ref);
        }
        free(ids);
        if (r % 10 == 0) { /* with the template: <|begin_of_text|> in front, as HF add_special_tokens=True */
            CHECK_OK(mb_tokenizer_encode(t, text, len, MB_ENCODE_ADD_BOS, &ids, &n));
            bos_checked++;
            bos_equal += n == n_ref + 1 && ids[0] == 128000 && !memcmp(ids + 1, ref, n_ref * sizeof *ids);
            free(ids);
        }
    }
    printf("    %s: %zu/%zu records equal (%zu bytes, %.1f MB/s); with BOS %zu/%zu\n", what, equal, checked, bytes,
           secs > 0 ? (double)bytes / secs / 1e6 : 0.0, bos_equal, bos_checked);
    CHECK(checked > 0 && equal == checked, "%s: %zu of %zu records differ", what, checked - equal, checked);
    CHECK(bos_checked > 0 && bos_equal == bos_checked, "%s: add_bos differs on %zu records", what, bos_checked - bos_equal);
}

static void corpus_ids_equal_from_tokenizer_json(void) { check_corpus_ids(tok_json(), "tokenizer.json"); }
static void corpus_ids_equal_from_tokenizer_model(void) { check_corpus_ids(tok_model(), "tokenizer.model"); }

/* Special-token text encoded as ordinary text (tiktoken encode_ordinary). */
static void corpus_specials_as_text(void) {
    MbTokenizer *ts[2] = {tok_json(), tok_model()};
    if (!ts[0] || !ts[1] || !corpus()) return;
    size_t checked = 0, equal = 0;
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < C.n_plain; i++) {
            size_t len, n_ref, n = 0;
            const char *text = row(&C.text, (size_t)C.plain_records[i], &len);
            const int32_t *ref = row(&C.plain_ids, i, &n_ref);
            int32_t *ids = NULL;
            CHECK_OK(mb_tokenizer_encode(ts[k], text, len, MB_ENCODE_SPECIALS_AS_TEXT, &ids, &n));
            checked++;
            equal += n == n_ref && !memcmp(ids, ref, n * sizeof *ids);
            for (size_t j = 0; j < n; j++) CHECK(ids[j] < 128000, "a special token came out of ordinary text");
            free(ids);
        }
    printf("    %zu/%zu records with special-token text equal (both files)\n", equal, checked);
    CHECK(checked > 0 && equal == checked, "%zu of %zu records differ", checked - equal, checked);
}

/* The regex alone: piece boundaries equal tokenizers' pre_tokenize_str on every record. */
static void corpus_pretokenizer_pieces(void) {
    if (!corpus()) return;
    size_t checked = 0, equal = 0, pieces = 0;
    for (size_t r = 0; r < C.text.n; r++) {
        size_t len, n_ref, k = 0, p = 0;
        const unsigned char *s = row(&C.text, r, &len);
        const uint16_t *ref = row(&C.pieces, r, &n_ref);
        int ok = 1;
        while (p < len && ok) {
            size_t e = pretok_next(s, len, p);
            ok = k < n_ref && e - p == ref[k];
            p = e, k++;
        }
        ok = ok && k == n_ref;
        checked++, equal += ok, pieces += n_ref;
        if (!ok && checked - equal <= 3) T_FAIL("record %zu: piece %zu differs (offset %zu)", r, k - 1, p);
    }
    printf("    %zu/%zu records split into the same %zu pieces\n", equal, checked, pieces);
    CHECK(equal == checked, "%zu records differ", checked - equal);
}

static void pretokenizer_hand_cases(void) {
    /* expected pieces from tokenizers' pre_tokenize_str */
    static const char *const cases[][5] = {
        {"a", " ", " b"}, {"'\xc5\xbf", "a"}, {" \n\n", " "}, {"a", " \n\n", " b"}, {"123", "456", "7"}, {"I", "'M"},
        {"x", "\xe3\x80\x80", "\xe3\x80\x80y"}, {"!!\n\n", " x"}, {" ", " !!"}, {"\xc3\xa9", "\xcc\x81x"},
        {"a", "\xc2\x85", "\302\205b"}, {"\t\t", "\ta"}, {"abc", "\r\n\r\n\r\n"}, {"I", "'ve", " been"}, {"don", "'t"},
        {"DON", "'T"}, {"it", "\xe2\x80\x99s"}, {"  ", " x"}, {"1\xe2\x82\x82"}, {"x", "\xc2\xb2\xc2\xb3"}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        char text[64] = "";
        size_t nw = 0;
        while (nw < 5 && cases[c][nw]) strcat(text, cases[c][nw++]);
        size_t n = strlen(text), p = 0, k = 0;
        while (p < n) {
            size_t e = pretok_next((const unsigned char *)text, n, p);
            CHECK(k < nw && e - p == strlen(cases[c][k]) && !memcmp(text + p, cases[c][k], e - p),
                  "case %zu: piece %zu is '%.*s', want '%s'", c, k, (int)(e - p), text + p, k < nw ? cases[c][k] : "(none)");
            p = e, k++;
        }
        CHECK(k == nw, "case %zu: %zu pieces, want %zu", c, k, nw);
    }
}

/* One tokenizer, two threads encoding at once (the map lookups only read). */
typedef struct {
    const MbTokenizer *t;
    size_t bad[2], done[2];
} ThreadJob;

static void encode_task(void *ctx, int tid, int nt) {
    ThreadJob *job = ctx;
    for (size_t r = (size_t)tid; r < C.text.n; r += (size_t)nt) {
        size_t len, n_ref, n = 0;
        const char *text = row(&C.text, r, &len);
        const int32_t *ref = row(&C.ids, r, &n_ref);
        int32_t *ids = NULL;
        if (mb_tokenizer_encode(job->t, text, len, 0, &ids, &n) || n != n_ref || memcmp(ids, ref, n * sizeof *ids))
            job->bad[tid]++;
        job->done[tid]++;
        free(ids);
    }
}

static void encode_from_two_threads(void) {
    ThreadJob job = {tok_json(), {0, 0}, {0, 0}};
    if (!job.t || !corpus()) return;
    MbPool *pool = mb_pool_new(2);
    mb_pool_run(pool, encode_task, &job);
    CHECK(pool->n == 2 && job.done[0] > 0 && job.done[1] > 0, "both threads ran (%zu, %zu records)", job.done[0], job.done[1]);
    mb_pool_free(pool);
    printf("    %zu + %zu records encoded on two threads, %zu differ\n", job.done[0], job.done[1], job.bad[0] + job.bad[1]);
    CHECK(job.bad[0] + job.bad[1] == 0, "%zu records differ", job.bad[0] + job.bad[1]);
}

/* ---- decoding ---- */

static int utf8_valid_n(const char *s, size_t n) {
    for (size_t i = 0, k; i < n; i += k)
        if (!(k = utf8_valid_len((const unsigned char *)s + i, n - i))) return 0;
    return 1;
}

static void decode_roundtrips_the_corpus(void) {
    MbTokenizer *t = tok_json();
    if (!t || !corpus()) return;
    size_t checked = 0, equal = 0;
    for (size_t r = 0; r < C.text.n; r++) {
        size_t len, n, dlen = 0;
        const char *text = row(&C.text, r, &len);
        const int32_t *ids = row(&C.ids, r, &n);
        char *dec = NULL;
        CHECK_OK(mb_tokenizer_decode(t, ids, n, 0, &dec, &dlen));
        checked++;
        equal += dlen == len && !memcmp(dec, text, len);
        free(dec);
    }
    printf("    decode(encode(x)) == x on %zu/%zu records\n", equal, checked);
    CHECK(checked > 0 && equal == checked, "%zu records do not round-trip", checked - equal);
}

/* Random id sequences (many split UTF-8 characters): U+FFFD as tiktoken and tokenizers put it. */
static void decode_matches_references(void) {
    MbTokenizer *ts[2] = {tok_json(), tok_model()};
    if (!ts[0] || !ts[1] || !corpus()) return;
    size_t checked = 0, equal = 0;
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < C.dec_ids.n; i++)
            for (int skip = 0; skip < 2; skip++) {
                size_t n, wl, dl;
                const int32_t *ids = row(&C.dec_ids, i, &n);
                const char *want = row(skip ? &C.dec_skip : &C.dec_text, i, &wl);
                char *dec;
                CHECK_OK(mb_tokenizer_decode(ts[k], ids, n, skip, &dec, &dl));
                checked++;
                if (dl == wl && !memcmp(dec, want, wl)) equal++;
                else if (checked - equal <= 3) T_FAIL("decode case %zu (skip %d): got '%s'", i, skip, dec);
                free(dec);
            }
    printf("    %zu/%zu decodes equal\n", equal, checked);
    CHECK(equal == checked, "%zu decodes differ", checked - equal);
}

/* The stream's pieces joined equal decode(); no piece ends inside a character. */
static void stream_decode_never_breaks_a_character(void) {
    MbTokenizer *t = tok_json();
    if (!t || !corpus()) return;
    size_t checked = 0, equal = 0, broken = 0;
    for (int which = 0; which < 2; which++) {
        Rows *rows = which ? &C.ids : &C.dec_ids;
        for (size_t i = 0; i < rows->n; i++) {
            size_t n, dl;
            const int32_t *ids = row(rows, i, &n);
            char *dec, *joined = NULL;
            CHECK_OK(mb_tokenizer_decode(t, ids, n, which, &dec, &dl));
            MbTokenStream s;
            mb_token_stream_init(&s, t, which);
            const char *piece;
            size_t pl;
            for (size_t j = 0; j <= n; j++) {
                if (j < n) CHECK_OK(mb_token_stream_put(&s, ids[j], &piece, &pl));
                else CHECK_OK(mb_token_stream_finish(&s, &piece, &pl));
                broken += !utf8_valid_n(piece, pl);
                if (pl) memcpy(arraddnptr(joined, pl), piece, pl);
            }
            mb_token_stream_free(&s);
            checked++;
            equal += (size_t)arrlen(joined) == dl && (dl == 0 || !memcmp(joined, dec, dl));
            arrfree(joined);
            free(dec);
        }
    }
    printf("    %zu/%zu streams equal decode(), %zu pieces with a broken character\n", equal, checked, broken);
    CHECK(equal == checked && broken == 0, "%zu streams differ, %zu broken pieces", checked - equal, broken);
    /* an id that is no token */
    MbTokenStream s;
    const char *piece;
    size_t pl;
    mb_token_stream_init(&s, t, 0);
    CHECK(mb_token_stream_put(&s, 128256, &piece, &pl) == MB_ERR_ARG, "id 128256 is refused");
    CHECK(mb_token_stream_put(&s, -1, &piece, &pl) == MB_ERR_ARG, "id -1 is refused");
    mb_token_stream_free(&s);
}

/* A character split over tokens comes out whole, after its last byte. */
static void stream_decode_holds_back_partial_characters(void) {
    MbTokenizer *t = tok_json();
    if (!t) return;
    const char *pieces[4];
    size_t lens[4];
    MbTokenStream s;
    mb_token_stream_init(&s, t, 0);
    /* U+1F600 is F0 9F 98 80: four single-byte tokens */
    const unsigned char emoji[] = {0xF0, 0x9F, 0x98, 0x80};
    for (int k = 0; k < 4; k++) {
        CHECK_OK(mb_token_stream_put(&s, t->byte_id[emoji[k]], &pieces[k], &lens[k]));
        CHECK(lens[k] == (k < 3 ? 0u : 4u), "byte %d: %zu bytes out", k, lens[k]);
    }
    CHECK(!memcmp(pieces[3], emoji, 4), "the emoji comes out whole");
    /* a partial character that never completes becomes one U+FFFD at the end */
    CHECK_OK(mb_token_stream_put(&s, t->byte_id[0xE4], &pieces[0], &lens[0]));
    CHECK_OK(mb_token_stream_put(&s, t->byte_id[0xBD], &pieces[0], &lens[0]));
    CHECK(lens[0] == 0, "E4 BD is held");
    CHECK_OK(mb_token_stream_finish(&s, &pieces[0], &lens[0]));
    CHECK(lens[0] == 3 && !memcmp(pieces[0], "\xEF\xBF\xBD", 3), "held bytes flush as U+FFFD");
    /* a special token right after a partial character: U+FFFD, then its text */
    CHECK_OK(mb_token_stream_put(&s, t->byte_id[0xE4], &pieces[0], &lens[0]));
    CHECK_OK(mb_token_stream_put(&s, 128009, &pieces[0], &lens[0]));
    CHECK(lens[0] == 13 && !memcmp(pieces[0], "\xEF\xBF\xBD<|eot_id|>", 13), "got '%.*s'", (int)lens[0], pieces[0]);
    mb_token_stream_free(&s);
}

/* ---- both files make the same tokenizer ---- */

static void both_files_make_the_same_tokenizer(void) {
    MbTokenizer *a = tok_json(), *b = tok_model();
    if (!a || !b) return;
    CHECK(a->n_vocab == 128256 && b->n_vocab == 128256, "V %zu / %zu", a->n_vocab, b->n_vocab);
    size_t bad = 0;
    for (size_t id = 0; id < a->n_vocab && id < b->n_vocab; id++)
        bad += a->flags[id] != b->flags[id] || a->len[id] != b->len[id] ||
               memcmp(a->bytes + a->off[id], b->bytes + b->off[id], a->len[id]);
    CHECK(bad == 0, "%zu ids differ in bytes or kind", bad);
    CHECK(hmlen(a->merges) == 280147 && hmlen(b->merges) == hmlen(a->merges), "merges: %td / %td", hmlen(a->merges),
          hmlen(b->merges));
    bad = 0;
    for (ptrdiff_t i = 0; i < hmlen(a->merges); i++) {
        MbMerge m = tok_merge(b, (int32_t)(a->merges[i].key >> 32), (int32_t)(uint32_t)a->merges[i].key);
        bad += m.rank != a->merges[i].value.rank || m.id != a->merges[i].value.id;
    }
    CHECK(bad == 0, "%zu merges differ in rank or result (the tiktoken ranks must give tokenizer.json's merges)", bad);
    CHECK(a->ignore_merges && b->ignore_merges, "ignore_merges");
    CHECK(arrlen(a->prefix) == 1 && arrlen(b->prefix) == 1 && a->prefix[0] == 128000 && b->prefix[0] == 128000 &&
              arrlen(a->suffix) == 0 && arrlen(b->suffix) == 0,
          "template: BOS in front only");
}

static void token_lookups(void) {
    MbTokenizer *ts[2] = {tok_json(), tok_model()};
    for (int k = 0; k < 2; k++) {
        MbTokenizer *t = ts[k];
        if (!t) return;
        size_t len;
        CHECK(mb_tokenizer_vocab_size(t) == 128256, "vocab size");
        CHECK(mb_tokenizer_bos_id(t) == 128000 && mb_tokenizer_eos_id(t) == 128001, "bos/eos");
        CHECK(mb_tokenizer_token_id(t, "<|eot_id|>") == 128009, "<|eot_id|>");
        CHECK(mb_tokenizer_token_id(t, "<|eom_id|>") == 128008, "<|eom_id|>");
        CHECK(mb_tokenizer_token_id(t, "<|python_tag|>") == 128010, "<|python_tag|>");
        CHECK(mb_tokenizer_token_id(t, "<|start_header_id|>") == 128006, "<|start_header_id|>");
        CHECK(mb_tokenizer_token_id(t, "<|finetune_right_pad_id|>") == 128004, "<|finetune_right_pad_id|>");
        CHECK(mb_tokenizer_token_id(t, "<|reserved_special_token_2|>") == 128005, "reserved 2");
        CHECK(mb_tokenizer_token_id(t, "<|reserved_special_token_3|>") == 128011, "reserved 3");
        CHECK(mb_tokenizer_token_id(t, "<|reserved_special_token_247|>") == 128255, "reserved 247");
        CHECK(mb_tokenizer_token_id(t, "<|reserved_special_token_248|>") == -1, "no reserved 248");
        CHECK(mb_tokenizer_token_id(t, "hello") == 15339 && mb_tokenizer_token_id(t, " hello") == 24748, "hello");
        CHECK(mb_tokenizer_is_special(t, 128009) && !mb_tokenizer_is_special(t, 15339), "is_special");
        const char *b = mb_tokenizer_token_bytes(t, 128009, &len);
        CHECK(b && len == 10 && !memcmp(b, "<|eot_id|>", 10), "bytes of 128009");
        b = mb_tokenizer_token_bytes(t, 220, &len);
        CHECK(b && len == 1 && b[0] == ' ', "220 is a space");
        CHECK(!mb_tokenizer_token_bytes(t, 128256, &len) && !mb_tokenizer_token_bytes(t, -5, &len), "out of range");
    }
}

/* ---- input that is not valid UTF-8 ---- */

static void invalid_utf8_encodes_byte_by_byte(void) {
    MbTokenizer *t = tok_json();
    if (!t) return;
    static const char *const cases[] = {"\xff", "a\xc3", "\xe4\xbd", "\xed\xa0\x80 surrogate", "\xc0\xaf overlong",
                                        "h\xc3\xa9llo\xffw\xc3\xb6rld", "\xf4\x90\x80\x80", "12\20034", "  \xfe\n\n",
                                        "<|eot_id|>\xff<|eot_id|>", "\xf0\x9f\x98", "\xe4\xbd\xa0\xe5\xa5"};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        const unsigned char *s = (const unsigned char *)cases[c];
        size_t len = strlen(cases[c]), n, m = 0;
        int32_t *ids;
        CHECK_OK(mb_tokenizer_encode(t, cases[c], len, 0, &ids, &n));
        /* the tokens' bytes are the input, and every invalid byte is its own token */
        char *joined = NULL;
        for (size_t j = 0; j < n; j++) {
            size_t bl;
            const char *b = mb_tokenizer_token_bytes(t, ids[j], &bl);
            memcpy(arraddnptr(joined, bl), b, bl);
        }
        CHECK((size_t)arrlen(joined) == len && !memcmp(joined, s, len), "case %zu: bytes do not round-trip", c);
        arrfree(joined);
        /* ids = the valid runs encoded alone, with the single-byte token of each invalid byte between */
        int32_t *want = NULL;
        for (size_t i = 0; i < len;) {
            size_t j = i, k;
            while (j < len && (k = utf8_valid_len(s + j, len - j))) j += k;
            int32_t *part;
            size_t np;
            CHECK_OK(mb_tokenizer_encode(t, (const char *)s + i, j - i, 0, &part, &np));
            for (size_t q = 0; q < np; q++) arrput(want, part[q]);
            free(part);
            if (j < len) arrput(want, t->byte_id[s[j++]]);
            i = j;
        }
        m = (size_t)arrlen(want);
        CHECK(m == n && t_equal_i32("invalid UTF-8 ids", ids, want, n), "case %zu: %zu ids, want %zu", c, n, m);
        arrfree(want);
        free(ids);
    }
    /* decode of such ids shows U+FFFD where a display needs one */
    int32_t ids[2] = {t->byte_id[0xff], t->byte_id['a']};
    char *dec = NULL;
    size_t dl;
    CHECK_OK(mb_tokenizer_decode(t, ids, 2, 0, &dec, &dl));
    CHECK(dl == 4 && !memcmp(dec, "\xEF\xBF\xBD" "a", 4), "decode of FF 'a'");
    free(dec);
    CHECK(mb_tokenizer_decode(t, (int32_t[]){5, 200000}, 2, 0, &dec, &dl) == MB_ERR_ARG &&
              strstr(mb_last_error(), "200000"),
          "unknown id: %s", mb_last_error());
}

/* ---- the two merge loops agree ---- */

static void bpe_small_and_long_agree(void) {
    MbTokenizer *t = tok_json();
    if (!t) return;
    MbRng rng;
    mb_rng_seed(&rng, 7);
    const char *alpha[] = {"abcdefghij", "etaoinshrdlu", "\xe4\xb8\xad\xe6\x96\x87\xe5\x8c\xbb\xe7\x94\x9f", "0123456789",
                           " \t\n", "\xc3\xa9\xc3\xbc\xc3\x9f"};
    size_t bad = 0, tried = 0;
    for (int it = 0; it < (t_sanitized() ? 300 : 3000); it++) {
        unsigned char buf[MB_BPE_SMALL];
        const char *a = alpha[mb_rng_u64(&rng) % 6];
        size_t n = 2 + mb_rng_u64(&rng) % (MB_BPE_SMALL - 1), al = strlen(a);
        for (size_t i = 0; i < n; i++) buf[i] = (unsigned char)(mb_rng_u64(&rng) % 4 ? (uint64_t)(unsigned char)a[mb_rng_u64(&rng) % al] : mb_rng_u64(&rng));
        int32_t x[MB_BPE_SMALL], y[MB_BPE_SMALL];
        size_t nx = bpe_small(t, buf, n, x), ny = bpe_long(t, buf, n, y);
        tried++;
        bad += nx != ny || memcmp(x, y, nx * sizeof *x);
    }
    printf("    %zu random pieces: %zu differ\n", tried, bad);
    CHECK(bad == 0, "bpe_small and bpe_long differ on %zu pieces", bad);
}

/* ---- a tiny hand-made tokenizer.json: merges, ignore_merges, template, added tokens ---- */

/* A byte-level vocabulary of the 256 bytes (ids 0..255, in byte order) plus extra tokens. */
static void tiny_vocab(char **sb, const char *extra) {
    uint32_t cp[256];
    bytelevel_table(cp);
    sb_printf(sb, "{");
    for (int b = 0; b < 256; b++) {
        char u[8];
        size_t k = 0;
        if (cp[b] < 0x80) u[k++] = (char)cp[b];
        else u[k++] = (char)(0xC0 | (cp[b] >> 6)), u[k++] = (char)(0x80 | (cp[b] & 0x3F));
        u[k] = 0;
        if (u[0] == '"' || u[0] == '\\') sb_printf(sb, "%s\"\\%s\": %d", b ? ", " : "", u, b);
        else sb_printf(sb, "%s\"%s\": %d", b ? ", " : "", u, b);
    }
    sb_printf(sb, "%s}", extra);
}

static const char tiny_pre[] =
    "\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", "
    "\"pattern\": {\"Regex\": \"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| "
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}, \"behavior\": \"Isolated\", "
    "\"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": "
    "false}]}, \"decoder\": {\"type\": \"ByteLevel\"}";

/* A tokenizer.json: tokens 256 "ab", 257 "abc", 258 "bc", 259 "<x>" (added, special); merges
 * given by `merges`; extra JSON members after. */
static char *tiny_json(const char *merges, const char *ignore, const char *more) {
    char *sb = NULL;
    sb_printf(&sb, "{\"version\": \"1.0\", \"added_tokens\": [{\"id\": 259, \"content\": \"<x>\", \"special\": true, "
                   "\"lstrip\": false, \"rstrip\": false, \"single_word\": false, \"normalized\": false}], %s, "
                   "\"model\": {\"type\": \"BPE\", \"ignore_merges\": %s, \"vocab\": ",
              tiny_pre, ignore);
    tiny_vocab(&sb, ", \"ab\": 256, \"abc\": 257, \"bc\": 258");
    sb_printf(&sb, ", \"merges\": %s}%s}", merges, more);
    return sb;
}

static MbStatus load_text(const char *name, const char *text, MbTokenizer **t) {
    char *path = mb_path_join(t_tmp_root(), name);
    MbStatus st = mb_write_file(path, text, strlen(text));
    if (!st) st = mb_tokenizer_load(path, t);
    free(path);
    return st;
}

static void expect_ids(MbTokenizer *t, const char *text, unsigned flags, const int32_t *want, size_t nw) {
    int32_t *ids;
    size_t n;
    CHECK_OK(mb_tokenizer_encode(t, text, strlen(text), flags, &ids, &n));
    CHECK(n == nw && t_equal_i32(text, ids, want, n), "'%s': %zu ids, want %zu", text, n, nw);
    free(ids);
}

/* A copy of s (stb_ds string) with the first `from` replaced by `to`. */
static char *subst(const char *s, const char *from, const char *to) {
    const char *p = strstr(s, from);
    char *out = NULL;
    if (!p) {
        T_FAIL("'%s' not in the template", from);
        p = s + strlen(s), from = "";
    }
    sb_printf(&out, "%.*s%s%s", (int)(p - s), s, to, p + strlen(from));
    return out;
}

static void tiny_tokenizer_json(void) {
    MbTokenizer *t;
    /* merges "a b" then "b c": in "abc" the pair (a,b) ranks first -> "ab" "c"; "abc" is in the
     * vocabulary, so with ignore_merges the whole piece is one token */
    char *js = tiny_json("[\"a b\", \"b c\", \"ab c\"]", "false", ", \"post_processor\": {\"type\": \"TemplateProcessing\", "
                         "\"single\": [{\"SpecialToken\": {\"id\": \"<x>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", "
                         "\"type_id\": 0}}, {\"SpecialToken\": {\"id\": \"<x>\", \"type_id\": 0}}], \"special_tokens\": "
                         "{\"<x>\": {\"id\": \"<x>\", \"ids\": [259], \"tokens\": [\"<x>\"]}}}");
    CHECK_OK(load_text("tiny.json", js, &t));
    if (t) {
        expect_ids(t, "abc", 0, (int32_t[]){257}, 1);        /* a b -> ab; ab c -> abc */
        expect_ids(t, "bca", 0, (int32_t[]){258, 'a'}, 2);   /* b c -> bc */
        expect_ids(t, "abc<x>z", 0, (int32_t[]){257, 259, 'z'}, 3);
        expect_ids(t, "abc<x>z", MB_ENCODE_SPECIALS_AS_TEXT, (int32_t[]){257, '<', 'x', '>', 'z'}, 5);
        expect_ids(t, "ab", MB_ENCODE_ADD_BOS, (int32_t[]){259, 256, 259}, 3); /* the template's prefix and suffix */
        CHECK(mb_tokenizer_bos_id(t) == 259, "bos from the template");
        mb_tokenizer_free(t);
    }
    arrfree(js);
    /* merges as pairs; "b c" ranks before "a b", so "abc" -> a bc (no merge "a bc" exists) */
    js = tiny_json("[[\"b\", \"c\"], [\"a\", \"b\"], [\"ab\", \"c\"]]", "false", "");
    CHECK_OK(load_text("tiny2.json", js, &t));
    if (t) {
        expect_ids(t, "abc", 0, (int32_t[]){'a', 258}, 2);
        expect_ids(t, "ab", MB_ENCODE_ADD_BOS, (int32_t[]){256}, 1); /* no template: nothing added */
        mb_tokenizer_free(t);
    }
    arrfree(js);
    /* no added tokens and no merges: pieces that are not vocabulary entries stay bytes */
    char *base = tiny_json("[]", "false", "");
    js = subst(base, "{\"id\": 259, \"content\": \"<x>\", \"special\": true, \"lstrip\": false, \"rstrip\": false, "
                     "\"single_word\": false, \"normalized\": false}", "");
    arrfree(base);
    CHECK_OK(load_text("bare.json", js, &t));
    if (t) {
        expect_ids(t, "abc<x>", 0, (int32_t[]){'a', 'b', 'c', '<', 'x', '>'}, 6);
        CHECK(mb_tokenizer_token_id(t, "<x>") == -1 && mb_tokenizer_token_id(t, "ab") == 256, "token_id");
        CHECK(mb_tokenizer_bos_id(t) == -1 && mb_tokenizer_eos_id(t) == -1, "no bos, no eos");
        mb_tokenizer_free(t);
    }
    arrfree(js);
    /* ignore_merges: the piece "abc" is a vocabulary entry, so it is one token whatever the merges say */
    js = tiny_json("[[\"b\", \"c\"], [\"a\", \"b\"], [\"ab\", \"c\"]]", "true", "");
    CHECK_OK(load_text("tiny3.json", js, &t));
    if (t) {
        expect_ids(t, "abc", 0, (int32_t[]){257}, 1);
        expect_ids(t, "abcab", 0, (int32_t[]){'a', 258, 256}, 3);
        mb_tokenizer_free(t);
    }
    arrfree(js);
}

/* A tiktoken file with a multi-byte token that no two tokens make up (found by fuzz_load: its
 * empty list of splits went to qsort as NULL): it loads, and that token comes only whole. */
static void tiny_tokenizer_model(void) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *text = NULL;
    for (int b = 0; b < 256; b++) sb_printf(&text, "%c%c== %d\n", b64[b >> 2], b64[(b & 3) << 4], b);
    sb_printf(&text, "YWJj 256\neHk= 257\n"); /* "abc": no split into two tokens; "xy" = x + y */
    MbTokenizer *t;
    CHECK_OK(load_text("tiny.model", text, &t));
    if (t) {
        expect_ids(t, "abc", 0, (int32_t[]){256}, 1);                /* the whole piece is a token */
        expect_ids(t, "abcc", 0, (int32_t[]){'a', 'b', 'c', 'c'}, 4); /* no merge leads to "abc" */
        expect_ids(t, "xyxy", 0, (int32_t[]){257, 257}, 2);
        expect_ids(t, "<|eot_id|>", 0, (int32_t[]){258 + 9}, 1);    /* Llama 3.1 specials after the last rank */
        CHECK(hmlen(t->merges) == 1, "one merge (x, y), got %td", hmlen(t->merges));
        mb_tokenizer_free(t);
    }
    arrfree(text);
}

/* ---- malformed files: a one-line error naming the file, never a crash ---- */

static void malformed_files_fail_cleanly(void) {
    struct {
        const char *name, *why;
        char *text;
    } bad[40];
    size_t nb = 0;
    char *good = tiny_json("[\"a b\"]", "true", ""), *cut = NULL;
    sb_printf(&cut, "%.*s", (int)(strlen(good) / 2), good);
#define BAD(n_, w_, t_) (bad[nb].name = (n_), bad[nb].why = (w_), bad[nb].text = (t_), nb++)
    BAD("truncated.json", "truncated JSON", cut);
    BAD("unknown_merge.json", "a merge naming an unknown token", tiny_json("[\"a zz\"]", "true", ""));
    BAD("merge_result.json", "a merge whose result is not a token", tiny_json("[\"c d\"]", "true", ""));
    BAD("merge_shape.json", "a merge that is not a pair", tiny_json("[\"a b c\"]", "true", ""));
    BAD("merge_type.json", "a merge of the wrong type", tiny_json("[17]", "true", ""));
    BAD("merges_type.json", "merges not an array", tiny_json("{}", "true", ""));
    BAD("ignore_type.json", "ignore_merges not a boolean", tiny_json("[]", "\"yes\"", ""));
    BAD("duplicate_id.json", "two tokens with one id", subst(good, "\"bc\": 258", "\"bc\": 257"));
    BAD("duplicate_token.json", "one token twice (a repeated key)", subst(good, "\"bc\": 258", "\"bc\": 258, \"bc\": 300"));
    BAD("wrong_type.json", "an id that is not an integer", subst(good, "\"bc\": 258", "\"bc\": \"258\""));
    BAD("float_id.json", "an id that is a fraction", subst(good, "\"bc\": 258", "\"bc\": 2.5"));
    BAD("negative_id.json", "a negative id", subst(good, "\"bc\": 258", "\"bc\": -58"));
    BAD("huge_id.json", "an id far too large", subst(good, "\"bc\": 258", "\"bc\": 99999999999"));
    BAD("vocab_type.json", "vocab not an object", subst(good, "\"vocab\": {", "\"vocab\": 5, \"vocab2\": {"));
    BAD("not_bytelevel.json", "a vocabulary key that is not byte-level", subst(good, "\"bc\": 258", "\"b c\": 258"));
    BAD("added_clash.json", "an added token on another token's id", subst(good, "\"id\": 259", "\"id\": 258"));
    BAD("no_byte.json", "a byte without a token", subst(good, "\"a\": 97", "\"aaa\": 97"));
    BAD("other_regex.json", "a pre-tokenizer regex that is not Llama 3's", subst(good, "{1,3}", "{1,4}"));
    BAD("normalizer.json", "a normalizer", subst(good, "\"normalizer\": null", "\"normalizer\": {\"type\": \"NFC\"}"));
    BAD("decoder.json", "a decoder that is not ByteLevel", subst(good, "\"decoder\": {\"type\": \"ByteLevel\"}", "\"decoder\": 7"));
    BAD("model_type.json", "a model that is not BPE", subst(good, "\"type\": \"BPE\"", "\"type\": \"WordPiece\""));
    BAD("lstrip.json", "an added token with lstrip", subst(good, "\"lstrip\": false", "\"lstrip\": true"));
    BAD("content_type.json", "an added token whose content is not a string", subst(good, "\"content\": \"<x>\"", "\"content\": 1"));
    BAD("added_type.json", "added_tokens not an array", subst(good, "\"added_tokens\": [", "\"added_tokens\": 5, \"x\": ["));
    BAD("template.json", "a template naming an unknown special token",
        tiny_json("[]", "true", ", \"post_processor\": {\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": "
                  "{\"id\": \"<y>\"}}, {\"Sequence\": {\"id\": \"A\"}}], \"special_tokens\": {}}"));
    char *model = NULL, *tk[9] = {NULL};
    sb_printf(&model, "{\"model\": [1, 2]}");
    BAD("no_model.json", "no model object", model);
    sb_printf(&tk[0], "IQ== 0\nIg== 1\nnot base64! 2\n");
    BAD("bad_base64.model", "bad base64", tk[0]);
    sb_printf(&tk[1], "IQ== 0\nIg== x1\n");
    BAD("bad_rank.model", "a rank that is not a number", tk[1]);
    sb_printf(&tk[2], "IQ== 0\nIg== 0\n");
    BAD("dup_rank.model", "a rank given twice", tk[2]);
    sb_printf(&tk[3], "IQ== 0\nIQ== 1\n");
    BAD("dup_token.model", "a token given twice", tk[3]);
    sb_printf(&tk[4], "IQ== 0\nIg== 1\n");
    BAD("few_bytes.model", "missing byte tokens", tk[4]);
    sb_printf(&tk[5], "%s", "\x0a\x0b\x3c\x75\x6e\x6b\x3e\x15\x01\x02\x03\x18\x02");
    BAD("sentencepiece.model", "a SentencePiece protobuf", tk[5]);
    sb_printf(&tk[6], "IQ= 0\n");
    BAD("bad_padding.model", "base64 of a bad length", tk[6]);
    sb_printf(&tk[7], "IQ== 99999999999999999999\n");
    BAD("huge_rank.model", "a rank too large", tk[7]);
    sb_printf(&tk[8], " \n");
    BAD("empty.model", "an empty file", tk[8]);
#undef BAD
    for (size_t i = 0; i < nb; i++) {
        MbTokenizer *t = NULL;
        char *path = mb_path_join(t_tmp_root(), bad[i].name);
        CHECK_OK(mb_write_file(path, bad[i].text, strlen(bad[i].text)));
        MbStatus st = mb_tokenizer_load(path, &t);
        const char *msg = mb_last_error();
        CHECK(st != MB_OK && !t, "%s (%s) loaded", bad[i].name, bad[i].why);
        CHECK(strstr(msg, path) && !strchr(msg, '\n'), "%s: message does not name the file in one line: %s", bad[i].name, msg);
        if (st != MB_OK) printf("    %-44s %s\n", bad[i].why, msg + strlen(t_tmp_root()) + 1);
        mb_tokenizer_free(t);
        free(path);
        arrfree(bad[i].text);
    }
    arrfree(good);
    /* the real file cut short; a folder without a tokenizer; a path that does not exist */
    char *text;
    size_t n;
    MbTokenizer *t = NULL;
    if (mb_read_file(TOK_JSON, &text, &n) == MB_OK) {
        char *path = mb_path_join(t_tmp_root(), "tokenizer.json");
        CHECK_OK(mb_write_file(path, text, n / 3));
        CHECK(mb_tokenizer_load(path, &t) == MB_ERR_FORMAT && strstr(mb_last_error(), "invalid JSON at line"),
              "truncated tokenizer.json: %s", mb_last_error());
        free(path);
        free(text);
    }
    char *empty_dir = mb_path_join(t_tmp_root(), "nothing");
    mkdir(empty_dir, 0700);
    CHECK(mb_tokenizer_load(empty_dir, &t) == MB_ERR_IO && strstr(mb_last_error(), empty_dir), "%s", mb_last_error());
    free(empty_dir);
    CHECK(mb_tokenizer_load("/nonexistent/tokenizer.json", &t) == MB_ERR_IO, "missing file");
}

/* ---- the CLI ---- */

static void cli_encode_and_decode(void) {
    MbTokenizer *t = tok_json();
    if (!t) return;
    char cmd[512], out[4096];
    const char *text = "Hello, world! <|eot_id|> \xe4\xbd\xa0\xe5\xa5\xbd  \n\n 37.5\xc2\xb0" "C";
    int32_t *ids;
    size_t n;
    CHECK_OK(mb_tokenizer_encode(t, text, strlen(text), MB_ENCODE_ADD_BOS, &ids, &n));
    char *want = NULL;
    for (size_t i = 0; i < n; i++) sb_printf(&want, i ? " %d" : "%d", (int)ids[i]);
    free(ids);
    const char *paths[] = {"weights/llama3", TOK_JSON, TOK_MODEL};
    for (int k = 0; k < 3; k++) {
        snprintf(cmd, sizeof cmd, "printf 'Hello, world! <|eot_id|> \\344\\275\\240\\345\\245\\275  \\n\\n 37.5\\302\\260C' | %s encode --tokenizer %s --add_bos",
                 t_medbot(), paths[k]);
        int rc = t_run(cmd, out, sizeof out);
        CHECK(rc == 0 && !strncmp(out, want, strlen(want)) && !strcmp(out + strlen(want), "\n"),
              "%s: exit %d, got '%s', want '%s'", paths[k], rc, out, want);
        /* decode what encode printed: the same text (after the BOS) */
        snprintf(cmd, sizeof cmd, "echo '%s' | %s decode --tokenizer %s --skip_special_tokens", want, t_medbot(), paths[k]);
        rc = t_run(cmd, out, sizeof out);
        CHECK(rc == 0 && !strcmp(out, "Hello, world!  \xe4\xbd\xa0\xe5\xa5\xbd  \n\n 37.5\xc2\xb0" "C"), "decode: exit %d '%s'", rc, out);
    }
    arrfree(want);
    static const char *const bad[] = {"echo '12 abc' | %s decode --tokenizer weights/llama3",
                                      "echo '128256' | %s decode --tokenizer weights/llama3",
                                      "echo '-1' | %s decode --tokenizer weights/llama3",
                                      "echo 'hi' | %s encode",
                                      "echo 'hi' | %s encode --tokenizer /nonexistent",
                                      "echo 'hi' | %s encode --tokenizer weights/llama3 --add_bos=maybe"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(cmd, sizeof cmd, bad[i], t_medbot());
        int rc = t_run(cmd, out, sizeof out);
        size_t lines = 0;
        for (char *p = out; *p; p++) lines += *p == '\n';
        CHECK(rc != 0 && rc != -1 && lines == 1 && !strncmp(out, "medbot: ", 8), "'%s': exit %d, output '%s'", cmd, rc, out);
    }
}

MB_TEST_MAIN("tokenizer", T(corpus_ids_equal_from_tokenizer_json), T(corpus_ids_equal_from_tokenizer_model),
             T(corpus_specials_as_text), T(corpus_pretokenizer_pieces), T(encode_from_two_threads), T(pretokenizer_hand_cases),
             T(decode_roundtrips_the_corpus), T(decode_matches_references), T(stream_decode_never_breaks_a_character),
             T(stream_decode_holds_back_partial_characters), T(both_files_make_the_same_tokenizer), T(token_lookups),
             T(invalid_utf8_encodes_byte_by_byte), T(bpe_small_and_long_agree), T(tiny_tokenizer_json), T(tiny_tokenizer_model),
             T(malformed_files_fail_cleanly), T(cli_encode_and_decode))
