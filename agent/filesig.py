"""Cheap change detection for watched files (inventory, CA material, proxy
state, policies): a file counts as changed when its inode, size or mtime
does.  Writers replace files atomically (rename), so the inode changes too."""

from __future__ import annotations

import os


def file_sig(path: str) -> tuple[int, int, int] | None:
    """(inode, size, mtime in ns) of ``path``, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)
