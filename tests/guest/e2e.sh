# Guest: the end-to-end suite of issue 3 (ublk device, erofs + overlay, lazy loading, two
# devices, del, re-add). Data: /www/img1, /www/img2 (built on the host), /expected/*.txt.
. /guest/lib.sh
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
start_nginx /www 8080
BLOB1_SIZE=$(wc -c < /www/img1/blob)

step "add image 1"
# --no-prefetch: this suite checks pure on-demand loading; the image's metadata pack (fetched
# first by default) is checked in the policies suite.
DEV1=$(lazyblk add http://127.0.0.1:8080/img1/manifest --no-prefetch) || die "lazyblk add"
echo "device: $DEV1"
check "add printed a ublk block device" test -b "$DEV1"
mkdir -p /mnt/img1
mount -t erofs -o ro "$DEV1" /mnt/img1 || die "mount erofs"
ok "erofs mounted from $DEV1"

step "lazy: reading a few small files fetches a small fraction"
cat /mnt/img1/small/d3/f10.txt /mnt/img1/deep/level0/level1/level2/level3/level4/level5/level6/level7/level8/level9/level10/level11/level12/level13/level14/level15/level16/level17/level18/level19/level20/level21/level22/level23/bottom.txt > /dev/null
ls -l /mnt/img1/large > /dev/null
SMALL=$(served_bytes 8080 /img1/blob)
echo "blob bytes served after a few small reads: $SMALL of $BLOB1_SIZE"
check "a small read fetched under 25% of the blob" [ $((SMALL * 4)) -lt "$BLOB1_SIZE" ]

step "metrics: the device's socket shows counters that move and match status"
ID1=${DEV1#/dev/ublkb}
MS=/run/lazyblk/$ID1.metrics.sock
m() { lazyblk-testkit scrape "$MS" --value "$@"; }
js() { lazyblk status "$ID1" --json | tr -d ' \n' | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
check "metrics socket is 0600" [ "$(stat -c %a "$MS")" = 600 ]
check "control socket is 0600" [ "$(stat -c %a "/run/lazyblk/$ID1.sock")" = 600 ]
if lazyblk-testkit scrape "$MS" --as-uid 65534 > /dev/null 2> /tmp/err.txt; then die "a non-root user scraped the metrics socket"; fi
check "a non-root user cannot connect to the metrics socket" grep -q "Permission denied" /tmp/err.txt
if lazyblk-testkit scrape "/run/lazyblk/$ID1.sock" --as-uid 65534 > /dev/null 2> /tmp/err.txt; then die "a non-root user reached the control socket"; fi
check "nor to the control socket" grep -q "Permission denied" /tmp/err.txt
mis0=$(m lazyblk_misses_total); by0=$(m lazyblk_fetched_bytes_total)
# A read in progress (the large files: many chunks), scraped while it runs.
cat /mnt/img1/large/* > /dev/null &
READER=$!
sleep 0.3
mis1=$(m lazyblk_misses_total); by1=$(m lazyblk_fetched_bytes_total)
wait $READER
mis2=$(m lazyblk_misses_total); by2=$(m lazyblk_fetched_bytes_total)
echo "misses $mis0 -> $mis1 (reading) -> $mis2; bytes fetched $by0 -> $by1 -> $by2"
check "misses and bytes fetched moved with the read" [ "$mis2" -gt "$mis0" ] && [ "$by2" -gt "$by0" ] && [ "$mis1" -le "$mis2" ] && [ "$by1" -le "$by2" ] && [ "$by1" -ge "$by0" ]
same=no
for i in 1 2 3 4 5; do
    sm=$(js misses); sb=$(js bytes_fetched); sh=$(js hits)
    pm=$(m lazyblk_misses_total); pb=$(m lazyblk_fetched_bytes_total); ph=$(m lazyblk_hits_total)
    if [ "$sm $sb" = "$pm $pb" ] && [ "$sh" -le "$ph" ]; then same=yes; break; fi
    sleep 0.5
done
echo "status: misses $sm bytes $sb hits $sh; metrics: misses $pm bytes $pb hits $ph"
check "after the read, the metrics equal lazyblk status" [ $same = yes ]
po=$(m lazyblk_origin_fetched_bytes_total --label origin=http://127.0.0.1:8080 --label mirror=false)
check "bytes fetched are counted under their origin" [ "$po" = "$pb" ]
check "the latency histogram counts every request" [ "$(m lazyblk_fetch_duration_seconds_count)" = "$(js requests)" ]
lazyblk metrics > /tmp/host-metrics.txt || die "lazyblk metrics"
check "lazyblk metrics shows the device, up" [ "$(lazyblk-testkit scrape - --value lazyblk_up --label device="$ID1" < /tmp/host-metrics.txt)" = 1 ]
check "and host totals" [ "$(lazyblk-testkit scrape - --value lazyblk_host_misses_total < /tmp/host-metrics.txt)" -ge "$pm" ]
lazyblk metrics --listen unix:/run/lazyblk/host-metrics.sock 2> /dev/null &
HOSTM=$!
i=0; while [ ! -S /run/lazyblk/host-metrics.sock ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
check "lazyblk metrics --listen serves the host's metrics" [ "$(lazyblk-testkit scrape /run/lazyblk/host-metrics.sock --value lazyblk_host_devices --label state=up)" -ge 1 ]
kill $HOSTM

step "every file and all metadata match the source"
lazyblk-testkit digest-tree /mnt/img1 > /tmp/got1.txt
if ! diff /expected/img1.txt /tmp/got1.txt; then die "tree 1 differs from the source"; fi
ok "tree 1: sha256 of every file, modes, sizes, link targets, hardlinks, xattrs match"
lazyblk list
lazyblk status "${DEV1#/dev/ublkb}" | tee /tmp/status1.txt
# The attach, step by step: status shows it, and the steps add up to at most the total.
check "status shows the attach time per step" grep -q "^attach  *[0-9]* ms (.* ms each)$" /tmp/status1.txt
lazyblk status "${DEV1#/dev/ublkb}" --json | tr -d ' \n' > /tmp/status1.json
aj() { sed -n "s/.*\"attach\":{[^}]*\"$1\":\([0-9]*\).*/\1/p" /tmp/status1.json; }
sum=0
for k in exec_ms lazy_ms setup_ms client_ms manifest_ms cache_dir_ms probe_ms pack_probe_ms presence_ms start_ms prepare_ms device_ms; do
    v=$(aj $k)
    [ -n "$v" ] || die "status --json has no attach.$k"
    sum=$((sum + v))
done
tot=$(aj total_ms)
echo "attach: total ${tot} ms, steps ${sum} ms"
check "the attach steps add up to at most the total ($sum <= $tot ms, and the total is not 0)" [ "$sum" -le "$tot" -a "$tot" -gt 0 ]
FULL=$(served_bytes 8080 /img1/blob)
echo "blob bytes served after reading everything: $FULL of $BLOB1_SIZE"

step "overlay on top accepts writes, renames and deletes"
mkdir -p /tmp/ov/upper /tmp/ov/work /mnt/merged
mount -t overlay overlay -o lowerdir=/mnt/img1,upperdir=/tmp/ov/upper,workdir=/tmp/ov/work /mnt/merged || die "mount overlay"
echo "new data" > /mnt/merged/small/d0/new.txt
echo "appended" >> /mnt/merged/large/text.txt
mv /mnt/merged/small/d1/f0.txt /mnt/merged/small/d1/renamed.txt
rm /mnt/merged/small/d2/f1.txt
rm -r /mnt/merged/deep
check "new file readable" grep -q "new data" /mnt/merged/small/d0/new.txt
check "append visible" sh -c 'tail -n 1 /mnt/merged/large/text.txt | grep -q appended'
check "rename visible" test -f /mnt/merged/small/d1/renamed.txt -a ! -e /mnt/merged/small/d1/f0.txt
check "delete visible" test ! -e /mnt/merged/small/d2/f1.txt -a ! -e /mnt/merged/deep
check "lower layer untouched" test -f /mnt/img1/small/d1/f0.txt -a -d /mnt/img1/deep
umount /mnt/merged

step "two devices from two images at once"
DEV2=$(lazyblk add http://127.0.0.1:8080/img2/manifest --queues 1 --depth 16) || die "add image 2"
check "second device differs" [ "$DEV1" != "$DEV2" ]
mkdir -p /mnt/img2
mount -t erofs -o ro "$DEV2" /mnt/img2 || die "mount image 2"
lazyblk-testkit digest-tree /mnt/img2 > /tmp/got2.txt
if ! diff /expected/img2.txt /tmp/got2.txt; then die "tree 2 differs"; fi
ok "tree 2 matches while tree 1 is mounted"
lazyblk-testkit digest-tree /mnt/img1 > /tmp/got1b.txt
check "tree 1 still matches" cmp -s /expected/img1.txt /tmp/got1b.txt
lazyblk list | tee /tmp/list.txt
check "list shows both devices live" [ "$(grep -c ' live' /tmp/list.txt)" -eq 2 ]

step "status counts each read once: a miss is not also a hit"
DEV3=$(lazyblk add http://127.0.0.1:8080/img2/manifest --cache-dir /tmp/c-count --no-prefetch --readahead 0) || die "add (counting)"
ID3=${DEV3#/dev/ublkb}
sleep 1 # the kernel's partition scan at device creation reads too
st() { lazyblk status "$ID3" --json | tr -d ' \n' | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"; }
# Each direct 4 KiB read is one IO: it must count as exactly one hit or one miss (zero chunks
# are always present, so a cold read may be a hit), and reading it again is a hit.
cold_misses=0
for off in 524288 1572864 2621440; do
    h0=$(st hits); m0=$(st misses)
    lazyblk-testkit par-read "$DEV3" $off > /dev/null || die "direct read at $off"
    h1=$(st hits); m1=$(st misses)
    lazyblk-testkit par-read "$DEV3" $off > /dev/null || die "direct read again at $off"
    h2=$(st hits); m2=$(st misses)
    echo "read at $off: hits/misses $h0/$m0 -> $h1/$m1 -> again $h2/$m2"
    [ $((h1 - h0 + m1 - m0)) -eq 1 ] || die "the cold read at $off counted $((h1 - h0)) hits and $((m1 - m0)) misses"
    [ $((h2 - h1)) -eq 1 ] && [ $((m2 - m1)) -eq 0 ] || die "the second read at $off was not one hit"
    cold_misses=$((cold_misses + m1 - m0))
done
check "every read counted once (as a hit or a miss), $cold_misses of the 3 cold reads missed" [ $cold_misses -ge 1 ]
lazyblk status "$ID3" | grep "^time " | tee /tmp/time.txt
check "status splits the misses' time: the reads waited, the requests took time" test "$(st miss_wait_us_total)" -gt 0 -a "$(st network_us_total)" -gt 0
lazyblk del "$ID3" > /dev/null

step "errors are one clear line"
if lazyblk status 99 2> /tmp/err.txt; then die "status of an unknown device succeeded"; fi
cat /tmp/err.txt
check "unknown device id named" grep -q "no ublk device with id 99" /tmp/err.txt
check "one line" [ "$(wc -l < /tmp/err.txt)" -eq 1 ]
if lazyblk add http://127.0.0.1:8080/nothing/manifest 2> /tmp/err.txt; then die "add of a missing image succeeded"; fi
cat /tmp/err.txt
check "unreachable image named" grep -q "cannot read the manifest.*404" /tmp/err.txt
if lazyblk add http://127.0.0.1:8080/img1/manifest --id "${DEV2#/dev/ublkb}" 2> /tmp/err.txt; then die "add with a taken id succeeded"; fi
cat /tmp/err.txt
check "taken id named" grep -q "ublk device id ${DEV2#/dev/ublkb} is already taken" /tmp/err.txt

step "unmount and del leave no device behind"
umount /mnt/img1
umount /mnt/img2
lazyblk del "${DEV1#/dev/ublkb}" || die "del 1"
lazyblk del --all || die "del --all"
sleep 0.5
check "no /dev/ublkb* left" no_ublk_devices
check "list is empty" [ "$(lazyblk list | wc -l)" -eq 1 ]

step "re-add after del fetches nothing already present"
BEFORE=$(served_requests 8080 /img1/blob)
# (--no-prefetch as at the first add: the pack frames no read needed were never fetched, and a
# default add would fetch them now)
DEV1=$(lazyblk add http://127.0.0.1:8080/img1/manifest --no-prefetch) || die "re-add"
mount -t erofs -o ro "$DEV1" /mnt/img1 || die "remount"
lazyblk-testkit digest-tree /mnt/img1 > /tmp/got1c.txt
check "tree 1 matches after re-add" cmp -s /expected/img1.txt /tmp/got1c.txt
AFTER=$(served_requests 8080 /img1/blob)
echo "blob range requests before re-add: $BEFORE, after a full read: $AFTER"
check "no blob range requests after re-add" [ "$AFTER" -eq "$BEFORE" ]
umount /mnt/img1
lazyblk del --all
check "clean at the end" no_ublk_devices
summary
