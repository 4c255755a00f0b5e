"""Label Studio annotations to training datasets: COCO, RefCOCO, gRefCOCO, Ultralytics YOLO.

One function per format, flat like pycocotools::

    from exporters import load_labelstudio_export, export_coco, export_refcoco, export_grefcoco, export_yolo
    tasks = load_labelstudio_export("project-1.json")
    export_coco(tasks, "out/coco", images="none")

Each takes the task list, the output folder and an :class:`ExportOptions` (or its fields as keywords);
:mod:`exporters.registry` names them by format for ``groundlabel export --format``. Names are imported
lazily so that the ``groundlabel`` command starts without pycocotools.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_labelstudio_export": "exporters.labelstudio",
    "fetch_project": "exporters.labelstudio",
    "read_tasks": "exporters.labelstudio",
    "export_coco": "exporters.coco",
    "coco_to_labelstudio": "exporters.coco",
    "export_refcoco": "exporters.refcoco",
    "export_grefcoco": "exporters.refcoco",
    "export_yolo": "exporters.yolo",
    "export_yolo_seg": "exporters.yolo",
    "tokenize": "exporters.refcoco",
    "assign_splits": "exporters.steps",
    "ExportOptions": "exporters.registry",
    "Exporter": "exporters.registry",
    "register_exporter": "exporters.registry",
    "get_exporter": "exporters.registry",
    "exporter_names": "exporters.registry",
    "ImageResolver": "exporters.images",
    "ExportSummary": "exporters.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
