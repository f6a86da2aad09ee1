"""The agent's runtime directory: a private (0700) directory of its user for the control socket
and the card sessions' public files, and where an agent started in another environment keeps its
own (``status`` and ``check`` look there too)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.file_trust import existing

if TYPE_CHECKING:
    from dicom_card_agent.config.model import AgentConfig

# systemd-logind's XDG_RUNTIME_DIR for each user with a login session: /run/user/UID, the user's own,
# mode 0700. An administrator's ssh or sudo shell often lacks the variable while the agent, a
# systemd user unit, has it: this is where both then meet.
LOGIN_RUNTIME_ROOT = Path("/run/user")
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def runtime_directory(config: AgentConfig) -> Path:
    """A private (0700) directory for the session's public files."""
    base = runtime_directories(config)[0]
    elsewhere = ("set [agent] runtime_dir to a private directory of yours, or run the agent in a login "
                 "session (XDG_RUNTIME_DIR)")
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        # lstat: in /tmp (no login session) another user can plant the name first, as a directory
        # of theirs or as a link they can later point elsewhere (the control socket with it).
        info = base.lstat()
    except OSError as error:
        raise CardAgentError(f"runtime directory {base}: {error.strerror or error}; {elsewhere}") from None
    problem = _not_private(info)
    if problem is not None:
        raise CardAgentError(f"runtime directory {base} {problem}; {elsewhere}")
    if info.st_mode & 0o077:
        raise CardAgentError(f"runtime directory {base} must have mode 0700: fix it (chmod 700 {base}) or set "
                             "[agent] runtime_dir")
    return base


def runtime_directories(config: AgentConfig) -> list[Path]:
    """Where an agent of this user and configuration keeps its runtime directory: [agent] runtime_dir
    alone when set; else the default this process picks first, then the defaults another
    environment would pick (XDG_RUNTIME_DIR set or not), for `status` and `check` to look there too."""
    return runtime_directories_for(config.runtime_dir)


def runtime_directories_for(runtime_dir: Path | None) -> list[Path]:
    """:func:`runtime_directories` of a configuration whose [agent] runtime_dir is ``runtime_dir``."""
    if runtime_dir is not None:
        return [runtime_dir]
    name = f"card-agent-{os.getuid()}"
    return [base / name for base in runtime_bases()]


def runtime_bases() -> list[Path]:
    """The directories a default runtime directory is made in, the one this process uses first:
    XDG_RUNTIME_DIR when it names a directory (unset, or one that does not exist, is not used: it
    would make a runtime directory nobody else finds), the user's login-session directory, the
    temporary directory."""
    bases = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        bases.append(Path(xdg))
    login = login_session_directory()
    if login is not None:
        bases.append(login)
    bases.append(Path(tempfile.gettempdir()))
    return list(dict.fromkeys(bases))


def login_session_directory() -> Path | None:
    """/run/user/UID when it is this user's and no one else can write there; None otherwise (no login
    session, or a directory another user could fill: the temporary directory's checks apply then)."""
    found = existing(LOGIN_RUNTIME_ROOT / str(os.getuid()))
    if found is None:
        return None
    given, _, info = found
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & _OTHERS_WRITE:
        return None
    return given


def is_private_runtime_directory(path: Path) -> bool:
    """``path`` is a runtime directory of this user that no one else could have put a socket into:
    one another environment's agent made (looked at, never created)."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return _not_private(info) is None and not info.st_mode & 0o077


def _not_private(info: os.stat_result) -> str | None:
    """Why what lstat saw (``info``) cannot be this user's runtime directory; None when it can."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link, which whoever made it can point elsewhere"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.getuid():
        return (f"belongs to uid {info.st_uid}, not to uid {os.getuid()} (this agent's user): another user "
                "made it")
    return None
