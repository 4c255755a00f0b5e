"""Where the weights of a ``transformers`` model come from: a local folder, a weights folder, or the hub.

Shared by every model family that ``transformers`` ships (the Segment Anything family, SAM 3). A source is

1. a local folder holding ``config.json`` and the weights (what ``save_pretrained`` or
   ``hf download <id> --local-dir <folder>`` writes), used as it is;
2. a hub model id (``facebook/sam2.1-hiera-tiny``), looked up first in the weights folder
   (``<weights dir>/<id>/`` as a plain folder, or ``<weights dir>`` as a hub cache with
   ``models--org--name``), then in the Hugging Face cache, then downloaded when the machine is online.

Gated models (SAM 3) need an access token: ``HF_TOKEN``, read by :mod:`groundlabel.settings` and passed
here as ``token``. Any failure becomes a :class:`~groundlabel.errors.UserError` that says what to put where.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubSource:
    """Where to look for one model's weights, and how."""

    source: str  # a hub id or a local folder
    weights_dir: str | None = None  # searched before the hub: <dir>/<id>/ or a hub cache
    token: str | None = field(default=None, repr=False)  # for gated models
    offline: bool = False  # never reach the hub
    variable: str = "the model setting"  # the setting that named the source, for errors
    gated: bool = False  # the hub repository needs an accepted licence and a token (SAM 3)

    @property
    def is_folder(self) -> bool:
        """Whether the source is an existing local folder."""
        return Path(self.source).expanduser().is_dir()

    @property
    def label(self) -> str:
        """A short name for model versions: the hub id's last part or the folder's name."""
        return Path(self.source.rstrip("/\\")).name or self.source


def local_folder(src: HubSource) -> Path | None:
    """The local folder that holds the model: the source itself, or ``<weights dir>/<id>``."""
    if src.is_folder:
        return Path(src.source).expanduser()
    if src.weights_dir:
        candidate = Path(src.weights_dir).expanduser() / src.source
        if (candidate / "config.json").is_file():
            return candidate
    return None


def model_type(src: HubSource) -> str | None:
    """The ``model_type`` of a local folder's ``config.json`` (None when the model is not local)."""
    folder = local_folder(src)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError) as exc:
        raise UserError(f"{src.variable}: {folder / 'config.json'} is not readable JSON: {exc}") from exc


def _help(src: HubSource, gated: bool) -> str:
    where = f"{src.weights_dir}/{src.source}" if src.weights_dir else "<folder>"
    text = (
        f"download it on a machine that is online with `hf download {src.source} --local-dir {where}` "
        f"and set GROUNDLABEL_WEIGHTS_DIR to the folder above it (or {src.variable} to the folder itself)"
    )
    if gated:
        text += "; the model is gated: accept its licence on its hub page and set HF_TOKEN"
    return text


def load_pretrained(model_cls: Any, src: HubSource, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained`` on the resolved source; a :class:`UserError` with the remedy if not."""
    if Path(src.source).expanduser().is_file():
        raise UserError(
            f"{src.variable}={src.source!r} is a file; give a folder with config.json or a hub id"
        )
    folder = local_folder(src)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise UserError(f"{src.variable}: {folder} holds no config.json (a transformers model folder)")
        try:
            return model_cls.from_pretrained(str(folder), **kwargs)
        except (OSError, ValueError) as exc:
            raise UserError(f"{src.variable}: cannot load the model in {folder}: {exc}") from exc
    if "/" not in src.source:
        raise UserError(
            f"{src.variable}={src.source!r} is neither a local folder nor a hub id "
            "like 'facebook/sam2.1-hiera-tiny'"
        )
    options = dict(kwargs)
    if src.weights_dir:
        options["cache_dir"] = str(Path(src.weights_dir).expanduser())
    try:
        return model_cls.from_pretrained(src.source, token=src.token, local_files_only=src.offline, **options)
    except OSError as exc:
        if src.weights_dir and not src.offline:  # maybe in the default cache although not in the folder
            options.pop("cache_dir", None)
            try:
                return model_cls.from_pretrained(
                    src.source, token=src.token, local_files_only=True, **options
                )
            except OSError:
                pass
        text = str(exc).lower()
        gated = src.gated or any(w in text for w in ("gated", "401", "403", "restricted", "token"))
        state = "offline, and it is not in the weights folder or cache" if src.offline else "not loadable"
        raise UserError(f"{src.variable}={src.source!r}: {state} ({exc}); {_help(src, gated)}") from exc
