"""The engines of one worker process, built once from environment variables and then reused.

``GROUNDLABEL_GEM_MODEL`` (open_clip name, default ``ViT-B-16``), ``GROUNDLABEL_GEM_MODEL_CONFIG`` (an
open_clip model-config JSON file for a custom architecture; its file stem becomes the model name),
``GROUNDLABEL_GEM_PRETRAINED`` (tag such as ``openai``, a weight file, or ``none`` for random weights),
``GROUNDLABEL_WEIGHTS_DIR`` (where weights are looked up and downloaded), ``GROUNDLABEL_GEM_IMAGE_SIZE``,
``GROUNDLABEL_GEM_METHOD``, ``GROUNDLABEL_GEM_REFINE`` (``none`` or ``pamr``), ``GROUNDLABEL_GEM_TEMPLATES``,
``GROUNDLABEL_GEM_BATCH``, ``GROUNDLABEL_GEM_DEPTH`` (GEM's ``gem_depth``, default 7),
``GROUNDLABEL_GEM_TEMPERATURE`` (GEM's self-self inverse temperature: ``adaptive``, the default, or a number),
``GROUNDLABEL_LAVT_CHECKPOINT`` (a LAVT ``.pth``; ``none`` for random weights; unset disables LAVT),
``GROUNDLABEL_LAVT_VARIANT``, ``GROUNDLABEL_LAVT_TOKENIZER``, ``GROUNDLABEL_DEVICE`` (``auto``, ``cpu``,
``cuda``, ``cuda:1``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from workers.models.gem.config import parse_temperature

log = logging.getLogger(__name__)

_lock = threading.Lock()
_engines: dict[str, Any] = {}


def _env(env: Mapping[str, str], name: str) -> str | None:
    value = (env.get(name) or "").strip()
    return value or None


def gem_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The :class:`GemConfig` keyword arguments the environment asks for (no model or torch loaded; a
    ``GROUNDLABEL_GEM_MODEL_CONFIG`` file only names the model here)."""
    env = os.environ if env is None else env
    kwargs: dict[str, Any] = {}
    config_file = _env(env, "GROUNDLABEL_GEM_MODEL_CONFIG")
    if config_file:
        kwargs["model_name"] = Path(config_file).expanduser().stem
    elif _env(env, "GROUNDLABEL_GEM_MODEL"):
        kwargs["model_name"] = _env(env, "GROUNDLABEL_GEM_MODEL")
    pretrained = _env(env, "GROUNDLABEL_GEM_PRETRAINED")
    if pretrained is not None:
        kwargs["pretrained"] = None if pretrained.lower() in ("none", "random") else pretrained
    if _env(env, "GROUNDLABEL_WEIGHTS_DIR"):
        kwargs["cache_dir"] = _env(env, "GROUNDLABEL_WEIGHTS_DIR")
    for name, key, cast in (
        ("GROUNDLABEL_GEM_IMAGE_SIZE", "image_size", int),
        ("GROUNDLABEL_GEM_METHOD", "method", str),
        ("GROUNDLABEL_GEM_REFINE", "refine", str),
        ("GROUNDLABEL_GEM_TEMPLATES", "templates", str),
        ("GROUNDLABEL_GEM_BATCH", "batch_size", int),
        ("GROUNDLABEL_GEM_DEPTH", "gem_depth", int),
        ("GROUNDLABEL_GEM_TEMPERATURE", "ss_attn_temp", parse_temperature),
        ("GROUNDLABEL_DEVICE", "device", str),
    ):
        raw = _env(env, name)
        if raw is not None:
            try:
                kwargs[key] = cast(raw)
            except ValueError as exc:
                raise UserError(f"{name}={raw!r} is not valid: {exc}") from exc
    return kwargs


def gem_config_from_env(env: Mapping[str, str] | None = None) -> Any:
    """The :class:`workers.models.gem.GemConfig` the environment asks for, with a
    ``GROUNDLABEL_GEM_MODEL_CONFIG`` architecture registered with open_clip."""
    from workers.models.gem import GemConfig
    from workers.models.gem.weights import register_model_config

    env = os.environ if env is None else env
    config_file = _env(env, "GROUNDLABEL_GEM_MODEL_CONFIG")
    if config_file:
        register_model_config(config_file, "GROUNDLABEL_GEM_MODEL_CONFIG")
    return GemConfig(**gem_options_from_env(env))


def lavt_settings_from_env(env: Mapping[str, str] | None = None) -> tuple[bool, str | None, Any]:
    """(enabled, checkpoint path or None for random weights, LavtConfig) from the environment."""
    env = os.environ if env is None else env
    checkpoint = _env(env, "GROUNDLABEL_LAVT_CHECKPOINT")
    if checkpoint is None:
        return False, None, None
    from workers.models.lavt import LavtConfig

    kwargs: dict[str, Any] = {}
    if _env(env, "GROUNDLABEL_LAVT_VARIANT"):
        kwargs["variant"] = _env(env, "GROUNDLABEL_LAVT_VARIANT")
    if _env(env, "GROUNDLABEL_LAVT_TOKENIZER"):
        kwargs["tokenizer"] = _env(env, "GROUNDLABEL_LAVT_TOKENIZER")
    if _env(env, "GROUNDLABEL_DEVICE"):
        kwargs["device"] = _env(env, "GROUNDLABEL_DEVICE")
    if _env(env, "GROUNDLABEL_WEIGHTS_DIR"):
        kwargs["cache_dir"] = _env(env, "GROUNDLABEL_WEIGHTS_DIR")
    if checkpoint.lower() in ("none", "random"):
        return True, None, LavtConfig(**kwargs)
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"GROUNDLABEL_LAVT_CHECKPOINT={checkpoint!r} is not a file")
    return True, str(path), LavtConfig(**kwargs)


def get_gem_engine() -> Any:
    """The process's GEM engine (built on first use)."""
    with _lock:
        engine = _engines.get("gem")
        if engine is None:
            from workers.models.gem import GemEngine

            config = gem_config_from_env()
            log.info("loading GEM %s (weights %s)", config.model_name, config.pretrained)
            engine = GemEngine(config)
            _engines["gem"] = engine
        return engine


def lavt_enabled() -> bool:
    """Whether a LAVT model is configured (``GROUNDLABEL_LAVT_CHECKPOINT``)."""
    return bool(_env(os.environ, "GROUNDLABEL_LAVT_CHECKPOINT")) or "lavt" in _engines


def get_lavt_engine() -> Any:
    """The process's LAVT engine; :class:`UserError` when none is configured."""
    with _lock:
        engine = _engines.get("lavt")
        if engine is None:
            enabled, checkpoint, config = lavt_settings_from_env()
            if not enabled:
                raise UserError(
                    "a referring expression needs LAVT: set GROUNDLABEL_LAVT_CHECKPOINT on the workers"
                )
            from workers.models.lavt import LavtEngine

            log.info("loading LAVT %s", checkpoint or "(random weights)")
            engine = LavtEngine(checkpoint, config)
            _engines["lavt"] = engine
        return engine


def set_engine(kind: str, engine: Any) -> None:
    """Install an already-built engine (``"gem"`` or ``"lavt"``) for this process."""
    if kind not in ("gem", "lavt"):
        raise ValueError(f"unknown engine kind {kind!r}")
    with _lock:
        _engines[kind] = engine


def clear_engines() -> None:
    """Forget the loaded engines (the next job loads them again)."""
    with _lock:
        _engines.clear()


def load_all() -> list[str]:
    """Load every configured engine now; returns their model versions."""
    versions = [get_gem_engine().model_version]
    if lavt_enabled():
        versions.append(get_lavt_engine().model_version)
    return versions
