#!/usr/bin/env bash
# Host driver of the guest test suites: builds release binaries and test images, then boots the
# qemu guest (qemu/run-guest.sh) once per suite. Usage: tests/guest/run.sh [suite...]
# Suites (default: all): e2e, hostile, policies, registry (a token-auth docker-registry in the
# guest), containerd (containerd + runc + lazyblk's snapshotter), handover (dm + loop), dense (64
# devices of 64 images at once, DENSE_N), reliability (one main boot, then RELIABILITY_RESETS boots that reset
# the guest mid-fetch with the cache on a persistent ext4 disk, and a last boot that checks it).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
work=${LAZYBLK_GUEST_WORK:-$top/target/guest-work}
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(e2e hostile policies registry containerd handover dense reliability)

cd "$top"
# LAZYBLK_BIN_DIR: binaries already built (scripts/test passes its test build's); else a release build.
if [[ -n ${LAZYBLK_BIN_DIR:-} ]]; then
    bin=$(cd "$LAZYBLK_BIN_DIR" && pwd)
else
    cargo build --release --locked -p lazyblk-tools -p lazyblk-tests --bins
    bin=$top/target/release
fi
[[ -x $bin/lazyblk && -x $bin/lazyblk-testkit ]] || { echo "run.sh: no lazyblk and lazyblk-testkit in $bin"; exit 1; }

rm -rf "$work" && mkdir -p "$work/www" "$work/expected"
# Image 1: the full test tree; image 2: a smaller, different one.
"$bin/lazyblk-testkit" gen-tree "$work/tree1" --seed 1
"$bin/lazyblk-testkit" gen-tree "$work/tree2" --seed 2
rm -rf "$work/tree2/large"
"$bin/lazyblk" build "$work/tree1" -o "$work/www/img1" --chunk-kib 64
"$bin/lazyblk" build "$work/tree2" -o "$work/www/img2"
"$bin/lazyblk-testkit" digest-tree "$work/tree1" > "$work/expected/img1.txt"
"$bin/lazyblk-testkit" digest-tree "$work/tree2" > "$work/expected/img2.txt"
if [[ " ${suites[*]} " == *" reliability "* ]]; then
    # Image 3: larger (20 MiB of large files), so that misses stay in flight for seconds.
    "$bin/lazyblk-testkit" gen-tree "$work/tree3" --seed 3 --scale 4
    "$bin/lazyblk" build "$work/tree3" -o "$work/www/img3"
    "$bin/lazyblk-testkit" digest-tree "$work/tree3" > "$work/expected/img3.txt"
fi
# The guest gets the binaries without their debug info (a 10x smaller initramfs, faster boots).
mkdir -p "$work/bin"
for b in lazyblk lazyblk-testkit; do
    strip --strip-debug -o "$work/bin/$b" "$bin/$b"
done

# boot SUITE-SCRIPT [run-guest.sh args...]
boot() {
    local script=$1 st
    shift
    for attempt in 1 2; do
        st=0
        bash "$top/qemu/run-guest.sh" --script "$here/$script" \
            --bin "$work/bin/lazyblk" --bin "$work/bin/lazyblk-testkit" \
            --file "$here/lib.sh:/guest/lib.sh" \
            --dir "$work/www:/www" --dir "$work/expected:/expected" "$@" || st=$?
        # 126: the guest kernel died before init (an emulator flake, never a test result).
        [[ $st == 126 && $attempt == 1 ]] || break
        echo "### boot: the guest kernel died before running $script; booting once more"
    done
    return $st
}

# The reliability suite: a main boot, then hard resets of the guest with the cache on a disk.
reliability() {
    local logs=${LAZYBLK_GUEST_LOG_DIR:-${TMPDIR:-/tmp}/lazyblk-guest-logs} stamp i st log
    local resets=${RELIABILITY_RESETS:-2}
    stamp=$(date +%Y%m%d-%H%M%S)-$$
    mkdir -p "$logs"
    boot reliability.sh --timeout 900 --log "$logs/reliability-main-$stamp.log" || return 1
    command -v mkfs.ext4 >/dev/null || { echo "run.sh: mkfs.ext4 is missing (apt-get install e2fsprogs)"; return 1; }
    rm -f "$work/cache-disk.img"
    truncate -s 512M "$work/cache-disk.img" && mkfs.ext4 -q -F -L lazyblk-cache "$work/cache-disk.img" || return 1
    for ((i = 1; i <= resets; i++)); do
        log="$logs/reliability-reset$i-$stamp.log"
        echo "### reliability: hard reset $i of $resets"
        st=0
        boot reliability.sh --disk "$work/cache-disk.img" --append "RELIABILITY_PHASE=reset RESET_ROUND=$i" \
            --timeout 300 --log "$log" || st=$?
        # The reset ends the boot without a marker (status 125): expected, once the guest said so.
        if [[ $st != 125 ]] || ! tr -d '\r' <"$log" | grep -q "^RELIABILITY-RESET-NOW round $i\$" ||
            tr -d '\r' <"$log" | grep -q '^not ok'; then
            echo "### reliability: reset boot $i did not end in the planned reset (status $st); log: $log"
            return 1
        fi
        echo "### reliability: the guest was reset mid-fetch as planned (status $st)"
    done
    # The last boot also compares the page cache with a loop device (util-linux's losetup:
    # busybox's has no --direct-io).
    boot reliability.sh --disk "$work/cache-disk.img" --bin "$(command -v losetup)" \
        --append "RELIABILITY_PHASE=reset-check RESET_ROUND=$((resets + 1))" \
        --timeout 300 --log "$logs/reliability-check-$stamp.log"
}

# The containerd suite: a python image built and converted on the host (tests/guest/python-image.sh)
# into a registry storage directory that the guest's docker-registry serves; containerd, its shim,
# ctr and runc from Debian.
containerd_suite() {
    local t
    for t in containerd containerd-shim-runc-v2 ctr runc docker-registry; do
        command -v $t > /dev/null || { echo "run.sh: $t is missing (scripts/setup installs it)"; return 1; }
    done
    bash "$here/python-image.sh" "$bin/lazyblk" "$work/pyimg" "$work/pyreg" 127.0.0.1:5123 || return 1
    rm -rf "$work/pyimg/L" "$work/pyimg/B" "$work/pyimg/P"
    boot containerd.sh --mem 3072 --timeout 1200 \
        --bin "$(command -v containerd)" --bin "$(command -v containerd-shim-runc-v2)" \
        --bin "$(command -v ctr)" --bin "$(command -v runc)" --bin "$(command -v docker-registry)" \
        --file "$here/containerd-config.sh:/guest/containerd-config.sh" \
        --dir "$work/pyimg:/pyimg" --dir "$work/pyreg:/pyreg"
}

# The dense-node suite: DENSE_N (64) small different images, one supervised daemon each.
dense_suite() {
    bash "$here/dense-images.sh" "$bin" "$work/dense" "${DENSE_N:-64}" || return 1
    boot dense.sh --mem 2048 --timeout 1500 --dir "$work/dense:/dense"
}

rc=0
for s in "${suites[@]}"; do
    echo "### guest suite: $s"
    t0=$SECONDS
    if [[ $s == reliability ]]; then
        reliability && st=0 || st=$?
    elif [[ $s == containerd ]]; then
        containerd_suite && st=0 || st=$?
    elif [[ $s == dense ]]; then
        dense_suite && st=0 || st=$?
    elif [[ $s == registry ]]; then
        command -v docker-registry >/dev/null || { echo "run.sh: docker-registry is missing (scripts/setup installs it)"; exit 1; }
        boot registry.sh --bin "$(command -v docker-registry)" --timeout 900 && st=0 || st=$?
    else
        boot "$s.sh" --timeout 900 && st=0 || st=$?
    fi
    if [[ $st != 0 ]]; then
        echo "### guest suite $s FAILED ($((SECONDS - t0)) s)"
        rc=1
    else
        echo "### guest suite $s: ok ($((SECONDS - t0)) s)"
    fi
done
exit $rc
