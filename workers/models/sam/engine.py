"""The promptable SAM engine: an image embedding computed once per image, then masks from points and boxes.

:class:`SamEngine` wraps any family of :mod:`workers.models.sam.families`. Its image embedding is kept in
:class:`EmbeddingLRU` (bounded by bytes, keyed by the image's pixels), so the annotator's next click on the
same image runs only the prompt encoder and the mask decoder.

Coordinates are in the image plane of :mod:`workers.regions.geometry` (pixel ``(row, col)`` covers
``[col, col+1) × [row, row+1)``); masks come back at the image's own size.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from groundlabel.errors import UserError
from groundlabel.versions import with_precision
from workers.cache import LRUCache
from workers.models.device import autocast_context, resolve_device, resolve_precision, version_precision

from .config import SamConfig
from .families import Family, family, real_config
from .reparam import ReparamBackbone

log = logging.getLogger(__name__)

#: The format tag of a single-file SAM checkpoint written by groundlabel (``groundlabel train-tiny-sam``).
CHECKPOINT_FORMAT = "groundlabel-sam-1"


@dataclass
class Prompt:
    """The prompts of one mask: points (x, y) in image pixels with labels (1 inside, 0 outside), a box."""

    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1

    def __post_init__(self) -> None:
        if len(self.points) != len(self.labels):
            raise UserError(f"{len(self.points)} points but {len(self.labels)} point labels")
        if not self.points and self.box is None:
            raise UserError("a SAM prompt needs at least one point or a box")
        if any(label not in (0, 1) for label in self.labels):
            raise UserError(f"point labels must be 1 (object) or 0 (not the object), got {self.labels}")


@dataclass
class Embedding:
    """One image's cached encoder output and the geometry of its input."""

    tensors: Any  # a tensor, a list of tensors, or (tensor, list) for SAM-HQ
    width: int
    height: int
    nbytes: int


def _as_float(value: Any) -> Any:
    """A bf16 encoder output (a tensor, or lists and tuples of them) as fp32, for the fp32 decoder."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float(v) for v in value)
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class EmbeddingLRU(LRUCache[Embedding]):
    """Least-recently-used image embeddings, bounded by their total size in bytes, with counters."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_weight=int(max_bytes), weight=lambda embedding: embedding.nbytes)
        self.max_bytes = int(max_bytes)

    @property
    def nbytes(self) -> int:
        """The kept embeddings' total size in bytes."""
        return self.weight


def image_key(image: Image.Image) -> str:
    """A key of the image's pixels (the same picture fetched twice is one entry)."""
    rgb = image.convert("RGB")
    digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
    digest.update(f"{rgb.width}x{rgb.height}".encode())
    return digest.hexdigest()


def load_checkpoint(path: str | Path) -> tuple[Any, str]:
    """A single-file SAM checkpoint (:data:`CHECKPOINT_FORMAT`): the model (float32, eval) and its family."""
    path = Path(path).expanduser()
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file at all
        raise UserError(f"{path} is not a SAM checkpoint written by groundlabel: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a SAM checkpoint written by groundlabel (a file needs {CHECKPOINT_FORMAT})"
        )
    fam = family(ckpt["family"])
    config = fam.config_cls().from_dict(ckpt["config"])
    model = fam.model_cls()(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, strict=False)
    return model.eval(), fam.name


def save_checkpoint(path: str | Path, model: Any, family_name: str, summary: dict | None = None) -> None:
    """Write ``model`` as one float16 file readable with ``torch.load(weights_only=True)``."""
    state = {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "family": family(family_name).name,
            "config": model.config.to_dict(),
            "summary": summary or {},
            "state_dict": state,
        },
        path,
    )


def checkpoint_to_folder(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A single-file SAM checkpoint as a ``transformers`` folder (``config.json`` + ``model.safetensors``,
    float32), which ``GROUNDLABEL_SAM_MODEL`` and ``from_pretrained`` read like any downloaded model."""
    model, _ = load_checkpoint(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _load_model(config: SamConfig) -> tuple[Any, Family]:
    """The model and its family, from a hub id, a folder, a checkpoint file, or none (random weights)."""
    from workers.models.hf_weights import HubSource, load_pretrained

    if config.model is None:
        fam = family(config.family or "sam2")
        return fam.model_cls()(real_config(fam.name)).eval(), fam
    path = Path(config.model).expanduser()
    if path.is_file():
        model, name = load_checkpoint(path)
        if config.family and family(config.family).name != name:
            raise UserError(f"{path} holds a {name} model, not {config.family}")
        return model, family(name)
    fam = family(config.resolved_family())
    src = HubSource(
        config.model,
        config.weights_dir,
        config.token,
        config.offline,
        "GROUNDLABEL_SAM_MODEL",
        gated=fam.gated,
    )
    return load_pretrained(fam.model_cls(), src).eval(), fam


class SamEngine:
    """A promptable SAM-family model with an image-embedding cache; see ``docs/sam.md``."""

    def __init__(
        self, config: SamConfig | None = None, *, model: Any = None, family_name: str | None = None
    ) -> None:
        self.config = config if config is not None else SamConfig()
        self.device = resolve_device(self.config.device)
        #: The image encoder's ``fp32`` or ``bf16`` (autocast, CPU only; the decoder stays fp32).
        self.precision = resolve_precision(self.device, "auto", self.config.cpu_precision, cuda="fp32")
        self.version_precision = version_precision(self.device, self.precision)
        if model is None:
            model, fam = _load_model(self.config)
            self.model_version = self.config.model_version()
        else:
            fam = family(family_name or self.config.family or "sam")
            self.model_version = f"sam-{fam.name}-custom"
        self.model_version = with_precision(self.model_version, self.version_precision)
        self.family = fam
        self.model = model.to(self.device).eval()
        self.input_size = int(self._prompt_config().image_size)
        self.cache = EmbeddingLRU(self.config.cache_bytes)
        self._lock = threading.RLock()
        #: EdgeTAM's RepViT folded for inference (docs/sam.md, *Speed*); a no-op for the other families.
        self.reparam = ReparamBackbone(self.model)
        self._mean = torch.tensor(fam.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(fam.std).view(1, 3, 1, 1)

    def _prompt_config(self) -> Any:
        return self.model.config.prompt_encoder_config

    # ---------------------------------------------------------------- geometry
    def _resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of the image inside the network input."""
        s = self.input_size
        if self.family.resize == "square":
            return s, s
        scale = s / max(width, height)
        return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, S, S]`` network input: resized (and padded for SAM / SAM-HQ), normalised."""
        rgb = image.convert("RGB")
        w, h = self._resized(rgb.width, rgb.height)
        arr = np.asarray(rgb.resize((w, h), Image.BILINEAR), dtype=np.float32) / 255.0
        x = (torch.from_numpy(arr).permute(2, 0, 1)[None] - self._mean) / self._std
        s = self.input_size
        if (h, w) != (s, s):
            x = F.pad(x, (0, s - w, 0, s - h))
        return x

    def _to_input(self, xy: np.ndarray, width: int, height: int) -> np.ndarray:
        w, h = self._resized(width, height)
        return xy * np.array([w / width, h / height], dtype=np.float32)

    # ---------------------------------------------------------------- encoder
    @torch.no_grad()
    def embed(self, image: Image.Image) -> Embedding:
        """The image's embedding, from the cache when this image was seen before."""
        if not isinstance(image, Image.Image):
            raise UserError(f"SAM needs a PIL image, got {type(image).__name__}")
        key = (self.model_version, image_key(image))
        with self._lock:
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            pixels = self.preprocess(image).to(self.device)
            with autocast_context(self.device, self.precision), self.reparam.active():
                out = self.model.get_image_embeddings(pixels)
            if self.precision == "bf16":
                out = _as_float(out)
            if isinstance(out, tuple):  # SAM-HQ: (embeddings, intermediate ViT embeddings)
                out = (out[0], list(out[1]))
            emb = Embedding(out, image.width, image.height, _nbytes(out))
            self.cache.put(key, emb)
            return emb

    # ---------------------------------------------------------------- decoder
    @torch.no_grad()
    def segment(
        self, image: Image.Image, prompts: Sequence[Prompt], *, multimask: bool = True
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per prompt: candidate masks ``[M, H, W]`` (bool, at the image's size) and SAM's predicted IoU of
        each ``[M]`` (M = 3 with ``multimask``, else 1), best first."""
        prompts = list(prompts)
        if not prompts:
            return []
        emb = self.embed(image)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(prompts)
        with self._lock:
            for with_box in (False, True):
                group = [i for i, p in enumerate(prompts) if (p.box is not None) == with_box]
                if group:
                    for i, res in zip(
                        group, self._decode(emb, [prompts[i] for i in group], multimask), strict=True
                    ):
                        out[i] = res
        return [o for o in out if o is not None]

    def _decode(
        self, emb: Embedding, prompts: list[Prompt], multimask: bool
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        w, h = emb.width, emb.height
        n = max(len(p.points) for p in prompts)
        kwargs: dict[str, Any] = {"multimask_output": multimask}
        if n:
            points = np.zeros((1, len(prompts), n, 2), dtype=np.float32)
            labels = np.full((1, len(prompts), n), -10, dtype=np.int64)
            for j, p in enumerate(prompts):
                if p.points:
                    points[0, j, : len(p.points)] = self._to_input(np.asarray(p.points, np.float32), w, h)
                    labels[0, j, : len(p.labels)] = p.labels
            kwargs["input_points"] = torch.from_numpy(points).to(self.device)
            kwargs["input_labels"] = torch.from_numpy(labels).to(self.device)
        if prompts[0].box is not None:
            boxes = np.asarray([p.box for p in prompts], dtype=np.float32).reshape(-1, 2, 2)
            boxes = self._to_input(boxes, w, h).reshape(1, len(prompts), 4)
            kwargs["input_boxes"] = torch.from_numpy(boxes).to(self.device)
        tensors = emb.tensors
        if self.family.name == "sam_hq":
            kwargs["intermediate_embeddings"] = tensors[1]
            tensors = tensors[0]
        result = self.model(image_embeddings=tensors, **kwargs)
        logits = result.pred_masks[0].float()  # [P, M, m, m] over the whole network input
        scores = result.iou_scores[0].float()  # [P, M]
        masks = self.upsample(logits, w, h)
        order = torch.argsort(scores, dim=1, descending=True)
        out = []
        for j in range(len(prompts)):
            idx = order[j]
            out.append((masks[j, idx].cpu().numpy(), scores[j, idx].cpu().numpy()))
        return out

    def upsample(self, logits: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """Low-resolution mask logits ``[P, M, m, m]`` over the network input → bool ``[P, M, H, W]``."""
        p, m = logits.shape[:2]
        x = logits.reshape(p * m, 1, *logits.shape[-2:])
        if self.family.resize == "pad":
            s = self.input_size
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            rw, rh = self._resized(width, height)
            x = x[..., :rh, :rw]
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        return (x > 0).reshape(p, m, height, width)

    def best_mask(self, image: Image.Image, prompt: Prompt) -> tuple[np.ndarray, float]:
        """SAM's most confident mask for one prompt and its predicted IoU."""
        ((masks, scores),) = self.segment(image, [prompt])
        return masks[0], float(scores[0])
