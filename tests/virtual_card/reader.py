"""The vpcd reader as a test sees it: insert a virtual card (start its bridge), pull it (kill it).

What pcscd reports is read with PC/SC (agent.card.pcsc), so "inserted" and "pulled" mean what
every PC/SC client, OpenSC included, sees; OpenSC then needs ~2 s more to probe an inserted card.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dicom_card_agent.card.pcsc import SCARD_STATE_PRESENT, PcscContext, PcscUnavailable
from virtual_card.bridge import read_apdu_count
from virtual_card.nssdb import CardContents
from virtual_card.pcscd import VPCD_PORT, VPCD_READER, StackUnavailable

TESTS_DIR = Path(__file__).resolve().parent.parent


class VirtualReader:
    """The vpcd reader ``Virtual PCD 00 00``; at most one card (bridge process) in it at a time."""

    def __init__(self, workdir: Path, *, port: int = VPCD_PORT, apdu_delay_ms: float = 0.0) -> None:
        self.workdir = workdir
        self.port = port
        self.apdu_delay_ms = apdu_delay_ms
        self.card: CardContents | None = None
        self._bridge: subprocess.Popen | None = None
        self._insertions = 0
        workdir.mkdir(parents=True, exist_ok=True)

    # -- what pcscd says -------------------------------------------------------------------------

    def present(self) -> bool:
        context = PcscContext()
        try:
            return bool(context.states([VPCD_READER]).get(VPCD_READER, 0) & SCARD_STATE_PRESENT)
        finally:
            context.release()

    def wait_present(self, present: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.present() != present:
            if self._bridge is not None and self._bridge.poll() is not None and present:
                raise AssertionError(f"the card bridge exited ({self._bridge.returncode}):\n{self.bridge_log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"pcscd did not report the card {'inserted' if present else 'removed'} "
                                     f"within {timeout:g} s\n{self.bridge_log()}")
            time.sleep(0.02)

    def check_empty(self) -> None:
        """Before a test: nothing else (a leftover bridge, a vicc) holds the reader."""
        try:
            if self.present():
                raise StackUnavailable(f"the reader {VPCD_READER!r} already holds a card that these tests did not "
                                       f"insert (another virtual card process connected to port {self.port}?)")
        except PcscUnavailable as error:
            raise StackUnavailable(f"pcscd stopped answering: {error}") from None

    # -- insert and pull ---------------------------------------------------------------------------

    @property
    def bridge_pid(self) -> int | None:
        return self._bridge.pid if self._bridge is not None else None

    def bridge_log_path(self) -> Path:
        return self.workdir / f"bridge-{self._insertions}.log"

    def apdu_count_path(self) -> Path:
        return self.workdir / f"bridge-{self._insertions}.apdus"

    def apdus(self) -> int:
        """APDUs the card in the reader (or the last one) has answered since its insertion."""
        return read_apdu_count(self.apdu_count_path())

    def bridge_log(self) -> str:
        path = self.bridge_log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    def insert(self, card: CardContents, *, timeout: float = 10.0) -> None:
        """Put ``card`` in the reader and wait until pcscd reports it present."""
        if self._bridge is not None:
            raise RuntimeError("pull the card in the reader first")
        self._insertions += 1
        with open(self.bridge_log_path(), "wb") as log:
            self._bridge = subprocess.Popen(
                [sys.executable, "-m", "virtual_card.bridge", "--db", str(card.db), "--cert", card.nickname,
                 "--port", str(self.port), "--apdu-delay-ms", str(self.apdu_delay_ms),
                 "--count-file", str(self.apdu_count_path())],
                cwd=TESTS_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.card = card
        self.wait_present(True, timeout)

    def pull(self, *, wait: bool = True, timeout: float = 10.0) -> float:
        """Yank the card: SIGKILL its bridge (no goodbye to vpcd, as with a real card). Returns the
        ``time.monotonic()`` of the kill; with ``wait``, returns after pcscd reports the reader empty."""
        bridge, self._bridge, self.card = self._bridge, None, None
        if bridge is None:
            return time.monotonic()
        pulled = time.monotonic()
        if bridge.poll() is None:
            os.kill(bridge.pid, signal.SIGKILL)
        bridge.wait()
        if wait:
            self.wait_present(False, timeout)
        return pulled

    def close(self) -> None:
        """Pull whatever card is in (teardown, also after failures) and leave the reader empty."""
        if self._bridge is None:
            return
        try:
            self.pull(wait=True)
        except (AssertionError, PcscUnavailable):
            pass  # pcscd may be gone already; the bridge itself is dead either way
