#!/usr/bin/env bash
# Runs a shell script as the test of a throwaway qemu guest (TCG) that boots
# Debian's 6.12 cloud kernel (ublk, nbd, erofs, overlay, loop, device-mapper, netem, veth).
#
# usage: qemu/run-guest.sh --script <guest-test.sh> [--bin <host binary>]...
#          [--file <hostpath>:<guestpath>]... [--dir <hostdir>:<guestdir>]...
#          [--disk <raw image>]... [--mem MB] [--timeout SECONDS]
#          [--append "extra kernel args"] [--log <file>] [--qemu-arg <arg>]...
#
# Exit status: the status of the guest script (from its LAZYBLK-GUEST-EXIT=<n>
# line); 124 when --timeout expired; 126 when the kernel died before the guest's init ran
# (an emulator flake: callers may boot again); 125 when the guest never printed the
# marker (kernel panic, init failure, qemu failed to start) or a module did not
# load; 1 for host-side errors (missing tool, kernel, module or file); 2 for usage.
# See qemu/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

usage() {
    sed -n '5,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# Root modules (path under kernel/ without .ko.xz is not needed: names are
# resolved in the module tree). Their dependencies are added transitively.
# Built-in ones (virtio_pci in this kernel) are skipped.
GUEST_MODULES=(ublk_drv erofs overlay nbd loop dm_mod sch_netem veth virtio_pci virtio_blk)

script=""
bins=()
files=()
dirs=()
disks=()
mem=2048
timeout_s=900
append=""
log=""
qemu_args=()
while (($# > 0)); do
    case $1 in
    --script) script=${2:?--script needs a path}; shift 2 ;;
    --bin) bins+=("${2:?--bin needs a path}"); shift 2 ;;
    --file) files+=("${2:?--file needs host:guest}"); shift 2 ;;
    --dir) dirs+=("${2:?--dir needs hostdir:guestdir}"); shift 2 ;;
    --disk) disks+=("${2:?--disk needs a path}"); shift 2 ;;
    --mem) mem=${2:?--mem needs MB}; shift 2 ;;
    --timeout) timeout_s=${2:?--timeout needs seconds}; shift 2 ;;
    --append) append=${2?--append needs a string}; shift 2 ;;
    --log) log=${2:?--log needs a path}; shift 2 ;;
    --qemu-arg) qemu_args+=("${2?--qemu-arg needs an argument}"); shift 2 ;;
    -h | --help) usage ;;
    *) printf 'lazyblk-guest: unknown argument: %s\n' "$1" >&2; usage ;;
    esac
done
[[ -n $script ]] || { printf 'lazyblk-guest: --script is required\n' >&2; usage; }
[[ -f $script ]] || die "guest script not found: $script"
[[ $mem =~ ^[0-9]+$ ]] || die "--mem must be a number of MB, got: $mem"
[[ $timeout_s =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, got: $timeout_s"
((${#disks[@]} <= 26)) || die "at most 26 --disk images"

lg_ensure_cmds \
    qemu-system-x86_64:qemu-system-x86 xz:xz-utils cpio:cpio gzip:gzip nginx:nginx-light \
    ip:iproute2 tc:iproute2 ldd:libc-bin timeout:coreutils flock:util-linux \
    apt-get:apt apt-cache:apt dpkg-deb:dpkg

kdir=$(bash "$here/setup-kernel.sh") || die "qemu/setup-kernel.sh failed"
[[ -f $kdir/vmlinuz && -d $kdir/modules/kernel ]] || die "kernel cache $kdir is incomplete (no vmlinuz or modules/kernel)"
kver=$(cat "$kdir/kernel-release")

work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-guest.XXXXXX")
if [[ -n ${LAZYBLK_GUEST_KEEP:-} ]]; then
    lg_msg "keeping the work dir $work (LAZYBLK_GUEST_KEEP)"
else
    trap 'rm -rf "$work"' EXIT
fi
root="$work/root"
t_build=$(date +%s.%N)

# ---------------------------------------------------------------- layout
# Merged /usr, like the host: /bin, /sbin, /lib, /lib64 are symlinks into /usr,
# so every path ldd prints resolves in the guest.
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc/lazyblk,proc,sys,dev,tmp,run,mnt,root,var/log/nginx,var/lib/nginx,var/tmp,var/lock,usr/share/nginx}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp" "$root/var/tmp"

# put_file SRC GUESTPATH: copy SRC's content (symlinks followed) to GUESTPATH,
# replacing whatever is there. Removing first matters: the busybox applets are
# symlinks, and copying onto one would follow it.
put_file() {
    local src=$1 dest=$root$2
    [[ -e $src ]] || die "file not found: $src"
    mkdir -p "$(dirname "$dest")"
    rm -f "$dest"
    cp -L --preserve=mode "$src" "$dest" || die "cannot copy $src to $2"
}

# Shared libraries of an ELF file, one absolute path a line, from ldd.
ldd_closure() {
    local f=$1 out
    if ! out=$(ldd "$f" 2>&1); then
        if grep -q 'not a dynamic executable' <<<"$out"; then
            return 0
        fi
        die "ldd $f failed: $(tr '\n' ' ' <<<"$out")"
    fi
    if grep -q 'not found' <<<"$out"; then
        die "ldd $f: missing libraries: $(grep 'not found' <<<"$out" | tr '\n' ' ')"
    fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$out"
}

# put_exe SRC GUESTPATH: an executable with its ldd closure, shadowing any
# busybox applet of the same name.
put_exe() {
    local src=$1 dest=$2 name lib libs
    name=${dest##*/}
    rm -f "$root/usr/bin/$name" "$root/usr/sbin/$name"
    put_file "$src" "$dest"
    libs=$(ldd_closure "$src") || exit 1
    while IFS= read -r lib; do
        [[ -z $lib || -e $root$lib ]] || put_file "$lib" "$lib"
    done <<<"$libs"
}

# ---------------------------------------------------------------- busybox
# Debian's regular (dynamic) busybox, unpacked from its .deb into the cache, not
# busybox-static: the static build has FEATURE_SH_STANDALONE and
# FEATURE_PREFER_APPLETS, so its sh, env, timeout, xargs... run their own
# applet for "tc", "ip", "xz", "nbd-client" instead of the real binary on PATH.
bbdir=$(lg_cache_deb busybox) || die "cannot fetch Debian's busybox package"
bb=""
for f in "$bbdir/root/bin/busybox" "$bbdir/root/usr/bin/busybox"; do
    if [[ -x $f ]]; then
        bb=$f
        break
    fi
done
[[ -n $bb ]] || die "no bin/busybox in $bbdir"
put_exe "$bb" /usr/bin/busybox
while IFS= read -r applet; do
    case $applet in
    */busybox) ;;
    bin/* | usr/bin/*) ln -sf /usr/bin/busybox "$root/usr/bin/${applet##*/}" ;;
    sbin/* | usr/sbin/*) ln -sf /usr/bin/busybox "$root/usr/sbin/${applet##*/}" ;;
    esac
done < <("$bb" --list-full)
[[ -L $root/usr/bin/sh ]] || die "busybox has no sh applet"
if "$bb" sh -c 'type tc' 2>/dev/null | grep -qv /; then
    die "$bb prefers its own applets over PATH (FEATURE_SH_STANDALONE); it cannot run the guest"
fi

# The dynamic loader, whatever ldd lists.
put_file /lib64/ld-linux-x86-64.so.2 /lib64/ld-linux-x86-64.so.2

# ---------------------------------------------------------------- etc
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
tty:x:5:
disk:x:6:
www-data:x:33:
nogroup:x:65534:
EOF
cat >"$root/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
shadow: files
hosts: files
networks: files
protocols: files
services: files
EOF
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf 'lazyblk-guest\n' >"$root/etc/hostname"
for f in /etc/protocols /etc/services; do
    [[ -f $f ]] && put_file "$f" "$f"
done
: >"$root/etc/fstab"

# ---------------------------------------------------------------- nginx, ip, tc
put_exe "$(command -v nginx)" /usr/sbin/nginx
[[ -f /etc/nginx/mime.types ]] || die "/etc/nginx/mime.types not found (is nginx installed?)"
put_file /etc/nginx/mime.types /etc/nginx/mime.types
put_exe "$(command -v ip)" /usr/sbin/ip
put_exe "$(command -v tc)" /usr/sbin/tc
if [[ -d /etc/iproute2 ]]; then
    cp -a /etc/iproute2 "$root/etc/"
fi
tcdata=0
for d in /usr/lib/x86_64-linux-gnu/tc /usr/lib/tc /lib/tc; do
    if [[ -d $d && ! -e $root$d ]]; then
        mkdir -p "$root$(dirname "$d")"
        cp -a "$d" "$root$d"
        tcdata=1
    fi
done
((tcdata)) || lg_msg "WARNING: no tc distribution tables (/usr/lib/tc, /usr/lib/x86_64-linux-gnu/tc): netem jitter distributions will not work"

# ---------------------------------------------------------------- modules
modsrc="$kdir/modules"
declare -A modpath=() builtin=() visited=()
while IFS= read -r f; do
    n=${f##*/}
    n=${n%.ko.xz}
    modpath[${n//-/_}]=$f
done < <(find "$modsrc/kernel" -name '*.ko.xz')
((${#modpath[@]} > 0)) || die "no *.ko.xz modules under $modsrc/kernel"
if [[ -f $modsrc/modules.builtin ]]; then
    while IFS= read -r f; do
        n=${f##*/}
        n=${n%.ko}
        builtin[${n//-/_}]=1
    done <"$modsrc/modules.builtin"
fi
modorder=()
add_module() {
    local n=${1//-/_} dep deps
    [[ -z ${visited[$n]:-} ]] || return 0
    visited[$n]=1
    if [[ -n ${builtin[$n]:-} ]]; then
        return 0
    fi
    [[ -n ${modpath[$n]:-} ]] || die "kernel module $n not found in $modsrc (neither a module nor built in)"
    deps=$(xz -dc "${modpath[$n]}" | tr '\0' '\n' | awk '/^depends=/ && !seen { print substr($0, 9); seen = 1 }') ||
        die "cannot read the modinfo of ${modpath[$n]}"
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    modorder+=("$n")
}
for m in "${GUEST_MODULES[@]}"; do
    add_module "$m"
done
mkdir -p "$root/lib/modules/$kver"
for n in "${modorder[@]}"; do
    xz -dc "${modpath[$n]}" >"$root/lib/modules/$kver/$n.ko" || die "cannot decompress ${modpath[$n]}"
done
printf '%s\n' "${modorder[@]}" >"$root/etc/lazyblk/modules"
printf '%s\n' "${#disks[@]}" >"$root/etc/lazyblk/disks"

# ---------------------------------------------------------------- user content
for b in "${bins[@]}"; do
    [[ -f $b && -x $b ]] || die "--bin $b: not an executable file"
    put_exe "$b" "/usr/bin/${b##*/}"
done
guest_path_ok() {
    [[ $1 == /* && $1 != / ]] || die "$2: the guest path must be absolute (got '$1')"
    case $1 in
    /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) die "$2: $1 is hidden by a pseudo filesystem in the guest" ;;
    esac
}
for spec in "${files[@]}"; do
    [[ $spec == *:* ]] || die "--file $spec: expected <hostpath>:<guestpath>"
    src=${spec%:*}
    dst=${spec##*:}
    guest_path_ok "$dst" "--file $spec"
    [[ -f $src ]] || die "--file $spec: $src is not a file"
    [[ $dst == */ ]] && dst=$dst${src##*/}
    put_file "$src" "$dst"
done
for spec in "${dirs[@]}"; do
    [[ $spec == *:* ]] || die "--dir $spec: expected <hostdir>:<guestdir>"
    src=${spec%:*}
    dst=${spec##*:}
    guest_path_ok "$dst" "--dir $spec"
    [[ -d $src ]] || die "--dir $spec: $src is not a directory"
    mkdir -p "$root$dst"
    cp -a "$src/." "$root$dst/" || die "--dir $spec: copy failed"
done
for d in "${disks[@]}"; do
    [[ -f $d || -b $d ]] || die "--disk $d: no such image"
done

put_file "$here/guest-init.sh" /init
chmod 755 "$root/init"
put_file "$script" /test.sh
chmod 755 "$root/test.sh"

# ---------------------------------------------------------------- initramfs
# Uncompressed cpio: under TCG the guest's gunzip costs more than loading the
# larger file does (see README.md).
initrd="$work/initrd.cpio"
case ${LAZYBLK_GUEST_INITRD_COMPRESS:-none} in
none) compress=(cat) ;;
gzip) compress=(gzip -1) ;;
*) die "LAZYBLK_GUEST_INITRD_COMPRESS must be none or gzip" ;;
esac
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | "${compress[@]}" >"$initrd" ||
    die "cpio failed"
t_built=$(date +%s.%N)
lg_msg "initramfs: $(du -m "$initrd" | cut -f1) MiB, ${#modorder[@]} modules (${modorder[*]}), built in $(awk -v a="$t_build" -v b="$t_built" 'BEGIN { printf "%.1f", b - a }') s"

# ---------------------------------------------------------------- run
if [[ -z $log ]]; then
    logdir=${LAZYBLK_GUEST_LOG_DIR:-${TMPDIR:-/tmp}/lazyblk-guest-logs}
    mkdir -p "$logdir"
    sname=${script##*/}
    log="$logdir/${sname%.sh}-$(date +%Y%m%d-%H%M%S)-$$.log"
fi
mkdir -p "$(dirname "$log")"
{
    echo "lazyblk-guest: script=$script kernel=$kver mem=${mem}M timeout=${timeout_s}s disks=${disks[*]:-none}"
    echo "lazyblk-guest: append=console=ttyS0 quiet panic=-1 $append"
} >"$log"

# shellcheck disable=SC2054 # the commas are qemu's
qemu=(
    qemu-system-x86_64
    -nodefaults -no-user-config
    -accel tcg,thread=multi -cpu max -m "$mem" -smp 2
    -display none -monitor none
    -chardev "stdio,id=con0,signal=off,logfile=$(lg_qemu_escape "$log"),logappend=on"
    -serial chardev:con0
    -nic none -no-reboot
    -kernel "$kdir/vmlinuz" -initrd "$initrd"
    -append "console=ttyS0 quiet panic=-1 $append"
)
for d in "${disks[@]}"; do
    qemu+=(-drive "file=$(lg_qemu_escape "$d"),if=virtio,format=raw,cache=unsafe")
done
qemu+=("${qemu_args[@]}")

lg_msg "booting (log: $log, timeout ${timeout_s} s)"
t_start=$(date +%s.%N)
set +e
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2> >(tee "$work/qemu.stderr" >&2)
rc=$?
wait "$!" 2>/dev/null # the tee of qemu's stderr
set -e
t_end=$(date +%s.%N)
elapsed=$(awk -v a="$t_start" -v b="$t_end" 'BEGIN { printf "%.1f", b - a }')
if [[ -s $work/qemu.stderr ]]; then
    { echo "----- qemu stderr -----"; cat "$work/qemu.stderr"; } >>"$log"
fi

# The last line that is exactly the marker (the serial console adds \r).
marker=$(tr -d '\r' <"$log" | grep -a -E '^LAZYBLK-GUEST-EXIT=[0-9]+$' | tail -n 1) || true
report() {
    printf 'lazyblk-guest: %s\n' "$*" | tee -a "$log" >&2
}
if [[ $rc == 124 || $rc == 137 ]]; then
    if [[ -n $marker ]]; then
        report "WARNING: qemu did not power off within ${timeout_s} s after the guest finished; using its marker"
    else
        report "TIMEOUT: the guest did not finish within ${timeout_s} s; qemu killed after ${elapsed} s. Log: $log"
        exit 124
    fi
fi
if [[ -z $marker ]] && ! tr -d '\r' <"$log" | grep -a -q '^LAZYBLK-GUEST: init started'; then
    # The kernel died before the guest's init ran (seen: an int3 Oops in early boot under
    # multi-threaded TCG): the emulator, not the test. Callers may boot again.
    report "FAILED: the guest kernel died before init ran; qemu exit status $rc after ${elapsed} s. Log: $log"
    exit 126
fi
if [[ -z $marker ]]; then
    report "FAILED: no LAZYBLK-GUEST-EXIT line (kernel panic, init failure or qemu failed to start); qemu exit status $rc after ${elapsed} s. Log: $log"
    exit 125
fi
status=${marker#LAZYBLK-GUEST-EXIT=}
report "guest exit status $status; qemu ran ${elapsed} s. Log: $log"
exit "$status"
