"""A card that fails as it is read leaves no traceback on standard error (the journal).

python-pkcs11 0.10 ends a search whose C_FindObjectsInit failed with C_FindObjectsFinal anyway, in
a finalizer, and prints the module's CKR_OPERATION_NOT_INITIALIZED twice with its traceback
(agent/token/search_ends.py). A card pulled while its objects are read does that; these tests
make C_FindObjectsInit answer CKR_DEVICE_REMOVED through the fault module (tests/fault_pkcs11: a
pull cannot be timed into the probe's few milliseconds), as a pulled card's module answers it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl

TRACEBACK_SIGNS = ("Traceback", "Exception ignored", "OperationNotInitialized")


def unreadable_card(tmp_path: Path) -> FaultControl:
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.fail("C_FindObjectsInit", "CKR_DEVICE_REMOVED")
    return card


def test_a_card_that_goes_as_it_is_read_fails_its_sign_in_without_a_traceback(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = unreadable_card(tmp_path)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], module=str(fault_module),
                       env=card.env()) as agent:
        log = agent.wait_for_log("event=sign-in-failed")
    assert "failed: the card could not be read: the PKCS#11 module answered DeviceRemoved\n" in log, log
    assert not [sign for sign in TRACEBACK_SIGNS if sign in log], log


def test_identities_on_a_card_that_goes_as_it_is_read_says_so_without_a_traceback(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = unreadable_card(tmp_path)
    result = run_card_agent("identities", "--module", fault_module, env=test_pki.env(**card.env()))
    assert result.returncode != 0, result.stdout
    assert "DeviceRemoved" in result.stderr, result.stderr
    assert not [sign for sign in TRACEBACK_SIGNS if sign in result.stderr], result.stderr


def test_other_exceptions_still_reach_standard_error(tmp_path: Path) -> None:
    """The hooks pass on what is not a failed search end: an uncaught error, one in a finalizer."""
    program = (
        "from dicom_card_agent.token.search_ends import hide_failed_search_ends\n"
        "hide_failed_search_ends()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        raise KeyError('in a finalizer')\n"
        "Finalized()\n"
        "raise ValueError('uncaught')\n")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert "Exception ignored in: <function Finalized.__del__" in result.stderr, result.stderr
    assert "KeyError: 'in a finalizer'" in result.stderr, result.stderr
    assert result.stderr.rstrip().endswith("ValueError: uncaught"), result.stderr
    assert "Traceback (most recent call last)" in result.stderr, result.stderr
