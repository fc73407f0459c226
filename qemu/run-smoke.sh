#!/usr/bin/env bash
# Host side of the guest smoke test: builds a small erofs image and two raw
# disks, then runs qemu/smoke-test.sh in the guest with every kind of input
# run-guest.sh takes (--bin, --file, --dir, --disk, --append). Extra arguments
# are passed on to run-guest.sh (e.g. --timeout 300).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh source-path=SCRIPTDIR
. "$here/lib.sh"

lg_ensure_cmds mkfs.erofs:erofs-utils xz:xz-utils

work=$(mktemp -d "${TMPDIR:-/tmp}/lazyblk-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tree/sub"
printf 'lazyblk smoke erofs\n' >"$work/tree/hello.txt"
printf 'nested\n' >"$work/tree/sub/nested.txt"
mkfs.erofs --quiet --all-root -zlz4hc "$work/smoke.erofs" "$work/tree" >&2 || die "mkfs.erofs failed"
for i in 0 1; do
    truncate -s 4M "$work/disk$i.img"
    printf 'LAZYBLK-DISK-%s' "$i" | dd of="$work/disk$i.img" conv=notrunc status=none
done

set +e
bash "$here/run-guest.sh" --script "$here/smoke-test.sh" \
    --file "$work/smoke.erofs:/images/smoke.erofs" \
    --file "$here/smoke-test.sh:/tmp/from-host/" \
    --dir "$here:/opt/qemu-harness" \
    --bin "$(command -v xz)" \
    --disk "$work/disk0.img" --disk "$work/disk1.img" \
    --append "SMOKE_FULL=1" "$@"
rc=$?
set -e
if ((rc == 0)); then
    got=$(dd if="$work/disk1.img" bs=512 skip=1 count=1 status=none | tr -d '\0')
    [[ $got == written-by-guest ]] || die "the guest's write to /dev/vdb did not reach $work/disk1.img (got '$got')"
fi
exit "$rc"
