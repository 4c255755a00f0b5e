"""EdgeTAM's RepViT folded for inference: the same embeddings, the model itself untouched, folded again when
its weights change, and left alone for training and for the families without such a backbone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from workers.models.sam import FAMILIES, SamConfig, SamEngine, family, tiny_config  # noqa: E402
from workers.models.sam.reparam import ReparamBackbone, reparameterisable  # noqa: E402


def edgetam_engine(seed: int = 0) -> SamEngine:
    torch.manual_seed(seed)
    model = family("edgetam").model_cls()(tiny_config("edgetam", 64))
    with torch.no_grad():  # BatchNorm statistics and affine terms away from their identity start
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return SamEngine(SamConfig(model=None, family="edgetam", device="cpu"), model=model)


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))


def unfolded_embedding(engine: SamEngine, image: Image.Image) -> list[torch.Tensor]:
    with torch.no_grad():
        return engine.model.get_image_embeddings(engine.preprocess(image))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_folded_backbone_gives_the_same_embeddings_with_fewer_modules() -> None:
    engine = edgetam_engine()
    assert engine.reparam.applies
    backbone = engine.model.vision_encoder.backbone.timm_model
    keys = set(engine.model.state_dict())
    image = picture()
    built = engine.reparam._folded  # folded when the engine was built, before any click
    copy = engine.reparam.folded(backbone)
    assert built is not None and copy is built
    ran = []
    # hooks on their first layers (transformers calls the timm model's forward itself, past its hooks)
    next(copy.children()).register_forward_hook(lambda *_: ran.append("folded"))
    next(backbone.children()).register_forward_hook(lambda *_: ran.append("original"))
    folded = engine.embed(image).tensors
    assert ran == ["folded"]  # the embedding ran the folded copy, not the model's own backbone
    for a, b in zip(folded, unfolded_embedding(engine, image), strict=True):
        assert rel(a, b) < 1e-5
    # the model keeps its own backbone and its published state dict; the copy has no BatchNorm left
    assert engine.model.vision_encoder.backbone.timm_model is backbone
    assert set(engine.model.state_dict()) == keys and any(".bn." in k for k in keys)
    count = sum(isinstance(m, torch.nn.BatchNorm2d) for m in copy.modules())
    assert count == 0 < sum(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert engine.reparam.folded(backbone) is copy  # kept while the weights are unchanged


def test_a_changed_weight_or_statistic_is_folded_again() -> None:
    engine = edgetam_engine()
    image = picture(1)
    backbone = engine.model.vision_encoder.backbone.timm_model
    first = engine.reparam.folded(backbone)
    conv = next(m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(1.5)  # in place: same tensor, new version
    assert engine.reparam.folded(backbone) is not first
    engine.cache.clear()
    for a, b in zip(engine.embed(image).tensors, unfolded_embedding(engine, image), strict=True):
        assert rel(a, b) < 1e-5
    bn = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    second = engine.reparam.folded(backbone)
    bn.running_var = bn.running_var * 2  # another tensor
    assert engine.reparam.folded(backbone) is not second


def test_training_and_gradients_see_the_original_backbone() -> None:
    engine = edgetam_engine()
    holder = engine.model.vision_encoder.backbone
    original = holder.timm_model
    with torch.no_grad(), engine.reparam.active():
        assert holder.timm_model is not original  # inference: the folded copy
    assert holder.timm_model is original
    with torch.enable_grad(), engine.reparam.active():
        assert holder.timm_model is original
    engine.model.train()
    with torch.no_grad(), engine.reparam.active():
        assert holder.timm_model is original
    engine.model.eval()
    with pytest.raises(RuntimeError), torch.no_grad(), engine.reparam.active():
        raise RuntimeError("a failed forward")
    assert holder.timm_model is original  # put back on errors too


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"edgetam"}))
def test_other_families_have_nothing_to_fold(name: str) -> None:
    model = family(name).model_cls()(tiny_config(name, 64))
    assert not ReparamBackbone(model).applies
    assert not reparameterisable(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
