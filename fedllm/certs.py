"""Certificates and node keys for a multi-site deployment, made with ``cryptography``.

``make_deployment_credentials(out_dir, server_hosts, nodes)`` writes:
  ca.crt / ca.key            a private certificate authority (the key never leaves the admin)
  server.crt / server.key    the SuperLink's TLS certificate, with every host name / IP the
                             sites use to reach it as subject alternative names
  node-N.key / node-N.pub    one SuperNode authentication key pair per site (ECDSA P-384,
                             OpenSSH format, as Flower's SuperNode authentication expects)
Private keys are written with mode 0600. Existing files are never overwritten: re-running
keeps them and only adds what is missing (e.g. keys for new sites).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class CertError(RuntimeError):
    pass


@dataclass
class CredentialReport:
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def _write(path: Path, data: bytes, private: bool, report: CredentialReport) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # O_EXCL: never overwrite, even in a race
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    report.created.append(path)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path):
    data = path.read_bytes()
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            return serialization.load_ssh_private_key(data, password=None)
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertError(f"{path}: not a readable unencrypted private key ({_reason(exc)}); "
                        "restore it, or move it away deliberately to make a new one") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise CertError(f"{path}: not a readable PEM certificate ({_reason(exc)}); restore "
                        "it, or move it away deliberately to make a new one") from None


def _reason(exc: Exception) -> str:
    """cryptography's message, first sentence (its FAQ link and codes are no use here)."""
    text = " ".join(str(exc).split())
    return text.split(" See https://")[0] or type(exc).__name__


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


MAX_DAYS = 3650 * 10  # certificates must end before the year 9999 (X.509 GeneralizedTime)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(host: str) -> None:
    """An IP address or an ASCII DNS name (a certificate's names are ASCII: an international
    name goes in its IDNA "xn--" form, which is also what clients look up)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if not host.isascii():
        try:
            hint = f"; give its IDNA form {host.encode('idna').decode('ascii')!r}"
        except UnicodeError:
            hint = ""
        raise CertError(f"--server-host {host!r}: not an ASCII host name{hint}")
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if labels[0] == "*" and len(labels) > 1:  # a wildcard name: *.example.org
        labels = labels[1:]
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise CertError(f"--server-host {host!r}: not a host name or IP address (letters, "
                        "digits, '-' and '.' only)")


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _ca(out: Path, days: int, report: CredentialReport):
    key_path, crt_path = out / "ca.key", out / "ca.crt"
    if key_path.exists() and crt_path.exists():
        report.kept += [key_path, crt_path]
        return _load_key(key_path), _load_cert(crt_path)
    if key_path.exists() or crt_path.exists():
        raise CertError(f"{out} has only half of the CA (ca.key / ca.crt); restore the other "
                        "half or move both away deliberately")
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedllm CA"))
            .issuer_name(_name("fedllm CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(key_path, _pem_key(key), True, report)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), False, report)
    return key, cert


def _server(out: Path, hosts: list[str], ca_key, ca_cert, days: int,
            report: CredentialReport) -> None:
    key_path, crt_path = out / "server.key", out / "server.crt"
    if key_path.exists() and crt_path.exists():
        cert = _load_cert(crt_path)
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = []
        have = {str(n.value) for n in names}
        missing = [h for h in hosts if str(_san(h).value) not in have]
        if missing:
            raise CertError(f"existing server.crt does not cover {missing}; move server.crt and "
                            "server.key away deliberately to issue a new one")
        report.kept += [key_path, crt_path]
        return
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(key_path, _pem_key(key), True, report)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), False, report)


def _node_keys(out: Path, index: int, report: CredentialReport) -> None:
    key_path, pub_path = out / f"node-{index}.key", out / f"node-{index}.pub"
    if key_path.exists():
        report.kept.append(key_path)
        if not pub_path.exists():  # the public half can always be re-derived
            pub = _load_key(key_path).public_key()
            _write(pub_path, pub.public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH), False, report)
        else:
            report.kept.append(pub_path)
        return
    key = ec.generate_private_key(ec.SECP384R1())
    # OpenSSH format for both halves: what `flower-supernode --auth-supernode-private-key`
    # and `flwr supernode register` read.
    _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()), True, report)
    _write(pub_path, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH),
           False, report)


def make_deployment_credentials(out_dir: str | Path, server_hosts: list[str], nodes: int,
                                days: int = 365) -> CredentialReport:
    if not server_hosts:
        raise CertError("give at least one --server-host (the name or IP sites connect to)")
    if nodes < 0:
        raise CertError(f"--nodes must be >= 0, got {nodes}")
    if not 1 <= days <= MAX_DAYS:
        raise CertError(f"--days must be from 1 to {MAX_DAYS}, got {days}")
    for host in server_hosts:
        check_host(host)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CertError(f"{out} exists and is not a directory")
    if not out.is_dir():
        out.mkdir(parents=True)
        os.chmod(out, 0o700)  # only a directory made here: an existing one keeps its mode
    report = CredentialReport()
    ca_key, ca_cert = _ca(out, days, report)
    # The SuperLink's own SuperExec connects to it over 127.0.0.1: always a valid name.
    hosts = list(dict.fromkeys([*server_hosts, "127.0.0.1", "localhost"]))
    _server(out, hosts, ca_key, ca_cert, days, report)
    for i in range(nodes):
        _node_keys(out, i, report)
    return report
