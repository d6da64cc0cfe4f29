#!/usr/bin/env bash
# Fuzz runs of every target in fuzz_targets/ (or the ones named), after one build.
#
#   tests/fuzz/smoke.sh                      # smoke: seeds replayed, then 10 s each, seed 1
#   tests/fuzz/smoke.sh frame decoder        # only these targets
#   tests/fuzz/smoke.sh --long               # long: 600 s each, a fresh random seed, and
#                                            # the corpus kept in tests/fuzz/corpus/<target>
#   FUZZ_SECONDS=1800 tests/fuzz/smoke.sh --long pubsub
#
# Smoke (what tests/run.sh calls) is a regression check: libFuzzer first runs every
# committed seed (findings are kept there), then explores briefly from a fixed seed.
# Long is a search: what it learns stays in corpus/, so each run starts where the last
# ended. Both exit non-zero if any target crashes, leaks past the RSS limit or times out;
# the input that did it is left in tests/fuzz/artifacts/<target>/ (see README.md). The
# last lines are a table of executions per target.
#
# Smoke builds without optimisation (`cargo fuzz --dev`): a quarter of the release build's
# CPU time, which on a 2-core CI machine is worth more than the executions it costs in a
# 10 s run. Long builds optimised, where executions per second are the point.
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z
# flags cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
long=0
if [ "${1:-}" = --long ]; then
    long=1
    shift
fi
if [ "$long" = 1 ]; then seconds="${FUZZ_SECONDS:-600}"; else seconds="${FUZZ_SECONDS:-10}"; fi
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    # Every target there is: a new file in fuzz_targets/ is run without editing this script.
    targets=()
    for f in "$here"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
# A target dir of its own: instrumented builds never invalidate the normal ones.
target_dir="${FUZZ_TARGET_DIR:-$root/target/fuzz}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked
fi

profile=()
[ "$long" = 1 ] || profile=(--dev)

cd "$root"
start=$(date +%s)
cargo fuzz build "${profile[@]}" --fuzz-dir tests/fuzz --target-dir "$target_dir"
echo "fuzz: build took $(( $(date +%s) - start )) s" >&2

failed=()
summary=()
for target in "${targets[@]}"; do
    mkdir -p "$here/seeds/$target"
    if [ "$long" = 1 ]; then
        corpus="$here/corpus/$target"
        mkdir -p "$corpus"
        # No -seed: libFuzzer picks a fresh one and prints it (`INFO: Seed:`).
        args=()
    else
        # A throwaway corpus, so the smoke run depends only on the committed seeds, and a
        # fixed seed, so it explores the same way each time.
        corpus="$(mktemp -d)"
        args=(-seed="${FUZZ_SEED:-1}")
    fi
    log="$(mktemp)"
    args+=(-max_total_time="$seconds" -rss_limit_mb=512 -timeout=10 -print_final_stats=1)
    if [ -f "$here/dicts/$target.dict" ]; then
        args+=(-dict="$here/dicts/$target.dict")
    fi
    echo "fuzz: $target for $seconds s" >&2
    if cargo fuzz run "${profile[@]}" --fuzz-dir tests/fuzz --target-dir "$target_dir" "$target" \
        "$corpus" "$here/seeds/$target" -- "${args[@]}" 2>"$log"; then
        verdict=ok
    else
        verdict=FAILED
        failed+=("$target")
        tail -n 40 "$log" >&2
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    seed=$(sed -n 's/^INFO: Seed: *//p' "$log" | head -n 1)
    summary+=("$(printf '%-12s %12s  %-7s seed %s' "$target" "${execs:-?}" "$verdict" "${seed:-?}")")
    [ "$long" = 1 ] || rm -rf "$corpus"
    rm -f "$log"
done

echo "fuzz: done in $(( $(date +%s) - start )) s; executions per target:" >&2
printf '  %s\n' "${summary[@]}" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in tests/fuzz/artifacts/)" >&2
    exit 1
fi
