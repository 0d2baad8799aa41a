"""KV-cache memory management: page allocator, per-sequence page tables, radix prefix cache
(the Python tree in radix.py, the native one in native.py over csrc/)."""

from radixrt.cache.allocator import PageAllocator
from radixrt.cache.backend import native_available
from radixrt.cache.native import NativeRadixCache
from radixrt.cache.page_table import SequencePages
from radixrt.cache.prefix_cache import NoPrefixCache, PrefixCache, make_prefix_cache
from radixrt.cache.radix import CacheStats, InsertResult, MatchResult, Node, RadixCache

__all__ = [
    "CacheStats",
    "InsertResult",
    "MatchResult",
    "NativeRadixCache",
    "NoPrefixCache",
    "Node",
    "PageAllocator",
    "PrefixCache",
    "RadixCache",
    "SequencePages",
    "make_prefix_cache",
    "native_available",
]
