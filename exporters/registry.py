"""The export formats by name: ``--format``'s choices, what each writes, and the one options object.

An :class:`Exporter` names a format and the function that writes it, ``module:function``, imported only
when the format is used, so that listing the formats (``groundlabel export --help``) imports neither
pycocotools nor OpenCV. The function is called as ``write(source, out_dir, options)``: ``source`` is the
Label Studio task list (``reads="tasks"``) or the path of a COCO file (``reads="coco"``), ``options`` an
:class:`ExportOptions`; it returns the :class:`~exporters.summary.ExportSummary` (or, for ``reads="coco"``,
the line to print). A new format is one module with such a function and one :func:`register_exporter`
call, here for the built-in ones or anywhere before the command line is parsed for others.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from groundlabel.errors import UserError

if TYPE_CHECKING:
    from groundlabel.spec import LabelingSpec

    from .images import ImageResolver


@dataclass(frozen=True)
class ExportOptions:
    """Everything an export can be asked for, with the command line's defaults; each format reads the
    options it uses and leaves the others alone."""

    # what is read
    label_config: str | LabelingSpec | None = None  # XML text or a parsed spec: categories, controls
    annotations: str = "latest"  # latest | ground-truth | all
    include_predictions: bool = False
    image_key: str | None = None
    text_from: str | None = None  # the TextArea whose texts are expressions (RefCOCO, gRefCOCO)
    expression_key: str | None = None
    # images
    images: str = "copy"  # copy | link | none
    resolver: ImageResolver | None = None  # closed by the export
    # geometry
    brush_format: str = "rle"  # COCO: rle | polygon
    polygon_tolerance: float = 0.0  # simplification of polygons traced from brush masks, in pixels
    # datasets with splits
    dataset_name: str | None = None  # RefCOCO, gRefCOCO: the folder name (default: the format's name)
    split_by: str = "unc"  # RefCOCO, gRefCOCO: unc | umd
    fractions: Sequence[float] | None = None  # the splits' fractions (default: the format's)
    seed: int = 0
    # COCO to Label Studio import JSON
    image_prefix: str | None = None
    as_predictions: bool = True
    model_version: str = "coco-import"
    progress: bool = False

    def with_(self, **changes: Any) -> ExportOptions:
        """These options with ``changes`` (field names; an unknown one is a ``TypeError``)."""
        return replace(self, **changes) if changes else self


def export_options(options: ExportOptions | None, changes: dict[str, Any]) -> ExportOptions:
    """``options`` (default: every default) with ``changes``: what a format's function is given."""
    return (options or ExportOptions()).with_(**changes)


@dataclass(frozen=True)
class Exporter:
    """One export format: its name, its writer (``module:function``), what it writes under ``--out``
    (lines for ``--help``) and what its input is (``tasks`` or ``coco``)."""

    name: str
    target: str
    layout: tuple[str, ...]
    reads: str = "tasks"

    def load(self) -> Callable[..., Any]:
        """The writer function, imported now."""
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function)


_EXPORTERS: dict[str, Exporter] = {}


def register_exporter(exporter: Exporter) -> Exporter:
    """Add ``exporter`` under its name (a name can be registered once)."""
    if exporter.name in _EXPORTERS:
        raise ValueError(f"an exporter named {exporter.name!r} is already registered")
    if exporter.reads not in ("tasks", "coco"):
        raise ValueError(f"exporter {exporter.name!r} reads 'tasks' or 'coco', not {exporter.reads!r}")
    _EXPORTERS[exporter.name] = exporter
    return exporter


def exporter_names() -> tuple[str, ...]:
    """The registered formats, in registration order."""
    return tuple(_EXPORTERS)


def get_exporter(name: str) -> Exporter:
    """The exporter of format ``name``; :class:`UserError` listing the known ones otherwise."""
    try:
        return _EXPORTERS[name]
    except KeyError:
        raise UserError(f"unknown export format {name!r}: one of {', '.join(_EXPORTERS)}") from None


def layout_help() -> str:
    """What every format writes under ``--out``, one block per format, for ``--help``."""
    lines = []
    for exporter in _EXPORTERS.values():
        first, *rest = exporter.layout
        lines.append(f"  {exporter.name:<10} {first}")
        lines.extend(f"{'':13}{line}" for line in rest)
    return "\n".join(lines)


register_exporter(Exporter("coco", "exporters.coco:export_coco", ("DIR/instances.json, DIR/images/",)))
register_exporter(
    Exporter(
        "refcoco",
        "exporters.refcoco:export_refcoco",
        (
            "DIR/<dataset-name>/refs(unc|umd).p, DIR/<dataset-name>/instances.json,",
            "DIR/images/mscoco/images/train2014/   (the REFER API's and LAVT's layout)",
        ),
    )
)
register_exporter(
    Exporter(
        "grefcoco",
        "exporters.refcoco:export_grefcoco",
        ("DIR/grefcoco/grefs(unc).json, DIR/grefcoco/instances.json, DIR/images/train2014/",),
    )
)
register_exporter(
    Exporter(
        "yolo",
        "exporters.yolo:export_yolo",
        ("DIR/data.yaml, DIR/images/{train,val}/, DIR/labels/{train,val}/*.txt (Ultralytics boxes)",),
    )
)
register_exporter(
    Exporter(
        "yolo-seg",
        "exporters.yolo:export_yolo_seg",
        ("the same with normalised polygons (Ultralytics segmentation)",),
    )
)
register_exporter(
    Exporter("labelstudio", "exporters.coco:write_labelstudio", ("DIR/tasks.json",), reads="coco")
)
