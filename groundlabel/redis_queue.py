"""How groundlabel lays its jobs out on Redis: the RQ queues, the result cache and the pending markers.

Both sides use this module: the backend's queue client enqueues and reads, the worker consumes. Beside
RQ's own keys there are two kinds:

- ``groundlabel:result:<key>``: one task's finished prediction, for ``result_ttl`` seconds, where the key
  hashes (task id, image, expression, label spec, context, model version). It is written in the worker by
  :func:`store_results`, the job's RQ success callback, so a result computed after ``/predict`` gave up
  waiting is found by the next request, and the job function itself knows nothing of Redis.
- ``groundlabel:pending:<key>``: ``<job id>:<index>`` while a job for that task is queued or running, so
  that a second request for the same task waits for the same job instead of enqueueing another.

The cache keys of a job travel in its RQ ``meta`` (``cache_keys``, ``cache_ttl``), not in its payload.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from groundlabel.protocol import QUEUE_BATCH, QUEUE_INTERACTIVE
from groundlabel.settings import QueueSettings

RESULT_PREFIX = "groundlabel:result:"
PENDING_PREFIX = "groundlabel:pending:"
CLEANUP_LOCK = "groundlabel:cleanup-lock"
#: The dotted path of :func:`store_results`, as RQ stores a callback.
STORE_RESULTS = "groundlabel.redis_queue.store_results"


def connect(url: str, *, timeout: float = 3.0) -> redis.Redis:
    """A Redis client with short timeouts, so that an unreachable Redis fails fast."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout, socket_timeout=max(timeout, 5.0), health_check_interval=30
    )


def make_queues(connection: redis.Redis, settings: QueueSettings) -> dict[str, Queue]:
    """The two RQ queues with the JSON serializer, in the order workers listen to them."""
    return {
        name: Queue(
            name,
            connection=connection,
            serializer=JSONSerializer,
            default_timeout=settings.timeout_for(name == QUEUE_INTERACTIVE),
        )
        for name in (QUEUE_INTERACTIVE, QUEUE_BATCH)
    }


def store_results(job: Any, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ success callback (run in the worker): cache each task's prediction, drop the pending markers.

    A task whose prediction carries an ``error`` is not cached: the next request tries it again.
    """
    keys = list((job.meta or {}).get("cache_keys") or [])
    if not keys or not isinstance(result, list):
        return
    ttl = int((job.meta or {}).get("cache_ttl") or 86400)
    with connection.pipeline() as pipe:
        for key, prediction in zip(keys, result, strict=False):
            if isinstance(prediction, dict) and not prediction.get("error"):
                pipe.set(RESULT_PREFIX + key, json.dumps(prediction), ex=ttl)
            pipe.delete(PENDING_PREFIX + key)
        pipe.execute()


def wait_for_redis(connection: redis.Redis, timeout: float) -> bool:
    """Poll until Redis answers or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection.ping()
            return True
        except redis.RedisError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
