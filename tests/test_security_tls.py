"""TLS on the collector, verification on the agent, and client certificates (mutual TLS).

The certificates are made here, at test time, with the ``cryptography`` package.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpufleet.agent.push import Pusher
from gpufleet.collector.service import Collector, CollectorSettings
from gpufleet.core import remote_write as rw
from tests.conftest import free_port


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key, cert) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(path: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(path, key, cert)
    return key, cert


def make_leaf(path: Path, cn: str, ca_key, ca_cert, *, server: bool) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    _write(path, key, b.sign(ca_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca = make_ca(d / "ca", "gpufleet test CA")
    make_leaf(d / "collector", "collector", ca_key, ca, server=True)
    make_leaf(d / "agent", "gpu-node-1", ca_key, ca, server=False)
    other_key, other = make_ca(d / "other-ca", "someone else")
    make_leaf(d / "stranger", "stranger", other_key, other, server=False)
    return d


def push_once(url: str, tmp: Path, **tls) -> tuple[bool, str | None]:
    p = Pusher(url, **tls)
    now = int(time.time() * 1000)
    p._queue.append(
        (rw.encode([rw.Series({"__name__": "gpufleet_gpu_up", "uuid": "GPU-1"}, [(now, 1.0)])]), 1, False)
    )
    return p.flush(), p.last_error


def test_an_agent_pushes_over_https_only_to_a_collector_its_ca_vouches_for(pki, tmp_path):
    port = free_port()
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}",
            db=f"sqlite:///{tmp_path}/t.db",
            tls_cert=str(pki / "collector.crt"),
            tls_key=str(pki / "collector.key"),
        )
    ).start()
    try:
        url = f"https://127.0.0.1:{port}"
        ok, err = push_once(url, tmp_path)  # the system CAs do not know the test CA
        assert not ok and "CERTIFICATE_VERIFY_FAILED" in err
        ok, err = push_once(url, tmp_path, ca_bundle=str(pki / "other-ca.crt"))
        assert not ok and "CERTIFICATE_VERIFY_FAILED" in err
        ok, err = push_once(url, tmp_path, ca_bundle=str(pki / "ca.crt"))
        assert ok, err
        ok, err = push_once(f"http://127.0.0.1:{port}", tmp_path)  # plain HTTP to a TLS port gets nowhere
        assert not ok
        assert c.store.counts()["samples"] == 1
    finally:
        c.close()


def test_with_mutual_tls_only_agents_holding_a_certificate_from_the_client_ca_can_write(pki, tmp_path):
    port = free_port()
    c = Collector(
        CollectorSettings(
            listen=f"127.0.0.1:{port}",
            db=f"sqlite:///{tmp_path}/t.db",
            tls_cert=str(pki / "collector.crt"),
            tls_key=str(pki / "collector.key"),
            tls_client_ca=str(pki / "ca.crt"),
        )
    ).start()
    try:
        url = f"https://127.0.0.1:{port}"
        ca = str(pki / "ca.crt")
        assert not push_once(url, tmp_path, ca_bundle=ca)[0]
        assert not push_once(
            url,
            tmp_path,
            ca_bundle=ca,
            client_cert=str(pki / "stranger.crt"),
            client_key=str(pki / "stranger.key"),
        )[0]
        ok, err = push_once(
            url, tmp_path, ca_bundle=ca, client_cert=str(pki / "agent.crt"), client_key=str(pki / "agent.key")
        )
        assert ok, err
        assert c.store.counts()["samples"] == 1
    finally:
        c.close()


def test_unusable_tls_files_stop_the_collector_with_a_clear_error(pki, tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    for kw, match in (
        ({"tls_cert": str(pki / "collector.crt")}, "go together"),
        ({"tls_cert": str(bad), "tls_key": str(bad)}, "cannot use the TLS files"),
        ({"tls_client_ca": str(pki / "ca.crt")}, "needs --tls-cert"),
    ):
        with pytest.raises(ValueError, match=match):
            Collector(CollectorSettings(listen="127.0.0.1:1", db=f"sqlite:///{tmp_path}/t.db", **kw))
