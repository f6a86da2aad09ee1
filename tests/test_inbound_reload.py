"""An inbound listener's allow_from narrowed by a reload, while a PACS it no longer admits has a
connection waiting for its first bytes: that PACS's address was judged at accept time, under the
old configuration, and the new card session served it (an Association Begin recorded as a success
for a node the admin had just removed). Real agent, SoftHSM, a TLS PACS client, DCMTK storescp as
the workstation's SCP."""

from __future__ import annotations

import os
import signal
import socket
import ssl
from pathlib import Path

from agent_runner import accept_queue, inbound_listener, port_of, running_agent, wait_for, write_config
from conftest import ProvisionedPki
from peers.dcmtk import storescp, storescu
from peers.study import assert_delivered, make_study
from test_inbound import THE_PACS, node_identity, pacs_identity

REMOVED_NODE = "127.0.0.2"


def test_a_connection_waiting_when_allow_from_is_narrowed_is_judged_by_the_new_list(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    study = make_study(tmp_path / "study", files=2)
    with storescp(tmp_path / "viewer", tls=None) as viewer:
        listener = inbound_listener("retrieves", f"127.0.0.1:{viewer.port}", **THE_PACS, **node_identity(test_pki),
                                    allow_from=["127.0.0.0/8"])
        with running_agent(test_pki, tmp_path / "agent", [], inbound=[listener]) as agent:
            agent.wait_for_log("event=sign-in ")
            waiting = socket.create_connection(("127.0.0.1", port_of(listener)), timeout=15,
                                               source_address=(REMOVED_NODE, 0))
            # accepted under the old list before the reload: a connection accepted during the reload's
            # sign-in again finds no card session and is turned away for that, not for its address
            wait_for(lambda: accept_queue(port_of(listener)) == 0)
            write_config(tmp_path / "agent" / "agent.toml", test_pki, [],
                         inbound=[{**listener, "allow_from": ["127.0.0.1"]}])
            os.kill(agent.process.pid, signal.SIGHUP)
            # the reload ends the card session ([[inbound]] changed) and signs in again, all within
            # the few seconds the waiting connection has for its first bytes
            agent.wait_for_log("[[inbound]] changed")
            wait_for(lambda: agent.log().count("event=sign-in ") == 2, timeout=4)
            context = pacs_identity(test_pki).ssl_context()
            try:
                with context.wrap_socket(waiting, server_hostname="localhost") as pacs:
                    pacs.sendall(b"\x01\x00")  # no A-ASSOCIATE-RQ is needed: the handshake must not happen
                    answer = pacs.recv(1)
            except (ssl.SSLError, OSError):
                answer = b""
            finally:
                waiting.close()
            log = agent.wait_for_log(f"closed a connection from {REMOVED_NODE} before TLS: its address is not in "
                                     "allow_from")
            result = storescu(port_of(listener), study, tls=pacs_identity(test_pki), calling_ae="PACS")
            agent.wait_for_log("instances stored", timeout=40)
        received = viewer.stored_files()
    assert answer == b"", log
    assert result.returncode == 0, result.stdout  # the PACS the list still names is served
    assert_delivered(study, received)
