"""LAVT configuration: the architecture variants and the engine's options (no torch import here)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError

#: Swin settings per variant. ``swin_b`` with window 12 is what every published LAVT checkpoint uses.
VARIANTS: dict[str, dict[str, Any]] = {
    "swin_b": {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "drop_path_rate": 0.3},
    "swin_t": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.2},
    # A test-sized model: a few thousand parameters per stage and a two-layer BERT with a small vocabulary.
    "tiny": {
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 2, 4, 8),
        "drop_path_rate": 0.0,
        "window_size": 4,
        "bert_config": {
            "vocab_size": 64,
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 96,
            "max_position_embeddings": 32,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
    },
}

#: The text encoder (tokenizer and weights) LAVT was trained with.
DEFAULT_BERT = "bert-base-uncased"


@dataclass
class LavtConfig:
    """Architecture and inference options of a LAVT model.

    ``variant`` fills the Swin settings (``swin_b``, ``swin_t``, ``tiny``); fields left at ``None``
    take the variant's value. ``bert_config`` holds ``transformers.BertConfig`` keyword arguments
    (``None``: the bert-base-uncased configuration); ``tokenizer`` is a folder or file with a WordPiece
    ``vocab.txt``, or a hub name found in the local cache (``None``: the checkpoint's own vocabulary if
    it carries one, else ``bert-base-uncased``).
    """

    variant: str = "swin_b"
    embed_dim: int | None = None
    depths: tuple[int, ...] | None = None
    num_heads: tuple[int, ...] | None = None
    window_size: int | None = None  # 12 for the published checkpoints (Swin-B 384 px, 22k init)
    patch_size: int = 4
    mlp_ratio: float = 4.0
    drop_path_rate: float | None = None
    fusion_heads: tuple[int, ...] = (1, 1, 1, 1)  # PWAM heads per stage (LAVT's --mha)
    bert_config: dict[str, Any] | None = None
    bert_train_layers: int = 10  # BERT encoder layers the optimiser updates (LAVT: 0-9)
    tokenizer: str | None = None
    max_tokens: int = 20
    image_size: int = 480
    # Engine options.
    device: str = "auto"  # cuda if available else cpu
    batch_size: int = 8
    precision: str = "auto"  # auto (bf16 autocast on CUDA, cpu_precision on a CPU) | fp32 | bf16
    cpu_precision: str = "auto"  # GROUNDLABEL_CPU_PRECISION: auto (bf16 where the CPU has it), fp32, bf16
    cache_dir: str | None = None  # where the Hugging Face cache is looked up for the tokenizer / BERT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"unknown LAVT variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        defaults = VARIANTS[self.variant]
        for name in ("embed_dim", "depths", "num_heads", "drop_path_rate", "window_size", "bert_config"):
            if getattr(self, name) is None:
                value = defaults.get(name, 12 if name == "window_size" else None)
                setattr(self, name, dict(value) if isinstance(value, dict) else value)
        self.depths = tuple(int(d) for d in self.depths)
        self.num_heads = tuple(int(h) for h in self.num_heads)
        self.fusion_heads = tuple(int(h) for h in self.fusion_heads)
        if not (len(self.depths) == len(self.num_heads) == len(self.fusion_heads) == 4):
            raise UserError("LAVT needs 4 stages: depths, num_heads and fusion_heads must each have 4 values")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"precision must be auto, fp32 or bf16, not {self.precision!r}")
        if self.cpu_precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"cpu_precision must be auto, fp32 or bf16, not {self.cpu_precision!r}")
        if self.image_size % 32:
            raise UserError(f"image_size must be a multiple of 32 (LAVT uses 480), got {self.image_size}")
        if self.max_tokens < 2:
            raise UserError("max_tokens must be at least 2 ([CLS] and [SEP])")

    @property
    def stage_dims(self) -> tuple[int, int, int, int]:
        """Channels of the four stages (128/256/512/1024 for Swin-B)."""
        e = int(self.embed_dim)
        return (e, 2 * e, 4 * e, 8 * e)

    @property
    def text_dim(self) -> int:
        """Width of the BERT features the PWAMs attend to (768 for bert-base)."""
        return int((self.bert_config or {}).get("hidden_size", 768))

    def architecture(self) -> dict[str, Any]:
        """The fields that define the weights' shapes (what a checkpoint stores)."""
        keep = (
            "variant",
            "embed_dim",
            "depths",
            "num_heads",
            "window_size",
            "patch_size",
            "mlp_ratio",
            "drop_path_rate",
            "fusion_heads",
            "bert_config",
            "bert_train_layers",
            "max_tokens",
            "image_size",
        )
        data = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k in keep}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> LavtConfig:
        """A config from :meth:`architecture` output (unknown keys are ignored) plus overrides."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("depths", "num_heads", "fusion_heads"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values)


def lavt_model_version(variant: str, checkpoint: str | None, *, custom: bool = False) -> str:
    """``lavt-<variant>-<checkpoint stem>`` (``random`` without a checkpoint, ``custom`` for a network built
    in code): the name LAVT's predictions carry, computed without loading a model."""
    stem = Path(checkpoint).stem if checkpoint is not None else ("custom" if custom else "random")
    return f"lavt-{variant}-{stem}"
