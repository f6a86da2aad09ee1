"""A pynetdicom storage SCP that records what it saw of each association: the client certificate,
AE titles, User Identity, C-ECHOs and the stored instances. Runs in a thread of the test process.

The TLS variant requires a client certificate (CERT_REQUIRED, TLS 1.2+, clients verified against
the PKI's ``ca-bundle.pem``, optional leaf CRL check), so tunnel tests can assert which
certificate the PACS saw. pynetdicom does the TLS handshake in the accepting thread; handshakes
that fail (no, untrusted or revoked certificate) are recorded in ``handshake_failures``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from .pki_files import TlsClientFiles, TlsServerFiles, subject_string
from .ports import LOOPBACK

USERNAME = 1  # User Identity Type 1: username only


@dataclass
class ReceivedInstance:
    """One C-STORE the SCP answered with Success."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset: Dataset | None = None  # decoded, with .file_meta (kept in memory without out_dir)
    path: Path | None = None        # the file as received, with file meta (with out_dir)

    def read(self) -> Dataset:
        """The dataset, from memory or from its file."""
        if self.dataset is not None:
            return self.dataset
        return dcmread(self.path)


@dataclass
class AssociationRecord:
    """What the SCP saw of one association (TLS values are None on the plain SCP)."""

    address: tuple[str, int]
    peer_certificate_der: bytes | None = None
    peer_subject: str | None = None       # RFC 4514, e.g. "CN=Alice Example,O=Example Hospital Test PKI"
    tls_version: str | None = None
    cipher: str | None = None
    calling_ae: str = ""
    called_ae: str = ""
    usernames: list[str] = field(default_factory=list)  # User Identity type 1
    user_identities: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (type, primary, secondary)
    echoes: int = 0
    received: list[ReceivedInstance] = field(default_factory=list)
    ended: str | None = None              # "released" or "aborted" once over


@dataclass
class RecordingScp:
    """A running recording SCP; see :func:`tls_scp` and :func:`plain_scp`."""

    port: int
    ae_title: str
    tls: bool
    out_dir: Path | None = None
    store_delay: float = 0.0  # seconds between keeping an instance and answering its C-STORE
    associations: list[AssociationRecord] = field(default_factory=list)
    handshake_failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _by_assoc: dict[Association, AssociationRecord] = field(default_factory=dict, repr=False)

    @property
    def received(self) -> list[ReceivedInstance]:
        """All stored instances over all associations, in arrival order."""
        with self._lock:
            return [r for a in self.associations for r in a.received]

    def wait_for(self, predicate, timeout: float = 10.0, what: str = "condition"):
        """Poll ``predicate(self)`` until it returns something truthy; return it. Association
        events run in pynetdicom's threads, a little after the client saw the response."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached after {timeout} s: {self.associations!r}, "
                                   f"handshake failures {self.handshake_failures!r}")
            time.sleep(0.01)

    def wait_for_ended(self, count: int = 1, timeout: float = 10.0) -> list[AssociationRecord]:
        """Wait until ``count`` associations are released or aborted; return all records."""
        def ended(scp: RecordingScp) -> list[AssociationRecord] | None:
            with scp._lock:
                done = sum(a.ended is not None for a in scp.associations) >= count
                return list(scp.associations) if done else None
        return self.wait_for(ended, timeout, f"{count} ended association(s)")

    # -- event handlers (pynetdicom threads) --

    def _record(self, assoc: Association) -> AssociationRecord:
        with self._lock:
            return self._by_assoc[assoc]

    def _on_conn_open(self, event: evt.Event) -> None:
        sock = event.assoc.dul.socket.socket
        record = AssociationRecord(address=tuple(event.address[:2]))
        if isinstance(sock, ssl.SSLSocket):
            record.peer_certificate_der = sock.getpeercert(binary_form=True)
            if record.peer_certificate_der:
                record.peer_subject = subject_string(record.peer_certificate_der)
            record.tls_version = sock.version()
            record.cipher = (sock.cipher() or (None,))[0]
        with self._lock:
            self._by_assoc[event.assoc] = record
            self.associations.append(record)

    def _on_requested(self, event: evt.Event) -> None:
        record = self._record(event.assoc)
        request = event.assoc.requestor.primitive  # the A-ASSOCIATE-RQ, before negotiation
        record.calling_ae = str(request.calling_ae_title).strip()
        record.called_ae = str(request.called_ae_title).strip()

    def _on_user_id(self, event: evt.Event) -> tuple[bool, bytes | None]:
        record = self._record(event.assoc)
        primary, secondary = bytes(event.primary_field or b""), bytes(event.secondary_field or b"")
        record.user_identities.append((event.user_id_type, primary, secondary))
        if event.user_id_type == USERNAME:
            record.usernames.append(primary.decode("utf-8", "replace"))
        return True, None  # accept; no server response (type 1 never gets one)

    def _on_echo(self, event: evt.Event) -> int:
        self._record(event.assoc).echoes += 1
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        sop_class, sop_instance = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        if self.out_dir is not None:
            path = self.out_dir / f"{sop_instance}.dcm"
            path.write_bytes(event.encoded_dataset())
            instance = ReceivedInstance(sop_class, sop_instance, transfer_syntax, path=path)
        else:
            dataset = event.dataset
            dataset.file_meta = event.file_meta
            instance = ReceivedInstance(sop_class, sop_instance, transfer_syntax, dataset=dataset)
        record = self._record(event.assoc)
        with self._lock:
            record.received.append(instance)
        if self.store_delay:
            time.sleep(self.store_delay)  # a slow PACS: the instance is kept, its answer not yet sent
        return 0x0000

    def _on_end(self, how: str):
        def handler(event: evt.Event) -> None:
            with self._lock:
                # The record stays; pynetdicom's Association (its threads' buffers, ~1.7 MB each)
                # must not: a clinical day's thousands of associations grew the benchmark to gigabytes.
                record = self._by_assoc.pop(event.assoc, None)
            if record is not None:
                record.ended = how
        return handler

    def handlers(self) -> list:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_USER_ID, self._on_user_id),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_end("released")),
            (evt.EVT_ABORTED, self._on_end("aborted")),
        ]


def keep_responses_for_the_waiting_request(assoc: Association) -> None:
    """Work around a race in pynetdicom 3.0's requestor (its issue 875, "sporadic Received
    unexpected C-FIND service message"): a ``send_*()`` pauses the association's reactor thread
    by clearing an event and waiting for a flag the reactor sets just before it waits on that
    event; seen between the flag and the wait, the reactor goes on, takes the response off the
    DIMSE queue, logs "Received unexpected C-STORE service message" and drops it, and the
    ``send_*()`` gets nothing until its DIMSE timeout, then aborts. Between two pynetdicom peers with
    no agent in between, on a loaded 2-core machine, it lost the response to the 165th, 592nd and
    4,365th C-ECHO of three runs, and it ended a full test run's C-STOREs through the agent after
    30 s. A response the reactor takes while a request waits (the event cleared) is put back for
    it; any other response is left to pynetdicom, which drops it with its warning, as a response
    nobody asked for should be."""
    serve_request = assoc._serve_request

    def serve_or_give_back(msg: object, context_id: int) -> None:
        if getattr(msg, "is_valid_request", True) or assoc._reactor_checkpoint.is_set():
            serve_request(msg, context_id)  # type: ignore[arg-type]
        else:
            assoc.dimse.msg_queue.put((context_id, msg))

    assoc._serve_request = serve_or_give_back  # type: ignore[method-assign]


def set_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler for an SCU: TCP_NODELAY on the association's socket."""
    with contextlib.suppress(OSError, AttributeError):
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# pynetdicom accepts the first of ITS syntaxes that the requestor proposed: Explicit VR Little
# Endian first, like storescp, so private elements keep their VR (implicit VR loses it).
SCP_TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]


def _scp_ae(ae_title: str) -> AE:
    ae = AE(ae_title)
    ae.maximum_pdu_size = 0  # no limit on what we receive
    ae.add_supported_context(Verification, SCP_TRANSFER_SYNTAXES)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, SCP_TRANSFER_SYNTAXES)
    return ae


@contextlib.contextmanager
def _serve(*, ssl_context: ssl.SSLContext | None, port: int | None, ae_title: str,
           out_dir: Path | None, require_called_aet: bool = False, store_delay: float = 0.0) -> Iterator[RecordingScp]:
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    ae = _scp_ae(ae_title)
    ae.require_called_aet = require_called_aet  # then any other called AE title gets A-ASSOCIATE-RJ
    scp = RecordingScp(port=0, ae_title=ae_title, tls=ssl_context is not None, out_dir=out_dir,
                       store_delay=store_delay)
    # As AE.start_server(block=False), but polling for shutdown every 50 ms instead of 500 ms.
    server = ae.make_server((LOOPBACK, port or 0), ssl_context=ssl_context, evt_handlers=scp.handlers(),
                            server_class=ThreadedAssociationServer)
    accept = server.get_request

    def get_request():
        try:
            sock, address = accept()
        except ssl.SSLError as exc:  # failed handshake: pynetdicom drops the connection silently
            with scp._lock:
                scp.handshake_failures.append(f"{type(exc).__name__}: {exc}")
            raise
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    server.get_request = get_request  # socketserver calls self.get_request() per connection
    ae._servers.append(server)        # AssociationServer.shutdown() removes it from there
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     name=f"RecordingScp@{server.server_address[1]}", daemon=True).start()
    scp.port = server.server_address[1]
    try:
        yield scp
    finally:
        server.shutdown()  # stops accepting and closes the listening socket
        for assoc in list(server.active_associations):
            assoc.abort()
        ae.shutdown()


@contextlib.contextmanager
def tls_scp(*, pki_dir: Path | None = None, tls: TlsServerFiles | None = None, port: int | None = None,
            ae_title: str = "PYNETDICOM", crl: bool | Path = False,
            out_dir: Path | None = None, require_called_aet: bool = False,
            store_delay: float = 0.0) -> Iterator[RecordingScp]:
    """Serve Verification and all Storage SOP classes (every transfer syntax pynetdicom knows) over
    TLS 1.2+ on 127.0.0.1, client certificate REQUIRED, with the PKI's localhost server identity
    (or ``tls``); ``crl=True`` also checks clients against ``issuing-ca.crl.pem`` (or that CRL
    path). Stored datasets are kept in memory, or written to ``out_dir`` as received.
    ``require_called_aet``: associations calling another AE title than ``ae_title`` are rejected.
    ``store_delay``: each C-STORE is answered that many seconds after its instance was kept."""
    if tls is None:
        if pki_dir is None:
            raise TypeError("tls_scp needs pki_dir or tls")
        tls = TlsServerFiles.from_pki(Path(pki_dir), crl=crl)
    with _serve(ssl_context=tls.ssl_context(require_client_cert=True), port=port, ae_title=ae_title,
                out_dir=out_dir, require_called_aet=require_called_aet, store_delay=store_delay) as scp:
        yield scp


@contextlib.contextmanager
def plain_scp(*, port: int | None = None, ae_title: str = "PYNETDICOM",
              out_dir: Path | None = None) -> Iterator[RecordingScp]:
    """The same recording SCP without TLS, as a baseline."""
    with _serve(ssl_context=None, port=port, ae_title=ae_title, out_dir=out_dir) as scp:
        yield scp


SCU_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit)


def associate(port: int, *, tls: TlsClientFiles | None = None, sop_classes: Iterable[str] = (),
              transfer_syntaxes: Iterable[str] = SCU_TRANSFER_SYNTAXES, calling_ae: str = "PYNETDICOM-SCU",
              called_ae: str = "ANY-SCP", server_hostname: str = "localhost", username: str | None = None,
              host: str = LOOPBACK) -> Association:
    """A pynetdicom SCU association (TCP_NODELAY set) proposing Verification and, for each of
    ``sop_classes``, one presentation context per transfer syntax (so a file goes out in its own
    transfer syntax); TLS 1.2+ with ``tls`` (server verified against its CA bundle and
    ``server_hostname``; client certificate if ``tls`` has one). ``username`` adds User Identity
    type 1. Check ``.is_established``; release it when done."""
    ae = AE(calling_ae)
    ae.add_requested_context(Verification)
    syntaxes = list(transfer_syntaxes)
    for sop_class in dict.fromkeys(sop_classes):
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
    ext_neg = []
    if username is not None:
        user_identity = UserIdentityNegotiation()
        user_identity.user_identity_type = USERNAME
        user_identity.primary_field = username.encode()
        ext_neg.append(user_identity)
    tls_args = (tls.ssl_context(), server_hostname) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args, ext_neg=ext_neg or None,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    keep_responses_for_the_waiting_request(assoc)
    sock = getattr(assoc.dul.socket, "socket", None)
    if not assoc.is_established and sock is not None:
        # pynetdicom 3.0 leaves the socket open when the peer reset the connection (e.g. the server
        # refused our certificate after a TLS 1.3 handshake): its shutdown() fails, close() is skipped.
        sock.close()
    return assoc


def echo(port: int, called_ae: str = "ANY-SCP") -> bool:
    """One C-ECHO through ``port`` (plain DICOM, as an application speaks to the agent): True when
    the association was accepted and the echo succeeded."""
    association = associate(port, sop_classes=[Verification], called_ae=called_ae)
    if not association.is_established:
        return False
    ok = association.send_c_echo().Status == 0
    association.release()
    return ok
