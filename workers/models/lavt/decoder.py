"""LAVT's simple top-down decoder: fuses the four stage outputs into 2-class logits at 1/4 resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SimpleDecoding(nn.Module):
    """``c4_dims`` = channels of the last stage (1024 for Swin-B); hidden width ``c4_dims // factor``.

    Each step upsamples the coarser map (bilinear, ``align_corners=True``) to the next stage's size,
    concatenates, and applies two conv3×3-BN-ReLU; ``conv1_1`` gives background/target logits.
    """

    def __init__(self, c4_dims: int, factor: int = 2) -> None:
        super().__init__()
        hidden = c4_dims // factor
        c3, c2, c1 = c4_dims // factor, c4_dims // factor**2, c4_dims // factor**3
        for tag, cin in (("4", c4_dims + c3), ("3", hidden + c2), ("2", hidden + c1)):
            self.add_module(f"conv1_{tag}", nn.Conv2d(cin, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn1_{tag}", nn.BatchNorm2d(hidden))
            self.add_module(f"relu1_{tag}", nn.ReLU())
            self.add_module(f"conv2_{tag}", nn.Conv2d(hidden, hidden, 3, padding=1, bias=False))
            self.add_module(f"bn2_{tag}", nn.BatchNorm2d(hidden))
            self.add_module(f"relu2_{tag}", nn.ReLU())
        self.conv1_1 = nn.Conv2d(hidden, 2, 1)

    def _fuse(self, tag: str, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        if coarse.shape[-2:] != fine.shape[-2:]:
            coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([coarse, fine], dim=1)
        for step in ("1", "2"):
            x = getattr(self, f"conv{step}_{tag}")(x)
            x = getattr(self, f"bn{step}_{tag}")(x)
            x = getattr(self, f"relu{step}_{tag}")(x)
        return x

    def forward(self, c4: torch.Tensor, c3: torch.Tensor, c2: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        x = self._fuse("4", c4, c3)
        x = self._fuse("3", x, c2)
        x = self._fuse("2", x, c1)
        return self.conv1_1(x)
