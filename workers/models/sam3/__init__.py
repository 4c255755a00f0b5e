"""SAM 3 (Segment Anything with Concepts): every instance of a short noun phrase, with its own score.

``Sam3Engine(Sam3Config(...)).instances(images, prompts)`` gives, per image, the instances that SAM 3
finds for each prompt (mask at the original size, box, score), duplicates across a label's synonyms
merged. ``config`` imports no torch; the engine loads on first use. The model is ``transformers``'
``Sam3Model``; its weights come from ``workers.models.hf_weights``.
"""

from typing import Any

from .config import SAM3_HUB_ID, Sam3Config

__all__ = ["SAM3_HUB_ID", "Instance", "Sam3Config", "Sam3Engine"]


def __getattr__(name: str) -> Any:
    if name in ("Sam3Engine", "Instance"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
