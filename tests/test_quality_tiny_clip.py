"""Offline grounding quality: GEM must localise shapes better than CLIP's own patch tokens.

The tiny CLIP under tests/assets was trained contrastively on generated (scene, caption) pairs with
``groundlabel train-tiny-clip`` and never saw a mask. The same evaluation with more scenes and more
variants is ``benchmarks/quality.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CHECKPOINT = Path(__file__).parent / "assets" / "tiny_clip.pt"
SCENES = 100


@pytest.fixture(scope="module")
def results() -> dict:
    from workers.evaluation.quality import evaluate_tiny_clip, format_results

    out = evaluate_tiny_clip(str(CHECKPOINT), scenes=SCENES, threads=1)
    print(format_results(out))
    return {r.name: r for r in out}


def test_checkpoint_is_small_and_trained() -> None:
    import torch
    import torch.nn.functional as F

    from workers.evaluation.scenes import make_scenes
    from workers.evaluation.tiny_clip import image_tensor, load_tiny_clip

    assert CHECKPOINT.stat().st_size < 4 * 2**20
    model, tokenizer, cfg = load_tiny_clip(CHECKPOINT)
    scenes = make_scenes(64, seed=12345, size=cfg.image_size)  # held out: training uses seed 0
    with torch.no_grad():
        img = F.normalize(model.encode_image(image_tensor([s.image for s in scenes], cfg.image_size)), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([s.caption for s in scenes])), dim=-1)
    hits = (img @ txt.T).argmax(1).numpy() == np.arange(len(scenes))
    assert hits.mean() > 0.15  # caption retrieval among 64 held-out scenes; chance is 1/64


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the tiny CLIP that trains on 2 CPU cores in minutes learns colours and backgrounds but not shape "
    "words (zero-shot shape accuracy ~24%, chance 17%), so no dense method localises shapes yet; see "
    "docs/quality.md. Remove this mark once a better-trained checkpoint is kept under tests/assets.",
)
def test_gem_beats_the_original_path(results: dict) -> None:
    gem, original = results["gem"], results["original"]
    # threshold-free protocol (background ignored, argmax over the six shapes)
    assert gem.fg["mIoU"] > original.fg["mIoU"] + 10.0
    # background as a class, each method at its best threshold
    assert gem.bg_best["mIoU"] > original.bg_best["mIoU"] + 5.0


@pytest.mark.slow
def test_every_method_reports_all_classes(results: dict) -> None:
    from workers.evaluation.scenes import SHAPES

    for r in results.values():
        assert set(r.fg["per_class"]) == set(SHAPES)
        assert r.scenes == SCENES and 0.0 <= r.fg["mIoU"] <= 100.0
        assert 0.1 <= r.best_threshold <= 0.9
