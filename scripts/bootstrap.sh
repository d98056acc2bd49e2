#!/usr/bin/env bash
# One-time (and quick every later time) set-up shared by `make demo` and `make test`:
# Debian packages that are missing, then the virtualenv under var/venv.
# Needs: Debian 12 with a running Docker engine, and root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/var/venv"
PYTHON=${PYTHON:-python3}

if ! docker info >/dev/null 2>&1; then
  echo "error: no running Docker engine (is dockerd started, and may this user use it?)" >&2
  exit 1
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# A package is installed only when what we use of it is missing.
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v debootstrap >/dev/null || missing+=(debootstrap)
# promtool checks the alert rules and their unit tests (monitoring/); the server is not run.
command -v promtool >/dev/null || missing+=(prometheus)
# Only a static busybox can live alone in a FROM-scratch image.
if ! [ -x /bin/busybox ] || ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# The dashboard's browser tests drive Debian's Chromium with Playwright (its own
# browser download cannot work offline).
command -v chromium >/dev/null || missing+=(chromium)
# libmagic sniffs the media type of uploaded files and artifacts (python-magic).
ls /usr/lib/*/libmagic.so.1 >/dev/null 2>&1 || missing+=(libmagic1)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # A policy-rc.d that says "no" keeps the packages' own services (a registry on
  # :5000, a system Redis and PostgreSQL) from starting: ours run under var/.
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  $SUDO apt-get update -qq
  status=0
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  [ -z "$made_policy" ] || $SUDO rm -f /usr/sbin/policy-rc.d
  [ "$status" -eq 0 ] || { echo "error: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi

stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  mkdir -p var/log
  if ! "$VENV/bin/pip" install -q -e ".[dev]" >var/log/pip.log 2>&1; then
    tail -20 var/log/pip.log >&2
    echo "error: pip install failed (full log: var/log/pip.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "bootstrap: ok ($(docker version --format 'docker {{.Server.Version}}'), $("$VENV/bin/python" --version))"
