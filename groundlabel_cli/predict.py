"""``groundlabel predict``: pre-label image files with GEM (or SAM 3) and write Label Studio import JSON.

Example::

    groundlabel predict photos/*.jpg --labels "cat,dog" --out tasks.json --overlay overlays/

Each image becomes one task ``{"data": {"image": ...}, "predictions": [{"model_version", "score",
"result"}]}``; import the file into a Label Studio project whose label config matches (``--save-config``
writes the generated one). Labels: ``--labels "Cat,Dog"`` (each label is its own prompt) or
``"Car=car|automobile,Dog"`` (prompt synonyms after ``=``, separated by ``|``), or a label config file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from groundlabel.errors import UserError
from groundlabel.settings import Settings, parse_temperature, split_refine, weights_source
from workers.models.gem.config import METHODS
from workers.models.sam.cli import REFINE_CHOICES, add_sam_arguments, sam_engine_from_args
from workers.registry import class_engines, get_entry

if TYPE_CHECKING:
    from PIL import Image

    from groundlabel.ls_access import FetchSettings
    from groundlabel.spec import LabelingSpec

log = logging.getLogger(__name__)

#: ``--control`` choices → Label Studio control tags.
CONTROL_TAGS = {
    "polygon": "PolygonLabels",
    "brush": "BrushLabels",
    "rectangle": "RectangleLabels",
    "keypoint": "KeyPointLabels",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict`` verb."""
    p = subparsers.add_parser(
        "predict",
        help="pre-label image files with GEM and write Label Studio import JSON",
        description="Pre-label image files with GEM and write Label Studio import JSON.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Region options (threshold, polygon tolerance, minimum area...) can be set per control as "
            "attributes of the control tag in --label-config; see docs/regions.md."
        ),
    )
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders of images (not recursive), or http(s) URLs")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--labels", help='comma-separated labels, e.g. "cat,dog" or "Car=car|automobile,Dog"')
    what.add_argument("--label-config", metavar="FILE.xml", help="a Label Studio label config")
    p.add_argument("--control", action="append", choices=sorted(CONTROL_TAGS), default=None,
                   help="control type(s) of the generated config (repeatable; default polygon)")
    p.add_argument("--save-config", metavar="FILE.xml", help="write the label config used to FILE")
    p.add_argument("--out", "-o", metavar="FILE", help="output JSON file (default: standard output)")
    p.add_argument("--overlay", metavar="DIR", help="write a PNG per image: heatmaps and regions drawn")
    p.add_argument("--image-root-url", metavar="PREFIX",
                   help='task URLs = PREFIX + path relative to --image-root, e.g. "/data/local-files/?d="')
    p.add_argument("--image-root", metavar="DIR", default=None,
                   help="folder the --image-root-url paths are relative to (LOCAL_FILES_DOCUMENT_ROOT; "
                        "default: the current folder)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip model name (default ViT-B-16)")
    model.add_argument("--model-config", metavar="FILE.json",
                       help="an open_clip model config for a custom architecture (its stem is the name)")
    model.add_argument("--pretrained", default="openai",
                       help="open_clip tag, weight file, or 'none' for random weights (default openai)")
    model.add_argument("--weights-dir", help="folder searched for weights (default $GROUNDLABEL_WEIGHTS_DIR)")
    model.add_argument("--image-size", type=int, default=448, help="network input size (default 448)")
    model.add_argument("--method", default="gem",
                       choices=list(METHODS),
                       help="dense-feature method (default gem; see docs/methods.md)")
    model.add_argument("--gem-depth", type=int, default=7,
                       help="GEM replaces the last N-1 blocks (default 7, the paper's)")
    model.add_argument("--gem-temperature", default="adaptive", metavar="adaptive|FLOAT",
                       help="GEM's self-self inverse temperature (default adaptive, the paper's rule; "
                            "a fixed value helps small custom models, see docs/quality.md)")
    model.add_argument("--refine", default="none", choices=list(REFINE_CHOICES),
                       help="pamr: refine the score maps along image edges; sam: sharpen each mask with a "
                            "promptable SAM (--sam-model, docs/sam.md); default none")
    model.add_argument("--templates", default="paper", choices=["paper", "ensemble"])
    model.add_argument("--threshold", type=float, default=None,
                       help="background below this calibrated score (default GROUNDLABEL_DEFAULT_THRESHOLD, "
                            "else 0.5; a control's model_score_threshold attribute wins)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    model.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    sam3 = p.add_argument_group("SAM 3 (docs/sam3.md)")
    sam3.add_argument("--engine", choices=class_engines(), default=None,
                      help="engine of the controls whose tag names none (default $GROUNDLABEL_ENGINE, else "
                           "gem); sam3 gives one region per instance")
    sam3.add_argument("--sam3-model", default=None, metavar="HUB_ID|FOLDER|none",
                      help="SAM 3 weights (default $GROUNDLABEL_SAM3_MODEL, else facebook/sam3, gated: set "
                           "HF_TOKEN); 'none' for random weights")
    add_sam_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# ----------------------------------------------------------------------------- label config
def parse_labels(text: str) -> list[tuple[str, list[str]]]:
    """``"Car=car|automobile,Dog"`` → ``[("Car", ["car", "automobile"]), ("Dog", ["Dog"])]``."""
    out: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        label, _, synonyms = item.partition("=")
        label = label.strip()
        prompts = [s.strip() for s in synonyms.split("|") if s.strip()] or [label]
        if not label:
            raise UserError(f"--labels: {item!r} has no label before '='")
        if label in seen:
            raise UserError(f"--labels: label {label!r} is given twice")
        seen.add(label)
        out.append((label, prompts))
    if not out:
        raise UserError("--labels is empty: give comma-separated labels such as 'cat,dog'")
    return out


def default_label_config(labels: list[tuple[str, list[str]]], controls: list[str] | None = None) -> str:
    """A label config with one Image ``image`` (``$image``) and one control per requested type.

    A single control is named ``label``; several are named after their type (``polygon``, ``brush``...).
    """
    kinds = list(dict.fromkeys(controls or ["polygon"]))
    lines = ["<View>", '  <Image name="image" value="$image" zoom="true"/>']
    for kind in kinds:
        tag = CONTROL_TAGS[kind]
        name = "label" if len(kinds) == 1 else kind
        lines.append(f'  <{tag} name="{name}" toName="image">')
        for label, prompts in labels:
            extra = f" predicted_values={quoteattr(','.join(prompts))}" if prompts != [label] else ""
            lines.append(f"    <Label value={quoteattr(label)}{extra}/>")
        lines.append(f"  </{tag}>")
    lines.append("</View>")
    return "\n".join(lines) + "\n"


def load_spec(args: argparse.Namespace, settings: Settings | None = None) -> tuple[LabelingSpec, str]:
    """The spec and its XML, from ``--label-config`` or ``--labels``/``--control``, read as ``serve`` reads
    it (:func:`groundlabel.spec.read_spec`); ``--threshold``, else ``GROUNDLABEL_DEFAULT_THRESHOLD``, is the
    threshold of the controls that set none."""
    from groundlabel.spec import read_spec

    if args.label_config:
        if args.control:
            raise UserError("--control applies to --labels only; a label config file names its controls")
        path = Path(args.label_config)
        try:
            xml = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"--label-config {path}: cannot be read ({exc.strerror or exc})") from exc
    else:
        xml = default_label_config(parse_labels(args.labels), args.control)
    return read_spec(xml, settings, threshold=args.threshold), xml


# ----------------------------------------------------------------------------- images
def expand_images(items: list[str]) -> list[str]:
    """Files and URLs as given; folders replaced by their image files (sorted, not recursive)."""
    out: list[str] = []
    for item in items:
        if _is_url(item):
            out.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                log.warning("%s: no image files in this folder", item)
            out.extend(found)
        else:
            out.append(item)
    return out


def _is_url(item: str) -> bool:
    return item.split("://", 1)[0].lower() in ("http", "https")


def image_reference(item: str, root_url: str | None, root: str | None) -> str:
    """What goes into the task's data: the path or URL as given, or ``root_url`` + relative path."""
    if not root_url or _is_url(item):
        return item
    base = Path(root or os.getcwd()).resolve()
    path = Path(item).resolve()
    try:
        rel = path.relative_to(base)
    except ValueError:
        raise UserError(f"{item} is not inside --image-root {base}: Label Studio cannot serve it") from None
    return root_url + quote(rel.as_posix(), safe="/")


def load_image(item: str, fetch: FetchSettings) -> Image.Image:
    """Decode a file, or fetch a URL under the fetch settings (allowed hosts, limits)."""
    if _is_url(item):
        from workers.fetch import fetch_image

        return fetch_image(item, settings=fetch)
    from workers.images import decode_image

    return decode_image(item, max_bytes=fetch.max_bytes, max_pixels=fetch.max_pixels)


# ----------------------------------------------------------------------------- running
@dataclass
class _Item:
    index: int
    source: str
    image: Any = None
    error: str | None = None


def build_engine(args: argparse.Namespace) -> Any:
    """The GEM engine the model options ask for."""
    from workers.models.gem import GemConfig, GemEngine
    from workers.models.gem.weights import register_model_config

    engines = Settings.from_env().engines

    model_name = args.model
    if args.model_config:
        model_name = register_model_config(args.model_config, "--model-config")
    pretrained = weights_source(args.pretrained)
    config = GemConfig(
        model_name=model_name,
        pretrained=pretrained,
        cache_dir=args.weights_dir or engines.weights_dir,
        hub=engines.hub,
        image_size=args.image_size,
        method=args.method,
        gem_depth=getattr(args, "gem_depth", 7),
        ss_attn_temp=_temperature(getattr(args, "gem_temperature", "adaptive")),
        refine=split_refine(getattr(args, "refine", "none"))[0],
        templates=args.templates,
        device=args.device,
        batch_size=max(1, args.batch_size),
        cpu_kernels=engines.gem_cpu_kernels,
        kernel_cache=engines.cache_dir,
    )
    return GemEngine(config)


def build_sam3_engine(args: argparse.Namespace) -> Any:
    """The SAM 3 engine the options ask for (``--sam3-model`` over ``GROUNDLABEL_SAM3_MODEL``)."""
    from workers.engines import sam3_config
    from workers.models.sam3 import Sam3Engine

    engines = Settings.from_env().engines
    config = sam3_config(engines)
    if args.sam3_model is not None:
        config.model = weights_source(args.sam3_model)
    if args.weights_dir:
        config.weights_dir = args.weights_dir
    config.device, config.batch_size = args.device, max(1, args.batch_size)
    return Sam3Engine(config)


def _engine(name: str, args: argparse.Namespace, settings: Settings) -> Any:
    """The engine ``name`` of the registry: GEM and SAM 3 from this command's options, any other from its
    settings."""
    flags = {"gem": build_engine, "sam3": build_sam3_engine}.get(name)  # the engines with options here
    return flags(args) if flags is not None else get_entry(name).build(settings.engines)


def _temperature(text: str) -> float | None:
    try:
        return parse_temperature(str(text))
    except ValueError as exc:
        raise UserError(f"--gem-temperature {text!r}: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    """The ``predict`` verb; returns 0, or 1 when some images failed (they are reported and skipped)."""
    from tqdm import tqdm

    from workers.pipeline import engine_specs, prompt_regions

    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must lie in [0, 1], got {args.threshold}")
    settings = Settings.from_env()
    fetch = settings.fetch
    spec, xml = load_spec(args, settings)
    if args.save_config:
        Path(args.save_config).write_text(xml, encoding="utf-8")
    sources = expand_images(args.images)
    if not sources:
        raise UserError("no images to predict")
    refs = [image_reference(s, args.image_root_url, args.image_root) for s in sources]
    overlay_dir = Path(args.overlay) if args.overlay else None
    if overlay_dir:
        overlay_dir.mkdir(parents=True, exist_ok=True)

    default = args.engine or settings.engines.engine
    needed = engine_specs(spec, default)
    built = {name: _engine(name, args, settings) for name in needed}
    sam = sam_engine_from_args(args, settings.engines)
    tasks: list[dict[str, Any] | None] = [None] * len(sources)
    failures: list[_Item] = []
    used_names: set[str] = set()

    bar = tqdm(total=len(sources), unit="img", desc="predict", disable=args.no_progress or None,
               file=sys.stderr)
    for start in range(0, len(sources), args.batch_size):
        batch = [_Item(i, sources[i]) for i in range(start, min(start + args.batch_size, len(sources)))]
        for item in batch:
            try:
                item.image = load_image(item.source, fetch)
            except UserError as exc:
                item.error = str(exc)
        good = [it for it in batch if it.error is None]
        found = prompt_regions(
            spec, [it.image for it in good], built.__getitem__, default=default, threshold=args.threshold,
            sam=sam, keep_maps=overlay_dir is not None,
        )
        for item, regions in zip(good, found, strict=True):
            if isinstance(regions, UserError):
                item.error = str(regions)
                continue
            if isinstance(regions, Exception):
                item.error = f"the model failed on this image: {regions}"
                continue
            tasks[item.index] = {
                "data": {spec.image_key: refs[item.index]},
                "predictions": [
                    {
                        "model_version": regions.model_version,
                        "score": regions.score,
                        "result": regions.results,
                    }
                ],
            }
            if overlay_dir:
                _write_overlay(overlay_dir, item, regions.maps or {}, regions.results, used_names)
        for item in batch:
            if item.error is not None:
                failures.append(item)
                bar.write(f"groundlabel predict: skipped {item.source}: {item.error}", file=sys.stderr)
            item.image = None
        bar.update(len(batch))
    bar.close()

    done = [t for t in tasks if t is not None]
    _write_json(done, args.out)
    if failures:
        print(f"groundlabel predict: {len(failures)} of {len(sources)} images failed", file=sys.stderr)
        return 1
    return 0


def _write_overlay(
    folder: Path, item: _Item, scores: dict[str, Any], results: list[dict[str, Any]], used: set[str]
) -> None:
    from workers.overlay import render_overlay

    stem = Path(item.source.split("?", 1)[0]).stem or f"image{item.index}"
    name = stem
    n = 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    render_overlay(item.image, scores, results, title=item.source).save(folder / f"{name}.png")


def _write_json(tasks: list[dict[str, Any]], out: str | None) -> None:
    text = json.dumps(tasks, ensure_ascii=False)
    if not out or out == "-":
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
