"""Keep python-pkcs11's failed search ends out of the agent's standard error (the journal).

python-pkcs11 0.10 ends each object search in the search object's finalizer with
``C_FindObjectsFinal``, also a search whose ``C_FindObjectsInit`` failed (a card pulled as it is
read, a module that fails): the module then answers ``CKR_OPERATION_NOT_INITIALIZED`` (or that the
session or card is gone), and the Cython finalizer prints that error twice with its traceback,
through :data:`sys.excepthook` and then as "Exception ignored in" (:data:`sys.unraisablehook`).
The failure that matters, ``C_FindObjectsInit``'s, was raised to the caller already, which reports
it; the two tracebacks only alarm whoever reads the journal. They are logged at DEBUG instead.
Every other exception reaches the hooks that were there before.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import Any

from pkcs11.exceptions import PKCS11Error

log = logging.getLogger("agent.token")

# Where python-pkcs11 0.10 ends a search (a frame of its traceback), and what its finalizer is
# named in "Exception ignored in".
_SEARCH_END = "pkcs11._pkcs11.SearchIter._finalize"
_FINALIZER = "pkcs11._pkcs11.OperationContext.__del__"

_installed = False
_installing = threading.Lock()


def _is_failed_search_end(kind: type[BaseException] | None, tb: TracebackType | None) -> bool:
    if kind is None or not issubclass(kind, PKCS11Error):
        return False
    return any(frame.name == _SEARCH_END for frame in traceback.extract_tb(tb))


def hide_failed_search_ends() -> None:
    """Install the hooks, once per process (before the first search: when the module is loaded)."""
    global _installed
    with _installing:
        if _installed:
            return
        _installed = True
        earlier_excepthook = sys.excepthook
        earlier_unraisablehook = sys.unraisablehook

        def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
            if _is_failed_search_end(kind, tb):  # the finalizer's first print: its second one says it
                return
            earlier_excepthook(kind, value, tb)

        def unraisablehook(unraisable: Any) -> None:
            if unraisable.object == _FINALIZER and _is_failed_search_end(unraisable.exc_type,
                                                                         unraisable.exc_traceback):
                log.debug("python-pkcs11 could not end an object search the module had not started (%s): ignored",
                          unraisable.exc_type.__name__)
                return
            earlier_unraisablehook(unraisable)

        sys.excepthook = excepthook
        sys.unraisablehook = unraisablehook
