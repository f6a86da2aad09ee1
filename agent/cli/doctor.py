"""``card-agent doctor``: check each part the agent needs, one line each, with the fix.

The configuration, found as ``run`` finds it (agent/config/locate.py), gives the module, the token,
the CA bundle and the CRL files; a flag overrides each. Without a configuration the flags alone
(and ``auto``) are used; a configuration file another user could have changed is refused (exit 2),
as by every command that reads it."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography import x509

from dicom_card_agent.cli.options import MODULE_DEFAULT, CaBundle, ConfigFile, CrlFiles, TokenSelector
from dicom_card_agent.config.locate import ENVIRONMENT_VARIABLE, ConfigNotFoundError, locate_config
from dicom_card_agent.config.model import AgentConfig, load_config
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.file_trust import UnsafeFileError
from dicom_card_agent.logline import printable
from dicom_card_agent.revocation.report import cli_checker, identity_revocation
from dicom_card_agent.tls.provider import check_provider_loads, openssl_config, provider_module_path
from dicom_card_agent.token.discovery import PinState, describe, find_token, present_tokens
from dicom_card_agent.token.identities import list_identities
from dicom_card_agent.token.login import describe_pin_state
from dicom_card_agent.token.module import LoadedModule, ModuleStartError, load_module
from dicom_card_agent.trust.anchors import TrustAnchors


@dataclass(frozen=True)
class Check:
    status: str  # "ok" | "fail" | "warn" | "skip"
    name: str
    detail: str
    fix: str = ""


# --module as options.Module, without a default: the configuration's module applies when it is not given.
DoctorModule = Annotated[
    Optional[str],
    typer.Option(
        "--module", "-m", envvar="CARD_AGENT_MODULE", metavar="NAME|PATH", show_default=False,
        help="PKCS#11 module: a profile name (softhsm2, opensc, yubikey-ykcs11, ...), a path to the .so, or auto. "
             "Default: the configuration's [identity] module, else auto.",
    ),
]


def doctor(
    module: DoctorModule = None,
    token: TokenSelector = None,
    ca: CaBundle = None,
    crl: CrlFiles = None,
    config: ConfigFile = None,
) -> None:
    """Check OpenSSL, the pkcs11-provider, the PKCS#11 module, tokens, PIN state and certificate chains;
    the module, token, CA bundle and CRLs of the agent's configuration unless the flags name others."""
    found = _configuration(config)
    failed = report(_with_configuration(found, module, token, ca, crl or []))
    raise typer.Exit(1 if failed else 0)


def _configuration(explicit: Path | None) -> tuple[Path, AgentConfig | CardAgentError] | None:
    """The configuration ``run`` would use, or the error reading it; ``None`` when there is none
    (none named, none in the places searched). A file another user could have changed is refused
    here (UnsafeFileError: exit 2 with its message, as ``status`` does), and so is one that is named
    but missing: never a reason to go on without it."""
    try:
        path = locate_config(explicit)
    except ConfigNotFoundError:
        if explicit is None and not os.environ.get(ENVIRONMENT_VARIABLE):
            return None
        raise
    try:
        return path, load_config(path)
    except CardAgentError as error:
        if isinstance(error, UnsafeFileError) or not path.exists():
            raise  # refused, or named and not there: exit 2, as `status` does
        return path, error  # a setting to correct: one failed check, the card is checked all the same


def _with_configuration(found: tuple[Path, AgentConfig | CardAgentError] | None, module: str | None,
                        token: str | None, ca: Path | None, crls: list[Path]) -> Iterator[Check]:
    """The checks, with what the configuration says where no flag says otherwise."""
    module_key, token_key = "--module", "--token"
    if found is not None:
        path, settings = found
        if isinstance(settings, CardAgentError):
            yield Check("fail", "config", str(settings), "correct what the message names (`card-agent check` "
                                                         "checks the whole file); the checks below use the flags")
        else:
            if module is None:
                module, module_key = settings.identity.module, "[identity] module"
            if token is None and settings.identity.token:
                token, token_key = settings.identity.token, "[identity] token"
            ca = ca or settings.trust.ca
            crls = crls or list(settings.trust.crl)
            yield Check("ok", "config", f"{path}: module {module}, token {token or '(any)'}, CA bundle {ca}, "
                                        f"{len(crls)} CRL file(s)")
    yield from run_checks(module or MODULE_DEFAULT, token, ca, crls, module_key=module_key, token_key=token_key)


def report(checks: Iterable[Check]) -> bool:
    """Print each check as it comes, one line (and its fix); True when one failed."""
    failed = False
    for check in checks:
        failed |= check.status == "fail"
        typer.echo(printable(f"{check.status:<4} {check.name}: {check.detail}"))  # labels and subjects: the card's text
        if check.fix:
            typer.echo(f"     fix: {check.fix}")
    return failed


def _attempt(name: str, action: Callable[[], str], fix: str) -> Check:
    try:
        return Check("ok", name, action())
    except CardAgentError as error:
        return Check("fail", name, str(error), fix)


def platform_checks(module_spec: str, module_key: str = "--module", *,
                    refuse_unsafe: bool = False) -> tuple[list[Check], LoadedModule | None]:
    """OpenSSL, the pkcs11-provider, the PKCS#11 module and the provider loading it (``doctor`` and
    ``check``); the module when it loads. ``module_key``: where the user names the module.
    ``refuse_unsafe``: a module another user could have changed raises UnsafeFileError (exit 2, as
    every command that loads it) instead of being one failed check."""
    checks = []
    if ssl.OPENSSL_VERSION_INFO >= (3,):
        checks.append(Check("ok", "openssl", f"{ssl.OPENSSL_VERSION} (Python ssl module)"))
    else:
        checks.append(Check("fail", "openssl", f"{ssl.OPENSSL_VERSION}: the pkcs11-provider needs OpenSSL 3",
                            "run the agent with a Python linked against OpenSSL 3 (Debian 12 / Ubuntu 22.04 or later)"))
    checks.append(_attempt("pkcs11-provider", lambda: f"installed at {provider_module_path()}",
                           "apt-get install pkcs11-provider (Debian 12: -t bookworm-backports)"))
    try:
        loaded = load_module(module_spec)
    except CardAgentError as error:
        if refuse_unsafe and isinstance(error, UnsafeFileError):
            raise
        fix = ("the module is installed and loads: set up what it needs to start (above); reinstalling it does "
               "not help" if isinstance(error, ModuleStartError) else
               "install the card's PKCS#11 module (smart cards: `apt-get install opensc`) or "
               f"{'pass' if module_key.startswith('--') else 'set'} {module_key}")
        checks.append(Check("fail", "pkcs11-module", str(error), fix))
        return checks, None
    checks.append(Check("ok", "pkcs11-module",
                        f"{loaded.path} (profile {loaded.profile.name}: {loaded.library_description})"))
    profile = loaded.profile
    checks.append(_attempt(
        "provider-loads",
        lambda: check_provider_loads(openssl_config(loaded.path, profile.provider_quirks,
                                                    profile.provider_login_behavior)) and
        f"OpenSSL activates the pkcs11-provider with {loaded.path}",
        "check the provider and module versions (`openssl list -providers` with the generated config)",
    ))
    return checks, loaded


def run_checks(module_spec: str, token_selector: str | None, ca, crls, *, module_key: str = "--module",
               token_key: str = "--token") -> Iterator[Check]:
    """Each check in turn; ``module_key`` and ``token_key``: where the module and the token were named
    (a flag or the configuration), for the fixes."""
    checks, loaded = platform_checks(module_spec, module_key, refuse_unsafe=True)
    yield from checks
    if loaded is None:
        return
    profile = loaded.profile

    try:
        tokens = [find_token(loaded, token_selector)] if token_selector else present_tokens(loaded)
    except CardAgentError as error:
        yield Check("fail", "tokens", str(error), f"check the {token_key} selector")
        return
    if not tokens:
        yield Check("fail", "tokens", f"no token present in {loaded.path}",
                    "insert the card; check that pcscd runs (`systemctl status pcscd`) and the reader is seen "
                    "(`pcsc_scan`); for SoftHSM export SOFTHSM2_CONF")
        return
    yield Check("ok", "tokens", ", ".join(f"{t.label!r}" for t in tokens))

    trust = None
    if ca:
        try:
            trust = TrustAnchors.load(ca, crls)
        except CardAgentError as error:
            yield Check("fail", "trust", str(error), "give a readable PEM CA bundle with --ca and, with --crl, "
                        "files holding only CRLs")
    for token in tokens:
        description = describe(token)
        state = description.pin_state
        pin_check = f"pin {token.label}"
        if state in (PinState.OK, PinState.COUNT_LOW):
            yield Check("ok", pin_check, describe_pin_state(state)
                        + (" (PIN pad on the reader)" if description.protected_authentication_path else ""))
        else:
            yield Check("fail", pin_check, describe_pin_state(state),
                        "ask the card administrator to unblock or reset the PIN (PUK / SO PIN) before signing in")
        with token.open() as session:
            identities = list_identities(session, token, profile, logged_in=False, trust=trust)
        usable = [i for i in identities if i.usable]
        if not usable:
            personal = [i for i in identities if not i.is_ca] or identities
            reasons = "; ".join(f"{i.subject}: {i.reason}" for i in personal) or "no certificate on the token"
            yield Check("fail", f"identity {token.label}", reasons,
                        identity_fix([i.reason for i in personal if i.reason]))
            continue
        for identity in usable:
            yield Check("ok", f"identity {token.label}", f"{identity.subject}, {identity.key_type.upper()} "
                        f"{identity.key_size}; TLS: {identity.tls.note}")
            if trust is None:
                yield Check("skip", f"chain {token.label}", "not checked: give the server's CA bundle with --ca")
            else:
                chain = " <- ".join(c.subject.rfc4514_string() for c in identity.chain)
                yield Check("ok", f"chain {token.label}", f"complete to {trust.source}: {chain}")
                yield _revocation_check(token.label, identity.certificate, ca, crls)


def _revocation_check(label: str, certificate: x509.Certificate, ca: Path, crls: list[Path]) -> Check:
    status = identity_revocation(cli_checker(ca, crls), certificate)
    if status.state == "revoked":
        return Check("fail", f"revocation {label}", status.detail,
                     "this card cannot be used any more: ask for a new card")
    if status.state == "no answer":
        return Check("warn", f"revocation {label}", status.detail,
                     "check that this computer reaches the OCSP responder / CRL distribution point of the issuing CA "
                     "(a PACS checking revocation may refuse this card meanwhile)")
    return Check("ok", f"revocation {label}", status.detail)


# What to do about an unusable identity, by the start of its reason (agent/token/identities.py).
_IDENTITY_FIXES = (
    ("was revoked", "the certificate was revoked: ask the card's issuer for a new certificate (a new card)"),
    ("expired on", "the certificate has expired: ask the card's issuer to renew it"),
    ("not yet valid", "the certificate is not valid yet: check the workstation's clock, or wait for its start date"),
    ("does not chain to a CA in", "ask for a certificate from a CA the PACS trusts, or give --ca the right bundle"),
    ("no CRL from", "add the issuer's current CRL with --crl"),
    ("the CRL of", "add the issuer's current CRL with --crl"),
    ("extractable key", "re-generate the key on the token (--allow-exportable-keys accepts it on lab tokens only)"),
    ("no matching key visible before login", "run `card-agent identities --pin ...` to check the key after login"),
)
_DEFAULT_IDENTITY_FIX = "ask for a client certificate (clientAuth, digitalSignature) for the key on this card"


def identity_fix(reasons: list[str]) -> str:
    """The fix for the first reason a fix is known for; a client certificate when none is."""
    for reason in reasons:
        for start, fix in _IDENTITY_FIXES:
            if start in reason:
                return fix
    return _DEFAULT_IDENTITY_FIX
