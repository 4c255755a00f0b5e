"""Where GEM's CLIP weights come from: random init, a local file, a cache folder, or open_clip's hub download.

Resolution order for an open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ``metaclip_400m``...):

1. the weights folder (``GemConfig.cache_dir``: ``$GROUNDLABEL_WEIGHTS_DIR`` or ``--weights-dir``), flat
   or as a Hugging Face hub cache: ``<dir>/<file>`` where ``<file>`` is open_clip's download name
   (``ViT-B-16.pt``, ``b16_400m.pt``) or the hub file name (``open_clip_model.safetensors``,
   ``open_clip_pytorch_model.bin``), ``<dir>/<hub repo id>/<hub file>``, or
   ``<dir>/models--org--name/snapshots/*/<hub file>``;
2. open_clip's default caches (``~/.cache/clip`` and the Hugging Face hub cache, ``HubSettings.cache``);
3. a download through open_clip, unless offline (``HubSettings.offline``: ``HF_HUB_OFFLINE=1``).

Every setting arrives as an argument (read by :mod:`groundlabel.settings`); nothing here reads the
environment.

A tag whose weights were trained with QuickGELU (OpenAI, MetaCLIP) gets the ``-quickgelu`` architecture.
OpenAI's TorchScript ``.pt`` archives load through ``torch.jit.load`` (and imply QuickGELU).
"""

from __future__ import annotations

import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from groundlabel.errors import UserError
from groundlabel.settings import HubSettings

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass
class LoadedClip:
    """A built open_clip CLIP with its tokenizer and a short label of where the weights came from."""

    model: Any
    tokenizer: Any
    arch: str
    weights_label: str
    source: str


def is_path_like(pretrained: str) -> bool:
    """True when ``pretrained`` names a file rather than an open_clip tag."""
    return (
        os.sep in pretrained
        or (os.altsep is not None and os.altsep in pretrained)
        or pretrained.lower().endswith(WEIGHT_SUFFIXES)
        or os.path.exists(pretrained)
    )


def weights_label(pretrained: str | None) -> str:
    """The weights part of the model version: ``random``, a weight file's stem, or the open_clip tag."""
    if pretrained is None or str(pretrained).strip().lower() in ("", "none", "random"):
        return "random"
    return Path(pretrained).stem if is_path_like(str(pretrained)) else str(pretrained)


def register_model_config(path: str | Path, option: str) -> str:
    """Register an open_clip model-config JSON file (a custom architecture); returns the model name (its
    stem). ``option`` names the setting in the error when the file is missing."""
    import open_clip

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{option} {path}: no such file")
    open_clip.add_model_config(file)
    return file.stem


def hub_reachable(hub: HubSettings, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``hub.endpoint``) accepts a TCP connection.

    Checked once before a download so that an offline machine fails at once with the reason instead of
    spending a minute in the hub client's retries.
    """
    url = urlsplit(hub.endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def weights_dirs(cache_dir: str | None, hub: HubSettings | None = None) -> list[Path]:
    """The folders searched for weight files, most specific first: the weights folder, open_clip's
    ``~/.cache/clip``, the hub cache."""
    hub = hub or HubSettings()
    dirs: list[Path] = []
    if cache_dir:
        dirs.append(Path(cache_dir).expanduser())
    dirs.append(Path("~/.cache/clip").expanduser())
    dirs.append(hub.cache_path)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def resolve_arch(arch: str, tag: str | None) -> tuple[str, dict]:
    """The open_clip architecture for ``arch`` + ``tag`` (switching to ``-quickgelu`` when the tag needs it)
    and the tag's pretrained config (empty for no tag)."""
    import open_clip

    models = open_clip.list_models()
    if arch not in models:
        vits = [m for m in models if m.startswith("ViT-")]
        raise UserError(
            f"unknown open_clip model {arch!r}; GEM needs a CLIP ViT such as "
            f"ViT-B-16, ViT-B-32, ViT-L-14 (or their -quickgelu variants), CLIPSelf an EVA02-B-16 or "
            f"EVA02-L-14; known ViTs: {', '.join(vits)}"
        )
    if tag is None:
        return arch, {}
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    quick_arch = arch if arch.endswith("-quickgelu") else f"{arch}-quickgelu"
    if not cfg and quick_arch in models:
        cfg = open_clip.get_pretrained_cfg(quick_arch, tag)
        if cfg:
            arch = quick_arch
    if not cfg:
        tags = sorted(
            set(open_clip.list_pretrained_tags_by_model(arch))
            | set(open_clip.list_pretrained_tags_by_model(quick_arch))
        )
        raise UserError(
            f"{tag!r} is neither an open_clip pretrained tag for {arch} nor an existing weight file; "
            f"known tags: {', '.join(tags) or 'none'}"
        )
    if cfg.get("quick_gelu") and not arch.endswith("-quickgelu") and quick_arch in models:
        arch = quick_arch
    return arch, cfg


def candidate_files(cfg: dict, dirs: list[Path]) -> list[Path]:
    """Every local path where the weights of an open_clip tag config may already be."""
    names: list[str] = []
    url = cfg.get("url", "")
    if url:
        names.append(os.path.basename(url))
    hub = cfg.get("hf_hub", "")
    repo_id, hub_file = os.path.split(hub) if hub else ("", "")
    hub_files = [hub_file] if hub_file else list(HUB_FILES)
    out: list[Path] = []
    for d in dirs:
        for name in names + hub_files:
            out.append(d / name)
        if repo_id:
            for name in hub_files:
                out.append(d / repo_id / name)
            snapshots = d / ("models--" + repo_id.replace("/", "--")) / "snapshots"
            if snapshots.is_dir():
                for snap in sorted(snapshots.iterdir()):
                    out.extend(snap / name for name in hub_files)
    return out


def find_cached_weights(cfg: dict, dirs: list[Path]) -> Path | None:
    """The first existing candidate file, or None."""
    for path in candidate_files(cfg, dirs):
        if path.is_file():
            return path
    return None


def is_torchscript(path: str | Path) -> bool:
    """True for a TorchScript archive such as OpenAI's original CLIP ``.pt`` files."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_weights_file(model: Any, path: str | Path) -> None:
    """Load a ``.pt/.pth/.bin/.safetensors`` checkpoint (open_clip or OpenAI TorchScript) into ``model``."""
    import torch
    from open_clip.factory import load_checkpoint
    from open_clip.model import resize_pos_embed

    path = str(path)
    try:
        if path.lower().endswith(".safetensors"):  # never sniffed for another format: tensors only
            load_checkpoint(model, path, strict=True, weights_only=True)
        elif is_torchscript(path):
            state = torch.jit.load(path, map_location="cpu").state_dict()
            # TorchScript keeps metadata and non-persistent buffers (the text causal mask) in its state dict.
            expected = set(model.state_dict())
            buffers = {name for name, _ in model.named_buffers()}
            for key in list(state):
                if key in _JIT_EXTRA_KEYS or (key in buffers and key not in expected):
                    state.pop(key)
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            resize_pos_embed(state, model)
            model.load_state_dict(state, strict=True)
        elif not _load_clipself_file(model, path):
            load_checkpoint(model, path, strict=True, weights_only=True)
    except RuntimeError as exc:
        if "state_dict" in str(exc) or "size mismatch" in str(exc):
            raise UserError(f"weight file {path} does not fit the model: {str(exc)[:600]}") from exc
        raise UserError(f"cannot read weight file {path}: {str(exc)[:400]}") from exc
    except Exception as exc:  # unpickling errors, corrupt files
        raise UserError(f"cannot read weight file {path}: {type(exc).__name__}: {str(exc)[:400]}") from exc
    log.info("loaded CLIP weights from %s", path)


def _load_clipself_file(model: Any, path: str) -> bool:
    """Load a CLIPSelf / EVA-CLIP checkpoint (``visual.blocks.N...`` keys) into an open_clip EVA model,
    remapping its keys; False (nothing loaded) for any other model or file layout."""
    import torch

    from workers.models.clipself.eva import is_clipself_layout, is_timm_eva, load_clipself_eva

    if not is_timm_eva(model.visual) or path.lower().endswith(".safetensors"):
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not is_clipself_layout(state):
        return False
    load_clipself_eva(model, state)
    log.info("loaded a CLIPSelf / EVA-CLIP checkpoint (keys remapped) from %s", path)
    return True


def _missing_message(arch: str, tag: str, cfg: dict, dirs: list[Path], why: str) -> str:
    hub = cfg.get("hf_hub", "")
    repo_id, hub_file = os.path.split(hub) if hub else ("", "")
    hub_files = [hub_file] if hub_file else list(HUB_FILES)
    files = ([os.path.basename(cfg["url"])] if cfg.get("url") else []) + hub_files
    how = [
        f"run open_clip.create_model({arch!r}, pretrained={tag!r}, cache_dir=FOLDER) on a machine with "
        "network access"
    ]
    if repo_id:
        how.append(f"fetch {' or '.join(hub_files)} from the Hugging Face hub repository {repo_id}")
    return (
        f"GEM weights for {arch} pretrained={tag!r} are not available: {why}. "
        f"Looked for {', '.join(files)} in: {', '.join(str(d) for d in dirs)}. "
        f"To get them, {' or '.join(how)}, then put the file (or FOLDER) into the folder named by "
        f"$GROUNDLABEL_WEIGHTS_DIR (or --weights-dir), or pass the file's path as pretrained."
    )


def load_clip(
    model_name: str,
    pretrained: str | None,
    cache_dir: str | None = None,
    device: str = "cpu",
    hub: HubSettings | None = None,
) -> LoadedClip:
    """Build the open_clip CLIP ``model_name`` with weights resolved from ``pretrained`` (module doc).

    ``cache_dir`` is the weights folder (``EngineSettings.weights_dir``); ``hub`` says whether and where the
    hub may be reached (default: online, the standard cache).
    """
    hub = hub or HubSettings()
    import open_clip

    arch = model_name.strip().replace("/", "-")
    if pretrained is not None and str(pretrained).strip().lower() in ("", "none", "random"):
        pretrained = None

    if pretrained is None:
        arch, _ = resolve_arch(arch, None)
        model = open_clip.create_model(arch, pretrained=None, device=device)
        return LoadedClip(model, open_clip.get_tokenizer(arch), arch, "random", "random initialisation")

    pretrained = str(pretrained)
    if is_path_like(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise UserError(
                f"GEM weight file not found: {path} (pretrained={pretrained!r}); pass an existing "
                f".pt/.pth/.bin/.safetensors file or an open_clip tag such as 'openai'"
            )
        arch, _ = resolve_arch(arch, None)
        quick = is_torchscript(path) and not arch.endswith("-quickgelu")
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick)
        load_weights_file(model, path)
        model.to(device)
        return LoadedClip(model, open_clip.get_tokenizer(arch), arch, path.stem, str(path))

    arch, cfg = resolve_arch(arch, pretrained)
    dirs = weights_dirs(cache_dir, hub)
    found = find_cached_weights(cfg, dirs)
    if found is not None:
        log.info("GEM weights for %s/%s from %s", arch, pretrained, found)
        model = open_clip.create_model(arch, pretrained=None)
        load_weights_file(model, found)
        model.to(device)
        return LoadedClip(model, open_clip.get_tokenizer(arch), arch, pretrained, str(found))

    if hub.offline:
        raise UserError(
            _missing_message(arch, pretrained, cfg, dirs, "no local file and the machine is offline")
        )
    if not hub_reachable(hub):
        raise UserError(
            _missing_message(
                arch, pretrained, cfg, dirs, "no local file and the Hugging Face hub is unreachable"
            )
        )
    download_dir = str(dirs[0]) if cache_dir else None
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=download_dir, device=device)
    except Exception as exc:
        raise UserError(
            _missing_message(arch, pretrained, cfg, dirs, f"download failed ({str(exc)[:300]})")
        ) from exc
    return LoadedClip(model, open_clip.get_tokenizer(arch), arch, pretrained, "open_clip download")
