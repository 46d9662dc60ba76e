#!/usr/bin/env bash
# Builds the cellvm guest: kernel, initramfs (busybox + virtio modules +
# the static agent) and the `base` root filesystem image.
#
# Usage: guest/build.sh [--out DIR] [--agent PATH]
#
#   --out DIR     output directory (default $CELLVM_GUEST_DIR, else
#                 /var/cache/cellvm/guest)
#   --agent PATH  use this static cellvm-agent instead of building it
#
# Environment:
#   CELLVM_DEBIAN_MIRROR   Debian mirror for debootstrap
#                          (default http://deb.debian.org/debian)
#   CELLVM_BASE_DISK_MB    minimum size of base.img (default 1024); it
#                          is otherwise its content plus a quarter: each
#                          sandbox's disk is grown to its diskMB at boot
#   CELLVM_INITRD_COMPRESS none|gzip (default none: under TCG the guest
#                          CPU is slow and decompressing costs boot time)
#
# Produces in the output directory: vmlinuz, initrd.img, base.img (raw
# ext4) and manifest.json. Idempotent: the root filesystem is rebuilt
# only when its recipe changes (the cache key hashes the package list
# and the functions that build it), the initramfs only when the agent,
# the kernel, the module list or /init change.
set -euo pipefail
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

OUT=${CELLVM_GUEST_DIR:-/var/cache/cellvm/guest}
AGENT=
MIRROR=${CELLVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_DISK_MB=${CELLVM_BASE_DISK_MB:-1024}
COMPRESS=${CELLVM_INITRD_COMPRESS:-none}

SUITE=bookworm
PACKAGES=python3,git,curl,ca-certificates,procps,iproute2,less
KERNEL_META=linux-image-cloud-amd64
# Loaded in this order after their modules.dep dependencies. virtio_rng
# feeds the guest's entropy pool from the host, so early TLS (curl, git)
# does not stall waiting for randomness.
MODULES=(virtio_ring virtio virtio_mmio virtio_pci_modern_dev
    virtio_pci_legacy_dev virtio_pci virtio_console virtio_blk virtio_rng)

log() { printf 'guest-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --out) OUT=${2:?--out needs a directory}; shift 2 ;;
        --agent) AGENT=${2:?--agent needs a path}; shift 2 ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
done
case $COMPRESS in none|gzip) ;; *) die "CELLVM_INITRD_COMPRESS=$COMPRESS" ;; esac

[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap, mknod, apt)"
mkdir -p "$OUT/cache"
OUT=$(cd "$OUT" && pwd)
CACHE=$OUT/cache

# --- host tools -------------------------------------------------------

APT_UPDATED=
apt_update_once() {
    if [[ -z $APT_UPDATED ]]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# Installs the packages whose marker command or file is missing.
ensure_tools() {
    local want=() pair cmd pkg
    for pair in qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils \
        debootstrap:debootstrap mkfs.ext4:e2fsprogs cpio:cpio \
        xz:xz-utils zstd:zstd strip:binutils readelf:binutils sha256sum:coreutils depmod:kmod; do
        cmd=${pair%%:*} pkg=${pair##*:}
        command -v "$cmd" >/dev/null 2>&1 || want+=("$pkg")
    done
    # busybox-static, not the dynamic busybox: it runs in the initramfs.
    dpkg -s busybox-static >/dev/null 2>&1 || want+=(busybox-static)
    [[ ${#want[@]} -eq 0 ]] && return
    log "installing ${want[*]}"
    apt_update_once
    if [[ " ${want[*]} " == *" qemu-system-x86 "* ]]; then
        # QEMU and qemu-utils from one release: a qemu-utils of another
        # (a backported one) breaks Debian's QEMU, and apt neither
        # installs QEMU beside it nor downgrades it by itself.
        local v
        v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
        want=("${want[@]/#qemu-system-x86/qemu-system-x86=$v}")
        want=("${want[@]/#qemu-utils/}")
        want+=("qemu-utils=$v")
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --allow-downgrades --no-install-recommends ${want[@]} >/dev/null
}

# --- kernel -----------------------------------------------------------

# Sets KPKG (versioned package), KVER, KROOT (extracted package tree).
fetch_kernel() {
    KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [[ -z $KPKG ]]; then
        apt_update_once
        KPKG=$(apt-cache depends "$KERNEL_META" |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    [[ -n $KPKG ]] || die "cannot resolve $KERNEL_META"
    KVER=${KPKG#linux-image-}
    local dir=$CACHE/kernel/$KPKG
    KROOT=$dir/root
    if [[ ! -f $dir/.done ]]; then
        log "fetching $KPKG"
        rm -rf "$dir" && mkdir -p "$dir"
        # Extracted only: the host's own kernel is not touched.
        local get=(apt-get download -qq -o APT::Sandbox::User=root "$KPKG")
        (cd "$dir" && "${get[@]}") ||
            { apt_update_once; (cd "$dir" && "${get[@]}"); }
        dpkg-deb -x "$dir"/"$KPKG"_*.deb "$KROOT"
        # The package leaves modules.dep to its postinst; make it here.
        depmod -b "$KROOT" "$KVER"
        touch "$dir/.done"
    fi
    [[ -f $KROOT/boot/vmlinuz-$KVER ]] || die "no vmlinuz in $KPKG"
}

# Prints the module files to load, dependencies first, from modules.dep.
module_order() {
    local mdir=$KROOT/lib/modules/$KVER
    awk -v wanted="${MODULES[*]}" '
        function base(p) { sub(/.*\//, "", p); sub(/\.ko(\.xz|\.zst|\.gz)?$/, "", p); gsub(/-/, "_", p); return p }
        function visit(m,   n, i, parts) {
            if (m in seen) return
            seen[m] = 1
            n = split(deps[m], parts, " ")
            # modules.dep lists dependencies in reverse load order.
            for (i = n; i >= 1; i--) visit(base(parts[i]))
            if (m in path) print path[m]
            else missing = missing " " m
        }
        {
            file = $1; sub(/:$/, "", file)
            m = base(file); path[m] = file
            $1 = ""; deps[m] = $0
        }
        END {
            n = split(wanted, w, " ")
            for (i = 1; i <= n; i++) visit(w[i])
            if (missing != "") { print "missing modules:" missing > "/dev/stderr"; exit 1 }
        }' "$mdir/modules.dep"
}

# --- agent ------------------------------------------------------------

# Sets AGENT to a static, stripped agent binary.
build_agent() {
    if [[ -z $AGENT ]]; then
        command -v cargo >/dev/null || die "cargo not found; pass --agent"
        log "building static cellvm-agent"
        (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' \
            cargo build --release -q -p cellvm-agent \
            --target x86_64-unknown-linux-gnu)
        AGENT=${CARGO_TARGET_DIR:-$REPO/target}/x86_64-unknown-linux-gnu/release/cellvm-agent
    fi
    [[ -x $AGENT ]] || die "agent $AGENT is not executable"
    if readelf -d "$AGENT" 2>/dev/null | grep -q NEEDED; then
        die "$AGENT is dynamically linked; build it with +crt-static"
    fi
    mkdir -p "$CACHE/agent"
    strip -o "$CACHE/agent/cellvm-agent" "$AGENT"
    AGENT_STRIPPED=$CACHE/agent/cellvm-agent
}

# --- initramfs --------------------------------------------------------

# The initramfs /init. Kept in a function so its text is part of the
# initramfs cache key.
init_script() {
    cat <<'INIT'
#!/bin/busybox sh
# cellvm initramfs: load virtio, mount the root disk, hand over to the
# agent as PID 1.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs -o nosuid devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
exec </dev/console >/dev/console 2>&1

say() { echo "cellvm-init: $*"; }
fail() { say "$*; powering off"; sleep 1; poweroff -f; reboot -f; }

case " $(cat /proc/cmdline) " in
*" cellvm.probe=1 "*)
    # The worker's KVM probe: proof that the kernel ran our userland.
    if [ -c /dev/ttyS0 ]; then echo cellvm-probe-ok >/dev/ttyS0
    else echo cellvm-probe-ok; fi
    poweroff -f
    reboot -f ;;
esac

while read -r mod; do
    insmod "/lib/modules/$mod" || say "insmod $mod failed"
done </lib/modules/load.order

root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in root=/dev/*) root=${arg#root=} ;; esac
done
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -gt 500 ] && fail "no root device $root"
    sleep 0.02
done
mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"

# The agent lives on a tmpfs /run of the new root: the disk (and so
# every template made from it) stays free of agent copies, and the
# agent always matches this initramfs.
mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs /newroot/run
mkdir -p /newroot/run/cellvm
cp /sbin/cellvm-agent /newroot/run/cellvm/cellvm-agent
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /run/cellvm/cellvm-agent
INIT
}

build_initrd() {
    local order key stage
    order=$(module_order)
    key=$( {
        echo "kernel $KPKG compress $COMPRESS"
        echo "$order"
        sha256sum "$AGENT_STRIPPED" | cut -d' ' -f1
        sha256sum /bin/busybox | cut -d' ' -f1
        init_script
    } | sha256sum | cut -c1-16)
    INITRD_KEY=$key
    if [[ -f $OUT/initrd.img && $(cat "$OUT/.initrd.key" 2>/dev/null) == "$key" ]]; then
        log "initrd.img up to date ($key)"
        return
    fi
    log "building initrd.img ($key)"
    stage=$(mktemp -d "$CACHE/initrd.XXXXXX")
    mkdir -p "$stage"/{bin,sbin,dev,proc,sys,newroot,lib/modules}
    cp /bin/busybox "$stage/bin/busybox"
    cp "$AGENT_STRIPPED" "$stage/sbin/cellvm-agent"
    : >"$stage/lib/modules/load.order"
    local rel name src ko
    while read -r rel; do
        src=$KROOT/lib/modules/$KVER/$rel
        name=$(basename "$rel")
        ko=${name%.xz} ko=${ko%.zst} ko=${ko%.gz}
        # busybox insmod wants plain ELF: decompress here, once.
        case $name in
            *.ko.xz) xz -dc "$src" >"$stage/lib/modules/$ko" ;;
            *.ko.zst) zstd -qdc "$src" >"$stage/lib/modules/$ko" ;;
            *.ko.gz) gzip -dc "$src" >"$stage/lib/modules/$ko" ;;
            *) cp "$src" "$stage/lib/modules/$ko" ;;
        esac
        echo "$ko" >>"$stage/lib/modules/load.order"
    done <<<"$order"
    init_script >"$stage/init"
    chmod 755 "$stage/init"
    mknod -m 600 "$stage/dev/console" c 5 1 2>/dev/null || true
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --quiet --reproducible) |
        if [[ $COMPRESS == gzip ]]; then gzip -6; else cat; fi \
        >"$OUT/initrd.img.tmp"
    mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    echo "$key" >"$OUT/.initrd.key"
    rm -rf "$stage"
}

# --- root filesystem --------------------------------------------------

# Small changes after debootstrap. Part of the rootfs cache key.
tweak_rootfs() {
    local root=$1
    echo cellvm >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost\n' \
        >"$root/etc/hosts"
    # QEMU user networking's resolver; the worker rewrites it when it
    # gives the sandbox another network.
    echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
    echo '/dev/vda / ext4 defaults,noatime 0 1' >"$root/etc/fstab"
    : >"$root/etc/machine-id"
    mkdir -p "$root/root" "$root/run/cellvm"
    chmod 700 "$root/root"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/tmp/*
}

build_rootfs() {
    local dir=$1 root=$1/root used size
    rm -rf "$dir" && mkdir -p "$dir"
    log "debootstrap $SUITE ($PACKAGES) from $MIRROR"
    debootstrap --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$root" "$MIRROR" >"$dir/debootstrap.log" 2>&1 ||
        die "debootstrap failed; see $dir/debootstrap.log"
    tweak_rootfs "$root"
    used=$(du -sm "$root" | cut -f1)
    # Small on purpose: the image is the smallest disk a sandbox can
    # have, and the guest grows its filesystem to the disk it is given.
    size=$((used * 5 / 4))
    ((size < BASE_DISK_MB)) && size=$BASE_DISK_MB
    log "mkfs.ext4 ${size} MiB (${used} MiB used)"
    rm -f "$dir/base.img"
    truncate -s "${size}M" "$dir/base.img"
    # Inode tables and journal are zeroed now, on the host: otherwise
    # every guest's ext4lazyinit writes them into its own overlay.
    mkfs.ext4 -q -F -L cellvm-root -m 0 -d "$root" \
        -E lazy_itable_init=0,lazy_journal_init=0 "$dir/base.img"
    # Hashing the image takes a while: once per build, kept for the
    # manifest.
    sha256sum "$dir/base.img" | cut -d' ' -f1 >"$dir/base.img.sha256"
    rm -rf "$root"
    touch "$dir/.done"
}

ensure_rootfs() {
    ROOTFS_KEY=$( {
        echo "$SUITE $PACKAGES $BASE_DISK_MB"
        declare -f build_rootfs tweak_rootfs
    } | sha256sum | cut -c1-16)
    local dir=$CACHE/rootfs-$ROOTFS_KEY
    if [[ ! -f $dir/.done ]]; then
        build_rootfs "$dir"
    else
        log "rootfs cached ($ROOTFS_KEY)"
    fi
    if [[ ! -f $OUT/base.img || $(cat "$OUT/.base.key" 2>/dev/null) != "$ROOTFS_KEY" ]]; then
        cp --sparse=always "$dir/base.img" "$OUT/base.img.tmp"
        mv "$OUT/base.img.tmp" "$OUT/base.img"
        cp "$dir/base.img.sha256" "$OUT/.base.sha256"
        echo "$ROOTFS_KEY" >"$OUT/.base.key"
    fi
}

# --- manifest ---------------------------------------------------------

file_json() {
    local f=$OUT/$1 sum
    if [[ $1 == base.img && -f $OUT/.base.sha256 ]]; then
        sum=$(cat "$OUT/.base.sha256")
    else
        sum=$(sha256sum "$f" | cut -d' ' -f1)
    fi
    printf '"%s": {"bytes": %s, "sha256": "%s"}' "$1" "$(stat -c %s "$f")" \
        "$sum"
}

write_manifest() {
    local mods
    mods=$(printf '"%s",' "${MODULES[@]}")
    cat >"$OUT/manifest.json.tmp" <<EOF
{
  "format": 1,
  "kernel": {"package": "$KPKG", "version": "$KVER"},
  "files": {
    $(file_json vmlinuz),
    $(file_json initrd.img),
    $(file_json base.img)
  },
  "inputs": {
    "suite": "$SUITE",
    "packages": "$PACKAGES",
    "modules": [${mods%,}],
    "rootfs_key": "$ROOTFS_KEY",
    "initrd_key": "$INITRD_KEY",
    "initrd_compression": "$COMPRESS",
    "agent_sha256": "$(sha256sum "$AGENT_STRIPPED" | cut -d' ' -f1)",
    "busybox_sha256": "$(sha256sum /bin/busybox | cut -d' ' -f1)"
  }
}
EOF
    mv "$OUT/manifest.json.tmp" "$OUT/manifest.json"
}

main() {
    ensure_tools
    fetch_kernel
    cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
    mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    build_agent
    build_initrd
    ensure_rootfs
    write_manifest
    log "done: $OUT (kernel $KVER)"
}

main
