"""``groundlabel export`` against a real Label Studio 1.23: per-region descriptions and predictions.

Label Studio's JSON export lists a task's predictions by id only (``"predictions": [12]``). The exporter
reads them through the API (``--project``, or a file with ``--url``/``--api-key``), or reports the
tasks whose predictions it could not use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, clean_env

from exporters.synthetic import polygon_result, text_result

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <TextArea name="prompt" toName="image"/>
  <PolygonLabels name="poly" toName="image"><Label value="Thing"/></PolygonLabels>
  <TextArea name="desc" toName="image" perRegion="true"/>
</View>"""
W, H = 40, 30
SQUARE = [[10.0, 10.0], [60.0, 10.0], [60.0, 60.0], [10.0, 60.0]]


@pytest.fixture(scope="module")
def project(label_studio_session):
    ls = label_studio_session
    project = ls.create_project("export api", CONFIG)
    annotated, predicted = ls.import_tasks(
        project, [{"image": "/data/upload/1/a.png"}, {"image": "/data/upload/1/b.png"}]
    )
    region = polygon_result(SQUARE, "Thing", W, H, rid="r1")
    result = [region, text_result("the red square", rid="r1", from_name="desc")]
    ls.api_json("POST", f"/api/tasks/{annotated}/annotations", json={"result": result})
    body = {
        "task": predicted,
        "model_version": "m1",
        "score": 0.5,
        "result": [polygon_result(SQUARE, "Thing", W, H)],
    }
    ls.api_json("POST", "/api/predictions", json=body)
    return project


def _export(args: list[str], out: Path, extra_env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, "-m", "groundlabel", "export", *args, "--format", "grefcoco"]
    command += ["--include-predictions", "--images", "none", "--out", str(out)]
    run = subprocess.run(command, env=clean_env(extra_env or {}), cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    instances = json.loads((out / "grefcoco" / "instances.json").read_text())
    refs = json.loads((out / "grefcoco" / "grefs(unc).json").read_text())
    summary = json.loads((out / "export_summary.json").read_text())
    return {"instances": instances, "refs": refs, "summary": summary, "stdout": run.stdout}


def test_project_export_reads_predictions_and_region_descriptions(label_studio_session, project, tmp_path):
    ls = label_studio_session
    got = _export(["--project", str(project), "--url", ls.url, "--api-key", ls.legacy_token], tmp_path / "p")
    assert [s["raw"] for r in got["refs"] for s in r["sentences"]] == ["the red square"]
    assert len(got["instances"]["annotations"]) == 2  # the annotated region and the predicted one
    assert "prediction listed by id only" not in got["summary"]["skipped"]


def test_export_file_lists_predictions_by_id(label_studio_session, project, tmp_path):
    ls = label_studio_session
    response = ls.api(
        "GET", f"/api/projects/{project}/export", params={"exportType": "JSON", "download_all_tasks": "true"}
    )
    assert response.status_code == 200, response.text[:500]
    tasks = response.json()
    assert any(t["predictions"] and all(isinstance(p, int) for p in t["predictions"]) for t in tasks), tasks
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks))

    offline = _export([str(path), "--label-config", str(_config(tmp_path))], tmp_path / "offline")
    assert len(offline["instances"]["annotations"]) == 1
    skipped = offline["summary"]["skipped"]["prediction listed by id only"]
    assert skipped["count"] == 1 and "--url" in skipped["examples"][0]
    assert "prediction listed by id only" in offline["stdout"]

    online = _export(
        [str(path), "--label-config", str(_config(tmp_path))],
        tmp_path / "online",
        {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.personal_access_token()},
    )
    assert len(online["instances"]["annotations"]) == 2
    assert "prediction listed by id only" not in online["summary"]["skipped"]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "config.xml"
    path.write_text(CONFIG)
    return path
