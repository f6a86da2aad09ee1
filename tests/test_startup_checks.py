"""What can never fix itself ends `card-agent run` before `ready:` with exit 2 and the key named;
what may still come (a card not yet inserted, another card) is waited for, and said so once."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent_runner import inbound_listener, log_lines, running_agent, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from fault_pkcs11 import FaultControl
from peers.ports import free_port


def exit_of(test_pki: ProvisionedPki, config: Path, env: dict[str, str]) -> tuple[int, str]:
    process = start_agent(config, config.parent / "agent.log", env)
    try:
        process.wait(30)
    finally:
        stop_agent(process)
    return process.returncode, (config.parent / "agent.log").read_text()


def status(agent_dir: Path, env: dict[str, str]) -> dict:
    return json.loads(run_card_agent("status", "--json", "--config", agent_dir / "agent.toml", env=env,
                                     check=True).stdout)


def serials(test_pki: ProvisionedPki) -> dict[str, str]:
    listed = json.loads(run_card_agent("tokens", "--module", "softhsm2", "--json", env=test_pki.env(),
                                       check=True).stdout)
    return {token["label"]: token["serial"] for token in listed}


@pytest.mark.parametrize("program", ["/nonexistent/pinentry-tty", "no-such-pinentry"])
def test_a_missing_pinentry_program_ends_the_agent_before_ready(test_pki: ProvisionedPki, tmp_path: Path,
                                                                 program: str) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          identity={"pin": f"pinentry:{program}"})
    env = test_pki.env(PATH="/usr/bin:/bin")
    code, log = exit_of(test_pki, config, env)
    where = program if "/" in program else f"{program!r} on PATH (/usr/bin:/bin)"
    assert code == 2
    assert "ready:" not in log
    assert log.splitlines()[-1] == (
        f"card-agent: error: {config} [identity].pin: the pinentry program {where} does not exist or is not "
        "executable: install pinentry-gnome3, pinentry-qt, pinentry-gtk2 or pinentry-tty, or give its path "
        "(pinentry:/usr/bin/pinentry-tty)")


def test_a_pinentry_program_that_is_not_executable_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    program = tmp_path / "pinentry-copy"
    program.write_bytes(b"#!/bin/sh\n")
    program.chmod(0o644)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          identity={"pin": f"pinentry:{program}"})
    code, log = exit_of(test_pki, config, test_pki.env())
    assert code == 2
    assert log.splitlines()[-1].startswith(
        f"card-agent: error: {config} [identity].pin: the pinentry program {program} does not exist or is not "
        "executable")


def test_an_unset_pin_variable_ends_the_agent_naming_the_key(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          identity={"pin": "env:NO_SUCH_PIN_VARIABLE"})
    code, log = exit_of(test_pki, config, test_pki.env())
    assert code == 2
    assert log.splitlines()[-1] == (
        f"card-agent: error: {config} [identity].pin: the PIN variable NO_SUCH_PIN_VARIABLE is not set or empty")


def test_a_pin_file_others_can_read_ends_the_agent_naming_the_key(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN + "\n")
    pin_file.chmod(0o640)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          identity={"pin": f"file:{pin_file}"})
    code, log = exit_of(test_pki, config, test_pki.env())
    assert code == 2
    assert log.splitlines()[-1] == (
        f"card-agent: error: {config} [identity].pin: PIN file {pin_file} is readable by other users (mode 640): "
        f"run `chmod 600 {pin_file}` first")


def test_a_named_token_that_is_absent_is_waited_for_and_the_present_ones_are_named_once(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "readers.ctl")
    card.readers("alice", "bob")
    serial = serials(test_pki)
    env = test_pki.env(**card.env())
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())], token="alcie",
                       module=str(fault_module), env=card.env()) as agent:
        time.sleep(0.5)  # ten looks at the readers: the line is not repeated
        answer = status(tmp_path / "agent", env)
        log = agent.log()
        assert agent.process.poll() is None
    expected = ("card-agent: WARNING: token 'alcie' is not present; "
                f"present tokens: 'alice' (serial {serial['alice']}), "
                f"'bob' (serial {serial['bob']}); waiting for it (check [identity] token if it should be one of these)")
    assert log_lines(log).count(expected) == 1, log
    assert "ready: 1 tunnel(s) for nobody yet (no card inserted)" in log
    assert answer["state"] == "no card inserted"
    assert answer["present_tokens"] == [{"label": "alice", "serial": serial["alice"]},
                                        {"label": "bob", "serial": serial["bob"]}]


def test_a_card_that_cannot_serve_an_inbound_listener_is_refused_before_its_pin_and_another_card_is_used(
        test_pki: ProvisionedPki, tmp_path: Path, fault_module: Path) -> None:
    card = FaultControl(tmp_path / "readers.ctl")
    card.readers(None, "alice")  # alice's card, client-only; the other reader empty
    serial = serials(test_pki)
    env = test_pki.env(**card.env())
    listener = inbound_listener("retrieves", f"127.0.0.1:{free_port()}",  # server_certificate = "card"
                                client_names=["localhost"])
    refusal = ("token 'alice' cannot serve [[inbound]] 'retrieves' (server_certificate = \"card\"): the card's "
               "certificate (CN=Alice Example,O=Example Hospital Test PKI) cannot identify a TLS server (its extended "
               "key usage lacks serverAuth); not signed in, no PIN asked: give the listener the workstation's node "
               "certificate with server_certificate and server_key, or use a card whose certificate allows serverAuth")
    with running_agent(test_pki, tmp_path / "agent", [], token="", inbound=[listener], module=str(fault_module),
                       env=card.env()) as agent:
        agent.wait_for_log("event=sign-in-failed")
        assert status(tmp_path / "agent", env)["last_error"] == refusal
        assert f"card-agent: ERROR: sign-in to 'alice' (serial {serial['alice']}) failed: {refusal}" in agent.log()

        card.readers("bob", "alice")  # bob's card, which allows serverAuth, in the first reader
        agent.wait_for_log('event=sign-in subject="CN=Bob Example')
        answer = status(tmp_path / "agent", env)
        log = agent.log()
    assert (answer["state"], answer["token"]) == ("signed in", "bob")
    assert (f"card-agent: INFO: card 'bob' (serial {serial['bob']}) chosen: 'alice' (serial {serial['alice']}) "
            + refusal.removeprefix("token 'alice' ")) in log_lines(log)
    # No PIN was ever tried on alice's card.
    assert [line.rsplit(" pid=", 1)[0] for line in card.log_lines() if line.startswith("C_Login")] == [
        "C_Login rv=0x0 user=1 token=bob"]


@pytest.mark.parametrize("planted", ["directory", "link"])
def test_a_runtime_directory_another_user_planted_is_refused_and_said_so(
        test_pki: ProvisionedPki, tmp_path: Path, planted: str) -> None:
    """Without a login session the runtime directory is /tmp/card-agent-UID, a name any user can
    take first. A directory of theirs stopped the agent with advice to chmod what is not ours (a
    link of theirs was refused by the control socket's own check, in that socket's words); both
    now say that another user made it, and what to do instead."""
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    runtime = tmp_path / "public" / "card-agent-0"
    runtime.parent.mkdir(mode=0o1777)
    runtime.parent.chmod(0o1777)
    if planted == "directory":
        runtime.mkdir(mode=0o700)
        os.chown(runtime, 65534, 65534)
    else:
        runtime.symlink_to(ours)
        os.chown(runtime, 65534, 65534, follow_symlinks=False)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())],
                          agent={"runtime_dir": ""})  # the default: this "public" /tmp, no login session
    code, log = exit_of(test_pki, config, test_pki.env(CARD_PIN=USER_PIN, TMPDIR=str(runtime.parent),
                                                       XDG_RUNTIME_DIR=""))
    problem = {"directory": "belongs to uid 65534, not to uid 0 (this agent's user): another user made it",
               "link": "is a symbolic link, which whoever made it can point elsewhere"}[planted]
    assert code == 2, log
    assert log.splitlines()[-1] == (f"card-agent: error: runtime directory {runtime} {problem}; set [agent] "
                                    "runtime_dir to a private directory of yours, or run the agent in a login "
                                    "session (XDG_RUNTIME_DIR)")
