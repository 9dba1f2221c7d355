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

    \b
    On Kubernetes the nodes ask for their intermediates themselves, and
    'meshlet ca controller' (deploy/ca-controller.yaml) approves and signs.
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


@ca.command("controller")
@click.option(
    "--root",
    "root_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory with root.pem, root-key.pem and bundle.pem ('meshlet ca init --out' layout).",
)
@click.option("--trust-domain", default="cluster.local", show_default=True, help="SPIFFE trust domain.")
@click.option(
    "--signer", default="meshlet.io/node-intermediate", show_default=True, help="The CSR signerName served."
)
@click.option(
    "--node-user",
    default="system:serviceaccount:meshlet-system:meshlet-node",
    show_default=True,
    help="The only requester approved: the node agent's service account.",
)
@click.option(
    "--ttl",
    "ttl_hours",
    type=click.IntRange(1, 24 * 365),
    default=24 * 30,
    show_default=True,
    help="Lifetime of an intermediate, in hours (a CSR's expirationSeconds may shorten it).",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    default=None,
    help="Talk to the API with this kubeconfig (default: the pod's service account).",
)
@click.option("--context", default=None, help="kubeconfig context (default: its current-context).")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=15021,
    show_default=True,
    help="Serve /healthz, /readyz, /metrics and /status here (0: do not).",
)
@click.option("--metrics-address", default="0.0.0.0", show_default=True)
@click.option(
    "--leader-elect/--no-leader-elect",
    default=True,
    show_default=True,
    help="Run as one of several replicas: only the holder of a coordination.k8s.io Lease signs.",
)
@click.option("--lease-name", default="meshlet-ca", show_default=True, help="The Lease's name.")
@click.option(
    "--lease-namespace",
    default=None,
    help="The Lease's namespace (default: $POD_NAMESPACE, else the service account's, else meshlet-system).",
)
@click.option(
    "--lease-duration",
    type=click.IntRange(2, 3600),
    default=15,
    show_default=True,
    help="Seconds a replica waits, after it last saw the Lease renewed, before it takes over.",
)
@click.option(
    "--renew-deadline",
    type=click.FloatRange(0.5, 3600),
    default=10.0,
    show_default=True,
    help="Seconds after its last successful renewal that a leader stops signing (< --lease-duration).",
)
@click.option(
    "--retry-period",
    type=click.FloatRange(0.1, 600),
    default=2.0,
    show_default=True,
    help="Seconds between tries to acquire or renew the Lease (< --renew-deadline).",
)
@click.option(
    "--reissue-limit",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="At most this many intermediates per node within --reissue-window; more are Denied RateLimited.",
)
@click.option(
    "--reissue-window",
    "reissue_minutes",
    type=click.IntRange(1, 7 * 24 * 60),
    default=60,
    show_default=True,
    help="The re-issue limit's window, in minutes.",
)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def ca_controller(
    root_dir,
    trust_domain,
    signer,
    node_user,
    ttl_hours,
    kubeconfig,
    context,
    metrics_port,
    metrics_address,
    leader_elect,
    lease_name,
    lease_namespace,
    lease_duration,
    renew_deadline,
    retry_period,
    reissue_limit,
    reissue_minutes,
    log_level,
) -> None:
    """Approve and sign node intermediates requested by Kubernetes CSRs.

    \b
    Each node agent creates a certificates.k8s.io/v1 CSR of signer SIGNER
    for its own intermediate (key made and kept on the node). This
    controller, the only holder of the root key, approves one only when:
      - the requester is NODE_USER (the node agent's service account),
      - the node bound into its token (spec.extra
        ["authentication.kubernetes.io/node-name"]) is the node asked for,
      - the PKCS#10 asks for exactly that node's CA: subject
        "O=meshlet, CN=<td> node <node>", the one URI SAN
        spiffe://<td>/node/<node>, CA=true pathlen=0, keyCertSign+cRLSign,
        an ECDSA P-256/P-384 or RSA 2048+ key, nothing else,
      - and the node exists.
    Then it signs (status.certificate: the intermediate, then bundle.pem's
    roots). Otherwise the CSR is Denied with the rule it broke, e.g.
      kubectl get csr    ->  meshlet-node-a-x1y2z  ...  Denied
      kubectl get csr meshlet-node-a-x1y2z -o jsonpath='{.status.conditions}'
    CSRs of other signers are never touched. A restart re-sees every CSR and
    acts only on undecided ones (never signs twice). While the API is away
    it waits and retries; nothing is lost.

    \b
    Re-issue limit: at most --reissue-limit intermediates per node within
    --reissue-window (a node asking in a loop does not make it sign in a
    loop); a CSR over the limit is Denied with reason RateLimited, whose
    message names the limit and when the next one can be signed.

    \b
    Replicas (deploy/ca-controller.yaml runs 2): with --leader-elect only the
    holder of the Lease --lease-namespace/--lease-name lists, watches and
    signs; the others wait and take over --lease-duration seconds after the
    leader stopped renewing. A leader that cannot renew stops signing
    --renew-deadline seconds after its last renewal, before anyone may take
    over. See who leads: kubectl -n meshlet-system get lease meshlet-ca

    \b
    Run it (deploy/ca-controller.yaml does, with the root from a Secret):
      meshlet ca init --out ca/              # root.pem, root-key.pem, bundle.pem
      meshlet ca controller --root ca/ --kubeconfig ~/.kube/config
    """
    import logging
    import signal
    import threading
    from datetime import timedelta

    from ..identity.ca import CaError, load_signing_root
    from ..identity.controller import CaController, HealthServer
    from ..identity.csrpolicy import Policy, ReissueLimit
    from ..identity.leader import LeaderElector
    from ..identity.leaderlease import LeaseConfig
    from ..workloads.kubeclient import KubeClient, KubeConfigError

    try:
        root = load_signing_root(root_dir, trust_domain)
    except (CaError, ValueError) as e:
        die(str(e))
    lease = None
    if leader_elect:  # checked before anything talks to the API
        try:
            lease = LeaseConfig(
                identity=_holder_identity(),
                name=lease_name,
                namespace=lease_namespace or _pod_namespace(),
                lease_duration=float(lease_duration),
                renew_deadline=renew_deadline,
                retry_period=retry_period,
            )
        except ValueError as e:
            die(str(e))
    try:
        client = KubeClient.from_kubeconfig(kubeconfig, context) if kubeconfig else KubeClient.in_cluster()
    except KubeConfigError as e:
        die(f"cannot reach the Kubernetes API: {e}")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = Policy(trust_domain, signer=signer, node_user=node_user, max_ttl=timedelta(hours=ttl_hours))
    elector = LeaderElector(client, lease) if lease is not None else None
    ctl = CaController(
        client,
        root,
        policy,
        elector=elector,
        reissue=ReissueLimit(reissue_limit, timedelta(minutes=reissue_minutes)),
    )
    loop = threading.Thread(target=ctl.run, name="ca-controller", daemon=True)
    health = None
    if metrics_port:
        try:
            health = HealthServer(ctl, loop, metrics_address, metrics_port).start()
        except OSError as e:
            die(f"cannot serve /healthz on {metrics_address}:{metrics_port}: {e.strerror or e}")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    logging.getLogger("meshlet.ca").info(
        "signing %s for %s (trust domain %s, root serial %x) against %s",
        signer,
        node_user,
        trust_domain,
        root.cert.serial_number,
        client.server,
    )
    if elector is not None and lease is not None:
        logging.getLogger("meshlet.ca").info(
            "leader election on lease %s/%s as %s", lease.namespace, lease.name, lease.identity
        )
        elector.start()
    loop.start()
    while not done.wait(1.0):
        if not loop.is_alive():
            die("the controller loop stopped")
    ctl.stop()
    loop.join(5)
    if elector is not None:
        elector.stop()  # after the loop: it writes nothing more; then the lease is released
    if health is not None:
        health.stop()


def _holder_identity() -> str:
    """This process's name in the Lease: the pod's (or host's) name and a
    random suffix, so a restarted container waits out its predecessor's lease."""
    import os
    import socket
    import uuid

    base = os.environ.get("POD_NAME") or socket.gethostname() or "meshlet-ca"
    return f"{base[:100]}_{uuid.uuid4().hex[:10]}"


def _pod_namespace() -> str:
    import os

    ns = os.environ.get("POD_NAMESPACE")
    if ns:
        return ns
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "meshlet-system"
    except OSError:
        return "meshlet-system"


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
    ca = ident.get("node_ca")
    csr = ident.get("node_ca_csr")
    if ca:
        click.echo(f"node CA {ca.get('subject')} serial {ca.get('serial')} expires {ca.get('not_after')}")
    if csr:
        click.echo(f"node CA by CSR ({csr.get('signer')}): {csr.get('state')}: {csr.get('message')}")
    if ident.get("error"):
        what = "LAST RELOAD FAILED (previous CA material kept)" if ca else "NO NODE CA, NOTHING IS SIGNED"
        click.echo(f"  {what}: {ident['error']}")
    click.echo(f"\n{'WORKER':<7}{'SPIFFE ID':<52}{'SERIAL':<18}{'EXPIRES':<27}NEXT ROTATION")
    for w in workers:
        for c in w.get("identities", []):
            click.echo(
                f"{w['worker']:<7}{c.get('spiffe_id', ''):<52}"
                f"{str(c.get('serial', ''))[:16]:<18}{c.get('not_after', ''):<27}"
                f"{c.get('next_rotation', '')}"
            )


COMMANDS = [ca, certs]
