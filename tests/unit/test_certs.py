"""SVID issuing and verification: the exact profile, every refusal's reason."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from agent.identity.svid import (
    REASONS, SvidError, TrustBundle, cert_to_pem, generate_key, key_to_pem, load_certs_pem, load_key_pem,
    make_csr, sign_workload_csr, svid_info, verify_svid,
)
from agent.identity.spiffe import SpiffeId, parse_spiffe_id
from tests.support.ca import CertFactory

WEB = parse_spiffe_id("spiffe://example.org/ns/default/sa/web")


@pytest.fixture(scope="module")
def f():
    return CertFactory("example.org")


def _sign(f, csr, expected=WEB, ttl=timedelta(hours=1), now=None):
    return sign_workload_csr(csr, expected=expected, issuer_cert=f.intermediate, issuer_key=f.intermediate_key,
                             ttl=ttl, now=now or f.now)


def _ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


# --- keys, PEM, CSR ------------------------------------------------------------

def test_keys_and_pem_round_trip(f):
    key = generate_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert load_key_pem(key_to_pem(key)).private_numbers() == key.private_numbers()
    chain, _ = f.leaf()
    assert load_certs_pem(cert_to_pem(chain[0]) + cert_to_pem(chain[1])) == chain
    with pytest.raises(ValueError, match="BEGIN CERTIFICATE"):
        load_certs_pem(b"not pem")


def test_csr_has_exactly_one_uri_san_and_nothing_else():
    key = generate_key()
    csr = x509.load_pem_x509_csr(make_csr(WEB, key))
    assert csr.is_signature_valid
    assert list(csr.subject) == []
    assert [e.oid for e in csr.extensions] == [ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert list(_ext(csr, x509.SubjectAlternativeName).value) == [x509.UniformResourceIdentifier(str(WEB))]
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()


# --- sign_workload_csr: the profile ----------------------------------------------

def test_signed_svid_has_exactly_the_profile(f):
    key = generate_key()
    cert = _sign(f, make_csr(WEB, key), ttl=timedelta(hours=2))

    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.issuer == f.intermediate.subject
    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet")])
    assert not cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert 0 < cert.serial_number < 2**128
    assert cert.not_valid_before_utc == (f.now - timedelta(minutes=1)).replace(microsecond=0)
    assert cert.not_valid_after_utc == (f.now + timedelta(hours=2)).replace(microsecond=0)

    ext = {e.oid: e for e in cert.extensions}
    assert set(ext) == {ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.BASIC_CONSTRAINTS,
                        ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE,
                        ExtensionOID.SUBJECT_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_KEY_IDENTIFIER}
    san = ext[ExtensionOID.SUBJECT_ALTERNATIVE_NAME]
    assert list(san.value) == [x509.UniformResourceIdentifier(str(WEB))] and not san.critical
    bc = ext[ExtensionOID.BASIC_CONSTRAINTS]
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = ext[ExtensionOID.KEY_USAGE]
    assert ku.critical
    assert (ku.value.digital_signature, ku.value.content_commitment, ku.value.key_encipherment,
            ku.value.data_encipherment, ku.value.key_agreement, ku.value.key_cert_sign,
            ku.value.crl_sign) == (True, False, False, False, False, False, False)
    eku = ext[ExtensionOID.EXTENDED_KEY_USAGE]
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not eku.critical
    assert ext[ExtensionOID.SUBJECT_KEY_IDENTIFIER].value == x509.SubjectKeyIdentifier.from_public_key(
        key.public_key())
    assert ext[ExtensionOID.AUTHORITY_KEY_IDENTIFIER].value.key_identifier == _ext(
        f.intermediate, x509.SubjectKeyIdentifier).value.digest

    assert verify_svid([cert, f.intermediate], f.bundle, now=f.now, expected=WEB) == WEB


def test_signed_svid_passes_an_independent_strict_verifier():
    # cryptography's RFC 5280 verifier (no URI name constraints support, so a
    # hierarchy without them) must accept the profile as a client certificate
    f = CertFactory(name_constraints=False)
    cert = _sign(f, make_csr(WEB, generate_key()))
    verifier = PolicyBuilder().store(Store([f.root])).time(f.now).build_client_verifier()
    verified = verifier.verify(cert, [f.intermediate])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WEB))]


def test_rsa_key_gets_key_encipherment_too(f):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = _sign(f, make_csr(WEB, key))
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert verify_svid([cert, f.intermediate], f.bundle, now=f.now) == WEB


def test_validity_is_capped_by_the_issuer(f):
    cert = _sign(f, make_csr(WEB, generate_key()), ttl=timedelta(days=3650))
    assert cert.not_valid_after_utc == f.intermediate.not_valid_after_utc


def test_serials_are_random(f):
    csr = make_csr(WEB, generate_key())
    assert len({_sign(f, csr).serial_number for _ in range(8)}) == 8


# --- sign_workload_csr: refusals -------------------------------------------------

def test_refuses_a_csr_for_another_identity(f):
    csr = make_csr(parse_spiffe_id("spiffe://example.org/ns/default/sa/admin"), generate_key())
    with pytest.raises(SvidError) as ei:
        _sign(f, csr)
    assert ei.value.reason == "wrong_identity" and "admin" in str(ei.value)


def _csr_with_sans(names, key=None):
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key or generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("names", [
    [x509.UniformResourceIdentifier(str(WEB)), x509.UniformResourceIdentifier("spiffe://example.org/x")],
    [x509.UniformResourceIdentifier(str(WEB)), x509.UniformResourceIdentifier(str(WEB))],
    [x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("web.default.svc")],
    [x509.DNSName(str(WEB))],
], ids=["two-uris", "same-uri-twice", "uri-and-dns", "dns-only"])
def test_refuses_a_csr_without_exactly_one_uri_san(f, names):
    with pytest.raises(SvidError) as ei:
        _sign(f, _csr_with_sans(names))
    assert ei.value.reason == "wrong_identity"


def test_refuses_a_csr_without_sans(f):
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(SvidError, match="wrong_identity"):
        _sign(f, csr)


def test_refuses_a_csr_with_a_malformed_spiffe_id(f):
    with pytest.raises(SvidError) as ei:
        _sign(f, _csr_with_sans([x509.UniformResourceIdentifier("spiffe://example.org/ns/../sa/web")]))
    assert ei.value.reason == "bad_spiffe_id"


def test_refuses_a_csr_with_a_bad_signature(f):
    # same request, signature from another key: proof of possession fails
    good = x509.load_pem_x509_csr(make_csr(WEB, generate_key()))
    other = x509.load_pem_x509_csr(make_csr(WEB, generate_key()))
    der = good.public_bytes(serialization.Encoding.DER)
    good_sig, other_sig = good.signature, other.signature
    forged_der = der.replace(good_sig, other_sig) if len(good_sig) == len(other_sig) else None
    if forged_der is None:  # ECDSA signature lengths vary; flip a bit of the signature instead
        i = der.rindex(good_sig) + len(good_sig) - 1
        forged_der = der[:i] + bytes([der[i] ^ 1]) + der[i + 1:]
    forged = x509.load_der_x509_csr(forged_der)
    assert not forged.is_signature_valid
    with pytest.raises(SvidError) as ei:
        _sign(f, forged.public_bytes(serialization.Encoding.PEM))
    assert ei.value.reason == "wrong_identity" and "signature" in ei.value.detail


def test_refuses_garbage(f):
    with pytest.raises(SvidError) as ei:
        _sign(f, b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")
    assert ei.value.reason == "bad_csr"


def test_refuses_trust_domain_id_and_ids_outside_the_name_constraints(f):
    td_id = SpiffeId("example.org", "")
    with pytest.raises(SvidError, match="bad_spiffe_id"):
        _sign(f, make_csr(td_id, generate_key()), expected=td_id)
    other = parse_spiffe_id("spiffe://other.org/ns/default/sa/web")
    with pytest.raises(SvidError) as ei:
        _sign(f, make_csr(other, generate_key()), expected=other)
    assert ei.value.reason == "wrong_trust_domain"


def test_refuses_when_the_issuer_has_expired(f):
    with pytest.raises(SvidError, match="expired"):
        _sign(f, make_csr(WEB, generate_key()), now=f.intermediate.not_valid_after_utc + timedelta(seconds=1))


def test_refuses_a_mismatched_issuer_key_and_naive_time(f):
    with pytest.raises(ValueError, match="does not belong"):
        sign_workload_csr(make_csr(WEB, generate_key()), expected=WEB, issuer_cert=f.intermediate,
                          issuer_key=f.root_key, ttl=timedelta(hours=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        _sign(f, make_csr(WEB, generate_key()), now=f.now.replace(tzinfo=None))


# --- verify_svid ----------------------------------------------------------------

def test_accepts_a_good_chain(f):
    chain, _ = f.leaf(WEB)
    assert verify_svid(chain, f.bundle, now=f.now) == WEB
    assert verify_svid(chain, f.bundle, now=f.now, expected=WEB) == WEB


def test_accepts_leaf_signed_by_root_root_sent_along_and_intermediates_out_of_order(f):
    chain, _ = f.leaf(WEB, issuer=f.root_issuer)
    assert verify_svid(chain, f.bundle, now=f.now) == WEB
    chain, _ = f.leaf(WEB)
    assert verify_svid(chain + [f.root], f.bundle, now=f.now) == WEB
    unrelated = f.foreign().intermediate
    assert verify_svid([chain[0], unrelated, f.root, chain[1]], f.bundle, now=f.now) == WEB


@pytest.mark.parametrize("variant", sorted(CertFactory.BAD))
def test_rejects_every_bad_variant_with_its_reason(f, variant):
    chain, _ = f.bad(variant)
    with pytest.raises(SvidError) as ei:
        verify_svid(chain, f.bundle, now=f.now)
    assert ei.value.reason == CertFactory.BAD[variant], str(ei.value)
    assert str(ei.value) == f"{ei.value.reason}: {ei.value.detail}"
    assert ei.value.reason in REASONS


def test_every_reason_code_for_verification_is_covered():
    assert set(CertFactory.BAD.values()) | {"wrong_identity", "bad_csr"} == REASONS


def test_rejects_the_wrong_identity(f):
    chain, _ = f.leaf(WEB)
    with pytest.raises(SvidError) as ei:
        verify_svid(chain, f.bundle, now=f.now, expected=parse_spiffe_id("spiffe://example.org/ns/default/sa/db"))
    assert ei.value.reason == "wrong_identity"


def test_validity_edges_and_time(f):
    chain, _ = f.leaf(WEB)
    leaf = chain[0]
    assert verify_svid(chain, f.bundle, now=leaf.not_valid_after_utc) == WEB
    assert verify_svid(chain, f.bundle, now=leaf.not_valid_before_utc) == WEB
    with pytest.raises(SvidError, match="^expired"):
        verify_svid(chain, f.bundle, now=leaf.not_valid_after_utc + timedelta(seconds=1))
    with pytest.raises(SvidError, match="^not_yet_valid"):
        verify_svid(chain, f.bundle, now=leaf.not_valid_before_utc - timedelta(seconds=1))


def test_signatures_are_checked_not_just_names(f):
    # a leaf whose bytes were tampered with after signing must not verify,
    # even though every name and extension still lines up
    chain, _ = f.leaf(WEB)
    der = chain[0].public_bytes(serialization.Encoding.DER)
    sig = chain[0].signature
    i = der.rindex(sig) + len(sig) - 1
    tampered = x509.load_der_x509_certificate(der[:i] + bytes([der[i] ^ 1]) + der[i + 1:])
    with pytest.raises(SvidError) as ei:
        verify_svid([tampered, chain[1]], f.bundle, now=f.now)
    assert ei.value.reason == "unknown_ca"


def test_a_foreign_ca_with_identical_names_is_unknown(f):
    twin = f.foreign()
    assert twin.root.subject == f.root.subject and twin.intermediate.subject == f.intermediate.subject
    chain, _ = twin.leaf(WEB)
    with pytest.raises(SvidError, match="^unknown_ca"):
        verify_svid(chain, f.bundle, now=f.now)
    # nor does sending our own intermediate along help
    with pytest.raises(SvidError, match="^unknown_ca"):
        verify_svid(chain + [f.intermediate], f.bundle, now=f.now)


def test_name_constraints_are_enforced(f):
    # the intermediate permits only example.org; a leaf for another trust
    # domain under it fails even against a bundle for that domain
    chain, _ = f.leaf("spiffe://other.org/ns/default/sa/web")
    other_bundle = TrustBundle("other.org", (f.root,))
    with pytest.raises(SvidError) as ei:
        verify_svid(chain, other_bundle, now=f.now)
    assert ei.value.reason == "bad_chain" and "does not permit" in ei.value.detail


def test_unknown_critical_extension_is_refused(f):
    key = generate_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([])).issuer_name(f.intermediate.subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(f.now - timedelta(minutes=1))
            .not_valid_after(f.now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(WEB))]), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), True)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                           critical=True)
            .sign(f.intermediate_key, hashes.SHA256()))
    with pytest.raises(SvidError, match="^bad_chain: .*unsupported critical extension"):
        verify_svid([cert, f.intermediate], f.bundle, now=f.now)


def test_empty_chain(f):
    with pytest.raises(SvidError, match="^bad_chain"):
        verify_svid([], f.bundle, now=f.now)


# --- trust bundles ------------------------------------------------------------------

def test_bundle_with_two_roots_accepts_leaves_under_either(f):
    g = f.foreign(name="second")
    bundle = TrustBundle.from_pem("example.org", f.bundle.to_pem() + g.bundle.to_pem())
    assert len(bundle.roots) == 2
    for factory in (f, g):
        chain, _ = factory.leaf(WEB)
        assert verify_svid(chain, bundle, now=f.now) == WEB
    chain, _ = CertFactory(now=f.now).leaf(WEB)
    with pytest.raises(SvidError, match="^unknown_ca"):
        verify_svid(chain, bundle, now=f.now)


def test_bundle_fingerprint_is_stable_and_tracks_the_roots(f):
    g = f.foreign()
    ab = TrustBundle("example.org", (f.root, g.root))
    ba = TrustBundle("example.org", (g.root, f.root))
    assert ab.fingerprint() == ba.fingerprint() == TrustBundle.from_pem("example.org", ab.to_pem()).fingerprint()
    assert TrustBundle("example.org", (f.root, f.root, g.root)).fingerprint() == ab.fingerprint()
    assert len(TrustBundle("example.org", (f.root, f.root)).roots) == 1
    assert f.bundle.fingerprint() != ab.fingerprint() != g.bundle.fingerprint()
    assert len(ab.fingerprint()) == 64
    assert TrustBundle.from_pem("example.org", ab.to_pem()).roots == ab.roots


def test_bundle_validates_its_trust_domain(f):
    with pytest.raises(ValueError):
        TrustBundle("Example.org", (f.root,))


# --- svid_info --------------------------------------------------------------------

def test_svid_info(f):
    chain, _ = f.leaf(WEB)
    info = svid_info(chain[0])
    assert info == {
        "spiffe_id": str(WEB),
        "serial": format(chain[0].serial_number, "x"),
        "not_before": chain[0].not_valid_before_utc.isoformat(),
        "not_after": chain[0].not_valid_after_utc.isoformat(),
        "issuer": f.intermediate.subject.rfc4514_string(),
    }
    assert svid_info(f.root)["spiffe_id"] is None
