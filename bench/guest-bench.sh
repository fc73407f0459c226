#!/bin/sh
# Guest side of bench/run.sh (busybox sh, run as /test.sh by qemu/guest-init.sh).
# /dev/vda: an erofs "data disk" with www/image.erofs (the raw erofs image), www/img/{manifest,blob}
# (the lazyblk image of it) and lists/{all,w1}.list (NUL-separated file lists). Its content is
# copied to tmpfs and served by nginx on 127.0.0.1:8080 over a netem-shaped loopback.
# Prints one "BENCH key=value..." line per measurement (parsed by bench/report.py) and
# "BENCHFAIL sys=... w=... reason=..." for a system that could not be set up or hung.
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# shellcheck disable=SC1091
. /bench/bench.conf
SYSTEMS=${BENCH_SYSTEMS:-loop ublkloop ublkloop-a download nbdkit qemu lazyblk-od lazyblk lazyblk-pl lazyblk-pf lazyblk-opt lazyblk-ho lazyblk-hodm}
WORKLOADS=${BENCH_WORKLOADS:-w1 w2 w3 w4}
NETEM=${BENCH_NETEM:-delay 10ms rate 100mbit}
FIO_SECS=${BENCH_FIO_SECS:-5}
ROUNDS=${BENCH_ROUNDS:-1}
ROUND=1
WWW=/srv/www
URL=http://127.0.0.1:8080
MNT=/mnt/b
LOG=/tmp/nginx/access.log
SCRATCH=/var/tmp/bench # every system's local copy / cache lives here (tmpfs, like the server)
FAILED=0

say() { echo "bench-guest: [$(cut -d' ' -f1 /proc/uptime)] $*"; }
fatal() { say "FATAL: $*"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
cpu() { # cpu PID: user+system CPU seconds of the process so far (0 when none)
    [ -n "$1" ] && awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
threads() { [ -n "$1" ] && awk '/^Threads:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
smaps_top() { # smaps_top SYS W PID: the 6 mappings with the largest RSS, one BENCHINFO line
    [ -n "$3" ] && [ -r "/proc/$3/smaps" ] || return 0
    top=$(awk '/^[0-9a-f]+-[0-9a-f]+ / { name = ($6 == "" ? "[anon]" : $6) } /^Rss:/ { r[name] += $2 }
        END { for (n in r) print r[n], n }' "/proc/$3/smaps" | sort -rn | head -n 6 | awk '{ printf "%s:%dKiB ", $2, $1 }')
    echo "BENCHINFO sys=$1 w=$2 round=$ROUND threads=$(threads "$3") rss_by_mapping: $top"
}
hwm() { # hwm PID: peak RSS in KiB (0 when no such process)
    [ -n "$1" ] && awk '/^VmHWM:/ { print $2; f = 1 } END { if (!f) print 0 }' "/proc/$1/status" 2>/dev/null || echo 0
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# The daemon's own RSS: VmRSS minus RssShmem, i.e. without the pages of tmpfs files it maps
# (lazyblk maps its cache file, on tmpfs here: those pages are the cache's, there whether mapped
# or not). VmHWM has no such split, so a sampler keeps the peak, every 0.5 s, with shell
# builtins only (no process per sample), for as long as the daemon runs.
OWN_PID=""
own_start() { # own_start PID
    own_stop
    echo 0 >/tmp/own.max
    [ -n "$1" ] || return 0
    (
        m=0
        while [ -r "/proc/$1/status" ]; do
            r=0 s=0
            while read -r k v _; do
                case $k in VmRSS:) r=$v ;; RssShmem:) s=$v ;; esac
            done <"/proc/$1/status" 2>/dev/null
            if [ $((r - s)) -gt "$m" ]; then m=$((r - s)); echo "$m" >/tmp/own.max; fi
            sleep 0.5
        done
    ) &
    OWN_PID=$!
}
own_peak() { cat /tmp/own.max 2>/dev/null || echo 0; }
own_stop() { [ -n "$OWN_PID" ] || return 0; kill "$OWN_PID" 2>/dev/null; wait "$OWN_PID" 2>/dev/null; OWN_PID=""; }

# ------------------------------------------------------------------ setup
say "kernel $(uname -r), $(nproc) vCPUs, $(awk '/MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB"
mkdir -p /mnt/data "$WWW" /bench "$MNT" "$SCRATCH" /var/log/lazyblk
mount -t erofs -o ro /dev/vda /mnt/data || fatal "cannot mount the data disk /dev/vda"
t=$(now)
cp -a /mnt/data/www/. "$WWW/" || fatal "copying the served files to tmpfs failed"
cp -a /mnt/data/lists/. /bench/ || fatal "copying the file lists failed"
umount /mnt/data
say "served files copied to tmpfs in $(sub "$t" "$(now)") s: $(ls -l "$WWW" "$WWW/img" | awk 'NF > 5 { printf "%s=%s ", $NF, $5 }')"
IMAGE_BYTES=$(stat -c %s "$WWW/image.erofs") # (busybox wc -c reads the whole file)
BLOB_BYTES=$(stat -c %s "$WWW/img/blob")

mkdir -p /tmp/nginx
cat >/tmp/nginx/nginx.conf <<CONF
daemon on;
master_process off;
user root;
worker_rlimit_nofile 4096;
error_log /tmp/nginx/error.log;
pid /tmp/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    include /etc/nginx/mime.types;
    log_format bench '\$msec \$status \$body_bytes_sent \$request_time \$request_method \$uri "\$http_range"';
    access_log $LOG bench;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server { listen 127.0.0.1:8080; root $WWW; }
}
CONF
nginx -c /tmp/nginx/nginx.conf -p /tmp/nginx/ || fatal "nginx did not start"
i=0
while ! wget -q -O /dev/null "$URL/img/manifest" 2>/dev/null; do
    i=$((i + 1))
    [ $i -lt 100 ] || fatal "nginx does not answer"
    sleep 0.1
done

# CPU calibration (no network): lazyblk reads the whole image through its chunk store from a
# local path (decompress, BLAKE3, write to the cache); the host runs the same command natively.
rm -rf /tmp/calib
t=$(now)
time -p lazyblk cat "$WWW/img/manifest" --cache-dir /tmp/calib -o /dev/null 2>/tmp/calib.time >/dev/null ||
    fatal "lazyblk cat of the local manifest failed: $(cat /tmp/calib.time)"
el=$(sub "$t" "$(now)")
echo "BENCH sys=calib w=lazyblk-cat secs=$el user=$(awk '$1 == "user" { print $2 }' /tmp/calib.time) sys_s=$(awk '$1 == "sys" { print $2 }' /tmp/calib.time)"
rm -rf /tmp/calib

# The network: netem on lo shapes both directions (every packet crosses lo's root qdisc once).
# shellcheck disable=SC2086 # NETEM is a list of arguments
tc qdisc add dev lo root netem $NETEM || fatal "tc qdisc add dev lo root netem $NETEM failed"
say "qdisc: $(tc qdisc show dev lo)"
rtt=$(ping -c 10 -i 0.2 -q 127.0.0.1 | sed -n 's#.*= \([0-9.]*\)/\([0-9.]*\)/\([0-9.]*\).*#\1 \2 \3#p')
[ -n "$rtt" ] || fatal "ping 127.0.0.1 failed"
# shellcheck disable=SC2086
set -- $rtt
echo "BENCH sys=net w=ping rtt_min_ms=$1 rtt_avg_ms=$2 rtt_max_ms=$3"
awk -v r="$1" 'BEGIN { exit !(r >= 19) }' || fatal "netem not applied: ping RTT min $1 ms"
# Throughput: one 32 MiB range of the raw image.
t=$(now)
curl -fsS -o /dev/null -r 0-33554431 "$URL/image.erofs" || fatal "curl of a 32 MiB range failed"
el=$(sub "$t" "$(now)")
echo "BENCH sys=net w=tput bytes=33554432 secs=$el mbit=$(awk -v s="$el" 'BEGIN { printf "%.1f", 33554432 * 8 / s / 1e6 }')"

# ------------------------------------------------------------------ systems
# att_SYS: attach a fresh, cold instance; sets DEV (block device) and DPID (daemon pid or "").
# det_SYS: detach it and delete its local data.
DEV=""
DPID=""

att_loop() { # the floor: the complete image, local (tmpfs), on a kernel loop device
    DEV=$(losetup -f) || return 1
    losetup -r "$DEV" "$WWW/image.erofs" || return 1
    DPID=""
}
det_loop() { losetup -d "$DEV"; }

att_ublkloop() { # the same file on a plain ublk loop device: `rublk add loop` with rublk's
    # defaults (1 queue x 128 tags, O_DIRECT reads of the backing file), the issue's reference
    rublk add loop -n 60 -o -f "$WWW/image.erofs" >/tmp/rublk.out 2>&1 || { cat /tmp/rublk.out; return 1; }
    DEV=/dev/ublkb60
    i=0
    while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    DPID=$(pidof rublk | awk '{ print $1 }')
}
det_ublkloop() { rublk del -n 60 >/dev/null 2>&1; }
# rublk with lazyblk's settings (1 queue x 64 tags, buffered reads of the backing file like
# lazyblk's reads of its cache file) in its async/await mode (-a): libublk's async queue loop,
# one task per tag, the model lazyblk's ublk frontend uses (rublk's default is a synchronous CQE
# callback), so W4 can tell the cost of that model from the cost of lazyblk's own per-IO work.
att_ublkloop_a() {
    rublk add loop -n 61 -q 1 -d 64 -o --buffered-io -a -f "$WWW/image.erofs" >/tmp/rublk.out 2>&1 || { cat /tmp/rublk.out; return 1; }
    DEV=/dev/ublkb61
    i=0
    while [ ! -b $DEV ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    DPID=$(pidof rublk | awk '{ print $1 }')
}
det_ublkloop_a() { rublk del -n 61 >/dev/null 2>&1; }

att_download() { # what a user does today: download the whole image, then loop + mount
    mkdir -p "$SCRATCH/dl"
    curl -fsS -o "$SCRATCH/dl/image.erofs" "$URL/image.erofs" || return 1
    DEV=$(losetup -f) || return 1
    losetup -r "$DEV" "$SCRATCH/dl/image.erofs" || return 1
    DPID=""
}
det_download() { losetup -d "$DEV"; rm -rf "$SCRATCH/dl"; }

att_nbdkit() { # nbdkit curl plugin + cache filter (cache-on-read) over kernel nbd, unix socket
    mkdir -p "$SCRATCH/nbdkit"
    rm -f /tmp/nbdkit.sock /tmp/nbdkit.pid
    TMPDIR=$SCRATCH/nbdkit nbdkit --unix /tmp/nbdkit.sock --pidfile /tmp/nbdkit.pid \
        --filter=cache curl "url=$URL/image.erofs" cache-on-read=true >/tmp/nbdkit.out 2>&1 ||
        { cat /tmp/nbdkit.out; return 1; }
    i=0
    while [ ! -s /tmp/nbdkit.pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    DPID=$(cat /tmp/nbdkit.pid 2>/dev/null)
    [ -n "$DPID" ] || return 1
    DEV=/dev/nbd0
    nbd-client -unix /tmp/nbdkit.sock $DEV -b 4096 -readonly >/tmp/nbd-client.out 2>&1 ||
        { cat /tmp/nbd-client.out; return 1; }
}
det_nbdkit() {
    nbd-client -d /dev/nbd0 >/dev/null 2>&1
    kill "$DPID" 2>/dev/null
    i=0
    while [ -d "/proc/$DPID" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    kill -9 "$DPID" 2>/dev/null
    rm -rf "$SCRATCH/nbdkit"
}

att_qemu() { # qcow2 overlay over the http image, copy-on-read, exported by qemu-nbd over kernel nbd
    mkdir -p "$SCRATCH/qemu"
    rm -f /tmp/qnbd.sock /tmp/qnbd.pid
    qemu-img create -q -f qcow2 -F raw -b "$URL/image.erofs" "$SCRATCH/qemu/overlay.qcow2" >/tmp/qemu-img.out 2>&1 ||
        { cat /tmp/qemu-img.out; return 1; }
    qemu-nbd --fork --pid-file=/tmp/qnbd.pid -k /tmp/qnbd.sock --image-opts \
        "driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=$SCRATCH/qemu/overlay.qcow2" \
        >/tmp/qemu-nbd.out 2>&1 || { cat /tmp/qemu-nbd.out; return 1; }
    DPID=$(cat /tmp/qnbd.pid 2>/dev/null)
    [ -n "$DPID" ] || return 1
    DEV=/dev/nbd1
    nbd-client -unix /tmp/qnbd.sock $DEV -b 4096 >/tmp/nbd-client.out 2>&1 ||
        { cat /tmp/nbd-client.out; return 1; }
}
det_qemu() {
    nbd-client -d /dev/nbd1 >/dev/null 2>&1
    i=0
    while [ -d "/proc/$DPID" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    kill -9 "$DPID" 2>/dev/null
    rm -rf "$SCRATCH/qemu"
}

LZ_ID=""
LZ_IMG=img # the image lazyblk attaches: $WWW/$LZ_IMG/manifest
att_lazyblk() { # lazyblk add <manifest URL> [ADD-ARGS...] with a fresh cache dir
    rm -rf "$SCRATCH/lazyblk"
    out=$(lazyblk add "$URL/$LZ_IMG/manifest" --cache-dir "$SCRATCH/lazyblk" "$@" 2>&1) || { echo "$out"; return 1; }
    DEV=$(echo "$out" | tail -n 1)
    [ -b "$DEV" ] || { echo "$out"; return 1; }
    LZ_ID=${DEV#/dev/ublkb}
    DPID=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "/run/lazyblk/$LZ_ID.json" 2>/dev/null | head -n 1)
}
det_lazyblk() { lazyblk del "$LZ_ID" >/dev/null 2>&1 || lazyblk del --all >/dev/null 2>&1; rm -rf "$SCRATCH/lazyblk"; }
# lazyblk that hands the image over to the kernel once it is complete (W4 only). lazyblk-ho: the
# loop stack (the default for erofs): the device is a loop device over /dev/ublkbN whose backing
# file becomes the cache file; lazyblk-hodm: --handover-via dm, /dev/mapper/lazyblk-<id>, which
# then maps a kernel loop device of the cache file. After the fill, W4 waits for the hand-over
# and runs fio on the device (no daemon).
att_lazyblk_ho() {
    rm -rf "$SCRATCH/lazyblk"
    out=$(lazyblk add "$URL/$LZ_IMG/manifest" --cache-dir "$SCRATCH/lazyblk" --hydrate --handover "$@" 2>&1) || { echo "$out"; return 1; }
    DEV=$(echo "$out" | tail -n 1)
    [ -b "$DEV" ] || { echo "$out"; return 1; }
    LZ_ID=$(grep -l "\"device\": \"$DEV\"" /run/lazyblk/*.json 2>/dev/null | head -n 1 | sed 's|.*/||; s|\.json$||')
    [ -n "$LZ_ID" ] || { echo "no device record names $DEV"; return 1; }
    DPID=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "/run/lazyblk/$LZ_ID.json" 2>/dev/null | head -n 1)
}
det_lazyblk_ho() { det_lazyblk; }
att_lazyblk_hodm() { att_lazyblk_ho --handover-via dm; }
det_lazyblk_hodm() { det_lazyblk; }
# wait_handover: until the record of $LZ_ID says handed-over and its daemon is gone (300 s)
wait_handover() {
    i=0
    while ! grep -q '"step": *"handed-over"' "/run/lazyblk/$LZ_ID.json" 2>/dev/null || [ -d "/proc/$DPID" ]; do
        i=$((i + 1))
        [ $i -lt 3000 ] || return 1
        sleep 0.1
    done
}
# lower DEV: what DEV reads: a dm device's slaves, a loop device's backing file
lower() {
    b=/sys/block/$(sysblock "$1")
    if [ -e "$b/loop/backing_file" ]; then cat "$b/loop/backing_file"; else ls "$b/slaves" | tr '\n' ,; fi
}
# sysblock DEV: its name under /sys/block (a /dev/mapper node is a dm-N)
sysblock() {
    case $1 in
    /dev/mapper/*)
        for d in /sys/block/dm-*; do
            [ "$(cat "$d/dm/name" 2>/dev/null)" = "${1#/dev/mapper/}" ] && { echo "${d##*/}"; return; }
        done ;;
    esac
    echo "${1#/dev/}"
}

# lazyblk on demand only (--no-prefetch): neither the image's metadata pack nor a published list
# is fetched ahead
att_lazyblk_od() { att_lazyblk --no-prefetch; }
det_lazyblk_od() { det_lazyblk; }

# lazyblk with trace prefetch: from the W1 run of plain lazyblk, the prefetch pack of the blocks
# it read (`lazyblk trace --pack`, served as img/prefetch.pack + its blob), the image's and the
# pack's digests pinned at add. lazyblk-pl: the chunk list of the same trace (`lazyblk trace`,
# served as img/prefetch), the form that needs neither a pack nor a pin.
PF_AVAILABLE=""
PF_REASON="no trace recorded yet (run the lazyblk system's w1 first)"
PACK_AVAILABLE=""
PACK_REASON="no trace recorded yet (run the lazyblk system's w1 first)"
att_lazyblk_pl() {
    [ -n "$PF_AVAILABLE" ] || { echo "$PF_REASON"; return 2; }
    cp "$WWW/img/prefetch.trace" "$WWW/img/prefetch"
    att_lazyblk
}
det_lazyblk_pl() {
    det_lazyblk
    rm -f "$WWW/img/prefetch"
}
att_lazyblk_pf() {
    [ -n "$PACK_AVAILABLE" ] || { echo "$PACK_REASON"; return 2; }
    cp "$SCRATCH/pack/prefetch.pack" "$SCRATCH/pack/prefetch.pack.blob" "$WWW/img/"
    att_lazyblk --digest "$IMG_DIGEST" --pack-digest "$PACK_DIGEST"
}
det_lazyblk_pf() {
    det_lazyblk
    rm -f "$WWW/img/prefetch.pack" "$WWW/img/prefetch.pack.blob"
}

# lazyblk on the image optimized with the same W1's block trace: `lazyblk trace --blocks`, then
# `lazyblk build image.erofs --pack-blocks` (in the guest, after that W1; not timed as part of
# any workload), served as img-opt/: the blocks W1 read travel in the pack, with the metadata.
OPT_AVAILABLE=""
OPT_REASON="no block trace recorded yet (run the lazyblk system's w1 first)"
att_lazyblk_opt() {
    [ -n "$OPT_AVAILABLE" ] || { echo "$OPT_REASON"; return 2; }
    LZ_IMG=img-opt
    att_lazyblk
    _rc=$?
    LZ_IMG=img
    return $_rc
}
det_lazyblk_opt() { det_lazyblk; }

record_trace() { # after lazyblk's W1: lazyblk trace <id> -o <file>, and the optimized image
    if ! lazyblk trace --help >/dev/null 2>&1; then
        PF_REASON="not available: this lazyblk has no 'trace' command"
        return 0
    fi
    if lazyblk trace "$LZ_ID" -o "$WWW/img/prefetch.trace" >/tmp/trace.out 2>&1 && [ -s "$WWW/img/prefetch.trace" ]; then
        PF_AVAILABLE=1
        say "trace recorded: $(wc -c <"$WWW/img/prefetch.trace") bytes"
    else
        PF_REASON="failed: lazyblk trace: $(tr '\n' ' ' </tmp/trace.out | cut -c1-200)"
    fi
    IMG_DIGEST=$(lazyblk status "$LZ_ID" --json 2>/dev/null | sed -n 's/.*"image": *"\(sha256:[0-9a-f]*\)".*/\1/p' | head -n 1)
    rm -rf "$SCRATCH/pack" && mkdir -p "$SCRATCH/pack"
    _t=$(now)
    if lazyblk trace "$LZ_ID" --pack -o "$SCRATCH/pack/prefetch.pack" >/tmp/trace.out 2>&1 && [ -n "$IMG_DIGEST" ]; then
        PACK_DIGEST=$(sed -n 's/^digest *//p' /tmp/trace.out)
        PACK_AVAILABLE=1
        echo "BENCHINFO sys=lazyblk-pf w=pack secs=$(sub "$_t" "$(now)") $(head -n 1 /tmp/trace.out)"
    else
        PACK_REASON="failed: lazyblk trace --pack (image ${IMG_DIGEST:-unknown}): $(tr '\n' ' ' </tmp/trace.out | cut -c1-200)"
    fi
    if ! lazyblk trace "$LZ_ID" --blocks -o /tmp/w1.blocks >/tmp/trace.out 2>&1; then
        OPT_REASON="failed: lazyblk trace --blocks: $(tr '\n' ' ' </tmp/trace.out | cut -c1-200)"
        return 0
    fi
    say "block trace: $(cat /tmp/trace.out)"
    _t=$(now)
    if lazyblk build "$WWW/image.erofs" -o "$WWW/img-opt" --chunk-kib "${BENCH_CHUNK_KIB:-128}" \
        --pack-blocks /tmp/w1.blocks >/tmp/build-opt.out 2>&1; then
        OPT_AVAILABLE=1
        echo "BENCHINFO sys=lazyblk-opt w=build secs=$(sub "$_t" "$(now)") $(grep -E '^(blob|metadata) ' /tmp/build-opt.out | tr '\n' ' ')"
    else
        OPT_REASON="failed: lazyblk build --pack-blocks: $(tr '\n' ' ' </tmp/build-opt.out | cut -c1-200)"
    fi
}

fn() { echo "$1" | tr '-' '_'; } # system name -> function suffix

# ------------------------------------------------------------------ workloads
w1() { (cd "$MNT" && xargs -0 cat </bench/w1.list >/dev/null); }
w2() { ls -lR "$MNT" >/dev/null; }
w3() { (cd "$MNT" && xargs -0 cat </bench/all.list >/dev/null); }
wlimit() { case $1 in w1) echo 300 ;; w2) echo 300 ;; *) echo 900 ;; esac; }

# net_stats N0: requests and body bytes nginx served since access-log line N0
net_stats() {
    tail -n +$(($1 + 1)) "$LOG" | awk '{ n++; b += $3; if ($5 == "HEAD") h++ } END { printf "reqs=%d bytes=%d heads=%d", n, b, h }'
}

lz_status() { # one-line JSON of lazyblk status, printed as BENCHJSON
    s=$(lazyblk status "$LZ_ID" --json 2>/dev/null | tr -d '\n ' )
    echo "BENCHJSON sys=$1 w=$2 round=$ROUND $s"
}

fail_run() { # fail_run SYS W REASON: report, and clean up whatever is left
    FAILED=1
    echo "BENCHFAIL sys=$1 w=$2 reason=$3"
}

# force_cleanup SYS: after a hang or a failure; a hung device is unblocked by killing its server
force_cleanup() {
    [ -n "$DPID" ] && kill -9 "$DPID" 2>/dev/null
    sleep 1
    case $1 in
    nbdkit) nbd-client -d /dev/nbd0 >/dev/null 2>&1 ;;
    qemu) nbd-client -d /dev/nbd1 >/dev/null 2>&1 ;;
    lazyblk*) lazyblk del --all >/dev/null 2>&1 ;;
    ublkloop*) rublk del -a >/dev/null 2>&1 ;;
    esac
    umount -l "$MNT" 2>/dev/null
    "det_$(fn "$1")" >/dev/null 2>&1
}

# timed SYS W LIMIT CMD...: runs CMD with a watchdog; on expiry the system's server is killed
# (which makes the blocked reads fail) and /tmp/hung is created. Returns CMD's status.
# BENCH_PERF="SYS:W ...": profile the daemon (DPID) during those workloads (diagnostics only).
PERF_PID=""
perf_start() {
    PERF_PID=""
    case " ${BENCH_PERF:-} " in *" $1:$2 "*) ;; *) return 0 ;; esac
    command -v perf >/dev/null && [ -n "$DPID" ] || { echo "BENCHINFO sys=$1 w=$2 perf: not available"; return 0; }
    perf record -e cpu-clock -F 499 -g -p "$DPID" -o /tmp/perf.data >/tmp/perf.out 2>&1 &
    PERF_PID=$!
    sleep 0.2
}
perf_stop() {
    [ -n "$PERF_PID" ] || return 0
    kill -INT "$PERF_PID" 2>/dev/null
    wait "$PERF_PID"
    for sort in comm dso,symbol; do
        perf report -i /tmp/perf.data --stdio --no-children --sort "$sort" -g none --percent-limit 0.5 2>/dev/null \
            | grep -v '^#' | grep . | head -n 60 | sed "s/^/BENCHPERF sys=$1 w=$2 sort=$sort /"
    done
    perf report -i /tmp/perf.data --stdio --children --sort symbol -g none --percent-limit 3 2>/dev/null \
        | grep -v '^#' | grep . | head -n 60 | sed "s/^/BENCHPERF sys=$1 w=$2 sort=children /"
    rm -f /tmp/perf.data
}

timed() {
    rm -f /tmp/hung
    _lim=$3
    _pid=$DPID
    _sys=$1
    (
        sleep "$_lim"
        echo hung >/tmp/hung
        [ -n "$_pid" ] && kill -9 "$_pid"
        sleep 1
        case $_sys in
        nbdkit) nbd-client -d /dev/nbd0 ;;
        qemu) nbd-client -d /dev/nbd1 ;;
        lazyblk*) lazyblk del --all ;;
        ublkloop*) rublk del -a ;;
        esac
    ) >/dev/null 2>&1 &
    _wd=$!
    shift 3
    "$@"
    _rc=$?
    kill "$_wd" 2>/dev/null
    return $_rc
}

fio_run() { # fio_run SYS KIND RW BS: one fio job on $DEV, one BENCH line
    out=$(fio --name="$2" --filename="$DEV" --rw="$3" --bs="$4" --iodepth=32 --direct=1 \
        --ioengine=libaio --runtime="$FIO_SECS" --ramp_time=1 --time_based --readonly \
        --output-format=terse --terse-version=3 2>/tmp/fio.err)
    if [ $? -ne 0 ] || [ -z "$out" ]; then
        fail_run "$1" "w4-$2" "fio failed: $(tr '\n' ' ' </tmp/fio.err | cut -c1-200)"
        return 1
    fi
    echo "$out" | awk -F';' -v s="$1" -v k="$2" -v d="$DEV" \
        -v r="$ROUND" '{ printf "BENCH sys=%s w=w4-%s round=%s dev=%s bw_kib=%s iops=%s lat_us=%s err=%s\n", s, k, r, d, $7, $8, $40, $5 }'
}

# cold SYS W [w4]: a cold run (fresh local cache, page cache dropped), timed from the start of
# the attach to the end of the workload. With "w4", W4 runs on the same instance afterwards:
# the rest of the device is read once (dd) so the image is fully present, then fio.
cold() {
    sys=$1 w=$2 then=${3:-}
    f=$(fn "$sys")
    DEV="" DPID="" LZ_ID=""
    drop_caches
    n0=$(wc -l <"$LOG")
    t0=$(now)
    "att_$f" >/tmp/att.out 2>&1
    arc=$?
    ta=$(now)
    if [ $arc -ne 0 ]; then
        reason=$(tr '\n' ' ' </tmp/att.out | cut -c1-240)
        if [ $arc -eq 2 ]; then
            echo "BENCHNA sys=$sys w=$w reason=$reason"
        else
            fail_run "$sys" "$w" "attach failed: $reason"
        fi
        force_cleanup "$sys"
        return 1
    fi
    if ! mount -t erofs -o ro "$DEV" "$MNT" 2>/tmp/mount.out; then
        fail_run "$sys" "$w" "mount -t erofs $DEV failed: $(tr '\n' ' ' </tmp/mount.out)"
        force_cleanup "$sys"
        return 1
    fi
    t1=$(now)
    own_start "$DPID"
    q=/sys/block/$(sysblock "$DEV")/queue
    echo "BENCHINFO sys=$sys w=$w queue: $DEV read_ahead_kb=$(cat "$q/read_ahead_kb") max_sectors_kb=$(cat "$q/max_sectors_kb") logical_block_size=$(cat "$q/logical_block_size") nr_requests=$(cat "$q/nr_requests") scheduler=$(tr -d '\n' <"$q/scheduler")"
    if [ "$w" != none ]; then
        perf_start "$sys" "$w"
        timed "$sys" "$w" "$(wlimit "$w")" "$w"
        wrc=$?
        t2=$(now)
        perf_stop "$sys" "$w"
        if [ -f /tmp/hung ]; then
            fail_run "$sys" "$w" "hung: $w did not finish in $(wlimit "$w") s (server killed)"
            force_cleanup "$sys"
            return 1
        fi
        if [ $wrc -ne 0 ]; then
            fail_run "$sys" "$w" "$w exited with status $wrc (read errors)"
            force_cleanup "$sys"
            return 1
        fi
        echo "BENCH sys=$sys w=$w round=$ROUND total=$(sub "$t0" "$t2") attach=$(sub "$t0" "$t1") add=$(sub "$t0" "$ta") work=$(sub "$t1" "$t2") hwm_kib=$(hwm "$DPID") own_kib=$(own_peak) cpu_s=$(cpu "$DPID") $(net_stats "$n0")"
        case $sys in lazyblk*) lz_status "$sys" "$w"; smaps_top "$sys" "$w" "$DPID" ;; esac
        if [ "$sys" = lazyblk ] && [ "$w" = w1 ] && [ -z "$PF_AVAILABLE" ]; then record_trace; fi
        if [ "$sys" = lazyblk-pf ] || [ "$sys" = lazyblk-pl ]; then
            _f=/img/prefetch
            [ "$sys" = lazyblk-pf ] && _f=/img/prefetch.pack
            pf=$(tail -n +$((n0 + 1)) "$LOG" | awk -v f="$_f" '$6 == f { print $2; exit }')
            echo "BENCH sys=$sys w=$w-prefetch-file round=$ROUND status=${pf:-not-requested}"
        fi
    fi
    umount "$MNT" || { fail_run "$sys" "$w" "umount failed"; force_cleanup "$sys"; return 1; }
    if [ "$then" = w4 ]; then
        n1=$(wc -l <"$LOG")
        t3=$(now)
        timed "$sys" w4 900 dd if="$DEV" of=/dev/null bs=1M 2>/tmp/dd.err
        drc=$?
        if [ -f /tmp/hung ] || [ $drc -ne 0 ]; then
            fail_run "$sys" w4 "reading the whole device failed or hung: $(tr '\n' ' ' </tmp/dd.err | cut -c1-200)"
            force_cleanup "$sys"
            return 1
        fi
        echo "BENCH sys=$sys w=w4-fill round=$ROUND secs=$(sub "$t3" "$(now)") hwm_kib=$(hwm "$DPID") own_kib=$(own_peak) cpu_s=$(cpu "$DPID") $(net_stats "$n1")"
        case $sys in lazyblk*) lz_status "$sys" w4-fill ;; esac
        if [ "$sys" = lazyblk-ho ] || [ "$sys" = lazyblk-hodm ]; then
            t4=$(now)
            if ! wait_handover; then
                fail_run "$sys" w4 "no hand-over within 300 s of the fill: $(tr '\n' ' ' <"/run/lazyblk/$LZ_ID.json" 2>/dev/null | cut -c1-300)"
                force_cleanup "$sys"
                return 1
            fi
            echo "BENCH sys=$sys w=w4-handover round=$ROUND secs=$(sub "$t4" "$(now)") reads=$(lower "$DEV") daemons=$(pidof lazyblk | wc -w)"
        fi
        drop_caches
        fio_run "$sys" rand4k randread 4k
        fio_run "$sys" seq1m read 1m
        echo "BENCH sys=$sys w=w4-rss round=$ROUND hwm_kib=$(hwm "$DPID") own_kib=$(own_peak) cpu_s=$(cpu "$DPID")"
        smaps_top "$sys" w4 "$DPID"
    fi
    own_stop
    "det_$f" >/tmp/det.out 2>&1 || say "WARNING: detach of $sys failed: $(tr '\n' ' ' </tmp/det.out)"
    return 0
}

has() { case " $2 " in *" $1 "*) return 0 ;; esac; return 1; }
# W4 needs only one instance per device path: download is a kernel loop device like loop, and
# lazyblk-pf is the same daemon as lazyblk.
w4_systems="loop ublkloop ublkloop-a nbdkit qemu lazyblk"  # (lazyblk-od, -pl, -pf, -opt: the same daemon)
w4_only="lazyblk-ho lazyblk-hodm" # W4 alone: its cold runs would be lazyblk's

# ------------------------------------------------------------------ run
say "systems: $SYSTEMS; workloads: $WORKLOADS; image $IMAGE_BYTES bytes, blob $BLOB_BYTES bytes"
echo "BENCH sys=image w=info image_bytes=$IMAGE_BYTES blob_bytes=$BLOB_BYTES files=$(tr -cd '\0' </bench/all.list | wc -c) w1_files=$(tr -cd '\0' </bench/w1.list | wc -c)"
# Warm-up (not reported): the first cold run after the setup was up to 2x slower than later
# runs of the same system (the guest settling after the 400 MiB copy to tmpfs).
say "---- warm-up: loop w1 (not reported)"
cold loop w1 | sed 's/^BENCH sys=loop /BENCH sys=warmup /'

# Rounds: every round runs every workload on every system once; even rounds take the systems in
# reverse order (the W1 trace for lazyblk-pf comes from lazyblk's W1 of round 1).
rev() { r=""; for x in $1; do r="$x $r"; done; echo $r; }
while [ "$ROUND" -le "$ROUNDS" ]; do
    order=$SYSTEMS
    [ $((ROUND % 2)) -eq 0 ] && order=$(rev "$SYSTEMS")
    for w in w1 w2 w3; do
        has "$w" "$WORKLOADS" || continue
        for sys in $order; do
            if has "$sys" "$w4_only"; then
                if [ "$w" = w3 ] && has w4 "$WORKLOADS"; then
                    say "---- round $ROUND: $sys w4"
                    cold "$sys" none w4
                fi
                continue
            fi
            say "---- round $ROUND: $sys $w"
            if [ "$w" = w3 ] && has w4 "$WORKLOADS" && has "$sys" "$w4_systems"; then
                cold "$sys" w3 w4
            else
                cold "$sys" "$w"
            fi
        done
    done
    if has w4 "$WORKLOADS" && ! has w3 "$WORKLOADS"; then
        for sys in $order; do
            has "$sys" "$w4_systems" || has "$sys" "$w4_only" || continue
            say "---- round $ROUND: $sys w4"
            cold "$sys" none w4
        done
    fi
    ROUND=$((ROUND + 1))
done
say "done at $(now) s; nginx served $(wc -l <"$LOG") requests"
tail -n 20 /var/log/lazyblk/lazyblk.log 2>/dev/null | sed 's/^/lazyblk-log: /'
[ $FAILED -eq 0 ]
