"""PIN login that never burns retries, against a card's retry counter.

SoftHSM has no PIN retry counter and no PIN pad, so the card's side is emulated by the
fault-injecting PKCS#11 module (tests/fault_pkcs11) wrapped around the real SoftHSM tokens: it
counts wrong PINs like a card and reports CKF_USER_PIN_COUNT_LOW / FINAL_TRY / LOCKED and
CKF_PROTECTED_AUTHENTICATION_PATH. Everything else (login, keys, certificates) is SoftHSM's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import USER_PIN, ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl

WRONG_PIN = "999999"




@pytest.fixture
def card(tmp_path: Path) -> FaultControl:
    control = FaultControl(tmp_path / "card.ctl")
    control.pin_retries(3)
    return control


def sign_in(test_pki: ProvisionedPki, fault_module: Path, card: FaultControl, pin: str, *extra: str):
    return run_card_agent("identities", "--json", "--module", fault_module, "--token", "alice",
                          "--pin", "env:CARD_PIN", *extra, env=test_pki.env(CARD_PIN=pin, **card.env()))


def logins(card: FaultControl) -> int:
    return sum(1 for line in card.log_lines() if line.startswith("C_Login"))


def test_each_wrong_pin_is_one_attempt_reported_with_what_the_card_says(
        test_pki: ProvisionedPki, fault_module: Path, card: FaultControl) -> None:
    first = sign_in(test_pki, fault_module, card, WRONG_PIN)
    assert first.returncode == 2
    assert "wrong PIN for token 'alice'" in first.stderr
    assert "the card now reports: few PIN tries left" in first.stderr
    assert "does not try again" in first.stderr
    assert logins(card) == 1
    second = sign_in(test_pki, fault_module, card, WRONG_PIN)
    assert "ONE PIN try left: the next wrong PIN locks the card" in second.stderr
    assert logins(card) == 2
    assert WRONG_PIN not in first.stderr + second.stderr + "".join(card.log_lines())


def test_count_low_warns_then_signs_in(test_pki: ProvisionedPki, fault_module: Path, card: FaultControl) -> None:
    sign_in(test_pki, fault_module, card, WRONG_PIN)
    result = sign_in(test_pki, fault_module, card, USER_PIN)
    assert result.returncode == 0, result.stderr
    assert "reports few PIN tries left" in result.stderr
    assert json.loads(result.stdout)[0]["key_checked"] is True


def test_final_try_needs_explicit_confirmation(test_pki: ProvisionedPki, fault_module: Path,
                                               card: FaultControl) -> None:
    for _ in range(2):
        sign_in(test_pki, fault_module, card, WRONG_PIN)
    before = logins(card)
    refused = sign_in(test_pki, fault_module, card, USER_PIN)
    assert refused.returncode == 2
    assert "has one PIN try left: a wrong PIN will lock the card. Nothing was tried." in refused.stderr
    assert "--confirm-final-try" in refused.stderr
    assert logins(card) == before  # the card was not asked at all
    confirmed = sign_in(test_pki, fault_module, card, USER_PIN, "--confirm-final-try")
    assert confirmed.returncode == 0, confirmed.stderr
    assert logins(card) == before + 1


def test_locked_pin_is_refused_without_trying(test_pki: ProvisionedPki, fault_module: Path, card: FaultControl) -> None:
    sign_in(test_pki, fault_module, card, WRONG_PIN)
    sign_in(test_pki, fault_module, card, WRONG_PIN)
    third = sign_in(test_pki, fault_module, card, WRONG_PIN, "--confirm-final-try")
    assert "the card now reports: the PIN is now locked" in third.stderr
    before = logins(card)
    locked = sign_in(test_pki, fault_module, card, USER_PIN, "--confirm-final-try")
    assert locked.returncode == 2
    assert "is locked after too many wrong PINs; the agent will not try it" in locked.stderr
    assert "unblock it with the PUK or SO PIN" in locked.stderr
    assert logins(card) == before


def test_tokens_and_doctor_show_the_pin_state(test_pki: ProvisionedPki, fault_module: Path, card: FaultControl) -> None:
    sign_in(test_pki, fault_module, card, WRONG_PIN)
    sign_in(test_pki, fault_module, card, WRONG_PIN)
    env = test_pki.env(**card.env())
    tokens = json.loads(run_card_agent("tokens", "--json", "--module", fault_module, env=env, check=True).stdout)
    assert {t["label"]: t["pin_state"] for t in tokens if t["initialized"]}["alice"] == "final-try"
    doctor = run_card_agent("doctor", "--module", fault_module, "--token", "alice", env=env)
    assert doctor.returncode == 1
    assert "fail pin alice: ONE PIN try left" in doctor.stdout
    assert "profile softhsm2" in doctor.stdout  # detected through the wrapper from the library manufacturer


def test_pin_pad_reader_logs_in_without_a_pin(test_pki: ProvisionedPki, fault_module: Path, card: FaultControl) -> None:
    env = test_pki.env(**card.env())
    args = ("identities", "--json", "--module", fault_module, "--token", "alice", "--pin", "protected")
    refused = run_card_agent(*args, env=env)
    assert refused.returncode == 2 and "has no protected authentication path (PIN pad)" in refused.stderr
    card.pin_pad(USER_PIN)  # the reader's keypad "types" the PIN
    result = run_card_agent(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["key_checked"] is True
    tokens = run_card_agent("tokens", "--module", fault_module, env=env, check=True).stdout
    assert "ok (PIN pad)" in tokens
