"""agent/proxy/splice.py without root: how the proxy names the pod socket
at the other end of each of its sockets, when it arms a pod socket (only
with everything relayed in the far socket's kernel queue), and the fallback
to the userspace relay when no splice maps are pinned (real loopback
sockets, a real pin path that does not exist)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import time
import types

import pytest
import yaml

from agent.config import parse_config
from agent.datapath import abi
from agent.datapath.probe import splice_plan, splice_supported
from agent.datapath.splicemap import SpliceMaps, bytes_acked, established, pod_key, socket_cookie
from agent.proxy.splice import Splicer
from agent.yamlsrc import SourceError
from tests.support.aio import run
from tests.unit.test_relay import Harness


def _tcp_pair(host: str = "127.0.0.1") -> tuple[socket.socket, socket.socket]:
    ls = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    with ls:
        a = socket.create_connection(ls.getsockname()[:2])
        b, _ = ls.accept()
    return a, b


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_pod_key_of_the_proxys_socket_is_the_pod_sockets_own_4_tuple(host):
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    pod, proxy = _tcp_pair(host)  # pod: connected; proxy: the accepted socket
    with pod, proxy:
        key = abi.MlFlowKey.from_buffer_copy(pod_key(proxy))
        (laddr, lport), (raddr, rport) = pod.getsockname()[:2], pod.getpeername()[:2]
        fam, s = abi.pack_addr(laddr)
        _, d = abi.pack_addr(raddr)
        assert (key.family, tuple(key.saddr_be), tuple(key.daddr_be)) == (fam, s, d)
        assert (key.sport, key.dport) == (lport, rport)
        # and the other way round: the accepted side's own tuple
        back = abi.MlFlowKey.from_buffer_copy(pod_key(pod))
        assert (back.sport, back.dport) == (rport, lport)


def test_bytes_acked_follows_what_the_peer_acknowledged():
    a, b = _tcp_pair()
    with a, b:
        base, base_b = bytes_acked(a), bytes_acked(b)
        a.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(b.recv(65536))
        for _ in range(500):  # the ACK of the last segment may still be on its way
            if bytes_acked(a) - base == 100_000:
                break
            time.sleep(0.01)
        assert bytes_acked(a) - base == 100_000
        assert bytes_acked(b) == base_b  # nothing sent that way


class _RecordingMaps:
    """The three calls Splicer makes into the kernel's maps, recorded (the
    kernel side is tests/privileged/test_splice.py's)."""

    def __init__(self) -> None:
        self.armed: list[tuple[bytes, int, int]] = []
        self.disarmed: list[bytes] = []
        self.removed: list[int] = []

    def add_targets(self, a, b):
        return socket_cookie(a), socket_cookie(b)

    def arm(self, key, target, relayed):
        self.armed.append((key, target, relayed))

    def disarm(self, key):
        self.disarmed.append(key)

    def redirected(self, target):
        return 0

    def remove(self, target):
        self.removed.append(target)
        return 0

    def close(self):
        pass


async def _echo(reader, writer):
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _echoed_hello(h):
    """Connect through the harness's relay and see b"hello" come back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
    writer.write(b"hello")
    await writer.drain()
    assert await reader.readexactly(5) == b"hello"
    await h.relay_made.wait()
    return reader, writer


def test_a_pod_socket_is_armed_with_what_was_relayed_once_it_is_all_in_the_far_kernel_queue():
    counters = {"spliced": 0, "splice_skipped": 0, "splice_failed": 0}
    maps = _RecordingMaps()

    async def main():
        async with Harness(_echo) as h:
            reader, writer = await _echoed_hello(h)
            relay = h.relays[0]
            sa = relay.a.transport.get_extra_info("socket")
            sb = relay.b.transport.get_extra_info("socket")
            Splicer(maps, counters).splice(relay)
            assert counters["spliced"] == 1 and relay.splice is not None
            # Both pod sockets armed at once (nothing buffered): each with
            # the far socket as target and what the proxy relayed from it.
            assert sorted(maps.armed) == sorted([
                (pod_key(sa), socket_cookie(sb), 5),
                (pod_key(sb), socket_cookie(sa), 5),
            ])
            maps.armed.clear()
            writer.write(b"more")  # through the proxy (no kernel here): re-armed with the new count
            await writer.drain()
            assert await reader.readexactly(4) == b"more"
            assert (pod_key(sa), socket_cookie(sb), 9) in maps.armed
            assert (pod_key(sb), socket_cookie(sa), 9) in maps.armed
            relay.abort("policy")  # disarms both before the resets
            assert sorted(maps.disarmed) == sorted([pod_key(sa), pod_key(sb)])
            writer.close()
            await relay.done

    run(main())
    assert sorted(maps.removed) == sorted(set(maps.removed)) and len(maps.removed) == 2


def test_socket_cookies_are_distinct_and_stable():
    a, b = _tcp_pair()
    with a, b:
        assert socket_cookie(a) == socket_cookie(a) != socket_cookie(b)


def test_without_pinned_maps_the_relay_stays_in_userspace(tmp_path):
    counters = {"spliced": 0, "splice_skipped": 0, "splice_failed": 0}
    payload = os.urandom(3 << 20)

    async def main():
        async with Harness(_echo) as h:
            reader, writer = await _echoed_hello(h)
            splicer = Splicer(SpliceMaps(str(tmp_path / "no-such-pin-dir")), counters)
            relay = h.relays[0]
            splicer.splice(relay)
            assert relay.splice is None

            async def send():
                for i in range(0, len(payload), 1 << 16):
                    writer.write(payload[i : i + (1 << 16)])
                    await writer.drain()
                writer.write_eof()

            t = asyncio.get_running_loop().create_task(send())
            got = hashlib.sha256()
            n = 0
            while data := await reader.read(1 << 20):
                got.update(data)
                n += len(data)
            await t
            writer.close()
            assert n == len(payload) and got.hexdigest() == hashlib.sha256(payload).hexdigest()
            splicer.close()

    run(main())
    assert counters == {"spliced": 0, "splice_skipped": 0, "splice_failed": 1}


CONFIG = """\
node: node1
inventory: inventory.yaml
cgroup: meshlet/node1
identity:
  bundle: ca/bundle.pem
  caCert: ca/nodes/node1/ca.pem
  caKey: ca/nodes/node1/ca-key.pem
proxy:
  redirectIPv4: 10.244.1.1
"""


def test_proxy_splice_knob_is_auto_by_default_and_round_trips():
    assert parse_config(CONFIG, "c.yaml").proxy.splice == "auto"
    for text, want in (("true", True), ("false", False), ("auto", "auto")):
        c = parse_config(CONFIG + f"  splice: {text}\n", "c.yaml")
        assert c.proxy.splice == want and type(c.proxy.splice) is type(want)
        assert parse_config(yaml.safe_dump(c.to_dict()), "c.yaml") == c


def test_proxy_splice_knob_must_be_true_false_or_auto_named_by_file_and_line():
    with pytest.raises(SourceError) as ei:
        parse_config(CONFIG + "  splice: maybe\n", "c.yaml")
    assert "c.yaml:10" in str(ei.value) and "splice" in str(ei.value), str(ei.value)
    assert "true, false or auto" in str(ei.value), str(ei.value)


NO_HOOKS = "no sk_msg/sock_ops program or SOCKHASH map on this kernel (EINVAL); the fix: a kernel with ..."


def test_splice_auto_falls_back_to_the_userspace_relay_with_one_warning_where_the_kernel_cannot():
    assert splice_plan("auto", None) == (True, None)
    spliced, warning = splice_plan("auto", NO_HOOKS)
    assert spliced is False
    assert warning is not None and "userspace relay" in warning and NO_HOOKS in warning


def test_splice_true_on_a_kernel_without_the_hooks_is_an_error_naming_the_fix():
    assert splice_plan(True, None) == (True, None)
    with pytest.raises(ValueError) as ei:
        splice_plan(True, NO_HOOKS)
    assert "proxy.splice is true" in str(ei.value) and "the fix:" in str(ei.value)


def test_splice_false_never_asks_the_kernel():
    assert splice_plan(False, None) == (False, None)
    assert splice_plan(False, NO_HOOKS) == (False, None)


def test_this_kernel_has_what_the_splice_needs():
    # The CI kernels do; a probe that said no here would turn the default off silently.
    if os.geteuid() != 0:
        pytest.skip("loading a probe program needs root")
    assert splice_supported() is None


def test_established_follows_the_tcp_state():
    a, b = _tcp_pair()
    with a, b:
        assert established(a) and established(b)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        b.close()  # an RST to a
        for _ in range(500):
            if not established(a):
                break
            time.sleep(0.01)
        assert not established(a)
    assert not established(a)  # closed here too: no TCP_INFO at all


class _RefusingMaps(_RecordingMaps):
    def add_targets(self, a, b):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")


class _Transport:
    def __init__(self, sock):
        self.sock = sock

    def is_closing(self):
        return False

    def get_extra_info(self, name):
        return self.sock if name == "socket" else None


def _relay_of(a, b):
    ends = [types.SimpleNamespace(transport=_Transport(s), lost=False, eof=False) for s in (a, b)]
    return types.SimpleNamespace(a=ends[0], b=ends[1], splice=None)


def test_a_refused_insert_of_a_live_connection_is_a_failure_but_of_a_reset_one_a_skip():
    # The insert fails the same way (EOPNOTSUPP) whether the maps are amiss
    # or a pod reset its end in the microseconds since the relay started:
    # only the first is worth a warning and the splice_failed counter.
    (pa, xa), (pb, xb) = _tcp_pair(), _tcp_pair()
    with pa, xa, pb, xb:
        counters = {"spliced": 0, "splice_skipped": 0, "splice_failed": 0}
        Splicer(_RefusingMaps(), counters).splice(_relay_of(xa, xb))
        assert counters == {"spliced": 0, "splice_skipped": 0, "splice_failed": 1}

        pb.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pb.close()  # the server pod resets; the proxy has not read it yet
        for _ in range(500):
            if not established(xb):
                break
            time.sleep(0.01)
        relay = _relay_of(xa, xb)
        Splicer(_RefusingMaps(), counters).splice(relay)
        assert counters == {"spliced": 0, "splice_skipped": 1, "splice_failed": 1}
        assert relay.splice is None
