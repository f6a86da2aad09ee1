"""Whether this process has file descriptors left: a PKCS#11 module out of them fails in ways that
look like a card gone or logged out (SoftHSM answers that no token is there, or that a key is not),
which must not be taken for what the card did."""

from __future__ import annotations

import errno
import os

DESCRIPTOR_HEADROOM = 8  # files a PKCS#11 module may open to answer (SoftHSM reads its token files)


def descriptors_exhausted() -> bool:
    """True when this process cannot open :data:`DESCRIPTOR_HEADROOM` more files."""
    opened: list[int] = []
    try:
        for _ in range(DESCRIPTOR_HEADROOM):
            opened.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as error:
        return error.errno in (errno.EMFILE, errno.ENFILE)
    finally:
        for fd in opened:
            os.close(fd)
    return False
