# shellcheck shell=dash
# Guest side of the erofs read test: the vhost-user-blk disk is /dev/vda (read-only, erofs).
set -e
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -lt 300 ] || { echo "no /dev/vda"; exit 1; }
    sleep 0.1
done
echo "vda: size $(cat /sys/block/vda/size) sectors, ro=$(cat /sys/block/vda/ro), logical block $(cat /sys/block/vda/queue/logical_block_size), queues $(ls /sys/block/vda/mq | wc -l)"
[ "$(cat /sys/block/vda/ro)" = 1 ] || { echo "FAIL: the disk is not read-only"; exit 1; }
[ "$(ls /sys/block/vda/mq | wc -l)" = 2 ] || { echo "FAIL: expected 2 queues"; exit 1; }
mount -t erofs -o ro /dev/vda /mnt
t0=$(cut -d' ' -f1 /proc/uptime)
lazyblk-testkit digest-tree /mnt >/tmp/got.txt
t1=$(cut -d' ' -f1 /proc/uptime)
echo "digest of $(wc -l </tmp/got.txt) entries in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }') s"
if ! cmp -s /tmp/got.txt /expected/tree.txt; then
    echo "FAIL: tree digest differs"
    diff /expected/tree.txt /tmp/got.txt | head -20
    exit 1
fi
# Concurrent readers of the same cold data (parallel misses on both queues).
echo 3 >/proc/sys/vm/drop_caches
for f in $(find /mnt -type f | head -40); do sha256sum "$f" >/dev/null & done
wait
umount /mnt
echo "PASS: every file's digest matches"
