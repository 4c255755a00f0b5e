"""Dataset readers of `groundlabel eval-gem` on tiny fake folders in the standard layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundlabel.errors import UserError
from workers.evaluation.datasets import DATASETS, IGNORE_INDEX, get_dataset


def _jpg(path: Path, h: int = 12, w: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(path)


def _png(path: Path, values: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(values.astype(np.uint8), "P" if palette else "L")
    if palette:  # VOC's label PNGs: palette indices are the class ids
        im.putpalette([v for i in range(256) for v in (i, (i * 7) % 256, (i * 13) % 256)])
    im.save(path)


LABELS = np.array([[0, 1, 5, 255], [20, 3, 0, 2]], np.uint8).repeat(6, 0).repeat(4, 1)  # 12 x 16


def _voc_tree(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")
    for n in ("2007_000001", "2007_000002"):
        _jpg(voc / "JPEGImages" / f"{n}.jpg")
        _png(voc / "SegmentationClass" / f"{n}.png", LABELS, palette=True)
    return voc


def test_voc21_keeps_background_and_boundaries(tmp_path: Path) -> None:
    _voc_tree(tmp_path)
    spec = get_dataset("voc")
    assert spec.name == "voc21" and spec.background and spec.num_classes == 21
    samples = spec.samples(tmp_path)  # a parent of VOCdevkit works
    assert [s.name for s in samples] == ["2007_000001", "2007_000002"]
    lab = spec.load_label(samples[0].label)
    np.testing.assert_array_equal(lab, LABELS)
    assert spec.class_names[0] == "background" and spec.class_names[15] == "person"


def test_voc20_drops_background(tmp_path: Path) -> None:
    voc = _voc_tree(tmp_path)
    spec = get_dataset("voc20")
    samples = spec.samples(voc)  # the dataset folder itself works too
    lab = spec.load_label(samples[0].label)
    expected = np.where((LABELS == 0) | (LABELS == 255), IGNORE_INDEX, LABELS.astype(int) - 1)
    np.testing.assert_array_equal(lab, expected)
    assert spec.num_classes == 20 and len(spec.class_names) == 20


def test_context_layouts(tmp_path: Path) -> None:
    ctx = tmp_path / "VOCdevkit" / "VOC2010"
    (ctx / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    _jpg(ctx / "JPEGImages" / "2008_000002.jpg")
    values = np.array([[0, 1], [59, 30]], np.uint8).repeat(6, 0).repeat(8, 1)
    _png(ctx / "SegmentationClassContext" / "2008_000002.png", values)
    c60, c59 = get_dataset("context"), get_dataset("context59")
    assert c60.num_classes == 60 and c59.num_classes == 59
    np.testing.assert_array_equal(c60.load_label(c60.samples(tmp_path)[0].label), values)
    reduced = c59.load_label(c59.samples(tmp_path)[0].label)
    np.testing.assert_array_equal(reduced, np.where(values == 0, 255, values.astype(int) - 1))
    assert c59.class_names[58] == "wood" and c60.class_names[59] == "wood"


def test_ade_reduces_zero_label(tmp_path: Path) -> None:
    ade = tmp_path / "ADEChallengeData2016"
    _jpg(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    values = np.array([[0, 1], [150, 77]], np.uint8).repeat(6, 0).repeat(8, 1)
    _png(ade / "annotations" / "validation" / "ADE_val_00000001.png", values)
    spec = get_dataset("ade")
    (sample,) = spec.samples(tmp_path)
    assert sample.name == "ADE_val_00000001"
    lab = spec.load_label(sample.label)
    np.testing.assert_array_equal(lab, np.where(values == 0, 255, values.astype(int) - 1))
    assert spec.class_names[0] == "wall" and spec.class_names[149] == "flag"


def test_coco_stuff_label_train_ids(tmp_path: Path) -> None:
    root = tmp_path / "coco_stuff164k"
    _jpg(root / "images" / "val2017" / "000000000139.jpg")
    values = np.array([[0, 170], [255, 90]], np.uint8).repeat(6, 0).repeat(8, 1)
    _png(root / "annotations" / "val2017" / "000000000139_labelTrainIds.png", values)
    _png(root / "annotations" / "val2017" / "000000000139.png", values)  # the unconverted file is not read
    spec = get_dataset("coco-stuff")
    (sample,) = spec.samples(tmp_path)
    assert sample.label.name == "000000000139_labelTrainIds.png"
    np.testing.assert_array_equal(spec.load_label(sample.label), values)
    assert spec.num_classes == 171 and spec.class_names[0] == "person" and spec.class_names[170] == "wood"


def test_cityscapes_city_folders(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    for city, n in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")):
        _jpg(root / "leftImg8bit" / "val" / city / f"{n}_leftImg8bit.png")
        _png(root / "gtFine" / "val" / city / f"{n}_gtFine_labelTrainIds.png", np.full((12, 16), 18))
    spec = get_dataset("cityscapes")
    samples = spec.samples(root)
    assert [s.name for s in samples] == ["frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019"]
    assert spec.load_label(samples[1].label).max() == 18 and spec.num_classes == 19


def test_errors_name_the_expected_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="VOCdevkit/VOC2012"):
        get_dataset("voc").samples(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        get_dataset("ade").samples(tmp_path / "missing")
    with pytest.raises(UserError, match="unknown dataset"):
        get_dataset("imagenet")
    voc = _voc_tree(tmp_path)
    (voc / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(UserError, match="2007_000002"):
        get_dataset("voc").samples(tmp_path)


def test_out_of_range_labels_become_ignore(tmp_path: Path) -> None:
    path = tmp_path / "l.png"
    _png(path, np.array([[19, 200]], np.uint8))
    np.testing.assert_array_equal(DATASETS["cityscapes"].load_label(path), [[IGNORE_INDEX, IGNORE_INDEX]])
    np.testing.assert_array_equal(DATASETS["voc21"].load_label(path), [[19, IGNORE_INDEX]])
