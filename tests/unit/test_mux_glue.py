"""meshlet-mux/1 socket glue (agent.proxy.muxglue) over a real loopback mTLS
connection: streams as asyncio transports, flow control that stalls one
stream and not its neighbour, half-close, reset, GOAWAY drain."""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket

from agent.proxy import mux
from agent.proxy.muxglue import MuxSession
from agent.proxy.relay import Endpoint, Relay
from agent.proxy.tls import MUX_ALPN, TlsContexts
from tests.support.aio import run, until
from tests.support.ca import CertFactory
from tests.unit.test_proxy_tls import CLIENT, OTHER, SERVER, TD, Certs, Server, connect


async def read_all(ep: Endpoint) -> bytes:
    out = bytearray()
    while True:
        b = await ep.receive()
        if not b:
            return bytes(out)
        out += b


class Pair:
    """A client and a server MuxSession over one TLS connection on loopback."""

    async def __aenter__(self):
        f = CertFactory(TD)
        self.srv = Server(TlsContexts(Certs(f, SERVER, OTHER)), app_factory=lambda: Endpoint("client"))
        await self.srv.__aenter__()
        self.opened: asyncio.Queue = asyncio.Queue()
        conn, ep = await connect(TlsContexts(Certs(f, CLIENT, OTHER)), self.srv.port, app=Endpoint("up"))
        assert conn.alpn == MUX_ALPN
        self.counters: dict[str, int] = {}
        self.client = MuxSession(conn, client=True, counters=self.counters)
        self.client.attach(ep)
        await until(lambda: self.srv.conns and self.srv.conns[0].alpn == MUX_ALPN)
        self.server = MuxSession(
            self.srv.conns[0],
            client=False,
            counters=self.counters,
            on_stream=lambda _s, st, sep: self.opened.put_nowait((st, sep)),
        )
        self.server.attach(self.srv.apps[0])
        return self

    async def open(self, first: bytes = b"hdr"):
        ep = Endpoint("upstream")
        self.client.open_stream(first, ep)
        st, sep = await asyncio.wait_for(self.opened.get(), 10)
        assert await sep.receive() == first
        return ep, sep

    async def __aexit__(self, *exc):
        self.client.close()
        self.server.close()
        await self.srv.__aexit__(*exc)



def count_writes(tr) -> list[int]:
    """Patch a TLS connection's plaintext transport so that each write (or
    writelines: one TLS write of several buffers) appends its size."""
    sizes: list[int] = []
    real, real_lines = tr.write, tr.writelines

    def write(data):
        sizes.append(len(data))
        real(data)

    def writelines(bufs):
        bufs = list(bufs)
        sizes.append(sum(len(b) for b in bufs))
        real_lines(bufs)

    tr.write, tr.writelines = write, writelines
    return sizes

def test_a_stalled_stream_does_not_stall_its_neighbour_and_completes_intact():
    async def main():
        async with Pair() as p:
            bulk, bulk_srv = await p.open()
            req, req_srv = await p.open()
            blob = bytes(range(256)) * (5 * mux.INITIAL_WINDOW // 256)  # five windows
            bulk.write(blob)
            bulk.write_eof()
            bulk_srv.transport.pause_reading()  # the destination reads nothing
            await until(lambda: bulk.transport.get_write_buffer_size() > 0)  # the window is full
            assert bulk._write_paused  # the source is told to stop
            req.write(b"ping")
            assert await asyncio.wait_for(req_srv.receive(), 10) == b"ping"
            req_srv.write(b"pong")
            assert await asyncio.wait_for(req.receive(), 10) == b"pong"
            bulk_srv.transport.resume_reading()
            got = await asyncio.wait_for(read_all(bulk_srv), 30)
            assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
            assert bulk.transport.get_write_buffer_size() == 0 and not bulk._write_paused
            assert p.counters["tunnel_streams_out"] == 2 and p.counters["tunnel_streams_in"] == 2

    run(main())


def test_writes_of_several_streams_in_one_callback_share_one_tls_write():
    # A response (or request) per stream used to cost a TLS record and a
    # send each; writes made in one loop iteration now go out together at
    # its end, in order, and each stream still gets exactly its bytes.
    async def main():
        async with Pair() as p:
            pairs = [await p.open() for _ in range(3)]
            tls_writes = count_writes(p.client.transport)
            for i, (c, _s) in enumerate(pairs):
                c.write(b"request %d" % i)
                c.write(b" and more")
            assert tls_writes == []  # not yet: at the end of this iteration
            for i, (_c, s) in enumerate(pairs):
                want, got = b"request %d and more" % i, b""
                while len(got) < len(want):
                    got += await asyncio.wait_for(s.receive(), 10)
                assert got == want
            assert len(tls_writes) == 1
            c, s = pairs[0]  # a FIN right after a write still comes after its bytes
            c.write(b"last")
            c.write_eof()
            assert await asyncio.wait_for(read_all(s), 10) == b"last"

    run(main())


def test_half_close_both_ways_then_close():
    async def main():
        async with Pair() as p:
            c, s = await p.open()
            c.write(b"request")
            c.write_eof()
            assert await asyncio.wait_for(read_all(s), 10) == b"request"
            s.write(b"response after the client's FIN")
            s.write_eof()
            assert await asyncio.wait_for(read_all(c), 10) == b"response after the client's FIN"
            c.close()
            s.close()
            await until(lambda: c.lost and s.lost)
            assert c.lost_exc is None and s.lost_exc is None  # graceful both ways
            assert not p.client.streams and not p.server.streams

    run(main())


def test_reset_reaches_the_other_end_and_only_that_stream():
    async def main():
        async with Pair() as p:
            a, a_srv = await p.open()
            b, b_srv = await p.open()
            a_srv.reset()  # the pod reset its connection
            await until(lambda: a.lost)
            assert isinstance(a.lost_exc, ConnectionResetError)
            b.write(b"still here")
            assert await asyncio.wait_for(b_srv.receive(), 10) == b"still here"
            assert not p.client.closed

    run(main())


def test_goaway_lets_open_streams_finish_then_closes():
    async def main():
        async with Pair() as p:
            c, s = await p.open()
            p.server.drain("certificate rotated")
            await until(lambda: p.client.draining)
            assert not p.client.can_open()
            c.write(b"last words")
            c.write_eof()
            assert await asyncio.wait_for(read_all(s), 10) == b"last words"
            s.write_eof()
            assert await asyncio.wait_for(read_all(c), 10) == b""
            c.close()
            s.close()
            await until(lambda: p.client.closed and p.server.closed)

    run(main())


def test_a_drain_waits_for_a_slow_peer_to_read_the_notice_before_the_final_goaway():
    """The peer (a loaded source proxy) reads nothing for longer than the
    old fixed 1 s between notice and final GOAWAY, and opens a stream
    meanwhile: the server sends the final GOAWAY only after the peer ACKs
    the notice's PING, so that stream is served, not refused (a refusal
    reset a pod connection in a worker hand-over under load)."""

    async def main():
        async with Pair() as p:
            p.client.tls.raw.pause_reading()  # the peer reads nothing (its loop is starved)
            p.server.drain("worker hand-over")
            ep = Endpoint("upstream")
            p.client.open_stream(b"late", ep)  # it has not seen the notice: this OPEN crosses it
            await asyncio.sleep(1.5)  # longer than the old fixed delay (not a timing assertion)
            assert p.server.core.goaway_sent is None  # no final GOAWAY before the peer read the notice
            p.client.tls.raw.resume_reading()
            st, sep = await asyncio.wait_for(p.opened.get(), 10)
            assert await sep.receive() == b"late"
            await until(lambda: p.server.core.goaway_sent is not None)  # after the ACK
            ep.write(b" and served")
            ep.write_eof()
            assert await asyncio.wait_for(read_all(sep), 10) == b" and served"
            sep.write(b"answer")
            sep.write_eof()
            assert await asyncio.wait_for(read_all(ep), 10) == b"answer"
            assert ep.lost_exc is None and not p.counters.get("tunnel_mux_errors")
            ep.close()
            sep.close()
            await until(lambda: p.client.closed and p.server.closed)

    run(main())


def test_a_protocol_error_resets_every_stream():
    async def main():
        async with Pair() as p:
            c, _ = await p.open()
            p.client.transport.write(mux.frame(9, 0, 1))  # an unknown frame type
            await until(lambda: c.lost)
            assert isinstance(c.lost_exc, ConnectionResetError)
            assert p.counters["tunnel_mux_errors"] == 1 and p.server.closed

    run(main())


def test_interleaved_bulk_streams_relayed_to_slow_pods_arrive_whole_and_in_order():
    """Two bulk streams share the connection and are relayed to real sockets
    (the pods) that stop reading for a while: the batched delivery of a
    stream's DATA (one writelines per read), the paused-stream buffer and the
    grown bulk window must keep every byte, in order, on its own stream."""

    async def main():
        loop = asyncio.get_running_loop()
        async with Pair() as p:
            pods = []
            for i in range(2):
                src, dst = await p.open(b"h%d" % i)
                mine, theirs = socket.socketpair()
                theirs.setblocking(False)
                tr, pod_ep = await loop.create_connection(lambda: Endpoint("pod"), sock=mine)
                Relay(dst, pod_ep, buffer_size=64 * 1024).start()
                blob = random.Random(i).randbytes(6 * mux.BULK_WINDOW + 17)  # no period: order shows
                pods.append((src, theirs, blob))
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)

            async def reader(sock: socket.socket, n: int, stall: bool) -> bytes:
                got = bytearray()
                if stall:  # let the pod socket, the relay and the stream fill up first
                    streams = p.server.streams
                    await until(lambda: streams and any(st._read_paused for st in streams.values()))
                while len(got) < n:
                    got += await loop.sock_recv(sock, 1 << 20)
                return bytes(got)

            for src, _, blob in pods:  # interleaved on the wire: both written before either is read
                for off in range(0, len(blob), 100_000):
                    src.write(blob[off : off + 100_000])
            got = await asyncio.gather(*(reader(t, len(b), i == 0) for i, (_, t, b) in enumerate(pods)))
            for (_, t, blob), data in zip(pods, got, strict=True):
                assert hashlib.sha256(data).digest() == hashlib.sha256(blob).digest()
                t.close()

    run(main())


def test_a_small_view_held_for_a_paused_stream_is_copied_not_pinning_the_whole_read():
    async def main():
        async with Pair() as p:
            src, dst = await p.open()
            st = next(iter(p.server.streams.values()))
            st.pause_reading()
            big = bytes(64 * 1024)
            st.deliver(memoryview(big)[:10])  # a small slice of a large read, while paused
            st.deliver(memoryview(big)[: 32 * 1024])  # half of it: kept as a view
            assert type(st._rbuf[0]) is bytes and st._rbuf[0] == bytes(10)
            assert isinstance(st._rbuf[1], memoryview) and st._rbuf[1].obj is big
            st.resume_reading()
            assert await asyncio.wait_for(dst.receive(), 10) == bytes(10 + 32 * 1024)
def test_an_open_and_the_bytes_written_right_after_it_share_one_write():
    """A new stream's OPEN waits for the end of the callback, so the client
    bytes the source forwards at once ride in the same TLS record (one send
    per new connection, not two); an OPEN with nothing behind it still goes
    out on its own.  The connection's only stream does not wait for the end
    of the callback to send what it writes (no other stream's bytes could
    join them): OPEN and DATA go at once, in one write."""

    async def main():
        async with Pair() as p:
            writes = count_writes(p.client.transport)
            ep = Endpoint("upstream")
            p.client.open_stream(b"hdr", ep)
            assert writes == []  # the OPEN waits for the bytes behind it
            ep.write(b"first bytes")
            assert len(writes) == 1  # the only stream: OPEN and DATA together, at once
            st, sep = await asyncio.wait_for(p.opened.get(), 10)
            got = b""
            while len(got) < len(b"hdrfirst bytes"):
                got += await asyncio.wait_for(sep.receive(), 10)
            assert got == b"hdrfirst bytes"
            assert len(writes) == 1

            writes.clear()
            alone = Endpoint("upstream")
            p.client.open_stream(b"solo", alone)
            assert writes == []  # not yet: at the end of this callback
            _, sep2 = await asyncio.wait_for(p.opened.get(), 10)
            assert await asyncio.wait_for(sep2.receive(), 10) == b"solo"
            assert len(writes) == 1

    run(main())


def test_a_held_reply_rides_with_the_first_write_or_goes_alone_when_due():
    """StreamTransport.hold: the destination's reply waits for the stream's
    first write (one TLS write for both, reply first), its FIN, or its
    reset; with none of them it goes alone after the delay."""

    async def main():
        async with Pair() as p:
            writes = count_writes(p.server.transport)
            ep, sep = await p.open()
            sep.transport.hold(b"REPLY", 30)
            await asyncio.sleep(0.05)
            assert writes == []  # held
            sep.write(b"answer")
            got = b""
            while len(got) < len(b"REPLYanswer"):
                got += await asyncio.wait_for(ep.receive(), 10)
            assert got == b"REPLYanswer" and len(writes) == 1

            ep2, sep2 = await p.open()  # nothing written: the reply goes when due
            sep2.transport.hold(b"REPLY", 0.05)
            assert await asyncio.wait_for(ep2.receive(), 10) == b"REPLY"
            sep2.write(b"later")
            assert await asyncio.wait_for(ep2.receive(), 10) == b"later"

            ep3, sep3 = await p.open()  # a FIN first: the reply, then the FIN
            sep3.transport.hold(b"REPLY", 30)
            sep3.write_eof()
            assert await asyncio.wait_for(read_all(ep3), 10) == b"REPLY"

            ep4, sep4 = await p.open()  # a reset first: the reply, then the reset
            sep4.transport.hold(b"REPLY", 30)
            sep4.transport.abort()
            assert await asyncio.wait_for(ep4.receive(), 10) == b"REPLY"
            await until(lambda: ep4.lost)

    run(main())
