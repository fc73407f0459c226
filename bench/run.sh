#!/usr/bin/env bash
# The lazy-loading benchmark (docs/BENCHMARKS.md): lazyblk against downloading the whole image,
# nbdkit (curl plugin + cache filter) over kernel nbd, qemu copy-on-read over kernel nbd, a local
# kernel loop device and a plain ublk loop device (rublk), side by side in ONE qemu guest (TCG),
# with the guest's loopback shaped by netem (20 ms RTT, 100 Mbit/s).
#
# usage: bash bench/run.sh            (as root on Debian; installs what it needs with apt-get)
#
# Environment (all optional):
#   BENCH_SYSTEMS    systems to run (default: all): loop ublkloop ublkloop-a download nbdkit qemu lazyblk-od lazyblk lazyblk-pl lazyblk-pf lazyblk-opt lazyblk-ho lazyblk-hodm
#   BENCH_WORKLOADS  workloads (default: "w1 w2 w3 w4")
#   BENCH_NETEM      netem arguments (default: "delay 10ms rate 100mbit")
#   BENCH_FIO_SECS   fio runtime per job in seconds (default 5, plus 1 s ramp)
#   BENCH_MEM        guest RAM in MB (default 4096)
#   BENCH_ROUNDS     rounds of every cold run (default 1; the table shows medians and spread)
#   BENCH_CHUNK_KIB  chunk size of the lazyblk image (default: lazyblk build's, 128)
#   BENCH_PERF       diagnostics: "SYS:W ..." (e.g. "lazyblk-pf:w1") profiles the daemon of those
#                    runs with `perf record -e cpu-clock -g` in the guest and logs the top of its
#                    report as BENCHPERF lines (needs perf on the host; slows those runs down)
#   BENCH_NO_DOC=1   do not rewrite the generated part of docs/BENCHMARKS.md
#   LAZYBLK_BIN      use this lazyblk binary instead of building one
#   BENCH_PREPARE_ONLY=1  build everything, do not boot the guest
#
# Writes: target/bench-cache/ (debootstrap tree, erofs image, lazyblk image, data disk, rublk),
# target/bench-cache/results/<date>.{log,md}, and the generated section of docs/BENCHMARKS.md.
# Exit status: 0 when the guest ran every system (a system that could not be set up or hung is
# reported as "failed: <reason>" in the table AND makes the exit status 1).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
# shellcheck source=../qemu/lib.sh source-path=SCRIPTDIR
. "$top/qemu/lib.sh"
msg() { printf 'bench: %s\n' "$*" >&2; }

cache=${BENCH_CACHE:-$top/target/bench-cache}
mkdir -p "$cache" "$cache/results"
systems=${BENCH_SYSTEMS:-loop ublkloop ublkloop-a download nbdkit qemu lazyblk-od lazyblk lazyblk-pl lazyblk-pf lazyblk-opt lazyblk-ho lazyblk-hodm}
workloads=${BENCH_WORKLOADS:-w1 w2 w3 w4}
netem=${BENCH_NETEM:-delay 10ms rate 100mbit}
fio_secs=${BENCH_FIO_SECS:-5}
mem=${BENCH_MEM:-4096}
chunk_kib=${BENCH_CHUNK_KIB:-128}

# ------------------------------------------------------------------ host packages
# Commands, and files that are no command (block-curl.so, libclang).
lg_ensure_cmds \
    debootstrap:debootstrap mkfs.erofs:erofs-utils nbdkit:nbdkit nbd-client:nbd-client \
    qemu-nbd:qemu-utils qemu-img:qemu-utils fio:fio curl:curl python3:python3 \
    qemu-system-x86_64:qemu-system-x86 cargo:cargo
need_pkgs=()
[[ -x /usr/bin/time ]] || need_pkgs+=(time)
[[ -f /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]] || need_pkgs+=(qemu-block-extra)
dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(libclang-dev)
if ((${#need_pkgs[@]})); then
    msg "installing ${need_pkgs[*]}"
    lg_apt_get install -y --no-install-recommends "${need_pkgs[@]}" >&2 || {
        lg_apt_update || die "apt-get update failed"
        lg_apt_get install -y --no-install-recommends "${need_pkgs[@]}" >&2 || die "apt-get install ${need_pkgs[*]} failed"
    }
fi
curl_so=/usr/lib/x86_64-linux-gnu/qemu/block-curl.so
nbdkit_plugins=/usr/lib/x86_64-linux-gnu/nbdkit
[[ -f $curl_so ]] || die "$curl_so missing after installing qemu-block-extra"
[[ -f $nbdkit_plugins/plugins/nbdkit-curl-plugin.so ]] || die "nbdkit's curl plugin is missing ($nbdkit_plugins/plugins/nbdkit-curl-plugin.so)"
[[ -f $nbdkit_plugins/filters/nbdkit-cache-filter.so ]] || die "nbdkit's cache filter is missing"

# ------------------------------------------------------------------ binaries
if [[ -n ${LAZYBLK_BIN:-} ]]; then
    [[ -x $LAZYBLK_BIN ]] || die "LAZYBLK_BIN=$LAZYBLK_BIN is not executable"
    lzsrc=$LAZYBLK_BIN
else
    msg "building lazyblk (cargo build --release -p lazyblk-tools)"
    (cd "$top" && cargo build --release -p lazyblk-tools >&2) || die "cargo build --release -p lazyblk-tools failed"
    lzsrc=$top/target/release/lazyblk
fi
# A private copy: the tree may be rebuilt while the benchmark runs.
mkdir -p "$cache/bin"
cp "$lzsrc" "$cache/bin/lazyblk.tmp" && mv "$cache/bin/lazyblk.tmp" "$cache/bin/lazyblk"
lazyblk=$cache/bin/lazyblk
lz_hash=$(sha256sum "$lazyblk" | cut -c1-16)
lz_rev=$(cd "$top" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(cd "$top" && git status --porcelain --untracked-files=no 2>/dev/null) ]]; then lz_rev="$lz_rev+dirty"; fi

rublk_ver=0.2.15
rublk=$cache/rublk-$rublk_ver/bin/rublk
rublk_bin=()
if [[ " $systems " == *" ublkloop"* ]]; then rublk_bin=(--bin "$rublk"); fi
if [[ ${#rublk_bin[@]} -gt 0 && ! -x $rublk ]]; then
    msg "building rublk $rublk_ver (cargo install; needs libclang-dev)"
    cargo install --locked --no-default-features --version "$rublk_ver" \
        --root "$cache/rublk-$rublk_ver" rublk >&2 || die "cargo install rublk $rublk_ver failed"
fi

# ------------------------------------------------------------------ the image
# A real file tree: a minimal Debian bookworm root (debootstrap --variant=minbase) with Python 3,
# pip and git, apt lists and caches removed as container images do. Built once.
suite=bookworm
include=python3,python3-pip,git,ca-certificates
mirror=${BENCH_MIRROR:-http://deb.debian.org/debian}
img_key="$suite-minbase-$(echo "$include" | tr ',' '+')"
imgdir=$cache/image-$img_key
if [[ ! -f $imgdir/.complete ]]; then
    msg "building the image tree with debootstrap ($suite, minbase, +$include); takes a few minutes"
    rm -rf "$imgdir.tmp"
    mkdir -p "$imgdir.tmp"
    debootstrap --variant=minbase --include="$include" "$suite" "$imgdir.tmp/rootfs" "$mirror" \
        >"$imgdir.tmp/debootstrap.log" 2>&1 || die "debootstrap failed: see $imgdir.tmp/debootstrap.log"
    root=$imgdir.tmp/rootfs
    # debootstrap may leave pseudo filesystems mounted in the target: never pack those.
    while read -r mp; do umount -l "$mp" || true; done < <(awk -v r="$root" '$2 ~ "^"r { print $2 }' /proc/mounts | sort -r)
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
        "$root"/var/log/* "$root"/tmp/* "$root"/proc/* "$root"/sys/* 2>/dev/null || true
    mkfs.erofs --quiet "$imgdir.tmp/image.erofs" "$root" >&2 || die "mkfs.erofs failed"
    mkdir -p "$imgdir.tmp/lists"
    # Every regular file, sorted bytewise; W1 reads every 10th of them (the 1st, 11th, ...).
    (cd "$root" && find . -type f -printf '%P\0' | LC_ALL=C sort -z) >"$imgdir.tmp/lists/all.list"
    tr '\0' '\n' <"$imgdir.tmp/lists/all.list" | awk 'NR % 10 == 1' | tr '\n' '\0' >"$imgdir.tmp/lists/w1.list"
    {
        echo "files=$(tr -cd '\0' <"$imgdir.tmp/lists/all.list" | wc -c)"
        echo "w1_files=$(tr -cd '\0' <"$imgdir.tmp/lists/w1.list" | wc -c)"
        echo "dirs=$(find "$root" -type d | wc -l)"
        echo "symlinks=$(find "$root" -type l | wc -l)"
        echo "file_bytes=$(cd "$root" && find . -type f -printf '%s\n' | awk '{ s += $1 } END { print s }')"
        echo "w1_bytes=$(cd "$root" && xargs -0 stat -c %s <"$imgdir.tmp/lists/w1.list" | awk '{ s += $1 } END { print s }')"
        echo "image_bytes=$(stat -c %s "$imgdir.tmp/image.erofs")"
        echo "debootstrap=\"debootstrap --variant=minbase --include=$include $suite ROOT $mirror\""
    } >"$imgdir.tmp/stats"
    rm -rf "$imgdir"
    mv "$imgdir.tmp" "$imgdir"
    touch "$imgdir/.complete"
fi
# shellcheck disable=SC1091
. "$imgdir/stats" # files, w1_files, dirs, symlinks, file_bytes, w1_bytes, image_bytes
# shellcheck disable=SC2154
((file_bytes >= 200 * 1024 * 1024)) || die "the image tree has only $file_bytes bytes of files (< 200 MiB)"
# shellcheck disable=SC2154
msg "image: $files files ($((file_bytes / 1048576)) MiB), erofs image $((image_bytes / 1048576)) MiB; W1 reads $w1_files files ($((w1_bytes / 1048576)) MiB)"

# The lazyblk image (manifest + blob), rebuilt when the lazyblk binary changes.
lzimg=$cache/lzimg-$img_key-$lz_hash-${chunk_kib}k
if [[ ! -f $lzimg/.complete ]]; then
    rm -rf "$cache"/lzimg-* && mkdir -p "$lzimg"
    msg "lazyblk build (chunking + zstd)"
    "$lazyblk" build "$imgdir/image.erofs" -o "$lzimg/img" --chunk-kib "$chunk_kib" >"$lzimg/build.out" 2>&1 ||
        die "lazyblk build failed: $(tail -3 "$lzimg/build.out")"
    touch "$lzimg/.complete"
fi

# The data disk: one erofs holding what the guest's web server serves, plus the file lists.
data=$cache/data-$img_key-$lz_hash-${chunk_kib}k.erofs
if [[ ! -f $data ]]; then
    stage=$cache/stage.tmp
    rm -rf "$stage" && mkdir -p "$stage/www/img" "$stage/lists"
    ln "$imgdir/image.erofs" "$stage/www/image.erofs"
    ln "$lzimg/img/manifest" "$lzimg/img/blob" "$stage/www/img/"
    ln "$imgdir/lists/all.list" "$imgdir/lists/w1.list" "$stage/lists/"
    cp "$imgdir/stats" "$stage/lists/stats"
    rm -f "$cache"/data-*.erofs
    mkfs.erofs --quiet "$data.tmp" "$stage" >&2 || die "mkfs.erofs of the data disk failed"
    mv "$data.tmp" "$data"
    rm -rf "$stage"
fi

# ------------------------------------------------------------------ guest contents
# nbdkit's plugin/filter and qemu's curl block driver are dlopen'ed: ship them and their ldd
# closures at the host paths.
pairs=()
declare -A seen=()
add_pair() { [[ -n ${seen[$1]:-} ]] || { seen[$1]=1; pairs+=(--file "$1:$1"); }; }
for f in "$nbdkit_plugins/plugins/nbdkit-curl-plugin.so" "$nbdkit_plugins/filters/nbdkit-cache-filter.so" "$curl_so"; do
    add_pair "$f"
    while IFS= read -r lib; do
        [[ -n $lib ]] && add_pair "$lib"
    done < <(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }')
done

host_info() {
    echo "nproc=$(nproc)"
    echo "cpu=\"$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)\""
    echo "host_kernel=\"$(uname -r)\""
    echo "qemu=\"$(qemu-system-x86_64 --version | head -1)\""
    echo "lazyblk_rev=$lz_rev"
    echo "lazyblk_sha=$lz_hash"
    echo "lazyblk_build=\"$(sed -n 's/^chunks *//p; s/^metadata *\([0-9]*\) blocks.* over \([0-9]*\) chunks (\(.*\)); packed into \([0-9]*\) bytes.*/metadata pack: \1 blocks of 4 KiB (spread over \2 chunks, \3), \4 bytes/p' "$lzimg/build.out" | paste -sd ';' | sed 's/;/; /')\""
    echo "rublk=$rublk_ver"
    echo "nbdkit=\"$(nbdkit --version | head -1)\""
    echo "nbd_client=\"$(dpkg-query -W -f='${Version}' nbd-client)\""
    echo "qemu_nbd=\"$(qemu-nbd --version | head -1)\""
    echo "fio=\"$(fio --version)\""
    echo "curl=\"$(curl --version | head -1 | cut -d' ' -f1-2)\""
    echo "nginx=\"$(nginx -v 2>&1 | sed 's/.*: //')\""
    echo "netem=\"$netem\""
    echo "mem=$mem"
    # The same CPU calibration the guest runs first: the whole image through lazyblk's chunk
    # store from a local path (decompress + BLAKE3 + cache write), natively.
    local tdir tf
    tdir=$(mktemp -d) tf=$(mktemp)
    /usr/bin/time -f "%e %U %S" -o "$tf" "$lazyblk" cat "$lzimg/img/manifest" --cache-dir "$tdir" -o /dev/null >/dev/null 2>&1 ||
        die "lazyblk cat of $lzimg/img/manifest failed"
    read -r e u sy <"$tf"
    echo "host_calib_secs=$e host_calib_user=$u host_calib_sys=$sy"
    rm -rf "$tdir" "$tf"
    echo "load_before=\"$(cut -d' ' -f1-3 /proc/loadavg)\""
}
host_info >"$cache/host.info"
{
    echo "BENCH_SYSTEMS=\"$systems\""
    echo "BENCH_WORKLOADS=\"$workloads\""
    echo "BENCH_NETEM=\"$netem\""
    echo "BENCH_FIO_SECS=$fio_secs"
    echo "BENCH_ROUNDS=${BENCH_ROUNDS:-1}"
    echo "BENCH_CHUNK_KIB=$chunk_kib"
    echo "BENCH_PERF=\"${BENCH_PERF:-}\""
} >"$cache/bench.conf"
perf_bin=()
if [[ -n ${BENCH_PERF:-} ]]; then
    command -v perf >/dev/null || die "BENCH_PERF needs perf on the host (apt-get install linux-perf)"
    perf_bin=(--bin "$(command -v perf)")
fi

if [[ -n ${BENCH_PREPARE_ONLY:-} ]]; then
    msg "prepared (BENCH_PREPARE_ONLY): $data"
    exit 0
fi

stamp=$(date +%Y%m%d-%H%M%S)
log=$cache/results/bench-$stamp.log
md=$cache/results/bench-$stamp.md
msg "running the guest (log: $log)"
t0=$SECONDS
set +e
bash "$top/qemu/run-guest.sh" --script "$here/guest-bench.sh" \
    --bin "$lazyblk" "${rublk_bin[@]}" --bin "$(command -v fio)" --bin "$(command -v curl)" \
    --bin "$(command -v nbdkit)" --bin "$(command -v nbd-client)" \
    --bin "$(command -v qemu-nbd)" --bin "$(command -v qemu-img)" "${perf_bin[@]}" \
    "${pairs[@]}" \
    --file "$cache/host.info:/bench/host.info" \
    --disk "$data" --mem "$mem" --timeout "${BENCH_TIMEOUT:-2400}" \
    --file "$cache/bench.conf:/bench/bench.conf" \
    --log "$log" >&2
rc=$?
set -e
echo "load_after=\"$(cut -d' ' -f1-3 /proc/loadavg)\"" >>"$cache/host.info"
msg "guest finished with status $rc after $((SECONDS - t0)) s"
python3 "$here/report.py" --log "$log" --host-info "$cache/host.info" --image-stats "$imgdir/stats" \
    --guest-rc "$rc" --seconds "$((SECONDS - t0))" >"$md" || die "bench/report.py failed on $log"
cat "$md"
if [[ -z ${BENCH_NO_DOC:-} ]]; then
    python3 "$here/report.py" --splice "$top/docs/BENCHMARKS.md" --table "$md"
    msg "docs/BENCHMARKS.md updated"
fi
msg "results: $md"
[[ $rc == 0 ]] || die "the guest exited with status $rc (see $log)"
if grep -q 'failed:' "$md"; then
    die "some systems failed (see the table)"
fi
