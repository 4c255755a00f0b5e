"""Offline quality of the promptable SAM: the tiny SAM under tests/assets answers clicks on held-out
generated scenes and sharpens GEM's maps.

``tests/assets/tiny_sam.pt`` was trained with ``groundlabel train-tiny-sam`` on scenes of the generator
that the tiny CLIP's quality test uses, from other seeds than the held-out scenes (its last stages also on
the parts of GEM's label maps of such scenes). The same evaluation with more scenes is
``benchmarks/quality.py --sam`` (numbers in docs/sam.md). The tests hold, with margins below the measured
ones: a click answered by this SAM beats GEM's connected component, and GEM + SAM beats GEM + PAMR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ASSETS = Path(__file__).parent / "assets"
CLIP, SAM = str(ASSETS / "tiny_clip.pt"), str(ASSETS / "tiny_sam.pt")
SCENES = 80


def test_tiny_sam_is_small_and_answers_clicks() -> None:
    from workers.evaluation.sam_quality import object_clicks, tiny_sam
    from workers.evaluation.scenes import make_scenes
    from workers.models.sam import Prompt
    from workers.models.sam.refine import mask_iou

    assert Path(SAM).stat().st_size < 5 * 2**20
    sam = tiny_sam(SAM)
    assert sam.family.name == "sam" and sam.model_version == "sam-tiny_sam"
    ious = []
    for scene in make_scenes(15, 12345, 48):  # held out: training draws from seed 1
        for mask, _, (x, y) in object_clicks(scene):
            ((candidates, _),) = sam.segment(scene.image, [Prompt([(x, y)], [1])])
            ious.append(mask_iou(candidates[0], mask))
    assert np.mean(ious) > 0.4  # 0.64 measured here, 0.63 on 150 scenes; a random model gives about 0.05


def test_tiny_sam_answers_boxes_and_several_points_with_its_single_mask() -> None:
    """A box, or a click with a negative one, gets SAM's single-mask answer (``multimask=False``), which
    the last training stage (``--single-mask``) trained."""
    import cv2

    from workers.evaluation.sam_quality import object_clicks, tiny_sam
    from workers.evaluation.scenes import make_scenes
    from workers.models.sam import Prompt
    from workers.models.sam.refine import mask_iou

    sam = tiny_sam(SAM)
    boxes, pairs = [], []
    for scene in make_scenes(15, 12345, 48):  # held out
        background = np.pad((scene.labels == 0).astype(np.uint8), 1)
        far = cv2.distanceTransform(background, cv2.DIST_L2, 3)[1:-1, 1:-1]
        row, col = np.unravel_index(int(np.argmax(far)), far.shape)  # the background's deepest point
        for mask, _, (x, y) in object_clicks(scene):
            rows, cols = np.nonzero(mask)
            box = Prompt(
                box=(float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
            )
            pair = Prompt([(x, y), (col + 0.5, row + 0.5)], [1, 0])
            ((from_box, _),), ((from_pair, _),) = (
                sam.segment(scene.image, [p], multimask=False) for p in (box, pair)
            )
            boxes.append(mask_iou(from_box[0], mask))
            pairs.append(mask_iou(from_pair[0], mask))
    # 0.66 and 0.62 measured here (0.69 and 0.58 on 40 scenes); before that stage, about 0.06 for both
    assert np.mean(boxes) > 0.5 and np.mean(pairs) > 0.45, (np.mean(boxes), np.mean(pairs))


def test_training_the_single_mask_answer_leaves_the_three_mask_answers(tmp_path: Path) -> None:
    from groundlabel.errors import UserError
    from workers.models.sam.engine import load_checkpoint
    from workers.models.sam.tiny import single_mask_parameters, train_tiny_sam

    with pytest.raises(UserError, match="trained checkpoint"):
        train_tiny_sam(steps=1, single_mask=True, log_every=0)
    before, _ = load_checkpoint(SAM)
    model, summary = train_tiny_sam(steps=2, batch_size=2, lr=1e-2, seed=9, threads=1, init=SAM,
                                    single_mask=True, log_every=0, out=tmp_path / "single.pt")  # fmt: skip
    assert summary["single_mask"] is True
    trained = {id(p) for group in single_mask_parameters(model) for p in group}
    names = {name for name, p in model.named_parameters() if id(p) in trained}
    old, new = before.state_dict(), model.state_dict()
    assert names and all(torch.equal(new[k], old[k]) for k in new if k not in names)  # everything else frozen
    head, bias = (
        "mask_decoder.iou_prediction_head.proj_out.weight",
        "mask_decoder.iou_prediction_head.proj_out.bias",
    )
    assert not torch.equal(
        new[head][0], old[head][0]
    )  # the single mask's predicted IoU trained, the others not
    assert torch.equal(new[head][1:], old[head][1:]) and torch.equal(new[bias][1:], old[bias][1:])
    hyper = "mask_decoder.output_hypernetworks_mlps.0.proj_out.weight"
    assert not torch.equal(new[hyper], old[hyper])


@pytest.fixture(scope="module")
def rows() -> dict:
    from workers.evaluation.quality import select_gem_temperature
    from workers.evaluation.sam_quality import evaluate_clicks, evaluate_refinement, format_rows

    torch.set_num_threads(1)
    temp, _ = select_gem_temperature(CLIP, scenes=60, target="colour", threads=1)
    out = evaluate_refinement(CLIP, SAM, scenes=SCENES, validation_scenes=60, temperature=temp)
    out += evaluate_clicks(CLIP, SAM, scenes=SCENES, temperature=temp)
    print(format_rows(out))
    return {r.name: r for r in out}


@pytest.mark.slow
def test_gem_with_sam_beats_gem_with_pamr(rows: dict) -> None:
    sam, pamr, gem = rows["gem +sam"], rows["gem +pamr"], rows["gem"]
    assert sam.miou > pamr.miou + 10  # +18.0 mIoU measured on 150 scenes, +19.7 on these 80
    assert sam.boundary_f > pamr.boundary_f + 10  # +18.0 boundary F on 150 scenes, +19.2 on these
    assert sam.miou > gem.miou + 15 and sam.boundary_f > gem.boundary_f + 15  # GEM alone: far below
    assert rows["gem +pamr +sam"].miou > pamr.miou + 5  # SAM sharpens PAMR's maps too


@pytest.mark.slow
def test_a_click_answered_by_sam_beats_gems_component(rows: dict) -> None:
    sam, component = rows["click → sam"], rows["click → gem component"]
    assert sam.miou > component.miou + 5  # +21.8 IoU measured on 150 scenes, +21.5 on these
    assert sam.boundary_f > component.boundary_f + 10  # +27.7 boundary F on 150, +27.2 on these


@pytest.mark.slow
def test_every_row_is_scored_on_the_same_objects(rows: dict) -> None:
    sam, component = rows["click → sam"], rows["click → gem component"]
    assert sam.extra["objects"] == component.extra["objects"] > SCENES
    for row in rows.values():
        assert row.scenes == SCENES and 0.0 <= row.miou <= 100.0 and 0.0 <= row.boundary_f <= 100.0


def test_training_continues_from_a_checkpoint(tmp_path: Path) -> None:
    from workers.models.sam.engine import load_checkpoint
    from workers.models.sam.tiny import train_tiny_sam

    first = tmp_path / "first.pt"
    train_tiny_sam(steps=2, batch_size=2, width=32, layers=2, image_size=48, patch_size=4, threads=1,
                   log_every=0, out=first)  # fmt: skip
    before, _ = load_checkpoint(first)
    model, summary = train_tiny_sam(steps=2, batch_size=2, seed=2, threads=1, init=first, log_every=0,
                                    gem_clip=CLIP, out=tmp_path / "second.pt")  # fmt: skip
    assert (summary["width"], summary["layers"], summary["patch_size"]) == (32, 2, 4)  # the first one's
    assert summary["init"] == "first.pt" and model.config.vision_config.image_size == 48
    assert summary["gem_fraction"] == 0.5  # half of each batch: GEM's parts
    pairs = list(zip(before.parameters(), model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in pairs)  # it trained ...
    assert max(float((a - b).abs().max()) for a, b in pairs) < 0.01  # ... on from the first's weights


def test_gem_parts_are_refine_prompts_with_an_object_or_an_empty_target() -> None:
    from workers.evaluation.scenes import instance_masks
    from workers.models.sam.tiny import GemParts

    parts = GemParts(CLIP)
    rng = np.random.default_rng(3)
    drawn = parts.draw(rng, 12) + parts.draw(rng, 12)  # GEM's label maps, then GEM + PAMR's
    assert len(drawn) == 24
    empty = sum(not target.any() for _, _, target in drawn)
    assert 0 < empty < 24  # parts on objects and parts on the background
    for scene, prompt, target in drawn:
        assert prompt.box is not None and prompt.labels and all(label == 1 for label in prompt.labels)
        if target.any():
            assert any(np.array_equal(target, m) for m in instance_masks(scene, min_area=1))
