"""What went wrong with the PACS connection, in one line a clinician's IT can act on.

Pure functions from an exception (and what the relay knows) to a :class:`TunnelFailure`; no I/O.
"""

from __future__ import annotations

import errno
import socket
import ssl
from dataclasses import dataclass

from dicom_card_agent.tunnel.resolver import ResolverTimeoutError

_REJECTED_OUR_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not know our issuer (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server found our certificate bad",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the server could not accept our certificate",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "the server reports our certificate revoked",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server reports our certificate expired",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the server does not support our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the server denied access to our certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "the server could not verify our signature",
}
UNREACHABLE = "unreachable"  # the PACS cannot be reached
CERTIFICATE_REFUSED = "certificate-refused"  # the PACS does not accept the card's certificate

_NO_COMMON_VERSION = {"UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "WRONG_VERSION_NUMBER",
                      "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_INAPPROPRIATE_FALLBACK"}
_NO_COMMON_ALGORITHMS = {"NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_CIPHERS_AVAILABLE",
                         "NO_SUITABLE_SIGNATURE_ALGORITHM", "NO_SHARED_SIGNATURE_ALGORITHMS",
                         "NO_SUITABLE_KEY_SHARE", "TLSV1_ALERT_INSUFFICIENT_SECURITY"}


@dataclass(frozen=True)
class TunnelFailure(Exception):
    """Why a tunnel connection failed; ``transient`` decides A-ASSOCIATE-RJ rejected-transient vs -permanent,
    ``cause`` is what the clinician is told about (agent/desktop): UNREACHABLE, CERTIFICATE_REFUSED or ""."""

    message: str
    transient: bool = False
    cause: str = ""

    def __str__(self) -> str:
        return self.message


# How the kernel reports a connection whose peer stopped answering: TCP_USER_TIMEOUT or keepalive gave
# up (ETIMEDOUT), or gave up after ICMP or the neighbour table had said the host is unreachable.
PEER_STOPPED_ANSWERING_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH})


def pacs_stopped_answering(pacs: str, seconds: float) -> TunnelFailure:
    """Mid-association, the PACS acknowledged nothing for ``dead_pacs_timeout`` seconds."""
    return TunnelFailure(f"the PACS at {pacs} stopped answering: nothing came back for {seconds:g} s "
                         "(dead_pacs_timeout); the network to it or the PACS is down", transient=True,
                         cause=UNREACHABLE)


def connect_failure(remote: str, error: OSError, timeout: float) -> TunnelFailure:
    if isinstance(error, ResolverTimeoutError):
        return TunnelFailure(f"cannot reach the PACS at {remote}: no DNS server answered for its name within "
                             f"{timeout:g} s; check the workstation's DNS servers, or give the tunnel's remote "
                             "as an IP address", transient=True, cause=UNREACHABLE)
    if isinstance(error, socket.gaierror):
        return TunnelFailure(f"cannot reach the PACS at {remote}: its name does not resolve ({error.strerror}); "
                             "check the tunnel's remote and the workstation's DNS", transient=True, cause=UNREACHABLE)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return TunnelFailure(f"cannot reach the PACS at {remote}: no answer within {timeout:g} s; "
                             "check the network and the tunnel's remote", transient=True, cause=UNREACHABLE)
    reason = {errno.ECONNREFUSED: "connection refused (is the PACS running and listening on that port?)",
              errno.EHOSTUNREACH: "host unreachable", errno.ENETUNREACH: "network unreachable"}.get(
        error.errno or 0, error.strerror or str(error))
    return TunnelFailure(f"cannot reach the PACS at {remote}: {reason}", transient=True, cause=UNREACHABLE)


class CardBusyError(TimeoutError):
    """A handshake's signature could not start before its deadline: another held the card."""


def handshake_failure(remote: str, error: Exception, identity: str, ca: str, server_name: str) -> TunnelFailure:
    if isinstance(error, CardBusyError):
        return TunnelFailure(f"TLS handshake with {remote} could not be made in time: {error}", transient=True)
    if isinstance(error, (socket.timeout, TimeoutError)):
        return TunnelFailure(f"TLS handshake with {remote} did not finish in time (slow card, or the server "
                             "stalled)", transient=True)
    if isinstance(error, ssl.SSLCertVerificationError):
        message = error.verify_message or str(error)
        if "Hostname mismatch" in message or "IP address mismatch" in message:
            return TunnelFailure(f"server {remote} presented a certificate that is not valid for "
                                 f"{server_name!r}: {message} Check server_name of the tunnel; the name must be "
                                 "in the certificate's subjectAltName (a subject CN alone is not taken, RFC 9525)")
        return TunnelFailure(f"server {remote} is not trusted: {message}; its certificate must chain to a CA "
                             f"in [trust] ca ({ca}) and not be revoked")
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason in _REJECTED_OUR_CERTIFICATE:
            return rejected_our_certificate(identity, _REJECTED_OUR_CERTIFICATE[reason])
        if reason in _NO_COMMON_VERSION:
            return TunnelFailure(f"server {remote} offers no TLS version the BCP 195 policy allows (TLS 1.2 or "
                                 f"1.3; {reason}); the agent never falls back to older TLS: upgrade the PACS")
        if reason in _NO_COMMON_ALGORITHMS:
            return TunnelFailure(f"server {remote} shares no cipher suite, group or signature algorithm with the "
                                 f"BCP 195 policy (ECDHE with AES-GCM/ChaCha20, X25519/P-256; {reason})")
        if isinstance(error, ssl.SSLEOFError):
            return TunnelFailure(f"server {remote} closed the connection during the TLS handshake "
                                 "(is it a TLS port?)", transient=True)
        return TunnelFailure(f"TLS handshake with {remote} failed: {reason or error}")
    if isinstance(error, (ConnectionResetError, BrokenPipeError, EOFError)):
        return TunnelFailure(f"server {remote} closed the connection during the TLS handshake (is it a TLS port, "
                             "and does it accept our certificate?)", transient=True)
    return TunnelFailure(f"TLS handshake with {remote} failed: {error}")


def rejected_our_certificate(identity: str, detail: str) -> TunnelFailure:
    return TunnelFailure(f"server rejected our certificate ({identity}): {detail}; check that the PACS "
                         "trusts this issuer and that the certificate is valid and not revoked",
                         cause=CERTIFICATE_REFUSED)


def failure_after_handshake(remote: str, error: Exception | None, identity: str, received_any: bool,
                            version: str | None) -> TunnelFailure:
    """The server ended the connection after the handshake (``version``, as negotiated). With TLS 1.3
    that is how it rejects a client: it judges the client's certificate only after the client's
    Finished, so the handshake completes before the refusal. With TLS 1.2 the server had judged the
    certificate before its own Finished: a close now is the PACS's doing (a restart, a crash, an AE
    title it drops, a renegotiation we decline), news to try again later, not about the card."""
    if isinstance(error, ssl.SSLError) and (error.reason or "") in _REJECTED_OUR_CERTIFICATE:
        return rejected_our_certificate(identity, _REJECTED_OUR_CERTIFICATE[error.reason])
    detail = f": {error.reason or error}" if isinstance(error, ssl.SSLError) else ""
    if received_any:
        return TunnelFailure(f"server {remote} closed the connection unexpectedly{detail}", transient=True)
    if version == "TLSv1.3":
        return rejected_our_certificate(
            identity, "the server closed the connection right after the TLS handshake, which is how TLS 1.3 "
                      "servers refuse a client certificate")
    return TunnelFailure(f"the PACS at {remote} closed the connection before answering{detail} (after a completed "
                         f"{version or 'TLS'} handshake: not a refusal of our certificate); is the PACS restarting, "
                         "or does it drop this association's AE titles?", transient=True)
