"""The committed locks (requirements/) agree with pyproject.toml, and the environments equal them.

A dependency added to pyproject.toml and not locked, a pin outside its range, a locked package that
nothing in pyproject.toml asks for, or a partial lock that pins another version than requirements/all.txt
fails here: refresh with ``bash scripts/lock.sh`` and commit the locks with pyproject.toml.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "requirements"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
ROOT = "groundlabel (pyproject.toml)"
# The lock each install of the product uses, by the pyproject groups it installs.
PARTIAL = {"backend.txt": ["base"], "worker.txt": ["base", "worker", "s3"], "export.txt": ["base", "export"]}

_spec = importlib.util.spec_from_file_location("sync_env", REPO / "scripts" / "sync_env.py")
sync_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sync_env)


def parse_lock(text: str) -> dict[str, dict]:
    """``{name: {"version", "hashes", "via"}}`` from a ``uv pip compile --generate-hashes`` lock."""
    entries: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        match = sync_env.PIN.match(line)
        if match:
            current = {"version": match.group(2), "hashes": 0, "via": set()}
            entries[sync_env.canonical(match.group(1))] = current
        elif current is not None and line.strip().startswith("--hash=sha256:"):
            current["hashes"] += 1
        elif current is not None and line.startswith("    # via"):
            rest = line.removeprefix("    # via").strip()
            if rest:
                current["via"].add(rest)
        elif current is not None and line.startswith("    #   "):
            current["via"].add(line.removeprefix("    #   ").strip())
    return entries


def lock(name: str) -> dict[str, dict]:
    return parse_lock((LOCKS / name).read_text())


def requirements(group: str) -> list[Requirement]:
    """pyproject.toml's requirements of one group (``base`` or an extra), the self-reference left out."""
    listed = PYPROJECT["project"]["dependencies"] if group == "base" else (
        PYPROJECT["project"]["optional-dependencies"][group])
    return [req for req in map(Requirement, listed) if sync_env.canonical(req.name) != "groundlabel"]


def groups() -> list[str]:
    return ["base", *(name for name in PYPROJECT["project"]["optional-dependencies"] if name != "all")]


def test_parse_lock_reads_pins_hashes_and_annotations():
    text = (
        "foo-bar==1.2 ; sys_platform == 'linux' \\\n"
        "    --hash=sha256:aa \\\n    --hash=sha256:bb\n    # via\n    #   -c requirements/all.txt\n"
        "    #   baz\nbaz[extra]==3.0 \\\n    --hash=sha256:cc\n    # via groundlabel (pyproject.toml)\n"
    )
    entries = parse_lock(text)
    assert entries == {
        "foo-bar": {"version": "1.2", "hashes": 2, "via": {"-c requirements/all.txt", "baz"}},
        "baz": {"version": "3.0", "hashes": 1, "via": {ROOT}},
    }


def test_the_all_extra_names_every_other_extra():
    (everything,) = PYPROJECT["project"]["optional-dependencies"]["all"]
    assert set(Requirement(everything).extras) == set(groups()) - {"base"}


@pytest.mark.parametrize("name", ["all.txt", *PARTIAL])
def test_every_pyproject_requirement_is_pinned_within_its_range(name):
    pins = lock(name)
    wanted = groups() if name == "all.txt" else PARTIAL[name]
    for group in wanted:
        for req in requirements(group):
            key = sync_env.canonical(req.name)
            assert key in pins, f"{req} ({group}) is not in requirements/{name}: run bash scripts/lock.sh"
            version = pins[key]["version"]
            assert req.specifier.contains(version, prereleases=True), (
                f"requirements/{name} pins {key}=={version}, outside pyproject.toml's {req}")


@pytest.mark.parametrize("name", ["all.txt", *PARTIAL])
def test_every_locked_package_is_asked_for_by_pyproject(name):
    """Each pin is reached from pyproject.toml through the lock's own "via" annotations."""
    entries = lock(name)
    direct = {sync_env.canonical(req.name) for group in groups() for req in requirements(group)}
    reached = {key for key, entry in entries.items() if ROOT in entry["via"]}
    assert reached <= direct, f"requirements/{name} says pyproject asks for {sorted(reached - direct)}"
    grew = True
    while grew:
        parents = {key for key, entry in entries.items()
                   if key not in reached and {sync_env.canonical(v) for v in entry["via"]} & reached}
        grew = bool(parents)
        reached |= parents
    orphans = set(entries) - reached
    assert not orphans, f"requirements/{name} pins what nothing asks for: {sorted(orphans)}"


@pytest.mark.parametrize("name", list(PARTIAL))
def test_partial_locks_pin_the_same_versions_as_the_full_one(name):
    full = lock("all.txt")
    for key, entry in lock(name).items():
        assert full[key]["version"] == entry["version"], f"{name} and all.txt disagree on {key}"


@pytest.mark.parametrize("name", ["all.txt", *PARTIAL, "labelstudio.txt", "build.txt", "gemtorch.txt"])
def test_every_pin_carries_hashes(name):
    for key, entry in lock(name).items():
        assert entry["hashes"] >= 1, f"{name}: {key} has no --hash"


def test_the_test_label_studio_is_locked_with_a_sentry_sdk_it_starts_with():
    pins = lock("labelstudio.txt")
    assert pins["label-studio"]["version"] == "1.23.2"
    # Label Studio 1.23.2 passes send_default_pii to sentry_sdk.init; sentry-sdk 3 refuses it.
    assert pins["sentry-sdk"]["version"].split(".")[0] == "2"


def test_the_gem_torch_lock_adds_to_the_product_environment_without_shadowing_it():
    """benchmarks/gem_speed.py's official gem-torch goes into a folder put first on .venv's sys.path: it pins
    gem-torch 1.0.1 on open_clip 2.23.0 and nothing that requirements/all.txt pins (torch included)."""
    pins = lock("gemtorch.txt")
    assert pins["gem-torch"]["version"] == "1.0.1"
    assert pins["open-clip-torch"]["version"] == "2.23.0"
    assert not (set(pins) - {"open-clip-torch"}) & set(lock("all.txt"))


def test_build_lock_satisfies_the_build_system():
    pins = lock("build.txt")
    for req in map(Requirement, PYPROJECT["build-system"]["requires"]):
        assert req.specifier.contains(pins[sync_env.canonical(req.name)]["version"])


def test_sync_env_compare_reports_wrong_missing_and_extra():
    pins = {"numpy": "2.2.6", "torch": "2.14.1"}
    have = {"numpy": "2.3.0", "six": "1.16.0", "pip": "23.2.1", "groundlabel": "0.1.0"}
    wrong, extra = sync_env.compare(pins, have, keep={"groundlabel"})
    assert wrong == ["numpy==2.2.6 (installed: 2.3.0)", "torch==2.14.1 (installed: none)"]
    assert extra == ["six"]
    assert sync_env.compare(pins, {"numpy": "2.2.6", "torch": "2.14.1"}, keep=set()) == ([], [])


def _project_venv(name: str) -> Path:
    return REPO / name / "bin" / "python"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (REPO / ".venv").resolve(),
                    reason="runs in the project's .venv, which scripts/setup.sh installs from the lock")
def test_the_product_environment_equals_its_lock():
    wrong, extra = sync_env.compare(
        sync_env.read_lock(LOCKS / "all.txt"), sync_env.installed(), keep={"groundlabel"})
    assert (wrong, extra) == ([], []), "run bash scripts/setup.sh: .venv differs from requirements/all.txt"


@pytest.mark.skipif(not _project_venv(".ls-venv").exists(),
                    reason="bash scripts/setup.sh test installs .ls-venv")
def test_the_label_studio_environment_equals_its_lock():
    done = subprocess.run(
        [str(_project_venv(".ls-venv")), str(REPO / "scripts" / "sync_env.py"),
         str(LOCKS / "labelstudio.txt")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr


def test_setup_and_lock_scripts_use_the_locks():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "install_locked .venv requirements/all.txt groundlabel" in setup
    assert "install_locked .ls-venv requirements/labelstudio.txt" in setup
    assert re.search(r"pip install -q --require-hashes --no-deps -r \"\$lock\"", setup)
    locker = (REPO / "scripts" / "lock.sh").read_text()
    for name in ("all.txt", "backend.txt", "worker.txt", "export.txt", "labelstudio.txt", "build.txt",
                 "gemtorch.txt"):
        assert f"requirements/{name}" in locker
