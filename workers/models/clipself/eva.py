"""CLIPSelf's EVA-CLIP checkpoints on open_clip's EVA models, and dense features for a timm ``Eva`` trunk.

CLIPSelf publishes EVA02-CLIP weights (``eva_vitb16_coco_clipself_patches.pt`` and friends) in EVA-CLIP's
``CustomCLIP`` layout; open_clip 3.x builds ``EVA02-B-16`` / ``EVA02-L-14`` with a timm ``Eva`` trunk under
``visual.trunk``. :func:`remap_clipself_eva` converts the keys:

============================================  ===============================================
CLIPSelf / EVA-CLIP                           open_clip (timm Eva trunk)
============================================  ===============================================
``visual.cls_token``, ``visual.pos_embed``    ``visual.trunk.cls_token``, ``visual.trunk.pos_embed``
``visual.patch_embed.proj.{weight,bias}``     ``visual.trunk.patch_embed.proj.{weight,bias}``
``visual.blocks.N.norm1/norm2``               ``visual.trunk.blocks.N.norm1/norm2``
``visual.blocks.N.attn.{q,k,v}_proj.weight``  ``visual.trunk.blocks.N.attn.{q,k,v}_proj.weight``
``visual.blocks.N.attn.q_bias / v_bias``      ``visual.trunk.blocks.N.attn.q_proj.bias / v_proj.bias``
``visual.blocks.N.attn.inner_attn_ln``        ``visual.trunk.blocks.N.attn.norm``
``visual.blocks.N.attn.proj``                 ``visual.trunk.blocks.N.attn.proj``
``visual.blocks.N.mlp.w1 / w2 / w3``          ``visual.trunk.blocks.N.mlp.fc1_g / fc1_x / fc2``
``visual.blocks.N.mlp.ffn_ln``                ``visual.trunk.blocks.N.mlp.norm``
``visual.norm``, ``visual.head``              ``visual.trunk.norm``, ``visual.trunk.head``
``visual.rope.*``, ``*.attn.rope.*``          dropped (fixed rotary tables, rebuilt by timm)
``text.*``, ``logit_scale``                   unchanged (``text.attn_mask`` dropped)
============================================  ===============================================

:class:`EvaDenseTower` gives MaskCLIP / CLIPSelf dense features of such a trunk at any input size (bicubic
position-embedding resampling, RoPE rebuilt for the grid): the blocks run normally except the last one,
whose attention is replaced by its value path ``x + γ1·proj(norm(v_proj(norm1(x))))`` followed by the MLP
(CLIPSelf's ``encode_dense``), or without residual and MLP (``maskclip``). GEM's dual path is not offered on
EVA: its rotary q/k make the self-self q-q / k-k branches position-dependent, unlike the paper's setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.gem.modules import resample_pos_embed

__all__ = [
    "EVA_METHODS",
    "EvaDenseTower",
    "is_clipself_layout",
    "is_timm_eva",
    "load_clipself_eva",
    "remap_clipself_eva",
]

#: Dense-feature methods offered on EVA backbones.
EVA_METHODS = ("clipself", "maskclip")

_RENAMES = (
    ("attn.inner_attn_ln.", "attn.norm."),
    ("mlp.ffn_ln.", "mlp.norm."),
    ("mlp.w1.", "mlp.fc1_g."),
    ("mlp.w2.", "mlp.fc1_x."),
    ("mlp.w3.", "mlp.fc2."),
)


def is_timm_eva(visual: nn.Module) -> bool:
    """True for open_clip's timm image tower holding a timm ``Eva`` trunk."""
    trunk = getattr(visual, "trunk", None)
    return trunk is not None and type(trunk).__name__ == "Eva"


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict", "model", "module"):
        inner = state.get(key) if isinstance(state, Mapping) else None
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return _unwrap(inner)
    return state


def is_clipself_layout(state: Mapping[str, Any]) -> bool:
    """True for a state dict in CLIPSelf / EVA-CLIP ``CustomCLIP`` naming (``visual.blocks.N...``)."""
    state = _unwrap(state)
    return any(
        isinstance(k, str) and k.removeprefix("module.").startswith(("visual.blocks.", "visual.patch_embed."))
        for k in state
    )


def remap_clipself_eva(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """CLIPSelf / EVA-CLIP ``CustomCLIP`` keys → open_clip EVA keys (table in the module docstring)."""
    state = _unwrap(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        k = key[len("module.") :] if key.startswith("module.") else key
        if k.startswith("visual."):
            rest = k[len("visual.") :]
            if rest.startswith("trunk."):  # already open_clip layout
                out[k] = value
                continue
            if rest.startswith("rope.") or ".rope." in rest:
                continue
            for old, new in _RENAMES:
                rest = rest.replace(old, new)
            rest = re.sub(r"attn\.q_bias$", "attn.q_proj.bias", rest)
            rest = re.sub(r"attn\.v_bias$", "attn.v_proj.bias", rest)
            out["visual.trunk." + rest] = value
        elif k == "text.attn_mask":
            continue
        else:
            out[k] = value
    return out


def load_clipself_eva(model: nn.Module, state: Mapping[str, Any] | str, *, strict: bool = True) -> None:
    """Load a CLIPSelf EVA checkpoint (a state dict or a file path) into an open_clip EVA model."""
    if isinstance(state, str):
        state = torch.load(state, map_location="cpu", weights_only=True)
    mapped = remap_clipself_eva(state)
    trunk = model.visual.trunk
    key = "visual.trunk.pos_embed"
    if key in mapped and mapped[key].shape != trunk.pos_embed.shape:
        old = mapped[key][0]
        n_old = int(round((old.shape[0] - 1) ** 0.5))
        grid = tuple(trunk.patch_embed.grid_size)
        mapped[key] = resample_pos_embed(old, (n_old, n_old), grid)[None]
    model.load_state_dict(mapped, strict=strict)


class EvaDenseTower(nn.Module):
    """Dense patch features of an open_clip timm-Eva image tower at any input size."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if not is_timm_eva(visual):
            raise ValueError(
                f"EvaDenseTower needs an open_clip tower with a timm Eva trunk, got {type(visual)}"
            )
        self.visual = visual
        self.trunk = visual.trunk

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size (height, width)."""
        ps = self.trunk.patch_embed.patch_size
        return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) for an input of ``height × width`` pixels."""
        ph, pw = self.patch_size
        return (height // ph, width // pw)

    def _rope(self, grid: tuple[int, int]) -> torch.Tensor | None:
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        if tuple(getattr(rope, "feat_shape", None) or ()) == grid:
            return rope.get_embed()
        return rope._build_embed_cat(list(grid), rope.bands)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        x = t.fc_norm(t.norm(x))
        x = t.head(t.head_drop(x))
        head = getattr(self.visual, "head", None)
        return head(x) if head is not None else x

    def dense_tokens(
        self, pixels: torch.Tensor, method: str = "clipself"
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens ``[B, gh*gw, D]`` (class token removed) after the head, and the grid."""
        tokens = self.dense_features(pixels, method)
        return tokens[:, 1:], self.grid_for(pixels.shape[-2], pixels.shape[-1])

    def dense_features(self, pixels: torch.Tensor, method: str = "clipself", **_: object) -> torch.Tensor:
        """Tokens ``[B, 1 + gh*gw, D]`` after the head, class token first (``GemVisionTower``'s interface,
        so ``GemEngine`` runs EVA backbones unchanged)."""
        if method not in EVA_METHODS:
            raise ValueError(f"EVA dense features support {EVA_METHODS}, not {method!r}")
        t = self.trunk
        x = t.patch_embed.proj(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = t.patch_embed.norm(x)
        cls = t.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        g0 = tuple(t.patch_embed.grid_size)
        x = x + resample_pos_embed(t.pos_embed[0], g0, grid).to(x.dtype)[None]
        x = t.norm_pre(t.pos_drop(x))
        rope = self._rope(grid)
        for blk in t.blocks[:-1]:
            x = blk(x, rope=rope)
        last = t.blocks[-1]
        attn = last.attn
        h = last.norm1(x)
        v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias) if attn.qkv is None else self._fused_v(attn, h)
        y = attn.proj(attn.norm(v))
        if last.gamma_1 is not None:
            y = last.gamma_1 * y
        if method == "clipself":
            y = x + y
            m = last.mlp(last.norm2(y))
            y = y + (last.gamma_2 * m if last.gamma_2 is not None else m)
        return self._head(y)

    @staticmethod
    def _fused_v(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        c = attn.qkv.weight.shape[0] // 3
        bias = attn.v_bias if getattr(attn, "v_bias", None) is not None else None
        return F.linear(h, attn.qkv.weight[2 * c :], bias)
