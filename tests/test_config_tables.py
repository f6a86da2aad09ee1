"""The configuration's table reader (agent/config/tables.py) is shared by agent/config/model.py and
agent/audit/config.py without an import circle: audit.config imports nothing of config.model,
which imports audit.config (issue 16). It reads the file as UTF-8 TOML, and any bytes that are not
that get an error naming where, never a traceback."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dicom_card_agent.audit.config as audit_config
from agent_runner import tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_audit_config_does_not_import_the_configuration_model() -> None:
    modules = imported_modules(Path(audit_config.__file__))
    assert "dicom_card_agent.config.model" not in modules, modules
    assert "dicom_card_agent.config.tables" in modules


def test_each_module_imports_first_on_its_own() -> None:
    for module in ("dicom_card_agent.audit.config", "dicom_card_agent.config.model", "dicom_card_agent.config.tables"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


# -- what the file holds before it is TOML ---------------------------------------------------------


@pytest.mark.parametrize("command", ["check", "run", "status"])
def test_a_file_that_is_not_utf8_is_named_with_where_its_bad_byte_is(test_pki: ProvisionedPki, tmp_path: Path,
                                                                     command: str) -> None:
    """An editor that saves Latin-1 (a site name with an umlaut): the commands said nothing but a
    UnicodeDecodeError traceback (exit 1). Now: the file, the line and column of the byte, and
    that TOML must be UTF-8 (exit 2)."""
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    good = config.read_bytes()
    config.write_bytes(good + b'# Radiologie Z\xfcrich\n')
    line = good.count(b"\n") + 1
    result = run_card_agent(command, "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    message = (f"{config}: not valid TOML: byte 0xfc at line {line}, column 15 (byte offset {len(good) + 14}) "
               "is not UTF-8, and a TOML file must be UTF-8: save the file as UTF-8 (one in Latin-1 converts with "
               "`iconv -f latin1 -t utf-8`)")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if command == "check":
        assert result.stdout.splitlines()[0] == f"fail config: {message}", result.stdout
    else:
        assert result.stderr == f"card-agent: error: {message}\n", result.stderr


def test_a_file_saved_as_utf8_with_a_byte_order_mark_is_read(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Windows editors write a byte order mark before UTF-8; tomllib calls it an invalid statement."""
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.write_bytes("\ufeff".encode() + config.read_bytes().replace(b"[identity]", "# Zürich\n[identity]".encode()))
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.stdout.splitlines()[0].startswith("ok   config:"), result.stdout + result.stderr


def test_arrays_nested_too_deeply_are_a_toml_error_not_a_traceback(test_pki: ProvisionedPki,
                                                                    tmp_path: Path) -> None:
    """tomllib parses nested arrays by recursion: thousands of them ended it with RecursionError."""
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.write_text(config.read_text() + "nested = " + "[" * 5000 + "]" * 5000 + "\n")
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"fail config: {config}: not valid TOML: arrays or inline tables nested too deeply"), result.stdout
