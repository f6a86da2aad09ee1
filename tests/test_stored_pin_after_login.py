"""A stored PIN (``pin = "env:CARD_PIN"``) that the card accepted stays its card's, whatever fails
after the login. Before, the card-session process logged in (the card answered 9000), then failed to
make its TLS contexts (on the virtual-CAC stack: pcscd restarted, "OpenSSL could not use the card's
key through the pkcs11-provider: [Errno 32] Broken pipe"), and its error answer did not say that the
login had been accepted: the stored PIN was withheld from that card until an administrator
restarted the agent, as after a wrong PIN.

SoftHSM behind the fault module (tests/fault_pkcs11): a real pcscd restart cannot be timed between
the login and the key's first use, so C_Login is slowed down and, while it waits, C_OpenSession is
made to fail, or to crash the process calling it (fault injectors): the login's own session is open
already, the pkcs11-provider's session, when OpenSSL loads the card's key, is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from agent_runner import running_agent, tunnel, wait_for
from conftest import ProvisionedPki
from fault_pkcs11 import FaultControl

LOGIN_SECONDS = 4  # C_Login's delay: the time to arm the fault after the login's own session opened
WITHHELD = "it is not tried again, on that card or another, until the agent restarts"
SIGNED_IN = 'event=sign-in subject="CN=Alice Example'


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


def when_the_login_waits(card: FaultControl, arm: Callable[[], None]) -> threading.Thread:
    """Call ``arm`` once C_Login starts waiting (the agent signs in before it is ready: this watches
    from before it starts)."""
    def watch() -> None:
        wait_for(lambda: any(line.startswith("login-delay") for line in card.log_lines()), timeout=30)
        arm()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def failed_then_inserted_again(test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path,
                               arm: Callable[[FaultControl], None], disarm: Callable[[FaultControl], None],
                               ) -> tuple[FaultControl, str, str]:
    """alice's card signs in with the stored PIN, ``arm`` makes its start fail once the login is
    under way; ``disarm``, and the card is pulled and inserted again. The card, the agent's log
    when the first sign-in failed, and its log once the card signed in again."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(LOGIN_SECONDS * 1000)
    armed = when_the_login_waits(card, lambda: arm(card))
    # No PACS is needed: the contexts are made (and the card's key used) at sign-in.
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], module=str(fault_module),
                       env=card.env()) as agent:
        armed.join()
        failed = agent.wait_for_log("event=sign-in-failed", timeout=LOGIN_SECONDS + 20)
        disarm(card)
        card.login_delay(None)
        card.remove_card()  # the clinician takes her card out and puts it back, as the desktop says
        agent.wait_for_log("event=card-removed")
        card.insert_card()
        return card, failed, agent.wait_for_log(SIGNED_IN, timeout=20)


def test_a_stored_pin_the_card_accepted_goes_to_it_again_after_a_failed_start(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card, failed, log = failed_then_inserted_again(
        test_pki, tmp_path, fault_module, arm=lambda card: card.fail("C_OpenSession", "CKR_DEVICE_ERROR"),
        disarm=lambda card: card.fail("C_OpenSession", None))
    accepted = logins(card)
    assert len(accepted) == 2 and all("rv=0x0 " in line for line in accepted), accepted
    assert "OpenSSL could not use the card's key through the pkcs11-provider" in failed, failed
    assert WITHHELD not in log, log


def test_a_card_session_that_crashed_after_the_login_signs_in_again_with_the_stored_pin(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """Killed after the login, without a word (a module that crashes on this card once): the card's
    acceptance was said before, and the crash is a lost session's, as one while the process read
    the card: a new process signs in again with the stored PIN, which the card took. It was a failed
    sign-in, which waited for the card to be pulled and put back."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.login_delay(LOGIN_SECONDS * 1000)

    def crash_once() -> None:  # here: the agent is not "ready" before the sign-in is settled
        card.crash_in("C_OpenSession")
        wait_for(lambda: any(line.startswith("crash in C_OpenSession") for line in card.log_lines()),
                 timeout=LOGIN_SECONDS + 20)
        card.crash_in(None)
        card.login_delay(None)

    armed = when_the_login_waits(card, crash_once)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)], module=str(fault_module),
                       env=card.env()) as agent:
        armed.join()
        log = agent.wait_for_log(SIGNED_IN, timeout=LOGIN_SECONDS + 20)
    accepted = logins(card)
    assert len(accepted) == 2 and all("rv=0x0 " in line for line in accepted), accepted
    assert "sign-in to 'alice' (serial " in log and \
        "the card-session process was killed by SIGABRT as its session started" in log, log
    assert "event=sign-in-failed" not in log and "event=card-removed" not in log and WITHHELD not in log, log
