"""Test servers run as processes inside simulated pods (tests.support.podhttpd,
tests.support.podgrpc, ...): started with the repository on PYTHONPATH, each
logging what it received as JSON lines, restartable with other behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def repo_env() -> dict:
    """The environment for a process that imports this repository's modules."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


class PodServers:
    """One server process per pod: ``python -m <argv...> --name <pod>
    --log <file> <extra...>``; it prints ``listening`` once it accepts."""

    def __init__(self, cluster, logdir: str, argv: Sequence[str]) -> None:
        self.cluster = cluster
        self.logdir = logdir
        self.argv = list(argv)
        self.procs: dict[str, subprocess.Popen] = {}

    def log(self, name: str) -> str:
        return os.path.join(self.logdir, f"{name}.jsonl")

    def start(self, name: str, *extra: str) -> None:
        self.stop(name)
        open(self.log(name), "w").close()
        p = self.cluster.pod(name).popen(
            [sys.executable, "-m", *self.argv, "--name", name, "--log", self.log(name), *extra],
            stdout=subprocess.PIPE, text=True, env=repo_env(), cwd=ROOT)
        assert "listening" in p.stdout.readline(), name
        self.procs[name] = p

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None:
            p.kill()
            p.wait(10)

    def received(self, name: str) -> list[dict]:
        with open(self.log(name)) as f:
            return [json.loads(line) for line in f if line.strip()]

    def reset_logs(self) -> None:
        for name in self.procs:
            open(self.log(name), "w").close()
