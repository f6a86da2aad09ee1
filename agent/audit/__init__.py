"""The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA) about sign-in, sign-out, security
alerts, agent start/stop, associations and transferred instances, written to a local append-only
file and sent as RFC 5424 syslog over TLS (RFC 5425) or RELP over TLS to an audit repository.
See docs/audit.md.

``events`` describes what happened (no I/O), ``messages`` renders the XML, ``syslog`` the syslog
framing, ``relp`` the RELP protocol (no I/O), ``spool`` keeps unconfirmed messages on disk,
``sinks`` writes and delivers them, ``trail`` ties it together (and the ``on_failure`` policy),
``config`` reads the ``[audit]`` table.
"""
