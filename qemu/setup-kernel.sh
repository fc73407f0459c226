#!/usr/bin/env bash
# Downloads Debian's 6.12 cloud kernel once and unpacks it (never installs it)
# into a versioned cache dir, then prints that dir on stdout:
#
#   <cache>/<package>_<version>/vmlinuz          the kernel
#   <cache>/<package>_<version>/modules/         lib/modules/<release> of the package
#   <cache>/<package>_<version>/kernel-release   e.g. 6.12.117+deb12-cloud-amd64
#   <cache>/<package>_<version>/config           the kernel's .config
#
# <cache> is ${LAZYBLK_GUEST_CACHE:-${HOME:-/root}/.cache/lazyblk-guest}. The exact package
# (linux-image-6.12.<x>+deb12-cloud-amd64) is resolved from the meta package
# ${LAZYBLK_GUEST_KERNEL_META:-linux-image-6.12-cloud-amd64}; nothing is hard-coded.
# Idempotent and safe to run concurrently (flock). Exits non-zero with one
# "lazyblk-guest: ERROR: ..." line when something is missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

meta=${LAZYBLK_GUEST_KERNEL_META:-linux-image-6.12-cloud-amd64}
cache_root=${LAZYBLK_GUEST_CACHE:-${HOME:-/root}/.cache/lazyblk-guest}

lg_ensure_cmds apt-cache:apt apt-get:apt dpkg-deb:dpkg flock:util-linux xz:xz-utils

# Prints "<package> <version>" of the kernel the meta package depends on, or nothing.
resolve() {
    local pkg ver
    pkg=$(apt-cache depends "$meta" 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }') || true
    [[ -n $pkg ]] || return 0
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }') || true
    [[ -n $ver && $ver != "(none)" ]] || return 0
    printf '%s %s\n' "$pkg" "$ver"
}

newest_cached() {
    local d
    d=$(find "$cache_root" -mindepth 2 -maxdepth 2 -path "$cache_root/linux-image-*/.complete" -printf '%T@ %h\n' 2>/dev/null |
        sort -rn | awk 'NR == 1 { print $2 }') || true
    printf '%s' "$d"
}

resolved=$(resolve)
if [[ -z $resolved ]]; then
    lg_msg "cannot resolve $meta from the apt lists; running apt-get update"
    if lg_apt_update; then
        resolved=$(resolve)
    fi
fi
if [[ -z $resolved ]]; then
    # Offline and without lists: fall back to a kernel that is already cached.
    cached=$(newest_cached)
    [[ -n $cached ]] || die "cannot resolve the kernel package from $meta (apt-cache depends found nothing) and no kernel is cached in $cache_root"
    lg_msg "WARNING: cannot resolve $meta; using the cached kernel $cached"
    printf '%s\n' "$cached"
    exit 0
fi
read -r pkg ver <<<"$resolved"
dir="$cache_root/${pkg}_${ver//:/%3a}"

if [[ -f $dir/.complete ]]; then
    printf '%s\n' "$dir"
    exit 0
fi

mkdir -p "$cache_root" || die "cannot create the cache dir $cache_root"
exec 9>"$cache_root/.lock"
flock 9
if [[ -f $dir/.complete ]]; then # another run finished it while we waited
    printf '%s\n' "$dir"
    exit 0
fi

tmp=$(mktemp -d "$cache_root/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

lg_msg "downloading $pkg=$ver"
if ! (cd "$tmp" && lg_apt_get -o APT::Sandbox::User=root download "$pkg=$ver" >&2); then
    lg_apt_update || true
    (cd "$tmp" && lg_apt_get -o APT::Sandbox::User=root download "$pkg=$ver" >&2) || die "apt-get download $pkg=$ver failed"
fi
debs=("$tmp"/*.deb)
[[ -f ${debs[0]} ]] || die "apt-get download $pkg=$ver produced no .deb"

lg_msg "unpacking ${debs[0]##*/}"
dpkg-deb -x "${debs[0]}" "$tmp/root" || die "dpkg-deb -x ${debs[0]} failed"
rm -f "${debs[@]}"

kernels=("$tmp"/root/boot/vmlinuz-*)
[[ -f ${kernels[0]} && ${#kernels[@]} == 1 ]] || die "expected exactly one boot/vmlinuz-* in $pkg, found: ${kernels[*]}"
release=${kernels[0]##*/vmlinuz-}
moddir=""
for d in "$tmp/root/lib/modules/$release" "$tmp/root/usr/lib/modules/$release"; do
    if [[ -d $d/kernel ]]; then
        moddir=$d
        break
    fi
done
[[ -n $moddir ]] || die "no lib/modules/$release/kernel in $pkg"

out="$tmp/out"
mkdir "$out"
mv "${kernels[0]}" "$out/vmlinuz"
mv "$moddir" "$out/modules"
if [[ -f $tmp/root/boot/config-$release ]]; then
    mv "$tmp/root/boot/config-$release" "$out/config"
fi
printf '%s\n' "$release" >"$out/kernel-release"
printf '%s %s\n' "$pkg" "$ver" >"$out/package"
touch "$out/.complete"
rm -rf "$dir" # a partial dir from an interrupted run, if any
mv "$out" "$dir"
lg_msg "kernel $release cached in $dir"
printf '%s\n' "$dir"
