"""One pipeline from images to regions: the backend's job path and ``groundlabel predict`` agree."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, png_bytes  # noqa: E402

from groundlabel.protocol import JobPayload  # noqa: E402
from groundlabel.settings import Settings  # noqa: E402
from groundlabel.spec import parse_label_config  # noqa: E402
from groundlabel_cli import predict as predict_files  # noqa: E402
from groundlabel_cli.main import main  # noqa: E402
from workers import engines  # noqa: E402
from workers.jobs import run_prediction_job  # noqa: E402
from workers.pipeline import prompt_groups  # noqa: E402

# A label with four synonyms: they share the label's probability on both paths.
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <PolygonLabels name="poly" toName="image" model_score_threshold="0.3">
    <Label value="Red" predicted_values="red,crimson,scarlet,ruby"/>
    <Label value="Other"/>
  </PolygonLabels>
  <BrushLabels name="mask" toName="image">
    <Label value="Red" predicted_values="red,crimson,scarlet,ruby"/>
  </BrushLabels>
  <RectangleLabels name="box" toName="image" model_score_threshold="0.4">
    <Label value="Other"/>
  </RectangleLabels>
</View>
"""


def without_ids(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "id"} for r in results]


@pytest.fixture
def tiny_engine():
    engine = make_tiny_gem_engine(seed=3)
    yield engine
    engines.configure(Settings())


def test_job_path_and_cli_path_give_identical_regions(tmp_path, monkeypatch, tiny_engine):
    names = []
    for i, (w, h) in enumerate([(48, 40), (64, 32), (40, 40)]):
        (tmp_path / f"im{i}.png").write_bytes(png_bytes(w, h, seed=20 + i))
        names.append(f"im{i}.png")
    (tmp_path / "config.xml").write_text(CONFIG)

    # The backend's job path: tasks with Label Studio local-files URLs, run by the job function.
    engines.configure(Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path)}))
    engines.set_engine("gem", tiny_engine)
    tasks = [{"id": i + 1, "data": {"image": f"/data/local-files/?d={n}"}} for i, n in enumerate(names)]
    job = run_prediction_job(JobPayload(tasks=tasks, spec=parse_label_config(CONFIG)))
    assert all("error" not in p for p in job)

    # The CLI path: the same files through `groundlabel predict`, on the same engine.
    monkeypatch.setattr(predict_files, "build_engine", lambda args: tiny_engine)
    out = tmp_path / "tasks.json"
    paths = [str(tmp_path / n) for n in names]
    argv = ["predict", *paths, "--label-config", str(tmp_path / "config.xml"), "--out", str(out)]
    assert main([*argv, "--no-progress", "--batch-size", "3"]) == 0
    cli = [t["predictions"][0] for t in json.loads(out.read_text())]

    assert len(job) == len(cli) == 3
    assert any(p["result"] for p in job), "the test needs some regions to compare"
    for from_job, from_cli in zip(job, cli, strict=True):
        assert without_ids(from_job["result"]) == without_ids(from_cli["result"])
        assert from_job["score"] == from_cli["score"]
        assert from_job["model_version"] == from_cli["model_version"] == tiny_engine.model_version


def test_synonyms_share_their_label_group():
    prompts, groups = prompt_groups(parse_label_config(CONFIG))
    assert prompts == ["red", "crimson", "scarlet", "ruby", "Other"]
    assert len(set(groups[:4])) == 1 and groups[4] != groups[0]


def test_one_bad_image_fails_alone(tiny_engine):
    from PIL import Image

    from workers.pipeline import class_prompt_regions

    class Flaky:
        """An engine whose batch fails when it holds the poisoned image."""

        model_version = tiny_engine.model_version

        def heatmaps(self, images, prompts, groups=None, sizes=None, lazy=False):
            if any(im.width == 13 for im in images):
                raise RuntimeError("poisoned")
            return tiny_engine.heatmaps(images, prompts, groups=groups, sizes=sizes, lazy=lazy)

    spec = parse_label_config(CONFIG)
    images = [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (13, 20)), Image.new("RGB", (24, 24))]
    first, bad, third = class_prompt_regions(Flaky(), spec, images)
    assert isinstance(bad, RuntimeError) and "poisoned" in str(bad)
    assert first.model_version == third.model_version == tiny_engine.model_version
    alone = class_prompt_regions(tiny_engine, spec, [images[0]])[0]
    assert without_ids(first.results) == without_ids(alone.results)
