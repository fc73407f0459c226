#!/bin/busybox sh
# shellcheck shell=dash
# /init of the tiny initramfs that boots a root file system from the vhost-user-blk disk.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in /lib/modules/*.ko; do insmod "$m" || echo "initrd: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -lt 600 ] || { echo "initrd: no /dev/vda"; poweroff -f; }
    sleep 0.05
done
mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
