"""SAM in the pipeline and the jobs: clicks and boxes as prompts, refine=sam's rule, settings and names.

The SAM engines here are tiny random configurations (what SAM answers is arbitrary); what is checked is
the road: which prompts SAM gets, the acceptance rule, which engine names the prediction.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from conftest import make_tiny_gem_engine, png_data_uri  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from groundlabel.ls_format import Click  # noqa: E402
from groundlabel.settings import Settings, split_refine  # noqa: E402
from groundlabel.spec import parse_label_config  # noqa: E402
from workers import engines  # noqa: E402
from workers.jobs import run_job  # noqa: E402
from workers.models.sam import SamConfig, SamEngine, family, mask_parts, tiny_config  # noqa: E402
from workers.models.sam.refine import refine_label_map, refine_mask  # noqa: E402
from workers.pipeline import sam_prompts  # noqa: E402

CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Thing"/><Label value="Other"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Thing"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Thing"/></RectangleLabels>
</View>
"""


def tiny_sam(name: str = "sam2", seed: int = 0) -> SamEngine:
    torch.manual_seed(seed)
    model = family(name).model_cls()(tiny_config(name, 64))
    return SamEngine(SamConfig(model=None, family=name, device="cpu"), model=model)


def picture(width: int = 60, height: int = 40):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_clicks_and_boxes_become_prompts() -> None:
    w, h = 100, 50
    clicks = [
        Click("rectanglelabels", "Thing", "box", 10.0, 10.0, 40.0, 60.0),  # pixels x 10..50, y 5..35
        Click("keypointlabels", "Thing", "click", 20.0, 40.0),  # (20, 20): inside the box
        Click("keypointlabels", "Thing", "click", 30.0, 20.0, positive=False),  # (30, 10): inside, negative
        Click("keypointlabels", "Thing", "click", 80.0, 50.0),  # (80, 25): outside the box
    ]
    (box_prompt, added), (rest, rest_added) = sam_prompts(clicks, w, h)
    assert added and rest_added
    assert box_prompt.box == (10.0, 5.0, 50.0, 35.0)
    assert box_prompt.points == [(20.5, 20.5), (30.5, 10.5)] and box_prompt.labels == [1, 0]
    assert rest.box is None and rest.points == [(80.5, 25.5)] and rest.labels == [1]
    # negative key points alone make no prompt; a negative box removes its mask
    assert sam_prompts([Click("keypointlabels", "Thing", None, 5.0, 5.0, positive=False)], w, h) == []
    ((neg, neg_added),) = sam_prompts(
        [Click("rectanglelabels", "Thing", None, 0, 0, 10, 10, positive=False)], w, h
    )
    assert not neg_added and neg.points == []


def test_parts_prompt_with_their_box_and_peak_points() -> None:
    mask = np.zeros((30, 40), dtype=bool)
    mask[2:10, 3:13] = True
    mask[20:28, 25:39] = True
    mask[0, 39] = True  # one pixel: too small to prompt
    score = np.zeros((30, 40), dtype=np.float32)
    score[8, 4] = 1.0  # the first part's peak, far from its centre
    parts = mask_parts(mask, score)
    assert len(parts) == 2
    first = next(p for p in parts if p.mask[5, 5])
    assert first.prompt.box == (3.0, 2.0, 13.0, 10.0)
    assert first.prompt.points[1] == (4.5, 8.5) and first.prompt.labels == [1, 1]
    x, y = first.prompt.points[0]
    assert 6 <= x <= 10 and 4 <= y <= 8  # the point deepest inside


def test_refine_keeps_sams_mask_only_where_they_agree() -> None:
    sam = tiny_sam()
    image = picture()
    coarse = np.zeros((40, 60), dtype=bool)
    coarse[5:20, 5:25] = True
    coarse[25:38, 35:58] = True
    never, stats = refine_mask(sam, image, coarse, min_iou=1.01, min_score=0.0)
    assert (never == coarse).all() and stats == {"kept": 0, "rejected": 2, "dropped": 0}
    always, stats = refine_mask(sam, image, coarse, min_iou=0.0, min_score=0.0)
    assert stats == {"kept": 2, "rejected": 0, "dropped": 0}
    expected = np.zeros_like(coarse)
    for part in mask_parts(coarse):
        ((candidates, _),) = sam.segment(image, [part.prompt])
        expected |= candidates[0]  # SAM's most confident mask
    assert (always == expected).all()
    labels = coarse.astype(np.int64) * 2
    keep = {"min_iou": 1.01, "min_score": 0.0}
    assert (refine_label_map(sam, image, labels, **keep) == labels).all()
    assert (refine_label_map(sam, image, labels, background=None, **keep) == labels).all()


def test_refine_drops_parts_where_sam_sees_no_object() -> None:
    sam = tiny_sam()
    image = picture()
    coarse = np.zeros((40, 60), dtype=bool)
    coarse[5:20, 5:25] = True
    coarse[25:38, 35:58] = True
    scores = [float(s[0]) for _, s in sam.segment(image, [p.prompt for p in mask_parts(coarse)])]
    dropped, stats = refine_mask(sam, image, coarse, min_iou=1.01, min_score=max(scores) + 1e-3)
    assert not dropped.any() and stats == {"kept": 0, "rejected": 0, "dropped": 2}
    assert min(scores) < max(scores)
    floor = (min(scores) + max(scores)) / 2  # between the two parts' predicted IoUs: one goes
    _, stats = refine_mask(sam, image, coarse, min_iou=1.01, min_score=floor)
    assert stats == {"kept": 0, "rejected": 1, "dropped": 1}
    labels = coarse.astype(np.int64) * 2
    assert not refine_label_map(sam, image, labels, min_score=max(scores) + 1e-3).any()


def test_refine_steps() -> None:
    assert split_refine("none") == ("none", False) and split_refine(None) == ("none", False)
    assert split_refine("sam") == ("none", True) and split_refine("pamr+sam") == ("pamr", True)
    assert split_refine("PAMR") == ("pamr", False)
    with pytest.raises(UserError, match="unknown refinement"):
        split_refine("crf")


def test_sam_settings_and_model_versions(tiny_gem_env) -> None:
    env = {**tiny_gem_env, "GROUNDLABEL_SAM_MODEL": "facebook/sam2.1-hiera-tiny",
           "GROUNDLABEL_SAM_MIN_IOU": "0.7", "GROUNDLABEL_SAM_MIN_SCORE": "0.2",
           "GROUNDLABEL_SAM_CACHE_MB": "64",
           "GROUNDLABEL_GEM_REFINE": "pamr+sam"}  # fmt: skip
    settings = Settings.from_env(env)
    e = settings.engines
    assert e.sam_enabled and e.gem_options()["refine"] == "pamr"
    config = engines.sam_config(e)
    assert config.min_iou == 0.7 and config.min_score == 0.2 and config.cache_bytes == 64 * 2**20
    assert config.resolved_family() == "sam2"
    versions = engines.model_versions(e)
    assert versions["sam"] == "sam-sam2.1-hiera-tiny"
    assert versions["gem"].endswith("-pamr+sam-sam2.1-hiera-tiny")
    assert versions["gem_for_lavt"].endswith("-pamr-expressions+sam-sam2.1-hiera-tiny")  # as the job names it
    assert engines.announced_version(settings) == versions["gem"]
    assert engines.sam_config(Settings.from_env(tiny_gem_env).engines) is None
    with pytest.raises(UserError, match="needs a promptable SAM"):
        Settings.from_env({**tiny_gem_env, "GROUNDLABEL_GEM_REFINE": "sam"})
    with pytest.raises(UserError, match="GROUNDLABEL_LAVT_REFINE"):
        Settings.from_env({**env, "GROUNDLABEL_LAVT_REFINE": "pamr"})
    random = Settings.from_env({**tiny_gem_env, "GROUNDLABEL_SAM_MODEL": "random"}).engines
    assert random.sam_enabled and engines.sam_config(random).model_version() == "sam-random-sam2"


@pytest.fixture
def sam_worker(monkeypatch, tiny_gem_env):
    for key, value in tiny_gem_env.items():
        monkeypatch.setenv(key, value)

    def configure(**env: str):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        engines.configure(Settings.from_env())
        engines.set_engine("gem", make_tiny_gem_engine())
        engines.set_engine("sam", tiny_sam())

    yield configure
    engines.clear_engines()


def payload(tasks, context=None):
    return {
        "tasks": tasks,
        "spec": parse_label_config(CONFIG).to_dict(),
        "context": context,
        "label_studio_url": None,
    }


def click_context(*regions):
    return {"result": list(regions)}


def test_a_click_job_asks_sam(sam_worker) -> None:
    sam_worker(GROUNDLABEL_SAM_MODEL="random")
    click = {"type": "keypointlabels", "from_name": "click", "to_name": "image", "is_positive": True,
             "value": {"x": 50.0, "y": 50.0, "width": 1.0, "keypointlabels": ["Thing"]}}  # fmt: skip
    box = {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
           "value": {"x": 10.0, "y": 10.0, "width": 60.0, "height": 70.0,
                     "rectanglelabels": ["Thing"]}}  # fmt: skip
    for context in (click_context(click), click_context(box), click_context(click, box)):
        (prediction,) = run_job(
            payload([{"id": 1, "data": {"image": png_data_uri(48, 40, seed=1)}}], context)
        )
        assert "error" not in prediction, prediction
        assert prediction["model_version"] == "sam-sam2-custom"
        clicked = {region["from_name"] for region in context["result"]}
        assert not clicked & {r["from_name"] for r in prediction["result"]}  # clicked controls get nothing
        brush = [r for r in prediction["result"] if r["from_name"] == "brush"]
        assert all(r["value"]["brushlabels"] == ["Thing"] for r in brush)
    sam = engines.get_sam_engine()
    assert sam.cache.hits >= 2 and len(sam.cache) == 1  # one image: its embedding computed once


def test_refine_sam_job_names_both_engines(sam_worker) -> None:
    sam_worker(GROUNDLABEL_SAM_MODEL="random", GROUNDLABEL_GEM_REFINE="sam")
    (prediction,) = run_job(payload([{"id": 2, "data": {"image": png_data_uri(48, 40, seed=2)}}]))
    assert "error" not in prediction, prediction
    assert prediction["model_version"] == engines.get_gem_engine().model_version + "+sam-sam2-custom"
    assert len(engines.get_sam_engine().cache) <= 1


def test_without_sam_clicks_use_gem(sam_worker) -> None:
    sam_worker()
    engines.clear_engines()
    engines.set_engine("gem", make_tiny_gem_engine())
    click = {"type": "keypointlabels", "from_name": "click", "to_name": "image",
             "value": {"x": 50.0, "y": 50.0, "keypointlabels": ["Thing"]}}  # fmt: skip
    (prediction,) = run_job(
        payload([{"id": 3, "data": {"image": png_data_uri(48, 40, seed=3)}}], click_context(click))
    )
    assert prediction["model_version"].startswith("gem-") and engines.get_sam_engine() is None


def test_refine_sam_on_an_expression_that_gem_grounds(sam_worker) -> None:
    sam_worker(GROUNDLABEL_SAM_MODEL="random", GROUNDLABEL_GEM_REFINE="sam")
    config = """<View><Image name="image" value="$image"/>
      <BrushLabels name="brush" toName="image"><Label value="Thing"/></BrushLabels>
      <TextArea name="prompt" toName="image" value="$expression"/></View>"""
    task = {"id": 4, "data": {"image": png_data_uri(48, 40, seed=4), "expression": "the thing"}}
    body = {
        "tasks": [task],
        "spec": parse_label_config(config).to_dict(),
        "context": None,
        "label_studio_url": None,
    }
    (prediction,) = run_job(body)
    assert "error" not in prediction, prediction
    expected = engines.get_gem_engine().model_version + engines.STAND_IN_SUFFIX + "+sam-sam2-custom"
    assert prediction["model_version"] == expected
