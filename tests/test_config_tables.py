"""The configuration's table reader (agent/config/tables.py) is shared by agent/config/model.py and
agent/audit/config.py without an import circle: audit.config imports nothing of config.model,
which imports audit.config (issue 16)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dicom_card_agent.audit.config as audit_config


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
