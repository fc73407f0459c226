# Guest: fetch policies and cache management: trace -> prefetch list, hydration (then no network
# needed), export, a cache limit with eviction, a host cache limit over two devices, gc.
. /guest/lib.sh
start_nginx /www 8080
URL=http://127.0.0.1:8080/img1/manifest
mkdir -p /mnt/p
status_json() { lazyblk status "$1" --json; }
field() { sed -n "s/.*\"$2\": *\([0-9a-z]*\).*/\1/p" "$1"; }
wait_background() { # wait_background ID: until the prefetch list is done (30 s at most); status in /tmp/s.json
    i=0
    while status_json "$1" > /tmp/s.json && [ "$(field /tmp/s.json background_done)" != true ] && [ $i -lt 300 ]; do
        sleep 0.1; i=$((i + 1))
    done
}
subset() { # the "container start" subset: a fixed tenth of the small files
    for f in /mnt/p/small/d*/f1*.txt; do cat "$f"; done > /dev/null
}

subset_from_the_pack() { # subset_from_the_pack DEV: mount DEV (its background work done, status
    # in /tmp/s.json), run the subset, check that it needed neither a miss nor a chunk
    BEFORE=$(field /tmp/s.json misses); C0=$(field /tmp/s.json chunks_fetched)
    mount -t erofs -o ro "$1" /mnt/p || die "mount"
    subset
    status_json "${1#/dev/ublkb}" > /tmp/s.json
    echo "misses during mount + the workload: $(( $(field /tmp/s.json misses) - BEFORE )), chunks fetched: $(( $(field /tmp/s.json chunks_fetched) - C0 ))"
    check "mount + the workload ran without a single miss" [ "$(field /tmp/s.json misses)" -eq "$BEFORE" ]
    check "and without fetching a chunk: every block came in the pack" [ "$(field /tmp/s.json chunks_fetched)" -eq "$C0" ]
}

step "the metadata pack: after it, listing the whole tree needs no fetch"
check "lazyblk build wrote no prefetch list of its own" [ ! -e /www/img1/prefetch ]
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-meta) || die "add"
ID=${DEV#/dev/ublkb}
wait_background "$ID"
check "metadata pack prefetch finished" [ "$(field /tmp/s.json background_done)" = true ]
BEFORE=$(field /tmp/s.json misses)
P=$(field /tmp/s.json present_chunks); T=$(field /tmp/s.json total_chunks)
F=$(field /tmp/s.json pack_frames); FP=$(field /tmp/s.json pack_frames_present)
C=$(field /tmp/s.json chunks_fetched)
echo "after the pack: $FP of $F pack frames, $P of $T chunks present, $C chunks fetched"
check "the image has a metadata pack, all of it present" [ "$F" -gt 0 -a "$FP" -eq "$F" ]
# (the kernel's partition scan at device creation reads the last blocks: a chunk or two)
check "the pack brought in no chunks of the image" [ "$C" -le 4 ]
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
ls -lR /mnt/p > /dev/null
status_json "$ID" > /tmp/s.json
echo "misses during mount + ls -lR: $(( $(field /tmp/s.json misses) - BEFORE ))"
check "mount + ls -lR of the whole tree ran without a single miss" [ "$(field /tmp/s.json misses)" -eq "$BEFORE" ]
umount /mnt/p; lazyblk del "$ID" > /dev/null

step "trace what a workload reads"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-trace) || die "add"
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
subset
lazyblk trace "${DEV#/dev/ublkb}" -o /tmp/prefetch || die "trace"
umount /mnt/p; lazyblk del "${DEV#/dev/ublkb}" > /dev/null
check "a non-empty prefetch list was written" [ "$(wc -c < /tmp/prefetch)" -gt 44 ]
cp /tmp/prefetch /www/img1/prefetch

step "a cold add with the published list: the workload needs no fetch of its own"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-prefetch) || die "add"
ID=${DEV#/dev/ublkb}
wait_background "$ID"
check "prefetch finished" [ "$(field /tmp/s.json background_done)" = true ]
check "prefetched chunks counted" [ "$(field /tmp/s.json background_chunks)" -gt 0 ]
BEFORE=$(field /tmp/s.json misses) # the kernel's partition scan at device creation may race the prefetch
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
subset
status_json "$ID" > /tmp/s.json
echo "misses during mount + the traced workload: $(( $(field /tmp/s.json misses) - BEFORE ))"
check "mount + the traced workload ran without a single miss" [ "$(field /tmp/s.json misses)" -eq "$BEFORE" ]
umount /mnt/p; lazyblk del "$ID" > /dev/null

step "trace --blocks, rebuild with --pack-blocks: the workload's blocks arrive with the pack"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-blocks) || die "add"
ID=${DEV#/dev/ublkb}
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
subset
lazyblk trace "$ID" --blocks -o /tmp/blocks || die "trace --blocks"
umount /mnt/p
lazyblk export "$ID" /tmp/img1.raw > /dev/null || die "export"
lazyblk del "$ID" > /dev/null
lazyblk build /tmp/img1.raw -o /www/img1opt --chunk-kib 64 --pack-blocks /tmp/blocks > /tmp/build.txt || die "build --pack-blocks"
cat /tmp/build.txt
check "the rebuilt pack holds the traced data blocks" grep -q "more from --pack-blocks" /tmp/build.txt
DEV=$(lazyblk add http://127.0.0.1:8080/img1opt/manifest --cache-dir /tmp/c-opt) || die "add the rebuilt image"
ID=${DEV#/dev/ublkb}
wait_background "$ID"
subset_from_the_pack "$DEV"
umount /mnt/p; lazyblk del "$ID" > /dev/null
rm -rf /www/img1opt /tmp/img1.raw /tmp/c-opt /tmp/c-blocks

step "trace --pack: the workload's blocks come in a prefetch pack next to the unchanged image"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-tp) || die "add"
ID=${DEV#/dev/ublkb}
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
subset
mkdir -p /tmp/tp
lazyblk trace "$ID" --pack -o /tmp/tp/prefetch.pack > /tmp/tp.txt || die "trace --pack"
cat /tmp/tp.txt
IMG=$(status_json "$ID" | sed -n 's/.*"image": *"\(sha256:[0-9a-f]*\)".*/\1/p')
PD=$(sed -n 's/^digest *//p' /tmp/tp.txt)
umount /mnt/p; lazyblk del "$ID" > /dev/null
check "a pack and its blob were written, and the pack's digest printed" [ -s /tmp/tp/prefetch.pack -a -s /tmp/tp/prefetch.pack.blob -a -n "$PD" ]
# Published next to the manifest (where the chunk list of the earlier step still is).
check "the chunk list is still published" [ -s /www/img1/prefetch ]
cp /tmp/tp/prefetch.pack /tmp/tp/prefetch.pack.blob /www/img1/
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-tp2 --digest "$IMG" --pack-digest "$PD") || die "add with the pack pinned"
ID=${DEV#/dev/ublkb}
wait_background "$ID"
check "the pinned pack is in use" grep -q "\"prefetch_pack\": *\"$PD\"" /tmp/s.json
F=$(field /tmp/s.json pack_frames)
check "all of its frames arrived" [ "$F" -gt 0 -a "$(field /tmp/s.json pack_frames_present)" -eq "$F" ]
# (the kernel's partition scan at device creation reads the last blocks: a chunk or two)
check "the chunk list was not fetched ahead: the pack supersedes it" [ "$(field /tmp/s.json chunks_fetched)" -le 4 ]
subset_from_the_pack "$DEV"
# A crashed daemon's successor (which pins the manifest) keeps the pack and its frames.
P0=$(daemon_pid "$ID")
kill -9 "$P0"
wait_for 10 "daemon $P0 to die" pid_gone "$P0"
lazyblk recover "$ID" > /tmp/recover.out 2>&1 || { cat /tmp/recover.out; die "recover"; }
status_json "$ID" > /tmp/s.json
check "the recovered daemon uses the same pack" grep -q "\"prefetch_pack\": *\"$PD\"" /tmp/s.json
check "with every frame still present" [ "$(field /tmp/s.json pack_frames_present)" -eq "$F" ]
lazyblk-testkit digest-tree /mnt/p > /tmp/got.txt
check "the whole tree reads right" cmp -s /expected/img1.txt /tmp/got.txt
umount /mnt/p; lazyblk del "$ID" > /dev/null
for d in /tmp/c-tp2/*/; do lazyblk verify-cache "$d" || die "verify-cache with a prefetch pack"; done
ok "verify-cache checks the cache kept with a prefetch pack"
# A pin the published pack does not have: one clear line naming it, no device.
if lazyblk add "$URL" --cache-dir /tmp/c-tp3 --pack-digest sha256:0000000000000000000000000000000000000000000000000000000000000000 > /tmp/add.out 2>&1; then
    die "add with a wrong --pack-digest succeeded"
fi
cat /tmp/add.out
check "a wrong --pack-digest is refused, naming the prefetch pack" grep -q "prefetch pack.*--pack-digest asks for" /tmp/add.out
rm -f /www/img1/prefetch.pack /www/img1/prefetch.pack.blob
rm -rf /tmp/tp /tmp/c-tp /tmp/c-tp2 /tmp/c-tp3

step "hydration: the whole image arrives in the background, then no network is needed"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-hydrate --hydrate --hydrate-rate 20M) || die "add"
ID=${DEV#/dev/ublkb}
i=0
while status_json "$ID" > /tmp/s.json && [ "$(field /tmp/s.json present_chunks)" != "$(field /tmp/s.json total_chunks)" ] && [ $i -lt 600 ]; do
    sleep 0.1; i=$((i + 1))
done
check "fully present" [ "$(field /tmp/s.json present_chunks)" = "$(field /tmp/s.json total_chunks)" ]
stop_nginx 8080
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
lazyblk-testkit digest-tree /mnt/p > /tmp/got.txt
check "the whole tree reads right with the server down" cmp -s /expected/img1.txt /tmp/got.txt
umount /mnt/p
lazyblk export "$ID" /tmp/export.img || die "export"
check "export equals the device, byte for byte" cmp /tmp/export.img "$DEV"
lazyblk del "$ID" > /dev/null
start_nginx /www 8080

step "a cache limit: cold chunks are evicted, reads stay right"
DEV=$(lazyblk add "$URL" --cache-dir /tmp/c-limit --cache-limit 4M --readahead 0) || die "add"
ID=${DEV#/dev/ublkb}
mount -t erofs -o ro "$DEV" /mnt/p || die "mount"
lazyblk-testkit digest-tree /mnt/p > /tmp/got.txt
check "the whole tree reads right under a 4 MiB limit" cmp -s /expected/img1.txt /tmp/got.txt
sleep 1
status_json "$ID" > /tmp/s.json
echo "cached bytes $(field /tmp/s.json cached_bytes), evicted $(field /tmp/s.json evicted_chunks) chunks"
check "chunks were evicted" [ "$(field /tmp/s.json evicted_chunks)" -gt 0 ]
check "the cache is under its limit" [ "$(field /tmp/s.json cached_bytes)" -le 4194304 ]
umount /mnt/p; lazyblk del "$ID" > /dev/null
for d in /tmp/c-limit/*/; do lazyblk verify-cache "$d" || die "verify-cache after eviction"; done
ok "every chunk still claimed after eviction is verified"

step "a host cache limit: two devices keep their cache root under one limit, reads stay right"
D1=$(lazyblk add "$URL" --cache-dir /tmp/c-host --readahead 0) || die "add img1"
D2=$(lazyblk add http://127.0.0.1:8080/img2/manifest --cache-dir /tmp/c-host --readahead 0) || die "add img2"
mkdir -p /mnt/p2
mount -t erofs -o ro "$D1" /mnt/p || die "mount img1"
mount -t erofs -o ro "$D2" /mnt/p2 || die "mount img2"
read_both() {
    lazyblk-testkit digest-tree /mnt/p > /tmp/got.txt
    check "image 1 reads right $1" cmp -s /expected/img1.txt /tmp/got.txt
    lazyblk-testkit digest-tree /mnt/p2 > /tmp/got2.txt
    check "image 2 reads right $1" cmp -s /expected/img2.txt /tmp/got2.txt
}
read_both "before the limit"
counted_once() { sed -n 's/.* held \([0-9]*\) bytes, \([0-9]*\) counted once.*/\2/p' "$1"; }
lazyblk gc --cache-dir /tmp/c-host --host-cache-limit 1T | tee /tmp/hl.txt
HELD=$(counted_once /tmp/hl.txt)
check "gc reports the root's bytes counted once ($HELD)" test "${HELD:-0}" -gt 0
LIMIT=$((HELD / 2))
lazyblk gc --cache-dir /tmp/c-host --host-cache-limit "$LIMIT" | tee /tmp/hl.txt
check "a pass over the limit drops something" grep -q "^dropped " /tmp/hl.txt
i=0
while :; do
    lazyblk gc --cache-dir /tmp/c-host --host-cache-limit "$LIMIT" > /tmp/hl2.txt
    NOW=$(counted_once /tmp/hl2.txt)
    [ "$NOW" -le "$LIMIT" ] && break
    [ $i -ge 60 ] && break
    sleep 0.5; i=$((i + 1))
done
cat /tmp/hl2.txt
check "the running devices brought the root under the host limit ($NOW <= $LIMIT)" [ "$NOW" -le "$LIMIT" ]
E=0
for d in "$D1" "$D2"; do
    status_json "${d#/dev/ublkb}" > /tmp/s.json
    E=$((E + $(field /tmp/s.json host_evicted_chunks)))
done
check "the devices evicted by the host limit ($E chunks)" [ "$E" -gt 0 ]
umount /mnt/p; umount /mnt/p2
mount -t erofs -o ro "$D1" /mnt/p || die "mount img1 again"
mount -t erofs -o ro "$D2" /mnt/p2 || die "mount img2 again"
read_both "after the evictions"
umount /mnt/p; umount /mnt/p2
lazyblk del "${D1#/dev/ublkb}" > /dev/null; lazyblk del "${D2#/dev/ublkb}" > /dev/null
for d in /tmp/c-host/*/; do lazyblk verify-cache "$d" || die "verify-cache after host evictions"; done
ok "every chunk still claimed after the host limit's evictions is verified"
lazyblk gc --cache-dir /tmp/c-host --host-cache-limit 0 > /dev/null
rm -rf /tmp/c-host

step "gc removes the caches no daemon uses"
mkdir -p /tmp/gc
cp -a /tmp/c-trace/. /tmp/gc/
DEV=$(lazyblk add http://127.0.0.1:8080/img2/manifest --cache-dir /tmp/gc) || die "add img2"
lazyblk gc --cache-dir /tmp/gc | tee /tmp/gc.txt
check "the attached image's cache is kept" grep -q "in use, kept" /tmp/gc.txt
check "the detached image's cache is removed" grep -q "removed" /tmp/gc.txt
check "one cache dir left" [ "$(ls /tmp/gc | wc -l)" -eq 1 ]
lazyblk del --all > /dev/null
check "no device left" no_ublk_devices
summary
