"""The CA controller's decision about a node's CSR (agent.identity.csrpolicy):
every refusal reason, the states a restarted controller re-sees, and the
node's own check of what it gets back.  Pure: no API, no clock."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.identity import csrpolicy as cp
from agent.identity.ca import init_ca, issue_node_intermediate, load_ca
from agent.identity.svid import cert_to_pem, generate_key, key_usage

TD = "cluster.local"
POLICY = cp.Policy(TD)
CA_KU = key_usage(key_cert_sign=True, crl_sign=True)


def _pkcs10(
    node: str = "node-a",
    *,
    key=None,
    cn: str | None = None,
    org: str | None = "meshlet",
    sans: list | None = None,
    ca: bool | None = True,
    path_length: int | None = 0,
    ku: x509.KeyUsage | None = CA_KU,
    extra_ext: x509.ExtensionType | None = None,
) -> bytes:
    key = key or generate_key()
    attrs = []
    if org is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn if cn is not None else f"{TD} node {node}"))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    if sans is None:
        sans = [x509.UniformResourceIdentifier(f"spiffe://{TD}/node/{node}")]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        bc = x509.BasicConstraints(ca=ca, path_length=path_length if ca else None)
        b = b.add_extension(bc, critical=True)
    if ku is not None:
        b = b.add_extension(ku, critical=True)
    if extra_ext is not None:
        b = b.add_extension(extra_ext, critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _csr(
    request: bytes | None = None,
    *,
    token_node: str | None = "node-a",
    user: str = cp.NODE_USER,
    signer: str = cp.SIGNER,
    usages=("cert sign", "crl sign"),
    status: dict | None = None,
    extra: dict | None = None,
) -> dict:
    spec = {
        "request": base64.b64encode(request if request is not None else _pkcs10()).decode(),
        "signerName": signer,
        "usages": list(usages),
        "username": user,
        "groups": ["system:serviceaccounts", "system:authenticated"],
    }
    if extra is not None:
        spec["extra"] = extra
    elif token_node is not None:
        spec["extra"] = {cp.NODE_NAME_EXTRA: [token_node]}
    obj = {"metadata": {"name": "meshlet-node-node-a-abcde", "uid": "u1"}, "spec": spec}
    if status is not None:
        obj["status"] = status
    return obj


def _refusal(csr: dict) -> tuple[str, str]:
    v = cp.review(csr, POLICY)
    assert v.action == "deny", v
    assert v.node is None and v.public_key is None
    return v.reason, v.message


def test_the_node_agents_own_request_is_approved():
    v = cp.review(_csr(cp.make_node_csr(TD, "node-a", generate_key())), POLICY)
    assert (v.action, v.node, v.ttl) == ("approve", "node-a", cp.DEFAULT_TTL)
    # the request object the node creates carries exactly that
    obj = cp.csr_object("node-a", _pkcs10())
    assert obj["spec"]["signerName"] == cp.SIGNER and obj["spec"]["usages"] == ["cert sign", "crl sign"]
    assert obj["metadata"]["generateName"].startswith("meshlet-node-node-a-")


@pytest.mark.parametrize(
    "csr, reason, words",
    [
        (_csr(user="system:serviceaccount:shop:default"), "WrongRequester", "shop:default"),
        (_csr(user="system:node:node-a"), "WrongRequester", cp.NODE_USER),
        (_csr(token_node=None), "NoNodeBinding", "not bound to one node"),
        (_csr(extra={cp.NODE_NAME_EXTRA: ["node-a", "node-b"]}), "NoNodeBinding", "node-name"),
        (_csr(extra={cp.NODE_NAME_EXTRA: [""]}), "NoNodeBinding", "node-name"),
        # node-a's token asking for node-b's intermediate (a consistent request otherwise)
        (_csr(_pkcs10("node-b"), token_node="node-a"), "WrongNode", "bound to node 'node-a'"),
        (_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"),
         "BadRequest", "not a base64 PEM"),
        (_csr(_pkcs10(cn="node-a")), "BadSubject", "O=meshlet"),
        (_csr(_pkcs10(org=None)), "BadSubject", "exactly"),
        (_csr(_pkcs10(cn=f"{TD} node node-b")), "BadSubjectAltName", "spiffe://cluster.local/node/node-b"),
        (_csr(_pkcs10(sans=[])), "BadSubjectAltName", "none"),
        (_csr(_pkcs10(sans=[x509.UniformResourceIdentifier(f"spiffe://{TD}/node/node-a"),
                            x509.DNSName("node-a.example")])),
         "BadSubjectAltName", "DNS:node-a.example"),
        (_csr(_pkcs10(sans=[x509.UniformResourceIdentifier("spiffe://other.domain/node/node-a")])),
         "BadSubjectAltName", "other.domain"),
        (_csr(_pkcs10(sans=[x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/shop/sa/web")])),
         "BadSubjectAltName", "/ns/shop/sa/web"),
        (_csr(_pkcs10(ca=False)), "NotCA", "CA=true"),
        (_csr(_pkcs10(ca=None)), "NotCA", "CA=true"),
        (_csr(_pkcs10(path_length=1)), "NotCA", "pathlen=0"),
        (_csr(_pkcs10(ku=key_usage(key_cert_sign=True, crl_sign=True, digital_signature=True))),
         "BadKeyUsage", "keyCertSign"),
        (_csr(_pkcs10(ku=None)), "BadKeyUsage", "keyCertSign"),
        (_csr(usages=("cert sign", "crl sign", "server auth")), "BadKeyUsage", "spec.usages"),
        (_csr(_pkcs10(extra_ext=x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]))),
         "UnexpectedExtension", "2.5.29.37"),
        (_csr(_pkcs10(key=ec.generate_private_key(ec.SECP256K1()))), "WeakKey", "secp256k1"),
        (_csr(_pkcs10(key=rsa.generate_private_key(65537, 1024))), "WeakKey", "1024 bits"),
    ],
    ids=lambda x: x if isinstance(x, str) and x[:1].isupper() and " " not in x else "",
)
def test_every_refusal_says_which_rule(csr, reason, words):
    got, message = _refusal(csr)
    assert got == reason, message
    assert words in message


def test_a_request_whose_signature_does_not_verify_is_refused():
    pem = _pkcs10()
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the signature's last byte
    bad = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    assert _refusal(_csr(bad)) [0] == "BadRequest"


def test_other_signers_are_ignored_entirely():
    for signer in ("kubernetes.io/kube-apiserver-client", "example.com/anything"):
        # even a request that would be refused: it is not ours to refuse
        assert cp.review(_csr(user="someone", signer=signer), POLICY).action == "ignore"
    assert cp.review(_csr(), cp.Policy(TD, signer="example.com/mine")).action == "ignore"


def test_decided_csrs_are_done_never_signed_twice_never_re_denied():
    approved = {"type": "Approved", "status": "True", "reason": "x", "message": "m"}
    denied = {"type": "Denied", "status": "True", "reason": "WrongNode", "message": "m"}
    failed = {"type": "Failed", "status": "True", "reason": "x", "message": "m"}
    assert cp.review(_csr(status={"conditions": [denied]}), POLICY).action == "done"
    assert cp.review(_csr(status={"conditions": [approved, failed]}), POLICY).action == "done"
    # already signed: done, whatever it asked for
    signed = {"conditions": [approved], "certificate": "TFMwdA=="}
    assert cp.review(_csr(status=signed), POLICY).action == "done"
    assert cp.review(_csr(_pkcs10("node-b"), status=signed), POLICY).action == "done"
    # a denied request that breaks a rule is not denied again
    assert cp.review(_csr(user="evil", status={"conditions": [denied]}), POLICY).action == "done"


def test_approved_but_unsigned_is_signed_only_if_it_still_passes():
    approved = {"conditions": [{"type": "Approved", "status": "True", "reason": "x", "message": "m"}]}
    assert cp.review(_csr(status=approved), POLICY).action == "sign"
    # approved by someone else (kubectl certificate approve) for the wrong node: Failed, not signed
    v = cp.review(_csr(_pkcs10("node-b"), status=approved), POLICY)
    assert (v.action, v.reason) == ("fail", "WrongNode")
    # a condition with status False is no decision
    pending = {"conditions": [{"type": "Approved", "status": "False", "reason": "x", "message": "m"}]}
    assert cp.review(_csr(status=pending), POLICY).action == "approve"


def test_expiration_seconds_shortens_within_bounds():
    c = _csr()
    c["spec"]["expirationSeconds"] = 3600
    assert cp.review(c, POLICY).ttl == timedelta(hours=1)
    c["spec"]["expirationSeconds"] = 60  # below the API server's floor: the floor
    assert cp.review(c, POLICY).ttl == cp.MIN_TTL
    c["spec"]["expirationSeconds"] = 10 * 365 * 86400  # never longer than the controller's maximum
    assert cp.review(c, POLICY).ttl == cp.DEFAULT_TTL


def test_the_signed_intermediate_has_the_file_cas_profile_and_the_node_checks_it(tmp_path):
    init_ca(str(tmp_path / "ca"), TD, ["node-a"])
    layout = load_ca(str(tmp_path / "ca"))
    key = generate_key()
    v = cp.review(_csr(cp.make_node_csr(TD, "node-a", key)), POLICY)
    cert = issue_node_intermediate(TD, "node-a", v.public_key, layout.root_cert, layout.root_key, ttl=v.ttl)
    file_ca = x509.load_pem_x509_certificate((tmp_path / "ca/nodes/node-a/ca.pem").read_bytes())
    assert {e.oid for e in cert.extensions} == {e.oid for e in file_ca.extensions}
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) == file_ca.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME
    )
    field = base64.b64decode(cp.certificate_field(cert_to_pem(cert), layout.bundle.to_pem()))
    now = datetime.now(UTC)
    inter, roots = cp.check_issued(field, key, TD, "node-a", now)
    assert inter == cert and roots == list(layout.bundle.roots)
    # the node refuses: another key, another node, no roots, a root that did not sign it
    with pytest.raises(ValueError, match="not for this node's key"):
        cp.check_issued(field, generate_key(), TD, "node-a", now)
    with pytest.raises(ValueError, match="not of 'node-b'"):
        cp.check_issued(field, key, TD, "node-b", now)
    with pytest.raises(ValueError, match="expected the intermediate and the roots"):
        cp.check_issued(cert_to_pem(cert), key, TD, "node-a", now)
    other = init_ca(str(tmp_path / "other"), TD, [])
    with pytest.raises(ValueError, match="does not chain"):
        cp.check_issued(cert_to_pem(cert) + other.bundle.to_pem(), key, TD, "node-a", now)
    # renewal: due in the last third of the lifetime, and when expired
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert cp.renewal_due(cert, nb + (na - nb) / 2) is None
    assert "last third" in (cp.renewal_due(cert, na - (na - nb) / 4) or "")
    assert "expired" in (cp.renewal_due(cert, na) or "")
