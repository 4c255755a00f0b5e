"""Promptable Segment Anything models (SAM 3 tracker, SAM 2.1, SAM, SAM-HQ, EdgeTAM) from ``transformers``:
masks from clicks and boxes, and ``refine=sam`` of GEM's and LAVT's coarse masks (``docs/sam.md``).

``config``, ``families`` and ``cli`` import no torch; the engine and the refinement load on first use.
"""

from typing import Any

from .config import DEFAULT_CACHE_BYTES, DEFAULT_MIN_IOU, DEFAULT_MIN_SCORE, SamConfig
from .families import FAMILIES, family, real_config, tiny_config

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_MIN_IOU",
    "DEFAULT_MIN_SCORE",
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

_LAZY = {
    "EmbeddingLRU": "engine",
    "Prompt": "engine",
    "SamEngine": "engine",
    "mask_parts": "refine",
    "refine_label_map": "refine",
    "refine_mask": "refine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
