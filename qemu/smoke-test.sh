#!/bin/sh
# Guest script (busybox sh): checks that the guest has everything the lazyblk
# device-path tests need. Run it with qemu/run-smoke.sh, which builds the erofs
# image and passes it as /images/smoke.erofs, or by hand:
#   mkfs.erofs smoke.erofs <dir with hello.txt containing "lazyblk smoke erofs">
#   qemu/run-guest.sh --script qemu/smoke-test.sh --file smoke.erofs:/images/smoke.erofs
# With SMOKE_FULL=1 on the kernel command line (--append SMOKE_FULL=1) it also
# requires the --bin xz, --dir and two --disk images that run-smoke.sh passes.
# Exits non-zero at the first failure.
set -eu

fail() {
    echo "SMOKE FAIL: $*"
    exit 1
}
ok() { echo "SMOKE ok: $*"; }

# ---- kernel features
[ -c /dev/ublk-control ] || fail "/dev/ublk-control missing (ublk_drv not loaded)"
ok "/dev/ublk-control"
grep -qw erofs /proc/filesystems || fail "erofs not in /proc/filesystems"
grep -qw overlay /proc/filesystems || fail "overlay not in /proc/filesystems"
ok "erofs and overlay in /proc/filesystems"
[ -b /dev/nbd0 ] || fail "/dev/nbd0 missing (nbd not loaded)"
ok "/dev/nbd0"
[ -b /dev/loop0 ] || fail "/dev/loop0 missing (loop not loaded)"
grep -q '^io_uring' /proc/kallsyms 2>/dev/null || [ -e /proc/sys/kernel/io_uring_disabled ] ||
    fail "no io_uring in the kernel"
ok "loop, io_uring"

# ---- network: lo, netem, veth
ip addr show lo | grep -q 'inet 127.0.0.1' || fail "lo has no 127.0.0.1"
tc qdisc add dev lo root netem delay 10ms || fail "tc qdisc add dev lo root netem delay 10ms"
tc qdisc show dev lo | grep -q 'netem.*delay 10ms' || fail "netem qdisc not shown: $(tc qdisc show dev lo)"
# ping over lo now takes >= 20 ms (10 ms each way).
rtt=$(ping -c 1 -W 5 127.0.0.1 | sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p')
[ -n "$rtt" ] || fail "ping 127.0.0.1 failed"
awk -v r="$rtt" 'BEGIN { exit !(r >= 19) }' || fail "netem delay not applied: rtt $rtt ms"
tc qdisc change dev lo root netem delay 10ms 2ms distribution normal ||
    fail "netem jitter with distribution normal (tc distribution tables missing?)"
tc qdisc del dev lo root || fail "tc qdisc del"
ok "netem on lo (rtt $rtt ms, distribution tables present)"
ip netns add smoke-ns || fail "ip netns add"
ip link add veth-a type veth peer name veth-b || fail "ip link add veth"
ip link set veth-b netns smoke-ns
ip addr add 10.77.0.1/24 dev veth-a
ip link set veth-a up
ip -n smoke-ns addr add 10.77.0.2/24 dev veth-b
ip -n smoke-ns link set veth-b up
ip -n smoke-ns link set lo up
ping -c 1 -W 5 10.77.0.2 >/dev/null || fail "ping over the veth pair into the netns"
ip link del veth-a
ip netns del smoke-ns
ok "veth pair + network namespace"

# ---- nginx (daemon on, then daemon off in the background), as the tests run it
mkdir -p /tmp/www /tmp/nginx
echo "lazyblk smoke payload" >/tmp/www/x
nginx_conf() { # PORT DAEMON
    cat >"/tmp/nginx/nginx-$1.conf" <<EOF
daemon $2;
master_process off;
user root;
worker_processes 1;
error_log /tmp/nginx/error-$1.log info;
pid /tmp/nginx/nginx-$1.pid;
events { worker_connections 64; }
http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /tmp/nginx/access-$1.log;
    sendfile on;
    server {
        listen 127.0.0.1:$1;
        root /tmp/www;
    }
}
EOF
}
wait_port() { # PORT
    i=0
    until wget -q -O /dev/null "http://127.0.0.1:$1/x" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 50 ] || return 1
        sleep 0.1
    done
}
nginx_conf 8080 on
nginx -t -c /tmp/nginx/nginx-8080.conf -p /tmp/nginx/ || fail "nginx -t"
nginx -c /tmp/nginx/nginx-8080.conf -p /tmp/nginx/ || fail "nginx (daemon on) did not start: $(cat /tmp/nginx/error-8080.log)"
wait_port 8080 || fail "nginx on 8080 not answering: $(cat /tmp/nginx/error-8080.log)"
got=$(wget -O- http://127.0.0.1:8080/x) || fail "wget http://127.0.0.1:8080/x"
[ "$got" = "lazyblk smoke payload" ] || fail "wget got '$got'"
grep -q '"GET /x HTTP/1.1" 200 22 ' /tmp/nginx/access-8080.log || fail "access log: $(cat /tmp/nginx/access-8080.log)"
kill "$(cat /tmp/nginx/nginx-8080.pid)"
ok "nginx daemon on (access log: $(tail -n 1 /tmp/nginx/access-8080.log))"

nginx_conf 8081 off
nginx -c /tmp/nginx/nginx-8081.conf -p /tmp/nginx/ &
ngx=$!
wait_port 8081 || fail "nginx (daemon off) on 8081 not answering: $(cat /tmp/nginx/error-8081.log)"
got=$(wget -O- http://127.0.0.1:8081/x) || fail "wget http://127.0.0.1:8081/x"
[ "$got" = "lazyblk smoke payload" ] || fail "wget 8081 got '$got'"
kill "$ngx"
wait "$ngx" || true
ok "nginx daemon off"

# ---- erofs image on a read-only loop device, overlay on top
img=/images/smoke.erofs
[ -f $img ] || fail "$img missing (pass it with --file <image>:$img)"
loopdev=$(losetup -f) || fail "no free loop device"
losetup -r "$loopdev" "$img" || fail "losetup -r $loopdev $img"
mkdir -p /mnt/erofs
mount -t erofs -o ro "$loopdev" /mnt/erofs || fail "mount -t erofs $loopdev"
[ "$(cat /mnt/erofs/hello.txt)" = "lazyblk smoke erofs" ] || fail "hello.txt on erofs: '$(cat /mnt/erofs/hello.txt)'"
if touch /mnt/erofs/nope 2>/dev/null; then fail "erofs mount is writable"; fi
ok "erofs on $loopdev"
mkdir -p /tmp/ov/upper /tmp/ov/work /mnt/merged
mount -t overlay overlay -o lowerdir=/mnt/erofs,upperdir=/tmp/ov/upper,workdir=/tmp/ov/work /mnt/merged ||
    fail "mount overlay"
echo new >/mnt/merged/new.txt || fail "write a new file through the overlay"
echo changed >/mnt/merged/hello.txt || fail "overwrite a lower file through the overlay"
[ "$(cat /mnt/merged/hello.txt)" = changed ] || fail "overlay read-back"
[ -f /tmp/ov/upper/new.txt ] || fail "upper dir lacks new.txt"
[ -f /tmp/ov/upper/hello.txt ] || fail "upper dir lacks the copied-up hello.txt"
[ "$(cat /mnt/erofs/hello.txt)" = "lazyblk smoke erofs" ] || fail "lower erofs changed"
umount /mnt/merged
umount /mnt/erofs
losetup -d "$loopdev"
ok "overlay over erofs accepts writes"

# ---- extras that run-smoke.sh passes
if [ "${SMOKE_FULL:-0}" = 1 ]; then
    /usr/bin/xz --version | grep -q 'XZ Utils' || fail "--bin xz: $(/usr/bin/xz --version 2>&1)"
    echo lazyblk | xz | xz -d | grep -q lazyblk || fail "--bin xz round trip"
    ok "--bin xz (dynamic, with its ldd closure) runs"
    [ -f /opt/qemu-harness/README.md ] || fail "--dir: /opt/qemu-harness/README.md missing"
    [ -f /tmp/from-host/smoke-test.sh ] || fail "--file into /tmp was lost"
    ok "--dir and --file into /tmp"
    [ "$(head -c 14 /dev/vda)" = LAZYBLK-DISK-0 ] || fail "/dev/vda is not the first --disk"
    [ "$(head -c 14 /dev/vdb)" = LAZYBLK-DISK-1 ] || fail "/dev/vdb is not the second --disk"
    printf 'written-by-guest' | dd of=/dev/vdb bs=512 seek=1 conv=notrunc 2>/dev/null || fail "write /dev/vdb"
    sync
    ok "--disk images are /dev/vda and /dev/vdb"
fi

echo "SMOKE PASSED"
