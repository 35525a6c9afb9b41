#!/usr/bin/env bash
# Runs skysnap's coverage-guided fuzz targets (fuzz/) with AFL++ through cargo-afl, on
# stable Rust, and fails if any target crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 45); TARGETs among snapshot, kafka_value, config, http
# (default: all four), FUZZ_JOBS at a time (default 2, one per core). Installs cargo-afl
# from crates.io when it is missing (about a minute: it builds its bundled AFL++ with
# make and gcc; no clang needed) and builds the targets instrumented in
# fuzz/target/afl/ (about 5 minutes the first time on 2 cores: every dependency,
# librdkafka's C included). Each run starts from fuzz/seeds/<target>/ and keeps its
# findings in fuzz/target/afl-out/<target>/ (queue, crashes, hangs, fuzzer_stats). A
# crash is printed with its input and its panic, replayed from the input file, and fails
# the script; hangs (an input over 10 s) are listed. FUZZ_RESUME=1 goes on from the
# queue of the previous run instead of the seeds (longer runs: fuzz/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-45}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=(snapshot kafka_value config http)
fi
jobs="${FUZZ_JOBS:-2}"

# cargo-afl and the fuzz crate's afl dependency are the same version.
afl_version=0.18.2
if ! cargo afl --version 2>/dev/null | grep -q "$afl_version"; then
  cargo install cargo-afl --version "$afl_version" --locked
fi
# AFL++ itself, built once per Rust toolchain ("already built" is fine).
if ! config_output=$(cargo afl config --build 2>&1); then
  if ! grep -q "already built" <<<"$config_output"; then
    echo "$config_output" >&2
    exit 1
  fi
fi

# cargo-afl compiles everything at -C opt-level=3 with one codegen unit unless told
# otherwise; at 1 the build takes two thirds of the time and runs as many inputs a second.
export AFL_OPT_LEVEL="${AFL_OPT_LEVEL:-1}"
export CARGO_TARGET_DIR="$PWD/fuzz/target/afl"
# Not --locked: fuzz/Cargo.lock follows skysnap's dependencies, and a dependency added to
# skysnap must not stop the fuzzing until someone refreshes it (cargo adds what is missing).
(cd fuzz && cargo afl build --features afl --bins)
bin="$CARGO_TARGET_DIR/debug"

# No CPU pinning (the machine may be shared), no core-dump or CPU-governor checks (a
# container can change neither), plain status lines instead of the UI.
export AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_NO_UI=1 AFL_FAST_CAL=1

run_one() {
  local target="$1" out="fuzz/target/afl-out/$1" input="fuzz/seeds/$1"
  if [ "${FUZZ_RESUME:-0}" = 1 ] && [ -d "$out/default/queue" ]; then
    input=-
  else
    rm -rf "$out"
  fi
  mkdir -p "$out"
  # -t 10000: the http target builds its pipeline in the first input of a forked child.
  local status=0
  cargo afl fuzz -i "$input" -o "$out" -V "$seconds" -t 10000 "$bin/$target" \
    >"$out/afl.log" 2>&1 || status=$?
  echo "$status" >"$out/afl.status"
}

running=()
for target in "${targets[@]}"; do
  run_one "$target" &
  running+=("$!")
  if [ "${#running[@]}" -ge "$jobs" ]; then
    wait "${running[0]}"
    running=("${running[@]:1}")
  fi
done
wait

stat() { awk -F' *: *' -v key="$2" '$1 == key { print $2 }' "$1"; }
failed=0
for target in "${targets[@]}"; do
  out="fuzz/target/afl-out/$target"
  stats="$out/default/fuzzer_stats"
  if [ "$(cat "$out/afl.status")" != 0 ] || [ ! -f "$stats" ]; then
    tail -30 "$out/afl.log" >&2
    echo "fuzz $target: afl-fuzz failed (log in $out/afl.log)" >&2
    failed=1
    continue
  fi
  crashes=$(stat "$stats" saved_crashes)
  hangs=$(stat "$stats" saved_hangs)
  echo "fuzz $target: $(stat "$stats" execs_done) inputs in $(stat "$stats" run_time) s" \
    "($(stat "$stats" execs_per_sec)/s), corpus $(stat "$stats" corpus_count)," \
    "edges $(stat "$stats" edges_found), crashes $crashes, hangs $hangs"
  for hang in "$out"/default/hangs/id*; do
    [ -f "$hang" ] && echo "  hang (over 10 s): $hang"
  done
  if [ "$crashes" != 0 ]; then
    failed=1
    shown=0
    for crash in "$out"/default/crashes/id*; do
      shown=$((shown + 1))
      if [ "$shown" -gt 10 ]; then
        echo "--- $((crashes - 10)) more crashes in $out/default/crashes/"
        break
      fi
      echo "--- crash $crash"
      od -A d -t x1 "$crash" | head -20
      "$bin/$target" <"$crash" 2>&1 | grep -v '^  ' | head -20 || true
    done
  fi
done
if [ "$failed" != 0 ]; then
  echo "fuzzing failed: make each crash a regression test (fuzz/README.md)" >&2
  exit 1
fi
