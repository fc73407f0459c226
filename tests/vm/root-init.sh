#!/bin/busybox sh
# shellcheck shell=dash
# /sbin/init of the test root file system (busybox). What it does after "boot" is chosen by
# lazyblk.mode=... on the kernel command line:
#   shell    print the shell-ready marker and power off (boot benchmark)
#   write    write /data/{hello.txt,blob}, record their sha256 in /data/SUMS, power off cleanly
#   verify   check /data/SUMS, print VERIFY-OK or VERIFY-FAIL, power off cleanly
#   crash    write /crash/f<N> files forever, each followed by `sync` (a flush), printing
#            "ACK <N> <sha256>" once the sync returned (the host kills the backend meanwhile)
#   crashcheck   print "HAVE <N> <sha256>" for every /crash/f<N>, then power off cleanly
#   readbench    read the whole disk (O_DIRECT, 1 MiB) three times, print "READ <pass> <s>"
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mode=shell
for w in $(cat /proc/cmdline); do
    case $w in lazyblk.mode=*) mode=${w#lazyblk.mode=} ;; esac
done
echo "LAZYBLK-ROOT: shell ready at uptime $(cut -d' ' -f1 /proc/uptime) mode=$mode"
off() {
    sync
    mount -o remount,ro / || echo "LAZYBLK-ROOT: remount ro failed"
    echo "LAZYBLK-ROOT: power off"
    poweroff -f
}
case $mode in
shell) ;;
write)
    mkdir -p /data
    echo "hello from boot 1" >/data/hello.txt
    dd if=/dev/urandom of=/data/blob bs=64k count=64 2>/dev/null
    (cd /data && sha256sum hello.txt blob >SUMS)
    sync
    cat /data/SUMS
    echo "LAZYBLK-ROOT: WROTE"
    ;;
verify)
    if (cd /data && sha256sum -c SUMS); then echo "LAZYBLK-ROOT: VERIFY-OK"; else echo "LAZYBLK-ROOT: VERIFY-FAIL"; fi
    ;;
crash)
    mkdir -p /crash
    n=$(ls /crash | wc -l)
    while :; do
        n=$((n + 1))
        dd if=/dev/urandom of=/crash/f$n bs=64k count=4 2>/dev/null
        s=$(sha256sum /crash/f$n | cut -d' ' -f1)
        sync
        echo "ACK $n $s"
    done
    ;;
crashcheck)
    for f in /crash/f*; do
        [ -f "$f" ] && echo "HAVE ${f#/crash/f} $(sha256sum "$f" | cut -d' ' -f1)"
    done
    echo "LAZYBLK-ROOT: CHECKED"
    ;;
readbench)
    for pass in 1 2 3; do
        t0=$(cut -d' ' -f1 /proc/uptime)
        dd if=/dev/vda of=/dev/null bs=1M iflag=direct 2>/dev/null
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "READ $pass $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')"
    done
    ;;
esac
off
