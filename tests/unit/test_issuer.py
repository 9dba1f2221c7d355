"""The node issuer: signs SVIDs only for identities of pods on this node."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization

from agent.identity.svid import generate_key, load_certs_pem, make_csr, verify_svid
from agent.identity.issuer import (CaMaterial, IdentityFilesError, IssueError, NodeIssuer,
                                   load_material)
from agent.identity.spiffe import parse_spiffe_id
from tests.support.ca import CertFactory

OWN = "spiffe://cluster.local/ns/shop/sa/web"
OTHER = "spiffe://cluster.local/ns/shop/sa/payments"


@pytest.fixture()
def fac():
    return CertFactory("cluster.local")


@pytest.fixture()
def issuer(fac):
    mat = CaMaterial(bundle=fac.bundle, ca_chain=[fac.intermediate], ca_key=fac.intermediate_key)
    return NodeIssuer("cluster.local", mat, timedelta(hours=24), "node1", frozenset({OWN}))


def csr(identity: str) -> bytes:
    return make_csr(parse_spiffe_id(identity), generate_key())


def test_signs_own_identity_and_the_chain_verifies(fac, issuer):
    chain_pem, leaf = issuer.sign(OWN, csr(OWN))
    chain = load_certs_pem(chain_pem)
    assert chain[0] == leaf and chain[1] == fac.intermediate
    assert str(verify_svid(chain, fac.bundle)) == OWN
    assert issuer.counters == {"issued": 1}


@pytest.mark.parametrize("identity,request_for,reason", [
    (OTHER, OTHER, "not_on_node"),                                  # another node's pod
    ("spiffe://other.domain/ns/shop/sa/web", "spiffe://other.domain/ns/shop/sa/web",
     "wrong_trust_domain"),
    ("spiffe://cluster.local/ns/../sa/web", OWN, "bad_spiffe_id"),
])
def test_refuses_and_counts(issuer, caplog, identity, request_for, reason):
    with caplog.at_level(logging.WARNING, "meshlet.identity"):
        with pytest.raises(IssueError) as ei:
            issuer.sign(identity, csr(request_for))
    assert ei.value.reason == reason
    assert issuer.counters == {f"refused_{reason}": 1}
    assert f"refused certificate request: {reason}" in caplog.text


def test_csr_for_another_identity_is_refused(issuer):
    with pytest.raises(IssueError) as ei:
        issuer.sign(OWN, csr(OTHER))
    assert ei.value.reason in ("wrong_identity", "bad_csr")


def test_garbage_csr_is_refused(issuer):
    with pytest.raises(IssueError) as ei:
        issuer.sign(OWN, b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n")
    assert ei.value.reason in ("bad_csr", "wrong_identity", "bad_spiffe_id")


def write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_load_material_checks_files(fac, tmp_path):
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    bundle = write(tmp_path / "bundle.pem", pem(fac.root))
    cert = write(tmp_path / "ca.pem", pem(fac.intermediate))
    key = write(tmp_path / "ca-key.pem", fac.key_pem(fac.intermediate_key))
    mat = load_material("cluster.local", bundle, cert, key)
    assert mat.ca_cert == fac.intermediate and mat.bundle.roots == (fac.root,)

    wrong_key = write(tmp_path / "other-key.pem", fac.key_pem(generate_key()))
    with pytest.raises(IdentityFilesError, match="is not the key of"):
        load_material("cluster.local", bundle, cert, wrong_key)
    leaf_chain, leaf_key = fac.leaf(fac.spiffe_id())
    not_ca = write(tmp_path / "leaf.pem", pem(leaf_chain[0]))
    with pytest.raises(IdentityFilesError, match="not a CA certificate"):
        load_material("cluster.local", bundle, not_ca, write(tmp_path / "lk.pem",
                                                               fac.key_pem(leaf_key)))
    with pytest.raises(IdentityFilesError, match="meshlet ca init"):
        load_material("cluster.local", str(tmp_path / "missing.pem"), cert, key)
    with pytest.raises(IdentityFilesError, match="not a PEM"):
        load_material("cluster.local", write(tmp_path / "junk.pem", b"junk"), cert, key)
