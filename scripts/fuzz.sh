#!/usr/bin/env bash
# Fuzz smoke test: build every cargo-fuzz target in fuzz/ and run each for a bounded time on a
# seed corpus made from real data (fuzz/examples/gen_seeds.rs: manifests from the real builder,
# bitmaps from a real ChunkStore). Exits non-zero if any target crashes, leaks, times out or
# fails to build. Crash inputs land in fuzz/artifacts/<target>/.
#
# Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_TARGETS    space-separated subset of targets (default: all, from `cargo fuzz list`)
#   FUZZ_SANITIZER  address | none (default: address when the toolchain ships the ASan runtime)
#
# The toolchain is stable Rust. cargo-fuzz passes nightly-only flags (-Zsanitizer=...,
# -Cpasses=sancov-module, ...), which stable rustc accepts under RUSTC_BOOTSTRAP=1; nothing else
# uses that setting (the fuzz build has its own target directory).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

secs=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$top/fuzz/target"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install --locked cargo-fuzz --version 0.13.2
fi

host=$(rustc -vV | sed -n 's/^host: //p')
san=${FUZZ_SANITIZER:-}
if [ -z "$san" ]; then
    if [ -e "$(rustc --print sysroot)/lib/rustlib/$host/lib/librustc-stable_rt.asan.a" ]; then
        san=address
    else
        echo "fuzz: no ASan runtime in the toolchain, building without a sanitizer"
        san=none
    fi
fi

t0=$SECONDS
echo "fuzz: building targets (sanitizer: $san)"
cargo fuzz build --sanitizer "$san"
echo "fuzz: seed corpora"
# Seeds made by fuzz/examples/gen_seeds.rs from the real builder and store are committed in
# fuzz/seeds (regenerate with FUZZ_REGEN_SEEDS=1 after a format change).
if [ "${FUZZ_REGEN_SEEDS:-}" = 1 ]; then
    cargo run --quiet --manifest-path fuzz/Cargo.toml --example gen_seeds -- fuzz/seeds
fi
mkdir -p fuzz/corpus
cp -r fuzz/seeds/. fuzz/corpus/
echo "fuzz: built in $((SECONDS - t0)) s"

targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
logs="$CARGO_TARGET_DIR/fuzz-logs"
mkdir -p "$logs"
failed=()
for t in $targets; do
    mkdir -p "$top/fuzz/corpus/$t"
    echo "fuzz: $t for ${secs} s"
    # Same --sanitizer as the build, so cargo fuzz run finds it up to date.
    if cargo fuzz run --sanitizer "$san" "$t" "$top/fuzz/corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
        >"$logs/$t.log" 2>&1; then
        grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|Done )' "$logs/$t.log" | sed "s/^/  $t: /"
    else
        failed+=("$t")
        echo "fuzz: $t FAILED (full log: $logs/$t.log):"
        grep -E -m 12 -A 2 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY:' \
            "$logs/$t.log" || true
        tail -n 25 "$logs/$t.log"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: failed targets: ${failed[*]} (inputs in fuzz/artifacts/)"
    exit 1
fi
echo "fuzz: all targets ok ($((SECONDS - t0)) s)"
