"""The promptable SAM engine's configuration (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from groundlabel.errors import UserError
from groundlabel.versions import refined

#: ``refine=sam`` keeps SAM's mask of a coarse part when their IoU reaches this (docs/sam.md).
DEFAULT_MIN_IOU = 0.0
#: ``refine=sam`` removes a coarse part when SAM's predicted IoU of its mask there is below this.
DEFAULT_MIN_SCORE = 0.4
#: The image-embedding cache of one worker, in bytes.
DEFAULT_CACHE_BYTES = 512 * 2**20


#: The name of predictions whose masks SAM sharpened (:func:`groundlabel.versions.refined`).
refined_version = refined


@dataclass
class SamConfig:
    """Which SAM-family model, from where, and how its answers are used.

    ``model``: a hub id (``facebook/sam2.1-hiera-tiny``) or a local folder; ``None`` with ``family`` builds
    the family's smallest published architecture with random weights (for trying the protocol only).
    ``family``: one of :data:`workers.models.sam.families.FAMILIES`; guessed from the folder's
    ``config.json`` or the id when not given. ``min_iou``, ``min_score``: ``refine=sam``'s rule (docs/sam.md).
    ``cpu_precision`` (``GROUNDLABEL_CPU_PRECISION``): the image encoder's arithmetic on a CPU (the prompt
    encoder and the mask decoder stay fp32; CUDA runs fp32 as before).
    """

    model: str | None = "facebook/sam2.1-hiera-tiny"
    family: str | None = None
    weights_dir: str | None = None
    token: str | None = field(default=None, repr=False)
    offline: bool = False
    device: str = "auto"
    cache_bytes: int = DEFAULT_CACHE_BYTES
    min_iou: float = DEFAULT_MIN_IOU
    min_score: float = DEFAULT_MIN_SCORE
    cpu_precision: str = "auto"  # the image encoder on a CPU: auto (bf16 where the CPU has it), fp32, bf16

    def __post_init__(self) -> None:
        if self.model is not None and not str(self.model).strip():
            self.model = None
        if self.model is None and self.family is None:
            raise UserError("a SAM model needs a hub id or folder, or a family for random weights")
        if not 0.0 <= self.min_iou <= 1.0:
            raise UserError(f"the SAM refinement's minimum IoU must lie in [0, 1], got {self.min_iou}")
        if not 0.0 <= self.min_score <= 1.0:
            raise UserError(f"the SAM refinement's minimum score must lie in [0, 1], got {self.min_score}")
        if self.cpu_precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"the SAM cpu_precision must be auto, fp32 or bf16, got {self.cpu_precision!r}")
        if self.cache_bytes < 0:
            raise UserError(f"the SAM embedding cache size must be >= 0 bytes, got {self.cache_bytes}")

    def resolved_family(self) -> str:
        """The family name: given, else from a local folder's ``config.json``, else guessed from the id."""
        from workers.models.hf_weights import HubSource, model_type

        from .families import family, family_of_model_type, guess_family

        if self.family:
            return family(self.family).name
        assert self.model is not None
        kind = model_type(HubSource(self.model, self.weights_dir, variable="GROUNDLABEL_SAM_MODEL"))
        found = family_of_model_type(kind) if kind else None
        found = found or guess_family(self.model)
        if found is None:
            raise UserError(
                f"cannot tell which SAM family {self.model!r} is; "
                "set GROUNDLABEL_SAM_FAMILY (or --sam-family)"
            )
        return found.name

    def model_version(self) -> str:
        """``sam-<weights>``: the weights' name (a hub id's last part, a folder's name, a checkpoint file's
        stem; ``random-<family>`` without weights). Computed without loading anything."""
        if self.model is None:
            return f"sam-random-{self.family}"
        path = Path(self.model.rstrip("/\\"))
        return f"sam-{path.stem if path.suffix in ('.pt', '.pth') else path.name}"
