"""X.509-SVIDs: trust bundles, CSRs, issuing and verifying.

Pure: PEM bytes and ``cryptography`` objects in, values out. Every refusal
is an ``SvidError`` whose ``reason`` is a short stable code (listed in
``REASONS``) that callers may log, count and match on; the detail says
what to do about it.

The SVID profile meshlet issues (``sign_workload_csr``):

- exactly one URI SAN, the SPIFFE ID; no DNS SANs; subject ``O=meshlet``;
- BasicConstraints CA=false (critical);
- KeyUsage digitalSignature (critical; plus keyEncipherment for RSA keys);
- ExtendedKeyUsage serverAuth + clientAuth;
- validity ``[now - 1 min, min(now + ttl, issuer not_after)]``;
- a random 128-bit serial, SubjectKeyIdentifier, AuthorityKeyIdentifier.

What ``verify_svid`` checks, in order (the first failure is reported):

1. a signature path from the leaf, through the intermediates the peer sent
   (in any order; extra certificates are ignored), to a root of the bundle
   (``unknown_ca`` when no trusted issuer signs; ``bad_chain`` when the path
   exists but an intermediate is not a CA, lacks keyCertSign, breaks a path
   length, or a certificate has a critical extension we do not understand);
2. every certificate of the path, root included, is valid at ``now``
   (``expired`` / ``not_yet_valid``);
3. the leaf is not a CA (``leaf_is_ca``) and its KeyUsage has
   digitalSignature and neither keyCertSign nor cRLSign (``bad_key_usage``);
4. exactly one URI SAN (``multiple_uri_sans`` / ``no_uri_san``, or
   ``spiffe_id_in_dns_san`` when the only SPIFFE ID is in a DNS SAN), which
   parses as a SPIFFE ID (``bad_spiffe_id``) of the bundle's trust domain
   (``wrong_trust_domain``);
5. URI and DNS name constraints of the CAs on the path (``bad_chain``);
6. the ID equals ``expected`` when given (``wrong_identity``).

Key scope: ``verify_svid_issuer`` also returns the CA that signed the leaf,
and ``issuing_node`` names the node a meshlet node intermediate belongs to
(its subject CN is ``<trust domain> node <node>``, written by the root when
``meshlet ca`` adds the node, so a node key cannot claim another node's
name: intermediates have pathlen 0).  The proxies use it so that a node can
speak only for its own pods (``agent.proxy.admission``, ``agent.proxy.tls``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from .spiffe import SpiffeId, SpiffeIdError, parse_spiffe_id

__all__ = [
    "REASONS",
    "SvidError",
    "TrustBundle",
    "generate_key",
    "key_to_pem",
    "load_key_pem",
    "cert_to_pem",
    "load_certs_pem",
    "cert_fingerprint",
    "make_csr",
    "sign_workload_csr",
    "verify_svid",
    "verify_svid_issuer",
    "node_ca_common_name",
    "issuing_node",
    "svid_info",
    "check_name_constraints",
]

REASONS = frozenset(
    {
        "expired",
        "not_yet_valid",
        "unknown_ca",
        "wrong_trust_domain",
        "multiple_uri_sans",
        "no_uri_san",
        "spiffe_id_in_dns_san",
        "leaf_is_ca",
        "bad_spiffe_id",
        "bad_key_usage",
        "bad_chain",
        "wrong_identity",
        "bad_csr",
    }
)

CLOCK_SKEW = timedelta(minutes=1)
"""How far back an issued SVID's not_before is set, for peers whose clock is behind."""
MAX_PATH_DEPTH = 8
"""Most certificates between leaf and root that verify_svid will follow."""

# Critical extensions verify_svid understands; any other critical one is refused.
_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.NAME_CONSTRAINTS,
        ExtensionOID.EXTENDED_KEY_USAGE,
    }
)


class SvidError(Exception):
    """An SVID (or CSR) refused; ``reason`` is a stable code from ``REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown SvidError reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TrustBundle:
    """The trusted roots for one trust domain (duplicates are dropped)."""

    trust_domain: str
    roots: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        SpiffeId(self.trust_domain, "")  # validates
        unique: dict[bytes, x509.Certificate] = {}
        for c in self.roots:
            unique.setdefault(c.public_bytes(serialization.Encoding.DER), c)
        object.__setattr__(self, "roots", tuple(unique.values()))

    @classmethod
    def from_pem(cls, trust_domain: str, pem: bytes) -> TrustBundle:
        """A bundle from one or more concatenated PEM certificates."""
        return cls(trust_domain, tuple(load_certs_pem(pem)))

    def to_pem(self) -> bytes:
        return b"".join(cert_to_pem(c) for c in self.roots)

    def fingerprint(self) -> str:
        """sha256 hex over the sorted roots' DER digests: independent of order,
        changes iff the set of roots changes."""
        digests = sorted(
            hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).digest() for c in self.roots
        )
        return hashlib.sha256(b"".join(digests)).hexdigest()


# --- keys and PEM ------------------------------------------------------------


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key) -> bytes:
    """Unencrypted PKCS#8 PEM (protect it with file permissions)."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key_pem(pem: bytes):
    return serialization.load_pem_private_key(pem, password=None)


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_certs_pem(pem: bytes) -> list[x509.Certificate]:
    """All certificates in ``pem`` (concatenated PEM blocks), in order."""
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(
            f"no valid PEM certificate found ({e}); expected '-----BEGIN CERTIFICATE-----' blocks"
        ) from None


def cert_fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the certificate's DER."""
    return cert.fingerprint(hashes.SHA256()).hex()


# --- issuing -----------------------------------------------------------------


def make_csr(spiffe_id: SpiffeId, key) -> bytes:
    """A PEM CSR with an empty subject and exactly one URI SAN, nothing else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_workload_csr(
    csr_pem: bytes,
    *,
    expected: SpiffeId,
    issuer_cert: x509.Certificate,
    issuer_key,
    ttl: timedelta,
    now: datetime | None = None,
) -> x509.Certificate:
    """Issue an SVID for ``expected`` from a CSR (profile in the module docstring).

    Refuses unless the CSR parses (``bad_csr``), its signature verifies and it
    asks for exactly ``expected`` as its only SAN (``wrong_identity``), the
    ID names a workload (``bad_spiffe_id``) the issuer's name constraints
    allow (``wrong_trust_domain``), and the issuer is still valid
    (``expired``). Nothing the CSR asks for besides its key is copied."""
    now = _now(now)
    if not isinstance(expected, SpiffeId):
        raise TypeError("expected must be a SpiffeId")
    if expected.path == "":
        raise SvidError(
            "bad_spiffe_id",
            f"{expected} is a trust domain ID, not a workload ID; SVIDs are issued for IDs with a path",
        )
    if ttl <= timedelta(0):
        raise ValueError(f"ttl must be positive, not {ttl}")
    if _public_der(issuer_key.public_key()) != _public_der(issuer_cert.public_key()):
        raise ValueError("issuer_key does not belong to issuer_cert")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        sig_ok = csr.is_signature_valid
        requested = _csr_sans(csr)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SvidError("bad_csr", f"cannot parse the CSR ({e}); send one PEM CERTIFICATE REQUEST") from None
    if not sig_ok:
        raise SvidError(
            "wrong_identity", "CSR signature does not verify: the requester does not hold the key"
        )
    uris = [n.value for n in requested if isinstance(n, x509.UniformResourceIdentifier)]
    if len(requested) != 1 or len(uris) != 1:
        raise SvidError(
            "wrong_identity",
            f"CSR must carry exactly one SAN, the URI {expected}; it has "
            f"{len(uris)} URI SAN(s) and {len(requested) - len(uris)} other SAN(s)",
        )
    try:
        asked = parse_spiffe_id(uris[0])
    except SpiffeIdError as e:
        raise SvidError("bad_spiffe_id", f"CSR URI SAN {uris[0][:100]!r} is not a SPIFFE ID: {e}") from None
    if asked != expected:
        raise SvidError("wrong_identity", f"CSR asks for {asked}, but this workload is {expected}")
    problem = check_name_constraints([issuer_cert], expected, [])
    if problem:
        raise SvidError("wrong_trust_domain", f"the issuer may not sign {expected}: {problem}")
    public_key = csr.public_key()
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise SvidError(
            "bad_csr", f"CSR key type {type(public_key).__name__} is not supported; use ECDSA or RSA"
        )

    not_before = max(now - CLOCK_SKEW, issuer_cert.not_valid_before_utc)
    not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
    if not_after <= now:
        raise SvidError(
            "expired",
            f"issuer {issuer_cert.subject.rfc4514_string()} expired at "
            f"{issuer_cert.not_valid_after_utc.isoformat()}; reissue the node CA",
        )
    ku_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet")]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(expected))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True, key_encipherment=ku_rsa), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_id(issuer_cert), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


def random_serial() -> int:
    """A random positive 128-bit serial number."""
    return secrets.randbits(128) or 1


def key_usage(
    *, digital_signature=False, key_encipherment=False, key_cert_sign=False, crl_sign=False
) -> x509.KeyUsage:
    """KeyUsage with only the named bits set."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def authority_key_id(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """AKI pointing at the issuer's SKI (or derived from its key if it has none)."""
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        # An issuer's key signs, so it is never one of the key-exchange-only
        # types (X25519, X448, ...) that public_key() may also return.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]


def _csr_sans(csr: x509.CertificateSigningRequest) -> list[x509.GeneralName]:
    try:
        return list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- verifying ---------------------------------------------------------------


def verify_svid(
    chain: list[x509.Certificate],
    bundle: TrustBundle,
    *,
    now: datetime | None = None,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The verified SPIFFE ID of ``chain[0]``; raises SvidError otherwise.

    ``chain`` is what a TLS peer sends: the leaf first, then intermediates.
    Checks and their reason codes are listed in the module docstring."""
    return verify_svid_issuer(chain, bundle, now=now, expected=expected)[0]


def verify_svid_issuer(
    chain: list[x509.Certificate],
    bundle: TrustBundle,
    *,
    now: datetime | None = None,
    expected: SpiffeId | None = None,
) -> tuple[SpiffeId, x509.Certificate]:
    """``verify_svid``, and the CA certificate that signed the leaf on the
    verified path (an intermediate, or the bundle's root itself)."""
    now = _now(now)
    if not chain:
        raise SvidError("bad_chain", "the peer sent no certificate")
    leaf = chain[0]
    for cert in chain:
        _extensions(cert)  # malformed extensions → bad_chain, before anything else

    path, anchor = _build_path(leaf, chain[1:], bundle)
    _check_path(path, anchor)
    for cert in path + [anchor]:
        _check_validity(cert, now, is_leaf=cert is leaf)

    leaf_ext = _extensions(leaf)
    bc = _ext(leaf_ext, x509.BasicConstraints)
    if bc is not None and bc.ca:
        raise SvidError(
            "leaf_is_ca",
            "the leaf certificate is a CA (BasicConstraints CA=true); "
            "a CA certificate cannot be a workload's SVID",
        )
    ku = _ext(leaf_ext, x509.KeyUsage)
    if ku is None or not ku.digital_signature:
        raise SvidError("bad_key_usage", "the leaf's KeyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SvidError("bad_key_usage", "the leaf's KeyUsage has keyCertSign or cRLSign; SVIDs must not")

    sid = leaf_spiffe_id(leaf)
    if sid.trust_domain != bundle.trust_domain:
        raise SvidError(
            "wrong_trust_domain",
            f"{sid} is not in trust domain {bundle.trust_domain!r}; federation is not configured",
        )
    dns = [n.value for n in _sans(leaf) if isinstance(n, x509.DNSName)]
    problem = check_name_constraints(path[1:] + [anchor], sid, dns)
    if problem:
        raise SvidError("bad_chain", problem)
    if expected is not None and sid != expected:
        raise SvidError("wrong_identity", f"peer is {sid}, expected {expected}")
    return sid, path[1] if len(path) > 1 else anchor


_NODE_CA_WORD = " node "


def node_ca_common_name(trust_domain: str, node: str) -> str:
    """The subject CN of ``node``'s intermediate CA (what ``issuing_node`` reads)."""
    return f"{trust_domain}{_NODE_CA_WORD}{node}"


def issuing_node(issuer: x509.Certificate, trust_domain: str) -> str | None:
    """The node whose intermediate ``issuer`` is, or None when it is no
    meshlet node CA of ``trust_domain`` (a root, or a CA made elsewhere)."""
    bc = _ext(_extensions(issuer), x509.BasicConstraints)
    if bc is None or not bc.ca or bc.path_length != 0:
        return None  # a node CA signs leaves only; anything above it speaks for no one node
    cns = issuer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    cn = cns[0].value
    prefix = f"{trust_domain}{_NODE_CA_WORD}"
    if not isinstance(cn, str) or not cn.startswith(prefix):
        return None
    node = cn[len(prefix) :]
    return node if _NODE_NAME.fullmatch(node) else None


# the node names ``meshlet ca`` accepts (agent.identity.ca.NODE_NAME)
_NODE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?")


def leaf_spiffe_id(leaf: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in the leaf's single URI SAN (no signature checks: use
    verify_svid for anything that decides trust)."""
    sans = _sans(leaf)
    uris = [n.value for n in sans if isinstance(n, x509.UniformResourceIdentifier)]
    if not uris:
        if any(isinstance(n, x509.DNSName) and n.value.lower().startswith("spiffe://") for n in sans):
            raise SvidError(
                "spiffe_id_in_dns_san", "the SPIFFE ID is in a DNS SAN; X.509-SVIDs carry it as a URI SAN"
            )
        raise SvidError("no_uri_san", "the leaf has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise SvidError("multiple_uri_sans", f"the leaf has {len(uris)} URI SANs; an SVID has exactly one")
    try:
        return parse_spiffe_id(uris[0])
    except SpiffeIdError as e:
        raise SvidError("bad_spiffe_id", f"URI SAN {uris[0][:100]!r} is not a SPIFFE ID: {e}") from None


def _build_path(
    leaf: x509.Certificate, pool: list[x509.Certificate], bundle: TrustBundle
) -> tuple[list[x509.Certificate], x509.Certificate]:
    """[leaf, intermediates...] and the bundle root that signs the last one."""
    path = [leaf]
    unused = list(pool)
    while True:
        current = path[-1]
        for root in bundle.roots:
            if _signed_by(current, root):
                return path, root
        nxt = next((c for c in unused if _signed_by(current, c)), None)
        if nxt is None:
            raise SvidError(
                "unknown_ca",
                f"no root of the {bundle.trust_domain!r} bundle signs the chain "
                f"(it ends at issuer {current.issuer.rfc4514_string()!r}); the peer's CA is "
                "not trusted — is bundle.pem current?",
            )
        if len(path) > MAX_PATH_DEPTH:
            raise SvidError("bad_chain", f"the chain is longer than {MAX_PATH_DEPTH} certificates")
        unused.remove(nxt)
        path.append(nxt)


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False


def _check_path(path: list[x509.Certificate], anchor: x509.Certificate) -> None:
    for cert in path + [anchor]:
        for e in _extensions(cert):
            if e.critical and e.oid not in _UNDERSTOOD_CRITICAL:
                raise SvidError(
                    "bad_chain",
                    f"certificate {cert.subject.rfc4514_string()!r} has an "
                    f"unsupported critical extension {e.oid.dotted_string}",
                )
    for cert in path:
        if isinstance(cert.signature_hash_algorithm, (hashes.SHA1, hashes.MD5)):
            raise SvidError(
                "bad_chain",
                f"certificate {cert.subject.rfc4514_string()!r} is signed with "
                f"{cert.signature_hash_algorithm.name}, which is too weak",
            )
    # Intermediates: path[1:]. The anchor is trusted as configured, but its
    # path length still applies.
    for depth, cert in enumerate(path[1:] + [anchor], start=1):
        ext = _extensions(cert)
        bc = _ext(ext, x509.BasicConstraints)
        name = cert.subject.rfc4514_string()
        if cert is not anchor:
            if bc is None or not bc.ca:
                raise SvidError("bad_chain", f"intermediate {name!r} is not a CA (BasicConstraints CA=true)")
            ku = _ext(ext, x509.KeyUsage)
            if ku is None or not ku.key_cert_sign:
                raise SvidError("bad_chain", f"intermediate {name!r} lacks KeyUsage keyCertSign")
        below = depth - 1  # CA certificates between this one and the leaf
        if bc is not None and bc.path_length is not None and below > bc.path_length:
            raise SvidError(
                "bad_chain",
                f"CA {name!r} allows {bc.path_length} intermediate(s) below it, the chain has {below}",
            )


def _check_validity(cert: x509.Certificate, now: datetime, *, is_leaf: bool) -> None:
    what = "the leaf" if is_leaf else f"CA {cert.subject.rfc4514_string()!r}"
    if now < cert.not_valid_before_utc:
        raise SvidError(
            "not_yet_valid",
            f"{what} is valid only from {cert.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()}); check the clocks",
        )
    if now > cert.not_valid_after_utc:
        raise SvidError(
            "expired", f"{what} expired at {cert.not_valid_after_utc.isoformat()} (now {now.isoformat()})"
        )


def check_name_constraints(cas: list[x509.Certificate], sid: SpiffeId, dns_names: list[str]) -> str | None:
    """Why the CAs' NameConstraints forbid this SPIFFE ID or DNS names, or None.

    URI constraints match the URI's host (the trust domain): ``td`` exactly,
    ``.td`` any subdomain (RFC 5280 4.2.1.10). Constraint types other than
    URI and DNS are refused, since this checker does not evaluate them."""
    for ca in cas:
        nc = _ext(_extensions(ca), x509.NameConstraints)
        if nc is None:
            continue
        ca_name = ca.subject.rfc4514_string()
        for subtree in (nc.permitted_subtrees or []) + (nc.excluded_subtrees or []):
            if not isinstance(subtree, (x509.UniformResourceIdentifier, x509.DNSName)):
                return (
                    f"CA {ca_name!r} has a {type(subtree).__name__} name constraint, which is not supported"
                )
        for kind, names, match in (
            (x509.UniformResourceIdentifier, [sid.trust_domain], _uri_host_matches),
            (x509.DNSName, dns_names, _dns_matches),
        ):
            permitted = [s.value for s in nc.permitted_subtrees or [] if isinstance(s, kind)]
            excluded = [s.value for s in nc.excluded_subtrees or [] if isinstance(s, kind)]
            for name in names:
                if any(match(name, c) for c in excluded):
                    return f"CA {ca_name!r} excludes {name!r}"
                if permitted and not any(match(name, c) for c in permitted):
                    return f"CA {ca_name!r} does not permit {name!r} (permitted: {', '.join(permitted)})"
    return None


def _uri_host_matches(host: str, constraint: str) -> bool:
    c = constraint.lower()
    if c.startswith("."):
        return host.endswith(c)
    return host == c


def _dns_matches(name: str, constraint: str) -> bool:
    n, c = name.lower().rstrip("."), constraint.lower().lstrip(".")
    return c == "" or n == c or n.endswith("." + c)


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except ValueError as e:
        raise SvidError(
            "bad_chain", f"certificate {cert.subject.rfc4514_string()!r} has malformed extensions: {e}"
        ) from None


def _ext(extensions: x509.Extensions, cls):
    try:
        return extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    san = _ext(_extensions(cert), x509.SubjectAlternativeName)
    return list(san) if san is not None else []


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return now


# --- display -----------------------------------------------------------------


def svid_info(cert: x509.Certificate) -> dict:
    """What ``meshlet certs`` shows about one certificate. ``spiffe_id`` is the
    single URI SAN as written (None if there is not exactly one)."""
    uris = [n.value for n in _sans(cert) if isinstance(n, x509.UniformResourceIdentifier)]
    return {
        "spiffe_id": uris[0] if len(uris) == 1 else None,
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "issuer": cert.issuer.rfc4514_string(),
    }
