"""The meshlet CA on disk: one root, one intermediate per node.

Each node's agent holds only its own intermediate (``nodes/<node>/``) and
signs its workloads' SVIDs with it; every node trusts ``bundle.pem``. The
root key is needed only to add or reissue nodes and to rotate.

Directory layout (``out_dir``)::

    ca.json                  trust domain, current root, every root ever made (the source of truth)
    root-<serial>.pem        each root certificate (kept after retirement, for the record)
    root-<serial>-key.pem    its key, 0600 (deleted when the root is retired)
    root.pem, root-key.pem   copies of the current root and its key (0600)
    bundle.pem               the trust bundle: every root not yet retired
    nodes/<node>/ca.pem      the node's intermediate certificate, nothing else
    nodes/<node>/ca-key.pem  its key, 0600

Root rotation has an overlap: ``rotate_root`` makes a new current root and
adds it to the bundle next to the old ones; new and reissued node
intermediates come from the new root; once every node is reissued (and the
new bundle has reached every node), ``retire_root`` drops the old root from
the bundle.

Writes are atomic (temp file + rename); ``ca.json`` is written after the
root files it names and before the derived copies, and every change
rewrites the derived files, so an interrupted change is finished by the
next one. Changes take an exclusive lock on ``out_dir/.lock``.

Node intermediates carry a critical NameConstraints extension permitting
only URIs whose host is the trust domain, so a stolen node key cannot mint
identities of another trust domain. OpenSSL (Python's ``ssl``) and
``certs.verify_svid`` enforce it; cryptography's own ``x509.verification``
refuses URI name constraints as unsupported, so pass
``name_constraints=False`` to ``init_ca`` if something must verify with it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from .spiffe import SpiffeId
from .svid import (
    TrustBundle,
    authority_key_id,
    cert_fingerprint,
    cert_to_pem,
    generate_key,
    key_to_pem,
    key_usage,
    load_certs_pem,
    load_key_pem,
    node_ca_common_name,
    random_serial,
)

__all__ = [
    "CaError",
    "CaLayout",
    "NodePaths",
    "init_ca",
    "load_ca",
    "add_node",
    "reissue_node",
    "load_node_ca",
    "rotate_root",
    "retire_root",
    "issue_node_intermediate",
    "SigningRoot",
    "load_signing_root",
]

STATE_FILE = "ca.json"
STATE_VERSION = 1
ROOT_TTL = timedelta(days=3650)
NODE_TTL = timedelta(days=365)
BACKDATE = timedelta(minutes=1)
NODE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CA_KU = key_usage(key_cert_sign=True, crl_sign=True)


class CaError(Exception):
    """A CA operation refused; the message says why and what to do."""


@dataclass(frozen=True)
class NodePaths:
    node: str
    dir: str
    cert: str
    """``nodes/<node>/ca.pem``"""
    key: str
    """``nodes/<node>/ca-key.pem`` (0600)"""


@dataclass
class CaLayout:
    out_dir: str
    trust_domain: str
    root_cert: x509.Certificate
    """The current root: new node intermediates are signed by it."""
    root_key: object
    bundle: TrustBundle
    """Every root not yet retired (what bundle.pem holds)."""
    node_dirs: dict[str, str] = field(default_factory=dict)


# --- public operations -------------------------------------------------------


def init_ca(
    out_dir: str,
    trust_domain: str,
    nodes: list[str],
    *,
    root_ttl: timedelta = ROOT_TTL,
    node_ttl: timedelta = NODE_TTL,
    now: datetime | None = None,
    force: bool = False,
    name_constraints: bool = True,
) -> CaLayout:
    """Create a root and one intermediate per node in ``out_dir``.

    Refuses if ``out_dir`` already holds a CA, unless ``force`` (which
    removes that CA's files first; nothing else in the directory)."""
    SpiffeId(trust_domain, "")  # validates, SpiffeIdError (a ValueError) says why
    for node in nodes:
        _check_node_name(node)
    if len(set(nodes)) != len(nodes):
        raise CaError(f"node names repeat: {sorted(nodes)}")
    now = _now(now)
    os.makedirs(out_dir, mode=0o755, exist_ok=True)
    with _locked(out_dir):
        if _holds_ca(out_dir):
            if not force:
                raise CaError(
                    f"{out_dir} already holds a CA; use add_node/rotate_root to change it, or "
                    "force=True (meshlet ca init --force) to replace it and every node's intermediate"
                )
            _remove_ca_files(out_dir)
        root, root_key = _make_root(trust_domain, root_ttl, now)
        state = {
            "version": STATE_VERSION,
            "trust_domain": trust_domain,
            "name_constraints": name_constraints,
            "current_root": _serial(root),
            "roots": [],
        }
        _store_root(out_dir, state, root, root_key)
        _save_state(out_dir, state)
        _write_derived(out_dir, state)
        for node in nodes:
            _issue_node(out_dir, state, node, node_ttl, now)
        return load_ca(out_dir)


def load_ca(out_dir: str) -> CaLayout:
    """The CA in ``out_dir`` as written by init_ca (reads only)."""
    state = _load_state(out_dir)
    cur = _root_entry(state, state["current_root"])
    root = _read_cert(os.path.join(out_dir, cur["file"]))
    key_path = os.path.join(out_dir, cur["key_file"])
    with open(key_path, "rb") as f:
        root_key = load_key_pem(f.read())
    return CaLayout(
        out_dir=out_dir,
        trust_domain=state["trust_domain"],
        root_cert=root,
        root_key=root_key,
        bundle=_bundle(out_dir, state),
        node_dirs=_node_dirs(out_dir),
    )


def add_node(
    out_dir: str, node: str, *, node_ttl: timedelta = NODE_TTL, now: datetime | None = None
) -> NodePaths:
    """Issue an intermediate for a new node from the current root."""
    _check_node_name(node)
    with _locked(out_dir):
        state = _load_state(out_dir)
        if node in _node_dirs(out_dir):
            raise CaError(f"node {node!r} already has an intermediate; use reissue_node to replace it")
        return _issue_node(out_dir, state, node, node_ttl, _now(now))


def reissue_node(
    out_dir: str, node: str, *, node_ttl: timedelta = NODE_TTL, now: datetime | None = None
) -> NodePaths:
    """Replace a node's intermediate (new key) with one from the current root.
    SVIDs the old intermediate signed stay valid while its root is in the bundle."""
    _check_node_name(node)
    with _locked(out_dir):
        state = _load_state(out_dir)
        if node not in _node_dirs(out_dir):
            raise CaError(f"node {node!r} has no intermediate in {out_dir}; use add_node")
        return _issue_node(out_dir, state, node, node_ttl, _now(now))


def load_node_ca(out_dir: str, node: str) -> tuple[x509.Certificate, object]:
    """The node's intermediate certificate and key (the SVID issuer)."""
    p = _node_paths(out_dir, node)
    try:
        cert = _read_cert(p.cert)
        with open(p.key, "rb") as f:
            key = load_key_pem(f.read())
    except FileNotFoundError:
        raise CaError(f"node {node!r} has no intermediate in {out_dir}; run add_node for it") from None
    return cert, key


def rotate_root(out_dir: str, *, root_ttl: timedelta = ROOT_TTL, now: datetime | None = None) -> CaLayout:
    """Make a new current root; the bundle keeps the old roots (overlap)."""
    now = _now(now)
    with _locked(out_dir):
        state = _load_state(out_dir)
        root, root_key = _make_root(state["trust_domain"], root_ttl, now)
        _store_root(out_dir, state, root, root_key)
        state["current_root"] = _serial(root)
        _save_state(out_dir, state)
        _write_derived(out_dir, state)
    return load_ca(out_dir)


def retire_root(out_dir: str, fingerprint_or_serial: str, *, force: bool = False) -> None:
    """Drop an old root from bundle.pem (the end of a rotation's overlap) and
    delete its key. ``fingerprint_or_serial`` is the root's serial or its
    certificate's sha256 fingerprint, in hex (a fingerprint prefix of at
    least 8 digits will do). Refuses the current root, and a root that
    still signs a node's intermediate unless ``force``."""
    with _locked(out_dir):
        state = _load_state(out_dir)
        entry = _find_root(state, fingerprint_or_serial)
        if entry["serial"] == state["current_root"]:
            raise CaError(f"root {entry['serial']} is the current root; rotate_root first, then retire it")
        if not entry["in_bundle"]:
            raise CaError(f"root {entry['serial']} is already retired")
        root = _read_cert(os.path.join(out_dir, entry["file"]))
        still = sorted(
            n
            for n, d in _node_dirs(out_dir).items()
            if _issued_by(_read_cert(os.path.join(d, "ca.pem")), root)
        )
        if still and not force:
            raise CaError(
                f"root {entry['serial']} still signs the intermediate of node(s) {', '.join(still)}; "
                "reissue_node them first (their SVIDs would stop verifying), or force=True"
            )
        entry["in_bundle"] = False
        _save_state(out_dir, state)
        _write_derived(out_dir, state)
        if entry.get("key_file"):
            _remove(os.path.join(out_dir, entry["key_file"]))
            entry["key_file"] = None
            _save_state(out_dir, state)


@dataclass(frozen=True)
class SigningRoot:
    """What the CA controller signs node intermediates with: the current
    root, its key and the trust bundle (every root not yet retired)."""

    trust_domain: str
    cert: x509.Certificate
    key: object
    bundle: TrustBundle
    name_constraints: bool = True


def load_signing_root(root_dir: str, trust_domain: str) -> SigningRoot:
    """``root.pem``, ``root-key.pem`` and ``bundle.pem`` of ``root_dir``
    (``meshlet ca init``'s layout, or just those three files, as the CA
    controller's Secret holds them), cross-checked: the key is the root's,
    the root is a CA and in the bundle.  ``ca.json``, when there, says
    whether intermediates carry name constraints (default: they do)."""
    paths = {n: os.path.join(root_dir, n) for n in ("root.pem", "root-key.pem", "bundle.pem")}
    data = {}
    for name, path in paths.items():
        try:
            with open(path, "rb") as f:
                data[name] = f.read()
        except OSError as e:
            raise CaError(
                f"cannot read {path}: {e.strerror}; the root directory needs root.pem, root-key.pem "
                "and bundle.pem as 'meshlet ca init --out DIR' writes them"
            ) from e
    try:
        root = _one_cert(paths["root.pem"], data["root.pem"])
        key = load_key_pem(data["root-key.pem"])
    except ValueError as e:
        raise CaError(f"{root_dir}: {e}") from e
    if _public(key.public_key()) != _public(root.public_key()):
        raise CaError(f"{paths['root-key.pem']} is not the key of {paths['root.pem']}")
    try:
        bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaError(f"{paths['root.pem']} is not a CA certificate")
    try:
        bundle = TrustBundle.from_pem(trust_domain, data["bundle.pem"])
    except ValueError as e:
        raise CaError(f"{paths['bundle.pem']}: {e}") from e
    if root not in bundle.roots:
        raise CaError(
            f"{paths['bundle.pem']} does not hold the root of {paths['root.pem']}; nodes would not "
            "trust what it signs (copy bundle.pem from the same 'meshlet ca' directory)"
        )
    name_constraints = True
    try:
        with open(os.path.join(root_dir, STATE_FILE)) as f:
            state = json.load(f)
        if state.get("trust_domain") not in (None, trust_domain):
            raise CaError(
                f"{root_dir}/{STATE_FILE} is the CA of trust domain {state['trust_domain']!r}, "
                f"not {trust_domain!r}; pass --trust-domain {state['trust_domain']}"
            )
        name_constraints = bool(state.get("name_constraints", True))
    except (OSError, ValueError, AttributeError):
        pass  # a Secret holds only the three PEM files
    return SigningRoot(trust_domain, root, key, bundle, name_constraints)


def _one_cert(path: str, pem: bytes) -> x509.Certificate:
    certs = load_certs_pem(pem)
    if len(certs) != 1:
        raise ValueError(f"{path} holds {len(certs)} certificates; expected exactly one")
    return certs[0]


def _public(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- certificates ------------------------------------------------------------


def _make_root(trust_domain: str, ttl: timedelta, now: datetime):
    key = generate_key()
    serial = random_serial()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root {now:%Y-%m-%d}"),
            # two roots made the same day must not share a subject name
            x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x")),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_intermediate(
    trust_domain: str,
    node: str,
    root: x509.Certificate,
    root_key,
    ttl: timedelta,
    now: datetime,
    name_constraints: bool,
):
    key = generate_key()
    cert = issue_node_intermediate(
        trust_domain,
        node,
        key.public_key(),
        root,
        root_key,
        ttl=ttl,
        now=now,
        name_constraints=name_constraints,
    )
    return cert, key


def issue_node_intermediate(
    trust_domain: str,
    node: str,
    public_key,
    root: x509.Certificate,
    root_key,
    *,
    ttl: timedelta = NODE_TTL,
    now: datetime | None = None,
    name_constraints: bool = True,
) -> x509.Certificate:
    """``node``'s intermediate for ``public_key``, signed by ``root``: the one
    profile of a node CA, whether the file CA (``add_node``) or the CA
    controller (a node's CSR, :mod:`agent.identity.controller`) issues it.
    Nothing else is taken from a request: subject, constraints and usages
    are fixed here; the lifetime ends with the root's at the latest."""
    _check_node_name(node)
    now = _now(now)
    serial = random_serial()
    not_after = min(now + ttl, root.not_valid_after_utc)
    if not_after <= now:
        raise CaError(
            f"the current root expired at {root.not_valid_after_utc.isoformat()}; rotate_root first"
        )
    b = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
                    x509.NameAttribute(NameOID.COMMON_NAME, node_ca_common_name(trust_domain, node)),
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x")),
                ]
            )
        )
        .issuer_name(root.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(max(now - BACKDATE, root.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KU, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id(root), critical=False)
    )
    if name_constraints:
        # RFC 5280 4.2.1.10: a URI constraint without a leading '.' is the
        # exact host, i.e. the trust domain (subdomains are other domains)
        b = b.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
            ),
            critical=True,
        )
    return b.sign(root_key, hashes.SHA256())


def _issue_node(out_dir: str, state: dict, node: str, ttl: timedelta, now: datetime) -> NodePaths:
    cur = _root_entry(state, state["current_root"])
    root = _read_cert(os.path.join(out_dir, cur["file"]))
    with open(os.path.join(out_dir, cur["key_file"]), "rb") as f:
        root_key = load_key_pem(f.read())
    cert, key = _make_intermediate(
        state["trust_domain"], node, root, root_key, ttl, now, state.get("name_constraints", True)
    )
    p = _node_paths(out_dir, node)
    os.makedirs(p.dir, mode=0o700, exist_ok=True)
    # key first: a ca.pem never names a key that is not there yet
    _write(p.key, key_to_pem(key), 0o600)
    _write(p.cert, cert_to_pem(cert), 0o644)
    return p


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not this issuer"
        return False


# --- state -------------------------------------------------------------------


def _store_root(out_dir: str, state: dict, root: x509.Certificate, root_key) -> None:
    serial = _serial(root)
    cert_file, key_file = f"root-{serial}.pem", f"root-{serial}-key.pem"
    entry = {
        "serial": serial,
        "fingerprint": cert_fingerprint(root),
        "file": cert_file,
        "key_file": key_file,
        "in_bundle": True,
        "not_after": root.not_valid_after_utc.isoformat(),
    }
    _write(os.path.join(out_dir, key_file), key_to_pem(root_key), 0o600)
    _write(os.path.join(out_dir, cert_file), cert_to_pem(root), 0o644)
    state["roots"].append(entry)


def _write_derived(out_dir: str, state: dict) -> None:
    cur = _root_entry(state, state["current_root"])
    for src, dst, mode in ((cur["key_file"], "root-key.pem", 0o600), (cur["file"], "root.pem", 0o644)):
        with open(os.path.join(out_dir, src), "rb") as f:
            _write(os.path.join(out_dir, dst), f.read(), mode)
    _write(os.path.join(out_dir, "bundle.pem"), _bundle(out_dir, state).to_pem(), 0o644)


def _bundle(out_dir: str, state: dict) -> TrustBundle:
    roots = [_read_cert(os.path.join(out_dir, e["file"])) for e in state["roots"] if e["in_bundle"]]
    return TrustBundle(state["trust_domain"], tuple(roots))


def _load_state(out_dir: str) -> dict:
    path = os.path.join(out_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CaError(
            f"{out_dir} holds no meshlet CA ({STATE_FILE} is missing); run init_ca (meshlet ca init) first"
        ) from None
    except json.JSONDecodeError as e:
        raise CaError(f"{path} is corrupt ({e})") from None
    if state.get("version") != STATE_VERSION:
        raise CaError(
            f"{path} has version {state.get('version')!r}; this meshlet reads version {STATE_VERSION}"
        )
    return state


def _save_state(out_dir: str, state: dict) -> None:
    _write(os.path.join(out_dir, STATE_FILE), (json.dumps(state, indent=2) + "\n").encode(), 0o644)


def _root_entry(state: dict, serial: str) -> dict:
    for e in state["roots"]:
        if e["serial"] == serial:
            return e
    raise CaError(f"{STATE_FILE} names root {serial} but does not list it; the CA state is corrupt")


def _find_root(state: dict, ident: str) -> dict:
    want = ident.strip().lower().replace(":", "")
    want = want[2:] if want.startswith("0x") else want
    if not want or not re.fullmatch(r"[0-9a-f]+", want):
        raise CaError(f"{ident!r} is neither a root serial nor a sha256 fingerprint (hex)")
    exact = [e for e in state["roots"] if want.lstrip("0") == e["serial"] or want == e["fingerprint"]]
    if exact:
        return exact[0]
    prefixed = [e for e in state["roots"] if len(want) >= 8 and e["fingerprint"].startswith(want)]
    if len(prefixed) == 1:
        return prefixed[0]
    known = ", ".join(f"{e['serial']} (sha256 {e['fingerprint'][:16]}...)" for e in state["roots"])
    if prefixed:
        raise CaError(f"{ident!r} matches several roots; give more digits. Roots: {known}")
    raise CaError(f"no root matches {ident!r}. Roots: {known}")


def _node_dirs(out_dir: str) -> dict[str, str]:
    base = os.path.join(out_dir, "nodes")
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return {}
    return {n: os.path.join(base, n) for n in names if os.path.isfile(os.path.join(base, n, "ca.pem"))}


def _node_paths(out_dir: str, node: str) -> NodePaths:
    _check_node_name(node)
    d = os.path.join(out_dir, "nodes", node)
    return NodePaths(node=node, dir=d, cert=os.path.join(d, "ca.pem"), key=os.path.join(d, "ca-key.pem"))


def _holds_ca(out_dir: str) -> bool:
    return any(
        os.path.exists(os.path.join(out_dir, n)) for n in (STATE_FILE, "root.pem", "root-key.pem")
    ) or bool(_node_dirs(out_dir))


def _remove_ca_files(out_dir: str) -> None:
    for name in os.listdir(out_dir):
        if name in (STATE_FILE, "bundle.pem") or re.fullmatch(r"root(-[0-9a-f]+)?(-key)?\.pem", name):
            _remove(os.path.join(out_dir, name))
    for d in _node_dirs(out_dir).values():
        for name in ("ca.pem", "ca-key.pem"):
            _remove(os.path.join(d, name))
        try:
            os.rmdir(d)
        except OSError:
            pass  # something else lives there; leave it


# --- files ---------------------------------------------------------------------


def _write(path: str, data: bytes, mode: int) -> None:
    """Atomically replace ``path`` with ``data``, created with ``mode``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # regardless of umask, and of a stale tmp file's mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        certs = load_certs_pem(f.read())
    if len(certs) != 1:
        raise CaError(f"{path} holds {len(certs)} certificates; expected exactly one")
    return certs[0]


@contextmanager
def _locked(out_dir: str):
    if not os.path.isdir(out_dir):
        raise CaError(f"{out_dir} is not a directory; run init_ca (meshlet ca init) first")
    fd = os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_node_name(node: str) -> None:
    if not isinstance(node, str) or not NODE_NAME.match(node):
        raise CaError(
            f"node name {node!r} is not allowed; use letters, digits, '.', '-', '_' "
            "(starting and ending with a letter or digit)"
        )


def _serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return now
