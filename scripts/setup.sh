#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine, every Python package from the committed locks:
#   bash scripts/setup.sh          # .venv: groundlabel with all its extras (requirements/all.txt)
#   bash scripts/setup.sh test     # the same, plus redis-server and Chromium (apt-get) and Label
#                                  # Studio 1.23.2 in its own .ls-venv (requirements/labelstudio.txt)
# Each environment is installed with `pip install --require-hashes --no-deps -r LOCK`, then anything
# the lock does not name is removed, so `pip freeze` equals the lock. Re-running it does nothing unless
# a lock or pyproject.toml changed. pip takes torch from a local wheel folder or index where pip is
# configured with one, else from PyPI; the hashes are the same. Refresh the locks: bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
case "$mode" in run|test) ;; *) echo "usage: bash scripts/setup.sh [test]" >&2; exit 2 ;; esac
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: groundlabel needs CPython 3.11 ($PY is $("$PY" --version 2>&1)); set PYTHON=" >&2; exit 1; }

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

fingerprint() { cat "$@" | sha256sum | cut -d' ' -f1; }

# install_locked VENV LOCK [PROJECT]: VENV holds exactly LOCK's packages (plus PROJECT, editable).
install_locked() {
  local venv=$1 lock=$2 project=${3:-} stamp="$1/.groundlabel-lock" want
  want=$(fingerprint "$lock" requirements/build.txt ${project:+pyproject.toml})
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  # Up to date when the locks are those installed last and nothing was added or changed by hand since.
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
     && "$venv/bin/python" scripts/sync_env.py "$lock" ${project:+--keep "$project"} 2>/dev/null; then
    return 0
  fi
  echo "setup: installing $lock into $venv (the first time takes minutes)" >&2
  rm -f "$stamp"
  "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r requirements/build.txt
  "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$lock"
  if [ -n "$project" ]; then
    "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  fi
  "$venv/bin/python" scripts/sync_env.py "$lock" --remove ${project:+--keep "$project"}
  "$venv/bin/python" -m pip check >/dev/null
  echo "$want" > "$stamp"
}

install_locked .venv requirements/all.txt groundlabel
if [ "$mode" = test ]; then
  install_locked .ls-venv requirements/labelstudio.txt
fi
