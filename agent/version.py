"""The agent's version: pyproject.toml's ``version``, as the installed distribution records it; and
its build: which files were installed, as the installed distribution lists them."""

from __future__ import annotations

import hashlib
import os
import sys
from importlib.metadata import Distribution, PackageNotFoundError, distributions

DISTRIBUTION = "dicom-card-agent"
BUILD_DIGITS = 12  # of the digest, in messages and the metrics: enough to tell two builds apart
# The build of an installation without a file list (RECORD), e.g. a distribution's own packaging:
# two such installations of one version are taken to be one build, as before builds were compared.
NO_RECORD = "unknown"


def installed() -> Distribution:
    """The installed distribution, as a card-session process finds it: that process is started with
    -P (agent/session/supervisor.py), without the working directory on its path, which ``python -c``
    and ``python -m`` put first. A source tree's ``dicom_card_agent.egg-info`` there would
    otherwise be this process's distribution (its version, no RECORD), not the installed one."""
    path = sys.path
    if not sys.flags.safe_path and path and path[0] in ("", os.getcwd()):
        path = path[1:]
    for found in distributions(name=DISTRIBUTION, path=path):
        return found
    raise PackageNotFoundError(DISTRIBUTION)


def agent_version() -> str:
    """The installed version; a source tree that was never installed has none to tell."""
    try:
        return installed().version
    except PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"


def agent_build() -> str | None:
    """What tells two builds of one version apart: a digest of the installed distribution's RECORD,
    which lists every file installed with its SHA-256 (pip writes it; the Debian package installs
    with pip). Every build from main is version 0.1.0 with other code, and a Debian revision
    (0.1.0-1 -> 0.1.0-2) changes no version either; their RECORDs differ wherever a file does.
    None when the distribution is not installed (any more: the package was removed)."""
    try:
        record = installed().read_text("RECORD")
    except PackageNotFoundError:
        return None
    if record is None:
        return NO_RECORD
    return hashlib.sha256(record.encode()).hexdigest()[:BUILD_DIGITS]
