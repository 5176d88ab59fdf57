#!/usr/bin/env python3
"""Looks for texts on which tiktoken and Hugging Face tokenizers give different Llama 3 ids.

    python3 tests/ref/check_merge_order.py [SECONDS]      (from the repo root; default 90 s)

The two libraries merge by different rules: tiktoken merges the adjacent pair whose concatenation
has the lowest rank (leftmost first); tokenizers merges the pair listed first in tokenizer.json's
merges, which transformers' converter ordered by (rank of the result, rank of the left part, rank
of the right part). They can only part ways when two different splits of the same token are
mergeable at once (e.g. [ab][a][ba] -> "aba" from either side). medbot follows the merge list
(both of its loaders build it), so on such a text it would give tokenizers' ids.

This draws random words made of short lowercase vocabulary tokens (long pieces that are not
themselves tokens, so BPE really runs) and compares the two libraries; it prints what it finds.
Not part of the fixtures: a search, seeded, to rerun when either library changes.
"""
import os
import random
import sys
import time

import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

os.environ.setdefault("RAYON_NUM_THREADS", "1")
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 90
    ranks = load_tiktoken_bpe("weights/llama3/tokenizer.model")
    enc = tiktoken.Encoding("llama3", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
    hf = tokenizers.Tokenizer.from_file("weights/llama3/tokenizer.json")
    pieces = [t.decode() for t in ranks if t.isascii() and t.isalpha() and t.islower() and len(t) <= 4]
    rng = random.Random(1)
    words = differ = 0
    t0 = time.time()
    while time.time() - t0 < seconds:
        batch = [" " + "".join(rng.choice(pieces) for _ in range(rng.randint(2, 6))) for _ in range(10000)]
        ours = [e.ids for e in hf.encode_batch(batch, add_special_tokens=False)]
        for w, b in zip(batch, ours):
            words += 1
            a = enc.encode_ordinary(w)
            if a != b:
                differ += 1
                if differ <= 5:
                    print(f"differ on {w!r}: tiktoken {[enc.decode_single_token_bytes(t) for t in a]}, "
                          f"tokenizers {[enc.decode_single_token_bytes(t) for t in b]}")
    print(f"{words} random words, {differ} where tiktoken and tokenizers differ")


if __name__ == "__main__":
    main()
