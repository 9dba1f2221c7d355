"""The whole proxy in-process on loopback, with a fake flow table and a fake CA.

Two "nodes": node1 listens on 127.0.0.1, node2 on 127.0.0.2. Pods are echo
servers on other 127.0.0.x addresses; the client pod connects from
127.0.0.10. The fake flow table returns the original destination the test
chooses, standing in for the kernel's connect4 record. Each node has a fake
agent CA (one CertFactory root for both) signing its own pods' CSRs.
The harness lives in tests/support/mesh.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import ssl
import subprocess
import sys

import pytest

from agent.proxy import tunnel
from agent.proxy.conn import Conn, Live
from agent.proxy.relay import Endpoint
from agent.proxy.server import ProxyServer
from agent.proxy.state import StateWatcher
from agent.proxy.tls import ALPN, load_svid_into, sni_for
from tests.support.aio import close_writer, run
from tests.support.ca import make_svid
from tests.support.http import HeaderEcho, http_request
from tests.support.mesh import (
    CLIENT_ID, CLIENT_IP, DB_ID, REPO, TD, V4, WEB_ID, Cluster, FlowOrigin, exchange, expect_reset,
    free_port, state_doc,
)


def test_local_and_passthrough_paths(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            assert await exchange(r, w, b"to-web") == b"to-web|bye from 127.0.0.5"
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.6", c.port("127.0.0.6"), 1001))
            assert await exchange(r, w, b"plain") == b"plain|bye from 127.0.0.6"
            peer, local = c.flows1.calls[0]
            assert peer[0] == CLIENT_IP and local == ("127.0.0.1", c.out_port)
            await asyncio.sleep(0.1)  # let the relays finish their bookkeeping
            return c.access("node1"), c.servers[0].stats()

    log, stats = run(main())
    assert [(e["route"], e["result"], e["dst_pod"]) for e in log] == [
        ("local", "ok", "default/web-1"),
        ("passthrough", "ok", None),
    ]
    e = log[0]
    assert e["direction"] == "outbound" and e["src_pod"] == "default/client"
    assert e["src_identity"] == CLIENT_ID
    assert e["dst_identity"] == WEB_ID and e["peer_verified"] is False  # same node: plaintext
    assert log[1]["dst_identity"] is None
    assert e["bytes_sent"] == 6 and e["bytes_received"] == len(b"to-web|bye from 127.0.0.5")
    assert stats["counters"]["result_ok"] == 2 and stats["active_connections"] == 0


def test_insecure_plaintext_tunnel_for_benchmarks(tmp_path):
    # proxy.tunnelSecurity: insecure-plaintext on both nodes: bytes flow, the
    # identity is carried but marked unverified.
    async def main():
        async with Cluster(tmp_path, security=("insecure-plaintext", "insecure-plaintext")) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            got = await exchange(r, w, b"plain")
            await asyncio.sleep(0.1)
            return got, c.access("node1"), c.access("node2")

    got, log1, log2 = run(main())
    assert got == b"plain|bye from 127.0.0.7"
    assert log1[0]["route"] == "tunnel" and log1[0]["peer_verified"] is False
    assert log2[0]["src_identity"] == CLIENT_ID and log2[0]["peer_verified"] is False


@pytest.mark.parametrize("security", [("insecure-plaintext", "mtls"), ("mtls", "insecure-plaintext")])
def test_mixed_tunnel_security_fails_closed(tmp_path, security):
    # A plaintext client never gets through an mTLS node, and an mTLS client
    # never completes a handshake with a plaintext node.
    async def main():
        async with Cluster(tmp_path, security=security) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            await expect_reset(r, w)
            await asyncio.sleep(0.1)
            return c.access("node1"), c.access("node2")

    log1, log2 = run(main())
    assert [e["result"] for e in log1] != ["ok"]
    assert all(e["result"] != "ok" for e in log2)


def test_tunnel_path_between_two_nodes(tmp_path):
    payload = os.urandom(2 * 1024 * 1024)

    async def main():
        async with Cluster(tmp_path) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            got = await exchange(r, w, payload)  # pipelined right behind the header
            await asyncio.sleep(0.1)
            return got, c.access("node1"), c.access("node2")

    got, log1, log2 = run(main())
    assert got == payload + b"|bye from 127.0.0.7"
    (out,) = log1
    assert (out["route"], out["result"], out["dst_pod"]) == ("tunnel", "ok", "data/db-1")
    assert out["bytes_sent"] == len(payload)
    assert out["dst_identity"] == DB_ID and out["peer_verified"] is True
    (inb,) = log2
    assert inb["direction"] == "inbound" and inb["result"] == "ok"
    assert inb["src_identity"] == CLIENT_ID and inb["peer_verified"] is True
    assert inb["dst_identity"] == DB_ID
    assert inb["src_pod"] == "default/client" and inb["src_addr"].startswith(CLIENT_IP + ":")
    assert inb["dst_pod"] == "data/db-1" and inb["bytes_sent"] == len(payload)


def test_refused_destination_resets_client(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.closed_web, 1001))
            await expect_reset(r, w)
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.closed_db, 1001))  # via the tunnel
            await expect_reset(r, w)
            await asyncio.sleep(0.1)
            return c.access("node1"), c.access("node2")

    log1, log2 = run(main())
    assert [(e["route"], e["result"]) for e in log1] == [("local", "refused"), ("tunnel", "refused")]
    assert "refused" in log1[1]["reason"]
    assert [e["result"] for e in log2] == ["refused"]


def test_rejected_connections_are_reset(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            for origin in (
                None,  # no flow record
                FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 999),  # unknown cgroup
                FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1002),  # cgroup of another pod
                FlowOrigin(V4, "127.0.0.1", c.out_port, 1001),  # the proxy itself
            ):
                r, w = await c.connect(origin)
                await expect_reset(r, w)
            await asyncio.sleep(0.1)
            return c.access("node1"), c.servers[0].stats()

    log, stats = run(main())
    assert [e["result"] for e in log] == ["rejected"] * 4
    assert "no original destination" in log[0]["reason"]
    assert "unknown source cgroup 999" in log[1]["reason"]
    assert "disagree" in log[2]["reason"]
    assert "loop" in log[3]["reason"]
    assert stats["counters"]["flow_misses"] == 1


# What the hand-made tunnels below present: node2's own pod's identity (data/db),
# issued by node2's intermediate and sent from node2's address, as node2's proxy would.
X_ID = DB_ID
NODE2_IP = "127.0.0.2"


def _tls_ctx(c: Cluster, identity: str | None, issuer_node: str | None = "node2") -> ssl.SSLContext:
    """A client context as another node proxy would build it, presenting ``identity``
    issued by ``issuer_node``'s intermediate (None: the factory's unnamed one)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=c.factory.bundle.to_pem().decode())
    ctx.set_alpn_protocols([ALPN])
    if identity:
        issuer = c.factory.node_issuer(issuer_node) if issuer_node else None
        chain, key = c.factory.leaf(identity, issuer=issuer)
        load_svid_into(ctx, make_svid(identity, chain, key))
    return ctx


async def _tunnel_response(r: asyncio.StreamReader):
    """Read and decode the tunnel's response (its leftover: bytes after it)."""
    dec = tunnel.ResponseDecoder()
    out = tunnel.NEED_MORE
    while out is tunnel.NEED_MORE:
        chunk = await asyncio.wait_for(r.read(4096), 10)
        assert chunk, "tunnel closed without a response"
        out = dec.feed(chunk)
    return out


async def _raw_tunnel(c: Cluster, data: bytes, ip="127.0.0.1", source: str | None = NODE2_IP, *,
                      cert: str | None = X_ID, sni: str | None = WEB_ID, expect: int = 0,
                      issuer_node: str | None = "node2"):
    """Speak the tunnel over mTLS by hand: send ``data``, read the response and
    then ``expect`` more bytes (or up to EOF)."""
    r, w = await asyncio.open_connection(ip, c.tun_port, local_addr=(source, 0) if source else None,
                                         ssl=_tls_ctx(c, cert, issuer_node),
                                         server_hostname=sni_for(sni) if sni else "")
    try:
        w.write(data)
        out = await _tunnel_response(r)
        rest = out.leftover
        while expect and len(rest) < expect:
            chunk = await asyncio.wait_for(r.read(4096), 10)
            if not chunk:
                break
            rest += chunk
        if not expect:
            rest += await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await w.wait_closed()
    return out.message, rest


def _header(ip, port, identity=X_ID, src="127.0.0.7"):
    """A tunnel header from ``src`` (default: pod data/db-1's address, on node2)."""
    return tunnel.encode_request(tunnel.TunnelRequest(
        dst=tunnel.Address(V4, ip, port), identity=identity, namespace="data", name="db-1",
        src=tunnel.Address(V4, src, 40000) if src else None))


def test_tunnel_listener_is_not_an_open_relay(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            # node1 is asked for node2's pod, then for a non-pod address
            a = await _raw_tunnel(c, _header("127.0.0.7", c.port("127.0.0.7")) + b"data")
            b = await _raw_tunnel(c, _header("127.0.0.6", c.port("127.0.0.6")))
            bad = await _raw_tunnel(c, b"GET / HTTP/1.1\r\n\r\n")
            ok = await _raw_tunnel(c, _header("127.0.0.5", c.port("127.0.0.5")) + b"hi", expect=2)
            await asyncio.sleep(0.1)
            return a, b, bad, ok, c.access("node1")

    a, b, bad, ok, log = run(main())
    assert a[0].status is tunnel.Status.NOT_LOCAL and a[1] == b"" and "node2" in a[0].reason
    assert b[0].status is tunnel.Status.NOT_LOCAL and b[1] == b""
    assert bad[0].status is tunnel.Status.BAD_REQUEST
    assert ok[0].status is tunnel.Status.OK and ok[1] == b"hi"
    assert [e["result"] for e in log] == ["rejected", "rejected", "rejected", "ok"]
    assert log[3]["src_identity"] == X_ID and log[3]["peer_verified"] is True


def test_tunnel_only_from_mesh_node_addresses(tmp_path):
    # Refused before any TLS work: the handshake never starts.
    async def main():
        async with Cluster(tmp_path) as c:
            with pytest.raises((ConnectionError, ssl.SSLError, AssertionError)):
                await _raw_tunnel(c, _header("127.0.0.5", c.port("127.0.0.5")) + b"hi", source="127.0.0.9")
            await asyncio.sleep(0.1)
            return c.access("node1"), c.servers[0].tls.stats()

    log, tls = run(main())
    assert [e["result"] for e in log] == ["rejected"]
    assert "not a mesh node" in log[0]["reason"]
    assert tls["handshakes"] == 0 and tls["failures"] == {}


@pytest.mark.parametrize("case", ["claims_other_identity", "sni_names_other_pod", "no_sni"])
def test_tunnel_header_must_match_the_verified_identities(tmp_path, case):
    async def main():
        async with Cluster(tmp_path) as c:
            web = ("127.0.0.5", c.port("127.0.0.5"))
            if case == "claims_other_identity":  # a valid certificate for x/y, a header saying client
                res = await _raw_tunnel(c, _header(*web, identity=CLIENT_ID) + b"hi")
            elif case == "sni_names_other_pod":  # authenticated node1 as client's identity, asks for web
                res = await _raw_tunnel(c, _header(*web) + b"hi", sni=CLIENT_ID)
            else:
                res = await _raw_tunnel(c, _header(*web) + b"hi", sni=None)
            await asyncio.sleep(0.1)
            return res, c.access("node1")

    (resp, rest), log = run(main())
    assert resp.status is tunnel.Status.FORBIDDEN and rest == b""
    (e,) = log
    assert e["result"] == "rejected" and e["src_identity"] == X_ID and e["peer_verified"] is True
    if case == "claims_other_identity":
        assert "claims identity" in resp.reason and X_ID in resp.reason
    else:
        assert "authenticated this node as" in resp.reason


# Key scope (issue #12 item 8): a node's key speaks only for that node's pods.
# (case, source address, identity, issuing node) -> the refusal's words
KEY_SCOPE = [
    ("node1's key minting node2's identity, used from node1", "127.0.0.1", DB_ID, "node1",
     "node node1 has no mesh pod with identity"),
    ("node1's key minting node2's identity, sent from node2", NODE2_IP, DB_ID, "node1",
     "issued by node node1's intermediate CA, but the connection comes from node node2"),
    ("node2's genuine certificate replayed from node1", "127.0.0.1", DB_ID, "node2",
     "issued by node node2's intermediate CA, but the connection comes from node node1"),
    ("an intermediate that names no node", NODE2_IP, DB_ID, None,
     "issued by a CA that is no node's intermediate"),
]


@pytest.mark.parametrize("case,source,identity,issuer,why", KEY_SCOPE, ids=[k[0] for k in KEY_SCOPE])
def test_key_scope_refuses_a_node_speaking_for_pods_it_does_not_run(tmp_path, case, source, identity, issuer,
                                                                    why):
    async def main():
        async with Cluster(tmp_path) as c:
            web = ("127.0.0.5", c.port("127.0.0.5"))
            bad = await _raw_tunnel(c, _header(*web, identity=identity) + b"hi", source=source,
                                    cert=identity, issuer_node=issuer)
            good = await _raw_tunnel(c, _header(*web) + b"hi", expect=2)  # node2 for its own pod: fine
            await asyncio.sleep(0.1)
            return bad, good, c.access("node1"), c.servers[0].stats()

    (resp, rest), (ok, echoed), log, stats = run(main())
    assert resp.status is tunnel.Status.FORBIDDEN and rest == b""
    assert resp.reason.startswith("key scope: ") and why in resp.reason, resp.reason
    assert ok.status is tunnel.Status.OK and echoed == b"hi"
    assert [(e["result"], e["src_identity"]) for e in log] == [("rejected", identity), ("ok", X_ID)]
    assert "key scope" in log[0]["reason"]
    assert stats["metrics"]["denied"] == {"key_scope": 1}


@pytest.mark.parametrize("src", [CLIENT_IP, "10.9.9.9", None], ids=["node1-pod", "no-pod", "none"])
def test_key_scope_refuses_a_source_address_the_node_does_not_own(tmp_path, src):
    """node2's own genuine certificate, but the header claims a source address that is not
    node2's pod's (what ipBlocks rules match): refused."""
    async def main():
        async with Cluster(tmp_path) as c:
            web = ("127.0.0.5", c.port("127.0.0.5"))
            res = await _raw_tunnel(c, _header(*web, src=src) + b"hi")
            await asyncio.sleep(0.1)
            return res, c.servers[0].stats()

    (resp, rest), stats = run(main())
    assert resp.status is tunnel.Status.FORBIDDEN and rest == b""
    assert f"source address {src or '(none)'} is no address of a mesh pod of node node2" in resp.reason
    assert stats["metrics"]["denied"] == {"key_scope": 1}


def test_key_scope_admits_a_stream_once_this_nodes_state_catches_up(tmp_path):
    """node2 enrolled its pod db-1 again while node1's worker still holds a
    state saying db-1 is out of the mesh (node1's agent learns of it on its
    own, the worker reads the file after): the stream is not refused at
    once, but admitted with the newer state that arrives meanwhile."""
    async def main():
        async with Cluster(tmp_path) as c:
            srv = c.servers[0]
            path = tmp_path / "node1" / "state.json"
            doc = json.loads(path.read_text())
            for mesh, gen in ((False, 2), (True, 3)):
                for p in doc["pods"]:
                    if p["ips"] == ["127.0.0.7"]:
                        p["mesh"] = mesh
                doc["generation"] = gen
                if gen == 2:  # the stale state, in force before the stream arrives
                    srv.watcher.interval = 3600.0  # this test says when the worker reloads
                    path.write_text(json.dumps(doc))
                    srv.watcher.check()
                    assert srv.watcher.current.generation == 2
                    web = ("127.0.0.5", c.port("127.0.0.5"))
                    task = asyncio.create_task(_raw_tunnel(c, _header(*web) + b"hi", expect=2))
                    async with asyncio.timeout(10):  # its header decoded: admitted or refused already
                        while not task.done() and not any(
                                conn.src_pod == "data/db-1" for conn in srv.live.tasks.values()):
                            await asyncio.sleep(0.01)
                else:  # the agent's newer state: the worker reloads while the stream waits
                    path.write_text(json.dumps(doc))
                    srv.watcher.check()
            res = await task
            await asyncio.sleep(0.1)
            return res, c.access("node1"), srv.stats()

    (resp, echoed), log, stats = run(main())
    assert resp.status is tunnel.Status.OK and echoed == b"hi", resp
    assert [(e["result"], e["src_identity"]) for e in log] == [("ok", X_ID)]
    assert "key_scope" not in stats["metrics"]["denied"]


def test_client_refuses_a_destination_certificate_from_another_nodes_key(tmp_path):
    """node2's CA signs with node1's intermediate (what a stolen node1 key lets an
    impostor of node2's pods do): node1's proxy refuses the destination at the
    handshake, counted as ``wrong_node``; nothing reaches the pod."""
    async def main():
        c = Cluster(tmp_path)
        c.ca_nodes["node2"] = "node1"
        async with c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            await expect_reset(r, w)
            await asyncio.sleep(0.1)
            return c.access("node1"), c.access("node2"), c.servers[0].stats()

    log1, log2, stats = run(main())
    (e,) = log1
    assert (e["route"], e["result"]) == ("tunnel", "rejected")
    assert "wrong_node" in e["reason"] and "expected on node node2" in e["reason"], e["reason"]
    assert stats["tls"]["failures"] == {"wrong_node": 1}
    assert all(x["result"] != "ok" for x in log2)  # the impostor was never given the connection


def test_tunnel_is_tls_on_the_wire(tmp_path):
    marker = b"MESHLET-PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
    payload = marker * 4096

    async def main():
        async with Cluster(tmp_path, mitm=True) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            got = await exchange(r, w, payload)
            await asyncio.sleep(0.1)
            return got, bytes(c.forwarder.wire), c.access("node2")

    got, wire, log2 = run(main())
    assert got == payload + b"|bye from 127.0.0.7"  # the receiver got the marker...
    assert len(wire) > 2 * len(payload)  # ...through the man in the middle, both ways...
    assert marker not in wire and b"MLTN" not in wire  # ...which saw neither it nor the header
    assert wire.startswith(b"\x16\x03\x01")  # a TLS ClientHello opens the connection
    assert wire.count(b"\x17\x03\x03") > 10  # then application data records
    (inb,) = log2
    assert inb["src_identity"] == CLIENT_ID and inb["peer_verified"] is True


def test_missing_certificate_fails_closed(tmp_path, caplog):
    async def main():
        async with Cluster(tmp_path, deny=(CLIENT_ID,)) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            await expect_reset(r, w)
            # same-node traffic needs no certificate
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            local = await exchange(r, w, b"x")
            await asyncio.sleep(0.1)
            return local, c.access("node1"), c.access("node2"), c.servers[0].stats()

    local, log1, log2, stats = run(main())
    assert local == b"x|bye from 127.0.0.5"
    assert [(e["route"], e["result"]) for e in log1] == [("tunnel", "rejected"), ("local", "ok")]
    assert "no_certificate" in log1[0]["reason"] and CLIENT_ID in log1[0]["reason"]
    assert log2 == []  # nothing reached the other node
    assert f"no certificate for identity {CLIENT_ID}" in caplog.text
    assert stats["tls"]["failures"] == {"no_certificate": 1}


def test_stats_socket(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            path = tmp_path / "node1" / "proxy-0.sock"
            r, w = await asyncio.open_unix_connection(str(path))
            doc = json.loads(await asyncio.wait_for(r.read(), 10))
            w.close()
            await w.wait_closed()
            return doc, path

    doc, path = run(main())
    assert doc["worker"] == 0 and doc["node"] == "node1" and doc["state_generation"] == 1
    assert "result_ok" in doc["counters"] and doc["active_connections"] == 0
    certs = doc["certs"]
    assert [i["spiffe_id"] for i in certs["identities"]] == [CLIENT_ID, WEB_ID]
    assert all(i["serial"] and i["not_after"] and i["next_rotation"] for i in certs["identities"])
    assert certs["bundle_fingerprint"] and doc["tls"]["failures"] == {}
    assert not path.exists()  # removed at shutdown


def test_state_reload_is_used_by_new_connections(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            srv = c.servers[0]
            doc = state_doc("node1", "127.0.0.1", c.out_port, c.tun_port, generation=2)
            doc["pods"][0]["cgroup_id"] = 5555
            p = tmp_path / "node1" / "state.json"
            (tmp_path / "node1" / "new.json").write_text(json.dumps(doc))
            os.replace(tmp_path / "node1" / "new.json", p)
            assert srv.watcher.check()
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 5555))
            return await exchange(r, w, b"x"), srv.stats()["state_generation"]

    assert run(main()) == (b"x|bye from 127.0.0.5", 2)


def test_shutdown_aborts_relays_after_grace(tmp_path):
    async def main():
        async with Cluster(tmp_path, grace=0.3) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            w.write(b"ping")
            assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
            await c.servers[0].stop(0.3)
            await expect_reset(r, w)
            await asyncio.sleep(0.05)
            return c.access("node1")

    log = run(main())
    assert log[-1]["result"] == "reset" and "shutting down" in log[-1]["reason"]


def test_crash_on_one_connection_is_not_fatal(tmp_path, caplog):
    async def main():
        async with Cluster(tmp_path) as c:
            def boom(peer, local):
                raise RuntimeError("injected bug")

            c.flows1.pop, orig = boom, c.flows1.pop
            r, w = await c.connect(None)
            await expect_reset(r, w)
            c.flows1.pop = orig
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            assert await exchange(r, w, b"still") == b"still|bye from 127.0.0.5"
            return c.servers[0].stats()["counters"]

    counters = run(main())
    assert counters["internal_errors"] == 1 and counters["result_ok"] == 1
    assert "injected bug" in caplog.text and "keeps running" in caplog.text


@pytest.mark.parametrize(
    ("exc", "result", "bugs"),
    [
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset", 0),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), "reset", 0),
        (RuntimeError("injected bug"), "reset", 1),
        (OSError(errno.EBADF, "Bad file descriptor"), "reset", 1),
    ],
)
def test_guard_tells_a_peer_reset_from_a_bug(exc, result, bugs, caplog):
    """A connection error reaching a worker's guard (a peer broke the
    connection where the handler did not expect it, as when a peer worker is
    SIGKILLed) ends that connection as ``reset`` and is not an internal error;
    any other exception is a bug: counted and logged with its traceback."""
    async def main():
        finished: list[Conn] = []
        bug: list[int] = []
        live = Live(finished.append, lambda: bug.append(1))
        conn = Conn("outbound", Endpoint("client"), seq=1)

        async def handler(c: Conn) -> None:
            raise exc

        live.spawn(handler, conn)
        for _ in range(5):
            await asyncio.sleep(0)
        return conn, finished, bug

    conn, finished, bug = run(main())
    assert finished == [conn] and conn.result == result and len(bug) == bugs
    assert ("this is a bug" in caplog.text) == bool(bugs)
    if not bugs:
        assert "connection broken by the peer" in conn.reason


def test_ipv6_listener_and_second_worker_share_ports(tmp_path):
    async def main():
        async with Cluster(tmp_path, ipv6=True) as c:
            srv1 = c.servers[0]
            assert ("::1", c.out_port, 0, 0) in srv1.addresses["outbound"]
            # a second worker on the same state binds the same ports (SO_REUSEPORT)
            w2 = ProxyServer(StateWatcher(str(tmp_path / "node1" / "state.json")), flow_table=c.flows1,
                             worker_id=1)
            await w2.start()
            try:
                assert (tmp_path / "node1" / "proxy-1.sock").exists()
                c.flows1.next = FlowOrigin(socket.AF_INET6, "127.0.0.5", c.port("127.0.0.5"), 1001)
                r, w = await asyncio.open_connection("::1", c.out_port)
                return await exchange(r, w, b"v6")
            finally:
                await w2.stop(1)

    assert run(main()) == b"v6|bye from 127.0.0.5"


def test_connect_timeout_resets_client(tmp_path):
    # A listener with a full accept queue drops SYNs: connect() to it hangs.
    full = socket.socket()
    full.bind(("127.0.0.5", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.5", port))
            fillers.append(s)

        async def main():
            async with Cluster(tmp_path, connect_timeout=0.5) as c:
                await asyncio.sleep(0.2)
                r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", port, 1001))
                await expect_reset(r, w)
                await asyncio.sleep(0.05)
                return c.access("node1")

        log = run(main())
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert log[0]["result"] == "timeout", log
    assert "timed out after 0.5s" in log[0]["reason"]


def test_proxy_processes_never_import_bcc():
    code = (
        "import sys, importlib\n"
        "import agent.proxy.server, agent.proxy.__main__, agent.proxy.relay, agent.proxy.routing\n"
        "try:\n"
        "    importlib.import_module('agent.datapath.origdst')\n"
        "except ImportError:\n"
        "    pass\n"
        "bad = sorted(m for m in sys.modules if m == 'bcc' or m.startswith('bcc.') or m.startswith('pyroute2'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


_FAKE_MAIN = """
import sys, types
m = types.ModuleType("agent.datapath.origdst")
class FlowTable:
    def __init__(self, pin_dir): pass
    def pop(self, peer, local): return None
    def close(self): pass
m.FlowTable = FlowTable
sys.modules["agent.datapath.origdst"] = m
from agent.proxy.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_main_serves_stats_and_exits_0_on_sigterm(tmp_path):
    import signal
    import time

    port = free_port()
    p = tmp_path / "state.json"
    p.write_text(json.dumps(state_doc("node1", "127.0.0.1", port, free_port(), generation=3)))
    proc = subprocess.Popen([sys.executable, "-c", _FAKE_MAIN, "--state", str(p), "--worker-id", "2",
                             "--access-log", str(tmp_path / "access.log"), "--ready-timeout", "3",
                             "--no-listener-migration"],  # not the host's sysctl
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        sock_path = tmp_path / "proxy-2.sock"
        deadline = time.monotonic() + 20
        states = []  # the stats socket answers before the worker listens: ready false, then true
        while not states or not states[-1]:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, f"never ready (stats socket: {states})"
            time.sleep(0.05)
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock_path))
                    doc = json.loads(s.makefile().read())
            except (FileNotFoundError, ConnectionRefusedError):
                continue
            states.append(doc["ready"])
        assert states[0] is False  # no CA answers here: it waited (bounded) for certificates
        assert doc["worker"] == 2 and doc["state_generation"] == 3
        # no --workers: slots 0..2 for its own id; the state's pin directory does not exist here
        assert doc["tunnel_spread"]["workers"] == 3
        assert doc["tunnel_spread"]["ipv4"].startswith("hash: no pin directory")
        assert doc["outbound_spread"]["ipv4"].startswith("hash: no pin directory")
        assert doc["outbound_spread"]["published"] is None and doc["outbound_spread"]["workers"] == 3
        # a connection without a flow record is reset and logged (the RST may even beat
        # connect() back to userspace on loopback)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                assert c.recv(10) == b""
        except ConnectionResetError:
            pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "shutting down" in err
    assert "listening without certificates" in err
    (entry,) = [json.loads(x) for x in (tmp_path / "access.log").read_text().splitlines()]
    assert entry["worker"] == 2 and entry["result"] == "rejected"


def test_main_exits_with_message_on_broken_state(tmp_path):
    p = tmp_path / "state.json"
    p.write_text("{broken")
    proc = subprocess.run([sys.executable, "-m", "agent.proxy", "--state", str(p),
                           "--no-listener-migration"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cannot load proxy state" in proc.stderr and "state.json" in proc.stderr


def test_metrics_count_every_path_exactly(tmp_path):
    # Local (both reporters, plaintext), tunnel (mTLS, source on node1 and
    # destination on node2), passthrough, and two refusals: the Istio label
    # sets and the byte counts (application bytes) are exact.
    async def main():
        async with Cluster(tmp_path) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            await exchange(r, w, b"to-web")
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.7", c.port("127.0.0.7"), 1001))
            await exchange(r, w, b"to-db!!")
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.6", c.port("127.0.0.6"), 1001))
            await exchange(r, w, b"out")
            await expect_reset(*await c.connect(None))  # no original destination
            await expect_reset(*await c.connect(FlowOrigin(V4, "127.0.0.5", 1, 4242)))  # unknown cgroup
            await asyncio.sleep(0.2)
            return c.servers[0].stats()["metrics"], c.servers[1].stats()["metrics"]

    m1, m2 = run(main())

    def rows(m):
        return {(lb[0], lb[1], lb[6], lb[16], lb[15]): tuple(v) for lb, *v in
                ([row[0], *row[1:]] for row in m["tcp"])}
    r1, r2 = rows(m1), rows(m2)
    web = len(b"to-web|bye from 127.0.0.5")
    db = len(b"to-db!!|bye from 127.0.0.7")
    # (reporter, source, destination, security, flags): (opened, closed, received, sent)
    assert r1[("source", "client", "web-1", "none", "-")] == (1, 1, 6, web)
    assert r1[("destination", "client", "web-1", "none", "-")] == (1, 1, 6, web)
    assert r1[("source", "client", "db-1", "mutual_tls", "-")] == (1, 1, 7, db)
    assert r2[("destination", "client", "db-1", "mutual_tls", "-")] == (1, 1, 7, db)
    assert r1[("source", "client", "unknown", "none", "-")] == (1, 1, 3, len(b"out|bye from 127.0.0.6"))
    assert r1[("source", "unknown", "unknown", "none", "DENY")] == (1, 1, 0, 0)
    assert r1[("source", "unknown", "web-1", "none", "DENY")] == (1, 1, 0, 0)
    assert m1["denied"] == {"no_original_destination": 1, "unknown_source": 1}
    assert m2["denied"] == {} and m1["overflow"] == 0 and m1["live"] == 0
    labels = dict(zip(m1["labels"], next(row[0] for row in m1["tcp"] if row[0][6] == "db-1")))
    assert labels["source_principal"] == CLIENT_ID and labels["destination_principal"] == DB_ID
    assert labels["destination_service"] == "127.0.0.7"
    assert labels["destination_workload_namespace"] == "data"


def test_live_bytes_reach_the_metrics_before_close(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            r, w = await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
            w.write(b"12345")
            assert await r.readexactly(5) == b"12345"
            live = c.servers[0].stats()["metrics"]
            await exchange(r, w, b"678")
            await asyncio.sleep(0.1)
            return live, c.servers[0].stats()["metrics"], c.access("node1")

    live, done, log = run(main())
    (row,) = [r for r in live["tcp"] if r[0][0] == "source"]
    assert row[1:] == [1, 0, 5, 5] and live["live"] == 1
    (row,) = [r for r in done["tcp"] if r[0][0] == "source"]
    assert row[1:] == [1, 1, 8, 8 + len(b"|bye from 127.0.0.5")]
    e = log[-1]
    assert e["connection_security_policy"] == "none" and e["source_workload"] == "client"
    assert e["destination_workload"] == "web-1" and e["destination_principal"] == WEB_ID


class FakeLinker:
    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def link_many(self, pairs):
        self.batches.append(list(pairs))

    def close(self):
        pass


def test_proxy_links_accepted_and_upstream_cookies_in_batches(tmp_path):
    async def main():
        async with Cluster(tmp_path) as c:
            linker = c.servers[0].upstream.linker = FakeLinker()
            conns = [await c.connect(FlowOrigin(V4, "127.0.0.5", c.port("127.0.0.5"), 1001))
                     for _ in range(3)]
            for r, w in conns:
                await exchange(r, w, b"x")
            await asyncio.sleep(0.1)
            return linker.batches, c.servers[0].stats()["counters"]

    batches, counters = run(main())
    pairs = [p for b in batches for p in b]
    assert len(pairs) == 3 and counters["legs_linked"] == 3 and counters["leg_link_errors"] == 0
    assert all(a != b and a > 0 and b > 0 for a, b in pairs)
    assert len({c for p in pairs for c in p}) == 6  # six distinct sockets


# -- proxy.l7: HTTP/1.x through the L7 session on the destination node ------


@pytest.mark.parametrize("dst_ip,node", [("127.0.0.5", 0), ("127.0.0.7", 1)], ids=["local", "tunnel"])
def test_l7_http_gets_trace_headers_and_reuses_upstreams(tmp_path, dst_ip, node):
    async def main():
        async with Cluster(tmp_path, l7=True) as c:
            web = await HeaderEcho(dst_ip).start()
            try:
                bodies = []
                for _ in range(2):  # two client connections, three requests each
                    r, w = await c.connect(FlowOrigin(V4, dst_ip, web.port, 1001))
                    for _ in range(3):
                        status, head, body = await http_request(r, w, "GET", "/hello",
                                                             headers=(("Connection", "keep-alive"),))
                        assert status == 200 and b"connection: close" not in head.lower()
                        bodies.append(body)
                    await close_writer(w)
                await asyncio.sleep(0.1)
                return bodies, web.connections, c.servers[node].stats(), c.access(f"node{node + 1}")
            finally:
                await web.stop()

    bodies, upstream_conns, stats, log = run(main())
    for body in bodies:
        lines = body.lower().split(b"\r\n")
        tp = [ln for ln in lines if ln.startswith(b"traceparent: ")]
        assert len(tp) == 1 and tracing_ok(tp[0].split(b": ", 1)[1])
        assert any(ln.startswith(b"x-request-id: ") for ln in lines)
        assert b"connection: keep-alive" not in lines  # hop-by-hop removed
    assert upstream_conns == 1  # one pooled upstream connection served all six requests
    h = stats["http"]
    assert h["connections"] == 2 and h["requests"] == 6 and h["by_class"] == {"2xx": 6}
    assert h["pool"] == {"connects": 1, "reuses": 5, "idle": 1}
    assert h["latency_ms_count"] == 6 and len(h["latency_ms_recent"]) == 6
    ours = [e for e in log if e.get("kind") != "request" and e["dst_pod"] and e["result"] == "ok"]
    assert len(ours) == 2 and all(e["bytes_sent"] > 0 and e["bytes_received"] > 0 for e in ours)



def test_service_leg_to_an_l4_destination_is_answered_at_once(tmp_path, monkeypatch):
    """The source's L7 session for a service waits for the destination's
    reply before it sends a request on a new upstream leg, so a destination
    serving the pod at L4 must not hold that reply for the pod's first bytes
    (the pod says nothing before the request): with the hold made 30 s long,
    a held reply stalls the request past the client's 10 s wait."""
    from agent.proxy import inbound
    monkeypatch.setattr(inbound, "REPLY_HOLD", 30.0)

    async def main():
        web = await HeaderEcho("127.0.0.7").start()
        svc = {"name": "db", "namespace": "data", "vips": ["10.96.0.9"], "ports": [
            {"port": 80, "target_port": web.port, "app_protocol": "http", "endpoints": [
                {"pod": "data/db-1", "ip": "127.0.0.7", "port": web.port, "node": "node2"}]}]}
        try:
            async with Cluster(tmp_path, l7={"node1": True, "node2": False}, services=[svc]) as c:
                r, w = await c.connect(FlowOrigin(V4, "10.96.0.9", 80, 1001))
                status, _, _ = await asyncio.wait_for(
                    http_request(r, w, "GET", "/hello", headers=(("Connection", "keep-alive"),)), 10)
                await close_writer(w)
                return status, web.connections
        finally:
            await web.stop()

    status, upstream_conns = run(main())
    assert status == 200 and upstream_conns == 1

def tracing_ok(value: bytes) -> bool:
    from agent.proxy.tracing import parse_traceparent
    return parse_traceparent(value) is not None


async def banner_handler(reader, writer):
    """Server speaks first: a banner, then an echo of what comes."""
    writer.write(b"220 ready\r\n")
    await writer.drain()
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@pytest.mark.parametrize("dst_ip,node", [("127.0.0.5", 0), ("127.0.0.7", 1)], ids=["local", "tunnel"])
def test_l7_leaves_non_http_on_l4(tmp_path, dst_ip, node):
    async def main():
        async with Cluster(tmp_path, l7=True) as c:
            srv = await asyncio.start_server(banner_handler, dst_ip, 0)
            port = srv.sockets[0].getsockname()[1]
            try:
                # Server speaks first: nothing from the client, the sniff times out, L4 relay.
                r, w = await c.connect(FlowOrigin(V4, dst_ip, port, 1001))
                assert await asyncio.wait_for(r.readexactly(11), 5) == b"220 ready\r\n"
                w.write(b"EHLO x\r\n")
                assert await asyncio.wait_for(r.readexactly(8), 5) == b"EHLO x\r\n"
                await close_writer(w)
                # TLS from the app and binary bytes: L4 at once, byte for byte.
                # (The HTTP/2 preface is HTTP now: test_h2glue.py, test_grpc.py.)
                for payload in (b"\x16\x03\x01\x00\x05hello", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
                                bytes(range(256))):
                    r, w = await c.connect(FlowOrigin(V4, dst_ip, c.port(dst_ip), 1001))
                    assert await exchange(r, w, payload) == payload + f"|bye from {dst_ip}".encode()
                await asyncio.sleep(0.1)
                return c.servers[node].stats()
            finally:
                srv.close()
                await srv.wait_closed()

    stats = run(main())
    assert stats["http"]["connections"] == 0 and stats["http"]["pool"]["connects"] == 0


def test_tunnel_header_split_across_reads_is_still_decoded(tmp_path):
    """The inbound side decodes a header already buffered at once (a mux
    stream's OPEN carries it) and otherwise waits for the rest, bounded:
    here the first half arrives, then, later, the second half and data."""

    async def main():
        async with Cluster(tmp_path) as c:
            head = _header("127.0.0.5", c.port("127.0.0.5"))
            r, w = await asyncio.open_connection("127.0.0.1", c.tun_port, local_addr=(NODE2_IP, 0),
                                                 ssl=_tls_ctx(c, X_ID, "node2"),
                                                 server_hostname=sni_for(WEB_ID))
            try:
                w.write(head[:7])
                await w.drain()
                await asyncio.sleep(0.05)
                w.write(head[7:] + b"hi")
                out = await _tunnel_response(r)
                rest = out.leftover
                while len(rest) < 2:
                    chunk = await asyncio.wait_for(r.read(4096), 10)
                    assert chunk
                    rest += chunk
            finally:
                w.close()
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    await w.wait_closed()
            return out.message, rest

    resp, rest = run(main())
    assert resp.status is tunnel.Status.OK and rest.startswith(b"hi")
