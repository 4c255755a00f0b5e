"""`groundlabel eval-gem` end to end on a fake VOC folder, with randomly initialised CLIP weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundlabel_cli.main import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fake_voc(root: Path, n: int = 2) -> None:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = [f"2007_{i:06d}" for i in range(n)]
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    for name in names:
        (voc / "JPEGImages").mkdir(exist_ok=True)
        (voc / "SegmentationClass").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(
            voc / "JPEGImages" / f"{name}.jpg"
        )
        lab = np.zeros((48, 80), np.uint8)
        lab[10:30, 20:60] = 15
        lab[9, :] = 255
        im = Image.fromarray(lab, "P")
        im.putpalette([0] * 768)
        im.save(voc / "SegmentationClass" / f"{name}.png")


@pytest.mark.slow
@pytest.mark.parametrize(("method", "refine"), [("gem", "none"), ("naclip", "pamr")])
def test_eval_gem_prints_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture, method: str, refine: str
) -> None:
    mode = "resize"
    _fake_voc(tmp_path)
    out = tmp_path / "res.json"
    argv = [
        "eval-gem",
        "--dataset",
        "voc",
        "--root",
        str(tmp_path),
        "--model",
        "ViT-S-32",
        "--pretrained",
        "",
        "--image-size",
        "64",
        "--short-side",
        "64",
        "--crop",
        "64",
        "--stride",
        "32",
        "--mode",
        mode,
        "--limit",
        "1",
        "--json",
        str(out),
        "--no-progress",
        "--device",
        "cpu",
        "--method",
        method,
        "--refine",
        refine,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "Pascal VOC 2012 (21 classes): 1 images" in printed
    assert "background" in printed and "tvmonitor" not in printed and "television monitor" in printed
    result = json.loads(out.read_text())
    assert result["images"] == 1 and result["mode"] == mode and result["bg_threshold"] == 0.5
    metrics = result["metrics"]
    assert set(metrics["per_class"]) >= {"background", "person"} and len(metrics["per_class"]) == 21
    assert metrics["pixels"] == 48 * 80 - 80  # the boundary row is ignored
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert result["model_version"].startswith("gem-ViT-S-32")
    assert (f"-{method}" in result["model_version"]) == (method != "gem")
    assert result["model_version"].endswith("-pamr") == (refine == "pamr")


def test_eval_gem_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval-gem", "--dataset", "ade", "--root", str(tmp_path), "--pretrained", ""]) == 2
    assert "ADEChallengeData2016" in capsys.readouterr().err
    assert (
        main(["eval-gem", "--dataset", "voc", "--root", str(tmp_path), "--mode", "slide", "--stride", "999"])
        == 2
    )
    assert "--stride" in capsys.readouterr().err


def test_run_eval_slide_voc20_with_a_small_clip(tmp_path: Path) -> None:
    import argparse

    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    from workers.evaluation.cli import run_eval
    from workers.models.gem import GemConfig, GemEngine

    _fake_voc(tmp_path, n=3)
    torch.manual_seed(0)
    clip = open_clip.CLIP(
        32,
        vision_cfg=CLIPVisionCfg(layers=3, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, width=64, heads=2, layers=1),
    )
    engine = GemEngine(
        GemConfig(model_name="small", pretrained=None, image_size=32, gem_depth=3, device="cpu"),
        clip_model=clip,
        tokenizer=open_clip.SimpleTokenizer(context_length=16),
    )
    args = argparse.Namespace(
        dataset="voc20",
        root=str(tmp_path),
        mode="slide",
        image_size=32,
        short_side=40,
        crop=32,
        stride=16,
        bg_threshold=0.5,
        templates="paper",
        method="gem",
        refine="none",
        gem_depth=3,
        model="small",
        pretrained="",
        weights_dir=None,
        device="cpu",
        limit=None,
        no_progress=True,
        engine=engine,
    )
    result = run_eval(args)
    assert result["images"] == 3 and result["bg_threshold"] is None and result["short_side"] == 40
    metrics = result["metrics"]
    assert len(metrics["per_class"]) == 20 and "background" not in metrics["per_class"]
    # only "person" pixels count (background and boundaries are ignored in VOC20)
    assert metrics["pixels"] == 3 * 20 * 40
    assert metrics["per_class"]["person"]["Acc"] is not None
