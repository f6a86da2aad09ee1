"""Sign-in, sign-out and PIN failures as one structured line each (``event=NAME key="value" ...``),
so that log collectors can parse them; they become audit events later. Every value is written as
a JSON string (quotes, backslashes, control and non-ASCII characters escaped), so a certificate
subject or token label can neither end the line nor forge another key."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("agent.events")


def event(name: str, **fields: object) -> None:
    parts = [f"event={name}"] + [f"{key}={json.dumps(value)}" for key, value in fields.items() if value is not None]
    log.info(" ".join(parts))
