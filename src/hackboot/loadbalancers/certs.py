"""Validation of an uploaded TLS certificate chain and its private key (pure: no database, no I/O).

What HAProxy would refuse at reload time, or what would break clients, is refused here at upload time with
a reason a user can act on: an unparseable PEM, a key that is not the leaf's, a chain out of order (each
certificate must be signed by the next one), a certificate outside its validity period, a weak key.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import NameOID

MIN_RSA_BITS = 2048
EC_CURVES = ("secp256r1", "secp384r1")
MAX_CHAIN = 10
MAX_PEM_BYTES = 64 * 1024


class CertificateError(ValueError):
    """The chain or the key cannot be used; the message says why."""


@dataclass(frozen=True)
class ParsedCertificate:
    chain_pem: str  # normalised: leaf first, each certificate PEM-encoded once
    key_pem: str  # PKCS#8, unencrypted (HAProxy reads it without a passphrase)
    names: tuple[str, ...]  # the leaf's DNS names (SAN), else its common name
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint_sha256: str  # of the leaf, "AB:CD:…"


def _load_chain(chain_pem: str) -> list[x509.Certificate]:
    if "-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise CertificateError("The chain holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        chain = x509.load_pem_x509_certificates(chain_pem.encode())
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"The chain is not valid PEM: {e}") from None
    if not chain:
        raise CertificateError("The chain holds no certificate")
    if len(chain) > MAX_CHAIN:
        raise CertificateError(f"The chain holds {len(chain)} certificates: at most {MAX_CHAIN}")
    return chain


def _load_key(key_pem: str) -> PrivateKeyTypes:
    if "PRIVATE KEY-----" not in key_pem:
        raise CertificateError("The key is not a PEM private key (-----BEGIN PRIVATE KEY-----)")
    if "ENCRYPTED" in key_pem:
        raise CertificateError("The private key is encrypted: upload it without a passphrase (it is stored sealed)")
    try:
        return serialization.load_pem_private_key(key_pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise CertificateError(f"The private key is not valid PEM: {e}") from None


def _check_key_strength(key: PrivateKeyTypes) -> None:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertificateError(f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} are required")
        return
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in EC_CURVES:
            raise CertificateError(f"EC key on curve {key.curve.name}: P-256 or P-384 are supported")
        return
    raise CertificateError(f"{type(key).__name__.lstrip('_')} keys are not supported: use RSA (2048 bits or more) "
                           "or EC P-256/P-384")


def _public_bytes(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key made `cert`'s signature."""
    if cert.issuer != issuer.subject:
        return False
    public = issuer.public_key()
    try:
        if isinstance(public, rsa.RSAPublicKey):
            if cert.signature_hash_algorithm is None:
                return False
            if isinstance(cert.signature_algorithm_parameters, padding.PSS):
                pad: padding.AsymmetricPadding = cert.signature_algorithm_parameters
            else:
                pad = padding.PKCS1v15()
            public.verify(cert.signature, cert.tbs_certificate_bytes, pad, cert.signature_hash_algorithm)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            if cert.signature_hash_algorithm is None:
                return False
            public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _dns_names(leaf: x509.Certificate) -> tuple[str, ...]:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [str(a.value).lower() for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names))


def parse(chain_pem: str, key_pem: str, *, now: dt.datetime | None = None) -> ParsedCertificate:
    """Check a chain (leaf first) and its private key; raise CertificateError with the reason."""
    if len(chain_pem.encode()) > MAX_PEM_BYTES or len(key_pem.encode()) > MAX_PEM_BYTES:
        raise CertificateError(f"The chain and the key are at most {MAX_PEM_BYTES // 1024} KiB each")
    chain = _load_chain(chain_pem)
    key = _load_key(key_pem)
    _check_key_strength(key)
    leaf = chain[0]
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):  # type: ignore[arg-type]
        raise CertificateError("The private key does not match the certificate (the first of the chain)")
    for position, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        if not _verify_signed_by(cert, issuer):
            raise CertificateError(
                f"Certificate {position + 1} of the chain ({cert.subject.rfc4514_string()}) is not signed by "
                f"certificate {position + 2} ({issuer.subject.rfc4514_string()}): give the leaf first, then each "
                "issuer in order")
    now = now or dt.datetime.now(dt.UTC)
    for position, cert in enumerate(chain):
        what = "The certificate" if position == 0 else f"Certificate {position + 1} of the chain"
        if cert.not_valid_after_utc <= now:
            raise CertificateError(f"{what} expired on {cert.not_valid_after_utc.isoformat()}")
        if cert.not_valid_before_utc > now:
            raise CertificateError(f"{what} is not valid before {cert.not_valid_before_utc.isoformat()}")
    normalised_chain = "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain)
    normalised_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode()
    digest = leaf.fingerprint(hashes.SHA256()).hex().upper()
    return ParsedCertificate(
        chain_pem=normalised_chain, key_pem=normalised_key, names=_dns_names(leaf),
        subject=leaf.subject.rfc4514_string()[:1024], issuer=leaf.issuer.rfc4514_string()[:1024],
        not_before=leaf.not_valid_before_utc, not_after=leaf.not_valid_after_utc,
        fingerprint_sha256=":".join(digest[i:i + 2] for i in range(0, len(digest), 2)))
