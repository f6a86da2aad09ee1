"""Where a PIN comes from: ``prompt``, ``env:VAR``, ``file:PATH`` or ``protected`` (PIN pad).

A PIN source hands out the PIN once per login attempt and keeps no copy.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys
from dataclasses import dataclass

from agent.errors import CardAgentError, ConfigError
from agent.token.pinentry import Pinentry

PROTECTED = "protected"


class PinUnavailableError(CardAgentError):
    """The configured PIN source cannot give a PIN."""


@dataclass(frozen=True)
class PinSource:
    kind: str  # "prompt" | "pinentry" | "env" | "file" | "protected"
    target: str = ""

    @classmethod
    def parse(cls, text: str) -> PinSource:
        kind, _, target = text.partition(":")
        if text in ("prompt", PROTECTED):
            return cls(text)
        if text == "pinentry":
            return cls("pinentry", "pinentry")
        if kind == "pinentry" and target:
            return cls(kind, target)
        if kind in ("env", "file") and target:
            return cls(kind, target)
        raise ConfigError(
            f"invalid PIN source {text!r}: use prompt, pinentry[:PROGRAM], protected (PIN-pad reader), "
            "env:VARIABLE or file:PATH"
        )

    @property
    def is_protected(self) -> bool:
        return self.kind == PROTECTED

    def read(self, prompt: str) -> str:
        """The PIN; ``prompt`` says which token and what the card reports, for interactive sources."""
        if self.kind == "env":
            value = os.environ.get(self.target)
            if not value:
                raise PinUnavailableError(f"the PIN variable {self.target} is not set or empty")
            return value
        if self.kind == "file":
            return _read_pin_file(self.target)
        if self.kind == "pinentry":
            return Pinentry(self.target).get_pin(prompt)
        if self.kind == "prompt":
            if not sys.stdin.isatty():
                raise PinUnavailableError(
                    "a PIN is needed but there is no terminal to ask on; use a pinentry, env:VAR or file:PATH PIN source"
                )
            value = getpass.getpass(prompt)
            if not value:
                raise PinUnavailableError("no PIN entered")
            return value
        raise PinUnavailableError("a protected-path token takes the PIN on the reader, not from the agent")

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}" if self.target else self.kind


def _read_pin_file(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError as error:
        raise PinUnavailableError(f"cannot read PIN file {path}: {error.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PinUnavailableError(
            f"PIN file {path} is readable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
            f"run `chmod 600 {path}` first"
        )
    with open(path, encoding="utf-8") as handle:
        value = handle.readline().rstrip("\r\n")
    if not value:
        raise PinUnavailableError(f"PIN file {path} is empty")
    return value


class RememberedPin:
    """A PIN source that keeps the PIN it handed out, for a sign-in that must pass it on once
    (to the card-session process); :meth:`forget` drops it."""

    def __init__(self, source: PinSource) -> None:
        self.source = source
        self.value: str | None = None

    @property
    def is_protected(self) -> bool:
        return self.source.is_protected

    def read(self, prompt: str) -> str:
        self.value = self.source.read(prompt)
        return self.value

    def forget(self) -> None:
        self.value = None
