"""CLIPSelf's EVA-CLIP checkpoints on open_clip's EVA models: a synthetic state dict in CLIPSelf's naming,
built here from the layout in ``workers/models/clipself/eva.py``, loads strictly and gives dense maps."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.model import CLIPTextCfg, CLIPVisionCfg  # noqa: E402

from workers.models.clipself.eva import EvaDenseTower, load_clipself_eva, remap_clipself_eva  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_eva_clip(depth: int = 2, width: int = 64, heads: int = 4, embed: int = 32, grid: int = 4):
    """An open_clip CLIP whose image tower is a small timm Eva shaped like EVA02-CLIP-B/16 (separate
    q/k/v, SwiGLU with norm, inner attention norm, RoPE)."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(
        embed_dim=embed,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=16 * grid),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    from open_clip.timm_model import TimmModel

    visual = TimmModel.__new__(TimmModel)
    torch.nn.Module.__init__(visual)
    visual.image_size = (16 * grid, 16 * grid)
    visual.trunk = Eva(
        img_size=16 * grid,
        patch_size=16,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        qkv_fused=False,
        mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True,
        scale_mlp=True,
        scale_attn_inner=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(grid, grid),
        num_classes=embed,
        global_pool="token",
    )
    visual.head = torch.nn.Sequential()
    model.visual = visual
    return model.eval()


def clipself_state(depth: int, width: int, embed: int, grid: int, text_state: dict) -> dict:
    """A state dict in CLIPSelf / EVA-CLIP ``CustomCLIP`` naming (random values, the documented layout)."""
    hidden = int(width * 4 * 2 / 3)
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    s = {
        "visual.cls_token": r(1, 1, width),
        "visual.pos_embed": r(1, 1 + grid * grid, width),
        "visual.patch_embed.proj.weight": r(width, 3, 16, 16),
        "visual.patch_embed.proj.bias": r(width),
        "visual.rope.freqs_cos": r(grid * grid, width // 4),
        "visual.rope.freqs_sin": r(grid * grid, width // 4),
        "visual.norm.weight": 1 + r(width),
        "visual.norm.bias": r(width),
        "visual.head.weight": r(embed, width),
        "visual.head.bias": r(embed),
    }
    for n in range(depth):
        p = f"visual.blocks.{n}."
        s.update(
            {
                p + "norm1.weight": 1 + r(width),
                p + "norm1.bias": r(width),
                p + "attn.q_proj.weight": r(width, width),
                p + "attn.k_proj.weight": r(width, width),
                p + "attn.v_proj.weight": r(width, width),
                p + "attn.q_bias": r(width),
                p + "attn.v_bias": r(width),
                p + "attn.inner_attn_ln.weight": 1 + r(width),
                p + "attn.inner_attn_ln.bias": r(width),
                p + "attn.proj.weight": r(width, width),
                p + "attn.proj.bias": r(width),
                p + "attn.rope.freqs_cos": r(grid * grid, width // 8),
                p + "norm2.weight": 1 + r(width),
                p + "norm2.bias": r(width),
                p + "mlp.w1.weight": r(hidden, width),
                p + "mlp.w1.bias": r(hidden),
                p + "mlp.w2.weight": r(hidden, width),
                p + "mlp.w2.bias": r(hidden),
                p + "mlp.ffn_ln.weight": 1 + r(hidden),
                p + "mlp.ffn_ln.bias": r(hidden),
                p + "mlp.w3.weight": r(width, hidden),
                p + "mlp.w3.bias": r(width),
            }
        )
    s.update({k: v.clone() for k, v in text_state.items()})
    s["text.attn_mask"] = torch.zeros(77, 77)
    return {"epoch": 6, "name": "clipself", "state_dict": {"module." + k: v for k, v in s.items()}}


def test_clipself_checkpoint_loads_strictly_and_gives_dense_maps():
    model = tiny_eva_clip()
    text_state = {k: v for k, v in model.state_dict().items() if k.startswith("text.") or k == "logit_scale"}
    ckpt = clipself_state(2, 64, 32, 4, text_state)
    load_clipself_eva(model, ckpt)  # strict
    src = ckpt["state_dict"]
    trunk = model.visual.trunk
    torch.testing.assert_close(trunk.blocks[1].attn.q_proj.bias, src["module.visual.blocks.1.attn.q_bias"])
    torch.testing.assert_close(trunk.blocks[0].mlp.fc1_x.weight, src["module.visual.blocks.0.mlp.w2.weight"])
    torch.testing.assert_close(
        trunk.blocks[0].attn.norm.weight, src["module.visual.blocks.0.attn.inner_attn_ln.weight"]
    )
    assert torch.all(trunk.blocks[0].attn.k_proj.weight == src["module.visual.blocks.0.attn.k_proj.weight"])

    tower = EvaDenseTower(model.visual)
    with torch.no_grad():
        for size in ((64, 64), (96, 128)):
            tokens, grid = tower.dense_tokens(torch.randn(2, 3, *size))
            assert grid == (size[0] // 16, size[1] // 16)
            assert tokens.shape == (2, grid[0] * grid[1], 32) and torch.isfinite(tokens).all()
        mask, _ = tower.dense_tokens(torch.randn(1, 3, 64, 64), "maskclip")
        # At the native size the blocks before the last one match timm's own forward.
        x = torch.randn(1, 3, 64, 64)
        ref = trunk.forward_features(x)
        t = trunk
        h = t.patch_embed(x)
        h, rope = t._pos_embed(h)
        for blk in t.blocks:
            h = blk(h, rope=rope)
        torch.testing.assert_close(t.norm(h), ref)


def test_remap_drops_rope_and_keeps_open_clip_keys():
    mapped = remap_clipself_eva(
        {
            "model": {
                "visual.rope.freqs_cos": torch.zeros(1),
                "visual.blocks.0.attn.rope.freqs_sin": torch.zeros(1),
                "visual.blocks.3.mlp.w3.weight": torch.zeros(1),
                "visual.trunk.norm.weight": torch.ones(1),
                "logit_scale": torch.ones(()),
                "text.attn_mask": torch.zeros(1),
            }
        }
    )
    assert set(mapped) == {"visual.trunk.blocks.3.mlp.fc2.weight", "visual.trunk.norm.weight", "logit_scale"}


@pytest.mark.slow
def test_eva02_b16_layout_loads_strictly():
    """The real EVA02-B-16 sizes: CLIPSelf's B/16 layout (12 blocks, width 768, embed 512, 14×14 at 224)."""
    model = open_clip.create_model("EVA02-B-16", pretrained=None).eval()
    text_state = {k: v for k, v in model.state_dict().items() if k.startswith("text.") or k == "logit_scale"}
    ckpt = clipself_state(12, 768, 512, 14, text_state)
    # CLIPSelf trains at 1024 px: a 64×64 position grid is resampled to the model's 14×14.
    ckpt["state_dict"]["module.visual.pos_embed"] = torch.randn(1, 1 + 64 * 64, 768) * 0.02
    load_clipself_eva(model, ckpt)
    with torch.no_grad():
        tokens, grid = EvaDenseTower(model.visual).dense_tokens(torch.randn(1, 3, 256, 256))
    assert grid == (16, 16) and tokens.shape == (1, 256, 512)


def test_gem_engine_runs_clipself_and_maskclip_on_eva():
    """``GemEngine`` takes an EVA backbone: its cosine maps are the EvaDenseTower tokens against the text."""
    import numpy as np
    from PIL import Image

    from groundlabel.errors import UserError
    from workers.models.gem import GemConfig, GemEngine
    from workers.models.gem.engine import preprocess

    model = tiny_eva_clip()
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
    for method in ("clipself", "maskclip"):
        config = GemConfig(
            model_name="EVA02-B-16", pretrained=None, method=method, image_size=(64, 96), device="cpu"
        )
        engine = GemEngine(config, clip_model=model)
        assert isinstance(engine.tower, EvaDenseTower) and method in engine.model_version
        cos = engine.cosine_maps([image], ["cat", "dog"])[0]
        with torch.no_grad():
            tokens, grid = engine.tower.dense_tokens(preprocess([image], (64, 96)), method)
        feats = torch.nn.functional.normalize(tokens[0], dim=-1).reshape(*grid, -1)
        expected = torch.einsum("hwd,kd->khw", feats, engine.text_embeddings(["cat", "dog"]))
        assert grid == (4, 6) and cos.shape == (2, 4, 6)
        np.testing.assert_allclose(cos, expected.numpy(), atol=1e-5)
        maps = engine.heatmaps([image], ["cat", "dog"])[0]
        assert maps.shape == (2, 50, 70) and maps.min() >= 0 and maps.max() <= 1
    with pytest.raises(UserError, match="clipself"):
        GemEngine(
            GemConfig(model_name="EVA02-B-16", pretrained=None, method="gem", device="cpu"), clip_model=model
        )


@pytest.mark.slow
def test_load_clip_reads_a_clipself_checkpoint_file(tmp_path):
    """``pretrained=<CLIPSelf .pt>`` with ``EVA02-B-16`` remaps the keys on load (the workers' path)."""
    from workers.models.gem.weights import load_clip

    reference = open_clip.create_model("EVA02-B-16", pretrained=None)
    text_state = {
        k: v for k, v in reference.state_dict().items() if k.startswith("text.") or k == "logit_scale"
    }
    del reference
    ckpt = clipself_state(12, 768, 512, 14, text_state)
    path = tmp_path / "eva_vitb16_coco_clipself_patches.pt"
    torch.save(ckpt, path)
    loaded = load_clip("EVA02-B-16", str(path))
    trunk = loaded.model.visual.trunk
    src = ckpt["state_dict"]
    assert torch.equal(trunk.blocks[3].attn.q_proj.bias, src["module.visual.blocks.3.attn.q_bias"])
    assert torch.equal(trunk.blocks[11].mlp.fc2.weight, src["module.visual.blocks.11.mlp.w3.weight"])
    assert loaded.weights_label == path.stem
