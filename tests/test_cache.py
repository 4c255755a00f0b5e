"""workers.cache.LRUCache: the one least-recently-used cache of the workers (text embeddings, image
embeddings, in-process results, trained engines)."""

from __future__ import annotations

import pytest

from workers import cache as cache_module
from workers.cache import LRUCache


def test_the_least_recently_used_entry_goes_first():
    c: LRUCache[int] = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # "b" is now the least recently used
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert (c.hits, c.misses, len(c)) == (3, 1, 2)
    assert c.pop("a") == 1 and c.pop("a") is None and len(c) == 1
    c.clear()
    assert (c.hits, c.misses, len(c)) == (0, 0, 0)


def test_a_weight_bound_keeps_the_total_and_refuses_one_too_heavy():
    c: LRUCache[bytes] = LRUCache(max_weight=10, weight=len)
    c.put("a", b"12345")
    c.put("b", b"1234")
    assert c.weight == 9
    c.put("c", b"12")  # 11 > 10: "a" goes
    assert c.get("a") is None and c.weight == 6
    c.put("b", b"123456")  # replacing counts the new weight only
    assert c.weight == 8
    c.put("big", b"x" * 11)
    assert c.get("big") is None and c.weight == 8


def test_a_size_of_zero_keeps_nothing():
    c: LRUCache[int] = LRUCache(0)
    c.put("a", 1)
    assert len(c) == 0 and c.get("a") is None


def test_entries_expire_after_their_ttl(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: now[0])
    c: LRUCache[int] = LRUCache(10, ttl=5.0)
    c.put("a", 1)
    now[0] = 104.0
    assert c.get("a") == 1
    now[0] = 106.0
    assert c.get("a") is None and len(c) == 0


@pytest.mark.parametrize("size", [0, -3])
def test_the_text_embedding_cache_keeps_nothing_when_its_size_is_not_positive(size):
    import numpy as np

    from workers.models.gem.prompts import EmbeddingCache

    c = EmbeddingCache(size)
    c.put("cat", np.ones(3, dtype=np.float32))
    assert len(c) == 0 and c.get("cat") is None and c.misses == 1
