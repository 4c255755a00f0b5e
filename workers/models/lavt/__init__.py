"""LAVT (Language-Aware Vision Transformer) for referring image segmentation.

``from workers.models.lavt import LavtConfig, LavtEngine``. The torch-using names are imported on first
access, so the CLI verbs registered from :mod:`workers.models.lavt.cli` cost no torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

from workers.models.lavt.config import VARIANTS, LavtConfig

_LAZY = {
    "LavtEngine": "workers.models.lavt.engine",
    "LavtNetwork": "workers.models.lavt.model",
    "LAVT": "workers.models.lavt.model",
    "load_network": "workers.models.lavt.factory",
    "save_checkpoint": "workers.models.lavt.weights",
    "load_tokenizer": "workers.models.lavt.text",
    "tokenize": "workers.models.lavt.text",
}

__all__ = ["VARIANTS", "LavtConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
