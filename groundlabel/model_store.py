"""The model store: immutable trained versions per project, and which one each project serves.

A store is a folder, named by a path or a ``file://`` URL (``GROUNDLABEL_MODEL_STORE``)::

    <store>/<project>/<version>/meta.json     name, kind, project, parent, annotation count, time,
                                              config, metrics (held-out: the parent's and this one's)
    <store>/<project>/<version>/<weights>     the weights (LAVT: a training checkpoint, ``model.pth``)
    <store>/<project>/promoted.json           {"version": ..., "history": [{"version", "at", "reason"}]}

A version is written into a hidden folder beside the others and renamed into place in one step, so a
reader never sees half a version, and an existing version is never overwritten. Version names are what
Label Studio shows as the model version: ``<kind>-<variant>-p<project>-v<N>`` (``lavt-swin_b-p3-v2``).
Promotion only rewrites ``promoted.json`` (atomically); rolling back promotes the previous entry of its
history. This module needs no torch: the backend reads the store to answer ``/setup`` and ``/versions``.

S3-compatible buckets (``s3://bucket/prefix``) are not supported: no S3 client is a dependency.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from groundlabel.errors import UserError

META = "meta.json"
PROMOTED = "promoted.json"
_PROJECT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_VERSION = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")
_NUMBER = re.compile(r"-v(\d+)$")


@dataclass
class ModelVersion:
    """One stored version's record (``meta.json``)."""

    name: str
    kind: str  # "lavt" (a fine-tuned LAVT checkpoint) or "gem" (a distilled CLIP state dict for GEM)
    project: str
    parent: str | None  # the version it was fine-tuned from (a stored name, or the base model's)
    annotation_count: int
    created_at: str  # ISO 8601, UTC
    weights: str  # file name inside the version's folder
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # {"base": {...}, "new": {...}, "heldout_images"}
    note: str = ""

    @property
    def number(self) -> int:
        """The N of ``-vN``."""
        match = _NUMBER.search(self.name)
        return int(match.group(1)) if match else 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelVersion:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_project(project: str | int) -> str:
    """A project id as the store names it; refuses anything but letters, digits, ``-`` and ``_``."""
    text = str(project).strip()
    if not _PROJECT.match(text):
        raise UserError(f"project {project!r} is not a valid project id")
    return text


def store_path(url: str) -> Path:
    """The folder a store URL names: a path, or ``file:///path``; ``s3://`` is refused with the reason."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme in ("s3", "gs", "http", "https"):
        raise UserError(
            f"GROUNDLABEL_MODEL_STORE={text!r}: only folders are supported (a path or file:///path); "
            "S3-compatible buckets would need an S3 client, which groundlabel does not depend on"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"GROUNDLABEL_MODEL_STORE={text!r}: a file:// URL names a local folder")
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise UserError(f"GROUNDLABEL_MODEL_STORE={text!r}: unknown scheme {parts.scheme!r}")
    return Path(text).expanduser()


class ModelStore:
    """A folder of trained versions (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_url(cls, url: str) -> ModelStore:
        """The store a ``GROUNDLABEL_MODEL_STORE`` value names."""
        return cls(store_path(url))

    # -- reading -------------------------------------------------------------------------------------

    def _project_dir(self, project: str | int) -> Path:
        return self.root / check_project(project)

    def projects(self) -> list[str]:
        """Projects with at least one version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _PROJECT.match(p.name))

    def versions(self, project: str | int) -> list[ModelVersion]:
        """The project's versions, oldest first."""
        folder = self._project_dir(project)
        if not folder.is_dir():
            return []
        out = []
        for child in folder.iterdir():
            meta = child / META
            if child.name.startswith(".") or not meta.is_file():
                continue
            try:
                out.append(ModelVersion.from_dict(json.loads(meta.read_text(encoding="utf-8"))))
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as exc:
                raise UserError(f"{meta} is not a valid version record: {exc}") from exc
        return sorted(out, key=lambda v: (v.number, v.created_at))

    def get(self, project: str | int, name: str) -> ModelVersion:
        """One version by name; :class:`UserError` naming the versions there are when it is missing."""
        if not _VERSION.match(name):
            raise UserError(f"{name!r} is not a version name")
        meta = self._project_dir(project) / name / META
        if not meta.is_file():
            known = ", ".join(v.name for v in self.versions(project)) or "none"
            raise UserError(f"project {project} has no version {name!r} (versions: {known})")
        return ModelVersion.from_dict(json.loads(meta.read_text(encoding="utf-8")))

    def weights_path(self, version: ModelVersion) -> Path:
        """The weight file of ``version``."""
        return self._project_dir(version.project) / version.name / version.weights

    def _pointer(self, project: str | int) -> dict[str, Any]:
        path = self._project_dir(project) / PROMOTED
        if not path.is_file():
            return {"version": None, "history": []}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from exc
        return {"version": data.get("version"), "history": list(data.get("history") or [])}

    def promoted_name(self, project: str | int) -> str | None:
        """The name of the version the project serves, or None (the base models)."""
        return self._pointer(project)["version"]

    def promoted(self, project: str | int) -> ModelVersion | None:
        """The version the project serves, or None (the base models)."""
        name = self.promoted_name(project)
        return self.get(project, name) if name else None

    def history(self, project: str | int) -> list[dict[str, Any]]:
        """Every promotion of the project, oldest first (``version`` None: back to the base models)."""
        return self._pointer(project)["history"]

    # -- writing -------------------------------------------------------------------------------------

    def next_name(self, project: str | int, kind: str, variant: str) -> str:
        """The next free version name of the project."""
        numbers = [v.number for v in self.versions(project)]
        return f"{kind}-{variant}-p{check_project(project)}-v{max(numbers, default=0) + 1}"

    def add(
        self,
        *,
        project: str | int,
        kind: str,
        variant: str,
        weights: str | Path,
        parent: str | None,
        annotation_count: int,
        config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        note: str = "",
    ) -> ModelVersion:
        """Store a new version holding a copy of ``weights``; returns its record (never overwrites)."""
        project = check_project(project)
        source = Path(weights)
        if not source.is_file():
            raise UserError(f"weights {source} do not exist")
        folder = self._project_dir(project)
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=folder))
        try:
            target_name = "model" + source.suffix
            shutil.copyfile(source, staging / target_name)
            for _ in range(100):
                version = ModelVersion(
                    name=self.next_name(project, kind, variant),
                    kind=kind,
                    project=project,
                    parent=parent,
                    annotation_count=int(annotation_count),
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    weights=target_name,
                    config=dict(config or {}),
                    metrics=dict(metrics or {}),
                    note=note,
                )
                (staging / META).write_text(json.dumps(version.to_dict(), indent=2), encoding="utf-8")
                try:
                    os.rename(staging, folder / version.name)  # fails if the name was taken meanwhile
                except OSError:
                    if (folder / version.name).exists():
                        continue
                    raise
                return version
            raise UserError(f"could not find a free version name in {folder}")
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _write_pointer(self, project: str, pointer: dict[str, Any]) -> None:
        folder = self._project_dir(project)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{PROMOTED}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(pointer, indent=2), encoding="utf-8")
        os.replace(tmp, folder / PROMOTED)

    def promote(self, project: str | int, name: str | None, reason: str, *, rollback: bool = False) -> None:
        """Serve ``name`` for the project from now on (None: the base models); recorded in the history."""
        project = check_project(project)
        if name is not None:
            self.get(project, name)
        pointer = self._pointer(project)
        pointer["version"] = name
        entry = {"version": name, "at": datetime.now(UTC).isoformat(timespec="seconds"), "reason": reason}
        if rollback:
            entry["rollback"] = True
        pointer["history"].append(entry)
        self._write_pointer(project, pointer)

    def rollback(self, project: str | int) -> str | None:
        """Serve the version promoted before the current one (None: the base models); returns it.

        Rollbacks themselves do not count as promotions, so rolling back twice goes two steps back.
        """
        project = check_project(project)
        current = self.promoted_name(project)
        if current is None:
            raise UserError(f"project {project} serves the base models already: nothing to roll back")
        promotions = [e.get("version") for e in self.history(project) if not e.get("rollback")]
        index = len(promotions) - 1 - promotions[::-1].index(current) if current in promotions else 0
        previous = promotions[index - 1] if index > 0 else None
        self.promote(project, previous, f"rolled back from {current}", rollback=True)
        return previous


def version_summary(version: ModelVersion, promoted: str | None) -> dict[str, Any]:
    """A short description of a version for ``/versions`` and the CLI."""
    new = (version.metrics or {}).get("new") or {}
    base = (version.metrics or {}).get("base") or {}
    return {
        "name": version.name,
        "kind": version.kind,
        "project": version.project,
        "parent": version.parent,
        "created_at": version.created_at,
        "annotation_count": version.annotation_count,
        "heldout_oIoU": new.get("oIoU"),  # LAVT versions
        "parent_heldout_oIoU": base.get("oIoU"),
        "heldout_mIoU": new.get("mIoU"),  # GEM versions: percent, eval-gem's protocol; LAVT: its mIoU
        "parent_heldout_mIoU": base.get("mIoU"),
        "promoted": version.name == promoted,
    }
