"""The whole node proxy in-process on loopback, with a fake flow table and a
fake CA per node (the harness of tests/unit/test_proxy_*.py).

Two "nodes": node1 listens on 127.0.0.1, node2 on 127.0.0.2. Pods are echo
servers on other 127.0.0.x addresses; the client pod connects from
127.0.0.10. The fake flow table returns the original destination the test
chooses, standing in for the kernel's connect4 record. Each node has a fake
agent CA (one CertFactory root for both) signing its own pods' CSRs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.proxy.server import ProxyServer
from agent.proxy.state import StateWatcher
from tests.support.ca import CertFactory, FakeCA

V4 = socket.AF_INET
CLIENT_IP = "127.0.0.10"
MITM_IP = "127.0.0.3"
TD = "cluster.local"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/client"
WEB_ID = f"spiffe://{TD}/ns/default/sa/web"
DB_ID = f"spiffe://{TD}/ns/data/sa/db"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FlowOrigin:  # same shape as agent.datapath.origdst.FlowOrigin
    family: int
    dst_ip: str
    dst_port: int
    cgroup_id: int


class FakeFlows:
    def __init__(self):
        self.next: FlowOrigin | None = None
        self.calls: list[tuple] = []
        self.closed = False

    def pop(self, peer, local):
        self.calls.append((peer, local))
        origin, self.next = self.next, None
        return origin

    def close(self):
        self.closed = True


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.2", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def closed_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def state_doc(node: str, listen_ip: str, out_port: int, tun_port: int, ca_socket="/nonexistent/ca.sock",
              **extra):
    doc = {
        "version": 1, "generation": 1, "node": node, "trust_domain": "cluster.local",
        "identity": {"trust_domain": "cluster.local", "ca_socket": ca_socket,
                     "generation": 1, "cert_ttl": 3600},
        "pin_dir": "/nonexistent",
        "listen": {"ipv4": listen_ip, "ipv6": None, "outbound_port": out_port, "tunnel_port": tun_port},
        "connect_timeout": 2.0, "mesh_mark": 0x4D450000, "buffer_size": 65536,
        "nodes": {"node1": {"address": "127.0.0.1"}, "node2": {"address": "127.0.0.2"}},
        "pods": [
            {"name": "client", "namespace": "default", "service_account": "client", "node": "node1",
             "ips": [CLIENT_IP], "cgroup_id": 1001, "mesh": True},
            {"name": "web-1", "namespace": "default", "service_account": "web", "node": "node1",
             "ips": ["127.0.0.5"], "cgroup_id": 1002, "mesh": True},
            {"name": "db-1", "namespace": "data", "service_account": "db", "node": "node2",
             "ips": ["127.0.0.7"], "cgroup_id": 2001, "mesh": True},
        ],
    }
    doc.update(extra)
    return doc


async def echo_handler(reader, writer):
    """Echo chunks back as they come; on EOF send a trailer and close."""
    name = writer.get_extra_info("sockname")[0]
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.write(f"|bye from {name}".encode())
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


class Forwarder:
    """A TCP man in the middle on loopback: forwards both ways and keeps every byte."""

    def __init__(self, listen_ip: str, port: int, target: tuple[str, int], source_ip: str):
        self.listen_ip, self.port, self.target, self.source_ip = listen_ip, port, target, source_ip
        self.wire = bytearray()

    async def start(self):
        self.srv = await asyncio.start_server(self._handle, self.listen_ip, self.port)
        return self

    async def stop(self):
        self.srv.close()
        await self.srv.wait_closed()

    async def _handle(self, r1, w1):
        r2, w2 = await asyncio.open_connection(*self.target, local_addr=(self.source_ip, 0))

        async def pump(r, w):
            try:
                while data := await r.read(65536):
                    self.wire += data
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, OSError):
                w.transport.abort()

        await asyncio.gather(pump(r1, w2), pump(r2, w1))
        for w in (w1, w2):
            w.close()


class Cluster:
    def __init__(self, tmp: Path, grace: float = 5.0, connect_timeout: float = 2.0, ipv6: bool = False,
                 mitm: bool = False, deny: tuple[str, ...] = (),
                 security: tuple[str, str] = ("mtls", "mtls"), resumption: bool = True,
                 l7: bool | dict[str, bool] = False, labels: dict[str, dict[str, str]] | None = None,
                 services: list[dict] | None = None):
        self.tmp = tmp
        self.labels = labels or {}  # pod name -> labels
        self.l7 = l7  # both nodes, or {node: bool}
        self.services = services or []  # state.services, as the agent writes them
        self.security = dict(zip(("node1", "node2"), security))
        self.resumption = resumption
        self.grace = grace
        self.connect_timeout = connect_timeout
        self.ipv6 = ipv6
        self.mitm = mitm
        self.deny = set(deny)  # identities the fake CAs refuse to sign
        self.factory = CertFactory(TD)
        self.ca_nodes: dict[str, str] = {}  # node -> the node whose intermediate its CA signs with
        self.out_port = free_port()
        self.tun_port = free_port()
        self.flows1 = FakeFlows()
        self.flows2 = FakeFlows()
        self.closed_web = closed_port("127.0.0.5")
        self.closed_db = closed_port("127.0.0.7")

    async def __aenter__(self):
        self.pods = {}
        for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
            srv = await asyncio.start_server(echo_handler, ip, 0)
            self.pods[ip] = (srv, srv.sockets[0].getsockname()[1])
        self.servers = []
        self.cas = []
        self.sockdir = tempfile.mkdtemp(prefix="mlca")  # short: AF_UNIX paths are limited
        self.forwarder = None
        if self.mitm:  # node1 reaches node2 through the man in the middle
            self.forwarder = await Forwarder(MITM_IP, self.tun_port, ("127.0.0.2", self.tun_port),
                                             source_ip="127.0.0.1").start()
        for node, ip, flows in (("node1", "127.0.0.1", self.flows1), ("node2", "127.0.0.2", self.flows2)):
            d = self.tmp / node
            d.mkdir()
            ca_sock = os.path.join(self.sockdir, f"{node}.sock")
            doc = state_doc(node, ip, self.out_port, self.tun_port, ca_socket=ca_sock,
                            connect_timeout=self.connect_timeout,
                            tunnel_security=self.security[node],
                            tls_resumption=self.resumption,
                            l7=self.l7[node] if isinstance(self.l7, dict) else self.l7,
                            services=self.services)
            for p in doc["pods"]:
                if p["name"] in self.labels:
                    p["labels"] = dict(self.labels[p["name"]])
            if self.ipv6 and node == "node1":
                doc["listen"]["ipv6"] = "::1"
                doc["pods"][0]["ips"].append("::1")
            if self.mitm and node == "node1":
                doc["nodes"]["node2"]["address"] = MITM_IP
            local = {f"spiffe://{TD}/ns/{p['namespace']}/sa/{p['service_account']}"
                     for p in doc["pods"] if p["node"] == node}
            # each node signs with its own intermediate, as `meshlet ca` sets nodes up (key scope)
            self.cas.append(await FakeCA(ca_sock, local - self.deny, factory=self.factory,
                                         node=self.ca_nodes.get(node, node)).start())
            (d / "state.json").write_text(json.dumps(doc))
            srv = ProxyServer(StateWatcher(str(d / "state.json")), flow_table=flows,
                              access_log=str(d / "access.log"))
            await srv.start()
            self.servers.append(srv)
        for srv in self.servers:  # every certificate the CAs will sign is in place
            async with asyncio.timeout(10):
                while not (srv.certs.bundle and all(srv.certs.certificate(i) for i in srv.certs.wanted() - self.deny)):
                    await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc):
        for srv in self.servers:
            await srv.stop(self.grace)
        for srv, _ in self.pods.values():
            srv.close()
            await srv.wait_closed()
        for ca in self.cas:
            await ca.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def port(self, ip):
        return self.pods[ip][1]

    def access(self, node):
        path = self.tmp / node / "access.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    async def connect(self, origin: FlowOrigin | None):
        self.flows1.next = origin
        return await asyncio.open_connection("127.0.0.1", self.out_port, local_addr=(CLIENT_IP, 0))


async def exchange(reader, writer, data: bytes) -> bytes:
    writer.write(data)
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return out


async def expect_reset(reader, writer) -> None:
    """The client must see the connection fail (RST or at least EOF), not hang."""
    if not writer.is_closing():  # it may already have seen the RST
        writer.write(b"hello?")
    try:
        data = await asyncio.wait_for(reader.read(), 10)  # generous bound, no timing claim
    except ConnectionResetError:
        data = None
    assert data in (None, b"")
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
