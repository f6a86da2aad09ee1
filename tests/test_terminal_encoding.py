"""The commands on a terminal that is not UTF-8 (LANG=de_DE.ISO-8859-1, PYTHONIOENCODING=latin-1):
what it cannot show is escaped, never a traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent_runner import running_agent, tunnel
from conftest import CARD_AGENT, USER_PIN, ProvisionedPki
from peers.pynetdicom_scp import tls_scp

SITE = "Radiologie-Zürich-放射線"  # a Latin-1 letter and three it lacks
SITE_ON_A_LATIN1_TERMINAL = "Radiologie-Zürich-\\u653e\\u5c04\\u7dda"


def on_latin1_terminal(*args: str | Path, env: dict[str, str]) -> tuple[int, list[str], str]:
    """`card-agent ARGS` writing Latin-1: its exit status, its standard output's lines, its standard error."""
    result = subprocess.run([CARD_AGENT, *map(str, args)], capture_output=True, stdin=subprocess.DEVNULL,
                            env={**env, "PYTHONIOENCODING": "latin-1"}, timeout=120)
    return result.returncode, result.stdout.decode("latin-1").splitlines(), result.stderr.decode("latin-1")


def test_status_check_and_doctor_escape_what_a_latin1_terminal_cannot_show(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The configuration's path in another script than the terminal's ended all three with
    `UnicodeEncodeError: 'latin-1' codec can't encode characters` (exit 1, which no command
    documents); now the characters are escaped as Python writes them and the command goes on."""
    workdir = tmp_path / SITE
    shown = f"{tmp_path}/{SITE_ON_A_LATIN1_TERMINAL}"
    with tls_scp(pki_dir=test_pki.pki) as pacs:
        with running_agent(test_pki, workdir, [tunnel("pacs", pacs.port)],
                           audit={"file": str(workdir / "log" / "audit.log")},
                           agent={"runtime_dir": str(tmp_path / "run")}):  # a unix socket's path is short
            env = test_pki.env(CARD_PIN=USER_PIN)
            status = on_latin1_terminal("status", "--config", workdir / "agent.toml", env=env)
            check = on_latin1_terminal("check", "--config", workdir / "agent.toml", env=env)
            doctor = on_latin1_terminal("doctor", "--config", workdir / "agent.toml", env=env)
    code, lines, errors = status
    assert code == 0, errors
    assert f"audit:    to {shown}/log/audit.log" in lines, lines
    code, lines, errors = check
    assert code == 0, "\n".join(lines) + errors
    assert f"ok   config: {shown}/agent.toml: 1 tunnel(s), 0 inbound listener(s)" in lines
    assert f"ok   audit file: {shown}/log/audit.log writable" in lines
    code, lines, errors = doctor
    assert code == 0, "\n".join(lines) + errors
    assert lines[0] == (f"ok   config: {shown}/agent.toml: module softhsm2, token alice, CA bundle "
                        f"{test_pki.ca_bundle}, 1 CRL file(s)")
