"""RELP framing and session state (agent/audit/relp.py), sans I/O: frames survive any split of
the byte stream, responses are matched to their transactions, the window is respected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_card_agent.audit.relp import (
    MAX_TXNR,
    Acknowledged,
    Frame,
    FrameParser,
    Opened,
    Refused,
    RelpProtocolError,
    RelpSession,
    ServerClosed,
    encode,
    parse_response,
)

frames = st.builds(Frame, st.integers(0, MAX_TXNR), st.text("abcdefghijklmnopqrstuvwxyzXYZ", min_size=1, max_size=32),
                   st.binary(max_size=300))


def test_encoding_matches_the_relp_specification():
    assert encode(Frame(1, "open", b"relp_version=0")) == b"1 open 14 relp_version=0\n"
    assert encode(Frame(7, "close")) == b"7 close 0\n"
    assert encode(Frame(2, "syslog", b"<85>1 x")) == b"2 syslog 7 <85>1 x\n"


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(1, 50), max_size=20))
def test_any_split_of_the_stream_gives_the_same_frames(sent: list[Frame], cuts: list[int]):
    stream = b"".join(encode(f) for f in sent)
    parser, got, position = FrameParser(), [], 0
    for cut in cuts:
        got += parser.feed(stream[position:position + cut])
        position += cut
    got += parser.feed(stream[position:])
    assert got == sent


@pytest.mark.parametrize("garbage", [b"x rsp 6 200 OK\n", b"1 rsp 3 200 OK\n", b"1 rsp 0 junk\n",
                                     b"1 r$p 2 ok\n", b"1" * 80])
def test_garbage_is_a_protocol_error(garbage: bytes):
    with pytest.raises(RelpProtocolError):
        FrameParser().feed(garbage)


def test_responses_parse():
    assert parse_response(b"200 OK") == parse_response(b"200 OK")
    response = parse_response(b"200 OK\nrelp_version=0\ncommands=syslog")
    assert (response.code, response.text, response.data) == (200, "OK", b"relp_version=0\ncommands=syslog")
    assert not parse_response(b"500 error: no space").ok
    with pytest.raises(RelpProtocolError):
        parse_response(b"OK")


def rsp(txnr: int, text: bytes = b"200 OK") -> bytes:
    return encode(Frame(txnr, "rsp", text))


def test_a_session_opens_sends_within_its_window_and_matches_answers():
    session = RelpSession(window=3)
    assert session.open().startswith(b"1 open ")
    assert not session.can_send()
    assert session.receive(rsp(1, b"200 OK\nrelp_version=0")) == [Opened(parse_response(b"200 OK\nrelp_version=0"))]
    sent = [session.syslog(b"m%d" % key, key) for key in (10, 11, 12)]
    assert sent[0] == b"2 syslog 3 m10\n" and not session.can_send()
    with pytest.raises(RelpProtocolError):
        session.syslog(b"m13", 13)
    # answers may come in any split and any order; each names its message by its key
    events = session.receive(rsp(3)[:4]) + session.receive(rsp(3)[4:] + rsp(2))
    assert events == [Acknowledged(11), Acknowledged(10)]
    assert session.unacknowledged == [12] and session.can_send()
    refused = session.receive(rsp(4, b"500 no space"))
    assert refused == [Refused(12, "syslog", parse_response(b"500 no space"))]
    with pytest.raises(RelpProtocolError, match="not sent"):
        session.receive(rsp(4))
    assert session.receive(b"0 serverclose 0\n") == [ServerClosed()]
    assert session.close() == b"5 close 0\n"
    assert session.receive(encode(Frame(5, "rsp"))) == [ServerClosed()]


def test_transaction_numbers_wrap_to_one():
    session = RelpSession(window=5, first_txnr=MAX_TXNR)
    session.open()
    session.receive(rsp(MAX_TXNR))
    assert session.syslog(b"x", 1).startswith(b"1 syslog ")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 20), st.lists(st.integers(0, 1000), max_size=60), st.randoms())
def test_every_message_is_acknowledged_or_still_unacknowledged(window: int, keys: list[int], random):
    """Model: whatever order the server answers in, acknowledged + unacknowledged = sent, and no
    more than ``window`` wait at any time."""
    session = RelpSession(window=window)
    session.open()
    session.receive(rsp(1))
    keys = list(dict.fromkeys(keys))
    waiting: dict[int, int] = {}  # txnr -> key
    acknowledged: list[int] = []
    for key in keys:
        while not session.can_send():
            txnr = random.choice(list(waiting))
            acknowledged += [e.key for e in session.receive(rsp(txnr)) if isinstance(e, Acknowledged)]
            del waiting[txnr]
        frame = FrameParser().feed(session.syslog(b"%d" % key, key))[0]
        waiting[frame.txnr] = key
        assert len(session.unacknowledged) <= window
    assert sorted(acknowledged + session.unacknowledged) == sorted(keys)
