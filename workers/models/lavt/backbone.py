"""The LAVT image encoder: a Swin Transformer with a pixel-word attention module (PWAM) and a language
gate at the end of every stage.

Module and parameter names follow the official implementation so that its checkpoints load with
``strict=True`` (``backbone.layers.{i}.blocks.{j}.attn.relative_position_bias_table``,
``backbone.layers.{i}.fusion.image_lang_att.f_query.0.weight``, ``backbone.norm{i}.weight``, ...).
Inputs of any size work: the patch embedding, the windows and the patch merging pad as Swin does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Swin's feed-forward block: fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def relative_position_index(window: int) -> torch.Tensor:
    """``[window², window²]`` index into the ``(2·window−1)²`` relative position bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # [N, N, 2]
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with Swin's learned relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        # Persistent, as in the official code: it is part of the published checkpoints.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: [windows·B, N, C]; ``mask``: [windows, N, N] additive (0 or −100) or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).permute(2, 0, 1)  # [heads, N, N]
        if mask is None:
            attn_bias = bias.unsqueeze(0)
        else:
            nw = mask.shape[0]
            attn_bias = bias.unsqueeze(0) + mask.unsqueeze(1).to(bias.dtype)  # [nW, heads, N, N]
            attn_bias = (
                attn_bias.unsqueeze(0).expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
            )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] → [B·nW, window², C] (H and W multiples of window)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention and MLP, each with a pre-norm residual; pads to whole windows."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        b, _, c = x.shape
        ws = self.window
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), mask=attn_mask if self.shift else None)
        x = window_reverse(windows, ws, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_r or pad_b:
            x = x[:, :h, :w, :]
        x = shortcut + self.drop_path(x.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2×2 neighbourhood concatenation (odd sizes padded), LayerNorm, linear 4C → 2C."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.reshape(b, -1, 4 * c)))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch``×``patch`` convolution (input padded right/bottom), then LayerNorm."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        _, _, h, w = x.shape
        p = self.patch
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        x = self.proj(x)
        hh, ww = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), hh, ww


class SpatialImageLanguageAttention(nn.Module):
    """Each pixel attends over the words: query from the pixel, key and value from BERT features.

    The scale is ``key_channels^-0.5`` over all heads and padded words get −1e4, as in LAVT. The
    InstanceNorm1d layers (``f_query.1``, ``W.1``) have no parameters and no running statistics.
    """

    def __init__(
        self,
        v_in: int,
        l_in: int,
        key_channels: int,
        value_channels: int,
        out_channels: int,
        num_heads: int = 1,
    ) -> None:
        super().__init__()
        if key_channels % num_heads or value_channels % num_heads:
            raise ValueError(f"PWAM heads ({num_heads}) must divide its channels ({key_channels})")
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.num_heads = num_heads
        self.f_key = nn.Sequential(nn.Conv1d(l_in, key_channels, 1))
        self.f_query = nn.Sequential(nn.Conv1d(v_in, key_channels, 1), nn.InstanceNorm1d(key_channels))
        self.f_value = nn.Sequential(nn.Conv1d(l_in, value_channels, 1))
        self.W = nn.Sequential(nn.Conv1d(value_channels, out_channels, 1), nn.InstanceNorm1d(out_channels))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        """``x``: [B, HW, C]; ``lang``: [B, l_in, N]; ``lang_mask``: [B, N, 1] → [B, HW, out]."""
        b, hw, _ = x.shape
        heads = self.num_heads
        mask = lang_mask.permute(0, 2, 1).to(lang.dtype)  # [B, 1, N]
        query = self.f_query(x.permute(0, 2, 1))  # [B, key, HW]
        key = self.f_key(lang) * mask  # [B, key, N]
        value = self.f_value(lang) * mask  # [B, value, N]
        n = lang.shape[-1]
        query = query.reshape(b, heads, self.key_channels // heads, hw).transpose(2, 3)  # [B, h, HW, c]
        key = key.reshape(b, heads, self.key_channels // heads, n)
        value = value.reshape(b, heads, self.value_channels // heads, n)
        sim = torch.matmul(query, key) * (self.key_channels**-0.5)  # [B, h, HW, N]
        sim = sim + (1e4 * mask.unsqueeze(1) - 1e4)
        sim = F.softmax(sim, dim=-1)
        out = torch.matmul(sim, value.transpose(2, 3))  # [B, h, HW, c]
        out = out.permute(0, 2, 1, 3).reshape(b, hw, self.value_channels).permute(0, 2, 1)
        return self.W(out).permute(0, 2, 1)


class PWAM(nn.Module):
    """Pixel-word attention module: visual projection ⊙ language-attended features, then projection."""

    def __init__(self, dim: int, l_in: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.vis_project = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))
        self.image_lang_att = SpatialImageLanguageAttention(dim, l_in, dim, dim, dim, num_heads=num_heads)
        self.project_mm = nn.Sequential(nn.Conv1d(dim, dim, 1), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> torch.Tensor:
        vis = self.vis_project(x.permute(0, 2, 1))  # [B, C, HW]
        att = self.image_lang_att(x, lang, lang_mask).permute(0, 2, 1)  # [B, C, HW]
        return self.project_mm(vis * att).permute(0, 2, 1)  # [B, HW, C]


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Swin's additive mask [nW, window², window²] keeping attention inside the pre-shift regions."""
    img = torch.zeros((1, hp, wp, 1), device=device)
    cnt = 0
    for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for wsl in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    windows = window_partition(img, window).squeeze(-1)  # [nW, N]
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class MMBasicLayer(nn.Module):
    """One stage: Swin blocks, PWAM, language gate, then patch merging (all but the last stage)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        drop_path: Sequence[float],
        l_in: int,
        fusion_heads: int,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio, drop_path[i]
            )
            for i in range(depth)
        )
        self.fusion = PWAM(dim, l_in, num_heads=fusion_heads)
        self.res_gate = nn.Sequential(
            nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, dim, bias=False), nn.Tanh()
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, h: int, w: int, lang: torch.Tensor, lang_mask: torch.Tensor):
        """Returns (PWAM output, h, w, input of the next stage, its h, its w)."""
        hp, wp = math.ceil(h / self.window) * self.window, math.ceil(w / self.window) * self.window
        mask = (
            shifted_window_mask(hp, wp, self.window, self.shift, x.device) if len(self.blocks) > 1 else None
        )
        for blk in self.blocks:
            x = blk(x, h, w, mask)
        x_residual = self.fusion(x, lang, lang_mask)
        x = x + self.res_gate(x_residual) * x_residual
        if self.downsample is None:
            return x_residual, h, w, x, h, w
        return x_residual, h, w, self.downsample(x, h, w), (h + 1) // 2, (w + 1) // 2


class MultiModalSwinTransformer(nn.Module):
    """The LAVT backbone: returns the four normalised PWAM outputs [B, C_i, H/2^(i+2), W/2^(i+2)]."""

    def __init__(
        self,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 12,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        l_in: int = 768,
        fusion_heads: Sequence[int] = (1, 1, 1, 1),
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.layers = nn.ModuleList()
        start = 0
        for i, depth in enumerate(depths):
            self.layers.append(
                MMBasicLayer(
                    self.num_features[i],
                    depth,
                    num_heads[i],
                    window_size,
                    mlp_ratio,
                    rates[start : start + depth],
                    l_in,
                    fusion_heads[i],
                    downsample=i < len(depths) - 1,
                )
            )
            start += depth
        for i, dim in enumerate(self.num_features):
            self.add_module(f"norm{i}", nn.LayerNorm(dim))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, lang: torch.Tensor, lang_mask: torch.Tensor) -> list[torch.Tensor]:
        """``x``: [B, 3, H, W]; ``lang``: [B, l_in, N]; ``lang_mask``: [B, N, 1]."""
        x, h, w = self.patch_embed(x)
        outs = []
        for i, layer in enumerate(self.layers):
            x_out, ho, wo, x, h, w = layer(x, h, w, lang, lang_mask)
            x_out = getattr(self, f"norm{i}")(x_out)
            outs.append(x_out.view(-1, ho, wo, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return outs


def _init_weights(m: nn.Module) -> None:
    # The official training applies this to the whole backbone (language gates included) before the
    # ImageNet Swin weights are loaded over it; the gates therefore start small, not at zero.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
