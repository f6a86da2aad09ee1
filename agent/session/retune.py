"""A reloaded configuration inside a running card-session process (SIGHUP, docs/configuration.md
"Reloading").

The card session takes a new tunnel set in place when it can do so without loading the card's key
again: a tunnel that is added or changed gets a TLS context this process already made for the same
``tls`` and ``verify`` (loading a token key into a process that has done handshakes made later
server certificates fail to verify: agent/session/worker.py). It cannot take a changed [trust],
[identity] or any [[inbound]] change (their TLS contexts hold the card's or a node key, and the
sign-in checked the card against them): it then refuses, and the supervisor makes a new card session.

Open associations of a removed or changed tunnel run on with the settings they started with, to
their end; they are still closed when the card session ends. Its runtime is kept (``retired``)
while they run and for :data:`RETIRED_LINGER_SECONDS` after the last one ended; then it is
dropped, with its TLS session and the TLS object made ahead, and only its counts are kept
(``carried``): a card session reloaded all day must not grow with every tunnel it ever served.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_card_agent.config.model import AgentConfig, TunnelConfig
from dicom_card_agent.tunnel.counters import Counts, add_counts, empty_counts
from dicom_card_agent.tunnel.relay import InboundRuntime, TunnelRuntime

log = logging.getLogger("agent.session")

ContextKey = tuple[str, str]  # (tls, verify) of a tunnel: what its client context depends on besides [trust]
Runtime = TunnelRuntime | InboundRuntime
# How long a retired runtime is kept once nothing is open on it. A connection accepted on a lent
# listener just before the reload looks its runtime up before counting itself open there
# (agent/tunnel/lent_listeners.py): it must find it still counted. And `status` and the metrics
# show the retired listener at 0 open for a moment before it goes, rather than vanishing at 1.
RETIRED_LINGER_SECONDS = 5.0


class NeedsNewSessionError(Exception):
    """The card session cannot take the new configuration in place; the message says why."""


def context_key(tunnel: TunnelConfig) -> ContextKey:
    return tunnel.tls, tunnel.verify


@dataclass
class Retuner:
    """What the card-session process needs to make tunnel runtimes after its start."""

    config: AgentConfig  # the configuration the runtimes were last made from
    contexts: dict[ContextKey, ssl.SSLContext]
    make_tunnel: Callable[[TunnelConfig, ssl.SSLContext], TunnelRuntime]
    # Runtimes a reload replaced or removed, kept while associations on them run (they are told
    # when the session ends), with time.monotonic() since when nothing is open on them (or None).
    retired: list[Runtime] = field(default_factory=list)
    _idle_since: list[float | None] = field(default_factory=list, init=False, repr=False)
    # What the dropped ones carried, by tunnel name: still this session's counts (`status`, totals).
    carried: dict[str, Counts] = field(default_factory=dict, init=False)

    def apply(self, new: AgentConfig, runtimes: dict[str, TunnelRuntime | InboundRuntime]) -> dict[str, list[str]]:
        """Change ``runtimes`` in place to serve ``new``'s tunnels; the names added, removed and
        changed. Raises :class:`NeedsNewSessionError` with ``runtimes`` untouched."""
        self._check_session_settings(new)
        replacement: dict[str, TunnelRuntime | InboundRuntime] = {
            name: runtime for name, runtime in runtimes.items() if isinstance(runtime, InboundRuntime)}
        added: list[str] = []
        changed: list[str] = []
        for tunnel in new.tunnels:
            current = runtimes.get(tunnel.name)
            if isinstance(current, TunnelRuntime) and current.config == tunnel:
                replacement[tunnel.name] = current
                continue
            context = self.contexts.get(context_key(tunnel))
            if context is None:
                raise NeedsNewSessionError(
                    f"tunnel {tunnel.name!r} needs a TLS context (tls = {tunnel.tls!r}, verify = {tunnel.verify!r}) "
                    "this card session did not make at its start")
            replacement[tunnel.name] = self.make_tunnel(tunnel, context)
            (changed if current is not None else added).append(tunnel.name)
        removed = [name for name in runtimes if name not in replacement]
        for name, runtime in runtimes.items():
            if replacement.get(name) is not runtime:
                self._retire(runtime)
        runtimes.clear()
        runtimes.update(replacement)
        self.config = new
        return {"added": added, "removed": removed, "changed": changed}

    def drop_ended(self, now: float | None = None) -> None:
        """Drop the retired runtimes nothing has been open on for RETIRED_LINGER_SECONDS, keeping
        their counts in ``carried``. Called at every message of the supervisor (its lease comes
        every second)."""
        now = time.monotonic() if now is None else now
        kept: list[Runtime] = []
        idle_since: list[float | None] = []
        for runtime, since in zip(self.retired, self._idle_since, strict=True):
            if runtime.open_connections:
                since = None
            elif since is None:
                since = now
            elif now - since >= RETIRED_LINGER_SECONDS:
                self._drop(runtime)
                continue
            kept.append(runtime)
            idle_since.append(since)
        self.retired, self._idle_since = kept, idle_since

    def _retire(self, runtime: Runtime) -> None:
        if isinstance(runtime, TunnelRuntime):  # no new connection offers its session: free it now
            runtime.forget_sessions()
        self.retired.append(runtime)
        self._idle_since.append(None)

    def _drop(self, runtime: Runtime) -> None:
        add_counts(self.carried.setdefault(runtime.config.name, empty_counts()),
                   runtime.counters()["counts"])  # type: ignore[arg-type]
        if isinstance(runtime, TunnelRuntime):  # what its last association kept as it ended
            runtime.forget_sessions()
        log.debug("%s: released what a reload replaced or removed: no association left on it", runtime.config.name)

    def _check_session_settings(self, new: AgentConfig) -> None:
        reason = session_change(self.config, new)
        if reason:
            raise NeedsNewSessionError(reason)


def session_change(old: AgentConfig, new: AgentConfig) -> str:
    """What in ``new`` a card session made with ``old`` cannot take in place ("" when nothing). The
    content of a CA bundle or node certificate or key file is part of its table (config/model.py
    keeps its digest): replaced at the same path, the table changed."""
    changed = [what for what, before, after in (
        ("[identity]", old.identity, new.identity), ("[trust]", old.trust, new.trust),
        ("[[inbound]]", old.inbound, new.inbound)) if before != after]
    return " and ".join(changed) + " changed" if changed else ""
