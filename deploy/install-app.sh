#!/bin/sh
# Build step of app.Dockerfile: a virtualenv in /opt/venv with the runner's runtime
# dependencies, and the unprivileged `runner` account (uid/gid 10001).
set -eu
build=/tmp/build
if [ -s "$build/wheels/requirements.txt" ]; then
  # Offline: the base image has python3 but no pip; pip runs from its own wheel.
  python3 -m venv --without-pip /opt/venv
  pip_wheel=$(ls "$build"/wheels/pip-*.whl | head -n 1)
  /opt/venv/bin/python "$pip_wheel/pip" install --no-cache-dir --no-index \
    --disable-pip-version-check --find-links "$build/wheels" \
    -c "$build/wheels/constraints.txt" -r "$build/wheels/requirements.txt"
else
  # From PyPI, with the dependencies pyproject.toml declares.
  python3 -m venv /opt/venv
  python3 -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
    "$build/pyproject.toml" >"$build/requirements.txt"
  /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r "$build/requirements.txt"
fi
# libmagic for python-magic (media types of files and artifacts): offline from the
# Debian packages beside the wheels; elsewhere from the image's own apt sources.
if ls "$build"/wheels/debs/*.deb >/dev/null 2>&1; then
  dpkg -i "$build"/wheels/debs/*.deb >/dev/null
elif ! ls /usr/lib/*/libmagic.so.1 >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends libmagic1 >/dev/null
  rm -rf /var/lib/apt/lists/*
fi
groupadd --system --gid 10001 runner-app
useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
  --shell /usr/sbin/nologin runner-app
