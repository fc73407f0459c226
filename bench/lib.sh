# Shared by the bench scripts that boot one guest (sourced; `top` is the checkout).

# bench_binaries WORK: the release binaries (LAZYBLK_BIN's directory, or built now), stripped of
# their debug info into WORK for the guest; sets LAZYBLK_BIN and bindir.
bench_binaries() {
    mkdir -p "$1"
    if [[ -z ${LAZYBLK_BIN:-} ]]; then
        (cd "$top" && cargo build --release --locked -p lazyblk-tools -p lazyblk-tests --bins)
        LAZYBLK_BIN=$top/target/release/lazyblk
    fi
    bindir=$(dirname "$LAZYBLK_BIN")
    local b
    for b in lazyblk lazyblk-testkit; do strip --strip-debug -o "$1/$b" "$bindir/$b"; done
}
