#!/usr/bin/env bash
# Host driver of the guest test suites: builds release binaries and test images, then boots the
# qemu guest (qemu/run-guest.sh) once per suite. Usage: tests/guest/run.sh [suite...]
# Suites: e2e (default: all).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=${LAZYBLK_GUEST_WORK:-$top/target/guest-work}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(e2e)

cd "$top"
cargo build --release --locked -p lazyblk-tools -p lazyblk-tests --bins
bin=$top/target/release

rm -rf "$work" && mkdir -p "$work/www" "$work/expected"
# Image 1: the full test tree; image 2: a smaller, different one.
"$bin/lazyblk-testkit" gen-tree "$work/tree1" --seed 1
"$bin/lazyblk-testkit" gen-tree "$work/tree2" --seed 2
rm -rf "$work/tree2/large"
"$bin/lazyblk" build "$work/tree1" -o "$work/www/img1" --chunk-kib 64
"$bin/lazyblk" build "$work/tree2" -o "$work/www/img2"
"$bin/lazyblk-testkit" digest-tree "$work/tree1" > "$work/expected/img1.txt"
"$bin/lazyblk-testkit" digest-tree "$work/tree2" > "$work/expected/img2.txt"

rc=0
for s in "${suites[@]}"; do
    echo "### guest suite: $s"
    if ! bash "$top/qemu/run-guest.sh" --script "$here/$s.sh" \
        --bin "$bin/lazyblk" --bin "$bin/lazyblk-testkit" \
        --file "$here/lib.sh:/guest/lib.sh" \
        --dir "$work/www:/www" --dir "$work/expected:/expected" \
        --timeout 900; then
        echo "### guest suite $s FAILED"
        rc=1
    fi
done
exit $rc
