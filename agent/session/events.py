"""Sign-in, sign-out and PIN failures as one structured line each (``event=NAME key="value" ...``),
so that log collectors can parse them; they become audit events later. Every value is written as
a JSON string (quotes, backslashes, control and non-ASCII characters escaped), so a certificate
subject or token label can neither end the line nor forge another key."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter

log = logging.getLogger("agent.events")
_counted: Counter[str] = Counter()  # per event name, since start: for the metrics
_counted_lock = threading.Lock()


def counted() -> dict[str, int]:
    """How often each event happened since the agent started."""
    with _counted_lock:
        return dict(_counted)


def event(name: str, **fields: object) -> None:
    with _counted_lock:
        _counted[name] += 1
    parts = [f"event={name}"] + [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    log.info(" ".join(parts))
