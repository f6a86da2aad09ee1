"""A card does one signature at a time: the agent serializes them per token, and concurrent
handshakes waiting on a slow card still all complete."""

from __future__ import annotations

import re
import threading
import time
from itertools import pairwise
from pathlib import Path

from agent_runner import (
    FramedEchoServer,
    dicom_stream,
    echoed,
    running_agent,
    send_and_close,
    send_concurrently,
    tunnel,
)
from conftest import ProvisionedPki
from dicom_card_agent.tunnel.relay import reject_pdu
from fault_pkcs11 import FaultControl

CONCURRENT = 8


def test_eight_new_associations_with_500_ms_signatures_sign_one_after_another(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "card.ctl")
    server = FramedEchoServer(test_pki, concurrent=True)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("echo", server.port, session_resumption=False)],
                           module=str(fault_module), env=card.env()) as agent:
            card.sign_delay(500)
            answers = send_concurrently(agent.port(), [dicom_stream(f"association {i}".encode())
                                                       for i in range(CONCURRENT)])
    finally:
        server.close()
    assert {i: echoed(answer) for i, answer in answers.items()} == {
        i: dicom_stream(f"association {i}".encode()) for i in range(CONCURRENT)}
    intervals = sorted(card.signature_intervals())
    assert len(intervals) == CONCURRENT
    overlaps = [(a, b) for a, b in pairwise(intervals) if b[0] < a[1]]
    assert not overlaps, f"signatures overlapped on the card: {overlaps}"


def test_a_handshake_waiting_behind_a_long_signature_is_rejected_within_its_handshake_timeout(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """A card that takes 6 s to sign (a slow card, or one another program holds in a PC/SC
    transaction, as a reviewer did on the virtual CAC): the association whose signature waits for
    the card is answered within handshake_timeout (2 s). It waited for the card without a deadline
    (rejected after 5.5 s, once the signature before it ended)."""
    card = FaultControl(tmp_path / "card.ctl")
    server = FramedEchoServer(test_pki, concurrent=True)
    answered: dict[int, tuple[float, bytes]] = {}

    def associate(index: int) -> None:
        started = time.monotonic()
        answer = send_and_close(agent.port(), dicom_stream(b"waits for the card"))
        answered[index] = (time.monotonic() - started, answer)

    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("echo", server.port, session_resumption=False,
                                                                 handshake_timeout=2)],
                           module=str(fault_module), env=card.env()) as agent:
            card.sign_delay(6000)
            first = threading.Thread(target=associate, args=(0,))
            first.start()
            time.sleep(0.5)  # the first one's signature holds the card
            associate(1)
            first.join(30)
            log = agent.log()
    finally:
        server.close()
    seconds, answer = answered[1]
    assert answer == reject_pdu(transient=True), (answer, log)
    assert seconds < 4.0, (seconds, log)
    assert re.search(r"tunnel echo: .*: TLS handshake with 127\.0\.0\.1:\d+ could not be made in time: the card "
                     r"did not become free for this handshake's signature in time: another signature held it \(a "
                     r"slow card, or another program using the card\)", log), log
