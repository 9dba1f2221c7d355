"""CertManager against a fake agent CA on a real Unix socket.

``FakeCA`` (tests/support/ca.py) speaks the agent's CA protocol (one JSON
line each way) and signs CSRs with a CertFactory intermediate, for the
identities it allows only.
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
from cryptography.hazmat.primitives import serialization

from agent.identity.svid import verify_svid
from agent.identity.spiffe import parse_spiffe_id
from agent.proxy.workload_certs import CertManager, ca_request
from agent.proxy.state import parse_state
from tests.support.aio import run, until
from tests.support.ca import FakeCA

TD = "cluster.local"


def ident(sa: str, ns: str = "default") -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def state(ca_socket: str, *, generation: int = 1, pods=("web", "api"), remote=("db",)):
    doc = {
        "version": 1, "generation": 1, "node": "node1", "trust_domain": TD,
        "identity": {"trust_domain": TD, "ca_socket": ca_socket, "generation": generation, "cert_ttl": 3600},
        "listen": {"ipv4": "127.0.0.1", "outbound_port": 15001, "tunnel_port": 15008},
        "nodes": {"node1": {"address": "127.0.0.1"}, "node2": {"address": "127.0.0.2"}},
        "pods": [{"name": f"{sa}-1", "namespace": "default", "service_account": sa, "node": "node1",
                  "ips": [f"10.0.1.{i + 1}"], "cgroup_id": 100 + i} for i, sa in enumerate(pods)]
        + [{"name": f"{sa}-1", "namespace": "default", "service_account": sa, "node": "node2",
            "ips": [f"10.0.2.{i + 1}"]} for i, sa in enumerate(remote)]
        + [{"name": "plain", "namespace": "default", "service_account": "plain", "node": "node1",
            "ips": ["10.0.1.99"], "mesh": False}],
    }
    return parse_state(doc, require_identity=True)


def manager(st, **kw) -> CertManager:
    kw.setdefault("rng", random.Random(7))
    kw.setdefault("backoff_min", 0.1)
    kw.setdefault("backoff_max", 0.4)
    return CertManager.from_state(st, **kw)


def test_issues_for_local_identities_only_and_keys_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    sock = str(tmp_path / "ca.sock")
    st = state(sock)

    async def main():
        ca = await FakeCA(sock, st.local_identities | {ident("db")}).start()
        m = manager(st)
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await m.wait_ready(10)
            return ca, m, m.snapshot()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    ca, m, snap = run(main())
    assert sorted(ca.signed()) == [ident("api"), ident("web")]  # not db (node2), not plain (no mesh)
    for who in (ident("api"), ident("web")):
        svid = m.certificate(who)
        assert verify_svid(list(svid.chain), ca.factory.bundle, expected=parse_spiffe_id(who))
        # the certificate is for the key generated here
        pub = lambda k: k.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert pub(svid.chain[0].public_key()) == pub(svid.key.public_key())
        assert svid.not_before < svid.next_renewal < svid.not_after
    assert m.certificate(ident("db")) is None
    assert [i["spiffe_id"] for i in snap["identities"]] == [ident("api"), ident("web")]
    assert all(i["serial"] and i["not_after"] and i["next_rotation"] for i in snap["identities"])
    assert snap["bundle_fingerprint"] == ca.factory.bundle.fingerprint()
    # nothing but the CA socket was ever created where files could go
    assert sorted(os.listdir(tmp_path)) == []  # the socket was removed at stop


def test_renews_at_about_half_the_lifetime_with_a_fresh_key(tmp_path):
    sock = str(tmp_path / "ca.sock")
    st = state(sock, pods=("web",), remote=())

    async def main():
        ca = await FakeCA(sock, st.local_identities, ttl=3).start()
        m = manager(st)
        t0 = m.clock()
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await m.wait_ready(10)
            t1 = m.clock()
            first = m.certificate(ident("web"))
            await until(lambda: m.certificate(ident("web")).serial != first.serial, timeout=10)
            second = m.certificate(ident("web"))
            return first, second, t0, t1, m.counters
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    first, second, t0, t1, counters = run(main())
    # Renewal is planned at 50 % ± 10 % of the lifetime left when the cert
    # arrived, and it arrived somewhere in [t0, t1]; the fraction computed
    # with t0 over-estimates and with t1 under-estimates it, whatever the
    # machine's load (no timing claim).
    def frac(arrival):
        return (first.next_renewal - arrival) / (first.not_after - arrival)

    assert frac(t0) >= 0.4 and frac(t1) <= 0.6, (frac(t0), frac(t1))
    assert second.key is not first.key and counters["renewed"] >= 1


def test_keeps_serving_while_the_ca_is_down_then_recovers(tmp_path, caplog):
    sock = str(tmp_path / "ca.sock")
    st = state(sock, pods=("web",), remote=())

    async def main():
        ca = await FakeCA(sock, st.local_identities, ttl=4).start()
        m = manager(st)
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await m.wait_ready(10)
            first = m.certificate(ident("web"))
            await ca.stop()
            # the renewal comes due and fails; the current certificate stays in use
            await until(lambda: m.counters["unreachable"] >= 3, timeout=10)
            during = m.certificate(ident("web"))
            retry_gaps = m._ca_retry_at - m.clock()
            await ca.start()
            await until(lambda: m.certificate(ident("web")).serial != first.serial, timeout=10)
            return first, during, retry_gaps, m.snapshot()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    first, during, gap, snap = run(main())
    assert during is first
    assert 0 < gap <= 0.4  # backoff is capped (backoff_max in this test)
    assert "certificate authority unavailable" in caplog.text and "still serving 1" in caplog.text
    assert snap["counters"]["renewed"] >= 1


def test_backoff_doubles_from_one_to_thirty_seconds():
    m = CertManager("/nonexistent/ca.sock", TD)
    assert [m._backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_expired_certificate_is_never_returned(tmp_path):
    now = [1000.0]
    m = CertManager("/nonexistent/ca.sock", TD, clock=lambda: now[0])
    from agent.proxy.workload_certs import Svid, _Entry
    e = _Entry(ident("web"))
    e.svid = Svid(ident("web"), (), None, 900.0, 1100.0, 1, 1050.0, 1)
    m._entries[e.identity] = e
    assert m.certificate(ident("web")) is e.svid
    now[0] = 1100.0
    assert m.certificate(ident("web")) is None and not m.ready()


def test_generation_bump_fetches_the_new_bundle_and_reissues_everything(tmp_path):
    sock = str(tmp_path / "ca.sock")
    st = state(sock)

    async def main():
        ca = await FakeCA(sock, st.local_identities).start()
        m = manager(st)
        changes = []
        m.listeners.append(lambda: changes.append(m.bundle_fingerprint))
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await m.wait_ready(10)
            old_fp, old_serials = m.bundle_fingerprint, {i: m.certificate(i).serial for i in st.local_identities}
            ca.rotate()
            m.update(state(sock, generation=2))
            await until(lambda: m.bundle_fingerprint == ca.factory.bundle.fingerprint()
                        and all(m.certificate(i).serial != s for i, s in old_serials.items()))
            ops = [r["op"] for r in ca.requests]
            return m, ca, old_fp, ops
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    m, ca, old_fp, ops = run(main())
    assert m.bundle_fingerprint != old_fp and m.generation == 2 and m.ca_generation == 2
    for i in (ident("api"), ident("web")):
        svid = m.certificate(i)
        verify_svid(list(svid.chain), ca.factory.bundle, expected=parse_spiffe_id(i))
        assert svid.generation == 2
    # first the bundle, then every certificate, again after the bump
    assert ops == ["bundle", "sign", "sign", "bundle", "sign", "sign"]


def test_identity_changes_follow_the_state(tmp_path):
    sock = str(tmp_path / "ca.sock")
    st = state(sock, pods=("web",))

    async def main():
        ca = await FakeCA(sock, {ident("web"), ident("api")}).start()
        m = manager(st)
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await m.wait_ready(10)
            m.update(state(sock, pods=("api",)))  # web left this node, api arrived
            await m.wait_ready(10)
            return m
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    m = run(main())
    assert m.certificate(ident("web")) is None and m.certificate(ident("api")) is not None
    assert [i["spiffe_id"] for i in m.snapshot()["identities"]] == [ident("api")]


def test_refusal_backs_off_per_identity_and_is_reported(tmp_path, caplog):
    sock = str(tmp_path / "ca.sock")
    st = state(sock, pods=("web", "api"))

    async def main():
        ca = await FakeCA(sock, {ident("web")}).start()  # the agent does not know api yet
        m = manager(st)
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await until(lambda: m.certificate(ident("web")) is not None
                        and ca.signed().count(ident("api")) >= 2)
            ca.allowed.add(ident("api"))  # the agent caught up
            await m.wait_ready(10)
            return m, ca
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    m, ca = run(main())
    assert m.counters["refused"] >= 2
    assert "no new certificate for spiffe://cluster.local/ns/default/sa/api" in caplog.text
    assert "not_on_node" in caplog.text


def test_unusable_answers_are_refused(tmp_path):
    sock = str(tmp_path / "ca.sock")
    st = state(sock, pods=("web",), remote=())

    class WrongKeyCA(FakeCA):
        async def _handle(self, reader, writer):
            req = json.loads(await reader.readline())
            self.requests.append(req)
            chain, _ = self.factory.leaf(req.get("identity"))  # valid, but not for the CSR's key
            resp = {"ok": True, "chain": self.factory.chain_pem(chain).decode(),
                    "bundle": self.factory.bundle.to_pem().decode(), "generation": 1}
            writer.write(json.dumps(resp).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def main():
        ca = await WrongKeyCA(sock, st.local_identities).start()
        m = manager(st)
        task = asyncio.get_running_loop().create_task(m.run())
        try:
            await until(lambda: m.counters["refused"] >= 1)
            return m
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await ca.stop()

    m = run(main())
    assert m.certificate(ident("web")) is None
    assert "not for the key" in m.snapshot()["identities"][0]["last_error"]


def test_ca_request_errors_say_what_happened(tmp_path):
    async def main():
        out = []
        for path in (str(tmp_path / "missing.sock"),):
            with pytest.raises(Exception) as ei:
                await ca_request(path, {"op": "bundle"}, timeout=2)
            out.append(ei.value)
        return out

    (err,) = run(main())
    assert err.reason == "unreachable" and "is the meshlet agent running" in str(err)
