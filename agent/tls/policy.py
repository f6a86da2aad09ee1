"""TLS policy of the tunnels: DICOM PS3.15 "BCP 195 RFC 8996, 9325".

TLS 1.2 and 1.3 only (1.3 preferred), TLS 1.2 only with ECDHE and AEAD suites, groups X25519 and
P-256, no renegotiation, no compression, no 0-RTT (Python offers none). Hostname verification is
always on. The server is trusted by its chain to the configured anchors (default), by the chain
and a pinned certificate fingerprint, or, when chosen explicitly, by the pin alone; a tunnel may
also require that the server's chain pass through a given CA (the thesis's per-tenant check).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from dicom_card_agent.config.model import InboundConfig, TrustConfig, TunnelConfig
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.revocation.checker import RevocationChecker
from dicom_card_agent.revocation.peer import PeerRevocation
from dicom_card_agent.trust.anchors import TrustAnchors, explain_chain_failure, load_certificates
from dicom_card_agent.trust.errors import TrustError

TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
# P-256 first: DCMTK 3.6.7 answers an X25519 key share with a HelloRetryRequest for P-256,
# which costs a round trip per association; both groups stay offered (RFC 9325).
TLS_GROUPS = "P-256:X25519"

# What load_cert_chain calls if OpenSSL needs a token's PIN: it returns the PIN's wipeable buffer.
PinCallback = Callable[[], bytes | bytearray]


def no_pin() -> bytes:
    """The password of a key that needs none; OpenSSL must never fall back to asking on a terminal."""
    return b""
# How the card signs its handshakes: as a client (CertificateVerify) and as an inbound listener's
# server (ServerKeyExchange in TLS 1.2, CertificateVerify in 1.3); also what a client of an inbound
# listener may sign with, and what the agent accepts from a server. One list for every card: the
# card-session process's OpenSSL configuration is written before its probe shows what the card can
# do (agent/session/worker.py), and OpenSSL reads it once. TLS 1.3 allows RSA-PSS only, so RSA keys
# sign with PSS there. In TLS 1.2 a client takes the first of its own list the server allows, and
# the agent's server (which prefers its own order) the first of this list the client allows: RSA
# PKCS#1 v1.5 comes first, because many PIV and CAC cards lack RSA-PSS (a card that lacks it is
# capped at TLS 1.2, agent/token/capabilities.py), and RSA-PSS follows for a peer that allows
# nothing else. No SHA-1 (RFC 9155).
SIGNATURE_ALGORITHMS = ":".join([
    "ECDSA+SHA256", "ECDSA+SHA384", "ECDSA+SHA512", "ed25519", "ed448",
    "RSA+SHA256", "RSA+SHA384", "RSA+SHA512",
    "rsa_pss_rsae_sha256", "rsa_pss_rsae_sha384", "rsa_pss_rsae_sha512",
    "rsa_pss_pss_sha256", "rsa_pss_pss_sha384", "rsa_pss_pss_sha512",
])


class ServerVerificationError(CardAgentError):
    """The server's certificate does not meet the tunnel's verification settings."""


class TlsPolicyError(CardAgentError):
    """The tunnel's TLS settings cannot be met with this identity."""


@dataclass(frozen=True)
class ClientIdentityFiles:
    """What OpenSSL needs to present the card's identity: no secret among them."""

    chain: Path  # leaf + intermediates, PEM
    key: Path  # PKCS#11 PROVIDER URI PEM
    subject: str
    issuer: str

    def describe(self) -> str:
        return f"{_common_name(self.subject)}, issuer {_common_name(self.issuer)}"


def _common_name(rfc4514: str) -> str:
    first = next((part for part in rfc4514.split(",") if part.startswith("CN=")), rfc4514)
    return first


def client_context(tunnel: TunnelConfig, trust: TrustConfig, identity: ClientIdentityFiles, pin: PinCallback,
                   *, tls13_capable: bool) -> ssl.SSLContext:
    """The SSLContext of one tunnel, with the card's identity loaded (this is when the token is used first)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if tunnel.tls == "tls13" else ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3 if tls13_capable else ssl.TLSVersion.TLSv1_2
    if tunnel.tls == "tls13" and not tls13_capable:
        raise TlsPolicyError(
            f"tunnel {tunnel.name!r} requires TLS 1.3 (tls = \"tls13\") but the token cannot sign with RSA-PSS, "
            "which TLS 1.3 needs for an RSA key: use tls = \"bcp195\" (TLS 1.2 then) or an EC/PSS-capable card"
        )
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tunnel.verify == "pin":
        # Trust comes from the pin, checked after the handshake together with the host name.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        # The name in the subjectAltName only, as BCP 195 (RFC 9525) has it: OpenSSL would otherwise
        # take a subject CN equal to server_name from a certificate without a DNS name (one issued
        # to a person, with an e-mail address as its subjectAltName, among them).
        context.hostname_checks_common_name = False
        _trust(context, trust)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_cert_chain(str(identity.chain), str(identity.key), password=pin)
    return context


def _trust(context: ssl.SSLContext, trust: TrustConfig) -> None:
    """The peer must chain to [trust] ca. OpenSSL gets no CRLs: it would keep those of the moment
    the context was made, for the whole card session; revocation is checked after each handshake
    (ServerChecks, relay._check_client) against the CRL files as they are then, and OCSP and CRL
    distribution points (agent/revocation)."""
    context.load_verify_locations(cafile=str(trust.ca))


def server_context(inbound: InboundConfig, trust: TrustConfig, card: ClientIdentityFiles, pin: PinCallback,
                   *, tls13_capable: bool, node_key: Path | None = None,
                   node_pin: PinCallback | None = None) -> ssl.SSLContext:
    """The SSLContext of an inbound listener: the agent is the TLS server, the PACS must present a
    certificate that chains to [trust] ca (and passes its CRLs). The server identity is the card's,
    or a node certificate with its key in a file or, through ``node_key`` (a PKCS#11-URI key file)
    and ``node_pin``, on a token. ``tls13_capable``: whether the key that serves (the card's, or
    the node key's on its token) can sign TLS 1.3 handshakes; a key in a file always can."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    on_card = inbound.server_certificate is None
    on_token = on_card or node_key is not None
    tls13 = tls13_capable or not on_token
    context.minimum_version = ssl.TLSVersion.TLSv1_3 if inbound.tls == "tls13" else ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3 if tls13 else ssl.TLSVersion.TLSv1_2
    if inbound.tls == "tls13" and not tls13:
        raise TlsPolicyError(f"inbound {inbound.name!r} requires TLS 1.3 but the token holding its "
                             f"{'card' if on_card else 'node'} key cannot sign with RSA-PSS, which TLS 1.3 needs for "
                             "an RSA key: use tls = \"bcp195\" (TLS 1.2 then) or a PSS-capable token")
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.verify_mode = ssl.CERT_REQUIRED
    _trust(context, trust)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if on_card:
        _check_server_purpose(inbound, card.chain)
        context.load_cert_chain(str(card.chain), str(card.key), password=pin)
    elif node_key is not None:
        context.load_cert_chain(str(inbound.server_certificate), str(node_key), password=node_pin or no_pin)
    else:
        assert inbound.server_key is not None
        context.load_cert_chain(str(inbound.server_certificate), str(inbound.server_key))
    return context


def allows_tls_server(certificate: x509.Certificate) -> bool:
    """Whether the certificate may identify a TLS server: no extended key usage, or one with
    serverAuth (or anyExtendedKeyUsage)."""
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.SERVER_AUTH in usages or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usages


def _check_server_purpose(inbound: InboundConfig, chain: Path) -> None:
    leaf = x509.load_pem_x509_certificate(chain.read_bytes())
    if allows_tls_server(leaf):
        return
    raise TlsPolicyError(
        f"inbound {inbound.name!r}: the card's certificate ({leaf.subject.rfc4514_string()}) cannot identify a TLS "
        "server (its extended key usage lacks serverAuth): give the listener the workstation's node certificate "
        "with server_certificate and server_key")


@dataclass(frozen=True)
class ServerChecks:
    """What is verified after the handshake, from the server's leaf certificate."""

    tunnel: TunnelConfig
    anchors: TrustAnchors | None
    required_issuer: x509.Certificate | None
    revocation: PeerRevocation | None = None  # None for revocation = "off" and for verify = "pin"

    @classmethod
    def for_tunnel(cls, tunnel: TunnelConfig, trust: TrustConfig,
                   revocation: RevocationChecker | None = None,
                   alert: Callable[[str], None] = lambda _: None) -> ServerChecks:
        required = load_certificates(tunnel.require_issuer)[0] if tunnel.require_issuer else None
        anchors = TrustAnchors.load(trust.ca) if required is not None else None
        # A pinned-only server is trusted by its pin, not by a CA, so no CA's CRL judges it.
        checked = revocation is not None and tunnel.verify != "pin" and tunnel.revocation != "off"
        peer = (PeerRevocation(revocation, tunnel.revocation, f"tunnel {tunnel.name}", alert)  # type: ignore[arg-type]
                if checked else None)
        return cls(tunnel, anchors, required, peer)

    def verify(self, leaf_der: bytes | None, given_up: concurrent.futures.Future[str] | None = None) -> None:
        """Raise :class:`ServerVerificationError` when the server is refused; ``given_up``: see
        RevocationChecker.check."""
        tunnel = self.tunnel
        if leaf_der is None:
            raise ServerVerificationError(f"server {tunnel.remote} sent no certificate")
        try:
            self._verify(x509.load_der_x509_certificate(leaf_der), leaf_der, given_up)
        except ValueError as error:  # a field OpenSSL accepted and cryptography cannot parse: refused, not a crash
            raise ServerVerificationError(f"server {tunnel.remote} certificate cannot be read: {error}") from None

    def _verify(self, leaf: x509.Certificate, leaf_der: bytes,
                given_up: concurrent.futures.Future[str] | None) -> None:
        tunnel = self.tunnel
        if tunnel.server_pins:
            fingerprint = hashlib.sha256(leaf_der).digest()
            if fingerprint not in tunnel.server_pins:
                raise ServerVerificationError(
                    f"server certificate {leaf.subject.rfc4514_string()} has SHA-256 fingerprint "
                    f"{fingerprint.hex(':')}, which is not among server_pins of tunnel {tunnel.name!r}: "
                    "if the PACS certificate was renewed, pin the new one"
                )
        if tunnel.verify == "pin":
            _check_host_name(leaf, tunnel.server_name)
        if self.required_issuer is not None:
            self._check_issuer(leaf)
        if self.revocation is not None:
            try:
                self.revocation.check(leaf, given_up)
            except TrustError as error:
                raise ServerVerificationError(f"server {tunnel.remote} is not trusted: {error}") from None

    def _check_issuer(self, leaf: x509.Certificate) -> None:
        assert self.anchors is not None and self.required_issuer is not None
        subject = _subject_for(self.tunnel.server_name)
        verifier = PolicyBuilder().store(Store(list(self.anchors.roots))).build_server_verifier(subject)
        required = self.required_issuer.subject.rfc4514_string()
        try:
            chain = verifier.verify(leaf, list(self.anchors.intermediates))
        except VerificationError as error:
            why = explain_chain_failure(leaf, [*self.anchors.roots, *self.anchors.intermediates],
                                        self.anchors.source, error)
            raise ServerVerificationError(
                f"cannot build the chain of server certificate {leaf.subject.rfc4514_string()} to check "
                f"require_issuer ({required}): {why}; put the server's intermediate CAs in [trust] ca"
            ) from None
        if self.required_issuer not in chain:
            path = " <- ".join(c.subject.rfc4514_string() for c in chain)
            raise ServerVerificationError(
                f"server chain {path} does not pass through the required issuer {required} (require_issuer of "
                f"tunnel {self.tunnel.name!r}): this server belongs to another tenant or PKI"
            )


def _subject_for(server_name: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        return x509.DNSName(server_name)


def _check_host_name(leaf: x509.Certificate, server_name: str) -> None:
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    try:
        wanted_ip = ipaddress.ip_address(server_name)
        ok = wanted_ip in names.get_values_for_type(x509.IPAddress)
    except ValueError:
        ok = any(_dns_matches(pattern, server_name) for pattern in names.get_values_for_type(x509.DNSName))
    if not ok:
        raise ServerVerificationError(
            f"server certificate {leaf.subject.rfc4514_string()} is not valid for {server_name!r} "
            "(hostname verification is always on, pinned or not): fix server_name"
        )


def _dns_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host
