/* tests/bench/bench_tokenizer.c: encode throughput of medbot's tokenizer on the tokenizer corpus
 * (tests/fixtures/tokenizer/corpus.safetensors, each record encoded separately), single thread,
 * next to tiktoken and Hugging Face tokenizers timed in the same run by bench_tokenizer.py.
 * The Python is $MEDBOT_PYTHON, else python3; where it or the libraries are missing, medbot's
 * numbers are printed alone and the peers are reported as not measured. No thresholds: numbers. */
#define MEDBOT_NO_MAIN
#include "../../medbot.c"

#define ROUNDS 5

static double encode_corpus(const MbTokenizer *t, const unsigned char *text, const int64_t *off, size_t n, size_t *tokens) {
    double t0 = mb_now();
    *tokens = 0;
    for (size_t r = 0; r < n; r++) {
        int32_t *ids = NULL;
        size_t k = 0;
        if (mb_tokenizer_encode(t, (const char *)text + off[r], (size_t)(off[r + 1] - off[r]), 0, &ids, &k)) {
            fprintf(stderr, "bench_tokenizer: %s\n", mb_last_error());
            exit(1);
        }
        *tokens += k;
        free(ids);
    }
    return mb_now() - t0;
}

int main(int argc, char **argv) {
    if (argc > 1 && argv[1][0] && !strstr("tokenizer", argv[1])) return 0;
    MbSafetensors *st;
    if (mb_safetensors_open("tests/fixtures/tokenizer/corpus.safetensors", &st)) {
        fprintf(stderr, "bench_tokenizer: %s\n", mb_last_error());
        return 1;
    }
    const MbTensorInfo *tx = mb_safetensors_find(st, "text"), *of = mb_safetensors_find(st, "text_offsets");
    const int64_t *off = of->data;
    size_t n = of->numel - 1, bytes = (size_t)off[n];
    printf("tokenizer: encode %zu records, %zu bytes (tests/fixtures/tokenizer/corpus.safetensors), one thread, best of %d\n",
           n, bytes, ROUNDS);

    const char *files[2] = {"weights/llama3/tokenizer.json", "weights/llama3/tokenizer.model"};
    double load[2], enc[2];
    size_t tokens[2];
    for (int f = 0; f < 2; f++) {
        MbTokenizer *t = NULL;
        load[f] = 1e9;
        for (int k = 0; k < 3; k++) {
            mb_tokenizer_free(t);
            double t0 = mb_now();
            if (mb_tokenizer_load(files[f], &t)) {
                fprintf(stderr, "bench_tokenizer: %s\n", mb_last_error());
                return 1;
            }
            load[f] = fmin(load[f], mb_now() - t0);
        }
        enc[f] = 1e9;
        for (int k = 0; k < ROUNDS; k++) enc[f] = fmin(enc[f], encode_corpus(t, tx->data, off, n, &tokens[f]));
        mb_tokenizer_free(t);
    }

    /* the peers, in the same run */
    const char *py = getenv("MEDBOT_PYTHON") && getenv("MEDBOT_PYTHON")[0] ? getenv("MEDBOT_PYTHON") : "python3";
    char cmd[1024], line[512], name[64], why[400];
    snprintf(cmd, sizeof cmd, "%s tests/bench/bench_tokenizer.py 3 2>&1", py);
    double pl[2] = {-1, -1}, pe[2] = {-1, -1};
    size_t ptok[2] = {0, 0};
    const char *peers[2] = {"tiktoken", "tokenizers"};
    char notes[2][400] = {"", ""};
    FILE *p = popen(cmd, "r");
    while (p && fgets(line, sizeof line, p)) {
        double a, b;
        size_t nb, nt;
        for (int k = 0; k < 2; k++) {
            if (sscanf(line, "%63s %lf %lf %zu %zu", name, &a, &b, &nb, &nt) == 5 && !strcmp(name, peers[k]))
                pl[k] = a, pe[k] = b, ptok[k] = nt;
            else if (sscanf(line, "%63s unavailable: %399[^\n]", name, why) == 2 && !strcmp(name, peers[k]))
                snprintf(notes[k], sizeof notes[k], "%s", why);
        }
    }
    int prc = p ? pclose(p) : -1;

    printf("  %-26s %9s %9s %10s %s\n", "", "load s", "MB/s", "tokens", "medbot (tokenizer.json) is x faster");
    for (int f = 0; f < 2; f++)
        printf("  medbot %-19s %9.3f %9.1f %10zu\n", f ? "(tokenizer.model)" : "(tokenizer.json)", load[f],
               (double)bytes / enc[f] / 1e6, tokens[f]);
    for (int k = 0; k < 2; k++) {
        if (pe[k] > 0) {
            printf("  %-26s %9.3f %9.1f %10zu %.2fx%s\n", peers[k], pl[k], (double)bytes / pe[k] / 1e6, ptok[k],
                   pe[k] / enc[0], ptok[k] == tokens[0] ? "" : "  (token count differs from medbot!)");
        } else {
            printf("  %-26s not measured: %s\n", peers[k],
                   notes[k][0] ? notes[k] : prc == 0 ? "no result" : "python could not run tests/bench/bench_tokenizer.py");
        }
    }
    if (pe[0] <= 0 || pe[1] <= 0)
        printf("  (set MEDBOT_PYTHON to a Python with tiktoken, tokenizers and safetensors to measure the peers)\n");
    mb_safetensors_close(st);
    return 0;
}
