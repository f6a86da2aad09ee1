"""The words a clinician reads: in the PIN dialog and in desktop notifications.

Plain language, no distinguished names, no jargon, no stack traces, never a PIN. The person is
named as their certificate names them (common name, else given name and surname); what the PIN is
for is the configured site label, else the tunnels' names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from dicom_card_agent.token.discovery import PinState

DIALOG_PROMPT = "PIN:"


def person_name(certificate: x509.Certificate) -> str:
    """The certificate holder's name as a person reads it: the CN, else given name and surname."""
    subject = certificate.subject

    def first(oid: x509.ObjectIdentifier) -> str:
        values = subject.get_attributes_for_oid(oid)
        value = values[0].value if values else ""
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    name = first(NameOID.COMMON_NAME) or " ".join(p for p in (first(NameOID.GIVEN_NAME), first(NameOID.SURNAME)) if p)
    return _one_line(name) or "the card holder"


def purpose(site_label: str, tunnel_names: Sequence[str]) -> str:
    """What the PIN is for: "Radiology PACS", or "the DICOM connections pacs and archive"."""
    if site_label:
        return site_label
    if not tunnel_names:
        return "the DICOM connections"
    names = list(tunnel_names)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"the DICOM connection{'s' if len(names) > 1 else ''} {listed}"


_TRIES_IN_DIALOG = {
    PinState.COUNT_LOW: "Only a few PIN tries are left: type your PIN carefully.",
    PinState.FINAL_TRY: "This is your last PIN try: a wrong PIN blocks the card.",
}


@dataclass(frozen=True)
class DialogWords:
    """Everything the PIN dialog shows; ``final_try_question`` is asked (OK/Cancel) before the PIN."""

    title: str
    description: str
    prompt: str = DIALOG_PROMPT
    final_try_question: str | None = None
    final_try_ok: str = "_Use my last try"  # the underscore: Alt+U (pinentry mnemonics)
    final_try_cancel: str = "_Cancel"


def pin_dialog(name: str, what_for: str, state: PinState, helpdesk: str, *, ask_final_try: bool) -> DialogWords:
    """The PIN dialog for ``name``'s card; ``ask_final_try``: confirm the last try in the dialog first."""
    description = f"{name}, enter the PIN of your card to use {what_for}."
    warning = _TRIES_IN_DIALOG.get(state)
    if warning:
        description += f"\n\n{warning}"
    question = None
    if ask_final_try and state is PinState.FINAL_TRY:
        question = (f"{name}, your card has one PIN try left. If the next PIN is wrong, the card is blocked "
                    f"and only {helpdesk} can unblock it.\n\nContinue only if you are sure of your PIN. "
                    "Cancel uses no try.")
    return DialogWords(title=f"Sign in: {name}", description=description, final_try_question=question)


def tries_left(state: PinState) -> str:
    """What a wrong PIN leaves, in words (PKCS#11 cards tell "few" and "one", never the number)."""
    return {
        PinState.COUNT_LOW: "Only a few tries are left.",
        PinState.FINAL_TRY: "One try is left: the next wrong PIN blocks the card.",
    }.get(state, "The card has more tries left.")


def _one_line(text: str) -> str:
    return " ".join(text.split())
