# Guest: containerd 1.6 (Debian) with lazyblk's remote snapshotter (issue 16). The registry is a
# real docker-registry on 127.0.0.1:5123 serving the storage tests/guest/python-image.sh made on
# the host: python:3.11 (OCI, three gzip layers), its lazy version python:3.11-lazyblk (linked to
# it by `lazyblk convert`) and python:plain (never converted). Pulls go through containerd's CRI
# plugin (`lazyblk-testkit cri-pull`, as the kubelet would), containers run with
# `ctr -n k8s.io run --no-pivot`.
. /guest/lib.sh
. /guest/containerd-config.sh
REG=127.0.0.1:5123
SOCK=/run/containerd/containerd.sock
SNAP_SOCK=/run/lazyblk/snapshotter.sock
SNAP_ROOT=/var/lib/lazyblk-snapshotter
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
EXPECTED=$(cat /pyimg/expected.txt)
dmesg -c > /dev/null

# snapshotter_pid: the pid of `lazyblk snapshotter` (no pkill in busybox)
snapshotter_pid() {
    for d in /proc/[0-9]*; do
        case "$(tr '\0' ' ' < "$d/cmdline" 2> /dev/null)" in "lazyblk snapshotter "*) echo "${d#/proc/}" ;; esac
    done
}
start_snapshotter() {
    lazyblk snapshotter --address $SNAP_SOCK --root $SNAP_ROOT --log-file /tmp/lazyblk-daemons.log \
        >> /tmp/snapshotter.log 2>&1 &
    wait_for 30 "the snapshotter's socket" test -S $SNAP_SOCK
}
# downloaded DIGEST...: the digests that containerd's content store holds
downloaded() {
    ctr -n k8s.io content ls -q > /tmp/content.txt
    for d in "$@"; do
        if grep -qx "$d" /tmp/content.txt; then echo "$d"; fi
    done
}
# run_py NAME IMAGE OUT: run a container of IMAGE on the lazyblk snapshotter
run_py() { ctr -n k8s.io run --rm --no-pivot --snapshotter lazyblk "$2" "$1" > "$3" 2>&1; }

step "containerd, runc and a docker-registry in the guest"
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || die "mount cgroup2"
mkdir -p /var/lib/containerd /run/containerd /dev/mqueue $SNAP_ROOT /etc/containerd /var/lib/registry
mount -t tmpfs tmpfs /var/lib/containerd || die "tmpfs for containerd"
mount -t tmpfs tmpfs $SNAP_ROOT || die "tmpfs for the snapshotter root"
mount -t mqueue mqueue /dev/mqueue 2> /dev/null || true
echo 'nameserver 127.0.0.1' > /etc/resolv.conf
sed "s#rootdirectory: .*#rootdirectory: /pyreg#; s#level: warn#level: error#" /pyimg/registry.yml > /etc/registry.yml
docker-registry serve /etc/registry.yml > /tmp/registry.log 2>&1 &
registry_hosts /etc/containerd/certs.d "$REG"
containerd_config lazyblk "$SNAP_SOCK" /etc/containerd/certs.d > /etc/containerd/config.toml
# The snapshotter starts before containerd (as its service would on a node): containerd's proxy
# dials it once at start and fails RPCs fast while that connection is in backoff.
start_snapshotter
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
# Forget it (its base layers are python:3.11's too): the lazy pull below must start from nothing.
ctr -n k8s.io images rm --sync "$REG/python:plain" > /dev/null
for d in $(cat /pyimg/plain-layers.txt); do ctr -n k8s.io content rm "$d" > /dev/null 2>&1; done
got=$(downloaded $(cat /pyimg/plain-layers.txt))
check "containerd's content store holds none of the layers again (held: ${got:-none})" test -z "$got"

step "the lazyblk snapshotter: a CRI pull of an image with a lazy version downloads no layer"
check "the snapshotter's socket is root's alone (0600)" sh -c "[ \"\$(stat -c %a $SNAP_SOCK)\" = 600 ]"
t0=$(now_ms)
ID=$(lazyblk-testkit cri-pull --timeout 300 "$REG/python:3.11" 2> /tmp/pull1.err) || { cat /tmp/pull1.err; tail -20 /tmp/snapshotter.log; die "CRI pull of python:3.11"; }
pull_s=$(secs_since "$t0")
ok "CRI pull of python:3.11 in $pull_s s (image $ID)"
got=$(downloaded $(cat /pyimg/layers.txt))
check "no layer blob of python:3.11 was downloaded (held: ${got:-none})" test -z "$got"
check "one lazyblk device serves the image" sh -c "[ \$(lazyblk list | grep -c ublkb) -eq 1 ]"
t1=$(now_ms)
run_py c1 "$REG/python:3.11" /tmp/c1.out || { cat /tmp/c1.out; tail -20 /tmp/snapshotter.log; die "ctr run python:3.11 on lazyblk"; }
first_s=$(secs_since "$t1")
check "python started from the lazy image (run in $first_s s)" grep -q '^lazyblk-python-ok 3.11.* {"gone": true}' /tmp/c1.out
check "the file it read has the right bytes" grep -qx "$EXPECTED" /tmp/c1.out
DEVID=$(lazyblk list | awk '/ublkb/ { print $1; exit }')
lazyblk status "$DEVID" > /tmp/status1.txt
pct=$(lazyblk list | awk -v id="$DEVID" '$1 == id { for (i = 1; i <= NF; i++) if ($i ~ /%$/) { sub("%", "", $i); print $i; exit } }')
check "only part of the image was fetched (${pct}% present)" awk -v p="$pct" 'BEGIN { exit !(p != "" && p + 0 < 60) }'
ctr -n k8s.io snapshots --snapshotter lazyblk ls > /tmp/snaps1.txt
check "the snapshotter lists the image's layers" sh -c "[ \$(grep -c Committed /tmp/snaps1.txt) -ge 3 ]"

step "kill -9 of the snapshotter and of the lazyblk daemon while a container reads files"
tc qdisc add dev lo root netem delay 20ms rate 20mbit || die "tc netem"
ctr -n k8s.io run --rm --no-pivot --snapshotter lazyblk "$REG/python:3.11" c2 python3 -c '
import os, hashlib, time
n = 0
for root, dirs, files in os.walk("/usr/lib/python3.11"):
    for f in sorted(files):
        if os.path.islink(os.path.join(root, f)):
            continue
        with open(os.path.join(root, f), "rb") as fh:
            hashlib.sha256(fh.read()).hexdigest()
        n += 1
print("walked", n, flush=True)
' > /tmp/c2.out 2>&1 &
C2=$!
sleep 3
kill -0 $C2 2> /dev/null || { cat /tmp/c2.out; die "the reading container finished within 3 s: nothing was in flight"; }
SP=$(snapshotter_pid)
DP=$(daemon_pid "$DEVID")
[ -n "$SP" ] && [ -n "$DP" ] || { lazyblk list; cat "/run/lazyblk/$DEVID.json"; die "no snapshotter ($SP) or daemon ($DP) pid"; }
kill -9 $SP
kill -9 "$DP"
wait_for 10 "the snapshotter $SP to die" pid_gone "$SP"
start_snapshotter
wait_for 60 "containerd to reach the restarted snapshotter" sh -c "ctr -n k8s.io snapshots --snapshotter lazyblk ls > /dev/null 2>&1"
wait_for 300 "the reading container to finish" pid_gone $C2
c2rc=0; wait $C2 || c2rc=$?
[ $c2rc = 0 ] || { cat /tmp/c2.out; tail -20 /tmp/snapshotter.log; }
tc qdisc del dev lo root
check "the container finished with the right output (status $c2rc)" sh -c "[ $c2rc = 0 ] && grep -q '^walked [0-9]' /tmp/c2.out"
ctr -n k8s.io snapshots --snapshotter lazyblk ls > /tmp/snaps2.txt
sort /tmp/snaps1.txt > /tmp/snaps1.sorted; sort /tmp/snaps2.txt > /tmp/snaps2.sorted
check "the restarted snapshotter lists the same snapshots" cmp -s /tmp/snaps1.sorted /tmp/snaps2.sorted
run_py c3 "$REG/python:3.11" /tmp/c3.out || { cat /tmp/c3.out; die "a new container after the restarts"; }
check "a new container starts after the restarts" grep -q '^lazyblk-python-ok' /tmp/c3.out

step "fallback: an image with no lazy version is unpacked by containerd"
lazyblk-testkit cri-pull --timeout 300 "$REG/python:plain" > /dev/null 2> /tmp/pull2.err || { cat /tmp/pull2.err; tail -20 /tmp/snapshotter.log; die "CRI pull of python:plain"; }
app=$(tail -1 /pyimg/plain-layers.txt)
got=$(downloaded "$app")
check "its own layer was downloaded" test -n "$got"
run_py c4 "$REG/python:plain" /tmp/c4.out || { cat /tmp/c4.out; tail -20 /tmp/snapshotter.log; die "ctr run python:plain on lazyblk"; }
check "the plain image runs on the lazyblk snapshotter" grep -q '^lazyblk-plain-ok' /tmp/c4.out
check "its base (an intermediate layer of the lazy image) was unpacked once for it" \
    sh -c "[ \$(grep -c \"intermediate layer for another image\" /tmp/snapshotter.log) -eq 1 ]"

step "removing the image releases its device; containerd's GC and Cleanup leave nothing behind"
ctr -n k8s.io images rm --sync "$REG/python:3.11" "$REG/python@$(ctr -n k8s.io images ls | awk -v r="$REG/python:3.11" '$1 == r { print $3 }')" "$ID" > /tmp/rm.log 2>&1
ctr -n k8s.io images ls -q | grep "python:3.11\|$ID" | while read -r r; do ctr -n k8s.io images rm --sync "$r" > /dev/null 2>&1; done
TOP=$(sed -n 's/.*remote snapshot target="\([^"]*\)".* top=true.*/\1/p' /tmp/snapshotter.log | tail -1)
[ -n "$TOP" ] || die "no top layer in the snapshotter's log"
gone() { ! ctr -n k8s.io snapshots --snapshotter lazyblk ls | grep -q "^$TOP "; }
# poll SECONDS COMMAND...: whether COMMAND succeeds within SECONDS
poll() { p_n=$(($1 * 10)); shift; until "$@"; do p_n=$((p_n - 1)); [ $p_n -gt 0 ] || return 1; sleep 0.1; done; }
if ! poll 60 gone || ! poll 30 no_ublk_devices; then
    ctr -n k8s.io snapshots --snapshotter lazyblk ls; ctr -n k8s.io images ls -q; lazyblk list; tail -20 /tmp/snapshotter.log
    die "the image's device was not released"
fi
ok "no lazyblk device once the image is gone"
run_py c5 "$REG/python:plain" /tmp/c5.out || { cat /tmp/c5.out; die "python:plain after the release"; }
check "the plain image still runs (its unpacked base needs no device)" grep -q '^lazyblk-plain-ok' /tmp/c5.out
check "no image directory left under the snapshotter root" sh -c "[ -z \"\$(ls $SNAP_ROOT/images 2> /dev/null)\" ]"

step "lazyblk add <src-ref> of a converted layered image (OCI, Docker schema 2): the tree umoci unpacks"
# tests/images/layered.sh: whiteouts, an opaque directory, a file turned into a directory and
# back, hardlinks across layers, owners, modes, xattrs, capabilities, device nodes, sparse.
mkdir -p /mnt/layered
for t in oci v2s2; do
    DEV=$(lazyblk add "$REG/layered:$t" 2> /tmp/add-layered.err) || { cat /tmp/add-layered.err; die "lazyblk add $REG/layered:$t"; }
    grep -q "layered:$t has a lazy version $REG/layered.*@sha256:[0-9a-f]\{64\}, using it" /tmp/add-layered.err ||
        { cat /tmp/add-layered.err; die "add of layered:$t did not say it uses the lazy version"; }
    ok "add of layered:$t says it uses the lazy version: $(cat /tmp/add-layered.err)"
    mount -t erofs -o ro "$DEV" /mnt/layered || die "mount $DEV (layered:$t)"
    lazyblk-testkit digest-tree /mnt/layered > /tmp/layered.txt
    umount /mnt/layered
    lazyblk del "${DEV#/dev/ublkb}" > /dev/null 2>&1 || die "lazyblk del $DEV"
    if ! cmp -s /tmp/layered.txt /pyimg/layered-expected.txt; then
        diff /pyimg/layered-expected.txt /tmp/layered.txt | head -20
        die "layered:$t: the device's tree differs from umoci unpack of the source"
    fi
    ok "layered:$t through its source reference: $(wc -l < /tmp/layered.txt) entries equal umoci unpack's (content, modes, owners, xattrs, links)"
done

step "a converted image whose registry is down at pull: a clear error, never a hang"
for p in $(pidof docker-registry); do kill "$p"; done
wait_for 10 "the registry to stop" sh -c "! wget -q -O /dev/null http://$REG/v2/"
t0=$(now_ms)
if lazyblk-testkit cri-pull --timeout 200 "$REG/python:3.11" > /tmp/pull3.out 2> /tmp/pull3.err; then
    die "a pull with the registry down succeeded"
fi
took=$(secs_since "$t0")
cat /tmp/pull3.err
check "the pull failed in $took s with an error naming the image" grep -q "python:3.11" /tmp/pull3.err
check "and did not hang (under 120 s)" awk -v t="$took" 'BEGIN { exit !(t < 120) }'
summary
