"""The GEM engine: PIL images + class prompts → calibrated per-prompt score maps at original size."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.versions import with_precision
from workers.models.clipself.eva import EVA_METHODS, EvaDenseTower, is_timm_eva
from workers.models.device import autocast_context, resolve_device, resolve_precision, version_precision

from ..inputs import check_images_and_prompts
from .config import GemConfig
from .kernel_choice import Choice, choose
from .modules import GemVisionTower
from .prompts import EmbeddingCache, expand_prompt, normalize_prompt, templates_for
from .weights import load_clip

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_TEXT_BATCH = 256


def preprocess(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """GEM's preprocessing: RGB, bicubic resize to ``size`` (height, width) ignoring the aspect ratio,
    OpenAI mean/std. Returns ``[B, 3, H, W]`` float32."""
    h, w = size
    arrays = []
    for im in images:
        rgb = (im if im.mode == "RGB" else im.convert("RGB")).resize((w, h), Image.BICUBIC)  # no full copy
        arrays.append(np.asarray(rgb, dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).div_(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def calibrate_softmax(
    cosine: torch.Tensor,
    n_prompts: int,
    logit_scale: float,
    *,
    null_cosine: float | None = None,
    group_of: Sequence[int] | None = None,
) -> torch.Tensor:
    """Softmax calibration over the class axis of ``cosine [K, ...]`` whose first ``n_prompts`` rows are
    prompts and the rest background words. With no background rows, a constant null class at
    ``null_cosine`` takes their place. Prompts sharing a group share the group's summed probability.
    Returns ``[n_prompts, ...]`` in [0, 1]."""
    logits = cosine.float() * logit_scale
    if cosine.shape[0] == n_prompts:
        if null_cosine is None:
            raise ValueError("calibrate_softmax needs background rows or a null_cosine")
        null = torch.full_like(logits[:1], float(null_cosine) * logit_scale)
        logits = torch.cat([logits, null], dim=0)
    probs = logits.softmax(dim=0)[:n_prompts]
    if group_of is not None and len(set(group_of)) < n_prompts:
        groups = torch.as_tensor(list(group_of), device=probs.device)
        summed = torch.zeros(
            (int(groups.max()) + 1, *probs.shape[1:]), device=probs.device, dtype=probs.dtype
        )
        summed.index_add_(0, groups, probs)
        probs = summed[groups]
    return probs.clamp_(0.0, 1.0)


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """GEM's per-map min-max normalisation of ``[P, H, W]`` to [0, 1] (a constant map becomes 0)."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return ((maps - lo) / (hi - lo).clamp_min(eps)).clamp_(0.0, 1.0)


class UpsampledMaps(Sequence[np.ndarray]):
    """One image's calibrated score maps, kept at token resolution and upsampled (bilinear, then min-max
    normalised when that is the calibration, clamped to [0, 1]) to ``size`` one prompt at a time when
    read: the same values as :meth:`GemEngine.heatmaps` without ``lazy``, without ever holding the stack
    of a large image's maps."""

    def __init__(
        self, scores: torch.Tensor, index: Sequence[int], size: tuple[int, int], minmax: bool
    ) -> None:
        self._scores = scores  # [unique prompts, gh, gw]
        self._index = list(index)
        self.size = size  # (width, height)
        self._minmax = minmax

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(prompts, height, width)`` of the maps when read."""
        return len(self._index), self.size[1], self.size[0]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, k: int) -> np.ndarray:  # type: ignore[override]
        u = self._index[k]
        w, h = self.size
        one = self._scores[u : u + 1][None]
        up = F.interpolate(one, size=(h, w), mode="bilinear", align_corners=False)[0]
        if self._minmax:
            up = minmax_normalize(up)
        return up.clamp_(0.0, 1.0)[0].cpu().numpy().astype(np.float32, copy=False)


class GemEngine:
    """GEM (Grounding Everything) on an open_clip CLIP ViT; see ``docs/gem.md`` for the score calibration."""

    def __init__(
        self, config: GemConfig | None = None, *, clip_model: Any = None, tokenizer: Any = None
    ) -> None:
        self.config = config if config is not None else GemConfig()
        self.config.validate()
        cfg = self.config
        self.device = resolve_device(cfg.device)
        #: ``fp32`` or ``bf16`` (autocast): bf16 on CUDA, on a CPU as ``cpu_precision`` resolves there.
        self.precision = resolve_precision(self.device, "auto", cfg.cpu_precision)
        if clip_model is None:
            loaded = load_clip(cfg.model_name, cfg.pretrained, cfg.cache_dir, hub=cfg.hub)
            clip_model = loaded.model
            tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
            weights_label = loaded.weights_label
            self.weights_source = loaded.source
        else:
            weights_label = "custom"
            self.weights_source = "clip_model argument"
            if tokenizer is None:
                from open_clip.tokenizer import SimpleTokenizer

                tokenizer = SimpleTokenizer(context_length=int(getattr(clip_model, "context_length", 77)))
        self.model = clip_model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.tower = self._dense_tower()
        self.kernel_choice = self._choose_cpu_kernels()
        self.version_precision = version_precision(self.device, self.precision)
        self.model_version = with_precision(cfg.model_version(weights_label), self.version_precision)
        self._text_cache = EmbeddingCache(cfg.text_cache_size)
        self._lock = threading.RLock()  # one forward at a time; the text cache is shared

    def _dense_tower(self) -> GemVisionTower | EvaDenseTower:
        """The module computing dense tokens: GEM's tower on CLIP ViTs, ``EvaDenseTower`` on EVA-CLIP
        (CLIPSelf) backbones, which offer the ``clipself`` and ``maskclip`` methods only."""
        cfg = self.config
        visual = self.model.visual
        if is_timm_eva(visual):
            if cfg.method not in EVA_METHODS:
                raise UserError(
                    f"model {cfg.model_name!r} is an EVA-CLIP backbone: its dense features come from "
                    f"method {' or '.join(EVA_METHODS)} (e.g. --method clipself), not {cfg.method!r}; "
                    "GEM's dual path needs a CLIP ViT such as ViT-B-16"
                )
            return EvaDenseTower(visual)
        try:
            return GemVisionTower(visual, cfg.gem_depth, cfg.ss_attn_iter, cfg.ss_attn_temp)
        except ValueError as exc:
            raise UserError(f"GEM cannot use model {cfg.model_name!r}: {exc}") from exc

    def _choose_cpu_kernels(self) -> Choice | None:
        """On the CPU, the path GEM's tower takes (:mod:`.kernel_choice`: forced, kept for this machine, or
        timed now, in the engine's precision; the tower then applies the precision itself, bf16 being
        autocast on the ``torch`` path and bf16 operands on the oneDNN ones); None elsewhere."""
        if self.device.type != "cpu" or not isinstance(self.tower, GemVisionTower):
            return None
        cfg = self.config
        choice = choose(
            self.tower, cfg.cpu_kernels, cfg.kernel_cache, size=cfg.input_size, precision=self.precision
        )
        self.tower.cpu_kernels = choice.path
        self.tower.cpu_precision = self.precision
        return choice

    def _tower_precision(self) -> contextlib.AbstractContextManager:
        """The context of a tower forward: nothing when the tower applies its CPU precision itself (GEM's
        tower on the CPU), else the engine's autocast."""
        if self.kernel_choice is not None:
            return contextlib.nullcontext()
        return autocast_context(self.device, self.precision)

    # ------------------------------------------------------------------- text
    @property
    def text_cache(self) -> EmbeddingCache:
        """The LRU cache of prompt embeddings (``hits``/``misses`` counters included)."""
        return self._text_cache

    @torch.inference_mode()
    def _encode_sentences(self, sentences: list[str]) -> torch.Tensor:
        outs = []
        for i in range(0, len(sentences), _TEXT_BATCH):
            tokens = self.tokenizer(sentences[i : i + _TEXT_BATCH]).to(self.device)
            with autocast_context(self.device, self.precision):
                emb = self.model.encode_text(tokens)
            outs.append(F.normalize(emb.float(), dim=-1))
        return torch.cat(outs, dim=0)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings ``[len(prompts), D]`` (float32, on the engine's device), cached per
        (model, template set, prompt)."""
        templates = templates_for(self.config.templates)
        keys = [(self.model_version, self.config.templates, normalize_prompt(p)) for p in prompts]
        vectors: dict[Hashable, np.ndarray] = {}
        missing: dict[Hashable, str] = {}
        with self._lock:
            for key, prompt in zip(keys, prompts, strict=True):
                if key in vectors or key in missing:
                    continue
                cached = self._text_cache.get(key)
                if cached is None:
                    missing[key] = prompt
                else:
                    vectors[key] = cached
            if missing:
                sentences = [s for p in missing.values() for s in expand_prompt(p, templates)]
                emb = self._encode_sentences(sentences).view(len(missing), len(templates), -1)
                emb = F.normalize(emb.mean(dim=1), dim=-1).cpu().numpy().astype(np.float32)
                for key, vec in zip(missing, emb, strict=True):
                    vectors[key] = vec
                    self._text_cache.put(key, vec)
        return torch.from_numpy(np.stack([vectors[k] for k in keys])).to(self.device)

    # ------------------------------------------------------------------ image
    @torch.inference_mode()
    def patch_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unit-norm dense features ``[B, gh, gw, D]`` (float32) of preprocessed ``pixels [B, 3, H, W]``,
        computed under ``torch.inference_mode`` (an inference tensor: read it, do not modify it in place)."""
        gh, gw = self.tower.grid_for(pixels.shape[-2], pixels.shape[-1])
        with self._tower_precision():
            tokens = self.tower.dense_features(
                pixels.to(self.device), self.config.method, naclip_std=self.config.naclip_std
            )
        feats = F.normalize(tokens[:, 1:].float(), dim=-1)
        return feats.reshape(feats.shape[0], gh, gw, -1)

    def cosine_maps(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[np.ndarray]:
        """Raw cosine similarities ``[len(prompts), gh, gw]`` per image at token resolution (uncalibrated)."""
        images, prompts = check_images_and_prompts(images, prompts)
        if not prompts:
            gh, gw = self.tower.grid_for(*self.config.input_size)
            return [np.zeros((0, gh, gw), np.float32) for _ in images]
        text = self.text_embeddings(prompts)
        out = []
        for start in range(0, len(images), self.config.batch_size):
            feats = self.patch_features(
                preprocess(images[start : start + self.config.batch_size], self.config.input_size)
            )
            cos = torch.einsum("bhwd,kd->bkhw", feats, text)
            out.extend(c.cpu().numpy().astype(np.float32) for c in cos)
        return out

    def heatmaps(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        *,
        groups: Sequence[Hashable] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
        lazy: bool = False,
    ) -> list[np.ndarray] | list[UpsampledMaps]:
        """Calibrated scores in [0, 1], one float32 ``[len(prompts), H, W]`` array per image at its original
        size. ``groups`` (one key per prompt) marks synonyms of one label: they share the label's probability
        instead of competing with each other. ``sizes``: one ``(width, height)`` per image to upsample to
        instead of the original size (a bounded size keeps memory independent of the image's). ``lazy``: each
        image's maps as :class:`UpsampledMaps`, upsampled one prompt at a time when read."""
        images, prompts = check_images_and_prompts(images, prompts)
        if groups is not None and len(groups) != len(prompts):
            raise UserError(f"groups has {len(groups)} entries for {len(prompts)} prompts")
        if sizes is not None and len(sizes) != len(images):
            raise UserError(f"sizes has {len(sizes)} entries for {len(images)} images")
        sizes = list(sizes) if sizes is not None else [(im.width, im.height) for im in images]
        if not images:
            return []
        if not prompts:
            return [np.zeros((0, h, w), np.float32) for w, h in sizes]
        cfg = self.config

        # Unique prompts (a repeated prompt must not split its probability with itself).
        uniq: list[str] = []
        where: dict[str, int] = {}
        index: list[int] = []
        for p in prompts:
            key = normalize_prompt(p)
            if key not in where:
                where[key] = len(uniq)
                uniq.append(p)
            index.append(where[key])
        group_of: list[int] | None = None
        if groups is not None:
            gid: dict[Hashable, int] = {}
            group_of = [0] * len(uniq)
            for p_idx, g in zip(index, groups, strict=True):
                group_of[p_idx] = gid.setdefault(g, len(gid))
        background = []
        if cfg.calibration == "softmax":
            seen = set(where)
            for b in cfg.background_prompts:
                key = normalize_prompt(b)
                if key not in seen:
                    seen.add(key)
                    background.append(b)
        text = self.text_embeddings(uniq + background)
        index_t = torch.as_tensor(index, device=self.device)
        identity = index == list(range(len(uniq)))

        out: list[np.ndarray] = []
        with self._lock:
            for start in range(0, len(images), cfg.batch_size):
                chunk = images[start : start + cfg.batch_size]
                feats = self.patch_features(preprocess(chunk, cfg.input_size))
                cos = torch.einsum("bhwd,kd->bkhw", feats, text)
                for im, c, (out_w, out_h) in zip(chunk, cos, sizes[start : start + len(chunk)], strict=True):
                    if cfg.calibration == "softmax":
                        scores = calibrate_softmax(
                            c, len(uniq), cfg.logit_scale, null_cosine=cfg.null_cosine, group_of=group_of
                        )
                    else:
                        scores = c
                    if cfg.refine == "pamr":
                        scores = self._pamr(im, scores)
                    if lazy:
                        out.append(UpsampledMaps(scores, index, (out_w, out_h), cfg.calibration == "minmax"))
                        continue
                    up = F.interpolate(
                        scores[None], size=(out_h, out_w), mode="bilinear", align_corners=False
                    )[0]
                    if cfg.calibration == "minmax":
                        up = minmax_normalize(up)
                    up = up.clamp_(0.0, 1.0)
                    if not identity:  # repeated prompts: copy their rows
                        up = up.index_select(0, index_t)
                    out.append(up.cpu().numpy().astype(np.float32, copy=False))
                    del up
        return out

    def _pamr(self, image: Image.Image, scores: torch.Tensor) -> torch.Tensor:
        """PAMR on one image's score maps ``[P, gh, gw]`` at ``pamr_scale`` of its original size."""
        from workers.models.pamr import refine_scores

        cfg = self.config
        h = max(scores.shape[-2], round(image.height * cfg.pamr_scale))
        w = max(scores.shape[-1], round(image.width * cfg.pamr_scale))
        small = image.convert("RGB").resize((w, h), Image.BILINEAR)
        rgb = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return refine_scores(
            rgb.to(scores.device), scores, scale=1.0, num_iter=cfg.pamr_iters, dilations=cfg.pamr_dilations
        )
