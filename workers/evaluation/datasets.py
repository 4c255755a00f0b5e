"""Readers for the standard semantic-segmentation validation sets (mmsegmentation's folder layouts).

Every reader lists ``Sample``s (image path, label path) and maps the stored label PNG to training ids
``0..C-1`` with 255 = ignore, exactly as mmsegmentation evaluates (``reduce_zero_label`` where the
benchmark drops label 0). ``--root`` may point at the dataset folder itself or at a parent holding it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from groundlabel.errors import UserError
from workers.evaluation import classes as C

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Sample:
    """One validation image and its label map."""

    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmark: its classes (synonym tuples), whether label 0 is a thresholded background, its layout."""

    name: str
    title: str
    classes: C.Classes
    background: bool  # True: label 0 is "background", predicted by a score threshold, never prompted
    reduce_zero_label: bool  # True: stored label 0 becomes 255 and k becomes k-1
    subdirs: tuple[str, ...]  # where the dataset folder may sit below --root
    lister: Callable[[Path], list[Sample]]
    layout: str

    @property
    def num_classes(self) -> int:
        """Number of evaluated classes (background included when the benchmark has it)."""
        return len(self.classes) + int(self.background)

    @property
    def class_names(self) -> list[str]:
        """One display name per evaluated class, in label order."""
        names = [c[0] for c in self.classes]
        return ["background", *names] if self.background else names

    def resolve_root(self, root: str | Path) -> Path:
        """The dataset folder below ``root`` (refusing, with the layout, when it is not there)."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset root {root} is not a folder")
        for sub in self.subdirs:
            candidate = root / sub if sub else root
            try:
                if self.lister(candidate):
                    return candidate
            except FileNotFoundError:
                continue
        raise UserError(f"no {self.title} validation set found under {root}; expected {self.layout}")

    def samples(self, root: str | Path) -> list[Sample]:
        """All validation samples, sorted by name."""
        return self.lister(self.resolve_root(root))

    def load_label(self, path: str | Path) -> np.ndarray:
        """The label map as uint8 training ids with 255 = ignore."""
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise UserError(
                    f"label {path} has mode {im.mode}; expected a palette or grey-level PNG of ids"
                )
            lab = np.asarray(im)
        if lab.dtype != np.uint8:
            if lab.max() > 255:
                raise UserError(f"label {path} holds ids above 255")
            lab = lab.astype(np.uint8)
        if self.reduce_zero_label:
            lab = lab.copy()
            zero = lab == 0
            lab = lab - 1  # uint8: 0 wraps to 255, 255 becomes 254 (fixed next)
            lab[lab == 254] = IGNORE_INDEX
            lab[zero] = IGNORE_INDEX
        lab = lab.copy() if not lab.flags.writeable else lab
        lab[(lab >= self.num_classes) & (lab != IGNORE_INDEX)] = IGNORE_INDEX
        return lab


def _from_split(
    root: Path,
    split_file: str,
    image_dir: str,
    label_dir: str,
    image_ext: str = ".jpg",
    label_ext: str = ".png",
) -> list[Sample]:
    split = root / split_file
    if not split.is_file():
        raise FileNotFoundError(split)
    names = [ln.strip() for ln in split.read_text().splitlines() if ln.strip()]
    out = []
    for n in names:
        img, lab = root / image_dir / f"{n}{image_ext}", root / label_dir / f"{n}{label_ext}"
        if not img.is_file() or not lab.is_file():
            raise UserError(f"{split} lists {n!r} but {img if not img.is_file() else lab} is missing")
        out.append(Sample(n, img, lab))
    return out


def _pairs(
    image_dir: Path, label_dir: Path, image_glob: str, image_suffix: str, label_suffix: str
) -> list[Sample]:
    """Pairs found by replacing ``image_suffix`` with ``label_suffix`` (same relative folder)."""
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise FileNotFoundError(image_dir if not image_dir.is_dir() else label_dir)
    out = []
    for img in sorted(image_dir.rglob(image_glob)):
        rel = img.relative_to(image_dir)
        stem = rel.name[: -len(image_suffix)]
        lab = label_dir / rel.parent / f"{stem}{label_suffix}"
        if not lab.is_file():
            raise UserError(f"no label for {img}: expected {lab}")
        out.append(Sample(str(rel.parent / stem), img, lab))
    return out


def _voc(root: Path) -> list[Sample]:
    return _from_split(root, "ImageSets/Segmentation/val.txt", "JPEGImages", "SegmentationClass")


def _context(root: Path) -> list[Sample]:
    return _from_split(
        root, "ImageSets/SegmentationContext/val.txt", "JPEGImages", "SegmentationClassContext"
    )


def _ade(root: Path) -> list[Sample]:
    return _pairs(root / "images/validation", root / "annotations/validation", "*.jpg", ".jpg", ".png")


def _coco_stuff(root: Path) -> list[Sample]:
    return _pairs(
        root / "images/val2017", root / "annotations/val2017", "*.jpg", ".jpg", "_labelTrainIds.png"
    )


def _cityscapes(root: Path) -> list[Sample]:
    return _pairs(
        root / "leftImg8bit/val",
        root / "gtFine/val",
        "*_leftImg8bit.png",
        "_leftImg8bit.png",
        "_gtFine_labelTrainIds.png",
    )


_VOC_LAYOUT = (
    "VOCdevkit/VOC2012/{ImageSets/Segmentation/val.txt, JPEGImages/*.jpg, "
    "SegmentationClass/*.png (palette PNGs)}"
)
_CONTEXT_LAYOUT = (
    "VOCdevkit/VOC2010/{ImageSets/SegmentationContext/val.txt, JPEGImages/*.jpg, "
    "SegmentationClassContext/*.png} (mmsegmentation's tools/dataset_converters/pascal_context.py)"
)

DATASETS: dict[str, DatasetSpec] = {
    "voc21": DatasetSpec(
        "voc21",
        "Pascal VOC 2012 (21 classes)",
        C.VOC20,
        True,
        False,
        ("", "VOC2012", "VOCdevkit/VOC2012"),
        _voc,
        _VOC_LAYOUT,
    ),
    "voc20": DatasetSpec(
        "voc20",
        "Pascal VOC 2012 (20 classes, no background)",
        C.VOC20,
        False,
        True,
        ("", "VOC2012", "VOCdevkit/VOC2012"),
        _voc,
        _VOC_LAYOUT,
    ),
    "context60": DatasetSpec(
        "context60",
        "Pascal Context (60 classes)",
        C.CONTEXT59,
        True,
        False,
        ("", "VOC2010", "VOCdevkit/VOC2010"),
        _context,
        _CONTEXT_LAYOUT,
    ),
    "context59": DatasetSpec(
        "context59",
        "Pascal Context (59 classes, no background)",
        C.CONTEXT59,
        False,
        True,
        ("", "VOC2010", "VOCdevkit/VOC2010"),
        _context,
        _CONTEXT_LAYOUT,
    ),
    "ade": DatasetSpec(
        "ade",
        "ADE20K (150 classes)",
        C.ADE150,
        False,
        True,
        ("", "ADEChallengeData2016", "ade/ADEChallengeData2016"),
        _ade,
        "ADEChallengeData2016/{images,annotations}/validation/ (labels 1..150, 0 = ignore)",
    ),
    "coco-stuff": DatasetSpec(
        "coco-stuff",
        "COCO-Stuff 164k (171 classes)",
        C.COCO_STUFF171,
        False,
        False,
        ("", "coco_stuff164k"),
        _coco_stuff,
        "coco_stuff164k/{images/val2017/*.jpg, annotations/val2017/*_labelTrainIds.png} "
        "(mmsegmentation's tools/dataset_converters/coco_stuff164k.py)",
    ),
    "cityscapes": DatasetSpec(
        "cityscapes",
        "Cityscapes (19 classes)",
        C.CITYSCAPES19,
        False,
        False,
        ("", "cityscapes"),
        _cityscapes,
        "cityscapes/{leftImg8bit/val/CITY/*_leftImg8bit.png, "
        "gtFine/val/CITY/*_gtFine_labelTrainIds.png} (cityscapesscripts' "
        "createTrainIdLabelImgs or mmsegmentation's tools/dataset_converters/cityscapes.py)",
    ),
}
ALIASES = {
    "voc": "voc21",
    "context": "context60",
    "pascal-context": "context60",
    "ade20k": "ade",
    "cocostuff": "coco-stuff",
    "coco_stuff": "coco-stuff",
    "city": "cityscapes",
}


def get_dataset(name: str) -> DatasetSpec:
    """The benchmark called ``name`` (aliases: voc = voc21, context = context60, ade20k = ade)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join([*DATASETS, *ALIASES])}")
    return DATASETS[key]


def iter_samples(spec: DatasetSpec, root: str | Path, limit: int | None = None) -> Iterator[Sample]:
    """The first ``limit`` samples (all when None)."""
    samples = spec.samples(root)
    yield from samples[:limit] if limit else samples
