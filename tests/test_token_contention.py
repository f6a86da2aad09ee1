"""A card does one signature at a time: the agent serializes them per token, and concurrent
handshakes waiting on a slow card still all complete."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from agent_runner import FramedEchoServer, dicom_stream, echoed, running_agent, send_concurrently, tunnel
from conftest import ProvisionedPki
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
