"""Messages between the supervisor and a card-session process (agent/session/channel.py), over a
real SOCK_SEQPACKET pair: a message longer than one record arrives whole, descriptors included."""

from __future__ import annotations

import os
import threading
import time

import pytest

from dicom_card_agent.session import channel as messages
from dicom_card_agent.session import supervisor


def test_a_message_longer_than_the_socket_buffer_arrives_whole_with_its_descriptors() -> None:
    ours, theirs = messages.channel_pair()
    ours.settimeout(10)  # a message that never comes whole fails the test instead of hanging it
    read_end, write_end = os.pipe()
    big = {"type": "card", "identities": ["x" * 1000] * 1200}  # ~1.2 MB, six times the send buffer
    sender = threading.Thread(target=messages.send, args=(theirs, big, [write_end]))
    sender.start()
    fds: list[int] = []
    try:
        message, fds = messages.receive(ours, limit=messages.MAX_CARD_MESSAGE)
        sender.join(10)
        assert message == big and len(fds) == 1
        os.write(fds[0], b"!")
        assert os.read(read_end, 1) == b"!"
        messages.send(theirs, {"type": "status"})  # the next message is read as it was sent
        assert messages.receive(ours) == ({"type": "status"}, [])
    finally:
        for fd in (read_end, write_end, *fds):
            os.close(fd)
        ours.close()
        theirs.close()


def test_a_message_over_the_receivers_limit_is_refused_by_its_size_and_the_next_one_is_read() -> None:
    ours, theirs = messages.channel_pair()
    ours.settimeout(10)
    sender = threading.Thread(target=messages.send, args=(theirs, {"type": "status", "pad": "y" * 100_000}))
    sender.start()
    try:
        with pytest.raises(messages.MessageTooLargeError, match=r"a message of 1000\d\d bytes, over the 65536"):
            messages.receive(ours)
        sender.join(10)
        messages.send(theirs, {"type": "end"})  # the channel is still in step: the refused one was read to its end
        assert messages.receive(ours) == ({"type": "end"}, [])
    finally:
        ours.close()
        theirs.close()


def test_a_non_blocking_reader_waits_for_the_parts_behind_a_header() -> None:
    """The supervisor skips late answers without blocking: a long one must not be cut at its header."""
    ours, theirs = messages.channel_pair()
    ours.setblocking(False)
    long_answer = {"type": "status", "tunnels": {f"t{n}": {"x": "z" * 900} for n in range(100)}}  # ~95 KB
    header_sent = threading.Event()
    original = theirs.sendall

    def slow_parts(data: bytes) -> None:  # the parts leave 0.3 s after the header, as under load
        if header_sent.is_set():
            time.sleep(0.3)
        original(data)
        header_sent.set()
    sender = threading.Thread(target=messages.send, args=(_Sending(theirs, slow_parts), long_answer))
    sender.start()
    try:
        header_sent.wait(5)
        assert messages.receive(ours, limit=messages.MAX_CARD_MESSAGE) == (long_answer, [])
        assert ours.gettimeout() == 0.0  # non-blocking again
    finally:
        sender.join(10)
        ours.close()
        theirs.close()


class _Sending:
    """The sender's socket, its sendall delayed by ``sendall`` (to inject the delay a loaded machine
    gives, which a socket cannot be asked for)."""

    def __init__(self, sock, sendall) -> None:  # type: ignore[no-untyped-def]
        self._sock = sock
        self.sendall = sendall


REFUSAL = {"type": "error", "plain": True, "message": "stopped before reading the card: it is being traced by pid 7"}


@pytest.mark.parametrize("asked_first", [True, False], ids=["asked, then it answered and went",
                                                            "it answered and went, then asked"])
def test_the_answer_of_a_process_that_went_without_reading_the_question_is_read(asked_first: bool) -> None:
    """The card-session process that finds itself traced sends its refusal and exits at once,
    without reading the probe's question. The kernel reports that close before the answer (EPIPE to
    the question's send, ECONNRESET to the read when the question went unread), and the supervisor
    told "it exited (Connection reset by peer)" instead of the refusal. The process is scripted here:
    which of the two orders a real one takes depends on the machine's scheduling."""
    ours, theirs = messages.channel_pair()
    try:
        if asked_first:
            messages.send(ours, {"type": "probe"})
        messages.send(theirs, REFUSAL)
        theirs.close()
        assert supervisor.ask(ours, {"type": "probe"} if not asked_first else None) == REFUSAL
    finally:
        ours.close()


def test_a_process_that_went_without_an_answer_is_told_as_gone() -> None:
    ours, theirs = messages.channel_pair()
    try:
        messages.send(ours, {"type": "probe"})
        theirs.close()
        assert supervisor.ask(ours, None) == {
            "type": "error", "message": "it exited (Connection reset by peer); see the lines above", "died": True}
    finally:
        ours.close()
