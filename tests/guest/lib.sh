# Shared helpers for guest test scripts (busybox sh). Sourced from /guest/lib.sh.
set -eu
PASS=0
FAIL=0
step() { echo "=== $* [uptime $(cut -d" " -f1 /proc/uptime) s]"; }
ok() { PASS=$((PASS + 1)); echo "ok - $*"; }
die() {
    echo "not ok - $*"
    FAIL=$((FAIL + 1))
    echo "--- daemon log (tail)"; tail -n 40 /var/log/lazyblk/lazyblk.log 2>/dev/null || true
    echo "$PASS passed, $FAIL failed"
    exit 1
}
check() { # check "description" command...
    d=$1; shift
    if "$@"; then ok "$d"; else die "$d"; fi
}
summary() { echo "$PASS passed, $FAIL failed"; [ "$FAIL" -eq 0 ]; }

# start_nginx ROOT PORT [DIRECTIVES]: serve ROOT on 127.0.0.1:PORT (with nginx DIRECTIVES in its
# server block, e.g. "limit_rate 64k;"), access log /tmp/nginx-PORT/access.log
start_nginx() {
    p=/tmp/nginx-$2
    mkdir -p "$p"
    cat > "$p/nginx.conf" <<CONF
daemon on;
master_process off;
user root;
error_log $p/error.log;
pid $p/nginx.pid;
events { worker_connections 256; }
http {
    include /etc/nginx/mime.types;
    access_log $p/access.log;
    keepalive_requests 100000;
    server { listen 127.0.0.1:$2; root $1; ${3:-} }
}
CONF
    nginx -c "$p/nginx.conf" -p "$p/" || die "nginx did not start"
    i=0
    while ! http_answers "$2" && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
}

# http_answers PORT: an HTTP server answers on 127.0.0.1:PORT (an error status counts: "/" of a
# root without an index is 403)
http_answers() {
    out=$(wget -q -O /dev/null "http://127.0.0.1:$1/" 2>&1) || case $out in *HTTP/1*) ;; *) return 1 ;; esac
}

stop_nginx() { kill "$(cat /tmp/nginx-$1/nginx.pid)" 2>/dev/null || true; sleep 0.3; }

# served_bytes PORT PATH: body bytes nginx sent for PATH (range requests included)
served_bytes() {
    awk -v p="$2" '$7 == p { s += $10 } END { print s + 0 }' "/tmp/nginx-$1/access.log"
}

# served_requests PORT PATH: requests for PATH that carried more than one byte
served_requests() {
    awk -v p="$2" '$7 == p && $10 > 1 { n++ } END { print n + 0 }' "/tmp/nginx-$1/access.log"
}

no_ublk_devices() { ! ls /dev/ublkb* >/dev/null 2>&1; }

# ---- helpers of the reliability suite (used by reliability.sh)

# now_ms: guest uptime in milliseconds
now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# secs_since MS: seconds (one decimal) since the now_ms value MS
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f\n", (b - a) / 1000 }'; }

# record_field ID FIELD: a number or string field of device ID's daemon record
record_field() {
    sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "/run/lazyblk/$1.json" 2>/dev/null
}

# daemon_pid ID: pid of the daemon serving device ID
daemon_pid() { record_field "$1" pid; }

# cache_of ID: the cache directory of the image of device ID
cache_of() { echo "$(record_field "$1" cache_root)/$(record_field "$1" image | sed 's/^sha256://')"; }

# pid_gone PID: the process has exited (gone or a zombie)
pid_gone() { [ ! -d "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s; die after SECONDS
wait_for() {
    wf_limit=$(($1 * 10)); wf_what=$2; shift 2
    wf_i=0
    until "$@"; do
        wf_i=$((wf_i + 1))
        [ $wf_i -lt $wf_limit ] || die "timed out after $((wf_limit / 10)) s waiting for: $wf_what"
        sleep 0.1
    done
}

# dev_state ID: the STATE column of `lazyblk list` for device ID
dev_state() { lazyblk list | awk -v id="$1" '$1 == id { for (i = 5; i <= NF; i++) printf "%s%s", $i, (i < NF ? " " : "\n") }'; }

# bg_start NAME COMMAND...: run COMMAND in the background; output in /tmp/NAME.out, /tmp/NAME.err,
# exit status in /tmp/NAME.rc once it ends
bg_start() {
    bg_n=$1; shift
    rm -f "/tmp/$bg_n.rc" "/tmp/$bg_n.out" "/tmp/$bg_n.err"
    ( "$@" > "/tmp/$bg_n.out" 2> "/tmp/$bg_n.err"; echo $? > "/tmp/$bg_n.rc" ) &
}
bg_running() { [ ! -f "/tmp/$1.rc" ]; }
# bg_wait NAME SECONDS: wait for NAME to end (die after SECONDS)
bg_wait() { wait_for "$2" "background job $1 to finish" test -f "/tmp/$1.rc"; }
# bg_rc NAME: exit status of the ended background job NAME
bg_rc() { cat "/tmp/$1.rc"; }

# expected_sha IMAGE PATH: sha256 of PATH (relative to the image root) in /expected/IMAGE.txt
expected_sha() {
    awk -v p="$2:" '$1 == p { for (i = 2; i <= NF; i++) if ($i ~ /^sha256=/) { print substr($i, 8); exit } }' "/expected/$1.txt"
}

# io_errors: kernel messages about failed IO on ublk devices or erofs since the last `dmesg -c`
io_errors() { dmesg | grep -E 'ublkb[0-9]|erofs' | grep -iE 'error|fail' || true; }

# ---- page-cache measurement (the reliability suite's last boot, bench/pagecache.sh)

# cached_kib: the Cached line of /proc/meminfo, in KiB
cached_kib() { awk '$1 == "Cached:" { print $2 }' /proc/meminfo; }

# drop_page_cache: write back, then drop the clean page cache, dentries and inodes
drop_page_cache() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# full_read MOUNT DEV: a digest-tree of every file under MOUNT (on stdout), then a raw read of the
# whole device DEV
full_read() {
    lazyblk-testkit digest-tree "$1" || return 1
    dd if="$2" of=/dev/null bs=1M 2> /dev/null || return 1
}

# within_ratio A B RATIO FLOOR_KIB: A <= max(B * RATIO, B + FLOOR_KIB)
within_ratio() {
    awk -v a="$1" -v b="$2" -v r="$3" -v f="$4" 'BEGIN { l = b * r; if (l < b + f) l = b + f; exit !(a <= l) }'
}
