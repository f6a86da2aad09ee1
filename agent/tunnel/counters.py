"""What each tunnel and inbound listener carried, for ``card-agent status``: per card session and since start.

The card-session process counts its associations, handshakes and bytes (:class:`SessionCounts`,
inside each runtime of agent/tunnel/relay.py); those die with it, so the supervisor adds each
session's final counts to its :class:`Totals` when the session ends, and counts there the
associations it turns away itself (no card, PIN not entered, local peer refused). Both travel as
plain dicts (JSON on the session channel and in ``status``) of the shape :func:`empty_counts` makes.

Association outcomes are exclusive, one per connection that reached the association stage:
``accepted`` (A-ASSOCIATE-AC), ``rejected`` (A-ASSOCIATE-RJ from the acceptor: the PACS, or the
local SCP of an inbound listener), ``aborted`` (an A-ABORT from the acceptor in place of its
answer, which PS3.8 9.2 allows: turned down too, but without saying why as a rejection does),
``refused`` (by the tunnel's association rules), or ``failed`` before any answer, by one of
:data:`FAILURE_REASONS`. An accepted association that breaks later
stays ``accepted``, and is also counted in ``broken`` by one of :data:`BROKEN_REASONS` (its
failure is the tunnel's ``last_error``).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

# The outcomes counted by themselves (``failed`` is counted by its reason).
OUTCOMES = ("accepted", "rejected", "aborted", "refused")

FAILURE_REASONS = {
    "connect": "the PACS (or, inbound, the local storage SCP) could not be reached",
    "tls": "TLS handshake or peer verification failed, or the server refused the card's certificate",
    "malformed": "a malformed PDU from either side",
    "card_session_ended": "the card session ended first (card pulled, lock, idle timeout)",
    "connection": "the connection broke or closed before the association was answered",
    "busy": "inbound: too many TLS handshakes in flight (max_pending_handshakes)",
}

# Why an accepted association ended without its release: the agent's failures after the
# A-ASSOCIATE-AC (an A-ABORT the application or the PACS sends is DICOM, not one of these).
BROKEN_REASONS = {
    "pacs_stopped_answering": "the PACS answered nothing for dead_pacs_timeout (host down, network cut)",
    "connection": "the connection broke or closed unexpectedly",
    "malformed": "a malformed PDU from either side",
    "card_session_ended": "the card session ended (card pulled, lock, idle timeout)",
}

Counts = dict[str, Any]

# Upper bounds (seconds) of the duration histograms: a software key signs in ~1 ms, a card in
# 0.1 to 2 s, a handshake adds the network's round trips.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Which durations are measured: a TLS handshake (resumed or full), and the handshake steps that
# hold the token (the card's signature with the step's own cryptography), for full handshakes
# signing on the token.
DURATIONS = ("handshake", "token_signature")
DURATIONS_KEY = "durations"  # in counts for the metrics, not shown by `status`


def empty_histogram() -> dict[str, int]:
    """Per-bucket counts (``le_0.1``: at most 0.1 s, above the previous bound; ``le_inf``), the
    count and the sum in microseconds: plain ints, so that :func:`add_counts` adds them up."""
    return {**{_bucket_key(bound): 0 for bound in DURATION_BUCKETS}, "le_inf": 0, "count": 0, "sum_us": 0}


def _bucket_key(bound: float) -> str:
    return f"le_{bound:g}"


def observe(histogram: dict[str, int], seconds: float) -> None:
    key = next((_bucket_key(bound) for bound in DURATION_BUCKETS if seconds <= bound), "le_inf")
    histogram[key] = histogram.get(key, 0) + 1
    histogram["count"] = histogram.get("count", 0) + 1
    histogram["sum_us"] = histogram.get("sum_us", 0) + round(seconds * 1_000_000)


def cumulative_buckets(histogram: dict[str, int]) -> list[tuple[str, int]]:
    """(upper bound, observations at most that long) pairs, +Inf last, as Prometheus wants them."""
    buckets, total = [], 0
    for bound in DURATION_BUCKETS:
        total += histogram.get(_bucket_key(bound), 0)
        buckets.append((f"{bound:g}", total))
    buckets.append(("+Inf", total + histogram.get("le_inf", 0)))
    return buckets


def empty_counts() -> Counts:
    return {"associations": {"accepted": 0, "rejected": 0, "aborted": 0, "refused": 0, "failed": {}, "broken": {}},
            "handshakes": {"full": 0, "resumed": 0}, "bytes_up": 0, "bytes_down": 0}


def add_counts(total: Counts, more: Counts) -> None:
    """Add ``more`` into ``total`` in place, key by key (nested dicts such as reasons merge)."""
    for key, value in more.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        elif isinstance(value, int) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value


class SessionCounts:
    """One runtime's counts in the card-session process; a lock per association or chunk, as before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._associations: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._broken: Counter[str] = Counter()
        self._handshakes: Counter[str] = Counter()
        self._durations = {name: empty_histogram() for name in DURATIONS}

    def association(self, outcome: str, reason: str | None = None) -> None:
        """``outcome``: one of OUTCOMES, or failed (then ``reason``, one of FAILURE_REASONS)."""
        with self._lock:
            if outcome == "failed":
                assert reason in FAILURE_REASONS, reason
                self._failed[reason] += 1
            else:
                assert outcome in OUTCOMES, outcome
                self._associations[outcome] += 1

    def broken(self, reason: str) -> None:
        """An accepted association ended by a failure, one of BROKEN_REASONS (it also counts as accepted)."""
        assert reason in BROKEN_REASONS, reason
        with self._lock:
            self._broken[reason] += 1

    def handshake(self, resumed: bool, seconds: float | None = None, signing_seconds: float | None = None) -> None:
        with self._lock:
            self._handshakes["resumed" if resumed else "full"] += 1
            if seconds is not None:
                observe(self._durations["handshake"], seconds)
            if signing_seconds is not None:
                observe(self._durations["token_signature"], signing_seconds)

    def snapshot(self, bytes_up: int, bytes_down: int) -> Counts:
        with self._lock:
            counts = empty_counts()
            counts["associations"].update(self._associations)
            counts["associations"]["failed"] = dict(self._failed)
            counts["associations"]["broken"] = dict(self._broken)
            counts["handshakes"].update(self._handshakes)
            counts[DURATIONS_KEY] = {name: dict(histogram) for name, histogram in self._durations.items()}
        counts["bytes_up"], counts["bytes_down"] = bytes_up, bytes_down
        return counts


class Totals:
    """The supervisor's counts since start, per tunnel or inbound listener name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[str, Counts] = {}
        self._turned_away: dict[str, Counter[str]] = {}

    def session_ended(self, final: dict[str, Counts]) -> None:
        """Add an ended card session's last counts (its ``counts`` per name)."""
        with self._lock:
            for name, counts in final.items():
                add_counts(self._ended.setdefault(name, empty_counts()), counts)

    def turned_away(self, name: str, reason: str) -> None:
        with self._lock:
            self._turned_away.setdefault(name, Counter())[reason] += 1

    def since_start(self, name: str) -> Counts:
        """Ended sessions, and what the supervisor turned away."""
        counts = empty_counts()
        with self._lock:
            add_counts(counts, self._ended.get(name, {}))
            counts["associations"]["turned_away"] = dict(self._turned_away.get(name, {}))
        return counts
