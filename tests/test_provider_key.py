"""The PKCS#11-URI PEM key file: built by the agent, loaded by OpenSSL's pkcs11-provider, signing
on the SoftHSM token in a real TLS handshake that `openssl s_server` verifies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import HELPERS, USER_PIN, ProvisionedPki
from dicom_card_agent.tls.provider import ProviderError, openssl_config, provider_key_pem, uri_from_provider_key_pem
from dicom_card_agent.token.profiles import get_profile
from peers.ports import free_port


def test_pem_round_trips_and_holds_no_pin() -> None:
    uri = "pkcs11:token=alice;serial=4812bee89f63f780;id=%01;type=private"
    pem = provider_key_pem(uri)
    assert pem.startswith(b"-----BEGIN PKCS#11 PROVIDER URI-----\n")
    assert uri_from_provider_key_pem(pem) == uri
    long_uri = "pkcs11:token=" + "x" * 300 + ";type=private"  # DER long-form lengths
    assert uri_from_provider_key_pem(provider_key_pem(long_uri)) == long_uri
    with pytest.raises(ProviderError, match="refusing to write a PIN"):
        provider_key_pem("pkcs11:token=alice?pin-value=123456")


@pytest.mark.parametrize("pem", [b"",
                                 b"-----BEGIN PKCS#11 PROVIDER URI-----\nAAAA\n-----END PKCS#11 PROVIDER URI-----\n",
                                 b"-----BEGIN PKCS#11 PROVIDER URI-----\n!!\n-----END PKCS#11 PROVIDER URI-----\n"])
def test_malformed_pem_is_a_clear_error(pem: bytes) -> None:
    with pytest.raises(ProviderError):
        uri_from_provider_key_pem(pem)


@pytest.fixture(scope="module")
def provider_files(test_pki: ProvisionedPki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("provider")
    profile = get_profile("softhsm2")
    (directory / "openssl.cnf").write_text(openssl_config(profile.installed_module(), profile.provider_quirks))
    for name in ("alice", "bob"):
        (directory / f"{name}.key.pem").write_bytes(provider_key_pem(f"pkcs11:token={name};id=%01;type=private"))
        chain = (test_pki.pki / "clients" / f"{name}.pem").read_bytes() + (test_pki.pki / "issuing-ca.pem").read_bytes()
        (directory / f"{name}-chain.pem").write_bytes(chain)
    return directory


def test_openssl_reads_the_token_public_key_through_the_key_file(test_pki: ProvisionedPki,
                                                                 provider_files: Path) -> None:
    result = subprocess.run(
        ["openssl", "pkey", "-in", str(provider_files / "alice.key.pem"), "-pubout", "-passin", "env:CARD_PIN"],
        capture_output=True, text=True, timeout=30,
        env=test_pki.env(OPENSSL_CONF=str(provider_files / "openssl.cnf"), CARD_PIN=USER_PIN),
    )
    assert result.returncode == 0, result.stderr
    public = load_pem_public_key(result.stdout.encode())  # PKCS#1 or SubjectPublicKeyInfo PEM
    certificate = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "alice.pem").read_bytes())
    assert public.public_numbers() == certificate.public_key().public_numbers()


@pytest.mark.parametrize("identity, max_version, expected", [
    ("alice", None, "TLSv1.3"), ("alice", "TLSv1_2", "TLSv1.2"),
    ("bob", None, "TLSv1.3"), ("bob", "TLSv1_2", "TLSv1.2"),
])
def test_tls_client_auth_signs_on_the_token(test_pki: ProvisionedPki, provider_files: Path, identity: str,
                                            max_version: str | None, expected: str) -> None:
    port = free_port()
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", str(test_pki.pki / "server-chain.pem"),
         "-key", str(test_pki.pki / "server.key"), "-CAfile", str(test_pki.ca_bundle), "-Verify", "3",
         "-verify_return_error", "-naccept", "1", "-rev"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        env=test_pki.env(),
    )
    try:
        assert server.stdout is not None
        banner = [server.stdout.readline() for _ in range(3)]  # ends with ACCEPT once listening
        assert "ACCEPT\n" in banner, banner
        client = subprocess.run(
            [sys.executable, str(HELPERS / "tls_client.py"), str(port), str(provider_files / f"{identity}-chain.pem"),
             str(provider_files / f"{identity}.key.pem"), str(test_pki.ca_bundle),
             *([max_version] if max_version else [])],
            capture_output=True, text=True, timeout=60,
            env=test_pki.env(OPENSSL_CONF=str(provider_files / "openssl.cnf"), CARD_PIN=USER_PIN),
        )
        server_log = server.communicate(timeout=20)[0]
    finally:
        server.kill()
    assert client.returncode == 0, client.stderr + server_log
    version, echoed = client.stdout.splitlines()[:2]
    assert version == expected
    assert echoed == "nekot eht no dengis"  # s_server -rev reversed what the token-authenticated client sent
    common_name = {"alice": "Alice Example", "bob": "Bob Example"}[identity]
    assert f"CN = {common_name}" in server_log or f"CN={common_name}" in server_log, server_log
