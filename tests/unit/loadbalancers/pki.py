"""A small certificate authority for tests: keys and certificates made with `cryptography`, PEM out."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

NOW = dt.datetime.now(dt.UTC)


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def key_pem(key: CertificateIssuerPrivateKeyTypes, *, password: bytes | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Issued:
    key: CertificateIssuerPrivateKeyTypes
    cert: x509.Certificate

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)


def issue(common_name: str, *, key: CertificateIssuerPrivateKeyTypes | None = None, issuer: Issued | None = None,
          dns_names: tuple[str, ...] = (), ca: bool = False, not_before: dt.datetime | None = None,
          not_after: dt.datetime | None = None) -> Issued:
    """A certificate for `common_name` signed by `issuer` (self-signed without one)."""
    key = key or ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.cert.subject if issuer else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before or NOW - dt.timedelta(days=1))
               .not_valid_after(not_after or NOW + dt.timedelta(days=90))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns_names:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]),
                                        critical=False)
    signer = issuer.key if issuer else key
    return Issued(key=key, cert=builder.sign(signer, hashes.SHA256()))


def chain(*names: str, leaf_key: CertificateIssuerPrivateKeyTypes | None = None) -> tuple[Issued, Issued, Issued]:
    """A root CA, an intermediate CA and a leaf for `names` (the first is its common name)."""
    root = issue("Test Root CA", ca=True)
    intermediate = issue("Test Intermediate CA", issuer=root, ca=True)
    leaf = issue(names[0], key=leaf_key, issuer=intermediate, dns_names=names)
    return root, intermediate, leaf


def server_pem(*names: str) -> tuple[str, str]:
    """(chain PEM leaf first, key PEM) of a leaf for `names` under a fresh two-level CA."""
    _, intermediate, leaf = chain(*names)
    return leaf.cert_pem + intermediate.cert_pem, leaf.key_pem
