"""The SAM 3 engine on tiny random models: the same instances as transformers' own post-processing,
batching that changes nothing, synonyms merged, the score floor, the tokenizer, where weights come from."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402
from sam3_tiny import save_tiny_sam3, tiny_sam3_engine  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from workers.models.sam3 import Sam3Config, Sam3Engine  # noqa: E402
from workers.models.sam3.engine import merge_duplicates  # noqa: E402
from workers.models.sam3.processor import clip_tokenizer  # noqa: E402


def image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine():
    return tiny_sam3_engine(merge_iou=1.0)


def test_instances_match_transformers_post_processing(engine):
    im = image(70, 50, seed=1)
    processor, model = engine.processor, engine.model
    with torch.no_grad():
        inputs = processor(images=im, text="yellow school bus", return_tensors="pt")
        outputs = model(**inputs)
    (reference,) = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, mask_threshold=0.5, target_sizes=[(50, 70)]
    )
    expected = sorted(
        (
            (float(s), m.numpy().astype(bool), b.tolist())
            for s, m, b in zip(reference["scores"], reference["masks"], reference["boxes"], strict=True)
            if m.any()
        ),
        key=lambda t: -t[0],
    )
    (found,) = engine.instances([im], ["yellow school bus"])
    assert len(found) == len(expected) > 0
    for inst, (score, mask, box) in zip(found, expected, strict=True):
        assert inst.score == pytest.approx(score, abs=1e-5)
        assert inst.mask.shape == (50, 70) and inst.mask.dtype == bool
        assert np.mean(inst.mask != mask) < 1e-3
        clipped = [min(max(v, 0.0), lim) for v, lim in zip(box, (70, 50, 70, 50), strict=True)]
        assert inst.box == pytest.approx(clipped, abs=1e-3)
        assert inst.prompt == "yellow school bus"


def test_batching_and_pair_chunks_change_nothing(engine):
    images = [image(64, 48, 2), image(30, 90, 3), image(81, 81, 4)]
    prompts = ["cat", "red car", "person"]
    one_by_one = tiny_sam3_engine(merge_iou=1.0, batch_size=1, pair_batch=1).instances(images, prompts)
    batched = tiny_sam3_engine(merge_iou=1.0, batch_size=3, pair_batch=5).instances(images, prompts)
    for a_list, b_list, im in zip(one_by_one, batched, images, strict=True):
        assert len(a_list) == len(b_list)
        assert [a.prompt for a in a_list] == [b.prompt for b in b_list]
        for a, b in zip(a_list, b_list, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)
            assert a.mask.shape == (im.height, im.width)
            assert np.mean(a.mask != b.mask) < 1e-3
    scores = [i.score for i in batched[0]]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)


def test_synonyms_of_one_label_are_merged_and_other_labels_are_not():
    engine = tiny_sam3_engine()  # merge_iou 0.5
    im = image(60, 40, 5)
    (single,) = engine.instances([im], ["dog"])
    (same_group,) = engine.instances([im], ["dog", "dog"], groups=["Dog", "Dog"])
    (two_groups,) = engine.instances([im], ["dog", "dog"], groups=["Dog", "Puppy"])
    assert len(single) >= 2
    assert [i.score for i in same_group] == pytest.approx([i.score for i in single], abs=1e-5)
    assert len(two_groups) == 2 * len(single)
    assert {i.group for i in two_groups} == {"Dog", "Puppy"}


def test_the_score_floor_drops_weaker_instances(engine):
    im = image(50, 50, 6)
    (every,) = engine.instances([im], ["cat", "dog"])
    cut = float(np.median([i.score for i in every]))
    (kept,) = engine.instances([im], ["cat", "dog"], min_score=cut)
    assert kept and len(kept) < len(every) and all(i.score >= cut for i in kept)
    assert engine.instances([im], ["cat"], min_score=1.01) == [[]]


def test_merge_duplicates_keeps_the_best_of_overlapping_masks():
    a = np.zeros((10, 10), bool)
    a[:5] = True
    b = a.copy()
    b[5] = True  # IoU(a, b) = 5/6
    c = ~a  # disjoint from a
    masks = torch.from_numpy(np.stack([a, b, c, a]).reshape(4, -1))
    keep = merge_duplicates(masks, torch.tensor([0, 0, 0, 1]), iou=0.8)
    assert keep.tolist() == [True, False, True, True]  # the last is another label's
    assert merge_duplicates(masks, torch.tensor([0, 0, 0, 0]), iou=0.9).tolist() == [True, True, True, False]


def test_text_features_are_cached_per_prompt(engine):
    engine.text_cache.clear()
    im = image(40, 40, 7)
    engine.instances([im], ["zebra", "Zebra ", "horse"])
    assert engine.text_cache.misses == 2 and len(engine.text_cache) == 2
    engine.instances([im], ["horse"])
    assert engine.text_cache.hits >= 1 and engine.text_cache.misses == 2


def test_bad_inputs_are_refused_with_the_reason(engine):
    with pytest.raises(UserError, match="sequence of strings"):
        engine.instances([image(10, 10, 0)], "cat")
    with pytest.raises(UserError, match="groups has 1 entries for 2 prompts"):
        engine.instances([image(10, 10, 0)], ["cat", "dog"], groups=["a"])
    with pytest.raises(UserError, match="non-empty"):
        engine.instances([image(10, 10, 0)], [" "])
    with pytest.raises(UserError, match="merge_iou"):
        Sam3Config(merge_iou=0.0).validate()


def test_the_tokenizer_is_clips():
    from open_clip.tokenizer import SimpleTokenizer

    tok = clip_tokenizer()
    reference = SimpleTokenizer()
    for text in ("yellow school bus", "The red car's door!", "person"):
        ids = tok(text)["input_ids"]
        assert ids == [49406, *reference.encode(text), 49407]
    assert len(tok) == 49408


def test_weights_from_a_local_folder_and_from_the_weights_folder(tmp_path):
    folder = save_tiny_sam3(tmp_path / "sam3-shapes")
    engine = Sam3Engine(Sam3Config(model=str(folder), device="cpu"))
    assert engine.model_version == "sam3-shapes"
    assert engine.processor.image_processor.size["height"] == 224
    reference = tiny_sam3_engine()
    im = image(40, 30, 8)
    assert [i.score for i in engine.instances([im], ["cat"])[0]] == pytest.approx(
        [i.score for i in reference.instances([im], ["cat"])[0]], abs=1e-6
    )
    weights_dir = tmp_path / "weights"
    (weights_dir / "facebook").mkdir(parents=True)
    folder.rename(weights_dir / "facebook" / "sam3")
    config = Sam3Config(model="facebook/sam3", weights_dir=str(weights_dir), offline=True, device="cpu")
    hub = Sam3Engine(config)
    assert hub.model_version == "sam3"


def test_missing_weights_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError, match="GROUNDLABEL_SAM3_MODEL"):
        Sam3Engine(Sam3Config(model=str(tmp_path / "nowhere"), device="cpu"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        Sam3Engine(Sam3Config(model=str(tmp_path / "empty"), device="cpu"))
    with pytest.raises(UserError) as err:
        Sam3Engine(Sam3Config(model="facebook/sam3", weights_dir=str(tmp_path), offline=True, device="cpu"))
    text = str(err.value)
    assert "HF_TOKEN" in text and "GROUNDLABEL_WEIGHTS_DIR" in text and "facebook/sam3" in text


def test_bf16_autocast_gives_the_same_instances():
    """The GPU default (bf16 autocast) exercised on the CPU: same instances, nearly the same masks."""
    im = image(64, 48, 9)
    (fp32,) = tiny_sam3_engine(merge_iou=1.0).instances([im], ["cat", "dog"])
    (bf16,) = tiny_sam3_engine(merge_iou=1.0, precision="bf16").instances([im], ["cat", "dog"])
    assert len(fp32) == len(bf16) > 0
    for a, b in zip(fp32, bf16, strict=True):
        assert a.score == pytest.approx(b.score, abs=0.01)
        assert np.mean(a.mask != b.mask) < 0.05
