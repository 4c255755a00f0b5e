"""A project's calibration: per label, the engine, refinement and threshold that its corrections chose.

``groundlabel calibrate`` (and the first step of a training job) sweeps, on the project's corrected tasks,
each label's threshold over every way this deployment can answer a class prompt (:data:`VARIANTS`: GEM,
GEM + PAMR, GEM + SAM, GEM + PAMR + SAM, SAM 3), keeps per label the best on the tuning images and checks
the choice on the held-out ones. The result is a small JSON record (:class:`Calibration`), stored in the
model store as a version of kind ``calibration`` and, once promoted, applied by the workers to that
project's class prompts. Where the corrected tasks carry typed referring expressions, it also holds one
choice for them all (:class:`ExpressionChoice`: LAVT or GEM grounding the expression, the threshold, SAM's
sharpening or not).

The record comes from the model store, which is not trusted to run code: :func:`parse_calibration` checks
every field (a variant of :data:`VARIANTS`, a threshold in [0, 1], names as strings) and refuses anything
else with the reason. No torch here: the backend reads the store too.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from groundlabel.errors import UserError

#: The file of a calibration version in the model store (a JSON object, :meth:`Calibration.to_dict`).
CALIBRATION_FILE = "calibration.json"
#: The ways of answering a class prompt that a calibration may choose for a label: the engine of the
#: registry, and for score maps the refinements (PAMR on GEM's maps, a promptable SAM on the masks).
VARIANTS = ("gem", "gem+pamr", "gem+sam", "gem+pamr+sam", "sam3")
#: The thresholds swept for each label: 0.02, 0.04, ... 0.98.
THRESHOLDS = tuple(round(0.02 * k, 2) for k in range(1, 50))
#: The engines a calibration may choose for a project's typed referring expressions: LAVT, or GEM grounding
#: the expression (what answers without LAVT).
EXPRESSION_ENGINES = ("lavt", "gem")


def variant_parts(variant: str) -> tuple[str, str, bool]:
    """``(engine, GEM's own refinement "none"|"pamr", SAM refines the masks)`` of a variant name."""
    if variant not in VARIANTS:
        raise UserError(f"unknown calibration variant {variant!r}: one of {', '.join(VARIANTS)}")
    steps = variant.split("+")
    return steps[0], ("pamr" if "pamr" in steps else "none"), "sam" in steps


@dataclass(frozen=True)
class LabelChoice:
    """The calibrated way of answering one label of one control."""

    control: str
    label: str
    variant: str  # one of VARIANTS
    threshold: float  # background below it (score maps), or instances scoring below it dropped (SAM 3)


@dataclass(frozen=True)
class ExpressionChoice:
    """The calibrated way of answering a project's referring expressions (one choice for them all)."""

    engine: str  # one of EXPRESSION_ENGINES
    threshold: float  # the expression's mask: its probability (LAVT) or GEM score at least this
    sam: bool = False  # a promptable SAM sharpens the mask (refine=sam)

    @property
    def variant(self) -> str:
        """``lavt``, ``lavt+sam``, ``gem`` or ``gem+sam``."""
        return self.engine + ("+sam" if self.sam else "")


@dataclass
class Calibration:
    """A project's calibrated choices, and the version whose engines it calibrated (None: the base ones)."""

    choices: list[LabelChoice] = field(default_factory=list)
    trained: str | None = None  # a trained ``gem`` version of the store that the choices were made on
    expressions: ExpressionChoice | None = None  # None: expressions are answered as without a calibration

    def choice(self, control: str, label: str) -> LabelChoice | None:
        """The choice for ``label`` of ``control``, if the calibration made one."""
        for c in self.choices:
            if c.control == control and c.label == label:
                return c
        return None

    def variants(self) -> list[str]:
        """The variants the choices use, in :data:`VARIANTS` order."""
        used = {c.variant for c in self.choices}
        return [v for v in VARIANTS if v in used]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        out: dict[str, Any] = {"choices": [asdict(c) for c in self.choices], "trained": self.trained}
        if self.expressions is not None:
            out["expressions"] = asdict(self.expressions)
        return out


def _is_threshold(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0.0 <= value <= 1.0
    )


def parse_calibration(data: Any, where: str = "calibration") -> Calibration:
    """A calibration read from ``where`` (a JSON value), checked field by field; :class:`UserError` saying
    what is wrong otherwise."""

    def bad(reason: str) -> UserError:
        return UserError(f"{where} is not a valid calibration: {reason}")

    if not isinstance(data, dict):
        raise bad(f"a JSON object is expected, it holds a {type(data).__name__}")
    trained = data.get("trained")
    if trained is not None and (not isinstance(trained, str) or len(trained) > 128):
        raise bad("'trained' must be a version name or null")
    raw = data.get("choices")
    if not isinstance(raw, list) or len(raw) > 10_000:
        raise bad("'choices' must be a list")
    choices: list[LabelChoice] = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise bad(f"choice {n} is not an object")
        for key in ("control", "label", "variant"):
            if not isinstance(entry.get(key), str) or len(entry[key]) > 1000:
                raise bad(f"choice {n}: {key!r} must be a string")
        if entry["variant"] not in VARIANTS:
            raise bad(f"choice {n}: variant {entry['variant'][:40]!r} is not one of {', '.join(VARIANTS)}")
        threshold = entry.get("threshold")
        if not _is_threshold(threshold):
            raise bad(f"choice {n}: 'threshold' must be a number in [0, 1]")
        choices.append(LabelChoice(entry["control"], entry["label"], entry["variant"], float(threshold)))
    raw_expr = data.get("expressions")
    expressions = None
    if raw_expr is not None:
        if not isinstance(raw_expr, dict):
            raise bad("'expressions' must be an object or null")
        engine = raw_expr.get("engine")
        if engine not in EXPRESSION_ENGINES:
            raise bad(f"'expressions': 'engine' must be one of {', '.join(EXPRESSION_ENGINES)}")
        if not _is_threshold(raw_expr.get("threshold")):
            raise bad("'expressions': 'threshold' must be a number in [0, 1]")
        if not isinstance(raw_expr.get("sam", False), bool):
            raise bad("'expressions': 'sam' must be true or false")
        expressions = ExpressionChoice(engine, float(raw_expr["threshold"]), raw_expr.get("sam", False))
    return Calibration(choices, trained, expressions)


def read_calibration(raw: bytes, where: str) -> Calibration:
    """:func:`parse_calibration` of a JSON file's bytes."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{where} is not valid JSON: {exc}") from exc
    return parse_calibration(data, where)
