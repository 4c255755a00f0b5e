"""A tiny CLIP trained contrastively on generated scenes, for offline grounding-quality tests.

The model is an ordinary ``open_clip.CLIP`` (ViT image tower with a CLS token, causal text transformer
pooled at the end-of-text token) built from open_clip's configuration classes at a small size. Its
text side reads open_clip's BPE tokens through a compact vocabulary (the BPE ids that the scene
captions and prompts use), so the embedding table stays tiny and the checkpoint is a few MB.

Train it with ``groundlabel train-tiny-clip --out tests/assets/tiny_clip.pt`` (deterministic for a
given seed and thread count).
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.evaluation.scenes import BACKGROUND_WORDS, COLOURS, SHAPES, make_scene

log = logging.getLogger(__name__)

# Words that scene captions, prompt templates and calibration prompts use (BPE-encoded below).
BASE_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "photo",
    "of",
    "and",
    "on",
    "background",
    "the",
    "thing",
    "stuff",
    "object",
    "shape",
    "texture",
    "pattern",
    ",",
    ".",
)


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    """open_clip's BPE tokenizer (built once per process: reading its merges takes a moment)."""
    import open_clip

    return open_clip.SimpleTokenizer()


def vocabulary_words() -> list[str]:
    """Every word the tiny model's vocabulary covers."""
    return [*BASE_WORDS, *SHAPES, *COLOURS, *BACKGROUND_WORDS.values()]


class CompactTokenizer:
    """open_clip's BPE tokenizer mapped onto a small vocabulary.

    Id 0 pads, 1 starts, 2 stands for any BPE token outside the vocabulary, the vocabulary follows,
    and the end-of-text token has the largest id (CLIP's text pooling takes the argmax position).
    """

    def __init__(self, bpe_ids: Sequence[int], context_length: int = 20) -> None:
        self._bpe = _bpe()
        self.bpe_ids = [int(i) for i in bpe_ids]
        self._map = {b: i + 3 for i, b in enumerate(self.bpe_ids)}
        self.eot_id = len(self.bpe_ids) + 3
        self.vocab_size = self.eot_id + 1
        self.context_length = context_length

    @classmethod
    def from_words(cls, words: Sequence[str], context_length: int = 20) -> CompactTokenizer:
        """A vocabulary holding every BPE token of ``words``."""
        bpe = _bpe()
        ids: list[int] = []
        for w in words:
            for t in bpe.encode(w):
                if t not in ids:
                    ids.append(t)
        return cls(sorted(ids), context_length)

    def encode(self, text: str) -> list[int]:
        """Compact ids of one text, without start/end tokens."""
        return [self._map.get(t, 2) for t in self._bpe.encode(text)]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> Any:
        """LongTensor [len(texts), context_length] like open_clip's tokenizers (truncated at the end)."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [1, *self.encode(text)][: n - 1] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


@dataclass
class TinyClipConfig:
    """Sizes of the tiny CLIP (defaults: the checkpoint kept under tests/assets)."""

    embed_dim: int = 64
    image_size: int = 48
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 8
    head_width: int = 32
    text_width: int = 64
    text_heads: int = 2
    text_layers: int = 2
    context_length: int = 20


def build_tiny_clip(config: TinyClipConfig, vocab_size: int) -> Any:
    """An untrained ``open_clip.CLIP`` with the tiny sizes."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=config.vision_layers,
        width=config.vision_width,
        head_width=config.head_width,
        patch_size=config.patch_size,
        image_size=config.image_size,
    )
    text = CLIPTextCfg(
        context_length=config.context_length,
        vocab_size=vocab_size,
        width=config.text_width,
        heads=config.text_heads,
        layers=config.text_layers,
    )
    return open_clip.CLIP(config.embed_dim, vision_cfg=vision, text_cfg=text)


def image_tensor(images: Sequence[Any], size: int) -> Any:
    """Batch of PIL images → normalised float tensor [B, 3, size, size] (OpenAI mean/std, like CLIP)."""
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from PIL import Image

    arrs = []
    for im in images:
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arrs.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def train_tiny_clip(
    config: TinyClipConfig | None = None,
    *,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 50,
    weight_decay: float = 0.05,
    seed: int = 0,
    threads: int | None = None,
    log_every: int = 50,
    save_every: int = 0,
    out: str | Path | None = None,
    colour_drop: float = 0.3,
    min_radius: float = 0.09,
    max_radius: float = 0.26,
    max_objects: int = 4,
) -> tuple[Any, CompactTokenizer, dict]:
    """Train a tiny CLIP with the symmetric InfoNCE loss on freshly generated scenes.

    The learning rate warms up linearly, then stays constant, so the checkpoint written after step k
    (``save_every`` > 0 with ``out``) is exactly the one a run with ``steps=k`` ends with. Returns the
    model (eval mode, float32), its tokenizer and a summary (final loss, in-batch retrieval accuracy,
    seconds). ``colour_drop`` and the radii (fractions of the image size) shape the training scenes.
    """
    import torch
    import torch.nn.functional as F

    config = config or TinyClipConfig()
    scene_options = {
        "colour_drop": colour_drop,
        "min_radius": min_radius * config.image_size,
        "max_radius": max_radius * config.image_size,
        "max_objects": max_objects,
    }
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = CompactTokenizer.from_words(vocabulary_words(), config.context_length)
    model = build_tiny_clip(config, tokenizer.vocab_size)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        return lr * min(1.0, (step + 1) / max(1, warmup))

    def summary_at(step: int) -> dict:
        return {
            "steps": step,
            "batch_size": batch_size,
            "seed": seed,
            "lr": lr,
            "warmup": warmup,
            "colour_drop": colour_drop,
            "min_radius": min_radius,
            "max_radius": max_radius,
            "max_objects": max_objects,
            "loss": loss_ema,
            "i2t_accuracy": acc_ema,
            "seconds": time.perf_counter() - start,
        }

    start = time.perf_counter()
    loss_ema = acc_ema = float("nan")
    for step in range(steps):
        scenes = [make_scene(rng, config.image_size, **scene_options) for _ in range(batch_size)]
        images = image_tensor([s.image for s in scenes], config.image_size)
        texts = tokenizer([s.caption for s in scenes])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.t()
        # captions can repeat inside a batch: identical captions are all positives
        caps = [s.caption for s in scenes]
        same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            acc = float((same[torch.arange(batch_size), logits.argmax(1)] > 0).float().mean())
        loss_value = float(loss.detach())
        loss_ema = loss_value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss_value
        acc_ema = acc if math.isnan(acc_ema) else 0.95 * acc_ema + 0.05 * acc
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info(
                "step %d/%d loss %.3f i2t-acc %.3f lr %.2e (%.0fs)",
                step + 1,
                steps,
                loss_ema,
                acc_ema,
                lr_at(step),
                time.perf_counter() - start,
            )
        if save_every and out and (step + 1) % save_every == 0 and step + 1 < steps:
            model.eval()
            save_tiny_clip(out, model, tokenizer, config, summary_at(step + 1))
            model.train()
    model.eval()
    summary = summary_at(steps)
    if out:
        save_tiny_clip(out, model, tokenizer, config, summary)
    return model, tokenizer, summary


def save_tiny_clip(
    path: str | Path,
    model: Any,
    tokenizer: CompactTokenizer,
    config: TinyClipConfig,
    summary: dict | None = None,
) -> None:
    """Write a float16 checkpoint readable with ``torch.load(weights_only=True)``."""
    import torch

    state = {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": "groundlabel-tiny-clip-1",
            "config": asdict(config),
            "bpe_ids": tokenizer.bpe_ids,
            "summary": summary or {},
            "state_dict": state,
        },
        path,
    )


def load_tiny_clip(path: str | Path) -> tuple[Any, CompactTokenizer, TinyClipConfig]:
    """The model (float32, eval mode), its tokenizer and its configuration."""
    import torch

    from groundlabel.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"tiny CLIP checkpoint not found: {path} (train one with `groundlabel train-tiny-clip`)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "groundlabel-tiny-clip-1":
        raise UserError(f"{path} is not a tiny CLIP checkpoint written by groundlabel")
    config = TinyClipConfig(**ckpt["config"])
    tokenizer = CompactTokenizer(ckpt["bpe_ids"], config.context_length)
    model = build_tiny_clip(config, tokenizer.vocab_size)
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    )
    model.eval()
    return model, tokenizer, config


def export_open_clip(
    checkpoint: str | Path, out_dir: str | Path, name: str = "tiny-clip-trained"
) -> tuple[Path, Path]:
    """The tiny CLIP at ``checkpoint`` as an ordinary open_clip model: ``(<name>.json, <name>.safetensors)``.

    The config file registers with open_clip (``GROUNDLABEL_GEM_MODEL_CONFIG``) and the safetensors state
    dict loads as ``GROUNDLABEL_GEM_PRETRAINED``, so a worker serves the trained tiny model with open_clip's
    own BPE tokenizer (``open_clip.get_tokenizer(name)``, context length from the config): the token table
    is widened to open_clip's 49408 ids (each vocabulary id's row at its BPE id, start and end of text at
    theirs, every other id on the unknown row), which gives the same text embeddings as the compact
    tokenizer.
    """
    import json

    import torch
    from safetensors.torch import save_file

    model, tokenizer, config = load_tiny_clip(checkpoint)
    state = model.state_dict()
    compact = state["token_embedding.weight"]
    bpe = _bpe()
    sot, eot = bpe.encoder["<start_of_text>"], bpe.encoder["<end_of_text>"]
    vocab = len(bpe.encoder)
    table = compact[2].repeat(vocab, 1)
    table[0], table[sot], table[eot] = compact[0], compact[1], compact[tokenizer.eot_id]
    for i, b in enumerate(tokenizer.bpe_ids):
        table[b] = compact[i + 3]
    state["token_embedding.weight"] = table.contiguous()
    spec = {
        "embed_dim": config.embed_dim,
        "vision_cfg": {
            "image_size": config.image_size,
            "layers": config.vision_layers,
            "width": config.vision_width,
            "head_width": config.head_width,
            "patch_size": config.patch_size,
        },
        "text_cfg": {
            "context_length": config.context_length,
            "vocab_size": vocab,
            "width": config.text_width,
            "heads": config.text_heads,
            "layers": config.text_layers,
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path, weights_path = out / f"{name}.json", out / f"{name}.safetensors"
    config_path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    # float16, as the checkpoint holds them: the same values at half the size
    save_file(
        {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in state.items()}, str(weights_path)
    )
    return config_path, weights_path


def _train_command(args: argparse.Namespace) -> int:
    config = TinyClipConfig(
        vision_layers=args.layers,
        vision_width=args.width,
        text_width=args.width,
        image_size=args.image_size,
        patch_size=args.patch_size,
    )
    _, _, summary = train_tiny_clip(
        config,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        save_every=args.save_every,
        colour_drop=args.colour_drop,
        min_radius=args.min_radius,
        max_radius=args.max_radius,
        max_objects=args.max_objects,
        out=args.out,
    )
    size = Path(args.out).stat().st_size / 2**20
    print(
        f"wrote {args.out} ({size:.1f} MiB): loss {summary['loss']:.3f}, "
        f"in-batch retrieval {summary['i2t_accuracy']:.3f}, {summary['seconds']:.0f} s"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add the ``train-tiny-clip`` verb."""
    p = subparsers.add_parser(
        "train-tiny-clip",
        help="train the tiny CLIP used by the offline quality test",
        description="Train a tiny CLIP contrastively on generated scenes (CPU is enough).",
    )
    p.add_argument("--out", default="tests/assets/tiny_clip.pt", help="checkpoint to write")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100, help="also write the checkpoint every N steps")
    p.add_argument("--colour-drop", type=float, default=0.3, help="chance a caption omits the colours")
    p.add_argument("--min-radius", type=float, default=0.09, help="smallest shape radius / image size")
    p.add_argument("--max-radius", type=float, default=0.26, help="largest shape radius / image size")
    p.add_argument("--max-objects", type=int, default=4, help="most objects in a training scene")
    p.add_argument("--layers", type=int, default=8, help="vision transformer blocks")
    p.add_argument("--width", type=int, default=64, help="vision and text width")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it slightly)")
    p.set_defaults(handler=_train_command)
