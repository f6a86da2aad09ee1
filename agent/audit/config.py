"""The ``[audit]`` table of the agent's configuration (docs/audit.md, docs/configuration.md).

::

    [audit]
    file = "/var/log/card-agent/audit.log"     # optional: append-only local file
    spool = "/var/lib/card-agent/audit-spool"  # required with [audit.syslog]
    source_id = "ws-radiology-3"               # optional: AuditSourceID, default the host name
    site_id = "Example Hospital"               # optional: AuditEnterpriseSiteID
    on_failure = "continue"                    # or "refuse": no new associations while the trail cannot be written

    [audit.syslog]                             # optional: the audit repository
    transport = "tls"                          # or "relp": RELP over TLS, every message acknowledged
    address = "audit.example:6514"
    ca = "pki/audit-ca.pem"
    server_name = "audit.example"              # optional, default the host of address
    certificate = "pki/agent-audit.pem"        # optional client certificate (PEM, chain)
    key = "pki/agent-audit.key"                # with certificate
    retry_max = 30                             # optional: longest wait between reconnects, s

Relative paths are relative to the configuration file's directory; unknown keys are errors naming
the key, as everywhere in the configuration.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_card_agent.config.tables import Section, host_port, read_toml
from dicom_card_agent.errors import ConfigError

TRANSPORTS = ("tls", "relp")
ON_FAILURE = ("continue", "refuse")


@dataclass(frozen=True)
class SyslogConfig:
    host: str
    port: int
    ca: Path
    server_name: str
    certificate: Path | None = None
    key: Path | None = None
    retry_max: float = 30.0
    transport: str = "tls"  # "tls" (RFC 5425) or "relp" (RELP over TLS)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AuditConfig:
    file: Path | None = None
    spool: Path | None = None
    syslog: SyslogConfig | None = None
    source_id: str = ""  # "" = the host name
    site_id: str = ""
    on_failure: str = "continue"  # or "refuse" (docs/audit.md)

    def audit_source_id(self) -> str:
        return self.source_id or socket.gethostname()


def parse_audit_config(data: dict[str, Any] | None, where: str, base: Path) -> AuditConfig | None:
    """The ``[audit]`` table ``data`` (``None`` when the file has none: no audit trail), with
    errors naming ``where`` (the configuration file) and the key; paths relative to ``base``."""
    if data is None:
        return None
    section = Section(data, f"{where} [audit]", base)
    file = section.path("file", must_exist=False)
    spool = section.path("spool", must_exist=False)
    source_id = section.take("source_id", str, "")
    site_id = section.take("site_id", str, "")
    on_failure = section.take("on_failure", str, "continue")
    if on_failure not in ON_FAILURE:
        raise section.error("on_failure", f"is {on_failure!r}; use \"continue\" (record what can be recorded, "
                                          "associations go on) or \"refuse\" (no new associations while the "
                                          "audit trail cannot be written)")
    raw_syslog = section.take("syslog", dict, None)
    syslog = None
    if raw_syslog is not None:
        table = Section(raw_syslog, f"{where} [audit.syslog]", base)
        host, port = host_port(table.take("address", str, required=True), lambda m: table.error("address", m))
        transport = table.take("transport", str, "tls")
        if transport not in TRANSPORTS:
            raise table.error("transport", f"is {transport!r}; use \"tls\" (RFC 5425 syslog over TLS) or "
                                           "\"relp\" (RELP over TLS, e.g. rsyslog imrelp)")
        ca = table.path("ca", required=True)
        server_name = table.take("server_name", str, "") or host
        certificate = table.path("certificate")
        key = table.path("key")
        if (certificate is None) != (key is None):
            raise table.error("certificate" if certificate is None else "key",
                              "certificate and key go together: set both (client certificate) or neither")
        retry_max = float(table.take("retry_max", (int, float), 30.0))
        if not 0.1 <= retry_max <= 3600:
            raise table.error("retry_max", "must be between 0.1 and 3600 seconds")
        table.done()
        assert ca is not None
        syslog = SyslogConfig(host=host, port=port, ca=ca, server_name=server_name, certificate=certificate,
                              key=key, retry_max=retry_max, transport=transport)
        if spool is None:
            raise section.error("spool", "is required with [audit.syslog]: the directory where messages wait "
                                         "while the audit repository is unreachable")
    section.done()
    if file is None and syslog is None:
        raise ConfigError(f"{where} [audit]: nothing to write to: set file, [audit.syslog], or both")
    return AuditConfig(file=file, spool=spool, syslog=syslog, source_id=source_id, site_id=site_id,
                       on_failure=on_failure)


def load_audit_config(path: Path) -> AuditConfig | None:
    """Only the ``[audit]`` table of the configuration file ``path`` (for ``card-agent audit``)."""
    data = read_toml(path)
    audit = data.get("audit")
    if audit is not None and not isinstance(audit, dict):
        raise ConfigError(f"{path}: audit must be a table ([audit])")
    return parse_audit_config(audit, str(path), path.resolve().parent)
