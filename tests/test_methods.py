"""The selectable training-free methods (CLIP Surgery, SCLIP, ClearCLIP, NACLIP, CLIPSelf's dense path)
against plain references written here from their equations: per-head loops, explicit N×N softmax."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests.test_gem_modules import (  # noqa: E402
    ref_block,
    ref_embed,
    ref_head,
    ref_layer_norm,
    ref_ls,
    ref_mlp,
    ref_out_proj,
    ref_qkv,
    ref_softmax_rows,
    rel_diff,
    tiny_clip,
)
from workers.models.gem.modules import GemVisionTower, gaussian_prior  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def ref_heads_attention(block, h, pairs, prior=None):
    """``out_proj(Σ_pairs softmax(a bᵀ/√d + prior) v)`` per head, where pairs name q/k/v for a and b."""
    q, k, v = ref_qkv(block, h)
    named = {"q": q, "k": k, "v": v}
    nh = block.attn.num_heads
    d = h.shape[-1] // nh
    heads = []
    for i in range(nh):
        s = slice(i * d, (i + 1) * d)
        acc = torch.zeros_like(v[:, s])
        for a, b in pairs:
            logits = named[a][:, s] @ named[b][:, s].T / math.sqrt(d)
            if prior is not None:
                logits = logits + prior
            acc = acc + ref_softmax_rows(logits) @ v[:, s]
        heads.append(acc)
    return ref_out_proj(block, torch.cat(heads, dim=-1))


def ref_prior(gh: int, gw: int, std: float) -> torch.Tensor:
    n = gh * gw
    out = torch.zeros(n + 1, n + 1)
    for p in range(n):
        for r in range(n):
            dy, dx = p // gw - r // gw, p % gw - r % gw
            out[1 + p, 1 + r] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
    return out


def ref_until_last(visual, image):
    x = ref_embed(visual, image)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = ref_block(block, x)
    return x, blocks[-1]


def ref_method(visual, image, method: str, std: float = 5.0, depth: int = 3) -> torch.Tensor:
    if method == "clip_surgery":
        x = ref_embed(visual, image)
        blocks = list(visual.transformer.resblocks)
        first = len(blocks) - (depth - 1)
        for block in blocks[:first]:
            x = ref_block(block, x)
        x_sur = x.clone()
        for block in blocks[first:]:
            h = ref_layer_norm(block.ln_1, x)
            x_sur = x_sur + ref_ls(block.ls_1, ref_heads_attention(block, h, [("v", "v")]))
            x = ref_block(block, x)
        x_sur[0] = x[0]  # the class token of the original path
        return ref_head(visual, x_sur)
    x, last = ref_until_last(visual, image)
    h = ref_layer_norm(last.ln_1, x)
    if method == "sclip":
        y = x + ref_ls(last.ls_1, ref_heads_attention(last, h, [("q", "q"), ("k", "k")]))
        return ref_head(visual, y + ref_ls(last.ls_2, ref_mlp(last, ref_layer_norm(last.ln_2, y))))
    if method == "clearclip":
        return ref_head(visual, ref_heads_attention(last, h, [("q", "q")]))
    if method == "naclip":
        ph, pw = visual.patch_size
        prior = ref_prior(image.shape[1] // ph, image.shape[2] // pw, std)
        return ref_head(visual, ref_heads_attention(last, h, [("k", "k")], prior))
    if method == "clipself":
        _, _, v = ref_qkv(last, h)
        y = x + ref_ls(last.ls_1, ref_out_proj(last, v))
        return ref_head(visual, y + ref_ls(last.ls_2, ref_mlp(last, ref_layer_norm(last.ln_2, y))))
    raise AssertionError(method)


METHODS = ["clip_surgery", "sclip", "clearclip", "naclip", "clipself"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("size", "ls"), [((32, 32), None), ((40, 56), 0.3)])
def test_method_matches_reference(method, size, ls):
    model = tiny_clip(4, layers=4, ls_init_value=ls)
    tower = GemVisionTower(model.visual, gem_depth=3)
    torch.manual_seed(7)
    pixels = torch.randn(2, 3, *size)
    std = 1.5 if method == "naclip" else 5.0
    with torch.no_grad():
        got = tower.dense_features(pixels, method, naclip_std=std)
        others = tower.dense_features(pixels, "maskclip")
        for i in range(2):
            assert rel_diff(got[i], ref_method(model.visual, pixels[i], method, std=std)) < 1e-4
    assert got.shape == (2, 1 + (size[0] // 8) * (size[1] // 8), 24)
    assert not torch.allclose(got[:, 1:], others[:, 1:], atol=1e-3)


def test_gaussian_prior_layout():
    prior = gaussian_prior((3, 4), 5.0)
    assert prior.shape == (13, 13)
    assert torch.all(prior[0] == 0) and torch.all(prior[:, 0] == 0)
    torch.testing.assert_close(prior, ref_prior(3, 4, 5.0))


def test_unknown_method_is_refused():
    tower = GemVisionTower(tiny_clip(0, layers=2).visual, gem_depth=2)
    with pytest.raises(ValueError, match="unknown method"):
        tower.dense_features(torch.randn(1, 3, 32, 32), "dino")


@pytest.mark.parametrize("method", METHODS)
def test_engine_runs_each_method(method):
    from tests.test_pamr import tiny_engine

    engine = tiny_engine(method=method)
    im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 60, 3), dtype=np.uint8))
    maps = engine.heatmaps([im], ["cat", "dog"])[0]
    assert maps.shape == (2, 50, 60)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert method in engine.model_version
