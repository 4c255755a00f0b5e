"""The job path for referring expressions: LAVT when a checkpoint is configured, GEM otherwise."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, png_data_uri  # noqa: E402

from groundlabel.settings import Settings  # noqa: E402
from groundlabel.spec import parse_label_config  # noqa: E402
from workers import engines  # noqa: E402
from workers.jobs import run_job  # noqa: E402
from workers.models.lavt import LavtConfig, LavtNetwork, save_checkpoint  # noqa: E402
from workers.models.lavt.synthetic import vocabulary  # noqa: E402

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Circle"/><Label value="Square"/></BrushLabels>
  <TextArea name="prompt" toName="image" value="$expression"/>
</View>
"""


@pytest.fixture(scope="module")
def lavt_checkpoint(tmp_path_factory):
    """A tiny random LAVT whose decoder leans to foreground, so that its mask is never empty."""
    torch.manual_seed(0)
    net = LavtNetwork(LavtConfig(variant="tiny", image_size=64))
    with torch.no_grad():
        net.model.classifier.conv1_1.bias.copy_(torch.tensor([-4.0, 4.0]))
    path = tmp_path_factory.mktemp("lavt") / "shapes-tiny.pth"
    save_checkpoint(path, net, tokenizer_vocab=vocabulary())
    return path


@pytest.fixture
def fresh_engines(monkeypatch):
    monkeypatch.delenv("GROUNDLABEL_LAVT_CHECKPOINT", raising=False)
    monkeypatch.setenv("GROUNDLABEL_DEVICE", "cpu")
    engines.clear_engines()
    engines.set_engine("gem", make_tiny_gem_engine())
    yield monkeypatch
    engines.clear_engines()


def predict_tasks(payload: dict) -> list[dict]:
    """The job on ``payload`` in a worker configured from the environment, with the fixture's tiny GEM."""
    gem = engines.get_gem_engine()
    engines.configure(Settings.from_env())
    engines.set_engine("gem", gem)
    return run_job(payload)


def payload(tasks, context=None):
    spec = parse_label_config(LABEL_CONFIG)
    return {"tasks": tasks, "spec": spec.to_dict(), "context": context, "label_studio_url": None}


def test_expression_in_task_data_goes_to_lavt(fresh_engines, lavt_checkpoint):
    fresh_engines.setenv("GROUNDLABEL_LAVT_CHECKPOINT", str(lavt_checkpoint))
    long_text = " ".join(["the red circle on the left"] * 4)
    tasks = [
        {"id": 1, "data": {"image": png_data_uri(48, 40, seed=1), "expression": "the red square"}},
        {"id": 2, "data": {"image": png_data_uri(48, 40, seed=2), "expression": long_text}},
        {"id": 3, "data": {"image": png_data_uri(48, 40, seed=3)}},  # no expression: class prompts, GEM
    ]
    first, second, third = predict_tasks(payload(tasks))
    assert first["model_version"] == "lavt-tiny-shapes-tiny" and "error" not in first
    brush = [r for r in first["result"] if r["type"] == "brushlabels"]
    assert brush and brush[0]["value"]["brushlabels"] == ["Square"]  # the label named in the expression
    assert brush[0]["original_width"] == 48 and brush[0]["original_height"] == 40
    assert second["model_version"] == "lavt-tiny-shapes-tiny"
    assert second["meta"] == {"truncated": True, "tokens": 26}
    assert third["model_version"].startswith("gem-tinyclip") and "error" not in third


def test_interactive_text_goes_to_lavt(fresh_engines, lavt_checkpoint):
    fresh_engines.setenv("GROUNDLABEL_LAVT_CHECKPOINT", str(lavt_checkpoint))
    context = {
        "result": [
            {
                "type": "textarea",
                "from_name": "prompt",
                "to_name": "image",
                "value": {"text": ["the green circle"]},
            }
        ]
    }
    (prediction,) = predict_tasks(payload([{"id": 7, "data": {"image": png_data_uri(seed=7)}}], context))
    assert prediction["model_version"] == "lavt-tiny-shapes-tiny"
    assert {r["value"]["brushlabels"][0] for r in prediction["result"]} == {"Circle"}


def test_without_a_checkpoint_gem_grounds_the_expression(fresh_engines):
    tasks = [{"id": 4, "data": {"image": png_data_uri(seed=4), "expression": "the red square"}}]
    (prediction,) = predict_tasks(payload(tasks))
    assert "error" not in prediction
    assert prediction["model_version"].startswith("gem-tinyclip")
    assert "lavt" not in prediction["model_version"]
