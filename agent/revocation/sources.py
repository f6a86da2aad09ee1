"""OCSP responses and CRLs from distribution points: fetched over HTTP, verified against the issuer.

Fetching is plain HTTP with the standard library (OCSP and CRLs are signed, so TLS adds nothing
to their integrity, and RFC 5280/6960 publish them over http). Each fetch has one deadline, its
``timeout`` after it began, for all of it: the name lookup, the connect, sending the request and
every byte of the answer, across redirects. (urllib's own ``timeout`` is per socket operation, so a
source that trickles a byte now and then kept a fetch, and its thread, for good.) Every judgement
here is of bytes already fetched, so the cache can judge its files again after a restart with the
same code.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from dicom_card_agent.logline import printable
from dicom_card_agent.revocation.decision import Answer, Status
from dicom_card_agent.trust.crls import (
    MAX_CRL_BYTES,
    _crl_signed_by,
    _in_scope,
    crl_number,
    entry_reason,
    incomplete_because,
    listing,
    listing_in_force,
    name,
)
from dicom_card_agent.tunnel.resolver import ResolverTimeoutError, resolve_stream

log = logging.getLogger("agent.revocation")

CLOCK_SKEW = datetime.timedelta(minutes=5)
"""How far thisUpdate may lie in the future and nextUpdate in the past: clocks of workstations drift."""

MAX_RESPONSE_BYTES = MAX_CRL_BYTES  # what a source sends is a CRL at most, as a CRL file holds

_NOT_IN_A_URL = re.compile("[\x00-\x20\x7f]")  # what http.client refuses in a request line: controls, spaces


@dataclass(frozen=True)
class Issued:
    """When a verified answer was made: an OCSP response's thisUpdate, a CRL's lastUpdate and CRLNumber."""

    at: datetime.datetime
    number: int | None = None

    def before(self, other: Issued) -> bool:
        """Whether this answer is older than ``other``: a lower CRLNumber, or an earlier date (either
        is enough: a CA numbers and dates its CRLs in the same order, so a CRL that contradicts
        the one held in either is not taken for a newer one)."""
        lower = self.number is not None and other.number is not None and self.number < other.number
        return lower or self.at < other.at


@dataclass(frozen=True)
class Judged:
    """An answer and until when it may be used without asking again (None: not to be kept);
    ``issued`` once its signature is verified, stale or not (to recognise a replayed older one)."""

    answer: Answer
    fresh_until: datetime.datetime | None
    issued: Issued | None = None


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    try:
        access = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as error:  # OpenSSL accepts a malformed non-critical extension; cryptography does not
        _unreadable(cert, "Authority Information Access", error)
        return []
    return [d.access_location.value for d in access if d.access_method == AuthorityInformationAccessOID.OCSP
            and isinstance(d.access_location, x509.UniformResourceIdentifier)
            and d.access_location.value.startswith("http://")]


def crl_urls(cert: x509.Certificate) -> list[str]:
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as error:
        _unreadable(cert, "CRL Distribution Points", error)
        return []
    return [n.value for point in points if point.full_name and point.crl_issuer is None and point.reasons is None
            for n in point.full_name if isinstance(n, x509.UniformResourceIdentifier) and n.value.startswith("http://")]


def _unreadable(cert: x509.Certificate, extension: str, error: ValueError) -> None:
    log.warning("revocation: the %s extension of %s cannot be read (%s): taken as naming no source, so the "
                "revocation policy decides as for a certificate without it", extension, name(cert.subject), error)


def source_name(kind: str, url: str) -> str:
    """How answers, log lines and refusals name a source ("ocsp" or "crl"); the URL comes from a
    peer's certificate, so what could break a line is escaped."""
    shown = printable(url)
    return f"OCSP responder {shown}" if kind == "ocsp" else f"CRL {shown}"


class FetchError(Exception):
    """The source did not answer usably; the message names it and says why."""


def http_get(url: str, timeout: float) -> bytes:
    return _http(url, timeout)


def http_post_ocsp(url: str, body: bytes, timeout: float) -> bytes:
    return _http(url, timeout, body, {"Content-Type": "application/ocsp-request"})


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be fetched at all, None when it can: checked before any network step, so
    that a malformed URL in a certificate is that source's failure, not an exception of the check."""
    if _NOT_IN_A_URL.search(url):
        return "it holds a control character or a space"
    try:
        parts = urllib.parse.urlsplit(url)
        host, _port = parts.hostname, parts.port  # the port parsed: ValueError unless a number up to 65535
    except ValueError as error:
        return str(error)
    if not host:
        return "it names no host"
    try:
        host.encode("idna")
    except UnicodeError:
        return "its host name cannot be looked up (a label empty or longer than 63 characters)"
    return None


def _http(url: str, timeout: float, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    shown = printable(url)
    problem = url_problem(url)
    if problem is not None:
        raise FetchError(f"this source cannot be asked: invalid URL {shown} ({printable(problem)})")
    deadline = _Deadline(timeout)
    # No proxy, from the environment or elsewhere: revocation sources of a hospital PKI are inside
    # the hospital. Plain http only, redirects too, so that every wait is under the deadline.
    opener = urllib.request.OpenerDirector()
    for handler in (_DeadlineHTTPHandler(deadline), urllib.request.UnknownHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    try:
        with opener.open(urllib.request.Request(url, data=body, headers=headers or {}), timeout=timeout) as response:
            data = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as error:
        error.close()
        raise FetchError(f"{shown} answered HTTP {error.code} {printable(str(error.reason))}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError) and not isinstance(reason, ResolverTimeoutError):
            raise deadline.passed(shown) from None
        text = getattr(reason, "strerror", None) or str(reason)
        raise FetchError(f"cannot reach {shown}: {printable(text)}") from None
    except TimeoutError:
        raise deadline.passed(shown) from None
    except OSError as error:
        raise FetchError(f"cannot reach {shown}: {printable(str(error.strerror or error))}") from None
    except (http.client.HTTPException, ValueError) as error:  # not HTTP: a bad status line, header or chunk size
        raise FetchError(f"{shown} did not answer in HTTP ({type(error).__name__} {str(error).strip()[:80]!r})") \
            from None
    if len(data) > MAX_RESPONSE_BYTES:
        raise FetchError(f"{shown} sent more than {MAX_RESPONSE_BYTES} bytes")
    return data


class _Deadline:
    """The moment a fetch must be over by (monotonic), and how many bytes it has received so far."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.at = time.monotonic() + timeout
        self.received = 0

    def left(self) -> float:
        """Seconds left, for the socket timeout of the next wait; TimeoutError when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        return left

    def passed(self, url: str) -> FetchError:
        if self.received == 0:
            return FetchError(f"cannot reach {url}: no answer within {self.timeout:g} s")
        return FetchError(f"{url} sent too slowly: its answer did not finish within {self.timeout:g} s "
                          f"({self.received} bytes came)")


class _DeadlineSocket(socket.socket):
    """A socket whose every send and receive may wait only for the time its fetch has left: the
    timeout is set to it before each one (http.client writes with sendall and reads through
    makefile(), which calls recv_into). When the time is up the call raises TimeoutError, and the
    fetch closes the connection on its way out (urllib's handler, the response's ``with``)."""

    deadline: _Deadline

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self.settimeout(self.deadline.left())
        count = super().recv_into(buffer, nbytes, flags)
        self.deadline.received += count
        return count

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self.settimeout(self.deadline.left())
        data = super().recv(bufsize, flags)
        self.deadline.received += len(data)
        return data

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.settimeout(self.deadline.left())  # since Python 3.5, a total for all of data
        super().sendall(data, flags)


_NEVER_GIVEN_UP: concurrent.futures.Future[str] = concurrent.futures.Future()  # a fetch ends by its deadline only


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    """A connection to ``host``, looked up (in a thread of its own: getaddrinfo cannot be
    interrupted, see agent/tunnel/resolver.py) and connected, each address in turn, within the deadline."""
    try:
        addresses = resolve_stream(host, port, deadline.left(), _NEVER_GIVEN_UP)
    except ResolverTimeoutError:
        raise ResolverTimeoutError(f"no DNS answer for {host} within {deadline.timeout:g} s") from None
    failure: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, address in addresses:
        connection = _DeadlineSocket(family, kind, proto)
        connection.deadline = deadline
        try:
            connection.settimeout(deadline.left())
            connection.connect(address)
        except TimeoutError:
            connection.close()
            raise  # the deadline has passed: no time for another address
        except OSError as error:
            connection.close()
            failure = error
            continue
        return connection
    raise failure


class _DeadlineConnection(http.client.HTTPConnection):
    def __init__(self, host: str, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)  # urllib's timeout among them: unused, the deadline rules
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self._deadline)


class _HttpOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if not newurl.lower().startswith("http://"):
            fp.close()
            raise urllib.error.URLError(f"it redirects to {newurl}, which is not an http:// URL")
        problem = url_problem(newurl)
        if problem is not None:
            fp.close()
            raise urllib.error.URLError(f"it redirects to {newurl}, an invalid URL ({problem})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        deadline = self._deadline

        def connection(host: str, /, **kwargs: Any) -> http.client.HTTPConnection:
            return _DeadlineConnection(host, deadline, **kwargs)

        return self.do_open(connection, req)


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> tuple[bytes, bytes]:
    """The DER of an OCSP request for ``cert`` with a fresh nonce, and the nonce."""
    nonce = os.urandom(16)
    request = (ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
               .add_extension(x509.OCSPNonce(nonce), critical=False).build())
    return request.public_bytes(serialization.Encoding.DER), nonce


def judge_ocsp(data: bytes, cert: x509.Certificate, issuer: x509.Certificate, url: str, now: datetime.datetime,
               max_age: datetime.timedelta, nonce: bytes | None = None, *,
               fetched_at: datetime.datetime | None = None) -> Judged:
    """What the OCSP response ``data`` from ``url`` says about ``cert``, once verified; it is used
    until its nextUpdate, and at most ``max_age`` after it was fetched (``fetched_at``, else now)."""
    source = source_name("ocsp", url)

    def no_answer(why: str, issued: Issued | None = None) -> Judged:
        return Judged(Answer(source, Status.NO_ANSWER, f"{source} {why}"), None, issued)

    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        return no_answer("sent something that is not an OCSP response")
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        return no_answer(f"answered {response.response_status.name.lower()} for {name(cert.subject)}")
    refusal = _signer_refusal(response, issuer, now)
    if refusal is not None:
        return no_answer(refusal)
    if nonce is not None:
        try:
            echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
        except x509.ExtensionNotFound:
            echoed = None  # a responder that does not support nonces (pre-signed responses)
        if echoed is not None and echoed != nonce:
            return no_answer("answered with the nonce of another request (a replayed response): ignored")
    single = next((s for s in response.responses if s.serial_number == cert.serial_number
                   and s.issuer_key_hash == _key_hash(cert, issuer, s.hash_algorithm)), None)
    if single is None:
        return no_answer(f"answered about other certificates than {name(cert.subject)}")
    this_update, next_update = single.this_update_utc, single.next_update_utc
    issued = Issued(this_update)
    if this_update > now + CLOCK_SKEW:
        return no_answer(f"answered with a response from the future (thisUpdate {this_update:%Y-%m-%d %H:%M} UTC): "
                         "check this computer's clock")
    if next_update is not None and next_update < now - CLOCK_SKEW:
        return no_answer(f"answered with a stale response (nextUpdate {next_update:%Y-%m-%d %H:%M} UTC has passed)",
                         issued)
    if next_update is None and past_max_age(this_update, now, max_age):
        return no_answer(f"answered with a stale response (made {this_update:%Y-%m-%d %H:%M} UTC, without nextUpdate, "
                         f"more than {_age_text(max_age)} ago: [trust] revocation_max_age)", issued)
    fresh_until = min(next_update or this_update + max_age, (fetched_at or now) + max_age)
    if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        reason = single.revocation_reason.value if single.revocation_reason else None
        return Judged(Answer(source, Status.REVOKED, revoked_at=single.revocation_time_utc, reason=reason),
                      fresh_until, issued)
    if single.certificate_status == ocsp.OCSPCertStatus.UNKNOWN:
        return no_answer(f"does not know {name(cert.subject)} (status unknown)", issued)
    return Judged(Answer(source, Status.GOOD), fresh_until, issued)


def past_max_age(made: datetime.datetime, now: datetime.datetime, max_age: datetime.timedelta) -> bool:
    """Whether an answer without nextUpdate, made at ``made``, is stale at ``now``: such an answer
    counts for ``max_age`` from when it was made, so an older one proves nothing now (it may be a
    "good" from before the revocation, replayed). Taken anyway, it was never fresh, and was
    fetched again every second."""
    return made + max_age <= now


def _age_text(age: datetime.timedelta) -> str:
    days = age / datetime.timedelta(days=1)
    return f"{days:g} days" if days >= 1 else f"{age.total_seconds():g} s"


def _key_hash(cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """The issuerKeyHash of ``issuer`` as RFC 6960 computes it (cryptography's, from a request)."""
    return ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build().issuer_key_hash


def _signer_refusal(response: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime.datetime) -> str | None:
    """Why the signer of ``response`` is not to be believed, None when it is: the issuer, or a
    delegated responder certificate the issuer issued with id-kp-OCSPSigning and valid now (RFC
    6960 4.2.2.2: a retired responder's key must not vouch for anything)."""
    if _signature_valid(response, issuer):
        return None
    delegate = next((c for c in response.certificates if _issued_by(c, issuer) and _ocsp_signing(c)
                     and _signature_valid(response, c)), None)
    if delegate is None:
        signers = ", ".join(name(c.subject) for c in response.certificates) or "a key it did not certify"
        return (f"answered with a response signed by {signers}, neither the issuer {name(issuer.subject)} nor a "
                "responder it certified for OCSP signing: ignored")
    if delegate.not_valid_after_utc < now - CLOCK_SKEW:
        return (f"answered with a response signed by the delegated responder {name(delegate.subject)}, whose "
                f"certificate expired on {delegate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: ignored")
    if delegate.not_valid_before_utc > now + CLOCK_SKEW:
        return (f"answered with a response signed by the delegated responder {name(delegate.subject)}, whose "
                f"certificate is valid only from {delegate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: ignored (check "
                "this computer's clock)")
    return None


def _ocsp_signing(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in usages


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _signature_valid(response: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    key = signer.public_key()
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, rsa.RSAPublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm is not None:
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        return False
    return True


def judge_crl(data: bytes, cert: x509.Certificate, issuer: x509.Certificate, url: str, now: datetime.datetime,
              max_age: datetime.timedelta, *, fetched_at: datetime.datetime | None = None) -> Judged:
    """What the CRL ``data`` fetched from ``url`` says about ``cert``, once verified against ``issuer``;
    it is used until its nextUpdate, and at most ``max_age`` after it was fetched (``fetched_at``, else now)."""
    source = source_name("crl", url)

    def no_answer(why: str, issued: Issued | None = None) -> Judged:
        return Judged(Answer(source, Status.NO_ANSWER, f"the CRL at {printable(url)} {why}"), None, issued)

    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN") else x509.load_der_x509_crl(data)
    except ValueError:
        return no_answer("is not a readable CRL")
    if crl.issuer != cert.issuer or not _crl_signed_by(crl, issuer):
        return no_answer(f"is not signed by the issuer {name(issuer.subject)}: ignored")
    if not _in_scope(crl, cert):
        return no_answer(f"is limited to other certificates (indirect, or of another kind) and cannot vouch for "
                         f"{name(cert.subject)}")
    next_update = crl.next_update_utc
    issued = Issued(crl.last_update_utc, crl_number(crl))
    if crl.last_update_utc > now + CLOCK_SKEW:
        return no_answer("was issued in the future: check this computer's clock")
    if next_update is not None and next_update < now - CLOCK_SKEW:
        return no_answer(f"expired on {next_update:%Y-%m-%d %H:%M} UTC (the CA has not published a newer one there)",
                         issued)
    if next_update is None and past_max_age(crl.last_update_utc, now, max_age):
        return no_answer(f"was issued on {crl.last_update_utc:%Y-%m-%d %H:%M} UTC, without nextUpdate, more than "
                         f"{_age_text(max_age)} ago ([trust] revocation_max_age): stale", issued)
    fresh_until = min(next_update or crl.last_update_utc + max_age, (fetched_at or now) + max_age)
    revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    # Listed by the CA, in a complete CRL or a delta or partitioned one, for any reason but
    # removeFromCRL (a delta CRL's "released from hold": no revocation).
    if revoked is not None and listing_in_force([listing(crl, revoked)]) is not None:
        return Judged(Answer(source, Status.REVOKED, revoked_at=revoked.revocation_date_utc,
                             reason=entry_reason(revoked)), fresh_until, issued)
    incomplete = incomplete_because(crl, cert)
    if incomplete is not None:
        return no_answer(f"{incomplete} and cannot vouch for {name(cert.subject)} (a partial CRL: it may omit it)",
                         issued)
    return Judged(Answer(source, Status.GOOD), fresh_until, issued)
