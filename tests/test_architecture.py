"""The direction of imports: the kernel, the backend, the workers and the exporters.

``groundlabel/`` (but its commands) is the kernel every side imports; ``labeling_backend/``, ``workers/``
and ``exporters/`` import the kernel and never each other; only the commands that start a process
(``groundlabel/cli.py``, ``groundlabel/commands/``) wire a backend to workers. Every import counts, at
module level or inside a function. The backend and the kernel never import torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("groundlabel", "labeling_backend", "workers", "exporters")
COMPOSITION_ROOTS = ("groundlabel/cli.py", "groundlabel/__main__.py")
COMMANDS = "groundlabel/commands/"

#: What each part may import of the project's packages.
ALLOWED = {
    "kernel": {"groundlabel"},
    "labeling_backend": {"groundlabel", "labeling_backend"},
    "workers": {"groundlabel", "workers"},
    "exporters": {"groundlabel", "exporters"},
}


def part_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in COMPOSITION_ROOTS or rel.startswith(COMMANDS):
        return None
    top = rel.split("/", 1)[0]
    return "kernel" if top == "groundlabel" else top


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return out


def violations() -> list[str]:
    found: list[str] = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            part = part_of(path)
            if part is None:
                continue
            for line, module in imported_modules(path):
                head = module.split(".", 1)[0]
                if head in PACKAGES and head not in ALLOWED[part]:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({part} may not)")
                if head == "torch" and part in ("kernel", "labeling_backend"):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports torch")
    return found


def test_imports_point_one_way() -> None:
    assert violations() == []


def test_the_rule_catches_a_crossing() -> None:
    """The checker itself: a workers file importing the backend is reported."""
    bad = ROOT / "workers" / "_crossing_probe.py"
    bad.write_text("def f():\n    from labeling_backend.app import create_app\n    return create_app\n")
    try:
        assert any("_crossing_probe.py:2 imports labeling_backend.app" in v for v in violations())
    finally:
        bad.unlink()


@pytest.mark.parametrize("part", ["groundlabel", "labeling_backend"])
def test_importing_the_kernel_or_the_backend_loads_no_torch(part: str) -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / part).rglob("*.py")
        if part_of(p) is not None
    )
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
