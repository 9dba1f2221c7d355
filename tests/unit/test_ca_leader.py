"""Two `meshlet ca controller` replicas against the test API server
(tests.support.kubeapi, which serves coordination.k8s.io/v1 Leases with
optimistic concurrency), with the permissions deploy/rbac.yaml grants:
exactly one signs; when the leader cannot renew it stops by itself and the
other takes over after the lease expires, never both at once; a conflict
on the Lease is a lost round, not an error; a node asking in a loop is
refused past the re-issue limit, by a new leader too."""

from __future__ import annotations

import re
import threading
import uuid
from datetime import timedelta

import pytest

from agent.identity import csrpolicy as cp
from agent.identity.controller import CSRS, CaController
from agent.identity.leader import LeaderElector
from agent.identity.leaderlease import LeaseConfig, read_lease
from agent.workloads.kubeclient import ApiError, KubeClient
from tests.support import kubeapi as k
from tests.unit.test_ca_controller import Cluster, _conditions, _installed, wait_for

# short timings (the proportions of the manifest's 15/10/2) where a test waits for an expiry;
# long ones where it must not happen even on a loaded machine
DURATION, DEADLINE, RETRY = 3.0, 2.0, 0.2
STEADY = (20.0, 12.0, 0.3)
LEASES = "/apis/coordination.k8s.io/v1/namespaces/meshlet-system/leases"


def lease(name: str, timings: tuple[float, float, float] = (DURATION, DEADLINE, RETRY)) -> LeaseConfig:
    duration, deadline, retry = timings
    return LeaseConfig(
        identity=f"{name}_{uuid.uuid4().hex[:6]}",
        lease_duration=duration,
        renew_deadline=deadline,
        retry_period=retry,
    )


@pytest.fixture
def cluster(tmp_path):
    with k.FakeKubeAPI(workdir=str(tmp_path)) as api:
        c = Cluster(api, tmp_path)
        try:
            yield c
        finally:
            c.close()


class NeverTwo:
    """Watches that no two controllers are the leader at the same moment."""

    def __init__(self, *ctls: CaController):
        self.ctls, self.both = ctls, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            if sum(c.leading() for c in self.ctls) > 1:
                self.both += 1

    def stop(self) -> int:
        self._stop.set()
        self._t.join(5)
        return self.both


def the_lease(cluster: Cluster) -> dict:
    return cluster.api.get("Lease", "meshlet-system", "meshlet-ca", "coordination.k8s.io/v1")


def test_of_two_replicas_exactly_one_signs(cluster):
    a = cluster.controller(lease=lease("ca-0", STEADY))
    b = cluster.controller(lease=lease("ca-1", STEADY))
    watch = NeverTwo(a, b)
    leader = wait_for(
        "a leader", lambda: next((c for c in (a, b) if c.leading() and c.synced.is_set()), None)
    )
    follower = b if leader is a else a
    assert leader.elector is not None and follower.elector is not None
    wait_for("the follower to read the lease", lambda: follower.elector.state == "following")
    held = the_lease(cluster)["spec"]
    assert held["holderIdentity"] == leader.elector.cfg.identity and held["leaseDurationSeconds"] == 20
    e1, e2 = cluster.enroller("node-a"), cluster.enroller("node-b")
    wait_for("both intermediates", lambda: _installed(e1) and _installed(e2))
    assert leader.counters["signed"] == 2 and leader.counters["approved"] == 2
    # the follower listed nothing and wrote nothing, and says so
    assert follower.counters == dict.fromkeys(follower.counters, 0)
    assert not follower.synced.is_set()
    assert follower.ready()[0] and "following" in follower.ready()[1]
    assert leader.status()["leader"]["leader"] and not follower.status()["leader"]["leader"]
    # renewals keep the same leader: no transition while it is healthy
    renewed = leader.elector.counters["renewed"]
    wait_for("a few renewals", lambda: leader.elector.counters["renewed"] >= renewed + 3)
    assert the_lease(cluster)["spec"]["leaseTransitions"] == 0
    assert watch.stop() == 0


def test_a_leader_that_cannot_renew_stops_and_the_other_takes_over(cluster):
    a = cluster.controller(lease=lease("ca-0"))
    wait_for("ca-0 leads", lambda: a.leading() and a.synced.is_set())
    b = cluster.controller(lease=lease("ca-1"))
    assert b.elector is not None and a.elector is not None
    wait_for("ca-1 follows", lambda: b.elector.state == "following")
    watch = NeverTwo(a, b)
    # ca-0's election dies (a partition, a stuck thread): no more renewals, no release;
    # its CSR loop keeps running -- only its own deadline stops it from signing
    a.elector._stop.set()
    a.elector._thread.join(5)
    wait_for("ca-0 to stop leading by itself", lambda: not a.leading())
    signed_before = a.counters["signed"]
    wait_for("ca-1 to take over", lambda: b.leading() and b.synced.is_set(), timeout=30)
    spec = the_lease(cluster)["spec"]
    assert spec["holderIdentity"] == b.elector.cfg.identity and spec["leaseTransitions"] == 1
    assert spec["acquireTime"] == spec["renewTime"] or spec["acquireTime"] < spec["renewTime"]
    e = cluster.enroller("node-a")
    wait_for("node-a's intermediate", lambda: _installed(e))
    assert b.counters["signed"] == 1 and a.counters["signed"] == signed_before == 0
    assert watch.stop() == 0


def test_a_stopping_leader_releases_the_lease(cluster):
    a = cluster.controller(lease=lease("ca-0"))
    wait_for("ca-0 leads", lambda: a.leading())
    b = cluster.controller(lease=lease("ca-1"))
    assert a.elector is not None and b.elector is not None
    wait_for("ca-1 follows", lambda: b.elector.state == "following")
    a.stop()
    a.elector.stop()
    released = the_lease(cluster)["spec"]
    assert released["holderIdentity"] == "" and released["leaseDurationSeconds"] == 1
    # taken on ca-1's next round: a released lease is not waited out (test_leaderlease)
    wait_for("ca-1 to take the released lease", b.leading)
    assert the_lease(cluster)["spec"]["leaseTransitions"] == 1


class StopDuringRenewal(KubeClient):
    """A real client; once ``armed``, its next write of the Lease lands, and
    then its answer is held until the elector is stopping: a stop that comes
    while a renewal is in flight."""

    elector: LeaderElector
    armed = False
    in_flight = threading.Event()

    def request(self, method, path, body=None, **kw):
        out = super().request(method, path, body, **kw)
        if method == "PUT" and path.startswith(LEASES) and self.armed:
            self.armed = False
            self.in_flight.set()
            wait_for("the stop", self.elector._stop.is_set)
        return out


def test_a_leader_stopped_while_renewing_releases_the_lease_it_just_wrote(cluster):
    # The renewal moved the Lease's resourceVersion on after the elector had
    # read it; a release from the version read would be a 409 and leave the
    # Lease held until it expires (the next replica waits 15 s).
    base = KubeClient.from_kubeconfig(cluster.api.kubeconfig(str(cluster.tmp / "kc-stop.yaml"), token="ca-token"))
    client = StopDuringRenewal(base.server, base.ssl_context, token=base.token)
    client.in_flight = threading.Event()
    el = client.elector = LeaderElector(client, lease("ca-0", STEADY)).start()
    try:
        wait_for("ca-0 leads", el.is_leader)
        client.armed = True
        assert client.in_flight.wait(30)
    finally:
        el.stop()
    released = the_lease(cluster)["spec"]
    assert released["holderIdentity"] == "" and released["leaseDurationSeconds"] == 1, released


class LostAnswer(KubeClient):
    """A real client; once ``armed``, its next write of the Lease lands but
    its answer is lost (a timeout)."""

    armed = False

    def request(self, method, path, body=None, **kw):
        out = super().request(method, path, body, **kw)
        if method == "PUT" and path.startswith(LEASES) and self.armed:
            self.armed = False
            raise ApiError(0, f"PUT {path}: timed out")
        return out


def test_a_release_that_conflicts_reads_the_lease_again_and_releases_it_if_still_held(cluster):
    base = KubeClient.from_kubeconfig(cluster.api.kubeconfig(str(cluster.tmp / "kc-lost.yaml"), token="ca-token"))
    client = LostAnswer(base.server, base.ssl_context, token=base.token)
    el = LeaderElector(client, lease("ca-0", STEADY))
    el.step()  # created: the leader
    client.armed = True
    el.step()  # the renewal landed, its answer did not: the elector's version is stale
    assert el.counters["errors"] == 1 and el.is_leader()
    el.stop()  # 409 from the stale version, read again: still ours, released
    released = the_lease(cluster)["spec"]
    assert released["holderIdentity"] == "" and released["leaseDurationSeconds"] == 1, released


class RacingClient(KubeClient):
    """A real client; when ``race`` is set, its next read of the Lease is
    followed, before this replica writes, by another replica's write that
    takes the Lease (the API's resourceVersion moves on)."""

    api: k.FakeKubeAPI
    race: str | None = None

    def request(self, method, path, body=None, **kw):
        out = super().request(method, path, body, **kw)
        if method == "GET" and path.startswith(LEASES) and self.race:
            other = self.api.get("Lease", "meshlet-system", "meshlet-ca", "coordination.k8s.io/v1")
            other["spec"]["holderIdentity"] = self.race
            self.api.apply(other)
            self.race = None
        return out


def test_a_conflict_on_the_lease_is_a_lost_round(cluster):
    base = KubeClient.from_kubeconfig(
        cluster.api.kubeconfig(str(cluster.tmp / "kc-race.yaml"), token="ca-token")
    )
    client = RacingClient(base.server, base.ssl_context, token=base.token)
    client.api = cluster.api
    el = LeaderElector(client, lease("ca-0", STEADY))
    el.step()  # no Lease yet: created, leader
    assert el.is_leader() and el.counters["acquired"] == 1
    # between this renewal's read and its write, ca-1 takes the Lease: a real 409
    client.race = "ca-1_cccc"
    el.step()
    assert el.counters["conflicts"] == 1 and el.counters["errors"] == 0
    assert "another replica wrote lease meshlet-system/meshlet-ca first" in el.message
    assert the_lease(cluster)["spec"]["holderIdentity"] == "ca-1_cccc"  # not overwritten
    # the next round reads what is there: ca-1 holds it, so ca-0 is not the leader any more
    el.step()
    assert not el.is_leader() and el.state == "following" and "ca-1_cccc holds lease" in el.message
    assert the_lease(cluster)["spec"]["holderIdentity"] == "ca-1_cccc"


def test_the_lease_is_written_only_from_the_version_read(cluster):
    """The test API server refuses what the real one refuses: a Lease PUT
    without a resourceVersion (422), or with a stale one (409)."""
    c = cluster.client("ca-token")
    cfg = lease("ca-0")
    from agent.identity.leaderlease import lease_object

    made = c.create(LEASES, lease_object(cfg, cp_now(), None))
    rec = read_lease(made)
    body = lease_object(cfg, cp_now(), rec)
    del body["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as e:
        c.replace(f"{LEASES}/meshlet-ca", body)
    assert e.value.status == 422 and "must be specified for an update" in str(e.value)
    c.replace(f"{LEASES}/meshlet-ca", lease_object(cfg, cp_now(), rec))
    with pytest.raises(ApiError) as e:
        c.replace(f"{LEASES}/meshlet-ca", lease_object(cfg, cp_now(), rec))
    assert e.value.status == 409
    # deploy/rbac.yaml's Role: this Lease only, and no delete or list
    with pytest.raises(ApiError) as e:
        c.get(f"{LEASES}/other")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        c.delete(f"{LEASES}/meshlet-ca")
    assert e.value.status == 403
    with pytest.raises(ApiError) as e:
        c.get("/apis/coordination.k8s.io/v1/namespaces/default/leases/meshlet-ca")
    assert e.value.status == 403


def cp_now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


def test_a_node_asking_in_a_loop_is_refused_past_the_limit(cluster):
    limit = cp.ReissueLimit(2, timedelta(hours=1))
    ctl = cluster.controller(reissue=limit)
    names = [cluster.create_csr("node-a-token", "node-a") for _ in range(2)]
    wait_for("two signed", lambda: ctl.counters["signed"] == 2)
    third = cluster.create_csr("node-a-token", "node-a")
    csr = wait_for("a decision", lambda: _conditions(cluster.csr(third)) and cluster.csr(third))
    denied = _conditions(csr)["Denied"]
    assert denied["reason"] == "RateLimited" and "certificate" not in csr.get("status", {})
    assert "node node-a was issued 2 intermediates in the last 1h" in denied["message"]
    assert "the re-issue limit is 2 per 1h" in denied["message"]
    # another node is not affected
    other = cluster.create_csr("node-b-token", "node-b")
    wait_for("node-b signed", lambda: (cluster.csr(other).get("status") or {}).get("certificate"))
    wait_for("the counts", lambda: ctl.counters["signed"] == 3)
    assert ctl.counters["rate_limited"] == 1
    # the node's own client, refused by the limit, waits until the time the message names
    # (rather than its usual backoff, here at most 0.3 s) before it asks again
    e = cluster.enroller("node-a")
    wait_for("the limited denial", lambda: e.state == "denied")
    wait = re.search(r"RateLimited: .*; asking again in (\d+)s$", e.message)
    assert wait is not None and 3000 < int(wait.group(1)) < 3700, e.message
    e.stop()
    # a new controller (a restart, a new leader) learns the history from the signed CSRs
    cluster.stop_controller(ctl)
    fresh = cluster.controller(reissue=limit)
    fourth = cluster.create_csr("node-a-token", "node-a")
    csr = wait_for("a decision", lambda: _conditions(cluster.csr(fourth)) and cluster.csr(fourth))
    assert _conditions(csr)["Denied"]["reason"] == "RateLimited"
    wait_for("the count", lambda: fresh.counters["rate_limited"] == 1)
    assert fresh.counters["signed"] == 0
    # an administrator's approval does not get past the limit either: Failed, unsigned
    cluster.stop_controller(fresh)
    fifth = cluster.create_csr("node-a-token", "node-a")
    admin = cluster.client()
    body = admin.get(f"{CSRS}/{fifth}")
    body["status"] = {"conditions": [cp.condition("Approved", "AdminApproved", "by hand", cp_now())]}
    admin.replace(f"{CSRS}/{fifth}/approval", body)
    third_ctl = cluster.controller(reissue=limit)
    csr = wait_for("a decision", lambda: "Failed" in _conditions(cluster.csr(fifth)) and cluster.csr(fifth))
    assert _conditions(csr)["Failed"]["reason"] == "RateLimited" and "certificate" not in csr["status"]
    assert third_ctl.counters["signed"] == 0
    assert all((cluster.csr(n).get("status") or {}).get("certificate") for n in names)


def test_the_cli_refuses_lease_timings_that_could_overlap_two_leaders(tmp_path):
    from click.testing import CliRunner

    from agent.cli.ca import ca_controller
    from agent.identity.ca import init_ca

    init_ca(str(tmp_path / "ca"), "cluster.local", [])
    args = [
        "--root",
        str(tmp_path / "ca"),
        "--metrics-port",
        "0",
        "--lease-duration",
        "10",
        "--renew-deadline",
        "10",
    ]
    res = CliRunner().invoke(ca_controller, args)  # refused before it talks to any API
    assert res.exit_code == 1
    assert "renew deadline (10s) < lease duration (10s): a leader must stop before another" in res.output
