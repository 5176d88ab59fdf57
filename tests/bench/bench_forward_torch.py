#!/usr/bin/env python3
"""The PyTorch side of tests/bench/bench_forward.c: times transformers' LlamaForCausalLM on the
same model folder, the same tokens and the same number of threads, and prints one JSON line.
    python bench_forward_torch.py MODEL_DIR DTYPE(f32|bf16) THREADS PREFILL_T DECODE_STEPS REPS
"""
import json
import sys
import time

import torch
from transformers import LlamaForCausalLM


def main():
    folder, dtype, threads, T, steps, reps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    torch.set_num_threads(threads)
    dt = torch.float32 if dtype == "f32" else torch.bfloat16
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dt).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, V, (1, T), generator=g)
    with torch.inference_mode():
        model(input_ids=tokens[:, :16])  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            model(input_ids=tokens, use_cache=False)
            best = min(best, time.perf_counter() - t0)
        prefill = T / best
        best = float("inf")
        for _ in range(reps):
            out = model(input_ids=tokens[:, :16], use_cache=True)
            past, tok = out.past_key_values, tokens[:, 16:17]
            t0 = time.perf_counter()
            for i in range(steps):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - t0)
        decode = steps / best
    print(json.dumps({"prefill_tok_s": prefill, "decode_tok_s": decode, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
