"""A small wrapper over label-studio-sdk: one client, clear errors, the few calls groundlabel makes.

:func:`make_client` builds a :class:`label_studio_sdk.LabelStudio` from a URL and a key (an option's
value, or the settings' ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``). The key may be a legacy token
(sent as ``Authorization: Token``) or a personal access token, a JWT refresh token that the SDK exchanges at
``/api/token/refresh/`` for short-lived access tokens and refreshes when they expire.

Every call goes through :func:`api_call`, which turns SDK and network exceptions into
:class:`~groundlabel.errors.UserError` with the reason (a refused token, a missing project, an unreachable
server) and never puts the key in a message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from groundlabel.errors import UserError

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

T = TypeVar("T")

TOKEN_REFUSED = (
    "Label Studio refused the API key (check LABEL_STUDIO_API_KEY: a legacy token needs legacy tokens "
    "enabled in the organisation, or use a personal access token)"
)


class LabelStudioError(UserError):
    """A Label Studio API call failed; the message says which call and why."""

    def __init__(self, what: str, reason: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(f"Label Studio: {what}: {reason}")


def _reason(exc: Exception) -> tuple[str, int | None]:
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, ApiError):
        status = exc.status_code
        if status in (401, 403):
            return f"{TOKEN_REFUSED} (HTTP {status})", status
        body = exc.body
        if isinstance(body, dict):
            detail = body.get("validation_errors") or body.get("detail") or body
        elif isinstance(body, str) and body.lstrip()[:1] == "<":
            detail = "not found" if status == 404 else "(an HTML page)"  # Label Studio's error pages
        else:
            detail = body
        text = " ".join(str(detail).split())
        if len(text) > 300:
            text = text[:300] + "..."
        return f"HTTP {status}: {text}", status
    if isinstance(exc, httpx.TimeoutException):
        return "timed out", None
    if isinstance(exc, httpx.HTTPError):
        return f"cannot reach the server ({type(exc).__name__}: {exc})", None
    return f"{type(exc).__name__}: {exc}", None


def api_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one SDK call; turn its failure into :class:`LabelStudioError` naming ``what``."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    try:
        return fn(*args, **kwargs)
    except (ApiError, httpx.HTTPError) as exc:
        reason, status = _reason(exc)
        raise LabelStudioError(what, reason, status) from exc


def resolve_url(url: str | None = None) -> str:
    """The Label Studio URL checked: with its scheme, no trailing slash; a clear error when missing."""
    url = (url or "").strip()
    if not url:
        raise UserError(
            "no Label Studio URL: pass --url or set LABEL_STUDIO_URL (e.g. http://localhost:8080)"
        )
    if not url.startswith(("http://", "https://")):
        raise UserError(f"the Label Studio URL must include the scheme, e.g. http://{url}; got {url!r}")
    return url.rstrip("/")


def resolve_api_key(api_key: str | None = None) -> str:
    """The API key checked (a legacy token or a personal access token); a clear error when missing."""
    key = (api_key or "").strip()
    if not key:
        raise UserError(
            "no Label Studio API key: pass --api-key or set LABEL_STUDIO_API_KEY (a personal access token "
            "from Account & Settings, or a legacy token)"
        )
    return key


def make_client(url: str | None = None, api_key: str | None = None, *, timeout: float = 120.0) -> LabelStudio:
    """A Label Studio SDK client for ``url`` with ``api_key`` (the settings' ``LABEL_STUDIO_URL`` and
    ``LABEL_STUDIO_API_KEY`` when the caller takes them from there)."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    base_url = resolve_url(url)
    key = resolve_api_key(api_key)
    try:
        # The SDK joins "api/token/refresh/" onto the base URL: keep a trailing slash for sub-paths.
        return LabelStudio(base_url=base_url + "/", api_key=key, timeout=timeout)
    except ApiError as exc:  # an expired or malformed personal access token is refused at construction
        reason, status = _reason(exc)
        detail = exc.body.get("detail") if isinstance(exc.body, dict) else None
        raise LabelStudioError("the API key", str(detail or reason), status) from exc


def get_project(client: LabelStudio, project_id: int) -> Any:
    """The project (with its ``label_config``), or a clear error when it does not exist."""
    try:
        return api_call(f"reading project {project_id}", client.projects.get, id=project_id)
    except LabelStudioError as exc:
        if exc.status == 404:
            raise LabelStudioError(f"project {project_id}", "no such project", 404) from exc
        raise


#: The task fields groundlabel reads: enough to plan a run without downloading every prediction's regions.
TASK_FIELDS = "id,data,predictions_model_versions"


def iter_tasks(
    client: LabelStudio, project_id: int, *, include: str | None = TASK_FIELDS, page_size: int = 100
) -> Iterator[dict[str, Any]]:
    """Every task of the project as a plain dict, in id order.

    ``include`` limits the fields (default: id, data and the model versions of its predictions);
    ``None`` returns everything, predictions with their regions included.
    """
    kwargs: dict[str, Any] = {"project": project_id, "fields": "all", "page_size": page_size}
    if include:
        kwargs["include"] = include
    what = f"listing the tasks of project {project_id}"
    iterator = iter(api_call(what, client.tasks.list, **kwargs))
    while True:
        try:
            task = api_call(what, next, iterator)
        except StopIteration:
            return
        yield task.dict() if hasattr(task, "dict") else dict(task)


def has_prediction_version(task: dict[str, Any], model_version: str) -> bool:
    """Whether a listed task holds a prediction whose ``model_version`` is exactly ``model_version``."""
    listed = task.get("predictions_model_versions")
    # Label Studio joins the distinct versions with commas; compare whole items.
    if isinstance(listed, str) and listed and f",{model_version}," in f",{listed},":
        return True
    for prediction in task.get("predictions") or []:
        if isinstance(prediction, dict) and prediction.get("model_version") == model_version:
            return True
    return False


def push_predictions(client: LabelStudio, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
    """Store predictions (``{"task", "result", "score", "model_version"}``) in one request; the count."""
    from label_studio_sdk import PredictionRequest

    if not predictions:
        return 0
    request = [
        PredictionRequest(
            task=int(p["task"]),
            result=list(p.get("result") or []),
            score=p.get("score"),
            model_version=p.get("model_version"),
        )
        for p in predictions
    ]
    response = api_call(
        f"importing {len(request)} prediction(s) into project {project_id}",
        client.projects.import_predictions,
        id=project_id,
        request=request,
    )
    created = getattr(response, "created", None)
    return int(created) if created is not None else len(request)


def prediction_ids(client: LabelStudio, task_id: int, model_version: str) -> list[int]:
    """The ids of the task's predictions whose ``model_version`` is ``model_version``."""
    predictions = api_call(
        f"listing the predictions of task {task_id}", client.predictions.list, task=task_id
    )
    return [int(p.id) for p in predictions if p.model_version == model_version and p.id is not None]


def list_predictions(
    client: LabelStudio, *, project_id: int | None = None, task_id: int | None = None
) -> list[dict[str, Any]]:
    """The predictions (with their regions) of a project or of one task, as plain dicts, in one request."""
    if (project_id is None) == (task_id is None):
        raise ValueError("list_predictions needs exactly one of project_id and task_id")
    what = f"listing the predictions of {'project' if task_id is None else 'task'} {project_id or task_id}"
    predictions = api_call(what, client.predictions.list, project=project_id, task=task_id)
    return [p.dict() if hasattr(p, "dict") else dict(p) for p in predictions]


def delete_predictions(client: LabelStudio, ids: Sequence[int]) -> None:
    """Delete predictions by id."""
    for prediction_id in ids:
        api_call(f"deleting prediction {prediction_id}", client.predictions.delete, id=prediction_id)
