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

Jobs are :class:`GroundlabelJob`: RQ's job, except that a large payload (inline images: base64 of
PNG or JPEG bytes, which deflate gains little on) is stored without compression, which costs a
``/predict`` with a 200 KB image 4 ms less on the backend, and that its JSON is written with long strings
a slice at a time (:func:`dumps_json`, :func:`pack`): the backend's thread that enqueues a 50 MB inline
image never holds the GIL for more than a few milliseconds at once, so its event loop keeps answering.
"""

from __future__ import annotations

import json
import re
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import redis
from rq import Queue
from rq.job import UNEVALUATED, Job
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


#: A job's serialized payload longer than this (bytes) is stored as a zlib stream without compression.
COMPRESS_MAX_BYTES = 64 * 1024
#: Strings longer than this (inline images) are written into a job's JSON a slice at a time.
LONG_STRING_CHARS = 64 * 1024
_SLICE = 1 << 18
#: The bytes ``json.dumps`` (``ensure_ascii``) writes as they are: printable ASCII but ``"`` and ``\``.
_VERBATIM = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
_STORED_BLOCK = 65535


def pack(data: bytes) -> bytes:
    """A job's payload as RQ stores it (a zlib stream, which RQ reads back with ``zlib.decompress``):
    deflated when small, stored when large (:func:`stored_zlib`)."""
    return zlib.compress(data, 6) if len(data) <= COMPRESS_MAX_BYTES else stored_zlib(data)


def stored_zlib(data: bytes) -> bytes:
    """``zlib.compress(data, 0)``'s stream (stored blocks, no compression), built from copies of 64 KiB and
    joined with the GIL released, so that other threads run while a large payload is packed."""
    parts = [b"\x78\x01"]
    for start in range(0, len(data), _STORED_BLOCK):
        block = data[start : start + _STORED_BLOCK]
        last = start + _STORED_BLOCK >= len(data)
        parts += [struct.pack("<BHH", last, len(block), len(block) ^ 0xFFFF), block]
    if not data:
        parts.append(b"\x01\x00\x00\xff\xff")
    parts.append(struct.pack(">I", zlib.adler32(data)))
    return b"".join(parts)


def dumps_json(obj: Any) -> bytes:
    """``json.dumps(obj).encode()`` (the same JSON value), with every string longer than
    :data:`LONG_STRING_CHARS` written a slice of 1 MiB at a time: encoding a 50 MB inline image never holds
    the GIL for long, where ``json.dumps`` would hold it for the whole string (about 0.4 s)."""
    long: list[str] = []
    token = uuid.uuid4().hex  # placeholders no input can spell: a fresh token each call

    def strip(value: Any) -> Any:
        if isinstance(value, str) and len(value) > LONG_STRING_CHARS:
            long.append(value)
            return f"\x00{token}{len(long) - 1}"
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [strip(v) for v in value]
        return value

    skeleton = json.dumps(strip(obj))
    if not long:
        return skeleton.encode()
    parts: list[bytes] = []
    position = 0
    for match in re.finditer(r'"\\u0000' + token + r'(\d+)"', skeleton):
        parts.append(skeleton[position : match.start()].encode())
        parts.extend(_json_string(long[int(match.group(1))]))
        position = match.end()
    parts.append(skeleton[position:].encode())
    return b"".join(parts)


def _json_string(text: str) -> Iterator[bytes]:
    """``json.dumps(text).encode()`` in pieces, one slice of 256 Ki characters of ``text`` at a time."""
    yield b'"'
    for start in range(0, len(text), _SLICE):
        piece = text[start : start + _SLICE]
        if piece.isascii():
            raw = piece.encode("ascii")
            if not raw.translate(None, _VERBATIM):  # nothing to escape (base64, URLs)
                yield raw
                continue
        yield json.dumps(piece)[1:-1].encode("ascii")
    yield b'"'


class GroundlabelJob(Job):
    """An RQ job whose payload is written by :func:`dumps_json` and, when large, not deflated
    (:func:`pack`); read back like any RQ job (its JSON is JSON)."""

    @property
    def data(self) -> bytes:
        if self._data is UNEVALUATED and self._func_name is not UNEVALUATED:
            instance = None if self._instance is UNEVALUATED else self._instance
            args = () if self._args is UNEVALUATED else self._args
            kwargs = {} if self._kwargs is UNEVALUATED else self._kwargs
            self._data = dumps_json((self._func_name, instance, args, kwargs))
        return Job.data.fget(self)

    @data.setter
    def data(self, value: bytes) -> None:
        Job.data.fset(self, value)

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict:
        data = self.data
        self._data = b""  # RQ deflates what it holds: give it nothing, then store the payload by pack()
        try:
            obj = super().to_dict(include_meta=include_meta, include_result=include_result)
        finally:
            self._data = data
        obj["data"] = pack(data)
        return obj


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
            job_class=GroundlabelJob,
            default_timeout=settings.timeout_for(name == QUEUE_INTERACTIVE),
        )
        for name in (QUEUE_INTERACTIVE, QUEUE_BATCH)
    }


def store_results(job: Any, connection: redis.Redis, result: Any, *args: Any, **kwargs: Any) -> None:
    """RQ success callback (run in the worker): cache each task's prediction, drop the pending markers.

    A task whose prediction carries an ``error`` is not cached: the next request tries it again.
    """
    with connection.pipeline() as pipe:
        add_results(job, pipe, result)
        pipe.execute()


def add_results(job: Any, pipe: redis.client.Pipeline, result: Any) -> None:
    """What :func:`store_results` writes, added to ``pipe``: the worker sends it with the job's own
    bookkeeping, in one round trip (:data:`PIPELINED_CALLBACKS`)."""
    _drop_inline_images(job, pipe)
    keys = list((job.meta or {}).get("cache_keys") or [])
    if not keys or not isinstance(result, list):
        return
    ttl = int((job.meta or {}).get("cache_ttl") or 86400)
    for key, prediction in zip(keys, result, strict=False):
        if isinstance(prediction, dict) and not prediction.get("error"):
            version = str(prediction.get("model_version") or "")
            pipe.set(RESULT_PREFIX + result_key(key, version), json.dumps(prediction), ex=ttl)
        pipe.delete(PENDING_PREFIX + key)


#: Success callbacks that only write: the worker adds their writes to its own pipeline instead.
PIPELINED_CALLBACKS = {STORE_RESULTS: add_results}


def forget_payload(job: Any, connection: redis.Redis, *exc_info: Any) -> None:
    """RQ failure callback (run in the worker): a job with no retry left keeps no inline image."""
    if not job.should_retry:
        _drop_inline_images(job, connection)


def _drop_inline_images(job: Any, connection: redis.Redis | redis.client.Pipeline) -> None:
    """Rewrite the job's stored payload without its inline images (it will not run again)."""
    args = list(job.args or ())
    if not args or not isinstance(args[0], dict):
        return
    slim = slim_payload(args[0])
    if slim != args[0]:
        job.args = (slim, *args[1:])
        connection.hset(job.key, "data", pack(job.data))


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
