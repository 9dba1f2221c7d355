"""TLS 1.3 bulk over loopback: memory BIOs (``SSLObject``, what the proxy's
tunnel uses) against a socket BIO (``SSLSocket``: OpenSSL reads and writes
the socket itself), and plain TCP, CPU seconds per GB of each end.

A sender process pushes ``--gb`` GB in ``--chunk`` writes to a receiver
process over 127.0.0.1 (nothing leaves the machine; both ends exit when
the bytes are through).  ``--frames N`` makes the memory-BIO sender
encrypt each N-byte frame after a 9-byte header of its own, as the
tunnel's mux does.  No root needed.

    .venv/bin/python scripts/tls_bio_bench.py --rounds 2

Answers one question with numbers: are the memory BIOs' extra copies what
makes the proxy's TLS cost more than the cipher (issue #13, bulk)?
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import socket
import ssl
import sys
import tempfile
import time


def _self_signed(directory: str) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls-bio-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    cp, kp = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cp, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kp, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cp, kp


def _bio_handshake(sock: socket.socket, obj: ssl.SSLObject, out: ssl.MemoryBIO, inc: ssl.MemoryBIO) -> None:
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out.pending:
                sock.sendall(out.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("peer closed during the handshake") from None
            inc.write(data)
    if out.pending:
        sock.sendall(out.read())


def receive(conn: socket.socket, mode: str, total: int, chunk: int, cert: tuple[str, str]) -> None:
    buf = bytearray(chunk)
    got = 0
    if mode == "plain":
        while got < total and (n := conn.recv_into(buf)):
            got += n
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(*cert)
    if mode == "socket":
        s = ctx.wrap_socket(conn, server_side=True)
        while got < total and (n := s.recv_into(buf)):
            got += n
        return
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=True)
    _bio_handshake(conn, obj, out, inc)
    while got < total:
        data = conn.recv(chunk)
        if not data:
            return
        inc.write(data)
        while True:
            try:
                n = obj.read(chunk, buf)
            except ssl.SSLWantReadError:
                break
            if not n:
                return
            got += n


def _send_all(sock: socket.socket, data: bytes, total: int) -> float:
    """Send ``total`` bytes of ``data`` repeated, then half-close: CPU seconds."""
    sent, t0 = 0, time.process_time()
    while sent < total:
        sock.sendall(data)
        sent += len(data)
    cpu = time.process_time() - t0
    sock.shutdown(socket.SHUT_WR)
    return cpu


def send(conn: socket.socket, mode: str, total: int, chunk: int, frames: int) -> float:
    data = os.urandom(chunk)
    sent = 0
    if mode == "plain":
        return _send_all(conn, data, total)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a bench of the record layer: the peer is our own child
    if mode == "socket":
        return _send_all(ctx.wrap_socket(conn), data, total)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out)
    _bio_handshake(conn, obj, out, inc)
    view, header = memoryview(data), b"\0" * 9
    t0 = time.process_time()
    while sent < total:
        if frames:
            for off in range(0, chunk, frames):
                obj.write(header)
                obj.write(view[off : off + frames])
        else:
            obj.write(data)
        conn.sendall(out.read())
        sent += chunk
    cpu = time.process_time() - t0
    conn.shutdown(socket.SHUT_WR)
    return cpu


def run(mode: str, total: int, chunk: int, frames: int, cert: tuple[str, str]) -> dict:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    addr = ls.getsockname()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    pid = os.fork()
    if pid == 0:  # the receiver
        code = 0
        try:
            conn, _ = ls.accept()
            conn.settimeout(60)
            receive(conn, mode, total, chunk, cert)
        except BaseException as e:  # noqa: BLE001 - the forked child reports anything and never returns into the parent's code
            print(f"receiver: {e!r}", file=sys.stderr)
            code = 1
        os._exit(code)
    ls.close()
    wall = time.monotonic()
    try:
        conn = socket.create_connection(addr, timeout=60)
        cpu = send(conn, mode, total, chunk, frames)
    except BaseException:
        os.kill(pid, 9)  # never leave the receiver behind
        raise
    finally:
        _, status = os.waitpid(pid, 0)
    wall = time.monotonic() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    gb = total / 1e9
    recv_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "mode": mode + (f"+{frames}B frames" if frames and mode == "bio" else ""),
        "sender_s_per_GB": round(cpu / gb, 3),
        "receiver_s_per_GB": round(recv_cpu / gb, 3),
        "gbps": round(total * 8 / 1e9 / wall, 2),
        "receiver_ok": status == 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GB per run (default 1)")
    ap.add_argument("--chunk", type=int, default=256 * 1024, help="bytes per write (default 256 KiB)")
    ap.add_argument("--frames", type=int, default=64 * 1024, help="frame size of the framed run (0: none)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of every mode, alternated (default 2)")
    a = ap.parse_args()
    total = int(a.gb * 1e9) // a.chunk * a.chunk
    with tempfile.TemporaryDirectory(prefix="tls-bio-bench-") as d:
        cert = _self_signed(d)
        modes = [("plain", 0), ("bio", 0), ("socket", 0)] + ([("bio", a.frames)] if a.frames else [])
        for _ in range(a.rounds):
            for mode, frames in modes:
                print(run(mode, total, a.chunk, frames, cert), flush=True)


if __name__ == "__main__":
    main()
