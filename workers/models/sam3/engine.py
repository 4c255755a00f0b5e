"""The SAM 3 engine: PIL images + noun phrases → every instance of each phrase, with its own score."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.versions import with_precision
from workers.models.device import autocast_context, resolve_device, resolve_precision, version_precision
from workers.models.gem.prompts import EmbeddingCache, normalize_prompt
from workers.models.inputs import check_images_and_prompts

from .config import SAM3_HUB_ID, Sam3Config
from .processor import MAX_TEXT_TOKENS, default_processor

log = logging.getLogger(__name__)

#: Upsample this many instance masks to the original size at a time (bounds memory on large images).
_UPSAMPLE_CHUNK = 16


@dataclass
class Instance:
    """One object SAM 3 found: the prompt that found it, its label group, score, mask and box."""

    prompt: str
    group: Hashable
    score: float  # the query's probability times the image-level presence probability, in [0, 1]
    mask: np.ndarray  # bool [H, W] at the image's original size
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image


def load_sam3(config: Sam3Config) -> tuple[Any, Any, str]:
    """``(Sam3Model, Sam3Processor, where the weights came from)`` for ``config.model``; random weights
    of the real architecture for None."""
    from transformers import Sam3Config as HfSam3Config
    from transformers import Sam3Model, Sam3Processor

    if config.model is None:
        model = Sam3Model(HfSam3Config())
        processor = default_processor(model.config.vision_config.backbone_config.image_size)
        return model, processor, "random initialisation"
    from workers.models.hf_weights import HubSource, load_pretrained

    src = HubSource(
        config.model,
        config.weights_dir,
        config.token,
        config.offline,
        variable="GROUNDLABEL_SAM3_MODEL",
        gated=config.model.strip().lower() == SAM3_HUB_ID,
    )
    model = load_pretrained(Sam3Model, src)
    processor = load_pretrained(Sam3Processor, src)
    return model, processor, config.model


class Sam3Engine:
    """SAM 3 loaded once, answering batches of images × prompts with instances (see ``docs/sam3.md``).

    ``model``/``processor``: an already-built ``Sam3Model`` (tests build tiny random ones) and its
    processor (default: :func:`~workers.models.sam3.processor.default_processor` at the model's size).
    """

    def __init__(self, config: Sam3Config | None = None, *, model: Any = None, processor: Any = None) -> None:
        self.config = config if config is not None else Sam3Config()
        self.config.validate()
        self.device = resolve_device(self.config.device)
        #: ``fp32`` or ``bf16`` (autocast): ``precision`` when it names one, else bf16 on CUDA and on a CPU
        #: as ``cpu_precision`` resolves there.
        self.precision = resolve_precision(self.device, self.config.precision, self.config.cpu_precision)
        self.version_precision = version_precision(self.device, self.precision)
        if model is None:
            model, loaded_processor, self.weights_source = load_sam3(self.config)
            processor = processor if processor is not None else loaded_processor
            self.model_version = self.config.model_version()
        else:
            self.weights_source = "model argument"
            self.model_version = self.config.model_version(custom=True)
        self.model_version = with_precision(self.model_version, self.version_precision)
        if processor is None:
            processor = default_processor(model.config.vision_config.backbone_config.image_size)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self._text_cache = EmbeddingCache(self.config.text_cache_size)
        self._lock = threading.RLock()  # one forward at a time; the text cache is shared

    @property
    def text_cache(self) -> EmbeddingCache:
        """The LRU cache of prompt features (``hits``/``misses`` counters included)."""
        return self._text_cache

    # ------------------------------------------------------------------- text
    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [P, 32, D], attention mask [P, 32])`` of the prompts, on the engine's device."""
        tokens = self.processor.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=MAX_TEXT_TOKENS,
            truncation=True,
            return_tensors="pt",
        )
        keys = [(self.model_version, normalize_prompt(p)) for p in prompts]
        feats: dict[Hashable, np.ndarray] = {}
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in feats or any(keys[m] == key for m in missing):
                continue
            cached = self._text_cache.get(key)
            if cached is None:
                missing.append(i)
            else:
                feats[key] = cached
        if missing:
            index = torch.as_tensor(missing)
            with autocast_context(self.device, self.precision):
                out = self.model.get_text_features(
                    input_ids=tokens["input_ids"][index].to(self.device),
                    attention_mask=tokens["attention_mask"][index].to(self.device),
                ).pooler_output
            for i, vec in zip(missing, out.float().cpu().numpy(), strict=True):
                feats[keys[i]] = vec
                self._text_cache.put(keys[i], vec)
        stacked = torch.from_numpy(np.stack([feats[k] for k in keys])).to(self.device)
        return stacked, tokens["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ image
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """SAM 3's input: RGB resized to the model's square size (aspect not kept), normalised."""
        rgb = [im.convert("RGB") for im in images]
        return self.processor.image_processor(rgb, return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def instances(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        groups: Sequence[Hashable] | None = None,
        min_score: float = 0.0,
    ) -> list[list[Instance]]:
        """Per image, the instances of every prompt scoring at least ``min_score``, best first.

        ``groups`` (one key per prompt) marks the synonyms of one label: their instances are merged when
        their masks overlap by ``merge_iou`` or more (default: each prompt is its own group)."""
        images, prompts = check_images_and_prompts(images, prompts)
        if groups is None:
            groups = list(prompts)
        if len(groups) != len(prompts):
            raise UserError(f"groups has {len(groups)} entries for {len(prompts)} prompts")
        if not images:
            return []
        if not prompts:
            return [[] for _ in images]
        cfg = self.config
        out: list[list[Instance]] = []
        with self._lock:
            text, text_mask = self.text_features(prompts)
            for start in range(0, len(images), cfg.batch_size):
                chunk = images[start : start + cfg.batch_size]
                found = self._detect(chunk, text, text_mask, min_score)
                for image, (scores, logits, boxes, prompt_of) in zip(chunk, found, strict=True):
                    out.append(self._instances(image, scores, logits, boxes, prompt_of, prompts, groups))
        return out

    def _detect(
        self, chunk: list[Image.Image], text: torch.Tensor, text_mask: torch.Tensor, min_score: float
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image: the kept queries' scores, low-resolution mask logits, boxes and prompt indices."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        cfg = self.config
        n_prompts = text.shape[0]
        pixels = self.preprocess(chunk).to(self.device)
        with autocast_context(self.device, self.precision):
            vision = self.model.get_vision_features(pixel_values=pixels)
        kept: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in chunk]
        pairs = [(i, j) for i in range(len(chunk)) for j in range(n_prompts)]
        for start in range(0, len(pairs), cfg.pair_batch):
            part = pairs[start : start + cfg.pair_batch]
            ii = torch.as_tensor([p[0] for p in part], device=self.device)
            jj = torch.as_tensor([p[1] for p in part], device=self.device)
            embeds = Sam3VisionEncoderOutput(
                fpn_hidden_states=tuple(t.index_select(0, ii) for t in vision.fpn_hidden_states),
                fpn_position_encoding=tuple(t.index_select(0, ii) for t in vision.fpn_position_encoding),
            )
            with autocast_context(self.device, self.precision):
                result = self.model(
                    vision_embeds=embeds,
                    text_embeds=BaseModelOutputWithPooling(pooler_output=text.index_select(0, jj)),
                    attention_mask=text_mask.index_select(0, jj),
                )
            scores = result.pred_logits.float().sigmoid()
            if result.presence_logits is not None:
                scores = scores * result.presence_logits.float().sigmoid()
            for k, (i, j) in enumerate(part):
                keep = scores[k] >= min_score
                if keep.any():
                    prompt_ids = torch.full((int(keep.sum()),), j, dtype=torch.long, device=self.device)
                    masks = result.pred_masks[k][keep].float()
                    kept[i].append((scores[k][keep], masks, result.pred_boxes[k][keep].float(), prompt_ids))
        out = []
        for parts in kept:
            if not parts:
                empty = torch.zeros(0, device=self.device)
                out.append((empty, empty.view(0, 1, 1), empty.view(0, 4), empty.long()))
                continue
            out.append(tuple(torch.cat([p[n] for p in parts]) for n in range(4)))  # type: ignore[arg-type]
        return out

    def _instances(
        self,
        image: Image.Image,
        scores: torch.Tensor,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        prompt_of: torch.Tensor,
        prompts: list[str],
        groups: Sequence[Hashable],
    ) -> list[Instance]:
        """The kept queries of one image as instances at its size, duplicates within a group merged."""
        if scores.numel() == 0:
            return []
        cut = math.log(self.config.mask_threshold / (1.0 - self.config.mask_threshold))
        order = torch.argsort(scores, descending=True)
        scores, logits, boxes, prompt_of = scores[order], logits[order], boxes[order], prompt_of[order]
        low = (logits > cut).flatten(1)
        first = {g: k for k, g in reversed(list(enumerate(groups)))}  # group → its first prompt's index
        group_of = torch.as_tensor([first[g] for g in groups], device=scores.device)
        group_ids = group_of.index_select(0, prompt_of)
        keep = merge_duplicates(low, group_ids, self.config.merge_iou) & low.any(dim=1)
        index = torch.nonzero(keep).flatten()
        w, h = image.size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes.device)
        out: list[Instance] = []
        for start in range(0, len(index), _UPSAMPLE_CHUNK):
            part = index[start : start + _UPSAMPLE_CHUNK]
            up = F.interpolate(logits[part][:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks = (up > cut).cpu().numpy()
            for q, mask in zip(part.tolist(), masks, strict=True):
                if not mask.any():
                    continue
                x0, y0, x1, y1 = (boxes[q].clamp(0.0, 1.0) * scale).tolist()
                j = int(prompt_of[q])
                out.append(Instance(prompts[j], groups[j], float(scores[q]), mask, (x0, y0, x1, y1)))
        return out


def merge_duplicates(masks: torch.Tensor, group_ids: torch.Tensor, iou: float) -> torch.Tensor:
    """Which of the score-sorted ``masks [N, P]`` (bool, flattened) to keep: each one is dropped when a
    better-scoring kept mask of the same group overlaps it with an IoU of ``iou`` or more."""
    n = masks.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=masks.device)
    if n < 2:
        return keep
    m = masks.float()
    inter = m @ m.T
    area = m.sum(dim=1)
    union = area[:, None] + area[None, :] - inter
    overlap = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    same = group_ids[:, None] == group_ids[None, :]
    dup = (overlap >= iou) & same
    for i in range(n):
        if keep[i]:
            later = dup[i].clone()
            later[: i + 1] = False
            keep &= ~later
    return keep
