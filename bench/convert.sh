#!/usr/bin/env bash
# Convert throughput (issue 15): `lazyblk convert` of the python image (tests/guest/python-image.sh:
# three gzip layers) from an OCI layout into a local docker-registry, against the classic path
# `umoci unpack` + `mkfs.erofs` of the same layout, side by side on this host, BENCH_ROUNDS rounds
# (default 3, medians). Throughput = uncompressed layer bytes (the sum of the tar streams) / time.
# lazyblk's time includes chunking, zstd and the push to the registry on loopback; the classic
# path stops at the erofs image. Prints a table; writes it between the CONVERT markers of
# docs/BENCHMARKS.md unless BENCH_NO_DOC=1. Usage: bash bench/convert.sh (as root).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
rounds=${BENCH_ROUNDS:-3}
work=$top/target/bench-convert
if [[ -z ${LAZYBLK_BIN:-} ]]; then
    (cd "$top" && cargo build --release --locked -p lazyblk-tools)
    LAZYBLK_BIN=$top/target/release/lazyblk
fi
command -v mkfs.erofs > /dev/null || { echo "bench/convert.sh: mkfs.erofs is missing (scripts/setup)"; exit 1; }
bash "$top/tests/guest/python-image.sh" "$LAZYBLK_BIN" "$work/pyimg" "$work/pyreg" 127.0.0.1:5124 > /dev/null
cd "$work/pyimg"
docker-registry serve registry.yml > registry.log 2>&1 &
regpid=$!
trap 'kill $regpid 2> /dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS http://127.0.0.1:5124/v2/ > /dev/null 2>&1 && break; sleep 0.1; done
# Uncompressed bytes of the layers: the tar streams.
tarbytes=0
for d in $(cat layers.txt); do
    n=$(gzip -dc "L/blobs/sha256/${d#sha256:}" | wc -c)
    tarbytes=$((tarbytes + n))
done
now() { date +%s.%N; }
res=$work/results.txt
: > "$res"
for r in $(seq "$rounds"); do
    t0=$(now)
    "$LAZYBLK_BIN" convert oci:L:py "127.0.0.1:5124/bench/py:r$r" > /dev/null 2> convert.err ||
        { cat convert.err; exit 1; }
    t1=$(now)
    rm -rf U img.erofs
    umoci unpack --image L:py U > /dev/null
    mkfs.erofs -q img.erofs U/rootfs > /dev/null 2>&1 || mkfs.erofs img.erofs U/rootfs > /dev/null
    t2=$(now)
    echo "lazyblk $(echo "$t1 - $t0" | bc)" >> "$res"
    echo "umoci+mkfs.erofs $(echo "$t2 - $t1" | bc)" >> "$res"
done
python3 - "$res" "$tarbytes" "$rounds" "$top/docs/BENCHMARKS.md" "${BENCH_NO_DOC:-}" << 'PY'
import re, statistics, sys, subprocess, platform, os
res, tarbytes, rounds, doc, nodoc = sys.argv[1:6]
tarbytes = int(tarbytes)
t = {}
for l in open(res):
    k, v = l.rsplit(" ", 1)
    t.setdefault(k, []).append(float(v))
rows = ["| path | rounds | median s | MB/s of uncompressed layers | ratio to umoci+mkfs.erofs |", "|---|---|---|---|---|"]
base = statistics.median(t["umoci+mkfs.erofs"])
for k in ("lazyblk", "umoci+mkfs.erofs"):
    m = statistics.median(t[k])
    rows.append(f"| {'`lazyblk convert` (incl. chunk, zstd, push)' if k == 'lazyblk' else '`umoci unpack` + `mkfs.erofs`'} | {len(t[k])} | {m:.2f} | {tarbytes / m / 1e6:.1f} | {m / base:.2f}x |")
table = "\n".join(rows)
print(table)
if nodoc == "1":
    sys.exit(0)
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
body = f"""Run: `bash bench/convert.sh` (BENCH_ROUNDS={rounds}), lazyblk {rev}, host {platform.node()} ({cpu}, 2 cores), on the host
(no guest): the python image of the containerd suite, {tarbytes / 1e6:.1f} MB of uncompressed layers in three gzip layers.

{table}"""
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(doc)), "..", "bench"))
import doc_section
doc_section.splice(doc, "CONVERT", "Convert throughput", body, "bench/convert.sh")
PY
