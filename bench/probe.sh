#!/usr/bin/env bash
# Small side-by-side probes in one qemu guest (TCG), outside bench/run.sh:
#   bench/probe.sh attach [LAZYBLK]   attach times per step (`lazyblk status`), 3 adds without and
#                                     with netem, and `lazyblk --version` (the binary's start)
#   bench/probe.sh attach-ab OLD [NEW] attach per step of two binaries side by side (netem, 3
#                                     rounds; img1 as is and with a pinned prefetch pack)
#   bench/probe.sh w4-ab OLD NEW      W4's fio on a fully present device: binary OLD, NEW, and
#                                     NEW without the fork, side by side, 2 rounds
# LAZYBLK/NEW default to target/release/lazyblk. Prints the PROBE lines.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
work=${LAZYBLK_PROBE_WORK:-$top/target/probe-work}
what=${1:?usage: bench/probe.sh attach [LAZYBLK] | attach-ab OLD [NEW] | w4-ab OLD NEW}
cd "$top"
cargo build --release --locked -p lazyblk-tools -p lazyblk-tests --bins
kit=$top/target/release/lazyblk-testkit
mkdir -p "$work/www" "$work/bin"
if [[ ! -f $work/www/img1/manifest || ! -f $work/www/img3/manifest ]]; then
    rm -rf "$work/tree1" "$work/tree3"
    "$kit" gen-tree "$work/tree1" --seed 1
    "$kit" gen-tree "$work/tree3" --seed 3 --scale 4
    "$top/target/release/lazyblk" build "$work/tree1" -o "$work/www/img1" --chunk-kib 64
    "$top/target/release/lazyblk" build "$work/tree3" -o "$work/www/img3"
fi
bins=()
case $what in
attach)
    strip --strip-debug -o "$work/bin/lazyblk" "${2:-$top/target/release/lazyblk}"
    bins=(--bin "$work/bin/lazyblk") ;;
attach-ab)
    strip --strip-debug -o "$work/bin/lz-old" "${2:?attach-ab needs OLD}"
    strip --strip-debug -o "$work/bin/lz-new" "${3:-$top/target/release/lazyblk}"
    bins=(--bin "$work/bin/lz-old" --bin "$work/bin/lz-new") ;;
w4-ab)
    strip --strip-debug -o "$work/bin/lz-old" "${2:?w4-ab needs OLD}"
    strip --strip-debug -o "$work/bin/lz-new" "${3:-$top/target/release/lazyblk}"
    bins=(--bin "$work/bin/lz-old" --bin "$work/bin/lz-new" --bin "$(command -v fio)") ;;
*) echo "bench/probe.sh: unknown probe $what" >&2; exit 2 ;;
esac
log=$work/$what-$(date +%Y%m%d-%H%M%S).log
bash "$top/qemu/run-guest.sh" --script "$here/probes/$what.sh" "${bins[@]}" \
    --file "$top/tests/guest/lib.sh:/guest/lib.sh" --dir "$work/www:/www" --timeout 900 --log "$log" >/dev/null
tr -d '\r' <"$log" | grep '^PROBE'
