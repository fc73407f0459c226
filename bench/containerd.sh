#!/usr/bin/env bash
# Container start through containerd (issue 16): the time from a CRI pull of the python image
# (tests/guest/python-image.sh with PYIMG_BUILD_DEPS=1: Debian's python3.11 over a layer of gcc and
# headers, as the official image sits on buildpack-deps; four gzip layers) to the
# first line its container prints, with containerd's overlayfs snapshotter and a normal pull
# against lazyblk's snapshotter, side by side in ONE qemu guest (TCG), the registry on the
# guest's loopback shaped by netem (BENCH_NETEM, default 10 ms each way = 20 ms RTT, 100 Mbit/s).
# Every round starts from nothing: a fresh containerd root, snapshotter root and lazyblk cache.
# Then one more lazyblk run records the start-up (`lazyblk trace --pack --push` over the converted
# image: a prefetch pack of the blocks read, published as the newest lazy version of the source,
# as eStargz's optimizer or nydus's prefetch table record one) and the same rounds run again as
# `lazyblk-pack` (the overlayfs baseline is the same boot's).
#
# usage: bash bench/containerd.sh   (as root; BENCH_ROUNDS=3 by default, BENCH_NO_DOC=1 to leave
#        docs/BENCHMARKS.md alone, LAZYBLK_BIN to use a built binary)
# Prints the table and writes it between the CONTAINERD markers of docs/BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
rounds=${BENCH_ROUNDS:-3}
netem=${BENCH_NETEM:-delay 10ms rate 100mbit}
work=$top/target/bench-containerd
. "$here/lib.sh"
bench_binaries "$work"
PYIMG_BUILD_DEPS=${PYIMG_BUILD_DEPS:-1} bash "$top/tests/guest/python-image.sh" "$LAZYBLK_BIN" "$work/pyimg" "$work/pyreg" 127.0.0.1:5123
rm -rf "$work/pyimg/L" "$work/pyimg/B" "$work/pyimg/P"

cat > "$work/guest.sh" << 'GUEST'
. /guest/lib.sh
. /guest/containerd-config.sh
REG=127.0.0.1:5123
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
mkdir -p /etc/containerd "/etc/containerd/certs.d/$REG" /run/lazyblk /dev/mqueue
mount -t mqueue mqueue /dev/mqueue 2> /dev/null || true
echo 'nameserver 127.0.0.1' > /etc/resolv.conf
sed "s#rootdirectory: .*#rootdirectory: /pyreg#; s#level: warn#level: error#" /pyimg/registry.yml > /etc/registry.yml
docker-registry serve /etc/registry.yml > /tmp/registry.log 2>&1 &
registry_hosts /etc/containerd/certs.d "$REG"
wait_for 30 "the registry" wget -q -O /dev/null "http://$REG/v2/"
tc qdisc add dev lo root netem $(echo "$BENCH_NETEM" | tr _ " ")
pids_of() { for d in /proc/[0-9]*; do case "$(tr '\0' ' ' < "$d/cmdline" 2> /dev/null)" in "$1"*) echo "${d#/proc/}" ;; esac; done; }
stop_all() {
    for p in $(pids_of "lazyblk snapshotter") $(pids_of "containerd --config"); do kill "$p" 2> /dev/null || true; done
    sleep 1
    lazyblk del --all > /dev/null 2>&1 || true
    for m in $(awk '$2 ~ /^\/var\/lib\/(containerd|lzsnap)/ { print $2 }' /proc/mounts | sort -r); do umount -l "$m" || true; done
    rm -rf /var/lib/containerd /var/lib/lzsnap /var/cache/lazyblk /run/containerd || true
}
# one SYSTEM ROUND: pull + run, the first line's time
one() {
    sys=$1
    stop_all
    mkdir -p /var/lib/containerd /var/lib/lzsnap /run/containerd
    mount -t tmpfs tmpfs /var/lib/containerd
    mount -t tmpfs tmpfs /var/lib/lzsnap
    snap=overlayfs
    [ "$sys" = overlayfs ] || snap=lazyblk
    containerd_config $snap /run/lazyblk/snapshotter.sock /etc/containerd/certs.d > /etc/containerd/config.toml
    if [ "$snap" = lazyblk ]; then
        LAZYBLK_CACHE_DIR=/var/cache/lazyblk lazyblk snapshotter --address /run/lazyblk/snapshotter.sock \
            --root /var/lib/lzsnap --log-file /tmp/daemons.log > /tmp/snapshotter.log 2>&1 &
        wait_for 30 "the snapshotter" test -S /run/lazyblk/snapshotter.sock
    fi
    containerd --config /etc/containerd/config.toml > /tmp/containerd.log 2>&1 &
    wait_for 60 "containerd" ctr version
    t0=$(now_ms)
    lazyblk-testkit cri-pull --timeout 600 "$REG/python:3.11" > /dev/null 2> /tmp/pull.err || { cat /tmp/pull.err; echo "BENCHCTR sys=$sys failed=pull"; return; }
    t1=$(now_ms)
    ctr -n k8s.io run --rm --no-pivot --snapshotter $snap "$REG/python:3.11" r$$ 2>&1 |
        { read -r line; now_ms > /tmp/first; echo "$line" > /tmp/line; cat > /dev/null; }
    t2=$(cat /tmp/first)
    grep -q lazyblk-python-ok /tmp/line || { cat /tmp/line; echo "BENCHCTR sys=$sys failed=run"; return; }
    if [ "$snap" = lazyblk ]; then
        id=$(lazyblk list | awk '/ublkb/ { print $1; exit }')
        fetched=$(lazyblk status "$id" --json | tr ',' '\n' | awk -F: '/"bytes_fetched"/ { gsub(/ /, "", $2); print $2; exit }')
        lazyblk status "$id" | grep '^attach' | sed "s/^/BENCHINFO sys=$sys /"
    else
        fetched=$(cat /pyimg/image-bytes) # every layer, compressed
    fi
    if [ "$sys" = record ]; then
        # The start-up just run, as a prefetch pack over the converted image (the newest link).
        mkdir -p /tmp/trace
        lazyblk trace "$id" --pack -o /tmp/trace/prefetch.pack --push "$REG/python:3.11-lazyblk" > /tmp/trace.log 2>&1 ||
            { cat /tmp/trace.log; echo "BENCHCTR sys=lazyblk-pack failed=trace"; return; }
        sed 's/^/BENCHINFO sys=record /' /tmp/trace.log
        return
    fi
    echo "BENCHCTR sys=$sys pull_ms=$((t1 - t0)) first_line_ms=$((t2 - t0)) fetched=$fetched"
}
for r in $(seq "$BENCH_ROUNDS"); do
    for s in overlayfs lazyblk; do one $s; done
done
one record
for r in $(seq "$BENCH_ROUNDS"); do one lazyblk-pack; done
stop_all
GUEST

log=$work/guest.log
bash "$top/qemu/run-guest.sh" --script "$work/guest.sh" --mem 4096 --timeout 3000 --log "$log" \
    --append "BENCH_ROUNDS=$rounds BENCH_NETEM=$(echo "$netem" | tr ' ' '_')" \
    --bin "$work/lazyblk" --bin "$work/lazyblk-testkit" --file "$top/tests/guest/lib.sh:/guest/lib.sh" \
    --file "$top/tests/guest/containerd-config.sh:/guest/containerd-config.sh" \
    --bin "$(command -v containerd)" --bin "$(command -v containerd-shim-runc-v2)" \
    --bin "$(command -v ctr)" --bin "$(command -v runc)" --bin "$(command -v docker-registry)" \
    --dir "$work/pyimg:/pyimg" --dir "$work/pyreg:/pyreg" > /dev/null || true
tr -d '\r' < "$log" | grep '^BENCHINFO' || true
tr -d '\r' < "$log" | grep '^BENCHCTR' > "$work/results.txt" || true
python3 - "$work/results.txt" "$rounds" "$netem" "$top/docs/BENCHMARKS.md" "${BENCH_NO_DOC:-}" << 'PY'
import re, statistics, sys, subprocess, platform, os
res, rounds, netem, doc, nodoc = sys.argv[1:6]
rows = {}
failed = []
for l in open(res):
    kv = dict(x.split("=", 1) for x in l.split()[1:])
    if "failed" in kv:
        failed.append(f"{kv['sys']}: {kv['failed']}")
        continue
    rows.setdefault(kv["sys"], []).append(kv)
def med(sys_, k):
    v = [float(r[k]) for r in rows.get(sys_, []) if r[k] not in ("", "-")]
    return statistics.median(v) if v else None
lines = ["| system | rounds | pull (median ms) | pull to first line (median ms) | ratio to overlayfs | bytes fetched (median) |",
         "|---|---|---|---|---|---|"]
base = med("overlayfs", "first_line_ms")
for s in ("overlayfs", "lazyblk", "lazyblk-pack"):
    if s not in rows:
        continue
    f = med(s, "first_line_ms")
    ratio = f"{f / base:.2f}x" if base and f else "-"
    lines.append(f"| {s} | {len(rows[s])} | {med(s, 'pull_ms'):.0f} | {f:.0f} | {ratio} | {med(s, 'fetched'):.0f} |")
for f in failed:
    lines.append(f"| failed | | {f} | | | |")
table = "\n".join(lines)
print(table)
def verdict_of(s, what):
    lazy = med(s, "first_line_ms")
    if not (base and lazy):
        return f"{what}: no comparison (a system failed)"
    return f"{what} / overlayfs, pull to first line: {lazy / base:.2f}x (target at most 0.2x: {'met' if lazy / base <= 0.2 else 'MISSED'})"
verdict = verdict_of("lazyblk", "lazyblk") + "\n\n" + verdict_of("lazyblk-pack", "lazyblk with the recorded start-up's prefetch pack")
print(verdict)
if nodoc == "1":
    sys.exit(0)
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
body = f"""Run: `bash bench/containerd.sh` (BENCH_ROUNDS={rounds}), lazyblk {rev}, host {platform.node()} ({cpu}, 2 cores),
one qemu TCG guest (Debian 6.12 cloud kernel, 4 GiB), netem `{netem}` on the guest's loopback, containerd 1.6.20 + runc 1.1.5,
Debian's docker-registry. Each round starts from empty containerd, snapshotter and cache directories.

{table}

{verdict}"""
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(doc)), "..", "bench"))
import doc_section
doc_section.splice(doc, "CONTAINERD", "containerd: pull to the first line of a python container", body, "bench/containerd.sh")
PY
