#!/usr/bin/env bash
# No double caching (issue 17): the page cache an image holds after a full read, lazyblk against
# the same image on a kernel loop device with --direct-io=on, the cache and the loop's file on the
# same ext4 virtio disk, side by side in ONE qemu guest (TCG). A third system is lazyblk with its
# old behaviour (the cache file read through the page cache and never dropped from it), brought
# back for this benchmark only by LAZYBLK_BENCH_DOUBLE_CACHE=1 in the daemon's environment; a
# fourth, for reference, the loop device without direct IO.
#
# Each measurement: sync + drop_caches, /proc/meminfo Cached, the read, 1 s, Cached again.
# The read: every file of the mounted image (lazyblk-testkit digest-tree, checked against the
# source) and a raw dd of the whole device. lazyblk is measured twice per round: from an empty
# cache (the read fetches everything: the write path) and, remounted, from the complete cache.
#
# usage: bash bench/pagecache.sh   (as root; BENCH_ROUNDS=2 by default, BENCH_SCALE=8 sets the
#        image's large files (x 5 MiB), BENCH_NO_DOC=1 leaves docs/BENCHMARKS.md alone,
#        LAZYBLK_BIN to use a built binary)
# Prints the table and writes it between the PAGECACHE markers of docs/BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
rounds=${BENCH_ROUNDS:-2}
scale=${BENCH_SCALE:-8}
work=$top/target/bench-pagecache
. "$here/lib.sh"
bench_binaries "$work"
command -v mkfs.ext4 > /dev/null || { echo "mkfs.ext4 is missing (apt-get install e2fsprogs)"; exit 1; }
rm -rf "$work/tree" "$work/www" "$work/expected" && mkdir -p "$work/www" "$work/expected"
"$work/lazyblk-testkit" gen-tree "$work/tree" --seed 17 --scale "$scale"
"$work/lazyblk" build "$work/tree" -o "$work/www/img" > /dev/null
"$work/lazyblk-testkit" digest-tree "$work/tree" > "$work/expected/img.txt"
image_bytes=$(du -sb "$work/tree" | cut -f1)
rm -f "$work/disk.img"
truncate -s 1G "$work/disk.img" && mkfs.ext4 -q -F -L lazyblk-bench "$work/disk.img"

cat > "$work/guest.sh" << 'GUEST'
. /guest/lib.sh
export LAZYBLK_CACHE_DIR=/cache/lazyblk
M=/mnt/pc
mkdir -p $M /cache /var/log/lazyblk
mount -t ext4 /dev/vda /cache || die "mount /dev/vda"
start_nginx /www 8080
# measure SYSTEM PHASE DEV: the read of $M and DEV after a drop_caches, Cached before and after
# (the attach or mount happened after the drop: C0 was taken before it)
report() { echo "BENCHPC sys=$1 phase=$2 round=$R kib=$(($(cached_kib) - C0))"; }
read_checked() {
    full_read $M "$1" > /tmp/pc.out || die "$2: the full read failed"
    cmp -s /expected/img.txt /tmp/pc.out || die "$2: the tree differs from the source"
    sleep 1
}
lazy() { # lazy SYSTEM [ENV...]
    sys=$1; shift
    rm -rf "$LAZYBLK_CACHE_DIR"
    drop_page_cache
    C0=$(cached_kib)
    DEV=$(env "$@" lazyblk add http://127.0.0.1:8080/img/manifest --no-prefetch) || die "$sys: lazyblk add"
    mount -t erofs -o ro "$DEV" $M || die "$sys: mount"
    read_checked "$DEV" "$sys"
    report "$sys" first
    [ -e /cache/raw.img ] || lazyblk export "${DEV#/dev/ublkb}" /cache/raw.img > /dev/null || die "export"
    umount $M
    drop_page_cache
    C0=$(cached_kib)
    mount -t erofs -o ro "$DEV" $M || die "$sys: mount again"
    read_checked "$DEV" "$sys"
    report "$sys" complete
    umount $M
    lazyblk del --all > /dev/null || die "lazyblk del"
    wait_for 10 "devices gone" no_ublk_devices
}
loop() { # loop SYSTEM LOSETUP-ARGS...
    sys=$1; shift
    drop_page_cache
    C0=$(cached_kib)
    L=$(losetup "$@" -r -f --show /cache/raw.img) || die "$sys: losetup"
    echo "$sys: $L dio=$(cat /sys/block/${L#/dev/}/loop/dio)"
    mount -t erofs -o ro "$L" $M || die "$sys: mount"
    read_checked "$L" "$sys"
    report "$sys" first
    report "$sys" complete
    umount $M
    losetup -d "$L"
}
for R in $(seq "$BENCH_ROUNDS"); do
    lazy lazyblk
    lazy lazyblk-double-cache LAZYBLK_BENCH_DOUBLE_CACHE=1
    loop loop-dio --direct-io=on
    loop loop-buffered --direct-io=off
done
grep -i "o_direct" /var/log/lazyblk/lazyblk.log | head -n 3 || true
summary
GUEST

log=$work/guest.log
rm -f "$log"
bash "$top/qemu/run-guest.sh" --script "$work/guest.sh" --mem 2048 --timeout 1800 --log "$log" \
    --append "BENCH_ROUNDS=$rounds" --disk "$work/disk.img" \
    --bin "$work/lazyblk" --bin "$work/lazyblk-testkit" --bin "$(command -v losetup)" \
    --file "$top/tests/guest/lib.sh:/guest/lib.sh" \
    --dir "$work/www:/www" --dir "$work/expected:/expected" > /dev/null || { tail -n 30 "$log"; exit 1; }
tr -d '\r' < "$log" | grep '^BENCHPC' > "$work/results.txt"
python3 - "$work/results.txt" "$rounds" "$image_bytes" "$scale" "${BENCH_NO_DOC:-}" "$top" << 'PY'
import platform, statistics, subprocess, sys
res, rounds, image_bytes, scale, nodoc, top = sys.argv[1:7]
kib = {}
for l in open(res):
    kv = dict(x.split("=", 1) for x in l.split()[1:])
    kib.setdefault((kv["sys"], kv["phase"]), []).append(int(kv["kib"]))
med = lambda s, p: statistics.median(kib[(s, p)]) if (s, p) in kib else None
base = {p: med("loop-dio", p) for p in ("first", "complete")}
def cell(s, p):
    v = med(s, p)
    if v is None:
        return "-", "-"
    return f"{v / 1024:.1f}", (f"{v / base[p]:.2f}x" if base[p] else "-")
names = {
    "lazyblk": "lazyblk (default: O_DIRECT reads, written ranges dropped)",
    "lazyblk-double-cache": "lazyblk, old behaviour (`LAZYBLK_BENCH_DOUBLE_CACHE=1`)",
    "loop-dio": "kernel loop, `losetup --direct-io=on`",
    "loop-buffered": "kernel loop, `losetup --direct-io=off`",
}
lines = ["| system | Cached growth, first read (MiB) | ratio to loop dio | Cached growth, cache complete (MiB) | ratio to loop dio |",
         "|---|---|---|---|---|"]
for s in names:
    a, ar = cell(s, "first")
    b, br = cell(s, "complete")
    lines.append(f"| {names[s]} | {a} | {ar} | {b} | {br} |")
table = "\n".join(lines)
print(table)
verdicts = []
for p, what in (("first", "first read"), ("complete", "cache complete")):
    v = med("lazyblk", p)
    if v and base[p]:
        verdicts.append(f"{what}: {v / base[p]:.2f}x ({'met' if v / base[p] <= 1.2 else 'MISSED'})")
verdict = "lazyblk / loop --direct-io=on, Cached growth: " + "; ".join(verdicts) + " (target at most 1.2x)"
print(verdict)
if nodoc == "1":
    sys.exit(0)
rev = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
body = f"""Run: `bash bench/pagecache.sh` (BENCH_ROUNDS={rounds}, BENCH_SCALE={scale}), lazyblk {rev}, host {platform.node()}
({cpu}, 2 cores, shared), one qemu TCG guest (Debian 6.12 cloud kernel, 2 GiB, 2 vCPUs). The cache
(`LAZYBLK_CACHE_DIR`) and the loop devices' file (`lazyblk export` of the same image) on one ext4 virtio disk
(`cache=unsafe`); the image served by nginx inside the guest. Image: `lazyblk-testkit gen-tree --seed 17
--scale {scale}` ({int(image_bytes) / 2**20:.1f} MiB of files), erofs built by `lazyblk build`.

Each cell: median over the rounds of the growth of `Cached` in `/proc/meminfo` across `sync; echo 3 >
/proc/sys/vm/drop_caches`, attach (lazyblk: `add --no-prefetch` + mount; loop: `losetup -r` + mount), a
read of every file (`lazyblk-testkit digest-tree`, checked against the source), a raw
`dd if=<device> of=/dev/null bs=1M`, and 1 s. "First read": lazyblk from an empty cache (the read fetches
everything and the store writes it to the cache file); "cache complete": unmounted, caches dropped,
mounted again and read again. A loop device has only the one read; it is shown in both columns.

{table}

{verdict}"""
sys.path.insert(0, f"{top}/bench")
import doc_section
doc_section.splice(f"{top}/docs/BENCHMARKS.md", "PAGECACHE", "Page cache: no double caching (`bench/pagecache.sh`)", body, "bench/pagecache.sh")
print("docs/BENCHMARKS.md updated")
PY
