"""The configuration is found without flags (docs/configuration.md, "Where the configuration is"), and
`status`/`lock` never talk to an agent of another configuration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from agent_runner import running_agent, tunnel
from conftest import ProvisionedPki, run_card_agent
from dicom_card_agent.config import locate
from dicom_card_agent.config.locate import ConfigNotFoundError, locate_config


@pytest.fixture
def system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "etc" / "agent.toml"
    monkeypatch.setattr(locate, "SYSTEM_CONFIG", path)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def test_the_search_order(tmp_path: Path, system_config: Path) -> None:
    home = tmp_path / "home"
    environ = {"HOME": str(home)}
    with pytest.raises(ConfigNotFoundError) as error:
        locate_config(None, environ)
    assert str(error.value) == (
        "no configuration found: give --config FILE, set CARD_AGENT_CONFIG, or create one of "
        f"{home}/.config/dicom-card-agent/agent.toml, {system_config}")
    touch(system_config)
    assert locate_config(None, environ) == system_config
    user = touch(home / ".config" / "dicom-card-agent" / "agent.toml")
    assert locate_config(None, environ) == user
    xdg = touch(tmp_path / "xdg" / "dicom-card-agent" / "agent.toml")
    assert locate_config(None, {**environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")}) == xdg
    named = touch(tmp_path / "named.toml")
    assert locate_config(None, {**environ, "CARD_AGENT_CONFIG": str(named)}) == named
    assert locate_config(tmp_path / "explicit.toml", {**environ, "CARD_AGENT_CONFIG": str(named)}) == (
        tmp_path / "explicit.toml")


def test_a_named_file_that_is_missing_is_an_error_not_a_reason_to_look_further(
        tmp_path: Path, system_config: Path) -> None:
    touch(system_config)
    with pytest.raises(ConfigNotFoundError, match=r"^CARD_AGENT_CONFIG=/nowhere/agent.toml: no such file$"):
        locate_config(None, {"HOME": str(tmp_path), "CARD_AGENT_CONFIG": "/nowhere/agent.toml"})


def test_status_and_lock_find_the_agent_without_flags_and_refuse_another_configuration(
        test_pki: ProvisionedPki, tmp_path: Path) -> None:
    # The tunnel's PACS is never asked for: status and lock do not touch it.
    with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", 9)],
                       agent={"runtime_dir": str(tmp_path / "runtime")}):
        config = tmp_path / "agent" / "agent.toml"
        home = tmp_path / "home"
        (home / ".config" / "dicom-card-agent").mkdir(parents=True)
        (home / ".config" / "dicom-card-agent" / "agent.toml").symlink_to(config)
        env = test_pki.env(HOME=str(home))
        env.pop("CARD_AGENT_CONFIG", None)
        status = json.loads(run_card_agent("status", "--json", env=env, check=True).stdout)
        assert status["state"] == "signed in"
        by_variable = json.loads(run_card_agent("status", "--json", env={**env, "CARD_AGENT_CONFIG": str(config)},
                                                check=True).stdout)
        assert by_variable["identity"] == status["identity"]

        # A copy elsewhere names the same runtime directory: the agent there is not its agent.
        copy = shutil.copy(config, tmp_path / "copy.toml")
        refused = run_card_agent("lock", "--config", copy, env=env)
        assert refused.returncode != 0
        assert f"the agent answering here runs with {config}, not {copy}" in refused.stderr

        locked = run_card_agent("lock", env=env, check=True)
        assert "locked" in locked.stdout
