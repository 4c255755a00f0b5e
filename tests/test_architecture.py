"""The direction of imports: the kernel, the backend, the workers, the exporters and the composition roots.

``groundlabel/`` is the kernel every side imports and it imports none of them; ``labeling_backend/``,
``workers/`` and ``exporters/`` import the kernel and never each other; only ``groundlabel_cli/`` (every
verb and the training job's wiring) imports them together, and nothing imports it. No import cycle
between modules. Every import counts, at module level or inside a function (but type-checking ones, for
cycles). The backend and the kernel never import torch.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("groundlabel", "groundlabel_cli", "labeling_backend", "workers", "exporters")
#: ``python -m groundlabel``: a script that runs the command; no module imports it.
SCRIPTS = ("groundlabel/__main__.py",)

#: What each part may import of the project's packages (the composition roots: anything).
ALLOWED = {
    "kernel": {"groundlabel"},
    "labeling_backend": {"groundlabel", "labeling_backend"},
    "workers": {"groundlabel", "workers"},
    "exporters": {"groundlabel", "exporters"},
    "groundlabel_cli": set(PACKAGES),
}


def part_of(path: Path) -> str | None:
    rel = path.relative_to(ROOT).as_posix()
    if rel in SCRIPTS:
        return None
    top = rel.split("/", 1)[0]
    return "kernel" if top == "groundlabel" else top


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imported_modules(path: Path, *, names: bool = False, runtime: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` of each import in ``path``; with ``names``, ``from a import b`` gives ``a.b``
    (a module or a name in ``a``); with ``runtime``, imports under ``if TYPE_CHECKING:`` are left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = _type_checking_only(tree) if runtime else set()
    out: list[tuple[int, str]] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            if names:
                out.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names)
            else:
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


def test_the_rule_catches_the_kernel_naming_a_command() -> None:
    """The kernel importing the composition roots is reported."""
    bad = ROOT / "groundlabel" / "_crossing_probe.py"
    bad.write_text("def f():\n    import groundlabel_cli.training\n")
    try:
        assert any("_crossing_probe.py:2 imports groundlabel_cli.training" in v for v in violations())
    finally:
        bad.unlink()


def test_the_kernel_names_no_command_function() -> None:
    """The job functions the protocol names (RQ imports them by name) are the workers' own."""
    from groundlabel import protocol

    named = [v for k, v in vars(protocol).items() if k.endswith("_FUNCTION") and isinstance(v, str)]
    assert named and all(v.split(".", 1)[0] == "workers" for v in named)


def module_graph() -> dict[str, set[str]]:
    """``{module: the project modules it imports when it runs}``, over every package."""
    paths = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for top in PACKAGES
        for p in (ROOT / top).rglob("*.py")
    }

    def resolve(name: str) -> str | None:  # the deepest project module that ``name`` is or is in
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        found = {resolve(name) for _, name in imported_modules(path, names=True, runtime=True)}
        graph[module] = {m for m in found if m and m != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return found


def test_no_import_cycle() -> None:
    assert cycles(module_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


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
