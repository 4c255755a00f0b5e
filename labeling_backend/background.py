"""Background runs: a ``/predict``'s late tasks finished after its deadline and written into Label Studio.

Label Studio's *Retrieve Predictions* sends every selected task in one request and gives up after
``ML_TIMEOUT_PREDICT`` (100 s); what is not answered by then gets no prediction. When the backend knows
where Label Studio is and holds a token for it (``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``), the
request's jobs do not stop at its deadline: the tasks still queued or running become one **background
run**, with its own id, which

- waits for their jobs, at most ``GROUNDLABEL_BACKGROUND_JOBS`` of its jobs queued or running at once
  (default: one per worker), each of ``GROUNDLABEL_BACKGROUND_CHUNK_SIZE`` tasks, so that an interactive
  request waits for one small job at most; a job that fails (its worker died) is tried again, up to
  :data:`MAX_ATTEMPTS` times in all;
- writes each prediction into Label Studio as soon as it is ready (``POST /api/projects/<id>/import/
  predictions``, batches of up to :data:`WRITE_BATCH`), under the model version and score a direct answer
  would have carried;
- owns its tasks until they are written (or have failed), and for :data:`WRITTEN_SECONDS` after: a
  second click (even one Label Studio listed before the write), ``groundlabel prelabel`` or a second
  backend leaves them to it, so no task is written twice. A task is marked *writing* before its
  prediction is sent and *written* after; a backend that takes a run over (a restart, Redis mode) first
  asks Label Studio about the tasks left *writing*, and writes only those that have no prediction of
  the run's versions.

Runs live in Redis when ``REDIS_URL`` is set (a restarted backend resumes them; one backend drives a run
at a time, under a lease it renews), otherwise in this process's memory (what the in-process runner has
not written when the process stops is lost: click *Retrieve Predictions* again, or run ``prelabel``).
Progress is on ``/health``, ``/metrics`` (``groundlabel_background_tasks``) and in the log;
``POST /background/<id>/cancel`` and ``groundlabel background cancel <id>`` stop a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from groundlabel.errors import UserError
from groundlabel.protocol import JobRunner
from groundlabel.settings import Settings
from groundlabel.spec import LabelingSpec
from groundlabel.versions import versioned
from labeling_backend.metrics import Metrics
from labeling_backend.service import Dispatcher, TaskAnswer, named_prediction

log = logging.getLogger("groundlabel.backend")

PREFIX = "groundlabel:bg:"
#: Tries of a task whose job failed (its worker died, the job timed out) before the task fails.
MAX_ATTEMPTS = 3
#: Predictions written into Label Studio in one request.
WRITE_BATCH = 100
#: Tasks of one run looked at per step (the rest wait for the next steps).
STEP_WINDOW = 2000
#: Seconds a backend's hold on a run lasts unless renewed (a stopped backend's runs are taken over after).
LEASE_SECONDS = 15
#: Seconds an owner's claim on a task lasts at most (a run that ends releases its claims at once).
OWNER_SECONDS = 7 * 24 * 3600
#: Seconds a written task stays claimed: a request Label Studio built before the write (it lists the tasks
#: without a prediction, then sends them) must not answer the task a second time.
WRITTEN_SECONDS = 600
#: Runs kept for listing after they end.
KEEP_RUNS = 50
#: Seconds between two progress lines of one run in the log.
LOG_EVERY = 10.0


# -- the key-value store -----------------------------------------------------------------------------


class LocalStore:
    """The few Redis commands the runs use, in this process's memory (the in-process runner's store).

    Values come back as ``bytes``, as from Redis; nothing outlives the process.
    """

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}
        self._expiry: dict[str, float] = {}
        self._lock = threading.RLock()

    def _live(self, key: str) -> Any:
        until = self._expiry.get(key)
        if until is not None and until <= time.monotonic():
            self._data.pop(key, None)
            self._expiry.pop(key, None)
        return self._data.get(key)

    @staticmethod
    def _b(value: Any) -> bytes:
        return value if isinstance(value, bytes) else str(value).encode()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._live(key)

    def set(self, key: str, value: Any, *, nx: bool = False, ex: int | None = None) -> bool:
        with self._lock:
            if nx and self._live(key) is not None:
                return False
            self._data[key] = self._b(value)
            self._expiry.pop(key, None)
            if ex is not None:
                self._expiry[key] = time.monotonic() + ex
            return True

    def mget(self, keys: Sequence[str]) -> list[bytes | None]:
        with self._lock:
            return [self._live(k) for k in keys]

    def delete(self, *keys: str) -> int:
        with self._lock:
            found = [k for k in keys if self._live(k) is not None]
            for k in keys:
                self._data.pop(k, None)
                self._expiry.pop(k, None)
            return len(found)

    def sadd(self, key: str, *values: Any) -> int:
        with self._lock:
            members = self._data.setdefault(key, set())
            before = len(members)
            members.update(self._b(v) for v in values)
            return len(members) - before

    def srem(self, key: str, *values: Any) -> int:
        with self._lock:
            members = self._data.get(key, set())
            before = len(members)
            members.difference_update(self._b(v) for v in values)
            return before - len(members)

    def smembers(self, key: str) -> set[bytes]:
        with self._lock:
            return set(self._data.get(key, set()))

    def scard(self, key: str) -> int:
        with self._lock:
            return len(self._data.get(key, set()))

    def hset(self, key: str, mapping: dict[str, Any]) -> int:
        with self._lock:
            table = self._data.setdefault(key, {})
            new = sum(1 for k in mapping if self._b(k) not in table)
            table.update({self._b(k): self._b(v) for k, v in mapping.items()})
            return new

    def hmget(self, key: str, names: Sequence[Any]) -> list[bytes | None]:
        with self._lock:
            table = self._data.get(key, {})
            return [table.get(self._b(n)) for n in names]

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        with self._lock:
            return dict(self._data.get(key, {}))

    def hincrby(self, key: str, name: str, amount: int = 1) -> int:
        with self._lock:
            table = self._data.setdefault(key, {})
            value = int(table.get(self._b(name), b"0")) + amount
            table[self._b(name)] = self._b(value)
            return value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- who owns a task ---------------------------------------------------------------------------------


class TaskOwners:
    """Claims on a project's tasks: a background run or a ``prelabel`` chunk writes them, nobody else.

    ``kv`` is a Redis client or a :class:`LocalStore`.
    """

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @staticmethod
    def _key(project: str, task_id: int) -> str:
        return f"{PREFIX}own:{project}:{int(task_id)}"

    def claim(self, project: str, task_ids: Iterable[int], owner: str) -> list[int]:
        """Claim each free task for ``owner``; the ids it now holds (those it held already included)."""
        ids = [int(t) for t in task_ids]
        won = {t for t in ids if self.kv.set(self._key(project, t), owner, nx=True, ex=OWNER_SECONDS)}
        before = self.owners(project, [t for t in ids if t not in won])
        return [t for t in ids if t in won or before.get(t) == owner]

    def owners(self, project: str, task_ids: Sequence[int]) -> dict[int, str]:
        """The owner of each task that has one (one round trip to the store)."""
        if not task_ids:
            return {}
        values = self.kv.mget([self._key(project, t) for t in task_ids])
        return {int(t): _text(v) for t, v in zip(task_ids, values, strict=True) if v is not None}

    def _mine(self, project: str, task_ids: Iterable[int], owner: str) -> list[str]:
        """The claim keys of these tasks that ``owner`` holds."""
        held = self.owners(project, list(task_ids))
        return [self._key(project, t) for t, o in held.items() if o == owner]

    def release(self, project: str, task_ids: Iterable[int], owner: str) -> None:
        """Drop ``owner``'s claims on these tasks (another owner's stay): they may be predicted again."""
        keys = self._mine(project, task_ids, owner)
        if keys:
            self.kv.delete(*keys)

    def settle(self, project: str, task_ids: Iterable[int], owner: str) -> None:
        """``owner`` wrote these tasks: its claims end after :data:`WRITTEN_SECONDS`, not at once."""
        for key in self._mine(project, task_ids, owner):
            self.kv.set(key, owner, ex=WRITTEN_SECONDS)


# -- one run -----------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    """A run's progress, as ``/health``, ``/background`` and the metrics show it."""

    id: str
    project: str
    status: str  # running, done, cancelled
    total: int
    written: int
    failed: int
    left: int
    created: float
    updated: float
    detail: str = ""
    failures: dict[str, str] = field(default_factory=dict)  # a few task ids and their reasons

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON."""
        return asdict(self)


class RunStore:
    """The runs' records in a key-value store (see :class:`LocalStore` for the commands used)."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    @staticmethod
    def key(run_id: str, part: str = "") -> str:
        return f"{PREFIX}run:{run_id}" + (f":{part}" if part else "")

    def create(self, run_id: str, definition: dict[str, Any], tasks: Sequence[dict[str, Any]]) -> None:
        """Store a new run: its definition (project, spec, versions, ...) and its tasks (id, data, key)."""
        now = time.time()
        self.kv.hset(self.key(run_id, "tasks"), mapping={str(t["id"]): json.dumps(t) for t in tasks})
        self.kv.sadd(self.key(run_id, "left"), *[str(t["id"]) for t in tasks])
        self.kv.hset(
            self.key(run_id),
            mapping={
                "definition": json.dumps(definition),
                "status": "running",
                "total": len(tasks),
                "written": 0,
                "failed": 0,
                "created": now,
                "updated": now,
                "detail": "",
            },
        )
        self.kv.sadd(f"{PREFIX}active", run_id)
        self.kv.sadd(f"{PREFIX}runs", run_id)

    def definition(self, run_id: str) -> dict[str, Any] | None:
        raw = self.kv.hmget(self.key(run_id), ["definition"])[0]
        return json.loads(raw) if raw else None

    def active(self) -> list[str]:
        return sorted(_text(r) for r in self.kv.smembers(f"{PREFIX}active"))

    def left(self, run_id: str) -> list[int]:
        return sorted(int(_text(t)) for t in self.kv.smembers(self.key(run_id, "left")))

    def tasks(self, run_id: str, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        raw = self.kv.hmget(self.key(run_id, "tasks"), [str(i) for i in ids]) if ids else []
        return {i: json.loads(r) for i, r in zip(ids, raw, strict=True) if r}

    def writing(self, run_id: str) -> list[int]:
        return sorted(int(_text(t)) for t in self.kv.smembers(self.key(run_id, "writing")))

    def begin_write(self, run_id: str, ids: Sequence[int]) -> None:
        if ids:
            self.kv.sadd(self.key(run_id, "writing"), *[str(i) for i in ids])

    def end_write(self, run_id: str, ids: Sequence[int]) -> None:
        """The tasks' predictions are in Label Studio."""
        if not ids:
            return
        names = [str(i) for i in ids]
        gone = self.kv.srem(self.key(run_id, "left"), *names)
        self.kv.srem(self.key(run_id, "writing"), *names)
        self.kv.hincrby(self.key(run_id), "written", int(gone))
        self.touch(run_id)

    def fail(self, run_id: str, reasons: dict[int, str]) -> None:
        """These tasks get no prediction from this run, for these reasons."""
        if not reasons:
            return
        names = [str(i) for i in reasons]
        gone = self.kv.srem(self.key(run_id, "left"), *names)
        self.kv.srem(self.key(run_id, "writing"), *names)
        self.kv.hset(self.key(run_id, "failed"), mapping={str(i): r[:300] for i, r in reasons.items()})
        self.kv.hincrby(self.key(run_id), "failed", int(gone))
        self.touch(run_id)

    def jobs(self, run_id: str, ids: Sequence[int]) -> dict[int, tuple[str, int, int]]:
        """Each task's latest job: (job id, index in it, attempts so far)."""
        raw = self.kv.hmget(self.key(run_id, "jobs"), [str(i) for i in ids]) if ids else []
        out = {}
        for i, r in zip(ids, raw, strict=True):
            if r:
                job_id, index, attempts = _text(r).split(":")
                out[i] = (job_id, int(index), int(attempts))
        return out

    def set_jobs(self, run_id: str, jobs: dict[int, tuple[str, int, int]]) -> None:
        if jobs:
            self.kv.hset(
                self.key(run_id, "jobs"), mapping={str(i): f"{j}:{x}:{a}" for i, (j, x, a) in jobs.items()}
            )

    def status(self, run_id: str) -> str:
        return _text(self.kv.hmget(self.key(run_id), ["status"])[0] or b"")

    def set_status(self, run_id: str, status: str, detail: str = "") -> None:
        self.kv.hset(self.key(run_id), mapping={"status": status, "detail": detail, "updated": time.time()})
        if status != "running":
            self.kv.srem(f"{PREFIX}active", run_id)

    def set_detail(self, run_id: str, detail: str) -> None:
        self.kv.hset(self.key(run_id), mapping={"detail": detail})

    def touch(self, run_id: str) -> None:
        self.kv.hset(self.key(run_id), mapping={"updated": time.time()})

    def info(self, run_id: str) -> RunInfo | None:
        raw = {_text(k): _text(v) for k, v in self.kv.hgetall(self.key(run_id)).items()}
        if not raw:
            return None
        definition = json.loads(raw.get("definition") or "{}")
        failures = {
            _text(k): _text(v) for k, v in list(self.kv.hgetall(self.key(run_id, "failed")).items())[:5]
        }
        return RunInfo(
            id=run_id,
            project=str(definition.get("project", "")),
            status=raw.get("status", ""),
            total=int(raw.get("total", 0)),
            written=int(raw.get("written", 0)),
            failed=int(raw.get("failed", 0)),
            left=int(self.kv.scard(self.key(run_id, "left"))),
            created=float(raw.get("created", 0)),
            updated=float(raw.get("updated", 0)),
            detail=raw.get("detail", ""),
            failures=failures,
        )

    def recent(self, limit: int = 20) -> list[RunInfo]:
        """The latest runs, newest first (runs beyond :data:`KEEP_RUNS` are forgotten)."""
        infos = [i for i in (self.info(_text(r)) for r in self.kv.smembers(f"{PREFIX}runs")) if i]
        infos.sort(key=lambda i: i.created, reverse=True)
        for old in infos[KEEP_RUNS:]:
            if old.status != "running":
                self.forget(old.id)
        return infos[:limit]

    def forget(self, run_id: str) -> None:
        self.kv.delete(*(self.key(run_id, p) for p in ("", "tasks", "left", "writing", "failed", "jobs")))
        self.kv.srem(f"{PREFIX}runs", run_id)
        self.kv.srem(f"{PREFIX}active", run_id)

    def lease(self, run_id: str, holder: str) -> bool:
        """Hold (or keep holding) the run for :data:`LEASE_SECONDS`; False while another backend holds it."""
        key = self.key(run_id, "lease")
        if self.kv.set(key, holder, nx=True, ex=LEASE_SECONDS):
            return True
        if _text(self.kv.get(key) or b"") == holder:
            self.kv.set(key, holder, ex=LEASE_SECONDS)
            return True
        return False

    def unlease(self, run_id: str, holder: str) -> None:
        key = self.key(run_id, "lease")
        if _text(self.kv.get(key) or b"") == holder:
            self.kv.delete(key)


# -- the runs of one backend -------------------------------------------------------------------------


class BackgroundRuns:
    """Starts, drives, lists and cancels the background runs of one backend (see the module docstring).

    ``kv`` is the Redis client when the jobs run on Redis, else ``None`` (the runs live in memory).
    ``client_factory`` makes the Label Studio client (default: the SDK's, for the settings' URL and key).
    """

    def __init__(
        self,
        settings: Settings,
        runner: JobRunner,
        metrics: Metrics,
        kv: Any = None,
        client_factory: Any = None,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.metrics = metrics
        self.kv = kv if kv is not None else LocalStore()
        self.durable = kv is not None
        self.store = RunStore(self.kv)
        self.owners = TaskOwners(self.kv)
        self.holder = uuid.uuid4().hex  # this backend, as a lease holder
        self._client_factory = client_factory
        self._client: Any = None
        self._held: set[str] = set()  # runs this backend drives; those taken over are checked first
        self._logged: dict[str, float] = {}
        self._lock = threading.Lock()  # one step at a time

    # -- whether it can run --------------------------------------------------------------------------

    def off_reason(self) -> str | None:
        """Why late tasks are not finished in the background, or None when they are."""
        if not self.settings.backend.background:
            return "background predictions are off (GROUNDLABEL_BACKGROUND_PREDICTIONS=false)"
        fetch = self.settings.fetch
        if not fetch.label_studio_url or not fetch.api_key:
            return (
                "background predictions need LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY on the backend to "
                "write into Label Studio; late tasks get no prediction until they are asked for again"
            )
        return None

    def _label_studio(self) -> Any:
        if self._client is None:
            if self._client_factory is not None:
                self._client = self._client_factory()
            else:
                from groundlabel.ls_client import make_client

                fetch = self.settings.fetch
                self._client = make_client(fetch.label_studio_url, fetch.api_key, timeout=60.0)
        return self._client

    # -- starting and stopping runs ------------------------------------------------------------------

    def owned(self, project: str | None, task_ids: Sequence[int]) -> dict[int, str]:
        """The tasks of ``project`` that a run (or ``prelabel``) owns, with their owner."""
        if not project or not task_ids:
            return {}
        return self.owners.owners(project, task_ids)

    def start(
        self,
        project: str,
        spec: LabelingSpec,
        dispatcher: Dispatcher,
        answers: Sequence[TaskAnswer],
        tasks: Sequence[dict[str, Any]],
        label_studio_url: str | None,
    ) -> RunInfo | None:
        """A run for the tasks of ``answers`` (the request's late ones, with their cache keys); None when
        another owner holds them all."""
        data = {int(t["id"]): t.get("data") or {} for t in tasks}
        run_id = uuid.uuid4().hex[:12]
        held = set(self.owners.claim(project, [a.task_id for a in answers], run_id))
        late = [
            {"id": a.task_id, "data": data[a.task_id], "key": a.key} for a in answers if a.task_id in held
        ]
        if not late:
            return None
        definition = {
            "project": project,
            "spec": spec.to_dict(),
            "model_version": dispatcher.model_version,
            "versions": list(dispatcher.versions),
            "operator_name": self.settings.backend.model_version,
            "label_studio_url": label_studio_url,
        }
        self.store.create(run_id, definition, late)
        self.store.lease(run_id, self.holder)
        self._held.add(run_id)
        log.info(
            "background run %s: project %s, %d task(s) not finished by the request's deadline; writing them "
            "into Label Studio as they are done",
            run_id,
            project,
            len(late),
        )
        return self.store.info(run_id)

    def cancel(self, run_id: str) -> RunInfo:
        """Stop a run: nothing more is written (jobs already running finish and fill the result cache)."""
        info = self.store.info(run_id)
        if info is None:
            raise UserError(f"no background run {run_id!r}")
        if info.status == "running":
            definition = self.store.definition(run_id) or {}
            self.store.set_status(run_id, "cancelled", "cancelled on request")
            self.owners.release(str(definition.get("project")), self.store.left(run_id), run_id)
            log.info("background run %s cancelled: %d of %d written", run_id, info.written, info.total)
        return self.store.info(run_id) or info

    def runs(self, limit: int = 20) -> list[RunInfo]:
        """The latest runs, newest first."""
        return self.store.recent(limit)

    def health(self) -> dict[str, Any]:
        """``/health``'s view: whether runs start, and the running ones."""
        reason = self.off_reason()
        if reason:
            return {"enabled": False, "reason": reason}
        try:
            running = [i.to_dict() for i in self.runs() if i.status == "running"]
        except Exception as exc:  # Redis away: the queue's status says so too
            return {"enabled": True, "durable": self.durable, "error": f"{type(exc).__name__}: {exc}"}
        return {"enabled": True, "durable": self.durable, "running": running}

    # -- driving -------------------------------------------------------------------------------------

    async def serve(self, stopping: asyncio.Event) -> None:
        """Drive the runs until ``stopping`` is set: a step on a thread, then a short pause."""
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            busy = False
            try:
                busy = await loop.run_in_executor(None, self.step)
            except Exception:  # Redis or Label Studio away: say so, try again shortly
                log.exception("background runs: step failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5 if busy else 1.0)
        await loop.run_in_executor(None, self.release_all)

    def release_all(self) -> None:
        """Give up this backend's leases (a backend started next takes its runs over at once)."""
        for run_id in list(self._held):
            self.store.unlease(run_id, self.holder)
        self._held.clear()

    def step(self) -> bool:
        """One pass over the running runs this backend holds (or can take over); True if any is running."""
        with self._lock:
            active = self.store.active()
            if not active:
                return False
            self.runner.reap_abandoned()
            for run_id in active:
                if not self.store.lease(run_id, self.holder):
                    self._held.discard(run_id)
                    continue
                if run_id not in self._held:
                    self._held.add(run_id)
                    self._recover(run_id)
                self._advance(run_id)
            return True

    def _named_versions(self, definition: dict[str, Any]) -> set[str]:
        spec = LabelingSpec.from_dict(definition["spec"])
        if definition.get("operator_name"):
            return {definition["operator_name"]}
        return {versioned(v, spec) for v in definition.get("versions") or []}

    def _recover(self, run_id: str) -> None:
        """A run taken over: the tasks it was writing when its backend stopped are checked in Label Studio,
        and those that hold a prediction of its versions count as written."""
        from groundlabel.ls_client import list_predictions

        definition = self.store.definition(run_id)
        writing = self.store.writing(run_id)
        if definition is None or not writing:
            return
        names = self._named_versions(definition)
        done = [
            t
            for t in writing
            if any(p.get("model_version") in names for p in list_predictions(self._label_studio(), task_id=t))
        ]
        self.store.end_write(run_id, done)
        self.owners.settle(definition["project"], done, run_id)
        log.info(
            "background run %s taken over: %d task(s) were being written, %d of them already are",
            run_id,
            len(writing),
            len(done),
        )

    def _dispatcher(self, definition: dict[str, Any]) -> Dispatcher:
        settings = self.settings.with_(chunk_size=self.settings.backend.background_chunk_size)
        return Dispatcher(
            settings,
            self.runner,
            self.metrics,
            definition["model_version"],
            definition.get("versions") or [],
            project=definition["project"],
        )

    def _advance(self, run_id: str) -> None:
        """Write what is ready, follow the jobs, submit what no job computes, end the run when done."""
        definition = self.store.definition(run_id)
        if definition is None or self.store.status(run_id) != "running":
            self.store.set_status(run_id, self.store.status(run_id) or "cancelled")
            return
        project = definition["project"]
        spec = LabelingSpec.from_dict(definition["spec"])
        dispatcher = self._dispatcher(definition)
        left = self.store.left(run_id)[:STEP_WINDOW]
        tasks = self.store.tasks(run_id, left)
        left = [t for t in left if t in tasks]
        hits = dispatcher.cache_hits([tasks[t]["key"] for t in left])
        ready = {
            t: named_prediction(h, spec, definition.get("operator_name"))
            for t, h in zip(left, hits, strict=True)
            if h is not None
        }
        if ready and not self._write(run_id, project, ready):
            return  # Label Studio unreachable: try again next step
        waiting = [t for t in left if t not in ready]
        self._follow(run_id, dispatcher, spec, definition, waiting, tasks)
        info = self.store.info(run_id)
        if info is not None and info.left == 0:
            self.store.set_status(run_id, "done")
            self.store.unlease(run_id, self.holder)
            self._held.discard(run_id)
            log.info(
                "background run %s done: %d written, %d failed in %.1f s",
                run_id,
                info.written,
                info.failed,
                time.time() - info.created,
            )
        elif info is not None and time.monotonic() - self._logged.get(run_id, 0.0) >= LOG_EVERY:
            self._logged[run_id] = time.monotonic()
            log.info(
                "background run %s: %d of %d written, %d failed, %d left",
                run_id,
                info.written,
                info.total,
                info.failed,
                info.left,
            )

    def _write(self, run_id: str, project: str, ready: dict[int, dict[str, Any]]) -> bool:
        """Write ``ready`` predictions into Label Studio; False when it cannot be reached."""
        from groundlabel.ls_client import LabelStudioError, push_predictions

        client = self._label_studio()
        items = sorted(ready.items())
        for start in range(0, len(items), WRITE_BATCH):
            batch = items[start : start + WRITE_BATCH]
            ids = [t for t, _ in batch]
            rows = [
                {
                    "task": t,
                    "result": p.get("result") or [],
                    "score": p.get("score"),
                    "model_version": p.get("model_version"),
                }
                for t, p in batch
            ]
            self.store.begin_write(run_id, ids)
            try:
                push_predictions(client, int(project), rows)
            except LabelStudioError as exc:
                if exc.status is None or exc.status >= 500 or exc.status in (401, 403):
                    self.store.set_detail(run_id, f"waiting for Label Studio: {exc}")
                    log.warning("background run %s: %s", run_id, exc)
                    # Whether Label Studio stored them is unknown: the tasks stay "writing", and the next
                    # step checks them before writing again, as after a take-over.
                    self._held.discard(run_id)
                    return False
                self._write_one_by_one(run_id, project, rows)
                continue
            self.store.end_write(run_id, ids)
            self.owners.settle(project, ids, run_id)
        self.store.set_detail(run_id, "")
        return True

    def _write_one_by_one(self, run_id: str, project: str, rows: list[dict[str, Any]]) -> None:
        """A batch Label Studio refused: each task alone, so one deleted task fails only itself."""
        from groundlabel.ls_client import LabelStudioError, push_predictions

        client = self._label_studio()
        for row in rows:
            try:
                push_predictions(client, int(project), [row])
            except LabelStudioError as exc:
                if exc.status is None or exc.status >= 500:
                    self._held.discard(run_id)  # stays "writing": checked before it is written again
                    return
                self.store.fail(run_id, {row["task"]: f"Label Studio refused the prediction: {exc}"})
                self.owners.release(project, [row["task"]], run_id)
            else:
                self.store.end_write(run_id, [row["task"]])
                self.owners.settle(project, [row["task"]], run_id)

    def _follow(
        self,
        run_id: str,
        dispatcher: Dispatcher,
        spec: LabelingSpec,
        definition: dict[str, Any],
        waiting: list[int],
        tasks: dict[int, dict[str, Any]],
    ) -> None:
        """The tasks without a result yet: leave those a job computes; fail or retry those whose job ended
        without one; submit the rest, keeping at most the allowed number of the run's jobs in flight."""
        if not waiting:
            return
        pending = dispatcher.runner.pending_get([tasks[t]["key"] for t in waiting])
        running = {t: m for t, m in zip(waiting, pending, strict=True) if m is not None}
        idle = [t for t in waiting if t not in running]
        known = self.store.jobs(run_id, idle)
        states = dispatcher.runner.poll(sorted({j for j, _, _ in known.values()}))
        failed: dict[int, str] = {}
        retry: list[int] = []
        attempts: dict[int, int] = {}
        for t in idle:
            job = known.get(t)
            if job is None:
                retry.append(t)
                continue
            job_id, index, tries = job
            state = states.get(job_id)
            attempts[t] = tries
            if state is not None and state.status == "pending":
                continue  # marker gone but the job still runs (a retry of it): wait
            if state is not None and state.status == "finished":
                results = state.results or []
                answer = results[index] if index < len(results) else None
                if isinstance(answer, dict) and answer.get("error"):
                    failed[t] = str(answer["error"])
                    continue
                if isinstance(answer, dict) and dispatcher.cache_hits([tasks[t]["key"]])[0] is not None:
                    continue  # cached since the look-up: written next step
            if tries >= MAX_ATTEMPTS:
                reason = (state.error if state is not None else None) or "its job ended without a result"
                failed[t] = f"{reason} (after {tries} tries)"
            else:
                retry.append(t)
        if failed:
            self.store.fail(run_id, failed)
            self.owners.release(definition["project"], list(failed), run_id)
        limit = self.settings.backend.background_jobs or max(1, self._workers())
        in_flight = len({m[0] for m in running.values()})
        size = self.settings.backend.background_chunk_size
        room = max(0, limit - in_flight) * size
        chunk = retry[:room]
        if not chunk:
            return
        submitted = dispatcher.enqueue_batch(
            [{"id": t, "data": tasks[t]["data"]} for t in chunk],
            [tasks[t]["key"] for t in chunk],
            spec,
            definition.get("label_studio_url"),
        )
        self.store.set_jobs(
            run_id, {t: (job_id, index, attempts.get(t, 0) + 1) for t, (job_id, index) in submitted.items()}
        )

    def _workers(self) -> int:
        try:
            return self.runner.worker_count()
        except Exception:  # noqa: BLE001 - Redis away: one job at a time until it is back
            return 1

    # -- metrics -------------------------------------------------------------------------------------

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        """``groundlabel_background_tasks{project,state}`` over the listed runs, and the runs by state."""
        tasks = GaugeMetricFamily(
            "groundlabel_background_tasks",
            "Tasks of background runs (still listed) by project and state: written, failed, left",
            labels=["project", "state"],
        )
        runs = GaugeMetricFamily("groundlabel_background_runs", "Background runs by state", labels=["state"])
        try:
            infos = self.runs(KEEP_RUNS)
        except Exception as exc:  # Redis down: the queue's own gauge says so
            log.debug("background runs unavailable: %s", exc)
            infos = []
        per_project: dict[tuple[str, str], int] = {}
        per_state: dict[str, int] = {"running": 0, "done": 0, "cancelled": 0}
        for info in infos:
            per_state[info.status] = per_state.get(info.status, 0) + 1
            for state, count in (("written", info.written), ("failed", info.failed), ("left", info.left)):
                per_project[(info.project, state)] = per_project.get((info.project, state), 0) + count
        for (project, state), count in sorted(per_project.items()):
            tasks.add_metric([project, state], count)
        for state, count in sorted(per_state.items()):
            runs.add_metric([state], count)
        yield tasks
        yield runs
