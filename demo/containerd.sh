#!/bin/sh
# The containerd part of the demo: a python image (made with umoci, converted with
# `lazyblk convert`, in a docker-registry on 127.0.0.1:5123), pulled through containerd's CRI
# plugin onto the lazyblk snapshotter, then run. Usage: sh demo/containerd.sh PYIMG PYREG
set -eu
pyimg=$1 pyreg=$2
for f in "$(dirname "$0")/../tests/guest/containerd-config.sh" /demo/containerd-config.sh; do
    if [ -f "$f" ]; then . "$f"; break; fi
done
state=${TMPDIR:-/tmp}/lazyblk-demo-ctr
REG=127.0.0.1:5123
rm -rf "$state" && mkdir -p "$state/containerd" "$state/snap" "$state/certs.d/$REG" /run/lazyblk
echo "--- containerd with the lazyblk snapshotter"
[ -f /sys/fs/cgroup/cgroup.controllers ] || { mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; }
[ -d /dev/mqueue ] || { mkdir -p /dev/mqueue; mount -t mqueue mqueue /dev/mqueue 2> /dev/null || true; }
[ -e /etc/resolv.conf ] || echo 'nameserver 127.0.0.1' > /etc/resolv.conf
sed "s#rootdirectory: .*#rootdirectory: $pyreg#" "$pyimg/registry.yml" > "$state/registry.yml"
docker-registry serve "$state/registry.yml" > "$state/registry.log" 2>&1 &
regpid=$!
registry_hosts "$state/certs.d" $REG
containerd_config lazyblk "$state/snapshotter.sock" "$state/certs.d" \
    "$state/containerd/root" "$state/containerd/state" "$state/containerd.sock" > "$state/config.toml"
echo "\$ lazyblk snapshotter --address $state/snapshotter.sock --root $state/snap"
lazyblk snapshotter --address "$state/snapshotter.sock" --root "$state/snap" \
    --cache-dir "$state/cache" --log-file "$state/daemons.log" > "$state/snapshotter.log" 2>&1 &
snappid=$!
i=0; until [ -S "$state/snapshotter.sock" ] || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
containerd --config "$state/config.toml" > "$state/containerd.log" 2>&1 &
ctrdpid=$!
C="ctr --address $state/containerd.sock -n k8s.io"
i=0; until $C version > /dev/null 2>&1 || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
cleanup() {
    $C containers rm demo-py > /dev/null 2>&1 || true
    kill $ctrdpid $snappid $regpid 2> /dev/null || true
    sleep 1
    lazyblk del --all > /dev/null 2>&1 || true
    umount "$state/snap/images/"*/mnt 2> /dev/null || true
}
trap cleanup EXIT
echo "\$ (CRI) PullImage $REG/python:3.11   (as the kubelet would; python:3.11 has a lazy version)"
lazyblk-testkit cri-pull --socket "$state/containerd.sock" "$REG/python:3.11"
echo "\$ ctr -n k8s.io content ls   (no layer blob: only the manifest and the config came down)"
$C content ls | awk '{ print $1, $2 }'
echo "\$ ctr -n k8s.io run --snapshotter lazyblk $REG/python:3.11 demo-py"
$C run --rm --no-pivot --snapshotter lazyblk "$REG/python:3.11" demo-py
lazyblk list
echo "--- containerd demo done"
