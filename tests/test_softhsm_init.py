"""`card-agent softhsm init`: the test PKI and tokens, checked with tools the project did not write."""

from __future__ import annotations

import hashlib
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import USER_PIN, ProvisionedPki, provision

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKENS = ("alice", "bob", "mallory", "expired", "stranger")


def openssl(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)


def first_certificate(path: Path, out: Path) -> Path:
    out.write_bytes(x509.load_pem_x509_certificates(path.read_bytes())[0].public_bytes(Encoding.PEM))
    return out


def test_prints_the_export_line_and_writes_only_inside_dir(test_pki: ProvisionedPki) -> None:
    conf = test_pki.softhsm_conf
    assert conf == test_pki.directory / "softhsm2.conf"
    text = conf.read_text()
    assert f"directories.tokendir = {test_pki.directory / 'tokens'}" in text
    for name in ("root-ca.pem", "issuing-ca.pem", "ca-bundle.pem", "issuing-ca.crl.pem", "server-chain.pem",
                 "server.key", "untrusted-ca.pem", "untrusted-server-chain.pem", "untrusted-server.key"):
        assert (test_pki.pki / name).is_file(), name
    readme = (test_pki.directory / "README.txt").read_text()
    assert "User PIN: 123456" in readme and "SO PIN: 12345678" in readme


@pytest.mark.parametrize("name", ["server.key", "untrusted-server.key", "private/issuing-ca.key"])
def test_private_key_files_are_owner_only(test_pki: ProvisionedPki, name: str) -> None:
    assert stat.S_IMODE((test_pki.pki / name).stat().st_mode) == 0o600


def test_ca_bundle_is_root_then_issuing(test_pki: ProvisionedPki) -> None:
    bundle = x509.load_pem_x509_certificates(test_pki.ca_bundle.read_bytes())
    assert [c.subject.rfc4514_string() for c in bundle] == [
        "CN=Test Root CA,O=Example Hospital Test PKI", "CN=Test Issuing CA,O=Example Hospital Test PKI"]


def test_server_chain_verifies_with_openssl_for_localhost(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    leaf = first_certificate(test_pki.pki / "server-chain.pem", tmp_path / "leaf.pem")
    result = openssl("verify", "-CAfile", test_pki.pki / "root-ca.pem", "-untrusted", test_pki.pki / "issuing-ca.pem",
                     "-purpose", "sslserver", leaf)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr
    hosts = openssl("x509", "-in", leaf, "-noout", "-checkhost", "localhost", "-checkip", "127.0.0.1")
    assert "does match certificate" in hosts.stdout and "NOT" not in hosts.stdout


def test_untrusted_server_does_not_verify_against_the_bundle(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    leaf = first_certificate(test_pki.pki / "untrusted-server-chain.pem", tmp_path / "leaf.pem")
    result = openssl("verify", "-CAfile", test_pki.ca_bundle, leaf)
    assert result.returncode != 0
    assert "unable to get local issuer certificate" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["alice", "bob"])
def test_client_certificates_verify_for_client_auth(test_pki: ProvisionedPki, name: str) -> None:
    cert = test_pki.pki / "clients" / f"{name}.pem"
    result = openssl("verify", "-crl_check", "-CAfile", test_pki.ca_bundle, "-CRLfile", test_pki.crl,
                     "-purpose", "sslclient", cert)
    assert result.returncode == 0, result.stdout + result.stderr
    text = openssl("x509", "-in", cert, "-noout", "-ext", "keyUsage,extendedKeyUsage").stdout
    assert "Digital Signature" in text and "TLS Web Client Authentication" in text


def test_crl_is_signed_by_issuing_ca_and_revokes_mallory(test_pki: ProvisionedPki) -> None:
    crl = openssl("crl", "-in", test_pki.crl, "-CAfile", test_pki.pki / "issuing-ca.pem", "-noout", "-text")
    assert crl.returncode == 0 and "verify OK" in crl.stderr + crl.stdout
    mallory = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "mallory.pem").read_bytes())
    assert f"{mallory.serial_number:X}".zfill(2) in crl.stdout.replace(" ", "").upper()
    result = openssl("verify", "-crl_check", "-CAfile", test_pki.ca_bundle, "-CRLfile", test_pki.crl,
                     test_pki.pki / "clients" / "mallory.pem")
    assert result.returncode != 0 and "certificate revoked" in result.stdout + result.stderr


def test_expired_and_stranger_fail_openssl_verify(test_pki: ProvisionedPki) -> None:
    expired = openssl("verify", "-CAfile", test_pki.ca_bundle, test_pki.pki / "clients" / "expired.pem")
    assert "certificate has expired" in expired.stdout + expired.stderr
    stranger = openssl("verify", "-CAfile", test_pki.ca_bundle, test_pki.pki / "clients" / "stranger.pem")
    assert stranger.returncode != 0


def pkcs11_tool_objects(test_pki: ProvisionedPki, token: str) -> str:
    result = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", token, "--login", "--pin", "env:CARD_PIN",
         "--list-objects"],
        capture_output=True, text=True, env=test_pki.env(CARD_PIN=USER_PIN), timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("token, key_kind", [("alice", "RSA"), ("bob", "EC"), ("mallory", "RSA")])
def test_keys_were_generated_on_the_token_and_cannot_leave_it(test_pki: ProvisionedPki, token: str,
                                                              key_kind: str) -> None:
    objects = pkcs11_tool_objects(test_pki, token)
    private = objects.split("Private Key Object; ")[1].split("\n\n")[0]
    assert private.startswith(key_kind)
    access = next(line for line in private.splitlines() if "Access:" in line)
    # "local": generated on the token; "never extractable": CKA_EXTRACTABLE false since creation.
    assert "sensitive" in access and "never extractable" in access and "local" in access, access
    assert "ID:         01" in private
    assert f"label:      {token}" in objects
    assert "CN=Test Issuing CA" in objects  # the issuing CA travels with the card


def test_token_certificate_matches_the_exported_file(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    out = tmp_path / "alice.der"
    result = subprocess.run(
        ["pkcs11-tool", "--module", SOFTHSM_MODULE, "--token-label", "alice", "--read-object", "--type", "cert",
         "--id", "01", "--output-file", str(out)],
        capture_output=True, text=True, env=test_pki.env(), timeout=30,
    )
    assert result.returncode == 0, result.stderr
    on_token = x509.load_der_x509_certificate(out.read_bytes())
    on_disk = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "alice.pem").read_bytes())
    assert on_token == on_disk


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_init_is_idempotent_and_force_recreates(tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    (tmp_path / "pki").mkdir()
    (directory / "notes.txt").write_text("mine")
    provision(directory)
    before = _tree_digest(directory)
    again = provision(directory)
    assert "already provisioned" in again.stderr
    assert _tree_digest(directory) == before
    root_before = (directory / "pki" / "root-ca.pem").read_bytes()
    provision(directory, "--force")
    assert (directory / "pki" / "root-ca.pem").read_bytes() != root_before
    assert (directory / "notes.txt").read_text() == "mine"  # --force removes only what init wrote


def test_the_pki_names_a_loopback_responder_that_ocsp_responder_starts_and_stops(test_pki: ProvisionedPki) -> None:
    """What a tester does: `softhsm ocsp-responder start DIR`, then ask it with `openssl ocsp`."""
    import socket
    import urllib.request

    from conftest import run_card_agent

    port = int((test_pki.pki / "ocsp" / "port").read_text())
    mallory = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "mallory.pem").read_bytes())
    access = mallory.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    points = mallory.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [d.access_location.value for d in access] == [f"http://127.0.0.1:{port}/ocsp"]
    assert [n.value for p in points for n in p.full_name] == [f"http://127.0.0.1:{port}/issuing-ca.crl"]
    env = test_pki.env()
    started = run_card_agent("softhsm", "ocsp-responder", "start", test_pki.directory, env=env, check=True)
    try:
        assert f"revocation responder running on http://127.0.0.1:{port} (pid " in started.stderr

        def status(label: str) -> subprocess.CompletedProcess:
            return openssl("ocsp", "-issuer", test_pki.pki / "issuing-ca.pem", "-cert",
                           test_pki.pki / "clients" / f"{label}.pem", "-url", f"http://127.0.0.1:{port}/ocsp",
                           "-CAfile", test_pki.ca_bundle)

        revoked, good = status("mallory"), status("alice")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/issuing-ca.crl", timeout=10) as response:
            crl = x509.load_der_x509_crl(response.read())
    finally:
        stopped = run_card_agent("softhsm", "ocsp-responder", "stop", test_pki.directory, env=env, check=True)
    assert "Response verify OK" in revoked.stderr and "Response verify OK" in good.stderr
    assert f"{test_pki.pki / 'clients' / 'mallory.pem'}: revoked" in revoked.stdout
    assert "Reason: keyCompromise" in revoked.stdout
    assert f"{test_pki.pki / 'clients' / 'alice.pem'}: good" in good.stdout
    assert crl.get_revoked_certificate_by_serial_number(mallory.serial_number) is not None
    assert stopped.stderr.startswith("stopped the responder (pid ")
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the responder still listens on {port}")
