"""Every duration setting of the configuration is a finite number of seconds in a documented range
(docs/configuration.md), checked by one helper (agent/config/tables.py ``Section.seconds``).

TOML has ``nan`` and ``inf``: they passed every check (``nan <= 0`` is false), and then `card-agent
check` ended in a traceback (ValueError: cannot convert float NaN to integer) and an agent reloaded
with ``connect_timeout = inf`` aborted every association. A value too large for what uses it
(``dead_pacs_timeout = 86400``: Linux refuses a keepalive idle time over 32767 s) failed the same
way. tests/test_reload.py sends the same values to a running agent."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent_runner import inbound_listener, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.config.model import load_config
from test_inbound import node_identity


@dataclass(frozen=True)
class Duration:
    table: str  # "identity", "trust", "tunnel", "inbound", "agent", "metrics"
    key: str
    lower: str  # the smallest values allowed, as the messages say it
    maximum: str  # the largest, as the messages say it
    default: str
    why_minimum: str = ""
    why_maximum: str = ""

    @property
    def where(self) -> str:
        return {"tunnel": "[[tunnel]] 'pacs'", "inbound": "[[inbound]] 'retrieves'"}.get(self.table, f"[{self.table}]")

    def largest(self) -> float:
        return float(self.maximum.split()[0])

    def message(self, value: str) -> str:
        """What the configuration's check says about ``value`` (as TOML spells it)."""
        if value in ("nan", "inf", "-inf"):
            return (f"{self.key}: {value} is not a number of seconds: give {self.lower}, at most {self.maximum}; "
                    f"default {self.default}")
        if float(value) < 0:
            return f"{self.key}: must be {self.lower} (default {self.default})" + (
                f": {self.why_minimum}" if self.why_minimum else "")
        return f"{self.key}: {value} seconds is too long: at most {self.maximum}" + (
            f": {self.why_maximum}" if self.why_maximum else "")


POSITIVE = "a positive number of seconds"
DEAD_PACS = dict(lower="at least 2 seconds", maximum="64800 (18 hours)", default="120",
                 why_minimum="TCP keepalive probes are whole seconds apart",
                 why_maximum="the first TCP keepalive probe comes after half of it, and Linux allows at most 32767 "
                             "seconds before one")
DURATIONS = [
    Duration("identity", "pin_dialog_timeout", POSITIVE, "3600 (an hour)", "120"),
    Duration("trust", "revocation_max_age", POSITIVE, "31536000 (a year)", "604800"),
    Duration("trust", "revocation_timeout", POSITIVE, "3600 (an hour)", "3"),
    Duration("tunnel", "connect_timeout", POSITIVE, "3600 (an hour)", "10"),
    Duration("tunnel", "handshake_timeout", POSITIVE, "3600 (an hour)", "30"),
    Duration("tunnel", "dead_pacs_timeout", **DEAD_PACS),
    Duration("inbound", "connect_timeout", POSITIVE, "3600 (an hour)", "10"),
    Duration("inbound", "handshake_timeout", POSITIVE, "3600 (an hour)", "30"),
    Duration("inbound", "dead_pacs_timeout", **DEAD_PACS),
    Duration("agent", "idle_timeout", "0 (off) or a positive number of seconds", "86400 (a day)", "0"),
    Duration("metrics", "textfile_interval", POSITIVE, "86400 (a day)", "15"),
]
# What TOML can say that is no number of seconds: not a number, infinite, negative, absurdly large.
BAD_VALUES = ["nan", "inf", "-1", "1e12"]


def with_duration(path: Path, test_pki: ProvisionedPki, duration: Duration | None = None,
                  value: float | None = None, *, pacs: dict[str, Any] | None = None,
                  retrieves: dict[str, Any] | None = None, **config: Any) -> Path:
    """A configuration with a tunnel 'pacs', an [[inbound]] 'retrieves' (these two as given, else new
    ones) and [metrics]; ``duration`` set to ``value`` in its table."""
    tables: dict[str, dict[str, Any]] = {"identity": {}, "trust": {}, "agent": {}, "tunnel": {}, "inbound": {},
                                         "metrics": {"textfile": str(path.parent / "agent.prom")}}
    if duration is not None:
        tables[duration.table][duration.key] = value
    pacs = {**(pacs or tunnel("pacs", 104)), **tables.pop("tunnel")}
    retrieves = {**(retrieves or inbound_listener("retrieves", "127.0.0.1:11114", **node_identity(test_pki))),
                 **tables.pop("inbound")}
    return write_config(path, test_pki, [pacs], inbound=[retrieves], **tables, **config)


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("duration", DURATIONS, ids=lambda d: f"{d.table}.{d.key}")
def test_card_agent_check_names_a_duration_that_is_no_number_of_seconds(
        test_pki: ProvisionedPki, tmp_path: Path, duration: Duration, value: str) -> None:
    config = with_duration(tmp_path / "agent.toml", test_pki, duration, float(value))
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"fail config: {config} {duration.where}.{duration.message(str(float(value)))}"), result.stdout


@pytest.mark.parametrize("duration", DURATIONS, ids=lambda d: f"{d.table}.{d.key}")
def test_the_largest_duration_allowed_is_taken_and_one_more_second_is_not(
        test_pki: ProvisionedPki, tmp_path: Path, duration: Duration) -> None:
    """The documented bounds are the bounds (the file read as `run` reads it)."""
    largest = duration.largest()
    config = with_duration(tmp_path / "agent.toml", test_pki, duration, largest)
    settings = load_config(config)
    table = {"identity": settings.identity, "trust": settings.trust.revocation, "tunnel": settings.tunnels[0],
             "inbound": settings.inbound[0], "agent": settings, "metrics": settings.metrics}[duration.table]
    attribute = duration.key.removeprefix("revocation_") if duration.table == "trust" else duration.key
    assert getattr(table, attribute) == largest
    over = with_duration(tmp_path / "over.toml", test_pki, duration, largest + 1)
    result = run_card_agent("check", "--config", over, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2
    assert result.stdout.splitlines()[0] == (
        f"fail config: {over} {duration.where}.{duration.message(str(largest + 1))}"), result.stdout


def test_a_huge_integer_is_too_long_not_a_traceback(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """float() of an integer beyond the floats overflows: the bound is checked first."""
    config = with_duration(tmp_path / "agent.toml", test_pki)
    config.write_text(config.read_text().replace('name = "pacs"\n', 'name = "pacs"\nconnect_timeout = 1' + "0" * 400
                                                 + "\n"))
    result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"fail config: {config} [[tunnel]] 'pacs'.connect_timeout: 1{'0' * 400} seconds is too long: at most 3600 "
        "(an hour)"), result.stdout
