#!/usr/bin/env python3
"""The shard layouts that transformers' save_pretrained gives the models `medbot init` writes.

Regenerate (from the repository root, in a virtualenv with tests/ref/requirements.txt):
    python tests/ref/make_shard_fixtures.py

For each case below (a config, a dtype, a max_shard_size) writes
tests/fixtures/llama/shards/<case>.index.json: the model.safetensors.index.json that
save_pretrained writes for that model, computed as save_pretrained computes it (the state dict in
LlamaForCausalLM's order, tied lm_head left out, huggingface_hub's
split_torch_state_dict_into_shards, json.dumps(index, indent=2, sort_keys=True) + "\\n"). The
model is built on the meta device: only names, dtypes and shapes matter. The script first checks
that it reproduces the index save_pretrained wrote for tests/fixtures/llama/gqa4_bf16_sharded.
tests/test_files.c (init_shards_as_save_pretrained) runs `medbot init --max_shard_size` on each
case and compares its index with these files byte for byte.
"""
import json
import os

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..", "..")
OUT = os.path.join(REPO, "tests", "fixtures", "llama", "shards")
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}

# name: (config, dtype, max_shard_size); the same table is in tests/test_files.c
CASES = {
    # untied, f32: embed_tokens, lm_head and the MLP projections are each bigger than the limit, so
    # they get shards of their own, listed before the shard being filled (lm_head before model.norm)
    "gqa4_f32_40KB": ("tests/fixtures/llama/gqa4_bf16_sharded/config.json", "f32", "40KB"),
    # tied (no lm_head saved), multi-query, a lower-case unit
    "tied_mqa_f16_30kB": ("tests/fixtures/llama/tied_mqa_bf16/config.json", "f16", "30kB"),
    # the bundled tiny model: a 16 MB embedding, then the layers in a few shards
    "tiny_bf16_200KB": ("weights/tiny/config.json", "bf16", "200KB"),
}


def index_text(config_path, dtype, max_shard_size):
    with open(os.path.join(REPO, config_path)) as f:
        cfg = LlamaConfig(**json.load(f))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(DTYPES[dtype])
    state_dict = model.state_dict()
    if cfg.tie_word_embeddings:  # save_pretrained saves a tied weight once, under its first name
        del state_dict["lm_head.weight"]
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    assert split.is_sharded, (config_path, max_shard_size)
    index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
             "weight_map": split.tensor_to_filename}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def main():
    saved = os.path.join(REPO, "tests", "fixtures", "llama", "gqa4_bf16_sharded", "model.safetensors.index.json")
    with open(saved) as f:  # written by save_pretrained itself (make_llama_fixtures.py)
        assert index_text("tests/fixtures/llama/gqa4_bf16_sharded/config.json", "bf16", "120KB") == f.read()
    os.makedirs(OUT, exist_ok=True)
    for name, (config, dtype, size) in CASES.items():
        with open(os.path.join(OUT, name + ".index.json"), "w") as f:
            f.write(index_text(config, dtype, size))
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "script": "tests/ref/make_shard_fixtures.py"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
