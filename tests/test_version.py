"""One version source: pyproject.toml's, which `card-agent --version` reports through the installed
distribution's metadata."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from conftest import run_card_agent

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_version_is_pyprojects() -> None:
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    result = run_card_agent("--version", env=dict(os.environ))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"card-agent {version}\n", "")


def test_the_changelog_has_this_version() -> None:
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    changelog = (PYPROJECT.parent / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{version}]" in changelog
