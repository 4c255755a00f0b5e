"""Promptable Segment Anything models (SAM 3 tracker, SAM 2.1, SAM, SAM-HQ, EdgeTAM) from ``transformers``:
masks from clicks and boxes, and ``refine=sam`` of GEM's and LAVT's coarse masks (``docs/sam.md``)."""

from .config import DEFAULT_CACHE_BYTES, DEFAULT_MIN_IOU, SamConfig
from .engine import EmbeddingLRU, Prompt, SamEngine
from .families import FAMILIES, family, real_config, tiny_config
from .refine import mask_parts, refine_label_map, refine_mask

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MIN_IOU",
    "FAMILIES",
    "EmbeddingLRU",
    "Prompt",
    "SamConfig",
    "SamEngine",
    "family",
    "mask_parts",
    "real_config",
    "refine_label_map",
    "refine_mask",
    "tiny_config",
]
