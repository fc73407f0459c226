# Guest: lazyblk images in a token-auth OCI registry (issue 14). A real docker-registry
# (distribution 2.8, `auth: token`) with the test kit's token issuer on loopback, tokens that
# expire every 4 s; `lazyblk push` of the host-built images, then `lazyblk add <ref>`: erofs
# mount, exact tree digest, no secret in records, logs or status; kill -9 of the daemon while a
# reader is fetching + `lazyblk recover`; an outage of the registry in the middle of a read.
# Data: /www/img1, /www/img2 (built on the host), /expected/*.txt.
. /guest/lib.sh
export LAZYBLK_CACHE_DIR=/var/cache/lazyblk
PW=guest-pa55word-never-logged
M=/mnt/reg
mkdir -p $M /tmp/reg
printf 'lazy:%s\n' "$PW" > /tmp/creds
chmod 600 /tmp/creds
dmesg -c > /dev/null
# registry_pids: the pids of the running `docker-registry serve` processes (no pkill in busybox)
registry_pids() {
    for d in /proc/[0-9]*; do
        case "$(tr '\0' ' ' < "$d/cmdline" 2> /dev/null)" in *"docker-registry serve"*) echo "${d#/proc/}" ;; esac
    done
}
no_registry() { [ -z "$(registry_pids)" ]; }

step "a token-auth registry and the lazyblk images pushed to it"
lazyblk-testkit token-registry /tmp/reg --user lazy --password "$PW" --expires 4 \
    --host-file /tmp/reg/host > /tmp/reg/kit.log 2>&1 &
wait_for 60 "the registry to answer" test -s /tmp/reg/host
HOST=$(cat /tmp/reg/host)
echo "registry: $HOST"
D1=$(lazyblk push /www/img1 "$HOST/test/img1:v1" --creds-file /tmp/creds 2> /tmp/push.err) \
    || { cat /tmp/push.err; die "lazyblk push img1"; }
cat /tmp/push.err
check "push printed a manifest digest" sh -c "echo '$D1' | grep -Eq '^sha256:[0-9a-f]{64}$'"
lazyblk push /www/img2 "$HOST/test/img2:v1" --creds-file /tmp/creds > /dev/null 2>&1 || die "push img2"
if lazyblk push /www/img1 "$HOST/test/img1:v1" > /tmp/anon.out 2>&1; then
    die "an anonymous push to a token-auth registry succeeded"
fi
check "an anonymous push fails with one line naming the registry" \
    sh -c "[ \$(grep -c . /tmp/anon.out) -eq 1 ] && grep -q '$HOST' /tmp/anon.out"

step "add <ref>: mount, exact tree, tokens renewed during the read"
DEV=$(lazyblk add "$HOST/test/img1:v1" --creds-file /tmp/creds 2> /tmp/add.err) || { cat /tmp/add.err; die "lazyblk add <ref>"; }
ID=${DEV#/dev/ublkb}
check "add printed a ublk device" test -b "$DEV"
mount -t erofs -o ro "$DEV" $M || die "mount erofs from $DEV"
t0=$(now_ms)
lazyblk-testkit digest-tree $M > /tmp/got1.txt || die "reading tree 1"
cmp -s /expected/img1.txt /tmp/got1.txt || { diff /expected/img1.txt /tmp/got1.txt | head; die "tree 1 differs"; }
ok "tree 1 through the registry matches the source (read in $(secs_since "$t0") s)"
check "the record pins the tag to the digest pushed" grep -q "test/img1:v1@$D1" /run/lazyblk/$ID.json
check "the record names the credentials file, not the secret" \
    sh -c "grep -q /tmp/creds /run/lazyblk/$ID.json && ! grep -q '$PW' /run/lazyblk/$ID.json"
lazyblk status "$ID" > /tmp/status.txt; lazyblk list >> /tmp/status.txt
check "no secret in status, list or the daemon log" \
    sh -c "! grep -q '$PW' /tmp/status.txt /var/log/lazyblk/*.log"
umount $M
lazyblk del "$ID" > /dev/null || die "del"

step "kill -9 of the daemon while a reader fetches from the registry, then recover"
tc qdisc add dev lo root netem delay 10ms rate 4mbit
DEV=$(lazyblk add "$HOST/test/img2:v1" --creds-file /tmp/creds --no-prefetch 2> /tmp/add.err) || { cat /tmp/add.err; die "add img2"; }
ID=${DEV#/dev/ublkb}
mount -t erofs -o ro "$DEV" $M || die "mount img2"
bg_start crash lazyblk-testkit digest-tree $M
sleep 1
bg_running crash || die "the reader finished within 1 s: nothing was in flight"
PID=$(daemon_pid "$ID")
kill -9 "$PID"
wait_for 10 "daemon $PID to die" pid_gone "$PID"
lazyblk recover "$ID" > /tmp/recover.out 2>&1 || { cat /tmp/recover.out; die "lazyblk recover"; }
bg_wait crash 300
[ "$(bg_rc crash)" = 0 ] || { cat /tmp/crash.err; die "the reader failed across the crash"; }
cmp -s /expected/img2.txt /tmp/crash.out || { diff /expected/img2.txt /tmp/crash.out | head; die "tree 2 differs after recover"; }
ok "killed and recovered mid-read: the reader finished with the right tree"
tc qdisc del dev lo root
umount $M
lazyblk del "$ID" > /dev/null || die "del"

step "an outage of the registry: reads wait, then finish when it is back"
rm -rf /var/cache/lazyblk
DEV=$(lazyblk add "$HOST/test/img1:v1" --creds-file /tmp/creds --no-prefetch 2> /tmp/add.err) || { cat /tmp/add.err; die "add img1 again"; }
ID=${DEV#/dev/ublkb}
mount -t erofs -o ro "$DEV" $M || die "mount img1"
cat $M/small/d0/f0.txt > /dev/null || die "a first read"
REG=$(registry_pids)
[ -n "$REG" ] || die "no registry process to stop"
kill $REG
wait_for 10 "the registry to stop" no_registry
check "present data reads during the outage" sh -c "cat $M/small/d0/f0.txt > /dev/null"
bg_start outage sha256sum $M/large/random.bin
sleep 3
bg_running outage || { cat /tmp/outage.err; die "a read of missing data ended during the outage (status $(bg_rc outage))"; }
ok "a read of missing data waits through the outage"
docker-registry serve /tmp/reg/config.yml > /tmp/reg/restart.log 2>&1 &
bg_wait outage 120
[ "$(bg_rc outage)" = 0 ] || { cat /tmp/outage.err; die "the read failed after the outage"; }
got=$(cut -d' ' -f1 /tmp/outage.out)
check "the read after the outage has the right bytes" [ "$got" = "$(expected_sha img1 large/random.bin)" ]
e=$(io_errors)
[ -z "$e" ] || { echo "$e"; die "the kernel logged IO errors"; }
ok "no kernel IO errors"
umount $M
lazyblk del --all > /dev/null
summary
