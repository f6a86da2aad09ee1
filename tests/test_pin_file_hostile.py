"""The ``file:`` PIN source against a hostile file system: a PIN file in a directory another user can
write (uid 65534 swaps it for a symbolic link to another 0600 file of the agent's user, whose first
line would go to ``C_Login``), and a FIFO as the PIN file (an open for reading waits for a writer:
the agent hung). Each must stop the agent before it is ready, at once, with a message that says why."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_runner import start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki
from peers.ports import free_port

AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A directory uid 65534 can write, in one it can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="pin-file-hostile-", dir="/tmp"))
    base.chmod(0o755)
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    try:
        yield shared
    finally:
        shutil.rmtree(base)


def ended_within(test_pki: ProvisionedPki, workdir: Path, pin_file: Path, seconds: float) -> tuple[int | None, str]:
    """Start the agent with ``pin_file`` as its PIN source: its exit status if it ended within
    ``seconds`` (None if it was still running, and was stopped), and its log."""
    config = write_config(workdir / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          identity={"pin": f"file:{pin_file}"})
    process = start_agent(config, workdir / "agent.log", test_pki.env())
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        pass
    finally:
        status = process.poll()
        stop_agent(process)
    return status, (workdir / "agent.log").read_text()


def test_a_pin_file_in_a_directory_others_can_write_is_refused(
        test_pki: ProvisionedPki, tmp_path: Path, shared_directory: Path) -> None:
    pin_file = shared_directory / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    status, log = ended_within(test_pki, tmp_path, pin_file, 30)
    assert status == 2, log  # the old agent checked the file alone, and became ready
    assert "ready:" not in log
    assert log.splitlines()[-1].endswith(
        f"[identity].pin: refusing to use the PIN file {pin_file}: the directory {shared_directory} above it is "
        "writable by group and others (mode 0777), so another user could put the PIN the agent tries on the card "
        "there (spending the card's tries), or swap it for another file; "
        f"run `chmod go-w {shared_directory}`")


def test_a_pin_file_swapped_for_a_link_by_another_user_is_refused(
        test_pki: ProvisionedPki, tmp_path: Path, shared_directory: Path) -> None:
    pin_file = shared_directory / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o600)
    decoy = shared_directory.parent / "pgpass"  # another file of the agent's user, mode 0600
    decoy.write_text("db.example:5432:*:admin:S3cretDbPassword\n")
    decoy.chmod(0o600)
    swap_for_a_link = f"mv {pin_file} {shared_directory}/.old && ln -s {decoy} {pin_file}"
    swap = subprocess.run([*AS_NOBODY, "sh", "-c", swap_for_a_link], capture_output=True, text=True, timeout=30)
    assert swap.returncode == 0, swap.stderr
    assert pin_file.is_symlink() and os.lstat(pin_file).st_uid == 65534
    status, log = ended_within(test_pki, tmp_path, pin_file, 30)
    assert status == 2, log  # the old agent followed the link, and tried the decoy's first line as the PIN
    assert "ready:" not in log and "S3cret" not in log
    assert f"refusing to use the PIN file {pin_file}: the directory {shared_directory} above it is writable" \
        in log.splitlines()[-1]


def test_a_pin_file_that_is_a_link_is_refused_in_a_safe_directory(tmp_path: Path) -> None:
    from dicom_card_agent.token.pin import PinSource, PinUnavailableError
    target = tmp_path / "real-pin"
    target.write_text(USER_PIN + "\n")
    target.chmod(0o600)
    link = tmp_path / "pin"
    link.symlink_to(target)
    with pytest.raises(PinUnavailableError) as refused:
        PinSource.parse(f"file:{link}").read("PIN: ")
    assert str(refused.value) == (
        f"PIN file {link} is a symbolic link: the agent opens only the file itself, so that nobody can point it "
        "elsewhere; point file: at the file it links to")


def test_a_fifo_as_pin_file_is_refused_at_once(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    fifo = tmp_path / "pin.fifo"
    os.mkfifo(fifo, 0o600)
    started = time.monotonic()
    status, log = ended_within(test_pki, tmp_path, fifo, 30)
    assert status == 2, log  # the old agent opened the FIFO and waited for a writer: it hung
    assert time.monotonic() - started < 20
    assert log.splitlines()[-1].endswith(
        f"[identity].pin: PIN file {fifo} is not a regular file (it is a FIFO (named pipe)): the agent reads the PIN "
        "only from a regular file; point file: at one")
