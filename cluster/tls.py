"""TLS for every gRPC link: client to node, node to node, node to participant.

A node serves TLS with `--tls-cert`/`--tls-key`; `--tls-ca` is the CA it trusts
for its peers (and, with `--tls-require-client-cert`, for its callers' client
certificates); `--participant-tls-ca` makes the coordinator dial participants with
TLS. Clients pass the CA (and a client certificate and key where the node requires
one). `make_dev_certs` (`sagactl certs init DIR`) writes a development CA and
certificates for nodes, clients and participants: for trying it out and for the
tests, not for production, where certificates come from your own CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEV_CERT_DAYS = 365


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the CA to trust, and this side's own certificate and key (a node's
    server certificate, or a client certificate; optional for a client)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def _read(self, path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca),
            private_key=self._read(self.key),
            certificate_chain=self._read(self.cert),
        )

    def server_credentials(self, require_client_cert: bool) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs a certificate and its key")
        return grpc.ssl_server_credentials(
            [(self._read(self.key), self._read(self.cert))],
            root_certificates=self._read(self.ca),
            require_client_auth=require_client_cert,
        )


# ---- a development CA ----------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def make_dev_certs(directory: str, hosts: Sequence[str] = ("127.0.0.1", "localhost")) -> None:
    """Write ca.pem, node.pem/node.key (server and client use, for `hosts`),
    client.pem/client.key and participant.pem/participant.key into `directory`.
    Keys are written with mode 0600."""
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sagacluster development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM))
    uses = {
        "node": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        "participant": [ExtendedKeyUsageOID.SERVER_AUTH],
        "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    }
    for name, usages in uses.items():
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"saga-{name}")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=DEV_CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if ExtendedKeyUsageOID.SERVER_AUTH in usages:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(_names(hosts)), critical=False
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(
            os.path.join(directory, f"{name}.pem"), cert.public_bytes(serialization.Encoding.PEM)
        )
        _write(os.path.join(directory, f"{name}.key"), _pem_key(key), private=True)


def dev_files(directory: str, who: str) -> TlsFiles:
    """The development files of `who` (node, client or participant) in `directory`."""
    return TlsFiles(
        ca=os.path.join(directory, "ca.pem"),
        cert=os.path.join(directory, f"{who}.pem"),
        key=os.path.join(directory, f"{who}.key"),
    )
