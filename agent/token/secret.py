"""PIN bytes in memory the agent can wipe, and process settings that keep other processes out.

A PIN lives in a :class:`Secret`: one ``bytearray`` the agent overwrites with zeros when done,
optionally locked in RAM (``mlock``) so that it never reaches swap. Python ``str`` and ``bytes``
objects are immutable and their freed memory is not cleared, so the PIN never becomes one in the
supervisor (see docs/pin-handling.md for the copies that cannot be avoided, and where they are).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dicom_card_agent.logline import printable

log = logging.getLogger(__name__)

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.strlen.restype = ctypes.c_size_t
_libc.strlen.argtypes = [ctypes.c_void_p]
# The program's own symbols first: a non-PIE python3 (Debian's) has its own copy of `environ`
# (a copy relocation), and libc's symbol of that name stays NULL there.
_PROGRAM = ctypes.CDLL(None)


class Secret:
    """A PIN in a wipeable buffer of exactly its length. ``repr`` and ``str`` never show it."""

    def __init__(self, data: bytearray | memoryview, *, locked: bool = False) -> None:
        """Copy ``data`` in (the caller wipes its own buffer)."""
        self._buffer = bytearray(len(data))
        self._locked = locked and _lock(self._buffer)
        self._buffer[:] = data  # same length: filled in place, not reallocated

    def copy(self, *, locked: bool = False) -> Secret:
        return Secret(self._buffer, locked=locked)

    def view(self) -> memoryview:
        """The PIN bytes, without copying them (release the view before :meth:`wipe`)."""
        return memoryview(self._buffer)

    def for_pkcs11(self) -> _Pkcs11Pin:
        """What python-pkcs11's ``Token.open(user_pin=...)`` takes without a ``str`` or ``bytes``
        being made: it calls ``user_pin.encode('utf-8')`` and hands that buffer to ``C_Login``."""
        return _Pkcs11Pin(self._buffer)

    def password(self) -> bytearray:
        """For ``SSLContext.load_cert_chain(password=secret.password)``, called only if OpenSSL needs
        the PIN; Python copies the buffer (and frees that copy unwiped: docs/pin-handling.md)."""
        log.debug("OpenSSL asked for a PIN")
        return self._buffer

    def wipe(self) -> None:
        wipe(self._buffer)
        if self._locked:
            _unlock(self._buffer)
            self._locked = False

    def __len__(self) -> int:
        return len(self._buffer)

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def __repr__(self) -> str:
        return "Secret(...)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret is never serialised")


class _Pkcs11Pin:
    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytearray:
        return self._buffer  # Cython turns a bytearray into the char* C_Login takes, no copy


def wipe(buffer: bytearray) -> None:
    """Overwrite ``buffer`` in place (not ``buffer[:] = ...``, which may reallocate)."""
    if buffer:
        ctypes.memset((ctypes.c_char * len(buffer)).from_buffer(buffer), 0, len(buffer))


def _address(buffer: bytearray) -> tuple[int, int]:
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer)), len(buffer)


def _lock(buffer: bytearray) -> bool:
    if not buffer:
        return False
    address, size = _address(buffer)
    if _libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size)) != 0:
        log.warning("could not lock the PIN buffer in memory (%s): it may be written to swap; raise the "
                    "agent's RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=)", os.strerror(ctypes.get_errno()))
        return False
    return True


def _unlock(buffer: bytearray) -> None:
    address, size = _address(buffer)
    _libc.munlock(ctypes.c_void_p(address), ctypes.c_size_t(size))


def make_non_dumpable() -> None:
    """No core dumps and no ``/proc/PID/mem`` or ptrace for other processes of the same user.

    Only from now on: a process of the same user that attached (ptrace) between this process's
    ``execve`` and this call stays attached, and can undo it. :func:`trace_refusal` tells."""
    if _libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    """Whether this process is dumpable (``prctl(PR_GET_DUMPABLE)``): True after a tracer undid
    :func:`make_non_dumpable`."""
    return _libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 0


@dataclass(frozen=True)
class Tracer:
    """The process that traces (ptrace) another: its pid and, if it can still be read, its name."""

    pid: int
    name: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.name})"


def tracer_of(pid: int | str) -> Tracer | None:
    """The process tracing ``pid`` ("self" for this one), as the kernel's ``TracerPid`` in
    ``/proc/PID/status`` says; None when none does. Raises OSError when ``pid`` cannot be read (gone)."""
    tracer = _tracer_pid(Path(f"/proc/{pid}/status").read_text(encoding="utf-8", errors="replace"))
    if tracer == 0:
        return None
    try:
        name = Path(f"/proc/{tracer}/comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        name = "gone"
    return Tracer(tracer, printable(name))  # any process names itself


def _tracer_pid(status: str) -> int:
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "TracerPid":
            return int(value)
    raise OSError(errno.EINVAL, "no TracerPid in /proc/PID/status")


def pin_refusal_for(pid: int) -> str | None:
    """Why the process ``pid`` (a child of this one) must not be sent a PIN: it is traced; None when
    not. The kernel's ``TracerPid`` is read, which a tracer that rewrites what its tracee reads of
    itself cannot change. (Whether another process is dumpable cannot be read reliably from
    outside: the tracee's own :func:`trace_refusal` checks that.)"""
    what = f"the card-session process (pid {pid})"
    try:
        tracer = tracer_of(pid)
    except OSError as error:  # fail closed
        return f"{what} could not be checked for a tracer ({error.strerror or error})"
    if tracer is not None:
        return f"{what} is being traced by {tracer}"
    return None


def trace_refusal() -> str | None:
    """Why this process must not take a PIN: it is traced, or dumpable again after
    :func:`make_non_dumpable` (a tracer that attached before it can undo it); None when neither."""
    try:
        tracer = tracer_of("self")
    except OSError as error:  # fail closed: a process that cannot tell is not trusted with a PIN
        return f"it cannot read its own /proc/self/status ({error.strerror or error})"
    if tracer is not None:
        return f"it is being traced by {tracer}"
    if is_dumpable():
        return "it is dumpable again after prctl(PR_SET_DUMPABLE, 0): a tracer undid that call"
    return None


def remove_environment_variable(name: str) -> None:
    """Remove ``name`` from this process's environment, overwriting its value where it was.

    ``os.environ.pop`` and ``unsetenv`` only unlink the ``NAME=value`` string from ``environ``;
    the string itself stays in memory, and the one the process started with stays visible in
    ``/proc/PID/environ``. So the bytes are overwritten first, in place. Entries are only looked
    at through pointers: reading one as a Python object would copy the value.
    """
    prefix = name.encode() + b"="
    entries = ctypes.POINTER(ctypes.c_void_p).in_dll(_PROGRAM, "environ")
    index = 0
    while entries and (entry := entries[index]) is not None:  # environ is NULL once the last entry is gone
        if _starts_with(entry, prefix):
            length = _libc.strlen(ctypes.c_void_p(entry))
            ctypes.memset(entry + len(prefix), 0, length - len(prefix))
        index += 1
    os.environ.pop(name, None)  # also unsetenv()


def _starts_with(address: int, prefix: bytes) -> bool:
    characters = ctypes.cast(address, ctypes.POINTER(ctypes.c_ubyte))
    for offset, expected in enumerate(prefix):
        if characters[offset] != expected:  # also stops at the entry's NUL
            return False
    return True


def take_environment_variable(name: str, *, locked: bool = False) -> Secret | None:
    """The value of ``name`` as a secret, removed from the environment (see above); None if unset."""
    value = os.environb.get(name.encode())  # the very bytes object os.environ keeps: no new copy
    secret = Secret(memoryview(value), locked=locked) if value else None
    if value and len(value) > 1:  # (one-byte bytes objects are shared singletons: never write to one)
        # Python's own copy, made at start-up: an immutable bytes object, overwritten in place.
        ctypes.memset(id(value) + bytes.__basicsize__ - 1, 0, len(value))
    del value
    remove_environment_variable(name)
    return secret
