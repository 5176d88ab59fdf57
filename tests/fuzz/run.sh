#!/usr/bin/env bash
# Builds and runs medbot's libFuzzer targets (clang -fsanitize=fuzzer,address,undefined).
#   tests/fuzz/run.sh build                 build build/fuzz/fuzz_{encode,load,config,data}
#   tests/fuzz/run.sh encode [RUNS] [ARGS]  fuzz the encoder/decoders (default 10,000,000 inputs)
#   tests/fuzz/run.sh load [RUNS] [ARGS]    fuzz the tokenizer.json / tokenizer.model loaders
#   tests/fuzz/run.sh config [RUNS] [ARGS]  fuzz the --config reader (mb_kv_parse)
#   tests/fuzz/run.sh data [RUNS] [ARGS]    fuzz the JSONL pair parser (dataset_parse)
# Runs from the repo root on one core; new inputs go to build/fuzz/corpus-*/ (seeds: tests/fuzz/seeds/).
# A crash leaves build/fuzz/crash-* (or leak-*, timeout-*): rerun it with build/fuzz/fuzz_NAME FILE.
# Extra ARGS go to libFuzzer, e.g. -max_total_time=600 or -max_len=8192.
set -euo pipefail
cd "$(dirname "$0")/../.."
CC=${FUZZ_CC:-clang}
STB=${STB_INCLUDE:-/usr/include}
mkdir -p build/fuzz
build() { # the targets named (each is medbot.c with the fuzzer and the sanitizers: about a minute)
  for t in "$@"; do
    $CC -std=c99 -g -O2 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I"$STB" \
      -o "build/fuzz/fuzz_$t" "tests/fuzz/fuzz_$t.c" -lm -lpthread
  done
}
cmd=${1:-build}; [ $# -gt 0 ] && shift
case "$cmd" in
  build) build encode load config data; echo "built build/fuzz/fuzz_encode build/fuzz/fuzz_load build/fuzz/fuzz_config build/fuzz/fuzz_data" ;;
  encode|load|config|data)
    build "$cmd"
    runs=${1:-10000000}; [ $# -gt 0 ] && shift
    # texts up to 1 KiB (pieces long enough for bpe_long, short enough for 10M inputs in ~30 min on
    # one core); the loader's seeds are whole tokenizer files (up to 6 KB): let its inputs be that long
    # (config and data files: short texts of many small lines, with their own dictionaries)
    opts=(-max_len=1024); [ "$cmd" = load ] && opts=(-max_len=16384 -dict=tests/fuzz/tokenizer.dict)
    [ "$cmd" = config ] && opts=(-max_len=2048 -dict=tests/fuzz/config.dict)
    [ "$cmd" = data ] && opts=(-max_len=2048 -dict=tests/fuzz/data.dict)
    mkdir -p "build/fuzz/corpus-$cmd"
    MEDBOT_ROOT=$PWD "build/fuzz/fuzz_$cmd" -runs="$runs" -print_final_stats=1 "${opts[@]}" \
      -artifact_prefix=build/fuzz/ "$@" "build/fuzz/corpus-$cmd" "tests/fuzz/seeds/$cmd" ;;
  *) echo "usage: tests/fuzz/run.sh [build|encode|load|config|data] [RUNS] [libFuzzer args]" >&2; exit 2 ;;
esac
