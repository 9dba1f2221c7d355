"""`meshlet policy apply` waits for the agent's real answer (issue #12 item 5):
an apply of a large set takes a while, and the CLI used to give up at 30 s
and report a failure for an apply that then succeeded.  It now says on
stderr that it is still waiting and reports what the agent did."""

from __future__ import annotations

import pathlib
import threading

from click.testing import CliRunner

from agent.cli import main
from agent.cli import policy as policy_cli
from agent.policy.store import PolicyStore
from agent.traffic.trafficpolicy import TRAFFIC_KIND
from tests.support.admin import admin_server
from tests.unit.test_admin_policies import PolicyAgent

REPO_POLICIES = pathlib.Path(__file__).resolve().parents[2] / "policies"


class SlowAgent(PolicyAgent):
    """The kernel sync after an apply takes until the test releases it."""

    def __init__(self, sock, store):
        super().__init__(sock, store)
        self.release = threading.Event()

    def sync_policy_kernel(self, wait: bool = True) -> bool:
        assert self.release.wait(30)
        return super().sync_policy_kernel() or True


def test_apply_waits_for_the_real_result_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_cli, "PROGRESS_EVERY", 0.05)
    sock = str(tmp_path / "admin.sock")
    agent = SlowAgent(sock, PolicyStore(str(tmp_path / "run"), kinds=[TRAFFIC_KIND]).load())
    with admin_server(agent):
        # release the agent only once the CLI has said twice that it is waiting
        orig_echo = policy_cli.click.echo
        said: list[str] = []

        def echo(msg=None, *a, **kw):
            said.append(str(msg))
            if sum("waiting for the agent" in s for s in said) >= 2:
                agent.release.set()
            return orig_echo(msg, *a, **kw)

        monkeypatch.setattr(policy_cli.click, "echo", echo)
        r = CliRunner().invoke(main, ["policy", "apply", "-f", str(REPO_POLICIES / "20-shop-deny-admin.yaml"),
                                      "--socket", sock])
    assert r.exit_code == 0, r.output
    assert "authorizationpolicy shop/deny-admin created" in r.stdout
    assert "waiting for the agent" in r.stderr and "waiting" not in r.stdout
    assert agent.kernel_syncs == 1 and agent.policies.count == 1
