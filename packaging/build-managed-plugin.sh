#!/usr/bin/env bash
# Build the veritas managed (v2) Docker plugin: a directory with config.json and rootfs/, made from
# Debian packages only (no container registry, no PyPI), then optionally `docker plugin create` it.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: packaging/build-managed-plugin.sh [OPTIONS]

Builds the managed plugin directory (config.json + rootfs/) from Debian packages with mmdebstrap
and the veritas sources of this checkout; run as root.

Options:
  --out DIR           plugin directory to (re)create (default: <repo>/build/managed-plugin)
  --create NAME       then run `docker plugin create NAME DIR` (e.g. veritas:latest)
  --docker-host URL   engine for --create (default: $DOCKER_HOST, else the docker CLI's default)
  --driver NAME       the driver name Docker will know the plugin by, without registry or tag; the
                      plugin uses it to recognise its volumes in containers (default: the name given
                      to --create without registry and tag, else "veritas")
  --suite SUITE       Debian suite (default: bookworm)
  --mirror URL        Debian mirror (default: http://deb.debian.org/debian)
  --security URL      Debian security mirror (default: http://deb.debian.org/debian-security;
                      "none" leaves it out)
  --build-id ID       text of /etc/veritas-plugin-build-id (default: unique per build; Docker
                      refuses a plugin whose rootfs layer is identical to an existing plugin's)
  --refresh           ignore the cached rootfs tarball and bootstrap again
  -h, --help          this text

Environment:
  VERITAS_PLUGIN_CACHE  where rootfs tarballs are kept between builds, keyed by suite, mirrors and
                        package list (default: /var/cache/veritas-plugin)
  SOURCE_DATE_EPOCH     timestamp for a reproducible bootstrap (default: 1686355200, bookworm's release)
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$REPO/build/managed-plugin"
CREATE=""
DOCKER_HOST_ARG="${DOCKER_HOST:-}"
DRIVER=""
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY=http://deb.debian.org/debian-security
BUILD_ID=""
REFRESH=0
CACHE="${VERITAS_PLUGIN_CACHE:-/var/cache/veritas-plugin}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1686355200}"

PACKAGES=(python3 python3-flask python3-gunicorn python3-docker xfsprogs btrfs-progs e2fsprogs util-linux mount)

die() { echo "build-managed-plugin: $*" >&2; exit 1; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_arg "$@"; OUT="$2"; shift 2 ;;
        --create) need_arg "$@"; CREATE="$2"; shift 2 ;;
        --docker-host) need_arg "$@"; DOCKER_HOST_ARG="$2"; shift 2 ;;
        --driver) need_arg "$@"; DRIVER="$2"; shift 2 ;;
        --suite) need_arg "$@"; SUITE="$2"; shift 2 ;;
        --mirror) need_arg "$@"; MIRROR="$2"; shift 2 ;;
        --security) need_arg "$@"; SECURITY="$2"; shift 2 ;;
        --build-id) need_arg "$@"; BUILD_ID="$2"; shift 2 ;;
        --refresh) REFRESH=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "run as root (mmdebstrap, device nodes in the rootfs, docker plugin create)"
[[ -f "$REPO/config.json" ]] || die "$REPO/config.json is missing"
python3 -m json.tool "$REPO/config.json" >/dev/null || die "$REPO/config.json is not valid JSON"
case "$OUT" in
    /|"") die "refusing --out '$OUT'" ;;
esac
OUT=$(realpath -m "$OUT")

if [[ -z "$DRIVER" ]]; then
    if [[ -n "$CREATE" ]]; then
        DRIVER="${CREATE##*/}"
        DRIVER="${DRIVER%%:*}"
        DRIVER="${DRIVER%%@*}"
    else
        DRIVER=veritas
    fi
fi
[[ "$DRIVER" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]] || die "bad driver name '$DRIVER'"

log() { printf '%s build-managed-plugin: %s\n' "$(date +%T)" "$*" >&2; }
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

if ! command -v mmdebstrap >/dev/null; then
    log "installing mmdebstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends mmdebstrap >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y --no-install-recommends mmdebstrap >/dev/null; } \
        || die "cannot install mmdebstrap"
fi
HOOKS=/usr/share/mmdebstrap/hooks/merged-usr
[[ -d "$HOOKS" ]] || die "$HOOKS is missing (mmdebstrap too old?)"

SOURCES=("deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main")
[[ "$SECURITY" == none ]] || SOURCES+=("deb $SECURITY $SUITE-security main")
MMOPTS=(
    --variant=essential
    --hook-dir="$HOOKS"
    --include="$(IFS=,; echo "${PACKAGES[*]}")"
    --aptopt='APT::Install-Recommends "false"'
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
)

# The cache key covers everything that decides the rootfs tarball's content.
KEY=$(printf '%s\n' "$SUITE" "${SOURCES[@]}" "${MMOPTS[@]}" "$SOURCE_DATE_EPOCH" "$(mmdebstrap --version)" \
      | sha256sum | cut -c1-16)
mkdir -p "$CACHE"
TARBALL="$CACHE/rootfs-$SUITE-$KEY.tar"

exec 9>"$CACHE/.lock"
flock 9  # one bootstrap at a time per cache; a second concurrent build then finds the tarball
if [[ $REFRESH -eq 1 || ! -s "$TARBALL" ]]; then
    log "bootstrapping $SUITE with ${PACKAGES[*]} (cache miss: $TARBALL)"
    tmp="$CACHE/.rootfs-$KEY.$$.tar"  # mmdebstrap picks its output format from the .tar suffix
    rm -f "$tmp"
    if ! mmdebstrap --quiet --format=tar "${MMOPTS[@]}" "$SUITE" "$tmp" "${SOURCES[@]}" >"$CACHE/mmdebstrap.log" 2>&1
    then
        tail -n 30 "$CACHE/mmdebstrap.log" >&2
        rm -f "$tmp"
        die "mmdebstrap failed (log: $CACHE/mmdebstrap.log)"
    fi
    mv -f "$tmp" "$TARBALL"
    log "rootfs tarball ready after $(elapsed) s ($(du -h "$TARBALL" | cut -f1))"
else
    log "using cached rootfs $TARBALL"
fi
flock -u 9

# A fresh plugin directory every time: config.json + rootfs/.
rm -rf "$OUT"
mkdir -p "$OUT/rootfs"
tar -C "$OUT/rootfs" --numeric-owner -xpf "$TARBALL"
ROOTFS="$OUT/rootfs"

# Our packages (sources only) under /opt/veritas; config.json puts it on PYTHONPATH.
mkdir -p "$ROOTFS/opt/veritas"
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -cf - storage plugin veritas \
    | tar -C "$ROOTFS/opt/veritas" --no-same-owner -xf -
chmod -R go-w "$ROOTFS/opt/veritas"
chroot "$ROOTFS" /usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash /opt/veritas >/dev/null \
    || die "python3 in the rootfs cannot compile the veritas sources"

# The configuration baked into the rootfs: paths as the plugin sees them inside its container.
CONF="$ROOTFS/etc/vx/docker/vxinfoscale-default.conf"
mkdir -p "$(dirname "$CONF")"
sed -E \
    -e 's|^(state_root)[[:space:]]*=.*|\1 = /var/lib/veritas|' \
    -e 's|^(mount_root)[[:space:]]*=.*|\1 = /dockerfs|' \
    -e 's|^(socket)[[:space:]]*=.*|\1 = /run/docker/plugins/veritas.sock|' \
    -e 's|^(docker_host)[[:space:]]*=.*|\1 = unix:///run/docker.sock|' \
    -e "s|^(driver)[[:space:]]*=.*|\\1 = $DRIVER|" \
    "$REPO/etc/vxinfoscale-default.conf" >"$CONF"
for want in "state_root = /var/lib/veritas" "mount_root = /dockerfs" "socket = /run/docker/plugins/veritas.sock" \
            "docker_host = unix:///run/docker.sock" "driver = $DRIVER"; do
    grep -qxF "$want" "$CONF" || die "baked config lacks '$want' (did etc/vxinfoscale-default.conf change?)"
done
# Load it with the rootfs's own Python, as the plugin will.
chroot "$ROOTFS" /usr/bin/env -i PYTHONPATH=/opt/veritas PYTHONDONTWRITEBYTECODE=1 /usr/bin/python3 -c \
    'from storage.config import load_config; c = load_config("/etc/vx/docker/vxinfoscale-default.conf"); import docker, flask, gunicorn; print(c.plugin.driver, docker.__version__, gunicorn.__version__)' \
    >/dev/null || die "the baked config or the Python packages do not load in the rootfs"

# Mount points the plugin's config.json needs inside the rootfs.
mkdir -p "$ROOTFS/var/lib/veritas" "$ROOTFS/dockerfs" "$ROOTFS/run/docker/plugins" "$ROOTFS/sys/fs/cgroup"
: >"$ROOTFS/run/docker.sock"

# Docker refuses a plugin whose rootfs layer is identical to an existing plugin's.
if [[ -z "$BUILD_ID" ]]; then
    src_hash=$(tar -C "$REPO" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
               --exclude=__pycache__ --exclude='*.pyc' -cf - storage plugin veritas config.json \
               etc/vxinfoscale-default.conf | sha256sum | cut -c1-12)
    BUILD_ID="$(date -u +%Y%m%dT%H%M%SZ)-$src_hash-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
fi
printf '%s\n' "$BUILD_ID" >"$ROOTFS/etc/veritas-plugin-build-id"

cp "$REPO/config.json" "$OUT/config.json"
log "plugin directory $OUT ready after $(elapsed) s (rootfs $(du -sh "$ROOTFS" | cut -f1), build id $BUILD_ID)"

if [[ -n "$CREATE" ]]; then
    DOCKER=(docker)
    [[ -z "$DOCKER_HOST_ARG" ]] || DOCKER+=(-H "$DOCKER_HOST_ARG")
    log "docker plugin create $CREATE $OUT"
    "${DOCKER[@]}" plugin create "$CREATE" "$OUT" >/dev/null
    log "created plugin $CREATE after $(elapsed) s; next: docker plugin set $CREATE state.source=DIR (it must exist),"
    log "then docker plugin enable $CREATE"
fi
echo "$OUT"
