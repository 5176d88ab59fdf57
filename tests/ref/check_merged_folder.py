#!/usr/bin/env python3
"""A folder written by `medbot merge` is a complete Hugging Face model folder.

Runs (from the repository root, after ./build.sh, in a virtualenv with tests/ref/requirements.txt):
    python tests/ref/check_merged_folder.py
1. `./medbot dpo` trains an adapter for 3 steps on the DPO fixture (the trainer saves the
   tokenizer with it, as TRL does); `./medbot merge` merges it with no --tokenizer;
2. transformers loads the merged folder with AutoModelForCausalLM (dtype="auto") / AutoTokenizer:
   dtype bfloat16, the base's eos ids, the same tokenizer;
3. the merged weights equal PEFT's merge_and_unload of the same adapter, rounded to bf16;
4. greedy generate of transformers on the merged folder (upcast to fp32, as medbot computes)
   gives the ids `medbot generate` gives on it, with no extra flag;
5. a base saved 4-bit by bitsandbytes merges to a dense bf16 folder that transformers loads
   without quantization (no quantization_config left in config.json).
This needs Python, so CI does not run it; its output is quoted in the issue note.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

FIX = "tests/fixtures/dpo"
LEN = ["--max_length", "36", "--max_prompt_length", "24", "--max_completion_length", "20"]
PROMPTS = ["What helps a fever?", "感冒了应该怎么办?", "Is aspirin safe for children?"]
TEMPLATE = "###System: You are a Medical Chatbot, you should friendly answer the question.\n###Question: {}\n###Answer: "


def run(*args):
    return subprocess.run(["./medbot", *args], check=True, capture_output=True, text=True).stdout


def main():
    tmp = tempfile.mkdtemp(prefix="medbot-merge-")
    adapter, merged = os.path.join(tmp, "adapter"), os.path.join(tmp, "merged")
    run("dpo", "--model", f"{FIX}/model", "--data", f"{FIX}/data.jsonl", "--output", adapter, "--lora_target_modules",
        "q_proj,k_proj,v_proj", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-2", "--max_steps", "3",
        "--per_device_train_batch_size", "2", "--seed", "7", *LEN)
    run("merge", "--model", f"{FIX}/model", "--lora", adapter, "--output", merged)
    print(f"adapter: {sorted(os.listdir(adapter))}")
    print(f"merged:  {sorted(os.listdir(merged))}")

    # 2. loads with no argument but dtype="auto" (transformers 4.57 loads float32 unless told; "auto" takes
    # config.json's dtype): bfloat16, the eos ids, the tokenizer
    model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto")
    tok = AutoTokenizer.from_pretrained(merged)
    base_tok = AutoTokenizer.from_pretrained(f"{FIX}/model")
    base_cfg = json.load(open(f"{FIX}/model/config.json"))
    gen = GenerationConfig.from_pretrained(merged) if os.path.exists(f"{merged}/generation_config.json") else \
        model.generation_config
    print(f"transformers: {type(model).__name__}, config dtype {model.config.dtype}, loaded (dtype=\"auto\") as "
          f"{model.dtype}, eos_token_id {gen.eos_token_id} "
          f"(base config {base_cfg['eos_token_id']}), tokenizer eos {tok.eos_token!r}")
    assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16, model.dtype
    assert gen.eos_token_id == base_cfg["eos_token_id"]
    assert tok.eos_token == base_tok.eos_token and tok("fever")["input_ids"] == base_tok("fever")["input_ids"]

    # 3. the weights: PEFT's merge in fp32, rounded to bf16
    base = LlamaForCausalLM.from_pretrained(f"{FIX}/model", dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().to(torch.bfloat16).state_dict()
    ours = load_file(f"{merged}/model.safetensors")
    worst = max((ours[k].float() - peft_merged[k].float()).abs().max().item() for k in ours)
    print(f"weights: {len(ours)} tensors, max |medbot - PEFT merge_and_unload (bf16)| = {worst:.3e}")
    assert set(ours) == set(peft_merged) and worst == 0.0

    # 4. greedy ids, transformers vs medbot, on the merged folder
    fp32 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
    same = 0
    for q in PROMPTS:
        ids = tok(TEMPLATE.format(q), return_tensors="pt")["input_ids"]
        out = fp32.generate(ids, do_sample=False, max_new_tokens=32, repetition_penalty=1.1,
                            eos_token_id=gen.eos_token_id, pad_token_id=tok.pad_token_id)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        got = run("generate", "--model", merged, "--prompt", q, "--greedy", "--max_new_tokens", "32")
        got = got[:-1] if got.endswith("\n") else got
        same += got == want
        print(f"  {q!r}: {'same' if got == want else 'DIFFERENT'} ({out.shape[1] - ids.shape[1]} tokens)")
    assert same == len(PROMPTS)

    # 5. a 4-bit (bitsandbytes) base: merged to dense bf16
    nf4 = "tests/fixtures/nf4/gqa4_nodq_4bit"
    a4, m4 = os.path.join(tmp, "a4"), os.path.join(tmp, "m4")
    b4 = AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.float32, device_map="cpu")
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    p4 = get_peft_model(b4, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    p4.save_pretrained(a4)
    run("merge", "--model", nf4, "--lora", a4, "--output", m4, "--tokenizer", "weights/llama3/tokenizer.json")
    cfg4 = json.load(open(f"{m4}/config.json"))
    d4 = AutoModelForCausalLM.from_pretrained(m4, dtype="auto")
    print(f"4-bit base merged: quantization_config in config.json: {'quantization_config' in cfg4}, "
          f"transformers dtype {d4.dtype}, Linear4bit layers: "
          f"{sum(type(m).__name__ == 'Linear4bit' for m in d4.modules())}")
    assert "quantization_config" not in cfg4 and d4.dtype == torch.bfloat16
    print("merged folders OK")


if __name__ == "__main__":
    sys.exit(main())
