"""The supervisor's card loop: identity follows the card in the reader.

No card: listeners stay open and reject associations (rejected-transient). A card arrives: sign in
(one PIN attempt) and start its card-session process. The card leaves, is swapped, or the session
is locked: end that process, and with it every connection, resumable session, the PIN and the
login. A card whose sign-in failed, or that was locked, is not tried again until it is re-inserted:
the agent never spends a PIN try on its own.
"""

from __future__ import annotations

import logging
import threading
import time

from agent.card.watcher import Card, CardEvents, present_card
from agent.config.model import AgentConfig
from agent.errors import CardAgentError
from agent.session.audit import AuditRecorder
from agent.session.events import event
from agent.session.identity import log_signed_in, sign_in
from agent.session.supervisor import CardSession
from agent.token.login import LoginError
from agent.token.module import LoadedModule, load_module

log = logging.getLogger("agent.session")


class SessionManager:
    def __init__(self, config: AgentConfig, *, confirm_final_try: bool = False,
                 audit: AuditRecorder | None = None) -> None:
        self.config = config
        self.audit = audit or AuditRecorder(None)
        self.confirm_final_try = confirm_final_try
        self.module: LoadedModule = load_module(config.identity.module)
        self.card: Card | None = None
        self.session: CardSession | None = None
        self.since: float | None = None
        self.state = "no card inserted"
        self.last_error: str | None = None
        self.last_activity = time.monotonic()
        self._next_idle_check = 0.0
        self._lock = threading.Lock()

    def current_session(self) -> CardSession | None:
        return self.session

    def touch(self) -> None:
        """An association was handed to the session."""
        self.last_activity = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        with CardEvents() as events:
            while not events.wait(stop):
                self.step()
                self._check_idle()

    def _check_idle(self) -> None:
        timeout = self.config.idle_timeout
        now = time.monotonic()
        if not timeout or self.session is None or now < self._next_idle_check:
            return
        self._next_idle_check = now + min(1.0, timeout / 4)
        if now - self.last_activity < timeout:
            return
        if any(t.get("open_connections") for t in self.session.status().values()):
            self.touch()  # a long transfer is activity too
            return
        with self._lock:
            self._end("idle timeout")
            self.state = f"locked after {timeout:g} s without activity: remove and re-insert the card"

    def step(self) -> None:
        """Look at the reader once and act on any change."""
        card = present_card(self.module, self.config.identity.token)
        with self._lock:
            if card == self.card:
                return
            if self.card is not None:
                event("card-removed", token=self.card.label, serial=self.card.serial)
                self._end("card swapped" if card is not None else "card removed")
            self.card = card
            if card is None:
                self.state = "no card inserted"
                return
            event("card-inserted", token=card.label, serial=card.serial)
            self._sign_in(card)

    def lock(self) -> bool:
        """End the session now, as if the card had been pulled; the card must be re-inserted."""
        with self._lock:
            if self.session is None:
                return False
            self._end("locked")
            self.state = "locked: remove and re-insert the card to sign in again"
            return True

    def _sign_in(self, card: Card) -> None:
        self.state = "card present, PIN not yet entered"
        try:
            signed_in, pin = sign_in(self.config, self.module, card, confirm_final_try=self.confirm_final_try)
            session = CardSession(self.config, signed_in, on_report=self.audit.session_report,
                                  confirm_final_try=self.confirm_final_try)
            session.start(pin)  # the card-session process makes the login attempt; pin is wiped
            log_signed_in(signed_in, self.module)
        except LoginError as error:
            self.last_error = str(error)
            self.state = "card present, PIN not accepted: remove and re-insert the card to try again"
            event("pin-failure", token=card.label, serial=card.serial, reason=str(error))
            self.audit.sign_in_failed(card, error)
            log.error("%s", error)
            return
        except CardAgentError as error:
            self.last_error = str(error)
            self.state = f"card present, not signed in: {error}"
            event("sign-in-failed", token=card.label, serial=card.serial, reason=str(error))
            log.error("%s", error)
            return
        self.session = session
        self.since = time.time()
        self.touch()
        self.state = "signed in"
        event("sign-in", subject=signed_in.files.subject, issuer=signed_in.files.issuer, token=card.label,
              serial=card.serial)
        self.audit.signed_in(signed_in, card)

    def _end(self, reason: str) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        started = time.monotonic()
        session.end(reason)
        event("sign-out", reason=reason, subject=session.signed_in.files.subject,
              token=self.card.label if self.card else None, serial=self.card.serial if self.card else None,
              closed_in_ms=round((time.monotonic() - started) * 1000))
        self.audit.signed_out(reason)
        self.since = None

    def shutdown(self) -> None:
        with self._lock:
            self._end("the agent is stopping")
