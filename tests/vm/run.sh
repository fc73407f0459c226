#!/usr/bin/env bash
# VM image streaming tests (host side, qemu under TCG): `lazyblk vhost` as the vhost-user-blk
# backend of qemu guests, images served by nginx on 127.0.0.1.
#
# usage: tests/vm/run.sh [erofs|root|crash|ublk]...   (default: all, in that order)
#
#   erofs  a guest (qemu/run-guest.sh initramfs) reads an erofs image through vhost-user-blk,
#          read-only, 2 queues: every file's sha256 (lazyblk-testkit digest-tree) matches
#   root   a guest boots with its root file system (ext4 built from busybox, 512 MiB) on a
#          lazily streamed, writable disk: boot 1 writes files, boot 2 sees them; the fetched
#          fraction is reported; export-cow of the disk is fsck clean
#   crash  kill -9 of the backend while the guest writes and syncs in a loop, twice: after a
#          restart every write the guest saw acknowledged (sync returned) is there, and the
#          disk is fsck clean after journal replay
#   ublk   `lazyblk add --writable` (ublk, inside a run-guest.sh guest): writes survive
#          del + re-add, the image is untouched, export / export-cow write the guest's view
#
# Prints one "ok"/"not ok" line per check and ends with "N passed, M failed"; exits non-zero
# on any failure. Work files: ${LAZYBLK_VM_WORK:-target/vm-work}.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VM_TOP=$(cd "$here/../.." && pwd)
# LAZYBLK_BIN_DIR: binaries already built (scripts/test passes its test build's); else a release build.
VM_BIN=${LAZYBLK_BIN_DIR:-$VM_TOP/target/release}
VM_MEM=1024
work=${LAZYBLK_VM_WORK:-$VM_TOP/target/vm-work}
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"
# shellcheck source=../../qemu/lib.sh
. "$VM_TOP/qemu/lib.sh"

suites=("$@")
((${#suites[@]} > 0)) || suites=(erofs root crash ublk)

lg_ensure_cmds qemu-system-x86_64:qemu-system-x86 nginx:nginx-light mkfs.ext4:e2fsprogs \
    e2fsck:e2fsprogs busybox:busybox-static cpio:cpio xz:xz-utils python3:python3 \
    mkfs.erofs:erofs-utils timeout:coreutils

cd "$VM_TOP"
[[ -n ${LAZYBLK_BIN_DIR:-} ]] || cargo build --release --locked -p lazyblk-tools -p lazyblk-tests --bins
VM_BIN=$(cd "$VM_BIN" && pwd)
[[ -x $VM_BIN/lazyblk && -x $VM_BIN/lazyblk-testkit ]] || { echo "run.sh: no lazyblk and lazyblk-testkit in $VM_BIN"; exit 1; }

PASS=0
FAIL=0
ok() {
    PASS=$((PASS + 1))
    echo "ok - $*"
}
notok() {
    FAIL=$((FAIL + 1))
    echo "not ok - $*"
}
check() { # check "description" command...
    local d=$1
    shift
    if "$@"; then ok "$d"; else notok "$d"; fi
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

trap vm_cleanup EXIT
mkdir -p "$work/www"
vm_kernel
vm_nginx_start "$work/www" "$work"
URL=http://127.0.0.1:$VM_PORT
VM_INITRD=$work/initrd.cpio

need_root_image() {
    if [[ ! -f $work/www/root/manifest || $here/root-init.sh -nt $work/root.img || $here/lib.sh -nt $work/root.img ]]; then
        vm_msg "building the root file system image (busybox, ext4, 512 MiB)"
        vm_build_root "$work/root.img"
        "$VM_BIN/lazyblk" build "$work/root.img" -o "$work/www/root" >"$work/build-root.txt"
    fi
    [[ -f $VM_INITRD && ! $here/initrd-init.sh -nt $VM_INITRD ]] || vm_build_initrd "$VM_INITRD"
}

# export_fsck COW LABEL: export the disk (image + COW layer), replay the ext4 journal, then a
# full read-only check must find nothing.
export_fsck() {
    local cow=$1 label=$2 img=$work/export.img out
    rm -f "$img"
    if ! "$VM_BIN/lazyblk" export-cow "$URL/root/manifest" --cache-dir "$work/cache-root" \
        --cow "$cow" -o "$img" >"$work/export.txt" 2>&1; then
        notok "$label: export-cow ($(tail -n 3 "$work/export.txt" | tr '\n' ' '))"
        return
    fi
    e2fsck -E journal_only -y "$img" >"$work/fsck1.txt" 2>&1 || true
    if out=$(e2fsck -fn "$img" 2>&1); then
        ok "$label: fsck clean ($(tail -n 1 <<<"$out"))"
    else
        notok "$label: fsck found problems:"
        head -n 30 <<<"$out" | while IFS= read -r l; do echo "    $l"; done
    fi
    rm -f "$img"
}

# ------------------------------------------------------------------ erofs
suite_erofs() {
    echo "### vm suite: erofs (read-only erofs through vhost-user-blk)"
    local w=$work/erofs
    rm -rf "$w" "$work/www/erofs" && mkdir -p "$w"
    "$VM_BIN/lazyblk-testkit" gen-tree "$w/tree" --seed 5
    "$VM_BIN/lazyblk" build "$w/tree" -o "$work/www/erofs" --chunk-kib 64 >/dev/null
    "$VM_BIN/lazyblk-testkit" digest-tree "$w/tree" >"$w/tree.txt"
    vm_vhost_start "$w/vhost.log" "$w/vhost.sock" "$URL/erofs/manifest" \
        --cache-dir "$w/cache" --once --stats-file "$w/stats.json"
    local qa
    mapfile -t qa < <(vm_qemu_args "$w/vhost.sock" "$VM_MEM")
    if bash qemu/run-guest.sh --script "$here/guest-erofs.sh" --bin "$VM_BIN/lazyblk-testkit" \
        --file "$w/tree.txt:/expected/tree.txt" "${qa[@]}" --timeout 600 >"$w/guest.log" 2>&1; then
        ok "erofs over vhost-user-blk: every file's sha256 matches ($(grep -a 'digest of' "$w/guest.log" | tr -d '\r'))"
    else
        notok "erofs over vhost-user-blk (guest log $w/guest.log)"
        tail -n 30 "$w/guest.log"
    fi
    check "read-only disk with 2 queues" grep -aq 'ro=1, logical block 4096, queues 2' "$w/guest.log"
    wait "$VM_VHOST_PID" 2>/dev/null || true
    VM_VHOST_PID=""
    check "backend reported no errors" test "$(vm_json "$w/stats.json" errors)" = 0
    echo "    $(grep -a 'lazyblk vhost:' "$w/vhost.log" | tail -n 1)"
}

# ------------------------------------------------------------------ root
suite_root() {
    echo "### vm suite: root (boot from a lazily streamed writable root disk)"
    need_root_image
    local cow=$work/cow-root log=$work/vhost-root.log d t0 t1
    rm -rf "$cow" "$work/cache-root" "$log"
    vm_vhost_start "$log" "$work/root.sock" "$URL/root/manifest" --cache-dir "$work/cache-root" \
        --writable --cow "$cow" --stats-file "$work/root-stats.json"
    mapfile -t d < <(vm_vhost_disk "$work/root.sock")
    t0=$(date +%s.%N)
    vm_boot "$work/boot1.log" 600 "lazyblk.mode=write" "${d[@]}" || true
    t1=$(date +%s.%N)
    check "boot 1 reached a shell and wrote files ($(secs "$t0" "$t1") s)" grep -aq 'LAZYBLK-ROOT: WROTE' "$work/boot1.log"
    vm_boot "$work/boot2.log" 600 "lazyblk.mode=verify" "${d[@]}" || true
    check "boot 2 sees the writes of boot 1" grep -aq 'LAZYBLK-ROOT: VERIFY-OK' "$work/boot2.log"
    vm_vhost_stop
    local fetched blob frac
    fetched=$(vm_json "$work/root-stats.json" fetched_bytes)
    blob=$(vm_json "$work/root-stats.json" blob_bytes)
    frac=$(awk -v f="$fetched" -v b="$blob" 'BEGIN { printf "%.1f", 100 * f / b }')
    echo "    two boots fetched $fetched of $blob blob bytes ($frac%); $(grep -a 'lazyblk vhost:' "$log" | tail -n 1)"
    check "less than a quarter of the image was fetched ($frac%)" awk -v f="$fetched" -v b="$blob" 'BEGIN { exit !(f < b / 4) }'
    check "backend reported no errors" test "$(vm_json "$work/root-stats.json" errors)" = 0
    export_fsck "$cow" "root disk after two boots"
}

# ------------------------------------------------------------------ crash
suite_crash() {
    echo "### vm suite: crash (kill -9 of the backend during guest writes)"
    need_root_image
    local cow=$work/cow-crash log=$work/vhost-crash.log round acks want qpid d i
    rm -rf "$cow" "$work/cache-root" "$log" "$work/acked.txt"
    mapfile -t d < <(vm_vhost_disk "$work/crash.sock")
    for round in 1 2; do
        want=$((round * 4))
        vm_vhost_start "$log" "$work/crash.sock" "$URL/root/manifest" --cache-dir "$work/cache-root" \
            --writable --cow "$cow"
        for attempt in 1 2; do
            rm -f "$work/crash$round.log"
            vm_boot_bg "$work/crash$round.log" 600 "lazyblk.mode=crash" "${d[@]}"
            qpid=$VM_QEMU_PID
            for i in $(seq 1200); do
                acks=$(grep -ac '^ACK ' "$work/crash$round.log" 2>/dev/null || true)
                ((acks >= want)) && break
                kill -0 "$qpid" 2>/dev/null || break
                sleep 0.1
            done
            # The kernel panicked before the guest's init printed anything (the TCG flake that
            # vm_boot retries too): nothing reached the disk; boot once more.
            if [[ $attempt == 1 ]] && ! kill -0 "$qpid" 2>/dev/null &&
                grep -aq 'Kernel panic' "$work/crash$round.log" && ! grep -aq 'LAZYBLK' "$work/crash$round.log"; then
                echo "    (the guest kernel panicked before init; booting once more)"
                continue
            fi
            break
        done
        kill -9 "$VM_VHOST_PID"
        wait "$VM_VHOST_PID" 2>/dev/null || true
        VM_VHOST_PID=""
        sleep 1
        kill -TERM "$qpid" 2>/dev/null || true # timeout passes it on to qemu
        wait "$qpid" 2>/dev/null || true
        tr -d '\r' <"$work/crash$round.log" | grep -a '^ACK ' | awk '{ print $2, $3 }' >>"$work/acked.txt" || true
        acks=$(wc -l <"$work/acked.txt")
        check "round $round: the guest had $acks acknowledged (synced) writes when the backend was killed" test "$acks" -ge "$want"
        export_fsck "$cow" "round $round: disk after kill -9"
        vm_vhost_start "$log" "$work/crash.sock" "$URL/root/manifest" --cache-dir "$work/cache-root" \
            --writable --cow "$cow"
        vm_boot "$work/check$round.log" 600 "lazyblk.mode=crashcheck" "${d[@]}" || true
        vm_vhost_stop
        local lost=0 n s
        while read -r n s; do
            if ! tr -d '\r' <"$work/check$round.log" | grep -aqx "HAVE $n $s"; then
                lost=$((lost + 1))
                echo "    lost or changed: /crash/f$n"
            fi
        done <"$work/acked.txt"
        check "round $round: no acknowledged write lost after the restart ($acks checked)" test "$lost" = 0
        check "round $round: the guest mounted the recovered disk" grep -aq 'LAZYBLK-ROOT: CHECKED' "$work/check$round.log"
    done
}

# ------------------------------------------------------------------ ublk
suite_ublk() {
    echo "### vm suite: ublk (lazyblk add --writable, in a guest)"
    local w=$work/ublk
    rm -rf "$w" "$work/www/ext" && mkdir -p "$w/tree" "$w/www"
    echo "from the image" >"$w/tree/hello.txt"
    head -c 1M /dev/urandom >"$w/tree/junk"
    mkfs.ext4 -q -F -b 4096 -E root_owner=0:0 -d "$w/tree" "$w/ext.img" 64M
    "$VM_BIN/lazyblk" build "$w/ext.img" -o "$w/www/ext" >/dev/null
    if bash qemu/run-guest.sh --script "$here/guest-ublk-cow.sh" --bin "$VM_BIN/lazyblk" \
        --file "$VM_TOP/tests/guest/lib.sh:/guest/lib.sh" --dir "$w/www:/www" \
        --timeout 600 >"$w/guest.log" 2>&1; then
        ok "ublk add --writable in a guest ($(tr -d '\r' <"$w/guest.log" | grep -a 'passed, ' | tail -n 1))"
    else
        notok "ublk add --writable in a guest (log $w/guest.log)"
        tr -d '\r' <"$w/guest.log" | grep -a -E '^(ok|not ok|===|---)' | tail -n 30
    fi
}

for s in "${suites[@]}"; do
    case $s in
    erofs | root | crash | ublk) "suite_$s" ;;
    *) vm_die "unknown suite $s (erofs, root, crash, ublk)" ;;
    esac
done
echo "$PASS passed, $FAIL failed"
((FAIL == 0))
