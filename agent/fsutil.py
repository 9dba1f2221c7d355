"""Small file-system helpers shared by the agent and the policy store."""

from __future__ import annotations

import os


def write_atomic(path: str, data: str) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the
    new one, never a part: write a temporary file beside it, fsync, rename.

    The temporary file (``<path>.tmp.<pid>``) is removed when anything fails
    (a full disk, a missing directory's race, an interrupt) and the error is
    re-raised; ``path`` is then untouched."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
