#!/usr/bin/env bash
# Boots the built guest under QEMU (TCG, microvm) and checks that the
# agent answers Ping and runs `uname -a`; prints the boot figures.
# The check itself is the Rust test crates/agent/tests/boot.rs, so it
# speaks the real wire codec. Usage: guest/smoke.sh [GUEST_DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CELLVM_GUEST_DIR=${1:-${CELLVM_GUEST_DIR:-/var/cache/cellvm/guest}}
for f in vmlinuz initrd.img base.img; do
    [[ -f $CELLVM_GUEST_DIR/$f ]] || {
        echo "smoke: $CELLVM_GUEST_DIR/$f missing; run guest/build.sh" >&2
        exit 1
    }
done
exec cargo test -q -p cellvm-agent --test boot -- --ignored --nocapture
