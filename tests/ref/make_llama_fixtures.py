#!/usr/bin/env python3
"""Tiny random Llama-3.1-architecture models and their reference logits from transformers.

Regenerate (from the repository root, in a virtualenv with tests/ref/requirements.txt):
    python tests/ref/make_llama_fixtures.py

Writes tests/fixtures/llama/<model>/{config.json, *.safetensors} (the model, saved by
transformers' save_pretrained) and tests/fixtures/llama/<model>/ref.safetensors holding:
    tokens_full (B, T) int32, logits_full (B, T, V) fp32          full prefill
    tokens_pad (B, T) int32, lens_pad (B) int32, logits_pad (B, T, V) fp32
                                                                   right-padded batch
    logits_decode (T, V) fp32   sequence 0 of tokens_full fed one token at a time through
                                transformers' KV cache (past_key_values)
The reference is computed in fp32 from the very weights in the folder (bf16 weights are loaded
with torch_dtype=float32, which widens them exactly), with eager attention.
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "llama")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

MODELS = {
    # GQA with H/K = 2, head_dim 24 (not a power of two), vocab 517 (not a multiple of 64),
    # llama3 rope scaling, F32 weights, separate lm_head
    "gqa2_f32": dict(dtype=torch.float32, shard=None, cfg=dict(
        hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, vocab_size=517, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    # GQA with H/K = 4, head_dim 12 with H*D != C, BF16 weights, saved in several shards
    "gqa4_bf16_sharded": dict(dtype=torch.bfloat16, shard="120KB", cfg=dict(
        hidden_size=80, intermediate_size=144, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=12, vocab_size=300, rope_theta=500000.0,
        rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False, rms_norm_eps=1e-5)),
    # tied embeddings (as Llama-3.2 1B/3B), multi-query (K = 1), plain rope, BF16
    "tied_mqa_bf16": dict(dtype=torch.bfloat16, shard=None, cfg=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, vocab_size=1000, rope_theta=10000.0,
        rope_scaling=None, tie_word_embeddings=True, rms_norm_eps=1e-6)),
}

B_FULL, T_FULL = 2, 24
PAD_LENS = [20, 13, 5]


def build(name, spec, seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(bos_token_id=1, eos_token_id=2, max_position_embeddings=131072,
                      attn_implementation="eager", **spec["cfg"])
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights larger than the default init so attention is not uniform
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.to(spec["dtype"])
    kwargs = {"safe_serialization": True}
    if spec["shard"]:
        kwargs["max_shard_size"] = spec["shard"]
    model.save_pretrained(out, **kwargs)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))
    return out


@torch.no_grad()
def reference(folder, seed):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B_FULL, T_FULL), generator=g)
    logits_full = model(input_ids=tokens).logits

    Tp = max(PAD_LENS)
    tokens_pad = torch.randint(0, V, (len(PAD_LENS), Tp), generator=g)
    mask = torch.zeros(len(PAD_LENS), Tp, dtype=torch.long)
    for b, n in enumerate(PAD_LENS):
        mask[b, :n] = 1
        tokens_pad[b, n:] = 0  # right padding with id 0
    logits_pad = model(input_ids=tokens_pad, attention_mask=mask).logits
    # the padded rows must agree with each sequence run alone (a check of the reference itself)
    for b, n in enumerate(PAD_LENS):
        alone = model(input_ids=tokens_pad[b:b + 1, :n]).logits[0]
        err = (alone - logits_pad[b, :n]).abs().max().item()
        assert err < 1e-5, f"padded batch disagrees with the unpadded run: {err}"

    past, steps = None, []
    for t in range(T_FULL):
        o = model(input_ids=tokens[:1, t:t + 1], past_key_values=past, use_cache=True)
        past = o.past_key_values
        steps.append(o.logits[0, 0])
    logits_decode = torch.stack(steps)

    save_file({
        "tokens_full": tokens.to(torch.int32).contiguous(),
        "logits_full": logits_full.float().contiguous(),
        "tokens_pad": tokens_pad.to(torch.int32).contiguous(),
        "lens_pad": torch.tensor(PAD_LENS, dtype=torch.int32),
        "logits_pad": logits_pad.float().contiguous(),
        "logits_decode": logits_decode.float().contiguous(),
    }, os.path.join(folder, "ref.safetensors"), metadata={"format": "pt"})
    err = (logits_decode - logits_full[0]).abs().max().item()
    print(f"  {os.path.basename(folder)}: V={V}, max|logit|={logits_full.abs().max().item():.3f}, "
          f"decode vs prefill {err:.2e}")


def main():
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    os.makedirs(ROOT, exist_ok=True)
    for i, (name, spec) in enumerate(MODELS.items()):
        folder = build(name, spec, seed=1000 + i)
        reference(folder, seed=2000 + i)
    with open(os.path.join(ROOT, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "script": "tests/ref/make_llama_fixtures.py"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
