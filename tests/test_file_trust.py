"""Files another user could have changed are refused at start-up, as ssh refuses its keys: the
configuration file and the PKCS#11 module (and every directory above them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent_runner import running_agent, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki, run_card_agent
from dicom_card_agent.file_trust import UnsafeFileError, check_trusted_file

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
NOBODY = 65534
SETTINGS = "change the agent's settings"
MODULE_RISK = "run code in the agent, which holds the card's PIN"


def needs_root_to_chown() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")


def refused_output(test_pki: ProvisionedPki, config: Path) -> str:
    """What ``card-agent run`` writes when it refuses to start (it must, within seconds, exit 2)."""
    log = config.parent / "refused.log"
    process = start_agent(config, log, test_pki.env(CARD_PIN=USER_PIN))
    try:
        returncode = process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        stop_agent(process)
        raise AssertionError(f"the agent started instead of refusing:\n{log.read_text()}") from None
    output = log.read_text()
    assert returncode == 2, output
    return output


def run_refused(test_pki: ProvisionedPki, config: Path) -> str:
    """What ``card-agent run`` says when it refuses to start: one error line, nothing started before it."""
    output = refused_output(test_pki, config)
    assert output.count("\n") == 1, output
    return output


# -- the configuration file -------------------------------------------------------------------------


def test_a_group_writable_configuration_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.chmod(0o664)
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the configuration file {config}: it is writable by group (mode 0664), "
        f"so another user could {SETTINGS}; run `chmod go-w {config}`\n")


def test_a_configuration_in_a_directory_others_can_write_is_refused(test_pki: ProvisionedPki,
                                                                     tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    config = write_config(shared / "agent.toml", test_pki, [tunnel("pacs", 104)])
    shared.chmod(0o777)  # anyone could replace agent.toml, whatever its own mode
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the configuration file {config}: the directory {shared} above it is "
        f"writable by group and others (mode 0777), so another user could {SETTINGS}; run `chmod go-w {shared}`\n")


def test_a_configuration_of_another_user_is_refused(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    needs_root_to_chown()
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    os.chown(config, NOBODY, -1)
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the configuration file {config}: it belongs to uid {NOBODY} (nobody), "
        f"not to root, so another user could {SETTINGS}; run `chown root {config}` as root, or move the file "
        "somewhere safe\n")


def test_card_agent_status_refuses_it_too(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)])
    config.chmod(0o646)
    result = run_card_agent("status", "--config", config, env=test_pki.env())
    assert result.returncode == 2
    assert f"it is writable by others (mode 0646), so another user could {SETTINGS}" in result.stderr


# -- the PKCS#11 module ----------------------------------------------------------------------------


@pytest.fixture
def module_copy(tmp_path: Path) -> Path:
    """SoftHSM's module, copied where the test decides who may write it."""
    directory = tmp_path / "modules"
    directory.mkdir(mode=0o755)
    copy = directory / "libsofthsm2.so"
    shutil.copy(SOFTHSM_MODULE.resolve(), copy)
    copy.chmod(0o755)
    return copy


def test_a_safe_module_copy_is_used(test_pki: ProvisionedPki, tmp_path: Path, module_copy: Path) -> None:
    # The control for the refusals below: the copy itself works.
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 104)], module=str(module_copy)) as agent:
        assert f"module {module_copy}" in agent.log()


@pytest.mark.parametrize("target, mode, shown", [("file", 0o775, "it is writable by group (mode 0775)"),
                                                 ("directory", 0o757, "is writable by others (mode 0757)")],
                         ids=["file", "directory"])
def test_a_module_others_can_write_is_refused(test_pki: ProvisionedPki, tmp_path: Path, module_copy: Path,
                                              target: str, mode: int, shown: str) -> None:
    changed = module_copy if target == "file" else module_copy.parent
    changed.chmod(mode)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], module=str(module_copy))
    where = "it" if target == "file" else f"the directory {changed} above it"
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the PKCS#11 module {module_copy}: {where} "
        f"{shown.removeprefix('it ')}, so another user could {MODULE_RISK}; run `chmod go-w {changed}`\n")


def test_a_module_of_another_user_is_refused(test_pki: ProvisionedPki, tmp_path: Path, module_copy: Path) -> None:
    needs_root_to_chown()
    os.chown(module_copy, NOBODY, -1)
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", 104)], module=str(module_copy))
    assert run_refused(test_pki, config) == (
        f"card-agent: error: refusing to use the PKCS#11 module {module_copy}: it belongs to uid {NOBODY} "
        f"(nobody), not to root, so another user could {MODULE_RISK}; run `chown root {module_copy}` as root, "
        "or move the file somewhere safe\n")


# -- the rule ---------------------------------------------------------------------------------------


def test_a_sticky_directory_like_tmp_is_no_objection(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # others may add entries but not rename or remove ours
    (sticky / "agent.toml").write_text("")
    check_trusted_file(sticky / "agent.toml", "the configuration file", SETTINGS)


def test_a_link_in_a_writable_directory_is_refused_even_to_a_safe_file(tmp_path: Path) -> None:
    target = tmp_path / "agent.toml"
    target.write_text("")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "agent.toml").symlink_to(target)
    shared.chmod(0o777)  # whoever writes here chooses what the link points to
    with pytest.raises(UnsafeFileError, match=f"the directory {shared} above it is writable by group and others"):
        check_trusted_file(shared / "agent.toml", "the configuration file", SETTINGS)


def test_only_regular_files(tmp_path: Path) -> None:
    with pytest.raises(UnsafeFileError, match=f"refusing to use the configuration file {tmp_path}: it is not a "
                                              "regular file"):
        check_trusted_file(tmp_path, "the configuration file", SETTINGS)
