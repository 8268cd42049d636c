"""Hot caches of each room's recent messages."""

from __future__ import annotations

from parley.cache.base import CacheStats, Entry, HotCache
from parley.cache.memory import MemoryCache

__all__ = ["CacheStats", "Entry", "HotCache", "MemoryCache"]
