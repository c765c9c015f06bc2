"""The host's TLS certificate (XAPI's /etc/xensource/xapi-ssl.pem): self-signed, made once per root."""

import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def host_certificate(cert_dir, hostname, address):
    """(PEM text, key path, cert path), creating a self-signed certificate if none exists yet."""
    os.makedirs(cert_dir, exist_ok=True)
    cert_path = os.path.join(cert_dir, "host-cert.pem")
    key_path = os.path.join(cert_dir, "host-key.pem")
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
        now = datetime.datetime.now(datetime.timezone.utc)
        alt = [x509.DNSName(hostname)]
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            alt.append(x509.DNSName(address))
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        tmp = key_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        os.replace(tmp, key_path)
        tmp = cert_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(tmp, cert_path)
    with open(cert_path) as f:
        return f.read(), key_path, cert_path


def server_context(cert_path, key_path):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def fingerprint(pem_or_der):
    """SHA-256 fingerprint (hex) of a certificate given as PEM text or DER bytes."""
    if isinstance(pem_or_der, str):
        pem_or_der = ssl.PEM_cert_to_DER_cert(pem_or_der)
    import hashlib

    return hashlib.sha256(pem_or_der).hexdigest()
