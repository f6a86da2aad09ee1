"""A reload (SIGHUP) that changes [trust] or [[inbound]] while the PIN dialog is open
(docs/configuration.md, "Reloading"): the PIN the clinician types signs the card in under the new
configuration, once. Before, the session signed in under the old one was ended at once
("configuration reloaded") and a second dialog asked for the PIN again. A card the new
configuration refuses gets no PIN: the sign-in fails as one under that configuration would.

The pinentry here is a real Assuan program (a shell script, as tests/helpers/scripted_pinentry.sh)
that answers GETPIN only once the test "types" the PIN (a flag file), so that the reload surely
comes while the dialog is open; it logs every command, and the fault module logs every C_Login:
the dialogs and the logins are counted, not assumed."""

from __future__ import annotations

import signal
from pathlib import Path

from agent_runner import agent_status, inbound_listener, port_of, running_agent, tunnel, wait_for, write_config
from conftest import USER_PIN, ProvisionedPki
from fault_pkcs11 import FaultControl
from peers.pynetdicom_scp import echo, tls_scp
from test_inbound import THE_PACS

RELOADED = "card-agent: INFO: SIGHUP: configuration {config} reloaded: "

# Types the PIN (the first line of $1) once the file $2 exists, which it then removes: one PIN typed
# answers one GETPIN. Every command's name is appended to the file $3.
WAITING_PINENTRY = """#!/bin/sh
echo "OK Pleased to meet you"
while IFS= read -r line; do
    echo "${line%% *}" >> "$3"
    case "$line" in
        GETPIN) while [ ! -e "$2" ]; do sleep 0.05; done; rm -f "$2"; printf 'D %s\\nOK\\n' "$(head -n 1 "$1")" ;;
        BYE) echo "OK closing connection"; exit 0 ;;
        *) echo OK ;;
    esac
done
"""


class WaitingDialog:
    """The PIN dialog of the agent: open until :meth:`type_pin`; what it was asked, counted."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.pin_file, self.typed, self.commands = directory / "pin", directory / "typed", directory / "commands"
        self.pin_file.write_text(USER_PIN + "\n")
        self.pin_file.chmod(0o600)
        self.program = directory / "pinentry"
        self.program.write_text(WAITING_PINENTRY)
        self.program.chmod(0o700)
        # The agent runs a pinentry program with no arguments: a wrapper gives it its files.
        self.wrapper = directory / "waiting-pinentry"
        arguments = " ".join(f'"{path}"' for path in (self.pin_file, self.typed, self.commands))
        self.wrapper.write_text(f'#!/bin/sh\nexec "{self.program}" {arguments}\n')
        self.wrapper.chmod(0o700)

    def asked(self) -> list[str]:
        return self.commands.read_text().split() if self.commands.exists() else []

    def pins_asked(self) -> int:
        return self.asked().count("GETPIN")

    def type_pin(self) -> None:
        self.typed.touch()


def logins(card: FaultControl) -> list[str]:
    return [line for line in card.log_lines() if line.startswith("C_Login")]


def reload_during_the_dialog(agent, config: Path, test_pki: ProvisionedPki, tunnels: list[dict], **settings) -> None:
    """Write the new configuration and send SIGHUP while the dialog waits; return once it is reloaded."""
    write_config(config, test_pki, tunnels, **settings)
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_for_log(RELOADED.format(config=config), 20)


def test_a_trust_change_during_the_pin_dialog_signs_in_once_with_the_new_trust(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "card.ctl")
    dialog = WaitingDialog(tmp_path / "dialog")
    identity = {"pin": f"pinentry:{dialog.wrapper}"}
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        pacs_table, later = tunnel("pacs", pacs.port), tunnel("later", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [pacs_table], module=str(fault_module),
                           env=card.env(), identity=identity) as agent:
            config = tmp_path / "agent" / "agent.toml"
            env = test_pki.env(**card.env())
            wait_for(lambda: dialog.pins_asked() == 1, 20)
            # [trust] changed (and a tunnel added) while the clinician reads the dialog.
            reload_during_the_dialog(agent, config, test_pki, [pacs_table, later], module=str(fault_module),
                                     identity=identity, trust={"crl_expired": "warn"})
            dialog.type_pin()  # once
            agent.wait_for_log("event=sign-in ", 20)
            # Signed in to stay, or (as before) signed out at once and asked again.
            wait_for(lambda: dialog.pins_asked() > 1
                     or agent_status(agent.log_path.parent, env)["state"] == "signed in", 20)
            assert dialog.pins_asked() == 1, dialog.asked()  # one dialog, one PIN typed
            assert echo(agent.port("pacs"))
            assert echo(port_of(later))
            log = agent.log()
            assert "event=sign-out" not in log, log
            assert len(logins(card)) == 1
    assert log.count("event=sign-in ") == 1, log
    assert "cannot take it in place" not in log
    assert ("configuration reloaded during the sign-in to 'alice' (serial " in log
            and "): the card was checked against it again before its PIN was sent; the card session starts with it"
            in log), log


def test_an_inbound_listener_the_card_cannot_serve_reloaded_during_the_dialog_gets_no_pin(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    """The test PKI's clinician certificate lacks serverAuth: an [[inbound]] listener served with the
    card refuses it. Reloaded in while the dialog is open, the PIN typed must not go to the card."""
    card = FaultControl(tmp_path / "card.ctl")
    dialog = WaitingDialog(tmp_path / "dialog")
    identity = {"pin": f"pinentry:{dialog.wrapper}"}
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        pacs_table = tunnel("pacs", pacs.port)
        with running_agent(test_pki, tmp_path / "agent", [pacs_table], module=str(fault_module),
                           env=card.env(), identity=identity) as agent:
            config = tmp_path / "agent" / "agent.toml"
            wait_for(lambda: dialog.pins_asked() == 1, 20)
            # server_certificate = "card" (the default)
            listener = inbound_listener("retrieves", f"127.0.0.1:{pacs.port}", **THE_PACS)
            reload_during_the_dialog(agent, config, test_pki, [pacs_table], module=str(fault_module),
                                     identity=identity, inbound=[listener])
            dialog.type_pin()
            log = agent.wait_for_log("event=sign-in-failed", 20)
            assert logins(card) == []  # the PIN never reached the card
            assert dialog.pins_asked() == 1
            log = agent.log()
    assert "event=sign-in " not in log, log
    assert ("token 'alice' cannot serve [[inbound]] 'retrieves' (server_certificate = \"card\"): the card's "
            "certificate (CN=Alice Example,O=Example Hospital Test PKI) cannot identify a TLS server (its extended "
            "key usage lacks serverAuth); not signed in, the PIN entered was not sent to the card (the configuration "
            "was reloaded during the PIN dialog)") in log, log
