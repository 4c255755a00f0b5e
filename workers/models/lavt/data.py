"""Reading RefCOCO-format datasets (the REFER layout) for LAVT training and evaluation.

Layout (what our RefCOCO exporter writes and what REFER / LAVT read)::

    <root>/<dataset>/refs(<splitBy>).p      pickled list of refs (ref_id, ann_id, image_id, split,
                                            sentences[{raw, sent, tokens, sent_id}], sent_ids)
    <root>/<dataset>/instances.json         COCO images / annotations (polygons) / categories
    <root>/images/mscoco/images/train2014/  the images, named by instances.json's file_name

Masks are built as REFER does (``frPyObjects`` on the polygons, decode, sum over the parts) and LAVT
keeps the pixels where that sum ``== 1``: where two polygons of one object overlap the sum is 2 and the
pixel becomes background. ``mask_rule="lavt"`` (default) reproduces that quirk so numbers compare with
the paper's; ``mask_rule="union"`` keeps every covered pixel.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from groundlabel.errors import UserError

IMAGE_SUBDIR = Path("images/mscoco/images/train2014")


class _PlainUnpickler(pickle.Unpickler):
    """Reads lists, dicts, strings and numbers only: a refs file can never run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(
            f"refs files hold only plain lists, dicts, strings and numbers; found {module}.{name}"
        )


def load_refs_pickle(path: Path) -> list[dict[str, Any]]:
    """The refs list of a ``refs(<splitBy>).p`` file (Python 2 or 3 pickle)."""
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a readable refs pickle: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError(f"{path} must hold a list of ref dicts")
    return data


def split_matches(query: str, split: str) -> bool:
    """REFER's ``getRefIds`` rule: testA/B/C by letter, ``test`` by substring, others exactly."""
    if query in ("testA", "testB", "testC"):
        return query[-1] in split
    if query == "test":
        return "test" in split
    return query == split


class Refer:
    """A RefCOCO-style dataset: refs, annotations and images, indexed as REFER indexes them."""

    def __init__(self, root: str | Path, dataset: str = "refcoco", split_by: str = "unc") -> None:
        self.root = Path(root).expanduser()
        self.dataset_dir = self.root / dataset
        refs_path = self.dataset_dir / f"refs({split_by}).p"
        instances_path = self.dataset_dir / "instances.json"
        for path in (refs_path, instances_path):
            if not path.is_file():
                raise UserError(
                    f"{path} not found: a RefCOCO-format folder holds "
                    f"<root>/{dataset}/refs({split_by}).p and <root>/{dataset}/instances.json, "
                    f"images under <root>/{IMAGE_SUBDIR}"
                )
        self.image_dir = self.root / IMAGE_SUBDIR
        self.refs = load_refs_pickle(refs_path)
        try:
            instances = json.loads(instances_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{instances_path} is not valid JSON: {exc}") from exc
        self.images = {int(im["id"]): im for im in instances.get("images", [])}
        self.anns = {int(a["id"]): a for a in instances.get("annotations", [])}
        self.ref_by_id: dict[int, dict[str, Any]] = {}
        for ref in self.refs:
            for key in ("ref_id", "ann_id", "image_id", "split", "sentences"):
                if key not in ref:
                    raise UserError(f"{refs_path}: a ref has no {key!r} field ({sorted(ref)})")
            if int(ref["ann_id"]) not in self.anns:
                raise UserError(
                    f"{refs_path}: ref {ref['ref_id']} points to annotation {ref['ann_id']}, "
                    "which instances.json does not hold"
                )
            if int(ref["image_id"]) not in self.images:
                raise UserError(f"{refs_path}: ref {ref['ref_id']} points to unknown image {ref['image_id']}")
            if not ref["sentences"]:
                raise UserError(f"{refs_path}: ref {ref['ref_id']} has no sentences")
            self.ref_by_id[int(ref["ref_id"])] = ref

    def splits(self) -> list[str]:
        """The split names present, sorted."""
        return sorted({str(r["split"]) for r in self.refs})

    def ref_ids(self, split: str) -> list[int]:
        """Ids of the refs in ``split`` (REFER's matching rule), in file order."""
        return [int(r["ref_id"]) for r in self.refs if split_matches(split, str(r["split"]))]

    def image_path(self, ref: dict[str, Any]) -> Path:
        """The image file of a ref."""
        return self.image_dir / self.images[int(ref["image_id"])]["file_name"]

    def part_sum(self, ref: dict[str, Any]) -> np.ndarray:
        """REFER's ``getMask``: the per-pixel count of the annotation's parts covering it (uint8 H×W)."""
        from pycocotools import mask as mask_utils

        ann = self.anns[int(ref["ann_id"])]
        image = self.images[int(ref["image_id"])]
        h, w = int(image["height"]), int(image["width"])
        seg = ann.get("segmentation")
        if isinstance(seg, dict):  # a bare RLE dict (REFER would break on it): accept it knowingly
            seg = [seg]
        if not seg:
            return np.zeros((h, w), dtype=np.uint8)
        try:
            if isinstance(seg[0], list):
                rles = mask_utils.frPyObjects(seg, h, w)
            else:
                rles = [
                    mask_utils.frPyObjects(r, h, w) if isinstance(r.get("counts"), list) else r for r in seg
                ]
            with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword notice, once per mask
                warnings.simplefilter("ignore", DeprecationWarning)
                decoded = mask_utils.decode(rles)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"annotation {ann['id']} has an unreadable segmentation: {exc}") from exc
        if decoded.ndim == 2:
            decoded = decoded[..., None]
        return np.sum(decoded, axis=2).astype(np.uint8)

    def mask(self, ref: dict[str, Any], rule: str = "lavt") -> np.ndarray:
        """Binary target (uint8 0/1): ``lavt`` keeps ``part_sum == 1``, ``union`` keeps ``> 0``."""
        counts = self.part_sum(ref)
        if rule == "lavt":
            return (counts == 1).astype(np.uint8)
        if rule == "union":
            return (counts > 0).astype(np.uint8)
        raise UserError(f"mask rule must be 'lavt' or 'union', not {rule!r}")


@dataclass
class Sample:
    """One (ref, sentence) pair."""

    ref_id: int
    sentence: int


class RefSegmentation:
    """Torch-style dataset over one split.

    Training (``train=True``): one item per ref, a random sentence each time (LAVT). Evaluation: one
    item per (ref, sentence), every sentence evaluated. Items are ``(image [3,S,S] float, target [S,S]
    long, input_ids [T], attention_mask [T])``; the target is the mask resized with NEAREST.
    """

    def __init__(
        self,
        refer: Refer,
        split: str,
        tokenizer: Any,
        *,
        image_size: int = 480,
        max_tokens: int = 20,
        train: bool = False,
        mask_rule: str = "lavt",
        limit: int | None = None,
    ) -> None:
        from workers.models.lavt.text import tokenize

        self.refer = refer
        self.split = split
        self.image_size = image_size
        self.train = train
        self.mask_rule = mask_rule
        self.ref_ids = refer.ref_ids(split)[: limit or None]
        if not self.ref_ids:
            raise UserError(f"split {split!r} has no refs; present: {', '.join(refer.splits()) or 'none'}")
        self.tokens: dict[int, tuple[Any, Any]] = {}
        for ref_id in self.ref_ids:
            raws = [
                s.get("raw") or s.get("sent") or " ".join(s.get("tokens", []))
                for s in refer.ref_by_id[ref_id]["sentences"]
            ]
            ids, mask, _ = tokenize(tokenizer, raws, max_tokens)
            self.tokens[ref_id] = (ids, mask)
        self.samples = [Sample(r, i) for r in self.ref_ids for i in range(len(self.tokens[r][0]))]

    def __len__(self) -> int:
        return len(self.ref_ids) if self.train else len(self.samples)

    def sentence(self, index: int) -> str:
        """The raw text of an evaluation item (for reports)."""
        sample = self.samples[index]
        sent = self.refer.ref_by_id[sample.ref_id]["sentences"][sample.sentence]
        return sent.get("raw") or sent.get("sent", "")

    def load(self, ref_id: int) -> tuple[Any, Any]:
        """Image tensor and target tensor of a ref at image_size×image_size."""
        import torch
        from PIL import Image

        from workers.models.lavt.engine import image_tensor

        ref = self.refer.ref_by_id[ref_id]
        path = self.refer.image_path(ref)
        try:
            with Image.open(path) as im:
                image = image_tensor(im, self.image_size)
        except (FileNotFoundError, OSError) as exc:
            raise UserError(f"image of ref {ref_id} cannot be read: {path} ({exc})") from exc
        target = Image.fromarray(self.refer.mask(ref, self.mask_rule) * 255)
        target = target.resize((self.image_size, self.image_size), Image.NEAREST)
        return image, torch.from_numpy((np.asarray(target) > 127).astype(np.int64))

    def __getitem__(self, index: int) -> tuple[Any, Any, Any, Any]:
        if self.train:
            ref_id = self.ref_ids[index]
            ids, mask = self.tokens[ref_id]
            k = random.randrange(len(ids))
        else:
            sample = self.samples[index]
            ref_id, k = sample.ref_id, sample.sentence
            ids, mask = self.tokens[ref_id]
        image, target = self.load(ref_id)
        return image, target, ids[k], mask[k]


def iou_stats(pred: Sequence[Any], target: Sequence[Any]) -> tuple[list[float], list[float]]:
    """Per-sample (intersection, union) pixel counts of binary masks (torch tensors or arrays)."""
    inter, union = [], []
    for p, t in zip(pred, target, strict=True):
        p, t = p.bool(), t.bool()
        inter.append(float((p & t).sum()))
        union.append(float((p | t).sum()))
    return inter, union


def summarize(intersections: Sequence[float], unions: Sequence[float]) -> dict[str, float]:
    """LAVT's metrics: oIoU = ΣI/ΣU, mIoU = mean per-sentence IoU (U = 0 counts 0), precision@0.5..0.9."""
    n = len(intersections)
    ious = [i / u if u > 0 else 0.0 for i, u in zip(intersections, unions, strict=True)]
    total_u = sum(unions)
    out = {
        "samples": n,
        "oIoU": sum(intersections) / total_u if total_u > 0 else 0.0,
        "mIoU": sum(ious) / n if n else 0.0,
    }
    for thr in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"P@{thr}"] = sum(iou >= thr for iou in ious) / n if n else 0.0
    return out
