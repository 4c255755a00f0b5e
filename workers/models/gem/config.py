"""GEM engine configuration (no torch import here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from groundlabel.errors import UserError
from groundlabel.settings import CPU_PRECISIONS, GEM_CPU_KERNELS, HubSettings

METHODS = ("gem", "maskclip", "original", "clip_surgery", "sclip", "clearclip", "naclip", "clipself")
REFINES = ("none", "pamr")
TEMPLATE_SETS = ("paper", "ensemble")
CALIBRATIONS = ("softmax", "minmax")

#: Generic "stuff" words that compete with the user's prompts in the calibrated softmax, so that a pixel
#: showing none of the prompted classes gets a low score for all of them.
DEFAULT_BACKGROUND_PROMPTS: tuple[str, ...] = (
    "background",
    "sky",
    "wall",
    "floor",
    "ground",
    "tree",
    "grass",
    "road",
    "building",
    "table",
    "water",
    "ceiling",
    "field",
    "mountain",
)


@dataclass
class GemConfig:
    """Everything that selects the CLIP model, the GEM variant and the score calibration.

    ``refine="pamr"`` (or ``pamr=True``) refines the calibrated score maps with PAMR (``workers.models.pamr``)
    at ``pamr_scale`` of the image size before the final upsampling. ``method`` picks the dense features
    (``docs/methods.md``). ``background_prompts=()`` replaces the background words with a single constant
    "null" class whose logit is ``logit_scale * null_cosine``. ``calibration="minmax"`` gives GEM's own
    per-image, per-prompt min-max maps instead (always finds something; not comparable across prompts).
    """

    model_name: str = "ViT-B-16"
    pretrained: str | None = "openai"
    cache_dir: str | None = None  # the weights folder
    hub: HubSettings = field(default_factory=HubSettings, repr=False)  # hub access for a download
    image_size: int | tuple[int, int] = 448
    gem_depth: int = 7
    ss_attn_iter: int = 1
    ss_attn_temp: float | None = None
    method: str = "gem"
    templates: str = "paper"
    background_prompts: tuple[str, ...] = DEFAULT_BACKGROUND_PROMPTS
    device: str = "auto"
    calibration: str = "softmax"
    logit_scale: float = 100.0
    null_cosine: float = 0.2
    batch_size: int = 8
    text_cache_size: int = 4096
    refine: str = "none"
    pamr: bool = False
    pamr_iters: int = 10
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    pamr_scale: float = 0.25
    naclip_std: float = 5.0
    cpu_kernels: str = "auto"  # CPU path of the tower: auto (timed once per machine), packed, onednn, torch
    kernel_cache: str | None = None  # the folder keeping the timed choice; None: timed once per process
    cpu_precision: str = "auto"  # CPU arithmetic: auto (bf16 where the CPU has it natively), fp32, bf16

    def __post_init__(self) -> None:
        self.validate()

    @property
    def arch(self) -> str:
        """The open_clip model name (``ViT-B/16`` → ``ViT-B-16``)."""
        return self.model_name.strip().replace("/", "-")

    @property
    def input_size(self) -> tuple[int, int]:
        """The network input size as (height, width)."""
        if isinstance(self.image_size, int):
            return (self.image_size, self.image_size)
        h, w = self.image_size
        return (int(h), int(w))

    def validate(self) -> None:
        """Raise ``UserError`` with the reason when a field is out of range."""
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise UserError("GemConfig.model_name must be an open_clip model name such as 'ViT-B-16'")
        size = self.image_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise UserError(f"GemConfig.image_size must be an int or (height, width), got {size!r}")
            self.image_size = (int(size[0]), int(size[1]))
            sizes = self.image_size
        elif isinstance(size, int):
            sizes = (size, size)
        else:
            raise UserError(f"GemConfig.image_size must be an int or (height, width), got {size!r}")
        if min(sizes) < 16 or max(sizes) > 4096:
            raise UserError(f"GemConfig.image_size must lie in [16, 4096], got {size!r}")
        if self.gem_depth < 2:
            raise UserError(
                f"GemConfig.gem_depth must be >= 2 (it replaces the last gem_depth-1 blocks), "
                f"got {self.gem_depth}"
            )
        if self.ss_attn_iter < 0:
            raise UserError(f"GemConfig.ss_attn_iter must be >= 0, got {self.ss_attn_iter}")
        if self.ss_attn_temp is not None and not self.ss_attn_temp > 0:
            raise UserError(f"GemConfig.ss_attn_temp must be positive or None, got {self.ss_attn_temp}")
        if self.method not in METHODS:
            raise UserError(f"GemConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.templates not in TEMPLATE_SETS:
            raise UserError(f"GemConfig.templates must be one of {TEMPLATE_SETS}, got {self.templates!r}")
        if self.pamr:
            if self.refine not in ("none", "pamr"):
                raise UserError(f"GemConfig.pamr=True contradicts refine={self.refine!r}")
            self.refine = "pamr"
        self.refine = "none" if self.refine in (None, "", "off") else str(self.refine).lower()
        if self.refine not in REFINES:
            raise UserError(f"GemConfig.refine must be one of {REFINES}, got {self.refine!r}")
        self.pamr = self.refine == "pamr"
        if self.pamr_iters < 0:
            raise UserError(f"GemConfig.pamr_iters must be >= 0, got {self.pamr_iters}")
        self.pamr_dilations = tuple(int(d) for d in self.pamr_dilations)
        if not self.pamr_dilations or min(self.pamr_dilations) < 1:
            raise UserError(f"GemConfig.pamr_dilations must be positive integers, got {self.pamr_dilations}")
        if not 0 < self.pamr_scale <= 1:
            raise UserError(f"GemConfig.pamr_scale must lie in (0, 1], got {self.pamr_scale}")
        if not self.naclip_std > 0:
            raise UserError(f"GemConfig.naclip_std must be positive, got {self.naclip_std}")
        if self.calibration not in CALIBRATIONS:
            raise UserError(f"GemConfig.calibration must be one of {CALIBRATIONS}, got {self.calibration!r}")
        if isinstance(self.background_prompts, str):
            raise UserError("GemConfig.background_prompts must be a sequence of words, not one string")
        self.background_prompts = tuple(str(p).strip() for p in self.background_prompts if str(p).strip())
        if not self.logit_scale > 0:
            raise UserError(f"GemConfig.logit_scale must be positive, got {self.logit_scale}")
        if not -1.0 <= self.null_cosine <= 1.0:
            raise UserError(f"GemConfig.null_cosine must lie in [-1, 1], got {self.null_cosine}")
        if self.batch_size < 1:
            raise UserError(f"GemConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.text_cache_size < 0:
            raise UserError(f"GemConfig.text_cache_size must be >= 0, got {self.text_cache_size}")
        if self.cpu_kernels not in GEM_CPU_KERNELS:
            raise UserError(
                f"GemConfig.cpu_kernels must be one of {GEM_CPU_KERNELS}, got {self.cpu_kernels!r}"
            )
        if self.cpu_precision not in CPU_PRECISIONS:
            raise UserError(
                f"GemConfig.cpu_precision must be one of {CPU_PRECISIONS}, got {self.cpu_precision!r}"
            )

    def model_version(self, weights_label: str) -> str:
        """``gem-<model>-<weights>`` plus a suffix for every non-default option: the name predictions carry
        (the engine's, and the backend's, which computes it without loading a model)."""
        parts = ["gem", self.arch, weights_label]
        if self.method != "gem":
            parts.append(self.method)
        if self.method == "naclip" and self.naclip_std != 5.0:
            parts.append(f"std{self.naclip_std:g}")
        h, w = self.input_size
        if (h, w) != (448, 448):
            parts.append(f"{h}x{w}" if h != w else str(h))
        if self.method == "gem" and (self.gem_depth, self.ss_attn_iter, self.ss_attn_temp) != (7, 1, None):
            parts.append(
                f"d{self.gem_depth}i{self.ss_attn_iter}"
                + (f"t{self.ss_attn_temp:g}" if self.ss_attn_temp else "")
            )
        if self.templates != "paper":
            parts.append(self.templates)
        if self.calibration != "softmax":
            parts.append(self.calibration)
        if self.refine == "pamr":
            parts.append("pamr")
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        d = asdict(self)
        d.pop("hub")  # how the weights were reached, not what the model is (and it may hold a token)
        d.pop("cpu_kernels")  # how this machine computes the same numbers
        d.pop("kernel_cache")
        d.pop("cpu_precision")  # where it runs; a bf16 engine's version says so (groundlabel.versions)
        d["background_prompts"] = list(self.background_prompts)
        d["pamr_dilations"] = list(self.pamr_dilations)
        if isinstance(self.image_size, tuple):
            d["image_size"] = list(self.image_size)
        return d
