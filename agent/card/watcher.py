"""Which card is present now.

Polling ``C_GetSlotList(tokenPresent)`` is cheap (microseconds on SoftHSM, ~10 ms on OpenSC with
pcscd) and works with every module; python-pkcs11's ``wait_for_slot_event`` loses the slot id
(design notes, section 2). Every PKCS#11 error while looking counts as "no card": after a removal
modules answer with CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SESSION_HANDLE_INVALID or, for
SoftHSM, CKR_GENERAL_ERROR.
"""

from __future__ import annotations

from dataclasses import dataclass

from pkcs11.exceptions import PKCS11Error

from agent.token.discovery import matching_tokens, present_tokens, token_serial
from agent.token.module import LoadedModule

POLL_SECONDS = 0.05  # removal must be observed within 250 ms


@dataclass(frozen=True)
class Card:
    """A token in a slot, identified by label and serial (slot ids are not stable)."""

    label: str
    serial: str

    @property
    def selector(self) -> str:
        return f"pkcs11:token={self.label};serial={self.serial}"

    def __str__(self) -> str:
        return f"{self.label!r} (serial {self.serial})"


def present_card(module: LoadedModule, selector: str | None) -> Card | None:
    """The card the configuration accepts (any card when ``selector`` is empty), if one is present."""
    try:
        tokens = present_tokens(module)
        if selector:
            tokens = matching_tokens(tokens, selector)
        return Card(tokens[0].label, token_serial(tokens[0])) if tokens else None
    except PKCS11Error:
        return None
