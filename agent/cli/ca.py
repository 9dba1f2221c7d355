"""The mesh's certificates: ``meshlet ca`` makes and rotates the CA files
offline; ``meshlet certs`` asks the running agent what its proxy holds."""

from __future__ import annotations

import click

from .common import OUTPUT, admin_get, admin_socket, agent_opts, die, echo_json


@click.group()
def ca() -> None:
    """Create and rotate the mesh's CA: a root and one intermediate per node.

    \b
    Rotation with overlap, node by node, no connection errors:
      meshlet ca rotate-root --dir D      new root; bundle.pem = old + new roots
      (distribute bundle.pem to every node; agents pick it up live)
      meshlet ca reissue-node --dir D N   node N's intermediate from the new root
      meshlet ca retire-root --dir D OLD  once every node is reissued
    """


def _ca_call(fn, *args, **kw):
    """``fn(*args, **kw)``; exit 1 with its message when the CA files say no."""
    from ..identity.ca import CaError

    try:
        return fn(*args, **kw)
    except (CaError, OSError, ValueError) as e:
        die(str(e))


@ca.command("init")
@click.option(
    "--trust-domain", default="cluster.local", show_default=True, help="SPIFFE trust domain (lowercase)."
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to create (root.pem, bundle.pem, nodes/<node>/ca.pem ...).",
)
@click.option(
    "--node", "nodes", multiple=True, help="Issue an intermediate for this node (repeat for each node)."
)
@click.option("--force", is_flag=True, help="Overwrite an existing CA directory.")
def ca_init(trust_domain, out_dir, nodes, force) -> None:
    """Create a root CA (ECDSA P-256) and per-node intermediates."""
    from ..identity.ca import init_ca

    layout = _ca_call(init_ca, out_dir, trust_domain, list(nodes), force=force)
    click.echo(f"root CA and trust bundle for {trust_domain} in {layout.out_dir}")
    for n, d in sorted(layout.node_dirs.items()):
        click.echo(f"  node {n}: {d}/ca.pem, {d}/ca-key.pem")


@ca.command("add-node")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("node")
def ca_add_node(out_dir, node) -> None:
    """Issue an intermediate for one more node from the current root."""
    from ..identity.ca import add_node

    p = _ca_call(add_node, out_dir, node)
    click.echo(f"issued node {p.node}: {p.cert}, {p.key}")


@ca.command("reissue-node")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("node")
def ca_reissue_node(out_dir, node) -> None:
    """New intermediate for NODE from the current root (after rotate-root)."""
    from ..identity.ca import reissue_node

    p = _ca_call(reissue_node, out_dir, node)
    click.echo(f"reissued node {p.node} from the current root: {p.cert}, {p.key}")


@ca.command("rotate-root")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
def ca_rotate_root(out_dir) -> None:
    """Create a new root; the bundle then trusts both old and new roots."""
    from ..identity.ca import rotate_root

    layout = _ca_call(rotate_root, out_dir)
    click.echo(
        f"new root in {layout.out_dir}; bundle.pem now holds "
        f"{len(layout.bundle.roots)} roots. Next: copy bundle.pem to every node, then "
        "reissue-node each node, then retire-root the old one."
    )


@ca.command("retire-root")
@click.option("--dir", "out_dir", required=True, type=click.Path(file_okay=False))
@click.argument("root")
def ca_retire_root(out_dir, root) -> None:
    """Drop an old root (serial or fingerprint) from bundle.pem."""
    from ..identity.ca import retire_root

    _ca_call(retire_root, out_dir, root)
    click.echo(f"retired {root} from {out_dir}/bundle.pem")


@click.command()
@agent_opts
@OUTPUT
def certs(sock, node, output) -> None:
    """Workload certificates the node proxy holds: SPIFFE ID, serial, expiry
    and next rotation, plus the trust bundle and this node's CA."""
    st = admin_get("/v1/status", admin_socket(sock, node))
    ident = st.get("identity", {})
    workers = [{"worker": w["worker"], **((w.get("stats") or {}).get("certs") or {})} for w in st["proxy"]]
    if output == "json":
        echo_json({"node": st["node"], "identity": ident, "proxy": workers})
        return
    click.echo(
        f"trust domain {ident.get('trust_domain')}  bundle "
        f"{(ident.get('bundle_fingerprint') or '')[:16]}  "
        f"({len(ident.get('roots', []))} roots)  identity generation "
        f"{ident.get('generation')}"
    )
    ca = ident.get("node_ca") or {}
    click.echo(f"node CA {ca.get('subject')} serial {ca.get('serial')} expires {ca.get('not_after')}")
    if ident.get("error"):
        click.echo(f"  LAST RELOAD FAILED (previous CA material kept): {ident['error']}")
    click.echo(f"\n{'WORKER':<7}{'SPIFFE ID':<52}{'SERIAL':<18}{'EXPIRES':<27}NEXT ROTATION")
    for w in workers:
        for c in w.get("identities", []):
            click.echo(
                f"{w['worker']:<7}{c.get('spiffe_id', ''):<52}"
                f"{str(c.get('serial', ''))[:16]:<18}{c.get('not_after', ''):<27}"
                f"{c.get('next_rotation', '')}"
            )


COMMANDS = [ca, certs]
