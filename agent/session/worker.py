"""The card-session process: started for an inserted card, it probes the card, then does all TLS
of the identity signed in with it, and nothing else.

Started by the supervisor with ``OPENSSL_CONF`` pointing at the session's OpenSSL configuration
(read once, when OpenSSL starts in this process) and a channel on which it is first asked what the
card holds (:func:`probe_card`: the sign-in's one probe of the card), then gets the PIN once (a raw
message, into a wipeable buffer), then accepted local connections or the tunnels' listening
sockets, and once a second the supervisor's lease, without which it admits no new association on
those sockets (agent/tunnel/lent_listeners.py). It makes the sign-in's one login attempt with
python-pkcs11 and keeps that session open: the pkcs11-provider, loading the same module in this
process, uses that login, so OpenSSL normally never sees the PIN. When the session ends (card
removed, lock, agent stopping) the process ends, and with it the login, any PIN copy the module
kept and every resumable TLS session: nothing of the identity outlives it.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before any other import: from its execve until this call, any process of the agent's user may
    # attach a debugger (ptrace) and stay attached for the PIN (docs/pin-handling.md); ctypes alone,
    # as token/secret.py costs imports. main() checks that it held (secret.trace_refusal).
    import ctypes
    import sys

    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0

import logging
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from pkcs11 import ObjectClass
from pkcs11.exceptions import (
    DeviceError,
    DeviceRemoved,
    MultipleObjectsReturned,
    NoSuchKey,
    PKCS11Error,
    SessionClosed,
    SessionHandleInvalid,
    TokenNotPresent,
)
from pkcs11.types import Session

from dicom_card_agent import logline
from dicom_card_agent.audit.events import EventKind
from dicom_card_agent.card.watcher import GONE_ERRORS
from dicom_card_agent.config.model import AgentConfig, InboundConfig, TunnelConfig
from dicom_card_agent.descriptors import descriptors_exhausted
from dicom_card_agent.dicom.association import load_pydicom
from dicom_card_agent.dicom.rules import UserIdentityMode
from dicom_card_agent.dicom.user_identity import UsernameError, username_for
from dicom_card_agent.errors import CardAgentError, ConfigError
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.revocation.own_certificate import OwnCertificateWatch
from dicom_card_agent.revocation.peer import CardRevokedError, PeerRevocation, checker_for
from dicom_card_agent.service.signals import SUPERVISORS_SIGNALS
from dicom_card_agent.session import channel as messages
from dicom_card_agent.session.identity import LOGIN_ACCEPTED, check_key_after_login
from dicom_card_agent.session.orphan import SupervisorWatch
from dicom_card_agent.session.probe import CardInUseError, Probed, ProbeRequest, probe
from dicom_card_agent.session.retune import ContextKey, NeedsNewSessionError, Retuner, context_key
from dicom_card_agent.tls.policy import ClientIdentityFiles, ServerChecks, client_context, no_pin, server_context
from dicom_card_agent.tls.provider import provider_key_pem
from dicom_card_agent.token.capabilities import key_kind, tls_capability
from dicom_card_agent.token.discovery import find_token
from dicom_card_agent.token.identities import list_identities
from dicom_card_agent.token.login import LoginError, check_before_login, login
from dicom_card_agent.token.module import LoadedModule
from dicom_card_agent.token.secret import Secret, make_non_dumpable, trace_refusal
from dicom_card_agent.tunnel.counters import add_counts, empty_counts
from dicom_card_agent.tunnel.lent_listeners import LISTENERS_NOT_TAKEN, LentListeners, SupervisorLease
from dicom_card_agent.tunnel.relay import (
    CARD_LOST,
    PACS_PROBLEM,
    TOKEN_LOCK,
    InboundRuntime,
    Report,
    TunnelRuntime,
    no_report,
    serve_connection,
    tell_refusal_counts,
)
from dicom_card_agent.tunnel.session_end import SessionEnd
from dicom_card_agent.version import agent_build, agent_version

log = logging.getLogger("agent.session")
END_GRACE_SECONDS = 2.0
# Set once the process serves (its start is over): from then on an ended supervisor is seen by the
# main loop too (end of stream on the channel), which ends the relays in order.
_serving = threading.Event()
_watch: SupervisorWatch | None = None


Runtimes = dict[str, "TunnelRuntime | InboundRuntime"]
# The logged-in python-pkcs11 session, referenced until the process ends (closing it would log out).
_login_sessions: list[Session] = []
# The relays' pydicom, imported once the card is probed (see dicom.association.load_pydicom).
_pydicom_loader = threading.Thread(target=load_pydicom, name="load-pydicom", daemon=True)


class _ReceivedPin:
    """The PIN the supervisor sent, as a PIN source for :func:`login` (which wipes what it reads)."""

    def __init__(self, pin: Secret | None) -> None:
        self.pin = pin

    @property
    def is_protected(self) -> bool:
        return self.pin is None

    def read(self, prompt: str) -> Secret:
        assert self.pin is not None
        return self.pin.copy()


def _log_in(probed: Probed, start: dict, config: AgentConfig, pin: Secret | None,
            accepted: Callable[[], None]) -> None:
    """The one login attempt of this sign-in, in this process: the session stays open (and with it
    the login, which PKCS#11 shares with the pkcs11-provider loading the same module here) until
    the process ends. ``accepted`` is called once the card took the PIN, before anything else can
    fail: a stored PIN the card accepted must not be withheld from it as a wrong one."""
    # The probe has warned about a low retry count already: no second warning.
    token = probed.token
    session = login(token, _ReceivedPin(pin), confirm_final_try=start["confirm_final_try"], warn=lambda _: None)
    _login_sessions.append(session)
    accepted()
    _fail_if_session_gone(session)  # a card reset since the login: before the search below
    identities = list_identities(session, token, probed.module.profile, logged_in=True,
                                 allow_exportable_keys=config.identity.allow_exportable_keys)
    check_key_after_login(identities, bytes.fromhex(start["key_id"]), token.label)


class CardLoginCheck:
    """Whether the card still signs, asked after a TLS handshake failed in a way the card may be
    behind ("EVP lib"). The login session this process keeps must still see the card's private key
    (private objects are visible only while logged in): a card reset, or pulled and put back between
    two looks of the card loop (which then sees the same card), lost the login, and every full
    handshake fails until the session ends. The first time, the supervisor is told (CARD_LOST), and
    ends the session as a lost one, asking for the PIN again. A card that is not in the reader (any
    more) is not told: the card loop sees the removal itself, and ends the session for it.

    Out of file descriptors, the module cannot answer either, and nothing is judged: the handshake
    fails, and the next one asks again. A module that can no longer tell whether the card is there
    (an error other than the card's absence) is told, as a lost login: SoftHSM, once it ran out of
    descriptors, answers GeneralError for good in this process, and the card loop, in another
    process, goes on seeing the token, so only a new session signs again."""

    def __init__(self, session: Session, key_id: bytes, report: Report) -> None:
        self._session = session
        self._key_id = key_id
        self._report = report
        self._told = False
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        if descriptors_exhausted():
            return NO_DESCRIPTOR_LEFT
        reason, present = self._judged()
        if reason is None:
            return None
        if present is False:
            return "the card was removed"
        with self._lock:
            told, self._told = self._told, True
        if not told:
            log.error("the card no longer signs: %s; the card session ends", reason)
            self._report(CARD_LOST, {"reason": reason})
        return reason

    def why_lost(self) -> str | None:
        """Why the login is gone while the card is, or may be, in its reader; None while the card
        signs, or once it is out of its reader (the card loop sees that itself). Nothing is told."""
        reason, present = self._judged()
        return None if present is False else reason

    def _judged(self) -> tuple[str | None, bool | str]:
        """Why the card no longer signs (None: it signs), and whether it is in its reader."""
        reason = self._why_not()
        if reason is None:
            return None, True
        present = self._card_in_reader()
        if present is not True and present is not False:
            reason = f"{reason}; the module cannot say whether the card is in its reader: {present}"
        return reason, present

    def _why_not(self) -> str | None:
        lost = "its login was lost (the card was pulled and put back, reset, or its reader restarted)"
        with TOKEN_LOCK:  # one operation on the card at a time (relay.TOKEN_LOCK)
            try:
                _fail_if_session_gone(self._session)
            except _SESSION_GONE as error:
                return f"{lost}: {type(error).__name__}"
            try:
                self._session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=self._key_id)
            except NoSuchKey:  # the session lives on, logged out
                return lost
            except MultipleObjectsReturned:  # seen, more than once: logged in all the same
                return None
            except PKCS11Error as error:
                return f"{lost}: {type(error).__name__}"
        return None

    def _card_in_reader(self) -> bool | str:
        """Whether the card this process signed in with is in its reader now (put back, or never
        gone), or the error of a module that cannot say."""
        token = self._session.token
        with TOKEN_LOCK:
            try:
                return token.slot.get_token().serial == token.serial
            except GONE_ERRORS:  # pulled, and not back
                return False
            except PKCS11Error as error:
                return type(error).__name__


def _fail_if_session_gone(session: Session) -> None:
    """A call on the session alone, before a search on it: raises one of :data:`_SESSION_GONE` when
    the card took the session with it (a search would fail too, but python-pkcs11 then raises again
    in a finalizer, whose traceback Cython prints to the log). A card without random numbers
    (RandomNoRNG ...) says nothing here: the search tells."""
    try:
        session.generate_random(64)
    except _SESSION_GONE:
        raise
    except PKCS11Error:
        pass


NO_DESCRIPTOR_LEFT = "no file descriptor left in the card session (are connections being held open?)"

# What a session the card took with it fails with (pulled, reset, its reader restarted).
_SESSION_GONE = (SessionHandleInvalid, SessionClosed, DeviceRemoved, TokenNotPresent, DeviceError)


def _start(start: dict, config: AgentConfig, pin: Secret | None, node_pins: dict[str, Secret],
           report: Report, module: LoadedModule) -> tuple[Runtimes, Retuner, OwnCertificateWatch | None]:
    files = ClientIdentityFiles(chain=Path(start["chain"]), key=Path(start["key"]), subject=start["subject"],
                                issuer=start["issuer"])
    # Only if the provider wants to log in itself (this process is logged in already).
    card_pin = pin.password if pin is not None else no_pin
    tls13_capable = start["tls13_capable"]
    told_in_any_case = report  # a card that no longer signs, or whose certificate is revoked, ends the session
    card_lost = CardLoginCheck(_login_sessions[-1], bytes.fromhex(start["key_id"]), told_in_any_case)
    if config.audit is None:  # nobody would read the reports: spare every association the messages
        report = _pacs_problems_only(report) if config.desktop.notifications else no_report
    runtimes: Runtimes = {}
    ending = SessionEnd()
    revocation = checker_for(config.trust)
    leaf = _check_own_certificate(revocation, files.chain, config)
    own_certificate = OwnCertificateWatch(revocation, leaf, told_in_any_case) if leaf is not None else None

    def make_tunnel(tunnel: TunnelConfig, context: ssl.SSLContext) -> TunnelRuntime:
        checks = ServerChecks.for_tunnel(tunnel, config.trust, revocation,
                                         _revocation_alert(report, tunnel.name, tunnel.remote))
        return TunnelRuntime(config=tunnel, context=context, checks=checks, identity=files,
                             trust_ca=str(config.trust.ca), ending=ending, username=_username(tunnel, files.chain),
                             report=report, card_lost=card_lost)

    # Every context, and so every key, is made before the first connection: a token key loaded
    # after this process has done handshakes made later server certificates fail to verify
    # (OpenSSL 3.0.19 with pkcs11-provider 1.0 on SoftHSM; see benchmarks/handshake_costs.py).
    # Tunnels of the same tls and verify share one (a reload adds tunnels with the contexts there are).
    contexts: dict[ContextKey, ssl.SSLContext] = {}
    try:
        for tunnel in config.tunnels:
            key = context_key(tunnel)
            if key not in contexts:
                contexts[key] = client_context(tunnel, config.trust, files, card_pin, tls13_capable=tls13_capable)
            runtimes[tunnel.name] = make_tunnel(tunnel, contexts[key])
        for inbound in config.inbound:
            on_card = inbound.server_certificate is None
            node_key = None
            key_tls13 = tls13_capable
            if inbound.server_key_uri is not None:  # the key file OpenSSL loads holds only its URI
                node_key = files.chain.parent / f"inbound-{inbound.name}-key.pem"
                node_key.write_bytes(provider_key_pem(inbound.server_key_uri))
                key_tls13 = _node_key_tls13(module, inbound)
            node_pin = node_pins.get(inbound.name)
            context = server_context(inbound, config.trust, files, card_pin, tls13_capable=key_tls13,
                                     node_key=node_key, node_pin=node_pin.password if node_pin else None)
            runtimes[inbound.name] = InboundRuntime(
                config=inbound, context=context,
                identity_description=files.describe() if on_card else f"node certificate {inbound.server_certificate}",
                signs_on_token=on_card or node_key is not None, ending=ending, report=report,
                revocation=PeerRevocation(revocation, inbound.revocation, f"inbound {inbound.name}",  # type: ignore[arg-type]
                                          _revocation_alert(report, inbound.name, str(inbound.listen)))
                if inbound.revocation != "off" else None)
    except (ssl.SSLError, OSError) as error:
        raise CardAgentError(f"OpenSSL could not use the card's key through the pkcs11-provider: {error}; "
                             "run `card-agent doctor`") from None
    return runtimes, Retuner(config, contexts, make_tunnel), own_certificate


def _node_key_tls13(module: LoadedModule, inbound: InboundConfig) -> bool:
    """Whether the node key of ``inbound``, on a token of the card's module, can sign TLS 1.3
    handshakes (an RSA key needs RSA-PSS there, agent/token/capabilities.py); logged when it cannot."""
    assert inbound.server_key_uri is not None and inbound.server_certificate is not None
    token = find_token(module, inbound.server_key_uri)
    key_type, _, curve = key_kind(x509.load_pem_x509_certificate(inbound.server_certificate.read_bytes()))
    capability = tls_capability(set(token.slot.get_mechanisms()), key_type, curve)
    if not capability.tls13:
        log.warning("inbound %s: the node key on token %r: %s; its connections use TLS 1.2", inbound.name,
                    token.label, capability.note)
    return capability.tls13


def _pacs_problems_only(report: Report) -> Report:
    """The reports desktop notifications need when there is no audit trail (agent/desktop)."""
    def pacs_problems(kind: str, fields: dict) -> None:
        if kind == PACS_PROBLEM:
            report(kind, fields)
    return pacs_problems


def _revocation_alert(report: Report, name: str, remote: str) -> Callable[[str], None]:
    """A Security Alert for the audit trail when revocation = "prefer" lets a peer in unchecked."""
    return lambda reason: report("revocation-unchecked", {"tunnel": name, "remote": remote, "reason": reason})


def _check_own_certificate(checker: RevocationChecker, chain: Path, config: AgentConfig) -> x509.Certificate | None:
    """The card's certificate, checked at sign-in as the PACS will check it, so that the clinician
    learns at once that the card is revoked (instead of from every PACS later). Only a revoked
    certificate stops the sign-in: a source that does not answer now is the PACS's to judge. The
    certificate, to be watched while the session serves (None: every revocation policy is off)."""
    policies = [t.revocation for t in config.tunnels] + [i.revocation for i in config.inbound]
    if all(policy == "off" for policy in policies):
        return None
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())  # the first one is the card's
    verdict = checker.check(leaf, "require")
    if verdict.revoked:
        raise CardRevokedError(f"this card's certificate is revoked, so no PACS would accept it: {verdict.message}. "
                               "The card was not used: ask for a new card")
    if verdict.outcome != "allow":
        log.warning("the card's certificate could not be checked for revocation at sign-in: %s", verdict.message)
    return leaf


def _username(tunnel: TunnelConfig, chain: Path) -> str | None:
    """The username this tunnel asserts for the card (User Identity Negotiation), if it asserts one."""
    rules = tunnel.association
    if rules.user_identity is UserIdentityMode.OFF:
        return None
    certificate = x509.load_pem_x509_certificate(chain.read_bytes())  # the first one is the card's
    try:
        return username_for(certificate, rules.username_template)
    except UsernameError as error:
        raise CardAgentError(f"tunnel {tunnel.name}: {error}; change user_identity_username") from None


class ReportsDue:
    """What a card session has still to send the supervisor, for its final answer when it ends first:
    the associations accepted whose Association End is not sent yet (a relay still relaying, making
    its last reports or waiting to send one: each has at least that end to lose), and the other
    reports (alerts) waiting to be sent. Counting only the reports waiting in a send missed an
    association whose relay was between two of its reports as the process ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._associations = 0
        self._others = 0

    def sending(self, kind: str) -> None:
        with self._lock:
            if kind == EventKind.ASSOCIATION_BEGIN:
                self._associations += 1
            elif kind not in _OF_AN_ACCEPTED_ASSOCIATION:
                self._others += 1

    def done(self, kind: str, *, sent: bool) -> None:
        with self._lock:
            if kind == EventKind.ASSOCIATION_END and sent:
                self._associations -= 1
            elif kind not in _OF_AN_ACCEPTED_ASSOCIATION and kind != EventKind.ASSOCIATION_BEGIN:
                self._others -= 1

    def unsent(self) -> dict[str, int]:
        """The final answer's counts (channel.REPORTS_NOT_SENT)."""
        with self._lock:
            return {"unsent_associations": self._associations, "unsent_reports": self._others}


# Reports that an accepted association makes after its Association Begin and up to its end: counted
# with the association (ReportsDue).
_OF_AN_ACCEPTED_ASSOCIATION = frozenset({EventKind.QUERY, EventKind.INSTANCES_TRANSFERRED, EventKind.ASSOCIATION_END})


def serve(channel: socket.socket, reports: socket.socket, start: dict, probed: Probed) -> int:
    """Log in to the probed ``token`` with the PIN that follows ``start``, make every TLS context and
    serve until the supervisor says "end" (or is gone); the process's exit code."""
    try:
        pin = None if start["pin_pad"] else messages.receive_secret(channel)
        node_pins = {name: messages.receive_secret(channel) for name in start["node_pins"]}
    except ConnectionError:  # the supervisor gave up on this start
        return 1

    # Every relay thread reports here; a report longer than one record goes as several sends
    # (channel.PART), which must not interleave with another thread's. A report waits here while
    # the supervisor records those before it (an fsync or more each).
    sending = threading.Lock()
    due = ReportsDue()

    def report(kind: str, fields: dict) -> None:
        message = {"kind": kind, "fields": messages.clipped(fields)}
        due.sending(kind)
        sent = False
        try:
            with sending:
                messages.send(reports, message)
            sent = True
        except OSError:
            pass  # the supervisor is gone; this process ends with it
        finally:
            due.done(kind, sent=sent)

    try:
        config = messages.received_config(start)  # the supervisor's: this process never reads the file
        _log_in(probed, start, config, pin, accepted=lambda: messages.send(channel, {"type": LOGIN_ACCEPTED}))
        runtimes, retuner, own_certificate = _start(start, config, pin, node_pins, report, probed.module)
    except (LoginError, ConfigError) as error:
        messages.send(channel, messages.login_error_message(error))
        return 1
    except CardRevokedError as error:
        messages.send(channel, {"type": "error", "message": str(error), "plain": True, "revoked": True})
        return 1
    except (CardAgentError, PKCS11Error) as error:
        why = str(error) if isinstance(error, CardAgentError) else \
            f"the PKCS#11 module failed with {type(error).__name__} {error}".rstrip()
        messages.send(channel, {"type": "error", "message": why, **_lost_at_start(start)})
        return 1
    finally:
        for secret in [pin, *node_pins.values()]:
            if secret is not None:
                secret.wipe()
    del pin, node_pins
    messages.send(channel, {"type": "ready"})
    _pydicom_loader.join()  # before the first connection; it may wait for it in the listen backlog
    _serving.set()
    if own_certificate is not None:
        own_certificate.start()
    threads: list[threading.Thread] = []
    # The card loop renews the lease every second while it turns; past it, the lent listeners refuse
    # new associations: a supervisor that is stopped or hung cannot act on a pulled card.
    lease = SupervisorLease(_watch.supervisor_pid if _watch is not None else None)
    lent = LentListeners(runtimes, report, lease)
    reason = "the agent went away"
    while True:
        message, fds = messages.receive(channel, messages.MAX_CONFIG_MESSAGE)
        retuner.drop_ended()  # the lease comes every second: a retired runtime goes soon after its last association
        if message is None:  # no "end": the supervisor died, and cannot remove the session's files
            if _watch is not None:
                _watch.remove_session_files()
            break
        if message["type"] == messages.LEASE:
            lease.renew(float(message["at"]))
            continue
        if message["type"] == "end":
            reason = message.get("reason", "ended")
            break
        if message["type"] == "status":
            messages.send(channel, {**_status(runtimes, retuner), "last_connection": lent.last_connection})
            continue
        if message["type"] == "listen":
            if len(fds) != len(message["tunnels"]):  # the kernel dropped those this process had no room for
                _refuse_listeners(lent, message["tunnels"], fds, report)
                continue
            lent.replace(_listening_sockets(message["tunnels"], fds))
            continue
        if message["type"] == "reload":
            messages.send(channel, _reload(retuner, message, runtimes))
            continue
        if message["type"] == "connection" and not fds:
            log.error("tunnel %s: %s: a connection the agent handed over did not arrive (no file descriptor "
                      "left in the card session?): the application sees it closed", message["tunnel"],
                      message["peer"])
            continue
        if message["type"] == "connection":
            connection = socket.socket(fileno=fds[0])
            runtime = runtimes.get(message["tunnel"])
            if runtime is None:  # accepted just before a reload removed its tunnel
                log.warning("tunnel %s: no longer configured: connection closed", message["tunnel"])
                connection.close()
                continue
            thread = serve_connection(runtime, connection, message["peer"])
            threads = [t for t in threads if t.is_alive()] + ([thread] if thread is not None else [])
    lent.close()  # first: nothing more is taken up under this card's identity
    log.info("card session ending: %s", reason)
    for runtime in [*runtimes.values(), *retuner.retired]:
        runtime.ending.signal(reason)
        if isinstance(runtime, TunnelRuntime):
            runtime.forget_sessions()
    deadline = time.monotonic() + END_GRACE_SECONDS
    for thread in [*threads, *lent.relays()]:
        thread.join(max(0.0, deadline - time.monotonic()))
    tell_refusal_counts()
    try:  # the final counts, for the supervisor's totals since start
        messages.send(channel, {**_status(runtimes, retuner, final=True), **due.unsent()})
    except OSError:
        pass  # the supervisor is gone
    _exit_now(0)  # while the TLS contexts are still referenced: see _exit_now
    return 0


def _lost_at_start(start: dict) -> dict[str, str]:
    """For the error answer of a start that failed after the card took the PIN: when the card's
    login is gone with the card still in its reader (reset, pulled and put back, its reader
    restarted as the session started), ``lost``: why. The supervisor then signs the card in
    again, as after a card session lost while signed in (CardLoginCheck), where it had waited for
    the card to be pulled and put back."""
    if not _login_sessions:
        return {}
    lost = CardLoginCheck(_login_sessions[-1], bytes.fromhex(start["key_id"]), no_report).why_lost()
    return {} if lost is None else {"lost": lost}


def _refuse_listeners(lent: LentListeners, names: list[str], fds: list[int], report: Report) -> None:
    """The supervisor lent the tunnels' listening sockets, and fewer arrived than it sent (out of
    file descriptors, the kernel drops the rest): accept on none of them, and have the supervisor
    take them back, accepting and handing connections over itself, rather than leave a tunnel with
    nobody accepting on it."""
    for fd in fds:
        os.close(fd)
    lent.replace({})
    log.error("could not take over the tunnels' listening sockets: %d of %d arrived (no file descriptor left in the "
              "card session?); the agent accepts on them itself", len(fds), len(names))
    report(LISTENERS_NOT_TAKEN, {"tunnels": names})


def _listening_sockets(names: list[str], fds: list[int]) -> dict[str, socket.socket]:
    sockets = {}
    for name, fd in zip(names, fds, strict=True):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)  # the supervisor's copy is non-blocking too: one open file, one flag
        sockets[name] = sock
    return sockets


def _reload(retuner: Retuner, message: dict, runtimes: Runtimes) -> dict:
    """The answer to the supervisor's "reload", which carries the configuration it reloaded: the
    tunnels changed in place, or why it cannot be."""
    try:
        changes = retuner.apply(messages.received_config(message), runtimes)
    except (CardAgentError, NeedsNewSessionError) as error:
        return {"type": "reload-refused", "message": str(error)}
    log.info("card session: configuration reloaded: tunnels now %s", ", ".join(runtimes) or "none")
    return {"type": "reloaded", "tunnels": sorted(runtimes), **changes}


def _status(runtimes: Runtimes, retuner: Retuner, *, final: bool = False) -> dict:
    """The counters of each tunnel. A tunnel a reload changed in place has a new runtime (and new
    counts) since: the counts of the runtimes it replaced, kept or dropped, are added to its own, so
    that what the session carried never goes down in `status` and the metrics (and reaches the
    totals at its end). A tunnel the reload removed is flagged ``retired`` while its runtime is
    kept (associations on it still run, or just ended); once dropped, its counts still come, so
    that the supervisor's counts since start keep them, but no longer as a listener to show."""
    tunnels = {name: runtime.counters() for name, runtime in runtimes.items()}
    for name, counts in retuner.carried.items():
        add_counts(_entry(tunnels, name)["counts"], counts)  # type: ignore[arg-type]
    for runtime in retuner.retired:
        counters = runtime.counters()
        entry = _entry(tunnels, runtime.config.name)
        if runtime.config.name not in runtimes:  # removed: shown while its runtime is kept
            entry["retired"] = True
        add_counts(entry["counts"], counters["counts"])  # type: ignore[arg-type]
        # Its associations still open go on (a reload ends none): they count as open, where they run.
        entry["open_connections"] += counters["open_connections"]  # type: ignore[operator]
    return {"type": "status", "final": final, "tunnels": tunnels}


def _entry(tunnels: dict[str, dict[str, object]], name: str) -> dict[str, object]:
    """The status entry of ``name``, made empty for a tunnel no runtime now serves."""
    return tunnels.setdefault(name, {"open_connections": 0, "bytes_up": 0, "bytes_down": 0, "last_error": None,
                                     "counts": empty_counts()})


def _exit_now(code: int) -> NoReturn:
    """End the process without freeing the TLS contexts or running OpenSSL's teardown: releasing
    the card's key made the provider try to log in again to a token that is gone or swapped."""
    logging.shutdown()
    os._exit(code)


def probe_card(channel: socket.socket) -> tuple[dict, Probed] | None:
    """Answer the supervisor's ``probe`` with what the card holds (agent/session/probe.py), then
    wait for its ``start``: that and the probed card, or None when the sign-in ends here (the card
    cannot be used, the supervisor is of another version, or it gave up: cancelled, card pulled)."""
    message, _ = messages.receive(channel, messages.MAX_CONFIG_MESSAGE)
    if message is None:
        return None
    upgraded = upgraded_under(message)
    if upgraded is not None:  # first: nothing else of the message may mean what this code thinks
        messages.send(channel, {"type": "error", "message": upgraded, "plain": True, "upgraded": True})
        return None
    if message.get("type") != "probe":
        return None
    request = ProbeRequest.from_message(message)
    try:
        config = messages.received_config(message)  # the supervisor's: this process never reads the file
        card = probe(config, request)
    except CardAgentError as error:
        messages.send(channel, {"type": "error", "message": str(error), "plain": True,
                                "card_in_use": isinstance(error, CardInUseError)})
        return None
    except PKCS11Error as error:  # the card left mid-way, or cannot be read
        messages.send(channel, {"type": "error", "message": f"the card could not be read: the PKCS#11 module "
                                f"answered {type(error).__name__} {error}".rstrip(), "plain": True})
        return None
    try:
        check_before_login(card.token, config.identity.pin, confirm_final_try=request.confirm_final_try)
    except (LoginError, ConfigError) as error:  # no PIN attempt may be made (locked, final try, PIN pad)
        messages.send(channel, {**messages.login_error_message(error), "label": card.found.card.label,
                                "serial": card.found.card.serial})
        return None
    messages.send(channel, card.found.to_message())
    _pydicom_loader.start()  # while the clinician types the PIN, the login runs, the contexts are made
    start, _ = messages.receive(channel, messages.MAX_CONFIG_MESSAGE)
    if start is None or start.get("type") != "start":
        return None
    return start, card


def upgraded_under(first: dict) -> str | None:
    """Why this process cannot serve the supervisor that sent ``first`` (its first message), or
    None. The supervisor runs the code it started with; this process is started from the files on
    disk, which an upgrade replaces under a running agent: the two must be of one version and one
    build (version.agent_build), as the messages and reports between them change from one build to
    the next, even of one version (0.1.0-1 -> 0.1.0-2). A supervisor that says no version predates
    the version check, one that says no build the build check: either is an earlier build."""
    said = first.get("version")
    supervisor = said if isinstance(said, str) else "an earlier version"
    supervisor_build = first["build"] if "build" in first else _EARLIER
    installed, installed_build = agent_version(), agent_build()
    if supervisor == installed and supervisor_build == installed_build:
        return None
    return messages.upgraded_message(supervisor, installed, _build_name(supervisor_build), _build_name(installed_build))


_EARLIER = object()  # the build of a supervisor that says none


def _build_name(build: object) -> str:
    if build is _EARLIER:
        return "of an earlier release"
    return build if isinstance(build, str) else "not installed"


def _leave_signals_to_the_supervisor() -> None:
    """SIGTERM, SIGINT and SIGQUIT are the supervisor's to act on: it ends this process after its
    relays have ended and its last reports (the associations' ends, for the audit trail) are sent;
    so is SIGTSTP, on which it locks the session before it suspends itself.
    systemd's KillMode=control-group (a unit without KillMode=mixed) signals every process of the
    unit at once: dying then lost those reports, and the supervisor took the death for a lost
    session and signed the card in again while stopping. SIGHUP, a reload, is the supervisor's too:
    `systemctl kill -s HUP` signals every process of the unit, and `pkill -HUP -f card-agent`
    matches this process's command line where the package installs it; its default action ended
    the session and its associations. So did a signal that means nothing to the agent (`pkill -USR1
    -f card-agent`), which the supervisor logs and ignores. This process still ends when the
    supervisor says so, when its channel closes, or when the supervisor is gone (orphan.py); a
    cancelled sign-in kills it (supervisor.py)."""
    for signum in SUPERVISORS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # Blocked until now (CardSession._popen): the interpreter's start and this module's imports take
    # half a second, in which their default actions would have ended the process. Any that came is dropped.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISORS_SIGNALS)


def main() -> None:
    """The card-session process, started for an inserted card (agent/session/supervisor.py): it
    probes the card, then, once the supervisor has chosen the identity and sent the PIN, serves.
    Its ``OPENSSL_CONF`` (the session's ``openssl.cnf``) is written before it starts: OpenSSL reads
    it once, and the module may start OpenSSL while it probes the card (OpenSC does)."""
    make_non_dumpable()  # again (done first at the top, when run): it raises if it cannot be done
    _leave_signals_to_the_supervisor()
    logline.configure("card-agent[session]", sys.argv[3].upper())
    # pydicom logs what it thinks of the data sets it reads for the audit trail: not the agent's news.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    channel = socket.socket(fileno=int(sys.argv[1]))
    reports = socket.socket(fileno=int(sys.argv[2]))
    traced = trace_refusal()  # a tracer that attached before the prctl above would read the PIN
    if traced is not None:  # the answer to the probe: the supervisor shows it; no PIN is asked for
        messages.send(channel, {"type": "error", "plain": True, "message": (
            f"the card-session process (pid {os.getpid()}) stopped before reading the card: {traced}; "
            "no PIN is asked for or sent")})
        _exit_now(1)
    global _watch
    _watch = SupervisorWatch(int(sys.argv[4]), Path(sys.argv[5]), _supervisor_gone).start()
    started = probe_card(channel)
    if started is None:
        _exit_now(1)
    _exit_now(serve(channel, reports, *started))


def _supervisor_gone() -> None:
    """The supervisor ended (killed, crashed): nobody will end this session or take its answers.
    Probing or starting, the main thread may be inside the module (``C_Login`` on a slow card) or
    waiting on the network: end now. Serving, the main loop saw the end of the channel too and ends
    the relays; it is given its grace, then ended all the same."""
    if _serving.is_set():
        threading.Event().wait(END_GRACE_SECONDS + 1.0)
    _exit_now(1)


if __name__ == "__main__":
    main()
