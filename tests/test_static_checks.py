"""Types are checked (mypy) and lint is clean (ruff), with the settings in pyproject.toml."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        message = f"{name} is not installed in the virtualenv (pip install -e '.[test]')"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return str(path)


def package_tree(destination: Path) -> Path:
    """The import name's tree as the wheel lays it out (dicom_card_agent/ = agent/ plus softhsm/ and
    pkcs11_profiles/), made of symbolic links: mypy finds modules by path, and the editable install's
    import hook, which maps the names in the repository, is invisible to it."""
    package = destination / "dicom_card_agent"
    package.mkdir()
    for entry in (ROOT / "agent").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for subpackage in ("softhsm", "pkcs11_profiles"):
        (package / subpackage).symlink_to(ROOT / subpackage)
    return destination


def test_mypy_finds_no_type_errors(tmp_path: Path) -> None:
    tree = package_tree(tmp_path)
    result = subprocess.run([tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "-p", "dicom_card_agent"],
                            cwd=tree, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing() -> None:
    result = subprocess.run([tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
