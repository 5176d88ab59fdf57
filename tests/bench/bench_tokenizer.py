#!/usr/bin/env python3
"""Times tiktoken and Hugging Face tokenizers on the tokenizer corpus, single thread; run by
bench_tokenizer.c (./build.sh bench tokenizer), which prints them next to medbot.

    python3 tests/bench/bench_tokenizer.py ROUNDS      (from the repo root)

Prints one line per library: "NAME load_s encode_s bytes tokens", or "NAME unavailable: why".
Both encode each record separately, as medbot's bench does: tiktoken with the Llama 3 pattern and
special tokens (allowed_special="all"), tokenizers with add_special_tokens=False. encode_s is the
best of ROUNDS passes over the corpus.
"""
import os
import sys
import time

os.environ["RAYON_NUM_THREADS"] = "1"          # tokenizers: one thread (encode() of one text is serial anyway)
os.environ["TOKENIZERS_PARALLELISM"] = "false"

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def records():
    from safetensors.numpy import load_file
    t = load_file("tests/fixtures/tokenizer/corpus.safetensors")
    text, off = t["text"].tobytes(), t["text_offsets"]
    return [text[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)], len(text)


def bench(name, load, encode, recs, nbytes, rounds):
    t0 = time.perf_counter()
    obj = load()
    load_s = time.perf_counter() - t0
    best, tokens = float("inf"), 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        tokens = sum(len(encode(obj, r)) for r in recs)
        best = min(best, time.perf_counter() - t0)
    print(f"{name} {load_s:.4f} {best:.4f} {nbytes} {tokens}", flush=True)


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    try:
        recs, nbytes = records()
    except Exception as e:  # no numpy/safetensors: neither peer can be measured on the corpus
        print(f"tiktoken unavailable: cannot read the corpus ({e.__class__.__name__}: {e})")
        print(f"tokenizers unavailable: cannot read the corpus ({e.__class__.__name__}: {e})")
        return

    def load_tiktoken():
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        ranks = load_tiktoken_bpe("weights/llama3/tokenizer.model")
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                 "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
        specials = {s: len(ranks) + i for i, s in enumerate(names)}
        return tiktoken.Encoding("llama3", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)

    def load_tokenizers():
        import tokenizers
        return tokenizers.Tokenizer.from_file("weights/llama3/tokenizer.json")

    for name, load, encode in [
            ("tiktoken", load_tiktoken, lambda e, r: e.encode(r, allowed_special="all")),
            ("tokenizers", load_tokenizers, lambda t, r: t.encode(r, add_special_tokens=False).ids)]:
        try:
            bench(name, load, encode, recs, nbytes, rounds)
        except ImportError as e:
            print(f"{name} unavailable: {e}")


if __name__ == "__main__":
    main()
