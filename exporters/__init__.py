"""Label Studio annotations to training datasets: COCO, RefCOCO, gRefCOCO.

One function per format, flat like pycocotools::

    from exporters import load_labelstudio_export, export_coco, export_refcoco, export_grefcoco
    tasks = load_labelstudio_export("project-1.json")
    export_coco(tasks, "out/coco", images="none")

Names are imported lazily so that the ``groundlabel`` command starts without pycocotools.
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
    "tokenize": "exporters.refcoco",
    "assign_splits": "exporters.refcoco",
    "ImageResolver": "exporters.images",
    "ExportSummary": "exporters.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'exporters' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
