"""The instance certificate pair: generated when missing, kept when present, refused when unusable."""

import ssl
import stat
from pathlib import Path

from cryptography import x509

from tokenmill_appliance.portal.tls import ensure_cert_pair, server_context


def test_missing_pair_is_generated_once(tmp_path: Path) -> None:
    cert, key = tmp_path / "etc/instance.crt", tmp_path / "etc/instance.key"
    assert ensure_cert_pair(cert, key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    first = cert.read_bytes()
    assert ensure_cert_pair(cert, key)
    assert cert.read_bytes() == first
    assert isinstance(server_context(cert, key), ssl.SSLContext)


def test_unusable_pair_means_plain_http(tmp_path: Path) -> None:
    cert, key = tmp_path / "instance.crt", tmp_path / "instance.key"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    assert server_context(cert, key) is None
