"""The model store: immutable trained versions per project, and which one each project serves.

A store is a folder, named by a path or a ``file://`` URL (``GROUNDLABEL_MODEL_STORE``)::

    <store>/<project>/<version>/meta.json          name, kind, project, parent, annotation count, time,
                                                   config, metrics (held-out: the parent's and this one's)
    <store>/<project>/<version>/model.safetensors  the weights, as safetensors (never a pickle)
    <store>/<project>/promoted.json                {"version": ..., "history": [{"version", "at", "reason"}]}

An S3-compatible bucket (``s3://bucket/prefix``, with ``groundlabel[s3]``) holds the same keys below its
prefix; its endpoint and credentials are :class:`~groundlabel.settings.S3Settings`. In a folder a version is
written into a hidden folder beside the others and renamed into place in one step; in a bucket its name is
claimed by a conditional write and its record written last (:class:`S3Backend`). Either way a reader never
sees half a version, and an existing version is never overwritten. Version names are what
Label Studio shows as the model version: ``<kind>-<variant>-p<project>-v<N>`` (``lavt-swin_b-p3-v2``).
Promotion only rewrites ``promoted.json`` (atomically); rolling back promotes the previous entry of its
history. This module needs no torch: the backend reads the store to answer ``/setup`` and ``/versions``.

Whoever can write the store (a shared folder, a bucket) must not be able to run code where it is read, nor
to break another project: every file read is checked (its type, fields and names: :class:`StoreFileError`
names the file and what is wrong), projects are canonical Label Studio ids, version names cannot leave
their project's folder, and weights are handed out only when they are a well-formed safetensors file
(:func:`check_safetensors`), which the workers read without unpickling anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from groundlabel.calibration import CALIBRATION_FILE, Calibration, read_calibration
from groundlabel.errors import UserError
from groundlabel.ls_format import project_id
from groundlabel.settings import S3Settings, TrainingSettings

META = "meta.json"
PROMOTED = "promoted.json"
#: The file name of a version's weights: a safetensors file (tensors and a JSON header, no code).
WEIGHTS = "model.safetensors"
#: The kinds of versions: which engine a trained version replaces for its project, or a calibration
#: (per-label engine, refinement and threshold: a small JSON file, :mod:`groundlabel.calibration`).
KINDS = ("lavt", "gem", "calibration")
#: A version name: one path component that starts with a letter or digit (so never ``.`` nor ``..``).
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_NUMBER = re.compile(r"-v(\d+)$")
#: The largest safetensors header accepted (the format's own limit).
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class StoreFileError(UserError):
    """A file of the model store is not what the store writes (wrong type, missing or malformed fields,
    a name outside the rules, weights that are not safetensors); the message names the file and why.

    It concerns one project: the backend answers 409 for that project's requests (or serves its base
    models, logged), and the other projects are unaffected.
    """


@dataclass
class ModelVersion:
    """One stored version's record (``meta.json``)."""

    name: str
    kind: str  # "lavt" (a fine-tuned LAVT checkpoint), "gem" (a distilled CLIP for GEM) or "calibration"
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
        """Inverse of :meth:`to_dict` (unknown keys are ignored; no checks: see :func:`parse_record`)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def check_project(project: str | int) -> str:
    """A project id as the store names it: the canonical Label Studio id (``"41"``); anything else
    (``"0041"``, ``"4_1"``, ``".."``) is refused with a :class:`UserError`."""
    try:
        return project_id(project)
    except ValueError as exc:
        raise UserError(f"project {str(project)[:80]!r} is not a valid project id: {exc}") from exc


def is_version_name(name: Any) -> bool:
    """Whether ``name`` is a valid version name (one path component, never ``.`` nor ``..``)."""
    return isinstance(name, str) and _VERSION.fullmatch(name) is not None


def check_version_name(name: str) -> str:
    """``name`` when it is a valid version name, else a :class:`UserError` saying what one looks like."""
    if not is_version_name(name):
        raise UserError(
            f"{str(name)[:80]!r} is not a version name (letters, digits and _ . + -, starting with a letter "
            "or a digit, at most 128 characters)"
        )
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_record(data: Any, project: str, name: str, where: str) -> ModelVersion:
    """A version record read from ``where`` (``<project>/<name>/meta.json``), checked field by field;
    :class:`StoreFileError` saying what is wrong otherwise."""

    def bad(reason: str) -> StoreFileError:
        return StoreFileError(f"{where} is not a valid version record: {reason}")

    if not isinstance(data, dict):
        raise bad(f"a JSON object is expected, it holds a {type(data).__name__}")
    for key in ("name", "kind", "project", "created_at", "weights", "note"):
        if (key in data or key != "note") and not isinstance(data.get(key), str):
            raise bad(f"{key!r} must be a string")
    if data["name"] != name:
        raise bad(f"its name {data['name'][:80]!r} is not its folder's, {name!r}")
    if data["kind"] not in KINDS:
        raise bad(f"kind {data['kind'][:40]!r} is not one of {', '.join(KINDS)}")
    if data["project"] != project:
        raise bad(f"its project {data['project'][:40]!r} is not {project!r}")
    if not is_version_name(data["weights"]):
        raise bad("'weights' must be a file name inside the version's folder")
    if (data["kind"] == "calibration") != (data["weights"] == CALIBRATION_FILE):
        raise bad(f"a calibration's file, and only its, is {CALIBRATION_FILE}")
    parent = data.get("parent")
    if parent is not None and (not isinstance(parent, str) or len(parent) > 256):
        raise bad("'parent' must be a version name or null")
    if not _is_int(data.get("annotation_count")) or data["annotation_count"] < 0:
        raise bad("'annotation_count' must be a non-negative integer")
    for key in ("config", "metrics"):
        if not isinstance(data.get(key, {}), dict):
            raise bad(f"{key!r} must be an object")
    for key in ("base", "new"):
        if not isinstance((data.get("metrics") or {}).get(key, {}), dict):
            raise bad(f"'metrics.{key}' must be an object")
    return ModelVersion.from_dict(data)


def parse_pointer(data: Any, where: str) -> dict[str, Any]:
    """A project's ``promoted.json`` read from ``where``, checked: ``{"version": name or null, "history":
    [{"version": name or null, "at", "reason", "rollback"?}, ...]}``; :class:`StoreFileError` otherwise."""

    def bad(reason: str) -> StoreFileError:
        return StoreFileError(f"{where} is not a valid promotion record: {reason}")

    if not isinstance(data, dict):
        raise bad(f"a JSON object is expected, it holds a {type(data).__name__}")
    version = data.get("version")
    if version is not None and not is_version_name(version):
        raise bad("'version' must be a version name or null")
    history = data.get("history") or []
    if not isinstance(history, list):
        raise bad("'history' must be a list")
    for n, entry in enumerate(history):
        if not isinstance(entry, dict):
            raise bad(f"history entry {n} is not an object")
        if entry.get("version") is not None and not is_version_name(entry["version"]):
            raise bad(f"history entry {n}: 'version' must be a version name or null")
        if not isinstance(entry.get("rollback", False), bool):
            raise bad(f"history entry {n}: 'rollback' must be true or false")
    return {"version": version, "history": list(history)}


def check_safetensors(path: str | Path, where: str | None = None) -> None:
    """Raise :class:`StoreFileError` unless ``path`` is a well-formed safetensors file: an 8-byte
    little-endian header length, a JSON object header (at most :data:`MAX_SAFETENSORS_HEADER` bytes) whose
    tensors each name a dtype, a shape and a byte range inside the file. Only the header is read; a pickle,
    a TorchScript archive or any other file is refused before anything parses it as weights."""
    where = where or str(path)
    refused = f"refused to load {where}: the model store's weights are read only as safetensors, and"
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8):
                raise StoreFileError(f"{refused} this file is not one (no safetensors header)")
            header = json.loads(fh.read(length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreFileError(f"{refused} this file is not one ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise StoreFileError(f"{refused} its header is not a JSON object")
    body = size - 8 - length
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise StoreFileError(f"{refused} its metadata is not a map of strings")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("dtype"), str)
            or not isinstance(entry.get("shape"), list)
            or not all(_is_int(d) and d >= 0 for d in entry["shape"])
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise StoreFileError(f"{refused} its entry {str(key)[:80]!r} is not a valid tensor entry")


def store_path(url: str) -> Path:
    """The folder a store URL names: a path, or ``file:///path``; ``s3://`` (a bucket, not a folder: see
    :meth:`ModelStore.from_url`) and other schemes are refused with the reason."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme == "s3":
        raise UserError(
            f"GROUNDLABEL_MODEL_STORE={text!r} names an S3-compatible bucket, not a folder "
            "(ModelStore.from_url opens it)"
        )
    if parts.scheme in ("gs", "http", "https"):
        raise UserError(
            f"GROUNDLABEL_MODEL_STORE={text!r}: a store is a folder (a path or file:///path) or an "
            "S3-compatible bucket (s3://bucket/prefix)"
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"GROUNDLABEL_MODEL_STORE={text!r}: a file:// URL names a local folder")
        return Path(unquote(parts.path))
    if parts.scheme and len(parts.scheme) > 1:
        raise UserError(f"GROUNDLABEL_MODEL_STORE={text!r}: unknown scheme {parts.scheme!r}")
    return Path(text).expanduser()


class StoreBackend:
    """Where a store keeps its files: ``<project>/<version>/<file>`` and ``<project>/promoted.json``.

    :class:`ModelStore` holds the rules (names, records, promotion history) and talks to its files only
    through these methods; a folder (:class:`FolderBackend`) and an S3-compatible bucket
    (:class:`S3Backend`) implement them.
    """

    root: Any  # what names the store (a Path, or the s3:// URL)

    def projects(self) -> list[str]:
        """Names of the top-level entries (projects)."""
        raise NotImplementedError

    def version_names(self, project: str) -> list[str]:
        """Names of the project's version entries (complete or not)."""
        raise NotImplementedError

    def read(self, project: str, name: str | None, file: str) -> bytes | None:
        """A version's file (``name`` None: a file of the project itself), or None when it is missing."""
        raise NotImplementedError

    def put_version(self, project: str, name: str, weights: Path, weights_file: str, meta: bytes) -> bool:
        """Write a whole version at once (the weights and ``meta.json``); False when ``name`` is taken, in
        which case nothing of it is changed. A reader never sees the version without its weights."""
        raise NotImplementedError

    def write_pointer(self, project: str, data: bytes) -> None:
        """Replace the project's ``promoted.json`` at once."""
        raise NotImplementedError

    def local_weights(self, project: str, name: str, file: str) -> Path:
        """A local file holding a version's weights."""
        raise NotImplementedError

    def where(self, project: str, name: str | None, file: str) -> str:
        """A file's location, for messages."""
        raise NotImplementedError


class FolderBackend(StoreBackend):
    """A store in a local (or mounted) folder: a version is written into a hidden folder beside the others
    and renamed into place in one step; ``promoted.json`` is replaced by a rename."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, project: str, name: str | None, file: str) -> Path:
        return self.root / project / file if name is None else self.root / project / name / file

    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if p.is_dir()]

    def version_names(self, project: str) -> list[str]:
        folder = self.root / project
        if not folder.is_dir():
            return []
        return [c.name for c in folder.iterdir() if c.is_dir() and not c.name.startswith(".")]

    def read(self, project: str, name: str | None, file: str) -> bytes | None:
        path = self._path(project, name, file)
        return path.read_bytes() if path.is_file() else None

    def put_version(self, project: str, name: str, weights: Path, weights_file: str, meta: bytes) -> bool:
        folder = self.root / project
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / name).exists():
            return False
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=folder))
        try:
            shutil.copyfile(weights, staging / weights_file)
            (staging / META).write_bytes(meta)
            try:
                os.rename(staging, folder / name)  # fails if the name was taken meanwhile
            except OSError:
                if (folder / name).exists():
                    return False
                raise
            return True
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def write_pointer(self, project: str, data: bytes) -> None:
        folder = self.root / project
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{PROMOTED}.{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.replace(tmp, folder / PROMOTED)

    def local_weights(self, project: str, name: str, file: str) -> Path:
        return self._path(project, name, file)

    def where(self, project: str, name: str | None, file: str) -> str:
        return str(self._path(project, name, file))


#: The marker that claims a version's name in a bucket before its files are written (S3 has no rename).
CLAIM = ".claim"


class S3Backend(StoreBackend):
    """A store in an S3-compatible bucket (``s3://bucket/prefix``), through boto3 (``groundlabel[s3]``).

    A version's name is claimed first by a conditional write (``If-None-Match: *``) of ``<version>/.claim``,
    so a second writer of the same name is refused without touching the first one's files; then the
    weights are uploaded, and ``meta.json`` last (conditionally too): a version without its record does not
    exist for readers. ``promoted.json`` is one object, replaced whole. Weights are downloaded once into
    ``cache_dir`` (versions never change).
    """

    def __init__(self, url: str, settings: S3Settings | None = None, client: Any = None) -> None:
        parts = urlsplit(url.strip())
        if parts.scheme != "s3" or not parts.netloc:
            raise UserError(f"GROUNDLABEL_MODEL_STORE={url!r}: an S3 store is named s3://bucket/prefix")
        self.root = url.strip().rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/") + "/" if parts.path.strip("/") else ""
        settings = settings or S3Settings()
        cache = Path(settings.cache_dir).expanduser() if settings.cache_dir else None
        self.cache_dir = cache or Path(tempfile.gettempdir()) / "groundlabel-model-store"
        self.client = client or self._client(settings)

    @staticmethod
    def _client(settings: S3Settings) -> Any:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:
            raise UserError("an s3:// model store needs boto3: pip install 'groundlabel[s3]'") from exc
        return boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            config=Config(
                retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60
            ),
        )

    def _key(self, project: str, name: str | None, file: str) -> str:
        return f"{self.prefix}{project}/{file}" if name is None else f"{self.prefix}{project}/{name}/{file}"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound", "PreconditionFailed", "412"):
                raise
            raise UserError(
                f"model store {self.root}: {what}: {code} {error.get('Message', '')}".strip()
            ) from exc
        except BotoCoreError as exc:
            raise UserError(f"model store {self.root}: {what}: {exc}") from exc

    def _children(self, prefix: str) -> list[str]:
        names: list[str] = []
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call(
                f"listing {prefix or '/'}", self.client.list_objects_v2, Prefix=prefix, Delimiter="/", **extra
            )
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes") or []]
            if not page.get("IsTruncated"):
                return names
            token = page.get("NextContinuationToken")

    def projects(self) -> list[str]:
        return self._children(self.prefix)

    def version_names(self, project: str) -> list[str]:
        return self._children(f"{self.prefix}{project}/")

    def read(self, project: str, name: str | None, file: str) -> bytes | None:
        from botocore.exceptions import ClientError

        key = self._key(project, name, file)
        try:
            return self._call(f"reading {key}", self.client.get_object, Key=key)["Body"].read()
        except ClientError:  # only a missing key reaches here
            return None

    def _put_new(self, key: str, body: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(f"writing {key}", self.client.put_object, Key=key, Body=body, IfNoneMatch="*")
        except ClientError:  # the key exists already
            return False
        return True

    def put_version(self, project: str, name: str, weights: Path, weights_file: str, meta: bytes) -> bool:
        if self.read(project, name, META) is not None:
            return False
        if not self._put_new(self._key(project, name, CLAIM), b""):
            return False
        key = self._key(project, name, weights_file)
        try:
            with open(weights, "rb") as fh:
                self._call(f"uploading {key}", self.client.upload_fileobj, Fileobj=fh, Key=key)
        except (OSError, UserError):
            self._delete(self._key(project, name, CLAIM))
            raise
        if not self._put_new(self._key(project, name, META), meta):
            raise UserError(
                f"model store {self.root}: {name} of project {project} was written by another writer"
            )
        return True

    def _delete(self, key: str) -> None:
        with contextlib.suppress(Exception):  # best effort: a stray claim only makes its name unavailable
            self._call(f"deleting {key}", self.client.delete_object, Key=key)

    def write_pointer(self, project: str, data: bytes) -> None:
        key = self._key(project, None, PROMOTED)
        self._call(
            f"writing {key}", self.client.put_object, Key=key, Body=data, ContentType="application/json"
        )

    def local_weights(self, project: str, name: str, file: str) -> Path:
        local = self.cache_dir / self.bucket / self._key(project, name, file)
        if local.is_file():
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex}")
        key = self._key(project, name, file)
        try:
            with open(tmp, "wb") as fh:
                self._call(f"downloading {key}", self.client.download_fileobj, Key=key, Fileobj=fh)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def where(self, project: str, name: str | None, file: str) -> str:
        return f"s3://{self.bucket}/{self._key(project, name, file)}"


class ModelStore:
    """Trained versions per project and the promotion pointers (see the module docstring), in a folder
    (``ModelStore(path)``) or any :class:`StoreBackend` (``ModelStore(backend=...)``)."""

    def __init__(self, root: str | Path | None = None, *, backend: StoreBackend | None = None) -> None:
        if backend is None:
            if root is None:
                raise ValueError("ModelStore needs a folder or a backend")
            backend = FolderBackend(root)
        self.backend = backend

    @property
    def root(self) -> Any:
        """What names the store: its folder, or its ``s3://`` URL."""
        return self.backend.root

    @classmethod
    def from_url(cls, url: str, s3: S3Settings | None = None) -> ModelStore:
        """The store a ``GROUNDLABEL_MODEL_STORE`` value names (``s3``: an S3 store's endpoint and keys)."""
        if urlsplit(url.strip()).scheme == "s3":
            return cls(backend=S3Backend(url, s3))
        return cls(store_path(url))

    @classmethod
    def from_settings(cls, training: TrainingSettings) -> ModelStore | None:
        """The store the training settings name, or None when none is configured."""
        return cls.from_url(training.model_store, training.s3) if training.model_store else None

    # -- reading -------------------------------------------------------------------------------------

    def projects(self) -> list[str]:
        """Projects with at least one version (entries that are not canonical project ids are ignored)."""
        names = [p for p in self.backend.projects() if _is_project_name(p)]
        return sorted(names, key=int)

    def _json(self, project: str, name: str | None, file: str) -> Any:
        """A JSON file of the store, parsed (None when it is missing); :class:`StoreFileError` otherwise."""
        raw = self.backend.read(project, name, file)
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            where = self.backend.where(project, name, file)
            raise StoreFileError(f"{where} is not valid JSON: {exc}") from exc

    def _record(self, project: str, name: str) -> ModelVersion | None:
        data = self._json(project, name, META)
        if data is None:
            return None
        return parse_record(data, project, name, self.backend.where(project, name, META))

    def versions(self, project: str | int) -> list[ModelVersion]:
        """The project's versions, oldest first."""
        project = check_project(project)
        out = []
        for name in self.backend.version_names(project):
            if not is_version_name(name):
                continue
            record = self._record(project, name)
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda v: (v.number, v.created_at))

    def get(self, project: str | int, name: str) -> ModelVersion:
        """One version by name; :class:`UserError` naming the versions there are when it is missing."""
        check_version_name(name)
        record = self._record(check_project(project), name)
        if record is None:
            known = ", ".join(v.name for v in self.versions(project)) or "none"
            raise UserError(f"project {project} has no version {name!r} (versions: {known})")
        return record

    def weights_path(self, version: ModelVersion) -> Path:
        """A local file holding the weights of ``version`` (downloaded once from a bucket), checked to be a
        safetensors file (:func:`check_safetensors`); :class:`StoreFileError` saying why otherwise."""
        project = check_project(version.project)
        check_version_name(version.name)
        where = self.backend.where(project, version.name, version.weights)
        if version.weights != WEIGHTS:
            raise StoreFileError(
                f"refused to load {where}: the model store's weights are read only as safetensors "
                f"({WEIGHTS}); this version was stored in another form (train the project again)"
            )
        path = self.backend.local_weights(project, version.name, WEIGHTS)
        check_safetensors(path, where)
        return path

    def calibration(self, version: ModelVersion) -> Calibration:
        """The choices of a ``calibration`` version, read from its JSON file and checked
        (:func:`groundlabel.calibration.parse_calibration`); :class:`StoreFileError` saying why otherwise."""
        project = check_project(version.project)
        check_version_name(version.name)
        where = self.backend.where(project, version.name, CALIBRATION_FILE)
        if version.kind != "calibration":
            raise StoreFileError(f"{version.name} of project {project} is a {version.kind} version")
        raw = self.backend.read(project, version.name, CALIBRATION_FILE)
        if raw is None:
            raise StoreFileError(f"{where} is missing")
        try:
            return read_calibration(raw, where)
        except StoreFileError:
            raise
        except UserError as exc:
            raise StoreFileError(str(exc)) from exc

    def _pointer(self, project: str | int) -> dict[str, Any]:
        project = check_project(project)
        data = self._json(project, None, PROMOTED)
        if data is None:
            return {"version": None, "history": []}
        return parse_pointer(data, self.backend.where(project, None, PROMOTED))

    def promoted_name(self, project: str | int) -> str | None:
        """The name of the version the project serves, or None (the base models)."""
        return self._pointer(project)["version"]

    def promoted(self, project: str | int) -> ModelVersion | None:
        """The version the project serves, or None (the base models)."""
        name = self.promoted_name(project)
        return self.get(project, name) if name else None

    def served_trained(self, project: str | int) -> ModelVersion | None:
        """The trained version (``lavt`` or ``gem``) the project serves: the promoted one, or the one a
        promoted calibration was made over; None for the base models."""
        version = self.promoted(project)
        if version is not None and version.kind == "calibration":
            trained = self.calibration(version).trained
            version = self.get(project, trained) if trained else None
        return version

    def history(self, project: str | int) -> list[dict[str, Any]]:
        """Every promotion of the project, oldest first (``version`` None: back to the base models)."""
        return self._pointer(project)["history"]

    # -- writing -------------------------------------------------------------------------------------

    def next_name(self, project: str | int, kind: str, variant: str) -> str:
        """The next free version name of the project: past every number taken, by a version or by the
        remains of one whose writer stopped half-way (a name is never reused)."""
        project = check_project(project)
        names = [n for n in self.backend.version_names(project) if not n.startswith(".")]
        numbers = [int(m.group(1)) for m in map(_NUMBER.search, names) if m]
        return check_version_name(f"{kind}-{variant}-p{project}-v{max(numbers, default=0) + 1}")

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
        """Store a new version holding a copy of ``weights`` (a safetensors file; for a ``calibration``, its
        JSON file); returns its record (never overwrites)."""
        project = check_project(project)
        if kind not in KINDS:
            raise UserError(f"a version's kind is one of {', '.join(KINDS)}, not {kind!r}")
        source = Path(weights)
        if not source.is_file():
            raise UserError(f"weights {source} do not exist")
        if kind == "calibration":
            read_calibration(source.read_bytes(), str(source))  # refused unless it is one
        else:
            try:
                check_safetensors(source)
            except StoreFileError as exc:
                raise UserError(
                    f"a version's weights must be a safetensors file: {source} is not one"
                ) from exc
        target_name = CALIBRATION_FILE if kind == "calibration" else WEIGHTS
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
            meta = json.dumps(version.to_dict(), indent=2).encode("utf-8")
            if self.backend.put_version(project, version.name, source, target_name, meta):
                return version
        raise UserError(f"could not find a free version name for project {project} in {self.root}")

    def _write_pointer(self, project: str, pointer: dict[str, Any]) -> None:
        self.backend.write_pointer(project, json.dumps(pointer, indent=2).encode("utf-8"))

    def promote(self, project: str | int, name: str | None, reason: str, *, rollback: bool = False) -> None:
        """Serve ``name`` for the project from now on (None: the base models); recorded in the history.
        The version must exist and its record be valid."""
        project = check_project(project)
        if name is not None:
            self.get(project, check_version_name(name))
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


def _is_project_name(name: str) -> bool:
    try:
        return project_id(name) == name
    except ValueError:
        return False


def _metric(value: Any) -> float | None:
    """A metric read from a record: a number, else None."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


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
        "heldout_oIoU": _metric(new.get("oIoU")),  # LAVT versions
        "parent_heldout_oIoU": _metric(base.get("oIoU")),
        "heldout_mIoU": _metric(new.get("mIoU")),  # GEM: percent, eval-gem's protocol; LAVT: its mIoU
        "parent_heldout_mIoU": _metric(base.get("mIoU")),
        "promoted": version.name == promoted,
    }
