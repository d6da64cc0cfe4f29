#!/usr/bin/env bash
# Fuzz smoke run: build every target, then run each from its committed seeds for a bounded
# time. Exits non-zero if any target crashes, leaks past the RSS limit or times out; the
# input that did it is left in tests/fuzz/artifacts/<target>/ (see README.md).
#
#   tests/fuzz/smoke.sh                      # all targets, 20 s each
#   FUZZ_SECONDS=60 tests/fuzz/smoke.sh frame decoder
#   FUZZ_SEED=$RANDOM tests/fuzz/smoke.sh      # explore differently than the default seed
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z
# flags cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
seconds="${FUZZ_SECONDS:-20}"
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=(handshake frame decoder utf8 pubsub deflate tls)
fi
# A target dir of its own: instrumented builds never invalidate the normal ones.
target_dir="${FUZZ_TARGET_DIR:-$root/target/fuzz}"
export RUSTC_BOOTSTRAP=1

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd "$root"
start=$(date +%s)
cargo fuzz build --fuzz-dir tests/fuzz --target-dir "$target_dir"
echo "fuzz: build took $(( $(date +%s) - start )) s" >&2

failed=()
for target in "${targets[@]}"; do
    # A fresh corpus each run, so the smoke run depends only on the committed seeds.
    corpus="$(mktemp -d)"
    # A fixed seed: the smoke run is a regression check and should explore the same way
    # each time; long runs (README.md) use random seeds to find new inputs.
    args=(-max_total_time="$seconds" -seed="${FUZZ_SEED:-1}" -rss_limit_mb=512 -timeout=10 -print_final_stats=1)
    if [ -f "$here/dicts/$target.dict" ]; then
        args+=(-dict="$here/dicts/$target.dict")
    fi
    echo "fuzz: $target for $seconds s" >&2
    if ! cargo fuzz run --fuzz-dir tests/fuzz --target-dir "$target_dir" "$target" \
        "$corpus" "$here/seeds/$target" -- "${args[@]}" 2>"$corpus.log"; then
        failed+=("$target")
        tail -n 40 "$corpus.log" >&2
    else
        grep -E '^stat::number_of_executed_units' "$corpus.log" | sed "s/^/fuzz: $target /" >&2 || true
    fi
    rm -rf "$corpus" "$corpus.log"
done

echo "fuzz: done in $(( $(date +%s) - start )) s" >&2
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in tests/fuzz/artifacts/)" >&2
    exit 1
fi
