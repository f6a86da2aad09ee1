"""``card-agent status`` and ``card-agent lock``: ask the running agent over its control socket."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import typer

from dicom_card_agent.audit.refusal import refusal_advice
from dicom_card_agent.cli.options import ConfigFile, Json
from dicom_card_agent.config.locate import locate_config
from dicom_card_agent.config.model import load_config
from dicom_card_agent.config.tables import read_config_file
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.logline import printable
from dicom_card_agent.session import control


def status(config: ConfigFile = None, as_json: Json = False) -> None:
    """Who is signed in, since when, each tunnel's connections and traffic, and the CRL files' state."""
    asked = _ask_agent(config, "status")
    answer = asked.answer
    if answer.get("configuration") is not None:  # an agent from before this key tells nothing of it
        _compare_with_file(answer["configuration"], asked)
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    _say(f"state:    {answer['state']}")
    if answer["identity"]:
        _say(f"identity: {answer['identity']} (issuer {answer['issuer']})")
        _say(f"token:    {answer['token']!r} serial {answer['token_serial']}, since {answer['since']}")
        if answer.get("expires"):  # an agent from before this key tells nothing of it
            _say(f"expires:  {answer['expires']} (the certificate's end of validity)")
    present = answer.get("present_tokens") or []
    _say("present:  " + (", ".join(f"{t['label']!r} (serial {t['serial']})" if "label" in t
                                   else f"a card in reader {t['reader']!r}" for t in present) or "no token"))
    if answer.get("reader_trouble"):
        _say(f"reader:   {answer['reader_trouble']}")
    if answer["last_error"]:
        _say(f"last error: {answer['last_error']}")
    if answer.get("card_session_answering") is False:  # an agent from before this key always counted
        _say(f"card session: {UNANSWERED}: its open connections and traffic are unknown, not 0; the log says "
             "since when")
    for tunnel in answer["tunnels"]:
        _say(f"tunnel {tunnel['name']}: {tunnel['listen']} -> {tunnel['remote']}, "
             + _live(tunnel, f"{tunnel['bytes_up']} bytes up, {tunnel['bytes_down']} down"))
        if tunnel.get("listen_error"):  # its unix socket file was removed and cannot be made again
            _say(f"  not reachable: {tunnel['listen_error']}")
        _say_counts(tunnel, "rejected by the PACS", "up", "down")
    for inbound in answer["inbound"]:
        _say(f"inbound {inbound['name']}: {inbound['listen']} -> {inbound['forward']}, "
             + _live(inbound, f"{inbound['bytes_down']} bytes in, {inbound['bytes_up']} out"))
        _say_counts(inbound, "rejected by the local SCP", "out", "in")
    for retired in answer.get("retired", []):  # an agent from before this key has none
        if retired["open_connections"]:
            _say(f"tunnel {retired['name']} (removed by a reload): {retired['open_connections']} open until they end")
    audit = answer["audit"]
    if audit:
        where = " and ".join(filter(None, [audit["file"], audit["repository"]]))
        delivery = ""
        if audit["repository"]:
            delivery = (f", repository {'connected' if audit['connected'] else 'not connected'}, "
                        f"{audit['pending']} waiting" + (f" ({audit['last_error']})" if audit["last_error"] else ""))
        kept = audit.get("in_memory", 0)
        if kept:  # [audit] on_failure = "refuse" while a sink fails
            delivery += f", {kept} event{'' if kept == 1 else 's'} kept in memory: the audit trail cannot be written"
        _say(f"audit:    to {where}{delivery}")
        _say_audit_trouble(audit)
    for crl in answer.get("crls", []):
        _say(f"crl {crl['file']}: {_describe_crl_file(crl)}")


UNANSWERED = "did not answer"


def _live(listener: dict, traffic: str) -> str:
    """A listener's open connections and traffic now, or that they are unknown (the card session
    did not answer: `null` in --json)."""
    if listener["open_connections"] is None:
        return f"open connections unknown (the card session {UNANSWERED})"
    return (f"{listener['open_connections']} open, {traffic}"
            + (f", last error: {listener['last_error']}" if listener["last_error"] else ""))


def _say_audit_trouble(audit: dict) -> None:
    """Events lost since start, and the refusal of new associations (``on_failure = "refuse"``):
    both are in the log once, but an administrator asks ``status`` (an agent from before these
    keys has neither)."""
    lost = audit.get("lost", 0)
    if lost:
        _say(f"  {lost} audit event{'' if lost == 1 else 's'} could not be recorded since start "
             "(the log says which and why)")
    if audit.get("refusing"):
        _say(f"  new associations are refused: {audit['refusal']}{refusal_advice(audit['refusal'])}")


def _say_counts(counters: dict, rejected_by: str, up: str, down: str) -> None:
    for title, key in (("since start", "since_start"), ("this card session", "this_session")):
        if counters.get(key) is not None:  # an agent from before these counts has none; unknown: null
            _say(f"  {title}: {_describe_counts(counters[key], rejected_by, up, down)}")


def _describe_counts(counts: dict, rejected_by: str, up: str, down: str) -> str:
    associations, handshakes = counts["associations"], counts["handshakes"]
    broken = associations.get("broken", {})  # an agent from before these counts has none
    broke_off = f" ({sum(broken.values())} broke off: {_reasons(broken)})" if broken else ""
    parts = [f"{associations['accepted']} associations accepted{broke_off}",
             f"{associations['rejected']} {rejected_by}",
             *([f"{associations['aborted']} aborted instead of an answer"] if associations.get("aborted") else []),
             f"{associations['refused']} refused by the association rules",
             f"{sum(associations['failed'].values())} failed{_by_reason(associations['failed'])}"]
    if "turned_away" in associations:
        turned_away = associations["turned_away"]
        parts.append(f"{sum(turned_away.values())} turned away{_by_reason(turned_away)}")
    return (", ".join(parts) + f"; {handshakes['full']} full TLS handshakes, {handshakes['resumed']} resumed; "
            f"{counts['bytes_up']} bytes {up}, {counts['bytes_down']} {down}")


def _by_reason(reasons: dict[str, int]) -> str:
    return f" ({_reasons(reasons)})" if reasons else ""


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))


def _describe_crl_file(crl: dict) -> str:
    contents = ", ".join(f"CRL of {entry['issuer']}, next update {entry['next_update'] or 'none'}"
                         + (" (EXPIRED)" if entry["expired"] else "") for entry in crl["crls"])
    if crl["state"] == "unusable":
        kept = f"; still using {contents}" if contents else ""
        return f"UNUSABLE: {crl['error']}{kept}"
    return f"{crl['state']}: {contents}"


def _say(line: str) -> None:
    """One line of the status: errors quote peers (AE titles, certificate subjects), escaped here."""
    typer.echo(printable(line))


def _compare_with_file(running: dict, asked: _Asked) -> None:
    """Add to the agent's ``configuration`` whether the file says what the agent runs, and warn on
    stderr when it does not, or when the agent's latest reload of the file as it is did not take
    effect: `status` shows the running configuration, and an edit not reloaded or refused is
    otherwise told only in the log (`systemctl reload` reports success either way)."""
    running["file_sha256"] = hashlib.sha256(asked.file).hexdigest() if asked.file is not None else None
    running["file_matches"] = running["file_sha256"] == running["sha256"] if asked.file is not None else None
    if asked.load_error is None:  # else already warned: the file does not load, which says why it does not apply
        warning = drift_warning(asked.path, running)
        if warning is not None:
            _warn(warning)


def drift_warning(path: Path, running: dict) -> str | None:
    """What to tell of the configuration file ``path``, which loads, and the agent's ``configuration``
    (with ``file_sha256`` and ``file_matches`` added): None when the file is what the agent runs and
    no reload of it failed."""
    last = running.get("last_reload")
    failed: dict | None = last if last is not None and not last["applied"] else None
    # Whether that reload read the file as it is now (unknown: assume so, and say why it failed).
    not_applied = (f"its latest reload, at {failed['at']}, read it and did not take effect: {failed['message']}"
                   if failed is not None and failed.get("file_sha256") in (None, running["file_sha256"]) else "")
    if running["file_matches"] is False:
        changed_after = (f"the agent's latest reload, at {failed['at']}, which did not take effect (`status --json` "
                         "and the log say why)" if failed is not None else f"the agent read it ({running['read_at']})")
        why = not_applied or (f"the file was changed after {changed_after}, and not reloaded: check it with "
                              "`card-agent check`, then `systemctl --user reload card-agent` (or SIGHUP)")
        return f"warning: {path} differs from the configuration the running agent runs, which `status` shows: {why}"
    if not_applied:  # the file is what the agent runs: the reload failed on something else (a PIN file, a CA file)
        return (f"warning: {path} is the configuration the running agent read at {running['read_at']}, but "
                f"{not_applied}")
    return None


def _warn(line: str) -> None:
    typer.echo(printable(line), err=True)


def lock(config: ConfigFile = None) -> None:
    """End the card session now, as if the card had been pulled."""
    answer = _ask_agent(config, "lock").answer
    if answer["locked"] and answer.get("signing_in"):
        typer.echo("locked: the sign-in under way was cancelled; re-insert the card to sign in")
    elif answer["locked"]:
        typer.echo("locked: every connection of the card session was closed; re-insert the card to sign in again")
    else:
        typer.echo(f"nothing to lock ({answer['state']})")


@dataclass(frozen=True)
class _Asked:
    answer: dict  # the agent's
    path: Path  # the configuration file
    file: bytes | None  # its bytes as this command read them; None: unreadable
    load_error: CardAgentError | None  # why it does not load now (said on stderr), or None


def _ask_agent(config_option: Path | None, command: str) -> _Asked:
    """``command`` to the running agent of the configuration file. One that does not load now (a
    mistake in an edit, which the agent refused at its reload) is an error when no agent answers,
    and said on stderr when the agent, which goes on with the configuration it read, does."""
    path = locate_config(config_option)
    try:
        config = load_config(path)
    except CardAgentError as error:
        answer = control.request_without_loading(path, command, error)
        _warn(f"warning: {error}; the running agent answered, which goes on with the configuration it read before")
        return _Asked(answer, path, _bytes_of(path), error)
    return _Asked(control.request(config, command), path, config.raw, None)


def _bytes_of(path: Path) -> bytes | None:
    try:
        return read_config_file(path)
    except CardAgentError:  # unsafe or unreadable: what it holds is unknown (null in --json)
        return None
