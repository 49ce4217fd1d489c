"""TLS for the edge: the instance certificate pair (self-signed when missing) and an SSL context."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tokenmill_appliance.settings import atomic_write_text

logger = logging.getLogger(__name__)
CERT_DAYS = 3650


def generate_self_signed(cert_file: Path, key_file: Path, hostnames: list[str] | None = None) -> None:
    """Write a self-signed ECDSA certificate for localhost, 127.0.0.1 and this host's name."""
    names = list(dict.fromkeys(["localhost", socket.gethostname(), *(hostnames or [])]))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenmill instance")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    alt_names += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_text(key_file, key_pem.decode("ascii"), mode=0o600)
    atomic_write_text(cert_file, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))


def ensure_cert_pair(cert_file: Path, key_file: Path) -> bool:
    """Make sure the pair exists, generating a self-signed one when either file is missing.

    Returns False (and logs why) when no usable pair can be had.
    """
    if not (cert_file.exists() and key_file.exists()):
        try:
            generate_self_signed(cert_file, key_file)
            logger.info("generated a self-signed TLS certificate at %s", cert_file)
        except OSError as exc:
            logger.error("cannot write a TLS certificate to %s (%s)", cert_file, exc)
            return False
    return True


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext | None:
    """A server SSL context for the pair, or None (logged) when the pair is missing or unusable."""
    if not ensure_cert_pair(cert_file, key_file):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (ssl.SSLError, OSError) as exc:
        logger.error("the TLS pair %s / %s is not usable (%s): serving plain HTTP", cert_file, key_file, exc)
        return None
    return context
