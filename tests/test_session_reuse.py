"""Which TLS session a tunnel keeps for the next association (TunnelRuntime.remember_session).

The connections here are stand-ins with the two attributes remember_session reads: a PACS that
accepts each TLS 1.3 ticket only once could not be made from the test peers (OpenSSL's s_server
and Python's ssl resume a ticket as often as it is offered), and that is the fault this covers.
Reading ``.session`` is counted, as each read leaks a copy in Python 3.11 (CPython gh-116810).
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field

from dicom_card_agent.config.model import ListenAddress, TunnelConfig
from dicom_card_agent.tunnel.relay import TunnelRuntime


@dataclass
class FakeSession:
    time: float = field(default_factory=time.time)
    timeout: int = 7200


class Connection:
    def __init__(self, reused: bool) -> None:
        self.session_reused = reused
        self.new_session = FakeSession()
        self.reads = 0

    @property
    def session(self) -> FakeSession:
        self.reads += 1
        return self.new_session


def runtime() -> TunnelRuntime:
    config = TunnelConfig(name="pacs", listen=ListenAddress("127.0.0.1", 11112), remote_host="127.0.0.1",
                          remote_port=2762, server_name="pacs")
    return TunnelRuntime(config=config, context=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), checks=None,  # type: ignore[arg-type]
                         identity=None, trust_ca="")  # type: ignore[arg-type]


def remember(tunnel: TunnelRuntime, reused: bool) -> Connection:
    connection = Connection(reused)
    tunnel.remember_session(connection)  # type: ignore[arg-type]
    return connection


def test_a_resumed_connection_keeps_the_session_of_the_full_handshake_without_reading_its_own() -> None:
    tunnel = runtime()
    full = remember(tunnel, reused=False)
    resumed = [remember(tunnel, reused=True) for _ in range(50)]
    assert full.reads == 1 and sum(c.reads for c in resumed) == 0
    assert tunnel.resumable_session() is full.new_session


def test_an_expired_ticket_is_replaced_by_the_next_full_handshake() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    for _ in range(3):
        remember(tunnel, reused=True)
    refused = remember(tunnel, reused=False)
    assert refused.reads == 1 and tunnel.resumable_session() is refused.new_session
    assert sum(remember(tunnel, reused=True).reads for _ in range(5)) == 0


def test_a_pacs_taking_each_ticket_once_gets_the_newest_ticket_every_time() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    remember(tunnel, reused=True)
    remember(tunnel, reused=False)  # the same ticket refused on its second use, well within its lifetime
    following = remember(tunnel, reused=True)
    assert following.reads == 1 and tunnel.resumable_session() is following.new_session


def test_a_ticket_refused_after_its_lifetime_is_no_sign_of_single_use_tickets() -> None:
    tunnel = runtime()
    first = remember(tunnel, reused=False)
    first.new_session.time -= 7300  # older than its 7200 s lifetime when the PACS refuses it
    remember(tunnel, reused=True)
    remember(tunnel, reused=False)
    assert remember(tunnel, reused=True).reads == 0


def test_forgetting_leaves_nothing_to_resume() -> None:
    tunnel = runtime()
    remember(tunnel, reused=False)
    tunnel.forget_sessions()
    assert tunnel.resumable_session() is None
