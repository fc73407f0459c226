#!/usr/bin/env bash
# What the device-mapper layer itself costs in the benchmark guest: fio (direct, libaio, QD 32,
# 5 s) 4k random and 1 MiB sequential reads on a read-only kernel loop device of a 256 MiB tmpfs
# file, then on a dm `linear` over that same loop device, 3 rounds in one boot. The hand-over
# (issue 18) ends on exactly that stack, so its W4 ratio to the kernel loop device can be no
# better than this one. Usage: bash bench/dm-probe.sh (as root; prints PROBE lines).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/guest.sh" <<'GUEST'
#!/bin/sh
set -e
mount -t tmpfs -o size=600m tmpfs /tmp
dd if=/dev/urandom of=/tmp/img bs=1M count=256 2>/dev/null
LOOP=$(losetup -r -f --show /tmp/img)
DM_DISABLE_UDEV=1 dmsetup create probe --readonly --table "0 $(blockdev --getsz "$LOOP") linear $LOOP 0"
dmsetup mknodes
run() { fio --name=p --filename="$1" --direct=1 --ioengine=libaio --iodepth=32 --rw="$2" --bs="$3" \
    --runtime=5 --time_based --readonly --output-format=terse 2>/dev/null | awk -F';' '{ print $8 }'; }
for r in 1 2 3; do
    for d in "$LOOP" /dev/mapper/probe; do
        echo "PROBE round=$r dev=$d rand4k_iops=$(run "$d" randread 4k) seq1m_iops=$(run "$d" read 1M)"
    done
done
GUEST
bash "$top/qemu/run-guest.sh" --script "$work/guest.sh" --bin "$(command -v fio)" \
    --bin "$(command -v dmsetup)" --bin "$(command -v losetup)" --bin "$(command -v blockdev)" \
    --timeout 400 --log "$work/log"
tr -d '\r' < "$work/log" | grep '^PROBE'
