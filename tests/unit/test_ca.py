"""The CA on disk: init, nodes, root rotation with overlap, retirement."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509

from agent.identity import ca
from agent.identity.svid import (
    SvidError, TrustBundle, cert_fingerprint, generate_key, load_certs_pem, make_csr, sign_workload_csr,
    verify_svid,
)
from agent.identity.spiffe import workload_id
from cryptography.x509.oid import NameOID

TD = "cluster.local"
WEB = workload_id(TD, "default", "web")
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _bundle(out):
    with open(os.path.join(out, "bundle.pem"), "rb") as f:
        return TrustBundle.from_pem(TD, f.read())


def _leaf(out, node, now=NOW):
    """A workload SVID from the node's intermediate, as the node agent would issue it."""
    issuer, issuer_key = ca.load_node_ca(str(out), node)
    with open(os.path.join(out, "nodes", node, "ca.pem"), "rb") as f:
        sent = load_certs_pem(f.read())
    assert sent == [issuer]  # ca.pem is the intermediate and nothing else
    cert = sign_workload_csr(make_csr(WEB, generate_key()), expected=WEB, issuer_cert=issuer,
                             issuer_key=issuer_key, ttl=timedelta(hours=1), now=now)
    return [cert, issuer]


@pytest.fixture
def out(tmp_path):
    d = str(tmp_path / "ca")
    ca.init_ca(d, TD, ["node1", "node2"], now=NOW)
    return d


def test_init_writes_the_files_with_private_keys_0600(out):
    for name in ("root.pem", "bundle.pem", "ca.json", "nodes/node1/ca.pem", "nodes/node2/ca.pem"):
        assert os.path.isfile(os.path.join(out, name)), name
    keys = ["root-key.pem", "nodes/node1/ca-key.pem", "nodes/node2/ca-key.pem"]
    keys += [n for n in os.listdir(out) if n.endswith("-key.pem")]
    for name in keys:
        assert _mode(os.path.join(out, name)) == 0o600, name
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    state = json.loads(_read(os.path.join(out, "ca.json")))
    assert state["trust_domain"] == TD and len(state["roots"]) == 1


def test_init_ca_layout_and_root_profile(out):
    layout = ca.load_ca(out)
    assert layout.trust_domain == TD and layout.out_dir == out
    assert layout.node_dirs == {"node1": os.path.join(out, "nodes", "node1"),
                                "node2": os.path.join(out, "nodes", "node2")}
    root = layout.root_cert
    assert load_certs_pem(_read(os.path.join(out, "root.pem"))) == [root]
    assert layout.bundle.roots == (root,) and _bundle(out).roots == (root,)
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshlet"
    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"{TD} root 2030-01-02"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert root.public_key().curve.name == "secp256r1"
    assert root.not_valid_after_utc == NOW + timedelta(days=3650)


def test_node_intermediate_profile(out):
    inter, _ = ca.load_node_ca(out, "node1")
    root = ca.load_ca(out).root_cert
    inter.verify_directly_issued_by(root)
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = inter.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    nc = inter.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical and nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]
    assert inter.not_valid_after_utc == NOW + timedelta(days=365)


def test_init_refuses_to_overwrite_unless_forced(out):
    before = _read(os.path.join(out, "root.pem"))
    with pytest.raises(ca.CaError, match="already holds a CA"):
        ca.init_ca(out, TD, ["node1"], now=NOW)
    assert _read(os.path.join(out, "root.pem")) == before
    layout = ca.init_ca(out, TD, ["node3"], now=NOW, force=True)
    assert _read(os.path.join(out, "root.pem")) != before
    assert set(layout.node_dirs) == {"node3"}
    assert len([n for n in os.listdir(out) if n.startswith("root-") and not n.endswith("-key.pem")]) == 1


def test_init_validates_inputs(tmp_path):
    with pytest.raises(ValueError, match="uppercase"):
        ca.init_ca(str(tmp_path / "a"), "Cluster.local", ["n"])
    for bad in ["../x", "", "a/b", ".hidden", "-x"]:
        with pytest.raises(ca.CaError, match="node name"):
            ca.init_ca(str(tmp_path / "b"), TD, [bad])
    with pytest.raises(ca.CaError, match="no meshlet CA"):
        ca.load_ca(str(tmp_path))


def test_leaf_from_node_intermediate_verifies_against_bundle_pem(out):
    for node in ("node1", "node2"):
        assert verify_svid(_leaf(out, node), _bundle(out), now=NOW, expected=WEB) == WEB


def test_node_intermediates_cannot_vouch_for_another_trust_domain(out):
    # the name constraint, end to end: even a bundle for other.org that
    # holds our root refuses what a node intermediate signs for other.org
    from tests.support.ca import CertFactory, Issuer
    issuer, key = ca.load_node_ca(out, "node1")
    f = CertFactory(TD, now=NOW)
    chain, _ = f.leaf("spiffe://other.org/ns/a/sa/b", issuer=Issuer(issuer, key, (issuer,)))
    with pytest.raises(SvidError, match="^bad_chain"):
        verify_svid(chain, TrustBundle("other.org", tuple(_bundle(out).roots)), now=NOW)


def test_add_and_reissue_node(out):
    p = ca.add_node(out, "node3", now=NOW)
    assert p.cert == os.path.join(out, "nodes", "node3", "ca.pem") and _mode(p.key) == 0o600
    assert verify_svid(_leaf(out, "node3"), _bundle(out), now=NOW) == WEB
    with pytest.raises(ca.CaError, match="reissue_node"):
        ca.add_node(out, "node3", now=NOW)
    with pytest.raises(ca.CaError, match="add_node"):
        ca.reissue_node(out, "nope", now=NOW)
    old_leaf = _leaf(out, "node1")
    old_inter, _ = ca.load_node_ca(out, "node1")
    ca.reissue_node(out, "node1", now=NOW)
    new_inter, _ = ca.load_node_ca(out, "node1")
    assert new_inter.serial_number != old_inter.serial_number
    assert new_inter.public_key().public_numbers() != old_inter.public_key().public_numbers()
    # both the old SVID (sent with its old intermediate) and a new one verify
    assert verify_svid(old_leaf, _bundle(out), now=NOW) == WEB
    assert verify_svid(_leaf(out, "node1"), _bundle(out), now=NOW) == WEB


def test_rotate_then_retire(out):
    old_root = ca.load_ca(out).root_cert
    old_leaf = _leaf(out, "node1")            # under an old-root intermediate

    later = NOW + timedelta(minutes=30)
    layout = ca.rotate_root(out, now=later)
    new_root = layout.root_cert
    assert new_root.serial_number != old_root.serial_number
    assert new_root.subject != old_root.subject
    assert set(_bundle(out).roots) == {old_root, new_root} == set(layout.bundle.roots)
    # the old root's files are kept under its serial
    kept = os.path.join(out, f"root-{old_root.serial_number:x}.pem")
    assert load_certs_pem(_read(kept)) == [old_root]
    assert load_certs_pem(_read(os.path.join(out, "root.pem"))) == [new_root]

    ca.reissue_node(out, "node1", now=later)  # new intermediates come from the new root
    ca.add_node(out, "node3", now=later)
    for node in ("node1", "node3"):
        ca.load_node_ca(out, node)[0].verify_directly_issued_by(new_root)
    new_leaf = _leaf(out, "node1", now=later)

    for leaf in (old_leaf, new_leaf):         # overlap: both verify
        assert verify_svid(leaf, _bundle(out), now=later) == WEB

    # node2 still has an old-root intermediate: retiring would strand it
    with pytest.raises(ca.CaError, match="node2"):
        ca.retire_root(out, format(old_root.serial_number, "x"))
    ca.reissue_node(out, "node2", now=later)
    with pytest.raises(ca.CaError, match="current root"):
        ca.retire_root(out, cert_fingerprint(new_root))

    fingerprint_before = _bundle(out).fingerprint()
    ca.retire_root(out, cert_fingerprint(old_root)[:12])
    assert _bundle(out).roots == (new_root,)
    assert _bundle(out).fingerprint() != fingerprint_before
    assert not os.path.exists(os.path.join(out, f"root-{old_root.serial_number:x}-key.pem"))
    assert os.path.exists(kept)
    with pytest.raises(SvidError) as ei:
        verify_svid(old_leaf, _bundle(out), now=later)
    assert ei.value.reason == "unknown_ca"
    assert verify_svid(new_leaf, _bundle(out), now=later) == WEB
    with pytest.raises(ca.CaError, match="already retired"):
        ca.retire_root(out, format(old_root.serial_number, "x"))


def test_retire_force_and_bad_ids(out):
    old_root = ca.load_ca(out).root_cert
    ca.rotate_root(out, now=NOW)
    with pytest.raises(ca.CaError, match="no root matches"):
        ca.retire_root(out, "deadbeefdeadbeef")
    with pytest.raises(ca.CaError, match="neither"):
        ca.retire_root(out, "not-hex")
    ca.retire_root(out, f"0x00{old_root.serial_number:X}", force=True)  # as openssl prints it, any case
    assert ca.load_ca(out).bundle.roots == (ca.load_ca(out).root_cert,)


def test_node_intermediate_validity_is_capped_by_the_root(tmp_path):
    layout = ca.init_ca(str(tmp_path / "c"), TD, ["n"], root_ttl=timedelta(days=10),
                        node_ttl=timedelta(days=100), now=NOW)
    inter, _ = ca.load_node_ca(layout.out_dir, "n")
    assert inter.not_valid_after_utc == layout.root_cert.not_valid_after_utc


def test_without_name_constraints_the_chain_passes_cryptographys_verifier(tmp_path):
    from cryptography.x509.verification import PolicyBuilder, Store
    d = str(tmp_path / "nc")
    ca.init_ca(d, TD, ["n"], now=NOW, name_constraints=False)
    chain = _leaf(d, "n")
    inter, _ = ca.load_node_ca(d, "n")
    with pytest.raises(x509.ExtensionNotFound):
        inter.extensions.get_extension_for_class(x509.NameConstraints)
    verifier = PolicyBuilder().store(Store(list(_bundle(d).roots))).time(NOW).build_client_verifier()
    assert verifier.verify(chain[0], chain[1:]).subjects == [x509.UniformResourceIdentifier(str(WEB))]


# --- key scope: which node issued a leaf (issue #12 item 8) ------------------------


def test_each_leaf_names_the_node_whose_intermediate_issued_it(out):
    from agent.identity.svid import issuing_node, verify_svid_issuer

    bundle = _bundle(out)
    for node in ("node1", "node2"):
        sid, issuer = verify_svid_issuer(_leaf(out, node), bundle, now=NOW)
        assert sid == WEB and issuing_node(issuer, TD) == node
    # the root is no node's CA, nor is an intermediate of another trust domain read as this one's
    layout = ca.load_ca(out)
    assert issuing_node(layout.root_cert, TD) is None
    inter, _ = ca.load_node_ca(out, "node1")
    assert issuing_node(inter, "other.local") is None


def test_a_ca_named_like_a_node_but_allowed_sub_cas_names_no_node(tmp_path):
    from tests.support.ca import CertFactory
    from agent.identity.svid import issuing_node, node_ca_common_name

    f = CertFactory(TD)
    k = generate_key()
    wide = f.ca_cert(node_ca_common_name(TD, "node1"), k, issuer=f.root_issuer, path_length=1)
    assert issuing_node(wide, TD) is None  # a node CA signs leaves only (pathlen 0)
    assert issuing_node(f.node_issuer("node1").cert, TD) == "node1"
    assert issuing_node(f.intermediate, TD) is None  # named "test intermediate"
