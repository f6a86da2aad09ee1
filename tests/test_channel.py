"""Messages between the supervisor and a card-session process (agent/session/channel.py), over a
real SOCK_SEQPACKET pair: a message longer than one record arrives whole, descriptors included."""

from __future__ import annotations

import contextlib
import os
import threading

import pytest

from dicom_card_agent.session import channel as messages


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


def test_a_message_over_the_receivers_limit_is_refused_by_its_size() -> None:
    ours, theirs = messages.channel_pair()
    def send_too_much() -> None:
        with contextlib.suppress(OSError):  # the receiver stops reading: the rest has nowhere to go
            messages.send(theirs, {"type": "status", "pad": "y" * 100_000})
    sender = threading.Thread(target=send_too_much)
    sender.start()
    try:
        with pytest.raises(messages.MessageTooLargeError, match=r"a message of 1000\d\d bytes, over the 65536"):
            messages.receive(ours)
    finally:
        ours.close()  # the sender, blocked on the parts no one reads, gets EPIPE
        sender.join(10)
        theirs.close()
