"""`fedpeft certs`: a CA, a server certificate for the given hosts, client keys as Flower wants them."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedpeft.certs import CertsError, CertsLayout, make_certs
from fedpeft.cli import main


def test_certs_are_signed_by_the_ca_for_the_given_hosts(tmp_path):
    layout = make_certs(tmp_path, ["fl.example.org", "192.0.2.10"], ["alice", "bob"])
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_keys_are_openssh_p384_and_private_files_are_owner_only(tmp_path):
    layout = make_certs(tmp_path, [], ["alice"])
    private = load_ssh_private_key(layout.client_key("alice").read_bytes(), None)
    public = load_ssh_public_key((tmp_path / "clients" / "alice.pub").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    for path in (layout.client_key("alice"), layout.server_key, tmp_path / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(layout.ca_cert.stat().st_mode) == 0o644


def test_adding_clients_keeps_the_ca_and_existing_keys(tmp_path):
    make_certs(tmp_path, [], ["alice"])
    ca, alice = (tmp_path / "ca.pem").read_bytes(), (tmp_path / "clients" / "alice").read_bytes()
    layout = make_certs(tmp_path, [], ["bob"])
    assert (tmp_path / "ca.pem").read_bytes() == ca
    assert (tmp_path / "clients" / "alice").read_bytes() == alice
    assert [p.name for p in layout.client_public_keys()] == ["alice.pub", "bob.pub"]
    x509.load_pem_x509_certificate(layout.server_cert.read_bytes()).verify_directly_issued_by(
        x509.load_pem_x509_certificate(ca)
    )


def test_adding_a_client_without_hosts_keeps_the_server_certificate(tmp_path):
    make_certs(tmp_path, ["fl.example.org"], ["alice"])
    server = (tmp_path / "server.pem").read_bytes()
    make_certs(tmp_path, [], ["bob"])
    assert (tmp_path / "server.pem").read_bytes() == server  # still valid for fl.example.org
    make_certs(tmp_path, ["fl2.example.org"], [])
    names = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes()).extensions
    san = names.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl2.example.org", "localhost"]  # asked for


def test_bad_client_names_and_missing_files_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(CertsError, match="letters, digits"):
        make_certs(tmp_path, [], ["../evil"])
    with pytest.raises(CertsError, match="create it with `fedpeft certs"):
        CertsLayout(tmp_path / "nowhere").check_server_files()
    make_certs(tmp_path / "no-clients", [], [])
    with pytest.raises(CertsError, match="no client public keys"):
        CertsLayout(tmp_path / "no-clients").check_server_files()
    assert main(["certs", str(tmp_path / "cli"), "--clients", "a b"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
