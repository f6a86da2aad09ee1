"""A durable, ordered on-disk queue of syslog messages waiting for the audit repository.

One file per message, ``<sequence number, 20 digits>.msg``, in a directory only the agent can
read (0700; files 0600). :meth:`Spool.append` writes a temporary file, fsyncs it, renames it into
place and fsyncs the directory, so after it returns the message survives a crash or power loss,
and a crash during it leaves no partial message (a stale ``.tmp`` file is removed on the next
start). :meth:`Spool.append_all` does the same for several messages (the records of one card
session's report) with one fsync of the directory after the last rename, all or none: the
directory's fsync after each rename was about half the cost of a message. The sender reads waiting
messages in sequence order (:meth:`Spool.oldest`, :meth:`Spool.after`), sends them, and
:meth:`Spool.remove` unlinks each (and fsyncs the directory) only once the repository has confirmed
it (agent/audit/sinks.py): order is the sequence order, which survives restarts because the next
number is one more than the highest on disk.

A message sent but not yet confirmed when the connection or the agent dies is sent again later:
delivery is at least once. An exclusive ``flock`` on ``.lock`` keeps a second agent (or a second
trail in one process) off the same spool.

Only the agent writes here: the directory must be the agent's user's own (or root's) and writable by
neither group nor others, and so must the directories above it (agent/audit/directories.py);
otherwise the spool refuses to open. A message file that is not a regular file of the agent's user
(planted before the directory was made safe, or a symbolic link) is set aside as ``.untrusted``
and logged, never sent: files are opened with ``O_NOFOLLOW`` and checked with ``fstat``. One that
cannot be read, or does not hold a message the repository can take (empty, no syslog header, over
``MAX_SYSLOG_MESSAGE_BYTES``), is set aside as ``.bad``, also logged and never sent.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from dicom_card_agent.audit.directories import SPOOL_RISK, check_private_directory, make_private_directory
from dicom_card_agent.audit.errors import AuditSpoolError
from dicom_card_agent.audit.syslog import message_problem
from dicom_card_agent.file_trust import describe_user

log = logging.getLogger("agent.audit")

_NAME = re.compile(r"(\d{20})\.msg")
_LOCK = ".lock"
_OPEN_MESSAGE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO does not hang us


class _Untrusted(Exception):
    """A message file the agent did not write: why."""


class Spool:
    """The queue in ``directory`` (created 0700 if missing; refused, with
    :class:`~agent.file_trust.UnsafeFileError`, if another user could write there). Thread-safe;
    close it when done."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._uid = os.geteuid()
        try:
            make_private_directory(self.directory)
        except OSError as error:
            raise AuditSpoolError(f"cannot use the audit spool directory {self.directory}: {error.strerror}; "
                                  "check [audit] spool and its permissions") from None
        check_spool_directory(self.directory)
        try:
            self._lock_fd = os.open(self.directory / _LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                    0o600)
        except OSError as error:
            raise AuditSpoolError(f"cannot use the audit spool directory {self.directory}: {error.strerror}; "
                                  "check [audit] spool and its permissions") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self._lock_fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise AuditSpoolError(f"the audit spool {self.directory} is in use by another card-agent; "
                                      "give each agent its own [audit] spool") from None
            raise AuditSpoolError(f"cannot lock the audit spool {self.directory}: {error.strerror}") from None
        self._mutex = threading.Lock()
        self._pending: deque[int] = deque()
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sequences = []
        for entry in os.scandir(self.directory):
            match = _NAME.fullmatch(entry.name)
            if match:
                # Before the numbering goes on from it: a planted 99999999999999999999.msg must not set it.
                problem = self._foreign(entry.stat(follow_symlinks=False))
                if problem:
                    self._set_aside(Path(entry.path), problem, ".untrusted")
                else:
                    sequences.append(int(match.group(1)))
            elif entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a crash during append(): that message was never accepted
        self._pending.extend(sorted(sequences))
        self._next = (self._pending[-1] + 1) if self._pending else 1
        self._closed = False

    def _path(self, sequence: int) -> Path:
        return self.directory / f"{sequence:020d}.msg"

    def append(self, data: bytes) -> int:
        """Store ``data`` durably at the end of the queue; return its sequence number."""
        return self.append_all([data])[0]

    def append_all(self, messages: Sequence[bytes]) -> list[int]:
        """Store ``messages`` durably at the end of the queue, in order, one file each; return their
        sequence numbers. All or none: on :class:`AuditSpoolError` none of them is waiting. Each
        file's data is fsynced before its rename, the directory once after the last rename: a crash
        before this returns leaves whole messages or none, never half of one."""
        if not messages:
            return []
        with self._mutex:
            self._check_open()
            sequences = list(range(self._next, self._next + len(messages)))
            temporaries: list[Path] = []
            placed: list[int] = []
            try:
                for sequence, data in zip(sequences, messages, strict=True):
                    temporaries.append(self._temporary(sequence))
                    _write_durably(temporaries[-1], data)
                for sequence, temporary in zip(sequences, temporaries, strict=True):
                    os.rename(temporary, self._path(sequence))
                    placed.append(sequence)
                os.fsync(self._dir_fd)
            except OSError as error:
                self._take_back(temporaries[len(placed):], placed)
                raise AuditSpoolError(f"cannot write to the audit spool {self.directory}: {error.strerror}") from None
            self._next += len(messages)
            self._pending.extend(sequences)
            return sequences

    def _temporary(self, sequence: int) -> Path:
        return self.directory / f"{sequence:020d}.tmp"

    def _take_back(self, temporaries: list[Path], placed: list[int]) -> None:
        """Undo a failed :meth:`append_all`, so that the caller may store its messages again without
        sending any twice. A message file that cannot be removed stays waiting (sent, perhaps twice:
        at least once), and the numbering goes on after it, as it would after a restart."""
        for temporary in temporaries:
            try:
                os.unlink(temporary)
            except OSError:
                pass  # never opened, or removed at the next start: a .tmp is never sent
        for sequence in placed:
            try:
                os.unlink(self._path(sequence))
            except FileNotFoundError:
                pass
            except OSError:
                self._pending.append(sequence)
                self._next = sequence + 1

    def oldest(self) -> tuple[int, bytes] | None:
        """The first waiting message and its sequence number, or ``None`` if none waits. A file
        that cannot be read is set aside as ``.bad``, one the agent did not write as
        ``.untrusted`` (and logged), never sent."""
        while True:
            with self._mutex:
                self._check_open()
                if not self._pending:
                    return None
                sequence = self._pending[0]
            data = self._read(sequence)
            if data is not None:
                return sequence, data

    def after(self, sequence: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` waiting messages numbered above ``sequence``, in order (unreadable ones
        are set aside as :meth:`oldest` does)."""
        found: list[tuple[int, bytes]] = []
        while len(found) < limit:
            with self._mutex:
                self._check_open()
                following = self._following(sequence, limit - len(found))
            if not following:
                return found
            for number in following:
                data = self._read(number)
                if data is not None:
                    found.append((number, data))
                sequence = number
        return found

    def _following(self, sequence: int, limit: int) -> list[int]:
        # The numbers at or below ``sequence`` are the few sent and not yet confirmed, at the
        # front: skipping them keeps this cheap even with a long backlog behind.
        following: list[int] = []
        for number in self._pending:
            if number > sequence:
                following.append(number)
                if len(following) == limit:
                    break
        return following

    def _read(self, sequence: int) -> bytes | None:
        """The message ``sequence``, or ``None`` when it was set aside (unreadable, not a message the
        repository can take, or not the agent's)."""
        path = self._path(sequence)
        try:
            fd = os.open(path, _OPEN_MESSAGE)
            try:
                problem = self._foreign(os.fstat(fd))
                if problem:
                    raise _Untrusted(problem)
                data = _read_all(fd)
            finally:
                os.close(fd)
            problem = message_problem(data)
            if not problem:
                return data
            # An emptied or cut file (a crash on a file system without data ordering, a disk
            # error), or one from an agent without today's size limit: sent, it would break the
            # repository's framing and merge the messages after it, or stop delivery for good.
            self._forget(sequence)
            self._set_aside(path, problem, ".bad")
        except _Untrusted as untrusted:
            self._forget(sequence)
            self._set_aside(path, str(untrusted), ".untrusted")
        except OSError as error:
            self._forget(sequence)
            if error.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
                self._set_aside(path, "it is a symbolic link", ".untrusted")
            else:
                self._set_aside(path, f"cannot read it ({error.strerror})", ".bad")
        return None

    def _foreign(self, status: os.stat_result) -> str:
        """Why a message file with this status is not one the agent wrote, or ``""``."""
        if not stat.S_ISREG(status.st_mode):
            return "it is not a regular file"
        if status.st_uid != self._uid:
            return (f"it belongs to {describe_user(status.st_uid)}, not to {describe_user(self._uid)}, which runs "
                    "the agent")
        return ""

    def _forget(self, sequence: int) -> None:
        with self._mutex:
            if sequence in self._pending:
                self._pending.remove(sequence)

    def _set_aside(self, path: Path, problem: str, suffix: str) -> None:
        """Rename a message file that must not be sent to ``suffix`` (kept for whoever investigates)."""
        if suffix == ".untrusted":
            log.error("audit spool: %s: %s; set aside as %s, not sent: another user may have put it there "
                      "(see who can write to %s)", path, problem, suffix, self.directory)
        else:
            log.error("audit spool: %s: %s; set aside as %s, not sent", path, problem, suffix)
        try:
            os.rename(path, path.with_suffix(suffix))
        except OSError:
            pass

    def remove(self, sequence: int) -> None:
        """Forget a delivered message (any waiting one: RELP confirms each on its own)."""
        with self._mutex:
            self._check_open()
            if sequence not in self._pending:
                raise AuditSpoolError(f"audit spool: message {sequence} is not waiting")
            try:
                os.unlink(self._path(sequence))
            except FileNotFoundError:
                pass
            except OSError as error:
                # It stays waiting: the sender treats this as an outage and sends it again later.
                raise AuditSpoolError(f"cannot remove a delivered message from the audit spool {self.directory}: "
                                      f"{error.strerror}") from None
            # Gone from the disk: no longer waiting, whatever the fsync below says (a message sent
            # again would find no file, and be set aside as unreadable).
            if self._pending[0] == sequence:
                self._pending.popleft()
            else:
                self._pending.remove(sequence)
            try:
                os.fsync(self._dir_fd)
            except OSError as error:
                # The removal may not survive a crash: the message would then be sent again (at least once).
                raise AuditSpoolError(f"cannot remove a delivered message from the audit spool {self.directory}: "
                                      f"{error.strerror}") from None

    def __len__(self) -> int:
        with self._mutex:
            return len(self._pending)

    def oldest_age(self) -> float | None:
        """Seconds since the oldest waiting message was spooled (its file's mtime); ``None`` when none waits."""
        with self._mutex:
            if not self._pending:
                return None
            path = self._path(self._pending[0])
        try:
            return max(0.0, time.time() - path.stat().st_mtime)
        except OSError:  # sent and removed meanwhile
            return None

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise AuditSpoolError(f"the audit spool {self.directory} is closed")

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            os.close(self._dir_fd)
            os.close(self._lock_fd)  # releases the flock


def _write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (owner only; not if it exists) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def check_spool_directory(directory: Path) -> None:
    """Refuse (:class:`~agent.file_trust.UnsafeFileError`) a spool directory another user could
    write to, or one under such a directory; a missing one passes (the agent creates it 0700)."""
    check_private_directory(directory, "the audit spool", SPOOL_RISK, ancestors=True,
                            elsewhere="set [audit] spool to a directory of the agent's own")
