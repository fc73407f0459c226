#!/bin/sh
# The lazyblk demo, run where /dev/ublk-control exists (the host, or the qemu guest).
# Usage: demo.sh <dir with img/manifest+blob> ; lazyblk, nginx and docker-registry on PATH; run as root.
set -eu
www=$1
port=8099
state=/tmp/lazyblk-demo
rm -rf "$state"; mkdir -p "$state/nginx" "$state/mnt" "$state/upper" "$state/work" "$state/merged"
cat > "$state/nginx/nginx.conf" <<CONF
daemon on;
master_process off;
user root;
error_log $state/nginx/error.log;
pid $state/nginx/nginx.pid;
events { worker_connections 64; }
http { access_log $state/nginx/access.log; server { listen 127.0.0.1:$port; root $www; } }
CONF
nginx -c "$state/nginx/nginx.conf" -p "$state/nginx/"
trap 'umount "$state/merged" 2>/dev/null; umount "$state/mnt" 2>/dev/null; lazyblk del --all >/dev/null 2>&1; kill $(cat $state/nginx/nginx.pid) 2>/dev/null; true' EXIT
blob=$(wc -c < "$www/img/blob")
echo "--- serving the demo image on http://127.0.0.1:$port/img/ (blob: $blob bytes)"
echo "\$ lazyblk add http://127.0.0.1:$port/img/manifest"
dev=$(lazyblk add "http://127.0.0.1:$port/img/manifest" --cache-dir "$state/cache")
echo "$dev"
echo "\$ mount -t erofs $dev $state/mnt && overlay on top"
mount -t erofs -o ro "$dev" "$state/mnt"
mount -t overlay overlay -o "lowerdir=$state/mnt,upperdir=$state/upper,workdir=$state/work" "$state/merged"
echo "\$ cat etc/os-release usr/share/doc/lazyblk/README; sh usr/bin/hello"
cat "$state/merged/etc/os-release" "$state/merged/usr/share/doc/lazyblk/README"
sh "$state/merged/usr/bin/hello"
echo "written through the overlay" > "$state/merged/notes.txt"
echo "\$ ls -l (merged view, with a file written through the overlay)"
ls -l "$state/merged"
fetched=$(awk '$7 == "/img/blob" { s += $10 } END { print s + 0 }' "$state/nginx/access.log")
echo "--- fetched $fetched of $blob blob bytes so far (the big log file was never read)"
echo "\$ lazyblk list; lazyblk status ${dev#/dev/ublkb}"
lazyblk list
lazyblk status "${dev#/dev/ublkb}"
echo "\$ sha256sum var/log/big.log  (now read it all)"
sha256sum "$state/merged/var/log/big.log"
lazyblk status "${dev#/dev/ublkb}" | grep -E "present|bytes fetched"
umount "$state/merged"; umount "$state/mnt"
echo "\$ lazyblk del ${dev#/dev/ublkb}"
lazyblk del "${dev#/dev/ublkb}"
kill "$(cat "$state/nginx/nginx.pid")" 2>/dev/null || true

echo "--- the same image through an OCI registry (docker-registry on 127.0.0.1:5099)"
mkdir -p "$state/registry"
cat > "$state/registry/config.yml" <<CONF
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $state/registry/storage } }
http: { addr: 127.0.0.1:5099 }
CONF
docker-registry serve "$state/registry/config.yml" > "$state/registry/log" 2>&1 &
regpid=$!
trap 'umount "$state/mnt" 2>/dev/null; lazyblk del --all >/dev/null 2>&1; kill $regpid 2>/dev/null; true' EXIT
i=0; until wget -q -O /dev/null http://127.0.0.1:5099/v2/ 2>/dev/null || [ $i -ge 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "\$ lazyblk push $www/img 127.0.0.1:5099/demo/app:v1"
lazyblk push "$www/img" 127.0.0.1:5099/demo/app:v1
echo "\$ lazyblk add 127.0.0.1:5099/demo/app:v1"
dev=$(lazyblk add 127.0.0.1:5099/demo/app:v1 --cache-dir "$state/cache-registry")
echo "$dev"
mount -t erofs -o ro "$dev" "$state/mnt"
echo "\$ cat etc/os-release  (read from the registry by range)"
cat "$state/mnt/etc/os-release"
lazyblk list
umount "$state/mnt"
lazyblk del "${dev#/dev/ublkb}"
kill $regpid 2>/dev/null || true
trap - EXIT
echo "--- demo done"
