"""The card-session process's first task: find the card's token and say what it holds, before any PIN.

A card-session process is started for each inserted card, before the PIN dialog. It loads the
PKCS#11 module (OpenSC probes the card then: ~2 s on a real card), finds the token, reads its public
objects (certificates, key attributes: no login, no PIN try) and what the token says about its PIN,
and answers with a :class:`FoundCard`. The supervisor chooses the identity from it, asks for the
PIN and sends it to the same process, which logs in and does the card's TLS: the card is probed once
per sign-in, by the process that then uses it, and the supervisor never loads OpenSC for it
(docs/card-lifecycle.md, "One probe per sign-in").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pkcs11.types import Token

from dicom_card_agent.card.pcsc import held_exclusively
from dicom_card_agent.card.watcher import Card
from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.token.discovery import (
    AmbiguousTokenError,
    NoSuchTokenError,
    PinState,
    find_token,
    matching_tokens,
    token_list,
    token_serial,
    tokens_in,
)
from dicom_card_agent.token.identities import Identity, list_identities
from dicom_card_agent.token.module import LoadedModule, load_module

SLOT_DESCRIPTION_LENGTH = 64  # CK_SLOT_INFO.slotDescription: OpenSC puts the reader's name there, cut to this


class CardInUseError(CardAgentError):
    """Another program holds the card for itself: it cannot be read now, and may be later."""


@dataclass(frozen=True)
class ProbeRequest:
    """Which card to probe: a token by selector (the supervisor saw it through the module), or the
    card in a PC/SC reader (the supervisor saw it through pcscd alone); ``module``, the path of the
    module the supervisor chose (``module = "auto"`` is resolved once, there), which the session's
    OpenSSL configuration names too."""

    module: str
    token: str | None = None
    reader: str | None = None
    confirm_final_try: bool = False

    def to_message(self) -> dict[str, Any]:
        return {"type": "probe", "module": self.module, "token": self.token, "reader": self.reader,
                "confirm_final_try": self.confirm_final_try}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> ProbeRequest:
        return cls(message["module"], message.get("token"), message.get("reader"),
                   bool(message.get("confirm_final_try")))


@dataclass(frozen=True)
class FoundCard:
    """What a probed card holds, as far as can be known without a login."""

    card: Card
    identities: list[Identity]
    pin_state: PinState

    def to_message(self) -> dict[str, Any]:
        return {"type": "card", "label": self.card.label, "serial": self.card.serial,
                "identities": [identity.to_message() for identity in self.identities],
                "pin_state": self.pin_state.value}

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> FoundCard:
        return cls(Card(message["label"], message["serial"]),
                   [Identity.from_message(identity) for identity in message["identities"]],
                   PinState(message["pin_state"]))


@dataclass(frozen=True)
class Probed:
    """The probe's result in the card-session process: the module and token it goes on with."""

    module: LoadedModule
    token: Token
    found: FoundCard


def probe(config: AgentConfig, request: ProbeRequest) -> Probed:
    """Load the module, find the token and read what it shows without a login. Raises
    :class:`NoSuchTokenError` when the card holds no token the configuration accepts, a PKCS#11
    error when the card cannot be read (pulled mid-way). Whether a PIN attempt may be made is the
    caller's to check (:func:`check_before_login`), once it can name the card in its answer."""
    # pcscd is asked before the module looks at the card as well as after: a program that held the
    # card for itself while the module looked, and let go before the second question, left the
    # module a slot without a token: a card in use, not one the module cannot drive.
    held_before = bool(not request.token and request.reader and held_exclusively(request.reader))
    module = load_module(request.module)
    token = find_token(module, request.token) if request.token else _token_in_reader(
        module, request.reader or "", config.identity.token, held_before=held_before)
    with token.open() as public_session:
        identities = list_identities(public_session, token, module.profile, logged_in=False,
                                     allow_exportable_keys=config.identity.allow_exportable_keys)
    found = FoundCard(Card(token.label, token_serial(token)), identities, PinState.from_flags(int(token.flags)))
    return Probed(module, token, found)


def _token_in_reader(module: LoadedModule, reader: str, selector: str | None, *, held_before: bool) -> Token:
    """The token of the card in ``reader`` (OpenSC names a reader's slots after it), the one that
    ``[identity] token`` selects when it is set. ``held_before``: another program held the card for
    itself just before the module looked."""
    name = reader[:SLOT_DESCRIPTION_LENGTH].strip()
    slots = [slot for slot in module.slots_with_token() if slot.slot_description.strip() == name]
    tokens = tokens_in(slots)
    if not tokens and (held_before or held_exclusively(reader)):
        raise CardInUseError(f"the card in reader {reader!r} is held by another program for itself (a smart-card "
                             "middleware, such as GnuPG's scdaemon): it is read again once it is free")
    if not tokens:
        raise NoSuchTokenError(f"the card in reader {reader!r} holds no token {module.path} knows (profile "
                               f"{module.profile.name}): is it a card this module drives?")
    if selector:
        chosen = matching_tokens(tokens, selector)
        if not chosen:
            raise NoSuchTokenError(f"the card in reader {reader!r} holds {token_list(tokens)}, not [identity] token "
                                   f"{selector!r}")
        tokens = chosen
    if len(tokens) > 1:
        raise AmbiguousTokenError(f"the card in reader {reader!r} holds several tokens: {token_list(tokens)}; "
                                  "choose one with [identity] token")
    return tokens[0]
