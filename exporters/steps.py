"""The steps every export format shares: read the tasks, place the images, split them, write, finish.

Read (:func:`read_records`): the label config and the tasks become :class:`~exporters.labelstudio.ImageRecord`
objects and the category list. Place (:func:`place_images`): each image gets a unique file name and is
copied, linked or left out. Split (:func:`split_keys`): an image's split is a seeded hash of its reference.
Write (:func:`write_json`): compact JSON, written by orjson when its text is ``json.dumps``' text. Finish
(:func:`finish`): the dataset's counts and ``export_summary.json``. An export runs with the cyclic
garbage collector paused (:func:`without_gc`).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.spec import LabelingSpec

from .images import IMAGE_MODES, ImageNotFound, ImageResolver, image_file_name
from .labelstudio import ImageRecord, categories_for, read_tasks, spec_from_config
from .registry import ExportOptions
from .summary import ExportSummary

SPLIT_SCHEMES: dict[str, tuple[str, ...]] = {
    "unc": ("train", "val", "testA", "testB"),
    "umd": ("train", "val", "test"),
}
DEFAULT_FRACTIONS: dict[str, tuple[float, ...]] = {
    "unc": (0.8, 0.1, 0.05, 0.05),
    "umd": (0.8, 0.1, 0.1),
}


def read_records(
    tasks: Sequence[dict[str, Any]],
    summary: ExportSummary,
    options: ExportOptions,
    resolver: ImageResolver,
    *,
    texts: bool = False,
) -> tuple[list[ImageRecord], list[str]]:
    """Parse the label config and read the tasks: ``(records, categories)``. ``texts``: read the
    expressions as ``options.text_from`` and ``options.expression_key`` say (the referring formats)."""
    config = options.label_config
    spec = config if isinstance(config, LabelingSpec) else spec_from_config(config)
    records = read_tasks(
        tasks,
        summary=summary,
        spec=spec,
        annotations=options.annotations,
        include_predictions=options.include_predictions,
        image_key=options.image_key,
        text_from=options.text_from if texts else None,
        expression_key=options.expression_key if texts else None,
        resolver=resolver,
        progress=options.progress,
    )
    categories = categories_for(records, spec)
    summary.note(
        "categories in label-config order"
        if spec is not None
        else "categories sorted by name (no label config)"
    )
    return records, categories


def place_images(
    records: list[ImageRecord],
    resolver: ImageResolver,
    images_dir: Path | Callable[[ImageRecord], Path],
    mode: str,
    summary: ExportSummary,
    *,
    progress: bool = False,
    unique: Callable[[str], str] | None = None,
) -> tuple[list[ImageRecord], dict[int, str]]:
    """Give each image a unique file name and copy/link it into ``images_dir`` (or the folder that
    ``images_dir(record)`` names).

    Returns the records whose image could be placed and ``{image_id: file_name}``. With ``none``
    nothing is read or written and every record is kept. ``unique`` maps a file name to what must
    differ between two images (default: the name itself); a clash prefixes the image id.
    """
    if mode not in IMAGE_MODES:
        raise UserError(f"--images must be one of {', '.join(IMAGE_MODES)}, got {mode!r}")
    from tqdm import tqdm

    folder = images_dir if callable(images_dir) else lambda _: images_dir
    key = unique or str
    names: dict[int, str] = {}
    taken: dict[str, str] = {}  # key of a file name -> image reference
    failed: set[int] = set()
    for rec in tqdm(records, desc="images", unit="img", disable=not progress or mode == "none"):
        if rec.image_id in names or rec.image_id in failed:
            continue
        name = image_file_name(rec.image_ref)
        if taken.get(key(name), rec.image_ref) != rec.image_ref:
            name = f"{rec.image_id}_{name}"
        if mode != "none" and key(name) not in taken:
            try:
                resolver.place(rec.image_ref, folder(rec) / name, mode)
            except ImageNotFound as exc:
                summary.skip("image not found", f"task {rec.task_id or rec.image_id}", str(exc))
                failed.add(rec.image_id)
                continue
            summary.count(f"images {'copied' if mode == 'copy' else 'linked'}")
        taken[key(name)] = rec.image_ref
        names[rec.image_id] = name
    return [r for r in records if r.image_id not in failed], names


def read_and_place(
    tasks: Sequence[dict[str, Any]],
    summary: ExportSummary,
    options: ExportOptions,
    images_dir: Path | Callable[[ImageRecord], Path],
    *,
    texts: bool = False,
    unique: Callable[[str], str] | None = None,
) -> tuple[list[ImageRecord], list[str], dict[int, str]]:
    """:func:`read_records` then :func:`place_images`, closing the resolver: ``(records whose image was
    placed, categories, {image_id: file_name})``."""
    resolver = options.resolver or ImageResolver()
    try:
        records, categories = read_records(tasks, summary, options, resolver, texts=texts)
        records, names = place_images(
            records, resolver, images_dir, options.images, summary, progress=options.progress, unique=unique
        )
    finally:
        resolver.close()
    return records, categories, names


def assign_splits(
    keys: Sequence[str], scheme: str = "unc", fractions: Sequence[float] | None = None, seed: int = 0
) -> dict[str, str]:
    """``{key: split}`` in RefCOCO's split scheme ``scheme`` (:data:`SPLIT_SCHEMES`), by :func:`splitter`."""
    if scheme not in SPLIT_SCHEMES:
        raise UserError(f"--splits must be one of {', '.join(SPLIT_SCHEMES)}, got {scheme!r}")
    fracs = fractions if fractions is not None else DEFAULT_FRACTIONS[scheme]
    split = splitter(SPLIT_SCHEMES[scheme], fracs, seed, scheme=scheme)
    return {key: split(key) for key in keys}


def splitter(
    names: Sequence[str], fractions: Sequence[float], seed: int = 0, *, scheme: str = ""
) -> Callable[[str], str]:
    """The split of a key (an image reference): one of ``names``, chosen by a seeded hash of the key
    against the cumulative ``fractions``. It depends on nothing but the key, so one image is never in two
    splits and keeps its split when the project grows. ``scheme`` names the splits in error messages."""
    fracs = tuple(fractions)
    if len(fracs) != len(names):
        raise UserError(f"--split-fractions for {scheme} needs {len(names)} numbers ({', '.join(names)})")
    if any(f < 0 for f in fracs) or sum(fracs) <= 0:
        raise UserError(f"split fractions must be non-negative with a positive sum, got {list(fracs)}")
    total = sum(fracs)
    bounds, acc = [], 0.0
    for f in fracs:
        acc += f / total
        bounds.append(acc)

    def split(key: str) -> str:
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        return next((n for n, b in zip(names, bounds, strict=True) if u < b), names[-1])

    return split


#: A number that ``json.dumps`` writes otherwise: below 1e-4 ``json`` writes ``1e-05``, orjson
#: ``0.00001`` or ``1e-5``.
_SMALL_NUMBER = re.compile(rb"[:,\[]-?(?:0\.0000|\d[\d.]*e-)")


def _unlike_json(raw: bytes) -> bool:
    """Whether orjson's text ``raw`` may differ from ``json.dumps``'s: a top-level scalar, ``null``
    (orjson also writes it for NaN and infinities, ``json`` writes ``NaN``, ``Infinity``) or a number
    below 1e-4. A match inside a string only sends the document the slow way."""
    if raw[:1] not in (b"{", b"[") or b"null" in raw:
        return True
    for needle in (b"e-", b"0.0000"):
        i = raw.find(needle)
        while i >= 0:
            if _SMALL_NUMBER.search(raw, max(0, i - 32), i + len(needle)):
                return True
            i = raw.find(needle, i + 1)
    return False


_NOT_ASCII = re.compile("[\x7f-\U0010ffff]")


def _json_escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def _orjson_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is left to the json module")


def dumps_compact(data: Any) -> str:
    """``json.dumps(data, separators=(",", ":"))``, the same text, written by orjson (10x faster on
    COCO polygons) when the document holds nothing that orjson writes differently; anything else
    (subclasses, dataclasses, dates, non-string keys, integers beyond 64 bits, numbers below 1e-4,
    ``null``/NaN) goes to ``json.dumps``. Non-ASCII characters are escaped as ``json`` escapes them."""
    try:
        import orjson
    except ImportError:  # pragma: no cover - orjson comes with the export extra
        orjson = None
    if orjson is not None:
        passthrough = orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
        try:
            raw = orjson.dumps(
                data, default=_orjson_default, option=passthrough | orjson.OPT_PASSTHROUGH_DATETIME
            )
        except TypeError:
            raw = None
        if raw is not None and not _unlike_json(raw):
            text = raw.decode("utf-8")
            return text if text.isascii() and "\x7f" not in text else _NOT_ASCII.sub(_json_escape, text)
    return json.dumps(data, separators=(",", ":"))


def write_json(data: Any, path: Path) -> None:
    """Write JSON compactly (large datasets) with a trailing newline: :func:`dumps_compact`'s text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps_compact(data)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.write("\n")


def finish(summary: ExportSummary, out: Path, **counts: int) -> ExportSummary:
    """Count the dataset's ``images``, ``annotations`` and ``categories`` (keywords, in this order) and
    write the summary into ``out``."""
    for key, n in counts.items():
        summary.count(key, n)
    summary.write(out)
    return summary


def without_gc(fn: Callable[..., ExportSummary]) -> Callable[..., ExportSummary]:
    """Run an export with the cyclic garbage collector paused: building millions of small lists and
    dicts next to the loaded export (which every full collection walks) otherwise spends a third of
    the time in collections that find nothing. Reference counting still frees everything; the
    collector runs again afterwards."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> ExportSummary:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return run
