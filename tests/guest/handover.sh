# Guest: the hand-over suite (issue 18): `add --handover` serves an erofs image through a read-only
# loop device over /dev/ublkbN and, once the image is complete, switches its backing file to the
# cache file (LOOP_CHANGE_FD) and retires the daemon; `--handover-via dm` serves through
# /dev/mapper/lazyblk-<id> and swaps the dm table to a read-only loop device of the cache file.
# For each stack: a reader runs through the hand-over; del; kill -9 at each step, then
# `lazyblk recover`. Loop (the default) also: list/status/gc of a handed-over device, no network,
# re-add reuses the cache. Data: /www/img1 (64 KiB chunks), /expected/img1.txt.
. /guest/lib.sh
URL=http://127.0.0.1:8080
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
M=/mnt/h
mkdir -p $M /var/log/lazyblk
start_nginx /www 8080
dmesg -c > /dev/null

shape() { tc qdisc del dev lo root 2>/dev/null || true; [ $# -eq 0 ] || tc qdisc add dev lo root netem "$@"; }

# add_ho [ENV=VALUE...] -- ADD-ARGS...: lazyblk add --handover --handover-via $STACK on the cache
# as it is, mounted on $M; sets DEV (the loop device or dm node) and ID
add_ho() {
    envs=""
    while [ $# -gt 0 ] && [ "$1" != -- ]; do envs="$envs $1"; shift; done
    [ $# -gt 0 ] && shift
    via=""
    [ "$STACK" = loop ] || via="--handover-via $STACK"
    # shellcheck disable=SC2086 # envs: a list of VAR=VALUE words; via: two words or none
    DEV=$(env $envs lazyblk add "$URL/img1/manifest" --handover $via "$@" 2> /tmp/add.err) || { cat /tmp/add.err; die "lazyblk add --handover $via $*"; }
    cat /tmp/add.err
    ID=$(grep -l "\"device\": \"$DEV\"" /run/lazyblk/*.json 2>/dev/null | head -n 1 | sed 's|.*/||; s|\.json$||')
    [ -n "$ID" ] || die "add --handover printed '$DEV', which no device record names"
    case $STACK in
    loop) case $DEV in /dev/loop[0-9]*) ;; *) die "add --handover printed '$DEV', not a loop device" ;; esac ;;
    dm) [ "$DEV" = "/dev/mapper/lazyblk-$ID" ] || die "add --handover-via dm printed '$DEV', not /dev/mapper/lazyblk-$ID" ;;
    esac
    [ -b "$DEV" ] || die "$DEV is not a block device"
    mount -t erofs -o ro "$DEV" $M || die "mount $DEV"
}
# cache_of ID (the record also holds the image id in its stats)
cache_of() { echo "$(record_field "$1" cache_root | head -n 1)/$(record_field "$1" image | head -n 1 | sed 's/^sha256://')"; }
step_of() { record_field "$1" step; }
handed_over() { [ "$(step_of "$1")" = handed-over ] && pid_gone "$(daemon_pid "$1")"; }
no_lazyblk_process() { ! pidof lazyblk > /dev/null; }
# dm_slave ID: the block device under /dev/mapper/lazyblk-ID (e.g. loop0, ublkb0)
dm_slave() {
    for _d in /sys/block/dm-*; do
        [ "$(cat "$_d/dm/name" 2>/dev/null)" = "lazyblk-$1" ] && ls "$_d/slaves"
    done
}
# lower ID: what the device of ID reads: dm, the block device it maps (ublkbN, loopN); loop, its
# backing file (/dev/ublkbN, the cache file)
lower() {
    if [ "$STACK" = dm ]; then dm_slave "$1"; else cat "/sys/block/${DEV#/dev/}/loop/backing_file" 2>/dev/null; fi
}
dm_suspended() {
    for _d in /sys/block/dm-*; do
        [ "$(cat "$_d/dm/name" 2>/dev/null)" = "lazyblk-$1" ] && [ "$(cat "$_d/dm/suspended")" = 1 ] && return 0
    done
    return 1
}
kernel_io_errors() { dmesg | grep -iE 'ublkb[0-9]|erofs|loop[0-9]|dm-[0-9]|device-mapper' | grep -iE 'error|fail' || true; }
no_io_errors() {
    e=$(kernel_io_errors)
    [ -z "$e" ] || { echo "$e"; die "$1: the kernel logged IO errors"; }
}

# The reader (a function: it returns, bg_start's subshell records the status): whole-tree digests of $M, one after the other (page cache dropped in between so
# each one reads the device), until /tmp/stop-reader exists; each must match the source.
reader() {
    n=0
    while :; do
        n=$((n + 1))
        lazyblk-testkit digest-tree $M > /tmp/reader.digest || { echo "pass $n: digest-tree failed"; return 1; }
        cmp -s /expected/img1.txt /tmp/reader.digest || { diff /expected/img1.txt /tmp/reader.digest | head; echo "pass $n: wrong data"; return 2; }
        echo "$n" > /tmp/reader.passes
        [ -f /tmp/stop-reader ] && return 0
        echo 3 > /proc/sys/vm/drop_caches
    done
}
# reader_moved N: the reader finished a pass after pass N, or ended
reader_moved() { ! bg_running reader || [ "$(cat /tmp/reader.passes 2>/dev/null || echo 0)" -gt "$1" ]; }
start_reader() { rm -f /tmp/stop-reader /tmp/reader.passes; bg_start reader reader; }
# stop_reader: let the pass under way finish (plus one full pass), check it
stop_reader() {
    p0=$(cat /tmp/reader.passes 2>/dev/null || echo 0)
    i=0
    until reader_moved "$p0"; do
        i=$((i + 1))
        if [ $i -ge 120 ]; then
            echo "--- blocked tasks"; echo w > /proc/sysrq-trigger; sleep 1; dmesg | tail -n 120
            die "$1: the reader made no progress in 120 s"
        fi
        sleep 1
    done
    touch /tmp/stop-reader
    bg_wait reader 300
    [ "$(bg_rc reader)" = 0 ] || { cat /tmp/reader.out /tmp/reader.err 2>/dev/null | tail; die "$1: the reader failed (status $(bg_rc reader))"; }
}

# check_handed_over ID WHAT: the state after a hand-over
check_handed_over() {
    no_lazyblk_process || die "$2: a lazyblk process is still running: $(pidof lazyblk)"
    if [ "$STACK" = dm ]; then
        s=$(dm_slave "$1")
        case $s in loop[0-9]*) ;; *) die "$2: /dev/mapper/lazyblk-$1 maps '$s', not a loop device" ;; esac
        dm_suspended "$1" && die "$2: the dm device is left suspended"
    else
        s=${DEV#/dev/}
        # The cache is in memory (the guest's root file system): buffered reads of it, as a
        # kernel loop device of a local image; O_DIRECT was for /dev/ublkbN only.
        [ "$(cat /sys/block/$s/loop/dio)" = 0 ] || die "$2: /dev/$s still reads the in-memory cache file with O_DIRECT"
    fi
    [ "$(cat /sys/block/$s/ro)" = 1 ] || die "$2: /dev/$s is not read-only"
    [ "$(cat /sys/block/$s/loop/backing_file)" = "$(cache_of "$1")/data" ] || die "$2: /dev/$s serves $(cat /sys/block/$s/loop/backing_file)"
    no_ublk_devices || die "$2: a ublk device is left: $(ls /dev/ublkb*)"
    echo 3 > /proc/sys/vm/drop_caches
    lazyblk-testkit digest-tree $M > /tmp/after.txt || die "$2: reading after drop_caches"
    cmp -s /expected/img1.txt /tmp/after.txt || die "$2: the tree differs after drop_caches"
    no_io_errors "$2"
    if [ "$STACK" = dm ]; then on="$DEV maps /dev/$s, read-only over the cache file"; else on="$DEV reads the cache file, read-only"; fi
    ok "$2: no lazyblk process, $on, no ublk device, tree correct after drop_caches, no kernel IO error"
}

step "1. errors: --handover with --writable, lazyblk handover of a device without --handover"
if lazyblk add "$URL/img1/manifest" --handover --writable 2> /tmp/err.txt; then die "add --handover --writable succeeded"; fi
cat /tmp/err.txt
check "--handover --writable is refused" grep -q "cannot be used with" /tmp/err.txt
lazyblk add --help | tr '\n' ' ' | tr -s ' ' | grep -q "Read-only images only" || die "add --help does not say read-only images only"
ok "add --help says read-only images only"
if lazyblk add "$URL/img1/manifest" --handover --cache-limit 1M 2> /tmp/err.txt; then die "add --handover --cache-limit succeeded"; fi
check "--handover --cache-limit is refused" grep -q "cache-limit" /tmp/err.txt
P=$(lazyblk add "$URL/img1/manifest" --no-prefetch) || die "plain add"
PID_=${P#/dev/ublkb}
check "without --handover, add prints the ublk device" test -b "$P" -a "$P" = "/dev/ublkb$PID_"
if lazyblk handover "$PID_" 2> /tmp/err.txt; then die "handover of a device without --handover succeeded"; fi
cat /tmp/err.txt
check "handover without --handover is refused with a reason" grep -q "added without --handover" /tmp/err.txt
lazyblk del "$PID_" > /dev/null || die "del of the plain device"
rm -rf "$LAZYBLK_CACHE_DIR"

# stack_steps STACK: steps 2-7 with the loop (default) or dm stack
stack_steps() {
STACK=$1
rm -rf "$LAZYBLK_CACHE_DIR"
step "2 ($STACK). add --handover (on demand, no hydration): handover before the image is complete is refused"
shape delay 10ms
add_ho LAZYBLK_LOG=info -- --no-prefetch
if [ "$STACK" = dm ]; then
    check "the dm device maps the ublk device" [ "$(lower "$ID")" = "ublkb$ID" ]
else
    check "the loop device reads the ublk device" [ "$(lower "$ID")" = "/dev/ublkb$ID" ]
    check "the loop device is read-only" [ "$(cat "/sys/block/${DEV#/dev/}/ro")" = 1 ]
    check "the loop device reads the ublk device with O_DIRECT (one page cache)" [ "$(cat "/sys/block/${DEV#/dev/}/loop/dio")" = 1 ]
fi
lazyblk list | tee /tmp/list.txt
check "list shows the dm device" grep -q "^$ID  *$DEV " /tmp/list.txt
if lazyblk handover "$ID" 2> /tmp/err.txt; then die "handover of an incomplete image succeeded"; fi
cat /tmp/err.txt
check "handover of an incomplete image says how much is present" grep -q "not complete yet: [0-9]* of [0-9]* chunks" /tmp/err.txt

step "3 ($STACK). a reader running through the hand-over (reading everything completes the image)"
start_reader
t0=$(now_ms)
sleep 1
bg_start dd dd if="$DEV" of=/dev/null bs=1M
wait_for 300 "the hand-over of device $ID" handed_over "$ID"
echo "handed over $(secs_since "$t0") s after the reader started (passes so far: $(cat /tmp/reader.passes 2>/dev/null || echo 0))"
stop_reader "hand-over by reading"
bg_wait dd 60
[ "$(bg_rc dd)" = 0 ] || { cat /tmp/dd.err; die "dd of $DEV across the hand-over failed"; }
ok "dd of the whole device across the hand-over: no error"
grep "hand-over of device $ID" /var/log/lazyblk/lazyblk.log | tail -n 7
check_handed_over "$ID" "hand-over by reading"
if [ "$STACK" = dm ]; then
    grep -q "hand-over of device $ID: suspended" /var/log/lazyblk/lazyblk.log || die "the log has no suspended step"
else
    grep -q "hand-over of device $ID: $DEV now reads $(cache_of "$ID")/data" /var/log/lazyblk/lazyblk.log || die "the log does not say that $DEV now reads the cache file"
fi

if [ "$STACK" = loop ]; then
step "4 ($STACK). after the hand-over: list, status, handover again, recover, gc, no network"
lazyblk list | tee /tmp/list.txt
check "list shows it handed over, with its loop device" grep -q "^$ID  *$DEV .*handed-over (/dev/loop[0-9]*, no daemon)" /tmp/list.txt
lazyblk status "$ID" | tee /tmp/status.txt
check "status answers from the record" grep -q "present  *100.0%" /tmp/status.txt
check "status names the loop device" grep -q "handed over  *.*/dev/loop" /tmp/status.txt
lazyblk status "$ID" --json | tr -d ' \n' | grep -q '"step":"handed-over"' || die "status --json has no hand-over step"
ok "status --json carries the hand-over"
lazyblk handover "$ID" | grep -q "already handed over" || die "a second handover did not say 'already handed over'"
lazyblk recover "$ID" | grep -q "nothing to recover" || die "recover of a handed-over device"
ok "handover and recover of a handed-over device say so"
CACHE=$(cache_of "$ID")
lazyblk gc | tee /tmp/gc.txt
check "gc keeps the handed-over cache" test -f "$CACHE/data" -a -f "$CACHE/bitmap"
check "gc says why" grep -q "handed over to the kernel, kept" /tmp/gc.txt
stop_nginx 8080
echo 3 > /proc/sys/vm/drop_caches
lazyblk-testkit digest-tree $M > /tmp/nonet.txt || die "reading without network"
check "the tree reads right with the server gone" cmp -s /expected/img1.txt /tmp/nonet.txt
start_nginx /www 8080
fi

step "5 ($STACK). del: refused while mounted; then removes the dm and loop devices, keeps the cache"
if [ "$STACK" = dm ]; then LOOPDEV=$(dm_slave "$ID"); else LOOPDEV=${DEV#/dev/}; fi
if lazyblk del "$ID" 2> /tmp/err.txt; then die "del of a mounted handed-over device succeeded"; fi
cat /tmp/err.txt
check "del names the mount" grep -q "mounted on $M" /tmp/err.txt
umount $M
lazyblk del "$ID" || die "del of the handed-over device"
if [ "$STACK" = dm ]; then
    check "the dm device is gone" test ! -e "$DEV" -a -z "$(dm_slave "$ID")"
fi
check "the loop device is detached" test ! -e "/sys/block/$LOOPDEV/loop/backing_file"
check "the cache is kept" test -f "$CACHE/data"
check "the record is gone" test ! -e "/run/lazyblk/$ID.json"
check "list is empty" [ "$(lazyblk list | wc -l)" -eq 1 ]

if [ "$STACK" = loop ]; then
step "6 ($STACK). re-add reuses the cache (nothing fetched) and hands over at once"
BEFORE=$(served_requests 8080 /img1/blob)
add_ho -- --no-prefetch
wait_for 60 "the immediate hand-over of device $ID" handed_over "$ID"
AFTER=$(served_requests 8080 /img1/blob)
check "no blob request after re-add ($BEFORE -> $AFTER)" [ "$AFTER" -eq "$BEFORE" ]
check_handed_over "$ID" "re-add"
umount $M
lazyblk del "$ID" > /dev/null || die "del after re-add"
fi

step "7 ($STACK). kill -9 at each step of the hand-over, then lazyblk recover (reader running throughout)"
shape delay 10ms rate 40mbit
if [ "$STACK" = dm ]; then points="loop-attached suspended swapped"; else points="sealed swapped"; fi
for at in $points; do
    rm -rf "$LAZYBLK_CACHE_DIR"
    dmesg -c > /dev/null
    add_ho LAZYBLK_HANDOVER_KILL_AT=$at -- --hydrate
    start_reader
    pid=$(daemon_pid "$ID")
    wait_for 300 "the daemon to kill itself at $at" pid_gone "$pid"
    check "killed at $at: the record says $at" [ "$(step_of "$ID")" = "$at" ]
    if [ "$at" = suspended ]; then
        check "killed at suspended: the dm device is suspended" dm_suspended "$ID"
    fi
    lazyblk list | grep "^$ID " || true
    t0=$(now_ms)
    lazyblk recover "$ID" > /tmp/recover.out 2>&1 || { cat /tmp/recover.out; die "recover after a kill at $at"; }
    cat /tmp/recover.out
    wait_for 300 "the hand-over to complete after the kill at $at" handed_over "$ID"
    echo "recovered and handed over $(secs_since "$t0") s after recover"
    stop_reader "kill at $at"
    grep -q " $M erofs " /proc/mounts || die "kill at $at: the mount went away"
    check_handed_over "$ID" "kill -9 at $at, recover"
    umount $M
    lazyblk del "$ID" > /dev/null || die "del after the kill at $at"
done
shape
check "nothing left" [ "$(lazyblk list | wc -l)" -eq 1 ]
}

stack_steps loop
stack_steps dm
summary
