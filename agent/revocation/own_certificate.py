"""The card's own certificate, checked again while its card session serves.

A card reported stolen or lost is revoked by its CA; the card session that holds it signed in went
on serving until the card was pulled, and a PACS that resumes TLS sessions without checking
revocation again accepted it. The card-session process's checker learns new CRLs (files re-read
when they change, distribution points fetched again) and OCSP answers as it runs; this asks it
about the card's certificate every :data:`CHECK_SECONDS`, and tells the supervisor
(:data:`CARD_REVOKED`) the first time it is revoked, which ends the session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509

from dicom_card_agent.revocation.checker import RevocationChecker

log = logging.getLogger("agent.revocation")

CHECK_SECONDS = 2.0  # as often as the CRL files are looked at for changes (agent/trust/crls.py)
CARD_REVOKED = "card-revoked"  # the report of a card session whose certificate is revoked (agent/session/manager.py)


class OwnCertificateWatch:
    """Asks ``checker`` about ``leaf`` (the card's certificate) in a thread of its own, from
    :meth:`start` until it is found revoked, which ``report`` is told once, with the checker's words."""

    def __init__(self, checker: RevocationChecker, leaf: x509.Certificate,
                 report: Callable[[str, dict[str, Any]], None]) -> None:
        self.checker = checker
        self.leaf = leaf
        self.report = report

    def start(self) -> None:
        """Watch until the process ends (with its session) or the certificate is found revoked."""
        threading.Thread(target=self._watch, name="own-certificate", daemon=True).start()

    def _watch(self) -> None:
        failing = False
        while True:
            time.sleep(CHECK_SECONDS)
            try:
                verdict = self.checker.check(self.leaf, "require")
            except Exception:  # a checker's bug must not end the session it watches: said once per episode
                if not failing:
                    log.exception("checking the card's certificate for revocation")
                failing = True
                continue
            failing = False
            if verdict.revoked:
                log.warning("the card's certificate is revoked: %s; the card session ends", verdict.message)
                self.report(CARD_REVOKED, {"reason": verdict.message})
                return
