"""``card-agent run --config FILE``: the agent in the foreground (systemd-friendly)."""

from __future__ import annotations

import logging
import resource
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from agent.config.model import load_config
from agent.session.identity import sign_in
from agent.session.supervisor import CardSession
from agent.tunnel.server import Listeners

log = logging.getLogger("agent")


def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="The agent's TOML configuration.")],
    confirm_final_try: Annotated[bool, typer.Option(
        "--confirm-final-try", help="Allow the sign-in when the card reports its final PIN try.")] = False,
) -> None:
    """Sign in with the card and serve the tunnels until SIGTERM or SIGINT."""
    settings = load_config(config)
    logging.getLogger().setLevel(settings.log_level.upper())
    # A core dump of the agent could hold the PIN.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    listeners = Listeners(settings)
    session: CardSession | None = None
    try:
        signed_in = sign_in(settings, confirm_final_try=confirm_final_try)
        session = CardSession(settings, signed_in)
        session.start()
        listeners.session = session
        listeners.start()
        log.info("ready: %d tunnel(s) for %s", len(settings.tunnels), signed_in.files.subject)
        stop.wait()
        log.info("stopping")
    finally:
        listeners.close()
        if session is not None:
            session.end("the agent is stopping")
