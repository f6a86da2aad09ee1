"""Signing in, the supervisor's part: pick the identity from what the card-session process's probe
found on the card (agent/session/probe.py), ask for the PIN, and prepare what OpenSSL needs.

Everything written here is public (certificates, the key's URI, OpenSSL settings). The supervisor
never logs in: ``C_Login`` would leave copies of the PIN in this long-lived process (python-pkcs11
and the PKCS#11 module keep or free them unwiped). The PIN goes, once, to the card-session
process, which makes the one login attempt and checks the key (agent/session/worker.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import functools
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11.types import Token

from dicom_card_agent.card.pcsc import PcscUnavailable, readers_with_a_card
from dicom_card_agent.card.watcher import Card
from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.lifecycle.cancel import SignInCancelledError, current_scope
from dicom_card_agent.session.probe import FoundCard
from dicom_card_agent.session.runtime_dir import runtime_directory
from dicom_card_agent.tls.policy import (
    SIGNATURE_ALGORITHMS,
    TLS_GROUPS,
    ClientIdentityFiles,
    allows_tls_server,
)
from dicom_card_agent.tls.provider import openssl_config, provider_key_pem
from dicom_card_agent.token.discovery import PinState
from dicom_card_agent.token.identities import KEY_HIDDEN_BEFORE_LOGIN, Identity, is_ca_certificate, list_identities
from dicom_card_agent.token.module import LoadedModule
from dicom_card_agent.token.pin import STORED_PIN_USE, CardName, PinRequest, StoredPinWithheldError
from dicom_card_agent.token.profiles import ModuleProfile
from dicom_card_agent.token.secret import Secret
from dicom_card_agent.trust.anchors import TrustAnchors, TrustError

log = logging.getLogger("agent.session")


class IdentitySelectionError(CardAgentError):
    """The card holds no usable identity, or several and the configuration does not say which."""


class CertificateExpiredError(IdentitySelectionError):
    """Every personal certificate on the card has expired."""


class CertificateNotYetValidError(IdentitySelectionError):
    """Every personal certificate on the card starts later than this workstation's clock."""


class SessionFilesError(CardAgentError):
    """A card session's public files (certificate chain, key URI, OpenSSL settings) could not be
    written to the runtime directory: a full or read-only file system, a quota. Caused by the
    ``OSError``, whose errno tells a shortage of the moment (tried again) from the rest."""

    def __init__(self, directory: Path, error: OSError) -> None:
        remedy = (" (free space there, or set [agent] runtime_dir to a file system with room)"
                  if error.errno in (errno.ENOSPC, errno.EDQUOT) else "")
        super().__init__(f"cannot write the card session's files in {directory}: "
                         f"{error.strerror or error}{remedy}")


@contextmanager
def _writing_session_files(directory: Path) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        raise SessionFilesError(directory, error) from error


@dataclass(frozen=True)
class SignedIn:
    """A signed-in identity, ready for a card-session process."""

    identity: Identity
    files: ClientIdentityFiles
    directory: Path
    tls13_capable: bool
    key_id: bytes
    final_try_confirmed: bool = False  # this card's final PIN try was confirmed (in the dialog): it may be spent

    @functools.cached_property
    def expires(self) -> datetime.datetime:
        """The certificate's notAfter (UTC): the card loop asks at each turn, status and metrics too."""
        return self.identity.certificate.not_valid_after_utc


SESSION_DIRECTORY_PREFIX = "session-"
OPENSSL_CONF_NAME = "openssl.cnf"


def remove_leftover_session_files(config: AgentConfig) -> list[Path]:
    """Remove the files of card sessions whose agent was killed with them (SIGKILL of both leaves
    them: certificate chain, key URI, OpenSSL configuration; nothing secret, but nothing should
    outlive its session). Called once this agent owns the runtime directory (its control socket)."""
    leftovers = sorted(runtime_directory(config).glob(f"{SESSION_DIRECTORY_PREFIX}*"))
    for directory in leftovers:
        shutil.rmtree(directory, ignore_errors=True)
    return leftovers


def new_session_directory(config: AgentConfig, module: LoadedModule) -> Path:
    """A private directory for one card session's public files, removed when the session ends,
    with the OpenSSL configuration its process starts with (``OPENSSL_CONF``): OpenSSL reads it
    once, and the module may start OpenSSL while it probes the card, before anything is known of it."""
    parent = runtime_directory(config)
    with _writing_session_files(parent):
        directory = Path(tempfile.mkdtemp(prefix=SESSION_DIRECTORY_PREFIX, dir=parent))
        try:
            (directory / OPENSSL_CONF_NAME).write_text(_openssl_conf(module))
        except BaseException:  # a full disk, the provider not to be found: no half-made session left behind
            shutil.rmtree(directory, ignore_errors=True)
            raise
    return directory


def sign_in(config: AgentConfig, module: LoadedModule, found: FoundCard, directory: Path, *,
            confirm_final_try: bool = False) -> tuple[SignedIn, Secret | None]:
    """Choose the identity on the probed card, write its files into ``directory`` and ask for its PIN
    (None: PIN pad); no PIN is tried here. The caller hands the PIN to the card-session process and
    wipes it. A final PIN try is confirmed in the PIN dialog when the PIN source has one, for this
    card only."""
    # [trust] crl judges servers; the chain we send is built without it.
    anchors = TrustAnchors.load(config.trust.ca)
    identity = _choose_for(config, found.identities, found.card.label, module.profile)
    chain = _chain(identity, found.identities, anchors)
    files = _write_files(directory, identity, chain)
    give_stored_pin = _stored_pin_for(config, found.card)  # refused here: before the PIN is read
    pin = None if config.identity.pin.is_protected else config.identity.pin.read(
        pin_request(config, identity, found.pin_state, ask_final_try=not confirm_final_try))
    scope = current_scope()
    try:
        if scope is not None:
            scope.pin_entered()  # a sign-in cancelled while the dialog was open stops here, before the card
        if give_stored_pin is not None:
            give_stored_pin()  # from here on the PIN is on its way to the card: recorded as given
    except (SignInCancelledError, StoredPinWithheldError):
        if pin is not None:
            pin.wipe()
        raise
    if not identity.tls.tls13:
        log.warning("identity %s: %s; its sessions use TLS 1.2", identity.subject, identity.tls.note)
    signed_in = SignedIn(identity, files, directory, identity.tls.tls13, identity.key_id,
                         final_try_confirmed=found.pin_state is PinState.FINAL_TRY)
    return signed_in, pin


def signed_in_again(config: AgentConfig, module: LoadedModule, found: FoundCard,
                    signed_in: SignedIn) -> SignedIn | None:
    """``signed_in``, prepared by :func:`sign_in` under a configuration that a reload replaced by
    ``config`` while the PIN was asked for, judged and prepared again under ``config`` as
    :func:`sign_in` would, without asking for the PIN again (no PIN is tried here either): the
    identity chosen and checked against the listeners it would serve, its chain built to the new
    [trust] ca, its files written again. Raises :class:`IdentitySelectionError` when ``config``
    refuses the card: its PIN must then not go to it. None when ``config`` chooses another identity
    than the one the PIN dialog named (nothing is written then)."""
    anchors = TrustAnchors.load(config.trust.ca)
    identity = _choose_for(config, found.identities, found.card.label, module.profile, pin_entered=True)
    if identity.key_id != signed_in.key_id:
        return None
    files = _write_files(signed_in.directory, identity, _chain(identity, found.identities, anchors))
    return dataclasses.replace(signed_in, identity=identity, files=files, tls13_capable=identity.tls.tls13)


def pin_request(config: AgentConfig, identity: Identity, state: PinState, *, ask_final_try: bool) -> PinRequest:
    """The PIN dialog in plain words: whose card, what for, what the card says about tries left."""
    # Imported here: the card-session process, which imports this module too, opens no dialog, and
    # the words (with the life-cycle's causes they name) were a twentieth of its start-up.
    from dicom_card_agent.desktop.words import person_name, pin_dialog, purpose

    what_for = purpose(config.desktop.site_label, [t.name for t in config.tunnels] + [i.name for i in config.inbound])
    words = pin_dialog(person_name(identity.certificate), what_for, state, config.desktop.helpdesk,
                       ask_final_try=ask_final_try)
    return PinRequest(words, timeout=config.identity.pin_dialog_timeout)


def unusable_reason(config: AgentConfig, module: LoadedModule, token: Token) -> str | None:
    """Why sign-in to ``token`` would fail for want of an identity, judged as :func:`sign_in` judges
    it from the public objects, without a login (no PIN try is spent); None when it has one. The
    caller holds :data:`MODULE_CALLS`; a PKCS#11 error (card pulled) is raised."""
    with token.open() as public_session:
        identities = list_identities(public_session, token, module.profile, logged_in=False,
                                     allow_exportable_keys=config.identity.allow_exportable_keys)
    try:
        _choose_for(config, identities, token.label, module.profile)
    except IdentitySelectionError as error:
        return str(error).removeprefix(f"token {token.label!r} ")
    return None


# What the card-session process tells the supervisor as soon as its login succeeded, before the
# key check and its TLS contexts: the card accepted the PIN, whatever fails next.
LOGIN_ACCEPTED = "login-accepted"


def login_accepted(signed_in: SignedIn) -> None:
    """The card accepted the PIN of ``signed_in`` (its card-session process said :data:`LOGIN_ACCEPTED`):
    a stored PIN (env:, file:) that went to this card is known to be its card's, and may go to it
    again (:class:`StoredPinUse`), even when the session then fails to start (pcscd restarted, an
    upgrade): that failure is no wrong PIN, and no reason to withhold it until the agent restarts."""
    identity = signed_in.identity
    STORED_PIN_USE.accepted_by(CardName(identity.token_label, identity.token_serial))


def log_signed_in(signed_in: SignedIn, module: LoadedModule) -> None:
    """The card-session process logged in and serves: say so (the stored PIN is its card's: :func:`login_accepted`)."""
    identity = signed_in.identity
    login_accepted(signed_in)
    log.info("signed in: %s (issuer %s) on token %r serial %s, %s %d, module %s (profile %s)", identity.subject,
             identity.certificate.issuer.rfc4514_string(), identity.token_label, identity.token_serial,
             identity.key_type.upper(), identity.key_size, module.path, module.profile.name)


def _stored_pin_for(config: AgentConfig, card: Card) -> Callable[[], None] | None:
    """For a PIN source that asks nobody (env:, file:): raise :class:`StoredPinWithheldError` when its
    PIN may not go to ``card`` (another card's, several cards and none named, a try that did not end
    signed in); else what records it as given, to be called once it is read. None for a PIN a person
    gives (prompt, pinentry, PIN pad): she sees whose card it is."""
    source = config.identity.pin
    if not source.asks_nobody:
        return None
    selected = bool(config.identity.token)  # [identity] token names the card: the watcher takes no other
    cards_present = () if selected or STORED_PIN_USE.card is not None else _readers_with_a_card()
    name = CardName(card.label, card.serial)
    reason = STORED_PIN_USE.refusal(str(source), name, cards_present=cards_present, selected=selected)
    if reason is not None:
        raise StoredPinWithheldError(reason)
    return functools.partial(STORED_PIN_USE.given_to, str(source), name, cards_present=cards_present,
                             selected=selected)


def _readers_with_a_card() -> tuple[str, ...]:
    """The readers holding a card, as pcscd tells; none known without pcscd (a module's own slots)."""
    try:
        return tuple(readers_with_a_card())
    except PcscUnavailable:
        return ()


def check_key_after_login(identities: list[Identity], key_id: bytes, label: str) -> None:
    """In the card-session process, logged in: the chosen identity's private key passes every check."""
    chosen = next((i for i in identities if i.key_id == key_id and not is_ca_certificate(i.certificate)), None)
    if chosen is None:
        raise IdentitySelectionError(f"token {label!r} has no certificate with key_id {key_id.hex()} after login")
    if not chosen.usable:
        raise IdentitySelectionError(f"identity {chosen.subject} on token {label!r} is unusable: {chosen.reason}")


def _usable_before_login(identity: Identity) -> bool:
    """A key the token hides until login is not held against an identity here: the card-session
    process checks it after its login (:func:`check_key_after_login`)."""
    return not [p for p in identity.problems if not p.startswith(KEY_HIDDEN_BEFORE_LOGIN)]


def _choose_for(config: AgentConfig, identities: list[Identity], label: str, profile: ModuleProfile, *,
                pin_entered: bool = False) -> Identity:
    """The identity to sign in with, and one that every listener it would serve accepts."""
    identity = _choose(identities, config, label, profile.preferred_key_ids)
    _check_inbound_purpose(config, identity, label, pin_entered=pin_entered)
    return identity


def _check_inbound_purpose(config: AgentConfig, identity: Identity, label: str, *, pin_entered: bool = False) -> None:
    """An inbound listener served with the card's certificate needs one that allows serverAuth.
    Known only once the card is there, and another card may allow it: this card's sign-in is
    refused before any PIN is asked (or, ``pin_entered``: the listener came with a reload while the
    PIN dialog was open, before the PIN is sent), and the agent keeps running."""
    served = [inbound.name for inbound in config.inbound if inbound.server_certificate is None]
    if not served or allows_tls_server(identity.certificate):
        return
    not_used = ("the PIN entered was not sent to the card (the configuration was reloaded during the PIN dialog)"
                if pin_entered else "no PIN asked")
    raise IdentitySelectionError(
        f"token {label!r} cannot serve [[inbound]] {served[0]!r} (server_certificate = \"card\"): the card's "
        f"certificate ({identity.subject}) cannot identify a TLS server (its extended key usage lacks serverAuth); "
        f"not signed in, {not_used}: give the listener the workstation's node certificate with server_certificate "
        "and server_key, or use a card whose certificate allows serverAuth")


def _choose(identities: list[Identity], config: AgentConfig, label: str, preferred_ids: tuple[bytes, ...]) -> Identity:
    personal = [i for i in identities if not is_ca_certificate(i.certificate)]
    if config.identity.key_id is not None:
        chosen = [i for i in personal if i.key_id == config.identity.key_id]
        if not chosen:
            raise IdentitySelectionError(
                f"token {label!r} has no certificate with key_id {config.identity.key_id.hex()}")
        if not _usable_before_login(chosen[0]):
            raise IdentitySelectionError(
                f"identity {chosen[0].subject} on token {label!r} is unusable: {chosen[0].reason}")
        return chosen[0]
    usable = [i for i in personal if _usable_before_login(i)]
    if not usable:
        reasons = "; ".join(f"{i.subject}: {i.reason}" for i in personal) or _no_personal_certificate(identities)
        message = f"token {label!r} holds no usable identity ({reasons})"
        now = datetime.datetime.now(datetime.timezone.utc)
        if personal and all(now > i.certificate.not_valid_after_utc for i in personal):
            raise CertificateExpiredError(message)
        if personal and all(now < i.certificate.not_valid_before_utc for i in personal):
            raise CertificateNotYetValidError(message)
        raise IdentitySelectionError(message)
    preferred = [i for i in usable if i.key_id in preferred_ids]
    if len(usable) == 1 or len(preferred) == 1:
        return (preferred or usable)[0]
    listing = ", ".join(f"{i.subject} (key_id {i.key_id.hex()})" for i in usable)
    raise IdentitySelectionError(f"token {label!r} holds several usable identities: {listing}; "
                                 "choose one with [identity] key_id")


def _no_personal_certificate(identities: list[Identity]) -> str:
    if not identities:
        return "no certificate on the token"
    return f"only CA certificates ({', '.join(i.subject for i in identities)}), no personal certificate"


def _chain(identity: Identity, identities: list[Identity], anchors: TrustAnchors) -> list[x509.Certificate]:
    """Leaf and intermediates, so that a server knowing only the root accepts us."""
    token_cas = [i.certificate for i in identities if is_ca_certificate(i.certificate)]
    try:
        return anchors.verify_client(identity.certificate, token_cas)[:-1]  # the root is the server's to have
    except TrustError as error:
        log.warning("identity %s does not chain to [trust] ca (%s); sending it with the CA certificates found "
                    "on the token", identity.subject, error)
        return [identity.certificate, *(c for c in token_cas if c.subject != c.issuer)]


def _write_files(directory: Path, identity: Identity, chain: list[x509.Certificate]) -> ClientIdentityFiles:
    chain_path = directory / "chain.pem"
    key_path = directory / "key.pem"
    with _writing_session_files(directory.parent):
        chain_path.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain))
        key_path.write_bytes(provider_key_pem(str(identity.uri)))
    return ClientIdentityFiles(chain=chain_path, key=key_path, subject=identity.subject,
                               issuer=identity.certificate.issuer.rfc4514_string())


def _openssl_conf(module: LoadedModule) -> str:
    profile = module.profile
    return openssl_config(module.path, profile.provider_quirks, profile.provider_login_behavior,
                          tls_groups=TLS_GROUPS, signature_algorithms=SIGNATURE_ALGORITHMS)
