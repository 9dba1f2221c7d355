"""Talk to a Unix-socket endpoint that answers with one document and closes
(the agent's admin API, a proxy worker's stats socket).  Stdlib only."""

from __future__ import annotations

import json
import socket


def unix_request(path: str, request: bytes = b"", timeout: float = 5.0) -> bytes:
    """Connect, send ``request`` (may be empty), read until EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        if request:
            s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def admin_get(sock_path: str, path: str, timeout: float = 5.0) -> tuple[int, dict]:
    """GET ``path`` from the agent's admin API: (HTTP status, JSON body).
    Raises OSError when the agent is unreachable, ValueError on garbage."""
    raw = unix_request(sock_path, f"GET {path} HTTP/1.0\r\n\r\n".encode(), timeout)
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split()[1])
    except (IndexError, ValueError):
        raise ValueError(f"not an HTTP answer from {sock_path}: {head[:80]!r}") from None
    return status, json.loads(body)
