#!/usr/bin/env bash
# Host side of the containerd suite: a real python image, made with umoci from Debian's
# python3.11 (the interpreter, its libraries and the standard library; busybox for /bin/sh),
# in three layers (base libraries + busybox; the standard library; the application, which also
# deletes a file of a lower layer), copied with skopeo into a docker-registry whose storage is
# REGDIR, then converted there with `lazyblk convert` (the lazy version links to its source).
# A second image, `plain`, is never converted (the fallback); the layered test image of
# tests/images/layered.sh is converted in OCI and Docker schema-2 form. The guest serves REGDIR with its
# own docker-registry at the same address, so the references stay valid.
#
# usage: tests/guest/python-image.sh LAZYBLK_BIN WORK REGDIR ADDR
#   ADDR: host:port of the registry (the same in the guest)
set -euo pipefail
lazyblk=$1 work=$2 regdir=$3 addr=$4
here=$(cd "$(dirname "$0")" && pwd)
testkit=$(dirname "$lazyblk")/lazyblk-testkit
py=/usr/bin/python3.11
[ -x $py ] && [ -d /usr/lib/python3.11 ] || { echo "python-image.sh: Debian's python3.11 is missing (scripts/setup installs python3)"; exit 1; }
for t in umoci skopeo docker-registry busybox; do
    command -v $t > /dev/null || { echo "python-image.sh: $t is missing (scripts/setup installs it)"; exit 1; }
done
rm -rf "$work" "$regdir" && mkdir -p "$work" "$regdir"
cd "$work"

cat > registry.yml << EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $regdir
  delete:
    enabled: true
http:
  addr: $addr
EOF
docker-registry serve registry.yml > registry.log 2>&1 &
regpid=$!
trap 'kill $regpid 2> /dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fsS "http://$addr/v2/" > /dev/null 2>&1 && break
    sleep 0.1
done
# Our registry must be the one answering (another one on the port would get the images).
kill -0 $regpid 2> /dev/null && curl -fsS "http://$addr/v2/" > /dev/null ||
    { tail -3 registry.log; echo "python-image.sh: docker-registry did not start on $addr"; exit 1; }

umoci init --layout L
umoci new --image L:py
umoci unpack --image L:py B
R=B/rootfs
# Layer 1: busybox as /bin/sh, the interpreter's shared libraries, /etc basics.
mkdir -p $R/usr/bin $R/usr/lib/x86_64-linux-gnu $R/usr/lib64 $R/etc $R/tmp
ln -s usr/bin $R/bin; ln -s usr/lib $R/lib; ln -s usr/lib64 $R/lib64
cp "$(command -v busybox)" $R/usr/bin/busybox
for a in sh ls cat echo; do ln -s busybox $R/usr/bin/$a; done
libs=$( (ldd $py; for so in /usr/lib/python3.11/lib-dynload/*.so; do ldd "$so"; done) 2> /dev/null |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
for l in $libs; do
    d=$R$(dirname "$l")
    mkdir -p "$d"
    cp -L "$l" "$d/"
done
echo 'root:x:0:0:root:/root:/bin/sh' > $R/etc/passwd
echo 'root:x:0:' > $R/etc/group
echo 'obsolete' > $R/etc/obsolete.conf
chmod 1777 $R/tmp
umoci repack --refresh-bundle --image L:py B
if [ "${PYIMG_BUILD_DEPS:-}" = 1 ]; then
    # The official python image sits on buildpack-deps: compilers and headers most containers
    # never read. With PYIMG_BUILD_DEPS=1 (the benchmark), a layer of them: gcc's libexec and
    # libraries, /usr/include (about 320 MB uncompressed).
    for d in /usr/lib/gcc /usr/include /usr/libexec; do
        mkdir -p "$R$d"
        tar -C "$d" -cf - . | tar -C "$R$d" -xf -
    done
    umoci repack --refresh-bundle --image L:py B
fi
# Layer 2: the interpreter and its standard library (bytecode included, no tests).
cp $py $R/usr/bin/python3.11
ln -s python3.11 $R/usr/bin/python3
mkdir -p $R/usr/lib/python3.11
tar -C /usr/lib/python3.11 --exclude=./test --exclude=./dist-packages --exclude=./site-packages \
    --exclude=./idlelib --exclude=./tkinter --exclude=./turtledemo -cf - . | tar -C $R/usr/lib/python3.11 -xf -
umoci repack --refresh-bundle --image L:py B
umoci tag --image L:py base
# Layer 3: the application (it also deletes a file of layer 1: a whiteout).
mkdir -p $R/app
cat > $R/app/main.py << 'EOF'
import json, os, sys, hashlib, email.parser, decimal, argparse
print("lazyblk-python-ok", sys.version.split()[0], json.dumps({"gone": not os.path.exists("/etc/obsolete.conf")}), flush=True)
src = os.path.join(os.path.dirname(json.__file__), "decoder.py")
print("decoder-sha256", hashlib.sha256(open(src, "rb").read()).hexdigest(), flush=True)
EOF
rm $R/etc/obsolete.conf
umoci repack --refresh-bundle --image L:py B
umoci config --image L:py --config.cmd python3 --config.cmd /app/main.py \
    --config.env PATH=/usr/bin:/bin --config.workingdir /app
skopeo copy --quiet --dest-tls-verify=false oci:L:py "docker://$addr/python:3.11"
# The plain image: the same two base layers, another application, never converted (so its top
# chain id is an intermediate layer of python:3.11's lazy version: the snapshotter materializes it).
umoci unpack --image L:base P
mkdir -p P/rootfs/app
echo 'print("lazyblk-plain-ok", flush=True)' > P/rootfs/app/main.py
umoci repack --image L:plain P
umoci config --image L:plain --config.cmd python3 --config.cmd /app/main.py \
    --config.env PATH=/usr/bin:/bin --config.workingdir /app
skopeo copy --quiet --dest-tls-verify=false oci:L:plain "docker://$addr/python:plain"
# The source image's layer digests (none may be downloaded by a lazy pull).
skopeo inspect --raw --tls-verify=false "docker://$addr/python:3.11" |
    python3 -c 'import json, sys; [print(l["digest"]) for l in json.load(sys.stdin)["layers"]]' > layers.txt
skopeo inspect --raw --tls-verify=false "docker://$addr/python:3.11" |
    python3 -c 'import json, sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))' > image-bytes
skopeo inspect --raw --tls-verify=false "docker://$addr/python:plain" |
    python3 -c 'import json, sys; [print(l["digest"]) for l in json.load(sys.stdin)["layers"]]' > plain-layers.txt
echo "decoder-sha256 $(sha256sum /usr/lib/python3.11/json/decoder.py | cut -d' ' -f1)" > expected.txt
# The lazy version of python:3.11, pushed beside it (the convert links it to its source).
"$lazyblk" convert "$addr/python:3.11" "$addr/python:3.11-lazyblk" > convert.log 2>&1 ||
    { cat convert.log; echo "python-image.sh: lazyblk convert failed"; exit 1; }
# The layered test image (tests/images/layered.sh) in OCI and Docker schema-2 form, each
# converted into another repository: the guest adds it by its source reference and compares
# the device's tree with `umoci unpack` of the source (layered-expected.txt).
mkdir -p layered
W=$work/layered bash "$here/../images/layered.sh" > layered/make.log 2>&1 ||
    { tail -20 layered/make.log; echo "python-image.sh: making the layered image failed"; exit 1; }
skopeo copy --quiet --dest-tls-verify=false oci:layered/L:img "docker://$addr/layered:oci"
skopeo copy --quiet --dest-tls-verify=false --format v2s2 oci:layered/L:img "docker://$addr/layered:v2s2"
for t in oci v2s2; do
    "$lazyblk" convert "$addr/layered:$t" "$addr/layered-lazy:$t" >> convert.log 2>&1 ||
        { cat convert.log; echo "python-image.sh: lazyblk convert of layered:$t failed"; exit 1; }
done
"$testkit" digest-tree layered/REF/rootfs > layered-expected.txt
rm -rf layered
du -sb "$regdir" | cut -f1 > regdir-bytes
echo "python-image.sh: python:3.11, python:plain and python:3.11-lazyblk in $regdir"
