"""The one reader of groundlabel's configuration: environment variables into typed sections.

:meth:`Settings.from_env` is called by the commands (:mod:`groundlabel_cli`: ``serve``, ``worker`` and
``prelabel`` once, when they start their process), and the sections are passed down from there: no other
module reads ``os.environ``, and no process changes it to configure another. Secrets come from the
environment only, never from files or flags. Every variable is listed in ``docs/backend.md`` (a test
holds the table against :data:`VARIABLES`). A malformed value raises :class:`~groundlabel.errors.UserError`
naming the variable.

Sections: :class:`BackendSettings` (the HTTP service), :class:`QueueSettings` (Redis, jobs and their
timeouts), :class:`~groundlabel.ls_access.FetchSettings` (where images may come from, with which token,
how large), :class:`EngineSettings` (which models the workers run) and :class:`TrainingSettings` (the
model store and the training jobs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from groundlabel.errors import UserError
from groundlabel.limits import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from groundlabel.ls_access import FetchSettings

#: Words that mean "no pretrained weights" wherever a weight source is given.
RANDOM_WEIGHTS = ("none", "random")
#: ``GROUNDLABEL_GEM_CPU_KERNELS``: ``auto`` (timed once per machine) or the CPU path GEM's tower takes.
GEM_CPU_KERNELS = ("auto", "packed", "onednn", "torch")
#: ``GROUNDLABEL_CPU_PRECISION``: the arithmetic of the engines on a CPU; ``auto`` is bf16 where the CPU
#: multiplies bf16 natively (AVX512-BF16 or AMX), fp32 elsewhere.
CPU_PRECISIONS = ("auto", "fp32", "bf16")


def weights_source(text: str | None) -> str | None:
    """A weight source as given (tag, file, checkpoint), or None for random weights (``none``/``random``)."""
    if text is None:
        return None
    text = text.strip()
    return None if text.lower() in (*RANDOM_WEIGHTS, "") else text


def split_refine(text: str | None) -> tuple[str, bool]:
    """A refinement option (``none``, ``pamr``, ``sam``, ``pamr+sam``) → (GEM's own score-map refinement,
    whether a promptable SAM then sharpens the masks)."""
    steps = {s.strip().lower() for s in (text or "none").replace(",", "+").split("+") if s.strip()}
    steps -= {"none", "off"}
    unknown = steps - {"pamr", "sam"}
    if unknown:
        raise UserError(f"unknown refinement {text!r}: use none, pamr, sam or pamr+sam")
    return ("pamr" if "pamr" in steps else "none"), "sam" in steps


def parse_temperature(text: str) -> float | None:
    """GEM's inverse temperature option: ``adaptive`` (the paper's rule) → None, else a positive number."""
    if text.strip().lower() in ("adaptive", "auto", "none", ""):
        return None
    value = float(text)
    if not value > 0:
        raise ValueError("the inverse temperature must be positive (or 'adaptive')")
    return value


class _Env:
    """Typed reads of one environment mapping, each refusing a malformed value with the variable's name."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        if value is None or not value.strip():
            return default
        return value.strip()

    def number(self, name: str, default: Any, cast: Any, *, minimum: float | None = None) -> Any:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = cast(raw)
        except ValueError as exc:
            kind = "an integer" if cast is int else "a number"
            raise UserError(f"{name}={raw!r} is not {kind}") from exc
        if minimum is not None and value < minimum:
            raise UserError(f"{name}={raw!r} must be >= {minimum:g}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name}={raw!r} must be true or false")

    def seconds_list(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            values = tuple(float(v) for v in raw.split(",") if v.strip())
        except ValueError as exc:
            raise UserError(f"{name}={raw!r} must be comma-separated numbers of seconds") from exc
        if not values or min(values) < 0:
            raise UserError(f"{name}={raw!r} must be one or more non-negative numbers of seconds")
        return values

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(h.strip() for h in (self.text(name) or "").split(",") if h.strip())


@dataclass(frozen=True)
class BackendSettings:
    """The HTTP service: authentication, how long a request waits, request limits."""

    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)
    metrics_public: bool = False
    model_version: str | None = None  # the operator's name for every prediction; None: the engines' names
    predict_timeout: float = 85.0  # below Label Studio's 100 s ML_TIMEOUT_PREDICT
    interactive_timeout: float = 30.0
    max_tasks: int = 10_000
    workers_inprocess: int = 1  # child processes running the jobs when there is no Redis
    max_body_bytes: int = 100 * 1024 * 1024  # largest request body; refused with 413 before it is read
    default_threshold: float | None = None  # model_score_threshold of controls that set none
    background: bool = True  # finish a /predict's late tasks in the background, writing them into LS
    background_jobs: int = 0  # a background run's jobs queued or running at once; 0: one per worker
    background_chunk_size: int = 2  # tasks per background job: small, so interactive jobs wait little

    @property
    def auth_enabled(self) -> bool:
        """Whether requests must carry credentials."""
        return bool(self.basic_auth_user or self.api_token)

    def validate(self) -> None:
        """Refuse contradictory settings with the reason."""
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise UserError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        if self.default_threshold is not None and not 0.0 <= self.default_threshold <= 1.0:
            raise UserError(f"GROUNDLABEL_DEFAULT_THRESHOLD={self.default_threshold!r} must lie in [0, 1]")


@dataclass(frozen=True)
class QueueSettings:
    """Redis and the jobs on it: timeouts, retries, how long results are kept, chunking."""

    redis_url: str | None = None
    redis_timeout: float = 3.0
    job_timeout: int = 900  # seconds one batch job may run on a worker
    interactive_job_timeout: int = 120
    job_retries: int = 2
    retry_intervals: tuple[float, ...] = (2.0, 10.0)
    result_ttl: int = 7 * 24 * 3600  # the per-task result cache
    job_result_ttl: int = 3600
    failure_ttl: int = 24 * 3600
    chunk_size: int = 8  # tasks per job: one model batch
    worker_heartbeat: float = 5.0  # a worker renews its job lease this often (seconds)

    def validate(self) -> None:
        """Refuse a malformed Redis URL with the reason."""
        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise UserError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {self.redis_url!r}"
            )

    def timeout_for(self, interactive: bool) -> int:
        """Seconds a job of this kind may run."""
        return self.interactive_job_timeout if interactive else self.job_timeout


#: Variables any of which, set to a true value, keep every download off the network.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GROUNDLABEL_OFFLINE")
DEFAULT_HUB_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class HubSettings:
    """The Hugging Face hub as the workers see it: whether to reach it, where it is, its local cache."""

    offline: bool = False
    endpoint: str = DEFAULT_HUB_ENDPOINT
    cache: str | None = None  # the hub cache folder; None: the hub library's default
    token: str | None = field(default=None, repr=False)  # for gated models (SAM 3)

    @property
    def cache_path(self) -> Path:
        """The hub cache folder as a path (the default one when unset)."""
        return Path(self.cache).expanduser() if self.cache else Path("~/.cache/huggingface/hub").expanduser()


def hub_settings(env: Mapping[str, str] | None = None) -> HubSettings:
    """The hub section alone, read from ``env`` (default ``os.environ``), as the hub libraries read it.

    Offline when any of :data:`OFFLINE_VARIABLES` is ``1/true/yes/on``; the cache is ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``.
    """
    e = _Env(os.environ if env is None else env)
    offline = any((e.text(v) or "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)
    cache = e.text("HF_HUB_CACHE")
    if cache is None and e.text("HF_HOME"):
        cache = str(Path(e.text("HF_HOME") or "") / "hub")
    if cache is None and e.text("XDG_CACHE_HOME"):
        cache = str(Path(e.text("XDG_CACHE_HOME") or "") / "huggingface" / "hub")
    return HubSettings(
        offline=offline,
        endpoint=e.text("HF_ENDPOINT") or DEFAULT_HUB_ENDPOINT,
        cache=cache,
        token=e.text("HF_TOKEN"),
    )


def cache_folder(env: Mapping[str, str] | None = None) -> Path:
    """groundlabel's own cache folder (choices timed on this machine, tools installed on demand):
    ``$XDG_CACHE_HOME/groundlabel``, else ``~/.cache/groundlabel``; read from ``env`` (default
    ``os.environ``)."""
    base = _Env(os.environ if env is None else env).text("XDG_CACHE_HOME")
    return Path(base or "~/.cache").expanduser() / "groundlabel"


@dataclass(frozen=True)
class EngineSettings:
    """Which models a worker runs, with which options (each None: the engine's own default)."""

    gem_model: str | None = None
    gem_model_config: str | None = None  # an open_clip model-config JSON file; its stem names the model
    gem_pretrained: str | None = "openai"  # None: random weights
    weights_dir: str | None = None
    gem_image_size: int | None = None
    gem_method: str | None = None
    gem_refine: str | None = None
    gem_templates: str | None = None
    gem_batch: int | None = None
    gem_depth: int | None = None
    gem_temperature: float | None = None  # None: adaptive
    gem_temperature_set: bool = False
    device: str | None = None
    lavt_enabled: bool = False
    lavt_checkpoint: str | None = None  # None with lavt_enabled: random weights
    lavt_variant: str | None = None
    lavt_tokenizer: str | None = None
    engine: str = "gem"  # the engine of class prompts and typed phrases when the label config names none
    sam3_model: str | None = "facebook/sam3"  # hub id or folder; None: random weights
    sam3_batch: int | None = None
    sam_enabled: bool = False  # a promptable SAM for clicks, boxes and refine=sam (GROUNDLABEL_SAM_MODEL)
    sam_model: str | None = None  # hub id, folder or groundlabel checkpoint; None with sam_enabled: random
    sam_family: str | None = None
    sam_min_iou: float | None = None
    sam_min_score: float | None = None
    sam_cache_mb: int | None = None
    lavt_refine: str | None = None
    gem_pack_weights: bool = True  # CPU: keep oneDNN-packed copies of GEM's linear weights (faster, +memory)
    gem_cpu_kernels: str = "auto"  # CPU: GEM's kernels, timed once per machine (auto) or one of them
    cpu_precision: str = "auto"  # CPU: the engines' arithmetic, fp32, bf16 or auto (bf16 where native)
    cache_dir: str | None = None  # groundlabel's cache folder (the CPU kernel choice); None: not kept
    hub: HubSettings = field(default_factory=HubSettings)  # hub access for every engine's downloads

    def validate(self) -> None:
        """Refuse an unknown engine name with the choices."""
        from groundlabel.spec import CLASS_ENGINES

        if self.engine not in CLASS_ENGINES:
            raise UserError(f"GROUNDLABEL_ENGINE={self.engine!r} must be one of {', '.join(CLASS_ENGINES)}")
        if self.gem_cpu_kernels not in GEM_CPU_KERNELS:
            choices = ", ".join(GEM_CPU_KERNELS)
            raise UserError(f"GROUNDLABEL_GEM_CPU_KERNELS={self.gem_cpu_kernels!r} must be one of {choices}")
        if self.cpu_precision not in CPU_PRECISIONS:
            choices = ", ".join(CPU_PRECISIONS)
            raise UserError(f"GROUNDLABEL_CPU_PRECISION={self.cpu_precision!r} must be one of {choices}")
        if self.gem_cpu_kernels == "packed" and not self.gem_pack_weights:
            raise UserError(
                "GROUNDLABEL_GEM_CPU_KERNELS=packed contradicts GROUNDLABEL_GEM_PACK_WEIGHTS=false"
            )
        for name, value in (
            ("GROUNDLABEL_GEM_REFINE", self.gem_refine),
            ("GROUNDLABEL_LAVT_REFINE", self.lavt_refine),
        ):
            try:
                own, sam = split_refine(value)
            except UserError as exc:
                raise UserError(f"{name}: {exc}") from exc
            if name == "GROUNDLABEL_LAVT_REFINE" and own != "none":
                raise UserError(f"{name}={value!r}: LAVT's masks are refined by sam or not at all")
            if sam and not self.sam_enabled:
                raise UserError(f"{name}={value!r} needs a promptable SAM: set GROUNDLABEL_SAM_MODEL")

    def sam3_options(self) -> dict[str, Any]:
        """The SAM 3 engine's configuration keywords that these settings set."""
        options: dict[str, Any] = {
            "model": self.sam3_model,
            "weights_dir": self.weights_dir,
            "token": self.hub.token,
            "offline": self.hub.offline,
        }
        for key, value in (
            ("batch_size", self.sam3_batch),
            ("device", self.device),
            ("cpu_precision", self.cpu_precision),
        ):
            if value is not None:
                options[key] = value
        return options

    def sam_options(self) -> dict[str, Any]:
        """The promptable SAM engine's configuration keywords that these settings set."""
        options: dict[str, Any] = {
            "model": self.sam_model,
            "family": self.sam_family,
            "weights_dir": self.weights_dir,
            "token": self.hub.token,
            "offline": self.hub.offline,
        }
        if self.sam_model is None and self.sam_family is None:
            options["family"] = "sam2"
        for key, value in (
            ("device", self.device),
            ("min_iou", self.sam_min_iou),
            ("min_score", self.sam_min_score),
            ("cpu_precision", self.cpu_precision),
        ):
            if value is not None:
                options[key] = value
        if self.sam_cache_mb is not None:
            options["cache_bytes"] = self.sam_cache_mb * 2**20
        return options

    def gem_options(self) -> dict[str, Any]:
        """The GEM engine's configuration keywords that these settings set (the rest keep its defaults)."""
        options: dict[str, Any] = {"pretrained": self.gem_pretrained}
        if self.gem_model_config:
            options["model_name"] = Path(self.gem_model_config).expanduser().stem
        elif self.gem_model:
            options["model_name"] = self.gem_model
        for key, value in (
            ("cache_dir", self.weights_dir),
            ("hub", self.hub),
            ("image_size", self.gem_image_size),
            ("method", self.gem_method),
            ("refine", split_refine(self.gem_refine)[0] if self.gem_refine else None),
            ("templates", self.gem_templates),
            ("batch_size", self.gem_batch),
            ("gem_depth", self.gem_depth),
            ("device", self.device),
            ("cpu_kernels", self.gem_cpu_kernels),
            ("kernel_cache", self.cache_dir),
            ("cpu_precision", self.cpu_precision),
        ):
            if value is not None:
                options[key] = value
        if self.gem_temperature_set:
            options["ss_attn_temp"] = self.gem_temperature
        return options

    def lavt_options(self) -> dict[str, Any]:
        """The LAVT engine's configuration keywords that these settings set."""
        options: dict[str, Any] = {}
        for key, value in (
            ("variant", self.lavt_variant),
            ("tokenizer", self.lavt_tokenizer),
            ("device", self.device),
            ("cache_dir", self.weights_dir),
            ("cpu_precision", self.cpu_precision),
        ):
            if value is not None:
                options[key] = value
        return options


@dataclass(frozen=True)
class S3Settings:
    """An S3-compatible model store (``GROUNDLABEL_MODEL_STORE=s3://bucket/prefix``): where it answers and
    with which credentials. Unset fields are left to boto3's own defaults (its config files, instance
    roles)."""

    endpoint_url: str | None = None  # GROUNDLABEL_S3_ENDPOINT_URL, else AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL
    region: str | None = None  # AWS_REGION, else AWS_DEFAULT_REGION
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    cache_dir: str | None = None  # where stored weights are downloaded to (default: the temp folder)


@dataclass(frozen=True)
class TrainingSettings:
    """Training from Label Studio's *Start Training*: the model store, triggers and the fine-tuning recipe."""

    model_store: str | None = None  # a folder (path or file:// URL) or s3://bucket/prefix; None: training off
    every: int = 0  # also train after this many new or updated annotations of a project (0: only on request)
    timeout: int = 6 * 3600  # seconds one training job may run
    epochs: int = 10
    batch_size: int = 8
    lr: float = 5e-5
    holdout: float = 0.2  # fraction of the images held out for the old-vs-new comparison
    min_gain: float = 0.0  # the new version must beat the current one's held-out oIoU by more than this
    seed: int = 0  # the split seed: the same images stay held out as the project grows
    loader_workers: int = 2  # data-loading processes of the training job
    s3: S3Settings = field(default_factory=S3Settings)  # an s3:// model store's endpoint and credentials

    @property
    def enabled(self) -> bool:
        """Whether a model store is configured (training jobs need one)."""
        return bool(self.model_store)

    def validate(self) -> None:
        """Refuse a held-out fraction outside (0, 1)."""
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"GROUNDLABEL_TRAIN_HOLDOUT must be between 0 and 1, got {self.holdout:g}")


#: Every variable :meth:`Settings.from_env` reads.
VARIABLES: tuple[str, ...] = (
    "REDIS_URL", "LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT",
    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "GROUNDLABEL_ALLOWED_HOSTS", "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS", "GROUNDLABEL_API_TOKEN", "GROUNDLABEL_METRICS_PUBLIC", "GROUNDLABEL_MODEL_VERSION",
    "GROUNDLABEL_PREDICT_TIMEOUT", "GROUNDLABEL_INTERACTIVE_TIMEOUT", "GROUNDLABEL_JOB_TIMEOUT",
    "GROUNDLABEL_INTERACTIVE_JOB_TIMEOUT", "GROUNDLABEL_JOB_RETRIES", "GROUNDLABEL_RETRY_INTERVALS",
    "GROUNDLABEL_CHUNK_SIZE", "GROUNDLABEL_MAX_TASKS", "GROUNDLABEL_MAX_BODY_BYTES",
    "GROUNDLABEL_DEFAULT_THRESHOLD", "GROUNDLABEL_RESULT_TTL", "GROUNDLABEL_BACKGROUND_PREDICTIONS",
    "GROUNDLABEL_BACKGROUND_JOBS", "GROUNDLABEL_BACKGROUND_CHUNK_SIZE",
    "GROUNDLABEL_WORKERS_INPROCESS", "GROUNDLABEL_WORKER_HEARTBEAT", "GROUNDLABEL_LOG_LEVEL",
    "GROUNDLABEL_MAX_IMAGE_BYTES", "GROUNDLABEL_MAX_IMAGE_PIXELS", "GROUNDLABEL_FETCH_CONNECT_TIMEOUT",
    "GROUNDLABEL_FETCH_READ_TIMEOUT", "GROUNDLABEL_FETCH_TOTAL_TIMEOUT", "GROUNDLABEL_FETCH_MAX_REDIRECTS",
    "GROUNDLABEL_GEM_MODEL", "GROUNDLABEL_GEM_MODEL_CONFIG", "GROUNDLABEL_GEM_PRETRAINED",
    "GROUNDLABEL_WEIGHTS_DIR", "GROUNDLABEL_GEM_IMAGE_SIZE", "GROUNDLABEL_GEM_METHOD",
    "GROUNDLABEL_GEM_REFINE", "GROUNDLABEL_GEM_TEMPLATES", "GROUNDLABEL_GEM_BATCH", "GROUNDLABEL_GEM_DEPTH",
    "GROUNDLABEL_GEM_TEMPERATURE", "GROUNDLABEL_GEM_PACK_WEIGHTS", "GROUNDLABEL_GEM_CPU_KERNELS",
    "GROUNDLABEL_DEVICE", "GROUNDLABEL_CPU_PRECISION",
    "GROUNDLABEL_LAVT_CHECKPOINT", "GROUNDLABEL_LAVT_VARIANT", "GROUNDLABEL_LAVT_TOKENIZER",
    "GROUNDLABEL_ENGINE", "GROUNDLABEL_SAM3_MODEL",
    "GROUNDLABEL_SAM3_BATCH", "GROUNDLABEL_SAM_MODEL", "GROUNDLABEL_SAM_FAMILY", "GROUNDLABEL_SAM_MIN_IOU",
    "GROUNDLABEL_SAM_MIN_SCORE",
    "GROUNDLABEL_SAM_CACHE_MB", "GROUNDLABEL_LAVT_REFINE", *OFFLINE_VARIABLES, "HF_ENDPOINT",
    "HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_TOKEN",
    "GROUNDLABEL_MODEL_STORE", "GROUNDLABEL_TRAIN_EVERY", "GROUNDLABEL_TRAIN_TIMEOUT",
    "GROUNDLABEL_TRAIN_EPOCHS", "GROUNDLABEL_TRAIN_BATCH", "GROUNDLABEL_TRAIN_LR",
    "GROUNDLABEL_TRAIN_HOLDOUT", "GROUNDLABEL_TRAIN_MIN_GAIN", "GROUNDLABEL_TRAIN_SEED",
    "GROUNDLABEL_TRAIN_LOADERS", "GROUNDLABEL_MODEL_STORE_CACHE", "GROUNDLABEL_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)  # fmt: skip


def _fetch_settings(e: _Env) -> FetchSettings:
    root = e.text("LOCAL_FILES_DOCUMENT_ROOT") or e.text("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    return FetchSettings(
        label_studio_url=e.text("LABEL_STUDIO_URL"),
        api_key=e.text("LABEL_STUDIO_API_KEY"),
        local_files_root=root,
        allowed_hosts=e.items("GROUNDLABEL_ALLOWED_HOSTS"),
        max_bytes=e.number("GROUNDLABEL_MAX_IMAGE_BYTES", DEFAULT_MAX_BYTES, int, minimum=1),
        max_pixels=e.number("GROUNDLABEL_MAX_IMAGE_PIXELS", DEFAULT_MAX_PIXELS, int, minimum=1),
        connect_timeout=e.number("GROUNDLABEL_FETCH_CONNECT_TIMEOUT", 5.0, float, minimum=0.001),
        read_timeout=e.number("GROUNDLABEL_FETCH_READ_TIMEOUT", 30.0, float, minimum=0.001),
        total_timeout=e.number("GROUNDLABEL_FETCH_TOTAL_TIMEOUT", 120.0, float, minimum=0.001),
        max_redirects=e.number("GROUNDLABEL_FETCH_MAX_REDIRECTS", 5, int, minimum=1),
    )


def _engine_settings(e: _Env) -> EngineSettings:
    temperature = e.text("GROUNDLABEL_GEM_TEMPERATURE")
    try:
        parsed_temperature = parse_temperature(temperature) if temperature is not None else None
    except ValueError as exc:
        raise UserError(f"GROUNDLABEL_GEM_TEMPERATURE={temperature!r} is not valid: {exc}") from exc
    checkpoint = e.text("GROUNDLABEL_LAVT_CHECKPOINT")
    sam_model = e.text("GROUNDLABEL_SAM_MODEL")
    pretrained = e.text("GROUNDLABEL_GEM_PRETRAINED")
    return EngineSettings(
        gem_model=e.text("GROUNDLABEL_GEM_MODEL"),
        gem_model_config=e.text("GROUNDLABEL_GEM_MODEL_CONFIG"),
        gem_pretrained="openai" if pretrained is None else weights_source(pretrained),
        weights_dir=e.text("GROUNDLABEL_WEIGHTS_DIR"),
        gem_image_size=e.number("GROUNDLABEL_GEM_IMAGE_SIZE", None, int, minimum=1),
        gem_method=e.text("GROUNDLABEL_GEM_METHOD"),
        gem_refine=e.text("GROUNDLABEL_GEM_REFINE"),
        gem_templates=e.text("GROUNDLABEL_GEM_TEMPLATES"),
        gem_batch=e.number("GROUNDLABEL_GEM_BATCH", None, int, minimum=1),
        gem_depth=e.number("GROUNDLABEL_GEM_DEPTH", None, int, minimum=1),
        gem_temperature=parsed_temperature,
        gem_temperature_set=temperature is not None,
        device=e.text("GROUNDLABEL_DEVICE"),
        lavt_enabled=checkpoint is not None,
        lavt_checkpoint=weights_source(checkpoint),
        lavt_variant=e.text("GROUNDLABEL_LAVT_VARIANT"),
        lavt_tokenizer=e.text("GROUNDLABEL_LAVT_TOKENIZER"),
        engine=(e.text("GROUNDLABEL_ENGINE") or "gem").lower(),
        sam3_model=weights_source(e.text("GROUNDLABEL_SAM3_MODEL", "facebook/sam3")),
        sam3_batch=e.number("GROUNDLABEL_SAM3_BATCH", None, int, minimum=1),
        sam_enabled=sam_model is not None,
        sam_model=weights_source(sam_model),
        sam_family=e.text("GROUNDLABEL_SAM_FAMILY"),
        sam_min_iou=e.number("GROUNDLABEL_SAM_MIN_IOU", None, float, minimum=0.0),
        sam_min_score=e.number("GROUNDLABEL_SAM_MIN_SCORE", None, float, minimum=0.0),
        sam_cache_mb=e.number("GROUNDLABEL_SAM_CACHE_MB", None, int, minimum=0),
        lavt_refine=e.text("GROUNDLABEL_LAVT_REFINE"),
        gem_pack_weights=e.bool("GROUNDLABEL_GEM_PACK_WEIGHTS", True),
        gem_cpu_kernels=(e.text("GROUNDLABEL_GEM_CPU_KERNELS") or "auto").lower(),
        cpu_precision=(e.text("GROUNDLABEL_CPU_PRECISION") or "auto").lower(),
        cache_dir=str(cache_folder(e.env)),
        hub=hub_settings(e.env),
    )


def _training_settings(e: _Env) -> TrainingSettings:
    return TrainingSettings(
        model_store=e.text("GROUNDLABEL_MODEL_STORE"),
        every=e.number("GROUNDLABEL_TRAIN_EVERY", 0, int, minimum=0),
        timeout=e.number("GROUNDLABEL_TRAIN_TIMEOUT", 6 * 3600, int, minimum=1),
        epochs=e.number("GROUNDLABEL_TRAIN_EPOCHS", 10, int, minimum=1),
        batch_size=e.number("GROUNDLABEL_TRAIN_BATCH", 8, int, minimum=1),
        lr=e.number("GROUNDLABEL_TRAIN_LR", 5e-5, float, minimum=0),
        holdout=e.number("GROUNDLABEL_TRAIN_HOLDOUT", 0.2, float, minimum=0),
        min_gain=e.number("GROUNDLABEL_TRAIN_MIN_GAIN", 0.0, float, minimum=0),
        seed=e.number("GROUNDLABEL_TRAIN_SEED", 0, int),
        loader_workers=e.number("GROUNDLABEL_TRAIN_LOADERS", 2, int, minimum=0),
        s3=S3Settings(
            endpoint_url=e.text("GROUNDLABEL_S3_ENDPOINT_URL")
            or e.text("AWS_ENDPOINT_URL_S3")
            or e.text("AWS_ENDPOINT_URL"),
            region=e.text("AWS_REGION") or e.text("AWS_DEFAULT_REGION"),
            access_key_id=e.text("AWS_ACCESS_KEY_ID"),
            secret_access_key=e.text("AWS_SECRET_ACCESS_KEY"),
            session_token=e.text("AWS_SESSION_TOKEN"),
            cache_dir=e.text("GROUNDLABEL_MODEL_STORE_CACHE"),
        ),
    )


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one groundlabel process, in sections."""

    backend: BackendSettings = field(default_factory=BackendSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    engines: EngineSettings = field(default_factory=EngineSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every section from ``env`` (default ``os.environ``), then apply keyword overrides.

        An override names a field of one section (``redis_url=...``, ``predict_timeout=...``).
        """
        e = _Env(os.environ if env is None else env)
        settings = cls(
            backend=BackendSettings(
                basic_auth_user=e.text("BASIC_AUTH_USER"),
                basic_auth_pass=e.text("BASIC_AUTH_PASS"),
                api_token=e.text("GROUNDLABEL_API_TOKEN"),
                metrics_public=e.bool("GROUNDLABEL_METRICS_PUBLIC", False),
                model_version=e.text("GROUNDLABEL_MODEL_VERSION"),
                predict_timeout=e.number("GROUNDLABEL_PREDICT_TIMEOUT", 85.0, float, minimum=0.1),
                interactive_timeout=e.number("GROUNDLABEL_INTERACTIVE_TIMEOUT", 30.0, float, minimum=0.1),
                max_tasks=e.number("GROUNDLABEL_MAX_TASKS", 10_000, int, minimum=1),
                workers_inprocess=e.number("GROUNDLABEL_WORKERS_INPROCESS", 1, int, minimum=1),
                max_body_bytes=e.number("GROUNDLABEL_MAX_BODY_BYTES", 100 * 1024 * 1024, int, minimum=1024),
                default_threshold=e.number("GROUNDLABEL_DEFAULT_THRESHOLD", None, float, minimum=0.0),
                background=e.bool("GROUNDLABEL_BACKGROUND_PREDICTIONS", True),
                background_jobs=e.number("GROUNDLABEL_BACKGROUND_JOBS", 0, int, minimum=0),
                background_chunk_size=e.number("GROUNDLABEL_BACKGROUND_CHUNK_SIZE", 2, int, minimum=1),
            ),
            queue=QueueSettings(
                redis_url=e.text("REDIS_URL"),
                job_timeout=e.number("GROUNDLABEL_JOB_TIMEOUT", 900, int, minimum=1),
                interactive_job_timeout=e.number("GROUNDLABEL_INTERACTIVE_JOB_TIMEOUT", 120, int, minimum=1),
                job_retries=e.number("GROUNDLABEL_JOB_RETRIES", 2, int, minimum=0),
                retry_intervals=e.seconds_list("GROUNDLABEL_RETRY_INTERVALS", (2.0, 10.0)),
                result_ttl=e.number("GROUNDLABEL_RESULT_TTL", 7 * 24 * 3600, int, minimum=1),
                chunk_size=e.number("GROUNDLABEL_CHUNK_SIZE", 8, int, minimum=1),
                worker_heartbeat=e.number("GROUNDLABEL_WORKER_HEARTBEAT", 5.0, float, minimum=0.2),
            ),
            fetch=_fetch_settings(e),
            engines=_engine_settings(e),
            training=_training_settings(e),
            log_level=(e.text("GROUNDLABEL_LOG_LEVEL") or "INFO").upper(),
        )
        return settings.with_(**overrides) if overrides else settings.validated()

    def with_(self, **changes: Any) -> Settings:
        """A copy with some fields changed; each name is a field of one section (or ``log_level``)."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in changes.items():
            if key in {f.name for f in fields(self)}:
                top[key] = value
                continue
            for section in ("backend", "queue", "fetch", "engines", "training"):
                if key in {f.name for f in fields(getattr(self, section))}:
                    sections.setdefault(section, {})[key] = value
                    break
            else:
                raise TypeError(f"unknown setting {key!r}")
        for section, values in sections.items():
            top[section] = replace(getattr(self, section), **values)
        return replace(self, **top).validated()

    def validated(self) -> Settings:
        """Itself, after refusing contradictory settings with the reason."""
        self.backend.validate()
        self.queue.validate()
        self.training.validate()
        self.engines.validate()
        return self

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line."""
        values = (
            self.fetch.api_key,
            self.backend.basic_auth_pass,
            self.backend.api_token,
            self.engines.hub.token,
        )
        return [s for s in values if s]
