"""Small keep-alive HTTP/1.1 servers on loopback that record what they get,
and a one-request client — the upstreams and clients of the in-process proxy
tests (tests/support/mesh.py)."""

from __future__ import annotations

import asyncio


class RecordingServer:
    """Keep-alive HTTP/1.1 server on ``ip`` (the kernel picks the port).

    Answers each request head with :meth:`answer`; keeps every request line
    (``lines``) and counts the TCP connections it accepted (``connections``),
    so a test can assert what reached the backend.  Requests carry no body
    (the tests send GETs and the like)."""

    def __init__(self, ip: str):
        self.ip = ip
        self.lines: list[bytes] = []
        self.connections = 0

    def answer(self, head: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def start(self):
        self.srv = await asyncio.start_server(self._handle, self.ip, 0)
        self.port = self.srv.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        self.srv.close()
        await self.srv.wait_closed()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                self.lines.append(head.split(b"\r\n", 1)[0])
                writer.write(self.answer(head))
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()


class Recorder(RecordingServer):
    """Answers every request 200 ``ok``."""


class HeaderEcho(RecordingServer):
    """Answers every request 200 with the request head it received."""

    def answer(self, head: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(head), head))


class StatusServer(RecordingServer):
    """``/ok...`` gets 200 with a 5-byte body, anything else 404."""

    def answer(self, head: bytes) -> bytes:
        ok = head.split(b" ", 2)[1].startswith(b"/ok")
        body = b"fine\n" if ok else b"not found here\n"
        return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                % (200 if ok else 404, len(body), body))


async def http_request(reader, writer, method: str = "GET", path: str = "/", *, host: str = "web",
                       headers: tuple[tuple[str, str], ...] = ()) -> tuple[int, bytes, bytes]:
    """One request on an open (keep-alive) connection; reads the response
    by its Content-Length: (status, response head, body)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, head, body
