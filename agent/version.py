"""The agent's version: pyproject.toml's ``version``, as the installed distribution records it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "dicom-card-agent"


def agent_version() -> str:
    """The installed version; a source tree that was never installed has none to tell."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"
