# Guest: a corrupt or hostile remote (issue 4, item 4). One fault server (lazyblk-testkit serve)
# serves /www; faults are set at run time through its /__fault/<fault>/<count> endpoint and hit
# range requests for img1's blob. Bad bytes are detected, retried within limits, never served,
# never cached; memory stays bounded; permanent faults fail clearly.
. /guest/lib.sh
FILE=large/random.bin
WANT=$(sed -n "s|^$FILE: file size=[0-9]* sha256=\([0-9a-f]*\) .*|\1|p" /expected/img1.txt)
[ -n "$WANT" ] || die "no expected digest for $FILE"
mkdir -p /mnt/h
rm -f /tmp/port
lazyblk-testkit serve /www --target img1/blob --port-file /tmp/port &
SRV=$!
i=0; while [ ! -s /tmp/port ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
PORT=$(cat /tmp/port)
URL=http://127.0.0.1:$PORT/img1/manifest
fault() { wget -q -O /dev/null "http://127.0.0.1:$PORT/__fault/$1/$2" || die "setting fault $1"; }

daemon_hwm_kib() { # peak RSS of the daemon of device $1
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "/run/lazyblk/$1.json")
    awk '/VmHWM/ { print $2 }' "/proc/$pid/status"
}
verify_caches() { for vc_dir in "$1"/*/; do lazyblk verify-cache "$vc_dir" || return 1; done; }
retries() { sed -n 's/^requests.*(\([0-9]*\) retries)/\1/p' /tmp/st.txt; }

recovers() { # recovers NAME FAULT COUNT: transient faults; the read succeeds with the right bytes
    step "$1: $3 x $2"
    cache=/tmp/hc-$1; rm -rf "$cache"
    fault none 0
    DEV=$(lazyblk add "$URL" --cache-dir "$cache" --http-timeout 3 --readahead 0) || die "$1: add"
    mount -t erofs -o ro "$DEV" /mnt/h || die "$1: mount"
    ls -lR /mnt/h > /dev/null # metadata first, without faults
    fault "$2" "$3"
    GOT=$(sha256sum /mnt/h/$FILE | cut -d' ' -f1) || die "$1: read failed"
    check "$1: bytes read are the original ones" [ "$GOT" = "$WANT" ]
    id=${DEV#/dev/ublkb}
    lazyblk status "$id" > /tmp/st.txt
    check "$1: the faults were retried ($(retries) retries)" [ "$(retries)" -ge "$3" ]
    hwm=$(daemon_hwm_kib "$id")
    check "$1: daemon peak RSS ${hwm} KiB < 64 MiB" [ "$hwm" -lt 65536 ]
    umount /mnt/h
    lazyblk del "$id" > /dev/null
    check "$1: every chunk the cache claims is verified" verify_caches "$cache"
}

step "many concurrent misses on one queue do not serialize"
fault none 0
DEV=$(lazyblk add "$URL" --cache-dir /tmp/hc-par --queues 1 --depth 64 --readahead 0) || die "add"
sleep 1 # let the kernel's partition scan finish before the slow server starts
fault delay300 0
lazyblk-testkit par-read "$DEV" $(for i in $(seq 0 15); do echo $((i * 1048576 + 28672)); done) \
    || die "parallel reads failed"
MAX=$(wget -q -O- "http://127.0.0.1:$PORT/__stats" | sed -n 's/.*max_in_flight=\([0-9]*\).*/\1/p')
check "16 parallel misses on one queue reached the server at once (max in flight: $MAX)" [ "$MAX" -ge 4 ]
lazyblk del "${DEV#/dev/ublkb}" > /dev/null

recovers status500 status500 3
recovers status503 status503 2
recovers reset reset 3
recovers truncate truncate 3
recovers wrong-range wrong-range 2
recovers too-long too-long 2
recovers huge huge 2
recovers hang hang 1
recovers flipped flip 2
check "flipped bytes were logged as digest mismatches" grep -q "digest mismatch" /var/log/lazyblk/lazyblk.log

step "a remote that always corrupts: reads fail with EIO, nothing bad is cached"
cache=/tmp/hc-always; rm -rf "$cache"
fault none 0
DEV=$(lazyblk add "$URL" --cache-dir "$cache" --readahead 0 --io-deadline 30) || die "add"
mount -t erofs -o ro "$DEV" /mnt/h || die "mount"
ls -lR /mnt/h > /dev/null
fault flip 0
if cat /mnt/h/$FILE > /dev/null 2> /tmp/err.txt; then die "a corrupt chunk was served"; fi
cat /tmp/err.txt
check "the reader saw an IO error" grep -qi "Input/output error" /tmp/err.txt
check "the daemon log names the digest mismatch" grep -q "failed verification: digest mismatch" /var/log/lazyblk/lazyblk.log
umount /mnt/h
lazyblk del "${DEV#/dev/ublkb}" > /dev/null
check "nothing bad was cached" verify_caches "$cache"
step "the same cache with a healed server: the file reads right"
fault none 0
DEV=$(lazyblk add "$URL" --cache-dir "$cache") || die "re-add"
mount -t erofs -o ro "$DEV" /mnt/h || die "mount"
GOT=$(sha256sum /mnt/h/$FILE | cut -d' ' -f1)
check "correct after the remote heals" [ "$GOT" = "$WANT" ]
umount /mnt/h; lazyblk del "${DEV#/dev/ublkb}" > /dev/null

step "permanent faults fail add with one clear line"
for f in ignore-range redirect-offhost; do
    fault "$f" 0
    if lazyblk add "$URL" --cache-dir /tmp/hc-perm 2> /tmp/err.txt; then die "$f: add succeeded"; fi
    cat /tmp/err.txt
    check "$f: one line" [ "$(wc -l < /tmp/err.txt)" -eq 1 ]
    case $f in
        ignore-range) check "$f: says ranges are unsupported" grep -q "does not support range requests" /tmp/err.txt ;;
        redirect-offhost) check "$f: says it refused the redirect" grep -q "refusing a redirect to another host" /tmp/err.txt ;;
    esac
done
kill "$SRV" 2>/dev/null || true
check "no device left behind" no_ublk_devices
summary
