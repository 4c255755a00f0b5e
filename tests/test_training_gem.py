"""The training job's GEM side, for projects without referring expressions: the label config's brush and
polygon labels are GEM's classes, the project's images (exported as COCO, split by image) distil the CLIP
behind GEM (``groundlabel distill``'s code), the current and the distilled model are scored with
``eval-gem``'s protocol on the same held-out masks, the version is stored with its metrics and promoted
only when its held-out mIoU is higher; then a real worker on a real Redis serves it for that project only.

The model is the tiny CLIP of ``tests/assets/tiny_clip.pt`` (exported as an ordinary open_clip model, so the
worker loads it from its settings), the classes are the generated scenes' object colours (what it knows,
``docs/quality.md``), GEM's inverse temperature the one validated there.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from conftest import REPO, brush_config  # noqa: E402

from exporters.coco import export_coco  # noqa: E402
from exporters.geometry import decode_segmentation  # noqa: E402
from exporters.images import ImageResolver  # noqa: E402
from exporters.synthetic import brush_result  # noqa: E402
from groundlabel.errors import UserError  # noqa: E402
from groundlabel.ls_format import brush_rle_encode  # noqa: E402
from groundlabel.model_store import ModelStore  # noqa: E402
from groundlabel.settings import EngineSettings  # noqa: E402
from groundlabel_cli.training import split_coco_images  # noqa: E402
from workers.evaluation.scenes import COLOURS, make_scenes  # noqa: E402
from workers.evaluation.tiny_clip import export_open_clip  # noqa: E402
from workers.training.gem import distill_project, mask_classes, read_dataset  # noqa: E402
from workers.training.lavt import Recipe  # noqa: E402

CLASSES = list(COLOURS)
CONFIG = brush_config(CLASSES)
SIZE = 48  # the tiny CLIP's input size
TEMPERATURE = 80.0  # GEM's inverse temperature validated on the tiny CLIP (docs/quality.md)


def scene_export(tmp_path, images: int, seed: int = 31) -> tuple[list[dict], str]:
    """Label Studio tasks of generated scenes, one brush mask per visible colour; and the files' root."""
    folder = tmp_path / "files" / "scenes"
    folder.mkdir(parents=True)
    tasks = []
    for i, scene in enumerate(make_scenes(images, seed, SIZE)):
        scene.image.save(folder / f"s{i:03d}.png")
        results = [
            brush_result(brush_rle_encode(scene.colour_labels == k + 1), name, SIZE, SIZE, from_name="mask")
            for k, name in enumerate(CLASSES)
            if (scene.colour_labels == k + 1).any()
        ]
        tasks.append(
            {
                "id": i + 1,
                "data": {"image": f"/data/local-files/?d=scenes/s{i:03d}.png"},
                "annotations": [{"id": i + 1, "result": results, "was_cancelled": False}],
            }
        )
    return tasks, str(tmp_path / "files")


def tiny_engines(tmp_path) -> tuple[EngineSettings, dict[str, str]]:
    """GEM on the trained tiny CLIP: the settings, and the same as a worker's environment."""
    config, weights = export_open_clip(REPO / "tests/assets/tiny_clip.pt", tmp_path / "clip")
    engines = EngineSettings(
        gem_model_config=str(config),
        gem_pretrained=str(weights),
        gem_image_size=SIZE,
        gem_temperature=TEMPERATURE,
        gem_temperature_set=True,
        device="cpu",
    )
    env = {
        "GROUNDLABEL_GEM_MODEL_CONFIG": str(config),
        "GROUNDLABEL_GEM_PRETRAINED": str(weights),
        "GROUNDLABEL_GEM_IMAGE_SIZE": str(SIZE),
        "GROUNDLABEL_GEM_TEMPERATURE": str(TEMPERATURE),
        "GROUNDLABEL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return engines, env


def test_classes_come_from_the_brush_and_polygon_labels():
    config = """<View><Image name="image" value="$image"/>
      <TextArea name="expr" toName="image"/>
      <RectangleLabels name="box" toName="image"><Label value="car"/></RectangleLabels>
      <PolygonLabels name="poly" toName="image"><Label value="cat" predicted_values="cat,kitten"/>
        <Label value="dog"/></PolygonLabels>
      <BrushLabels name="mask" toName="image"><Label value="dog"/><Label value="sky"/></BrushLabels>
    </View>"""
    assert mask_classes(config) == [("cat", "kitten"), ("dog",), ("sky",)]
    boxes = '<View><Image name="i" value="$image"/><RectangleLabels name="b" toName="i"><Label value="car"/>'
    with pytest.raises(UserError, match="BrushLabels or PolygonLabels"):
        mask_classes(boxes + "</RectangleLabels></View>")


def test_the_split_is_by_image_reproducible_and_the_masks_are_the_annotations(tmp_path):
    tasks, root = scene_export(tmp_path, 20)
    export_coco(tasks, tmp_path / "coco", label_config=CONFIG, resolver=ImageResolver(images_root=root))
    classes = mask_classes(CONFIG)
    coco = tmp_path / "coco"
    splits = split_coco_images(coco, 0.3, 0)
    assert split_coco_images(coco, 0.3, 0) == splits and set(splits.values()) == {"train", "val"}
    train, heldout = read_dataset(coco, classes, splits, decode_segmentation)
    again = read_dataset(coco, classes, splits, decode_segmentation)
    assert train == again[0] and heldout.images == again[1].images
    assert train and heldout.images and not set(train) & set(heldout.images)
    assert len(train) + len(heldout.images) == 20
    other = read_dataset(coco, classes, split_coco_images(coco, 0.3, 1), decode_segmentation)
    assert other[1].images != heldout.images  # another seed holds out other images
    scenes = make_scenes(20, 31, SIZE)
    for file, labels in zip(heldout.images, heldout.labels, strict=True):
        scene = scenes[int(file.stem.rsplit("s", 1)[-1])]
        np.testing.assert_array_equal(labels, scene.colour_labels)  # label k: the k-th class's mask


@pytest.mark.slow
def test_distilling_a_project_stores_a_version_promoted_only_if_better_and_workers_serve_it(
    tmp_path, one_thread, redis_url, start_worker
):
    from conftest import png_data_uri
    from fastapi.testclient import TestClient

    from groundlabel.settings import Settings
    from labeling_backend.app import create_app
    from labeling_backend.queue import RedisJobQueue
    from workers.engines import model_versions

    tasks, root = scene_export(tmp_path, 60)
    export_coco(tasks, tmp_path / "coco", label_config=CONFIG, resolver=ImageResolver(images_root=root))
    engines, env = tiny_engines(tmp_path)
    store = ModelStore(tmp_path / "store")
    seen: list[dict] = []

    def distill(recipe: Recipe, work_dir: str, **options):
        """Project 5's distillation on the exported images (30 % held out, seed 0)."""
        return distill_project(
            tmp_path / "coco",
            store=store,
            project="5",
            annotation_count=60,
            classes=mask_classes(CONFIG),
            engines=engines,
            recipe=recipe,
            splits=split_coco_images(tmp_path / "coco", 0.3, 0),
            decode=decode_segmentation,
            work_dir=tmp_path / work_dir,
            progress_bar=False,
            **options,
        )

    outcome = distill(Recipe(epochs=10, batch_size=8, lr=3e-4, seed=0), "work", on_progress=seen.append)
    base_name = model_versions(engines)["gem"]
    assert outcome.version == "gem-tiny-clip-trained-p5-v1" and outcome.parent == base_name
    assert outcome.kind == "gem" and outcome.train_images + outcome.heldout_images == 60
    record = store.get("5", outcome.version)
    assert record.kind == "gem" and record.parent == base_name and record.annotation_count == 60
    assert record.metrics["base"]["mIoU"] == outcome.base["mIoU"] and "fg_mIoU" in record.metrics["new"]
    assert set(record.metrics["new"]["per_class"]) == {"background", *CLASSES}
    assert record.metrics["loss_last"] < record.metrics["loss_first"]  # the distillation learned
    from safetensors.torch import load_file

    state = load_file(str(store.weights_path(record)))  # the store keeps safetensors
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in state
    epochs = [s["epoch"] for s in seen if s.get("stage") == "training" and "loss" in s]
    assert epochs == list(range(1, 11))
    better = outcome.new["mIoU"] > outcome.base["mIoU"]
    assert outcome.promoted == better and store.promoted_name("5") == (outcome.version if better else None)

    # Asked for a gain no model can reach, the next run is stored and not promoted; it starts from what
    # the project serves and is scored on the same held-out images.
    again = distill(Recipe(epochs=1, batch_size=8, lr=3e-4, seed=0, min_gain=1.0), "work2")
    served = outcome.version if better else base_name
    assert again.version == "gem-tiny-clip-trained-p5-v2" and again.parent == served and not again.promoted
    served_miou = outcome.new["mIoU"] if better else outcome.base["mIoU"]
    assert again.base["mIoU"] == pytest.approx(served_miou, abs=1e-6)
    if not better:  # the rule held; the test goes on with the version promoted by hand (the CLI's verb)
        store.promote("5", outcome.version, "forced")

    # A real worker on Redis serves project 5's version from the next job on; project 6 keeps the base.
    worker = start_worker(redis_url, {**env, "GROUNDLABEL_MODEL_STORE": str(store.root)})
    worker.wait_ready(redis_url, timeout=120)
    settings = Settings.from_env({}, redis_url=redis_url, model_store=str(store.root))
    queue = RedisJobQueue(settings.queue)
    app = create_app(settings, runner=queue, model_version=base_name, versions=[base_name])
    with TestClient(app) as client:

        def predict(project: str) -> dict:
            body = {
                "tasks": [{"id": 1, "data": {"image": png_data_uri(48, 48, seed=3)}}],
                "label_config": CONFIG,
                "project": f"{project}.1700000000",
            }
            deadline = time.monotonic() + 120
            while not (results := client.post("/predict", json=body).json()["results"])[0]:
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.5)
            return results[0][0] if isinstance(results[0], list) else results[0]

        setup = client.post("/setup", json={"project": "5.1700000000", "schema": CONFIG}).json()
        assert setup["model_version"].startswith(outcome.version + "-cfg")
        assert predict("5")["model_version"].startswith(outcome.version + "-cfg"), worker.output()
        assert predict("6")["model_version"].startswith(base_name + "-cfg")
        versions = client.get("/versions", params={"project": "5"}).json()["details"]
        assert [v["kind"] for v in versions] == ["gem", "gem"] and versions[0]["promoted"]
        assert versions[0]["heldout_mIoU"] == outcome.new["mIoU"]
        store.rollback("5")
        assert predict("5")["model_version"].startswith(base_name + "-cfg")
