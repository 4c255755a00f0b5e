"""RefCOCO and gRefCOCO datasets from Label Studio annotations with referring expressions.

Where expressions come from (a ``textarea`` result in the same annotation):

- per-region text (``<TextArea perRegion="true">``: the result's ``id`` is the region's id) refers to
  that region;
- per-task text (any other TextArea result, or the task data field named by the TextArea's
  ``value="$field"`` / ``--expression-key`` when the annotation has none) refers to the task's single
  region; with several regions it refers to all of them (gRefCOCO: one multi-target ref; RefCOCO:
  skipped, RefCOCO has one object per ref); with no region it is a no-target ref (gRefCOCO only).

Each non-empty line of a text is one sentence of the ref. ``tokens`` are the lower-cased text split
into words (runs of letters and digits, with inner apostrophes kept: ``"man's"``); ``sent`` is the
tokens joined by spaces; ``raw`` is the line as typed.

Splits are by image: an image's split is decided by a hash of the seed and the image reference, so
one image never lands in two splits, the same seed gives the same splits, and images keep their split
when the project grows. Fractions are therefore approximate on small datasets.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError

from .coco import build_coco, finish_coco
from .labelstudio import ImageRecord
from .registry import ExportOptions, export_options
from .steps import SPLIT_SCHEMES, assign_splits, read_and_place, without_gc, write_json
from .summary import ExportSummary

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens: runs of letters/digits (underscore excluded), inner apostrophes kept."""
    return _WORD.findall(text.lower())


def _sentences(lines: Sequence[str], next_id: list[int], summary: ExportSummary, where: str) -> list[dict]:
    sents = []
    for raw in lines:
        tokens = tokenize(raw)
        if not tokens:
            summary.skip("expression without words", where, repr(raw))
            continue
        sents.append({"tokens": tokens, "raw": str(raw), "sent": " ".join(tokens), "sent_id": next_id[0]})
        next_id[0] += 1
    return sents


def build_refs(
    records: Sequence[ImageRecord],
    coco: dict[str, Any],
    ann_ids: dict[tuple[int, str], int],
    summary: ExportSummary,
    *,
    generalized: bool,
    split_by: str,
    fractions: Sequence[float] | None,
    seed: int,
) -> list[dict[str, Any]]:
    """The ref list (RefCOCO when ``generalized`` is False, gRefCOCO otherwise)."""
    anns = {a["id"]: a for a in coco["annotations"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    pending: list[tuple[ImageRecord, list[int], list[str], str]] = []  # record, ann ids, lines, where
    for index, rec in enumerate(records):
        where = f"task {rec.task_id or rec.image_id} {rec.origin}"
        exported = [
            (r.region_id, ann_ids[(index, r.region_id)])
            for r in rec.regions
            if (index, r.region_id) in ann_ids
        ]
        by_region = dict(exported)
        texted: dict[str, list[str]] = {}
        for name, here, lines in rec.unused_texts:
            summary.skip(
                "text from another TextArea",
                here,
                f"{name!r}: {' / '.join(lines)[:60]!r}; the expressions are another TextArea's "
                f"(pass --text-from {name} to use these)",
            )
        for rid, lines in rec.region_texts.items():
            if rid in by_region:
                texted[rid] = list(lines)
            else:
                summary.skip(
                    "expression on a skipped region", f"{where} region {rid}", " / ".join(lines)[:80]
                )
        task_lines = list(rec.task_texts)
        if task_lines:
            if len(exported) == 1:
                texted.setdefault(exported[0][0], []).extend(task_lines)
            elif len(exported) > 1:
                if generalized:
                    pending.append((rec, [a for _, a in exported], task_lines, where))
                else:
                    summary.skip(
                        "per-task expression covers several regions",
                        where,
                        f"{len(exported)} regions; use per-region text or --format grefcoco",
                    )
            elif rec.regions or rec.skipped_regions:
                summary.skip("expression on a skipped region", where, " / ".join(task_lines)[:80])
            elif generalized:
                pending.append((rec, [], task_lines, where))
            else:
                summary.skip(
                    "expression without region (no target)",
                    where,
                    "RefCOCO has no no-target refs; use --format grefcoco",
                )
        for rid, ann_id in exported:
            if rid in texted:
                pending.append((rec, [ann_id], texted[rid], f"{where} region {rid}"))
            else:
                summary.skip(
                    "region without expression", f"{where} region {rid}", "exported to instances.json only"
                )
    splits = assign_splits(sorted({rec.image_ref for rec, *_ in pending}), split_by, fractions, seed)
    refs: list[dict[str, Any]] = []
    next_sent = [1]
    for rec, ids, lines, where in pending:
        sentences = _sentences(lines, next_sent, summary, where)
        if not sentences:
            continue
        cats = list(dict.fromkeys(anns[a]["category_id"] for a in ids))
        ref: dict[str, Any] = {
            "ref_id": len(refs) + 1,
            "image_id": int(rec.image_id),
            "split": splits[rec.image_ref],
            "file_name": files[rec.image_id],
            "sent_ids": [s["sent_id"] for s in sentences],
            "sentences": sentences,
        }
        if generalized:
            ref["ann_id"] = list(ids) if ids else [-1]
            ref["category_id"] = cats if cats else [-1]
            ref["no_target"] = not ids
            summary.count(
                "no-target refs" if not ids else "multi-target refs" if len(ids) > 1 else "single-target refs"
            )
        else:
            ref["ann_id"] = ids[0]
            ref["category_id"] = cats[0]
        refs.append(ref)
    summary.count("refs", len(refs))
    summary.count("sentences", next_sent[0] - 1)
    per_split: dict[str, dict[str, int]] = {}
    images_per_split: dict[str, set[int]] = {}
    for ref in refs:
        counts = per_split.setdefault(ref["split"], {"refs": 0, "sentences": 0, "images": 0})
        counts["refs"] += 1
        counts["sentences"] += len(ref["sentences"])
        images_per_split.setdefault(ref["split"], set()).add(ref["image_id"])
    for split, counts in per_split.items():
        counts["images"] = len(images_per_split[split])
    summary.splits = {s: per_split[s] for s in SPLIT_SCHEMES[split_by] if s in per_split}
    return refs


def _refs_exporter(generalized: bool, doc: str) -> Callable[..., ExportSummary]:
    """The export function of RefCOCO (``generalized`` False) or gRefCOCO, documented by ``doc``."""
    default_name = "grefcoco" if generalized else "refcoco"

    def export(
        tasks: Sequence[dict[str, Any]],
        out_dir: str | Path,
        options: ExportOptions | None = None,
        **changes: Any,
    ) -> ExportSummary:
        options = export_options(options, changes)
        split_by = options.split_by
        dataset_name = default_name if options.dataset_name is None else options.dataset_name
        if split_by not in SPLIT_SCHEMES:
            raise UserError(f"--splits must be one of {', '.join(SPLIT_SCHEMES)}, got {split_by!r}")
        if not dataset_name or "/" in dataset_name or dataset_name in (".", ".."):
            raise UserError(f"--dataset-name must be a plain folder name, got {dataset_name!r}")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        summary = ExportSummary(default_name)
        image_dir = (
            out / "images" / "train2014"
            if generalized
            else out / "images" / "mscoco" / "images" / "train2014"
        )
        records, categories, names = read_and_place(tasks, summary, options, image_dir, texts=True)
        coco, ann_ids = build_coco(
            records,
            categories,
            names,
            summary,
            brush_format="polygon",
            polygon_tolerance=options.polygon_tolerance,
            description=f"{dataset_name} exported by groundlabel",
        )
        refs = build_refs(
            records,
            coco,
            ann_ids,
            summary,
            generalized=generalized,
            split_by=split_by,
            fractions=options.fractions,
            seed=options.seed,
        )
        data_dir = out / dataset_name
        write_json(coco, data_dir / "instances.json")
        if generalized:
            (data_dir / f"grefs({split_by}).json").write_text(json.dumps(refs) + "\n", encoding="utf-8")
        else:
            with open(data_dir / f"refs({split_by}).p", "wb") as fh:
                pickle.dump(refs, fh, protocol=2)
        return finish_coco(summary, coco, out)

    name = f"export_{default_name}"
    export.__name__, export.__qualname__, export.__doc__ = name, name, doc
    return without_gc(export)


export_refcoco = _refs_exporter(
    False,
    """Write a RefCOCO dataset: ``<out>/<dataset_name>/refs(<split_by>).p`` (pickle protocol 2),
    ``<out>/<dataset_name>/instances.json`` (polygons) and ``<out>/images/mscoco/images/train2014/``.
    ``options`` and ``changes`` (:class:`~exporters.registry.ExportOptions` fields) say what to export.
    """,
)

export_grefcoco = _refs_exporter(
    True,
    """Write a gRefCOCO dataset: ``<out>/<dataset_name>/grefs(<split_by>).json``,
    ``<out>/<dataset_name>/instances.json`` and ``<out>/images/train2014/``; multi-target refs have
    ``ann_id`` lists, no-target refs ``ann_id: [-1]`` and ``category_id: [-1]``. ``options`` and
    ``changes`` (:class:`~exporters.registry.ExportOptions` fields) say what to export.
    """,
)
