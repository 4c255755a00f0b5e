"""``--refine sam`` in ``groundlabel predict`` and ``eval-gem`` (random GEM, the tiny SAM of tests/assets)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundlabel_cli.main import main

TINY_SAM = str(Path(__file__).parent / "assets" / "tiny_sam.pt")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GROUNDLABEL_SAM_MODEL", raising=False)
    monkeypatch.delenv("GROUNDLABEL_GEM_REFINE", raising=False)


def test_predict_refines_with_sam(
    tmp_path: Path, tiny_gem_config: Path, capsys: pytest.CaptureFixture
) -> None:
    im = Image.new("RGB", (64, 48), (90, 140, 200))
    ImageDraw.Draw(im).ellipse((10, 10, 40, 40), fill=(220, 40, 40))
    im.save(tmp_path / "a.png")
    base = ["predict", str(tmp_path / "a.png"), "--labels", "thing", "--threshold", "0.0",
            "--model-config", str(tiny_gem_config), "--pretrained", "none", "--image-size", "64",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*base, "--refine", "sam", "--sam-model", TINY_SAM]) == 0
    (task,) = json.loads(capsys.readouterr().out)
    assert task["predictions"][0]["model_version"].endswith("+sam-tiny_sam")
    assert main([*base, "--refine", "sam"]) == 2  # no SAM configured
    assert "needs a promptable SAM" in capsys.readouterr().err


def test_eval_gem_refines_with_sam(tmp_path: Path) -> None:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000000\n")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(
        voc / "JPEGImages" / "2007_000000.jpg"
    )
    lab = np.zeros((48, 80), np.uint8)
    lab[10:30, 20:60] = 15
    label = Image.fromarray(lab, "P")
    label.putpalette([0] * 768)
    label.save(voc / "SegmentationClass" / "2007_000000.png")
    out = tmp_path / "res.json"
    argv = ["eval-gem", "--dataset", "voc", "--root", str(tmp_path), "--model", "ViT-S-32",
            "--pretrained", "", "--image-size", "64", "--limit", "1", "--json", str(out), "--no-progress",
            "--device", "cpu",
            "--refine", "pamr+sam", "--sam-model", TINY_SAM, "--sam-min-iou", "0.3"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model_version"].startswith("gem-ViT-S-32") and result["model_version"].endswith(
        "-pamr+sam-tiny_sam"
    )
    assert 0.0 <= result["metrics"]["mIoU"] <= 100.0
