"""Make a virtual environment hold exactly what a lock names: report or remove anything else.

Run with the environment's own Python after ``pip install --require-hashes --no-deps -r LOCK``:

    .venv/bin/python scripts/sync_env.py requirements/all.txt --keep groundlabel --remove

Without ``--remove`` it only reports. It exits 1 when a locked package is missing or at another
version, or when something the lock does not name is still installed. Only the standard library is
used, so it runs in any environment.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")
# Installers and build tools a virtual environment starts with; `pip freeze` leaves them out too.
TOOLS = {"pip", "setuptools", "wheel", "distribute"}


def canonical(name: str) -> str:
    """PEP 503's normal form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` for every ``name==version`` line of a pip requirements lock."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    if not pins:
        raise SystemExit(f"sync_env: {path} pins nothing; is it a lock?")
    return pins


def installed() -> dict[str, str]:
    """``{canonical name: version}`` of the distributions this interpreter sees."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[canonical(name)] = dist.version
    return found


def compare(pins: dict[str, str], have: dict[str, str], keep: set[str]) -> tuple[list[str], list[str]]:
    """(locked packages missing or at another version, installed packages the lock does not name)."""
    wrong = [f"{name}=={version} (installed: {have.get(name, 'none')})"
             for name, version in sorted(pins.items()) if have.get(name) != version]
    extra = sorted(name for name in have if name not in pins and name not in keep and name not in TOOLS)
    return wrong, extra


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("lock", type=Path, help="the requirements lock the environment must equal")
    parser.add_argument("--keep", action="append", default=[], help="a distribution to keep (the project)")
    parser.add_argument("--remove", action="store_true", help="uninstall what the lock does not name")
    args = parser.parse_args(argv)
    pins = read_lock(args.lock)
    keep = {canonical(name) for name in args.keep}
    wrong, extra = compare(pins, installed(), keep)
    if extra and args.remove:
        import subprocess

        print(f"sync_env: removing what {args.lock} does not name: {' '.join(extra)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra], check=True)
        wrong, extra = compare(pins, installed(), keep)
    for line in wrong:
        print(f"sync_env: {args.lock}: {line}", file=sys.stderr)
    for name in extra:
        print(f"sync_env: {name} is installed but {args.lock} does not name it", file=sys.stderr)
    return 1 if wrong or extra else 0


if __name__ == "__main__":
    sys.exit(main())
