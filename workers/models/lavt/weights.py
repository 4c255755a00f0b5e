"""Where LAVT weights come from and how they are checked.

The sources: official checkpoints (``model`` + ``bert_model``, or ``lavt_one``'s ``model`` with
``text_encoder.*``), plain state dicts, our own training checkpoints (the same two entries plus ``config``
and ``tokenizer_vocab``), their safetensors form (what the model store keeps), ImageNet Swin weights and
Hugging Face BERT weights.

No weight file is ever unpickled with code: ``.safetensors`` files are read by safetensors, every other
file by ``torch.load(weights_only=True)`` with one class allowed beyond tensors and plain values,
``argparse.Namespace`` (the ``args`` entry of official LAVT checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from groundlabel.errors import UserError
from workers.models.lavt.config import VARIANTS, LavtConfig

log = logging.getLogger(__name__)

#: BERT buffers whose presence depends on the transformers version that saved the weights.
_BERT_OPTIONAL_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


#: What ``torch.load(weights_only=True)`` may build beyond tensors and plain values: the ``args`` entry of
#: official LAVT checkpoints (its fields are plain values).
ALLOWED_GLOBALS = (argparse.Namespace,)
#: The safetensors metadata key telling our LAVT checkpoints from other safetensors files.
SAFETENSORS_FORMAT = "groundlabel-lavt"


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file on the CPU, never running code from it.

    A ``.safetensors`` file is read as safetensors (:func:`read_safetensors_checkpoint`); any other file
    with ``torch.load(weights_only=True)`` and :data:`ALLOWED_GLOBALS`, which refuses a pickle that would
    build anything else (a crafted file's payload never runs).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_checkpoint(path)
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # a corrupt or foreign file, not one that would build objects
            raise UserError(f"checkpoint {path} cannot be read: {_unsupported(str(exc))}") from exc
        raise UserError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain values, and weight "
            f"files are never unpickled with code ({_unsupported(str(exc))})"
        ) from exc
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"checkpoint {path} cannot be read: {exc}") from exc


def _unsupported(message: str) -> str:
    """The line of torch's weights-only refusal that names what the file would have built."""
    lines = [line.strip() for line in message.splitlines() if "unsupported" in line.lower()]
    return (lines[0] if lines else message.splitlines()[0])[:300]


def read_safetensors_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_safetensors_checkpoint`: ``{"model", "bert_model", "config",
    "tokenizer_vocab", "epoch"}`` (the ones present), from tensors and JSON metadata only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
    if metadata.get("format") != SAFETENSORS_FORMAT:
        return dict(tensors)  # a plain state dict
    out: dict[str, Any] = {"model": {}, "bert_model": {}}
    for key, value in tensors.items():
        part, _, name = key.partition(".")
        if part not in out or not name:
            raise UserError(f"checkpoint {path}: unexpected tensor {key[:80]!r}")
        out[part][name] = value
    try:
        for key in ("config", "tokenizer_vocab", "epoch"):
            if key in metadata:
                out[key] = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint {path}: its {key!r} metadata is not JSON: {exc}") from exc
    if not out["bert_model"]:
        del out["bert_model"]
    return out


def save_safetensors_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> None:
    """Write the ``model`` and ``bert_model`` tensors of a checkpoint (as :func:`read_checkpoint` returns
    it) as safetensors, with ``config``, ``tokenizer_vocab`` and ``epoch`` as JSON metadata: the form the
    model store keeps (no optimizer state, nothing to unpickle)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for part in ("model", "bert_model"):
        for name, value in (checkpoint.get(part) or {}).items():
            if not torch.is_tensor(value):
                continue
            value = value.detach().cpu().contiguous()
            if value.untyped_storage().data_ptr() in seen:  # safetensors refuses shared storage
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
            tensors[f"{part}.{name}"] = value
    if not any(k.startswith("model.") for k in tensors):
        raise UserError("the checkpoint has no 'model' tensors to write")
    metadata = {"format": SAFETENSORS_FORMAT}
    for key in ("config", "tokenizer_vocab", "epoch"):
        if checkpoint.get(key) is not None:
            metadata[key] = json.dumps(checkpoint[key])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def split_checkpoint(obj: Any) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """``(model state, bert state or None, extras)`` from any accepted checkpoint layout.

    extras holds our ``config`` and ``tokenizer_vocab`` when present (and ``epoch``).
    """
    if not isinstance(obj, Mapping):
        raise UserError(f"a LAVT checkpoint is a dict, this file holds a {type(obj).__name__}")
    extras = {k: obj[k] for k in ("config", "tokenizer_vocab", "epoch") if k in obj}
    if "model" in obj and isinstance(obj["model"], Mapping):
        model_state = _strip_prefix(obj["model"], "module.")
        bert_state = obj.get("bert_model")
        bert_state = _strip_prefix(bert_state, "module.") if isinstance(bert_state, Mapping) else None
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return split_checkpoint({**obj, "model": obj["state_dict"]})
    else:  # a plain state dict, possibly of the whole LavtNetwork
        state = _strip_prefix({k: v for k, v in obj.items() if torch.is_tensor(v)}, "module.")
        if not state:
            raise UserError("the checkpoint has no 'model' entry and no tensors")
        model_state = {
            k[len("model.") :] if k.startswith("model.") else k: v
            for k, v in state.items()
            if not k.startswith("bert_model.")
        }
        bert_state = {
            k[len("bert_model.") :]: v for k, v in state.items() if k.startswith("bert_model.")
        } or None
    text_keys = [k for k in model_state if k.startswith("text_encoder.")]
    if text_keys:  # lavt_one: BERT lives inside the model
        bert_state = {k[len("text_encoder.") :]: model_state.pop(k) for k in text_keys}
    return model_state, bert_state, extras


def infer_architecture(model_state: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture values read off a ``model`` state dict's shapes (to explain mismatches)."""
    found: dict[str, Any] = {}
    w = model_state.get("backbone.patch_embed.proj.weight")
    if torch.is_tensor(w):
        found["embed_dim"] = int(w.shape[0])
        found["patch_size"] = int(w.shape[-1])
    depths, heads = [], []
    for i in range(4):
        blocks = {k.split(".")[4] for k in model_state if k.startswith(f"backbone.layers.{i}.blocks.")}
        depths.append(len(blocks))
        table = model_state.get(f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table")
        if torch.is_tensor(table):
            heads.append(int(table.shape[1]))
            if i == 0:
                found["window_size"] = (int(round(math.sqrt(table.shape[0]))) + 1) // 2
    if any(depths):
        found["depths"] = tuple(depths)
    if len(heads) == 4:
        found["num_heads"] = tuple(heads)
    key = model_state.get("backbone.layers.0.fusion.image_lang_att.f_key.0.weight")
    if torch.is_tensor(key):
        found["text_dim"] = int(key.shape[1])
    for name, values in VARIANTS.items():
        if (found.get("embed_dim"), found.get("depths")) == (values["embed_dim"], tuple(values["depths"])):
            found["variant"] = name
    return found


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def _check_state(
    module: nn.Module, state: Mapping[str, Any], what: str, *, optional: tuple[str, ...] = (), hint: str = ""
) -> dict[str, Any]:
    """Compare ``state`` with ``module.state_dict()``; raise a UserError listing every difference."""
    expected = module.state_dict()
    state = {k: v for k, v in state.items() if k not in optional or k in expected}
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and torch.is_tensor(state[k]) and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_describe(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_describe(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_describe(shapes, 3)}")
        raise UserError(
            f"the {what} weights do not fit this model: " + "; ".join(parts) + (f". {hint}" if hint else "")
        )
    return state


def _architecture_hint(model_state: Mapping[str, Any], config: LavtConfig) -> str:
    found = infer_architecture(model_state)
    advice = []
    if found.get("window_size") and found["window_size"] != config.window_size:
        advice.append(
            f"it was trained with window {found['window_size']}: use window_size={found['window_size']} "
            f"(--window-size {found['window_size']}), this model has {config.window_size}"
        )
    if found.get("embed_dim") and found["embed_dim"] != config.embed_dim:
        name = found.get("variant", f"embed_dim={found['embed_dim']}, depths={found.get('depths')}")
        advice.append(f"its backbone is {name}: use --variant {name}, this model is {config.variant}")
    elif found.get("depths") and found["depths"] != tuple(config.depths):
        advice.append(f"its stage depths are {found['depths']}, this model has {tuple(config.depths)}")
    if found.get("text_dim") and found["text_dim"] != config.text_dim:
        advice.append(
            f"its text features are {found['text_dim']}-d, this model's BERT gives {config.text_dim}"
        )
    return "The checkpoint's shapes say " + "; ".join(advice) + "." if advice else ""


def load_network_state(
    net: nn.Module,
    model_state: Mapping[str, Any],
    bert_state: Mapping[str, Any] | None,
    *,
    require_bert: bool = True,
) -> None:
    """Load both entries into a :class:`LavtNetwork` strictly, with a clear error on any difference.

    ``model`` must match exactly (persistent ``relative_position_index`` buffers included). ``bert_model``
    goes into the pooler-less BertModel; only the ``position_ids``/``token_type_ids`` buffers may be
    absent or extra, since they depend on the transformers version that saved them.
    """
    config: LavtConfig = net.config
    model_state = _check_state(
        net.model, model_state, "LAVT 'model'", hint=_architecture_hint(model_state, config)
    )
    net.model.load_state_dict(model_state, strict=True)
    if bert_state is None:
        if require_bert:
            raise UserError(
                "the checkpoint has no 'bert_model' entry (nor text_encoder.* keys) for the text encoder"
            )
        return
    bert_state = {k: v for k, v in bert_state.items() if not k.startswith("pooler.")}
    hint = ""
    emb = bert_state.get("embeddings.word_embeddings.weight")
    if torch.is_tensor(emb) and tuple(emb.shape) != tuple(
        net.bert_model.embeddings.word_embeddings.weight.shape
    ):
        hint = (
            f"The checkpoint's BERT has vocabulary × width {tuple(emb.shape)}: "
            "build the model with its bert_config."
        )
    bert_state = _check_state(
        net.bert_model, bert_state, "BERT 'bert_model'", optional=_BERT_OPTIONAL_BUFFERS, hint=hint
    )
    result = net.bert_model.load_state_dict(bert_state, strict=False)
    leftovers = [
        k for k in list(result.missing_keys) + list(result.unexpected_keys) if k not in _BERT_OPTIONAL_BUFFERS
    ]
    if leftovers:  # _check_state already guarantees this; keep the promise explicit
        raise UserError(f"BERT weights left keys unloaded: {leftovers[:5]}")


def load_swin_imagenet(backbone: nn.Module, path: str | Path) -> tuple[int, list[str]]:
    """Initialise the Swin part of the backbone from ImageNet classification weights
    (e.g. ``swin_base_patch4_window12_384_22k.pth``), as LAVT's training does: ``module.``/``backbone.``
    prefixes stripped, relative position tables resized bicubically when the window differs, the
    classifier head and final norm ignored. Returns (tensors loaded, backbone keys left at init)."""
    obj = read_checkpoint(path)
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds no Swin state dict")
    state = _strip_prefix(_strip_prefix(state, "module."), "backbone.")
    own = backbone.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own or not torch.is_tensor(value):
            continue
        target = own[key]
        if key.endswith("relative_position_bias_table") and value.shape != target.shape:
            if value.shape[1] != target.shape[1]:
                raise UserError(f"{key}: {value.shape[1]} heads in {path}, {target.shape[1]} in the model")
            src, dst = int(math.isqrt(value.shape[0])), int(math.isqrt(target.shape[0]))
            grid = value.T.reshape(1, -1, src, src).float()
            value = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
            value = value.reshape(-1, dst * dst).T
        if key.endswith("relative_position_index") or value.shape != target.shape:
            continue
        loaded[key] = value.to(target.dtype)
    if not loaded:
        raise UserError(
            f"no tensor of {path} fits the Swin backbone: is it a Swin checkpoint of this variant?"
        )
    backbone.load_state_dict(loaded, strict=False)
    left = [k for k in own if k not in loaded and not k.endswith("relative_position_index")]
    log.info(
        "Swin init from %s: %d tensors loaded, %d left at init (PWAM, gates, norms)",
        path,
        len(loaded),
        len(left),
    )
    return len(loaded), left


def load_pretrained_bert(bert: nn.Module, source: str, cache_dir: str | None = None) -> None:
    """Copy Hugging Face BERT weights (a folder or a hub name in the cache) into the pooler-less model."""
    from transformers import BertModel

    try:
        pretrained = BertModel.from_pretrained(source, add_pooling_layer=False, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"BERT weights {source!r} are neither a local folder nor in the Hugging Face cache ({exc}); "
            "pass a folder with config.json and the weights, or --bert none for a random text encoder"
        ) from exc
    state = {k: v for k, v in pretrained.state_dict().items() if k in bert.state_dict()}
    _check_state(bert, state, f"BERT {source!r}", optional=_BERT_OPTIONAL_BUFFERS)
    bert.load_state_dict(state, strict=False)


def save_checkpoint(
    path: str | Path, net: nn.Module, *, tokenizer_vocab: list[str] | None = None, **extra: Any
) -> None:
    """Write ``{"model", "bert_model", "config", "tokenizer_vocab", ...}``: the official layout plus
    our config, so both the official code and our workers can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": net.model.state_dict(),
        "bert_model": net.bert_model.state_dict(),
        "config": net.config.architecture(),
        **extra,
    }
    if tokenizer_vocab is not None:
        payload["tokenizer_vocab"] = tokenizer_vocab
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
