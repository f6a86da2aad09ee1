"""`card-agent status` when the configuration file is not the configuration the agent runs: an edit
not reloaded yet, one its reload refused although the file is valid ([identity] changed: "restart the
agent"), or a reload refused for something other than the file (a PIN file others may read). `status`
shows the running configuration; it must say on stderr that the file differs, and why the latest
reload did not take effect, and `--json` must carry the same facts. Real agent on SoftHSM, a
pynetdicom TLS PACS."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import time
from pathlib import Path

from agent_runner import RunningAgent, free_port, running_agent, tunnel
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from peers.pynetdicom_scp import tls_scp

NOT_RELOADED = "SIGHUP: configuration not reloaded, the running one goes on: "


def _status(config: Path, test_pki: ProvisionedPki) -> tuple[str, str, dict]:
    """The text status's stdout and stderr, and the --json answer (both exit 0)."""
    text = run_card_agent("status", "--config", config, env=test_pki.env())
    assert text.returncode == 0, text.stdout + text.stderr
    answer = run_card_agent("status", "--json", "--config", config, env=test_pki.env())
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stderr == text.stderr  # the same warning either way
    return text.stdout, text.stderr, json.loads(answer.stdout)


def _sighup(agent: RunningAgent, outcome: str) -> str:
    """SIGHUP, and the reload's log line (after its `card-agent: LEVEL: ` prefix) saying ``outcome``."""
    seen = agent.log().count(outcome)
    agent.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in agent.log().splitlines() if outcome in line]
        if len(lines) > seen:
            return re.sub(r"^.*?card-agent: [A-Z]+: ", "", lines[-1])
        time.sleep(0.05)
    raise AssertionError(f"{outcome!r} not logged again:\n{agent.log()}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_status_tells_a_valid_file_the_reload_refused_then_an_edit_not_reloaded(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """`status` printed the old tunnels with exit 0 and nothing on stderr: the admin, whose
    `systemctl reload` reported success, could not tell that the edit did not take effect."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        pacs_tunnel = tunnel("pacs", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [pacs_tunnel]) as agent:
            config = tmp_path / "agent" / "agent.toml"
            started = config.read_bytes()
            _, quiet, at_start = _status(config, test_pki)

            bob = started.replace(b'token = "alice"', b'token = "bob"')
            config.write_bytes(bob)
            refusal = _sighup(agent, NOT_RELOADED)
            refused_out, refused_err, refused = _status(config, test_pki)

            edited = started.replace(pacs_tunnel["listen"].encode(), f"127.0.0.1:{free_port()}".encode())
            config.write_bytes(edited)
            edited_out, edited_err, not_reloaded = _status(config, test_pki)

            applied = _sighup(agent, "SIGHUP: configuration ")
            reloaded_out, reloaded_err, reloaded = _status(config, test_pki)

    assert quiet == ""
    differs = f"warning: {config} differs from the configuration the running agent runs, which `status` shows: "
    assert refused_err.startswith(differs), refused_err  # was "": the refusal told in the log alone
    assert edited_err.startswith(differs), edited_err
    assert at_start["configuration"] == {
        "file": str(config), "sha256": _sha256(started), "read_at": at_start["configuration"]["read_at"],
        "last_reload": None, "file_sha256": _sha256(started), "file_matches": True}

    assert "[identity] changed" in refusal and refusal.endswith("restart the agent for it to take effect"), refusal
    last = refused["configuration"]["last_reload"]
    assert last == {"at": last["at"], "applied": False, "message": refusal, "file_sha256": _sha256(bob)}
    assert refused["configuration"]["sha256"] == _sha256(started)  # the running one: alice's
    assert refused["configuration"]["file_matches"] is False
    assert refused_out.startswith("state:    signed in\n") and "token:    'alice'" in refused_out, refused_out
    assert refused_err == (f"warning: {config} differs from the configuration the running agent runs, which "
                           f"`status` shows: its latest reload, at {last['at']}, read it and did not take effect: "
                           f"{refusal}\n")

    # An edit after the refused reload: the refusal was of another version of the file, so not quoted.
    assert not_reloaded["configuration"]["file_matches"] is False
    assert not_reloaded["configuration"]["file_sha256"] == _sha256(edited)
    assert f"tunnel pacs: {pacs_tunnel['listen']} -> " in edited_out, edited_out  # still the running listener
    assert edited_err == (f"warning: {config} differs from the configuration the running agent runs, which "
                          f"`status` shows: the file was changed after the agent's latest reload, at {last['at']}, "
                          "which did not take effect (`status --json` and the log say why), and not reloaded: "
                          "check it with `card-agent check`, then `systemctl --user reload card-agent` (or "
                          "SIGHUP)\n")

    assert "reloaded: changed pacs" in applied, applied
    assert reloaded_err == ""
    assert reloaded["configuration"]["file_matches"] is True
    assert reloaded["configuration"]["sha256"] == _sha256(edited)
    assert reloaded["configuration"]["last_reload"]["applied"] is True
    assert reloaded["configuration"]["last_reload"]["message"] == applied
    assert f"tunnel pacs: {pacs_tunnel['listen']} -> " not in reloaded_out, reloaded_out


def test_status_tells_an_edit_never_reloaded(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        pacs_tunnel = tunnel("pacs", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [pacs_tunnel]) as agent:
            config = tmp_path / "agent" / "agent.toml"
            started = config.read_bytes()
            new_listen = f"127.0.0.1:{free_port()}"
            config.write_bytes(started.replace(pacs_tunnel["listen"].encode(), new_listen.encode()))
            out, err, answer = _status(config, test_pki)
            assert "SIGHUP" not in agent.log()
    assert err.startswith(f"warning: {config} differs from the configuration the running agent runs"), err
    running = answer["configuration"]
    assert running["last_reload"] is None and running["file_matches"] is False
    assert running["sha256"] == _sha256(started)
    assert f"tunnel pacs: {pacs_tunnel['listen']} -> " in out and new_listen not in out, out
    assert [tunnel["listen"] for tunnel in answer["tunnels"]] == [pacs_tunnel["listen"]]
    assert err == (f"warning: {config} differs from the configuration the running agent runs, which `status` "
                   f"shows: the file was changed after the agent read it ({running['read_at']}), and not reloaded: "
                   "check it with `card-agent check`, then `systemctl --user reload card-agent` (or SIGHUP)\n")


def test_status_tells_a_reload_refused_for_something_besides_the_file(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The file is what the agent runs, but SIGHUP found its PIN file readable by others: refused.
    `status` must not be silent about it either."""
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(0o600)
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)],
                           identity={"pin": f"file:{pin_file}"}) as agent:
            config = tmp_path / "agent" / "agent.toml"
            pin_file.chmod(0o644)
            refusal = _sighup(agent, NOT_RELOADED)
            out, err, answer = _status(config, test_pki)
    assert err.startswith(f"warning: {config} is the configuration the running agent read at "), err
    running = answer["configuration"]
    assert str(pin_file) in refusal, refusal
    assert running["file_matches"] is True and running["last_reload"]["applied"] is False
    assert out.startswith("state:    signed in\n"), out
    assert err == (f"warning: {config} is the configuration the running agent read at {running['read_at']}, but "
                   f"its latest reload, at {running['last_reload']['at']}, read it and did not take effect: "
                   f"{refusal}\n")
