"""groundlabel.versions: every version name in one place (engine, stand-in, refined, trained, config tag)."""

from __future__ import annotations

import re
from pathlib import Path

from groundlabel import versions
from groundlabel.spec import parse_label_config, spec_tag

ROOT = Path(__file__).resolve().parents[1]
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<PolygonLabels name="p" toName="image"><Label value="Cat"/></PolygonLabels></View>'
)


def test_the_names():
    spec = parse_label_config(CONFIG)
    assert versions.stand_in("gem-ViT-B-16-openai") == "gem-ViT-B-16-openai-expressions"
    assert versions.refined("gem-x", "sam-sam2-tiny") == "gem-x+sam-sam2-tiny"
    assert versions.combined(["gem-x", "sam3", "gem-x"]) == "gem-x+sam3"
    assert versions.with_lavt("gem-x", "/models/refcoco.pth") == "gem-x+lavt-refcoco"
    assert versions.with_lavt("gem-x", None) == "gem-x+lavt-random"
    assert versions.versioned("gem-x", spec) == f"gem-x-cfg{spec_tag(spec)}"


def test_what_a_trained_version_answers_and_replaces():
    assert versions.trained_names("v3", "gem") == ["v3", "v3-expressions"]
    assert versions.trained_names("v3", "lavt") == ["v3"]
    assert versions.replaced_by("gem", "gem-ViT-B-16-openai") and not versions.replaced_by("gem", "sam3")
    assert versions.replaced_by("lavt", "lavt-base-refcoco")
    assert versions.replaced_by("lavt", "gem-x-expressions")
    assert not versions.replaced_by("lavt", "gem-x") and not versions.replaced_by("other", "gem-x")


def test_the_stand_in_suffix_is_defined_once():
    pattern = re.compile(r'^\s*STAND_IN_SUFFIX\s*=\s*"', re.MULTILINE)
    homes = [
        p.relative_to(ROOT).as_posix()
        for top in ("groundlabel", "groundlabel_cli", "labeling_backend", "workers", "exporters")
        for p in (ROOT / top).rglob("*.py")
        if pattern.search(p.read_text(encoding="utf-8"))
    ]
    assert homes == ["groundlabel/versions.py"]
