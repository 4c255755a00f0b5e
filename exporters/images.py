"""Finding a task's image and putting it into the dataset folder (copy, link, or not at all).

Where an image reference leads (the rules are :mod:`groundlabel.ls_access`'s, shared with the workers):

- ``/data/local-files/?d=REL``: ``IMAGES_ROOT/REL`` (``IMAGES_ROOT`` = Label Studio's
  ``LOCAL_FILES_DOCUMENT_ROOT``); a path leaving the root is refused.
- ``/data/upload/REST`` (Label Studio uploads): ``IMAGES_ROOT/REST``, then ``IMAGES_ROOT/upload/REST``,
  then ``IMAGES_ROOT/media/upload/REST`` (``IMAGES_ROOT`` may be the upload folder, the media folder or
  Label Studio's data folder).
- When the file is not found locally and a Label Studio URL is known, both are downloaded from Label
  Studio with the token (a legacy token, or a personal access token exchanged for an access token).
- ``http(s)://`` URLs: downloaded. The URL itself is the export's, so any host is fetched; every
  redirect is checked as the workers check it (Label Studio, ``allowed_hosts``, or one hop that Label
  Studio itself chose; non-public addresses only when listed explicitly). The token goes only to the
  Label Studio origin.
- anything else is a local path, absolute or relative to ``IMAGES_ROOT`` (or the working folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

from groundlabel.errors import UserError
from groundlabel.ls_access import (
    FetchError,
    FetchSettings,
    download_file,
    is_local_files_url,
    is_upload_url,
    local_files_path,
    normalise_base_url,
    upload_paths,
)

IMAGE_MODES = ("copy", "link", "none")
#: The largest image the exporters download, in bytes.
DOWNLOAD_LIMIT = 200 * 1024 * 1024
#: How long one image download may take in all, in seconds.
DOWNLOAD_DEADLINE = 900.0


class ImageNotFound(UserError):
    """A task's image could not be found or fetched; the message says where we looked."""


def _safe_join(root: Path, rel: str) -> Path:
    rel = unquote(rel).lstrip("/")
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ImageNotFound(f"{rel!r} leaves the images root")
    return path


def image_file_name(ref: str) -> str:
    """The file name an image reference points to (its last path component, no query)."""
    parts = urlsplit(ref)
    if parts.path.rstrip("/").endswith("/data/local-files"):
        d = parse_qs(parts.query).get("d", [""])[0]
        return PurePosixPath(unquote(d)).name or "image"
    name = PurePosixPath(unquote(parts.path)).name if parts.scheme or ref.startswith("/") else Path(ref).name
    return name or "image"


@dataclass
class ImageResolver:
    """Locates, downloads and measures task images.

    ``allowed_hosts`` (a sequence or a comma-separated string of ``host``, ``host:port``, ``*.domain``
    or ``*``): hosts that redirects may lead to, besides Label Studio.
    """

    images_root: str | Path | None = None
    label_studio_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    allowed_hosts: Sequence[str] | str = ()
    timeout: float = 60.0
    _settings: FetchSettings | None = field(default=None, repr=False)
    _tmp: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images_root is not None:
            self.images_root = Path(self.images_root)
            if not self.images_root.is_dir():
                raise UserError(f"--images-root {self.images_root} is not a folder")
        if self.label_studio_url:
            self.label_studio_url = self.label_studio_url.rstrip("/")

    # -- locating ----------------------------------------------------------------------------------

    def local_candidates(self, ref: str) -> list[Path]:
        """Local files the reference may be, in the order they are tried."""
        parts = urlsplit(ref)
        root = self.images_root
        try:
            if is_local_files_url(ref):
                path = local_files_path(ref, root)
                return [path] if path is not None else []
            if is_upload_url(ref):
                return upload_paths(ref, root)
        except FetchError as exc:
            raise ImageNotFound(str(exc)) from exc
        if parts.scheme in ("http", "https"):
            return []
        if parts.scheme and len(parts.scheme) > 1:  # s3://, gs:// ... (a Windows drive letter is 1 char)
            return []
        path = Path(unquote(ref))
        if path.is_absolute():
            return [path]
        return [_safe_join(root, ref)] if root else [path.resolve()]

    def locate(self, ref: str) -> Path | None:
        """The local file for ``ref``, or None when it must be downloaded."""
        for path in self.local_candidates(ref):
            if path.is_file():
                return path
        return None

    def _download_url(self, ref: str) -> tuple[str, bool]:
        """``(absolute URL, written in the export)`` for a reference that is not a local file."""
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https"):
            return ref, True
        if parts.scheme and len(parts.scheme) > 1:
            raise ImageNotFound(
                f"{parts.scheme}:// images are not read directly: export with --images none, or copy the "
                "files locally and pass --images-root"
            )
        if ref.startswith("/data/") and self.label_studio_url:
            return self.label_studio_url + ref, False
        raise ImageNotFound(
            f"not found locally ({self._where(ref)}) and no Label Studio URL to download from"
        )

    def _where(self, ref: str) -> str:
        cands = self.local_candidates(ref)
        if not cands:
            return "no --images-root given" if self.images_root is None else "no local candidate"
        return "looked at " + ", ".join(str(c) for c in cands[:3])

    def fetch_settings(self) -> FetchSettings:
        """The download settings: Label Studio and its key, ``allowed_hosts``, :data:`DOWNLOAD_LIMIT`."""
        if self._settings is None:
            hosts = (
                self.allowed_hosts.split(",") if isinstance(self.allowed_hosts, str) else self.allowed_hosts
            )
            self._settings = FetchSettings(
                label_studio_url=normalise_base_url(self.label_studio_url, "--url"),
                api_key=self.api_key,
                allowed_hosts=tuple(hosts),
                max_bytes=DOWNLOAD_LIMIT,
                connect_timeout=self.timeout,
                read_timeout=self.timeout,
                total_timeout=DOWNLOAD_DEADLINE,
                hosts_setting="--allowed-hosts",
            )
        return self._settings

    def download(self, ref: str, dest: Path) -> None:
        """Download ``ref`` to ``dest`` (every redirect checked; the token only to Label Studio)."""
        url, user_chosen = self._download_url(ref)
        try:
            download_file(url, dest, self.fetch_settings(), user_chosen=user_chosen)
        except FetchError as exc:
            raise ImageNotFound(str(exc)) from exc

    def _scratch(self) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="groundlabel-export-"))
        return self._tmp

    def obtain(self, ref: str) -> Path:
        """A local file holding the image (downloaded to a scratch folder when needed)."""
        path = self.locate(ref)
        if path is not None:
            return path
        dest = self._scratch() / f"{abs(hash(ref))}_{image_file_name(ref)}"
        if not dest.exists():
            self.download(ref, dest)
        return dest

    def place(self, ref: str, dest: Path, mode: str) -> None:
        """Put the image at ``dest``: ``copy`` the file, ``link`` it (symlink; downloads are copied)."""
        if mode == "none":
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists() or dest.is_symlink():
            dest.unlink()
        path = self.locate(ref)
        if path is None:
            self.download(ref, dest)
        elif mode == "link":
            os.symlink(path.resolve(), dest)
        else:
            shutil.copyfile(path, dest)

    def size(self, ref: str) -> tuple[int, int]:
        """``(width, height)`` read from the image header (EXIF rotation applied like Label Studio)."""
        from PIL import Image, UnidentifiedImageError

        path = self.obtain(ref)
        try:
            with Image.open(path) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
        except (OSError, UnidentifiedImageError) as exc:
            raise ImageNotFound(f"{path} is not a readable image: {exc}") from exc
        return (height, width) if orientation in (5, 6, 7, 8) else (width, height)

    def close(self) -> None:
        """Remove downloaded scratch files."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
