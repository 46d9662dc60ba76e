# Shared by scripts/try and scripts/test: install what cellvm needs on a
# Debian 12 machine, build it, and build the guest. Every step is safe
# to repeat: it checks before it installs or rebuilds.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CELLVM_GUEST_DIR=${CELLVM_GUEST_DIR:-/var/cache/cellvm/guest}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages: QEMU, the guest build's tools.
APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static debootstrap
    e2fsprogs cpio kmod xz-utils zstd ca-certificates curl)

need_root() {
    [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and boots VMs)"
}

install_packages() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing ${missing[*]}"
        apt-get update -qq
        # shellcheck disable=SC2207
        missing=($(with_matching_qemu_utils "${missing[@]}"))
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --allow-downgrades "${missing[@]}" >/dev/null
    fi
}

# Prints the package list with QEMU and qemu-utils pinned to one
# release when QEMU is among them: a qemu-utils of another release (a
# newer, backported one) breaks Debian's QEMU, and apt will neither
# install QEMU beside it nor downgrade it by itself; installed alone,
# an older one is removed with qemu-img. Call after `apt-get update`.
with_matching_qemu_utils() {
    local p v out=()
    if [[ " $* " != *" qemu-system-x86 "* ]]; then
        echo "$@"
        return
    fi
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    for p in "$@"; do
        [[ $p == qemu-system-x86 || $p == qemu-utils ]] || out+=("$p")
    done
    echo "${out[@]}" "qemu-system-x86=$v" "qemu-utils=$v"
}

# Debian's backported QEMU (bookworm-backports), unpacked beside the
# system's, not installed: Debian 12's QEMU 7.2 loses pages a TCG guest
# writes during a live migration (fixed in QEMU 9.0), so the soak that
# checks live moves keep memory runs on this one. The archive's signed
# InRelease is checked with Debian's keyring, then every file by its
# SHA-256. Prints the binary's path.
BACKPORT_QEMU_DIR=${BACKPORT_QEMU_DIR:-/var/cache/cellvm/qemu-backport}
fetch_backported_qemu() {
    local bin=$BACKPORT_QEMU_DIR/root/usr/bin/qemu-system-x86_64
    if [[ -x $bin ]] && "$bin" --version >/dev/null 2>&1; then
        echo "$bin"
        return
    fi
    local mirror=http://deb.debian.org/debian suite=bookworm-backports
    local tmp p file sum got
    tmp=$(mktemp -d)
    say "fetching QEMU from $suite (for the live-migration soak)"
    curl -fsSL "$mirror/dists/$suite/InRelease" -o "$tmp/InRelease"
    gpgv --quiet --keyring /usr/share/keyrings/debian-archive-keyring.gpg \
        --output "$tmp/Release" "$tmp/InRelease" 2>/dev/null \
        || die "$suite's InRelease does not verify"
    sum=$(awk '/^SHA256:/ {on=1; next} /^[^ ]/ {on=0}
        on && $3 == "main/binary-amd64/Packages.xz" {print $1}' "$tmp/Release")
    [[ -n $sum ]] || die "no Packages.xz in $suite's Release"
    curl -fsSL "$mirror/dists/$suite/main/binary-amd64/Packages.xz" \
        -o "$tmp/Packages.xz"
    echo "$sum  $tmp/Packages.xz" | sha256sum --check --quiet \
        || die "$suite's Packages.xz does not match its Release"
    xz -d "$tmp/Packages.xz"
    rm -rf "$BACKPORT_QEMU_DIR/root.tmp"
    mkdir -p "$BACKPORT_QEMU_DIR/root.tmp"
    for p in qemu-system-x86 qemu-system-common qemu-system-data; do
        # The newest version of the package in the index.
        read -r file sum < <(awk -v want="$p" '
            /^Package: / {pkg=$2}
            /^Version: / {ver=$2}
            /^Filename: / {fn=$2}
            /^SHA256: / {sha=$2}
            /^$/ {if (pkg == want) print ver, fn, sha; pkg=""}
            END {if (pkg == want) print ver, fn, sha}' "$tmp/Packages" |
            sort -V | tail -n 1 | cut -d" " -f2-)
        [[ -n $file ]] || die "$p is not in $suite"
        curl -fsSL "$mirror/$file" -o "$tmp/$p.deb"
        got=$(sha256sum "$tmp/$p.deb" | cut -d" " -f1)
        [[ $got == "$sum" ]] || die "$file does not match the index"
        dpkg-deb -x "$tmp/$p.deb" "$BACKPORT_QEMU_DIR/root.tmp"
    done
    rm -rf "$BACKPORT_QEMU_DIR/root" "$tmp"
    mv "$BACKPORT_QEMU_DIR/root.tmp" "$BACKPORT_QEMU_DIR/root"
    "$bin" --version >/dev/null || die "the backported QEMU does not run here"
    echo "$bin"
}

need_cargo() {
    if ! command -v cargo >/dev/null; then
        [[ -x $HOME/.cargo/bin/cargo ]] && export PATH=$HOME/.cargo/bin:$PATH
    fi
    command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
}

# The guest kernel, initramfs (with the static agent) and base image.
build_guest() {
    say "building the guest (cached in $CELLVM_GUEST_DIR)"
    bash "$REPO/guest/build.sh" --out "$CELLVM_GUEST_DIR"
}

# Node and the pinned OpenComputer SDK for the compatibility test
# (crates/cli/tests/sdk.rs): `npm ci` again only when node_modules is
# missing or older than package-lock.json.
install_sdk_tests() {
    local dir=$REPO/tests/sdk
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        say "installing nodejs and npm"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    if [[ ! -d $dir/node_modules || $dir/package-lock.json -nt $dir/node_modules ]]; then
        say "installing the OpenComputer SDK for the compatibility test"
        npm ci --prefix "$dir" --no-audit --no-fund
        touch "$dir/node_modules"
    fi
}

# The S3 API server the checkpoint tests run against: the server mode
# of Python's moto, in its own virtual environment (Debian's Python
# refuses system-wide pip installs), linked onto the PATH.
MOTO_VENV=/var/cache/cellvm/moto-venv
install_s3_server() {
    if command -v moto_server >/dev/null; then
        return
    fi
    say "installing moto (an S3 API server for the tests)"
    if ! python3 -m venv --help >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    if [[ ! -x $MOTO_VENV/bin/moto_server ]]; then
        rm -rf "$MOTO_VENV"
        python3 -m venv "$MOTO_VENV" ||
            { apt-get install -y -qq python3-venv >/dev/null && python3 -m venv "$MOTO_VENV"; }
        "$MOTO_VENV/bin/pip" install --quiet 'moto[server]==5.*'
    fi
    ln -sf "$MOTO_VENV/bin/moto_server" /usr/local/bin/moto_server
}

# Redis (the event stream's tests) on 127.0.0.1:6379: started if it is
# not answering, installed first if missing. It keeps nothing on disk.
ensure_redis() {
    if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then
        return
    fi
    if ! command -v redis-server >/dev/null; then
        say "installing redis"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    fi
    say "starting redis on 127.0.0.1:6379"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 \
        --save "" --appendonly no --dir /var/lib/redis \
        --logfile /var/log/redis/cellvm-tests.log
    for _ in $(seq 50); do
        redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && return
        sleep 0.2
    done
    die "redis did not start (see /var/log/redis/cellvm-tests.log)"
}

# PostgreSQL (the edge's store runs its tests on both backends) on
# 127.0.0.1:5432: started if it is not answering, installed first if
# missing. Exports CELLVM_TEST_POSTGRES with credentials that work: the
# machine's trust setup when it has one, else a password we set.
ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null; then
        say "installing postgresql"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -1)
    if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
        say "starting postgresql $version"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        for _ in $(seq 50); do
            pg_isready -h 127.0.0.1 -p 5432 -q && break
            sleep 0.2
        done
        pg_isready -h 127.0.0.1 -p 5432 -q || die "postgresql did not start"
    fi
    local url=postgres://postgres@127.0.0.1:5432
    if ! psql "$url/postgres" -Atc 'select 1' >/dev/null 2>&1; then
        # No trust on loopback (a stock install): use a password.
        runuser -u postgres -- psql -qc \
            "ALTER USER postgres PASSWORD 'cellvm-tests'" >/dev/null
        url=postgres://postgres:cellvm-tests@127.0.0.1:5432
    fi
    if ! psql "$url/test" -Atc 'select 1' >/dev/null 2>&1; then
        psql "$url/postgres" -qc 'CREATE DATABASE test' >/dev/null
    fi
    export CELLVM_TEST_POSTGRES=$url
    export CELLVM_REQUIRE_POSTGRES=1
}
