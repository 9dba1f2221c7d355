"""``meshlet bpf``: the eBPF datapath as bpffs and the C sources show it; works
without a running agent."""

from __future__ import annotations

import glob
import os

import click

from .common import OUTPUT, die, echo_json, load_config


@click.group()
def bpf() -> None:
    """Inspect the eBPF datapath."""


def _pin_dir(config_path: str | None, pin_dir: str | None, node: str | None) -> tuple[str, str | None]:
    """(bpffs pin dir, cgroup dir or None) from --config, --pin-dir, --node, or
    the only datapath pinned under /sys/fs/bpf/meshlet."""
    if config_path:
        from .. import cgroup as cg

        cfg = load_config(config_path)
        return cfg.bpf.pin_dir, cg.resolve(cfg.cgroup)
    if pin_dir:
        return pin_dir, None
    if node:
        return f"/sys/fs/bpf/meshlet/{node}", None
    found = sorted(glob.glob("/sys/fs/bpf/meshlet/*"))
    if len(found) == 1:
        return found[0], None
    if not found:
        die("no meshlet datapath is pinned under /sys/fs/bpf/meshlet (is an agent running?)")
    die(
        "several nodes are pinned here ("
        + ", ".join(os.path.basename(f) for f in found)
        + "); pick one with --node or --config"
    )


@bpf.command("status")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="Agent config.")
@click.option("--pin-dir", help="bpffs directory of the datapath.")
@click.option("--node", help="Node name (pin dir /sys/fs/bpf/meshlet/<node>).")
@OUTPUT
def bpf_status(config_path, pin_dir, node, output) -> None:
    """Programs, attachments, pinned maps and their fill, kernel counters.

    Reads bpffs directly, so it works while the agent is down."""
    from ..datapath.status import datapath_status

    pd, cgdir = _pin_dir(config_path, pin_dir, node)
    st = datapath_status(pd, cgdir)
    if output == "json":
        echo_json(st)
        return
    if not st["present"]:
        die(f"nothing pinned at {pd}")
    click.echo(f"datapath pinned at {pd}")
    click.echo("\nPROGRAMS")
    for p in st["programs"]:
        click.echo(f"  {p['name']:<16} id={p['id']:<6} {p['type']:<18} tag={p['tag']}")
    click.echo("\nATTACHMENTS (bpf links)")
    for li in st["links"]:
        where = f"cgroup_id={li['cgroup_id']}" if "cgroup_id" in li else f"ifindex={li['ifindex']}"
        state = "attached" if li["attached"] else "DETACHED (target gone)"
        click.echo(f"  {li['name']:<24} {li['attach']:<16} prog={li['prog_id']:<6} {where:<18} {state}")
    tc = st["tc"]
    click.echo(f"\nSTRICT MODE ON POD VETHS: {tc['attach']}")
    for f in tc["clsact_filters"]:
        state = "current" if f["current"] else "OLD PROGRAM"
        click.echo(
            f"  clsact egress {f['ifname']:<16} prog={f['prog_id']!s:<6} ifindex={f['ifindex']:<8} {state}"
        )
    if st["cgroup_attachments"]:
        click.echo(f"\nPROGRAMS ON {st['cgroup']}")
        for k, ids in st["cgroup_attachments"].items():
            click.echo(f"  {k:<16} {ids}")
    click.echo("\nMAPS")
    for m in st["maps"]:
        click.echo(
            f"  {m['name']:<16} {m['type']:<13} {m['entries']:>7}/{m['max_entries']:<7}"
            f" key={m['key_size']}B value={m['value_size']}B"
        )
    click.echo("\nCOUNTERS")
    for k, v in st["counters"].items():
        click.echo(f"  {k:<16} {v}")


@bpf.command("render")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Agent config (pin dir and map sizes come from it).",
)
@click.option("--node", default="node1", show_default=True, help="Node name when no config is given.")
def bpf_render(config_path, node) -> None:
    """Print the exact C text handed to bcc, preceded by its -D options."""
    from ..datapath.loader import DatapathSpec, render

    if config_path:
        cfg = load_config(config_path)
        spec = DatapathSpec(
            node=cfg.node,
            pin_dir=cfg.bpf.pin_dir,
            cgroup=cfg.cgroup,
            redirect_ip4=str(cfg.proxy.redirect_ipv4),
            redirect_ip6=None,
            outbound_port=cfg.proxy.outbound_port,
            mesh_mark=cfg.proxy.mesh_mark,
        )
    else:
        spec = DatapathSpec(
            node=node,
            pin_dir=f"/sys/fs/bpf/meshlet/{node}",
            cgroup="",
            redirect_ip4="0.0.0.0",
            redirect_ip6=None,
            outbound_port=15001,
            mesh_mark=0,
        )
    r = render(spec)
    click.echo("/* cflags: " + " ".join(r.cflags) + " */")
    click.echo(f"/* source hash: {r.source_hash:016x} */")
    click.echo(r.text)


COMMANDS = [bpf]
