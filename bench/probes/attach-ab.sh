#!/bin/sh
# Guest side of `bench/probe.sh attach-ab`: the attach times per step (`lazyblk status`) of
# /usr/bin/lz-old and /usr/bin/lz-new side by side, with netem (10 ms each way, 100 Mbit/s), 3
# rounds of: img1 as is, and img1 with a prefetch pack, the manifest's and the pack's digests
# pinned (as bench/run.sh's lazyblk-pf adds it). The pack is written once, by lz-new's
# `trace --pack` after reading some files of img1.
. /guest/lib.sh
set +e
start_nginx /www 8080
mkdir -p /var/log/lazyblk /mnt/p
M=http://127.0.0.1:8080/img1/manifest
MD=sha256:$(sha256sum /www/img1/manifest | cut -d' ' -f1)
d=$(lz-new add $M --cache-dir /tmp/cache)
mount -t erofs -o ro "$d" /mnt/p && find /mnt/p -type f | head -n 100 | xargs cat >/dev/null
umount /mnt/p
lz-new trace "${d#/dev/ublkb}" --pack -o /www/img1/prefetch.pack >/tmp/trace.out 2>&1
PD=$(sed -n 's/^digest *//p' /tmp/trace.out)
echo "PROBE pack $(head -n 1 /tmp/trace.out) digest=$PD"
lz-new del "${d#/dev/ublkb}"
[ -n "$PD" ] || { echo "PROBE-FAILED: no prefetch pack: $(tr '\n' ' ' </tmp/trace.out)"; exit 1; }
tc qdisc add dev lo root netem delay 10ms rate 100mbit
for round in 1 2 3; do
    for how in plain pinned-pack; do
        for v in old new; do
            rm -rf /tmp/cache
            if [ $how = plain ]; then
                mv /www/img1/prefetch.pack /www/img1/prefetch.pack.off
                d=$(lz-$v add $M --cache-dir /tmp/cache)
                mv /www/img1/prefetch.pack.off /www/img1/prefetch.pack
            else
                d=$(lz-$v add $M --cache-dir /tmp/cache --digest "$MD" --pack-digest "$PD")
            fi
            echo "PROBE round=$round how=$how v=$v $(lz-$v status "${d#/dev/ublkb}" | grep '^attach')"
            lz-$v del "${d#/dev/ublkb}"
        done
    done
done
echo PROBE-DONE
