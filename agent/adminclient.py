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


def admin_request(
    sock_path: str, method: str, path: str, body: dict | None = None, timeout: float = 5.0
) -> tuple[int, dict]:
    """``method path`` on the agent's admin API, with ``body`` sent as JSON:
    (HTTP status, JSON body).  Raises OSError when the agent is unreachable,
    ValueError on garbage."""
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.0\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    raw = unix_request(sock_path, (head + "\r\n").encode() + data, timeout)
    head_b, _, answer = raw.partition(b"\r\n\r\n")
    try:
        status = int(head_b.split()[1])
    except (IndexError, ValueError):
        raise ValueError(f"not an HTTP answer from {sock_path}: {head_b[:80]!r}") from None
    return status, json.loads(answer)


def admin_get(sock_path: str, path: str, timeout: float = 5.0) -> tuple[int, dict]:
    """GET ``path`` from the agent's admin API: (HTTP status, JSON body).
    Raises OSError when the agent is unreachable, ValueError on garbage."""
    return admin_request(sock_path, "GET", path, timeout=timeout)
