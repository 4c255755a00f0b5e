"""The loop closed inside a real Label Studio: annotate referring expressions, press Start Training, and the
better model serves the next Retrieve Predictions.

Label Studio 1.23 (``tests/labelstudio_server.py``), a real ``redis-server``, ``groundlabel serve`` on Redis,
one prediction worker and one training worker (``--queues train``), all as subprocesses. The project has a
TextArea and polygon and brush controls; its tasks are generated scenes (coloured shapes with expressions
such as "the red circle on the left", ``workers/models/lavt/synthetic.py``), annotated through Label
Studio's API (most imported with their annotations, the last ones submitted one by one as the editor does;
half of the regions are polygons, half brush masks). *Start Training* is pressed through
the API call of the button (``POST /api/ml/<id>/train``, which makes Label Studio call the backend's
``/webhook`` with ``START_TRAINING``). The base model is a tiny LAVT with random weights, so the trained
version's held-out gain is large and cannot flake.

A second project has brush labels only (no TextArea, the generated scenes' colours as classes): its
*Start Training* distils the tiny CLIP behind GEM (``tests/assets/tiny_clip.pt``) instead, and its next
predictions carry the ``gem`` version's name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, brush_config, free_port
from labelstudio_server import require_label_studio, shared_label_studio

torch = pytest.importorskip("torch")
pytest.importorskip("pycocotools")

from exporters.synthetic import brush_result, polygon_result, text_result  # noqa: E402
from groundlabel.ls_format import brush_rle_encode  # noqa: E402
from groundlabel.model_store import ModelStore  # noqa: E402
from groundlabel.training_queue import read_status  # noqa: E402
from workers.models.lavt.data import Refer  # noqa: E402
from workers.models.lavt.synthetic import make_dataset  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="expr" toName="image" value="$text" rows="2"/>
  <PolygonLabels name="poly" toName="image" model_score_threshold="0.0"><Label value="Thing"/></PolygonLabels>
  <BrushLabels name="mask" toName="image" model_score_threshold="0.0"><Label value="Thing"/></BrushLabels>
</View>"""
IMAGES = 40  # generated scenes, two objects (two tasks) each
SIZE = 64


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "GROUNDLABEL_"))}
    env.pop("REDIS_URL", None)
    env["GROUNDLABEL_CPU_PRECISION"] = "fp32"  # the workers compute as the tests compare, on any CPU
    env.update(extra, PYTHONPATH=str(REPO))
    return env


def _service_env(redis_url: str, store: ModelStore, label_studio, models: dict[str, str]) -> dict[str, str]:
    """What backend, worker and trainer share: Redis, the model store, Label Studio, the CPU, ``models``."""
    return {
        "REDIS_URL": redis_url,
        "GROUNDLABEL_MODEL_STORE": str(store.root),
        **models,
        "GROUNDLABEL_DEVICE": "cpu",
        "GROUNDLABEL_WORKER_HEARTBEAT": "1",
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": label_studio.legacy_token,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _start_services(procs, common: dict[str, str], training: dict[str, str]) -> str:
    """Start the backend, a prediction worker and a training worker; returns the backend's URL."""
    port = free_port()
    procs.start("serve", ["serve", "--host", "127.0.0.1", "--port", str(port)], _env(common))
    procs.start("worker", ["worker", "--heartbeat", "1"], _env(common))
    procs.start("trainer", ["worker", "--queues", "train", "--heartbeat", "1"], _env({**common, **training}))
    return f"http://127.0.0.1:{port}"


def _tasks(label_studio, scenes: Path, folder: str) -> tuple[list[dict], list[list[dict]]]:
    """Task data and one annotation result per generated ref (polygon or brush, and its expressions)."""
    from PIL import Image, ImageDraw

    refer = Refer(scenes)
    target = Path(label_studio.files_root, folder)
    target.mkdir(parents=True, exist_ok=True)
    data, results = [], []
    for n, ref in enumerate(refer.refs):
        image = refer.images[ref["image_id"]]
        shutil.copyfile(refer.image_dir / image["file_name"], target / image["file_name"])
        w, h = image["width"], image["height"]
        flat = refer.anns[ref["ann_id"]]["segmentation"][0]
        if n % 2 == 0:
            points = [[100 * flat[k] / w, 100 * flat[k + 1] / h] for k in range(0, len(flat), 2)]
            region = polygon_result(points, "Thing", w, h, from_name="poly")
        else:
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon([(flat[k], flat[k + 1]) for k in range(0, len(flat), 2)], fill=1)
            region = brush_result(brush_rle_encode(np.asarray(canvas) > 0), "Thing", w, h, from_name="mask")
        sentences = [s["raw"] for s in ref["sentences"]]
        data.append({"image": f"/data/local-files/?d={folder}/{image['file_name']}", "text": sentences[0]})
        results.append([region, text_result(sentences, from_name="expr")])
    return data, results


class Processes:
    """Subprocesses of the test, stopped at the end; their logs for failure messages."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "groundlabel", *argv],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.running.append((name, proc))
        return proc

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}:\n" + (self.folder / f"{name}.log").read_text(errors="replace")[-2500:]
            for name, _ in self.running
        )

    def stop(self) -> None:
        for _, proc in self.running:
            proc.terminate()
        for _, proc in self.running:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_start_training_in_label_studio_promotes_a_better_model_that_serves_the_next_predictions(
    redis_url, tmp_path
):
    import httpx

    from workers.models.lavt.config import LavtConfig
    from workers.models.lavt.model import LavtNetwork
    from workers.models.lavt.synthetic import vocabulary
    from workers.models.lavt.weights import save_checkpoint

    started = time.monotonic()
    phases: list[str] = []

    def phase(name: str) -> None:  # printed with the test's output: where the minutes went
        phases.append(f"{name} {time.monotonic() - started:.0f}s")
        print("phase:", phases[-1], flush=True)

    require_label_studio()
    label_studio = shared_label_studio()
    phase("label studio up")
    scenes = make_dataset(tmp_path / "scenes", images=IMAGES, val_images=0, size=SIZE, seed=21)
    torch.manual_seed(21)
    base = tmp_path / "base.pth"
    save_checkpoint(
        base, LavtNetwork(LavtConfig(variant="tiny", image_size=SIZE)), tokenizer_vocab=vocabulary()
    )
    store = ModelStore(tmp_path / "store")
    models = {
        "GROUNDLABEL_LAVT_CHECKPOINT": str(base),
        "GROUNDLABEL_LAVT_VARIANT": "tiny",
        "GROUNDLABEL_GEM_MODEL_CONFIG": str(tmp_path / "tinyclip.json"),
        "GROUNDLABEL_GEM_PRETRAINED": "none",
        "GROUNDLABEL_GEM_IMAGE_SIZE": "64",
    }
    common = _service_env(redis_url, store, label_studio, models)
    from conftest import TINY_GEM_CONFIG

    (tmp_path / "tinyclip.json").write_text(__import__("json").dumps(TINY_GEM_CONFIG))
    training = {
        "GROUNDLABEL_TRAIN_EPOCHS": "10",
        "GROUNDLABEL_TRAIN_BATCH": "8",
        "GROUNDLABEL_TRAIN_LR": "1e-3",
        "GROUNDLABEL_TRAIN_HOLDOUT": "0.25",
        "GROUNDLABEL_TRAIN_SEED": "3",
        "GROUNDLABEL_TRAIN_LOADERS": "0",
    }
    procs = Processes(tmp_path)
    try:
        backend = _start_services(procs, common, training)

        project = label_studio.create_project("training loop", CONFIG)
        folder = f"train{project}"
        label_studio.add_local_storage(project, folder)
        data, results = _tasks(label_studio, scenes, folder)
        # Most tasks arrive annotated (one import), the last few are annotated as the editor submits them.
        by_hand = 6
        annotated = [{"data": d, "annotations": [{"result": r}]} for d, r in zip(data, results, strict=True)]
        ids = label_studio.import_tasks(project, annotated[:-by_hand] + data[-by_hand:])
        assert len(ids) == 2 * IMAGES
        for task_id, result in zip(ids[-by_hand:], results[-by_hand:], strict=True):
            label_studio.api_json("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})

        phase("annotated")
        import redis
        from rq import Worker

        connection = redis.Redis.from_url(redis_url)
        deadline = time.monotonic() + 120
        while True:  # the backend answers, the prediction worker and the training worker are registered
            try:
                up = httpx.get(backend + "/health", timeout=2).json().get("status") == "UP"
            except (httpx.HTTPError, ValueError):
                up = False
            if up and len(Worker.all(connection=connection)) >= 2:
                break
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(0.5)
        ml = label_studio.api_json(
            "POST",
            "/api/ml",
            json={"url": backend, "project": project, "title": "groundlabel", "auto_update": True},
        )
        phase("processes up")
        sample = ids[:6]
        label_studio.retrieve_predictions(project, sample)
        before = {p["model_version"] for t in sample for p in label_studio.predictions(t)}
        assert len(before) == 1 and before.pop().startswith("lavt-tiny-base-cfg"), procs.logs()

        phase("predicted with the base model")
        # Start Training, twice: one job.
        for _ in range(2):
            pressed = label_studio.api("POST", f"/api/ml/{ml['id']}/train")
            assert pressed.status_code == 200, pressed.text[:500]
        job = read_status(connection, str(project))["job"]
        deadline = time.monotonic() + 240
        while True:
            status = httpx.post(backend + "/job_status", json={"job": job}, timeout=10).json()
            if status["job_status"] in ("finished", "failed"):
                break
            assert time.monotonic() < deadline, (status, procs.logs())
            time.sleep(1)
        phase("trained")
        assert status["job_status"] == "finished", (status, procs.logs())
        assert read_status(connection, str(project))["job"] == job  # the second press joined the first job
        version = status["version"]
        calibrated = [v for v in store.versions(str(project)) if v.kind == "calibration"]  # its first step
        assert status["promoted"] and version == f"lavt-tiny-p{project}-v{len(calibrated) + 1}", status
        assert status["epoch"] == status["epochs"] == 10

        # The promoted version's held-out metrics beat the base model's by a wide margin.
        record = store.get(str(project), version)
        new, old = record.metrics["new"], record.metrics["base"]
        print(f"held-out oIoU/mIoU: base {old['oIoU']:.3f}/{old['mIoU']:.3f}", end=", ")
        print(f"trained {new['oIoU']:.3f}/{new['mIoU']:.3f}")
        assert new["mIoU"] >= old["mIoU"] + 0.15 and new["oIoU"] >= old["oIoU"] + 0.1, (old, new)
        assert record.parent == "lavt-tiny-base" and record.annotation_count == 2 * IMAGES
        assert (
            record.metrics["heldout_refs"] > 0
            and record.metrics["train_refs"] > record.metrics["heldout_refs"]
        )

        listed = httpx.get(backend + "/versions", params={"project": project}, timeout=10).json()
        assert version in listed["versions"] and listed["details"][-1]["promoted"]
        assert version in label_studio.api_json("GET", f"/api/ml/{ml['id']}/versions")["versions"]
        setup = httpx.post(
            backend + "/setup", json={"project": f"{project}.1", "schema": CONFIG}, timeout=10
        ).json()
        assert setup["model_version"].startswith(version + "-cfg")
        metrics = httpx.get(backend + "/metrics", timeout=10).text
        assert f'groundlabel_training_promoted{{project="{project}"}} 1.0' in metrics

        # The next Retrieve Predictions stores predictions under the new version (workers not restarted).
        label_studio.retrieve_predictions(project, sample)
        for task_id in sample:
            versions = {p["model_version"] for p in label_studio.predictions(task_id)}
            assert any(v.startswith(version + "-cfg") for v in versions), versions
        assert label_studio.api_json("GET", f"/api/ml/{ml['id']}")["model_version"].startswith(version)
        phase("predicted with the trained version")
    finally:
        procs.stop()


def test_start_training_on_a_project_without_expressions_distils_gem_and_serves_it(redis_url, tmp_path):
    """A project with brush labels only (no TextArea): Start Training exports it as COCO, distils the tiny
    CLIP behind GEM on its images, scores both on the held-out masks, stores a ``gem`` version promoted
    only if its held-out mIoU is higher (else promoted by hand, as the operator's verb does), and the next
    Retrieve Predictions of that project carry the version's name."""
    import httpx
    import redis

    from groundlabel_cli.main import main
    from workers.evaluation.scenes import COLOURS, make_scenes
    from workers.evaluation.tiny_clip import export_open_clip

    require_label_studio()
    label_studio = shared_label_studio()
    classes = list(COLOURS)
    config = brush_config(classes)
    clip_config, clip_weights = export_open_clip(REPO / "tests/assets/tiny_clip.pt", tmp_path / "clip")
    store = ModelStore(tmp_path / "store")
    models = {
        "GROUNDLABEL_GEM_MODEL_CONFIG": str(clip_config),
        "GROUNDLABEL_GEM_PRETRAINED": str(clip_weights),
        "GROUNDLABEL_GEM_IMAGE_SIZE": "48",
        "GROUNDLABEL_GEM_TEMPERATURE": "80",
    }
    common = _service_env(redis_url, store, label_studio, models)
    training = {
        "GROUNDLABEL_TRAIN_EPOCHS": "10",
        "GROUNDLABEL_TRAIN_BATCH": "8",
        "GROUNDLABEL_TRAIN_LR": "3e-4",
        "GROUNDLABEL_TRAIN_HOLDOUT": "0.3",
    }
    procs = Processes(tmp_path)
    try:
        backend = _start_services(procs, common, training)
        project = label_studio.create_project("distil gem", config)
        folder = f"gem{project}"
        label_studio.add_local_storage(project, folder)
        target = Path(label_studio.files_root, folder)
        target.mkdir(parents=True, exist_ok=True)
        annotated = []
        for i, scene in enumerate(make_scenes(40, 31, 48)):
            scene.image.save(target / f"s{i:03d}.png")
            result = [
                brush_result(brush_rle_encode(scene.colour_labels == k + 1), name, 48, 48, from_name="mask")
                for k, name in enumerate(classes)
                if (scene.colour_labels == k + 1).any()
            ]
            data = {"image": f"/data/local-files/?d={folder}/s{i:03d}.png"}
            annotated.append({"data": data, "annotations": [{"result": result}]})
        ids = label_studio.import_tasks(project, annotated)
        connection = redis.Redis.from_url(redis_url)
        from rq import Worker

        deadline = time.monotonic() + 120
        while True:
            try:
                up = httpx.get(backend + "/health", timeout=2).json().get("status") == "UP"
            except (httpx.HTTPError, ValueError):
                up = False
            if up and len(Worker.all(connection=connection)) >= 2:
                break
            assert time.monotonic() < deadline, procs.logs()
            time.sleep(0.5)
        ml = label_studio.api_json(
            "POST",
            "/api/ml",
            json={"url": backend, "project": project, "title": "groundlabel", "auto_update": True},
        )
        sample = ids[:4]
        label_studio.retrieve_predictions(project, sample)
        before = {p["model_version"] for t in sample for p in label_studio.predictions(t)}
        assert len(before) == 1 and before.pop().startswith("gem-tiny-clip-trained-"), procs.logs()

        pressed = label_studio.api("POST", f"/api/ml/{ml['id']}/train")
        assert pressed.status_code == 200, pressed.text[:500]
        job = read_status(connection, str(project))["job"]
        deadline = time.monotonic() + 240
        while (status := httpx.post(backend + "/job_status", json={"job": job}, timeout=10).json())[
            "job_status"
        ] not in ("finished", "failed"):
            assert time.monotonic() < deadline, (status, procs.logs())
            time.sleep(1)
        assert status["job_status"] == "finished", (status, procs.logs())
        version = status["version"]
        first = any(v.kind == "calibration" and v.number == 1 for v in store.versions(str(project)))
        number = 2 if first else 1  # the job calibrates first (calibration.md)
        assert version == f"gem-tiny-clip-trained-p{project}-v{number}" and status["kind"] == "gem", status
        assert status["epoch"] == status["epochs"] == 10
        record = store.get(str(project), version)
        new, old = record.metrics["new"], record.metrics["base"]
        print(f"held-out mIoU: base {old['mIoU']:.2f}, distilled {new['mIoU']:.2f}")
        key = "calibrated_IoU" if "calibrated_IoU" in new else "mIoU"  # served calibrated: compared so
        assert status["promoted"] == (new[key] > old[key]) and record.annotation_count == 40
        assert record.metrics["train_images"] + record.metrics["heldout_images"] <= 40
        if not status["promoted"]:
            assert (
                main(["models", "--store", str(store.root), "promote", "--project", str(project), version])
                == 0
            )
        metrics = httpx.get(backend + "/metrics", timeout=10).text
        assert f'groundlabel_training_heldout_miou{{model="new",project="{project}"}}' in metrics

        served = store.promoted_name(str(project))  # the version, or the same calibration over it
        assert served == version or store.calibration(store.get(str(project), served)).trained == version
        label_studio.retrieve_predictions(project, sample)
        for task_id in sample:
            versions = {p["model_version"] for p in label_studio.predictions(task_id)}
            assert any(v.startswith(served + "-cfg") for v in versions), (versions, procs.logs())
    finally:
        procs.stop()
