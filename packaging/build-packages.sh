#!/usr/bin/env bash
# Build the OS packages of veritas from this checkout: veritas_<v>_all.deb, veritas-vxcompat_<v>_all.deb,
# and veritas-<v>-1.noarch.rpm, veritas-vxcompat-<v>-1.noarch.rpm (rpmbuild, Debian's rpm package).
# Both formats are made from one staged tree, so they carry the same files (modulo distribution paths).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: packaging/build-packages.sh [--out DIR] [--version V]

Options:
  --out DIR       where the packages go (default: <repo>/build/packages); made if missing
  --version V     package version (default: pyproject.toml's [project] version). A version that is not
                  the top entry of packaging/changelog gets an entry of its own in the packages' changelog
  -h, --help      this text

Installs its build tools with apt when missing (dpkg-deb is always there; rpmbuild comes from `rpm`).
Environment: SOURCE_DATE_EPOCH (timestamps in the packages; default: the last commit's time).
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PKG="$REPO/packaging"
OUT="$REPO/build/packages"
VERSION=""

die() { echo "build-packages: $*" >&2; exit 1; }
log() { printf '%s build-packages: %s\n' "$(date +%T)" "$*" >&2; }
need_arg() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) need_arg "$@"; OUT="$2"; shift 2 ;;
        --version) need_arg "$@"; VERSION="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

[[ -n "$VERSION" ]] || VERSION=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$REPO/pyproject.toml")
# one version string both formats accept: no '-' (Debian revision, rpm release) and no ':' (epoch)
[[ "$VERSION" =~ ^[0-9][A-Za-z0-9.+~]*$ ]] || die "bad version '$VERSION' (digits, letters, . + ~; no - or :)"

# build tools: dpkg-deb and gzip are in every Debian; rpmbuild is not
missing=()
command -v rpmbuild >/dev/null || missing+=(rpm)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "cannot install ${missing[*]}"
fi

if [[ -z "${SOURCE_DATE_EPOCH:-}" ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

mkdir -p "$OUT"
OUT=$(realpath "$OUT")
WORK=$(mktemp -d /tmp/veritas-pkgbuild.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ------------------------------------------------------------------ changelog (one for both formats)
CHANGELOG="$WORK/changelog"
top=$(sed -n '1s/^[^ ]* (\([^)]*\)).*/\1/p' "$PKG/changelog")
MAINTAINER=$(sed -n 's/^ -- \(.*>\)  .*/\1/p' "$PKG/changelog" | head -n1)
[[ -n "$top" && -n "$MAINTAINER" ]] || die "packaging/changelog does not start with a Debian changelog entry"
if [[ "$top" != "$VERSION" ]]; then
    rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
    {
        printf 'veritas (%s) unstable; urgency=medium\n\n' "$VERSION"
        printf '  * Build of checkout %s (the last release entry is %s).\n\n' "$rev" "$top"
        printf ' -- %s  %s\n\n' "$MAINTAINER" "$(date -u -R -d "@$SOURCE_DATE_EPOCH")"
        cat "$PKG/changelog"
    } >"$CHANGELOG"
else
    cp "$PKG/changelog" "$CHANGELOG"
fi

# ------------------------------------------------------------------ the staged trees (Debian paths)
MAIN="$WORK/deb/main"
COMPAT="$WORK/deb/vxcompat"
LIB="$MAIN/usr/lib/veritas"
mkdir -p "$LIB" "$MAIN/usr/sbin" "$MAIN/etc/vx/docker" "$MAIN/lib/systemd/system" \
         "$MAIN/usr/lib/ocf/resource.d/veritas" "$MAIN/usr/share/man/man8" \
         "$MAIN/usr/share/bash-completion/completions" "$MAIN/usr/share/doc/veritas" \
         "$COMPAT/usr/sbin" "$COMPAT/usr/share/man/man8" "$COMPAT/usr/share/doc/veritas-vxcompat"

# the code: storage, plugin, agents, veritas (not lab, not tests), sources only
tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' --exclude=veritas/VERSION -cf - storage plugin agents veritas \
    | tar -C "$LIB" --no-same-owner -xf -
find "$LIB" -type d -exec chmod 0755 {} + && find "$LIB" -type f -exec chmod 0644 {} +
chmod 0755 "$LIB"/agents/ocf/* "$LIB"/agents/vcs/*
printf '%s\n' "$VERSION" >"$LIB/veritas/VERSION"

wrapper() {  # wrapper PROG MODULE FUNC DEST
    sed -e "s|@PROG@|$1|g" -e "s|@MODULE@|$2|g" -e "s|@FUNC@|$3|g" "$PKG/wrapper.in" >"$4"
    chmod 0755 "$4"
}
wrapper veritas veritas.cli main "$MAIN/usr/sbin/veritas"
for prog in vxdg vxassist vradmin; do
    wrapper "$prog" veritas.vxcompat "main_$prog" "$COMPAT/usr/sbin/$prog"
done

install -m 0644 "$REPO/etc/vxinfoscale-default.conf" "$MAIN/etc/vx/docker/vxinfoscale-default.conf"

# the units, with the packaged command's path and a header that says how they were installed
for unit in veritas-plugin.service veritas-plugin.socket veritas-rlink.service; do
    {
        echo "# Installed by the veritas package: enabled at install, not started (systemctl start veritas-plugin.socket)."
        echo "# Local changes: systemctl edit ${unit}"
        sed -e '1,/^\[Unit\]/{/^#/d}' -e 's|/usr/local/bin/veritas|/usr/sbin/veritas|g' "$PKG/$unit"
    } >"$MAIN/lib/systemd/system/$unit"
    chmod 0644 "$MAIN/lib/systemd/system/$unit"
    ! grep -q /usr/local "$MAIN/lib/systemd/system/$unit" || die "$unit still names /usr/local"
done
grep -qx 'ExecStart=/usr/sbin/veritas plugin serve' "$MAIN/lib/systemd/system/veritas-plugin.service" \
    || die "veritas-plugin.service: ExecStart is not /usr/sbin/veritas plugin serve"

# OCF agents: symlinks to the scripts beside the package, which find it through their real path
for agent in "$LIB"/agents/ocf/*; do
    ln -s "/usr/lib/veritas/agents/ocf/$(basename "$agent")" "$MAIN/usr/lib/ocf/resource.d/veritas/$(basename "$agent")"
done

# veritas(8), the vx pages, bash completion: from the parser of the code being packaged
python3 "$PKG/gendoc.py" man "$VERSION" | gzip -9n >"$MAIN/usr/share/man/man8/veritas.8.gz"
python3 "$PKG/gendoc.py" bash >"$MAIN/usr/share/bash-completion/completions/veritas"
for prog in vxdg vxassist vradmin; do
    python3 "$PKG/gendoc.py" vxman "$prog" "$VERSION" | gzip -9n >"$COMPAT/usr/share/man/man8/$prog.8.gz"
done
bash -n "$MAIN/usr/share/bash-completion/completions/veritas" || die "the generated completion is not valid bash"

for doc in "$MAIN/usr/share/doc/veritas" "$COMPAT/usr/share/doc/veritas-vxcompat"; do
    cat >"$doc/copyright" <<EOF
veritas: InfoScale-style storage and high availability for Docker containers.
Copyright: the veritas maintainers.
License: not chosen yet; until one is, no license is granted beyond what the authors state elsewhere.
EOF
done
install -m 0644 "$PKG/README.md" "$MAIN/usr/share/doc/veritas/README.md"
find "$MAIN" "$COMPAT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

# ------------------------------------------------------------------ .deb
deb() {  # deb TREE CONTROL_TEMPLATE NAME
    local tree=$1 name=$3 ctl="$1/DEBIAN" doc size
    doc="$tree/usr/share/doc/$name"
    gzip -9n <"$CHANGELOG" >"$doc/changelog.Debian.gz"
    touch -h -d "@$SOURCE_DATE_EPOCH" "$doc/changelog.Debian.gz"
    mkdir -p "$ctl"
    size=$(du -sk --exclude=DEBIAN "$tree" | cut -f1)
    sed -e "s|@VERSION@|$VERSION|g" -e "s|@SIZE@|$size|g" -e "s|@MAINTAINER@|$MAINTAINER|g" "$2" >"$ctl/control"
    (cd "$tree" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
        | xargs -0 md5sum) >"$ctl/md5sums"
    dpkg-deb --root-owner-group -Zxz --build "$tree" "$OUT/${name}_${VERSION}_all.deb" >/dev/null
}
mkdir -p "$MAIN/DEBIAN"
cp "$PKG/deb/postinst" "$PKG/deb/prerm" "$PKG/deb/postrm" "$MAIN/DEBIAN/"
chmod 0755 "$MAIN/DEBIAN/postinst" "$MAIN/DEBIAN/prerm" "$MAIN/DEBIAN/postrm"
echo /etc/vx/docker/vxinfoscale-default.conf >"$MAIN/DEBIAN/conffiles"
# the rpm tree is copied before the Debian-only files go in
RPMSTAGE="$WORK/rpmstage"
mkdir -p "$RPMSTAGE"
cp -a "$MAIN" "$RPMSTAGE/main" && cp -a "$COMPAT" "$RPMSTAGE/vxcompat"
rm -rf "$RPMSTAGE/main/DEBIAN"
mkdir -p "$RPMSTAGE/main/usr/lib/systemd"
mv "$RPMSTAGE/main/lib/systemd/system" "$RPMSTAGE/main/usr/lib/systemd/system"
rm -rf "$RPMSTAGE/main/lib"

deb "$MAIN" "$PKG/deb/control.in" veritas
deb "$COMPAT" "$PKG/deb/control-vxcompat.in" veritas-vxcompat
log "built ${OUT}/veritas_${VERSION}_all.deb and veritas-vxcompat_${VERSION}_all.deb after $(elapsed) s"

# ------------------------------------------------------------------ .rpm
SPEC="$WORK/veritas.spec"
{ cat "$PKG/rpm/veritas.spec"; echo "%changelog"; python3 "$PKG/gendoc.py" rpmchangelog "$CHANGELOG"; } >"$SPEC"
mkdir -p "$WORK/rpm"
if ! rpmbuild -bb --quiet \
        --define "_topdir $WORK/rpm" --define "_rpmdir $OUT" \
        --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
        --define "pkgversion $VERSION" --define "stagedir $RPMSTAGE" \
        --define "use_source_date_epoch_as_buildtime 1" --define "clamp_mtime_to_source_date_epoch 1" \
        "$SPEC" >"$WORK/rpmbuild.log" 2>&1; then
    tail -n 40 "$WORK/rpmbuild.log" >&2
    die "rpmbuild failed"
fi
log "built ${OUT}/veritas-${VERSION}-1.noarch.rpm and veritas-vxcompat-${VERSION}-1.noarch.rpm after $(elapsed) s"
ls -1 "$OUT"/veritas*_"$VERSION"_all.deb "$OUT"/veritas*-"$VERSION"-1.noarch.rpm
