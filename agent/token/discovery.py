"""Finding tokens: list what the module shows and select one by label, serial or RFC 7512 URI."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pkcs11 import TokenFlag
from pkcs11.types import Token

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.token.module import LoadedModule
from dicom_card_agent.token.uri import Pkcs11Uri, is_pkcs11_uri


class NoSuchTokenError(CardAgentError):
    """No token matches the selector."""


class AmbiguousTokenError(CardAgentError):
    """Several tokens match the selector."""


class PinState(StrEnum):
    """What the token says about its user PIN, from ``CK_TOKEN_INFO.flags``."""

    OK = "ok"
    COUNT_LOW = "count-low"
    FINAL_TRY = "final-try"
    LOCKED = "locked"
    NOT_INITIALIZED = "not-initialized"
    TO_BE_CHANGED = "to-be-changed"

    @classmethod
    def from_flags(cls, flags: int) -> PinState:
        # Most severe first: a locked PIN usually also carries COUNT_LOW.
        if flags & TokenFlag.USER_PIN_LOCKED:
            return cls.LOCKED
        if not flags & TokenFlag.USER_PIN_INITIALIZED:
            return cls.NOT_INITIALIZED
        if flags & TokenFlag.USER_PIN_FINAL_TRY:
            return cls.FINAL_TRY
        if flags & TokenFlag.USER_PIN_COUNT_LOW:
            return cls.COUNT_LOW
        if flags & TokenFlag.USER_PIN_TO_BE_CHANGED:
            return cls.TO_BE_CHANGED
        return cls.OK


@dataclass(frozen=True)
class TokenDescription:
    slot_id: int
    slot_description: str
    label: str
    serial: str
    manufacturer: str
    model: str
    pin_state: PinState
    protected_authentication_path: bool
    login_required: bool
    initialized: bool

    @property
    def uri(self) -> Pkcs11Uri:
        return Pkcs11Uri(token=self.label, serial=self.serial, manufacturer=self.manufacturer, model=self.model)

    def as_dict(self) -> dict[str, object]:
        return {
            "slot_id": self.slot_id,
            "slot": self.slot_description,
            "label": self.label,
            "serial": self.serial,
            "manufacturer": self.manufacturer,
            "model": self.model,
            "pin_state": self.pin_state.value,
            "protected_authentication_path": self.protected_authentication_path,
            "initialized": self.initialized,
            "uri": str(self.uri),
        }


def token_serial(token: Token) -> str:
    return token.serial.decode("ascii", "replace").strip()


def describe(token: Token) -> TokenDescription:
    flags = int(token.flags)
    return TokenDescription(
        slot_id=token.slot.slot_id,
        slot_description=token.slot.slot_description,
        label=token.label,
        serial=token_serial(token),
        manufacturer=token.manufacturer_id,
        model=token.model,
        pin_state=PinState.from_flags(flags),
        protected_authentication_path=bool(flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH),
        login_required=bool(flags & TokenFlag.LOGIN_REQUIRED),
        initialized=bool(flags & TokenFlag.TOKEN_INITIALIZED),
    )


def present_tokens(module: LoadedModule, *, initialized_only: bool = True) -> list[Token]:
    """Tokens in slots that have one, each with fresh ``CK_TOKEN_INFO``.

    Blank tokens (SoftHSM always offers one to initialise) hold no identity and are left out
    unless ``initialized_only`` is False.
    """
    return tokens_in(module.slots_with_token(), initialized_only=initialized_only)


def tokens_in(slots: list, *, initialized_only: bool = True) -> list[Token]:
    """The tokens of ``slots`` (slots with a token), each with fresh ``CK_TOKEN_INFO``: one
    ``C_GetTokenInfo`` each, which costs a card round trip with some modules (OpenSC asks the card
    for the PIN's retry counter)."""
    tokens = [slot.get_token() for slot in slots]
    if initialized_only:
        tokens = [t for t in tokens if t.flags & TokenFlag.TOKEN_INITIALIZED]
    return tokens


def refresh(token: Token) -> Token:
    """The same token with its flags read again (python-pkcs11 caches ``CK_TOKEN_INFO``)."""
    return token.slot.get_token()


def matching_tokens(tokens: list[Token], selector: str) -> list[Token]:
    """The tokens a label, serial or ``pkcs11:`` URI selects (label before serial)."""
    if is_pkcs11_uri(selector):
        uri = Pkcs11Uri.parse(selector)
        return [t for t in tokens
                if uri.matches_token(label=t.label, serial=token_serial(t), manufacturer=t.manufacturer_id,
                                     model=t.model)]
    return [t for t in tokens if t.label == selector] or [t for t in tokens if token_serial(t) == selector]


def token_list(tokens: list[Token]) -> str:
    """``'alice' (serial 8a3f...), 'bob' (serial ...)``, for messages."""
    return ", ".join(f"{t.label!r} (serial {token_serial(t)})" for t in tokens)


def find_token(module: LoadedModule, selector: str) -> Token:
    """The one token whose label or serial equals ``selector``, or that a ``pkcs11:`` URI selects."""
    tokens = present_tokens(module)
    matches = matching_tokens(tokens, selector)
    if len(matches) == 1:
        return matches[0]
    present = token_list(tokens) or "none"
    if not matches:
        raise NoSuchTokenError(
            f"no token {selector!r} in {module.path} (profile {module.profile.name}); tokens present: {present}"
        )
    raise AmbiguousTokenError(
        f"{len(matches)} tokens match {selector!r}: {present}; select one by serial or a pkcs11: URI with serial="
    )
