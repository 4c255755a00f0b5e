"""YOLO export (Ultralytics detection and segmentation) read back by the rules of Ultralytics' documented
dataset format, compared with the COCO export of the same fixtures, and round-tripped through Label Studio
results; the exporter registry dispatches the command line, a format defined in this file included."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from test_export_coco import H, W, source  # noqa: F401  (the COCO tests' fixture: the same tasks)

from exporters import ExportOptions, export_coco, export_yolo, export_yolo_seg
from exporters.registry import Exporter, exporter_names, get_exporter, register_exporter
from exporters.steps import splitter
from exporters.synthetic import LABEL_CONFIG, polygon_result, rectangle_result
from exporters.yolo import join_parts, label_name, yaml_string
from groundlabel.errors import UserError
from groundlabel_cli import main as cli

# --- a reader of the documented format ---------------------------------------------------------------


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the image path's last ``/images/`` becomes ``/labels/``, its suffix ``.txt``."""
    sa, sb = "/images/", "/labels/"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


Rows = dict[str, list[tuple[int, np.ndarray]]]  # label file stem -> (class, coordinates) rows


def read_yolo(root: Path, *, segments: bool) -> tuple[dict, dict[str, Rows]]:
    """``(data.yaml, {split: {label file stem: [(class, coordinates)]}})``, checking every rule of the
    format: ``train``/``val``/``names`` in ``data.yaml``, split folders relative to its folder (no ``path``),
    an integer class below the class count, 5 numbers a box, at least 3 points a polygon, every coordinate
    in [0, 1], no duplicate rows, and a label file for every image found in an images folder."""
    data = yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8"))
    assert {"train", "val", "names"} <= data.keys() and "path" not in data
    names = data["names"]
    assert isinstance(names, dict) and list(names) == list(range(len(names))) and data["nc"] == len(names)
    found: dict[str, Rows] = {}
    for split in ("train", "val"):
        images = root / data[split]
        assert images.is_dir() and images.parent.name == "images"
        for image in images.iterdir():
            assert label_path(image).is_file(), image
        rows_by_file = {}
        for label in sorted((root / "labels" / split).glob("*.txt")):
            rows = []
            lines = label.read_text().splitlines()
            assert len(set(lines)) == len(lines), f"{label}: duplicate rows"
            for line in lines:
                fields = line.split()
                cls, coords = int(fields[0]), np.array([float(v) for v in fields[1:]])
                assert fields[0] == str(cls) and 0 <= cls < len(names)
                if segments:
                    assert len(coords) >= 6 and len(coords) % 2 == 0, line
                else:
                    assert len(coords) == 4, line
                assert coords.min() >= 0.0 and coords.max() <= 1.0, line
                rows.append((cls, coords))
            rows_by_file[label.stem] = rows
        found[split] = rows_by_file
    return data, found


def all_rows(found: dict[str, Rows]) -> Rows:
    rows = {}
    for by_file in found.values():
        assert not rows.keys() & by_file.keys(), "an image in two splits"
        rows.update(by_file)
    return rows


def coco_by_stem(path: Path) -> tuple[dict, dict[str, list[dict]]]:
    coco = json.loads(path.read_text())
    stems = {img["id"]: img["file_name"].rsplit(".", 1)[0] for img in coco["images"]}
    anns: dict[str, list[dict]] = {stem: [] for stem in stems.values()}
    for ann in coco["annotations"]:
        anns[stems[ann["image_id"]]].append(ann)
    return coco, anns


# --- against COCO and the sources ----------------------------------------------------------------------


def test_boxes_are_the_coco_boxes(source, tmp_path):  # noqa: F811
    tasks, truth = source
    export_coco(tasks, tmp_path / "coco", label_config=LABEL_CONFIG, images="none")
    summary = export_yolo(tasks, tmp_path / "yolo", label_config=LABEL_CONFIG, images="none")
    assert not summary.skipped and summary.exported["annotations"] == 18
    data, found = read_yolo(tmp_path / "yolo", segments=False)
    coco, anns = coco_by_stem(tmp_path / "coco" / "instances.json")
    assert list(data["names"].values()) == [c["name"] for c in coco["categories"]] == ["cat", "dog", "person"]
    rows = all_rows(found)
    assert rows.keys() == anns.keys()
    for stem, expected in anns.items():
        assert len(rows[stem]) == len(expected)
        for (cls, (xc, yc, w, h)), ann in zip(rows[stem], expected, strict=True):
            assert cls == ann["category_id"] - 1
            x, y, bw, bh = ann["bbox"]
            assert [xc * W, yc * H, w * W, h * H] == pytest.approx([x + bw / 2, y + bh / 2, bw, bh], abs=1e-4)
            kind, ref, label = truth[ann["labelstudio"]["region_id"]]
            assert data["names"][cls] == label
            if kind == "box":
                assert [(xc - w / 2) * W, (yc - h / 2) * H, w * W, h * H] == pytest.approx(ref, abs=1e-3)
            elif kind == "mask":  # the exact mask's box
                cols, rows_ = np.nonzero(ref.any(axis=0))[0], np.nonzero(ref.any(axis=1))[0]
                assert (xc - w / 2) * W == pytest.approx(cols[0], abs=1e-4)
                assert (yc + h / 2) * H == pytest.approx(rows_[-1] + 1, abs=1e-4)


def test_polygons_match_the_sources_and_the_coco_masks(source, tmp_path):  # noqa: F811
    tasks, truth = source
    export_coco(tasks, tmp_path / "coco", label_config=LABEL_CONFIG, images="none")
    export_yolo_seg(tasks, tmp_path / "yolo", label_config=LABEL_CONFIG, images="none")
    _, found = read_yolo(tmp_path / "yolo", segments=True)
    _, anns = coco_by_stem(tmp_path / "coco" / "instances.json")
    rows = all_rows(found)
    several = 0
    for stem, expected in anns.items():
        for (cls, coords), ann in zip(rows[stem], expected, strict=True):
            assert cls == ann["category_id"] - 1
            pixels = (coords.reshape(-1, 2) * (W, H)).reshape(-1)
            kind, ref, _ = truth[ann["labelstudio"]["region_id"]]
            got = mask_utils.decode(mask_utils.frPyObjects([pixels.tolist()], H, W))[:, :, 0].astype(bool)
            if kind == "poly":
                assert pixels == pytest.approx(ref, abs=1e-3)
            elif kind == "box":
                assert pixels == pytest.approx(ann["segmentation"][0], abs=1e-3)
            else:
                assert (got & ref).sum() / (got | ref).sum() >= 0.98
                coco_mask = mask_utils.decode(ann["segmentation"]).astype(bool)
                assert (got & coco_mask).sum() / (got | coco_mask).sum() >= 0.98
                several += _parts(ref) > 1
    assert several, "the fixture has brush masks of several parts: one outline joins them"


def _parts(mask: np.ndarray) -> int:
    import cv2

    return cv2.connectedComponents(mask.astype(np.uint8))[0] - 1


def test_joined_parts_cover_exactly_the_parts():
    parts = [[2, 2, 12, 2, 12, 12, 2, 12], [30, 20, 40, 20, 40, 34, 30, 34], [5, 40, 15, 45, 8, 55]]
    joined = join_parts(parts)
    separate = mask_utils.decode(mask_utils.frPyObjects(parts, 64, 64)).any(axis=2)
    one = mask_utils.decode(mask_utils.frPyObjects([joined], 64, 64))[:, :, 0].astype(bool)
    assert np.array_equal(one, separate)
    points = {tuple(p) for p in np.reshape(joined, (-1, 2)).tolist()}
    assert points == {tuple(p) for part in parts for p in np.reshape(part, (-1, 2)).tolist()}
    assert join_parts(parts[:1]) == parts[0] + parts[0][:2]


def test_closest_vertices_compiled_as_the_plain_search():
    from exporters.yolo import _closest

    rng = np.random.default_rng(5)
    for n, m in [(1, 1), (3, 9), (40, 25), (300, 7)]:
        a = rng.integers(0, 40, (n, 2)).astype(np.float64) / 2  # half pixels, as the traced outlines: ties
        b = rng.integers(0, 40, (m, 2)).astype(np.float64) / 2
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        first = np.unravel_index(int(np.argmin(d)), d.shape)  # the first closest pair, row by row
        assert _closest(a, b) == tuple(int(i) for i in first) == _closest.py_func(a, b)


# --- round trip: Label Studio -> YOLO -> Label Studio -> YOLO ------------------------------------------


def _tasks_from_yolo(found: dict, names: dict[int, str], *, segments: bool) -> list[dict]:
    """Label Studio tasks holding the YOLO rows as regions (what an importer of the format writes)."""
    tasks = []
    for stem, rows in sorted(all_rows(found).items()):
        results = []
        for cls, coords in rows:
            if segments:
                points = (coords.reshape(-1, 2) * 100).tolist()
                results.append(polygon_result(points, names[cls], W, H))
            else:
                xc, yc, w, h = (coords * 100).tolist()
                results.append(rectangle_result(xc - w / 2, yc - h / 2, w, h, names[cls], W, H))
        tasks.append(
            {
                "id": int(stem.removeprefix("img")) + 100,
                "data": {"image": f"/data/local-files/?d=pics/{stem}.png"},
                "annotations": [{"id": 1, "result": results}],
            }
        )
    return tasks


@pytest.mark.parametrize("segments", [False, True], ids=["yolo", "yolo-seg"])
def test_round_trip_labelstudio_yolo_labelstudio_yolo(source, tmp_path, segments):  # noqa: F811
    tasks, _ = source
    export = export_yolo_seg if segments else export_yolo
    export(tasks, tmp_path / "one", label_config=LABEL_CONFIG, images="none")
    data, first = read_yolo(tmp_path / "one", segments=segments)
    again = _tasks_from_yolo(first, data["names"], segments=segments)
    export(again, tmp_path / "two", label_config=LABEL_CONFIG, images="none")
    data_two, second = read_yolo(tmp_path / "two", segments=segments)
    assert data_two == data
    assert {s: sorted(rows) for s, rows in second.items()} == {s: sorted(rows) for s, rows in first.items()}
    for split, by_file in first.items():
        for stem, rows in by_file.items():
            back = second[split][stem]
            assert [cls for cls, _ in back] == [cls for cls, _ in rows]
            for (_, a), (_, b) in zip(rows, back, strict=True):
                assert b == pytest.approx(a, abs=2e-5)


# --- layout, file names, splits, names -----------------------------------------------------------------


def test_layout_on_disk_as_ultralytics_finds_it(tmp_path):
    root = tmp_path / "root"
    for folder in ("pics", "more"):
        (root / folder).mkdir(parents=True)
    tasks = []
    for i in range(12):
        folder, suffix = ("more", "jpg") if i == 11 else ("pics", "png")
        name = "img0" if i == 11 else f"img{i}"  # pics/img0.png and more/img0.jpg: one stem, two images
        Image.new("RGB", (W, H), "red").save(root / folder / f"{name}.{suffix}")
        triangle = [[10, 10], [60, 10], [30, 50]]
        results = [] if i == 5 else [polygon_result(triangle, 'Tom & "Jerry": #1', W, H)]
        tasks.append(
            {
                "id": i + 1,
                "data": {"image": f"/data/local-files/?d={folder}/{name}.{suffix}"},
                "annotations": [{"id": i + 1, "result": results}],
            }
        )
    tasks.append({**tasks[3], "id": 13})  # the same image in a second task: one split, one label file
    label = '<Label value="Tom &amp; &quot;Jerry&quot;: #1"/>'
    config = LABEL_CONFIG.replace('<Label value="cat"/>', label, 1)
    from exporters import ImageResolver

    options = ExportOptions(label_config=config, fractions=(0.5, 0.5), seed=3)
    summary = export_yolo_seg(tasks, tmp_path / "out", options, resolver=ImageResolver(images_root=root))
    out = tmp_path / "out"
    data, found = read_yolo(out, segments=True)
    assert data["names"][0] == 'Tom & "Jerry": #1'
    placed = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.*"))
    assert len(placed) == 12 and summary.exported["images copied"] == 12
    stems = [Path(p).stem for p in placed]
    assert len(set(stems)) == 12 and "12_img0" in stems  # the second img0 is renamed: its labels differ
    split = splitter(("train", "val"), (0.5, 0.5), 3)
    for task in tasks:
        ref = task["data"]["image"]
        expected = split(ref)
        assert any(p.startswith(f"images/{expected}/") and p.endswith(Path(ref).name) for p in placed)
    assert set(found) == {"train", "val"} and all(found.values())  # both splits are used
    rows = all_rows(found)
    assert rows["img5"] == []  # an image without a region: an empty label file
    assert sum(len(r) for r in rows.values()) == summary.exported["annotations"] == 11
    assert summary.skipped["duplicate row"] == 1  # task 13's region is task 4's, on the same image
    assert summary.splits.keys() == {"train", "val"}
    assert sum(s["images"] for s in summary.splits.values()) == 12


def test_splits_follow_the_seed_and_never_move(tmp_path):
    def export(n: int, seed: int, name: str) -> dict[str, str]:
        region = polygon_result([[1, 1], [50, 1], [20, 40]], "dog", W, H)
        tasks = [
            {
                "id": i + 1,
                "data": {"image": f"/data/local-files/?d=pics/p{i}.png"},
                "annotations": [{"id": 1, "result": [region]}],
            }
            for i in range(n)
        ]
        export_yolo(tasks, tmp_path / name, label_config=LABEL_CONFIG, images="none", seed=seed)
        return {p.stem: p.parent.name for p in (tmp_path / name / "labels").rglob("*.txt")}

    small, grown = export(20, 0, "a"), export(60, 0, "b")
    assert all(grown[stem] == where for stem, where in small.items())  # a grown project keeps the splits
    assert export(60, 1, "c") != grown
    assert 30 <= list(grown.values()).count("train") <= 58  # about 0.8 of 60
    with pytest.raises(UserError, match=r"needs 2 numbers \(train, val\)"):
        export_yolo([], tmp_path / "d", fractions=(0.8, 0.1, 0.1))


def test_yaml_names_read_back_exactly():
    for text in ['a "b" c', "back\\slash", "colon: here", "# hash", "tab\there", "new\nline", "ünï 猫 🐈",
                 "\x85\u2028nel", "", "- dash", "null", "1"]:
        assert yaml.safe_load(f"k: {yaml_string(text)}")["k"] == text
    assert label_name("a.b.png") == "a.b.txt" and label_name("noext") == "noext.txt"


def test_boxes_and_outlines_are_clipped_to_the_image(tmp_path):
    box = rectangle_result(90.0, 10.0, 20.0, 20.0, "cat", W, H)  # its right fifth is outside the image
    poly = polygon_result([[80, 50], [104, 50], [104, 90]], "dog", W, H)
    task = {"id": 1, "data": {"image": "a.png"}, "annotations": [{"id": 1, "result": [box, poly]}]}
    export_yolo([task], tmp_path / "det", label_config=LABEL_CONFIG, images="none")
    (rows,) = all_rows(read_yolo(tmp_path / "det", segments=False)[1]).values()
    assert rows[0][1] == pytest.approx([0.95, 0.2, 0.1, 0.2])
    export_yolo_seg([task], tmp_path / "seg", label_config=LABEL_CONFIG, images="none")
    (rows,) = all_rows(read_yolo(tmp_path / "seg", segments=True)[1]).values()
    assert rows[1][1] == pytest.approx([0.8, 0.5, 1.0, 0.5, 1.0, 0.9])


# --- the registry and the command line -----------------------------------------------------------------


def count_regions(tasks, out_dir, options):
    """A format defined here: one line per task with its number of regions."""
    from exporters.summary import ExportSummary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{t['id']} {sum(len(a['result']) for a in t['annotations'])}\n" for t in tasks]
    (out / "counts.txt").write_text("".join(lines) + f"seed {options.seed}\n")
    summary = ExportSummary("counts")
    summary.count("tasks", len(tasks))
    summary.write(out)
    return summary


@pytest.fixture
def counts_format(monkeypatch):
    from exporters import registry

    register_exporter(Exporter("counts", f"{__name__}:count_regions", ("DIR/counts.txt",)))
    yield
    monkeypatch.delitem(registry._EXPORTERS, "counts")


def test_the_command_line_dispatches_through_the_registry(source, tmp_path, capsys, counts_format):  # noqa: F811
    tasks, _ = source
    src = tmp_path / "export.json"
    src.write_text(json.dumps(tasks))
    assert exporter_names()[:6] == ("coco", "refcoco", "grefcoco", "yolo", "yolo-seg", "labelstudio")
    assert "counts" in exporter_names()
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    assert "DIR/counts.txt" in capsys.readouterr().out
    argv = ["export", str(src), "--out", str(tmp_path / "c"), "--images", "none", "--seed", "4", "-q"]
    assert cli.main([*argv, "--format", "counts"]) == 0
    assert (tmp_path / "c" / "counts.txt").read_text().endswith("seed 4\n")
    assert "tasks" in capsys.readouterr().out
    argv[3] = str(tmp_path / "y")
    assert cli.main([*argv, "--format", "yolo-seg", "--label-config", _config_file(tmp_path)]) == 0
    read_yolo(tmp_path / "y", segments=True)
    assert cli.main([*argv, "--format", "yolo", "--split-fractions", "1,0,0"]) == 2
    assert "needs 2 numbers (train, val)" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown export format 'nope': one of coco, refcoco"):
        get_exporter("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_exporter(Exporter("coco", "exporters.coco:export_coco", ("x",)))


def _config_file(tmp_path: Path) -> str:
    path = tmp_path / "config.xml"
    path.write_text(LABEL_CONFIG)
    return str(path)
