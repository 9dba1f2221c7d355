"""Node intermediates by Kubernetes CSR: what a node asks for and what the
CA controller decides about it.  Pure: no sockets, no clock (``now`` is
passed in), no API calls; :mod:`agent.identity.controller` (the controller's
watch loop) and :mod:`agent.identity.nodecsr` (the node's client) are the
I/O shells around it.

The request.  A node agent asks for its intermediate with a
``certificates.k8s.io/v1`` CertificateSigningRequest:

- ``spec.signerName: meshlet.io/node-intermediate``,
  ``spec.usages: [cert sign, crl sign]``;
- ``spec.request``: a PKCS#10 CSR whose subject is exactly the node
  intermediate's (``O=meshlet, CN=<td> node <node>``, what
  :func:`agent.identity.ca.issue_node_intermediate` writes, less the serial
  the CA picks), with exactly one SAN, the URI ``spiffe://<td>/node/<node>``,
  and asking for exactly what a node CA is: critical BasicConstraints
  ``CA=true, pathlen=0`` and critical KeyUsage ``keyCertSign, cRLSign``.
  Nothing else.

The rules (:func:`review`), in the order they are checked; the first that
fails names the Denied reason:

==================== =========================================================
reason               refused when
==================== =========================================================
WrongRequester       ``spec.username`` is not the node agent's service account
NoNodeBinding        the requester's token names no node
                     (``spec.extra["authentication.kubernetes.io/node-name"]``
                     is missing or not exactly one value)
BadRequest           ``spec.request`` is not one PEM CSR with a valid signature
WeakKey              the key is not ECDSA P-256/P-384 or RSA 2048-8192
BadSubject           the subject is not exactly the node CA's
BadSubjectAltName    the SANs are not exactly ``spiffe://<td>/node/<node>``
                     (an extra SAN, another trust domain, a node that
                     disagrees with the subject)
WrongNode            the node asked for is not the node the token is bound to
NotCA                BasicConstraints is not critical ``CA=true, pathlen=0``
BadKeyUsage          KeyUsage is not critical ``keyCertSign, cRLSign``, or
                     ``spec.usages`` is not ``[cert sign, crl sign]``
UnexpectedExtension  the CSR asks for any other extension
UnknownNode          the API has no such node (checked by the shell)
RateLimited          the node was already issued ``ReissueLimit.count``
                     intermediates within ``ReissueLimit.window`` (checked by
                     the shell with :class:`IssueHistory`; an approved CSR
                     over the limit is Failed with this reason, unsigned)
==================== =========================================================

The re-issue limit: a node that asks again and again (a bug, a lost disk
in a loop, a stolen token) must not make the controller sign again and
again -- every signature is one more valid intermediate for that node.
:class:`IssueHistory` counts, per node, the intermediates signed within the
window: those this controller signed, and those it sees in CSRs that carry
a certificate (so a restarted or newly elected controller knows what its
predecessor signed, as far as the API still holds those CSRs; Kubernetes
garbage-collects signed CSRs after an hour, which the default window
matches).

The states (idempotence: a restarted controller re-sees every CSR): other
signers' CSRs are ignored entirely; a CSR that is Denied, Failed or already
carries a certificate is done (never signed twice, never re-denied); an
Approved CSR without a certificate (approved by us before a crash, or by an
administrator) is signed only if it still passes every rule, else it gets a
Failed condition; a CSR without a decision is approved or denied.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID, NameOID

from .spiffe import SpiffeId, SpiffeIdError, parse_spiffe_id
from .svid import issuing_node, key_usage, load_certs_pem, node_ca_common_name

__all__ = [
    "SIGNER",
    "NODE_USER",
    "NODE_NAME_EXTRA",
    "USAGES",
    "Policy",
    "Verdict",
    "review",
    "node_spiffe_id",
    "make_node_csr",
    "csr_object",
    "condition",
    "certificate_field",
    "check_issued",
    "renewal_due",
    "ReissueLimit",
    "IssueHistory",
    "issued",
    "limited_until",
]

SIGNER = "meshlet.io/node-intermediate"
NODE_USER = "system:serviceaccount:meshlet-system:meshlet-node"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
USAGES = ("cert sign", "crl sign")
DEFAULT_TTL = timedelta(days=30)
MIN_TTL = timedelta(minutes=10)  # the API server's own floor for spec.expirationSeconds
_EC_CURVES = ("secp256r1", "secp384r1")
_RSA_BITS = (2048, 8192)
_CA_KU = key_usage(key_cert_sign=True, crl_sign=True)
_ASKED = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE, ExtensionOID.SUBJECT_ALTERNATIVE_NAME}


@dataclass(frozen=True)
class Policy:
    """What the CA controller accepts."""

    trust_domain: str
    signer: str = SIGNER
    """Only CSRs of this ``spec.signerName`` are looked at; others are not ours."""
    node_user: str = NODE_USER
    """The node agent's service account, as the API server names the requester."""
    max_ttl: timedelta = DEFAULT_TTL
    """An intermediate's lifetime (shorter when the CSR's ``expirationSeconds`` asks)."""


@dataclass(frozen=True)
class ReissueLimit:
    """At most ``count`` intermediates per node within ``window`` (module docstring)."""

    count: int = 3
    window: timedelta = timedelta(hours=1)

    def __post_init__(self) -> None:
        if self.count < 1 or self.window <= timedelta(0):
            raise ValueError(f"the re-issue limit needs count >= 1 and a positive window, not {self}")

    def describe(self) -> str:
        return f"{self.count} per {_span(self.window)}"


class IssueHistory:
    """Per node, when its intermediates were signed (only within the window).
    Pure: the caller passes ``now``.  Keyed by CSR name, so seeing a signed
    CSR again (a relist) does not count it twice."""

    def __init__(self, limit: ReissueLimit):
        self.limit = limit
        self._signed: dict[str, dict[str, datetime]] = {}

    def record(self, node: str, csr: str, at: datetime) -> None:
        self._signed.setdefault(node, {})[csr] = at

    def recent(self, node: str, now: datetime, *, but: str | None = None) -> list[datetime]:
        """When ``node``'s intermediates within the window were signed, oldest
        first (``but``: leaving out the one of that CSR)."""
        got = self._signed.get(node)
        if not got:
            return []
        since = now - self.limit.window
        for name in [n for n, t in got.items() if t <= since]:
            del got[name]
        if not got:
            del self._signed[node]
        return sorted(t for n, t in got.items() if n != but)

    def refusal(self, node: str, now: datetime, *, csr: str | None = None) -> str | None:
        """Why ``node`` may not have another intermediate (for the CSR named
        ``csr``: one already signed for it is not held against it) now, or None."""
        recent = self.recent(node, now, but=csr)
        if len(recent) < self.limit.count:
            return None
        free = recent[len(recent) - self.limit.count] + self.limit.window
        return (
            f"node {node} was issued {len(recent)} intermediates in the last {_span(self.limit.window)}; "
            f"the re-issue limit is {self.limit.describe()} (meshlet ca controller --reissue-limit, "
            f"--reissue-window); {_NEXT} {free.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        )


_NEXT = "the next can be signed after"
_NEXT_RE = re.compile(re.escape(_NEXT) + r" (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def limited_until(condition: dict) -> datetime | None:
    """When a CSR Denied (or Failed) ``RateLimited`` says the node's next
    intermediate can be signed (:meth:`IssueHistory.refusal` writes it), so
    the node waits until then instead of asking in vain; None otherwise."""
    if condition.get("reason") != "RateLimited":
        return None
    m = _NEXT_RE.search(str(condition.get("message") or ""))
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Verdict:
    """What to do with one CSR.

    ``action``: ``ignore`` (another signer's), ``done`` (decided before),
    ``approve`` (then check the node exists, approve, sign), ``sign``
    (approved, no certificate yet), ``deny``, ``fail`` (approved but it
    breaks a rule: mark Failed, do not sign)."""

    action: str
    reason: str = ""
    message: str = ""
    node: str | None = None
    public_key: object = None
    ttl: timedelta | None = None


class _Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def node_spiffe_id(trust_domain: str, node: str) -> SpiffeId:
    """``spiffe://<td>/node/<node>``: the name a node's CSR asks for."""
    return SpiffeId(trust_domain, f"/node/{node}")


# --- the node's side: the request -----------------------------------------------------


def make_node_csr(trust_domain: str, node: str, key) -> bytes:
    """The PKCS#10 CSR (PEM) for ``node``'s intermediate (module docstring)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(trust_domain, node))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(str(node_spiffe_id(trust_domain, node)))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KU, critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def csr_object(node: str, csr_pem: bytes, *, signer: str = SIGNER, ttl: timedelta | None = None) -> dict:
    """The CertificateSigningRequest to create (the API server fills in who asks)."""
    spec: dict = {
        "request": base64.b64encode(csr_pem).decode(),
        "signerName": signer,
        "usages": list(USAGES),
    }
    if ttl is not None:
        spec["expirationSeconds"] = int(ttl.total_seconds())
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {
            "generateName": f"meshlet-node-{node[:40]}-",
            "labels": {"app.kubernetes.io/part-of": "meshlet", "meshlet.io/node": node[:63]},
        },
        "spec": spec,
    }


def check_issued(
    certificate_pem: bytes, key, trust_domain: str, node: str, now: datetime
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The node's check of what the controller signed: ``status.certificate``
    is the intermediate, then the trust bundle's roots.  Returns
    (intermediate, roots) or raises ValueError saying what is wrong."""
    certs = load_certs_pem(certificate_pem)
    if len(certs) < 2:
        raise ValueError(
            f"the certificate holds {len(certs)} certificate(s); expected the intermediate and the roots"
        )
    inter, roots = certs[0], certs[1:]
    if _spki(inter.public_key()) != _spki(key.public_key()):
        raise ValueError("the signed certificate is not for this node's key")
    got = issuing_node(inter, trust_domain)
    if got != node:
        raise ValueError(f"the signed certificate is a node CA of {got!r}, not of {node!r} in {trust_domain}")
    if not inter.not_valid_before_utc <= now < inter.not_valid_after_utc:
        raise ValueError(
            f"the signed certificate is not valid now ({inter.not_valid_before_utc.isoformat()} .. "
            f"{inter.not_valid_after_utc.isoformat()})"
        )
    for r in roots:
        bc = _ext(r, x509.BasicConstraints)
        if bc is None or not bc.ca or r.subject != r.issuer:
            raise ValueError(f"{r.subject.rfc4514_string()} after the intermediate is not a root CA")
    if not any(_issued_by(inter, r) for r in roots):
        raise ValueError("the intermediate does not chain to any root that came with it")
    return inter, roots


def renewal_due(cert: x509.Certificate, now: datetime) -> str | None:
    """Why ``cert`` (a node intermediate) must be replaced now, or None:
    expired, not yet valid, or in the last third of its lifetime."""
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now >= na:
        return f"the node intermediate expired at {na.isoformat()}"
    if now < nb:
        return f"the node intermediate is not valid before {nb.isoformat()}"
    if now >= na - (na - nb) / 3:
        return f"the node intermediate expires at {na.isoformat()} (last third of its lifetime)"
    return None


# --- the controller's side: the decision ------------------------------------------------


def conditions(csr: dict) -> dict[str, dict]:
    """The CSR's status conditions by type (only those with status True)."""
    out = {}
    for c in (csr.get("status") or {}).get("conditions") or ():
        if isinstance(c, dict) and c.get("status", "True") == "True":
            out[str(c.get("type"))] = c
    return out


def review(csr: dict, policy: Policy) -> Verdict:
    """Decide about one CSR (module docstring: the rules and the states)."""
    spec = csr.get("spec") or {}
    if spec.get("signerName") != policy.signer:
        return Verdict("ignore")
    conds = conditions(csr)
    for t in ("Denied", "Failed"):
        if t in conds:
            return Verdict("done", t, str(conds[t].get("message", "")))
    if (csr.get("status") or {}).get("certificate"):
        return Verdict("done", "Issued")
    approved = "Approved" in conds
    try:
        node, public_key, ttl = _check(spec, policy)
    except _Refused as r:
        return Verdict("fail" if approved else "deny", r.reason, r.message)
    return Verdict(
        "sign" if approved else "approve",
        "Approved",
        f"node {node}: requested by its meshlet agent",
        node=node,
        public_key=public_key,
        ttl=ttl,
    )


def issued(csr: dict, policy: Policy) -> tuple[str, datetime] | None:
    """(node, when) of the intermediate a CSR of ``policy``'s signer carries
    in ``status.certificate``, or None (none, another signer's, unreadable).
    "When" is the certificate's notBefore (backdated by the CA by a few
    minutes: the window counts it slightly early, never late)."""
    if (csr.get("spec") or {}).get("signerName") != policy.signer:
        return None
    b64 = (csr.get("status") or {}).get("certificate")
    if not b64:
        return None
    try:
        certs = load_certs_pem(base64.b64decode(str(b64)))
    except (ValueError, binascii.Error, TypeError):
        return None
    if not certs:
        return None
    node = issuing_node(certs[0], policy.trust_domain)
    return (node, certs[0].not_valid_before_utc) if node else None


def _span(d: timedelta) -> str:
    s = int(d.total_seconds())
    if s % 3600 == 0:
        return f"{s // 3600}h"
    if s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


def _check(spec: dict, policy: Policy) -> tuple[str, object, timedelta]:
    td = policy.trust_domain
    user = spec.get("username")
    if user != policy.node_user:
        raise _Refused(
            "WrongRequester",
            f"requested by {user!r}; only the node agent's service account {policy.node_user} may ask "
            "for a node intermediate",
        )
    bound = ((spec.get("extra") or {}).get(NODE_NAME_EXTRA)) or []
    if not isinstance(bound, list) or len(bound) != 1 or not isinstance(bound[0], str) or not bound[0]:
        raise _Refused(
            "NoNodeBinding",
            f"the requester's token is not bound to one node (spec.extra[{NODE_NAME_EXTRA!r}] is "
            f"{bound!r}); the node agent must use a projected service account token "
            "(Kubernetes >= 1.32 binds the node name into it)",
        )
    token_node = bound[0]
    try:
        pem = base64.b64decode(str(spec.get("request", "")), validate=True)
        csr = x509.load_pem_x509_csr(pem)
        sig_ok = csr.is_signature_valid
        exts = {e.oid: e for e in csr.extensions}
        key = csr.public_key()
    except (ValueError, binascii.Error, TypeError) as e:
        raise _Refused("BadRequest", f"spec.request is not a base64 PEM certificate request: {e}") from None
    if not sig_ok:
        raise _Refused("BadRequest", "the certificate request's signature does not verify")
    _check_key(key)
    asked_cn = _single_cn(csr.subject)
    prefix = node_ca_common_name(td, "")
    node = asked_cn[len(prefix) :] if asked_cn and asked_cn.startswith(prefix) else ""
    if not node or csr.subject != _subject(td, node):
        raise _Refused(
            "BadSubject",
            f"the subject is {csr.subject.rfc4514_string()!r}; a node intermediate's is exactly "
            f"{_subject(td, token_node).rfc4514_string()!r}",
        )
    want = str(node_spiffe_id(td, node))
    san = exts.get(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    sans = list(san.value) if san is not None else []
    uris = [g.value for g in sans if isinstance(g, x509.UniformResourceIdentifier)]
    if len(sans) != 1 or len(uris) != 1 or uris[0] != want:
        names = ", ".join(_general_name(g) for g in sans) or "none"
        raise _Refused(
            "BadSubjectAltName",
            f"the request names {names}; it must name exactly one SAN, the URI {want}",
        )
    try:
        parse_spiffe_id(want)
    except SpiffeIdError as e:
        raise _Refused("BadSubjectAltName", f"{want}: {e}") from None
    if node != token_node:
        raise _Refused(
            "WrongNode",
            f"the request is for node {node!r} but the requester's token is bound to node "
            f"{token_node!r}; a node may ask only for its own intermediate",
        )
    bc = exts.get(ExtensionOID.BASIC_CONSTRAINTS)
    if bc is None or not bc.critical or not bc.value.ca or bc.value.path_length != 0:
        raise _Refused(
            "NotCA", "the request must ask for critical BasicConstraints CA=true, pathlen=0 (a node CA)"
        )
    ku = exts.get(ExtensionOID.KEY_USAGE)
    if ku is None or not ku.critical or ku.value != _CA_KU:
        raise _Refused("BadKeyUsage", "the request must ask for critical KeyUsage keyCertSign, cRLSign only")
    usages = spec.get("usages") or []
    if sorted(usages) != sorted(USAGES):
        raise _Refused(
            "BadKeyUsage", f"spec.usages is {usages!r}; a node intermediate's are {list(USAGES)!r}"
        )
    other = sorted(o.dotted_string for o in exts if o not in _ASKED)
    if other:
        raise _Refused("UnexpectedExtension", f"the request asks for other extensions: {', '.join(other)}")
    ttl = policy.max_ttl
    exp = spec.get("expirationSeconds")
    if isinstance(exp, int) and exp > 0:
        ttl = max(MIN_TTL, min(ttl, timedelta(seconds=exp)))
    return node, key, ttl


def _check_key(key) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in _EC_CURVES:
            return
        raise _Refused("WeakKey", f"ECDSA curve {key.curve.name} is not accepted; use P-256 or P-384")
    if isinstance(key, rsa.RSAPublicKey):
        lo, hi = _RSA_BITS
        if lo <= key.key_size <= hi:
            return
        raise _Refused("WeakKey", f"an RSA key of {key.key_size} bits is not accepted ({lo}..{hi})")
    raise _Refused("WeakKey", f"a {type(key).__name__} is not accepted; use ECDSA P-256 or P-384")


def condition(ctype: str, reason: str, message: str, now: datetime) -> dict:
    """A CSR status condition (``Approved``, ``Denied`` or ``Failed``)."""
    ts = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message[:1000],
        "lastUpdateTime": ts,
        "lastTransitionTime": ts,
    }


def certificate_field(intermediate_pem: bytes, bundle_pem: bytes) -> str:
    """``status.certificate``: the intermediate, then every root of the bundle (base64 PEM)."""
    return base64.b64encode(intermediate_pem + bundle_pem).decode()


# --- helpers ------------------------------------------------------------------------------


def _subject(trust_domain: str, node: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
            x509.NameAttribute(NameOID.COMMON_NAME, node_ca_common_name(trust_domain, node)),
        ]
    )


def _single_cn(name: x509.Name) -> str | None:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        return None
    return cns[0].value


def _general_name(g: x509.GeneralName) -> str:
    kind = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }.get(type(g), type(g).__name__)
    return f"{kind}:{g.value}"


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ext(cert: x509.Certificate, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False
