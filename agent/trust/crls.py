"""CRLs from files: reading them strictly, re-reading them when they change, and judging a chain by them.

OpenSSL is given no CRLs. It would read them once, into a TLS context, and the card-session
process makes its contexts once, before its first connection (agent/session/worker.py); a CRL
fetched later would then be ignored, and an expired one would fail every handshake. Instead the
peer's chain is built from [trust] ca after each handshake and checked here against the CRLs as
they are on disk at that moment.

CRL files are usually fetched over plain HTTP, so nothing but CRLs is taken from them: a
certificate in a CRL file is an error, never a new trust anchor. A CRL file another user could
change is refused, at every look (agent/file_trust.py): they could put back an older CRL of the CA
that does not list a certificate revoked since.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from dicom_card_agent.file_trust import UnsafeFileError, check_trusted_file, existing
from dicom_card_agent.logline import printable
from dicom_card_agent.trust.errors import CrlError, RevokedCertificateError, TrustFileError

log = logging.getLogger("agent.trust")

LOOK_INTERVAL = 2.0
"""Seconds between two looks at the CRL files (a stat each); a new file is used within this time."""

MAX_CRL_BYTES = 16 * 1024 * 1024
"""The most a CRL file, or an answer of a revocation source, may hold: a CRL of a big hospital PKI is a few MB."""

MAX_LOOKED_UP_SERIALS = 1024
"""Serials whose entry a CRL file keeps looked up (peers' certificates); forgotten all at once beyond."""

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def describe(cert: x509.Certificate) -> str:
    return f"{name(cert.subject)} (issuer {name(cert.issuer)})"


def name(distinguished_name: x509.Name) -> str:
    """A name for messages and log lines: a peer's certificate may carry control characters in it."""
    text = distinguished_name.rfc4514_string()
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class CrlFileError(TrustFileError):
    """A CRL file cannot be used: unreadable, not a CRL, or holding something else besides CRLs."""


@dataclass(frozen=True)
class FileCrl:
    """One CRL and the file it came from, which every message about it names."""

    path: Path
    crl: x509.CertificateRevocationList
    # Issuer certificate -> whether it signed ``crl``. A file's CRLs are read anew (new FileCrl
    # objects) when its contents change, so a result never outlives the contents it was made from.
    _signed_by: dict[x509.Certificate, bool] = field(default_factory=dict, compare=False, repr=False)
    _entries: dict[int, x509.RevokedCertificate | None] = field(default_factory=dict, compare=False, repr=False)

    @property
    def issuer(self) -> str:
        return name(self.crl.issuer)

    def entry(self, serial_number: int) -> x509.RevokedCertificate | None:
        """The CRL's entry for ``serial_number``, looked up once per serial: a look-up scans the
        whole CRL (50 ms for one of 400,000 entries), and a peer's associations ask for the same one."""
        try:
            return self._entries[serial_number]
        except KeyError:
            pass
        entry = self.crl.get_revoked_certificate_by_serial_number(serial_number)
        if len(self._entries) >= MAX_LOOKED_UP_SERIALS:  # another association may be looking meanwhile:
            self._entries.clear()  # each statement alone is atomic, and each keeps its own result
        self._entries[serial_number] = entry
        return entry

    def signed_by(self, issuer: x509.Certificate) -> bool:
        """Whether ``issuer`` signed this CRL, verified once per issuer: verifying hashes the whole
        CRL (0.36 s for one of 400,000 entries, holding the GIL), which every association paid."""
        known = self._signed_by.get(issuer)
        if known is None:
            known = self._signed_by[issuer] = _crl_signed_by(self.crl, issuer)
        return known

    def expired(self, now: datetime.datetime) -> bool:
        next_update = self.crl.next_update_utc
        return next_update is not None and next_update < now

    def describe_expiry(self) -> str:
        next_update = self.crl.next_update_utc
        when = f"{next_update:%Y-%m-%d %H:%M} UTC" if next_update else "an unknown date"
        return f"the CRL of {self.issuer} in {self.path} expired on {when}"


CRL_FILE = "the CRL file"
CRL_FILE_RISK = "replace its CRLs with older ones that do not list a certificate revoked since"


def refuse_unsafe_crl_file(path: Path) -> None:
    """Raise :class:`CrlFileError` when another user could have changed the CRL file ``path``. One
    that is missing or no regular file (a FIFO, a device) passes: reading it refuses it, saying what
    it is, without opening a FIFO for good."""
    found = existing(path)
    if found is None or not stat.S_ISREG(found[2].st_mode):
        return
    try:
        check_trusted_file(path, CRL_FILE, CRL_FILE_RISK)
    except UnsafeFileError as error:
        raise CrlFileError(str(error)) from None


def read_crl_file(path: Path) -> list[FileCrl]:
    """The CRLs of a PEM file (one or more "X509 CRL" blocks) or of a DER file (one CRL), when no other
    user could have changed the file."""
    refuse_unsafe_crl_file(path)
    data = _read_regular_file(path)
    crls = _pem_crls(path, data) if b"-----BEGIN" in data else [_der_crl(path, data)]
    return [FileCrl(path, crl) for crl in crls]


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` when it is a regular file (or a symlink to one) of at most
    :data:`MAX_CRL_BYTES`. Anything else is refused before a byte is read, by what was opened:
    a FIFO without a writer would block the reader for good (the card session reads while
    associations wait on it), a device such as /dev/zero never ends. O_NONBLOCK makes opening a
    FIFO return at once; it changes nothing for a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        raise CrlFileError(f"cannot read CRL file {path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise CrlFileError(f"CRL file {path} is {_file_kind(status.st_mode)}, not a regular file: give a file "
                               "holding CRLs")
        if status.st_size > MAX_CRL_BYTES:
            raise CrlFileError(_too_large(path))
        try:
            data = handle.read(MAX_CRL_BYTES + 1)  # it may have grown since fstat
        except OSError as error:
            raise CrlFileError(f"cannot read CRL file {path}: {error.strerror}") from None
    if len(data) > MAX_CRL_BYTES:
        raise CrlFileError(_too_large(path))
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), "no regular file")


def _too_large(path: Path) -> str:
    return (f"CRL file {path} is larger than {MAX_CRL_BYTES} bytes, the most a CRL file may hold (a CRL of even a big "
            "PKI is a few MB): give the CA's CRL, not another file")


def _pem_crls(path: Path, data: bytes) -> list[x509.CertificateRevocationList]:
    blocks = list(_PEM_BLOCK.finditer(data))
    foreign = sorted({block.group(1).decode() for block in blocks if block.group(1) != b"X509 CRL"})
    if foreign:
        raise CrlFileError(
            f"CRL file {path} holds {' and '.join(foreign)} besides CRLs: a CRL file may hold only CRLs, "
            "nothing in it is trusted (put CA certificates in [trust] ca, not in a CRL file)")
    if len(blocks) != data.count(b"-----BEGIN "):
        raise CrlFileError(f"CRL file {path} holds an incomplete PEM block (cut short, or still being written)")
    if not blocks:
        raise CrlFileError(f"CRL file {path} holds no \"X509 CRL\" PEM block: give a CRL in PEM or DER form")
    try:
        return [x509.load_pem_x509_crl(block.group(0)) for block in blocks]
    except ValueError as error:
        raise CrlFileError(f"CRL file {path} holds a damaged CRL: {error}") from None


def _der_crl(path: Path, data: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_der_x509_crl(data)
    except ValueError as error:
        crl_error = error
    try:
        x509.load_der_x509_certificate(data)
    except ValueError:
        raise CrlFileError(f"CRL file {path} is not a readable CRL (PEM or DER): {crl_error}") from None
    raise CrlFileError(f"CRL file {path} holds a certificate, not a CRL: a CRL file may hold only CRLs "
                       "(put CA certificates in [trust] ca, not in a CRL file)")


def check_chain(chain: Sequence[x509.Certificate], crls: Sequence[FileCrl], now: datetime.datetime, *,
                allow_expired: bool = False, unusable: Sequence[str] = ()) -> list[FileCrl]:
    """Raise if a certificate of ``chain`` (leaf first, issuers after) is revoked or cannot be checked.

    Fail-closed for the leaf, as OpenSSL's leaf CRL checking: its issuer must have a CRL among
    ``crls``; the other certificates are checked when their issuer published one. A CRL that is
    expired fails the check unless ``allow_expired``; the expired CRLs that were used are returned
    so the caller can warn. ``unusable`` describes CRL files that could not be read, for the
    message when a CRL is missing."""
    used_expired: list[FileCrl] = []
    for position, (cert, issuer) in enumerate(pairwise(chain)):
        listed = revoked_entry(cert, issuer, crls)
        if listed is not None:
            raise RevokedCertificateError(revoked_text(cert, *listed))
        candidates = [c for c in crls if c.crl.issuer == cert.issuer and _covers(c.crl, cert)]
        if not candidates:
            if position == 0:
                unreadable = f" (not usable: {'; '.join(unusable)})" if unusable else ""
                raise CrlError(f"no CRL from {name(cert.issuer)} among the configured CRLs{unreadable}"
                               f"{partial_crls(cert, crls)}, so {describe(cert)} cannot be checked for revocation: "
                               "add that CA's CRL")
            continue
        genuine = [c for c in candidates if c.signed_by(issuer)]
        if not genuine:
            files = ", ".join(str(c.path) for c in candidates)
            raise CrlError(f"the CRL of {name(cert.issuer)} in {files} has an invalid signature "
                           f"(not signed by {describe(issuer)}): fetch the CA's genuine CRL")
        current = [c for c in genuine if not c.expired(now)]
        if not current:
            if not allow_expired:
                raise CrlError(f"{genuine[0].describe_expiry()}, so {describe(cert)} cannot be checked for "
                               "revocation: fetch a current CRL into that file (or set [trust] crl_expired = "
                               "\"warn\" to accept it meanwhile)")
            used_expired += genuine
    return used_expired


def _scope(crl: x509.CertificateRevocationList) -> x509.IssuingDistributionPoint | None:
    try:
        return crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None


def _in_scope(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    """Whether an entry of ``crl`` with ``cert``'s serial is about ``cert``: the CRL is direct (an
    indirect CRL's entries may be of another issuer's certificates) and of certificates of its
    kind (not one of CA certificates only for a leaf, nor of attribute certificates). A delta CRL,
    or one limited to some reasons or distribution point, is in scope: what it lists is revoked."""
    scope = _scope(crl)
    if scope is None:
        return True
    if scope.indirect_crl or scope.only_contains_attribute_certs:
        return False
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return not (scope.only_contains_ca_certs and not is_ca) and not (scope.only_contains_user_certs and is_ca)


def _covers(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> bool:
    """Whether ``crl`` is a complete CRL for ``cert``, so that not being listed in it proves ``cert`` good."""
    return incomplete_because(crl, cert) is None


def incomplete_because(crl: x509.CertificateRevocationList, cert: x509.Certificate) -> str | None:
    """Why not being listed in ``crl`` does not prove ``cert`` good, None when it does: out of scope,
    a delta CRL or one limited to some reasons (either may omit it), or the CRL of a distribution
    point that ``cert`` does not name (a partitioned CRL: ``cert`` is in another partition's)."""
    if not _in_scope(crl, cert):
        return "is limited to other certificates (indirect, or of another kind)"
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        return "is a delta CRL"
    except x509.ExtensionNotFound:
        pass
    scope = _scope(crl)
    if scope is None:
        return None
    if scope.only_some_reasons:
        return "is limited to some revocation reasons"
    crl_points = distribution_point_names(scope.full_name, scope.relative_name, crl.issuer)
    if not same_distribution_point(crl_points, _certificate_points(cert)):
        names = ", ".join(sorted(_general_name(n) for n in crl_points))
        return f"is the CRL of another distribution point ({names})"
    return None


def partial_crls(cert: x509.Certificate, crls: Sequence[FileCrl]) -> str:
    """For the message when no CRL of ``crls`` is complete for ``cert``: those of its issuer that are
    not, each with why (empty when there are none)."""
    found = [f"{crl.path} {why}" for crl in crls if crl.crl.issuer == cert.issuer
             and (why := incomplete_because(crl.crl, cert)) is not None]
    return f" that could vouch for it (the CRL in {'; the CRL in '.join(found)})" if found else ""


def distribution_point_names(full_name: Sequence[x509.GeneralName] | None, relative_name: x509.RelativeDistinguishedName
                             | None, issuer: x509.Name) -> frozenset[x509.GeneralName]:
    """The names of a DistributionPointName: its fullName, or its nameRelativeToCRLIssuer appended
    to ``issuer`` (RFC 5280 4.2.1.13); none when it has neither."""
    if full_name:
        return frozenset(full_name)
    if relative_name is not None:
        return frozenset([x509.DirectoryName(x509.Name([*issuer.rdns, relative_name]))])
    return frozenset()


def same_distribution_point(crl_points: frozenset[x509.GeneralName],
                            certificate_points: Sequence[frozenset[x509.GeneralName]]) -> bool:
    """RFC 5280 6.3.3 (b)(2)(i): a CRL whose IssuingDistributionPoint names a distribution point
    covers only certificates with a distribution point sharing one of its names; one naming none
    covers all. ``certificate_points``: the names of each of the certificate's distribution points
    (none: a certificate without CRLDistributionPoints, which a scoped CRL cannot vouch for)."""
    return not crl_points or any(crl_points & names for names in certificate_points)


def _certificate_points(cert: x509.Certificate) -> list[frozenset[x509.GeneralName]]:
    """The names of each distribution point of ``cert``: its distributionPoint, else its cRLIssuer."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):  # none, or unreadable: no distribution point to match
        return []
    found = []
    for point in points:
        issuer = next((n.value for n in point.crl_issuer or () if isinstance(n, x509.DirectoryName)), cert.issuer)
        names = distribution_point_names(point.full_name, point.relative_name, issuer)
        found.append(names or frozenset(point.crl_issuer or ()))
    return found


def _general_name(general_name: x509.GeneralName) -> str:
    value = general_name.value
    return name(value) if isinstance(value, x509.Name) else printable(str(value))  # from a CRL file or a source


REMOVE_FROM_CRL = "removeFromCRL"
"""RFC 5280 5.3.1: in a delta CRL, a certificate released from hold (or expired): no revocation."""
CERTIFICATE_HOLD = "certificateHold"
"""The one revocation a CA may lift, by a later CRL with a removeFromCRL entry or without the entry."""


@dataclass(frozen=True)
class Listing:
    """One CRL's entry for a certificate, as :func:`listing_in_force` weighs it."""

    number: int | None  # the CRL's CRLNumber
    issued: datetime.datetime  # the CRL's thisUpdate
    reason: str | None  # the entry's CRLReason

    def after(self, other: Listing) -> bool:
        """Whether this CRL was made after ``other``'s: a higher CRLNumber, or without numbers, a later date."""
        if self.number is not None and other.number is not None:
            return self.number > other.number
        return self.issued > other.issued


def listing_in_force(listings: Sequence[Listing]) -> int | None:
    """The index of the first listing that revokes the certificate now, None when none does: a
    removeFromCRL entry revokes nothing, and a certificateHold is lifted by a removeFromCRL entry of
    a later CRL (a delta CRL releasing the hold)."""
    releases = [listing for listing in listings if listing.reason == REMOVE_FROM_CRL]
    for index, listing in enumerate(listings):
        if listing.reason == REMOVE_FROM_CRL:
            continue
        if listing.reason == CERTIFICATE_HOLD and any(release.after(listing) for release in releases):
            continue
        return index
    return None


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def listing(crl: x509.CertificateRevocationList, entry: x509.RevokedCertificate) -> Listing:
    return Listing(crl_number(crl), crl.last_update_utc, entry_reason(entry))


def revoked_entry(cert: x509.Certificate, issuer: x509.Certificate,
                  crls: Sequence[FileCrl]) -> tuple[FileCrl, x509.RevokedCertificate] | None:
    """The first entry, among the CRLs of ``crls`` that are of ``cert``'s issuer, signed by ``issuer``
    and in scope for ``cert``, that revokes it (:func:`listing_in_force`), with its CRL. Complete or
    not: a delta or partitioned CRL cannot prove a certificate good, but a certificate the CA lists
    in one is revoked all the same."""
    found: list[tuple[FileCrl, x509.RevokedCertificate]] = []
    for crl in crls:
        if crl.crl.issuer != cert.issuer or not _in_scope(crl.crl, cert):
            continue
        entry = crl.entry(cert.serial_number)
        if entry is not None and crl.signed_by(issuer):
            found.append((crl, entry))
    index = listing_in_force([listing(crl.crl, entry) for crl, entry in found])
    return None if index is None else found[index]


def entry_reason(entry: x509.RevokedCertificate) -> str | None:
    """The CRLReason of a CRL entry ("keyCompromise"), None when it gives none."""
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return None


def revoked_text(cert: x509.Certificate, crl: FileCrl, entry: x509.RevokedCertificate) -> str:
    reason = entry_reason(entry)
    because = f" (reason: {reason})" if reason else ""
    return (f"certificate {describe(cert)} was revoked on {entry.revocation_date_utc:%Y-%m-%d %H:%M} UTC{because} "
            f"according to CRL file {crl.path}")


def issuer_chain(leaf: x509.Certificate, certificates: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """``leaf`` and, as far as ``certificates`` have them, its issuers up to a self-signed one.

    OpenSSL has already verified the peer's chain; this only finds the issuers again, by name and
    signature, because a CRL is judged with its issuer's key (Python 3.11 cannot return the chain
    OpenSSL built)."""
    chain = [leaf]
    while len(chain) <= len(certificates):
        current = chain[-1]
        issuer = next((c for c in certificates if c.subject == current.issuer and c not in chain
                       and _signed_by(current, c)), None)
        if issuer is None:
            break
        chain.append(issuer)
    return chain


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):  # other key, algorithm or signature
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm):  # a key or algorithm that cannot sign CRLs here
        return False


@dataclass
class _WatchedFile:
    """A CRL file and the CRLs last read from it successfully; ``error`` while its current content is unusable."""

    path: Path
    signature: tuple[int, ...] | None = None
    crls: list[FileCrl] = field(default_factory=list)
    error: str | None = None
    read_once: bool = False

    def look(self) -> None:
        try:
            status = os.stat(self.path)
        except OSError as error:
            self._unusable(f"cannot read CRL file {self.path}: {error.strerror}", signature=None)
            return
        try:
            # At every look, not only when the file changed: a directory above it that becomes
            # writable by others changes nothing the signature below sees.
            refuse_unsafe_crl_file(self.path)
        except CrlFileError as error:
            self._unusable(str(error), signature=None)  # once safe again, the file is read again
            return
        signature = (status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)
        if signature == self.signature:
            return
        try:
            crls = read_crl_file(self.path)
        except CrlFileError as error:
            self._unusable(str(error), signature)
            return
        if self.read_once:
            log.info("CRL file %s re-read: %s", self.path, "; ".join(_summary(c) for c in crls))
        self.signature, self.crls, self.error, self.read_once = signature, crls, None, True

    def _unusable(self, error: str, signature: tuple[int, ...] | None) -> None:
        changed = error != self.error or signature != self.signature
        self.signature, self.error, self.read_once = signature, error, True
        if changed:
            log.warning("%s", self.report())

    def report(self) -> str:
        """Why the file is not usable now, and what is used instead."""
        kept = "still using the CRLs read from it before" if self.crls else "no CRL from it is in use"
        return f"{self.error}; {kept}"


def _summary(crl: FileCrl) -> str:
    next_update = crl.crl.next_update_utc
    return f"CRL of {crl.issuer}, next update {next_update:%Y-%m-%d %H:%M} UTC" if next_update else \
        f"CRL of {crl.issuer}, no next update"


class CrlStore:
    """The CRLs of [trust] crl as they are on disk: each file is looked at (a stat) at most every
    ``interval`` seconds and re-read when it changed. A file whose new content is unusable keeps
    serving the CRLs last read from it, and is reported (log and ``card-agent status``) by name."""

    def __init__(self, paths: Sequence[Path], *, allow_expired: bool = False, interval: float = LOOK_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.allow_expired = allow_expired
        self._files = [_WatchedFile(Path(p)) for p in paths]
        self._interval = interval
        self._clock = clock
        self._next_look = 0.0
        self._generation = 0  # counts changes of what the files say (re-read, or become unusable)
        self._lock = threading.Lock()
        self._warned: set[tuple[Path, datetime.datetime | None]] = set()

    @classmethod
    def open(cls, paths: Sequence[Path], *, allow_expired: bool = False) -> CrlStore:
        """A store whose files must all be usable now: the agent's start-up check of its configuration."""
        store = cls(paths, allow_expired=allow_expired)
        store._refresh(wait=True)
        for watched in store._files:
            if watched.error is not None:
                raise CrlFileError(watched.error)
        store.warn_expired(datetime.datetime.now(datetime.timezone.utc))
        return store

    def _refresh(self, *, wait: bool = False) -> None:
        """Look at the files if :data:`LOOK_INTERVAL` has passed. An association never waits for
        another thread's look (reading and parsing a big CRL takes a while): it goes on with what
        the files said until then, as it would have a moment earlier. ``wait``: the start-up check
        and `status`, which must see the files as they are now."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            now = self._clock()
            if now < self._next_look:
                return
            self._next_look = now + self._interval
            for watched in self._files:
                before = (watched.signature, watched.error)
                watched.look()
                if (watched.signature, watched.error) != before:
                    self._generation += 1
        finally:
            self._lock.release()

    def check(self, chain: Sequence[x509.Certificate], now: datetime.datetime | None = None) -> None:
        """Raise :class:`RevokedCertificateError` or :class:`CrlError` unless ``chain`` passes the current CRLs."""
        self._refresh()
        now = now or datetime.datetime.now(datetime.timezone.utc)
        crls = [crl for watched in self._files for crl in watched.crls]
        unusable = [watched.error for watched in self._files if watched.error is not None]
        for crl in check_chain(chain, crls, now, allow_expired=self.allow_expired, unusable=unusable):
            self._warn_once(crl)

    def generation(self) -> int:
        """A number that changes whenever what the files say may have changed (looked at as
        :meth:`current` looks): a verdict made from them stays valid while it is the same."""
        self._refresh()
        return self._generation

    def current(self) -> tuple[list[FileCrl], list[str]]:
        """The CRLs on disk now, and why the files that are not usable are not."""
        self._refresh()
        return ([crl for watched in self._files for crl in watched.crls],
                [watched.error for watched in self._files if watched.error is not None])

    def unusable(self) -> list[str]:
        """The files not usable now (looked at as `status` looks), each with why and what is used instead."""
        self._refresh(wait=True)
        return [watched.report() for watched in self._files if watched.error is not None]

    def warn_once(self, crl: FileCrl) -> None:
        self._warn_once(crl)

    def warn_expired(self, now: datetime.datetime) -> None:
        for watched in self._files:
            for crl in watched.crls:
                if crl.expired(now):
                    self._warn_once(crl)

    def _warn_once(self, crl: FileCrl) -> None:
        key = (crl.path, crl.crl.last_update_utc)
        if key in self._warned:
            return
        self._warned.add(key)
        consequence = ("it is used meanwhile ([trust] crl_expired = \"warn\")" if self.allow_expired else
                       "certificates of that CA are refused until a current CRL replaces it ([trust] crl_expired "
                       "= \"refuse\")")
        log.warning("%s: %s; fetch a current CRL", crl.describe_expiry(), consequence)

    def status(self, now: datetime.datetime | None = None) -> list[dict[str, Any]]:
        """Each file with its CRLs' issuer and next update, and whether it is current, expired or unusable
        (JSON for `card-agent status`: values of several types, hence Any)."""
        self._refresh(wait=True)
        now = now or datetime.datetime.now(datetime.timezone.utc)
        rows: list[dict[str, Any]] = []
        for watched in self._files:
            entries = [{"issuer": crl.issuer,
                        "next_update": f"{crl.crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}" if crl.crl.next_update_utc
                        else None,
                        "expired": crl.expired(now)} for crl in watched.crls]
            state = "unusable" if watched.error else ("expired" if any(e["expired"] for e in entries) else "current")
            rows.append({"file": str(watched.path), "state": state, "error": watched.error, "crls": entries})
        return rows
