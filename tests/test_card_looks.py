"""How often the card loop asks the PKCS#11 module which tokens are present.

A card in a reader can be pulled at any moment, so its module is asked every 50 ms. A token in a
slot that cannot hold a removable device (SoftHSM's, an HSM partition's) is always there, so asking
20 times a second only loads the module: SoftHSM re-reads its token files at every look (the
supervisor spent 1.6% of a core idling, ~4,800 system calls a second), and a network HSM would be
asked over the network. Measured here as the supervisor's read system calls while the agent idles
(``/proc/PID/io``), with the real SoftHSM and with the fault module's reader around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pkcs11.constants import SlotFlag, TokenFlag

from agent_runner import log_lines, running_agent, tunnel
from conftest import ProvisionedPki
from dicom_card_agent.card.watcher import FIXED_TOKEN_LOOK_SECONDS, POLL_SECONDS, CardWatcher
from fault_pkcs11 import FaultControl

FIXED_SLOTS = ("card-agent: INFO: the module's tokens are in slots that cannot hold a removable device: the "
               "card loop looks at them every 1 s")
IDLE_SECONDS = 3.0


def reads_per_second(pid: int, seconds: float = IDLE_SECONDS) -> float:
    """The read system calls the process makes per second (SoftHSM reads its token files at every look)."""
    def reads() -> int:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
        return int(fields["syscr"])

    before, started = reads(), time.monotonic()
    time.sleep(seconds)
    return (reads() - before) / (time.monotonic() - started)


def test_a_token_that_cannot_be_removed_is_looked_at_once_a_second(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        time.sleep(0.5)  # past the sign-in's own module calls
        rate = reads_per_second(agent.process.pid)
        log = agent.log()
    assert FIXED_SLOTS in log_lines(log), log
    # Every 50 ms this was ~570 reads a second; once a second, ~30 and the agent's own.
    assert rate < 150, f"{rate:.0f} reads a second while idle"


def test_a_card_reader_is_still_looked_at_every_50_ms(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The same SoftHSM tokens behind the fault module's reader, whose card can be pulled."""
    card = FaultControl(tmp_path / "reader.ctl", log=False)
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], module=str(fault_module),
                       env=card.env()) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        time.sleep(0.5)
        rate = reads_per_second(agent.process.pid)
        card.remove_card()
        pulled = time.monotonic()
        agent.wait_for_log('event=sign-out reason="card removed"')
        seen_after = time.monotonic() - pulled
        log = agent.log()
    assert FIXED_SLOTS not in log, log
    assert rate > 300, f"{rate:.0f} reads a second while idle: the reader is not looked at every 50 ms"
    assert seen_after < 1.0, f"the pulled card was acted on after {seen_after:.2f} s"


@dataclass
class StandInToken:
    label: str
    serial: bytes = b"1"
    flags: TokenFlag = TokenFlag.TOKEN_INITIALIZED


@dataclass
class StandInSlot:
    slot_id: int
    flags: SlotFlag
    token: StandInToken | None = None

    def get_token(self) -> StandInToken:
        assert self.token is not None
        return self.token


class StandInModule:
    """The slot list of an nShield (a fixed slot for the module's keys beside a card reader for
    operator cards), which neither SoftHSM nor the fault module has: a stand-in for the module."""

    def __init__(self, *slots: StandInSlot) -> None:
        self.slots = list(slots)

    def slots_with_token(self) -> list[StandInSlot]:
        return [slot for slot in self.slots if slot.token is not None]

    def all_slots(self) -> list[StandInSlot]:
        return list(self.slots)


def test_a_card_reader_beside_a_fixed_slot_keeps_looks_50_ms_apart() -> None:
    fixed = StandInSlot(0, SlotFlag.TOKEN_PRESENT | SlotFlag.HW_SLOT, StandInToken("module"))
    reader = StandInSlot(1, SlotFlag.REMOVABLE_DEVICE | SlotFlag.HW_SLOT)
    watcher = CardWatcher(StandInModule(fixed, reader), "module")  # type: ignore[arg-type]
    watcher.look()
    assert watcher.look_interval == POLL_SECONDS  # an operator card may be inserted at any moment

    reader.token = StandInToken("operator card")
    watcher.look()
    assert watcher.look_interval == POLL_SECONDS

    alone = CardWatcher(StandInModule(fixed), "module")  # type: ignore[arg-type]
    alone.look()
    assert alone.look_interval == FIXED_TOKEN_LOOK_SECONDS
