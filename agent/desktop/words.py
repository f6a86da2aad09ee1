"""The words a clinician reads: in the PIN dialog and in desktop notifications.

Plain language, no distinguished names, no jargon, no stack traces, never a PIN. The person is
named as their certificate names them (common name, else given name and surname); what the PIN is
for is the configured site label, else the tunnels' names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.x509.oid import NameOID

from dicom_card_agent.lifecycle.machine import SignInCause
from dicom_card_agent.logline import printable
from dicom_card_agent.token.discovery import PinState

DIALOG_PROMPT = "PIN:"
# Past these, the dialog says less: a name longer than a common name may be (RFC 5280: 64), and
# more tunnels than a clinician reads through in a dialog ("... and 41 more"). A dialog listing 45
# tunnels was too long for pinentry's line, which ended the program and failed every sign-in.
NAME_SHOWN = 64
TUNNELS_NAMED = 5


def person_name(certificate: x509.Certificate) -> str:
    """The certificate holder's name as a person reads it: the CN, else given name and surname."""
    subject = certificate.subject

    def first(oid: x509.ObjectIdentifier) -> str:
        values = subject.get_attributes_for_oid(oid)
        value = values[0].value if values else ""
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    name = first(NameOID.COMMON_NAME) or " ".join(p for p in (first(NameOID.GIVEN_NAME), first(NameOID.SURNAME)) if p)
    # Escaped: the name is written as it is into the terminal's PIN prompt and pinentry-tty's
    # dialog, where a certificate's control characters would drive the terminal.
    return printable(_shortened(_one_line(name), NAME_SHOWN)) or "the card holder"


def purpose(site_label: str, tunnel_names: Sequence[str]) -> str:
    """What the PIN is for: "Radiology PACS", or "the DICOM connections pacs and archive"."""
    if site_label:
        return site_label
    if not tunnel_names:
        return "the DICOM connections"
    names = list(tunnel_names)
    if len(names) > TUNNELS_NAMED:
        names = [*names[:TUNNELS_NAMED - 1], f"{len(names) - TUNNELS_NAMED + 1} more"]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"the DICOM connection{'s' if len(names) > 1 else ''} {listed}"


_TRIES_IN_DIALOG = {
    PinState.COUNT_LOW: "Only a few PIN tries are left: type your PIN carefully.",
    PinState.FINAL_TRY: "This is your last PIN try: a wrong PIN blocks the card.",
}


_CANCEL = "_Cancel"  # the underscore: Alt+C (pinentry mnemonics); Cancel is the default button


@dataclass(frozen=True)
class DialogWords:
    """Everything the PIN dialog shows. Before the PIN, ``first_question`` (a sign-in the clinician
    did not start by inserting her card) and then ``final_try_question`` are asked (OK/Cancel)."""

    title: str
    description: str
    prompt: str = DIALOG_PROMPT
    final_try_question: str | None = None
    final_try_ok: str = "_Use my last try"  # the underscore: Alt+U (pinentry mnemonics)
    final_try_cancel: str = _CANCEL
    person: str = ""  # whose card, as the dialog names them
    first_question: str | None = None
    first_ok: str = "_Sign in again"
    first_cancel: str = _CANCEL


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
    return DialogWords(title=f"Sign in: {name}", description=description, final_try_question=question, person=name)


# Why a PIN dialog opens that the clinician did not open by inserting her card, and the button that goes on.
_UNASKED: dict[SignInCause, tuple[str, str]] = {
    SignInCause.SESSION_LOST: ("Your DICOM session ended unexpectedly. Sign in again as {name}?", "_Sign in again"),
    SignInCause.RELOADED: ("Your DICOM session was restarted for new settings. Sign in again as {name}?",
                           "_Sign in again"),
    SignInCause.SIGN_IN_INTERRUPTED: ("Your sign-in was interrupted: the DICOM session ended unexpectedly. "
                                      "Sign in as {name}?", "_Sign in"),
    SignInCause.OVER_OTHER_PIN_DIALOG: ("This card was inserted while another card's PIN window was open. "
                                        "Sign in as {name}?", "_Sign in"),
    # The card never left its reader: say so, or she looks for what she did wrong.
    SignInCause.READER_RESTARTED: ("The card reader software restarted, which ended your DICOM sign-in. Your card "
                                   "was not removed. Sign in again as {name}?", "_Sign in again"),
}


def asking_first(words: DialogWords, cause: SignInCause) -> DialogWords:
    """``words`` for a sign-in the clinician did not ask for (``cause``): a question comes first,
    whose default, Cancel, uses no try, so that typing meant for another window is no PIN."""
    question, ok = _UNASKED[cause]
    return replace(words, first_question=f"{question.format(name=words.person)}\n\nCancel uses no try.", first_ok=ok)


def time_left(seconds: float) -> str:
    """How long until something, in the largest whole unit: "9 days", "1 hour", "25 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'' if count == 1 else 's'}"
    count = max(0, int(seconds))
    return f"{count} second{'' if count == 1 else 's'}"


def tries_left(state: PinState) -> str:
    """What a wrong PIN leaves, in words (PKCS#11 cards tell "few" and "one", never the number).
    A card that sets neither flag may have one try left as well as ten (many modules never set
    them, and PKCS#11 cannot tell such a module from a card with many tries): nothing is promised."""
    return {
        PinState.COUNT_LOW: "Only a few tries are left.",
        PinState.FINAL_TRY: "One try is left: the next wrong PIN blocks the card.",
    }.get(state, "The card did not say how many tries are left: type carefully.")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _shortened(text: str, length: int) -> str:
    return text if len(text) <= length else f"{text[:length - 1]}\u2026"
