"""`fedllm certs`: a CA, a server certificate that real TLS accepts, node keys; no overwrites."""

import socket
import ssl
import stat
import subprocess
import sys
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedllm.certs import CertError, make_deployment_credentials


def certs(*args):
    return subprocess.run([sys.executable, "-m", "fedllm.cli", "certs", *args],
                          capture_output=True, text=True, timeout=120)


def test_files_permissions_and_san(tmp_path):
    out = tmp_path / "creds"
    proc = certs(str(out), "--server-host", "superlink.example.org", "--server-host",
                 "127.0.0.1,localhost", "--nodes", "2")
    assert proc.returncode == 0, proc.stderr
    for name in ("ca.key", "server.key", "node-0.key", "node-1.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(v.value) for v in san} == {"superlink.example.org", "127.0.0.1", "localhost"}
    assert (out / "node-0.key").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    pub = (out / "node-1.pub").read_bytes()
    assert pub.startswith(b"ecdsa-sha2-nistp384 ")
    serialization.load_ssh_public_key(pub)


def test_rerun_never_overwrites_and_adds_missing_nodes(tmp_path):
    out = tmp_path / "creds"
    make_deployment_credentials(out, ["localhost"], 1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    report = make_deployment_credentials(out, ["localhost"], 3)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert all(after[name] == data for name, data in before.items())
    assert {p.name for p in report.created} == {"node-1.key", "node-1.pub", "node-2.key",
                                                "node-2.pub"}
    with pytest.raises(CertError, match="does not cover"):
        make_deployment_credentials(out, ["other-host"], 1)
    (out / "node-0.pub").unlink()  # the public half is re-derived from the kept private key
    make_deployment_credentials(out, ["localhost"], 1)
    assert (out / "node-0.pub").read_bytes() == before["node-0.pub"]
    (out / "ca.crt").unlink()
    with pytest.raises(CertError, match="half of the CA"):
        make_deployment_credentials(out, ["localhost"], 1)


def _tls_server(cert_dir, ready, result):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_dir / "server.crt", cert_dir / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as sock:
        result["port"] = sock.getsockname()[1]
        ready.set()
        sock.settimeout(10)
        for _ in range(2):
            try:
                conn, _ = sock.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                continue


def test_real_tls_handshake_trusts_only_our_ca(tmp_path):
    good, other = tmp_path / "good", tmp_path / "other"
    make_deployment_credentials(good, ["localhost", "127.0.0.1"], 0)
    make_deployment_credentials(other, ["localhost", "127.0.0.1"], 0)
    ready, result = threading.Event(), {}
    thread = threading.Thread(target=_tls_server, args=(good, ready, result), daemon=True)
    thread.start()
    ready.wait(5)
    trusted = ssl.create_default_context(cafile=str(good / "ca.crt"))
    with socket.create_connection(("127.0.0.1", result["port"])) as raw:
        with trusted.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(2) == b"ok"
    untrusted = ssl.create_default_context(cafile=str(other / "ca.crt"))
    with socket.create_connection(("127.0.0.1", result["port"])) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted.wrap_socket(raw, server_hostname="localhost")
    thread.join(10)


def test_bad_input_is_one_line(tmp_path):
    proc = certs(str(tmp_path / "x"), "--server-host", "localhost", "--nodes", "-1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
