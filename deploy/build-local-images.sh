#!/usr/bin/env bash
# Build, once, everything `docker-compose up` needs on a machine that cannot pull images:
#   runner-base/python:local        (scripts/base-images.sh: debootstrap'd bookworm + python3)
#   runner-compose/services:local   debootstrap'd bookworm minbase with redis-server,
#                                   postgresql-15, docker-registry and wget (one shared layer)
#   runner-compose/redis:local      \
#   runner-compose/postgres:local    } thin images on services:local that behave like the
#   runner-compose/registry:local   /  public redis, postgres and registry:2 images
#   var/compose/wheels/             a wheelhouse of the runner's runtime dependencies (and
#                                   pip itself) that deploy/app.Dockerfile installs offline
# The app image itself (runner-compose/app:local) is built by `docker-compose build`.
# Idempotent: what exists is left alone (--force rebuilds the images and the wheelhouse;
# the rootfs tarball under var/cache/compose is kept until you delete it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE="$ROOT/var/cache/compose"
WHEELS="$ROOT/var/compose/wheels"
SUITE=${RUNNER_BASE_SUITE:-bookworm}
MIRROR=${RUNNER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SERVICES_PACKAGES="redis-server,postgresql-15,docker-registry,wget"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1
mkdir -p "$CACHE"

have_image() { [ "$FORCE" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }
log() { echo "build-local-images: $*"; }

python_base() {
  if docker image inspect runner-base/python:local >/dev/null 2>&1; then
    log "runner-base/python:local present"
  else
    bash scripts/base-images.sh
  fi
}

# A bookworm minbase with the three servers installed through apt in a chroot; services
# are kept from starting (policy-rc.d) and postgresql-common from creating a cluster.
services_rootfs() {
  local tarball="$CACHE/services-$SUITE.tar"
  [ -s "$tarball" ] && return
  local tmp rootfs
  tmp=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  rootfs="$tmp/rootfs"
  log "debootstrap $SUITE + $SERVICES_PACKAGES (several minutes, once; log: $CACHE/debootstrap.log)"
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 ||
    { tail -20 "$CACHE/debootstrap.log"; rm -rf "$tmp"; exit 1; }
  printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
  chmod 755 "$rootfs/usr/sbin/policy-rc.d"
  mkdir -p "$rootfs/etc/postgresql-common/createcluster.d"
  echo "create_main_cluster = false" >"$rootfs/etc/postgresql-common/createcluster.d/no-main.conf"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  mount -t proc proc "$rootfs/proc"
  local status=0
  chroot "$rootfs" /bin/sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $(tr , ' ' <<<"$SERVICES_PACKAGES")" \
    >>"$CACHE/debootstrap.log" 2>&1 || status=$?
  umount "$rootfs/proc"
  if [ "$status" != 0 ]; then tail -20 "$CACHE/debootstrap.log"; rm -rf "$tmp"; exit 1; fi
  rm -f "$rootfs/usr/sbin/policy-rc.d" "$rootfs/etc/resolv.conf"
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* "$rootfs"/usr/share/i18n
  # PostgreSQL's JIT (LLVM, ~130 MB) stays out: without the provider JIT is just off.
  rm -rf "$rootfs"/usr/lib/postgresql/*/lib/llvmjit* "$rootfs"/usr/lib/postgresql/*/lib/bitcode \
    "$rootfs"/usr/lib/x86_64-linux-gnu/libLLVM-* "$rootfs"/usr/lib/x86_64-linux-gnu/libz3.so*
  tar -C "$rootfs" -cf "$tmp/rootfs.tar" .
  mv "$tmp/rootfs.tar" "$tarball"
  rm -rf "$tmp"
}

services_base() {
  local tag=runner-compose/services:local
  if docker image inspect "$tag" >/dev/null 2>&1 && [ "$FORCE" = 0 ]; then
    log "$tag present"; return
  fi
  services_rootfs
  docker import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' \
    "$CACHE/services-$SUITE.tar" "$tag" >/dev/null
  log "$tag built"
}

thin_image() {
  local name=$1 tag="runner-compose/$1:local"
  if have_image "$tag"; then log "$tag present"; return; fi
  docker build --force-rm -t "$tag" -f "deploy/$name.Dockerfile" deploy >"$CACHE/build-$name.log" 2>&1 ||
    { tail -20 "$CACHE/build-$name.log"; exit 1; }
  log "$tag built"
}

# Runtime dependencies only, at the versions the dev venv has (so the image runs what
# the tests ran), plus pip as a wheel: the base image has python3 but no pip.
wheelhouse() {
  local pip="$ROOT/var/venv/bin/pip" wanted
  [ -x "$pip" ] || { echo "error: $pip missing; run 'make bootstrap' first" >&2; exit 1; }
  wanted=$("$ROOT/var/venv/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
  if [ "$FORCE" = 0 ] && [ "$(cat "$WHEELS/requirements.txt" 2>/dev/null)" = "$wanted" ] &&
      ls "$WHEELS"/debs/libmagic1_*.deb >/dev/null 2>&1; then
    log "wheelhouse present ($WHEELS)"; return
  fi
  local part
  mkdir -p "$(dirname "$WHEELS")"
  part=$(mktemp -d "$WHEELS.part.XXXXXX")
  echo "$wanted" >"$part/requirements.txt"
  "$pip" freeze --exclude-editable | grep -v -e '^-e ' -e ' @ ' >"$part/constraints.txt"
  log "building the wheelhouse (PyPI or the pip cache)"
  # Resolved for the image's interpreter (Debian's CPython 3.11.2, glibc 2.36), not the
  # venv's: pip download --python-version does not cover every marker (e.g. redis needs
  # async-timeout below 3.11.3), so the image's own python3 checks the wheelhouse offline
  # and whatever it reports missing is fetched too, until nothing is.
  local pyver abi missing round out
  pyver=$(docker run --rm --network none runner-base/python:local \
    python3 -c 'import platform; print(platform.python_version())')
  abi="cp$(cut -d. -f1,2 <<<"$pyver" | tr -d .)"
  local fetch=("$pip" download -q --dest "$part" --only-binary=:all: --implementation cp
    --python-version "$pyver" --abi "$abi" --platform manylinux_2_36_x86_64
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64
    --platform manylinux1_x86_64 -c "$part/constraints.txt")
  "${fetch[@]}" -r "$part/requirements.txt" pip
  for round in 1 2 3 4 5 6 7 8 9; do
    out=$(docker run --rm --network none -v "$part:/wheels:ro" \
        runner-base/python:local sh -c 'set -- /wheels/pip-*.whl
          python3 -m venv --without-pip /tmp/venv && /tmp/venv/bin/python "$1/pip" install \
          -q --disable-pip-version-check --dry-run --ignore-installed --no-index \
          --find-links /wheels -c /wheels/constraints.txt -r /wheels/requirements.txt' 2>&1) &&
      break
    missing=$(sed -n 's/.*No matching distribution found for \([^ ]*\).*/\1/p' <<<"$out" |
      head -n 1)
    if [ -z "$missing" ] || [ "$round" = 9 ]; then echo "$out" >&2; exit 1; fi
    log "the image's python also needs $missing"
    "${fetch[@]}" "$missing"
  done
  # python-magic needs libmagic, which the minbase image lacks: the Debian packages go
  # with the wheels (the same suite as the image), installed by deploy/install-app.sh.
  mkdir -p "$part/debs"
  (cd "$part/debs" && apt-get download -qq libmagic1 libmagic-mgc) ||
    { echo "error: apt-get download libmagic1 libmagic-mgc failed" >&2; exit 1; }
  rm -rf "$WHEELS" && mv "$part" "$WHEELS"
  log "wheelhouse built: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(ls "$WHEELS"/debs | wc -l) debs"
}

python_base
services_base
for svc in redis postgres registry; do thin_image "$svc"; done
wheelhouse
