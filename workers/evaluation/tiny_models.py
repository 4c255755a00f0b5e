"""``groundlabel export-tiny-models``: the in-repo tiny models as model files that any worker loads.

The tiny CLIP (``tests/assets/tiny_clip.pt``, :mod:`workers.evaluation.tiny_clip`) and the tiny SAM
(``tests/assets/tiny_sam.pt``, :mod:`workers.models.sam.tiny`) were trained on the generated colour scenes
of :mod:`workers.evaluation.scenes` and know nothing else: they show what groundlabel does on a machine
without downloaded weights. The command writes

- ``<out>/tiny-clip/tiny-clip.json`` and ``tiny-clip.safetensors``: an open_clip model config and its
  weights, read with open_clip's own BPE tokenizer (``GROUNDLABEL_GEM_MODEL_CONFIG``,
  ``GROUNDLABEL_GEM_PRETRAINED``);
- ``<out>/tiny-sam/``: a ``transformers`` ``SamModel`` folder, ``config.json`` + ``model.safetensors``
  (``GROUNDLABEL_SAM_MODEL``);
- ``<out>/tiny-models.env``: those settings, with GEM's options for the tiny CLIP (:data:`TINY_GEM_OPTIONS`)
  and ``refine=sam``;
- with ``--scenes N``: ``<out>/scenes/scene-NNN.png``, held-out generated scenes to label (48 px scenes
  shown at :data:`SCENE_SCALE` times their size).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CLIP_ASSET = "tests/assets/tiny_clip.pt"
SAM_ASSET = "tests/assets/tiny_sam.pt"
#: GEM on the tiny CLIP as docs/quality.md measured it best: the 48 px model at 2x input (position embedding
#: resampled) and the inverse temperature chosen on validation scenes (its 2 heads make the adaptive one
#: nearly uniform).
TINY_GEM_OPTIONS: dict[str, str] = {"GROUNDLABEL_GEM_IMAGE_SIZE": "96", "GROUNDLABEL_GEM_TEMPERATURE": "80"}
#: Generated scenes are drawn at 48 px (the tiny CLIP's input) and enlarged this many times, pixel for pixel.
SCENE_SIZE, SCENE_SCALE = 48, 5


@dataclass(frozen=True)
class TinyModels:
    """Where :func:`export_tiny_models` wrote the models."""

    clip_config: Path
    clip_weights: Path
    sam_folder: Path

    def settings(self) -> dict[str, str]:
        """The environment of ``groundlabel serve`` / ``worker`` that serves these models."""
        return {
            "GROUNDLABEL_GEM_MODEL_CONFIG": str(self.clip_config),
            "GROUNDLABEL_GEM_PRETRAINED": str(self.clip_weights),
            **TINY_GEM_OPTIONS,
            "GROUNDLABEL_SAM_MODEL": str(self.sam_folder),
            "GROUNDLABEL_GEM_REFINE": "sam",
        }


def export_tiny_models(
    out_dir: str | Path, clip: str | Path = CLIP_ASSET, sam: str | Path = SAM_ASSET
) -> TinyModels:
    """Write the tiny CLIP and the tiny SAM under ``out_dir`` (module docstring) and the settings file."""
    from workers.evaluation.tiny_clip import export_open_clip
    from workers.models.sam.engine import checkpoint_to_folder

    out = Path(out_dir).expanduser().resolve()
    config, weights = export_open_clip(clip, out / "tiny-clip", name="tiny-clip")
    models = TinyModels(config, weights, checkpoint_to_folder(sam, out / "tiny-sam"))
    lines = [
        "# groundlabel serve / worker on the in-repo tiny models (they know generated colour scenes only)"
    ]
    lines += [f"{k}={v}" for k, v in models.settings().items()]
    (out / "tiny-models.env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return models


def scene_picture(image: Any, scale: int = SCENE_SCALE) -> Any:
    """A generated scene enlarged ``scale`` times, each pixel a ``scale`` × ``scale`` block."""
    from PIL import Image

    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def scene_mask(mask: np.ndarray, scale: int = SCENE_SCALE) -> np.ndarray:
    """A scene's mask at the size of :func:`scene_picture`."""
    return np.kron(np.asarray(mask, dtype=bool), np.ones((scale, scale), dtype=bool))


def write_scenes(folder: str | Path, count: int, seed: int) -> list[Path]:
    """``count`` generated scenes of ``seed`` as ``scene-NNN.png`` in ``folder``."""
    from workers.evaluation.scenes import make_scenes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(make_scenes(count, seed, SCENE_SIZE)):
        path = folder / f"scene-{i:03d}.png"
        scene_picture(scene.image).save(path)
        paths.append(path)
    return paths


def _export_command(args: argparse.Namespace) -> int:
    from workers.evaluation.quality import EVAL_SEED

    models = export_tiny_models(args.out, args.clip, args.sam)
    out = Path(args.out)
    print(f"wrote {models.clip_config.parent} (open_clip) and {models.sam_folder} (transformers)")
    if args.scenes:
        write_scenes(out / "scenes", args.scenes, EVAL_SEED if args.scene_seed is None else args.scene_seed)
        print(f"wrote {args.scenes} generated scenes to {out / 'scenes'}")
    print(f"settings ({out / 'tiny-models.env'}):")
    for key, value in models.settings().items():
        print(f"  {key}={value}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``export-tiny-models`` verb."""
    p = subparsers.add_parser(
        "export-tiny-models",
        help="write the in-repo tiny CLIP and SAM as model files that serve and worker load",
        description="Convert the tiny CLIP and tiny SAM checkpoints (trained on generated colour scenes) "
        "into an open_clip config + safetensors weights and a transformers SAM folder, and write the "
        "GROUNDLABEL_* settings that serve them (tiny-models.env).",
    )
    p.add_argument("--out", required=True, help="folder to write tiny-clip/, tiny-sam/ and tiny-models.env")
    p.add_argument("--clip", default=CLIP_ASSET, help="tiny CLIP checkpoint (groundlabel train-tiny-clip)")
    p.add_argument("--sam", default=SAM_ASSET, help="tiny SAM checkpoint (groundlabel train-tiny-sam)")
    p.add_argument("--scenes", type=int, default=0, help="also write N generated scenes to label")
    p.add_argument("--scene-seed", type=int, default=None, help="seed of the scenes (default: held-out)")
    p.set_defaults(handler=_export_command)
