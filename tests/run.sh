#!/usr/bin/env bash
# Install everything the test suite needs, then run it: the README's test command, and what CI runs.
#
#   tests/run.sh                 the whole suite (ruff, mypy, then pytest)
#   tests/run.sh -m unit         arguments go to pytest
#
# Needs Python >= 3.11 and the machine's PostgreSQL (127.0.0.1:5432, trust auth, user postgres) and
# Redis (127.0.0.1:6379): the tests that use them fail loudly when they are down (.ci/run starts them).
# Installs, when missing and this user can (root, or sudo without a password), the Debian packages the
# suite runs for real: prometheus and promtool (the dashboards' queries), nginx (the multi-replica
# deployment's balancer).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    apt_get=(apt-get)
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    apt_get=(sudo apt-get)
  else
    apt_get=()
  fi
  if [ ${#apt_get[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${missing[*]} (Debian packages the tests run)"
    export DEBIAN_FRONTEND=noninteractive
    "${apt_get[@]}" update -qq >/dev/null
    "${apt_get[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: ${missing[*]} missing and not installable here; the tests that run them will fail" >&2
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q -e '.[test,dev]'
.venv/bin/ruff check meter tests bench
.venv/bin/ruff format --check meter tests bench
.venv/bin/mypy
exec .venv/bin/pytest "$@"
