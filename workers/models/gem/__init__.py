"""GEM (Grounding Everything): training-free open-vocabulary grounding on open_clip CLIP ViTs.

``GemEngine(GemConfig(...)).heatmaps(images, prompts)`` gives calibrated per-prompt score maps at each
image's original size. ``GemVisionTower`` is the dual-path module; ``weights`` resolves checkpoints.
"""

from .config import DEFAULT_BACKGROUND_PROMPTS, GemConfig
from .engine import GemEngine
from .modules import GemVisionTower

__all__ = ["DEFAULT_BACKGROUND_PROMPTS", "GemConfig", "GemEngine", "GemVisionTower"]
