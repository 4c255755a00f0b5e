"""The backend with SAM 3 chosen per deployment (``GROUNDLABEL_ENGINE=sam3``), jobs in-process, SAM 3's
weights from a local folder: every instance comes back as its own region, and the backend never imports
torch."""

from __future__ import annotations

import json

import pytest
from conftest import png_data_uri
from sam3_tiny import save_tiny_sam3
from test_backend_inprocess import run_python

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image" model_score_threshold="0.0">
    <Label value="Thing" predicted_values="red square,thing"/>
  </BrushLabels>
  <TextArea name="prompt" toName="image"/>
</View>
"""


def test_inprocess_backend_answers_with_sam3_instances(tiny_gem_env, tmp_path):
    pytest.importorskip("torch")
    folder = save_tiny_sam3(tmp_path / "sam3-tiny")
    env = {**tiny_gem_env, "GROUNDLABEL_ENGINE": "sam3", "GROUNDLABEL_SAM3_MODEL": str(folder)}
    body = {"tasks": [{"id": 1, "data": {"image": png_data_uri(64, 48, seed=1)}}], "label_config": CONFIG}
    typed = {
        **body,
        "context": {
            "result": [{"type": "textarea", "from_name": "prompt", "to_name": "image",
                        "value": {"text": ["red square"]}}]
        },
    }  # fmt: skip
    out = run_python(
        f"""
        import json, sys
        from fastapi.testclient import TestClient
        from groundlabel_cli.serve import build_app
        from groundlabel.settings import Settings
        settings = Settings.from_env(predict_timeout=200)
        with TestClient(build_app(settings)) as client:
            setup = client.post("/setup", json={{"schema": {CONFIG!r}, "project": "1"}}).json()
            batch = client.post("/predict", json={body!r}).json()
            typed = client.post("/predict", json={typed!r}).json()
        print(json.dumps({{"torch": "torch" in sys.modules, "setup": setup, "batch": batch,
                          "typed": typed}}))
    """,
        env=env,
        timeout=400,
    )
    data = json.loads(out)
    assert data["torch"] is False
    assert data["setup"]["model_version"].startswith("sam3-tiny")
    for answer in (data["batch"], data["typed"]):
        (prediction,) = answer["results"]
        assert prediction["model_version"].startswith("sam3-tiny")
        regions = prediction["result"]
        assert len(regions) >= 2 and all(r["type"] == "brushlabels" for r in regions)
        assert len({r["score"] for r in regions}) > 1  # instances, each with its own score
        assert {r["value"]["brushlabels"][0] for r in regions} == {"Thing"}
