"""`card-agent` imports what the command it runs needs, and no more: `status` and `lock` (an
administrator's monitoring asks them often; tests poll them) used to import the whole agent, the
control server and the relay included, 0.5 s of CPU per process before they asked anything; then,
through the configuration's types, the token and X.509 libraries, the DICOM layer and the
card's life-cycle, 0.39 s where the command line's library alone takes 0.12 s
(benchmarks/start_up.py)."""

from __future__ import annotations

import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

from agent_runner import tunnel, write_config
from conftest import ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl

# Run as `card-agent` runs, then list what was imported (stderr stays the command's own).
LIST_IMPORTED = """
import sys
from dicom_card_agent.cli.main import main
listing, sys.argv = sys.argv[1], ["card-agent", *sys.argv[2:]]
try:
    main()
finally:
    with open(listing, "w") as out:
        out.write("\\n".join(sorted(sys.modules)))
"""

# The agent's running side: what `card-agent run` needs, a client of its control socket does not.
RUNNING_AGENT = ("dicom_card_agent.session.control_server", "dicom_card_agent.session.manager",
                 "dicom_card_agent.session.supervisor", "dicom_card_agent.tunnel.relay",
                 "dicom_card_agent.tls.policy", "dicom_card_agent.audit.trail", "dicom_card_agent.cli.run")
# What reading the configuration needs not: the token, certificates, PDUs, the card's life-cycle,
# the installed distribution's metadata (the version).
NOT_FOR_THE_CONFIGURATION = ("pkcs11", "cryptography.x509", "dicom_card_agent.dicom.pdu",
                             "dicom_card_agent.lifecycle.machine", "importlib.metadata")


def imported_by(tmp_path: Path, *args: str | Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    listing = tmp_path / "imported"
    result = subprocess.run([sys.executable, "-c", LIST_IMPORTED, listing, *map(str, args)], capture_output=True,
                            text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)
    return result, set(listing.read_text().splitlines())


def test_status_and_lock_import_none_of_the_running_agent(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    for command in ("status", "lock"):
        result, imported = imported_by(tmp_path, command, "--config", config, env=test_pki.env())
        assert result.returncode == 2
        assert result.stderr.startswith(f"card-agent: error: no agent answers on {tmp_path}/run/control.sock "), \
            result.stderr
        assert [name for name in RUNNING_AGENT if name in imported] == [], command
        assert [name for name in NOT_FOR_THE_CONFIGURATION if name in imported] == [], command
        # typer 0.29 coerces each parameter through pydantic, 0.1 s of CPU more (pyproject.toml).
        assert "pydantic" not in imported, command


def test_version_imports_no_command(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    result, imported = imported_by(tmp_path, "--version", env=test_pki.env())
    assert result.returncode == 0 and result.stdout.startswith("card-agent "), result.stderr
    assert sorted(name for name in imported if name.startswith("dicom_card_agent.cli.")) == [
        "dicom_card_agent.cli.main"]
    assert "pkcs11" not in imported


def test_a_pkcs11_failure_no_command_expected_is_named(test_pki: ProvisionedPki, tmp_path: Path,
                                                       fault_module: Path) -> None:
    """Told by `card-agent` itself, which imports python-pkcs11 only for the commands that use it."""
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    card.fail("C_GetSlotList", "CKR_DEVICE_ERROR")
    result = run_card_agent("tokens", "--module", fault_module, env=test_pki.env(**card.env()))
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "card-agent: error: the PKCS#11 module failed with DeviceError; run `card-agent doctor` to check "
        "the module and token\n")


def test_the_package_byte_code_is_current_for_every_module() -> None:
    """scripts/setup compiles the package: an editable install leaves that to the first import
    allowed to write it, and under PYTHONDONTWRITEBYTECODE none is, so each of the suite's agent
    processes compiled the package again (~0.4 s of CPU each; a fresh clone's run: 1,588 s of CPU
    before, 1,274 s after). A module's cache is current when its header names this interpreter and
    the source's time and size, as the import system checks it."""
    package = Path(__file__).resolve().parent.parent / "agent"
    stale = []
    for source in sorted(package.rglob("*.py")):
        cache = Path(importlib.util.cache_from_source(str(source)))
        stat = source.stat()
        expected = importlib.util.MAGIC_NUMBER + struct.pack(
            "<III", 0, int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF)
        try:
            header = cache.read_bytes()[:16]
        except FileNotFoundError:
            header = b""
        if header != expected:
            stale.append(str(source.relative_to(package.parent)))
    assert not stale, f"no current byte code for {stale} (scripts/setup compiles the package)"
