# shellcheck shell=bash
# Host-side helpers of the VM streaming tests and benchmarks (sourced): nginx on loopback, the
# `lazyblk vhost` backend, qemu guests with a vhost-user-blk disk. Processes started here are
# recorded and stopped by vm_cleanup (by pid, never by name).

vm_msg() { printf 'lazyblk-vm: %s\n' "$*" >&2; }
vm_die() {
    printf 'lazyblk-vm: ERROR: %s\n' "$*" >&2
    exit 1
}

VM_PIDS=()

vm_cleanup() {
    local p
    for p in "${VM_PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${VM_PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    VM_PIDS=()
}

# vm_free_port: a TCP port free on 127.0.0.1.
vm_free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# vm_nginx_start ROOTDIR WORKDIR: serve ROOTDIR on 127.0.0.1:<free port>; sets VM_PORT, VM_NGINX_PID.
vm_nginx_start() {
    local root=$1 work=$2
    mkdir -p "$work/nginx"
    VM_PORT=$(vm_free_port)
    cat >"$work/nginx/nginx.conf" <<CONF
daemon off;
master_process off;
worker_processes 1;
user root;
error_log $work/nginx/error.log;
pid $work/nginx/nginx.pid;
events { worker_connections 256; }
http {
    access_log $work/nginx/access.log;
    sendfile on;
    client_body_temp_path $work/nginx/body;
    proxy_temp_path $work/nginx/proxy;
    fastcgi_temp_path $work/nginx/fastcgi;
    uwsgi_temp_path $work/nginx/uwsgi;
    scgi_temp_path $work/nginx/scgi;
    server { listen 127.0.0.1:$VM_PORT; root $root; }
}
CONF
    nginx -c "$work/nginx/nginx.conf" -p "$work/nginx/" &
    VM_NGINX_PID=$!
    VM_PIDS+=("$VM_NGINX_PID")
    local i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$VM_PORT") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    vm_die "nginx did not start on port $VM_PORT (see $work/nginx/error.log)"
}

# vm_vhost_start LOG SOCKET ARGS...: run `lazyblk vhost --socket SOCKET ARGS...` in the
# background, wait until the socket exists; sets VM_VHOST_PID.
vm_vhost_start() {
    local log=$1 sock=$2
    shift 2
    rm -f "$sock"
    "$VM_BIN/lazyblk" vhost --socket "$sock" "$@" >>"$log" 2>&1 &
    VM_VHOST_PID=$!
    VM_PIDS+=("$VM_VHOST_PID")
    local i
    for i in $(seq 600); do
        [[ -S $sock ]] && return 0
        kill -0 "$VM_VHOST_PID" 2>/dev/null || { tail -n 20 "$log" >&2; vm_die "lazyblk vhost exited (log $log)"; }
        sleep 0.1
    done
    vm_die "lazyblk vhost did not create $sock within 60 s (log $log)"
}

# vm_vhost_stop: SIGTERM the backend and wait for it (it flushes and prints its counters).
vm_vhost_stop() {
    [[ -n ${VM_VHOST_PID:-} ]] || return 0
    kill "$VM_VHOST_PID" 2>/dev/null || true
    wait "$VM_VHOST_PID" 2>/dev/null || true
    VM_VHOST_PID=""
}

# vm_qemu_args SOCKET MEM_MB: run-guest.sh arguments attaching SOCKET as a vhost-user-blk disk
# (guest memory must be a shared memfd for the backend to map it).
vm_qemu_args() {
    local sock=$1 mem=$2
    printf '%s\n' \
        --mem "$mem" \
        --qemu-arg -object --qemu-arg "memory-backend-memfd,id=mem,size=${mem}M,share=on" \
        --qemu-arg -numa --qemu-arg node,memdev=mem \
        --qemu-arg -chardev --qemu-arg "socket,id=vub0,path=$sock" \
        --qemu-arg -device --qemu-arg "vhost-user-blk-pci,chardev=vub0,num-queues=2"
}

# vm_json FILE KEY: a number from a flat JSON file.
vm_json() {
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# vm_kernel: the cached guest kernel dir (qemu/setup-kernel.sh); sets VM_KDIR, VM_KVER.
vm_kernel() {
    VM_KDIR=$(bash "$VM_TOP/qemu/setup-kernel.sh") || vm_die "qemu/setup-kernel.sh failed"
    VM_KVER=$(cat "$VM_KDIR/kernel-release")
}

# vm_put_exe SRC ROOT DEST: an executable with its shared libraries (ldd), like qemu/run-guest.sh.
vm_put_exe() {
    local src=$1 root=$2 dest=$3 lib
    mkdir -p "$root$(dirname "$dest")"
    cp -L "$src" "$root$dest"
    if ldd "$src" >/dev/null 2>&1; then
        for lib in $(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }'); do
            [[ -e $root$lib ]] || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
        done
    fi
}

# vm_busybox_root ROOT: busybox and a link for each of its applets in ROOT/bin.
vm_busybox_root() {
    local root=$1 bb a
    bb=$(command -v busybox) || vm_die "busybox not found (apt-get install busybox-static)"
    mkdir -p "$root/bin" "$root/lib" "$root/lib64"
    ln -sfn bin "$root/sbin"
    vm_put_exe "$bb" "$root" /bin/busybox
    for a in $("$bb" --list); do
        [[ $a == busybox ]] || ln -sf busybox "$root/bin/$a"
    done
}

# vm_build_root IMG: a bootable ext4 root file system image built from busybox (no root
# privileges, no loop device: mkfs.ext4 -d). Besides busybox and /sbin/init (root-init.sh) it
# holds what a real root has and a boot never reads: the kernel's modules and 96 MiB of
# incompressible files under /usr/share/filler.
vm_build_root() {
    local img=$1 root i
    root=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-vmroot.XXXXXX")
    vm_busybox_root "$root"
    mkdir -p "$root"/{proc,sys,dev,tmp,data,crash,etc,usr/share/filler,lib/modules}
    cp "$VM_TOP/tests/vm/root-init.sh" "$root/sbin/init.sh"
    rm -f "$root/bin/init"
    ln -sf init.sh "$root/bin/init"
    chmod 755 "$root/sbin/init.sh"
    cp -a "$VM_KDIR/modules" "$root/lib/modules/$VM_KVER"
    for i in $(seq 96); do
        head -c 1M /dev/urandom >"$root/usr/share/filler/f$i"
    done
    echo "lazyblk test root" >"$root/etc/issue"
    rm -f "$img"
    mkfs.ext4 -q -F -L lazyroot -b 4096 -E root_owner=0:0 -d "$root" "$img" 512M ||
        vm_die "mkfs.ext4 -d failed"
    rm -rf "$root"
}

# vm_build_initrd OUT: the initramfs that mounts /dev/vda (ext4) and switch_roots into it.
vm_build_initrd() {
    local out=$1 root m
    root=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-vminitrd.XXXXXX")
    vm_busybox_root "$root"
    mkdir -p "$root"/{proc,sys,dev,newroot,lib/modules}
    cp "$VM_TOP/tests/vm/initrd-init.sh" "$root/init"
    chmod 755 "$root/init"
    m=$(find "$VM_KDIR/modules/kernel" -name 'virtio_blk.ko.xz' | head -n 1)
    [[ -n $m ]] || vm_die "virtio_blk.ko.xz not found in $VM_KDIR/modules"
    xz -dc "$m" >"$root/lib/modules/virtio_blk.ko"
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$out" ||
        vm_die "cpio failed"
    rm -rf "$root"
}

# vm_boot LOG TIMEOUT APPEND QEMU-DISK-ARGS...: boot the root disk given by the qemu arguments
# with the initramfs $VM_INITRD; the console goes to LOG. Returns qemu's status.
vm_boot() {
    local log=$1 tmo=$2 append=$3 attempt st
    shift 3
    for attempt in 1 2; do
        st=0
        timeout -k 5 "$tmo" qemu-system-x86_64 \
            -nodefaults -no-user-config \
            -accel tcg,thread=multi -cpu max -m "$VM_MEM" -smp 2 \
            -display none -monitor none -serial "file:$log" -nic none -no-reboot \
            -kernel "$VM_KDIR/vmlinuz" -initrd "$VM_INITRD" \
            -append "console=ttyS0 quiet panic=-1 $append" \
            "$@" </dev/null || st=$?
        # The kernel panicked before the guest's init printed anything (an emulator flake under
        # TCG, seen in sched_clock_cpu at 1.5 s): nothing reached the disks; boot once more.
        if [[ $attempt == 1 ]] && grep -aq 'Kernel panic' "$log" && ! grep -aq 'LAZYBLK' "$log"; then
            echo "    (the guest kernel panicked before init; booting once more)"
            continue
        fi
        return $st
    done
}

# vm_boot_bg LOG TIMEOUT APPEND QEMU-DISK-ARGS...: vm_boot in the background; VM_QEMU_PID is the
# pid of `timeout`, which passes a SIGTERM on to qemu (qemu then stops at once).
vm_boot_bg() {
    local log=$1 tmo=$2 append=$3
    shift 3
    (exec timeout -k 5 "$tmo" qemu-system-x86_64 \
        -nodefaults -no-user-config \
        -accel tcg,thread=multi -cpu max -m "$VM_MEM" -smp 2 \
        -display none -monitor none -serial "file:$log" -nic none -no-reboot \
        -kernel "$VM_KDIR/vmlinuz" -initrd "$VM_INITRD" \
        -append "console=ttyS0 quiet panic=-1 $append" \
        "$@" </dev/null) &
    VM_QEMU_PID=$!
    VM_PIDS+=("$VM_QEMU_PID")
}

# vm_vhost_disk SOCKET: qemu arguments for a vhost-user-blk disk (memfd-backed guest memory).
vm_vhost_disk() {
    printf '%s\n' \
        -object "memory-backend-memfd,id=mem,size=${VM_MEM}M,share=on" \
        -numa node,memdev=mem \
        -chardev "socket,id=vub0,path=$1" \
        -device vhost-user-blk-pci,chardev=vub0,num-queues=2
}
