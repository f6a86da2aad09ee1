"""PIN sources: env, file and prompt, with errors that say what to do."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.token.pin import PinSource, PinUnavailableError


@pytest.mark.parametrize("text", ["", "env:", "file", "pinentry-ish", "sms:123"])
def test_invalid_sources(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid PIN source"):
        PinSource.parse(text)


def test_env_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARD_PIN", "123456")
    assert PinSource.parse("env:CARD_PIN").read("PIN: ") == "123456"
    monkeypatch.delenv("CARD_PIN")
    with pytest.raises(PinUnavailableError, match="CARD_PIN is not set"):
        PinSource.parse("env:CARD_PIN").read("PIN: ")


def test_file_source_must_be_private(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("123456\n")
    pin_file.chmod(0o644)
    with pytest.raises(PinUnavailableError, match=f"chmod 600 {pin_file}"):
        PinSource.parse(f"file:{pin_file}").read("PIN: ")
    pin_file.chmod(0o600)
    assert PinSource.parse(f"file:{pin_file}").read("PIN: ") == "123456"


def test_prompt_without_terminal_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(PinUnavailableError, match="no terminal"):
        PinSource.parse("prompt").read("PIN: ")


def test_protected_source_gives_no_pin() -> None:
    source = PinSource.parse("protected")
    assert source.is_protected
    with pytest.raises(PinUnavailableError):
        source.read("PIN: ")
