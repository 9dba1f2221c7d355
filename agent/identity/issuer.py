"""The node's certificate issuer: signs workload SVIDs for the proxy.

The agent holds this node's intermediate CA (``identity.caCert``/``caKey``)
and answers certificate signing requests from its proxy workers over a Unix
socket.  Keys are generated in the proxy and never leave it; the agent only
sees CSRs.  The rule that makes a stolen node less valuable: a node signs
only identities of service accounts whose pods run **on this node** (from
the inventory).  Any other request is refused, logged and counted.

Pure except for reading the PEM files; the socket server lives in app.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .spiffe import SpiffeIdError, parse_spiffe_id
from .svid import SvidError, TrustBundle, cert_to_pem, load_certs_pem, sign_workload_csr

log = logging.getLogger("meshlet.identity")


class IssueError(Exception):
    """A refused signing request; ``reason`` is a stable code for counters."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class IdentityFilesError(RuntimeError):
    """The configured CA files are missing or unusable; the message says which."""


@dataclass
class CaMaterial:
    bundle: TrustBundle
    ca_chain: list[x509.Certificate]  # node intermediate (and anything above it but the root)
    ca_key: object

    @property
    def ca_cert(self) -> x509.Certificate:
        return self.ca_chain[0]


def load_material(trust_domain: str, bundle_path: str, cert_path: str, key_path: str) -> CaMaterial:
    """Read and cross-check the node's CA files."""

    def read(path: str, what: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise IdentityFilesError(
                f"cannot read {what} {path}: {e.strerror}; create CA material "
                "with 'meshlet ca init' and point identity.* at it"
            ) from e

    try:
        bundle = TrustBundle.from_pem(trust_domain, read(bundle_path, "trust bundle"))
    except (ValueError, SvidError) as e:
        raise IdentityFilesError(f"{bundle_path}: not a PEM trust bundle: {e}") from e
    if not bundle.roots:
        raise IdentityFilesError(f"{bundle_path}: the trust bundle holds no certificate")
    try:
        chain = load_certs_pem(read(cert_path, "node CA certificate"))
    except ValueError as e:
        raise IdentityFilesError(f"{cert_path}: not a PEM certificate: {e}") from e
    if not chain:
        raise IdentityFilesError(f"{cert_path}: no certificate in the file")
    try:
        key = serialization.load_pem_private_key(read(key_path, "node CA key"), password=None)
    except (ValueError, TypeError) as e:
        raise IdentityFilesError(f"{key_path}: not an unencrypted PEM private key: {e}") from e
    pub = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if (
        key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        != pub
    ):
        raise IdentityFilesError(f"{key_path} is not the key of {cert_path}")
    try:
        bc = chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IdentityFilesError(f"{cert_path} is not a CA certificate (BasicConstraints CA=false)")
    return CaMaterial(bundle=bundle, ca_chain=chain, ca_key=key)


@dataclass
class NodeIssuer:
    """Signs SVIDs for the identities currently allowed on this node."""

    trust_domain: str
    material: CaMaterial
    ttl: timedelta
    node: str
    allowed: frozenset[str] = frozenset()  # SPIFFE IDs of enrolled pods on this node
    counters: dict[str, int] = field(default_factory=dict)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def sign(self, identity: str, csr_pem: bytes) -> tuple[bytes, x509.Certificate]:
        """Return (chain PEM: leaf then node CA chain, leaf) or raise IssueError."""
        try:
            sid = parse_spiffe_id(identity)
        except SpiffeIdError as e:
            self._refuse("bad_spiffe_id", f"{identity!r}: {e}")
        if sid.trust_domain != self.trust_domain:
            self._refuse("wrong_trust_domain", f"{identity} is not in trust domain {self.trust_domain}")
        if str(sid) not in self.allowed:
            self._refuse(
                "not_on_node",
                f"no enrolled pod on node {self.node} runs as {identity}; a node signs "
                "only identities of its own pods",
            )
        try:
            leaf = sign_workload_csr(
                csr_pem,
                expected=sid,
                issuer_cert=self.material.ca_cert,
                issuer_key=self.material.ca_key,
                ttl=self.ttl,
            )
        except SvidError as e:
            self._refuse(e.reason, str(e))
        except ValueError as e:
            self._refuse("bad_csr", str(e))
        self._count("issued")
        log.info(
            "issued %s (serial %x, expires %s)", sid, leaf.serial_number, leaf.not_valid_after_utc.isoformat()
        )
        chain = cert_to_pem(leaf) + b"".join(cert_to_pem(c) for c in self.material.ca_chain)
        return chain, leaf

    def _refuse(self, reason: str, detail: str):
        self._count(f"refused_{reason}")
        log.warning("refused certificate request: %s: %s", reason, detail)
        raise IssueError(reason, detail)
