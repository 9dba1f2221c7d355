"""Garbage-collector helpers shared by the YAML readers and the proxy workers."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["gc_paused"]


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a big tree of small objects is
    built (composing, then reading a large file).  Reference counting still
    frees everything; the collector runs again as soon as the block ends.
    Nested use is fine: only the outermost block re-enables it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
