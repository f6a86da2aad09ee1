"""PIN login that never burns a retry on its own.

Before each attempt the token's PIN flags are read again: a locked PIN is refused with what to
do, a final try needs the caller's explicit confirmation, a low count is warned about. A wrong
PIN is reported with what the card then says and is never retried here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from pkcs11 import PROTECTED_AUTH, TokenFlag
from pkcs11.exceptions import PinExpired, PinIncorrect, PinInvalid, PinLenRange, PinLocked, UserAlreadyLoggedIn
from pkcs11.types import Session, Token

from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.token.discovery import PinState, refresh, token_serial
from dicom_card_agent.token.secret import Secret

log = logging.getLogger(__name__)


class LoginError(CardAgentError):
    """Logging in to the token did not happen; the message says what the card reports."""


class PinLockedError(LoginError):
    pass


class PinFinalTryError(LoginError):
    pass


class WrongPinError(LoginError):
    def __init__(self, message: str, pin_state: PinState) -> None:
        super().__init__(message)
        self.pin_state = pin_state


class PinNotInitializedError(LoginError):
    pass


class PinExpiredError(LoginError):
    """The card accepted no sign-in until its PIN is changed (CKR_PIN_EXPIRED)."""


def waiting_reason(error: LoginError) -> str:
    """What ``status`` says while the card waits after this refused login: what happened, then the
    one thing that helps (re-inserting helps only after a wrong PIN)."""
    if isinstance(error, PinLockedError) or (isinstance(error, WrongPinError) and error.pin_state is PinState.LOCKED):
        return "PIN blocked: the card must be unblocked (PUK or card administrator) before it can sign in"
    if isinstance(error, PinFinalTryError):
        return ("one PIN try left, not tried: confirm the final try in the PIN dialog (pin = \"pinentry\") "
                "or with --confirm-final-try")
    if isinstance(error, PinExpiredError):
        return "the card's PIN has expired: it must be changed before the card can sign in"
    if isinstance(error, PinNotInitializedError):
        return "the card has no user PIN set: it must be initialised before it can sign in"
    return "PIN not accepted: remove and re-insert the card to try again"


_STATE_WORDS = {
    PinState.OK: "no retry warning (PKCS#11 does not tell the exact number of tries left)",
    PinState.COUNT_LOW: "few PIN tries left",
    PinState.FINAL_TRY: "ONE PIN try left: the next wrong PIN locks the card",
    PinState.LOCKED: "the PIN is now locked",
    PinState.TO_BE_CHANGED: "the PIN must be changed",
    PinState.NOT_INITIALIZED: "no user PIN set",
}


def describe_pin_state(state: PinState) -> str:
    return _STATE_WORDS[state]


def _name(token: Token) -> str:
    return f"token {token.label!r} (serial {token_serial(token)})"


def locked_advice(token: Token) -> str:
    return (
        f"the user PIN of {_name(token)} is locked after too many wrong PINs; the agent will not "
        "try it. Ask your card administrator to unblock it with the PUK or SO PIN "
        "(e.g. `pkcs11-tool --unlock-pin --login --login-type so`), then sign in again"
    )


class PinReader(Protocol):
    """A PIN source: a fresh :class:`Secret` per :meth:`read`, which :func:`login` wipes."""

    @property
    def is_protected(self) -> bool: ...

    def read(self, prompt: str) -> Secret: ...


def check_before_login(
    token: Token,
    pin_source: PinReader,
    *,
    confirm_final_try: bool = False,
    warn: Callable[[str], None] = log.warning,
) -> PinState:
    """What the card says about its PIN now; raises when no attempt may be made (nothing is tried)."""
    flags = int(token.flags)
    state = PinState.from_flags(flags)
    if state is PinState.LOCKED:
        raise PinLockedError(locked_advice(token))
    if state is PinState.NOT_INITIALIZED:
        raise PinNotInitializedError(f"{_name(token)} has no user PIN set; initialise the card first")
    if state is PinState.FINAL_TRY and not confirm_final_try:
        raise PinFinalTryError(
            f"{_name(token)} has one PIN try left: a wrong PIN will lock the card. Nothing was tried. "
            "A PIN dialog (pin = \"pinentry\") asks the card holder to confirm the final try; with another PIN "
            "source an administrator who is sure of the PIN confirms it explicitly (--confirm-final-try)"
        )
    if state is PinState.COUNT_LOW:
        warn(f"{_name(token)} reports few PIN tries left: type the PIN carefully")
    if pin_source.is_protected and not flags & TokenFlag.PROTECTED_AUTHENTICATION_PATH:
        raise ConfigError(
            f"PIN source is 'protected' but {_name(token)} has no protected authentication path "
            "(PIN pad); use prompt, env:VAR or file:PATH"
        )
    return state


_PROMPT_WARNINGS = {
    PinState.COUNT_LOW: "few tries left",
    PinState.FINAL_TRY: "last try: a wrong PIN blocks the card",
}


def pin_prompt(token: Token, state: PinState, who: str | None) -> str:
    """A terminal prompt (the PIN dialog's words are agent/desktop/words.py's): whose card, and a
    warning only when the card gives one."""
    as_who = f" ({who})" if who else ""
    warning = _PROMPT_WARNINGS.get(state)
    return f"PIN of card {token.label!r}{as_who}{f', {warning}' if warning else ''}: "


def login(
    token: Token,
    pin_source: PinReader,
    *,
    confirm_final_try: bool = False,
    warn: Callable[[str], None] = log.warning,
    who: str | None = None,
) -> Session:
    """Open a session logged in as the user, with at most one PIN attempt; ``who`` (the certificate
    subject) is shown when asking for the PIN."""
    token = refresh(token)
    state = check_before_login(token, pin_source, confirm_final_try=confirm_final_try, warn=warn)
    secret = None if pin_source.is_protected else pin_source.read(pin_prompt(token, state, who))
    try:
        # The PIN reaches C_Login straight from the secret's buffer: no str or bytes copy of it.
        return token.open(user_pin=PROTECTED_AUTH if secret is None else secret.for_pkcs11())
    except UserAlreadyLoggedIn:
        # PKCS#11 login state is per application: another session of this process is logged in.
        return token.open()
    except PinIncorrect:
        after = PinState.from_flags(int(refresh(token).flags))
        raise WrongPinError(
            f"wrong PIN for {_name(token)}; the card now reports: {describe_pin_state(after)}. "
            "The agent does not try again on its own",
            after,
        ) from None
    except PinLocked:
        raise PinLockedError(locked_advice(token)) from None
    except PinExpired:
        raise PinExpiredError(f"the PIN of {_name(token)} has expired: the card accepts no sign-in until it is "
                              "changed (with the card's PIN tool, e.g. `pkcs11-tool --change-pin`)") from None
    except (PinLenRange, PinInvalid):
        raise LoginError(
            f"the PIN for {_name(token)} has a length or characters the card does not accept; check it and try again"
        ) from None
    finally:
        if secret is not None:
            secret.wipe()
