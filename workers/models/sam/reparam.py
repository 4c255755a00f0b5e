"""Inference copies of re-parameterisable image backbones: EdgeTAM's RepViT, the same numbers with less work.

EdgeTAM's image encoder is a timm RepViT (``TimmWrapperModel``): every convolution carries its own
BatchNorm, and every token mixer adds a 3×3 and a 1×1 depthwise branch to the identity (RepVGG style). At
inference each such group is one convolution (timm's ``reparameterize_model``: the BatchNorms folded into
the weights, the branches summed into one kernel), which computes the same outputs up to float rounding
(about 1e-6 relative) with 106 fewer BatchNorm passes and 23 fewer convolutions per image.

:class:`ReparamBackbone` keeps such a folded copy next to the model, never in it: the model's own modules,
state dict and checkpoints stay those of the published architecture, and training sees the original
branches. The copy is folded when it is set up on a backbone in eval mode (at the engine's load, not on
its first click: folding EdgeTAM's RepViT takes about 0.2 s on two cores), stands in for the backbone only
inside :meth:`ReparamBackbone.active`, for a forward without gradients on a backbone in eval mode, and is
folded again whenever a backbone parameter or BatchNorm statistic has changed (another tensor, or an
in-place update) since the last fold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from itertools import chain
from typing import Any

import torch
from torch import nn

__all__ = ["ReparamBackbone", "reparameterisable"]

log = logging.getLogger(__name__)

_HOOKS = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's blocks offer for inference


def reparameterisable(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` folds for inference (timm's ``fuse``/``reparameterize``)."""
    return any(callable(getattr(m, hook, None)) for m in module.modules() for hook in _HOOKS)


def _timm_backbone(model: Any) -> tuple[nn.Module, str] | None:
    """``(holder, attribute)`` of a timm backbone inside the model's image encoder that folds for inference
    (EdgeTAM's ``vision_encoder.backbone.timm_model``), else None."""
    encoder = getattr(model, "vision_encoder", None)
    holder = getattr(encoder, "backbone", None)
    inner = getattr(holder, "timm_model", None)
    if isinstance(inner, nn.Module) and reparameterisable(inner):
        return holder, "timm_model"
    return None


class ReparamBackbone:
    """The folded inference copy of a model's re-parameterisable image backbone (see the module's doc),
    folded here when the backbone is in eval mode; a no-op for models without one."""

    def __init__(self, model: Any) -> None:
        self._slot = _timm_backbone(model)
        self._key: tuple | None = None
        self._folded: nn.Module | None = None
        if self._slot is not None:
            holder, name = self._slot
            backbone = getattr(holder, name)
            if not backbone.training:
                self.folded(backbone)

    @property
    def applies(self) -> bool:
        """Whether the model has a backbone to fold."""
        return self._slot is not None

    def _state_key(self, backbone: nn.Module) -> tuple:
        tensors = chain(backbone.parameters(), backbone.buffers())
        return (id(backbone), *((id(t), t.data_ptr(), t._version) for t in tensors))

    def folded(self, backbone: nn.Module) -> nn.Module:
        """The folded copy of ``backbone`` as it is now (folded again when its tensors changed)."""
        key = self._state_key(backbone)
        if self._folded is None or key != self._key:
            from timm.utils.model import reparameterize_model

            with torch.no_grad():
                self._folded = reparameterize_model(backbone, inplace=False).eval()
            self._key = key
            log.debug("folded %s for inference", type(backbone).__name__)
        return self._folded

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the model's backbone is the folded copy, when the forward records no gradient
        and the backbone is in eval mode; the model's own backbone is back afterwards. Not re-entrant
        across threads: callers serialise the forward (the SAM engine holds its lock)."""
        if self._slot is None or torch.is_grad_enabled():
            yield
            return
        holder, name = self._slot
        original = getattr(holder, name)
        if original.training:
            yield
            return
        setattr(holder, name, self.folded(original))
        try:
            yield
        finally:
            setattr(holder, name, original)
