#!/usr/bin/env bash
# Convert throughput and layer sharing (issue 15), on this host, one run:
#  - a base image: a Debian bookworm debootstrap root (minbase + python3), one gzip layer made
#    with umoci; an application image on it: the base layer plus one layer of application files
#    (python sources, a data file, many small modules, a changed /etc file, deleted docs);
#  - both copied with skopeo into a local docker-registry and converted from there with
#    `lazyblk convert` (the lazy images link to their sources);
#  - throughput: `lazyblk convert` of the base (from its OCI layout, pushed to a fresh repository
#    each round) beside the classic path `umoci unpack` + `mkfs.erofs` of the same layout,
#    BENCH_ROUNDS rounds (default 3, medians); MB/s of uncompressed layers (the tar streams);
#  - sharing: the registry bytes the application's lazy image adds beyond the base's, against
#    its own layer's compressed bytes (target at most 2x); then, on one host cache, the base read
#    whole (`lazyblk cat`) and the application read whole after it: the blob bytes the registry
#    served for the application (counted at the server), against its new blobs; fsck.erofs of
#    both images.
# The debootstrap root is made once and kept as a tar in ~/.cache/lazyblk-bench (it needs
# deb.debian.org). Prints the tables; writes them between the CONVERT markers of
# docs/BENCHMARKS.md unless BENCH_NO_DOC=1. Usage: bash bench/convert.sh (as root).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
rounds=${BENCH_ROUNDS:-3}
work=$top/target/bench-convert
addr=127.0.0.1:5124
if [[ -z ${LAZYBLK_BIN:-} ]]; then
    (cd "$top" && cargo build --release --locked -p lazyblk-tools)
    LAZYBLK_BIN=$top/target/release/lazyblk
fi
for t in mkfs.erofs fsck.erofs umoci skopeo docker-registry debootstrap curl; do
    command -v $t > /dev/null || { echo "bench/convert.sh: $t is missing (bash scripts/setup installs it)"; exit 1; }
done
cachedir=${XDG_CACHE_HOME:-$HOME/.cache}/lazyblk-bench
roottar=$cachedir/bookworm-minbase-python3.tar
if [[ ! -s $roottar ]]; then
    mkdir -p "$cachedir"
    rm -rf "$cachedir/root.tmp"
    echo "bench/convert.sh: debootstrap bookworm (minbase + python3) into $roottar (once)"
    debootstrap --variant=minbase --include=python3 bookworm "$cachedir/root.tmp" \
        http://deb.debian.org/debian > "$cachedir/debootstrap.log" 2>&1 ||
        { tail -5 "$cachedir/debootstrap.log"; echo "bench/convert.sh: debootstrap failed"; exit 1; }
    rm -rf "$cachedir/root.tmp/var/cache/apt/archives/"*.deb
    tar --numeric-owner --xattrs --xattrs-include='*' -C "$cachedir/root.tmp" -cf "$roottar.tmp" .
    mv "$roottar.tmp" "$roottar"
    rm -rf "$cachedir/root.tmp"
fi

rm -rf "$work" && mkdir -p "$work/reg"
cd "$work"
cat > registry.yml << EOF
version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $work/reg
http:
  addr: $addr
EOF
docker-registry serve registry.yml > registry.log 2>&1 &
regpid=$!
trap 'kill $regpid 2> /dev/null || true' EXIT
for _ in $(seq 100); do curl -fsS "http://$addr/v2/" > /dev/null 2>&1 && break; sleep 0.1; done
kill -0 $regpid 2> /dev/null && curl -fsS "http://$addr/v2/" > /dev/null ||
    { tail -3 registry.log; echo "bench/convert.sh: docker-registry did not start on $addr"; exit 1; }

# The images.
umoci init --layout L > /dev/null
umoci new --image L:base
umoci unpack --image L:base B > /dev/null
tar --numeric-owner --xattrs --xattrs-include='*' -C B/rootfs -xpf "$roottar"
umoci repack --image L:base B > /dev/null
umoci unpack --image L:base A > /dev/null
R=A/rootfs
mkdir -p $R/app/src $R/app/data
for m in email json http xml asyncio logging; do cp -a "$R/usr/lib/python3.11/$m" $R/app/src/; done
head -c 8000000 /dev/urandom > $R/app/data/model.bin
for i in $(seq 300); do printf 'def f%d(x):\n    return x + %d\n' "$i" "$i" > "$R/app/src/mod$i.py"; done
echo 'Welcome to the application image' > $R/etc/motd
rm -rf $R/usr/share/doc/*
umoci repack --image L:app A > /dev/null
umoci config --image L:app --config.entrypoint python3 --config.cmd /app/src/mod1.py > /dev/null
rm -rf A B
for n in base app; do
    skopeo copy -q --dest-tls-verify=false "oci:L:$n" "docker://$addr/src/$n:v1"
done
python3 - L > layers.txt << 'PY'
import json, sys, os
lay = sys.argv[1]
idx = json.load(open(os.path.join(lay, "index.json")))
for m in idx["manifests"]:
    d = m["digest"].split(":", 1)[1]
    man = json.load(open(os.path.join(lay, "blobs/sha256", d)))
    tag = m["annotations"]["org.opencontainers.image.ref.name"]
    print(tag, " ".join(f'{l["digest"]}:{l["size"]}' for l in man["layers"]))
PY
# Uncompressed bytes of the base's layer (its tar stream).
tarbytes=0
for l in $(awk '$1 == "base" { $1 = ""; print }' layers.txt); do
    d=${l%:*}
    tarbytes=$((tarbytes + $(gzip -dc "L/blobs/sha256/${d#sha256:}" | wc -c)))
done

# Throughput.
now() { date +%s.%N; }
res=$work/results.txt
: > "$res"
for r in $(seq "$rounds"); do
    t0=$(now)
    "$LAZYBLK_BIN" convert oci:L:base "$addr/round$r/base:v1" > /dev/null 2> convert.err ||
        { cat convert.err; exit 1; }
    t1=$(now)
    rm -rf U img.erofs
    umoci unpack --image L:base U > /dev/null
    mkfs.erofs -q img.erofs U/rootfs > /dev/null 2>&1 || mkfs.erofs img.erofs U/rootfs > /dev/null
    t2=$(now)
    echo "lazyblk $(echo "$t1 - $t0" | bc)" >> "$res"
    echo "umoci+mkfs.erofs $(echo "$t2 - $t1" | bc)" >> "$res"
done
rm -rf U img.erofs

# Sharing.
for n in base app; do
    "$LAZYBLK_BIN" convert "$addr/src/$n:v1" "$addr/lazy/$n:v1" > "convert-$n.out" 2>&1 ||
        { cat "convert-$n.out"; exit 1; }
done
manifest() { # manifest REPO TAG: the image manifest's JSON
    curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://$addr/v2/$1/manifests/$2"
}
manifest lazy/base v1 > lazy-base.json
manifest lazy/app v1 > lazy-app.json
# Blob bytes the registry sent (its info log: one line per response with the bytes written).
served() {
    python3 - registry.log << 'PY'
import re, sys
n = 0
for l in open(sys.argv[1]):
    if 'http.request.method=GET' in l and '/blobs/sha256:' in l:
        m = re.search(r'http.response.written=(\d+)', l)
        if m:
            n += int(m.group(1))
print(n)
PY
}
rm -rf cache && mkdir cache
"$LAZYBLK_BIN" cat "$addr/lazy/base:v1" --cache-dir cache --state-dir state -o base.erofs
s0=$(served)
"$LAZYBLK_BIN" cat "$addr/lazy/app:v1" --cache-dir cache --state-dir state -o app.erofs
s1=$(served)
fsck.erofs base.erofs > fsck-base.out 2>&1 || { cat fsck-base.out; echo "bench/convert.sh: fsck.erofs of the base failed"; exit 1; }
fsck.erofs app.erofs > fsck-app.out 2>&1 || { cat fsck-app.out; echo "bench/convert.sh: fsck.erofs of the application failed"; exit 1; }
[[ $s0 -gt 0 ]] || { echo "bench/convert.sh: the registry log counted no blob bytes for the base (log format?)"; exit 1; }

python3 - "$res" "$tarbytes" "$rounds" "$top/docs/BENCHMARKS.md" "${BENCH_NO_DOC:-}" "$((s1 - s0))" \
    "$(du -b "$roottar" | cut -f1)" << 'PY'
import json, statistics, sys, subprocess, platform, os
res, tarbytes, rounds, doc, nodoc, app_served, roottar = sys.argv[1:8]
tarbytes, app_served = int(tarbytes), int(app_served)
t = {}
for l in open(res):
    k, v = l.rsplit(" ", 1)
    t.setdefault(k, []).append(float(v))
rows = ["| path | rounds | median s | MB/s of uncompressed layers | ratio to umoci+mkfs.erofs |", "|---|---|---|---|---|"]
base = statistics.median(t["umoci+mkfs.erofs"])
for k in ("lazyblk", "umoci+mkfs.erofs"):
    m = statistics.median(t[k])
    name = "`lazyblk convert` (incl. erofs, chunk, zstd, push)" if k == "lazyblk" else "`umoci unpack` + `mkfs.erofs`"
    rows.append(f"| {name} | {len(t[k])} | {m:.2f} | {tarbytes / m / 1e6:.1f} | {m / base:.2f}x |")
speed = "\n".join(rows)

src = {}
for l in open("layers.txt"):
    tag, *ls = l.split()
    src[tag] = [(x.rsplit(":", 1)[0], int(x.rsplit(":", 1)[1])) for x in ls]
def blobs(f):
    m = json.load(open(f))
    return {(d["digest"], d["size"]) for d in m["layers"] + [m["config"]]}
lb, la = blobs("lazy-base.json"), blobs("lazy-app.json")
added = sum(s for d, s in la - lb)
own = src["app"][-1][1]
base_reg = sum(s for d, s in lb)
src_base = sum(s for d, s in src["base"])
shared = sum(s for d, s in la & lb)
ratio = added / own
rows = ["| what | bytes |", "|---|---|",
        f"| source base image, its gzip layer | {src_base} |",
        f"| source application's own layer (gzip) | {own} |",
        f"| lazy base image in the registry (all its blobs) | {base_reg} |",
        f"| lazy application: blobs shared with the lazy base | {shared} |",
        f"| lazy application: blobs it adds (its layer's data blob, merged metadata, config) | {added} |",
        f"| blob bytes the registry served for the application, read whole after the base on one host cache | {app_served} |"]
share = "\n".join(rows)
verdict = (f"The application's lazy image adds {added} registry bytes for its own layer of {own} compressed bytes: "
           f"{ratio:.2f}x ({'met' if ratio <= 2 else 'NOT met'}; target at most 2x). Read after the base on the same host, "
           f"it fetched {app_served} bytes ({app_served / added:.2f}x of what it adds). `fsck.erofs` passes on both images.")
print(speed); print(); print(share); print(); print(verdict)
if nodoc == "1":
    sys.exit(0)
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
body = f"""Run: `bash bench/convert.sh` (BENCH_ROUNDS={rounds}), lazyblk {rev}, host {platform.node()} ({cpu}, 2 cores), on the host
(no guest), a local docker-registry on loopback. Base image: a Debian bookworm debootstrap root (minbase + python3),
one gzip layer made with umoci, {tarbytes / 1e6:.1f} MB uncompressed; the application image adds one layer (python
sources, an 8 MB data file, 300 small modules, a changed `/etc/motd`, `/usr/share/doc` deleted).

Throughput, converting the base:

{speed}

Sharing (`lazyblk convert` of both from the registry, then `lazyblk cat` of both on one cache):

{share}

{verdict}"""
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(doc)), "..", "bench"))
import doc_section
doc_section.splice(doc, "CONVERT", "Convert throughput and layer sharing", body, "bench/convert.sh")
PY
