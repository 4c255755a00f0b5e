"""The promptable SAM engine on tiny random configurations of every family, its embedding cache, its
geometry, and where its weights come from (no download: folders written by the test, an offline hub)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from workers.models.sam import FAMILIES, Prompt, SamConfig, SamEngine, family, tiny_config  # noqa: E402
from workers.models.sam.engine import Embedding, EmbeddingLRU, load_checkpoint, save_checkpoint  # noqa: E402


def tiny_engine(name: str, *, cache_bytes: int = 2**24, seed: int = 0) -> SamEngine:
    torch.manual_seed(seed)
    model = family(name).model_cls()(tiny_config(name, 64))
    return SamEngine(SamConfig(model=None, family=name, device="cpu", cache_bytes=cache_bytes), model=model)


def picture(width: int = 70, height: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_the_installed_transformers_has_every_family() -> None:
    import transformers

    for f in FAMILIES.values():
        assert hasattr(transformers, f.model_class) and hasattr(transformers, f.config_class)
    assert set(FAMILIES) == {"sam3_tracker", "sam2", "sam", "sam_hq", "edgetam"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_answers_points_boxes_and_negative_clicks(name: str) -> None:
    engine = tiny_engine(name)
    image = picture()
    prompts = [
        Prompt([(10.5, 20.5)], [1]),
        Prompt([(10.5, 20.5), (40.5, 30.5)], [1, 0]),
        Prompt(box=(5.0, 5.0, 40.0, 30.0)),
        Prompt([(20.5, 15.5)], [1], box=(5.0, 5.0, 40.0, 30.0)),
    ]
    out = engine.segment(image, prompts)
    assert len(out) == 4
    for masks, scores in out:
        assert masks.shape == (3, 50, 70) and masks.dtype == bool
        assert scores.shape == (3,) and np.all(np.diff(scores) <= 0)  # best first
    ((single, score),) = engine.segment(image, prompts[:1], multimask=False)
    assert single.shape == (1, 50, 70) and score.shape == (1,)


def test_a_repeated_click_reuses_the_image_embedding() -> None:
    engine = tiny_engine("sam2")
    image = picture()
    engine.segment(image, [Prompt([(10.5, 10.5)], [1])])
    assert (engine.cache.hits, engine.cache.misses, len(engine.cache)) == (0, 1, 1)
    engine.segment(image.copy(), [Prompt([(30.5, 20.5)], [1])])  # the same pixels, another object
    assert (engine.cache.hits, engine.cache.misses) == (1, 1)
    engine.segment(picture(seed=1), [Prompt([(30.5, 20.5)], [1])])
    assert (engine.cache.misses, len(engine.cache)) == (2, 2)


def test_the_embedding_cache_is_bounded_by_bytes() -> None:
    def emb(n: int) -> Embedding:
        return Embedding(torch.zeros(n, dtype=torch.uint8), 1, 1, n)

    cache = EmbeddingLRU(100)
    cache.put("a", emb(40))
    cache.put("b", emb(40))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", emb(40))  # 120 bytes: b, the least recently used, goes
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 80
    cache.put("huge", emb(101))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 2
    engine = tiny_engine("sam", cache_bytes=0)
    engine.segment(picture(), [Prompt([(5.5, 5.5)], [1])])
    assert len(engine.cache) == 0


@pytest.mark.parametrize("name", ["sam", "sam2"])
def test_masks_come_back_where_the_network_saw_them(name: str) -> None:
    """Logits positive on the left half of the resized image are the left half of the original, for the
    padded (SAM) and the squashed (SAM 2) input geometry."""
    engine = tiny_engine(name)
    width, height = 100, 50
    rw, rh = engine._resized(width, height)
    m = 32
    logits = torch.full((1, 1, m, m), -5.0)
    logits[..., : round(rh / engine.input_size * m), : round(rw / engine.input_size * m / 2)] = 5.0
    mask = engine.upsample(logits, width, height)[0, 0].numpy()
    assert mask.shape == (50, 100)
    assert mask[:, :48].mean() > 0.95 and mask[:, 52:].mean() < 0.05
    xy = engine._to_input(np.array([[width, height]], dtype=np.float32), width, height)
    assert np.allclose(xy, [[rw, rh]])


def test_prompts_are_checked() -> None:
    with pytest.raises(UserError, match="at least one point or a box"):
        Prompt()
    with pytest.raises(UserError, match="labels must be 1"):
        Prompt([(1.0, 1.0)], [2])
    with pytest.raises(UserError, match="points but"):
        Prompt([(1.0, 1.0)], [])


def test_checkpoint_file_round_trip(tmp_path) -> None:
    engine = tiny_engine("sam")
    with torch.no_grad():  # the file stores float16: compare with the same weights rounded
        for p in engine.model.parameters():
            p.copy_(p.half().float())
    path = tmp_path / "little_sam.pt"
    save_checkpoint(path, engine.model, "sam", {"steps": 3})
    model, name = load_checkpoint(path)
    assert name == "sam"
    loaded = SamEngine(SamConfig(model=str(path), device="cpu"))
    assert loaded.family.name == "sam" and loaded.model_version == "sam-little_sam"
    image = picture()
    prompt = [Prompt([(20.5, 20.5)], [1], box=(2.0, 2.0, 60.0, 45.0))]
    ((a, sa),) = engine.segment(image, prompt)
    ((b, sb),) = loaded.segment(image, prompt)
    assert np.allclose(sa, sb, atol=1e-6) and (a == b).all()
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a SAM checkpoint"):
        SamEngine(SamConfig(model=str(tmp_path / "other.pt"), device="cpu"))


def test_a_local_folder_loads_and_names_its_family(tmp_path) -> None:
    engine = tiny_engine("sam_hq")
    folder = tmp_path / "my-hq-model"
    engine.model.save_pretrained(folder)
    config = SamConfig(model=str(folder), device="cpu")
    assert config.resolved_family() == "sam_hq"  # from config.json, not from the name
    loaded = SamEngine(config)
    assert loaded.family.name == "sam_hq" and loaded.model_version == "sam-my-hq-model"
    image = picture()
    prompt = [Prompt([(20.5, 20.5)], [1])]
    assert np.allclose(engine.segment(image, prompt)[0][1], loaded.segment(image, prompt)[0][1], atol=1e-5)


def test_a_hub_id_is_found_in_the_weights_folder(tmp_path) -> None:
    engine = tiny_engine("sam2")
    engine.model.save_pretrained(tmp_path / "facebook" / "sam2.1-hiera-tiny")
    config = SamConfig(
        model="facebook/sam2.1-hiera-tiny", weights_dir=str(tmp_path), offline=True, device="cpu"
    )
    loaded = SamEngine(config)
    assert loaded.family.name == "sam2" and loaded.model_version == "sam-sam2.1-hiera-tiny"


def test_missing_weights_say_what_to_put_where(tmp_path) -> None:
    config = SamConfig(model="facebook/sam3", weights_dir=str(tmp_path), offline=True, device="cpu")
    with pytest.raises(UserError) as err:
        SamEngine(config)
    text = str(err.value)
    assert "GROUNDLABEL_SAM_MODEL" in text and "hf download facebook/sam3" in text
    assert "GROUNDLABEL_WEIGHTS_DIR" in text and "HF_TOKEN" in text  # SAM 3 is gated
    with pytest.raises(UserError, match="neither a local folder nor a hub id"):
        SamEngine(SamConfig(model="no-such-thing", family="sam", offline=True, device="cpu"))
    with pytest.raises(UserError, match="which SAM family"):
        SamConfig(model="acme/segmenter").resolved_family()
    with pytest.raises(UserError, match="unknown SAM family"):
        family("sam4")


def test_family_names_and_guesses() -> None:
    from workers.models.sam.families import guess_family

    assert family("sam2.1").name == "sam2" and family("SAM-HQ").name == "sam_hq"
    assert family("sam3").name == "sam3_tracker"
    assert guess_family("facebook/sam2.1-hiera-large").name == "sam2"
    assert guess_family("syscv-community/sam-hq-vit-base").name == "sam_hq"
    assert guess_family("yonigozlan/EdgeTAM-hf").name == "edgetam"
    assert guess_family("facebook/sam-vit-huge").name == "sam"
    assert guess_family("facebook/sam3").name == "sam3_tracker"
