"""Certificate upload validation: what parses, what matches, what is in order, valid and strong enough."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hackboot.loadbalancers import certs
from tests.unit.loadbalancers import pki


def refused(chain_pem: str, key_pem: str, reason: str) -> None:
    with pytest.raises(certs.CertificateError) as err:
        certs.parse(chain_pem, key_pem)
    assert reason in str(err.value), str(err.value)


def test_a_chain_in_order_with_its_key_is_accepted_and_described() -> None:
    root, intermediate, leaf = pki.chain("www.example.com", "api.example.com")
    parsed = certs.parse(leaf.cert_pem + intermediate.cert_pem, leaf.key_pem)
    assert parsed.names == ("www.example.com", "api.example.com")
    assert parsed.subject == "CN=www.example.com" and parsed.issuer == "CN=Test Intermediate CA"
    digest = leaf.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert parsed.fingerprint_sha256.replace(":", "") == digest and len(parsed.fingerprint_sha256) == 95
    assert parsed.not_before == leaf.cert.not_valid_before_utc and parsed.not_after == leaf.cert.not_valid_after_utc
    # normalised: the same certificates, each once, leaf first; the key as unencrypted PKCS#8
    assert x509.load_pem_x509_certificates(parsed.chain_pem.encode()) == [leaf.cert, intermediate.cert]
    assert parsed.key_pem.startswith("-----BEGIN PRIVATE KEY-----")
    # the root may come along too
    assert certs.parse(leaf.cert_pem + intermediate.cert_pem + root.cert_pem, leaf.key_pem).names[0] == \
        "www.example.com"


def test_rsa_keys_of_2048_bits_and_ec_p384_are_accepted() -> None:
    rsa_leaf = pki.issue("rsa.example.com", key=pki.rsa_key(2048), dns_names=("rsa.example.com",))
    assert certs.parse(rsa_leaf.cert_pem, rsa_leaf.key_pem).names == ("rsa.example.com",)
    p384 = pki.issue("ec.example.com", key=pki.ec_key(ec.SECP384R1()))
    assert certs.parse(p384.cert_pem, p384.key_pem).names == ("ec.example.com",)  # the CN without a SAN


def test_a_key_that_is_not_the_leafs_is_refused() -> None:
    _, intermediate, leaf = pki.chain("www.example.com")
    other = pki.ec_key()
    refused(leaf.cert_pem + intermediate.cert_pem, pki.key_pem(other), "does not match the certificate")
    # the intermediate's key is not the leaf's either
    refused(leaf.cert_pem + intermediate.cert_pem, intermediate.key_pem, "does not match")


def test_a_chain_out_of_order_or_with_a_stranger_is_refused() -> None:
    root, intermediate, leaf = pki.chain("www.example.com")
    refused(leaf.cert_pem + root.cert_pem, leaf.key_pem, "is not signed by certificate 2")
    refused(leaf.cert_pem + root.cert_pem + intermediate.cert_pem, leaf.key_pem, "is not signed by")
    # same issuer name, another key: the signature is what is checked, not the names
    impostor = pki.issue("Test Intermediate CA", issuer=pki.issue("Test Root CA", ca=True), ca=True)
    refused(leaf.cert_pem + impostor.cert_pem, leaf.key_pem, "is not signed by")
    # the intermediate first: the key is the leaf's, which is not first
    refused(intermediate.cert_pem + leaf.cert_pem, leaf.key_pem, "does not match")


def test_expired_and_not_yet_valid_certificates_are_refused() -> None:
    old = pki.issue("old.example.com", not_before=pki.NOW - dt.timedelta(days=100),
                    not_after=pki.NOW - dt.timedelta(days=1))
    refused(old.cert_pem, old.key_pem, "expired on")
    future = pki.issue("future.example.com", not_before=pki.NOW + dt.timedelta(days=2))
    refused(future.cert_pem, future.key_pem, "not valid before")
    # an expired intermediate spoils the chain
    root = pki.issue("Root", ca=True)
    stale = pki.issue("Stale CA", issuer=root, ca=True, not_before=pki.NOW - dt.timedelta(days=10),
                      not_after=pki.NOW - dt.timedelta(hours=1))
    leaf = pki.issue("leaf.example.com", issuer=stale)
    refused(leaf.cert_pem + stale.cert_pem, leaf.key_pem, "Certificate 2 of the chain expired")


def test_weak_or_unsupported_keys_are_refused() -> None:
    weak = pki.issue("weak.example.com", key=pki.rsa_key(1024))
    refused(weak.cert_pem, weak.key_pem, "RSA key of 1024 bits")
    k1 = pki.issue("k1.example.com", key=pki.ec_key(ec.SECP256K1()))
    refused(k1.cert_pem, k1.key_pem, "curve secp256k1")


def test_garbage_and_encrypted_keys_are_refused_with_a_reason() -> None:
    leaf = pki.issue("www.example.com")
    refused("hello", leaf.key_pem, "no PEM certificate")
    refused("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", leaf.key_pem, "not valid PEM")
    refused(leaf.cert_pem, "not a key", "not a PEM private key")
    refused(leaf.cert_pem, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not valid PEM")
    refused(leaf.cert_pem, pki.key_pem(leaf.key, password=b"secret"), "encrypted")
    refused(leaf.cert_pem * 11, leaf.key_pem, "at most 10")
    refused(leaf.cert_pem + "x" * (65 * 1024), leaf.key_pem, "at most 64 KiB")
