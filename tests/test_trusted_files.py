"""Every file the agent trusts or runs is refused when another user could have changed it, as the
configuration and the PKCS#11 module are (tests/test_file_trust.py): the CA bundle, the CRL files,
require_issuer, an inbound listener's certificate and key, and the PIN dialog program. Refused at
start, at a reload, by `card-agent check` and `doctor`, and, for the CRL files (re-read while the
agent runs) and the PIN dialog (run at each sign-in), when they are used."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent_runner import inbound_listener, running_agent, s_server, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.token.pin import PinSource, PinUnavailableError
from peers.pki_files import write_crl
from test_crl_files import PACS_CERTIFICATE, agent_settings, associate
from test_file_trust import NOBODY, needs_root_to_chown, refused_output, run_refused
from test_tunnel_verification import assert_accepted, assert_rejected

CA_RISK = "add a CA of their own, and the agent would trust the servers and clients it certifies"
CRL_RISK = "replace its CRLs with older ones that do not list a certificate revoked since"
PINENTRY_RISK = "put a program of their own in its place, which the clinician would type the card's PIN into"


OF_NOBODY = f"it belongs to uid {NOBODY} (nobody), not to root, so another user could"
"""What a refusal says of a file of uid 65534, after naming it."""


def fix_owner(path: Path) -> str:
    return f"; run `chown root {path}` as root, or move the file somewhere safe"


def copied(source: Path, directory: Path, mode: int = 0o644) -> Path:
    """``source`` copied into ``directory`` (made, mode 0755), for the test to decide who may write it."""
    directory.mkdir(mode=0o755, exist_ok=True)
    copy = directory / source.name
    shutil.copy(source, copy)
    copy.chmod(mode)
    return copy


def last_line_refused(test_pki: ProvisionedPki, config: Path) -> str:
    """The error line of a `card-agent run` that refuses to start (an unusable CRL file is also
    logged as a warning before it, as every unusable CRL file is)."""
    return refused_output(test_pki, config).splitlines()[-1]


def failures(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("fail")]


# -- [trust] ca --------------------------------------------------------------------------------------


def test_run_refuses_a_ca_bundle_of_another_user(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The reviewer's case: uid 65534 owns the bundle, appends its own CA, and its PACS is taken."""
    needs_root_to_chown()
    ca = copied(test_pki.ca_bundle, tmp_path / "trust")
    os.chown(ca, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], trust={"ca": str(ca)})
    assert run_refused(test_pki, config) == (
        f"card-agent: error: {config} [trust].ca: refusing to use the CA bundle {ca}: {OF_NOBODY} {CA_RISK}"
        f"{fix_owner(ca)}\n")


def test_a_reload_refuses_a_ca_bundle_others_can_now_write(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    ca = copied(test_pki.ca_bundle, tmp_path / "trust")
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], trust={"ca": str(ca)}) as agent:
        ca.chmod(0o666)
        mark = len(agent.log())
        agent.process.send_signal(signal.SIGHUP)
        log = agent.wait_for_log("SIGHUP: configuration ", timeout=10)[mark:]
    config = tmp_path / "agent" / "agent.toml"
    assert (f"card-agent: ERROR: SIGHUP: configuration not reloaded, the running one goes on: {config} [trust].ca: "
            f"refusing to use the CA bundle {ca}: it is writable by group and others (mode 0666), so another user "
            f"could {CA_RISK}; run `chmod go-w {ca}`") in log, log


def test_check_and_doctor_report_a_ca_bundle_of_another_user(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    needs_root_to_chown()
    ca = copied(test_pki.ca_bundle, tmp_path / "trust")
    os.chown(ca, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], trust={"ca": str(ca), "crl": []})
    check = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    doctor = run_card_agent("doctor", "--module", "softhsm2", "--token", "alice", "--ca", ca, env=test_pki.env())
    refusal = f"refusing to use the CA bundle {ca}: {OF_NOBODY} {CA_RISK}{fix_owner(ca)}"
    assert check.returncode == 2, check.stdout + check.stderr
    assert failures(check.stdout) == [f"fail trust: {refusal}"], check.stdout
    assert doctor.returncode != 0, doctor.stdout + doctor.stderr
    assert f"fail trust: {refusal}" in failures(doctor.stdout), doctor.stdout


# -- [trust] crl -------------------------------------------------------------------------------------


def test_run_and_check_refuse_a_crl_file_of_another_user(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    needs_root_to_chown()
    crl = copied(test_pki.crl, tmp_path / "crls")
    os.chown(crl, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], **agent_settings(crl))
    refusal = f"{config} [trust].crl: refusing to use the CRL file {crl}: {OF_NOBODY} {CRL_RISK}{fix_owner(crl)}"
    check = run_card_agent("check", "--config", config, env=test_pki.env(CARD_PIN=USER_PIN))
    assert last_line_refused(test_pki, config) == f"card-agent: error: {refusal}"
    assert check.returncode == 2, check.stdout + check.stderr
    assert failures(check.stdout) == [f"fail crl: {refusal}"], check.stdout


def test_a_crl_file_another_user_takes_over_while_the_agent_runs_is_refused(test_pki: ProvisionedPki,
                                                                            tmp_path: Path) -> None:
    """The CRL revokes the PACS. The file is then given to uid 65534 by mistake, and that user puts
    back a CRL that does not list the PACS: the agent refuses the file, says so, and goes on with
    the CRL it read while the file was safe, so the PACS stays refused. Before, it read the new
    CRL and took the revoked PACS again."""
    needs_root_to_chown()
    crls = tmp_path / "crls"
    crls.mkdir(mode=0o755)
    crl = write_crl(test_pki.pki, crls / "issuing.crl.pem", [test_pki.pki / "server-chain.pem"])
    not_listing_the_pacs = write_crl(test_pki.pki, tmp_path / "older.crl.pem", [])
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], **agent_settings(crl)) as agent:
            answer, log = associate(agent, 0)
            assert_rejected(answer, log, f"certificate {PACS_CERTIFICATE} was revoked on ")
            changed = len(agent.log())
            os.chown(crl, NOBODY, -1)
            crl.write_bytes(not_listing_the_pacs.read_bytes())  # what that user can do now
            time.sleep(3)  # the agent looks at its CRL files every 2 s
            answer, log = associate(agent, len(agent.log()))
            since_the_change = agent.log()[changed:]  # told once: at this association, or at a look before it
            status = run_card_agent("status", "--config", tmp_path / "agent" / "agent.toml", env=test_pki.env(),
                                    check=True).stdout
    assert_rejected(answer, log, f"server 127.0.0.1:{port} is not trusted: certificate {PACS_CERTIFICATE} was "
                                 "revoked on ")
    refusal = f"refusing to use the CRL file {crl}: {OF_NOBODY} {CRL_RISK}{fix_owner(crl)}"
    assert f"card-agent[session]: WARNING: {refusal}; still using the CRLs read from it before" in since_the_change, \
        since_the_change
    line = next(line for line in status.splitlines() if line.startswith(f"crl {crl}: "))
    assert line.startswith(f"crl {crl}: UNUSABLE: {refusal}; still using CRL of CN=Test Issuing CA,"), line


def test_a_crl_file_safe_again_is_read_again(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """Once the administrator fixes the mode, the file's CRLs count again: the refusal is not for good."""
    crls = tmp_path / "crls"
    crls.mkdir(mode=0o755)
    crl = write_crl(test_pki.pki, crls / "issuing.crl.pem", [])
    with s_server(test_pki, tmp_path) as (port, _):
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", port)], **agent_settings(crl)) as agent:
            assert_accepted(*associate(agent, 0))
            changed = len(agent.log())
            crls.chmod(0o777)  # a directory above it: the file itself does not change
            time.sleep(3)
            associate(agent, len(agent.log()))
            refused_log = agent.log()[changed:]  # told once: at this association, or at a look before it
            crls.chmod(0o755)
            crl.write_bytes(write_crl(test_pki.pki, tmp_path / "new.crl.pem",
                                      [test_pki.pki / "server-chain.pem"]).read_bytes())
            time.sleep(3)
            answer, log = associate(agent, len(agent.log()))
    assert (f"WARNING: refusing to use the CRL file {crl}: the directory {crls} above it is writable by group and "
            f"others (mode 0777), so another user could {CRL_RISK}; run `chmod go-w {crls}`; still using the CRLs "
            "read from it before") in refused_log, refused_log
    assert_rejected(answer, log, f"certificate {PACS_CERTIFICATE} was revoked on ")


# -- require_issuer, an inbound listener's certificate and key ----------------------------------------


@pytest.mark.parametrize("key", ["require_issuer", "server_certificate", "server_key"])
def test_run_refuses_the_other_trust_files_others_can_write(test_pki: ProvisionedPki, tmp_path: Path,
                                                             key: str) -> None:
    files = tmp_path / "files"
    issuer = copied(test_pki.pki / "issuing-ca.pem", files)
    certificate = copied(test_pki.pki / "server-chain.pem", files)
    private_key = copied(test_pki.pki / "server.key", files, mode=0o600)
    changed = {"require_issuer": issuer, "server_certificate": certificate, "server_key": private_key}[key]
    changed.chmod(changed.stat().st_mode | 0o020)
    mode = f"{changed.stat().st_mode & 0o777:04o}"
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104, require_issuer=str(issuer))],
                          inbound=[inbound_listener("retrieves", "127.0.0.1:11112", server_certificate=str(certificate),
                                                    server_key=str(private_key))])
    where, what, risk = {
        "require_issuer": ("[[tunnel]] 'pacs'.require_issuer", "the required issuer's certificate",
                           "choose which CA's servers tunnel pacs accepts"),
        "server_certificate": ("[[inbound]] 'retrieves'.server_certificate", "the listener's certificate",
                               "change the certificate inbound retrieves presents to the PACS"),
        "server_key": ("[[inbound]] 'retrieves'.server_key", "the listener's key",
                       "replace the key inbound retrieves proves its certificate with"),
    }[key]
    assert run_refused(test_pki, config) == (
        f"card-agent: error: {config} {where}: refusing to use {what} {changed}: it is writable by group (mode "
        f"{mode}), so another user could {risk}; run `chmod go-w {changed}`\n")


# -- the PIN dialog program --------------------------------------------------------------------------

TYPING_PINENTRY = """#!/bin/sh
# A pinentry that "types" 123456 and keeps a copy: what another user's program would do.
echo "OK Pleased to meet you"
while read -r line; do
  case "$line" in
    GETPIN*) echo 123456 >> "{kept}"; echo "D 123456"; echo OK ;;
    BYE*) echo OK; exit 0 ;;
    *) echo OK ;;
  esac
done
"""


def typing_pinentry(directory: Path, name: str = "pinentry-typing") -> tuple[Path, Path]:
    """A pinentry program in ``directory`` (mode 0755) and the file it keeps the PIN in."""
    directory.mkdir(mode=0o755, exist_ok=True)
    program, kept = directory / name, directory.parent / "kept-pin"
    program.write_text(TYPING_PINENTRY.replace("{kept}", str(kept)))
    program.chmod(0o755)
    return program, kept


def test_run_and_check_refuse_a_pin_dialog_program_of_another_user(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The reviewer's case: `pin = "pinentry:PROGRAM"` naming uid 65534's program, which got the PIN."""
    needs_root_to_chown()
    program, kept = typing_pinentry(tmp_path / "bin")
    os.chown(program, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          identity={"pin": f"pinentry:{program}"})
    refusal = (f"{config} [identity].pin: refusing to use the PIN dialog program {program}: {OF_NOBODY} "
               f"{PINENTRY_RISK}{fix_owner(program)}")
    check = run_card_agent("check", "--config", config, env=test_pki.env())
    assert run_refused(test_pki, config) == f"card-agent: error: {refusal}\n"
    assert check.returncode == 2, check.stdout + check.stderr
    assert failures(check.stdout) == [f"fail pin: {refusal}"], check.stdout
    assert not kept.exists()


def test_the_pinentry_chosen_on_path_is_checked_too(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """`pin = "pinentry"` in a graphical session: the program of [desktop] pinentry found on PATH,
    here in a directory others can write."""
    program, kept = typing_pinentry(tmp_path / "bin", "pinentry-gnome3")
    program.parent.chmod(0o757)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], identity={"pin": "pinentry"})
    env = test_pki.env(CARD_PIN=USER_PIN, DISPLAY=":0", PATH=f"{program.parent}:/usr/bin:/bin")
    check = run_card_agent("check", "--config", config, env=env)
    assert check.returncode == 2, check.stdout + check.stderr
    assert failures(check.stdout) == [
        f"fail pin: {config} [identity].pin: refusing to use the PIN dialog program {program}: the directory "
        f"{program.parent} above it is writable by others (mode 0757), so another user could {PINENTRY_RISK}; run "
        f"`chmod go-w {program.parent}`"], check.stdout
    assert not kept.exists()


def test_a_pin_dialog_program_taken_over_after_start_is_not_run(tmp_path: Path) -> None:
    """Checked at each sign-in too, not only at start: the program is run then, not before."""
    needs_root_to_chown()
    program, kept = typing_pinentry(tmp_path / "bin")
    source = PinSource.parse(f"pinentry:{program}")
    source.prepare()  # safe at start
    os.chown(program, NOBODY, -1)
    with pytest.raises(PinUnavailableError) as refused:
        source.read("PIN: ")
    assert str(refused.value) == (f"refusing to use the PIN dialog program {program}: {OF_NOBODY} "
                                  f"{PINENTRY_RISK}{fix_owner(program)}")
    assert not kept.exists()


# -- [audit.syslog] ----------------------------------------------------------------------------------


def test_run_refuses_an_audit_repository_ca_of_another_user(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """With the audit repository's CA bundle, another user could have the records sent to a
    repository of their own: refused as the tunnels' [trust] ca is."""
    needs_root_to_chown()
    ca = copied(test_pki.ca_bundle, tmp_path / "audit-trust")
    os.chown(ca, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)],
                          audit={"spool": str(tmp_path / "spool"),
                                 "syslog": {"address": "127.0.0.1:6514", "ca": str(ca), "server_name": "localhost"}})
    assert run_refused(test_pki, config) == (
        f"card-agent: error: [audit.syslog]: refusing to use the audit repository's CA bundle {ca}: {OF_NOBODY} add "
        f"a CA of their own, and the agent would send its audit records to a repository they run{fix_owner(ca)}\n")
