"""Request bodies of Label Studio's ML backend protocol, validated with pydantic.

Unknown fields are kept and ignored (Label Studio adds fields between releases); the fields groundlabel
relies on are checked, so a malformed request gets a 422 naming the field rather than a 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

WEBHOOK_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


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
    def _project_text(cls, value: Any) -> Any:
        return None if value is None else str(value)


class SetupRequest(_Open):
    """``POST /setup``: the label config arrives as ``schema``; ``extra_params`` may be a JSON string."""

    project: str | None = None
    label_schema: str | None = Field(default=None, alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: dict[str, Any] | str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_text(cls, value: Any) -> Any:
        return None if value is None else str(value)


class WebhookRegion(_Open):
    """One region of an annotation in a webhook event."""

    type: str | None = None
    value: dict[str, Any] = Field(default_factory=dict)


class WebhookAnnotation(_Open):
    """The annotation of an ``ANNOTATION_*`` event; its ``result`` must be a list of regions."""

    result: list[WebhookRegion] = Field(default_factory=list)


class WebhookRequest(_Open):
    """``POST /webhook``: a Label Studio event."""

    action: str
    project: dict[str, Any] | None = None
    annotation: WebhookAnnotation | None = None
    task: dict[str, Any] | None = None


class TrainRequest(_Open):
    """``POST /train``: Label Studio's older *Start Training* call (the annotated tasks are not needed: the
    training job reads the project through Label Studio's API, as the exporters do)."""

    project: str | None = None
    label_config: str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project_text(cls, value: Any) -> Any:
        return None if value is None else str(value)


class JobStatusRequest(_Open):
    """``POST /job_status``: the training job Label Studio asks about."""

    job: str = Field(min_length=1, max_length=128)
