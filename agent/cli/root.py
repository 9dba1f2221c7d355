"""The ``meshlet`` command line: the root group, which gathers the command
groups of this package (one module each).

Exit codes: 0 success; 1 the command ran and found a problem (failed check,
invalid file, agent unreachable); 2 usage error.
"""

from __future__ import annotations

import importlib

import click

from .. import __version__

# Each command's module, imported when the command runs (or help lists it):
# ``meshlet run`` -- the agent, for its whole life -- then holds only the
# modules it uses, not those of ``policy``, ``ca``, ``bpf``... (about 1 MB
# of code objects; issue #13 item 6).  tests/unit/test_cli.py checks this
# table against each module's COMMANDS.
COMMAND_MODULES: dict[str, str] = {
    "run": "node",
    "uninstall": "node",
    "doctor": "node",
    "status": "node",
    "workloads": "node",
    "bpf": "bpf",
    "flows": "observe",
    "stats": "observe",
    "services": "observe",
    "ca": "ca",
    "certs": "ca",
    "inventory": "validate",
    "config": "validate",
    "policy": "policy",
}


class LazyGroup(click.Group):
    """A group whose commands come from ``COMMAND_MODULES`` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(f"{__package__}.{COMMAND_MODULES[cmd_name]}")
            for cmd in module.COMMANDS:
                self.add_command(cmd)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshlet")
def main() -> None:
    """meshlet: a sidecarless, eBPF-accelerated service mesh node agent.

    \b
    Start here:
      meshlet doctor                  does this node have what the datapath needs?
      meshlet run --config FILE       run the node agent (datapath + proxy + admin API)
      meshlet uninstall --config FILE take meshlet off the node (a stop keeps the datapath)
      meshlet status                  ask a running agent what it is doing
      meshlet bpf status              what is pinned and attached (works without the agent)
      meshlet inventory validate F    check an inventory file offline
      meshlet ca init --out DIR       create the mesh CA (root + per-node intermediates)
      meshlet certs                   workload certificates, expiry and next rotation
      meshlet flows [-f]              TCP flows from the kernel: legs, bytes, RTT
      meshlet stats                   traffic per workload pair; Prometheus on :15020/metrics
      meshlet services                service VIPs, ports and the endpoints behind them
      meshlet policy validate F|DIR   authorization + traffic policies, offline (also explain, lint)
    """
