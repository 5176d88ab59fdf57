/* tests/fuzz/fuzz_config.c: libFuzzer target for the --config reader, mb_kv_parse (see README.md).
 * The input is any bytes as the text of a YAML file. The reader must fail with one line that
 * starts with "fuzz/config.yaml:LINE: " and return no entries, or return entries whose keys are
 * non-empty and distinct, whose keys and values are valid UTF-8 without a line break or another
 * control character (a tab aside), with increasing line numbers within the file. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

static void die(const char *what) {
    fprintf(stderr, "fuzz_config: %s\n", what);
    abort();
}

/* 1 when s is valid UTF-8 without control characters other than tab */
static int clean_text(const char *s) {
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = utf8_valid_len((const unsigned char *)s + i, n - i);
        if (!k || (c < 0x20 && c != '\t') || c == 0x7F) return 0;
        i += k;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const char name[] = "fuzz/config.yaml";
    MbKv *kv = NULL;
    size_t count = 99, lines = 1;
    for (size_t i = 0; i < size; i++) lines += data[i] == '\n' || (data[i] == '\r' && !(i + 1 < size && data[i + 1] == '\n'));
    mb_errbuf[0] = 0;
    MbStatus st = mb_kv_parse(name, (const char *)data, size, &kv, &count);
    if (st) {
        const char *e = mb_last_error(), *p = e + sizeof name - 1;
        if (kv || count || strncmp(e, name, sizeof name - 1) || *p != ':' || p[1] < '1' || p[1] > '9') die(e);
        for (p++; *p >= '0' && *p <= '9'; p++) {}
        if (strncmp(p, ": ", 2) || strchr(e, '\n')) die(e);
        return 0;
    }
    int last = 0;
    for (size_t i = 0; i < count; i++) {
        if (!kv[i].key[0] || !clean_text(kv[i].key) || !clean_text(kv[i].value)) die("a bad key or value");
        if (kv[i].line <= last || (size_t)kv[i].line > lines) die("line numbers out of order");
        last = kv[i].line;
        for (size_t j = 0; j < i; j++)
            if (!strcmp(kv[i].key, kv[j].key)) die("a duplicate key");
    }
    mb_kv_free(kv, count);
    return 0;
}
