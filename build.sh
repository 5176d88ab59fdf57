#!/usr/bin/env bash
# medbot's one command.
#   ./build.sh                  build ./medbot (and the tiny demo model weights/tiny if missing)
#   ./build.sh test [FILTER]    build and run the tests whose names contain FILTER
#   ./build.sh test --sanitize [FILTER]   the same under AddressSanitizer + UBSan
#   ./build.sh bench [FILTER]   build and run the benchmarks (tests/bench/)
#   ./build.sh kernels          write kernels.cu.in into medbot.c's generated appendix (after editing it)
#   ./build.sh gpu              build the GPU check programs (tests/gpu/*.c) into build/ (run by tests/gpu/check.sh)
#   ./build.sh clean
# Environment: CC (default cc), CFLAGS (extra flags), STB_INCLUDE (folder holding stb/stb_ds.h),
# MEDBOT_NATIVE=0 to build without -march=native (for a binary that runs on other CPUs),
# CUDA_HOME (the CUDA toolkit, else nvcc's or /usr/local/cuda),
# MEDBOT_NO_INSTALL=1 to stop with a message instead of installing what is missing.
# What is missing (stb_ds; a C compiler when CC is not set) is installed through the system's
# package manager: apt-get (libstb-dev), dnf (stb_ds-devel), pacman (stb) or brew (stb), as root or
# with sudo (which may ask for your password on a terminal; never where there is none). build.sh
# says the command it runs, and stops with a hint where it cannot install.
# One binary everywhere: the CUDA backend needs no toolkit to compile (the driver, NVRTC, cuBLASLt
# and NCCL are loaded at run time); the toolkit, when found, builds gen_kernels with NVRTC (the
# compile check of every kernel specialization) and its lib folder is where medbot looks first.
set -euo pipefail
cd "$(dirname "$0")"

CC_SET=${CC:-}
CC=${CC:-cc}
WARN="-std=c99 -Wall -Wextra -Wpedantic"
OPT="-O3 -ffp-contract=fast"
LIBS="-lm -lpthread"
BUILD=build

die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*" >&2; }

find_stb() {
  local d brew_inc=""
  if command -v brew >/dev/null 2>&1; then brew_inc="$(brew --prefix 2>/dev/null)/include"; fi
  for d in "${STB_INCLUDE:-}" /usr/include /usr/local/include /opt/homebrew/include "$brew_inc"; do
    if [ -n "$d" ] && [ -f "$d/stb/stb_ds.h" ]; then echo "$d"; return 0; fi
  done
  return 1
}

# pkg_install WHAT APT DNF PACMAN BREW: installs WHAT (words for the user) with the first package
# manager found, the package names given for each ("-" where that manager has none). Returns 1,
# with the reason in NO_INSTALL, where it cannot: MEDBOT_NO_INSTALL set, no known package manager,
# not root and no sudo that can run without a password or ask for one on a terminal.
pkg_install() {
  local what=$1 apt=$2 dnf=$3 pacman=$4 brew=$5 pm pkgs
  NO_INSTALL=""
  if [ -n "${MEDBOT_NO_INSTALL:-}" ] && [ "${MEDBOT_NO_INSTALL}" != 0 ]; then
    NO_INSTALL="MEDBOT_NO_INSTALL is set"; return 1
  fi
  if command -v apt-get >/dev/null 2>&1; then pm=apt-get pkgs=$apt
  elif command -v dnf >/dev/null 2>&1; then pm=dnf pkgs=$dnf
  elif command -v pacman >/dev/null 2>&1; then pm=pacman pkgs=$pacman
  elif command -v brew >/dev/null 2>&1; then pm=brew pkgs=$brew
  else NO_INSTALL="no apt-get, dnf, pacman or brew here"; return 1
  fi
  [ "$pkgs" != - ] || { NO_INSTALL="$pm has no package for it"; return 1; }
  local sudo=""
  if [ $pm != brew ] && [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      NO_INSTALL="not root and no sudo"; return 1
    elif sudo -n true 2>/dev/null; then sudo="sudo "
    elif [ -t 0 ] && { : < /dev/tty; } 2>/dev/null; then
      sudo="sudo "  # someone at the terminal: sudo asks them for the password (on /dev/tty)
    else NO_INSTALL="sudo needs a password and there is no terminal to type it on"; return 1
    fi
  fi
  # no terminal: no package may stop to ask a question (root's apt-get; sudo may drop the variable)
  [ -t 0 ] || export DEBIAN_FRONTEND="${DEBIAN_FRONTEND:-noninteractive}"
  # shellcheck disable=SC2086
  case $pm in
    apt-get)
      # a fresh container has empty package lists: read them first when they do not know the package
      local update=""
      # shellcheck disable=SC2086
      apt-cache show $pkgs >/dev/null 2>&1 || update="${sudo}apt-get update && "
      say "$what is missing; installing $pkgs with: ${update}${sudo}apt-get install -y --no-install-recommends $pkgs"
      if [ -n "$update" ]; then ${sudo}apt-get update || { NO_INSTALL="apt-get update failed"; return 1; }; fi
      # a stale list names files the mirror no longer has: read the lists again and retry once
      ${sudo}apt-get install -y --no-install-recommends $pkgs ||
        { [ -z "$update" ] && say "retrying after: ${sudo}apt-get update" && ${sudo}apt-get update && ${sudo}apt-get install -y --no-install-recommends $pkgs; } ;;
    dnf)
      say "$what is missing; installing $pkgs with: ${sudo}dnf install -y $pkgs"
      ${sudo}dnf install -y $pkgs ;;
    pacman)  # a fresh container has no sync database: -Sy reads it first
      say "$what is missing; installing $pkgs with: ${sudo}pacman -Sy --needed --noconfirm $pkgs"
      ${sudo}pacman -Sy --needed --noconfirm $pkgs ;;
    brew)
      say "$what is missing; installing $pkgs with: brew install $pkgs"
      brew install $pkgs ;;
  esac || { NO_INSTALL="'$pm' could not install $pkgs"; return 1; }
}

setup() {
  if ! command -v "$CC" >/dev/null 2>&1; then
    # only the default compiler is installed: a CC the user named is theirs to install
    if [ -n "${CC_SET:-}" ] || ! pkg_install "a C compiler" "gcc libc6-dev" gcc gcc -; then
      die "no C compiler '$CC'${NO_INSTALL:+ and build.sh did not install one ($NO_INSTALL)} --> install gcc or clang (Debian/Ubuntu: sudo apt-get install gcc; macOS: xcode-select --install), or set CC"
    fi
    command -v "$CC" >/dev/null 2>&1 || die "installed a C compiler, but there is still no '$CC' --> set CC to the compiler"
  fi
  local stb hint="Debian/Ubuntu: sudo apt-get install libstb-dev; Fedora: sudo dnf install stb_ds-devel; Arch: sudo pacman -S stb; macOS: brew install stb; or set STB_INCLUDE to the folder that holds stb/stb_ds.h"
  if ! stb=$(find_stb); then
    if [ -n "${STB_INCLUDE:-}" ]; then
      die "no stb/stb_ds.h in STB_INCLUDE=$STB_INCLUDE --> set STB_INCLUDE to the folder that holds stb/stb_ds.h, or unset it"
    fi
    pkg_install stb_ds.h libstb-dev stb_ds-devel stb stb || die "stb_ds.h not found and build.sh did not install it ($NO_INSTALL) --> $hint"
    stb=$(find_stb) || die "installed stb, but stb/stb_ds.h is still not found --> $hint"
  fi
  INC="-I$stb"
  NATIVE=""
  if [ "${MEDBOT_NATIVE:-1}" != 0 ] && echo 'int main(void){return 0;}' | $CC -march=native -x c - -o /dev/null 2>/dev/null; then
    NATIVE="-march=native"
  fi
  mkdir -p "$BUILD"
  # dlopen lives in libdl before glibc 2.34 (and in libc after; -ldl is then an empty stub)
  if echo 'int main(void){return 0;}' | $CC -x c - -ldl -o /dev/null 2>/dev/null; then LIBS="$LIBS -ldl"; fi
  find_cuda
  CUDEF=""
  if [ -n "$CUDA_DIR" ]; then CUDEF="-DMB_CUDA_LIBDIR=\"$CUDA_LIB\""; fi
}

# The CUDA toolkit (nvcc, NVRTC): CUDA_HOME, nvcc on PATH, or /usr/local/cuda.
find_cuda() {
  CUDA_DIR=""
  local d
  for d in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/nvrtc.h" ]; then CUDA_DIR=$d; break; fi
  done
  local lib
  for lib in lib64 lib lib/x64 targets/x86_64-linux/lib targets/sbsa-linux/lib; do
    if [ -n "$CUDA_DIR" ] && ls "$CUDA_DIR/$lib"/libnvrtc.* >/dev/null 2>&1; then CUDA_LIB=$CUDA_DIR/$lib; return; fi
  done
  CUDA_DIR=""
}

# gen_kernels (with NVRTC when the toolkit is there); warns when medbot.c's appendix does not hold
# the current kernels.cu.in (`./build.sh kernels` rewrites it)
build_kernels() {
  local flags=""
  if [ -n "$CUDA_DIR" ]; then
    flags="-DMB_HAVE_NVRTC -I$CUDA_DIR/include -L$CUDA_LIB -Wl,-rpath,$CUDA_LIB -lnvrtc"
  fi
  if [ ! -f "$BUILD/gen_kernels" ] || [ gen_kernels.c -nt "$BUILD/gen_kernels" ] || [ build.sh -nt "$BUILD/gen_kernels" ]; then
    # shellcheck disable=SC2086
    $CC $WARN -O2 -o "$BUILD/gen_kernels" gen_kernels.c $flags
  fi
  if [ "${1:-}" = refresh ]; then
    "$BUILD/gen_kernels" kernels.cu.in medbot.c
  else
    "$BUILD/gen_kernels" --stale kernels.cu.in medbot.c || echo "build.sh: building with the kernels medbot.c holds" >&2
  fi
  export MB_HAVE_NVRTC=$([ -n "$CUDA_DIR" ] && echo 1 || echo 0)
  export MB_CUDA_DIR="$CUDA_DIR" MB_CUDA_LIB="${CUDA_LIB:-}" MB_CC="$CC" MB_STB_INCLUDE="$INC"
}

# stale OUT SRC: whether OUT is missing or older than SRC, medbot.c, medbot.h, build.sh or a
# source a test may include (tests/*.h, the GPU checks)
stale() {
  [ ! -f "$1" ] || [ "$2" -nt "$1" ] || [ medbot.c -nt "$1" ] || [ medbot.h -nt "$1" ] || [ build.sh -nt "$1" ] ||
    [ -n "$(find tests -maxdepth 2 \( -name '*.h' -o -path 'tests/gpu/*.c' \) -newer "$1" 2>/dev/null | head -1)" ]
}

# compile WHAT OUT SRC EXTRA_FLAGS...: compiles SRC into OUT, saying WHAT it compiles and, at the
# end, how long it took. On a terminal one line counts the seconds while the compiler runs (its
# messages are printed when it ends, so that they do not land on that line); otherwise WHAT is one
# line before the compiler's output.
compile() {
  local what=$1 out=$2 src=$3; shift 3
  local t0=$SECONDS rc=0
  if [ -t 1 ]; then
    local log=$BUILD/compile.$$.log ticker  # (one per build.sh: two builds at once keep their messages apart)
    ( while kill -0 $$ 2>/dev/null; do printf '\r%s... %d s ' "$what" $((SECONDS - t0)); sleep 1; done ) &
    ticker=$!
    trap 'kill "$ticker" 2>/dev/null' EXIT  # an interrupted build leaves no ticker behind
    # shellcheck disable=SC2086
    $CC $WARN "$@" $INC $CUDEF ${CFLAGS:-} -o "$out" "$src" $LIBS > "$log" 2>&1 || rc=$?
    kill "$ticker" 2>/dev/null || true
    wait "$ticker" 2>/dev/null || true
    trap - EXIT
    printf '\r\033[K'
    cat "$log" >&2
    rm -f "$log"
  else
    echo "$what..."
    # shellcheck disable=SC2086
    $CC $WARN "$@" $INC $CUDEF ${CFLAGS:-} -o "$out" "$src" $LIBS || rc=$?
  fi
  [ $rc = 0 ] || return $rc
  echo "compiled $(shown "$out") in $((SECONDS - t0)) s"
}

# shown PATH: PATH as a user types it (./medbot, build/tests)
shown() { case $1 in */*) echo "$1" ;; *) echo "./$1" ;; esac; }

# build_bin OUT SRC EXTRA_FLAGS...: compiles SRC into OUT when OUT is stale
build_bin() {
  local out=$1 src=$2 stamp; shift 2
  # the flags it was built with beside it: other flags (CFLAGS, MEDBOT_NATIVE=0) build it again
  stamp="$BUILD/$(echo "$out" | tr '/' '_').flags"
  if stale "$out" "$src" || [ "$(cat "$stamp" 2>/dev/null)" != "$* ${CFLAGS:-}" ]; then
    rm -f "$stamp"
    compile "compiling $(shown "$out") from $src" "$out" "$src" "$@"
    echo "$* ${CFLAGS:-}" > "$stamp"
  fi
}

build_medbot() {
  build_kernels
  build_bin medbot medbot.c $OPT $NATIVE
  if [ ! -f weights/tiny/model.safetensors ]; then
    ./medbot init --config weights/tiny/config.json --output weights/tiny --seed 0 --dtype bf16 >/dev/null
  fi
}

# gen_unity OUT: every tests/test_*.c in one translation unit, so that medbot.c is compiled once per
# configuration (the test files include it to reach its static functions). Each file's
# MB_TEST_MAIN becomes FILE_main; the binary runs the file it is called as (build/test_FILE, a link).
gen_unity() {
  local out=$1 root=$PWD keep src name m
  keep=$(grep -hoE '^#define [A-Za-z_0-9]+' tests/test.h tests/cuda_fake.h | awk '{print $2}' | sort -u)
  {
    echo "/* generated by build.sh from tests/test_*.c: medbot.c and every test file in one translation"
    echo " * unit; build/test_FILE links to this binary, which runs FILE's tests. Do not edit. */"
    echo "#define MB_TEST_UNITY"
    echo "#include \"$root/tests/test.h\""
    for src in tests/test_*.c; do
      name=$(basename "$src" .c)
      echo "#define MB_TEST_ENTRY ${name}_main"
      echo "#include \"$root/$src\""
      echo "#undef MB_TEST_ENTRY"
      for m in $(grep -hoE '^#define [A-Za-z_0-9]+' "$src" $(grep -oE '^#include "[^"]+\.c"' "$src" | sed -E 's|#include "(.*)"|tests/\1|') | awk '{print $2}' | sort -u); do
        echo "$keep" | grep -qx "$m" || echo "#undef $m"
      done
    done
    echo "int main(int argc, char **argv) {"
    echo "    const char *me = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];"
    for src in tests/test_*.c; do
      name=$(basename "$src" .c)
      echo "    if (!strcmp(me, \"$name\")) return ${name}_main(argc, argv);"
    done
    echo "    fprintf(stderr, \"%s: run me as build/test_FILE (a link to this binary)\\n\", argv[0]);"
    echo "    return 2;"
    echo "}"
  } > "$out.tmp"
  if cmp -s "$out.tmp" "$out"; then rm -f "$out.tmp"; else mv "$out.tmp" "$out"; fi
}

run_tests() {
  local sanitize=0 filter="" t_start=$SECONDS
  for a in "$@"; do
    case "$a" in
      --sanitize) sanitize=1 ;;
      *) filter="$a" ;;
    esac
  done
  build_medbot
  local dir=$BUILD flags="$OPT $NATIVE"
  export MEDBOT_BIN=./medbot
  if [ $sanitize = 1 ]; then
    dir=$BUILD/san
    flags="$NATIVE -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined"
    mkdir -p "$dir"
    build_bin "$dir/medbot" medbot.c $flags
    export MEDBOT_BIN=$dir/medbot MB_TEST_SANITIZE=1
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
  fi
  local srcs=(tests/test_*.c)
  gen_unity "$dir/tests.c"
  # the unit also depends on the test files it includes
  if stale "$dir/tests" "$dir/tests.c" || [ -n "$(find "${srcs[@]}" -newer "$dir/tests" | head -1)" ]; then
    rm -f "$dir/tests"
    # shellcheck disable=SC2086
    compile "compiling $dir/tests: medbot.c + ${#srcs[@]} test files in one unit" \
      "$dir/tests" "$dir/tests.c" $flags || die "building the tests failed"
  fi
  for src in "${srcs[@]}"; do ln -sf tests "$dir/$(basename "$src" .c)"; done
  local passed=0 failed=0 line rc
  for src in "${srcs[@]}"; do
    local name; name=$(basename "$src" .c)
    # each test's name is printed as it starts (test.h): shown as it is written, and kept in the log
    set +e
    "$dir/$name" "$filter" 2>&1 | tee "$dir/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    line=$(tail -1 "$dir/$name.log" | grep -E '^[0-9]+ passed, [0-9]+ failed$' || true)
    if [ -z "$line" ]; then
      echo "FAIL $name: crashed or exited without a summary (exit $rc)" >&2
      failed=$((failed + 1))
      continue
    fi
    passed=$((passed + $(echo "$line" | cut -d' ' -f1)))
    failed=$((failed + $(echo "$line" | cut -d' ' -f3)))
    if [ "$rc" != 0 ] && [ "$(echo "$line" | cut -d' ' -f3)" = 0 ]; then
      echo "FAIL $name: exit $rc after reporting no failures" >&2
      failed=$((failed + 1))
    fi
  done
  local took=$((SECONDS - t_start))
  echo "tests took $([ $took -ge 60 ] && echo "$((took / 60)) min ")$((took % 60)) s (compiling included)"
  echo "$passed passed, $failed failed"  # the last line: .ci/run and tools read it
  [ $failed = 0 ]
}

run_bench() {
  build_medbot
  local filter=${1:-}
  for src in tests/bench/bench_*.c; do
    local name; name=$(basename "$src" .c)
    build_bin "$BUILD/$name" "$src" $OPT $NATIVE
    "$BUILD/$name" "$filter"
  done
}

build_gpu() {
  build_medbot
  for src in tests/gpu/*.c; do
    build_bin "$BUILD/$(basename "$src" .c)" "$src" $OPT $NATIVE
  done
}

cmd=${1:-build}
[ $# -gt 0 ] && shift
case "$cmd" in
  build) setup; build_medbot; echo "built ./medbot" ;;
  kernels) setup; build_kernels refresh ;;
  test) setup; run_tests "$@" ;;
  bench) setup; run_bench "$@" ;;
  gpu) setup; build_gpu; echo "built $(ls tests/gpu/*.c | sed 's|tests/gpu/|build/|; s|\.c$||' | tr '\n' ' ')" ;;
  clean) rm -rf "$BUILD" medbot weights/tiny/model.safetensors; echo "cleaned" ;;
  -h|--help|help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' --> ./build.sh [build|test [--sanitize] [FILTER]|bench|kernels|gpu|clean]" ;;
esac
