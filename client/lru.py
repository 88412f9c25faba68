"""A small least-recently-used map: the bounded caches a ClientApp process keeps (client/state.py)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``capacity`` entries; adding one more drops the least recently used.

    ``lock`` is re-entrant and guards every call; callers that read, build and store under one
    key hold it around the whole sequence, so that two threads never build the same entry twice.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"an LRU cache needs room for at least one entry, got {capacity}")
        self.capacity = capacity
        self.lock = threading.RLock()
        self._entries: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The entry (now the most recently used), or None."""
        with self.lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: K, value: V) -> None:
        with self.lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The entry, made by ``make`` under the lock if absent (two threads never make it twice)."""
        with self.lock:
            value = self.get(key)
            if value is None:
                value = make()
                self.put(key, value)
            return value

    def pop(self, key: K) -> None:
        with self.lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()

    def __contains__(self, key: object) -> bool:
        with self.lock:
            return key in self._entries

    def __len__(self) -> int:
        with self.lock:
            return len(self._entries)

    def keys(self) -> list[K]:
        """Least recently used first."""
        with self.lock:
            return list(self._entries)
