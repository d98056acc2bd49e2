#!/usr/bin/env bash
# Operator checks that need a whole stack of their own: the docker-compose deployment end
# to end, and each runbook's diagnose/recover commands against a real, broken stack.
# `make ops-test` runs this after `make services images`; .ci/run calls it after `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v dot >/dev/null || missing+=(graphviz)
command -v jq >/dev/null || missing+=(jq)      # runbooks pipe API answers through jq
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec var/venv/bin/pytest -q tests/ops "$@"
