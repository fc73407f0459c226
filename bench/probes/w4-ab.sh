#!/bin/sh
# Guest side of `bench/probe.sh w4-ab`: W4's fio on a fully present lazyblk device of img3, for
# the binaries /usr/bin/lz-old and /usr/bin/lz-new, and lz-new without the fork
# (LAZYBLK_SPAWN_EXEC=1), side by side, two rounds.
. /guest/lib.sh
set +e
start_nginx /www 8080
mkdir -p /var/log/lazyblk
for round in 1 2; do
    for v in old new newexec; do
        b=/usr/bin/lz-old; [ $v != old ] && b=/usr/bin/lz-new
        rm -rf /tmp/cache
        if [ $v = newexec ]; then
            d=$(LAZYBLK_SPAWN_EXEC=1 $b add http://127.0.0.1:8080/img3/manifest --cache-dir /tmp/cache)
        else
            d=$($b add http://127.0.0.1:8080/img3/manifest --cache-dir /tmp/cache)
        fi
        dd if="$d" of=/dev/null bs=1M 2>/dev/null
        sync; echo 3 > /proc/sys/vm/drop_caches
        r=$(fio --name=r --filename="$d" --rw=randread --bs=4k --iodepth=32 --direct=1 --ioengine=libaio --runtime=5 --ramp_time=1 --time_based --readonly --output-format=terse 2>/dev/null | awk -F';' '{print $8}')
        s=$(fio --name=s --filename="$d" --rw=read --bs=1m --iodepth=32 --direct=1 --ioengine=libaio --runtime=5 --ramp_time=1 --time_based --readonly --output-format=terse 2>/dev/null | awk -F';' '{print $7}')
        echo "PROBE round=$round v=$v rand4k_iops=$r seq1m_kib=$s"
        $b del "${d#/dev/ublkb}"
    done
done
echo PROBE-DONE
