"""The YAML inventory file as a :class:`~agent.workloads.source.WorkloadSource`.

The file is re-read when its inode, size or mtime changes
(:func:`agent.filesig.file_sig`; writers replace it atomically, so a rename
counts).  A bad edit (invalid YAML or fields, or an unreadable file) leaves
the last good inventory in force: :meth:`FileSource.poll` records the
error, with ``file:line:column`` for each problem, and raises it once; it
returns None afterwards until the file changes again.
"""

from __future__ import annotations

import os
import time

from agent.filesig import file_sig
from agent.workloads.model import Inventory
from agent.workloads.source import SourceStatus
from agent.workloads.yamlfile import load_inventory
from agent.yamlsrc import SourceError

__all__ = ["FileSource"]


class FileSource:
    """Workloads from the YAML inventory file at ``path``."""

    kind = "file"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self.inventory: Inventory | None = None
        """The last good inventory (None before :meth:`start`)."""
        self._sig: tuple | None = None
        self._last_good: float | None = None
        self._error: str | None = None

    @property
    def where(self) -> str:
        return self.path

    def start(self) -> Inventory:
        """Read the file; raises SourceError (invalid) or OSError (unreadable)."""
        sig = file_sig(self.path)
        inv = self._load()
        self._sig = sig
        return inv

    def poll(self) -> Inventory | None:
        """The new inventory when the file changed and is good; None when it did
        not change; SourceError/OSError (recorded, last good kept) when bad."""
        sig = file_sig(self.path)
        if sig == self._sig:
            return None
        self._sig = sig
        return self._load()

    def _load(self) -> Inventory:
        try:
            inv = load_inventory(self.path)
        except (SourceError, OSError) as e:
            self._error = str(e)
            raise
        self.inventory, self._last_good, self._error = inv, time.time(), None
        return inv

    def describe(self) -> SourceStatus:
        return SourceStatus(self.kind, self.path, self._last_good, self._error)

    def close(self) -> None:
        pass
