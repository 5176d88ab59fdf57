#!/usr/bin/env python3
"""The PyTorch side of tests/bench/bench_dpo.c: one DPO optimizer step of TRL 0.27.2's
DPOTrainer on a PEFT LoRA model (CPU, fp32), on the same model folder, the same token ids and
thread count as medbot, timed. What is timed is the Trainer's inner step: compute_loss (policy
and reference forward, sigmoid loss) + backward + clip_grad_norm_ + AdamW step, one micro-batch
per step. Prints one JSON line.
    python bench_dpo_torch.py MODEL_DIR THREADS PAIRS PROMPT_T COMPLETION_T STEPS GC(0|1)
"""
import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
from trl import DPOConfig, DPOTrainer


def main():
    folder = sys.argv[1]
    threads, pairs, tp, tc, steps, gc = map(int, sys.argv[2:8])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    V = model.config.vocab_size
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=8, target_modules=["q_proj", "k_proj"],
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    # a word-level stand-in tokenizer: DPOTrainer needs one, the step only sees ids
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                  eos_token="<eos>", pad_token="<pad>")
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=pairs, beta=0.1,
                    learning_rate=5e-6, max_grad_norm=1.0, bf16=False, use_cpu=True, report_to=[],
                    gradient_checkpointing=bool(gc), max_length=tp + tc, max_prompt_length=tp,
                    max_completion_length=tc, logging_steps=1000)
    ds = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    g = torch.Generator().manual_seed(0)
    ones = lambda n: torch.ones(pairs, n, dtype=torch.long)
    batch = {"prompt_input_ids": torch.randint(2, V, (pairs, tp), generator=g), "prompt_attention_mask": ones(tp),
             "chosen_input_ids": torch.randint(2, V, (pairs, tc), generator=g), "chosen_attention_mask": ones(tc),
             "rejected_input_ids": torch.randint(2, V, (pairs, tc), generator=g), "rejected_attention_mask": ones(tc)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-6)
    model.train()
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad()
        if s:  # the first step warms up
            times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    print(json.dumps({"step_s": t, "tokens_per_s": 2 * pairs * (tp + tc) / t, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
