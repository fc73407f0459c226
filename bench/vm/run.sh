#!/usr/bin/env bash
# VM streaming benchmark (qemu under TCG, 2 vCPUs, nginx on 127.0.0.1). Prints two tables:
#
# 1. Time to boot to a shell from the 512 MiB busybox ext4 root of tests/vm (96 MiB of it
#    incompressible files a boot never reads), measured on the host from the start of the
#    procedure (backend start or download included) to the guest's "shell ready" line:
#      lazy cold     `lazyblk vhost --writable`, empty cache
#      lazy warm     the same, cache filled by the cold boots (a new COW layer)
#      pull+boot     `lazyblk cat` of the whole image (parallel range requests, zstd, the same
#                    blob) to a local raw file, then qemu's own virtio-blk on it
#      curl+boot     `curl` of the raw image (512 MiB, what a plain HTTP server would hold),
#                    then qemu's own virtio-blk on it
#      qemu http     qemu's curl block driver on the raw image with a qcow2 overlay and
#                    copy-on-read=on, empty overlay
#    each at full loopback speed and with nginx's `limit_rate` (per connection) set to
#    --rate (default 12500k = 100 Mbit/s per connection).
# 2. Hot read throughput: the guest reads the whole disk three times with O_DIRECT 1 MiB reads
#    (`dd iflag=direct`); lazyblk vhost with every chunk cached vs `lazyblk vhost --raw` on a
#    local raw file (the same backend code, no chunk store), and qemu's own virtio-blk on the
#    raw file for reference.
#
# usage: bench/vm/run.sh [--runs N] [--rate NGINX-LIMIT-RATE] [--no-throttle] [--only boot|reads]
# Work dir: ${LAZYBLK_VM_BENCH_WORK:-target/vm-bench}. Documented in docs/BENCHMARKS.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
VM_TOP=$(cd "$here/../.." && pwd)
VM_BIN=$VM_TOP/target/release
VM_MEM=1024 # used by tests/vm/lib.sh
export VM_MEM
work=${LAZYBLK_VM_BENCH_WORK:-$VM_TOP/target/vm-bench}
runs=3
rate=12500k
throttle=1
only=""
while (($# > 0)); do
    case $1 in
    --runs) runs=${2:?}; shift 2 ;;
    --rate) rate=${2:?}; shift 2 ;;
    --no-throttle) throttle=0; shift ;;
    --only) only=${2:?}; shift 2 ;;
    *) echo "usage: bench/vm/run.sh [--runs N] [--rate RATE] [--no-throttle]" >&2; exit 2 ;;
    esac
done
# shellcheck source=../../tests/vm/lib.sh
. "$VM_TOP/tests/vm/lib.sh"
# shellcheck source=../../qemu/lib.sh
. "$VM_TOP/qemu/lib.sh"
lg_ensure_cmds qemu-system-x86_64:qemu-system-x86 nginx:nginx-light mkfs.ext4:e2fsprogs \
    busybox:busybox-static cpio:cpio xz:xz-utils python3:python3 curl:curl qemu-img:qemu-utils
[[ -f /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ]] || lg_ensure_cmds true:qemu-block-extra

cd "$VM_TOP"
cargo build --release --locked -p lazyblk-tools --bins
trap vm_cleanup EXIT
mkdir -p "$work/www"
vm_kernel
VM_INITRD=$work/initrd.cpio
if [[ ! -f $work/www/root/manifest ]]; then
    vm_msg "building the root image"
    vm_build_root "$work/root.img"
    "$VM_BIN/lazyblk" build "$work/root.img" -o "$work/www/root" >/dev/null
    cp --sparse=never "$work/root.img" "$work/www/root.raw"
fi
[[ -f $VM_INITRD ]] || vm_build_initrd "$VM_INITRD"

# A second nginx port with a per-connection rate limit.
vm_nginx_start "$work/www" "$work"
FAST=$VM_PORT
SLOW=$(vm_free_port)
python3 - "$work/nginx/nginx.conf" "$SLOW" "$rate" "$work/www" <<'EOF'
import sys
p, port, rate, root = sys.argv[1:]
s = open(p).read()
s = s.rstrip().rstrip('}') + f"    server {{ listen 127.0.0.1:{port}; root {root}; limit_rate {rate}; }}\n}}\n"
open(p, "w").write(s)
EOF
kill "$VM_NGINX_PID"
wait "$VM_NGINX_PID" 2>/dev/null || true
nginx -c "$work/nginx/nginx.conf" -p "$work/nginx/" &
VM_PIDS+=($!)
sleep 0.5

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# boot_until_shell T0 LOG QEMU-ARGS...: boot (mode=shell), print seconds from T0 to the marker.
boot_until_shell() {
    local t0=$1 log=$2 pid t=""
    shift 2
    rm -f "$log"
    vm_boot_bg "$log" 300 "lazyblk.mode=shell" "$@"
    pid=$VM_QEMU_PID
    while kill -0 "$pid" 2>/dev/null; do
        if grep -aq 'LAZYBLK-ROOT: shell ready' "$log" 2>/dev/null; then
            t=$(now)
            break
        fi
        sleep 0.02
    done
    wait "$pid" 2>/dev/null || true
    [[ -n $t ]] || { grep -aq 'LAZYBLK-ROOT: shell ready' "$log" && t=$(now); }
    [[ -n $t ]] || vm_die "no shell in $log"
    secs "$t0" "$t"
}

median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

declare -A result fetched
measure() { # measure NAME PORT
    local name=$1 port=$2 url=http://127.0.0.1:$2 t0 d times=() f=""
    for _ in $(seq "$runs"); do
        case $name in
        "lazy cold" | "lazy warm")
            [[ $name == "lazy cold" ]] && rm -rf "$work/cache"
            rm -rf "$work/cow"
            t0=$(now)
            vm_vhost_start "$work/vhost.log" "$work/b.sock" "$url/root/manifest" --cache-dir "$work/cache" \
                --writable --cow "$work/cow" --once --stats-file "$work/stats.json"
            mapfile -t d < <(vm_vhost_disk "$work/b.sock")
            times+=("$(boot_until_shell "$t0" "$work/boot.log" "${d[@]}")")
            wait "$VM_VHOST_PID" 2>/dev/null || true
            VM_VHOST_PID=""
            f=$(vm_json "$work/stats.json" fetched_bytes)
            ;;
        "pull+boot")
            rm -rf "$work/cache-pull" "$work/local.img"
            t0=$(now)
            "$VM_BIN/lazyblk" cat "$url/root/manifest" --cache-dir "$work/cache-pull" -o "$work/local.img"
            times+=("$(boot_until_shell "$t0" "$work/boot.log" -drive "file=$work/local.img,if=virtio,format=raw,cache=unsafe")")
            f=$(stat -c %s "$work/www/root/blob")
            ;;
        "curl+boot")
            rm -f "$work/local.img"
            t0=$(now)
            curl -sf -o "$work/local.img" "$url/root.raw"
            times+=("$(boot_until_shell "$t0" "$work/boot.log" -drive "file=$work/local.img,if=virtio,format=raw,cache=unsafe")")
            f=$(stat -c %s "$work/www/root.raw")
            ;;
        "qemu http")
            rm -f "$work/overlay.qcow2"
            : >"$work/nginx/access.log" # nginx appends: truncating restarts the count
            t0=$(now)
            qemu-img create -q -f qcow2 -F raw \
                -b "json:{\"driver\":\"raw\",\"file\":{\"driver\":\"http\",\"url\":\"$url/root.raw\"}}" \
                "$work/overlay.qcow2" 512M
            times+=("$(boot_until_shell "$t0" "$work/boot.log" -drive "file=$work/overlay.qcow2,if=virtio,format=qcow2,copy-on-read=on,cache=unsafe")")
            f=$(awk '$7 == "/root.raw" { s += $10 } END { print s + 0 }' "$work/nginx/access.log" 2>/dev/null || echo 0)
            ;;
        esac
    done
    result[$name@$port]=$(printf '%s\n' "${times[@]}" | median)
    fetched[$name@$port]=$f
    vm_msg "$name ($port): ${times[*]} s"
}

names=("lazy cold" "lazy warm" "pull+boot" "curl+boot" "qemu http")
ports=("$FAST")
((throttle)) && ports+=("$SLOW")
[[ $only == reads ]] && ports=()
for port in "${ports[@]}"; do
    for n in "${names[@]}"; do
        measure "$n" "$port"
    done
done

blob=$(stat -c %s "$work/www/root/blob")
if [[ $only != reads ]]; then
echo
echo "Boot to a shell (512 MiB ext4 root, $(awk -v b="$blob" 'BEGIN { printf "%.0f", b / 1048576 }') MiB blob), median of $runs, seconds (qemu TCG, 2 vCPUs)"
printf '%-12s %14s %14s   %s\n' "method" "loopback" "$( ((throttle)) && echo "$rate/conn")" "bytes transferred (last run)"
for n in "${names[@]}"; do
    printf '%-12s %14s %14s   %s\n' "$n" "${result[$n@$FAST]}" "${result[$n@$SLOW]:-}" \
        "$(awk -v f="${fetched[$n@$FAST]}" 'BEGIN { printf "%.1f MiB", f / 1048576 }')"
done
fi
[[ $only == boot ]] && exit 0

# ------------------------------------------------------------------ hot reads
readbench() { # readbench LABEL QEMU-ARGS... -> "pass1 pass2 pass3" seconds
    shift
    rm -f "$work/read.log"
    vm_boot "$work/read.log" 900 "lazyblk.mode=readbench" "$@" || true
    tr -d '\r' <"$work/read.log" | awk '$1 == "READ" { printf "%s ", $3 }'
}
rm -rf "$work/cow"
vm_vhost_start "$work/vhost.log" "$work/b.sock" "http://127.0.0.1:$FAST/root/manifest" \
    --cache-dir "$work/cache" --writable --cow "$work/cow" --once
mapfile -t d < <(vm_vhost_disk "$work/b.sock")
lazy=$(readbench lazy "${d[@]}")
wait "$VM_VHOST_PID" 2>/dev/null || true
vm_vhost_start "$work/vhost.log" "$work/b.sock" --raw "$work/root.img" --once
raw=$(readbench raw "${d[@]}")
wait "$VM_VHOST_PID" 2>/dev/null || true
native=$(readbench native -drive "file=$work/root.img,if=virtio,format=raw,cache=unsafe")
echo
echo "Hot sequential read of the whole 512 MiB disk in the guest (dd bs=1M iflag=direct), MiB/s per pass"
printf '%-34s %10s %10s %10s\n' "backend" "pass 1" "pass 2" "pass 3"
for row in "lazyblk vhost (chunk store, cached)|$lazy" "lazyblk vhost --raw (local file)|$raw" "qemu virtio-blk (local file)|$native"; do
    label=${row%%|*}
    read -r -a t <<<"${row#*|}"
    printf '%-34s' "$label"
    for x in "${t[@]}"; do
        awk -v s="$x" 'BEGIN { printf " %10.0f", 512 / s }'
    done
    echo
done
