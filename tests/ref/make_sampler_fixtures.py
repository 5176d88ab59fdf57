#!/usr/bin/env python3
"""Reference fixtures for medbot's sampler section: transformers' own logits processors and
greedy `generate` on the committed fixture models.

Regenerate (from the repository root, in a virtualenv with tests/ref/requirements.txt; CPU, ~20 s):
    python tests/ref/make_sampler_fixtures.py

Writes tests/fixtures/sampler/:
  processors.json + processors.safetensors
      One case per entry of processors.json: {"name", "V", "processors": [{"class": ..., its
      settings}], "generation_config": {...} (chains only)}. processors.safetensors holds
      "{name}.logits" (V) F32 random logits, "{name}.ids" (n) I32 the sequence so far (prompt
      included), "{name}.out" (V) F32 what the listed processors return, applied in the listed
      order, with transformers' classes (RepetitionPenaltyLogitsProcessor,
      NoRepeatNGramLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
      TopPLogitsWarper). For the chains the list is the one GenerationMixin._get_logits_processor
      builds from the generation_config (that is generate's order).
  generate.json
      "greedy": for each model of GREEDY_MODELS and each prompt (token ids), the 64 new ids of
      generate(do_sample=False, repetition_penalty=1.1,
      no_repeat_ngram_size=3, max_new_tokens=64): once with no EOS (all 64 come out), and one
      case per model whose EOS is a token the no-EOS run emits (generation stops on it, as HF
      does, and the EOS is the last id). "min_margin" is the smallest gap between the best and
      second-best processed score over the steps (so a 1e-6 difference in logits cannot flip
      an argmax).
      "text": tests/fixtures/dpo/model + the PEFT adapter tests/fixtures/dpo/adapter_qk
      (unmerged), the card's prompt template, tokenizer(prompt) (BOS added as the card's usage
      does), the same greedy settings, stopping on eos 435 or <|eot_id|> 436 (medbot's stop set
      for this model: config.json's eos_token_id plus <|eot_id|>). "chat" continues the first
      question's conversation: prompt ids + answer ids (stop token dropped) +
      tokenizer("\\n###Question: {q}\\n###Answer: ", add_special_tokens=False).
      "text_nf4": the first question again with the base loaded 4-bit (QLoRA, as the card runs it).

The fixture models are computed in fp32 (bf16 weights widened exactly), eager attention, as
tests/fixtures/llama/ref.safetensors was; the NF4 ones as tests/ref/make_nf4_fixtures.py loads
them (bitsandbytes nf4, double quant, compute dtype float32, its two CPU workarounds). To add a
model, add it to GREEDY_MODELS here and to greedy_models[] in tests/test_sampler.c.
"""
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM,
                          LogitsProcessorList, NoRepeatNGramLogitsProcessor,
                          RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "sampler")

# name -> (folder under tests/fixtures, how transformers loads it):
#   "fp32"          LlamaForCausalLM in fp32
#   "nf4"           load_in_4bit (BitsAndBytesConfig nf4, double quant, compute float32)
#   "prequantized"  a checkpoint saved 4-bit by transformers, loaded back
GREEDY_MODELS = {
    "gqa2_f32": ("llama/gqa2_f32", "fp32"),
    "gqa4_bf16_sharded": ("llama/gqa4_bf16_sharded", "fp32"),
    "tied_mqa_bf16": ("llama/tied_mqa_bf16", "fp32"),
    "gqa2_f32_nf4": ("llama/gqa2_f32", "nf4"),
    "gqa4_bf16_sharded_nf4": ("llama/gqa4_bf16_sharded", "nf4"),
    "tied_mqa_bf16_4bit": ("nf4/tied_mqa_bf16_4bit", "prequantized"),
}
GREEDY = dict(do_sample=False, repetition_penalty=1.1, no_repeat_ngram_size=3, max_new_tokens=64)
MIN_MARGIN = 1e-4
SYSTEM = "You are a Medical Chatbot, you should friendly answer the question."


def render(question, system=SYSTEM):
    return f"###System: {system}\n###Question: {question}\n###Answer: "


# ---- processors ----

def describe(p):
    """A processor as the fixture records it (class name + the settings medbot needs)."""
    d = {"class": type(p).__name__}
    if isinstance(p, RepetitionPenaltyLogitsProcessor):
        assert not p.prompt_ignore_length
        d["penalty"] = p.penalty
    elif isinstance(p, NoRepeatNGramLogitsProcessor):
        d["ngram_size"] = p.ngram_size
    elif isinstance(p, TemperatureLogitsWarper):
        d["temperature"] = p.temperature
    elif isinstance(p, TopKLogitsWarper):
        d["top_k"] = p.top_k  # already max(top_k, min_tokens_to_keep)
        assert p.filter_value == -math.inf
    elif isinstance(p, TopPLogitsWarper):
        d["top_p"] = p.top_p
        d["min_tokens_to_keep"] = p.min_tokens_to_keep
        assert p.filter_value == -math.inf
    else:
        raise ValueError(f"unexpected processor {type(p).__name__}")
    return d


class Cases:
    def __init__(self):
        self.meta, self.tensors = [], {}

    def add(self, name, logits, ids, procs, gen_config=None):
        logits = logits.float().clone().contiguous()
        ids = torch.as_tensor(ids, dtype=torch.long)
        scores = logits.clone()[None]
        for p in procs:
            scores = p(ids[None], scores)
        out = scores[0]
        assert not torch.isnan(out).any()
        entry = {"name": name, "V": logits.numel(), "processors": [describe(p) for p in procs]}
        if gen_config is not None:
            entry["generation_config"] = gen_config
        self.meta.append(entry)
        self.tensors[f"{name}.logits"] = logits
        self.tensors[f"{name}.ids"] = ids.to(torch.int32).contiguous()
        self.tensors[f"{name}.out"] = out.contiguous()
        removed = int(torch.isinf(out).sum() - torch.isinf(logits).sum())
        changed = int((out != logits).sum())
        print(f"  {name:28s} V={logits.numel():6d} n={ids.numel():4d} changed {changed:5d} "
              f"(-inf {removed:5d}): {' -> '.join(d['class'] for d in entry['processors'])}")


def generate_processors(model, gc_kwargs, ids):
    """The processor list generate builds for these settings (its order)."""
    gc = GenerationConfig(**gc_kwargs)
    procs = model._get_logits_processor(generation_config=gc, input_ids_seq_length=len(ids),
                                        encoder_input_ids=torch.as_tensor([ids]),
                                        logits_processor=LogitsProcessorList(), device="cpu",
                                        model_kwargs={})
    return list(procs)


def dyadic_boundary(V, g):
    """Logits whose softmax is exactly representable: probabilities 1/2, 1/4, 1/8, 1/16, 1/16
    at random positions, everything else -inf. Sorted ascending, the cumulative probabilities are
    exactly 1/16, 1/8, 1/4, 1/2, 1, so top_p = 0.75 and 0.5 put the threshold exactly on a
    cumulative value (the two 1/16 tokens tie but fall on the same side of every threshold)."""
    x = torch.full((V,), -math.inf)
    pos = torch.randperm(V, generator=g)[:5]
    vals = torch.tensor([0.0, math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)],
                        dtype=torch.float32)
    x[pos] = vals
    p = torch.sort(x)[0].softmax(-1)
    assert p[-5:].tolist() == [0.0625, 0.0625, 0.125, 0.25, 0.5], p[-5:].tolist()
    return x


def with_repeated_prefix(g, V, n, ngram):
    """A random history whose last ngram-1 tokens also occur earlier (twice, in the first half:
    the 'prompt'), followed by different tokens: NoRepeatNGram must ban both."""
    ids = torch.randint(0, V, (n,), generator=g).tolist()
    pre = ids[-(ngram - 1):]
    for at in (3, n // 3):
        ids[at:at + ngram - 1] = pre
    return ids


def processor_cases(model):
    c = Cases()
    g = torch.Generator().manual_seed(5)
    V = 1000

    def logits(V=V, scale=3.0):
        return torch.randn(V, generator=g) * scale

    def hist(n, V=V):
        return torch.randint(0, V, (n,), generator=g).tolist()

    # repetition penalty: every id in the sequence (prompt included), negative logits multiplied
    x = logits()
    h = hist(60) + hist(5)[:1] * 4  # duplicates
    c.add("rep_1.1", x, h, [RepetitionPenaltyLogitsProcessor(1.1)])
    x = logits()
    h = hist(40)
    x[h[:10]] = 0.0  # exact zeros stay zero
    x[h[10:15]] = -x[h[10:15]].abs()  # certainly negative
    c.add("rep_1.15_zeros_negative", x, h, [RepetitionPenaltyLogitsProcessor(1.15)])
    c.add("rep_0.8", logits(), hist(30), [RepetitionPenaltyLogitsProcessor(0.8)])
    c.add("rep_long_history", logits(), hist(700), [RepetitionPenaltyLogitsProcessor(1.3)])

    # no_repeat_ngram: bans reaching into the prompt, sizes 1..4, too-short histories
    for n in (1, 2, 3, 4):
        ids = with_repeated_prefix(g, V, 80, max(n, 2))
        c.add(f"ngram{n}", logits(), ids, [NoRepeatNGramLogitsProcessor(n)])
    ids = [7, 9, 7, 9, 7]  # the last bigram (9, 7) came before, followed by 9: 9 is banned
    c.add("ngram3_tight", logits(), ids, [NoRepeatNGramLogitsProcessor(3)])
    c.add("ngram3_len2", logits(), hist(2), [NoRepeatNGramLogitsProcessor(3)])
    c.add("ngram4_len2", logits(), hist(2), [NoRepeatNGramLogitsProcessor(4)])

    # temperature
    for t in (0.7, 0.6, 1.3, 0.1):
        c.add(f"temp_{t}", logits(), hist(3), [TemperatureLogitsWarper(t)])

    # top_k, ties at the k-th value kept
    c.add("topk_50", logits(), hist(3), [TopKLogitsWarper(50)])
    c.add("topk_1", logits(), hist(3), [TopKLogitsWarper(1)])
    xq = torch.round(logits() * 2) / 2  # many exact ties
    kth = torch.topk(xq, 37)[0][-1]
    assert (xq >= kth).sum() > 37 and (xq > kth).sum() < 37, "want ties across the k-th value"
    c.add("topk_37_ties", xq, hist(3), [TopKLogitsWarper(37)])
    c.add("topk_gt_V", logits(), hist(3), [TopKLogitsWarper(5000)])
    c.add("topk_1_min_keep_5", logits(), hist(3), [TopKLogitsWarper(1, min_tokens_to_keep=5)])

    # top_p: sort ascending, drop cumulative <= 1 - top_p, keep the most likely
    for p in (0.9, 0.85, 0.5):
        c.add(f"topp_{p}", logits(), hist(3), [TopPLogitsWarper(p)])
    xd = dyadic_boundary(V, g)
    c.add("topp_0.75_boundary", xd, hist(3), [TopPLogitsWarper(0.75)])
    c.add("topp_0.5_boundary", xd, hist(3), [TopPLogitsWarper(0.5)])
    c.add("topp_0.76_boundary", xd, hist(3), [TopPLogitsWarper(0.76)])
    c.add("topp_0", logits(), hist(3), [TopPLogitsWarper(0.0)])
    c.add("topp_0.1_min_keep_3", logits(), hist(3), [TopPLogitsWarper(0.1, min_tokens_to_keep=3)])
    x = logits()
    x[torch.randperm(V, generator=g)[:600]] = -math.inf
    c.add("topp_0.9_with_inf", x, hist(3), [TopPLogitsWarper(0.9)])

    # chains, in the order generate builds them (GenerationMixin._get_logits_processor)
    chains = {
        "chain_card": dict(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.1),
        "chain_conservative": dict(do_sample=True, temperature=0.6, top_p=0.85, repetition_penalty=1.15,
                                   no_repeat_ngram_size=3),
        "chain_greedy": dict(do_sample=False, repetition_penalty=1.1, no_repeat_ngram_size=3),
        "chain_no_topk": dict(do_sample=True, temperature=1.5, top_k=0, top_p=0.95, repetition_penalty=1.2,
                              no_repeat_ngram_size=2),
        "chain_topk_only": dict(do_sample=True, top_k=10),
    }
    for name, kw in chains.items():
        ids = with_repeated_prefix(g, V, 120, 3)
        procs = generate_processors(model, kw, ids)
        full = GenerationConfig(**kw)
        gen_config = {k: getattr(full, k) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                    "repetition_penalty", "no_repeat_ngram_size")}
        c.add(name, logits(), ids, procs, gen_config)
    # the card's settings at a realistic vocabulary size
    V2 = 32000
    ids = with_repeated_prefix(g, V2, 300, 3)
    kw = chains["chain_conservative"]
    full = GenerationConfig(**kw)
    gen_config = {k: getattr(full, k) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                "repetition_penalty", "no_repeat_ngram_size")}
    c.add("chain_conservative_V32000", logits(V2), ids, generate_processors(model, kw, ids), gen_config)
    return c


# ---- greedy generation ----

def hf_greedy(model, prompt_ids, eos, max_new=64):
    """generate's greedy ids after prompt_ids, and the smallest top-1/top-2 gap of the scores."""
    model.generation_config.eos_token_id = eos  # None: no EOS stopping at all
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         output_scores=True, return_dict_in_generate=True,
                         **{**GREEDY, "max_new_tokens": max_new})
    new = out.sequences[0, len(prompt_ids):].tolist()
    margin = math.inf
    for s in out.scores:
        top = torch.topk(s[0], 2)[0]
        margin = min(margin, (top[0] - top[1]).item())
    return new, margin


def load_model(folder, how):
    if how == "fp32":
        return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    sys.path.insert(0, HERE)
    import bitsandbytes.functional as F
    import make_nf4_fixtures as nf4  # its loading, workarounds and dequant check
    if not getattr(F.dequantize_4bit, "flat", False):  # its workaround 2, once
        F.dequantize_4bit = nf4.flat_dequantize_4bit(F, F.dequantize_4bit)
        F.dequantize_4bit.flat = True
    if how == "nf4":
        return nf4.load_4bit(folder, torch.float32)[0]
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu",
                                             attn_implementation="eager").eval()
    return nf4.prepare(m)[0]


def greedy_cases():
    cases = []
    for name, (rel, how) in GREEDY_MODELS.items():
        folder = os.path.join(FIX, rel)
        model = load_model(folder, how)
        V = model.config.vocab_size
        g = torch.Generator().manual_seed(sum(map(ord, name)))
        done, tries = [], 0
        for length in (1, 6, 17, 30):
            while True:
                tries += 1
                assert tries < 50, "no prompt with a safe argmax margin"
                if length == 17:  # a repeated bigram: no_repeat_ngram bans from the first step
                    prompt = with_repeated_prefix(g, V, length, 3)
                else:
                    prompt = torch.randint(0, V, (length,), generator=g).tolist()
                new, margin = hf_greedy(model, prompt, None)
                if margin > MIN_MARGIN:
                    break
            assert len(new) == 64
            cases.append({"model": name, "folder": rel, "load": how, "prompt": prompt, "eos_token_id": None,
                          "output": new, "min_margin": margin})
            done.append((prompt, new))
            print(f"  {name:22s} prompt {length:2d} ids -> 64 ids, min margin {margin:.2e}")
        # an EOS that the no-EOS run emits mid-way: HF stops on it and keeps it
        prompt, new = done[1]
        at = next(i for i in range(8, 64) if new[i] not in new[:i])
        eos = new[at]
        got, margin = hf_greedy(model, prompt, eos)
        assert got == new[:at + 1], (got, new[:at + 1])
        cases.append({"model": name, "folder": rel, "load": how, "prompt": prompt, "eos_token_id": eos, "output": got,
                      "min_margin": margin})
        print(f"  {name:22s} eos {eos}: stops after {len(got)} ids")
    return cases


def text_cases():
    from peft import PeftModel
    base_dir = os.path.join(FIX, "dpo", "model")
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager").eval()
    model = PeftModel.from_pretrained(base, os.path.join(FIX, "dpo", "adapter_qk")).eval()
    eos = [tok.convert_tokens_to_ids("<|end_of_text|>"), tok.convert_tokens_to_ids("<|eot_id|>")]
    assert eos == [435, 436] and base.config.eos_token_id == 435
    questions = ["I have a fever and a sore throat. What should I do?", "感冒了应该怎么办?",
                 "What helps a headache?"]

    def run(ids):
        base.generation_config.eos_token_id = eos
        base.generation_config.pad_token_id = 437
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             output_scores=True, return_dict_in_generate=True, **GREEDY)
        new = out.sequences[0, len(ids):].tolist()
        margin = min((lambda t: (t[0] - t[1]).item())(torch.topk(s[0], 2)[0]) for s in out.scores)
        assert margin > MIN_MARGIN, margin
        return new, margin

    text = []
    for q in questions:
        ids = tok(render(q))["input_ids"]
        assert ids[0] == 434
        new, margin = run(ids)
        answer = tok.decode(new, skip_special_tokens=True)
        text.append({"question": q, "prompt_ids": ids, "output": new, "answer": answer, "min_margin": margin})
        print(f"  dpo+adapter_qk {q[:24]!r:28s} {len(ids)} prompt ids -> {len(new)} ids, margin {margin:.2e}")
    # the chat's second turn: the conversation so far, then the next question's block
    first = text[0]
    hist = first["prompt_ids"] + [t for t in first["output"] if t not in eos]
    q2 = questions[1]
    turn = tok(f"\n###Question: {q2}\n###Answer: ", add_special_tokens=False)["input_ids"]
    new, margin = run(hist + turn)
    chat = {"questions": [questions[0], q2], "turn_ids": turn, "history_ids": hist + turn, "output": new,
            "answer": tok.decode(new, skip_special_tokens=True), "min_margin": margin}
    print(f"  chat turn 2: {len(hist + turn)} ids of history -> {len(new)} ids")
    # QLoRA as the card runs it: the base loaded 4-bit (nf4, double quant, compute float32) + adapter
    base = load_model(base_dir, "nf4")
    model = PeftModel.from_pretrained(base, os.path.join(FIX, "dpo", "adapter_qk")).eval()
    q = questions[0]
    ids = tok(render(q))["input_ids"]
    new, margin = run(ids)
    qlora = {"question": q, "prompt_ids": ids, "output": new, "answer": tok.decode(new, skip_special_tokens=True),
             "min_margin": margin}
    print(f"  nf4 base + adapter_qk {q[:24]!r}: {len(ids)} prompt ids -> {len(new)} ids, margin {margin:.2e}")
    return text, chat, qlora


def main():
    import peft
    import transformers
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=1000)).eval()
    print("processors:")
    c = processor_cases(tiny)
    save_file(c.tensors, os.path.join(OUT, "processors.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(OUT, "processors.json"), "w") as f:
        json.dump(c.meta, f, indent=1)
        f.write("\n")
    print("greedy generate:")
    greedy = greedy_cases()
    text, chat, qlora = text_cases()
    with open(os.path.join(OUT, "generate.json"), "w") as f:
        json.dump({"settings": GREEDY, "system": SYSTEM, "greedy": greedy, "text": text, "chat": chat,
                   "text_nf4": qlora},
                  f, ensure_ascii=False, indent=1)
        f.write("\n")
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "peft": peft.__version__, "script": "tests/ref/make_sampler_fixtures.py"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
