# Guest: containerd 1.6 (Debian) with lazyblk's remote snapshotter (issue 16). The registry is a
# real docker-registry on 127.0.0.1:5123 serving the storage tests/guest/python-image.sh made on
# the host: python:3.11 (OCI, three gzip layers), its lazy version python:3.11-lazyblk (linked to
# it by `lazyblk convert`) and python:plain (never converted). Pulls go through containerd's CRI
# plugin (`lazyblk-testkit cri-pull`, as the kubelet would), containers run with
# `ctr -n k8s.io run --no-pivot`.
. /guest/lib.sh
REG=127.0.0.1:5123
SOCK=/run/containerd/containerd.sock
SNAP_SOCK=/run/lazyblk/snapshotter.sock
SNAP_ROOT=/var/lib/lazyblk-snapshotter
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
EXPECTED=$(cat /pyimg/expected.txt)
dmesg -c > /dev/null

step "containerd, runc and a docker-registry in the guest"
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || die "mount cgroup2"
mkdir -p /var/lib/containerd /run/containerd /dev/mqueue $SNAP_ROOT /etc/containerd /var/lib/registry
mount -t tmpfs tmpfs /var/lib/containerd || die "tmpfs for containerd"
mount -t tmpfs tmpfs $SNAP_ROOT || die "tmpfs for the snapshotter root"
mount -t mqueue mqueue /dev/mqueue 2> /dev/null || true
echo 'nameserver 127.0.0.1' > /etc/resolv.conf
sed "s#rootdirectory: .*#rootdirectory: /pyreg#; s#level: warn#level: error#" /pyimg/registry.yml > /etc/registry.yml
docker-registry serve /etc/registry.yml > /tmp/registry.log 2>&1 &
mkdir -p "/etc/containerd/certs.d/$REG"
cat > "/etc/containerd/certs.d/$REG/hosts.toml" << EOF
server = "http://$REG"
[host."http://$REG"]
  capabilities = ["pull", "resolve"]
EOF
cat > /etc/containerd/config.toml << EOF
version = 2
[proxy_plugins]
  [proxy_plugins.lazyblk]
    type = "snapshot"
    address = "$SNAP_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  disable_cgroup = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazyblk"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
EOF
containerd --config /etc/containerd/config.toml > /tmp/containerd.log 2>&1 &
wait_for 60 "containerd to answer" ctr version
wait_for 30 "the registry to answer" wget -q -O /dev/null "http://$REG/v2/"
ok "containerd $(ctr version | awk '/Version:/ { print $2; exit }') and the registry are up"

step "baseline: containerd's own overlayfs snapshotter, a normal CRI pull"
# (The CRI default snapshotter is lazyblk; this pull names overlayfs through ctr's config-free
# path: pull with the CRI, run with --snapshotter overlayfs needs the image unpacked for it.)
t0=$(now_ms)
ctr -n k8s.io images pull --plain-http --snapshotter overlayfs "$REG/python:plain" > /tmp/pull0.log 2>&1 || { tail -5 /tmp/pull0.log; die "ctr pull plain"; }
ctr -n k8s.io run --rm --no-pivot --snapshotter overlayfs "$REG/python:plain" c0 > /tmp/c0.out 2>&1 || { cat /tmp/c0.out; die "ctr run plain (overlayfs)"; }
check "the plain image runs on overlayfs ($(secs_since "$t0") s)" grep -q lazyblk-plain-ok /tmp/c0.out

summary
