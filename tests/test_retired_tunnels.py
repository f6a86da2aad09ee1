"""A tunnel a SIGHUP reload removed or changed is let go once its last association has ended
(agent/session/retune.py), while what it carried stays counted.

Real agent on SoftHSM, real pynetdicom PACS over TLS. The card session kept every runtime a reload
replaced for its whole life: `status` listed each removed tunnel as `retired` (0 open) and the
metrics exported ~40 series of kind="retired" for it, for ever, and the process grew by each one's
TLS session and the TLS object it had made ahead (~12-24 kB a changed tunnel)."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from pynetdicom.sop_class import Verification

from agent_runner import RunningAgent, port_of, running_agent, tunnel, wait_for, write_config
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.session.retune import RETIRED_LINGER_SECONDS
from peers.ports import free_port
from peers.pynetdicom_scp import associate, echo, tls_scp

RELOADED = "card session: configuration reloaded"


def status(config: Path) -> dict:
    return json.loads(run_card_agent("status", "--config", config, "--json", env=dict(os.environ),
                                     check=True).stdout)


def retired_series(metrics_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=15) as response:
        return [line for line in response.read().decode().splitlines()
                if 'kind="retired"' in line and not line.startswith("#")]


def reload(agent: RunningAgent, config: Path, test_pki: ProvisionedPki, tunnels: list[dict], metrics: dict) -> None:
    write_config(config, test_pki, tunnels, metrics=metrics)
    before = agent.log().count(RELOADED)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: agent.log().count(RELOADED) > before or agent.process.poll() is not None, 20)
    assert agent.process.poll() is None, agent.log()


def accepted(listener: dict, counts: str) -> int:
    return listener[counts]["associations"]["accepted"]


def by_name(answer: dict, name: str) -> dict:
    return next(t for t in answer["tunnels"] if t["name"] == name)


def test_a_removed_or_changed_tunnel_goes_once_its_associations_ended_and_its_counts_stay(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    metrics_port = free_port()
    metrics = {"listen": f"127.0.0.1:{metrics_port}"}
    config = tmp_path / "agent" / "agent.toml"
    with tls_scp(pki_dir=test_pki.pki) as pacs, tls_scp(pki_dir=test_pki.pki) as other_pacs:
        main, modality = tunnel("main", pacs.port), tunnel("modality", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [main, modality], metrics=metrics) as agent:
            assert echo(port_of(modality)) and echo(port_of(main)) and echo(port_of(main))
            held = associate(port_of(modality), sop_classes=[Verification])
            assert held.is_established

            # modality removed while an association runs on it; main changed (another PACS).
            changed_main = {**main, "remote": f"127.0.0.1:{other_pacs.port}"}
            reload(agent, config, test_pki, [changed_main], metrics)
            assert echo(port_of(changed_main))
            time.sleep(RETIRED_LINGER_SECONDS + 2)
            running = status(config)
            # Never let go while an association runs on it: shown, and it goes on.
            assert [(r["name"], r["open_connections"]) for r in running["retired"]] == [("modality", 1)]
            assert held.send_c_echo().Status == 0
            held.release()

            deadline = time.monotonic() + RETIRED_LINGER_SECONDS + 10
            while (status(config)["retired"] or retired_series(metrics_port)) and time.monotonic() < deadline:
                time.sleep(0.5)
            after = status(config)
            assert after["retired"] == []
            assert retired_series(metrics_port) == []
            # The runtime main had before the change is gone too; what it carried is still counted.
            assert accepted(by_name(after, "main"), "this_session") == 3
            assert accepted(by_name(after, "main"), "since_start") == 3

            # Back under its name: what the dropped runtime carried in this session is still counted.
            modality_again = tunnel("modality", pacs.port)
            reload(agent, config, test_pki, [changed_main, modality_again], metrics)
            again = status(config)
            assert accepted(by_name(again, "modality"), "this_session") == 2
            assert accepted(by_name(again, "modality"), "since_start") == 2

            # The session's end still ends an association open on a runtime a reload replaced.
            held = associate(port_of(changed_main), sop_classes=[Verification])
            assert held.is_established
            reload(agent, config, test_pki, [main, modality_again], metrics)
            run_card_agent("lock", "--config", config, env=test_pki.env(), check=True)
            agent.wait_for_log('event=sign-out reason="locked"')
            wait_for(lambda: held.is_aborted, 10)
            wait_for(lambda: status(config)["state"] != "signed in")
            ended = status(config)
    # The ended session's final counts reached the totals since start, the dropped runtimes' with them.
    assert accepted(by_name(ended, "main"), "since_start") == 4
    assert accepted(by_name(ended, "modality"), "since_start") == 2
    assert "internal error" not in agent.log()
