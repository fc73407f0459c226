#!/usr/bin/env bash
# W4 probe: 4k random and 1 MiB sequential reads (fio as in W4) in one guest boot on a 256 MiB
# file on tmpfs, through the kernel loop device, rublk with several queue settings and lazyblk
# with several queue settings. How the benchmark's "ublk queue" findings were measured
# (docs/BENCHMARKS.md). Run bench/run.sh once first: it installs fio and builds rublk.
# Usage: bash bench/w4-probe.sh [extra lazyblk add flags to compare, e.g. "--queues 2 --depth 32"]
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
rublk=$top/target/bench-cache/rublk-0.2.15/bin/rublk
[[ -x $rublk ]] || { echo "w4-probe: $rublk missing: run bench/run.sh once first" >&2; exit 1; }
command -v fio >/dev/null && command -v losetup >/dev/null || { echo "w4-probe: needs fio and losetup" >&2; exit 1; }
(cd "$top" && cargo build --release --locked -p lazyblk-tools >&2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/probe.sh" <<GUEST
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
modprobe ublk_drv; modprobe loop
mkdir -p /srv && mount -t tmpfs -o size=2G tmpfs /srv
dd if=/dev/urandom of=/srv/img bs=1M count=256 2>/dev/null
lazyblk build /srv/img -o /srv/lz --level 1 >/dev/null
f() { fio --name=x --filename=\$1 --rw=\$2 --bs=\$3 --iodepth=32 --direct=1 --ioengine=libaio --runtime=5 --ramp_time=1 --time_based --readonly --output-format=terse --terse-version=3 2>&1 | awk -F';' '{ printf "%s IOPS, %d MiB/s", \$8, \$7 / 1024 }'; }
run() { echo "PROBE | \$1 | 4k random: \$(f \$2 randread 4k) | 1 MiB seq: \$(f \$2 read 1M) |"; }
rub() { rublk add loop -n 60 "\$@" -f /srv/img >/dev/null 2>&1; sleep 1; run "rublk \${*:-(defaults)}" /dev/ublkb60; rublk del -n 60; }
lz() { rm -rf /srv/c; D=\$(lazyblk add /srv/lz/manifest --cache-dir /srv/c "\$@"); dd if=\$D of=/dev/null bs=1M 2>/dev/null; echo 3 >/proc/sys/vm/drop_caches; run "lazyblk \${*:-(defaults)}" \$D; lazyblk del \${D#/dev/ublkb}; }
for pass in 1 2; do
    L=\$(losetup -f --show -r /srv/img); run "kernel loop" \$L; losetup -d \$L
    rub -q 2 -d 32 --buffered-io
    rub
    lz --queues 2 --depth 32
    lz
    ${1:+lz $1}
done
GUEST
bash "$top/qemu/run-guest.sh" --script "$work/probe.sh" --bin "$top/target/release/lazyblk" \
    --bin "$rublk" --bin "$(command -v fio)" --bin "$(command -v losetup)" --mem 3072 \
    --log "$work/guest.log" >/dev/null || true
grep -a '^PROBE' "$work/guest.log" | sed 's/^PROBE //' || { echo "w4-probe: no result; guest log:" >&2; tail -20 "$work/guest.log" >&2; exit 1; }
