"""GEM's dual-path vision transformer, built around an open_clip ``VisionTransformer`` (batch-first).

The wrapper reuses the tower's own parameters (it adds none) and never changes the wrapped module: CLIP's
``encode_image`` keeps working exactly as before. Eight dense-feature methods share the code:

- ``gem``: the last ``gem_depth - 1`` blocks run two paths. The original path is CLIP's block, unchanged.
  The GEM path is a residual stream without MLP that accumulates ``out_proj(SSAttn(ln_1(x_ori)))``, where
  SSAttn is the q-q / k-k / v-v self-self attention on L2-normalised per-head features with the adaptive
  temperature, iterated ``ss_attn_iter`` times and finally assigned to the original v.
- ``maskclip``: the last block's value path only (``out_proj(v)``), no q·k attention.
- ``original``: CLIP's ordinary patch tokens.
- ``clip_surgery``: GEM's dual path with plain v-v attention ``softmax(v vᵀ / √d) v`` (no normalisation, no
  iterations); the class token comes from the original path. Feature surgery is not applied.
- ``sclip``: the last block's attention becomes ``(softmax(q qᵀ/√d) + softmax(k kᵀ/√d)) v``; the residual
  and the MLP are kept.
- ``clearclip``: the last block is ``out_proj(softmax(q qᵀ/√d) v)`` alone (no residual, no MLP).
- ``naclip``: the last block is ``out_proj(softmax(k kᵀ/√d + G) v)`` alone, with ``G`` a Gaussian of the
  patch-grid distance (std ``naclip_std`` patches, 0 for the class token's row and column).
- ``clipself``: CLIPSelf's dense path: the last block with its attention replaced by the value path,
  ``x + out_proj(v)``, then the block's MLP.

``ln_post`` and ``proj`` are applied to every path's tokens.

Every read of a block's attention goes through :class:`BlockAttention`, which understands both attention
layouts of open_clip's ``ResidualAttentionBlock``: ``nn.MultiheadAttention`` (open_clip 2.x/3.x releases) and
open_clip's own ``Attention`` module (its main branch). Both keep the q/k/v projection as a fused
``in_proj_weight`` (or separate ``q/k/v_proj_weight``) with ``in_proj_bias``, and an ``out_proj`` linear, so
every method gives the same numbers on either layout. ``Attention`` options that change the attention math
are refused, not emulated, with an error naming the option: ``qk_norm``, ``scaled_cosine`` (learned logit
scale), ``scale_heads``, ``inner_norm`` and a ``scale`` other than ``head_dim ** -0.5``; so are
``nn.MultiheadAttention``'s ``add_bias_kv`` and ``add_zero_attn``. Dropout is not applied (inference only).

Every block, the unchanged ones before GEM's path included, runs its attention as q/k/v from
:class:`BlockAttention` through :mod:`.kernels` (oneDNN row blocks for fp32 on the CPU, fused
``scaled_dot_product_attention`` elsewhere), never through the attention module's own forward
(``nn.MultiheadAttention``'s CPU fast path materialises the N×N attention matrix). For ``gem`` the
last block's original attention, MLP and head, which nothing reads, are not computed.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import METHODS

__all__ = [
    "DENSE_METHODS",
    "BlockAttention",
    "GemVisionTower",
    "gaussian_prior",
    "adaptive_inverse_temperature",
    "resample_pos_embed",
    "self_self_attention",
]

log = logging.getLogger(__name__)


def resample_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample a ``[1 + gh*gw, C]`` position embedding (class token first) to another grid.

    Bicubic, antialiased, computed in float32; returns the input itself when the grid is unchanged.
    """
    old_grid = (int(old_grid[0]), int(old_grid[1]))
    new_grid = (int(new_grid[0]), int(new_grid[1]))
    if old_grid == new_grid:
        return pos_embed
    if pos_embed.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(
            f"position embedding has {pos_embed.shape[0]} rows, expected 1 + {old_grid[0]}*{old_grid[1]}"
        )
    cls_pos, grid_pos = pos_embed[:1], pos_embed[1:]
    width = pos_embed.shape[-1]
    grid = grid_pos.float().reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(pos_embed.dtype)
    return torch.cat([cls_pos, grid], dim=0)


def adaptive_inverse_temperature(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """GEM's adaptive inverse temperature per image: mean token norm of ``x [B, N, C]`` × head_dim^-0.5."""
    return x.float().norm(dim=-1).mean(dim=-1) * head_dim**-0.5


def self_self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_temp: torch.Tensor | float,
    iters: int = 1,
) -> torch.Tensor:
    """GEM's self-self attention on per-head features ``[B, H, N, d]``; returns ``[B, H, N, d]``.

    On fp32 CPU tensors without autograd this runs on oneDNN (:func:`kernels.self_self_attention_rows`:
    row blocks per head, the three final softmax matrices summed before one product with v). Elsewhere the
    three branches (v-v, k-k, q-q) are stacked on the batch axis so that each step is one fused
    ``scaled_dot_product_attention`` call. A per-image inverse temperature (tensor ``[B]``) is folded into the
    queries; a scalar goes to ``scale=``.
    """
    if kernels.onednn_usable(q, k, v):
        return kernels.self_self_attention_rows(q, k, v, inv_temp, iters)
    b = q.shape[0]
    xs = torch.stack([v, k, q], dim=0)  # [3, B, H, N, d]
    if isinstance(inv_temp, torch.Tensor):
        temp = inv_temp.to(device=q.device, dtype=q.dtype).reshape(1, b, 1, 1, 1)
        scale = 1.0
    else:
        temp = None
        scale = float(inv_temp)

    flat = (3 * b, *xs.shape[2:])

    def attend(xn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # softmax(x̂ x̂ᵀ · inv_temp) @ values for the three branches at once; x̂ is already L2-normalised.
        query = xn * temp if temp is not None else xn
        out = F.scaled_dot_product_attention(
            query.reshape(flat), xn.reshape(flat), values.reshape(flat), scale=scale
        )
        return out.reshape(3, b, *out.shape[1:])

    for _ in range(iters):
        xn = F.normalize(xs, dim=-1)
        xs = attend(xn, xn)
    assigned = attend(F.normalize(xs, dim=-1), v.unsqueeze(0).expand(3, *v.shape))
    return assigned.mean(dim=0)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class BlockAttention:
    """A block's attention parameters, read alike for ``nn.MultiheadAttention`` and open_clip's ``Attention``.

    Holds the module (not copies of its tensors), so it follows ``.to()``/``.half()`` of the model. Raises
    ``ValueError`` for any other class, or for an option whose math the tower does not reproduce.
    """

    def __init__(self, attn: nn.Module) -> None:
        _check_attention(attn)
        self.module = attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)

    def _projections(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of the q, k and v projections, whichever layout holds them."""
        attn = self.module
        bias = attn.in_proj_bias
        biases = bias.chunk(3) if bias is not None else (None, None, None)
        fused = getattr(attn, "in_proj_weight", None)
        if fused is not None:
            weights = fused.chunk(3, dim=0)
        else:
            weights = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
        return list(zip(weights, biases, strict=True))

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v ``[B, heads, N, head_dim]`` of ``h = ln_1(x)`` (one matmul when fused)."""
        fused = getattr(self.module, "in_proj_weight", None)
        if fused is not None:
            q, k, v = kernels.linear(h, fused, self.module.in_proj_bias).chunk(3, dim=-1)
        else:
            q, k, v = (kernels.linear(h, w, b) for w, b in self._projections())
        return _heads(q, self.num_heads), _heads(k, self.num_heads), _heads(v, self.num_heads)

    def value(self, h: torch.Tensor) -> torch.Tensor:
        """Per-head v ``[B, heads, N, head_dim]`` alone (q and k are not computed)."""
        w, b = self._projections()[2]
        return _heads(kernels.linear(h, w, b), self.num_heads)

    def out(self, o: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The output projection of per-head features ``[B, heads, N, head_dim]``; returns ``[B, N, C]``,
        plus ``residual`` when given (fused into the product where the kernels allow)."""
        proj = self.module.out_proj
        return kernels.linear(_merge(o), proj.weight, proj.bias, residual=residual)


class GemVisionTower(nn.Module):
    """Dense patch features from an open_clip ``VisionTransformer`` with GEM, MaskCLIP or CLIP's own path."""

    def __init__(
        self,
        visual: nn.Module,
        gem_depth: int = 7,
        ss_attn_iter: int = 1,
        ss_attn_temp: float | None = None,
    ) -> None:
        super().__init__()
        attentions = _check_supported(visual)
        blocks = visual.transformer.resblocks
        if gem_depth < 2:
            raise ValueError(f"gem_depth must be >= 2 (it replaces the last gem_depth-1 blocks): {gem_depth}")
        if gem_depth > len(blocks) + 1:
            log.warning("gem_depth %d exceeds a %d-block ViT; using all blocks", gem_depth, len(blocks))
            gem_depth = len(blocks) + 1
        self.visual = visual
        self._attentions = attentions  # one adapter per block, in block order
        self.gem_depth = int(gem_depth)
        self.ss_attn_iter = int(ss_attn_iter)
        self.ss_attn_temp = ss_attn_temp
        #: The CPU path (:data:`kernels.PATHS`) that :meth:`forward` and :meth:`dense_features` take; None
        #: keeps the caller's (``packed`` unless set with :func:`kernels.using`). The numbers are the same.
        self.cpu_kernels: str | None = None
        #: The arithmetic of the CPU products (:data:`kernels.PRECISIONS`): ``bf16`` rounds the operands of
        #: the linear layers and attention products to bf16 (autocast on the ``torch`` path); None keeps
        #: the caller's (fp32 unless set with :func:`kernels.using`).
        self.cpu_precision: str | None = None

    @property
    def patch_size(self) -> tuple[int, int]:
        """Patch size (height, width)."""
        ps = self.visual.patch_size
        return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (rows, cols) for an input of ``height × width`` pixels."""
        ph, pw = self.patch_size
        return (height // ph, width // pw)

    def embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, add the class token and the (resampled) position embedding, apply ``ln_pre``."""
        vis = self.visual
        x = vis.conv1(pixels)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + self._position_embedding(grid).to(x.dtype)
        x = vis.patch_dropout(x)
        x = vis.ln_pre(x)
        return x, grid

    def _position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding resampled to ``grid``, kept for the last grid while the parameter is
        unchanged (same tensor, same in-place version) and no gradient is recorded."""
        pos = self.visual.positional_embedding
        if torch.is_grad_enabled() and pos.requires_grad:
            return resample_pos_embed(pos, tuple(self.visual.grid_size), grid)
        key = (grid, pos.data_ptr(), pos._version, pos.dtype, pos.device)
        cached = getattr(self, "_pos_cache", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, resample_pos_embed(pos, tuple(self.visual.grid_size), grid))
            self._pos_cache = cached
        return cached[1]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.visual.ln_post(x)
        if self.visual.proj is not None:
            x = x @ self.visual.proj
        return x

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A block's own attention ``softmax(q kᵀ / √d) v`` (oneDNN row blocks on the CPU, else SDPA)."""
        return kernels.attention(q, k, v)

    @staticmethod
    def _residual_attention(block: nn.Module, attn: BlockAttention, x: torch.Tensor, o: torch.Tensor):
        """``x + ls_1(out_proj(o))``, the add fused into the output projection when ``ls_1`` is identity."""
        if isinstance(block.ls_1, nn.Identity):
            return attn.out(o, residual=x)
        return x + block.ls_1(attn.out(o))

    @staticmethod
    def _mlp(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x + ls_2(mlp(ln_2(x)))``: open_clip's c_fc / GELU / c_proj MLP on :func:`kernels.linear` (GELU
        and the residual add fused where they can be), any other MLP through its own module."""
        mlp, h = block.mlp, block.ln_2(x)
        parts = dict(mlp.named_children()) if isinstance(mlp, nn.Sequential) else {}
        if set(parts) != {"c_fc", "gelu", "c_proj"} or not all(
            isinstance(parts[n], nn.Linear) for n in ("c_fc", "c_proj")
        ):
            return x + block.ls_2(mlp(h))
        fc, act, proj = parts["c_fc"], parts["gelu"], parts["c_proj"]
        if isinstance(act, nn.GELU) and act.approximate == "none":
            h = kernels.linear(h, fc.weight, fc.bias, gelu=True)
        else:
            h = act(kernels.linear(h, fc.weight, fc.bias))
        if isinstance(block.ls_2, nn.Identity):
            return kernels.linear(h, proj.weight, proj.bias, residual=x)
        return x + block.ls_2(kernels.linear(h, proj.weight, proj.bias))

    @classmethod
    def _block(cls, block: nn.Module, attn: BlockAttention, x: torch.Tensor) -> torch.Tensor:
        """One unchanged ViT block, its attention on q/k/v from :class:`BlockAttention` and :meth:`_attend`
        (no N×N attention matrix, unlike ``nn.MultiheadAttention``'s CPU fast path); the same numbers as
        ``block(x)``."""
        q, k, v = attn.qkv(block.ln_1(x))
        x = cls._residual_attention(block, attn, x, cls._attend(q, k, v))
        return cls._mlp(block, x)

    def _blocks(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """The unchanged blocks ``[0, stop)`` applied to tokens ``x``."""
        blocks = self.visual.transformer.resblocks
        for block, attn in zip(blocks[:stop], self._attentions[:stop], strict=True):
            x = self._block(block, attn, x)
        return x

    def _gem_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """GEM's self-self attention (q-q, k-k, v-v ensemble) at the adaptive or the fixed temperature."""
        if self.ss_attn_temp is None:
            inv_temp: torch.Tensor | float = adaptive_inverse_temperature(h, head_dim)
        else:
            inv_temp = float(self.ss_attn_temp)
        return self_self_attention(q, k, v, inv_temp, self.ss_attn_iter)

    @staticmethod
    def _surgery_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: torch.Tensor, head_dim: int
    ) -> torch.Tensor:
        """CLIP Surgery's v-v attention at CLIP's own scale."""
        return F.scaled_dot_product_attention(v, v, v)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GEM's forward: ``(gem_tokens, original_tokens)``, each ``[B, 1 + gh*gw, D]`` after ln_post/proj."""
        with kernels.using(self.cpu_kernels, self.cpu_precision):
            gem, ori = self._dual(pixels, self._gem_attention)
        assert ori is not None
        return gem, ori

    def _dual(
        self, pixels: torch.Tensor, side_attention, *, original: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dual path over the last ``gem_depth - 1`` blocks: the original blocks unchanged, and the
        side path (no MLP) adding ``out_proj(side_attention(q, k, v, h, head_dim))`` computed from the
        original path's tokens ``h = ln_1(x)``. Returns ``(side_tokens, original_tokens)``; with
        ``original=False`` the last block's original attention, MLP and head (which nothing reads) are
        skipped and ``None`` takes the original tokens' place."""
        x, _ = self.embed(pixels)
        blocks = self.visual.transformer.resblocks
        start = len(blocks) - (self.gem_depth - 1)
        x = self._blocks(x, start)
        x_side = x
        last = len(blocks) - 1
        for i in range(start, len(blocks)):
            block, attn = blocks[i], self._attentions[i]
            h = block.ln_1(x)
            q, k, v = attn.qkv(h)
            x_side = self._residual_attention(block, attn, x_side, side_attention(q, k, v, h, attn.head_dim))
            if i == last and not original:
                return self._head(x_side), None
            x = self._mlp(block, self._residual_attention(block, attn, x, self._attend(q, k, v)))
        return self._head(x_side), self._head(x)

    def clip_surgery(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP Surgery's tokens ``[B, 1 + gh*gw, D]``: v-v dual path, class token from the original path."""
        sur, ori = self._dual(pixels, self._surgery_attention)
        assert ori is not None
        return torch.cat([ori[:, :1], sur[:, 1:]], dim=1)

    def _up_to_last_block(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], nn.Module]:
        """The tokens entering the last block (every block before it run unchanged), the grid, that block."""
        x, grid = self.embed(pixels)
        blocks = self.visual.transformer.resblocks
        return self._blocks(x, len(blocks) - 1), grid, blocks[-1]

    def last_block_variant(self, pixels: torch.Tensor, method: str, naclip_std: float = 5.0) -> torch.Tensor:
        """Tokens ``[B, 1 + gh*gw, D]`` of a method that changes only the last block's attention
        (``sclip``, ``clearclip``, ``naclip``, ``clipself``)."""
        x, grid, last = self._up_to_last_block(pixels)
        attn = self._attentions[-1]
        if method == "clipself":
            y = x + last.ls_1(attn.out(attn.value(last.ln_1(x))))
            return self._head(y + last.ls_2(last.mlp(last.ln_2(y))))
        q, k, v = attn.qkv(last.ln_1(x))
        if method == "sclip":
            out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
            y = x + last.ls_1(attn.out(out))
            return self._head(y + last.ls_2(last.mlp(last.ln_2(y))))
        if method == "clearclip":
            return self._head(attn.out(F.scaled_dot_product_attention(q, q, v)))
        if method == "naclip":
            prior = gaussian_prior(grid, naclip_std, device=x.device, dtype=q.dtype)
            out = F.scaled_dot_product_attention(k, k, v, attn_mask=prior)
            return self._head(attn.out(out))
        raise ValueError(f"unknown last-block method {method!r}")

    def original(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's ordinary tokens ``[B, 1 + gh*gw, D]`` (the unchanged blocks), after ln_post/proj."""
        x, _ = self.embed(pixels)
        return self._head(self._blocks(x, len(self.visual.transformer.resblocks)))

    def maskclip(self, pixels: torch.Tensor) -> torch.Tensor:
        """MaskCLIP tokens ``[B, 1 + gh*gw, D]``: the last block's ``out_proj(v)``, then ln_post/proj."""
        x, _, last = self._up_to_last_block(pixels)
        attn = self._attentions[-1]
        return self._head(attn.out(attn.value(last.ln_1(x))))

    def dense_features(
        self, pixels: torch.Tensor, method: str = "gem", *, naclip_std: float = 5.0
    ) -> torch.Tensor:
        """Tokens ``[B, 1 + gh*gw, D]`` of the chosen method (class token first)."""
        with kernels.using(self.cpu_kernels, self.cpu_precision):
            return self._dense_features(pixels, method, naclip_std)

    def _dense_features(self, pixels: torch.Tensor, method: str, naclip_std: float) -> torch.Tensor:
        if method == "gem":
            return self._dual(pixels, self._gem_attention, original=False)[0]
        if method == "maskclip":
            return self.maskclip(pixels)
        if method == "original":
            return self.original(pixels)
        if method == "clip_surgery":
            return self.clip_surgery(pixels)
        if method in LAST_BLOCK_METHODS:
            return self.last_block_variant(pixels, method, naclip_std)
        raise ValueError(f"unknown method {method!r}; expected one of {DENSE_METHODS}")


LAST_BLOCK_METHODS = ("sclip", "clearclip", "naclip", "clipself")
DENSE_METHODS = METHODS  # every GemConfig method has dense features here


def gaussian_prior(
    grid: tuple[int, int], std: float, *, device=None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """NACLIP's additive attention prior ``[1 + gh*gw, 1 + gh*gw]``: ``exp(-|p - q|² / (2 std²))`` between
    patch positions p and q (in patches), 0 in the class token's row and column."""
    gh, gw = grid
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32, device=device),
        torch.arange(gw, dtype=torch.float32, device=device),
        indexing="ij",
    )
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    prior = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * std * std))
    return F.pad(prior, (1, 0, 1, 0)).to(dtype)


def _check_supported(visual: nn.Module) -> tuple[BlockAttention, ...]:
    """Refuse vision towers that GEM's block surgery does not describe (with the reason); return one
    :class:`BlockAttention` per block."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"GEM needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet, timm and other towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise ValueError("GEM does not support vision towers with attentional pooling")
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError("GEM expects a batch-first open_clip transformer (open_clip >= 2.26)")
    attentions = []
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock):
            raise ValueError(
                f"GEM supports open_clip's standard ResidualAttentionBlock, got {type(block).__name__}"
            )
        if hasattr(block, "ln_1_kv"):
            raise ValueError("GEM does not support cross-attention blocks")
        try:
            attentions.append(BlockAttention(block.attn))
        except ValueError as err:
            raise ValueError(f"block {i}: {err}") from None
    return tuple(attentions)


def _open_clip_attention() -> type | None:
    """open_clip's own ``Attention`` class, where the installed version has one."""
    from open_clip import transformer

    return getattr(transformer, "Attention", None)


def _active(module: nn.Module | None) -> bool:
    """Whether an optional norm layer is present (neither absent nor ``nn.Identity``)."""
    return module is not None and not isinstance(module, nn.Identity)


def _check_attention(attn: nn.Module) -> None:
    """Refuse an attention module that :class:`BlockAttention` cannot read exactly (naming what it found)."""
    oc_attention = _open_clip_attention()
    if isinstance(attn, nn.MultiheadAttention):
        if attn.bias_k is not None or attn.bias_v is not None:
            raise ValueError("GEM does not support nn.MultiheadAttention with add_bias_kv=True")
        if attn.add_zero_attn:
            raise ValueError("GEM does not support nn.MultiheadAttention with add_zero_attn=True")
    elif oc_attention is not None and isinstance(attn, oc_attention):
        scale = getattr(attn, "scale", None)
        refused = (
            ("qk_norm", _active(getattr(attn, "ln_q", None)) or _active(getattr(attn, "ln_k", None))),
            ("scaled_cosine (a learned logit_scale)", getattr(attn, "logit_scale", None) is not None),
            ("scale_heads", getattr(attn, "head_scale", None) is not None),
            ("inner_norm", _active(getattr(attn, "ln_inner", None))),
            (
                f"scale={scale} (GEM needs head_dim ** -0.5)",
                scale is not None and not math.isclose(float(scale), attn.head_dim**-0.5, rel_tol=1e-6),
            ),
        )
        for option, present in refused:
            if present:
                raise ValueError(f"GEM does not support open_clip Attention with {option}")
    else:
        raise ValueError(
            "GEM supports a block attention of nn.MultiheadAttention or open_clip's Attention, "
            f"got {type(attn).__module__}.{type(attn).__qualname__}"
        )
    if getattr(attn, "in_proj_weight", None) is None and any(
        getattr(attn, name, None) is None for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
    ):
        raise ValueError(f"{type(attn).__name__} has neither in_proj_weight nor q/k/v_proj_weight")
    if not isinstance(getattr(attn, "out_proj", None), nn.Linear):
        raise ValueError(f"{type(attn).__name__} has no out_proj linear layer")
