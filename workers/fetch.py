"""Fetching a task's image for a worker, safely, through :mod:`groundlabel.ls_access`.

Where an image URL leads, and with which credentials:

- ``/data/upload/...`` and other paths relative to Label Studio, and absolute URLs on the configured
  Label Studio's origin: downloaded from Label Studio with its token (:class:`LabelStudioAuth`: a legacy
  token as ``Authorization: Token ...``, a personal access token exchanged at ``/api/token/refresh/``
  for a cached access token sent as ``Authorization: Bearer ...``). ``/data/upload/...`` is read from
  ``upload_root`` first when the settings name one (:func:`groundlabel.ls_access.upload_paths`).
- ``/data/local-files/?d=REL``: read from ``LOCAL_FILES_DOCUMENT_ROOT`` when the file exists there
  (a path leaving the root is refused: :func:`groundlabel.ls_access.local_files_path`), otherwise
  downloaded from Label Studio as above.
- ``s3://``, ``gs://``, ``azure-blob://`` URIs: Label Studio presigns them
  (``/tasks/{id}/presign/?fileuri=<base64>``, with the token) and redirects to the storage; the token
  never follows that redirect.
- plain ``http(s)://`` URLs: only from hosts listed in ``GROUNDLABEL_ALLOWED_HOSTS``. Host names are
  resolved first; private, loopback, link-local and other non-global addresses are refused unless the
  host is listed explicitly (not through a ``*`` or ``*.domain`` pattern). Redirects are followed by
  hand, each hop checked again (:func:`groundlabel.ls_access.check_hop`).

Downloads stream with a byte limit and a total deadline (``GROUNDLABEL_FETCH_TOTAL_TIMEOUT``, and never
past the job's own deadline: ``deadline=``), then go through
:func:`workers.images.decode_image` (RGB, EXIF orientation, pixel limits). Every failure raises
:class:`FetchError` naming the URL (without credentials or query secrets) and the reason. Tokens are
never logged nor put in error messages.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from groundlabel.errors import UserError
from groundlabel.ls_access import (
    CLOUD_SCHEMES,
    FetchError,
    FetchSettings,
    download_bytes,
    is_local_files_url,
    is_upload_url,
    local_files_path,
    upload_paths,
)

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["FetchError", "FetchSettings", "fetch_bytes", "fetch_image"]


def _read_file(url: str, path: Path, settings: FetchSettings) -> bytes:
    size = path.stat().st_size
    if size > settings.max_bytes:
        raise FetchError(url, f"too large: {size} bytes, the limit is {settings.max_bytes} bytes")
    return path.read_bytes()


def _data_uri(url: str, settings: FetchSettings) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise FetchError(url[:40], "only base64 data: URIs are supported")
    if len(payload) * 3 // 4 > settings.max_bytes:
        raise FetchError(url[:40], f"too large: the limit is {settings.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except ValueError as exc:
        raise FetchError(url[:40], f"invalid base64 data: {exc}") from exc


def _local_copy(url: str, settings: FetchSettings) -> Path | None:
    """The local file behind a Label Studio-relative URL, when the settings name a folder holding it."""
    if is_local_files_url(url):
        path = local_files_path(url, settings.local_files_root)
        return path if path is not None and path.is_file() else None
    if is_upload_url(url):
        return next((p for p in upload_paths(url, settings.upload_root) if p.is_file()), None)
    return None


def presign_url(label_studio_url: str, task_id: int, uri: str) -> str:
    """Label Studio's presign address for a cloud ``uri``: ``fileuri`` is URL-safe base64, as Label
    Studio itself writes it and decodes it (``urlsafe_b64decode``), and quoted (its ``=`` padding)."""
    fileuri = quote(base64.urlsafe_b64encode(uri.encode()).decode(), safe="")
    return f"{label_studio_url}/tasks/{int(task_id)}/presign/?fileuri={fileuri}"


def within_deadline(url: str, settings: FetchSettings, deadline: float | None) -> FetchSettings:
    """``settings`` whose timeouts end by ``deadline`` (Unix time); FetchError when it has passed."""
    if deadline is None:
        return settings
    left = deadline - time.time()
    if left <= 0:
        raise FetchError(url, "the job's deadline passed before this image was fetched")
    return dataclasses.replace(
        settings,
        total_timeout=min(settings.total_timeout, left),
        read_timeout=min(settings.read_timeout, left),
        connect_timeout=min(settings.connect_timeout, left),
    )


def fetch_bytes(
    url: str,
    *,
    task_id: int | None = None,
    settings: FetchSettings | None = None,
    label_studio_url: str | None = None,
    deadline: float | None = None,
) -> bytes:
    """The raw bytes behind a task's image URL, following the rules of this module.

    ``deadline`` (Unix time, the job's) bounds every timeout of the download.
    """
    settings = settings or FetchSettings()
    settings = settings.with_request_url(label_studio_url)
    if not isinstance(url, str) or not url.strip():
        raise FetchError(str(url), "the task has no image URL")
    settings = within_deadline(url.strip()[:200], settings, deadline)
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()

    if scheme == "data":
        return _data_uri(url, settings)

    if scheme in CLOUD_SCHEMES:
        if not settings.label_studio_url:
            raise FetchError(url, "cloud storage URIs are presigned by Label Studio: set LABEL_STUDIO_URL")
        if task_id is None:
            raise FetchError(url, "cloud storage URIs need the task id for Label Studio's presign endpoint")
        return download_bytes(presign_url(settings.label_studio_url, task_id, url), settings)

    if scheme in ("http", "https"):
        return download_bytes(url, settings)

    if scheme == "" and url.startswith("/"):
        local = _local_copy(url, settings)
        if local is not None:
            return _read_file(url, local, settings)
        if not settings.label_studio_url:
            raise FetchError(
                url,
                "the URL is relative to Label Studio but LABEL_STUDIO_URL is not set"
                + ("" if settings.local_files_root else " (nor LOCAL_FILES_DOCUMENT_ROOT)"),
            )
        return download_bytes(settings.label_studio_url + url, settings)

    raise FetchError(url, f"unsupported image URL (scheme {scheme or 'none'!r})")


def fetch_image(
    url: str,
    *,
    task_id: int | None = None,
    settings: FetchSettings | None = None,
    label_studio_url: str | None = None,
    deadline: float | None = None,
) -> Image.Image:
    """Fetch and decode a task's image (RGB, EXIF orientation applied), by ``deadline`` if given.

    ``label_studio_url`` is the Label Studio URL that came with the request, if any; it is used only
    when ``LABEL_STUDIO_URL`` is not set, and only on an allowed host, without the token (see
    :meth:`FetchSettings.with_request_url`).
    Raises :class:`FetchError` (a :class:`~groundlabel.errors.UserError`) with the reason.
    """
    from workers.images import decode_image

    settings = settings or FetchSettings()
    data = fetch_bytes(
        url, task_id=task_id, settings=settings, label_studio_url=label_studio_url, deadline=deadline
    )
    kwargs: dict[str, int] = {"max_bytes": settings.max_bytes}
    if settings.max_pixels is not None:
        kwargs["max_pixels"] = settings.max_pixels
    try:
        return decode_image(data, **kwargs)
    except FetchError:
        raise
    except UserError as exc:
        raise FetchError(url, str(exc)) from exc
