"""The one clock for times that outlast a suspend: the idle lock, the PIN dialog's timeout, the lease.

``time.monotonic()`` is Linux's CLOCK_MONOTONIC, which stops while the machine is suspended: after
8 hours in a closed laptop bag, a session with ``idle_timeout = 900`` went on for whatever idle time
was left before the lid closed, as if nobody had been away. CLOCK_BOOTTIME is monotonic too (a wall
clock set by NTP or by hand does not move it) but counts the time suspended, and it is one clock for
the whole machine, so the supervisor and its card-session process compare each other's values (the
last connection a lent listener accepted, the lease's look at the reader) as their own.
"""

from __future__ import annotations

import time

# Linux only; elsewhere time.monotonic() (macOS's counts no sleep either: the gap stays there).
_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


def awake_or_asleep() -> float:
    """Seconds on a monotonic clock that counts time suspended (CLOCK_BOOTTIME), for every time
    compared with an idle timeout, the PIN dialog's timeout or the lease, in either process."""
    if _BOOTTIME is None:
        return time.monotonic()
    return time.clock_gettime(_BOOTTIME)
