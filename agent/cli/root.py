"""The ``meshlet`` command line: the root group, which gathers the command
groups of this package (one module each).

Exit codes: 0 success; 1 the command ran and found a problem (failed check,
invalid file, agent unreachable); 2 usage error.
"""

from __future__ import annotations

import click

from .. import __version__
from . import bpf, ca, node, observe, policy, validate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


for _module in (node, bpf, observe, ca, validate, policy):
    for _cmd in _module.COMMANDS:
        main.add_command(_cmd)
