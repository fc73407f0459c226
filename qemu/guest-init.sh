#!/bin/sh
# PID 1 of the lazyblk qemu guest (busybox sh). run-guest.sh copies it to /init.
# Mounts the pseudo filesystems, loads the kernel modules listed in
# /etc/lazyblk/modules, brings up lo, runs /test.sh, prints exactly one
# "LAZYBLK-GUEST-EXIT=<status>" line and powers off.
# Kernel command-line words of the form KEY=VALUE (without a dot) reach this
# script, and so /test.sh, as environment variables.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

say() { echo "LAZYBLK-GUEST: $*"; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }

finish() {
    sync
    echo
    echo "LAZYBLK-GUEST-EXIT=$1"
    sync
    poweroff -f
    # poweroff -f does not return; if it ever does, force it.
    echo o >/proc/sysrq-trigger
    while :; do sleep 3600; done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd

# tmpfs on /tmp and /run; whatever the initramfs put there (--file/--dir) is kept.
for d in /tmp /run; do
    mode=755
    [ "$d" = /tmp ] && mode=1777
    if [ -n "$(ls -A "$d" 2>/dev/null)" ]; then
        mv "$d" "$d.initramfs"
        mkdir "$d"
        mount -t tmpfs -o mode=$mode tmpfs "$d"
        cp -a "$d.initramfs/." "$d/"
        rm -rf "$d.initramfs"
    else
        mkdir -p "$d"
        mount -t tmpfs -o mode=$mode tmpfs "$d"
    fi
done
mkdir -p /run/lock /run/nginx /mnt /var/tmp /var/log/nginx /var/lib/nginx

say "init started at uptime $(uptime_s) s (kernel $(uname -r))"
hostname lazyblk-guest

failed=""
kver=$(uname -r)
while read -r m; do
    [ -n "$m" ] || continue
    if ! out=$(insmod "/lib/modules/$kver/$m.ko" 2>&1); then
        say "insmod $m FAILED: $out"
        failed="$failed $m"
    fi
done </etc/lazyblk/modules
if [ -n "$failed" ]; then
    say "ERROR: kernel modules failed to load:$failed"
    dmesg | tail -n 40
    finish 125
fi
say "modules loaded: $(tr '\n' ' ' </etc/lazyblk/modules)"

ip link set lo up || { say "ERROR: ip link set lo up failed"; finish 125; }

# Wait for the --disk devices (/dev/vda, /dev/vdb, ... in order).
ndisks=$(cat /etc/lazyblk/disks 2>/dev/null || echo 0)
if [ "$ndisks" -gt 0 ]; then
    last=$(echo abcdefghijklmnopqrstuvwxyz | cut -c"$ndisks")
    i=0
    while [ ! -b "/dev/vd$last" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    [ -b "/dev/vd$last" ] || { say "ERROR: /dev/vd$last did not appear ($ndisks disks expected)"; finish 125; }
fi

say "running /test.sh at uptime $(uptime_s) s"
cd /
sh /test.sh </dev/null
status=$?
say "/test.sh exited with status $status at uptime $(uptime_s) s"
if [ "$status" -ne 0 ]; then
    echo "----- dmesg (last 60 lines) -----"
    dmesg | tail -n 60
    echo "---------------------------------"
fi
finish "$status"
