"""PIN sources: env, file and prompt, with errors that say what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_runner import start_agent, stop_agent, tunnel, with_virtualenv_packages, write_config
from conftest import ProvisionedPki
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.token.pin import PinSource, PinUnavailableError
from dicom_card_agent.token.terminal import TerminalUnusableError, pin_as_utf8


@pytest.mark.parametrize("text", ["", "env:", "file", "pinentry-ish", "sms:123"])
def test_invalid_sources(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid PIN source"):
        PinSource.parse(text)


def test_env_source_takes_the_pin_out_of_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARD_PIN_SOURCE_TEST", "123456")
    source = PinSource.parse("env:CARD_PIN_SOURCE_TEST")
    source.prepare()
    assert "CARD_PIN_SOURCE_TEST" not in os.environ
    for _ in range(2):  # the kept copy serves every later sign-in
        with source.read("PIN: ") as pin:
            assert bytes(pin.view()) == b"123456"
    with pytest.raises(PinUnavailableError, match="CARD_PIN_UNSET_TEST is not set"):
        PinSource.parse("env:CARD_PIN_UNSET_TEST").read("PIN: ")


def test_file_source_must_be_private(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("123456\n")
    pin_file.chmod(0o644)
    with pytest.raises(PinUnavailableError, match=f"chmod 600 {pin_file}"):
        PinSource.parse(f"file:{pin_file}").read("PIN: ")
    pin_file.chmod(0o600)
    assert bytes(PinSource.parse(f"file:{pin_file}").read("PIN: ").view()) == b"123456"


def test_file_source_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("123456\n")
    pin_file.chmod(0o600)
    os.chown(pin_file, 65534, -1)  # nobody's: that user could put the PIN it wants tried there
    with pytest.raises(PinUnavailableError) as refused:
        PinSource.parse(f"file:{pin_file}").prepare()
    assert str(refused.value) == (
        f"PIN file {pin_file} belongs to uid 65534, not to the agent's user (uid {os.getuid()}): another user "
        f"could change the PIN the agent tries; run `chown {os.getuid()} {pin_file}` (as root) or point file: at "
        "a file the agent's user owns")


def test_prompt_without_terminal_says_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    with pytest.raises(PinUnavailableError, match="no terminal"):
        PinSource.parse("prompt").read("PIN: ")


def test_protected_source_gives_no_pin() -> None:
    source = PinSource.parse("protected")
    assert source.is_protected
    with pytest.raises(PinUnavailableError):
        source.read("PIN: ")


def test_agent_refuses_a_pin_file_of_another_user_before_it_is_ready(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("123456\n")
    pin_file.chmod(0o600)
    os.chown(pin_file, 65534, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          identity={"pin": f"file:{pin_file}"})
    process = start_agent(config, tmp_path / "agent.log", test_pki.env())
    try:
        process.wait(30)
    finally:
        stop_agent(process)  # the old agent accepted the file and kept running
    assert process.returncode == 2
    log = (tmp_path / "agent.log").read_text()
    assert "ready:" not in log and "event=card-inserted" not in log
    assert log.splitlines()[-1] == (
        f"card-agent: error: {config} [identity].pin: PIN file {pin_file} belongs to uid 65534, "
        f"not to the agent's user (uid {os.getuid()}): "
        f"another user could change the PIN the agent tries; run `chown {os.getuid()} {pin_file}` (as root) or "
        "point file: at a file the agent's user owns")


ENVIRON_CHECK = """
import sys
from dicom_card_agent.token.secret import take_environment_variable
secret = take_environment_variable("CARD_PIN")
environ = open("/proc/self/environ", "rb").read()
sys.exit(0 if secret is not None and b"9137-42-pin" not in environ else 1)
"""


@pytest.mark.parametrize("python", [sys.executable, "/usr/bin/python3"], ids=["virtualenv", "debian"])
def test_the_env_pin_leaves_proc_environ_with_every_python(python: str) -> None:
    # Debian's python3 is not position-independent: libc's `environ` symbol stayed NULL there, so
    # the value was left in /proc/PID/environ (the package will run on that interpreter).
    if not Path(python).exists():
        pytest.fail(f"{python} is missing") if os.environ.get("CI") else pytest.skip(f"{python} is missing")
    env = with_virtualenv_packages({"CARD_PIN": "9137-42-pin", "PATH": os.environ["PATH"]})
    result = subprocess.run([python, "-c", ENVIRON_CHECK], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


TYPED_ON_A_TERMINAL = [
    # (what the terminal sends, its encoding, what goes to C_Login)
    (b"123456", "iso8859-1", b"123456"),
    ("Zürich-7".encode("iso8859-1"), "iso8859-1", "Zürich-7".encode()),
    ("Zürich-7".encode(), "utf-8", "Zürich-7".encode()),
    ("Zürich-7".encode(), "UTF8", "Zürich-7".encode()),
]


@pytest.mark.parametrize(("typed", "encoding", "sent"), TYPED_ON_A_TERMINAL)
def test_a_pin_typed_on_the_terminal_goes_to_the_card_in_utf8(typed: bytes, encoding: str, sent: bytes) -> None:
    """PKCS#11 PINs are UTF-8; a terminal sends its own encoding. getpass decoded it by the locale and
    the agent encoded UTF-8; the bytes read now are converted the same way (only when they differ)."""
    buffer = bytearray(64)
    buffer[:len(typed) + 1] = typed + b"\n"
    with pin_as_utf8(buffer, len(typed), encoding) as secret:
        assert secret.view().tobytes() == sent


def test_a_pin_the_terminals_encoding_cannot_read_is_not_sent() -> None:
    buffer = bytearray(b"Z\xfcrich\n" + bytes(8))
    with pytest.raises(TerminalUnusableError, match="^the PIN typed is not ascii text, the terminal's encoding "
                       r"\(LANG, LC_ALL\): nothing was sent to the card$"):
        pin_as_utf8(buffer, 6, "ascii")
