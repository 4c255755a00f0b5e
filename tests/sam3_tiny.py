"""Tiny random SAM 3 engines and weight folders for the tests (the model: ``workers.models.sam3.tiny``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.models.sam3.tiny import TINY_IMAGE_SIZE, tiny_sam3_model

__all__ = ["TINY_IMAGE_SIZE", "save_tiny_sam3", "tiny_sam3_engine", "tiny_sam3_model"]


def tiny_sam3_engine(seed: int = 0, **options: Any) -> Any:
    """A :class:`~workers.models.sam3.Sam3Engine` on :func:`tiny_sam3_model`, on the CPU."""
    from workers.models.sam3 import Sam3Config, Sam3Engine

    return Sam3Engine(Sam3Config(device="cpu", **options), model=tiny_sam3_model(seed))


def save_tiny_sam3(folder: Path, seed: int = 0) -> Path:
    """A tiny model and its processor saved as a hub repository's files are (``config.json``, weights,
    processor and tokenizer files): a local ``GROUNDLABEL_SAM3_MODEL`` folder."""
    from workers.models.sam3.processor import default_processor

    folder.mkdir(parents=True, exist_ok=True)
    tiny_sam3_model(seed).save_pretrained(folder)
    default_processor(TINY_IMAGE_SIZE).save_pretrained(folder)
    return folder
