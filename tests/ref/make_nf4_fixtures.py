#!/usr/bin/env python3
"""NF4 + double quantization fixtures from bitsandbytes (CPU backend) and transformers.

Regenerate (from the repository root, in a virtualenv with tests/ref/requirements.txt):
    python tests/ref/make_nf4_fixtures.py

Reads the tiny models in tests/fixtures/llama/ (it never rewrites them) and writes
tests/fixtures/nf4/:

  quant.safetensors     bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4",
                        compress_statistics=True) on random weights of several shapes and dtypes,
                        case k stored as
                          case{k}.input              the weight (F32, BF16 or F16), shape (rows, cols)
                          case{k}.packed             U8 (rows*cols/2): two codes per byte, first high
                          case{k}.absmax             U8 (blocks): absmax codes (double quant)
                          case{k}.nested_absmax      F32 (ceil(blocks/256)): nested scales
                          case{k}.offset             F32 (1): the mean of the absmax
                          case{k}.quant_map          F32 (16), case{k}.nested_quant_map F32 (256)
                          case{k}.dequant_f32 / _bf16 / _f16   dequantize_4bit in that dtype
                        and blockwise8.{input,codes,absmax,code}: quantize_blockwise (the 8-bit kernel
                        the double quant uses) on values placed exactly on ties between map entries;
                        sum{k}.input, sum{k}.mean: torch.mean of fp32 vectors of several lengths (the
                        double quant's offset is one; its summation order is what is checked).
  forward.safetensors   for each fixture model: {model}.tokens (B, T) int32 and {model}.logits_f32,
                        {model}.logits_bf16 (B, T, V) fp32: transformers' LlamaForCausalLM loaded with
                        BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute dtype float32 /
                        bfloat16), the rest of the model in fp32, eager attention; and
                        {model}.logits_bf16w: the same model with each Linear4bit computing
                        linear(x, dequantize_4bit(W) in bf16) in fp32 (bf16-rounded weights, fp32
                        activations: what medbot's CPU backend does with compute dtype bfloat16).
  tied_mqa_bf16_4bit/   a checkpoint saved pre-quantized by transformers (save_pretrained of the model
                        loaded in 4-bit from tests/fixtures/llama/tied_mqa_bf16, double quant, compute
                        dtype float32), and ref.safetensors: tokens, logits (transformers loading that
                        folder back).
  gqa4_nodq_4bit/       the same for gqa4_bf16_sharded without double quant (fp32 absmax), compute
                        dtype bfloat16, saved in shards; its ref.safetensors also holds logits_f32 (the
                        loaded model with compute dtype float32).

Two things in bitsandbytes 0.49.1's CPU backend are worked around, and the script checks both:
  1. Linear4bit.forward on a CPU with AVX512-BF16 repacks the weight for a fused bf16 kernel that
     also rounds absmax to bf16; that is not what compute dtype float32 means, so it is switched off
     (support_avx512bf16_for_cpu = False) and the forward takes bitsandbytes' generic path
     (dequantize_4bit, then torch's linear).
  2. The AVX-512 dequantize_4bit kernel indexes absmax per row (row * cols/blocksize + col/blocksize),
     which is wrong when cols is not a multiple of the blocksize (blocks then straddle rows; the
     quantizer and the CUDA kernel use flat indices). The same kernel is called on the flattened
     shape (1, rows*cols), where its indexing is right; the script checks the result against an
     independent dequantization and reports the layers the unpatched kernel gets wrong.
torch runs single-threaded: the double quant's offset is torch's mean of the absmax, whose summation
order depends on torch's thread count once there are 32768 or more blocks.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA = os.path.join(HERE, "..", "fixtures", "llama")
OUT = os.path.join(HERE, "..", "fixtures", "nf4")

MODELS = ["gqa2_f32", "gqa4_bf16_sharded", "tied_mqa_bf16"]


def flat_dequantize_4bit(F, orig):
    """dequantize_4bit through the same kernel, on the flattened shape (workaround 2)."""
    from bitsandbytes.functional import QuantState

    def dequant(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
        qs = quant_state
        shape = tuple(qs.shape)
        flat = QuantState(absmax=qs.absmax, shape=torch.Size([1, int(np.prod(shape))]), code=qs.code,
                          blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=qs.dtype,
                          offset=qs.offset, state2=qs.state2)
        out = orig(A, flat).reshape(shape)
        return out.t() if A.shape[0] == 1 else out  # as dequantize_4bit does for a transposed A
    return dequant


def reference_dequant(q, qs, dtype):
    """code[q] * absmax, absmax = map8[qa] * scale2 + offset, in fp32, then rounded to dtype."""
    import bitsandbytes.functional as F
    code = F.get_4bit_type("nf4", device="cpu")
    n = int(np.prod(qs.shape))
    if qs.nested:
        scale2 = qs.state2.absmax.repeat_interleave(qs.state2.blocksize)[: qs.absmax.numel()]
        absmax = qs.state2.code[qs.absmax.long()] * scale2
        absmax = absmax + qs.offset
    else:
        absmax = qs.absmax.float()
    b = q.reshape(-1)
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n].long()
    w = code[codes] * absmax.repeat_interleave(qs.blocksize)[:n]
    return w.reshape(qs.shape).to(dtype)


def near_midpoint(lo, hi, span):
    """the fp32 values within `span` steps of the fp32 midpoint of lo and hi"""
    v = np.float32((np.float64(lo) + np.float64(hi)) / 2)
    out = []
    for k in range(-span, span + 1):
        s = v
        for _ in range(abs(k)):
            s = np.nextafter(s, np.float32(np.inf if k > 0 else -np.inf))
        out.append(s)
    return out


def f32_dist(s, c):
    return abs(np.float32(s - c))


def quant_cases():
    rng = np.random.default_rng(4)
    cases = []

    def normal(shape, spread):
        # per-block scales spread over `spread` decades so the double quant uses many codes
        x = rng.standard_normal(shape).astype(np.float32).reshape(-1)
        s = 10.0 ** rng.uniform(-spread, 0, size=(x.size + 63) // 64).astype(np.float32)
        return (x * np.repeat(s, 64)[: x.size] * 0.05).reshape(shape)

    cases.append((normal((96, 80), 0), torch.float32))      # blocks straddle rows (80 % 64 != 0)
    cases.append((normal((96, 80), 1), torch.bfloat16))
    cases.append((normal((130, 64), 2), torch.bfloat16))
    cases.append((normal((7, 10), 0), torch.bfloat16))      # 70 values: a short last block of 6
    cases.append((normal((3, 22), 1), torch.float16))       # 66 values: a short last block of 2
    cases.append((normal((150, 130), 3), torch.float32))    # 305 blocks: a short nested block of 49
    cases.append((normal((400, 96), 2), torch.bfloat16))    # 600 blocks: nested 256 + 256 + 88
    cases.append((normal((5, 26), 1), torch.float32))       # 130 values: short last block of 2, fp32

    # values exactly on codes and on ties: blocks whose absmax is 1, so s = x exactly; fp32 values
    # s with |s - code[i]| == |s - code[i+1]| in fp32 (the tie rule decides them), every code,
    # +-0, an all-zero block (absmax 0: 0 * inf = NaN, which torch.argmin sends to code 0)
    import bitsandbytes.functional as F
    code = F.get_4bit_type("nf4", device="cpu").numpy()
    vals = []
    for i in range(15):
        for s in near_midpoint(code[i], code[i + 1], 8):
            up = np.nextafter(s, np.float32(np.inf))
            if f32_dist(s, code[i]) == f32_dist(s, code[i + 1]):
                vals.append(s)
            if f32_dist(s, code[i]) < f32_dist(s, code[i + 1]) and f32_dist(up, code[i]) > f32_dist(up, code[i + 1]):
                vals += [s, up]  # the last value that goes lower, the first that goes upper
    vals += list(code) + [np.float32(0.0), np.float32(-0.0)]
    vals = np.array(vals, np.float32)
    nb = (len(vals) + 62) // 63
    x = np.zeros((nb + 1) * 64, np.float32)
    for b in range(nb):
        x[b * 64] = 1.0 if b % 2 else -1.0
        chunk = vals[b * 63:(b + 1) * 63]
        x[b * 64 + 1: b * 64 + 1 + len(chunk)] = chunk
    cases.append((x.reshape(-1, 64), torch.float32))         # last block all zeros
    # the same ties scaled by a power of two in bf16 (exact), and a block of +-1 only: every block
    # then has the same absmax, absmax - offset is all zeros and the nested 0/0 gives map entry 0
    cases.append(((x.reshape(-1, 64) * 0.5), torch.bfloat16))
    sign = np.where(rng.random((4, 64)) < 0.5, -1.0, 1.0).astype(np.float32)
    cases.append((sign, torch.float32))
    cases.append((reciprocal_case(rng, code), torch.float32))
    for dt in (torch.bfloat16, torch.float16):
        cases.append((short_block_case(rng, code, dt), dt))
    return cases


def nearest(s, code):
    """bitsandbytes' choice: torch.argmin of |s - code| (fp32), ties and NaN to the lower index"""
    s = torch.as_tensor(np.asarray(s, np.float32))
    return torch.argmin(torch.abs(s.view(-1, 1) - torch.tensor(code)), dim=-1).numpy()


def reciprocal_case(rng, code):
    """fp32 values where x * fl(1/absmax) and x / absmax fall on different codes: bitsandbytes
    multiplies by the reciprocal, and these values tell the two apart"""
    blocks = []
    while len(blocks) < 4:
        a = np.float32(rng.uniform(0.02, 1.0))
        r = np.float32(np.float32(1) / a)
        found = []
        for t in np.concatenate([code[:-1] + np.diff(code) / 2, -(code[:-1] + np.diff(code) / 2)]):
            x0 = np.float32(t * a)
            for k in range(-4, 5):
                x = x0
                for _ in range(abs(k)):
                    x = np.nextafter(x, np.float32(np.inf if k > 0 else -np.inf))
                if abs(x) < a and nearest([np.float32(x * r)], code)[0] != nearest([np.float32(x / a)], code)[0]:
                    found.append(x)
        if len(found) >= 8:
            blk = np.zeros(64, np.float32)
            blk[0] = a
            blk[1:1 + min(63, len(found))] = found[:63]
            blocks.append(blk)
    x = np.concatenate(blocks)
    print(f"  reciprocal case: {np.count_nonzero(x) - 4} values where x * (1/absmax) and x / absmax differ")
    return x.reshape(4, 64)


def short_block_case(rng, code, dt):
    """(2, 63): a full block, then a short block of 62 values of dtype dt whose scaled values land
    on other codes once rounded to dt (bitsandbytes computes a short block's x * (1/absmax) in dt)"""
    a = np.float32(torch.tensor(0.73).to(dt).item())
    r = np.float32(np.float32(1) / a)
    found = []
    while len(found) < 61:
        x = np.float32(torch.tensor(rng.uniform(-a, a, 4096).astype(np.float32)).to(dt).float().numpy())
        s = (x * r).astype(np.float32)
        sd = torch.tensor(s).to(dt).float().numpy()
        diff = nearest(s, code) != nearest(sd, code)
        found += list(x[diff])
    w = np.concatenate([rng.standard_normal(64).astype(np.float32) * 0.05, [a], np.array(found[:61], np.float32)])
    print(f"  short block case {str(dt)[6:]}: 61 values whose code depends on the rounding to {str(dt)[6:]}")
    return w.reshape(2, 63)


def make_quant():
    import bitsandbytes.functional as F
    out = {}
    orig = F.dequantize_4bit
    flat = flat_dequantize_4bit(F, orig)
    for k, (x, dt) in enumerate(quant_cases()):
        w = torch.tensor(x).to(dt)
        q, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        p = f"case{k}."
        out[p + "input"] = w.contiguous()
        out[p + "packed"] = q.reshape(-1).contiguous()
        out[p + "absmax"] = qs.absmax.contiguous()
        out[p + "nested_absmax"] = qs.state2.absmax.contiguous()
        out[p + "offset"] = qs.offset.reshape(1).float().contiguous()
        out[p + "quant_map"] = qs.code.contiguous()
        out[p + "nested_quant_map"] = qs.state2.code.contiguous()
        for name, cdt in (("f32", torch.float32), ("bf16", torch.bfloat16), ("f16", torch.float16)):
            qs.dtype = cdt
            d = flat(q, qs)
            ref = reference_dequant(q, qs, cdt)
            assert torch.equal(d.view(-1).float(), ref.view(-1).float()), f"case {k} dequant {name}"
            out[p + "dequant_" + name] = d.contiguous()
            raw = orig(q, qs)
            if not torch.equal(raw.view(-1).float(), ref.view(-1).float()) and name == "f32":
                print(f"  case {k} {tuple(w.shape)}: bitsandbytes' CPU dequantize_4bit kernel on the "
                      f"2-D shape differs (workaround 2)")
        print(f"  case {k}: {tuple(w.shape)} {str(dt)[6:]}, {qs.absmax.numel()} blocks, "
              f"offset {qs.offset.item():.9g}")

    # 8-bit blockwise (the double quant's kernel) on fp32 ties between map entries
    dyn = F.create_dynamic_map().numpy().copy()
    dyn[0] = -1.0  # what bitsandbytes' CPU kernel quantizes against (it sets code[0] = -1)
    ties = [s for i in range(255) for s in near_midpoint(dyn[i], dyn[i + 1], 6)
            if dyn[i] < s < dyn[i + 1] and f32_dist(s, dyn[i]) == f32_dist(s, dyn[i + 1])]
    vals = np.array(ties + list(dyn), np.float32)
    nb = (len(vals) + 254) // 255
    a = np.zeros(nb * 256, np.float32)
    for b in range(nb):
        a[b * 256] = 1.0
        chunk = vals[b * 255:(b + 1) * 255]
        a[b * 256 + 1: b * 256 + 1 + len(chunk)] = chunk
    a = a[: (nb - 1) * 256 + 1 + len(vals) - (nb - 1) * 255]  # a short last block
    q8, st8 = F.quantize_blockwise(torch.tensor(a), blocksize=256)
    out["blockwise8.input"] = torch.tensor(a)
    out["blockwise8.codes"] = q8.contiguous()
    out["blockwise8.absmax"] = st8.absmax.contiguous()
    out["blockwise8.code"] = st8.code.contiguous()
    print(f"  blockwise8: {len(ties)} ties among {a.size} values")

    rng = np.random.default_rng(7)
    for k, n in enumerate([1, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65, 127, 255, 256, 1000, 1043, 4095, 4096,
                           9000, 20000, 32767]):
        x = torch.tensor((rng.random(n) * 0.1).astype(np.float32))
        out[f"sum{k}.input"] = x
        out[f"sum{k}.mean"] = x.mean().reshape(1)
    save_file(out, os.path.join(OUT, "quant.safetensors"), metadata={"format": "pt"})


def load_4bit(folder, compute, double_quant=True, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute)
    m = AutoModelForCausalLM.from_pretrained(folder, quantization_config=cfg, dtype=dtype,
                                             device_map="cpu", attn_implementation="eager").eval()
    return prepare(m)


def prepare(m):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    n = bad = 0
    for mod in m.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # workaround 1
            qs = mod.weight.quant_state
            ref = reference_dequant(mod.weight.data, qs, torch.float32)
            qs.dtype = torch.float32
            got = F.dequantize_4bit(mod.weight.data, qs)
            n += 1
            bad += not torch.equal(got, ref)
            assert torch.equal(got, ref)
    return m, n


@torch.no_grad()
def logits_of(m, tokens):
    return m(input_ids=tokens).logits.float().contiguous()


def make_forward():
    out = {}
    for name in MODELS:
        folder = os.path.join(LLAMA, name)
        tokens = load_file(os.path.join(folder, "ref.safetensors"))["tokens_full"][:, :16].long()
        out[name + ".tokens"] = tokens.to(torch.int32).contiguous()
        for tag, cdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            m, n = load_4bit(folder, cdt)
            out[f"{name}.logits_{tag}"] = logits_of(m, tokens)
        # bf16-rounded dequantized weights (bitsandbytes' kernel), fp32 activations
        import bitsandbytes as bnb
        import bitsandbytes.functional as F
        for mod in m.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                qs = mod.weight.quant_state
                qs.dtype = torch.bfloat16
                W = F.dequantize_4bit(mod.weight.data, qs).float()
                mod.forward = (lambda W: lambda x: torch.nn.functional.linear(x.float(), W))(W)
        out[f"{name}.logits_bf16w"] = logits_of(m, tokens)
        print(f"  {name}: {n} Linear4bit layers, logits {tuple(out[name + '.logits_f32'].shape)}, "
              f"max|f32 - bf16 compute| {(out[name + '.logits_f32'] - out[name + '.logits_bf16']).abs().max():.3e}")
    save_file(out, os.path.join(OUT, "forward.safetensors"), metadata={"format": "pt"})


def make_prequantized(src, dst, compute, double_quant, shard=None):
    from transformers import AutoModelForCausalLM
    folder = os.path.join(LLAMA, src)
    out = os.path.join(OUT, dst)
    shutil.rmtree(out, ignore_errors=True)
    m, _ = load_4bit(folder, compute, double_quant, dtype=torch.bfloat16)
    kwargs = {"safe_serialization": True}
    if shard:
        kwargs["max_shard_size"] = shard
    m.save_pretrained(out, **kwargs)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    # transformers loading the saved folder back: the reference for medbot loading it
    back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu",
                                                attn_implementation="eager").eval()
    back, n = prepare(back)
    tokens = load_file(os.path.join(folder, "ref.safetensors"))["tokens_full"][:, :16].long()
    ref = {"tokens": tokens.to(torch.int32).contiguous(), "logits": logits_of(back, tokens)}
    if compute != torch.float32:
        import bitsandbytes as bnb
        for mod in back.modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.compute_dtype = torch.float32
        ref["logits_f32"] = logits_of(back, tokens)
    save_file(ref, os.path.join(out, "ref.safetensors"), metadata={"format": "pt"})
    print(f"  {dst}: {n} Linear4bit layers, files {sorted(os.listdir(out))}")


def main():
    import bitsandbytes
    import bitsandbytes.functional as F
    import transformers
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    os.makedirs(OUT, exist_ok=True)
    make_quant()
    F.dequantize_4bit = flat_dequantize_4bit(F, F.dequantize_4bit)  # workaround 2, from here on
    make_forward()
    make_prequantized("tied_mqa_bf16", "tied_mqa_bf16_4bit", torch.float32, True)
    make_prequantized("gqa4_bf16_sharded", "gqa4_nodq_4bit", torch.bfloat16, False, shard="100KB")
    with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "bitsandbytes": bitsandbytes.__version__,
                   "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "script": "tests/ref/make_nf4_fixtures.py"}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
