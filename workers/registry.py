"""The engine registry: one entry per engine with its settings, its factory, what it answers and its
version name; the pipeline, the jobs, ``predict`` and the model versions read it, never an engine's name.

A new engine is one :func:`register_engine` call (``timm``'s ``register_model``, in small): its name
becomes a choice of ``engine=`` on a control (declared in the kernel, :func:`groundlabel.spec.declare_engine`)
when it answers class prompts (score maps or instances). Nothing here imports torch: the factories
import their model family when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from groundlabel.errors import UserError
from groundlabel.settings import EngineSettings
from groundlabel.spec import declare_engine, withdraw_engine

#: ``heatmaps(images, prompts, groups=, sizes=, lazy=)``: one score map per class prompt (GEM).
SCORE_MAPS = "score maps"
#: ``instances(images, prompts, groups=, min_score=)``: one scored mask per object found (SAM 3).
INSTANCES = "instances"
#: A mask for a referring expression (LAVT).
EXPRESSION_MASK = "a mask for an expression"
#: Masks for clicks and boxes (a promptable SAM).
PROMPT_MASKS = "masks for clicks and boxes"
#: What an engine selectable with ``engine=`` answers: class prompts and typed phrases.
CLASS_ANSWERS = (SCORE_MAPS, INSTANCES)


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its name, what it answers, the settings that configure it, how to build it and the
    name its predictions carry (computed from the settings alone: no model loaded, no weight read)."""

    name: str
    answers: frozenset[str]
    settings: str  # the environment variables that configure it, e.g. "GROUNDLABEL_GEM_*"
    build: Callable[[EngineSettings], Any]
    version: Callable[[EngineSettings], str]
    #: Builds it on a trained version's weights file (the model store's versions of this kind), if any.
    trained: Callable[[EngineSettings, str], Any] | None = None
    #: Whether it honours ``GROUNDLABEL_CPU_PRECISION``: in bf16 on a CPU its names end in ``-bf16``
    #: (:func:`groundlabel.versions.with_precision`).
    cpu_bf16: bool = False

    def answers_class_prompts(self) -> bool:
        """Whether a control may name it with ``engine=`` (it answers score maps or instances)."""
        return any(a in self.answers for a in CLASS_ANSWERS)


_REGISTRY: dict[str, EngineEntry] = {}


def register_engine(entry: EngineEntry) -> EngineEntry:
    """Add ``entry`` (replacing one of the same name); an engine of class prompts becomes a known
    ``engine=`` choice of this process's label specs."""
    _REGISTRY[entry.name] = entry
    if entry.answers_class_prompts():
        declare_engine(entry.name)
    return entry


def unregister_engine(name: str) -> None:
    """Remove the engine ``name`` (one that a test or a plug-in registered)."""
    _REGISTRY.pop(name, None)
    withdraw_engine(name)


def get_entry(name: str) -> EngineEntry:
    """The entry of ``name``; :class:`UserError` listing the known engines when there is none."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UserError(f"unknown engine {name!r}: the engines are {', '.join(_REGISTRY)}")
    return entry


def entries() -> list[EngineEntry]:
    """Every registered engine, in registration order."""
    return list(_REGISTRY.values())


def class_engines() -> list[str]:
    """The names a control's ``engine=`` may take (the engines answering class prompts)."""
    return [e.name for e in _REGISTRY.values() if e.answers_class_prompts()]


def answers(name: str, what: str) -> bool:
    """Whether the engine ``name`` answers ``what`` (:data:`SCORE_MAPS`, :data:`INSTANCES`...)."""
    return what in get_entry(name).answers


# -- the built-in engines' settings and factories ------------------------------------------------------


def gem_config(engines: EngineSettings, *, register: bool = False) -> Any:
    """The :class:`workers.models.gem.GemConfig` that ``engines`` asks for (validated; no torch).

    ``register``: also register a ``GROUNDLABEL_GEM_MODEL_CONFIG`` architecture with open_clip, as
    building the engine needs. Raises :class:`UserError` naming the variable when an option is invalid.
    """
    from workers.models.gem.config import GemConfig

    if register and engines.gem_model_config:
        from workers.models.gem.weights import register_model_config

        register_model_config(engines.gem_model_config, "GROUNDLABEL_GEM_MODEL_CONFIG")

    try:
        return GemConfig(**engines.gem_options())
    except UserError as exc:
        raise UserError(f"GROUNDLABEL_GEM_* settings: {exc}") from exc


def lavt_config(engines: EngineSettings) -> Any:
    """The :class:`workers.models.lavt.LavtConfig` that ``engines`` asks for, or None without LAVT."""
    if not engines.lavt_enabled:
        return None
    from workers.models.lavt.config import LavtConfig

    return LavtConfig(**engines.lavt_options())


def sam3_config(engines: EngineSettings) -> Any:
    """The :class:`workers.models.sam3.Sam3Config` that ``engines`` asks for (validated; no torch)."""
    from workers.models.sam3.config import Sam3Config

    config = Sam3Config(**engines.sam3_options())
    try:
        config.validate()
    except UserError as exc:
        raise UserError(f"GROUNDLABEL_SAM3_* settings: {exc}") from exc
    return config


def sam_config(engines: EngineSettings) -> Any:
    """The promptable SAM's :class:`workers.models.sam.SamConfig` (clicks, boxes, ``refine=sam``), or None
    when ``GROUNDLABEL_SAM_MODEL`` is not set (no torch)."""
    if not engines.sam_enabled:
        return None
    from workers.models.sam.config import SamConfig

    try:
        return SamConfig(**engines.sam_options())
    except UserError as exc:
        raise UserError(f"GROUNDLABEL_SAM_* settings: {exc}") from exc


def new_gem_engine(config: Any, engines: EngineSettings) -> Any:
    """A GEM engine for ``config``, with the deployment's choice of packed CPU weights
    (``GROUNDLABEL_GEM_PACK_WEIGHTS``)."""
    from workers.models.gem import GemEngine
    from workers.models.gem.kernels import set_weight_packing

    set_weight_packing(engines.gem_pack_weights)
    return GemEngine(config)


def _gem_version(engines: EngineSettings) -> str:
    from workers.models.gem.weights import weights_label

    config = gem_config(engines)
    return config.model_version(weights_label(config.pretrained))


def _trained_gem(engines: EngineSettings, weights: str) -> Any:
    from dataclasses import replace

    # the distilled CLIP, in the same architecture
    return new_gem_engine(replace(gem_config(engines, register=True), pretrained=weights), engines)


def _build_sam3(engines: EngineSettings) -> Any:
    from workers.models.sam3 import Sam3Engine

    return Sam3Engine(sam3_config(engines))


def _lavt_version(engines: EngineSettings) -> str:
    from workers.models.lavt.config import lavt_model_version

    config = lavt_config(engines)
    return lavt_model_version(config.variant, engines.lavt_checkpoint) if config is not None else ""


def _build_lavt(engines: EngineSettings) -> Any:
    from pathlib import Path

    from workers.models.lavt import LavtEngine

    checkpoint = engines.lavt_checkpoint
    return LavtEngine(str(Path(checkpoint).expanduser()) if checkpoint else None, lavt_config(engines))


def _trained_lavt(engines: EngineSettings, weights: str) -> Any:
    from workers.models.lavt import LavtEngine
    from workers.models.lavt.config import LavtConfig

    return LavtEngine(weights, LavtConfig(**engines.lavt_options()))


def _build_sam(engines: EngineSettings) -> Any:
    from workers.models.sam import SamEngine

    return SamEngine(sam_config(engines))


def _sam_version(engines: EngineSettings) -> str:
    config = sam_config(engines)
    return config.model_version() if config is not None else ""


register_engine(
    EngineEntry(
        "gem",
        frozenset({SCORE_MAPS}),
        "GROUNDLABEL_GEM_*",
        build=lambda engines: new_gem_engine(gem_config(engines, register=True), engines),
        version=_gem_version,
        trained=_trained_gem,
        cpu_bf16=True,
    )
)
register_engine(
    EngineEntry(
        "sam3",
        frozenset({INSTANCES}),
        "GROUNDLABEL_SAM3_*",
        build=_build_sam3,
        version=lambda engines: sam3_config(engines).model_version(),
        cpu_bf16=True,
    )
)
register_engine(
    EngineEntry(
        "lavt",
        frozenset({EXPRESSION_MASK}),
        "GROUNDLABEL_LAVT_*",
        build=_build_lavt,
        version=_lavt_version,
        trained=_trained_lavt,
        cpu_bf16=True,
    )
)
register_engine(
    EngineEntry(
        "sam",
        frozenset({PROMPT_MASKS}),
        "GROUNDLABEL_SAM_*",
        build=_build_sam,
        version=_sam_version,
        cpu_bf16=True,
    )
)
