#!/usr/bin/env python3
"""An adapter trained and saved by medbot loads in PEFT and gives medbot's numbers.

Runs (from the repository root, after ./build.sh, in a virtualenv with tests/ref/requirements.txt):
    python tests/ref/check_peft_interop.py
1. `./medbot dpo` trains a new adapter (all seven projections, rsLoRA) for 3 steps on the DPO
   fixture and saves it (PEFT format);
2. `./medbot eval` prints TRL's eval metrics of base + adapter on the fixture pairs;
3. PEFT's PeftModel.from_pretrained loads the same adapter folder, TRL's DPOTrainer.evaluate()
   computes the same metrics; the script prints both and fails if any differs by more than
   1e-5 of its scale (beta * |logps| for rewards, 1 logit for logits/*).
This needs Python, so CI does not run it; its output is quoted in the issue note.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoTokenizer, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

FIX = "tests/fixtures/dpo"
LEN = ["--max_length", "36", "--max_prompt_length", "24", "--max_completion_length", "20"]


def main():
    out = tempfile.mkdtemp(prefix="medbot-peft-")
    subprocess.run(["./medbot", "dpo", "--model", f"{FIX}/model", "--data", f"{FIX}/data.jsonl", "--output", out,
                    "--lora_target_modules", "all-linear", "--lora_r", "4", "--lora_alpha", "8", "--use_rslora",
                    "--learning_rate", "1e-2", "--max_steps", "3", "--per_device_train_batch_size", "2",
                    "--seed", "7", *LEN], check=True, stdout=subprocess.DEVNULL)
    text = subprocess.run(["./medbot", "eval", "--model", f"{FIX}/model", "--lora", out, "--data",
                           f"{FIX}/data.jsonl", "--per_device_eval_batch_size", "2", *LEN],
                          check=True, capture_output=True, text=True).stdout
    ours = {m.group(1): float(m.group(2)) for m in re.finditer(r"(eval_\S+)\s+(-?[0-9.e+-]+)", text)}

    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(f"{FIX}/model", dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, out)  # the folder medbot wrote
    tok = AutoTokenizer.from_pretrained(f"{FIX}/model")
    rows = [json.loads(line) for line in open(f"{FIX}/rendered.jsonl", encoding="utf-8")]
    ds = Dataset.from_list(rows)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_eval_batch_size=2, beta=0.1, bf16=False,
                     use_cpu=True, report_to=[], max_length=36, max_prompt_length=24, max_completion_length=20)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok)
    theirs = trainer.evaluate()
    scale_r = 0.1 * max(abs(theirs["eval_logps/chosen"]), abs(theirs["eval_logps/rejected"]))
    worst = 0.0
    print(f"adapter written by medbot: {out} ({', '.join(sorted(os.listdir(out)))})")
    print(f"{'metric':28} {'medbot':>14} {'PEFT + TRL':>14} {'|err|/scale':>12}")
    for k in ["eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
              "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen",
              "eval_logits/rejected"]:
        scale = scale_r if "rewards/" in k and "accuracies" not in k else \
            max(abs(theirs[k]), 1.0) if ("logits" in k or "accuracies" in k) else abs(theirs[k])
        err = abs(ours[k] - theirs[k]) / scale
        worst = max(worst, err)
        print(f"{k:28} {ours[k]:14.6f} {theirs[k]:14.6f} {err:12.2e}")
    print(f"worst {worst:.2e} (tolerance 1e-5)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
