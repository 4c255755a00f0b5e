"""One least-recently-used cache for the workers: bounded by entries or by total weight, optionally
expiring, thread-safe, with hit and miss counters."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Values by key, the least recently used dropped first beyond ``max_size`` entries or ``max_weight``
    (the sum of ``weight(value)``: a value heavier than that alone is not kept); with ``ttl``, an entry
    older than ``ttl`` seconds is gone. A size or weight of 0 keeps nothing."""

    def __init__(
        self,
        max_size: int | None = None,
        *,
        max_weight: int | None = None,
        weight: Callable[[V], int] | None = None,
        ttl: float | None = None,
    ) -> None:
        self.max_size, self.max_weight, self.ttl = max_size, max_weight, ttl
        self._weight = weight or (lambda _value: 1)
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0  # the sum of the kept values' weights
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> V | None:
        """The value (marked recently used), or None when absent or expired."""
        with self._lock:
            item = self._data.get(key)
            if item is not None and self.ttl is not None and item[0] + self.ttl < time.monotonic():
                self._drop(key)
                item = None
            if item is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``, then drop the least recently used entries until the bounds hold."""
        with self._lock:
            if key in self._data:
                self._drop(key)
            weight = self._weight(value)
            if self.max_size == 0 or (self.max_weight is not None and weight > self.max_weight):
                return
            self._data[key] = (time.monotonic(), value)
            self.weight += weight
            while (self.max_size is not None and len(self._data) > self.max_size) or (
                self.max_weight is not None and self.weight > self.max_weight
            ):
                self._drop(next(iter(self._data)))

    def pop(self, key: Hashable) -> V | None:
        """Remove and return the value of ``key`` (None when absent)."""
        with self._lock:
            return self._drop(key) if key in self._data else None

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._data.clear()
            self.weight = self.hits = self.misses = 0

    def _drop(self, key: Hashable) -> V:
        value = self._data.pop(key)[1]
        self.weight -= self._weight(value)
        return value
