"""What a configuration needs from the machine before the agent may say "ready": shared by
``card-agent run`` (at start and on SIGHUP) and ``card-agent check``, so each is checked one way."""

from __future__ import annotations

import logging

from dicom_card_agent.config.model import AgentConfig
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.token.pin import PinSource, PinUnavailableError
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


def open_crls(settings: AgentConfig) -> CrlStore:
    """[trust] crl as the agent starts: every file must hold only readable CRLs (a certificate in
    one is refused here, by file name); later changes are picked up by each card session."""
    try:
        return CrlStore.open(settings.trust.crl, allow_expired=settings.trust.crl_expired == "warn")
    except CrlFileError as error:
        raise ConfigError(f"{settings.source} [trust].crl: {error}") from None


def crls_after_reload(new: AgentConfig, running: AgentConfig, store: CrlStore | None) -> CrlStore:
    """[trust] crl on SIGHUP. New or other files must all be usable, as at start (else the reload
    is refused, naming the file, and the running configuration and its CRLs go on); so must the
    files when no store was opened yet (``store`` None). The same files keep the running store: a
    file being replaced just then (missing for a moment, or not a regular file) must not stop the
    reload; its last good CRLs stay in use, and the reload says so in the log, naming the file."""
    if store is None or new.trust != running.trust:
        return open_crls(new)
    for report in store.unusable():
        log.warning("SIGHUP: %s [trust].crl: %s", new.source, report)
    return store
