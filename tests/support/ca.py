"""Throwaway CA hierarchies in memory, for tests: good SVIDs and bad ones;
a fake agent CA on a Unix socket; Svid records for the proxy's CertSource.

    f = CertFactory("example.org")
    chain, key = f.leaf("spiffe://example.org/ns/default/sa/web")
    verify_svid(chain, f.bundle)                      # ok
    chain, key = f.bad("expired")                     # one flaw each
    CertFactory.BAD["expired"]                        # -> "expired", the reason verify_svid reports

``leaf()`` builds certificates directly (not through sign_workload_csr), so
any field can be bent: validity, URI/DNS SANs, CA flag, key usage, issuer.
Malformed URIs go in as-is: cryptography's UniformResourceIdentifier takes
any ASCII string without checking it (non-ASCII it refuses).
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.svid import (
    SvidError, TrustBundle, authority_key_id, cert_to_pem, generate_key, key_to_pem, key_usage,
    node_ca_common_name, random_serial, sign_workload_csr,
)
from agent.identity.spiffe import SpiffeId, parse_spiffe_id
from agent.proxy.workload_certs import Svid

DEFAULT_TD = "example.org"
LEAF_KU = key_usage(digital_signature=True)
CA_KU = key_usage(key_cert_sign=True, crl_sign=True)


@dataclass(frozen=True)
class Issuer:
    """A CA that can sign: its certificate, key, and the certificates above
    it a peer would send along (excluding the root)."""

    cert: x509.Certificate
    key: object
    chain: tuple[x509.Certificate, ...] = ()


class CertFactory:
    """A root → intermediate hierarchy for one trust domain, built in memory."""

    # bad(name) variants and the reason code verify_svid must give for each
    BAD = {
        "expired": "expired",
        "not_yet_valid": "not_yet_valid",
        "wrong_trust_domain": "wrong_trust_domain",
        "unknown_ca": "unknown_ca",
        "two_uri_sans": "multiple_uri_sans",
        "dns_san_only": "no_uri_san",
        "no_san": "no_uri_san",
        "spiffe_id_in_dns_san": "spiffe_id_in_dns_san",
        "leaf_is_ca": "leaf_is_ca",
        "no_digital_signature": "bad_key_usage",
        "key_cert_sign": "bad_key_usage",
        "dotdot_segment": "bad_spiffe_id",
        "uppercase_trust_domain": "bad_spiffe_id",
        "port": "bad_spiffe_id",
        "overlong": "bad_spiffe_id",
        "not_spiffe_uri": "bad_spiffe_id",
        "expired_intermediate": "expired",
        "intermediate_not_ca": "bad_chain",
        "pathlen_exceeded": "bad_chain",
    }

    def __init__(self, trust_domain: str = DEFAULT_TD, *, now: datetime | None = None,
                 name: str = "test", name_constraints: bool = True) -> None:
        self.trust_domain = trust_domain
        self.now = now or datetime.now(timezone.utc)
        self.name = name
        self.name_constraints = name_constraints
        self.root_key = generate_key()
        self.root = self.ca_cert(f"{name} root", self.root_key, issuer=None, path_length=1)
        self.intermediate_key = generate_key()
        self.intermediate = self.ca_cert(
            f"{name} intermediate", self.intermediate_key, issuer=Issuer(self.root, self.root_key),
            path_length=0, permitted_uri=[trust_domain] if name_constraints else None)
        self.bundle = TrustBundle(trust_domain, (self.root,))

    # --- building blocks -----------------------------------------------------

    @property
    def issuer(self) -> Issuer:
        """The default leaf issuer: the intermediate (sent along in chains)."""
        return Issuer(self.intermediate, self.intermediate_key, (self.intermediate,))

    @property
    def root_issuer(self) -> Issuer:
        return Issuer(self.root, self.root_key, ())

    def node_issuer(self, node: str) -> Issuer:
        """``node``'s intermediate, named as ``meshlet ca`` names it (so key
        scope can tell which node issued a leaf); one per node, made once."""
        cache = self.__dict__.setdefault("_node_issuers", {})
        if node not in cache:
            k = generate_key()
            cert = self.ca_cert(node_ca_common_name(self.trust_domain, node), k, issuer=self.root_issuer,
                                permitted_uri=[self.trust_domain] if self.name_constraints else None)
            cache[node] = Issuer(cert, k, (cert,))
        return cache[node]

    def ca_cert(self, cn: str, key, *, issuer: Issuer | None, path_length: int | None = 0,
                not_before: datetime | None = None, not_after: datetime | None = None, ca: bool = True,
                ku: x509.KeyUsage | None = CA_KU, permitted_uri: list[str] | None = None) -> x509.Certificate:
        """A CA certificate; self-signed when ``issuer`` is None."""
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet-test"),
                             x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder()
             .subject_name(subject)
             .issuer_name(issuer.cert.subject if issuer else subject)
             .public_key(key.public_key())
             .serial_number(random_serial())
             .not_valid_before(not_before or self.now - timedelta(hours=1))
             .not_valid_after(not_after or self.now + timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if ku is not None:
            b = b.add_extension(ku, critical=True)
        if issuer is not None:
            b = b.add_extension(authority_key_id(issuer.cert), critical=False)
        if permitted_uri:
            b = b.add_extension(x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(u) for u in permitted_uri],
                excluded_subtrees=None), critical=True)
        return b.sign(issuer.key if issuer else key, hashes.SHA256())

    def leaf(self, spiffe_id: str | SpiffeId | None = None, *, not_before: datetime | None = None,
             not_after: datetime | None = None, uris: list[str] | None = None, dns: list[str] = (),
             ca: bool = False, key_usage: x509.KeyUsage | None = LEAF_KU, issuer: Issuer | None = None,
             key=None) -> tuple[list[x509.Certificate], object]:
        """(chain, key): a leaf for ``spiffe_id`` (default ``/ns/default/sa/test``)
        and the intermediates a peer sends with it. ``uris`` replaces the URI
        SANs entirely (``[]`` for none); ``key_usage=None`` leaves it out."""
        key = key or generate_key()
        issuer = issuer or self.issuer
        if uris is None:
            uris = [str(spiffe_id or self.spiffe_id())]
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet-test")]))
             .issuer_name(issuer.cert.subject)
             .public_key(key.public_key())
             .serial_number(random_serial())
             .not_valid_before(not_before or self.now - timedelta(minutes=5))
             .not_valid_after(not_after or self.now + timedelta(hours=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(authority_key_id(issuer.cert), critical=False))
        names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if key_usage is not None:
            b = b.add_extension(key_usage, critical=True)
        cert = b.sign(issuer.key, hashes.SHA256())
        return [cert, *issuer.chain], key

    def spiffe_id(self, ns: str = "default", sa: str = "test") -> SpiffeId:
        return SpiffeId(self.trust_domain, f"/ns/{ns}/sa/{sa}")

    def foreign(self, trust_domain: str | None = None, **kw) -> CertFactory:
        """An unrelated CA (same trust domain and names unless told), whose
        leaves this factory's bundle must not trust."""
        kw.setdefault("name", self.name)
        kw.setdefault("now", self.now)
        return CertFactory(trust_domain or self.trust_domain, **kw)

    # --- the bad variants ----------------------------------------------------

    def bad(self, variant: str) -> tuple[list[x509.Certificate], object]:
        """(chain, key) with exactly one flaw; ``BAD[variant]`` is its reason code."""
        td, now, sid = self.trust_domain, self.now, str(self.spiffe_id())
        if variant == "expired":
            return self.leaf(not_before=now - timedelta(hours=2), not_after=now - timedelta(seconds=1))
        if variant == "not_yet_valid":
            return self.leaf(not_before=now + timedelta(minutes=10), not_after=now + timedelta(hours=1))
        if variant == "wrong_trust_domain":
            # signed by the root directly: the intermediate's name constraints
            # would (rightly) refuse to vouch for another trust domain
            return self.leaf(f"spiffe://other-{td}/ns/default/sa/test", issuer=self.root_issuer)
        if variant == "unknown_ca":
            return self.foreign().leaf(sid)
        if variant == "two_uri_sans":
            return self.leaf(uris=[sid, f"spiffe://{td}/ns/default/sa/other"])
        if variant == "dns_san_only":
            return self.leaf(uris=[], dns=["web.default.svc"])
        if variant == "no_san":
            return self.leaf(uris=[])
        if variant == "spiffe_id_in_dns_san":
            return self.leaf(uris=[], dns=[sid])
        if variant == "leaf_is_ca":
            return self.leaf(ca=True)
        if variant == "no_digital_signature":
            return self.leaf(key_usage=key_usage(key_encipherment=True))
        if variant == "key_cert_sign":
            return self.leaf(key_usage=key_usage(digital_signature=True, key_cert_sign=True))
        if variant == "dotdot_segment":
            return self.leaf(uris=[f"spiffe://{td}/ns/../sa/test"])
        if variant == "uppercase_trust_domain":
            return self.leaf(uris=[f"spiffe://{td.upper()}/ns/default/sa/test"], issuer=self.root_issuer)
        if variant == "port":
            return self.leaf(uris=[f"spiffe://{td}:8443/ns/default/sa/test"], issuer=self.root_issuer)
        if variant == "overlong":
            base = f"spiffe://{td}/ns/default/sa/"
            return self.leaf(uris=[base + "x" * (2049 - len(base))])
        if variant == "not_spiffe_uri":
            return self.leaf(uris=["https://example.org/web"], issuer=self.root_issuer)
        if variant == "expired_intermediate":
            k = generate_key()
            inter = self.ca_cert("expired intermediate", k, issuer=self.root_issuer,
                                 not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
            return self.leaf(issuer=Issuer(inter, k, (inter,)), not_before=now - timedelta(days=2))
        if variant == "intermediate_not_ca":
            k = generate_key()
            inter = self.ca_cert("not a CA", k, issuer=self.root_issuer, ca=False,
                                 ku=key_usage(digital_signature=True, key_cert_sign=True))
            return self.leaf(issuer=Issuer(inter, k, (inter,)))
        if variant == "pathlen_exceeded":
            # the intermediate has pathlen=0, so it may not sign another CA
            k = generate_key()
            sub = self.ca_cert("sub intermediate", k, issuer=self.issuer)
            return self.leaf(issuer=Issuer(sub, k, (sub, self.intermediate)))
        raise KeyError(f"unknown bad variant {variant!r}; known: {', '.join(self.BAD)}")

    # --- PEM and files -------------------------------------------------------

    @staticmethod
    def chain_pem(chain: list[x509.Certificate]) -> bytes:
        return b"".join(cert_to_pem(c) for c in chain)

    @staticmethod
    def key_pem(key) -> bytes:
        return key_to_pem(key)

    def write(self, directory: str, name: str, chain: list[x509.Certificate], key) -> dict[str, str]:
        """Write ``<name>.pem`` (chain), ``<name>-key.pem`` and ``bundle.pem``
        into ``directory``, for APIs that want files (ssl.load_cert_chain)."""
        paths = {"cert": os.path.join(directory, f"{name}.pem"),
                 "key": os.path.join(directory, f"{name}-key.pem"),
                 "bundle": os.path.join(directory, "bundle.pem")}
        for path, data in ((paths["cert"], self.chain_pem(chain)), (paths["key"], self.key_pem(key)),
                           (paths["bundle"], self.bundle.to_pem())):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return paths


# --- the agent's CA as the proxy sees it, and what the proxy holds ------------------

MESH_TD = "cluster.local"  # the trust domain of the proxy tests


class FakeCA:
    """Speaks the agent's CA protocol (one JSON line each way) on a Unix
    socket and signs CSRs with a CertFactory intermediate, for the
    identities it allows only."""

    def __init__(self, path: str, allowed, *, ttl: float = 3600.0, generation: int = 1, factory=None,
                 node: str | None = None):
        self.path = path
        self.factory = factory or CertFactory(MESH_TD)
        self.node = node  # sign with this node's intermediate (factory.node_issuer), else the factory's
        self.allowed = set(allowed)
        self.ttl = ttl
        self.generation = generation
        self.requests: list[dict] = []
        self.server = None

    async def start(self):
        self.server = await asyncio.start_unix_server(self._handle, self.path)
        return self

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def rotate(self):
        """New CA material (as after `meshlet ca rotate`) and a new generation."""
        self.factory = CertFactory(MESH_TD)
        self.generation += 1

    async def _handle(self, reader, writer):
        req = json.loads(await reader.readline())
        self.requests.append(req)
        f = self.factory
        bundle = f.bundle.to_pem().decode()
        if req.get("op") == "bundle":
            resp = {"ok": True, "bundle": bundle, "generation": self.generation}
        elif req.get("identity") not in self.allowed:
            resp = {"ok": False, "reason": "not_on_node", "error": f"{req.get('identity')} is not on this node"}
        else:
            try:
                issuer = f.node_issuer(self.node) if self.node else f.issuer
                leaf = sign_workload_csr(req["csr"].encode(), expected=parse_spiffe_id(req["identity"]),
                                         issuer_cert=issuer.cert, issuer_key=issuer.key,
                                         ttl=timedelta(seconds=self.ttl))
                chain = f.chain_pem([leaf, issuer.cert]).decode()
                resp = {"ok": True, "chain": chain, "bundle": bundle, "generation": self.generation}
            except SvidError as e:
                resp = {"ok": False, "reason": e.reason, "error": str(e)}
        writer.write(json.dumps(resp).encode() + b"\n")
        await writer.drain()
        writer.close()

    def signed(self):
        return [r["identity"] for r in self.requests if r.get("op") == "sign"]


def make_svid(identity: str, chain, key) -> Svid:
    """An Svid record (what CertManager hands the proxy) for a CertFactory chain."""
    leaf = chain[0]
    return Svid(identity=identity, chain=tuple(chain), key=key,
                not_before=leaf.not_valid_before_utc.timestamp(), not_after=leaf.not_valid_after_utc.timestamp(),
                serial=leaf.serial_number, next_renewal=0.0, generation=0)
