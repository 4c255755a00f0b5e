"""Backend and worker settings, read from environment variables only (secrets never come from files or flags).

Every variable is documented in ``docs/backend.md``. :func:`Settings.from_env` raises
:class:`~groundlabel.errors.UserError` naming the variable when a value is malformed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from groundlabel.errors import UserError
from workers.engines import gem_options_from_env
from workers.models.gem.config import GemConfig
from workers.models.gem.weights import weights_label

QUEUE_INTERACTIVE = "interactive"
QUEUE_BATCH = "batch"


def _env_str(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None:
        return default
    value = value.strip()
    return value or default


def _env_float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = _env_str(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as exc:
        raise UserError(f"{name}={raw!r} is not a number") from exc
    if value < minimum:
        raise UserError(f"{name}={raw!r} must be >= {minimum:g}")
    return value


def _env_int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = _env_str(env, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise UserError(f"{name}={raw!r} is not an integer") from exc
    if value < minimum:
        raise UserError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _env_str(env, name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise UserError(f"{name}={raw!r} must be true or false")


def _env_floats(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = _env_str(env, name)
    if raw is None:
        return default
    try:
        values = tuple(float(v) for v in raw.split(",") if v.strip())
    except ValueError as exc:
        raise UserError(f"{name}={raw!r} must be comma-separated numbers of seconds") from exc
    if not values or min(values) < 0:
        raise UserError(f"{name}={raw!r} must be one or more non-negative numbers of seconds")
    return values


def model_version_from_env(env: Mapping[str, str] | None = None) -> str:
    """The model version the backend announces, computed without loading any model.

    ``GROUNDLABEL_MODEL_VERSION`` wins. Otherwise the GEM engine's own name for the configured options
    (``GemConfig.model_version``: ``gem-<model>-<weights>`` plus a suffix per non-default option), followed by
    ``+lavt-<checkpoint stem>`` when a LAVT checkpoint is configured. Label Studio skips tasks
    that already hold a prediction of this version: change it (or the weights) to re-run a project.
    """
    env = os.environ if env is None else env
    explicit = _env_str(env, "GROUNDLABEL_MODEL_VERSION")
    if explicit:
        return explicit
    options = gem_options_from_env(env)
    weights = weights_label(options.get("pretrained", GemConfig.pretrained))
    version = GemConfig(**options).model_version(weights)
    lavt = _env_str(env, "GROUNDLABEL_LAVT_CHECKPOINT")
    if lavt:
        version += f"+lavt-{Path(lavt).stem}"
    return version


@dataclass(frozen=True)
class Settings:
    """Everything the backend process needs; see ``docs/backend.md`` for each variable."""

    redis_url: str | None = None
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    model_version: str = "gem-ViT-B-16-openai"
    predict_timeout: float = 85.0  # below Label Studio's 100 s ML_TIMEOUT_PREDICT
    interactive_timeout: float = 30.0
    job_timeout: int = 900  # seconds one batch job may run on a worker
    interactive_job_timeout: int = 120
    job_retries: int = 2
    retry_intervals: tuple[float, ...] = (2.0, 10.0)
    result_ttl: int = 7 * 24 * 3600  # the per-task result cache
    job_result_ttl: int = 3600
    failure_ttl: int = 24 * 3600
    chunk_size: int = 8  # tasks per job: one GEM batch
    max_tasks: int = 10_000
    workers_inprocess: int = 1
    poll_interval: float = 0.02
    redis_timeout: float = 3.0
    worker_heartbeat: float = 5.0  # a worker renews its job lease this often (seconds)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every setting from ``env`` (default ``os.environ``), then apply keyword overrides."""
        env = os.environ if env is None else env
        hosts = tuple(h.strip() for h in (_env_str(env, "GROUNDLABEL_ALLOWED_HOSTS", "") or "").split(","))
        values: dict[str, object] = dict(
            redis_url=_env_str(env, "REDIS_URL"),
            label_studio_url=_env_str(env, "LABEL_STUDIO_URL"),
            label_studio_api_key=_env_str(env, "LABEL_STUDIO_API_KEY"),
            allowed_hosts=tuple(h for h in hosts if h),
            basic_auth_user=_env_str(env, "BASIC_AUTH_USER"),
            basic_auth_pass=_env_str(env, "BASIC_AUTH_PASS"),
            api_token=_env_str(env, "GROUNDLABEL_API_TOKEN"),
            metrics_public=_env_bool(env, "GROUNDLABEL_METRICS_PUBLIC", False),
            model_version=model_version_from_env(env),
            predict_timeout=_env_float(env, "GROUNDLABEL_PREDICT_TIMEOUT", 85.0, minimum=0.1),
            interactive_timeout=_env_float(env, "GROUNDLABEL_INTERACTIVE_TIMEOUT", 30.0, minimum=0.1),
            job_timeout=_env_int(env, "GROUNDLABEL_JOB_TIMEOUT", 900, minimum=1),
            interactive_job_timeout=_env_int(env, "GROUNDLABEL_INTERACTIVE_JOB_TIMEOUT", 120, minimum=1),
            job_retries=_env_int(env, "GROUNDLABEL_JOB_RETRIES", 2),
            retry_intervals=_env_floats(env, "GROUNDLABEL_RETRY_INTERVALS", (2.0, 10.0)),
            result_ttl=_env_int(env, "GROUNDLABEL_RESULT_TTL", 7 * 24 * 3600, minimum=1),
            chunk_size=_env_int(env, "GROUNDLABEL_CHUNK_SIZE", 8, minimum=1),
            max_tasks=_env_int(env, "GROUNDLABEL_MAX_TASKS", 10_000, minimum=1),
            workers_inprocess=_env_int(env, "GROUNDLABEL_WORKERS_INPROCESS", 1, minimum=1),
            worker_heartbeat=_env_float(env, "GROUNDLABEL_WORKER_HEARTBEAT", 5.0, minimum=0.2),
        )
        names = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in names:
                raise TypeError(f"unknown setting {key!r}")
            values[key] = value
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse contradictory settings with the reason."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise UserError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise UserError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise UserError("LABEL_STUDIO_URL must include the scheme, e.g. http://localhost:8080")

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must carry credentials."""
        return bool(self.basic_auth_user or self.api_token)

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line."""
        return [s for s in (self.label_studio_api_key, self.basic_auth_pass, self.api_token) if s]

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
