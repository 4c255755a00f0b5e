"""``LavtEngine``: (image, referring expression) pairs → foreground probability at the original size."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.versions import with_precision
from workers.models.device import autocast_context, resolve_device, resolve_precision, version_precision
from workers.models.lavt.config import LavtConfig, lavt_model_version
from workers.models.lavt.factory import load_network
from workers.models.lavt.model import IMAGE_MEAN, IMAGE_STD, LavtNetwork
from workers.models.lavt.text import load_tokenizer, tokenize

log = logging.getLogger(__name__)


def image_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """LAVT's input: RGB, bilinear resize to size×size (aspect not kept), ImageNet normalisation."""
    rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


class LavtEngine:
    """LAVT loaded once, answering batches of (image, expression) pairs.

    ``checkpoint``: an official LAVT ``.pth``, a plain state dict or one of our training checkpoints;
    ``None`` builds random weights (tests, benchmarks). The probability is the softmax of the two
    logits after upsampling the 1/4-resolution logits bilinearly (``align_corners=True``) straight to
    each image's original size (LAVT upsamples to 480 first; going directly avoids a second resampling).
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        config: LavtConfig | None = None,
        *,
        network: LavtNetwork | None = None,
        tokenizer: Any = None,
    ) -> None:
        if network is not None:
            self.network, extras = network, {}
        else:
            self.network, extras = load_network(checkpoint, config)
        self.config: LavtConfig = self.network.config
        self.device = resolve_device(self.config.device)
        #: ``fp32`` or ``bf16`` (autocast): ``precision`` when it names one, else bf16 on CUDA and on a CPU
        #: as ``cpu_precision`` resolves there.
        self.precision = resolve_precision(self.device, self.config.precision, self.config.cpu_precision)
        self.network.to(self.device).eval()
        if tokenizer is None:
            vocab = extras.get("tokenizer_vocab") if self.config.tokenizer is None else None
            tokenizer = load_tokenizer(self.config.tokenizer, vocab=vocab, cache_dir=self.config.cache_dir)
        self.tokenizer = tokenizer
        vocab_size = self.network.bert_model.config.vocab_size
        if len(self.tokenizer.get_vocab()) > vocab_size:
            raise UserError(
                f"the tokenizer has {len(self.tokenizer.get_vocab())} tokens but the model's BERT "
                f"only {vocab_size}: use the tokenizer the model was trained with"
            )
        self.version_precision = version_precision(self.device, self.precision)
        name = lavt_model_version(
            self.config.variant, None if checkpoint is None else str(checkpoint), custom=network is not None
        )
        self.model_version = with_precision(name, self.version_precision)

    @torch.inference_mode()
    def probabilities(
        self,
        images: Sequence[Image.Image],
        expressions: Sequence[str],
    ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Per pair: float32 foreground probability [H, W] at the image's original size, and meta
        ``{"tokens": N, "truncated": bool}`` (truncated when the expression exceeded ``max_tokens``)."""
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images but {len(expressions)} expressions")
        cfg = self.config
        ids, mask, metas = tokenize(self.tokenizer, expressions, cfg.max_tokens)
        out: list[tuple[np.ndarray, dict[str, Any]]] = []
        for start in range(0, len(images), max(1, cfg.batch_size)):
            chunk = images[start : start + cfg.batch_size]
            batch = torch.stack([image_tensor(im, cfg.image_size) for im in chunk]).to(self.device)
            b_ids = ids[start : start + len(chunk)].to(self.device)
            b_mask = mask[start : start + len(chunk)].to(self.device)
            with autocast_context(self.device, self.precision):
                logits = self.network(batch, b_ids, b_mask, upsample=False)
            logits = logits.float()
            for k, image in enumerate(chunk):
                w, h = image.size
                full = F.interpolate(logits[k : k + 1], size=(h, w), mode="bilinear", align_corners=True)
                prob = torch.softmax(full, dim=1)[0, 1]
                out.append((prob.cpu().numpy().astype(np.float32, copy=False), dict(metas[start + k])))
        return out
