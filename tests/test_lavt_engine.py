"""LavtEngine and LAVT tokenisation: 20-token limit, truncation meta, sizes, batching, checkpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from groundlabel.errors import UserError  # noqa: E402
from workers.models.lavt import LavtConfig, LavtEngine  # noqa: E402
from workers.models.lavt.model import LavtNetwork  # noqa: E402
from workers.models.lavt.synthetic import vocabulary, write_vocab  # noqa: E402
from workers.models.lavt.text import load_tokenizer, tokenize  # noqa: E402
from workers.models.lavt.weights import save_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    return write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


@pytest.fixture(scope="module")
def tokenizer(vocab_file):
    return load_tokenizer(str(vocab_file))


def tiny_config(vocab_file, **kw) -> LavtConfig:
    return LavtConfig(variant="tiny", image_size=64, tokenizer=str(vocab_file), device="cpu", **kw)


def test_tokenisation_pads_to_20_and_masks_real_tokens(tokenizer):
    ids, mask, metas = tokenize(tokenizer, ["the red circle", "Blue Square on the LEFT"])
    assert ids.shape == mask.shape == (2, 20)
    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    assert ids[0, :5].tolist() == [
        vocab["[CLS]"],
        vocab["the"],
        vocab["red"],
        vocab["circle"],
        vocab["[SEP]"],
    ]
    assert ids[0, 5:].eq(0).all() and mask[0].tolist() == [1] * 5 + [0] * 15
    assert ids[1, 2].item() == vocab["square"]  # lower-cased
    assert metas == [{"tokens": 5, "truncated": False}, {"tokens": 7, "truncated": False}]


def test_long_expressions_are_truncated_not_refused(tokenizer):
    text = " ".join(["the red circle on the left"] * 5)  # 30 words -> 32 tokens with [CLS]/[SEP]
    ids, mask, metas = tokenize(tokenizer, [text])
    assert metas[0] == {"tokens": 32, "truncated": True}
    assert mask.sum().item() == 20
    sep = vocabulary().index("[SEP]")
    assert ids[0, -1].item() != sep  # LAVT's cut: [SEP] falls off, as in the official code
    exactly = " ".join(["red"] * 18)  # 20 tokens: kept whole
    _, mask, metas = tokenize(tokenizer, [exactly])
    assert metas[0] == {"tokens": 20, "truncated": False} and mask.sum().item() == 20


def test_empty_expression_and_missing_tokenizer_are_user_errors(tokenizer, tmp_path):
    with pytest.raises(UserError, match="expression 1 is empty"):
        tokenize(tokenizer, ["red", "  "])
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere" / "vocab.txt"))
    with pytest.raises(UserError, match="neither vocab.txt"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="Hugging Face cache"):
        load_tokenizer("no-such-org/no-such-tokenizer")


def test_engine_probabilities_at_original_size(vocab_file):
    torch.manual_seed(0)
    engine = LavtEngine(config=tiny_config(vocab_file, batch_size=2))
    assert engine.model_version == "lavt-tiny-random"
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(64, 64), (120, 77), (31, 200)]
    ]
    long_text = " ".join(["the blue square on the right"] * 4)
    results = engine.probabilities(images, ["the red circle", "left green thing", long_text])
    assert [r[0].shape for r in results] == [(64, 64), (120, 77), (31, 200)]
    for prob, _ in results:
        assert prob.dtype == np.float32 and prob.min() >= 0.0 and prob.max() <= 1.0
    assert results[0][1] == {"tokens": 5, "truncated": False}
    assert results[2][1]["truncated"] is True and results[2][1]["tokens"] == 26
    # Batching does not change answers (batch 2 above vs one at a time).
    engine.config.batch_size = 1
    single = engine.probabilities(images, ["the red circle", "left green thing", long_text])
    for (a, _), (b, _) in zip(results, single, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        engine.probabilities(images[:2], ["red"])


def test_engine_probability_is_softmax_of_upsampled_logits(vocab_file, tokenizer):
    torch.manual_seed(1)
    engine = LavtEngine(config=tiny_config(vocab_file))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    prob, _ = engine.probabilities([image], ["the yellow triangle"])[0]
    from workers.models.lavt.engine import image_tensor

    ids, mask, _ = tokenize(tokenizer, ["the yellow triangle"])
    with torch.inference_mode():
        logits = engine.network(image_tensor(image, 64)[None], ids, mask)  # upsampled to 64 = original
    expected = torch.softmax(logits, 1)[0, 1].numpy()
    np.testing.assert_allclose(prob, expected, atol=1e-5)


def test_engine_loads_our_checkpoint_with_its_vocabulary(vocab_file, tmp_path):
    torch.manual_seed(2)
    net = LavtNetwork(tiny_config(vocab_file))
    path = tmp_path / "shapes-v1.pth"
    save_checkpoint(path, net, tokenizer_vocab=vocabulary())
    engine = LavtEngine(path, LavtConfig(device="cpu"))  # architecture and tokenizer come from the file
    assert engine.model_version == "lavt-tiny-shapes-v1"
    assert engine.config.variant == "tiny" and engine.config.image_size == 64
    reference = LavtEngine(config=tiny_config(vocab_file), network=net.eval())
    image = Image.fromarray(np.full((50, 70, 3), 128, dtype=np.uint8))
    a = engine.probabilities([image], ["the green square on the right"])[0][0]
    b = reference.probabilities([image], ["the green square on the right"])[0][0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_autocast_runs_on_cpu(vocab_file):
    torch.manual_seed(3)
    engine = LavtEngine(config=tiny_config(vocab_file, precision="bf16"))
    prob, _ = engine.probabilities([Image.new("RGB", (40, 30), (200, 10, 10))], ["red"])[0]
    assert prob.shape == (30, 40) and prob.dtype == np.float32 and np.isfinite(prob).all()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    big = tmp_path / "vocab.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(100)]))
    with pytest.raises(UserError, match="only 64"):
        LavtEngine(config=LavtConfig(variant="tiny", tokenizer=str(big), device="cpu"))
