"""The audit trail: DICOM PS3.15 A.5 audit messages (IHE ATNA) about sign-in, sign-out, security
alerts, agent start/stop, associations and transferred instances, written to a local append-only
file and sent as RFC 5424 syslog over TLS (RFC 5425) to an audit repository. See docs/audit.md.

``events`` describes what happened (no I/O), ``messages`` renders the XML, ``syslog`` the syslog
framing, ``spool`` keeps undelivered messages on disk, ``sinks`` writes them, ``trail`` ties it
together, ``config`` reads the ``[audit]`` table.
"""
