#!/usr/bin/env bash
# Build N small, different images for the dense-node suite and bench (issue 17):
# OUT/www/<i>/{manifest,blob} and OUT/expected/<i>.txt (digest-tree of the source tree).
# Each tree is the test generator's tree of seed 1000+i without its large files and with two of
# its eight small-file directories (about 300 files, 1.7 MiB; a 0.5 MiB blob).
# usage: tests/guest/dense-images.sh BINDIR OUT N
set -euo pipefail
bin=$1 out=$2 n=$3
rm -rf "$out" && mkdir -p "$out/www" "$out/expected" "$out/trees"
for i in $(seq 1 "$n"); do
    t=$out/trees/$i
    "$bin/lazyblk-testkit" gen-tree "$t" --seed $((1000 + i)) > /dev/null
    rm -rf "$t/large" "$t"/small/d[2-9]
    "$bin/lazyblk" build "$t" -o "$out/www/$i" > /dev/null
    "$bin/lazyblk-testkit" digest-tree "$t" > "$out/expected/$i.txt"
done
rm -rf "$out/trees"
