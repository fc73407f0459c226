# shellcheck shell=bash
# Helpers shared by the host-side scripts of the lazyblk qemu guest harness.
# Sourced, never executed. Messages go to stderr; stdout is left to the caller.

lg_msg() { printf 'lazyblk-guest: %s\n' "$*" >&2; }

# die MESSAGE: one clear line on stderr, then exit 1.
die() {
    printf 'lazyblk-guest: ERROR: %s\n' "$*" >&2
    exit 1
}

# apt-get that waits for the dpkg lock (another install may be running)
# instead of failing at once.
lg_apt_get() {
    DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=900 "$@"
}

# apt-get update, retried: the lists lock may be held by a concurrent apt run.
lg_apt_update() {
    local try
    for try in 1 2 3 4 5 6; do
        if lg_apt_get update >&2; then
            return 0
        fi
        lg_msg "apt-get update failed (try $try), retrying in 10 s"
        sleep 10
    done
    return 1
}

# lg_ensure_cmds CMD:PACKAGE...
# Installs the Debian package of every command that is not on PATH, then
# checks again and fails loudly if a command is still missing. Nothing is
# installed when everything is already there.
lg_ensure_cmds() {
    local spec cmd pkg
    local -a missing_pkgs=()
    for spec in "$@"; do
        cmd=${spec%%:*}
        pkg=${spec#*:}
        if ! command -v "$cmd" >/dev/null 2>&1; then
            missing_pkgs+=("$pkg")
        fi
    done
    if ((${#missing_pkgs[@]} > 0)); then
        # Deduplicate (ip and tc both come from iproute2, ...).
        mapfile -t missing_pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
        [[ $(id -u) == 0 ]] || die "missing packages ${missing_pkgs[*]} and not root: install them with apt-get"
        command -v apt-get >/dev/null 2>&1 || die "missing packages ${missing_pkgs[*]} and no apt-get"
        lg_msg "installing missing packages: ${missing_pkgs[*]}"
        if ! lg_apt_get install -y --no-install-recommends "${missing_pkgs[@]}" >&2; then
            lg_apt_update || die "apt-get update failed"
            lg_apt_get install -y --no-install-recommends "${missing_pkgs[@]}" >&2 ||
                die "apt-get install ${missing_pkgs[*]} failed"
        fi
    fi
    for spec in "$@"; do
        cmd=${spec%%:*}
        pkg=${spec#*:}
        command -v "$cmd" >/dev/null 2>&1 || die "command '$cmd' still missing after installing package $pkg"
    done
}

# lg_qemu_escape STRING: double the commas, as qemu option values require.
lg_qemu_escape() {
    printf '%s' "${1//,/,,}"
}

# lg_cache_deb PACKAGE: downloads the apt candidate of PACKAGE once and unpacks
# it (never installs it) into ${LAZYBLK_GUEST_CACHE:-${HOME:-/root}/.cache/lazyblk-guest}/
# <package>_<version>/root, then prints <cache>/<package>_<version>.
# Idempotent and safe to run concurrently.
lg_cache_deb() {
    local pkg=$1 ver dir tmp debs
    local cache_root=${LAZYBLK_GUEST_CACHE:-${HOME:-/root}/.cache/lazyblk-guest}
    ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }') || true
    if [[ -z $ver || $ver == "(none)" ]]; then
        lg_apt_update || true
        ver=$(apt-cache policy "$pkg" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }') || true
    fi
    if [[ -z $ver || $ver == "(none)" ]]; then
        # Offline and without lists: fall back to a version that is already cached.
        dir=$(find "$cache_root" -mindepth 2 -maxdepth 2 -path "$cache_root/${pkg}_*/.complete" \
            -printf '%T@ %h\n' 2>/dev/null | sort -rn | awk 'NR == 1 { print $2 }') || true
        [[ -n $dir ]] || die "apt has no candidate version of package $pkg and none is cached in $cache_root"
        lg_msg "WARNING: apt has no candidate version of $pkg; using the cached $dir"
        printf '%s\n' "$dir"
        return 0
    fi
    dir="$cache_root/${pkg}_${ver//:/%3a}"
    if [[ ! -f $dir/.complete ]]; then
        mkdir -p "$cache_root" || die "cannot create the cache dir $cache_root"
        (
            flock 9
            [[ -f $dir/.complete ]] && exit 0
            tmp=$(mktemp -d "$cache_root/.tmp.XXXXXX")
            trap 'rm -rf "$tmp"' EXIT
            lg_msg "downloading $pkg=$ver"
            if ! (cd "$tmp" && lg_apt_get -o APT::Sandbox::User=root download "$pkg=$ver" >&2); then
                lg_apt_update || true
                (cd "$tmp" && lg_apt_get -o APT::Sandbox::User=root download "$pkg=$ver" >&2) ||
                    die "apt-get download $pkg=$ver failed"
            fi
            debs=("$tmp"/*.deb)
            [[ -f ${debs[0]} ]] || die "apt-get download $pkg=$ver produced no .deb"
            mkdir "$tmp/out"
            dpkg-deb -x "${debs[0]}" "$tmp/out/root" || die "dpkg-deb -x ${debs[0]} failed"
            touch "$tmp/out/.complete"
            rm -rf "$dir"
            mv "$tmp/out" "$dir"
        ) 9>"$cache_root/.lock" || exit 1
    fi
    printf '%s\n' "$dir"
}
