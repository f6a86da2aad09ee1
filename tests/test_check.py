"""`card-agent check`: a configuration and what it needs on this machine, without starting the
agent; exit 0 when all is well, 2 otherwise, one line per finding."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent_runner import inbound_listener, running_agent, tunnel, write_config
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki, run_card_agent
from peers.dns import DnsServer, resolving_through
from peers.netns import late_address
from peers.ports import free_port
from test_audit_failure import small_tmpfs
from test_inbound import node_identity


def findings(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("     fix: ")]


def test_a_good_configuration_passes_every_check(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listening_pacs:
        pacs = tunnel("pacs", listening_pacs.getsockname()[1])
        config = write_config(tmp_path / "agent.toml", test_pki, [pacs],
                              audit={"file": str(tmp_path / "log" / "audit.log")})
        result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = findings(result.stdout)
    assert [line.split(":")[0] for line in lines] == [
        "ok   config", "ok   openssl", "ok   pkcs11-provider", "ok   pkcs11-module", "ok   provider-loads",
        "ok   trust", "ok   crl", "ok   pin", "ok   listen pacs", "ok   remote pacs", "ok   audit file"], result.stdout
    assert f"ok   config: {config}: 1 tunnel(s), 0 inbound listener(s)" in lines
    assert f"ok   pin: {config} [identity].pin: the variable CARD_PIN is set" in lines
    assert f"ok   listen pacs: {pacs['listen']} is free" in lines
    assert f"ok   remote pacs: {pacs['remote']} accepts TCP connections (at {pacs['remote']})" in lines
    assert f"ok   audit file: {tmp_path}/log/audit.log can be created (in {tmp_path})" in lines


def test_every_problem_is_one_line_and_the_exit_is_2(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    try:
        config = write_config(tmp_path / "agent.toml", test_pki,
                              [tunnel("pacs", 104, listen=f"127.0.0.1:{port}")],
                              audit={"file": str(tmp_path / "a-file" / "audit.log")},
                              trust={"crl": [str(test_pki.pki / "server-chain.pem")]})
        env = {k: v for k, v in test_pki.env().items() if k != "CARD_PIN"}
        result = run_card_agent("check", "--config", config, env=env)
    finally:
        busy.close()
    assert result.returncode == 2, result.stdout + result.stderr
    failed = [line for line in findings(result.stdout) if line.startswith("fail")]
    assert failed[0].startswith(f"fail crl: {config} [trust].crl: CRL file {test_pki.pki / 'server-chain.pem'}")
    assert failed[1:] == [
        f"fail pin: {config} [identity].pin: the PIN variable CARD_PIN is not set or empty",
        f"fail listen pacs: tunnel pacs: cannot listen on 127.0.0.1:{port}: Address already in use",
        f"fail audit file: {tmp_path}/a-file/audit.log cannot be created: {tmp_path}/a-file is not a directory",
    ], result.stdout
    assert "     fix: set the variable in the agent's environment" in result.stdout


def test_a_configuration_error_is_the_one_finding(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.write_text(config.read_text().replace("remote = ", "remot = "))
    result = run_card_agent("check", "--config", config, env=test_pki.env())
    assert result.returncode == 2
    assert findings(result.stdout) == [
        f"fail config: {config} [[tunnel]] 'pacs': unknown key 'remot' (did you mean 'remote'?)"]


def test_the_ports_of_the_running_agent_of_this_configuration_count_as_its_own(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())]) as agent:
        result = run_card_agent("check", "--config", tmp_path / "agent" / "agent.toml",
                                env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 0, result.stdout
    assert f"ok   listen pacs: 127.0.0.1:{agent.port()}: the running agent of this configuration listens there" \
        in result.stdout


def test_a_pacs_name_that_does_not_resolve_fails_and_a_pacs_that_is_down_warns(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """What an association would meet on this machine, before rolling a configuration out: a name
    its DNS does not know is a setting to fix (exit 2); a PACS that refuses may be down for now."""
    with DnsServer({"pacs.card-agent.test": ["127.0.0.1"]}) as dns:
        down = free_port()
        config = write_config(tmp_path / "agent.toml", test_pki, [
            tunnel("typo", 104, remote="pacs.card-agnet.test:104"),
            tunnel("down", down, remote=f"pacs.card-agent.test:{down}")])
        result = subprocess.run([*resolving_through(dns, tmp_path), CARD_AGENT, "check", "--config", str(config)],
                                capture_output=True, text=True, env=test_pki.env(CARD_PIN=USER_PIN), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    remote_lines = [line for line in findings(result.stdout) if " remote " in line]
    assert remote_lines == [
        "fail remote typo: tunnel typo: cannot reach the PACS at pacs.card-agnet.test:104: its name does not resolve "
        "(Name or service not known); check the tunnel's remote and the workstation's DNS",
        f"warn remote down: tunnel down: cannot reach the PACS at pacs.card-agent.test:{down}: connection refused "
        "(is the PACS running and listening on that port?)"], result.stdout


@pytest.mark.parametrize("version", [4, 6])
def test_a_listen_address_this_machine_does_not_have_yet_warns(test_pki: ProvisionedPki, tmp_path: Path,
                                                               version: int) -> None:
    """The agent listens on it anyway (docs/configuration.md, [[inbound]] listen): not a failure,
    but worth a look where the network is up."""
    with late_address(version) as late:
        listener = inbound_listener("retrieves", "127.0.0.1:11112", listen=f"{late.listen}:104",
                                    allow_from=[late.address], client_names=["localhost"], **node_identity(test_pki))
        config = write_config(tmp_path / "agent.toml", test_pki, [], inbound=[listener])
        result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert (f"warn listen retrieves: inbound retrieves: {late.address} is not an address of this workstation now; "
            "the agent listens on it anyway, connections arrive once the network brings it up") \
        in findings(result.stdout), result.stdout


@pytest.mark.parametrize("on_failure, filled, status", [("refuse", True, "fail"), ("continue", True, "warn"),
                                                         ("refuse", False, "ok")])
def test_an_audit_file_system_short_of_the_trails_reserve(test_pki: ProvisionedPki, tmp_path: Path,
                                                          on_failure: str, filled: bool, status: str) -> None:
    """With [audit] on_failure = "refuse" the agent refuses every association while the audit
    file's file system has less than the trail's reserve free (agent/audit/trail.py); `check` said
    only "writable" and exit 0. A real, nearly full file system: a 3 MiB tmpfs with 2900 KiB taken."""
    with socket.create_server(("127.0.0.1", 0)) as listening_pacs, small_tmpfs(tmp_path / "disk", "3m") as disk:
        if filled:
            (disk / "filler").write_bytes(b"\0" * 2900 * 1024)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
        config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", listening_pacs.getsockname()[1])],
                              audit={"file": str(disk / "audit" / "audit.log"), "on_failure": on_failure})
        result = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    lines = result.stdout.splitlines()
    reserve = [line for i, line in enumerate(lines) if "reserve" in line or (i and "reserve" in lines[i - 1])]
    assert result.returncode == (2 if status == "fail" else 0), result.stdout
    if status == "ok":
        assert reserve == [f"ok   audit file reserve: {free} KiB free on the file system of {disk}: the audit trail's "
                           "reserve of 1024 KiB and 16 inodes is free"], result.stdout
        return
    short = f"{free} KiB free on the file system of {disk}, less than the 1024 KiB the audit trail keeps in reserve"
    consequence = ("with [audit] on_failure = \"refuse\" the agent refuses every association (A-ASSOCIATE-RJ) while "
                   "the reserve is not free" if status == "fail"
                   else "audit events will be lost once it is full (on_failure = \"continue\")")
    assert reserve == [f"{status:<4} audit file reserve: {short}: {consequence}",
                       "     fix: free space on that file system or move the audit file to another one: at least "
                       "1024 KiB and 16 inodes must stay free"], result.stdout
    assert f"ok   audit file: {disk}/audit/audit.log can be created (in {disk})" in result.stdout  # writable: yes


@pytest.mark.parametrize("case", ["not loopback", "port in use", "socket directory missing"])
def test_check_fails_on_the_metrics_listener_run_refuses(test_pki: ProvisionedPki, tmp_path: Path, case: str) -> None:
    """`check` passed a [metrics] table that `run` then refused (exit 2); and the refusal of a
    non-loopback address told of acting with the clinician's card and of `unsafe_listen`, a key
    [metrics] does not have."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        listen, problem = {
            "not loopback": (f"0.0.0.0:{port + 1}", f"refusing to serve metrics on 0.0.0.0:{port + 1}: it is not a "
                             "loopback address, so other machines could read them (who is signed in, the "
                             "workstation's PACS traffic). Listen on 127.0.0.1, ::1 or a unix socket; to scrape "
                             "from another machine, write a textfile for the workstation's node_exporter"),
            # The same words as the tunnels' (agent/tunnel/peer.py): whose the port is, when the kernel says.
            "port in use": (f"127.0.0.1:{port}", f"cannot listen on 127.0.0.1:{port}: "),
            "socket directory missing": (
                f"unix:{tmp_path}/missing/metrics/metrics.sock",
                f"cannot create the socket directory {tmp_path}/missing/metrics: its parent {tmp_path}/missing does "
                f"not exist (the agent creates only the socket's own directory): create {tmp_path}/missing, or put "
                f"the socket in a directory that exists, e.g. unix:/run/user/{os.getuid()}/card-agent/NAME.sock"),
        }[case]
        config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", taken.getsockname()[1])],
                              metrics={"listen": listen})
        checked = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
        ran = run_card_agent("run", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    refusal = ran.stderr.splitlines()[-1].removeprefix(f"card-agent: error: {config} [metrics].listen: ")
    assert ran.returncode == 2
    assert refusal == problem if case != "port in use" else refusal.startswith(problem), ran.stderr
    assert checked.returncode == 2, checked.stdout
    assert [line for line in findings(checked.stdout) if line.startswith("fail")] == [
        f"fail metrics listen: [metrics].listen: {refusal}"], checked.stdout


def test_check_fails_on_a_metrics_textfile_whose_directory_is_missing(test_pki: ProvisionedPki,
                                                                      tmp_path: Path) -> None:
    """`run` writes no textfile there and says so in a warning; `check` said nothing."""
    textfile = tmp_path / "node-exporter" / "card-agent.prom"
    problem = f"cannot write {textfile}: its directory {textfile.parent} does not exist"
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                       metrics={"textfile": str(textfile), "textfile_interval": 0.2}) as agent:
        checked = run_card_agent("check", "--config", tmp_path / "agent" / "agent.toml",
                                 env=test_pki.env(CARD_PIN=USER_PIN))
        log = agent.log()
    assert checked.returncode == 2, checked.stdout
    assert [line for line in findings(checked.stdout) if line.startswith("fail")] == [
        f"fail metrics textfile: {problem}"], checked.stdout
    assert f"card-agent: WARNING: metrics: {problem}\n" in log


def test_the_metrics_of_the_running_agent_of_this_configuration_count_as_its_own(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "textfiles").mkdir()
    metrics = {"listen": f"127.0.0.1:{port}", "textfile": str(tmp_path / "textfiles" / "card-agent.prom")}
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], metrics=metrics):
        while_running = run_card_agent("check", "--config", tmp_path / "agent" / "agent.toml",
                                       env=test_pki.env(CARD_PIN=USER_PIN))
    stopped = run_card_agent("check", "--config", tmp_path / "agent" / "agent.toml",
                             env=test_pki.env(CARD_PIN=USER_PIN))
    textfile = f"ok   metrics textfile: {tmp_path}/textfiles/card-agent.prom: its directory is writable"
    assert [line for line in findings(while_running.stdout) if " metrics " in line] == [
        f"ok   metrics listen: 127.0.0.1:{port}: the running agent of this configuration serves its metrics there",
        textfile], while_running.stdout
    assert [line for line in findings(stopped.stdout) if " metrics " in line] == [
        f"ok   metrics listen: 127.0.0.1:{port} is free", textfile], stopped.stdout
