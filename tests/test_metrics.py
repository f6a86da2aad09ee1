"""[metrics]: a real agent relays a real association to a pynetdicom PACS over TLS, is scraped over
HTTP (loopback TCP and a unix socket) and through its textfile, and promtool checks what it serves."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from agent_runner import (
    NOBODY,
    agent_status,
    card_session_pid,
    running_agent,
    stop_process,
    tunnel,
    wait_for,
    write_config,
)
from conftest import ProvisionedPki, run_card_agent
from peers.ports import free_port
from peers.pynetdicom_scp import associate, echo, tls_scp


def promtool_check(text: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (Debian package prometheus; scripts/setup installs it)")
        pytest.skip("promtool is not installed")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by (name, sorted labels)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_all(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=15) as response:
        return samples(response.read().decode())


def value(scraped: dict, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def test_a_scrape_after_an_association_counts_it_and_passes_promtool(test_pki: ProvisionedPki,
                                                                     tmp_path: Path) -> None:
    port = free_port()
    textfile = tmp_path / "textfile" / "card-agent.prom"
    textfile.parent.mkdir()
    metrics = {"listen": f"127.0.0.1:{port}", "textfile": str(textfile), "textfile_interval": 0.2}
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port), tunnel("down", free_port())],
                           metrics=metrics) as agent:
            assert echo(agent.port("pacs"))
            assert not echo(agent.port("down"))  # nobody listens there: failed, connect
            wait_for(lambda: agent.log().count("tunnel pacs: ") >= 1 and "tunnel down: " in agent.log())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                content_type = response.headers["Content-Type"]
                text = response.read().decode()
            status = agent_status(tmp_path / "agent", test_pki.env())
            wait_for(lambda: textfile.exists())
            written = textfile.read_text()
            assert f"metrics: serving on 127.0.0.1:{port}" in agent.log()
        assert not textfile.exists()  # a stopped agent leaves no numbers that look current
    assert content_type.startswith("text/plain; version=0.0.4")
    checked = promtool_check(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    assert promtool_check(written).returncode == 0

    scraped = samples(text)
    pacs_labels = {"listener": "pacs", "kind": "tunnel"}
    since_start = status["tunnels"][0]["since_start"]
    assert value(scraped, "card_agent_associations_total", **pacs_labels, outcome="accepted", reason="") == 1
    assert value(scraped, "card_agent_associations_total", listener="down", kind="tunnel", outcome="failed",
                 reason="connect") == 1
    assert value(scraped, "card_agent_handshakes_total", **pacs_labels, type="full") == 1
    assert value(scraped, "card_agent_handshakes_total", **pacs_labels, type="resumed") == 0
    assert value(scraped, "card_agent_bytes_total", **pacs_labels, direction="up") == since_start["bytes_up"] > 0
    assert value(scraped, "card_agent_bytes_total", **pacs_labels, direction="down") == since_start["bytes_down"] > 0
    assert value(scraped, "card_agent_handshake_duration_seconds_count", **pacs_labels) == 1
    assert value(scraped, "card_agent_token_signature_duration_seconds_count", **pacs_labels) == 1
    assert 0 < value(scraped, "card_agent_token_signature_duration_seconds_sum", **pacs_labels) \
        <= value(scraped, "card_agent_handshake_duration_seconds_sum", **pacs_labels)
    assert value(scraped, "card_agent_handshake_duration_seconds_bucket", **pacs_labels, le="+Inf") == 1
    assert value(scraped, "card_agent_signed_in") == 1
    alice = x509.load_pem_x509_certificate((test_pki.pki / "clients" / "alice.pem").read_bytes())
    assert value(scraped, "card_agent_certificate_expiry_timestamp_seconds") == alice.not_valid_after_utc.timestamp()
    assert value(scraped, "card_agent_card_state", state="signed_in") == 1
    assert value(scraped, "card_agent_card_state", state="no_card") == 0
    assert value(scraped, "card_agent_card_events_total", event="sign-in") == 1
    assert value(scraped, "card_agent_card_events_total", event="sign-out") == 0
    assert value(scraped, "process_open_fds") > 0
    assert value(scraped, "process_resident_memory_bytes") > 0


def test_metrics_on_a_unix_socket_count_what_was_turned_away(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    path = tmp_path / "metrics" / "metrics.sock"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="nobody",
                       identity={"pin": "env:CARD_PIN"}, metrics={"listen": f"unix:{path}"},
                       audit={"file": str(tmp_path / "audit.log")}) as agent:
        assert not echo(agent.port())  # no such card: turned away by the supervisor
        assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
        text = unix_get(path, "/metrics")
    checked = promtool_check(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    scraped = samples(text)
    assert value(scraped, "card_agent_rejections_total", listener="pacs", kind="tunnel", reason="no_card") == 1
    assert value(scraped, "card_agent_signed_in") == 0
    assert not [key for key in scraped if key[0] == "card_agent_certificate_expiry_timestamp_seconds"]
    assert value(scraped, "card_agent_audit_messages_waiting") == 0
    assert not path.exists()


# Connects to the metrics port and sends nothing; prints the seconds until the agent cut it off.
SILENT_SCRAPER = textwrap.dedent("""
    import socket, sys, time
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print("connected", flush=True)
    sock.settimeout(60)
    started = time.monotonic()
    try:
        sock.recv(1)
    except OSError:
        pass
    print(f"{time.monotonic() - started:.1f}", flush=True)
""")


def test_a_client_that_sends_nothing_holds_neither_scrapes_nor_the_stop(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """Another local user connects to the loopback metrics port and sends nothing. The endpoint served
    one request at a time without a deadline: every later scrape waited, and SIGTERM left the agent
    running (its card session still relaying as the clinician) until that user let go."""
    port = free_port()
    silent = [*NOBODY, SILENT_SCRAPER, str(port)]
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                          metrics={"listen": f"127.0.0.1:{port}"}) as agent, \
            subprocess.Popen(silent, stdout=subprocess.PIPE, text=True, cwd="/") as first, \
            subprocess.Popen(silent, stdout=subprocess.PIPE, text=True, cwd="/") as second:
        try:
            assert first.stdout is not None and second.stdout is not None
            assert first.stdout.readline() == "connected\n"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                assert response.status == 200
            cut_off_after = float(first.stdout.readline())
            assert second.stdout.readline() == "connected\n"
            agent.process.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert agent.process.wait(5) == 0
            stopped_in = time.monotonic() - started
        finally:
            first.kill()
            second.kill()
    assert 2 <= cut_off_after < 4  # its request did not arrive within 2 s (docs/configuration.md, [metrics])
    assert stopped_in < 5


def unix_get(path: Path, target: str) -> str:
    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(path))

    connection = UnixConnection("localhost")
    connection.request("GET", target)
    response = connection.getresponse()
    assert response.status == 200
    return response.read().decode()


@pytest.mark.parametrize("table, message", [
    ({}, "[metrics]: set listen (e.g. \"127.0.0.1:9464\" or \"unix:/run/user/1000/card-agent-metrics.sock\"), "
         "textfile, or both; or remove the [metrics] table"),
    ({"textfile": "/tmp/card-agent.txt"}, "[metrics].textfile: 'card-agent.txt' must end in .prom (node_exporter "
                                          "reads only those)"),
    ({"listen": "127.0.0.1"}, "[metrics].listen: '127.0.0.1' is not HOST:PORT (IPv6 as [::1]:PORT)"),
])
def test_a_wrong_metrics_table_is_named(test_pki: ProvisionedPki, tmp_path: Path, table: dict, message: str) -> None:
    from agent_runner import write_config

    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())], metrics=table)
    result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2
    assert result.stderr == f"card-agent: error: {config} {message}\n"


def test_a_metrics_port_in_use_is_named(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        from agent_runner import write_config

        config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                              metrics={"listen": f"127.0.0.1:{port}"})
        started = time.monotonic()
        result = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN="123456"))
    assert result.returncode == 2, result.stderr
    assert (f"card-agent: error: {config} [metrics].listen: cannot listen on 127.0.0.1:{port}: "
            "Address already in use\n") == result.stderr.splitlines(keepends=True)[-1]
    assert time.monotonic() - started < 30


def test_the_age_of_the_oldest_audit_message_waiting_is_exported(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The gauge an admin alerts on when the audit repository has been away too long; it was never
    exported (the trail's status did not say the age)."""
    port = free_port()
    audit = {"spool": str(tmp_path / "spool"),
             "syslog": {"address": f"127.0.0.1:{free_port()}", "ca": str(test_pki.ca_bundle),
                        "server_name": "localhost"}}  # nobody listens there: Application Start waits
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], audit=audit,
                       metrics={"listen": f"127.0.0.1:{port}"}):
        time.sleep(2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            scraped = samples(response.read().decode())
    assert value(scraped, "card_agent_audit_messages_waiting") >= 1
    assert 2 <= value(scraped, "card_agent_audit_oldest_waiting_age_seconds") < 30


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The counter and histogram samples of a scrape (what must never go down), by name and labels."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) if family.type in ("counter", "histogram")
            for sample in family.samples if not sample.name.endswith("_created")}


def decreases(scrapes: list[dict]) -> list[str]:
    """Every counter that went down from one scrape to the next."""
    found = []
    for before, after in pairwise(scrapes):
        found += [f"{key}: {before[key]} -> {number}" for key, number in after.items()
                  if key in before and number < before[key]]
    return found


class Scraper:
    """Scrapes the agent's metrics over and over, in a thread of its own, as a Prometheus would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.scrapes: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def scrape(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=15) as response:
            return counters(response.read().decode())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.scrapes.append(self.scrape())

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_counters_never_go_down_while_a_card_session_that_does_not_answer_is_ended(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Ending a card session moves its counts into the totals since start. The session used to
    leave the counts before its counts reached the totals: for a process that does not answer (here
    stopped with SIGSTOP, as one stuck in a module call), 4 s during which every scrape saw its
    associations gone; a stuck process that was still signed in was not counted at all."""
    port = free_port()
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           metrics={"listen": f"127.0.0.1:{port}"}) as agent:
            assert all(echo(agent.port()) for _ in range(3))
            accepted = ("card_agent_associations_total",
                        (("kind", "tunnel"), ("listener", "pacs"), ("outcome", "accepted"), ("reason", "")))
            scraper = Scraper(port)
            wait_for(lambda: scraper.scrape()[accepted] == 3)
            scraper.scrapes.append(scraper.scrape())  # signed in and answering: the counts to keep
            worker = card_session_pid(agent.process.pid)
            assert worker is not None
            os.kill(worker, signal.SIGSTOP)
            try:
                with scraper:
                    time.sleep(3)  # signed in, its process silent: the status questions go unanswered
                    silent_status = agent_status(tmp_path / "agent", test_pki.env())
                    silent = len(scraper.scrapes)
                    run_card_agent("lock", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                   check=True)  # returns once the session has ended: 4 s, then it is killed
                    agent.wait_for_log('event=sign-out reason="locked"')
                    ending = len(scraper.scrapes) - silent
                    time.sleep(0.5)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker, signal.SIGKILL)
            status = agent_status(tmp_path / "agent", test_pki.env())
    assert silent >= 2 and ending >= 3, (silent, ending)  # scrapes while it was silent and while it ended
    assert decreases(scraper.scrapes) == []
    assert {scrape[accepted] for scrape in scraper.scrapes} == {3.0}
    assert silent_status["state"] == "signed in"
    assert silent_status["tunnels"][0]["since_start"]["associations"]["accepted"] == 3
    assert status["state"] == "locked: remove and re-insert the card to sign in again"
    assert status["tunnels"][0]["since_start"]["associations"]["accepted"] == 3


def test_counters_of_a_tunnel_changed_in_place_by_a_reload_go_on(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A SIGHUP that changes a tunnel (here its PACS) gives it new counters in the card session,
    which goes on: the counts of what the tunnel carried before are kept, in the session's counts
    and so in the totals since start."""
    port = free_port()
    metrics = {"listen": f"127.0.0.1:{port}"}
    with tls_scp(pki_dir=test_pki.pki) as pacs, tls_scp(pki_dir=test_pki.pki) as other_pacs:
        pacs_tunnel = tunnel("pacs", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [pacs_tunnel], metrics=metrics) as agent:
            assert echo(agent.port()) and echo(agent.port())
            accepted = ("card_agent_associations_total",
                        (("kind", "tunnel"), ("listener", "pacs"), ("outcome", "accepted"), ("reason", "")))
            scraper = Scraper(port)
            wait_for(lambda: scraper.scrape()[accepted] == 2)
            write_config(tmp_path / "agent" / "agent.toml", test_pki,
                         [{**pacs_tunnel, "remote": f"127.0.0.1:{other_pacs.port}"}], metrics=metrics)
            agent.process.send_signal(signal.SIGHUP)
            agent.wait_for_log("card session: configuration reloaded: tunnels now pacs")
            after_reload = scraper.scrape()
            assert after_reload[accepted] == 2  # not 0: the counts of the tunnel as it was are kept
            assert echo(agent.port())
            wait_for(lambda: scraper.scrape()[accepted] == 3)
            status = agent_status(tmp_path / "agent", test_pki.env())
            log = agent.log()
    assert "event=sign-out" not in log  # the same card session throughout
    assert status["tunnels"][0]["this_session"]["associations"]["accepted"] == 3
    assert status["tunnels"][0]["since_start"]["associations"]["accepted"] == 3


def test_an_association_open_on_a_tunnel_a_reload_removed_is_still_shown_open(test_pki: ProvisionedPki,
                                                                             tmp_path: Path) -> None:
    """A reload that removes a tunnel ends none of its associations, which go on; but the metrics and
    `status` listed only the tunnels of the new configuration: open_connections said 0 while a study
    still went through, and an admin restarting "when no connection is open" would have cut it."""
    port = free_port()
    metrics = {"listen": f"127.0.0.1:{port}"}
    open_here = ("card_agent_open_connections", (("kind", "retired"), ("listener", "pacs")))
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], metrics=metrics) as agent:
            association = associate(agent.port(), sop_classes=["1.2.840.10008.1.1"])
            assert association.is_established
            write_config(tmp_path / "agent" / "agent.toml", test_pki, [tunnel("other", pacs.port)], metrics=metrics)
            agent.process.send_signal(signal.SIGHUP)
            agent.wait_for_log("card session: configuration reloaded: tunnels now other")
            assert association.send_c_echo().Status == 0  # it goes on
            during = scrape_all(port)
            status = agent_status(tmp_path / "agent", test_pki.env())
            text = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env()).stdout
            association.release()
            wait_for(lambda: scrape_all(port)[open_here] == 0)
    assert during[open_here] == 1
    assert [(r["name"], r["open_connections"]) for r in status["retired"]] == [("pacs", 1)]
    assert "tunnel pacs (removed by a reload): 1 open until they end" in text.splitlines()


# Run as another user: keeps 20 idle connections to the metrics port, re-opening each one the agent
# closes, for SECONDS (tests the reviewer's hold16.py, uid 65534, blinding every scrape).
IDLE_FLOOD = textwrap.dedent("""
    import socket, sys, time
    port, seconds = int(sys.argv[1]), float(sys.argv[2])
    end, held = time.monotonic() + seconds, []
    while time.monotonic() < end:
        alive = []
        for sock in held:
            try:
                if sock.recv(1) == b"":
                    sock.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                continue
            alive.append(sock)
        held = alive
        while len(held) < 20:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            sock.setblocking(False)
            held.append(sock)
        print(len(held), flush=True)
        time.sleep(0.1)
""")


def test_another_user_holding_idle_connections_does_not_blind_the_scraper(test_pki: ProvisionedPki,
                                                                         tmp_path: Path) -> None:
    """16 idle connections of uid 65534, re-opened as the agent cut them off, took every slot of the
    endpoint: each real scrape was closed unanswered for as long as that went on."""
    port = free_port()
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                       metrics={"listen": f"127.0.0.1:{port}"}), \
            subprocess.Popen([*NOBODY, IDLE_FLOOD, str(port), "30"], stdout=subprocess.PIPE, text=True,
                             cwd="/") as flood:
        try:
            assert flood.stdout is not None and flood.stdout.readline() == "20\n"  # all connected
            time.sleep(1)  # accepted by the agent, holding what slots they get
            answers = []
            for _ in range(6):  # across the cut-offs of the idle connections and their re-opening
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                        answers.append(str(response.status))
                except (OSError, http.client.HTTPException) as error:
                    answers.append(type(error).__name__)
                time.sleep(1)
            still_flooding = flood.poll() is None
        finally:
            flood.kill()
    assert still_flooding
    assert answers == ["200"] * 6


def test_an_unanswering_card_session_is_not_shown_with_0_open(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """An association is open; the card-session process stops answering (SIGSTOP, as a process stuck
    in a module call). Metrics and `status` said 0 open connections, which an admin waiting for 0
    before a restart takes as "nothing in flight"."""
    port = free_port()
    open_pacs = ("card_agent_open_connections", (("kind", "tunnel"), ("listener", "pacs")))
    answering = ("card_agent_card_session_answering", ())
    config = tmp_path / "agent" / "agent.toml"
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           metrics={"listen": f"127.0.0.1:{port}"}) as agent:
            association = associate(agent.port(), sop_classes=["1.2.840.10008.1.1"])
            assert association.is_established
            try:
                before = scrape_all(port)
                worker = card_session_pid(agent.process.pid)
                assert worker is not None
                stop_process(worker)
                try:
                    silent = scrape_all(port)
                    text = run_card_agent("status", "--config", config, env=test_pki.env(), check=True).stdout
                    status = agent_status(tmp_path / "agent", test_pki.env())
                finally:
                    os.kill(worker, signal.SIGCONT)
                wait_for(lambda: scrape_all(port).get(open_pacs) == 1)
                after = scrape_all(port)
            finally:
                association.release()
    assert (before[open_pacs], before[answering]) == (1, 1)
    assert (silent.get(open_pacs), silent[answering]) == (None, 0)
    assert (after[open_pacs], after[answering]) == (1, 1)
    relayed = [key for key in before if key[0] in ("card_agent_bytes_total", "card_agent_associations_total")]
    assert [silent[key] for key in relayed] == [before[key] for key in relayed]  # the counts it last gave
    lines = text.splitlines()
    assert ("card session: did not answer: its open connections and traffic are unknown, not 0; the log says "
            "since when") in lines, text
    assert (f"tunnel pacs: 127.0.0.1:{agent.port()} -> 127.0.0.1:{pacs.port}, open connections unknown (the card "
            "session did not answer)") in lines, text
    assert status["card_session_answering"] is False
    tunnel_status = status["tunnels"][0]
    assert (tunnel_status["open_connections"], tunnel_status["bytes_up"], tunnel_status["this_session"]) == \
        (None, None, None)


def written_at(textfile: Path) -> float:
    return value(samples(textfile.read_text()), "card_agent_textfile_written_timestamp_seconds")


def test_the_textfile_of_a_killed_agent_tells_its_age(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Killed (systemd's watchdog SIGABRT, the OOM killer), the agent cannot remove its textfile,
    which went on saying "signed in" with nothing to tell it from a running agent's."""
    textfile = tmp_path / "textfile" / "card-agent.prom"
    textfile.parent.mkdir()
    interval = 0.2
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                       metrics={"textfile": str(textfile), "textfile_interval": interval}) as agent:
        wait_for(textfile.exists)
        first = written_at(textfile)
        wait_for(lambda: written_at(textfile) > first)  # rewritten: the time moves on
        fresh = time.time() - written_at(textfile)
        os.killpg(agent.process.pid, signal.SIGKILL)  # the supervisor and its card-session process
        agent.process.wait(10)
        left = written_at(textfile)
        time.sleep(10 * interval)
        stale = time.time() - written_at(textfile)
        checked = promtool_check(textfile.read_text())
    assert 0 <= fresh < 5
    assert written_at(textfile) == left  # nobody writes it any more
    assert stale > 3 * interval  # what the documented alert compares (docs/deployment.md, "Metrics")
    assert value(samples(textfile.read_text()), "card_agent_signed_in") == 1  # the dead agent's last word
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")


def test_the_documented_stale_textfile_alert_fires_once_the_file_is_no_longer_written(tmp_path: Path) -> None:
    """The rule docs/deployment.md gives, as written there, on node_exporter's samples of a textfile
    written 10 s before each scrape until its agent is killed after the 3 minutes' scrape."""
    promtool_check("")  # skips without promtool
    deployment = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    rule = deployment.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "alert: CardAgentTextfileStale" in rule
    (tmp_path / "rules.yml").write_text(rule)
    (tmp_path / "test.yml").write_text(textwrap.dedent("""
        rule_files: [rules.yml]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'card_agent_textfile_written_timestamp_seconds{instance="ws1:9100"}'
                values: '-10+60x3 170x10'
            alert_rule_test:
              - eval_time: 3m
                alertname: CardAgentTextfileStale
                exp_alerts: []
              - eval_time: 6m
                alertname: CardAgentTextfileStale
                exp_alerts:
                  - exp_labels: {instance: "ws1:9100"}
                    exp_annotations:
                      summary: "SUMMARY"
    """).replace("SUMMARY", "ws1:9100: the card agent has not written its metrics for 3m 10s: it is not running, its "
                            "card_agent_* values are stale"))
    result = subprocess.run(["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
