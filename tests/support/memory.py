"""How much memory an object graph holds, for tests and benchmarks of bounded structures."""

from __future__ import annotations

import sys
from typing import Any


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and everything it references (ints and strings included).

    Follows dicts, lists, tuples, sets, ``__slots__`` and instance ``__dict__``;
    skips classes and anything named ``_clock`` (the shared reactor is not part of it).
    """
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set)):
        size += sum(deep_size(x, seen) for x in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        size += deep_size({k: v for k, v in vars(obj).items() if k != "_clock"}, seen)
    return size
