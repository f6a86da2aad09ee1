"""The audit trail's directories must be the agent's own (docs/audit.md, "Who may write there").

Whoever can add a file to the spool can have the agent deliver it to the audit repository as one
of its own records; whoever can write into the audit file's directory can replace the file. So the
spool, and the directory of the audit file, must belong to root or to the user that runs the
agent, and be writable by neither group nor others: the rule agent/file_trust.py applies to the
configuration file, here **without** its exception for sticky directories (in a sticky directory
others cannot replace our files, but they can still add theirs). The directories above the spool
are checked by agent/file_trust.py's own rule (a sticky ``/tmp`` above is fine): whoever can write
there could rename the spool away and put another in its place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dicom_card_agent.file_trust import ROOT_UID, TrustRefusal, UnsafeFileError, describe_user, existing, user_name

SPOOL_RISK = "put messages there that the agent would send to the audit repository as its own records"
FILE_DIRECTORY_RISK = "replace the audit file, or put another in its place before the agent creates it"


def make_private_directory(path: Path) -> None:
    """``mkdir -p`` where every directory made is 0700 (``Path.mkdir(parents=True)`` would make the
    parents with the umask's mode: group-writable under umask 002, and then refused here)."""
    missing = []
    for directory in [path, *path.parents]:
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile: checked like any other


def check_private_directory(path: Path, what: str, risk: str, *, ancestors: bool, elsewhere: str) -> None:
    """Raise :class:`~agent.file_trust.UnsafeFileError` unless the directory ``path`` belongs to
    root or to the agent's user and is writable by neither group nor others (and, with
    ``ancestors``, every directory above it passes agent/file_trust.py's rule).

    ``what`` names it ("the audit spool"), ``risk`` says what another user could do,
    ``elsewhere`` the other way out ("set [audit] spool to ..."). A path that does not exist or is
    not a directory passes: the caller reports that in its own words."""
    found = existing(path)
    if found is None or not stat.S_ISDIR(found[2].st_mode):
        return
    given, resolved, status = found
    check_private_status(given, resolved, status, what, risk, elsewhere=elsewhere)
    if not ancestors:
        return
    TrustRefusal(given, what, risk).directories_above(resolved)


def check_private_status(given: Path, resolved: Path, status: os.stat_result, what: str, risk: str, *,
                         elsewhere: str) -> None:
    """:func:`check_private_directory`'s rule for the directory ``status`` describes (found as
    ``given``, ``resolved`` once links are followed): also for a directory held open, whose
    ``fstat`` is what the agent uses, whatever its path names now."""
    agent_uid = os.geteuid()
    mode = stat.S_IMODE(status.st_mode)
    wrong_owner = status.st_uid not in (ROOT_UID, agent_uid)
    writable = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if wrong_owner or writable:
        trusted = "root" if agent_uid == ROOT_UID else f"root or to {describe_user(agent_uid)}, which runs the agent,"
        subject = "it" if resolved == given else f"the directory it points to, {resolved},"
        command = (f"chown {user_name(agent_uid)} {resolved} && chmod 700 {resolved}` as root" if wrong_owner
                   else f"chmod go-w {resolved}`")
        raise UnsafeFileError(
            f"refusing to use {what} {given}: {subject} belongs to {describe_user(status.st_uid)} with mode "
            f"{mode:04o}; "
            f"it must belong to {trusted} and be writable by neither group nor others, or another user could "
            f"{risk}; run `{command}, or {elsewhere}")
