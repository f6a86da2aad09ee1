"""Refuse files another user could have changed: the configuration, the PKCS#11 module, the trust
files (CA bundle, CRLs, require_issuer, an inbound listener's certificate and key) and the PIN
dialog program; the callers name each (agent/config/preflight.py, agent/trust/, agent/token/pin.py).

The rule is OpenSSH's ``safe_path`` (misc.c, its StrictModes check of ``authorized_keys``): the
file is a regular file, and it and every directory above it up to ``/`` belong to root or to the
user that runs the agent and are writable by neither group nor others. One exception, for
``/tmp`` and the like: a directory writable by others that has the sticky bit set. POSIX lets
only an entry's owner (or root) rename or remove an entry of such a directory, so the entries
below it that this check also requires to be ours or root's cannot be swapped by anyone else.

The path is checked as resolved (symbolic links followed, as ``safe_path`` does with realpath),
and when the path itself is a symbolic link, the directory that holds the link is checked too:
whoever can write there can point the link elsewhere.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from dicom_card_agent.errors import CardAgentError

ROOT_UID = 0


class UnsafeFileError(CardAgentError):
    """A file the agent trusts could have been changed by another user."""


def check_trusted_file(path: Path | str, what: str, risk: str) -> None:
    """Raise :class:`UnsafeFileError` unless ``path`` is safe by the rule above.

    ``what`` names the file in the message ("the configuration file"), ``risk`` says what another
    user could do with it ("change the agent's settings"). A path that does not exist passes:
    the caller reports that in its own words.
    """
    found = existing(path)
    if found is None:
        return
    given, resolved, file_status = found
    refuse = TrustRefusal(given, what, risk)
    if not stat.S_ISREG(file_status.st_mode):
        raise UnsafeFileError(f"refusing to use {what} {given}: it is not a regular file")
    refuse.if_unsafe(resolved, file_status, is_directory=False)
    refuse.directories_above(resolved)


def existing(path: Path | str) -> tuple[Path, Path, os.stat_result] | None:
    """``path`` made absolute, the same with its links followed, and what that is; None when
    nothing is there (the callers say so in their own words)."""
    given = Path(os.path.abspath(path))
    try:
        resolved = Path(os.path.realpath(given, strict=True))
        return given, resolved, resolved.stat()
    except OSError:
        return None


class TrustRefusal:
    """Refuses (:class:`UnsafeFileError`) a file or directory another user could change, in words
    naming ``what`` it is, the ``given`` path and the ``risk``; used for every file of
    :func:`check_trusted_file` and the audit trail's directories."""

    def __init__(self, given: Path, what: str, risk: str) -> None:
        self.given, self.what, self.risk = given, what, risk
        self.agent_uid = os.geteuid()

    def if_unsafe(self, path: Path, status: os.stat_result, *, is_directory: bool) -> None:
        consequence = f"another user could {self.risk}"
        if status.st_uid not in (ROOT_UID, self.agent_uid):
            raise UnsafeFileError(
                f"refusing to use {self.what} {self.given}: {self._subject(path, is_directory)} belongs to "
                f"{describe_user(status.st_uid)}, not to {self._trusted_owners()}, so {consequence}; run "
                f"`chown {user_name(self.agent_uid)} {path}` as root, or move the file somewhere safe")
        writable = _writable_by(status.st_mode)
        if writable and not (is_directory and status.st_mode & stat.S_ISVTX):
            raise UnsafeFileError(
                f"refusing to use {self.what} {self.given}: {self._subject(path, is_directory)} is writable by "
                f"{writable} (mode {stat.S_IMODE(status.st_mode):04o}), so {consequence}; run `chmod go-w {path}`")

    def directories_above(self, resolved: Path) -> None:
        """Refuse when a directory above ``resolved`` (the path given, links followed) is unsafe, or
        one above the link that was given: whoever can write there could swap what it points to."""
        directories = list(resolved.parents)
        if self.given.is_symlink():
            link_directory = Path(os.path.realpath(self.given.parent))
            directories += [link_directory, *link_directory.parents]
        for directory in dict.fromkeys(directories):
            self.if_unsafe(directory, directory.stat(), is_directory=True)

    def _trusted_owners(self) -> str:
        if self.agent_uid == ROOT_UID:
            return "root"
        return f"root or {describe_user(self.agent_uid)}, which runs the agent"

    def _subject(self, path: Path, is_directory: bool) -> str:
        if path == self.given:
            return "it"
        return f"the directory {path} above it" if is_directory else f"the file it points to, {path},"


def _writable_by(mode: int) -> str:
    who = [name for bit, name in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others")) if mode & bit]
    return " and ".join(who)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def describe_user(uid: int) -> str:
    name = user_name(uid)
    return f"uid {uid}" if name == str(uid) else f"uid {uid} ({name})"
