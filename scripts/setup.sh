#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine: redis-server, a virtual environment in .venv with
# groundlabel and all its extras, and (with `test`) Label Studio in its own environment, .ls-venv,
# for the end-to-end tests, and Chromium for the browser tests. Re-running it only installs what changed.
#   bash scripts/setup.sh          # backend + workers + exporters
#   bash scripts/setup.sh test     # the same, plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# test: redis-server for the queue tests, Debian's Chromium for the browser tests (tests/browser/;
# Playwright drives /usr/bin/chromium and never downloads a browser of its own).
if [ "$mode" = test ]; then
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  [ -x /usr/bin/chromium ] || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.groundlabel-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing groundlabel into .venv (first time: several minutes, torch is large)" >&2
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[all]"
  touch "$stamp"
fi

if [ "$mode" = test ]; then
  LS_VERSION=1.23.2
  if [ ! -x .ls-venv/bin/label-studio ] || [ ! -f ".ls-venv/.ls-$LS_VERSION" ]; then
    echo "setup: installing Label Studio $LS_VERSION into .ls-venv for the end-to-end tests" >&2
    "$PY" -m venv .ls-venv
    .ls-venv/bin/pip install -q "label-studio==$LS_VERSION"
    touch ".ls-venv/.ls-$LS_VERSION"
  fi
fi
