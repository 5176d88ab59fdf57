#!/usr/bin/env python3
"""Reference fixtures for medbot's LoRA + DPO (and SFT) training: TRL 0.27.2 DPOTrainer + PEFT.

Regenerate (from anywhere, in the virtualenv of tests/ref/requirements.txt; no network, CPU only):
    python tests/ref/make_dpo_fixtures.py

It deletes and rewrites tests/fixtures/dpo/ (except FORMAT.md, which is written by hand and
describes every file): a tiny byte-level BPE tokenizer laid out like Llama 3's, a tiny fp32
Llama-3.1-architecture model, two PEFT LoRA adapters with non-zero B, 12 bilingual preference
pairs in both JSONL layouts, the token ids TRL produces for them, one DPO micro-batch (loss,
metrics, log-probs, LoRA gradients) for several loss types, three real optimizer steps of
`trainer.train()` with gradient accumulation and active clipping, a gradient-checkpointing run,
an SFT loss/gradient, a PEFT merge, and (last) the same DPO step, gradient-checkpointing step and
three optimizer steps on an NF4 base: the same checkpoint loaded in 4-bit by transformers +
bitsandbytes (QLoRA, double quant, compute dtype fp32), with the two bitsandbytes CPU workarounds
of tests/ref/make_nf4_fixtures.py (whose helpers it imports). See tests/fixtures/dpo/FORMAT.md.

Deterministic: the script re-executes itself with PYTHONHASHSEED=0 (PEFT writes target_modules
from a set), runs torch on one thread, seeds everything, and running it twice gives
byte-identical files. It asserts the cases the fixtures are meant to cover (truncations present,
adapters change the log-probs, clipping active on every step, gradient checkpointing equal, ...)
and prints a summary. Runtime: about 20 s on 2 CPU cores.
"""
import os
import sys

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":  # fixed set order (PEFT target_modules)
    env = dict(os.environ, PYTHONHASHSEED="0")
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import regex  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore")

import datasets  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from torch.utils.data import SequentialSampler  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

datasets.disable_progress_bars()
datasets.disable_caching()
transformers.logging.set_verbosity_error()

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
OUT = os.path.join("tests", "fixtures", "dpo")  # relative to REPO (the script chdirs there)
MODEL_DIR = os.path.join(OUT, "model")
EOT_DIR = os.path.join(OUT, "tokenizer_eot")  # the same tokenizer, eos_token <|eot_id|> in tokenizer_config.json

# ----------------------------------------------------------------------------------------------
# settings shared by every DPO run (TRL names)
MAX_PROMPT_LENGTH = 24
MAX_COMPLETION_LENGTH = 20
MAX_LENGTH = 36
BETA = 0.1
BATCH = 2  # per_device_train_batch_size
TRAIN = dict(gradient_accumulation_steps=2, max_steps=3, learning_rate=5e-3, lr_scheduler_type="cosine",
             warmup_ratio=0.1, max_grad_norm=0.05, weight_decay=0.0)

SYSTEM_DEFAULT = "You are a Medical Chatbot, you should friendly answer the question."
TEMPLATE = "###System: {system}\n###Question: {question}\n###Answer: "

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_SIZE = 434  # 256 byte symbols + 177 merges + 1 vocabulary-only word (reached only through ignore_merges)
VOCAB_ONLY_WORD = " paracetamol"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
QK_STD = 0.25  # std of the base q_proj/k_proj weights (0.08 for the other matrices)
VOCAB_SIZE = 440  # model rows: smallest multiple of 8 >= 438 tokens, not a multiple of 64 (2 unused rows)

ADAPTERS = {
    # the card's targets, r 8, alpha 4: scale 0.5
    "qk": dict(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj"], use_rslora=False, std_a=0.1, std_b=0.3),
    # all seven projections, rsLoRA: scale alpha/sqrt(r) = 8/2 = 4
    "all": dict(r=4, lora_alpha=8, use_rslora=True, std_a=0.1, std_b=0.05,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

# ----------------------------------------------------------------------------------------------
# text: the tokenizer's training corpus and the preference pairs

CORPUS = """\
A fever is a body temperature above 38 degrees. Most fevers are caused by viral infections and go away in a few days.
Drink plenty of water, rest, and take paracetamol or ibuprofen if the fever makes you uncomfortable.
See a doctor if the fever lasts more than three days, if you have trouble breathing, or if a child under three months has a fever.
Antibiotics do not work against viruses. Taking antibiotics you do not need can cause side effects and resistance.
High blood pressure often has no symptoms. Eat less salt, exercise regularly, stop smoking and check your blood pressure.
Type 2 diabetes develops slowly. Early signs are thirst, frequent urination, tiredness and blurred vision.
A normal resting heart rate for adults is between 60 and 100 beats per minute.
Chest pain that spreads to the arm or jaw may be a heart attack. Call an ambulance at once.
Wash your hands with soap for twenty seconds before eating and after using the toilet.
Children should not take aspirin because of the risk of Reye's syndrome. Use paracetamol for children instead.
Do not drink alcohol while taking metronidazole, and for at least two days after the last dose.
If a child swallowed a coin and is breathing normally, go to the hospital for an X-ray. If the child is choking, call for help.
Take the medicine with food if it upsets your stomach. Always read the label and follow the dose.
Sleep seven to nine hours a night. Poor sleep raises the risk of heart disease and diabetes.
I'm not a doctor, but I can share general health information. You should see a doctor if the symptoms get worse.
It's important to keep your vaccinations up to date. They'll protect you and the people around you.
发烧是指体温超过38度。大多数发烧由病毒感染引起，几天内会自行好转。
多喝水，多休息，如果发烧让你不舒服，可以服用对乙酰氨基酚或布洛芬。
如果发烧超过三天，呼吸困难，或者三个月以下的婴儿发烧，请及时就医。
抗生素对病毒没有作用。不必要地使用抗生素会引起副作用和耐药性。
高血压通常没有症状。少吃盐，规律运动，戒烟，定期测量血压。
糖尿病的早期症状包括口渴、多尿、乏力和视力模糊。
孩子咳嗽一周了，晚上加重，建议去医院检查，不要自行使用止咳药。
头痛时先休息，多喝水，如果头痛剧烈或伴有呕吐，请及时就医。
高血压患者饮食要清淡，少盐少油，多吃蔬菜和水果，控制体重。
你是一名医生，请友好地回答问题。
"""
for _q in ["What should I do about a fever?", "Is it safe to take ibuprofen?", "发烧怎么办？"]:
    CORPUS += TEMPLATE.format(system=SYSTEM_DEFAULT, question=_q) + "\n"

# 12 pairs, file order = training order. Layouts: "prompt" (already formatted), "question" (default
# system), "question" + "system". Lengths are chosen for the truncation cases; see check_cases().
PAIRS = [
    # 0: long prompt (default system, left-truncated); chosen truncated (EOS lost) and cut by keep_end;
    #    rejected short
    {"question": "I have had a fever and a sore throat for three days. What should I do?",
     "response_chosen": "Rest, drink plenty of water and take paracetamol for the fever. If it lasts more than "
                        "five days, see a doctor.",
     "response_rejected": "Take antibiotics."},
    # 1: short formatted prompt; chosen short; rejected Chinese, truncated and cut by keep_end
    {"prompt": "Q: Ibuprofen with food?\nA: ",
     "chosen": "Yes, with food.",
     "rejected": "不安全。布洛芬会导致严重的胃出血。"},
    # 2: Chinese question with its own system (prompt truncated); chosen truncated and cut by keep_end
    {"system": "你是一名医生。", "question": "孩子咳嗽一周了，怎么办？",
     "response_chosen": "去医院检查，不要自行用药。",
     "response_rejected": "吃止咳药。"},
    # 3: an already formatted long prompt in the prompt field; short completions
    {"prompt": TEMPLATE.format(system=SYSTEM_DEFAULT, question="What are the early signs of type 2 diabetes?"),
     "chosen": "Thirst and tiredness.",
     "rejected": "None."},
    # 4: numbers
    {"question": "What is a normal resting heart rate?",
     "response_chosen": "60 to 100 beats per minute.",
     "response_rejected": "Around 200."},
    # 5: everything short (no truncation at all)
    {"prompt": "头痛怎么办？", "chosen": "先休息。", "rejected": "吃药。"},
    # 6: short custom system
    {"system": "Answer briefly.", "question": "Can I drink alcohol with metronidazole?",
     "response_chosen": "No. Avoid alcohol during treatment and for two days after the last dose.",
     "response_rejected": "Yes, a little wine is fine."},
    # 7: chosen exactly max_completion_length including its EOS (kept)
    {"question": "高血压患者饮食要注意什么？",
     "response_chosen": "少盐少油，多吃蔬菜。",
     "response_rejected": "随便吃。"},
    # 8: contractions
    {"prompt": "Patient: my child swallowed a coin.\nDoctor: ",
     "chosen": "If your child is breathing normally, go to the hospital for an X-ray.",
     "rejected": "Don't worry, it's nothing."},
    # 9
    {"question": "How many hours should an adult sleep?",
     "response_chosen": "Seven to nine hours.",
     "response_rejected": "Four hours is enough for everyone, and you can catch up at the weekend."},
    # 10: the vocabulary-only word (ignore_merges) in a completion that is not truncated
    {"system": "You are a careful pharmacist.", "question": "Can I give aspirin to my 5-year-old?",
     "response_chosen": "No. Use paracetamol for children.",
     "response_rejected": "Yes, half a tablet."},
    # 11
    {"prompt": "Q: Normal body temperature?\nA: ",
     "chosen": "About 36.5 to 37.5 degrees.",
     "rejected": "40 degrees."},
]


def render(row):
    """The pair as TRL sees it: {"prompt","chosen","rejected"} plain strings (medbot's rules)."""
    if "prompt" in row:
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    prompt = TEMPLATE.format(system=row.get("system", SYSTEM_DEFAULT), question=row["question"])
    return {"prompt": prompt, "chosen": row["response_chosen"], "rejected": row["response_rejected"]}


CORPUS += "".join(render(p)["prompt"] + render(p)["chosen"] + "\n" + render(p)["rejected"] + "\n" for p in PAIRS)


# ----------------------------------------------------------------------------------------------
# helpers

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    transformers.set_seed(seed)


def i32(x):
    return torch.as_tensor(x, dtype=torch.int32).contiguous()


def f32(x):
    return (x.detach() if torch.is_tensor(x) else torch.as_tensor(x)).to(torch.float32).contiguous()


def save(tensors, name, **meta):
    meta = {"format": "pt", **{k: str(v) for k, v in meta.items()}}
    path = os.path.join(OUT, name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    # safetensors writes __metadata__ from a Rust HashMap (random order per process): rewrite the header
    # with sorted metadata so that the bytes are reproducible (offsets are relative to the data: unchanged)
    with open(path, "rb") as f:
        blob = f.read()
    n = int.from_bytes(blob[:8], "little")
    hdr = json.loads(blob[8:8 + n])
    md = hdr.pop("__metadata__")
    text = json.dumps({"__metadata__": dict(sorted(md.items())), **hdr}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + blob[8 + n:])
    back = load_file(path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def peft_key(param_name):
    """named_parameters() name -> key in adapter_model.safetensors (PEFT drops the adapter name)."""
    assert ".default." in param_name, param_name
    return param_name.replace(".default.", ".")


def lora_grads(model):
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n, f"trainable non-LoRA parameter {n}"
            assert p.grad is not None, f"no gradient for {n}"
            out["grad." + peft_key(n)] = p.grad.detach().clone().float()
    return out


def lora_weights(model):
    return {peft_key(n): p.detach().clone().float() for n, p in model.named_parameters() if "lora_" in n}


def load_policy(adapter, nf4=False):
    if nf4:  # section 11: the same checkpoint quantized to NF4 at load time by transformers + bitsandbytes
        base = load_base_nf4()
        model = PeftModel.from_pretrained(base, os.path.join(OUT, f"adapter_{adapter}"), is_trainable=True)
        assert all(p.dtype == torch.float32 for n, p in model.named_parameters()
                   if type(p).__name__ != "Params4bit")
        return model
    base = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, os.path.join(OUT, f"adapter_{adapter}"), is_trainable=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


# ----------------------------------------------------------------------------------------------
# 1. tokenizer

def check_llama3_regex():
    """The Split pre-tokenizer (Oniguruma inside `tokenizers`) must cut exactly as the regex does."""
    split = pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False)
    samples = ["I'M sure it's fine, WE'LL see; they'd've", "Take 1234567 mg, 3.5mg/kg  twice\n\n  daily!!\n",
               "发烧38.5度怎么办？多喝水，休息。", TEMPLATE.format(system=SYSTEM_DEFAULT, question="Why?"),
               "a  \t b   \n\n\r\n  x", "don't\tDON'T 's", " héllo wörld ¿qué? 😷 ...\n", CORPUS]
    samples += [render(p)[k] for p in PAIRS for k in ("prompt", "chosen", "rejected")]
    for s in samples:
        got = [piece for piece, _ in split.pre_tokenize_str(s)]
        want = regex.findall(LLAMA3_PATTERN, s)
        assert got == want and "".join(got) == s, (s, got, want)
    return len(samples)


def build_tokenizer():
    tok = Tokenizer(models.BPE(ignore_merges=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE - 1, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    # rebuild the model from the trained vocab/merges with Llama 3's BPE options (training drops them)
    trained = json.loads(tok.to_str())["model"]
    vocab = trained["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    assert len(vocab) == BPE_SIZE - 1, len(vocab)
    assert all(c in vocab for c in pre_tokenizers.ByteLevel.alphabet()), "missing byte symbols"
    assert len(merges) == BPE_SIZE - 1 - 256, len(merges)
    # tiktoken (Llama 3's reference) looks a whole pre-token piece up in the vocabulary before merging;
    # HF reproduces it with ignore_merges. One vocabulary entry here that no merge builds, so that the
    # data exercises that rule (a tokenizer without it splits " paracetamol" into several tokens).
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    word = bl.pre_tokenize_str(VOCAB_ONLY_WORD)[0][0]
    assert word not in vocab
    vocab[word] = BPE_SIZE - 1
    tok.model = models.BPE(vocab=vocab, merges=merges, ignore_merges=True, byte_fallback=False,
                           fuse_unk=False, dropout=None, unk_token=None)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    bos = SPECIALS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    for k, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == BPE_SIZE + k
    assert tok.get_vocab_size(with_added_tokens=True) == BPE_SIZE + len(SPECIALS) <= VOCAB_SIZE
    j = json.loads(tok.to_str())
    assert j["model"]["ignore_merges"] is True and j["model"]["byte_fallback"] is False

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[3], clean_up_tokenization_spaces=False,
                                   model_max_length=131072)
    fast.save_pretrained(MODEL_DIR)
    fast = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)
    # round trip and the ids TRL will use
    for p in PAIRS:
        for s in render(p).values():
            assert fast.decode(fast(s, add_special_tokens=False)["input_ids"]) == s
    assert fast("hi")["input_ids"][0] == fast.bos_token_id  # Llama-3-like post-processor (TRL never uses it)
    # does ignore_merges change any tokenization of our text? (recorded in the summary)
    plain = Tokenizer.from_str(tok.to_str().replace('"ignore_merges":true', '"ignore_merges":false'))
    texts = [s for p in PAIRS for s in render(p).values()] + CORPUS.splitlines()
    n_diff = sum(plain.encode(s, add_special_tokens=False).ids != tok.encode(s, add_special_tokens=False).ids
                 for s in texts)
    assert n_diff >= 1, "ignore_merges is not exercised by the data"
    return fast, n_diff


# ----------------------------------------------------------------------------------------------
# 2. model and 3. adapters

def build_model(tok):
    seed_all(1234)
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=131072,
                      rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      attention_bias=False, mlp_bias=False, hidden_act="silu", attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init; q/k larger still so attention is far from uniform
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_((QK_STD if n.endswith(("q_proj.weight", "k_proj.weight")) else 0.08) * torch.randn_like(p))
    model.to(torch.float32)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    gen = os.path.join(MODEL_DIR, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def build_adapters():
    for k, (name, a) in enumerate(ADAPTERS.items()):
        seed_all(100 + k)
        base = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager")
        cfg = LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=0.0, bias="none",
                         target_modules=a["target_modules"], use_rslora=a["use_rslora"], task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(200 + k)
        with torch.no_grad():  # PEFT's B = 0 would make every gradient of A zero: draw both
            for n, p in sorted(model.named_parameters()):
                if "lora_A" in n:
                    p.copy_(a["std_a"] * torch.randn(p.shape, generator=g))
                elif "lora_B" in n:
                    p.copy_(a["std_b"] * torch.randn(p.shape, generator=g))
        folder = os.path.join(OUT, f"adapter_{name}")
        model.save_pretrained(folder, safe_serialization=True)
        readme = os.path.join(folder, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
        assert all(v.dtype == torch.float32 for v in saved.values())
        n_mod = 2 * len(a["target_modules"])
        assert len(saved) == 2 * n_mod, sorted(saved)


# ----------------------------------------------------------------------------------------------
# DPO trainer with sequential order, and probes

class SeqDPOTrainer(DPOTrainer):
    """DPOTrainer that reads the data in file order (no shuffling) and records what it computes."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rec_loss = []  # per dpo_loss call: inputs and per-pair losses
        self.rec_micro = []  # per compute_loss call: (loss, metrics)

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    def dpo_loss(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type="sigmoid",
                 model_output=None):
        out = super().dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, loss_type,
                               model_output)
        self.rec_loss.append({k: v.detach().clone() for k, v in zip(
            ["chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "losses"],
            [chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, out[0]])})
        return out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.rec_micro.append((loss.detach().clone(), dict(metrics)))
        return (loss, metrics) if return_outputs else loss


class ForwardProbe:
    """Captures input_ids/attention_mask of every forward of the Llama model inside the PeftModel, and
    whether the LoRA layers were disabled at the time (reference pass)."""

    def __init__(self, peft_model):
        self.calls = []
        self.lora = [m for m in peft_model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
        inner = peft_model.get_base_model().model  # LlamaModel (LoraModel calls LlamaForCausalLM.forward directly)
        self.h = inner.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append({"input_ids": ids.detach().clone(), "attention_mask": kwargs["attention_mask"].clone(),
                           "disabled": all(m.disable_adapters for m in self.lora),
                           "enabled": not any(m.disable_adapters for m in self.lora),
                           "grad": torch.is_grad_enabled()})

    def remove(self):
        self.h.remove()


def dpo_args(outdir, **kw):
    base = dict(output_dir=outdir, per_device_train_batch_size=BATCH, beta=BETA,
                max_prompt_length=MAX_PROMPT_LENGTH, max_completion_length=MAX_COMPLETION_LENGTH,
                max_length=MAX_LENGTH, truncation_mode="keep_end", report_to=[], use_cpu=True, bf16=False,
                fp16=False, padding_free=False, use_logits_to_keep=False, precompute_ref_log_probs=False,
                seed=0, data_seed=0, dataloader_drop_last=False, save_strategy="no", logging_steps=1,
                disable_tqdm=True, dataloader_num_workers=0, loss_type="sigmoid", label_smoothing=0.0)
    base.update(kw)
    return DPOConfig(**base)


def make_trainer(adapter, tok, ds, outdir, nf4=False, via_peft_config=False, **kw):
    seed_all(0)
    args = dpo_args(outdir, **kw)
    if via_peft_config:  # section 11: TRL wraps the (4-bit) base itself; the adapter's tensors are copied in after
        return make_trainer_peft_config(adapter, tok, ds, args)
    model = load_policy(adapter, nf4=nf4)
    trainer = SeqDPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


# ----------------------------------------------------------------------------------------------
# 5. tokens

def expected_sequence(p, c):
    """TRL's concatenated_forward for one row: prompt + completion, keep_end to max_length."""
    seq = list(p) + list(c)
    mask = [0] * len(p) + [1] * len(c)
    if len(seq) > MAX_LENGTH:
        seq, mask = seq[-MAX_LENGTH:], mask[-MAX_LENGTH:]
    return seq, mask


def unpad_rows(ids, attn):
    rows = []
    for r in range(ids.shape[0]):
        m = attn[r].bool()
        # after flush_left every row is contiguous from column 0
        n = int(m.sum())
        assert bool(m[:n].all()) and not bool(m[n:].any())
        rows.append(ids[r, :n].tolist())
    return rows


def build_tokens(tok, raw_rows, tmp):
    rendered = [render(r) for r in raw_rows]
    ds = Dataset.from_list(rendered)
    trainer = make_trainer("qk", tok, ds, tmp)
    tds = trainer.train_dataset
    assert len(tds) == len(PAIRS)
    t = {}
    info = []
    eos = tok.eos_token_id
    for i in range(len(PAIRS)):
        row = tds[i]
        assert row["prompt"] == rendered[i]["prompt"]
        full = {k: tok(rendered[i][k], add_special_tokens=False)["input_ids"] for k in ("prompt", "chosen", "rejected")}
        for k in ("prompt", "chosen", "rejected"):
            t[f"full_{k}_ids.{i}"] = i32(full[k])
            t[f"{k}_input_ids.{i}"] = i32(row[f"{k}_input_ids"])
        # the documented rule, checked against what TRL produced
        assert row["prompt_input_ids"] == full["prompt"][-MAX_PROMPT_LENGTH:]
        for k in ("chosen", "rejected"):
            assert row[f"{k}_input_ids"] == (full[k] + [eos])[:MAX_COMPLETION_LENGTH]
        rec = {"i": i, "layout": "prompt" if "prompt" in raw_rows[i] else
               ("question+system" if "system" in raw_rows[i] else "question"),
               "prompt_full": len(full["prompt"]), "prompt": len(row["prompt_input_ids"])}
        for k in ("chosen", "rejected"):
            seq, mask = expected_sequence(row["prompt_input_ids"], row[f"{k}_input_ids"])
            t[f"input_ids.{i}.{k}"] = i32(seq)
            t[f"loss_mask.{i}.{k}"] = i32(mask)
            rec[f"{k}_full"] = len(full[k]) + 1
            rec[k] = len(row[f"{k}_input_ids"])
            rec[f"{k}_seq"] = len(seq)
            rec[f"{k}_eos"] = row[f"{k}_input_ids"][-1] == eos
            rec[f"{k}_cut"] = len(row["prompt_input_ids"]) + len(row[f"{k}_input_ids"]) - len(seq)
        info.append(rec)

    # what the trainer actually feeds the model, micro-batch by micro-batch, must be these sequences
    model = trainer.model
    model.eval()
    probe = ForwardProbe(model)
    batches = []
    for b, batch in enumerate(trainer.get_train_dataloader()):
        batch = trainer._prepare_inputs(batch)
        with torch.no_grad():
            trainer.concatenated_forward(model, batch)
        batches.append(batch)
    probe.remove()
    assert len(batches) == len(PAIRS) // BATCH and len(probe.calls) == len(batches), (len(batches), len(probe.calls))
    for b, call in enumerate(probe.calls):
        rows = unpad_rows(call["input_ids"], call["attention_mask"])
        pairs = [BATCH * b + j for j in range(BATCH)]
        want = [t[f"input_ids.{i}.chosen"].tolist() for i in pairs] + \
               [t[f"input_ids.{i}.rejected"].tolist() for i in pairs]
        assert rows == want, f"micro-batch {b}: trainer input differs from the documented truncation"
    return t, info, rendered


def print_lengths(info):
    print("\n  i layout            prompt full->kept | chosen full->kept eos seq cut | rejected full->kept eos seq cut")
    for r in info:
        print(f"{r['i']:3d} {r['layout']:16s} {r['prompt_full']:4d} -> {r['prompt']:2d}     |"
              f" {r['chosen_full']:4d} -> {r['chosen']:2d} {'y' if r['chosen_eos'] else 'n':>3s}"
              f" {r['chosen_seq']:3d} {r['chosen_cut']:3d} |"
              f" {r['rejected_full']:4d} -> {r['rejected']:2d} {'y' if r['rejected_eos'] else 'n':>3s}"
              f" {r['rejected_seq']:3d} {r['rejected_cut']:3d}")
    print("  (full counts include the appended EOS for completions)")


def check_cases(info):
    first = [r for r in info if r["i"] in (0, 1)]
    second = [r for r in info if r["i"] in (2, 3)]
    cases = {
        "prompt truncated (keep last 24)": any(r["prompt_full"] > MAX_PROMPT_LENGTH for r in info),
        "prompt not truncated": any(r["prompt_full"] <= MAX_PROMPT_LENGTH for r in info),
        "completion truncated, EOS lost": any(r[f"{k}_full"] > MAX_COMPLETION_LENGTH and not r[f"{k}_eos"]
                                              for r in info for k in ("chosen", "rejected")),
        "completion exactly max_completion_length with EOS": any(
            r[f"{k}_full"] == MAX_COMPLETION_LENGTH and r[f"{k}_eos"] for r in info for k in ("chosen", "rejected")),
        "keep_end cut of prompt+completion": any(r[f"{k}_cut"] > 0 for r in info for k in ("chosen", "rejected")),
        "pair with no truncation at all": any(
            r["prompt_full"] <= MAX_PROMPT_LENGTH and r["chosen_full"] <= MAX_COMPLETION_LENGTH
            and r["rejected_full"] <= MAX_COMPLETION_LENGTH and r["chosen_cut"] == 0 and r["rejected_cut"] == 0
            for r in info),
        "chosen/rejected lengths differ": all(r["chosen"] != r["rejected"] for r in first + second),
        "batch 0 has prompt trunc + completion trunc + keep_end cut":
            any(r["prompt_full"] > MAX_PROMPT_LENGTH for r in first)
            and any(r[f"{k}_full"] > MAX_COMPLETION_LENGTH for r in first for k in ("chosen", "rejected"))
            and any(r[f"{k}_cut"] > 0 for r in first for k in ("chosen", "rejected"))
            and len({r["prompt"] for r in first}) == 2,
        "batch 1 has keep_end cut and a truncated prompt":
            any(r[f"{k}_cut"] > 0 for r in second for k in ("chosen", "rejected"))
            and any(r["prompt_full"] > MAX_PROMPT_LENGTH for r in second),
        "all three layouts": {r["layout"] for r in info} == {"prompt", "question", "question+system"},
    }
    bad = [k for k, v in cases.items() if not v]
    assert not bad, f"data does not cover: {bad}"
    return cases


# ----------------------------------------------------------------------------------------------
# 6. one DPO micro-batch

METRIC_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]


def dpo_step(adapter, tok, ds, tmp, tokens, batch_index=0, gc=False, nf4=False, via_peft_config=False, **kw):
    trainer = make_trainer(adapter, tok, ds, tmp, nf4=nf4, via_peft_config=via_peft_config, gradient_checkpointing=gc,
                           **kw)
    model = trainer.model
    dl = trainer.get_train_dataloader()
    for b, batch in enumerate(dl):
        if b == batch_index:
            break
    batch = trainer._prepare_inputs(batch)
    ncheck = [0]
    # TRL's own preparation: with a PeftModel (no peft_config) only enable_input_require_grads, and only with
    # gradient checkpointing; on the peft_config path prepare_model_for_kbit_training (use_reentrant False) skips it
    assert hasattr(model.get_base_model(), "_require_grads_hook") == (gc and not via_peft_config)
    if gc:  # what Trainer._inner_training_loop does before training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
        for layer in model.get_base_model().model.layers:
            assert layer.gradient_checkpointing
            f = layer._gradient_checkpointing_func

            def counted(*a, _f=f, **k):
                ncheck[0] += 1
                return _f(*a, **k)
            layer._gradient_checkpointing_func = counted
    model.train()  # as Trainer.training_step
    model.zero_grad(set_to_none=True)
    probe = ForwardProbe(model)
    loss, metrics = trainer.compute_loss(model, batch, return_outputs=True)
    trainer.accelerator.backward(loss)
    probe.remove()
    if gc:  # each decoder layer checkpointed in the policy pass (the reference pass runs without grad)
        assert ncheck[0] >= len(model.get_base_model().model.layers), ncheck[0]

    # the policy pass ran with the adapters, the reference pass with them disabled and no grad
    assert len(probe.calls) == 2, len(probe.calls)
    pol, ref = probe.calls
    assert pol["enabled"] and pol["grad"] and ref["disabled"] and not ref["grad"]
    assert torch.equal(pol["input_ids"], ref["input_ids"]) and torch.equal(pol["attention_mask"], ref["attention_mask"])
    rec = trainer.rec_loss[-1]
    assert torch.allclose(rec["losses"].mean(), loss.detach(), rtol=0, atol=0)
    # disabling the adapters must change the log-probs (else the reference is not the base model)
    d = torch.cat([rec["chosen_logps"] - rec["ref_chosen_logps"], rec["rejected_logps"] - rec["ref_rejected_logps"]])
    assert d.abs().min() > 1e-2, d

    pairs = [BATCH * batch_index + j for j in range(BATCH)]
    t = {"pairs": i32(pairs), "loss": f32(loss.detach()).reshape(1), "losses": f32(rec["losses"]),
         "batch.input_ids": i32(pol["input_ids"]), "batch.attention_mask": i32(pol["attention_mask"])}
    for k in ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        t[k] = f32(rec[k])
    assert set(METRIC_NAMES) == set(metrics), sorted(metrics)
    for k in METRIC_NAMES:
        t[k] = torch.tensor([metrics[k]], dtype=torch.float32)
    # metrics recomputed from the log-probs: documents what TRL averages
    beta = trainer.beta
    cr = beta * (rec["chosen_logps"] - rec["ref_chosen_logps"])
    rj = beta * (rec["rejected_logps"] - rec["ref_rejected_logps"])
    for k, v in [("rewards/chosen", cr.mean()), ("rewards/rejected", rj.mean()),
                 ("rewards/margins", (cr - rj).mean()), ("rewards/accuracies", (cr > rj).float().mean()),
                 ("logps/chosen", rec["chosen_logps"].mean()), ("logps/rejected", rec["rejected_logps"].mean())]:
        assert abs(v.item() - metrics[k]) <= 1e-6 * max(1.0, abs(v.item())), (k, v.item(), metrics[k])
    t.update(lora_grads(model))

    # the rules of FORMAT.md, recomputed from a plain forward of the captured batch: log-probs and the
    # logits metrics (pooled over the micro-batch's chosen rows, all vocabulary entries, at the positions
    # whose NEXT token is a completion token)
    ids, attn = pol["input_ids"], pol["attention_mask"]
    lm = torch.zeros_like(ids)
    rows = [(i, "chosen") for i in pairs] + [(i, "rejected") for i in pairs]
    for r, (i, k) in enumerate(rows):
        m = tokens[f"loss_mask.{i}.{k}"]
        lm[r, :len(m)] = m
        assert torch.equal(ids[r, :len(m)], tokens[f"input_ids.{i}.{k}"].long())
    t["batch.loss_mask"] = i32(lm)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits.double()
    pos = lm[:, 1:].bool()  # logits at t-1 predict token t
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    per_row = torch.where(pos, lp, torch.zeros_like(lp)).sum(-1)
    if kw.get("loss_type") == "ipo":
        per_row = per_row / pos.sum(-1)
    assert torch.allclose(per_row.float(), torch.cat([rec["chosen_logps"], rec["rejected_logps"]]), rtol=1e-5,
                          atol=1e-4), (per_row, rec["chosen_logps"], rec["rejected_logps"])
    B = len(pairs)
    for k, sl in (("logits/chosen", slice(0, B)), ("logits/rejected", slice(B, 2 * B))):
        v = logits[sl, :-1][pos[sl]].mean().item()
        assert abs(v - metrics[k]) < 1e-6, (k, v, metrics[k])
    saved = load_file(os.path.join(OUT, f"adapter_{adapter}", "adapter_model.safetensors"))
    assert {k[5:] for k in t if k.startswith("grad.")} == set(saved)
    if nf4:
        check_generic_4bit_path(model)
    return t, trainer


# ----------------------------------------------------------------------------------------------
# 7. three optimizer steps

class StepRecorder(TrainerCallback):
    def __init__(self):
        self.grads, self.weights, self.lrs = [], [], []
        self.trainer = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # after clipping
        g = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                g[peft_key(n)] = p.grad.detach().clone().float()
        self.grads.append(g)
        self.lrs.append([grp["lr"] for grp in self.trainer.optimizer.param_groups])

    def on_step_end(self, args, state, control, model=None, **kw):
        self.weights.append(lora_weights(model))


def train_run(adapter, tok, ds, tmp, nf4=False):
    trainer = make_trainer(adapter, tok, ds, tmp, nf4=nf4, **TRAIN)
    rec = StepRecorder()
    rec.trainer = trainer
    trainer.add_callback(rec)
    w0 = lora_weights(trainer.model)
    trainer.train()
    st = trainer.state
    assert st.global_step == TRAIN["max_steps"] == 3, st.global_step
    assert len(rec.grads) == 3 and len(rec.weights) == 3
    assert len(trainer.rec_micro) == 6, len(trainer.rec_micro)
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {3}, steps
    logs = [e for e in st.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [1, 2, 3]
    for e in logs:
        assert e["grad_norm"] > TRAIN["max_grad_norm"], f"clipping inactive: {e['grad_norm']}"
    # per-step learning rates: logged lr = the lr the optimizer used for that step
    used = [lr[0] for lr in rec.lrs]
    assert [e["learning_rate"] for e in logs] == used, (used, logs)
    W = math.ceil(TRAIN["warmup_ratio"] * 3)
    expect = [TRAIN["learning_rate"] * (s / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (3 - W))))
              for s in range(3)]
    assert np.allclose(used, expect, rtol=1e-12, atol=0), (used, expect)
    # clipped accumulated gradient norm = max_grad_norm (the clip is active)
    for g, e in zip(rec.grads, logs):
        n = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())).item()
        coef = TRAIN["max_grad_norm"] / (e["grad_norm"] + 1e-6)
        assert abs(n - e["grad_norm"] * coef) < 1e-6 * e["grad_norm"], (n, e["grad_norm"])
    # logged loss = round(sum over the step's micro-batches of loss / accumulation, 4); logged metrics =
    # float32 mean of the per-micro-batch values
    for s, e in enumerate(logs):
        m0, m1 = trainer.rec_micro[2 * s], trainer.rec_micro[2 * s + 1]
        acc = torch.zeros((), dtype=torch.float32) + m0[0] / 2 + m1[0] / 2
        assert e["loss"] == round(acc.item(), 4), (e["loss"], acc.item())
        for k in METRIC_NAMES:
            assert e[k] == torch.tensor([m0[1][k], m1[1][k]]).mean().item(), k
    wf = lora_weights(trainer.model)
    assert all(not torch.equal(w0[k], wf[k]) for k in w0), "a LoRA tensor did not move"
    assert all(torch.equal(w0[k], rec.weights[0][k]) for k in w0), "step 1 (lr 0) moved the weights"

    t = dict(wf)
    for s in range(3):
        for k, v in rec.weights[s].items():
            t[f"step{s + 1}.{k}"] = v
        for k, v in rec.grads[s].items():
            t[f"clipped_grad.step{s + 1}.{k}"] = v
    t["micro_loss"] = torch.stack([m[0].float() for m in trainer.rec_micro])  # before the 1/accumulation
    if nf4:
        check_generic_4bit_path(trainer.model)
    keep = ["loss", "grad_norm", "learning_rate", "epoch", "step"] + METRIC_NAMES
    log = {
        "adapter": f"adapter_{adapter}",
        "optim": str(trainer.args.optim.value if hasattr(trainer.args.optim, "value") else trainer.args.optim),
        "optimizer_class": f"{type(opt).__module__}.{type(opt).__name__}",
        "optimizer_param_groups": [{"n_params": len(g["params"]),
                                    **{k: v for k, v in g.items() if k not in ("params", "lr")}}
                                   for g in opt.param_groups if g["params"]],
        "settings": {"per_device_train_batch_size": BATCH, "beta": BETA, "loss_type": "sigmoid",
                     "max_prompt_length": MAX_PROMPT_LENGTH, "max_completion_length": MAX_COMPLETION_LENGTH,
                     "max_length": MAX_LENGTH, "seed": 0, "order": "sequential (SequentialSampler)", **TRAIN},
        **({"base_quantization": NF4_DESC} if nf4 else {}),
        "global_step": st.global_step,
        "warmup_steps": W,
        "learning_rates": used,
        "log_history": [{k: e[k] for k in keep if k in e} for e in logs],
        "train_loss": [e for e in st.log_history if "train_loss" in e][0]["train_loss"],
        "micro_batches": [{"pairs": [2 * j, 2 * j + 1], "loss": m[0].item(), **m[1]}
                          for j, m in enumerate(trainer.rec_micro)],
    }
    return t, log


# ----------------------------------------------------------------------------------------------
# 9. SFT

def sft_run(tok, tokens, tmp):
    pairs = [0, 1]
    seqs = [tokens[f"input_ids.{i}.chosen"].tolist() for i in pairs]
    masks = [tokens[f"loss_mask.{i}.chosen"].tolist() for i in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for r, (s, m) in enumerate(zip(seqs, masks)):
        ids[r, :len(s)] = torch.tensor(s)
        attn[r, :len(s)] = 1
        labels[r, :len(s)] = torch.where(torch.tensor(m) == 1, torch.tensor(s), torch.tensor(-100))
    seed_all(0)
    model = load_policy("qk")
    model.train()
    out = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False)
    out.loss.backward()
    # the normalisation: mean over all completion tokens of the batch, predicted from position t-1
    logp = torch.log_softmax(out.logits.detach()[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    sel = tgt != -100
    manual = -(logp[sel].gather(-1, tgt[sel].unsqueeze(-1)).sum() / sel.sum())
    assert abs(manual.item() - out.loss.item()) < 1e-5, (manual.item(), out.loss.item())
    t = {"pairs": i32(pairs), "input_ids": i32(ids), "attention_mask": i32(attn), "labels": i32(labels),
         "loss": f32(out.loss.detach()).reshape(1), "n_tokens": i32([int(sel.sum())])}
    t.update(lora_grads(model))

    # cross-check with TRL's SFTTrainer on the same pre-tokenized rows (completion_only_loss)
    seed_all(0)
    model2 = load_policy("qk")
    ds = Dataset.from_list([{"input_ids": s, "completion_mask": m} for s, m in zip(seqs, masks)])
    args = SFTConfig(output_dir=tmp, per_device_train_batch_size=2, completion_only_loss=True, bf16=False, fp16=False,
                     use_cpu=True, report_to=[], max_length=None, save_strategy="no", disable_tqdm=True, seed=0)
    st = SFTTrainer(model=model2, args=args, train_dataset=ds, processing_class=tok)
    batch = st._prepare_inputs(st.data_collator([st.train_dataset[0], st.train_dataset[1]]))
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)
    model2.train()
    loss2 = st.compute_loss(model2, batch)
    loss2.backward()
    g2 = lora_grads(model2)
    d_loss = abs(loss2.item() - out.loss.item())
    d_grad = max(((g2[k] - t[k]).abs().max() / t[k].abs().max()).item() for k in g2)
    assert d_loss < 1e-6 and d_grad < 1e-5, (d_loss, d_grad)
    return t, d_loss, d_grad


# ----------------------------------------------------------------------------------------------
# 10. merge

def merge_run(tok):
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32, attn_implementation="eager"),
        os.path.join(OUT, "adapter_all")).eval()
    base_sd = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    ad = load_file(os.path.join(OUT, "adapter_all", "adapter_model.safetensors"))
    a = ADAPTERS["all"]
    scale = a["lora_alpha"] / math.sqrt(a["r"])
    ids = torch.tensor([[tok.bos_token_id] + tok("发烧怎么办？ Drink water.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    merged = model.merge_and_unload()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4
    sd = merged.state_dict()
    t = {}
    for L in range(2):
        for p in PROJ:
            k = f"model.layers.{L}.{p}.weight"
            t[k] = sd[k].detach().clone().float()
            pk = f"base_model.model.model.layers.{L}.{p}"
            manual = base_sd[k].double() + scale * (ad[pk + ".lora_B.weight"].double() @ ad[pk + ".lora_A.weight"].double())
            assert (t[k].double() - manual).abs().max() < 1e-6
            assert not torch.equal(t[k], base_sd[k])
    return t


# ----------------------------------------------------------------------------------------------
# 11. NF4 base: the same checkpoint loaded in 4-bit by transformers + bitsandbytes (QLoRA)

NF4_CONFIG = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)  # + fp32 compute
NF4_DESC = ("BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, "
            "bnb_4bit_compute_dtype=torch.float32), dtype float32, device_map cpu")
N_LINEAR4BIT = 2 * len(PROJ)  # lm_head and the embeddings stay fp32 (transformers never quantizes the output layer)
NF4_RAW_KERNEL = {}  # Linear4bit name -> does bitsandbytes' unpatched CPU dequantize kernel agree (summary)


def nf4_reference():
    """tests/ref/make_nf4_fixtures.py: reference_dequant (an independent NF4 + double quant dequantization)
    and flat_dequantize_4bit (workaround 2)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import make_nf4_fixtures
    return make_nf4_fixtures


class Nf4Workarounds:
    """Workaround 2 of make_nf4_fixtures.py for the duration of the NF4 runs: bitsandbytes.functional.dequantize_4bit
    (which MatMul4Bit calls, forward and backward) runs bitsandbytes' CPU kernel on the flattened shape (1, rows*cols),
    where its absmax indexing is right for any column count. (Workaround 1 is per layer: load_base_nf4.)"""

    def __enter__(self):
        import bitsandbytes.functional as F
        self.F, self.orig = F, F.dequantize_4bit
        F.dequantize_4bit = nf4_reference().flat_dequantize_4bit(F, self.orig)
        F.dequantize_4bit.unpatched = self.orig
        return self

    def __exit__(self, *exc):
        self.F.dequantize_4bit = self.orig


def load_base_nf4():
    """tests/fixtures/dpo/model (fp32 safetensors) quantized at load time: every projection becomes a bitsandbytes
    Linear4bit (NF4, blocksize 64, double quant), the rest stays fp32. Checks, for each Linear4bit, that the packed
    codes and statistics equal bitsandbytes' quantize_4bit of the checkpoint's fp32 weight, that the dequantized
    weight equals an independent dequantization, and that the layer computes linear(x, W_dequantized) in fp32."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import BitsAndBytesConfig
    ref = nf4_reference()
    assert hasattr(F.dequantize_4bit, "unpatched"), "Nf4Workarounds not active"
    cfg = BitsAndBytesConfig(**NF4_CONFIG, bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(MODEL_DIR, quantization_config=cfg, dtype=torch.float32, device_map="cpu",
                                            attn_implementation="eager")
    assert base.is_loaded_in_4bit
    ckpt = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    quantized = set()
    gen = torch.Generator().manual_seed(5)
    for name, mod in base.named_modules():
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        # workaround 1: on a CPU with AVX512-BF16, Linear4bit.forward (eval mode, input without grad) would repack
        # the weight once for a fused bf16 kernel (bf16 absmax, bf16 compute) whatever the compute dtype
        mod.support_avx512bf16_for_cpu = False
        W = ckpt[name + ".weight"]
        q, qs = mod.weight.data, mod.weight.quant_state
        assert mod.compute_dtype == torch.float32 and mod.bias is None
        assert (qs.blocksize, qs.quant_type, qs.nested, qs.dtype, tuple(qs.shape)) == \
            (64, "nf4", True, torch.float32, tuple(W.shape)), (name, qs)
        q2, qs2 = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(q, q2) and torch.equal(qs.absmax, qs2.absmax) and torch.equal(qs.offset, qs2.offset)
        assert torch.equal(qs.state2.absmax, qs2.state2.absmax) and torch.equal(qs.state2.code, qs2.state2.code)
        assert torch.equal(qs.code, qs2.code)
        Wq = ref.reference_dequant(q, qs, torch.float32)
        assert torch.equal(F.dequantize_4bit(q, qs), Wq), name  # bitsandbytes (workaround 2) == independent
        # the unpatched kernel on the 2-D shape: right here (every column count is a multiple of 64), recorded
        NF4_RAW_KERNEL[name] = torch.equal(F.dequantize_4bit.unpatched(q, qs), Wq)
        assert not torch.equal(Wq, W)
        x = torch.randn(3, 5, W.shape[1], generator=gen)
        with torch.no_grad():  # eval mode, no grad: the case where the bf16 repack would happen
            assert torch.equal(mod(x), torch.nn.functional.linear(x, Wq)), name
        assert not getattr(qs, "packing_format_for_cpu", False)
        quantized.add(name + ".weight")
    assert len(quantized) == N_LINEAR4BIT, sorted(quantized)
    assert not any("lm_head" in n or "embed" in n for n in quantized)
    sd = base.state_dict()
    for k, v in ckpt.items():  # the unquantized rest is the checkpoint, fp32
        if k not in quantized:
            assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k
    return base


def nf4_weights():
    """The dequantized weight of every Linear4bit (what the NF4 forward multiplies with), under checkpoint names."""
    import bitsandbytes as bnb
    base = load_base_nf4()
    ref = nf4_reference()
    ckpt = load_file(os.path.join(MODEL_DIR, "model.safetensors"))
    t, err = {}, {}
    for name, mod in base.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            k = name + ".weight"
            t[k] = ref.reference_dequant(mod.weight.data, mod.weight.quant_state, torch.float32).contiguous()
            err[k] = (t[k] - ckpt[k]).abs().max().item() / ckpt[k].abs().max().item()
    return t, err


def check_generic_4bit_path(model):
    """No Linear4bit was repacked for the bf16 CPU kernel during the run (workaround 1 held)."""
    import bitsandbytes as bnb
    mods = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(mods) == N_LINEAR4BIT
    for m in mods:
        assert not m.support_avx512bf16_for_cpu and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


KBIT_CALLS = []


def make_trainer_peft_config(adapter, tok, ds, args):
    """What a QLoRA user does: the 4-bit base plus a LoraConfig given to DPOTrainer (peft_config=). TRL 0.27.2 then
    calls peft.prepare_model_for_kbit_training and get_peft_model itself; adapter_<a>'s tensors are copied into the
    fresh LoRA layers afterwards, so the numbers can be compared with PeftModel.from_pretrained's."""
    from peft import set_peft_model_state_dict
    import trl.trainer.dpo_trainer as dpo_mod
    a = ADAPTERS[adapter]
    base = load_base_nf4()
    before = {n: (p.dtype, p.requires_grad, p.detach().clone()) for n, p in base.named_parameters()}
    orig = dpo_mod.prepare_model_for_kbit_training

    @functools.wraps(orig)  # TRL inspects the signature (gradient_checkpointing_kwargs is passed only if listed)
    def recorded(model, *a, **kw):
        out = orig(model, *a, **kw)
        KBIT_CALLS.append({**kw, "input_require_grads_hook": hasattr(out, "_require_grads_hook"),
                           "gradient_checkpointing": out.is_gradient_checkpointing})
        return out
    dpo_mod.prepare_model_for_kbit_training = recorded
    try:
        cfg = LoraConfig(r=a["r"], lora_alpha=a["lora_alpha"], lora_dropout=0.0, bias="none",
                         target_modules=a["target_modules"], use_rslora=a["use_rslora"], task_type="CAUSAL_LM")
        trainer = SeqDPOTrainer(model=base, ref_model=None, args=args, train_dataset=ds, processing_class=tok,
                                peft_config=cfg)
    finally:
        dpo_mod.prepare_model_for_kbit_training = orig
    assert len(KBIT_CALLS) and KBIT_CALLS[-1]["use_gradient_checkpointing"] == args.gradient_checkpointing
    trainer.remove_callback(PrinterCallback)
    model = trainer.model
    assert isinstance(model, PeftModel)
    # prepare_model_for_kbit_training froze the base and cast fp16/bf16 parameters to fp32: nothing to cast here
    for n, p in model.get_base_model().named_parameters():
        if "lora_" in n:
            continue
        dt, _, v = before[n.replace(".base_layer", "")]
        assert p.dtype == dt and not p.requires_grad and torch.equal(p.detach(), v), n
    saved = load_file(os.path.join(OUT, f"adapter_{adapter}", "adapter_model.safetensors"))
    res = set_peft_model_state_dict(model, saved)
    assert not [k for k in res.unexpected_keys], res.unexpected_keys
    assert lora_weights(model).keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) for k, v in lora_weights(model).items())
    return trainer


def compare_steps(a, b):
    """max |difference| on loss, log-probs, metrics and gradients; max relative gradient difference"""
    d = max((a[k].float() - b[k].float()).abs().max().item() for k in b if not k.startswith(("batch.", "pairs")))
    rel = max(((a[k] - b[k]).abs().max() / b[k].abs().max()).item() for k in b if k.startswith("grad."))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b if k.startswith(("batch.", "pairs")))
    return d, rel


def grad_norm(t, prefix="grad."):
    return torch.sqrt(sum((v.double() ** 2).sum() for k, v in t.items() if k.startswith(prefix))).item()


# ----------------------------------------------------------------------------------------------

def fmt_vec(v):
    return " ".join(f"{x:11.6f}" for x in v.tolist())


def folder_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    os.chdir(REPO)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {trl.__version__}, tokenizers {tokenizers.__version__}, datasets {datasets.__version__}")
    fmt = os.path.join(OUT, "FORMAT.md")
    fmt_text = open(fmt).read() if os.path.exists(fmt) else None
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(MODEL_DIR)
    if fmt_text is not None:
        with open(fmt, "w") as f:
            f.write(fmt_text)
    tmp = tempfile.mkdtemp(prefix="medbot-dpo-")
    try:
        n_regex = check_llama3_regex()
        tok, n_ignore = build_tokenizer()
        build_model(tok)
        build_adapters()

        with open(os.path.join(OUT, "data.jsonl"), "w", encoding="utf-8") as f:
            for r in PAIRS:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        raw = [json.loads(line) for line in open(os.path.join(OUT, "data.jsonl"), encoding="utf-8")]
        tokens, info, rendered = build_tokens(tok, raw, tmp)
        print_lengths(info)
        cases = check_cases(info)
        save(tokens, "tokens.safetensors", max_prompt_length=MAX_PROMPT_LENGTH,
             max_completion_length=MAX_COMPLETION_LENGTH, max_length=MAX_LENGTH, eos=tok.eos_token_id)
        with open(os.path.join(OUT, "rendered.jsonl"), "w", encoding="utf-8") as f:
            for r in rendered:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        ds = Dataset.from_list(rendered)

        steps = [("step_qk_sigmoid", "qk", dict(loss_type="sigmoid", label_smoothing=0.0), 0),
                 ("step_qk_sigmoid_ls", "qk", dict(loss_type="sigmoid", label_smoothing=0.1), 0),
                 ("step_qk_hinge", "qk", dict(loss_type="hinge", label_smoothing=0.0), 0),
                 ("step_qk_ipo", "qk", dict(loss_type="ipo", label_smoothing=0.0), 0),
                 ("step_qk_robust", "qk", dict(loss_type="robust", label_smoothing=0.1), 0),
                 ("step_all_sigmoid", "all", dict(loss_type="sigmoid", label_smoothing=0.0), 0),
                 ("step_qk_sigmoid_b1", "qk", dict(loss_type="sigmoid", label_smoothing=0.0), 1)]
        results = {}
        for name, adapter, kw, b in steps:
            t, _ = dpo_step(adapter, tok, ds, tmp, tokens, batch_index=b, **kw)
            results[name] = t
            save(t, name + ".safetensors", adapter=f"adapter_{adapter}", beta=BETA, batch_index=b,
                 **{k: v for k, v in kw.items()})

        # 8. gradient checkpointing: same numbers
        t_gc, _ = dpo_step("qk", tok, ds, tmp, tokens, batch_index=0, gc=True, loss_type="sigmoid", label_smoothing=0.0)
        ref = results["step_qk_sigmoid"]
        gc_diff = max((t_gc[k].float() - ref[k].float()).abs().max().item() for k in ref if k.startswith(("grad.", "loss")))
        gc_rel = max(((t_gc[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref if k.startswith("grad."))
        assert gc_diff < 1e-6, gc_diff
        assert all(torch.equal(t_gc[k], ref[k]) for k in ref if k.startswith("batch."))
        save(t_gc, "step_qk_sigmoid_gc.safetensors", adapter="adapter_qk", beta=BETA, batch_index=0,
             loss_type="sigmoid", label_smoothing=0.0, gradient_checkpointing=True)

        # 8b. a tokenizer whose tokenizer_config.json names <|eot_id|> as eos_token (Llama-3.1-Instruct style):
        # TRL appends processing_class.eos_token_id, so the completions end in 436 instead of 435
        tok_eot = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR, eos_token=SPECIALS[2])
        tok_eot.save_pretrained(EOT_DIR)
        tok_eot = PreTrainedTokenizerFast.from_pretrained(EOT_DIR)
        assert tok_eot.eos_token == "<|eot_id|>" and tok_eot.eos_token_id == BPE_SIZE + 2 != tok.eos_token_id
        assert json.load(open(os.path.join(EOT_DIR, "tokenizer_config.json")))["eos_token"] == "<|eot_id|>"
        tokens_eot, _, _ = build_tokens(tok_eot, raw, tmp)
        assert all(tokens_eot[f"{k}_input_ids.{i}"][-1].item() == tok_eot.eos_token_id
                   for i in range(len(PAIRS)) for k in ("chosen", "rejected")
                   if tokens[f"{k}_input_ids.{i}"][-1].item() == tok.eos_token_id)
        save(tokens_eot, "tokens_eot.safetensors", max_prompt_length=MAX_PROMPT_LENGTH,
             max_completion_length=MAX_COMPLETION_LENGTH, max_length=MAX_LENGTH, eos=tok_eot.eos_token_id)
        t_eot, _ = dpo_step("qk", tok_eot, ds, tmp, tokens_eot, batch_index=1, loss_type="sigmoid", label_smoothing=0.0)
        eot_dloss = abs(t_eot["loss"].item() - results["step_qk_sigmoid_b1"]["loss"].item())
        assert eot_dloss > 1e-4, eot_dloss  # the EOS changes the numbers
        save(t_eot, "step_qk_sigmoid_eot.safetensors", adapter="adapter_qk", beta=BETA, batch_index=1,
             loss_type="sigmoid", label_smoothing=0.0, tokenizer="tokenizer_eot")

        train_logs = {}
        for adapter in ("qk", "all"):
            t, log = train_run(adapter, tok, ds, tmp)
            save(t, f"train_{adapter}.safetensors", adapter=f"adapter_{adapter}")
            with open(os.path.join(OUT, f"train_{adapter}_log.json"), "w") as f:
                json.dump(log, f, indent=1)
                f.write("\n")
            train_logs[adapter] = log

        t_sft, sft_dl, sft_dg = sft_run(tok, tokens, tmp)
        save(t_sft, "sft_qk.safetensors", adapter="adapter_qk")

        save(merge_run(tok), "merged_all.safetensors", adapter="adapter_all")

        # 11. NF4 base (bitsandbytes), after everything else: bitsandbytes is patched only inside this block
        import bitsandbytes
        nf4_meta = dict(base="nf4", quantization=NF4_DESC, bitsandbytes=bitsandbytes.__version__)
        step_meta = dict(adapter="adapter_qk", beta=BETA, batch_index=0, loss_type="sigmoid", label_smoothing=0.0)
        with Nf4Workarounds():
            t_w, nf4_err = nf4_weights()
            save(t_w, "nf4_weights.safetensors", **nf4_meta)
            t_nf4, _ = dpo_step("qk", tok, ds, tmp, tokens, batch_index=0, nf4=True, loss_type="sigmoid",
                                label_smoothing=0.0)
            save(t_nf4, "step_qk_sigmoid_nf4.safetensors", **step_meta, **nf4_meta)
            t_nf4_gc, _ = dpo_step("qk", tok, ds, tmp, tokens, batch_index=0, nf4=True, gc=True, loss_type="sigmoid",
                                   label_smoothing=0.0)
            nf4_gc_diff = compare_steps(t_nf4_gc, t_nf4)
            assert nf4_gc_diff[0] < 1e-6, nf4_gc_diff
            save(t_nf4_gc, "step_qk_sigmoid_nf4_gc.safetensors", **step_meta, gradient_checkpointing=True, **nf4_meta)
            # the QLoRA path of a user who hands TRL the 4-bit base and a LoraConfig: TRL calls
            # prepare_model_for_kbit_training + get_peft_model; with adapter_qk's tensors copied in, same numbers
            kbit_diff = {}
            for gc, want in ((False, t_nf4), (True, t_nf4_gc)):
                t_k, _ = dpo_step("qk", tok, ds, tmp, tokens, batch_index=0, nf4=True, gc=gc, via_peft_config=True,
                                  loss_type="sigmoid", label_smoothing=0.0)
                kbit_diff[gc] = compare_steps(t_k, want)
                assert kbit_diff[gc][0] < 1e-6, kbit_diff
            t_train_nf4, log_nf4 = train_run("qk", tok, ds, tmp, nf4=True)
            log_nf4["bitsandbytes"] = bitsandbytes.__version__
            save(t_train_nf4, "train_qk_nf4.safetensors", adapter="adapter_qk", **nf4_meta)
            with open(os.path.join(OUT, "train_qk_nf4_log.json"), "w") as f:
                json.dump(log_nf4, f, indent=1)
                f.write("\n")
        t_train_qk = load_file(os.path.join(OUT, "train_qk.safetensors"))

        with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__, "trl": trl.__version__, "tokenizers": tokenizers.__version__,
                       "datasets": datasets.__version__, "script": "tests/ref/make_dpo_fixtures.py"}, f, indent=1)
            f.write("\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ summary
    print(f"\nLlama 3 regex: Split == regex.findall on {n_regex} texts; "
          f"ignore_merges changes {n_ignore} of the texts' tokenizations")
    print(f"tokenizer: {BPE_SIZE} BPE + {len(SPECIALS)} specials = {BPE_SIZE + len(SPECIALS)}, "
          f"model vocab_size {VOCAB_SIZE}; bos {tok.bos_token_id} eos {tok.eos_token_id} pad {tok.pad_token_id}")
    for k, v in cases.items():
        print(f"  case: {k}: {v}")
    print("\nstep file                  loss   chosen_logps        ref_chosen_logps    rejected-ref_rejected "
          "margins   acc  max|grad|")
    for name, t in list(results.items()) + [("step_qk_sigmoid_gc", t_gc)]:
        g = max(v.abs().max().item() for k, v in t.items() if k.startswith("grad."))
        c, rc = t["chosen_logps"].tolist(), t["ref_chosen_logps"].tolist()
        dr = (t["rejected_logps"] - t["ref_rejected_logps"]).tolist()
        print(f"{name:20s} {t['loss'].item():10.6f}  {c[0]:9.4f} {c[1]:9.4f}  {rc[0]:9.4f} {rc[1]:9.4f}  "
              f"{dr[0]:+8.4f} {dr[1]:+8.4f}  {t['rewards/margins'].item():+.5f} {t['rewards/accuracies'].item():.2f}"
              f"  {g:.3e}")
    print(f"gradient checkpointing vs plain: max |diff| {gc_diff:.3e} (loss, grads), max rel grad diff {gc_rel:.3e}")
    print(f"EOS <|eot_id|> (tokenizer_eot): step_qk_sigmoid_eot loss {t_eot['loss'].item():.6f} vs "
          f"{results['step_qk_sigmoid_b1']['loss'].item():.6f} with <|end_of_text|> (pairs 2, 3)")
    for a, log in train_logs.items():
        print(f"\ntrain_{a}: optim {log['optim']} ({log['optimizer_class']}), lrs {log['learning_rates']}")
        for e in log["log_history"]:
            print(f"  step {e['step']} loss {e['loss']:.4f} grad_norm {e['grad_norm']:.5f} (> max_grad_norm "
                  f"{TRAIN['max_grad_norm']}) lr {e['learning_rate']:.6g} epoch {e['epoch']:.4f} "
                  f"acc {e['rewards/accuracies']:.3f} margin {e['rewards/margins']:+.5f}")
    print(f"\nsft_qk: loss {t_sft['loss'].item():.6f} over {int(t_sft['n_tokens'])} tokens; SFTTrainer "
          f"agrees: |dloss| {sft_dl:.2e}, max rel grad diff {sft_dg:.2e}")
    print(f"\nNF4 base ({NF4_DESC}, bitsandbytes {bitsandbytes.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}): {len(t_w)} Linear4bit layers; quantize_4bit of the checkpoint "
          f"== transformers' weights, dequantized == independent dequantization; max |W_nf4 - W| / max |W| per layer "
          f"{min(nf4_err.values()):.3f} .. {max(nf4_err.values()):.3f}; unpatched 2-D dequantize kernel right on "
          f"{sum(NF4_RAW_KERNEL.values())}/{len(NF4_RAW_KERNEL)} layers")
    print(f"prepare_model_for_kbit_training calls by TRL on the peft_config path: {KBIT_CALLS}")
    ref = results["step_qk_sigmoid"]
    print("NF4 vs fp32 base, step_qk_sigmoid:")
    for k in ["loss", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "rewards/margins",
              "logits/chosen"]:
        print(f"  {k:20s} nf4 {fmt_vec(t_nf4[k])}   fp32 {fmt_vec(ref[k])}")
    rel = max(((t_nf4[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref if k.startswith("grad."))
    print(f"  grad norm            nf4 {grad_norm(t_nf4):.6f}   fp32 {grad_norm(ref):.6f};  max rel grad diff "
          f"(max|diff| / max|value| per tensor) {rel:.3e}")
    print(f"  nf4 gradient checkpointing vs plain: max |diff| {nf4_gc_diff[0]:.3e}, max rel grad diff "
          f"{nf4_gc_diff[1]:.3e}")
    print(f"  TRL peft_config path (prepare_model_for_kbit_training) vs PeftModel.from_pretrained: max |diff| "
          f"{kbit_diff[False][0]:.3e} (gc off), {kbit_diff[True][0]:.3e} (gc on)")
    print(f"train_qk_nf4 vs train_qk:")
    for e, e0 in zip(log_nf4["log_history"], train_logs["qk"]["log_history"]):
        print(f"  step {e['step']} loss {e['loss']:.4f} ({e0['loss']:.4f}) grad_norm {e['grad_norm']:.5f} "
              f"({e0['grad_norm']:.5f}) margin {e['rewards/margins']:+.5f} ({e0['rewards/margins']:+.5f})")
    fin = max(((t_train_nf4[k] - t_train_qk[k]).abs().max() / t_train_qk[k].abs().max()).item()
              for k in t_train_qk if k.startswith("base_model."))
    moved = max(((t_train_qk[k] - load_file(os.path.join(OUT, "adapter_qk", "adapter_model.safetensors"))[k])
                 .abs().max() / t_train_qk[k].abs().max()).item() for k in t_train_qk if k.startswith("base_model."))
    print(f"  final LoRA weights: max rel diff nf4 vs fp32 {fin:.3e} (training moved them by up to {moved:.3e})")
    print(f"\n{OUT}: {folder_size(OUT) / 1024:.1f} KiB")
    assert folder_size(OUT) < 2.5 * 1024 * 1024


if __name__ == "__main__":
    sys.exit(main())
