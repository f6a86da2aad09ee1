"""Reading ``card-agent run --config FILE``.

Every key is documented in docs/configuration.md. Relative paths are relative to the directory of
the configuration file. An unknown key is an error, so that a typo never silently drops a setting.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from dicom_card_agent.audit.config import AuditConfig, parse_audit_config
from dicom_card_agent.config.tables import Seconds, Section, content_digest, host_port, read_config_file, toml_of
from dicom_card_agent.desktop.config import DesktopConfig, parse_desktop_config
from dicom_card_agent.dicom.rules import AssociationRules, ExistingUserIdentity, UserIdentityMode
from dicom_card_agent.dicom.user_identity import UsernameError, check_template
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.token.pin import PinSource
from dicom_card_agent.token.profiles import AUTO
from dicom_card_agent.token.uri import Pkcs11Uri, Pkcs11UriError
from dicom_card_agent.tunnel.admission import LOOPBACK_NETWORKS, AllowFromError, Network, parse_network
from dicom_card_agent.tunnel.peer import is_loopback

TLS_MODES = ("bcp195", "tls13")
VERIFY_MODES = ("chain", "pin")
_PIN_RE = re.compile(r"^(sha256[:/])?([0-9a-fA-F]{2}(:?[0-9a-fA-F]{2}){31})$")


@dataclass(frozen=True)
class ListenAddress:
    """A local listener: ``unix:/path`` or ``host:port``."""

    host: str | None = None
    port: int | None = None
    unix_path: str | None = None

    def __str__(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class IdentityConfig:
    token: str = ""  # empty: whichever card is inserted (shared workstations)
    module: str = AUTO
    pin: PinSource = field(default_factory=lambda: PinSource("prompt"))
    key_id: bytes | None = None
    allow_exportable_keys: bool = False
    pin_dialog_timeout: float = 120.0  # a PIN dialog nobody answers is closed: the workstation may be unattended


CRL_EXPIRED_CHOICES = ("refuse", "warn")
REVOCATION_POLICIES = ("require", "prefer", "off")


@dataclass(frozen=True)
class RevocationSettings:
    """Where OCSP and CRL answers are kept and how long a check may wait for them ([trust] revocation_*)."""

    cache: Path | None = None  # None: ~/.cache/dicom-card-agent/revocation ($XDG_CACHE_HOME)
    max_age: float = 7 * 24 * 3600.0  # seconds an answer is used at most, even if its nextUpdate is later
    timeout: float = 3.0  # seconds a first, uncached check waits for the sources
    ocsp_responder: str | None = None  # asked instead of the responders the certificates name


@dataclass(frozen=True)
class TrustConfig:
    ca: Path
    crl: tuple[Path, ...] = ()
    crl_expired: str = "refuse"  # or "warn": what an expired CRL means for the certificates it covers
    revocation: RevocationSettings = field(default_factory=lambda: RevocationSettings())
    # What `ca` held when the configuration was read (tables.content_digest): a bundle replaced at the
    # same path is a changed [trust] for a reload, as another path is. So are the *_digest below.
    ca_digest: str = field(default="", repr=False)


DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_DEAD_PACS_TIMEOUT = 120.0  # docs/dicom.md: TCP keepalive and TCP_USER_TIMEOUT on the PACS's connection
MIN_DEAD_PACS_TIMEOUT = 2.0
# Linux refuses a TCP_KEEPIDLE above 32767 s (MAX_TCP_KEEPIDLE), and the first probe comes after half of
# dead_pacs_timeout (agent/tunnel/relay.py keep_alive): more than twice that failed every association.
MAX_DEAD_PACS_TIMEOUT = 18 * 3600.0

# Every duration setting, with its range (docs/configuration.md): finite, positive (or 0 for off), and at
# most what its meaning allows; what an application waits for is at most an hour.
AN_HOUR, A_DAY = 3600.0, 24 * 3600.0
PIN_DIALOG_TIMEOUT = Seconds(default=IdentityConfig.pin_dialog_timeout, maximum=AN_HOUR, maximum_words="an hour")
CONNECT_TIMEOUT = Seconds(default=10.0, maximum=AN_HOUR, maximum_words="an hour")
HANDSHAKE_TIMEOUT = Seconds(default=30.0, maximum=AN_HOUR, maximum_words="an hour")
DEAD_PACS_TIMEOUT = Seconds(default=DEFAULT_DEAD_PACS_TIMEOUT, minimum=MIN_DEAD_PACS_TIMEOUT,
                            why_minimum="TCP keepalive probes are whole seconds apart",
                            maximum=MAX_DEAD_PACS_TIMEOUT, maximum_words="18 hours",
                            why_maximum="the first TCP keepalive probe comes after half of it, and Linux allows "
                                        "at most 32767 seconds before one")
REVOCATION_MAX_AGE = Seconds(default=RevocationSettings.max_age, maximum=365 * 24 * 3600.0, maximum_words="a year")
REVOCATION_TIMEOUT = Seconds(default=RevocationSettings.timeout, maximum=AN_HOUR, maximum_words="an hour")
IDLE_TIMEOUT = Seconds(default=0.0, off=True, maximum=A_DAY, maximum_words="a day")
TEXTFILE_INTERVAL = Seconds(default=15.0, maximum=A_DAY, maximum_words="a day")


@dataclass(frozen=True)
class TunnelConfig:
    name: str
    listen: ListenAddress
    remote_host: str
    remote_port: int
    server_name: str
    server_pins: tuple[bytes, ...] = ()
    verify: str = "chain"
    require_issuer: Path | None = None
    tls: str = "bcp195"
    allowed_uids: tuple[int, ...] = ()
    unsafe_listen: bool = False
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    dead_pacs_timeout: float = DEFAULT_DEAD_PACS_TIMEOUT  # a PACS silent this long mid-association is gone
    session_resumption: bool = True
    association: AssociationRules = AssociationRules()
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # connections in flight; more are rejected at once
    revocation: str = "require"  # or "prefer", "off": docs/tls-policy.md "Revocation"
    require_issuer_digest: str = field(default="", repr=False)

    @property
    def remote(self) -> str:
        return f"{self.remote_host}:{self.remote_port}"


@dataclass(frozen=True)
class InboundConfig:
    """An inbound listener: the PACS connects over mutual TLS, the agent being the TLS server, and
    the agent forwards plain DICOM to a local storage SCP (a C-MOVE destination)."""

    name: str
    listen: ListenAddress  # host:port the PACS connects to
    forward: ListenAddress  # the local storage SCP: a loopback host:port or unix:/path
    server_certificate: Path | None = None  # None: the card's certificate (it must allow serverAuth)
    server_key: Path | None = None  # a key file, or:
    server_key_uri: str | None = None  # a pkcs11: URI of a key on a token of the identity's module
    server_key_pin: PinSource | None = None  # that token's PIN (env: or file:)
    client_pins: tuple[bytes, ...] = ()
    # The names one of which the PACS's client certificate must carry (a subjectAltName DNS name or IP
    # address, or its subject CN): by default the server_name of each [[tunnel]], the PACS the agent
    # already verifies by name outbound. Empty only with client_pins: the fingerprints name the PACS.
    client_names: tuple[str, ...] = ()
    client_names_by_default: bool = False  # taken from the tunnels, not given (the refusal says so)
    forward_uids: tuple[int, ...] = ()  # who may own the local storage SCP; empty: the agent's own user
    tls: str = "bcp195"
    connect_timeout: float = 10.0
    handshake_timeout: float = 30.0
    dead_pacs_timeout: float = DEFAULT_DEAD_PACS_TIMEOUT
    association: AssociationRules = AssociationRules()
    allow_from: tuple[Network, ...] = LOOPBACK_NETWORKS  # source addresses that may connect at all
    max_pending_handshakes: int = 4  # TLS handshakes in flight with peers not yet authenticated
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # connections in flight; more are closed at once
    revocation: str = "require"  # or "prefer", "off": docs/tls-policy.md "Revocation"
    server_certificate_digest: str = field(default="", repr=False)
    server_key_digest: str = field(default="", repr=False)

    @property
    def remote(self) -> str:
        """Where its associations go (the local SCP), named like a tunnel's remote in messages."""
        return str(self.forward)


@dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: Prometheus metrics served on a loopback port or unix socket, and/or written to a file."""

    listen: ListenAddress | None = None
    textfile: Path | None = None  # for node_exporter's textfile collector, replaced atomically
    textfile_interval: float = 15.0  # seconds between two writes of the textfile


@dataclass(frozen=True)
class AgentConfig:
    source: Path
    identity: IdentityConfig
    trust: TrustConfig
    tunnels: tuple[TunnelConfig, ...]
    inbound: tuple[InboundConfig, ...] = ()
    audit: AuditConfig | None = None
    log_level: str = "info"
    runtime_dir: Path | None = None
    idle_timeout: float = 0.0  # seconds without associations before the session ends; 0: never
    desktop: DesktopConfig = field(default_factory=DesktopConfig)
    metrics: MetricsConfig | None = None  # None: no [metrics] table, nothing exported
    # The exact bytes this was parsed from: the supervisor hands them to each card-session process,
    # which parses them (parse_config) instead of reading the file, so that both run one
    # configuration (an edit not reloaded yet, or one a reload refused, is the file's alone).
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def listeners(self) -> tuple[TunnelConfig | InboundConfig, ...]:
        """Every local listener: the tunnels', then the inbound ones'."""
        return (*self.tunnels, *self.inbound)


def parse_listen(value: str, error) -> ListenAddress:
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not os.path.isabs(path):
            raise error("a unix socket path must be absolute, e.g. unix:/run/user/1000/card-agent/pacs.sock")
        return ListenAddress(unix_path=path)
    host, port = host_port(value, error)
    return ListenAddress(host=host, port=port)


def parse_pin(value: str, error) -> bytes:
    match = _PIN_RE.fullmatch(value.strip())
    if not match:
        raise error(f"{value!r} is not a SHA-256 fingerprint (64 hex digits, colons allowed, optional sha256: prefix)")
    return bytes.fromhex(match.group(2).replace(":", ""))


def load_config(path: Path) -> AgentConfig:
    """The configuration file ``path``, read (refused when another user could have written it:
    agent/file_trust.py) and parsed."""
    return parse_config(read_config_file(path), path)


Digest = Callable[[Path | None], str]  # what a trusted file holds: tables.content_digest, or a copy of its results


def parse_config(raw: bytes, path: Path, source: Path | None = None, digest: Digest = content_digest) -> AgentConfig:
    """The configuration in ``raw``, the bytes of the file ``path`` (named in errors). ``source``:
    that file with its links resolved, whose directory relative paths are taken from; by default
    ``path`` resolved now. A card-session process gives the supervisor's (AgentConfig.source): the
    file may have been replaced since, by a link to elsewhere too. ``digest``: what each trusted
    file holds; a card-session process takes the supervisor's (:func:`file_digests`), as a file it
    could not read at that moment (no descriptor left) must not read as a changed [trust]."""
    data = toml_of(raw, path)
    source = source if source is not None else path.resolve()
    base = source.parent
    root = Section(data, str(path), base)
    desktop = parse_desktop_config(root.take("desktop", dict, None), str(path))

    identity = Section(root.take("identity", dict, required=True), f"{path} [identity]", base)
    pin_text = identity.take("pin", str, "prompt")
    try:
        pin = replace(PinSource.parse(pin_text), graphical=desktop.pinentry)
    except ConfigError as error:
        raise identity.error("pin", str(error)) from None
    pin_dialog_timeout = identity.seconds("pin_dialog_timeout", PIN_DIALOG_TIMEOUT)
    key_id_text = identity.take("key_id", str, "")
    try:
        key_id = bytes.fromhex(key_id_text) if key_id_text else None
    except ValueError:
        raise identity.error("key_id", f"{key_id_text!r} is not hex (e.g. \"01\")") from None
    identity_config = IdentityConfig(
        token=identity.take("token", str, ""),
        module=identity.take("module", str, AUTO),
        pin=pin,
        key_id=key_id,
        allow_exportable_keys=identity.take("allow_exportable_keys", bool, False),
        pin_dialog_timeout=pin_dialog_timeout,
    )
    identity.done()

    trust = Section(root.take("trust", dict, required=True), f"{path} [trust]", base)
    crl = trust.take("crl", (list, str), [])
    crl_items = [crl] if isinstance(crl, str) else crl
    crl_paths = []
    for item in crl_items:
        if not isinstance(item, str):
            raise trust.error("crl", f"entries must be file paths, not {item!r}")
        # Whether the file is there and holds CRLs is not checked here but by reading it
        # (dicom_card_agent.trust.crls), one way for all: at start and on a reload of new files
        # (config/preflight.py: refused, naming the file), and while the agent runs, when a file
        # being replaced is missing for a moment (its last good CRLs kept), which `status` must
        # survive: it loads this configuration too.
        crl_paths.append((base / os.path.expanduser(item)).resolve())
    crl_expired = trust.take("crl_expired", str, "refuse")
    if crl_expired not in CRL_EXPIRED_CHOICES:
        raise trust.error("crl_expired", f"{crl_expired!r} is not one of {', '.join(map(repr, CRL_EXPIRED_CHOICES))}: "
                                         "\"refuse\" (the default) refuses certificates an expired CRL covers, "
                                         "\"warn\" accepts them with a warning")
    ca = trust.path("ca", required=True)
    trust_config = TrustConfig(ca=ca, crl=tuple(crl_paths), crl_expired=crl_expired,
                               revocation=_revocation_settings(trust), ca_digest=digest(ca))
    trust.done()

    raw_tunnels = root.take("tunnel", list, [])
    raw_inbound = root.take("inbound", list, [])
    if not raw_tunnels and not raw_inbound:
        root.check_misspelt("tunnel")
        raise ConfigError(f"{path}: no [[tunnel]] defined: add at least one (a [[tunnel]] table with name, listen "
                          "and remote)")
    names: set[str] = set()
    tunnels = _named_tables(raw_tunnels, "tunnel", path, base, names, functools.partial(_tunnel, digest=digest),
                            "another tunnel already has this name")
    inbound = _named_tables(raw_inbound, "inbound", path, base, names,
                            functools.partial(_inbound, tunnels=tunnels, digest=digest),
                            "a tunnel or another inbound listener already has this name")
    listens = [str(t.listen) for t in tunnels] + [str(i.listen) for i in inbound]
    for duplicate in {a for a in listens if listens.count(a) > 1}:
        raise ConfigError(f"{path}: two tunnels listen on {duplicate}")

    agent = Section(root.take("agent", dict, {}), f"{path} [agent]", base)
    log_level = agent.take("log_level", str, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        raise agent.error("log_level", "must be debug, info, warning or error")
    runtime_dir = agent.take("runtime_dir", str, "")
    idle_timeout = agent.seconds("idle_timeout", IDLE_TIMEOUT)
    agent.done()
    audit = parse_audit_config(root.take("audit", dict, None), str(path), base)
    raw_metrics = root.take("metrics", dict, None)
    metrics = _metrics(Section(raw_metrics, f"{path} [metrics]", base)) if raw_metrics is not None else None
    root.done()
    return AgentConfig(
        source=source,
        identity=identity_config,
        trust=trust_config,
        tunnels=tuple(tunnels),
        inbound=tuple(inbound),
        audit=audit,
        log_level=log_level,
        runtime_dir=(base / runtime_dir).resolve() if runtime_dir else None,
        idle_timeout=idle_timeout,
        desktop=desktop,
        metrics=metrics,
        raw=raw,
    )


def _named_tables(raw_tables: list, kind: str, path: Path, base: Path, names: set[str],
                  parse: Callable[[Section, str], Any], taken: str) -> list[Any]:
    """Each ``[[kind]]`` table parsed by ``parse``; ``names`` collects the names, unique across kinds."""
    parsed = []
    for index, raw in enumerate(raw_tables):
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [[{kind}]] #{index + 1} must be a table")
        section = Section(raw, f"{path} [[{kind}]] #{index + 1}", base)
        name = section.take("name", str, required=True)
        section.where = f"{path} [[{kind}]] {name!r}"
        if name in names:
            raise section.error("name", taken)
        names.add(name)
        parsed.append(parse(section, name))
        section.done()
    return parsed


def _pins(section: Section, key: str) -> tuple[bytes, ...]:
    return tuple(parse_pin(p, lambda m: section.error(key, m)) if isinstance(p, str) else _bad(section, key, p)
                 for p in section.take(key, list, []))


def _tls_mode(section: Section) -> str:
    tls = section.take("tls", str, "bcp195")
    if tls not in TLS_MODES:
        raise section.error("tls", f"must be one of {', '.join(TLS_MODES)}")
    return tls


def _uids(section: Section, key: str) -> tuple[int, ...]:
    uids = section.take(key, list, [])
    if not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids):
        raise section.error(key, "must be a list of numeric user ids, e.g. [1000]")
    return tuple(uids)


def _timeouts(section: Section) -> dict[str, float]:
    return {key: section.seconds(key, limits) for key, limits in (
        ("connect_timeout", CONNECT_TIMEOUT), ("handshake_timeout", HANDSHAKE_TIMEOUT),
        ("dead_pacs_timeout", DEAD_PACS_TIMEOUT))}


def _max_connections(section: Section) -> int:
    value = section.take("max_connections", int, DEFAULT_MAX_CONNECTIONS)
    if isinstance(value, bool) or value < 1:
        raise section.error("max_connections", "must be a whole number of connections, at least 1 "
                                               f"(default {DEFAULT_MAX_CONNECTIONS})")
    return value


def file_digests(config: AgentConfig) -> dict[str, str]:
    """The digest of each trusted file ``config`` names (by path), as the process that read it saw
    them: for :func:`parse_config` in a card-session process."""
    pairs: list[tuple[Path | None, str]] = [(config.trust.ca, config.trust.ca_digest)]
    pairs += [(t.require_issuer, t.require_issuer_digest) for t in config.tunnels]
    pairs += [(i.server_certificate, i.server_certificate_digest) for i in config.inbound]
    pairs += [(i.server_key, i.server_key_digest) for i in config.inbound]
    return {str(path): digest for path, digest in pairs if path is not None}


def _tunnel(section: Section, name: str, *, digest: Digest) -> TunnelConfig:
    listen = parse_listen(section.take("listen", str, required=True), lambda m: section.error("listen", m))
    unsafe_listen = section.take("unsafe_listen", bool, False)
    if listen.host is not None and not is_loopback(listen.host) and not unsafe_listen:
        raise section.error(
            "listen", f"{listen} is not a loopback address: other machines could then use the clinician's "
            "card. Listen on 127.0.0.1, ::1 or a unix socket, or set unsafe_listen = true if you really mean it")
    remote_host, remote_port = host_port(section.take("remote", str, required=True),
                                          lambda m: section.error("remote", m))
    server_name = section.take("server_name", str, "") or remote_host
    pins = _pins(section, "server_pins")
    verify = section.take("verify", str, "chain")
    if verify not in VERIFY_MODES:
        raise section.error("verify",
                            f"must be one of {', '.join(VERIFY_MODES)} (there is no mode that verifies nothing)")
    if verify == "pin" and not pins:
        raise section.error("verify", "\"pin\" trusts the server by fingerprint only: give server_pins")
    tls = _tls_mode(section)
    uids = _uids(section, "allowed_uids")
    timeouts = _timeouts(section)
    require_issuer = section.path("require_issuer")
    return TunnelConfig(
        name=name,
        listen=listen,
        remote_host=remote_host,
        remote_port=remote_port,
        server_name=server_name,
        server_pins=pins,
        verify=verify,
        require_issuer=require_issuer,
        require_issuer_digest=digest(require_issuer),
        tls=tls,
        allowed_uids=uids,
        unsafe_listen=unsafe_listen,
        session_resumption=section.take("session_resumption", bool, True),
        association=_association_rules(section),
        max_connections=_max_connections(section),
        revocation=_revocation_policy(section),
        **timeouts,
    )


def _inbound(section: Section, name: str, *, tunnels: list[TunnelConfig], digest: Digest) -> InboundConfig:
    listen = parse_listen(section.take("listen", str, required=True), lambda m: section.error("listen", m))
    if listen.unix_path:
        raise section.error("listen", "the PACS connects over the network: give HOST:PORT")
    forward = parse_listen(section.take("forward", str, required=True), lambda m: section.error("forward", m))
    if forward.host is not None and not is_loopback(forward.host):
        raise section.error("forward", f"{forward} is not a loopback address: retrieved images go in plain DICOM "
                                       "to a storage SCP on this workstation only")
    certificate = None
    if section.data.get("server_certificate", "card") == "card":
        section.take("server_certificate", str, "card")
    else:
        certificate = section.path("server_certificate")
    key_uri = None
    if str(section.data.get("server_key", "")).startswith("pkcs11:"):
        key_uri = section.take("server_key", str)
        try:
            Pkcs11Uri.parse(key_uri)
        except Pkcs11UriError as error:
            raise section.error("server_key", str(error)) from None
        key = None
    else:
        key = section.path("server_key")
    pin_text = section.take("server_key_pin", str, "")
    key_pin = None
    if pin_text:
        key_pin = PinSource.parse(pin_text)
        if key_pin.kind not in ("env", "file"):
            raise section.error("server_key_pin", "must be env:VARIABLE or file:PATH (a node key serves unattended)")
    if key_uri is not None and key_pin is None:
        raise section.error("server_key_pin", "give the PIN of the token holding server_key (env: or file:)")
    if certificate is not None and key is None and key_uri is None:
        raise section.error("server_key", "give the key of server_certificate: a file or a pkcs11: URI "
                                          "(or use server_certificate = \"card\")")
    if certificate is None and (key is not None or key_uri is not None):
        raise section.error("server_key", "only with a server_certificate file: the card's key stays on the card")
    max_pending = section.take("max_pending_handshakes", int, 4)
    if max_pending < 1:
        raise section.error("max_pending_handshakes", "must be a whole number of handshakes, at least 1")
    pins = _pins(section, "client_pins")
    client_names, by_default = _client_names(section, pins, tunnels)
    return InboundConfig(name=name, listen=listen, forward=forward, server_certificate=certificate, server_key=key,
                         server_key_uri=key_uri, server_key_pin=key_pin, client_pins=pins,
                         client_names=client_names, client_names_by_default=by_default,
                         forward_uids=_uids(section, "forward_uids"), tls=_tls_mode(section),
                         association=_association_rules(section, user_identity=False), **_timeouts(section),
                         allow_from=_allow_from(section, listen), max_pending_handshakes=max_pending,
                         max_connections=_max_connections(section), revocation=_revocation_policy(section),
                         server_certificate_digest=digest(certificate), server_key_digest=digest(key))


def _client_names(section: Section, pins: tuple[bytes, ...],
                  tunnels: list[TunnelConfig]) -> tuple[tuple[str, ...], bool]:
    """Who an inbound listener takes for the PACS, and whether that is the default.

    Any certificate of [trust] ca (a colleague's card among them) chains; the PACS is the one that
    carries its name. Given nothing, the names are those the tunnels verify the PACS's server
    certificate by; pinned fingerprints name the PACS as well. With neither, the agent would not
    know the PACS, so it refuses to start rather than take any certificate of the CA for it."""
    names = section.take("client_names", list, None)
    if names is not None:
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise section.error("client_names", "must list the PACS's names as its client certificate carries them "
                                                "(DNS names or IP addresses in subjectAltName, or its subject CN), "
                                                "e.g. client_names = [\"pacs.hospital.example\"]")
        return tuple(n.strip() for n in names), False
    if pins:
        return (), False
    defaults = tuple(dict.fromkeys(tunnel.server_name for tunnel in tunnels))
    if not defaults:
        raise section.error("client_names", "required when no [[tunnel]] names the PACS (and no client_pins are "
                                            "given): the names the PACS's client certificate carries, e.g. "
                                            "client_names = [\"pacs.hospital.example\"]; otherwise any certificate "
                                            "of [trust] ca would be taken for the PACS")
    return defaults, True


def _revocation_policy(section: Section) -> str:
    policy = section.take("revocation", str, "require")
    if policy not in REVOCATION_POLICIES:
        raise section.error("revocation", f"{policy!r} is not one of {', '.join(map(repr, REVOCATION_POLICIES))}: "
                                          "\"require\" (the default) refuses a peer without a fresh answer, \"prefer\" "
                                          "allows it with a warning, \"off\" asks nothing")
    return policy


def _revocation_settings(trust: Section) -> RevocationSettings:
    cache = trust.take("revocation_cache", str, "")
    numbers = {key: trust.seconds(key, limits) for key, limits in (("revocation_max_age", REVOCATION_MAX_AGE),
                                                                   ("revocation_timeout", REVOCATION_TIMEOUT))}
    responder = trust.take("ocsp_responder", str, "") or None
    if responder is not None and not responder.startswith("http://"):
        raise trust.error("ocsp_responder", f"{responder!r} is not an http:// URL (OCSP answers are signed; "
                                            "responders speak plain HTTP)")
    return RevocationSettings(cache=(trust.base / os.path.expanduser(cache)).resolve() if cache else None,
                              max_age=numbers["revocation_max_age"], timeout=numbers["revocation_timeout"],
                              ocsp_responder=responder)


def _allow_from(section: Section, listen: ListenAddress) -> tuple[Network, ...]:
    """The source networks an inbound listener admits; loopback only when none are given.

    A listener on a non-loopback address without allow_from would refuse every PACS: that is a
    start-up error naming the fix, not a listener that silently never works."""
    entries = section.take("allow_from", list, None)
    if entries is None:
        if listen.host is not None and not is_loopback(listen.host):
            raise section.error(
                "allow_from", f"required when listen ({listen}) is not a loopback address: list the PACS's "
                "addresses or networks, e.g. allow_from = [\"10.1.2.3\", \"10.1.0.0/16\"]; connections from "
                "other addresses are closed before any TLS. Without allow_from only this workstation may connect")
        return LOOPBACK_NETWORKS
    if not entries:
        raise section.error("allow_from", "is empty: no PACS could connect; list its addresses or networks")
    networks = []
    for entry in entries:
        if not isinstance(entry, str):
            _bad(section, "allow_from", entry)
        try:
            networks.append(parse_network(entry))
        except AllowFromError as error:
            raise section.error("allow_from", str(error)) from None
    return tuple(networks)


def _association_rules(section: Section, *, user_identity: bool = True) -> AssociationRules:
    titles = {}
    for key in ("allowed_calling_ae_titles", "allowed_called_ae_titles"):
        values = section.take(key, list, [])
        for value in values:
            if not isinstance(value, str) or not value.strip() or len(value) > 16 or not value.isascii():
                raise section.error(key, f"{value!r} is not an AE title (1-16 ASCII characters; * and ? match any)")
        titles[key] = tuple(v.strip() for v in values)
    if not user_identity:
        return AssociationRules(allowed_calling_ae_titles=titles["allowed_calling_ae_titles"],
                                allowed_called_ae_titles=titles["allowed_called_ae_titles"])
    mode = section.take("user_identity", str, "off")
    try:
        identity_mode = UserIdentityMode(mode)
    except ValueError:
        raise section.error("user_identity", "must be \"off\" or \"username\"") from None
    template = section.take("user_identity_username", str, "{cn}")
    try:
        check_template(template)
    except UsernameError as error:
        raise section.error("user_identity_username", str(error)) from None
    existing = section.take("user_identity_existing", str, "keep")
    try:
        existing_mode = ExistingUserIdentity(existing)
    except ValueError:
        raise section.error("user_identity_existing", "must be keep, replace or reject") from None
    return AssociationRules(
        allowed_calling_ae_titles=titles["allowed_calling_ae_titles"],
        allowed_called_ae_titles=titles["allowed_called_ae_titles"],
        user_identity=identity_mode,
        username_template=template,
        positive_response_requested=section.take("user_identity_positive_response", bool, False),
        existing_user_identity=existing_mode,
    )


def _bad(section: Section, key: str, value: object):
    raise section.error(key, f"entries must be strings, not {value!r}")


def _metrics(section: Section) -> MetricsConfig:
    listen_value = section.take("listen", str, "")
    if listen_value.startswith("/"):  # a bare socket path, as node_exporter's users write it
        listen_value = "unix:" + listen_value
    listen = parse_listen(listen_value, lambda m: section.error("listen", m)) if listen_value else None
    textfile = section.path("textfile", must_exist=False)
    if textfile is not None and not textfile.name.endswith(".prom"):
        raise section.error("textfile", f"{textfile.name!r} must end in .prom (node_exporter reads only those)")
    interval = section.seconds("textfile_interval", TEXTFILE_INTERVAL)
    if listen is None and textfile is None:
        raise ConfigError(f"{section.where}: set listen (e.g. \"127.0.0.1:9464\" or \"unix:/run/user/1000/"
                          "card-agent-metrics.sock\"), textfile, or both; or remove the [metrics] table")
    section.done()
    return MetricsConfig(listen=listen, textfile=textfile, textfile_interval=interval)
