"""Where `status` and `check` find the running agent when their environment is not the agent's:
the agent runs as a systemd user unit (XDG_RUNTIME_DIR=/run/user/UID, the default runtime_dir),
the administrator comes in by ssh or sudo (XDG_RUNTIME_DIR unset, or naming a directory that does
not exist). Real agents, real commands, as a user of their own with a real /run/user/UID."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from agent_runner import SYSTEM_PYTHON, pki_for_user, running_agent, tunnel, with_virtualenv_packages, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent

SESSION_USER = 4343  # a user with a login session of its own: no other test uses this uid
LOGIN_RUNTIME_ROOT = Path("/run/user")  # systemd-logind's, a fixed path: the test makes the user's own there


@contextmanager
def login_session_directory(uid: int) -> Iterator[Path]:
    """/run/user/UID as systemd-logind makes it (the user's, mode 0700), removed afterwards with
    /run/user itself when this made it; one left over from an interrupted run is not reused."""
    made_root = not LOGIN_RUNTIME_ROOT.exists()
    LOGIN_RUNTIME_ROOT.mkdir(mode=0o755, exist_ok=True)
    path = LOGIN_RUNTIME_ROOT / str(uid)
    try:
        path.mkdir(mode=0o700)  # FileExistsError: remove the leftover by hand, it is no test's to delete
        os.chown(path, uid, uid)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        # The old code made this in /tmp when it missed the agent (`status` created its runtime directory).
        shutil.rmtree(Path(tempfile.gettempdir()) / f"card-agent-{uid}", ignore_errors=True)
        if made_root:
            LOGIN_RUNTIME_ROOT.rmdir()


def card_agent_as(uid: int, *args: str | Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`card-agent ARGS` run as uid ``uid`` (as agent_runner.start_agent runs the agent for a user)."""
    command = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", SYSTEM_PYTHON, "-c",
               "import sys; from dicom_card_agent.cli.entry import main; sys.exit(main())", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=with_virtualenv_packages(env),
                          stdin=subprocess.DEVNULL, timeout=120, cwd="/")


def environment(pki: ProvisionedPki, xdg_runtime_dir: str | None) -> dict[str, str]:
    env = {k: v for k, v in pki.env(CARD_PIN=USER_PIN).items() if k != "XDG_RUNTIME_DIR"}
    return env if xdg_runtime_dir is None else {**env, "XDG_RUNTIME_DIR": xdg_runtime_dir}


def test_status_and_check_find_the_agent_of_a_login_session_from_an_ssh_or_sudo_shell(
        test_pki: ProvisionedPki) -> None:
    """Without XDG_RUNTIME_DIR (or with one naming a missing directory) `status` looked in
    /tmp/card-agent-UID: `no agent answers ... is card-agent run ... running as this user?` (exit 2),
    and `check` took the agent's own port for another program's (`fail listen pacs: ... Address
    already in use`). Both now look in the user's /run/user/UID, where the agent is, and `check`
    says of the running agent what it says when XDG_RUNTIME_DIR is set: its ports are its own."""
    with ExitStack() as stack:
        runtime = stack.enter_context(login_session_directory(SESSION_USER))
        pki, workdir = stack.enter_context(pki_for_user(test_pki, SESSION_USER))
        pacs = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
        agent = stack.enter_context(running_agent(
            pki, workdir / "agent", [tunnel("pacs", pacs.getsockname()[1])], user=SESSION_USER,
            env={"XDG_RUNTIME_DIR": str(runtime)}, agent={"runtime_dir": ""}))  # as the user unit runs it
        config = workdir / "agent" / "agent.toml"
        runs = {shell: [card_agent_as(SESSION_USER, command, "--config", config, env=environment(pki, xdg))
                        for command in ("status", "check")]
                for shell, xdg in (("login session", str(runtime)), ("ssh", None), ("sudo", "/run/user/4344"))}
    running = f"ok   listen pacs: 127.0.0.1:{agent.port()}: the running agent of this configuration listens there"
    for shell, (status, check) in runs.items():
        assert status.returncode == 0, f"{shell}: {status.stderr}"
        assert status.stdout.startswith("state:    signed in\n"), f"{shell}: {status.stdout}"
        assert check.returncode == 0, f"{shell}: {check.stdout}{check.stderr}"
        assert running in check.stdout.splitlines(), f"{shell}: {check.stdout}"
    assert not Path("/run/user/4344").exists()  # a missing XDG_RUNTIME_DIR is not made by `status`


def test_status_names_the_control_socket_an_agent_of_another_environment_has(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """An agent started outside a login session (no XDG_RUNTIME_DIR, no /run/user/UID: its runtime
    directory is in the temporary directory), asked from a shell that has XDG_RUNTIME_DIR: `status`
    does not find it, and says where it is and how to ask it there."""
    temporary, xdg, other_temporary = tmp_path / "tmp", tmp_path / "xdg", tmp_path / "other-tmp"
    for directory in (temporary, other_temporary):
        directory.mkdir()
        directory.chmod(0o1777)
    xdg.mkdir(mode=0o700)
    with socket.create_server(("127.0.0.1", 0)) as pacs:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.getsockname()[1])],
                           env={"TMPDIR": str(temporary), "XDG_RUNTIME_DIR": ""}, agent={"runtime_dir": ""}):
            config = tmp_path / "agent" / "agent.toml"
            elsewhere = run_card_agent("status", "--config", config,
                                       env=test_pki.env(TMPDIR=str(temporary), XDG_RUNTIME_DIR=str(xdg)))
            unknown = run_card_agent("status", "--config", config,
                                     env=test_pki.env(TMPDIR=str(other_temporary), XDG_RUNTIME_DIR=str(xdg)))
            told = run_card_agent("status", "--config", config,
                                  env=test_pki.env(TMPDIR=str(temporary), XDG_RUNTIME_DIR=str(temporary)))
    uid = os.getuid()
    asked = (f"card-agent: error: no agent answers on {xdg}/card-agent-{uid}/control.sock ([Errno 2] No such file "
             f"or directory): is `card-agent run --config {config}` running as this user? ")
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.splitlines() == [
        asked + f"Another control socket of this user is at {temporary}/card-agent-{uid}/control.sock: to ask the "
        f"agent there, run `XDG_RUNTIME_DIR={temporary} card-agent status --config {config}`; or set [agent] "
        "runtime_dir, which every environment shares"]
    # Looked for in other places than the agent's (another TMPDIR): the way to find it is still told.
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines() == [
        asked + f"The agent's runtime directory follows the XDG_RUNTIME_DIR of the environment it started in "
        f"(here: {xdg}): run `XDG_RUNTIME_DIR=DIR card-agent status --config {config}` with the agent's DIR (a "
        f"systemd user unit's is /run/user/{uid}); or set [agent] runtime_dir, which every environment shares"]
    assert told.returncode == 0 and told.stdout.startswith("state:    signed in\n"), told.stderr  # the advice works


def test_check_names_the_agent_of_another_configuration_that_may_hold_the_port(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """A new configuration checked on a workstation whose agent runs with another file, on the same
    port: the port is taken, and `check` says by which agent of this user it may be."""
    with socket.create_server(("127.0.0.1", 0)) as pacs:
        shared = {"runtime_dir": str(tmp_path / "run")}
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", pacs.getsockname()[1])],
                           agent=shared) as agent:
            listen = f"127.0.0.1:{agent.port()}"
            (tmp_path / "new").mkdir()
            new = write_config(tmp_path / "new" / "agent.toml", test_pki,
                               [tunnel("pacs", pacs.getsockname()[1], listen=listen)], agent=shared)
            result = run_card_agent("check", "--config", new, env=test_pki.env(CARD_PIN=USER_PIN))
    assert result.returncode == 2, result.stdout
    lines = result.stdout.splitlines()
    index = lines.index(f"fail listen pacs: tunnel pacs: cannot listen on {listen}: Address already in use; an "
                        f"agent of this user answers on {tmp_path}/run/control.sock: the agent answering here runs "
                        f"with {tmp_path}/agent/agent.toml, not {new}")
    assert lines[index + 1] == ("     fix: if that agent holds the address, stop it or give one of the two "
                                "configurations another listen address")
