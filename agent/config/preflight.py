"""What a configuration needs from the machine before the agent may say "ready": shared by
``card-agent run`` (at start and on SIGHUP) and ``card-agent check``, so each is checked one way."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.file_trust import UnsafeFileError, check_trusted_file
from dicom_card_agent.token.pin import PinSource, PinUnavailableError
from dicom_card_agent.trust.anchors import CA_BUNDLE, CA_BUNDLE_RISK
from dicom_card_agent.trust.crls import CrlFileError, CrlStore

log = logging.getLogger("agent")


def pin_sources(settings: AgentConfig) -> list[tuple[str, PinSource]]:
    """Every PIN source of the configuration, with the key that names it."""
    return [(f"{settings.source} [identity].pin", settings.identity.pin),
            *((f"{settings.source} [[inbound]] {i.name!r}.server_key_pin", i.server_key_pin)
              for i in settings.inbound if i.server_key_pin)]


def prepare_pin_sources(settings: AgentConfig) -> None:
    """Before `ready:`: refuse a PIN file others could write, an unset env: variable, a pinentry
    program that is not there (none of them fixes itself), naming the key; take env: PINs out of
    the environment."""
    for where, source in pin_sources(settings):
        try:
            source.prepare()
        except PinUnavailableError as error:
            raise ConfigError(f"{where}: {error}") from None


TrustedFile = tuple[str, Path, str, str]
"""A file the agent trusts: the key that names it, its path, and what it is and what another user
could do with it, for the refusal."""


def trusted_files(settings: AgentConfig) -> Iterator[TrustedFile]:
    """Every certificate or key file of the configuration that decides whom the agent trusts or what
    it presents, besides the CRL files (agent/trust/crls.py checks those at each look)."""
    yield f"{settings.source} [trust].ca", settings.trust.ca, CA_BUNDLE, CA_BUNDLE_RISK
    yield from tunnel_and_listener_files(settings)


def tunnel_and_listener_files(settings: AgentConfig) -> Iterator[TrustedFile]:
    """require_issuer and the inbound listeners' certificates and keys (`check` reads the CA bundle itself)."""
    for tunnel in settings.tunnels:
        if tunnel.require_issuer is not None:
            yield (f"{settings.source} [[tunnel]] {tunnel.name!r}.require_issuer", tunnel.require_issuer,
                   "the required issuer's certificate", f"choose which CA's servers tunnel {tunnel.name} accepts")
    for listener in settings.inbound:
        if listener.server_certificate is not None:
            yield (f"{settings.source} [[inbound]] {listener.name!r}.server_certificate", listener.server_certificate,
                   "the listener's certificate", f"change the certificate inbound {listener.name} presents to the PACS")
        if listener.server_key is not None:
            yield (f"{settings.source} [[inbound]] {listener.name!r}.server_key", listener.server_key,
                   "the listener's key", f"replace the key inbound {listener.name} proves its certificate with")


def refuse_unsafe_trust_files(settings: AgentConfig) -> None:
    """Refuse, naming the key, a trust file another user could have changed (agent/file_trust.py):
    the CA bundle at once, not at the first card, whose sign-in would read it. A file that is not
    there passes: reading it says so, in its own words."""
    refuse_unsafe(trusted_files(settings))


def refuse_unsafe(files: Iterable[TrustedFile]) -> None:
    """Raise :class:`ConfigError`, naming the key, for the first of ``files`` another user could have changed."""
    for where, path, what, risk in files:
        try:
            check_trusted_file(path, what, risk)
        except UnsafeFileError as error:
            raise ConfigError(f"{where}: {error}") from None


def open_crls(settings: AgentConfig) -> CrlStore:
    """The trust files as the agent starts: none another user could have changed
    (:func:`refuse_unsafe_trust_files`), and the CRL files as :func:`open_crl_files` opens them."""
    refuse_unsafe_trust_files(settings)
    return open_crl_files(settings)


def open_crl_files(settings: AgentConfig) -> CrlStore:
    """[trust] crl as the agent starts: every file must be safe and hold only readable CRLs (a
    certificate in one is refused here, by file name); later changes are picked up by each card session."""
    try:
        return CrlStore.open(settings.trust.crl, allow_expired=settings.trust.crl_expired == "warn")
    except CrlFileError as error:
        raise ConfigError(f"{settings.source} [trust].crl: {error}") from None


def crls_after_reload(new: AgentConfig, running: AgentConfig, store: CrlStore | None) -> CrlStore:
    """[trust] crl on SIGHUP. New or other files must all be usable, as at start (else the reload
    is refused, naming the file, and the running configuration and its CRLs go on); so must the
    files when no store was opened yet (``store`` None). The same files keep the running store: a
    file being replaced just then (missing for a moment, or not a regular file) must not stop the
    reload; its last good CRLs stay in use, and the reload says so in the log, naming the file.
    Every reload refuses the other trust files when another user could have changed them, as the start does."""
    refuse_unsafe_trust_files(new)
    if store is None or new.trust != running.trust:
        return open_crl_files(new)
    for report in store.unusable():
        log.warning("SIGHUP: %s [trust].crl: %s", new.source, report)
    return store
