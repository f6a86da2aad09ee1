"""``card-agent tokens`` and ``card-agent identities``."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from dicom_card_agent.cli.options import MODULE_DEFAULT, CaBundle, CrlFiles, Json, Module, TokenSelector
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.logline import printable
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.revocation.report import IdentityRevocation, cli_checker, identity_revocation
from dicom_card_agent.token.discovery import TokenDescription, describe, find_token, present_tokens
from dicom_card_agent.token.identities import Identity, list_identities
from dicom_card_agent.token.login import login
from dicom_card_agent.token.module import LoadedModule, load_module
from dicom_card_agent.token.pin import PinSource
from dicom_card_agent.trust.anchors import TrustAnchors


def tokens(module: Module = MODULE_DEFAULT, as_json: Json = False) -> None:
    """List slots with a token: label, serial, manufacturer, model and PIN state."""
    loaded = load_module(module)
    descriptions = [describe(t) for t in present_tokens(loaded, initialized_only=False)]
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in descriptions], indent=2))
        return
    typer.echo(f"module: {loaded.path} (profile {loaded.profile.name}: {loaded.library_description})")
    if not descriptions:
        typer.echo("no token present")
        return
    rows: list[tuple[str, ...]] = [("SLOT", "LABEL", "SERIAL", "MANUFACTURER", "MODEL", "PIN")]
    # Labels, serials, manufacturers and models are the card's text: escaped (agent/logline.py).
    rows += [tuple(printable(cell) for cell in (str(d.slot_id), d.label, d.serial, d.manufacturer, d.model,
                                                  _pin_column(d))) for d in descriptions]
    _table(rows)


def identities(
    module: Module = MODULE_DEFAULT,
    token: TokenSelector = None,
    ca: CaBundle = None,
    crl: CrlFiles = None,
    pin: Annotated[Optional[str], typer.Option(
        "--pin", metavar="SOURCE",
        help="Log in to check the private keys too: prompt, pinentry[:PROGRAM], env:VAR, file:PATH or protected. "
                      "Needs --token when several tokens are present (one PIN attempt per token).")] = None,
    confirm_final_try: Annotated[bool, typer.Option(
        "--confirm-final-try", help="Allow the login when the card reports its final PIN try.")] = False,
    allow_exportable_keys: Annotated[bool, typer.Option(
        "--allow-exportable-keys", help="Accept extractable keys (lab tokens only).")] = False,
    as_json: Json = False,
) -> None:
    """List certificate + key identities on the tokens, usable or not, with the reason."""
    if crl and not ca:
        raise ConfigError("--crl needs --ca: revocation is checked along the chain to the trust bundle")
    trust = TrustAnchors.load(ca, crl or []) if ca else None
    loaded = load_module(module)
    selected = [find_token(loaded, token)] if token else present_tokens(loaded)
    if pin and len(selected) > 1:
        raise ConfigError(
            "--pin with several tokens present would try the PIN on each: select one with --token "
            f"({', '.join(printable(t.label) for t in selected)})"
        )
    found: list[Identity] = []
    for each in selected:
        found += _identities_of(loaded, each, pin, trust, confirm_final_try, allow_exportable_keys)
    if ca:
        _check_revocation(found, cli_checker(ca, crl or []))
    if as_json:
        typer.echo(json.dumps([i.as_dict() for i in found], indent=2))
        return
    if not found:
        typer.echo("no identity found" + ("" if selected else ": no token present"))
        return
    for identity in found:
        cert = identity.certificate
        # Every line quotes the card (labels, subjects, reasons naming them): each is escaped.
        if identity.is_ca:  # every card carries its issuer; one line is enough
            _say(f"{identity.token_label}: CA certificate {identity.subject} (not a personal identity)")
            continue
        state = "usable" if identity.usable else f"UNUSABLE: {identity.reason}"
        _say(f"{identity.token_label}: {identity.subject}")
        _say(f"    issuer {cert.issuer.rfc4514_string()}, serial {cert.serial_number:x}")
        _say(f"    {identity.key_type.upper()} {identity.key_size}, valid {cert.not_valid_before_utc:%Y-%m-%d} "
             f"to {cert.not_valid_after_utc:%Y-%m-%d}, TLS: {identity.tls.note}")
        _say(f"    {identity.uri}")
        _say(f"    {state}")
        if identity.revocation:
            _say(f"    revocation: {IdentityRevocation(**identity.revocation).line()}")


def _check_revocation(found: list[Identity], checker: RevocationChecker) -> None:
    """Each personal identity whose chain is trusted, checked as a PACS would: OCSP, CRL
    distribution points and the --crl files; a revoked one is unusable."""
    for identity in found:
        if identity.is_ca or not identity.chain:
            continue
        status = identity_revocation(checker, identity.certificate)
        identity.revocation = {"state": status.state, "detail": status.detail}
        if status.state == "revoked" and not any("was revoked on" in p for p in identity.problems):
            identity.problems.append(status.detail)


def _identities_of(loaded: LoadedModule, token, pin: str | None, trust, confirm_final_try: bool,
                   allow_exportable_keys: bool) -> list[Identity]:
    session = login(token, PinSource.parse(pin), confirm_final_try=confirm_final_try) if pin else token.open()
    with session:
        return list_identities(session, token, loaded.profile, logged_in=bool(pin), trust=trust,
                               allow_exportable_keys=allow_exportable_keys)


def _say(line: str) -> None:
    typer.echo(printable(line))


def _pin_column(description: TokenDescription) -> str:
    if not description.initialized:
        return "blank token (not initialised)"
    return description.pin_state.value + (" (PIN pad)" if description.protected_authentication_path else "")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


