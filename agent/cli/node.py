"""The agent on this node: ``run`` it, ``doctor`` the kernel first, ask it for
its ``status`` and its ``workloads``, ``uninstall`` it."""

from __future__ import annotations

import glob
import os
import sys

import click

from .common import OUTPUT, admin_get, admin_socket, agent_opts, die, echo_json, load_config


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Agent config (YAML). See README for the fields.",
)
@click.option(
    "--keep-datapath",
    is_flag=True,
    hidden=True,
    help="Accepted for older scripts: keeping the datapath is what every stop does now.",
)
def run(config_path: str, keep_datapath: bool) -> None:
    """Run the node agent in the foreground until SIGTERM/SIGINT.

    Checks the kernel first (as `meshlet doctor` does) and refuses to start,
    with the fix for each missing piece, rather than attach half a datapath.
    A stop never opens the mesh: the pinned datapath and the proxy workers
    stay, and a restarted agent adopts them. `meshlet uninstall` removes them.

    Once the config checks out, this process becomes the agent daemon
    (`python -S -P -m agent.daemon --config FILE`, the same pid), which
    leaves the CLI's modules and `site` out of the agent's memory.
    MESHLET_AGENT_SITE=1 keeps the agent in this process, with `site`.
    """
    cfg = load_config(config_path)
    from ..daemon import AGENT_SITE_ENV, exec_daemon, serve

    if os.environ.get(AGENT_SITE_ENV) != "1":
        # The agent runs as agent.daemon (same pid): without click, the CLI
        # and `site` for the node's life.  See agent/daemon.py.
        try:
            exec_daemon(config_path)
        except OSError as e:
            die(f"cannot start the agent ({sys.executable}): {e.strerror}")
    serve(cfg)


@click.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The agent config of this node (its pin dir and run dir).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Uninstall even while pods are enrolled (their connections then go direct, in plaintext).",
)
@OUTPUT
def uninstall(config_path: str, force: bool, output: str) -> None:
    """Take meshlet off this node: stop the proxy workers a stopped agent left
    running, detach and unpin the datapath. Refuses while the agent runs, and
    while pods are enrolled unless --force."""
    cfg = load_config(config_path)
    from ..app import AgentError
    from ..app import uninstall as do_uninstall

    try:
        res = do_uninstall(cfg, force=force)
    except AgentError as e:
        die(str(e))
    if output == "json":
        echo_json(res)
        return
    click.echo(
        f"node {res['node']}: datapath {res['pin_dir']} "
        f"{'removed' if res['datapath_removed'] else 'was not there'}, "
        f"{res['proxy_workers_stopped']} proxy worker(s) stopped"
        + (f", {n} pod(s) left the mesh (--force)" if (n := res["enrolled_pods_dropped"]) else "")
    )


@click.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Also check what this agent config needs (its cgroup, pin dir).",
)
@agent_opts
@OUTPUT
def doctor(config_path: str | None, sock: str | None, node: str | None, output: str) -> None:
    """Check the kernel features the datapath needs; print the fix for each
    missing one. Exit 1 when a required piece is missing (optional ones, such
    as tcx outside strict mode, are reported but do not fail).

    With a running agent (--socket/--node, the config's admin socket, or the
    only one under /run/meshlet) that gets its node CA by CSR
    (identity.nodeCA: csr), also whether the node has its intermediate: a
    warning naming the CSR while it waits, a failure when it was denied.
    With such a config and no agent answering, the same from the node's
    files: the intermediate, and the request record <caKey>.pending.json
    ("CSR <name> pending since ..., waiting for approval", or the reason it
    was denied)."""
    from ..doctor import (
        check_agent_node_ca,
        check_node_ca_files,
        checks_to_json,
        format_checks,
        ready,
        run_checks,
    )

    cfg = load_config(config_path) if config_path else None
    checks = run_checks(cfg)
    agent = _doctor_socket(cfg, sock, node)
    c = None
    if agent is not None:
        # an agent that does not answer matters when asked for, or when the config says CSR
        # (then the node's files answer instead)
        c = check_agent_node_ca(agent, expected=bool(sock or node) and not _by_csr(cfg))
    if c is None and cfg is not None and _by_csr(cfg):
        c = check_node_ca_files(cfg.identity, agent=agent)
    if c is not None:
        checks.append(c)
    if output == "json":
        echo_json(checks_to_json(checks))
    else:
        click.echo(format_checks(checks))
    sys.exit(0 if ready(checks) else 1)


def _by_csr(cfg) -> bool:
    return cfg is not None and cfg.workloads.source == "kubernetes" and cfg.identity.node_ca == "csr"


def _doctor_socket(cfg, sock: str | None, node: str | None) -> str | None:
    """The agent ``meshlet doctor`` asks, if any (never exits: the kernel checks stand alone)."""
    if sock or node or os.environ.get("MESHLET_ADMIN_SOCKET"):
        return admin_socket(sock, node)
    if cfg is not None:
        return cfg.admin.socket if _by_csr(cfg) else None
    found = glob.glob("/run/meshlet/*/admin.sock")
    return found[0] if len(found) == 1 else None


@click.command()
@agent_opts
@OUTPUT
def status(sock, node, output) -> None:
    """What the running agent is doing: datapath, enrolled pods, proxy workers."""
    st = admin_get("/v1/status", admin_socket(sock, node))
    if output == "json":
        echo_json(st)
        return
    dp = st["datapath"]
    click.echo(
        f"node {st['node']}  mode {st['mode']}  up {st['uptime_s']}s  datapath {dp['how']} ({dp['pin_dir']})"
        + (f", strict mode via {dp['tc_attach']}" if dp.get("tc_attach") else "")
    )
    inv = st["inventory"]
    click.echo(
        f"inventory {inv['path']}: {inv['pods']} pods"
        + (f"\n  LAST RELOAD FAILED (previous state kept):\n  {inv['error']}" if inv["error"] else "")
    )
    for line in source_lines(inv.get("source") or {}):
        click.echo(f"  {line}")
    click.echo(f"enrolled {len(st['enrolled'])} pods; pending {len(st['pending'])}")
    from ..handover import status_lines as handover_lines

    for line in handover_lines(st.get("handover")):
        click.echo(line)
    if dp.get("guarded_cgroups"):
        click.echo("unknown pods refused (EPERM) under: " + ", ".join(dp["guarded_cgroups"]))
    ident = st.get("identity") or {}
    csr = ident.get("node_ca_csr")
    if ident.get("error") or csr:
        click.echo(
            f"identity: {ident.get('error') or 'node CA loaded'}"
            + (f"\n  node CA by CSR: {csr['state']}: {csr['message']}" if csr else "")
        )
    pol = st.get("policy") or {}
    if pol:
        click.echo(f"policies {pol.get('count')}, version {pol.get('version')}")
        from .policykube import status_lines

        for line in status_lines(pol.get("cluster")):
            click.echo(f"  {line}")
    for p in st["pending"]:
        click.echo(f"  pending {p['pod']}: {p['reason']}")
    for w in st["proxy"]:
        s = w.get("stats") or {}
        click.echo(
            f"proxy worker {w['worker']}: pid {w['pid']} "
            f"{'alive' if w['alive'] else 'DOWN'}{' (adopted)' if w['adopted'] else ''}"
            f" restarts {w['restarts']}"
            + (
                f", {s.get('active_connections')} active connections, "
                + ", ".join(f"{k}={v}" for k, v in (s.get("counters") or {}).items() if v)
                if s
                else ""
            )
        )
        for group, what in (("tunnel_spread", "tunnel"), ("outbound_spread", "pod (outbound)")):
            spread = s.get(group) or {}
            hashed = {k: v for k, v in spread.items() if k in ("ipv4", "ipv6") and v != "least-loaded"}
            for family, why in hashed.items():
                why = why.removeprefix("hash: ")
                click.echo(f"  {family} {what} connections spread by the kernel's hash, not by load ({why})")
        t = s.get("tracing")
        if t:
            click.echo(
                f"  trace spans to {t['endpoint']}: exported {t['exported']}, dropped {t['dropped']} "
                f"(queue full), failed {t['failed']} ({t['export_failures']} failed exports), "
                f"queued {t['queued']}"
            )
    click.echo("kernel counters: " + ", ".join(f"{k}={v}" for k, v in dp["counters"].items()))
    for e in dp["tc_errors"]:
        click.echo(f"  tc error: {e}")


@click.command()
@agent_opts
@OUTPUT
def workloads(sock, node, output) -> None:
    """Pods on this node and whether the mesh has them."""
    data = admin_get("/v1/workloads", admin_socket(sock, node))
    if output == "json":
        echo_json(data)
        return
    click.echo(f"{'POD':<28} {'ENROLLED':<9} {'MODE':<11} {'IPS':<34} REASON")
    for w in data["workloads"]:
        click.echo(
            f"{w['pod']:<28} {'yes' if w['enrolled'] else 'no':<9} {w['mode']:<11} "
            f"{','.join(w['ips']):<34} {w['reason'] or ''}"
        )


def source_lines(src: dict, now: float | None = None) -> list[str]:
    """What ``meshlet status`` says about the workload source beyond its path:
    for the Kubernetes API, whether every watch is open, how stale the
    state is otherwise and why, and the objects that were left out."""
    import time

    d = src.get("detail")
    if src.get("kind") != "kubernetes" or not d:
        return []
    now = time.time() if now is None else now
    out = []
    if d.get("in_sync"):
        out.append("kubernetes: in sync (every watch open)")
    else:
        at = d.get("in_sync_at")
        age = f"{now - at:.0f}s" if at is not None else "since start"
        why = src.get("error") or "reconnecting"
        out.append(f"kubernetes: NOT IN SYNC, last good state kept; stale {age}: {why}")
    out.append(f"kubelet cgroups: {d.get('cgroup_driver') or 'NOT FOUND'} under {d.get('cgroup_root')}")
    for r in d.get("resources") or ():
        out.append(
            f"{r['kind']}: {r['objects']} objects, rv {r['resource_version']}, "
            f"{'watching' if r['connected'] else 'down'}, lists {r['lists']}, errors {r['errors']}"
        )
    for n in d.get("notes") or ():
        out.append(f"note: {n}")
    if d.get("notes_total", 0) > len(d.get("notes") or ()):
        out.append(f"... {d['notes_total'] - len(d['notes'])} more notes")
    return out


COMMANDS = [run, uninstall, doctor, status, workloads]
