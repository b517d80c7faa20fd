"""TLS files and SuperNode keys for Flower's deployment runtime.

A self-signed CA with a server certificate for the SuperLink, and EC key pairs for
SuperNode authentication. Private keys are written to new files readable by their
owner only; fedsim never overwrites a key.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsim.deployment.errors import DeploymentError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """A CA certificate and the server certificate and key it signed (PEM files)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the form `flower-superlink --ssl-keyfile` reads."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_alternative_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    """IP addresses as IP entries, anything else as a DNS name."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_tls_files(
    directory: Path, hosts: Sequence[str] = LOOPBACK_HOSTS, days: int = 365
) -> TlsFiles:
    """A self-signed CA and a server certificate for `hosts` (names or IPs), for local use.

    SuperNodes and `flwr` trust `ca.crt`; the SuperLink serves `server.pem` with
    `server.key`. Every address clients dial must be among `hosts`.
    """
    if not hosts:
        raise DeploymentError("hosts: give at least one name or IP address for the certificate")
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsim local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(_subject_alternative_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_secret(files.server_key, _private_key_pem(server_key))
    return files


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair: the private key stays on the node, the public one is registered."""

    private: Path
    public: Path


def make_node_key(directory: Path, name: str) -> NodeKey:
    """An EC (SECP384R1) key pair in OpenSSH format, the form SuperNode authentication reads."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pair = NodeKey(directory / name, directory / f"{name}.pub")
    if pair.public.exists():
        raise DeploymentError(f"{pair.public} exists; fedsim never overwrites a key")
    _write_secret(
        pair.private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pair.public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return pair


def _write_secret(path: Path, data: bytes) -> None:
    """Create a new file readable by its owner only; never follow a link or reuse a file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as err:
        raise DeploymentError(f"{path} exists; fedsim never overwrites a key") from err
    with os.fdopen(fd, "wb") as file:
        file.write(data)
