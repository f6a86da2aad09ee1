"""`card-agent status` and `card-agent lock` while the configuration file has a mistake the running
agent refused at its reload: the agent goes on with the configuration it read, and the two commands
must still reach it (the desktop's "Lock DICOM session" runs `card-agent lock`). Real agent on
SoftHSM, a pynetdicom TLS PACS."""

from __future__ import annotations

import signal
from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from peers.pynetdicom_scp import echo, tls_scp


def test_status_and_lock_reach_the_agent_whose_configuration_file_has_a_mistake(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """They read the file to find the agent's control socket, and failed on the mistake (exit 2),
    so that a click on Lock left the session signed in."""
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)]) as agent:
            agent.wait_for_log('event=sign-in subject="CN=Alice Example')
            config = tmp_path / "agent" / "agent.toml"
            config.write_text(config.read_text().replace('remote = "', 'remot = "', 1))
            agent.process.send_signal(signal.SIGHUP)
            agent.wait_for_log("SIGHUP: configuration not reloaded")
            status = run_card_agent("status", "--config", config, env=test_pki.env())
            locked = run_card_agent("lock", "--config", config, env=test_pki.env())
            agent.wait_for_log('event=sign-out reason="locked')
            served_after_lock = echo(agent.port())
    assert status.returncode == 0 and status.stdout.startswith("state:    signed in\n"), status.stdout + status.stderr
    assert status.stderr == (f"warning: {config} [[tunnel]] 'pacs': unknown key 'remot' (did you mean 'remote'?); "
                             "the running agent answered, which goes on with the configuration it read before\n")
    assert locked.returncode == 0 and locked.stdout.startswith("locked: "), locked.stdout + locked.stderr
    assert not served_after_lock
