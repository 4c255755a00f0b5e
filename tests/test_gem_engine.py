"""GemEngine: calibrated heatmaps, prompts and their cache, method variants (random-weight tiny CLIP)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from PIL import Image  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from workers.models.gem import GemConfig, GemEngine  # noqa: E402
from workers.models.gem.engine import calibrate_softmax, minmax_normalize, preprocess  # noqa: E402
from workers.models.gem.prompts import IMAGENET_TEMPLATES  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_clip(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(layers=3, width=48, head_width=12, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()


def engine(seed: int = 0, **kw) -> GemEngine:
    cfg = GemConfig(
        model_name="tiny", pretrained=None, image_size=kw.pop("image_size", 48), device="cpu", **kw
    )
    return GemEngine(cfg, clip_model=tiny_clip(seed))


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [random_image(37, 53, 1), random_image(64, 30, 2), random_image(20, 20, 3).convert("L")]


def test_heatmaps_shapes_range_and_original_size():
    eng = engine()
    maps = eng.heatmaps(IMAGES, ["cat", "dog", "traffic light"])
    assert len(maps) == 3
    for im, m in zip(IMAGES, maps, strict=True):
        assert m.dtype == np.float32
        assert m.shape == (3, im.height, im.width)
        assert np.isfinite(m).all()
        assert m.min() >= 0.0 and m.max() <= 1.0
        # Prompts and background words share one softmax: the prompts' scores sum to at most 1.
        assert m.sum(axis=0).max() <= 1.0 + 1e-5
    assert eng.model_version == "gem-tiny-custom-48"


def test_batching_does_not_change_results():
    eng1 = engine(batch_size=1)
    eng3 = engine(batch_size=3)
    for a, b in zip(
        eng1.heatmaps(IMAGES, ["cat", "dog"]), eng3.heatmaps(IMAGES, ["cat", "dog"]), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_empty_inputs_and_bad_inputs():
    eng = engine()
    assert eng.heatmaps([], ["cat"]) == []
    empty = eng.heatmaps(IMAGES[:1], [])
    assert empty[0].shape == (0, 37, 53)
    with pytest.raises(UserError, match="prompt 1"):
        eng.heatmaps(IMAGES[:1], ["cat", "  "])
    with pytest.raises(UserError, match="not one string"):
        eng.heatmaps(IMAGES[:1], "cat")
    with pytest.raises(UserError, match="PIL"):
        eng.heatmaps([np.zeros((4, 4, 3))], ["cat"])
    with pytest.raises(UserError, match="groups"):
        eng.heatmaps(IMAGES[:1], ["cat"], groups=[1, 2])


def test_duplicate_prompts_are_not_split():
    eng = engine()
    single = eng.heatmaps(IMAGES[:1], ["cat", "dog"])[0]
    dup = eng.heatmaps(IMAGES[:1], ["cat", "dog", "Cat "])[0]
    np.testing.assert_allclose(dup[:2], single, atol=1e-6)
    np.testing.assert_allclose(dup[2], dup[0], atol=1e-6)


def test_prompt_equal_to_background_word_is_not_double_counted():
    with_sky = engine(background_prompts=("background", "sky", "wall"))
    without_sky = engine(background_prompts=("background", "wall"))
    a = with_sky.heatmaps(IMAGES[:2], ["Sky", "cat"])
    b = without_sky.heatmaps(IMAGES[:2], ["Sky", "cat"])
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # ... while a background word that is not a prompt does change the scores.
    c = engine(background_prompts=("background", "wall", "floor")).heatmaps(IMAGES[:1], ["Sky", "cat"])
    assert np.abs(c[0] - b[0]).max() > 1e-4


def test_groups_share_the_label_probability():
    eng = engine()
    plain = eng.heatmaps(IMAGES[:1], ["car", "automobile", "dog"])[0]
    grouped = eng.heatmaps(IMAGES[:1], ["car", "automobile", "dog"], groups=["car", "car", "dog"])[0]
    np.testing.assert_allclose(grouped[0], plain[0] + plain[1], atol=1e-5)
    np.testing.assert_allclose(grouped[1], grouped[0], atol=1e-6)
    np.testing.assert_allclose(grouped[2], plain[2], atol=1e-6)


def test_no_background_prompts_uses_null_class():
    eng = engine(background_prompts=())
    m = eng.heatmaps(IMAGES[:1], ["cat"])[0]
    assert m.min() >= 0 and m.max() <= 1
    assert m.max() < 1.0 - 1e-3, "a single prompt must not be certain everywhere"
    lower = engine(background_prompts=(), null_cosine=-1.0).heatmaps(IMAGES[:1], ["cat"])[0]
    assert lower.mean() > m.mean(), "a lower null cosine must raise the prompt's scores"


def test_minmax_calibration_spans_zero_to_one():
    eng = engine(calibration="minmax")
    for m in eng.heatmaps(IMAGES[:2], ["cat", "dog"]):
        for p in m:
            assert p.min() == pytest.approx(0.0, abs=1e-6)
            assert p.max() == pytest.approx(1.0, abs=1e-6)
    assert eng.model_version.endswith("-minmax")


def test_calibrate_softmax_and_minmax_functions():
    cos = torch.tensor([[0.3, 0.1], [0.2, 0.25], [0.1, 0.2]])  # 2 prompts + 1 background word, 2 pixels
    probs = calibrate_softmax(cos, 2, 100.0)
    expected = torch.softmax(cos * 100.0, dim=0)[:2]
    torch.testing.assert_close(probs, expected)
    null = calibrate_softmax(cos[:2], 2, 10.0, null_cosine=0.2)
    torch.testing.assert_close(
        null, torch.softmax(torch.cat([cos[:2], torch.full((1, 2), 0.2)]) * 10, dim=0)[:2]
    )
    with pytest.raises(ValueError):
        calibrate_softmax(cos[:2], 2, 100.0)
    mm = minmax_normalize(torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]]))
    torch.testing.assert_close(mm[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.all(mm[1] == 0)


def test_text_embedding_cache_hits():
    eng = engine(text_cache_size=16)
    eng.heatmaps(IMAGES[:1], ["cat", "dog"])
    misses = eng.text_cache.misses
    hits = eng.text_cache.hits
    emb1 = eng.text_embeddings(["cat"]).clone()
    assert eng.text_cache.misses == misses
    assert eng.text_cache.hits == hits + 1
    eng.heatmaps(IMAGES[:1], ["cat", "dog"])
    assert eng.text_cache.misses == misses, "repeated labels must not be encoded again"
    # The cached value equals a fresh encoding of the template sentence.
    tokens = eng.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        fresh = torch.nn.functional.normalize(eng.model.encode_text(tokens).float(), dim=-1)
    torch.testing.assert_close(emb1, fresh, atol=1e-5, rtol=1e-5)
    # LRU eviction keeps the cache bounded.
    eng.text_embeddings([f"thing {i}" for i in range(40)])
    assert len(eng.text_cache) == 16


def test_ensemble_templates():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    eng = engine(templates="ensemble")
    emb = eng.text_embeddings(["cat"])
    sentences = [t.format("cat") for t in IMAGENET_TEMPLATES]
    with torch.no_grad():
        each = torch.nn.functional.normalize(eng.model.encode_text(eng.tokenizer(sentences)).float(), dim=-1)
    expected = torch.nn.functional.normalize(each.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    assert eng.model_version.endswith("-ensemble")


@pytest.mark.parametrize("method", ["maskclip", "original"])
def test_method_variants(method):
    eng = engine(method=method)
    gem = engine()
    pixels = preprocess(IMAGES[:1], (48, 48))
    feats = eng.patch_features(pixels)
    with torch.no_grad():
        tokens = eng.tower.dense_features(pixels, method)
    torch.testing.assert_close(feats.reshape(1, 36, -1), torch.nn.functional.normalize(tokens[:, 1:], dim=-1))
    assert not torch.allclose(feats, gem.patch_features(pixels), atol=1e-3)
    m = eng.heatmaps(IMAGES[:1], ["cat"])[0]
    assert m.shape == (1, 37, 53) and m.min() >= 0 and m.max() <= 1
    assert eng.model_version == f"gem-tiny-custom-{method}-48"


def test_image_and_text_forwards_run_in_inference_mode():
    eng = engine()
    feats = eng.patch_features(preprocess(IMAGES[:1], (48, 48)))
    assert feats.is_inference() and not torch.is_inference_mode_enabled()
    assert eng._encode_sentences(["a photo of a cat."]).is_inference()
    maps = eng.heatmaps(IMAGES[:1], ["cat"])  # the maps are computed from inference tensors
    assert maps[0].shape == (1, 37, 53)


def test_preprocess_matches_gem_recipe():
    im = random_image(10, 30, 4)
    x = preprocess([im], (16, 8))
    assert x.shape == (1, 3, 16, 8)
    resized = np.asarray(im.resize((8, 16), Image.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    np.testing.assert_allclose(x[0].permute(1, 2, 0).numpy(), (resized - mean) / std, atol=1e-5)


def test_cosine_maps_at_token_resolution():
    eng = engine(image_size=(40, 56))
    cos = eng.cosine_maps(IMAGES[:2], ["cat", "dog"])
    assert [c.shape for c in cos] == [(2, 5, 7), (2, 5, 7)]
    assert np.abs(cos[0]).max() <= 1.0 + 1e-5


def test_config_validation():
    with pytest.raises(UserError, match="method"):
        GemConfig(method="surgery")
    with pytest.raises(UserError, match="templates"):
        GemConfig(templates="many")
    with pytest.raises(UserError, match="image_size"):
        GemConfig(image_size=(448, 448, 3))
    with pytest.raises(UserError, match="background_prompts"):
        GemConfig(background_prompts="sky")
    assert GemConfig(model_name="ViT-B/16").arch == "ViT-B-16"
    assert GemConfig(image_size=(336, 448)).input_size == (336, 448)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"GROUNDLABEL_GEM_DEPTH": "3"},
        {"GROUNDLABEL_GEM_TEMPERATURE": "20.0", "GROUNDLABEL_GEM_REFINE": "pamr"},
        {"GROUNDLABEL_GEM_TEMPERATURE": "adaptive", "GROUNDLABEL_GEM_TEMPLATES": "ensemble"},
        {
            "GROUNDLABEL_GEM_METHOD": "naclip",
            "GROUNDLABEL_GEM_DEPTH": "3",
            "GROUNDLABEL_GEM_IMAGE_SIZE": "96",
        },
    ],
)
def test_backend_model_version_matches_the_engine(tiny_gem_env: dict, extra: dict) -> None:
    """The backend names predictions without loading a model; the name must be the worker engine's."""
    from groundlabel.settings import Settings
    from workers.engines import announced_version, gem_config
    from workers.models.gem import GemEngine

    env = {**tiny_gem_env, **extra}
    config = gem_config(Settings.from_env(env).engines, register=True)
    assert GemEngine(config).model_version == announced_version(Settings.from_env(env))


def test_gem_temperature_option_is_validated() -> None:
    from groundlabel.settings import Settings, parse_temperature
    from workers.engines import gem_config

    assert parse_temperature("adaptive") is None and parse_temperature("12.5") == 12.5
    assert gem_config(Settings.from_env({"GROUNDLABEL_GEM_TEMPERATURE": "40"}).engines).ss_attn_temp == 40.0
    with pytest.raises(UserError, match="GROUNDLABEL_GEM_TEMPERATURE"):
        gem_config(Settings.from_env({"GROUNDLABEL_GEM_TEMPERATURE": "-1"}).engines)
    with pytest.raises(UserError, match="GROUNDLABEL_GEM_DEPTH"):
        gem_config(Settings.from_env({"GROUNDLABEL_GEM_DEPTH": "seven"}).engines)


@pytest.mark.parametrize(("value", "packing"), [("false", False), ("true", True)])
def test_workers_gem_engine_follows_the_pack_weights_setting(tiny_gem_env, value, packing):
    from groundlabel.settings import Settings
    from workers import engines
    from workers.models.gem import kernels

    # packed weights are kept by the packed path, forced here (auto may take another on this machine)
    path = "packed" if packing else "auto"
    env = {**tiny_gem_env, "GROUNDLABEL_GEM_PACK_WEIGHTS": value, "GROUNDLABEL_GEM_CPU_KERNELS": path}
    engines.configure(Settings.from_env(env))
    try:
        kernels.set_weight_packing(not packing)
        engine = engines.get_gem_engine()
        assert kernels._packing is packing
        maps = engine.heatmaps([Image.new("RGB", (40, 32), (200, 30, 30))], ["red"])
        assert maps[0].shape[-2:] == (32, 40)
        assert bool(kernels._packed) is (packing and kernels.onednn_usable())
    finally:
        engines.configure(Settings())
        kernels.set_weight_packing(True)
