#!/bin/sh
# Guest side of `bench/probe.sh attach`: the attach times per step of 3 adds of img1 without and
# with netem (10 ms each way, 100 Mbit/s), and the cost of starting the binary (`--version`).
. /guest/lib.sh
set +e
start_nginx /www 8080
mkdir -p /var/log/lazyblk
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
for i in 1 2 3 4 5; do a=$(ms); lazyblk --version >/dev/null; b=$(ms); echo "PROBE exec --version $((b - a)) ms"; done
for net in none netem; do
  [ $net = netem ] && tc qdisc add dev lo root netem delay 10ms rate 100mbit
  for i in 1 2 3; do
    rm -rf /tmp/cache
    a=$(ms)
    d=$(lazyblk add http://127.0.0.1:8080/img1/manifest --cache-dir /tmp/cache)
    b=$(ms)
    echo "PROBE net=$net round=$i add_wall=$((b - a)) ms $(lazyblk status ${d#/dev/ublkb} | grep '^attach')"
    lazyblk status ${d#/dev/ublkb} --json | tr -d ' \n' | sed 's/.*"misses":\([0-9]*\).*/PROBE misses \1/' ; echo
    lazyblk del ${d#/dev/ublkb}
  done
done
echo "PROBE-DONE"
