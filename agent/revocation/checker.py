"""Gathering revocation answers for a chain: CRL files, cached answers, and fetches that never
hold up more than the association that needs them.

Each source being fetched has a thread of its own (see :data:`MAX_FETCHES_AT_ONCE`); an
association whose certificate has no fresh answer yet waits for them at most ``timeout`` seconds
(the first, uncached check), other associations go on meanwhile (each relays in its own thread,
and a cached answer costs a dictionary look-up). Each fetch is over within ``timeout`` of its
start, however slowly its source sends (sources.py), so a source too slow fails like one that is
down. A refresher thread fetches every answer again before it goes stale, so associations do not
wait after the first. Answers are kept on disk as the bytes the source sent, and judged again
(issuer's signature, freshness) when read after a restart: a file in the cache cannot plant an
answer. An answer older than the one held (a replay) never replaces it, and a certificate seen
revoked stays revoked (:meth:`RevocationChecker._older_than_held`, :meth:`RevocationChecker._remember`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from dicom_card_agent.revocation.decision import Answer, CertificateAnswers, Policy, Status, Verdict, decide
from dicom_card_agent.revocation.sources import (
    FetchError,
    Issued,
    Judged,
    crl_urls,
    http_get,
    http_post_ocsp,
    judge_crl,
    judge_ocsp,
    ocsp_request,
    ocsp_urls,
    source_name,
)
from dicom_card_agent.trust.crls import (
    REMOVE_FROM_CRL,
    CrlStore,
    FileCrl,
    _covers,
    entry_reason,
    issuer_chain,
    name,
    partial_crls,
    revoked_entry,
)
from dicom_card_agent.trust.crls import describe as _describe_now

log = logging.getLogger("agent.revocation")

DEFAULT_TIMEOUT = 3.0
DEFAULT_MAX_AGE = datetime.timedelta(days=7)
REFRESH_FRACTION = 0.75  # of an answer's lifetime: fetched again then, well before it goes stale
MAX_REMEMBERED_CHAINS = 1024  # peers' chains and sources kept found; forgotten all at once beyond
FAILURE_HOLD = 30.0  # seconds a source that failed is not waited for again (its failure is the answer)
LOOK_AT_MOST_EVERY = 60.0  # seconds the refresher sleeps when nothing is due sooner
VERDICT_REUSE = datetime.timedelta(seconds=1)  # an "allow" for a peer serves its next associations this long
MAX_FETCHES_AT_ONCE = 64
"""Fetches under way at once, each in a thread of its own. Not a small pool: with 4 threads, four
sources that never answer held them all for ``timeout``, and a healthy PACS's first check waited
behind them and was refused. A thread per source in flight (one per source, shared by every
association that needs it) lets no source delay another's fetch; each ends within ``timeout``, so
this many is reached only by that many distinct dead sources at once, and then the next source is
not asked (logged) rather than a thread started for every peer's certificate."""
HELD_REASON = "certificateHold"  # the one revocation that can be lifted: it alone does not stay


@functools.lru_cache(maxsize=MAX_REMEMBERED_CHAINS)
def describe(cert: x509.Certificate) -> str:
    """The certificate as messages name it, made once: a cached association needs it for every check."""
    return _describe_now(cert)


def default_cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dicom-card-agent" / "revocation"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class _Source:
    kind: str  # "ocsp" or "crl"
    url: str
    cert: x509.Certificate
    issuer: x509.Certificate

    @functools.cached_property
    def key(self) -> str:
        """One cache entry per OCSP question (responder, issuer, serial) and per CRL URL."""
        if self.kind == "crl":
            return "crl " + self.url
        return f"ocsp {self.url} {self.issuer.fingerprint(hashes.SHA256()).hex()} {self.cert.serial_number}"


@dataclass(frozen=True)
class _Fetched:
    """A source's verified bytes and when they were fetched: ``revocation_max_age`` counts from then,
    however often they are judged again (from memory, or from the disk cache after a restart)."""

    raw: bytes
    at: datetime.datetime


class CheckGivenUpError(Exception):
    """A check stopped waiting for a fetch because its association is no longer wanted (the card
    session ended); the reason is its argument."""


class RevocationChecker:
    """The revocation answers of one process (the card session; the CLI for `identities`)."""

    def __init__(self, *, certificates: Sequence[x509.Certificate], ca_source: str, crls: CrlStore | None = None,
                 cache_directory: Path | None = None, max_age: datetime.timedelta = DEFAULT_MAX_AGE,
                 timeout: float = DEFAULT_TIMEOUT, ocsp_responder: str | None = None,
                 clock: Callable[[], datetime.datetime] = utc_now, refresh: bool = True) -> None:
        self.certificates = tuple(certificates)
        self.ca_source = ca_source
        self.crls = crls
        self.max_age = max_age
        self.timeout = timeout
        self.ocsp_responder = ocsp_responder
        self._clock = clock
        self._cache = _DiskCache(cache_directory)
        self._lock = threading.RLock()  # a fetch that is done at once calls back into _done under it
        self._raw: dict[str, _Fetched] = {}  # the last verified bytes of each source
        self._judged: dict[tuple[str, int], Judged] = {}
        self._known: dict[str, _Source] = {}  # what the refresher fetches again
        self._refresh_at: dict[str, datetime.datetime] = {}
        self._pending: dict[str, concurrent.futures.Future[Judged]] = {}
        self._chains: dict[x509.Certificate, list[x509.Certificate]] = {}
        self._failures: dict[tuple[str, int], tuple[datetime.datetime, Answer]] = {}
        self._sources_of: dict[tuple[x509.Certificate, x509.Certificate], list[_Source]] = {}
        self._answers_changed = 0  # counts answers learnt (or failures) since start: see check()
        self._allowed: dict[tuple[x509.Certificate, Policy], tuple[tuple[int, int], datetime.datetime]] = {}
        self._issued: dict[str, Issued] = {}  # when the answer held for each source was made
        # Certificates a fetched answer said revoked: they stay revoked however a later answer reads.
        # Not bounded: only certificates of [trust] ca's CAs that a CA revoked get here, a handful.
        self._revoked: dict[x509.Certificate, Answer] = {}
        self._too_many_logged = False
        self._wake = threading.Event()
        if refresh:
            threading.Thread(target=self._refresher, name="revocation-refresh", daemon=True).start()

    # -- the checks --------------------------------------------------------------------------

    def check(self, leaf: x509.Certificate, policy: Policy,
              given_up: concurrent.futures.Future[str] | None = None) -> Verdict:
        """The verdict on ``leaf`` and its chain under ``policy``. A fetch it waits for is waited for
        until ``given_up`` is done (the card session ended): :class:`CheckGivenUpError` then, with
        its result as the reason; the fetch goes on for later associations.

        Gathering the answers costs an association ~0.5 ms even when all are cached (the chain's
        CRL files and answers looked at one by one), and associations come in bursts (a viewer's
        prefetch, a C-MOVE). So an "allow" is reused for :data:`VERDICT_REUSE`, unless a CRL file
        changed or a new answer or failure was learnt since it was made: those are seen at once.
        A refusal or warning is made afresh every time (they are rare, and log)."""
        if policy == "off":
            return Verdict("allow")
        now = self._clock()
        seen = (self.crls.generation() if self.crls is not None else 0, self._answers_changed)
        key = (leaf, policy)
        with self._lock:
            allowed = self._allowed.get(key)
        if allowed is not None and allowed[0] == seen and now < allowed[1]:
            return Verdict("allow")
        verdict = decide(policy, self.gather(leaf, given_up))
        if verdict.outcome == "allow":
            with self._lock:
                if len(self._allowed) >= MAX_REMEMBERED_CHAINS:
                    self._allowed.clear()
                self._allowed[key] = (seen, now + VERDICT_REUSE)
        return verdict

    def gather(self, leaf: x509.Certificate,
               given_up: concurrent.futures.Future[str] | None = None) -> list[CertificateAnswers]:
        """The answers about ``leaf`` and the intermediates of [trust] ca above it (``given_up``: see
        :meth:`check`)."""
        chain = self._chain(leaf)
        if len(chain) == 1:
            detail = (f"the issuer {name(leaf.issuer)} of {describe(leaf)} is not in [trust] ca ({self.ca_source}), "
                      "so no revocation answer about it can be verified: add that CA certificate to [trust] ca")
            return [CertificateAnswers(describe(leaf), (Answer("[trust] ca", Status.NO_ANSWER, detail),), True)]
        now = self._clock()
        deadline = now + datetime.timedelta(seconds=self.timeout)
        return [self._answers(cert, issuer, position == 0, now, deadline, given_up)
                for position, (cert, issuer) in enumerate(pairwise(chain))]

    def _chain(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """The leaf's chain in [trust] ca, found once per certificate: finding it verifies signatures,
        which would cost a cached association more than the answer's look-up."""
        key = leaf  # certificates hash and compare by their DER: cheaper than a fingerprint
        with self._lock:
            chain = self._chains.get(key)
        if chain is None:
            chain = issuer_chain(leaf, self.certificates)
            with self._lock:
                if len(self._chains) >= MAX_REMEMBERED_CHAINS:
                    self._chains.clear()
                self._chains[key] = chain
        return chain

    def _answers(self, cert: x509.Certificate, issuer: x509.Certificate, is_leaf: bool, now: datetime.datetime,
                 deadline: datetime.datetime, given_up: concurrent.futures.Future[str] | None) -> CertificateAnswers:
        with self._lock:
            revoked = self._revoked.get(cert)
        if revoked is not None:
            return CertificateAnswers(describe(cert), (revoked,), is_leaf)
        answers: list[Answer] = []
        file_answer = self._file_answer(cert, issuer, is_leaf, now)
        if file_answer is not None:
            answers.append(file_answer)
        sources = self._sources(cert, issuer)
        waiting: list[tuple[_Source, concurrent.futures.Future[Judged]]] = []
        for source in sources:
            judged = self._cached(source, now)
            if judged is not None:
                answers.append(judged.answer)
        if not _decided(answers):
            for source in sources:
                if any(a.source == _source_name(source) for a in answers):
                    continue
                failure = self._recent_failure(source, now)
                if failure is not None:  # asked moments ago in vain: no association waits for it again
                    answers.append(failure)
                else:
                    waiting.append((source, self._fetch(source)))
        pending = dict(waiting)
        futures = {future: source for source, future in waiting}
        while futures and not _decided(answers):
            remaining = max(0.0, (deadline - self._clock()).total_seconds())
            waited_for: list[concurrent.futures.Future[Any]] = [*futures]
            if given_up is not None:
                waited_for.append(given_up)
            done, _ = concurrent.futures.wait(waited_for, timeout=remaining,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if given_up is not None and given_up.done():
                raise CheckGivenUpError(given_up.result())
            if not done:
                break
            for future in done:
                answers.append(future.result().answer)
                pending.pop(futures.pop(future))
        if not _decided(answers):
            for source in pending:
                answers.append(Answer(_source_name(source), Status.NO_ANSWER,
                                      f"{_source_name(source)} did not answer within {self.timeout:g} s (it is still "
                                      "being asked; a later association uses its answer)"))
        return CertificateAnswers(describe(cert), tuple(answers), is_leaf)

    def _sources(self, cert: x509.Certificate, issuer: x509.Certificate) -> list[_Source]:
        key = (cert, issuer)
        with self._lock:
            sources = self._sources_of.get(key)
        if sources is None:
            ocsp = [self.ocsp_responder] if self.ocsp_responder else ocsp_urls(cert)
            sources = ([_Source("ocsp", url, cert, issuer) for url in ocsp]
                       + [_Source("crl", url, cert, issuer) for url in crl_urls(cert)])
            with self._lock:
                if len(self._sources_of) >= MAX_REMEMBERED_CHAINS:
                    self._sources_of.clear()
                self._sources_of[key] = sources
        return sources

    def _file_answer(self, cert: x509.Certificate, issuer: x509.Certificate, is_leaf: bool,
                     now: datetime.datetime) -> Answer | None:
        if self.crls is None:
            return None
        crls, unusable = self.crls.current()
        return file_answer(cert, issuer, crls, now, allow_expired=self.crls.allow_expired, unusable=unusable,
                           is_leaf=is_leaf, warn_expired=self.crls.warn_once)

    # -- cache and fetching ------------------------------------------------------------------

    def _cached(self, source: _Source, now: datetime.datetime) -> Judged | None:
        """A fresh answer from memory, or from disk (judged again), or None."""
        with self._lock:
            judged = self._judged.get((source.key, source.cert.serial_number))
            fetched = self._raw.get(source.key)
        if judged is not None and judged.fresh_until is not None and judged.fresh_until > now:
            return judged
        if fetched is None:
            fetched = self._cache.load(source.key)
            if fetched is None:
                return None
        judged = self._judge(source, fetched, now, nonce=None)
        if judged.fresh_until is None or judged.fresh_until <= now:
            return None
        self._remember(source, fetched, judged, now, store=False)
        return judged

    def _judge(self, source: _Source, fetched: _Fetched, now: datetime.datetime, nonce: bytes | None) -> Judged:
        if source.kind == "ocsp":
            return judge_ocsp(fetched.raw, source.cert, source.issuer, source.url, now, self.max_age, nonce,
                              fetched_at=fetched.at)
        return judge_crl(fetched.raw, source.cert, source.issuer, source.url, now, self.max_age,
                         fetched_at=fetched.at)

    def _remember(self, source: _Source, fetched: _Fetched, judged: Judged, now: datetime.datetime, *,
                  store: bool) -> None:
        assert judged.fresh_until is not None
        lifetime = judged.fresh_until - now
        with self._lock:
            held = self._raw.get(source.key)
            if held is None or held.raw != fetched.raw:
                # New bytes: every certificate judged from the old ones is judged again.
                self._judged = {k: v for k, v in self._judged.items() if k[0] != source.key}
            if held is None or held != fetched:
                self._raw[source.key] = fetched
            self._judged[(source.key, source.cert.serial_number)] = judged
            if judged.issued is not None:
                self._issued[source.key] = judged.issued
            if judged.answer.status is Status.REVOKED and judged.answer.reason not in (HELD_REASON, REMOVE_FROM_CRL):
                self._revoked.setdefault(source.cert, judged.answer)
            self._failures.pop((source.key, source.cert.serial_number), None)
            self._answers_changed += 1
            self._known[source.key] = source
            # An answer taken within CLOCK_SKEW past its nextUpdate has no lifetime left: the
            # refresher asks again after the failure hold, not at once (it did so every second).
            self._refresh_at[source.key] = now + (lifetime * REFRESH_FRACTION if lifetime > datetime.timedelta(0)
                                                  else datetime.timedelta(seconds=FAILURE_HOLD))
        if store:
            self._cache.store(source.key, fetched.raw)
        self._wake.set()

    def _fetch(self, source: _Source) -> concurrent.futures.Future[Judged]:
        """The fetch of ``source`` under way, or a new one in a thread of its own: concurrent
        associations share it (it ends within ``timeout`` of its start, answered or failed, so none
        waits on a stuck one, and no source waits for another's: :data:`MAX_FETCHES_AT_ONCE`)."""
        with self._lock:
            future = self._pending.get(source.key)
            if future is not None:
                return future
            future = concurrent.futures.Future()
            if len(self._pending) >= MAX_FETCHES_AT_ONCE:
                future.set_result(self._not_asked(source))
                return future
            self._too_many_logged = False
            self._pending[source.key] = future
        threading.Thread(target=self._fetch_into, args=(source, future), name="revocation-fetch", daemon=True).start()
        return future

    def _fetch_into(self, source: _Source, future: concurrent.futures.Future[Judged]) -> None:
        try:
            future.set_result(self._fetch_now(source))
        except Exception as error:  # a bug: the associations waiting get it, and the next one fetches again
            future.set_exception(error)
        finally:
            self._done(source.key)

    def _not_asked(self, source: _Source) -> Judged:
        """The answer of a source not asked because :data:`MAX_FETCHES_AT_ONCE` fetches are under
        way (called under the lock). Not held as a failure: the next association asks again."""
        why = (f"{_source_name(source)} was not asked: {MAX_FETCHES_AT_ONCE} fetches from other sources are under "
               "way (the most at once), none answered yet")
        if not self._too_many_logged:
            self._too_many_logged = True
            log.warning("revocation: %s; each ends within %g s ([trust] revocation_timeout)", why, self.timeout)
        return Judged(Answer(_source_name(source), Status.NO_ANSWER, why), None)

    def _done(self, key: str) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def _fetch_now(self, source: _Source) -> Judged:
        try:
            raw, nonce = self._ask(source)
        except FetchError as error:
            log.warning("revocation: %s about %s: %s", _source_name(source), describe(source.cert), error)
            failed = Judged(Answer(_source_name(source), Status.NO_ANSWER, f"{_source_name(source)}: {error}"), None)
            self._failed(source, failed.answer)
            return failed
        now = self._clock()
        fetched = _Fetched(raw, now)
        judged = self._judge(source, fetched, now, nonce)
        if judged.fresh_until is None:
            self._failed(source, judged.answer)
            log.warning("revocation: %s", judged.answer.detail)
            return judged
        kept = self._older_than_held(source, judged, now)
        if kept is not None:
            return kept
        self._remember(source, fetched, judged, now, store=True)
        log.info("revocation: %s says %s about %s, fresh until %s UTC", _source_name(source),
                 judged.answer.status.value, describe(source.cert), f"{judged.fresh_until:%Y-%m-%d %H:%M}")
        return judged

    def _ask(self, source: _Source) -> tuple[bytes, bytes | None]:
        """The source's answer as it sent it, and the nonce of the OCSP request (None for a CRL)."""
        if source.kind == "ocsp":
            request, nonce = ocsp_request(source.cert, source.issuer)
            return http_post_ocsp(source.url, request, self.timeout), nonce
        return http_get(source.url, self.timeout), None

    def _older_than_held(self, source: _Source, judged: Judged, now: datetime.datetime) -> Judged | None:
        """None when ``judged`` may replace the answer held for ``source``; else (it was made before
        the held one: a replay of an older, still unexpired answer, as a "good" one from before the
        revocation) what the held answer says now. A held answer that went stale leaves the
        source unanswered until it sends one at least as new."""
        held = self._held_issued(source, now)
        if held is None or judged.issued is None or not judged.issued.before(held):
            return None
        name = _source_name(source)
        why = (f"{name} sent an answer about {describe(source.cert)} made {_issued_text(judged.issued)}, older than "
               f"the one held (made {_issued_text(held)}): a replayed answer, ignored")
        log.warning("revocation: %s; the held answer stays", why)
        with self._lock:
            fetched = self._raw.get(source.key)
        fetched = fetched or self._cache.load(source.key)
        if fetched is not None:
            kept = self._judge(source, fetched, now, nonce=None)
            if kept.fresh_until is not None and kept.fresh_until > now:
                self._remember(source, fetched, kept, now, store=False)
                return kept
        failed = Judged(Answer(name, Status.NO_ANSWER, why), None)
        self._failed(source, failed.answer)
        return failed

    def _held_issued(self, source: _Source, now: datetime.datetime) -> Issued | None:
        """When the answer held for ``source`` was made: in memory, or in the cache after a restart
        (judged again: only a verified answer counts, stale or not)."""
        with self._lock:
            issued = self._issued.get(source.key)
        if issued is None:
            fetched = self._cache.load(source.key)
            if fetched is not None:
                issued = self._judge(source, fetched, now, nonce=None).issued
        return issued

    def _failed(self, source: _Source, answer: Answer) -> None:
        with self._lock:
            self._failures[(source.key, source.cert.serial_number)] = (
                self._clock() + datetime.timedelta(seconds=FAILURE_HOLD), answer)
            self._answers_changed += 1

    def _recent_failure(self, source: _Source, now: datetime.datetime) -> Answer | None:
        with self._lock:
            held = self._failures.get((source.key, source.cert.serial_number))
        return held[1] if held is not None and held[0] > now else None

    def _refresher(self) -> None:
        """Fetch each known source again before its answer goes stale, off every association's path."""
        while True:
            now = self._clock()
            with self._lock:
                due = [self._known[k] for k, at in self._refresh_at.items() if at <= now and k not in self._pending]
                upcoming = [at for at in self._refresh_at.values() if at > now]
            for source in due:
                with self._lock:
                    self._refresh_at[source.key] = now + datetime.timedelta(seconds=LOOK_AT_MOST_EVERY)
                self._fetch(source)
            sleep = min([LOOK_AT_MOST_EVERY, *((at - now).total_seconds() for at in upcoming)])
            self._wake.wait(max(1.0, sleep))
            self._wake.clear()

    def fetches_pending(self) -> int:
        with self._lock:
            return len(self._pending)


def _decided(answers: Sequence[Answer]) -> bool:
    return any(a.status in (Status.GOOD, Status.REVOKED) for a in answers)


def _source_name(source: _Source) -> str:
    return source_name(source.kind, source.url)


def _issued_text(issued: Issued) -> str:
    number = f", CRL number {issued.number}" if issued.number is not None else ""
    return f"{issued.at:%Y-%m-%d %H:%M:%S} UTC{number}"


def file_answer(cert: x509.Certificate, issuer: x509.Certificate, crls: Sequence[FileCrl], now: datetime.datetime,
                *, allow_expired: bool, unusable: Sequence[str], is_leaf: bool,
                warn_expired: Callable[[FileCrl], None] = lambda _: None) -> Answer | None:
    """What the CRL files of [trust] crl say about ``cert``: None when none is of its issuer and it
    is an intermediate (files are fail-closed for the leaf only, as before OCSP and CDP)."""
    listed = revoked_entry(cert, issuer, crls)
    if listed is not None:
        crl, entry = listed
        return Answer(f"CRL file {crl.path}", Status.REVOKED, revoked_at=entry.revocation_date_utc,
                      reason=entry_reason(entry))
    candidates = [c for c in crls if c.crl.issuer == cert.issuer and _covers(c.crl, cert)]
    if not candidates:
        if not is_leaf:
            return None
        unreadable = f" (not usable: {'; '.join(unusable)})" if unusable else ""
        return Answer("[trust] crl", Status.NO_ANSWER,
                      f"no CRL from {name(cert.issuer)} among the configured CRLs{unreadable}"
                      f"{partial_crls(cert, crls)}, so {describe(cert)} cannot be checked for revocation: add that "
                      "CA's CRL")
    genuine = [c for c in candidates if c.signed_by(issuer)]
    if not genuine:
        files = ", ".join(str(c.path) for c in candidates)
        return Answer(f"CRL file {files}", Status.NO_ANSWER,
                      f"the CRL of {name(cert.issuer)} in {files} has an invalid signature (not signed by "
                      f"{describe(issuer)}): fetch the CA's genuine CRL")
    current = [c for c in genuine if not c.expired(now)]
    if current:
        return Answer(f"CRL file {current[0].path}", Status.GOOD)
    if allow_expired:
        for crl in genuine:
            warn_expired(crl)
        return Answer(f"CRL file {genuine[0].path}", Status.GOOD)
    return Answer(f"CRL file {genuine[0].path}", Status.NO_ANSWER,
                  f"{genuine[0].describe_expiry()}, so {describe(cert)} cannot be checked for revocation: fetch a "
                  "current CRL into that file (or set [trust] crl_expired = \"warn\" to accept it meanwhile)")


class _DiskCache:
    """Raw answers in a directory only this user may read (0700), one file per source key."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._usable = directory is not None
        if directory is not None:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(directory, 0o700)
            except OSError as error:
                log.warning("revocation cache %s cannot be used (%s): answers are kept in memory only, and fetched "
                            "again after a restart; set [trust] revocation_cache to a directory this user may write",
                            directory, error.strerror or error)
                self._usable = False

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        suffix = ".crl" if key.startswith("crl ") else ".ocsp"
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + suffix)

    def load(self, key: str) -> _Fetched | None:
        """The bytes stored for ``key``, fetched when the file was last written."""
        if not self._usable:
            return None
        try:
            with self._path(key).open("rb") as handle:
                written = os.fstat(handle.fileno()).st_mtime
                raw = handle.read()
        except OSError:
            return None
        return _Fetched(raw, datetime.datetime.fromtimestamp(written, datetime.timezone.utc))

    def store(self, key: str, data: bytes) -> None:
        if not self._usable:
            return
        path = self._path(key)
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(temporary, path)
        except OSError as error:
            with contextlib.suppress(OSError):  # a part written to a full disk would hold its space
                temporary.unlink()
            log.warning("revocation cache: cannot write %s: %s", path, error.strerror or error)
