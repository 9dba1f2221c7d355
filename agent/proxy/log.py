"""Logging for proxy workers: stderr diagnostics and the JSON access log."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

__all__ = ["setup_logging", "AccessLog"]


def setup_logging(worker_id: int, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s meshlet-proxy[{worker_id}] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLog:
    """One JSON document per line, per finished connection. Path None: off.

    Lines are small and written with line buffering; a failing disk logs one
    error and disables the access log rather than breaking connections.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._f = open(path, "a", buffering=1, encoding="utf-8") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        try:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        except (OSError, ValueError) as e:
            logging.getLogger("meshlet.proxy").error(
                "access log %s disabled after write error: %s (check disk space and permissions)", self.path, e
            )
            self.close()

    def close(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
