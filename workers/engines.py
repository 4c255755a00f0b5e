"""The engines of one worker process, built once from its settings and then reused.

The command that starts the process (``groundlabel worker``, or the in-process runner's child
initialiser) calls :func:`configure` with the process's :class:`~groundlabel.settings.Settings`; the
engines are built from its ``engines`` section on first use, and jobs fetch images with its ``fetch``
section. Without :func:`configure`, the defaults apply (the environment is never read here).

:func:`model_versions` names every engine the settings ask for without loading one (no torch): the
backend announces these names, and each engine's own ``model_version`` is computed by the same code.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.ls_access import FetchSettings
from groundlabel.settings import EngineSettings, Settings, split_refine
from groundlabel.versions import STAND_IN_SUFFIX, refined, stand_in, with_lavt, with_precision
from workers import registry
from workers.cache import LRUCache
from workers.registry import SCORE_MAPS, gem_config, lavt_config, sam3_config, sam_config

#: Named here too: the kernel's stand-in suffix and the registry's settings readers.
__all__ = ["STAND_IN_SUFFIX", "gem_config", "lavt_config", "sam3_config", "sam_config"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Any] = {}
_store: list[Any] = [None, None]  # (model store settings, the ModelStore opened for them)
_store_lock = threading.Lock()
_settings = Settings()



def configure(settings: Settings) -> None:
    """Use ``settings`` for this process's engines and image fetching (forgets loaded engines)."""
    global _settings
    with _lock:
        _settings = settings
        _engines.clear()
        _trained.clear()


def settings() -> Settings:
    """This process's settings."""
    return _settings


def fetch_settings() -> FetchSettings:
    """Where this process may fetch images from, with which token."""
    return _settings.fetch


def sam_refines(engines: EngineSettings, kind: str) -> bool:
    """Whether ``refine=sam`` applies to ``kind``'s masks (``"gem"`` or ``"lavt"``)."""
    return split_refine(engines.gem_refine if kind == "gem" else engines.lavt_refine)[1]


def cpu_precisions(engines: EngineSettings) -> tuple[str, ...]:
    """The precisions the workers that ``engines`` configures may name in their versions, from the settings
    alone (the backend does not know the workers' CPUs): ``fp32`` on CUDA or under
    ``GROUNDLABEL_CPU_PRECISION=fp32``, ``bf16`` for ``bf16`` on ``GROUNDLABEL_DEVICE=cpu``, else both
    (``auto``: bf16 on a worker whose CPU has it natively), the first one the announced name's."""
    device = (engines.device or "auto").strip().lower()
    if device.startswith("cuda") or engines.cpu_precision == "fp32":
        return ("fp32",)
    if engines.cpu_precision == "bf16" and device == "cpu":
        return ("bf16",)
    return ("fp32", "bf16")


def model_versions(engines: EngineSettings, precision: str = "fp32") -> dict[str, str]:
    """The name each configured engine gives its predictions: every engine of class prompts in the registry
    (``gem``, ``sam3``: a label config may ask for any), ``lavt`` when configured, else ``gem_for_lavt``
    (GEM grounding expressions), and ``sam`` when configured. Computed without loading any model or
    reading a weight file (the backend's machine need not hold the weights). ``precision``: the names of
    workers running their CPU engines in it (``bf16``: each with ``-bf16``, see :func:`cpu_precisions`)."""

    def named(entry: registry.EngineEntry) -> str:
        version = entry.version(engines)
        return with_precision(version, precision) if entry.cpu_bf16 and version else version

    sam = sam_config(engines)
    sam_version = named(registry.get_entry("sam")) if sam is not None else None

    def sharpened(version: str, kind: str) -> str:
        sharp = sam_version is not None and sam_refines(engines, kind)
        return refined(version, sam_version) if sharp else version

    out: dict[str, str] = {}
    for entry in registry.entries():
        if entry.answers_class_prompts():
            version = named(entry)
            out[entry.name] = sharpened(version, "gem") if SCORE_MAPS in entry.answers else version
    if lavt_config(engines) is None:
        out["gem_for_lavt"] = sharpened(stand_in(named(registry.get_entry("gem"))), "gem")
    else:
        out["lavt"] = sharpened(named(registry.get_entry("lavt")), "lavt")
    if sam_version is not None:
        out["sam"] = sam_version
    return out


def all_model_versions(engines: EngineSettings) -> list[str]:
    """Every name the configured engines' predictions may carry, over :func:`cpu_precisions` (the result
    cache is read under each: a bf16 answer is stored under its own name, never under an fp32 one)."""
    names = (v for p in cpu_precisions(engines) for v in model_versions(engines, p).values())
    return list(dict.fromkeys(names))


def announced_version(settings: Settings) -> str:
    """The model version the backend announces: the operator's ``GROUNDLABEL_MODEL_VERSION``, else the
    name of the deployment's engine (``GROUNDLABEL_ENGINE``: GEM's, or SAM 3's), followed by
    ``+lavt-<checkpoint stem>`` when LAVT is configured (``gem-ViT-B-16-openai``,
    ``gem-ViT-B-16-openai+lavt-refcoco``). Each prediction carries its own engine's name
    (:func:`model_versions`)."""
    if settings.backend.model_version:
        return settings.backend.model_version
    engines = settings.engines
    version = model_versions(engines, cpu_precisions(engines)[0])[engines.engine]
    return with_lavt(version, engines.lavt_checkpoint) if engines.lavt_enabled else version


def get_engine(name: str, project: str | None = None) -> Any:
    """The engine ``name`` of the registry for ``project``: its promoted trained version when the engine
    has trained versions, else the process's one (built on first use); :class:`UserError` listing the
    engines for an unknown name."""
    entry = registry.get_entry(name)
    if entry.trained is not None:
        version = project_version(project, name)
        trained = _trained_engine(version, entry.trained) if version is not None else None
        if trained is not None:
            return trained
    with _lock:
        engine = _engines.get(name)
        if engine is None:
            log.info("loading %s (%s settings)", name, entry.settings)
            engine = entry.build(_settings.engines)
            _engines[name] = engine
        return engine


def get_gem_engine(project: str | None = None) -> Any:
    """The GEM engine for ``project``: its promoted trained (distilled) version, else the process's one
    (built on first use)."""
    return get_engine("gem", project)


def default_engine() -> str:
    """The engine of class prompts and typed phrases for controls whose tag names none."""
    return _settings.engines.engine


def get_sam3_engine() -> Any:
    """The process's SAM 3 engine (built on first use)."""
    return get_engine("sam3")


#: Trained versions kept loaded at once (one per project served), the least recently used dropped first.
MAX_PROJECT_ENGINES = 4
#: The engines of trained versions, by ``kind@project/name``.
_trained: LRUCache[Any] = LRUCache(MAX_PROJECT_ENGINES)


def project_version(project: str | None, kind: str = "lavt") -> Any:
    """The trained version of ``kind`` (``"lavt"``, ``"gem"``) the model store promotes for ``project``,
    or None (the base models).

    Read on every job, so a promotion or a rollback is served from the next job on, without a restart.
    """
    if not _settings.training.model_store or not project:
        return None
    try:
        version = model_store().served_trained(project)  # through a calibration, the version under it
    except UserError as exc:
        log.warning("model store: %s; project %s gets the base models", exc, project)
        return None
    return version if version is not None and version.kind == kind else None


def project_calibration(project: str | None) -> Any:
    """``(version name, Calibration)`` of the calibration the model store promotes for ``project``, or None.

    Read on every job, like :func:`project_version`: a promotion or rollback is served from the next job on.
    """
    if not _settings.training.model_store or not project:
        return None
    try:
        version = model_store().promoted(project)
        if version is None or version.kind != "calibration":
            return None
        return version.name, model_store().calibration(version)
    except UserError as exc:
        log.warning("model store: %s; project %s gets its uncalibrated settings", exc, project)
        return None


def variant_engine(variant: str, project: str | None = None) -> Any:
    """The engine answering a calibration variant for ``project`` (GEM with the variant's own refinement,
    or SAM 3); SAM's sharpening is the caller's (:func:`get_sam_engine`)."""
    from groundlabel.calibration import variant_parts
    from workers.calibration import with_refine

    engine, own, _ = variant_parts(variant)
    if engine != "gem":
        return get_engine(engine, project)
    return with_refine(get_engine("gem", project), own)


def model_store() -> Any:
    """The process's :class:`~groundlabel.model_store.ModelStore` (``GROUNDLABEL_MODEL_STORE``), opened once
    per configuration (an S3 store keeps its client and its downloaded weights)."""
    from groundlabel.model_store import ModelStore

    training = _settings.training
    key = (training.model_store, training.s3)
    with _store_lock:  # not _lock: engines are built under it and read their weights from the store
        if _store[0] != key or _store[1] is None:
            store = ModelStore.from_settings(training)
            if store is None:
                raise UserError("no model store is configured (GROUNDLABEL_MODEL_STORE)")
            _store[:] = [key, store]
        return _store[1]


def _weights(version: Any) -> str:
    return str(model_store().weights_path(version))


def _trained_engine(version: Any, build: Any) -> Any:
    """The engine of a promoted trained version, or None when the model store refuses its weights (not
    safetensors, malformed: logged, and the project gets the base models)."""
    from groundlabel.model_store import StoreFileError

    try:
        return _project_engine(version, build)
    except StoreFileError as exc:
        log.warning("model store: %s; project %s gets the base models", exc, version.project)
        return None


def _project_engine(version: Any, build: Any) -> Any:
    """The engine of a trained version (``build(settings, its weights file)`` on first use), named by the
    version; the least recently used ones beyond :data:`MAX_PROJECT_ENGINES` are dropped."""
    key = f"{version.kind}@{version.project}/{version.name}"
    with _lock:
        engine = _trained.get(key)
        if engine is None:
            log.info("loading %s %s for project %s", version.kind, version.name, version.project)
            engine = build(_settings.engines, _weights(version))
            engine.model_version = with_precision(version.name, getattr(engine, "version_precision", "fp32"))
            _trained.put(key, engine)
        return engine


def lavt_enabled(project: str | None = None) -> bool:
    """Whether a LAVT model is configured (``GROUNDLABEL_LAVT_CHECKPOINT``), installed, or trained for
    ``project``."""
    return _settings.engines.lavt_enabled or "lavt" in _engines or project_version(project) is not None


def get_lavt_engine(project: str | None = None) -> Any:
    """The LAVT engine for ``project``: its promoted trained version, else the process's configured one;
    :class:`UserError` when there is neither."""
    version = project_version(project)
    trained = _trained_engine(version, registry.get_entry("lavt").trained) if version is not None else None
    if trained is not None:
        return trained
    if "lavt" not in _engines:
        if lavt_config(_settings.engines) is None:
            raise UserError(
                "a referring expression needs LAVT: set GROUNDLABEL_LAVT_CHECKPOINT on the workers"
            )
        checkpoint = _settings.engines.lavt_checkpoint
        if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
            raise UserError(f"GROUNDLABEL_LAVT_CHECKPOINT={checkpoint!r} is not a file")
    return get_engine("lavt")


def sam_enabled() -> bool:
    """Whether a promptable SAM is configured (``GROUNDLABEL_SAM_MODEL``) or installed."""
    return _settings.engines.sam_enabled or "sam" in _engines


def get_sam_engine() -> Any:
    """The process's promptable SAM (built on first use); None when none is configured."""
    if "sam" not in _engines and sam_config(_settings.engines) is None:
        return None
    return get_engine("sam")


def refiner(kind: str) -> Any:
    """The SAM engine sharpening ``kind``'s masks (``"gem"``, ``"lavt"``); None without ``refine=sam``."""
    if not sam_refines(_settings.engines, kind):
        return None
    return get_sam_engine()


def set_engine(kind: str, engine: Any) -> None:
    """Install an already-built engine of the registry (``"gem"``, ``"sam3"``, ``"lavt"``, ``"sam"``...)
    for this process; :class:`UserError` for an unknown name."""
    registry.get_entry(kind)
    with _lock:
        _engines[kind] = engine


def clear_engines() -> None:
    """Forget the loaded engines (the next job loads them again)."""
    with _lock:
        _engines.clear()
        _trained.clear()


def load_all() -> list[str]:
    """Load every configured engine now; returns their model versions."""
    gem = get_gem_engine()
    versions = [gem.model_version]
    default = get_engine(default_engine())
    if default is not gem:
        versions.append(default.model_version)
    if lavt_enabled():
        versions.append(get_lavt_engine().model_version)
    if sam_enabled():
        versions.append(get_sam_engine().model_version)
    return versions
