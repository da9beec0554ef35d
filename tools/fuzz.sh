#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz, clang, -DBLOCKREPL_FUZZ=ON) in build-fuzz if needed
# and runs each target, or the ones named, for a number of seconds from a copy of its seed corpus
# (tests/fuzz/corpus/<target>, never written to). Exits non-zero if a target crashed and prints
# where the reproducer is. Runs at nice 10 (FUZZ_NICE to change).
#
#   tools/fuzz.sh [--seconds N] [--build-dir DIR] [--keep] [target...]
#   tools/fuzz.sh --make-corpus      # rewrites tests/fuzz/corpus from the real encoders
#
# Reproduce a crash: build-fuzz/bin/<target> <reproducer file>
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

all_targets=(fuzz_frame fuzz_namespace fuzz_hash_tree_file fuzz_dirty_log fuzz_stage_log fuzz_state_files)
# Longest input each target is given: a few frames of a conversation, a file of each format.
declare -A max_len=([fuzz_frame]=65536 [fuzz_namespace]=8192 [fuzz_hash_tree_file]=16384
                    [fuzz_dirty_log]=8192 [fuzz_stage_log]=65536 [fuzz_state_files]=4096)
seconds=60
build_dir=build-fuzz
keep=0
make_corpus=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --make-corpus) make_corpus=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [ -n "${max_len[$t]:-}" ] || { echo "fuzz.sh: no target $t (targets: ${all_targets[*]})" >&2; exit 2; }
done

nice_cmd=(nice -n "${FUZZ_NICE:-10}")
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  launcher=()
  command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DBLOCKREPL_FUZZ=ON "${launcher[@]}" >/dev/null
fi
build_targets=("${targets[@]}")
[ "$make_corpus" = 1 ] && build_targets=(fuzz_make_corpus)
CCACHE_BASEDIR="${CCACHE_BASEDIR:-$(dirname "$root")}" "${nice_cmd[@]}" \
  cmake --build "$build_dir" -j"$(nproc)" --target "${build_targets[@]}" >/dev/null

if [ "$make_corpus" = 1 ]; then
  rm -rf tests/fuzz/corpus.new
  "$build_dir/bin/fuzz_make_corpus" tests/fuzz/corpus.new
  cp tests/fuzz/corpus/README.md tests/fuzz/corpus.new/ 2>/dev/null || true
  # Reproducers added after crashes (crash-*) are kept.
  for d in tests/fuzz/corpus/*/; do
    t=$(basename "$d")
    for f in "$d"crash-* "$d"regress-*; do [ -f "$f" ] && mkdir -p "tests/fuzz/corpus.new/$t" && cp "$f" "tests/fuzz/corpus.new/$t/"; done
  done
  rm -rf tests/fuzz/corpus && mv tests/fuzz/corpus.new tests/fuzz/corpus
  exit 0
fi

work=$(mktemp -d /var/tmp/blockrepl-fuzz-run.XXXXXX)
failed=()
for t in "${targets[@]}"; do
  dir="$work/$t"
  mkdir -p "$dir/corpus"
  cp -r "tests/fuzz/corpus/$t/." "$dir/corpus/" 2>/dev/null || true
  set +e
  BLOCKREPL_FUZZ_SCRATCH="$dir" "${nice_cmd[@]}" "$build_dir/bin/$t" -max_total_time="$seconds" -timeout=30 -rss_limit_mb=2048 \
    -max_len="${max_len[$t]}" -print_final_stats=1 -artifact_prefix="$dir/" "$dir/corpus" >"$dir/log" 2>&1
  rc=$?
  set -e
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
  cov=$(grep -oE "cov: [0-9]+ ft: [0-9]+" "$dir/log" | tail -1 || true)
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    echo "fuzz.sh: $t FAILED (exit $rc) after ${execs:-?} runs; log: $dir/log" >&2
    grep -E '^==[0-9]+==ERROR|runtime error|fuzz property violated|^SUMMARY' "$dir/log" | head -5 >&2 || true
    for a in "$dir"/crash-* "$dir"/leak-* "$dir"/timeout-* "$dir"/oom-* "$dir"/slow-unit-*; do
      [ -f "$a" ] && echo "fuzz.sh: reproducer: $a (run: $build_dir/bin/$t $a)" >&2
    done
  else
    echo "fuzz.sh: $t: ${seconds}s, ${execs:-?} runs, ${cov:-no coverage line}, corpus $(ls "$dir/corpus" | wc -l) inputs"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashed: ${failed[*]} (everything kept in $work)" >&2
  exit 1
fi
[ "$keep" = 1 ] && echo "fuzz.sh: kept $work" || rm -rf "$work"
