"""`card-agent tokens` and `card-agent identities` on the provisioned SoftHSM tokens."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HELPERS, USER_PIN, ProvisionedPki, provisioned, run_card_agent


def identities_json(test_pki: ProvisionedPki, *args: str | Path, **env: str) -> dict[str, dict]:
    result = run_card_agent("identities", "--json", *args, env=test_pki.env(**env), check=True)
    entries = json.loads(result.stdout)
    for entry in entries:
        assert {"token", "subject", "key_type", "key_size", "usable", "reason", "uri"} <= entry.keys()
    # One personal identity per token; the CA certificates on the tokens are listed as unusable.
    personal = {e["token"]: e for e in entries if "Test Issuing CA" not in e["subject"] and
                "Untrusted Test CA" not in e["subject"]}
    assert all(not e["usable"] and e["reason"].startswith("CA certificate") for e in entries
               if e["token"] in personal and e is not personal[e["token"]])
    return personal


def test_acceptance_usable_and_unusable_identities_with_ca_and_crl(test_pki: ProvisionedPki) -> None:
    found = identities_json(test_pki, "--ca", test_pki.ca_bundle, "--crl", test_pki.crl)
    assert set(found) == {"alice", "bob", "mallory", "expired", "stranger"}
    alice, bob = found["alice"], found["bob"]
    assert (alice["key_type"], alice["key_size"], alice["usable"], alice["reason"]) == ("rsa", 2048, True, None)
    assert (bob["key_type"], bob["key_size"], bob["usable"], bob["reason"]) == ("ec", 256, True, None)
    assert alice["subject"] == "CN=Alice Example,O=Example Hospital Test PKI"
    assert alice["uri"].startswith("pkcs11:token=alice;serial=") and alice["uri"].endswith(";id=%01;type=private")
    assert not found["mallory"]["usable"] and "was revoked on" in found["mallory"]["reason"]
    assert not found["expired"]["usable"] and found["expired"]["reason"].startswith("expired on")
    assert not found["stranger"]["usable"]
    assert "does not chain to a CA in" in found["stranger"]["reason"]
    assert "issuer CN=Untrusted Test CA" in found["stranger"]["reason"]


def test_without_trust_files_only_the_certificate_itself_is_judged(test_pki: ProvisionedPki) -> None:
    found = identities_json(test_pki)
    assert found["mallory"]["usable"] and found["stranger"]["usable"]
    assert not found["expired"]["usable"]


def test_tls_capability_is_worked_out_from_the_mechanisms(test_pki: ProvisionedPki) -> None:
    found = identities_json(test_pki)
    # SoftHSM offers CKM_RSA_PKCS_PSS, so RSA identities can do TLS 1.3.
    assert found["alice"]["tls"]["versions"] == ["TLSv1.3", "TLSv1.2"]
    assert "rsa_pss_rsae_sha256" in found["alice"]["tls"]["signature_schemes"]
    assert found["bob"]["tls"]["signature_schemes"] == ["ecdsa_secp256r1_sha256"]


def test_without_pin_key_attributes_wait_for_login_with_pin_they_are_checked(test_pki: ProvisionedPki) -> None:
    assert identities_json(test_pki, "--token", "alice")["alice"]["key_checked"] is False
    logged_in = identities_json(test_pki, "--token", "alice", "--pin", "env:CARD_PIN", CARD_PIN=USER_PIN)
    assert logged_in["alice"]["key_checked"] is True and logged_in["alice"]["usable"] is True


def test_pin_with_several_tokens_is_refused_before_any_attempt(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("identities", "--pin", "env:CARD_PIN", env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2
    assert "select one with --token" in result.stderr


def test_wrong_pin_is_reported_once_and_not_retried(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("identities", "--token", "bob", "--pin", "env:CARD_PIN",
                            env=test_pki.env(CARD_PIN="999999"))
    assert result.returncode == 2
    assert "wrong PIN for token 'bob'" in result.stderr
    assert "does not try again" in result.stderr
    assert "999999" not in result.stderr + result.stdout


@pytest.mark.parametrize("selector", ["bob", "pkcs11:token=bob", "pkcs11:model=SoftHSM%20v2;token=bob"])
def test_token_selected_by_label_or_uri(test_pki: ProvisionedPki, selector: str) -> None:
    assert set(identities_json(test_pki, "--token", selector)) == {"bob"}


def test_token_selected_by_serial(test_pki: ProvisionedPki) -> None:
    tokens = json.loads(run_card_agent("tokens", "--json", env=test_pki.env(), check=True).stdout)
    serial = next(t["serial"] for t in tokens if t["label"] == "expired")
    assert set(identities_json(test_pki, "--token", serial)) == {"expired"}


def test_unknown_token_lists_the_tokens_present(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("identities", "--token", "carol", env=test_pki.env())
    assert result.returncode == 2
    assert "no token 'carol'" in result.stderr and "profile softhsm2" in result.stderr
    for label in ("alice", "bob", "mallory", "expired", "stranger"):
        assert f"'{label}'" in result.stderr


def test_tokens_lists_label_serial_manufacturer_model_and_pin_state(tmp_path: Path) -> None:
    # tokens of its own: the shared ones' PIN state is what earlier tests on this worker left ("count-low")
    test_pki = provisioned(tmp_path)
    text = run_card_agent("tokens", env=test_pki.env(), check=True).stdout
    assert "profile softhsm2" in text
    alice = next(line for line in text.splitlines() if " alice " in line)
    assert "SoftHSM project" in alice and "SoftHSM v2" in alice and alice.rstrip().endswith("ok")
    tokens = json.loads(run_card_agent("tokens", "--json", env=test_pki.env(), check=True).stdout)
    by_label = {t["label"]: t for t in tokens if t["initialized"]}
    assert set(by_label) == {"alice", "bob", "mallory", "expired", "stranger"}
    assert by_label["alice"]["pin_state"] == "ok" and len(by_label["alice"]["serial"]) == 16


def test_missing_module_path_is_named(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("tokens", "--module", "/opt/vendor/libmissing-pkcs11.so", env=test_pki.env())
    assert result.returncode == 2
    assert "PKCS#11 module /opt/vendor/libmissing-pkcs11.so does not exist" in result.stderr


def test_a_module_that_does_not_start_is_told_apart_from_a_file_that_is_no_module(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """SoftHSM without its configuration loads, and its C_Initialize answers CKR_GENERAL_ERROR: that
    was told as "cannot load PKCS#11 module ...: . Check that it is a PKCS#11 library for this
    architecture", an empty reason and the wrong advice."""
    result = run_card_agent("tokens", "--module", "softhsm2", env=test_pki.env(SOFTHSM2_CONF=str(tmp_path / "none")))
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "card-agent: error: PKCS#11 module /usr/lib/softhsm/libsofthsm2.so (profile softhsm2) did not start: "
        "its C_Initialize answered GeneralError. SoftHSM reads SOFTHSM2_CONF (else /etc/softhsm/softhsm2.conf) and "
        "the directories.tokendir it names: both must exist and be readable by this user (SoftHSM writes why to "
        "the system log)\n")
    not_a_module = tmp_path / "libnot-pkcs11.so"
    not_a_module.write_bytes(b"not an ELF file\n" * 8)
    result = run_card_agent("tokens", "--module", not_a_module, env=test_pki.env())
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"card-agent: error: cannot load PKCS#11 module {not_a_module} (profile generic): OS exception while loading "
        f"{not_a_module}: {not_a_module}: invalid ELF header. Check that it is a PKCS#11 library for this "
        "architecture\n")


def test_profile_whose_module_is_not_installed_names_profile_and_paths(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("tokens", "--module", "thales-luna", env=test_pki.env())
    assert result.returncode == 2
    assert "profile thales-luna" in result.stderr and "libCryptoki2_64.so" in result.stderr


def test_unknown_profile_lists_the_known_ones(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("tokens", "--module", "acme", env=test_pki.env())
    assert result.returncode == 2
    assert "unknown PKCS#11 profile 'acme'" in result.stderr and "softhsm2" in result.stderr


def test_crl_needs_ca(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("identities", "--crl", test_pki.crl, env=test_pki.env())
    assert result.returncode == 2 and "--crl needs --ca" in result.stderr


@pytest.fixture(scope="module")
def lab_token(test_pki: ProvisionedPki, tmp_path_factory: pytest.TempPathFactory) -> ProvisionedPki:
    directory = tmp_path_factory.mktemp("lab-token")
    result = subprocess.run([sys.executable, str(HELPERS / "make_lab_token.py"), str(directory), str(test_pki.pki)],
                            capture_output=True, text=True, env=test_pki.env(), timeout=60)
    assert result.returncode == 0, result.stderr
    return ProvisionedPki(test_pki.directory, directory / "softhsm2.conf")


def lab_identities(lab_token: ProvisionedPki, *extra: str) -> dict[str, dict]:
    # the environment of the test that runs it, not of the first (the fixture is the module's)
    result = run_card_agent("identities", "--json", "--token", "lab", *extra, env=lab_token.env(CARD_PIN=USER_PIN),
                            check=True)
    return {entry["subject"].split(",")[0].removeprefix("CN=Lab "): entry for entry in json.loads(result.stdout)}


def test_every_refusal_reason_on_a_real_token(lab_token: ProvisionedPki) -> None:
    found = lab_identities(lab_token, "--pin", "env:CARD_PIN")
    assert set(found) == {"Exportable", "Keyless", "Server Only", "Future"}
    assert found["Exportable"]["reason"].startswith("extractable key: the private key can leave the token")
    assert found["Keyless"]["reason"] == "no matching private key (no key with CKA_ID 02 on the token)"
    assert found["Server Only"]["reason"] == (
        "wrong key usage: digitalSignature is not allowed by the certificate; "
        "wrong key usage: the certificate's extended key usage has no TLS clientAuth")
    assert re.fullmatch(r"not yet valid: valid from \d{4}-\d\d-\d\d \d\d:\d\d UTC, and this computer's clock says "
                        r"\d{4}-\d\d-\d\d \d\d:\d\d UTC: if that is wrong, correct the clock",
                        found["Future"]["reason"]), found["Future"]["reason"]
    assert not any(entry["usable"] for entry in found.values())


def test_extractable_key_is_accepted_only_when_allowed_for_a_lab(lab_token: ProvisionedPki) -> None:
    allowed = lab_identities(lab_token, "--pin", "env:CARD_PIN", "--allow-exportable-keys")
    assert allowed["Exportable"]["usable"] is True and allowed["Exportable"]["key_checked"] is True


def test_before_login_a_missing_key_cannot_be_told_from_a_hidden_one(lab_token: ProvisionedPki) -> None:
    found = lab_identities(lab_token)
    # SoftHSM hides private keys before login; a key with no public half either is reported so.
    assert found["Keyless"]["reason"] == "no matching key visible before login (CKA_ID 02): give a PIN to check"
    assert found["Exportable"]["key_checked"] is False


def test_readable_listing_says_usable_or_why_not(test_pki: ProvisionedPki) -> None:
    text = run_card_agent("identities", "--ca", test_pki.ca_bundle, "--crl", test_pki.crl,
                          env=test_pki.env(), check=True).stdout
    assert "alice: CA certificate CN=Test Issuing CA,O=Example Hospital Test PKI (not a personal identity)" in text
    alice = text.split("alice: CN=Alice Example")[1].split("\n")[1:5]
    assert alice[-1].strip() == "usable"
    expired = text.split("expired: CN=Expired Example")[1].split("\n")[4]
    assert expired.strip().startswith("UNUSABLE: expired on")
