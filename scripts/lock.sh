#!/usr/bin/env bash
# Refresh the locks in requirements/ from pyproject.toml and requirements/*.in, on purpose:
#   bash scripts/lock.sh                      # keep every pin that still satisfies the ranges
#   bash scripts/lock.sh --upgrade            # move every package to its newest allowed release
#   bash scripts/lock.sh --upgrade-package X  # move one package (uv's option, passed through)
# The locks are resolved for Linux x86_64 and CPython 3.11 (the images, CI and the set-up script),
# with a sha256 for every file, by uv (pinned below, installed into a throwaway environment).
# all.txt is the product with every extra; backend.txt, worker.txt and export.txt are the partial
# installs, resolved with all.txt as a constraint so that they pin exactly the same versions.
# gemtorch.txt is the official gem-torch for benchmarks/gem_speed.py: only what .venv lacks (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=0.13.10
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

tool="${TMPDIR:-/tmp}/groundlabel-uv-$UV_VERSION"
if [ ! -x "$tool/bin/uv" ]; then
  "$PY" -m venv "$tool"
  "$tool/bin/pip" install -q "uv==$UV_VERSION"
fi
uv="$tool/bin/uv"
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes
        --no-header --quiet --custom-compile-command "bash scripts/lock.sh")
compile() { "$uv" pip compile "${target[@]}" "$@"; }

compile pyproject.toml --extra all -o requirements/all.txt "$@"
compile pyproject.toml -c requirements/all.txt -o requirements/backend.txt
compile pyproject.toml --extra worker --extra s3 -c requirements/all.txt -o requirements/worker.txt
compile pyproject.toml --extra export -c requirements/all.txt -o requirements/export.txt
compile requirements/labelstudio.in -o requirements/labelstudio.txt "$@"
compile requirements/build.in -o requirements/build.txt "$@"
compile requirements/gemtorch.in --no-deps -o requirements/gemtorch.txt "$@"
echo "lock: requirements/*.txt refreshed; commit them with pyproject.toml" >&2
