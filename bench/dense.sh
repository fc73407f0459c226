#!/usr/bin/env bash
# A dense node (issue 17): as many devices of different images at once as the 4 GiB guest holds
# (BENCH_DENSE_N, default 128), each its own supervised daemon, every one mounted and read whole
# with an exact digest (tests/guest/dense.sh, the suite's own checks included); the whole set's
# processes, threads and daemon memory (RssAnon) after every device read all of its files, and
# the attach time of the last devices against the first. One qemu TCG guest.
#
# usage: bash bench/dense.sh   (as root; BENCH_NO_DOC=1 leaves docs/BENCHMARKS.md alone,
#        LAZYBLK_BIN to use a built binary)
# Prints the table and writes it between the DENSE markers of docs/BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
n=${BENCH_DENSE_N:-128}
work=$top/target/bench-dense
. "$here/lib.sh"
bench_binaries "$work"
bash "$top/tests/guest/dense-images.sh" "$bindir" "$work/dense" "$n"
log=$work/guest.log
st=0
bash "$top/qemu/run-guest.sh" --script "$top/tests/guest/dense.sh" --mem 4096 --timeout 3000 --log "$log" \
    --append "DENSE_BENCH=1" --bin "$work/lazyblk" --bin "$work/lazyblk-testkit" \
    --file "$top/tests/guest/lib.sh:/guest/lib.sh" --dir "$work/dense:/dense" > /dev/null || st=$?
line=$(tr -d '\r' < "$log" | grep '^DENSE ' | tail -n 1 || true)
checks=$(tr -d '\r' < "$log" | grep -cE '^ok - ' || true)
failed=$(tr -d '\r' < "$log" | grep -E '^not ok' || true)
[[ -n $line ]] || { echo "bench/dense.sh: the guest printed no result (status $st); log: $log"; exit 1; }
threads_one=$(tr -d '\r' < "$log" | sed -n '/^threads of one daemon/,/^cost:/p' | sed '1d;$d' | awk '{ printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1 }')
python3 - "$line" "$checks" "$failed" "$threads_one" "$top" "${BENCH_NO_DOC:-}" << 'PY'
import platform, subprocess, sys
line, checks, failed, threads_one, top, nodoc = sys.argv[1:7]
kv = dict(x.split("=", 1) for x in line.split()[1:])
n = int(kv["devices"]); threads = int(kv["threads"]); anon = int(kv["rss_anon_kib"]) / 1024
first, last = int(kv["attach_first_ms"]), int(kv["attach_last_ms"])
def verdict(ok): return "met" if ok else "MISSED"
rows = [
    "| measure | whole set | per device | target |",
    "|---|---|---|---|",
    f"| devices (images), each mounted and read whole | {n} | | at least 100 |",
    f"| processes (daemons and supervisors) | {kv['procs']} | {int(kv['procs']) / n:.2f} | |",
    f"| threads | {threads} | {threads / n:.2f} | at most 4 ({verdict(threads <= 4 * n)}) |",
    f"| daemon memory, RssAnon | {anon:.1f} MiB | {anon / n:.2f} MiB | at most 66 MiB ({verdict(anon <= 66 * n)}) |",
    f"| attach, first four devices (median) | | {first} ms | |",
    f"| attach, last four devices (median) | | {last} ms ({last / first:.2f}x) | at most 1.5x ({verdict(last <= 1.5 * first)}) |",
]
table = "\n".join(rows)
print(table)
print(f"threads of one daemon: {threads_one}")
print(f"suite checks passed: {checks}" + (f"; FAILED: {failed}" if failed else ""))
if nodoc == "1":
    sys.exit(0)
rev = subprocess.run(["git", "-C", top, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
body = f"""Run: `bash bench/dense.sh` (BENCH_DENSE_N={n}), lazyblk {rev}, host {platform.node()} ({cpu}, 2 cores),
one qemu TCG guest (Debian 6.12 cloud kernel, 4 GiB, 2 vCPUs). {n} different images (about 300 files and
1.7 MiB each, tests/guest/dense-images.sh) served by nginx in the guest; each `lazyblk add --supervise`,
mounted, and read whole with a digest of every file, {sys.argv[2]} checks of tests/guest/dense.sh passed
(the kill -9 of three daemons under load included){'; FAILED: ' + failed if failed else ''}.
Counted after every device read all of its files, over every `lazyblk` process (daemons and supervisors).

{table}

Threads of one daemon: {threads_one}."""
subprocess.run([sys.executable, f"{top}/bench/doc_section.py", f"{top}/docs/BENCHMARKS.md", "DENSE",
                "A dense node: many devices at once (`bench/dense.sh`)", "bench/dense.sh"], input=body, text=True, check=True)
PY
