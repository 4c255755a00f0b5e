"""Request bodies of Label Studio's ML backend protocol, validated with pydantic.

Unknown fields are kept and ignored (Label Studio adds fields between releases); the fields groundlabel
relies on are checked, so a malformed request gets a 422 naming the field rather than a 500. Project ids
are canonical from here on (:func:`groundlabel.ls_format.project_id`): ``"41.1712345678"`` and ``41`` are
project ``"41"``; ``"0041"``, ``"4_1"``, ``true``, ``null`` or ``10**30`` get a 422.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from groundlabel.ls_format import project_id

WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def optional_project(value: Any) -> str | None:
    """A request's project field: None when absent or empty, else its canonical id (``ValueError``)."""
    if value is None or value == "":
        return None
    return project_id(value)


class TaskIn(_Open):
    """One task as Label Studio serialises it (``TaskSimpleSerializer``)."""

    id: int
    data: dict[str, Any]


class ContextRegion(_Open):
    """One region of an interactive request's ``context.result``."""

    type: str
    value: dict[str, Any] = Field(default_factory=dict)
    from_name: str | None = None
    to_name: str | None = None
    original_width: float | None = None
    original_height: float | None = None
    is_positive: bool | None = None


class Context(_Open):
    """The ``context`` of an interactive request (smart tools, a typed text prompt)."""

    result: list[ContextRegion] = Field(default_factory=list)


class PredictParams(_Open):
    """``params`` of ``/predict``: Label Studio's ``login`` / ``password``, the interactive ``context``."""

    context: Context | None = None


class PredictRequest(_Open):
    """``POST /predict``."""

    tasks: list[TaskIn] = Field(min_length=1)
    label_config: str | None = None
    project: str | None = None
    params: PredictParams | None = None
    hostname: str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> str | None:
        return optional_project(value)


class SetupRequest(_Open):
    """``POST /setup``: the label config arrives as ``schema``; ``extra_params`` may be a JSON string."""

    project: str | None = None
    label_schema: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: dict[str, Any] | str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> str | None:
        return optional_project(value)


class WebhookRegion(_Open):
    """One region of an annotation in a webhook event."""

    type: str | None = None
    value: dict[str, Any] = Field(default_factory=dict)


class WebhookAnnotation(_Open):
    """The annotation of an ``ANNOTATION_*`` event; its ``result`` must be a list of regions."""

    result: list[WebhookRegion] = Field(default_factory=list)


class WebhookProject(_Open):
    """The project of a webhook event; its ``id``, when present, is a canonical project id."""

    id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _canonical_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "id" in data:
            return {**data, "id": project_id(data["id"])}
        return data


class WebhookRequest(_Open):
    """``POST /webhook``: a Label Studio event."""

    action: str
    project: WebhookProject | None = None
    annotation: WebhookAnnotation | None = None
    task: dict[str, Any] | None = None


class TrainRequest(_Open):
    """``POST /train``: Label Studio's older *Start Training* call (the annotated tasks are not needed: the
    training job reads the project through Label Studio's API, as the exporters do)."""

    project: str | None = None
    label_config: str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> str | None:
        return optional_project(value)


class JobStatusRequest(_Open):
    """``POST /job_status``: the training job Label Studio asks about (and its project, when sent)."""

    job: str = Field(min_length=1, max_length=128)
    project: str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_id(cls, value: Any) -> str | None:
        return optional_project(value)
