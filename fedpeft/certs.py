"""TLS certificates and client authentication keys for a deployment, made with ``cryptography``.

``make_certs(DIR, hosts, clients)`` writes:

- ``ca.pem`` / ``ca.key``: a self-signed certificate authority (copy ``ca.pem`` to every client);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  the given host names and IP addresses;
- ``clients/<name>`` / ``clients/<name>.pub``: one EC P-384 key pair per client in OpenSSH format,
  as Flower's SuperNode authentication expects; the server registers the ``.pub`` files, each
  client keeps its private key.

Private keys are written with mode 0600, through a temporary file and a rename.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import UserError

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CLIENTS_DIR = "clients"
CURVE = ec.SECP384R1()
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CertsError(UserError):
    """Certificates or keys that cannot be made or found; the message says what to do."""


@dataclass(frozen=True)
class CertsLayout:
    """Where ``make_certs`` put things (and where the server and clients look for them)."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    def client_key(self, name: str) -> Path:
        return self.root / CLIENTS_DIR / name

    def client_public_keys(self) -> list[Path]:
        """Every client public key in the directory, sorted by name."""
        return sorted((self.root / CLIENTS_DIR).glob("*.pub"))

    def check_server_files(self) -> None:
        for path in (self.ca_cert, self.server_cert, self.server_key):
            if not path.is_file():
                raise CertsError(f"{path} is missing; create it with `fedpeft certs {self.root}`")
        if not self.client_public_keys():
            raise CertsError(
                f"no client public keys in {self.root / CLIENTS_DIR}; add clients with "
                f"`fedpeft certs {self.root} --clients NAME ...`"
            )


def make_certs(directory: Path, hosts: list[str], clients: list[str], *, days: int = 365) -> CertsLayout:
    """Create (or extend) a certificate directory. An existing CA is reused, so clients can be
    added later; the server certificate is issued for ``hosts`` plus ``localhost`` and
    ``127.0.0.1`` (the server reaches its own Control API on loopback) when there is none yet or
    when ``hosts`` are given, and kept otherwise (adding a client must not reissue it for
    localhost only, locking remote clients out); existing client keys are kept."""
    layout = CertsLayout(Path(directory))
    for name in clients:
        if not CLIENT_NAME.match(name):
            raise CertsError(f"client name {name!r} must be letters, digits, '.', '_' or '-'")
    reissue = bool(hosts) or not layout.server_cert.is_file()
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    (layout.root / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _load_or_make_ca(layout, days)
    if reissue:
        _issue_server_cert(layout, ca_key, ca_cert, hosts, days)
    for name in clients:
        if not layout.client_key(name).is_file():
            _make_client_key(layout, name)
    return layout


def _load_or_make_ca(layout: CertsLayout, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key_path = layout.root / CA_KEY
    if ca_key_path.is_file() and layout.ca_cert.is_file():
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedpeft CA")])
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    _write(ca_key_path, _pem_private(key), mode=0o600)
    _write(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _issue_server_cert(
    layout: CertsLayout,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    days: int,
) -> None:
    key = ec.generate_private_key(CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(layout.server_key, _pem_private(key), mode=0o600)
    _write(layout.server_cert, cert.public_bytes(serialization.Encoding.PEM))


def _make_client_key(layout: CertsLayout, name: str) -> None:
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(layout.client_key(name), private, mode=0o600)
    _write(layout.client_key(name).with_name(f"{name}.pub"), public + f" {name}\n".encode())


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write through a temporary file and a rename; a secret (``mode=0o600``) is created with that
    mode, so it is never briefly readable by others."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A short name for a client key that the server's and the client's logs both print: the
    first 16 hex digits of the SHA-256 of its DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()[:16]


def key_id_of_file(path: Path) -> str:
    """``key_id`` of a client's private key file as ``make_certs`` writes it (OpenSSH format)."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    return key_id(key.public_key())  # type: ignore[arg-type]
