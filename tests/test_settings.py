"""The one settings reader: its sections, its table in docs/backend.md, and nobody else reading the env."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from groundlabel.errors import UserError
from groundlabel.settings import VARIABLES, Settings, weights_source

ROOT = Path(__file__).resolve().parents[1]


def documented_variables() -> set[str]:
    text = (ROOT / "docs" / "backend.md").read_text(encoding="utf-8")
    table = text.split("| variable | default | meaning |", 1)[1].split("\n\n", 1)[0]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        names.update(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", first))
    return names


def test_the_table_in_docs_lists_exactly_the_variables_read() -> None:
    documented = documented_variables()
    assert sorted(set(VARIABLES) - documented) == [], "read but not documented"
    assert sorted(documented - set(VARIABLES)) == [], "documented but not read"


def test_every_listed_variable_is_read(monkeypatch) -> None:
    """Each name in VARIABLES changes what from_env returns (or is refused when malformed)."""
    base = Settings.from_env({})
    for name in VARIABLES:
        for value in ("7", "x.json", "true", "http://h:1", "redis://h:1/0"):
            try:
                changed = Settings.from_env({name: value})
            except UserError:
                break  # refused with the variable's name: it was read
            if changed != base:
                break
        else:
            raise AssertionError(f"{name} changes nothing")


def test_no_other_module_reads_the_environment() -> None:
    offenders = []
    for top in ("groundlabel", "labeling_backend", "workers", "exporters"):
        for path in (ROOT / top).rglob("*.py"):
            if path == ROOT / "groundlabel" / "settings.py":
                continue
            text = path.read_text(encoding="utf-8")
            if re.search(r"os\.environ|os\.getenv|getenv\(", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_sections_and_overrides() -> None:
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://r:6379/1",
            "GROUNDLABEL_GEM_PRETRAINED": "random",
            "LABEL_STUDIO_URL": "http://ls:8080/",
        }
    )
    assert s.queue.redis_url == "redis://r:6379/1" and s.engines.gem_pretrained is None
    assert s.fetch.label_studio_url == "http://ls:8080"
    changed = s.with_(chunk_size=3, predict_timeout=1.5, api_key="k")
    assert (
        changed.queue.chunk_size == 3
        and changed.backend.predict_timeout == 1.5
        and changed.fetch.api_key == "k"
    )
    assert s.queue.chunk_size == 8  # frozen: the original is unchanged
    with pytest.raises(TypeError, match="unknown setting"):
        s.with_(no_such_thing=1)
    assert (
        weights_source("None") is None
        and weights_source(" random ") is None
        and weights_source("a.pt") == "a.pt"
    )
    assert Settings.from_env({"GROUNDLABEL_LAVT_CHECKPOINT": "none"}).engines.lavt_enabled
    assert Settings.from_env({"GROUNDLABEL_LAVT_CHECKPOINT": "none"}).engines.lavt_checkpoint is None
    assert Settings.from_env({}).engines.lavt_enabled is False
