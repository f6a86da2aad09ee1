"""`dpkg -r` while the agent runs: the supervisor goes on with its code in memory, but a card-session
process has nothing left to start from. The next sign-in said `FileNotFoundError: [Errno 2] No such
file or directory: '/usr/lib/dicom-card-agent/bin/python'` (in the log, `status` and to the
application); now it says what happened and what to do.

The stand-in for the package: an installation of its own in the test's directory, laid out as the
Debian package's /usr/lib/dicom-card-agent is (bin/python, pyvenv.cfg, lib/pythonX.Y/site-packages),
its interpreter and packages links to this virtualenv's. The agent runs from it (its sys.executable
is that bin/python, from which card-session processes are started), and removing it is what
`dpkg -r` does to the running agent: the links go, what they point to stays for the other tests.
Real agent and card-session processes, SoftHSM tokens behind the fault module (to pull and
re-insert the card).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from agent_runner import VIRTUALENV_PACKAGES, agent_status, running_agent, tunnel
from conftest import CARD_AGENT, ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp

FILES_GONE = ("the agent's files are gone (the package was removed while it runs?): stop the agent, or reinstall "
              "it and restart it")


def install(directory: Path) -> Path:
    """The stand-in installation; its interpreter."""
    virtualenv = Path(CARD_AGENT).parent.parent
    (directory / "bin").mkdir(parents=True)
    shutil.copy(virtualenv / "pyvenv.cfg", directory / "pyvenv.cfg")
    packages = directory / VIRTUALENV_PACKAGES.relative_to(virtualenv)
    packages.parent.mkdir(parents=True)
    packages.symlink_to(VIRTUALENV_PACKAGES)
    interpreter = directory / "bin" / "python"
    interpreter.symlink_to(virtualenv / "bin" / "python")
    return interpreter


@pytest.mark.parametrize("removed", ["the whole installation", "the packages, not the interpreter"])
def test_a_sign_in_after_the_package_was_removed_says_what_to_do(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path, removed: str) -> None:
    installation = tmp_path / "usr-lib-dicom-card-agent"
    interpreter = install(installation)
    card = FaultControl(tmp_path / "reader.ctl")
    card.show("alice")
    with tls_scp(pki_dir=test_pki.pki) as pacs, \
            running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.port)], module=str(fault_module),
                          env=card.env(), prefix=[str(interpreter)]) as agent:
        agent.wait_for_log('event=sign-in subject="CN=Alice Example')
        # Serving (its imports done: the relays' are made while the PIN is typed), as the session of
        # an agent that runs when the package is removed.
        assert echo(agent.port())
        if removed == "the whole installation":  # `dpkg -r dicom-card-agent`
            shutil.rmtree(installation)
        else:  # a package manager that left the interpreter (pip uninstall in the virtualenv)
            (installation / VIRTUALENV_PACKAGES.relative_to(Path(CARD_AGENT).parent.parent)).unlink()
        card.remove_card()
        agent.wait_for_log('event=sign-out reason="card removed"')
        card.insert_card()
        log = agent.wait_for_log(f" failed: {FILES_GONE}")
        status = agent_status(tmp_path / "agent", test_pki.env(**card.env()))
        answered = echo(agent.port())
    assert re.search(rf"card-agent: ERROR: sign-in to 'alice' \(serial \w+\) failed: {re.escape(FILES_GONE)}\n",
                     log), log
    assert "FileNotFoundError" not in log and "Traceback" not in log, log
    assert status["state"] == f"card present, not signed in: {FILES_GONE}", status
    assert status["last_error"] == FILES_GONE, status
    assert not answered
