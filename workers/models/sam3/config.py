"""SAM 3 engine configuration (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from groundlabel.errors import UserError

#: The official SAM 3 checkpoint on the Hugging Face hub (gated: accept its licence, then use a token).
SAM3_HUB_ID = "facebook/sam3"
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class Sam3Config:
    """Which SAM 3 weights, where they run, and how its outputs become instances.

    ``model``: a hub id (default :data:`SAM3_HUB_ID`), a local folder written by ``save_pretrained`` (or
    a copy of the hub repository), or None for random weights of the real architecture (protocol trials,
    benchmarks). ``batch_size`` images share a vision forward; ``pair_batch`` (image, prompt) pairs share
    a detector forward. An instance's mask is its mask logits' sigmoid at or above ``mask_threshold``;
    two instances of one label (any of its prompt synonyms) whose masks overlap with an IoU at or above
    ``merge_iou`` are one instance, the better-scoring one.
    """

    model: str | None = SAM3_HUB_ID
    weights_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    offline: bool = False
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on CUDA, cpu_precision on a CPU) | fp32 | bf16
    cpu_precision: str = "auto"  # GROUNDLABEL_CPU_PRECISION: auto (bf16 where the CPU has it), fp32, bf16
    batch_size: int = 4
    pair_batch: int = 8
    mask_threshold: float = 0.5
    merge_iou: float = 0.5
    text_cache_size: int = 4096

    def validate(self) -> None:
        """Refuse impossible values with the reason."""
        if self.batch_size < 1 or self.pair_batch < 1:
            raise UserError(f"SAM 3 batch sizes must be >= 1, got {self.batch_size} and {self.pair_batch}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise UserError(f"SAM 3 mask_threshold must lie in (0, 1), got {self.mask_threshold}")
        if not 0.0 < self.merge_iou <= 1.0:
            raise UserError(f"SAM 3 merge_iou must lie in (0, 1], got {self.merge_iou}")
        if self.precision not in PRECISIONS:
            raise UserError(f"SAM 3 precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.cpu_precision not in PRECISIONS:
            raise UserError(
                f"SAM 3 cpu_precision must be one of {', '.join(PRECISIONS)}, got {self.cpu_precision!r}"
            )

    def model_version(self, custom: bool = False) -> str:
        """The name of the predictions: the weights' name (the hub id's last part or the folder's name)
        when it starts with ``sam3`` (``facebook/sam3`` → ``sam3``), else ``sam3-<name>``;
        ``sam3-random`` for random weights, ``sam3-custom`` for a model passed in built."""
        if custom:
            return "sam3-custom"
        if not self.model:
            return "sam3-random"
        name = Path(self.model.strip().rstrip("/\\")).name or "local"
        return name if name.lower().startswith("sam3") else f"sam3-{name}"
