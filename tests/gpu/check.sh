#!/usr/bin/env bash
# tests/gpu/check.sh: the one run on a machine with an NVIDIA GPU (compute capability 8.0 or
# newer, a driver, the CUDA libraries; PyTorch + transformers + peft for the comparison).
#   1. builds medbot and the GPU programs (./build.sh gpu);
#   2. build/check_ops: every CUDA op against the CPU backend on fresh random inputs (bf16 outputs
#      within 1e-2, fp32 ones within 1e-4, NaN never passes), a DPO micro-batch on
#      tests/fixtures/dpo on both backends (loss and metrics within 1e-2; LoRA gradients: every
#      tensor's cosine >= 0.99 and the error within 5e-2 or twice the bf16 floor of the batch, see
#      check_ops.c), two optimizer steps, prefill + decode logits;
#   3. build/bench_gpu: the card's DPO step (NF4 base, LoRA r64 q/k, 4 pairs x (128 + 128) tokens,
#      gradient checkpointing) and decoding at Llama-3.1-8B shape with random weights; tokens/s,
#      MFU against the measured bf16 GEMM rate, peak GPU memory next to `medbot info --plan`;
#   4. tests/gpu/bench_torch.py: the same step and decoding in PyTorch + transformers + peft;
#   5. one table, last. Logs in $OUT (default build/gpu-check). Sized for < 8 minutes on one H100.
# Exit status: 0 when every check passed (the benchmarks only have to run).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-build/gpu-check}
mkdir -p "$OUT"
export MEDBOT_CACHE_DIR=${MEDBOT_CACHE_DIR:-$PWD/build/kernel-cache}
PY=${PYTHON:-python3}
T0=$SECONDS
stage() { echo "=== $* (t=$((SECONDS - T0)) s)"; }

stage "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,power.limit --format=csv \
  2>&1 | tee "$OUT/nvidia-smi.txt"

stage "build"
if ! ./build.sh gpu > "$OUT/build.log" 2>&1; then tail -30 "$OUT/build.log"; echo "check.sh: build failed"; exit 1; fi
tail -1 "$OUT/build.log"

stage "ops, DPO step, training and decoding: CUDA against the CPU"
# one process per check: a kernel that faults is named (MEDBOT_CUDA_SYNC=1) and stops only its check
: > "$OUT/check_ops.log"
rc_ops=0 passed=0 failed=0
# shellcheck disable=SC2013
for t in $(grep -oE 'T\([a-z0-9_]+\)' tests/gpu/check_ops.c | sed 's/^T(//; s/)$//' | grep -v teardown); do
  MEDBOT_CUDA_SYNC=1 MB_CHECK_SEED=${MB_CHECK_SEED:-$$} timeout 240 build/check_ops "gpu/$t" > "$OUT/check_$t.log" 2>&1
  rc=$?
  cat "$OUT/check_$t.log" >> "$OUT/check_ops.log"
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$OUT/check_$t.log" | tail -1)
  p=$(echo "${line:-0 passed, 1 failed}" | cut -d' ' -f1) f=$(echo "${line:-0 passed, 1 failed}" | cut -d' ' -f3)
  [ "$rc" != 0 ] && [ "$f" = 0 ] && f=1
  passed=$((passed + p)) failed=$((failed + f))
  [ "$f" != 0 ] && rc_ops=1
  printf '  %-34s %s (exit %d, %d s so far)\n' "$t" "${line:-crashed: $(grep -m1 -E 'medbot:|FAIL' "$OUT/check_$t.log")}" "$rc" $((SECONDS - T0))
done
echo "$passed passed, $failed failed" >> "$OUT/check_ops.log"
grep -E '^    FAIL' "$OUT/check_ops.log" | head -20

stage "medbot: DPO step and decoding at Llama-3.1-8B shape"
timeout 240 build/bench_gpu weights/llama-3.1-8b > "$OUT/bench_gpu.log" 2>&1
rc_bench=$?
grep -vE '^RESULT' "$OUT/bench_gpu.log" | tail -14
./medbot info weights/llama-3.1-8b --plan --load_in_4bit --lora_r 64 --lora_alpha 8 --lora_target_modules q_proj,k_proj \
  --per_device_train_batch_size 4 --max_length 256 --gradient_checkpointing > "$OUT/plan.txt" 2>&1
./medbot info weights/llama-3.1-8b --plan --load_in_4bit --lora_r 64 --lora_alpha 8 --lora_target_modules q_proj,k_proj \
  --per_device_train_batch_size 4 --max_length 512 --gradient_checkpointing --gpus 8 --zero_stage 1 > "$OUT/plan_card.txt" 2>&1
cat "$OUT/plan.txt"

stage "PyTorch + transformers + peft: the same step and decoding"
timeout 300 "$PY" tests/gpu/bench_torch.py weights/llama-3.1-8b > "$OUT/bench_torch.log" 2>&1
rc_torch=$?
grep -vE '^RESULT' "$OUT/bench_torch.log" | tail -10

# ---- the table ----
get() { grep -E "^RESULT $2=" "$1" 2>/dev/null | tail -1 | cut -d= -f2-; }
ops_line=$(tail -1 "$OUT/check_ops.log" 2>/dev/null)
worst=$(grep -oE '\( *[0-9.]+% of tol' "$OUT/check_ops.log" 2>/dev/null | tr -d '(%' | awk '{ if ($1 > m) m = $1 } END { printf "%.0f", m }')
fails=$(grep -cE '^FAIL ' "$OUT/check_ops.log" 2>/dev/null)
plan=$(grep -E '^  total' "$OUT/plan.txt" | grep -oE '[0-9.]+ GiB')
plan_card=$(grep -E '^  total' "$OUT/plan_card.txt" | grep -oE '[0-9.]+ GiB')
mb() { get "$OUT/bench_gpu.log" "$1"; }
pt() { get "$OUT/bench_torch.log" "$1"; }
gemm=$(mb gemm_tflops)
pt_tflops=$(pt model_tflops)
pt_mfu=$( [ -n "$pt_tflops" ] && [ -n "$gemm" ] && awk -v a="$pt_tflops" -v b="$gemm" 'BEGIN { if (b > 0) printf "%.1f", 100 * a / b }')
echo
echo "================ tests/gpu/check.sh on $(head -2 "$OUT/nvidia-smi.txt" | tail -1 | cut -d, -f1) ($((SECONDS - T0)) s) ================"
printf '| %-52s | %-22s | %-22s |\n' "check" "medbot (CUDA)" "reference"
printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..54})" "$(printf -- '-%.0s' {1..24})" "$(printf -- '-%.0s' {1..24})"
printf '| %-52s | %-22s | %-22s |\n' "ops + DPO step + training + decode vs CPU backend" "${ops_line:-did not run}" "CPU backend (fp32)"
printf '| %-52s | %-22s | %-22s |\n' "worst error, % of its tolerance (failed tests)" "${worst:-?}% (${fails:-?} failed)" "bf16 1e-2, fp32 1e-4"
printf '| %-52s | %-22s | %-22s |\n' "base weights (Llama-3.1-8B shape, random)" "NF4 double quant" "$(pt base | cut -c1-22)"
printf '| %-52s | %-22s | %-22s |\n' "bf16 GEMM rate, cuBLASLt 8192^3 (TFLOP/s)" "${gemm:-?}" ""
printf '| %-52s | %-22s | %-22s |\n' "DPO step: 4 pairs x 256 tokens, ckpt, AdamW (s)" "$(mb step_s)" "$(pt step_s)"
printf '| %-52s | %-22s | %-22s |\n' "training tokens/s" "$(mb tokens_s)" "$(pt tokens_s)"
printf '| %-52s | %-22s | %-22s |\n' "MFU vs the measured GEMM rate (%)" "$(mb mfu)" "${pt_mfu:-?}"
printf '| %-52s | %-22s | %-22s |\n' "decode tokens/s (batch 1, prompt 128, 128 new)" "$(mb decode_tokens_s)" "$(pt decode_tokens_s) (generate)"
printf '| %-52s | %-22s | %-22s |\n' "peak GPU memory, device-wide / medbot buffers (GiB)" "$(mb peak_gib) / $(mb buffers_gib)" "$(pt peak_gib) (max_allocated)"
printf '| %-52s | %-22s | %-22s |\n' "info --plan, this step (max_length 256, 1 GPU)" "${plan:-?}" ""
printf '| %-52s | %-22s | %-22s |\n' "info --plan, the card (max_length 512, 8 GPUs, ZeRO-1)" "${plan_card:-?}" ""
printf '| %-52s | %-22s | %-22s |\n' "loss after the timed steps (random weights)" "$(mb loss)" "$(pt loss)"
echo "exit codes: check_ops $rc_ops, bench_gpu $rc_bench, bench_torch $rc_torch; logs in $OUT"
[ "$rc_ops" = 0 ] && [ "$rc_bench" = 0 ]
