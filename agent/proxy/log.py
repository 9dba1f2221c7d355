"""Logging for proxy workers: stderr diagnostics and the JSON access log."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any

__all__ = ["setup_logging", "AccessLog", "sampled"]


def sampled(key: str, rate: float) -> bool:
    """Whether the connection named ``key`` is logged at sampling ``rate``.

    Deterministic: the same key gives the same answer, so both node proxies
    of a cross-node connection (keyed by its original 4-tuple) agree; over
    many keys the fraction logged is ``rate``."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < rate * (1 << 64)


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

    def reopen(self, path: str | None) -> None:
        """Switch to ``path`` (None: off).  A path that cannot be opened
        logs an error and leaves the access log off."""
        if path == self.path and (self._f is not None or path is None):
            return
        self.close()
        self.path = path
        try:
            self._f = open(path, "a", buffering=1, encoding="utf-8") if path else None
        except OSError as e:
            logging.getLogger("meshlet.proxy").error("cannot open access log %s: %s", path, e)

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
