# Guest: a dense node (issue 17). N devices of N different images attached at once (each its own
# supervised daemon), each mounted and read whole with an exact digest; the cost of the whole set
# (processes, threads, the daemons' own memory) measured after every device has read all of its
# files; the attach time of the last devices against the first; kill -9 of daemons serving
# devices under load, their readers finishing with the right data while the other devices never
# notice. Data: /dense/www/<i>/ and /dense/expected/<i>.txt (tests/guest/dense-images.sh, run by
# run.sh and bench/dense.sh). DENSE_BENCH=1 prints DENSE lines for bench/dense.sh.
. /guest/lib.sh
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
start_nginx /dense/www 8080
# The same files behind a slow server, so that the devices killed below have misses in flight.
start_nginx /dense/www 8081 "limit_rate 32k;"
N=$(ls /dense/www | wc -l)
KILL=${DENSE_KILL:-3}
[ "$N" -gt $((KILL + 4)) ] || die "need more than $((KILL + 4)) images, found $N"

step "attach $N devices of $N different images, one after another"
: > /tmp/attach.txt
for i in $(seq 1 "$N"); do
    port=8080 opt=--supervise
    # Without the metadata pack (which holds the whole of these small images), so that their
    # reads miss while the daemons are killed.
    [ "$i" -le "$KILL" ] && port=8081 opt="--supervise --no-prefetch"
    t0=$(now_ms)
    dev=$(lazyblk add "http://127.0.0.1:$port/$i/manifest" $opt --log-file /tmp/daemons.log) ||
        die "lazyblk add of image $i"
    echo "$i $dev $(($(now_ms) - t0))" >> /tmp/attach.txt
done
check "$N ublk devices live" [ "$(lazyblk list | grep -c ' live')" -eq "$N" ]
# Attach times (ms) of the first and the last four devices, medians (one sample is TCG noise).
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }
# The first KILL devices read from the slow server: not counted.
FIRST=$(awk -v k="$KILL" '$1 > k && $1 <= k + 4 { print $3 }' /tmp/attach.txt | median)
LAST=$(tail -n 4 /tmp/attach.txt | awk '{ print $3 }' | median)
echo "attach: first four median ${FIRST} ms, last four median ${LAST} ms"
check "attach time of the last devices within 1.5x of the first" [ $((LAST * 2)) -le $((FIRST * 3)) ]

rm -f /tmp/killed.txt
step "mount every device; kill -9 the daemons of $KILL devices while their readers run"
while read -r i dev _; do
    mkdir -p "/mnt/d$i"
    mount -t erofs -o ro "$dev" "/mnt/d$i" || die "mount of $dev (image $i)"
done < /tmp/attach.txt
for i in $(seq 1 "$KILL"); do
    bg_start "read$i" sh -c "lazyblk-testkit digest-tree /mnt/d$i > /tmp/got-$i.txt"
done
sleep 2
for i in $(seq 1 "$KILL"); do
    check "image $i's reader is still reading when its daemon is killed" bg_running "read$i"
done
for i in $(seq 1 "$KILL"); do
    id=$(awk -v i="$i" '$1 == i { sub("/dev/ublkb", "", $2); print $2 }' /tmp/attach.txt)
    pid=$(daemon_pid "$id")
    kill -9 "$pid"
    echo "$id $pid" >> /tmp/killed.txt
    echo "killed daemon $pid of device $id"
done

step "read every other device whole, two readers at a time, while those recover"
read_range() { # FIRST LAST: digest every tree of images FIRST..LAST
    for i in $(seq "$1" "$2"); do
        lazyblk-testkit digest-tree "/mnt/d$i" > "/tmp/got-$i.txt" || echo "digest-tree failed on image $i"
    done
}
half=$(((N + KILL) / 2))
bg_start readA read_range $((KILL + 1)) "$half"
bg_start readB read_range $((half + 1)) "$N"
bg_wait readA 900
bg_wait readB 900
for i in $(seq 1 "$KILL"); do bg_wait "read$i" 300; done
bad=0
for i in $(seq 1 "$N"); do
    cmp -s "/dense/expected/$i.txt" "/tmp/got-$i.txt" || { echo "image $i differs from its source"; bad=$((bad + 1)); }
done
check "all $N trees match their sources (the $KILL killed devices included)" [ "$bad" -eq 0 ]
recovered() { # ID OLD-PID: a new daemon serves device ID
    p=$(daemon_pid "$1")
    [ -n "$p" ] && [ "$p" != "$2" ] && ! pid_gone "$p" && [ "$(dev_state "$1")" = live ]
}
while read -r id pid; do
    check "device $id recovered by its supervisor (a new daemon)" wait_for 60 "device $id's new daemon" recovered "$id" "$pid"
done < /tmp/killed.txt
check "no IO errors in the kernel log" [ -z "$(io_errors)" ]

step "the cost of $N devices, after every device read all of its files"
# Idle blocking-pool threads of the daemons' runtimes exit after 2 s.
sleep 4
procs=0 threads=0 anon=0 dpids=""
for d in /proc/[0-9]*; do
    [ "$(cat "$d/comm" 2> /dev/null)" = lazyblk ] || continue
    t=$(awk '/^Threads:/ { print $2 }' "$d/status" 2> /dev/null) || continue
    a=$(awk '/^RssAnon:/ { print $2 }' "$d/status" 2> /dev/null) || continue
    [ -n "$t" ] || continue
    procs=$((procs + 1)) threads=$((threads + t)) anon=$((anon + a))
done
for id in $(awk '{ sub("/dev/ublkb", "", $2); print $2 }' /tmp/attach.txt); do dpids="$dpids $(daemon_pid "$id")"; done
one=${dpids# }
one=${one%% *}
echo "threads of one daemon (pid $one):"
for t in /proc/"$one"/task/*; do cat "$t/comm"; done | sort | uniq -c
for d in /proc/[0-9]*; do # any lazyblk process but a daemon of 3 threads or a supervisor of 1
    [ "$(cat "$d/comm" 2> /dev/null)" = lazyblk ] || continue
    t=$(awk '/^Threads:/ { print $2 }' "$d/status" 2> /dev/null) || continue
    [ -n "$t" ] && [ "$t" -ne 3 ] && [ "$t" -ne 1 ] || continue
    echo "pid ${d#/proc/} has $t threads: $(for x in "$d"/task/*; do cat "$x/comm"; done | sort | uniq -c | tr -s ' \n' ' ')"
done
echo "cost: $procs processes (daemons and supervisors), $threads threads, RssAnon $((anon / 1024)) MiB for $N devices"
echo "per device: $(awk -v t="$threads" -v n="$N" 'BEGIN { printf "%.2f", t / n }') threads, $(awk -v a="$anon" -v n="$N" 'BEGIN { printf "%.2f", a / 1024 / n }') MiB RssAnon"
[ "${DENSE_BENCH:-}" = 1 ] && echo "DENSE devices=$N procs=$procs threads=$threads rss_anon_kib=$anon attach_first_ms=$FIRST attach_last_ms=$LAST"
# The issue's target: 4 threads a device. An idle device costs exactly that: its daemon's main
# thread (which serves the queue), its runtime's worker, the io-wq worker the kernel keeps for
# the queue's ring (large reads of a tmpfs cache go to io-wq on purpose), and its supervisor's
# one thread (a recovery's control commands run on a thread that exits with them).
check "at most 4 threads per device (daemon and supervisor): $threads for $N" [ "$threads" -le $((4 * N)) ]
check "at most 66 MiB of daemon memory (RssAnon) per device" [ "$anon" -le $((66 * 1024 * N)) ]

step "delete every device"
for i in $(seq 1 "$N"); do umount "/mnt/d$i" || die "umount image $i"; done
lazyblk del --all > /dev/null || die "lazyblk del --all"
wait_for 60 "every device gone" no_ublk_devices
ok "all $N devices deleted"
summary
