# Shared helpers for guest test scripts (busybox sh). Sourced from /guest/lib.sh.
set -eu
PASS=0
FAIL=0
step() { echo "=== $*"; }
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

# start_nginx ROOT PORT: serve ROOT on 127.0.0.1:PORT, access log /tmp/nginx-PORT/access.log
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
    server { listen 127.0.0.1:$2; root $1; }
}
CONF
    nginx -c "$p/nginx.conf" -p "$p/" || die "nginx did not start"
    i=0
    while ! wget -q -O /dev/null "http://127.0.0.1:$2/" 2>/dev/null && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
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
