"""How groundlabel lays its jobs out on Redis: the RQ queues, the result cache and the pending markers.

Both sides use this module: the backend's queue client enqueues and reads, the worker consumes. Beside
RQ's own keys there are these:

- ``groundlabel:result:<key>@<model version>``: one task's finished prediction, for ``result_ttl``
  seconds, where the key hashes (task id, image, expression, label spec, context) and the model version is
  the one the worker's engine gave the prediction (:func:`groundlabel.protocol.result_key`). It is
  written in the worker by :func:`store_results`, the job's RQ success callback, so a result computed
  after ``/predict`` gave up waiting is found by the next request, and the job function itself knows
  nothing of Redis.
- ``groundlabel:pending:<key>``: ``<job id>:<index>`` while a job for that task is queued or running, so
  that a second request for the same task waits for the same job instead of enqueueing another. The
  markers of one job are claimed by one Lua script, each with its final index.
- ``groundlabel:enqueuing:<job id>``: for the moment between claiming the markers and enqueueing the job.
- ``groundlabel:interactive:<task id>``: the task's latest interactive job; a newer one cancels it while
  it is still queued.

A job's stored payload keeps its inline images only while the job may still run: once it finished, or
failed with no retry left, its callbacks rewrite it without them (:func:`groundlabel.protocol.slim_payload`).

The cache keys of a job travel in its RQ ``meta`` (``cache_keys``, ``cache_ttl``), not in its payload.
"""

from __future__ import annotations

import json
import time
import zlib
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from groundlabel.protocol import QUEUE_BATCH, QUEUE_INTERACTIVE, result_key, slim_payload
from groundlabel.settings import QueueSettings

RESULT_PREFIX = "groundlabel:result:"
PENDING_PREFIX = "groundlabel:pending:"
ENQUEUING_PREFIX = "groundlabel:enqueuing:"
INTERACTIVE_PREFIX = "groundlabel:interactive:"
CLEANUP_LOCK = "groundlabel:cleanup-lock"
#: The dotted paths of :func:`store_results` and :func:`forget_payload`, as RQ stores callbacks.
STORE_RESULTS = "groundlabel.redis_queue.store_results"
FORGET_PAYLOAD = "groundlabel.redis_queue.forget_payload"

#: Claim the free pending markers of KEYS[1..n-1] for job ARGV[1], numbered in claim order, with TTL
#: ARGV[2]; mark the job as being enqueued (KEYS[n]). Returns the 0-based positions claimed.
CLAIM_SCRIPT = """
local taken = {}
for i = 1, #KEYS - 1 do
  if redis.call('SET', KEYS[i], ARGV[1] .. ':' .. #taken, 'NX', 'EX', ARGV[2]) then
    taken[#taken + 1] = i - 1
  end
end
if #taken > 0 then redis.call('SET', KEYS[#KEYS], '1', 'EX', 60) end
return taken
"""


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
    _drop_inline_images(job, connection)
    keys = list((job.meta or {}).get("cache_keys") or [])
    if not keys or not isinstance(result, list):
        return
    ttl = int((job.meta or {}).get("cache_ttl") or 86400)
    with connection.pipeline() as pipe:
        for key, prediction in zip(keys, result, strict=False):
            if isinstance(prediction, dict) and not prediction.get("error"):
                version = str(prediction.get("model_version") or "")
                pipe.set(RESULT_PREFIX + result_key(key, version), json.dumps(prediction), ex=ttl)
            pipe.delete(PENDING_PREFIX + key)
        pipe.execute()


def forget_payload(job: Any, connection: redis.Redis, *exc_info: Any) -> None:
    """RQ failure callback (run in the worker): a job with no retry left keeps no inline image."""
    if not job.should_retry:
        _drop_inline_images(job, connection)


def _drop_inline_images(job: Any, connection: redis.Redis) -> None:
    """Rewrite the job's stored payload without its inline images (it will not run again)."""
    args = list(job.args or ())
    if not args or not isinstance(args[0], dict):
        return
    slim = slim_payload(args[0])
    if slim != args[0]:
        job.args = (slim, *args[1:])
        connection.hset(job.key, "data", zlib.compress(job.data))


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
