#!/usr/bin/env bash
# Build the local base images without pulling from any registry:
#   runner-base/busybox:local  FROM-scratch image around Debian's busybox-static
#   runner-base/python:local   a trimmed Debian rootfs with python3, via debootstrap
# Idempotent: an image that already exists is left alone; the Python rootfs
# tarball is cached under var/cache so a removed image is re-imported quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE="$ROOT/var/cache/base"
SUITE=${RUNNER_BASE_SUITE:-bookworm}
MIRROR=${RUNNER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$CACHE"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# Both images carry the same unprivileged account so `USER 65532` has a name.
write_accounts() {
  local etc=$1
  mkdir -p "$etc"
  grep -q '^runner:' "$etc/passwd" 2>/dev/null ||
    echo 'runner:x:65532:65532:runner:/nonexistent:/sbin/nologin' >>"$etc/passwd"
  grep -q '^runner:' "$etc/group" 2>/dev/null || echo 'runner:x:65532:' >>"$etc/group"
}

build_busybox() {
  local tag=runner-base/busybox:local
  if have_image "$tag"; then echo "base image $tag: present"; return; fi
  local tmp
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' RETURN
  mkdir -p "$tmp/bin" "$tmp/tmp" "$tmp/etc" "$tmp/run"
  cp /bin/busybox "$tmp/bin/busybox"
  # One hard link per applet, made by busybox itself, so `sh`, `sleep`... exist.
  for applet in $(/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -f "$tmp/bin/busybox" "$tmp/bin/$applet"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$tmp/etc/passwd"
  echo 'root:x:0:' >"$tmp/etc/group"
  write_accounts "$tmp/etc"
  chmod 1777 "$tmp/tmp"
  tar -C "$tmp" -c . | docker import \
    --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$tag" >/dev/null
  echo "base image $tag: built"
}

build_python() {
  local tag=runner-base/python:local
  if have_image "$tag"; then echo "base image $tag: present"; return; fi
  local tarball="$CACHE/python-$SUITE.tar"
  if [ ! -s "$tarball" ]; then
    local tmp
    tmp=$(mktemp -d)
    echo "debootstrap $SUITE with python3 (a few minutes, once)..."
    debootstrap --variant=minbase --include=python3 "$SUITE" "$tmp/rootfs" "$MIRROR" \
      >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    # Trim what a processor never needs; it keeps the image small.
    rm -rf "$tmp/rootfs"/var/cache/apt/* "$tmp/rootfs"/var/lib/apt/lists/* \
      "$tmp/rootfs"/usr/share/doc/* "$tmp/rootfs"/usr/share/man/* \
      "$tmp/rootfs"/usr/share/locale/* "$tmp/rootfs"/usr/share/info/*
    write_accounts "$tmp/rootfs/etc"
    tar -C "$tmp/rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    rm -rf "$tmp"
  fi
  docker import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' --change 'CMD ["python3"]' \
    "$tarball" "$tag" >/dev/null
  echo "base image $tag: built"
}

build_busybox
build_python
