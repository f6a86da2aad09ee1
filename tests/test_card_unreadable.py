"""A card that is in the reader is never taken for pulled because the module failed to answer a look.

Under load, SoftHSM answered the card loop's C_GetTokenInfo with CKR_GENERAL_ERROR while the
card-session process logged in (it rewrites the token's file on C_Login); the loop took that for a
pulled card, ended the session and asked for the PIN again. The real SoftHSM does this only under
load, by chance, so these tests use a fake: the fault module (tests/fault_pkcs11) injects the same
error into C_GetTokenInfo for as long as the test says.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent_runner import card_session_pid, log_lines, running_agent, signed_in_through_fault_module, tunnel, wait_for
from conftest import ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

SIGNED_IN = 'event=sign-in subject="CN=Alice Example'


def failed_looks(card: FaultControl, pid: int) -> int:
    """The agent's looks at the reader that the injected error failed (the fault module logs them)."""
    return sum(1 for line in card.log_lines()
               if line.startswith("C_GetTokenInfo rv=0x5 injected") and line.endswith(f"pid={pid}"))


def test_a_look_that_fails_for_a_moment_does_not_end_the_session(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "reader.ctl")
    with signed_in_through_fault_module(test_pki, tmp_path / "agent", fault_module, card) as (agent, worker):
        card.fail("C_GetTokenInfo", "CKR_GENERAL_ERROR")  # what SoftHSM answered during another's login
        wait_for(lambda: failed_looks(card, agent.process.pid) >= 2, timeout=5)
        card.fail("C_GetTokenInfo", None)
        time.sleep(0.5)  # the card loop acts on the looks that failed, and on those that work again

        log = agent.log()
        assert "event=card-removed" not in log and "event=sign-out" not in log, log
        assert card_session_pid(agent.process.pid) == worker  # the same card session serves on
        assert echo(agent.port())
        log = agent.log()
    assert log.count(SIGNED_IN) == 1, log
    lines = log_lines(log)
    assert ("card-agent: INFO: the card reader could not be read (GeneralError): the card is taken to be as it "
            "was; looking again") in lines, log
    assert any(line.startswith("card-agent: INFO: the card reader answers again (after ") for line in lines), log


def test_a_reader_that_keeps_failing_counts_as_empty_after_a_second(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """Fail closed: a card pulled from a module that answers only errors still ends its session."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], module=str(fault_module),
                       env=card.env()) as agent:
        agent.wait_for_log(SIGNED_IN)
        card.fail("C_GetTokenInfo", "CKR_GENERAL_ERROR")
        failing = time.monotonic()
        agent.wait_for_log('event=sign-out reason="card removed"')
        ended_after = time.monotonic() - failing
        assert 1.0 <= ended_after < 5.0, f"the session ended {ended_after:.2f} s after the reader began to fail"

        card.fail("C_GetTokenInfo", None)  # readable again: the card counts as inserted, and signs in again
        wait_for(lambda: agent.log().count(SIGNED_IN) == 2)
        log = agent.log()
    lines = log_lines(log)
    assert any(line.startswith("card-agent: WARNING: the card reader has not answered for ")
               and line.endswith(" looks failed, the last with GeneralError): the card is taken to be removed")
               for line in lines), log
    assert log.count("event=card-removed") == 1, log
