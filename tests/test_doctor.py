"""`card-agent doctor`: one line per check, ok/fail with the fix, exit 1 on any failure.

The SoftHSM module is named: with ``auto`` a card in a pcscd reader would win over the test tokens
(tests/test_virtual_cac.py checks that)."""

from __future__ import annotations

from conftest import ProvisionedPki, run_card_agent


def lines(text: str) -> dict[str, str]:
    return {line[5:].split(":")[0]: line[:4].strip() for line in text.splitlines() if not line.startswith(" ")}


def test_all_green_for_alice_with_the_ca_bundle(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "alice", "--ca", test_pki.ca_bundle,
                            "--crl", test_pki.crl, env=test_pki.env())
    assert result.returncode == 0, result.stdout + result.stderr
    status = lines(result.stdout)
    for check in ("openssl", "pkcs11-provider", "pkcs11-module", "provider-loads", "tokens", "pin alice",
                  "identity alice", "chain alice"):
        assert status[check] == "ok", result.stdout
    assert "chain alice: complete to" in result.stdout and "CN=Test Root CA" in result.stdout


def test_untrusted_identity_fails_with_a_fix(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "stranger", "--ca", test_pki.ca_bundle,
                            env=test_pki.env())
    assert result.returncode == 1
    assert "fail identity stranger: CN=Stranger Example" in result.stdout
    assert "does not chain to a CA in" in result.stdout
    assert "     fix: " in result.stdout


def test_missing_module_fails_the_module_check(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "/nonexistent/libcard.so", env=test_pki.env())
    assert result.returncode == 1
    assert "fail pkcs11-module: PKCS#11 module /nonexistent/libcard.so does not exist" in result.stdout
    assert lines(result.stdout)["openssl"] == "ok"


def test_chain_is_skipped_without_a_bundle(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "bob", env=test_pki.env())
    assert result.returncode == 0
    assert "skip chain bob: not checked: give the server's CA bundle with --ca" in result.stdout
