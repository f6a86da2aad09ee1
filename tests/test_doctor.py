"""`card-agent doctor`: one line per check, ok/fail with the fix, exit 1 on any failure; the agent's
configuration, found as `run` finds it, gives the defaults of its flags, and a configuration file or
module another user could change is refused (exit 2).

The SoftHSM module is named: with ``auto`` a card in a pcscd reader would win over the test tokens
(tests/test_virtual_cac.py checks that)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent_runner import tunnel, write_config
from conftest import ProvisionedPki, run_card_agent
from test_file_trust import SOFTHSM_MODULE


def lines(text: str) -> dict[str, str]:
    return {line[5:].split(":")[0]: line[:4].strip() for line in text.splitlines() if not line.startswith(" ")}


def test_all_green_for_alice_with_the_ca_bundle(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "alice", "--ca", test_pki.ca_bundle,
                            "--crl", test_pki.crl, env=test_pki.env())
    assert result.returncode == 0, result.stdout + result.stderr
    status = lines(result.stdout)
    for check in ("openssl", "pkcs11-provider", "pkcs11-module", "provider-loads", "tokens", "pin alice",
                  "identity alice", "chain alice"):
        assert status[check] == "ok", result.stdout
    assert "chain alice: complete to" in result.stdout and "CN=Test Root CA" in result.stdout


def test_untrusted_identity_fails_with_a_fix(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "stranger", "--ca", test_pki.ca_bundle,
                            env=test_pki.env())
    assert result.returncode == 1
    assert "fail identity stranger: CN=Stranger Example" in result.stdout
    assert "does not chain to a CA in" in result.stdout
    assert "     fix: " in result.stdout


def test_missing_module_fails_the_module_check(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "/nonexistent/libcard.so", env=test_pki.env())
    assert result.returncode == 1
    assert "fail pkcs11-module: PKCS#11 module /nonexistent/libcard.so does not exist" in result.stdout
    assert lines(result.stdout)["openssl"] == "ok"


def test_a_module_that_does_not_start_is_not_told_to_be_installed(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", env=test_pki.env(SOFTHSM2_CONF=str(tmp_path / "none")))
    assert result.returncode == 1
    module_check = result.stdout.split("fail pkcs11-module: ", 1)[1].splitlines()[:2]
    assert module_check == [
        "PKCS#11 module /usr/lib/softhsm/libsofthsm2.so (profile softhsm2) did not start: its C_Initialize answered "
        "GeneralError. SoftHSM reads SOFTHSM2_CONF (else /etc/softhsm/softhsm2.conf) and the directories.tokendir it "
        "names: both must exist and be readable by this user (SoftHSM writes why to the system log)",
        "     fix: the module is installed and loads: set up what it needs to start (above); reinstalling it does not "
        "help"]


def test_chain_is_skipped_without_a_bundle(test_pki: ProvisionedPki) -> None:
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "bob", env=test_pki.env())
    assert result.returncode == 0
    assert "skip chain bob: not checked: give the server's CA bundle with --ca" in result.stdout


# -- the configuration: found as `run` finds it, its settings the defaults of the flags -----------------


def no_configuration(test_pki: ProvisionedPki, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a user with no configuration of their own (and none named)."""
    env = test_pki.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.pop("CARD_AGENT_CONFIG", None)
    return {**env, **extra}


def where_found(how: str, config: Path, test_pki: ProvisionedPki, tmp_path: Path) -> tuple[list[str], dict]:
    """The arguments and environment that make `doctor` find ``config``: ``how`` is "--config",
    "CARD_AGENT_CONFIG" or "user" (the user's ~/.config/dicom-card-agent/agent.toml)."""
    if how == "--config":
        return ["--config", str(config)], no_configuration(test_pki, tmp_path)
    if how == "CARD_AGENT_CONFIG":
        return [], no_configuration(test_pki, tmp_path, CARD_AGENT_CONFIG=str(config))
    user = tmp_path / "xdg" / "dicom-card-agent" / "agent.toml"
    user.parent.mkdir(parents=True)
    shutil.copy(config, user)
    return [], no_configuration(test_pki, tmp_path)


@pytest.mark.parametrize("how", ["--config", "CARD_AGENT_CONFIG", "user"])
def test_the_configuration_gives_module_token_ca_and_crls(test_pki: ProvisionedPki, tmp_path: Path,
                                                          how: str) -> None:
    """No flag: the module, the token, the CA bundle and the CRLs are the configuration's (doctor
    ignored it, and checked every token of `auto` without a chain)."""
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], token="bob")
    args, env = where_found(how, config, test_pki, tmp_path)
    if how == "user":
        config = tmp_path / "xdg" / "dicom-card-agent" / "agent.toml"
    result = run_card_agent("doctor", *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    first = result.stdout.splitlines()[0]
    assert first == (f"ok   config: {config}: module softhsm2, token bob, CA bundle {test_pki.ca_bundle}, "
                     "1 CRL file(s)"), result.stdout
    assert "ok   tokens: 'bob'\n" in result.stdout  # the configuration's token only
    assert f"ok   chain bob: complete to {test_pki.ca_bundle}" in result.stdout
    assert f"ok   revocation bob: not revoked according to CRL file {test_pki.crl}" in result.stdout


def test_flags_override_the_configuration(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], token="bob",
                          module="/nonexistent/libcard.so", trust={"ca": str(test_pki.pki / "untrusted-ca.pem")})
    result = run_card_agent("doctor", "--config", config, "--module", "softhsm2", "--token", "alice", "--ca",
                            test_pki.ca_bundle, env=no_configuration(test_pki, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"ok   config: {config}: module softhsm2, token alice, CA bundle {test_pki.ca_bundle}, 1 CRL file(s)"), \
        result.stdout
    assert "ok   tokens: 'alice'\n" in result.stdout
    assert f"ok   chain alice: complete to {test_pki.ca_bundle}" in result.stdout


def test_the_configurations_module_is_named_in_the_fix(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], module="/nonexistent/libcard.so")
    result = run_card_agent("doctor", "--config", config, env=no_configuration(test_pki, tmp_path))
    assert result.returncode == 1
    assert "fail pkcs11-module: PKCS#11 module /nonexistent/libcard.so does not exist" in result.stdout
    assert "or set [identity] module" in result.stdout, result.stdout


@pytest.mark.parametrize("how", ["--config", "CARD_AGENT_CONFIG"])
def test_an_unsafe_configuration_is_refused_as_status_refuses_it(test_pki: ProvisionedPki, tmp_path: Path,
                                                                 how: str) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.chmod(0o664)
    args, env = where_found(how, config, test_pki, tmp_path)
    doctor = run_card_agent("doctor", *args, env=env)
    status = run_card_agent("status", *args, env=env)
    assert doctor.returncode == status.returncode == 2, doctor.stdout + doctor.stderr
    assert doctor.stdout == ""
    assert doctor.stderr == status.stderr == (
        f"card-agent: error: refusing to use the configuration file {config}: it is writable by group (mode 0664), "
        f"so another user could change the agent's settings; run `chmod go-w {config}`\n")


def test_a_module_others_can_write_is_refused_with_exit_2(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """As `tokens` and `run` refuse it (docs/configuration.md, "File trust"); doctor made it one failed
    check (exit 1)."""
    modules = tmp_path / "modules"
    modules.mkdir(mode=0o755)
    module = modules / "libsofthsm2.so"
    shutil.copy(SOFTHSM_MODULE.resolve(), module)
    module.chmod(0o775)
    result = run_card_agent("doctor", "--module", module, env=no_configuration(test_pki, tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        f"card-agent: error: refusing to use the PKCS#11 module {module}: it is writable by group (mode 0775), so "
        f"another user could run code in the agent, which holds the card's PIN; run `chmod go-w {module}`\n")


def test_a_broken_configuration_is_one_failed_check_and_the_card_is_checked_all_the_same(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.write_text(config.read_text().replace("remote = ", "remot = "))
    result = run_card_agent("doctor", "--config", config, "--module", "softhsm2", "--token", "bob",
                            env=no_configuration(test_pki, tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"fail config: {config} [[tunnel]] 'pacs': unknown key 'remot' (did you mean 'remote'?)",
        "     fix: correct what the message names (`card-agent check` checks the whole file); the checks below use "
        "the flags"], result.stdout
    assert lines(result.stdout)["identity bob"] == "ok"


def test_a_named_configuration_that_is_missing_is_an_error(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    named = run_card_agent("doctor", "--config", tmp_path / "nope.toml", env=no_configuration(test_pki, tmp_path))
    assert named.returncode == 2 and named.stdout == ""
    assert named.stderr == f"card-agent: error: cannot read configuration {tmp_path / 'nope.toml'}: No such file or " \
                           "directory\n"
    by_variable = run_card_agent("doctor", env=no_configuration(test_pki, tmp_path,
                                                                CARD_AGENT_CONFIG=str(tmp_path / "nope.toml")))
    assert by_variable.returncode == 2
    assert by_variable.stderr == f"card-agent: error: CARD_AGENT_CONFIG={tmp_path / 'nope.toml'}: no such file\n"


def test_without_a_configuration_doctor_uses_its_flags_as_before(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    if Path("/etc/dicom-card-agent/agent.toml").exists():
        pytest.skip("this machine has a system-wide configuration, which doctor would use")
    result = run_card_agent("doctor", "--module", "softhsm2", "--token", "bob",
                            env=no_configuration(test_pki, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config" not in lines(result.stdout)
    assert result.stdout.startswith("ok   openssl: ")
