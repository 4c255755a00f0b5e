"""``groundlabel predict``: label config, task JSON, image references, overlays, failures (tiny GEM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from groundlabel.errors import UserError
from groundlabel.ls_format import brush_rle_decode
from groundlabel.spec import parse_label_config
from groundlabel_cli.main import main
from groundlabel_cli.predict import default_label_config, expand_images, image_reference, parse_labels

REPO = Path(__file__).resolve().parents[1]


def scene(path: Path, size=(96, 64)) -> Path:
    im = Image.new("RGB", size, (90, 140, 200))
    d = ImageDraw.Draw(im)
    d.ellipse((10, 10, 40, 40), fill=(220, 40, 40))
    d.rectangle((55, 20, 85, 55), fill=(40, 180, 60))
    im.save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "imgs"
    folder.mkdir()
    return [scene(folder / "a.png"), scene(folder / "b.jpg", (50, 70)), scene(folder / "c.png", (64, 64))]


def model_args(tiny_gem_config: Path) -> list[str]:
    return [
        "--model-config",
        str(tiny_gem_config),
        "--pretrained",
        "none",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--no-progress",
    ]


def check_results(results: list[dict], width: int, height: int, controls: dict[str, tuple[str, list[str]]]):
    for r in results:
        assert r["from_name"] in controls and r["to_name"] == "image"
        kind, labels = controls[r["from_name"]]
        assert r["type"] == kind
        assert r["original_width"] == width and r["original_height"] == height
        assert len(r["value"][kind]) == 1 and r["value"][kind][0] in labels
        assert 0.0 <= r["score"] <= 1.0
        v = r["value"]
        if kind == "polygonlabels":
            pts = np.asarray(v["points"])
            assert v["closed"] is True and len(pts) >= 3 and pts.min() >= 0 and pts.max() <= 100
        elif kind == "rectanglelabels":
            assert v["x"] >= 0 and v["y"] >= 0 and v["x"] + v["width"] <= 100.001
            assert v["y"] + v["height"] <= 100.001 and v["rotation"] == 0
        elif kind == "keypointlabels":
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] <= 100 and v["width"] > 0
        elif kind == "brushlabels":
            assert v["format"] == "rle" and brush_rle_decode(v["rle"], height, width).any()


def test_parse_labels_and_default_config() -> None:
    labels = parse_labels(" Car=car|automobile , dog,Traffic light ")
    assert labels == [("Car", ["car", "automobile"]), ("dog", ["dog"]), ("Traffic light", ["Traffic light"])]
    spec = parse_label_config(default_label_config(labels))
    assert spec.image_name == "image" and spec.image_key == "image"
    (control,) = spec.controls
    assert control.name == "label" and control.type == "PolygonLabels"
    assert control.prompts == {
        "Car": ["car", "automobile"],
        "dog": ["dog"],
        "Traffic light": ["Traffic light"],
    }
    spec = parse_label_config(default_label_config([('a&b "q"', ["a&b"])], ["brush", "keypoint", "brush"]))
    assert [(c.name, c.type) for c in spec.controls] == [
        ("brush", "BrushLabels"),
        ("keypoint", "KeyPointLabels"),
    ]
    assert spec.controls[0].labels == ['a&b "q"']
    for bad in ("", " , ", "=x", "a,a"):
        with pytest.raises(UserError):
            parse_labels(bad)


def test_image_references_and_folders(tmp_path: Path, images: list[Path]) -> None:
    assert expand_images([str(images[0].parent)]) == [str(p) for p in sorted(images)]
    assert expand_images(["https://x.org/a.png", str(images[0])]) == ["https://x.org/a.png", str(images[0])]
    assert image_reference("photos/a b.png", None, None) == "photos/a b.png"
    ref = image_reference(str(images[0]), "/data/local-files/?d=", str(tmp_path))
    assert ref == "/data/local-files/?d=imgs/a.png"
    weird = tmp_path / "imgs" / "x y#1.png"
    assert image_reference(str(weird), "/data/local-files/?d=", str(tmp_path)).endswith("imgs/x%20y%231.png")
    with pytest.raises(UserError, match="not inside --image-root"):
        image_reference("/elsewhere/a.png", "/data/local-files/?d=", str(tmp_path))
    assert image_reference("https://x.org/a.png", "/data/local-files/?d=", None) == "https://x.org/a.png"


@pytest.mark.slow
def test_predict_images_to_label_studio_tasks(tmp_path: Path, images: list[Path], tiny_gem_config) -> None:
    bad = tmp_path / "imgs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "tasks.json"
    overlay = tmp_path / "overlays"
    argv = [
        "predict",
        str(images[0]),
        str(bad),
        str(images[1]),
        str(images[2]),
        "--labels",
        "disc=red circle|disc,box=green square",
        "--control",
        "polygon",
        "--control",
        "rectangle",
        "--control",
        "keypoint",
        "--control",
        "brush",
        "--threshold",
        "0.0",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--overlay",
        str(overlay),
        *model_args(tiny_gem_config),
    ]
    assert main(argv) == 1  # one unreadable image: reported, skipped, non-zero exit
    tasks = json.loads(out.read_text())
    assert [t["data"] for t in tasks] == [{"image": str(p)} for p in images]
    controls = {
        name: (f"{name}labels", ["disc", "box"]) for name in ("polygon", "rectangle", "keypoint", "brush")
    }
    for task, path in zip(tasks, images, strict=True):
        (pred,) = task["predictions"]
        assert pred["model_version"].startswith("gem-tinyclip-random")
        with Image.open(path) as im:
            width, height = im.size
        # threshold 0: every pixel is foreground, so every control has regions
        assert {r["from_name"] for r in pred["result"]} == set(controls)
        check_results(pred["result"], width, height, controls)
        assert pred["score"] == pytest.approx(np.mean([r["score"] for r in pred["result"]]), abs=1e-3)
    pngs = sorted(p.name for p in overlay.iterdir())
    assert pngs == ["a.png", "b.png", "c.png"]
    with Image.open(overlay / "a.png") as ov:
        assert ov.mode == "RGB" and ov.width > 96 * 2  # the regions panel and heatmap panels
        assert len(np.unique(np.asarray(ov).reshape(-1, 3), axis=0)) > 50


def test_label_config_file_stdout_and_root_url(tmp_path: Path, images: list[Path], tiny_gem_config, capsys):
    config = tmp_path / "config.xml"
    config.write_text(
        """<View><Image name="img" value="$photo"/>
        <RectangleLabels name="boxes" toName="img" model_score_threshold="0.0" min_region_area="0.5">
          <Label value="Thing" predicted_values="thing,object"/></RectangleLabels>
        <TextArea name="note" toName="img"/></View>"""
    )
    argv = [
        "predict",
        str(images[0].parent),
        "--label-config",
        str(config),
        "--image-root-url",
        "/data/local-files/?d=",
        "--image-root",
        str(tmp_path),
        *model_args(tiny_gem_config),
    ]
    assert main(argv) == 0
    tasks = json.loads(capsys.readouterr().out)
    assert [t["data"]["photo"] for t in tasks] == [
        f"/data/local-files/?d=imgs/{p.name}" for p in sorted(images)
    ]
    for task in tasks:
        results = task["predictions"][0]["result"]
        assert len(results) == 1  # min_region_area 0.5: only one component can cover half the image
        assert results[0]["from_name"] == "boxes" and results[0]["to_name"] == "img"
        assert results[0]["value"]["rectanglelabels"] == ["Thing"]


def test_save_config_and_high_threshold(tmp_path: Path, images: list[Path], tiny_gem_config) -> None:
    out, saved = tmp_path / "t.json", tmp_path / "cfg.xml"
    argv = [
        "predict",
        str(images[0]),
        "--labels",
        "cat,dog",
        "--threshold",
        "1.0",
        "--gem-depth",
        "3",
        "--gem-temperature",
        "20",
        "--save-config",
        str(saved),
        "--out",
        str(out),
        *model_args(tiny_gem_config),
    ]
    assert main(argv) == 0
    (task,) = json.loads(out.read_text())
    assert task["predictions"][0]["result"] == [] and task["predictions"][0]["score"] == 0.0
    assert "-d3i1t20" in task["predictions"][0]["model_version"]
    assert parse_label_config(saved.read_text()).controls[0].labels == ["cat", "dog"]


def test_user_errors_exit_2(tmp_path: Path, images: list[Path], tiny_gem_config, capsys) -> None:
    base = ["predict", str(images[0]), *model_args(tiny_gem_config)]
    assert main([*base, "--labels", "cat", "--threshold", "1.5"]) == 2
    assert "--threshold must lie in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--label-config", str(tmp_path / "missing.xml")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert main([*base, "--labels", "cat", "--gem-temperature", "hot"]) == 2
    assert "--gem-temperature 'hot'" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(tmp_path / "nothing-here"),
                "--labels",
                "cat",
                *model_args(tiny_gem_config),
                "--out",
                str(tmp_path / "o.json"),
            ]
        )
        == 1
    )
    assert json.loads((tmp_path / "o.json").read_text()) == []
    assert "no such file" in capsys.readouterr().err


def test_cli_module_imports_no_torch() -> None:
    code = "import sys, groundlabel_cli.predict, workers.images; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
