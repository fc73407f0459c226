#!/usr/bin/env bash
# The layered test image of the convert issue (15), made with umoci: in the OCI layout "$W/L",
# tag `img`, four layers (deletions, a file turned into a directory and back, a hardlink to a
# lower file and one name of a hardlink removed, an opaque directory, modes, owners, setuid,
# file capabilities, xattrs, symlinks, a fifo, device nodes, a sparse file), a runtime config;
# "$W/REF/rootfs" is `umoci unpack` of it. Used by tests/tests/convert.rs (host) and by the
# guest's containerd suite (tests/guest/python-image.sh). Needs root, umoci, setfattr, setcap.
# usage: W=DIR bash tests/images/layered.sh
set -eux
cd "$W"
umoci init --layout L
umoci new --image L:img
umoci unpack --image L:img B
R=B/rootfs
# Layer 1: a bit of everything.
mkdir -p $R/etc $R/usr/bin $R/tmp $R/gone/sub $R/opq/keepdir $R/a $R/dev
echo root > $R/etc/passwd
setfattr -n user.k -v hello $R/etc/passwd
printf tool > $R/usr/bin/tool; chmod 0755 $R/usr/bin/tool; chown 1000:1000 $R/usr/bin/tool
printf su > $R/usr/bin/su; chmod 04755 $R/usr/bin/su
printf ping > $R/usr/bin/ping; setcap cap_net_raw=+ep $R/usr/bin/ping
chmod 01777 $R/tmp
head -c 3000000 /dev/urandom > $R/big
truncate -s 10M $R/sparse; printf data | dd of=$R/sparse bs=1 seek=5000000 conv=notrunc status=none
ln -s ../etc/passwd $R/a/rel; ln -s /nowhere/at/all $R/a/abs
echo h > $R/a/h1; ln $R/a/h1 $R/a/h2
mkfifo $R/a/fifo; mknod $R/dev/null2 c 1 3; mknod $R/dev/loop77 b 7 77
echo f > $R/turn
echo x > $R/gone/sub/f
echo 1 > $R/opq/old1; echo 2 > $R/opq/keepdir/old2
umoci repack --refresh-bundle --image L:img B
# Layer 2: deletions, a file turned into a directory, a hardlink to a lower file, metadata.
rm -r $R/gone; rm $R/etc/passwd
rm $R/turn; mkdir $R/turn; echo in > $R/turn/inner
ln $R/usr/bin/tool $R/usr/bin/tool-link
chmod 0640 $R/usr/bin/su
chown -h 2000:3000 $R/a/rel
setfattr -n user.k2 -v v2 $R/usr/bin/tool
echo changed > $R/a/h2
umoci repack --refresh-bundle --image L:img B
# Layer 3: an opaque directory.
mkdir -p opqsrc; echo new > opqsrc/new
umoci insert --image L:img --opaque opqsrc /opq
# Layer 4 (a fresh bundle): the directory back into a file, one name of a hardlink removed.
umoci unpack --image L:img B2
R=B2/rootfs
rm -r $R/turn; echo file-again > $R/turn
rm $R/a/h1
umoci repack --image L:img B2
umoci config --image L:img --config.entrypoint /usr/bin/tool --config.cmd arg \
    --config.env FOO=bar --config.workingdir /etc --config.user 1000:1000
umoci unpack --image L:img REF
