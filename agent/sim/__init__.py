"""Simulated cluster harness (netns + veth + cgroup v2) for tests, the demo
and the benchmark.  See :mod:`agent.sim.topology`."""

from agent.sim.topology import (
    CGROUP_PREFIX,
    Cluster,
    Node,
    Pod,
    SimCommandError,
    SimError,
    cleanup_stale,
    exec_argv,
    exec_in,
    netns_path,
    popen_in,
)

__all__ = [
    "CGROUP_PREFIX",
    "Cluster",
    "Node",
    "Pod",
    "SimCommandError",
    "SimError",
    "cleanup_stale",
    "exec_argv",
    "exec_in",
    "netns_path",
    "popen_in",
]
