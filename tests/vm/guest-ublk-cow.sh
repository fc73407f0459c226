# shellcheck shell=dash
# Guest side of the `lazyblk add --writable` (ublk) test: an ext4 image served by nginx in the
# guest, writable through a COW layer; writes survive del + re-add, the image is untouched, and
# `lazyblk export` / `export-cow` write the guest's view.
. /guest/lib.sh
start_nginx /www 8080
M=http://127.0.0.1:8080/ext/manifest
sha_img_before=$(sha256sum /www/ext/blob | cut -d' ' -f1)

step "add --writable"
DEV=$(lazyblk add "$M" --writable --cow /tmp/cow --cache-dir /tmp/cache) || die "lazyblk add --writable"
check "device is writable" test "$(cat /sys/block/"${DEV#/dev/}"/ro)" = 0
mkdir -p /mnt/a
mount -t ext4 "$DEV" /mnt/a || die "mount ext4"
check "image content readable" test "$(cat /mnt/a/hello.txt)" = "from the image"
echo "written in the guest" >/mnt/a/new.txt
dd if=/dev/urandom of=/mnt/a/big bs=64k count=32 2>/dev/null
s_big=$(sha256sum /mnt/a/big | cut -d' ' -f1)
rm /mnt/a/junk
sync
umount /mnt/a
ID=${DEV#/dev/ublkb}
if lazyblk trace "$ID" --pack -o /tmp/prefetch.pack >/tmp/trace.out 2>&1; then
    die "trace --pack of a writable device succeeded"
fi
check "trace --pack refuses a writable device (its blocks are not the image's)" grep -q "is writable" /tmp/trace.out
lazyblk export "$ID" /tmp/export.img || die "lazyblk export of a writable device"
lazyblk del "$ID" >/dev/null || die "del"

step "re-add: the writes are there"
DEV=$(lazyblk add "$M" --writable --cow /tmp/cow --cache-dir /tmp/cache) || die "re-add"
mount -t ext4 "$DEV" /mnt/a || die "mount after re-add"
check "new file kept" test "$(cat /mnt/a/new.txt)" = "written in the guest"
check "big file kept" test "$(sha256sum /mnt/a/big | cut -d' ' -f1)" = "$s_big"
check "deleted file gone" test ! -e /mnt/a/junk
check "old file kept" test "$(cat /mnt/a/hello.txt)" = "from the image"
fstrim -v /mnt/a 2>/dev/null || echo "(fstrim not supported here)"
umount /mnt/a
lazyblk del "${DEV#/dev/ublkb}" >/dev/null || die "del 2"
check "the image on the server is untouched" test "$(sha256sum /www/ext/blob | cut -d' ' -f1)" = "$sha_img_before"

step "export and export-cow"
lazyblk export-cow "$M" --cow /tmp/cow --cache-dir /tmp/cache -o /tmp/export2.img >/dev/null || die "export-cow"
for img in /tmp/export.img /tmp/export2.img; do
    mount -t ext4 -o loop,ro "$img" /mnt/a || die "mount $img on a loop device"
    check "$img has the new file" test "$(cat /mnt/a/new.txt)" = "written in the guest"
    check "$img has the big file" test "$(sha256sum /mnt/a/big | cut -d' ' -f1)" = "$s_big"
    umount -d /mnt/a
done

step "a read-only add of the same image still sees the image"
DEV=$(lazyblk add "$M" --cache-dir /tmp/cache) || die "read-only add"
check "read-only" test "$(cat /sys/block/"${DEV#/dev/}"/ro)" = 1
mount -t ext4 -o ro,norecovery "$DEV" /mnt/a || die "mount read-only"
check "no guest write in the image" test ! -e /mnt/a/new.txt
umount /mnt/a
lazyblk del "${DEV#/dev/ublkb}" >/dev/null
summary
