"""GEM's vision module against plain references written here from the equations (loops, N×N softmax)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402
from PIL import Image  # noqa: E402

from workers.models.gem import GemConfig, GemEngine, kernels, rowexp  # noqa: E402
from workers.models.gem.modules import (  # noqa: E402
    DENSE_METHODS,
    GemVisionTower,
    resample_pos_embed,
    self_self_attention,
)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_clip(
    seed: int = 0, *, layers: int = 4, ls_init_value: float | None = None, patch: int = 8
) -> torch.nn.Module:
    """A small CLIP ViT with random weights; LayerNorms, biases and layer scales randomised too."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=24,
        vision_cfg=CLIPVisionCfg(
            layers=layers,
            width=48,
            head_width=12,
            patch_size=patch,
            image_size=4 * patch,
            ls_init_value=ls_init_value,
        ),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
            if ".ls_" in name:
                p.copy_(0.5 + 0.5 * torch.rand_like(p))
    return model.eval()


# ----------------------------------------------------------------------------- references (single image)
def ref_layer_norm(ln: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_softmax_rows(a: torch.Tensor) -> torch.Tensor:
    e = torch.exp(a - a.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_qkv(block, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    c = h.shape[-1]
    q = h @ w[:c].T + b[:c]
    k = h @ w[c : 2 * c].T + b[c : 2 * c]
    v = h @ w[2 * c :].T + b[2 * c :]
    return q, k, v


def ref_out_proj(block, o: torch.Tensor) -> torch.Tensor:
    return o @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def ref_ls(module, x: torch.Tensor) -> torch.Tensor:
    return x * module.gamma if hasattr(module, "gamma") else x


def ref_mlp(block, x: torch.Tensor) -> torch.Tensor:
    return block.mlp.c_proj(block.mlp.gelu(block.mlp.c_fc(x)))


def ref_attention(block, h: torch.Tensor) -> torch.Tensor:
    q, k, v = ref_qkv(block, h)
    nh = block.attn.num_heads
    d = h.shape[-1] // nh
    heads = []
    for i in range(nh):
        s = slice(i * d, (i + 1) * d)
        a = ref_softmax_rows((q[:, s] @ k[:, s].T) * d**-0.5)
        heads.append(a @ v[:, s])
    return ref_out_proj(block, torch.cat(heads, dim=-1))


def ref_self_self(block, h: torch.Tensor, iters: int, temp: float | None) -> torch.Tensor:
    q, k, v = ref_qkv(block, h)
    nh = block.attn.num_heads
    d = h.shape[-1] // nh
    inv_t = temp if temp is not None else float(torch.stack([row.norm() for row in h]).mean()) * d**-0.5
    heads = []
    for i in range(nh):
        s = slice(i * d, (i + 1) * d)
        acc = torch.zeros_like(v[:, s])
        for z in (v[:, s], k[:, s], q[:, s]):
            for _ in range(iters):
                zn = z / z.norm(dim=-1, keepdim=True)
                z = ref_softmax_rows(zn @ zn.T * inv_t) @ zn
            zn = z / z.norm(dim=-1, keepdim=True)
            acc = acc + ref_softmax_rows(zn @ zn.T * inv_t) @ v[:, s]
        heads.append(acc / 3)
    return ref_out_proj(block, torch.cat(heads, dim=-1))


def ref_block(block, x: torch.Tensor) -> torch.Tensor:
    x = x + ref_ls(block.ls_1, ref_attention(block, ref_layer_norm(block.ln_1, x)))
    return x + ref_ls(block.ls_2, ref_mlp(block, ref_layer_norm(block.ln_2, x)))


def ref_embed(visual, image: torch.Tensor) -> torch.Tensor:
    ph, pw = visual.patch_size
    c, hh, ww = image.shape
    gh, gw = hh // ph, ww // pw
    w = visual.conv1.weight.reshape(visual.conv1.weight.shape[0], -1)
    rows = []
    for r in range(gh):
        for col in range(gw):
            patch = image[:, r * ph : (r + 1) * ph, col * pw : (col + 1) * pw].reshape(-1)
            rows.append(w @ patch)
    x = torch.cat([visual.class_embedding[None], torch.stack(rows)], dim=0)
    pos = visual.positional_embedding
    g0 = visual.grid_size
    if (gh, gw) != tuple(g0):
        grid = pos[1:].reshape(1, g0[0], g0[1], -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        pos = torch.cat([pos[:1], grid[0].permute(1, 2, 0).reshape(gh * gw, -1)], dim=0)
    return ref_layer_norm(visual.ln_pre, x + pos)


def ref_head(visual, x: torch.Tensor) -> torch.Tensor:
    return ref_layer_norm(visual.ln_post, x) @ visual.proj


def ref_gem(visual, image, gem_depth=7, iters=1, temp=None) -> tuple[torch.Tensor, torch.Tensor]:
    x = ref_embed(visual, image)
    blocks = list(visual.transformer.resblocks)
    first = len(blocks) - (gem_depth - 1)
    for block in blocks[:first]:
        x = ref_block(block, x)
    x_gem = x.clone()
    for block in blocks[first:]:
        h = ref_layer_norm(block.ln_1, x)
        x_gem = x_gem + ref_ls(block.ls_1, ref_self_self(block, h, iters, temp))
        x = ref_block(block, x)
    return ref_head(visual, x_gem), ref_head(visual, x)


def ref_original(visual, image) -> torch.Tensor:
    x = ref_embed(visual, image)
    for block in visual.transformer.resblocks:
        x = ref_block(block, x)
    return ref_head(visual, x)


def ref_maskclip(visual, image) -> torch.Tensor:
    x = ref_embed(visual, image)
    blocks = list(visual.transformer.resblocks)
    for block in blocks[:-1]:
        x = ref_block(block, x)
    _, _, v = ref_qkv(blocks[-1], ref_layer_norm(blocks[-1].ln_1, x))
    return ref_head(visual, ref_out_proj(blocks[-1], v))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ----------------------------------------------------------------------------- tests
SIZES = [(32, 32), (48, 64), (40, 24), (56, 32)]


@pytest.mark.parametrize("size", SIZES)
def test_gem_matches_reference(size):
    model = tiny_clip(1, layers=4)
    tower = GemVisionTower(model.visual, gem_depth=3)
    torch.manual_seed(5)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        gem, ori = tower(pixels)
        for i in range(2):
            ref_g, ref_o = ref_gem(model.visual, pixels[i], gem_depth=3)
            assert rel_diff(gem[i], ref_g) < 1e-4
            assert rel_diff(ori[i], ref_o) < 1e-4
    gh, gw = size[0] // 8, size[1] // 8
    assert gem.shape == (2, 1 + gh * gw, 24)
    assert not torch.allclose(gem, ori, atol=1e-3), "GEM path should differ from CLIP's path"


@pytest.mark.parametrize(
    ("gem_depth", "iters", "temp", "ls"),
    [(5, 0, None, None), (2, 2, None, 0.3), (4, 1, 2.5, None), (4, 3, None, 0.3)],
)
def test_gem_variants_match_reference(gem_depth, iters, temp, ls):
    model = tiny_clip(2, layers=4, ls_init_value=ls)
    tower = GemVisionTower(model.visual, gem_depth=gem_depth, ss_attn_iter=iters, ss_attn_temp=temp)
    torch.manual_seed(6)
    pixels = torch.randn(3, 3, 40, 48)
    with torch.no_grad():
        gem, ori = tower(pixels)
        for i in range(3):
            ref_g, ref_o = ref_gem(model.visual, pixels[i], gem_depth=gem_depth, iters=iters, temp=temp)
            assert rel_diff(gem[i], ref_g) < 1e-4
            assert rel_diff(ori[i], ref_o) < 1e-4


def test_blocks_bypass_the_attention_module_and_gem_skips_the_unread_last_block_work(monkeypatch):
    """No block calls its attention module (every attention is q/k/v from ``BlockAttention`` and the tower's
    own kernels), and method ``gem`` runs neither the last block's original attention nor its MLP: nothing
    reads them."""
    model = tiny_clip(7, layers=4)
    tower = GemVisionTower(model.visual, gem_depth=3)
    blocks = model.visual.transformer.resblocks
    index = {id(block): n for n, block in enumerate(blocks)}
    calls: list[tuple[str, int]] = []
    handles = [
        block.attn.register_forward_hook(lambda *_, n=n: calls.append(("attn", n)))
        for n, block in enumerate(blocks)
    ]
    mlp, residual = GemVisionTower._mlp, GemVisionTower._residual_attention

    def counted_mlp(block, x):
        calls.append(("mlp", index[id(block)]))
        return mlp(block, x)

    def counted_residual(block, attn, x, o):
        calls.append(("residual", index[id(block)]))
        return residual(block, attn, x, o)

    monkeypatch.setattr(GemVisionTower, "_mlp", staticmethod(counted_mlp))
    monkeypatch.setattr(GemVisionTower, "_residual_attention", staticmethod(counted_residual))
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 40, 48)
    try:
        with torch.inference_mode():
            gem, _ = tower(pixels)
            # blocks 2 and 3 carry GEM's path: two residual attentions each (the side path's first)
            residuals = [("residual", n) for n in (0, 1, 2, 2, 3, 3)]
            assert [c for c in calls if c[0] == "mlp"] == [("mlp", n) for n in range(4)]
            assert [c for c in calls if c[0] == "residual"] == residuals
            calls.clear()
            dense = tower.dense_features(pixels, "gem")
            assert [c for c in calls if c[0] == "mlp"] == [("mlp", n) for n in range(3)], "gem skips the MLP"
            assert [c for c in calls if c[0] == "residual"] == residuals[:-1], "gem skips the attention"
            for method in DENSE_METHODS:
                calls.clear()
                tower.dense_features(pixels, method)
                assert not [c for c in calls if c[0] == "attn"], method
        with torch.inference_mode():  # open_clip's own forward calls the modules: the hooks work
            model.visual(torch.randn(1, 3, 32, 32))
        assert ("attn", 0) in calls
    finally:
        for handle in handles:
            handle.remove()
    assert rel_diff(dense, gem) < 1e-6
    with torch.no_grad():
        for i in range(2):
            assert rel_diff(dense[i], ref_gem(model.visual, pixels[i], gem_depth=3)[0]) < 1e-4


def test_self_self_attention_per_image_temperature():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 7, 5) for _ in range(3))
    temps = torch.tensor([0.5, 3.0, 8.0])
    batched = self_self_attention(q, k, v, temps, iters=2)
    for i in range(3):
        single = self_self_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], float(temps[i]), iters=2)
        assert torch.allclose(batched[i : i + 1], single, atol=1e-6)
    assert not torch.allclose(batched[0], self_self_attention(q, k, v, 8.0, 2)[0], atol=1e-3)


@pytest.mark.parametrize("size", [(32, 32), (24, 56)])
def test_maskclip_and_original_match_reference(size):
    model = tiny_clip(3)
    tower = GemVisionTower(model.visual)
    torch.manual_seed(7)
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        mc = tower.dense_features(pixels, "maskclip")
        og = tower.dense_features(pixels, "original")
        for i in range(2):
            assert rel_diff(mc[i], ref_maskclip(model.visual, pixels[i])) < 1e-4
            assert rel_diff(og[i], ref_original(model.visual, pixels[i])) < 1e-4


def _clip_tokens(model, pixels):
    visual = model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    return pooled, tokens @ visual.proj


def test_original_path_equals_open_clip_and_clip_is_untouched():
    model = tiny_clip(4, layers=5)
    torch.manual_seed(8)
    pixels = torch.randn(2, 3, 32, 32)
    n_params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model.encode_image(pixels)
        tower = GemVisionTower(model.visual, gem_depth=4)
        gem, ori = tower(pixels)
        plain = tower.original(pixels)
        after = model.encode_image(pixels)
        pooled, tokens = _clip_tokens(model, pixels)
    assert torch.equal(before, after), "building and running GEM must not change CLIP's forward"
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert {id(p) for p in tower.parameters()} == {id(p) for p in model.visual.parameters()}
    assert rel_diff(plain[:, 0], before) < 1e-5
    assert rel_diff(plain[:, 1:], tokens) < 1e-5
    assert rel_diff(ori[:, 0], pooled) < 1e-4
    assert rel_diff(ori[:, 1:], tokens) < 1e-4
    for block in model.visual.transformer.resblocks:
        assert type(block).__name__ == "ResidualAttentionBlock"
        assert isinstance(block.attn, torch.nn.MultiheadAttention)


def test_pos_embed_resampling():
    torch.manual_seed(0)
    pos = torch.randn(1 + 4 * 4, 6)
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos
    out = resample_pos_embed(pos, (4, 4), (3, 7))
    assert out.shape == (1 + 3 * 7, 6)
    assert torch.equal(out[0], pos[0])
    const = torch.cat([torch.randn(1, 6), torch.ones(16, 6) * 0.7])
    assert torch.allclose(resample_pos_embed(const, (4, 4), (6, 9))[1:], torch.full((54, 6), 0.7), atol=1e-5)
    # A smooth ramp resampled up and back down stays close to the original.
    ramp = torch.linspace(0, 1, 8)[:, None] + torch.linspace(0, 1, 8)[None, :]
    ramp_pos = torch.cat([torch.zeros(1, 1), ramp.reshape(64, 1)])
    round_trip = resample_pos_embed(resample_pos_embed(ramp_pos, (8, 8), (16, 16)), (16, 16), (8, 8))
    assert (round_trip - ramp_pos).abs().max() < 0.05
    with pytest.raises(ValueError, match="rows"):
        resample_pos_embed(pos, (5, 5), (3, 3))


def test_non_square_input_runs_with_resampled_positions():
    model = tiny_clip(5)
    tower = GemVisionTower(model.visual)
    with torch.no_grad():
        gem, _ = tower(torch.randn(1, 3, 24, 72))
    assert gem.shape == (1, 1 + 3 * 9, 24)
    assert torch.isfinite(gem).all()


def test_unsupported_gem_depth_and_tower():
    model = tiny_clip(0, layers=4)
    with pytest.raises(ValueError, match="gem_depth"):
        GemVisionTower(model.visual, gem_depth=1)
    assert GemVisionTower(model.visual, gem_depth=9).gem_depth == 5  # capped: every block
    with pytest.raises(ValueError, match="VisionTransformer"):
        GemVisionTower(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_vit_b16_config_matches_reference_and_open_clip():
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tower = GemVisionTower(model.visual, gem_depth=7)
    assert len(model.visual.transformer.resblocks) == 12
    torch.manual_seed(9)
    pixels = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        gem, ori = tower(pixels)
        for i in range(2):
            ref_g, ref_o = ref_gem(model.visual, pixels[i], gem_depth=7)
            assert rel_diff(gem[i], ref_g) < 1e-4
            assert rel_diff(ori[i], ref_o) < 1e-4
        native = torch.randn(1, 3, 224, 224)
        plain = tower.original(native)
        _, ori_native = tower(native)
        pooled, tokens = _clip_tokens(model, native)
        assert rel_diff(plain[:, 0], model.encode_image(native)) < 1e-5
        assert rel_diff(ori_native[:, 1:], tokens) < 1e-4
        assert rel_diff(ori_native[:, 0], pooled) < 1e-4


@pytest.mark.parametrize("arch", ["ViT-B-32-quickgelu", "ViT-L-14", "ViT-L-14-quickgelu"])
def test_other_clip_layouts_with_fewer_blocks(arch):
    """B/32 and L/14 layouts (patch size, width, heads, activation) with 3 vision blocks to stay fast."""
    cfg = open_clip.get_model_config(arch)
    vision = dict(cfg["vision_cfg"], layers=3)
    text = dict(cfg["text_cfg"], layers=1, width=64, heads=1)
    torch.manual_seed(11)
    model = open_clip.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=text, quick_gelu=cfg.get("quick_gelu", False)
    ).eval()
    patch = vision["patch_size"]
    tower = GemVisionTower(model.visual, gem_depth=7)
    assert tower.gem_depth == 4  # capped to the 3 blocks
    pixels = torch.randn(2, 3, 3 * patch, 5 * patch)
    with torch.no_grad():
        gem, ori = tower(pixels)
        assert gem.shape == (2, 16, cfg["embed_dim"])
        for i in range(2):
            ref_g, ref_o = ref_gem(model.visual, pixels[i], gem_depth=4)
            assert rel_diff(gem[i], ref_g) < 1e-4
            assert rel_diff(ori[i], ref_o) < 1e-4


# ----------------------------------------------------------------------------- attention layouts
class MainAttention(open_clip.transformer.Attention):
    """open_clip main's block attention (it replaces ``nn.MultiheadAttention`` in ``ResidualAttentionBlock``).

    Parameters: a fused ``in_proj_weight [3C, C]`` when q, k and v share the model width, else separate
    ``q/k/v_proj_weight`` (and ``in_proj_weight = None``); ``in_proj_bias [3C]``; ``out_proj``. Forward:
    ``forward(x, k_x=None, v_x=None, attn_mask=None)`` with optional q/k LayerNorms, scaled cosine logits,
    per-head output scaling and an inner norm. It subclasses the installed ``Attention`` (the older form of
    the same class) so that it is open_clip's ``Attention`` to the tower; what is new is set here.
    """

    def __init__(self, dim: int, num_heads: int = 8, use_sdpa: bool = True, **options) -> None:
        super().__init__(dim, num_heads, **options)
        self.use_sdpa = use_sdpa
        self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None

    def split_projections(self) -> None:
        """Move the fused weight into ``q/k/v_proj_weight`` (open_clip's layout when kdim/vdim != dim)."""
        w_q, w_k, w_v = (torch.nn.Parameter(w.detach().clone()) for w in self.in_proj_weight.chunk(3))
        self.in_proj_weight = None
        self.q_proj_weight, self.k_proj_weight, self.v_proj_weight = w_q, w_k, w_v

    def forward(self, x, k_x=None, v_x=None, attn_mask=None):
        n, length, c = x.shape
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.chunk(3, dim=0)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        if k_x is None and v_x is None and self.in_proj_weight is not None:
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            sources = (x, x if k_x is None else k_x, x if v_x is None else v_x)
            q, k, v = (F.linear(s, w, b) for s, w, b in zip(sources, weights, biases, strict=True))
        q, k, v = (t.reshape(n, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None and attn_mask.ndim == 3:
            attn_mask = attn_mask.reshape(n, self.num_heads, length, length)
        if self.logit_scale is not None:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
            attn = attn * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            if attn_mask is not None:
                attn = attn + attn_mask.to(attn.dtype)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            if self.use_sdpa:
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
            else:
                attn = (q * self.scale) @ k.transpose(-1, -2)
                if attn_mask is not None:
                    attn = attn + attn_mask.to(attn.dtype)
                x = self.attn_drop(attn.softmax(dim=-1)) @ v
        if self.head_scale is not None:
            x = x * self.head_scale
        x = self.ln_inner(x.transpose(1, 2).reshape(n, -1, c))
        return self.out_drop(self.out_proj(x))


class MainResidualAttentionBlock(open_clip.transformer.ResidualAttentionBlock):
    """open_clip main's block: it calls ``Attention`` with ``k_x``/``v_x`` keywords, no ``need_weights``."""

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x=k_x, v_x=v_x, attn_mask=attn_mask)


def to_main_layout(model: torch.nn.Module, *, separate: bool = False, **options) -> torch.nn.Module:
    """A copy of ``model`` whose vision blocks hold ``MainAttention`` with the ``nn.MultiheadAttention``
    weights copied over (``separate``: as ``q/k/v_proj_weight``; ``options``: ``Attention`` options)."""
    model = copy.deepcopy(model)
    for block in model.visual.transformer.resblocks:
        mha = block.attn
        attn = MainAttention(mha.embed_dim, mha.num_heads, **options)
        with torch.no_grad():
            attn.in_proj_weight.copy_(mha.in_proj_weight)
            attn.in_proj_bias.copy_(mha.in_proj_bias)
            attn.out_proj.weight.copy_(mha.out_proj.weight)
            attn.out_proj.bias.copy_(mha.out_proj.bias)
        if separate:
            attn.split_projections()
        block.attn = attn
        block.__class__ = MainResidualAttentionBlock
    return model.eval()


LAYOUTS = ["multihead", "attention", "attention_separate"]


def clip_in_layout(layout: str, seed: int, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the ``nn.MultiheadAttention`` model, the same weights in ``layout``)."""
    model = tiny_clip(seed, **kw)
    if layout == "multihead":
        return model, model
    return model, to_main_layout(model, separate=layout == "attention_separate")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_original_path_equals_open_clip_on_each_attention_layout(layout):
    reference, model = clip_in_layout(layout, 4, layers=5, ls_init_value=0.3)
    for block in model.visual.transformer.resblocks:
        expected = torch.nn.MultiheadAttention if layout == "multihead" else MainAttention
        assert type(block.attn) is expected
        assert (getattr(block.attn, "in_proj_weight", None) is None) == (layout == "attention_separate")
    torch.manual_seed(8)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.encode_image(pixels)
        tower = GemVisionTower(model.visual, gem_depth=4)
        _, ori = tower(pixels)
        plain = tower.original(pixels)
        after = model.encode_image(pixels)
        pooled, tokens = _clip_tokens(model, pixels)
        mha_pooled = reference.encode_image(pixels)
    assert torch.equal(before, after), "building and running GEM must not change CLIP's forward"
    assert rel_diff(before, mha_pooled) < 1e-5, "the layouts are the same CLIP"
    assert rel_diff(plain[:, 0], before) < 1e-5
    assert rel_diff(plain[:, 1:], tokens) < 1e-5
    assert rel_diff(ori[:, 0], pooled) < 1e-4
    assert rel_diff(ori[:, 1:], tokens) < 1e-4


@pytest.mark.parametrize("layout", ["attention", "attention_separate"])
@pytest.mark.parametrize("method", list(DENSE_METHODS))
def test_dense_methods_agree_across_attention_layouts(method, layout):
    reference, model = clip_in_layout(layout, 6, layers=4, ls_init_value=0.3)
    torch.manual_seed(9)
    pixels = torch.randn(2, 3, 40, 48)
    towers = [GemVisionTower(m.visual, gem_depth=3, ss_attn_iter=2) for m in (reference, model)]
    with torch.no_grad():
        ref_tokens, tokens = (t.dense_features(pixels, method, naclip_std=2.0) for t in towers)
    assert tokens.shape == ref_tokens.shape == (2, 1 + 5 * 6, 24)
    assert rel_diff(tokens, ref_tokens) < 1e-5
    cfg = GemConfig(model_name="tiny", pretrained=None, image_size=32, device="cpu", method=method)
    images = [Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 45, 3), dtype=np.uint8))]
    engines = [GemEngine(cfg, clip_model=m) for m in (reference, model)]
    ref_maps, maps = (e.cosine_maps(images, ["a cat", "a dog"]) for e in engines)
    np.testing.assert_allclose(maps[0], ref_maps[0], atol=1e-5)


class OtherAttention(torch.nn.Module):
    """An attention module that is neither ``nn.MultiheadAttention`` nor open_clip's ``Attention``."""

    def __init__(self, mha: torch.nn.MultiheadAttention) -> None:
        super().__init__()
        self.in_proj_weight, self.in_proj_bias = mha.in_proj_weight, mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.num_heads, self.head_dim = mha.num_heads, mha.head_dim


def test_unknown_attention_class_is_refused():
    model = tiny_clip(0, layers=3)
    blocks = model.visual.transformer.resblocks
    blocks[1].attn = OtherAttention(blocks[1].attn)
    expected = r"block 1: .*MultiheadAttention or open_clip's Attention, got \S*\.OtherAttention$"
    with pytest.raises(ValueError, match=expected):
        GemVisionTower(model.visual)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"qk_norm": True}, "qk_norm"),
        ({"scaled_cosine": True}, "scaled_cosine"),
        ({"scale_heads": True}, "scale_heads"),
        ({"inner_norm": True}, "inner_norm"),
    ],
)
def test_attention_options_that_change_the_math_are_refused(options, named):
    model = to_main_layout(tiny_clip(0, layers=2), **options)
    with pytest.raises(ValueError, match=f"open_clip Attention with {named}"):
        GemVisionTower(model.visual)


def test_scale_and_multihead_extras_are_refused():
    model = to_main_layout(tiny_clip(0, layers=2))
    model.visual.transformer.resblocks[0].attn.scale = 0.5
    with pytest.raises(ValueError, match="block 0: .*scale=0.5"):
        GemVisionTower(model.visual)
    model = tiny_clip(0, layers=2)
    block = model.visual.transformer.resblocks[1]
    block.attn = torch.nn.MultiheadAttention(48, 4, add_bias_kv=True, batch_first=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        GemVisionTower(model.visual)


# ----------------------------------------------------------------------------- oneDNN kernels
def _plain_torch(monkeypatch) -> None:
    """Route the tower's kernels to plain PyTorch (F.linear, SDPA), as on a build without oneDNN."""
    monkeypatch.setattr(kernels, "_LINEAR", None)


def test_kernels_apply_to_fp32_cpu_inference_only():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    x = torch.zeros(2, 3)
    assert kernels.onednn_usable(x, None)
    assert not kernels.onednn_usable(x.double())
    w = torch.zeros(3, 3, requires_grad=True)
    assert not kernels.onednn_usable(x, w)
    with torch.no_grad():
        assert kernels.onednn_usable(x, w)
    with pytest.raises(ValueError, match="gelu"):
        kernels.linear(x, torch.zeros(3, 3), gelu=True, residual=x)


@pytest.mark.parametrize("score_block", [1 << 20, 40])  # one block of query rows per head, or several
def test_onednn_attention_kernels_match_plain_torch(monkeypatch, score_block):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    monkeypatch.setattr(kernels, "_SCORE_BLOCK", score_block)
    torch.manual_seed(12)
    qkv = torch.randn(2, 23, 3 * 3 * 8)  # heads are strided views of a fused projection, as in the tower
    q, k, v = (t.reshape(2, 23, 3, 8).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    temps = torch.tensor([1.5, 6.0])
    with torch.inference_mode():
        att = kernels.attention(q, k, v)
        ss = self_self_attention(q, k, v, temps, iters=2)
        ss_fixed = self_self_attention(q, k, v, 4.0, iters=0)
        lin = kernels.linear(qkv, torch.randn(5, 72), torch.randn(5), gelu=True)
        with monkeypatch.context() as m:
            _plain_torch(m)
            assert not kernels.onednn_usable(q)
            assert rel_diff(att, F.scaled_dot_product_attention(q, k, v)) < 1e-5
            assert rel_diff(ss, self_self_attention(q, k, v, temps, iters=2)) < 1e-5
            assert rel_diff(ss_fixed, self_self_attention(q, k, v, 4.0, iters=0)) < 1e-5
    torch.manual_seed(12)
    qkv = torch.randn(2, 23, 3 * 3 * 8)
    ref = F.gelu(F.linear(qkv, torch.randn(5, 72), torch.randn(5)))
    assert rel_diff(lin, ref) < 1e-5


@pytest.mark.parametrize("score_block", [1 << 20, 40])
@pytest.mark.parametrize("temp", [None, 4.0, 120.0, -2.0])  # adaptive; fixed; past exp's range; nonsense
def test_compiled_row_exponentials_match_torch_softmax(monkeypatch, score_block, temp):
    """The numba row-exponential path (softmax's scaling moved after the product with v, GEM's known row
    maximum, the branches' sum accumulated block by block) gives torch.softmax's numbers."""
    if not (torch.backends.mkldnn.is_available() and rowexp.AVAILABLE):
        pytest.skip("needs oneDNN and numba")
    monkeypatch.setattr(kernels, "_SCORE_BLOCK", score_block)
    torch.manual_seed(21)
    q, k, v = (torch.randn(2, 3, 37, 8) * 2 for _ in range(3))
    inv_temp = torch.tensor([1.5, 6.0]) if temp is None else temp
    with torch.inference_mode():
        att = kernels.attention(q, k, v)
        ss = self_self_attention(q, k, v, inv_temp, iters=1)
        with monkeypatch.context() as m:
            m.setattr(rowexp, "AVAILABLE", False)
            assert rel_diff(att, kernels.attention(q, k, v)) < 2e-6
            assert rel_diff(ss, self_self_attention(q, k, v, inv_temp, iters=1)) < 2e-6
        _plain_torch(monkeypatch)
        assert rel_diff(ss, self_self_attention(q, k, v, inv_temp, iters=1)) < 2e-6


def test_row_exponentials_find_the_maximum_when_the_temperature_does_not_give_it():
    """A known row maximum is used only for a positive temperature: with a negative one the diagonal is
    the rows' minimum, and exp(s - t) would overflow."""
    if not rowexp.AVAILABLE:
        pytest.skip("needs numba")
    z = F.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    for t in (-60.0, 60.0):
        s = (z * t) @ z.T
        want = torch.softmax(s, dim=-1)
        p, sums = kernels._softmax_rows(s.clone(), t)
        assert torch.isfinite(p).all() and rel_diff(p / sums, want) < 1e-5, t


def test_tower_on_onednn_matches_plain_torch(monkeypatch):
    model = tiny_clip(13, layers=4, ls_init_value=0.5)
    tower = GemVisionTower(model.visual, gem_depth=3, ss_attn_iter=2)
    pixels = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        fast = {m: tower.dense_features(pixels, m) for m in DENSE_METHODS}
        with monkeypatch.context() as m:
            _plain_torch(m)
            for method in DENSE_METHODS:
                assert rel_diff(fast[method], tower.dense_features(pixels, method)) < 1e-5, method
    # with gradients recorded the tower takes plain PyTorch, and gradients flow
    gem = tower.dense_features(pixels, "gem")
    gem.sum().backward()
    assert model.visual.conv1.weight.grad is not None
    assert rel_diff(gem.detach(), fast["gem"]) < 1e-5


def test_position_embedding_is_kept_per_grid_until_it_changes():
    model = tiny_clip(14)
    tower = GemVisionTower(model.visual)
    with torch.no_grad():
        first = tower._position_embedding((5, 7))
        assert tower._position_embedding((5, 7)) is first
        other = tower._position_embedding((3, 4))
        assert other.shape == (1 + 12, 48)
        model.visual.positional_embedding.mul_(2.0)  # an in-place change (as load_state_dict makes)
        again = tower._position_embedding((3, 4))
    assert again is not other
    assert torch.allclose(again, 2.0 * other, atol=1e-5)


def test_packed_linear_weights_follow_in_place_changes_and_can_be_turned_off():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN")
    torch.manual_seed(15)
    layer = torch.nn.Linear(24, 10)
    x, res = torch.randn(3, 7, 24), torch.randn(3, 7, 10)
    with torch.no_grad():
        first = kernels.linear(x, layer.weight, layer.bias)
        assert (id(layer.weight), torch.float32) in kernels._packed  # packed on first use
        packed = kernels._packed[id(layer.weight), torch.float32][2]
        assert rel_diff(kernels.linear(x, layer.weight, layer.bias), first) < 1e-6
        assert kernels._packed[id(layer.weight), torch.float32][2] is packed  # reused while unchanged
        assert rel_diff(first, F.linear(x, layer.weight, layer.bias)) < 1e-5
        layer.load_state_dict({"weight": -2.0 * layer.weight, "bias": layer.bias})  # in place
        fused = kernels.linear(x, layer.weight, layer.bias, residual=res)
        assert rel_diff(fused, res + F.linear(x, layer.weight, layer.bias)) < 1e-5
        assert kernels._packed[id(layer.weight), torch.float32][2] is not packed  # repacked after the change
        view = torch.randn(20, 24)[:10]  # a view is used as it is, never kept
        assert rel_diff(kernels.linear(x, view), F.linear(x, view)) < 1e-5
        assert (id(view), torch.float32) not in kernels._packed
        try:
            kernels.set_weight_packing(False)
            assert not kernels._packed
            assert rel_diff(kernels.linear(x, layer.weight, layer.bias, residual=res), fused) < 1e-6
            assert not kernels._packed
        finally:
            kernels.set_weight_packing(True)
    key = (id(layer.weight), torch.float32)
    del layer
    assert key not in kernels._packed  # released with its weight
