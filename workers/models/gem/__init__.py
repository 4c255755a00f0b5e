"""GEM (Grounding Everything): training-free open-vocabulary grounding on open_clip CLIP ViTs.

``GemEngine(GemConfig(...)).heatmaps(images, prompts)`` gives calibrated per-prompt score maps at each
image's original size. ``GemVisionTower`` is the dual-path module; ``weights`` resolves checkpoints.
``config`` (methods, options) imports no torch; the engine and modules load on first use.
"""

from typing import Any

from .config import DEFAULT_BACKGROUND_PROMPTS, METHODS, REFINES, GemConfig

__all__ = ["DEFAULT_BACKGROUND_PROMPTS", "METHODS", "REFINES", "GemConfig", "GemEngine", "GemVisionTower"]


def __getattr__(name: str) -> Any:
    if name == "GemEngine":
        from .engine import GemEngine

        return GemEngine
    if name == "GemVisionTower":
        from .modules import GemVisionTower

        return GemVisionTower
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
