"""tests/gpu/bench_torch.py: the DPO step and decoding of tests/gpu/bench_gpu.c in PyTorch +
transformers + peft on the same GPU, for the side-by-side table of tests/gpu/check.sh.

    python3 tests/gpu/bench_torch.py [MODEL_DIR] [--device cuda|cpu] [--prompt 128] [--completion 128] [--decode 128]

The model is built from MODEL_DIR/config.json with random weights (bf16). With bitsandbytes
importable, the 7 projections of each layer become NF4 Linear4bit (blocksize 64, double quant,
compute bf16) as the card's QLoRA does; without it the base stays bf16 and the table says so.
LoRA r 64 alpha 8 on q_proj/k_proj (peft), gradient checkpointing, 4 pairs of 128 + 128 tokens,
the DPO sigmoid loss with the reference = adapters disabled, AdamW: what TRL's DPOTrainer runs per
micro-batch. Model FLOPs are counted as in bench_gpu.c. Prints "RESULT key=value" lines last.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="weights/llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model

    dev = torch.device(a.device)
    cfg = LlamaConfig.from_pretrained(a.model)
    cfg.use_cache = False
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with dev:
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(old)
    base = "bf16"
    if dev.type == "cuda":
        try:
            import bitsandbytes as bnb

            for layer in model.model.layers:
                for parent in (layer.self_attn, layer.mlp):
                    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                        lin = getattr(parent, name, None)
                        if lin is None:
                            continue
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False,
                                                     compress_statistics=True, quant_type="nf4")
                        setattr(parent, name, q.to(dev))
            torch.cuda.empty_cache()
            base = "nf4 (bitsandbytes %s)" % bnb.__version__
        except Exception as e:  # noqa: BLE001 - any failure: the bf16 base, said in the table
            base = "bf16 (no bitsandbytes: %s)" % type(e).__name__
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=8, target_modules=["q_proj", "k_proj"], lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    for p in model.parameters():  # fp32 trainable state, as medbot and the card
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)

    P, TP, TC, V = 4, a.prompt, a.completion, cfg.vocab_size
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, V, (P, TP), generator=g)
    chosen = torch.randint(0, V, (P, TC), generator=g)
    rejected = torch.randint(0, V, (P, TC), generator=g)
    ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)]).to(dev)  # (2P, T)

    def logps(m):
        logits = m(input_ids=ids).logits[:, TP - 1:-1].float()  # positions predicting the completion
        lp = torch.gather(logits.log_softmax(-1), 2, ids[:, TP:].unsqueeze(2)).squeeze(2)
        return lp.sum(1)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times, loss = [], float("nan")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for s in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.no_grad(), model.disable_adapter():
            ref = logps(model)
        pol = logps(model)
        d = (pol[:P] - ref[:P]) - (pol[P:] - ref[P:])
        l = -F.logsigmoid(0.1 * d).mean()
        l.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        loss = l.item()
        print("  step %d: %.3f s, loss %.5f" % (s + 1, dt, loss), flush=True)
        if s >= a.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0

    N, M, L, C, Fd = 2 * P * (TP + TC), 2 * P * TC, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
    H, D = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or C // cfg.num_attention_heads
    KD, T = cfg.num_key_value_heads * D, TP + TC
    lin = L * (C * H * D * 2 + C * KD * 2 + 3 * C * Fd)
    attn = L * 2.0 * P * 2.0 * (T * T / 2) * H * D
    flops = 3 * (2 * N * lin + 2 * attn) + 3 * 2 * M * V * C

    model.eval()
    model.config.use_cache = True
    with torch.no_grad():
        p1 = prompt[:1].to(dev)
        sync()
        t0 = time.perf_counter()
        out = model.generate(input_ids=p1, attention_mask=torch.ones_like(p1), max_new_tokens=a.decode,
                             min_new_tokens=a.decode, do_sample=False, pad_token_id=0)
        sync()
        gen_s = time.perf_counter() - t0
    new = out.shape[1] - p1.shape[1]
    print("RESULT torch=%s transformers=%s peft=%s" % (torch.__version__, __import__("transformers").__version__,
                                                         __import__("peft").__version__))
    print("RESULT base=%s" % base)
    print("RESULT step_s=%.4f" % step_s)
    print("RESULT tokens_s=%.1f" % (N / step_s))
    print("RESULT model_tflops=%.2f" % (flops / step_s / 1e12))
    print("RESULT decode_tokens_s=%.2f" % (new / gen_s))  # includes the prefill of the prompt
    print("RESULT peak_gib=%.2f" % peak)
    print("RESULT loss=%.5f" % loss)


if __name__ == "__main__":
    main()
