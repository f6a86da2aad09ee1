"""What a newcomer met following the docs and the CLI literally (issue 16): help texts that read as
written, errors without tracebacks, `softhsm init --force` keeping the user's files, fixes that fit
the problem, audit lines that read well, no pcscd noise with SoftHSM, and the card's own text
(token labels, certificate subjects) escaped before it reaches a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, make_token, provision, run_card_agent
from dicom_card_agent.audit.events import AlertType, AuditEvent, User
from dicom_card_agent.audit.messages import AuditSource, render, summarize
from peers.ports import free_port

COMMANDS = [["tokens"], ["identities"], ["doctor"], ["check"], ["run"], ["status"], ["lock"], ["audit", "tail"],
            ["softhsm", "init"], ["softhsm", "ocsp-responder"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_shows_no_python_types(test_pki: ProvisionedPki, command: list[str]) -> None:
    """Typer's rich help showed flags as `<bool>` (and `--json true` then failed), `<list[Path]>`,
    and swallowed "[audit]" as markup."""
    text = run_card_agent(*command, "--help", env=test_pki.env(), check=True).stdout
    for python_type in ("<bool>", "<str>", "<path>", "<list", "<int", "<float"):
        assert python_type not in text, text


def test_help_texts_read_as_written(test_pki: ProvisionedPki) -> None:
    audit = run_card_agent("audit", "tail", "--help", env=test_pki.env(), check=True).stdout
    assert "([audit] file of the configuration, or --file)" in " ".join(audit.split())
    identities = " ".join(run_card_agent("identities", "--help", env=test_pki.env(), check=True).stdout.split())
    assert "prompt, pinentry[:PROGRAM], env:VAR, file:PATH or protected" in identities
    assert "--crl FILE" in identities and "--module NAME|PATH" in identities


def test_softhsm_init_into_a_directory_it_cannot_make_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    result = run_card_agent("softhsm", "init", "/proc/nope", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr == ("card-agent: error: cannot write the test tokens and PKI in /proc/nope: /proc/nope: "
                             "No such file or directory; choose a directory you can write\n")


def test_softhsm_init_force_leaves_the_users_files_alone(tmp_path: Path) -> None:
    directory = tmp_path / "lab"
    provision(directory)
    (directory / "pki" / "my-notes.txt").write_text("mine")
    (directory / "pki" / "clients" / "carol.pem").write_text("mine too")
    (directory / "agent.toml").write_text("[identity]\n")
    old_bundle = (directory / "pki" / "ca-bundle.pem").read_bytes()
    provision(directory, "--force")
    assert (directory / "pki" / "my-notes.txt").read_text() == "mine"
    assert (directory / "pki" / "clients" / "carol.pem").read_text() == "mine too"
    assert (directory / "agent.toml").read_text() == "[identity]\n"
    assert (directory / "pki" / "ca-bundle.pem").read_bytes() != old_bundle  # recreated: a new root CA
    assert (directory / "pki" / "clients" / "alice.pem").exists()


def test_doctor_on_a_revoked_certificate_says_revoked_not_client_auth(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "mallory", "--ca", test_pki.ca_bundle,
                            "--crl", test_pki.crl, env=test_pki.env())
    assert result.returncode == 1
    assert "was revoked" in result.stdout
    assert ("     fix: the certificate was revoked: ask the card's issuer for a new certificate (a new card)\n"
            in result.stdout), result.stdout
    assert "clientAuth" not in result.stdout


def test_audit_tail_reads_token_then_its_state_in_parentheses() -> None:
    event = AuditEvent.security_alert(AlertType.PIN_LOCKED, "locked", user=User("", "", "alice", "0123"))
    line = summarize(render(event, AuditSource("ws1", "ws1"))).line()
    assert line.endswith("token alice (locked)"), line


def test_a_softhsm_agent_does_not_ask_pcscd(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    with running_agent(test_pki, tmp_path, [tunnel("pacs", free_port())]) as agent:
        log = agent.log()
    assert ("card events: polling every 50 ms (the module's tokens are not in card readers: no PC/SC events to "
            "wait for)") in log
    assert "pcscd" not in log


def test_token_labels_and_certificate_subjects_are_printed_escaped(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    env = make_token(tmp_path, test_pki, "evil\x1b[2J", "ec", "Eve\x1b]0;pwned\x07 Example").env()
    tokens = run_card_agent("tokens", "--module", "softhsm2", env=env, check=True).stdout
    identities = run_card_agent("identities", "--module", "softhsm2", env=env, check=True).stdout
    assert "evil\\x1b[2J" in tokens and "\x1b" not in tokens, tokens
    assert "\x1b" not in identities and "\x07" not in identities, identities
    assert "evil\\x1b[2J: CN=Eve\\x1b]0\\;pwned\\x07 Example,O=Example Hospital Test PKI" in identities, identities
